//! The store: groups, volumes, recovery points, clones and the versioned block map.
//!
//! See `docs/DESIGN.md` for the full design.  In short:
//!
//! * Every volume's head writes into a *lineage*.  The block map holds versioned
//!   keys `M|lineage|block|!epoch`; a head writes at its lineage's current epoch.
//! * A recovery point records `(lineage, epoch)` for every volume of its group and
//!   bumps each lineage's epoch, all in one synced write batch: O(volumes), never
//!   O(blocks), and atomic across the group.
//! * A clone is a new lineage whose parent is a point's `(lineage, epoch)`; reads fall
//!   through to the parent where the clone has no version of its own.  O(1).
//! * A read of block `b` in view `(lineage, epoch)` is one seek to
//!   `M|lineage|b|!epoch`: the first key found is the newest version at or below the
//!   epoch, however many points exist.
//!
//! Concurrency: the `gate` is a readers-writer lock.  Every data write holds it
//! shared from the moment it reads its lineage's epoch until its map entries are in
//! RocksDB; point creation, clone creation, volume removal and the start of a GC hold
//! it exclusively.  So no write straddles a point (a point is immutable once taken)
//! and GC's snapshot never misses a write that has stored chunks but not yet its map.
//! Read-modify-write of partial blocks is serialised per block by striped mutexes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use rayon::prelude::*;
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};

use crate::chunks::ChunkStore;
use crate::codec::{Codec, Compression, MasterKey};
use crate::error::{Error, IoContext, Result};
use crate::journal::{self, Journal};
use crate::keys::{self, ChunkId};
use crate::meta::{encode_rec, Db, GroupRec, LineageRec, MapVal, PointRec, PointVolume, VolumeRec};
use crate::overlay::{self, Overlay};
use crate::pack::LocalPacks;
use crate::util::{check_name, now_secs};

pub const CONFIG_FILE: &str = "store.json";
pub const STORE_FORMAT: u32 = 1;
const STRIPES: usize = 1024;
/// Writes of at least this many whole blocks hash and compress in parallel.
const PARALLEL_BLOCKS: usize = 4;

/// The store's immutable configuration, kept as `store.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub format: u32,
    pub chunk_size: u32,
    pub compression: Compression,
    pub encrypted: bool,
    pub key_file: Option<PathBuf>,
    pub key_check: Option<String>,
    pub pack_size: u64,
    pub created: u64,
}

/// Options of `drclone init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub chunk_size: u32,
    pub compression: Compression,
    pub encrypt: bool,
    pub key_file: Option<PathBuf>,
    pub pack_size: u64,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_size: 64 << 10,
            compression: Compression::Zstd,
            encrypt: false,
            key_file: None,
            pack_size: 64 << 20,
        }
    }
}

/// What a reader or writer addresses: a head (epoch = `u64::MAX`) or a point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub name: String,
    pub lineage: u64,
    pub epoch: u64,
    pub size: u64,
    pub writable: bool,
}

pub const HEAD_EPOCH: u64 = u64::MAX;

/// How one block of a view resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// Never written (or only zeros over nothing): a hole.
    Hole,
    /// Reads as zeros but shadows older data.
    Zero,
    Data(ChunkId),
}

/// Head block mappings of single-block lookups (random reads, destage), so they
/// skip a RocksDB iterator.  Writers of a head's map entries invalidate under a
/// stripe mutex that also guards a generation counter; a reader inserts what it
/// resolved only if the generation did not move meanwhile, so a lookup that raced
/// a commit never caches the old value.  `DRCLONE_MAP_CACHE_MIB` (default 32).
struct HeadCache {
    map: quick_cache::sync::Cache<(u64, u64), Block>,
    gens: Vec<Mutex<u64>>,
}

impl HeadCache {
    fn new() -> HeadCache {
        HeadCache {
            map: quick_cache::sync::Cache::new(crate::util::env_budget(
                "DRCLONE_MAP_CACHE_MIB",
                32,
                96, // bytes an entry costs, roughly
                1024,
            )),
            gens: (0..256).map(|_| Mutex::new(0)).collect(),
        }
    }

    fn stripe(&self, key: (u64, u64)) -> &Mutex<u64> {
        let h = key.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ key.1;
        &self.gens[(h % self.gens.len() as u64) as usize]
    }

    fn generation(&self, key: (u64, u64)) -> u64 {
        *self.stripe(key).lock().unwrap()
    }

    fn insert_if(&self, key: (u64, u64), generation: u64, b: Block) {
        let g = self.stripe(key).lock().unwrap();
        if *g == generation {
            self.map.insert(key, b);
        }
    }

    /// A head's map entry for `key` changed (called after the commit).
    fn invalidate(&self, key: (u64, u64)) {
        let mut g = self.stripe(key).lock().unwrap();
        *g += 1;
        self.map.remove(&key);
    }

    fn clear(&self) {
        for g in &self.gens {
            *g.lock().unwrap() += 1;
        }
        self.map.clear();
    }
}

/// The background destager's state (see [`Store::start_destager`]).
#[derive(Default)]
struct Destager {
    running: AtomicBool,
    lock: Mutex<()>,
    /// Writers wake the destager.
    wake: Condvar,
    /// The destager wakes writers waiting at the limit.
    relieved: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Blocks per background destage batch: about 20-40 ms of work on 64 KiB chunks.
const DESTAGE_BATCH: usize = 64;

pub struct Store {
    dir: PathBuf,
    head_cache: HeadCache,
    bg: Destager,
    pub cfg: Config,
    pub(crate) db: Arc<Db>,
    pub chunks: ChunkStore,
    pub(crate) gate: RwLock<()>,
    pub(crate) meta: Mutex<()>,
    pub(crate) gc_lock: Mutex<()>,
    lineages: RwLock<HashMap<u64, LineageRec>>,
    stripes: Vec<Mutex<()>>,
    /// Write-back overlay of partly written blocks of heads, and the journal that
    /// makes it durable.  See "Small writes" in docs/DESIGN.md.
    overlay: Overlay,
    journal: Journal,
    /// Overlay capacity in bytes of pages.
    dirty_limit: usize,
    /// Journal size that makes the oldest blocks destage so its tail can advance.
    journal_limit: u64,
    /// One writer at a time relieves overlay or journal pressure.
    destaging: Mutex<()>,
}

/// The emergency reserve: a file of zeros the store keeps so that a full disk
/// never locks the operator out.  Opening needs a little space (RocksDB writes an
/// options file, the journal a segment); if that fails with ENOSPC the reserve is
/// deleted and the open retried, so `volume rm` and `gc` can free space.  It is
/// recreated when an open finds the room.  4 MiB: enough to open, remove and
/// collect garbage (dropping dead packs needs no space), and small enough not to
/// matter to a store's footprint.
const RESERVE_FILE: &str = "reserve";
const RESERVE_BYTES: u64 = 4 << 20;

fn is_enospc(e: &Error) -> bool {
    e.kind() == crate::ErrorKind::NoSpace || e.to_string().contains("No space left on device")
}

fn release_reserve(dir: &Path) -> bool {
    let path = dir.join(RESERVE_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            log::warn!(
                "store {}: the disk is full; released the emergency reserve ({}) so the \
                 store opens. Free space now: remove points or volumes, then `drclone gc`.",
                dir.display(),
                path.display()
            );
            true
        }
        Err(_) => false,
    }
}

