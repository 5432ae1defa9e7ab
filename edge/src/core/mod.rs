//! The replication node's I/O shell: owns the sans-IO [`Node`], carries out its outputs
//! (storage, fan-out, uplink), and runs the group commit.
//!
//! Output contract (see `shared::sync`): storage actions are applied to sled at once;
//! every other output produced after a storage action waits in the [`CommitQueue`]
//! until the group committer has flushed it, so nothing that is not durable is ever delivered, sent or
//! acknowledged. In `os` durability mode the flush is skipped and outputs run at once.
//!
//! Residency (which channels are in memory) is in [`residency`].

mod fetch;
mod residency;
mod shared_log;

pub use shared_log::{SharedLog, SharedLogError};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shared::client::ErrorCode;
use shared::pattern::ChannelPattern;
use shared::replica::{LocalOutcome, LocalWrite, NeedSnapshot, ReplicaError};
use shared::store::Store;
use shared::sync::{Input, Node, Output, Persist, Role, SyncConfig};
use shared::wire::{LogRecord, SyncMsg};
use shared::{ChannelName, Ephemeral, Op, Register, ReplicaId, VersionVector};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::commit::CommitQueue;
use crate::config::{Durability, EdgeConfig};
use crate::fanout::{ConnHandle, Fanout, Replay};
use crate::link::router::PeerRouter;
use crate::storage::{Storage, StorageError};

/// Stored channels the cache sweep looks at per round for ones that are not resident
/// (and loads to evict when idle); the next round goes on from there.
const COLD_SCAN_PER_SWEEP: usize = 1000;

/// The resident channels with their approximate bytes and last use, least recently
/// used first (never used since loaded counts as oldest), and their total bytes.
type Sized = (ChannelName, u64, Option<Instant>);
fn by_last_use(g: &Inner) -> (Vec<Sized>, u64) {
    let mut sizes: Vec<Sized> = g
        .node
        .channels()
        .map(|c| {
            let name = c.channel().clone();
            let used = g.last_used.get(&name).copied();
            (name, c.approx_bytes(), used)
        })
        .collect();
    let total = sizes.iter().map(|(_, b, _)| b).sum();
    sizes.sort_by_key(|(_, _, used)| *used);
    (sizes, total)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A request the core refused.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("storage unavailable: {0}")]
    Storage(String),
    #[error("{0}")]
    TooMany(String),
    /// Asked of a node that does not serve it (a namespace subscription on an edge).
    #[error("{0}")]
    NotHere(String),
}

impl CoreError {
    pub fn code(&self) -> ErrorCode {
        match self {
            CoreError::Replica(ReplicaError::Op(_)) => ErrorCode::BadRequest,
            CoreError::Replica(_) => ErrorCode::Internal,
            CoreError::Storage(_) => ErrorCode::StorageUnavailable,
            CoreError::TooMany(_) => ErrorCode::TooManySubscriptions,
            CoreError::NotHere(_) => ErrorCode::BadRequest,
        }
    }
}

impl From<StorageError> for CoreError {
    fn from(e: StorageError) -> Self {
        CoreError::Storage(e.to_string())
    }
}

#[derive(Clone, Debug, Default)]
struct FlushState {
    flushed: u64,
    /// Generations up to this failed to flush, with the reason.
    failed: Option<(u64, String)>,
}

struct Inner {
    node: Node,
    /// Outputs waiting for the storage writes before them to be durable.
    commit: CommitQueue<Output>,
    /// When each channel was last used by a local client (cache eviction; kept when
    /// a channel is unloaded, so cold channels still age out of the cache).
    last_used: HashMap<ChannelName, Instant>,
    /// Where the cache sweep's walk over the stored names goes on.
    cold_cursor: Option<ChannelName>,
    /// Counts channels leaving memory (unloaded, evicted, node rebuilt): a channel
    /// read from disk outside the lock is installed only if none left meanwhile.
    departures: u64,
    /// Dots of the shared-log ops being handled now: applied here, not appended again.
    from_log: std::collections::HashSet<shared::Dot>,
    /// A state record from the shared log is being installed now (not queued again).
    from_log_state: bool,
    /// Clustered: records the shared log must store (ops applied here, state
    /// installed from snapshots), in order, each under its log-outbox seq; the group
    /// committer takes them after the local flush.
    log_queue: Vec<(u64, ChannelName, LogRecord)>,
    next_log_seq: u64,
    /// Set at start when the log outbox held records: every output waits for them to
    /// be stored (an edge must not be acked from local storage alone).
    log_barrier: bool,
}

