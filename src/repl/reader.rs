//! The read side of the replication port, for `drclone restore` on a host
//! without a store (docs/DESIGN.md §19): OPEN names a disk of a point; the
//! receiver answers with its size and chunk size, then the point's block map
//! (MAP frames: data blocks by chunk id, zero ranges; holes are implied), and
//! then serves GET requests for chunks by id until the client closes.
//!
//! The point is leased for the session (`restore by PEER`), so retention or
//! `point rm` cannot remove it (and GC its chunks) mid-way.  Chunk ids on the
//! wire are BLAKE3 of the data, which is the store's id only when it is
//! unencrypted: an encrypted store refuses.

use std::io::{Read, Write};

use crate::engine::keys::ChunkId;
use crate::engine::store::Block;
use crate::error::{Error, Result};
use crate::repl::wire::{self, Entry};
use crate::Store;

/// Map entries per MAP frame.
const MAP_ENTRIES: u64 = 65536;
/// Ids one GET may ask for at chunk size `cs` (bytes): 16 MiB of chunks, so
/// the CHUNKS answer fits a frame even when nothing compresses.
pub fn max_get(cs: u64) -> usize {
    ((16u64 << 20) / cs.max(1)).max(1) as usize
}

/// Serve one OPEN session.  Errors: NotFound (group, disk, point); an
/// encrypted store; I/O; a malformed or oversized GET.
pub fn serve<S: Read + Write>(
    store: &Store,
    s: &mut S,
    peer: &str,
    open: &wire::Open,
) -> Result<()> {
    if store.cfg.encrypted {
        return Err(Error::Unsupported(
            "restore from an encrypted store is not supported yet".into(),
        ));
    }
    let spec = open.point.as_deref().unwrap_or("latest");
    let p = store.point(&open.group, spec)?;
    let view = store.view(&open.group, &open.disk, Some(&p.id.to_string()))?;
    let _lease = store.lease(&view, &format!("restore by {peer}"))?;
    let cs = store.chunk_size();
    let io = |e| Error::io(peer, e);
    wire::write_frame(
        s,
        wire::OPENED,
        &serde_json::to_vec(&wire::Opened {
            size: view.size,
            chunk_size: cs,
            point: p.id,
        })
        .expect("serializes"),
    )
    .map_err(io)?;
    let blocks = view.size.div_ceil(cs);
    // GET serves only this point's chunks.
    let mut served: std::collections::HashSet<ChunkId> = Default::default();
    let mut b = 0;
    while b < blocks {
        let n = (blocks - b).min(MAP_ENTRIES);
        let mut entries: Vec<Entry> = Vec::new();
        for (i, blk) in store
            .resolve(view.lineage, view.epoch, b, n)?
            .into_iter()
            .enumerate()
        {
            let at = b + i as u64;
            match blk {
                Block::Data(id) => {
                    served.insert(id);
                    entries.push(Entry::Data { block: at, id })
                }
                Block::Zero => match entries.last_mut() {
                    Some(Entry::Zeros { first, count }) if *first + *count == at => *count += 1,
                    _ => entries.push(Entry::Zeros {
                        first: at,
                        count: 1,
                    }),
                },
                Block::Hole => {}
            }
        }
        if !entries.is_empty() {
            wire::write_frame(s, wire::MAP, &wire::encode_map(&open.disk, &entries)).map_err(io)?;
        }
        b += n;
    }
    wire::write_frame(s, wire::MAP, &wire::encode_map(&open.disk, &[])).map_err(io)?;
    s.flush().map_err(io)?;
    log::info!(
        "restore by {peer}: serving {}/{}@{}",
        open.group,
        open.disk,
        p.id
    );
    loop {
        let (t, body) = match wire::read_frame(s) {
            Ok(f) => f,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        if t != wire::GET {
            return Err(Error::invalid(format!(
                "replication protocol: expected GET, got message type {t}"
            )));
        }
        let ids: Vec<ChunkId> = wire::decode_ids(&body)?;
        if ids.len() > max_get(cs) {
            return Err(Error::invalid(format!(
                "replication protocol: GET of {} chunks (at most {})",
                ids.len(),
                max_get(cs)
            )));
        }
        if let Some(id) = ids.iter().find(|id| !served.contains(*id)) {
            return Err(Error::invalid(format!(
                "replication protocol: GET of chunk {}, which is not in the point opened",
                crate::util::hex(id)
            )));
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in &ids {
            let data = store.chunks.get(id)?;
            out.push(wire::pack(*id, &data));
        }
        wire::write_frame(s, wire::CHUNKS, &wire::encode_chunks(&out))
            .and_then(|_| s.flush())
            .map_err(io)?;
    }
}
