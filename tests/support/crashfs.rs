//! A crash-simulating FUSE file system for power-loss and fault-injection tests,
//! in the spirit of LazyFS: it keeps every file in memory twice, as what reads see
//! (`cur`) and what would survive a power cut (`dur`).
//!
//! Semantics (strict POSIX, what ext4/XFS promise and no more):
//! * `write`, `truncate` and `fallocate` change `cur` only.  `fsync` and
//!   `fdatasync` of a file make its data and size durable (both the same here:
//!   `fdatasync` must persist a size change that later data needs, and every
//!   caller here appends).
//! * Directory entries (create, mknod, mkdir, unlink, rmdir, rename, link) change
//!   the parent's `cur` entry set only; `fsync` of the directory (FUSE
//!   `fsyncdir`) makes its current entry set durable.  A file whose entry is not
//!   durable is gone after a cut, even if its data was fsynced.
//! * A cut ([`CrashFs::arm`] counts mutating operations down to it, or
//!   [`CrashFs::cut`]) turns the file system dead: every operation fails with
//!   EIO, so whatever the process does afterwards changes nothing.  The caller
//!   drops the process's state (the store), waits for [`CrashFs::wait_closed`],
//!   then [`CrashFs::reset`] makes the durable image current, optionally with some
//!   unsynced writes of some files reaching the disk in order (the last one torn
//!   at a 512-byte boundary), and the store is opened again on the same mount.
//! * A failed sync (injected) loses the file's unsynced writes for good
//!   (fsyncgate): they stay visible to reads but no later sync makes them
//!   durable.
//! * `DRCLONE_CRASHFS_DIRSYNC=1` makes entries durable at once (as `mount -o
//!   dirsync` would), to look past a missing directory fsync for other bugs.
//! * Simplifications: no symlinks, xattrs, times that matter, or permissions
//!   (tests run as root); locks are the kernel's local POSIX locks; every file is
//!   opened with direct I/O and entries and attributes are never cached by the
//!   kernel, so reads always see `cur`, including right after a reset.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};
use rand::{Rng, SeedableRng};

const PAGE: usize = 4096;
const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;

type Page = Arc<[u8; PAGE]>;

/// A file's bytes: copy-on-write pages, so a durable copy costs pointers only.
#[derive(Clone, Default)]
struct Content {
    len: u64,
    pages: Vec<Option<Page>>,
}

impl Content {
    fn read(&self, off: u64, n: usize) -> Vec<u8> {
        if off >= self.len {
            return Vec::new();
        }
        let n = (n as u64).min(self.len - off) as usize;
        let mut out = vec![0u8; n];
        let mut done = 0;
        while done < n {
            let pos = off as usize + done;
            let (pi, po) = (pos / PAGE, pos % PAGE);
            let k = (PAGE - po).min(n - done);
            if let Some(Some(p)) = self.pages.get(pi) {
                out[done..done + k].copy_from_slice(&p[po..po + k]);
            }
            done += k;
        }
        out
    }

    fn page_mut(&mut self, pi: usize) -> &mut [u8; PAGE] {
        if self.pages.len() <= pi {
            self.pages.resize(pi + 1, None);
        }
        let slot = &mut self.pages[pi];
        if slot.is_none() {
            *slot = Some(Arc::new([0u8; PAGE]));
        }
        Arc::make_mut(slot.as_mut().unwrap())
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let pos = off as usize + done;
            let (pi, po) = (pos / PAGE, pos % PAGE);
            let k = (PAGE - po).min(data.len() - done);
            self.page_mut(pi)[po..po + k].copy_from_slice(&data[done..done + k]);
            done += k;
        }
        self.len = self.len.max(off + data.len() as u64);
    }

    /// Zero `[off, off + n)` clipped to the length (punch hole, keep size).
    fn zero(&mut self, off: u64, n: u64) {
        let end = (off + n).min(self.len);
        let mut pos = off;
        while pos < end {
            let (pi, po) = ((pos as usize) / PAGE, (pos as usize) % PAGE);
            let k = ((PAGE - po) as u64).min(end - pos) as usize;
            if po == 0 && k == PAGE {
                if let Some(s) = self.pages.get_mut(pi) {
                    *s = None;
                }
            } else if matches!(self.pages.get(pi), Some(Some(_))) {
                self.page_mut(pi)[po..po + k].fill(0);
            }
            pos += k as u64;
        }
    }

    fn set_len(&mut self, n: u64) {
        if n < self.len {
            // Zero the cut-off tail so that growing again reads zeros.
            let tail = self.len;
            self.zero(n, tail - n);
            self.pages.truncate((n as usize).div_ceil(PAGE));
        }
        self.len = n;
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Write { off, data } => self.write(*off, data),
            Op::SetLen(n) => self.set_len(*n),
            Op::Zero { off, len } => self.zero(*off, *len),
            Op::Grow(n) => {
                if *n > self.len {
                    self.len = *n
                }
            }
        }
    }
}

