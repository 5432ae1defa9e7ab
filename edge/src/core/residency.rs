//! Residency: a node holds only the channels in use. A stored channel is loaded
//! before any input that names it, under the core lock (so inputs for it wait and
//! none is reordered, and the node never starts an empty channel where a stored one
//! exists); the sweep unloads idle channels and keeps the rest under a byte budget.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use shared::store::Store;
use shared::sync::{DurableChannel, Node, Role, SyncConfig};
use shared::{ChannelName, ReplicaId};

use super::{by_last_use, now_ms, Core, CoreError, Inner};
use crate::fanout::Fanout;
use crate::storage::Storage;

impl Core {
    /// Rebuilds the node from storage (at start, and after a storage failure): the
    /// replica's marks and, resident, the channels with local ops the upstream has not
    /// acked (edge) plus `also`. What they hold is durable: the fan-out's delivered
    /// vectors include it.
    pub(super) fn restore_node(
        storage: &Storage,
        id: ReplicaId,
        role: Role,
        cfg: SyncConfig,
        fanout: &Fanout,
        also: Vec<ChannelName>,
    ) -> Result<Node, CoreError> {
        let mut names = if role == Role::Edge {
            storage.outbox_channels()?
        } else {
            Vec::new()
        };
        names.extend(also);
        let mut channels = BTreeMap::new();
        for name in names {
            if channels.contains_key(&name) {
                continue;
            }
            if let Some(d) = storage.load_channel(&name)? {
                fanout.seed_delivered(&name, &d.vv());
                channels.insert(name, d);
            }
        }
        let ops: usize = channels.values().map(|d| d.log.len()).sum();
        tracing::info!(replica = %id, channels = channels.len(), ops, "node restored from storage; other channels stay on disk until used");
        Ok(Node::restore(
            id,
            role,
            cfg,
            channels,
            storage.retired()?,
            storage.upstream()?,
            now_ms(),
        ))
    }

    /// Makes a stored channel resident before an input names it (the node must never
    /// start an empty channel where a stored one exists). Loads under the core lock,
    /// so inputs for the channel wait for it and nothing overtakes the load.
    pub(super) fn ensure(&self, g: &mut Inner, channel: &ChannelName) -> Result<(), CoreError> {
        if g.node.is_resident(channel) {
            return Ok(());
        }
        let storage = self.storage()?;
        let started = Instant::now();
        if let Some(d) = storage.load_channel(channel)? {
            self.make_resident(g, channel, d, started)?;
        }
        Ok(())
    }

    /// Makes a channel read from disk resident.
    fn make_resident(
        &self,
        g: &mut Inner,
        channel: &ChannelName,
        d: DurableChannel,
        started: Instant,
    ) -> Result<(), CoreError> {
        self.fanout.seed_delivered(channel, &d.vv());
        let ops = d.log.len();
        g.node.load(channel.clone(), d);
        g.last_used.insert(channel.clone(), Instant::now());
        metrics::counter!("outpost_channel_loads_total").increment(1);
        metrics::histogram!("outpost_channel_load_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(%channel, ops, "channel loaded");
        self.drain(g)
    }

    /// Loads a stored channel without holding the core lock while sled reads it, so
    /// other channels go on meanwhile; async callers (client requests, link readers)
    /// call it before the input. The read is installed only if the channel is still
    /// not resident and no channel left memory meanwhile (then it could be stale:
    /// the read is retried); anything that still finds the channel cold loads it
    /// under the lock ([`Core::ensure`]).
    pub async fn preload(&self, channel: &ChannelName) {
        for _ in 0..3 {
            let departures = {
                let g = self.lock();
                if g.node.is_resident(channel) {
                    return;
                }
                g.departures
            };
            let Ok(storage) = self.storage() else {
                return;
            };
            let started = Instant::now();
            let (name, reader) = (channel.clone(), storage.clone());
            let read = tokio::task::spawn_blocking(move || reader.read_channel(&name)).await;
            let Ok(Ok(Some(read))) = read else {
                // Not stored, or unreadable: the input's own load says why.
                return;
            };
            let mut g = self.lock();
            if g.node.is_resident(channel) {
                return;
            }
            if g.departures != departures {
                continue;
            }
            let d = storage.install(channel, read);
            if let Err(e) = self.make_resident(&mut g, channel, d, started) {
                tracing::error!(%channel, error = %e, "storage failure after loading a channel");
            }
            return;
        }
    }

    /// Loads the channels a link-up will sync: those with unacked local ops, or every
    /// stored channel when the upstream is a new one (see `Persist::Upstream`).
    pub(super) fn ensure_for_link(&self, g: &mut Inner, peer: ReplicaId) -> Result<(), CoreError> {
        if g.node.role() != Role::Edge {
            return Ok(());
        }
        let storage = self.storage()?;
        let names = if g.node.compares_all_with(peer) {
            let all = storage.channel_names()?;
            if !all.is_empty() {
                tracing::info!(channels = all.len(), upstream = %peer, "a new upstream: loading every stored channel to compare it");
            }
            all
        } else {
            storage.outbox_channels()?
        };
        for name in names {
            self.ensure(g, &name)?;
        }
        Ok(())
    }

    /// Unloads resident channels that may go (see `Node::can_unload`): those idle for
    /// `idle`, then the least recently used until the rest fit in `budget` bytes.
    /// Their data stays stored; the next input that names one loads it again.
    pub fn sweep_resident(&self, budget: u64, idle: Duration) {
        let mut g = self.lock();
        let (sizes, mut total) = by_last_use(&g);
        let storage = self.storage().ok();
        let mut unloaded = 0u64;
        for (name, bytes, used) in sizes {
            let idle = used.is_none_or(|u| u.elapsed() >= idle);
            if !(idle || total > budget) || !g.node.unload(&name) {
                continue;
            }
            if let Some(s) = &storage {
                s.unload(&name);
            }
            g.departures += 1;
            self.fanout.forget(&name);
            total = total.saturating_sub(bytes);
            unloaded += 1;
        }
        if unloaded > 0 {
            metrics::counter!("outpost_channel_unloads_total").increment(unloaded);
            tracing::debug!(channels = unloaded, "unloaded channels from memory");
        }
        metrics::gauge!("outpost_resident_bytes").set(total as f64);
    }

    /// Loads a channel for a read; a read of a channel that cannot be loaded answers
    /// as if it were not held here (and logs why).
    pub(super) fn ensure_for_read(&self, g: &mut Inner, channel: &ChannelName) {
        if let Err(e) = self.ensure(g, channel) {
            tracing::error!(%channel, error = %e, "cannot load a channel for a read");
        }
    }
}
