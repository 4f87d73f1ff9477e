//! Stamped data: every 16-byte unit a test writes names the write that produced it
//! and its own position, so a unit read back identifies its writer (or shows that
//! it is misplaced or garbage).
//!
//! Unit layout (little-endian): write id u32 | volume tag u32 | unit index u64.
//! Write id 0 is "zeros" (a unit of sixteen zero bytes).  Writes and zeroings are
//! kept 16-byte aligned so that a unit is never half of one write and half of
//! another; below 16 bytes the model cannot tell writers apart.

use std::collections::HashMap;

/// Bytes per stamped unit.
pub const UNIT: u64 = 16;
/// A unit that is neither zeros nor a stamp of the write and position it claims.
pub const GARBAGE: u32 = u32::MAX;

/// The bytes of write `w` into a volume tagged `tag`, over units `u0..u1` (unit
/// indexes within the volume).  `w == 0` gives zeros.
pub fn stamp(w: u32, tag: u32, u0: usize, u1: usize) -> Vec<u8> {
    let mut out = vec![0u8; (u1 - u0) * UNIT as usize];
    if w == 0 {
        return out;
    }
    for (i, c) in out.chunks_exact_mut(UNIT as usize).enumerate() {
        c[0..4].copy_from_slice(&w.to_le_bytes());
        c[4..8].copy_from_slice(&tag.to_le_bytes());
        c[8..16].copy_from_slice(&((u0 + i) as u64).to_le_bytes());
    }
    out
}

/// Decode units read at unit `u0`: the write id of each, 0 for zeros, or
/// [`GARBAGE`].  `tags` maps each write id to the tag of the volume it was
/// written into.
pub fn decode(buf: &[u8], u0: usize, tags: &HashMap<u32, u32>) -> Vec<u32> {
    buf.chunks_exact(UNIT as usize)
        .enumerate()
        .map(|(i, c)| {
            let w = u32::from_le_bytes(c[0..4].try_into().unwrap());
            let tag = u32::from_le_bytes(c[4..8].try_into().unwrap());
            let pos = u64::from_le_bytes(c[8..16].try_into().unwrap());
            if w == 0 && tag == 0 && pos == 0 {
                0
            } else if pos == (u0 + i) as u64 && tags.get(&w) == Some(&tag) {
                w
            } else {
                GARBAGE
            }
        })
        .collect()
}

/// Describe a unit value for reports.
pub fn show(v: u32) -> String {
    match v {
        0 => "zeros".into(),
        GARBAGE => "garbage".into(),
        w => format!("w{w}"),
    }
}
