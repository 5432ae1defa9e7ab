// Outpost browser SDK: one ES module, no dependencies, no framework.
//
//   import { Outpost } from './outpost.js';
//   const op = new Outpost({ endpoints: ['https://edge-a.example', 'https://edge-b.example'],
//                            token: () => fetchToken() });
//   const board = op.channel('project:42/board');
//   board.on('op', (m) => ...);              // durable ops (events, set, delete), deduplicated
//   board.on('ephemeral', (m) => ...);       // cursors and other fire-and-forget messages
//   await board.publish('ingest.job.created', { job: 7 });
//   await board.set('title', 'Q3 plan');     // state; context = what this client has seen
//   board.broadcast('cursor', { x, y });     // peer-to-peer when possible, else through the edge
//   op.onStatus((s) => badge(s.endpoint, s.transport, s.online, s.queued));
//
// Protocol: docs/PROTOCOL.md. Transports, tried in order per endpoint: 'websocket',
// 'webrtc' (data channels to the edge, POST /v1/rtc/offer), 'sse' (EventSource + REST,
// the fallback where WebSocket is blocked). Every connection resumes each channel
// from its last token, drops duplicates by dot, and resends writes that were not
// acknowledged (events carry an idempotency key, so a resend is not a second event).

/** @typedef {{state: 'connecting'|'online'|'offline'|'closed', online: boolean, endpoint: string|null, transport: string|null, queued: number, client: string|null, replica: string|null, attempt: number, error: string|null}} Status */

const DEFAULTS = {
  transports: ['websocket', 'sse'],
  backoff: { min: 100, max: 5000 },
  connectTimeout: 4000,
  // A silently dead endpoint (power loss, a blackholed route, a frozen process) is
  // noticed when a ping gets no answer: within pingInterval + pingTimeout (7 s).
  pingInterval: 5000,
  pingTimeout: 2000,
  presenceInterval: 5000,
  presenceTtl: 15000,
  dedupWindow: 10000,
  iceServers: [],
  peerToPeer: true,
};

/** Full-jitter exponential backoff: a delay in [0, min(max, min * 2^attempt)).
 * The first retry (attempt 0) of a connection that was working is immediate. */
export function backoffDelay(attempt, { min, max }, random = Math.random) {
  if (attempt <= 0) return 0;
  const cap = Math.min(max, min * 2 ** Math.min(attempt, 20));
  return Math.floor(random() * cap);
}

/** Remembers the last `size` dots seen, to drop at-least-once duplicates. */
export class DotWindow {
  constructor(size = 10000) {
    this.size = size;
    this.set = new Set();
    this.order = [];
  }
  /** True if `dot` is new (and remembers it). */
  add(dot) {
    if (this.set.has(dot)) return false;
    this.set.add(dot);
    this.order.push(dot);
    if (this.order.length > this.size) this.set.delete(this.order.shift());
    return true;
  }
  has(dot) {
    return this.set.has(dot);
  }
}

class Emitter {
  constructor() {
    this._handlers = new Map();
  }
  /** Registers a handler; returns a function that removes it. */
  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return () => this._handlers.get(event)?.delete(fn);
  }
  emit(event, arg) {
    for (const fn of this._handlers.get(event) || []) {
      try {
        fn(arg);
      } catch (e) {
        console.error(`outpost: ${event} handler threw`, e);
      }
    }
  }
}

export class OutpostError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
  }
}

const randomId = () =>
  Array.from(globalThis.crypto.getRandomValues(new Uint8Array(9)), (b) => b.toString(16).padStart(2, '0')).join('');

const httpBase = (endpoint) => endpoint.replace(/\/+$/, '');
const wsBase = (endpoint) => httpBase(endpoint).replace(/^http/, 'ws');

// ---------------------------------------------------------------------------
// Transports. Each turns a connection into JSON messages both ways:
//   open(): Promise (resolves once the server said `connected`, or for SSE once the
//   endpoint answered); send(msg); close(); and calls onMessage(msg) / onClose(info).

/** Parses a transport's JSON lines: settles `open()` on `connected` or an error,
 * keeps a data channel's `close` notice, passes everything else on. */
function handshake(t, resolve, reject) {
  const hs = {
    connected: false,
    line(text) {
      let msg;
      try {
        msg = JSON.parse(text);
      } catch {
        return;
      }
      if (!hs.connected && msg.type === 'connected') {
        hs.connected = true;
        resolve(msg);
      } else if (!hs.connected && msg.type === 'error') {
        reject(new OutpostError(msg.code, msg.message));
      }
      if (msg.type === 'close') {
        t.closeInfo = { code: msg.code, reason: msg.reason };
        return;
      }
      t.onMessage?.(msg);
    },
  };
  return hs;
}

class WebSocketTransport {
  constructor(endpoint, token, env) {
    this.name = 'websocket';
    this.env = env;
    this.url = `${wsBase(endpoint)}/v1/ws?token=${encodeURIComponent(token)}`;
  }
  open() {
    return new Promise((resolve, reject) => {
      const ws = new this.env.WebSocket(this.url);
      this.ws = ws;
      const hs = handshake(this, resolve, reject);
      ws.onmessage = (e) => hs.line(e.data);
      ws.onclose = (e) => {
        if (!hs.connected) reject(new OutpostError('transport', `WebSocket closed before it connected (${e.code})`));
        else this.onClose({ code: e.code, reason: e.reason });
      };
      ws.onerror = () => {};
    });
  }
  send(msg) {
    if (this.ws?.readyState === 1) this.ws.send(JSON.stringify(msg));
  }
  close() {
    try {
      this.ws?.close(1000);
    } catch {}
  }
}

