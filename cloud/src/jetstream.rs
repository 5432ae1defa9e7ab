//! The clustered cloud tier's shared op log on NATS JetStream.
//!
//! **Layout.** One stream (`[jetstream] stream`, default `OUTPOST_OPS`, file storage,
//! `replicas` copies — 3 in production) over the subjects `<subject_prefix>.>`; a
//! channel is the subject `<subject_prefix>.<channel name in base64url>`, so any
//! channel name is a valid single subject token and one stream (one Raft group) holds
//! every channel. One message per [`LogRecord`], its bincode encoding
//! (`shared::codec`): an op, with `Nats-Msg-Id: <channel>/<dot>` so that a copy sent
//! again within the stream's duplicate window (2 minutes) is dropped by the server (a
//! copy after the window is dropped by the replica, which already has the dot); or
//! state a coordinator installed from an edge's snapshot, in parts of at most
//! [`STATE_PART_BYTES`] of registers followed by one part with the vector.
//!
//! **Writes.** The core queues every op it applies from an edge or a client and the
//! group committer hands the queue to [`SharedLog::store`]: every op published in
//! order and acknowledged by the stream, i.e. stored on a majority of its replicas
//! (each server fsyncing every write with `sync_interval: always`). Only then does the
//! coordinator ack the edge or the client. A failed store is retried with the same
//! batch.
//!
//! **Reads.** Every coordinator tails the stream ([`tail`]) from the position it has
//! applied (kept in its own sled) and hands other coordinators' ops to its node
//! (`Input::Logged`), which applies them and forwards them to its edges.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::PublishAckFuture, stream};
use base64::Engine;
use bytes::Bytes;
use edge::config::JetStreamConfig;
use edge::core::{Core, SharedLog, SharedLogError};
use futures_util::StreamExt;
use shared::ids::ChannelName;
use shared::replica::Snapshot;
use shared::wire::LogRecord;
use tokio_util::sync::CancellationToken;

/// Publishes in flight at once during a flush (the client's ack window).
const PUBLISH_WINDOW: usize = 1024;
/// Registers per state part stay under this (NATS's default `max_payload` is 1 MiB).
pub const STATE_PART_BYTES: usize = 256 << 10;
/// How often the tail checks that it is not stuck behind the stream's end.
const STALL_CHECK_EVERY: Duration = Duration::from_secs(3);
/// How often the tail records the position it has applied.
const POSITION_EVERY: Duration = Duration::from_millis(500);

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// The subject of a channel's ops.
pub fn subject(prefix: &str, channel: &ChannelName) -> String {
    format!("{prefix}.{}", b64().encode(channel.as_str()))
}

/// The channel a subject names, if it is one of ours.
pub fn channel_of(prefix: &str, subject: &str) -> Option<ChannelName> {
    let token = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let bytes = b64().decode(token).ok()?;
    ChannelName::new(String::from_utf8(bytes).ok()?).ok()
}

