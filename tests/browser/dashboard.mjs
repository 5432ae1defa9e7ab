// Drives the cloud's dashboard in headless Chromium (Debian's, through playwright-core):
// both edges appear connected, a reconciliation entry is shown, then the given edge
// process is killed and the dashboard must show it disconnected. Screenshots go to
// the given directory and are checked not to be blank. The reconciliation entry's key
// is hostile markup: it must appear as text and never run.
//
//   node dashboard.mjs <cloud url> <operator key> <pid of edge-b> <screenshot dir> <hostile key>
import { launch } from "./chromium.mjs";
import { statSync } from "node:fs";

const [url, key, pid, outDir, hostile] = process.argv.slice(2);
if (!url || !key || !pid || !outDir) {
  console.error("usage: node dashboard.mjs <cloud url> <operator key> <edge pid> <screenshot dir>");
  process.exit(2);
}
const browser = await launch(["--disable-quic"]);
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on("console", (m) => { if (m.type() === "error") console.error("page:", m.text()); });
  await page.goto(`${url}/dashboard#key=${encodeURIComponent(key)}`);
  for (const edge of ["edge-a", "edge-b"]) {
    await page.waitForSelector(`tr[data-edge="${edge}"] .badge.connected`, { timeout: 20000 });
  }
  await page.waitForSelector("li.conflict", { timeout: 20000 });
  const conflict = await page.textContent("li.conflict");
  if (!conflict.includes("won") || !conflict.includes("lost")) throw new Error(`conflict entry: ${conflict}`);
  if (hostile) {
    const shown = await page.textContent("li.conflict code");
    if (shown !== hostile) throw new Error(`the key is shown as ${JSON.stringify(shown)}, not as the text ${JSON.stringify(hostile)}`);
    if ((await page.$$("li.conflict img")).length) throw new Error("the key became markup (an <img> in the report)");
    const title = await page.title();
    if (title === "pwned") throw new Error("the key's script ran in the operator's browser");
  }
  // The key was traded for an HttpOnly session cookie: nothing in the page holds it.
  const held = await page.evaluate(() => JSON.stringify({ ...localStorage }) + document.cookie + location.href);
  if (held.includes(key)) throw new Error(`the page holds the operator key: ${held}`);
  const byUrl = await fetch(`${url}/v1/admin/stream?key=${encodeURIComponent(key)}`);
  if (byUrl.status !== 401) throw new Error(`a key in the URL was accepted (${byUrl.status})`);
  const csp = (await page.goto(`${url}/dashboard`, { waitUntil: "domcontentloaded" }).catch(() => null))?.headers()["content-security-policy"] || "";
  if (!csp.includes("script-src 'self'")) throw new Error(`no Content-Security-Policy on the dashboard: ${csp}`);
  await page.waitForSelector(`tr[data-edge="edge-a"] .badge.connected`, { timeout: 20000 });
  await page.waitForTimeout(2500); // a few samples for the sparklines
  const shot1 = `${outDir}/dashboard.png`;
  await page.screenshot({ path: shot1, fullPage: true });
  process.kill(Number(pid), "SIGKILL");
  await page.waitForSelector(`tr[data-edge="edge-b"] .badge.disconnected`, { timeout: 20000 });
  await page.waitForSelector(`#timeline .kind.left`, { timeout: 5000 });
  const since = await page.textContent(`tr[data-edge="edge-b"] td.since`);
  if (!since.includes("disconnected")) throw new Error(`edge-b's row says "${since}" after its link ended`);
  const shot2 = `${outDir}/dashboard-edge-down.png`;
  await page.screenshot({ path: shot2, fullPage: true });
  // Non-blank: a real render of tables and text is far larger than an empty page.
  for (const shot of [shot1, shot2]) {
    const size = statSync(shot).size;
    if (size < 20000) throw new Error(`${shot} looks blank (${size} bytes)`);
  }
  const dark = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  console.log(JSON.stringify({ ok: true, screenshots: [shot1, shot2], background: dark }));
} finally {
  await browser.close();
}
