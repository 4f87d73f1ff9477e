//! Journal format: the pure encoder and decoder of segment records.
//!
//! Depends on nothing but `std` and `crc32fast`, so the fuzz targets (`fuzz/`) can
//! build it without the engine.  The layout is documented in
//! [`crate::engine::journal`] and docs/DESIGN.md §6.

pub const SEGMENT_MAGIC: [u8; 8] = *b"DRJOURNL";
/// The version new segments are written in.  Version 2: the record CRC covers the
/// kind and reserved bytes (4..8) as well as everything after the CRC, reserved
/// bytes must be zero, and the only kind is pages.  Version 1 (read only): the CRC
/// covered bytes 12.. only, so a kind flipped from pages to tombstone went
/// unnoticed (found by the `journal_segment` fuzz target).
pub const SEGMENT_VERSION: u32 = 2;
/// The older version replay still reads (segments left by a crash of an earlier
/// drclone).
pub const SEGMENT_VERSION_V1: u32 = 1;
pub const SEGMENT_HEADER_LEN: usize = 24;
pub const RECORD_MAGIC: [u8; 4] = *b"DRJR";
pub const RECORD_HEADER_LEN: usize = 40;
pub const KIND_PAGES: u8 = 1;
/// "This block's earlier records are void" (version 1 only; version 2 uses the
/// journal horizons in the metadata database instead).
pub const KIND_TOMBSTONE: u8 = 2;
/// Segments rotate at this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// One decoded journal record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub segment: u64,
    pub kind: u8,
    pub lineage: u64,
    pub block: u64,
    pub offset: u32,
    pub data: Vec<u8>,
}

/// A segment header: magic, version, zero, segment id (24 bytes, big-endian).
pub fn segment_header(version: u32, id: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&version.to_be_bytes());
    h[16..24].copy_from_slice(&id.to_be_bytes());
    h
}

/// The CRC of a whole record (`rec` = header and data) in a segment of `version`.
fn record_crc(version: u32, rec: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    if version >= 2 {
        h.update(&rec[4..8]);
    }
    h.update(&rec[12..]);
    h.finalize()
}

/// Encode a record of the current version into `out`.
pub fn encode_record(
    out: &mut Vec<u8>,
    kind: u8,
    lineage: u64,
    block: u64,
    offset: u32,
    data: &[u8],
) {
    encode_record_v(out, SEGMENT_VERSION, kind, lineage, block, offset, data)
}

/// Encode a record as a segment of `version` holds it (tests and the fuzz target
/// write version 1 too).
pub fn encode_record_v(
    out: &mut Vec<u8>,
    version: u32,
    kind: u8,
    lineage: u64,
    block: u64,
    offset: u32,
    data: &[u8],
) {
    out.clear();
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&[kind, 0, 0, 0]);
    out.extend_from_slice(&[0; 4]); // crc, filled below
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&lineage.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(data);
    let crc = record_crc(version, out);
    out[8..12].copy_from_slice(&crc.to_be_bytes());
}

/// The version a segment's bytes declare (bytes 8..12 of its header), if the
/// header is there.
pub fn segment_version(bytes: &[u8]) -> Option<u32> {
    bytes
        .get(8..12)
        .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
}

/// Decode the records of one segment's bytes (header included; its version says
/// how records are checked).  Returns the records and, when the segment ends in a
/// torn or corrupt record, a description of where.
pub fn decode_segment(seg: u64, bytes: &[u8]) -> (Vec<Record>, Option<String>) {
    let mut out = Vec::new();
    let mut off = SEGMENT_HEADER_LEN;
    let version = segment_version(bytes).unwrap_or(SEGMENT_VERSION);
    if bytes.len() > SEGMENT_HEADER_LEN
        && version != SEGMENT_VERSION
        && version != SEGMENT_VERSION_V1
    {
        return (
            out,
            Some(format!("offset 8: unknown segment version {version}")),
        );
    }
    while off < bytes.len() {
        let rest = &bytes[off..];
        let bad = |what: &str| Some(format!("offset {off}: {what}"));
        if rest.len() < RECORD_HEADER_LEN {
            return (out, bad("torn record header"));
        }
        if rest[0..4] != RECORD_MAGIC {
            return (out, bad("not a record (bad magic)"));
        }
        let be32 = |r: std::ops::Range<usize>| u32::from_be_bytes(rest[r].try_into().unwrap());
        let be64 = |r: std::ops::Range<usize>| u64::from_be_bytes(rest[r].try_into().unwrap());
        let len = be32(12..16) as usize;
        if rest.len() - RECORD_HEADER_LEN < len {
            return (out, bad("torn record data"));
        }
        let rec = &rest[..RECORD_HEADER_LEN + len];
        if record_crc(version, rec) != be32(8..12) {
            return (out, bad("record CRC mismatch"));
        }
        let kind = rest[4];
        let known = match version {
            SEGMENT_VERSION_V1 => kind == KIND_PAGES || (kind == KIND_TOMBSTONE && len == 0),
            _ => kind == KIND_PAGES,
        };
        if !known {
            return (
                out,
                bad(&format!("unknown record kind {kind} (length {len})")),
            );
        }
        if version >= 2 && (rest[5..8] != [0; 3] || rest[36..40] != [0; 4]) {
            return (out, bad("reserved bytes are not zero"));
        }
        out.push(Record {
            segment: seg,
            kind,
            lineage: be64(16..24),
            block: be64(24..32),
            offset: be32(32..36),
            data: rest[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len].to_vec(),
        });
        off += RECORD_HEADER_LEN + len;
    }
    (out, None)
}
