//! DR drills (`drclone test`): every volume of a group cloned at a recovery
//! point, in constant time, into a group of its own (`GROUP.drill-ID`), served
//! under those names while a command checks them, then removed.
//!
//! The clones are copy-on-write lineages whose parent is the point: drill writes
//! land in the clones only, and replication into the replica heads goes on
//! beside them untouched.  A drill is an object: its record (table `X`) keeps
//! the evidence (point, times, exit code, the tail of the command's output)
//! after the clones are gone.  Every drill expires: a kept one after its TTL,
//! an unfinished one (its `drclone test` died) after [`DEFAULT_TTL`]; the
//! daemon's maintenance removes the clones of expired drills
//! ([`expire`]).

use serde::{Deserialize, Serialize};

use crate::dr::audit::{self, Action};
use crate::dr::{Actor, Disconnect};
use crate::engine::keys;
use crate::error::{Error, Result};
use crate::util::now_secs;
use crate::Store;

/// TTL of a drill that did not say (seconds): two hours.
pub const DEFAULT_TTL: u64 = 2 * 3600;

/// Bytes of the command's output kept in the record.
pub const OUTPUT_TAIL: usize = 4096;

/// Where a drill is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DrillState {
    /// Clones exported; the command runs (or, with `--keep`, the drill waits).
    Running,
    /// Finished; `ok` says how.  Clones kept until TTL or `drill rm` if kept.
    Finished,
}

/// A drill's record: what was tested and the evidence.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrillRec {
    pub id: u64,
    /// The group drilled.
    pub group: String,
    /// The recovery point cloned.
    pub point: u64,
    /// The group holding the clones (`GROUP.drill-ID`).
    pub clone_group: String,
    /// The clones' export names (`GROUP.drill-ID/DISK`), in disk order.
    pub exports: Vec<String>,
    /// Started, seconds since the Unix epoch.
    pub started: u64,
    /// Milliseconds from the start until the clones were exported.
    pub time_to_ready_ms: u64,
    pub keep: bool,
    /// When the clones go by themselves (seconds since the Unix epoch): while
    /// running, [`DEFAULT_TTL`] after the start (or the TTL if longer); once
    /// finished and kept, the TTL after the finish.
    pub expires: u64,
    /// The TTL asked for, seconds.
    #[serde(default)]
    pub ttl: u64,
    pub state: DrillState,
    /// The command run (`--exec`), if any.
    pub command: Option<String>,
    /// Set when finished: the command exited 0 (or there was none).
    pub ok: Option<bool>,
    pub exit_code: Option<i32>,
    /// Milliseconds from the start to the end of the command.
    pub duration_ms: Option<u64>,
    pub finished: Option<u64>,
    /// The last [`OUTPUT_TAIL`] bytes of the command's output.
    #[serde(default)]
    pub output_tail: String,
    /// When the clones were removed (seconds since the Unix epoch), if they were.
    pub clones_removed: Option<u64>,
    /// The uid that started it.
    pub uid: u32,
}

/// Options of [`start`].
#[derive(Debug, Clone, Default)]
pub struct DrillOptions {
    /// `latest` (default), `latest-app` or a point id.
    pub point: Option<String>,
    pub keep: bool,
    /// Seconds; [`DEFAULT_TTL`] if unset.
    pub ttl: Option<u64>,
    pub command: Option<String>,
}

/// The group that holds drill `id`'s clones of `group`.
pub fn clone_group(group: &str, id: u64) -> String {
    format!("{group}.drill-{id}")
}

