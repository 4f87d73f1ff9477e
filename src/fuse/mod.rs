//! The FUSE mount: volumes and recovery points as files.
//!
//! ```text
//! MOUNT/GROUP/DISK          a head, read-write, the volume's size
//! MOUNT/GROUP/@ID/DISK      a recovery point, read-only
//! ```
//! Listings are computed from the store on every `readdir`/`lookup`, so they follow
//! volumes, points and drill clones as they come and go.  Inode numbers are handed
//! out on first sight of a name and stay stable for the life of the mount.
//!
//! Heads are opened with direct I/O, because NBD clients may change them underneath
//! the kernel's page cache; points are immutable and opened with keep-cache.
//! `fsync` is a durable flush; `fallocate(PUNCH_HOLE)` is a trim (partial chunks at
//! the edges are zero-filled); `lseek(SEEK_DATA/SEEK_HOLE)` answers from the block
//! map, so `cp --sparse` and `qemu-img` skip holes.
//!
//! A head's size can grow while it is open (`drclone volume resize`, or through the
//! mount: `fallocate` or `truncate` past the end grow the volume, as they grow a
//! plain file).  So a head's attributes are never cached by the kernel (TTL 0: every
//! `stat`, and `losetup -c`, asks), and an open file's view is refreshed when a
//! request reaches past the size it last knew.  Shrinking is refused (EPERM), and
//! `fallocate(KEEP_SIZE)` past the end fails with EOPNOTSUPP: a thin volume has
//! nothing to reserve beyond its size.
//!
//! An open file holds a lease on its view ([`Store::lease`]): while it is open,
//! `point rm` of its point and `volume rm` of its head are refused as in use, so a
//! reader never finds its data collected under it.  The lease ends with the
//! kernel's RELEASE, which follows the last `close` of the file shortly after.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::engine::store::{Block, Lease, Store, View};
use crate::error::Error;

/// How long the kernel may cache names and the attributes of directories and points.
const TTL: Duration = Duration::from_secs(1);
/// Attributes of heads are not cached: their size may grow at any time.
const HEAD_ATTR_TTL: Duration = Duration::ZERO;
const MAX_IO: u32 = 1 << 20;

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Node {
    Root,
    Group(String),
    Head(String, String),
    PointDir(String, u64),
    PointFile(String, u64, String),
}

#[derive(Default)]
struct Inodes {
    by_ino: HashMap<u64, Node>,
    by_node: HashMap<Node, u64>,
    next: u64,
}

/// An open file: its view, and the lease that keeps the view from being removed
/// while the file is open (`point rm` and `volume rm` are refused as in use).
struct OpenFile {
    view: Arc<View>,
    _lease: Lease,
}

pub struct DrFs {
    store: Arc<Store>,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, OpenFile>>,
    next_fh: AtomicU64,
    uid: u32,
    gid: u32,
}

fn errno(e: &Error) -> Errno {
    match e {
        Error::ReadOnly(_) => Errno::EROFS,
        Error::NotFound(_) => Errno::ENOENT,
        Error::Busy(_) => Errno::from_i32(libc::EBUSY),
        _ => Errno::from_i32(e.kind().errno()),
    }
}

impl DrFs {
    pub fn new(store: Arc<Store>) -> DrFs {
        let mut inodes = Inodes {
            next: 2,
            ..Default::default()
        };
        inodes.by_ino.insert(1, Node::Root);
        inodes.by_node.insert(Node::Root, 1);
        DrFs {
            store,
            inodes: Mutex::new(inodes),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
        }
    }

    fn ino(&self, n: Node) -> u64 {
        let mut t = self.inodes.lock().unwrap();
        if let Some(&i) = t.by_node.get(&n) {
            return i;
        }
        let i = t.next;
        t.next += 1;
        t.by_ino.insert(i, n.clone());
        t.by_node.insert(n, i);
        i
    }

