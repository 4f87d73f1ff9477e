//! Metadata: the RocksDB wrapper and every value it stores.
//!
//! Every value begins with a format version byte.  Hot values (map entries, chunk
//! locations, pack records) have fixed binary layouts; rarely written records
//! (groups, volumes, lineages, points) are versioned JSON, which an operator can read
//! with `ldb` when something goes wrong.

use std::path::{Path, PathBuf};

use rocksdb::{BlockBasedOptions, Options, WriteBatch, WriteOptions, DB};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::engine::keys::{self, ChunkId};
use crate::engine::latch::Latch;
use crate::engine::types::{PointKind, RetentionPolicy, Role};
use crate::error::{Error, Result};

/// Version byte of every value written by this release.
pub const VALUE_V1: u8 = 1;

/// A protected application: a consistency group of volumes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupRec {
    pub name: String,
    pub created: u64,
    /// Retention policy, e.g. `5m:24h,1h:7d`, if one is set.
    #[serde(default)]
    pub retention: Option<RetentionPolicy>,
    /// Retention policy applied to app-consistent points as well, if set.
    #[serde(default)]
    pub app_retention: Option<RetentionPolicy>,
    /// DR role (protected until a failover).
    #[serde(default)]
    pub role: Role,
    /// Fencing epoch: raised by every role change (failover, undo, commit,
    /// change of point).  A replication agent carrying an older one is refused.
    #[serde(default)]
    pub epoch: u64,
    /// Lineages that a role change took the names from and that still await
    /// dropping (their NBD clients are disconnected first; an open FUSE file or
    /// a crash can leave them here until the next attempt).
    #[serde(default)]
    pub retired: Vec<u64>,
    /// The daemon takes a crash-consistent point this often (seconds).
    #[serde(default)]
    pub checkpoint_interval: Option<u64>,
    /// The last replication cycle into the group, as the receiver recorded it
    /// (its shape is `crate::repl::receiver::CycleStatus`).
    #[serde(default)]
    pub replication: Option<serde_json::Value>,
    /// Per peer store (its UUID): this store's newest point of the group that
    /// the peer holds, as `push` (and failback) left it.  Retention keeps it:
    /// it is the base of the next incremental push.
    #[serde(default)]
    pub peers: std::collections::BTreeMap<String, u64>,
}

/// A named volume (`GROUP/DISK`) and the lineage that is its head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeRec {
    pub group: String,
    pub disk: String,
    pub lineage: u64,
    pub size: u64,
    /// Creation sequence number: the group's disk order.
    pub seq: u64,
    pub created: u64,
    /// While the group is failed over (not committed): the replica head, which
    /// `failover --undo` gives the name back to.  `lineage` is then the failover
    /// head.
    #[serde(default)]
    pub replica: Option<Replica>,
}

/// A replica head set aside by a failover.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Replica {
    pub lineage: u64,
    /// Its size in bytes (the failover head has the point's).
    pub size: u64,
}

/// A chain of versions.  A head writes into its lineage at `epoch`; a clone's
/// lineage falls through to `parent` where it has no version of its own.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LineageRec {
    pub id: u64,
    pub epoch: u64,
    pub parent: Option<(u64, u64)>,
    /// True while a volume (head) writes into this lineage.
    pub has_head: bool,
}

/// One volume's state inside a recovery point.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PointVolume {
    pub disk: String,
    pub lineage: u64,
    pub epoch: u64,
    pub size: u64,
}

/// An immutable, group-wide recovery point.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PointRec {
    pub id: u64,
    pub group: String,
    /// Seconds since the Unix epoch.
    pub time: u64,
    pub kind: PointKind,
    pub label: Option<String>,
    pub volumes: Vec<PointVolume>,
    /// Where the point's data came from, when a replication cycle made it.
    #[serde(default)]
    pub origin: Option<Origin>,
}

