//! The receiver's store pipeline (issue 10, the seed's throughput): a CHUNKS
//! frame is stored on a worker thread while the next frame is read.  These
//! tests speak the wire protocol to a real `drclone serve` and send frames
//! without waiting for their replies, as the agent does, to check that:
//! * replies come in the order of the frames they answer, each right;
//! * a HAVE read while a frame is being stored counts that frame's chunks as
//!   held (they are not asked for twice), and the cycle commits them;
//! * a chunk the worker refuses (its data hashes to another id) reaches the
//!   sender as an ERROR naming it, in place of that frame's STORED; no point
//!   is made; what earlier frames stored is kept, so the next cycle does not
//!   send it again.

mod common;

use common::*;
use std::net::TcpStream;

use drclone::repl::wire::{self, Entry, WireChunk};

const CS: usize = 64 << 10;
const BLOCKS: usize = 64;

fn id(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// Connect, handshake, HELLO for g/d (`BLOCKS` blocks), WELCOME.
fn hello(t: &Site) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", t.repl)).unwrap();
    wire::write_handshake(&mut s).unwrap();
    wire::read_handshake(&mut s).unwrap();
    let h = wire::Hello {
        token: None,
        group: "g".into(),
        volumes: vec![("d".into(), (BLOCKS * CS) as u64)],
        source: "agent:pipeline-test".into(),
        epoch: None,
    };
    wire::write_frame(&mut s, wire::HELLO, &serde_json::to_vec(&h).unwrap()).unwrap();
    let (ty, body) = wire::read_frame(&mut s).unwrap();
    assert_eq!(ty, wire::WELCOME, "{}", String::from_utf8_lossy(&body));
    let w: wire::Welcome = serde_json::from_slice(&body).unwrap();
    assert_eq!(w.chunk_size, CS as u64);
    s
}

/// The next frame's type and body.
fn reply(s: &mut TcpStream) -> (u8, Vec<u8>) {
    wire::read_frame(s).unwrap()
}

/// A MAP body for d: block i holds `ids[i]`.
fn map_of(ids: &[[u8; 32]]) -> Vec<u8> {
    let map: Vec<Entry> = ids
        .iter()
        .enumerate()
        .map(|(b, id)| Entry::Data {
            block: b as u64,
            id: *id,
        })
        .collect();
    wire::encode_map("d", &map)
}

fn chunks(blocks: &[&Vec<u8>]) -> Vec<u8> {
    let c: Vec<WireChunk> = blocks.iter().map(|d| wire::pack(id(d), d)).collect();
    wire::encode_chunks(&c)
}

#[test]
fn pipelined_frames_get_their_replies_in_order_and_a_chunk_in_flight_counts_as_held() {
    let t = Site::new();
    let blocks: Vec<Vec<u8>> = (0..BLOCKS)
        .map(|b| random_bytes(100 + b as u64, CS))
        .collect();
    let ids: Vec<[u8; 32]> = blocks.iter().map(|d| id(d)).collect();
    let mut s = hello(&t);
    // Four rounds, each offering its 16 blocks plus the last 4 of the round
    // before (sent in the CHUNKS frame just before it: in flight, or just
    // stored); no reply is read until all frames are out.
    let per = BLOCKS / 4;
    let mut expect: Vec<(u8, Vec<u8>)> = Vec::new();
    for r in 0..4 {
        let mut offer: Vec<[u8; 32]> = ids[r * per..(r + 1) * per].to_vec();
        let mut lack = vec![true; per];
        if r > 0 {
            offer.extend_from_slice(&ids[r * per - 4..r * per]);
            lack.extend([false; 4]);
        }
        wire::write_frame(&mut s, wire::HAVE, &wire::encode_ids(&offer)).unwrap();
        expect.push((wire::LACK, wire::encode_bits(&lack)));
        let frame: Vec<&Vec<u8>> = blocks[r * per..(r + 1) * per].iter().collect();
        wire::write_frame(&mut s, wire::CHUNKS, &chunks(&frame)).unwrap();
        expect.push((wire::STORED, (per as u32).to_be_bytes().to_vec()));
    }
    wire::write_frame(&mut s, wire::MAP, &map_of(&ids)).unwrap();
    let commit = wire::Commit {
        label: Some("pipelined".into()),
        app: false,
        source_point: None,
        time: None,
    };
    wire::write_frame(&mut s, wire::COMMIT, &serde_json::to_vec(&commit).unwrap()).unwrap();
    for (i, (ty, body)) in expect.iter().enumerate() {
        let (gt, gb) = reply(&mut s);
        assert_eq!(
            (gt, &gb),
            (*ty, body),
            "reply {i} (frame order: HAVE, CHUNKS per round)"
        );
    }
    let (ty, body) = reply(&mut s);
    assert_eq!(ty, wire::COMMITTED, "{}", String::from_utf8_lossy(&body));
    let done: wire::Committed = serde_json::from_slice(&body).unwrap();
    drop(s);
    assert!(
        t.export(&format!("g/d@{}", done.point)) == blocks.concat(),
        "the point holds every block"
    );
}