class WebRtcTransport {
  constructor(endpoint, token, env, opts) {
    this.name = 'webrtc';
    this.env = env;
    this.opts = opts;
    this.url = `${httpBase(endpoint)}/v1/rtc/offer?token=${encodeURIComponent(token)}`;
    this.closed = false;
  }
  async open() {
    const pc = new this.env.RTCPeerConnection({ iceServers: this.opts.iceServers });
    this.pc = pc;
    const reliable = pc.createDataChannel('outpost', { ordered: true });
    const eph = pc.createDataChannel('outpost-ephemeral', { ordered: false, maxRetransmits: 0 });
    this.reliable = reliable;
    this.eph = eph;
    await pc.setLocalDescription(await pc.createOffer());
    await waitGathered(pc, 2000);
    const res = await this.env.fetch(this.url, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(pc.localDescription),
    });
    const body = await res.json();
    if (!res.ok) throw new OutpostError(body.error?.code || 'transport', body.error?.message || `HTTP ${res.status}`);
    await pc.setRemoteDescription(body);
    return new Promise((resolve, reject) => {
      const hs = handshake(this, resolve, reject);
      // One data-channel message may carry several protocol messages, one per line.
      const onData = (e) => {
        if (typeof e.data === 'string') for (const line of e.data.split('\n')) hs.line(line);
      };
      reliable.onmessage = onData;
      eph.onmessage = onData;
      const down = () => {
        if (this.closed) return;
        this.closed = true;
        if (!hs.connected) reject(new OutpostError('transport', 'data channel closed before it connected'));
        else this.onClose(this.closeInfo || { code: 1006, reason: 'data channel closed' });
        try {
          pc.close();
        } catch {}
      };
      reliable.onclose = down;
      pc.onconnectionstatechange = () => {
        if (['failed', 'closed', 'disconnected'].includes(pc.connectionState)) down();
      };
    });
  }
  send(msg) {
    const ch = msg.type === 'publish' && msg.ephemeral && this.eph.readyState === 'open' ? this.eph : this.reliable;
    if (ch.readyState === 'open') ch.send(JSON.stringify(msg));
  }
  close() {
    this.closed = true;
    try {
      this.pc?.close();
    } catch {}
  }
}

function waitGathered(pc, ms) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') {
        clearTimeout(t);
        resolve();
      }
    });
  });
}

// SSE + REST: one EventSource per subscribed channel, writes and reads over REST.
// The replies are shaped like the WebSocket's, so the client above it is the same.
// Presence joins and signals need a WebSocket or WebRTC connection; under SSE the
// SDK still sees others' presence and announces itself with ephemeral heartbeats.
class SseTransport {
  constructor(endpoint, token, env) {
    this.name = 'sse';
    this.env = env;
    this.base = httpBase(endpoint);
    this.token = token;
    this.sources = new Map();
    this.closed = false;
  }
  async open() {
    const res = await this.env.fetch(`${this.base}/readyz`);
    if (!res.ok) throw new OutpostError('transport', `HTTP ${res.status} from /readyz`);
    return { type: 'connected', client: null, replica: null };
  }
  url(path, q = {}) {
    const p = new URLSearchParams({ token: this.token, ...q });
    return `${this.base}${path}?${p}`;
  }
  async rest(id, method, path, body, q) {
    try {
      const res = await this.env.fetch(this.url(path, q), {
        method,
        headers: body ? { 'content-type': 'application/json' } : {},
        body: body ? JSON.stringify(body) : undefined,
      });
      const json = await res.json();
      if (!res.ok) return { type: 'error', id, code: json.error?.code || 'internal', message: json.error?.message || `HTTP ${res.status}` };
      return json;
    } catch (e) {
      this.fail(`REST ${method} ${path}: ${e.message}`);
      return null;
    }
  }
  fail(reason) {
    if (this.closed) return;
    this.close();
    this.onClose({ code: 1006, reason });
  }
  chanPath(ch) {
    return `/v1/channels/${encodeURIComponent(ch)}`;
  }
  async send(msg) {
    const { id } = msg;
    const reply = (m) => m && !this.closed && this.onMessage(m);
    switch (msg.type) {
      case 'subscribe': {
        this.sources.get(msg.channel)?.close();
        const q = msg.since ? { since: msg.since } : {};
        const es = new this.env.EventSource(this.url(`${this.chanPath(msg.channel)}/events`, q));
        this.sources.set(msg.channel, es);
        const fwd = (e) => {
          try {
            const m = JSON.parse(e.data);
            if (m.type === 'subscribed') m.id = id;
            reply(m);
          } catch {}
        };
        for (const t of ['op', 'subscribed', 'ephemeral', 'presence', 'uplink']) es.addEventListener(t, fwd);
        // The token expired: the stream ends, and EventSource would come back with the
        // same URL and be refused. Reconnect (the token function is asked again).
        es.addEventListener('token_expired', () => this.fail('token expired'));
        // EventSource reconnects by itself with Last-Event-ID; a dead endpoint shows
        // as an error while not open: fail over instead of retrying here forever.
        es.onerror = () => {
          if (es.readyState !== 1) this.fail('event stream lost');
        };
        return;
      }
      case 'unsubscribe':
        this.sources.get(msg.channel)?.close();
        this.sources.delete(msg.channel);
        return reply({ type: 'unsubscribed', id, channel: msg.channel });
      case 'publish': {
        const r = await this.rest(id, 'POST', `${this.chanPath(msg.channel)}/events`, {
          event: msg.event,
          data: msg.data,
          key: msg.key,
          ephemeral: !!msg.ephemeral,
        });
        return reply(r && { ...r, id });
      }
      case 'set': {
        const r = await this.rest(id, 'PUT', `${this.chanPath(msg.channel)}/state/${encodeURIComponent(msg.key)}`, {
          value: msg.value,
          context: msg.context,
        });
        return reply(r && (r.type === 'error' ? r : { ...r.ack, type: 'ack', id }));
      }
      case 'delete': {
        const q = msg.context ? { context: msg.context } : {};
        const r = await this.rest(id, 'DELETE', `${this.chanPath(msg.channel)}/state/${encodeURIComponent(msg.key)}`, null, q);
        return reply(r && (r.type === 'error' ? r : { ...(r.ack || r), type: 'ack', id }));
      }
      case 'get': {
        const q = msg.siblings ? { siblings: 'true' } : {};
        const r = await this.rest(id, 'GET', `${this.chanPath(msg.channel)}/state/${encodeURIComponent(msg.key)}`, null, q);
        return reply(r && { ...r, id });
      }
      case 'members': {
        const r = await this.rest(id, 'GET', `${this.chanPath(msg.channel)}/presence`);
        return reply(r && { ...r, id });
      }
      case 'ping': {
        // Liveness of the endpoint itself (the event streams may be idle).
        try {
          const res = await this.env.fetch(`${this.base}/healthz`);
          if (!res.ok) throw new Error(`HTTP ${res.status}`);
        } catch (e) {
          return this.fail(`ping: ${e.message}`);
        }
        return reply({ type: 'pong', id });
      }
      default:
        return reply({ type: 'error', id, code: 'bad_state', message: `${msg.type} needs a WebSocket or WebRTC connection` });
    }
  }
  close() {
    this.closed = true;
    for (const es of this.sources.values()) es.close();
    this.sources.clear();
  }
}

