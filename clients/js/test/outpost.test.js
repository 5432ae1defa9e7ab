// Unit tests of the SDK's connection logic against an in-memory server:
// reconnect and failover, resume by token, de-duplication by dot, the offline queue,
// coalesced state writes and the re-send of writes lost with a dead endpoint.
// Run: node --test clients/js/test/
import test from 'node:test';
import assert from 'node:assert/strict';
import { Outpost, backoffDelay, DotWindow } from '../outpost.js';

/** A fake of one Outpost server per endpoint, sharing one log (as replicas converge). */
class FakeNet {
  constructor() {
    this.down = new Set();
    this.conns = [];
    this.log = []; // every message clients sent: {endpoint, msg}
    this.ops = new Map(); // channel -> [op]
    this.seq = 0;
    this.autoAck = true;
  }
  transport() {
    const net = this;
    return class FakeTransport {
      constructor(endpoint) {
        this.name = 'websocket';
        this.endpoint = endpoint;
      }
      async open() {
        await Promise.resolve();
        if (net.down.has(this.endpoint)) throw Object.assign(new Error(`${this.endpoint} refused`), { code: 'transport' });
        net.conns.push(this);
        return { type: 'connected', client: `c-${net.conns.length}`, replica: this.endpoint };
      }
      send(msg) {
        net.log.push({ endpoint: this.endpoint, msg });
        queueMicrotask(() => net.handle(this, msg));
      }
      close() {
        this.closed = true;
      }
    };
  }
  /** Tokens are just the count of ops the subscriber has, as a string. */
  handle(t, msg) {
    if (t.closed || this.silent === t.endpoint) return;
    if (msg.type === 'subscribe_pattern') {
      const re = new RegExp(`^${msg.pattern.split('*').join('[^/]+')}$`);
      const chans = [...this.ops.keys()].filter((c) => re.test(c)).sort();
      for (const ch of chans) {
        const ops = this.ops.get(ch);
        const from = msg.since?.[ch] ? Number(msg.since[ch]) : 0;
        for (const op of ops.slice(Math.max(0, from - 1))) t.onMessage(op);
        t.onMessage({ type: 'subscribed', id: null, channel: ch, token: String(ops.length), replayed: ops.length - from, truncated: false });
      }
      t.onMessage({ type: 'subscribed_pattern', id: msg.id, pattern: msg.pattern, channels: chans.length });
    } else if (msg.type === 'subscribe') {
      const ops = this.ops.get(msg.channel) || [];
      const from = msg.since ? Number(msg.since) : 0;
      // Re-deliver the last op before the token too: at-least-once duplicates.
      for (const op of ops.slice(Math.max(0, from - 1))) t.onMessage(op);
      t.onMessage({ type: 'subscribed', id: msg.id, channel: msg.channel, token: String(ops.length), replayed: ops.length - from });
    } else if ((msg.type === 'publish' && !msg.ephemeral) || msg.type === 'set' || msg.type === 'delete') {
      if (!this.autoAck) return;
      const op = this.append(msg.channel, msg);
      t.onMessage({ type: 'ack', id: msg.id, dot: op.dot });
      this.broadcast(op);
    } else if (msg.id != null) {
      t.onMessage({ type: msg.type === 'ping' ? 'pong' : 'ack', id: msg.id });
    }
  }
  append(channel, msg) {
    const ops = this.ops.get(channel) || [];
    this.ops.set(channel, ops);
    const op = {
      type: 'op',
      channel,
      dot: `r:${++this.seq}`,
      hlc: `${1000 + this.seq}.0`,
      token: String(ops.length + 1),
      op: msg.type === 'publish' ? 'event' : msg.type,
      event: msg.event,
      data: msg.data,
      key: msg.key,
      value: msg.value,
    };
    ops.push(op);
    return op;
  }
  broadcast(op) {
    for (const c of this.conns) if (!c.closed) c.onMessage(op);
  }
  /** The server side drops every connection (an endpoint dies). */
  kill(endpoint) {
    this.down.add(endpoint);
    for (const c of this.conns) {
      if (c.endpoint === endpoint && !c.closed) {
        c.closed = true;
        c.onClose({ code: 1006, reason: 'gone' });
      }
    }
  }
}

