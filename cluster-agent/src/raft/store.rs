//! Raft log and state machine in one RocksDB database.
//!
//! Column families (all integer keys big-endian, so RocksDB order is numeric order):
//!
//! | CF         | key                          | value                         |
//! |------------|------------------------------|-------------------------------|
//! | `log`      | log index (u64 BE)           | JSON `Entry`                  |
//! | `meta`     | `vote`, `committed`, `purged`| JSON vote / log id            |
//! | `sm`       | `c` cluster, `n`+id BE node, `k`+key kv, `e`+seq BE event, `s` last event seq, `m:applied`, `m:membership` | JSON |
//! | `snapshot` | `current`                    | JSON `StoredSnapshot`       |
//!
//! Votes, appends, truncations, purges, snapshots and installed snapshots are written
//! with a synced WAL before they are acknowledged (appends in the append call itself,
//! see [`LogStore::append`]). State-machine applies are not synced. One apply batch is one
//! `WriteBatch`: the touched entities together with `last_applied` and the membership.
//!
//! # Why an apply needs no fsync
//!
//! The log is the durable record; the state machine may lag it after a power loss and is
//! brought forward from the log when the agent starts. This holds because:
//!
//! 1. **One WAL, recovered as a prefix.** The log, the meta, the state machine and the
//!    snapshot are column families of one RocksDB database, and all column families
//!    share its one write-ahead log. Every write is handed to the WAL file (`write(2)`,
//!    no `manual_wal_flush`) before it returns, so a killed process loses nothing; a
//!    power loss can lose only writes after the last WAL sync, and recovery replays the
//!    WAL in write order up to the first missing or torn record (a damaged record in the
//!    middle refuses the store, see `open`). So what survives is a prefix of the write
//!    sequence, and an apply is durable as soon as any later synced write is (the next
//!    append's WAL sync, a vote, a snapshot). A memtable flush syncs the WALs it closes
//!    before its table file is recorded, so table files never hold a write the WAL
//!    lost.
//! 2. **The applied index never passes the durable log.** An entry is appended (a WAL
//!    write) before it can be committed and applied, so in the prefix an apply is
//!    always preceded by the append of its entry: `last_applied <= last log id` after
//!    any crash.
//! 3. **openraft re-applies what is missing.** At start (`StorageHelper::
//!    get_initial_state`) it reads `last_applied` from [`SmStore::applied_state`] and
//!    `committed` (also unsynced, written after the entries it covers), and re-applies
//!    the log from `last_applied + 1` to `committed`; entries above `committed` are
//!    applied when the leader commits them again. Applying is deterministic from the
//!    log alone, so the re-applied state is the one that was lost.
//! 4. **No log entry above the durable applied index is purged.** openraft purges only
//!    up to its current snapshot's last log id (`calc_purge_upto`, `trigger_purge_log`).
//!    A snapshot is stored with a synced write (`store_snapshot`) after the applies it
//!    covers were written, so by (1) the state machine is durable up to at least the
//!    snapshot's index before any purge can be scheduled, and `purge` itself syncs.
//!    An installed snapshot replaces the state machine with a synced write first.
//!
//! A commit therefore waits for the log fsyncs (the leader's, then the followers' in
//! parallel) and not for one more fsync per apply.
//! `cluster-agent` tests: `a_lagging_state_machine_is_brought_forward_from_the_log`.

// The error type is openraft's `StorageError`, dictated by the storage traits; helpers
// return it too so `?` composes. Its size is not ours to choose.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, StorageIOError,
};
use rocksdb::{
    ColumnFamilyDescriptor, DBRecoveryMode, Direction, IteratorMode, Options, ReadOptions,
    WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

use crate::raft::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig, Vote,
};
use crate::state::{ClusterState, CommandResult, StateKey};

/// Target of the store's per-operation timing events (debug level): `RUST_LOG=
/// info,raft_timing=debug` logs how long each log append, WAL sync and apply took.
pub const TIMING: &str = "raft_timing";

/// Longest bounded log read served by point lookups instead of an iterator.
const SHORT_READ_MAX: u64 = 64;

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const CF_SM: &str = "sm";
const CF_SNAPSHOT: &str = "snapshot";
const ALL_CFS: [&str; 4] = [CF_LOG, CF_META, CF_SM, CF_SNAPSHOT];