    fn node(&self, ino: INodeNo) -> Option<Node> {
        self.inodes.lock().unwrap().by_ino.get(&ino.0).cloned()
    }

    /// The view behind a file node, if it still exists.
    fn view(&self, n: &Node) -> Result<View, Errno> {
        let r = match n {
            Node::Head(g, d) => self.store.view(g, d, None),
            Node::PointFile(g, p, d) => self.store.view(g, d, Some(&p.to_string())),
            _ => return Err(Errno::EISDIR),
        };
        r.map_err(|e| errno(&e))
    }

    fn exists(&self, n: &Node) -> bool {
        match n {
            Node::Root => true,
            Node::Group(g) => self.store.group(g).is_ok(),
            Node::PointDir(g, p) => self.store.point(g, &p.to_string()).is_ok(),
            _ => self.view(n).is_ok(),
        }
    }

    fn attr(&self, ino: u64, n: &Node) -> Result<FileAttr, Errno> {
        let (kind, perm, size) = match n {
            Node::Root | Node::Group(_) => (FileType::Directory, 0o755, 0),
            Node::PointDir(..) => (FileType::Directory, 0o555, 0),
            Node::Head(..) => (FileType::RegularFile, 0o644, self.view(n)?.size),
            Node::PointFile(..) => (FileType::RegularFile, 0o444, self.view(n)?.size),
        };
        if kind == FileType::Directory && !self.exists(n) {
            return Err(Errno::ENOENT);
        }
        let now = SystemTime::now();
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: self.store.chunk_size() as u32,
            flags: 0,
        })
    }

    /// Children of a directory node: (name, node, kind).
    fn children(&self, n: &Node) -> Result<Vec<(String, Node, FileType)>, Errno> {
        let s = &self.store;
        let map = |e: Error| errno(&e);
        Ok(match n {
            Node::Root => s
                .groups()
                .map_err(map)?
                .into_iter()
                .map(|g| (g.name.clone(), Node::Group(g.name), FileType::Directory))
                .collect(),
            Node::Group(g) => {
                let mut v: Vec<_> = s
                    .volumes(Some(g))
                    .map_err(map)?
                    .into_iter()
                    .map(|v| {
                        (
                            v.disk.clone(),
                            Node::Head(g.clone(), v.disk),
                            FileType::RegularFile,
                        )
                    })
                    .collect();
                for p in s.points(g).map_err(map)? {
                    v.push((
                        format!("@{}", p.id),
                        Node::PointDir(g.clone(), p.id),
                        FileType::Directory,
                    ));
                }
                v
            }
            Node::PointDir(g, id) => s
                .point(g, &id.to_string())
                .map_err(map)?
                .volumes
                .into_iter()
                .map(|v| {
                    (
                        v.disk.clone(),
                        Node::PointFile(g.clone(), *id, v.disk),
                        FileType::RegularFile,
                    )
                })
                .collect(),
            _ => return Err(Errno::ENOTDIR),
        })
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<View>, Errno> {
        self.handles
            .lock()
            .unwrap()
            .get(&fh.0)
            .map(|o| o.view.clone())
            .ok_or(Errno::EBADF)
    }

    /// The view of an open file for a request that ends at byte `end`.  A head
    /// that has grown since the file was opened is re-read, so the request sees the
    /// new size; a view of a volume removed (or removed and created again under the
    /// same name) keeps the size it had.
    fn handle_for(&self, fh: FileHandle, end: u64) -> Result<Arc<View>, Errno> {
        let v = self.handle(fh)?;
        if end <= v.size || !v.writable {
            return Ok(v);
        }
        match self.store.refresh(&v) {
            Ok(fresh) if fresh.lineage == v.lineage && fresh.size > v.size => {
                let fresh = Arc::new(fresh);
                if let Some(o) = self.handles.lock().unwrap().get_mut(&fh.0) {
                    o.view = fresh.clone();
                }
                Ok(fresh)
            }
            Ok(_) => Ok(v),
            Err(e) => {
                log::debug!("fuse: refreshing {}: {e}", v.name);
                Ok(v)
            }
        }
    }

    /// Grow the head behind `n` to at least `size` bytes (rounded up to 512, the
    /// volume granularity), as writing past the end of a plain file would.
    fn grow(&self, n: &Node, size: u64) -> Result<(), Errno> {
        let Node::Head(g, d) = n else {
            return Err(Errno::EROFS);
        };
        let size = size.checked_next_multiple_of(512).ok_or(Errno::EFBIG)?;
        match self.store.resize_volume(g, d, size) {
            Ok(_) => Ok(()),
            // Another grower got there first: what counts is the size now.
            Err(_) if self.view(n).is_ok_and(|v| v.size >= size) => Ok(()),
            Err(Error::Invalid(m)) => {
                log::warn!("fuse: growing {g}/{d} to {size}: {m}");
                Err(Errno::EFBIG)
            }
            Err(e) => Err(errno(&e)),
        }
    }
}

