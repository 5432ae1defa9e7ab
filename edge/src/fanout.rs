//! Fan-out to local subscribers: per channel, the connections subscribed, what has been
//! delivered (durable ops only), and presence.
//!
//! A message is rendered to JSON once per channel and shared (`Arc`) by every
//! subscriber whose resume token is the channel's; a subscriber that resumed from a
//! token ahead of this replica gets its own rendering and is spared ops it already has.
//! Queues are bounded: a subscriber whose queue is full is killed as a slow consumer
//! (it reconnects and resumes with its token; the log has everything).
//!
//! A namespace subscription ([`Fanout::add_pattern`]) is one subscription per matching
//! channel: those that exist are subscribed when it starts (`Core::subscribe_pattern`,
//! under the core lock); a channel that first appears later is adopted at its first
//! delivery or snapshot install, from an empty position, so nothing of it is missed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use futures_util::task::AtomicWaker;
use shared::client::{self, CloseCode, ErrorCode, PresenceAction, ServerMsg};
use shared::pattern::ChannelPattern;
use shared::{token, ChannelName, Ephemeral, Op, Payload, VersionVector};
use tokio_util::sync::CancellationToken;

pub type ConnId = u64;

/// One message for a connection.
#[derive(Debug)]
pub struct Push {
    /// Rendered once, shared by reference count (a WebSocket text frame as is).
    pub json: Utf8Bytes,
    /// The resume token after this message (ops only; SSE puts it in `id:`).
    pub token: Option<Arc<str>>,
    /// SSE event name.
    pub event: &'static str,
}

/// A connection's bounded queue of pushes. The fan-out appends under a short lock; the
/// connection task takes a whole batch under one lock. (A tokio bounded channel paid a
/// semaphore lock per message on each side — a fifth of a fan-out's instructions —
/// and allocated a block of slots per connection up front.)
#[derive(Debug)]
pub struct SendQueue {
    inner: Mutex<SendQueueState>,
    waker: AtomicWaker,
    cap: usize,
}

#[derive(Debug, Default)]
struct SendQueueState {
    items: VecDeque<Arc<Push>>,
    /// The connection task is gone: pushes are refused.
    closed: bool,
}

/// What became of a push.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue holds `cap` messages already: a slow consumer.
    Full,
    Closed,
}

impl SendQueue {
    /// A queue of at most `cap` messages and its receiving end.
    pub fn new(cap: usize) -> (Arc<Self>, SendQueueRx) {
        let q = Arc::new(Self {
            inner: Mutex::new(SendQueueState::default()),
            waker: AtomicWaker::new(),
            cap,
        });
        (
            q.clone(),
            SendQueueRx {
                q,
                ready: VecDeque::new(),
            },
        )
    }

    fn lock(&self) -> MutexGuard<'_, SendQueueState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, p: Arc<Push>) -> Pushed {
        {
            let mut st = self.lock();
            if st.closed {
                return Pushed::Closed;
            }
            if st.items.len() >= self.cap {
                return Pushed::Full;
            }
            st.items.push_back(p);
        }
        self.waker.wake();
        Pushed::Queued
    }
}

/// At most this many queued messages are taken under one lock (and written together).
pub const BATCH: usize = 64;

/// The connection task's end of an [`SendQueue`].
#[derive(Debug)]
pub struct SendQueueRx {
    q: Arc<SendQueue>,
    /// Taken from the queue, not yet handed out.
    ready: VecDeque<Arc<Push>>,
}

