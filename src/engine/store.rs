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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};

use crate::engine::chunks::ChunkStore;
use crate::engine::codec::{Codec, Compression, MasterKey};
use crate::engine::journal::{self, Journal};
use crate::engine::keys::{self, ChunkId};
pub(crate) use crate::engine::map::HeadCache;
use crate::engine::meta::{Db, LineageRec};
use crate::engine::overlay::{self, Overlay};
use crate::engine::pack::LocalPacks;
pub(crate) use crate::engine::write::Destager;
use crate::error::{Error, IoContext, Result};
use crate::util::now_secs;

pub const CONFIG_FILE: &str = "store.json";
pub const STORE_FORMAT: u32 = 1;
pub(crate) const STRIPES: usize = 1024;
/// Writes of at least this many whole blocks hash and compress in parallel.
pub(crate) const PARALLEL_BLOCKS: usize = 4;

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
    /// The store's identity (a random UUID), so two stores can tell each other
    /// apart (replication records where a point came from).  Stores made before it
    /// existed get one on their next open.
    #[serde(default)]
    pub uuid: Option<uuid::Uuid>,
    /// Set when the store was rebuilt from its bucket (`init --from-backend`):
    /// the bucket's marker names the incarnation that owns the prefix, and a
    /// store whose incarnation is not that one uploads and deletes nothing
    /// there (the lost host, come back).  None: the store `init` made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<uuid::Uuid>,
    /// Where sealed packs live when not on the local disk (`init --backend
    /// s3://...`); None: `STORE/packs/` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<crate::engine::s3::S3Config>,
}

/// Options of `drclone init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub chunk_size: u32,
    pub compression: Compression,
    pub encrypt: bool,
    pub key_file: Option<PathBuf>,
    pub pack_size: u64,
    /// Packs on an object store (docs/DESIGN.md §20); None: local packs.
    pub s3: Option<crate::engine::s3::S3Config>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_size: 64 << 10,
            compression: Compression::Zstd,
            encrypt: false,
            key_file: None,
            pack_size: 64 << 20,
            s3: None,
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

/// The store's gate: a readers-writer lock between data writes (shared) and the
/// operations that must see no write half-way through (exclusive): point and clone
/// creation, volume removal, GC's snapshot and pack listing, and GC's removal of
/// zero markers.  Functions that must run under it take its guard as an argument,
/// so the compiler checks the rule (docs/DESIGN.md §6, "Locks").
#[derive(Default)]
pub(crate) struct Gate(RwLock<()>);

/// Proof that the gate is held shared (a data write or a destage is in progress).
pub(crate) struct Shared<'a>(#[allow(dead_code)] std::sync::RwLockReadGuard<'a, ()>);

/// Proof that the gate is held exclusively: no write is between reading its
/// lineage's epoch and committing its map entries, and none can start.
pub(crate) struct Exclusive<'a>(#[allow(dead_code)] std::sync::RwLockWriteGuard<'a, ()>);

impl Gate {
    /// Hold the gate shared (writers, destage).
    pub(crate) fn shared(&self) -> Shared<'_> {
        Shared(self.0.read().unwrap())
    }

    /// Hold the gate exclusively (waits for every shared holder to leave).
    pub(crate) fn exclusive(&self) -> Exclusive<'_> {
        Exclusive(self.0.write().unwrap())
    }
}

/// Views in use: NBD connections and open FUSE files hold a [`Lease`] on the view
/// they serve, and removing a point or a volume that a lease covers is refused
/// (issue 9 hypothesis 8: a served point removed and collected left its reader
/// reading zeros).  Taking a lease and removing a view both run under this mutex,
/// so a lease is never taken on a view that is already gone.
#[derive(Default)]
pub(crate) struct Leases {
    pub(crate) inner: Mutex<HashMap<(u64, u64), Vec<(u64, String)>>>,
    pub(crate) next: std::sync::atomic::AtomicU64,
}