const TRANSPORTS = { websocket: WebSocketTransport, webrtc: WebRtcTransport, sse: SseTransport };

// ---------------------------------------------------------------------------

export class Outpost extends Emitter {
  /**
   * @param {object} opts
   * @param {string[]} opts.endpoints  http(s) base URLs, in order of preference
   * @param {string|(() => string|Promise<string>)} opts.token  a JWT, or a function returning one
   * @param {string[]} [opts.transports]  e.g. ['webrtc', 'websocket', 'sse']
   * @param {{min:number,max:number}} [opts.backoff]  milliseconds
   * @param {RTCIceServer[]} [opts.iceServers]  for WebRTC (to the edge and between peers)
   * @param {boolean} [opts.peerToPeer]  open browser-to-browser channels for broadcasts
   * @param {object} [opts.env]  injected globals (WebSocket, fetch, EventSource, RTCPeerConnection, random)
   */
  constructor(opts) {
    super();
    if (!opts?.endpoints?.length) throw new Error('Outpost: endpoints is required');
    this.opts = { ...DEFAULTS, ...opts, backoff: { ...DEFAULTS.backoff, ...opts.backoff } };
    this.env = {
      WebSocket: globalThis.WebSocket,
      fetch: globalThis.fetch?.bind(globalThis),
      EventSource: globalThis.EventSource,
      RTCPeerConnection: globalThis.RTCPeerConnection,
      random: Math.random,
      transports: TRANSPORTS,
      ...opts.env,
    };
    this.channels = new Map();
    this.patterns = new Map(); // pattern -> PatternSubscription
    this.pending = new Map(); // id -> {resolve, reject, write}
    this.outbox = []; // writes not yet acknowledged, in order: {msg, resolve, reject, keyed}
    this.nextId = 1;
    this.transport = null;
    this.endpointIndex = 0;
    this.attempt = 0;
    this.closed = false;
    // uplink: whether the endpoint syncs with the rest of the fleet — 'connected',
    // 'disconnected' (an edge without its cloud: writes are kept and sync later, "local
    // only"), 'none' (the endpoint is the cloud), or null (not known yet).
    this.status = { state: 'connecting', online: false, endpoint: null, transport: null, queued: 0, client: null, replica: null, uplink: null, attempt: 0, error: null };
    this._run();
  }

  /** Calls fn with the connection status now and on every change; returns an unsubscribe. */
  onStatus(fn) {
    fn(this.status);
    return this.on('status', fn);
  }

  _setStatus(patch) {
    this.status = { ...this.status, ...patch, queued: this.queued() };
    this.emit('status', this.status);
  }

  /** Writes not yet acknowledged (queued offline or in flight). */
  queued() {
    let n = this.outbox.length;
    for (const ch of this.channels.values()) n += ch.keyed.size;
    return n;
  }

  /** The channel object for `name` (one per name). */
  channel(name) {
    if (!this.channels.has(name)) this.channels.set(name, new Channel(this, name));
    return this.channels.get(name);
  }

  /**
   * A namespace subscription (for services and dashboards; served by the cloud and its
   * coordinators, which hold every channel): the ops of every channel `pattern`
   * matches (`meeting:*\/commands`; `*` is one or more characters other than `/`),
   * channels created later included. One object per pattern; call `subscribe()`.
   */
  pattern(pattern) {
    if (!this.patterns.has(pattern)) this.patterns.set(pattern, new PatternSubscription(this, pattern));
    return this.patterns.get(pattern);
  }

