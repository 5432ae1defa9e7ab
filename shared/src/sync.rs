//! The edge <-> cloud replication state machine, sans-IO.
//!
//! A [`Node`] is one replica (an edge or the cloud) with all its channels. The I/O shell
//! feeds it [`Input`]s with the current time and drains [`Output`]s with [`Node::poll`];
//! it never reads a clock, opens a socket or touches a disk itself (quinn-proto's
//! `Connection` is the model).
//!
//! **Output contract.** The shell handles outputs in the order they are polled, and
//! makes every [`Output::Persist`] durable before it transmits any later
//! [`Output::Send`] or answers a client whose write produced it. A shell may batch
//! several persists into one flush (group commit) as long as that order holds.
//!
//! **Protocol.** On link-up the edge sends `Sync{vv}` for every channel it has local
//! interest in or unacked local ops for; each side answers a `Sync` with the ops the
//! other lacks (or a snapshot when they were compacted), the cloud acks ops it has
//! persisted with its version vector, and forwards every newly applied op to the other
//! edges subscribed to the channel. Lost frames are repaired by outbox resends and
//! periodic anti-entropy `Sync`s, so the machine is correct over lossy, duplicating and
//! reordering links, not only over QUIC's reliable streams.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::hlc::{Hlc, HlcClock};
use crate::ids::{ChannelName, Dot, ReplicaId};
use crate::op::{Ephemeral, Op};
use crate::replica::{
    Applied, ChannelReplica, LocalOutcome, LocalWrite, ReplicaConfig, ReplicaError, Snapshot,
};
use crate::state::{Conflict, Register};
use crate::vv::VersionVector;
use crate::wire::{LogRecord, RebaseBase, SyncMsg};

/// The sync batch for a link whose frames may hold `max_frame` bytes: an eighth, so
/// that a batch estimated low still fits.
pub const fn batch_bytes_for(max_frame: usize) -> usize {
    let b = max_frame / 8;
    if b == 0 {
        1
    } else {
        b
    }
}

/// Default of [`SyncConfig::batch_bytes`].
pub const DEFAULT_BATCH_BYTES: usize = batch_bytes_for(crate::wire::DEFAULT_MAX_FRAME);

/// Rebases an edge refuses because the upstream lacks its own evicted ops, before it
/// takes one anyway (see `on_rebase`).
const MAX_REBASE_REFUSALS: u32 = 20;

/// A fetch round ([`Node::fetch`]) not completed within this long is reported as
/// failed (its readers answer with what the edge holds).
const FETCH_EXPIRY_MS: u64 = 10_000;

/// A snapshot transfer that grows past this is dropped (and asked for again).
const MAX_TRANSFER_BYTES: usize = 1 << 30;

/// A rebase carries the upstream's retained log up to this size; a longer one is left
/// out and the re-opened channel's history starts at the snapshot.
const MAX_REBASE_LOG_BYTES: usize = 64 << 20;

/// Cuts a sequence of items of the given sizes into consecutive ranges of at most
/// `max_items` items and about `max_bytes` bytes (at least one item per range).
fn batches(
    sizes: impl Iterator<Item = usize>,
    max_items: usize,
    max_bytes: usize,
) -> Vec<std::ops::Range<usize>> {
    let (max_items, max_bytes) = (max_items.max(1), max_bytes.max(1));
    let (mut out, mut start, mut bytes, mut end) = (Vec::new(), 0, 0, 0);
    for (i, b) in sizes.enumerate() {
        if i > start && (i - start >= max_items || bytes + b > max_bytes) {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += b;
        end = i + 1;
    }
    if start < end {
        out.push(start..end);
    }
    out
}

/// Which side this node plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Has at most one upstream (the cloud) and originates ops for its clients.
    Edge,
    /// The hub: persists, acks and forwards ops between edges.
    Cloud,
}

/// Tunables of the state machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncConfig {
    pub replica: ReplicaConfig,
    /// Most ops in one `Ops` frame.
    pub batch_ops: usize,
    /// Most bytes (as [`Op::approx_bytes`] and [`Register::approx_bytes`] count them) in
    /// one `Ops` or snapshot frame; a larger snapshot travels in parts. Keep it well
    /// under the link's frame limit.
    pub batch_bytes: usize,
    /// Edge: channels with unacked local ops stay resident (they are resent and
    /// counted in the outbox). Off for an edge that has no upstream at all.
    pub pin_outbox: bool,
    /// How often the periodic timer fires.
    pub tick_ms: u64,
    /// Unacked local ops are sent again after this long without an ack.
    pub resend_after_ms: u64,
    /// Each subscribed channel is re-synced at least this often.
    pub anti_entropy_ms: u64,
    pub heartbeat_ms: u64,
    /// Remote clocks further ahead than this are not folded into ours.
    pub max_drift_ms: u64,
    /// History kept per channel log (unacked local ops are always kept).
    pub retention: Retention,
    /// Overrides of `retention` per namespace (the part of the name before `:`).
    pub namespace_retention: BTreeMap<String, Retention>,
}

/// How much history a channel keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub max_ops: Option<usize>,
    pub max_age_ms: Option<u64>,
}

impl Retention {
    fn is_unbounded(&self) -> bool {
        self.max_ops.is_none() && self.max_age_ms.is_none()
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            replica: ReplicaConfig::default(),
            batch_ops: 256,
            batch_bytes: DEFAULT_BATCH_BYTES,
            pin_outbox: true,
            tick_ms: 250,
            resend_after_ms: 2_000,
            anti_entropy_ms: 5_000,
            heartbeat_ms: 5_000,
            max_drift_ms: 60_000,
            retention: Retention::default(),
            namespace_retention: BTreeMap::new(),
        }
    }
}

/// What happens to the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A link to `peer` is up and authenticated (the shell did the handshake).
    LinkUp(ReplicaId),
    LinkDown(ReplicaId),
    /// A message arrived from a peer.
    Msg(ReplicaId, SyncMsg),
    /// The deadline from [`Node::poll_timeout`] passed.
    Timeout,
    /// Local subscribers to a channel appeared (`true`) or all left (`false`).
    Interest(ChannelName, bool),
    /// Cloud in a cluster: a record of the shared log (another coordinator's op, or
    /// state it installed from a snapshot), in log order. Applied like a peer's ops or
    /// snapshot (ops buffered until their predecessors are here) and forwarded to
    /// every edge subscribed to the channel; nothing is acked, and the shell does not
    /// queue what it produces for the log again.
    Logged(ChannelName, LogRecord),
}

