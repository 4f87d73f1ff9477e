//! Maintenance reports: `df` (space and ratios) and `verify` (re-read every chunk).

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;
use serde::Serialize;

use crate::engine::codec::hex;
use crate::engine::keys::{self, ChunkId};
use crate::engine::meta::{ChunkLoc, MapVal, PackRec};
use crate::engine::store::{Block, Store, HEAD_EPOCH};
use crate::error::Result;

/// Space used by the store and the savings.
#[derive(Debug, Clone, Serialize)]
pub struct DfReport {
    /// Bytes of data (not holes or zeros) the volume heads hold.
    pub logical_bytes: u64,
    /// Bytes referenced by every retained version (heads, points, clones), each
    /// distinct version counted once.
    pub referenced_bytes: u64,
    /// Plaintext bytes of the distinct chunks stored.
    pub unique_bytes: u64,
    /// Bytes of those chunks as stored (compressed, encrypted).
    pub stored_bytes: u64,
    /// Bytes of pack files on disk, including garbage not yet collected.
    pub pack_bytes: u64,
    /// logical_bytes / unique_bytes: what the heads (clones included) expose per
    /// byte of distinct data stored.
    pub dedup_ratio: f64,
    /// unique_bytes / stored_bytes.
    pub compression_ratio: f64,
    pub chunks: u64,
    pub volumes: u64,
    pub points: u64,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        ((a as f64 / b as f64) * 1000.0).round() / 1000.0
    }
}

pub fn df(store: &Store) -> Result<DfReport> {
    store.destage(None)?;
    let cs = store.chunk_size();
    let vols = store.volumes(None)?;
    let mut logical = 0u64;
    for v in &vols {
        let blocks = v.size.div_ceil(cs);
        let mut b = 0;
        while b < blocks {
            let n = (blocks - b).min(1 << 16);
            logical += store
                .resolve(v.lineage, HEAD_EPOCH, b, n)?
                .iter()
                .filter(|x| matches!(x, Block::Data(_)))
                .count() as u64
                * cs;
            b += n;
        }
    }
    let points = store.all_points()?;
    let vis = Store::visible_epochs(&store.lineage_map(), &points);
    let snap = store.db.db.snapshot();
    let mut referenced = 0u64;
    let empty = Vec::new();
    store.scan_map(&snap, |l, _, versions| {
        let live = Store::live_versions(versions, vis.get(&l).unwrap_or(&empty));
        for ((_, v, _), is_live) in versions.iter().zip(live) {
            if is_live && matches!(v, MapVal::Data(_)) {
                referenced += cs;
            }
        }
        Ok(())
    })?;
    let st = store.chunks.stats()?;
    Ok(DfReport {
        logical_bytes: logical,
        referenced_bytes: referenced,
        unique_bytes: st.raw_bytes,
        stored_bytes: st.stored_bytes,
        pack_bytes: store.chunks.backend.bytes()?,
        dedup_ratio: ratio(logical, st.raw_bytes),
        compression_ratio: ratio(st.raw_bytes, st.stored_bytes),
        chunks: st.chunks,
        volumes: vols.len() as u64,
        points: points.len() as u64,
    })
}

/// One chunk that failed verification.
#[derive(Debug, Serialize)]
pub struct BadChunk {
    pub chunk: String,
    pub pack: u64,
    /// Where the pack lives: its file, or its object's URL.
    pub object: String,
    pub offset: u64,
    pub error: String,
    /// Heads, points and clones whose data includes this chunk.
    pub used_by: Vec<String>,
}

/// A sealed pack that is missing or shorter than its sealed length.
#[derive(Debug, Serialize)]
pub struct BadPack {
    pub pack: u64,
    /// What is wrong, naming the file or object.
    pub error: String,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub bad: Vec<BadChunk>,
    /// Sealed packs checked for presence and size (a HEAD each on an object store).
    pub packs_checked: u64,
    pub bad_packs: Vec<BadPack>,
}

