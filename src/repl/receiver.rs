//! The replication receiver: one session per connection on `serve`'s
//! `--replication-listen` port (docs/DESIGN.md §18).
//!
//! A session is one or more cycles into one group.  Chunks arrive first (the
//! agent asks which it must send: HAVE/LACK), each batch stored and indexed as
//! it comes (on a worker thread while the next frame is read: [`Pipe`]), so an
//! interrupted cycle's chunks are found by the next one; they are made durable
//! by COMMIT, whose point creation syncs every pack before the point exists.  Every chunk the session relies on is pinned against GC until the
//! session ends.  Map entries (MAP) are staged in memory; COMMIT writes them and
//! the point in one synced batch ([`Store::create_point_staged`]): readers of the
//! group see a cycle wholly or not at all, and a session cut off before COMMIT
//! leaves no trace but unreferenced chunks (GC's, once unpinned).
//!
//! One writer per volume: the session holds a lease on each head it writes
//! (named `replication from PEER`), so `volume rm` is refused meanwhile and
//! an NBD client opening the head for writing is refused; a head that an NBD
//! client already has open is refused here.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};

use crate::engine::keys::ChunkId;
use crate::engine::meta::{MapVal, Origin};
use crate::engine::store::{Block, Lease, HEAD_EPOCH};
use crate::engine::types::Role;
use crate::error::{Error, Result};
use crate::repl::wire::{self, Entry, Hello};
use crate::Store;

/// The user name of a replication session's leases starts with this.
pub const LEASE_PREFIX: &str = "replication from ";

/// For a writer about to lease a head (an NBD client, a FUSE file opened for
/// writing): refuse while a replication session writes it.
pub fn refuse_if_replicating(name: &str, users: &[String]) -> Result<()> {
    match users.iter().find(|u| u.starts_with(LEASE_PREFIX)) {
        Some(u) => Err(Error::Busy(format!(
            "{name} is being written by {u}; a volume takes one writer at a time"
        ))),
        None => Ok(()),
    }
}

/// A replication connection as the receiver sees it.
pub trait Conn: Read + Write {
    /// The socket under it (TLS or not), which the receiver polls to wait for
    /// "the peer sent more, or a CHUNKS frame is stored" at once; None if
    /// there is none (each CHUNKS frame is then stored before the next frame
    /// is read).
    fn socket_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

impl Conn for std::net::TcpStream {
    fn socket_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.as_raw_fd())
    }
}

impl Conn for std::os::unix::net::UnixStream {
    fn socket_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.as_raw_fd())
    }
}

/// The last cycle into a group, kept in its record for `status` and metrics.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct CycleStatus {
    /// When it ended, seconds since the Unix epoch.
    pub time: u64,
    /// The point it committed (None if it failed).
    pub point: Option<u64>,
    /// Bytes received from the agent in the cycle.
    pub bytes: u64,
    /// Milliseconds from HELLO (or the previous commit) to the end.
    pub duration_ms: u64,
    /// Who sent it.
    pub source: String,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

fn record_cycle(store: &Store, group: &str, st: &CycleStatus) {
    if let Err(e) =
        store.set_replication_status(group, serde_json::to_value(st).expect("serializes"))
    {
        log::warn!("replication status of {group}: {e}");
    }
}

/// Receiver settings.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The token agents must present (`--replication-token-file`); None: any.
    pub token: Option<String>,
    /// Speak only TLS (`serve --tls-cert --tls-key`).
    pub tls: Option<crate::repl::link::ServerTls>,
}

