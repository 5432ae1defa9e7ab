// The flowboard demo and the browser SDK in headless Chromium (Debian's, through
// playwright-core), against a cloud and two edges started by tests/tests/browser.rs:
//   1. two pages on two edges see each other's node moves and cursors;
//   2. a browser-to-browser data channel (signalled through the edges) carries cursors;
//   3. the WebRTC transport to the edge carries the protocol, and a fresh channel's
//      first flight (a 3,000-op replay) does not stall;
//   4. with WebSocket blocked the SDK falls back to SSE+REST and still works;
//   5. job events published by scripts/demo-jobs show in the activity panel;
//   6. screenshots under docs/, checked not to be blank;
//   7. edge A is killed while a page edits: it fails over and no edit is lost;
//   8. the cloud is killed: page B says "local only — changes will sync" and edits on;
//   (6b) edge B is frozen with SIGSTOP five times: a page on it leaves for edge A
//   within 3 s each time (its ping: 400 ms interval and timeout).
// Prints one JSON line with "ok":true and the figures.
//
//   node flowboard.mjs '<json: {cloud, a, b, token, pidA, pidB, pidCloud, docs, demoJobs}>'
import { launch } from './chromium.mjs';
import { execFileSync } from 'node:child_process';

const cfg = JSON.parse(process.argv[2] || '{}');
const figures = {};
const step = (s) => console.error(`[flowboard] ${s}`);
const browser = await launch(['--allow-loopback-in-peer-connection', '--disable-features=WebRtcHideLocalIpsWithMdns']);
const board = `project:ci-${Date.now().toString(36)}/board`;
const activity = board.split('/')[0];

async function open(name, endpoints, { transports = 'websocket,sse', blockWs = false, ping = null } = {}) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 760 } });
  page.on('console', (m) => { if (m.type() === 'error' && !m.text().includes('favicon')) console.error(`${name}:`, m.text()); });
  page.on('pageerror', (e) => console.error(`${name} pageerror:`, e.message));
  if (blockWs) await page.routeWebSocket(/\/v1\/ws/, (ws) => ws.close());
  const hash = new URLSearchParams({ token: cfg.token, endpoints: endpoints.join(','), transports, board, activity, name, ...(ping ? { ping } : {}) });
  await page.goto(`${endpoints[0]}/#${hash}`);
  await page.waitForFunction(() => window.flowboard?.client.status.online, null, { timeout: 20000 });
  return page;
}
const status = (p) => p.evaluate(() => window.flowboard.client.status);
const nodeAt = (p, id) => p.evaluate((id) => { const n = window.flowboard.nodes().find((n) => n.id === id); return n ? [n.x, n.y] : null; }, id);
const waitFor = (p, fn, arg, what, timeout = 15000) =>
  p.waitForFunction(fn, arg, { timeout, polling: 50 }).catch((e) => { throw new Error(`${what}: ${e.message.split('\n')[0]}`); });