/// A storage action. See the output contract in the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Persist {
    /// Append an applied op to the channel's log.
    Op { channel: ChannelName, op: Op },
    /// Store the materialized register of a key.
    Register {
        channel: ChannelName,
        key: String,
        register: Register,
    },
    /// Remove keys (collected tombstones).
    RemoveKeys {
        channel: ChannelName,
        keys: Vec<String>,
    },
    /// Ops at or below this vector may be absent from the log.
    Floor {
        channel: ChannelName,
        floor: VersionVector,
    },
    /// Delete compacted ops from the log.
    DropOps {
        channel: ChannelName,
        dots: Vec<Dot>,
    },
    /// The upstream has durably got this node's ops up to `seq`: trim the outbox.
    Acked { channel: ChannelName, seq: u64 },
    /// The upstream lacks this node's ops after `seq` although it had acked them (it
    /// was restored from an older backup): they are unacked again, and resent.
    Unacked { channel: ChannelName, seq: u64 },
    /// Every held channel was compared with this upstream after linking to it: a
    /// later link to the same upstream syncs only the channels in use.
    Upstream { id: ReplicaId },
    /// Edge: the channel now has (`true`) or no longer has (`false`) local ops the
    /// upstream has not acked. Storage keeps the set, so that a restarted edge loads
    /// exactly these channels before its link comes up (the others stay on disk).
    Outbox { channel: ChannelName, pending: bool },
    /// Drop the channel's data and remember that this node wrote its ops up to
    /// `own_seq` there, so that a later write never reuses one of those dots.
    Evict { channel: ChannelName, own_seq: u64 },
    /// An evicted channel got its full state back: forget its [`Persist::Evict`] mark.
    Rebased { channel: ChannelName },
}

/// What the node asks the shell to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Send {
        to: ReplicaId,
        msg: SyncMsg,
    },
    Persist(Persist),
    /// An op applied here, for local subscribers, in causal order.
    Deliver {
        channel: ChannelName,
        op: Op,
    },
    DeliverEphemeral {
        channel: ChannelName,
        msg: Ephemeral,
    },
    /// Concurrent writes met on a key; keep it for the reconciliation report.
    Conflict {
        channel: ChannelName,
        conflict: Conflict,
    },
    /// A snapshot replaced history: subscribers should re-read these keys.
    SnapshotInstalled {
        channel: ChannelName,
        changed: Vec<String>,
        /// The snapshot's version vector: subscribers' tokens jump to at least this.
        vv: VersionVector,
    },
    /// The upstream acknowledged this node's ops up to `seq` (durable in two places).
    Acked {
        channel: ChannelName,
        seq: u64,
    },
    Rtt {
        peer: ReplicaId,
        rtt_ms: u64,
    },
    /// The cloud's operator asked this edge to do something.
    Command(crate::wire::Command),
    /// Fetch rounds ([`Node::fetch`]) of a channel up to `upto` are over: `fresh` if
    /// the channel now holds everything the upstream held when the round was asked;
    /// false if the upstream could not answer (link lost, no answer in time).
    Fetched {
        channel: ChannelName,
        upto: u64,
        fresh: bool,
    },
    /// Something a peer sent was refused; the shell logs it (and may close the link).
    Warn {
        peer: Option<ReplicaId>,
        reason: String,
    },
}

/// What storage kept of one channel, to rebuild a node after a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DurableChannel {
    pub state: BTreeMap<String, Register>,
    /// Retained ops in the order they were applied.
    pub log: Vec<Op>,
    pub floor: VersionVector,
    pub acked: u64,
}

impl DurableChannel {
    /// What the stored channel covers: its floor raised by its log.
    pub fn vv(&self) -> VersionVector {
        let mut vv = self.floor.clone();
        for op in &self.log {
            vv.raise(op.dot.origin, op.dot.seq);
        }
        vv
    }
}

#[derive(Debug)]
struct Chan {
    replica: ChannelReplica,
    /// Local subscribers exist (edge) — the channel is synced live from upstream.
    interest: bool,
    /// Upstream has our ops up to this seq (edge only).
    acked: u64,
    last_sent_ms: u64,
    last_sync_ms: u64,
    /// Re-created after an eviction: holds only what this node wrote since, until the
    /// upstream's snapshot brings back the rest.
    rebase: bool,
    /// Rebases refused because the upstream lacked this node's own evicted ops.
    rebase_refusals: u32,
}

impl Chan {
    fn outbox(&self, me: ReplicaId) -> u64 {
        self.replica.vv().get(me).saturating_sub(self.acked)
    }
}

/// Removes and returns the entries of `map` that `pick` selects, in key order.
pub(crate) fn take_where<K: Ord + Clone, V>(
    map: &mut BTreeMap<K, V>,
    pick: impl Fn(&K, &V) -> bool,
) -> Vec<(K, V)> {
    let keys: Vec<K> = map
        .iter()
        .filter(|(k, v)| pick(k, v))
        .map(|(k, _)| k.clone())
        .collect();
    keys.into_iter()
        .filter_map(|k| map.remove(&k).map(|v| (k, v)))
        .collect()
}

/// What a read on an edge must wait for ([`Node::fetch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchWait {
    /// Answer now: `fresh` if the channel is synced (live, or this is the cloud).
    Now { fresh: bool },
    /// Wait for [`Output::Fetched`] of this channel with `upto` at or past this round.
    Round(u64),
}

/// A fetch under way (edge).
#[derive(Debug)]
struct Fetching {
    asked_ms: u64,
    id: u64,
    /// The upstream's vector in its [`SyncMsg::FetchReply`], once here.
    target: Option<VersionVector>,
    /// The round for readers that came after this one was sent.
    next: Option<u64>,
}

/// What the cloud knows of a connected edge.
#[derive(Debug, Default, Clone)]
pub struct PeerInfo {
    pub interest: BTreeSet<ChannelName>,
    /// The peer's version vector per channel, as last reported.
    pub vvs: BTreeMap<ChannelName, VersionVector>,
    pub rtt_ms: Option<u64>,
    /// The peer's unacked local ops, as it last reported.
    pub outbox: u64,
    /// The peer's connected clients, as it last reported.
    pub clients: u64,
}

/// One replica's replication state machine.
#[derive(Debug)]
pub struct Node {
    me: ReplicaId,
    role: Role,
    config: SyncConfig,
    clock: HlcClock,
    channels: BTreeMap<ChannelName, Chan>,
    peers: BTreeMap<ReplicaId, PeerInfo>,
    out: VecDeque<Output>,
    next_tick: u64,
    last_heartbeat: u64,
    /// Connected clients, as the shell reports them (sent in heartbeats).
    clients: u64,
    /// Evicted channels and this node's last seq in each (edge).
    retired: BTreeMap<ChannelName, u64>,
    /// Snapshot transfers in parts, per sending peer and channel.
    incoming: BTreeMap<(ReplicaId, ChannelName), Transfer>,
    /// The id of this node's last outgoing snapshot transfer.
    next_xfer: u64,
    /// Edge: the upstream that has confirmed, channel by channel, what it holds of
    /// this node's ops. A link to any other (a new cloud, or one restored from a
    /// backup under a new replica id) first compares every held channel.
    confirmed_upstream: Option<ReplicaId>,
    /// Channels still to be compared with a new upstream, with what was acked there
    /// when the link came up.
    reconfirm: BTreeMap<ChannelName, u64>,
    /// Edge: reads waiting for a fetch ([`SyncMsg::Fetch`]).
    fetching: BTreeMap<ChannelName, Fetching>,
    next_fetch: u64,
}

/// The parts of a snapshot transfer received so far.
#[derive(Debug)]
struct Transfer {
    xfer: u64,
    parts: u32,
    /// A part came out of order (or one is missing): the transfer is dropped at its end.
    broken: bool,
    bytes: usize,
    state: Vec<(String, Register)>,
    log: Vec<Op>,
}

