//! The replication wire protocol, version 1: pure encoders and decoders (no I/O
//! beyond `Read`/`Write`, no engine), so they can be fuzzed alone.
//!
//! ```text
//! agent -> receiver   MAGIC (8 bytes "DRCLREPL") + version u32 BE
//! receiver -> agent   MAGIC + version u32 BE
//! then frames, both ways:   length u32 BE (of type + body) | type u8 | body
//! ```
//!
//! A frame is at most [`MAX_FRAME`] bytes; a longer length is refused before
//! anything is allocated.  Messages (agent -> receiver, then the answer):
//!
//! | type | message | body | answer |
//! |---|---|---|---|
//! | 1 | HELLO | JSON [`Hello`] | WELCOME (2) JSON [`Welcome`], or ERROR |
//! | 3 | HAVE | n × 32-byte chunk ids | LACK (4): n bits, 1 = send it |
//! | 5 | CHUNKS | n × (id 32, raw len u32, codec u8, len u32, payload) | STORED (6): count u32 |
//! | 7 | MAP | disk (u16 len + UTF-8), n × entry | none |
//! | 9 | COMMIT | JSON [`Commit`] | COMMITTED (10) JSON [`Committed`], or ERROR |
//! | 11 | BASE | JSON [`Base`] (store to store: `push`) | BASE_OK (12) JSON [`BaseOk`], or ERROR |
//! | 13 | OPEN | JSON [`Open`] (`restore`, instead of HELLO) | OPENED (14) JSON [`Opened`], then MAP frames of the point's map ending with an empty one; or ERROR |
//! | 16 | GET | n × 32-byte chunk ids | CHUNKS (5) with those chunks, in order |
//! | 15 | ERROR | UTF-8 text | (the receiver closes after sending one) |
//!
//! A MAP entry is `kind u8` then: kind 0 (zeros) `first block u64, count u64`;
//! kind 1 (data) `block u64, chunk id 32`.  Chunk ids are BLAKE3 of the chunk's
//! bytes (the receiver checks every one).  Codec 0 is raw, 1 is zstd.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::engine::keys::ChunkId;
use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"DRCLREPL";
pub const VERSION: u32 = 1;
/// Largest frame (type + body), bytes: 32 MiB.
pub const MAX_FRAME: usize = 32 << 20;
/// Largest HELLO/COMMIT body, bytes.
pub const MAX_JSON: usize = 1 << 20;

pub const HELLO: u8 = 1;
pub const WELCOME: u8 = 2;
pub const HAVE: u8 = 3;
pub const LACK: u8 = 4;
pub const CHUNKS: u8 = 5;
pub const STORED: u8 = 6;
pub const MAP: u8 = 7;
pub const COMMIT: u8 = 9;
pub const COMMITTED: u8 = 10;
pub const BASE: u8 = 11;
pub const BASE_OK: u8 = 12;
pub const OPEN: u8 = 13;
pub const OPENED: u8 = 14;
pub const GET: u8 = 16;
pub const ERROR: u8 = 15;

pub const CODEC_RAW: u8 = 0;
pub const CODEC_ZSTD: u8 = 1;

/// The agent's first message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    /// The shared secret (`--token-file`), if the receiver wants one.
    pub token: Option<String>,
    pub group: String,
    /// The volumes of this cycle: disk name and size in bytes.
    pub volumes: Vec<(String, u64)>,
    /// Who sends: `agent:HOST` or a store's UUID.
    pub source: String,
    /// The group's fencing epoch at this agent's last committed cycle (None on
    /// a first cycle, or to re-protect): a stale one is refused.
    #[serde(default)]
    pub epoch: Option<u64>,
}

/// The receiver's answer to HELLO.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Welcome {
    /// The target store's chunk size in bytes: the agent cuts sources at it.
    pub chunk_size: u64,
    /// The target store's UUID.
    pub store: String,
    /// The group's latest point, if any (the agent's manifest is trusted only
    /// if it was made by the cycle that committed it).
    pub latest_point: Option<u64>,
    /// The group's fencing epoch.
    pub epoch: u64,
    /// Per volume of HELLO: (disk, head lineage, head epoch, clean).  A
    /// manifest describes a head only if its lineage and epoch are the ones the
    /// agent's last COMMITTED named and nothing wrote to it since (clean).
    #[serde(default)]
    pub heads: Vec<(String, u64, u64, bool)>,
    /// The group's points that came from HELLO's `source`: (the source's point
    /// id, this store's point id), oldest first.  `push` finds the newest point
    /// the two stores have in common here.
    #[serde(default)]
    pub origins: Vec<(u64, u64)>,
}

