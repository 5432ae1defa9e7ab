//! The edge <-> cloud wire: frame types and their codec.
//!
//! A frame on the wire is `[len: u32 big-endian][version: u8][body: bincode 2]`, where
//! `len` counts the version byte and the body. Decoding checks `len` against the
//! caller's limit before reading or allocating anything, and never panics.

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::ids::{ChannelName, ReplicaId};
use crate::op::{Ephemeral, Op};
use crate::replica::Snapshot;
use crate::state::Register;
use crate::vv::VersionVector;

/// The wire version this build speaks.
pub const WIRE_VERSION: u8 = 1;
/// Bytes before the body: length and version.
pub const HEADER_LEN: usize = 5;
/// The default hard limit on one frame (length field value), 8 MiB.
pub const DEFAULT_MAX_FRAME: usize = 8 << 20;
/// No frame may ever exceed this, whatever a config says.
pub const ABSOLUTE_MAX_FRAME: usize = codec::DECODE_LIMIT;

/// Which side of the link a peer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRole {
    Edge,
    Cloud,
}

/// One record of the clustered cloud tier's shared log (a JetStream stream; see
/// `cloud::jetstream`): an op a coordinator applied, or state it installed from a
/// snapshot (whose ops it never saw one by one). A `State` record with an empty `vv`
/// carries registers only (one part of a large state; merging a register is always
/// safe); the vector comes in the last part, after all its registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogRecord {
    Op(Op),
    State(Snapshot),
}

/// Messages of the replication state machine (see [`crate::sync`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncMsg {
    /// "This is my version vector for the channel; send me what I lack." `subscribe`
    /// registers interest in live ops; `reply` asks for the peer's vector back.
    Sync {
        channel: ChannelName,
        vv: VersionVector,
        subscribe: bool,
        reply: bool,
        /// The sender evicted this channel earlier and holds only what it wrote since:
        /// answer with a snapshot of the full state.
        full: bool,
    },
    /// Ops in applied (causal) order.
    Ops {
        channel: ChannelName,
        ops: Vec<Op>,
    },
    /// The sender has durably applied everything in `vv` for the channel.
    Ack {
        channel: ChannelName,
        vv: VersionVector,
    },
    /// Full state, when the receiver is behind compacted history.
    Snapshot {
        channel: ChannelName,
        snapshot: Snapshot,
    },
    /// The answer to a `full` sync: the upstream's state, floor and retained log, for
    /// a channel the receiver evicted and opened again.
    Rebase {
        channel: ChannelName,
        snapshot: Snapshot,
        floor: VersionVector,
        log: Vec<Op>,
    },
    /// No more live ops for this channel, please.
    Unsubscribe {
        channel: ChannelName,
    },
    /// A never-stored message fanned out to subscribers.
    Ephemeral {
        channel: ChannelName,
        msg: Ephemeral,
    },
    /// Liveness and RTT; `outbox` is the sender's count of unacked local ops and
    /// `clients` its connected clients.
    Heartbeat {
        sent_ms: u64,
        outbox: u64,
        clients: u64,
    },
    HeartbeatAck {
        sent_ms: u64,
    },
    /// An operator's instruction from the cloud to an edge.
    Command(Command),
    /// Part of a snapshot (or rebase) too large for one frame: registers, and for a
    /// rebase the retained log's ops in order. The parts of one transfer (`xfer`,
    /// chosen by the sender) travel first, in order, then the
    /// [`SyncMsg::SnapshotEnd`] that closes it. Every frame stays under the batch
    /// budget, so no snapshot is too large to send.
    SnapshotPart {
        channel: ChannelName,
        xfer: u64,
        /// This part's index in the transfer, from 0.
        part: u32,
        state: Vec<(String, Register)>,
        log: Vec<Op>,
    },
    /// Closes transfer `xfer` of `parts` parts: the snapshot's vector and, for the
    /// answer to a `full` sync, the floor (and the rest of the retained log) of a
    /// [`SyncMsg::Rebase`].
    /// A receiver that did not get every part drops the transfer (anti-entropy asks
    /// again); it never installs a vector whose state it lacks.
    SnapshotEnd {
        channel: ChannelName,
        xfer: u64,
        parts: u32,
        vv: VersionVector,
        rebase: Option<RebaseBase>,
    },
    /// Edge → upstream: a client reads this channel here without subscribing. "This
    /// is my vector; send me what I lack, then [`SyncMsg::FetchReply`] with `id`."
    /// (`full` as in [`SyncMsg::Sync`].) Added after the first release: coordinators
    /// must be upgraded before edges (docs/OPERATIONS.md, "Upgrades").
    Fetch {
        channel: ChannelName,
        vv: VersionVector,
        id: u64,
        full: bool,
    },
    /// Upstream → edge: the answer to [`SyncMsg::Fetch`] `id`, sent after what the
    /// edge lacked: the upstream's vector then. Once the edge holds it all, the read
    /// reflects everything the upstream had when it answered.
    FetchReply {
        channel: ChannelName,
        vv: VersionVector,
        id: u64,
    },
}

