//! Packs on an S3-compatible object store (radosgw, MinIO, a cloud bucket).
//!
//! [`S3Packs`] is a [`PackBackend`]:
//! * open packs are local files under `STORE/packs/` (the [`LocalPacks`] layout),
//!   made durable by FLUSH and FUA exactly as with the local backend;
//! * a sealed pack joins the upload queue; a background thread uploads it whole
//!   (PUT), confirms it (HEAD reports the sealed size) and only then removes the
//!   local file ([`upload`]); failures retry with exponential backoff;
//! * after a restart every pack file still under `STORE/packs/` is queued again:
//!   the local directory is the durable queue;
//! * reads of packs still local read the file; reads of uploaded packs are
//!   ranged GETs through a bounded on-disk cache of 1 MiB blocks ([`cache`]);
//! * bytes not yet uploaded are bounded (`pending_max`): an append that would
//!   pass the bound fails with [`Error::UploadBacklog`] (ENOSPC over NBD), naming
//!   the backlog, instead of filling the disk or waiting;
//! * every object is under `PREFIX/` (keys in [`remote`]); listing and deleting
//!   never leave `PREFIX/packs/`, so stores sharing a bucket never meet.
//!
//! Async stays inside [`remote::Remote`] (one tokio runtime per backend).
//! docs/DESIGN.md §20 has the state machine and the crash cases.

pub mod cache;
pub mod catalog;
mod checkpoint;
pub mod config;
pub mod rebuild;
pub mod remote;
mod upload;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

pub use config::{Credentials, S3Config};

use crate::engine::pack::{Backlog, LocalPacks, PackBackend, PackSync, PackWriter};
use crate::error::{Error, Result};
use crate::util::{human, now_secs};
use cache::RangeCache;
use remote::Remote;
use upload::Queue;

/// Smallest default bound on unsent bytes.
const MIN_DEFAULT_PENDING: u64 = 256 << 20;

/// The S3 pack backend (see the module doc).
pub struct S3Packs {
    local: Arc<LocalPacks>,
    remote: Arc<Remote>,
    cache: RangeCache,
    queue: Arc<Queue>,
    bound: u64,
    uploader: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Uploads catalog checkpoints and sweeps what they no longer reference.
    catalog: catalog::Uploader,
}

/// Free bytes of the file system holding `dir` (0 if unknown).
fn free_bytes(dir: &Path) -> u64 {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs fills the zeroed struct; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_bavail as u64 * st.f_frsize as u64
}

/// Check the bucket and claim `PREFIX` for the store `uuid` (`drclone init`):
/// writes `PREFIX/drclone-store.json`, refusing a prefix another store owns.
pub fn claim_prefix(cfg: &S3Config, uuid: uuid::Uuid) -> Result<()> {
    let creds = Credentials::load(cfg.credentials_file.as_deref())?;
    let remote = Remote::new(cfg, &creds)?;
    if let Some(body) = remote.get(remote::MARKER)? {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let owner = v.get("uuid").and_then(|u| u.as_str()).unwrap_or("?");
        return Err(Error::Refused(format!(
            "{} already holds the packs of store {owner} ({}); give each store its own prefix",
            cfg.url(),
            remote.url(remote::MARKER)
        )));
    }
    let body = serde_json::json!({ "uuid": uuid, "created": now_secs() });
    remote.put(
        remote::MARKER,
        bytes::Bytes::from(serde_json::to_vec_pretty(&body).expect("json")),
    )
}

