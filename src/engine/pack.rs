//! Pack files: append-only containers of chunk records, behind a narrow backend.
//!
//! A pack is written once, front to back, then sealed and never changed again: the
//! backend interface is "put (stream a new pack, then seal it), ranged get, delete,
//! list".  [`LocalPacks`] keeps packs as files under `STORE/packs/`; an object-store
//! backend can buffer a pack and upload it whole on seal.
//!
//! # File format (frozen; version 1)
//!
//! ```text
//! pack header (32 bytes)
//!   0..8   magic   = BLAKE3("drclone pack file v1")[0..8]
//!   8..12  version = 1 (u32 BE)
//!   12..16 reserved (0)
//!   16..24 pack id (u64 BE)
//!   24..32 reserved (0)
//! record (56-byte header, then payload), repeated
//!   0..4   magic   = BLAKE3("drclone pack record v1")[0..4]
//!   4      codec flags (compression, encryption)
//!   5..8   reserved (0)
//!   8..12  raw (plaintext) length (u32 BE)
//!   12..16 stored payload length (u32 BE)
//!   16..20 CRC-32C of the payload (u32 BE)
//!   20..24 reserved (0)
//!   24..56 chunk id
//!   56..   payload
//! ```
//! The chunk id in each record makes a pack self-describing: the index can be
//! rebuilt from packs, and the recovery scan can tell a torn tail from a good record.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub use crate::engine::format::pack::*;
use crate::error::{Error, IoContext, Result};

/// Streams one new pack.  Appends go to the end; a [`PackSync`] from
/// [`PackWriter::syncer`] makes them durable without holding the writer.
pub trait PackWriter: Send {
    /// Append bytes; returns the offset they start at.
    fn append(&mut self, data: &[u8]) -> Result<u64>;
    /// Append several buffers back to back (a record's header and payload without
    /// copying them together); returns the offset the first starts at.
    fn append_parts(&mut self, parts: &[&[u8]]) -> Result<u64> {
        self.append(&parts.concat())
    }
    /// A handle that makes everything appended to this pack up to the moment it is
    /// called durable.  FLUSH takes it under the open-pack lock and syncs after
    /// releasing the lock, so appends never wait for a flush's fsync, and a pack
    /// that rotates meanwhile is still synced (docs/DESIGN.md §8, "FLUSH").
    fn syncer(&self) -> Arc<dyn PackSync>;
    /// Bytes written so far.
    fn len(&self) -> u64;
    /// Make the pack durable and immutable; returns its sealed length in bytes,
    /// which the caller keeps in the pack's record (so nothing later needs to ask
    /// the backend for it).
    fn seal(self: Box<Self>) -> Result<u64>;
}

/// Makes a pack's appends durable (see [`PackWriter::syncer`]).
pub trait PackSync: Send + Sync {
    /// fdatasync (or the backend's equivalent) of everything appended so far;
    /// returns at once when nothing was appended since the last sync.  Returns the
    /// pack's length in bytes known durable.
    fn sync(&self) -> Result<u64>;
    /// What to name in an error or a latch message (the pack's path).
    fn describe(&self) -> String;
}

