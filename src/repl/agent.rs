//! The replication agent (`drclone replicate`), run on the protected host.
//!
//! A cycle reads every source at the target's chunk size, hashes each block
//! (BLAKE3: the target's chunk id for an unencrypted store), and compares with
//! the manifest the last committed cycle left in the state directory: only
//! changed blocks go further.  Their ids are offered to the target in batches
//! (HAVE); only the chunks it lacks are sent, zstd-compressed (CHUNKS); then
//! the changed blocks' map entries (MAP), and one COMMIT for all volumes, which
//! the target turns into one recovery point of the group.  A lost or stale
//! manifest (another target, or a point the manifest did not make) only costs
//! the HAVE round for every block: data the target holds is never resent, so a
//! cycle cut off part-way (agent killed, target restarted) resumes without
//! resending what arrived.  The manifest is replaced only after COMMITTED.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::engine::keys::ChunkId;
use crate::error::{Error, IoContext, Result};
use crate::repl::link::{ClientTls, Link};
use crate::repl::wire::{self, Entry};

/// Bytes of changed blocks offered per HAVE round (at least one block).
const BATCH_BYTES: u64 = 8 << 20;
/// Batches read and hashed ahead of the one being sent.
const READ_AHEAD: usize = 2;
/// Batches offered (HAVE) ahead of the one whose chunks are being sent.
const AHEAD: usize = 2;
/// A CHUNKS frame ends once its body reaches this many bytes.
const FRAME_BYTES: usize = 16 << 20;
/// MAP entries per frame.
const MAP_ENTRIES: usize = 100_000;

/// One `--volume GROUP/DISK=SOURCE`.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    pub group: String,
    pub disk: String,
    /// A file or block device, or an NBD URI (`nbd://`, `nbd+unix://`).
    pub source: PathBuf,
}

impl VolumeSpec {
    fn nbd_uri(&self) -> Option<String> {
        let s = self.source.to_str()?;
        (s.starts_with("nbd://") || s.starts_with("nbd+unix://")).then(|| s.to_string())
    }
}

/// An open source.
enum Source {
    File(std::fs::File),
    Nbd(crate::nbd::client::Client),
}

/// Which blocks a cycle reads, and what the others are.
struct Plan {
    /// Block ranges to read: (first, count).
    ranges: Vec<(u64, u64)>,
    /// Blocks outside `ranges` are unchanged since the manifest (a dirty-bitmap
    /// cycle) rather than holes.
    others_unchanged: bool,
}

/// Byte extents to whole blocks of `cs` bytes, merged, within `blocks`.
fn extent_blocks(ext: &[crate::nbd::client::Extent], cs: u64, blocks: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in ext {
        let first = e.offset / cs;
        let end = e.end().div_ceil(cs).min(blocks);
        if end <= first {
            continue;
        }
        match out.last_mut() {
            Some((f, n)) if *f + *n >= first => *n = (*n).max(end - *f),
            _ => out.push((first, end - first)),
        }
    }
    out
}

/// What a cycle needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// `HOST:PORT` of the receiver.
    pub target: String,
    pub volumes: Vec<VolumeSpec>,
    /// Where manifests live (`~/.local/state/drclone` by default).
    pub state_dir: PathBuf,
    pub token: Option<String>,
    pub label: Option<String>,
    /// Bytes per second on the wire, if limited.
    pub bwlimit: Option<u64>,
    pub pre_snapshot: Option<String>,
    pub post_snapshot: Option<String>,
    /// Show a progress bar (a terminal, not --json).
    pub progress: bool,
    /// For NBD sources: read only the blocks qemu's dirty bitmap NAME marks
    /// (`qemu:dirty-bitmap:NAME`), once a manifest exists.
    pub dirty_bitmap: Option<String>,
    /// Replicate even though the group's role changed since the last cycle
    /// (after a failover was undone): forget the manifest's fencing epoch.
    pub reprotect: bool,
    /// Speak TLS, trusting these CA certificates (`--tls-ca`).
    pub tls: Option<ClientTls>,
}

