//! Snapshot files: one group's records at one applied index, streamed to and from disk
//! so that building, sending and installing a snapshot never holds it in memory.
//!
//! Format (version 3): `"IDEMSNAP" | version u8 | meta_len u32 | meta | stamp u64 |
//! double_grants u64 | { 1u8 | key_len u32 | key | value_len u32 | value }* | 0u8 |
//! count u64`, where `stamp` is the group's applied stamp (the latest command time
//! applied: later commands are judged at no earlier time) and `double_grants` the
//! group's replicated REGIONAL double-grant count. Versions 1 (neither) and 2 (no
//! count) are still read, as 0. The trailer's count detects a truncated file.

use crate::{Shard, StorageError};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const MAGIC: &[u8; 8] = b"IDEMSNAP";
const VERSION: u8 = 3;
/// The oldest version still read.
const OLDEST_READ: u8 = 1;
/// Largest key or value a snapshot may carry: a record is bounded by `Limits`.
const MAX_ITEM_BYTES: usize = 64 << 20;
const MAX_META_BYTES: usize = 16 << 20;

static SEQ: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    pub path: PathBuf,
}

fn corrupt(detail: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        what: "snapshot file",
        detail: detail.into(),
    }
}

fn unique_name(dir: &Path, shard: Shard, tag: &str) -> PathBuf {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    // A file name only (unique across restarts), never a decision.
    #[allow(clippy::disallowed_methods)]
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    dir.join(format!("shard-{shard}-{nanos}-{n}.{tag}"))
}

/// Write a snapshot: `fill` is called with a sink that appends one record.
pub(crate) fn write<F>(
    dir: &Path,
    shard: Shard,
    meta: &[u8],
    stamp: u64,
    double_grants: u64,
    fill: F,
) -> Result<SnapshotFile, StorageError>
where
    F: FnOnce(&mut dyn FnMut(&[u8], &[u8]) -> Result<(), StorageError>) -> Result<(), StorageError>,
{
    let tmp = unique_name(dir, shard, "tmp");
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    w.write_all(MAGIC)?;
    w.write_all(&[VERSION])?;
    w.write_all(&(meta.len() as u32).to_be_bytes())?;
    w.write_all(meta)?;
    w.write_all(&stamp.to_be_bytes())?;
    w.write_all(&double_grants.to_be_bytes())?;
    let mut count = 0u64;
    fill(&mut |k, v| {
        w.write_all(&[1])?;
        w.write_all(&(k.len() as u32).to_be_bytes())?;
        w.write_all(k)?;
        w.write_all(&(v.len() as u32).to_be_bytes())?;
        w.write_all(v)?;
        count += 1;
        Ok(())
    })?;
    w.write_all(&[0])?;
    w.write_all(&count.to_be_bytes())?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    let path = unique_name(dir, shard, "snap");
    std::fs::rename(&tmp, &path)?;
    // The name is durable only once its directory is synced.
    crate::sync_dir(dir)?;
    Ok(SnapshotFile { path })
}

fn read_u32(r: &mut impl Read) -> Result<u32, StorageError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(|_| corrupt("truncated"))?;
    Ok(u32::from_be_bytes(b))
}

fn read_vec(r: &mut impl Read, max: usize) -> Result<Vec<u8>, StorageError> {
    let n = read_u32(r)? as usize;
    if n > max {
        return Err(corrupt(format!("item of {n} bytes")));
    }
    let mut v = vec![0u8; n];
    r.read_exact(&mut v).map_err(|_| corrupt("truncated"))?;
    Ok(v)
}

impl SnapshotFile {
    fn open_after_header(&self) -> Result<(BufReader<File>, Vec<u8>, u64, u64), StorageError> {
        let mut r = BufReader::with_capacity(1 << 20, File::open(&self.path)?);
        let mut magic = [0u8; 9];
        r.read_exact(&mut magic).map_err(|_| corrupt("no header"))?;
        if &magic[..8] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        let version = magic[8];
        if !(OLDEST_READ..=VERSION).contains(&version) {
            return Err(corrupt(format!("unknown version {version}")));
        }
        let meta = read_vec(&mut r, MAX_META_BYTES)?;
        let mut u64_since = |v: u8| -> Result<u64, StorageError> {
            if version < v {
                return Ok(0);
            }
            let mut b = [0u8; 8];
            r.read_exact(&mut b).map_err(|_| corrupt("truncated"))?;
            Ok(u64::from_be_bytes(b))
        };
        let stamp = u64_since(2)?;
        let double_grants = u64_since(3)?;
        Ok((r, meta, stamp, double_grants))
    }

    /// The group's applied stamp when the snapshot was built (0: a version 1 file).
    pub fn read_stamp(&self) -> Result<u64, StorageError> {
        Ok(self.open_after_header()?.2)
    }

    /// The group's REGIONAL double-grant count when the snapshot was built (0 before
    /// version 3).
    pub fn read_double_grants(&self) -> Result<u64, StorageError> {
        Ok(self.open_after_header()?.3)
    }

    /// The versioned metadata bytes stored in the header.
    pub fn read_meta(&self) -> Result<Vec<u8>, StorageError> {
        Ok(self.open_after_header()?.1)
    }

    /// Call `f` on every record, then check the trailer.
    pub fn read_records<F>(&self, mut f: F) -> Result<u64, StorageError>
    where
        F: FnMut(&[u8], &[u8]) -> Result<(), StorageError>,
    {
        let (mut r, _, _, _) = self.open_after_header()?;
        let mut count = 0u64;
        loop {
            let mut tag = [0u8; 1];
            r.read_exact(&mut tag).map_err(|_| corrupt("truncated"))?;
            match tag[0] {
                1 => {
                    let k = read_vec(&mut r, MAX_ITEM_BYTES)?;
                    let v = read_vec(&mut r, MAX_ITEM_BYTES)?;
                    f(&k, &v)?;
                    count += 1;
                }
                0 => {
                    let mut b = [0u8; 8];
                    r.read_exact(&mut b)
                        .map_err(|_| corrupt("truncated trailer"))?;
                    let expected = u64::from_be_bytes(b);
                    if expected != count {
                        return Err(corrupt(format!("{count} records, trailer says {expected}")));
                    }
                    return Ok(count);
                }
                t => return Err(corrupt(format!("bad tag {t}"))),
            }
        }
    }

    /// A path for a snapshot being received, in `dir`.
    pub fn incoming(dir: &Path, shard: Shard) -> SnapshotFile {
        SnapshotFile {
            path: unique_name(dir, shard, "incoming"),
        }
    }

    /// Move the file into `dir` under a stable name (no-op when it is already a `.snap`
    /// there).
    pub(crate) fn move_into(&self, dir: &Path, shard: Shard) -> Result<SnapshotFile, StorageError> {
        if self.path.parent() == Some(dir) && self.path.extension().is_some_and(|e| e == "snap") {
            return Ok(self.clone());
        }
        let path = unique_name(dir, shard, "snap");
        if std::fs::rename(&self.path, &path).is_err() {
            std::fs::copy(&self.path, &path)?;
            File::open(&path)?.sync_all()?;
        }
        crate::sync_dir(dir)?;
        Ok(SnapshotFile { path })
    }
}