/// Compare tokens in time independent of where they differ.
fn same_token(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= (a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

/// The session's token against `--replication-token-file`.  Errors: Refused.
fn check_token(cfg: &Config, got: Option<&str>) -> Result<()> {
    match (&cfg.token, got) {
        (None, _) => Ok(()),
        (Some(want), Some(got)) if same_token(got, want) => Ok(()),
        _ => Err(Error::Refused(
            "wrong or missing replication token (give the agent --token-file)".into(),
        )),
    }
}

/// What one session holds.
struct Session<'a> {
    store: &'a Store,
    hello: Hello,
    /// Chunks pinned by this session (to unpin at its end).
    pinned: Vec<ChunkId>,
    /// Chunks this cycle may reference: held (HAVE) or received (CHUNKS).
    usable: HashSet<ChunkId>,
    /// Chunks this cycle said it lacks (LACK) and has not received yet: the
    /// only ones CHUNKS may carry, so what one cycle stores is bounded by what
    /// it offered (and so by its budget).
    asked: HashSet<ChunkId>,
    staged: HashMap<String, Vec<(u64, MapVal)>>,
    _leases: Vec<Lease>,
    received: u64,
    /// When the current cycle began.
    started: std::time::Instant,
    /// What one cycle may still ask of this receiver, in ids pinned plus map
    /// entries staged plus zero-range blocks scanned (see [`cycle_budget`]).
    budget: u64,
}

/// Volumes one HELLO may name.
pub const MAX_VOLUMES: usize = 256;

/// A cycle's bound on ids pinned (HAVE) plus map entries staged plus blocks of
/// zero ranges scanned: twice the blocks of its volumes (an honest agent offers
/// and maps each changed block about once), plus 65,536.  It caps the memory
/// and CPU one agent can take at what its volumes' sizes justify (staged
/// entries live in memory until COMMIT: about 48 bytes per changed block).
pub fn cycle_budget(blocks: u64) -> u64 {
    blocks.saturating_mul(2).saturating_add(1 << 16)
}

impl Session<'_> {
    /// Take `n` units of the cycle's budget.  Errors: Invalid, past the bound.
    fn charge(&mut self, n: u64, what: &str) -> Result<()> {
        match self.budget.checked_sub(n) {
            Some(left) => {
                self.budget = left;
                Ok(())
            }
            None => Err(Error::invalid(format!(
                "replication protocol: {what} takes this cycle past its bound (ids offered + \
                 map entries + zero-range blocks at most {} for its volumes); an agent offers \
                 and maps each block about once per cycle",
                self.full_budget()
            ))),
        }
    }

    fn full_budget(&self) -> u64 {
        let cs = self.store.chunk_size();
        cycle_budget(self.hello.volumes.iter().map(|(_, s)| s.div_ceil(cs)).sum())
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.store.chunks.unpin(&self.pinned);
    }
}

/// Serve one replication connection until the agent closes it.  Every refusal
/// is sent to the agent as an ERROR frame naming the problem, then returned.
pub fn serve_connection<S: Conn>(
    store: &Store,
    mut stream: S,
    peer: &str,
    cfg: &Config,
) -> Result<()> {
    wire::read_handshake(&mut stream)?;
    wire::write_handshake(&mut stream).map_err(|e| Error::io(peer, e))?;
    let r = session(store, &mut stream, peer, cfg);
    if let Err(e) = &r {
        log::warn!("replication from {peer}: {e}");
        let _ = wire::write_frame(&mut stream, wire::ERROR, e.to_string().as_bytes());
        let _ = stream.flush();
    }
    r
}

fn session<S: Conn>(store: &Store, s: &mut S, peer: &str, cfg: &Config) -> Result<()> {
    let (t, body) = wire::read_frame(s)?;
    if t == wire::OPEN {
        let open: wire::Open = wire::json("OPEN", &body)?;
        check_token(cfg, open.token.as_deref())?;
        return crate::repl::reader::serve(store, s, peer, &open);
    }
    if t != wire::HELLO {
        return Err(Error::invalid(format!(
            "replication protocol: expected HELLO, got message type {t}"
        )));
    }
    let hello: Hello = wire::json("HELLO", &body)?;
    check_token(cfg, hello.token.as_deref())?;
    if store.cfg.encrypted {
        return Err(Error::Unsupported(
            "replication into an encrypted store is not supported yet".into(),
        ));
    }
    let mut sess = open_session(store, peer, hello)?;
    let r = cycles(store, s, peer, &mut sess);
    if let Err(e) = &r {
        record_cycle(
            store,
            &sess.hello.group,
            &CycleStatus {
                time: crate::util::now_secs(),
                point: None,
                bytes: sess.received,
                duration_ms: sess.started.elapsed().as_millis() as u64,
                source: sess.hello.source.clone(),
                error: Some(e.to_string()),
            },
        );
    }
    r
}

/// Cycles of one session, after HELLO.
fn cycles<S: Conn>(store: &Store, s: &mut S, peer: &str, sess: &mut Session<'_>) -> Result<()> {
    let g = store.group(&sess.hello.group)?;
    let welcome = wire::Welcome {
        chunk_size: store.chunk_size(),
        store: store.uuid().to_string(),
        latest_point: store.points(&g.name)?.last().map(|p| p.id),
        epoch: g.epoch,
        heads: sess
            .hello
            .volumes
            .iter()
            .map(|(d, _)| {
                let (l, e, c) = store.head_state(&g.name, d)?;
                Ok((d.clone(), l, e, c))
            })
            .collect::<Result<_>>()?,
        origins: store
            .points(&g.name)?
            .iter()
            .filter_map(|p| match &p.origin {
                Some(o) if o.source == sess.hello.source => o.point.map(|sp| (sp, p.id)),
                _ => None,
            })
            .collect(),
    };
    send_json(s, wire::WELCOME, &welcome, peer)?;
    std::thread::scope(|sc| {
        let mut pipe = Pipe::new(sc)?;
        let r = frames(store, s, peer, sess, &mut pipe);
        // A frame still being stored is waited for on every way out, so its
        // pins are the session's to release (a frame whose store failed
        // released its own).
        match (r, pipe.drain(sess)) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(e)) => {
                log::warn!("replication from {peer}: storing the last CHUNKS frame: {e}");
                Ok(())
            }
            (Ok(()), Ok(_)) => Ok(()),
        }
    })
}

