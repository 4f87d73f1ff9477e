//! Hostile NBD clients, in process: random sequences of well-framed and malformed
//! requests (unknown commands and flags, ranges past the end or wrapping around
//! u64, oversize lengths, bad magic, truncated payloads) against one export of a
//! store with two volumes.  The server must never panic, the neighbouring volume
//! must never change, and the store must stay usable afterwards.

use std::io::{Cursor, Write};
use std::sync::{Arc, Mutex};

use drclone::engine::store::{InitOptions, Store};
use drclone::nbd::proto::*;
use drclone::nbd::server::serve_connection;
use proptest::prelude::*;

const CS: u64 = 16384;
const VOL: u64 = 8 * CS;

#[derive(Debug, Clone)]
struct Req {
    magic_ok: bool,
    flags: u16,
    typ: u16,
    offset: u64,
    length: u32,
    /// Send fewer payload bytes than `length` says (the stream ends early).
    short_payload: bool,
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..VOL,
        Just(VOL),
        VOL..VOL + 4 * CS,
        Just(u64::MAX - 10),
        any::<u64>(),
    ]
}

fn length() -> impl Strategy<Value = u32> {
    prop_oneof![
        0..3 * CS as u32,
        Just(0),
        Just(VOL as u32),
        Just((32 << 20) + 1),
        Just(u32::MAX),
        any::<u32>(),
    ]
}

fn req() -> impl Strategy<Value = Req> {
    (
        prop::bool::weighted(0.97),
        prop_oneof![
            Just(0u16),
            Just(CMD_FLAG_FUA),
            Just(CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO),
            Just(CMD_FLAG_REQ_ONE),
            any::<u16>()
        ],
        prop_oneof![0..9u16, any::<u16>()],
        offset(),
        length(),
        prop::bool::weighted(0.03),
    )
        .prop_map(
            |(magic_ok, flags, typ, offset, length, short_payload)| Req {
                magic_ok,
                flags,
                typ,
                offset,
                length,
                short_payload,
            },
        )
}

/// A client that negotiates structured replies and base:allocation with NBD_OPT_GO,
/// then sends `reqs`.
fn client_bytes(export: &str, structured: bool, reqs: &[Req]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    let opt = |b: &mut Vec<u8>, o: u32, data: &[u8]| {
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
    };
    if structured {
        opt(&mut b, OPT_STRUCTURED_REPLY, &[]);
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        let q = b"base:allocation";
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
        opt(&mut b, OPT_SET_META_CONTEXT, &d);
    }
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    opt(&mut b, OPT_GO, &d);
    for (i, r) in reqs.iter().enumerate() {
        let magic = if r.magic_ok {
            REQUEST_MAGIC
        } else {
            0xdead_beef
        };
        b.extend_from_slice(&magic.to_be_bytes());
        b.extend_from_slice(&r.flags.to_be_bytes());
        b.extend_from_slice(&r.typ.to_be_bytes());
        b.extend_from_slice(&(i as u64).to_be_bytes());
        b.extend_from_slice(&r.offset.to_be_bytes());
        b.extend_from_slice(&r.length.to_be_bytes());
        if r.typ == CMD_WRITE && r.length <= 1 << 20 {
            let n = if r.short_payload {
                r.length / 2
            } else {
                r.length
            };
            b.extend(std::iter::repeat_n(
                0xa5u8.wrapping_add(i as u8),
                n as usize,
            ));
            if r.short_payload {
                break;
            }
        }
    }
    b
}

/// Collects what the server sends (and checks it never sends after a close).
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn run(reqs: Vec<Req>, structured: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    Store::init(
        &path,
        &InitOptions {
            chunk_size: CS as u32,
            ..Default::default()
        },
    )
    .unwrap();
    let store = Arc::new(Store::open(&path, None).unwrap());
    store.create_group("g").unwrap();
    store.create_volume("g", "target", VOL).unwrap();
    store.create_volume("g", "neighbour", VOL).unwrap();
    let n = store.view("g", "neighbour", None).unwrap();
    let pattern: Vec<u8> = (0..VOL).map(|i| (i * 7 % 251) as u8).collect();
    store.write(&n, 0, &pattern).unwrap();
    store
        .write(&n, 100, b"partial block in the overlay")
        .unwrap();
    let mut want = pattern.clone();
    want[100..128].copy_from_slice(b"partial block in the overlay");

    let input = client_bytes("g/target", structured, &reqs);
    let sink = Sink::default();
    serve_connection(
        store.clone(),
        Box::new(Cursor::new(input)),
        Box::new(sink.clone()),
        "proptest",
        None,
    );
    assert!(
        sink.0.lock().unwrap().starts_with(&NBDMAGIC.to_be_bytes()),
        "the server greets first"
    );
    // The neighbour is untouched; the target kept its size; the store still works.
    let n = store.view("g", "neighbour", None).unwrap();
    assert_eq!(store.read(&n, 0, VOL as usize).unwrap(), want);
    let t = store.view("g", "target", None).unwrap();
    assert_eq!(t.size, VOL);
    store.write(&t, 5, b"still writable").unwrap();
    store.flush().unwrap();
    assert_eq!(&store.read(&t, 5, 14).unwrap()[..], b"still writable");
    let rep = drclone::engine::maint::verify(&store, &indicatif::ProgressBar::hidden()).unwrap();
    assert!(rep.ok, "{:?}", rep.bad);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 100, ..ProptestConfig::default() })]

    #[test]
    fn hostile_requests_never_crash_or_escape_the_export(
        reqs in prop::collection::vec(req(), 1..40),
        structured in any::<bool>(),
    ) {
        run(reqs, structured);
    }
}

/// The harness itself: a well-formed client's write lands (so the random cases
/// above really reach the transmission phase).
#[test]
fn the_harness_negotiates_and_writes() {
    for structured in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        Store::init(&path, &InitOptions::default()).unwrap();
        let store = Arc::new(Store::open(&path, None).unwrap());
        store.create_group("g").unwrap();
        store.create_volume("g", "target", 1 << 20).unwrap();
        let w = Req {
            magic_ok: true,
            flags: CMD_FLAG_FUA,
            typ: CMD_WRITE,
            offset: 4096,
            length: 4096,
            short_payload: false,
        };
        let sink = Sink::default();
        serve_connection(
            store.clone(),
            Box::new(Cursor::new(client_bytes("g/target", structured, &[w]))),
            Box::new(sink.clone()),
            "harness",
            None,
        );
        let t = store.view("g", "target", None).unwrap();
        assert_eq!(store.read(&t, 4096, 4096).unwrap(), vec![0xa5u8; 4096]);
        let out = sink.0.lock().unwrap().clone();
        let magic = if structured {
            STRUCTURED_REPLY_MAGIC
        } else {
            SIMPLE_REPLY_MAGIC
        };
        assert!(
            out.windows(4).any(|w| w == magic.to_be_bytes()),
            "a reply to the write"
        );
    }
}
