//! The read and write paths: whole blocks go to chunks and the map, partial
//! blocks to the journal and the overlay, and the destager folds overlay pages
//! into chunks (docs/DESIGN.md §6).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rayon::prelude::*;
use rocksdb::WriteBatch;

use crate::engine::chunks::ChunkStore;
use crate::engine::keys::{self, ChunkId};
use crate::engine::meta::MapVal;
use crate::engine::overlay;
use crate::engine::store::*;
use crate::error::{Error, Result};

#[derive(Default)]
pub(crate) struct Destager {
    running: AtomicBool,
    lock: Mutex<()>,
    /// Writers wake the destager.
    wake: Condvar,
    /// The destager wakes writers waiting at the limit.
    relieved: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Blocks per background destage batch: about 20-40 ms of work on 64 KiB chunks.
/// Which locks make a destage of some blocks safe (see
/// [`Store::destage_locked`]): the gate held exclusively (no writer can be
/// touching any block), or the gate shared while the caller also holds the
/// blocks' stripe locks.
pub(crate) enum Access<'a, 'g> {
    Exclusive(#[allow(dead_code)] &'a Exclusive<'g>),
    Shared(#[allow(dead_code)] &'a Shared<'g>),
}

/// A `J` value: the offset in its segment, and the epoch of the map entry written
/// in the same batch (recovery drops the horizons of entries it deletes).
pub(crate) fn horizon_value(offset: u64, epoch: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&offset.to_be_bytes());
    v[8..].copy_from_slice(&epoch.to_be_bytes());
    v
}

/// The stripe mutex index of a block (1024 stripes).
pub(crate) fn stripe_of(lineage: u64, block: u64) -> usize {
    ((lineage.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block) % STRIPES as u64) as usize
}

pub(crate) const DESTAGE_BATCH: usize = 64;

pub(crate) fn is_zero(b: &[u8]) -> bool {
    // Compare in u128 words: the compiler vectorises this.
    let (pre, mid, post) = unsafe { b.align_to::<u128>() };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

impl Store {
    pub(crate) fn check_range(&self, view: &View, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > view.size) {
            return Err(Error::invalid(format!(
                "range {offset}+{len} is beyond the end of {} ({} bytes)",
                view.name, view.size
            )));
        }
        Ok(())
    }

    /// Read `len` bytes at `offset`.
    pub fn read(&self, view: &View, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_into(view, offset, &mut buf)?;
        Ok(buf)
    }

    /// Read into `buf` at `offset`.
    pub fn read_into(&self, view: &View, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(view, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let cs = self.chunk_size();
        let first = offset / cs;
        let last = (offset + buf.len() as u64 - 1) / cs;
        let count = last - first + 1;
        // The overlay first, then the map: a block leaves the overlay only after its
        // map entry is committed, so this order never misses an acknowledged write.
        let snap = if view.epoch == HEAD_EPOCH {
            self.overlay.snapshot(view.lineage, offset, buf.len(), cs)
        } else {
            overlay::Snapshot::default()
        };
        let blocks = self.resolve(view.lineage, view.epoch, first, count)?;
        // Cache what small (random) reads touch; large reads stream past the cache.
        let keep = (buf.len() as u64) < cs;
        let mut pos = 0usize;
        for (i, blk) in blocks.iter().enumerate() {
            let b = first + i as u64;
            let start = if b == first { offset % cs } else { 0 } as usize;
            let n = ((cs as usize) - start).min(buf.len() - pos);
            let dst = &mut buf[pos..pos + n];
            pos += n;
            if snap.full.contains(&b) {
                continue;
            }
            match blk {
                Block::Hole | Block::Zero => dst.fill(0),
                Block::Data(id) => self.chunks.read_range(id, start, dst, keep)?,
            }
        }
        for (at, bytes) in &snap.pieces {
            buf[*at..*at + bytes.len()].copy_from_slice(bytes);
        }
        Ok(())
    }

    /// Move overlay blocks into the chunk store and block map: all of them (`None`)
    /// or up to `max`, oldest first, in batches of [`DESTAGE_BATCH`] blocks.
    pub fn destage(&self, max: Option<usize>) -> Result<()> {
        if self.overlay.is_empty() {
            return Ok(());
        }
        // Stripes, then the gate: the lock order every writer follows.
        self.destage_keys(&self.overlay.oldest(max.unwrap_or(usize::MAX)))
    }

    /// Destage `keys` with the locks `access` proves are held.  For each block:
    /// base chunk + pages -> one chunk; then the new chunks are made durable
    /// (fdatasync of the packs), then one batch commits their index entries, the
    /// map entries and the blocks' journal horizons; only then do the blocks leave
    /// the overlay.  So a durable map entry or horizon never points at pack bytes
    /// that are not durable, and a horizon is durable exactly when the map entry
    /// that absorbed the pages is (invariants I2 and I3, docs/DESIGN.md §8).
    pub(crate) fn destage_locked(
        &self,
        keys: &[overlay::Key],
        _access: Access<'_, '_>,
    ) -> Result<()> {
        struct Prepared {
            key: overlay::Key,
            epoch: u64,
            /// The new map value, or None when the map already says it.
            val: Option<MapVal>,
            chunk: Option<(ChunkId, crate::engine::meta::ChunkLoc)>,
        }
        let prepared: Vec<Option<Prepared>> = keys
            .par_iter()
            .map(|&key| -> Result<Option<Prepared>> {
                let (l, b) = key;
                let Some(present) = self.overlay.coverage(key) else {
                    return Ok(None);
                };
                // The lineage is read under the gate: a point taken in between
                // would otherwise leave this destage writing into its epoch.
                let Some(lin) = self.lineage(l).filter(|x| x.has_head) else {
                    return Ok(None);
                };
                let cur = self.resolve(l, HEAD_EPOCH, b, 1)?[0];
                // Base content, then the pages over it (no base needed when complete).
                let mut data = match cur {
                    Block::Data(id) if present < self.overlay.pages_per_block() => {
                        self.chunks.get_with(&id, false)?.to_vec()
                    }
                    _ => vec![0u8; self.chunk_size() as usize],
                };
                self.overlay.merge_into(key, &mut data);
                let (val, chunk) = if is_zero(&data) {
                    let v = matches!(cur, Block::Data(_)).then_some(MapVal::Zero);
                    (v, None)
                } else {
                    let (id, loc) = self.chunks.put(&data)?;
                    let v = (cur != Block::Data(id)).then_some(MapVal::Data(id));
                    (v, loc.map(|loc| (id, loc)))
                };
                Ok(Some(Prepared {
                    key,
                    epoch: lin.epoch,
                    val,
                    chunk,
                }))
            })
            .collect::<Result<_>>()?;
        let prepared: Vec<Prepared> = prepared.into_iter().flatten().collect();
        if !prepared.is_empty() {
            // Always: a chunk deduplicated against may be an unflushed write's,
            // not yet durable either (found by tests/powerloss.rs; the sync is a
            // no-op when nothing was appended since the last one).
            self.chunks.sync_packs_recorded()?;
            crate::fail_point!("destage-before-commit");
            // Every record of these blocks starts before this position: their
            // writers needed the locks this destage holds.
            let (seg, off) = self.journal.position();
            let mut batch = WriteBatch::default();
            for p in &prepared {
                let (l, b) = p.key;
                if let Some((id, loc)) = &p.chunk {
                    ChunkStore::index(&mut batch, id, loc);
                }
                if let Some(v) = p.val {
                    batch.put(keys::map(l, b, p.epoch), v.encode());
                }
                batch.put(keys::horizon(seg, l, b), horizon_value(off, p.epoch));
            }
            self.db.write(batch, false)?;
            {
                // Their entries are not yet durable: the next sync point moves these
                // lineages to a new epoch (I11).
                let mut u = self.unflushed.lock().unwrap();
                for p in &prepared {
                    u.insert(p.key.0);
                }
            }
            for p in &prepared {
                self.head_cache.invalidate(p.key);
            }
        }
        // Only now, with the map entries committed, do the blocks leave the overlay.
        for &key in keys {
            if let Some(rel) = self.overlay.remove(key) {
                self.release(rel);
            }
        }
        Ok(())
    }

    /// Destage exactly `keys` (blocks that left the overlay meanwhile are skipped).
    pub(crate) fn destage_keys(&self, keys: &[overlay::Key]) -> Result<()> {
        for batch in keys.chunks(DESTAGE_BATCH) {
            let _stripes = self.lock_keys(batch);
            let g = self.gate.shared();
            self.destage_locked(batch, Access::Shared(&g))?;
        }
        Ok(())
    }

    /// Lock the stripes of `keys` (any lineages), in ascending stripe order.
    pub(crate) fn lock_keys(&self, keys: &[overlay::Key]) -> Vec<MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = keys.iter().map(|&(l, b)| stripe_of(l, b)).collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].lock().unwrap())
            .collect()
    }

