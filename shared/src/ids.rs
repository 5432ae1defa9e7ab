//! Identifiers: replicas, channels and dots.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Stable identity of a replica (an edge or the cloud). Kept in the replica's data dir.
///
/// Rendered as 16 lowercase hex digits. `0` is reserved and never a valid replica.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct ReplicaId(u64);

impl TryFrom<u64> for ReplicaId {
    type Error = ReplicaIdError;
    fn try_from(raw: u64) -> Result<Self, Self::Error> {
        Self::new(raw).ok_or_else(|| ReplicaIdError(raw.to_string()))
    }
}

impl From<ReplicaId> for u64 {
    fn from(r: ReplicaId) -> u64 {
        r.0
    }
}

impl ReplicaId {
    /// Builds a replica id; `None` for the reserved value 0.
    pub fn new(raw: u64) -> Option<Self> {
        (raw != 0).then_some(Self(raw))
    }

    /// The raw 64-bit value.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "R{:016x}", self.0)
    }
}

/// Why a string is not a valid replica id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid replica id {0:?}: expected 1 to 16 hex digits, not all zero")]
pub struct ReplicaIdError(pub String);

impl FromStr for ReplicaId {
    type Err = ReplicaIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 16 {
            return Err(ReplicaIdError(s.to_owned()));
        }
        u64::from_str_radix(s, 16)
            .ok()
            .and_then(Self::new)
            .ok_or_else(|| ReplicaIdError(s.to_owned()))
    }
}

/// A dot: the identity of one op, `(origin replica, seq)`.
///
/// `seq` counts per (channel, origin) from 1 without gaps.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub origin: ReplicaId,
    pub seq: u64,
}

impl Dot {
    pub fn new(origin: ReplicaId, seq: u64) -> Self {
        Self { origin, seq }
    }
}

impl fmt::Debug for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.origin, self.seq)
    }
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 128;

/// A validated channel name such as `project:42/canvas`.
///
/// Rules: 1..=128 bytes of ASCII letters, digits and `_ - . : / @ =`; it must not start
/// or end with `:` or `/`. The **namespace** is the part before the first `:`; a name
/// without `:` lives in the default namespace `""`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ChannelName(String);

/// Why a string is not a valid channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelNameError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is {0} bytes long; the limit is {MAX_CHANNEL_LEN}")]
    TooLong(usize),
    #[error("channel name contains {0:?}; allowed are ASCII letters, digits and _ - . : / @ =")]
    BadChar(char),
    #[error("channel name must not start or end with ':' or '/'")]
    BadEdge,
}

impl ChannelName {
    pub fn new(s: impl Into<String>) -> Result<Self, ChannelNameError> {
        let s = s.into();
        Self::validate(&s)?;
        Ok(Self(s))
    }

    fn validate(s: &str) -> Result<(), ChannelNameError> {
        if s.is_empty() {
            return Err(ChannelNameError::Empty);
        }
        if s.len() > MAX_CHANNEL_LEN {
            return Err(ChannelNameError::TooLong(s.len()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "_-.:/@=".contains(*c)))
        {
            return Err(ChannelNameError::BadChar(c));
        }
        let edge = |c: Option<char>| matches!(c, Some(':') | Some('/'));
        if edge(s.chars().next()) || edge(s.chars().last()) {
            return Err(ChannelNameError::BadEdge);
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `:`, or `""` when there is none.
    pub fn namespace(&self) -> &str {
        self.0.split_once(':').map(|(ns, _)| ns).unwrap_or("")
    }
}

impl<'de> Deserialize<'de> for ChannelName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ChannelName::new(s).map_err(serde::de::Error::custom)
    }
}

impl FromStr for ChannelName {
    type Err = ChannelNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        let c = ChannelName::new("project:42/canvas").expect("valid");
        assert_eq!(c.namespace(), "project");
        assert_eq!(ChannelName::new("lobby").expect("valid").namespace(), "");
        assert_eq!(ChannelName::new(""), Err(ChannelNameError::Empty));
        assert_eq!(ChannelName::new("a b"), Err(ChannelNameError::BadChar(' ')));
        assert_eq!(ChannelName::new(":x"), Err(ChannelNameError::BadEdge));
        assert_eq!(
            ChannelName::new("x".repeat(129)),
            Err(ChannelNameError::TooLong(129))
        );
        let json: Result<ChannelName, _> = serde_json::from_str("\"bad name\"");
        assert!(json.is_err());
    }

    #[test]
    fn replica_ids() {
        assert!(ReplicaId::new(0).is_none());
        let r: ReplicaId = "00000000000000ff".parse().expect("hex");
        assert_eq!(r.get(), 255);
        assert_eq!(r.to_string(), "00000000000000ff");
        assert!("0".parse::<ReplicaId>().is_err());
        assert!("xyz".parse::<ReplicaId>().is_err());
        assert!("11112222333344445".parse::<ReplicaId>().is_err());
    }
}
