//! Catalog checkpoints: the store's metadata, kept in the bucket beside its
//! packs, so that a new host can rebuild the store when the DR host is lost
//! (`drclone init --from-backend`, [`super::rebuild`]).  docs/DESIGN.md §20b.
//!
//! A checkpoint is a logical dump of the RocksDB catalog taken from one
//! snapshot: groups, volumes, lineages, points, block maps, the chunk index,
//! the pack records and the counters.  Left out are the keys that describe
//! local state only: `D` (how much of an unsealed local pack a sync covered),
//! `J` (journal horizons: the journal is not in the bucket) and `Q` (lost
//! chunks awaiting repair).
//!
//! Object `PREFIX/catalog/{seq:016x}.cat`, all integers big-endian:
//! ```text
//! "DRCATLG1" | header length u32 | header (JSON [`Header`])
//!            | body length u64   | body (zstd of records: klen u32 | vlen u32 | key | value)
//!            | blake3 of every byte before it (32)
//! ```
//! The store's `store.json` (without its `s3` section) is in the header, so
//! a rebuild needs only the bucket and, for an encrypted store, the key file.
//!
//! The checkpoint is taken where the store says (`Store::checkpoint_catalog`:
//! at every recovery point, at the end of a GC, on the daemon's interval),
//! always after the open pack was sealed under the store's exclusive gate, so
//! everything the snapshot's points and heads reference is in sealed packs.
//! The [`Uploader`] puts it in the bucket only once every pack that snapshot
//! lists as sealed is confirmed there, then deletes what the new checkpoint
//! no longer needs ([`sweep`]).

use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::remote::Remote;
use super::upload::Queue;
use crate::engine::keys;
use crate::engine::meta::PackRec;
use crate::error::{Error, Result};
use crate::util::now_secs;

/// First bytes of a catalog object.
pub const MAGIC: &[u8; 8] = b"DRCATLG1";
/// The folder of catalog objects under the store's prefix.
pub const DIR: &str = "catalog";
/// Catalog objects kept in the bucket (the newest ones); older are deleted
/// once a newer one is confirmed.
pub const KEEP: usize = 2;

/// A catalog body may inflate to at most this many times its compressed size
/// (real catalogs, mostly chunk ids and hashes, compress about 2 to 10 times).
const MAX_RATIO: u64 = 1024;
/// ... and always to this many bytes (small catalogs).
const MIN_INFLATE_LIMIT: u64 = 16 << 20;

/// Key tags a checkpoint leaves out (local state, see the module doc).
const LOCAL_TAGS: [u8; 3] = [keys::DURABLE, keys::HORIZON, keys::LOST];

/// What a catalog says of itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    /// Format version (1).
    pub version: u32,
    /// The store's `store.json`, without its `s3` section.
    pub config: serde_json::Value,
    /// When the snapshot was taken (Unix seconds).
    pub time: u64,
    /// Why: "point 7 of db", "gc", "interval", "open", "close".
    pub reason: String,
    /// The pack counter at the snapshot: every pack the snapshot knows has a
    /// smaller id, and every pack made after it a larger one.
    pub next_pack: u64,
    /// Packs the snapshot records as sealed (all its data lives in them).
    pub sealed: Vec<u64>,
    /// Every pack the snapshot has a record of, sealed or not (a sweep by this
    /// catalog never deletes them).
    pub packs: Vec<u64>,
    /// Records in the body.
    pub keys: u64,
}

/// A checkpoint ready for upload: its header and the encoded object.
pub struct Checkpoint {
    pub header: Header,
    pub object: Bytes,
}

/// Name of the catalog object with sequence number `seq`.
pub fn object_name(seq: u64) -> String {
    format!("{DIR}/{seq:016x}.cat")
}

/// Parse a catalog object's file name back to its sequence number.
pub fn parse_name(name: &str) -> Option<u64> {
    u64::from_str_radix(name.strip_suffix(".cat")?, 16).ok()
}

