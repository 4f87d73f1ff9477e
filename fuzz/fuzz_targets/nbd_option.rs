//! The NBD handshake (src/nbd/proto.rs) from arbitrary bytes.
//!
//! The input is read as what a client sends after the server's greeting: the
//! 4-byte client flags, then option messages (16-byte header: IHAVEOPT, option,
//! length; then the payload), framed the way the server reads them.  Each payload
//! goes to the decoder for its option, and to every other option decoder too.
//! Properties:
//! - no decoder panics;
//! - `client_flags` accepts exactly the known bits (fixed newstyle, no zeroes) and
//!   re-encodes to its input; `option_header` accepts exactly 16+ bytes starting
//!   with IHAVEOPT and re-encodes to them;
//! - every string a decoder returns is a spec string: UTF-8, no NUL, at most
//!   `MAX_STRING` bytes; `parse_export_name` accepts exactly such strings;
//! - the INFO/GO and meta-context decoders are strict: whatever they accept
//!   re-encodes to exactly the payload (no trailing byte is accepted), within
//!   their limits (up to 1024 queries);
//! - names and queries taken from the input, encoded the way a client does,
//!   decode back when they are spec strings, and are refused otherwise;
//! - the option reply for a decoded option has the documented layout.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/nbd/proto.rs"]
mod proto;

use proto::*;

fn string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The client side of `NBD_OPT_INFO`/`NBD_OPT_GO`.
fn encode_info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    string32(&mut v, name);
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// The client side of `NBD_OPT_{LIST,SET}_META_CONTEXT`.
fn encode_meta_request(name: &str, queries: &[String]) -> Vec<u8> {
    let mut v = Vec::new();
    string32(&mut v, name);
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        string32(&mut v, q);
    }
    v
}

fn option_header_bytes(opt: u32, len: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    h[8..12].copy_from_slice(&opt.to_be_bytes());
    h[12..16].copy_from_slice(&len.to_be_bytes());
    h
}

/// A spec string: UTF-8 (guaranteed by `str`), no NUL, at most `MAX_STRING` bytes.
fn spec_string(s: &str) -> bool {
    s.len() <= MAX_STRING && !s.contains('\0')
}

fn check_client_flags(b: &[u8]) {
    let got = client_flags(b);
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    let raw = b
        .get(..4)
        .map(|f| u32::from_be_bytes(f.try_into().unwrap()));
    assert_eq!(
        got.is_ok(),
        raw.is_some_and(|f| f & !known == 0),
        "client_flags: {got:?}"
    );
    if let Ok(f) = got {
        let back = (f.fixed_newstyle as u32 * FLAG_C_FIXED_NEWSTYLE)
            | (f.no_zeroes as u32 * FLAG_C_NO_ZEROES);
        assert_eq!(Some(back), raw, "client flags do not re-encode");
    }
}

/// Every option decoder on one payload.
fn check_payload(payload: &[u8]) {
    let name = parse_export_name(payload);
    let valid = std::str::from_utf8(payload).is_ok_and(spec_string);
    assert_eq!(name.is_ok(), valid, "parse_export_name: {name:?}");
    if let Ok(name) = name {
        assert_eq!(name.as_bytes(), payload);
    }
    if let Ok((name, infos)) = parse_info_request(payload) {
        assert!(spec_string(&name));
        assert_eq!(
            encode_info_request(&name, &infos),
            payload,
            "INFO/GO re-encoding"
        );
    }
    if let Ok((name, queries)) = parse_meta_request(payload) {
        assert!(spec_string(&name) && queries.len() <= 1024);
        assert!(queries.iter().all(|q| spec_string(q)));
        assert_eq!(
            encode_meta_request(&name, &queries),
            payload,
            "meta-context re-encoding"
        );
    }
    // A bounded reader never hands out more than it has.
    let mut r = Reader::new(payload);
    let mut taken = 0;
    while let Ok(s) = r.string32() {
        assert!(spec_string(&s));
        taken += 4 + s.len();
        assert_eq!(r.remaining(), payload.len() - taken);
    }
}

/// One option, dispatched as the server does.
fn check_option(opt: u32, payload: &[u8]) {
    match opt {
        OPT_EXPORT_NAME => drop(parse_export_name(payload)),
        OPT_INFO | OPT_GO => drop(parse_info_request(payload)),
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => drop(parse_meta_request(payload)),
        _ => {}
    }
    check_payload(payload);
    let reply = option_reply(opt, REP_ERR_UNSUP, payload);
    let mut r = Reader::new(&reply);
    assert_eq!(r.u64(), Ok(OPT_REPLY_MAGIC));
    assert_eq!(r.u32(), Ok(opt));
    assert_eq!(r.u32(), Ok(REP_ERR_UNSUP));
    assert_eq!(r.u32(), Ok(payload.len() as u32));
    assert_eq!(r.take(payload.len()), Ok(payload));
    assert_eq!(r.remaining(), 0);
}

/// Names and queries cut from the input's text, sent as a client would.
fn check_client_encodings(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mid = text
        .char_indices()
        .nth(text.chars().count() / 2)
        .map_or(text.len(), |(i, _)| i);
    let (name, rest) = text.split_at(mid);
    let infos: Vec<u16> = data
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .take(64)
        .collect();
    let got = parse_info_request(&encode_info_request(name, &infos));
    if spec_string(name) {
        assert_eq!(got, Ok((name.to_string(), infos)));
    } else {
        assert!(got.is_err());
    }
    let queries: Vec<String> = rest.split(',').map(str::to_string).collect();
    let got = parse_meta_request(&encode_meta_request(name, &queries));
    if spec_string(name) && queries.len() <= 1024 && queries.iter().all(|q| spec_string(q)) {
        assert_eq!(got, Ok((name.to_string(), queries)));
    } else {
        assert!(got.is_err());
    }
    // Replies naming it carry it verbatim.
    assert_eq!(rep_server(name)[4..], *name.as_bytes());
    assert_eq!(info_name(name)[2..], *name.as_bytes());
    assert_eq!(rep_meta_context(1, rest)[4..], *rest.as_bytes());
}

fuzz_target!(|data: &[u8]| {
    check_client_flags(data);
    let mut rest = data.get(4..).unwrap_or(&[]);
    // The options, framed as the server reads them.
    while !rest.is_empty() {
        let header = option_header(rest);
        let well_formed = rest.len() >= 16 && rest[0..8] == IHAVEOPT.to_be_bytes();
        assert_eq!(header.is_ok(), well_formed, "option_header: {header:?}");
        let Ok((opt, len)) = header else { break };
        assert_eq!(option_header_bytes(opt, len), rest[..16]);
        // The server drops a client whose option is over MAX_OPTION_LEN (or short).
        let Some(payload) = rest[16..]
            .get(..len as usize)
            .filter(|_| len <= MAX_OPTION_LEN)
        else {
            check_payload(&rest[16..]);
            break;
        };
        check_option(opt, payload);
        rest = &rest[16 + payload.len()..];
    }
    check_payload(data);
    check_client_encodings(data);
});