/// The name of the thread that stores a session's CHUNKS frames.
pub const STORE_THREAD: &str = "repl-store";

/// Replies held behind a CHUNKS frame being stored, at most: past this the
/// session waits for the store before it reads on, so a sender that sends
/// without reading its replies is held back (by TCP, once the receiver stops
/// reading), as it is when no frame is being stored.  Without it an empty
/// HAVE (5 bytes, free of the budget) made the receiver hold a reply for as
/// long as a slow store took (found by tests/breakit_repl.rs: 8 MiB of them,
/// 1.7 million replies held).  An agent has at most a few HAVEs out.
pub const MAX_HELD: usize = 1024;

/// The CHUNKS frame being stored on a worker thread while the session reads
/// on (at most one at a time).
struct Storing<'sc> {
    job: std::thread::ScopedJoinHandle<'sc, (Vec<u8>, Result<Vec<ChunkId>>)>,
    /// Its chunk ids: a HAVE read meanwhile counts them as held (the frame is
    /// stored before any later reply goes, and a failed store ends the session
    /// before anything can commit).
    ids: HashSet<ChunkId>,
    /// Replies (type, body) to frames read meanwhile, due after its STORED.
    after: Vec<(u8, Vec<u8>)>,
}

/// The session's store pipeline: one CHUNKS frame is stored (ids checked,
/// pack bytes written, indexed) on a worker thread while the session thread
/// receives the next frame.  Replies keep the order of the frames they
/// answer: a frame's STORED, and every reply to a frame read after it, go
/// once its store is done.  The session waits for "the peer sent more bytes,
/// or the store is done" at once, so a sender that waits for a reply before
/// sending more (a reader slower than the link) never waits on a STORED the
/// receiver holds back.
struct Pipe<'sc, 'env> {
    scope: &'sc std::thread::Scope<'sc, 'env>,
    storing: Option<Storing<'sc>>,
    /// Frame buffers to reuse (one is read into while another is stored from).
    spare: Vec<Vec<u8>>,
    /// A worker writes a byte here when its frame is stored...
    wake_tx: std::os::unix::net::UnixStream,
    /// ...which the session polls together with the peer's socket.
    wake_rx: std::os::unix::net::UnixStream,
}

impl<'sc, 'env> Pipe<'sc, 'env> {
    fn new(scope: &'sc std::thread::Scope<'sc, 'env>) -> Result<Self> {
        let (wake_tx, wake_rx) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| Error::io("replication store pipeline", e))?;
        wake_rx
            .set_nonblocking(true)
            .map_err(|e| Error::io("replication store pipeline", e))?;
        Ok(Pipe {
            scope,
            storing: None,
            spare: Vec::new(),
            wake_tx,
            wake_rx,
        })
    }

    /// Reply now, or after the frame being stored.
    fn reply<S: Write>(&mut self, s: &mut S, peer: &str, t: u8, body: Vec<u8>) -> Result<()> {
        match &mut self.storing {
            Some(st) => {
                st.after.push((t, body));
                Ok(())
            }
            None => wire::write_frame(s, t, &body).map_err(|e| Error::io(peer, e)),
        }
    }

    /// Store the CHUNKS frame in `buf[..len]` on a worker (the previous one
    /// must be finished); `buf` is replaced by a spare buffer.
    fn start(
        &mut self,
        store: &'env Store,
        buf: &mut Vec<u8>,
        len: usize,
        ids: HashSet<ChunkId>,
    ) -> Result<()>
    where
        'env: 'sc,
    {
        debug_assert!(self.storing.is_none());
        let body = std::mem::replace(buf, self.spare.pop().unwrap_or_default());
        let wake = self.wake_tx.try_clone();
        let job = std::thread::Builder::new()
            .name(STORE_THREAD.into())
            .spawn_scoped(self.scope, move || {
                let r = store_frame(store, &body[..len]);
                if let Ok(mut w) = wake {
                    let _ = w.write(&[1]);
                }
                (body, r)
            });
        let job = match job {
            Ok(j) => j,
            Err(e) => return Err(Error::io("replication store thread", e)),
        };
        self.storing = Some(Storing {
            job,
            ids,
            after: Vec::new(),
        });
        Ok(())
    }

    /// Wait for the frame being stored, if any, and record its pins in the
    /// session.  Returns its STORED count and the replies due after it.
    /// Errors: the store's (the frame's pins are released then).
    fn drain(&mut self, sess: &mut Session<'_>) -> Result<Option<(u32, Vec<(u8, Vec<u8>)>)>> {
        let Some(st) = self.storing.take() else {
            return Ok(None);
        };
        let (body, r) = st
            .job
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        // The worker's wake-up byte (written before it returned).
        let _ = (&self.wake_rx).read(&mut [0u8; 16]);
        self.spare.push(body);
        let ids = r?;
        sess.pinned.extend_from_slice(&ids);
        Ok(Some((ids.len() as u32, st.after)))
    }

    /// [`Pipe::drain`], then send the frame's STORED and the replies queued
    /// behind it.
    fn finish<S: Write>(&mut self, s: &mut S, sess: &mut Session<'_>, peer: &str) -> Result<()> {
        if let Some((n, after)) = self.drain(sess)? {
            wire::write_frame(s, wire::STORED, &n.to_be_bytes()).map_err(|e| Error::io(peer, e))?;
            for (t, b) in after {
                wire::write_frame(s, t, &b).map_err(|e| Error::io(peer, e))?;
            }
        }
        Ok(())
    }

    /// Before reading the next frame while one is being stored: wait until
    /// the peer has sent more (then read it meanwhile) or the store is done
    /// (then finish it).  Without a socket to poll, or with [`MAX_HELD`]
    /// replies held already, finish.
    fn before_read<S: Conn>(
        &mut self,
        s: &mut S,
        sess: &mut Session<'_>,
        peer: &str,
    ) -> Result<()> {
        use std::os::fd::AsRawFd;
        let Some(st) = &self.storing else {
            return Ok(());
        };
        if let (Some(fd), false, true) = (
            s.socket_fd(),
            st.job.is_finished(),
            st.after.len() < MAX_HELD,
        ) {
            let mut fds = [
                libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake_rx.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll on two open descriptors this function borrows.
            let n = loop {
                let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                if n >= 0
                    || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    break n;
                }
            };
            if n > 0 && fds[0].revents != 0 && fds[1].revents == 0 {
                return Ok(());
            }
        }
        self.finish(s, sess, peer)
    }
}

