// examples/flow-events-sse/page.html in headless Chromium: a plain EventSource (no SDK)
// follows a flow's events while the test publishes them — and kills the page's edge
// mid-stream and restarts it. Waits until every node is done and the streamed log is
// whole; prints one JSON line with "ok" and what the page saw.
//
//   node flow-sse.mjs '<json: {page, endpoint, channel, token, expectLog, nodes, timeoutMs}>'
import { launch } from './chromium.mjs';

const cfg = JSON.parse(process.argv[2] || '{}');
const browser = await launch();
let result = { ok: false };
try {
  const page = await browser.newPage();
  page.on('pageerror', (e) => console.error('pageerror:', e.message));
  const hash = new URLSearchParams({ endpoint: cfg.endpoint, channel: cfg.channel, token: cfg.token });
  await page.goto(`file://${cfg.page}#${hash}`);
  await page.waitForFunction(() => window.flow && window.flow.opens > 0, null, { timeout: 20000 });
  console.log(JSON.stringify({ ready: true }));
  await page.waitForFunction(
    ({ expectLog, nodes }) => {
      const f = window.flow;
      const log = [...f.log.entries()].sort(([a], [b]) => a - b).map(([, t]) => t).join('');
      return f.nodes.size === nodes && [...f.nodes.values()].every((n) => n.state === 'done') && log === expectLog;
    },
    { expectLog: cfg.expectLog, nodes: cfg.nodes },
    { timeout: cfg.timeoutMs || 60000 },
  );
  const seen = await page.evaluate(() => ({ events: window.flow.events, duplicates: window.flow.duplicates, opens: window.flow.opens, text: document.getElementById('log').textContent }));
  result = { ok: true, ...seen };
} catch (e) {
  result = { ok: false, error: String(e) };
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
