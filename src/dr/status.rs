//! `drclone status`: per protected group, its role, its latest points, its RPO
//! (the age of the latest point) and its last drill.

use serde::Serialize;

use crate::dr::drill::{self, DrillRec};
use crate::engine::types::{PointKind, Role};
use crate::error::Result;
use crate::Store;

/// One group's status.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub group: String,
    pub role: Role,
    /// Fencing epoch (raised by every role change).
    pub epoch: u64,
    pub volumes: usize,
    /// Id of the latest point.
    pub latest_point: Option<u64>,
    /// Its time, seconds since the Unix epoch.
    pub latest_point_time: Option<u64>,
    pub latest_app_point: Option<u64>,
    /// Seconds since the latest point (the RPO a failover now would have).
    pub rpo_seconds: Option<u64>,
    pub points: usize,
    /// The retention policy, as text.
    pub retention: Option<String>,
    /// Replication into the group: `none` until an agent has sent a cycle.
    pub replication: ReplicationStatus,
    pub last_drill: Option<DrillSummary>,
    /// Time (seconds since the Unix epoch) of the last drill that passed.
    pub last_successful_drill: Option<u64>,
    /// The store's pack upload backlog (object-store backend; null for local
    /// packs): the same for every group, repeated so the output stays an array.
    pub upload_backlog: Option<crate::engine::pack::Backlog>,
}

/// The replication side of a group's status.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicationStatus {
    /// `none` (no agent has replicated yet), `replicating` (a cycle is in
    /// flight), `idle` (the last cycle committed), `error` (the last cycle
    /// failed), `refused` (the group's role refuses replication: failed over
    /// or committed).
    pub state: String,
    /// The last cycle as the receiver recorded it: `{time, point, bytes,
    /// duration_ms, source, error}`; null until replication has run.
    pub last_cycle: Option<serde_json::Value>,
}

fn replication_state(store: &Store, g: &crate::engine::meta::GroupRec) -> Result<String> {
    if g.role != Role::Protected {
        return Ok("refused".into());
    }
    for v in store.volumes(Some(&g.name))? {
        let view = store.view(&v.group, &v.disk, None)?;
        if store
            .lease_users(&view)
            .iter()
            .any(|u| u.starts_with(crate::repl::receiver::LEASE_PREFIX))
        {
            return Ok("replicating".into());
        }
    }
    Ok(match &g.replication {
        None => "none",
        Some(c) if c.get("error").is_some_and(|e| !e.is_null()) => "error",
        Some(_) => "idle",
    }
    .into())
}

/// A drill, as status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DrillSummary {
    pub drill: u64,
    pub point: u64,
    /// Started, seconds since the Unix epoch.
    pub time: u64,
    /// None while running.
    pub ok: Option<bool>,
    pub exit_code: Option<i32>,
}

/// Status of every group except drill clone groups, at `now` (seconds since
/// the Unix epoch).  Errors: the metadata database's.
pub fn status(store: &Store, now: u64) -> Result<Vec<GroupStatus>> {
    let clones = drill::clone_groups(store)?;
    let drills = drill::list(store)?;
    let backlog = store.chunks.backend.backlog();
    let mut out = Vec::new();
    for g in store.groups()? {
        if clones.contains(&g.name) {
            continue;
        }
        let pts = store.points(&g.name)?;
        let latest = pts.last();
        let latest_app = pts.iter().rev().find(|p| p.kind == PointKind::App);
        let mine: Vec<&DrillRec> = drills.iter().filter(|d| d.group == g.name).collect();
        out.push(GroupStatus {
            role: g.role,
            epoch: g.epoch,
            volumes: store.volumes(Some(&g.name))?.len(),
            latest_point: latest.map(|p| p.id),
            latest_point_time: latest.map(|p| p.time),
            latest_app_point: latest_app.map(|p| p.id),
            rpo_seconds: latest.map(|p| now.saturating_sub(p.time)),
            points: pts.len(),
            retention: g.retention.as_ref().map(|r| r.to_string()),
            replication: ReplicationStatus {
                state: replication_state(store, &g)?,
                last_cycle: g.replication.clone(),
            },
            last_drill: mine.last().map(|d| DrillSummary {
                drill: d.id,
                point: d.point,
                time: d.started,
                ok: d.ok,
                exit_code: d.exit_code,
            }),
            last_successful_drill: mine
                .iter()
                .rev()
                .find(|d| d.ok == Some(true))
                .map(|d| d.started),
            upload_backlog: backlog.clone(),
            group: g.name,
        });
    }
    Ok(out)
}
