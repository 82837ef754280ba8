//! The state engine: the records of every group on this node, plus per-group metadata
//! (`last_applied` and membership, as opaque bytes from the Raft layer) and the current
//! snapshot of each group.
//!
//! Apply reads each command's record, runs the acceptor of `idem-core`, and writes the
//! changed records together with the group's applied state in one write batch, so a
//! crash never leaves records and `last_applied` disagreeing.

use crate::keys::{
    decode_record_key, meta_key, outbox_dest_seq, outbox_key, record_key, shard_end, shard_prefix,
};
use crate::snapshot::{self, SnapshotFile};
use crate::{DiskHealth, Shard, StorageError};
use idem_core::codec::{
    decode_record, encode_record, encode_shipped, peek_expires_ms, replicated_parts, Shipped,
    BOOKKEEPING_BYTES,
};
use idem_core::command::{self, Command, CommandResult, Op};
use idem_core::merge::replicated_change;
use idem_core::{Key, Record};
use rocksdb::compaction_filter::Decision as FilterDecision;
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, DB};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

const CF_RECORDS: &str = "records";
const CF_OUTBOX: &str = "outbox";
const CF_DLQ: &str = "dlq";
const CF_META: &str = "meta";

const APPLIED: &str = "applied";
/// The group's applied stamp: the latest command time applied (u64 BE).
const STAMP: &str = "stamp";
/// The group's REGIONAL double grants counted so far (u64 BE): merges that overturned a
/// grant of this region by another claim's grant held at the same time.
const DOUBLE_GRANTS: &str = "double_grants";
const SNAPSHOT: &str = "snapshot";
const FORMAT: &[u8] = b"format";
const FORMAT_VERSION: u8 = 1;

/// Per shard, the time up to which the compaction filter may drop expired records: a
/// durable applied stamp. Apply judges every command at no earlier time than the
/// shard's applied stamp (`max(stamp, command time)`), so a record expired at a stamp
/// that is durable can never be read as live by an entry this replica has yet to apply,
/// or re-applies after a crash; no replica's decision depends on its own clock or on
/// when it compacted. Nothing on this path reads a clock.
#[derive(Clone, Default)]
struct Horizon(Arc<RwLock<HorizonState>>);

#[derive(Default)]
struct HorizonState {
    published: std::collections::HashMap<Shard, u64>,
    /// Snapshots being written, per shard: (their stamps, how many at each).
    pins: std::collections::HashMap<Shard, BTreeMap<u64, usize>>,
}

/// Holds a shard's horizon at a stamp until dropped.
struct Pin {
    horizon: Horizon,
    shard: Shard,
    stamp: u64,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut s = self.horizon.0.write().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = s.pins.get_mut(&self.shard) {
            if let Some(n) = p.get_mut(&self.stamp) {
                *n -= 1;
                if *n == 0 {
                    p.remove(&self.stamp);
                }
            }
            if p.is_empty() {
                s.pins.remove(&self.shard);
            }
        }
    }
}

impl Horizon {
    /// The time up to which `shard`'s expired records may be dropped now: the published
    /// durable stamp, held back to the oldest snapshot being written.
    fn get(&self, shard: Shard) -> u64 {
        let s = self.0.read().unwrap_or_else(|p| p.into_inner());
        let published = s.published.get(&shard).copied().unwrap_or(0);
        match s.pins.get(&shard).and_then(|p| p.keys().next()) {
            Some(pinned) => published.min(*pinned),
            None => published,
        }
    }

    fn publish(&self, shard: Shard, stamp: u64) {
        let mut s = self.0.write().unwrap_or_else(|p| p.into_inner());
        let e = s.published.entry(shard).or_default();
        *e = (*e).max(stamp);
    }

    fn pin(&self, shard: Shard, stamp: u64) -> Pin {
        let mut s = self.0.write().unwrap_or_else(|p| p.into_inner());
        *s.pins.entry(shard).or_default().entry(stamp).or_default() += 1;
        Pin {
            horizon: self.clone(),
            shard,
            stamp,
        }
    }

    fn filter(&self) -> impl Fn(u32, &[u8], &[u8]) -> FilterDecision + Send + 'static {
        let h = self.clone();
        move |_level, key, value| {
            let Some(shard) = key
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
            else {
                return FilterDecision::Keep;
            };
            match peek_expires_ms(value) {
                Some(expires) if expires <= h.get(shard) => FilterDecision::Remove,
                _ => FilterDecision::Keep,
            }
        }
    }
}

