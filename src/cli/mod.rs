//! The `drclone` command line: a thin layer over the library (`anyhow` lives here
//! only; the library returns typed errors).

pub(crate) mod args;
pub(crate) mod commands;
pub(crate) mod dr;
pub(crate) mod plan;
pub(crate) mod repl;
