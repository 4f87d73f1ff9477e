//! NBD transmission requests (src/nbd/proto.rs) from arbitrary bytes.
//!
//! The input is read as what a client sends after the handshake: 28-byte request
//! headers, each followed by the payload `request_payload` says it carries, framed
//! the way the server reads them.  Each header is checked against every set of
//! transmission flags the server can announce.  Properties:
//! - `Request::decode` never panics, and accepts exactly 28+ bytes starting with
//!   the request magic; encode(decode(b)) == b[..28], and decode(encode(r)) == r
//!   for any fields;
//! - `request_payload`: only WRITE carries one, of the request's length; what the
//!   server buffers (`Data`) is at most `MAX_PAYLOAD`, what it discards at most
//!   `MAX_DISCARDED_PAYLOAD`, anything longer drops the client;
//! - `check_request_flags` accepts exactly the flags `allowed_command_flags`
//!   allows, and that set follows the spec: never an unknown bit or
//!   `PAYLOAD_LEN`; FUA exactly when announced; DF only on READ; NO_HOLE and
//!   FAST_ZERO only on WRITE_ZEROES; REQ_ONE only on BLOCK_STATUS; and announcing
//!   more never allows less;
//! - the replies built for a request (simple, structured error, block status)
//!   have the documented layout and carry its cookie.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/nbd/proto.rs"]
mod proto;

use proto::*;

/// The transmission flag sets the server announces (src/nbd/server.rs
/// `transmission_flags`): base, + DF with structured replies, writable or
/// read-only.  The fuzzer adds its own below.
const BASE: u16 = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
const WRITABLE: u16 = TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
const SERVER_TFLAGS: [u16; 4] = [
    BASE | WRITABLE,
    BASE | WRITABLE | TF_SEND_DF,
    BASE | TF_READ_ONLY,
    BASE | TF_READ_ONLY | TF_SEND_DF,
];

const KNOWN_FLAGS: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap())
}

fn check_flags(req: &Request, tflags: u16) {
    let allowed = allowed_command_flags(req.typ, tflags);
    assert_eq!(
        allowed & !KNOWN_FLAGS,
        0,
        "unknown or PAYLOAD_LEN flag allowed: {allowed:#x}"
    );
    assert_eq!(
        allowed & CMD_FLAG_FUA != 0,
        tflags & TF_SEND_FUA != 0,
        "FUA vs SEND_FUA"
    );
    if allowed & CMD_FLAG_DF != 0 {
        assert!(
            req.typ == CMD_READ && tflags & TF_SEND_DF != 0,
            "DF on {}",
            req.typ
        );
    }
    if allowed & (CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO) != 0 {
        assert_eq!(req.typ, CMD_WRITE_ZEROES, "NO_HOLE/FAST_ZERO");
    }
    if allowed & CMD_FLAG_FAST_ZERO != 0 {
        assert_ne!(tflags & TF_SEND_FAST_ZERO, 0);
    }
    if allowed & CMD_FLAG_REQ_ONE != 0 {
        assert_eq!(req.typ, CMD_BLOCK_STATUS, "REQ_ONE");
    }
    for more in [
        TF_SEND_FUA,
        TF_SEND_DF,
        TF_SEND_WRITE_ZEROES,
        TF_SEND_FAST_ZERO,
        !0,
    ] {
        let wider = allowed_command_flags(req.typ, tflags | more);
        assert_eq!(allowed & !wider, 0, "announcing {more:#x} took flags away");
    }
    let ok = check_request_flags(req, tflags);
    assert_eq!(
        ok.is_ok(),
        req.flags & !allowed == 0,
        "check_request_flags: {ok:?}"
    );
}