/// Store to store (`push`): the point of this (receiving) store that the sender
/// builds on.  The receiver checks that every head of HELLO still holds exactly
/// that point's data (no write since), or, with `point: None` (a full seed),
/// that the group has no point and no data; otherwise it refuses (ERROR), so a
/// push never overwrites writes the sender does not know of.
///
/// With `keep_diverged` (failback), heads that moved on since `point` are not
/// refused: the receiver keeps them in a new point labelled `diverged-TIME`,
/// rolls the group's heads back to `point`, and names the kept point in
/// [`BaseOk`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Base {
    pub point: Option<u64>,
    #[serde(default)]
    pub keep_diverged: bool,
}

/// `restore`'s first message: read one disk of a point (the latest when
/// `point` is None; `latest`, `latest-app` or an id).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Open {
    pub token: Option<String>,
    pub group: String,
    pub disk: String,
    pub point: Option<String>,
}

/// The answer to OPEN.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Opened {
    /// The disk's size in the point, bytes.
    pub size: u64,
    pub chunk_size: u64,
    /// The point's id.
    pub point: u64,
}

/// The receiver's answer to BASE.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BaseOk {
    /// The point that keeps writes the receiver's heads had after the base
    /// (failback of a diverged site), if it made one.
    pub diverged: Option<u64>,
}

/// Ends a cycle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Commit {
    pub label: Option<String>,
    /// The agent's pre/post-snapshot hooks succeeded: an app-consistent point.
    pub app: bool,
    /// The source's point id, when the source is a store.
    pub source_point: Option<u64>,
    /// The source point's time (seconds since the Unix epoch), when the
    /// source is a store: the landed point keeps it.
    #[serde(default)]
    pub time: Option<u64>,
}

/// The receiver's answer to COMMIT.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Committed {
    pub point: u64,
    /// Per volume: (disk, head lineage, head epoch) after the commit.
    #[serde(default)]
    pub heads: Vec<(String, u64, u64)>,
}

/// One MAP entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Blocks `first..first + count` read as zeros.
    Zeros { first: u64, count: u64 },
    /// Block `block` holds chunk `id`.
    Data { block: u64, id: ChunkId },
}

/// One chunk of a CHUNKS frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireChunk {
    pub id: ChunkId,
    /// Its plaintext length in bytes.
    pub raw_len: u32,
    pub codec: u8,
    pub payload: Vec<u8>,
}

fn bad(what: impl Into<String>) -> Error {
    Error::invalid(format!("replication protocol: {}", what.into()))
}

/// Write the handshake (magic + version).
pub fn write_handshake(w: &mut impl Write) -> std::io::Result<()> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&VERSION.to_be_bytes());
    w.write_all(&b)
}

/// Read and check the peer's handshake.  Errors: not drclone's protocol, or
/// another version.
pub fn read_handshake(r: &mut impl Read) -> Result<()> {
    let mut b = [0u8; 12];
    r.read_exact(&mut b)
        .map_err(|e| bad(format!("no handshake: {e}")))?;
    check_handshake(&b)
}

/// Check a 12-byte handshake.
pub fn check_handshake(b: &[u8; 12]) -> Result<()> {
    if &b[..8] != MAGIC {
        return Err(bad(
            "the peer does not speak drclone replication (bad magic)",
        ));
    }
    let v = u32::from_be_bytes(b[8..].try_into().unwrap());
    if v != VERSION {
        return Err(bad(format!(
            "the peer speaks version {v}; this drclone speaks version {VERSION}"
        )));
    }
    Ok(())
}

