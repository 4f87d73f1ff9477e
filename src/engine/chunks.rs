//! The chunk store: content-addressed, deduplicated, compressed, optionally
//! encrypted chunks in append-only packs, indexed in RocksDB.
//!
//! * `C|id -> ChunkLoc` says where a chunk's record is; `R|pack|offset -> id` is the
//!   reverse index that GC compaction and crash recovery walk pack by pack;
//!   `K|pack -> PackRec` says whether a pack is sealed.
//! * One pack is open for appends at a time.  When it reaches the target size it is
//!   fsynced and sealed and a new one is opened.
//! * Durability: [`ChunkStore::sync`] fsyncs the open pack, then the RocksDB WAL,
//!   so pack bytes are durable no later than the index and map entries that point
//!   at them.  Between syncs, a power loss can leave index entries pointing past the
//!   end of an unsealed pack; [`ChunkStore::open`] validates every record of every
//!   unsealed pack against its CRC and drops index entries that do not check out, so
//!   a phantom chunk is never deduplicated against or served.  Every read also
//!   checks the chunk against its content address (or GCM tag).
//! * GC safety: see [`crate::engine::gc`].  While a GC runs, every chunk a writer stores or
//!   deduplicates against is first recorded in the `touched` set, and the sweep
//!   deletes nothing touched; both happen under one mutex, so a writer either
//!   touches a chunk before the sweep looks, or finds it already gone from the index
//!   and stores a fresh copy.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rocksdb::WriteBatch;

use crate::engine::codec::{self, Codec};
use crate::engine::keys::{self, ChunkId};
use crate::engine::meta::{ChunkLoc, Db, PackRec};
use crate::engine::pack::{self, PackBackend, PackWriter, RecordHeader, RECORD_HEADER_LEN};
use crate::error::{Error, Result};

struct OpenPack {
    id: u64,
    writer: Box<dyn PackWriter>,
}

/// A chunk received from elsewhere (replication), for
/// [`ChunkStore::put_received`].
pub struct Received<'a> {
    /// The id the sender claims for it (checked against `data`).
    pub id: ChunkId,
    /// Its plaintext (borrowed from the frame it came in, when it came raw).
    pub data: std::borrow::Cow<'a, [u8]>,
    /// The zstd frame it arrived as, which the caller decompressed into
    /// `data`: kept as the stored payload (no second compression) when the
    /// store is unencrypted.  Give it only for a store that compresses with
    /// zstd (a store made with `--compression none` or `lz4` stores its own
    /// encoding).
    pub zstd: Option<&'a [u8]>,
}

/// What [`ChunkStore::sync_packs`] made durable of the pack that was open.
#[must_use]
pub struct Durable(Option<(u64, u64)>);

/// Totals over the chunk index.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ChunkStats {
    pub chunks: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
}