/// Plaintext bytes of a CHUNKS frame decompressed, checked and stored at
/// once.  Payloads may inflate far past the frame's own size (zstd: a 64 KiB
/// block of zeros packs into a few bytes), so a frame is stored in slices of
/// at most this much plaintext (at least one chunk each), and what one frame
/// makes the receiver hold is bounded by this, not by the frame's inflation
/// (found by tests/breakit_repl.rs: a 1 MiB frame of such chunks grew the
/// daemon by 1 GiB before the first one was found to lie).
pub const SLICE_PLAINTEXT: u64 = 64 << 20;

/// Store one CHUNKS frame's chunks (the worker's job), slice by slice of at
/// most [`SLICE_PLAINTEXT`] bytes of plaintext: decompressed and checked
/// against their ids in parallel, written to the open pack and indexed
/// ([`crate::engine::chunks::ChunkStore::put_received`]: not synced here;
/// COMMIT's point creation syncs every pack first).  Returns the ids, pinned.
/// Errors: a chunk that does not decompress or hashes to another id (nothing
/// of its slice is indexed; earlier slices stay indexed, unpinned, as an
/// interrupted cycle's chunks do), the store's.
fn store_frame(store: &Store, body: &[u8]) -> Result<Vec<ChunkId>> {
    use rayon::prelude::*;
    crate::fail_point!("repl-store-frame", |_| Err(Error::io(
        "replication store (failpoint repl-store-frame)",
        std::io::Error::from_raw_os_error(libc::EIO)
    )));
    let cs = store.chunk_size() as u32;
    // A store that compresses with zstd keeps a zstd chunk in the form it
    // came in (put_received checks it decompressed to data of its id),
    // instead of compressing it again.
    let keep_zstd = store.cfg.compression == crate::engine::codec::Compression::Zstd;
    // Payloads stay in the frame: a raw one is stored from there.
    let chunks = wire::chunk_refs(body, cs)?;
    let mut ids = Vec::with_capacity(chunks.len());
    let mut rest = &chunks[..];
    let r = (|| {
        while !rest.is_empty() {
            let mut n = 0;
            let mut plain = 0u64;
            while n < rest.len() && (n == 0 || plain + rest[n].raw_len as u64 <= SLICE_PLAINTEXT) {
                plain += rest[n].raw_len as u64;
                n += 1;
            }
            let (slice, tail) = rest.split_at(n);
            rest = tail;
            let batch = slice
                .par_iter()
                .map(|c| {
                    Ok(crate::engine::chunks::Received {
                        id: c.id,
                        data: c.plaintext()?,
                        zstd: (keep_zstd && c.codec == wire::CODEC_ZSTD).then_some(c.payload),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            // Under the shared gate, like every writer: GC's pack phase
            // assumes no record sits appended but unindexed while it holds
            // the gate (found by tests/breakit_dr.rs: GC deleted the pack
            // under them).
            let _g = store.gate.shared();
            ids.extend(store.chunks.put_received(&batch)?);
        }
        Ok(())
    })();
    if let Err(e) = r {
        store.chunks.unpin(&ids);
        return Err(e);
    }
    Ok(ids)
}

/// The frames of a session's cycles, after WELCOME.
fn frames<'sc, 'env, S: Conn>(
    store: &'env Store,
    s: &mut S,
    peer: &str,
    sess: &mut Session<'_>,
    pipe: &mut Pipe<'sc, 'env>,
) -> Result<()>
where
    'env: 'sc,
{
    let mut buf = Vec::new();
    loop {
        pipe.before_read(s, sess, peer)?;
        let (t, len) = match wire::read_frame_reuse(s, &mut buf) {
            Ok(f) => f,
            // The agent closed between cycles: the session is over.
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        sess.received += len as u64 + 5;
        // Only HAVE, CHUNKS and MAP go on while a frame is being stored;
        // anything else (COMMIT above all) waits for it and its STORED.
        if !matches!(t, wire::HAVE | wire::CHUNKS | wire::MAP) {
            pipe.finish(s, sess, peer)?;
        }
        let body: &[u8] = &buf[..len];
        match t {
            wire::HAVE => {
                let ids = wire::decode_ids(body)?;
                sess.charge(ids.len() as u64, "HAVE")?;
                let mut have = store.chunks.pin_and_check(&ids)?;
                sess.pinned.extend_from_slice(&ids);
                if let Some(st) = &pipe.storing {
                    for (id, h) in ids.iter().zip(have.iter_mut()) {
                        *h |= st.ids.contains(id);
                    }
                }
                for (id, h) in ids.iter().zip(&have) {
                    if *h {
                        sess.usable.insert(*id);
                    }
                }
                let lack: Vec<bool> = have.iter().map(|h| !h).collect();
                sess.asked.extend(
                    ids.iter()
                        .zip(&lack)
                        .filter(|(_, l)| **l)
                        .map(|(id, _)| *id),
                );
                pipe.reply(s, peer, wire::LACK, wire::encode_bits(&lack))?;
            }
            wire::CHUNKS => {
                // Parsed here for the ids (again, in place, on the worker).
                let ids: HashSet<ChunkId> = wire::chunk_refs(body, store.chunk_size() as u32)?
                    .iter()
                    .map(|c| c.id)
                    .collect();
                if let Some(id) = ids.iter().find(|id| !sess.asked.contains(*id)) {
                    return Err(Error::invalid(format!(
                        "replication protocol: CHUNKS carries chunk {}, which this cycle did \
                         not ask for (LACK)",
                        crate::util::hex(id)
                    )));
                }
                for id in &ids {
                    sess.asked.remove(id);
                }
                // Usable by MAP at once: COMMIT waits for the store, and a
                // failed store ends the session.
                sess.usable.extend(ids.iter().copied());
                // The previous frame's STORED goes first.
                pipe.finish(s, sess, peer)?;
                pipe.start(store, &mut buf, len, ids)?;
            }
            wire::BASE => {
                let b: wire::Base = wire::json("BASE", &body)?;
                // Only heads that moved on are kept and rolled back; every
                // other refusal (the base gone, a disk the point lacks)
                // stands, and changes nothing here (found by
                // tests/breakit_dr2.rs: a failback to a site that had removed
                // the base took a stray diverged point on every attempt, then
                // failed in the rollback).
                let diverged = match (check_base(store, &sess.hello, b.point)?, b.point) {
                    (Err(why), Some(base)) if b.keep_diverged => {
                        Some(keep_diverged(store, sess, peer, base, &why)?)
                    }
                    (Err(why), _) => return Err(Error::Refused(why)),
                    // A failback cut off after its rollback kept the heads in
                    // a point: the failback that completes names it (found by
                    // tests/breakit_dr2.rs: the rerun reported none).
                    (Ok(()), Some(base)) if b.keep_diverged => {
                        kept_since(store, &sess.hello.group, base)?
                    }
                    (Ok(()), _) => None,
                };
                send_json(s, wire::BASE_OK, &wire::BaseOk { diverged }, peer)?;
            }
            wire::MAP => {
                let (disk, entries) = wire::decode_map(&body)?;
                stage(sess, &disk, &entries)?;
            }
            wire::COMMIT => {
                let c: wire::Commit = wire::json("COMMIT", &body)?;
                let staged: Vec<(String, Vec<(u64, MapVal)>)> = sess.staged.drain().collect();
                let p = store.create_point_staged(
                    &sess.hello.group,
                    c.app,
                    c.label,
                    &staged,
                    Some(Origin {
                        source: sess.hello.source.clone(),
                        point: c.source_point,
                        time: c.time,
                    }),
                )?;
                crate::metrics::replication_bytes(&sess.hello.group, sess.received);
                record_cycle(
                    store,
                    &sess.hello.group,
                    &CycleStatus {
                        time: crate::util::now_secs(),
                        point: Some(p.id),
                        bytes: sess.received,
                        duration_ms: sess.started.elapsed().as_millis() as u64,
                        source: sess.hello.source.clone(),
                        error: None,
                    },
                );
                sess.received = 0;
                sess.started = std::time::Instant::now();
                log::info!(
                    "replication from {peer}: point {} of {} committed",
                    p.id,
                    sess.hello.group
                );
                let heads = sess
                    .hello
                    .volumes
                    .iter()
                    .map(|(d, _)| {
                        let (l, e, _) = store.head_state(&sess.hello.group, d)?;
                        Ok((d.clone(), l, e))
                    })
                    .collect::<Result<_>>()?;
                send_json(
                    s,
                    wire::COMMITTED,
                    &wire::Committed { point: p.id, heads },
                    peer,
                )?;
                // The next cycle pins afresh, with a fresh budget.
                sess.budget = sess.full_budget();
                store.chunks.unpin(&sess.pinned);
                sess.pinned.clear();
                sess.usable.clear();
                sess.asked.clear();
            }
            t => {
                return Err(Error::invalid(format!(
                    "replication protocol: unexpected message type {t}"
                )))
            }
        }
    }
}

fn send_json<S: Write, T: serde::Serialize>(s: &mut S, t: u8, v: &T, peer: &str) -> Result<()> {
    wire::write_frame(s, t, &serde_json::to_vec(v).expect("serializes"))
        .and_then(|_| s.flush())
        .map_err(|e| Error::io(peer, e))
}

/// Check the group and its volumes, create or grow what is missing, and take
/// the heads' leases.
fn open_session<'a>(store: &'a Store, peer: &str, hello: Hello) -> Result<Session<'a>> {
    let group = hello.group.clone();
    // HELLO itself first, so a refused one creates nothing (found by
    // tests/breakit_repl.rs: the group was created before these checks).
    if hello.volumes.is_empty() {
        return Err(Error::invalid("HELLO names no volume"));
    }
    if hello.volumes.len() > MAX_VOLUMES {
        return Err(Error::invalid(format!(
            "HELLO names {} volumes; a group takes at most {MAX_VOLUMES}",
            hello.volumes.len()
        )));
    }
    crate::util::check_name("group", &group)?;
    for (i, (disk, size)) in hello.volumes.iter().enumerate() {
        crate::util::check_name("disk", disk)?;
        store.check_size(*size)?;
        if hello.volumes[..i].iter().any(|(d, _)| d == disk) {
            return Err(Error::invalid(format!("HELLO names disk {disk} twice")));
        }
    }
    let g = match store.group(&group) {
        Ok(g) => g,
        Err(Error::NotFound(_)) => store.create_group(&group)?,
        Err(e) => return Err(e),
    };
    if g.role != Role::Protected {
        return Err(Error::Refused(format!(
            "group {group} is {}: replication into it is refused (undo the failover, or \
             fail back, first)",
            g.role
        )));
    }
    // An agent's cycle is one crash-consistent point of the whole group: it
    // must capture every disk the group has (a disk it leaves out would sit in
    // the point with older data).  Push sessions are checked by BASE instead.
    if hello.source.starts_with("agent:") {
        let missing: Vec<String> = store
            .volumes(Some(&group))?
            .into_iter()
            .filter(|v| !hello.volumes.iter().any(|(d, _)| *d == v.disk))
            .map(|v| v.disk)
            .collect();
        if !missing.is_empty() {
            return Err(Error::Refused(format!(
                "group {group} also has disk(s) {}, which this cycle does not name: a point \
                 captures every disk of its group at one instant; give a --volume for each \
                 (or remove the disk from the group on the target)",
                missing.join(", ")
            )));
        }
    }
    if let Some(e) = hello.epoch.filter(|e| *e < g.epoch) {
        return Err(Error::Refused(format!(
            "group {group} changed role since this agent's last cycle (fencing epoch {e}, now \
             {}): its heads may not be what this agent replicated; check `drclone status`, \
             then rerun replicate with --reprotect",
            g.epoch
        )));
    }
    if store.is_draining(&group) {
        return Err(Error::Refused(format!(
            "group {group} is being failed over (planned): replication into it is refused"
        )));
    }
    // Leases first, on the volumes that exist, so a refused session changes
    // nothing (found by tests/breakit_dr.rs: it grew a volume another writer
    // held); then create or grow, and lease what was created.
    let take = |disk: &str| {
        let view = store.view(&group, disk, None)?;
        store.lease_if(&view, &format!("{LEASE_PREFIX}{peer}"), |users| {
            if users.is_empty() {
                return Ok(());
            }
            Err(Error::Busy(format!(
                "volume {group}/{disk} is in use by {} ({}); a volume takes one writer at a \
                 time",
                users.len(),
                users.join(", ")
            )))
        })
    };
    let mut leases = Vec::new();
    let mut missing = Vec::new();
    for (disk, size) in &hello.volumes {
        match store.volume(&group, disk) {
            Ok(v) => {
                leases.push(take(disk)?);
                if v.size < *size {
                    missing.push((disk, *size, true));
                }
            }
            Err(Error::NotFound(_)) => missing.push((disk, *size, false)),
            Err(e) => return Err(e),
        }
    }
    for (disk, size, exists) in missing {
        if exists {
            store.resize_volume(&group, disk, size)?;
        } else {
            store.create_volume(&group, disk, size)?;
            leases.push(take(disk)?);
        }
    }
    // Pages an earlier NBD writer left in the write-back overlay go to the map
    // first, so the zero ranges below see them.
    store.destage(None)?;
    let cs = store.chunk_size();
    let budget = cycle_budget(hello.volumes.iter().map(|(_, s)| s.div_ceil(cs)).sum());
    Ok(Session {
        budget,
        store,
        hello,
        pinned: Vec::new(),
        usable: HashSet::new(),
        staged: HashMap::new(),
        asked: HashSet::new(),
        _leases: leases,
        received: 0,
        started: std::time::Instant::now(),
    })
}

/// BASE: the heads of HELLO must hold exactly target point `base` (or, with
/// None, the group must hold no point and its heads no data).  Returns
/// Ok(Err(why)) when they moved on since `base` (written, failed over or
/// grown since), which a failback resolves by keeping them in a point and
/// rolling back ([`keep_diverged`]).  Errors: [`Error::Refused`] for what
/// no rollback resolves: the point missing, a disk the point to land lacks,
/// data from no point of the sender.
fn check_base(
    store: &Store,
    hello: &Hello,
    base: Option<u64>,
) -> Result<std::result::Result<(), String>> {
    let group = &hello.group;
    // Writes an NBD client left in the write-back overlay count.
    store.destage(None)?;
    let p = match base {
        Some(id) => Some(store.point(group, &id.to_string()).map_err(|_| {
            Error::Refused(format!(
                "point {id} of {group}, the base of this push, is gone from the target \
                 (removed there, by `point rm` or retention, since it was sent): the two \
                 stores share no point the target still holds, so what its heads hold cannot \
                 be told.  Keep what the target holds (take a point there, or export it), \
                 remove {group} there, and push or fail back again (a full copy)"
            ))
        })?),
        None => None,
    };
    // The point to land holds exactly HELLO's disks at HELLO's sizes, and a
    // point holds every disk of the group at its head's size: a disk HELLO
    // does not name, or a head larger than HELLO says, would land in it
    // (found by tests/breakit_repl.rs: a disk created or grown on the target
    // since the common point, or one the source removed, went into the
    // pushed points).
    for v in store.volumes(Some(group))? {
        match hello.volumes.iter().find(|(d, _)| *d == v.disk) {
            None => {
                return Err(Error::Refused(format!(
                    "volume {group}/{} on the target is not in the point being pushed (it was \
                     created on the target, or removed from the source's group, since the \
                     newest point the two stores have in common): a push would land it in a \
                     point that does not hold it.  Remove it on the target (after taking a \
                     point there, if it holds writes to keep), then push again",
                    v.disk
                )))
            }
            Some((_, size)) if v.size > *size => {
                return Ok(Err(format!(
                    "volume {group}/{} on the target is {} bytes, larger than the {size} of the \
                     point being pushed (it was resized on the target, or failed over or rolled \
                     back to a smaller size on the source, since the newest point the two \
                     stores have in common): a push cannot shrink it",
                    v.disk, v.size
                )))
            }
            Some(_) => {}
        }
    }
    let (Some(id), Some(p)) = (base, p) else {
        if let Some(p) = store.points(group)?.last() {
            return Err(Error::Refused(format!(
                "group {group} on the target has points (newest {}) and none came from this \
                 store: a push would replace what it holds; push into a new group, or remove \
                 {group} on the target first",
                p.id
            )));
        }
        for (disk, _) in &hello.volumes {
            let v = store.volume(group, disk)?;
            if store.has_data(v.lineage)? {
                return Err(Error::Refused(format!(
                    "volume {group}/{disk} on the target holds data that came from no point \
                     of this store: a push would overwrite it; push into a new group, or \
                     remove {group} on the target first"
                )));
            }
        }
        return Ok(Ok(()));
    };
    for (disk, _) in &hello.volumes {
        let v = store.volume(group, disk)?;
        let moved = match p.volumes.iter().find(|pv| &pv.disk == disk) {
            Some(pv) if pv.lineage == v.lineage => !store
                .changed_blocks(v.lineage, pv.epoch, HEAD_EPOCH)?
                .is_empty(),
            // A head cloned from the point and not written since holds it
            // (a failback's rollback that a cut-off session left; found by
            // tests/breakit_dr2.rs: the rerun kept those heads as a second,
            // empty diverged point and reported that one).
            Some(pv)
                if store.lineage(v.lineage).and_then(|l| l.parent)
                    == Some((pv.lineage, pv.epoch)) =>
            {
                !store.changed_blocks(v.lineage, 0, HEAD_EPOCH)?.is_empty()
            }
            Some(_) => true,
            None => store.has_data(v.lineage)?,
        };
        if moved {
            return Ok(Err(format!(
                "the head of {group}/{disk} on the target has moved on since point {id}, the \
                 newest point the two stores have in common (it was written, or failed over, \
                 since): a push would overwrite those writes.  Take a point there to keep \
                 them, and resolve the divergence (failback) before pushing"
            )));
        }
    }
    Ok(Ok(()))
}

/// The label of the point a failback keeps a diverged site's heads in starts
/// with this.
pub const DIVERGED_PREFIX: &str = "diverged-";

/// The newest point of `group` after `base` that keeps diverged heads (a
/// failback cut off after its rollback made it), if any.
fn kept_since(store: &Store, group: &str, base: u64) -> Result<Option<u64>> {
    Ok(store
        .points(group)?
        .iter()
        .rev()
        .take_while(|p| p.id > base)
        .find(|p| {
            p.label
                .as_deref()
                .is_some_and(|l| l.starts_with(DIVERGED_PREFIX))
        })
        .map(|p| p.id))
}

/// Failback into a site whose heads moved on since `base`: keep them in a
/// point labelled `diverged-TIME`, roll the heads back to `base`, and move the
/// session's leases to the new heads (the old ones are dropped once free).
/// Returns the kept point's id.  Errors: the engine's.
fn keep_diverged(
    store: &Store,
    sess: &mut Session<'_>,
    peer: &str,
    base: u64,
    why: &str,
) -> Result<u64> {
    let group = sess.hello.group.clone();
    let label = format!("{DIVERGED_PREFIX}{}", crate::util::now_secs());
    let kept = store.create_point(&group, false, Some(label.clone()))?;
    log::warn!(
        "failback into {group}: {why}; those writes are kept in point {} ({label}); the heads \
         roll back to point {base}",
        kept.id
    );
    store.rollback_heads(&group, &base.to_string())?;
    // The base point's sizes: a disk the sender grew since grows back.
    for (disk, size) in &sess.hello.volumes {
        if store.volume(&group, disk)?.size < *size {
            store.resize_volume(&group, disk, *size)?;
        }
    }
    let mut leases = Vec::new();
    for (disk, _) in &sess.hello.volumes {
        let view = store.view(&group, disk, None)?;
        leases.push(store.lease(&view, &format!("{LEASE_PREFIX}{peer}"))?);
    }
    sess._leases = leases;
    store.drop_retired(&group)?;
    Ok(kept.id)
}

/// Stage MAP entries of `disk`.  Zero ranges become zero markers only where
/// the head holds data (a hole needs none).
fn stage(sess: &mut Session<'_>, disk: &str, entries: &[Entry]) -> Result<()> {
    let Some((_, size)) = sess.hello.volumes.iter().find(|(d, _)| d == disk) else {
        return Err(Error::invalid(format!(
            "MAP for disk {disk}, which HELLO did not name"
        )));
    };
    let cs = sess.store.chunk_size();
    let blocks = size.div_ceil(cs);
    let v = sess.store.volume(&sess.hello.group, disk)?;
    let cost = entries
        .iter()
        .map(|e| match e {
            Entry::Data { .. } => 1,
            Entry::Zeros { count, .. } => (*count).max(1),
        })
        .fold(0u64, u64::saturating_add);
    sess.charge(cost, "MAP")?;
    let out = sess.staged.entry(disk.to_string()).or_default();
    for e in entries {
        match *e {
            Entry::Data { block, id } => {
                if block >= blocks {
                    return Err(Error::invalid(format!(
                        "MAP block {block} is beyond {disk} ({blocks} blocks)"
                    )));
                }
                if !sess.usable.contains(&id) {
                    return Err(Error::invalid(format!(
                        "MAP names chunk {} that this cycle neither holds nor sent",
                        crate::util::hex(&id)
                    )));
                }
                out.push((block, MapVal::Data(id)));
            }
            Entry::Zeros { first, count } => {
                if first.checked_add(count).is_none_or(|e| e > blocks) {
                    return Err(Error::invalid(format!(
                        "MAP zero range {first}+{count} is beyond {disk} ({blocks} blocks)"
                    )));
                }
                let mut b = first;
                while b < first + count {
                    let n = (first + count - b).min(1 << 16);
                    for (i, blk) in sess
                        .store
                        .resolve(v.lineage, HEAD_EPOCH, b, n)?
                        .iter()
                        .enumerate()
                    {
                        if matches!(blk, Block::Data(_)) {
                            out.push((b + i as u64, MapVal::Zero));
                        }
                    }
                    b += n;
                }
            }
        }
    }
    Ok(())
}
