//! The edge registry: who is connected, since when, from where, how far behind.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;

use serde::Serialize;
use shared::ReplicaId;

/// What the cloud knows about one edge.
#[derive(Debug, Clone, Serialize)]
pub struct EdgeEntry {
    pub replica: String,
    pub name: String,
    pub region: String,
    pub software: String,
    pub remote: SocketAddr,
    pub connected: bool,
    /// Unix milliseconds.
    pub connected_since: u64,
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
#[derive(Debug, Clone, Serialize)]
pub struct FleetEvent {
    pub time_ms: u64,
    pub edge: String,
    /// `joined`, `left`, `restored`, `healed`, `refused`, `drained`, `revoked`.
    pub kind: String,
    pub detail: String,
}

/// Most events kept.
const MAX_EVENTS: usize = 2000;

/// Every edge that has connected since the cloud started, and the fleet timeline.
#[derive(Debug, Default)]
pub struct Fleet {
    edges: Mutex<BTreeMap<ReplicaId, EdgeEntry>>,
    events: Mutex<VecDeque<FleetEvent>>,
    /// When each edge last left, to report how long it was away.
    left_at: Mutex<HashMap<ReplicaId, u64>>,
}

impl Fleet {
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
                name: name.into(),
                region: region.into(),
                software: software.into(),
                remote,
                connected: true,
                connected_since: now,
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
        self.event(&e.name, "left", reason);
        if let Ok(mut m) = self.left_at.lock() {
            m.insert(id, edge::core::now_ms());
        }
        metrics::gauge!("outpost_edges_connected")
            .set(g.values().filter(|e| e.connected).count() as f64);
    }

    /// Records a timeline event.
    pub fn event(&self, edge: &str, kind: &str, detail: &str) {
        let mut g = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() >= MAX_EVENTS {
            g.pop_front();
        }
        g.push_back(FleetEvent {
            time_ms: edge::core::now_ms(),
            edge: edge.into(),
            kind: kind.into(),
            detail: detail.into(),
        });
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

    /// Replica id -> edge name, for every edge seen.
    pub fn names(&self) -> HashMap<ReplicaId, String> {
        self.edges
            .lock()
            .map(|g| g.iter().map(|(id, e)| (*id, e.name.clone())).collect())
            .unwrap_or_default()
    }

    pub fn list(&self) -> Vec<EdgeEntry> {
        self.edges
            .lock()
            .map(|g| g.values().cloned().collect())
            .unwrap_or_default()
    }
}
