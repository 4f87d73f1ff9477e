//! The DR workflows, above the engine: drills ([`drill`]), failover with undo and
//! commit ([`failover`]), failback ([`failback`]), recovery plans ([`plan`]), retention ([`retention`]), status ([`status`]) and the
//! audit log ([`audit`]).  docs/DESIGN.md §17 describes them.
//!
//! Each workflow is a function of an open [`crate::Store`] and, where NBD clients
//! must let go of a head, a [`Disconnect`] callback: the daemon passes one that
//! closes the sessions of an export (`crate::nbd::sessions`); a command run
//! without a daemon has no sessions to close and passes [`no_clients`].

pub mod audit;
pub mod checkpoint;
pub mod drill;
pub mod failback;
pub mod failover;
pub mod plan;
pub mod retention;
pub mod status;

use crate::error::Result;

/// Closes every NBD session of the export named (canonical `GROUP/DISK`) and
/// waits until they are gone.  Errors: `Busy` if a session does not leave.
pub type Disconnect<'a> = &'a dyn Fn(&str) -> Result<usize>;

/// The [`Disconnect`] of a process that serves no NBD clients.
pub fn no_clients(_export: &str) -> Result<usize> {
    Ok(0)
}

/// Who asked for an action: the uid of the control socket's peer (or of the
/// process, when a command ran without a daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor {
    pub uid: u32,
}

impl Actor {
    /// The user running this process.
    pub fn current() -> Actor {
        // SAFETY: getuid cannot fail and touches no memory.
        Actor {
            uid: unsafe { libc::getuid() },
        }
    }
}

/// One maintenance round of the daemon at `now` (seconds since the Unix epoch):
/// expire drills, drop retired heads, thin points to each group's retention.
/// Errors are per step and logged; the first is returned after all ran.
pub fn maintain(store: &crate::Store, now: u64, disconnect: Disconnect<'_>) -> Result<()> {
    let mut first = None;
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            log::warn!("maintenance: {e}");
            first.get_or_insert(e);
        }
    };
    note(drill::expire(store, now, disconnect).map(|_| ()));
    match store.groups() {
        Ok(groups) => {
            for g in groups {
                if !g.retired.is_empty() {
                    note(store.drop_retired(&g.name).map(|_| ()));
                }
                if g.retention.is_some() || g.app_retention.is_some() {
                    note(retention::apply(store, Actor::current(), &g.name, now).map(|_| ()));
                }
            }
        }
        Err(e) => note(Err(e)),
    }
    first.map_or(Ok(()), Err)
}
