//! Store to store: `drclone push GROUP --target HOST:PORT` sends another
//! drclone store the recovery points of a group that it lacks, incrementally
//! from the newest point the two have in common, the way `zfs send -I` does
//! (docs/DESIGN.md §18).  A first push is a full seed.
//!
//! The target names, in WELCOME, the points it holds that came from this store
//! (their [`crate::engine::meta::Origin`]: this store's UUID and point id).  The
//! newest of those this store still holds is the base.  BASE asks the target to
//! check that its heads still hold exactly that point (nothing written or
//! failed over since) and refuses otherwise: a push never overwrites writes the
//! sender does not know of.  Then every later point goes as one cycle: the
//! blocks that changed since the previous one (from the block map's versions,
//! [`Store::changed_blocks`], or the whole map when the lineage changed), their
//! chunks offered (HAVE) and only the lacking ones sent, and a COMMIT that
//! lands the point with its label, kind and origin.

use std::time::Instant;

use serde::Serialize;

use crate::engine::keys::ChunkId;
use crate::engine::meta::{PointRec, PointVolume};
use crate::engine::store::Block;
use crate::engine::types::PointKind;
use crate::error::{Error, Result};
use crate::repl::link::{send_lacking, ClientTls, Link};
use crate::repl::wire::{self, Entry};
use crate::Store;

/// Blocks resolved, offered and mapped per round.
const BATCH: u64 = 4096;

/// What a push needs.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// `HOST:PORT` of the target's replication receiver.
    pub target: String,
    pub group: String,
    pub token: Option<String>,
    pub tls: Option<ClientTls>,
    /// Bytes per second on the wire, if limited.
    pub bwlimit: Option<u64>,
    /// Show a progress bar (points sent).
    pub progress: bool,
    /// Failback: if the target's heads moved on since the common point, have
    /// it keep them in a `diverged-TIME` point and roll back, instead of
    /// refusing.
    pub keep_diverged: bool,
}

/// What a push did (`--json` prints it).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PushReport {
    pub group: String,
    /// The newest point both stores held before (this store's id), if any.
    pub base: Option<u64>,
    /// The points sent: (this store's id, the target's id), oldest first.
    pub points: Vec<(u64, u64)>,
    /// Protocol bytes written to the connection.
    pub bytes_sent: u64,
    /// Bytes of blocks that changed between the points sent.
    pub bytes_logical: u64,
    pub chunks_sent: u64,
    pub duration_ms: u64,
    /// The target's point that keeps writes its heads had after the common
    /// point (failback of a diverged site), if it made one.
    pub diverged: Option<u64>,
}

