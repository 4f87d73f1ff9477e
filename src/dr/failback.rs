//! Failback (`drclone failback GROUP --target HOST:PORT`), run on the site a
//! group failed over to: only the blocks changed since the newest point the two
//! sites share (the failover point, which the original site sent) go home,
//! through the store-to-store `push` protocol ([`crate::repl::push`]), and land
//! there as points (docs/DESIGN.md §19).
//!
//! If the original site wrote after that point (an unplanned failover lost
//! its last writes), the receiver keeps those writes in a point labelled
//! `diverged-TIME` and rolls its heads back before the delta lands; the report
//! names that point.  Nothing is thrown away on either side.
//!
//! `--planned` repeats delta passes until one changes at most
//! [`Options::small`] bytes (or [`Options::max_passes`] ran), then fences the
//! heads here (a writer lease that refuses NBD writers, and a disconnect of the
//! clients), sends the last delta, and makes this group a replica again
//! ([`Store::reprotect_heads`]): the original site is the protected side, and
//! its next `push` here is incremental from the last point.

use serde::Serialize;

use crate::dr::audit::{self, Action};
use crate::dr::{Actor, Disconnect};
use crate::engine::types::Role;
use crate::error::{Error, Result};
use crate::repl::push::{self, PushOptions, PushReport};
use crate::Store;

/// A lease with this name prefix fences a head during a planned failback's
/// last pass: NBD clients opening it for writing are refused.
pub const FENCE_PREFIX: &str = "failback to ";

/// What to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Target, group, token, TLS, bandwidth (`keep_diverged` is forced on).
    pub push: PushOptions,
    /// Pass until the delta is small, fence, last pass, switch roles.
    pub planned: bool,
    /// Planned: a pass that changed at most this many bytes is the last one
    /// before the fence (bytes; default 64 MiB).
    pub small: u64,
    /// Planned: passes before the fence at most (default 5).
    pub max_passes: u32,
}

/// What a failback did (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct FailbackReport {
    pub group: String,
    /// Each pass's push, in order (the last is the fenced one when planned).
    pub passes: Vec<PushReport>,
    /// The original site's point that keeps its writes after the common
    /// point, if it had any.
    pub diverged: Option<u64>,
    pub planned: bool,
    /// This group's role afterwards (protected after a planned failback).
    pub role: Role,
    /// NBD sessions disconnected by the fence.
    pub disconnected: usize,
    /// Protocol bytes sent in all passes.
    pub bytes_sent: u64,
    pub duration_ms: u64,
}

/// Fail `opts.push.group` back.  Errors: [`Error::Refused`] unless the group
/// is failed over or committed here; the push's (the target's refusals, I/O);
/// [`Error::Busy`] if a client does not leave the fence.  A failure before
/// the role switch leaves this site serving the group as before.
pub fn run(
    store: &Store,
    who: Actor,
    opts: &Options,
    disconnect: Disconnect<'_>,
) -> Result<FailbackReport> {
    let group = opts.push.group.clone();
    let r = failback(store, opts, disconnect);
    audit::record(
        store,
        who,
        Action {
            action: "failback",
            group: &group,
            point: r
                .as_ref()
                .ok()
                .and_then(|r| r.passes.last())
                .and_then(|p| p.points.last())
                .map(|(s, _)| *s),
            drill: None,
            detail: Some(format!(
                "to {}{}",
                opts.push.target,
                if opts.planned { ", planned" } else { "" }
            )),
        },
        r,
    )
}

fn failback(store: &Store, opts: &Options, disconnect: Disconnect<'_>) -> Result<FailbackReport> {
    let t0 = std::time::Instant::now();
    let group = &opts.push.group;
    let g = store.group(group)?;
    if !matches!(g.role, Role::FailedOver | Role::Committed) {
        return Err(Error::Refused(format!(
            "group {group} is {}: failback runs on the site the group failed over to",
            g.role
        )));
    }
    let push_opts = PushOptions {
        keep_diverged: true,
        ..opts.push.clone()
    };
    let mut report = FailbackReport {
        group: group.clone(),
        passes: Vec::new(),
        diverged: None,
        planned: opts.planned,
        role: g.role,
        disconnected: 0,
        bytes_sent: 0,
        duration_ms: 0,
    };
    let pass = |label: &str, report: &mut FailbackReport| -> Result<u64> {
        let p = store.create_point(group, false, Some(label.to_string()))?;
        let r = push::push(store, &push_opts)?;
        log::info!(
            "failback of {group}: point {} sent ({} bytes changed, {} on the wire)",
            p.id,
            r.bytes_logical,
            r.bytes_sent
        );
        report.diverged = report.diverged.or(r.diverged);
        report.bytes_sent += r.bytes_sent;
        let changed = r.bytes_logical;
        report.passes.push(r);
        Ok(changed)
    };
    if !opts.planned {
        pass("failback", &mut report)?;
        report.duration_ms = t0.elapsed().as_millis() as u64;
        return Ok(report);
    }
    for n in 1..=opts.max_passes.max(1) {
        if pass(&format!("failback pass {n}"), &mut report)? <= opts.small {
            break;
        }
    }
    // The fence: writers leave and cannot come back; the last delta goes.
    let mut fences = Vec::new();
    let mut views = Vec::new();
    for v in store.volumes(Some(group))? {
        let view = store.view(&v.group, &v.disk, None)?;
        fences.push(store.lease(&view, &format!("{FENCE_PREFIX}{}", opts.push.target))?);
        report.disconnected += disconnect(&format!("{}/{}", v.group, v.disk))?;
        views.push(view);
    }
    // The fence refuses and disconnects NBD clients only: anything else still
    // holding a head (a file open in a FUSE mount) could write after the last
    // pass, into what is then a replica, and those writes would never reach
    // the original site (found by tests/breakit_dr2.rs).  Stop before it.
    for view in &views {
        let held = || -> Vec<String> {
            store
                .lease_users(view)
                .into_iter()
                .filter(|u| !u.starts_with(FENCE_PREFIX))
                .collect()
        };
        let mut users = held();
        // A disconnected NBD session lets go of its lease as it ends.
        for _ in 0..100 {
            if users.is_empty() || !users.iter().all(|u| u.starts_with("nbd ")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            users = held();
        }
        if !users.is_empty() {
            return Err(Error::Busy(format!(
                "{} is held by {}: a planned failback stops the writers before its last \
                 pass, and the fence stops NBD clients only; close them, then run the \
                 failback again (the group is still {} here, served as before)",
                view.name,
                users.join(", "),
                report.role
            )));
        }
    }
    pass("failback final", &mut report)?;
    let swap = store.reprotect_heads(group)?;
    drop(fences);
    store.drop_retired(group)?;
    report.role = swap.group.role;
    report.duration_ms = t0.elapsed().as_millis() as u64;
    Ok(report)
}
