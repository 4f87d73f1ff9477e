//! The upload queue: sealed packs waiting in the local staging directory, and
//! the background thread that uploads them.
//!
//! State machine of one pack (docs/DESIGN.md §20):
//! `open` (local file, appended) → `pending` (sealed, fsynced, waiting) →
//! `uploading` (PUT, then HEAD must report the sealed size) → `remote` (local
//! file removed).  The staging directory *is* the durable queue: after a crash
//! every pack file still there is pending again, whatever state it was in.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::remote::Remote;
use crate::engine::pack::{LocalPacks, PackBackend};
use crate::error::{Error, Result};
use crate::util::now_secs;

/// First retry delay after a failed upload, doubled per failure up to
/// [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub(crate) struct Pending {
    pub len: u64,
    /// When it was sealed (or found at open), seconds since the Unix epoch.
    pub since: u64,
}

#[derive(Default)]
pub(crate) struct QueueState {
    pub pending: BTreeMap<u64, Pending>,
    /// The pack being uploaded now.
    pub uploading: Option<u64>,
    pub stop: bool,
    pub last_error: Option<String>,
}

/// Shared between the backend, its writers and the uploader thread.
pub(crate) struct Queue {
    pub state: Mutex<QueueState>,
    pub wake: Condvar,
    /// Bytes not yet uploaded: pending packs plus what open packs hold.
    pub unsent: AtomicU64,
    /// Sizes of packs known to be remote (learned from uploads, HEADs, lists).
    pub remote_lens: Mutex<HashMap<u64, u64>>,
    /// When a refused write was last logged (seconds since the Unix epoch).
    pub last_refusal_log: AtomicU64,
}

impl Queue {
    pub fn new() -> Queue {
        Queue {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            unsent: AtomicU64::new(0),
            remote_lens: Mutex::new(HashMap::new()),
            last_refusal_log: AtomicU64::new(0),
        }
    }

    /// A sealed pack joins the queue.
    pub fn push(&self, id: u64, len: u64) {
        let mut s = self.state.lock().unwrap();
        s.pending.insert(
            id,
            Pending {
                len,
                since: now_secs(),
            },
        );
        self.wake.notify_all();
    }

    /// Take `id` out of the queue (deleted before it was uploaded).
    pub fn forget(&self, id: u64) {
        let mut s = self.state.lock().unwrap();
        if let Some(p) = s.pending.remove(&id) {
            self.unsent.fetch_sub(p.len, Ordering::SeqCst);
        }
    }
}

/// Upload one pack: read the local file, PUT it, HEAD it; Ok(len) once the
/// object holds `len` bytes.
fn upload_one(local: &LocalPacks, remote: &Remote, id: u64, len: u64) -> Result<Option<u64>> {
    let path = local.path(id);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    if data.len() as u64 != len {
        log::warn!(
            "s3 upload: {} holds {} bytes, the queue said {len}; uploading the file",
            path.display(),
            data.len()
        );
    }
    let n = data.len() as u64;
    crate::fail_point!("s3-before-put");
    remote.check_owner()?;
    remote.put_pack(id, bytes::Bytes::from(data))?;
    match remote.head_pack(id)? {
        Some(l) if l == n => Ok(Some(n)),
        got => Err(Error::ObjectStore {
            op: "HEAD after PUT",
            object: remote.pack_url(id),
            cause: format!("size is {got:?}, uploaded {n} bytes"),
        }),
    }
}

/// The uploader thread's loop: oldest pending pack first, retries with
/// exponential backoff (1 s doubling to 30 s) until `stop`.
pub(crate) fn run(queue: Arc<Queue>, local: Arc<LocalPacks>, remote: Arc<Remote>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let job = {
            let mut s = queue.state.lock().unwrap();
            loop {
                if s.stop {
                    return;
                }
                if let Some((&id, p)) = s.pending.iter().next() {
                    let job = (id, p.len);
                    s.uploading = Some(id);
                    break job;
                }
                s = queue.wake.wait(s).unwrap();
            }
        };
        let (id, len) = job;
        let res = upload_one(&local, &remote, id, len);
        let mut s = queue.state.lock().unwrap();
        if matches!(res, Ok(Some(_))) && !s.pending.contains_key(&id) {
            // Deleted (GC) while it was being uploaded: the object goes too,
            // while the pack still counts as uploading, so the catalog thread
            // (which waits for it) never sees this object and names it in a
            // catalog that reaches the bucket after the object is gone.
            drop(s);
            if let Err(e) = remote.delete_pack(id) {
                log::warn!(
                    "s3 upload: pack {id} was deleted during its upload and its \
                     object could not be removed ({e}); the sweep after the next \
                     catalog removes it"
                );
            }
            s = queue.state.lock().unwrap();
        }
        s.uploading = None;
        match res {
            Ok(uploaded) => {
                backoff = BACKOFF_MIN;
                s.last_error = None;
                if let Some(p) = s.pending.remove(&id) {
                    if let Some(n) = uploaded {
                        queue.remote_lens.lock().unwrap().insert(id, n);
                    }
                    // Only now, with the object confirmed, does the local copy go.
                    if let Err(e) = local.delete(id) {
                        log::warn!("s3 upload: removing the local copy of pack {id}: {e}");
                    }
                    queue.unsent.fetch_sub(p.len, Ordering::SeqCst);
                    log::debug!(
                        "uploaded pack {id} ({len} bytes) to {}",
                        remote.pack_url(id)
                    );
                }
            }
            Err(e) => {
                let msg = format!("uploading pack {id} to {}: {e}", remote.pack_url(id));
                log::warn!("{msg} (retrying in {} s)", backoff.as_secs());
                s.last_error = Some(e.to_string());
                let deadline = std::time::Instant::now() + backoff;
                while !s.stop {
                    let now = std::time::Instant::now();
                    if now >= deadline {
                        break;
                    }
                    s = queue.wake.wait_timeout(s, deadline - now).unwrap().0;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
