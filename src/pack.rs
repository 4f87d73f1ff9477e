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

use crate::error::{Error, IoContext, Result};
use crate::keys::ChunkId;

/// `BLAKE3("drclone pack file v1")[0..8]`; never change it.
pub const PACK_MAGIC: [u8; 8] = [0x5b, 0x09, 0x66, 0xde, 0x39, 0xa9, 0xb9, 0x1e];
/// `BLAKE3("drclone pack record v1")[0..4]`; never change it.
pub const RECORD_MAGIC: [u8; 4] = [0xe4, 0x64, 0x6c, 0xcd];
pub const PACK_VERSION: u32 = 1;
pub const PACK_HEADER_LEN: usize = 32;
pub const RECORD_HEADER_LEN: usize = 56;

/// A record header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub flags: u8,
    pub raw_len: u32,
    pub stored_len: u32,
    pub crc: u32,
    pub id: ChunkId,
}

impl RecordHeader {
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0..4].copy_from_slice(&RECORD_MAGIC);
        h[4] = self.flags;
        h[8..12].copy_from_slice(&self.raw_len.to_be_bytes());
        h[12..16].copy_from_slice(&self.stored_len.to_be_bytes());
        h[16..20].copy_from_slice(&self.crc.to_be_bytes());
        h[24..56].copy_from_slice(&self.id);
        h
    }

    pub fn decode(h: &[u8]) -> std::result::Result<RecordHeader, String> {
        if h.len() < RECORD_HEADER_LEN {
            return Err(format!("record header truncated to {} bytes", h.len()));
        }
        if h[0..4] != RECORD_MAGIC {
            return Err("record magic is wrong (not a chunk record)".into());
        }
        Ok(RecordHeader {
            flags: h[4],
            raw_len: u32::from_be_bytes(h[8..12].try_into().unwrap()),
            stored_len: u32::from_be_bytes(h[12..16].try_into().unwrap()),
            crc: u32::from_be_bytes(h[16..20].try_into().unwrap()),
            id: h[24..56].try_into().unwrap(),
        })
    }
}

pub fn crc(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}

/// The header of one chunk's record.
pub fn record_header(
    id: &ChunkId,
    flags: u8,
    raw_len: u32,
    payload: &[u8],
) -> [u8; RECORD_HEADER_LEN] {
    RecordHeader {
        flags,
        raw_len,
        stored_len: payload.len() as u32,
        crc: crc(payload),
        id: *id,
    }
    .encode()
}

/// Build the whole record (header + payload) for one chunk.
pub fn record(id: &ChunkId, flags: u8, raw_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD_HEADER_LEN + payload.len());
    r.extend_from_slice(&record_header(id, flags, raw_len, payload));
    r.extend_from_slice(payload);
    r
}

pub fn pack_header(id: u64) -> [u8; PACK_HEADER_LEN] {
    let mut h = [0u8; PACK_HEADER_LEN];
    h[0..8].copy_from_slice(&PACK_MAGIC);
    h[8..12].copy_from_slice(&PACK_VERSION.to_be_bytes());
    h[16..24].copy_from_slice(&id.to_be_bytes());
    h
}

/// Streams one new pack.  Appends go to the end; `sync` makes them durable.
pub trait PackWriter: Send {
    /// Append bytes; returns the offset they start at.
    fn append(&mut self, data: &[u8]) -> Result<u64>;
    /// Append several buffers back to back (a record's header and payload without
    /// copying them together); returns the offset the first starts at.
    fn append_parts(&mut self, parts: &[&[u8]]) -> Result<u64> {
        self.append(&parts.concat())
    }
    /// Make everything appended so far durable.
    fn sync(&mut self) -> Result<()>;
    /// Bytes written so far.
    fn len(&self) -> u64;
    /// Make the pack durable and immutable.
    fn seal(self: Box<Self>) -> Result<()>;
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
    /// Remove a pack.  Readers that already hold it may finish.
    fn delete(&self, id: u64) -> Result<()>;
    /// Every pack id present.
    fn list(&self) -> Result<Vec<u64>>;
    /// Bytes the packs occupy.
    fn bytes(&self) -> Result<u64>;
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

    fn handle(&self, id: u64) -> Result<Arc<File>> {
        if let Some(f) = self.handles.read().unwrap().get(&id) {
            return Ok(f.clone());
        }
        let path = self.path(id);
        let f = Arc::new(File::open(&path).at(&path)?);
        let mut h = self.handles.write().unwrap();
        if h.len() >= MAX_HANDLES {
            h.clear();
        }
        h.insert(id, f.clone());
        Ok(f)
    }
}

struct LocalWriter {
    file: File,
    path: PathBuf,
    len: u64,
    /// Where write-back was last started (see [`start_writeback`]).
    flushed: u64,
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
        for p in parts {
            self.file.write_all_at(p, at).at(&self.path)?;
            at += p.len() as u64;
        }
        self.len = at;
        self.flushed = start_writeback(&self.file, self.flushed, self.len);
        Ok(off)
    }
    fn sync(&mut self) -> Result<()> {
        self.file.sync_data().at(&self.path)
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn seal(self: Box<Self>) -> Result<()> {
        self.file.sync_all().at(&self.path)
    }
}

impl PackBackend for LocalPacks {
    fn create(&self, id: u64) -> Result<Box<dyn PackWriter>> {
        let path = self.path(id);
        let parent = path.parent().unwrap().to_path_buf();
        std::fs::create_dir_all(&parent).at(&parent)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .at(&path)?;
        let mut w = LocalWriter {
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

    fn len(&self, id: u64) -> Result<Option<u64>> {
        let path = self.path(id);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    fn delete(&self, id: u64) -> Result<()> {
        self.handles.write().unwrap().remove(&id);
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
