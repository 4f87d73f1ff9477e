//! Shared by the crash tests (`powerloss`, `faults`): the crash-simulating FUSE
//! file system and the stamped-data model of volume contents.
#![allow(dead_code)]

pub mod crashfs;
pub mod stamps;

/// Log to the test's output with `RUST_LOG` (e.g. `RUST_LOG=drclone=info`).
pub fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}
