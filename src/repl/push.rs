//! Store to store: `drclone push GROUP --target HOST:PORT` sends another
//! drclone store the recovery points of a group that it lacks, incrementally
//! from the newest point the two have in common, the way `zfs send -I` does
//! (docs/DESIGN.md §18).  A first push is a full seed.
//!
//! The target names, in WELCOME, the points it holds that came from this store
//! (their [`crate::engine::meta::Origin`]: this store's UUID and point id).  The
//! newest of those is the base (sent from scratch if this store no longer holds
//! it).  Points go in sessions of one geometry (disks and sizes), whose HELLO
//! names exactly those, so each lands as it is here.  BASE asks the target to
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

/// Disks and their sizes (bytes), in a point's order: what a HELLO names.
type Geometry = Vec<(String, u64)>;

fn geometry(p: &PointRec) -> Geometry {
    p.volumes.iter().map(|v| (v.disk.clone(), v.size)).collect()
}

/// What the first HELLO names, before WELCOME says which points the target
/// holds: the disks every point holds, each at its smallest size.  A HELLO
/// creates missing disks and grows smaller heads, so this changes nothing on
/// a target that holds any of the points, and on a new one nothing a point
/// sent later does not hold.  (Naming every disk at its largest size, as the
/// first version did, landed every point with every disk at its largest
/// size: tests/breakit_repl.rs.)  If no disk is in every point: the oldest
/// point's disks.
fn probe_geometry(points: &[PointRec]) -> Geometry {
    let mut g = geometry(&points[0]);
    for p in &points[1..] {
        g.retain_mut(|(d, s)| match p.volumes.iter().find(|v| v.disk == *d) {
            Some(v) => {
                *s = (*s).min(v.size);
                true
            }
            None => false,
        });
    }
    if g.is_empty() {
        geometry(&points[0])
    } else {
        g
    }
}