/// The edge's (or cloud's) replica with its storage and subscribers.
pub struct Core {
    inner: Mutex<Inner>,
    /// The open database; `None` while it is being reopened after a failure.
    storage: std::sync::RwLock<Option<Arc<Storage>>>,
    /// Where storage lives and its cache size, to reopen it.
    storage_at: (std::path::PathBuf, u64),
    /// A write or flush failed (disk full, I/O error): the storage must be reopened.
    storage_broken: std::sync::atomic::AtomicBool,
    storage_repair: Notify,
    pub fanout: Fanout,
    pub id: ReplicaId,
    durability: Durability,
    commit_window: Duration,
    flush_wake: Notify,
    flushed: watch::Sender<FlushState>,
    /// Links to peers (the cloud for an edge; the edges for the cloud).
    pub router: PeerRouter,
    /// Cancelled when an operator drains this node: clients are told to go elsewhere.
    pub draining: CancellationToken,
    /// Ops received from each peer (for the fleet timeline).
    pub ops_in: Mutex<HashMap<ReplicaId, u64>>,
    evict_requests: Mutex<Vec<ChannelName>>,
    /// Reads waiting for the upstream (see `fetch.rs`).
    fetch_waiters: Mutex<fetch::FetchWaiters>,
    sync_config: SyncConfig,
    /// Resident channels' byte budget and idle time (`[storage]`).
    residency: (u64, Duration),
    /// Every background task of this node; shutdown waits for them all.
    pub tasks: tokio_util::task::TaskTracker,
    /// When this process opened the node (channels not used since count from here).
    started: Instant,
    /// Clustered cloud tier: the log every applied op must reach before it is acked.
    shared_log: Option<Arc<dyn SharedLog>>,
    /// The shared log stored everything asked of it at the last flush (`/readyz`).
    shared_log_ok: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Builds the replication config from the edge config.
pub fn sync_config(cfg: &EdgeConfig) -> SyncConfig {
    let conv = |r: &crate::config::Retention| shared::Retention {
        max_ops: r.max_ops,
        max_age_ms: r.max_age_secs.map(|s| s.saturating_mul(1000)),
    };
    SyncConfig {
        retention: conv(&cfg.history.default),
        namespace_retention: cfg
            .history
            .namespaces
            .iter()
            .map(|(k, v)| (k.clone(), conv(v)))
            .collect(),
        batch_bytes: cfg.link_batch_bytes(),
        // An edge without an uplink never gets acks: its channels may go to disk.
        pin_outbox: cfg.uplink.is_some(),
        ..SyncConfig::default()
    }
}

impl Core {
    /// Opens storage and rebuilds the node from it. With `shared_log` (a coordinator of
    /// the clustered cloud tier), ops count as durable only once the log has them.
    pub fn open(
        cfg: &EdgeConfig,
        role: Role,
        shared_log: Option<Arc<dyn SharedLog>>,
    ) -> Result<Arc<Self>, CoreError> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| CoreError::Storage(format!("{}: {e}", cfg.data_dir.display())))?;
        let storage = Storage::open(&cfg.data_dir, cfg.storage.cache_mb)?;
        let id = storage.replica_id()?;
        // Start-up reads only what the link needs: channels with unacked local ops.
        // Every other channel is loaded when something names it.
        let fanout = Fanout::default();
        let sync_cfg = sync_config(cfg);
        let node = Self::restore_node(&storage, id, role, sync_cfg.clone(), &fanout, Vec::new())?;
        // A coordinator that stopped before the shared log stored some records sends
        // them again (the log drops what it has; replicas ignore duplicates).
        let log_queue = match &shared_log {
            Some(_) => storage.log_outbox()?,
            None => Vec::new(),
        };
        let next_log_seq = log_queue.last().map_or(1, |(seq, _, _)| seq + 1);
        if !log_queue.is_empty() {
            tracing::info!(
                records = log_queue.len(),
                "sending records the shared log may lack again"
            );
        }
        // Restored channels count as used now: idle eviction starts counting at start.
        let last_used: HashMap<ChannelName, Instant> = node
            .channels()
            .map(|c| (c.channel().clone(), Instant::now()))
            .collect();
        Ok(Arc::new(Self {
            storage: std::sync::RwLock::new(Some(Arc::new(storage))),
            storage_at: (cfg.data_dir.clone(), cfg.storage.cache_mb),
            storage_broken: std::sync::atomic::AtomicBool::new(false),
            storage_repair: Notify::new(),
            inner: Mutex::new(Inner {
                node,
                commit: CommitQueue::default(),
                departures: 0,
                cold_cursor: None,
                last_used,
                from_log: Default::default(),
                from_log_state: false,
                log_barrier: !log_queue.is_empty(),
                log_queue,
                next_log_seq,
            }),
            fanout,
            id,
            durability: cfg.storage.durability,
            commit_window: Duration::from_millis(cfg.storage.commit_window_ms),
            flush_wake: Notify::new(),
            flushed: watch::Sender::new(FlushState::default()),
            router: PeerRouter::default(),
            draining: CancellationToken::new(),
            ops_in: Mutex::new(HashMap::new()),
            evict_requests: Mutex::new(Vec::new()),
            fetch_waiters: Mutex::new(HashMap::new()),
            sync_config: sync_cfg,
            residency: (
                cfg.storage.resident_bytes,
                Duration::from_secs(cfg.storage.resident_idle_secs),
            ),
            tasks: tokio_util::task::TaskTracker::new(),
            started: Instant::now(),
            shared_log,
            shared_log_ok: std::sync::atomic::AtomicBool::new(true),
        }))
    }

    /// The storage, unless it is being reopened after a failure.
    pub fn storage(&self) -> Result<Arc<Storage>, CoreError> {
        self.storage
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| CoreError::Storage("reopening after a storage failure".into()))
    }

    /// A write or flush failed: from now on the storage is reopened in the background
    /// until it works again (space returned); writes get `storage_unavailable` meanwhile.
    fn storage_failed(&self) {
        use std::sync::atomic::Ordering;
        if !self.storage_broken.swap(true, Ordering::SeqCst) {
            metrics::gauge!("outpost_storage_broken").set(1.0);
            tracing::error!("storage failed: refusing writes and reopening it until it works");
        }
        self.storage_repair.notify_one();
    }

    /// Reopens storage after a failure, once a test write can be flushed, and rebuilds
    /// the node from what is durable.
    async fn storage_repairer(self: Arc<Self>, shutdown: CancellationToken) {
        use std::sync::atomic::Ordering;
        loop {
            tokio::select! {
                _ = self.storage_repair.notified() => {}
                _ = shutdown.cancelled() => return,
            }
            while self.storage_broken.load(Ordering::SeqCst) {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                }
                let old = self
                    .storage
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                if let Some(old) = old {
                    // sled keeps an error once it has one; a fresh handle needs the old
                    // one gone (calls in flight hold clones for a moment).
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    drop(old);
                }
                let (dir, cache_mb) = &self.storage_at;
                let fresh = match Storage::open(dir, *cache_mb) {
                    Ok(s) => Arc::new(s),
                    Err(e) => {
                        tracing::warn!(error = %e, "storage still cannot be opened");
                        continue;
                    }
                };
                let probe = async {
                    fresh.set_meta("probe", &[0u8; 4096])?;
                    fresh.flush().await
                };
                if let Err(e) = probe.await {
                    tracing::warn!(error = %e, "storage still cannot be written");
                    // Keep the handle: the next round drops and reopens it.
                    *self.storage.write().unwrap_or_else(|p| p.into_inner()) = Some(fresh);
                    continue;
                }
                *self.storage.write().unwrap_or_else(|p| p.into_inner()) = Some(fresh);
                {
                    let mut g = self.lock();
                    self.reload(&mut g);
                }
                self.storage_broken.store(false, Ordering::SeqCst);
                metrics::gauge!("outpost_storage_broken").set(0.0);
                tracing::info!("storage reopened: accepting writes again");
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the group committer, the replication timer and the residency sweep until
    /// `shutdown`.
    pub fn spawn_background(self: &Arc<Self>, shutdown: CancellationToken) {
        let core = self.clone();
        let stop = shutdown.clone();
        let (budget, idle) = self.residency;
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => core.sweep_resident(budget, idle),
                }
            }
        });
        let core = self.clone();
        let stop = shutdown.clone();
        self.tasks.spawn(async move { core.flusher(stop).await });
        let core = self.clone();
        let stop = shutdown.clone();
        self.tasks
            .spawn(async move { core.storage_repairer(stop).await });
        let core = self.clone();
        self.tasks.spawn(async move {
            loop {
                // The node says when it needs the next timeout.
                let wait = core
                    .with_node(Node::poll_timeout)
                    .map_or(Duration::from_millis(250), |at| {
                        Duration::from_millis(at.saturating_sub(now_ms()))
                    });
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {
                        core.handle(Input::Timeout);
                        let asked: Vec<ChannelName> = core
                            .evict_requests
                            .lock()
                            .map(|mut v| std::mem::take(&mut *v))
                            .unwrap_or_default();
                        for ch in asked {
                            let done = core.evict_channel(&ch);
                            tracing::info!(channel = %ch, evicted = done, "operator eviction");
                        }
                    }
                }
            }
        });
    }

    /// Feeds the node one input and carries out what it asks.
    /// Records how many clients are connected (sent to peers in heartbeats).
    pub fn set_clients(&self, n: u64) {
        self.lock().node.set_clients(n);
    }

    pub fn handle(&self, input: Input) {
        if !matches!(input, Input::Timeout) {
            tracing::trace!(?input, "input");
        }
        if let Input::Msg(peer, SyncMsg::Ops { ops, channel }) = &input {
            for op in ops {
                tracing::debug!(trace = %op.dot, %channel, %peer, "op received");
            }
            if let Ok(mut m) = self.ops_in.lock() {
                *m.entry(*peer).or_default() += ops.len() as u64;
            }
        }
        let mut g = self.lock();
        let loaded = match &input {
            Input::LinkUp(peer) => self.ensure_for_link(&mut g, *peer),
            Input::Interest(channel, _) | Input::Logged(channel, _) => self.ensure(&mut g, channel),
            Input::Msg(_, msg) => match msg.stored_channel() {
                Some(channel) => self.ensure(&mut g, channel),
                None => Ok(()),
            },
            Input::LinkDown(_) | Input::Timeout => Ok(()),
        };
        if let Err(e) = loaded {
            // The input cannot be handled without the channel's stored state; the
            // peer's resends and anti-entropy bring it again.
            tracing::error!(error = %e, "cannot load a channel for a replication input");
            return;
        }
        // A record from the shared log (clustered coordinator) is applied here, not
        // queued for the log again: the drain skips what is marked.
        match &input {
            Input::Logged(_, LogRecord::Op(op)) => {
                g.from_log.insert(op.dot);
            }
            Input::Logged(_, LogRecord::State(_)) => g.from_log_state = true,
            _ => {}
        }
        g.node.handle(now_ms(), input);
        let res = self.drain(&mut g);
        g.from_log.clear();
        g.from_log_state = false;
        if let Err(e) = res {
            tracing::error!(error = %e, "storage failure while handling replication input");
        }
    }

    /// Accepts a client write; returns once it is durable (per the durability mode).
    pub async fn write(
        &self,
        channel: &ChannelName,
        write: LocalWrite,
    ) -> Result<LocalOutcome, CoreError> {
        self.preload(channel).await;
        let (outcome, gen) = self.apply(channel, write)?;
        self.wait_durable(gen).await?;
        Ok(outcome)
    }

    /// First half of a write: applies it now (assigning its dot, in call order) and
    /// returns the generation to wait for with [`Core::wait_durable`] before acking.
    pub fn apply(
        &self,
        channel: &ChannelName,
        write: LocalWrite,
    ) -> Result<(LocalOutcome, u64), CoreError> {
        let mut g = self.lock();
        self.ensure(&mut g, channel)?;
        Self::touch(&mut g, channel);
        let outcome = g.node.local(now_ms(), channel, write)?;
        self.drain(&mut g)?;
        Ok((outcome, g.commit.written()))
    }

    /// Fans out a message that is never stored.
    pub fn ephemeral(&self, channel: &ChannelName, msg: Ephemeral) {
        let mut g = self.lock();
        g.node.ephemeral(channel, msg);
        if let Err(e) = self.drain(&mut g) {
            tracing::error!(error = %e, "storage failure on ephemeral");
        }
    }

    /// Subscribes a connection: replay from `since` (durable ops only), then live.
    pub fn subscribe(
        &self,
        channel: &ChannelName,
        conn: &ConnHandle,
        since: &VersionVector,
    ) -> Replay {
        let mut g = self.lock();
        self.subscribe_locked(&mut g, channel, conn, since)
    }

    /// A namespace subscription (cloud and coordinators, which hold every channel):
    /// subscribes `conn` to every stored or resident channel `pattern` matches, from
    /// its token in `since` or else from the start, and registers the pattern so that
    /// channels created later are subscribed at their first op — all under the core
    /// lock, so no channel falls between the two. Fails (subscribing nothing) when more
    /// than `max` channels match.
    pub fn subscribe_pattern(
        &self,
        pattern: &ChannelPattern,
        conn: &ConnHandle,
        since: &BTreeMap<ChannelName, VersionVector>,
        max: usize,
    ) -> Result<Vec<(ChannelName, Replay)>, CoreError> {
        let mut g = self.lock();
        if g.node.role() == Role::Edge {
            return Err(CoreError::NotHere(
                "namespace subscriptions are served by the cloud and its coordinators, which hold every channel; an edge holds only those in use here".into(),
            ));
        }
        let mut names: BTreeSet<ChannelName> = self
            .storage()?
            .channel_names_with_prefix(pattern.prefix())?
            .into_iter()
            .filter(|c| pattern.matches(c))
            .collect();
        names.extend(
            g.node
                .channels()
                .map(|c| c.channel())
                .filter(|c| pattern.matches(c))
                .cloned(),
        );
        // A channel the connection already subscribes to by name stays that
        // subscription (its own position; `unsubscribe_pattern` leaves it).
        names.retain(|c| !self.fanout.is_subscribed(c, conn.id));
        if names.len() > max {
            return Err(CoreError::TooMany(format!(
                "pattern {pattern} matches {} channels; at most {max} per namespace subscription",
                names.len()
            )));
        }
        let empty = VersionVector::default();
        let replays = names
            .into_iter()
            .map(|c| {
                let from = since.get(&c).unwrap_or(&empty);
                let replay = self.subscribe_locked(&mut g, &c, conn, from);
                (c, replay)
            })
            .collect();
        self.fanout.add_pattern(conn, pattern.clone(), max);
        Ok(replays)
    }

    fn subscribe_locked(
        &self,
        g: &mut Inner,
        channel: &ChannelName,
        conn: &ConnHandle,
        since: &VersionVector,
    ) -> Replay {
        if let Err(e) = self.ensure(g, channel) {
            tracing::error!(%channel, error = %e, "cannot load a channel to subscribe");
        }
        Self::touch(g, channel);
        let (replay, first) = match g.node.channel(channel) {
            Some(r) => {
                let truncated = matches!(r.ops_since(since, 0), Err(NeedSnapshot { .. }));
                self.fanout
                    .subscribe(channel, conn, since, r.log(), truncated)
            }
            None => self
                .fanout
                .subscribe(channel, conn, since, std::iter::empty(), false),
        };
        if first {
            tracing::debug!(%channel, "first local subscriber: interest on");
            g.node
                .handle(now_ms(), Input::Interest(channel.clone(), true));
            if let Err(e) = self.drain(g) {
                tracing::error!(error = %e, "storage failure on subscribe");
            }
        }
        replay
    }

    pub fn unsubscribe(&self, channel: &ChannelName, conn: u64) {
        let mut g = self.lock();
        Self::touch(&mut g, channel);
        if self.fanout.unsubscribe(channel, conn) {
            if let Err(e) = self.ensure(&mut g, channel) {
                tracing::error!(%channel, error = %e, "cannot load a channel to unsubscribe");
            }
            tracing::debug!(%channel, "last local subscriber left: interest off");
            g.node
                .handle(now_ms(), Input::Interest(channel.clone(), false));
            if let Err(e) = self.drain(&mut g) {
                tracing::error!(error = %e, "storage failure on unsubscribe");
            }
        }
    }

    /// The register of a state key, if any.
    pub fn state_get(&self, channel: &ChannelName, key: &str) -> Option<Register> {
        let mut g = self.lock();
        self.ensure_for_read(&mut g, channel);
        Self::touch(&mut g, channel);
        g.node
            .channel(channel)
            .and_then(|c| c.register(key).cloned())
    }

    /// All state keys of a channel.
    pub fn state_all(&self, channel: &ChannelName) -> Vec<(String, Register)> {
        let mut g = self.lock();
        self.ensure_for_read(&mut g, channel);
        Self::touch(&mut g, channel);
        g.node
            .channel(channel)
            .map(|c| {
                c.state()
                    .iter()
                    .map(|(k, r)| (k.clone(), r.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Durable ops after `since`, at most `limit`; and whether older history is gone.
    pub fn history(
        &self,
        channel: &ChannelName,
        since: &VersionVector,
        limit: usize,
    ) -> (Vec<Op>, bool) {
        let mut g = self.lock();
        self.ensure_for_read(&mut g, channel);
        Self::touch(&mut g, channel);
        let delivered = self.fanout.delivered(channel);
        match g.node.channel(channel) {
            None => (Vec::new(), false),
            Some(r) => {
                let truncated = r.ops_since(since, 0).is_err();
                let ops = r
                    .log()
                    .filter(|op| delivered.covers(op.dot) && !since.covers(op.dot))
                    .take(limit)
                    .cloned()
                    .collect();
                (ops, truncated)
            }
        }
    }

    /// Carries out an operator command from the cloud. Runs under the core lock, so
    /// eviction is deferred to a task.
    fn command(&self, cmd: shared::wire::Command) {
        match cmd {
            shared::wire::Command::Drain => {
                tracing::warn!("drained by the operator: telling clients to move");
                self.draining.cancel();
                self.fanout.kill_all();
            }
            shared::wire::Command::Evict { channel } => {
                tracing::info!(%channel, "operator asked to evict a channel");
                self.evict_requests
                    .lock()
                    .map(|mut v| v.push(channel))
                    .unwrap_or_default();
            }
        }
    }

    /// Evicts a channel now if nothing here needs it; true if it was evicted.
    pub fn evict_channel(&self, name: &ChannelName) -> bool {
        let mut g = self.lock();
        if let Err(e) = self.ensure(&mut g, name) {
            tracing::error!(channel = %name, error = %e, "cannot load a channel to evict it");
            return false;
        }
        let done = self.evict_locked(&mut g, name);
        if done {
            metrics::counter!("outpost_cache_evictions_total").increment(1);
        }
        done
    }

    /// Drops a channel from storage, the node and the fan-out if the node allows it.
    fn evict_locked(&self, g: &mut Inner, name: &ChannelName) -> bool {
        // A delivery or snapshot install still waiting for its flush would run after
        // the fan-out forgot the channel and count ops this edge no longer holds as
        // delivered: a subscriber resuming here would be moved past them unreplayed
        // (found by the clustered fault schedules, seed 2018). The next sweep evicts it.
        let pending = g.commit.holds(|o| match o {
            Output::Deliver { channel, .. } | Output::SnapshotInstalled { channel, .. } => {
                channel == name
            }
            _ => false,
        });
        // The node queues the storage removal (with the mark that keeps this edge's
        // dots unique if the channel is opened again); draining carries it out.
        if pending || !g.node.evict(name) {
            return false;
        }
        if let Err(e) = self.drain(g) {
            tracing::error!(channel = %name, error = %e, "cannot evict");
            return false;
        }
        tracing::debug!(channel = %name, "channel evicted");
        g.departures += 1;
        g.last_used.remove(name);
        self.fanout.forget(name);
        true
    }

    /// Ops received from `peer` so far.
    pub fn received_ops(&self, peer: ReplicaId) -> u64 {
        self.ops_in
            .lock()
            .map(|m| m.get(&peer).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn touch(g: &mut Inner, channel: &ChannelName) {
        g.last_used.insert(channel.clone(), Instant::now());
    }

    /// Drops cached channels: those idle for `ttl`, then least recently used ones
    /// until the rest fit in `max_bytes`. Only channels without local subscribers and
    /// with everything acked by the cloud are eligible. Returns what was evicted.
    pub fn evict(&self, ttl: Duration, max_bytes: u64) -> Vec<ChannelName> {
        // A slice of the stored names per sweep, listed before taking the lock, so a
        // large store is walked a little at a time.
        let after = self.lock().cold_cursor.take();
        let stored = self
            .storage()
            .and_then(|s| Ok(s.channel_names_after(after.as_ref(), COLD_SCAN_PER_SWEEP)?))
            .unwrap_or_default();
        let mut g = self.lock();
        if stored.len() == COLD_SCAN_PER_SWEEP {
            g.cold_cursor = stored.last().cloned();
        }
        let (sizes, mut total) = by_last_use(&g);
        let mut evicted = Vec::new();
        for (name, bytes, used) in sizes {
            let idle = used.is_none_or(|u| u.elapsed() >= ttl);
            if !(idle || total > max_bytes) || !self.evict_locked(&mut g, &name) {
                continue;
            }
            total = total.saturating_sub(bytes);
            evicted.push(name);
        }
        // Channels on disk that are not resident: idle since their last use here, or
        // since start. Each is loaded to be evicted (its own last seq must be kept);
        // one that may not go stays resident until the residency sweep unloads it.
        for name in stored {
            if g.node.is_resident(&name) {
                continue;
            }
            let used = g.last_used.get(&name).copied().unwrap_or(self.started);
            if used.elapsed() < ttl || self.ensure(&mut g, &name).is_err() {
                continue;
            }
            if self.evict_locked(&mut g, &name) {
                evicted.push(name);
            }
        }
        if !evicted.is_empty() {
            metrics::counter!("outpost_cache_evictions_total").increment(evicted.len() as u64);
            tracing::info!(
                channels = evicted.len(),
                "evicted idle channels from the cache"
            );
        }
        metrics::gauge!("outpost_cache_bytes").set(total as f64);
        evicted
    }

    /// Reads the node under the lock (status, metrics).
    pub fn with_node<T>(&self, f: impl FnOnce(&Node) -> T) -> T {
        f(&self.lock().node)
    }

    /// Carries out queued outputs: storage now, the rest when durable.
    fn drain(&self, g: &mut Inner) -> Result<(), CoreError> {
        let mut result = Ok(());
        // Looked up once per drain, not per storage action.
        let storage = self.storage();
        while let Some(out) = g.node.poll() {
            match out {
                Output::Persist(p) => {
                    // The log outbox record goes first: storage keeps a prefix of its
                    // writes across a crash, so an op that survives always has its
                    // record (an op stored here without one would never reach the log
                    // — found by the clustered fault schedules, a coordinator killed
                    // between the two writes).
                    if let (Some(_), Persist::Op { channel, op }) = (&self.shared_log, &p) {
                        if !g.from_log.contains(&op.dot) {
                            let record = LogRecord::Op(op.clone());
                            if let Err(e) = self.queue_for_log(g, &storage, channel, record) {
                                result = Err(e);
                                break;
                            }
                        }
                    }
                    let applied = match &storage {
                        Ok(s) => s.apply(&p).map_err(CoreError::from),
                        Err(e) => Err(CoreError::Storage(e.to_string())),
                    };
                    if let Err(e) = applied {
                        result = Err(e);
                        break;
                    }
                    g.commit.wrote();
                }
                other => {
                    if let Output::SnapshotInstalled { channel, .. } = &other {
                        // State installed from a snapshot holds ops this coordinator
                        // never saw one by one: the log gets the channel's state.
                        let snap = g.node.channel(channel).map(|c| c.snapshot());
                        if let (Some(_), false, Some(snap)) =
                            (&self.shared_log, g.from_log_state, snap)
                        {
                            let record = LogRecord::State(snap);
                            if let Err(e) = self.queue_for_log(g, &storage, channel, record) {
                                result = Err(e);
                                break;
                            }
                            g.commit.wrote();
                        }
                    }
                    if g.log_barrier {
                        g.commit.wrote();
                    }
                    if let Some(now) = g.commit.push(other) {
                        self.execute(now);
                    }
                }
            }
        }
        let wrote = g.commit.end_drain();
        if let Err(e) = result {
            // Memory may now be ahead of disk: rebuild the node from what storage has,
            // so nothing that is not stored is ever delivered or acknowledged.
            self.storage_failed();
            self.reload(g);
            return Err(e);
        }
        if !self.waits_for_flush() {
            let written = g.commit.written();
            self.complete(g, written);
            self.flushed.send_modify(|s| s.flushed = written);
        } else if wrote.is_some() {
            self.flush_wake.notify_one();
        }
        Ok(())
    }

    /// Clustered: writes `record` to the log outbox (durable with this generation)
    /// and queues it for the shared log.
    fn queue_for_log(
        &self,
        g: &mut Inner,
        storage: &Result<Arc<Storage>, CoreError>,
        channel: &ChannelName,
        record: LogRecord,
    ) -> Result<(), CoreError> {
        let seq = g.next_log_seq;
        match storage {
            Ok(s) => s.log_outbox_put(seq, channel, &record)?,
            Err(e) => return Err(CoreError::Storage(e.to_string())),
        }
        g.next_log_seq += 1;
        if let LogRecord::Op(op) = &record {
            tracing::debug!(%channel, dot = %op.dot, seq, "queued for the shared log");
        }
        g.log_queue.push((seq, channel.clone(), record));
        Ok(())
    }

    fn reload(&self, g: &mut Inner) {
        g.commit.clear();
        g.departures += 1;
        let Ok(storage) = self.storage() else {
            return;
        };
        let resident: Vec<ChannelName> = g.node.channels().map(|c| c.channel().clone()).collect();
        let role = g.node.role();
        let cfg = self.sync_config.clone();
        match Self::restore_node(&storage, self.id, role, cfg, &self.fanout, resident) {
            Ok(node) => {
                g.node = node;
                self.fetches_abandoned();
                tracing::warn!("node rebuilt from storage after a storage failure");
            }
            Err(e) => tracing::error!(error = %e, "cannot reload storage"),
        }
    }

    /// Runs outputs whose generation is durable.
    fn complete(&self, g: &mut Inner, upto: u64) {
        for out in g.commit.durable(upto) {
            self.execute(out);
        }
    }

    fn execute(&self, out: Output) {
        match out {
            Output::Deliver { channel, op } => {
                // The dot is the op's trace id across the fleet: grep one dot in the
                // (JSON) logs of the origin edge, the cloud and the other edges.
                tracing::debug!(trace = %op.dot, %channel, "op durable, delivering");
                self.fanout.deliver(&channel, &op)
            }
            Output::DeliverEphemeral { channel, msg } => self.fanout.ephemeral(&channel, &msg),
            Output::Send { to, msg } => {
                if let SyncMsg::Ops { channel, ops } = &msg {
                    for op in ops {
                        tracing::debug!(trace = %op.dot, %channel, peer = %to, "op sent");
                    }
                }
                tracing::trace!(peer = %to, ?msg, "send");
                self.router.send(to, msg)
            }
            Output::Conflict { channel, conflict } => {
                metrics::counter!("outpost_conflicts_total").increment(1);
                tracing::debug!(%channel, key = %conflict.key, losers = conflict.losers.len(), "concurrent writes");
                let rec = crate::storage::ConflictRecord {
                    time_ms: now_ms(),
                    channel: channel.to_string(),
                    conflict,
                };
                if let Err(e) = self.storage().and_then(|s| Ok(s.record_conflict(&rec)?)) {
                    tracing::warn!(error = %e, "cannot record a conflict");
                }
            }
            Output::Command(cmd) => self.command(cmd),
            Output::Persist(_) => {}
            Output::SnapshotInstalled { channel, vv, .. } => {
                tracing::info!(%channel, "snapshot installed");
                // What the snapshot covers is durable here now: history reads and
                // tokens may include it; live subscribers behind it re-read state.
                self.fanout.installed(&channel, &vv);
            }
            Output::Acked { .. } => {}
            Output::Fetched {
                channel,
                upto,
                fresh,
            } => self.fetched(&channel, upto, fresh),
            Output::Rtt { peer, rtt_ms } => {
                metrics::gauge!("outpost_link_rtt_ms", "peer" => peer.to_string())
                    .set(rtt_ms as f64);
            }
            Output::Warn { peer, reason } => {
                tracing::warn!(peer = ?peer, %reason, "replication warning");
            }
        }
    }

    /// Second half of a write: resolves once generation `gen` is durable.
    pub async fn wait_durable(&self, gen: u64) -> Result<(), CoreError> {
        if !self.waits_for_flush() {
            return Ok(());
        }
        let mut rx = self.flushed.subscribe();
        let state = rx
            .wait_for(|s| s.flushed >= gen || s.failed.as_ref().is_some_and(|(f, _)| *f >= gen))
            .await
            .map_err(|_| CoreError::Storage("flusher stopped".into()))?
            .clone();
        match state.failed {
            Some((f, reason)) if f >= gen && state.flushed < gen => Err(CoreError::Storage(reason)),
            _ => Ok(()),
        }
    }

    /// Outputs wait for a flush: storage fsyncs, or a shared log must store the ops.
    fn waits_for_flush(&self) -> bool {
        self.durability == Durability::Fsync || self.shared_log.is_some()
    }

    /// Stores `batch` in the shared log (if any), trying again for as long as it
    /// takes: meanwhile nothing is acked or delivered, and edges keep their unacked
    /// ops. Then removes it from the log outbox. False if shutdown came first.
    async fn flush_shared_log(
        &self,
        batch: Vec<(u64, ChannelName, LogRecord)>,
        shutdown: &CancellationToken,
    ) -> bool {
        let Some(log) = &self.shared_log else {
            return true;
        };
        let Some(last) = batch.last().map(|(seq, _, _)| *seq) else {
            self.lock().log_barrier = false;
            return true;
        };
        let records: Vec<(ChannelName, LogRecord)> =
            batch.into_iter().map(|(_, c, r)| (c, r)).collect();
        let mut delay = Duration::from_millis(50);
        loop {
            let started = Instant::now();
            match log.store(&records).await {
                Ok(()) => {
                    metrics::histogram!("outpost_shared_log_flush_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::counter!("outpost_shared_log_records_total")
                        .increment(records.len() as u64);
                    if !self
                        .shared_log_ok
                        .swap(true, std::sync::atomic::Ordering::SeqCst)
                    {
                        tracing::info!("shared log stores records again: acking");
                    }
                    break;
                }
                Err(e) => {
                    metrics::counter!("outpost_shared_log_failures_total").increment(1);
                    if self
                        .shared_log_ok
                        .swap(false, std::sync::atomic::Ordering::SeqCst)
                    {
                        tracing::error!(error = %e, "shared log cannot store records: holding acks and deliveries, retrying");
                    } else {
                        tracing::debug!(error = %e, "shared log still failing");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        // Stored: out of the outbox (if this write is lost, the next start sends the
        // records again, which is harmless).
        if let Ok(s) = self.storage() {
            if let Err(e) = s.log_outbox_remove_upto(last) {
                tracing::warn!(error = %e, "cannot trim the shared-log outbox");
            }
        }
        self.lock().log_barrier = false;
        true
    }

    /// Whether acks flow: `Err(why)` while a shared log is configured and cannot
    /// store ops (`/readyz`).
    pub fn shared_log_health(&self) -> Result<(), String> {
        let Some(log) = &self.shared_log else {
            return Ok(());
        };
        log.health()?;
        if self.shared_log_ok.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(())
        } else {
            Err("the shared log did not store the last ops (retrying); acks are held".into())
        }
    }

    /// The generation of everything written so far ([`Core::wait_durable`] waits for
    /// it).
    pub fn written(&self) -> u64 {
        self.lock().commit.written()
    }

    /// The group committer: one flush covers every write made while the previous one ran.
    async fn flusher(self: Arc<Self>, shutdown: CancellationToken) {
        if !self.waits_for_flush() {
            return;
        }
        loop {
            let pending = {
                let g = self.lock();
                g.commit.written() > self.flushed.borrow().flushed || !g.log_queue.is_empty()
            };
            if !pending {
                tokio::select! {
                    _ = self.flush_wake.notified() => {}
                    _ = shutdown.cancelled() => {
                        if let Ok(s) = self.storage() {
                            let _ = s.flush().await;
                        }
                        return;
                    }
                }
                if !self.commit_window.is_zero() {
                    tokio::time::sleep(self.commit_window).await;
                }
            }
            // The generation to complete and the ops the log must store for it, taken
            // together: every op queued by a write of generation <= target is here.
            let (target, batch) = {
                let mut g = self.lock();
                (g.commit.written(), std::mem::take(&mut g.log_queue))
            };
            let started = Instant::now();
            let res = match self.storage() {
                Ok(_) if self.durability == Durability::Os => Ok(()),
                Ok(s) => s.flush().await.map(|_| ()).map_err(CoreError::from),
                Err(e) => Err(e),
            };
            metrics::histogram!("outpost_flush_seconds").record(started.elapsed().as_secs_f64());
            if res.is_err() {
                // The batch goes back in front: it is stored after the repair.
                let mut g = self.lock();
                let later = std::mem::replace(&mut g.log_queue, batch);
                g.log_queue.extend(later);
            } else if !self.flush_shared_log(batch, &shutdown).await {
                return;
            }
            match res {
                Ok(_) => {
                    {
                        let mut g = self.lock();
                        self.complete(&mut g, target);
                    }
                    self.flushed
                        .send_modify(|s| s.flushed = s.flushed.max(target));
                }
                Err(e) => {
                    tracing::error!(error = %e, "flush failed");
                    metrics::counter!("outpost_flush_failures_total").increment(1);
                    self.storage_failed();
                    {
                        let mut g = self.lock();
                        // Outputs of the failed generations are dropped, never delivered.
                        g.commit.failed(target);
                        self.reload(&mut g);
                    }
                    let reason = match e {
                        CoreError::Storage(m) => m,
                        other => other.to_string(),
                    };
                    self.flushed
                        .send_modify(|s| s.failed = Some((target, reason.clone())));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
