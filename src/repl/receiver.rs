//! The replication receiver: one session per connection on `serve`'s
//! `--replication-listen` port (docs/DESIGN.md §18).
//!
//! A session is one or more cycles into one group.  Chunks arrive first (the
//! agent asks which it must send: HAVE/LACK), each batch stored, made durable
//! and indexed as it comes, so an interrupted cycle's chunks are found by the
//! next one.  Every chunk the session relies on is pinned against GC until the
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

/// Receiver settings.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The token agents must present (`--replication-token-file`); None: any.
    pub token: Option<String>,
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

/// What one session holds.
struct Session<'a> {
    store: &'a Store,
    hello: Hello,
    /// Chunks pinned by this session (to unpin at its end).
    pinned: Vec<ChunkId>,
    /// Chunks this cycle may reference: held (HAVE) or received (CHUNKS).
    usable: HashSet<ChunkId>,
    staged: HashMap<String, Vec<(u64, MapVal)>>,
    _leases: Vec<Lease>,
    received: u64,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.store.chunks.unpin(&self.pinned);
    }
}

/// Serve one replication connection until the agent closes it.  Every refusal
/// is sent to the agent as an ERROR frame naming the problem, then returned.
pub fn serve_connection<S: Read + Write>(
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

fn session<S: Read + Write>(store: &Store, s: &mut S, peer: &str, cfg: &Config) -> Result<()> {
    let (t, body) = wire::read_frame(s)?;
    if t != wire::HELLO {
        return Err(Error::invalid(format!(
            "replication protocol: expected HELLO, got message type {t}"
        )));
    }
    let hello: Hello = wire::json("HELLO", &body)?;
    if let Some(want) = &cfg.token {
        match &hello.token {
            Some(got) if same_token(got, want) => {}
            _ => {
                return Err(Error::Refused(
                    "wrong or missing replication token (give the agent --token-file)".into(),
                ))
            }
        }
    }
    if store.cfg.encrypted {
        return Err(Error::Unsupported(
            "replication into an encrypted store is not supported yet".into(),
        ));
    }
    let mut sess = open_session(store, peer, hello)?;
    let g = store.group(&sess.hello.group)?;
    let welcome = wire::Welcome {
        chunk_size: store.chunk_size(),
        store: store.uuid().to_string(),
        latest_point: store.points(&g.name)?.last().map(|p| p.id),
        epoch: g.epoch,
    };
    send_json(s, wire::WELCOME, &welcome, peer)?;
    loop {
        let (t, body) = match wire::read_frame(s) {
            Ok(f) => f,
            // The agent closed between cycles: the session is over.
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        sess.received += body.len() as u64 + 5;
        match t {
            wire::HAVE => {
                let ids = wire::decode_ids(&body)?;
                let have = store.chunks.pin_and_check(&ids)?;
                sess.pinned.extend_from_slice(&ids);
                for (id, h) in ids.iter().zip(&have) {
                    if *h {
                        sess.usable.insert(*id);
                    }
                }
                let lack: Vec<bool> = have.iter().map(|h| !h).collect();
                wire::write_frame(s, wire::LACK, &wire::encode_bits(&lack))
                    .map_err(|e| Error::io(peer, e))?;
            }
            wire::CHUNKS => {
                let cs = store.chunk_size() as u32;
                let mut batch = Vec::new();
                for c in wire::decode_chunks(&body, cs)? {
                    batch.push((c.id, wire::unpack(&c)?));
                }
                let ids = store.chunks.put_received(&batch)?;
                sess.pinned.extend_from_slice(&ids);
                sess.usable.extend(ids.iter().copied());
                wire::write_frame(s, wire::STORED, &(ids.len() as u32).to_be_bytes())
                    .map_err(|e| Error::io(peer, e))?;
            }
            wire::MAP => {
                let (disk, entries) = wire::decode_map(&body)?;
                stage(&mut sess, &disk, &entries)?;
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
                    }),
                )?;
                crate::metrics::replication_bytes(&sess.hello.group, sess.received);
                sess.received = 0;
                log::info!(
                    "replication from {peer}: point {} of {} committed",
                    p.id,
                    sess.hello.group
                );
                send_json(s, wire::COMMITTED, &wire::Committed { point: p.id }, peer)?;
                // The next cycle pins afresh.
                store.chunks.unpin(&sess.pinned);
                sess.pinned.clear();
                sess.usable.clear();
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
    if let Some(e) = hello.epoch.filter(|e| *e < g.epoch) {
        return Err(Error::Refused(format!(
            "group {group} changed role since this agent's last cycle (fencing epoch {e}, now \
             {}): its heads may not be what this agent replicated; check `drclone status`, \
             then rerun replicate with --reprotect",
            g.epoch
        )));
    }
    if hello.volumes.is_empty() {
        return Err(Error::invalid("HELLO names no volume"));
    }
    let mut leases = Vec::new();
    for (disk, size) in &hello.volumes {
        match store.volume(&group, disk) {
            Ok(v) if v.size < *size => {
                store.resize_volume(&group, disk, *size)?;
            }
            Ok(_) => {}
            Err(Error::NotFound(_)) => {
                store.create_volume(&group, disk, *size)?;
            }
            Err(e) => return Err(e),
        }
        let view = store.view(&group, disk, None)?;
        leases.push(
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
            })?,
        );
    }
    // Pages an earlier NBD writer left in the write-back overlay go to the map
    // first, so the zero ranges below see them.
    store.destage(None)?;
    Ok(Session {
        store,
        hello,
        pinned: Vec::new(),
        usable: HashSet::new(),
        staged: HashMap::new(),
        _leases: leases,
        received: 0,
    })
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
