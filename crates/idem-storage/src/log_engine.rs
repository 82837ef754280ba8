//! The log engine: one RocksDB instance per node holding every group's Raft log
//! (`raft_log`, key `shard | index`) and Raft state (`raft_state`, key `shard | name`).

use crate::keys::{log_index, log_key, meta_key};
use crate::{DiskHealth, Shard, StorageError};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions, WriteBatch,
    WriteOptions, DB,
};
use std::path::Path;
use std::sync::Arc;

const CF_LOG: &str = "raft_log";
const CF_STATE: &str = "raft_state";

/// Names of the per-group values in `raft_state`.
pub const VOTE: &str = "vote";
pub const COMMITTED: &str = "committed";
pub const PURGED: &str = "purged";

/// Most appends waiting for a WAL sync at once; a full queue makes appenders wait.
pub const MAX_PENDING_SYNCS: usize = 4096;
/// Most appends one WAL sync acknowledges.
pub const MAX_SYNC_BATCH: usize = 1024;

/// Called once the appended entries are durable (or the sync failed).
pub type OnDurable = Box<dyn FnOnce(Result<(), String>) + Send>;

#[derive(Clone)]
pub struct LogEngine {
    db: Arc<DB>,
    syncer: Arc<Syncer>,
    disk: DiskHealth,
}

/// The group-commit thread and its queue. Dropping the last handle closes the queue and
/// joins the thread, so the database is closed when the engine is.
struct Syncer {
    tx: Option<std::sync::mpsc::SyncSender<OnDurable>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Syncer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Group commit: one thread syncs the WAL for every append that arrived since its last
/// sync, across all groups of the node, then acknowledges them all. Under load many
/// appends share one fsync; idle, an append waits for exactly one. A sync that fails is
/// never tried again: every append waiting and every later one is refused.
fn run_syncer(db: Arc<DB>, disk: DiskHealth, rx: std::sync::mpsc::Receiver<OnDurable>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        while waiting.len() < MAX_SYNC_BATCH {
            match rx.try_recv() {
                Ok(cb) => waiting.push(cb),
                Err(_) => break,
            }
        }
        let result = disk
            .guard("raft log sync", || sync_wal(&db))
            .map_err(|e| e.to_string());
        for cb in waiting {
            cb(result.clone());
        }
    }
}

/// Make the WAL durable.
#[cfg(not(feature = "broken-unsynced-append"))]
fn sync_wal(db: &DB) -> Result<(), rocksdb::Error> {
    db.flush_wal(true)
}

/// Deliberately broken (`broken-unsynced-append`): appends are acknowledged to Raft
/// without their fsync, so a power loss of a group's majority loses committed entries.
/// The fault suite must catch it; no release build enables it.
#[cfg(feature = "broken-unsynced-append")]
fn sync_wal(db: &DB) -> Result<(), rocksdb::Error> {
    db.flush_wal(false)
}

impl LogEngine {
    pub fn open(path: &Path) -> Result<LogEngine, StorageError> {
        Self::open_on(path, DiskHealth::default())
    }