impl Node {
    pub fn new(me: ReplicaId, role: Role, config: SyncConfig, now_ms: u64) -> Self {
        let clock = HlcClock::new(config.max_drift_ms);
        Self {
            me,
            role,
            next_tick: now_ms + config.tick_ms,
            config,
            clock,
            channels: BTreeMap::new(),
            peers: BTreeMap::new(),
            out: VecDeque::new(),
            last_heartbeat: now_ms,
            clients: 0,
            retired: BTreeMap::new(),
            incoming: BTreeMap::new(),
            // Distinct across restarts of this node, so a stale part never joins a
            // later transfer.
            next_xfer: now_ms << 16,
            confirmed_upstream: None,
            reconfirm: BTreeMap::new(),
            fetching: BTreeMap::new(),
            // Round ids stay unique across restarts: a coordinator may hold the answer
            // to a round of this node's previous life (a log outage) and send it on
            // the next link, where it must not complete a new round with the same id.
            next_fetch: now_ms.saturating_mul(1_000).max(1),
        }
    }

    /// Rebuilds a node from storage after a restart. `retired` holds the evicted
    /// channels with this node's last seq in each (see [`Persist::Evict`]);
    /// `upstream` the last [`Persist::Upstream`].
    pub fn restore(
        me: ReplicaId,
        role: Role,
        config: SyncConfig,
        channels: BTreeMap<ChannelName, DurableChannel>,
        retired: BTreeMap<ChannelName, u64>,
        upstream: Option<ReplicaId>,
        now_ms: u64,
    ) -> Self {
        let mut node = Self::new(me, role, config, now_ms);
        node.retired = retired;
        node.confirmed_upstream = upstream;
        for (name, d) in channels {
            node.load(name, d);
        }
        node
    }

    /// Makes a stored channel resident. The node holds only resident channels; the
    /// shell must load a stored channel before it feeds any input that names it
    /// (otherwise the node would start an empty channel where a stored one exists).
    /// Loading an already resident channel changes nothing.
    pub fn load(&mut self, name: ChannelName, d: DurableChannel) {
        if self.channels.contains_key(&name) {
            return;
        }
        let max_hlc = d
            .log
            .iter()
            .map(|op| op.hlc)
            .chain(
                d.state
                    .values()
                    .flat_map(|r| r.siblings().iter().map(|s| s.hlc)),
            )
            .max()
            .unwrap_or(Hlc::ZERO);
        // Writes to this channel from now on are stamped after everything in it.
        self.clock.raise(max_hlc);
        let mut replica = ChannelReplica::restore(
            name.clone(),
            self.me,
            self.config.replica.clone(),
            d.state,
            d.log,
            d.floor,
        );
        // Re-created after an eviction and not yet given its full state.
        let rebase = self.retired.contains_key(&name);
        for (key, register) in replica.repair_state() {
            self.out.push_back(Output::Persist(Persist::Register {
                channel: name.clone(),
                key,
                register,
            }));
        }
        self.channels.insert(
            name,
            Chan {
                replica,
                interest: false,
                acked: d.acked,
                last_sent_ms: 0,
                last_sync_ms: 0,
                rebase,
                rebase_refusals: 0,
            },
        );
    }

    /// Whether a resident channel may be unloaded from memory (its data stays
    /// stored): no local interest, nothing unacked (see `pin_outbox`), nothing buffered or
    /// half received, not waiting for its base after an eviction, not being compared
    /// with a new upstream.
    pub fn can_unload(&self, name: &ChannelName) -> bool {
        let Some(c) = self.channels.get(name) else {
            return false;
        };
        let unsent = self.role == Role::Edge && self.config.pin_outbox && c.outbox(self.me) > 0;
        let busy = c.interest
            || unsent
            || c.replica.pending_len() > 0
            || c.rebase
            || self.fetching.contains_key(name)
            || self.reconfirm.contains_key(name)
            || self.incoming.keys().any(|(_, ch)| ch == name);
        !busy
    }

    /// Drops a resident channel from memory if [`Node::can_unload`] allows it.
    /// Unlike [`Node::evict`] this stores nothing: the channel stays on disk as it is.
    pub fn unload(&mut self, name: &ChannelName) -> bool {
        self.can_unload(name) && self.channels.remove(name).is_some()
    }

    /// Whether the channel is resident.
    pub fn is_resident(&self, name: &ChannelName) -> bool {
        self.channels.contains_key(name)
    }

    /// Edge: whether linking to `peer` compares every stored channel (it is not the
    /// upstream that last did), so the shell must load them all first.
    pub fn compares_all_with(&self, peer: ReplicaId) -> bool {
        self.role == Role::Edge && self.confirmed_upstream != Some(peer)
    }

    pub fn id(&self) -> ReplicaId {
        self.me
    }

