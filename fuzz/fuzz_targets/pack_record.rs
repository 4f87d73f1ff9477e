//! Pack record headers (src/engine/format/pack.rs) from arbitrary bytes.
//!
//! The input is read as one record as it lies in a pack file: a 56-byte header,
//! then the payload.  Properties:
//! - `RecordHeader::decode` never panics, and succeeds exactly when the input has
//!   56 bytes and the record magic;
//! - a decoded header re-encodes to the bytes it came from (the reserved bytes,
//!   which the decoder ignores, re-encode as zero), and decode(encode(h)) == h;
//! - `record()` over the payload builds a record whose header decodes to what was
//!   asked, whose CRC checks, and a single flipped payload bit fails the CRC;
//! - a valid record with zero reserved bytes is rebuilt by `record()` byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/engine/format/pack.rs"]
mod pack_format;

use pack_format::*;

/// Bytes of the header that the decoder ignores (and the encoder writes as zero).
const RESERVED: [std::ops::Range<usize>; 2] = [5..8, 20..24];

fuzz_target!(|data: &[u8]| {
    let decoded = RecordHeader::decode(data);
    let well_formed = data.len() >= RECORD_HEADER_LEN && data[0..4] == RECORD_MAGIC;
    assert_eq!(
        decoded.is_ok(),
        well_formed,
        "decode accepted/rejected {:?}",
        decoded
    );

    // The header fields, decoded or (for rejected input) taken from zero-padded bytes.
    let mut raw = [0u8; RECORD_HEADER_LEN];
    let n = data.len().min(RECORD_HEADER_LEN);
    raw[..n].copy_from_slice(&data[..n]);
    raw[0..4].copy_from_slice(&RECORD_MAGIC);
    let h = match decoded {
        Ok(h) => {
            let e = h.encode();
            let mut expect = raw;
            for r in RESERVED {
                expect[r].fill(0);
            }
            assert_eq!(
                e, expect,
                "re-encoded header differs outside the reserved bytes"
            );
            h
        }
        Err(_) => RecordHeader::decode(&raw).expect("a full header with magic decodes"),
    };
    assert_eq!(
        RecordHeader::decode(&h.encode()),
        Ok(h),
        "decode(encode(h)) != h"
    );

    // Build a record over the payload (whatever follows the header).
    let payload = data.get(RECORD_HEADER_LEN..).unwrap_or(&[]);
    let rec = record(&h.id, h.flags, h.raw_len, payload);
    assert_eq!(rec.len(), RECORD_HEADER_LEN + payload.len());
    assert_eq!(&rec[RECORD_HEADER_LEN..], payload);
    let rh = RecordHeader::decode(&rec).expect("a built record decodes");
    assert_eq!((rh.flags, rh.raw_len, rh.id), (h.flags, h.raw_len, h.id));
    assert_eq!(rh.stored_len as usize, payload.len());
    assert_eq!(
        rh.crc,
        crc(&rec[RECORD_HEADER_LEN..]),
        "a built record's CRC fails"
    );
    assert_eq!(
        rec[..RECORD_HEADER_LEN],
        record_header(&h.id, h.flags, h.raw_len, payload)
    );

    if !payload.is_empty() {
        // CRC-32 detects every single-bit error: flip one, chosen by the input.
        let mut bad = payload.to_vec();
        let bit = (h.crc as usize) % (bad.len() * 8);
        bad[bit / 8] ^= 1 << (bit % 8);
        assert_ne!(crc(&bad), rh.crc, "a flipped payload bit kept the CRC");
    }

    // A valid record (length and CRC match, reserved bytes zero) is exactly what
    // record() writes for its fields.
    if well_formed
        && h.stored_len as usize == payload.len()
        && h.crc == crc(payload)
        && RESERVED
            .iter()
            .all(|r| data[r.clone()].iter().all(|&b| b == 0))
    {
        assert_eq!(rec, data, "a valid record is not what record() builds");
    }

    // The pack header's documented layout.
    let id = h.raw_len as u64 | (h.stored_len as u64) << 32;
    let ph = pack_header(id);
    assert_eq!(ph[0..8], PACK_MAGIC);
    assert_eq!(
        u32::from_be_bytes(ph[8..12].try_into().unwrap()),
        PACK_VERSION
    );
    assert_eq!(u64::from_be_bytes(ph[16..24].try_into().unwrap()), id);
});
