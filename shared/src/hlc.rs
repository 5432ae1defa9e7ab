//! Hybrid logical clock. Physical time is an input (milliseconds since the Unix epoch),
//! never read here.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A hybrid logical timestamp, ordered by `(wall_ms, logical)`.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    pub wall_ms: u64,
    pub logical: u32,
}

impl Hlc {
    pub const ZERO: Hlc = Hlc {
        wall_ms: 0,
        logical: 0,
    };

    pub fn new(wall_ms: u64, logical: u32) -> Self {
        Self { wall_ms, logical }
    }

    /// The smallest timestamp strictly greater than `self`.
    fn tick(self) -> Hlc {
        match self.logical.checked_add(1) {
            Some(l) => Hlc::new(self.wall_ms, l),
            None => Hlc::new(self.wall_ms.saturating_add(1), 0),
        }
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.wall_ms, self.logical)
    }
}

/// A remote timestamp too far ahead of local physical time to be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("remote clock {remote:?} is {ahead_ms} ms ahead of local time; the limit is {max_ms} ms")]
pub struct ClockDrift {
    pub remote: Hlc,
    pub ahead_ms: u64,
    pub max_ms: u64,
}

/// The clock of one replica.
#[derive(Debug, Clone)]
pub struct HlcClock {
    last: Hlc,
    max_drift_ms: u64,
}

impl HlcClock {
    /// A clock that refuses remote stamps more than `max_drift_ms` ahead of local time.
    pub fn new(max_drift_ms: u64) -> Self {
        Self {
            last: Hlc::ZERO,
            max_drift_ms,
        }
    }

    /// A clock that resumes after `last` (e.g. the highest stamp found in storage).
    pub fn resume(max_drift_ms: u64, last: Hlc) -> Self {
        Self { last, max_drift_ms }
    }

    /// Never issues a stamp at or below `stamp` from now on (a channel loaded from
    /// storage brings the stamps of its ops).
    pub fn raise(&mut self, stamp: Hlc) {
        self.last = self.last.max(stamp);
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// Issues a timestamp for a local event, strictly greater than any issued or observed.
    pub fn now(&mut self, physical_ms: u64) -> Hlc {
        self.last = if physical_ms > self.last.wall_ms {
            Hlc::new(physical_ms, 0)
        } else {
            self.last.tick()
        };
        self.last
    }

    /// Folds in a remote timestamp so that later local stamps order after it.
    pub fn observe(&mut self, remote: Hlc, physical_ms: u64) -> Result<(), ClockDrift> {
        let ahead = remote.wall_ms.saturating_sub(physical_ms);
        if ahead > self.max_drift_ms {
            return Err(ClockDrift {
                remote,
                ahead_ms: ahead,
                max_ms: self.max_drift_ms,
            });
        }
        if remote > self.last {
            self.last = remote;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_even_when_wall_goes_back() {
        let mut c = HlcClock::new(1000);
        let a = c.now(100);
        let b = c.now(50);
        assert!(b > a);
        c.observe(Hlc::new(900, 7), 100).expect("within drift");
        assert!(c.now(100) > Hlc::new(900, 7));
        assert!(c.observe(Hlc::new(5000, 0), 100).is_err());
        let mut m = HlcClock::new(0);
        m.observe(Hlc::new(0, u32::MAX), 0).expect("ok");
        assert_eq!(m.now(0), Hlc::new(1, 0));
    }
}