/// A view in use (see [`Store::lease`]); dropping it ends the use.
pub struct Lease {
    pub(crate) leases: Arc<Leases>,
    pub(crate) key: (u64, u64),
    pub(crate) id: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut g = self.leases.inner.lock().unwrap();
        if let Some(v) = g.get_mut(&self.key) {
            v.retain(|(id, _)| *id != self.id);
            if v.is_empty() {
                g.remove(&self.key);
            }
        }
    }
}

pub struct Store {
    pub(crate) dir: PathBuf,
    pub(crate) head_cache: HeadCache,
    pub(crate) bg: Destager,
    pub cfg: Config,
    pub(crate) db: Arc<Db>,
    pub chunks: ChunkStore,
    pub(crate) gate: Gate,
    /// Groups a planned failover is draining: replication into them is refused.
    pub(crate) draining: Mutex<std::collections::HashSet<String>>,
    pub(crate) leases: Arc<Leases>,
    pub(crate) meta: Mutex<()>,
    pub(crate) gc_lock: Mutex<()>,
    /// The metadata's sequence number at the last catalog checkpoint (object
    /// store backends, docs/DESIGN.md §20b).
    pub(crate) catalog_seqno: std::sync::atomic::AtomicU64,
    pub(crate) lineages: RwLock<HashMap<u64, LineageRec>>,
    pub(crate) stripes: Vec<Mutex<()>>,
    /// Write-back overlay of partly written blocks of heads, and the journal that
    /// makes it durable.  See "Small writes" in docs/DESIGN.md.
    pub(crate) overlay: Overlay,
    pub(crate) journal: Journal,
    /// Overlay capacity in bytes of pages.
    pub(crate) dirty_limit: usize,
    /// Journal size that makes the oldest blocks destage so its tail can advance.
    pub(crate) journal_limit: u64,
    /// One writer at a time relieves overlay or journal pressure.
    pub(crate) destaging: Mutex<()>,
    /// Lineages with whole-block map entries committed since the last FLUSH: the
    /// next FLUSH moves them to a new epoch (see [`Store::flush`]).
    pub(crate) unflushed: Mutex<std::collections::HashSet<u64>>,
}

/// After a crash that lost chunks (records no sync covered), delete the map
/// entries that point at them, and the journal horizons written with them.  Only
/// unflushed whole-block writes can point at a lost chunk (I2, I12), and each sits
/// at an epoch after the last FLUSH or journal trim (I11), so the block falls back
/// to a durable version; journal pages a deleted entry had absorbed (horizons are
/// tagged with their entry's epoch) replay over it again.
fn repair_lost_chunks(db: &Db, dir: &Path, lost: Vec<ChunkId>) -> Result<()> {
    if lost.is_empty() {
        return Ok(());
    }
    let lost: std::collections::HashSet<ChunkId> = lost.into_iter().collect();
    let mut b = WriteBatch::default();
    let mut gone = std::collections::HashSet::new();
    db.for_prefix(&[keys::MAP], |k, v| {
        if let Some(crate::engine::meta::MapVal::Data(id)) = crate::engine::meta::MapVal::decode(v)
        {
            if lost.contains(&id) {
                b.delete(k);
                if let Some(key) = keys::parse_map(k) {
                    gone.insert(key);
                }
            }
        }
        true
    })?;
    let entries = b.len();
    db.for_prefix(&[keys::HORIZON], |k, v| {
        if let (Some((_, l, blk)), Some(e)) = (keys::parse_horizon(k), v.get(8..16)) {
            if gone.contains(&(l, blk, u64::from_be_bytes(e.try_into().unwrap()))) {
                b.delete(k);
            }
        }
        true
    })?;
    // The markers go with the repair: a cut before this batch repairs again.
    for id in &lost {
        b.delete(keys::lost(id));
    }
    db.write(b, true)?;
    log::warn!(
        "store {}: {entries} block version(s) written after the last FLUSH lost their data in \
         the crash; those blocks read as of that FLUSH",
        dir.display()
    );
    Ok(())
}