/// Write one frame.
pub fn write_frame(w: &mut impl Write, typ: u8, body: &[u8]) -> std::io::Result<()> {
    let len = (body.len() + 1) as u32;
    let mut hdr = [0u8; 5];
    hdr[..4].copy_from_slice(&len.to_be_bytes());
    hdr[4] = typ;
    w.write_all(&hdr)?;
    w.write_all(body)
}

/// Read one frame: (type, body).  Errors: a length over [`MAX_FRAME`] or zero,
/// end of stream, I/O.
pub fn read_frame(r: &mut impl Read) -> Result<(u8, Vec<u8>)> {
    let mut body = Vec::new();
    let (t, len) = read_frame_reuse(r, &mut body)?;
    body.truncate(len);
    Ok((t, body))
}

/// [`read_frame`] into `buf`, which is reused from frame to frame: it only
/// grows (to the largest body read), and what is past the returned length is
/// stale.  A receiver of 16 MiB frames saves a fresh zeroed allocation, and
/// its page faults, per frame.  Returns (type, body length).  Errors: as
/// [`read_frame`].
pub fn read_frame_reuse(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<(u8, usize)> {
    let mut hdr = [0u8; 5];
    r.read_exact(&mut hdr)
        .map_err(|e| Error::io("replication connection", e))?;
    let len = u32::from_be_bytes(hdr[..4].try_into().unwrap()) as usize;
    if len == 0 || len > MAX_FRAME + 1 {
        return Err(bad(format!("frame length {len} is out of bounds")));
    }
    if buf.len() < len - 1 {
        buf.resize(len - 1, 0);
    }
    r.read_exact(&mut buf[..len - 1])
        .map_err(|e| Error::io("replication connection", e))?;
    Ok((hdr[4], len - 1))
}

/// A JSON body, bounded.
pub fn json<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> Result<T> {
    if body.len() > MAX_JSON {
        return Err(bad(format!("{what} is {} bytes", body.len())));
    }
    serde_json::from_slice(body).map_err(|e| bad(format!("{what} does not parse: {e}")))
}

pub fn encode_ids(ids: &[ChunkId]) -> Vec<u8> {
    ids.concat()
}

pub fn decode_ids(body: &[u8]) -> Result<Vec<ChunkId>> {
    if body.len() % 32 != 0 {
        return Err(bad("HAVE is not a whole number of 32-byte ids"));
    }
    Ok(body
        .chunks_exact(32)
        .map(|c| c.try_into().unwrap())
        .collect())
}

/// A bitmap of `bits`, one bit per id (1 = lacking), LSB first.
pub fn encode_bits(bits: &[bool]) -> Vec<u8> {
    let mut v = vec![0u8; bits.len().div_ceil(8)];
    for (i, b) in bits.iter().enumerate() {
        if *b {
            v[i / 8] |= 1 << (i % 8);
        }
    }
    v
}

pub fn decode_bits(body: &[u8], n: usize) -> Result<Vec<bool>> {
    if body.len() != n.div_ceil(8) {
        return Err(bad(format!("LACK has {} bytes for {n} ids", body.len())));
    }
    Ok((0..n).map(|i| body[i / 8] & (1 << (i % 8)) != 0).collect())
}

pub fn encode_chunks(chunks: &[WireChunk]) -> Vec<u8> {
    let mut v = Vec::new();
    for c in chunks {
        append_chunk(&mut v, c);
    }
    v
}

/// Append one chunk to a CHUNKS body.
pub fn append_chunk(out: &mut Vec<u8>, c: &WireChunk) {
    out.extend_from_slice(&c.id);
    out.extend_from_slice(&c.raw_len.to_be_bytes());
    out.push(c.codec);
    out.extend_from_slice(&(c.payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&c.payload);
}

/// One chunk of a CHUNKS body, borrowed from the body (see [`chunk_refs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef<'a> {
    pub id: ChunkId,
    /// Its plaintext length in bytes.
    pub raw_len: u32,
    pub codec: u8,
    pub payload: &'a [u8],
}

impl<'a> ChunkRef<'a> {
    /// The chunk's plaintext: a raw payload is itself (no copy).  Errors: a
    /// payload that does not decode to exactly `raw_len` bytes.
    pub fn plaintext(&self) -> Result<std::borrow::Cow<'a, [u8]>> {
        let data = match self.codec {
            CODEC_RAW => std::borrow::Cow::Borrowed(self.payload),
            _ => std::borrow::Cow::Owned(decompress(self.payload, self.raw_len)?),
        };
        if data.len() != self.raw_len as usize {
            return Err(bad(format!(
                "a chunk decompressed to {} bytes, not {}",
                data.len(),
                self.raw_len
            )));
        }
        Ok(data)
    }
}

