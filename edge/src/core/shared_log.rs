//! The shared op log of the clustered cloud tier, as the core sees it.
//!
//! A coordinator in a cluster stores every op it applies from its edges and clients in a
//! log all coordinators share (a NATS JetStream stream, `cloud::jetstream`), and reads
//! the others' ops back from it. The core needs two things of it: queue an op (under
//! its lock, so without waiting) and a durability point. The group committer awaits
//! [`SharedLog::flush`] after the local flush, so an edge's op is acknowledged, and
//! delivered, only once the log has stored it — the output contract of
//! `shared::sync` with the log as part of "durable".

use shared::ids::ChannelName;
use shared::op::Op;

/// Why the shared log could not store what was queued (unreachable, no quorum, ack
/// timeout). Nothing queued is dropped: the next flush sends it again.
#[derive(Debug, thiserror::Error)]
#[error("shared log: {0}")]
pub struct SharedLogError(pub String);

#[async_trait::async_trait]
pub trait SharedLog: Send + Sync + std::fmt::Debug {
    /// Queues an op this node applied from a peer or a client (never one it read
    /// from the log). Called under the core's lock: must not block.
    fn append(&self, channel: &ChannelName, op: &Op);

    /// Resolves once the log has stored every op queued before the call. On an error
    /// the ops stay queued, in order, and the next call sends them again (the log
    /// drops a copy it already has).
    async fn flush(&self) -> Result<(), SharedLogError>;

    /// Whether the log can take ops now (connected, stream present), and if not, why.
    fn health(&self) -> Result<(), String>;
}