/// Storage of immutable packs.
pub trait PackBackend: Send + Sync {
    /// Start writing a new pack with this id.
    fn create(&self, id: u64) -> Result<Box<dyn PackWriter>>;
    /// Read `buf.len()` bytes at `offset`; a short pack is an error.
    fn read_at(&self, id: u64, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Read into `head` then `tail`, back to back from `offset` (a record's header
    /// and payload in one call where the backend can).
    fn read_at2(&self, id: u64, offset: u64, head: &mut [u8], tail: &mut [u8]) -> Result<()> {
        self.read_at(id, offset, head)?;
        self.read_at(id, offset + head.len() as u64, tail)
    }
    /// Current length, or None if the pack does not exist.
    fn len(&self, id: u64) -> Result<Option<u64>>;
    /// Make an existing pack's bytes durable (recovery seals packs a crash left
    /// open; nothing else syncs a pack after its writer is gone).  A missing pack
    /// is not an error.
    fn sync(&self, id: u64) -> Result<()>;
    /// Remove a pack.  Readers that already hold it may finish.
    fn delete(&self, id: u64) -> Result<()>;
    /// Every pack id present.
    fn list(&self) -> Result<Vec<u64>>;
    /// Bytes the packs occupy.
    fn bytes(&self) -> Result<u64>;
    /// The catalog uploader of a backend that keeps the store's metadata beside
    /// its packs (the object store, docs/DESIGN.md §20b); None for local packs.
    fn catalog(&self) -> Option<&crate::engine::s3::catalog::Uploader> {
        None
    }
    /// Like [`PackBackend::read_at`], but past any cache the backend keeps of
    /// remote data (`verify` checks what is really stored).
    fn read_at_fresh(&self, id: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_at(id, offset, buf)
    }
    /// Where a pack lives, for messages: a file path or an object URL.
    fn locate(&self, id: u64) -> String {
        format!("pack {id}")
    }
    /// Check that a sealed pack is stored whole (at least `len` bytes, its `K`
    /// record's sealed length; a write that failed with ENOSPC may have left
    /// bytes past it): `None` if it is, else what is wrong, naming where it lives.
    fn check_sealed(&self, id: u64, len: u64) -> Result<Option<String>> {
        Ok(match self.len(id)? {
            Some(l) if l >= len => None,
            Some(l) => Some(format!(
                "{} holds {l} bytes, less than its sealed length {len}",
                self.locate(id)
            )),
            None => Some(format!("{} is missing", self.locate(id))),
        })
    }
    /// Packs sealed but not yet in their final home (an object store's upload
    /// backlog); `None` for backends that have none.
    fn backlog(&self) -> Option<Backlog> {
        None
    }
}

/// The upload backlog of a backend that stages packs locally (see
/// [`PackBackend::backlog`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Backlog {
    /// Where packs go, e.g. `s3://bucket/prefix`.
    pub target: String,
    /// Sealed packs not yet uploaded.
    pub packs: u64,
    /// Their bytes plus the open pack's (what counts against `bound_bytes`).
    pub bytes: u64,
    /// Age in seconds of the oldest sealed pack not yet uploaded.
    pub oldest_seconds: Option<u64>,
    /// Writes fail with ENOSPC once `bytes` would pass this.
    pub bound_bytes: u64,
    /// The last upload error, while uploads are failing.
    pub last_error: Option<String>,
    /// The catalog checkpoints in the bucket (docs/DESIGN.md §20b).
    pub catalog: Option<crate::engine::s3::catalog::CatalogStatus>,
}

/// Packs as files under one directory.
pub struct LocalPacks {
    dir: PathBuf,
    handles: RwLock<HashMap<u64, Arc<File>>>,
}

const MAX_HANDLES: usize = 512;

impl LocalPacks {
    pub fn new(dir: &Path) -> Result<LocalPacks> {
        std::fs::create_dir_all(dir).at(dir)?;
        Ok(LocalPacks {
            dir: dir.to_path_buf(),
            handles: RwLock::new(HashMap::new()),
        })
    }

    pub fn path(&self, id: u64) -> PathBuf {
        self.dir
            .join(format!("{:02x}", id & 0xff))
            .join(format!("{id:016x}.pack"))
    }

