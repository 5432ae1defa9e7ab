//! The fleet's operator state across coordinators (the clustered cloud tier), on the
//! same NATS JetStream cluster as the op log, so that an operator sees and acts on the
//! whole fleet from any coordinator:
//!
//! - **Edge registry**: KV bucket `[jetstream] fleet_bucket`, key `edge.<replica>` =
//!   the [`EdgeEntry`] of the coordinator holding that edge's link, put every
//!   [`REPORT_EVERY`] while the link is up and once when it ends (only if the key is
//!   still this coordinator's: an edge that moved stays with its new coordinator).
//!   Every coordinator watches the bucket ([`Fleet::remote_report`]).
//! - **Revocations**: key `revoked.<edge name in base64url>` in the same bucket. Every
//!   coordinator adds it to its own persisted list and drops the edge's link if it
//!   holds it, so a revoked edge is refused by every coordinator.
//! - **Timeline**: stream `[jetstream] timeline_stream` (the last [`TIMELINE_KEEP`]
//!   events, subject `<fleet_prefix>.timeline`). Each coordinator publishes its events
//!   and reads everyone's, from the start of the stream at start-up (so the timeline
//!   outlives restarts).
//! - **Commands** (drain an edge, evict a channel): core NATS on
//!   `<fleet_prefix>.commands`, received by every coordinator, acted on by the one(s)
//!   holding the links. Not durable: a command is for the links that exist now.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, stream};
use base64::Engine;
use edge::config::JetStreamConfig;
use edge::core::Core;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use shared::wire::{Command, SyncMsg};
use shared::{ChannelName, ReplicaId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::Revocations;
use crate::fleet::{EdgeEntry, Fleet, FleetEvent};

/// How often a coordinator reports the links it holds.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);
/// Events the timeline stream keeps.
pub const TIMELINE_KEEP: i64 = 10_000;

/// One run of a long-lived fleet task: `Ok(position)` to start again from there (a
/// consumer that ended), `Err` after a failure.
type Job = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<u64>, String>> + Send>>;

/// An operator command for every coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetCommand {
    /// Tell the edge (by replica id) to move its clients elsewhere.
    Drain { edge: String },
    /// Tell every edge to drop the channel from its cache.
    Evict { channel: String },
}

/// A timeline event on the wire, with the run of the coordinator that recorded it
/// (its own events are already in its timeline).
#[derive(Debug, Serialize, Deserialize)]
struct TimelineRecord {
    run: u64,
    #[serde(flatten)]
    event: FleetEvent,
}

/// The shared fleet state of one coordinator.
#[derive(Debug)]
pub struct SharedFleet {
    js: jetstream::Context,
    cfg: JetStreamConfig,
    /// This process's run (events it recorded are not read back).
    run: u64,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

fn edge_key(id: ReplicaId) -> String {
    format!("edge.{id}")
}

fn revoked_key(name: &str) -> String {
    format!("revoked.{}", b64().encode(name))
}

impl SharedFleet {
    pub fn new(js: jetstream::Context, cfg: JetStreamConfig) -> Arc<Self> {
        Arc::new(Self {
            js,
            cfg,
            // Distinct per run: start time in nanoseconds and the process id.
            run: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ (u64::from(std::process::id()) << 40),
        })
    }

    fn commands_subject(&self) -> String {
        format!("{}.commands", self.cfg.fleet_prefix)
    }

    fn timeline_subject(&self) -> String {
        format!("{}.timeline", self.cfg.fleet_prefix)
    }

