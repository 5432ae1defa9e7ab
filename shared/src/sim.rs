//! A seeded, deterministic simulator: one cloud and N edges running the real
//! [`Node`] state machine over an emulated network with loss, duplication, reordering,
//! partitions and crash-restart (what was persisted survives, memory does not), driven
//! by random client ops. After healing it checks convergence and that nothing acked
//! was lost, and it checks per-origin and causal delivery order all along.
//!
//! Everything random comes from one seed, so `SEED=n` replays a failure exactly.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::convert::Infallible;
use std::fmt;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::ids::{ChannelName, Dot, ReplicaId};
use crate::op::{Op, Payload};
use crate::replica::{LocalOutcome, LocalWrite};
use crate::state::Register;
use crate::store::{MemStore, Store};
use crate::sync::{DurableChannel, Input, Node, Output, Persist, Role, SyncConfig};
use crate::vv::VersionVector;
use crate::wire::SyncMsg;

/// Knobs of one simulation run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub edges: usize,
    pub channels: usize,
    pub keys: usize,
    /// Steps of 10 ms with faults before the network heals.
    pub steps: usize,
    /// Probability that a client op happens in a step.
    pub op_rate: f64,
    pub loss: f64,
    pub duplicate: f64,
    pub max_delay_ms: u64,
    /// Per-step probability of cutting or healing one edge's link.
    pub partition_rate: f64,
    /// Per-step probability of crashing one node (it restarts some steps later).
    pub crash_rate: f64,
    /// Per-step probability that an edge drops or regains interest in a channel.
    pub interest_flap_rate: f64,
    /// Per step: an edge tries to evict a channel it holds without subscribers.
    pub evict_rate: f64,
    /// Per step: a node tries to unload a resident channel from memory (it stays on
    /// its disk and is loaded again before the next input that names it).
    pub unload_rate: f64,
    pub sync: SyncConfig,
}

impl SimConfig {
    /// A configuration derived from the seed alone: fault rates and sizes vary by seed.
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_0f0a_7510_5700);
        let mut sync = SyncConfig {
            tick_ms: 100,
            resend_after_ms: 500,
            anti_entropy_ms: 1_000,
            heartbeat_ms: 1_000,
            ..SyncConfig::default()
        };
        sync.replica.sibling_cap = rng.random_range(2..=4);
        sync.batch_ops = rng.random_range(1..=16);
        if rng.random_bool(0.3) {
            sync.retention.max_ops = Some(rng.random_range(5..=40));
        }
        if rng.random_bool(0.1) {
            sync.retention.max_age_ms = Some(rng.random_range(500..=3_000));
        }
        // Half the seeds batch by bytes so tightly that most `Ops` frames are cut by
        // size and most snapshots travel in parts.
        if rng.random_bool(0.5) {
            sync.batch_bytes = rng.random_range(100..=600);
        }
        Self {
            seed,
            edges: rng.random_range(2..=4),
            channels: rng.random_range(1..=3),
            keys: rng.random_range(1..=4),
            steps: rng.random_range(300..=900),
            op_rate: rng.random_range(0.1..0.5),
            loss: rng.random_range(0.0..0.2),
            duplicate: rng.random_range(0.0..0.1),
            max_delay_ms: rng.random_range(1..=80),
            partition_rate: rng.random_range(0.0..0.03),
            crash_rate: rng.random_range(0.0..0.01),
            interest_flap_rate: rng.random_range(0.0..0.01),
            evict_rate: if rng.random_bool(0.5) {
                rng.random_range(0.0..0.05)
            } else {
                0.0
            },
            unload_rate: if rng.random_bool(0.5) {
                rng.random_range(0.05..0.5)
            } else {
                0.0
            },
            sync,
        }
    }
}

/// The in-memory store cannot fail.
fn infallible<T>(r: Result<T, Infallible>) -> T {
    r.unwrap_or_else(|e| match e {})
}