    /// An open read handle of a pack, cached.  A pack that does not exist is
    /// [`Error::PackGone`].  A handle is cached only while its file still exists,
    /// checked under the same lock `delete` holds while it unlinks, so a reader
    /// racing a delete can never leave a deleted pack open (and its space held).
    fn handle(&self, id: u64) -> Result<Arc<File>> {
        if let Some(f) = self.handles.read().unwrap().get(&id) {
            return Ok(f.clone());
        }
        let path = self.path(id);
        let f = match File::open(&path) {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::PackGone { pack: id })
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let mut h = self.handles.write().unwrap();
        if !path.exists() {
            return Err(Error::PackGone { pack: id });
        }
        if h.len() >= MAX_HANDLES {
            h.clear();
        }
        h.insert(id, f.clone());
        Ok(f)
    }
}

struct LocalWriter {
    file: Arc<File>,
    path: PathBuf,
    len: u64,
    /// Where write-back was last started (see [`start_writeback`]).
    flushed: u64,
    sync: Arc<LocalSync>,
}

/// [`PackSync`] of a local pack file.
struct LocalSync {
    file: Arc<File>,
    path: PathBuf,
    /// Bytes appended, and bytes known durable.
    appended: std::sync::atomic::AtomicU64,
    synced: std::sync::atomic::AtomicU64,
}

impl PackSync for LocalSync {
    fn sync(&self) -> Result<u64> {
        use std::sync::atomic::Ordering;
        let target = self.appended.load(Ordering::SeqCst);
        let done = self.synced.load(Ordering::SeqCst);
        if done >= target {
            return Ok(done);
        }
        crate::fail_point!("pack-sync", |_| Err(Error::io(
            &self.path,
            std::io::Error::from_raw_os_error(libc::EIO)
        )));
        self.file.sync_data().at(&self.path)?;
        self.synced.fetch_max(target, Ordering::SeqCst);
        Ok(target)
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Start write-back of what was appended since `from` once 8 MiB have gathered,
/// without waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, what RocksDB's
/// `bytes_per_sync` does).  The disk then drains appends as they come, and a later
/// fsync (FLUSH, sealing, a journal trim) waits for a short tail instead of a pack's
/// worth of dirty pages: perf and fio showed multi-second write stalls behind such
/// fsyncs.  Returns the new start.
pub fn start_writeback(file: &File, from: u64, to: u64) -> u64 {
    use std::os::fd::AsRawFd;
    const STEP: u64 = 8 << 20;
    if to < from + STEP {
        return from;
    }
    // SAFETY: a plain syscall on an open fd; errors only mean no early write-back.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from as libc::off64_t,
            (to - from) as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
    to
}

impl PackWriter for LocalWriter {
    fn append(&mut self, data: &[u8]) -> Result<u64> {
        self.append_parts(&[data])
    }
    fn append_parts(&mut self, parts: &[&[u8]]) -> Result<u64> {
        let off = self.len;
        let mut at = off;
        crate::fail_point!("pack-write", |arg: Option<String>| Err(Error::io(
            &self.path,
            std::io::Error::from_raw_os_error(if arg.as_deref() == Some("enospc") {
                libc::ENOSPC
            } else {
                libc::EIO
            })
        )));
        for p in parts {
            self.file.write_all_at(p, at).at(&self.path)?;
            at += p.len() as u64;
        }
        self.len = at;
        self.sync
            .appended
            .store(at, std::sync::atomic::Ordering::SeqCst);
        self.flushed = start_writeback(&self.file, self.flushed, self.len);
        Ok(off)
    }
    fn syncer(&self) -> Arc<dyn PackSync> {
        self.sync.clone()
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn seal(self: Box<Self>) -> Result<u64> {
        crate::fail_point!("pack-seal", |_| Err(Error::io(
            &self.path,
            std::io::Error::from_raw_os_error(libc::EIO)
        )));
        self.file.sync_all().at(&self.path)?;
        Ok(self.len)
    }
}

impl PackBackend for LocalPacks {
    fn create(&self, id: u64) -> Result<Box<dyn PackWriter>> {
        let path = self.path(id);
        let parent = path.parent().unwrap().to_path_buf();
        if !parent.is_dir() {
            std::fs::create_dir_all(&parent).at(&parent)?;
            // A new fan-out directory: its entry in packs/ must be durable too.
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .at(&self.dir)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .at(&path)?;
        let file = Arc::new(file);
        let mut w = LocalWriter {
            sync: Arc::new(LocalSync {
                file: file.clone(),
                path: path.clone(),
                appended: Default::default(),
                synced: Default::default(),
            }),
            file,
            path,
            len: 0,
            flushed: 0,
        };
        w.append(&pack_header(id))?;
        // The directory entry must be durable before anything points into the pack.
        File::open(&parent).and_then(|d| d.sync_all()).at(&parent)?;
        Ok(Box::new(w))
    }

    fn read_at(&self, id: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let f = self.handle(id)?;
        crate::fail_point!("pack-read", |_| Err(Error::io(
            self.path(id),
            std::io::Error::from_raw_os_error(libc::EIO)
        )));
        f.read_exact_at(buf, offset)
            .map_err(|e| Error::io(self.path(id), e))
    }

    fn read_at2(&self, id: u64, offset: u64, head: &mut [u8], tail: &mut [u8]) -> Result<()> {
        use std::os::fd::AsRawFd;
        let f = self.handle(id)?;
        let (hl, tl) = (head.len(), tail.len());
        let mut done = 0usize;
        while done < hl + tl {
            // One preadv for both; on a short read, go on from where it stopped.
            let (h, t) = if done < hl {
                (&mut head[done..], &mut tail[..])
            } else {
                (&mut head[hl..], &mut tail[done - hl..])
            };
            let iov = [
                libc::iovec {
                    iov_base: h.as_mut_ptr().cast(),
                    iov_len: h.len(),
                },
                libc::iovec {
                    iov_base: t.as_mut_ptr().cast(),
                    iov_len: t.len(),
                },
            ];
            // SAFETY: both iovecs point into live, exclusively borrowed buffers of
            // the stated lengths; the fd stays open while `f` is held.
            let n = unsafe {
                libc::preadv(
                    f.as_raw_fd(),
                    iov.as_ptr(),
                    2,
                    (offset + done as u64) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => {
                    return Err(Error::io(
                        self.path(id),
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ))
                }
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(Error::io(self.path(id), e));
                    }
                }
            }
        }
        Ok(())
    }

    fn locate(&self, id: u64) -> String {
        self.path(id).display().to_string()
    }

    fn len(&self, id: u64) -> Result<Option<u64>> {
        let path = self.path(id);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    fn sync(&self, id: u64) -> Result<()> {
        let path = self.path(id);
        match File::open(&path) {
            Ok(f) => f.sync_all().at(&path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(path, e)),
        }
        // Its name too: the directory fsync at creation may have failed (or
        // never run, after a kill), and recovery calls this before it seals.
        for dir in [path.parent().unwrap(), self.dir.as_path()] {
            File::open(dir).and_then(|d| d.sync_all()).at(dir)?;
        }
        Ok(())
    }

    fn delete(&self, id: u64) -> Result<()> {
        // Under the handle lock: see `handle`.
        let mut h = self.handles.write().unwrap();
        h.remove(&id);
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    fn list(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for sub in std::fs::read_dir(&self.dir).at(&self.dir)? {
            let sub = sub.at(&self.dir)?.path();
            if !sub.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&sub).at(&sub)? {
                let name = f.at(&sub)?.file_name();
                let name = name.to_string_lossy();
                if let Some(hex) = name.strip_suffix(".pack") {
                    if let Ok(id) = u64::from_str_radix(hex, 16) {
                        out.push(id);
                    }
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn bytes(&self) -> Result<u64> {
        let mut total = 0;
        for id in self.list()? {
            total += self.len(id)?.unwrap_or(0);
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_are_derived_from_their_descriptions() {
        let p = blake3::hash(b"drclone pack file v1");
        assert_eq!(&p.as_bytes()[..8], &PACK_MAGIC);
        let r = blake3::hash(b"drclone pack record v1");
        assert_eq!(&r.as_bytes()[..4], &RECORD_MAGIC);
    }

    #[test]
    fn records_round_trip_and_short_headers_error() {
        let rec = record(&[5; 32], 3, 100, b"payload");
        let h = RecordHeader::decode(&rec).unwrap();
        assert_eq!(h.id, [5; 32]);
        assert_eq!(h.stored_len, 7);
        assert_eq!(h.crc, crc(b"payload"));
        assert!(RecordHeader::decode(&rec[..10]).is_err());
        let mut bad = rec.clone();
        bad[0] ^= 1;
        assert!(RecordHeader::decode(&bad).unwrap_err().contains("magic"));
    }

    #[test]
    fn local_backend_writes_reads_lists_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalPacks::new(dir.path()).unwrap();
        let mut w = b.create(300).unwrap();
        let off = w.append(b"abc").unwrap();
        assert_eq!(off, PACK_HEADER_LEN as u64);
        w.seal().unwrap();
        let mut buf = [0u8; 3];
        b.read_at(300, off, &mut buf).unwrap();
        assert_eq!(&buf, b"abc");
        assert_eq!(b.list().unwrap(), vec![300]);
        assert!(
            b.read_at(300, off + 1, &mut buf).is_err(),
            "short read errors"
        );
        b.delete(300).unwrap();
        assert_eq!(b.len(300).unwrap(), None);
        assert!(b.list().unwrap().is_empty());
    }
}