/// The source of a replicated recovery point: the sending store's UUID (or the
/// agent's host) and its point id, if it had one.  `push` and failback find the
/// newest point two stores have in common through it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Origin {
    /// The source store's UUID, or `agent:HOST` for a `replicate` agent.
    pub source: String,
    pub point: Option<u64>,
    /// When the source took the point (seconds since the Unix epoch), if it
    /// said: the replicated point keeps it as its own time, so its age (RPO,
    /// retention, "the last point before 02:10") is the data's, not the
    /// transfer's.
    #[serde(default)]
    pub time: Option<u64>,
}

/// State of one pack file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackRec {
    pub sealed: bool,
    /// Sealed length in bytes (records written before this field existed lack it;
    /// then the backend is asked).  An object store can answer GC from this record
    /// instead of a HEAD request per pack.
    pub len: Option<u64>,
}

impl PackRec {
    /// A pack being written.
    pub fn open() -> PackRec {
        PackRec {
            sealed: false,
            len: None,
        }
    }

    /// A sealed pack of `len` bytes.
    pub fn sealed(len: u64) -> PackRec {
        PackRec {
            sealed: true,
            len: Some(len),
        }
    }

    /// `[1, sealed]` or `[1, sealed, len u64 BE]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![VALUE_V1, self.sealed as u8];
        if let Some(l) = self.len {
            v.extend_from_slice(&l.to_be_bytes());
        }
        v
    }

    pub fn decode(v: &[u8]) -> Option<PackRec> {
        match v {
            [VALUE_V1, s] => Some(PackRec {
                sealed: *s != 0,
                len: None,
            }),
            [VALUE_V1, s, l @ ..] if l.len() == 8 => Some(PackRec {
                sealed: *s != 0,
                len: Some(u64::from_be_bytes(l.try_into().unwrap())),
            }),
            _ => None,
        }
    }
}

/// What one map version says about a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapVal {
    /// The block reads as zeros (trimmed or written with zeros); shadows the parent.
    Zero,
    /// The block's content is this chunk.
    Data(ChunkId),
}

impl MapVal {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            MapVal::Zero => vec![VALUE_V1, 0],
            MapVal::Data(id) => {
                let mut v = Vec::with_capacity(34);
                v.push(VALUE_V1);
                v.push(1);
                v.extend_from_slice(id);
                v
            }
        }
    }
    pub fn decode(v: &[u8]) -> Option<MapVal> {
        match v {
            [VALUE_V1, 0] => Some(MapVal::Zero),
            [VALUE_V1, 1, id @ ..] if id.len() == 32 => Some(MapVal::Data(id.try_into().ok()?)),
            _ => None,
        }
    }
}

/// Where a chunk lives and how it is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLoc {
    pub pack: u64,
    /// Offset of the record header inside the pack.
    pub offset: u64,
    /// Length of the stored payload (after compression and encryption).
    pub stored_len: u32,
    /// Length of the plaintext.
    pub raw_len: u32,
    /// [`crate::engine::codec`] flags.
    pub flags: u8,
}

impl ChunkLoc {
    pub const LEN: usize = 27;
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut v = [0u8; Self::LEN];
        v[0] = VALUE_V1;
        v[1] = self.flags;
        v[2..10].copy_from_slice(&self.pack.to_be_bytes());
        v[10..18].copy_from_slice(&self.offset.to_be_bytes());
        v[18..22].copy_from_slice(&self.stored_len.to_be_bytes());
        v[22..26].copy_from_slice(&self.raw_len.to_be_bytes());
        v
    }
    pub fn decode(v: &[u8]) -> Option<ChunkLoc> {
        if v.len() != Self::LEN || v[0] != VALUE_V1 {
            return None;
        }
        Some(ChunkLoc {
            flags: v[1],
            pack: u64::from_be_bytes(v[2..10].try_into().ok()?),
            offset: u64::from_be_bytes(v[10..18].try_into().ok()?),
            stored_len: u32::from_be_bytes(v[18..22].try_into().ok()?),
            raw_len: u32::from_be_bytes(v[22..26].try_into().ok()?),
        })
    }
}