impl S3Packs {
    /// Open the backend: staging in `packs_dir`, cache in `cache_dir`.  Needs
    /// credentials but not the object store: packs still local are queued and
    /// uploaded whenever it answers.
    pub fn open(cfg: &S3Config, packs_dir: &Path, cache_dir: &Path) -> Result<S3Packs> {
        let creds = Credentials::load(cfg.credentials_file.as_deref())?;
        let remote = Arc::new(Remote::new(cfg, &creds)?);
        let local = Arc::new(LocalPacks::new(packs_dir)?);
        let cache = RangeCache::new(cache_dir, cfg.cache_size)?;
        let queue = Arc::new(Queue::new());
        let bound = cfg
            .pending_max
            .unwrap_or_else(|| (free_bytes(packs_dir) / 2).max(MIN_DEFAULT_PENDING));
        // The staging directory is the queue: everything still there goes up.
        {
            let mut s = queue.state.lock().unwrap();
            for id in local.list()? {
                let path = local.path(id);
                let Ok(m) = std::fs::metadata(&path) else {
                    continue;
                };
                let since = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(now_secs(), |d| d.as_secs());
                queue.unsent.fetch_add(m.len(), Ordering::SeqCst);
                s.pending.insert(
                    id,
                    upload::Pending {
                        len: m.len(),
                        since,
                    },
                );
            }
            if !s.pending.is_empty() {
                log::info!(
                    "{}: {} pack(s) ({}) from before the last stop wait for upload",
                    remote.target(),
                    s.pending.len(),
                    human(queue.unsent.load(Ordering::SeqCst))
                );
            }
        }
        let (q, l, r) = (queue.clone(), local.clone(), remote.clone());
        let h = std::thread::Builder::new()
            .name("s3-upload".into())
            .spawn(move || upload::run(q, l, r))
            .map_err(|e| Error::io("s3-upload thread", e))?;
        let catalog = catalog::Uploader::start(remote.clone(), queue.clone())?;
        Ok(S3Packs {
            catalog,
            local,
            remote,
            cache,
            queue,
            bound,
            uploader: Mutex::new(Some(h)),
        })
    }

    /// Write for store incarnation `inc` ([`remote::Remote::check_owner`]).
    pub fn owned_by(self, inc: Option<uuid::Uuid>) -> S3Packs {
        self.remote.set_owner(inc);
        self
    }

    /// Wait until nothing is pending, or `timeout` passes; true if drained.
    pub fn wait_uploaded(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.queue.state.lock().unwrap().pending.is_empty() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }

    /// A remote pack's size: known, or asked (HEAD).  None if there is no object.
    fn remote_len(&self, id: u64) -> Result<Option<u64>> {
        if let Some(&l) = self.queue.remote_lens.lock().unwrap().get(&id) {
            return Ok(Some(l));
        }
        let l = self.remote.head_pack(id)?;
        if let Some(l) = l {
            self.queue.remote_lens.lock().unwrap().insert(id, l);
        }
        Ok(l)
    }

    /// Read from the object (through the cache unless `fresh`).
    fn read_remote(&self, id: u64, offset: u64, buf: &mut [u8], fresh: bool) -> Result<()> {
        let len = self.remote_len(id)?.ok_or(Error::PackGone { pack: id })?;
        let end = offset + buf.len() as u64;
        if end > len {
            return Err(cache::short_read(&self.remote.pack_url(id)));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let get = |r: std::ops::Range<u64>| -> Result<bytes::Bytes> {
            let b = self
                .remote
                .get_pack_range(id, r.clone())?
                .ok_or(Error::PackGone { pack: id })?;
            if b.len() as u64 != r.end - r.start {
                return Err(cache::short_read(&self.remote.pack_url(id)));
            }
            Ok(b)
        };
        if fresh || !self.cache.enabled() {
            buf.copy_from_slice(&get(offset..end)?);
            return Ok(());
        }
        let (first, last) = (offset / cache::BLOCK, (end - 1) / cache::BLOCK);
        let mut missing = Vec::new();
        for b in first..=last {
            let lo = (b * cache::BLOCK).max(offset);
            let hi = ((b + 1) * cache::BLOCK).min(end);
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            if !self.cache.read(id, b, lo - b * cache::BLOCK, dst) {
                missing.push(b);
            }
        }
        if let (Some(&a), Some(&z)) = (missing.first(), missing.last()) {
            // One GET for the span of missing blocks, whole blocks (clipped to
            // the pack), then each block kept and its part copied out.
            let span = a * cache::BLOCK..((z + 1) * cache::BLOCK).min(len);
            let data = get(span.clone())?;
            for b in missing {
                let s = b * cache::BLOCK;
                let e = ((b + 1) * cache::BLOCK).min(len);
                let block = &data[(s - span.start) as usize..(e - span.start) as usize];
                self.cache.insert(id, b, block);
                let lo = s.max(offset);
                let hi = e.min(end);
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&block[(lo - s) as usize..(hi - s) as usize]);
            }
        }
        Ok(())
    }