/// Format version of snapshots and of the state machine encoding.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;
/// Largest snapshot accepted from a peer.
pub const SNAPSHOT_LEN_MAX: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the RocksDB store at {path}")]
    Open {
        path: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("the RocksDB store at {path} is damaged (its checksums do not match): restore it from a backup, or remove this node from the cluster (`clusterctl cluster leave`) and join it again with a new data dir")]
    Corrupt {
        path: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error(
        "the RocksDB store at {path} has no column family `{cf}`; it was not written by this agent"
    )]
    MissingColumnFamily { path: String, cf: &'static str },
    #[error("the state machine in {path} cannot be decoded (key {key})")]
    Decode {
        path: String,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("RocksDB read failed while loading {path}")]
    Read {
        path: String,
        #[source]
        source: rocksdb::Error,
    },
}

/// The state machine's in-memory image, shared with readers (the services).
#[derive(Debug, Default, Clone)]
pub struct SmData {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub state: ClusterState,
}

/// Read handle to the applied state.
pub type SharedSm = Arc<RwLock<SmData>>;

/// A snapshot as stored and as sent to peers.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotPayload {
    pub format_version: u32,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub state: ClusterState,
}

/// Decode a snapshot blob another node sent (`install_snapshot`): its size is checked
/// before anything is decoded, then its JSON, then its format version.
pub fn decode_snapshot(bytes: &[u8]) -> Result<SnapshotPayload, String> {
    if bytes.len() > SNAPSHOT_LEN_MAX {
        return Err(format!(
            "snapshot is {} bytes; the limit is {SNAPSHOT_LEN_MAX}",
            bytes.len()
        ));
    }
    let payload: SnapshotPayload = serde_json::from_slice(bytes)
        .map_err(|e| format!("the snapshot cannot be decoded: {e}"))?;
    if payload.format_version != SNAPSHOT_FORMAT_VERSION {
        return Err(format!(
            "snapshot format version {} is not supported (expected {SNAPSHOT_FORMAT_VERSION})",
            payload.format_version
        ));
    }
    Ok(payload)
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// Open (or create) the store in `path`. `create` false refuses a missing database.
pub fn open(path: &Path, create: bool) -> Result<(LogStore, SmStore), StoreError> {
    let p = path.display().to_string();
    let mut opts = Options::default();
    opts.create_if_missing(create);
    opts.create_missing_column_families(create);
    // Keep memory modest: up to 16 agents share one test machine.
    opts.set_write_buffer_size(4 * 1024 * 1024);
    opts.set_max_background_jobs(2);
    // A damaged store is refused, never opened with part of its data. RocksDB's default
    // WAL recovery (point in time) stops replaying at the first bad record and opens a
    // store missing every later write, though each was synced and acknowledged (a lost
    // vote or log entry breaks Raft's safety). Only a torn last record — a write the
    // crash interrupted, never acknowledged — is tolerated.
    opts.set_wal_recovery_mode(DBRecoveryMode::TolerateCorruptedTailRecords);
    opts.set_paranoid_checks(true);
    if !create {
        let existing = DB::list_cf(&opts, path).map_err(|source| open_error(&p, source))?;
        for cf in ALL_CFS {
            if !existing.iter().any(|c| c == cf) {
                return Err(StoreError::MissingColumnFamily { path: p, cf });
            }
        }
    }
    let cfs = ALL_CFS
        .iter()
        .map(|n| ColumnFamilyDescriptor::new(*n, Options::default()));
    let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| open_error(&p, source))?;
    let db = Arc::new(db);
    verify(&db, &p)?;
    let data = load_sm(&db, &p)?;
    let (applied, _) = tokio::sync::watch::channel(data.last_applied);
    let shared = Arc::new(RwLock::new(data));
    Ok((
        LogStore { db: db.clone() },
        SmStore {
            db,
            data: shared,
            snapshot_seq: 0,
            applied,
        },
    ))
}

/// A RocksDB error at open: damage is named as such.
fn open_error(path: &str, source: rocksdb::Error) -> StoreError {
    let path = path.to_owned();
    if source.kind() == rocksdb::ErrorKind::Corruption {
        StoreError::Corrupt { path, source }
    } else {
        StoreError::Open { path, source }
    }
}

/// Reads every entry of every column family with checksums verified, so a damaged
/// table file is found when the agent starts rather than when a lagging peer first
/// asks for an old log entry. The store is small: the log is purged behind snapshots.
fn verify(db: &DB, path: &str) -> Result<(), StoreError> {
    for name in ALL_CFS {
        let Some(h) = db.cf_handle(name) else {
            return Err(StoreError::MissingColumnFamily {
                path: path.to_owned(),
                cf: name,
            });
        };
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(true);
        ro.fill_cache(false);
        for item in db.iterator_cf_opt(h, ro, IteratorMode::Start) {
            item.map_err(|source| read_error(path, source))?;
        }
    }
    Ok(())
}

