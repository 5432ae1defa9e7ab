// A browser's own fetch, WebSocket and EventSource against an edge serving HTTPS with
// a certificate from a test CA (Chromium is told to trust its key by SPKI hash): the
// demo page loads, REST goes over HTTP/2, two EventSources and a WebSocket connect.
// Prints one JSON line.
//
//   node tls.mjs '<json: {origin, token, channel, spki}>'
import { launch } from './chromium.mjs';

const cfg = JSON.parse(process.argv[2] || '{}');
const browser = await launch([`--ignore-certificate-errors-spki-list=${cfg.spki}`]);
let result = { ok: false };
try {
  const page = await browser.newPage();
  const response = await page.goto(`${cfg.origin}/`);
  const seen = await page.evaluate(async ({ token, channel }) => {
    const q = `token=${encodeURIComponent(token)}`;
    const ready = await fetch('/readyz');
    const ws = await new Promise((resolve) => {
      const s = new WebSocket(`${location.origin.replace('https', 'wss')}/v1/ws?${q}`);
      s.onmessage = (e) => { resolve(JSON.parse(e.data).type); s.close(); };
      s.onerror = () => resolve('error');
    });
    const sse = () => new Promise((resolve) => {
      const es = new EventSource(`/v1/channels/${encodeURIComponent(channel)}/events?${q}`);
      es.addEventListener('subscribed', () => { resolve('subscribed'); });
      es.onerror = () => resolve('error');
    });
    const streams = await Promise.all([sse(), sse()]);
    const protocols = performance.getEntriesByType('resource').map((r) => r.nextHopProtocol);
    return { ready: ready.status, ws, streams, protocols };
  }, { token: cfg.token, channel: cfg.channel });
  result = { ok: true, page: response.status(), protocol: await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol), ...seen };
} catch (e) {
  result = { ok: false, error: String(e) };
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