/// One cycle's report (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct CycleReport {
    pub point: u64,
    pub group: String,
    /// Bytes the agent wrote to the connection (protocol included).
    pub bytes_sent: u64,
    /// Bytes of source blocks that changed since the manifest (all, without one).
    pub bytes_logical: u64,
    pub chunks_sent: u64,
    pub duration_ms: u64,
    /// The point is app-consistent (both hooks succeeded).
    pub app: bool,
}

/// The manifest of the last committed cycle of a group on one target.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    store: String,
    point: u64,
    chunk_size: u64,
    /// The group's fencing epoch when this manifest's cycle committed.
    #[serde(default)]
    epoch: Option<u64>,
    /// Disk -> (head lineage, head epoch) right after that commit.
    #[serde(default)]
    heads: std::collections::BTreeMap<String, (u64, u64)>,
    /// Disk -> its hash file (32 bytes per block; zeros for a zero block).
    disks: std::collections::BTreeMap<String, String>,
}

/// The fencing epoch the last cycle into `group` on this target saw.
fn last_epoch(dir: &Path, group: &str) -> Option<u64> {
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(manifest_path(dir, group)).ok()?).ok()?;
    m.epoch
}

fn manifest_path(dir: &Path, group: &str) -> PathBuf {
    dir.join(format!("{group}.manifest.json"))
}

/// Load the hashes of `disk` if the manifest was made by the target's latest
/// point; None otherwise (a full comparison follows).
fn load_hashes(dir: &Path, group: &str, disk: &str, w: &wire::Welcome) -> Option<Vec<ChunkId>> {
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(manifest_path(dir, group)).ok()?).ok()?;
    // The head must be the one the manifest's commit left, untouched since
    // (found by tests/breakit_dr.rs: a volume removed and recreated, or written
    // over NBD, got only the source's changes).
    let same_head = w
        .heads
        .iter()
        .find(|h| h.0 == disk)
        .is_some_and(|h| h.3 && m.heads.get(disk) == Some(&(h.1, h.2)));
    if Some(m.point) != w.latest_point
        || m.store != w.store
        || m.chunk_size != w.chunk_size
        || !same_head
    {
        log::info!(
            "manifest of {group}/{disk} does not describe the target's head; comparing every block"
        );
        return None;
    }
    let body = std::fs::read(dir.join(m.disks.get(disk)?)).ok()?;
    if body.len() % 32 != 0 {
        return None;
    }
    Some(
        body.chunks_exact(32)
            .map(|c| c.try_into().unwrap())
            .collect(),
    )
}

/// Write a file atomically (temp, fsync, rename, fsync the directory).
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).at(&tmp)?;
    f.write_all(data).at(&tmp)?;
    f.sync_all().at(&tmp)?;
    std::fs::rename(&tmp, path).at(path)?;
    if let Some(d) = path.parent() {
        std::fs::File::open(d).and_then(|d| d.sync_all()).at(d)?;
    }
    Ok(())
}

fn run_hook(what: &str, cmd: &str) -> Result<()> {
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .map_err(|e| Error::io(format!("{what} hook {cmd:?}"), e))?;
    if !st.success() {
        return Err(Error::invalid(format!("{what} hook {cmd:?} failed ({st})")));
    }
    Ok(())
}