/// Seals full packs on a background thread so writers never wait for the disk.
/// `seal_all` (used by FLUSH) seals whatever is still queued and waits for a seal
/// in progress, so a flush still covers every full pack.
struct Sealer {
    db: Arc<Db>,
    queue: Mutex<Vec<OpenPack>>,
    wake: std::sync::Condvar,
    sealing: Mutex<()>,
    stop: std::sync::atomic::AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Sealer {
    fn start(db: Arc<Db>) -> Arc<Sealer> {
        let s = Arc::new(Sealer {
            db,
            queue: Mutex::new(Vec::new()),
            wake: std::sync::Condvar::new(),
            sealing: Mutex::new(()),
            stop: std::sync::atomic::AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let t = s.clone();
        let h = std::thread::Builder::new()
            .name("pack-sealer".into())
            .spawn(move || {
                use std::sync::atomic::Ordering;
                while !t.stop.load(Ordering::Acquire) {
                    {
                        let q = t.queue.lock().unwrap();
                        if q.is_empty() && !t.stop.load(Ordering::Acquire) {
                            drop(t.wake.wait(q).unwrap());
                        }
                    }
                    if let Err(e) = t.seal_all() {
                        // The latch is tripped: every later write and flush fails.
                        log::error!("sealing a full pack failed: {e}");
                        break;
                    }
                }
            })
            .expect("spawn pack sealer");
        *s.thread.lock().unwrap() = Some(h);
        s
    }

    /// Stop the thread (it drops its reference to the database).
    fn shutdown(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        {
            let _q = self.queue.lock().unwrap();
            self.wake.notify_all();
        }
        if let Some(h) = self.thread.lock().unwrap().take() {
            let _ = h.join();
        }
    }

    fn push(&self, p: OpenPack) {
        let mut q = self.queue.lock().unwrap();
        q.push(p);
        self.wake.notify_one();
    }

    /// Seal every queued pack: fsync it, then record it sealed with its length.
    /// A failure trips the store's latch (fsyncgate: the pack's acknowledged
    /// records may be lost, and a later fsync that succeeds would prove nothing).
    fn seal_all(&self) -> Result<()> {
        let _s = self.sealing.lock().unwrap();
        loop {
            self.db.latch.check()?;
            let Some(p) = self.queue.lock().unwrap().pop() else {
                return Ok(());
            };
            let id = p.id;
            let what = p.writer.syncer().describe();
            let len = p
                .writer
                .seal()
                .map_err(|e| self.db.latch.trip(format!("fsync sealing pack {what}"), e))?;
            let mut b = WriteBatch::default();
            b.put(keys::pack(id), PackRec::sealed(len).encode());
            b.delete(keys::durable(id));
            self.db.write(b, false)?;
            log::debug!("sealed pack {id} ({len} bytes)");
        }
    }
}

/// Cache capacity in chunks: `DRCLONE_CACHE_MIB` (default 1 GiB).
fn cache_items(chunk_size: u64) -> usize {
    crate::util::env_budget("DRCLONE_CACHE_MIB", 1024, chunk_size, 16)
}

impl Drop for ChunkStore {
    fn drop(&mut self) {
        self.sealer.shutdown();
        if let Err(e) = self.sealer.seal_all() {
            log::error!("sealing full packs at close: {e}");
        }
    }
}

pub struct ChunkStore {
    db: Arc<Db>,
    pub codec: Codec,
    pub backend: Arc<dyn PackBackend>,
    store: PathBuf,
    open: Mutex<Option<OpenPack>>,
    sealer: Arc<Sealer>,
    touched: Mutex<Option<HashSet<ChunkId>>>,
    /// Chunks a replication cycle relies on before any map entry references
    /// them (it said it holds them, or received them): GC's sweep spares them.
    /// Counted, since two cycles may pin one chunk.  Taken after `touched`.
    pins: Mutex<std::collections::HashMap<ChunkId, u32>>,
    /// Chunks lost in the crash this open recovered from (see `take_lost`).
    lost: Mutex<Vec<ChunkId>>,
    /// The `D` value last written per open pack (see `sync_packs_recorded`).
    durable_written: Mutex<std::collections::HashMap<u64, u64>>,
    pack_target: u64,
    /// Verified plaintext of recently read chunks.  Chunks are immutable by id, so
    /// the cache is never stale.  Size: `DRCLONE_CACHE_MIB` (default 1024).
    cache: quick_cache::sync::Cache<ChunkId, Arc<Vec<u8>>>,
    /// Index locations of recently read chunks, so a read of a cached location
    /// skips the RocksDB lookup (perf: 11% of a sequential read).  Safe without
    /// invalidation because packs are append-only and deleted whole, never reused:
    /// a cached location either still holds the chunk's record (the header names
    /// the id, the CRC covers the payload) or its pack is gone ([`Error::PackGone`]), and
    /// then the reader drops the entry and asks the index.  Compaction and sweep
    /// drop what they move or delete anyway.  `DRCLONE_LOC_CACHE_MIB` (default
    /// 24: about 262,000 entries, 16 GiB of 64 KiB chunks).
    locs: quick_cache::sync::Cache<ChunkId, ChunkLoc>,
}

impl ChunkStore {
    /// Open the chunk store, validating and sealing any pack left unsealed by a crash.
    pub fn open(
        db: Arc<Db>,
        codec: Codec,
        backend: Arc<dyn PackBackend>,
        store: PathBuf,
        pack_target: u64,
        chunk_size: u64,
        writable: bool,
    ) -> Result<ChunkStore> {
        let cs = ChunkStore {
            db: db.clone(),
            codec,
            backend,
            store,
            open: Mutex::new(None),
            sealer: Sealer::start(db.clone()),
            touched: Mutex::new(None),
            pins: Mutex::new(Default::default()),
            lost: Mutex::new(Vec::new()),
            durable_written: Mutex::new(Default::default()),
            pack_target,
            cache: quick_cache::sync::Cache::new(cache_items(chunk_size)),
            locs: quick_cache::sync::Cache::new(crate::util::env_budget(
                "DRCLONE_LOC_CACHE_MIB",
                24,
                96, // bytes an entry costs, roughly
                1024,
            )),
        };
        if writable {
            cs.recover()?;
        }
        Ok(cs)
    }

    fn missing(&self, id: &ChunkId) -> Error {
        self.corrupt(
            id,
            0,
            0,
            "is referenced by a volume map but missing from the chunk index",
        )
    }

    fn corrupt(&self, id: &ChunkId, pack: u64, offset: u64, what: impl Into<String>) -> Error {
        Error::Corrupt {
            store: self.store.clone(),
            chunk: codec::hex(id),
            pack,
            offset,
            what: what.into(),
        }
    }

    /// Validate every record of every unsealed pack, drop index entries that a
    /// crash left dangling, and seal the pack.
    fn recover(&self) -> Result<()> {
        let mut lost = Vec::new();
        // After a latched run, trust only what a sync covered (`D`); after a kill
        // or a power cut, what the pack file holds is what the disk or the page
        // cache has, and the fsync below makes it durable before the pack is
        // called sealed.
        let strict = crate::engine::latch::was_latched(&self.store);
        for (k, v) in self.db.scan_prefix(&[keys::PACK])? {
            let Some(pack) = keys::parse_pack(&k) else {
                continue;
            };
            if PackRec::decode(&v).is_some_and(|r| r.sealed) {
                continue;
            }
            let file = self.backend.len(pack)?;
            let len = file.unwrap_or(0);
            // Trust only what a successful sync covered (the `D` key), where one
            // was recorded: pages past it may be gone even if the page cache still
            // shows them (a restart after a failed sync).  Packs written before
            // `D` keys existed have none: then the file's length.
            let limit = match self.db.get(&keys::durable(pack))? {
                Some(v) if v.len() == 8 && strict => {
                    len.min(u64::from_be_bytes(v[..].try_into().unwrap()))
                }
                _ => len,
            };
            let mut batch = WriteBatch::default();
            batch.delete(keys::durable(pack));
            let mut dropped = 0u64;
            for (rk, rv) in self.db.scan_prefix(&keys::reverse_prefix(pack))? {
                let Some((_, off)) = keys::parse_reverse(&rk) else {
                    continue;
                };
                let id: ChunkId = match rv[..].try_into() {
                    Ok(id) => id,
                    Err(_) => continue,
                };
                if self.check_record(pack, off, limit, &id).is_err() {
                    batch.delete(rk);
                    if let Some(loc) = self.loc(&id)? {
                        if loc.pack == pack && loc.offset == off {
                            batch.delete(keys::chunk(&id));
                            batch.put(keys::lost(&id), [1u8]);
                            lost.push(id);
                        }
                    }
                    dropped += 1;
                }
            }
            // What was validated may be only in the page cache (after kill -9, or
            // a restart without a reboot): make it durable before calling the pack
            // sealed, since sealed packs are never synced again (found by
            // tests/faults.rs).
            // Nothing of it is durable (no file: a cut between the record and
            // the file's creation; or no byte ever synced before the latch
            // tripped): no record survived the check either, and the pack goes,
            // or verify would report a sealed pack the disk does not hold.
            let keep = file.is_some() && limit > 0;
            if keep {
                self.backend.sync(pack).map_err(|e| {
                    self.db
                        .latch
                        .trip(format!("fsync of pack {pack} at recovery"), e)
                })?;
                // Sealed at what is trusted: after a latched run the bytes past
                // `D` may never reach the disk, though the page cache shows them.
                batch.put(keys::pack(pack), PackRec::sealed(limit).encode());
            } else {
                batch.delete(keys::pack(pack));
            }
            self.db.write(batch, true)?;
            if !keep && file.is_some() {
                if let Err(e) = self.backend.delete(pack) {
                    log::warn!(
                        "store {}: removing empty pack {pack}: {e}",
                        self.store.display()
                    );
                }
            }
            if dropped > 0 {
                log::warn!(
                    "store {}: pack {pack} lost {dropped} chunk(s) not made durable before a crash; \
                     their index entries were dropped (they belonged to writes no FLUSH had covered)",
                    self.store.display()
                );
            } else {
                log::info!(
                    "store {}: sealed pack {pack} left open by an unclean stop",
                    self.store.display()
                );
            }
        }
        *self.lost.lock().unwrap() = lost;
        Ok(())
    }

    /// Chunks whose records did not survive the crash this open recovered from
    /// (their index entries were dropped).  Only unflushed whole-block writes can
    /// reference them (invariant I2: everything else syncs its chunks before it
    /// points at them); the store repairs those map entries at open.
    ///
    /// Includes the chunks an earlier open recorded (`Q` keys) but was cut
    /// before it repaired their map entries.
    pub(crate) fn take_lost(&self) -> Result<Vec<ChunkId>> {
        let mut lost = std::mem::take(&mut *self.lost.lock().unwrap());
        for (k, _) in self.db.scan_prefix(&[keys::LOST])? {
            if let Ok(id) = ChunkId::try_from(&k[1..]) {
                if !lost.contains(&id) {
                    lost.push(id);
                }
            }
        }
        Ok(lost)
    }

    /// Read and check one record's header and payload CRC.
    fn check_record(
        &self,
        pack: u64,
        off: u64,
        len: u64,
        id: &ChunkId,
    ) -> std::result::Result<(), String> {
        if off + RECORD_HEADER_LEN as u64 > len {
            return Err("record header beyond end of pack".into());
        }
        let mut h = [0u8; RECORD_HEADER_LEN];
        self.backend
            .read_at(pack, off, &mut h)
            .map_err(|e| e.to_string())?;
        let h = RecordHeader::decode(&h)?;
        if &h.id != id {
            return Err("record holds a different chunk".into());
        }
        let end = off + RECORD_HEADER_LEN as u64 + h.stored_len as u64;
        if end > len {
            return Err("record payload beyond end of pack".into());
        }
        let mut p = vec![0u8; h.stored_len as usize];
        self.backend
            .read_at(pack, off + RECORD_HEADER_LEN as u64, &mut p)
            .map_err(|e| e.to_string())?;
        if pack::crc(&p) != h.crc {
            return Err("payload CRC mismatch".into());
        }
        Ok(())
    }

    pub fn loc(&self, id: &ChunkId) -> Result<Option<ChunkLoc>> {
        Ok(self
            .db
            .get(&keys::chunk(id))?
            .and_then(|v| ChunkLoc::decode(&v)))
    }

    /// Record that a writer is using `id` (only while a GC runs).
    fn touch(&self, id: &ChunkId) {
        if let Some(set) = self.touched.lock().unwrap().as_mut() {
            set.insert(*id);
        }
    }

    /// Store a chunk (or find it already stored); returns its id.  The index
    /// entries of a new chunk go into `batch`, which the caller commits together
    /// with the map entries that reference it (one RocksDB write per request).
    /// Returns the id, and the location if the chunk is new: the caller must add it
    /// with [`ChunkStore::index`] to the batch it commits.
    pub fn put(&self, data: &[u8]) -> Result<(ChunkId, Option<ChunkLoc>)> {
        let id = self.codec.id(data);
        Ok((id, self.put_known(&id, data, None)?))
    }

    /// [`ChunkStore::put`] of a chunk whose id `id` the caller computed with
    /// this store's codec.  `zstd`: a zstd frame that decompresses to `data`,
    /// stored as the payload in an unencrypted store instead of compressing
    /// again.  Returns the location if the chunk is new.
    fn put_known(
        &self,
        id: &ChunkId,
        data: &[u8],
        zstd: Option<&[u8]>,
    ) -> Result<Option<ChunkLoc>> {
        self.touch(id);
        if self.db.get(&keys::chunk(id))?.is_some() {
            return Ok(None);
        }
        let (flags, payload) = match zstd {
            Some(z) if !self.codec.encrypted() && z.len() < data.len() => {
                (codec::FLAG_ZSTD, std::borrow::Cow::Borrowed(z))
            }
            _ => self.codec.encode(id, data),
        };
        let hdr = pack::record_header(id, flags, data.len() as u32, &payload);
        let loc = self.append_record(
            flags,
            data.len() as u32,
            payload.len() as u32,
            &[&hdr, &payload],
        )?;
        Ok(Some(loc))
    }

    /// Add a new chunk's index entries (`C` and `R`) to a batch.
    pub fn index(batch: &mut WriteBatch, id: &ChunkId, loc: &ChunkLoc) {
        batch.put(keys::chunk(id), loc.encode());
        batch.put(keys::reverse(loc.pack, loc.offset), id);
    }

    /// Append an encoded record to the open pack; returns where it went.
    fn append_record(
        &self,
        flags: u8,
        raw_len: u32,
        stored_len: u32,
        rec: &[&[u8]],
    ) -> Result<ChunkLoc> {
        let (pack, offset) = {
            let mut open = self.open.lock().unwrap();
            if open.is_none() {
                *open = Some(self.new_pack()?);
            }
            let op = open.as_mut().unwrap();
            let offset = op.writer.append_parts(rec).map_err(|e| {
                // A full disk fails this write only; any other error latches.
                if e.kind() == crate::ErrorKind::NoSpace {
                    e
                } else {
                    self.db.latch.trip(
                        format!("write to pack {}", op.writer.syncer().describe()),
                        e,
                    )
                }
            })?;
            let pack = op.id;
            let rotated = op.writer.len() >= self.pack_target;
            if rotated {
                self.sealer.push(open.take().unwrap());
            }
            (pack, offset)
        };
        Ok(ChunkLoc {
            pack,
            offset,
            stored_len,
            raw_len,
            flags,
        })
    }

    /// fsync and mark sealed every full pack (waiting for a seal in progress).
    fn seal_full(&self) -> Result<()> {
        self.sealer.seal_all()
    }

    fn new_pack(&self) -> Result<OpenPack> {
        let mut batch = WriteBatch::default();
        let id = self.db.next_counter("pack", &mut batch)?;
        batch.put(keys::pack(id), PackRec::open().encode());
        batch.put(keys::durable(id), 0u64.to_be_bytes());
        // The pack record must be durable before the pack file exists, so recovery
        // always knows about an unsealed pack.
        self.db.write(batch, true)?;
        crate::fail_point!("new-pack-before-file", |_| Err(Error::io(
            "failpoint new-pack-before-file",
            std::io::Error::other("injected")
        )));
        let writer = self.backend.create(id).map_err(|e| {
            if e.kind() == crate::ErrorKind::NoSpace {
                e
            } else {
                self.db.latch.trip(format!("creating pack {id}"), e)
            }
        })?;
        log::debug!("opened pack {id}");
        Ok(OpenPack { id, writer })
    }

    /// Read a chunk's plaintext, checking its integrity (or from the cache).
    pub fn get(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>> {
        self.get_with(id, true)
    }

    /// Like [`ChunkStore::get`]; `keep` says whether a miss is worth caching.  Large
    /// sequential reads pass false: they would only churn the cache (and fault in
    /// fresh memory for every chunk) for data that is not read again soon.
    pub fn get_with(&self, id: &ChunkId, keep: bool) -> Result<Arc<Vec<u8>>> {
        if let Some(c) = self.cache.get(id) {
            return Ok(c);
        }
        let data = Arc::new(self.get_uncached(id)?);
        if keep {
            self.cache.insert(*id, data.clone());
        }
        Ok(data)
    }

    /// The location of a chunk a map references: from the location cache, or
    /// (always on a retry, `fresh`) the index.  A retry must not trust the cache:
    /// another reader that looked the chunk up before a compaction moved it may
    /// have put the old location back after this reader dropped it.
    fn hot_loc(&self, id: &ChunkId, fresh: bool) -> Result<ChunkLoc> {
        if !fresh {
            if let Some(l) = self.locs.get(id) {
                return Ok(l);
            }
        }
        let l = self.loc(id)?.ok_or_else(|| self.missing(id))?;
        self.locs.insert(*id, l);
        Ok(l)
    }

    fn get_uncached(&self, id: &ChunkId) -> Result<Vec<u8>> {
        for attempt in 0..2 {
            let loc = self.hot_loc(id, attempt > 0)?;
            match self.read_loc_checked(id, &loc, false) {
                // A GC compaction may have moved the chunk between the index lookup
                // and the read; look it up again once.
                Err(Error::PackGone { .. }) if attempt == 0 => {
                    self.locs.remove(id);
                }
                other => return other,
            }
        }
        unreachable!()
    }

    /// Read and decode the record at `loc`, checking the content against its
    /// address (what `verify` uses).
    pub fn read_loc(&self, id: &ChunkId, loc: &ChunkLoc) -> Result<Vec<u8>> {
        self.read_loc_checked(id, loc, true)
    }

    fn truncated(&self, id: &ChunkId, loc: &ChunkLoc, e: Error) -> Error {
        match e {
            Error::Io { ref source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof => {
                self.corrupt(id, loc.pack, loc.offset, "pack is truncated")
            }
            e => e,
        }
    }

    /// Read from a pack; `fresh` reads past the backend's cache (`verify`).
    fn backend_read(&self, fresh: bool, pack: u64, off: u64, buf: &mut [u8]) -> Result<()> {
        if fresh {
            self.backend.read_at_fresh(pack, off, buf)
        } else {
            self.backend.read_at(pack, off, buf)
        }
    }

    /// Read a record's header and check it against the index.
    fn read_header(&self, id: &ChunkId, loc: &ChunkLoc, fresh: bool) -> Result<RecordHeader> {
        let mut hdr = [0u8; RECORD_HEADER_LEN];
        self.backend_read(fresh, loc.pack, loc.offset, &mut hdr)
            .map_err(|e| self.truncated(id, loc, e))?;
        self.check_header(id, loc, &hdr)
    }

    fn check_header(&self, id: &ChunkId, loc: &ChunkLoc, hdr: &[u8]) -> Result<RecordHeader> {
        let h =
            RecordHeader::decode(&hdr).map_err(|w| self.corrupt(id, loc.pack, loc.offset, w))?;
        if &h.id != id || h.stored_len != loc.stored_len || h.flags != loc.flags {
            return Err(self.corrupt(
                id,
                loc.pack,
                loc.offset,
                "record header disagrees with the index",
            ));
        }
        Ok(h)
    }

    /// Read a record's payload into `buf` (exactly `stored_len` bytes) and check
    /// its CRC.
    fn read_payload(
        &self,
        id: &ChunkId,
        loc: &ChunkLoc,
        crc: u32,
        buf: &mut [u8],
        fresh: bool,
    ) -> Result<()> {
        self.backend_read(fresh, loc.pack, loc.offset + RECORD_HEADER_LEN as u64, buf)
            .map_err(|e| self.truncated(id, loc, e))?;
        if pack::crc(buf) != crc {
            return Err(self.corrupt(id, loc.pack, loc.offset, "payload CRC mismatch"));
        }
        Ok(())
    }

    /// Read and decode the record at `loc`.  Every read checks the header and the
    /// payload CRC; `check_hash` also re-hashes a plain chunk's content.
    fn read_loc_checked(&self, id: &ChunkId, loc: &ChunkLoc, check_hash: bool) -> Result<Vec<u8>> {
        // `verify` (check_hash) reads past the backend's cache of remote data.
        let h = self.read_header(id, loc, check_hash)?;
        let mut payload = vec![0u8; loc.stored_len as usize];
        self.read_payload(id, loc, h.crc, &mut payload, check_hash)?;
        self.codec
            .decode_checked(id, h.flags, payload, loc.raw_len as usize, check_hash)
            .map_err(|w| self.corrupt(id, loc.pack, loc.offset, w))
    }

    /// Copy bytes `start..start + dst.len()` of a chunk into `dst`: from the cache,
    /// or (for reads that stream past the cache) decoded straight into `dst` when
    /// it wants the whole chunk, which saves a buffer and a copy per chunk.
    pub fn read_range(&self, id: &ChunkId, start: usize, dst: &mut [u8], keep: bool) -> Result<()> {
        if let Some(c) = self.cache.get(id) {
            dst.copy_from_slice(&c[start..start + dst.len()]);
            return Ok(());
        }
        if keep || self.codec.encrypted() || start != 0 {
            let c = self.get_with(id, keep)?;
            dst.copy_from_slice(&c[start..start + dst.len()]);
            return Ok(());
        }
        for attempt in 0..2 {
            let loc = self.hot_loc(id, attempt > 0)?;
            if loc.raw_len as usize != dst.len() {
                let c = self.get_with(id, keep)?;
                dst.copy_from_slice(&c[..dst.len()]);
                return Ok(());
            }
            let raw = loc.flags & crate::engine::codec::FLAG_COMPRESSION_MASK == 0
                && loc.stored_len == loc.raw_len;
            if raw {
                // Stored raw: header and payload in one preadv, the payload straight
                // into `dst`.
                let mut hdr = [0u8; RECORD_HEADER_LEN];
                let r = self
                    .backend
                    .read_at2(loc.pack, loc.offset, &mut hdr, dst)
                    .map_err(|e| self.truncated(id, &loc, e))
                    .and_then(|()| self.check_header(id, &loc, &hdr))
                    .and_then(|h| {
                        if pack::crc(dst) != h.crc {
                            return Err(self.corrupt(
                                id,
                                loc.pack,
                                loc.offset,
                                "payload CRC mismatch",
                            ));
                        }
                        Ok(())
                    });
                match r {
                    Err(Error::PackGone { .. }) if attempt == 0 => {
                        self.locs.remove(id);
                    }
                    other => return other,
                }
                continue;
            }
            let r = self.read_header(id, &loc, false).and_then(|h| {
                let mut payload = vec![0u8; loc.stored_len as usize];
                self.read_payload(id, &loc, h.crc, &mut payload, false)?;
                self.codec
                    .decompress_into(h.flags, &payload, dst)
                    .map_err(|w| self.corrupt(id, loc.pack, loc.offset, w))
            });
            match r {
                Err(Error::PackGone { .. }) if attempt == 0 => {
                    self.locs.remove(id);
                }
                other => return other,
            }
        }
        unreachable!()
    }

    /// Make every chunk stored so far durable (packs only, not the metadata).
    ///
    /// The open pack is looked at FIRST, then the queue of full packs is sealed,
    /// then the pack that was open is synced: a pack that rotates at any moment
    /// of this is either sealed from the queue or synced through its handle, so no
    /// record appended before the call is left behind (hypothesis 6 of issue 9:
    /// sealing first and taking the open pack after missed a pack rotated in
    /// between).  Failures trip the latch.
    /// [`ChunkStore::sync_packs`], and the open pack's durable length recorded
    /// (`D` key) before the caller commits anything that points at those bytes.
    /// The `D` writes are serialised and only ever grow, so WAL order keeps a
    /// pack's recorded length at least what any later batch relies on.
    pub fn sync_packs_recorded(&self) -> Result<()> {
        let Durable(d) = self.sync_packs()?;
        if let Some((id, len)) = d {
            let mut last = self.durable_written.lock().unwrap();
            let e = last.entry(id).or_insert(0);
            if len > *e {
                let mut b = WriteBatch::default();
                b.put(keys::durable(id), len.to_be_bytes());
                self.db.write(b, false)?;
                *e = len;
            }
        }
        Ok(())
    }

    /// Make the packs durable (see the doc above); prefer
    /// [`ChunkStore::sync_packs_recorded`] before committing references.
    pub(crate) fn sync_packs(&self) -> Result<Durable> {
        self.db.latch.check()?;
        let open = self
            .open
            .lock()
            .unwrap()
            .as_ref()
            .map(|o| (o.id, o.writer.syncer()));
        crate::fail_point!("flush-between-open-and-seal");
        self.seal_full()?;
        match open {
            Some((id, s)) => {
                let len = s.sync().map_err(|e| {
                    self.db
                        .latch
                        .trip(format!("fdatasync of pack {}", s.describe()), e)
                })?;
                Ok(Durable(Some((id, len))))
            }
            None => Ok(Durable(None)),
        }
    }
    /// Make every chunk stored so far durable, then the metadata that points at it
    /// (packs before the WAL: a durable index or map entry never points at pack
    /// bytes that are not).
    pub fn sync(&self) -> Result<()> {
        self.sync_packs_recorded()?;
        self.db.sync_wal()
    }
    /// Seal the open pack (on shutdown, or before compaction).
    pub fn seal_open(&self) -> Result<()> {
        self.seal_full()?;
        if let Some(op) = self.open.lock().unwrap().take() {
            let what = op.writer.syncer().describe();
            let len = op
                .writer
                .seal()
                .map_err(|e| self.db.latch.trip(format!("fsync sealing pack {what}"), e))?;
            let mut b = WriteBatch::default();
            b.put(keys::pack(op.id), PackRec::sealed(len).encode());
            b.delete(keys::durable(op.id));
            self.db.write(b, true)?;
        }
        Ok(())
    }
    /// Packs whose record says they are not sealed (the open pack, full packs
    /// waiting for the sealer).
    pub fn unsealed_packs(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for (k, v) in self.db.scan_prefix(&[keys::PACK])? {
            if let (Some(id), Some(rec)) = (keys::parse_pack(&k), PackRec::decode(&v)) {
                if !rec.sealed {
                    out.push(id);
                }
            }
        }
        Ok(out)
    }

    pub fn open_pack_id(&self) -> Option<u64> {
        self.open.lock().unwrap().as_ref().map(|o| o.id)
    }

    // ---- GC support -------------------------------------------------------------

    pub(crate) fn begin_gc(&self) {
        *self.touched.lock().unwrap() = Some(HashSet::new());
    }

    pub(crate) fn end_gc(&self) {
        *self.touched.lock().unwrap() = None;
    }

    /// Delete the index entries of `dead` chunks that no writer touched since the GC
    /// began.  Returns the (pack, stored bytes) of what was deleted.
    pub(crate) fn sweep(&self, dead: &[(ChunkId, ChunkLoc)]) -> Result<Vec<(u64, u64)>> {
        let guard = self.touched.lock().unwrap();
        let touched = guard.as_ref().expect("sweep runs inside a GC");
        // Held until the deletions are written: a pin either comes first (and
        // spares the chunk) or finds it gone.
        let pins = self.pins.lock().unwrap();
        let mut batch = WriteBatch::default();
        let mut freed = Vec::new();
        for (id, loc) in dead {
            if touched.contains(id) || pins.contains_key(id) {
                continue;
            }
            batch.delete(keys::chunk(id));
            batch.delete(keys::reverse(loc.pack, loc.offset));
            self.locs.remove(id);
            freed.push((loc.pack, RECORD_HEADER_LEN as u64 + loc.stored_len as u64));
        }
        self.db.write(batch, false)?;
        drop(pins);
        drop(guard);
        Ok(freed)
    }

    /// Pin `ids` against GC and say which are stored (`true`) and which the
    /// caller must send.  A chunk reported stored stays until [`ChunkStore::unpin`]
    /// (a replication cycle pins what it references until its commit).
    pub fn pin_and_check(&self, ids: &[ChunkId]) -> Result<Vec<bool>> {
        let mut pins = self.pins.lock().unwrap();
        for id in ids {
            *pins.entry(*id).or_default() += 1;
        }
        let mut have = Vec::with_capacity(ids.len());
        for id in ids {
            have.push(self.db.get(&keys::chunk(id))?.is_some());
        }
        crate::fail_point!("pin-after-check");
        Ok(have)
    }

    /// Pin `ids` (chunks just received), counted like [`ChunkStore::pin_and_check`].
    pub fn pin(&self, ids: &[ChunkId]) {
        let mut pins = self.pins.lock().unwrap();
        for id in ids {
            *pins.entry(*id).or_default() += 1;
        }
    }

    /// Drop one pin of each of `ids`.
    pub fn unpin(&self, ids: &[ChunkId]) {
        let mut pins = self.pins.lock().unwrap();
        for id in ids {
            if let Some(n) = pins.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(id);
                }
            }
        }
    }

    /// Store chunks received from elsewhere (replication): each is stored (or
    /// found) and its index entries committed, so a later cycle finds it even
    /// if this one never commits.  Not synced: like an unflushed NBD write's
    /// chunk, a record a power cut loses has its index entry dropped at the
    /// next open (the unsealed-pack check, I12), and nothing durable
    /// references it, since whatever references it first syncs every pack (a
    /// point's creation does: DESIGN §8 I1, §18).  Returns the ids, pinned
    /// (the caller unpins after its commit).  Every chunk's data is hashed (in parallel) against
    /// its claimed id: one that hashes to another id is refused
    /// (Error::Invalid) and nothing of the batch is stored or indexed.
    pub fn put_received(&self, chunks: &[Received<'_>]) -> Result<Vec<ChunkId>> {
        use rayon::prelude::*;
        if let Some((claimed, id)) = chunks
            .par_iter()
            .map(|c| (c.id, self.codec.id(&c.data)))
            .find_any(|(claimed, id)| claimed != id)
        {
            return Err(crate::error::Error::invalid(format!(
                "received chunk {} does not match its data (it hashes to {})",
                crate::util::hex(&claimed),
                crate::util::hex(&id)
            )));
        }
        let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        self.pin(&ids);
        let r = (|| {
            let mut batch = WriteBatch::default();
            let mut seen = HashSet::new();
            for c in chunks {
                if !seen.insert(c.id) {
                    continue;
                }
                if let Some(loc) = self.put_known(&c.id, &c.data, c.zstd)? {
                    Self::index(&mut batch, &c.id, &loc);
                }
            }
            // Appended, not indexed yet: the window GC's pack phase must not
            // run in (the caller holds the shared gate).
            crate::fail_point!("received-before-index");
            self.db.write(batch, false)
        })();
        if let Err(e) = r {
            self.unpin(&ids);
            return Err(e);
        }
        Ok(ids)
    }

    /// Copy the live records of a sealed pack into the open pack, make the copies
    /// durable, only then repoint the index at them (invariant I2: an index entry
    /// never points at pack bytes that are not durable), then delete the old pack.
    /// Returns bytes moved.  Readers keep using the old copies until the repoint.
    pub(crate) fn compact(&self, pack: u64) -> Result<u64> {
        let mut moved = 0u64;
        let mut stale = WriteBatch::default();
        let mut copies = Vec::new();
        for (rk, rv) in self.db.scan_prefix(&keys::reverse_prefix(pack))? {
            let Some((_, off)) = keys::parse_reverse(&rk) else {
                continue;
            };
            stale.delete(&rk);
            let Ok(id) = <ChunkId>::try_from(&rv[..]) else {
                continue;
            };
            let Some(loc) = self.loc(&id)? else { continue };
            if loc.pack != pack || loc.offset != off {
                continue;
            }
            let mut rec = vec![0u8; RECORD_HEADER_LEN + loc.stored_len as usize];
            self.backend.read_at(pack, off, &mut rec)?;
            let h = RecordHeader::decode(&rec).map_err(|w| self.corrupt(&id, pack, off, w))?;
            if pack::crc(&rec[RECORD_HEADER_LEN..]) != h.crc {
                return Err(self.corrupt(
                    &id,
                    pack,
                    off,
                    "payload CRC mismatch during compaction; run `drclone verify`",
                ));
            }
            let new = self.append_record(loc.flags, loc.raw_len, loc.stored_len, &[&rec])?;
            copies.push((id, new));
            moved += rec.len() as u64;
        }
        self.sync_packs_recorded()?;
        let mut b = WriteBatch::default();
        for (id, new) in &copies {
            Self::index(&mut b, id, new);
        }
        self.db.write(b, false)?;
        for (id, _) in &copies {
            self.locs.remove(id);
        }
        stale.delete(keys::pack(pack));
        self.db.sync_wal()?;
        self.db.write(stale, true)?;
        self.backend.delete(pack)?;
        Ok(moved)
    }

    /// Totals over the index.
    pub fn stats(&self) -> Result<ChunkStats> {
        let mut s = ChunkStats::default();
        self.db.for_prefix(&[keys::CHUNK], |_, v| {
            if let Some(loc) = ChunkLoc::decode(v) {
                s.chunks += 1;
                s.raw_bytes += loc.raw_len as u64;
                s.stored_bytes += loc.stored_len as u64;
            }
            true
        })?;
        Ok(s)
    }
}
