//! Reads on an edge that are not synced live: a client reads state or history of a
//! channel with no subscriber here, so the edge asks its upstream for what it lacks
//! before answering (the node's fetch rounds, `shared::sync::Node::fetch`). Readers
//! that arrive while a round is under way wait for the next one; every reader waits
//! at most [`READ_FETCH_TIMEOUT`], then is answered with what the edge holds.

use std::collections::HashMap;
use std::time::Duration;

use shared::sync::FetchWait;
use shared::ChannelName;
use tokio::sync::oneshot;

use super::{now_ms, Core};

/// How long a read waits for the upstream before answering with what is here.
pub const READ_FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Readers waiting for fetch rounds, per channel: the round each waits for.
pub(super) type FetchWaiters = HashMap<ChannelName, Vec<(u64, oneshot::Sender<bool>)>>;

impl Core {
    /// Before a read of `channel`: brings this edge up to what its upstream holds now,
    /// unless the channel is synced live (it has subscribers here) or this is the
    /// cloud. True if the read reflects the upstream; false if the upstream could not
    /// be asked or did not answer within [`READ_FETCH_TIMEOUT`] (the read then
    /// answers with what this edge holds, as while its uplink is down).
    pub async fn fetch(&self, channel: &ChannelName) -> bool {
        self.preload(channel).await;
        let rx = {
            let mut g = self.lock();
            if let Err(e) = self.ensure(&mut g, channel) {
                tracing::error!(%channel, error = %e, "cannot load a channel to read it");
                return false;
            }
            let round = match g.node.fetch(now_ms(), channel) {
                FetchWait::Now { fresh } => return fresh,
                FetchWait::Round(round) => round,
            };
            let (tx, rx) = oneshot::channel();
            self.waiters()
                .entry(channel.clone())
                .or_default()
                .push((round, tx));
            if let Err(e) = self.drain(&mut g) {
                tracing::error!(error = %e, "storage failure on a fetch");
            }
            rx
        };
        metrics::counter!("outpost_read_fetches_total").increment(1);
        match tokio::time::timeout(READ_FETCH_TIMEOUT, rx).await {
            Ok(Ok(fresh)) => fresh,
            _ => {
                metrics::counter!("outpost_read_fetch_timeouts_total").increment(1);
                tracing::debug!(%channel, "a read's fetch did not complete in time: answering with what is here");
                false
            }
        }
    }

    /// Whether a read (or a first subscriber) of `channel` here waits for a fetch.
    pub fn needs_fetch(&self, channel: &ChannelName) -> bool {
        self.lock().node.needs_fetch(channel)
    }

    /// Fetch rounds of `channel` up to `upto` are over: their readers go on.
    pub(super) fn fetched(&self, channel: &ChannelName, upto: u64, fresh: bool) {
        let mut w = self.waiters();
        let Some(list) = w.get_mut(channel) else {
            return;
        };
        for (_, tx) in list.extract_if(.., |(round, _)| *round <= upto) {
            let _ = tx.send(fresh);
        }
        if list.is_empty() {
            w.remove(channel);
        }
    }

    /// The node was rebuilt (its rounds are gone): every reader goes on now.
    pub(super) fn fetches_abandoned(&self) {
        for (_, list) in self.waiters().drain() {
            for (_, tx) in list {
                let _ = tx.send(false);
            }
        }
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, FetchWaiters> {
        self.fetch_waiters.lock().unwrap_or_else(|p| p.into_inner())
    }
}
