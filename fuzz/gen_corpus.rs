//! Writes the synthetic seed corpus under fuzz/corpus/<target>/ from the real
//! encoders (the libnbd handshakes, `libnbd-*`, come from capture_nbd_options.py).
//! Run from the repository root:
//!   cargo run --release --manifest-path fuzz/Cargo.toml --example gen_corpus
//! Seeds are small valid messages and records, plus a few torn or corrupt ones.

#[allow(dead_code)]
#[path = "../src/engine/format/journal.rs"]
mod journal_format;
#[allow(dead_code)]
#[path = "../src/engine/format/pack.rs"]
mod pack_format;
#[allow(dead_code)]
#[path = "../src/nbd/proto.rs"]
mod proto;

use std::path::Path;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn string32(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
}

fn option(opt: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = proto::IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// What a client sends after the greeting: its flags, then options.
fn handshake(flags: u32, options: &[Vec<u8>]) -> Vec<u8> {
    let mut v = flags.to_be_bytes().to_vec();
    for o in options {
        v.extend_from_slice(o);
    }
    v
}

fn nbd_option() {
    use proto::*;
    let both = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    let mut go = Vec::new();
    string32(&mut go, "app/db");
    go.extend_from_slice(&3u16.to_be_bytes());
    for i in [INFO_EXPORT, INFO_NAME, INFO_BLOCK_SIZE] {
        go.extend_from_slice(&i.to_be_bytes());
    }
    let mut meta = Vec::new();
    string32(&mut meta, "app/db@3");
    meta.extend_from_slice(&2u32.to_be_bytes());
    string32(&mut meta, BASE_ALLOCATION);
    string32(&mut meta, "qemu:dirty-bitmap:b0");
    let mut default_export = Vec::new();
    string32(&mut default_export, "");
    default_export.extend_from_slice(&0u16.to_be_bytes());
    let seeds = [
        (
            "go",
            vec![
                option(OPT_STRUCTURED_REPLY, &[]),
                option(OPT_SET_META_CONTEXT, &meta),
                option(OPT_GO, &go),
            ],
        ),
        (
            "info-then-go",
            vec![option(OPT_INFO, &go), option(OPT_GO, &default_export)],
        ),
        (
            "list-meta",
            vec![option(OPT_LIST_META_CONTEXT, &meta), option(OPT_ABORT, &[])],
        ),
        ("list", vec![option(OPT_LIST, &[]), option(OPT_ABORT, &[])]),
        ("export-name", vec![option(OPT_EXPORT_NAME, b"app/db")]),
        (
            "starttls-unsupported",
            vec![option(OPT_STARTTLS, &[]), option(OPT_GO, &go)],
        ),
        ("go-torn", vec![option(OPT_GO, &go[..go.len() - 1])]),
    ];
    for (name, opts) in seeds {
        write("nbd_option", name, &handshake(both, &opts));
    }
    write(
        "nbd_option",
        "oldstyle-flags",
        &handshake(0, &[option(OPT_EXPORT_NAME, b"")]),
    );
    write(
        "nbd_option",
        "unknown-flags",
        &handshake(0x103, &[option(OPT_GO, &go)]),
    );
}

fn nbd_request() {
    use proto::*;
    let reqs = [
        (0, CMD_READ, 0, 4096),
        (CMD_FLAG_FUA, CMD_WRITE, 1 << 20, 64),
        (0, CMD_FLUSH, 0, 0),
        (
            CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_WRITE_ZEROES,
            8192,
            1 << 20,
        ),
        (0, CMD_TRIM, 1 << 30, 1 << 16),
        (CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, u32::MAX),
        (CMD_FLAG_DF, CMD_READ, u64::MAX - 511, 512),
        (0, CMD_CACHE, 0, 4096),
        (CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 0, 0),
        (0, CMD_DISC, 0, 0),
    ];
    let mut stream = Vec::new();
    for (i, &(flags, typ, offset, length)) in reqs.iter().enumerate() {
        let r = Request {
            flags,
            typ,
            cookie: i as u64 + 1,
            offset,
            length,
        };
        let mut one = r.encode().to_vec();
        if let Payload::Data(n) = request_payload(&r) {
            one.extend((0..n).map(|b| b as u8));
        }
        write("nbd_request", &format!("cmd{typ}-flags{flags:#x}"), &one);
        stream.extend_from_slice(&one);
    }
    write("nbd_request", "stream", &stream);
    let big = Request {
        flags: 0,
        typ: CMD_WRITE,
        cookie: 99,
        offset: 0,
        length: MAX_PAYLOAD + 1,
    };
    write("nbd_request", "write-over-max-payload", &big.encode());
}

fn journal_segment() {
    use journal_format::*;
    let mut seg = SEGMENT_MAGIC.to_vec();
    seg.extend_from_slice(&SEGMENT_VERSION.to_be_bytes());
    seg.resize(SEGMENT_HEADER_LEN, 0);
    let header = seg.clone();
    let mut rec = Vec::new();
    let page: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
    for (kind, lineage, block, offset, data) in [
        (KIND_PAGES, 1, 0, 0, &page[..]),
        (KIND_PAGES, 1, 5, 4096, &[0xab; 100][..]),
        (KIND_TOMBSTONE, 1, 0, 0, &[][..]),
        (KIND_PAGES, 2, u64::MAX, 65024, &page[..64]),
    ] {
        encode_record(&mut rec, kind, lineage, block, offset, data);
        seg.extend_from_slice(&rec);
    }
    write("journal_segment", "records", &seg);
    write("journal_segment", "empty", &header);
    let mut torn = seg.clone();
    torn.truncate(seg.len() - 10);
    write("journal_segment", "torn-tail", &torn);
    let mut corrupt = seg.clone();
    corrupt[SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 3] ^= 0x10;
    write("journal_segment", "corrupt-first", &corrupt);
    let mut zeros = seg[..SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 512].to_vec();
    zeros.resize(zeros.len() + 64, 0); // a preallocated tail
    write("journal_segment", "zero-tail", &zeros);
}

fn pack_record() {
    use pack_format::*;
    let id: ChunkId = std::array::from_fn(|i| (i * 37) as u8);
    let payload: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
    write(
        "pack_record",
        "raw",
        &record(&id, 0, payload.len() as u32, &payload),
    );
    // Flags as in src/engine/codec.rs: 1 zstd, 2 lz4, 4 encrypted.
    write(
        "pack_record",
        "zstd",
        &record(&id, 1, 65536, &payload[..40]),
    );
    write(
        "pack_record",
        "lz4-encrypted",
        &record(&id, 6, 65536, &payload[..200]),
    );
    write("pack_record", "empty-payload", &record(&id, 0, 0, &[]));
    let mut bad = record(&id, 0, 64, &payload[..64]);
    bad[RECORD_HEADER_LEN + 5] ^= 1;
    write("pack_record", "bad-crc", &bad);
    let mut file = pack_header(42).to_vec();
    file.extend_from_slice(&record(&id, 0, 16, &payload[..16]));
    write("pack_record", "pack-file-start", &file);
}

fn main() {
    nbd_option();
    nbd_request();
    journal_segment();
    pack_record();
}
