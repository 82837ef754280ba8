//! The FUSE side of the fault filesystem: each kernel request becomes one call on the
//! [`Model`], under the faults the harness has switched on (fsync failing with EIO, a
//! full disk, a slow disk). One thread serves a mount, so a slow operation holds up the
//! ones behind it, as a slow disk does.

use super::model::{Attr, FsError, Kind, Model};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// How long the kernel may cache names and attributes. The model changes only through
/// this mount, and a power loss remounts it, so the kernel's view never goes stale.
const TTL: Duration = Duration::from_secs(1);
/// `fallocate` mode bit: reserve without changing the size.
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;

/// The faults a mount can be under, switched by the harness while it is mounted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Every fsync fails with EIO, and (as Linux does) the pages it failed to write are
    /// marked clean: a later fsync that succeeds does not write them.
    pub fsync_eio: bool,
    /// Every operation waits this long before it is served.
    pub delay: Option<Duration>,
}

/// What a mount has seen, for the fault windows' observed effects.
#[derive(Default)]
pub struct Counters {
    pub fsyncs: AtomicU64,
    pub fsync_eio: AtomicU64,
    pub enospc: AtomicU64,
    pub delayed: AtomicU64,
}

/// What the harness and the FUSE thread share.
pub struct Shared {
    pub model: Mutex<Model>,
    pub faults: Mutex<Faults>,
    pub counters: Counters,
}

impl Shared {
    pub fn new(capacity: u64) -> Arc<Shared> {
        Arc::new(Shared {
            model: Mutex::new(Model::new(capacity)),
            faults: Mutex::new(Faults::default()),
            counters: Counters::default(),
        })
    }

    pub fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn faults(&self) -> Faults {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The `fuser` filesystem over a [`Shared`] model.
pub struct Adapter(pub Arc<Shared>);

fn errno(e: FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::Exists => Errno::EEXIST,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::NotEmpty => Errno::ENOTEMPTY,
        FsError::NoSpace => Errno::ENOSPC,
        FsError::Invalid => Errno::EINVAL,
    }
}

fn file_attr(a: Attr) -> FileAttr {
    let t = SystemTime::UNIX_EPOCH;
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: match a.kind {
            Kind::File => FileType::RegularFile,
            Kind::Dir => FileType::Directory,
        },
        perm: a.mode,
        nlink: a.links.max(1),
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Adapter {
    /// Serve one request: wait out a slow disk first, then run `f` on the model.
    fn serve<T>(&self, f: impl FnOnce(&mut Model) -> Result<T, FsError>) -> Result<T, Errno> {
        if let Some(d) = self.0.faults().delay {
            self.0.counters.delayed.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(d);
        }
        let r = f(&mut self.0.model());
        if r.as_ref().err() == Some(&FsError::NoSpace) {
            self.0.counters.enospc.fetch_add(1, Ordering::Relaxed);
        }
        r.map_err(errno)
    }

    fn entry(&self, reply: ReplyEntry, r: Result<Attr, Errno>) {
        match r {
            Ok(a) => reply.entry(&TTL, &file_attr(a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn empty(reply: ReplyEmpty, r: Result<(), Errno>) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn sync(&self, ino: INodeNo, reply: ReplyEmpty) {
        self.0.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        if self.0.faults().fsync_eio {
            self.0.counters.fsync_eio.fetch_add(1, Ordering::Relaxed);
            self.0.model().fail_sync(ino.0);
            return reply.error(Errno::EIO);
        }
        Self::empty(reply, self.serve(|m| m.sync(ino.0)));
    }
}

fn mode_bits(mode: u32) -> u16 {
    (mode & 0o7777) as u16
}

impl Filesystem for Adapter {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, self.serve(|m| m.lookup(parent.0, name)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.serve(|m| m.attr(ino.0)) {
            Ok(a) => reply.attr(&TTL, &file_attr(a)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.serve(|m| {
            if let Some(size) = size {
                m.truncate(ino.0, size)?;
            }
            m.attr(ino.0)
        });
        match r {
            Ok(a) => reply.attr(&TTL, &file_attr(a)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.entry(
            reply,
            self.serve(|m| m.mkdir(parent.0, name, mode_bits(mode))),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(reply, self.serve(|m| m.remove(parent.0, name, false)));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(reply, self.serve(|m| m.remove(parent.0, name, true)));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        Self::empty(
            reply,
            self.serve(|m| m.rename(parent.0, name, newparent.0, newname, no_replace)),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(reply, self.serve(|m| m.link(ino.0, newparent.0, newname)));
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.serve(|m| m.open(ino.0)) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.serve(|m| {
            let a = m.create(parent.0, name, mode_bits(mode))?;
            m.open(a.ino)?;
            Ok(a)
        });
        match r {
            Ok(a) => reply.created(
                &TTL,
                &file_attr(a),
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.serve(|m| m.read(ino.0, offset, size as usize)) {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.serve(|m| m.write(ino.0, offset, data)) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.0.model().release(ino.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.serve(|m| m.attr(ino.0)) {
            Ok(a) if a.kind == Kind::Dir => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.serve(|m| m.list(ino.0)) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        // Offsets: 1 is ".", 2 is "..", then the entries in name order.
        let mut all = vec![
            (".".into(), ino.0, Kind::Dir),
            ("..".into(), ino.0, Kind::Dir),
        ];
        all.extend(entries);
        for (i, (name, child, kind)) in all.into_iter().enumerate().skip(offset as usize) {
            let kind = match kind {
                Kind::File => FileType::RegularFile,
                Kind::Dir => FileType::Directory,
            };
            if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (capacity, used, files) = {
            let m = self.0.model();
            (m.capacity(), m.used(), m.inode_count() as u64)
        };
        let bsize = 4096u64;
        let blocks = capacity / bsize;
        let free = capacity.saturating_sub(used) / bsize;
        reply.statfs(
            blocks,
            free,
            free,
            files,
            1 << 20,
            bsize as u32,
            255,
            bsize as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let keep_size = mode & FALLOC_FL_KEEP_SIZE != 0;
        if mode & !FALLOC_FL_KEEP_SIZE != 0 {
            // Punching holes and the like: not a disk this suite needs.
            return reply.error(Errno::EOPNOTSUPP);
        }
        Self::empty(
            reply,
            self.serve(|m| m.allocate(ino.0, offset + length, keep_size)),
        );
    }
}
