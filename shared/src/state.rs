//! Materialized state: per key a multi-value register built on dotted version vectors
//! (as in Riak's DVV sets), read through a last-writer-wins winner.

use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;
use crate::ids::Dot;
use crate::op::Payload;
use crate::vv::VersionVector;

/// One concurrent value of a key. `value: None` is a tombstone (a delete).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sibling {
    pub dot: Dot,
    pub hlc: Hlc,
    pub value: Option<Payload>,
}

impl Sibling {
    /// The total order that picks the winner: hybrid clock, then origin, then seq.
    pub fn lww_key(&self) -> (Hlc, crate::ids::ReplicaId, u64) {
        (self.hlc, self.dot.origin, self.dot.seq)
    }

    pub fn write(&self) -> WriteInfo {
        WriteInfo {
            dot: self.dot,
            hlc: self.hlc,
            deleted: self.value.is_none(),
        }
    }
}

/// A summary of one write, used in conflict records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteInfo {
    pub dot: Dot,
    pub hlc: Hlc,
    pub deleted: bool,
}

/// Why a write lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LossReason {
    /// Concurrent writes met; the winner is chosen by last-writer-wins.
    Concurrent,
    /// A local write absorbed the oldest siblings to keep the sibling cap.
    SiblingCap,
}

/// A record of concurrent writes that met on a key: which won and which lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub key: String,
    pub winner: WriteInfo,
    pub losers: Vec<WriteInfo>,
    pub reason: LossReason,
}

/// A multi-value register.
///
/// `siblings` are the writes no other known write has superseded; `seen` covers every
/// dot this register has applied or that a write's context claimed to supersede, so a
/// superseded write that arrives late is never resurrected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    siblings: Vec<Sibling>,
    seen: VersionVector,
}

impl Register {
    /// Applies a write (set or delete) made with `context`. Returns false when the write
    /// was already applied or superseded. Commutative and idempotent for writes whose
    /// dots are delivered in per-origin order.
    pub fn apply(&mut self, sibling: Sibling, context: &VersionVector) -> bool {
        let fresh = !self.seen.covers(sibling.dot);
        self.siblings.retain(|s| !context.covers(s.dot));
        self.seen.merge(context);
        self.seen.raise(sibling.dot.origin, sibling.dot.seq);
        if fresh {
            self.siblings.push(sibling);
            self.siblings.sort_by_key(|s| s.lww_key());
        }
        fresh
    }

    /// State-based join with another replica's register of the same key.
    pub fn merge(&mut self, other: &Register) {
        let mut out: Vec<Sibling> = self
            .siblings
            .iter()
            .filter(|s| other.siblings.contains(s) || !other.seen.covers(s.dot))
            .cloned()
            .collect();
        for s in &other.siblings {
            if !self.seen.covers(s.dot) && !out.contains(s) {
                out.push(s.clone());
            }
        }
        out.sort_by_key(|s| s.lww_key());
        self.siblings = out;
        self.seen.merge(&other.seen);
    }

    /// The last-writer-wins winner (possibly a tombstone).
    pub fn winner(&self) -> Option<&Sibling> {
        self.siblings.last()
    }

    /// A rough count of the bytes a state entry (`key` and this register) takes.
    pub fn entry_bytes(&self, key: &str) -> usize {
        key.len() + self.approx_bytes()
    }

    /// A rough count of the bytes this register takes (encoded or in memory).
    pub fn approx_bytes(&self) -> usize {
        16 * (self.seen.len() + 1)
            + self
                .siblings
                .iter()
                .map(|s| 48 + s.value.as_ref().map_or(0, |v| v.len()))
                .sum::<usize>()
    }

    /// All siblings, oldest first, the winner last.
    pub fn siblings(&self) -> &[Sibling] {
        &self.siblings
    }

    /// The causal context a client should send with its next write to this key.
    pub fn context(&self) -> &VersionVector {
        &self.seen
    }

    /// Every sibling is a tombstone (or there is none).
    pub fn is_deleted(&self) -> bool {
        self.siblings.iter().all(|s| s.value.is_none())
    }

    /// The conflict this register shows now, if it holds more than one sibling.
    pub fn conflict(&self, key: &str) -> Option<Conflict> {
        let (winner, losers) = self.siblings.split_last()?;
        (!losers.is_empty()).then(|| Conflict {
            key: key.to_owned(),
            winner: winner.write(),
            losers: losers.iter().map(Sibling::write).collect(),
            reason: LossReason::Concurrent,
        })
    }

    /// The oldest siblings that a new write must absorb so that at most `cap` remain
    /// once it lands, given the writer's `context`.
    pub fn over_cap(&self, context: &VersionVector, cap: usize) -> Vec<&Sibling> {
        let remaining: Vec<&Sibling> = self
            .siblings
            .iter()
            .filter(|s| !context.covers(s.dot))
            .collect();
        let keep = cap.saturating_sub(1);
        let excess = remaining.len().saturating_sub(keep);
        remaining.into_iter().take(excess).collect()
    }
}
