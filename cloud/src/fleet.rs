//! The edge registry: who is connected, since when, from where, how far behind; and
//! the fleet timeline.
//!
//! A coordinator knows its own links first-hand (`local`). In the clustered tier it
//! also holds what the other coordinators report through the shared fleet state
//! (`remote`, kept by `crate::shared_fleet`), so that any coordinator shows the whole
//! fleet: an edge linked to another coordinator is listed with that coordinator's
//! figures, and shown disconnected once its coordinator has stopped reporting for
//! [`REMOTE_STALE`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shared::ReplicaId;
use tokio::sync::mpsc;

/// A remote entry not refreshed for this long is shown disconnected: its coordinator
/// reports every [`crate::shared_fleet::REPORT_EVERY`] while the link is up.
pub const REMOTE_STALE: Duration = Duration::from_secs(10);

/// What the cloud knows about one edge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EdgeEntry {
    pub replica: String,
    /// The coordinator (its replica id) that holds, or last held, the edge's link.
    #[serde(default)]
    pub coordinator: String,
    pub name: String,
    pub region: String,
    pub software: String,
    pub remote: SocketAddr,
    pub connected: bool,
    /// Unix milliseconds.
    pub connected_since: u64,
    /// When its link ended (Unix milliseconds), while it is disconnected. The other
    /// figures are then the last ones its link reported.
    #[serde(default)]
    pub disconnected_since: Option<u64>,
    pub last_seen: u64,
    pub rtt_ms: Option<u64>,
    /// Ops the cloud has that the edge lacks (channels it subscribes to).
    pub lag_ops: u64,
    /// Unacked local ops the edge reported in its last heartbeat.
    pub outbox_ops: u64,
    /// Clients connected to the edge, from its last heartbeat.
    pub clients: u64,
    pub links: u64,
}

/// Something that happened to the fleet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetEvent {
    pub time_ms: u64,
    /// The coordinator that saw it.
    #[serde(default)]
    pub coordinator: String,
    pub edge: String,
    /// `joined`, `left`, `restored`, `healed`, `refused`, `drained`, `revoked`.
    pub kind: String,
    pub detail: String,
}

/// Most events kept.
const MAX_EVENTS: usize = 2000;

/// Every edge that has connected since the cloud started, and the fleet timeline.
#[derive(Debug)]
pub struct Fleet {
    /// This coordinator's replica id.
    me: String,
    edges: Mutex<BTreeMap<ReplicaId, EdgeEntry>>,
    /// What other coordinators report, with when it arrived here.
    remote: Mutex<HashMap<ReplicaId, (EdgeEntry, Instant)>>,
    events: Mutex<VecDeque<FleetEvent>>,
    /// When each edge last left, to report how long it was away.
    left_at: Mutex<HashMap<ReplicaId, u64>>,
    /// Clustered: this coordinator's events also go to the shared timeline.
    publish: OnceLock<mpsc::UnboundedSender<FleetEvent>>,
    /// Events recorded since the timeline was last saved (embedded cloud).
    dirty: std::sync::atomic::AtomicBool,
}

impl Fleet {
    pub fn new(me: String) -> Self {
        Self {
            me,
            edges: Mutex::default(),
            remote: Mutex::default(),
            events: Mutex::default(),
            left_at: Mutex::default(),
            publish: OnceLock::new(),
            dirty: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// Clustered: from now on every event is also sent to `tx` (the shared timeline).
    pub fn publish_events_to(&self, tx: mpsc::UnboundedSender<FleetEvent>) {
        let _ = self.publish.set(tx);
    }

    pub fn connected(
        &self,
        id: ReplicaId,
        name: &str,
        region: &str,
        software: &str,
        remote: SocketAddr,
    ) -> u64 {
        let now = edge::core::now_ms();
        let away = self
            .left_at
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&id))
            .map(|t| now.saturating_sub(t));
        let mut g = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        let links = g.get(&id).map_or(0, |e| e.links) + 1;
        match away {
            Some(ms) => self.event(
                name,
                "restored",
                &format!("link restored after {:.1} s away", ms as f64 / 1000.0),
            ),
            None => self.event(
                name,
                "joined",
                &format!("{software} in {region} from {remote}"),
            ),
        }
        g.insert(
            id,
            EdgeEntry {
                replica: id.to_string(),
                coordinator: self.me.clone(),
                name: name.into(),
                region: region.into(),
                software: software.into(),
                remote,
                connected: true,
                connected_since: now,
                disconnected_since: None,
                last_seen: now,
                rtt_ms: None,
                lag_ops: 0,
                outbox_ops: 0,
                clients: 0,
                links,
            },
        );
        metrics::gauge!("outpost_edges_connected")
            .set(g.values().filter(|e| e.connected).count() as f64);
        links
    }

    /// Refreshes an edge's live figures (every second while it is connected).
    pub fn seen(&self, id: ReplicaId, rtt_ms: u64, lag_ops: u64, outbox_ops: u64, clients: u64) {
        let mut g = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = g.get_mut(&id) {
            e.last_seen = edge::core::now_ms();
            e.rtt_ms = Some(rtt_ms);
            e.lag_ops = lag_ops;
            e.outbox_ops = outbox_ops;
            e.clients = clients;
            let name = e.name.clone();
            metrics::gauge!("outpost_edge_clients", "edge" => name.clone()).set(clients as f64);
            metrics::gauge!("outpost_edge_rtt_ms", "edge" => name.clone()).set(rtt_ms as f64);
            metrics::gauge!("outpost_edge_lag_ops", "edge" => name.clone()).set(lag_ops as f64);
            metrics::gauge!("outpost_edge_outbox_ops", "edge" => name).set(outbox_ops as f64);
        }
    }