/// Create the reserve if it is missing and the file system has room for it and
/// as much again (best effort: a store works without it).
fn keep_reserve(dir: &Path) {
    let path = dir.join(RESERVE_FILE);
    if path.exists() {
        return;
    }
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: statvfs fills the zeroed struct; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return;
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    let size: u64 = RESERVE_BYTES;
    if free < 2 * size {
        log::warn!(
            "store {}: {} free, not enough to keep the {} emergency reserve",
            dir.display(),
            crate::util::human(free),
            crate::util::human(size)
        );
        return;
    }
    let tmp = dir.join("reserve.tmp");
    let res = std::fs::File::create(&tmp).and_then(|f| {
        use std::io::Write;
        let zeros = vec![0u8; 1 << 20];
        let mut f = std::io::BufWriter::new(f);
        for _ in 0..size >> 20 {
            f.write_all(&zeros)?;
        }
        f.into_inner()?.sync_all()?;
        std::fs::rename(&tmp, &path)
    });
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        log::warn!(
            "store {}: could not create the emergency reserve: {e}",
            dir.display()
        );
    }
}

/// Overlay capacity in bytes: `DRCLONE_DIRTY_MIB` (default 256 MiB).
fn dirty_limit() -> usize {
    crate::util::env_budget("DRCLONE_DIRTY_MIB", 256, 1, 4096)
}

/// Journal size limit in bytes: `DRCLONE_JOURNAL_MIB` (default 1 GiB).
fn journal_limit() -> u64 {
    crate::util::env_budget("DRCLONE_JOURNAL_MIB", 1024, 1, 1 << 20) as u64
}