    fn read(&self, id: u64, offset: u64, buf: &mut [u8], fresh: bool) -> Result<()> {
        // Local first: the local copy is removed only once the object is
        // confirmed, so a pack not found locally is remote (or deleted).
        match self.local.read_at(id, offset, buf) {
            Err(Error::PackGone { .. }) => self.read_remote(id, offset, buf, fresh),
            other => other,
        }
    }
}

impl Drop for S3Packs {
    fn drop(&mut self) {
        {
            let mut s = self.queue.state.lock().unwrap();
            s.stop = true;
            self.queue.wake.notify_all();
        }
        if let Some(h) = self.uploader.lock().unwrap().take() {
            let _ = h.join();
        }
    }
}

/// Writes a pack to the local staging file, counting its bytes against the
/// bound; sealing queues it for upload.
struct S3Writer {
    id: u64,
    inner: Box<dyn PackWriter>,
    queue: Arc<Queue>,
    /// Bytes of this pack counted in `queue.unsent`.
    counted: u64,
    bound: u64,
    refuse: Box<dyn Fn(u64) -> Error + Send>,
}

impl PackWriter for S3Writer {
    fn append(&mut self, data: &[u8]) -> Result<u64> {
        self.append_parts(&[data])
    }
    fn append_parts(&mut self, parts: &[&[u8]]) -> Result<u64> {
        let n: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if self.queue.unsent.load(Ordering::SeqCst) + n > self.bound {
            return Err((self.refuse)(n));
        }
        let off = self.inner.append_parts(parts)?;
        self.queue.unsent.fetch_add(n, Ordering::SeqCst);
        self.counted += n;
        Ok(off)
    }
    fn syncer(&self) -> Arc<dyn PackSync> {
        self.inner.syncer()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn seal(self: Box<Self>) -> Result<u64> {
        let S3Writer {
            id,
            inner,
            queue,
            counted,
            ..
        } = *self;
        let len = inner.seal()?;
        // The pack header was written before this writer counted anything.
        if len > counted {
            queue.unsent.fetch_add(len - counted, Ordering::SeqCst);
        } else {
            queue.unsent.fetch_sub(counted - len, Ordering::SeqCst);
        }
        queue.push(id, len);
        Ok(len)
    }
}

impl PackBackend for S3Packs {
    fn create(&self, id: u64) -> Result<Box<dyn PackWriter>> {
        let inner = self.local.create(id)?;
        let (target, bound, q2) = (self.remote.target(), self.bound, self.queue.clone());
        // The refusal names the backlog as it is when a write is refused.
        let refuse = Box::new(move |want: u64| {
            let s = q2.state.lock().unwrap();
            let now = now_secs();
            let oldest = s
                .pending
                .values()
                .map(|p| now.saturating_sub(p.since))
                .max();
            let e = Error::UploadBacklog(format!(
                "write refused: {} not yet uploaded to {target} ({} sealed pack(s) waiting, \
                 oldest {} s) plus {} would pass the bound of {} on unsent data \
                 (--s3-pending-max); {}",
                human(q2.unsent.load(Ordering::SeqCst)),
                s.pending.len(),
                oldest.unwrap_or(0),
                human(want),
                human(bound),
                match &s.last_error {
                    Some(e) => format!("uploads are failing: {e}"),
                    None => "uploads are running; retry when they catch up".into(),
                }
            ));
            // The client gets ENOSPC (and this text, with structured replies);
            // the log says it too, at most every 10 s.
            if q2.last_refusal_log.swap(now, Ordering::SeqCst) + 10 <= now {
                log::warn!("{e}");
            }
            e
        });
        Ok(Box::new(S3Writer {
            id,
            inner,
            queue: self.queue.clone(),
            counted: 0,
            bound: self.bound,
            refuse,
        }))
    }