/// Start a drill of `group`: clone each of its volumes at the point into
/// `GROUP.drill-ID` (constant time per volume) and record it.  The clones are
/// served by the daemon as soon as this returns.
///
/// Errors: NotFound (group, point); the engine's (a clone name too long, ...).
/// A failure part-way removes the clones made so far.
pub fn start(store: &Store, who: Actor, group: &str, opts: &DrillOptions) -> Result<DrillRec> {
    let t0 = std::time::Instant::now();
    let spec = opts.point.as_deref().unwrap_or("latest");
    let r = (|| {
        let g = store.group(group)?;
        let p = store.point(group, spec)?;
        let id = store.next_id("drill")?;
        let cg = clone_group(&g.name, id);
        crate::util::check_name("group", &cg).map_err(|_| {
            Error::invalid(format!(
                "group name {group} is too long for a drill's clone group ({cg})"
            ))
        })?;
        let now = now_secs();
        let ttl = opts.ttl.unwrap_or(DEFAULT_TTL);
        let mut rec = DrillRec {
            id,
            group: group.into(),
            point: p.id,
            clone_group: cg.clone(),
            exports: p
                .volumes
                .iter()
                .map(|pv| format!("{cg}/{}", pv.disk))
                .collect(),
            started: now,
            time_to_ready_ms: 0,
            keep: opts.keep,
            expires: now.saturating_add(ttl.max(DEFAULT_TTL)),
            ttl,
            state: DrillState::Running,
            command: opts.command.clone(),
            ok: None,
            exit_code: None,
            duration_ms: None,
            finished: None,
            output_tail: String::new(),
            clones_removed: None,
            uid: who.uid,
        };
        // The record first: a drill cut off while its clones are being made is
        // still found, and expired, by the daemon (found by tests/breakit_dr.rs:
        // a crash after the clone group left an orphan nobody removed).
        store.put_record(keys::DRILL, id, &rec)?;
        // A group of that name that this drill did not make is not its to
        // remove (found by tests/breakit_dr2.rs: an operator's group named
        // `db.drill-1` lost its volumes to the cleanup of a drill of `db`
        // that could not create it); and a drill that did not start leaves
        // no record (the audit log keeps the failure).
        if let Err(e) = store.create_group(&cg) {
            let _ = store.delete_record(keys::DRILL, id);
            return Err(match e {
                Error::Exists(_) => Error::Exists(format!(
                    "group {cg} already exists, and drill {id} of {group} puts its clones \
                     there; rename or remove that group"
                )),
                e => e,
            });
        }
        let made: Result<()> = p.volumes.iter().try_for_each(|pv| {
            store
                .clone_volume(group, &pv.disk, &p.id.to_string(), &cg, &pv.disk)
                .map(|_| ())
        });
        if let Err(e) = made {
            if remove_clones(store, id, &crate::dr::no_clients).is_ok() {
                let _ = store.delete_record(keys::DRILL, id);
            }
            return Err(e);
        }
        rec.time_to_ready_ms = t0.elapsed().as_millis() as u64;
        store.put_record(keys::DRILL, id, &rec)?;
        log::info!(
            "drill {id} of {group} at point {}: {} clone(s) in {} ms",
            p.id,
            rec.exports.len(),
            rec.time_to_ready_ms
        );
        Ok(rec)
    })();
    if let Err(e) = &r {
        // A drill that did not start is audited too (it never got an id).
        audit::append(
            store,
            who,
            Action {
                action: "drill",
                group,
                detail: opts.command.clone(),
                ..Default::default()
            },
            Err(e.to_string()),
        )?;
    }
    r
}

/// How a drill's command ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The command's exit code (None: no command; a signal counts as failure
    /// with code -1).
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    pub output_tail: String,
}

/// Finish drill `id` with `outcome`: record the evidence, audit it, and remove
/// the clones unless the drill is kept.  Errors: NotFound; [`Error::Refused`]
/// if it already finished; removing the clones ([`Error::Busy`] if a client
/// would not leave; the record then says they are still there).
pub fn finish(
    store: &Store,
    who: Actor,
    id: u64,
    outcome: Outcome,
    disconnect: Disconnect<'_>,
) -> Result<DrillRec> {
    let mut d = get(store, id)?;
    if d.state == DrillState::Finished {
        return Err(Error::Refused(format!("drill {id} has already finished")));
    }
    let ok = outcome.exit_code.is_none_or(|c| c == 0);
    d.state = DrillState::Finished;
    d.ok = Some(ok);
    d.exit_code = outcome.exit_code;
    d.duration_ms = Some(outcome.duration_ms);
    d.finished = Some(now_secs());
    // A kept drill lives its TTL from now, not from its start (a command longer
    // than the TTL must not lose its clones under it).
    d.expires = now_secs().saturating_add(d.ttl);
    d.output_tail = tail(&outcome.output_tail);
    store.put_record(keys::DRILL, id, &d)?;
    audit::append(
        store,
        who,
        Action {
            action: "drill",
            group: &d.group,
            point: Some(d.point),
            drill: Some(id),
            detail: d.command.clone(),
        },
        if ok {
            Ok(())
        } else {
            Err(format!(
                "command failed (exit code {})",
                d.exit_code.map_or("none".into(), |c| c.to_string())
            ))
        },
    )?;
    if !d.keep {
        d = remove_clones(store, id, disconnect)?;
    }
    Ok(d)
}