/// What a [`SyncMsg::Rebase`] carries besides the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebaseBase {
    pub floor: VersionVector,
    pub log: Vec<Op>,
}

/// Operator instructions the cloud sends to edges.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Tell every client to move to another endpoint and resume; stop being ready.
    Drain,
    /// Drop a channel from the edge's cache (if nothing there still needs it).
    Evict { channel: ChannelName },
}

/// One frame of protocol version 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// First frame from an edge: who it is and its credential.
    Hello {
        replica: ReplicaId,
        role: PeerRole,
        region: String,
        software: String,
        credential: String,
    },
    /// The cloud accepted the edge.
    Welcome {
        replica: ReplicaId,
    },
    /// First frame on the edge's second stream, which carries bulk data (ops,
    /// snapshots, ephemeral messages); the first stream carries control traffic.
    DataStream {
        replica: ReplicaId,
    },
    /// The link is refused or closed, with a stable code and a reason for the logs.
    Close {
        code: u16,
        reason: String,
    },
    Sync(SyncMsg),
}

impl SyncMsg {
    /// The channel whose stored state handling this message needs, if any: what a
    /// shell must make resident before it feeds the message to the node. Ephemeral
    /// messages are fanned out without it; operator commands go to the shell.
    pub fn stored_channel(&self) -> Option<&ChannelName> {
        match self {
            SyncMsg::Sync { channel, .. }
            | SyncMsg::Ops { channel, .. }
            | SyncMsg::Ack { channel, .. }
            | SyncMsg::Snapshot { channel, .. }
            | SyncMsg::Rebase { channel, .. }
            | SyncMsg::Unsubscribe { channel }
            | SyncMsg::SnapshotPart { channel, .. }
            | SyncMsg::SnapshotEnd { channel, .. }
            | SyncMsg::Fetch { channel, .. }
            | SyncMsg::FetchReply { channel, .. } => Some(channel),
            SyncMsg::Ephemeral { .. }
            | SyncMsg::Command(_)
            | SyncMsg::Heartbeat { .. }
            | SyncMsg::HeartbeatAck { .. } => None,
        }
    }

    /// Control traffic (handshake, sync vectors, acks, heartbeats) travels on its own
    /// stream so that it never queues behind bulk data.
    pub fn is_control(&self) -> bool {
        !matches!(
            self,
            SyncMsg::Ops { .. }
                | SyncMsg::Snapshot { .. }
                | SyncMsg::Ephemeral { .. }
                | SyncMsg::SnapshotPart { .. }
                | SyncMsg::SnapshotEnd { .. }
        )
    }
}

/// A frame tagged with its wire version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Versioned {
    V1(Frame),
}

/// Why bytes could not be decoded into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("incomplete frame: {needed} more bytes needed")]
    Incomplete { needed: usize },
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame could not be encoded: {0}")]
    Encode(String),
}