/// Write `store.json` atomically: a temporary file, fsynced, renamed into place,
/// and the directory fsynced, so a store's config exists completely or not at all.
pub(crate) fn write_config(dir: &Path, cfg: &Config) -> Result<()> {
    let cfg_path = dir.join(CONFIG_FILE);
    let tmp = dir.join("store.json.tmp");
    let body = serde_json::to_vec_pretty(cfg).expect("config serializes");
    std::fs::write(&tmp, body)
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .at(&tmp)?;
    std::fs::rename(&tmp, &cfg_path).at(&cfg_path)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).at(dir)
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

/// Chunk sizes a store may have: a power of two from 4 KiB to 4 MiB.
fn valid_chunk_size(cs: u32) -> bool {
    (4096..=(4 << 20)).contains(&cs) && cs.is_power_of_two()
}

/// The chunk size in `store.json` must be valid and the one the store was made
/// with (recorded in the database at init; stores made before that record it
/// on this open).  Reading with another size would return wrong bytes, and
/// writing would damage every volume (found by tests/breakit.rs).
fn check_chunk_size(db: &Db, dir: &Path, cs: u32) -> Result<()> {
    let bad = |what: String| Error::Format {
        store: dir.to_path_buf(),
        what,
    };
    if !valid_chunk_size(cs) {
        return Err(bad(format!(
            "{CONFIG_FILE} says chunk size {cs}, which is not a power of two between 4K              and 4M; restore {CONFIG_FILE} from a backup"
        )));
    }
    match db.get(&keys::setting("chunk_size"))? {
        Some(v) => {
            let rec = <[u8; 4]>::try_from(v.as_slice())
                .map(u32::from_be_bytes)
                .map_err(|_| bad("the recorded chunk size is malformed".into()))?;
            if rec != cs {
                return Err(bad(format!(
                    "{CONFIG_FILE} says chunk size {cs}, but the store was created with                      chunk size {rec}; restore {CONFIG_FILE} (nothing was read or written)"
                )));
            }
        }
        None => {
            let mut b = WriteBatch::default();
            b.put(keys::setting("chunk_size"), cs.to_be_bytes());
            db.write(b, true)?;
        }
    }
    Ok(())
}

impl Store {
    /// Create a new store in `dir` (which may exist but must not hold a store).
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<()> {
        let cs = opts.chunk_size;
        if !valid_chunk_size(cs) {
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
            uuid: Some(uuid::Uuid::new_v4()),
            incarnation: None,
            s3: opts.s3.clone(),
        };
        if let Some(s3) = &cfg.s3 {
            // Reach the bucket now (a wrong endpoint, bucket or key fails init,
            // not the first upload) and claim the prefix for this store.
            crate::engine::s3::claim_prefix(s3, cfg.uuid.unwrap())?;
        }
        let db = Db::open(&dir.join("meta"), true)?;
        let mut b = WriteBatch::default();
        b.put(keys::setting("chunk_size"), cs.to_be_bytes());
        db.write(b, true)?;
        drop(db);
        LocalPacks::new(&dir.join("packs"))?;
        std::fs::create_dir_all(dir.join("journal")).at(&dir.join("journal"))?;
        write_config(dir, &cfg)
    }

    /// The store's UUID.
    pub fn uuid(&self) -> uuid::Uuid {
        self.cfg.uuid.expect("open gives every store a uuid")
    }

