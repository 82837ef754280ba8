//! The state engine: the records of every group on this node, plus per-group metadata
//! (`last_applied` and membership, as opaque bytes from the Raft layer) and the current
//! snapshot of each group.
//!
//! Apply reads each command's record, runs the acceptor of `idem-core`, and writes the
//! changed records together with the group's applied state in one write batch, so a
//! crash never leaves records and `last_applied` disagreeing.

use crate::keys::{meta_key, record_key, shard_end, shard_prefix};
use crate::snapshot::{self, SnapshotFile};
use crate::{Shard, StorageError};
use idem_core::codec::{decode_record, encode_record, peek_expires_ms};
use idem_core::command::{self, Command, CommandResult};
use idem_core::{Key, Record};
use rocksdb::compaction_filter::Decision as FilterDecision;
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, DB};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

const CF_RECORDS: &str = "records";
const CF_OUTBOX: &str = "outbox";
const CF_DLQ: &str = "dlq";
const CF_META: &str = "meta";

const APPLIED: &str = "applied";
const SNAPSHOT: &str = "snapshot";
const FORMAT: &[u8] = b"format";
const FORMAT_VERSION: u8 = 1;

/// Wall-clock milliseconds, used only by the compaction filter: dropping an expired
/// record is invisible to readers (they treat it as absent already), so it need not be
/// deterministic across replicas.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn expired_filter(_level: u32, _key: &[u8], value: &[u8]) -> FilterDecision {
    match peek_expires_ms(value) {
        Some(expires) if expires <= wall_ms() => FilterDecision::Remove,
        _ => FilterDecision::Keep,
    }
}

/// One log entry handed to `apply`: a command, or an entry with no command (blank or
/// membership) that only advances `last_applied`.
pub enum ApplyItem<'a> {
    Command(&'a Command),
    Other,
}

#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    pub estimated_records: u64,
    pub disk_bytes: u64,
    pub pending_compaction_bytes: u64,
    pub write_stalled: bool,
}

#[derive(Clone)]
pub struct StateEngine {
    db: Arc<DB>,
    dir: PathBuf,
}

