//! One channel at one replica: the op log, causal buffering, materialized state.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;
use crate::ids::{ChannelName, Dot, ReplicaId};
use crate::op::{Op, OpBody, OpError, Payload};
use crate::state::{Conflict, LossReason, Register, Sibling};
use crate::vv::VersionVector;

/// Limits of one channel replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaConfig {
    /// Most siblings a key keeps after a local write.
    pub sibling_cap: usize,
    /// Most ops buffered while waiting for their causal predecessors.
    pub max_pending: usize,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            sibling_cap: 8,
            max_pending: 65_536,
        }
    }
}

/// A local write as a client asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalWrite {
    Event {
        kind: String,
        data: Payload,
        idempotency_key: Option<String>,
        /// The publisher's authenticated subject (see [`OpBody::Event`]).
        by: Option<String>,
    },
    Set {
        key: String,
        value: Payload,
        context: VersionVector,
        /// The writer's authenticated subject (see [`OpBody::Event`]).
        by: Option<String>,
    },
    Delete {
        key: String,
        context: VersionVector,
        /// The writer's authenticated subject (see [`OpBody::Event`]).
        by: Option<String>,
    },
}

/// What applying one op did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub op: Op,
    /// The key's register after the op, when the op wrote state.
    pub register: Option<(String, Register)>,
    /// Concurrent writes that met on the key, if any.
    pub conflict: Option<Conflict>,
}

/// Result of a local write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalOutcome {
    Applied(Box<Applied>),
    /// An event with this idempotency key was already accepted with this dot.
    Duplicate(Dot),
}

/// Errors of a channel replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Op(#[from] OpError),
    #[error("{0} ops already wait for missing predecessors; dropping {1}")]
    PendingFull(usize, Dot),
    #[error("seq counter for this replica is exhausted")]
    SeqExhausted,
}

/// The other side is behind compacted history: it needs a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("history below {floor:?} was compacted; a snapshot is needed")]
pub struct NeedSnapshot {
    pub floor: VersionVector,
}

/// Full materialized state of a channel, sent instead of ops that were compacted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub vv: VersionVector,
    pub state: BTreeMap<String, Register>,
}

/// One channel's replica.
#[derive(Clone, Debug)]
pub struct ChannelReplica {
    channel: ChannelName,
    me: ReplicaId,
    config: ReplicaConfig,
    /// Applied ops, contiguous per origin.
    vv: VersionVector,
    /// Retained ops in the order they were applied (a causal order).
    log: VecDeque<Op>,
    /// Ops at or below this may be missing from `log` (compacted or skipped by a snapshot).
    floor: VersionVector,
    pending: BTreeMap<Dot, Op>,
    state: BTreeMap<String, Register>,
    idempotency: HashMap<String, Dot>,
}

impl ChannelReplica {
    pub fn new(channel: ChannelName, me: ReplicaId, config: ReplicaConfig) -> Self {
        Self {
            channel,
            me,
            config,
            vv: VersionVector::new(),
            log: VecDeque::new(),
            floor: VersionVector::new(),
            pending: BTreeMap::new(),
            state: BTreeMap::new(),
            idempotency: HashMap::new(),
        }
    }

    /// Rebuilds a replica from what storage kept: the materialized state, the retained
    /// log in applied order, and the floor. The version vector is derived from them.
    pub fn restore(
        channel: ChannelName,
        me: ReplicaId,
        config: ReplicaConfig,
        state: BTreeMap<String, Register>,
        log: Vec<Op>,
        floor: VersionVector,
    ) -> Self {
        let mut vv = floor.clone();
        let mut idempotency = HashMap::new();
        for op in &log {
            vv.raise(op.dot.origin, op.dot.seq);
            if let OpBody::Event {
                idempotency_key: Some(k),
                ..
            } = &op.body
            {
                idempotency.insert(k.clone(), op.dot);
            }
        }
        Self {
            channel,
            me,
            config,
            vv,
            log: log.into(),
            floor,
            pending: BTreeMap::new(),
            state,
            idempotency,
        }
    }

