//! The write journal: the durable log behind the write-back overlay.
//!
//! Small writes (anything short of a whole block) are acknowledged once they are
//! in the overlay ([`crate::engine::overlay`]) and appended here; FLUSH and FUA then cost
//! one `fdatasync` of the journal instead of hashing, compressing and storing every
//! partly written 64 KiB block (the answer of ZFS's ZIL and BlueStore's deferred
//! writes to small writes into large blocks; docs/DESIGN.md "Small writes").
//!
//! Format: `STORE/journal/SEGMENT.log`, a 24-byte segment header then records:
//!
//! ```text
//! segment header: magic "DRJOURNL" | version u32 | 0 u32 | segment id u64
//! record:         magic "DRJR" | kind u8 | 0 0 0 | crc32 u32 | data len u32
//!                 | lineage u64 | block u64 | offset in block u32 | 0 u32 | data
//! ```
//!
//! All integers big-endian.  Version 2 (written): the CRC covers bytes 4..8 and
//! everything after the CRC, reserved bytes are zero, `kind` 1 = page data is the
//! only kind.  Version 1 (still replayed): the CRC covered only what follows it, and
//! kind 2 was a tombstone.  Which records the block map already holds is said by
//! the journal horizons (`J` keys, [`crate::engine::keys::horizon`]), written in
//! the map entry's own batch.  Replay applies records in order and stops a segment
//! at the first torn or corrupt record.
//!
//! Segments are appended with `write(2)` (a killed process loses nothing that was
//! acknowledged) and rotated at [`SEGMENT_BYTES`].  A segment may be deleted when
//! it and every older segment hold no live page (each page's latest record is
//! counted live until its block is destaged) and the destaged data is synced; the
//! removal is fsynced in the directory before the horizons covering it are dropped.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, IoContext, Result};

pub use crate::engine::format::journal::*;

struct Active {
    id: u64,
    file: Arc<File>,
    size: u64,
    /// Where write-back was last started ([`crate::engine::pack::start_writeback`]).
    flushed: u64,
    /// Rotated segments not yet fdatasync'ed.
    unsynced: Vec<Arc<File>>,
    buf: Vec<u8>,
}

pub struct Journal {
    dir: PathBuf,
    /// Page size: live counts are in pages.
    page: usize,
    /// Rotate segments at this size ([`SEGMENT_BYTES`]; tests use small ones).
    segment_bytes: u64,
    active: Mutex<Active>,
    /// Live pages per segment (every segment on disk has an entry) and its size.
    live: Mutex<BTreeMap<u64, (usize, u64)>>,
    /// Group commit: one fdatasync at a time, and the position (segment, bytes)
    /// the last one made durable.  A FLUSH whose writes an fdatasync that started
    /// after them already covered returns without its own.
    synced: Mutex<(u64, u64)>,
    /// fdatasync calls made (for tests).
    fdatasyncs: std::sync::atomic::AtomicU64,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016}.log"))
}

fn create_segment(dir: &Path, id: u64) -> Result<File> {
    let path = segment_path(dir, id);
    let mut f = OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&path)
        .at(&path)?;
    f.write_all(&segment_header(SEGMENT_VERSION, id))
        .at(&path)?;
    // The new segment's directory entry must be durable before a FLUSH can count
    // on the records in it (an fdatasync of the file does not persist its name).
    File::open(dir).and_then(|d| d.sync_all()).at(dir)?;
    Ok(f)
}

