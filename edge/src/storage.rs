//! Durable storage in sled: per-channel op logs in applied order (the local arrival
//! index), materialized state, per-channel metadata (floor, acked), and the replica id.
//! One database per data dir. Which log entry holds a dot is kept in memory, rebuilt
//! from the log when it is loaded (a sled index of it cost one more B-tree insert per
//! op, a sixth of a durable publish's instructions).
//!
//! Writes are applied to sled's in-memory tree by [`Storage::apply`] and become
//! durable at the next [`Storage::flush`] (the group commit).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use shared::codec;
use shared::store::Store;
use shared::sync::{DurableChannel, Persist};
use shared::wire::LogRecord;
use shared::{ChannelName, Dot, ReplicaId, VersionVector};

/// A storage failure. Nothing that failed here was acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O: {0}")]
    Io(#[from] sled::Error),
    #[error("storage holds undecodable data at {what}: {err}")]
    Corrupt {
        what: String,
        err: codec::CodecError,
    },
    #[error("encoding: {0}")]
    Encode(codec::CodecError),
}

/// One entry of the reconciliation report: concurrent writes met on a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictRecord {
    /// When this replica saw it (Unix ms).
    pub time_ms: u64,
    pub channel: String,
    pub conflict: shared::Conflict,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ChanMeta {
    floor: VersionVector,
    acked: u64,
}

/// A channel as read from disk, before it is made resident.
#[derive(Debug)]
pub struct ReadChannel {
    pub channel: DurableChannel,
    /// Which log entry holds each dot (what compaction needs).
    arrivals: HashMap<Dot, u64>,
}

/// The edge's sled database.
pub struct Storage {
    db: sled::Db,
    /// `channel \0 arrival(u64 BE)` -> op
    log: sled::Tree,
    /// `channel \0 key` -> register
    state: sled::Tree,
    /// `channel` -> ChanMeta
    chans: sled::Tree,
    /// `channel \0 time_ms(u64 BE) id(u64 BE)` -> ConflictRecord (the reconciliation report)
    conflicts: sled::Tree,
    /// `channel` -> this replica's last seq (u64 BE) in a channel it evicted, so that
    /// writes after a re-open never reuse a dot.
    retired: sled::Tree,
    /// `channel` -> () for channels with local ops the upstream has not acked: the
    /// ones a restarted edge loads before its link comes up.
    outbox: sled::Tree,
    /// Clustered coordinator: `seq(u64 BE)` -> (channel, record) queued for the shared
    /// log and not yet stored there.
    log_outbox: sled::Tree,
    known: Mutex<HashSet<ChannelName>>,
    /// channel -> dot -> arrival: where compaction finds an op's log entry.
    arrivals: Mutex<HashMap<ChannelName, HashMap<Dot, u64>>>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").finish_non_exhaustive()
    }
}

fn prefix(channel: &ChannelName) -> Vec<u8> {
    let mut k = Vec::with_capacity(channel.as_str().len() + 17);
    k.extend_from_slice(channel.as_str().as_bytes());
    k.push(0);
    k
}

impl Storage {
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Self, StorageError> {
        let db = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(cache_mb.saturating_mul(1 << 20))
            .mode(sled::Mode::HighThroughput)
            .open()?;
        // Data dirs written before the index moved to memory hold a `dots` tree.
        db.drop_tree("dots")?;
        let storage = Self {
            log: db.open_tree("log")?,
            state: db.open_tree("state")?,
            chans: db.open_tree("chans")?,
            conflicts: db.open_tree("conflicts")?,
            retired: db.open_tree("retired")?,
            outbox: db.open_tree("outbox")?,
            log_outbox: db.open_tree("log_outbox")?,
            db,
            known: Mutex::new(HashSet::new()),
            arrivals: Mutex::new(HashMap::new()),
        };
        if storage.db.get("outbox_index")?.is_none() {
            storage.build_outbox_index()?;
        }
        Ok(storage)
    }