/// What a run did, for the caller to print or aggregate.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    pub acked_ops: usize,
    pub deliveries: usize,
    pub conflicts: usize,
    pub snapshots: usize,
    /// Snapshot frames sent in parts (a snapshot larger than `batch_bytes`).
    pub snapshot_parts: usize,
    pub messages: usize,
    pub dropped: usize,
    pub crashes: usize,
    /// Crashes that lost the newest register write but kept its op.
    pub torn_writes: usize,
    /// Channels edges evicted (and later re-created).
    pub evictions: usize,
    /// Channels unloaded from memory, and loaded again from disk.
    pub unloads: usize,
    pub loads: usize,
    pub partitions: usize,
    pub converged_after_ms: u64,
}

/// A run that broke an invariant.
#[derive(Clone, Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub violations: Vec<String>,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "simulation failed; replay with SEED={} ({} violations):",
            self.seed,
            self.violations.len()
        )?;
        for v in self.violations.iter().take(20) {
            writeln!(f, "  - {v}")?;
        }
        Ok(())
    }
}

struct SimNode {
    id: ReplicaId,
    role: Role,
    node: Option<Node>,
    /// Its disk: the same storage seam the shells use, in memory.
    store: MemStore,
    /// The register the last storage write replaced, while that write is the newest: a
    /// crash may lose it (storage keeps a prefix of its writes; an op's log entry is
    /// written before its register).
    torn: Option<(ChannelName, String, Option<Register>)>,
    /// What this node's subscribers have been delivered, per channel.
    delivered: BTreeMap<ChannelName, VersionVector>,
    /// Channels re-opened after an eviction: their first delivery from this node's own
    /// origin may skip ahead (the subscriber was told its replay is truncated).
    truncated_start: BTreeSet<ChannelName>,
    /// Channels this node's clients subscribe to (edge interest).
    subscribed: BTreeSet<ChannelName>,
    restart_at: Option<u64>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: u64,
    n: u64,
    from: usize,
    to: usize,
    epoch: u64,
    msg: SyncMsgOrd,
}

