// Open one self-contained page (a file:// URL) in headless chromium and report what it did:
// console errors, page errors, every request besides the page itself (each one refused), and
// the counts that the caller asks for by CSS selector.
//
// Driven by tests/browser/static_page.py. The request comes as JSON on stdin:
//   {"url": "file:///.../summary.html", "chromium": "/path/to/chromium", "timeoutMs": 60000,
//    "count": {"name": "css selector"}, "attribute": {"name": ["css selector", "data-x"]}}
// and the answer is
//   {"ok": true, "errors": [...], "requests": [...], "counts": {"name": 3},
//    "attributes": {"name": ["r0", ...]}, "console": [...]}
// or {"ok": false, "error": "...", "console": [...]} with exit status 1.

import { finish, launchBrowser, readStdin } from './browser_common.mjs';

async function main() {
  const request = JSON.parse(await readStdin());
  const consoleLines = [];
  const errors = [];
  const requests = [];
  let answer;
  const browser = await launchBrowser(request);
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(request.timeoutMs);
    page.on('console', (msg) => {
      consoleLines.push(`[${msg.type()}] ${msg.text()}`);
      if (msg.type() === 'error') errors.push(msg.text());
    });
    page.on('pageerror', (err) => errors.push(`page error: ${err}`));
    // Offline: the page itself is the only request answered; any other is recorded, refused.
    await page.setRequestInterception(true);
    page.on('request', (req) => {
      if (req.url() === request.url) {
        req.continue();
      } else {
        requests.push(req.url());
        req.abort('blockedbyclient');
      }
    });
    await page.goto(request.url, { waitUntil: 'load' });
    const found = await page.evaluate((count, attribute) => {
      const counts = {};
      for (const [name, selector] of Object.entries(count)) {
        counts[name] = document.querySelectorAll(selector).length;
      }
      const attributes = {};
      for (const [name, [selector, attr]] of Object.entries(attribute)) {
        attributes[name] = [...document.querySelectorAll(selector)].map((e) => e.getAttribute(attr));
      }
      return { counts, attributes };
    }, request.count ?? {}, request.attribute ?? {});
    answer = { ok: true, errors, requests, ...found, console: consoleLines };
  } catch (err) {
    answer = { ok: false, error: String(err?.message ?? err), console: consoleLines };
  } finally {
    await browser.close().catch(() => {});
  }
  finish(answer, answer.ok ? 0 : 1);
}

main().catch((err) => finish({ ok: false, error: String(err?.stack ?? err), console: [] }, 1));
