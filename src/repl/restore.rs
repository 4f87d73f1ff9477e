//! `drclone restore GROUP/DISK[@POINT] --from HOST:PORT --to FILE_OR_DEVICE`:
//! failback to a plain host, where there is no store, only the disk
//! (docs/DESIGN.md §19).  The local disk is hashed chunk by chunk (BLAKE3, at
//! the store's chunk size) and compared with the point's map; only the chunks
//! that differ are fetched (GET), rsync-style, checked against their ids, and
//! written.  At the end every block is read back and checked against the map.
//!
//! The target is refused if it is mounted, backs a loop device, or is open for
//! writing by another process (unless `force`): writing under a live file
//! system corrupts it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::engine::keys::ChunkId;
use crate::error::{Error, IoContext, Result};
use crate::repl::link::{ClientTls, Link};
use crate::repl::reader::max_get;
use crate::repl::wire::{self, Entry};

/// What a restore needs.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// `HOST:PORT` of the store's replication port.
    pub from: String,
    pub group: String,
    pub disk: String,
    /// `latest` (None), `latest-app` or a point id.
    pub point: Option<String>,
    /// The file (created if missing) or block device to make equal to the point.
    pub to: PathBuf,
    pub token: Option<String>,
    pub tls: Option<ClientTls>,
    /// Write even if the target is mounted or open for writing elsewhere.
    pub force: bool,
    pub progress: bool,
}

/// What a restore did (`--json` prints it).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RestoreReport {
    pub point: u64,
    /// The disk's size, bytes.
    pub size: u64,
    /// Blocks (of the chunk size) that differed and were written.
    pub blocks_changed: u64,
    /// Bytes of chunks fetched (uncompressed).
    pub bytes_fetched: u64,
    /// Protocol bytes received from the store.
    pub bytes_received: u64,
    /// Every block was read back and matched the point.
    pub verified: bool,
    pub duration_ms: u64,
}

/// What a block of the point holds.
#[derive(Clone, Copy, PartialEq)]
enum Want {
    Zero,
    Data(ChunkId),
}

/// Restore.  Errors: a target in use (named, with who uses it); a block
/// device smaller than the disk; the store's refusals; a chunk whose data does
/// not match its id; I/O; a failed final verification (names the block).
pub fn restore(opts: &RestoreOptions) -> Result<RestoreReport> {
    let to = &opts.to;
    if !opts.force {
        refuse_if_in_use(to)?;
    }
    // The target is opened, and locked, before the store is asked: a second
    // restore started meanwhile then finds it in use (found by
    // tests/breakit_dr2.rs: opened only once the store had answered, two
    // restores into one file both passed the check and both wrote).
    let target = open_target(to, opts.force)?;
    let r = restore_into(opts, &target);
    if r.is_err() && target.created && target.file.metadata().is_ok_and(|m| m.len() == 0) {
        // Nothing written to a file this restore created: it goes again.
        let _ = std::fs::remove_file(to);
    }
    r
}

/// The store's answer to OPEN, checked: a lying or broken store must not
/// make the client divide by zero or allocate without bound (found by
/// tests/breakit_dr2.rs: chunk size 0 panicked, a 2^60-byte disk aborted).
fn check_opened(o: &wire::Opened) -> Result<()> {
    let cs = o.chunk_size;
    if !(4096..=(4 << 20)).contains(&cs) || !cs.is_power_of_two() {
        return Err(Error::invalid(format!(
            "restore: the store says its chunk size is {cs} bytes, not a power of two from 4 KiB \
             to 4 MiB"
        )));
    }
    if o.size == 0 || o.size % 512 != 0 || o.size > (1 << 60) {
        return Err(Error::invalid(format!(
            "restore: the store says the disk is {} bytes, not a valid volume size",
            o.size
        )));
    }
    Ok(())
}

