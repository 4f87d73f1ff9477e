//! Replication into drclone (docs/DESIGN.md §18): the wire protocol
//! ([`wire`]), the receiver inside `serve` ([`receiver`]), and the agent that
//! runs on the protected host ([`agent`]).  Each cycle lands as one recovery
//! point of the whole group, atomically; only chunks the target lacks travel,
//! compressed.

pub mod agent;
pub mod link;
pub mod push;
pub mod reader;
pub mod receiver;
pub mod restore;
pub mod wire;

/// The lease among `users` (a head's lease holders) that makes the head take
/// no other writer: a replication session's (`replication from PEER`) or a
/// planned failback's fence (`failback to TARGET`).  NBD and FUSE refuse to
/// open such a head for writing.
pub fn exclusive_writer(users: &[String]) -> Option<&String> {
    users.iter().find(|u| {
        u.starts_with(receiver::LEASE_PREFIX) || u.starts_with(crate::dr::failback::FENCE_PREFIX)
    })
}
