// examples/meeting-commands/page.html in headless Chromium: two participants (one per
// edge) in one meeting. Steps come from the test on stdin, one JSON line each, and each
// answers with one JSON line on stdout:
//   {"wait": "members"}                       both pages list both names
//   {"send": 0, "command": "pause"}           participant 0 clicks a command
//   {"send": 1, "command": "configure", "data": {...}}
//   {"until": {"status": "paused", "by": "ada"}}   both pages show that status
//   {"until": {"record": true, "by": "grace"}}     both pages show that setting
// End of stdin closes the browser.
//
//   node meeting.mjs '<json: {page, meeting, people: [{endpoint, token, name}], timeoutMs}>'
import readline from 'node:readline';
import { launch } from './chromium.mjs';

const cfg = JSON.parse(process.argv[2] || '{}');
const browser = await launch();
const say = (o) => console.log(JSON.stringify(o));
const pages = [];
try {
  for (const p of cfg.people) {
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    page.on('pageerror', (e) => console.error('pageerror:', e.message));
    const hash = new URLSearchParams({ endpoint: p.endpoint, meeting: cfg.meeting, token: p.token, name: p.name });
    await page.goto(`file://${cfg.page}#${hash}`);
    await page.waitForFunction(() => window.meeting && window.meeting.ready, null, { timeout: 20000 });
    pages.push(page);
  }
  say({ ready: true });
  const names = cfg.people.map((p) => p.name).sort();
  const everywhere = (fn, arg) => Promise.all(pages.map((pg) => pg.waitForFunction(fn, arg, { timeout: cfg.timeoutMs || 30000 })));
  for await (const line of readline.createInterface({ input: process.stdin })) {
    const step = JSON.parse(line);
    try {
      if (step.wait === 'members') {
        await everywhere((want) => JSON.stringify(window.meeting.members) === JSON.stringify(want), names);
      } else if (step.send !== undefined) {
        if (step.command === 'configure') await pages[step.send].evaluate((d) => window.meeting.send('configure', d), step.data);
        else await pages[step.send].click(`[data-command="${step.command}"]`);
        await pages[step.send].waitForFunction((n) => window.meeting.sent >= n, step.sentAtLeast || 1);
      } else if (step.until?.status) {
        await everywhere((u) => window.meeting.status?.state === u.status && window.meeting.status?.by === u.by, step.until);
      } else if (step.until && 'record' in step.until) {
        await everywhere((u) => window.meeting.config?.record === u.record && window.meeting.config?.by === u.by, step.until);
      }
      const texts = await Promise.all(pages.map((pg) => pg.evaluate(() => document.getElementById('status').textContent)));
      say({ ok: true, texts });
    } catch (e) {
      say({ ok: false, error: String(e) });
    }
  }
} catch (e) {
  say({ ok: false, error: String(e) });
} finally {
  await browser.close();
}
