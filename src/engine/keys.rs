//! The one key codec for the metadata database.
//!
//! RocksDB orders keys bytewise, so every integer in a key is big-endian and every
//! key starts with a one-byte table tag.  Nothing outside this module builds or
//! parses a key by hand.
//!
//! | tag | key                                   | value                          |
//! |-----|---------------------------------------|--------------------------------|
//! | `G` | group name                            | [`crate::engine::meta::GroupRec`]      |
//! | `V` | group `\0` disk                       | [`crate::engine::meta::VolumeRec`]     |
//! | `L` | lineage u64                           | [`crate::engine::meta::LineageRec`]    |
//! | `P` | group `\0` point id u64               | [`crate::engine::meta::PointRec`]      |
//! | `M` | lineage u64, block u64, !epoch u64    | [`crate::engine::meta::MapVal`]        |
//! | `C` | chunk id (32 bytes)                   | [`crate::engine::meta::ChunkLoc`]      |
//! | `R` | pack u64, offset u64                  | chunk id (32 bytes)            |
//! | `K` | pack u64                              | [`crate::engine::meta::PackRec`]       |
//! | `N` | counter name                          | u64 (next value)               |
//! | `J` | segment u64, lineage u64, block u64   | offset u64, epoch u64: the journal horizon |
//! | `D` | pack u64                              | u64: bytes of an unsealed pack known durable |
//! | `S` | setting name                          | its value: `chunk_size` (u32), recorded at init |
//! | `X` | drill id u64                          | a drill record (JSON, owned by `crate::dr::drill`) |
//! | `A` | sequence u64                          | an audit entry (JSON, owned by `crate::dr::audit`) |
//!
//! A `J` key says: "the records of (lineage, block) that start before journal
//! position (segment, offset) are in the block map".  It is written in the same
//! batch as the map entry that absorbed them (destage, or a whole-block write over
//! pages), so it is durable exactly when that entry is; replay skips what it covers.
//!
//! `!epoch` is `u64::MAX - epoch`, so within one (lineage, block) the newest version
//! sorts first and "newest version at or below epoch E" is a single seek to
//! `(lineage, block, !E)`.

pub const GROUP: u8 = b'G';
pub const VOLUME: u8 = b'V';
pub const LINEAGE: u8 = b'L';
pub const POINT: u8 = b'P';
pub const MAP: u8 = b'M';
pub const CHUNK: u8 = b'C';
pub const REVERSE: u8 = b'R';
pub const PACK: u8 = b'K';
pub const COUNTER: u8 = b'N';
pub const HORIZON: u8 = b'J';
pub const DURABLE: u8 = b'D';
pub const SETTING: u8 = b'S';
pub const DRILL: u8 = b'X';
pub const AUDIT: u8 = b'A';
/// Chunks a crash lost whose map entries are not yet repaired (§8, I11).
pub const LOST: u8 = b'Q';

pub type ChunkId = [u8; 32];

fn with_tag(tag: u8, cap: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(cap + 1);
    k.push(tag);
    k
}