    async fn bucket(&self) -> Result<kv::Store, String> {
        if let Ok(kv) = self.js.get_key_value(&self.cfg.fleet_bucket).await {
            return Ok(kv);
        }
        self.js
            .create_key_value(kv::Config {
                bucket: self.cfg.fleet_bucket.clone(),
                description: "Outpost: edge registry and revocations, fleet-wide".into(),
                history: 1,
                storage: stream::StorageType::File,
                num_replicas: self.cfg.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("KV bucket {}: {e}", self.cfg.fleet_bucket))
    }

    async fn timeline(&self) -> Result<stream::Stream, String> {
        self.js
            .get_or_create_stream(stream::Config {
                name: self.cfg.timeline_stream.clone(),
                subjects: vec![self.timeline_subject()],
                storage: stream::StorageType::File,
                num_replicas: self.cfg.replicas,
                max_messages: TIMELINE_KEEP,
                discard: stream::DiscardPolicy::Old,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("stream {}: {e}", self.cfg.timeline_stream))
    }

    /// Sends a command to every coordinator (this one included).
    pub async fn command(&self, c: &FleetCommand) -> Result<(), String> {
        let body = serde_json::to_vec(c).map_err(|e| e.to_string())?;
        let client = self.js.client();
        client
            .publish(self.commands_subject(), body.into())
            .await
            .map_err(|e| e.to_string())?;
        client.flush().await.map_err(|e| e.to_string())
    }

    /// Records a revocation fleet-wide.
    pub async fn revoke(&self, name: &str) -> Result<(), String> {
        let kv = self.bucket().await?;
        kv.put(revoked_key(name), name.as_bytes().to_vec().into())
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Starts the tasks that keep this coordinator's fleet view shared.
    pub fn spawn(
        self: &Arc<Self>,
        fleet: Arc<Fleet>,
        revoked: Arc<Revocations>,
        core: Arc<Core>,
        shutdown: CancellationToken,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        fleet.publish_events_to(tx);
        let tasks = &core.tasks;
        tasks.spawn(retrying(
            "fleet: reporting links",
            shutdown.clone(),
            report_links(self.clone(), fleet.clone()),
        ));
        tasks.spawn(retrying(
            "fleet: watching the registry",
            shutdown.clone(),
            watch_registry(self.clone(), fleet.clone(), revoked, core.clone()),
        ));
        tasks.spawn(publish_timeline(self.clone(), rx, shutdown.clone()));
        tasks.spawn(retrying(
            "fleet: reading the timeline",
            shutdown.clone(),
            read_timeline(self.clone(), fleet.clone()),
        ));
        tasks.spawn(retrying(
            "fleet: operator commands",
            shutdown,
            commands(self.clone(), fleet, core.clone()),
        ));
    }
}

/// Runs `job` (made again by `make` after each failure, with backoff) until shutdown.
async fn retrying<F, Fut>(what: &'static str, shutdown: CancellationToken, make: F)
where
    F: Fn(Option<u64>) -> Fut,
    Fut: std::future::Future<Output = Result<Option<u64>, String>>,
{
    let mut delay = Duration::from_millis(200);
    let mut resume = None;
    loop {
        let job = make(resume);
        let r = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = job => r,
        };
        match r {
            Ok(pos) => {
                resume = pos;
                delay = Duration::from_millis(200);
            }
            Err(e) => tracing::warn!(error = %e, "{what}: interrupted, starting again"),
        }
        if !back_off(&shutdown, &mut delay).await {
            return;
        }
    }
}

/// Waits `delay` (doubled for next time, up to 5 s); false if shutdown came first.
async fn back_off(shutdown: &CancellationToken, delay: &mut Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => return false,
        _ = tokio::time::sleep(*delay) => {}
    }
    *delay = (*delay * 2).min(Duration::from_secs(5));
    true
}

/// Puts this coordinator's links into the registry: each live one every
/// [`REPORT_EVERY`]; an ended one once, if the key is still ours.
fn report_links(shared: Arc<SharedFleet>, fleet: Arc<Fleet>) -> impl Fn(Option<u64>) -> Job {
    move |_| {
        let (shared, fleet) = (shared.clone(), fleet.clone());
        Box::pin(async move {
            let kv = shared.bucket().await?;
            // Per edge: the link number and whether its end was reported.
            let mut reported: HashMap<ReplicaId, (u64, bool)> = HashMap::new();
            let mut tick = tokio::time::interval(REPORT_EVERY);
            loop {
                tick.tick().await;
                for (id, e) in fleet.local() {
                    let key = edge_key(id);
                    let body = serde_json::to_vec(&e).map_err(|e| e.to_string())?;
                    if e.connected {
                        kv.put(&key, body.into()).await.map_err(|e| e.to_string())?;
                        reported.insert(id, (e.links, false));
                        continue;
                    }
                    if reported.get(&id) == Some(&(e.links, true)) {
                        continue;
                    }
                    // The end of our link: only over our own report (compare-and-set
                    // on the revision), never over the coordinator it moved to.
                    let current = kv.entry(&key).await.map_err(|e| e.to_string())?;
                    let ours = current.as_ref().is_none_or(|c| {
                        serde_json::from_slice::<EdgeEntry>(&c.value)
                            .map(|r| r.coordinator == fleet.me())
                            .unwrap_or(true)
                    });
                    if ours {
                        let r = match current {
                            Some(c) => kv
                                .update(&key, body.into(), c.revision)
                                .await
                                .map(|_| ())
                                .map_err(|e| e.to_string()),
                            None => kv
                                .create(&key, body.into())
                                .await
                                .map(|_| ())
                                .map_err(|e| e.to_string()),
                        };
                        // Lost a race with the edge's new coordinator: theirs stands.
                        if let Err(e) = r {
                            tracing::debug!(edge = %id, error = %e, "fleet: link end not reported");
                        }
                    }
                    reported.insert(id, (e.links, true));
                }
            }
        })
    }
}

/// Watches the registry: other coordinators' edges, and revocations.
fn watch_registry(
    shared: Arc<SharedFleet>,
    fleet: Arc<Fleet>,
    revoked: Arc<Revocations>,
    core: Arc<Core>,
) -> impl Fn(Option<u64>) -> Job {
    move |_| {
        let (shared, fleet, revoked, core) =
            (shared.clone(), fleet.clone(), revoked.clone(), core.clone());
        Box::pin(async move {
            let kv = shared.bucket().await?;
            let mut watch = kv
                .watch_with_history(">")
                .await
                .map_err(|e| e.to_string())?;
            while let Some(entry) = watch.next().await {
                let entry = entry.map_err(|e| e.to_string())?;
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                if let Some(id) = entry.key.strip_prefix("edge.") {
                    let (Ok(id), Ok(e)) = (
                        id.parse::<ReplicaId>(),
                        serde_json::from_slice::<EdgeEntry>(&entry.value),
                    ) else {
                        tracing::warn!(key = %entry.key, "fleet: a registry entry that does not parse; skipped");
                        continue;
                    };
                    fleet.remote_report(id, e);
                } else if entry.key.starts_with("revoked.") {
                    let name = String::from_utf8_lossy(&entry.value).to_string();
                    if revoked.contains(&name) {
                        continue;
                    }
                    if let Err(e) = revoked.add(&core, &name) {
                        tracing::warn!(edge = %name, error = %e.message, "fleet: could not store a revocation locally");
                    }
                    for (id, n) in fleet.names() {
                        if n == name && fleet.linked_here(id) {
                            core.router.kill(id);
                        }
                    }
                    tracing::warn!(edge = %name, "edge revoked fleet-wide");
                }
            }
            Err("the registry watch ended".into())
        })
    }
}

/// Publishes this coordinator's events to the timeline stream, in order, retrying
/// each until the stream has it.
async fn publish_timeline(
    shared: Arc<SharedFleet>,
    mut rx: mpsc::UnboundedReceiver<FleetEvent>,
    shutdown: CancellationToken,
) {
    let subject = shared.timeline_subject();
    let mut ready = false;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = rx.recv() => match e { Some(e) => e, None => return },
        };
        let body = match serde_json::to_vec(&TimelineRecord {
            run: shared.run,
            event,
        }) {
            Ok(b) => bytes::Bytes::from(b),
            Err(_) => continue,
        };
        let mut delay = Duration::from_millis(200);
        loop {
            if !ready {
                ready = shared.timeline().await.is_ok();
            }
            let r = match ready {
                true => match shared.js.publish(subject.clone(), body.clone()).await {
                    Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                false => Err("timeline stream not ready".into()),
            };
            match r {
                Ok(()) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "fleet: timeline event not stored yet, retrying")
                }
            }
            if !back_off(&shutdown, &mut delay).await {
                return;
            }
        }
    }
}

