//! The versioned block map: `M|lineage|block|!epoch` keys, resolving a view's
//! blocks in one seek each, extents (block status), and the liveness rule GC uses
//! (docs/DESIGN.md §5, §7).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::engine::keys;
use crate::engine::meta::{LineageRec, MapVal, PointRec};
use crate::engine::store::*;
use crate::error::{Error, Result};

/// Head block mappings of single-block lookups (random reads, destage), so they
/// skip a RocksDB iterator.  Writers of a head's map entries invalidate under a
/// stripe mutex that also guards a generation counter; a reader inserts what it
/// resolved only if the generation did not move meanwhile, so a lookup that raced
/// a commit never caches the old value.  `DRCLONE_MAP_CACHE_MIB` (default 32).
pub(crate) struct HeadCache {
    map: quick_cache::sync::Cache<(u64, u64), Block>,
    gens: Vec<Mutex<u64>>,
}

impl HeadCache {
    pub(crate) fn new() -> HeadCache {
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

    pub(crate) fn stripe(&self, key: (u64, u64)) -> &Mutex<u64> {
        let h = key.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ key.1;
        &self.gens[(h % self.gens.len() as u64) as usize]
    }

    pub(crate) fn generation(&self, key: (u64, u64)) -> u64 {
        *self.stripe(key).lock().unwrap()
    }

    pub(crate) fn insert_if(&self, key: (u64, u64), generation: u64, b: Block) {
        let g = self.stripe(key).lock().unwrap();
        if *g == generation {
            self.map.insert(key, b);
        }
    }

    /// A head's map entry for `key` changed (called after the commit).
    pub(crate) fn invalidate(&self, key: (u64, u64)) {
        let mut g = self.stripe(key).lock().unwrap();
        *g += 1;
        self.map.remove(&key);
    }

    pub(crate) fn clear(&self) {
        for g in &self.gens {
            *g.lock().unwrap() += 1;
        }
        self.map.clear();
    }
}

/// The background destager's state (see [`Store::start_destager`]).

impl Store {
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

    pub(crate) fn resolve_uncached(
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

    pub(crate) fn resolve_one_lineage(
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

    /// Extents of a range: (offset, length, block kind) with runs merged.
    pub fn extents(&self, view: &View, offset: u64, len: u64) -> Result<Vec<(u64, u64, Block)>> {
        self.check_range(view, offset, len)?;
        if len == 0 {
            return Ok(vec![]);
        }
        let cs = self.chunk_size();
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        // The overlay BEFORE the map, as reads do: a block leaves the overlay only
        // after its map entry is committed, so a block destaged between the two
        // looks is seen in the map.  The other order reported a hole over an
        // acknowledged write (hypothesis 5 of issue 9).
        let in_overlay: std::collections::HashSet<u64> = if view.epoch == HEAD_EPOCH {
            self.overlay.blocks_in(view.lineage, first, last)
        } else {
            Default::default()
        };
        crate::fail_point!("extents-between-overlay-and-map");
        let blocks = self.resolve(view.lineage, view.epoch, first, last - first + 1)?;
        let mut out: Vec<(u64, u64, Block)> = Vec::new();
        for (i, blk) in blocks.into_iter().enumerate() {
            let b = first + i as u64;
            // A block with overlay pages reports as data (pages may hold zeros, like
            // any written data).
            let blk = if in_overlay.contains(&b) {
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

    /// Whether `lineage` may read anything but zeros: it has a version of any
    /// block, or a parent (a clone).  Stops at the first key.  Errors: RocksDB.
    pub fn has_data(&self, lineage: u64) -> Result<bool> {
        if self.lineage(lineage).and_then(|l| l.parent).is_some() {
            return Ok(true);
        }
        let mut any = false;
        self.db
            .for_prefix(&keys::map_lineage_prefix(lineage), |_, _| {
                any = true;
                false
            })?;
        Ok(any)
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