pub fn group(name: &str) -> Vec<u8> {
    let mut k = with_tag(GROUP, name.len());
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn volume(group: &str, disk: &str) -> Vec<u8> {
    let mut k = volume_prefix(group);
    k.extend_from_slice(disk.as_bytes());
    k
}

/// Prefix of every volume key of a group.
pub fn volume_prefix(group: &str) -> Vec<u8> {
    let mut k = with_tag(VOLUME, group.len() + 1);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k
}

/// Split a volume key into (group, disk).
pub fn parse_volume(key: &[u8]) -> Option<(String, String)> {
    let rest = key.strip_prefix(&[VOLUME])?;
    let nul = rest.iter().position(|&b| b == 0)?;
    Some((
        String::from_utf8(rest[..nul].to_vec()).ok()?,
        String::from_utf8(rest[nul + 1..].to_vec()).ok()?,
    ))
}

pub fn lineage(id: u64) -> Vec<u8> {
    let mut k = with_tag(LINEAGE, 8);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn parse_lineage(key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(&[LINEAGE])?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// The key of a store setting (`chunk_size`): a copy of what `store.json`
/// says, to catch an edited or swapped `store.json`.
pub fn setting(name: &str) -> Vec<u8> {
    let mut k = with_tag(SETTING, name.len());
    k.extend_from_slice(name.as_bytes());
    k
}

/// The key of record `id` in a record table ([`DRILL`], [`AUDIT`]).
pub fn record(table: u8, id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = table;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

pub fn point_prefix(group: &str) -> Vec<u8> {
    let mut k = with_tag(POINT, group.len() + 1);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k
}

pub fn point(group: &str, id: u64) -> Vec<u8> {
    let mut k = point_prefix(group);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The map key of `(lineage, block)` at `epoch`.
pub fn map(lineage: u64, block: u64, epoch: u64) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[0] = MAP;
    k[1..9].copy_from_slice(&lineage.to_be_bytes());
    k[9..17].copy_from_slice(&block.to_be_bytes());
    k[17..25].copy_from_slice(&(u64::MAX - epoch).to_be_bytes());
    k
}

/// Prefix of every map key of one lineage.
pub fn map_lineage_prefix(lineage: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = MAP;
    k[1..9].copy_from_slice(&lineage.to_be_bytes());
    k
}

/// Decode a map key into (lineage, block, epoch).
pub fn parse_map(key: &[u8]) -> Option<(u64, u64, u64)> {
    if key.len() != 25 || key[0] != MAP {
        return None;
    }
    let l = u64::from_be_bytes(key[1..9].try_into().ok()?);
    let b = u64::from_be_bytes(key[9..17].try_into().ok()?);
    let e = u64::MAX - u64::from_be_bytes(key[17..25].try_into().ok()?);
    Some((l, b, e))
}

pub fn chunk(id: &ChunkId) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = CHUNK;
    k[1..].copy_from_slice(id);
    k
}

pub fn parse_chunk(key: &[u8]) -> Option<ChunkId> {
    if key.len() != 33 || key[0] != CHUNK {
        return None;
    }
    key[1..].try_into().ok()
}

pub fn reverse(pack: u64, offset: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = REVERSE;
    k[1..9].copy_from_slice(&pack.to_be_bytes());
    k[9..17].copy_from_slice(&offset.to_be_bytes());
    k
}

pub fn reverse_prefix(pack: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = REVERSE;
    k[1..9].copy_from_slice(&pack.to_be_bytes());
    k
}

pub fn parse_reverse(key: &[u8]) -> Option<(u64, u64)> {
    if key.len() != 17 || key[0] != REVERSE {
        return None;
    }
    Some((
        u64::from_be_bytes(key[1..9].try_into().ok()?),
        u64::from_be_bytes(key[9..17].try_into().ok()?),
    ))
}

pub fn pack(id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = PACK;
    k[1..9].copy_from_slice(&id.to_be_bytes());
    k
}

pub fn parse_pack(key: &[u8]) -> Option<u64> {
    if key.len() != 9 || key[0] != PACK {
        return None;
    }
    Some(u64::from_be_bytes(key[1..9].try_into().ok()?))
}

pub fn counter(name: &str) -> Vec<u8> {
    let mut k = with_tag(COUNTER, name.len());
    k.extend_from_slice(name.as_bytes());
    k
}

/// The smallest key greater than every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

/// `D|pack`: how many bytes of an unsealed pack a successful sync covered.
/// Written in the batch that first points at them; recovery trusts nothing of an
/// unsealed pack beyond it (a restart after a failed sync must not trust pages the
/// kernel may have dropped).
pub fn durable(pack: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = DURABLE;
    k[1..9].copy_from_slice(&pack.to_be_bytes());
    k
}

/// `Q|chunk id`: a chunk whose record a crash lost.  Written in the recovery
/// batch that drops its index entry, deleted in the batch that repairs the map
/// entries using it, so a cut between the two still repairs them (§8, I11).
pub fn lost(id: &ChunkId) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = LOST;
    k[1..33].copy_from_slice(id);
    k
}

/// `J|segment|lineage|block`: the journal horizon of a block (see the table above).
pub fn horizon(segment: u64, lineage: u64, block: u64) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[0] = HORIZON;
    k[1..9].copy_from_slice(&segment.to_be_bytes());
    k[9..17].copy_from_slice(&lineage.to_be_bytes());
    k[17..25].copy_from_slice(&block.to_be_bytes());
    k
}

/// `(segment, lineage, block)` of a `J` key.
pub fn parse_horizon(key: &[u8]) -> Option<(u64, u64, u64)> {
    if key.len() != 25 || key[0] != HORIZON {
        return None;
    }
    let be = |r: std::ops::Range<usize>| u64::from_be_bytes(key[r].try_into().unwrap());
    Some((be(1..9), be(9..17), be(17..25)))
}

/// The first `J` key of segments after `segment` (delete `[J, this)` to drop the
/// horizons of every segment up to and including `segment`).
pub fn horizon_after(segment: u64) -> Vec<u8> {
    let mut k = vec![HORIZON];
    k.extend_from_slice(&(segment + 1).to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keys_sort_newest_first_and_round_trip() {
        let a = map(7, 3, 10);
        let b = map(7, 3, 2);
        let c = map(7, 4, 100);
        assert!(a < b, "newer epoch sorts first");
        assert!(b < c, "blocks sort ascending");
        assert_eq!(parse_map(&a), Some((7, 3, 10)));
        assert!(a.starts_with(&map_lineage_prefix(7)));
        assert!(map(8, 0, 0) > c);
    }

    #[test]
    fn names_round_trip_and_prefixes_bound() {
        let k = volume("app1", "disk0");
        assert_eq!(parse_volume(&k), Some(("app1".into(), "disk0".into())));
        assert!(k.starts_with(&volume_prefix("app1")));
        assert!(!volume("app10", "x").starts_with(&volume_prefix("app1")));
        assert_eq!(prefix_end(&[1, 2, 0xff]), vec![1, 3]);
        assert_eq!(parse_reverse(&reverse(5, 9)), Some((5, 9)));
        assert_eq!(parse_pack(&pack(5)), Some(5));
        assert_eq!(parse_lineage(&lineage(42)), Some(42));
        assert_eq!(parse_chunk(&chunk(&[3u8; 32])), Some([3u8; 32]));
        assert_eq!(parse_map(&[0u8; 3]), None);
    }
}
