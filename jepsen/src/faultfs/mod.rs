//! The fault filesystem: a FUSE mount under each node's data directory that keeps what a
//! disk would keep, and loses on a simulated power loss every write, create and rename
//! that was not made durable by fsync (as lazyfs does for Jepsen). The harness switches
//! its faults while the node runs: fsync failing with EIO, a full disk, a slow disk.
//!
//! Everything lives in the harness's memory ([`model`]), bounded by the mount's
//! capacity; a mount is one FUSE thread ([`fuse`]). A power loss needs the node that
//! used the mount to be dead: the mount is taken down, the model goes back to its
//! durable state, and a fresh mount comes up in its place (so nothing the kernel cached
//! survives either).

pub mod fuse;
pub mod model;

pub use fuse::Faults;
pub use model::Discarded;

use fuse::{Adapter, Shared};
use fuser::{BackgroundSession, Config, MountOption};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What a mount has seen since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub fsyncs: u64,
    pub fsync_eio: u64,
    pub enospc: u64,
    pub delayed: u64,
    pub used: u64,
    pub capacity: u64,
}

/// One mounted fault filesystem.
pub struct FaultFs {
    shared: Arc<Shared>,
    dir: PathBuf,
    session: Option<BackgroundSession>,
}

impl FaultFs {
    /// Mount an empty filesystem of `capacity` bytes on `dir` (created if missing).
    pub fn mount(dir: &Path, capacity: u64) -> std::io::Result<FaultFs> {
        std::fs::create_dir_all(dir)?;
        let mut fs = FaultFs {
            shared: Shared::new(capacity),
            dir: dir.to_path_buf(),
            session: None,
        };
        fs.spawn()?;
        Ok(fs)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("idem-faultfs".into()),
            MountOption::NoAtime,
        ];
        config.n_threads = Some(1);
        self.session = Some(fuser::spawn_mount(
            Adapter(self.shared.clone()),
            &self.dir,
            &config,
        )?);
        Ok(())
    }

    fn unmount(&mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A power loss. The process that used the mount must be dead already (a live one
    /// would keep files of a mount that is gone). Returns what was discarded.
    pub fn power_loss(&mut self) -> std::io::Result<Discarded> {
        self.unmount()?;
        let discarded = self.shared.model().power_loss();
        self.spawn()?;
        Ok(discarded)
    }

    /// The disk is lost: everything on it is gone (a replaced machine, a deleted
    /// volume). The process that used it must be dead already.
    pub fn wipe(&mut self) -> std::io::Result<()> {
        self.unmount()?;
        let capacity = self.shared.model().capacity();
        *self.shared.model() = model::Model::new(capacity);
        self.spawn()
    }

    /// What a power loss would discard now.
    pub fn unsynced(&self) -> Discarded {
        self.shared.model().unsynced()
    }

    pub fn set_faults(&self, f: Faults) {
        *self.shared.faults.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// A full disk: the capacity shrinks to what is used now plus `slack` bytes.
    pub fn fill(&self, slack: u64) {
        let mut m = self.shared.model();
        let used = m.used();
        m.set_capacity(used + slack);
    }

    pub fn set_capacity(&self, capacity: u64) {
        self.shared.model().set_capacity(capacity);
    }

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let m = self.shared.model();
        Stats {
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            fsync_eio: c.fsync_eio.load(Ordering::Relaxed),
            enospc: c.enospc.load(Ordering::Relaxed),
            delayed: c.delayed.load(Ordering::Relaxed),
            used: m.used(),
            capacity: m.capacity(),
        }
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}

/// Whether this process can mount FUSE filesystems (root and `/dev/fuse`).
pub fn available() -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing (modprobe fuse)".into());
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("cannot open /dev/fuse: {e} (the suite needs root)")),
    }
}
