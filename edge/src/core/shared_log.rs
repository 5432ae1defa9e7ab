//! The shared op log of the clustered cloud tier, as the core sees it.
//!
//! A coordinator in a cluster stores every op it applies from its edges and clients in a
//! log all coordinators share (a NATS JetStream stream, `cloud::jetstream`), and reads
//! the others' ops back from it. The core queues those ops (under its lock) and the
//! group committer hands the queue to [`SharedLog::store`] after the local flush, so an
//! edge's op is acknowledged, and delivered, only once the log has stored it — the
//! output contract of `shared::sync` with the log as part of "durable". What is queued
//! is also written to a log outbox in local storage (with the op it carries), so a
//! coordinator that crashed before the log stored it sends it again when it starts.

use shared::ids::ChannelName;
use shared::wire::LogRecord;

/// Why the shared log could not store a batch (unreachable, no quorum, ack timeout).
/// The core keeps the batch and tries again.
#[derive(Debug, thiserror::Error)]
#[error("shared log: {0}")]
pub struct SharedLogError(pub String);

#[async_trait::async_trait]
pub trait SharedLog: Send + Sync + std::fmt::Debug {
    /// Stores `batch` in order; returns once the log has all of it. Storing a record
    /// the log already has must be harmless (it is dropped, or kept as a duplicate that
    /// every replica ignores): after a failure the same batch comes again.
    async fn store(&self, batch: &[(ChannelName, LogRecord)]) -> Result<(), SharedLogError>;

    /// Whether the log can take ops now (connected, stream present), and if not, why.
    fn health(&self) -> Result<(), String>;
}
