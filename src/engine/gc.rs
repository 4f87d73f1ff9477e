//! Garbage collection: drop map versions no view can see, free chunks no version
//! references, and compact or delete packs.
//!
//! # Algorithm
//! 1. Under the store's gate (no write half-way through), start recording touched
//!    chunks, take a RocksDB snapshot, and capture lineages and points.
//! 2. Compute each lineage's visible epochs (retained points, clone parents, the head).
//!    Walk every map version in the snapshot: a version is live if some visible
//!    epoch lies in `[its epoch, the next newer version's epoch)`.  Delete dead
//!    versions, and drop a parentless lineage's oldest version when it is a zero
//!    marker (it shadows nothing).  Mark the chunks of live versions.
//! 3. Sweep the chunk index of the snapshot: every chunk neither marked nor touched
//!    since step 1 is deleted from the index (see [`crate::engine::chunks`] for why the
//!    touched rule closes the race with writers that deduplicate against it).
//! 4. Delete packs with no live chunk; rewrite sealed packs whose dead fraction is at
//!    least [`COMPACT_DEAD_FRACTION`] into the open pack, then delete them.
//!
//! # Why it is safe with writers running
//! * Writers only ever write at their lineage's current epoch, whose newest version
//!   is always visible (the head), so no key a writer writes is ever judged dead.
//! * A lineage with no head, no point and no clone can never become visible again.
//! * A chunk written or deduplicated after step 1 is in the touched set; a chunk
//!   written before step 1 by a write whose map entry was not yet committed cannot
//!   exist, because writers hold the gate from storing chunks until their map commit.

use std::collections::{HashMap, HashSet};

use rocksdb::WriteBatch;
use serde::Serialize;

use crate::engine::keys::{self, ChunkId};
use crate::engine::meta::{ChunkLoc, MapVal, PackRec};
use crate::engine::pack::RECORD_HEADER_LEN;
use crate::engine::store::{Exclusive, Store};
use crate::error::Result;

/// Rewrite a sealed pack once this fraction of it is dead.
pub const COMPACT_DEAD_FRACTION: f64 = 0.2;
const BATCH: usize = 4096;

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub versions_dropped: u64,
    pub lineages_dropped: u64,
    pub chunks_freed: u64,
    pub packs_deleted: u64,
    pub packs_compacted: u64,
    pub bytes_moved: u64,
    pub pack_bytes_before: u64,
    pub pack_bytes_after: u64,
}

pub fn gc(store: &Store) -> Result<GcReport> {
    let _one = store.gc_lock.lock().unwrap();
    let mut rep = GcReport {
        pack_bytes_before: store.chunks.backend.bytes()?,
        ..Default::default()
    };
    let res = run(store, &mut rep);
    store.chunks.end_gc();
    res?;
    crate::fail_point!("gc-before-catalog");
    // The deleted packs leave the object store once a catalog without them is
    // there (its sweep), and the points a GC delayed get their checkpoint.
    store.checkpoint_catalog_gc_held("gc")?;
    rep.pack_bytes_after = store.chunks.backend.bytes()?;
    log::info!(
        "gc: dropped {} versions, {} lineages, freed {} chunks, deleted {} packs, compacted {}",
        rep.versions_dropped,
        rep.lineages_dropped,
        rep.chunks_freed,
        rep.packs_deleted,
        rep.packs_compacted
    );
    Ok(rep)
}

