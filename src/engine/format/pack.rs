//! Pack file format: the pure encoder and decoder of pack and record headers.
//!
//! Depends on nothing but `std` and `crc32fast`, so the fuzz targets (`fuzz/`) can
//! build it without the engine.  The layout is documented in [`crate::engine::pack`]
//! and docs/DESIGN.md §2 (frozen, version 1).

/// A chunk id: BLAKE3 (keyed in an encrypted store) of the plaintext, 32 bytes.
pub type ChunkId = [u8; 32];
/// `BLAKE3("drclone pack file v1")[0..8]`; never change it.
pub const PACK_MAGIC: [u8; 8] = [0x5b, 0x09, 0x66, 0xde, 0x39, 0xa9, 0xb9, 0x1e];
/// `BLAKE3("drclone pack record v1")[0..4]`; never change it.
pub const RECORD_MAGIC: [u8; 4] = [0xe4, 0x64, 0x6c, 0xcd];
pub const PACK_VERSION: u32 = 1;
pub const PACK_HEADER_LEN: usize = 32;
pub const RECORD_HEADER_LEN: usize = 56;

/// A record header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub flags: u8,
    pub raw_len: u32,
    pub stored_len: u32,
    pub crc: u32,
    pub id: ChunkId,
}

impl RecordHeader {
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0..4].copy_from_slice(&RECORD_MAGIC);
        h[4] = self.flags;
        h[8..12].copy_from_slice(&self.raw_len.to_be_bytes());
        h[12..16].copy_from_slice(&self.stored_len.to_be_bytes());
        h[16..20].copy_from_slice(&self.crc.to_be_bytes());
        h[24..56].copy_from_slice(&self.id);
        h
    }

    pub fn decode(h: &[u8]) -> std::result::Result<RecordHeader, String> {
        if h.len() < RECORD_HEADER_LEN {
            return Err(format!("record header truncated to {} bytes", h.len()));
        }
        if h[0..4] != RECORD_MAGIC {
            return Err("record magic is wrong (not a chunk record)".into());
        }
        Ok(RecordHeader {
            flags: h[4],
            raw_len: u32::from_be_bytes(h[8..12].try_into().unwrap()),
            stored_len: u32::from_be_bytes(h[12..16].try_into().unwrap()),
            crc: u32::from_be_bytes(h[16..20].try_into().unwrap()),
            id: h[24..56].try_into().unwrap(),
        })
    }
}

pub fn crc(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}

/// The header of one chunk's record.
pub fn record_header(
    id: &ChunkId,
    flags: u8,
    raw_len: u32,
    payload: &[u8],
) -> [u8; RECORD_HEADER_LEN] {
    RecordHeader {
        flags,
        raw_len,
        stored_len: payload.len() as u32,
        crc: crc(payload),
        id: *id,
    }
    .encode()
}

/// Build the whole record (header + payload) for one chunk.
pub fn record(id: &ChunkId, flags: u8, raw_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD_HEADER_LEN + payload.len());
    r.extend_from_slice(&record_header(id, flags, raw_len, payload));
    r.extend_from_slice(payload);
    r
}

pub fn pack_header(id: u64) -> [u8; PACK_HEADER_LEN] {
    let mut h = [0u8; PACK_HEADER_LEN];
    h[0..8].copy_from_slice(&PACK_MAGIC);
    h[8..12].copy_from_slice(&PACK_VERSION.to_be_bytes());
    h[16..24].copy_from_slice(&id.to_be_bytes());
    h
}