impl SendQueueRx {
    /// Ready once there are messages to [`SendQueueRx::pop`]: takes up to [`BATCH`]
    /// queued messages under one lock, or waits for the first one.
    pub fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.poll_ready_max(cx, BATCH)
    }

    fn poll_ready_max(
        &mut self,
        cx: &mut std::task::Context<'_>,
        max: usize,
    ) -> std::task::Poll<()> {
        if !self.ready.is_empty() || self.take(max) {
            return std::task::Poll::Ready(());
        }
        self.q.waker.register(cx.waker());
        // A push between the first look and the registration woke no one: look again.
        if self.take(max) {
            return std::task::Poll::Ready(());
        }
        std::task::Poll::Pending
    }

    /// The next message already taken from the queue.
    pub fn pop(&mut self) -> Option<Arc<Push>> {
        self.ready.pop_front()
    }

    /// The next message.
    pub async fn recv(&mut self) -> Arc<Push> {
        loop {
            if let Some(p) = self.pop() {
                return p;
            }
            std::future::poll_fn(|cx| self.poll_ready(cx)).await;
        }
    }

    /// Moves up to `max` queued messages into `ready` (empty when called).
    fn take(&mut self, max: usize) -> bool {
        let mut st = self.q.lock();
        if st.items.is_empty() {
            return false;
        }
        if st.items.len() <= max {
            // Swap buffers: no copying and, in a steady state, no allocation.
            std::mem::swap(&mut st.items, &mut self.ready);
        } else {
            self.ready.extend(st.items.drain(..max));
        }
        true
    }
}

impl Drop for SendQueueRx {
    fn drop(&mut self) {
        let mut st = self.q.lock();
        st.closed = true;
        st.items = VecDeque::new();
    }
}

/// Why a connection was killed by the fan-out.
pub const KILL_NONE: u8 = 0;
pub const KILL_SLOW: u8 = 1;

/// A connection as the fan-out sees it.
#[derive(Clone, Debug)]
pub struct ConnHandle {
    pub id: ConnId,
    /// The id other clients use to address it (signals) and see it by (presence).
    pub client: Arc<str>,
    pub subject: Arc<str>,
    pub tx: Arc<SendQueue>,
    pub kill: CancellationToken,
    pub kill_reason: Arc<AtomicU8>,
}

impl ConnHandle {
    fn push(&self, p: Arc<Push>) -> bool {
        match self.tx.push(p) {
            Pushed::Queued => true,
            Pushed::Full => {
                self.kill_reason.store(KILL_SLOW, Ordering::Relaxed);
                self.kill.cancel();
                metrics::counter!("outpost_slow_consumer_closes_total").increment(1);
                false
            }
            Pushed::Closed => false,
        }
    }

    /// The close code a killed connection should send.
    pub fn kill_code(&self) -> CloseCode {
        match self.kill_reason.load(Ordering::Relaxed) {
            KILL_SLOW => CloseCode::SlowConsumerResume,
            _ => CloseCode::GoingAwayResume,
        }
    }
}

#[derive(Debug)]
struct Sub {
    conn: ConnHandle,
    /// Set when the subscriber's token is ahead of `delivered` on some origin.
    ahead: Option<VersionVector>,
}

#[derive(Debug, Clone)]
pub struct PresenceEntry {
    pub conn: ConnId,
    pub subject: Arc<str>,
    pub data: Option<Payload>,
    pub seen: Instant,
}

#[derive(Debug, Default)]
struct Chan {
    subs: HashMap<ConnId, Sub>,
    delivered: VersionVector,
    presence: HashMap<Arc<str>, PresenceEntry>,
}

/// A connection's namespace subscription.
#[derive(Debug)]
struct PatternSub {
    conn: ConnHandle,
    pattern: ChannelPattern,
    /// Channels it subscribed when they first appeared (unsubscribed with it).
    adopted: HashSet<ChannelName>,
    /// At most this many adopted channels; past it the subscriber is told once.
    max: usize,
    overflowed: bool,
}

/// Local subscribers of every channel.
#[derive(Debug, Default)]
pub struct Fanout {
    inner: Mutex<HashMap<ChannelName, Chan>>,
    /// Lock order: `inner`, then `patterns`.
    patterns: Mutex<Vec<PatternSub>>,
    has_patterns: AtomicBool,
}