/// The JetStream side of a coordinator: connection and stream.
#[derive(Debug)]
pub struct JetStreamLog {
    js: jetstream::Context,
    cfg: JetStreamConfig,
    /// The stream exists and answered (set by [`JetStreamLog::ensure_stream`]).
    stream_ready: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl JetStreamLog {
    /// Starts connecting (in the background, retrying for as long as it takes: a
    /// coordinator may start before its NATS servers).
    pub async fn connect(cfg: &JetStreamConfig) -> Result<Arc<Self>, async_nats::ConnectError> {
        let mut opts = async_nats::ConnectOptions::new()
            .name("outpost-cloud")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2));
        if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &cfg.token {
            opts = opts.token(t.clone());
        }
        let servers: Vec<async_nats::ServerAddr> = cfg
            .servers
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, std::io::Error>>()
            .map_err(|e| {
                async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::ServerParse, e)
            })?;
        let client = opts.connect(servers).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_millis(cfg.ack_timeout_ms))
            .ack_timeout(Duration::from_millis(cfg.ack_timeout_ms))
            .build(client);
        Ok(Arc::new(Self {
            js,
            cfg: cfg.clone(),
            stream_ready: AtomicBool::new(false),
            last_error: Mutex::new(Some("connecting to NATS".into())),
        }))
    }

    /// The JetStream context (the fleet state shares the connection).
    pub fn context(&self) -> jetstream::Context {
        self.js.clone()
    }

    fn set_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.cfg.stream.clone(),
            subjects: vec![format!("{}.>", self.cfg.subject_prefix)],
            storage: stream::StorageType::File,
            num_replicas: self.cfg.replicas,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        }
    }

    /// Creates the stream if it does not exist (every coordinator may; they agree on
    /// the configuration), retrying until it works or `shutdown`.
    pub async fn ensure_stream(&self, shutdown: &CancellationToken) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.js.get_or_create_stream(self.stream_config()).await {
                Ok(_) => {
                    self.stream_ready.store(true, Ordering::SeqCst);
                    self.set_error(None);
                    tracing::info!(stream = %self.cfg.stream, replicas = self.cfg.replicas, "JetStream stream ready");
                    return true;
                }
                Err(e) => {
                    let why = format!("stream {}: {e}", self.cfg.stream);
                    tracing::warn!(error = %why, "JetStream not ready, retrying");
                    self.set_error(Some(why));
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

#[async_trait::async_trait]
impl SharedLog for JetStreamLog {
    async fn store(&self, batch: &[(ChannelName, LogRecord)]) -> Result<(), SharedLogError> {
        if !self.stream_ready.load(Ordering::SeqCst) {
            return Err(SharedLogError("the stream is not ready yet".into()));
        }
        let result = self.publish_all(batch).await;
        self.set_error(result.as_ref().err().map(|e| e.0.clone()));
        result
    }

    fn health(&self) -> Result<(), String> {
        use async_nats::connection::State;
        if self.js.client().connection_state() != State::Connected {
            return Err("not connected to NATS".into());
        }
        if !self.stream_ready.load(Ordering::SeqCst) {
            let why = self
                .last_error
                .lock()
                .ok()
                .and_then(|g| g.clone())
                .unwrap_or_else(|| "stream not ready".into());
            return Err(why);
        }
        Ok(())
    }
}

/// The messages of one record: (message id, payload).
fn messages(
    channel: &ChannelName,
    record: &LogRecord,
) -> Result<Vec<(String, Vec<u8>)>, shared::codec::CodecError> {
    match record {
        LogRecord::Op(op) => Ok(vec![(
            format!("{channel}/{}", op.dot),
            shared::codec::to_bytes(record)?,
        )]),
        LogRecord::State(snap) => {
            // Parts of registers (a part alone changes nothing a merge cannot), then
            // the vector: a reader that stops midway installed no vector it lacks
            // state for.
            use sha2::Digest;
            let vv = shared::codec::to_bytes(&snap.vv)?;
            let id = hex::encode(&sha2::Sha256::digest(&vv)[..12]);
            let mut out = Vec::new();
            let mut part = Snapshot {
                vv: Default::default(),
                state: Default::default(),
            };
            let mut bytes = 0;
            for (k, r) in &snap.state {
                let size = k.len() + shared::codec::to_bytes(r)?.len();
                if bytes + size > STATE_PART_BYTES && !part.state.is_empty() {
                    let rec = LogRecord::State(std::mem::replace(
                        &mut part,
                        Snapshot {
                            vv: Default::default(),
                            state: Default::default(),
                        },
                    ));
                    out.push((
                        format!("{channel}/state/{id}/{}", out.len()),
                        shared::codec::to_bytes(&rec)?,
                    ));
                    bytes = 0;
                }
                bytes += size;
                part.state.insert(k.clone(), r.clone());
            }
            if !part.state.is_empty() {
                out.push((
                    format!("{channel}/state/{id}/{}", out.len()),
                    shared::codec::to_bytes(&LogRecord::State(part))?,
                ));
            }
            let end = LogRecord::State(Snapshot {
                vv: snap.vv.clone(),
                state: Default::default(),
            });
            out.push((
                format!("{channel}/state/{id}/end"),
                shared::codec::to_bytes(&end)?,
            ));
            Ok(out)
        }
    }
}

impl JetStreamLog {
    /// Publishes in order, up to [`PUBLISH_WINDOW`] awaiting their acks at once.
    async fn publish_all(&self, batch: &[(ChannelName, LogRecord)]) -> Result<(), SharedLogError> {
        let err = |what: &str, e: &dyn std::fmt::Display| SharedLogError(format!("{what}: {e}"));
        let mut msgs = Vec::with_capacity(batch.len());
        for (channel, record) in batch {
            // A record the core produced always encodes.
            for (id, payload) in messages(channel, record).map_err(|e| err("encode", &e))? {
                msgs.push((subject(&self.cfg.subject_prefix, channel), id, payload));
            }
        }
        for chunk in msgs.chunks(PUBLISH_WINDOW) {
            let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(chunk.len());
            for (subject, id, payload) in chunk {
                let msg = jetstream::message::PublishMessage::build()
                    .payload(Bytes::from(payload.clone()))
                    .message_id(id);
                let ack = self
                    .js
                    .send_publish(subject.clone(), msg)
                    .await
                    .map_err(|e| err("publish", &e))?;
                acks.push(ack);
            }
            for (ack, (_, id, _)) in acks.into_iter().zip(chunk) {
                let ack = ack.await.map_err(|e| err("stream ack", &e))?;
                tracing::debug!(%id, seq = ack.sequence, duplicate = ack.duplicate, "stored in the shared log");
            }
        }
        Ok(())
    }
}

/// The sled key of the stream position this coordinator has applied.
fn position_key(stream: &str) -> String {
    format!("jetstream_position:{stream}")
}

/// Applies every op in the stream after the stored position to `core`, then every new
/// one, until `shutdown`. The ordered consumer recreates itself across server and
/// leader changes; this loop starts it again after anything else.
pub async fn tail(log: Arc<JetStreamLog>, core: Arc<Core>, shutdown: CancellationToken) {
    if !log.ensure_stream(&shutdown).await {
        return;
    }
    let key = position_key(&log.cfg.stream);
    let mut delay = Duration::from_millis(100);
    loop {
        let applied = core
            .storage()
            .ok()
            .and_then(|s| s.meta(&key).ok().flatten())
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        match tail_from(&log, &core, applied, &key, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "shared log tail interrupted, starting again");
                metrics::counter!("outpost_shared_log_tail_restarts_total").increment(1);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

async fn tail_from(
    log: &JetStreamLog,
    core: &Arc<Core>,
    applied: u64,
    key: &str,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let stream = log
        .js
        .get_stream(&log.cfg.stream)
        .await
        .map_err(|e| e.to_string())?;
    let deliver_policy = if applied == 0 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: applied + 1,
        }
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("{}.>", log.cfg.subject_prefix),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    tracing::info!(from = applied + 1, "tailing the shared log");
    let prefix = log.cfg.subject_prefix.clone();
    let mut last = applied;
    let mut saved = applied;
    let mut tick = tokio::time::interval(POSITION_EVERY);
    // A consumer that stays silent with records waiting (a leader change it did not
    // notice, say) would leave this coordinator behind for good: the watchdog compares
    // the stream's last sequence with what arrived and starts the tail again.
    let mut watchdog = tokio::time::interval(STALL_CHECK_EVERY);
    watchdog.tick().await;
    let mut seen_at_check = last;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = watchdog.tick() => {
                if last == seen_at_check {
                    if let Ok(info) = stream.get_info().await {
                        if info.state.last_sequence > last {
                            metrics::counter!("outpost_shared_log_tail_stalls_total").increment(1);
                            return Err(format!(
                                "no record for {STALL_CHECK_EVERY:?} at position {last} while the stream ends at {}",
                                info.state.last_sequence
                            ));
                        }
                    }
                }
                seen_at_check = last;
            }
            _ = tick.tick() => {
                if last > saved {
                    // The position is stored only once the ops before it are durable
                    // here: a restart applies again at most what came since.
                    let gen = core.written();
                    tracing::debug!(position = last, gen, "shared log tail: saving the position");
                    core.wait_durable(gen).await.map_err(|e| e.to_string())?;
                    tracing::debug!(position = last, "shared log tail: position durable");
                    let storage = core.storage().map_err(|e| e.to_string())?;
                    storage.set_meta(key, &last.to_be_bytes()).map_err(|e| e.to_string())?;
                    saved = last;
                }
            }
            m = messages.next() => {
                let m = match m {
                    None => return Err("the consumer ended".into()),
                    Some(Err(e)) => return Err(e.to_string()),
                    Some(Ok(m)) => m,
                };
                if let Ok(info) = m.info() {
                    last = info.stream_sequence;
                }
                let Some(channel) = channel_of(&prefix, m.subject.as_str()) else {
                    tracing::warn!(subject = %m.subject, "shared log: a subject that names no channel; skipped");
                    continue;
                };
                match shared::codec::from_bytes::<LogRecord>(&m.payload) {
                    Ok(record) => core.handle(shared::sync::Input::Logged(channel, record)),
                    Err(e) => tracing::warn!(error = %e, %channel, "shared log: a record that does not decode; skipped"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_channel_name_is_one_subject_token() {
        for name in ["a", "project:42/run.7", "with space*and>", "ünïcode"] {
            let Ok(c) = ChannelName::new(name) else {
                continue;
            };
            let s = subject("outpost.ops", &c);
            let token = s.strip_prefix("outpost.ops.").unwrap_or("");
            assert!(!token.is_empty());
            assert!(!token.contains(['.', '*', '>', ' ']), "{s}");
            assert_eq!(channel_of("outpost.ops", &s), Some(c));
        }
        assert_eq!(channel_of("outpost.ops", "other.x"), None);
        assert_eq!(channel_of("outpost.ops", "outpost.ops.!!"), None);
    }

    #[test]
    fn a_large_state_goes_in_parts_with_the_vector_last() {
        use shared::hlc::Hlc;
        use shared::replica::{ChannelReplica, LocalWrite, ReplicaConfig};
        let channel = ChannelName::new("project:big").unwrap_or_else(|e| panic!("{e}"));
        let me = shared::ReplicaId::new(7).unwrap_or_else(|| panic!("id"));
        let mut r = ChannelReplica::new(channel.clone(), me, ReplicaConfig::default());
        let value = shared::op::Payload::from_value(&"x".repeat(20_000));
        for i in 0..40u64 {
            let write = LocalWrite::Set {
                key: format!("k{i}"),
                value: value.clone(),
                context: Default::default(),
                by: None,
            };
            r.local(
                Hlc {
                    wall_ms: i,
                    logical: 0,
                },
                write,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let snap = r.snapshot();
        let msgs =
            messages(&channel, &LogRecord::State(snap.clone())).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            msgs.len() >= 4,
            "800 KB of registers in parts: {}",
            msgs.len()
        );
        let mut merged = Snapshot {
            vv: Default::default(),
            state: Default::default(),
        };
        for (i, (id, payload)) in msgs.iter().enumerate() {
            assert!(
                payload.len() < 512 << 10,
                "part {i} is {} bytes",
                payload.len()
            );
            let Ok(LogRecord::State(part)) = shared::codec::from_bytes::<LogRecord>(payload) else {
                panic!("part {i} is not a state record");
            };
            let last = i + 1 == msgs.len();
            assert_eq!(
                part.vv.is_empty(),
                !last,
                "only the last part ({id}) has the vector"
            );
            merged.vv.merge(&part.vv);
            merged.state.extend(part.state);
        }
        assert_eq!(merged, snap);
    }
}