fn host() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Run one cycle.  Errors: the target's refusals (wrong token, failed-over
/// group, a volume in use) by name; I/O on sources or the connection; a hook
/// that failed before capture (no cycle then).
pub fn cycle(opts: &Options) -> Result<CycleReport> {
    let t0 = Instant::now();
    let group = match opts.volumes.first() {
        Some(v) => v.group.clone(),
        None => return Err(Error::invalid("replicate needs at least one --volume")),
    };
    if let Some(v) = opts.volumes.iter().find(|v| v.group != group) {
        return Err(Error::invalid(format!(
            "every --volume of one run must be in one group (one point): {}/{} is not in {group}",
            v.group, v.disk
        )));
    }
    std::fs::create_dir_all(&opts.state_dir).at(&opts.state_dir)?;
    let mut sources = Vec::new();
    for v in &opts.volumes {
        let (src, size) = match v.nbd_uri() {
            Some(uri) => {
                let bitmap = opts
                    .dirty_bitmap
                    .as_ref()
                    .map(|b| format!("qemu:dirty-bitmap:{b}"));
                let mut ctx = vec!["base:allocation"];
                if let Some(b) = &bitmap {
                    ctx.push(b);
                }
                let c = crate::nbd::client::Client::connect(&uri, &ctx)?;
                let size = c.size();
                (Source::Nbd(c), size)
            }
            None => {
                if opts.dirty_bitmap.is_some() {
                    return Err(Error::invalid(format!(
                        "--dirty-bitmap needs NBD sources; {} is a file",
                        v.source.display()
                    )));
                }
                let mut f = std::fs::File::open(&v.source).at(&v.source)?;
                let md = f.metadata().at(&v.source)?;
                if md.is_dir() {
                    return Err(Error::invalid(format!(
                        "source {} is a directory, not a file or block device",
                        v.source.display()
                    )));
                }
                let size = f.seek(SeekFrom::End(0)).at(&v.source)?;
                f.seek(SeekFrom::Start(0)).at(&v.source)?;
                (Source::File(f), size)
            }
        };
        // Volumes are whole 512-byte sectors.
        sources.push((v, src, size.div_ceil(512).max(1) * 512));
    }
    let mut link = Link::open(&opts.target, opts.tls.as_ref(), opts.bwlimit)?;
    let hello = wire::Hello {
        token: opts.token.clone(),
        group: group.clone(),
        volumes: sources
            .iter()
            .map(|(v, _, size)| (v.disk.clone(), *size))
            .collect(),
        source: format!("agent:{}", host()),
        epoch: if opts.reprotect {
            None
        } else {
            last_epoch(&opts.state_dir, &group)
        },
    };
    link.send(wire::HELLO, &serde_json::to_vec(&hello).expect("json"))?;
    let welcome: wire::Welcome = wire::json("WELCOME", &link.expect(wire::WELCOME)?)?;
    let cs = welcome.chunk_size;
    let app = match &opts.pre_snapshot {
        Some(c) => {
            run_hook("pre-snapshot", c)?;
            true
        }
        None => false,
    };
    let total: u64 = sources.iter().map(|s| s.2).sum();
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap(),
        );
        b.set_message(format!("replicating {group}"));
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut logical = 0u64;
    let mut chunks_sent = 0u64;
    let mut new_manifest = Manifest {
        store: welcome.store.clone(),
        point: 0,
        chunk_size: cs,
        epoch: Some(welcome.epoch),
        heads: Default::default(),
        disks: Default::default(),
    };
    let mut hash_files = Vec::new();
    for (v, src, size) in sources.iter_mut() {
        let old = load_hashes(&opts.state_dir, &group, &v.disk, &welcome);
        let blocks = size.div_ceil(cs);
        let plan = match src {
            Source::File(_) => Plan {
                ranges: vec![(0, blocks)],
                others_unchanged: false,
            },
            Source::Nbd(c) => match (&opts.dirty_bitmap, &old) {
                // Only what qemu marked dirty since the last cycle.
                (Some(b), Some(_)) => Plan {
                    ranges: extent_blocks(&c.dirty_extents(b)?, cs, blocks),
                    others_unchanged: true,
                },
                // A seed (or a lost manifest): every allocated block.
                _ => Plan {
                    ranges: extent_blocks(&c.allocated_extents()?, cs, blocks),
                    others_unchanged: false,
                },
            },
        };
        let (hashes, l, c) = send_volume(
            &mut link,
            VolumeRead {
                disk: &v.disk,
                src,
                size: *size,
                cs,
                old: old.as_deref(),
                plan: &plan,
                bar: &bar,
            },
        )?;
        logical += l;
        chunks_sent += c;
        let name = format!("{group}.{}.hashes", v.disk);
        new_manifest.disks.insert(v.disk.clone(), name.clone());
        hash_files.push((name, hashes));
    }
    bar.finish_and_clear();
    let app = app
        && match &opts.post_snapshot {
            Some(c) => match run_hook("post-snapshot", c) {
                Ok(()) => true,
                Err(e) => {
                    log::warn!("{e}; the point is crash-consistent, not app-consistent");
                    false
                }
            },
            None => true,
        };
    let commit = wire::Commit {
        label: opts.label.clone(),
        app,
        source_point: None,
        time: None,
    };
    link.send(wire::COMMIT, &serde_json::to_vec(&commit).expect("json"))?;
    let done: wire::Committed = wire::json("COMMITTED", &link.expect(wire::COMMITTED)?)?;
    // Only now does the manifest move on.
    for (name, hashes) in &hash_files {
        write_atomic(&opts.state_dir.join(name), &hashes.concat())?;
    }
    new_manifest.point = done.point;
    new_manifest.heads = done
        .heads
        .iter()
        .map(|(d, l, e)| (d.clone(), (*l, *e)))
        .collect();
    write_atomic(
        &manifest_path(&opts.state_dir, &group),
        &serde_json::to_vec_pretty(&new_manifest).expect("json"),
    )?;
    Ok(CycleReport {
        point: done.point,
        group,
        bytes_sent: link.sent(),
        bytes_logical: logical,
        chunks_sent,
        duration_ms: t0.elapsed().as_millis() as u64,
        app,
    })
}

