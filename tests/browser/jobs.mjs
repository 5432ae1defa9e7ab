// examples/job-events' page in headless Chromium: one project's activity, served by the
// FastAPI service. Prints {"ready":true} once the page is subscribed, then waits until
// it shows `expect` events and prints what it saw (one JSON line).
//
//   node jobs.mjs '<json: {url, expect, timeoutMs}>'
import { launch } from './chromium.mjs';

const cfg = JSON.parse(process.argv[2] || '{}');
const browser = await launch();
let result = { ok: false };
try {
  const page = await browser.newPage();
  page.on('pageerror', (e) => console.error('pageerror:', e.message));
  await page.goto(cfg.url);
  await page.waitForFunction(() => window.activity && window.activity.ready, null, { timeout: 20000 });
  console.log(JSON.stringify({ ready: true }));
  await page.waitForFunction((n) => window.activity.events.length >= n, cfg.expect, { timeout: cfg.timeoutMs || 60000 });
  await page.waitForTimeout(500); // nothing more (no repeats) arrives
  const seen = await page.evaluate(() => ({ events: window.activity.events, opens: window.activity.opens, rows: document.querySelectorAll('#events li').length }));
  result = { ok: true, ...seen };
} catch (e) {
  result = { ok: false, error: String(e) };
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