/// `SyncMsg` is not `Ord`; in-flight messages are ordered by (at, n) only.
struct SyncMsgOrd(SyncMsg);
impl PartialEq for SyncMsgOrd {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for SyncMsgOrd {}
impl PartialOrd for SyncMsgOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for SyncMsgOrd {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

/// The simulated world. Node 0 is the cloud; nodes 1..=N are edges.
#[allow(missing_debug_implementations)]
pub struct Sim {
    cfg: SimConfig,
    rng: SmallRng,
    now: u64,
    nodes: Vec<SimNode>,
    /// Per edge: is its link to the cloud administratively up, and its epoch.
    link_up: Vec<bool>,
    epoch: Vec<u64>,
    net: BinaryHeap<Reverse<InFlight>>,
    n: u64,
    channels: Vec<ChannelName>,
    /// Every op a client was told is durable, by (channel, dot).
    acked: BTreeMap<(ChannelName, Dot), Op>,
    violations: Vec<String>,
    report: SimReport,
    faults: bool,
}

fn rid(i: usize) -> ReplicaId {
    ReplicaId::new(0x100 + i as u64).expect("0x100 + i is never 0")
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Self {
        let rng = SmallRng::seed_from_u64(cfg.seed);
        let channels: Vec<ChannelName> = (0..cfg.channels)
            .filter_map(|i| ChannelName::new(format!("project:{i}")).ok())
            .collect();
        let mut nodes = Vec::new();
        for i in 0..=cfg.edges {
            let role = if i == 0 { Role::Cloud } else { Role::Edge };
            let id = rid(i);
            nodes.push(SimNode {
                id,
                role,
                node: Some(Node::new(id, role, cfg.sync.clone(), 0)),
                store: MemStore::default(),
                truncated_start: BTreeSet::new(),
                torn: None,
                delivered: BTreeMap::new(),
                subscribed: BTreeSet::new(),
                restart_at: None,
            });
        }
        let edges = cfg.edges;
        let mut rng = rng;
        // Edges subscribe to most channels; a channel without local subscribers is
        // still written to (a backend publishing over REST) and must still reach the
        // cloud, through the outbox alone.
        for n in nodes.iter_mut().skip(1) {
            n.subscribed = channels
                .iter()
                .filter(|_| rng.random_bool(0.75))
                .cloned()
                .collect();
        }
        let mut sim = Self {
            report: SimReport {
                seed: cfg.seed,
                ..SimReport::default()
            },
            cfg,
            rng,
            now: 0,
            nodes,
            link_up: vec![true; edges + 1],
            epoch: vec![0; edges + 1],
            net: BinaryHeap::new(),
            n: 0,
            channels,
            acked: BTreeMap::new(),
            violations: Vec::new(),
            faults: true,
        };
        for i in 1..=edges {
            sim.subscribe_all(i);
            sim.connect(i);
        }
        sim
    }

    /// Runs the faulty phase, heals, runs to quiescence and checks every invariant.
    pub fn run(mut self) -> Result<SimReport, SimFailure> {
        for _ in 0..self.cfg.steps {
            self.step();
        }
        self.heal();
        let heal_at = self.now;
        // Long enough for resends and anti-entropy to repair everything lost.
        let mut quiet = 0;
        while self.now < heal_at + 120_000 {
            self.advance();
            if self.converged() {
                quiet += 1;
                if quiet > 30 {
                    break;
                }
            } else {
                quiet = 0;
            }
        }
        self.report.converged_after_ms = self.now - heal_at;
        self.check_final();
        if self.violations.is_empty() {
            Ok(self.report)
        } else {
            Err(SimFailure {
                seed: self.cfg.seed,
                violations: self.violations,
            })
        }
    }

    fn step(&mut self) {
        if self.rng.random_bool(self.cfg.op_rate) {
            self.client_op();
        }
        if self.rng.random_bool(self.cfg.partition_rate) {
            let e = self.rng.random_range(1..=self.cfg.edges);
            self.report.partitions += 1;
            if self.link_up[e] {
                self.link_up[e] = false;
                self.disconnect(e);
            } else {
                self.link_up[e] = true;
                self.connect(e);
            }
        }
        if self.rng.random_bool(self.cfg.crash_rate) {
            let i = self.rng.random_range(0..=self.cfg.edges);
            if self.nodes[i].node.is_some() {
                self.crash(i);
            }
        }
        if self.rng.random_bool(self.cfg.interest_flap_rate) && !self.channels.is_empty() {
            let e = self.rng.random_range(1..=self.cfg.edges);
            let c = self.channels[self.rng.random_range(0..self.channels.len())].clone();
            let on = !self.nodes[e].subscribed.contains(&c);
            if on {
                self.nodes[e].subscribed.insert(c.clone());
            } else {
                self.nodes[e].subscribed.remove(&c);
            }
            self.input(e, Input::Interest(c, on));
        }
        if self.rng.random_bool(self.cfg.unload_rate) && !self.channels.is_empty() {
            let i = self.rng.random_range(0..self.nodes.len());
            let c = self.channels[self.rng.random_range(0..self.channels.len())].clone();
            if self.nodes[i].node.as_mut().is_some_and(|n| n.unload(&c)) {
                self.report.unloads += 1;
            }
        }
        if self.rng.random_bool(self.cfg.evict_rate) && !self.channels.is_empty() {
            let e = self.rng.random_range(1..=self.cfg.edges);
            let c = self.channels[self.rng.random_range(0..self.channels.len())].clone();
            self.ensure(e, &c);
            if let Some(node) = self.nodes[e].node.as_mut() {
                if node.evict(&c) {
                    self.report.evictions += 1;
                    // The edge forgets what it delivered there; the next subscriber
                    // starts fresh and may be told its replay was truncated.
                    self.nodes[e].delivered.remove(&c);
                    self.nodes[e].truncated_start.insert(c.clone());
                    self.drain(e);
                }
            }
        }
        self.advance();
    }

    /// Moves time 10 ms: restarts, network deliveries, timers.
    fn advance(&mut self) {
        self.now += 10;
        for i in 0..self.nodes.len() {
            if self.nodes[i].restart_at.is_some_and(|t| t <= self.now) {
                self.restart(i);
            }
        }
        while let Some(Reverse(m)) = self.net.peek() {
            if m.at > self.now {
                break;
            }
            let Some(Reverse(m)) = self.net.pop() else {
                break;
            };
            let edge = if m.from == 0 { m.to } else { m.from };
            if self.epoch[edge] != m.epoch || !self.link_live(edge) {
                self.report.dropped += 1;
                continue;
            }
            let from = self.nodes[m.from].id;
            self.input(m.to, Input::Msg(from, m.msg.0));
        }
        for i in 0..self.nodes.len() {
            let due = self.nodes[i]
                .node
                .as_ref()
                .and_then(Node::poll_timeout)
                .is_some_and(|t| t <= self.now);
            if due {
                self.input(i, Input::Timeout);
            }
        }
    }

    fn link_live(&self, edge: usize) -> bool {
        self.link_up[edge] && self.nodes[0].node.is_some() && self.nodes[edge].node.is_some()
    }

    fn connect(&mut self, edge: usize) {
        if !self.link_live(edge) {
            return;
        }
        self.epoch[edge] += 1;
        let (cloud, e) = (self.nodes[0].id, self.nodes[edge].id);
        self.input(0, Input::LinkUp(e));
        self.input(edge, Input::LinkUp(cloud));
    }

    fn disconnect(&mut self, edge: usize) {
        self.epoch[edge] += 1;
        let (cloud, e) = (self.nodes[0].id, self.nodes[edge].id);
        if self.nodes[0].node.is_some() {
            self.input(0, Input::LinkDown(e));
        }
        if self.nodes[edge].node.is_some() {
            self.input(edge, Input::LinkDown(cloud));
        }
    }

    fn crash(&mut self, i: usize) {
        self.report.crashes += 1;
        if i == 0 {
            for e in 1..=self.cfg.edges {
                if self.link_live(e) {
                    self.disconnect(e);
                }
            }
        } else if self.link_live(i) {
            self.disconnect(i);
        }
        self.nodes[i].node = None;
        // Sometimes the newest storage write (a register) does not survive the crash.
        if let Some((ch, key, prev)) = self.nodes[i].torn.take() {
            if self.rng.random_bool(0.5) {
                self.report.torn_writes += 1;
                self.nodes[i].store.restore_register(&ch, &key, prev);
            }
        }
        let back = self.now + self.rng.random_range(50..2_000);
        self.nodes[i].restart_at = Some(back);
    }

    fn restart(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.restart_at = None;
        // Like the shells: only channels with unacked local ops are loaded at start.
        let outbox: BTreeMap<ChannelName, DurableChannel> = if n.role == Role::Edge {
            infallible(n.store.outbox_channels())
                .into_iter()
                .filter_map(|c| Some((c.clone(), infallible(n.store.load_channel(&c))?)))
                .collect()
        } else {
            BTreeMap::new()
        };
        let retired = infallible(n.store.retired());
        let node = Node::restore(
            n.id,
            n.role,
            self.cfg.sync.clone(),
            outbox,
            retired.clone(),
            infallible(n.store.upstream()),
            self.now,
        );
        // Subscribers reconnect and resume from what is durable here.
        n.delivered = node
            .channels()
            .map(|c| (c.channel().clone(), c.vv().clone()))
            .collect();
        // A subscriber of an evicted channel reopened later may start after a gap.
        n.truncated_start = retired.into_keys().collect();
        n.node = Some(node);
        if i == 0 {
            for e in 1..=self.cfg.edges {
                self.connect(e);
            }
        } else {
            self.subscribe_all(i);
            self.connect(i);
        }
    }

    fn subscribe_all(&mut self, i: usize) {
        let subs: Vec<ChannelName> = self.nodes[i].subscribed.iter().cloned().collect();
        for c in subs {
            self.input(i, Input::Interest(c, true));
        }
    }

    fn heal(&mut self) {
        self.faults = false;
        // The checks read every replica's channels: make them all resident (nothing is
        // unloaded after this).
        self.cfg.unload_rate = 0.0;
        for i in 0..self.nodes.len() {
            let stored = infallible(self.nodes[i].store.channel_names());
            for c in stored {
                self.ensure(i, &c);
            }
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].node.is_none() {
                self.restart(i);
            }
        }
        for e in 1..=self.cfg.edges {
            if !self.link_up[e] {
                self.link_up[e] = true;
                self.connect(e);
            }
        }
    }

