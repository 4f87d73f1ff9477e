//! Where the store takes catalog checkpoints for the object store
//! ([`super::catalog`]): at every recovery point, at the end of a GC, on the
//! daemon's interval, and at open.  A store with local packs takes none.

use std::sync::atomic::Ordering;

use super::catalog;
use crate::engine::store::{Exclusive, Store};
use crate::error::Result;

impl Store {
    /// Take a catalog checkpoint and queue it for upload (the upload itself is
    /// asynchronous: [`catalog::Uploader`]).  `reason` is recorded in it.
    /// Returns false when nothing was taken: the packs are local, or a GC is
    /// running (the GC takes one when it ends).  Errors: sealing the open pack
    /// failed (the store's latch trips), or the snapshot could not be read.
    pub fn checkpoint_catalog(&self, reason: &str) -> Result<bool> {
        if self.chunks.backend.catalog().is_none() {
            return Ok(false);
        }
        let Ok(_no_gc) = self.gc_lock.try_lock() else {
            return Ok(false);
        };
        let g = self.gate.exclusive();
        self.checkpoint_under_gate(g, reason)
    }

    /// [`Store::checkpoint_catalog`] by a GC that holds the GC lock.
    pub(crate) fn checkpoint_catalog_gc_held(&self, reason: &str) -> Result<bool> {
        if self.chunks.backend.catalog().is_none() {
            return Ok(false);
        }
        let g = self.gate.exclusive();
        self.checkpoint_under_gate(g, reason)
    }

    /// A point was just committed under `gate`: checkpoint the catalog with it
    /// (skipped, and left to the GC, if a GC is running: its compaction may be
    /// moving chunks to a pack that is not sealed).  A failure is logged, not
    /// returned: the point exists; the next checkpoint covers it.
    pub(crate) fn checkpoint_after_point(&self, gate: Exclusive<'_>, reason: &str) {
        if self.chunks.backend.catalog().is_none() {
            return;
        }
        let Ok(_no_gc) = self.gc_lock.try_lock() else {
            log::info!("catalog checkpoint for {reason} left to the running gc");
            return;
        };
        if let Err(e) = self.checkpoint_under_gate(gate, reason) {
            log::warn!("catalog checkpoint for {reason} failed: {e}");
        }
    }

    /// Seal the open pack and take the snapshot under the exclusive gate (no
    /// write half-way: everything the snapshot references is in sealed packs),
    /// then encode the catalog after releasing it.
    fn checkpoint_under_gate(&self, gate: Exclusive<'_>, reason: &str) -> Result<bool> {
        let Some(up) = self.chunks.backend.catalog() else {
            return Ok(false);
        };
        self.chunks.seal_open()?;
        let snap = self.db.db.snapshot();
        let seqno = self.db.db.latest_sequence_number();
        drop(gate);
        let mut cfg = self.cfg.clone();
        cfg.s3 = None;
        let config = serde_json::to_value(&cfg).expect("config serializes");
        let cp = catalog::take(&self.db, &snap, config, reason)?;
        drop(snap);
        log::debug!(
            "catalog checkpoint ({reason}): {} keys, {} bytes, {} sealed pack(s)",
            cp.header.keys,
            cp.object.len(),
            cp.header.sealed.len()
        );
        up.submit(cp);
        self.catalog_seqno.store(seqno, Ordering::Release);
        Ok(true)
    }

    /// Whether the metadata changed since the last checkpoint (the daemon's
    /// interval checkpoints only then).
    pub fn catalog_changed(&self) -> bool {
        self.db.db.latest_sequence_number() != self.catalog_seqno.load(Ordering::Acquire)
    }
}
