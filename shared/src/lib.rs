//! Outpost's replication core.
//!
//! Pure and deterministic: no sockets, no async runtime, no storage engine, no clock or
//! randomness read directly — time and randomness are inputs. The edge and cloud
//! binaries are I/O shells around [`sync::Node`].
//!
//! - [`ids`]: replica ids, channel names, dots.
//! - [`vv`]: version vectors; [`token`]: resume tokens.
//! - [`hlc`]: hybrid logical clock.
//! - [`op`]: ops and payloads; [`state`]: multi-value registers; [`replica`]: one
//!   channel at one replica (log, causal buffer, state, snapshots, compaction).
//! - [`sync`]: the edge <-> cloud replication state machine.
//! - [`codec`]: the binary encoding (bincode 2) used by storage and the wire.
//! - [`wire`]: edge <-> cloud frames and codec; [`client`]: the client JSON protocol.

pub mod client;
pub mod codec;
pub mod hlc;
pub mod ids;
pub mod op;
pub mod pattern;
pub mod replica;
pub mod state;
pub mod store;
pub mod sync;
pub mod token;
pub mod vv;
pub mod wire;

#[cfg(feature = "test-utils")]
pub mod sim;

pub use hlc::{Hlc, HlcClock};
pub use ids::{ChannelName, Dot, ReplicaId};
pub use op::{Ephemeral, Op, OpBody, Payload};
pub use replica::{ChannelReplica, LocalOutcome, LocalWrite, ReplicaConfig};
pub use state::{Conflict, Register, Sibling};
pub use sync::{Input, Node, Output, Persist, Retention, Role, SyncConfig};
pub use vv::VersionVector;