fn run(store: &Store, rep: &mut GcReport) -> Result<()> {
    let db = &store.db;
    let (snap, lineages, points) = {
        let _m = store.meta.lock().unwrap();
        let g = store.gate.exclusive();
        store.make_durable_locked(&g)?;
        store.chunks.begin_gc();
        (db.db.snapshot(), store.lineage_map(), store.all_points()?)
    };
    let vis = Store::visible_epochs(&lineages, &points);

    // Phase 2: versions.
    let mut live: HashSet<ChunkId> = HashSet::new();
    let mut batch = WriteBatch::default();
    let mut zero_candidates: Vec<Box<[u8]>> = Vec::new();
    let empty: Vec<u64> = Vec::new();
    store.scan_map(&snap, |l, _b, versions| {
        let visible = vis.get(&l).unwrap_or(&empty);
        let flags = Store::live_versions(versions, visible);
        let parentless = lineages.get(&l).is_some_and(|r| r.parent.is_none());
        let oldest_live = flags.iter().rposition(|&x| x);
        for (i, ((_, val, key), is_live)) in versions.iter().zip(&flags).enumerate() {
            let droppable_zero =
                Some(i) == oldest_live && parentless && matches!(val, MapVal::Zero);
            if droppable_zero {
                // Live, but it shadows nothing.  A writer may rewrite this very key
                // (it is at the lineage's current epoch) after the snapshot: it is
                // dropped later, under the gate, only if it still holds a zero.
                zero_candidates.push(key.clone());
            } else if *is_live {
                if let MapVal::Data(id) = val {
                    live.insert(*id);
                }
            } else {
                // Dead versions are at epochs no writer writes again (writers only
                // write at the current epoch, whose newest version the head sees).
                batch.delete(key);
                rep.versions_dropped += 1;
            }
        }
        if batch.len() >= BATCH {
            db.write(std::mem::take(&mut batch), false)?;
        }
        Ok(())
    })?;
    for l in lineages.values() {
        if !vis.contains_key(&l.id) {
            store.remove_lineage(l.id, &mut batch);
            rep.lineages_dropped += 1;
        }
    }
    db.write(batch, true)?;
    crate::fail_point!("gc-before-zero-drop");
    for keys in zero_candidates.chunks(BATCH) {
        let g = store.gate.exclusive();
        rep.versions_dropped += drop_zero_markers(store, &g, keys)?;
    }
    store.forget_cached_mappings();

    // Phase 3: chunks.
    let mut dead: Vec<(ChunkId, ChunkLoc)> = Vec::new();
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_snapshot(&snap);
    ro.set_iterate_upper_bound(vec![keys::CHUNK + 1]);
    let mut it = db.db.raw_iterator_opt(ro);
    it.seek([keys::CHUNK]);
    while it.valid() {
        if let (Some(id), Some(loc)) = (
            keys::parse_chunk(it.key().unwrap()),
            ChunkLoc::decode(it.value().unwrap()),
        ) {
            if !live.contains(&id) {
                dead.push((id, loc));
                if dead.len() >= BATCH {
                    rep.chunks_freed += store.chunks.sweep(&dead)?.len() as u64;
                    dead.clear();
                }
            }
        }
        it.next();
    }
    it.status().map_err(|e| db.err(e))?;
    drop(it);
    rep.chunks_freed += store.chunks.sweep(&dead)?.len() as u64;
    drop(live);
    drop(snap);

    // Phase 4: packs.  Seal the open pack first so its garbage can be reclaimed too.
    // Under the gate, no write is between appending a record and committing its
    // index entries, so every pack sealed now has all its `R` entries: only those
    // are candidates.  The backend's listing is taken under the gate as well: a
    // pack opened after the gate is released is in neither list, and is never
    // mistaken for an orphan (hypothesis 1 of issue 9: a listing taken after the
    // gate was released held packs writers had opened meanwhile, which GC then
    // deleted as orphans).
    let (open, known, listed) = {
        let _g = store.gate.exclusive();
        store.chunks.seal_open()?;
        let mut known: HashMap<u64, PackRec> = HashMap::new();
        for (k, v) in db.scan_prefix(&[keys::PACK])? {
            if let (Some(id), Some(rec)) = (keys::parse_pack(&k), PackRec::decode(&v)) {
                known.insert(id, rec);
            }
        }
        (
            store.chunks.open_pack_id(),
            known,
            store.chunks.backend.list()?,
        )
    };
    crate::fail_point!("gc-after-pack-listing");
    for id in listed {
        if !known.contains_key(&id) {
            log::info!("gc: deleting orphan pack {id} (no index record)");
            store.chunks.backend.delete(id)?;
            rep.packs_deleted += 1;
        }
    }
    let mut ids: Vec<(u64, Option<u64>)> = known
        .into_iter()
        .filter(|(id, rec)| rec.sealed && Some(*id) != open)
        .map(|(id, rec)| (id, rec.len))
        .collect();
    ids.sort_unstable();
    for (id, len) in ids {
        let total = match len {
            Some(l) => l,
            None => store.chunks.backend.len(id)?.unwrap_or(0),
        };
        let mut live_bytes = 0u64;
        db.for_prefix(&keys::reverse_prefix(id), |k, v| {
            if let (Some((_, off)), Ok(cid)) = (keys::parse_reverse(k), <ChunkId>::try_from(v)) {
                if let Ok(Some(loc)) = store.chunks.loc(&cid) {
                    if loc.pack == id && loc.offset == off {
                        live_bytes += RECORD_HEADER_LEN as u64 + loc.stored_len as u64;
                    }
                }
            }
            true
        })?;
        if live_bytes == 0 {
            let mut b = WriteBatch::default();
            b.delete_range(
                keys::reverse_prefix(id).to_vec(),
                keys::prefix_end(&keys::reverse_prefix(id)),
            );
            b.delete(keys::pack(id));
            db.write(b, true)?;
            store.chunks.backend.delete(id)?;
            rep.packs_deleted += 1;
        } else if total > 0
            && (total - live_bytes.min(total)) as f64 >= COMPACT_DEAD_FRACTION * total as f64
        {
            rep.bytes_moved += store.chunks.compact(id)?;
            rep.packs_compacted += 1;
        }
    }
    Ok(())
}

/// Delete the zero markers in `keys` that still hold a zero marker.  Under the gate
/// no writer is between reading its epoch and committing, so what is read here is
/// what a writer last committed: a key a writer rewrote with data since GC's
/// snapshot keeps its data (hypothesis 2 of issue 9: the key was deleted from the
/// snapshot's word, and a fresh write at the same epoch was lost with it).
fn drop_zero_markers(store: &Store, _gate: &Exclusive<'_>, keys: &[Box<[u8]>]) -> Result<u64> {
    let mut batch = WriteBatch::default();
    for k in keys {
        if let Some(v) = store.db.get(k)? {
            if MapVal::decode(&v) == Some(MapVal::Zero) {
                batch.delete(k);
            }
        }
    }
    let n = batch.len() as u64;
    store.db.write(batch, false)?;
    Ok(n)
}
