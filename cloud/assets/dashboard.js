"use strict";
const hist = new Map(); // edge -> {ops: [], lag: [], lastIn, lastT}
const $ = (id) => document.getElementById(id);
// Everything shown comes from the fleet (edge names, regions, state keys written by any
// client with the `state` right, timeline details): always HTML-escaped before it is
// put into markup, and the page's Content-Security-Policy refuses inline script.
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
// The operator key is traded once for a session cookie (HttpOnly, SameSite=Strict):
// the page keeps no key and puts none in URLs. `#key=` (for links from scripts) is
// read, traded and removed from the address bar at once.
async function login(key) {
  const r = await fetch("/v1/admin/session", { method: "POST", headers: { Authorization: `Bearer ${key}` } });
  return r.ok;
}
async function signedIn() {
  const m = location.hash.match(/key=([^&]+)/);
  if (m) {
    history.replaceState(null, "", location.pathname);
    if (await login(decodeURIComponent(m[1]))) return true;
  }
  return (await fetch("/v1/admin/edges")).ok;
}
function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 120 ? s + "s ago" : s < 7200 ? Math.round(s / 60) + "m ago" : Math.round(s / 3600) + "h ago";
}
function spark(canvas, values, color) {
  const ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#273241"; ctx.beginPath(); ctx.moveTo(0, h - 1); ctx.lineTo(w, h - 1); ctx.stroke();
  if (values.length < 2) return;
  const max = Math.max(1, ...values);
  ctx.strokeStyle = color; ctx.lineWidth = 1.5; ctx.beginPath();
  values.forEach((v, i) => {
    const x = (i / (60 - 1)) * w, y = h - 2 - (v / max) * (h - 4);
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
}
function render(s) {
  $("status").textContent = `${s.edges.filter(e => e.connected).length} of ${s.edges.length} edges connected · updated ${new Date(s.time_ms).toLocaleTimeString()}`;
  const body = $("edges").tBodies[0];
  body.innerHTML = "";
  for (const e of s.edges) {
    let h = hist.get(e.replica);
    if (!h) { h = { ops: [], lag: [], lastIn: e.ops_in, lastT: s.time_ms }; hist.set(e.replica, h); }
    const dt = Math.max(1, s.time_ms - h.lastT) / 1000;
    h.ops.push(Math.max(0, (e.ops_in - h.lastIn) / dt)); h.lag.push(e.lag_ops);
    h.lastIn = e.ops_in; h.lastT = s.time_ms;
    if (h.ops.length > 60) { h.ops.shift(); h.lag.shift(); }
    const tr = document.createElement("tr");
    tr.dataset.edge = e.name;
    tr.innerHTML = `<td><b>${esc(e.name)}</b><br><small class="dim">${esc(e.replica)}</small></td>
      <td><span class="badge ${e.connected ? "connected" : "disconnected"}">${e.connected ? "connected" : "disconnected"}</span></td>
      <td>${esc(e.region)}</td>${e.connected
        ? `<td class="num">${esc(e.rtt_ms ?? "–")}</td><td class="num">${esc(e.lag_ops)}</td><td class="num">${esc(e.outbox_ops)}</td><td class="num">${esc(e.clients)}</td>`
        : `<td class="num" title="no link">–</td><td class="num" title="no link">–</td><td class="num" title="last reported">${esc(e.outbox_ops)}</td><td class="num" title="last reported by its link; the edge keeps serving its clients">${esc(e.clients)}?</td>`}
      <td><canvas width="160" height="28" class="ops"></canvas></td><td><canvas width="120" height="28" class="lag"></canvas></td>
      <td class="since">${e.connected
        ? `connected ${ago(e.connected_since)}`
        : `disconnected ${ago(e.disconnected_since ?? e.last_seen)}`}${e.coordinator ? `<br><small class="dim">via ${esc(e.coordinator)}</small>` : ""}</td>`;
    body.appendChild(tr);
    spark(tr.querySelector("canvas.ops"), h.ops, "#58a6ff");
    spark(tr.querySelector("canvas.lag"), h.lag, "#d29922");
  }
  if (!s.edges.length) body.innerHTML = `<tr><td colspan="10" class="empty">no edge has connected yet</td></tr>`;
  const tl = $("timeline");
  tl.innerHTML = s.events.length ? "" : `<li class="empty">nothing yet</li>`;
  for (const ev of s.events.slice().reverse()) {
    const li = document.createElement("li");
    li.innerHTML = `<span class="t">${ago(ev.time_ms)}</span><span class="kind ${esc(ev.kind)}">${esc(ev.kind)}</span> <b>${esc(ev.edge)}</b> — ${esc(ev.detail)}`;
    tl.appendChild(li);
  }
  const cf = $("conflicts");
  cf.innerHTML = s.conflicts.length ? "" : `<li class="empty">no concurrent writes recorded</li>`;
  for (const c of s.conflicts.slice().reverse()) {
    const w = (x) => `${esc(x.origin_edge ?? x.origin)} @ ${esc(x.hlc)}${x.deleted ? " (delete)" : ""}`;
    const li = document.createElement("li");
    li.className = "conflict";
    li.innerHTML = `<span class="t">${ago(c.time_ms)}</span><b>${esc(c.channel)}</b> · <code>${esc(c.key)}</code><br>
      <span class="won">won</span> ${w(c.winner)} <small>${esc(c.winner.dot)}</small><br>
      ${c.losers.map(l => `<span class="lost">lost</span> ${w(l)} <small>${esc(l.dot)}</small>`).join("<br>")}`;
    cf.appendChild(li);
  }
}
function start() {
  $("login").hidden = true; $("app").hidden = false;
  const es = new EventSource("/v1/admin/stream");
  es.addEventListener("fleet", (m) => render(JSON.parse(m.data)));
  es.onerror = () => { $("status").textContent = "reconnecting…"; };
}
function askKey(why) { $("login").hidden = false; $("status").textContent = why; }
signedIn().then((ok) => (ok ? start() : askKey("operator key needed")), () => askKey("cannot reach the cloud"));
$("go").onclick = async () => {
  const key = $("key").value;
  $("key").value = "";
  if (await login(key)) start(); else askKey("that key was refused");
};