const client = (net, extra = {}) =>
  new Outpost({
    endpoints: ['http://a', 'http://b', 'http://cloud'],
    token: 't',
    backoff: { min: 1, max: 5 },
    peerToPeer: false,
    env: { transports: { websocket: net.transport() }, random: () => 0.5 },
    ...extra,
  });

const until = async (pred, what, ms = 2000) => {
  const t0 = Date.now();
  while (!pred()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
};

test('backoff: immediate first retry, then full jitter under an exponential cap', () => {
  assert.equal(backoffDelay(0, { min: 100, max: 5000 }, () => 0.99), 0);
  assert.equal(backoffDelay(1, { min: 100, max: 5000 }, () => 0.5), 100);
  assert.equal(backoffDelay(3, { min: 100, max: 5000 }, () => 0.5), 400);
  assert.equal(backoffDelay(30, { min: 100, max: 5000 }, () => 0.999), 4995);
  for (let a = 1; a < 40; a++) {
    const d = backoffDelay(a, { min: 100, max: 5000 });
    assert.ok(d >= 0 && d < 5000, `attempt ${a}: ${d}`);
  }
});

test('DotWindow drops repeats and forgets the oldest past its size', () => {
  const w = new DotWindow(3);
  assert.ok(w.add('a:1'));
  assert.ok(!w.add('a:1'));
  w.add('a:2');
  w.add('a:3');
  w.add('a:4');
  assert.ok(!w.has('a:1') && w.has('a:4'));
  assert.ok(w.add('a:1'));
});

test('fails over to the next endpoint, resumes from the token, drops duplicates', async () => {
  const net = new FakeNet();
  const c = client(net);
  const ch = c.channel('project:1');
  const seen = [];
  ch.on('op', (m) => seen.push(m.data.n));
  await ch.subscribe();
  await until(() => c.status.online, 'online');
  assert.equal(c.status.endpoint, 'http://a');
  for (let n = 1; n <= 3; n++) net.broadcast(net.append('project:1', { type: 'publish', event: 'e', data: { n } }));
  await until(() => seen.length === 3, 'three ops');
  net.kill('http://a');
  await until(() => c.status.online && c.status.endpoint === 'http://b', 'failover to b');
  const resub = net.log.filter((l) => l.msg.type === 'subscribe' && l.endpoint === 'http://b');
  assert.equal(resub.length, 1);
  assert.equal(resub[0].msg.since, '3', 'resumes from the last token');
  net.broadcast(net.append('project:1', { type: 'publish', event: 'e', data: { n: 4 } }));
  await until(() => seen.length === 4, 'the fourth op');
  assert.deepEqual(seen, [1, 2, 3, 4], 'the re-delivered op 3 was dropped by its dot');
  c.close();
});

test('with every endpoint down it backs off and reconnects when one returns', async () => {
  const net = new FakeNet();
  ['http://a', 'http://b', 'http://cloud'].forEach((e) => net.down.add(e));
  const c = client(net);
  const states = [];
  c.onStatus((s) => states.push(s.state));
  await until(() => c.status.attempt >= 3, 'several rounds');
  assert.ok(states.includes('offline'));
  net.down.delete('http://cloud');
  await until(() => c.status.online, 'online');
  assert.equal(c.status.endpoint, 'http://cloud');
  c.close();
});

test('writes made offline are queued, counted, and sent once in order on connect', async () => {
  const net = new FakeNet();
  ['http://a', 'http://b', 'http://cloud'].forEach((e) => net.down.add(e));
  const c = client(net);
  const ch = c.channel('project:q');
  const acks = [ch.publish('one', 1), ch.publish('two', 2)];
  await until(() => c.status.queued === 2, 'two queued');
  net.down.delete('http://b');
  const dots = await Promise.all(acks);
  assert.equal(dots.length, 2);
  const sent = net.log.filter((l) => l.msg.type === 'publish').map((l) => l.msg.event);
  assert.deepEqual(sent, ['one', 'two']);
  assert.equal(c.status.queued, 0);
  c.close();
});

test('a write whose ack was lost is re-sent with the same idempotency key', async () => {
  const net = new FakeNet();
  const c = client(net);
  await until(() => c.status.online, 'online');
  net.autoAck = false;
  const ch = c.channel('project:k');
  const p = ch.publish('job.created', { job: 7 });
  await until(() => net.log.some((l) => l.msg.type === 'publish'), 'sent');
  net.autoAck = true;
  net.kill('http://a');
  const dot = await p;
  const sent = net.log.filter((l) => l.msg.type === 'publish');
  assert.equal(sent.length, 2);
  assert.equal(sent[0].msg.key, sent[1].msg.key);
  assert.equal(sent[1].endpoint, 'http://b');
  assert.match(dot, /^r:/);
  c.close();
});

test('state writes to one key coalesce and carry the channel token as context', async () => {
  const net = new FakeNet();
  const c = client(net);
  const ch = c.channel('project:s');
  await ch.subscribe();
  await until(() => c.status.online, 'online');
  const ps = [1, 2, 3, 4].map((x) => ch.set('pos', { x }));
  await Promise.all(ps);
  const sets = net.log.filter((l) => l.msg.type === 'set');
  assert.deepEqual(
    sets.map((l) => l.msg.value.x),
    [1, 4],
    'the first write goes at once; the latest waits for it to come back',
  );
  assert.equal(sets[1].msg.context, '1', 'the second write has seen the first');
  assert.equal(ch.state.get('pos').value.x, 4);
  c.close();
});

test('an acknowledged state write that died with its endpoint is written again', async () => {
  const net = new FakeNet();
  const c = client(net);
  const ch = c.channel('project:u');
  await ch.subscribe();
  await until(() => c.status.online, 'online');
  // Endpoint a acks but dies before the op replicates or comes back.
  const ackOnly = net.handle.bind(net);
  net.handle = (t, msg) => {
    if (msg.type === 'set' && t.endpoint === 'http://a') {
      t.onMessage({ type: 'ack', id: msg.id, dot: 'a:99' });
      return;
    }
    ackOnly(t, msg);
  };
  await ch.set('node:1', { x: 5 });
  net.kill('http://a');
  await until(() => (net.ops.get('project:u') || []).length === 1, 'the write again, at b');
  assert.equal(net.ops.get('project:u')[0].value.x, 5);
  assert.equal(ch.resent, 1);
  c.close();
});

test('a write another client superseded is not written again after failover', async () => {
  const net = new FakeNet();
  const c = client(net);
  const ch = c.channel('project:v');
  await ch.subscribe();
  await until(() => c.status.online, 'online');
  const orig = net.handle.bind(net);
  net.handle = (t, msg) => {
    if (msg.type === 'set' && t.endpoint === 'http://a') return t.onMessage({ type: 'ack', id: msg.id, dot: 'a:99' });
    orig(t, msg);
  };
  await ch.set('k', 'mine');
  // Someone else's write to the key arrives before the failover.
  net.broadcast(net.append('project:v', { type: 'set', key: 'k', value: 'theirs' }));
  await until(() => ch.state.get('k')?.value === 'theirs', 'their write');
  net.kill('http://a');
  await until(() => c.status.endpoint === 'http://b' && c.status.online, 'failover');
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(ch.resent, 0);
  assert.equal(net.ops.get('project:v').length, 1);
  c.close();
});

test('someone alone who joins presence sees themselves, marked', async () => {
  const net = new FakeNet();
  const c = client(net);
  const ch = c.channel('project:p');
  const events = [];
  ch.on('presence', (e) => events.push(e));
  await ch.subscribe();
  await ch.join({ name: 'Ada' });
  assert.equal(events.length, 1);
  assert.equal(events[0].action, 'join');
  assert.equal(events[0].self, true);
  assert.deepEqual(events[0].members.map((m) => [m.data.name, !!m.self]), [['Ada', true]]);
  assert.equal(ch.members.size, 0, 'the Map holds the others only');
  c.close();
});

test('status.uplink follows the server: connected, then local only', async () => {
  const net = new FakeNet();
  const Base = net.transport();
  const c = client(net, {
    env: {
      transports: {
        websocket: class extends Base {
          async open() {
            const hello = await super.open();
            return { ...hello, uplink: 'connected' };
          }
        },
      },
      random: () => 0.5,
    },
  });
  const seen = [];
  c.onStatus((s) => seen.push(s.uplink));
  await c.channel('project:u').subscribe();
  await until(() => c.status.uplink === 'connected', 'uplink from the hello');
  net.conns[0].onMessage({ type: 'uplink', state: 'disconnected' });
  assert.equal(c.status.uplink, 'disconnected');
  assert.ok(seen.includes('connected') && seen.at(-1) === 'disconnected', seen.join());
  c.close();
});

test('an unasked truncated subscribed moves the token and asks to re-read state', async () => {
  const net = new FakeNet();
  const c = client(net);
  const ch = c.channel('project:t');
  let told = null;
  ch.on('truncated', (m) => (told = m));
  await ch.subscribe();
  await until(() => c.status.online, 'online');
  net.conns[0].onMessage({ type: 'subscribed', channel: 'project:t', token: '42', replayed: 0, truncated: true });
  assert.equal(ch.token, '42');
  assert.equal(told?.token, '42');
  c.close();
});

test('an endpoint that stops answering is dropped after a ping timeout, and the client fails over', async () => {
  const net = new FakeNet();
  const c = client(net, { pingInterval: 40, pingTimeout: 60 });
  const ch = c.channel('project:s');
  await ch.subscribe();
  await until(() => c.status.online && c.status.endpoint === 'http://a', 'online on a');
  // Endpoint a freezes: its connection stays open, nothing is answered.
  net.silent = 'http://a';
  const t0 = Date.now();
  await until(() => c.status.online && c.status.endpoint === 'http://b', 'failover to b', 3000);
  const took = Date.now() - t0;
  assert.ok(took < 1000, `noticed after ${took} ms (interval 40 + timeout 60)`);
  c.close();
});

test('a pattern subscription gets every matching channel, new ones too, and resumes each from its token', async () => {
  const net = new FakeNet();
  const publish = (channel, event) => net.broadcast(net.append(channel, { type: 'publish', event }));
  net.append('meeting:1/commands', { type: 'publish', event: 'pause' });
  net.append('meeting:1/commands', { type: 'publish', event: 'resume' });
  net.append('meeting:1/chat', { type: 'publish', event: 'hi' });
  const c = client(net);
  const p = c.pattern('meeting:*/commands');
  assert.equal(c.pattern('meeting:*/commands'), p, 'one object per pattern');
  const seen = [];
  p.on('op', (m) => seen.push(`${m.channel} ${m.event}`));
  let started = null;
  p.on('subscribed', (r) => (started = r));
  await p.subscribe();
  await until(() => started, 'subscribed');
  assert.equal(started.channels, 1);
  publish('meeting:2/commands', 'stop'); // a channel created later
  publish('meeting:2/chat', 'no');
  assert.deepEqual(seen, ['meeting:1/commands pause', 'meeting:1/commands resume', 'meeting:2/commands stop']);
  assert.deepEqual(Object.fromEntries(p.tokens), { 'meeting:1/commands': '2', 'meeting:2/commands': '1' });
  // The endpoint dies; the next one is asked from every channel's token, and the
  // op it re-delivers before each token is dropped by dot.
  net.kill('http://a');
  await until(() => c.status.online && c.status.endpoint === 'http://b', 'failover');
  await until(() => net.log.some((l) => l.endpoint === 'http://b' && l.msg.type === 'subscribe_pattern'), 'resubscribe');
  const again = net.log.find((l) => l.endpoint === 'http://b' && l.msg.type === 'subscribe_pattern').msg;
  assert.deepEqual(again.since, { 'meeting:1/commands': '2', 'meeting:2/commands': '1' });
  publish('meeting:3/commands', 'configure');
  assert.deepEqual(seen.slice(3), ['meeting:3/commands configure']);
  c.close();
});