    /// The replica id kept in this data dir, created on first start.
    pub fn replica_id(&self) -> Result<ReplicaId, StorageError> {
        if let Some(v) = self.db.get("replica_id")? {
            let raw = <[u8; 8]>::try_from(v.as_ref()).map_err(|_| StorageError::Corrupt {
                what: "replica_id".into(),
                err: codec::CodecError::Decode("not 8 bytes".into()),
            })?;
            if let Some(id) = ReplicaId::new(u64::from_be_bytes(raw)) {
                return Ok(id);
            }
        }
        let id = loop {
            let raw = getrandom::u64().map_err(|e| {
                StorageError::Io(sled::Error::Io(std::io::Error::other(e.to_string())))
            })?;
            if let Some(id) = ReplicaId::new(raw) {
                break id;
            }
        };
        self.db.insert("replica_id", &id.get().to_be_bytes())?;
        self.db.flush()?;
        Ok(id)
    }

    /// Sets the replica id (a restored backup takes a new one).
    pub fn set_replica_id(&self, id: ReplicaId) -> Result<(), StorageError> {
        self.db.insert("replica_id", &id.get().to_be_bytes())?;
        Ok(())
    }

    /// Every stored channel, loaded (backups; tests).
    pub fn load(&self) -> Result<BTreeMap<ChannelName, DurableChannel>, StorageError> {
        let mut out = BTreeMap::new();
        for name in self.channel_names()? {
            if let Some(d) = self.load_channel(&name)? {
                out.insert(name, d);
            }
        }
        Ok(out)
    }

    /// Data dirs from before the outbox index: one scan finds the channels whose own
    /// ops run past their acked mark.
    fn build_outbox_index(&self) -> Result<(), StorageError> {
        let me = self.replica_id()?;
        for item in self.chans.iter() {
            let (k, v) = item?;
            let name = channel_name(&k)?;
            let meta: ChanMeta = decode(&v, "channel meta")?;
            let mut own = meta.floor.get(me);
            for item in self.log.scan_prefix(prefix(&name)).values() {
                let op: shared::Op = decode(&item?, "op")?;
                if op.dot.origin == me {
                    own = own.max(op.dot.seq);
                }
            }
            if own > meta.acked {
                self.outbox.insert(name.as_str(), &[])?;
            }
        }
        self.db.insert("outbox_index", &[1])?;
        self.db.flush()?;
        Ok(())
    }

    /// Up to `limit` stored channel names after `after` (from the first without it),
    /// in order.
    pub fn channel_names_after(
        &self,
        after: Option<&ChannelName>,
        limit: usize,
    ) -> Result<Vec<ChannelName>, StorageError> {
        let from = after.map(|c| c.as_str().as_bytes().to_vec());
        let range = match &from {
            Some(k) => self.chans.range::<&[u8], _>((
                std::ops::Bound::Excluded(k.as_slice()),
                std::ops::Bound::Unbounded,
            )),
            None => self.chans.iter(),
        };
        range
            .keys()
            .take(limit)
            .map(|k| channel_name(&k?))
            .collect()
    }

    /// The stored channel names that start with `prefix`, in order.
    pub fn channel_names_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<ChannelName>, StorageError> {
        self.chans
            .scan_prefix(prefix.as_bytes())
            .keys()
            .map(|k| channel_name(&k?))
            .collect()
    }

