//! Where the node's `Send` outputs go: one pair of bounded queues (control, data)
//! per linked peer, drained by that link's writers (`super::run_session`).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use shared::wire::SyncMsg;
use shared::ReplicaId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Where `Send` outputs go: one bounded queue per linked peer. A peer whose queue is
/// full is disconnected (it resyncs by version vector when it comes back), so a slow
/// link never makes the node buffer without bound.
#[derive(Debug, Default)]
pub struct PeerRouter {
    peers: Mutex<HashMap<ReplicaId, PeerLink>>,
    /// Ops sent to each peer (for the fleet timeline).
    sent: Mutex<HashMap<ReplicaId, u64>>,
}

/// The sending side of one link.
#[derive(Debug, Clone)]
pub struct PeerLink {
    /// Control messages (sync vectors, acks, heartbeats).
    pub control: mpsc::Sender<SyncMsg>,
    /// Bulk messages (ops, snapshots, ephemeral).
    pub data: mpsc::Sender<SyncMsg>,
    /// Cancelled to drop the link (queue overflow, revocation, shutdown).
    pub kill: CancellationToken,
    /// Distinguishes successive links of the same peer.
    pub epoch: u64,
}

impl PeerRouter {
    /// Registers a link, replacing (and killing) an older one of the same peer.
    pub fn insert(&self, peer: ReplicaId, link: PeerLink) {
        if let Some(old) = self.lock().insert(peer, link) {
            old.kill.cancel();
        }
    }

    /// Removes the link if it is still the one of `epoch`.
    pub fn remove(&self, peer: ReplicaId, epoch: u64) -> bool {
        let mut g = self.lock();
        if g.get(&peer).is_some_and(|l| l.epoch == epoch) {
            g.remove(&peer);
            true
        } else {
            false
        }
    }

    /// Ops sent to `peer` so far.
    pub fn sent_ops(&self, peer: ReplicaId) -> u64 {
        self.sent
            .lock()
            .map(|m| m.get(&peer).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Drops a peer's link (it closes; the peer may come back and resync).
    pub fn kill(&self, peer: ReplicaId) {
        if let Some(l) = self.lock().remove(&peer) {
            l.kill.cancel();
        }
    }

    pub fn kill_all(&self) {
        for (_, l) in self.lock().drain() {
            l.kill.cancel();
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ReplicaId, PeerLink>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a message to a peer (operator commands use this directly).
    pub fn send(&self, to: ReplicaId, msg: SyncMsg) {
        if let SyncMsg::Ops { ops, .. } = &msg {
            metrics::counter!("outpost_link_ops_out_total").increment(ops.len() as u64);
            if let Ok(mut m) = self.sent.lock() {
                *m.entry(to).or_default() += ops.len() as u64;
            }
        }
        let mut g = self.lock();
        let Some(link) = g.get(&to) else { return };
        let tx = if msg.is_control() {
            &link.control
        } else {
            &link.data
        };
        if tx.try_send(msg).is_err() {
            tracing::warn!(peer = %to, "link queue full: dropping the link; it will resync");
            metrics::counter!("outpost_link_overflows_total").increment(1);
            link.kill.cancel();
            g.remove(&to);
        }
    }
}