  close() {
    this.closed = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.pingTimer);
    for (const ch of this.channels.values()) ch._stopPeers();
    this.transport?.close();
    this._setStatus({ state: 'closed', online: false });
  }

  async _token() {
    const t = this.opts.token;
    return typeof t === 'function' ? await t() : t;
  }

  // The connection loop: endpoints in order, transports in order per endpoint;
  // full-jitter backoff after a whole round failed; immediate retry after a drop.
  async _run() {
    while (!this.closed) {
      const endpoints = this.opts.endpoints;
      let lastError = null;
      for (let i = 0; i < endpoints.length && !this.closed; i++) {
        const endpoint = endpoints[(this.endpointIndex + i) % endpoints.length];
        for (const name of this.opts.transports) {
          if (this.closed) return;
          const T = this.env.transports[name];
          if (!T) continue;
          this._setStatus({ state: 'connecting', online: false, endpoint, transport: name, attempt: this.attempt });
          let t;
          try {
            t = new T(endpoint, await this._token(), this.env, this.opts);
            const hello = await withTimeout(t.open(), this.opts.connectTimeout, `${name} to ${endpoint}`);
            // close() while this connection was opening: do not bring it online.
            if (this.closed) {
              t.close();
              return;
            }
            this.endpointIndex = (this.endpointIndex + i) % endpoints.length;
            await this._online(t, hello, endpoint);
            lastError = null;
            break;
          } catch (e) {
            t?.close();
            lastError = e;
            if (e.code === 'unauthorized' || e.code === 'token_expired') {
              // Only a fresh token helps; a token function is asked again next round.
              break;
            }
          }
        }
        if (this.transport) break;
      }
      if (this.transport) {
        const info = await this.dropped;
        if (this.closed) return;
        this.attempt = 0;
        // Going away (draining, shutting down) or silently dead: start with the next
        // endpoint.
        if (info?.code === 4101 || info?.dead) this.endpointIndex = (this.endpointIndex + 1) % this.opts.endpoints.length;
        continue;
      }
      this.attempt += 1;
      this._setStatus({ state: 'offline', online: false, error: lastError?.message || 'no endpoint reachable', attempt: this.attempt });
      await new Promise((r) => (this.retryTimer = setTimeout(r, backoffDelay(this.attempt, this.opts.backoff, this.env.random))));
    }
  }

  async _online(t, hello, endpoint) {
    this.transport = t;
    let onDrop;
    this.dropped = new Promise((r) => (onDrop = r));
    t.onMessage = (m) => this._onMessage(m);
    t.onClose = (info) => {
      if (this.transport !== t) return;
      this.transport = null;
      clearInterval(this.pingTimer);
      // Requests in flight fail over: reads are retried, writes stay in the outbox.
      for (const [id, p] of this.pending) {
        this.pending.delete(id);
        if (p.write) p.write.sent = false;
        else p.retry?.();
      }
      for (const ch of this.channels.values()) ch._offline();
      this._setStatus({ state: 'offline', online: false, error: info?.reason || null });
      this.emit('disconnect', info);
      onDrop(info);
    };
    this._setStatus({ state: 'online', online: true, endpoint, transport: t.name, client: hello.client ?? null, replica: hello.replica ?? null, uplink: hello.uplink ?? null, error: null });
    this.pingTimer = setInterval(() => {
      withTimeout(this._request({ type: 'ping' }, { retry: false }), this.opts.pingTimeout, 'ping').catch((e) => {
        // No answer: the endpoint is gone without a word. Drop it and fail over.
        if (e.code === 'timeout' && this.transport === t) {
          t.close();
          t.onClose({ code: 4000, dead: true, reason: `${endpoint} did not answer a ping within ${this.opts.pingTimeout} ms` });
        }
      });
    }, this.opts.pingInterval);
    // Resubscribe every channel from its token, then resend what was not acknowledged.
    const subs = [...this.channels.values(), ...this.patterns.values()].filter((c) => c.subscribed);
    await Promise.all(subs.map((c) => c._resubscribe().catch((e) => c.emit('error', e))));
    if (this.transport !== t) return;
    this._flush();
    for (const c of subs) c._online();
    this.emit('connect', this.status);
  }

  _send(msg) {
    if (!this.transport) return false;
    this.transport.send(msg);
    return true;
  }

  /** A request answered by a reply with the same id (waits while offline). */
  _request(msg, { retry = true } = {}) {
    return new Promise((resolve, reject) => {
      const go = () => {
        const id = this.nextId++;
        this.pending.set(id, { resolve, reject, retry: retry ? () => this._whenOnline(go) : () => reject(new OutpostError('offline', 'connection lost')) });
        if (!this._send({ ...msg, id })) this.pending.get(id).retry();
      };
      this._whenOnline(go);
    });
  }

  _whenOnline(fn) {
    if (this.transport && this.status.online) fn();
    else {
      const off = this.on('connect', () => {
        off();
        fn();
      });
    }
  }

  /** Queues a durable write; resolves with its dot once acknowledged. */
  _write(msg) {
    return new Promise((resolve, reject) => {
      this.outbox.push({ msg, resolve, reject, sent: false });
      this._setStatus({});
      this._flush();
    });
  }

  _flush() {
    if (!this.transport || !this.status.online) return;
    for (const w of this.outbox) {
      if (w.sent) continue;
      const id = this.nextId++;
      w.sent = true;
      this.pending.set(id, {
        write: w,
        resolve: (m) => {
          this.outbox.splice(this.outbox.indexOf(w), 1);
          w.resolve(m.dot);
          this._setStatus({});
        },
        reject: (e) => {
          this.outbox.splice(this.outbox.indexOf(w), 1);
          w.reject(e);
          this._setStatus({});
        },
      });
      this._send({ ...w.msg, id });
    }
    for (const ch of this.channels.values()) ch._flushKeyed();
  }

  _onMessage(m) {
    if (m.id != null && this.pending.has(m.id) && m.type !== 'op') {
      const p = this.pending.get(m.id);
      this.pending.delete(m.id);
      if (m.type === 'error') {
        // Storage refusals are transient: keep the write and retry on the next connection.
        if (p.write && (m.code === 'storage_unavailable' || m.code === 'rate_limited')) {
          p.write.sent = false;
          setTimeout(() => this._flush(), 500);
          return;
        }
        p.reject(new OutpostError(m.code, m.message));
      } else p.resolve(m);
      if (m.type !== 'subscribed') return;
    }
    if (m.type === 'error') return this.emit('error', new OutpostError(m.code, m.message));
    if (m.type === 'uplink') {
      if (m.state !== this.status.uplink) this._setStatus({ uplink: m.state });
      return;
    }
    const ch = m.channel && this.channels.get(m.channel);
    if (ch) return ch._onMessage(m);
    // A namespace subscription's channel (a channel name never holds '*').
    for (const p of this.patterns.values()) {
      if (p.subscribed && m.channel && p.matches(m.channel)) return p._onMessage(m);
    }
  }
}