fn check_payload(req: &Request) -> Payload {
    let p = request_payload(req);
    match p {
        Payload::None => assert!(req.typ != CMD_WRITE || req.length == 0),
        Payload::Data(n) | Payload::Discard(n) | Payload::TooLarge(n) => {
            assert_eq!(req.typ, CMD_WRITE);
            assert_eq!(n, req.length);
            assert_ne!(n, 0);
        }
    }
    match p {
        Payload::Data(n) => assert!(n <= MAX_PAYLOAD),
        Payload::Discard(n) => assert!(n > MAX_PAYLOAD && n <= MAX_DISCARDED_PAYLOAD),
        Payload::TooLarge(n) => assert!(n > MAX_DISCARDED_PAYLOAD),
        Payload::None => {}
    }
    p
}

fn check_replies(req: &Request, tail: &[u8]) {
    let s = simple_reply(req.cookie, EIO);
    assert_eq!(be32(&s[0..4]), SIMPLE_REPLY_MAGIC);
    assert_eq!(be32(&s[4..8]), EIO);
    assert_eq!(be64(&s[8..16]), req.cookie);

    // An error message made of the bytes that follow, cut to 4096 bytes.
    let msg = String::from_utf8_lossy(tail);
    let e = structured_error(req.cookie, EINVAL, &msg);
    assert_eq!(be32(&e[0..4]), STRUCTURED_REPLY_MAGIC);
    assert_eq!(be16(&e[4..6]), REPLY_FLAG_DONE);
    assert_eq!(be16(&e[6..8]), REPLY_TYPE_ERROR);
    assert_eq!(be64(&e[8..16]), req.cookie);
    let len = be32(&e[16..20]) as usize;
    assert_eq!(e.len(), 20 + len);
    let mlen = be16(&e[24..26]) as usize;
    assert_eq!(len, 6 + mlen);
    assert_eq!(mlen, msg.len().min(4096));
    assert_eq!(e[26..], msg.as_bytes()[..mlen]);

    // One extent descriptor per 8 bytes that follow.
    let extents: Vec<(u32, u32)> = tail
        .chunks_exact(8)
        .take(64)
        .map(|c| (be32(&c[0..4]), be32(&c[4..8])))
        .collect();
    let bs = block_status(req.cookie, 1, &extents);
    assert_eq!(be16(&bs[6..8]), REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(be64(&bs[8..16]), req.cookie);
    assert_eq!(be32(&bs[16..20]) as usize, 4 + 8 * extents.len());
    assert_eq!(bs.len(), 24 + 8 * extents.len());
    for (i, (l, f)) in extents.iter().enumerate() {
        let d = &bs[24 + 8 * i..32 + 8 * i];
        assert_eq!((be32(&d[0..4]), be32(&d[4..8])), (*l, *f));
    }
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut first = true;
    loop {
        let decoded = Request::decode(rest);
        let well_formed = rest.len() >= REQUEST_LEN && rest[0..4] == REQUEST_MAGIC.to_be_bytes();
        assert_eq!(decoded.is_ok(), well_formed, "decode: {decoded:?}");
        if rest.len() >= REQUEST_LEN {
            // Whatever the magic, the fields round trip through the encoder.
            let mut fixed: [u8; REQUEST_LEN] = rest[..REQUEST_LEN].try_into().unwrap();
            fixed[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            let r = Request::decode(&fixed).expect("a full header with magic decodes");
            assert_eq!(Request::decode(&r.encode()), Ok(r));
            assert_eq!(r.encode(), fixed);
        }
        let Ok(req) = decoded else { break };
        assert_eq!(req.encode(), rest[..REQUEST_LEN], "encode(decode(b)) != b");
        let tail = &rest[REQUEST_LEN..];
        // The announced sets, and one made of the request's own cookie.
        for tflags in SERVER_TFLAGS.into_iter().chain([req.cookie as u16]) {
            check_flags(&req, tflags);
        }
        if first {
            check_replies(&req, tail);
            first = false;
        }
        rest = match check_payload(&req) {
            Payload::None => tail,
            Payload::Data(n) | Payload::Discard(n) => match tail.get(n as usize..) {
                Some(next) => next,
                None => break, // the client left mid-payload
            },
            Payload::TooLarge(_) => break,
        };
    }
});
