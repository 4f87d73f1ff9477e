//! Retention: thin a group's recovery points to its policy.
//!
//! A policy is a list of rules `EVERY:KEEP` ([`RetentionPolicy`]).  For each rule,
//! time is cut into a grid of EVERY-second cells (cell = time / EVERY); of the
//! points younger than KEEP, the oldest of each cell is kept, so a kept point
//! stays kept until it ages out of every rule (the grid does not shift as new
//! points arrive).  Kept as well, whatever their age: the newest point (the one
//! a failover would use), and every point a clone depends on (a drill's, a
//! failover head's, a user's clone): its lineage and epoch are some clone's
//! parent.  App-consistent points are also thinned by the group's app policy,
//! when it has one: a point either policy keeps stays.

use std::collections::{BTreeMap, HashSet};

use crate::dr::audit::{self, Action};
use crate::dr::Actor;
use crate::engine::meta::PointRec;
use crate::engine::types::{PointKind, RetentionPolicy};
use crate::error::{Error, Result};
use crate::Store;

/// Ids of the points of `points` (any order) that `policy` (and `app_policy`
/// for app-consistent points) does not keep at `now` (seconds since the Unix
/// epoch), leaving out `pinned` ones and the newest.
pub fn plan(
    points: &[PointRec],
    policy: Option<&RetentionPolicy>,
    app_policy: Option<&RetentionPolicy>,
    now: u64,
    pinned: &HashSet<u64>,
) -> Vec<u64> {
    if policy.is_none() && app_policy.is_none() {
        return Vec::new();
    }
    let mut keep: HashSet<u64> = pinned.clone();
    if let Some(newest) = points.iter().max_by_key(|p| (p.time, p.id)) {
        keep.insert(newest.id);
    }
    let mut grid = |pol: &RetentionPolicy, only_app: bool| {
        for r in &pol.rules {
            let mut cells: BTreeMap<u64, &PointRec> = BTreeMap::new();
            for p in points {
                if only_app && p.kind != PointKind::App {
                    continue;
                }
                if now.saturating_sub(p.time) >= r.keep {
                    continue;
                }
                let c = cells.entry(p.time / r.every).or_insert(p);
                if (p.time, p.id) < (c.time, c.id) {
                    *c = p;
                }
            }
            keep.extend(cells.values().map(|p| p.id));
        }
    };
    if let Some(p) = policy {
        grid(p, false);
    }
    if let Some(p) = app_policy {
        grid(p, true);
    }
    let mut out: Vec<u64> = points
        .iter()
        .map(|p| p.id)
        .filter(|id| !keep.contains(id))
        .collect();
    out.sort_unstable();
    out
}

/// Points of `group` that retention never removes: those some clone depends
/// on, and the bases of incremental replication with each peer (the newest
/// point a peer store holds from this one, and the newest point that came
/// from each source), so a long failover with short retention never forces a
/// full resync.
pub fn pinned(store: &Store, group: &str) -> Result<HashSet<u64>> {
    let parents: HashSet<(u64, u64)> = store
        .lineage_map()
        .values()
        .filter_map(|l| l.parent)
        .collect();
    let points = store.points(group)?;
    let mut keep: HashSet<u64> = points
        .iter()
        .filter(|p| {
            p.volumes
                .iter()
                .any(|v| parents.contains(&(v.lineage, v.epoch)))
        })
        .map(|p| p.id)
        .collect();
    keep.extend(store.group(group)?.peers.values().copied());
    let mut newest_from: std::collections::HashMap<&str, u64> = Default::default();
    for p in &points {
        if let Some(o) = &p.origin {
            let e = newest_from.entry(o.source.as_str()).or_insert(p.id);
            *e = (*e).max(p.id);
        }
    }
    keep.extend(newest_from.values().copied());
    Ok(keep)
}

