//! Journal segments (src/engine/format/journal.rs) from arbitrary bytes.
//!
//! The input is read as a whole segment file: the 24-byte segment header (which
//! `decode_segment` skips), then records.  Properties:
//! - `decode_segment` never panics;
//! - every decoded record re-encodes (`encode_record_v`, in the segment's
//!   version) to the bytes it came from; in version 2 exactly (the CRC covers
//!   bytes 4..8 and reserved bytes must be zero); in version 1 but for the reserved
//!   header bytes 5..8 and 36..40, which that version ignores (they re-encode as
//!   zero; its CRC covers 36..40 but not 5..8);
//! - records lie back to back from offset 24; the decoder stops cleanly (None)
//!   exactly at the end of the input, and otherwise names the offset where the
//!   first bad record starts;
//! - prefix property: decoding the first k bytes yields exactly the records that
//!   end at or before k, and a clean stop exactly when k is a record boundary;
//! - any single flipped bit in a decoded record is rejected (version 1: or lands
//!   in the reserved bytes 5..8 its CRC does not cover, and the record decodes
//!   unchanged), but for a length that shrinks;
//! - re-encoding the decoded records into a fresh segment decodes to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/engine/format/journal.rs"]
mod journal_format;

use journal_format::*;

/// Header bytes the decoder ignores and the CRC does not cover.
const RESERVED: std::ops::Range<usize> = 5..8;
/// Header bytes the decoder ignores but the CRC covers.
const RESERVED_COVERED: std::ops::Range<usize> = 36..40;

fn decode(bytes: &[u8]) -> (Vec<Record>, Option<String>) {
    let (recs, stop) = decode_segment(SEG, bytes);
    assert!(recs.iter().all(|r| r.segment == SEG));
    (recs, stop)
}

const SEG: u64 = 7;

fuzz_target!(|data: &[u8]| {
    let (recs, stop) = decode(data);
    let version = segment_version(data).unwrap_or(SEGMENT_VERSION);
    if data.len() > SEGMENT_HEADER_LEN && version != SEGMENT_VERSION && version != SEGMENT_VERSION_V1 {
        assert!(recs.is_empty() && stop.is_some(), "unknown version {version} decoded");
        return;
    }
    let v1 = version == SEGMENT_VERSION_V1;

    // Re-encode each record in place; collect where each one ends.
    let mut ends = Vec::with_capacity(recs.len());
    let mut off = SEGMENT_HEADER_LEN;
    let mut buf = Vec::new();
    for r in &recs {
        assert!(
            r.kind == KIND_PAGES || r.kind == KIND_TOMBSTONE,
            "kind {}",
            r.kind
        );
        encode_record_v(&mut buf, version, r.kind, r.lineage, r.block, r.offset, &r.data);
        assert_eq!(buf.len(), RECORD_HEADER_LEN + r.data.len());
        let src = &data[off..off + buf.len()];
        let mut expect = src.to_vec();
        if v1 {
            expect[RESERVED].fill(0);
        }
        if v1 && expect[RESERVED_COVERED] != [0; 4] {
            // The writer's zeros, and the CRC over them.
            expect[RESERVED_COVERED].fill(0);
            let crc = crc32fast::hash(&expect[12..]);
            expect[8..12].copy_from_slice(&crc.to_be_bytes());
        }
        assert_eq!(
            buf, expect,
            "record at offset {off} does not re-encode to its bytes"
        );
        off += buf.len();
        ends.push(off);
    }
    let last_end = ends.last().copied().unwrap_or(SEGMENT_HEADER_LEN);
    match &stop {
        None => assert!(data.len() <= SEGMENT_HEADER_LEN || last_end == data.len()),
        Some(msg) => {
            assert!(
                last_end < data.len(),
                "stopped with {msg:?} at the end of the input"
            );
            assert!(
                msg.starts_with(&format!("offset {last_end}: ")),
                "stop {msg:?} does not name offset {last_end}"
            );
        }
    }

    // Prefix property at every record boundary, one byte either side, and a few
    // cut points chosen by the input.
    let mut cuts: Vec<usize> = vec![0, SEGMENT_HEADER_LEN, data.len().saturating_sub(1)];
    for &e in ends.iter().take(64) {
        cuts.extend([e - 1, e, e + 1]);
    }
    if let Some(&b) = data.last() {
        cuts.push(data.len() * b as usize / 256);
    }
    for k in cuts.into_iter().filter(|&k| k <= data.len()) {
        let (p, pstop) = decode(&data[..k]);
        let want = ends.iter().take_while(|&&e| e <= k).count();
        assert_eq!(p[..], recs[..want], "prefix of {k} bytes");
        let boundary = k <= SEGMENT_HEADER_LEN || ends.contains(&k);
        assert_eq!(
            pstop.is_none(),
            boundary,
            "prefix of {k} bytes stopped with {pstop:?}"
        );
    }

    // Single bit flips in one record (chosen by the input): every header bit and
    // up to 32 payload bits.  Each is rejected, or lies in the reserved bytes and
    // leaves the record as it was.  A length that shrinks is not checked: CRC-32
    // guarantees nothing when the covered length changes.
    if !ends.is_empty() {
        let i = data.len() % ends.len();
        let (start, end) = (
            if i == 0 {
                SEGMENT_HEADER_LEN
            } else {
                ends[i - 1]
            },
            ends[i],
        );
        let mut bytes = data[..end].to_vec();
        let data_bits = (end - start - RECORD_HEADER_LEN) * 8;
        let step = (data_bits / 32).max(1);
        let bits = (0..RECORD_HEADER_LEN * 8).chain(
            (0..data_bits)
                .step_by(step)
                .map(|b| b + RECORD_HEADER_LEN * 8),
        );
        for bit in bits {
            let (at, mask) = (start + bit / 8, 1u8 << (bit % 8));
            bytes[at] ^= mask;
            let rel = at - start;
            let shrunk = (12..16).contains(&rel) && bytes[at] & mask == 0;
            let (p, _) = decode(&bytes);
            if v1 && RESERVED.contains(&rel) {
                assert_eq!(p[..], recs[..=i], "a reserved byte flip changed record {i}");
            } else if !shrunk {
                assert_eq!(
                    p[..],
                    recs[..i],
                    "bit {bit} flipped in record {i} went unnoticed"
                );
            }
            bytes[at] ^= mask;
        }
    }

    // The records written again into a fresh segment decode to the same records.
    let mut seg = segment_header(version, SEG).to_vec();
    for r in &recs {
        encode_record_v(&mut buf, version, r.kind, r.lineage, r.block, r.offset, &r.data);
        seg.extend_from_slice(&buf);
    }
    assert_eq!(decode(&seg), (recs, None));
});