/// Send one volume's changes; returns (its block hashes, changed bytes, chunks
/// sent).
///
/// Two threads: a reader reads the source in runs of up to [`BATCH_BYTES`],
/// hashes the blocks in parallel and keeps the changed ones in batches (at
/// most [`READ_AHEAD`] waiting); this thread offers each batch (HAVE) and
/// sends what the target lacks (CHUNKS, compressed in parallel), see
/// [`send_batches`].  Reading and hashing overlap the network and the
/// target's work.
fn send_volume(link: &mut Link, vol: VolumeRead<'_>) -> Result<(Vec<ChunkId>, u64, u64)> {
    let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD);
    // The sender hands each batch's buffer back for reuse: fresh 8 MiB
    // buffers cost page faults and zeroing (perf).
    let (spent, reuse) = std::sync::mpsc::channel();
    let disk = vol.disk;
    let idle = std::sync::atomic::AtomicBool::new(false);
    let idle = &idle;
    std::thread::scope(|scope| {
        let reader = std::thread::Builder::new()
            .name("repl-reader".into())
            .spawn_scoped(scope, move || read_volume(vol, tx, reuse, idle))
            .map_err(|e| Error::io("spawning the replication reader", e))?;
        // On an error here `rx` goes, so the reader stops at its next batch.
        let sent = send_batches(link, disk, rx, spent, idle);
        let read = reader.join().expect("the replication reader panicked");
        // The reader's error first: the sender only saw its channel close.
        let (hashes, logical) = read?;
        Ok((hashes, logical, sent?))
    })
}

/// What a cycle reads of one volume.
struct VolumeRead<'a> {
    disk: &'a str,
    src: &'a mut Source,
    /// Bytes.
    size: u64,
    /// The target's chunk size, bytes.
    cs: u64,
    /// The manifest's block hashes, if trusted.
    old: Option<&'a [ChunkId]>,
    plan: &'a Plan,
    bar: &'a indicatif::ProgressBar,
}