fn restore_into(opts: &RestoreOptions, target: &Target) -> Result<RestoreReport> {
    let t0 = Instant::now();
    let to = &opts.to;
    let mut link = Link::open(&opts.from, opts.tls.as_ref(), None)?;
    link.send_json(
        wire::OPEN,
        &wire::Open {
            token: opts.token.clone(),
            group: opts.group.clone(),
            disk: opts.disk.clone(),
            point: opts.point.clone(),
        },
    )?;
    let opened: wire::Opened = wire::json("OPENED", &link.expect(wire::OPENED)?)?;
    check_opened(&opened)?;
    let cs = opened.chunk_size;
    let blocks = opened.size.div_ceil(cs);
    let mut want = Vec::new();
    want.try_reserve_exact(blocks as usize).map_err(|_| {
        Error::invalid(format!(
            "restore: the disk is {} bytes; its map of {blocks} blocks does not fit in memory",
            opened.size
        ))
    })?;
    want.resize(blocks as usize, Want::Zero);
    loop {
        let (_, entries) = wire::decode_map(&link.expect(wire::MAP)?)?;
        if entries.is_empty() {
            break;
        }
        for e in entries {
            match e {
                Entry::Data { block, id } if block < blocks => {
                    want[block as usize] = Want::Data(id)
                }
                Entry::Zeros { first, count } if first.saturating_add(count) <= blocks => {}
                _ => {
                    return Err(Error::invalid(
                        "restore: the store sent a map entry beyond the disk",
                    ))
                }
            }
        }
    }
    fit_target(target, to, opened.size, opts.force)?;
    let file = &target.file;
    // Which blocks differ.
    let bar = if opts.progress {
        crate::engine::imex::progress_bar(opened.size, "comparing")
    } else {
        indicatif::ProgressBar::hidden()
    };
    // The store drops a session silent for 5 minutes, and hashing a large
    // local disk takes longer: an empty GET now and then keeps it (found by
    // tests/breakit_dr2.rs: the first GET after a long compare found the
    // session gone).
    let mut alive = KeepAlive {
        every: Duration::from_secs(keepalive_secs()),
        last: Instant::now(),
    };
    let differ = compare(file, opened.size, cs, &want, &bar, &mut || {
        alive.tick(&mut link)
    })?;
    bar.finish_and_clear();
    // Fetch what differs, by id (each id once), and write it where needed.
    let mut need: HashMap<ChunkId, Vec<u64>> = HashMap::new();
    let mut zeros = Vec::new();
    for &b in &differ {
        match want[b as usize] {
            Want::Data(id) => need.entry(id).or_default().push(b),
            Want::Zero => zeros.push(b),
        }
    }
    let zero = vec![0u8; cs as usize];
    for b in zeros {
        write_block(file, b, &zero, cs, opened.size, to)?;
        alive.tick(&mut link)?;
    }
    let ids: Vec<ChunkId> = need.keys().copied().collect();
    let mut fetched = 0u64;
    for part in ids.chunks(max_get(cs)) {
        link.send(wire::GET, &wire::encode_ids(part))?;
        let got = wire::decode_chunks(&link.expect(wire::CHUNKS)?, cs as u32)?;
        if got.len() != part.len() || got.iter().zip(part).any(|(c, id)| c.id != *id) {
            return Err(Error::invalid(
                "restore: the store answered GET with other chunks than asked",
            ));
        }
        for c in got {
            let data = wire::unpack(&c)?;
            // Checked before it is written (found by tests/breakit_dr2.rs:
            // only the final read-back caught a chunk that was not its id,
            // after it had been written over the local disk).
            if *blake3::hash(&data).as_bytes() != c.id {
                return Err(Error::invalid(format!(
                    "restore: the store sent chunk {} with data that does not match its id; \
                     nothing of it was written",
                    crate::util::hex(&c.id)
                )));
            }
            for &b in &need[&c.id] {
                write_block(file, b, &data, cs, opened.size, to)?;
                alive.tick(&mut link)?;
            }
            fetched += data.len() as u64;
        }
    }
    file.sync_all().at(to)?;
    // Read everything back.
    let left = compare(
        file,
        opened.size,
        cs,
        &want,
        &indicatif::ProgressBar::hidden(),
        &mut || Ok(()),
    )?;
    if let Some(b) = left.first() {
        return Err(Error::invalid(format!(
            "restore: {} does not match point {} at block {b} (byte {}) after writing; {} \
             block(s) differ",
            to.display(),
            opened.point,
            b * cs,
            left.len()
        )));
    }
    log::info!(
        "restored {}/{}@{} to {}: {} block(s) written",
        opts.group,
        opts.disk,
        opened.point,
        to.display(),
        differ.len()
    );
    Ok(RestoreReport {
        point: opened.point,
        size: opened.size,
        blocks_changed: differ.len() as u64,
        bytes_fetched: fetched,
        bytes_received: link.received(),
        verified: true,
        duration_ms: t0.elapsed().as_millis() as u64,
    })
}