/// An unsynced change to a file's content, kept in order.
#[derive(Clone)]
enum Op {
    Write { off: u64, data: Vec<u8> },
    SetLen(u64),
    Zero { off: u64, len: u64 },
    Grow(u64),
}

struct FileData {
    cur: Content,
    dur: Content,
    pending: Vec<Op>,
}

struct DirData {
    cur: BTreeMap<String, u64>,
    dur: BTreeMap<String, u64>,
}

enum Kind {
    File(FileData),
    Dir(DirData),
}

struct Inode {
    kind: Kind,
    /// Primary link, for path matching of faults (a removed file keeps its old one).
    parent: u64,
    name: String,
    mode: u16,
    mtime: SystemTime,
}

/// Which operations a fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    /// write, truncate, fallocate.
    Write,
    /// fsync, fdatasync of a file.
    Sync,
    /// fsync of a directory.
    SyncDir,
}

/// Fail the `nth` (1-based) matching operation on files whose path (relative to
/// the mount) starts with `prefix` and ends with `suffix`, with `errno`; `sticky`
/// fails every matching operation from then on.
#[derive(Clone, Debug)]
pub struct Fault {
    pub prefix: String,
    pub suffix: String,
    pub op: FaultOp,
    pub nth: u64,
    pub errno: i32,
    pub sticky: bool,
}

struct FaultState {
    f: Fault,
    seen: u64,
    /// Paths it failed, in order.
    fired: Vec<String>,
}

/// What reaches the disk of the unsynced writes at a cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tear {
    /// Nothing unsynced survives.
    None,
    /// One random file with unsynced writes keeps a random prefix of them, the
    /// last one torn at a 512-byte boundary.
    One,
    /// Every file with unsynced writes keeps a random prefix of them (write-back
    /// in order per file, as the page cache drains appends), the last torn.
    All,
}

#[derive(Clone)]
struct TraceRec {
    n: u64,
    what: &'static str,
    ino: u64,
    off: u64,
    len: u64,
    /// The entry name of directory operations.
    name: Option<String>,
}

struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    handles: HashMap<u64, u64>,
    next_fh: u64,
    /// Mutating operations left before the cut (`Some(1)`: the next one).
    countdown: Option<u64>,
    /// Mutating operations so far.
    ops: u64,
    faults: Vec<FaultState>,
    /// Free bytes statfs reports.
    free: u64,
    /// Entries durable at once (as with `mount -o dirsync`): to look past
    /// missing directory fsyncs.
    dirsync: bool,
    trace: std::collections::VecDeque<TraceRec>,
    /// The trace as it was at the last cut.
    cut_trace: Vec<TraceRec>,
    cut_at: Option<u64>,
}

/// The file system's shared state; [`CrashFs`] is the tests' handle on it.
pub struct Shared {
    st: Mutex<State>,
    dead: AtomicBool,
}

/// File operations a failure report shows (the last ones before the cut);
/// `DRCLONE_CRASHFS_TRACE=N` shows N.
fn trace_len() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("DRCLONE_CRASHFS_TRACE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(48)
    })
}

impl State {
    fn path(&self, mut ino: u64) -> String {
        let mut parts = Vec::new();
        let mut guard = 0;
        while ino != ROOT && guard < 64 {
            let Some(i) = self.inodes.get(&ino) else {
                parts.push("?".to_string());
                break;
            };
            parts.push(i.name.clone());
            ino = i.parent;
            guard += 1;
        }
        parts.reverse();
        parts.join("/")
    }