/// Push `opts.group`'s points that the target lacks.  Errors: the group or
/// its points missing here; an encrypted store (chunk ids are keyed, the wire's
/// are BLAKE3 of the data); a target of another chunk size; the target's
/// refusals (token, a head that moved on, a failed-over group) by name; I/O.
pub fn push(store: &Store, opts: &PushOptions) -> Result<PushReport> {
    let t0 = Instant::now();
    let group = &opts.group;
    if store.cfg.encrypted {
        return Err(Error::Unsupported(
            "push from an encrypted store is not supported yet".into(),
        ));
    }
    let points = store.points(group)?;
    if points.is_empty() {
        return Err(Error::invalid(format!(
            "group {group} has no recovery point to push: take one first (drclone point \
             create {group})"
        )));
    }
    let mut link = Link::open(&opts.target, opts.tls.as_ref(), opts.bwlimit)?;
    // HELLO names every disk any point holds, at its largest size.
    let mut volumes: Vec<(String, u64)> = Vec::new();
    for pv in points.iter().flat_map(|p| &p.volumes) {
        match volumes.iter_mut().find(|(d, _)| *d == pv.disk) {
            Some((_, s)) => *s = (*s).max(pv.size),
            None => volumes.push((pv.disk.clone(), pv.size)),
        }
    }
    let hello = wire::Hello {
        token: opts.token.clone(),
        group: group.clone(),
        volumes,
        source: store.uuid().to_string(),
        epoch: None,
    };
    link.send_json(wire::HELLO, &hello)?;
    let welcome: wire::Welcome = wire::json("WELCOME", &link.expect(wire::WELCOME)?)?;
    if welcome.chunk_size != store.chunk_size() {
        return Err(Error::Unsupported(format!(
            "the target's chunk size is {} bytes and this store's {}: push needs stores of \
             one chunk size",
            welcome.chunk_size,
            store.chunk_size()
        )));
    }
    // The newest point in common that this store still holds: one it sent
    // the target, or one the target sent it (failback, re-protection).
    let target_store = welcome.store.clone();
    let common = welcome
        .origins
        .iter()
        .filter_map(|&(sp, tp)| points.iter().find(|p| p.id == sp).map(|p| (p, tp)))
        .chain(points.iter().filter_map(|p| match &p.origin {
            Some(o) if o.source == target_store => o.point.map(|tp| (p, tp)),
            _ => None,
        }))
        .max_by_key(|(p, _)| p.id);
    let mut report = PushReport {
        group: group.clone(),
        base: common.map(|(p, _)| p.id),
        points: Vec::new(),
        bytes_sent: 0,
        bytes_logical: 0,
        chunks_sent: 0,
        duration_ms: 0,
        diverged: None,
    };
    let todo: Vec<&PointRec> = points
        .iter()
        .filter(|p| common.is_none_or(|(c, _)| p.id > c.id))
        .collect();
    if todo.is_empty() {
        log::info!("push {group}: the target holds every point already");
        report.bytes_sent = link.sent();
        report.duration_ms = t0.elapsed().as_millis() as u64;
        return Ok(report);
    }
    link.send_json(
        wire::BASE,
        &wire::Base {
            point: common.map(|(_, tp)| tp),
            keep_diverged: opts.keep_diverged,
        },
    )?;
    let ok: wire::BaseOk = wire::json("BASE_OK", &link.expect(wire::BASE_OK)?)?;
    report.diverged = ok.diverged;
    let bar = if opts.progress {
        crate::engine::imex::progress_bar(todo.len() as u64, &format!("pushing {group}"))
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut prev = common.map(|(p, _)| p);
    for p in todo {
        for pv in &p.volumes {
            let was = prev.and_then(|q| q.volumes.iter().find(|v| v.disk == pv.disk));
            let (logical, sent) = send_volume(store, &mut link, pv, was)?;
            report.bytes_logical += logical;
            report.chunks_sent += sent;
        }
        link.send_json(
            wire::COMMIT,
            &wire::Commit {
                label: p.label.clone(),
                app: p.kind == PointKind::App,
                source_point: Some(p.id),
            },
        )?;
        let done: wire::Committed = wire::json("COMMITTED", &link.expect(wire::COMMITTED)?)?;
        log::info!(
            "push {group}: point {} landed as point {} on {}",
            p.id,
            done.point,
            opts.target
        );
        report.points.push((p.id, done.point));
        bar.inc(1);
        prev = Some(p);
    }
    bar.finish_and_clear();
    report.bytes_sent = link.sent();
    report.duration_ms = t0.elapsed().as_millis() as u64;
    Ok(report)
}

/// Send what `pv` changed since `was` (the same disk in the previous point the
/// target holds, if any): returns (changed bytes, chunks sent).
fn send_volume(
    store: &Store,
    link: &mut Link,
    pv: &PointVolume,
    was: Option<&PointVolume>,
) -> Result<(u64, u64)> {
    let cs = store.chunk_size();
    let blocks = pv.size.div_ceil(cs);
    // Blocks to look at: those with a version since the previous point on the
    // same lineage; every block otherwise.
    let changed: Option<Vec<u64>> = match was {
        Some(w) => changed_since(store, w, pv)?.map(|mut c| {
            // A volume that grew: its new blocks read as zeros on the target already.
            c.retain(|b| *b < blocks);
            c
        }),
        None => None,
    };
    // Without a previous point the target's head holds nothing: holes and zero
    // blocks need no entry.
    let zeros_matter = was.is_some();
    let mut logical = 0u64;
    let mut sent = 0u64;
    let mut round = |first_blocks: &[(u64, Block)], link: &mut Link| -> Result<()> {
        let mut entries = Vec::new();
        let mut ids: Vec<ChunkId> = Vec::new();
        for &(b, blk) in first_blocks {
            match blk {
                Block::Data(id) => {
                    ids.push(id);
                    entries.push(Entry::Data { block: b, id });
                    logical += cs;
                }
                Block::Zero | Block::Hole if zeros_matter => {
                    entries.push(Entry::Zeros { first: b, count: 1 });
                    logical += cs;
                }
                _ => {}
            }
        }
        sent += send_lacking(link, &ids, &mut |id| {
            let data = store.chunks.get(id)?;
            Ok(wire::pack(*id, &data))
        })?;
        if !entries.is_empty() {
            link.send(
                wire::MAP,
                &wire::encode_map(&pv.disk, &merge_zeros(entries)),
            )?;
        }
        Ok(())
    };
    match changed {
        Some(list) => {
            for part in list.chunks(BATCH as usize) {
                let mut got = Vec::with_capacity(part.len());
                for run in runs(part) {
                    let r = store.resolve(pv.lineage, pv.epoch, run.0, run.1)?;
                    got.extend((run.0..run.0 + run.1).zip(r));
                }
                round(&got, link)?;
            }
        }
        None => {
            let mut b = 0;
            while b < blocks {
                let n = (blocks - b).min(BATCH);
                let r = store.resolve(pv.lineage, pv.epoch, b, n)?;
                let got: Vec<(u64, Block)> = (b..b + n).zip(r).collect();
                round(&got, link)?;
                b += n;
            }
        }
    }
    Ok((logical, sent))
}

/// Blocks that may differ between `was` and `now`, sorted: the versions
/// between them on one lineage, or, when `now`'s lineage is a clone of `was`'s
/// lineage at or after `was` (failover heads), the parent's versions up to the
/// clone plus all of the clone's.  None when the two are not related so (the
/// whole map then).  Errors: RocksDB.
fn changed_since(store: &Store, was: &PointVolume, now: &PointVolume) -> Result<Option<Vec<u64>>> {
    if was.lineage == now.lineage {
        return Ok((was.epoch <= now.epoch)
            .then(|| store.changed_blocks(now.lineage, was.epoch, now.epoch))
            .transpose()?);
    }
    match store.lineage(now.lineage).and_then(|l| l.parent) {
        Some((parent, at)) if parent == was.lineage && at >= was.epoch => {
            let mut c = store.changed_blocks(parent, was.epoch, at)?;
            c.extend(store.changed_blocks(now.lineage, 0, now.epoch)?);
            c.sort_unstable();
            c.dedup();
            Ok(Some(c))
        }
        _ => Ok(None),
    }
}

/// Sorted block numbers as runs (first, count).
fn runs(blocks: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((f, n)) if *f + *n == b => *n += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

/// Adjacent single-block zero entries as one range.
fn merge_zeros(entries: Vec<Entry>) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::with_capacity(entries.len());
    for e in entries {
        if let (
            Some(Entry::Zeros { first, count }),
            Entry::Zeros {
                first: f2,
                count: c2,
            },
        ) = (out.last_mut(), e)
        {
            if *first + *count == f2 {
                *count += c2;
                continue;
            }
        }
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_zero_ranges_merge() {
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 1), (9, 2)]);
        let z = |first, count| Entry::Zeros { first, count };
        let d = Entry::Data {
            block: 4,
            id: [1; 32],
        };
        assert_eq!(
            merge_zeros(vec![z(1, 1), z(2, 1), z(3, 1), d, z(5, 1), z(7, 1)]),
            vec![z(1, 3), d, z(5, 1), z(7, 1)]
        );
    }
}