/// Changed blocks of a volume, read and hashed, in block order.
struct Batch {
    /// (block, chunk id) per changed block with data; its bytes are at the
    /// same index (× `cs`) of `data`.
    blocks: Vec<(u64, ChunkId)>,
    /// Room for a whole batch (reused: see `send_volume`); what is past the
    /// blocks is stale.
    data: Vec<u8>,
    /// The chunk size, bytes.
    cs: usize,
    /// Changed blocks that read as zeros.
    zeros: Vec<Entry>,
}

/// Runs of changed zero blocks, merged.
struct ZeroRuns {
    run: Option<(u64, u64)>,
}

impl ZeroRuns {
    fn add(&mut self, b: u64, out: &mut Vec<Entry>) {
        self.run = match self.run {
            Some((first, n)) if first + n == b => Some((first, n + 1)),
            Some((first, count)) => {
                out.push(Entry::Zeros { first, count });
                Some((b, 1))
            }
            None => Some((b, 1)),
        };
    }
}

/// The reader thread of [`send_volume`]: every block of the plan read, hashed
/// (all-zero blocks get the zero id) and compared with `old`; changed blocks
/// go to `tx` in batches of about [`BATCH_BYTES`], or fewer while the sender
/// is `idle`.  Returns (every block's
/// hash, changed bytes).  Errors: reading the source.  A closed channel (the
/// sender failed) ends it quietly.
fn read_volume(
    vol: VolumeRead<'_>,
    tx: std::sync::mpsc::SyncSender<Batch>,
    reuse: std::sync::mpsc::Receiver<Vec<u8>>,
    idle: &std::sync::atomic::AtomicBool,
) -> Result<(Vec<ChunkId>, u64)> {
    use rayon::prelude::*;
    let VolumeRead {
        disk,
        src,
        size,
        cs,
        old,
        plan,
        bar,
    } = vol;
    use std::os::unix::fs::FileExt;
    const ZERO: ChunkId = [0u8; 32];
    let blocks = size.div_ceil(cs);
    let per = (BATCH_BYTES / cs).max(1) as usize;
    let csz = cs as usize;
    let mut hashes = vec![ZERO; blocks as usize];
    let mut logical = 0u64;
    let unchanged = |b: u64, h: &ChunkId| old.and_then(|o| o.get(b as usize)) == Some(h);
    let new_batch = || Batch {
        blocks: Vec::with_capacity(per),
        data: reuse.try_recv().unwrap_or_else(|_| vec![0u8; per * csz]),
        cs: csz,
        zeros: Vec::new(),
    };
    let mut cur = new_batch();
    let mut zeros = ZeroRuns { run: None };
    // A batch the sender no longer wants (it failed): stop reading.
    macro_rules! ship {
        () => {
            if tx.send(std::mem::replace(&mut cur, new_batch())).is_err() {
                return Ok((hashes, logical));
            }
        };
    }
    let mut next = 0u64;
    let mut ranges = plan.ranges.iter().copied().chain([(blocks, 0)]);
    while next < blocks {
        let (first, n) = ranges.next().unwrap_or((blocks, 0));
        let first = first.clamp(next, blocks);
        let end = (first + n).min(blocks);
        // Blocks before the range are not read: unchanged (a dirty-bitmap
        // cycle) or holes (zeros).
        for b in next..first {
            if plan.others_unchanged {
                if let Some(h) = old.and_then(|o| o.get(b as usize)) {
                    hashes[b as usize] = *h;
                }
                continue;
            }
            bar.inc(cs.min(size - b * cs));
            if !unchanged(b, &ZERO) {
                logical += cs;
                zeros.add(b, &mut cur.zeros);
            }
        }
        let mut pos = first;
        while pos < end {
            let take = ((per - cur.blocks.len()) as u64).min(end - pos);
            let at = cur.blocks.len() * csz;
            let buf = &mut cur.data[at..at + take as usize * csz];
            let want = (take * cs).min(size - pos * cs) as usize;
            let got = match src {
                Source::File(f) => {
                    let mut got = 0;
                    while got < want {
                        match f.read_at(&mut buf[got..want], pos * cs + got as u64) {
                            Ok(0) => break,
                            Ok(k) => got += k,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(Error::io(disk, e)),
                        }
                    }
                    got
                }
                Source::Nbd(c) => {
                    let want = (want as u64).min(c.size().saturating_sub(pos * cs)) as usize;
                    c.read_into(pos * cs, &mut buf[..want])?;
                    want
                }
            };
            // The last block of a source not a multiple of the chunk size is
            // padded with zeros (the buffer holds an earlier batch's bytes).
            buf[got..].fill(0);
            let ids: Vec<Option<ChunkId>> = buf
                .par_chunks(csz)
                .map(|d| (!d.iter().all(|&x| x == 0)).then(|| *blake3::hash(d).as_bytes()))
                .collect();
            // Keep the changed blocks' bytes, in order, at the batch's end.
            let mut keep = at;
            for (i, id) in ids.into_iter().enumerate() {
                let b = pos + i as u64;
                bar.inc(cs.min(size - b * cs));
                let Some(id) = id else {
                    if !unchanged(b, &ZERO) {
                        logical += cs;
                        zeros.add(b, &mut cur.zeros);
                    }
                    continue;
                };
                hashes[b as usize] = id;
                if unchanged(b, &id) {
                    continue;
                }
                logical += cs;
                let from = at + i * csz;
                if from != keep {
                    cur.data.copy_within(from..from + csz, keep);
                }
                keep += csz;
                cur.blocks.push((b, id));
            }
            debug_assert_eq!(keep, cur.blocks.len() * csz);
            // A full batch goes; so does a partial one while the sender
            // has nothing to do (a small cycle, a sparse change): its
            // round trips then overlap the reading of the rest.
            if cur.blocks.len() >= per
                || (!cur.blocks.is_empty() && idle.load(std::sync::atomic::Ordering::Acquire))
            {
                ship!();
            }
            pos += take;
        }
        next = end.max(next);
        if n == 0 && first >= blocks {
            break;
        }
    }
    if let Some((first, count)) = zeros.run.take() {
        cur.zeros.push(Entry::Zeros { first, count });
    }
    if !cur.blocks.is_empty() || !cur.zeros.is_empty() {
        ship!();
    }
    Ok((hashes, logical))
}