/// How long the kernel may keep a node's attributes.
fn attr_ttl(n: &Node) -> &'static Duration {
    match n {
        Node::Head(..) => &HEAD_ATTR_TTL,
        _ => &TTL,
    }
}

impl Filesystem for DrFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(p) = self.node(parent) else {
            return reply.error(Errno::ENOENT);
        };
        let name = name.to_string_lossy();
        let found = match self.children(&p) {
            Ok(c) => c.into_iter().find(|(n, _, _)| *n == name),
            Err(e) => return reply.error(e),
        };
        match found {
            Some((_, node, _)) => {
                let ino = self.ino(node.clone());
                match self.attr(ino, &node) {
                    Ok(a) => reply.entry_with_ttls(attr_ttl(&node), &TTL, &a, Generation(0)),
                    Err(e) => reply.error(e),
                }
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let Some(n) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match self.attr(ino.0, &n) {
            Ok(a) => reply.attr(attr_ttl(&n), &a),
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
        let Some(n) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let a = match self.attr(ino.0, &n) {
            Ok(a) => a,
            Err(e) => return reply.error(e),
        };
        // Truncating up grows the volume; to the current size (as `O_TRUNC` does) is
        // accepted; down is refused: it would discard data.
        let a = match size {
            Some(s) if s < a.size => return reply.error(Errno::EPERM),
            Some(s) if s > a.size => match self.grow(&n, s).and_then(|()| self.attr(ino.0, &n)) {
                Ok(a) => a,
                Err(e) => return reply.error(e),
            },
            _ => a,
        };
        reply.attr(attr_ttl(&n), &a)
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(n) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let view = match self.view(&n) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        let writing = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        if writing && !view.writable {
            return reply.error(Errno::EROFS);
        }
        let fopen = if view.writable {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        let user = format!("a file open in a FUSE mount (pid {})", req.pid());
        // One writer at a time: a replication session or a failback fence
        // holds the head (as NBD refuses it too).
        let lease = match self.store.lease_if(&view, &user, |users| {
            match crate::repl::exclusive_writer(users) {
                Some(u) if writing => Err(crate::Error::Busy(format!(
                    "{} is being written by {u}; a volume takes one writer at a time",
                    view.name
                ))),
                _ => Ok(()),
            }
        }) {
            Ok(l) => l,
            Err(e) => {
                log::warn!("FUSE open of {} refused: {e}", view.name);
                return reply.error(errno(&e));
            }
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let open = OpenFile {
            view: Arc::new(view),
            _lease: lease,
        };
        self.handles.lock().unwrap().insert(fh, open);
        reply.opened(FileHandle(fh), fopen);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let v = match self.handle_for(fh, offset.saturating_add(size as u64)) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        if offset >= v.size {
            return reply.data(&[]);
        }
        let n = (size as u64).min(v.size - offset) as usize;
        let mut buf = vec![0u8; n];
        match self.store.read_into(&v, offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                log::warn!("fuse read {} {offset}+{n}: {e}", v.name);
                reply.error(errno(&e))
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(end) = offset.checked_add(data.len() as u64) else {
            return reply.error(Errno::EFBIG);
        };
        let v = match self.handle_for(fh, end) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        if end > v.size {
            return reply.error(Errno::ENOSPC);
        }
        let sync = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        match self.store.write(&v, offset, data).and_then(|_| {
            if sync {
                self.store.flush()
            } else {
                Ok(())
            }
        }) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
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
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.store.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
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
        let Some(n) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let kids = match self.children(&n) {
            Ok(k) => k,
            Err(e) => return reply.error(e),
        };
        let mut all = vec![
            (".".to_string(), ino.0, FileType::Directory),
            ("..".to_string(), 1, FileType::Directory),
        ];
        for (name, node, kind) in kids {
            all.push((name, self.ino(node), kind));
        }
        for (i, (name, ino, kind)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
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

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let total: u64 = self
            .store
            .volumes(None)
            .map(|v| v.iter().map(|x| x.size).sum())
            .unwrap_or(0);
        let bs = 4096u64;
        reply.statfs(
            total / bs,
            total / bs,
            total / bs,
            0,
            0,
            bs as u32,
            255,
            bs as u32,
        );
    }

    /// Preallocation (mode 0) and zeroing (`ZERO_RANGE`) past the end grow the
    /// volume, as they grow a plain file; within it preallocation has nothing to do
    /// (the store is thin).  `PUNCH_HOLE` trims, ignoring what lies past the end.
    /// Anything else with `KEEP_SIZE` past the end fails with EOPNOTSUPP: the volume
    /// has no room beyond its size to reserve, and reporting success would leave a
    /// caller believing it had.  Other modes (collapse, insert, unshare) fail with
    /// EOPNOTSUPP.
    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        if mode & !(PUNCH | ZERO | KEEP) != 0 || mode & (PUNCH | ZERO) == PUNCH | ZERO {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let Some(end) = offset.checked_add(length) else {
            return reply.error(Errno::EFBIG);
        };
        let mut v = match self.handle_for(fh, end) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        if !v.writable {
            return reply.error(Errno::EROFS);
        }
        if end > v.size && mode & PUNCH == 0 {
            if mode & KEEP != 0 {
                return reply.error(Errno::EOPNOTSUPP);
            }
            let Some(n) = self.node(ino) else {
                return reply.error(Errno::ENOENT);
            };
            v = match self.grow(&n, end).and_then(|()| self.handle_for(fh, end)) {
                Ok(v) if v.size >= end => v,
                Ok(_) => return reply.error(Errno::ENOSPC),
                Err(e) => return reply.error(e),
            };
            log::info!("fuse: fallocate grew {} to {} bytes", v.name, v.size);
        }
        let end = end.min(v.size);
        if mode & (PUNCH | ZERO) == 0 || offset >= end {
            return reply.ok();
        }
        match self.store.zero(&v, offset, end - offset) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let v = match self.handle_for(fh, offset.max(0) as u64 + 1) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return reply.error(Errno::EINVAL);
        }
        if offset < 0 || offset as u64 >= v.size {
            return reply.error(Errno::ENXIO);
        }
        let want_data = whence == libc::SEEK_DATA;
        let mut pos = offset as u64;
        const WINDOW: u64 = 1 << 30;
        while pos < v.size {
            let len = WINDOW.min(v.size - pos);
            let ext = match self.store.extents(&v, pos, len) {
                Ok(e) => e,
                Err(e) => return reply.error(errno(&e)),
            };
            for (o, _, k) in ext {
                if matches!(k, Block::Data(_)) == want_data {
                    return reply.offset(o.max(offset as u64) as i64);
                }
            }
            pos += len;
        }
        if want_data {
            reply.error(Errno::ENXIO)
        } else {
            reply.offset(v.size as i64)
        }
    }
}

/// Mount options every drclone mount uses.
pub fn config() -> fuser::Config {
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        fuser::MountOption::FSName("drclone".into()),
        fuser::MountOption::Subtype("drclone".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    c.n_threads = Some(4);
    c.clone_fd = true;
    c
}

/// Is `dir` a mount point of a drclone FUSE file system (live or stale)?
pub fn is_drclone_mount(dir: &std::path::Path) -> bool {
    let Ok(abs) = std::path::absolute(dir) else {
        return false;
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (src, mp, ty) = (f.next(), f.next(), f.next());
        src == Some("drclone")
            && mp.map(|m| m.replace("\\040", " ")) == Some(abs.display().to_string())
            && ty.is_some_and(|t| t.starts_with("fuse"))
    })
}

/// Mount in the background; the returned session unmounts when dropped.
pub fn spawn(store: Arc<Store>, dir: &std::path::Path) -> crate::Result<fuser::BackgroundSession> {
    if is_drclone_mount(dir) {
        return Err(Error::Exists(format!(
            "a drclone mount on {} (a stale one left by a crash shows \"Transport endpoint is not connected\"): \
             unmount it with `drclone unmount {0}` or `fusermount3 -u {0}`, then mount again",
            dir.display()
        )));
    }
    if !dir.is_dir() {
        return Err(Error::invalid(format!(
            "mount point {} is not a directory",
            dir.display()
        )));
    }
    fuser::spawn_mount(DrFs::new(store), dir, &config()).map_err(|e| Error::io(dir, e))
}

/// Mounts hosted by this process (the daemon hosts mounts made while it runs).
static MOUNTS: Mutex<Vec<(std::path::PathBuf, fuser::BackgroundSession)>> = Mutex::new(Vec::new());

/// Mount and keep the session in this process's registry.
pub fn mount_hosted(store: Arc<Store>, dir: &std::path::Path) -> crate::Result<()> {
    let abs = std::path::absolute(dir).map_err(|e| Error::io(dir, e))?;
    let s = spawn(store, &abs)?;
    MOUNTS.lock().unwrap().push((abs, s));
    Ok(())
}

/// Unmount a mount hosted by this process; false if it hosts none there.
pub fn unmount_hosted(dir: &std::path::Path) -> bool {
    let Ok(abs) = std::path::absolute(dir) else {
        return false;
    };
    let mut m = MOUNTS.lock().unwrap();
    match m.iter().position(|(p, _)| *p == abs) {
        Some(i) => {
            let (_, s) = m.remove(i);
            drop(m);
            if let Err(e) = s.umount_and_join() {
                log::warn!("unmount {}: {e}", abs.display());
            }
            true
        }
        None => false,
    }
}

/// Unmount everything this process hosts (daemon shutdown).
pub fn unmount_all() {
    let all: Vec<_> = std::mem::take(&mut *MOUNTS.lock().unwrap());
    for (p, s) in all {
        if let Err(e) = s.umount_and_join() {
            log::warn!("unmount {}: {e}", p.display());
        }
    }
}

/// Unmount with fusermount3 (a mount of another process, or a stale one).
pub fn fusermount_unmount(dir: &std::path::Path) -> crate::Result<()> {
    let out = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(dir)
        .output()
        .map_err(|e| Error::io("fusermount3", e))?;
    if out.status.success() {
        return Ok(());
    }
    // A stale mount whose process died: detach it lazily.
    let lazy = std::process::Command::new("fusermount3")
        .arg("-uz")
        .arg(dir)
        .output()
        .map_err(|e| Error::io("fusermount3", e))?;
    if lazy.status.success() {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "cannot unmount {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Block until SIGINT/SIGTERM or until `dir` is no longer a drclone mount.
pub fn wait_until_unmounted(dir: &std::path::Path) -> crate::Result<()> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| Error::io("signal handler", e))?;
    }
    while !stop.load(Ordering::Relaxed) && is_drclone_mount(dir) {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
