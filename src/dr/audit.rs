//! The audit log: every DR action (drill, failover, undo, commit, point removal,
//! retention change and thinning) is appended with its time, group, point,
//! outcome and the requesting user.  Entries live in the metadata database
//! (table `A`, keyed by a sequence number), so they are as durable as the
//! catalog and travel with the store.

use serde::{Deserialize, Serialize};

use crate::dr::Actor;
use crate::engine::keys;
use crate::error::Result;
use crate::util::now_secs;
use crate::Store;

/// One audit entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    /// Sequence number, increasing.
    pub seq: u64,
    /// Seconds since the Unix epoch.
    pub time: u64,
    /// `drill`, `drill-rm`, `drill-expire`, `failover`, `failover-undo`,
    /// `failover-commit`, `point-rm`, `retention-set`, `retention-thin`.
    pub action: String,
    pub group: String,
    /// The recovery point concerned, if any.
    pub point: Option<u64>,
    /// The drill concerned, if any.
    pub drill: Option<u64>,
    /// `ok`, or the error that stopped the action.
    pub outcome: String,
    /// The requesting user's uid (the control socket's peer credentials).
    pub uid: u32,
    /// Free text: the command of a drill, the policy set, the points thinned.
    #[serde(default)]
    pub detail: Option<String>,
}

/// What an entry is about (everything but the sequence, time and outcome).
#[derive(Debug, Clone, Default)]
pub struct Action<'a> {
    pub action: &'a str,
    pub group: &'a str,
    pub point: Option<u64>,
    pub drill: Option<u64>,
    pub detail: Option<String>,
}

/// Append an entry for `what`, done by `who`, whose outcome is `outcome`
/// (`Ok` or the error's text).  Errors: the metadata database's.
pub fn append(
    store: &Store,
    who: Actor,
    what: Action<'_>,
    outcome: std::result::Result<(), String>,
) -> Result<AuditEntry> {
    let seq = store.next_id("audit")?;
    let e = AuditEntry {
        seq,
        time: now_secs(),
        action: what.action.into(),
        group: what.group.into(),
        point: what.point,
        drill: what.drill,
        outcome: match outcome {
            Ok(()) => "ok".into(),
            Err(e) => e,
        },
        uid: who.uid,
        detail: what.detail,
    };
    store.put_record(keys::AUDIT, seq, &e)?;
    log::info!(
        "audit: {} {} by uid {}: {}",
        e.action,
        e.group,
        e.uid,
        e.outcome
    );
    Ok(e)
}

/// Record the outcome of `r` for `what` and pass `r` through.  A failure to
/// write the entry is logged, never hides `r`.
pub fn record<T>(store: &Store, who: Actor, what: Action<'_>, r: Result<T>) -> Result<T> {
    let outcome = r.as_ref().map(|_| ()).map_err(|e| e.to_string());
    if let Err(e) = append(store, who, what, outcome) {
        log::error!("audit log: {e}");
    }
    r
}

/// Every entry, oldest first.
pub fn list(store: &Store) -> Result<Vec<AuditEntry>> {
    Ok(store
        .records::<AuditEntry>(keys::AUDIT)?
        .into_iter()
        .map(|(_, e)| e)
        .collect())
}
