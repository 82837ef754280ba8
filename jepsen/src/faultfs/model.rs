//! The fault filesystem's state, with no FUSE in it: every file and directory as the
//! running process sees it (*current*) and as a power loss would leave it (*durable*).
//!
//! The rules are stricter than ext4's and the same as POSIX promises (lazyfs does the
//! same for Jepsen):
//! - `write`, `truncate` and `fallocate` change a file's current data; `fsync` (or
//!   `fdatasync`) of that file makes its data and size durable;
//! - `create`, `mkdir`, `unlink`, `rmdir`, `rename` and `link` change directories'
//!   current entries; `fsync` of a directory makes its entries durable;
//! - a power loss puts every file's data and every directory's entries back to their
//!   durable state, and drops the inodes no durable entry reaches.
//!
//! So a new file needs both its own fsync (its bytes) and its directory's (its name), and
//! a rename is durable once the directories it touched were synced. A power loss reports
//! what it discarded: the bytes written and not synced, and the directory changes not
//! synced. A run whose power losses discarded nothing tested nothing.
//!
//! Data is kept in 4 KiB pages shared between the current and the durable copy, so a
//! sync copies only the pages written since the last one. Memory is bounded by the
//! capacity: a write that would take the files' current size past it fails with ENOSPC.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::sync::Arc;

pub type Ino = u64;
pub const ROOT: Ino = 1;
pub const PAGE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsError {
    NotFound,
    Exists,
    NotDir,
    IsDir,
    NotEmpty,
    NoSpace,
    Invalid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// A file's bytes: pages shared by copies, a hole or a tail past `size` reads as zeros.
#[derive(Clone, Default)]
struct Data {
    pages: Vec<Arc<[u8]>>,
    size: u64,
}

impl Data {
    fn zero_page() -> Arc<[u8]> {
        Arc::from(vec![0u8; PAGE])
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        if offset >= self.size {
            return Vec::new();
        }
        let end = (offset + len as u64).min(self.size);
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut pos = offset;
        while pos < end {
            let (p, within) = ((pos / PAGE as u64) as usize, (pos % PAGE as u64) as usize);
            let take = (PAGE - within).min((end - pos) as usize);
            match self.pages.get(p) {
                Some(page) => out.extend_from_slice(&page[within..within + take]),
                None => out.resize(out.len() + take, 0),
            }
            pos += take as u64;
        }
        out
    }

    /// Write `bytes` at `offset`; returns the pages it touched.
    fn write(&mut self, offset: u64, bytes: &[u8], dirty: &mut BTreeSet<usize>) {
        let end = offset + bytes.len() as u64;
        let need = end.div_ceil(PAGE as u64) as usize;
        while self.pages.len() < need {
            dirty.insert(self.pages.len());
            self.pages.push(Self::zero_page());
        }
        let mut pos = offset;
        let mut src = bytes;
        while !src.is_empty() {
            let (p, within) = ((pos / PAGE as u64) as usize, (pos % PAGE as u64) as usize);
            let take = (PAGE - within).min(src.len());
            Arc::make_mut(&mut self.pages[p])[within..within + take].copy_from_slice(&src[..take]);
            dirty.insert(p);
            src = &src[take..];
            pos += take as u64;
        }
        self.size = self.size.max(end);
    }

    /// Set the size: a shorter file loses its tail (zeroed, so growing it again reads
    /// zeros), a longer one reads zeros past the old end.
    fn truncate(&mut self, size: u64, dirty: &mut BTreeSet<usize>) {
        if size < self.size {
            let keep = size.div_ceil(PAGE as u64) as usize;
            self.pages.truncate(keep);
            let within = (size % PAGE as u64) as usize;
            if within != 0 {
                if let Some(last) = self.pages.last_mut() {
                    Arc::make_mut(last)[within..].fill(0);
                    dirty.insert(keep - 1);
                }
            }
        } else {
            let need = size.div_ceil(PAGE as u64) as usize;
            while self.pages.len() < need {
                dirty.insert(self.pages.len());
                self.pages.push(Self::zero_page());
            }
        }
        self.size = size;
    }
}

enum Body {
    File {
        current: Data,
        durable: Data,
        /// Pages written since the last sync.
        dirty: BTreeSet<usize>,
        /// Bytes written since the last sync.
        unsynced: u64,
        /// Bytes a failed sync left behind: clean in the page cache, never on the disk.
        stranded: u64,
    },
    Dir {
        current: BTreeMap<OsString, Ino>,
        durable: BTreeMap<OsString, Ino>,
        /// Entry changes since the last sync.
        unsynced: u64,
    },
}

struct Inode {
    body: Body,
    mode: u16,
    /// Entries naming it in the current tree.
    links: u32,
    /// Entries naming it in the durable tree.
    durable_links: u32,
    /// Handles the process holds open.
    open: u32,
}

impl Inode {
    fn kind(&self) -> Kind {
        match self.body {
            Body::File { .. } => Kind::File,
            Body::Dir { .. } => Kind::Dir,
        }
    }
}

/// What `getattr` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    pub mode: u16,
    pub links: u32,
}