    /// Makes a fresh replica continue this replica's own dots after `own_seq` (the
    /// last one it wrote before the channel was evicted). Those ops are not here: the
    /// floor says so, and [`ChannelReplica::rebase`] brings them back from upstream.
    pub fn resume_after_eviction(&mut self, own_seq: u64) {
        self.vv.raise(self.me, own_seq);
        self.floor.raise(self.me, own_seq);
    }

    /// Replaces a re-opened channel's base with the upstream's: its state with our own
    /// newer writes applied on top, its floor, and its retained log followed by our own
    /// ops the upstream does not have yet. Returns the registers that changed, the upstream ops that are new
    /// here (in log order, to deliver), and the whole new log (to store in this order).
    pub fn rebase(
        &mut self,
        snap: &Snapshot,
        floor: &VersionVector,
        log: Vec<Op>,
    ) -> (Vec<(String, Register)>, Vec<Op>, Vec<Op>) {
        let have: std::collections::HashSet<Dot> = self.log.iter().map(|op| op.dot).collect();
        let fresh: Vec<Op> = log
            .iter()
            .filter(|op| !have.contains(&op.dot))
            .cloned()
            .collect();
        let ours: Vec<Op> = self
            .log
            .drain(..)
            .filter(|op| !snap.vv.covers(op.dot))
            .collect();
        // The local registers applied our new writes without our older ones (they were
        // evicted), so their contexts claim too much: start from the upstream's state
        // and apply our writes it lacks on top, in order.
        let old_state = std::mem::replace(&mut self.state, snap.state.clone());
        self.log = log.into();
        for op in &ours {
            self.apply_to_state(op);
        }
        self.log.extend(ours);
        let changed: Vec<(String, Register)> = self
            .state
            .iter()
            .filter(|(k, r)| old_state.get(*k) != Some(*r))
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();

        self.floor = floor.clone();
        self.vv.merge(&snap.vv);
        self.idempotency.clear();
        for op in &self.log {
            if let OpBody::Event {
                idempotency_key: Some(k),
                ..
            } = &op.body
            {
                self.idempotency.insert(k.clone(), op.dot);
            }
        }
        let mut applied = Vec::new();
        self.drain_pending(&mut applied);
        let mut fresh = fresh;
        fresh.extend(applied.into_iter().map(|a| a.op));
        (changed, fresh, self.log.iter().cloned().collect())
    }

    /// Applies a logged write's effect to its register (idempotent).
    fn apply_to_state(&mut self, op: &Op) {
        let (key, value, context) = match &op.body {
            OpBody::Set {
                key,
                value,
                context,
                ..
            } => (key, Some(value.clone()), context),
            OpBody::Delete { key, context, .. } => (key, None, context),
            OpBody::Event { .. } => return,
        };
        self.state.entry(key.clone()).or_default().apply(
            Sibling {
                dot: op.dot,
                hlc: op.hlc,
                value,
            },
            context,
        );
    }

    /// Re-applies every retained write in the log to the materialized state and returns
    /// the registers that changed. Storage writes an op and its register separately; a
    /// crash between the two leaves a logged op whose effect the stored state lacks.
    /// Register writes are idempotent and commute, so replaying the log repairs that
    /// and changes nothing otherwise.
    pub fn repair_state(&mut self) -> Vec<(String, Register)> {
        let before = self.state.clone();
        let log = std::mem::take(&mut self.log);
        for op in &log {
            self.apply_to_state(op);
        }
        self.log = log;
        self.state
            .iter()
            .filter(|(k, r)| before.get(*k) != Some(*r))
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect()
    }

    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    pub fn vv(&self) -> &VersionVector {
        &self.vv
    }

    pub fn floor(&self) -> &VersionVector {
        &self.floor
    }

    pub fn log(&self) -> impl ExactSizeIterator<Item = &Op> + DoubleEndedIterator {
        self.log.iter()
    }