    /// Open on a disk whose health the node's other engine shares.
    pub fn open_on(path: &Path, disk: DiskHealth) -> Result<LogEngine, StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Log entries are written once, read while replicating, then range-deleted.
        opts.set_max_total_wal_size(256 << 20);
        let mut log_opts = Options::default();
        log_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_LOG, log_opts),
            ColumnFamilyDescriptor::new(CF_STATE, Options::default()),
        ];
        // Appends are written unsynced and made durable by the group-commit thread.
        let db = Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?);
        let (tx, rx) = std::sync::mpsc::sync_channel(MAX_PENDING_SYNCS);
        let (sync_db, sync_disk) = (db.clone(), disk.clone());
        let thread = std::thread::Builder::new()
            .name("idem-wal-sync".into())
            .spawn(move || run_syncer(sync_db, sync_disk, rx))?;
        Ok(LogEngine {
            db,
            syncer: Arc::new(Syncer {
                tx: Some(tx),
                thread: Some(thread),
            }),
            disk,
        })
    }

    /// The disk this engine writes to (failed once a write or sync failed).
    pub fn disk(&self) -> &DiskHealth {
        &self.disk
    }

    fn write(&self, what: &str, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.disk.guard(what, || self.db.write_opt(batch, &wo))
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // The column families are created at open; a missing one is a programming error.
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// Append a batch of encoded entries; durable (one WAL sync) when this returns.
    pub fn append(&self, shard: Shard, entries: &[(u64, Vec<u8>)]) -> Result<(), StorageError> {
        let cf = self.cf(CF_LOG);
        let mut batch = WriteBatch::default();
        for (index, bytes) in entries {
            batch.put_cf(cf, log_key(shard, *index), bytes);
        }
        self.write("raft log append", batch, true)
    }

    /// Append a batch of encoded entries: readable when this returns, durable when
    /// `on_durable` is called (after the WAL sync that covers it).
    pub fn append_group_commit(
        &self,
        shard: Shard,
        entries: &[(u64, Vec<u8>)],
        on_durable: OnDurable,
    ) -> Result<(), StorageError> {
        let cf = self.cf(CF_LOG);
        let mut batch = WriteBatch::default();
        for (index, bytes) in entries {
            batch.put_cf(cf, log_key(shard, *index), bytes);
        }
        self.write("raft log append", batch, false)?;
        match &self.syncer.tx {
            Some(tx) => {
                if let Err(e) = tx.send(on_durable) {
                    // The sync thread is gone: acknowledge with an error rather than never.
                    (e.0)(Err("wal sync thread stopped".into()));
                }
            }
            None => on_durable(Err("wal sync thread stopped".into())),
        }
        Ok(())
    }

    /// Entries with `start <= index < end`, in order, stopping at the first gap.
    pub fn entries(
        &self,
        shard: Shard,
        start: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(log_key(shard, end).to_vec());
        let from = log_key(shard, start);
        let it = self.db.iterator_cf_opt(
            self.cf(CF_LOG),
            ro,
            IteratorMode::From(&from, Direction::Forward),
        );
        // The range's start may be purged (a missing prefix); after the first entry
        // found, entries must be contiguous and the first gap ends the read.
        let mut expect: Option<u64> = None;
        for item in it {
            let (k, v) = item?;
            let idx = log_index(&k).ok_or(StorageError::Corrupt {
                what: "log key",
                detail: format!("{k:?}"),
            })?;
            if expect.is_some_and(|e| e != idx) || out.len() >= max {
                break;
            }
            out.push((idx, v.into_vec()));
            expect = Some(idx + 1);
        }
        Ok(out)
    }

    /// The last entry of the group's log, if any.
    pub fn last_entry(&self, shard: Shard) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(log_key(shard, 0).to_vec());
        let end = log_key(shard, u64::MAX);
        let mut it = self.db.iterator_cf_opt(
            self.cf(CF_LOG),
            ro,
            IteratorMode::From(&end, Direction::Reverse),
        );
        match it.next() {
            None => Ok(None),
            Some(item) => {
                let (k, v) = item?;
                if k.len() != 12 || k[..4] != shard.to_be_bytes() {
                    return Ok(None);
                }
                Ok(log_index(&k).map(|i| (i, v.into_vec())))
            }
        }
    }

    /// Delete every entry with `index >= from`.
    pub fn truncate_from(&self, shard: Shard, from: u64) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_LOG),
            log_key(shard, from),
            log_key(shard, u64::MAX),
        );
        batch.delete_cf(self.cf(CF_LOG), log_key(shard, u64::MAX));
        self.write("raft log truncate", batch, true)
    }

    /// Record the purge point, then delete every entry with `index <= upto`.
    pub fn purge_upto(
        &self,
        shard: Shard,
        upto: u64,
        purged_meta: &[u8],
    ) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_STATE), meta_key(shard, PURGED), purged_meta);
        batch.delete_range_cf(
            self.cf(CF_LOG),
            log_key(shard, 0),
            log_key(shard, upto.saturating_add(1)),
        );
        self.write("raft log purge", batch, true)
    }

    pub fn put_state(
        &self,
        shard: Shard,
        name: &str,
        value: &[u8],
        sync: bool,
    ) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_STATE), meta_key(shard, name), value);
        self.write("raft state write", batch, sync)
    }

    pub fn get_state(&self, shard: Shard, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get_cf(self.cf(CF_STATE), meta_key(shard, name))?)
    }

    /// Every value of `shard` in `raft_state` whose name starts with `prefix`, as (the
    /// rest of the name, value), in name order.
    pub fn states_with_prefix(
        &self,
        shard: Shard,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let from = meta_key(shard, prefix);
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(CF_STATE),
            IteratorMode::From(&from, Direction::Forward),
        );
        for item in it {
            let (k, v) = item?;
            if !k.starts_with(&from) {
                break;
            }
            let rest = String::from_utf8_lossy(&k[from.len()..]).into_owned();
            out.push((rest, v.into_vec()));
        }
        Ok(out)
    }

    /// Bytes the log engine occupies on disk (SST files plus live WAL estimate).
    pub fn disk_bytes(&self) -> u64 {
        let sst = |cf| {
            self.db
                .property_int_value_cf(self.cf(cf), "rocksdb.total-sst-files-size")
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        sst(CF_LOG) + sst(CF_STATE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_read_truncate_purge_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = LogEngine::open(dir.path()).unwrap();
            let entries: Vec<_> = (1..=10).map(|i| (i, vec![i as u8])).collect();
            log.append(7, &entries).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            log.append_group_commit(8, &[(1, vec![99])], Box::new(move |r| tx.send(r).unwrap()))
                .unwrap();
            rx.recv().unwrap().unwrap();
            assert_eq!(log.entries(7, 3, 6, 100).unwrap().len(), 3);
            assert_eq!(log.last_entry(7).unwrap().unwrap().0, 10);
            log.truncate_from(7, 8).unwrap();
            assert_eq!(log.last_entry(7).unwrap().unwrap().0, 7);
            log.purge_upto(7, 3, b"p3").unwrap();
            log.put_state(7, VOTE, b"v", true).unwrap();
        }
        let log = LogEngine::open(dir.path()).unwrap();
        let got = log.entries(7, 0, 100, 100).unwrap();
        assert_eq!(
            got.first().map(|e| e.0),
            Some(4),
            "a purged prefix is skipped"
        );
        let got = log.entries(7, 4, 100, 100).unwrap();
        assert_eq!(
            got.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![4, 5, 6, 7]
        );
        assert_eq!(log.get_state(7, VOTE).unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(
            log.get_state(7, PURGED).unwrap().as_deref(),
            Some(&b"p3"[..])
        );
        // Another group's log is untouched.
        assert_eq!(log.last_entry(8).unwrap().unwrap(), (1, vec![99]));
        assert_eq!(log.last_entry(9).unwrap(), None);
    }
}
