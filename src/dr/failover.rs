//! Failover (`drclone failover`): the production export names of a group move
//! to writable heads cloned from a recovery point, in constant time, and the
//! NBD clients of the old heads are disconnected; `--undo` moves the names back
//! to the replica heads, `--point` on a failed-over group changes the point, and
//! `--commit` makes the failover heads the group's heads.  The head swap itself
//! is the engine's ([`crate::engine::heads`]); this module adds the order of
//! steps, fencing and the audit.
//!
//! Order: swap (one synced batch), then disconnect the clients of every name of
//! the group (a client of an old head must not go on writing to a disk that is
//! no longer the production one), then drop the retired heads.  A crash after
//! the swap leaves the retired heads recorded; [`crate::Store::drop_retired`]
//! at the next maintenance round finishes.

use serde::Serialize;

use crate::dr::audit::{self, Action};
use crate::dr::{Actor, Disconnect};
use crate::engine::heads::HeadSwap;
use crate::engine::types::Role;
use crate::error::{Error, Result};
use crate::Store;

/// What `failover` reports.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub group: String,
    /// The point now served (None after undo or commit).
    pub point: Option<u64>,
    /// The export names now served (`GROUP/DISK`), in disk order.
    pub exports: Vec<String>,
    /// Wall time of the whole action, milliseconds.
    pub time_ms: u64,
    pub role: Role,
    /// The group's fencing epoch after the action.
    pub epoch: u64,
    /// NBD sessions disconnected.
    pub disconnected: usize,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Fail over to a point (`latest` when None); on a failed-over group only
    /// with an explicit point, which changes it.
    To(Option<String>),
    /// Planned: take a final point now, then fail over to it.
    Planned,
    Undo,
    Commit,
}

/// Run `req` on `group`.  Errors: NotFound (group, point); [`Error::Refused`]
/// for a second failover without `--point`, undo or commit of a group that is
/// not failed over, a committed group; [`Error::Busy`] if a client of an old
/// head does not leave (the swap stands; the head is dropped later).
pub fn run(
    store: &Store,
    who: Actor,
    group: &str,
    req: &Request,
    disconnect: Disconnect<'_>,
) -> Result<FailoverReport> {
    let t0 = std::time::Instant::now();
    let action = match req {
        Request::To(_) | Request::Planned => "failover",
        Request::Undo => "failover-undo",
        Request::Commit => "failover-commit",
    };
    let mut point = None;
    let r = (|| {
        let swap = match req {
            Request::To(p) => {
                let g = store.group(group)?;
                if g.role == Role::FailedOver && p.is_none() {
                    return Err(Error::Refused(format!(
                        "group {group} is already failed over; use --point ID to change the \
                         point, --undo to go back to the replica heads, or --commit"
                    )));
                }
                store.failover_heads(group, p.as_deref().unwrap_or("latest"))?
            }
            Request::Planned => {
                let g = store.group(group)?;
                if g.role != Role::Protected {
                    return Err(Error::Refused(format!(
                        "group {group} is {}; a planned failover starts from a protected group",
                        g.role
                    )));
                }
                // New replication sessions are refused from here; the one in
                // flight finishes first.
                store.set_draining(group, true);
                let r = wait_for_cycles(store, group, planned_wait()).and_then(|_| {
                    let p = store.create_point(group, false, Some("planned failover".into()))?;
                    store.failover_heads(group, &p.id.to_string())
                });
                store.set_draining(group, false);
                r?
            }
            Request::Undo => store.undo_failover_heads(group)?,
            Request::Commit => store.commit_failover_heads(group)?,
        };
        point = swap.point.as_ref().map(|p| p.id);
        // Commit leaves the names where they are: their clients stay.
        let disconnected = release(store, group, &swap, *req != Request::Commit, disconnect)?;
        Ok(FailoverReport {
            group: group.into(),
            point,
            exports: swap
                .volumes
                .iter()
                .map(|v| format!("{}/{}", v.group, v.disk))
                .collect(),
            time_ms: t0.elapsed().as_millis() as u64,
            role: swap.group.role,
            epoch: swap.group.epoch,
            disconnected,
        })
    })();
    audit::record(
        store,
        who,
        Action {
            action,
            group,
            point,
            drill: None,
            detail: match req {
                Request::Planned => Some("planned".into()),
                _ => None,
            },
        },
        r,
    )
}

/// Disconnect the clients of every name of the group when the names moved
/// (they may hold an old head), then drop the retired heads.
fn release(
    store: &Store,
    group: &str,
    swap: &HeadSwap,
    moved: bool,
    disconnect: Disconnect<'_>,
) -> Result<usize> {
    let mut n = 0;
    if moved {
        for v in &swap.volumes {
            n += disconnect(&format!("{}/{}", v.group, v.disk))?;
        }
    }
    let held = store.drop_retired(group)?;
    if !held.is_empty() {
        return Err(Error::Busy(format!(
            "group {group}: the names moved, but {} old head(s) are still open (a FUSE \
             file?); they are dropped once closed",
            held.len()
        )));
    }
    Ok(n)
}

/// How long a planned failover waits for a replication cycle in flight:
/// `DRCLONE_PLANNED_WAIT_SECS`, default 300 s.
fn planned_wait() -> std::time::Duration {
    std::time::Duration::from_secs(
        std::env::var("DRCLONE_PLANNED_WAIT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    )
}

/// Wait until no replication session writes a head of `group` (its cycle has
/// committed or ended), so a planned failover's final point includes it.  The
/// group is draining meanwhile: a session that would start is refused, so none
/// can commit between this wait and the final point.
/// Errors: [`Error::Busy`] after `limit`.
fn wait_for_cycles(store: &Store, group: &str, limit: std::time::Duration) -> Result<()> {
    let t0 = std::time::Instant::now();
    loop {
        let mut busy = Vec::new();
        for v in store.volumes(Some(group))? {
            let view = store.view(&v.group, &v.disk, None)?;
            busy.extend(
                store
                    .lease_users(&view)
                    .into_iter()
                    .filter(|u| u.starts_with(crate::repl::receiver::LEASE_PREFIX)),
            );
        }
        if busy.is_empty() {
            return Ok(());
        }
        if t0.elapsed() >= limit {
            return Err(Error::Busy(format!(
                "group {group}: a replication cycle is still in flight after {} s ({}); \
                 try again, or fail over unplanned",
                limit.as_secs(),
                busy.join(", ")
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