    /// Link number `link` (as [`Fleet::connected`] returned it) of an edge ended. An
    /// edge that reconnected before the cloud noticed its old link was gone stays
    /// connected: only the end of its newest link takes it down.
    pub fn disconnected(&self, id: ReplicaId, link: u64, reason: &str) {
        let mut g = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = g.get_mut(&id) else {
            return;
        };
        if e.links != link {
            tracing::debug!(edge = %id, link, current = e.links, "an older link of a reconnected edge ended");
            return;
        }
        e.connected = false;
        e.disconnected_since = Some(edge::core::now_ms());
        self.event(&e.name, "left", reason);
        if let Ok(mut m) = self.left_at.lock() {
            m.insert(id, edge::core::now_ms());
        }
        metrics::gauge!("outpost_edges_connected")
            .set(g.values().filter(|e| e.connected).count() as f64);
    }

    /// Records a timeline event (and, clustered, sends it to the shared timeline).
    pub fn event(&self, edge: &str, kind: &str, detail: &str) {
        let ev = FleetEvent {
            time_ms: edge::core::now_ms(),
            coordinator: self.me.clone(),
            edge: edge.into(),
            kind: kind.into(),
            detail: detail.into(),
        };
        if let Some(tx) = self.publish.get() {
            let _ = tx.send(ev.clone());
        }
        self.insert_event(ev);
    }

    /// Adds an event another coordinator (or an earlier run of this one) recorded,
    /// in time order.
    pub fn insert_event(&self, ev: FleetEvent) {
        let mut g = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() >= MAX_EVENTS {
            g.pop_front();
        }
        let at = g.partition_point(|e| e.time_ms <= ev.time_ms);
        g.insert(at, ev);
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
    }

    /// The timeline as JSON if it changed since the last call (for saving it).
    pub fn timeline_if_changed(&self) -> Option<Vec<u8>> {
        if !self.dirty.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return None;
        }
        let g = self.events.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::to_vec(&*g).ok()
    }

    /// Restores a saved timeline (before any event is recorded).
    pub fn restore_timeline(&self, json: &[u8]) {
        match serde_json::from_slice::<VecDeque<FleetEvent>>(json) {
            Ok(saved) => {
                let mut g = self.events.lock().unwrap_or_else(|p| p.into_inner());
                let mine = std::mem::take(&mut *g);
                *g = saved;
                g.extend(mine);
                while g.len() > MAX_EVENTS {
                    g.pop_front();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the saved fleet timeline does not parse; starting a new one")
            }
        }
    }

    pub fn events_since(&self, since_ms: u64) -> Vec<FleetEvent> {
        self.events
            .lock()
            .map(|g| {
                g.iter()
                    .filter(|e| e.time_ms >= since_ms)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What another coordinator reported about an edge.
    pub fn remote_report(&self, id: ReplicaId, entry: EdgeEntry) {
        if entry.coordinator == self.me {
            return;
        }
        if let Ok(mut g) = self.remote.lock() {
            g.insert(id, (entry, Instant::now()));
        }
    }

    /// This coordinator's own entries (what it reports to the others).
    pub fn local(&self) -> Vec<(ReplicaId, EdgeEntry)> {
        self.edges
            .lock()
            .map(|g| g.iter().map(|(id, e)| (*id, e.clone())).collect())
            .unwrap_or_default()
    }

    /// Replica id -> edge name, for every edge seen here or reported by another
    /// coordinator.
    pub fn names(&self) -> HashMap<ReplicaId, String> {
        self.list_by_id()
            .into_iter()
            .map(|(id, e)| (id, e.name))
            .collect()
    }

    /// Whether this coordinator holds a live link of the edge.
    pub fn linked_here(&self, id: ReplicaId) -> bool {
        self.edges
            .lock()
            .map(|g| g.get(&id).is_some_and(|e| e.connected))
            .unwrap_or(false)
    }

    /// Every edge of the fleet: this coordinator's links, and the others' reports (a
    /// report not refreshed within [`REMOTE_STALE`] shows the edge disconnected).
    pub fn list(&self) -> Vec<EdgeEntry> {
        self.list_by_id().into_values().collect()
    }

    fn list_by_id(&self) -> BTreeMap<ReplicaId, EdgeEntry> {
        let mut out = self.edges.lock().map(|g| g.clone()).unwrap_or_default();
        let remote = self.remote.lock().map(|g| g.clone()).unwrap_or_default();
        for (id, (mut r, at)) in remote {
            if r.connected && at.elapsed() > REMOTE_STALE {
                r.connected = false;
            }
            match out.get(&id) {
                Some(l) if l.connected => {}
                // Both down: the later link wins.
                Some(l) if !r.connected && l.connected_since >= r.connected_since => {}
                _ => {
                    out.insert(id, r);
                }
            }
        }
        out
    }
}

/// The storage key of the saved timeline.
const TIMELINE_KEY: &str = "fleet_timeline";

/// The embedded cloud's timeline on disk: restored at start, saved at most once a
/// second while it changes, and at shutdown.
pub async fn keep_timeline(
    fleet: std::sync::Arc<Fleet>,
    core: std::sync::Arc<edge::core::Core>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    if let Some(saved) = core
        .storage()
        .ok()
        .and_then(|s| s.meta(TIMELINE_KEY).ok().flatten())
    {
        fleet.restore_timeline(&saved);
    }
    let save = || {
        if let Some(json) = fleet.timeline_if_changed() {
            let r = core
                .storage()
                .map_err(|e| e.to_string())
                .and_then(|s| s.set_meta(TIMELINE_KEY, &json).map_err(|e| e.to_string()));
            if let Err(e) = r {
                tracing::warn!(error = %e, "could not save the fleet timeline");
            }
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                save();
                return;
            }
            _ = tick.tick() => save(),
        }
    }
}