/// What one power loss threw away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Discarded {
    /// Bytes written and never synced.
    pub bytes: u64,
    /// Directory changes (a create, unlink, rename side) never synced.
    pub entries: u64,
}

pub struct Model {
    inodes: HashMap<Ino, Inode>,
    next: Ino,
    capacity: u64,
    /// Sum of the current sizes of the files (what `statfs` reports used).
    used: u64,
}

impl Model {
    /// An empty filesystem (its empty root is durable) holding at most `capacity` bytes.
    pub fn new(capacity: u64) -> Model {
        let mut inodes = HashMap::new();
        inodes.insert(
            ROOT,
            Inode {
                body: Body::Dir {
                    current: BTreeMap::new(),
                    durable: BTreeMap::new(),
                    unsynced: 0,
                },
                mode: 0o755,
                links: 1,
                durable_links: 1,
                open: 0,
            },
        );
        Model {
            inodes,
            next: ROOT + 1,
            capacity,
            used: 0,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn set_capacity(&mut self, capacity: u64) {
        self.capacity = capacity;
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    fn get(&self, ino: Ino) -> Result<&Inode, FsError> {
        self.inodes.get(&ino).ok_or(FsError::NotFound)
    }

    fn get_mut(&mut self, ino: Ino) -> Result<&mut Inode, FsError> {
        self.inodes.get_mut(&ino).ok_or(FsError::NotFound)
    }

    fn entries(&self, dir: Ino) -> Result<&BTreeMap<OsString, Ino>, FsError> {
        match &self.get(dir)?.body {
            Body::Dir { current, .. } => Ok(current),
            Body::File { .. } => Err(FsError::NotDir),
        }
    }

    fn entries_mut(&mut self, dir: Ino) -> Result<&mut BTreeMap<OsString, Ino>, FsError> {
        match &mut self.get_mut(dir)?.body {
            Body::Dir {
                current, unsynced, ..
            } => {
                *unsynced += 1;
                Ok(current)
            }
            Body::File { .. } => Err(FsError::NotDir),
        }
    }

    pub fn attr(&self, ino: Ino) -> Result<Attr, FsError> {
        let n = self.get(ino)?;
        let size = match &n.body {
            Body::File { current, .. } => current.size,
            Body::Dir { current, .. } => current.len() as u64,
        };
        Ok(Attr {
            ino,
            kind: n.kind(),
            size,
            mode: n.mode,
            links: n.links,
        })
    }

    pub fn lookup(&self, dir: Ino, name: &OsStr) -> Result<Attr, FsError> {
        let ino = *self.entries(dir)?.get(name).ok_or(FsError::NotFound)?;
        self.attr(ino)
    }

    /// The entries of `dir`, in name order.
    pub fn list(&self, dir: Ino) -> Result<Vec<(OsString, Ino, Kind)>, FsError> {
        let entries = self.entries(dir)?;
        Ok(entries
            .iter()
            .filter_map(|(name, ino)| Some((name.clone(), *ino, self.inodes.get(ino)?.kind())))
            .collect())
    }

    fn insert(&mut self, dir: Ino, name: &OsStr, body: Body, mode: u16) -> Result<Attr, FsError> {
        if self.entries(dir)?.contains_key(name) {
            return Err(FsError::Exists);
        }
        let ino = self.next;
        self.next += 1;
        self.inodes.insert(
            ino,
            Inode {
                body,
                mode,
                links: 1,
                durable_links: 0,
                open: 0,
            },
        );
        self.entries_mut(dir)?.insert(name.to_os_string(), ino);
        self.attr(ino)
    }

    pub fn create(&mut self, dir: Ino, name: &OsStr, mode: u16) -> Result<Attr, FsError> {
        let body = Body::File {
            current: Data::default(),
            durable: Data::default(),
            dirty: BTreeSet::new(),
            unsynced: 0,
            stranded: 0,
        };
        self.insert(dir, name, body, mode)
    }

    pub fn mkdir(&mut self, dir: Ino, name: &OsStr, mode: u16) -> Result<Attr, FsError> {
        let body = Body::Dir {
            current: BTreeMap::new(),
            durable: BTreeMap::new(),
            unsynced: 0,
        };
        self.insert(dir, name, body, mode)
    }

    /// Remove a name (a file's, or with `dir_only` an empty directory's).
    pub fn remove(&mut self, dir: Ino, name: &OsStr, dir_only: bool) -> Result<(), FsError> {
        let ino = *self.entries(dir)?.get(name).ok_or(FsError::NotFound)?;
        match (&self.get(ino)?.body, dir_only) {
            (Body::Dir { current, .. }, true) if !current.is_empty() => {
                return Err(FsError::NotEmpty)
            }
            (Body::Dir { .. }, false) => return Err(FsError::IsDir),
            (Body::File { .. }, true) => return Err(FsError::NotDir),
            _ => {}
        }
        self.entries_mut(dir)?.remove(name);
        self.unlink_inode(ino);
        Ok(())
    }

    fn unlink_inode(&mut self, ino: Ino) {
        if let Some(n) = self.inodes.get_mut(&ino) {
            n.links = n.links.saturating_sub(1);
        }
        self.collect(ino);
    }

    /// Forget an inode nothing can reach any more: no current or durable name, no handle.
    fn collect(&mut self, ino: Ino) {
        let gone = self
            .inodes
            .get(&ino)
            .is_some_and(|n| ino != ROOT && n.links == 0 && n.durable_links == 0 && n.open == 0);
        if gone {
            if let Some(Inode {
                body: Body::File { current, .. },
                ..
            }) = self.inodes.remove(&ino)
            {
                self.used -= current.size;
            }
        }
    }

    pub fn rename(
        &mut self,
        dir: Ino,
        name: &OsStr,
        to_dir: Ino,
        to_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), FsError> {
        let ino = *self.entries(dir)?.get(name).ok_or(FsError::NotFound)?;
        let replaced = self.entries(to_dir)?.get(to_name).copied();
        if let Some(old) = replaced {
            if old == ino {
                return Ok(());
            }
            if no_replace {
                return Err(FsError::Exists);
            }
            match (self.get(ino)?.kind(), &self.get(old)?.body) {
                (Kind::File, Body::Dir { .. }) => return Err(FsError::IsDir),
                (Kind::Dir, Body::File { .. }) => return Err(FsError::NotDir),
                (Kind::Dir, Body::Dir { current, .. }) if !current.is_empty() => {
                    return Err(FsError::NotEmpty)
                }
                _ => {}
            }
        }
        self.entries_mut(dir)?.remove(name);
        self.entries_mut(to_dir)?
            .insert(to_name.to_os_string(), ino);
        if let Some(old) = replaced {
            self.unlink_inode(old);
        }
        Ok(())
    }

    pub fn link(&mut self, ino: Ino, to_dir: Ino, to_name: &OsStr) -> Result<Attr, FsError> {
        if self.get(ino)?.kind() == Kind::Dir {
            return Err(FsError::Invalid);
        }
        if self.entries(to_dir)?.contains_key(to_name) {
            return Err(FsError::Exists);
        }
        self.entries_mut(to_dir)?
            .insert(to_name.to_os_string(), ino);
        self.get_mut(ino)?.links += 1;
        self.attr(ino)
    }

    pub fn open(&mut self, ino: Ino) -> Result<(), FsError> {
        self.get_mut(ino)?.open += 1;
        Ok(())
    }

    pub fn release(&mut self, ino: Ino) {
        if let Some(n) = self.inodes.get_mut(&ino) {
            n.open = n.open.saturating_sub(1);
        }
        self.collect(ino);
    }

    pub fn read(&self, ino: Ino, offset: u64, len: usize) -> Result<Vec<u8>, FsError> {
        match &self.get(ino)?.body {
            Body::File { current, .. } => Ok(current.read(offset, len)),
            Body::Dir { .. } => Err(FsError::IsDir),
        }
    }

    /// Change a file's size to `size` with `f`, refusing to grow past the capacity.
    fn resize_with(
        &mut self,
        ino: Ino,
        new_end: u64,
        f: impl FnOnce(&mut Data, &mut BTreeSet<usize>, &mut u64),
    ) -> Result<(), FsError> {
        let (capacity, used) = (self.capacity, self.used);
        let n = self.get_mut(ino)?;
        let Body::File {
            current,
            dirty,
            unsynced,
            ..
        } = &mut n.body
        else {
            return Err(FsError::IsDir);
        };
        let before = current.size;
        if new_end > before && used + (new_end - before) > capacity {
            return Err(FsError::NoSpace);
        }
        f(current, dirty, unsynced);
        let after = current.size;
        self.used = self.used + after - before;
        Ok(())
    }

    pub fn write(&mut self, ino: Ino, offset: u64, bytes: &[u8]) -> Result<(), FsError> {
        let end = offset + bytes.len() as u64;
        self.resize_with(ino, end, |d, dirty, unsynced| {
            d.write(offset, bytes, dirty);
            *unsynced += bytes.len() as u64;
        })
    }

    pub fn truncate(&mut self, ino: Ino, size: u64) -> Result<(), FsError> {
        self.resize_with(ino, size, |d, dirty, _| d.truncate(size, dirty))
    }

    /// Reserve space up to `end` (growing the file unless `keep_size`).
    pub fn allocate(&mut self, ino: Ino, end: u64, keep_size: bool) -> Result<(), FsError> {
        let size = self.attr(ino)?.size;
        if keep_size || end <= size {
            // Nothing to reserve in memory; only a full disk refuses it.
            return if self.used >= self.capacity && end > size {
                Err(FsError::NoSpace)
            } else {
                Ok(())
            };
        }
        self.truncate(ino, end)
    }

    /// Make a file's data, or a directory's entries, durable.
    pub fn sync(&mut self, ino: Ino) -> Result<(), FsError> {
        let n = self.get_mut(ino)?;
        let mut linked = Vec::new();
        let mut unlinked = Vec::new();
        match &mut n.body {
            Body::File {
                current,
                durable,
                dirty,
                unsynced,
                ..
            } => {
                durable.pages.truncate(current.pages.len());
                while durable.pages.len() < current.pages.len() {
                    durable.pages.push(Data::zero_page());
                }
                for p in std::mem::take(dirty) {
                    if let Some(page) = current.pages.get(p) {
                        durable.pages[p] = page.clone();
                    }
                }
                durable.size = current.size;
                *unsynced = 0;
            }
            Body::Dir {
                current,
                durable,
                unsynced,
            } => {
                for (name, ino) in durable.iter() {
                    if current.get(name) != Some(ino) {
                        unlinked.push(*ino);
                    }
                }
                for (name, ino) in current.iter() {
                    if durable.get(name) != Some(ino) {
                        linked.push(*ino);
                    }
                }
                *durable = current.clone();
                *unsynced = 0;
            }
        }
        for ino in linked {
            if let Some(n) = self.inodes.get_mut(&ino) {
                n.durable_links += 1;
            }
        }
        for ino in unlinked {
            if let Some(n) = self.inodes.get_mut(&ino) {
                n.durable_links = n.durable_links.saturating_sub(1);
            }
            self.collect(ino);
        }
        Ok(())
    }

    /// A file's sync that failed (EIO). As Linux does after a write-back error, the pages
    /// it did not write are marked clean: they stay readable until a power loss, and a
    /// later sync that succeeds does not write them. This is why a database must never
    /// retry a failed fsync and carry on.
    pub fn fail_sync(&mut self, ino: Ino) {
        if let Some(Inode {
            body:
                Body::File {
                    dirty,
                    unsynced,
                    stranded,
                    ..
                },
            ..
        }) = self.inodes.get_mut(&ino)
        {
            dirty.clear();
            *stranded += std::mem::take(unsynced);
        }
    }

    /// What a power loss would discard now.
    pub fn unsynced(&self) -> Discarded {
        let mut d = Discarded::default();
        for n in self.inodes.values() {
            match &n.body {
                Body::File {
                    unsynced, stranded, ..
                } => d.bytes += unsynced + stranded,
                Body::Dir { unsynced, .. } => d.entries += unsynced,
            }
        }
        d
    }

    /// A power loss: everything goes back to its durable state. The process that had
    /// files open is gone, so no handle survives.
    pub fn power_loss(&mut self) -> Discarded {
        let discarded = self.unsynced();
        for n in self.inodes.values_mut() {
            n.open = 0;
            n.links = 0;
            n.durable_links = 0;
            match &mut n.body {
                Body::File {
                    current,
                    durable,
                    dirty,
                    unsynced,
                    stranded,
                } => {
                    *current = durable.clone();
                    dirty.clear();
                    *unsynced = 0;
                    *stranded = 0;
                }
                Body::Dir {
                    current,
                    durable,
                    unsynced,
                } => {
                    *current = durable.clone();
                    *unsynced = 0;
                }
            }
        }
        // Count links over the durable tree from the root; what it does not reach is gone.
        let mut stack = vec![ROOT];
        let mut seen = BTreeSet::from([ROOT]);
        while let Some(dir) = stack.pop() {
            let children: Vec<Ino> = match self.inodes.get(&dir).map(|n| &n.body) {
                Some(Body::Dir { current, .. }) => current.values().copied().collect(),
                _ => Vec::new(),
            };
            for c in children {
                if let Some(n) = self.inodes.get_mut(&c) {
                    n.links += 1;
                    n.durable_links += 1;
                    if seen.insert(c) && n.kind() == Kind::Dir {
                        stack.push(c);
                    }
                }
            }
        }
        if let Some(root) = self.inodes.get_mut(&ROOT) {
            root.links = 1;
            root.durable_links = 1;
        }
        self.inodes.retain(|ino, _| seen.contains(ino));
        // Every durable name reaches a kept inode; this only asserts it in release too.
        let live: BTreeSet<Ino> = self.inodes.keys().copied().collect();
        for n in self.inodes.values_mut() {
            if let Body::Dir {
                current, durable, ..
            } = &mut n.body
            {
                current.retain(|_, ino| live.contains(ino));
                durable.retain(|_, ino| live.contains(ino));
            }
        }
        self.used = self
            .inodes
            .values()
            .map(|n| match &n.body {
                Body::File { current, .. } => current.size,
                Body::Dir { .. } => 0,
            })
            .sum();
        discarded
    }
}

#[cfg(test)]
mod tests;
