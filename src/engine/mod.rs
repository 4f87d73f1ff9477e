//! The engine: everything that stores data, and nothing that speaks a protocol.
//!
//! | module      | job                                                            |
//! |-------------|----------------------------------------------------------------|
//! | [`keys`]    | the one key codec for RocksDB (big-endian, tagged)             |
//! | [`meta`]    | RocksDB wrapper and every versioned value it stores            |
//! | [`codec`]   | chunk ids, compression, encryption                             |
//! | [`format`]  | pure encoders/decoders of the pack and journal formats (fuzzed) |
//! | [`pack`]    | pack file format and the pack backend interface                |
//! | [`s3`]      | packs on an S3-compatible object store (upload queue, cache)   |
//! | [`chunks`]  | the chunk store: dedup, packs, index, crash recovery           |
//! | [`store`]   | the store handle: open, close, flush, the gate, the latch      |
//! | [`catalog`] | groups, volumes, recovery points, clones, views                |
//! | [`map`]     | the versioned block map: resolve, extents, liveness            |
//! | [`write`]   | the read and write paths, destage of the write-back overlay    |
//! | [`overlay`] | write-back pages of partly written blocks                      |
//! | [`journal`] | the durable log behind the overlay (FLUSH = one fdatasync)     |
//! | [`latch`]   | the fsyncgate latch: read-only after a failed sync              |
//! | [`types`]   | point kinds, group roles, retention policies                    |
//! | [`gc`]      | garbage collection and pack compaction                         |
//! | [`maint`]   | `df` and `verify`                                              |
//! | [`imex`]    | sparse import and export of raw images                         |
//!
//! The invariants, the lock order and the table of which operations may run
//! beside which are in `docs/DESIGN.md` §6 and §8, and in [`store`]'s doc.

pub mod catalog;
pub mod chunks;
pub mod codec;
pub mod format;
pub mod gc;
pub mod heads;
pub mod imex;
pub mod journal;
pub mod keys;
pub mod latch;
pub mod maint;
pub mod map;
pub mod meta;
pub mod overlay;
pub mod pack;
pub mod s3;
pub mod store;
pub mod types;
pub mod write;