/// Appends one encoded frame to `out`. On error `out` is left as it was.
pub fn encode(frame: &Frame, max: usize, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, WIRE_VERSION]);
    if let Err(e) = codec::write_into(frame, out) {
        out.truncate(start);
        return Err(EncodeError::Encode(e.to_string()));
    }
    let len = out.len() - start - 4;
    let max = max.min(ABSOLUTE_MAX_FRAME);
    if len > max {
        out.truncate(start);
        return Err(EncodeError::TooLarge { len, max });
    }
    let len32 = u32::try_from(len).map_err(|_| EncodeError::TooLarge { len, max })?;
    out[start..start + 4].copy_from_slice(&len32.to_be_bytes());
    Ok(())
}

/// Encodes one frame into a fresh buffer.
pub fn encode_to_vec(frame: &Frame, max: usize) -> Result<Vec<u8>, EncodeError> {
    let mut v = Vec::new();
    encode(frame, max, &mut v)?;
    Ok(v)
}

/// Reads the length of the frame at the start of `buf`, checking it against `max`.
/// Returns the total bytes the frame occupies, header included.
pub fn frame_len(buf: &[u8], max: usize) -> Result<usize, DecodeError> {
    let Some(head) = buf.get(..4) else {
        return Err(DecodeError::Incomplete {
            needed: 4 - buf.len(),
        });
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let max = max.min(ABSOLUTE_MAX_FRAME);
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    if len == 0 {
        return Err(DecodeError::Malformed("empty frame".into()));
    }
    Ok(4 + len)
}

/// Decodes the frame at the start of `buf`. Returns it and the bytes it consumed.
pub fn decode(buf: &[u8], max: usize) -> Result<(Versioned, usize), DecodeError> {
    let total = frame_len(buf, max)?;
    let Some(frame) = buf.get(4..total) else {
        return Err(DecodeError::Incomplete {
            needed: total - buf.len(),
        });
    };
    let (&version, body) = frame
        .split_first()
        .ok_or_else(|| DecodeError::Malformed("no version byte".into()))?;
    match version {
        1 => {
            let f: Frame =
                codec::from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
            Ok((Versioned::V1(f), total))
        }
        v => Err(DecodeError::Malformed(format!(
            "unsupported wire version {v} (this build speaks {WIRE_VERSION})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_precise() {
        let f = Frame::Sync(SyncMsg::Heartbeat {
            sent_ms: 7,
            outbox: 0,
            clients: 0,
        });
        let bytes = encode_to_vec(&f, DEFAULT_MAX_FRAME).expect("enc");
        assert_eq!(
            decode(&bytes, DEFAULT_MAX_FRAME),
            Ok((Versioned::V1(f.clone()), bytes.len()))
        );
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1], DEFAULT_MAX_FRAME),
            Err(DecodeError::Incomplete { needed: 1 })
        ));
        assert!(matches!(
            decode(&[0, 0], DEFAULT_MAX_FRAME),
            Err(DecodeError::Incomplete { needed: 2 })
        ));
        assert!(matches!(
            decode(&[0xff, 0xff, 0xff, 0xff], DEFAULT_MAX_FRAME),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(
            encode_to_vec(&f, 2),
            Err(EncodeError::TooLarge { .. })
        ));
        let mut wrong_version = bytes.clone();
        wrong_version[4] = 9;
        assert!(matches!(
            decode(&wrong_version, DEFAULT_MAX_FRAME),
            Err(DecodeError::Malformed(_))
        ));
        // A Vec length prefix claiming 2^60 elements must fail without allocating.
        let mut huge = vec![0, 0, 0, 0, 1, 3, 1];
        huge.extend_from_slice(&[0xff; 10]);
        let len = (huge.len() - 4) as u32;
        huge[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            decode(&huge, DEFAULT_MAX_FRAME),
            Err(DecodeError::Malformed(_))
        ));
    }
}