    fn client_op(&mut self) {
        if self.channels.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..self.nodes.len());
        if self.nodes[i].node.is_none() {
            return;
        }
        let channel = self.channels[self.rng.random_range(0..self.channels.len())].clone();
        self.ensure(i, &channel);
        let key = format!("k{}", self.rng.random_range(0..self.cfg.keys));
        let context = self.nodes[i]
            .node
            .as_ref()
            .and_then(|n| n.channel(&channel))
            .and_then(|c| c.register(&key))
            .map(|r| r.context().clone())
            .unwrap_or_default();
        let roll: f64 = self.rng.random();
        let value = Payload::from_value(&self.rng.random_range(0..1000u32));
        let write = if roll < 0.4 {
            let idem = self
                .rng
                .random_bool(0.2)
                .then(|| format!("idem-{}", self.rng.random_range(0..20u32)));
            LocalWrite::Event {
                kind: "ingest.job.updated".into(),
                data: value,
                idempotency_key: idem,
            }
        } else if roll < 0.85 {
            // Mostly writes that read first; some blind writes that stay concurrent.
            let context = if self.rng.random_bool(0.8) {
                context
            } else {
                VersionVector::new()
            };
            LocalWrite::Set {
                key,
                value,
                context,
            }
        } else {
            LocalWrite::Delete { key, context }
        };
        let now = self.now;
        let Some(node) = self.nodes[i].node.as_mut() else {
            return;
        };
        match node.local(now, &channel, write) {
            Ok(LocalOutcome::Applied(a)) => {
                self.acked.insert((channel, a.op.dot), a.op);
                self.report.acked_ops += 1;
            }
            Ok(LocalOutcome::Duplicate(_)) => {}
            Err(e) => self.violations.push(format!("local write refused: {e}")),
        }
        self.drain(i);
    }