/// The restore's target, open for reading and writing.
struct Target {
    file: File,
    /// A block device (else a file).
    dev: bool,
    /// The file did not exist before this restore.
    created: bool,
}

/// Open the target for writing (a file is created if missing; unless `force`,
/// a block device is opened `O_EXCL`, which the kernel refuses when it is
/// mounted or claimed) and, unless `force`, take an exclusive `flock` on it, so two
/// restores never write one target at once.  Errors: a directory;
/// [`Error::Busy`] (mounted, claimed, another restore); I/O.
fn open_target(to: &Path, force: bool) -> Result<Target> {
    let md = std::fs::metadata(to).ok();
    if md.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(Error::invalid(format!(
            "--to {} is a directory, not a file or block device",
            to.display()
        )));
    }
    let dev = md.as_ref().is_some_and(|m| m.file_type().is_block_device());
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if dev && !force {
        // The kernel refuses O_EXCL on a device that is mounted or claimed.
        o.custom_flags(libc::O_EXCL);
    } else if !dev {
        o.create(true);
    }
    let file = o.open(to).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            Error::Busy(format!(
                "{} is in use (mounted, or claimed by another program); unmount it first",
                to.display()
            ))
        } else {
            Error::io(to, e)
        }
    })?;
    if !force {
        // SAFETY: flock on a descriptor we own.
        let r = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Error::Busy(format!(
                    "{} is locked (flock) by another program, such as another drclone \
                     restore into it; wait for it, or pass --force",
                    to.display()
                ))
            } else {
                Error::io(to, e)
            });
        }
    }
    Ok(Target {
        file,
        dev,
        created: md.is_none(),
    })
}

/// Make the target hold a disk of `size` bytes: a block device must hold at
/// least that; a file is sized to it, but one that is longer is cut only with
/// `force` (found by tests/breakit_dr2.rs: its tail was cut off silently).
fn fit_target(t: &Target, to: &Path, size: u64, force: bool) -> Result<()> {
    if t.dev {
        let mut len = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer given.
        if unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&t.file),
                BLKGETSIZE64,
                &mut len,
            )
        } != 0
        {
            return Err(Error::io(to, std::io::Error::last_os_error()));
        }
        if len < size {
            return Err(Error::invalid(format!(
                "{} holds {len} bytes; the disk is {size} bytes",
                to.display()
            )));
        }
        return Ok(());
    }
    let len = t.file.metadata().at(to)?.len();
    if len > size && !force {
        return Err(Error::invalid(format!(
            "{} holds {len} bytes, more than the disk's {size}: restoring would cut its last {} \
             bytes off; pass --force to cut it to the disk's size",
            to.display(),
            len - size
        )));
    }
    t.file.set_len(size).at(to)
}

/// `_IOR(0x12, 114, size_t)`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Keeps a restore session from looking idle to the store while the client
/// works locally (hashing, writing).
struct KeepAlive {
    every: Duration,
    last: Instant,
}

impl KeepAlive {
    /// Send an empty GET (answered by an empty CHUNKS) if nothing was sent
    /// for `every`.  Errors: the link's.
    fn tick(&mut self, link: &mut Link) -> Result<()> {
        if self.last.elapsed() >= self.every {
            link.send(wire::GET, &[])?;
            link.expect(wire::CHUNKS)?;
            self.last = Instant::now();
        }
        Ok(())
    }
}

