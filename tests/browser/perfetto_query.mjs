// Open one trace in the offline Perfetto UI in headless chromium, run SQL through the UI's own
// trace processor, and print one JSON object on stdout.
//
// Driven by tests/browser/perfetto_ui.py, which serves the UI and the trace and parses the
// output. The request comes as JSON on stdin:
//   {"url": "http://127.0.0.1:PORT/", "chromium": "/path/to/chromium", "timeoutMs": 300000,
//    "queries": {"name": "SELECT ..."}, "trackOrder": true}
// and the answer is
//   {"ok": true, "loadMs": 1234.5, "results": {"name": [{col: value}]},
//    "trackOrder": [{"name": ..., "children": [...]}], "console": [...]}
// or {"ok": false, "error": "...", "console": [...]} with exit status 1.
//
// Why the UI and not trace_processor_shell: the UI is what people open our traces in, and it
// runs its own build of the trace processor (wasm) with its own import settings, so what it
// drops or misreads is what a person would miss.

import { finish, launchBrowser, readStdin } from './browser_common.mjs';

const CONSOLE_KEEP = 60;
const POLL_MS = 100;

async function main() {
  const request = JSON.parse(await readStdin());
  const consoleLines = [];
  const remember = (line) => {
    consoleLines.push(line);
    if (consoleLines.length > CONSOLE_KEEP) consoleLines.shift();
  };
  let pageError = null;
  let answer;
  const deadline = Date.now() + request.timeoutMs;
  const browser = await launchBrowser(request);
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(request.timeoutMs);
    page.on('console', (msg) => remember(`[${msg.type()}] ${msg.text()}`));
    page.on('pageerror', (err) => {
      pageError = pageError ?? String(err?.stack ?? err);
      remember(`[pageerror] ${err}`);
    });
    // Hermetic: only our server answers. The UI also probes 127.0.0.1:9001 for a native
    // trace_processor (which, if one ran there, would replace the wasm engine under test) and
    // fetches a script from the internet; both are refused here.
    const origin = new URL(request.url).origin;
    await page.setRequestInterception(true);
    page.on('request', (req) => {
      const url = req.url();
      if (url.startsWith(origin + '/') || url.startsWith('data:') || url.startsWith('blob:')) {
        req.continue();
      } else {
        req.abort('blockedbyclient');
      }
    });
    page.on('requestfailed', (req) =>
      remember(`[requestfailed] ${req.url()} ${req.failure()?.errorText ?? ''}`),
    );

    const started = performance.now();
    await page.goto(request.url, { waitUntil: 'domcontentloaded' });
    // Loaded means: the UI made a trace current, finished its load sequence (plugins'
    // onTraceLoad included), and its engine answers a query. Polled, never slept on.
    for (;;) {
      if (pageError !== null) throw new Error(`page error while loading: ${pageError}`);
      const state = await page.evaluate(async () => {
        const dialog = document.querySelector('.pf-modal-dialog');
        if (dialog) return { dialog: dialog.innerText };
        const app = window.app;
        if (!app || !app.trace || app.isLoadingTrace) return { loaded: false };
        try {
          await app.trace.engine.query('select 1');
          return { loaded: true };
        } catch (err) {
          return { loaded: false, engineError: String(err) };
        }
      });
      if (state.dialog !== undefined) throw new Error(`the UI showed a dialog: ${state.dialog}`);
      if (state.loaded) break;
      if (Date.now() > deadline) {
        throw new Error(`the trace did not load in ${request.timeoutMs} ms`
          + (state.engineError ? ` (last engine error: ${state.engineError})` : ''));
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
    const loadMs = performance.now() - started;

    const results = {};
    for (const [name, sql] of Object.entries(request.queries)) {
      const rows = await page.evaluate(async (query) => {
        // Values: LONG columns come back as BigInt, which JSON cannot carry; numbers that fit
        // a double exactly stay numbers, others become strings. Blobs become byte lists.
        const plain = (value) => {
          if (typeof value === 'bigint') {
            return Number.isSafeInteger(Number(value)) ? Number(value) : value.toString();
          }
          if (value instanceof Uint8Array) return Array.from(value);
          return value;
        };
        let result;
        try {
          result = await window.app.trace.engine.query(query);
        } catch (err) {
          return { error: String(err?.message ?? err) };
        }
        const columns = result.columns();
        const out = [];
        for (const it = result.iter({}); it.valid(); it.next()) {
          const row = {};
          for (const column of columns) row[column] = plain(it.get(column));
          out.push(row);
        }
        return { rows: out };
      }, sql);
      if (rows.error !== undefined) throw new Error(`query ${name} failed: ${rows.error}`);
      results[name] = rows.rows;
    }

    let trackOrder = null;
    if (request.trackOrder) {
      // The timeline shows the workspace's nodes in this order, top to bottom: the top level
      // holds process and thread groups, their children the tracks inside them.
      trackOrder = await page.evaluate(() => {
        const tree = (node) => ({ name: node.name, children: node.children.map(tree) });
        return window.app.trace.workspace.children.map(tree);
      });
    }
    if (pageError !== null) throw new Error(`page error: ${pageError}`);
    answer = { ok: true, loadMs, results, trackOrder, console: consoleLines };
  } catch (err) {
    answer = { ok: false, error: String(err?.message ?? err), console: consoleLines };
  } finally {
    await browser.close().catch(() => {});
  }
  finish(answer, answer.ok ? 0 : 1);
}

main().catch((err) => finish({ ok: false, error: String(err?.stack ?? err), console: [] }, 1));
