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
//! | module     | job                                                        |
//! |------------|------------------------------------------------------------|
//! | [`keys`]   | the one key codec for RocksDB (big-endian, tagged)         |
//! | [`meta`]   | RocksDB wrapper and every versioned value it stores        |
//! | [`codec`]  | chunk ids, compression, encryption                         |
//! | [`pack`]   | pack file format and the pack backend interface            |
//! | [`chunks`] | the chunk store: dedup, packs, index, recovery             |
//! | [`store`]  | groups, volumes, points, clones, the versioned block map   |
//! | [`overlay`]| write-back pages of partly written blocks                  |
//! | [`journal`]| the durable log behind the overlay (FLUSH = one fdatasync) |
//! | [`gc`]     | garbage collection and pack compaction                     |
//! | [`maint`]  | `df` and `verify`                                          |
//! | [`imex`]   | sparse import and export of raw images                     |
//! | [`nbd`]    | NBD wire protocol (engine-free) and server                 |
//! | [`fuse`]   | FUSE mount of heads and points                             |
//! | [`daemon`] | `serve`: listeners, control socket, signals                |
//!
//! Concurrency (who may run beside whom):
//!
//! | operation                 | runs concurrently with                         |
//! |---------------------------|------------------------------------------------|
//! | read                      | everything                                     |
//! | write / zero              | reads, writes to other blocks, GC mark/sweep   |
//! | point / clone / volume rm | reads; waits for in-flight writes to finish    |
//! | gc                        | reads and writes (one gc at a time)            |

pub mod chunks;
pub mod codec;
pub mod daemon;
pub mod error;
pub mod fuse;
pub mod gc;
pub mod imex;
pub mod journal;
pub mod keys;
pub mod maint;
pub mod meta;
pub mod nbd;
pub mod overlay;
pub mod pack;
pub mod store;
pub mod util;

pub use error::{Error, ErrorKind, Result};
pub use store::{Block, InitOptions, Store, View};