/// Parse a CHUNKS body without copying payloads.  `max_raw`: the largest
/// plaintext length allowed (the chunk size).  Errors: a header cut short, a
/// length past the frame, a plaintext length of 0 or over `max_raw`, an
/// unknown codec.
pub fn chunk_refs(body: &[u8], max_raw: u32) -> Result<Vec<ChunkRef<'_>>> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        if rest.len() < 41 {
            return Err(bad("CHUNKS ends inside a chunk header"));
        }
        let id: ChunkId = rest[..32].try_into().unwrap();
        let raw_len = u32::from_be_bytes(rest[32..36].try_into().unwrap());
        let codec = rest[36];
        let len = u32::from_be_bytes(rest[37..41].try_into().unwrap()) as usize;
        if raw_len == 0 || raw_len > max_raw {
            return Err(bad(format!(
                "a chunk of {raw_len} bytes (the chunk size is {max_raw})"
            )));
        }
        if codec != CODEC_RAW && codec != CODEC_ZSTD {
            return Err(bad(format!("unknown codec {codec}")));
        }
        if rest.len() < 41 + len {
            return Err(bad("a chunk's length runs past the frame"));
        }
        out.push(ChunkRef {
            id,
            raw_len,
            codec,
            payload: &rest[41..41 + len],
        });
        rest = &rest[41 + len..];
    }
    Ok(out)
}

/// Decode a CHUNKS body into owned chunks; see [`chunk_refs`].
pub fn decode_chunks(body: &[u8], max_raw: u32) -> Result<Vec<WireChunk>> {
    Ok(chunk_refs(body, max_raw)?
        .into_iter()
        .map(|c| WireChunk {
            id: c.id,
            raw_len: c.raw_len,
            codec: c.codec,
            payload: c.payload.to_vec(),
        })
        .collect())
}

/// The plaintext of a received chunk.  Errors: a payload that does not
/// decompress to exactly `raw_len` bytes.
pub fn unpack(c: &WireChunk) -> Result<Vec<u8>> {
    ChunkRef {
        id: c.id,
        raw_len: c.raw_len,
        codec: c.codec,
        payload: &c.payload,
    }
    .plaintext()
    .map(std::borrow::Cow::into_owned)
}