/// Keep the last [`OUTPUT_TAIL`] bytes of `s`, cut at a character boundary.
fn tail(s: &str) -> String {
    if s.len() <= OUTPUT_TAIL {
        return s.to_string();
    }
    let mut start = s.len() - OUTPUT_TAIL;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}

/// Remove drill `id`'s clones (its clients disconnected first) and note it in
/// the record, which stays as evidence.  Removing what is already gone is
/// fine.  Errors: NotFound; [`Error::Busy`] if a client holds a clone.
pub fn remove_clones(store: &Store, id: u64, disconnect: Disconnect<'_>) -> Result<DrillRec> {
    let mut d = get(store, id)?;
    if d.clones_removed.is_some() {
        return Ok(d);
    }
    for e in &d.exports {
        disconnect(e)?;
    }
    match store.group(&d.clone_group) {
        Ok(_) => {
            for v in store.volumes(Some(&d.clone_group))? {
                store.remove_volume(&v.group, &v.disk)?;
            }
            store.remove_group(&d.clone_group)?;
        }
        Err(Error::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    d.clones_removed = Some(now_secs());
    store.put_record(keys::DRILL, id, &d)?;
    log::info!("drill {id}: clones removed");
    Ok(d)
}

/// Drill `id`.  Errors: NotFound.
pub fn get(store: &Store, id: u64) -> Result<DrillRec> {
    store
        .record(keys::DRILL, id)?
        .ok_or_else(|| Error::NotFound(format!("drill {id}")))
}

/// Every drill, oldest first.
pub fn list(store: &Store) -> Result<Vec<DrillRec>> {
    Ok(store
        .records::<DrillRec>(keys::DRILL)?
        .into_iter()
        .map(|(_, d)| d)
        .collect())
}

/// `drill rm`: remove drill `id`'s clones and its record (the audit log keeps
/// the action).  Errors: NotFound; [`Error::Busy`].
pub fn remove(store: &Store, who: Actor, id: u64, disconnect: Disconnect<'_>) -> Result<()> {
    let d = get(store, id)?;
    let r = remove_clones(store, id, disconnect).and_then(|_| store.delete_record(keys::DRILL, id));
    audit::record(
        store,
        who,
        Action {
            action: "drill-rm",
            group: &d.group,
            point: Some(d.point),
            drill: Some(id),
            detail: None,
        },
        r,
    )
}

/// Remove the clones of every drill whose time is up at `now` (seconds since
/// the Unix epoch): kept drills past their TTL, and drills whose `drclone test`
/// never finished them.  Returns the drills expired.  A drill whose clones are
/// still in use (a client that would not leave, an open FUSE file) stays for
/// the next round, unaudited until it goes.
pub fn expire(store: &Store, now: u64, disconnect: Disconnect<'_>) -> Result<Vec<u64>> {
    let mut done = Vec::new();
    for d in list(store)? {
        if d.clones_removed.is_some() || d.expires > now {
            continue;
        }
        let r = remove_clones(store, d.id, disconnect);
        if let Err(Error::Busy(m)) = &r {
            // Tried again next round; audited once it goes, not every round.
            log::info!("drill {}: expired, but {m}", d.id);
            continue;
        }
        let ok = r.is_ok();
        audit::record(
            store,
            Actor::current(),
            Action {
                action: "drill-expire",
                group: &d.group,
                point: Some(d.point),
                drill: Some(d.id),
                detail: Some(format!("expired at {}", d.expires)),
            },
            r.map(|_| ()),
        )
        .unwrap_or_else(|e| log::warn!("drill {}: {e}", d.id));
        if ok {
            done.push(d.id);
        }
    }
    Ok(done)
}

/// The clone groups of drills whose clones exist (status leaves them out of
/// the protected groups).
pub fn clone_groups(store: &Store) -> Result<std::collections::HashSet<String>> {
    Ok(list(store)?
        .into_iter()
        .filter(|d| d.clones_removed.is_none())
        .map(|d| d.clone_group)
        .collect())
}