fn json(msg: &ServerMsg) -> Utf8Bytes {
    serde_json::to_string(msg)
        .unwrap_or_else(|_| r#"{"type":"error","code":"internal"}"#.into())
        .into()
}

/// What a new subscription must replay before it goes live.
#[derive(Debug)]
pub struct Replay {
    /// `(op, token after it)`, in order.
    pub ops: Vec<(Op, String)>,
    /// The subscriber's token at the end of the replay.
    pub token: String,
    /// The replay could not go back as far as asked: history was compacted.
    pub truncated: bool,
}

impl Fanout {
    fn lock(&self) -> MutexGuard<'_, HashMap<ChannelName, Chan>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn patterns(&self) -> MutexGuard<'_, Vec<PatternSub>> {
        self.patterns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a namespace subscription (the caller holds the core lock and has
    /// subscribed `conn` to every channel that exists and matches).
    pub fn add_pattern(&self, conn: &ConnHandle, pattern: ChannelPattern, max: usize) {
        let _order = self.lock();
        let mut p = self.patterns();
        p.retain(|s| !(s.conn.id == conn.id && s.pattern == pattern));
        p.push(PatternSub {
            conn: conn.clone(),
            pattern,
            adopted: HashSet::new(),
            max,
            overflowed: false,
        });
        self.has_patterns.store(true, Ordering::Relaxed);
    }

    /// Whether `conn` subscribes to `channel` here.
    pub fn is_subscribed(&self, channel: &ChannelName, conn: ConnId) -> bool {
        self.lock()
            .get(channel)
            .is_some_and(|c| c.subs.contains_key(&conn))
    }

    /// Ends a connection's namespace subscriptions (`pattern`, or all of them); returns
    /// the channels they adopted, for the caller to unsubscribe.
    pub fn remove_patterns(&self, conn: ConnId, pattern: Option<&str>) -> Vec<ChannelName> {
        let _order = self.lock();
        let mut p = self.patterns();
        let mut adopted = Vec::new();
        p.retain_mut(|s| {
            let gone = s.conn.id == conn && pattern.is_none_or(|t| s.pattern.as_str() == t);
            if gone {
                adopted.extend(s.adopted.drain());
            }
            !gone
        });
        self.has_patterns.store(!p.is_empty(), Ordering::Relaxed);
        adopted
    }

    /// Subscribes the namespace subscriptions that match `channel` and do not hold it
    /// yet. Called before the channel's first delivery or install after they started:
    /// a channel that existed then was subscribed then, so this one is new and its
    /// position is what has been delivered so far (nothing, or a snapshot's floor).
    fn adopt(&self, ch: &mut Chan, channel: &ChannelName) {
        if !self.has_patterns.load(Ordering::Relaxed) {
            return;
        }
        for ps in self.patterns().iter_mut() {
            if ch.subs.contains_key(&ps.conn.id) || !ps.pattern.matches(channel) {
                continue;
            }
            if ps.adopted.len() >= ps.max {
                if !ps.overflowed {
                    ps.overflowed = true;
                    ps.conn.push(Arc::new(Push {
                        json: json(&ServerMsg::error(
                            None,
                            ErrorCode::TooManySubscriptions,
                            format!(
                                "pattern {} matched more than {} new channels; {channel} and later ones are not delivered: subscribe again",
                                ps.pattern, ps.max
                            ),
                        )),
                        token: None,
                        event: "error",
                    }));
                }
                continue;
            }
            ps.adopted.insert(channel.clone());
            let notice = Arc::new(Push {
                json: json(&ServerMsg::Subscribed {
                    id: None,
                    channel: channel.to_string(),
                    token: token::encode(&ch.delivered),
                    replayed: 0,
                    truncated: false,
                }),
                token: None,
                event: "subscribed",
            });
            if ps.conn.push(notice) {
                ch.subs.insert(
                    ps.conn.id,
                    Sub {
                        conn: ps.conn.clone(),
                        ahead: None,
                    },
                );
                metrics::gauge!("outpost_subscriptions").increment(1.0);
            }
        }
    }

    /// Seeds what counts as delivered for a channel restored from disk.
    pub fn seed_delivered(&self, channel: &ChannelName, vv: &VersionVector) {
        self.lock()
            .entry(channel.clone())
            .or_default()
            .delivered
            .merge(vv);
    }

    /// A snapshot was installed: what it covers (`vv`, the ops that exist here only as
    /// state) counts as delivered. A subscriber whose position does not cover it will
    /// never get those ops one by one, so it is told — a `subscribed` without an `id`,
    /// `truncated: true`, its new token — and re-reads state, as after a resume from
    /// compacted history. Ops the snapshot did not cover still arrive as usual.
    pub fn installed(&self, channel: &ChannelName, vv: &VersionVector) {
        let mut g = self.lock();
        let ch = g.entry(channel.clone()).or_default();
        self.adopt(ch, channel);
        let before = ch.delivered.clone();
        ch.delivered.merge(vv);
        let mut dead = Vec::new();
        for (id, sub) in ch.subs.iter_mut() {
            let mut pos = sub.ahead.clone().unwrap_or_else(|| before.clone());
            if pos.dominates(vv) {
                continue;
            }
            pos.merge(vv);
            let notice = Arc::new(Push {
                json: json(&ServerMsg::Subscribed {
                    id: None,
                    channel: channel.to_string(),
                    token: token::encode(&pos),
                    replayed: 0,
                    truncated: true,
                }),
                token: None,
                event: "subscribed",
            });
            sub.ahead = (pos != ch.delivered).then_some(pos);
            if !sub.conn.push(notice) {
                dead.push(*id);
            }
        }
        for id in dead {
            if ch.subs.remove(&id).is_some() {
                metrics::gauge!("outpost_subscriptions").decrement(1.0);
            }
        }
    }

    /// What has been delivered (is durable) on a channel.
    pub fn delivered(&self, channel: &ChannelName) -> VersionVector {
        self.lock()
            .get(channel)
            .map(|c| c.delivered.clone())
            .unwrap_or_default()
    }

    /// Registers a subscriber and computes its replay from `log` (the replica's retained
    /// log in applied order), atomically with respect to deliveries (the caller holds
    /// the core lock). Returns whether this is the channel's first subscriber.
    pub fn subscribe<'a>(
        &self,
        channel: &ChannelName,
        conn: &ConnHandle,
        since: &VersionVector,
        log: impl Iterator<Item = &'a Op>,
        truncated: bool,
    ) -> (Replay, bool) {
        let mut g = self.lock();
        let ch = g.entry(channel.clone()).or_default();
        let first = ch.subs.is_empty();
        let mut vv = since.clone();
        let mut ops = Vec::new();
        for op in log {
            if ch.delivered.covers(op.dot) && !vv.covers(op.dot) {
                vv.raise(op.dot.origin, op.dot.seq);
                ops.push((op.clone(), token::encode(&vv)));
            }
        }
        vv.merge(&ch.delivered);
        let ahead = (vv != ch.delivered).then(|| vv.clone());
        ch.subs.insert(
            conn.id,
            Sub {
                conn: conn.clone(),
                ahead,
            },
        );
        metrics::gauge!("outpost_subscriptions").increment(1.0);
        (
            Replay {
                ops,
                token: token::encode(&vv),
                truncated,
            },
            first,
        )
    }

    /// Removes a subscription; returns whether the channel has no subscriber left, and
    /// presence leaves to announce.
    pub fn unsubscribe(&self, channel: &ChannelName, conn: ConnId) -> bool {
        let mut g = self.lock();
        let Some(ch) = g.get_mut(channel) else {
            return false;
        };
        if ch.subs.remove(&conn).is_some() {
            metrics::gauge!("outpost_subscriptions").decrement(1.0);
        }
        let left: Vec<Arc<str>> = ch
            .presence
            .iter()
            .filter(|(_, p)| p.conn == conn)
            .map(|(k, _)| k.clone())
            .collect();
        for client in left {
            if let Some(p) = ch.presence.remove(&client) {
                Self::broadcast_presence(ch, channel, PresenceAction::Leave, &client, &p);
            }
        }
        ch.subs.is_empty()
    }

    /// Delivers a durable op to the channel's subscribers.
    pub fn deliver(&self, channel: &ChannelName, op: &Op) {
        let mut g = self.lock();
        let ch = g.entry(channel.clone()).or_default();
        if ch.delivered.covers(op.dot) {
            // Already counted as delivered: the channel was loaded from disk (or a
            // snapshot installed) while this delivery waited for its flush — a
            // coordinator holds deliveries while the shared log is away — and
            // subscribers since then replayed it from the log.
            return;
        }
        self.adopt(ch, channel);
        ch.delivered.raise(op.dot.origin, op.dot.seq);
        if ch.subs.is_empty() {
            return;
        }
        let shared_token: Arc<str> = token::encode(&ch.delivered).into();
        let shared = Arc::new(Push {
            json: json(&client::op_message(
                channel.as_str(),
                op,
                shared_token.to_string(),
            )),
            token: Some(shared_token),
            event: "op",
        });
        let mut dead = Vec::new();
        let mut delivered_n = 0u64;
        for (id, sub) in ch.subs.iter_mut() {
            let push = match &mut sub.ahead {
                None => shared.clone(),
                Some(ahead) => {
                    if ahead.covers(op.dot) {
                        continue;
                    }
                    ahead.merge(&ch.delivered);
                    if *ahead == ch.delivered {
                        sub.ahead = None;
                        shared.clone()
                    } else {
                        let t = token::encode(ahead);
                        Arc::new(Push {
                            json: json(&client::op_message(channel.as_str(), op, t.clone())),
                            token: Some(t.into()),
                            event: "op",
                        })
                    }
                }
            };
            if sub.conn.push(push) {
                delivered_n += 1;
            } else {
                dead.push(*id);
            }
        }
        metrics::counter!("outpost_ops_out_total").increment(delivered_n);
        for id in dead {
            if ch.subs.remove(&id).is_some() {
                metrics::gauge!("outpost_subscriptions").decrement(1.0);
            }
        }
    }

    /// Fans out a message that is never stored.
    pub fn ephemeral(&self, channel: &ChannelName, msg: &Ephemeral) {
        let g = self.lock();
        let Some(ch) = g.get(channel) else { return };
        let push = Arc::new(Push {
            json: json(&ServerMsg::Ephemeral {
                channel: channel.to_string(),
                event: msg.kind.clone(),
                data: msg.data.clone(),
                from: msg.from.clone(),
            }),
            token: None,
            event: "ephemeral",
        });
        for sub in ch.subs.values() {
            sub.conn.push(push.clone());
        }
    }

    /// Sends a WebRTC signal to the member `to` of the channel. False if not here.
    pub fn signal(&self, channel: &ChannelName, from: &str, to: &str, data: &Payload) -> bool {
        let g = self.lock();
        let Some(ch) = g.get(channel) else {
            return false;
        };
        let Some(sub) = ch.subs.values().find(|s| &*s.conn.client == to) else {
            return false;
        };
        sub.conn.push(Arc::new(Push {
            json: json(&ServerMsg::Signal {
                channel: channel.to_string(),
                from: from.to_owned(),
                data: data.clone(),
            }),
            token: None,
            event: "signal",
        }))
    }

    /// Joins or refreshes a presence entry; announces joins and changes.
    pub fn presence(&self, channel: &ChannelName, conn: &ConnHandle, data: Option<Payload>) {
        let mut g = self.lock();
        let ch = g.entry(channel.clone()).or_default();
        let entry = PresenceEntry {
            conn: conn.id,
            subject: conn.subject.clone(),
            data,
            seen: Instant::now(),
        };
        let action = match ch.presence.get(&conn.client) {
            None => Some(PresenceAction::Join),
            Some(old) if old.data != entry.data => Some(PresenceAction::Update),
            Some(_) => None,
        };
        ch.presence.insert(conn.client.clone(), entry.clone());
        if let Some(action) = action {
            Self::broadcast_presence(ch, channel, action, &conn.client, &entry);
        }
    }

    /// Marks a connection's presence entries alive, in the channels it subscribes to
    /// (presence requires a subscription, so no other channel can hold one).
    pub fn touch<'a>(&self, conn: ConnId, channels: impl IntoIterator<Item = &'a ChannelName>) {
        let now = Instant::now();
        let mut g = self.lock();
        for name in channels {
            if let Some(ch) = g.get_mut(name) {
                for p in ch.presence.values_mut().filter(|p| p.conn == conn) {
                    p.seen = now;
                }
            }
        }
    }

    /// Drops presence entries not refreshed within `ttl`, announcing the leaves.
    pub fn expire_presence(&self, ttl: std::time::Duration) {
        let mut g = self.lock();
        for (name, ch) in g.iter_mut() {
            let stale: Vec<Arc<str>> = ch
                .presence
                .iter()
                .filter(|(_, p)| p.seen.elapsed() > ttl)
                .map(|(k, _)| k.clone())
                .collect();
            for client in stale {
                if let Some(p) = ch.presence.remove(&client) {
                    Self::broadcast_presence(ch, name, PresenceAction::Leave, &client, &p);
                }
            }
        }
    }

    /// Current members of a channel: (client, subject, data).
    pub fn members(&self, channel: &ChannelName) -> Vec<(String, String, Option<Payload>)> {
        let g = self.lock();
        let mut v: Vec<_> = g
            .get(channel)
            .map(|ch| {
                ch.presence
                    .iter()
                    .map(|(c, p)| (c.to_string(), p.subject.to_string(), p.data.clone()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }

    fn broadcast_presence(
        ch: &Chan,
        channel: &ChannelName,
        action: PresenceAction,
        client: &str,
        entry: &PresenceEntry,
    ) {
        let push = Arc::new(Push {
            json: json(&ServerMsg::Presence {
                channel: channel.to_string(),
                action,
                client: client.to_owned(),
                subject: entry.subject.to_string(),
                data: entry.data.clone(),
            }),
            token: None,
            event: "presence",
        });
        for sub in ch.subs.values() {
            sub.conn.push(push.clone());
        }
    }

    /// Forgets an evicted channel (only when nobody is subscribed or present).
    pub fn forget(&self, channel: &ChannelName) {
        let mut g = self.lock();
        if g.get(channel)
            .is_some_and(|c| c.subs.is_empty() && c.presence.is_empty())
        {
            g.remove(channel);
        }
    }

    /// Tells every subscriber to go elsewhere (shutdown, drain).
    pub fn kill_all(&self) {
        let g = self.lock();
        for ch in g.values() {
            for sub in ch.subs.values() {
                sub.conn.kill.cancel();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Context, Poll, Wake, Waker};

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn push(n: usize) -> Arc<Push> {
        Arc::new(Push {
            json: format!("{{\"n\":{n}}}").into(),
            token: None,
            event: "op",
        })
    }

    #[test]
    fn send_queue_is_bounded_batches_in_order_wakes_and_refuses_once_the_task_is_gone() {
        let (tx, mut rx) = SendQueue::new(3);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        // Empty: waits, and the next push wakes it.
        assert!(rx.poll_ready_max(&mut cx, 2).is_pending());
        assert_eq!(tx.push(push(1)), Pushed::Queued);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(tx.push(push(2)), Pushed::Queued);
        assert_eq!(tx.push(push(3)), Pushed::Queued);
        // Full at the cap: the fan-out kills the connection as a slow consumer.
        assert_eq!(tx.push(push(4)), Pushed::Full);
        // At most `max` per take, in order.
        let mut take = |rx: &mut SendQueueRx| {
            assert_eq!(rx.poll_ready_max(&mut cx, 2), Poll::Ready(()));
            std::iter::from_fn(|| rx.pop())
                .map(|p| p.json.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(take(&mut rx), [r#"{"n":1}"#, r#"{"n":2}"#]);
        assert_eq!(take(&mut rx), [r#"{"n":3}"#]);
        assert!(rx.poll_ready_max(&mut cx, 2).is_pending());
        // `recv` (SSE) hands them out one by one, in order.
        use futures_util::FutureExt;
        assert!(rx.recv().now_or_never().is_none());
        for n in 6..9 {
            assert_eq!(tx.push(push(n)), Pushed::Queued);
        }
        for n in 6..9 {
            let p = rx.recv().now_or_never().expect("queued");
            assert_eq!(p.json.to_string(), format!("{{\"n\":{n}}}"));
        }
        drop(rx);
        assert_eq!(tx.push(push(5)), Pushed::Closed);
    }

    #[test]
    fn a_delivery_already_counted_reaches_no_subscriber_twice() {
        use shared::hlc::Hlc;
        use shared::replica::{ChannelReplica, LocalOutcome, LocalWrite, ReplicaConfig};
        let channel = ChannelName::new("project:f").unwrap_or_else(|e| panic!("{e}"));
        let me = shared::ReplicaId::new(3).unwrap_or_else(|| panic!("id"));
        let mut r = ChannelReplica::new(channel.clone(), me, ReplicaConfig::default());
        let mut event = |n: u64| {
            let write = LocalWrite::Event {
                kind: "e".into(),
                data: shared::op::Payload::from_value(&n),
                idempotency_key: None,
                by: None,
            };
            let hlc = Hlc {
                wall_ms: n,
                logical: 0,
            };
            match r.local(hlc, write) {
                Ok(LocalOutcome::Applied(a)) => a.op,
                _ => panic!("not applied"),
            }
        };
        let first = event(1);
        let fanout = Fanout::default();
        // The channel was loaded from disk with the op while its delivery waited for a
        // flush: the op counts as delivered, and a subscriber replays it from the log.
        let mut vv = VersionVector::new();
        vv.raise(first.dot.origin, first.dot.seq);
        fanout.seed_delivered(&channel, &vv);
        let (tx, mut rx) = SendQueue::new(16);
        let conn = ConnHandle {
            id: 1,
            client: "c".into(),
            subject: "s".into(),
            tx,
            kill: CancellationToken::new(),
            kill_reason: Arc::new(AtomicU8::new(0)),
        };
        let log = [first.clone()];
        let (replay, _) =
            fanout.subscribe(&channel, &conn, &VersionVector::new(), log.iter(), false);
        assert_eq!(replay.ops.len(), 1, "the replay carries the op");
        // Then the held delivery runs: nobody gets it a second time.
        fanout.deliver(&channel, &first);
        use futures_util::FutureExt;
        assert!(rx.recv().now_or_never().is_none(), "delivered twice");
        // A new op is delivered as usual.
        let second = event(2);
        fanout.deliver(&channel, &second);
        assert!(rx.recv().now_or_never().is_some(), "a new op is delivered");

        // A snapshot jumps the channel past ops 3 and 4, which this subscriber will
        // never get one by one: it is told so (truncated, its new token), once.
        let (third, fourth) = (event(3), event(4));
        let mut jump = VersionVector::new();
        jump.raise(fourth.dot.origin, fourth.dot.seq);
        fanout.installed(&channel, &jump);
        let notice = rx.recv().now_or_never().expect("a truncation notice");
        let v: serde_json::Value =
            serde_json::from_str(&notice.json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v["type"], "subscribed");
        assert_eq!(v["truncated"], true);
        assert!(v["id"].is_null());
        assert_eq!(v["token"], token::encode(&jump).as_str());
        // The ops it covers are not delivered afterwards; the next one is.
        fanout.deliver(&channel, &third);
        assert!(rx.recv().now_or_never().is_none(), "a covered op delivered");
        fanout.installed(&channel, &jump);
        assert!(rx.recv().now_or_never().is_none(), "told twice");
        let fifth = event(5);
        fanout.deliver(&channel, &fifth);
        let p = rx.recv().now_or_never().expect("the next op");
        assert!(p.json.contains("\"op\""));
    }

    #[test]
    fn a_namespace_subscription_adopts_new_matching_channels_up_to_its_limit() {
        use futures_util::FutureExt;
        use shared::hlc::Hlc;
        use shared::replica::{ChannelReplica, LocalOutcome, LocalWrite, ReplicaConfig};
        let me = shared::ReplicaId::new(3).unwrap_or_else(|| panic!("id"));
        let op = |name: &str| {
            let channel = ChannelName::new(name).unwrap_or_else(|e| panic!("{e}"));
            let mut r = ChannelReplica::new(channel.clone(), me, ReplicaConfig::default());
            let write = LocalWrite::Event {
                kind: "pause".into(),
                data: shared::op::Payload::null(),
                idempotency_key: None,
                by: None,
            };
            match r.local(
                Hlc {
                    wall_ms: 1,
                    logical: 0,
                },
                write,
            ) {
                Ok(LocalOutcome::Applied(a)) => (channel, a.op),
                _ => panic!("not applied"),
            }
        };
        let fanout = Fanout::default();
        let (tx, mut rx) = SendQueue::new(16);
        let conn = ConnHandle {
            id: 7,
            client: "c".into(),
            subject: "svc".into(),
            tx,
            kill: CancellationToken::new(),
            kill_reason: Arc::new(AtomicU8::new(0)),
        };
        let pattern = ChannelPattern::new("meeting:*/commands").unwrap_or_else(|e| panic!("{e}"));
        fanout.add_pattern(&conn, pattern, 1);
        let mut next = || {
            rx.recv().now_or_never().map(|p| {
                serde_json::from_str::<serde_json::Value>(&p.json).unwrap_or_else(|e| panic!("{e}"))
            })
        };
        // A new matching channel: `subscribed` from nothing, then the op.
        let (c1, o1) = op("meeting:1/commands");
        fanout.deliver(&c1, &o1);
        let sub = next().expect("subscribed");
        assert_eq!(
            (sub["type"].as_str(), sub["channel"].as_str()),
            (Some("subscribed"), Some("meeting:1/commands"))
        );
        assert_eq!(sub["token"], token::encode(&VersionVector::new()).as_str());
        assert_eq!(next().expect("the op")["type"], "op");
        // Not matching: nothing.
        let (c2, o2) = op("meeting:1/chat");
        fanout.deliver(&c2, &o2);
        assert!(next().is_none());
        // Past the limit: told once, not delivered.
        let (c3, o3) = op("meeting:2/commands");
        fanout.deliver(&c3, &o3);
        let err = next().expect("an error");
        assert_eq!(
            (err["type"].as_str(), err["code"].as_str()),
            (Some("error"), Some("too_many_subscriptions"))
        );
        assert!(next().is_none());
        let (c4, o4) = op("meeting:3/commands");
        fanout.deliver(&c4, &o4);
        assert!(next().is_none(), "told twice");
        // Ending it hands back what it adopted; new channels are no longer adopted.
        assert_eq!(fanout.remove_patterns(7, None), vec![c1]);
        let (c5, o5) = op("meeting:5/commands");
        fanout.deliver(&c5, &o5);
        assert!(next().is_none());
    }
}