/// The sending side of [`send_volume`]: per batch, offer its distinct ids
/// (HAVE), send the chunks the target lacks (CHUNKS frames of about 16 MiB)
/// and queue its map entries (MAP).  Pipelined: HAVE runs [`AHEAD`] batches
/// ahead, and a CHUNKS frame goes without waiting for the previous one's
/// STORED, so the target stores one frame while the next is packed and on
/// its way.  Replies come in the order the frames went and are read in that
/// order.  An id that a batch still unsent has offered is not offered again
/// (that batch sends it, or the target holds it), so no chunk goes twice.
/// `idle` is set while it waits for the reader with nothing else to do.
/// Returns chunks sent.
fn send_batches(
    link: &mut Link,
    disk: &str,
    rx: std::sync::mpsc::Receiver<Batch>,
    spent: std::sync::mpsc::Sender<Vec<u8>>,
    idle: &std::sync::atomic::AtomicBool,
) -> Result<u64> {
    use rayon::prelude::*;
    let mut offered: std::collections::VecDeque<(Batch, Vec<ChunkId>)> = Default::default();
    let mut entries: Vec<Entry> = Vec::new();
    let mut body: Vec<u8> = Vec::with_capacity(FRAME_BYTES + (4 << 20) + 64);
    let mut sent = 0u64;
    let mut more = true;
    loop {
        while more && offered.len() < AHEAD {
            use std::sync::mpsc::TryRecvError;
            let got = match rx.try_recv() {
                // A batch to work on: offer the next one later.
                Err(TryRecvError::Empty) if !offered.is_empty() => break,
                Err(TryRecvError::Empty) => {
                    // Nothing to do until the reader ships: say so.
                    idle.store(true, std::sync::atomic::Ordering::Release);
                    let r = rx.recv().ok();
                    idle.store(false, std::sync::atomic::Ordering::Release);
                    r
                }
                r => r.ok(),
            };
            let Some(batch) = got else {
                more = false;
                break;
            };
            let mut ids: Vec<ChunkId> = batch.blocks.iter().map(|(_, id)| *id).collect();
            ids.sort_unstable();
            ids.dedup();
            ids.retain(|id| !offered.iter().any(|(_, o)| o.binary_search(id).is_ok()));
            if !ids.is_empty() {
                link.offer(&ids)?;
            }
            offered.push_back((batch, ids));
        }
        let Some((batch, ids)) = offered.pop_front() else {
            break;
        };
        entries.extend_from_slice(&batch.zeros);
        if !ids.is_empty() {
            let lack = link.next_lack()?;
            let mut want: std::collections::HashSet<ChunkId> = ids
                .iter()
                .zip(&lack)
                .filter(|(_, l)| **l)
                .map(|(id, _)| *id)
                .collect();
            let cs = batch.cs;
            let todo: Vec<(&ChunkId, &[u8])> = batch
                .blocks
                .iter()
                .enumerate()
                .filter(|(_, (_, id))| want.remove(id))
                .map(|(i, (_, id))| (id, &batch.data[i * cs..(i + 1) * cs]))
                .collect();
            let packed: Vec<Option<Vec<u8>>> =
                todo.par_iter().map(|(_, d)| wire::compress(d)).collect();
            let mut n = 0u32;
            body.clear();
            for ((id, d), z) in todo.iter().zip(&packed) {
                wire::push_chunk(&mut body, id, d, z.as_deref());
                n += 1;
                if body.len() >= FRAME_BYTES {
                    link.send_chunks(&body, n)?;
                    body.clear();
                    n = 0;
                }
            }
            if n > 0 {
                link.send_chunks(&body, n)?;
            }
            sent += todo.len() as u64;
        }
        // Every id of the batch is held or sent by now (frames are handled
        // in order), so its entries may go.
        entries.extend(
            batch
                .blocks
                .iter()
                .map(|&(block, id)| Entry::Data { block, id }),
        );
        // The reader may be gone (it ships its last batch and returns).
        let _ = spent.send(batch.data);
        if entries.len() >= MAP_ENTRIES {
            link.send(wire::MAP, &wire::encode_map(disk, &entries))?;
            entries.clear();
        }
    }
    link.settle()?;
    for part in entries.chunks(MAP_ENTRIES) {
        link.send(wire::MAP, &wire::encode_map(disk, part))?;
    }
    Ok(sent)
}

/// Cycles every `interval` until `stop` says so; a failed cycle is retried
/// with backoff (1 s doubling, at most the interval).  `report` gets each
/// cycle's outcome.
pub fn run_every(
    opts: &Options,
    interval: Duration,
    stop: &dyn Fn() -> bool,
    report: &mut dyn FnMut(&Result<CycleReport>),
) {
    let mut backoff = Duration::from_secs(1);
    while !stop() {
        let t = Instant::now();
        let r = cycle(opts);
        let wait = match &r {
            Ok(_) => {
                backoff = Duration::from_secs(1);
                interval.saturating_sub(t.elapsed())
            }
            Err(e) => {
                log::warn!("replication cycle failed: {e}; retrying in {backoff:?}");
                let w = backoff;
                backoff = (backoff * 2).min(interval.max(Duration::from_secs(1)));
                w
            }
        };
        report(&r);
        let until = Instant::now() + wait;
        while Instant::now() < until && !stop() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