/// Dump the catalog from `db`'s snapshot `snap`.  `config` is the store's
/// `store.json` as JSON.  Errors: a RocksDB read error.
pub fn take(
    db: &crate::engine::meta::Db,
    snap: &rocksdb::Snapshot<'_>,
    config: serde_json::Value,
    reason: &str,
) -> Result<Checkpoint> {
    let mut body = zstd::stream::Encoder::new(Vec::new(), 3)
        .map_err(|e| Error::io("catalog: zstd encoder", e))?;
    let mut n = 0u64;
    let mut next_pack = 0u64;
    let mut sealed = Vec::new();
    let mut packs = Vec::new();
    let pack_counter = keys::counter("pack");
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_snapshot(snap);
    let mut it = db.db.raw_iterator_opt(ro);
    it.seek_to_first();
    while it.valid() {
        let (k, v) = (it.key().unwrap_or_default(), it.value().unwrap_or_default());
        if k.first().is_some_and(|t| !LOCAL_TAGS.contains(t)) {
            if k[0] == keys::PACK {
                if let (Some(id), Some(rec)) = (keys::parse_pack(k), PackRec::decode(v)) {
                    if rec.sealed {
                        sealed.push(id);
                    }
                    packs.push(id);
                    next_pack = next_pack.max(id + 1);
                }
            } else if k == pack_counter.as_slice() && v.len() == 8 {
                next_pack = next_pack.max(u64::from_be_bytes(v.try_into().unwrap()));
            }
            let io = |e| Error::io("catalog: compressing", e);
            body.write_all(&(k.len() as u32).to_be_bytes())
                .map_err(io)?;
            body.write_all(&(v.len() as u32).to_be_bytes())
                .map_err(io)?;
            body.write_all(k).map_err(io)?;
            body.write_all(v).map_err(io)?;
            n += 1;
        }
        it.next();
    }
    it.status().map_err(|e| db.err(e))?;
    let body = body
        .finish()
        .map_err(|e| Error::io("catalog: compressing", e))?;
    let header = Header {
        version: 1,
        config,
        time: now_secs(),
        reason: reason.to_string(),
        next_pack,
        sealed,
        packs,
        keys: n,
    };
    let hjson = serde_json::to_vec(&header).expect("header serializes");
    let mut out = Vec::with_capacity(body.len() + hjson.len() + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(hjson.len() as u32).to_be_bytes());
    out.extend_from_slice(&hjson);
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    out.extend_from_slice(&body);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    Ok(Checkpoint {
        header,
        object: Bytes::from(out),
    })
}

/// Decode a catalog object: its header and its records (key, value), in key
/// order.  Errors: [`Error::Invalid`] naming `what` (the object's URL) and the
/// problem (truncated, checksum mismatch, unknown version, bad body).
pub fn decode(what: &str, data: &[u8]) -> Result<(Header, Vec<(Vec<u8>, Vec<u8>)>)> {
    let bad = |p: &str| Error::invalid(format!("catalog {what}: {p}"));
    if data.len() < MAGIC.len() + 4 + 8 + 32 || &data[..8] != MAGIC {
        return Err(bad("not a drclone catalog (bad magic or too short)"));
    }
    let (content, sum) = data.split_at(data.len() - 32);
    if blake3::hash(content).as_bytes() != sum {
        return Err(bad("checksum mismatch (the object is damaged)"));
    }
    let hlen = u32::from_be_bytes(content[8..12].try_into().unwrap()) as usize;
    let h = content
        .get(12..12 + hlen)
        .ok_or_else(|| bad("header beyond the end"))?;
    let header: Header =
        serde_json::from_slice(h).map_err(|e| bad(&format!("header is not valid: {e}")))?;
    if header.version != 1 {
        return Err(bad(&format!("unknown version {}", header.version)));
    }
    let rest = &content[12 + hlen..];
    let blen = u64::from_be_bytes(
        rest.get(..8)
            .ok_or_else(|| bad("body length missing"))?
            .try_into()
            .unwrap(),
    ) as usize;
    let body = rest
        .get(8..8 + blen)
        .ok_or_else(|| bad("body beyond the end"))?;
    // Inflate at most MAX_RATIO times the compressed size (a floor for small
    // catalogs): a hostile body cannot take memory it does not pay for.
    let limit = (blen as u64)
        .saturating_mul(MAX_RATIO)
        .max(MIN_INFLATE_LIMIT);
    let mut raw = Vec::new();
    zstd::stream::read::Decoder::with_buffer(body)
        .map_err(|e| bad(&format!("body: {e}")))?
        .take(limit + 1)
        .read_to_end(&mut raw)
        .map_err(|e| bad(&format!("body: {e}")))?;
    if raw.len() as u64 > limit {
        return Err(bad(&format!(
            "body inflates past {limit} bytes ({MAX_RATIO} times its {blen} compressed bytes)"
        )));
    }
    // Never trust the header's count for an allocation: a record takes at
    // least 8 bytes.
    let mut recs = Vec::with_capacity((header.keys.min(raw.len() as u64 / 8)) as usize);
    let mut p = 0usize;
    while p < raw.len() {
        if recs.len() as u64 >= header.keys {
            return Err(bad(&format!(
                "more records than the header says ({})",
                header.keys
            )));
        }
        let lens = raw.get(p..p + 8).ok_or_else(|| bad("record cut short"))?;
        let kl = u32::from_be_bytes(lens[..4].try_into().unwrap()) as usize;
        let vl = u32::from_be_bytes(lens[4..].try_into().unwrap()) as usize;
        let k = raw
            .get(p + 8..p + 8 + kl)
            .ok_or_else(|| bad("record cut short"))?;
        let v = raw
            .get(p + 8 + kl..p + 8 + kl + vl)
            .ok_or_else(|| bad("record cut short"))?;
        recs.push((k.to_vec(), v.to_vec()));
        p += 8 + kl + vl;
    }
    if recs.len() as u64 != header.keys {
        return Err(bad(&format!(
            "{} records, the header says {}",
            recs.len(),
            header.keys
        )));
    }
    Ok((header, recs))
}