    fn new_ino(&mut self, parent: u64, name: &str, kind: Kind, mode: u16) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(
            ino,
            Inode {
                kind,
                parent,
                name: name.to_string(),
                mode,
                mtime: SystemTime::now(),
            },
        );
        ino
    }

    fn dir(&self, ino: u64) -> Result<&DirData, Errno> {
        match self.inodes.get(&ino).map(|i| &i.kind) {
            Some(Kind::Dir(d)) => Ok(d),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut DirData, Errno> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.kind) {
            Some(Kind::Dir(d)) => Ok(d),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut FileData, Errno> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.kind) {
            Some(Kind::File(f)) => Ok(f),
            Some(_) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let i = self.inodes.get(&ino).ok_or(Errno::ENOENT)?;
        let (kind, size, nlink) = match &i.kind {
            Kind::File(f) => (FileType::RegularFile, f.cur.len, 1),
            Kind::Dir(d) => (FileType::Directory, 4096, 2 + d.cur.len() as u32),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: i.mtime,
            mtime: i.mtime,
            ctime: i.mtime,
            crtime: i.mtime,
            kind,
            perm: i.mode,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    /// The gate of every mutating operation: dead, the cut, injected faults.
    fn mutate(
        &mut self,
        dead: &AtomicBool,
        what: &'static str,
        ino: u64,
        off: u64,
        len: u64,
        class: Option<FaultOp>,
    ) -> Result<(), Errno> {
        self.mutate_named(dead, what, ino, None, off, len, class)
    }

    fn mutate_named(
        &mut self,
        dead: &AtomicBool,
        what: &'static str,
        ino: u64,
        name: Option<&str>,
        off: u64,
        len: u64,
        class: Option<FaultOp>,
    ) -> Result<(), Errno> {
        if dead.load(Ordering::SeqCst) {
            return Err(Errno::EIO);
        }
        self.ops += 1;
        if self.trace.len() >= trace_len() {
            self.trace.pop_front();
        }
        self.trace.push_back(TraceRec {
            n: self.ops,
            what,
            ino,
            off,
            len,
            name: name.map(str::to_string),
        });
        if let Some(c) = self.countdown.as_mut() {
            *c -= 1;
            if *c == 0 {
                self.countdown = None;
                self.cut_at = Some(self.ops);
                self.cut_trace = self.trace.iter().cloned().collect();
                dead.store(true, Ordering::SeqCst);
                return Err(Errno::EIO);
            }
        }
        if let Some(class) = class {
            if !self.faults.is_empty() {
                let path = self.path(ino);
                for fs in &mut self.faults {
                    if fs.f.op != class
                        || !path.starts_with(&fs.f.prefix)
                        || !path.ends_with(&fs.f.suffix)
                    {
                        continue;
                    }
                    fs.seen += 1;
                    if fs.seen == fs.f.nth || (fs.f.sticky && fs.seen > fs.f.nth) {
                        fs.fired.push(path.clone());
                        return Err(Errno::from_i32(fs.f.errno));
                    }
                }
            }
        }
        Ok(())
    }

    /// Apply a content change to `cur`, queueing it for the next sync.
    fn change(&mut self, ino: u64, op: Op) -> Result<(), Errno> {
        let f = self.file_mut(ino)?;
        f.cur.apply(&op);
        f.pending.push(op);
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.mtime = SystemTime::now();
        }
        Ok(())
    }

    fn sync_file(&mut self, ino: u64) -> Result<(), Errno> {
        let f = self.file_mut(ino)?;
        for op in std::mem::take(&mut f.pending) {
            f.dur.apply(&op);
        }
        Ok(())
    }

    fn sync_dir(&mut self, ino: u64) -> Result<(), Errno> {
        let d = self.dir_mut(ino)?;
        d.dur = d.cur.clone();
        Ok(())
    }

    fn after_entry_change(&mut self, dirs: &[u64]) {
        if self.dirsync {
            for &d in dirs {
                let _ = self.sync_dir(d);
            }
        }
    }

    /// Inodes reachable from the root through `cur` (or `dur`) entries.
    fn reachable(&self, durable: bool) -> HashSet<u64> {
        let mut seen = HashSet::new();
        let mut stack = vec![ROOT];
        while let Some(i) = stack.pop() {
            if !seen.insert(i) {
                continue;
            }
            if let Some(Inode {
                kind: Kind::Dir(d), ..
            }) = self.inodes.get(&i)
            {
                let m = if durable { &d.dur } else { &d.cur };
                stack.extend(m.values().copied());
            }
        }
        seen
    }

    /// Drop inodes nothing can reach any more.
    fn sweep(&mut self) {
        let mut keep = self.reachable(false);
        keep.extend(self.reachable(true));
        keep.extend(self.handles.values().copied());
        self.inodes.retain(|i, _| keep.contains(i));
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }
}

struct Fs(Arc<Shared>);

fn name_of(name: &OsStr) -> Result<String, Errno> {
    name.to_str().map(str::to_string).ok_or(Errno::EINVAL)
}

impl Fs {
    fn entry(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        let st = self.0.lock();
        if self.0.dead() {
            return Err(Errno::EIO);
        }
        let name = name_of(name)?;
        let ino = *st.dir(parent)?.cur.get(&name).ok_or(Errno::ENOENT)?;
        st.attr(ino)
    }

    /// Create a file or directory entry; returns its attributes.
    fn make(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        dir: bool,
        open: bool,
    ) -> Result<(FileAttr, u64), Errno> {
        let mut st = self.0.lock();
        let name = name_of(name)?;
        st.mutate_named(
            &self.0.dead,
            if dir { "mkdir" } else { "create" },
            parent,
            Some(&name),
            0,
            0,
            None,
        )?;
        if let Some(&existing) = st.dir(parent)?.cur.get(&name) {
            if dir || !open {
                return Err(Errno::EEXIST);
            }
            let fh = st.next_fh;
            st.next_fh += 1;
            st.handles.insert(fh, existing);
            return Ok((st.attr(existing)?, fh));
        }
        let kind = if dir {
            Kind::Dir(DirData {
                cur: BTreeMap::new(),
                dur: BTreeMap::new(),
            })
        } else {
            Kind::File(FileData {
                cur: Content::default(),
                dur: Content::default(),
                pending: Vec::new(),
            })
        };
        let ino = st.new_ino(parent, &name, kind, (mode & 0o7777) as u16);
        st.dir_mut(parent)?.cur.insert(name, ino);
        st.after_entry_change(&[parent]);
        let mut fh = 0;
        if open {
            fh = st.next_fh;
            st.next_fh += 1;
            st.handles.insert(fh, ino);
        }
        Ok((st.attr(ino)?, fh))
    }

    fn remove(&self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let mut st = self.0.lock();
        let name = name_of(name)?;
        st.mutate_named(
            &self.0.dead,
            if dir { "rmdir" } else { "unlink" },
            parent,
            Some(&name),
            0,
            0,
            None,
        )?;
        let ino = *st.dir(parent)?.cur.get(&name).ok_or(Errno::ENOENT)?;
        match (&st.inodes.get(&ino).ok_or(Errno::ENOENT)?.kind, dir) {
            (Kind::Dir(d), true) if !d.cur.is_empty() => return Err(Errno::ENOTEMPTY),
            (Kind::Dir(_), false) => return Err(Errno::EISDIR),
            (Kind::File(_), true) => return Err(Errno::ENOTDIR),
            _ => {}
        }
        st.dir_mut(parent)?.cur.remove(&name);
        st.after_entry_change(&[parent]);
        Ok(())
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.entry(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let st = self.0.lock();
        if self.0.dead() {
            return reply.error(Errno::EIO);
        }
        match st.attr(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
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
        let mut st = self.0.lock();
        if self.0.dead() {
            return reply.error(Errno::EIO);
        }
        if let Some(n) = size {
            let r = st
                .mutate(&self.0.dead, "truncate", ino.0, n, 0, Some(FaultOp::Write))
                .and_then(|()| st.change(ino.0, Op::SetLen(n)));
            if let Err(e) = r {
                return reply.error(e);
            }
        }
        if let Some(m) = mode {
            if let Some(i) = st.inodes.get_mut(&ino.0) {
                i.mode = (m & 0o7777) as u16;
            }
        }
        match st.attr(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            return reply.error(Errno::EPERM);
        }
        match self.make(parent.0, name, mode, false, false) {
            Ok((a, _)) => reply.entry(&TTL, &a, Generation(0)),
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
        match self.make(parent.0, name, mode, true, false) {
            Ok((a, _)) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
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
        let r = (|| {
            let mut st = self.0.lock();
            let (name, newname) = (name_of(name)?, name_of(newname)?);
            st.mutate_named(
                &self.0.dead,
                "rename",
                parent.0,
                Some(&format!("{name} -> {}", newname)),
                0,
                0,
                None,
            )?;
            if flags.contains(RenameFlags::RENAME_EXCHANGE)
                || flags.contains(RenameFlags::RENAME_WHITEOUT)
            {
                return Err(Errno::EINVAL);
            }
            let ino = *st.dir(parent.0)?.cur.get(&name).ok_or(Errno::ENOENT)?;
            if let Some(&old) = st.dir(newparent.0)?.cur.get(&newname) {
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                if let Some(Inode {
                    kind: Kind::Dir(d), ..
                }) = st.inodes.get(&old)
                {
                    if !d.cur.is_empty() {
                        return Err(Errno::ENOTEMPTY);
                    }
                }
            }
            st.dir_mut(parent.0)?.cur.remove(&name);
            st.dir_mut(newparent.0)?.cur.insert(newname.clone(), ino);
            if let Some(i) = st.inodes.get_mut(&ino) {
                i.parent = newparent.0;
                i.name = newname;
            }
            st.after_entry_change(&[parent.0, newparent.0]);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let mut st = self.0.lock();
            let newname = name_of(newname)?;
            st.mutate_named(
                &self.0.dead,
                "link",
                newparent.0,
                Some(&newname),
                0,
                0,
                None,
            )?;
            if st.dir(newparent.0)?.cur.contains_key(&newname) {
                return Err(Errno::EEXIST);
            }
            if !matches!(st.inodes.get(&ino.0).map(|i| &i.kind), Some(Kind::File(_))) {
                return Err(Errno::EPERM);
            }
            st.dir_mut(newparent.0)?.cur.insert(newname, ino.0);
            st.after_entry_change(&[newparent.0]);
            st.attr(ino.0)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.0.lock();
        if self.0.dead() {
            return reply.error(Errno::EIO);
        }
        match st.inodes.get(&ino.0).map(|i| &i.kind) {
            Some(Kind::File(_)) => {}
            Some(_) => return reply.error(Errno::EISDIR),
            None => return reply.error(Errno::ENOENT),
        }
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(fh, ino.0);
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
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
        match self.make(parent.0, name, mode, false, true) {
            Ok((a, fh)) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
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
        let mut st = self.0.lock();
        if self.0.dead() {
            return reply.error(Errno::EIO);
        }
        match st.file_mut(ino.0) {
            Ok(f) => reply.data(&f.cur.read(offset, size as usize)),
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
        let mut st = self.0.lock();
        let r = st
            .mutate(
                &self.0.dead,
                "write",
                ino.0,
                offset,
                data.len() as u64,
                Some(FaultOp::Write),
            )
            .and_then(|()| {
                st.change(
                    ino.0,
                    Op::Write {
                        off: offset,
                        data: data.to_vec(),
                    },
                )
            });
        match r {
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
        if self.0.dead() {
            return reply.error(Errno::EIO);
        }
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.0.lock().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.0.lock();
        let what = if datasync { "fdatasync" } else { "fsync" };
        match st.mutate(&self.0.dead, what, ino.0, 0, 0, Some(FaultOp::Sync)) {
            Ok(()) => match st.sync_file(ino.0) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
            Err(e) => {
                // fsyncgate: what was not written back is lost for good.
                if e != Errno::EIO || !self.0.dead() {
                    if let Ok(f) = st.file_mut(ino.0) {
                        f.pending.clear();
                    }
                }
                reply.error(e)
            }
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.0.lock();
        if self.0.dead() {
            return reply.error(Errno::EIO);
        }
        if let Err(e) = st.dir(ino.0) {
            return reply.error(e);
        }
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(fh, ino.0);
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let st = self.0.lock();
        if self.0.dead() {
            return reply.error(Errno::EIO);
        }
        let d = match st.dir(ino.0) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let parent = st.inodes.get(&ino.0).map_or(ROOT, |i| i.parent);
        let mut all = vec![
            (ino.0, FileType::Directory, ".".to_string()),
            (parent, FileType::Directory, "..".to_string()),
        ];
        for (n, &i) in &d.cur {
            let kind = match st.inodes.get(&i).map(|x| &x.kind) {
                Some(Kind::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((i, kind, n.clone()));
        }
        for (k, (i, kind, n)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), (k + 1) as u64, kind, n) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.0.lock().handles.remove(&fh.0);
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
        let mut st = self.0.lock();
        let r = st
            .mutate(
                &self.0.dead,
                "fsyncdir",
                ino.0,
                0,
                0,
                Some(FaultOp::SyncDir),
            )
            .and_then(|()| st.sync_dir(ino.0));
        if st.inodes.len() > 4096 {
            st.sweep();
        }
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let st = self.0.lock();
        if self.0.dead() {
            return reply.error(Errno::EIO);
        }
        let b = st.free / PAGE as u64;
        reply.statfs(b * 2, b, b, 1 << 20, 1 << 19, PAGE as u32, 255, PAGE as u32);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
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
        let mut st = self.0.lock();
        let r = st
            .mutate(
                &self.0.dead,
                "fallocate",
                ino.0,
                offset,
                length,
                Some(FaultOp::Write),
            )
            .and_then(|()| {
                let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
                let rest = mode & !libc::FALLOC_FL_KEEP_SIZE;
                if rest == libc::FALLOC_FL_PUNCH_HOLE && keep {
                    st.change(
                        ino.0,
                        Op::Zero {
                            off: offset,
                            len: length,
                        },
                    )
                } else if rest == libc::FALLOC_FL_ZERO_RANGE {
                    st.change(
                        ino.0,
                        Op::Zero {
                            off: offset,
                            len: length,
                        },
                    )?;
                    if !keep {
                        st.change(ino.0, Op::Grow(offset + length))?;
                    }
                    Ok(())
                } else if rest == 0 {
                    if keep {
                        // Preallocation only: nothing a reader can see.
                        st.file_mut(ino.0).map(|_| ())
                    } else {
                        st.change(ino.0, Op::Grow(offset + length))
                    }
                } else {
                    Err(Errno::EOPNOTSUPP)
                }
            });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let mut st = self.0.lock();
        if self.0.dead() {
            return reply.error(Errno::EIO);
        }
        let len = match st.file_mut(ino.0) {
            Ok(f) => f.cur.len as i64,
            Err(e) => return reply.error(e),
        };
        match whence {
            libc::SEEK_DATA if offset < len => reply.offset(offset),
            libc::SEEK_HOLE if offset < len => reply.offset(len),
            libc::SEEK_DATA | libc::SEEK_HOLE => reply.error(Errno::ENXIO),
            _ => reply.error(Errno::EINVAL),
        }
    }
}

/// A mounted crash file system on a temporary directory; unmounts when dropped.
pub struct CrashFs {
    shared: Arc<Shared>,
    session: Option<fuser::BackgroundSession>,
    root: PathBuf,
    _tmp: tempfile::TempDir,
}

impl CrashFs {
    /// Mount a new, empty file system.
    pub fn mount() -> CrashFs {
        let tmp = tempfile::tempdir().expect("temp dir");
        let root = tmp.path().join("mnt");
        std::fs::create_dir(&root).unwrap();
        let mut inodes = HashMap::new();
        inodes.insert(
            ROOT,
            Inode {
                kind: Kind::Dir(DirData {
                    cur: BTreeMap::new(),
                    dur: BTreeMap::new(),
                }),
                parent: ROOT,
                name: String::new(),
                mode: 0o755,
                mtime: SystemTime::now(),
            },
        );
        let shared = Arc::new(Shared {
            st: Mutex::new(State {
                inodes,
                next_ino: 2,
                handles: HashMap::new(),
                next_fh: 1,
                countdown: None,
                ops: 0,
                faults: Vec::new(),
                free: 64 << 30,
                dirsync: std::env::var("DRCLONE_CRASHFS_DIRSYNC").is_ok_and(|v| v == "1"),
                trace: Default::default(),
                cut_trace: Vec::new(),
                cut_at: None,
            }),
            dead: AtomicBool::new(false),
        });
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            fuser::MountOption::FSName("crashfs".into()),
            fuser::MountOption::Subtype("crashfs".into()),
        ];
        cfg.n_threads = Some(2);
        let session = fuser::spawn_mount(Fs(shared.clone()), &root, &cfg).unwrap_or_else(|e| {
            panic!(
                "mount crashfs on {}: {e} (is fusermount3 installed? scripts/setup.sh)",
                root.display()
            )
        });
        // The mount is live once the root is ours.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mounted = std::fs::read_to_string("/proc/self/mounts")
                .unwrap_or_default()
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(root.to_str().unwrap()));
            if mounted {
                break;
            }
            assert!(Instant::now() < deadline, "crashfs did not come up");
            std::thread::sleep(Duration::from_millis(10));
        }
        CrashFs {
            shared,
            session: Some(session),
            root,
            _tmp: tmp,
        }
    }

    /// The mount point.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Make everything durable, as if synced long ago (after setup).
    pub fn checkpoint(&self) {
        let mut st = self.shared.lock();
        let inos: Vec<u64> = st.inodes.keys().copied().collect();
        for i in inos {
            let _ = st.sync_file(i);
            let _ = st.sync_dir(i);
        }
    }

    /// Cut the power after `n` more mutating operations (the `n`th fails).
    pub fn arm(&self, n: u64) {
        assert!(n > 0);
        self.shared.lock().countdown = Some(n);
    }

    pub fn disarm(&self) {
        self.shared.lock().countdown = None;
    }

    /// Cut the power now.
    pub fn cut(&self) {
        let mut st = self.shared.lock();
        st.countdown = None;
        st.cut_at = Some(st.ops);
        st.cut_trace = st.trace.iter().cloned().collect();
        self.shared.dead.store(true, Ordering::SeqCst);
    }

    pub fn is_dead(&self) -> bool {
        self.shared.dead()
    }

    /// Mutating operations so far.
    pub fn ops(&self) -> u64 {
        self.shared.lock().ops
    }

    /// Operation number of the last cut.
    pub fn cut_at(&self) -> Option<u64> {
        self.shared.lock().cut_at
    }

    /// Entries durable at once (`mount -o dirsync`).
    pub fn set_dirsync(&self, on: bool) {
        self.shared.lock().dirsync = on;
    }

    /// Free bytes `statfs` reports.
    pub fn set_free(&self, bytes: u64) {
        self.shared.lock().free = bytes;
    }

    pub fn add_fault(&self, f: Fault) {
        self.shared.lock().faults.push(FaultState {
            f,
            seen: 0,
            fired: Vec::new(),
        });
    }

    /// Remove every fault (heal the disk); returns the paths each one failed.
    pub fn clear_faults(&self) -> Vec<Vec<String>> {
        std::mem::take(&mut self.shared.lock().faults)
            .into_iter()
            .map(|f| f.fired)
            .collect()
    }

    /// Paths the faults failed so far.
    pub fn fired(&self) -> Vec<String> {
        self.shared
            .lock()
            .faults
            .iter()
            .flat_map(|f| f.fired.clone())
            .collect()
    }

    /// Open files and directories.
    pub fn open_handles(&self) -> usize {
        self.shared.lock().handles.len()
    }

    /// Wait until nothing is open (the store and all its threads are gone).
    pub fn wait_closed(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = self.shared.lock();
            if st.handles.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                let open: Vec<String> = st.handles.values().map(|&i| st.path(i)).collect();
                panic!("files still open 60 s after the store was dropped: {open:?}");
            }
            drop(st);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The last mutating operations up to the last cut, one per line (for
    /// failure reports; paths as they are now).
    pub fn trace(&self) -> String {
        let st = self.shared.lock();
        st.cut_trace
            .iter()
            .map(|t| match &t.name {
                Some(n) => format!("  #{} {} {}/{n}", t.n, t.what, st.path(t.ino)),
                None if t.len > 0 => format!(
                    "  #{} {} {} {}+{}",
                    t.n,
                    t.what,
                    st.path(t.ino),
                    t.off,
                    t.len
                ),
                None => format!("  #{} {} {}", t.n, t.what, st.path(t.ino)),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Durable paths of regular files and their durable sizes (for reports).
    pub fn durable_files(&self) -> Vec<(String, u64)> {
        let st = self.shared.lock();
        let mut out = Vec::new();
        let mut stack = vec![(ROOT, String::new())];
        while let Some((i, p)) = stack.pop() {
            match st.inodes.get(&i).map(|x| &x.kind) {
                Some(Kind::Dir(d)) => {
                    for (n, &c) in &d.dur {
                        stack.push((
                            c,
                            if p.is_empty() {
                                n.clone()
                            } else {
                                format!("{p}/{n}")
                            },
                        ));
                    }
                }
                Some(Kind::File(f)) => out.push((p, f.dur.len)),
                None => {}
            }
        }
        out.sort();
        out
    }

    /// Power back on: the durable image becomes what the file system holds,
    /// with `tear` deciding which unsynced writes reached the disk.  Call only
    /// with nothing open ([`CrashFs::wait_closed`]).
    pub fn reset(&self, tear: Tear, seed: u64) {
        let mut st = self.shared.lock();
        assert!(st.handles.is_empty(), "reset with files open");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let reach = st.reachable(true);
        let mut torn: Vec<u64> = reach
            .iter()
            .copied()
            .filter(|i| matches!(st.inodes.get(i).map(|x| &x.kind), Some(Kind::File(f)) if !f.pending.is_empty()))
            .collect();
        torn.sort_unstable();
        let chosen: Vec<u64> = match tear {
            Tear::None => vec![],
            Tear::One if torn.is_empty() => vec![],
            Tear::One => vec![torn[rng.gen_range(0..torn.len())]],
            Tear::All => torn.into_iter().filter(|_| rng.gen_bool(0.5)).collect(),
        };
        for i in chosen {
            let Ok(f) = st.file_mut(i) else { continue };
            let k = rng.gen_range(0..=f.pending.len());
            for op in &f.pending[..k] {
                f.dur.apply(op);
            }
            if let Some(Op::Write { off, data }) = f.pending.get(k) {
                let sectors = data.len() / 512;
                if sectors > 0 {
                    let keep = rng.gen_range(0..sectors) * 512;
                    f.dur.write(*off, &data[..keep]);
                }
            }
        }
        // Rebuild: durable entries and contents become current; the primary link
        // of each inode is where the durable tree has it.
        let mut stack = vec![ROOT];
        let mut seen = HashSet::new();
        while let Some(i) = stack.pop() {
            if !seen.insert(i) {
                continue;
            }
            let kids: Vec<(String, u64)> = match st.inodes.get_mut(&i).map(|x| &mut x.kind) {
                Some(Kind::Dir(d)) => {
                    d.cur = d.dur.clone();
                    d.dur.iter().map(|(n, &c)| (n.clone(), c)).collect()
                }
                Some(Kind::File(f)) => {
                    f.cur = f.dur.clone();
                    f.pending.clear();
                    vec![]
                }
                None => vec![],
            };
            for (n, c) in kids {
                if let Some(x) = st.inodes.get_mut(&c) {
                    x.parent = i;
                    x.name = n;
                }
                stack.push(c);
            }
        }
        st.inodes.retain(|i, _| seen.contains(i));
        st.countdown = None;
        self.shared.dead.store(false, Ordering::SeqCst);
    }
}

impl Drop for CrashFs {
    fn drop(&mut self) {
        self.shared.dead.store(false, Ordering::SeqCst);
        if let Some(s) = self.session.take() {
            if s.umount_and_join().is_err() {
                let _ = std::process::Command::new("fusermount3")
                    .arg("-uz")
                    .arg(&self.root)
                    .status();
            }
        }
    }
}