    /// The shell's count of connected clients, reported to peers in heartbeats.
    pub fn set_clients(&mut self, n: u64) {
        self.clients = n;
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn channel(&self, name: &ChannelName) -> Option<&ChannelReplica> {
        self.channels.get(name).map(|c| &c.replica)
    }

    pub fn channels(&self) -> impl Iterator<Item = &ChannelReplica> {
        self.channels.values().map(|c| &c.replica)
    }

    /// This node's ops in `channel` that the upstream has acked (edge).
    pub fn acked(&self, name: &ChannelName) -> u64 {
        self.channels.get(name).map_or(0, |c| c.acked)
    }

    /// Local ops not yet acked by the upstream, over all channels (edge).
    pub fn outbox_len(&self) -> u64 {
        match self.role {
            Role::Edge => self.channels.values().map(|c| c.outbox(self.me)).sum(),
            Role::Cloud => 0,
        }
    }

    pub fn peers(&self) -> &BTreeMap<ReplicaId, PeerInfo> {
        &self.peers
    }

    /// Ops this node has that `peer` lacks, over the channels the peer subscribes to
    /// (as of the vectors it last reported).
    pub fn peer_lag(&self, peer: ReplicaId) -> u64 {
        let Some(info) = self.peers.get(&peer) else {
            return 0;
        };
        info.interest
            .iter()
            .filter_map(|ch| {
                let mine = self.channels.get(ch)?.replica.vv();
                let theirs = info.vvs.get(ch)?;
                Some(
                    theirs
                        .missing_from(mine)
                        .iter()
                        .map(|(_, r)| r.end() - r.start() + 1)
                        .sum::<u64>(),
                )
            })
            .sum()
    }

    /// The edge's upstream, when linked.
    pub fn upstream(&self) -> Option<ReplicaId> {
        match self.role {
            Role::Edge => self.peers.keys().next().copied(),
            Role::Cloud => None,
        }
    }

    pub fn poll(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When the shell must call `handle(now, Input::Timeout)` next.
    pub fn poll_timeout(&self) -> Option<u64> {
        Some(self.next_tick)
    }

    fn chan(&mut self, name: &ChannelName) -> &mut Chan {
        if !self.channels.contains_key(name) {
            let mut replica =
                ChannelReplica::new(name.clone(), self.me, self.config.replica.clone());
            let own = self.retired.get(name).copied().unwrap_or(0);
            if own > 0 {
                // This node wrote here before it evicted the channel: its next dot
                // continues after the last one, and the rest comes back by snapshot.
                replica.resume_after_eviction(own);
                self.out.push_back(Output::Persist(Persist::Floor {
                    channel: name.clone(),
                    floor: replica.floor().clone(),
                }));
                self.out.push_back(Output::Persist(Persist::Acked {
                    channel: name.clone(),
                    seq: own,
                }));
            }
            self.channels.insert(
                name.clone(),
                Chan {
                    replica,
                    interest: false,
                    acked: own,
                    last_sent_ms: 0,
                    last_sync_ms: 0,
                    rebase: own > 0,
                    rebase_refusals: 0,
                },
            );
        }
        self.channels
            .get_mut(name)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    /// Installs the upstream's base under a channel this edge re-opened after evicting
    /// it, rewriting the stored log in the new order.
    fn rebase(
        &mut self,
        channel: ChannelName,
        snap: &Snapshot,
        floor: &VersionVector,
        log: Vec<Op>,
    ) {
        let me = self.me;
        let outbox_before = self.outbox_of(&channel);
        let c = self.chan(&channel);
        c.rebase = false;
        let old: Vec<Dot> = c.replica.log().map(|op| op.dot).collect();
        // This edge's own earlier ops were behind its floor. If it wrote nothing since
        // the channel was re-opened, local subscribers get them now, in order, with
        // everything else. If it did, subscribers already saw its newer ops: sending
        // the older ones now would break per-origin order, so they are skipped (those
        // subscribers were told their replay was truncated).
        let before = c.replica.vv().clone();
        let own_floor = c.replica.floor().get(me);
        let wrote_since = before.get(me) > own_floor;
        let mut skip = before;
        if !wrote_since {
            skip.set(me, 0);
        }
        let (changed, fresh, new_log) = c.replica.rebase(snap, floor, log);
        let fresh: Vec<Op> = fresh
            .into_iter()
            .filter(|op| !skip.covers(op.dot))
            .collect();
        let floor = c.replica.floor().clone();
        self.retired.remove(&channel);
        let ch = || channel.clone();
        self.out.push_back(Output::Persist(Persist::DropOps {
            channel: ch(),
            dots: old,
        }));
        for op in new_log {
            self.out
                .push_back(Output::Persist(Persist::Op { channel: ch(), op }));
        }
        for (key, register) in &changed {
            self.out.push_back(Output::Persist(Persist::Register {
                channel: ch(),
                key: key.clone(),
                register: register.clone(),
            }));
        }
        self.out.push_back(Output::Persist(Persist::Floor {
            channel: ch(),
            floor: floor.clone(),
        }));
        self.out
            .push_back(Output::Persist(Persist::Rebased { channel: ch() }));
        self.track_outbox(&channel, outbox_before);
        // Subscribers jump over what only the snapshot holds (below the upstream's
        // floor), then get the upstream's retained ops in order.
        let mut jump = skip;
        jump.merge(&floor);
        self.out.push_back(Output::SnapshotInstalled {
            channel: ch(),
            changed: changed.into_iter().map(|(k, _)| k).collect(),
            vv: jump,
        });
        for op in fresh {
            self.out.push_back(Output::Deliver { channel: ch(), op });
        }
    }

    fn send(&mut self, to: ReplicaId, msg: SyncMsg) {
        self.out.push_back(Output::Send { to, msg });
    }

    fn warn(&mut self, peer: Option<ReplicaId>, reason: String) {
        self.out.push_back(Output::Warn { peer, reason });
    }

    /// Accepts a write from a local client. Outputs (persist first) are queued.
    pub fn local(
        &mut self,
        now_ms: u64,
        channel: &ChannelName,
        write: LocalWrite,
    ) -> Result<LocalOutcome, ReplicaError> {
        let hlc = self.clock.now(now_ms);
        let before = self.outbox_of(channel);
        let outcome = self.chan(channel).replica.local(hlc, write)?;
        if let LocalOutcome::Applied(applied) = &outcome {
            self.emit_applied(channel, applied);
            self.track_outbox(channel, before);
            let op = applied.op.clone();
            match self.role {
                Role::Edge => {
                    if let Some(up) = self.upstream() {
                        self.chan(channel).last_sent_ms = now_ms;
                        self.send(
                            up,
                            SyncMsg::Ops {
                                channel: channel.clone(),
                                ops: vec![op],
                            },
                        );
                    }
                }
                Role::Cloud => self.forward(channel, &[op], None),
            }
        }
        Ok(outcome)
    }

    /// Fans an ephemeral message out to local subscribers and, through the link, to
    /// other replicas with subscribers.
    pub fn ephemeral(&mut self, channel: &ChannelName, msg: Ephemeral) {
        self.out.push_back(Output::DeliverEphemeral {
            channel: channel.clone(),
            msg: msg.clone(),
        });
        self.relay_ephemeral(channel, msg, None);
    }

    fn relay_ephemeral(&mut self, channel: &ChannelName, msg: Ephemeral, from: Option<ReplicaId>) {
        let targets: Vec<ReplicaId> = match self.role {
            Role::Edge => self
                .upstream()
                .into_iter()
                .filter(|_| from.is_none())
                .collect(),
            Role::Cloud => self
                .peers
                .iter()
                .filter(|(p, info)| Some(**p) != from && info.interest.contains(channel))
                .map(|(p, _)| *p)
                .collect(),
        };
        for to in targets {
            self.send(
                to,
                SyncMsg::Ephemeral {
                    channel: channel.clone(),
                    msg: msg.clone(),
                },
            );
        }
    }

    /// Whether a channel may be evicted: an edge's channel with no local interest and
    /// nothing left to send.
    pub fn can_evict(&self, channel: &ChannelName) -> bool {
        self.role == Role::Edge
            && self
                .channels
                .get(channel)
                .is_some_and(|c| !c.interest && c.outbox(self.me) == 0)
            && !self.reconfirm.contains_key(channel)
            && !self.fetching.contains_key(channel)
    }

    /// Forgets a channel that [`Node::can_evict`] allows (cache eviction). Returns
    /// false, and keeps it, otherwise.
    /// Evicts a channel if [`Node::can_evict`] allows it; the shell carries out the
    /// [`Persist::Evict`] it queues.
    pub fn evict(&mut self, channel: &ChannelName) -> bool {
        if !self.can_evict(channel) {
            return false;
        }
        if let Some(c) = self.channels.remove(channel) {
            let own = c.replica.vv().get(self.me);
            let r = self.retired.entry(channel.clone()).or_default();
            *r = (*r).max(own);
            let own_seq = *r;
            self.out.push_back(Output::Persist(Persist::Evict {
                channel: channel.clone(),
                own_seq,
            }));
        }
        true
    }

    /// Collects tombstones covered by a causally stable vector (see
    /// [`ChannelReplica::collect_tombstones`]).
    pub fn collect_tombstones(&mut self, channel: &ChannelName, stable: &VersionVector) {
        let Some(c) = self.channels.get_mut(channel) else {
            return;
        };
        let keys = c.replica.collect_tombstones(stable);
        if !keys.is_empty() {
            self.out.push_back(Output::Persist(Persist::RemoveKeys {
                channel: channel.clone(),
                keys,
            }));
        }
    }

    pub fn handle(&mut self, now_ms: u64, input: Input) {
        match input {
            Input::LinkUp(peer) => self.link_up(now_ms, peer),
            Input::LinkDown(peer) => {
                self.peers.remove(&peer);
                self.incoming.retain(|(p, _), _| *p != peer);
                self.fetch_failed(|_| true);
            }
            Input::Msg(peer, msg) => {
                if !self.peers.contains_key(&peer) {
                    self.warn(Some(peer), "message from a peer that is not linked".into());
                    return;
                }
                self.on_msg(now_ms, peer, msg);
            }
            Input::Timeout => {
                if now_ms >= self.next_tick {
                    self.tick(now_ms);
                    self.next_tick = now_ms + self.config.tick_ms;
                }
            }
            Input::Interest(channel, on) => self.interest(now_ms, channel, on),
            Input::Logged(channel, record) => self.on_logged(now_ms, channel, record),
        }
        if !self.fetching.is_empty() {
            self.check_fetched(now_ms);
        }
    }

    /// Edge: a client reads `channel` here without subscribing. Says whether the read
    /// may answer now, or which fetch round it must wait for ([`Output::Fetched`]
    /// with `upto` at or past it): a round's answer reflects everything the upstream
    /// held when that round's [`SyncMsg::Fetch`] was sent, so readers that arrive
    /// while a round is under way wait for the next one (sent when the first is
    /// answered: one request in flight per channel, however many readers).
    pub fn fetch(&mut self, now_ms: u64, channel: &ChannelName) -> FetchWait {
        let up = match self.upstream() {
            Some(up) if self.needs_fetch(channel) => up,
            // The cloud holds everything; a channel with subscribers here is synced
            // live; without an upstream there is nobody to ask.
            up => {
                return FetchWait::Now {
                    fresh: self.role == Role::Cloud || up.is_some(),
                }
            }
        };
        if let Some(f) = self.fetching.get_mut(channel) {
            let next = *f.next.get_or_insert(self.next_fetch);
            if next == self.next_fetch {
                self.next_fetch += 1;
            }
            return FetchWait::Round(next);
        }
        let id = self.next_fetch;
        self.next_fetch += 1;
        self.send_fetch(now_ms, up, channel, id);
        FetchWait::Round(id)
    }

    /// Whether a read of `channel` here would wait for a fetch round (an edge with an
    /// upstream, and no subscribers here keeping the channel synced live).
    pub fn needs_fetch(&self, channel: &ChannelName) -> bool {
        self.role == Role::Edge
            && self.upstream().is_some()
            && !self.channels.get(channel).is_some_and(|c| c.interest)
    }

    fn send_fetch(&mut self, now_ms: u64, up: ReplicaId, channel: &ChannelName, id: u64) {
        let c = self.chan(channel);
        let msg = SyncMsg::Fetch {
            channel: channel.clone(),
            vv: c.replica.vv().clone(),
            id,
            full: c.rebase,
        };
        self.fetching.insert(
            channel.clone(),
            Fetching {
                asked_ms: now_ms,
                id,
                target: None,
                next: None,
            },
        );
        self.send(up, msg);
    }

    /// Rounds whose channel now holds everything the upstream's answer reported; the
    /// next round of each goes out.
    fn check_fetched(&mut self, now_ms: u64) {
        let channels = &self.channels;
        let done = take_where(&mut self.fetching, |name, f| {
            f.target.as_ref().is_some_and(|t| {
                channels
                    .get(name)
                    .is_some_and(|c| c.replica.vv().dominates(t))
            })
        });
        for (channel, f) in done {
            self.out.push_back(Output::Fetched {
                channel: channel.clone(),
                upto: f.id,
                fresh: true,
            });
            if let (Some(next), Some(up)) = (f.next, self.upstream()) {
                self.send_fetch(now_ms, up, &channel, next);
            }
        }
    }

    /// Ends the fetches `which` selects without an answer (their next rounds too).
    fn fetch_failed(&mut self, which: impl Fn(&Fetching) -> bool) {
        for (channel, f) in take_where(&mut self.fetching, |_, f| which(f)) {
            self.out.push_back(Output::Fetched {
                channel,
                upto: f.next.unwrap_or(f.id),
                fresh: false,
            });
        }
    }

    fn on_logged(&mut self, now_ms: u64, channel: ChannelName, record: LogRecord) {
        if self.role != Role::Cloud {
            self.warn(None, "shared-log records reach coordinators only".into());
            return;
        }
        let ops = match record {
            LogRecord::Op(op) => vec![op],
            LogRecord::State(snapshot) => return self.install(None, channel, &snapshot),
        };
        let applied = self.receive_all(now_ms, None, &channel, ops);
        for a in &applied {
            self.emit_applied(&channel, a);
        }
        let ops: Vec<Op> = applied.into_iter().map(|a| a.op).collect();
        self.forward(&channel, &ops, None);
    }

    /// Hands ops from `from` (a peer, or the shared log) to the channel's replica;
    /// returns what got applied, in order.
    fn receive_all(
        &mut self,
        now_ms: u64,
        from: Option<ReplicaId>,
        channel: &ChannelName,
        ops: Vec<Op>,
    ) -> Vec<Applied> {
        let mut applied_all = Vec::new();
        for op in ops {
            if let Err(e) = self.clock.observe(op.hlc, now_ms) {
                self.warn(from, e.to_string());
            }
            match self.chan(channel).replica.receive(op) {
                Ok(applied) => applied_all.extend(applied),
                Err(e) => self.warn(from, format!("{channel}: {e}")),
            }
        }
        applied_all
    }

    fn link_up(&mut self, now_ms: u64, peer: ReplicaId) {
        if self.role == Role::Edge {
            // An edge has one upstream; a new one replaces the old.
            self.peers.clear();
        }
        self.peers.insert(peer, PeerInfo::default());
        if self.role == Role::Edge {
            // A new upstream: answers to fetches sent to the old one will not come.
            self.fetch_failed(|_| true);
            let me = self.me;
            // A new upstream compares every channel: it may lack ops this edge holds
            // (its own acked ones included, if it was restored from a backup).
            let fresh = self.compares_all_with(peer);
            let wanted: Vec<ChannelName> = self
                .channels
                .iter()
                .filter(|(_, c)| fresh || c.interest || c.outbox(me) > 0)
                .map(|(n, _)| n.clone())
                .collect();
            self.reconfirm.clear();
            if fresh {
                self.reconfirm = wanted
                    .iter()
                    .filter_map(|n| Some((n.clone(), self.channels.get(n)?.acked)))
                    .collect();
                if self.reconfirm.is_empty() {
                    self.confirm_upstream(peer);
                }
            }
            for name in wanted {
                self.sync_up(now_ms, peer, &name);
            }
        }
    }

    /// Answers a peer's vector for a channel with what it lacks: the ops after it, or
    /// for a `full` request (the peer evicted the channel and opened it again) the
    /// state, floor and retained log first.
    fn send_lacking(
        &mut self,
        peer: ReplicaId,
        channel: &ChannelName,
        vv: &VersionVector,
        full: bool,
    ) {
        if !full {
            self.send_missing(peer, channel, vv);
            return;
        }
        let r = &self.chan(channel).replica;
        let snapshot = r.snapshot();
        // The retained log rides along (in parts when large) unless it is huge; then
        // the peer's history starts at the snapshot.
        let log_bytes: usize = r.log().map(Op::approx_bytes).sum();
        let base = if log_bytes <= MAX_REBASE_LOG_BYTES {
            RebaseBase {
                floor: r.floor().clone(),
                log: r.log().cloned().collect(),
            }
        } else {
            RebaseBase {
                floor: snapshot.vv.clone(),
                log: Vec::new(),
            }
        };
        let mut after = vv.clone();
        after.merge(&snapshot.vv);
        self.send_snapshot(peer, channel, snapshot, Some(base));
        self.send_missing(peer, channel, &after);
    }

    /// Edge: asks the upstream for what this node lacks and tells it what it has.
    fn sync_up(&mut self, now_ms: u64, up: ReplicaId, name: &ChannelName) {
        let c = self.chan(name);
        c.last_sync_ms = now_ms;
        let msg = SyncMsg::Sync {
            channel: name.clone(),
            vv: c.replica.vv().clone(),
            subscribe: c.interest,
            reply: true,
            full: c.rebase,
        };
        self.send(up, msg);
    }

    fn interest(&mut self, now_ms: u64, channel: ChannelName, on: bool) {
        let c = self.chan(&channel);
        if c.interest == on {
            return;
        }
        c.interest = on;
        if let Some(up) = self.upstream() {
            if on {
                self.sync_up(now_ms, up, &channel);
            } else {
                self.send(up, SyncMsg::Unsubscribe { channel });
            }
        }
    }

    fn on_msg(&mut self, now_ms: u64, peer: ReplicaId, msg: SyncMsg) {
        match msg {
            SyncMsg::Sync {
                channel,
                vv,
                subscribe,
                reply,
                full,
            } => {
                if self.role == Role::Edge && !self.channels.contains_key(&channel) {
                    return;
                }
                if let Some(info) = self.peers.get_mut(&peer) {
                    if subscribe {
                        info.interest.insert(channel.clone());
                    }
                    info.vvs.insert(channel.clone(), vv.clone());
                }
                self.on_ack(&channel, &vv);
                if self.role == Role::Cloud {
                    let me = self.me;
                    let mine = self.chan(&channel).replica.vv().get(me);
                    if vv.get(me) > mine {
                        self.warn(
                            Some(peer),
                            format!("{channel}: the peer holds this node's own ops up to seq {} but this node only {mine}: was its data dir copied back from a backup? (`outpost import` gives a restored node a new replica id)", vv.get(me)),
                        );
                    }
                }
                if self.role == Role::Edge {
                    if let Some(at_link_up) = self.reconfirm.remove(&channel) {
                        self.reconfirmed(peer, &channel, &vv, at_link_up);
                    }
                }
                self.send_lacking(peer, &channel, &vv, full);
                if reply {
                    let mine = self.chan(&channel).replica.vv().clone();
                    self.send(
                        peer,
                        SyncMsg::Sync {
                            channel,
                            vv: mine,
                            subscribe: false,
                            reply: false,
                            full: false,
                        },
                    );
                }
            }
            SyncMsg::Fetch {
                channel,
                vv,
                id,
                full,
            } => {
                if self.role != Role::Cloud {
                    self.warn(Some(peer), "a fetch reached an edge".into());
                    return;
                }
                if let Some(info) = self.peers.get_mut(&peer) {
                    info.vvs.insert(channel.clone(), vv.clone());
                }
                self.send_lacking(peer, &channel, &vv, full);
                let mine = self.chan(&channel).replica.vv().clone();
                self.send(
                    peer,
                    SyncMsg::FetchReply {
                        channel,
                        vv: mine,
                        id,
                    },
                );
            }
            SyncMsg::FetchReply { channel, vv, id } => {
                if let Some(f) = self.fetching.get_mut(&channel).filter(|f| f.id == id) {
                    f.target = Some(vv);
                }
            }
            SyncMsg::Ops { channel, ops } => self.on_ops(now_ms, peer, channel, ops),
            SyncMsg::Ack { channel, vv } => self.on_ack(&channel, &vv),
            SyncMsg::Rebase {
                channel,
                snapshot,
                floor,
                log,
            } => self.on_rebase(channel, &snapshot, &floor, log),
            SyncMsg::Snapshot { channel, snapshot } => self.on_snapshot(peer, channel, &snapshot),
            SyncMsg::SnapshotPart {
                channel,
                xfer,
                part,
                state,
                log,
            } => self.on_snapshot_part(peer, channel, (xfer, part), state, log),
            SyncMsg::SnapshotEnd {
                channel,
                xfer,
                parts,
                vv,
                rebase,
            } => {
                // A transfer that lost a part (or got them out of order) is dropped
                // whole: its vector would claim state this node lacks. Over QUIC that
                // takes a part the writer could not send; anti-entropy and resends
                // ask again either way.
                let Some(t) = self.incoming.remove(&(peer, channel.clone())) else {
                    return;
                };
                if t.xfer != xfer || t.parts != parts || t.broken {
                    return;
                }
                let state = t.state.into_iter().collect();
                let snapshot = Snapshot { vv, state };
                match rebase {
                    None => self.on_snapshot(peer, channel, &snapshot),
                    Some(b) => {
                        let mut log = t.log;
                        log.extend(b.log);
                        self.on_rebase(channel, &snapshot, &b.floor, log)
                    }
                }
            }
            SyncMsg::Unsubscribe { channel } => {
                if let Some(info) = self.peers.get_mut(&peer) {
                    info.interest.remove(&channel);
                }
            }
            SyncMsg::Ephemeral { channel, msg } => {
                self.out.push_back(Output::DeliverEphemeral {
                    channel: channel.clone(),
                    msg: msg.clone(),
                });
                if self.role == Role::Cloud {
                    self.relay_ephemeral(&channel, msg, Some(peer));
                }
            }
            SyncMsg::Heartbeat {
                sent_ms,
                outbox,
                clients,
            } => {
                if let Some(info) = self.peers.get_mut(&peer) {
                    info.outbox = outbox;
                    info.clients = clients;
                }
                self.send(peer, SyncMsg::HeartbeatAck { sent_ms })
            }
            SyncMsg::HeartbeatAck { sent_ms } => {
                let rtt_ms = now_ms.saturating_sub(sent_ms);
                if let Some(info) = self.peers.get_mut(&peer) {
                    info.rtt_ms = Some(rtt_ms);
                }
                self.out.push_back(Output::Rtt { peer, rtt_ms });
            }
            SyncMsg::Command(cmd) => {
                if self.role == Role::Edge {
                    self.out.push_back(Output::Command(cmd));
                } else {
                    self.warn(Some(peer), "an edge sent an operator command".into());
                }
            }
        }
    }

    /// Merges a peer's snapshot of a channel (whole, or assembled from its parts).
    fn on_snapshot(&mut self, peer: ReplicaId, channel: ChannelName, snapshot: &Snapshot) {
        if self.role == Role::Edge && !self.channels.contains_key(&channel) {
            return;
        }
        self.install(Some(peer), channel, snapshot);
    }

    /// Merges a snapshot from `from` (a peer, or the shared log) into the channel.
    fn install(&mut self, from: Option<ReplicaId>, channel: ChannelName, snapshot: &Snapshot) {
        let (changed, applied) = self.chan(&channel).replica.install_snapshot(snapshot);
        let floor = self.chan(&channel).replica.floor().clone();
        for (key, register) in &changed {
            self.out.push_back(Output::Persist(Persist::Register {
                channel: channel.clone(),
                key: key.clone(),
                register: register.clone(),
            }));
        }
        self.out.push_back(Output::Persist(Persist::Floor {
            channel: channel.clone(),
            floor,
        }));
        self.out.push_back(Output::SnapshotInstalled {
            channel: channel.clone(),
            changed: changed.into_iter().map(|(k, _)| k).collect(),
            vv: snapshot.vv.clone(),
        });
        for a in &applied {
            self.emit_applied(&channel, a);
        }
        if self.role == Role::Cloud {
            let ops: Vec<Op> = applied.into_iter().map(|a| a.op).collect();
            self.forward(&channel, &ops, from);
            // An edge sends a snapshot when it cannot send the ops themselves (it
            // compacted some it must resend, e.g. to a new upstream that lacks them):
            // it is acked like ops, or its outbox would never drain.
            if let Some(peer) = from {
                let vv = self.chan(&channel).replica.vv().clone();
                self.send(peer, SyncMsg::Ack { channel, vv });
            }
        }
    }

    /// Edge: the upstream's base for a channel this edge re-opened after evicting it.
    fn on_rebase(
        &mut self,
        channel: ChannelName,
        snapshot: &Snapshot,
        floor: &VersionVector,
        log: Vec<Op>,
    ) {
        if self.role != Role::Edge || !self.channels.get(&channel).is_some_and(|c| c.rebase) {
            return;
        }
        // The base must hold this edge's own ops from before the eviction (they were
        // acked, so the upstream has them — unless it has not caught up yet, like a
        // coordinator still reading the shared log): a base without them would leave
        // their effects out of the state while the vector claims them. Ask again at
        // the next sync; after a few refusals accept it (an upstream restored from an
        // older backup may never have them).
        let me = self.me;
        let c = self.chan(&channel);
        let own_floor = c.replica.floor().get(me);
        if snapshot.vv.get(me) < own_floor && c.rebase_refusals < MAX_REBASE_REFUSALS {
            c.rebase_refusals += 1;
            self.warn(
                None,
                format!("{channel}: the upstream's base lacks this edge's own ops up to seq {own_floor} (not caught up yet?); asking again"),
            );
            return;
        }
        self.rebase(channel, snapshot, floor, log);
    }

    /// Gathers one part of a snapshot transfer (see [`SyncMsg::SnapshotPart`]).
    fn on_snapshot_part(
        &mut self,
        peer: ReplicaId,
        channel: ChannelName,
        (xfer, part): (u64, u32),
        state: Vec<(String, Register)>,
        log: Vec<Op>,
    ) {
        let key = (peer, channel);
        let fresh = || Transfer {
            xfer,
            parts: 0,
            broken: false,
            bytes: 0,
            state: Vec::new(),
            log: Vec::new(),
        };
        let t = self.incoming.entry(key.clone()).or_insert_with(fresh);
        if t.xfer != xfer {
            // A newer transfer replaces one whose end never came.
            *t = fresh();
        }
        // The log's order matters: parts must come in order.
        t.broken |= part != t.parts;
        t.parts = t.parts.saturating_add(1);
        t.bytes += state
            .iter()
            .map(|(k, r)| r.entry_bytes(k))
            .chain(log.iter().map(Op::approx_bytes))
            .sum::<usize>();
        t.state.extend(state);
        t.log.extend(log);
        if t.bytes > MAX_TRANSFER_BYTES {
            self.incoming.remove(&key);
            self.warn(
                Some(peer),
                format!(
                    "{}: snapshot transfer {xfer} exceeds {MAX_TRANSFER_BYTES} bytes, dropped",
                    key.1
                ),
            );
        }
    }

    fn on_ops(&mut self, now_ms: u64, peer: ReplicaId, channel: ChannelName, ops: Vec<Op>) {
        if self.role == Role::Edge && !self.channels.contains_key(&channel) {
            return;
        }
        let applied_all = self.receive_all(now_ms, Some(peer), &channel, ops);
        for a in &applied_all {
            self.emit_applied(&channel, a);
        }
        if self.role == Role::Cloud {
            let ops: Vec<Op> = applied_all.into_iter().map(|a| a.op).collect();
            self.forward(&channel, &ops, Some(peer));
            let vv = self.chan(&channel).replica.vv().clone();
            self.send(peer, SyncMsg::Ack { channel, vv });
        }
    }

    /// Edge: a new upstream told its vector for a channel. Ops of this node that it
    /// lacks are unacked again (and resent), even if an earlier upstream acked them.
    /// (Only while nothing was acked on this link since it came up: the vector answers
    /// the sync sent then, and a later ack may overtake it on a reordering link.)
    fn reconfirmed(
        &mut self,
        peer: ReplicaId,
        channel: &ChannelName,
        vv: &VersionVector,
        at_link_up: u64,
    ) {
        let me = self.me;
        let before = self.outbox_of(channel);
        if let Some(c) = self.channels.get_mut(channel) {
            let theirs = vv.get(me);
            if theirs < c.acked && c.acked == at_link_up {
                c.acked = theirs;
                c.last_sent_ms = 0;
                self.out.push_back(Output::Persist(Persist::Unacked {
                    channel: channel.clone(),
                    seq: theirs,
                }));
                self.warn(
                    Some(peer),
                    format!("{channel}: the upstream lacks this edge's acked ops after seq {theirs} (restored from a backup?); sending them again"),
                );
                self.track_outbox(channel, before);
            }
        }
        if self.reconfirm.is_empty() {
            self.confirm_upstream(peer);
        }
    }

    fn confirm_upstream(&mut self, peer: ReplicaId) {
        self.confirmed_upstream = Some(peer);
        self.out
            .push_back(Output::Persist(Persist::Upstream { id: peer }));
    }

    /// This node's unacked ops in a channel (edge).
    fn outbox_of(&self, channel: &ChannelName) -> u64 {
        self.channels.get(channel).map_or(0, |c| c.outbox(self.me))
    }

    /// Edge: stores the change when a channel's outbox became empty or non-empty.
    fn track_outbox(&mut self, channel: &ChannelName, before: u64) {
        if self.role != Role::Edge {
            return;
        }
        let after = self.outbox_of(channel);
        if (before > 0) != (after > 0) {
            self.out.push_back(Output::Persist(Persist::Outbox {
                channel: channel.clone(),
                pending: after > 0,
            }));
        }
    }

    /// Edge: the upstream has everything in `vv`; trims the outbox.
    fn on_ack(&mut self, channel: &ChannelName, vv: &VersionVector) {
        if self.role != Role::Edge {
            return;
        }
        let me = self.me;
        let before = self.outbox_of(channel);
        let Some(c) = self.channels.get_mut(channel) else {
            return;
        };
        let seq = vv.get(me).min(c.replica.vv().get(me));
        if seq > c.acked {
            c.acked = seq;
            self.out.push_back(Output::Persist(Persist::Acked {
                channel: channel.clone(),
                seq,
            }));
            self.out.push_back(Output::Acked {
                channel: channel.clone(),
                seq,
            });
            self.track_outbox(channel, before);
        }
    }

    fn emit_applied(&mut self, channel: &ChannelName, a: &Applied) {
        self.out.push_back(Output::Persist(Persist::Op {
            channel: channel.clone(),
            op: a.op.clone(),
        }));
        if let Some((key, register)) = &a.register {
            self.out.push_back(Output::Persist(Persist::Register {
                channel: channel.clone(),
                key: key.clone(),
                register: register.clone(),
            }));
        }
        self.out.push_back(Output::Deliver {
            channel: channel.clone(),
            op: a.op.clone(),
        });
        if let Some(conflict) = &a.conflict {
            self.out.push_back(Output::Conflict {
                channel: channel.clone(),
                conflict: conflict.clone(),
            });
        }
    }

    /// Cloud: sends newly applied ops to every other peer subscribed to the channel.
    fn forward(&mut self, channel: &ChannelName, ops: &[Op], from: Option<ReplicaId>) {
        if ops.is_empty() {
            return;
        }
        let targets: Vec<ReplicaId> = self
            .peers
            .iter()
            .filter(|(p, info)| Some(**p) != from && info.interest.contains(channel))
            .map(|(p, _)| *p)
            .collect();
        for to in targets {
            self.send_ops(to, channel, ops);
        }
    }

    /// Sends ops in `Ops` frames of at most `batch_ops` ops and about `batch_bytes`
    /// bytes each.
    fn send_ops(&mut self, to: ReplicaId, channel: &ChannelName, ops: &[Op]) {
        let sizes = ops.iter().map(Op::approx_bytes);
        for r in batches(sizes, self.config.batch_ops, self.config.batch_bytes) {
            self.send(
                to,
                SyncMsg::Ops {
                    channel: channel.clone(),
                    ops: ops[r].to_vec(),
                },
            );
        }
    }

    /// Sends a snapshot (with a rebase's floor and log), in parts of about
    /// `batch_bytes` — registers first, then the log's ops — when it is larger.
    fn send_snapshot(
        &mut self,
        to: ReplicaId,
        channel: &ChannelName,
        snapshot: Snapshot,
        rebase: Option<RebaseBase>,
    ) {
        let budget = self.config.batch_bytes;
        let state_bytes: usize = snapshot.state.iter().map(|(k, r)| r.entry_bytes(k)).sum();
        let log_bytes: usize = rebase
            .as_ref()
            .map_or(0, |b| b.log.iter().map(Op::approx_bytes).sum());
        if state_bytes + log_bytes <= budget.max(1) {
            let channel = channel.clone();
            let msg = match rebase {
                None => SyncMsg::Snapshot { channel, snapshot },
                Some(b) => SyncMsg::Rebase {
                    channel,
                    snapshot,
                    floor: b.floor,
                    log: b.log,
                },
            };
            self.send(to, msg);
            return;
        }
        self.next_xfer += 1;
        let xfer = self.next_xfer;
        let state: Vec<(String, Register)> = snapshot.state.into_iter().collect();
        let (log, rebase) = match rebase {
            Some(b) => (
                b.log,
                Some(RebaseBase {
                    floor: b.floor,
                    log: Vec::new(),
                }),
            ),
            None => (Vec::new(), None),
        };
        let state_parts = batches(
            state.iter().map(|(k, r)| r.entry_bytes(k)),
            usize::MAX,
            budget,
        );
        let log_parts = batches(log.iter().map(Op::approx_bytes), usize::MAX, budget);
        // The ranges are consecutive from 0: each part takes its items off the front.
        let (mut state, mut log) = (state.into_iter(), log.into_iter());
        let parts: Vec<_> = state_parts
            .into_iter()
            .map(|r| (state.by_ref().take(r.len()).collect(), Vec::new()))
            .chain(
                log_parts
                    .into_iter()
                    .map(|r| (Vec::new(), log.by_ref().take(r.len()).collect())),
            )
            .collect();
        let mut sent = 0u32;
        for (state, log) in parts {
            self.send(
                to,
                SyncMsg::SnapshotPart {
                    channel: channel.clone(),
                    xfer,
                    part: sent,
                    state,
                    log,
                },
            );
            sent += 1;
        }
        self.send(
            to,
            SyncMsg::SnapshotEnd {
                channel: channel.clone(),
                xfer,
                parts: sent,
                vv: snapshot.vv,
                rebase,
            },
        );
    }

    /// Sends `to` what it lacks relative to `since`: ops, or a snapshot.
    fn send_missing(&mut self, to: ReplicaId, channel: &ChannelName, since: &VersionVector) {
        let c = self.chan(channel);
        if c.rebase {
            // Re-created after an eviction, not rebased yet: the state holds only what
            // this node wrote since, so a snapshot of it would claim ops whose effects
            // it lacks. Send the ops it has; a peer that lacks the older ones (the
            // upstream has them, or gets them: it acked them) buffers these meanwhile.
            let mut have = since.clone();
            have.merge(c.replica.floor());
            if let Ok(ops) = c.replica.ops_since(&have, usize::MAX) {
                return self.send_ops(to, channel, &ops);
            }
        }
        let c = self.chan(channel);
        match c.replica.ops_since(since, usize::MAX) {
            Ok(ops) => self.send_ops(to, channel, &ops),
            Err(_) => {
                let snapshot = c.replica.snapshot();
                self.send_snapshot(to, channel, snapshot, None);
            }
        }
    }

    fn tick(&mut self, now_ms: u64) {
        let me = self.me;
        // A fetch the upstream never completed (its ops lost with a link that stayed
        // up, say): readers are told after FETCH_EXPIRY_MS; anti-entropy repairs later.
        self.fetch_failed(|f| now_ms.saturating_sub(f.asked_ms) >= FETCH_EXPIRY_MS);
        let heartbeat = now_ms.saturating_sub(self.last_heartbeat) >= self.config.heartbeat_ms;
        if heartbeat {
            self.last_heartbeat = now_ms;
            let peers: Vec<ReplicaId> = self.peers.keys().copied().collect();
            let outbox = self.outbox_len();
            let clients = self.clients;
            for p in peers {
                self.send(
                    p,
                    SyncMsg::Heartbeat {
                        sent_ms: now_ms,
                        outbox,
                        clients,
                    },
                );
            }
        }
        if let Some(up) = self.upstream() {
            let names: Vec<ChannelName> = self.channels.keys().cloned().collect();
            for name in names {
                let (cfg_resend, cfg_ae) =
                    (self.config.resend_after_ms, self.config.anti_entropy_ms);
                let c = self.chan(&name);
                let resend =
                    c.outbox(me) > 0 && now_ms.saturating_sub(c.last_sent_ms) >= cfg_resend;
                let resync = c.interest
                    && (c.replica.pending_len() > 0
                        || now_ms.saturating_sub(c.last_sync_ms) >= cfg_ae);
                if resend {
                    c.last_sent_ms = now_ms;
                    let mut since = c.replica.vv().clone();
                    since.set(me, c.acked);
                    self.send_missing(up, &name, &since);
                }
                if resync {
                    self.sync_up(now_ms, up, &name);
                }
            }
        }
        let names: Vec<ChannelName> = self.channels.keys().cloned().collect();
        for name in names {
            let policy = self
                .config
                .namespace_retention
                .get(name.namespace())
                .unwrap_or(&self.config.retention)
                .clone();
            if policy.is_unbounded() {
                continue;
            }
            let role = self.role;
            let c = self.chan(&name);
            let keep = (role == Role::Edge).then(|| {
                let mut k = c.replica.vv().clone();
                k.set(me, c.acked);
                k
            });
            let min_wall = policy.max_age_ms.map(|age| now_ms.saturating_sub(age));
            let dots = c.replica.compact(policy.max_ops, min_wall, keep.as_ref());
            if !dots.is_empty() {
                let floor = c.replica.floor().clone();
                self.out.push_back(Output::Persist(Persist::DropOps {
                    channel: name.clone(),
                    dots,
                }));
                self.out.push_back(Output::Persist(Persist::Floor {
                    channel: name,
                    floor,
                }));
            }
        }
    }
}
