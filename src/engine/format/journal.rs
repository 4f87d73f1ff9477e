//! Journal format: the pure encoder and decoder of segment records.
//!
//! Depends on nothing but `std` and `crc32fast`, so the fuzz targets (`fuzz/`) can
//! build it without the engine.  The layout is documented in
//! [`crate::engine::journal`] and docs/DESIGN.md §6.

pub const SEGMENT_MAGIC: [u8; 8] = *b"DRJOURNL";
pub const SEGMENT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_LEN: usize = 24;
pub const RECORD_MAGIC: [u8; 4] = *b"DRJR";
pub const RECORD_HEADER_LEN: usize = 40;
pub const KIND_PAGES: u8 = 1;
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

pub fn encode_record(out: &mut Vec<u8>, kind: u8, lineage: u64, block: u64, offset: u32, data: &[u8]) {
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
    let crc = crc32fast::hash(&out[12..]);
    out[8..12].copy_from_slice(&crc.to_be_bytes());
}

/// Decode the records of one segment's bytes.  Returns the records and, when the
/// segment ends in a torn or corrupt record, a description of where.
pub fn decode_segment(seg: u64, bytes: &[u8]) -> (Vec<Record>, Option<String>) {
    let mut out = Vec::new();
    let mut off = SEGMENT_HEADER_LEN;
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
        if rest.len() < RECORD_HEADER_LEN + len {
            return (out, bad("torn record data"));
        }
        if crc32fast::hash(&rest[12..RECORD_HEADER_LEN + len]) != be32(8..12) {
            return (out, bad("record CRC mismatch"));
        }
        let kind = rest[4];
        if kind != KIND_PAGES && kind != KIND_TOMBSTONE {
            return (out, bad(&format!("unknown record kind {kind}")));
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