/// Thin `group` to its policies at `now`; returns the points removed.  A point
/// in use by a reader stays for the next round.  Audited when it removes any.
pub fn apply(store: &Store, who: Actor, group: &str, now: u64) -> Result<Vec<u64>> {
    let g = store.group(group)?;
    let points = store.points(group)?;
    let doomed = plan(
        &points,
        g.retention.as_ref(),
        g.app_retention.as_ref(),
        now,
        &pinned(store, group)?,
    );
    let mut removed = Vec::new();
    for id in doomed {
        match store.remove_point(group, &id.to_string()) {
            Ok(_) => removed.push(id),
            Err(Error::Busy(m)) => log::info!("retention: {m}; kept for now"),
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    if !removed.is_empty() {
        audit::append(
            store,
            who,
            Action {
                action: "retention-thin",
                group,
                detail: Some(format!("{} point(s) removed: {:?}", removed.len(), removed)),
                ..Default::default()
            },
            Ok(()),
        )?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::meta::PointVolume;

    fn pt(id: u64, time: u64, kind: PointKind) -> PointRec {
        PointRec {
            id,
            group: "g".into(),
            time,
            kind,
            label: None,
            volumes: vec![PointVolume {
                disk: "d".into(),
                lineage: 1,
                epoch: id,
                size: 512,
            }],
            origin: None,
        }
    }

    /// 1000 points, one every 7 s for ~2 hours, thinned by 1m:10m,10m:1h,1h:1d:
    /// what stays is exactly one point per grid cell of each rule inside its
    /// window, plus the newest and the pinned one.
    #[test]
    fn thins_a_thousand_points_to_the_grid() {
        let pol: RetentionPolicy = "1m:10m,10m:1h,1h:1d".parse().unwrap();
        let t0 = 1_700_000_000u64;
        let points: Vec<PointRec> = (0..1000)
            .map(|i| pt(i + 1, t0 + i * 7, PointKind::Crash))
            .collect();
        let now = t0 + 1000 * 7;
        let pinned: HashSet<u64> = [3].into();
        let gone: HashSet<u64> = plan(&points, Some(&pol), None, now, &pinned)
            .into_iter()
            .collect();
        let kept: Vec<&PointRec> = points.iter().filter(|p| !gone.contains(&p.id)).collect();
        assert!(kept.iter().any(|p| p.id == 3), "the pinned point stays");
        assert!(kept.iter().any(|p| p.id == 1000), "the newest stays");
        for r in &pol.rules {
            // Every cell of the rule's window that has points keeps exactly its
            // oldest one.
            let mut cells: BTreeMap<u64, Vec<&PointRec>> = BTreeMap::new();
            for p in points.iter().filter(|p| now - p.time < r.keep) {
                cells.entry(p.time / r.every).or_default().push(p);
            }
            for (c, ps) in cells {
                let oldest = ps.iter().min_by_key(|p| p.time).unwrap();
                assert!(
                    !gone.contains(&oldest.id),
                    "cell {c} of {r:?} keeps its oldest"
                );
            }
        }
        // Nothing else: each kept point is the newest, pinned, or a cell's oldest.
        for p in &kept {
            let by_rule = pol.rules.iter().any(|r| {
                now - p.time < r.keep
                    && points
                        .iter()
                        .filter(|q| now - q.time < r.keep && q.time / r.every == p.time / r.every)
                        .all(|q| q.time >= p.time)
            });
            assert!(
                by_rule || p.id == 1000 || p.id == 3,
                "point {} kept for no reason",
                p.id
            );
        }
        // 1m cells over 10 min: ~10; 10m over 1 h: ~6; 1h over 1 d: 2 (the run
        // spans ~1.9 h) — far fewer than 1000.
        assert!(kept.len() < 25, "kept {}", kept.len());
        // Thinning again changes nothing (the grid is stable).
        let rest: Vec<PointRec> = kept.iter().map(|p| (*p).clone()).collect();
        assert!(plan(&rest, Some(&pol), None, now, &pinned).is_empty());
    }

    #[test]
    fn app_points_follow_their_own_policy_too() {
        let crash: RetentionPolicy = "1m:5m".parse().unwrap();
        let app: RetentionPolicy = "1h:1d".parse().unwrap();
        let t0 = 1_700_000_000u64;
        let points = vec![
            pt(1, t0, PointKind::App),
            pt(2, t0 + 60, PointKind::Crash),
            pt(3, t0 + 7200, PointKind::Crash),
        ];
        let now = t0 + 7200;
        let gone = plan(&points, Some(&crash), Some(&app), now, &HashSet::new());
        assert_eq!(gone, vec![2], "the old app point stays by the app policy");
        let gone = plan(&points, Some(&crash), None, now, &HashSet::new());
        assert_eq!(gone, vec![1, 2]);
        assert!(plan(&points, None, None, now, &HashSet::new()).is_empty());
    }
}