    /// Reads one stored channel without touching what is kept in memory: safe to call
    /// while the channel may be resident; [`Storage::install`] it under the core lock.
    pub fn read_channel(&self, name: &ChannelName) -> Result<Option<ReadChannel>, StorageError> {
        let Some(v) = self.chans.get(name.as_str())? else {
            return Ok(None);
        };
        let meta: ChanMeta = decode(&v, "channel meta")?;
        let p = prefix(name);
        let mut log: Vec<shared::Op> = Vec::new();
        let mut dots = HashMap::new();
        for item in self.log.scan_prefix(&p) {
            let (k, v) = item?;
            let op: shared::Op = decode(&v, "op")?;
            let arrival = be_u64(
                k.get(p.len()..).unwrap_or_default(),
                &format!("log key of {name}"),
            )?;
            dots.insert(op.dot, arrival);
            log.push(op);
        }
        let mut state = BTreeMap::new();
        for item in self.state.scan_prefix(&p) {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k[p.len()..]).into_owned();
            state.insert(key, decode(&v, "register")?);
        }
        Ok(Some(ReadChannel {
            channel: DurableChannel {
                state,
                log,
                floor: meta.floor,
                acked: meta.acked,
            },
            arrivals: dots,
        }))
    }

    /// Keeps the index of a channel read by [`Storage::read_channel`] (it becomes
    /// resident) and hands back its data.
    pub fn install(&self, name: &ChannelName, read: ReadChannel) -> DurableChannel {
        self.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), read.arrivals);
        self.known
            .lock()
            .map(|mut g| g.insert(name.clone()))
            .unwrap_or_default();
        read.channel
    }

    fn ensure_channel(&self, channel: &ChannelName) -> Result<(), StorageError> {
        // Called for every stored op: look up without cloning the name first.
        let fresh = self
            .known
            .lock()
            .map(|mut g| !g.contains(channel) && g.insert(channel.clone()))
            .unwrap_or(true);
        if fresh && !self.chans.contains_key(channel.as_str())? {
            self.chans.insert(
                channel.as_str(),
                codec::to_bytes(&ChanMeta::default()).map_err(StorageError::Encode)?,
            )?;
        }
        Ok(())
    }

    fn update_meta(
        &self,
        channel: &ChannelName,
        f: impl FnOnce(&mut ChanMeta),
    ) -> Result<(), StorageError> {
        let mut meta: ChanMeta = match self.chans.get(channel.as_str())? {
            Some(v) => decode(&v, "channel meta")?,
            None => ChanMeta::default(),
        };
        f(&mut meta);
        self.chans.insert(
            channel.as_str(),
            codec::to_bytes(&meta).map_err(StorageError::Encode)?,
        )?;
        Ok(())
    }

    /// Appends to the reconciliation report.
    pub fn record_conflict(&self, rec: &ConflictRecord) -> Result<(), StorageError> {
        let channel = ChannelName::new(rec.channel.clone()).map_err(|e| StorageError::Corrupt {
            what: "conflict channel".into(),
            err: codec::CodecError::Encode(e.to_string()),
        })?;
        let mut k = prefix(&channel);
        k.extend_from_slice(&rec.time_ms.to_be_bytes());
        k.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
        self.conflicts
            .insert(k, codec::to_bytes(rec).map_err(StorageError::Encode)?)?;
        Ok(())
    }

    /// Reconciliation records, oldest first: one channel or all, within a time range.
    pub fn conflicts(
        &self,
        channel: Option<&ChannelName>,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, StorageError> {
        let iter = match channel {
            Some(c) => self.conflicts.scan_prefix(prefix(c)),
            None => self.conflicts.iter(),
        };
        let mut out = Vec::new();
        for item in iter {
            let (_, v) = item?;
            let rec: ConflictRecord = decode(&v, "conflict record")?;
            if rec.time_ms >= from_ms && rec.time_ms <= to_ms {
                out.push(rec);
                if out.len() >= limit {
                    break;
                }
            }
        }
        out.sort_by_key(|r| r.time_ms);
        Ok(out)
    }

    /// A small named value (e.g. the revoked-edges list).
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get(format!("meta:{key}"))?.map(|v| v.to_vec()))
    }

    pub fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.db.insert(format!("meta:{key}"), value)?;
        self.db.flush()?;
        Ok(())
    }

    /// Clustered coordinator: a record queued for the shared log, under `seq` (kept
    /// until [`Storage::log_outbox_remove_upto`]; written in the group commit of the
    /// op or state it carries).
    pub fn log_outbox_put(
        &self,
        seq: u64,
        channel: &ChannelName,
        record: &LogRecord,
    ) -> Result<(), StorageError> {
        let v = codec::to_bytes(&(channel, record)).map_err(StorageError::Encode)?;
        self.log_outbox.insert(seq.to_be_bytes(), v)?;
        Ok(())
    }

    /// The shared log stored every record up to `seq`.
    pub fn log_outbox_remove_upto(&self, seq: u64) -> Result<(), StorageError> {
        for k in self.log_outbox.range(..=seq.to_be_bytes()).keys() {
            self.log_outbox.remove(k?)?;
        }
        Ok(())
    }

    /// Every record queued for the shared log and not yet stored, in order.
    #[allow(clippy::type_complexity)]
    pub fn log_outbox(&self) -> Result<Vec<(u64, ChannelName, LogRecord)>, StorageError> {
        let mut out = Vec::new();
        for kv in self.log_outbox.iter() {
            let (k, v) = kv?;
            let seq = be_u64(&k, "log_outbox key")?;
            let (c, r): (ChannelName, LogRecord) = decode(&v, &format!("log_outbox {seq}"))?;
            out.push((seq, c, r));
        }
        Ok(out)
    }

    /// Deletes everything kept for a channel (cache eviction).
    pub fn remove_channel(&self, channel: &ChannelName) -> Result<(), StorageError> {
        let p = prefix(channel);
        for tree in [&self.log, &self.state] {
            for item in tree.scan_prefix(&p).keys() {
                tree.remove(item?)?;
            }
        }
        self.chans.remove(channel.as_str())?;
        self.outbox.remove(channel.as_str())?;
        self.known
            .lock()
            .map(|mut g| g.remove(channel))
            .unwrap_or_default();
        self.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(channel);
        Ok(())
    }

    /// Makes everything applied so far durable (fsync).
    pub async fn flush(&self) -> Result<usize, StorageError> {
        Ok(self.db.flush_async().await?)
    }

    /// Bytes on disk, for metrics.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