/// Re-read and check every chunk; name each bad one and what uses it.
pub fn verify(store: &Store, progress: &indicatif::ProgressBar) -> Result<VerifyReport> {
    // One GC at a time, and not under a verify: a compaction moving chunks while
    // they are read would look like missing packs.
    let _no_gc = store.gc_lock.lock().unwrap();
    // The chunk index and the map from one snapshot: writers (the daemon's clients,
    // the background destager) commit new chunks and the map entries that use them
    // together, so a later map scan would find entries whose chunk this list lacks.
    let snap = store.db.db.snapshot();
    let mut all: Vec<(ChunkId, ChunkLoc)> = Vec::new();
    {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_snapshot(&snap);
        ro.set_iterate_upper_bound(vec![keys::CHUNK + 1]);
        let mut it = store.db.db.raw_iterator_opt(ro);
        it.seek([keys::CHUNK]);
        while it.valid() {
            if let (Some(id), Some(loc)) = (
                keys::parse_chunk(it.key().unwrap()),
                ChunkLoc::decode(it.value().unwrap()),
            ) {
                all.push((id, loc));
            }
            it.next();
        }
        it.status().map_err(|e| store.db.err(e))?;
    }
    progress.set_length(all.len() as u64);
    let mut bad: HashMap<ChunkId, BadChunk> = all
        .par_iter()
        .filter_map(|(id, loc)| {
            let r = store.chunks.read_loc(id, loc);
            progress.inc(1);
            r.err().map(|e| {
                (
                    *id,
                    BadChunk {
                        chunk: hex(id),
                        pack: loc.pack,
                        object: store.chunks.backend.locate(loc.pack),
                        offset: loc.offset,
                        error: e.to_string(),
                        used_by: vec![],
                    },
                )
            })
        })
        .collect();
    progress.finish_and_clear();
    let indexed: HashSet<ChunkId> = all.iter().map(|(id, _)| *id).collect();
    let bytes: u64 = all.iter().map(|(_, l)| l.raw_len as u64).sum();

    // Name the users of bad chunks, and find map entries whose chunk is missing.
    let points = store.all_points()?;
    let lineages = store.lineage_map();
    let vis = Store::visible_epochs(&lineages, &points);
    let mut names: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    for v in store.volumes(None)? {
        names
            .entry((v.lineage, HEAD_EPOCH))
            .or_default()
            .push(format!("{}/{}", v.group, v.disk));
    }
    for p in &points {
        for v in &p.volumes {
            names
                .entry((v.lineage, v.epoch))
                .or_default()
                .push(format!("{}/{}@{}", p.group, v.disk, p.id));
        }
    }
    let vols = store.volumes(None)?;
    for l in lineages.values() {
        if let Some((pl, pe)) = l.parent {
            if let Some(v) = vols.iter().find(|v| v.lineage == l.id) {
                names
                    .entry((pl, pe))
                    .or_default()
                    .push(format!("{}/{} (clone)", v.group, v.disk));
            }
        }
    }
    let empty = Vec::new();
    store.scan_map(&snap, |l, b, versions| {
        let visible = vis.get(&l).unwrap_or(&empty);
        let live = Store::live_versions(versions, visible);
        for (i, ((e, v, _), is_live)) in versions.iter().zip(live).enumerate() {
            let MapVal::Data(id) = v else { continue };
            if !is_live {
                continue;
            }
            if !indexed.contains(id) && !bad.contains_key(id) {
                bad.insert(
                    *id,
                    BadChunk {
                        chunk: hex(id),
                        pack: 0,
                        object: String::new(),
                        offset: 0,
                        error: format!("missing from the chunk index (lineage {l} block {b})"),
                        used_by: vec![],
                    },
                );
            }
            if let Some(bc) = bad.get_mut(id) {
                let upper = if i == 0 {
                    None
                } else {
                    Some(versions[i - 1].0)
                };
                for &ve in visible {
                    if ve >= *e && upper.is_none_or(|u| ve < u) {
                        for n in names.get(&(l, ve)).into_iter().flatten() {
                            let n = format!("{n} (offset {})", b * store.chunk_size());
                            if !bc.used_by.contains(&n) {
                                bc.used_by.push(n);
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    })?;
    let mut bad: Vec<BadChunk> = bad.into_values().collect();
    bad.sort_by(|a, b| (a.pack, a.offset).cmp(&(b.pack, b.offset)));
    // Every sealed pack is where it should be, whole (on an object store: the
    // object exists with its size, whatever the chunks above already read).
    let mut sealed = Vec::new();
    for (k, v) in store.db.scan_prefix(&[keys::PACK])? {
        if let (Some(id), Some(rec)) = (keys::parse_pack(&k), PackRec::decode(&v)) {
            if let (true, Some(len)) = (rec.sealed, rec.len) {
                sealed.push((id, len));
            }
        }
    }
    let mut bad_packs: Vec<BadPack> = sealed
        .par_iter()
        .filter_map(
            |&(id, len)| match store.chunks.backend.check_sealed(id, len) {
                Ok(None) => None,
                Ok(Some(error)) => Some(BadPack { pack: id, error }),
                Err(e) => Some(BadPack {
                    pack: id,
                    error: e.to_string(),
                }),
            },
        )
        .collect();
    bad_packs.sort_by_key(|b| b.pack);
    Ok(VerifyReport {
        ok: bad.is_empty() && bad_packs.is_empty(),
        chunks_checked: all.len() as u64,
        bytes_checked: bytes,
        bad,
        packs_checked: sealed.len() as u64,
        bad_packs,
    })
}