/// Seconds between keep-alive requests while the link waits on local work:
/// `DRCLONE_RESTORE_KEEPALIVE_SECS`, default 60 (the store drops a session
/// silent for 300).
fn keepalive_secs() -> u64 {
    std::env::var("DRCLONE_RESTORE_KEEPALIVE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&s| s > 0)
        .unwrap_or(60)
}

/// Blocks of the first `size` bytes of `f` whose content differs from `want`;
/// `tick` is called after every read (about 4 MiB).
fn compare(
    f: &File,
    size: u64,
    cs: u64,
    want: &[Want],
    bar: &indicatif::ProgressBar,
    tick: &mut dyn FnMut() -> Result<()>,
) -> Result<Vec<u64>> {
    let mut differ = Vec::new();
    let per_read = (4 << 20) / cs.max(1) + 1;
    let mut buf = vec![0u8; (per_read * cs) as usize];
    let mut b = 0u64;
    while b < want.len() as u64 {
        let n = (want.len() as u64 - b).min(per_read);
        let len = ((b + n) * cs).min(size) - b * cs;
        let chunk = &mut buf[..(n * cs) as usize];
        chunk.fill(0);
        let mut got = 0;
        while got < len as usize {
            let k = f
                .read_at(&mut chunk[got..len as usize], b * cs + got as u64)
                .map_err(|e| Error::io("restore target", e))?;
            if k == 0 {
                break;
            }
            got += k;
        }
        for i in 0..n {
            let blk = &chunk[(i * cs) as usize..((i + 1) * cs) as usize];
            let same = match want[(b + i) as usize] {
                Want::Zero => blk.iter().all(|&x| x == 0),
                Want::Data(id) => *blake3::hash(blk).as_bytes() == id,
            };
            if !same {
                differ.push(b + i);
            }
        }
        bar.inc(len);
        b += n;
        tick()?;
    }
    Ok(differ)
}

/// Write block `b` (`data`, cut at the disk's end).
fn write_block(f: &File, b: u64, data: &[u8], cs: u64, size: u64, to: &Path) -> Result<()> {
    let off = b * cs;
    let len = (size - off).min(data.len() as u64) as usize;
    f.write_all_at(&data[..len], off).at(to)
}

/// Refuse a target that is mounted, backs a loop device, or is open for
/// writing by another process.  Errors: [`Error::Busy`] naming who holds it.
pub fn refuse_if_in_use(to: &Path) -> Result<()> {
    let Ok(canon) = std::fs::canonicalize(to) else {
        return Ok(()); // it does not exist yet: nobody uses it
    };
    let busy = |why: String| {
        Err(Error::Busy(format!(
            "{} {why}; restoring under it would corrupt it (stop it, or pass --force)",
            to.display()
        )))
    };
    if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in mi.lines() {
            let mut parts = line.split(" - ");
            let (Some(left), Some(right)) = (parts.next(), parts.next()) else {
                continue;
            };
            let source = right.split(' ').nth(1).unwrap_or("");
            let point = left.split(' ').nth(4).unwrap_or("");
            if !source.is_empty()
                && std::fs::canonicalize(unescape(source)).is_ok_and(|s| s == canon)
            {
                return busy(format!("is mounted on {}", unescape(point)));
            }
        }
    }
    if let Ok(loops) = std::fs::read_dir("/sys/block") {
        for l in loops.flatten() {
            let bf = l.path().join("loop/backing_file");
            if let Ok(b) = std::fs::read_to_string(&bf) {
                if Path::new(b.trim()) == canon {
                    return busy(format!(
                        "backs loop device /dev/{}",
                        l.file_name().to_string_lossy()
                    ));
                }
            }
        }
    }
    let me = std::process::id().to_string();
    for p in std::fs::read_dir("/proc").at(Path::new("/proc"))?.flatten() {
        let pid = p.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|c| c.is_ascii_digit()) || pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|t| t == canon) {
                let info = std::fs::read_to_string(p.path().join("fdinfo").join(fd.file_name()))
                    .unwrap_or_default();
                let flags = info
                    .lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
                    .unwrap_or(0);
                if flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
                    let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                    return busy(format!(
                        "is open for writing by process {pid} ({})",
                        comm.trim()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Undo mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\04"), "/end\\04");
    }
}