/// The sled store behind the seam every node shell uses (see `shared::store`).
impl Store for Storage {
    type Error = StorageError;

    /// Applies one storage action (durable at the next flush).
    fn apply(&self, p: &Persist) -> Result<(), StorageError> {
        match p {
            Persist::Op { channel, op } => {
                self.ensure_channel(channel)?;
                let arrival = self.db.generate_id()?;
                let mut k = prefix(channel);
                k.extend_from_slice(&arrival.to_be_bytes());
                self.log
                    .insert(k, codec::to_bytes(op).map_err(StorageError::Encode)?)?;
                let mut all = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
                // Look up before cloning the name: this runs for every stored op.
                match all.get_mut(channel) {
                    Some(index) => index.insert(op.dot, arrival),
                    None => all
                        .entry(channel.clone())
                        .or_default()
                        .insert(op.dot, arrival),
                };
            }
            Persist::Register {
                channel,
                key,
                register,
            } => {
                self.ensure_channel(channel)?;
                let mut k = prefix(channel);
                k.extend_from_slice(key.as_bytes());
                self.state
                    .insert(k, codec::to_bytes(register).map_err(StorageError::Encode)?)?;
            }
            Persist::RemoveKeys { channel, keys } => {
                for key in keys {
                    let mut k = prefix(channel);
                    k.extend_from_slice(key.as_bytes());
                    self.state.remove(k)?;
                }
            }
            Persist::Floor { channel, floor } => {
                self.update_meta(channel, |m| m.floor = floor.clone())?;
            }
            Persist::DropOps { channel, dots } => {
                let found: Vec<u64> = {
                    let mut all = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
                    match all.get_mut(channel) {
                        Some(index) => dots.iter().filter_map(|d| index.remove(d)).collect(),
                        None => Vec::new(),
                    }
                };
                for arrival in found {
                    let mut k = prefix(channel);
                    k.extend_from_slice(&arrival.to_be_bytes());
                    self.log.remove(k)?;
                }
            }
            Persist::Acked { channel, seq } => {
                self.update_meta(channel, |m| m.acked = m.acked.max(*seq))?;
            }
            Persist::Unacked { channel, seq } => {
                self.update_meta(channel, |m| m.acked = m.acked.min(*seq))?;
            }
            Persist::Upstream { id } => {
                self.db.insert("upstream", &id.get().to_be_bytes())?;
            }
            Persist::Outbox { channel, pending } => {
                if *pending {
                    self.outbox.insert(channel.as_str(), &[])?;
                } else {
                    self.outbox.remove(channel.as_str())?;
                }
            }
            Persist::Evict { channel, own_seq } => {
                self.remove_channel(channel)?;
                let key = channel.as_str().as_bytes();
                let prev = self
                    .retired
                    .get(key)?
                    .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                    .map_or(0, u64::from_be_bytes);
                self.retired
                    .insert(key, &prev.max(*own_seq).to_be_bytes())?;
            }
            Persist::Rebased { channel } => {
                self.retired.remove(channel.as_str().as_bytes())?;
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        Ok(())
    }

    /// Reads one stored channel (its log, state, floor and acked mark), and keeps the
    /// index compaction needs for it until [`Storage::unload`].
    fn load_channel(&self, name: &ChannelName) -> Result<Option<DurableChannel>, StorageError> {
        Ok(self.read_channel(name)?.map(|r| self.install(name, r)))
    }

    /// The names of every stored channel.
    fn channel_names(&self) -> Result<Vec<ChannelName>, StorageError> {
        self.chans
            .iter()
            .keys()
            .map(|k| channel_name(&k?))
            .collect()
    }

    /// Channels with local ops the upstream has not acked ([`Persist::Outbox`]).
    fn outbox_channels(&self) -> Result<Vec<ChannelName>, StorageError> {
        self.outbox
            .iter()
            .keys()
            .map(|k| channel_name(&k?))
            .collect()
    }

    /// Everything kept, per channel, to rebuild the replication node.
    /// Channels this replica evicted, with its last seq in each.
    fn retired(&self) -> Result<BTreeMap<ChannelName, u64>, StorageError> {
        let mut out = BTreeMap::new();
        for item in self.retired.iter() {
            let (k, v) = item?;
            let seq = be_u64(&v, "retired seq")?;
            out.insert(channel_name(&k)?, seq);
        }
        Ok(out)
    }

    /// The upstream that last compared every channel with this node
    /// ([`Persist::Upstream`]).
    fn upstream(&self) -> Result<Option<ReplicaId>, StorageError> {
        Ok(self
            .db
            .get("upstream")?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .and_then(|raw| ReplicaId::new(u64::from_be_bytes(raw))))
    }

    /// Forgets what [`Storage::load_channel`] kept in memory for a channel that is no
    /// longer resident (its data stays stored).
    fn unload(&self, name: &ChannelName) {
        self.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.known
            .lock()
            .map(|mut g| g.remove(name))
            .unwrap_or_default();
    }
}

fn channel_name(k: &[u8]) -> Result<ChannelName, StorageError> {
    String::from_utf8(k.to_vec())
        .ok()
        .and_then(|s| ChannelName::new(s).ok())
        .ok_or_else(|| StorageError::Corrupt {
            what: "channel name".into(),
            err: codec::CodecError::Decode(format!("{k:?}")),
        })
}

/// A big-endian u64 (keys and marks written with `to_be_bytes`).
fn be_u64(v: &[u8], what: &str) -> Result<u64, StorageError> {
    <[u8; 8]>::try_from(v)
        .map(u64::from_be_bytes)
        .map_err(|_| StorageError::Corrupt {
            what: what.into(),
            err: codec::CodecError::Decode(format!("{} bytes, not a u64", v.len())),
        })
}

fn decode<T: serde::de::DeserializeOwned>(v: &[u8], what: &str) -> Result<T, StorageError> {
    codec::from_bytes(v).map_err(|err| StorageError::Corrupt {
        what: what.into(),
        err,
    })
}