/// Reads the timeline stream (from its start, then from where it stopped) into this
/// coordinator's timeline, skipping this run's own events.
fn read_timeline(shared: Arc<SharedFleet>, fleet: Arc<Fleet>) -> impl Fn(Option<u64>) -> Job {
    move |resume| {
        let (shared, fleet) = (shared.clone(), fleet.clone());
        Box::pin(async move {
            let stream = shared.timeline().await?;
            let deliver_policy = match resume {
                Some(seq) => consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: seq + 1,
                },
                None => consumer::DeliverPolicy::All,
            };
            let consumer = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    deliver_policy,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
            let mut last = resume;
            let started = Instant::now();
            while let Some(m) = messages.next().await {
                let Ok(m) = m else {
                    // Start again from the last event read.
                    tracing::debug!(after = ?started.elapsed(), "fleet: timeline consumer interrupted");
                    return Ok(last);
                };
                if let Ok(info) = m.info() {
                    last = Some(info.stream_sequence);
                }
                match serde_json::from_slice::<TimelineRecord>(&m.payload) {
                    Ok(r) if r.run == shared.run => {}
                    Ok(r) => fleet.insert_event(r.event),
                    Err(e) => {
                        tracing::warn!(error = %e, "fleet: a timeline event that does not parse; skipped")
                    }
                }
            }
            Ok(last)
        })
    }
}