/// A RocksDB error while loading: damage is named as such.
fn read_error(path: &str, source: rocksdb::Error) -> StoreError {
    let path = path.to_owned();
    if source.kind() == rocksdb::ErrorKind::Corruption {
        StoreError::Corrupt { path, source }
    } else {
        StoreError::Read { path, source }
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily, StorageError> {
    db.cf_handle(name).ok_or_else(|| {
        StorageIOError::read(AnyError::error(format!("column family {name} is missing"))).into()
    })
}

fn synced() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

const KEY_APPLIED: &[u8] = b"m:applied";
const KEY_MEMBERSHIP: &[u8] = b"m:membership";

fn load_sm(db: &DB, path: &str) -> Result<SmData, StoreError> {
    let Some(h) = db.cf_handle(CF_SM) else {
        return Err(StoreError::MissingColumnFamily {
            path: path.to_string(),
            cf: CF_SM,
        });
    };
    let mut d = SmData::default();
    for item in db.iterator_cf(h, IteratorMode::Start) {
        let (k, v) = item.map_err(|source| read_error(path, source))?;
        let dec_err = |source| StoreError::Decode {
            path: path.to_string(),
            key: String::from_utf8_lossy(&k).into_owned(),
            source,
        };
        if let Some(sk) = StateKey::decode(&k) {
            d.state.load_stored(&sk, &v).map_err(dec_err)?;
            continue;
        }
        match &*k {
            KEY_APPLIED => d.last_applied = serde_json::from_slice(&v).map_err(dec_err)?,
            KEY_MEMBERSHIP => d.membership = serde_json::from_slice(&v).map_err(dec_err)?,
            _ => {}
        }
    }
    Ok(d)
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(v).map_err(|e| StorageIOError::write(AnyError::new(&e)).into())
}

/// The Raft log half of the store.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
}

impl LogStore {
    fn get_meta<T: for<'a> Deserialize<'a>>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let h = cf(&self.db, CF_META)?;
        match self
            .db
            .get_cf(h, key)
            .map_err(|e| StorageIOError::read(AnyError::new(&e)))?
        {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StorageIOError::read(AnyError::new(&e)).into()),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &str, v: &T, sync: bool) -> Result<(), StorageError> {
        let h = cf(&self.db, CF_META)?;
        let bytes = to_json(v)?;
        let wo = if sync {
            synced()
        } else {
            WriteOptions::default()
        };
        self.db
            .put_cf_opt(h, key, bytes, &wo)
            .map_err(|e| StorageIOError::write(AnyError::new(&e)).into())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let t0 = std::time::Instant::now();
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => e.checked_add(1),
            Bound::Excluded(e) => Some(*e),
            Bound::Unbounded => None,
        };
        let h = cf(&self.db, CF_LOG)?;
        let decode = |idx: u64, v: &[u8]| -> Result<Entry, StorageError> {
            serde_json::from_slice(v)
                .map_err(|e| StorageIOError::read_log_at_index(idx, AnyError::new(&e)).into())
        };
        let mut out = Vec::new();
        // The common reads (replicating or applying the newest few entries) are short
        // bounded ranges: point lookups, no iterator to set up. The log is contiguous, so
        // the first missing index ends it; a range starting below the first entry takes
        // the iterator.
        if let Some(end) = end.filter(|e| *e > start && e - start <= SHORT_READ_MAX) {
            for idx in start..end {
                let got = self
                    .db
                    .get_pinned_cf(h, idx.to_be_bytes())
                    .map_err(|e| StorageIOError::read_logs(AnyError::new(&e)))?;
                match got {
                    Some(v) => out.push(decode(idx, &v)?),
                    None => break,
                }
            }
            if !out.is_empty() {
                tracing::debug!(
                    target: TIMING,
                    entries = out.len(),
                    us = t0.elapsed().as_micros() as u64,
                    "log read"
                );
                return Ok(out);
            }
        }
        let mut ro = ReadOptions::default();
        if let Some(end) = end {
            ro.set_iterate_upper_bound(end.to_be_bytes());
        }
        let key = start.to_be_bytes();
        for item in self
            .db
            .iterator_cf_opt(h, ro, IteratorMode::From(&key, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(AnyError::new(&e)))?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| {
                StorageIOError::read_logs(AnyError::error("log key is not 8 bytes"))
            })?);
            if !range.contains(&idx) {
                break;
            }
            out.push(decode(idx, &v)?);
        }
        tracing::debug!(
            target: TIMING,
            entries = out.len(),
            us = t0.elapsed().as_micros() as u64,
            "log read (iterator)"
        );
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta("purged")?;
        let h = cf(&self.db, CF_LOG)?;
        let last = match self.db.iterator_cf(h, IteratorMode::End).next() {
            None => None,
            Some(item) => {
                let (_, v) = item.map_err(|e| StorageIOError::read_logs(AnyError::new(&e)))?;
                let e: Entry = serde_json::from_slice(&v)
                    .map_err(|e| StorageIOError::read_logs(AnyError::new(&e)))?;
                Some(e.log_id)
            }
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta("vote", vote, true)
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.put_meta("committed", &committed, false)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>("committed")?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let h = cf(&self.db, CF_LOG)?;
        let t0 = std::time::Instant::now();
        let mut batch = WriteBatch::default();
        let mut n = 0usize;
        for e in entries {
            n += 1;
            batch.put_cf(h, e.log_id.index.to_be_bytes(), to_json(&e)?);
        }
        // Synced here, in the call: openraft 0.9's core awaits `callback` before it does
        // anything else (`RaftCore::append_to_log`; a leader replicates the entries only
        // afterwards, and runs one append at a time), so a sync thread could overlap
        // nothing and would only add two thread hand-offs to every commit (raft-bench
        // measured no gain from one). The sync holds one tokio worker meanwhile; the
        // core task is waiting for it either way.
        let res = self.db.write_opt(batch, &synced());
        tracing::debug!(
            target: TIMING,
            entries = n,
            write_us = t0.elapsed().as_micros() as u64,
            "log append"
        );
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(AnyError::new(&e)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let h = cf(&self.db, CF_LOG)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(h, log_id.index.to_be_bytes(), u64::MAX.to_be_bytes());
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash between the two steps leaves entries
        // below it, which readers never ask for.
        self.put_meta("purged", &log_id, true)?;
        let h = cf(&self.db, CF_LOG)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(h, 0u64.to_be_bytes(), (log_id.index + 1).to_be_bytes());
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)).into())
    }
}

