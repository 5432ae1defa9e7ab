//! The edge registry: who is connected, since when, from where, how far behind.

use std::collections::BTreeMap;
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
    pub links: u64,
}

/// Every edge that has connected since the cloud started.
#[derive(Debug, Default)]
pub struct Fleet {
    edges: Mutex<BTreeMap<ReplicaId, EdgeEntry>>,
}

impl Fleet {
    pub fn connected(
        &self,
        id: ReplicaId,
        name: &str,
        region: &str,
        software: &str,
        remote: SocketAddr,
    ) {
        let now = edge::core::now_ms();
        let mut g = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        let links = g.get(&id).map_or(0, |e| e.links) + 1;
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
                links,
            },
        );
        metrics::gauge!("outpost_edges_connected")
            .set(g.values().filter(|e| e.connected).count() as f64);
    }

    /// Refreshes an edge's live figures (every second while it is connected).
    pub fn seen(&self, id: ReplicaId, rtt_ms: u64, lag_ops: u64, outbox_ops: u64) {
        let mut g = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = g.get_mut(&id) {
            e.last_seen = edge::core::now_ms();
            e.rtt_ms = Some(rtt_ms);
            e.lag_ops = lag_ops;
            e.outbox_ops = outbox_ops;
            let name = e.name.clone();
            metrics::gauge!("outpost_edge_rtt_ms", "edge" => name.clone()).set(rtt_ms as f64);
            metrics::gauge!("outpost_edge_lag_ops", "edge" => name.clone()).set(lag_ops as f64);
            metrics::gauge!("outpost_edge_outbox_ops", "edge" => name).set(outbox_ops as f64);
        }
    }

    pub fn disconnected(&self, id: ReplicaId) {
        let mut g = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = g.get_mut(&id) {
            e.connected = false;
        }
        metrics::gauge!("outpost_edges_connected")
            .set(g.values().filter(|e| e.connected).count() as f64);
    }

    pub fn list(&self) -> Vec<EdgeEntry> {
        self.edges
            .lock()
            .map(|g| g.values().cloned().collect())
            .unwrap_or_default()
    }
}