try {
  // 1. Two pages on two edges.
  step('two pages on two edges');
  const pa = await open('ada@A', [cfg.a, cfg.b, cfg.cloud]);
  const pb = await open('bob@B', [cfg.b, cfg.a, cfg.cloud]);
  const [sa, sb] = [await status(pa), await status(pb)];
  if (sa.endpoint !== cfg.a || sb.endpoint !== cfg.b) throw new Error(`endpoints: ${sa.endpoint} ${sb.endpoint}`);
  await pa.evaluate(() => Promise.all([
    window.flowboard.addNode('ingest', 60, 80, 'Ingest'), window.flowboard.addNode('parse', 260, 180, 'Parse'),
    window.flowboard.addNode('enrich', 470, 110, 'Enrich'), window.flowboard.addNode('store', 680, 230, 'Store'),
  ]).then(() => Promise.all([window.flowboard.addLink('ingest', 'parse'), window.flowboard.addLink('parse', 'enrich'), window.flowboard.addLink('enrich', 'store')])));
  await waitFor(pb, () => window.flowboard.nodes().length >= 4, null, 'B sees A\'s nodes');
  let t0 = Date.now();
  await pa.evaluate(() => window.flowboard.moveNode('parse', 300, 320));
  await waitFor(pb, () => { const n = window.flowboard.nodes().find((n) => n.id === 'parse'); return n && n.x === 300 && n.y === 320; }, null, 'B sees A\'s move');
  figures.move_a_to_b_ms = Date.now() - t0;
  await pb.evaluate(() => window.flowboard.moveNode('store', 720, 420));
  await waitFor(pa, () => window.flowboard.nodes().find((n) => n.id === 'store')?.y === 420, null, 'A sees B\'s move');
  // Cursors, by moving the real mouse over the canvas.
  await pa.mouse.move(400, 300);
  await pa.mouse.move(420, 310, { steps: 5 });
  await waitFor(pb, () => [...window.flowboard.cursors.values()].some((c) => c.name === 'ada@A'), null, 'B sees A\'s cursor');
  await pb.mouse.move(700, 500, { steps: 5 });
  await waitFor(pa, () => [...window.flowboard.cursors.values()].some((c) => c.name === 'bob@B'), null, 'A sees B\'s cursor');
  await waitFor(pa, () => [...window.flowboard.board.members.values()].some((m) => m.data?.name === 'bob@B'), null, 'A lists B in presence');

  // 2. Browser-to-browser: the pages open a direct data channel (signals cross the
  //    edges and the cloud); cursors then go peer-to-peer.
  step('peer-to-peer data channel');
  t0 = Date.now();
  await waitFor(pa, () => window.flowboard.board.peerLinks().length >= 1, null, 'A has a p2p link', 20000);
  await waitFor(pb, () => window.flowboard.board.peerLinks().length >= 1, null, 'B has a p2p link', 20000);
  figures.p2p_open_ms = Date.now() - t0;
  const before = await pb.evaluate(() => window.flowboard.stats.cursorsIn.p2p);
  const via = await pa.evaluate(() => { window.flowboard.sendCursor(123, 234); return window.flowboard.board.broadcast('cursor', { x: 124, y: 235, name: 'ada@A', color: '#f00' }); });
  if (via !== 'p2p') throw new Error(`a cursor with an open p2p link went ${via}`);
  await waitFor(pb, (n) => window.flowboard.stats.cursorsIn.p2p > n, before, 'B receives a cursor over p2p');

  // 3. WebRTC to the edge.
  step('WebRTC transport to edge B');
  const pr = await open('rita@B-webrtc', [cfg.b, cfg.a, cfg.cloud], { transports: 'webrtc' });
  const sr = await status(pr);
  if (sr.transport !== 'webrtc') throw new Error(`transport ${sr.transport}`);
  await pr.evaluate(() => window.flowboard.addNode('rtc', 520, 420, 'via WebRTC'));
  await waitFor(pa, () => window.flowboard.nodes().some((n) => n.id === 'rtc'), null, 'A sees the WebRTC page\'s node');
  await pa.evaluate(() => window.flowboard.moveNode('ingest', 80, 120));
  await waitFor(pr, () => window.flowboard.nodes().find((n) => n.id === 'ingest')?.y === 120, null, 'the WebRTC page sees A\'s move');
  // Messages larger than one SCTP chunk (the browser fragments, the edge reassembles).
  const bigDot = await pr.evaluate(() => window.flowboard.board.publish('big', 'y'.repeat(40000)));
  if (!/^[0-9a-f]+:\d+$/.test(bigDot)) throw new Error(`a 40 KB publish over WebRTC: ${bigDot}`);
  // First flight: 3,000 ops (~1.4 MB) replayed to fresh data channels.
  const burst = `${activity}/burst`;
  const pad = 'x'.repeat(400);
  for (let i = 0; i < 3000; i += 100) {
    await Promise.all([...Array(100)].map((_, j) => fetch(`${cfg.b}/v1/channels/${encodeURIComponent(burst)}/events`, {
      method: 'POST', headers: { authorization: `Bearer ${cfg.token}`, 'content-type': 'application/json' },
      body: JSON.stringify({ event: 'x', data: { i: i + j, pad } }),
    }).then((r) => { if (!r.ok) throw new Error(`prefill: HTTP ${r.status}`); })));
  }
  figures.first_flight = [];
  for (let round = 0; round < 3; round++) {
    const r = await pr.evaluate(async ([base, token, ch]) => {
      const { Outpost } = await import('/sdk/outpost.js');
      const c = new Outpost({ endpoints: [base], token, transports: ['webrtc'], peerToPeer: false });
      await new Promise((r) => c.on('connect', r));
      const chan = c.channel(ch);
      let got = 0, last = performance.now(), gap = 0;
      const t = performance.now();
      chan.on('op', () => { got++; const n = performance.now(); gap = Math.max(gap, n - last); last = n; });
      await chan.subscribe();
      const out = { transport: c.status.transport, got, ms: Math.round(performance.now() - t), max_gap_ms: Math.round(gap) };
      c.close();
      return out;
    }, [cfg.b, cfg.token, burst]);
    figures.first_flight.push(r);
    if (r.transport !== 'webrtc' || r.got !== 3000) throw new Error(`first flight: ${JSON.stringify(r)}`);
    // A stall is an SCTP retransmit timeout: 1 s or more without a message.
    if (r.max_gap_ms >= 900) throw new Error(`a fresh data channel stalled: ${JSON.stringify(r)}`);
  }

  // 4. WebSocket blocked: SSE + REST.
  step('WebSocket blocked: SSE fallback');
  const ps = await open('sam@B-sse', [cfg.b, cfg.cloud], { blockWs: true });
  const ss = await status(ps);
  if (ss.transport !== 'sse') throw new Error(`with WebSocket blocked the transport is ${ss.transport}`);
  await waitFor(ps, () => window.flowboard.nodes().some((n) => n.id === 'rtc'), null, 'the SSE page loads the board');
  await ps.evaluate(() => window.flowboard.addNode('sse', 880, 90, 'via SSE'));
  await waitFor(pa, () => window.flowboard.nodes().some((n) => n.id === 'sse'), null, 'A sees the SSE page\'s node');
  await pa.evaluate(() => window.flowboard.moveNode('enrich', 500, 60));
  await waitFor(ps, () => window.flowboard.nodes().find((n) => n.id === 'enrich')?.y === 60, null, 'the SSE page sees A\'s move');
  await ps.close();
  await pr.close();
  // Peers that went away are cleaned up on the edge.
  t0 = Date.now();
  for (;;) {
    const m = await (await fetch(`${cfg.b}/metrics`)).text();
    const peers = Number((m.match(/^outpost_rtc_peers (\S+)/m) || [])[1] || 0);
    if (peers === 0) break;
    if (Date.now() - t0 > 45000) throw new Error(`edge B still holds ${peers} WebRTC peers 45 s after the pages closed`);
    await new Promise((r) => setTimeout(r, 200));
  }
  figures.rtc_cleanup_ms = Date.now() - t0;

  // 5. Activity from the sample publisher.
  step('job activity from scripts/demo-jobs');
  execFileSync(cfg.demoJobs, [cfg.cloud, cfg.token, '4', activity, '20'], { stdio: ['ignore', 'ignore', 'inherit'] });
  await waitFor(pa, () => document.querySelectorAll('#activity li').length >= 20, null, 'A shows the job events');
  await waitFor(pb, () => document.querySelector('#activity li.failed') !== null, null, 'B shows a failed job');

  // 6. Screenshots.
  step('screenshots');
  await pa.mouse.move(640, 360, { steps: 3 });
  await pb.mouse.move(350, 420, { steps: 3 });
  await pa.waitForTimeout(300);
  await pb.waitForTimeout(300);
  for (const [p, file] of [[pb, 'demo-flowboard.png'], [pa, 'demo-flowboard-edge-a.png']]) {
    const png = await p.screenshot({ path: `${cfg.docs}/${file}` });
    // Not blank: many distinct colours in a downscaled copy of the image.
    const colours = await p.evaluate(async (b64) => {
      const img = new Image();
      img.src = `data:image/png;base64,${b64}`;
      await img.decode();
      const c = document.createElement('canvas');
      c.width = 160; c.height = 95;
      const g = c.getContext('2d');
      g.drawImage(img, 0, 0, c.width, c.height);
      const d = g.getImageData(0, 0, c.width, c.height).data;
      const s = new Set();
      for (let i = 0; i < d.length; i += 4) s.add((d[i] >> 3) << 10 | (d[i + 1] >> 3) << 5 | (d[i + 2] >> 3));
      return s.size;
    }, png.toString('base64'));
    figures[`${file}_colours`] = colours;
    if (colours < 40) throw new Error(`${file} looks blank (${colours} colours)`);
  }

  // 6b. Edge B frozen (SIGSTOP: its sockets stay open, nothing answers): a page on it
  //     notices by its ping (every 400 ms, 400 ms to answer) and delivers again from
  //     edge A. Five runs; the page's own figure is the time from the freeze until it
  //     is online elsewhere.
  step('edge B frozen (SIGSTOP), five times');
  const frozen = [];
  for (let i = 0; i < 5; i++) {
    const pf = await open(`fred-${i}@B`, [cfg.b, cfg.a], { ping: 400 });
    if ((await status(pf)).endpoint !== cfg.b) throw new Error('the page did not start on edge B');
    const t0 = Date.now();
    process.kill(Number(cfg.pidB), 'SIGSTOP');
    try {
      await waitFor(pf, (a) => window.flowboard.client.status.online && window.flowboard.client.status.endpoint === a, cfg.a, `run ${i}: the page leaves frozen edge B`, 10000);
      frozen.push(Date.now() - t0);
    } finally {
      process.kill(Number(cfg.pidB), 'SIGCONT');
    }
    // Delivering again: a write from the page is acknowledged by edge A.
    await pf.evaluate((i) => window.flowboard.addNode(`frozen-${i}`, 60 + i * 90, 700, `after freeze ${i}`), i);
    await pf.close();
  }
  frozen.sort((a, b) => a - b);
  figures.frozen_failover_ms = frozen;
  // Bound: ping interval + timeout (800 ms) + reconnecting, with a wide margin.
  if (frozen[frozen.length - 1] > 3000) throw new Error(`a frozen edge took ${frozen.join(', ')} ms to leave`);

  // 7. Kill edge A while page A adds nodes: it fails over, and no edit is lost.
  step('edge A killed while editing');
  const N = 60;
  const editing = pa.evaluate(async (N) => {
    const acks = [];
    for (let i = 0; i < N; i++) {
      acks.push(window.flowboard.addNode(`k${i}`, 40 + (i % 12) * 95, 460 + Math.floor(i / 12) * 50, `edit ${i}`));
      await new Promise((r) => setTimeout(r, 25));
    }
    await Promise.all(acks);
    return window.flowboard.client.status;
  }, N);
  await pa.waitForFunction(() => window.flowboard.nodes().filter((n) => n.id.startsWith('k')).length >= 15, null, { timeout: 10000 });
  const killedAt = Date.now();
  process.kill(Number(cfg.pidA), 'SIGKILL');
  await waitFor(pa, (a) => window.flowboard.client.status.online && window.flowboard.client.status.endpoint !== a, cfg.a, 'page A fails over', 10000);
  figures.failover_ms = Date.now() - killedAt;
  const after = await editing;
  figures.after_failover = { endpoint: after.endpoint, transport: after.transport, queued: after.queued };
  if (after.endpoint === cfg.a) throw new Error('still on the dead edge');
  figures.resent_after_failover = await pa.evaluate(() => window.flowboard.board.resent);
  await waitFor(pb, (N) => window.flowboard.nodes().filter((n) => n.id.startsWith('k')).length === N, N, 'B has every edit page A made');
  const res = await fetch(`${cfg.cloud}/v1/channels/${encodeURIComponent(board)}/state?token=${cfg.token}`);
  const keys = (await res.json()).keys.map((k) => k.key).filter((k) => k.startsWith('node:k'));
  if (keys.length !== N) throw new Error(`the cloud has ${keys.length} of ${N} edits`);

  // 8. Kill the cloud: page B's edge keeps serving, and the page says so.
  step('cloud killed: local only');
  await waitFor(pb, () => document.getElementById('sync')?.textContent === 'online', null, 'page B online before');
  const cloudKilledAt = Date.now();
  process.kill(Number(cfg.pidCloud), 'SIGKILL');
  await waitFor(pb, () => document.getElementById('sync')?.textContent.startsWith('local only'), null, 'page B says local only', 20000);
  figures.local_only_shown_ms = Date.now() - cloudKilledAt;
  // Edits still work there (acknowledged by edge B).
  await pb.evaluate(() => window.flowboard.addNode('offline', 900, 60, 'made while the cloud was down'));
  await pb.screenshot({ path: `${cfg.docs}/demo-local-only.png` });
  console.log(JSON.stringify({ ok: true, ...figures }));
} catch (e) {
  console.log(JSON.stringify({ ok: false, error: String(e.stack || e), ...figures }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