impl Journal {
    /// Open the journal directory: returns the journal, writing to a fresh segment,
    /// and the records of the segments a previous run left (to replay, in order).
    /// The old segments stay on disk, counted live, until the caller has applied
    /// their records, released them ([`Journal::release`]) and trimmed.
    ///
    /// Each record comes with the byte offset where it starts in its segment (its
    /// journal position is `(record.segment, start)`).  New segments get ids above
    /// every existing one and at least `floor`: the store passes one more than the
    /// highest segment any journal horizon (`J` key) names, so a stale horizon can
    /// never cover a record written after it.
    pub fn open(dir: &Path, page: usize, floor: u64) -> Result<(Journal, Vec<(Record, u64)>)> {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).at(dir)?;
            // The directory's own entry must be durable, or a power cut takes every
            // segment with it (found by tests/powerloss.rs).
            if let Some(parent) = dir.parent() {
                File::open(parent).and_then(|d| d.sync_all()).at(parent)?;
            }
        }
        let mut ids = Vec::new();
        for e in std::fs::read_dir(dir).at(dir)? {
            let e = e.at(dir)?;
            let name = e.file_name().to_string_lossy().into_owned();
            match name
                .strip_suffix(".log")
                .and_then(|s| s.parse::<u64>().ok())
            {
                Some(id) => ids.push(id),
                None => log::warn!(
                    "journal {}: ignoring {name} (not a journal segment)",
                    dir.display()
                ),
            }
        }
        ids.sort_unstable();
        let mut records = Vec::new();
        let mut live = BTreeMap::new();
        for &id in &ids {
            let path = segment_path(dir, id);
            let bytes = std::fs::read(&path).at(&path)?;
            let bad = |what: String| Error::Format {
                store: dir.to_path_buf(),
                what: format!("journal segment {}: {what}", path.display()),
            };
            if bytes.len() < SEGMENT_HEADER_LEN {
                // A crash between creating a segment and writing its header.
                log::warn!("journal segment {} is empty; removing it", path.display());
                std::fs::remove_file(&path).at(&path)?;
                continue;
            }
            if bytes[0..8] != SEGMENT_MAGIC {
                return Err(bad("not a drclone journal segment (bad magic)".into()));
            }
            let ver = u32::from_be_bytes(bytes[8..12].try_into().unwrap());
            if ver != SEGMENT_VERSION && ver != SEGMENT_VERSION_V1 {
                return Err(bad(format!(
                    "format version {ver}; this drclone reads versions {SEGMENT_VERSION_V1} and {SEGMENT_VERSION}"
                )));
            }
            let (recs, torn) = decode_segment(id, &bytes);
            let mut start = SEGMENT_HEADER_LEN as u64;
            let recs: Vec<(Record, u64)> = recs
                .into_iter()
                .map(|r| {
                    let at = start;
                    start += (RECORD_HEADER_LEN + r.data.len()) as u64;
                    (r, at)
                })
                .collect();
            if let Some(t) = torn {
                log::warn!(
                    "journal segment {}: replay stops at {t} (a write cut short by a crash \
                     was never acknowledged)",
                    path.display()
                );
            }
            log::info!(
                "journal segment {}: {} record(s) to replay",
                path.display(),
                recs.len()
            );
            let pages = recs
                .iter()
                .filter(|(r, _)| r.kind == KIND_PAGES)
                .map(|(r, _)| r.data.len().div_ceil(page))
                .sum();
            live.insert(id, (pages, bytes.len() as u64));
            records.extend(recs);
        }
        let id = ids.last().map_or(1, |l| l + 1).max(floor).max(1);
        let file = Arc::new(create_segment(dir, id)?);
        live.insert(id, (0, SEGMENT_HEADER_LEN as u64));
        let j = Journal {
            dir: dir.to_path_buf(),
            page,
            segment_bytes: SEGMENT_BYTES,
            active: Mutex::new(Active {
                id,
                file,
                size: SEGMENT_HEADER_LEN as u64,
                flushed: 0,
                unsynced: Vec::new(),
                buf: Vec::with_capacity(RECORD_HEADER_LEN + (64 << 10)),
            }),
            live: Mutex::new(live),
            synced: Mutex::new((0, 0)),
            fdatasyncs: std::sync::atomic::AtomicU64::new(0),
        };
        Ok((j, records))
    }

    fn append(&self, kind: u8, lineage: u64, block: u64, offset: u32, data: &[u8]) -> Result<u64> {
        let mut a = self.active.lock().unwrap();
        if a.size >= self.segment_bytes {
            let id = a.id + 1;
            let f = Arc::new(create_segment(&self.dir, id)?);
            let old = std::mem::replace(&mut a.file, f);
            a.unsynced.push(old);
            a.id = id;
            a.size = SEGMENT_HEADER_LEN as u64;
            a.flushed = 0;
            self.live
                .lock()
                .unwrap()
                .insert(id, (0, SEGMENT_HEADER_LEN as u64));
        }
        let mut buf = std::mem::take(&mut a.buf);
        encode_record(&mut buf, kind, lineage, block, offset, data);
        let res = (&*a.file).write_all(&buf);
        let n = buf.len() as u64;
        a.buf = buf;
        if let Err(e) = res {
            // A partial record is a torn tail; start a new segment for what follows.
            a.size = u64::MAX;
            return Err(Error::io(segment_path(&self.dir, a.id), e));
        }
        a.size += n;
        a.flushed = crate::engine::pack::start_writeback(&a.file, a.flushed, a.size);
        let mut live = self.live.lock().unwrap();
        let e = live.entry(a.id).or_insert((0, 0));
        e.1 = a.size;
        if kind == KIND_PAGES {
            // Counted live before the caller can see the segment id: a rotation
            // right after this can never make the segment look dead.
            e.0 += data.len().div_ceil(self.page);
        }
        Ok(a.id)
    }

    /// The journal's current end: (active segment, bytes in it).  Every record
    /// appended before this call starts before it.
    pub fn position(&self) -> (u64, u64) {
        let a = self.active.lock().unwrap();
        (a.id, a.size)
    }

    /// Rotate segments at `bytes` (tests).
    pub fn set_segment_bytes(&mut self, bytes: u64) {
        self.segment_bytes = bytes.max(SEGMENT_HEADER_LEN as u64 + 1);
    }

    /// Append page data for `block` of `lineage` at byte `offset` of the block;
    /// returns the segment it went to (one live page counted there).
    pub fn append_pages(&self, lineage: u64, block: u64, offset: u32, data: &[u8]) -> Result<u64> {
        self.append(KIND_PAGES, lineage, block, offset, data)
    }

    /// A page recorded in `segment` is no longer live (overwritten or destaged).
    pub fn release(&self, segment: u64, pages: usize) {
        let mut live = self.live.lock().unwrap();
        if let Some(e) = live.get_mut(&segment) {
            e.0 = e.0.saturating_sub(pages);
        }
    }

    /// Make every record appended so far durable.
    pub fn sync(&self) -> Result<()> {
        crate::fail_point!("journal-sync", |_| Err(Error::io(
            segment_path(&self.dir, self.position().0),
            std::io::Error::from_raw_os_error(libc::EIO)
        )));
        // Everything appended before this call ends at `want`.
        let want = {
            let a = self.active.lock().unwrap();
            (a.id, a.size)
        };
        let mut synced = self.synced.lock().unwrap();
        if *synced >= want {
            // An fdatasync that began after our writes has finished meanwhile.
            return Ok(());
        }
        // Whatever was appended up to now rides along with this fdatasync.
        let (files, reached) = {
            let mut a = self.active.lock().unwrap();
            let mut v = std::mem::take(&mut a.unsynced);
            v.push(a.file.clone());
            (v, (a.id, a.size))
        };
        for (i, f) in files.iter().enumerate() {
            self.fdatasyncs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = f.sync_data() {
                // Keep the rotated segments not yet synced for the next attempt.
                let mut a = self.active.lock().unwrap();
                let rest = files[i..files.len() - 1].to_vec();
                a.unsynced.splice(0..0, rest);
                return Err(Error::io(segment_path(&self.dir, reached.0), e));
            }
        }
        *synced = reached;
        Ok(())
    }

    /// Bytes of journal on disk.
    pub fn bytes(&self) -> u64 {
        self.live.lock().unwrap().values().map(|e| e.1).sum()
    }

    /// Segments that may go: the oldest ones, before the active one, with no live
    /// page.
    fn dead_prefix(&self) -> Vec<u64> {
        let active = self.active.lock().unwrap().id;
        self.live
            .lock()
            .unwrap()
            .iter()
            .take_while(|(id, e)| **id < active && e.0 == 0)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Delete the dead prefix of the journal.  `sync` must first make durable
    /// the journal itself, then everything the dead records were destaged into
    /// (packs, then the map).
    ///
    /// The journal, because a record also dies when a later record overwrites
    /// its pages: a power cut must not take both the dead segment and the
    /// unsynced record that superseded it (found by tests/powerloss.rs, seed
    /// 3002).  Every record that released a page of a dead segment was appended
    /// before the release, hence before this call saw the segment dead, so a
    /// sync inside `sync` covers it.  The caller syncs it (not this function)
    /// so that a failed fdatasync trips the store's latch (fsyncgate).
    pub fn trim(&self, sync: impl FnOnce() -> Result<()>) -> Result<Option<u64>> {
        let dead = self.dead_prefix();
        if dead.is_empty() {
            return Ok(None);
        }
        sync()?;
        for id in &dead {
            let path = segment_path(&self.dir, *id);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(path, e)),
            }
            self.live.lock().unwrap().remove(id);
        }
        // The removals durable before the caller drops the horizons that covered
        // these segments' records (a segment that came back after a power loss
        // with its horizons gone would replay stale pages).
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .at(&self.dir)?;
        log::debug!("journal: trimmed {} segment(s)", dead.len());
        Ok(dead.last().copied())
    }

    /// Start over with an empty active segment when nothing is live (clean close:
    /// the caller has destaged and synced everything).
    pub fn reset(&self) -> Result<()> {
        let mut a = self.active.lock().unwrap();
        let mut live = self.live.lock().unwrap();
        if live.values().any(|e| e.0 > 0) {
            return Ok(());
        }
        let id = a.id + 1;
        let f = Arc::new(create_segment(&self.dir, id)?);
        f.sync_data().at(&segment_path(&self.dir, id))?;
        for old in live.keys().copied().collect::<Vec<_>>() {
            let path = segment_path(&self.dir, old);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        // The removals durable before the caller drops the horizons (found by
        // tests/powerloss.rs: after a clean close and a power cut the old segments
        // came back without their horizons and replayed stale pages).
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .at(&self.dir)?;
        live.clear();
        live.insert(id, (0, SEGMENT_HEADER_LEN as u64));
        a.id = id;
        a.file = f;
        a.size = SEGMENT_HEADER_LEN as u64;
        a.flushed = 0;
        a.unsynced.clear();
        Ok(())
    }

    /// Number of segment files on disk (for tests and `df`).
    pub fn segments(&self) -> usize {
        self.live.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_replay_stops_at_a_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("j");
        {
            let (j, old) = Journal::open(&dir, 4096, 0).unwrap();
            assert!(old.is_empty());
            j.append_pages(7, 3, 4096, &[0xab; 4096]).unwrap();
            j.append_pages(7, 3, 0, &[0xcd; 4096]).unwrap();
            j.append_pages(8, 1, 0, &[1; 8192]).unwrap();
            j.sync().unwrap();
        }
        // Tear the last record in half.
        let seg = segment_path(&dir, 1);
        let len = std::fs::metadata(&seg).unwrap().len();
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len - 100).unwrap();
        let (j, recs) = Journal::open(&dir, 4096, 0).unwrap();
        assert_eq!(recs.len(), 2, "the torn record is not replayed");
        assert_eq!(
            recs[0].1, SEGMENT_HEADER_LEN as u64,
            "positions start after the header"
        );
        assert_eq!(
            recs[1].1,
            (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 4096) as u64
        );
        let recs: Vec<Record> = recs.into_iter().map(|r| r.0).collect();
        assert_eq!(
            (recs[0].kind, recs[0].lineage, recs[0].block, recs[0].offset),
            (KIND_PAGES, 7, 3, 4096)
        );
        assert_eq!(recs[0].data, vec![0xab; 4096]);
        assert_eq!((recs[1].kind, recs[1].offset), (KIND_PAGES, 0));
        // The old segment counts one live page until released and trimmed.
        assert_eq!(j.segments(), 2);
        assert_eq!(j.trim(|| Ok(())).unwrap(), None);
        j.release(1, 2);
        let mut synced = false;
        assert_eq!(
            j.trim(|| {
                synced = true;
                Ok(())
            })
            .unwrap(),
            Some(1)
        );
        assert!(synced, "trim syncs before it deletes");
        assert!(!seg.exists());
    }

    #[test]
    fn version_1_segments_still_replay_and_a_flipped_kind_is_caught() {
        let rec = |v: u32, kind: u8, data: &[u8]| {
            let mut b = Vec::new();
            encode_record_v(&mut b, v, kind, 3, 9, 0, data);
            b
        };
        // Version 1, as an earlier drclone left it: pages, then a tombstone.
        let mut v1 = segment_header(SEGMENT_VERSION_V1, 5).to_vec();
        v1.extend(rec(1, KIND_PAGES, &[7; 4096]));
        v1.extend(rec(1, KIND_TOMBSTONE, &[]));
        let (recs, stop) = decode_segment(5, &v1);
        assert_eq!(stop, None);
        assert_eq!(
            recs.iter().map(|r| r.kind).collect::<Vec<_>>(),
            vec![KIND_PAGES, KIND_TOMBSTONE]
        );
        // Version 2: the kind is under the CRC; pages flipped to a tombstone (the
        // flip the fuzz target found going unnoticed in version 1) are refused.
        let mut v2 = segment_header(SEGMENT_VERSION, 6).to_vec();
        v2.extend(rec(2, KIND_PAGES, &[7; 4096]));
        assert_eq!(decode_segment(6, &v2).0.len(), 1);
        v2[SEGMENT_HEADER_LEN + 4] = KIND_TOMBSTONE;
        let (recs, stop) = decode_segment(6, &v2);
        assert!(recs.is_empty());
        assert!(stop.unwrap().contains("CRC"));
        // Non-zero reserved bytes under a valid CRC are refused too.
        let mut r = rec(2, KIND_PAGES, &[1; 512]);
        r[37] = 1;
        let crc = {
            let mut h = crc32fast::Hasher::new();
            h.update(&r[4..8]);
            h.update(&r[12..]);
            h.finalize()
        };
        r[8..12].copy_from_slice(&crc.to_be_bytes());
        let mut seg = segment_header(SEGMENT_VERSION, 7).to_vec();
        seg.extend(r);
        assert!(decode_segment(7, &seg).1.unwrap().contains("reserved"));
    }

    #[test]
    fn a_flush_syncs_what_was_appended_and_only_that() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), 4096, 0).unwrap();
        j.set_segment_bytes(SEGMENT_HEADER_LEN as u64 + 3 * (RECORD_HEADER_LEN as u64 + 4096));
        let n = |j: &Journal| j.fdatasyncs.load(std::sync::atomic::Ordering::Relaxed);
        j.append_pages(1, 1, 0, &[1; 4096]).unwrap();
        j.sync().unwrap();
        assert_eq!(n(&j), 1);
        j.sync().unwrap();
        assert_eq!(n(&j), 1, "nothing new: no second fdatasync");
        j.append_pages(1, 2, 0, &[2; 4096]).unwrap();
        j.sync().unwrap();
        assert_eq!(n(&j), 2, "a new record is synced");
        // Across a rotation both the old and the new segment are synced.
        for b in 3..7 {
            j.append_pages(1, b, 0, &[3; 4096]).unwrap();
        }
        assert!(j.segments() >= 2);
        j.sync().unwrap();
        assert_eq!(n(&j), 4);
    }

    #[test]
    fn corrupt_record_stops_replay_and_a_foreign_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("j");
        {
            let (j, _) = Journal::open(&dir, 4096, 0).unwrap();
            j.append_pages(1, 1, 0, &[5; 4096]).unwrap();
            j.append_pages(1, 2, 0, &[6; 4096]).unwrap();
        }
        let seg = segment_path(&dir, 1);
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 10] ^= 1; // first record's data
        std::fs::write(&seg, &bytes).unwrap();
        let (_, recs) = Journal::open(&dir, 4096, 0).unwrap();
        assert!(recs.is_empty(), "nothing after a corrupt record is trusted");
        std::fs::write(segment_path(&dir, 99), b"definitely not a journal segment").unwrap();
        let err = Journal::open(&dir, 4096, 0)
            .err()
            .expect("foreign segment refused");
        let msg = err.to_string();
        assert!(
            msg.contains("0000000000000099.log") && msg.contains("bad magic"),
            "{msg}"
        );
    }

    #[test]
    fn rotation_and_tail_only_advances_past_dead_segments() {
        let d = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(d.path(), 4096, 0).unwrap();
        let big = vec![9u8; 1 << 20];
        let mut segs = Vec::new();
        for b in 0..(SEGMENT_BYTES / (1 << 20)) * 2 + 4 {
            segs.push(j.append_pages(1, b, 0, &big).unwrap());
        }
        let first = segs[0];
        let second = *segs.iter().find(|s| **s != first).unwrap();
        assert!(j.segments() >= 3);
        // Release everything in the second segment only: the first still pins it.
        for s in segs.iter().filter(|s| **s == second) {
            j.release(*s, 256);
        }
        assert_eq!(j.trim(|| Ok(())).unwrap(), None);
        for s in segs.iter().filter(|s| **s == first) {
            j.release(*s, 256);
        }
        assert_eq!(j.trim(|| Ok(())).unwrap(), Some(second));
    }
}