/// Connect, HELLO naming `volumes`, and read WELCOME.  A refusal because a
/// head is still leased by a session of this push that just closed (the
/// receiver lets go of it when it sees the close) is retried for up to 5 s.
fn open_session(
    store: &Store,
    opts: &PushOptions,
    volumes: &Geometry,
) -> Result<(Link, wire::Welcome)> {
    let hello = wire::Hello {
        token: opts.token.clone(),
        group: opts.group.clone(),
        volumes: volumes.clone(),
        source: store.uuid().to_string(),
        epoch: None,
    };
    let mut attempt = 0;
    loop {
        let mut link = Link::open(&opts.target, opts.tls.as_ref(), opts.bwlimit)?;
        link.send_json(wire::HELLO, &hello)?;
        match link.expect(wire::WELCOME) {
            Ok(body) => return Ok((link, wire::json("WELCOME", &body)?)),
            Err(Error::Refused(m))
                if attempt < 50
                    && m.contains(crate::repl::receiver::LEASE_PREFIX)
                    && m.contains("one writer at a time") =>
            {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Push `opts.group`'s points that the target lacks.  Errors: the group or
/// its points missing here; an encrypted store (chunk ids are keyed, the wire's
/// are BLAKE3 of the data); a target of another chunk size; the target's
/// refusals (token, a head that moved on, a failed-over group, a disk the
/// target holds that a point to send does not, or holds larger) by name; I/O.
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
    let probe = probe_geometry(&points);
    let (link, welcome) = open_session(store, opts, &probe)?;
    let mut link = Some(link);
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
    // The newest point the target holds from this store may be gone here
    // (retention, `point rm`): it is the base all the same, since the target's
    // heads hold it; the first point then goes whole, as this store cannot
    // tell what changed since.  (Taking the newest point still held here, as
    // the first version did, made the target refuse every later push: its
    // heads had moved on since that one.  tests/breakit_repl.rs.)
    let newest_sent = welcome.origins.iter().copied().max_by_key(|&(sp, _)| sp);
    // (this store's id of the base, the target's id, the base here if held).
    let (base, mut base_tp, mut prev) = match (common, newest_sent) {
        (Some((p, _)), Some((sp, tp))) if sp > p.id => (Some(sp), Some(tp), None),
        (None, Some((sp, tp))) => (Some(sp), Some(tp), None),
        (Some((p, tp)), _) => (Some(p.id), Some(tp), Some(p)),
        (None, None) => (None, None, None),
    };
    let mut report = PushReport {
        group: group.clone(),
        base,
        points: Vec::new(),
        bytes_sent: 0,
        bytes_logical: 0,
        chunks_sent: 0,
        duration_ms: 0,
        diverged: None,
    };
    let todo: Vec<&PointRec> = points
        .iter()
        .filter(|p| base.is_none_or(|b| p.id > b))
        .collect();
    if todo.is_empty() {
        log::info!("push {group}: the target holds every point already");
        report.bytes_sent = link.as_ref().map_or(0, |l| l.sent());
        report.duration_ms = t0.elapsed().as_millis() as u64;
        return Ok(report);
    }
    // The points to send stay until the push ends (`point rm` and retention
    // refuse them meanwhile): GC would drop the map versions only they see,
    // and the push would send an older point's blocks under their ids (found
    // by tests/breakit_repl.rs).
    let user = format!("push to {}", opts.target);
    let _held = todo
        .iter()
        .flat_map(|p| p.volumes.iter().map(move |v| (p.id, &v.disk)))
        .map(|(id, disk)| {
            let view = store.view(group, disk, Some(&id.to_string()))?;
            store.lease(&view, &user)
        })
        .collect::<Result<Vec<_>>>()?;
    let bar = if opts.progress {
        crate::engine::imex::progress_bar(todo.len() as u64, &format!("pushing {group}"))
    } else {
        indicatif::ProgressBar::hidden()
    };
    // Points of one geometry go in one session, whose HELLO names exactly
    // their disks and sizes: the target's points then hold what this store's
    // do (a disk that grew, or was added, between points lands so).  A disk
    // that went, or shrank, is the target's BASE check to refuse.
    let mut first = true;
    for run in todo.chunk_by(|a, b| geometry(a) == geometry(b)) {
        let g = geometry(run[0]);
        if !(first && g == probe) {
            if let Some(l) = link.take() {
                report.bytes_sent += l.sent();
            }
            link = Some(open_session(store, opts, &g)?.0);
        }
        let l = link.as_mut().expect("a session is open");
        l.send_json(
            wire::BASE,
            &wire::Base {
                point: base_tp,
                keep_diverged: opts.keep_diverged && first,
            },
        )?;
        let ok: wire::BaseOk = wire::json("BASE_OK", &l.expect(wire::BASE_OK)?)?;
        if first {
            report.diverged = ok.diverged;
        }
        for &p in run {
            for pv in &p.volumes {
                let was =
                    prev.and_then(|q: &PointRec| q.volumes.iter().find(|v| v.disk == pv.disk));
                // Zero blocks matter where the target's head may hold data: a
                // disk of the previous point, or any disk when this store no
                // longer holds the base.
                let zeros = was.is_some() || (prev.is_none() && base_tp.is_some());
                let (logical, sent) = send_volume(store, l, pv, was, zeros)?;
                report.bytes_logical += logical;
                report.chunks_sent += sent;
            }
            l.send_json(
                wire::COMMIT,
                &wire::Commit {
                    label: p.label.clone(),
                    app: p.kind == PointKind::App,
                    source_point: Some(p.id),
                    time: Some(p.time),
                },
            )?;
            let done: wire::Committed = wire::json("COMMITTED", &l.expect(wire::COMMITTED)?)?;
            log::info!(
                "push {group}: point {} landed as point {} on {}",
                p.id,
                done.point,
                opts.target
            );
            report.points.push((p.id, done.point));
            // The base of the next push: retention keeps it.
            store.set_peer_point(group, &target_store, p.id)?;
            bar.inc(1);
            prev = Some(p);
            base_tp = Some(done.point);
        }
        first = false;
    }
    bar.finish_and_clear();
    report.bytes_sent += link.as_ref().map_or(0, |l| l.sent());
    report.duration_ms = t0.elapsed().as_millis() as u64;
    Ok(report)
}

/// Send what `pv` changed since `was` (the same disk in the previous point the
/// target holds, if any; all of it otherwise, zero blocks too when
/// `zeros_matter`): returns (changed bytes, chunks sent).
fn send_volume(
    store: &Store,
    link: &mut Link,
    pv: &PointVolume,
    was: Option<&PointVolume>,
    zeros_matter: bool,
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
    // `zeros_matter`: false when the target's head holds nothing (a disk new
    // there): holes and zero blocks then need no entry.
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
        sent += send_lacking(link, &ids, &|id| {
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
