//! A node's disk health: the first write or sync that fails stops every later one.
//!
//! After a failed fsync, Linux may have dropped the pages it could not write and marked
//! them clean, so a later fsync that succeeds says nothing about them (PostgreSQL's
//! "fsyncgate", 2018). Worse, the log engine's WAL is shared by every group of the node:
//! an append acknowledged after a failed sync can sit behind a hole in the file, and
//! recovery stops at the hole. So an engine that saw one failure never writes, syncs or
//! acknowledges again; the node fails stop, and a restart recovers from what the disk
//! really holds. A full disk (ENOSPC) stops the node the same way.
//!
//! Both engines of a node share one [`DiskHealth`], so a failure in either stops both.

use crate::StorageError;
use std::path::Path;
use std::sync::{Arc, OnceLock};

#[derive(Clone, Default)]
pub struct DiskHealth(Arc<OnceLock<String>>);

impl DiskHealth {
    /// Why the disk was given up (`None`: it is in use).
    pub fn failure(&self) -> Option<String> {
        self.0.get().cloned()
    }

    /// Refuse to touch the disk once it failed.
    pub fn check(&self) -> Result<(), StorageError> {
        match self.0.get() {
            Some(why) => Err(StorageError::DiskFailed(why.clone())),
            None => Ok(()),
        }
    }

    /// Run a write or sync; a failure marks the disk failed for good.
    pub fn guard<T, E: std::fmt::Display>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, StorageError> {
        self.check()?;
        f().map_err(|e| {
            let why = format!("{what}: {e}");
            if self.0.set(why.clone()).is_ok() {
                tracing::error!(error = %why, "disk write failed: this node stops writing and acknowledging until it is restarted");
            }
            StorageError::DiskFailed(self.0.get().cloned().unwrap_or(why))
        })
    }
}

/// Create `dir` and every missing parent, each made durable in its own parent (a new
/// directory is only a name in its parent until the parent is synced).
pub fn create_dir_durable(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durable(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    sync_parent(dir)
}

/// Sync the directory holding `path`, so that a name created or renamed there is durable.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => sync_dir(p),
        None => sync_dir(Path::new(".")),
    }
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_stops_every_later_write() {
        let d = DiskHealth::default();
        assert_eq!(d.guard("sync", || Ok::<_, String>(7)).unwrap(), 7);
        let e = d
            .guard("wal sync", || Err::<(), _>("Input/output error"))
            .unwrap_err();
        assert!(
            e.to_string().contains("wal sync: Input/output error"),
            "{e}"
        );
        // Never retried: the next write does not run at all.
        let mut ran = false;
        let e = d
            .guard("append", || {
                ran = true;
                Ok::<_, String>(())
            })
            .unwrap_err();
        assert!(!ran);
        assert!(
            e.to_string().contains("wal sync"),
            "the first cause is kept: {e}"
        );
        assert_eq!(d.failure().as_deref(), Some("wal sync: Input/output error"));
        // Shared by clones (the node's two engines).
        assert!(d.clone().check().is_err());
    }

    #[test]
    fn directories_are_created_with_their_parents() {
        let t = tempfile::tempdir().unwrap();
        let deep = t.path().join("a/b/c");
        create_dir_durable(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_durable(&deep).unwrap();
    }
}
