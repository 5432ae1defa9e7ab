// The flowboard demo: shared nodes and links (channel state), live cursors
// (ephemeral, peer-to-peer when possible), presence, job activity (events), and a
// connection badge. Configuration comes from the URL fragment:
//   #token=JWT&endpoints=http://a,http://b&transports=websocket,sse&board=project:demo/board&name=Ada
//   (&ping=500: ping every 500 ms and leave an endpoint that does not answer in 500 ms)
import { Outpost } from '/sdk/outpost.js';

const params = new URLSearchParams(location.hash.slice(1));
const token = params.get('token') || sessionStorage.getItem('outpost-token');
if (token) sessionStorage.setItem('outpost-token', token);
const endpoints = (params.get('endpoints') || location.origin).split(',').filter(Boolean);
const transports = (params.get('transports') || 'websocket,sse').split(',');
const boardName = params.get('board') || 'project:demo/board';
const activityName = params.get('activity') || 'project:demo';
const palette = ['#ff6b6b', '#4fb3ff', '#3ecf8e', '#f5a524', '#c58cff', '#ff8fd0'];
const me = { name: params.get('name') || `guest-${Math.floor(Math.random() * 1000)}`, color: palette[Math.floor(Math.random() * palette.length)] };

const $ = (id) => document.getElementById(id);
$('board-name').textContent = boardName;
if (!token) {
  $('badge-text').textContent = 'no token: open the URL printed by scripts/start (#token=...)';
  throw new Error('no token');
}

// &ping=MS: ping interval and timeout (how soon a silently dead endpoint is left).
const ping = Number(params.get('ping')) || undefined;
const client = new Outpost({ endpoints, token, transports, ...(ping ? { pingInterval: ping, pingTimeout: ping } : {}) });
const board = client.channel(boardName);
const activity = client.channel(activityName);
const svgNS = 'http://www.w3.org/2000/svg';
const cursors = new Map();
const stats = { cursorsIn: { p2p: 0, edge: 0 }, cursorsOut: { p2p: 0, edge: 0 } };
let selected = null;
let connectFrom = null;
let connectMode = false;

// --- rendering -------------------------------------------------------------------
function nodes() {
  const out = [];
  for (const [k, v] of board.state) if (k.startsWith('node:') && !v.deleted && v.value) out.push({ id: k.slice(5), ...v.value });
  return out;
}
function render() {
  const ns = nodes();
  const byId = new Map(ns.map((n) => [n.id, n]));
  const g = $('nodes');
  g.replaceChildren();
  for (const n of ns) {
    const el = document.createElementNS(svgNS, 'g');
    el.setAttribute('class', `node${selected === n.id ? ' sel' : ''}`);
    el.setAttribute('transform', `translate(${n.x},${n.y})`);
    el.dataset.id = n.id;
    el.innerHTML = `<rect width="120" height="44"></rect><circle cx="14" cy="22" r="5" fill="${n.color || '#4fb3ff'}"></circle><text x="26" y="27"></text>`;
    el.querySelector('text').textContent = n.label || n.id;
    g.appendChild(el);
  }
  const lg = $('links');
  lg.replaceChildren();
  for (const [k, v] of board.state) {
    if (!k.startsWith('edge:') || v.deleted || !v.value) continue;
    const a = byId.get(v.value.from), b = byId.get(v.value.to);
    if (!a || !b) continue;
    const l = document.createElementNS(svgNS, 'line');
    l.setAttribute('class', 'link');
    l.setAttribute('x1', a.x + 120); l.setAttribute('y1', a.y + 22);
    l.setAttribute('x2', b.x); l.setAttribute('y2', b.y + 22);
    lg.appendChild(l);
  }
}
function renderPeople() {
  const ul = $('people');
  ul.replaceChildren();
  const add = (name, color, note) => {
    const li = document.createElement('li');
    li.innerHTML = `<span class="sw" style="background:${color}"></span><span></span><span class="muted"></span>`;
    li.children[1].textContent = name;
    li.children[2].textContent = note;
    ul.appendChild(li);
  };
  add(me.name, me.color, '(you)');
  const links = new Set(board.peerLinks());
  for (const m of board.members.values()) add(m.data?.name || m.client, m.data?.color || '#888', links.has(m.client) ? 'p2p' : m.via === 'server' ? 'same edge' : 'via cloud');
}
function renderBadge(s) {
  const host = s.endpoint ? new URL(s.endpoint).host : '-';
  // Online to an edge that lost its cloud: edits are kept and sync when it returns.
  const local = s.online && s.uplink === 'disconnected';
  $('badge').className = local ? 'local' : s.online ? 'online' : '';
  const what = local ? 'local only — changes will sync' : s.online ? 'online' : s.state;
  $('badge-text').innerHTML = `<b id="sync">${what}</b> ${host} · ${s.transport || '-'} · queued <b id="queued">${s.queued}</b>`;
  $('conn').textContent = `client ${s.client || '-'} · replica ${s.replica || '-'} · p2p links ${board.peerLinks().length}${s.error ? ' · ' + s.error : ''}`;
}
function renderCursors() {
  const g = $('cursors');
  g.replaceChildren();
  const now = Date.now();
  for (const [id, c] of cursors) {
    if (now - c.at > 5000) { cursors.delete(id); continue; }
    const el = document.createElementNS(svgNS, 'g');
    el.setAttribute('class', 'cursor');
    el.dataset.client = id;
    el.setAttribute('transform', `translate(${c.x},${c.y})`);
    el.innerHTML = `<path d="M0,0 L0,16 L4,12 L8,20 L11,19 L7,11 L13,11 z" fill="${c.color}"></path><rect x="14" y="12" rx="3" height="16" fill="${c.color}"></rect><text x="18" y="24"></text>`;
    el.querySelector('text').textContent = c.name;
    g.appendChild(el);
    el.querySelector('rect').setAttribute('width', el.querySelector('text').getComputedTextLength() + 8);
  }
}