/// The state machine half of the store.
pub struct SmStore {
    db: Arc<DB>,
    data: SharedSm,
    snapshot_seq: u64,
    /// The last applied log id, sent once the entries' effects are readable in `data`.
    applied: tokio::sync::watch::Sender<Option<LogId>>,
}

impl SmStore {
    /// Read handle for the services.
    pub fn shared(&self) -> SharedSm {
        self.data.clone()
    }

    /// A watch of the last applied log id: it changes only when entries are applied or a
    /// snapshot installed (openraft's metrics change with every acknowledgement a leader
    /// receives), after their effects are readable through [`SmStore::shared`].
    pub fn applied_watch(&self) -> tokio::sync::watch::Receiver<Option<LogId>> {
        self.applied.subscribe()
    }

    fn applied_now(&self, last: Option<LogId>) {
        self.applied.send_if_modified(|a| {
            let changed = *a != last;
            *a = last;
            changed
        });
    }
}

fn read_lock(data: &SharedSm) -> std::sync::RwLockReadGuard<'_, SmData> {
    data.read().unwrap_or_else(|p| p.into_inner())
}

fn write_lock(data: &SharedSm) -> std::sync::RwLockWriteGuard<'_, SmData> {
    data.write().unwrap_or_else(|p| p.into_inner())
}

fn put_entity(
    batch: &mut WriteBatch,
    h: &rocksdb::ColumnFamily,
    s: &ClusterState,
    k: &StateKey,
) -> Result<(), StorageError> {
    let value = s
        .stored_value(k)
        .map_err(|e| StorageError::from(StorageIOError::write(AnyError::new(&e))))?;
    match value {
        Some(v) => batch.put_cf(h, k.encode(), v),
        None => batch.delete_cf(h, k.encode()),
    }
    Ok(())
}

fn put_meta_entries(
    batch: &mut WriteBatch,
    h: &rocksdb::ColumnFamily,
    d: &SmData,
) -> Result<(), StorageError> {
    batch.put_cf(h, KEY_APPLIED, to_json(&d.last_applied)?);
    batch.put_cf(h, KEY_MEMBERSHIP, to_json(&d.membership)?);
    put_entity(batch, h, &d.state, &StateKey::LastEventSeq)?;
    Ok(())
}