    fn read_at(&self, id: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read(id, offset, buf, false)
    }

    fn read_at_fresh(&self, id: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read(id, offset, buf, true)
    }

    fn len(&self, id: u64) -> Result<Option<u64>> {
        match self.local.len(id)? {
            Some(l) => Ok(Some(l)),
            None => self.remote_len(id),
        }
    }

    fn sync(&self, id: u64) -> Result<()> {
        self.local.sync(id)
    }

    fn delete(&self, id: u64) -> Result<()> {
        // Out of the queue first: an uploader that finishes a PUT of this pack
        // afterwards finds it forgotten and deletes the object itself; one that
        // finished before has removed the local file, and the DELETE below
        // removes the object.
        self.queue.forget(id);
        self.local.delete(id)?;
        self.cache.drop_pack(id);
        self.queue.remote_lens.lock().unwrap().remove(&id);
        // The object stays until a catalog that no longer lists this pack is in
        // the bucket (its sweep deletes it): the newest catalog there must never
        // name a deleted object, or a rebuild from it would lose data.
        Ok(())
    }

    fn catalog(&self) -> Option<&catalog::Uploader> {
        Some(&self.catalog)
    }

    fn list(&self) -> Result<Vec<u64>> {
        let mut ids: Vec<u64> = self.local.list()?;
        ids.extend(self.remote.list_packs()?.into_iter().map(|(id, _)| id));
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    fn bytes(&self) -> Result<u64> {
        let local = self.local.list()?;
        let mut total = 0;
        for &id in &local {
            total += self.local.len(id)?.unwrap_or(0);
        }
        for (id, len) in self.remote.list_packs()? {
            if local.binary_search(&id).is_err() {
                total += len;
            }
        }
        Ok(total)
    }

    fn locate(&self, id: u64) -> String {
        if self.local.len(id).ok().flatten().is_some() {
            format!(
                "{} (not yet uploaded to {})",
                self.local.path(id).display(),
                self.remote.pack_url(id)
            )
        } else {
            self.remote.pack_url(id)
        }
    }

    fn check_sealed(&self, id: u64, len: u64) -> Result<Option<String>> {
        if let Some(l) = self.local.len(id)? {
            // Not uploaded yet: the local file is what there is to check.
            return Ok((l < len).then(|| {
                format!(
                    "{} (not yet uploaded) holds {l} bytes, less than its sealed length {len}",
                    self.local.path(id).display()
                )
            }));
        }
        // Always ask the object store (not the sizes remembered from uploads).
        Ok(match self.remote.head_pack(id)? {
            Some(l) if l >= len => None,
            Some(l) => Some(format!(
                "object {} holds {l} bytes, less than the pack's sealed length {len}",
                self.remote.pack_url(id)
            )),
            None => Some(format!("object {} is missing", self.remote.pack_url(id))),
        })
    }

    fn backlog(&self) -> Option<Backlog> {
        let s = self.queue.state.lock().unwrap();
        let now = now_secs();
        Some(Backlog {
            target: self.remote.target(),
            packs: s.pending.len() as u64,
            bytes: self.queue.unsent.load(Ordering::SeqCst),
            oldest_seconds: s
                .pending
                .values()
                .map(|p| now.saturating_sub(p.since))
                .max(),
            bound_bytes: self.bound,
            last_error: s.last_error.clone(),
            catalog: Some(self.catalog.status()),
        })
    }
}