/// Acts on operator commands for the links this coordinator holds.
fn commands(
    shared: Arc<SharedFleet>,
    fleet: Arc<Fleet>,
    core: Arc<Core>,
) -> impl Fn(Option<u64>) -> Job {
    move |_| {
        let (shared, fleet, core) = (shared.clone(), fleet.clone(), core.clone());
        Box::pin(async move {
            let mut sub = shared
                .js
                .client()
                .subscribe(shared.commands_subject())
                .await
                .map_err(|e| e.to_string())?;
            while let Some(m) = sub.next().await {
                match serde_json::from_slice::<FleetCommand>(&m.payload) {
                    Ok(c) => act(&fleet, &core, &c),
                    Err(e) => {
                        tracing::warn!(error = %e, "fleet: a command that does not parse; skipped")
                    }
                }
            }
            Err("the command subscription ended".into())
        })
    }
}

/// Carries out a command on this coordinator's links (also the embedded cloud's path).
pub fn act(fleet: &Fleet, core: &Core, c: &FleetCommand) {
    match c {
        FleetCommand::Drain { edge } => {
            let Ok(id) = edge.parse::<ReplicaId>() else {
                return;
            };
            if fleet.linked_here(id) {
                core.router.send(id, SyncMsg::Command(Command::Drain));
                tracing::warn!(edge = %id, "drain sent to the edge");
            }
        }
        FleetCommand::Evict { channel } => {
            let Ok(ch) = ChannelName::new(channel.clone()) else {
                return;
            };
            let edges: Vec<ReplicaId> = core.with_node(|n| n.peers().keys().copied().collect());
            for id in &edges {
                core.router.send(
                    *id,
                    SyncMsg::Command(Command::Evict {
                        channel: ch.clone(),
                    }),
                );
            }
            tracing::info!(channel = %ch, edges = edges.len(), "eviction sent to this coordinator's edges");
        }
    }
}