fn build(db: &DB, data: &SharedSm, seq: u64) -> Result<Snapshot, StorageError> {
    let payload = {
        let d = read_lock(data);
        SnapshotPayload {
            format_version: SNAPSHOT_FORMAT_VERSION,
            last_applied: d.last_applied,
            membership: d.membership.clone(),
            state: d.state.clone(),
        }
    };
    let bytes = serde_json::to_vec(&payload)
        .map_err(|e| StorageIOError::write_snapshot(None, AnyError::new(&e)))?;
    let snapshot_id = match payload.last_applied {
        Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
        None => format!("none-{seq}"),
    };
    let meta = SnapshotMeta {
        last_log_id: payload.last_applied,
        last_membership: payload.membership,
        snapshot_id,
    };
    store_snapshot(db, &meta, &bytes)?;
    Ok(Snapshot {
        meta,
        snapshot: Box::new(Cursor::new(bytes)),
    })
}

fn store_snapshot(db: &DB, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StorageError> {
    let h = cf(db, CF_SNAPSHOT)?;
    let stored = StoredSnapshot {
        meta: meta.clone(),
        data: data.to_vec(),
    };
    let bytes = serde_json::to_vec(&stored)
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
    db.put_cf_opt(h, "current", bytes, &synced()).map_err(|e| {
        StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)).into()
    })
}

/// Builds snapshots from a copy of the in-memory state taken under the lock.
pub struct SmSnapshotBuilder {
    db: Arc<DB>,
    data: SharedSm,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SmSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        build(&self.db, &self.data, self.seq)
    }
}