    /// Loads a stored channel into node `i` if it is not resident, as the shells do
    /// before an input that names it.
    fn ensure(&mut self, i: usize, c: &ChannelName) {
        let n = &mut self.nodes[i];
        let Some(node) = n.node.as_mut() else {
            return;
        };
        if node.is_resident(c) {
            return;
        }
        let Some(d) = infallible(n.store.load_channel(c)) else {
            return;
        };
        let vv = d.vv();
        node.load(c.clone(), d);
        // Subscribers resume from what is durable here (the shell's replay).
        n.delivered.entry(c.clone()).or_default().merge(&vv);
        self.report.loads += 1;
        self.drain(i);
    }

    /// What the shells load before feeding an input.
    fn ensure_for(&mut self, i: usize, input: &Input) {
        match input {
            Input::Interest(c, _) | Input::Logged(c, _) => self.ensure(i, c),
            Input::Msg(_, m) => {
                if let Some(c) = m.stored_channel().cloned() {
                    self.ensure(i, &c);
                }
            }
            Input::LinkUp(peer) => {
                let n = &self.nodes[i];
                let Some(node) = n.node.as_ref() else {
                    return;
                };
                let wanted = match (n.role, node.compares_all_with(*peer)) {
                    (Role::Cloud, _) => Vec::new(),
                    (Role::Edge, true) => infallible(n.store.channel_names()),
                    (Role::Edge, false) => infallible(n.store.outbox_channels()),
                };
                for c in wanted {
                    self.ensure(i, &c);
                }
            }
            Input::LinkDown(_) | Input::Timeout => {}
        }
    }