/// One log entry handed to `apply`: a command with its log index, or an entry with no
/// command (blank or membership) that only advances `last_applied`.
pub enum ApplyItem<'a> {
    Command(&'a Command, u64),
    Other,
}

/// Where this node's groups replicate to, and how much they may queue for each.
#[derive(Clone, Debug, Default)]
pub struct OutboxConfig {
    /// The other regions.
    pub destinations: Vec<u16>,
    /// Most entries queued per group and destination; beyond it new changes are not
    /// queued (and counted): anti-entropy repairs what was skipped.
    pub max_entries: u64,
}

/// A page of one anti-entropy bucket: its records, and the record key to continue
/// after (`None`: the bucket is done).
pub type BucketPage = (Vec<(Key, Record)>, Option<Vec<u8>>);

/// One queued change: its sequence number (the log index that made it), when it was
/// queued, and what to ship for it.
#[derive(Clone, Debug)]
pub struct OutboxEntry {
    pub seq: u64,
    pub enqueued_ms: u64,
    pub ship: Ship,
}

/// What an outbox entry ships.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ship {
    /// An encoded [`Shipped`] (versioned): the key's record as it is now.
    Record(Vec<u8>),
    /// Nothing: the record is gone or expired, or an earlier entry of the same read
    /// ships the same record.
    Nothing,
    /// The entry or its record cannot be read: refused here, as a destination refuses
    /// bytes it cannot read (and dead-lettered the same way).
    Unreadable(String),
}

impl Ship {
    pub fn bytes(&self) -> usize {
        match self {
            Ship::Record(b) => b.len(),
            Ship::Nothing | Ship::Unreadable(_) => 0,
        }
    }
}

/// The first byte after the queue time of an outbox value that names the changed key
/// instead of carrying a copy of its record (the relay reads the record when it
/// ships). Values of the earlier format carry an encoded `Shipped`, whose first byte
/// is its version (1), and are still read.
const OUTBOX_REF: u8 = 0x80;

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
    outbox: Arc<RwLock<OutboxConfig>>,
    horizon: Horizon,
    disk: DiskHealth,
    /// Dropped with the last clone of the engine: its horizon thread then ends at once
    /// (`None` in the engine that thread itself builds).
    _horizon_stop: Option<Arc<std::sync::mpsc::Sender<()>>>,
}

/// How often the durable applied stamps are published to the compaction filter.
const HORIZON_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

const OUTBOX_LEN: &str = "outbox_len/";
const OUTBOX_SKIPPED: &str = "outbox_skipped/";

fn dest_meta(shard: Shard, name: &str, dest: u16) -> Vec<u8> {
    let mut k = meta_key(shard, name);
    k.extend_from_slice(&dest.to_be_bytes());
    k
}

