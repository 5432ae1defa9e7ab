//! The storage seam: what a node's shell needs from durable storage, and an
//! in-memory implementation (the simulator's disk).
//!
//! The node never touches storage itself: it emits [`Persist`] actions, and the shell
//! applies them to a [`Store`] and calls [`Store::flush`] before it lets any later
//! output out (the output contract in [`crate::sync`]). Channels live in the store;
//! the node holds only the resident ones, loaded with [`Store::load_channel`] when an
//! input names them. Implementations: sled (`edge::storage::Storage`, edges and the
//! embedded cloud) and [`MemStore`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use crate::ids::{ChannelName, Dot, ReplicaId};
use crate::state::Register;
use crate::sync::{DurableChannel, Persist};

/// Durable storage of one replica.
pub trait Store {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Applies one storage action; it is durable once [`Store::flush`] returns.
    fn apply(&self, p: &Persist) -> Result<(), Self::Error>;

    /// The durability point (group commit): everything applied so far is durable
    /// when this returns.
    fn flush(&self) -> Result<(), Self::Error>;

    /// One stored channel: its retained log in applied order, state, floor and
    /// acked mark. `None` if the channel is not stored.
    fn load_channel(&self, name: &ChannelName) -> Result<Option<DurableChannel>, Self::Error>;

    /// Every stored channel's name.
    fn channel_names(&self) -> Result<Vec<ChannelName>, Self::Error>;

    /// Channels with local ops the upstream has not acked ([`Persist::Outbox`]): what
    /// a restarted edge loads before its link comes up.
    fn outbox_channels(&self) -> Result<Vec<ChannelName>, Self::Error>;

    /// Evicted channels with this replica's last seq in each ([`Persist::Evict`]).
    fn retired(&self) -> Result<BTreeMap<ChannelName, u64>, Self::Error>;

    /// The upstream that last compared every channel ([`Persist::Upstream`]).
    fn upstream(&self) -> Result<Option<ReplicaId>, Self::Error>;

    /// The channel is no longer resident: drop whatever was kept in memory for it.
    fn unload(&self, name: &ChannelName);
}

#[derive(Clone, Debug, Default)]
struct Disk {
    channels: BTreeMap<ChannelName, DurableChannel>,
    retired: BTreeMap<ChannelName, u64>,
    upstream: Option<ReplicaId>,
    outbox: BTreeSet<ChannelName>,
}

/// A [`Store`] in memory, with the same semantics as the sled one (the simulator's
/// disk; durable by definition, so `flush` does nothing).
#[derive(Debug, Default)]
pub struct MemStore {
    disk: Mutex<Disk>,
}

impl Clone for MemStore {
    fn clone(&self) -> Self {
        Self {
            disk: Mutex::new(self.lock().clone()),
        }
    }
}

impl MemStore {
    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stored register (to model a torn write in the simulator).
    pub fn register(&self, channel: &ChannelName, key: &str) -> Option<Register> {
        self.lock()
            .channels
            .get(channel)
            .and_then(|d| d.state.get(key))
            .cloned()
    }

    /// Puts a register back as it was (`None`: absent) — a crash that lost the write.
    pub fn restore_register(&self, channel: &ChannelName, key: &str, reg: Option<Register>) {
        let mut g = self.lock();
        let d = g.channels.entry(channel.clone()).or_default();
        match reg {
            Some(r) => d.state.insert(key.to_owned(), r),
            None => d.state.remove(key),
        };
    }
}

impl Store for MemStore {
    type Error = std::convert::Infallible;

    fn apply(&self, p: &Persist) -> Result<(), Self::Error> {
        let mut g = self.lock();
        let disk = &mut *g;
        match p.clone() {
            Persist::Op { channel, op } => disk.channels.entry(channel).or_default().log.push(op),
            Persist::Register {
                channel,
                key,
                register,
            } => {
                disk.channels
                    .entry(channel)
                    .or_default()
                    .state
                    .insert(key, register);
            }
            Persist::RemoveKeys { channel, keys } => {
                let d = disk.channels.entry(channel).or_default();
                for k in keys {
                    d.state.remove(&k);
                }
            }
            Persist::Floor { channel, floor } => {
                disk.channels.entry(channel).or_default().floor = floor;
            }
            Persist::DropOps { channel, dots } => {
                let drop: BTreeSet<Dot> = dots.into_iter().collect();
                disk.channels
                    .entry(channel)
                    .or_default()
                    .log
                    .retain(|op| !drop.contains(&op.dot));
            }
            Persist::Acked { channel, seq } => {
                let d = disk.channels.entry(channel).or_default();
                d.acked = d.acked.max(seq);
            }
            Persist::Unacked { channel, seq } => {
                let d = disk.channels.entry(channel).or_default();
                d.acked = d.acked.min(seq);
            }
            Persist::Upstream { id } => disk.upstream = Some(id),
            Persist::Outbox { channel, pending } => {
                if pending {
                    disk.outbox.insert(channel);
                } else {
                    disk.outbox.remove(&channel);
                }
            }
            Persist::Rebased { channel } => {
                disk.retired.remove(&channel);
            }
            Persist::Evict { channel, own_seq } => {
                disk.channels.remove(&channel);
                disk.outbox.remove(&channel);
                let r = disk.retired.entry(channel).or_default();
                *r = (*r).max(own_seq);
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), Self::Error> {
        Ok(())
    }

    fn load_channel(&self, name: &ChannelName) -> Result<Option<DurableChannel>, Self::Error> {
        Ok(self.lock().channels.get(name).cloned())
    }

    fn channel_names(&self) -> Result<Vec<ChannelName>, Self::Error> {
        Ok(self.lock().channels.keys().cloned().collect())
    }

    fn outbox_channels(&self) -> Result<Vec<ChannelName>, Self::Error> {
        Ok(self.lock().outbox.iter().cloned().collect())
    }

    fn retired(&self) -> Result<BTreeMap<ChannelName, u64>, Self::Error> {
        Ok(self.lock().retired.clone())
    }

    fn upstream(&self) -> Result<Option<ReplicaId>, Self::Error> {
        Ok(self.lock().upstream)
    }

    fn unload(&self, _name: &ChannelName) {}
}