    fn input(&mut self, i: usize, input: Input) {
        self.ensure_for(i, &input);
        let now = self.now;
        if let Some(node) = self.nodes[i].node.as_mut() {
            node.handle(now, input);
        }
        self.drain(i);
    }

    /// Carries out a node's outputs in order: persists to its disk, sends to the net.
    fn drain(&mut self, i: usize) {
        loop {
            let Some(out) = self.nodes[i].node.as_mut().and_then(Node::poll) else {
                return;
            };
            match out {
                Output::Send { to, msg } => self.send(i, to, msg),
                Output::Persist(p) => self.persist(i, p),
                Output::Deliver { channel, op } => self.deliver(i, channel, op),
                Output::SnapshotInstalled { channel, vv, .. } => {
                    self.report.snapshots += 1;
                    // Subscribers of a snapshot-installed channel re-read state.
                    self.nodes[i]
                        .delivered
                        .entry(channel)
                        .or_default()
                        .merge(&vv);
                }
                Output::Conflict { .. } => self.report.conflicts += 1,
                Output::Warn { reason, .. } => {
                    if !reason.contains("wait for missing predecessors") {
                        self.violations.push(format!("node {i} warned: {reason}"));
                    }
                }
                Output::DeliverEphemeral { .. }
                | Output::Acked { .. }
                | Output::Rtt { .. }
                | Output::Command(_) => {}
            }
        }
    }

    fn send(&mut self, from: usize, to: ReplicaId, msg: SyncMsg) {
        self.report.messages += 1;
        if matches!(msg, SyncMsg::SnapshotPart { .. }) {
            self.report.snapshot_parts += 1;
        }
        let Some(to) = self.nodes.iter().position(|n| n.id == to) else {
            self.violations
                .push(format!("node {from} sent to unknown {to:?}"));
            return;
        };
        let edge = if from == 0 { to } else { from };
        if self.faults && self.rng.random_bool(self.cfg.loss) {
            self.report.dropped += 1;
            return;
        }
        let copies = if self.faults && self.rng.random_bool(self.cfg.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.faults {
                self.rng.random_range(1..=self.cfg.max_delay_ms)
            } else {
                1
            };
            self.n += 1;
            self.net.push(Reverse(InFlight {
                at: self.now + delay,
                n: self.n,
                from,
                to,
                epoch: self.epoch[edge],
                msg: SyncMsgOrd(msg.clone()),
            }));
        }
    }

    fn persist(&mut self, i: usize, p: Persist) {
        let n = &mut self.nodes[i];
        n.torn = match &p {
            Persist::Register { channel, key, .. } => {
                Some((channel.clone(), key.clone(), n.store.register(channel, key)))
            }
            _ => None,
        };
        infallible(n.store.apply(&p));
    }

    fn deliver(&mut self, i: usize, channel: ChannelName, op: Op) {
        self.report.deliveries += 1;
        match self.acked.get(&(channel.clone(), op.dot)) {
            Some(orig) if *orig == op => {}
            Some(_) => self.violations.push(format!(
                "node {i} delivered {:?} with a different body",
                op.dot
            )),
            None => self.violations.push(format!(
                "node {i} delivered {:?} on {channel:?} that no client published",
                op.dot
            )),
        }
        let me = self.nodes[i].id;
        let truncated = op.dot.origin == me && self.nodes[i].truncated_start.remove(&channel);
        let seen = self.nodes[i].delivered.entry(channel.clone()).or_default();
        if truncated && seen.get(me) < op.dot.seq {
            seen.raise(me, op.dot.seq - 1);
        }
        if !seen.is_next(op.dot) {
            self.violations.push(format!(
                "node {i} delivered {:?} on {channel:?} after {} from that origin (gap or duplicate)",
                op.dot,
                seen.get(op.dot.origin)
            ));
        }
        if !seen.dominates(&op.deps) {
            self.violations.push(format!(
                "node {i} delivered {:?} on {channel:?} before its causal dependencies {:?}",
                op.dot, op.deps
            ));
        }
        seen.raise(op.dot.origin, op.dot.seq);
    }