/// Encode a JSON record with its version byte.
pub fn encode_rec<T: Serialize>(rec: &T) -> Vec<u8> {
    let mut v = vec![VALUE_V1];
    serde_json::to_writer(&mut v, rec).expect("records always serialize");
    v
}

/// The metadata database.
pub struct Db {
    pub db: DB,
    path: PathBuf,
    /// Set by every unsynced write, cleared by `sync_wal`: a FLUSH after only
    /// journaled small writes skips the WAL sync.
    unsynced: std::sync::atomic::AtomicBool,
    /// Held across a WAL fsync (see [`Db::sync_wal`]).
    wal_sync: std::sync::Mutex<()>,
    /// The store's fsyncgate latch ([`crate::engine::latch`]): a failed WAL write or
    /// sync trips it, and every later write is refused.
    pub latch: Latch,
}

impl Db {
    pub fn open(path: &Path, create: bool) -> Result<Db> {
        let mut opts = Options::default();
        opts.create_if_missing(create);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(3);
        opts.set_max_log_file_size(1 << 20);
        opts.set_recycle_log_file_num(0);
        // Every open starts a MANIFEST; do not preallocate 4 MiB for it (a nearly
        // full disk must still open, see the emergency reserve in store.rs).
        opts.set_manifest_preallocation_size(64 << 10);
        // A bloom filter on the memtable too: most lookups of a write are for chunk
        // ids that do not exist yet (perf: memtable skiplist searches on ingest).
        opts.set_memtable_prefix_bloom_ratio(0.1);
        opts.set_memtable_whole_key_filtering(true);
        let mut bb = BlockBasedOptions::default();
        bb.set_bloom_filter(10.0, false);
        bb.set_block_cache(&rocksdb::Cache::new_lru_cache(256 << 20));
        bb.set_cache_index_and_filter_blocks(true);
        opts.set_block_based_table_factory(&bb);
        let db = DB::open(&opts, path).map_err(|e| {
            let msg = e.to_string();
            if msg.contains("lock") || msg.contains("Resource temporarily unavailable") {
                Error::Unsupported(format!(
                    "metadata database {} is locked by another process \
                     (is `drclone serve` running on this store without its control socket?): {msg}",
                    path.display()
                ))
            } else {
                Error::Db {
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })?;
        Ok(Db {
            db,
            path: path.to_path_buf(),
            unsynced: std::sync::atomic::AtomicBool::new(false),
            wal_sync: std::sync::Mutex::new(()),
            latch: Latch::new(path.parent().unwrap_or(path)),
        })
    }

    pub fn err(&self, e: rocksdb::Error) -> Error {
        Error::Db {
            path: self.path.clone(),
            source: e,
        }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db.get(key).map_err(|e| self.err(e))
    }

    pub fn get_rec<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>> {
        match self.get(key)? {
            None => Ok(None),
            Some(v) => Ok(Some(self.decode_rec(key, &v)?)),
        }
    }

    pub fn decode_rec<T: DeserializeOwned>(&self, key: &[u8], v: &[u8]) -> Result<T> {
        match v.split_first() {
            Some((&VALUE_V1, body)) => serde_json::from_slice(body).map_err(|e| Error::Format {
                store: self.path.clone(),
                what: format!(
                    "record {:?} does not decode: {e}",
                    String::from_utf8_lossy(key)
                ),
            }),
            _ => Err(Error::Format {
                store: self.path.clone(),
                what: format!(
                    "record {:?} has an unknown format version (written by a newer drclone?)",
                    String::from_utf8_lossy(key)
                ),
            }),
        }
    }

    /// Apply a batch; `sync` makes it durable before returning.
    /// Commit a batch (synced or not).  Refused once the latch has tripped; a
    /// failure trips it (RocksDB itself turns read-only after a failed WAL write).
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        self.latch.check()?;
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        crate::fail_point!("db-write", |_| Err(self.latch.trip(
            format!("write to the metadata database {}", self.path.display()),
            "injected failure (failpoint db-write)"
        )));
        self.db.write_opt(batch, &wo).map_err(|e| {
            self.latch.trip(
                format!("write to the metadata database {}", self.path.display()),
                e,
            )
        })?;
        if !sync {
            // After the write: a sync that sees the flag clear started after it.
            self.unsynced
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    /// Make every write so far durable (nothing to do if none was unsynced).
    /// Make every committed batch durable (fsync of the WAL); skipped when nothing
    /// was written unsynced since the last one.  A failure trips the latch.
    ///
    /// One sync at a time: a caller that finds one running waits for it before
    /// it looks at the flag, so it never returns while the fsync that covers its
    /// writes is still in flight (found by tests/breakit.rs: the flag was
    /// cleared before the fsync, and a concurrent FLUSH returned at once).
    pub fn sync_wal(&self) -> Result<()> {
        self.latch.check()?;
        let _one = self.wal_sync.lock().unwrap();
        self.latch.check()?;
        if !self
            .unsynced
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(());
        }
        crate::fail_point!("wal-sync", |_| Err(self.latch.trip(
            format!(
                "sync of the metadata database WAL in {}",
                self.path.display()
            ),
            "injected failure (failpoint wal-sync)"
        )));
        self.db.flush_wal(true).map_err(|e| {
            self.unsynced
                .store(true, std::sync::atomic::Ordering::SeqCst);
            self.latch.trip(
                format!(
                    "sync of the metadata database WAL in {}",
                    self.path.display()
                ),
                e,
            )
        })
    }

    /// All (key, value) pairs whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Box<[u8]>, Box<[u8]>)>> {
        let mut out = Vec::new();
        self.for_prefix(prefix, |k, v| {
            out.push((k.into(), v.into()));
            true
        })?;
        Ok(out)
    }

    /// Call `f` for each pair under `prefix` until it returns false.
    pub fn for_prefix(&self, prefix: &[u8], mut f: impl FnMut(&[u8], &[u8]) -> bool) -> Result<()> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(keys::prefix_end(prefix));
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek(prefix);
        while it.valid() {
            let (k, v) = (it.key().unwrap(), it.value().unwrap());
            if !f(k, v) {
                return Ok(());
            }
            it.next();
        }
        it.status().map_err(|e| self.err(e))
    }

