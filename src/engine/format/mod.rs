//! On-disk formats as pure functions (no I/O, no engine types): what the fuzz
//! targets build on their own.

pub mod journal;
pub mod pack;