    fn converged(&self) -> bool {
        let acked = self
            .nodes
            .iter()
            .all(|n| n.node.as_ref().is_some_and(|node| node.outbox_len() == 0));
        acked
            && self.channels.iter().all(|c| {
                let mut views = self.holders(c).map(|n| {
                    n.node
                        .as_ref()
                        .and_then(|node| node.channel(c))
                        .map(|r| (r.vv().clone(), r.state().clone(), r.pending_len()))
                });
                let Some(first) = views.next() else {
                    return true;
                };
                first.as_ref().is_some_and(|f| f.2 == 0) && views.all(|v| v == first)
            })
    }

    /// The cloud and the edges with subscribers to `c`: the replicas that must agree.
    fn holders<'a>(&'a self, c: &'a ChannelName) -> impl Iterator<Item = &'a SimNode> + 'a {
        self.nodes
            .iter()
            .filter(move |n| n.role == Role::Cloud || n.subscribed.contains(c))
    }

    fn check_final(&mut self) {
        let mut v = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            match n.node.as_ref() {
                None => v.push(format!("node {i} is not running after heal")),
                Some(node) if node.outbox_len() > 0 => v.push(format!(
                    "node {i} still has {} unacked ops: {:?}",
                    node.outbox_len(),
                    node.channels()
                        .map(|c| (
                            c.channel().to_string(),
                            node.acked(c.channel()),
                            c.vv().clone(),
                            c.floor().clone(),
                            self.nodes[0]
                                .node
                                .as_ref()
                                .and_then(|n| n.channel(c.channel()))
                                .map(|r| r.vv().clone())
                        ))
                        .collect::<Vec<_>>()
                )),
                Some(_) => {}
            }
        }
        for c in &self.channels {
            let reference = self.nodes[0].node.as_ref().and_then(|n| n.channel(c));
            for (i, n) in self.nodes.iter().enumerate() {
                if !(n.role == Role::Cloud || n.subscribed.contains(c)) {
                    continue;
                }
                let Some(node) = n.node.as_ref() else {
                    continue;
                };
                let Some(r) = node.channel(c) else {
                    if self.acked.keys().any(|(ch, _)| ch == c) {
                        v.push(format!("node {i} does not hold {c:?} after heal"));
                    }
                    continue;
                };
                if r.pending_len() > 0 {
                    v.push(format!(
                        "node {i} still buffers {} ops of {c:?}",
                        r.pending_len()
                    ));
                }
                if let Some(reference) = reference {
                    if r.vv() != reference.vv() {
                        v.push(format!(
                            "node {i} {c:?} vv {:?} differs from cloud {:?}",
                            r.vv(),
                            reference.vv()
                        ));
                    }
                    if r.state() != reference.state() {
                        v.push(format!("node {i} {c:?} state differs from the cloud's"));
                    }
                }
                let logged: BTreeSet<Dot> = r.log().map(|op| op.dot).collect();
                for (ch, dot) in self.acked.keys() {
                    if ch != c {
                        continue;
                    }
                    if !r.vv().covers(*dot) {
                        v.push(format!("node {i} lost acked op {dot:?} of {c:?}"));
                    } else if !logged.contains(dot) && !r.floor().covers(*dot) {
                        v.push(format!(
                            "node {i} has {dot:?} of {c:?} neither logged nor compacted"
                        ));
                    }
                }
            }
        }
        self.violations.extend(v);
    }
}

/// Runs one seed with the configuration the seed implies.
pub fn run_seed(seed: u64) -> Result<SimReport, SimFailure> {
    Sim::new(SimConfig::from_seed(seed)).run()
}