impl RaftStateMachine<TypeConfig> for SmStore {
    type SnapshotBuilder = SmSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let d = read_lock(&self.data);
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let h = cf(&self.db, CF_SM)?;
        let t0 = std::time::Instant::now();
        let mut batch = WriteBatch::default();
        let mut results = Vec::new();
        let mut n = 0usize;
        // Applied in place (no copy of the whole state per batch) under the write lock,
        // held until the batch is written: readers never see a state ahead of what was
        // handed to RocksDB. The write is not synced (see the module docs): it takes
        // microseconds. Should it fail, openraft stops this node's Raft (a storage error
        // is fatal); the entries are committed, so the in-memory image still shows only
        // committed state, and a restart re-applies them from the log.
        let mut d = write_lock(&self.data);
        let mut touched = Vec::new();
        for e in entries {
            n += 1;
            d.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => results.push(CommandResult::Ok),
                EntryPayload::Normal(cmd) => {
                    let at = crate::state::LogPosition {
                        index: e.log_id.index,
                        term: e.log_id.leader_id.term,
                    };
                    let (r, t) = d.state.apply_at(&cmd, at);
                    touched.extend(t);
                    results.push(r);
                }
                EntryPayload::Membership(m) => {
                    d.membership = StoredMembership::new(Some(e.log_id), m);
                    results.push(CommandResult::Ok);
                }
            }
        }
        touched.sort();
        touched.dedup();
        for k in &touched {
            put_entity(&mut batch, h, &d.state, k)?;
        }
        put_meta_entries(&mut batch, h, &d)?;
        let t1 = std::time::Instant::now();
        self.db
            .write(batch)
            .map_err(|e| StorageIOError::write_state_machine(AnyError::new(&e)))?;
        let last = d.last_applied;
        drop(d);
        self.applied_now(last);
        tracing::debug!(
            target: TIMING,
            entries = n,
            apply_us = (t1 - t0).as_micros() as u64,
            write_us = t1.elapsed().as_micros() as u64,
            "sm apply"
        );
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        SmSnapshotBuilder {
            db: self.db.clone(),
            data: self.data.clone(),
            seq: self.snapshot_seq,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let bad = |msg: String| -> StorageError {
            StorageIOError::new(
                ErrorSubject::Snapshot(meta.signature().into()),
                ErrorVerb::Read,
                AnyError::error(msg),
            )
            .into()
        };
        let payload = decode_snapshot(&bytes).map_err(bad)?;
        let next = SmData {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state: payload.state,
        };
        let h = cf(&self.db, CF_SM)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(h, [0u8], [0xffu8]);
        let s = &next.state;
        let mut keys = Vec::new();
        if s.cluster.is_some() {
            keys.push(StateKey::Cluster);
        }
        keys.extend(s.nodes.keys().map(|id| StateKey::Node(*id)));
        keys.extend(s.kv.keys().map(|k| StateKey::Kv(k.clone())));
        keys.extend(s.events.keys().map(|q| StateKey::Event(*q)));
        keys.extend(s.vms.keys().map(|id| StateKey::Vm(*id)));
        keys.push(StateKey::LastVmId);
        keys.extend(s.jobs.jobs.keys().map(|id| StateKey::Job(*id)));
        keys.push(StateKey::JobMeta);
        keys.push(StateKey::Locks);
        keys.extend(s.migrations.keys().map(|id| StateKey::Migration(*id)));
        keys.push(StateKey::LastMigrationId);
        keys.push(StateKey::JoinTokens);
        keys.push(StateKey::Revocations);
        for k in &keys {
            put_entity(&mut batch, h, s, k)?;
        }
        put_meta_entries(&mut batch, h, &next)?;
        self.db.write_opt(batch, &synced()).map_err(|e| {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        *write_lock(&self.data) = next;
        self.applied_now(meta.last_log_id);
        store_snapshot(&self.db, meta, &bytes)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let h = cf(&self.db, CF_SNAPSHOT)?;
        let Some(v) = self
            .db
            .get_cf(h, "current")
            .map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&e)))?
        else {
            return Ok(None);
        };
        let s: StoredSnapshot = serde_json::from_slice(&v)
            .map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&e)))?;
        Ok(Some(Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, SmStore, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, SmStore), StorageError> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
            let (l, s) = open(&dir.path().join("raft"), true)
                .map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
            Ok((dir, l, s))
        }
    }

    #[test]
    fn openraft_storage_conformance_suite() -> Result<(), StorageError> {
        Suite::<TypeConfig, LogStore, SmStore, Builder, tempfile::TempDir>::test_all(Builder)
    }

    #[test]
    fn state_survives_reopen_and_missing_db_is_refused() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let p = dir.path().join("raft");
        assert!(matches!(open(&p, false), Err(StoreError::Open { .. })));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        rt.block_on(async {
            let (_l, mut sm) = open(&p, true).unwrap_or_else(|e| panic!("open: {e}"));
            let mut applied = sm.applied_watch();
            assert_eq!(*applied.borrow_and_update(), None);
            let entry = Entry {
                log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), 1),
                payload: EntryPayload::Normal(crate::state::Command::PutKv {
                    key: "a".into(),
                    value: "b".into(),
                }),
            };
            let r = sm.apply(vec![entry]).await.unwrap_or_default();
            assert_eq!(r, vec![CommandResult::Kv { previous: None }]);
            // The applied watch moved, and what it announces is readable.
            assert!(applied.has_changed().unwrap_or(false));
            assert_eq!(applied.borrow_and_update().map(|l| l.index), Some(1));
            assert!(read_lock(&sm.shared()).state.kv.contains_key("a"));
        });
        let (_l, sm) = open(&p, false).unwrap_or_else(|e| panic!("reopen: {e}"));
        let d = read_lock(&sm.shared()).clone();
        assert_eq!(d.state.kv.get("a").map(String::as_str), Some("b"));
        assert_eq!(d.last_applied.map(|l| l.index), Some(1));
        // A reopened store's watch starts at what it recovered.
        assert_eq!(sm.applied_watch().borrow().map(|l| l.index), Some(1));
    }

    /// `n` key/value entries applied one batch each (each a synced WAL record).
    fn apply_kvs(p: &Path, n: u64) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        rt.block_on(async {
            let (_l, mut sm) = open(p, true).unwrap_or_else(|e| panic!("open: {e}"));
            for i in 1..=n {
                let entry = Entry {
                    log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), i),
                    payload: EntryPayload::Normal(crate::state::Command::PutKv {
                        key: format!("k{i}"),
                        value: "v".repeat(200),
                    }),
                };
                let r = sm.apply(vec![entry]).await.unwrap_or_default();
                assert_eq!(r.len(), 1);
            }
        });
    }

    /// Overwrites 64 bytes in the middle of every file of `dir` whose name ends in `ext`;
    /// returns how many files it damaged.
    fn corrupt_middle(dir: &Path, ext: &str) -> usize {
        use std::io::{Seek, SeekFrom, Write};
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir: {e}")) {
            let path = e.unwrap_or_else(|e| panic!("dir entry: {e}")).path();
            if !path.to_string_lossy().ends_with(ext) {
                continue;
            }
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if len < 1024 {
                continue;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            f.seek(SeekFrom::Start(len / 2))
                .unwrap_or_else(|e| panic!("seek: {e}"));
            f.write_all(&[0x5a; 64])
                .unwrap_or_else(|e| panic!("write: {e}"));
            n += 1;
        }
        n
    }

    /// A write-ahead log damaged in the middle (the process was killed, nothing was
    /// flushed): RocksDB's default recovery would stop replaying at the damage and open
    /// a store missing every later (synced, acknowledged) write. It is refused instead.
    #[test]
    fn a_wal_damaged_in_the_middle_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let p = dir.path().join("raft");
        apply_kvs(&p, 200);
        assert!(
            corrupt_middle(&p, ".log") >= 1,
            "no write-ahead log in {}",
            p.display()
        );
        match open(&p, false) {
            Err(e @ StoreError::Corrupt { .. }) => {
                let text = crate::error_chain(&e);
                assert!(text.contains(&p.display().to_string()), "{text}");
                assert!(text.contains("Corruption"), "{text}");
            }
            Err(e) => panic!("not reported as corruption: {}", crate::error_chain(&e)),
            Ok((_l, sm)) => panic!(
                "opened with {} of 200 keys",
                read_lock(&sm.shared()).state.kv.len()
            ),
        }
    }

    /// A write the crash interrupted (the last record of the log torn) was never
    /// acknowledged: the store opens without it, with everything before it.
    #[test]
    fn a_torn_last_wal_record_is_tolerated() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let p = dir.path().join("raft");
        apply_kvs(&p, 200);
        let wal = std::fs::read_dir(&p)
            .unwrap_or_else(|e| panic!("read_dir: {e}"))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with(".log"))
            .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .unwrap_or_else(|| panic!("no write-ahead log in {}", p.display()));
        let len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&wal)
            .unwrap_or_else(|e| panic!("open {}: {e}", wal.display()));
        f.set_len(len - 20)
            .unwrap_or_else(|e| panic!("truncate: {e}"));
        let (_l, sm) =
            open(&p, false).unwrap_or_else(|e| panic!("reopen: {}", crate::error_chain(&e)));
        let d = read_lock(&sm.shared()).clone();
        assert_eq!(d.state.kv.len(), 199);
        assert_eq!(d.last_applied.map(|l| l.index), Some(199));
    }

    /// A table file damaged in the middle, holding only Raft log entries (read lazily,
    /// when a peer needs them): found when the store opens, not later.
    #[test]
    fn a_damaged_table_file_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let p = dir.path().join("raft");
        {
            let (l, _sm) = open(&p, true).unwrap_or_else(|e| panic!("open: {e}"));
            let h = cf(&l.db, CF_LOG).unwrap_or_else(|e| panic!("cf: {e}"));
            for i in 1..=200u64 {
                l.db.put_cf(h, i.to_be_bytes(), format!("{i:0>500}"))
                    .unwrap_or_else(|e| panic!("put: {e}"));
            }
            l.db.flush_cf(h).unwrap_or_else(|e| panic!("flush: {e}"));
        }
        assert!(
            corrupt_middle(&p, ".sst") >= 1,
            "no table file in {}",
            p.display()
        );
        match open(&p, false) {
            Err(e @ StoreError::Corrupt { .. }) => {
                let text = crate::error_chain(&e);
                assert!(text.contains(&p.display().to_string()), "{text}");
            }
            Err(e) => panic!("not reported as corruption: {}", crate::error_chain(&e)),
            Ok(_) => panic!("a damaged table file was opened"),
        }
    }

    #[test]
    fn jobs_and_policy_survive_reopen() {
        use crate::state::jobs::{BalancePolicy, JobCommand, JobKind, JobMove};
        use crate::state::{Command, NodeFacts};
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let p = dir.path().join("raft");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        let cmds: Vec<Command> = vec![
            Command::RegisterNode {
                registration: crate::state::fixtures::registration(1, NodeFacts::default()),
                at_unix_ms: 1,
            },
            Command::RegisterNode {
                registration: crate::state::fixtures::registration(2, NodeFacts::default()),
                at_unix_ms: 1,
            },
            Command::Job(JobCommand::StartJob {
                kind: JobKind::Drain,
                node: 1,
                moves: vec![JobMove::queued("v", 1, 2, 1, 10, 20)],
                planned_finish_unix_ms: 20,
                at_unix_ms: 5,
            }),
            Command::Job(JobCommand::SetPolicy {
                policy: BalancePolicy {
                    mode: scheduler::BalanceMode::PowerSaving,
                    aggressiveness: scheduler::Aggressiveness::High,
                    interval_ms: 5000,
                    min_dwell_ms: 7_000,
                    migration_cost_bp_per_s: 42,
                },
                at_unix_ms: 6,
            }),
        ];
        let before = rt.block_on(async {
            let (_l, mut sm) = open(&p, true).unwrap_or_else(|e| panic!("open: {e}"));
            let entries: Vec<Entry> = cmds
                .into_iter()
                .enumerate()
                .map(|(i, c)| Entry {
                    log_id: openraft::LogId::new(
                        openraft::CommittedLeaderId::new(1, 1),
                        i as u64 + 1,
                    ),
                    payload: EntryPayload::Normal(c),
                })
                .collect();
            let r = sm.apply(entries).await.unwrap_or_default();
            assert!(
                r.iter()
                    .all(|r| !matches!(r, CommandResult::Rejected { .. })),
                "{r:?}"
            );
            read_lock(&sm.shared()).state.clone()
        });
        assert_eq!(before.nodes[&1].state, crate::state::NodeState::Paused);
        let (_l, sm) = open(&p, false).unwrap_or_else(|e| panic!("reopen: {e}"));
        let after = read_lock(&sm.shared()).state.clone();
        assert_eq!(after.jobs, before.jobs);
        assert_eq!(after.jobs.jobs.len(), 1);
        assert_eq!(after.jobs.policy.interval_ms, 5000);
        assert_eq!(after.nodes, before.nodes);
    }

    /// Entry `i` of the lag test: node 1 registers under the name `n{i}`. Applying an
    /// entry twice, or skipping one, changes the state (each rename is an event).
    fn rename_entry(i: u64) -> Entry {
        use crate::state::{Command, NodeFacts, NodeRegistration};
        Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), i),
            payload: EntryPayload::Normal(Command::RegisterNode {
                registration: NodeRegistration {
                    name: format!("n{i}"),
                    ..crate::state::fixtures::registration(1, NodeFacts::default())
                },
                at_unix_ms: i,
            }),
        }
    }

    /// Applies are not synced: after a power loss the state machine can lag its log
    /// (here: entries 0..=10 appended and synced, 8 committed, only 0..=4 applied).
    /// openraft's start (`get_initial_state`, what `Raft::new` runs) re-applies exactly
    /// the committed entries the state machine misses, 5..=8, and leaves 9 and 10 in the
    /// log for the leader to commit.
    #[test]
    fn a_lagging_state_machine_is_brought_forward_from_the_log() {
        use openraft::storage::{RaftLogStorageExt, StorageHelper};
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let p = dir.path().join("raft");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        // A Raft log starts at index 0 (openraft's first entry; blank here).
        let mut entries = vec![Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), 0),
            payload: EntryPayload::Blank,
        }];
        entries.extend((1..=10).map(rename_entry));
        let committed = entries[8].log_id;
        // What applying 1..=8 once gives.
        let expected = rt.block_on(async {
            let d = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
            let (_l, mut sm) =
                open(&d.path().join("raft"), true).unwrap_or_else(|e| panic!("open: {e}"));
            sm.apply(entries[..9].to_vec())
                .await
                .unwrap_or_else(|e| panic!("apply: {e}"));
            let s = read_lock(&sm.shared()).state.clone();
            s
        });
        assert_eq!(expected.last_event_seq, 8, "1 join and 7 renames");
        rt.block_on(async {
            let (mut log, mut sm) = open(&p, true).unwrap_or_else(|e| panic!("open: {e}"));
            log.blocking_append(entries.clone())
                .await
                .unwrap_or_else(|e| panic!("append: {e}"));
            log.save_committed(Some(committed))
                .await
                .unwrap_or_else(|e| panic!("save_committed: {e}"));
            sm.apply(entries[..5].to_vec())
                .await
                .unwrap_or_else(|e| panic!("apply: {e}"));
        });
        rt.block_on(async {
            let (mut log, mut sm) = open(&p, false).unwrap_or_else(|e| panic!("reopen: {e}"));
            let before = read_lock(&sm.shared()).clone();
            assert_eq!(before.last_applied.map(|l| l.index), Some(4));
            assert_eq!(before.state.last_event_seq, 4);
            let st = StorageHelper::new(&mut log, &mut sm)
                .get_initial_state()
                .await
                .unwrap_or_else(|e| panic!("get_initial_state: {e}"));
            assert_eq!(st.committed, Some(committed));
            let after = read_lock(&sm.shared()).clone();
            assert_eq!(after.last_applied, Some(committed));
            assert_eq!(after.state, expected, "re-applied state differs");
            assert_eq!(
                after
                    .state
                    .nodes
                    .get(&1)
                    .map(|n| n.registration.name.as_str()),
                Some("n8")
            );
            // 9 and 10 are still in the log.
            let rest = log
                .try_get_log_entries(9..=10)
                .await
                .unwrap_or_else(|e| panic!("read log: {e}"));
            assert_eq!(rest.len(), 2);
        });
        // The re-applied state is in the store (a later synced write makes it durable).
        let (_l, sm) = open(&p, false).unwrap_or_else(|e| panic!("reopen: {e}"));
        assert_eq!(read_lock(&sm.shared()).last_applied, Some(committed));
    }
}