/**
 * The ops of every channel a pattern matches. Events: `op` (each with its `channel`,
 * once per dot), `truncated` (a channel's history was compacted past your token:
 * re-read its state), `subscribed` (started or resumed: `{channels}` matched).
 * `tokens` maps each channel to your position in it: save `Object.fromEntries(p.tokens)`
 * and pass it to `subscribe({since})` to resume after a reload; a channel missing from
 * it is replayed from the start of its retained history.
 */
export class PatternSubscription extends Emitter {
  constructor(client, pattern) {
    super();
    this.client = client;
    this.pattern = pattern;
    this.subscribed = false;
    this.tokens = new Map();
    this.dots = new DotWindow(client.opts.dedupWindow);
    const re = pattern
      .split('*')
      .map((part) => part.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'))
      .join('[^/]+');
    this.regex = new RegExp(`^${re}$`);
  }

  matches(channel) {
    return this.regex.test(channel);
  }

  async subscribe({ since } = {}) {
    for (const [ch, t] of Object.entries(since || {})) this.tokens.set(ch, t);
    this.subscribed = true;
    if (this.client.status.online) await this._resubscribe();
    return this;
  }

  async unsubscribe() {
    this.subscribed = false;
    if (this.client.status.online) await this.client._request({ type: 'unsubscribe_pattern', pattern: this.pattern }, { retry: false }).catch(() => {});
  }

  async _resubscribe() {
    const msg = { type: 'subscribe_pattern', pattern: this.pattern };
    if (this.tokens.size) msg.since = Object.fromEntries(this.tokens);
    const r = await this.client._request(msg, { retry: false });
    this.emit('subscribed', r);
  }

  _online() {}

  _onMessage(m) {
    if (m.type === 'op') {
      if (m.token) this.tokens.set(m.channel, m.token);
      if (this.dots.add(`${m.channel} ${m.dot}`)) this.emit('op', m);
    } else if (m.type === 'subscribed') {
      if (m.truncated) {
        if (m.token) this.tokens.set(m.channel, m.token);
        this.emit('truncated', m);
      }
    }
  }
}

function withTimeout(p, ms, what) {
  let t;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise((_, reject) => (t = setTimeout(() => reject(new OutpostError('timeout', `${what}: no answer in ${ms} ms`)), ms))),
  ]);
}

// ---------------------------------------------------------------------------

export class Channel extends Emitter {
  constructor(client, name) {
    super();
    this.client = client;
    this.name = name;
    this.subscribed = false;
    this.token = null; // resume token: everything delivered so far
    this.dots = new DotWindow(client.opts.dedupWindow);
    this.keyed = new Map(); // key -> {value, deleted, resolvers, inflight: dot|null|'sent'}
    this.state = new Map(); // key -> {value, hlc, origin}
    this.keyVersion = new Map(); // key -> ops seen for it (to notice others' writes)
    this.unconfirmed = new Map(); // key -> acknowledged write not yet seen come back
    this.resent = 0;
    this.members = new Map(); // client -> {client, subject, data, seen, via}
    this.presenceData = null;
    this.peers = new Map(); // client id -> PeerLink
  }

  /** Starts receiving: replays from the last token (none: the whole history). */
  async subscribe() {
    this.subscribed = true;
    if (this.client.status.online) await this._resubscribe();
    return this;
  }

  async unsubscribe() {
    this.subscribed = false;
    this._stopPeers();
    if (this.client.status.online) await this.client._request({ type: 'unsubscribe', channel: this.name }, { retry: false }).catch(() => {});
  }

  async _resubscribe() {
    const msg = { type: 'subscribe', channel: this.name };
    if (this.token) msg.since = this.token;
    const r = await this.client._request(msg, { retry: false });
    if (r.token) this.token = r.token;
    this.emit('subscribed', r);
    // A state write acknowledged by an endpoint that then died may not have left it:
    // if the replay from this endpoint did not bring it back and nobody wrote the key
    // since, write the same value again (its context now covers everything seen).
    for (const [key, u] of this.unconfirmed) {
      this.unconfirmed.delete(key);
      if (this.keyed.has(key) || (this.keyVersion.get(key) || 0) !== u.version) continue;
      this.resent += 1;
      this._keyed(key, { value: u.value, deleted: u.deleted }).catch(() => {});
    }
    if (r.truncated) await this.loadState();
    if (this.presenceData) await this._joinServer().catch(() => {});
  }

