//! A seeded, deterministic simulator: the cloud tier and N edges running the real
//! [`Node`] state machine over an emulated network with loss, duplication, reordering,
//! partitions and crash-restart (what was persisted survives, memory does not), driven
//! by random client ops. After healing it checks convergence and that nothing acked
//! was lost, and it checks per-origin and causal delivery order all along.
//!
//! The cloud tier is one embedded cloud, or (half the seeds) 2–3 coordinators that meet
//! only through a shared log, modelled on the JetStream shell: a coordinator queues the
//! ops it applies for the log (and writes them to a log outbox on its disk, queued
//! again after a crash), holds every later output until the log stored them, and tails
//! the log from a saved position, handing other coordinators' ops to its node as
//! `Input::Logged`. The log goes away and comes back (quorum loss);
//! coordinators crash; edges move between coordinators.
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
use crate::sync::{
    take_where, DurableChannel, FetchWait, Input, Node, Output, Persist, Role, SyncConfig,
};
use crate::vv::VersionVector;
use crate::wire::{LogRecord, SyncMsg};

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
    /// Coordinators of the cloud tier: 1 is the embedded cloud; more share a log.
    pub coordinators: usize,
    /// Per step (clustered): the shared log becomes unavailable, or available again.
    pub log_outage_rate: f64,
    /// Per step: a client reads a channel on an edge without subscribing (a fetch).
    pub read_rate: f64,
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
            // Drawn from their own generator: the other knobs of a seed stay as they
            // were before coordinators existed.
            coordinators: 1,
            log_outage_rate: 0.0,
            read_rate: 0.0,
            sync,
        }
        .with_cluster(seed)
        .with_reads(seed)
    }

    /// Reads on edges without a subscription (fetches), drawn from their own generator
    /// so that every other knob of a seed stays as it was.
    fn with_reads(mut self, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x4ead_0000_0000_0002);
        if rng.random_bool(0.5) {
            self.read_rate = rng.random_range(0.01..0.1);
        }
        self
    }

    fn with_cluster(mut self, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0xc00d_1a7e_0000_0001);
        if rng.random_bool(0.5) {
            self.coordinators = rng.random_range(2..=3);
            self.log_outage_rate = rng.random_range(0.0..0.01);
        }
        self
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
    /// Coordinators in the run (1: the embedded cloud).
    pub coordinators: usize,
    /// Clustered: ops stored in the shared log, its outages, coordinators' re-queues
    /// after a crash, and edges that moved to another coordinator.
    pub logged: usize,
    pub log_outages: usize,
    pub requeued: usize,
    pub moves: usize,
    /// Reads on edges without a subscription, and how many of their fetches failed
    /// (no upstream, link lost, expired).
    pub reads: usize,
    pub fetches_failed: usize,
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
    /// Clustered coordinator (memory): ops for the shared log, in order; outputs held
    /// until they are stored; every output held after a restart that re-queued ops.
    log_queue: Vec<(ChannelName, LogRecord)>,
    held: std::collections::VecDeque<Output>,
    barrier: bool,
    /// Log entries applied, and the dots being handed in from the log now.
    log_pos: usize,
    from_log: BTreeSet<Dot>,
    /// A state record from the log is being installed now (not queued again).
    from_log_state: bool,
    /// Reads waiting for a fetch round: what the upstream held when each was asked.
    fetch_expect: BTreeMap<(ChannelName, u64), VersionVector>,
    /// Clustered coordinator (disk): the ops queued for the log and not yet stored
    /// there (written with the op, cleared once stored), and the last saved position.
    log_outbox: Vec<(ChannelName, LogRecord)>,
    log_saved: usize,
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

