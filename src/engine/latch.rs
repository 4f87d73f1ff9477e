//! The fsyncgate latch: after a failed write or sync that may have lost
//! acknowledged data, the store stops acknowledging anything.
//!
//! Linux may drop the dirty pages of a file whose write-back failed and then report
//! success to the next `fsync` (the 2018 "fsyncgate" found by PostgreSQL); redb
//! answers it with a `PreviousIo` error that sticks.  drclone does the same: the
//! first failed pack sync, journal sync, WAL write or WAL sync trips the latch,
//! and from then on every write, zero, flush and catalog change returns
//! [`Error::Latched`] naming the file and the error.  Reads keep working.  Reopening
//! the store (a restart) recovers from what is durable: the journal replays, unsealed
//! packs are checked record by record.
//!
//! An ENOSPC from a `write(2)` into a pack or the journal does not trip it: nothing
//! that failed was acknowledged and nothing earlier is affected (the record is an
//! unreferenced tail), so the store stays usable once space is freed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Set once, never cleared (only a reopen starts a store without it).
#[derive(Debug, Default)]
pub struct Latch {
    store: PathBuf,
    tripped: OnceLock<(String, String)>,
}

impl Latch {
    /// A latch for the store at `store` (named in its error).
    pub fn new(store: &Path) -> Latch {
        Latch {
            store: store.to_path_buf(),
            tripped: OnceLock::new(),
        }
    }

    /// Trip the latch: `what` names the operation and file ("fdatasync of
    /// STORE/packs/0a/000000000000000a.pack"), `cause` the error.  The first trip
    /// wins; later ones are logged only.  Returns the latched error, for the caller
    /// to return in place of the original one.
    pub fn trip(&self, what: impl Into<String>, cause: impl std::fmt::Display) -> Error {
        let (what, cause) = (what.into(), cause.to_string());
        if self.tripped.set((what.clone(), cause.clone())).is_ok() {
            leave_marker(&self.store, &what, &cause);
            log::error!(
                "store {}: {what} failed: {cause}; the store is now read-only until it is \
                 reopened (acknowledged writes since the last successful flush may not be durable)",
                self.store.display()
            );
        } else {
            log::warn!("store {}: {what} failed too: {cause}", self.store.display());
        }
        self.error().expect("just tripped")
    }

    /// `Err(Latched)` once tripped.
    pub fn check(&self) -> Result<()> {
        match self.error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Whether the latch has tripped.
    pub fn is_tripped(&self) -> bool {
        self.tripped.get().is_some()
    }

    fn error(&self) -> Option<Error> {
        self.tripped.get().map(|(what, cause)| Error::Latched {
            store: self.store.clone(),
            what: what.clone(),
            cause: cause.clone(),
        })
    }
}

/// The file a tripped latch leaves in the store directory (best effort: the disk
/// may be failing).  The next open reads it: recovery then trusts only what a
/// successful sync covered (the page cache may show pages the disk never got),
/// and removes it once the store is recovered.
pub const MARKER: &str = "latched";

fn leave_marker(store: &Path, what: &str, cause: &str) {
    let path = store.join(MARKER);
    let res = std::fs::write(&path, format!("{what}: {cause}\n"))
        .and_then(|_| std::fs::File::open(&path)?.sync_all())
        .and_then(|_| std::fs::File::open(store)?.sync_all());
    if let Err(e) = res {
        log::warn!(
            "store {}: could not leave the latch marker: {e}",
            store.display()
        );
    }
}

/// Whether a previous run of the store latched (see [`MARKER`]).
pub fn was_latched(store: &Path) -> bool {
    store.join(MARKER).exists()
}

/// Run a sync (or a write whose failure may lose acknowledged data) and trip the
/// latch if it fails.  Checks the latch first: after a failed sync, a later one that
/// "succeeds" proves nothing.
pub fn guarded<T>(
    latch: &Latch,
    what: impl FnOnce() -> String,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    latch.check()?;
    f().map_err(|e| latch.trip(what(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_sticks_and_names_the_file() {
        let l = Latch::new(Path::new("/s"));
        assert!(l.check().is_ok());
        let r: Result<()> = guarded(
            &l,
            || "fdatasync of /s/journal/1.log".into(),
            || {
                Err(Error::io(
                    "/s/journal/1.log",
                    std::io::Error::from_raw_os_error(libc::EIO),
                ))
            },
        );
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.contains("read-only after a failed fdatasync of /s/journal/1.log"),
            "{msg}"
        );
        // A later sync that would succeed is refused: the first error sticks.
        let again: Result<()> = guarded(&l, || "WAL sync".into(), || Ok(()));
        assert!(again.unwrap_err().to_string().contains("journal/1.log"));
        assert!(l.is_tripped());
    }
}