fn u64_of(v: Option<Vec<u8>>) -> u64 {
    v.and_then(|b| b.as_slice().try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

impl StateEngine {
    pub fn open(path: &Path) -> Result<StateEngine, StorageError> {
        Self::open_on(path, DiskHealth::default())
    }

    /// Open on a disk whose health the node's other engine shares.
    pub fn open_on(path: &Path, disk: DiskHealth) -> Result<StateEngine, StorageError> {
        Self::open_with_horizon_thread(path, disk).map(|(engine, _thread)| engine)
    }

    /// The disk this engine writes to (failed once a write or sync failed).
    pub fn disk(&self) -> &DiskHealth {
        &self.disk
    }

    fn write(&self, what: &str, batch: WriteBatch) -> Result<(), StorageError> {
        self.disk.guard(what, || self.db.write(batch))
    }

    /// Sync the WAL: everything written before is durable once this returns.
    fn sync(&self, what: &str) -> Result<(), StorageError> {
        self.disk.guard(what, || self.db.flush_wal(true))
    }

    /// `open`, and the thread that publishes the compaction horizon (it ends when the
    /// last clone of the engine is dropped).
    fn open_with_horizon_thread(
        path: &Path,
        disk: DiskHealth,
    ) -> Result<(StateEngine, std::thread::JoinHandle<()>), StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Every apply batch writes `meta` too; without a bound the WAL is kept until
        // that small column family flushes (measured: 1.5 GB of WAL for 10 M keys).
        opts.set_max_total_wal_size(128 << 20);
        let mut rec = Options::default();
        let horizon = Horizon::default();
        rec.set_compaction_filter("idem-expired", horizon.filter());
        rec.set_compression_type(rocksdb::DBCompressionType::Lz4);
        rec.set_bottommost_compression_type(rocksdb::DBCompressionType::Zstd);
        // Visit every file at least daily so cold expired records are dropped too.
        rec.set_periodic_compaction_seconds(24 * 60 * 60);
        // Most Reserves look up a key that is not stored anywhere: bloom filters (in the
        // memtable and in every table file, 10 bits per key, about 1% false positives)
        // answer those lookups without searching the memtable or reading index blocks.
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        table.set_whole_key_filtering(true);
        rec.set_block_based_table_factory(&table);
        rec.set_memtable_prefix_bloom_ratio(0.05);
        rec.set_memtable_whole_key_filtering(true);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_RECORDS, rec),
            ColumnFamilyDescriptor::new(CF_OUTBOX, Options::default()),
            ColumnFamilyDescriptor::new(CF_DLQ, Options::default()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let engine = StateEngine {
            db: Arc::new(db),
            dir: path.to_path_buf(),
            outbox: Arc::default(),
            horizon,
            disk,
            _horizon_stop: Some(Arc::new(stop)),
        };
        engine.check_format()?;
        std::fs::create_dir_all(engine.snapshot_dir())?;
        // What was recovered at open is on disk: its stamps may be published as they are.
        for (shard, stamp) in engine.stamps()? {
            engine.horizon.publish(shard, stamp);
        }
        // Later stamps are published once the WAL holding them is synced.
        let weak = Arc::downgrade(&engine.db);
        let (horizon, outbox) = (engine.horizon.clone(), engine.outbox.clone());
        let disk = engine.disk.clone();
        let dir = engine.dir.clone();
        let thread = std::thread::Builder::new()
            .name("idem-horizon".into())
            .spawn(move || loop {
                // Nothing is ever sent: the wait ends early only when the engine is gone.
                if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
                    stopped.recv_timeout(HORIZON_EVERY)
                {
                    return;
                }
                let Some(db) = weak.upgrade() else {
                    return;
                };
                let e = StateEngine {
                    db,
                    dir: dir.clone(),
                    outbox: outbox.clone(),
                    horizon: horizon.clone(),
                    disk: disk.clone(),
                    _horizon_stop: None,
                };
                if let Err(err) = e.publish_horizon() {
                    tracing::warn!(error = %err, "could not publish the compaction horizon");
                }
            })?;
        Ok((engine, thread))
    }

    /// Every shard's applied stamp as stored.
    fn stamps(&self) -> Result<Vec<(Shard, u64)>, StorageError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_META), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item?;
            if k.len() == 4 + STAMP.len() && k.ends_with(STAMP.as_bytes()) {
                let shard = u32::from_be_bytes([k[0], k[1], k[2], k[3]]);
                out.push((shard, u64_of(Some(v.to_vec()))));
            }
        }
        Ok(out)
    }

    /// Make the applied stamps read now durable, then let compaction drop what they
    /// expire (read first, synced second: a stamp is published only once on disk).
    pub fn publish_horizon(&self) -> Result<(), StorageError> {
        let stamps = self.stamps()?;
        self.sync("state sync")?;
        for (shard, stamp) in stamps {
            self.horizon.publish(shard, stamp);
        }
        Ok(())
    }

    /// The applied stamp of `shard` (0: nothing applied yet).
    pub fn applied_stamp(&self, shard: Shard) -> Result<u64, StorageError> {
        self.meta_u64(&meta_key(shard, STAMP))
    }

    fn check_format(&self) -> Result<(), StorageError> {
        let cf = self.cf(CF_META);
        match self.db.get_cf(cf, FORMAT)? {
            None => {
                let mut batch = WriteBatch::default();
                batch.put_cf(cf, FORMAT, [FORMAT_VERSION]);
                self.write("state format", batch)?;
                self.sync("state sync")?;
            }
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

    /// Set the regions this node's groups replicate to. Every node of a region must be
    /// given the same destinations (apply must be deterministic).
    pub fn set_outbox(&self, cfg: OutboxConfig) {
        *self.outbox.write().unwrap_or_else(|p| p.into_inner()) = cfg;
    }

    fn meta_u64(&self, key: &[u8]) -> Result<u64, StorageError> {
        Ok(u64_of(self.db.get_cf(self.cf(CF_META), key)?))
    }

    /// Apply a batch of entries: one result per command, and one atomic write of every
    /// changed record, the outbox entries for the other regions and `applied` (the
    /// group's versioned applied-state bytes).
    pub fn apply(
        &self,
        shard: Shard,
        items: &[ApplyItem<'_>],
        applied: &[u8],
    ) -> Result<Vec<Option<CommandResult>>, StorageError> {
        let outbox = self
            .outbox
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut results = Vec::with_capacity(items.len());
        let mut batch = WriteBatch::default();
        // Records written earlier in this batch, so later commands on the same key see
        // them. Bounded by the batch size.
        let mut pending: BTreeMap<Vec<u8>, Record> = BTreeMap::new();
        // Per destination: (queued entries, entries skipped because the queue was full).
        let mut lens: BTreeMap<u16, (u64, u64)> = BTreeMap::new();
        for d in &outbox.destinations {
            let len = self.meta_u64(&dest_meta(shard, OUTBOX_LEN, *d))?;
            let skipped = self.meta_u64(&dest_meta(shard, OUTBOX_SKIPPED, *d))?;
            lens.insert(*d, (len, skipped));
        }
        // Commands are judged at no earlier time than any command before them in the
        // log, whichever leader stamped them: time never goes backwards in log order,
        // and the compaction horizon (a durable stamp) stays behind every future entry.
        let mut stamp = self.meta_u64(&meta_key(shard, STAMP))?;
        let counted = self.meta_u64(&meta_key(shard, DOUBLE_GRANTS))?;
        let mut double_grants = counted;
        let mut clamped;
        for item in items {
            let ApplyItem::Command(cmd, index) = item else {
                results.push(None);
                continue;
            };
            let cmd: &Command = if cmd.now_ms < stamp {
                clamped = Command {
                    now_ms: stamp,
                    ..(*cmd).clone()
                };
                &clamped
            } else {
                stamp = cmd.now_ms;
                cmd
            };
            if let Op::Touch { items } = &cmd.op {
                for t in items {
                    let rk = record_key(shard, &t.key);
                    let stored = match pending.get(&rk) {
                        Some(r) => Some(r.clone()),
                        None => self.get_record(shard, &t.key)?,
                    };
                    if let Some(w) = idem_core::acceptor::touch(
                        stored.as_ref(),
                        t.fingerprint,
                        t.at_ms.max(stamp),
                        t.first_attempt_ms,
                        t.count,
                    ) {
                        pending.insert(rk, w);
                    }
                }
                results.push(Some(CommandResult::Done));
                continue;
            }
            if let Op::OutboxAck { dest, upto, dead } = &cmd.op {
                let removed = self.ack_outbox(&mut batch, shard, *dest, *upto, dead)?;
                if let Some(l) = lens.get_mut(dest) {
                    l.0 = l.0.saturating_sub(removed);
                }
                results.push(Some(CommandResult::Done));
                continue;
            }
            let rk = record_key(shard, &cmd.key);
            let stored = match pending.get(&rk) {
                Some(r) => Some(r.clone()),
                None => self.get_record(shard, &cmd.key)?,
            };
            let (result, write) = command::apply(stored.as_ref(), cmd);
            if let CommandResult::Merge {
                double_grant: true, ..
            } = &result
            {
                double_grants = double_grants.saturating_add(1);
            }
            if let Some(w) = write {
                // Changes that came from another region are not sent on: every region
                // ships its own changes to every other, and anti-entropy covers the rest.
                let ship =
                    !matches!(cmd.op, Op::Merge { .. }) && replicated_change(stored.as_ref(), &w);
                if ship && !outbox.destinations.is_empty() {
                    // The entry names the key; the relay ships the record as it is when
                    // it ships (records only move up in the merge order, so the latest
                    // copy carries this change). A copy per destination would write a
                    // 1 MiB response three times on every replica.
                    let mut v = Vec::with_capacity(rk.len() + 5);
                    v.extend_from_slice(&cmd.now_ms.to_be_bytes());
                    v.push(OUTBOX_REF);
                    v.extend_from_slice(&rk[4..]);
                    for (dest, (len, skipped)) in lens.iter_mut() {
                        if outbox.max_entries > 0 && *len >= outbox.max_entries {
                            *skipped += 1;
                            continue;
                        }
                        batch.put_cf(self.cf(CF_OUTBOX), outbox_key(shard, *dest, *index), &v);
                        *len += 1;
                    }
                }
                pending.insert(rk, w);
            }
            results.push(Some(result));
        }
        let cf = self.cf(CF_RECORDS);
        for (k, r) in &pending {
            batch.put_cf(cf, k, encode_record(r));
        }
        for (dest, (len, skipped)) in &lens {
            batch.put_cf(
                self.cf(CF_META),
                dest_meta(shard, OUTBOX_LEN, *dest),
                len.to_be_bytes(),
            );
            batch.put_cf(
                self.cf(CF_META),
                dest_meta(shard, OUTBOX_SKIPPED, *dest),
                skipped.to_be_bytes(),
            );
        }
        batch.put_cf(self.cf(CF_META), meta_key(shard, APPLIED), applied);
        batch.put_cf(
            self.cf(CF_META),
            meta_key(shard, STAMP),
            stamp.to_be_bytes(),
        );
        if double_grants != counted {
            batch.put_cf(
                self.cf(CF_META),
                meta_key(shard, DOUBLE_GRANTS),
                double_grants.to_be_bytes(),
            );
        }
        // Not synced: the Raft log is durable, and a lost tail is re-applied from it.
        self.write("state apply", batch)?;
        Ok(results)
    }

    /// The outbox entries of `shard` for `dest` below `upto`, oldest first.
    fn outbox_entries(
        &self,
        shard: Shard,
        dest: u16,
        upto: u64,
    ) -> rocksdb::DBIteratorWithThreadMode<'_, DB> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(outbox_key(shard, dest, upto).to_vec());
        self.db.iterator_cf_opt(
            self.cf(CF_OUTBOX),
            ro,
            rocksdb::IteratorMode::From(&outbox_key(shard, dest, 0), rocksdb::Direction::Forward),
        )
    }

    /// Remove the shipped entries below `upto`; move `dead` ones to the dead-letter
    /// queue. Returns how many left the outbox.
    fn ack_outbox(
        &self,
        batch: &mut WriteBatch,
        shard: Shard,
        dest: u16,
        upto: u64,
        dead: &[u64],
    ) -> Result<u64, StorageError> {
        let it = self.outbox_entries(shard, dest, upto);
        let mut removed = 0;
        for item in it {
            let (k, v) = item?;
            let Some((_, seq)) = outbox_dest_seq(&k) else {
                continue;
            };
            if dead.contains(&seq) {
                batch.put_cf(self.cf(CF_DLQ), &k, &v);
            }
            batch.delete_cf(self.cf(CF_OUTBOX), &k);
            removed += 1;
        }
        Ok(removed)
    }

    /// Up to `limit` queued entries for `dest`, oldest first, with what to ship for
    /// each: at most `max_bytes` of shipped bytes past the first entry that ships
    /// anything (the rest is read next time). A record expired at the shard's applied
    /// stamp ships nothing: it is expired at every destination too.
    pub fn outbox_read(
        &self,
        shard: Shard,
        dest: u16,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<OutboxEntry>, StorageError> {
        let stamp = self.meta_u64(&meta_key(shard, STAMP))?;
        let it = self.outbox_entries(shard, dest, u64::MAX);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut seen = std::collections::HashSet::new();
        for item in it.take(limit) {
            let (k, v) = item?;
            let Some((_, seq)) = outbox_dest_seq(&k) else {
                continue;
            };
            let (enqueued_ms, body) = split_outbox_value(&v);
            let ship = match body.split_first() {
                Some((&OUTBOX_REF, key_bytes)) => match decode_record_key(key_bytes) {
                    None => Ship::Unreadable(format!("outbox entry {seq}: an unreadable key")),
                    Some(_) if !seen.insert(key_bytes.to_vec()) => Ship::Nothing,
                    Some(key) => match self.get_record(shard, &key) {
                        Err(StorageError::Corrupt { detail, .. }) => {
                            Ship::Unreadable(format!("outbox entry {seq}: {detail}"))
                        }
                        Err(e) => return Err(e),
                        Ok(None) => Ship::Nothing,
                        Ok(Some(record)) if record.is_expired(stamp) => Ship::Nothing,
                        Ok(Some(record)) => Ship::Record(encode_shipped(&Shipped {
                            enqueued_ms,
                            key,
                            record,
                        })),
                    },
                },
                // The earlier format: a copy of the record as it was then.
                _ => Ship::Record(body.to_vec()),
            };
            if bytes > 0 && bytes.saturating_add(ship.bytes()) > max_bytes {
                break;
            }
            bytes = bytes.saturating_add(ship.bytes());
            out.push(OutboxEntry {
                seq,
                enqueued_ms,
                ship,
            });
        }
        Ok(out)
    }

    /// When the oldest entry queued for `dest` was queued (`None`: nothing queued).
    pub fn outbox_oldest_ms(&self, shard: Shard, dest: u16) -> Result<Option<u64>, StorageError> {
        let mut it = self.outbox_entries(shard, dest, u64::MAX);
        match it.next() {
            None => Ok(None),
            Some(item) => Ok(Some(split_outbox_value(&item?.1).0)),
        }
    }

    /// Entries queued for `dest`, and changes not queued because the queue was full.
    pub fn outbox_len(&self, shard: Shard, dest: u16) -> Result<(u64, u64), StorageError> {
        Ok((
            self.meta_u64(&dest_meta(shard, OUTBOX_LEN, dest))?,
            self.meta_u64(&dest_meta(shard, OUTBOX_SKIPPED, dest))?,
        ))
    }

    /// Dead-letter entries per destination region (every group of this node).
    pub fn dlq_depth(&self) -> Result<BTreeMap<u16, u64>, StorageError> {
        let mut out = BTreeMap::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_DLQ), rocksdb::IteratorMode::Start)
        {
            let (k, _) = item?;
            if let Some((dest, _)) = outbox_dest_seq(&k) {
                *out.entry(dest).or_insert(0) += 1;
            }
        }
        Ok(out)
    }

    fn shard_records(
        &self,
        shard: Shard,
        from: &[u8],
    ) -> rocksdb::DBIteratorWithThreadMode<'_, DB> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(shard_end(shard));
        self.db.iterator_cf_opt(
            self.cf(CF_RECORDS),
            ro,
            rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward),
        )
    }

    /// Anti-entropy digests of a group's live records: `buckets` digests, each the XOR of
    /// a hash of every record (key and replicated fields) whose key falls in it, and the
    /// count of live records. Equal digests: equal records (expired ones read as absent).
    pub fn bucket_digests(
        &self,
        shard: Shard,
        buckets: u32,
        now_ms: u64,
    ) -> Result<(Vec<[u8; 16]>, u64), StorageError> {
        let buckets = buckets.max(1);
        let mut out = vec![[0u8; 16]; buckets as usize];
        let mut n = 0;
        for item in self.shard_records(shard, &shard_prefix(shard)) {
            let (k, v) = item?;
            // Hashed in place: a record is not decoded or copied (a response may be
            // 1 MiB, and every pass hashes every live record).
            let corrupt = || StorageError::Corrupt {
                what: "record",
                detail: "not a record of a known format".into(),
            };
            let expires_ms = peek_expires_ms(&v).ok_or_else(corrupt)?;
            if now_ms >= expires_ms {
                continue;
            }
            let (before, after) = replicated_parts(&v).ok_or_else(corrupt)?;
            let b = bucket_of(&k[4..], buckets);
            let mut h = Sha256::new();
            h.update(&k[4..]);
            h.update(before);
            h.update([0u8; BOOKKEEPING_BYTES.end - BOOKKEEPING_BYTES.start]);
            h.update(after);
            let h = h.finalize();
            for (d, x) in out[b as usize].iter_mut().zip(h.iter()) {
                *d ^= x;
            }
            n += 1;
        }
        Ok((out, n))
    }

    /// Live records of one digest bucket, in key order, after the record key `after`
    /// (exclusive), at most `limit` records and, past the first, at most `max_bytes` of
    /// stored bytes; with the record key to continue from.
    #[allow(clippy::too_many_arguments)]
    pub fn bucket_records(
        &self,
        shard: Shard,
        bucket: u32,
        buckets: u32,
        after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> Result<BucketPage, StorageError> {
        let mut bytes = 0usize;
        let buckets = buckets.max(1);
        let mut from = shard_prefix(shard).to_vec();
        if let Some(a) = after {
            from.extend_from_slice(a);
            from.push(0);
        }
        let mut out = Vec::new();
        for item in self.shard_records(shard, &from) {
            let (k, v) = item?;
            if bucket_of(&k[4..], buckets) != bucket {
                continue;
            }
            let rec = decode_record(&v).map_err(|e| StorageError::Corrupt {
                what: "record",
                detail: e.to_string(),
            })?;
            if rec.is_expired(now_ms) {
                continue;
            }
            let Some(key) = decode_record_key(&k[4..]) else {
                return Err(StorageError::Corrupt {
                    what: "record key",
                    detail: format!("{} bytes", k.len()),
                });
            };
            bytes = bytes.saturating_add(k.len() + v.len());
            out.push((key, rec));
            if out.len() >= limit || bytes >= max_bytes {
                return Ok((out, Some(k[4..].to_vec())));
            }
        }
        Ok((out, None))
    }

    /// The group's replicated REGIONAL double-grant count (the same on every replica
    /// that applied the same log; it survives restarts and travels in snapshots).
    pub fn double_grants(&self, shard: Shard) -> Result<u64, StorageError> {
        self.meta_u64(&meta_key(shard, DOUBLE_GRANTS))
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
        self.sync("state sync")?;
        let view = self.db.snapshot();
        let applied = view.get_cf(self.cf(CF_META), meta_key(shard, APPLIED))?;
        let stamp = u64_of(view.get_cf(self.cf(CF_META), meta_key(shard, STAMP))?);
        let double_grants = u64_of(view.get_cf(self.cf(CF_META), meta_key(shard, DOUBLE_GRANTS))?);
        // Compaction filters do not spare what a RocksDB snapshot still shows: while the
        // file is written, nothing the view's stamp leaves live may be dropped.
        let _pin = self.horizon.pin(shard, stamp);
        let meta = make_meta(applied.as_deref())?;
        let file = snapshot::write(
            &self.snapshot_dir(),
            shard,
            &meta,
            stamp,
            double_grants,
            |sink| {
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
            },
        )?;
        self.set_current_snapshot(shard, &file)?;
        // Synced by `set_current_snapshot`: the view's stamp is durable now.
        self.horizon.publish(shard, stamp);
        Ok((file, meta))
    }

    fn set_current_snapshot(&self, shard: Shard, file: &SnapshotFile) -> Result<(), StorageError> {
        let previous = self.current_snapshot(shard)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_META),
            meta_key(shard, SNAPSHOT),
            file.path.to_string_lossy().as_bytes(),
        );
        self.write("state snapshot", batch)?;
        self.sync("state sync")?;
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
        self.write("state install", batch)?;
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
                self.write("state install", std::mem::take(&mut batch))?;
            }
            Ok(())
        })?;
        let stamp = stable.read_stamp()?;
        let double_grants = stable.read_double_grants()?;
        batch.put_cf(self.cf(CF_META), meta_key(shard, APPLIED), applied);
        batch.put_cf(
            self.cf(CF_META),
            meta_key(shard, STAMP),
            stamp.to_be_bytes(),
        );
        batch.put_cf(
            self.cf(CF_META),
            meta_key(shard, DOUBLE_GRANTS),
            double_grants.to_be_bytes(),
        );
        self.write("state install", batch)?;
        self.sync("state sync")?;
        self.horizon.publish(shard, stamp);
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

/// The anti-entropy bucket of a record key (without the shard).
pub fn bucket_of(record_key: &[u8], buckets: u32) -> u32 {
    let h = Sha256::digest(record_key);
    u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % buckets.max(1)
}

/// An outbox value: the time it was queued (u64 BE), then what follows it.
fn split_outbox_value(v: &[u8]) -> (u64, &[u8]) {
    let enqueued_ms = v
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0);
    (enqueued_ms, v.get(8..).unwrap_or_default())
}

#[cfg(test)]
mod tests;