#[test]
fn a_chunk_refused_by_the_store_worker_ends_the_cycle_with_its_error_and_no_point() {
    let t = Site::new();
    let good: Vec<Vec<u8>> = (0..8).map(|b| random_bytes(200 + b, CS)).collect();
    let liar = random_bytes(300, CS);
    let claimed = random_bytes(301, CS);
    let mut s = hello(&t);
    let mut offer: Vec<[u8; 32]> = good.iter().map(|d| id(d)).collect();
    offer.push(id(&claimed));
    wire::write_frame(&mut s, wire::HAVE, &wire::encode_ids(&offer)).unwrap();
    // A good frame, then one whose chunk says it is `claimed` but holds
    // other data, then a MAP and a COMMIT, all before any reply is read.
    let frame: Vec<&Vec<u8>> = good.iter().collect();
    wire::write_frame(&mut s, wire::CHUNKS, &chunks(&frame)).unwrap();
    let lie = wire::WireChunk {
        id: id(&claimed),
        raw_len: CS as u32,
        codec: wire::CODEC_RAW,
        payload: liar.clone(),
    };
    wire::write_frame(&mut s, wire::CHUNKS, &wire::encode_chunks(&[lie])).unwrap();
    // The receiver may have closed by now: these writes may fail.
    let _ = wire::write_frame(&mut s, wire::MAP, &map_of(&offer));
    let commit = wire::Commit {
        label: None,
        app: false,
        source_point: None,
        time: None,
    };
    let _ = wire::write_frame(&mut s, wire::COMMIT, &serde_json::to_vec(&commit).unwrap());
    let (ty, _) = reply(&mut s);
    assert_eq!(ty, wire::LACK);
    let (ty, body) = reply(&mut s);
    assert_eq!((ty, body), (wire::STORED, 8u32.to_be_bytes().to_vec()));
    let (ty, body) = reply(&mut s);
    let text = String::from_utf8_lossy(&body);
    assert_eq!(ty, wire::ERROR, "{text}");
    assert!(
        text.contains("does not match its data"),
        "the error names the lying chunk: {text}"
    );
    drop(s);
    let pts = t.env.json(&["--json", "point", "list", "g"]);
    assert_eq!(pts.as_array().unwrap().len(), 0, "no point: {pts}");
    // The next cycle: the good frame's chunks are held, the lying one is not.
    let mut s = hello(&t);
    wire::write_frame(&mut s, wire::HAVE, &wire::encode_ids(&offer)).unwrap();
    let (ty, body) = reply(&mut s);
    assert_eq!(ty, wire::LACK);
    let mut lack = vec![false; 8];
    lack.push(true);
    assert_eq!(wire::decode_bits(&body, 9).unwrap(), lack);
}