  _online() {
    this.emit('online');
    if (!this.client.closed) this._startPresence();
  }

  _offline() {
    for (const k of this.keyed.values()) if (k.inflight) k.inflight = null;
  }

  _onMessage(m) {
    switch (m.type) {
      case 'op': {
        if (m.token) this.token = m.token;
        if (!this.dots.add(m.dot)) return; // at-least-once duplicate
        if (m.op === 'set' || m.op === 'delete') {
          this.keyVersion.set(m.key, (this.keyVersion.get(m.key) || 0) + 1);
          if (this.unconfirmed.get(m.key)?.dot === m.dot) this.unconfirmed.delete(m.key);
          this._applyState(m);
        }
        for (const k of this.keyed.values()) if (k.inflight === m.dot) k.inflight = 'seen';
        this.emit('op', m);
        this._flushKeyed();
        return;
      }
      case 'subscribed':
        if (m.token) this.token = m.token;
        // Unasked (no id) and truncated: the server re-synced the channel from a
        // snapshot and the ops between our token and it no longer exist one by one —
        // re-read state (as after a resume from compacted history).
        if (m.id == null && m.truncated) {
          this.emit('truncated', m);
          this.loadState().catch(() => {});
        }
        return;
      case 'ephemeral':
        return this._onEphemeral(m.event, m.data, m.from, 'edge');
      case 'presence':
        return this._onServerPresence(m);
      case 'signal':
        return this._onSignal(m.from, m.data);
      default:
    }
  }

  // --- durable events ---------------------------------------------------------

  /** Publishes a durable event; resolves with its dot. Queued while offline. */
  publish(event, data = null, { key } = {}) {
    return this.client._write({ type: 'publish', channel: this.name, event, data, key: key || `sdk-${randomId()}` });
  }

  // --- state ------------------------------------------------------------------

  _applyState(m) {
    const cur = this.state.get(m.key);
    const hlc = parseHlc(m.hlc);
    const origin = m.dot.split(':')[0];
    if (cur && (cmpHlc(cur.hlc, hlc) > 0 || (cmpHlc(cur.hlc, hlc) === 0 && cur.origin > origin))) return;
    const entry = { value: m.op === 'set' ? m.value : undefined, deleted: m.op === 'delete', hlc, origin };
    this.state.set(m.key, entry);
    this.emit('state', { key: m.key, ...entry });
  }

  /** Loads every live key (REST, any transport) into `state` and emits `state` for each. */
  async loadState() {
    const c = this.client;
    // Ops that arrive while the read is under way are newer than what it returns.
    const versions = new Map(this.keyVersion);
    const base = httpBase(c.status.endpoint || c.opts.endpoints[0]);
    const res = await c.env.fetch(`${base}/v1/channels/${encodeURIComponent(this.name)}/state?token=${encodeURIComponent(await c._token())}`);
    if (!res.ok) throw new OutpostError('state', `HTTP ${res.status}`);
    const body = await res.json();
    for (const k of body.keys) {
      if ((this.keyVersion.get(k.key) || 0) !== (versions.get(k.key) || 0)) continue;
      const cur = this.state.get(k.key);
      if (cur && cur.hlc && k.hlc && cmpHlc(cur.hlc, parseHlc(k.hlc)) > 0) continue;
      const entry = { value: k.value, deleted: !!k.deleted, conflict: !!k.conflict, hlc: k.hlc ? parseHlc(k.hlc) : cur?.hlc || [0, 0], origin: cur?.origin || '' };
      this.state.set(k.key, entry);
      this.emit('state', { key: k.key, ...entry });
    }
    return this.state;
  }

  /** Reads a key from the server: {value, deleted, conflict, context, siblings?}. */
  get(key, { siblings = false } = {}) {
    return this.client._request({ type: 'get', channel: this.name, key, siblings });
  }

  /**
   * Sets a key. On a subscribed channel the write's context is everything this client
   * has seen, so it supersedes the values it saw; concurrent writes stay as siblings.
   * Writes to one key are coalesced: while one is in flight only the latest value
   * waits, and it is sent once the first has come back.
   */
  set(key, value, opts) {
    return this._keyed(key, { value, deleted: false, context: opts?.context });
  }

  delete(key, opts) {
    return this._keyed(key, { value: undefined, deleted: true, context: opts?.context });
  }

  _keyed(key, w) {
    return new Promise((resolve, reject) => {
      // One mutable entry per key: a write in flight and the latest value waiting
      // behind it (the callbacks of the one in flight compare by identity).
      let e = this.keyed.get(key);
      if (!e) {
        e = { resolvers: [], inflight: null };
        this.keyed.set(key, e);
      }
      Object.assign(e, w, { dirty: true });
      e.resolvers.push({ resolve, reject });
      this.client._setStatus({});
      this._flushKeyed();
    });
  }