    /// Allocate the next value of a named counter (caller serialises).
    pub fn next_counter(&self, name: &str, batch: &mut WriteBatch) -> Result<u64> {
        self.next_counters(name, 1, batch)
    }

    /// Take `n` consecutive values of counter `name`; returns the first.  The
    /// counter advances when `batch` commits, so a batch takes each counter once:
    /// two calls before the commit would hand out the same value (a failover of
    /// two disks once gave both heads one lineage id).
    pub fn next_counters(&self, name: &str, n: u64, batch: &mut WriteBatch) -> Result<u64> {
        let key = keys::counter(name);
        let cur = match self.get(&key)? {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v[..].try_into().unwrap()),
            _ => 1,
        };
        batch.put(&key, (cur + n).to_be_bytes());
        Ok(cur)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_reject_unknown_versions() {
        let loc = ChunkLoc {
            pack: 3,
            offset: 4096,
            stored_len: 100,
            raw_len: 65536,
            flags: 5,
        };
        assert_eq!(ChunkLoc::decode(&loc.encode()), Some(loc));
        let mut bad = loc.encode();
        bad[0] = 9;
        assert_eq!(ChunkLoc::decode(&bad), None);
        for m in [MapVal::Zero, MapVal::Data([7; 32])] {
            assert_eq!(MapVal::decode(&m.encode()), Some(m));
        }
        assert_eq!(MapVal::decode(&[2, 0]), None);
        assert_eq!(MapVal::decode(&[1, 1, 0]), None);
        let p = PackRec::sealed(123);
        assert_eq!(PackRec::decode(&p.encode()), Some(p));
        let old = PackRec::decode(&[1, 1]).unwrap();
        assert!(
            old.sealed && old.len.is_none(),
            "records without a length still decode"
        );
    }
}
