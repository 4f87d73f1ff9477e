//! The local cache of remote pack data: aligned 1 MiB blocks of uploaded packs,
//! one file each under `STORE/s3-cache/`, evicted least recently used once
//! their total passes the configured size (`init --cache-size`, bytes).
//!
//! Packs are immutable and deleted whole (never rewritten under the same id), so
//! a cached block is never stale; `delete` drops a pack's blocks anyway.  The
//! cache is a cache only: it is emptied at every open (its index lives in
//! memory) and nothing is synced.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, IoContext, Result};

/// Bytes per cached block (and per GET on a miss, at least).
pub const BLOCK: u64 = 1 << 20;

/// Blocks on disk, LRU.
pub struct RangeCache {
    dir: PathBuf,
    capacity: u64,
    lru: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    /// (pack, block) -> (last use tick, bytes)
    map: HashMap<(u64, u64), (u64, u64)>,
    /// tick -> (pack, block)
    order: BTreeMap<u64, (u64, u64)>,
    bytes: u64,
    tick: u64,
}

impl RangeCache {
    /// A cache of at most `capacity` bytes in `dir` (emptied now).
    pub fn new(dir: &Path, capacity: u64) -> Result<RangeCache> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).at(dir)?;
        }
        if capacity > 0 {
            std::fs::create_dir_all(dir).at(dir)?;
        }
        Ok(RangeCache {
            dir: dir.to_path_buf(),
            capacity,
            lru: Mutex::new(Lru::default()),
        })
    }

    pub fn enabled(&self) -> bool {
        self.capacity >= BLOCK
    }

    fn file(&self, pack: u64, block: u64) -> PathBuf {
        self.dir.join(format!("{pack:016x}-{block}"))
    }

    /// Copy `dst.len()` bytes at `off` within cached block `(pack, block)` into
    /// `dst`; false if the block is not cached.
    pub fn read(&self, pack: u64, block: u64, off: u64, dst: &mut [u8]) -> bool {
        {
            let mut l = self.lru.lock().unwrap();
            let Some(&(old, _)) = l.map.get(&(pack, block)) else {
                return false;
            };
            l.tick += 1;
            let t = l.tick;
            l.order.remove(&old);
            l.order.insert(t, (pack, block));
            l.map.get_mut(&(pack, block)).unwrap().0 = t;
        }
        match std::fs::File::open(self.file(pack, block)) {
            Ok(f) => f.read_exact_at(dst, off).is_ok(),
            Err(_) => false,
        }
    }

    /// Keep block `(pack, block)`; evict the least recently used blocks past the
    /// capacity.  Best effort: a failed write only means no caching.
    pub fn insert(&self, pack: u64, block: u64, data: &[u8]) {
        if !self.enabled() {
            return;
        }
        let path = self.file(pack, block);
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, &path)) {
            log::debug!("s3 cache: could not keep {}: {e}", path.display());
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        let mut evict = Vec::new();
        {
            let mut l = self.lru.lock().unwrap();
            l.tick += 1;
            let t = l.tick;
            if let Some((old, size)) = l.map.insert((pack, block), (t, data.len() as u64)) {
                l.order.remove(&old);
                l.bytes -= size;
            }
            l.order.insert(t, (pack, block));
            l.bytes += data.len() as u64;
            while l.bytes > self.capacity {
                let Some((_, key)) = l.order.pop_first() else {
                    break;
                };
                if let Some((_, size)) = l.map.remove(&key) {
                    l.bytes -= size;
                }
                evict.push(key);
            }
        }
        for (p, b) in evict {
            let _ = std::fs::remove_file(self.file(p, b));
        }
    }

    /// Forget every block of `pack` (deleted).
    pub fn drop_pack(&self, pack: u64) {
        let gone: Vec<(u64, u64)> = {
            let mut l = self.lru.lock().unwrap();
            let keys: Vec<(u64, u64)> = l.map.keys().filter(|k| k.0 == pack).copied().collect();
            for k in &keys {
                if let Some((t, size)) = l.map.remove(k) {
                    l.order.remove(&t);
                    l.bytes -= size;
                }
            }
            keys
        };
        for (p, b) in gone {
            let _ = std::fs::remove_file(self.file(p, b));
        }
    }

    /// Bytes cached.
    pub fn bytes(&self) -> u64 {
        self.lru.lock().unwrap().bytes
    }
}

/// An error for a read past a pack's end, shaped like a short local read (the
/// chunk store reports it as a truncated pack).
pub fn short_read(what: &str) -> Error {
    Error::io(what, std::io::ErrorKind::UnexpectedEof.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_kept_read_and_evicted_oldest_first() {
        let d = tempfile::tempdir().unwrap();
        let c = RangeCache::new(&d.path().join("c"), 2 * BLOCK).unwrap();
        let blk = |v: u8| vec![v; BLOCK as usize];
        c.insert(1, 0, &blk(1));
        c.insert(1, 1, &blk(2));
        let mut b = [0u8; 4];
        assert!(c.read(1, 0, 10, &mut b)); // block 0 is now the most recent
        assert_eq!(b, [1; 4]);
        c.insert(2, 0, &blk(3)); // evicts (1, 1)
        assert!(!c.read(1, 1, 0, &mut b));
        assert!(c.read(1, 0, 0, &mut b) && c.read(2, 0, 0, &mut b));
        assert_eq!(c.bytes(), 2 * BLOCK);
        c.drop_pack(2);
        assert!(!c.read(2, 0, 0, &mut b));
        assert_eq!(c.bytes(), BLOCK);
    }
}