impl StateEngine {
    pub fn open(path: &Path) -> Result<StateEngine, StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let mut rec = Options::default();
        rec.set_compaction_filter("idem-expired", expired_filter);
        rec.set_compression_type(rocksdb::DBCompressionType::Lz4);
        rec.set_bottommost_compression_type(rocksdb::DBCompressionType::Zstd);
        // Visit every file at least daily so cold expired records are dropped too.
        rec.set_periodic_compaction_seconds(24 * 60 * 60);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_RECORDS, rec),
            ColumnFamilyDescriptor::new(CF_OUTBOX, Options::default()),
            ColumnFamilyDescriptor::new(CF_DLQ, Options::default()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let engine = StateEngine {
            db: Arc::new(db),
            dir: path.to_path_buf(),
        };
        engine.check_format()?;
        std::fs::create_dir_all(engine.snapshot_dir())?;
        Ok(engine)
    }

    fn check_format(&self) -> Result<(), StorageError> {
        let cf = self.cf(CF_META);
        match self.db.get_cf(cf, FORMAT)? {
            None => self.db.put_cf(cf, FORMAT, [FORMAT_VERSION])?,
            Some(v) if v.as_slice() == [FORMAT_VERSION] => {}
            Some(v) => {
                return Err(StorageError::Corrupt {
                    what: "state engine format",
                    detail: format!("version {v:?}, this build reads {FORMAT_VERSION}"),
                })
            }
        }
        Ok(())
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    /// The record of `key`, as stored (expired records included: callers decide).
    pub fn get_record(&self, shard: Shard, key: &Key) -> Result<Option<Record>, StorageError> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_RECORDS), record_key(shard, key))?
        {
            None => Ok(None),
            Some(bytes) => decode_record(&bytes)
                .map(Some)
                .map_err(|e| StorageError::Corrupt {
                    what: "record",
                    detail: e.to_string(),
                }),
        }
    }

    /// Apply a batch of entries: one result per command, and one atomic write of every
    /// changed record plus `applied` (the group's versioned applied-state bytes).
    pub fn apply(
        &self,
        shard: Shard,
        items: &[ApplyItem<'_>],
        applied: &[u8],
    ) -> Result<Vec<Option<CommandResult>>, StorageError> {
        let mut results = Vec::with_capacity(items.len());
        // Records written earlier in this batch, so later commands on the same key see
        // them. Bounded by the batch size.
        let mut pending: BTreeMap<Vec<u8>, Record> = BTreeMap::new();
        for item in items {
            let ApplyItem::Command(cmd) = item else {
                results.push(None);
                continue;
            };
            let rk = record_key(shard, &cmd.key);
            let stored = match pending.get(&rk) {
                Some(r) => Some(r.clone()),
                None => self.get_record(shard, &cmd.key)?,
            };
            let (result, write) = command::apply(stored.as_ref(), cmd);
            if let Some(w) = write {
                pending.insert(rk, w);
            }
            results.push(Some(result));
        }
        let mut batch = WriteBatch::default();
        let cf = self.cf(CF_RECORDS);
        for (k, r) in &pending {
            batch.put_cf(cf, k, encode_record(r));
        }
        batch.put_cf(self.cf(CF_META), meta_key(shard, APPLIED), applied);
        // Not synced: the Raft log is durable, and a lost tail is re-applied from it.
        self.db.write(batch)?;
        Ok(results)
    }

    pub fn applied_state(&self, shard: Shard) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get_cf(self.cf(CF_META), meta_key(shard, APPLIED))?)
    }

    /// Write the group's records to a snapshot file (streamed: memory stays bounded
    /// whatever the record count). The records and the applied state are read from one
    /// RocksDB snapshot, so they match exactly; `make_meta` turns that applied state
    /// into the snapshot's versioned metadata.
    pub fn build_snapshot<F>(
        &self,
        shard: Shard,
        make_meta: F,
    ) -> Result<(SnapshotFile, Vec<u8>), StorageError>
    where
        F: FnOnce(Option<&[u8]>) -> Result<Vec<u8>, StorageError>,
    {
        // Make applied state durable before the log behind it may be purged.
        self.db.flush_wal(true)?;
        let view = self.db.snapshot();
        let applied = view.get_cf(self.cf(CF_META), meta_key(shard, APPLIED))?;
        let meta = make_meta(applied.as_deref())?;
        let file = snapshot::write(&self.snapshot_dir(), shard, &meta, |sink| {
            let mut ro = rocksdb::ReadOptions::default();
            ro.set_snapshot(&view);
            ro.set_iterate_upper_bound(shard_end(shard));
            let it = self.db.iterator_cf_opt(
                self.cf(CF_RECORDS),
                ro,
                rocksdb::IteratorMode::From(&shard_prefix(shard), rocksdb::Direction::Forward),
            );
            for item in it {
                let (k, v) = item?;
                sink(&k[4..], &v)?;
            }
            Ok(())
        })?;
        self.set_current_snapshot(shard, &file)?;
        Ok((file, meta))
    }

    fn set_current_snapshot(&self, shard: Shard, file: &SnapshotFile) -> Result<(), StorageError> {
        let previous = self.current_snapshot(shard)?;
        self.db.put_cf(
            self.cf(CF_META),
            meta_key(shard, SNAPSHOT),
            file.path.to_string_lossy().as_bytes(),
        )?;
        self.db.flush_wal(true)?;
        if let Some(old) = previous.filter(|p| p.path != file.path) {
            let _ = std::fs::remove_file(old.path);
        }
        Ok(())
    }

    /// The group's latest snapshot (built here or installed from the leader).
    pub fn current_snapshot(&self, shard: Shard) -> Result<Option<SnapshotFile>, StorageError> {
        let Some(p) = self
            .db
            .get_cf(self.cf(CF_META), meta_key(shard, SNAPSHOT))?
        else {
            return Ok(None);
        };
        let path = PathBuf::from(String::from_utf8_lossy(&p).into_owned());
        if !path.exists() {
            return Ok(None);
        }
        Ok(Some(SnapshotFile { path }))
    }

    /// Replace the group's records by a snapshot's, then set `applied`.
    ///
    /// Crash safety: the snapshot becomes "current" and `applied` is cleared first, so a
    /// crash part-way leaves a group that the Raft layer sees as behind its snapshot and
    /// installs again at start-up.
    pub fn install_snapshot(
        &self,
        shard: Shard,
        file: &SnapshotFile,
        applied: &[u8],
    ) -> Result<(), StorageError> {
        let stable = file.move_into(&self.snapshot_dir(), shard)?;
        self.set_current_snapshot(shard, &stable)?;
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_META), meta_key(shard, APPLIED));
        batch.delete_range_cf(
            self.cf(CF_RECORDS),
            shard_prefix(shard).to_vec(),
            shard_end(shard),
        );
        self.db.write(batch)?;
        let cf = self.cf(CF_RECORDS);
        let mut batch = WriteBatch::default();
        stable.read_records(|k, v| {
            decode_record(v).map_err(|e| StorageError::Corrupt {
                what: "snapshot record",
                detail: e.to_string(),
            })?;
            let mut key = shard_prefix(shard).to_vec();
            key.extend_from_slice(k);
            batch.put_cf(cf, key, v);
            if batch.size_in_bytes() > 4 << 20 {
                self.db.write(std::mem::take(&mut batch))?;
            }
            Ok(())
        })?;
        batch.put_cf(self.cf(CF_META), meta_key(shard, APPLIED), applied);
        self.db.write(batch)?;
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// Compact the records now: expired records are physically removed.
    pub fn compact(&self) {
        self.db
            .compact_range_cf(self.cf(CF_RECORDS), None::<&[u8]>, None::<&[u8]>);
    }

    /// Records of `shard` as raw keys and bytes (for tests and digests).
    pub fn raw_record_count(&self, shard: Shard) -> Result<u64, StorageError> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(shard_end(shard));
        let it = self.db.iterator_cf_opt(
            self.cf(CF_RECORDS),
            ro,
            rocksdb::IteratorMode::From(&shard_prefix(shard), rocksdb::Direction::Forward),
        );
        let mut n = 0;
        for item in it {
            item?;
            n += 1;
        }
        Ok(n)
    }

    pub fn stats(&self) -> EngineStats {
        let prop = |name: &str| {
            self.db
                .property_int_value_cf(self.cf(CF_RECORDS), name)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        EngineStats {
            estimated_records: prop("rocksdb.estimate-num-keys"),
            disk_bytes: prop("rocksdb.total-sst-files-size") + prop("rocksdb.size-all-mem-tables"),
            pending_compaction_bytes: prop("rocksdb.estimate-pending-compaction-bytes"),
            write_stalled: prop("rocksdb.actual-delayed-write-rate") > 0
                || prop("rocksdb.is-write-stopped") > 0,
        }
    }
}

#[cfg(test)]
mod tests;