  _flushKeyed() {
    const c = this.client;
    if (!c.transport || !c.status.online) return;
    for (const [key, w] of this.keyed) {
      // Wait for the previous write to this key to come back through the
      // subscription, so that the next one's context covers it (no self-siblings).
      if (!w.dirty || (w.inflight && w.inflight !== 'seen' && this.subscribed)) continue;
      w.dirty = false;
      w.inflight = 'sent';
      const resolvers = w.resolvers;
      w.resolvers = [];
      const msg = w.deleted ? { type: 'delete', channel: this.name, key } : { type: 'set', channel: this.name, key, value: w.value };
      const ctx = w.context || (this.subscribed ? this.token : null);
      if (ctx) msg.context = ctx;
      const sent = { value: w.value, deleted: w.deleted };
      c._request(msg, { retry: false }).then(
        (ack) => {
          if (this.subscribed && !this.dots.has(ack.dot)) {
            this.unconfirmed.set(key, { ...sent, dot: ack.dot, version: this.keyVersion.get(key) || 0 });
          }
          const cur = this.keyed.get(key);
          if (cur === w) {
            if (cur.dirty) cur.inflight = this.dots.has(ack.dot) ? 'seen' : ack.dot;
            else this.keyed.delete(key);
          }
          resolvers.forEach((r) => r.resolve(ack.dot));
          c._setStatus({});
          this._flushKeyed();
        },
        (e) => {
          const cur = this.keyed.get(key);
          if (e.code === 'offline' || e.code === 'storage_unavailable' || e.code === 'rate_limited') {
            // Not acknowledged: send again (the newest value) on the next connection.
            if (cur === w) {
              cur.dirty = true;
              cur.inflight = null;
              cur.resolvers = resolvers.concat(cur.resolvers);
            }
            if (e.code !== 'offline') setTimeout(() => this._flushKeyed(), 500);
            return;
          }
          if (cur === w && !cur.dirty) this.keyed.delete(key);
          resolvers.forEach((r) => r.reject(e));
          c._setStatus({});
        },
      );
    }
  }

  // --- ephemeral, presence, peers ----------------------------------------------

  /** Fire-and-forget to everyone in the channel (never stored). Peer-to-peer when a
   * direct channel is open to every other member, otherwise through the edge. */
  broadcast(event, data) {
    const others = [...this.members.keys()].filter((id) => id !== this._self());
    const links = others.map((id) => this.peers.get(id)).filter((l) => l?.open);
    if (others.length > 0 && links.length === others.length) {
      for (const l of links) l.send({ event, data });
      return 'p2p';
    }
    this.client._send({ type: 'publish', channel: this.name, event, data, ephemeral: true });
    return 'edge';
  }

  _self() {
    return this.client.status.client || this._anon || (this._anon = `anon-${randomId()}`);
  }

  _onEphemeral(event, data, from, via) {
    if (event === '$presence') return this._onHeartbeat(data, from);
    if (event === '$signal') {
      if (data?.to === this._self()) this._onSignal(data.from, data.data);
      return;
    }
    if (from && from === this._self()) return;
    this.emit('ephemeral', { event, data, from, via });
  }

  /** Joins presence with `data` (name, colour...): on this server's member list and,
   * across edges, by an ephemeral heartbeat every few seconds. Fires a `presence`
   * event for yourself at once, so a member alone sees themselves. */
  async join(data) {
    const first = !this.presenceData;
    this.presenceData = data;
    if (this.client.status.online) await this._joinServer().catch(() => {});
    this._startPresence();
    this.emit('presence', { action: first ? 'join' : 'update', client: this._self(), data, self: true, members: this.everyone() });
  }

  /** Everyone present: yourself first (marked `self: true`) once you joined, then the
   * other members. (`members`, the Map, holds the others only.) */
  everyone() {
    const me = this.presenceData ? [{ client: this._self(), subject: null, data: this.presenceData, seen: Date.now(), via: 'self', self: true }] : [];
    return [...me, ...this.members.values()];
  }

  async _joinServer() {
    if (this.client.transport?.name === 'sse') return;
    await this.client._request({ type: 'presence', channel: this.name, data: this.presenceData }, { retry: false });
    const r = await this.client._request({ type: 'members', channel: this.name }, { retry: false });
    for (const m of r.members || []) this._seen(m.client, m.subject, m.data, 'server');
  }

  _startPresence() {
    if (!this.presenceData || this.presenceTimer) return;
    const beat = () => {
      const c = this.client;
      if (c.status.online) c._send({ type: 'publish', channel: this.name, event: '$presence', data: { client: this._self(), data: this.presenceData }, ephemeral: true });
      const now = Date.now();
      for (const [id, m] of this.members) {
        if (m.via === 'heartbeat' && now - m.seen > c.opts.presenceTtl) this._left(id);
      }
    };
    beat();
    this.presenceTimer = setInterval(beat, this.client.opts.presenceInterval);
  }

  _onHeartbeat(d, from) {
    if (!d?.client || d.client === this._self()) return;
    if (d.leave) return this._left(d.client);
    const known = this.members.get(d.client);
    this._seen(d.client, from, d.data, known?.via === 'server' ? 'server' : 'heartbeat');
    // A newcomer learns about us at once instead of at our next heartbeat.
    if (!known && this.presenceData && this.client.status.online) {
      this.client._send({ type: 'publish', channel: this.name, event: '$presence', data: { client: this._self(), data: this.presenceData }, ephemeral: true });
    }
  }

  _onServerPresence(m) {
    if (m.client === this._self()) return;
    if (m.action === 'leave') this._left(m.client);
    else this._seen(m.client, m.subject, m.data, 'server');
  }

