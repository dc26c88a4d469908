// What both browser scripts (perfetto_query.mjs, static_page.mjs) share: the JSON request on
// stdin, the one JSON answer on stdout, and headless chromium launched the same way.

import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
// Resolved through NODE_PATH, which the Python drivers point at the install of browser_setup.sh.
const puppeteer = require('puppeteer-core');

/** Read the whole of stdin as a string. */
export async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

/** Print the answer and exit; stdout carries exactly one JSON document. */
export function finish(answer, status) {
  process.stdout.write(JSON.stringify(answer) + '\n', () => process.exit(status));
}

/** Headless chromium at `request.chromium`, with `request.timeoutMs` for its protocol. */
export function launchBrowser(request) {
  return puppeteer.launch({
    executablePath: request.chromium,
    headless: true,
    // --no-sandbox: CI containers run as root, where chromium's sandbox refuses to start.
    args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--no-first-run'],
    protocolTimeout: request.timeoutMs,
  });
}
