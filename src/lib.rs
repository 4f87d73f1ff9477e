//! # drclone: the storage half of a disaster-recovery site
//!
//! Protected machines replicate their disks to one DR host.  drclone keeps every
//! replicated disk in one deduplicating, compressed, optionally encrypted,
//! thin-provisioned chunk store, takes crash-consistent recovery points of whole
//! applications (groups of disks) in constant time, and makes writable clones of
//! them in constant time.
//!
//! The design (on-disk format, metadata keys, write path, O(1) points and clones,
//! GC and its safety argument, crash consistency) is in `docs/DESIGN.md`; each
//! module's doc covers its own part.
//!
//! The tree shows the layers, bottom up:
//!
//! | folder       | layer                                                          |
//! |--------------|----------------------------------------------------------------|
//! | [`engine`]   | the chunk store, block map, points, clones, write-back, GC     |
//! | [`nbd`]      | the NBD protocol: wire format (engine-free) and server         |
//! | [`fuse`]     | the FUSE mount of heads and points                             |
//! | [`repl`]     | replication: the wire protocol, the receiver, the agent       |
//! | [`dr`]       | DR workflows: drills, failover, retention, status, audit       |
//! | [`daemon`]   | `serve`: listeners, control socket, sessions, signals          |
//! | [`metrics`]  | Prometheus metrics of `serve --metrics`                        |
//! | `src/cli/`   | the command line (in the binary): parse, call the library, print |
//!
//! Concurrency (who may run beside whom):
//!
//! | operation                 | runs concurrently with                         |
//! |---------------------------|------------------------------------------------|
//! | read                      | everything                                     |
//! | write / zero              | reads, writes to other blocks, GC mark/sweep   |
//! | point / clone / volume rm | reads; waits for in-flight writes to finish    |
//! | gc                        | reads and writes (one gc at a time)            |

/// A failpoint (the `fail` crate) when built with `--features failpoints`; nothing
/// otherwise.  Names and windows are listed in docs/DESIGN.md §8.
#[cfg(feature = "failpoints")]
#[macro_export]
macro_rules! fail_point {
    ($($t:tt)*) => { fail::fail_point!($($t)*) };
}

/// A failpoint (the `fail` crate) when built with `--features failpoints`; nothing
/// otherwise.
#[cfg(not(feature = "failpoints"))]
#[macro_export]
macro_rules! fail_point {
    ($($t:tt)*) => {};
}

pub mod daemon;
pub mod dr;
pub mod engine;
pub mod error;
pub mod fuse;
pub mod metrics;
pub mod nbd;
pub mod repl;
pub mod util;

pub use engine::store::{Block, InitOptions, Store, View};
pub use error::{Error, ErrorKind, Result};