/// The simulated world. Nodes `0..coords` are the cloud tier (coordinator 0 is the
/// reference replica); the rest are edges.
#[allow(missing_debug_implementations)]
pub struct Sim {
    cfg: SimConfig,
    rng: SmallRng,
    now: u64,
    nodes: Vec<SimNode>,
    coords: usize,
    /// Per edge: is its link administratively up, its epoch, its coordinator.
    link_up: Vec<bool>,
    epoch: Vec<u64>,
    upstream: Vec<usize>,
    /// Clustered: the shared log, and whether it is available.
    shared_log: Vec<(ChannelName, LogRecord)>,
    log_up: bool,
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
        let coords = cfg.coordinators.max(1);
        let mut nodes = Vec::new();
        for i in 0..coords + cfg.edges {
            let role = if i < coords { Role::Cloud } else { Role::Edge };
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
                log_queue: Vec::new(),
                held: Default::default(),
                barrier: false,
                log_pos: 0,
                from_log: BTreeSet::new(),
                from_log_state: false,
                fetch_expect: BTreeMap::new(),
                log_outbox: Vec::new(),
                log_saved: 0,
            });
        }
        let total = nodes.len();
        let mut rng = rng;
        // Edges subscribe to most channels; a channel without local subscribers is
        // still written to (a backend publishing over REST) and must still reach the
        // cloud, through the outbox alone.
        for n in nodes.iter_mut().skip(coords) {
            n.subscribed = channels
                .iter()
                .filter(|_| rng.random_bool(0.75))
                .cloned()
                .collect();
        }
        let mut sim = Self {
            report: SimReport {
                seed: cfg.seed,
                coordinators: coords,
                ..SimReport::default()
            },
            cfg,
            now: 0,
            nodes,
            coords,
            link_up: vec![true; total],
            epoch: vec![0; total],
            // Edges spread over the coordinators.
            upstream: (0..total).map(|i| i % coords).collect(),
            shared_log: Vec::new(),
            log_up: true,
            rng,
            net: BinaryHeap::new(),
            n: 0,
            channels,
            acked: BTreeMap::new(),
            violations: Vec::new(),
            faults: true,
        };
        for i in sim.edges() {
            sim.subscribe_all(i);
            sim.connect(i);
        }
        sim
    }

    fn edges(&self) -> std::ops::Range<usize> {
        self.coords..self.nodes.len()
    }

    fn random_edge(&mut self) -> usize {
        self.rng.random_range(self.coords..=self.nodes.len() - 1)
    }

    /// Coordinators share a log (more than one of them).
    fn clustered(&self) -> bool {
        self.coords > 1
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
            let e = self.random_edge();
            self.report.partitions += 1;
            if self.link_up[e] {
                self.link_up[e] = false;
                self.disconnect(e);
            } else {
                self.link_up[e] = true;
                // Coming back, an edge may dial another coordinator.
                if self.clustered() && self.rng.random_bool(0.5) {
                    let k = self.rng.random_range(0..self.coords);
                    if k != self.upstream[e] {
                        self.upstream[e] = k;
                        self.report.moves += 1;
                    }
                }
                self.connect(e);
            }
        }
        if self.rng.random_bool(self.cfg.crash_rate) {
            let i = self.rng.random_range(0..=self.nodes.len() - 1);
            if self.nodes[i].node.is_some() {
                self.crash(i);
            }
        }
        if self.clustered() && self.rng.random_bool(self.cfg.log_outage_rate) {
            self.log_up = !self.log_up;
            if !self.log_up {
                self.report.log_outages += 1;
            }
        }
        if self.rng.random_bool(self.cfg.interest_flap_rate) && !self.channels.is_empty() {
            let e = self.random_edge();
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
            // A coordinator holding outputs keeps its channels: the simulator's
            // subscribers there would read the held ops from disk and then get them
            // again (the shell unloads only channels without subscribers).
            let holding = !self.nodes[i].held.is_empty();
            if !holding && self.nodes[i].node.as_mut().is_some_and(|n| n.unload(&c)) {
                self.report.unloads += 1;
            }
        }
        if self.rng.random_bool(self.cfg.evict_rate) && !self.channels.is_empty() {
            let e = self.random_edge();
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
        if self.cfg.read_rate > 0.0
            && self.rng.random_bool(self.cfg.read_rate)
            && !self.channels.is_empty()
        {
            let e = self.random_edge();
            let c = self.channels[self.rng.random_range(0..self.channels.len())].clone();
            self.read(e, c);
        }
        self.advance();
    }

    /// A client reads channel `c` on edge `e` without subscribing: the edge fetches
    /// it. When it says the fetch completed, it must hold everything its upstream
    /// held when the read was asked (checked in `execute`).
    fn read(&mut self, e: usize, c: ChannelName) {
        if self.nodes[e].node.is_none() {
            return;
        }
        self.report.reads += 1;
        let up = self.upstream[e];
        let expected =
            (self.link_live(e) && self.nodes[up].node.is_some()).then(|| self.vv_at(up, &c));
        self.ensure(e, &c);
        let now = self.now;
        let Some(wait) = self.nodes[e].node.as_mut().map(|n| n.fetch(now, &c)) else {
            return;
        };
        // `Now`: synced live (subscribers here), the read answers with what is here.
        if let (FetchWait::Round(round), Some(vv)) = (wait, expected) {
            self.nodes[e].fetch_expect.insert((c, round), vv);
        }
        self.drain(e);
    }

    /// A node's vector for a channel: in memory if resident, else on its disk.
    fn vv_at(&self, i: usize, c: &ChannelName) -> VersionVector {
        let n = &self.nodes[i];
        match n.node.as_ref().and_then(|node| node.channel(c)) {
            Some(r) => r.vv().clone(),
            None => infallible(n.store.load_channel(c))
                .map(|d| d.vv())
                .unwrap_or_default(),
        }
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
            let edge = if m.from < self.coords { m.to } else { m.from };
            if self.epoch[edge] != m.epoch || !self.link_live(edge) {
                self.report.dropped += 1;
                continue;
            }
            let from = self.nodes[m.from].id;
            self.input(m.to, Input::Msg(from, m.msg.0));
        }
        if self.clustered() && self.log_up {
            for k in 0..self.coords {
                self.store_log(k);
                self.tail_log(k);
            }
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

    /// Clustered coordinator `k`: the log stores its queue (in order); the outputs it
    /// held run.
    fn store_log(&mut self, k: usize) {
        let n = &mut self.nodes[k];
        if n.node.is_none() {
            return;
        }
        let batch = std::mem::take(&mut n.log_queue);
        self.report.logged += batch.len();
        self.shared_log.extend(batch);
        n.barrier = false;
        // Everything queued is stored.
        n.log_outbox.clear();
        let held = std::mem::take(&mut n.held);
        for out in held {
            self.execute(k, out);
        }
    }

    /// Clustered coordinator `k` reads a few more log entries (possibly its own ops
    /// back); now and then it saves its position.
    fn tail_log(&mut self, k: usize) {
        if self.nodes[k].node.is_none() {
            return;
        }
        let n = self.rng.random_range(0..=4);
        for _ in 0..n {
            let pos = self.nodes[k].log_pos;
            let Some((channel, record)) = self.shared_log.get(pos).cloned() else {
                break;
            };
            match &record {
                LogRecord::Op(op) => {
                    self.nodes[k].from_log.insert(op.dot);
                }
                LogRecord::State(_) => self.nodes[k].from_log_state = true,
            }
            self.input(k, Input::Logged(channel, record));
            self.nodes[k].from_log.clear();
            self.nodes[k].from_log_state = false;
            self.nodes[k].log_pos = pos + 1;
        }
        if self.rng.random_bool(0.2) {
            self.nodes[k].log_saved = self.nodes[k].log_pos;
        }
    }

    fn link_live(&self, edge: usize) -> bool {
        self.link_up[edge]
            && self.nodes[self.upstream[edge]].node.is_some()
            && self.nodes[edge].node.is_some()
    }

    fn connect(&mut self, edge: usize) {
        if !self.link_live(edge) {
            return;
        }
        self.epoch[edge] += 1;
        let c = self.upstream[edge];
        let (cloud, e) = (self.nodes[c].id, self.nodes[edge].id);
        self.input(c, Input::LinkUp(e));
        self.input(edge, Input::LinkUp(cloud));
    }

    fn disconnect(&mut self, edge: usize) {
        self.epoch[edge] += 1;
        let c = self.upstream[edge];
        let (cloud, e) = (self.nodes[c].id, self.nodes[edge].id);
        if self.nodes[c].node.is_some() {
            self.input(c, Input::LinkDown(e));
        }
        if self.nodes[edge].node.is_some() {
            self.input(edge, Input::LinkDown(cloud));
        }
    }

    fn crash(&mut self, i: usize) {
        self.report.crashes += 1;
        let mut orphans = Vec::new();
        if i < self.coords {
            for e in self.edges() {
                if self.upstream[e] == i && self.link_live(e) {
                    self.disconnect(e);
                    orphans.push(e);
                }
            }
        } else if self.link_live(i) {
            self.disconnect(i);
        }
        self.nodes[i].node = None;
        // Memory is gone: the log queue, held outputs, the position read so far.
        let n = &mut self.nodes[i];
        n.log_queue.clear();
        n.held.clear();
        n.barrier = false;
        n.from_log.clear();
        n.from_log_state = false;
        n.fetch_expect.clear();
        // Its edges move to another live coordinator, if there is one.
        for e in orphans {
            let live: Vec<usize> = (0..self.coords)
                .filter(|&k| k != i && self.nodes[k].node.is_some())
                .collect();
            if !live.is_empty() {
                self.upstream[e] = live[self.rng.random_range(0..live.len())];
                self.report.moves += 1;
                self.connect(e);
            }
        }
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
        // A clustered coordinator reads the log from its saved position and queues
        // again what its log outbox holds (ops the log may lack: compaction may have
        // dropped them from the channel's log since), holding every output until they
        // are stored.
        n.log_pos = n.log_saved;
        if i < self.coords && self.coords > 1 {
            n.log_queue = n.log_outbox.clone();
            self.report.requeued += n.log_queue.len();
            n.barrier = !n.log_queue.is_empty();
        }
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
        if i < self.coords {
            // Its own edges come back; edges cut off from theirs come here.
            for e in self.edges() {
                if self.upstream[e] == i || !self.link_live(e) {
                    self.upstream[e] = i;
                    self.connect(e);
                }
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
        self.log_up = true;
        // The checks read every replica's channels: make them all resident (nothing is
        // unloaded after this).
        self.cfg.unload_rate = 0.0;
        // Crashed nodes first: a node restarted after the loads below would hold only
        // the channels its restart loads.
        for i in 0..self.nodes.len() {
            if self.nodes[i].node.is_none() {
                self.restart(i);
            }
        }
        for i in 0..self.nodes.len() {
            let stored = infallible(self.nodes[i].store.channel_names());
            for c in stored {
                self.ensure(i, &c);
            }
        }
        for e in self.edges() {
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
                by: None,
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
                by: None,
            }
        } else {
            LocalWrite::Delete {
                key,
                context,
                by: None,
            }
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
    /// A clustered coordinator queues its new ops for the shared log and holds every
    /// output while anything it queued is not stored yet (the shell's group commit).
    fn drain(&mut self, i: usize) {
        let coordinator = self.clustered() && i < self.coords;
        loop {
            let Some(out) = self.nodes[i].node.as_mut().and_then(Node::poll) else {
                return;
            };
            let n = &mut self.nodes[i];
            if let Output::Persist(p) = out {
                if let (true, Persist::Op { channel, op }) = (coordinator, &p) {
                    if !n.from_log.contains(&op.dot) {
                        let r = LogRecord::Op(op.clone());
                        n.log_outbox.push((channel.clone(), r.clone()));
                        n.log_queue.push((channel.clone(), r));
                    }
                }
                self.persist(i, p);
                continue;
            }
            if let Output::SnapshotInstalled { channel, .. } = &out {
                if coordinator && !n.from_log_state {
                    // State installed from a snapshot holds ops this coordinator never
                    // saw one by one: the log gets the channel's state.
                    let snap = n
                        .node
                        .as_ref()
                        .and_then(|node| node.channel(channel))
                        .map(|c| c.snapshot());
                    if let Some(snap) = snap {
                        let r = LogRecord::State(snap);
                        n.log_outbox.push((channel.clone(), r.clone()));
                        n.log_queue.push((channel.clone(), r));
                    }
                }
            }
            if coordinator && (n.barrier || !n.log_queue.is_empty() || !n.held.is_empty()) {
                n.held.push_back(out);
            } else {
                self.execute(i, out);
            }
        }
    }

    fn execute(&mut self, i: usize, out: Output) {
        {
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
                Output::Fetched {
                    channel,
                    upto,
                    fresh,
                } => {
                    let expected = take_where(&mut self.nodes[i].fetch_expect, |(c, r), _| {
                        *c == channel && *r <= upto
                    });
                    if !fresh {
                        self.report.fetches_failed += 1;
                    } else {
                        let have = self.vv_at(i, &channel);
                        for (_, e) in expected.iter().filter(|(_, e)| !have.dominates(e)) {
                            self.violations.push(format!(
                                "node {i}: a read of {channel} completed with {have:?}, behind what its upstream held when the read was asked ({e:?})"
                            ));
                        }
                    }
                }
                Output::Conflict { .. } => self.report.conflicts += 1,
                Output::Warn { reason, .. } => {
                    // An edge that moves to a coordinator which has not read the log
                    // that far yet sends its acked ops again, or waits for a rebase
                    // that holds its own evicted ops: expected when clustered.
                    let expected = reason.contains("wait for missing predecessors")
                        || (self.clustered()
                            && (reason.contains("the upstream lacks this edge's acked ops")
                                || reason
                                    .contains("the upstream's base lacks this edge's own ops")));
                    if !expected {
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
        let edge = if from < self.coords { to } else { from };
        // A held output for a link that is gone (the edge moved or the link dropped)
        // goes nowhere, as with the shells' router.
        let coordinator = if from < self.coords { from } else { to };
        if self.clustered() && (self.upstream[edge] != coordinator || !self.link_live(edge)) {
            self.report.dropped += 1;
            return;
        }
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
        let logged = self.nodes[..self.coords].iter().all(|n| {
            !self.clustered()
                || (n.log_queue.is_empty()
                    && n.held.is_empty()
                    && n.log_pos == self.shared_log.len())
        });
        acked
            && logged
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
        if self.clustered() {
            // An op is in the log as itself, or covered by state a coordinator logged.
            let mut in_log: BTreeSet<(&ChannelName, Dot)> = BTreeSet::new();
            let mut states: BTreeMap<&ChannelName, VersionVector> = BTreeMap::new();
            for (c, r) in &self.shared_log {
                match r {
                    LogRecord::Op(op) => {
                        in_log.insert((c, op.dot));
                    }
                    LogRecord::State(s) => states.entry(c).or_default().merge(&s.vv),
                }
            }
            for (c, dot) in self.acked.keys() {
                let covered = states.get(c).is_some_and(|vv| vv.covers(*dot));
                if !in_log.contains(&(c, *dot)) && !covered {
                    v.push(format!(
                        "acked op {dot:?} of {c:?} is not in the shared log"
                    ));
                }
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