thread_local! {
    static ZSTD_C: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static ZSTD_D: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn decompress(payload: &[u8], raw_len: u32) -> Result<Vec<u8>> {
    // One context per thread: creating one per chunk cost more than the
    // decompression (perf).
    ZSTD_D
        .with(|d| {
            let mut d = d.borrow_mut();
            let d = match d.as_mut() {
                Some(d) => d,
                None => d.insert(zstd::bulk::Decompressor::new()?),
            };
            d.decompress(payload, raw_len as usize)
        })
        .map_err(|e| bad(format!("a chunk does not decompress: {e}")))
}

/// The zstd (level 1) form of `data` if it is worth sending: smaller than
/// `data`.  Data the engine's early-abort test calls incompressible (random,
/// already compressed) is not tried at all: that costs a 4 KiB LZ4 sample
/// instead of a full zstd pass over the chunk (perf: zstd on random chunks
/// and its per-call context were 27% of a seed's agent CPU).
pub fn compress(data: &[u8]) -> Option<Vec<u8>> {
    if !crate::engine::codec::worth_compressing(data) {
        return None;
    }
    ZSTD_C
        .with(|c| {
            let mut c = c.borrow_mut();
            let c = match c.as_mut() {
                Some(c) => c,
                None => c.insert(zstd::bulk::Compressor::new(1).ok()?),
            };
            c.compress(data).ok()
        })
        .filter(|z| z.len() < data.len())
}

/// Compress `data` for the wire (zstd level 1, or raw when that is not
/// smaller or not worth trying; see [`compress`]).
pub fn pack(id: ChunkId, data: &[u8]) -> WireChunk {
    match compress(data) {
        Some(z) => WireChunk {
            id,
            raw_len: data.len() as u32,
            codec: CODEC_ZSTD,
            payload: z,
        },
        None => WireChunk {
            id,
            raw_len: data.len() as u32,
            codec: CODEC_RAW,
            payload: data.to_vec(),
        },
    }
}

/// Append one chunk of a CHUNKS body to `out` without building a
/// [`WireChunk`]: `zstd` is [`compress`]'s answer for `data` (raw if None).
/// Returns the bytes appended.
pub fn push_chunk(out: &mut Vec<u8>, id: &ChunkId, data: &[u8], zstd: Option<&[u8]>) -> usize {
    let (codec, payload) = match zstd {
        Some(z) => (CODEC_ZSTD, z),
        None => (CODEC_RAW, data),
    };
    let at = out.len();
    out.extend_from_slice(id);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.push(codec);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.len() - at
}

pub fn encode_map(disk: &str, entries: &[Entry]) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + disk.len() + entries.len() * 41);
    v.extend_from_slice(&(disk.len() as u16).to_be_bytes());
    v.extend_from_slice(disk.as_bytes());
    for e in entries {
        match e {
            Entry::Zeros { first, count } => {
                v.push(0);
                v.extend_from_slice(&first.to_be_bytes());
                v.extend_from_slice(&count.to_be_bytes());
            }
            Entry::Data { block, id } => {
                v.push(1);
                v.extend_from_slice(&block.to_be_bytes());
                v.extend_from_slice(id);
            }
        }
    }
    v
}