// --- wiring ----------------------------------------------------------------------
client.onStatus(renderBadge);
board.on('state', render);
board.on('presence', () => { renderPeople(); renderBadge(client.status); });
board.on('peer', () => { renderPeople(); renderBadge(client.status); });
board.on('ephemeral', (m) => {
  if (m.event !== 'cursor' || !m.from) return;
  stats.cursorsIn[m.via] = (stats.cursorsIn[m.via] || 0) + 1;
  cursors.set(m.from, { ...m.data, at: Date.now() });
  renderCursors();
});
activity.on('op', (m) => {
  if (m.op !== 'event') return;
  const li = document.createElement('li');
  li.className = m.event.split('.').pop();
  li.textContent = `${m.event} ${JSON.stringify(m.data)}`;
  $('activity').prepend(li);
  while ($('activity').children.length > 40) $('activity').lastChild.remove();
});
client.on('connect', () => board.loadState().then(render).catch(() => {}));
board.subscribe();
activity.subscribe();
board.join(me);
setInterval(renderCursors, 1000);
// Leaving the page says goodbye (presence leave) instead of timing out.
addEventListener('pagehide', () => client.close());

// --- interaction -------------------------------------------------------------------
const svg = $('canvas');
const point = (e) => { const r = svg.getBoundingClientRect(); return { x: Math.round(e.clientX - r.left), y: Math.round(e.clientY - r.top) }; };
let drag = null;
let lastCursor = 0;
svg.addEventListener('pointerdown', (e) => {
  const g = e.target.closest('.node');
  if (!g) { selected = null; render(); return; }
  const id = g.dataset.id;
  if (connectMode) {
    if (!connectFrom) connectFrom = id;
    else if (connectFrom !== id) { addLink(connectFrom, id); connectFrom = null; }
    return;
  }
  selected = id;
  const n = nodes().find((x) => x.id === id);
  const p = point(e);
  drag = { id, dx: p.x - n.x, dy: p.y - n.y, n };
  svg.setPointerCapture(e.pointerId);
  render();
});
svg.addEventListener('pointermove', (e) => {
  const p = point(e);
  if (Date.now() - lastCursor > 33) { lastCursor = Date.now(); sendCursor(p.x, p.y); }
  if (!drag) return;
  moveNode(drag.id, p.x - drag.dx, p.y - drag.dy);
});
svg.addEventListener('pointerup', () => { drag = null; });
$('add').onclick = () => addNode();
$('del').onclick = () => selected && deleteNode(selected);
$('connect').onclick = () => { connectMode = !connectMode; connectFrom = null; $('connect').classList.toggle('on', connectMode); };

function sendCursor(x, y) {
  const via = board.broadcast('cursor', { x, y, name: me.name, color: me.color });
  stats.cursorsOut[via] += 1;
}
function addNode(id = Math.random().toString(36).slice(2, 8), x = 40 + Math.random() * 500, y = 40 + Math.random() * 380, label) {
  const v = { x: Math.round(x), y: Math.round(y), label: label || `step ${id}`, color: me.color };
  localSet(`node:${id}`, v);
  return board.set(`node:${id}`, v).then(() => id);
}
function moveNode(id, x, y) {
  const cur = board.state.get(`node:${id}`)?.value;
  if (!cur) return Promise.resolve();
  const v = { ...cur, x: Math.round(x), y: Math.round(y) };
  localSet(`node:${id}`, v);
  return board.set(`node:${id}`, v);
}
function deleteNode(id) {
  const waits = [board.delete(`node:${id}`)];
  for (const [k, v] of board.state) if (k.startsWith('edge:') && v.value && (v.value.from === id || v.value.to === id)) waits.push(board.delete(k));
  selected = null;
  localSet(`node:${id}`, undefined, true);
  return Promise.all(waits);
}
function addLink(from, to) {
  const k = `edge:${from}-${to}`;
  localSet(k, { from, to });
  return board.set(k, { from, to });
}
// Optimistic local update; the server's op (same or newer) replaces it when it arrives.
function localSet(key, value, deleted = false) {
  const cur = board.state.get(key);
  board.state.set(key, { value, deleted, hlc: cur?.hlc || [0, 0], origin: cur?.origin || '' });
  render();
}

// For tests and the console.
window.flowboard = { client, board, activity, me, stats, addNode, moveNode, deleteNode, addLink, sendCursor, nodes, cursors };