fn is_zero(b: &[u8]) -> bool {
    // Compare in u128 words: the compiler vectorises this.
    let (pre, mid, post) = unsafe { b.align_to::<u128>() };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

impl Store {
    /// Create a new store in `dir` (which may exist but must not hold a store).
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<()> {
        let cs = opts.chunk_size;
        if !(4096..=(4 << 20)).contains(&cs) || !cs.is_power_of_two() {
            return Err(Error::invalid(format!(
                "chunk size {cs} is not a power of two between 4K and 4M"
            )));
        }
        let cfg_path = dir.join(CONFIG_FILE);
        if cfg_path.exists() {
            return Err(Error::Exists(format!(
                "a drclone store in {}",
                dir.display()
            )));
        }
        if dir.exists() && std::fs::read_dir(dir).at(dir)?.next().is_some() {
            return Err(Error::invalid(format!(
                "{} is not empty; drclone init needs a new or empty directory",
                dir.display()
            )));
        }
        let (key_file, key_check) = if opts.encrypt {
            let path = opts.key_file.clone().ok_or_else(|| {
                Error::Key(
                    "--encrypt needs --key-file F (an existing key, or where to write a new one)"
                        .into(),
                )
            })?;
            let path = std::path::absolute(&path).at(&path)?;
            let key = if path.exists() {
                MasterKey::load(&path)?
            } else {
                let k = MasterKey::generate();
                k.save(&path)?;
                log::info!(
                    "wrote a new key to {}; keep a copy off this host",
                    path.display()
                );
                k
            };
            (Some(path), Some(key.check_value()))
        } else {
            if opts.key_file.is_some() {
                return Err(Error::invalid("--key-file given without --encrypt"));
            }
            (None, None)
        };
        std::fs::create_dir_all(dir).at(dir)?;
        let cfg = Config {
            format: STORE_FORMAT,
            chunk_size: cs,
            compression: opts.compression,
            encrypted: opts.encrypt,
            key_file,
            key_check,
            pack_size: opts.pack_size,
            created: now_secs(),
        };
        Db::open(&dir.join("meta"), true)?;
        LocalPacks::new(&dir.join("packs"))?;
        let tmp = dir.join("store.json.tmp");
        let body = serde_json::to_vec_pretty(&cfg).expect("config serializes");
        std::fs::write(&tmp, body)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .at(&tmp)?;
        std::fs::rename(&tmp, &cfg_path).at(&cfg_path)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .at(dir)?;
        Ok(())
    }

    /// Read a store's configuration without opening it.
    pub fn read_config(dir: &Path) -> Result<Config> {
        let path = dir.join(CONFIG_FILE);
        let body = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!(
                    "drclone store {} (no {CONFIG_FILE}; create one with `drclone init`)",
                    dir.display()
                )))
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let cfg: Config = serde_json::from_slice(&body).map_err(|e| Error::Format {
            store: dir.to_path_buf(),
            what: format!("{CONFIG_FILE} does not parse: {e}"),
        })?;
        if cfg.format != STORE_FORMAT {
            return Err(Error::Format {
                store: dir.to_path_buf(),
                what: format!(
                    "store format {} is not supported by this drclone (which reads format {STORE_FORMAT})",
                    cfg.format
                ),
            });
        }
        Ok(cfg)
    }

    /// Open a store.  `key_file` overrides the key path recorded at init.
    pub fn open(dir: &Path, key_file: Option<&Path>) -> Result<Store> {
        let cfg = Self::read_config(dir)?;
        let key = if cfg.encrypted {
            let path = key_file
                .map(Path::to_path_buf)
                .or_else(|| cfg.key_file.clone())
                .ok_or_else(|| {
                    Error::Key(format!(
                        "store {} is encrypted: give its key with --key-file",
                        dir.display()
                    ))
                })?;
            let key = MasterKey::load(&path)?;
            if Some(key.check_value()) != cfg.key_check {
                return Err(Error::Key(format!(
                    "wrong key for store {}: key file {} does not match the key the store was created with",
                    dir.display(),
                    path.display()
                )));
            }
            Some(key)
        } else {
            None
        };
        let db = match Db::open(&dir.join("meta"), false) {
            Err(e) if is_enospc(&e) && release_reserve(dir) => Db::open(&dir.join("meta"), false)?,
            other => other?,
        };
        let db = Arc::new(db);
        let codec = Codec::new(cfg.compression, key.as_ref());
        let backend = Arc::new(LocalPacks::new(&dir.join("packs"))?);
        let chunks = ChunkStore::open(
            db.clone(),
            codec,
            backend,
            dir.to_path_buf(),
            cfg.pack_size,
            cfg.chunk_size as u64,
            true,
        )?;
        let mut lineages = HashMap::new();
        for (k, v) in db.scan_prefix(&[keys::LINEAGE])? {
            let rec: LineageRec = db.decode_rec(&k, &v)?;
            lineages.insert(rec.id, rec);
        }
        let overlay = Overlay::new(cfg.chunk_size as usize);
        let (mut journal, replay) = match Journal::open(&dir.join("journal"), overlay.page_size()) {
            Err(e) if is_enospc(&e) && release_reserve(dir) => {
                Journal::open(&dir.join("journal"), overlay.page_size())?
            }
            other => other?,
        };
        // Segments small enough that the tail can advance within the limit.
        let journal_limit = journal_limit();
        journal.set_segment_bytes((journal_limit / 4).min(journal::SEGMENT_BYTES));
        let store = Store {
            dir: dir.to_path_buf(),
            head_cache: HeadCache::new(),
            bg: Destager::default(),
            cfg,
            db,
            chunks,
            gate: RwLock::new(()),
            meta: Mutex::new(()),
            gc_lock: Mutex::new(()),
            lineages: RwLock::new(lineages),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            overlay,
            journal,
            dirty_limit: dirty_limit(),
            journal_limit,
            destaging: Mutex::new(()),
        };
        store.replay_journal(replay)?;
        keep_reserve(dir);
        Ok(store)
    }

    /// Apply the journal a previous run left (it did not close cleanly), destage
    /// it all into the map, sync, and drop the old segments.
    fn replay_journal(&self, records: Vec<journal::Record>) -> Result<()> {
        if records.is_empty() {
            return self.trim_journal();
        }
        let (cs, page) = (self.chunk_size() as usize, self.overlay.page_size());
        let n = records.len();
        for r in records {
            let key = (r.lineage, r.block);
            let rel = if r.kind == journal::KIND_TOMBSTONE {
                self.overlay.remove(key).unwrap_or_default()
            } else {
                let off = r.offset as usize;
                if off % page != 0 || r.data.len() % page != 0 || off + r.data.len() > cs {
                    return Err(Error::Format {
                        store: self.dir.clone(),
                        what: format!(
                            "journal segment {}: record for lineage {} block {} covers \
                             {off}+{} bytes, not whole pages of a {cs}-byte block",
                            r.segment,
                            r.lineage,
                            r.block,
                            r.data.len()
                        ),
                    });
                }
                self.overlay.put(key, off, &r.data, r.segment)
            };
            self.release(rel);
        }
        log::info!(
            "store {}: replayed {n} journal record(s) into {} block(s)",
            self.dir.display(),
            self.overlay.len()
        );
        self.destage(None)?;
        self.trim_journal()
    }

    fn release(&self, rel: overlay::Released) {
        for (seg, pages) in rel {
            self.journal.release(seg, pages);
        }
    }

    /// Delete journal segments whose pages are all destaged, after syncing what
    /// they were destaged into.
    fn trim_journal(&self) -> Result<()> {
        self.journal.trim(|| self.chunks.sync()).map(|_| ())
    }

    /// Cap the write-back overlay at `blocks` blocks' worth of pages (tests use
    /// tiny caps).
    pub fn set_dirty_limit(&mut self, blocks: usize) {
        self.dirty_limit = (blocks.max(1) as u64 * self.chunk_size()) as usize;
    }

    /// Cap the journal at `limit` bytes in segments of `segment` bytes (tests use
    /// tiny ones).
    pub fn set_journal_limit(&mut self, limit: u64, segment: u64) {
        self.journal_limit = limit;
        self.journal.set_segment_bytes(segment);
    }

    /// Journal segments on disk (for tests).
    pub fn journal_segments(&self) -> usize {
        self.journal.segments()
    }

    /// Number of keys in the metadata database (a full scan; for tests and tools).
    pub fn metadata_key_count(&self) -> Result<u64> {
        let mut n = 0;
        let mut it = self.db.db.raw_iterator();
        it.seek_to_first();
        while it.valid() {
            n += 1;
            it.next();
        }
        it.status().map_err(|e| self.db.err(e))?;
        Ok(n)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn chunk_size(&self) -> u64 {
        self.cfg.chunk_size as u64
    }

    /// Make every acknowledged write durable (FLUSH): small writes are in the
    /// journal, whole blocks in packs and the map.
    pub fn flush(&self) -> Result<()> {
        self.journal.sync()?;
        self.chunks.sync()?;
        self.trim_journal()
    }

    /// Destage everything, seal the open pack and empty the journal (clean
    /// shutdown).
    pub fn close(&self) -> Result<()> {
        self.stop_destager();
        self.destage(None)?;
        self.chunks.seal_open()?;
        self.db.sync_wal()?;
        self.journal.reset()
    }

    // ---- groups and volumes -----------------------------------------------------

    pub fn create_group(&self, name: &str) -> Result<GroupRec> {
        check_name("group", name)?;
        let _m = self.meta.lock().unwrap();
        if self.db.get(&keys::group(name))?.is_some() {
            return Err(Error::Exists(format!("group {name}")));
        }
        let rec = GroupRec {
            name: name.into(),
            created: now_secs(),
            retention: None,
        };
        let mut b = WriteBatch::default();
        b.put(keys::group(name), encode_rec(&rec));
        self.db.write(b, true)?;
        Ok(rec)
    }

    pub fn group(&self, name: &str) -> Result<GroupRec> {
        self.db
            .get_rec(&keys::group(name))?
            .ok_or_else(|| Error::NotFound(format!("group {name}")))
    }

    pub fn groups(&self) -> Result<Vec<GroupRec>> {
        self.db
            .scan_prefix(&[keys::GROUP])?
            .iter()
            .map(|(k, v)| self.db.decode_rec(k, v))
            .collect()
    }

    pub fn set_retention(&self, group: &str, policy: Option<String>) -> Result<()> {
        let _m = self.meta.lock().unwrap();
        let mut g = self.group(group)?;
        g.retention = policy;
        let mut b = WriteBatch::default();
        b.put(keys::group(group), encode_rec(&g));
        self.db.write(b, true)
    }

    fn check_size(&self, size: u64) -> Result<()> {
        if size == 0 || size % 512 != 0 {
            return Err(Error::invalid(format!(
                "volume size {size} must be a positive multiple of 512 bytes"
            )));
        }
        if size > (1u64 << 60) {
            return Err(Error::invalid(format!("volume size {size} is too large")));
        }
        Ok(())
    }

    fn new_lineage(
        &self,
        parent: Option<(u64, u64)>,
        batch: &mut WriteBatch,
    ) -> Result<LineageRec> {
        let id = self.db.next_counter("lineage", batch)?;
        let rec = LineageRec {
            id,
            epoch: 1,
            parent,
            has_head: true,
        };
        batch.put(keys::lineage(id), encode_rec(&rec));
        Ok(rec)
    }

    fn add_volume(
        &self,
        group: &str,
        disk: &str,
        size: u64,
        parent: Option<(u64, u64)>,
    ) -> Result<VolumeRec> {
        check_name("disk", disk)?;
        self.check_size(size)?;
        self.group(group)?;
        if self.db.get(&keys::volume(group, disk))?.is_some() {
            return Err(Error::Exists(format!("volume {group}/{disk}")));
        }
        let mut b = WriteBatch::default();
        let lin = self.new_lineage(parent, &mut b)?;
        let seq = self.db.next_counter("volume-seq", &mut b)?;
        let rec = VolumeRec {
            group: group.into(),
            disk: disk.into(),
            lineage: lin.id,
            size,
            seq,
            created: now_secs(),
        };
        b.put(keys::volume(group, disk), encode_rec(&rec));
        self.db.write(b, true)?;
        self.lineages.write().unwrap().insert(lin.id, lin);
        Ok(rec)
    }

    pub fn create_volume(&self, group: &str, disk: &str, size: u64) -> Result<VolumeRec> {
        let _m = self.meta.lock().unwrap();
        self.add_volume(group, disk, size, None)
    }

    pub fn volume(&self, group: &str, disk: &str) -> Result<VolumeRec> {
        self.db
            .get_rec(&keys::volume(group, disk))?
            .ok_or_else(|| Error::NotFound(format!("volume {group}/{disk}")))
    }

    /// Volumes of one group in disk order, or of every group.
    pub fn volumes(&self, group: Option<&str>) -> Result<Vec<VolumeRec>> {
        let prefix = match group {
            Some(g) => keys::volume_prefix(g),
            None => vec![keys::VOLUME],
        };
        let mut v: Vec<VolumeRec> = self
            .db
            .scan_prefix(&prefix)?
            .iter()
            .map(|(k, v)| self.db.decode_rec(k, v))
            .collect::<Result<_>>()?;
        v.sort_by(|a, b| (&a.group, a.seq).cmp(&(&b.group, b.seq)));
        Ok(v)
    }

    /// Grow a volume.  Shrinking is refused: it would discard data.
    pub fn resize_volume(&self, group: &str, disk: &str, size: u64) -> Result<VolumeRec> {
        let _m = self.meta.lock().unwrap();
        self.check_size(size)?;
        let mut v = self.volume(group, disk)?;
        if size < v.size {
            return Err(Error::invalid(format!(
                "volume {group}/{disk} is {} bytes; shrinking to {size} would discard data",
                v.size
            )));
        }
        v.size = size;
        let mut b = WriteBatch::default();
        b.put(keys::volume(group, disk), encode_rec(&v));
        self.db.write(b, true)?;
        Ok(v)
    }

    /// Remove a volume's head.  Points that include it keep their data until they
    /// are removed too; GC reclaims the rest.
    pub fn remove_volume(&self, group: &str, disk: &str) -> Result<()> {
        let _m = self.meta.lock().unwrap();
        let v = self.volume(group, disk)?;
        let _g = self.gate.write().unwrap();
        let mut lins = self.lineages.write().unwrap();
        let mut lin = lins
            .get(&v.lineage)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("lineage {} of {group}/{disk}", v.lineage)))?;
        lin.has_head = false;
        let mut b = WriteBatch::default();
        b.delete(keys::volume(group, disk));
        b.put(keys::lineage(lin.id), encode_rec(&lin));
        self.db.write(b, true)?;
        // Its journal records stay void: replay drops blocks of removed volumes.
        self.release(self.overlay.remove_lineage(lin.id));
        lins.insert(lin.id, lin);
        Ok(())
    }

    // ---- points and clones ------------------------------------------------------

    /// Take a crash-consistent recovery point of every volume of `group` at once.
    pub fn create_point(&self, group: &str, app: bool, label: Option<String>) -> Result<PointRec> {
        let _m = self.meta.lock().unwrap();
        self.group(group)?;
        let vols = self.volumes(Some(group))?;
        // Every write acknowledged so far leaves the overlay for the block map.
        self.destage(None)?;
        // Quiesce writers: no write is half-way through while the epochs move.
        let _g = self.gate.write().unwrap();
        // Everything acknowledged so far becomes durable before the point exists.
        self.chunks.sync()?;
        let mut lins = self.lineages.write().unwrap();
        let mut b = WriteBatch::default();
        let id = self.db.next_counter("point", &mut b)?;
        let mut pvs = Vec::with_capacity(vols.len());
        let mut updated = Vec::with_capacity(vols.len());
        for v in &vols {
            let mut lin = lins.get(&v.lineage).cloned().ok_or_else(|| {
                Error::NotFound(format!("lineage {} of {}/{}", v.lineage, v.group, v.disk))
            })?;
            pvs.push(PointVolume {
                disk: v.disk.clone(),
                lineage: lin.id,
                epoch: lin.epoch,
                size: v.size,
            });
            lin.epoch += 1;
            b.put(keys::lineage(lin.id), encode_rec(&lin));
            updated.push(lin);
        }
        let rec = PointRec {
            id,
            group: group.into(),
            time: now_secs(),
            kind: if app { "app" } else { "crash" }.into(),
            label,
            volumes: pvs,
        };
        b.put(keys::point(group, id), encode_rec(&rec));
        self.db.write(b, true)?;
        for l in updated {
            lins.insert(l.id, l);
        }
        log::info!(
            "point {id} of group {group}: {} volume(s)",
            rec.volumes.len()
        );
        Ok(rec)
    }

    /// Points of a group, oldest first.
    pub fn points(&self, group: &str) -> Result<Vec<PointRec>> {
        self.group(group)?;
        self.db
            .scan_prefix(&keys::point_prefix(group))?
            .iter()
            .map(|(k, v)| self.db.decode_rec(k, v))
            .collect()
    }

    /// Every point of every group.
    pub fn all_points(&self) -> Result<Vec<PointRec>> {
        self.db
            .scan_prefix(&[keys::POINT])?
            .iter()
            .map(|(k, v)| self.db.decode_rec(k, v))
            .collect()
    }

    /// Resolve `latest`, `latest-app` or a numeric id.
    pub fn point(&self, group: &str, spec: &str) -> Result<PointRec> {
        let pts = self.points(group)?;
        let found = match spec {
            "latest" => pts.last().cloned(),
            "latest-app" => pts.iter().rev().find(|p| p.kind == "app").cloned(),
            n => {
                let id: u64 = n.parse().map_err(|_| {
                    Error::invalid(format!(
                        "invalid point {n:?}: use a point id, latest or latest-app"
                    ))
                })?;
                pts.into_iter().find(|p| p.id == id)
            }
        };
        found.ok_or_else(|| Error::NotFound(format!("point {spec} of group {group}")))
    }

    pub fn remove_point(&self, group: &str, spec: &str) -> Result<PointRec> {
        let _m = self.meta.lock().unwrap();
        let p = self.point(group, spec)?;
        let mut b = WriteBatch::default();
        b.delete(keys::point(group, p.id));
        self.db.write(b, true)?;
        Ok(p)
    }

    /// Make a writable volume from a point, in constant time.
    pub fn clone_volume(
        &self,
        src_group: &str,
        src_disk: &str,
        point: &str,
        dst_group: &str,
        dst_disk: &str,
    ) -> Result<VolumeRec> {
        let _m = self.meta.lock().unwrap();
        let p = self.point(src_group, point)?;
        let pv = p
            .volumes
            .iter()
            .find(|v| v.disk == src_disk)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "disk {src_disk} in point {} of group {src_group}",
                    p.id
                ))
            })?;
        let _g = self.gate.write().unwrap();
        self.add_volume(dst_group, dst_disk, pv.size, Some((pv.lineage, pv.epoch)))
    }

    // ---- views ------------------------------------------------------------------

    /// Resolve `GROUP/DISK` (head) or `GROUP/DISK@POINT` (read-only point).
    pub fn view(&self, group: &str, disk: &str, point: Option<&str>) -> Result<View> {
        match point {
            None => {
                let v = self.volume(group, disk)?;
                Ok(View {
                    name: format!("{group}/{disk}"),
                    lineage: v.lineage,
                    epoch: HEAD_EPOCH,
                    size: v.size,
                    writable: true,
                })
            }
            Some(spec) => {
                let p = self.point(group, spec)?;
                let pv = p.volumes.iter().find(|v| v.disk == disk).ok_or_else(|| {
                    Error::NotFound(format!("disk {disk} in point {} of group {group}", p.id))
                })?;
                Ok(View {
                    name: format!("{group}/{disk}@{}", p.id),
                    lineage: pv.lineage,
                    epoch: pv.epoch,
                    size: pv.size,
                    writable: false,
                })
            }
        }
    }

    /// Resolve `GROUP/DISK[@POINT]`.
    pub fn view_ref(&self, r: &str) -> Result<View> {
        let (g, d, p) = crate::util::parse_volume_ref(r)?;
        self.view(&g, &d, p.as_deref())
    }

    /// A head view's size may have grown since it was resolved.
    pub fn refresh(&self, view: &View) -> Result<View> {
        if view.epoch != HEAD_EPOCH {
            return Ok(view.clone());
        }
        let (g, d) = view.name.split_once('/').unwrap_or((&view.name, ""));
        self.view(g, d, None)
    }

    pub fn lineage(&self, id: u64) -> Option<LineageRec> {
        self.lineages.read().unwrap().get(&id).cloned()
    }

    pub(crate) fn lineage_map(&self) -> HashMap<u64, LineageRec> {
        self.lineages.read().unwrap().clone()
    }

    pub(crate) fn remove_lineage(&self, id: u64, batch: &mut WriteBatch) {
        batch.delete(keys::lineage(id));
        self.lineages.write().unwrap().remove(&id);
    }

    // ---- the block map ----------------------------------------------------------

    /// Resolve `count` blocks starting at `first` in `(lineage, epoch)`, falling
    /// through to parents.  One iterator per lineage in the chain.
    pub fn resolve(&self, lineage: u64, epoch: u64, first: u64, count: u64) -> Result<Vec<Block>> {
        if epoch == HEAD_EPOCH && count == 1 {
            let key = (lineage, first);
            if let Some(b) = self.head_cache.map.get(&key) {
                return Ok(vec![b]);
            }
            let generation = self.head_cache.generation(key);
            let out = self.resolve_uncached(lineage, epoch, first, count)?;
            self.head_cache.insert_if(key, generation, out[0]);
            return Ok(out);
        }
        self.resolve_uncached(lineage, epoch, first, count)
    }

    /// GC dropped map versions: forget cached head mappings (GC never changes what
    /// a head reads, but a dropped zero marker turns ZERO into HOLE for block status).
    pub(crate) fn forget_cached_mappings(&self) {
        self.head_cache.clear();
    }

    fn resolve_uncached(
        &self,
        lineage: u64,
        epoch: u64,
        first: u64,
        count: u64,
    ) -> Result<Vec<Block>> {
        let mut out = vec![None::<Block>; count as usize];
        let mut lin = lineage;
        let mut ep = epoch;
        let mut depth = 0;
        loop {
            self.resolve_one_lineage(lin, ep, first, &mut out)?;
            if out.iter().all(Option::is_some) {
                break;
            }
            match self.lineage(lin).and_then(|l| l.parent) {
                Some((pl, pe)) => {
                    lin = pl;
                    ep = pe;
                }
                None => break,
            }
            depth += 1;
            if depth > 1000 {
                return Err(Error::Format {
                    store: self.dir.clone(),
                    what: format!("lineage {lineage} has a parent chain over 1000 deep (a cycle?)"),
                });
            }
        }
        Ok(out.into_iter().map(|b| b.unwrap_or(Block::Hole)).collect())
    }

    fn resolve_one_lineage(
        &self,
        lin: u64,
        epoch: u64,
        first: u64,
        out: &mut [Option<Block>],
    ) -> Result<()> {
        let end = first + out.len() as u64;
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(keys::map(lin, end, HEAD_EPOCH).to_vec());
        let mut it = self.db.db.raw_iterator_opt(ro);
        // Skip blocks already resolved by a child lineage.
        let mut b = first;
        while b < end && out[(b - first) as usize].is_some() {
            b += 1;
        }
        if b == end {
            return Ok(());
        }
        it.seek(keys::map(lin, b, epoch));
        while it.valid() {
            let Some((_, kb, ke)) = keys::parse_map(it.key().unwrap()) else {
                break;
            };
            let slot = (kb - first) as usize;
            if out[slot].is_some() {
                // Resolved by a child; jump to the next unresolved block.
                let mut nb = kb + 1;
                while nb < end && out[(nb - first) as usize].is_some() {
                    nb += 1;
                }
                if nb >= end {
                    break;
                }
                it.seek(keys::map(lin, nb, epoch));
                continue;
            }
            if ke > epoch {
                // A version newer than this view: jump to the newest one it can see.
                it.seek(keys::map(lin, kb, epoch));
                continue;
            }
            let val = MapVal::decode(it.value().unwrap()).ok_or_else(|| Error::Format {
                store: self.dir.clone(),
                what: format!("map entry of lineage {lin} block {kb} epoch {ke} does not decode"),
            })?;
            out[slot] = Some(match val {
                MapVal::Zero => Block::Zero,
                MapVal::Data(id) => Block::Data(id),
            });
            it.next();
            // Older versions of the same block follow; skip them with one seek.
            if it.valid() {
                if let Some((_, nb, _)) = keys::parse_map(it.key().unwrap()) {
                    if nb == kb {
                        it.seek(keys::map(lin, kb + 1, epoch));
                    }
                }
            }
        }
        it.status().map_err(|e| self.db.err(e))
    }

    fn check_range(&self, view: &View, offset: u64, len: u64) -> Result<()> {
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
    /// or up to `max`, oldest first.
    pub fn destage(&self, max: Option<usize>) -> Result<()> {
        if self.overlay.is_empty() {
            return Ok(());
        }
        let keys = self.overlay.oldest(max.unwrap_or(usize::MAX));
        keys.par_iter()
            .try_for_each(|&(l, b)| self.destage_one(l, b))
    }

    fn destage_one(&self, l: u64, b: u64) -> Result<()> {
        let _s = self.lock_blocks(l, b, 1);
        let key = (l, b);
        let Some(present) = self.overlay.coverage(key) else {
            return Ok(());
        };
        // The gate before the lineage: a point taken in between would otherwise
        // leave this destage writing into the point's (old) epoch.
        let g = self.gate.read().unwrap();
        if let Some(lin) = self.lineage(l).filter(|x| x.has_head) {
            let cur = self.resolve(l, HEAD_EPOCH, b, 1)?[0];
            // Base content, then the pages over it (no base needed when complete).
            let mut data = match cur {
                Block::Data(id) if present < self.overlay.pages_per_block() => {
                    self.chunks.get_with(&id, false)?.to_vec()
                }
                _ => vec![0u8; self.chunk_size() as usize],
            };
            self.overlay.merge_into(key, &mut data);
            let mut batch = WriteBatch::default();
            if is_zero(&data) {
                if matches!(cur, Block::Data(_)) {
                    batch.put(keys::map(l, b, lin.epoch), MapVal::Zero.encode());
                }
            } else {
                let (id, loc) = self.chunks.put(&data)?;
                if let Some(loc) = loc {
                    ChunkStore::index(&mut batch, &id, &loc);
                }
                if cur != Block::Data(id) {
                    batch.put(keys::map(l, b, lin.epoch), MapVal::Data(id).encode());
                }
            }
            self.db.write(batch, false)?;
            self.head_cache.invalidate(key);
            // The map now holds the pages: void their journal records.
            self.journal.append_tombstone(l, b)?;
        }
        drop(g);
        // Only now, with the map entry committed, does the block leave the overlay.
        if let Some(rel) = self.overlay.remove(key) {
            self.release(rel);
        }
        Ok(())
    }

    /// Destage the oldest blocks while the overlay holds more than its limit or the
    /// journal is over its size; one writer does it at a time unless the overlay is
    /// far over (then writers wait their turn: back-pressure).
    /// Whether the overlay or the journal is above `num/den` of its limit.  The
    /// journal counts only while the overlay holds something: with the overlay
    /// empty, nothing destaging could do would shrink it (what is left is the
    /// active segment, or dead segments the next trim deletes).
    fn pressure(&self, num: usize, den: usize) -> bool {
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

    fn relieve(&self) -> Result<()> {
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

    fn lock_blocks(&self, lineage: u64, first: u64, count: u64) -> Vec<MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = (first..first + count)
            .map(|b| ((lineage.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b) % STRIPES as u64) as usize)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].lock().unwrap())
            .collect()
    }

    fn check_writable(&self, view: &View) -> Result<()> {
        if !view.writable {
            return Err(Error::ReadOnly(format!("recovery point {}", view.name)));
        }
        Ok(())
    }

    /// Write `data` at `offset` of a head.
    pub fn write(&self, view: &View, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable(view)?;
        self.check_range(view, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.modify(view, offset, data.len() as u64, Some(data))
    }

    /// Make a range read as zeros and free its space (TRIM, WRITE_ZEROES, punch hole).
    pub fn zero(&self, view: &View, offset: u64, len: u64) -> Result<()> {
        self.check_writable(view)?;
        self.check_range(view, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.modify(view, offset, len, None)
    }

    /// The write path shared by write and zero.  `data == None` writes zeros.
    fn modify(&self, view: &View, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        self.modify_locked(view, offset, len, data)?;
        // Over a limit: destage the oldest blocks (with no block lock held here).
        self.relieve()
    }

    fn modify_locked(&self, view: &View, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        let cs = self.chunk_size();
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        let count = last - first + 1;
        let _locks = self.lock_blocks(view.lineage, first, count);
        let _g = self.gate.read().unwrap();
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
        type Stored = (MapVal, Option<crate::meta::ChunkLoc>);
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
        self.db.write(batch, false)?;
        for (b, _, _) in &blocks {
            self.head_cache.invalidate((lin.id, *b));
        }
        for b in replaced {
            self.journal.append_tombstone(lin.id, b)?;
            if let Some(rel) = self.overlay.remove((lin.id, b)) {
                self.release(rel);
            }
        }
        Ok(())
    }

    /// A write (or zeroing) of `n` bytes at `start` of block `b`, short of the whole
    /// block: whole pages go to the journal and the overlay; the edges of an
    /// unaligned write are first filled from the current content.
    fn write_pages(
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
        let seg = self.journal.append_pages(lineage, b, lo as u32, &run)?;
        let rel = self.overlay.put(key, lo, &run, seg);
        self.release(rel);
        Ok(())
    }

    /// Extents of a range: (offset, length, block kind) with runs merged.
    pub fn extents(&self, view: &View, offset: u64, len: u64) -> Result<Vec<(u64, u64, Block)>> {
        self.check_range(view, offset, len)?;
        if len == 0 {
            return Ok(vec![]);
        }
        let cs = self.chunk_size();
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        let head = view.epoch == HEAD_EPOCH && !self.overlay.is_empty();
        let blocks = self.resolve(view.lineage, view.epoch, first, last - first + 1)?;
        let mut out: Vec<(u64, u64, Block)> = Vec::new();
        for (i, blk) in blocks.into_iter().enumerate() {
            let b = first + i as u64;
            // A block with overlay pages reports as data (pages may hold zeros, like
            // any written data).
            let blk = if head && self.overlay.contains((view.lineage, b)) {
                Block::Data([0; 32])
            } else {
                blk
            };
            let s = (b * cs).max(offset);
            let e = ((b + 1) * cs).min(offset + len);
            let kind = match blk {
                Block::Data(_) => Block::Data([0; 32]),
                k => k,
            };
            match out.last_mut() {
                Some(l) if l.2 == kind => l.1 += e - s,
                _ => out.push((s, e - s, kind)),
            }
        }
        Ok(out)
    }

    /// Every map version of every lineage, grouped as (lineage, block) -> versions
    /// newest first.  Used by GC, verify and df on a consistent snapshot.
    pub(crate) fn scan_map<F>(&self, snap: &rocksdb::Snapshot<'_>, mut f: F) -> Result<()>
    where
        F: FnMut(u64, u64, &[(u64, MapVal, Box<[u8]>)]) -> Result<()>,
    {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_snapshot(snap);
        ro.set_iterate_upper_bound(vec![keys::MAP + 1]);
        let mut it = self.db.db.raw_iterator_opt(ro);
        it.seek([keys::MAP]);
        let mut cur: Option<(u64, u64)> = None;
        let mut versions: Vec<(u64, MapVal, Box<[u8]>)> = Vec::new();
        while it.valid() {
            let k = it.key().unwrap();
            let Some((l, b, e)) = keys::parse_map(k) else {
                it.next();
                continue;
            };
            if cur != Some((l, b)) {
                if let Some((cl, cb)) = cur {
                    f(cl, cb, &versions)?;
                }
                versions.clear();
                cur = Some((l, b));
            }
            if let Some(v) = MapVal::decode(it.value().unwrap()) {
                versions.push((e, v, k.into()));
            }
            it.next();
        }
        it.status().map_err(|e| self.db.err(e))?;
        if let Some((cl, cb)) = cur {
            f(cl, cb, &versions)?;
        }
        Ok(())
    }

    /// Epochs at which each lineage is visible: its retained points, the parent
    /// epochs of *visible* clones made from it, and `HEAD_EPOCH` while it has a head.
    /// A clone lineage with no head and no point pins nothing.
    pub(crate) fn visible_epochs(
        lineages: &HashMap<u64, LineageRec>,
        points: &[PointRec],
    ) -> HashMap<u64, Vec<u64>> {
        let mut vis: HashMap<u64, Vec<u64>> = HashMap::new();
        for l in lineages.values() {
            if l.has_head {
                vis.entry(l.id).or_default().push(HEAD_EPOCH);
            }
        }
        for p in points {
            for v in &p.volumes {
                vis.entry(v.lineage).or_default().push(v.epoch);
            }
        }
        // Visible lineages pin their parents, transitively.
        let mut work: Vec<u64> = vis.keys().copied().collect();
        let mut pinned = std::collections::HashSet::new();
        while let Some(id) = work.pop() {
            if !pinned.insert(id) {
                continue;
            }
            if let Some((pl, pe)) = lineages.get(&id).and_then(|l| l.parent) {
                vis.entry(pl).or_default().push(pe);
                work.push(pl);
            }
        }
        for e in vis.values_mut() {
            e.sort_unstable();
            e.dedup();
        }
        vis
    }

    /// Which versions of one (lineage, block) some visible epoch sees.  `versions`
    /// is newest first; returns a parallel vector of "live" flags.
    pub(crate) fn live_versions(
        versions: &[(u64, MapVal, Box<[u8]>)],
        visible: &[u64],
    ) -> Vec<bool> {
        let mut live = vec![false; versions.len()];
        // Version i is seen by epochs in [e_i, e_{i-1}); e_{-1} = infinity.
        for (i, (e, _, _)) in versions.iter().enumerate() {
            let upper = if i == 0 {
                None
            } else {
                Some(versions[i - 1].0)
            };
            live[i] = visible
                .iter()
                .any(|&v| v >= *e && upper.is_none_or(|u| v < u));
        }
        live
    }

    /// Blocks whose content in `(lineage, epoch)` may differ from `(lineage, base)`:
    /// every block with a version in `(base, epoch]` of this lineage.  Used by failback.
    pub fn changed_blocks(&self, lineage: u64, base: u64, epoch: u64) -> Result<Vec<u64>> {
        let mut out = BTreeMap::new();
        self.db
            .for_prefix(&keys::map_lineage_prefix(lineage), |k, _| {
                if let Some((_, b, e)) = keys::parse_map(k) {
                    if e > base && e <= epoch {
                        out.insert(b, ());
                    }
                }
                true
            })?;
        Ok(out.into_keys().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(cs: u32) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        Store::init(
            &p,
            &InitOptions {
                chunk_size: cs,
                ..Default::default()
            },
        )
        .unwrap();
        let s = Store::open(&p, None).unwrap();
        (dir, s)
    }

    #[test]
    fn point_stays_identical_after_head_overwrite() {
        let (_d, s) = store(4096);
        s.create_group("g").unwrap();
        s.create_volume("g", "d", 64 << 10).unwrap();
        let head = s.view("g", "d", None).unwrap();
        s.write(&head, 100, &[7u8; 10000]).unwrap();
        let p = s.create_point("g", false, None).unwrap();
        s.write(&head, 0, &[9u8; 65536]).unwrap();
        let pv = s.view("g", "d", Some(&p.id.to_string())).unwrap();
        let got = s.read(&pv, 0, 65536).unwrap();
        let mut want = vec![0u8; 65536];
        want[100..10100].fill(7);
        assert_eq!(got, want);
        assert_eq!(s.read(&head, 0, 65536).unwrap(), vec![9u8; 65536]);
        assert!(matches!(s.write(&pv, 0, b"x"), Err(Error::ReadOnly(_))));
    }

    #[test]
    fn small_writes_replay_after_a_crash_and_a_bad_journal_is_refused_unharmed() {
        let (d, s) = store(65536);
        let p = d.path().join("s");
        s.create_group("g").unwrap();
        s.create_volume("g", "d", 1 << 20).unwrap();
        let head = s.view("g", "d", None).unwrap();
        s.write(&head, 0, &[1u8; 65536]).unwrap();
        s.write(&head, 4096, &[2u8; 8192]).unwrap(); // aligned pages
        s.write(&head, 70000, &[3u8; 100]).unwrap(); // unaligned, over a hole
        s.flush().unwrap();
        let mut want = vec![0u8; 1 << 20];
        want[..65536].fill(1);
        want[4096..12288].fill(2);
        want[70000..70100].fill(3);
        assert_eq!(s.read(&head, 0, 1 << 20).unwrap(), want);
        assert!(!s.overlay.is_empty(), "small writes wait in the overlay");
        drop(s); // a crash: no close, no destage
        let jdir = p.join("journal");
        let segs = |d: &Path| std::fs::read_dir(d).unwrap().count();
        assert!(segs(&jdir) >= 1);
        // A foreign file among the segments: refused, naming it, and nothing is lost.
        let bad = jdir.join("0000000000000000.log");
        std::fs::write(&bad, b"garbage that is not a journal").unwrap();
        let err = Store::open(&p, None).err().expect("bad segment refused");
        assert!(err.to_string().contains("0000000000000000.log"), "{err}");
        std::fs::remove_file(&bad).unwrap();
        let s = Store::open(&p, None).unwrap();
        assert!(s.overlay.is_empty(), "replay destages everything");
        assert_eq!(s.journal_segments(), 1, "old segments are trimmed");
        let head = s.view("g", "d", None).unwrap();
        assert_eq!(s.read(&head, 0, 1 << 20).unwrap(), want);
        s.close().unwrap();
    }

    #[test]
    fn a_journal_record_that_does_not_fit_the_block_is_refused() {
        let (d, s) = store(65536);
        let p = d.path().join("s");
        s.create_group("g").unwrap();
        s.create_volume("g", "d", 1 << 20).unwrap();
        let head = s.view("g", "d", None).unwrap();
        s.write(&head, 0, &[5u8; 65536]).unwrap();
        s.flush().unwrap();
        let lineage = head.lineage;
        drop(s);
        {
            // A CRC-valid record that reaches past the end of its block: written by
            // a store with another chunk size, or by a bug; never applied.
            let (j, _) = Journal::open(&p.join("journal"), 4096).unwrap();
            j.append_pages(lineage, 0, 61440, &[9u8; 8192]).unwrap();
        }
        let err = Store::open(&p, None).err().expect("bad record refused");
        let msg = err.to_string();
        assert!(
            msg.contains("61440+8192") && msg.contains("65536-byte block"),
            "{msg}"
        );
        // Nothing stored was touched: without the bad segment the data is intact.
        for e in std::fs::read_dir(p.join("journal")).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        let s = Store::open(&p, None).unwrap();
        let head = s.view("g", "d", None).unwrap();
        assert_eq!(s.read(&head, 0, 65536).unwrap(), vec![5u8; 65536]);
    }

    #[test]
    fn clone_falls_through_and_diverges() {
        let (_d, s) = store(4096);
        s.create_group("g").unwrap();
        s.create_volume("g", "d", 32768).unwrap();
        let head = s.view("g", "d", None).unwrap();
        s.write(&head, 0, &[1u8; 32768]).unwrap();
        s.create_point("g", false, None).unwrap();
        s.create_group("t").unwrap();
        s.clone_volume("g", "d", "latest", "t", "c").unwrap();
        let c = s.view("t", "c", None).unwrap();
        assert_eq!(s.read(&c, 0, 32768).unwrap(), vec![1u8; 32768]);
        s.write(&c, 4096, &[2u8; 4096]).unwrap();
        s.zero(&c, 8192, 100).unwrap();
        let got = s.read(&c, 0, 16384).unwrap();
        assert_eq!(&got[4096..8192], &[2u8; 4096][..]);
        assert_eq!(&got[8192..8292], &[0u8; 100][..]);
        assert_eq!(&got[8292..], &[1u8; 16384 - 8292][..]);
        assert_eq!(s.read(&head, 0, 32768).unwrap(), vec![1u8; 32768]);
        let ext = s.extents(&head, 0, 32768).unwrap();
        assert_eq!(ext.len(), 1);
    }

    #[test]
    fn bad_ranges_names_and_sizes_error() {
        let (_d, s) = store(4096);
        assert!(s.create_volume("nogroup", "d", 4096).is_err());
        s.create_group("g").unwrap();
        assert!(matches!(s.create_group("g"), Err(Error::Exists(_))));
        assert!(s.create_volume("g", "d", 1000).is_err());
        assert!(s.create_volume("g", "bad/name", 4096).is_err());
        s.create_volume("g", "d", 8192).unwrap();
        let h = s.view("g", "d", None).unwrap();
        assert!(s.write(&h, 8000, &[1u8; 200]).is_err());
        assert!(s.read(&h, u64::MAX, 2).is_err());
        assert!(s.view("g", "d", Some("latest")).is_err());
        assert!(s.view("g", "d", Some("zzz")).is_err());
        assert!(s.resize_volume("g", "d", 4096).is_err());
        assert_eq!(s.resize_volume("g", "d", 16384).unwrap().size, 16384);
    }
}