pub fn decode_map(body: &[u8]) -> Result<(String, Vec<Entry>)> {
    if body.len() < 2 {
        return Err(bad("MAP without a disk name"));
    }
    let n = u16::from_be_bytes([body[0], body[1]]) as usize;
    if body.len() < 2 + n {
        return Err(bad("MAP's disk name runs past the frame"));
    }
    let disk = std::str::from_utf8(&body[2..2 + n])
        .map_err(|_| bad("MAP's disk name is not UTF-8"))?
        .to_string();
    let mut rest = &body[2 + n..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        match rest[0] {
            0 if rest.len() >= 17 => {
                out.push(Entry::Zeros {
                    first: u64::from_be_bytes(rest[1..9].try_into().unwrap()),
                    count: u64::from_be_bytes(rest[9..17].try_into().unwrap()),
                });
                rest = &rest[17..];
            }
            1 if rest.len() >= 41 => {
                out.push(Entry::Data {
                    block: u64::from_be_bytes(rest[1..9].try_into().unwrap()),
                    id: rest[9..41].try_into().unwrap(),
                });
                rest = &rest[41..];
            }
            k => return Err(bad(format!("MAP entry of kind {k} is malformed"))),
        }
    }
    Ok((disk, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_lying_lengths_are_refused() {
        let mut v = Vec::new();
        write_frame(&mut v, HAVE, &[7u8; 64]).unwrap();
        let (t, b) = read_frame(&mut &v[..]).unwrap();
        assert_eq!((t, b.len()), (HAVE, 64));
        let mut lie = ((MAX_FRAME + 10) as u32).to_be_bytes().to_vec();
        lie.push(HAVE);
        let e = read_frame(&mut &lie[..]).unwrap_err().to_string();
        assert!(e.contains("out of bounds"), "{e}");
        assert!(read_frame(&mut &[0u8, 0, 0, 0, 1][..]).is_err());
        // Truncated body: an error, not a panic.
        assert!(read_frame(&mut &v[..20]).is_err());
    }

    #[test]
    fn handshake_names_what_is_wrong() {
        let mut v = Vec::new();
        write_handshake(&mut v).unwrap();
        read_handshake(&mut &v[..]).unwrap();
        let e = check_handshake(b"GET / HTTP/1").unwrap_err().to_string();
        assert!(e.contains("bad magic"), "{e}");
        let mut w = *b"DRCLREPL\0\0\0\x09";
        let e = check_handshake(&w).unwrap_err().to_string();
        assert!(e.contains("version 9"), "{e}");
        w[11] = 1;
        check_handshake(&w).unwrap();
    }

    #[test]
    fn messages_round_trip() {
        let ids = vec![[1u8; 32], [2u8; 32]];
        assert_eq!(decode_ids(&encode_ids(&ids)).unwrap(), ids);
        assert!(decode_ids(&[0u8; 33]).is_err());
        let bits = vec![true, false, true, true, false, false, false, false, true];
        assert_eq!(decode_bits(&encode_bits(&bits), 9).unwrap(), bits);
        assert!(decode_bits(&[0u8; 3], 9).is_err());
        let data = vec![5u8; 4096];
        let c = pack(*blake3::hash(&data).as_bytes(), &data);
        assert_eq!(c.codec, CODEC_ZSTD);
        let d = decode_chunks(&encode_chunks(&[c.clone()]), 65536).unwrap();
        assert_eq!(unpack(&d[0]).unwrap(), data);
        assert!(decode_chunks(&encode_chunks(&[c.clone()]), 1024).is_err());
        let mut lying = encode_chunks(&[c]);
        lying.truncate(lying.len() - 1);
        assert!(decode_chunks(&lying, 65536).is_err());
        let es = vec![
            Entry::Zeros { first: 3, count: 9 },
            Entry::Data {
                block: 1,
                id: [9; 32],
            },
        ];
        assert_eq!(
            decode_map(&encode_map("d0", &es)).unwrap(),
            ("d0".into(), es)
        );
        assert!(decode_map(&[0, 5, b'a']).is_err());
        assert!(decode_map(&[0, 1, b'a', 1, 0]).is_err());
    }

    #[test]
    fn random_chunks_go_raw_text_goes_zstd_and_push_chunk_matches_encode_chunks() {
        use rand::RngCore;
        let mut random = vec![0u8; 65536];
        rand::thread_rng().fill_bytes(&mut random);
        let text = b"the quick brown fox jumps over the lazy dog ".repeat(1500)[..65536].to_vec();
        assert!(compress(&random).is_none());
        let z = compress(&text).expect("text compresses");
        assert!(z.len() < text.len() / 4, "{}", z.len());
        let (ri, ti) = (
            *blake3::hash(&random).as_bytes(),
            *blake3::hash(&text).as_bytes(),
        );
        let mut body = Vec::new();
        let n = push_chunk(&mut body, &ri, &random, None);
        push_chunk(&mut body, &ti, &text, Some(&z));
        assert_eq!(n, 41 + random.len());
        assert_eq!(body, encode_chunks(&[pack(ri, &random), pack(ti, &text)]));
        let d = decode_chunks(&body, 65536).unwrap();
        assert_eq!((d[0].codec, d[1].codec), (CODEC_RAW, CODEC_ZSTD));
        assert_eq!(unpack(&d[1]).unwrap(), text);
        // Borrowed: a raw payload is its plaintext, without a copy.
        let r = chunk_refs(&body, 65536).unwrap();
        assert!(
            matches!(r[0].plaintext().unwrap(), std::borrow::Cow::Borrowed(p) if p == &random[..])
        );
        assert_eq!(r[1].plaintext().unwrap(), &text[..]);
        assert!(chunk_refs(&body[..body.len() - 1], 65536).is_err());
        // A raw payload shorter than it claims is refused.
        let mut short = d[0].clone();
        short.payload.pop();
        assert!(unpack(&short).is_err());
        let short_ref = ChunkRef {
            payload: &random[1..],
            ..r[0]
        };
        assert!(short_ref.plaintext().is_err());
        // Garbage that claims to be zstd is refused, not a panic.
        let garbage = ChunkRef {
            payload: &[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3],
            ..r[1]
        };
        assert!(garbage.plaintext().is_err());
    }

    #[test]
    fn a_payload_that_lies_about_its_length_is_refused() {
        let data = vec![1u8; 1000];
        let mut c = pack([0; 32], &data);
        c.raw_len = 999;
        assert!(unpack(&c).is_err());
    }
}