  _seen(id, subject, data, via) {
    if (id === this._self()) return;
    const isNew = !this.members.has(id);
    this.members.set(id, { client: id, subject, data, seen: Date.now(), via });
    this.emit('presence', { action: isNew ? 'join' : 'update', client: id, data, members: this.everyone() });
    if (isNew) this._maybeConnectPeer(id);
  }

  _left(id) {
    if (!this.members.delete(id)) return;
    this.peers.get(id)?.close();
    this.peers.delete(id);
    this.emit('presence', { action: 'leave', client: id, members: this.everyone() });
  }

  _maybeConnectPeer(id) {
    const c = this.client;
    if (!c.opts.peerToPeer || !c.env.RTCPeerConnection || !c.status.client) return;
    if (this.peers.has(id)) return;
    // The smaller client id offers; the other answers when the offer arrives.
    if (this._self() < id) this.peers.set(id, new PeerLink(this, id, true));
  }

  /** Sends a signal to a peer: the edge's relay when the peer is a member here,
   * otherwise an addressed ephemeral message (crosses edges through the cloud). */
  _signal(to, data) {
    const c = this.client;
    const m = this.members.get(to);
    if (m?.via === 'server' && c.transport?.name !== 'sse') {
      c._request({ type: 'signal', channel: this.name, to, data }, { retry: false }).catch(() => this._signalEphemeral(to, data));
    } else this._signalEphemeral(to, data);
  }

  _signalEphemeral(to, data) {
    this.client._send({ type: 'publish', channel: this.name, event: '$signal', data: { to, from: this._self(), data }, ephemeral: true });
  }

  _onSignal(from, data) {
    if (!from || !data || !this.client.opts.peerToPeer || !this.client.env.RTCPeerConnection) return;
    let link = this.peers.get(from);
    if (!link && data.kind === 'offer') {
      link = new PeerLink(this, from, false);
      this.peers.set(from, link);
    }
    link?.onSignal(data);
  }

  /** Peer-to-peer links that are open, by client id. */
  peerLinks() {
    return [...this.peers.values()].filter((l) => l.open).map((l) => l.id);
  }

  _stopPeers() {
    clearInterval(this.presenceTimer);
    this.presenceTimer = null;
    if (this.presenceData && this.client.status.online) {
      this.client._send({ type: 'publish', channel: this.name, event: '$presence', data: { client: this._self(), leave: true }, ephemeral: true });
    }
    for (const l of this.peers.values()) l.close();
    this.peers.clear();
  }
}

/** A browser-to-browser data channel (unordered, unreliable) for broadcasts. */
class PeerLink {
  constructor(channel, id, offerer) {
    this.channel = channel;
    this.id = id;
    this.open = false;
    const env = channel.client.env;
    this.pc = new env.RTCPeerConnection({ iceServers: channel.client.opts.iceServers });
    this.pc.onicecandidate = (e) => {
      if (e.candidate) channel._signal(id, { kind: 'candidate', candidate: e.candidate.toJSON() });
    };
    this.pc.onconnectionstatechange = () => {
      if (['failed', 'closed'].includes(this.pc.connectionState)) this.close();
    };
    const setup = (dc) => {
      this.dc = dc;
      dc.onopen = () => {
        this.open = true;
        channel.emit('peer', { client: id, open: true });
      };
      dc.onclose = () => this.close();
      dc.onmessage = (e) => {
        try {
          const m = JSON.parse(e.data);
          channel._onEphemeral(m.event, m.data, id, 'p2p');
        } catch {}
      };
    };
    if (offerer) {
      setup(this.pc.createDataChannel('outpost-p2p', { ordered: false, maxRetransmits: 0 }));
      this.pc
        .createOffer()
        .then((o) => this.pc.setLocalDescription(o))
        .then(() => channel._signal(id, { kind: 'offer', sdp: this.pc.localDescription.sdp }))
        .catch(() => this.close());
    } else {
      this.pc.ondatachannel = (e) => setup(e.channel);
    }
    // No direct path within 10 s: broadcasts keep going through the edge.
    this.timer = setTimeout(() => {
      if (!this.open) this.close();
    }, 10000);
  }

  /** Signals are handled one after another: a candidate may not overtake its offer. */
  onSignal(d) {
    this.chain = (this.chain || Promise.resolve()).then(() => this._handle(d));
  }

  async _handle(d) {
    try {
      if (d.kind === 'offer') {
        await this.pc.setRemoteDescription({ type: 'offer', sdp: d.sdp });
        await this.pc.setLocalDescription(await this.pc.createAnswer());
        this.channel._signal(this.id, { kind: 'answer', sdp: this.pc.localDescription.sdp });
      } else if (d.kind === 'answer') {
        await this.pc.setRemoteDescription({ type: 'answer', sdp: d.sdp });
      } else if (d.kind === 'candidate' && d.candidate) {
        await this.pc.addIceCandidate(d.candidate);
      }
    } catch {
      // A failed negotiation leaves broadcasts on the edge relay.
    }
  }

  send(m) {
    try {
      this.dc.send(JSON.stringify(m));
    } catch {
      this.open = false;
    }
  }

  close() {
    const was = this.open;
    this.open = false;
    clearTimeout(this.timer);
    try {
      this.pc.close();
    } catch {}
    if (this.channel.peers.get(this.id) === this) this.channel.peers.delete(this.id);
    if (was) this.channel.emit('peer', { client: this.id, open: false });
  }
}

function parseHlc(s) {
  const [ms, c] = String(s || '0.0').split('.');
  return [Number(ms) || 0, Number(c) || 0];
}

function cmpHlc(a, b) {
  return a[0] - b[0] || a[1] - b[1];
}