    /// Destage the oldest blocks while the overlay holds more than its limit or the
    /// journal is over its size; one writer does it at a time unless the overlay is
    /// far over (then writers wait their turn: back-pressure).
    /// Whether the overlay or the journal is above `num/den` of its limit.  The
    /// journal counts only while the overlay holds something: with the overlay
    /// empty, nothing destaging could do would shrink it (what is left is the
    /// active segment, or dead segments the next trim deletes).
    pub(crate) fn pressure(&self, num: usize, den: usize) -> bool {
        self.overlay.bytes() > self.dirty_limit / den * num
            || (self.journal.bytes() > self.journal_limit / den as u64 * num as u64
                && !self.overlay.is_empty())
    }

    /// Run a background destager (the daemon and `mount` do): it destages the
    /// oldest blocks in small batches from 3/4 of a limit on, so writers rarely
    /// reach the limit, and those that do wait only for the next batch instead of
    /// doing (and queueing behind) large synchronous destages: fio showed
    /// multi-second write stalls without it.  The thread holds only a weak
    /// reference and ends with the store.
    pub fn start_destager(self: &Arc<Self>) {
        if self.bg.running.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("destage".into())
            .spawn(move || loop {
                let Some(s) = weak.upgrade() else { break };
                if !s.bg.running.load(Ordering::SeqCst) {
                    break;
                }
                // Not beside a GC (docs/DESIGN.md §6, "background destager").
                let no_gc = s.gc_lock.try_lock();
                if no_gc.is_ok() && s.pressure(3, 4) && !s.overlay.is_empty() {
                    let res = s
                        .destage(Some(DESTAGE_BATCH))
                        .and_then(|()| s.trim_journal());
                    drop(no_gc);
                    s.bg.relieved.notify_all();
                    if let Err(e) = res {
                        log::warn!("background destage failed (will retry): {e}");
                        drop(s);
                        std::thread::sleep(std::time::Duration::from_secs(1));
                    }
                    continue;
                }
                drop(no_gc);
                s.bg.relieved.notify_all();
                let g = s.bg.lock.lock().unwrap();
                let _ =
                    s.bg.wake
                        .wait_timeout(g, std::time::Duration::from_millis(100))
                        .unwrap();
            });
        match spawned {
            Ok(h) => *self.bg.thread.lock().unwrap() = Some(h),
            Err(e) => {
                log::warn!("no background destager ({e}); writers destage themselves");
                self.bg.running.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Stop the background destager and wait for it (close does this).
    pub fn stop_destager(&self) {
        self.bg.running.store(false, Ordering::SeqCst);
        self.bg.wake.notify_all();
        if let Some(h) = self.bg.thread.lock().unwrap().take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }

    pub(crate) fn relieve(&self) -> Result<()> {
        let over = |slack: usize| self.pressure(4 + slack, 4);
        if self.bg.running.load(Ordering::Relaxed) {
            if !over(0) {
                if self.pressure(3, 4) {
                    self.bg.wake.notify_one();
                }
                return Ok(());
            }
            // At the limit: wait for the destager's next batch (back-pressure).
            // If it makes no progress and the overlay is far over, fall through and
            // destage here (that reports the error, a full disk say).
            self.bg.wake.notify_one();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            let mut g = self.bg.lock.lock().unwrap();
            while over(0) && std::time::Instant::now() < deadline {
                g = self
                    .bg
                    .relieved
                    .wait_timeout(g, std::time::Duration::from_millis(100))
                    .unwrap()
                    .0;
            }
            drop(g);
            if !over(1) {
                return Ok(());
            }
        }
        if !over(0) {
            return Ok(());
        }
        let _one = match self.destaging.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) if !over(1) => return Ok(()),
            Err(_) => self.destaging.lock().unwrap(),
        };
        // One slice per call, so no single request waits long; far over the limit,
        // keep going (the writers behind are waiting on `destaging` anyway).
        loop {
            let n = (self.overlay.len() / 16).max(1);
            let res = self.destage(Some(n)).and_then(|()| self.trim_journal());
            if let Err(e) = res {
                // The write that got here is journaled and in the overlay already:
                // it fails only once the overlay cannot be relieved and is far over
                // its limit (a full disk, say), instead of on the first failed try.
                if over(1) {
                    return Err(e);
                }
                log::warn!("destaging the write-back overlay failed (will retry): {e}");
                break;
            }
            if !over(1) || self.overlay.is_empty() {
                break;
            }
        }
        Ok(())
    }

    pub(crate) fn lock_blocks(
        &self,
        lineage: u64,
        first: u64,
        count: u64,
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = (first..first + count)
            .map(|b| stripe_of(lineage, b))
            .collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].lock().unwrap())
            .collect()
    }

    pub(crate) fn check_writable(&self, view: &View) -> Result<()> {
        if !view.writable {
            return Err(Error::ReadOnly(format!("recovery point {}", view.name)));
        }
        Ok(())
    }

    /// Write `data` at `offset` of a head.
    pub fn write(&self, view: &View, offset: u64, data: &[u8]) -> Result<()> {
        self.db.latch.check()?;
        self.check_writable(view)?;
        self.check_range(view, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.modify(view, offset, data.len() as u64, Some(data))
    }

    /// Make a range read as zeros and free its space (TRIM, WRITE_ZEROES, punch hole).
    pub fn zero(&self, view: &View, offset: u64, len: u64) -> Result<()> {
        self.db.latch.check()?;
        self.check_writable(view)?;
        self.check_range(view, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.modify(view, offset, len, None)
    }

    /// The write path shared by write and zero.  `data == None` writes zeros.
    pub(crate) fn modify(
        &self,
        view: &View,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<()> {
        self.modify_locked(view, offset, len, data)?;
        // Over a limit: destage the oldest blocks (with no block lock held here).
        self.relieve()
    }

    pub(crate) fn modify_locked(
        &self,
        view: &View,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<()> {
        let cs = self.chunk_size();
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        let count = last - first + 1;
        let _locks = self.lock_blocks(view.lineage, first, count);
        let _g = self.gate.shared();
        let lin = self
            .lineage(view.lineage)
            .filter(|l| l.has_head)
            .ok_or_else(|| {
                Error::NotFound(format!("volume {} (removed while in use)", view.name))
            })?;
        // The current map entries: whole blocks need them (to skip unchanged map
        // entries); a partial block looks its entry up only if it must read or zero
        // (so the common small write, page-aligned, does no map lookup at all).
        let current = if count > 1 || len == cs {
            Some(self.resolve(view.lineage, HEAD_EPOCH, first, count)?)
        } else {
            None
        };
        let cur = |i: usize| -> Result<Block> {
            match &current {
                Some(c) => Ok(c[i]),
                None => Ok(self.resolve(view.lineage, HEAD_EPOCH, first + i as u64, 1)?[0]),
            }
        };
        // Whole blocks: (block, index, content); None = zeros.
        let mut blocks: Vec<(u64, usize, Option<&[u8]>)> = Vec::with_capacity(count as usize);
        // Whole blocks that replace overlay pages: void those after the commit.
        let mut replaced = Vec::new();
        let mut pos = 0usize;
        for i in 0..count as usize {
            let b = first + i as u64;
            let start = if i == 0 { (offset % cs) as usize } else { 0 };
            let n = (cs as usize - start).min((len - pos as u64) as usize);
            let piece = data.map(|d| &d[pos..pos + n]);
            pos += n;
            if start == 0 && n == cs as usize {
                if self.overlay.contains((lin.id, b)) {
                    replaced.push(b);
                }
                blocks.push((b, i, piece));
            } else {
                self.write_pages(lin.id, b, || cur(i), start, n, piece)?;
            }
        }
        // Hash, compress, encrypt and store the chunks (in parallel for big writes).
        type Stored = (MapVal, Option<crate::engine::meta::ChunkLoc>);
        let store_one = |content: &Option<&[u8]>| -> Result<Stored> {
            match content {
                Some(c) if !is_zero(c) => {
                    let (id, loc) = self.chunks.put(c)?;
                    Ok((MapVal::Data(id), loc))
                }
                _ => Ok((MapVal::Zero, None)),
            }
        };
        let vals: Vec<Stored> = if blocks.len() >= PARALLEL_BLOCKS {
            blocks
                .par_iter()
                .map(|(_, _, c)| store_one(c))
                .collect::<Result<_>>()?
        } else {
            blocks
                .iter()
                .map(|(_, _, c)| store_one(c))
                .collect::<Result<_>>()?
        };
        // New chunks' index entries and the map versions commit in one batch.
        let mut batch = WriteBatch::default();
        if !replaced.is_empty() {
            // Whole blocks over overlay pages: the blocks' journal horizons go in
            // the same batch, so the pages' records are void exactly when this
            // write is in the map.  The new chunks are made durable first: a
            // durable horizon over a chunk that is not would lose the pages (which
            // a FLUSH may have made durable) along with this write.
            let (seg, off) = self.journal.position();
            for b in &replaced {
                batch.put(
                    keys::horizon(seg, lin.id, *b),
                    horizon_value(off, lin.epoch),
                );
            }
            self.chunks.sync_packs_recorded()?;
        }
        for ((b, i, _), (val, loc)) in blocks.iter().zip(vals) {
            if let (MapVal::Data(id), Some(loc)) = (&val, &loc) {
                ChunkStore::index(&mut batch, id, loc);
            }
            let cur = cur(*i)?;
            match (val, cur) {
                // Zeros over a hole or over zeros: nothing to record.  (Overlay pages
                // of the block never reached the map; dropping them is enough.)
                (MapVal::Zero, Block::Hole | Block::Zero) => {}
                (MapVal::Data(id), Block::Data(old)) if id == old => {}
                (v, _) => batch.put(keys::map(lin.id, *b, lin.epoch), v.encode()),
            }
        }
        let new_versions = batch.len() > 0;
        self.db.write(batch, false)?;
        if new_versions {
            // The next FLUSH moves this lineage to a new epoch (Store::flush).
            self.unflushed.lock().unwrap().insert(lin.id);
        }
        for (b, _, _) in &blocks {
            self.head_cache.invalidate((lin.id, *b));
        }
        for b in replaced {
            if let Some(rel) = self.overlay.remove((lin.id, b)) {
                self.release(rel);
            }
        }
        Ok(())
    }

    /// A write (or zeroing) of `n` bytes at `start` of block `b`, short of the whole
    /// block: whole pages go to the journal and the overlay; the edges of an
    /// unaligned write are first filled from the current content.
    pub(crate) fn write_pages(
        &self,
        lineage: u64,
        b: u64,
        cur: impl Fn() -> Result<Block>,
        start: usize,
        n: usize,
        piece: Option<&[u8]>,
    ) -> Result<()> {
        let key = (lineage, b);
        if piece.is_none()
            && !self.overlay.contains(key)
            && matches!(cur()?, Block::Hole | Block::Zero)
        {
            // Zeroing part of a block that already reads as zeros.
            return Ok(());
        }
        let page = self.overlay.page_size();
        let lo = start / page * page;
        let hi = (start + n).div_ceil(page) * page;
        let mut run = vec![0u8; hi - lo];
        // Edge pages that the write covers only in part start from what is there.
        let mut edges = vec![lo];
        if hi - page != lo {
            edges.push(hi - page);
        }
        for e in edges {
            let covered = start <= e && start + n >= e + page;
            if covered {
                continue;
            }
            let dst = &mut run[e - lo..e - lo + page];
            if !self.overlay.read_page(key, e / page, dst) {
                match cur()? {
                    Block::Data(id) => self.chunks.read_range(&id, e, dst, true)?,
                    Block::Hole | Block::Zero => dst.fill(0),
                }
            }
        }
        if let Some(p) = piece {
            run[start - lo..start - lo + n].copy_from_slice(p);
        } else {
            run[start - lo..start - lo + n].fill(0);
        }
        let seg = self
            .journal
            .append_pages(lineage, b, lo as u32, &run)
            .map_err(|e| {
                // A full disk fails this write only; any other error latches.
                if e.kind() == crate::ErrorKind::NoSpace {
                    e
                } else {
                    self.db.latch.trip(
                        format!(
                            "write to the journal in {}",
                            self.dir.join("journal").display()
                        ),
                        e,
                    )
                }
            })?;
        let rel = self.overlay.put(key, lo, &run, seg);
        self.release(rel);
        Ok(())
    }
}
