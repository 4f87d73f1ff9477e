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
