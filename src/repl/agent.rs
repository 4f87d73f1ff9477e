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

use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::engine::keys::ChunkId;
use crate::error::{Error, IoContext, Result};
use crate::repl::link::{send_lacking, ClientTls, Link};
use crate::repl::wire::{self, Entry};

/// Blocks offered per HAVE round (at 64 KiB chunks: 8 MiB).
const BATCH_BLOCKS: usize = 128;
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
            &v.disk,
            src,
            *size,
            cs,
            old.as_deref(),
            &plan,
            &bar,
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
#[allow(clippy::too_many_arguments)]
fn send_volume(
    link: &mut Link,
    disk: &str,
    src: &mut Source,
    size: u64,
    cs: u64,
    old: Option<&[ChunkId]>,
    plan: &Plan,
    bar: &indicatif::ProgressBar,
) -> Result<(Vec<ChunkId>, u64, u64)> {
    let blocks = size.div_ceil(cs);
    let mut hashes = vec![[0u8; 32]; blocks as usize];
    let (mut file, mut nbd) = match src {
        Source::File(f) => (Some(BufReader::with_capacity(4 << 20, &mut *f)), None),
        Source::Nbd(c) => (None, Some(c)),
    };
    let mut entries: Vec<Entry> = Vec::new();
    let mut batch: Vec<(u64, ChunkId, Vec<u8>)> = Vec::new();
    let mut zero_run: Option<(u64, u64)> = None;
    let (mut logical, mut sent) = (0u64, 0u64);
    let unchanged = |b: u64, h: &ChunkId| old.and_then(|o| o.get(b as usize)) == Some(h);
    let mut ranges = plan.ranges.iter().copied().peekable();
    // NBD reads go in runs of up to 4 MiB.
    let mut run: (u64, Vec<u8>) = (0, Vec::new());
    for b in 0..blocks {
        while ranges.peek().is_some_and(|(f, n)| f + n <= b) {
            ranges.next();
        }
        let in_plan = ranges.peek().is_some_and(|(f, _)| *f <= b);
        let mut data = vec![0u8; cs as usize];
        if !in_plan {
            if plan.others_unchanged {
                if let Some(h) = old.and_then(|o| o.get(b as usize)) {
                    hashes[b as usize] = *h;
                }
                continue;
            }
            // A hole of the source: reads as zeros.
        } else if let Some(r) = file.as_mut() {
            // The last block of a source not a multiple of the chunk size is padded.
            let mut got = 0;
            while got < data.len() {
                let n = r.read(&mut data[got..]).map_err(|e| Error::io(disk, e))?;
                if n == 0 {
                    break;
                }
                got += n;
            }
        } else if let Some(c) = nbd.as_mut() {
            let off = b * cs;
            if !(run.0 <= off && off < run.0 + run.1.len() as u64) {
                let (f, n) = ranges.peek().copied().unwrap();
                let end = ((f + n) * cs).min(size).min(off + (4 << 20));
                run = (off, c.read(off, (end - off) as usize)?);
            }
            let at = (off - run.0) as usize;
            let take = (run.1.len() - at).min(cs as usize);
            data[..take].copy_from_slice(&run.1[at..at + take]);
        }
        bar.inc(cs.min(size - b * cs));
        if data.iter().all(|&x| x == 0) {
            if !unchanged(b, &[0u8; 32]) {
                logical += cs;
                zero_run = match zero_run {
                    Some((first, n)) if first + n == b => Some((first, n + 1)),
                    Some((first, n)) => {
                        entries.push(Entry::Zeros { first, count: n });
                        Some((b, 1))
                    }
                    None => Some((b, 1)),
                };
            }
            continue;
        }
        let id = *blake3::hash(&data).as_bytes();
        hashes[b as usize] = id;
        if unchanged(b, &id) {
            continue;
        }
        logical += cs;
        batch.push((b, id, data));
        if batch.len() >= BATCH_BLOCKS {
            sent += offer(link, &mut batch, &mut entries)?;
        }
        if entries.len() >= MAP_ENTRIES {
            link.send(wire::MAP, &wire::encode_map(disk, &entries))?;
            entries.clear();
        }
    }
    sent += offer(link, &mut batch, &mut entries)?;
    if let Some((first, count)) = zero_run {
        entries.push(Entry::Zeros { first, count });
    }
    for part in entries.chunks(MAP_ENTRIES) {
        link.send(wire::MAP, &wire::encode_map(disk, part))?;
    }
    Ok((hashes, logical, sent))
}

/// HAVE/LACK for a batch of changed blocks, then the chunks the target lacks;
/// the blocks' entries join `entries`.  Returns chunks sent.
fn offer(
    link: &mut Link,
    batch: &mut Vec<(u64, ChunkId, Vec<u8>)>,
    entries: &mut Vec<Entry>,
) -> Result<u64> {
    let ids: Vec<ChunkId> = batch.iter().map(|(_, id, _)| *id).collect();
    let data: std::collections::HashMap<&ChunkId, &[u8]> =
        batch.iter().map(|(_, id, d)| (id, &d[..])).collect();
    let sent = send_lacking(link, &ids, &mut |id| Ok(wire::pack(*id, data[id])))?;
    drop(data);
    entries.extend(
        batch
            .drain(..)
            .map(|(block, id, _)| Entry::Data { block, id }),
    );
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