    /// A rough count of the bytes this replica holds in memory (log and state).
    pub fn approx_bytes(&self) -> u64 {
        let log: usize = self.log.iter().map(Op::approx_bytes).sum();
        let state: usize = self.state.iter().map(|(k, r)| r.entry_bytes(k)).sum();
        (log + state) as u64
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn state(&self) -> &BTreeMap<String, Register> {
        &self.state
    }

    pub fn register(&self, key: &str) -> Option<&Register> {
        self.state.get(key)
    }

    /// Accepts a write from a local client: assigns the next dot and applies it.
    pub fn local(&mut self, hlc: Hlc, write: LocalWrite) -> Result<LocalOutcome, ReplicaError> {
        let seq = self
            .vv
            .get(self.me)
            .checked_add(1)
            .ok_or(ReplicaError::SeqExhausted)?;
        let dot = Dot::new(self.me, seq);
        let mut deps = self.vv.clone();
        deps.set(self.me, 0);
        let mut absorbed = Vec::new();
        let body = match write {
            LocalWrite::Event {
                kind,
                data,
                idempotency_key,
                by,
            } => {
                if let Some(prev) = idempotency_key
                    .as_ref()
                    .and_then(|k| self.idempotency.get(k))
                {
                    return Ok(LocalOutcome::Duplicate(*prev));
                }
                OpBody::Event {
                    kind,
                    data,
                    idempotency_key,
                    by,
                }
            }
            LocalWrite::Set {
                key,
                value,
                mut context,
                by,
            } => {
                absorbed = self.absorb_over_cap(&key, &mut context);
                OpBody::Set {
                    key,
                    value,
                    context,
                    by,
                }
            }
            LocalWrite::Delete {
                key,
                mut context,
                by,
            } => {
                absorbed = self.absorb_over_cap(&key, &mut context);
                OpBody::Delete { key, context, by }
            }
        };
        body.validate()?;
        // A context may name writes this replica has not applied yet (the client read
        // them elsewhere). They are deliberately not added to `deps`: a bogus context must
        // never stall the channel, and registers converge without causal delivery.
        let op = Op {
            dot,
            hlc,
            deps,
            body,
        };
        let mut applied = self.apply(op);
        if !absorbed.is_empty() {
            let key = applied.op.body.key().unwrap_or_default().to_owned();
            applied.conflict = Some(Conflict {
                key,
                winner: self
                    .state
                    .get(applied.op.body.key().unwrap_or_default())
                    .and_then(Register::winner)
                    .map(Sibling::write)
                    .unwrap_or(crate::state::WriteInfo {
                        dot,
                        hlc,
                        deleted: false,
                    }),
                losers: absorbed,
                reason: LossReason::SiblingCap,
            });
        }
        Ok(LocalOutcome::Applied(Box::new(applied)))
    }

    fn absorb_over_cap(
        &self,
        key: &str,
        context: &mut VersionVector,
    ) -> Vec<crate::state::WriteInfo> {
        let Some(reg) = self.state.get(key) else {
            return Vec::new();
        };
        let absorbed: Vec<_> = reg
            .over_cap(context, self.config.sibling_cap)
            .into_iter()
            .map(Sibling::write)
            .collect();
        for w in &absorbed {
            context.raise(w.dot.origin, w.dot.seq);
        }
        absorbed
    }

    /// Whether `op` can be applied now: next in its origin's sequence, deps satisfied.
    fn ready(&self, op: &Op) -> bool {
        self.vv.is_next(op.dot) && self.vv.dominates(&op.deps)
    }

    /// Receives an op from another replica. Applies it when its predecessors are here,
    /// buffers it otherwise; returns every op applied as a result, in applied order.
    /// Duplicates are ignored.
    pub fn receive(&mut self, op: Op) -> Result<Vec<Applied>, ReplicaError> {
        if self.vv.covers(op.dot) || self.pending.contains_key(&op.dot) {
            return Ok(Vec::new());
        }
        op.body.validate()?;
        if !self.ready(&op) {
            if self.pending.len() >= self.config.max_pending {
                return Err(ReplicaError::PendingFull(self.pending.len(), op.dot));
            }
            self.pending.insert(op.dot, op);
            return Ok(Vec::new());
        }
        let mut out = vec![self.apply(op)];
        self.drain_pending(&mut out);
        Ok(out)
    }

    fn drain_pending(&mut self, out: &mut Vec<Applied>) {
        loop {
            // Drop buffered ops that became duplicates (e.g. after a snapshot).
            let vv = &self.vv;
            self.pending.retain(|d, _| !vv.covers(*d));
            let Some(dot) = self
                .pending
                .values()
                .find(|op| self.ready(op))
                .map(|op| op.dot)
            else {
                return;
            };
            if let Some(op) = self.pending.remove(&dot) {
                out.push(self.apply(op));
            }
        }
    }

    /// Applies an op whose predecessors are all applied.
    fn apply(&mut self, op: Op) -> Applied {
        self.vv.raise(op.dot.origin, op.dot.seq);
        let mut register = None;
        let mut conflict = None;
        match &op.body {
            OpBody::Event {
                idempotency_key, ..
            } => {
                if let Some(k) = idempotency_key {
                    self.idempotency.entry(k.clone()).or_insert(op.dot);
                }
            }
            OpBody::Set { key, .. } | OpBody::Delete { key, .. } => {
                self.apply_to_state(&op);
                if let Some(reg) = self.state.get(key) {
                    conflict = reg.conflict(key);
                    register = Some((key.clone(), reg.clone()));
                }
            }
        }
        self.log.push_back(op.clone());
        Applied {
            op,
            register,
            conflict,
        }
    }

    /// Ops that a replica at `since` lacks, in applied (causal) order, at most `limit`.
    pub fn ops_since(&self, since: &VersionVector, limit: usize) -> Result<Vec<Op>, NeedSnapshot> {
        let behind_floor = self
            .floor
            .iter()
            .any(|(r, f)| since.get(r) < f && since.get(r) < self.vv.get(r));
        if behind_floor {
            return Err(NeedSnapshot {
                floor: self.floor.clone(),
            });
        }
        Ok(self
            .log
            .iter()
            .filter(|op| !since.covers(op.dot))
            .take(limit)
            .cloned()
            .collect())
    }

    /// The full state, for a replica behind compacted history.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            vv: self.vv.clone(),
            state: self.state.clone(),
        }
    }

    /// Merges a snapshot from another replica. Returns the registers that changed and
    /// the ops that became applicable from the buffer. History covered only by the
    /// snapshot is not in the log: the floor rises to the snapshot's vector.
    pub fn install_snapshot(&mut self, snap: &Snapshot) -> (Vec<(String, Register)>, Vec<Applied>) {
        let mut changed = Vec::new();
        for (key, theirs) in &snap.state {
            let reg = self.state.entry(key.clone()).or_default();
            let before = reg.clone();
            reg.merge(theirs);
            if *reg != before {
                changed.push((key.clone(), reg.clone()));
            }
        }
        for (r, s) in snap.vv.iter() {
            if s > self.vv.get(r) {
                self.floor.raise(r, s);
            }
        }
        self.vv.merge(&snap.vv);
        let mut out = Vec::new();
        self.drain_pending(&mut out);
        (changed, out)
    }

    /// Drops the oldest ops until at most `max_ops` remain, never dropping an op that
    /// `keep` does not cover (e.g. local ops the cloud has not acked). Returns the
    /// dropped dots; the floor rises to cover them.
    /// Ops whose HLC wall time is below `min_wall_ms` are dropped too.
    pub fn compact(
        &mut self,
        max_ops: Option<usize>,
        min_wall_ms: Option<u64>,
        keep: Option<&VersionVector>,
    ) -> Vec<Dot> {
        let mut dropped = Vec::new();
        while let Some(front) = self.log.front() {
            let too_many = max_ops.is_some_and(|m| self.log.len() > m);
            let too_old = min_wall_ms.is_some_and(|m| front.hlc.wall_ms < m);
            if !(too_many || too_old) || keep.is_some_and(|k| !k.covers(front.dot)) {
                break;
            }
            if let Some(op) = self.log.pop_front() {
                self.floor.raise(op.dot.origin, op.dot.seq);
                if let OpBody::Event {
                    idempotency_key: Some(k),
                    ..
                } = &op.body
                {
                    self.idempotency.remove(k);
                }
                dropped.push(op.dot);
            }
        }
        dropped
    }

    /// Removes keys whose every sibling is a tombstone and whose history `stable`
    /// covers. `stable` must be causally stable: every replica has applied it and no
    /// write concurrent with it is still in flight. Returns the removed keys.
    pub fn collect_tombstones(&mut self, stable: &VersionVector) -> Vec<String> {
        let gone: Vec<String> = self
            .state
            .iter()
            .filter(|(_, r)| r.is_deleted() && stable.dominates(r.context()))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            self.state.remove(k);
        }
        gone
    }
}