    /// Read a store's configuration without opening it.
    pub fn read_config(dir: &Path) -> Result<Config> {
        let path = dir.join(CONFIG_FILE);
        let body = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::invalid(format!(
                    "no drclone store at {} (no {CONFIG_FILE}): give --store DIR or set \
                     DRCLONE_STORE, or create one with `drclone init`",
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
        let mut cfg = Self::read_config(dir)?;
        if cfg.uuid.is_none() {
            cfg.uuid = Some(uuid::Uuid::new_v4());
            write_config(dir, &cfg)?;
            log::info!(
                "store {}: assigned uuid {}",
                dir.display(),
                cfg.uuid.unwrap()
            );
        }
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
        check_chunk_size(&db, dir, cfg.chunk_size)?;
        let db = Arc::new(db);
        let codec = Codec::new(cfg.compression, key.as_ref());
        let backend: Arc<dyn crate::engine::pack::PackBackend> = match &cfg.s3 {
            Some(s3) => Arc::new(
                crate::engine::s3::S3Packs::open(s3, &dir.join("packs"), &dir.join("s3-cache"))?
                    .owned_by(cfg.incarnation),
            ),
            None => Arc::new(LocalPacks::new(&dir.join("packs"))?),
        };
        let chunks = ChunkStore::open(
            db.clone(),
            codec,
            backend,
            dir.to_path_buf(),
            cfg.pack_size,
            cfg.chunk_size as u64,
            true,
        )?;
        crate::fail_point!("open-before-lost-repair", |_| Err(Error::Invalid(
            "failpoint open-before-lost-repair".into()
        )));
        repair_lost_chunks(&db, dir, chunks.take_lost()?)?;
        let mut lineages = HashMap::new();
        for (k, v) in db.scan_prefix(&[keys::LINEAGE])? {
            let rec: LineageRec = db.decode_rec(&k, &v)?;
            lineages.insert(rec.id, rec);
        }
        let overlay = Overlay::new(cfg.chunk_size as usize);
        // Journal horizons: (lineage, block) -> the newest position whose earlier
        // records the map already holds.
        let mut horizons: HashMap<(u64, u64), (u64, u64)> = HashMap::new();
        let mut top_segment = 0u64;
        db.for_prefix(&[keys::HORIZON], |k, v| {
            if let (Some((seg, l, b)), Some(off)) = (keys::parse_horizon(k), v.get(0..8)) {
                let pos = (seg, u64::from_be_bytes(off.try_into().unwrap()));
                let h = horizons.entry((l, b)).or_insert(pos);
                *h = (*h).max(pos);
                top_segment = top_segment.max(seg);
            }
            true
        })?;
        let jdir = dir.join("journal");
        let (mut journal, replay) = match Journal::open(&jdir, overlay.page_size(), top_segment + 1)
        {
            Err(e) if is_enospc(&e) && release_reserve(dir) => {
                Journal::open(&jdir, overlay.page_size(), top_segment + 1)?
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
            gate: Gate::default(),
            draining: Mutex::default(),
            leases: Arc::default(),
            meta: Mutex::new(()),
            gc_lock: Mutex::new(()),
            catalog_seqno: std::sync::atomic::AtomicU64::new(0),
            lineages: RwLock::new(lineages),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            overlay,
            journal,
            dirty_limit: dirty_limit(),
            journal_limit,
            destaging: Mutex::new(()),
            unflushed: Mutex::new(Default::default()),
        };
        store.replay_journal(replay, &horizons)?;
        // What this open recovered is the new durable baseline, but map entries
        // at a lineage's current epoch may have reached the disk without a FLUSH
        // having promised them.  Every head moves to a new epoch (I11), so no
        // write of this run replaces a recovered entry in place: if such a write's
        // entry survived a power cut without its chunk, the repair at the next
        // open would delete the key and expose an older version (found by
        // tests/powerloss.rs, seed 3005).
        {
            let heads: Vec<u64> = store
                .lineages
                .read()
                .unwrap()
                .values()
                .filter(|l| l.has_head)
                .map(|l| l.id)
                .collect();
            store.unflushed.lock().unwrap().extend(heads);
            let g = store.gate.exclusive();
            store.make_durable_locked(&g)?;
        }
        if crate::engine::latch::was_latched(dir) {
            // Recovered (and synced by the replay's trim): the marker goes.
            let m = dir.join(crate::engine::latch::MARKER);
            std::fs::remove_file(&m).at(&m)?;
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .at(dir)?;
            log::info!("store {}: recovered after a latched run", dir.display());
        }
        keep_reserve(dir);
        // An object store's catalog catches up with what this open recovered.
        store.checkpoint_catalog("open")?;
        Ok(store)
    }

    /// Apply the journal a previous run left (it did not close cleanly), destage
    /// it all into the map, sync, and drop the old segments.  A pages record is
    /// skipped when the block's journal horizon covers it (the map already holds
    /// it, or a later whole-block write replaced it); a tombstone (written by
    /// earlier versions) voids the block's earlier records.
    fn replay_journal(
        &self,
        records: Vec<(journal::Record, u64)>,
        horizons: &HashMap<(u64, u64), (u64, u64)>,
    ) -> Result<()> {
        if records.is_empty() {
            return self.trim_journal();
        }
        let (cs, page) = (self.chunk_size() as usize, self.overlay.page_size());
        let (n, mut skipped) = (records.len(), 0usize);
        for (r, start) in records {
            let key = (r.lineage, r.block);
            let rel = if r.kind == journal::KIND_TOMBSTONE {
                self.overlay.remove(key).unwrap_or_default()
            } else if horizons.get(&key).is_some_and(|h| (r.segment, start) < *h) {
                skipped += 1;
                self.journal.release(r.segment, r.data.len().div_ceil(page));
                continue;
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
            "store {}: replayed {n} journal record(s) into {} block(s) ({skipped} already in the map)",
            self.dir.display(),
            self.overlay.len()
        );
        self.destage(None)?;
        self.trim_journal()
    }

    pub(crate) fn release(&self, rel: overlay::Released) {
        for (seg, pages) in rel {
            self.journal.release(seg, pages);
        }
    }

    /// fdatasync the journal; a failure trips the latch (fsyncgate: no path
    /// may retry after a failed journal sync).
    pub(crate) fn sync_journal(&self) -> Result<()> {
        crate::engine::latch::guarded(
            &self.db.latch,
            || {
                format!(
                    "fdatasync of the journal in {}",
                    self.dir.join("journal").display()
                )
            },
            || self.journal.sync(),
        )
    }

    /// Delete journal segments whose pages are all destaged, after syncing what
    /// they were destaged into; then drop the horizons that covered them.
    pub(crate) fn trim_journal(&self) -> Result<()> {
        // The sync before segments go also moves every lineage with unflushed map
        // entries to a new epoch (I11): once their journal records are gone, no
        // later write may replace those entries in place.
        // The journal first: a record that overwrote a dead one's pages must be
        // durable before the dead one's segment goes (`Journal::trim`).
        let sync = || {
            self.sync_journal()?;
            let g = self.gate.exclusive();
            self.make_durable_locked(&g)
        };
        if let Some(seg) = self.journal.trim(sync)? {
            let mut b = WriteBatch::default();
            b.delete_range(vec![keys::HORIZON], keys::horizon_after(seg));
            self.db.write(b, false)?;
        }
        Ok(())
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
    /// journal, whole blocks in packs and the map.  Refused once the latch has
    /// tripped; a failed sync trips it (fsyncgate: no later FLUSH may succeed).
    ///
    /// Lineages that took whole-block writes since the last FLUSH move to a new
    /// epoch first (under the exclusive gate, one unsynced batch that this FLUSH's
    /// WAL sync makes durable).  So a whole-block write never overwrites, in
    /// place, a map entry a FLUSH made durable: if RocksDB persists a later,
    /// unflushed entry on its own (WAL write-back, a memtable flush) and its chunk
    /// is lost in a power cut, recovery deletes that entry and the block reads as
    /// of the last FLUSH (invariant I11, docs/DESIGN.md §8).
    pub fn flush(&self) -> Result<()> {
        self.db.latch.check()?;
        self.sync_journal()?;
        let dirty: Vec<u64> = std::mem::take(&mut *self.unflushed.lock().unwrap())
            .into_iter()
            .collect();
        if !dirty.is_empty() {
            let g = self.gate.exclusive();
            self.bump_epochs(&g, &dirty)?;
        }
        self.chunks.sync()?;
        self.trim_journal()
    }

    /// Everything acknowledged so far durable, with the gate held exclusively: the
    /// epoch move of [`Store::flush`], then packs and WAL synced.  GC calls it
    /// before its snapshot, so every version its snapshot holds is durable and no
    /// later write can replace one in place: a version GC drops as shadowed stays
    /// shadowed after any power cut (found by tests/powerloss.rs: GC dropped a
    /// flushed version that an unflushed newer one hid, and the newer one was then
    /// lost in the cut).
    pub(crate) fn make_durable_locked(&self, gate: &Exclusive<'_>) -> Result<()> {
        let dirty: Vec<u64> = std::mem::take(&mut *self.unflushed.lock().unwrap())
            .into_iter()
            .collect();
        if !dirty.is_empty() {
            self.bump_epochs(gate, &dirty)?;
        }
        self.chunks.sync()
    }

    /// Move `lineages` (those that still have a head) to a new epoch.
    fn bump_epochs(&self, _gate: &Exclusive<'_>, lineages: &[u64]) -> Result<()> {
        let mut lins = self.lineages.write().unwrap();
        let mut b = WriteBatch::default();
        let mut updated = Vec::new();
        for id in lineages {
            if let Some(l) = lins.get(id).filter(|l| l.has_head) {
                let mut l = l.clone();
                l.epoch += 1;
                b.put(keys::lineage(l.id), crate::engine::meta::encode_rec(&l));
                updated.push(l);
            }
        }
        self.db.write(b, false)?;
        for l in updated {
            lins.insert(l.id, l);
        }
        Ok(())
    }

    /// Destage everything, seal the open pack and empty the journal (clean
    /// shutdown).
    pub fn close(&self) -> Result<()> {
        self.stop_destager();
        self.db.latch.check()?;
        self.destage(None)?;
        self.chunks.seal_open()?;
        {
            // A clean close is a FLUSH: the lineages it destaged move to a new
            // epoch (I11) as their entries become durable.
            let g = self.gate.exclusive();
            self.make_durable_locked(&g)?;
        }
        self.journal.reset()?;
        let mut b = WriteBatch::default();
        b.delete_range(vec![keys::HORIZON], vec![keys::HORIZON + 1]);
        self.db.write(b, true)?;
        // An object store gets the final catalog, and a while to take it and
        // the packs before it (the next open uploads whatever is left).
        if self.checkpoint_catalog("close")? {
            if let Some(up) = self.chunks.backend.catalog() {
                let wait = std::env::var("DRCLONE_S3_CLOSE_WAIT_SECS")
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(30);
                // ...but not while it fails: a command run while the object store
                // is down (`status` at 3 a.m.) must not hang for the whole wait.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
                let failing = || {
                    up.status()
                        .error
                        .or_else(|| self.chunks.backend.backlog().and_then(|b| b.last_error))
                };
                let mut why = None;
                while !up.wait_idle(std::time::Duration::from_millis(200)) {
                    why = failing();
                    if why.is_some() || std::time::Instant::now() >= deadline {
                        break;
                    }
                }
                if !up.wait_idle(std::time::Duration::ZERO) {
                    log::warn!(
                        "store {}: the object store did not take the last packs and catalog{}; \
                         they stay local and the next open uploads them",
                        self.dir.display(),
                        why.map_or(format!(" within {wait} s"), |e| format!(" ({e})"))
                    );
                }
            }
        }
        Ok(())
    }

    /// The store's fsyncgate latch (see [`crate::engine::latch`]).
    pub fn latch(&self) -> &crate::engine::latch::Latch {
        &self.db.latch
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
            let (j, _) = Journal::open(&p.join("journal"), 4096, 0).unwrap();
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