/// Packs waiting in the local upload queue (or being uploaded).
fn pending_ids(queue: &Queue) -> BTreeSet<u64> {
    let s = queue.state.lock().unwrap();
    let mut ids: BTreeSet<u64> = s.pending.keys().copied().collect();
    ids.extend(s.uploading);
    ids
}

/// Catalog objects in the bucket: (sequence number, size in bytes), oldest first.
pub fn list(remote: &Remote) -> Result<Vec<(u64, u64)>> {
    let mut v: Vec<(u64, u64)> = remote
        .list_dir(DIR)?
        .into_iter()
        .filter_map(|(name, size)| Some((parse_name(&name)?, size)))
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// After catalog `seq` (with `header`) is confirmed in the bucket: delete the
/// pack objects it does not list that are older than it (`id < next_pack`:
/// GC deleted them or compaction replaced them; newer ones belong to later
/// checkpoints), except packs still waiting locally, and every catalog object
/// but the newest [`KEEP`].  Returns the pack objects deleted.
pub(crate) fn sweep(remote: &Remote, header: &Header, queue: &Queue) -> Result<u64> {
    let live: HashSet<u64> = header.packs.iter().copied().collect();
    let pending = pending_ids(queue);
    let mut n = 0;
    for (id, _) in remote.list_packs()? {
        if id < header.next_pack && !live.contains(&id) && !pending.contains(&id) {
            remote.delete_pack(id)?;
            n += 1;
        }
    }
    let cats = list(remote)?;
    if cats.len() > KEEP {
        for (seq, _) in &cats[..cats.len() - KEEP] {
            remote.delete(&object_name(*seq))?;
        }
    }
    Ok(n)
}

/// State shared with the catalog upload thread.
#[derive(Default)]
struct Slot {
    /// The newest checkpoint not yet uploaded (an older one it replaces is
    /// dropped: only the newest matters).
    next: Option<Checkpoint>,
    stop: bool,
    /// Sequence number of the newest catalog confirmed in the bucket.
    uploaded: Option<u64>,
    /// When it was taken (Unix seconds).
    uploaded_time: Option<u64>,
    /// The last upload error, for `status`.
    error: Option<String>,
}

/// Uploads checkpoints in the background (one thread per S3 backend).
pub struct Uploader {
    slot: Arc<(Mutex<Slot>, Condvar)>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What `status` shows of the catalog in the bucket.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CatalogStatus {
    /// Sequence number of the newest catalog uploaded by this process.
    pub uploaded_seq: Option<u64>,
    /// Age of its snapshot in seconds.
    pub uploaded_age_secs: Option<u64>,
    /// A checkpoint is waiting for its packs or for the object store.
    pub waiting: bool,
    /// The last upload error, if the last attempt failed.
    pub error: Option<String>,
}

impl Uploader {
    /// Start the thread.  Errors: the thread cannot be spawned.
    pub(crate) fn start(remote: Arc<Remote>, queue: Arc<Queue>) -> Result<Uploader> {
        let slot: Arc<(Mutex<Slot>, Condvar)> = Arc::default();
        let s = slot.clone();
        let h = std::thread::Builder::new()
            .name("s3-catalog".into())
            .spawn(move || run(s, remote, queue))
            .map_err(|e| Error::io("s3-catalog thread", e))?;
        Ok(Uploader {
            slot,
            thread: Mutex::new(Some(h)),
        })
    }

    /// Queue `cp` for upload (replacing a queued older one).
    pub fn submit(&self, cp: Checkpoint) {
        let (m, cv) = &*self.slot;
        m.lock().unwrap().next = Some(cp);
        cv.notify_all();
    }

    /// Wait until no checkpoint is queued or `timeout` passes; true if none is.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let (m, cv) = &*self.slot;
        let deadline = std::time::Instant::now() + timeout;
        let mut s = m.lock().unwrap();
        while s.next.is_some() {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            s = cv.wait_timeout(s, deadline - now).unwrap().0;
        }
        true
    }

    pub fn status(&self) -> CatalogStatus {
        let s = self.slot.0.lock().unwrap();
        CatalogStatus {
            uploaded_seq: s.uploaded,
            uploaded_age_secs: s.uploaded_time.map(|t| now_secs().saturating_sub(t)),
            waiting: s.next.is_some(),
            error: s.error.clone(),
        }
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        {
            let (m, cv) = &*self.slot;
            m.lock().unwrap().stop = true;
            cv.notify_all();
        }
        if let Some(h) = self.thread.lock().unwrap().take() {
            let _ = h.join();
        }
    }
}

/// What one attempt of the catalog thread did.
enum Step {
    /// Uploaded under this sequence number (and swept).
    Uploaded(u64),
    /// Some of its packs are still waiting for upload.
    Waiting,
    /// It names a pack that will never be in the bucket: why.
    Stale(String),
}

/// The thread: take the newest queued checkpoint, wait until every pack it
/// lists as sealed has left the local queue and is in the bucket, PUT it
/// under the next sequence number, sweep.  Failures retry with backoff
/// (1 s doubling to 60 s); a stop leaves the checkpoint behind (the next open
/// takes a new one).
fn run(slot: Arc<(Mutex<Slot>, Condvar)>, remote: Arc<Remote>, queue: Arc<Queue>) {
    let (m, cv) = &*slot;
    let mut seq: Option<u64> = None;
    let mut backoff = Duration::from_secs(1);
    loop {
        let (header, object) = {
            let mut s = m.lock().unwrap();
            loop {
                if s.stop {
                    return;
                }
                if let Some(cp) = &s.next {
                    break (cp.header.clone(), cp.object.clone());
                }
                s = cv.wait(s).unwrap();
            }
        };
        let attempt = (|| -> Result<Step> {
            let pending = pending_ids(&queue);
            if header.sealed.iter().any(|id| pending.contains(id)) {
                return Ok(Step::Waiting); // its packs are not all up yet
            }
            // Out of the queue is not enough: a GC may have deleted a pack
            // before its upload (it left the queue, never to be uploaded).
            // Only a catalog whose every sealed pack is in the bucket goes up.
            let there: HashSet<u64> = remote.list_packs()?.into_iter().map(|(id, _)| id).collect();
            if let Some(id) = header.sealed.iter().find(|id| !there.contains(id)) {
                return Ok(Step::Stale(format!(
                    "the checkpoint ({}) names pack {id}, which is neither waiting for \
                     upload nor in the bucket (deleted before its upload); it waits for \
                     a newer checkpoint",
                    header.reason
                )));
            }
            let next = match seq {
                Some(s) => s + 1,
                None => list(&remote)?.last().map_or(1, |(s, _)| s + 1),
            };
            remote.check_owner()?;
            remote.put(&object_name(next), object.clone())?;
            let deleted = sweep(&remote, &header, &queue)?;
            log::info!(
                "{}: catalog {next} uploaded ({} keys, {} bytes, {}); {deleted} pack object(s) no longer referenced deleted",
                remote.target(),
                header.keys,
                object.len(),
                header.reason
            );
            Ok(Step::Uploaded(next))
        })();
        let mut s = m.lock().unwrap();
        match attempt {
            Ok(Step::Uploaded(n)) => {
                seq = Some(n);
                s.uploaded = Some(n);
                s.uploaded_time = Some(header.time);
                s.error = None;
                backoff = Duration::from_secs(1);
                // Done unless a newer checkpoint replaced it meanwhile.
                if s.next
                    .as_ref()
                    .is_some_and(|c| c.header.time == header.time && c.object == object)
                {
                    s.next = None;
                }
                cv.notify_all();
                continue;
            }
            Ok(Step::Waiting) => {
                let _ = cv.wait_timeout(s, Duration::from_millis(200)).unwrap();
            }
            Ok(Step::Stale(why)) => {
                // Not an object store failure: a newer checkpoint (the GC's,
                // or the interval's: the deletion changed the metadata)
                // replaces it and wakes this thread.
                log::info!("{}: {why}", remote.target());
                s.error = Some(why);
                let _ = cv.wait_timeout(s, backoff).unwrap();
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
            Err(e) => {
                log::warn!(
                    "{}: uploading the catalog failed (retry in {} s): {e}",
                    remote.target(),
                    backoff.as_secs()
                );
                s.error = Some(e.to_string());
                let _ = cv.wait_timeout(s, backoff).unwrap();
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    // ---- hostile review: decode never panics or inflates without bound --------

    use super::*;

    /// A catalog object around `header` and the compressed `body`, with a valid
    /// checksum (as anyone who can write to the bucket can make).
    fn object(header: &Header, body: &[u8]) -> Vec<u8> {
        let h = serde_json::to_vec(header).unwrap();
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(h.len() as u32).to_be_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&(body.len() as u64).to_be_bytes());
        out.extend_from_slice(body);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// `obj` with its checksum recomputed after an edit.
    fn reseal(mut obj: Vec<u8>) -> Vec<u8> {
        let n = obj.len() - 32;
        let sum = blake3::hash(&obj[..n]);
        obj[n..].copy_from_slice(sum.as_bytes());
        obj
    }

    fn header(keys: u64) -> Header {
        Header {
            version: 1,
            config: serde_json::json!({}),
            time: 0,
            reason: "test".into(),
            next_pack: 1,
            sealed: vec![],
            packs: vec![],
            keys,
        }
    }

    fn records(recs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut raw = Vec::new();
        for (k, v) in recs {
            raw.extend_from_slice(&(k.len() as u32).to_be_bytes());
            raw.extend_from_slice(&(v.len() as u32).to_be_bytes());
            raw.extend_from_slice(k);
            raw.extend_from_slice(v);
        }
        zstd::encode_all(&raw[..], 3).unwrap()
    }

    #[test]
    fn a_well_formed_catalog_decodes() {
        let body = records(&[(b"Gdb", b"{}"), (b"Vdb/d", b"x")]);
        let (h, recs) = decode("t", &object(&header(2), &body)).unwrap();
        assert_eq!(h.keys, 2);
        assert_eq!(recs[1], (b"Vdb/d".to_vec(), b"x".to_vec()));
    }

    /// Before the fix: `Vec::with_capacity(header.keys)` panicked ("capacity
    /// overflow") on a header claiming 2^64-1 keys, so a rebuild aborted
    /// instead of skipping to an older catalog.
    #[test]
    fn a_header_claiming_more_keys_than_the_body_holds_is_refused() {
        let body = records(&[(b"Gdb", b"{}")]);
        for keys in [u64::MAX, 1 << 40, 2] {
            let e = decode("t", &object(&header(keys), &body)).unwrap_err();
            assert!(e.to_string().contains("the header says"), "{e}");
        }
    }

    #[test]
    fn truncated_damaged_and_hostile_objects_are_refused() {
        let good = object(&header(1), &records(&[(b"Gdb", b"{}")]));
        // Every truncation, and a flipped byte anywhere.
        for n in 0..good.len() {
            assert!(decode("t", &good[..n]).is_err(), "truncated at {n}");
        }
        for i in 0..good.len() {
            let mut d = good.clone();
            d[i] ^= 0x40;
            assert!(decode("t", &d).is_err(), "byte {i} flipped");
        }
        // Lengths pointing past the end (checksum valid): header, body, record.
        let mut h = object(&header(1), &records(&[(b"Gdb", b"{}")]));
        h[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode("t", &reseal(h)).is_err());
        let hj = serde_json::to_vec(&header(1)).unwrap();
        let mut b = object(&header(1), &records(&[(b"Gdb", b"{}")]));
        let at = 12 + hj.len();
        b[at..at + 8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(decode("t", &reseal(b)).is_err());
        let mut raw = Vec::new();
        raw.extend_from_slice(&u32::MAX.to_be_bytes());
        raw.extend_from_slice(&u32::MAX.to_be_bytes());
        raw.extend_from_slice(b"G");
        let body = zstd::encode_all(&raw[..], 3).unwrap();
        let e = decode("t", &object(&header(1), &body)).unwrap_err();
        assert!(e.to_string().contains("cut short"), "{e}");
    }

    /// Before the fix: `zstd::decode_all` inflated the whole body, so a few KiB
    /// of zstd (256 MiB of zeros here) took as much memory as they expand to.
    #[test]
    fn a_body_that_inflates_past_its_bound_is_refused() {
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..256 {
            enc.write_all(&zeros).unwrap();
        }
        let body = enc.finish().unwrap();
        assert!(body.len() < 64 << 10, "{}", body.len());
        let e = decode("t", &object(&header(1), &body)).unwrap_err();
        assert!(e.to_string().contains("inflates"), "{e}");
    }
}
