//! Version vectors: `{replica: highest contiguous seq seen}`.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use crate::ids::{Dot, ReplicaId};

/// A version vector. Absent entries mean 0. Entries are never stored as 0.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "BTreeMap<ReplicaId, u64>")]
pub struct VersionVector(BTreeMap<ReplicaId, u64>);

impl From<BTreeMap<ReplicaId, u64>> for VersionVector {
    /// Drops zero entries so that equal vectors always compare equal.
    fn from(mut m: BTreeMap<ReplicaId, u64>) -> Self {
        m.retain(|_, s| *s != 0);
        Self(m)
    }
}

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Highest contiguous seq seen from `origin` (0 when none).
    pub fn get(&self, origin: ReplicaId) -> u64 {
        self.0.get(&origin).copied().unwrap_or(0)
    }

    /// Sets the entry for `origin`; 0 removes it.
    pub fn set(&mut self, origin: ReplicaId, seq: u64) {
        if seq == 0 {
            self.0.remove(&origin);
        } else {
            self.0.insert(origin, seq);
        }
    }

    /// Raises the entry for `origin` to at least `seq`.
    pub fn raise(&mut self, origin: ReplicaId, seq: u64) {
        if seq > self.get(origin) {
            self.0.insert(origin, seq);
        }
    }

    /// Whether this vector has seen `dot`.
    pub fn covers(&self, dot: Dot) -> bool {
        dot.seq <= self.get(dot.origin)
    }

    /// Whether `dot` is the very next one expected from its origin.
    pub fn is_next(&self, dot: Dot) -> bool {
        dot.seq == self.get(dot.origin) + 1
    }

    /// Pointwise maximum (the join of the lattice).
    pub fn merge(&mut self, other: &VersionVector) {
        for (&r, &s) in &other.0 {
            self.raise(r, s);
        }
    }

    /// Pointwise minimum (the meet): what both have seen.
    pub fn meet(&self, other: &VersionVector) -> VersionVector {
        let mut out = VersionVector::new();
        for (&r, &s) in &self.0 {
            out.set(r, s.min(other.get(r)));
        }
        out
    }

    /// `self >= other` pointwise: everything `other` has seen, `self` has seen.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(&r, &s)| self.get(r) >= s)
    }

    /// Neither dominates the other.
    pub fn concurrent(&self, other: &VersionVector) -> bool {
        !self.dominates(other) && !other.dominates(self)
    }

    /// Per-origin seq ranges that `other` has and `self` lacks, in origin order.
    pub fn missing_from(&self, other: &VersionVector) -> Vec<(ReplicaId, RangeInclusive<u64>)> {
        other
            .0
            .iter()
            .filter_map(|(&r, &s)| {
                let mine = self.get(r);
                (s > mine).then(|| (r, mine + 1..=s))
            })
            .collect()
    }

    /// Total number of ops this vector accounts for.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (ReplicaId, u64)> + '_ {
        self.0.iter().map(|(&r, &s)| (r, s))
    }
}

impl FromIterator<(ReplicaId, u64)> for VersionVector {
    fn from_iter<T: IntoIterator<Item = (ReplicaId, u64)>>(iter: T) -> Self {
        let mut vv = VersionVector::new();
        for (r, s) in iter {
            vv.raise(r, s);
        }
        vv
    }
}

impl From<Dot> for VersionVector {
    fn from(d: Dot) -> Self {
        std::iter::once((d.origin, d.seq)).collect()
    }
}
