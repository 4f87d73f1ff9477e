//! NBD protocol conformance of `drclone serve`, over a raw socket: every command
//! with every command flag, on a writable head and a read-only point, with and
//! without structured replies, on the `NBD_OPT_GO` and the old
//! `NBD_OPT_EXPORT_NAME` paths; plus the handshake findings (unknown client
//! flags, `SEND_DF` only with structured replies, zero-length structured READ).
//!
//! The expected answers come from a table written here from the spec
//! (NetworkBlockDevice/nbd `doc/proto.md`, "Command flags", "Request types",
//! "Transmission flags", "Error values"), not from the server's own table.

mod common;
mod nbd_raw;

use common::*;
use drclone::nbd::proto::*;
use nbd_raw::*;

const SIZE: u64 = 1 << 20;
const LEN: u32 = 4096;

fn setup(env: &Env) -> Daemon {
    env.ok(&["init"]);
    env.ok(&["group", "create", "g"]);
    env.ok(&["volume", "create", "g/d", "--size", "1M"]);
    env.ok(&["volume", "create", "g/e", "--size", "1M"]);
    env.ok(&["point", "create", "g"]);
    Daemon::start(&env.store, &env.path("nbd.sock"), &[], &[])
}

const COMMANDS: &[(u16, &str)] = &[
    (CMD_READ, "READ"),
    (CMD_WRITE, "WRITE"),
    (CMD_FLUSH, "FLUSH"),
    (CMD_TRIM, "TRIM"),
    (CMD_CACHE, "CACHE"),
    (CMD_WRITE_ZEROES, "WRITE_ZEROES"),
    (CMD_BLOCK_STATUS, "BLOCK_STATUS"),
    (8, "RESIZE (unsupported)"),
    (9, "unknown 9"),
    (0xffff, "unknown 0xffff"),
];

/// Every flag bit, one at a time, plus none.
fn flags() -> Vec<u16> {
    std::iter::once(0)
        .chain((0..16).map(|b| 1u16 << b))
        .collect()
}

/// The spec's answer: the error for `flag` on `cmd` given what was announced.
fn expected(cmd: u16, flag: u16, tflags: u16, writable: bool, meta: bool) -> u32 {
    let known = matches!(
        cmd,
        CMD_READ
            | CMD_WRITE
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_CACHE
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    );
    if !known {
        // "The server SHOULD return NBD_EINVAL if it receives an unknown command."
        return EINVAL;
    }
    let flag_ok = match flag {
        0 => true,
        // FUA: "valid for all commands, provided NBD_FLAG_SEND_FUA has been
        // negotiated, in which case the server MUST accept all commands with this
        // bit set".
        CMD_FLAG_FUA => tflags & TF_SEND_FUA != 0,
        CMD_FLAG_NO_HOLE => cmd == CMD_WRITE_ZEROES && tflags & TF_SEND_WRITE_ZEROES != 0,
        CMD_FLAG_DF => cmd == CMD_READ && tflags & TF_SEND_DF != 0,
        CMD_FLAG_REQ_ONE => cmd == CMD_BLOCK_STATUS,
        CMD_FLAG_FAST_ZERO => cmd == CMD_WRITE_ZEROES && tflags & TF_SEND_FAST_ZERO != 0,
        // PAYLOAD_LEN needs extended headers (not negotiated); bits 6..15 unknown.
        _ => false,
    };
    if !flag_ok {
        return EINVAL;
    }
    match cmd {
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if !writable => EPERM,
        CMD_BLOCK_STATUS if !meta => EINVAL,
        _ => 0,
    }
}

/// How a client got into transmission.
#[derive(Debug, Clone, Copy)]
enum Path {
    GoStructuredMeta,
    GoStructured,
    GoSimple,
    ExportName,
    ExportNameStructured,
}

fn connect(sock: &std::path::Path, export: &str, p: Path) -> (Client, bool) {
    match p {
        Path::GoStructuredMeta => (Client::go(sock, export, true, true), true),
        Path::GoStructured => (Client::go(sock, export, true, false), false),
        Path::GoSimple => (Client::go(sock, export, false, false), false),
        Path::ExportName => (Client::export_name(sock, export, false), false),
        Path::ExportNameStructured => (Client::export_name(sock, export, true), false),
    }
}

#[test]
fn every_command_with_every_flag_on_every_path() {
    let env = Env::new();
    let d = setup(&env);
    let payload = random_bytes(1, LEN as usize);
    let mut checked = 0;
    for export in ["g/d", "g/d@1"] {
        let writable = !export.contains('@');
        for p in [
            Path::GoStructuredMeta,
            Path::GoStructured,
            Path::GoSimple,
            Path::ExportName,
            Path::ExportNameStructured,
        ] {
            let (mut c, meta) = connect(&d.sock, export, p);
            let tf = c.tflags;
            let ctx = format!("{export} via {p:?} (flags {tf:#x})");
            // Transmission flags, per path.
            assert_eq!(c.size, SIZE, "{ctx}");
            assert_ne!(tf & TF_HAS_FLAGS, 0, "{ctx}");
            assert_eq!(
                tf & TF_SEND_DF != 0,
                c.structured,
                "SEND_DF iff structured: {ctx}"
            );
            assert_eq!(tf & TF_READ_ONLY != 0, !writable, "{ctx}");
            for f in [TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_SEND_FAST_ZERO] {
                assert_eq!(tf & f != 0, writable, "{f:#x}: {ctx}");
            }
            for f in [TF_SEND_FLUSH, TF_SEND_FUA, TF_CAN_MULTI_CONN, TF_SEND_CACHE] {
                assert_ne!(tf & f, 0, "{f:#x}: {ctx}");
            }
            // Bits this server has no feature for: ROTATIONAL, RESIZE, 12..15.
            assert_eq!(tf & (1 << 4 | 1 << 9 | 0xf000), 0, "{ctx}");
            for &(cmd, cname) in COMMANDS {
                for flag in flags() {
                    let want = expected(cmd, flag, tf, writable, meta);
                    let pl: &[u8] = if cmd == CMD_WRITE { &payload } else { &[] };
                    let (off, len) = if cmd == CMD_FLUSH { (0, 0) } else { (0, LEN) };
                    let r = c.call(flag, cmd, off, len, pl);
                    let what = format!("{cname} flags {flag:#06x} on {ctx}: {r:?}");
                    assert_eq!(r.error, want, "{what}");
                    // Structured replies were negotiated: a READ is never answered
                    // with a simple reply (not even an early EINVAL), and errors
                    // come as error chunks with a message.
                    if c.structured {
                        if cmd == CMD_READ {
                            assert!(r.structured, "{what}");
                        }
                        if r.structured && r.error != 0 {
                            assert_eq!(r.chunks.len(), 1, "{what}");
                            assert_eq!(r.chunks[0].1, REPLY_TYPE_ERROR, "{what}");
                        }
                    } else {
                        assert!(!r.structured, "{what}");
                    }
                    if cmd == CMD_READ && want == 0 {
                        assert_eq!(r.data.len(), LEN as usize, "{what}");
                        if c.structured {
                            // DF or not: one content chunk, 8 + LEN long.
                            assert_eq!(
                                r.chunks,
                                vec![(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8 + LEN)],
                                "{what}"
                            );
                        }
                    }
                    if cmd == CMD_BLOCK_STATUS && want == 0 {
                        assert_eq!(r.chunks.len(), 1, "{what}");
                        assert_eq!(r.chunks[0].1, REPLY_TYPE_BLOCK_STATUS, "{what}");
                        if flag == CMD_FLAG_REQ_ONE {
                            assert_eq!(r.chunks[0].2, 4 + 8, "one extent: {what}");
                        }
                    }
                    checked += 1;
                }
            }
            // The connection is still in sync after all of that.
            assert_eq!(c.call(0, CMD_FLUSH, 0, 0, &[]).error, 0, "{ctx}");
            c.disconnect();
        }
    }
    assert_eq!(checked, 2 * 5 * COMMANDS.len() * 17);
    // Accepted writes really landed, refused ones did not touch the point.
    let mut c = Client::go(&d.sock, "g/d", true, false);
    assert_eq!(c.call(0, CMD_READ, 0, LEN, &[]).data.len(), LEN as usize);
    drop(d);
    env.ok(&["verify"]);
}

#[test]
fn zero_length_read_gets_a_final_none_chunk_or_an_empty_simple_reply() {
    let env = Env::new();
    let d = setup(&env);
    let mut c = Client::go(&d.sock, "g/d", true, true);
    let r = c.call(0, CMD_READ, 0, 0, &[]);
    // Not an OFFSET_DATA chunk of length 8 (its minimum is 9): one NONE with DONE,
    // as qemu-nbd answers.
    assert_eq!(r.chunks, vec![(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)]);
    assert_eq!(r.error, 0);
    // Also at the very end of the export, and with DF.
    let r = c.call(CMD_FLAG_DF, CMD_READ, SIZE, 0, &[]);
    assert_eq!(r.chunks, vec![(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)]);
    // Past the end it is an error chunk.
    assert_eq!(c.call(0, CMD_READ, SIZE + 1, 0, &[]).error, EINVAL);
    assert_eq!(c.call(0, CMD_FLUSH, 0, 0, &[]).error, 0);
    // Simple replies: a header with no data, and the stream stays in sync.
    let mut c = Client::go(&d.sock, "g/d", false, false);
    let r = c.call(0, CMD_READ, 0, 0, &[]);
    assert_eq!((r.structured, r.error, r.data.len()), (false, 0, 0));
    assert_eq!(c.call(0, CMD_FLUSH, 0, 0, &[]).error, 0);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let env = Env::new();
    let d = setup(&env);
    // "the server MUST drop the TCP connection if the client sets an unknown flag"
    for bad in [0x103u32, 0x4, 0x8000_0001] {
        let mut s = hello(&d.sock, bad);
        // Whatever the client sends next, it gets no option reply.
        let _ = send_opt(&mut s, OPT_LIST, &[]);
        assert!(
            closed_by_peer(&mut s),
            "client flags {bad:#x} were accepted"
        );
    }
    // Known flags, in every combination, are fine.
    for ok in [0u32, 1, 2, 3] {
        let mut s = hello(&d.sock, ok);
        send_opt(&mut s, OPT_LIST, &[]).unwrap();
        assert_eq!(opt_replies(&mut s).unwrap().last().unwrap().1, REP_ACK);
    }
}

#[test]
fn send_df_is_announced_only_with_structured_replies() {
    let env = Env::new();
    let d = setup(&env);
    // The old EXPORT_NAME path without structured replies: no DF.
    let c = Client::export_name(&d.sock, "g/d", false);
    assert_eq!(c.tflags & TF_SEND_DF, 0, "{:#x}", c.tflags);
    // A DF read there is refused (simple reply, no data), the stream stays usable.
    let mut c = c;
    let r = c.call(CMD_FLAG_DF, CMD_READ, 0, LEN, &[]);
    assert_eq!((r.structured, r.error), (false, EINVAL));
    assert_eq!(c.call(0, CMD_READ, 0, LEN, &[]).data.len(), LEN as usize);
    // NBD_OPT_INFO before and after negotiating structured replies.
    let mut s = hello(&d.sock, 3);
    let info = |s: &mut std::os::unix::net::UnixStream| {
        let mut data = 3u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"g/d");
        data.extend_from_slice(&0u16.to_be_bytes());
        send_opt(s, OPT_INFO, &data).unwrap();
        let r = opt_replies(s).unwrap();
        let e = r.iter().find(|r| r.1 == REP_INFO).unwrap();
        u16::from_be_bytes(e.2[10..12].try_into().unwrap())
    };
    assert_eq!(info(&mut s) & TF_SEND_DF, 0);
    negotiate_structured(&mut s);
    assert_ne!(info(&mut s) & TF_SEND_DF, 0);
    // Structured replies negotiated, then EXPORT_NAME: structured replies are in
    // force, so DF is announced (as qemu-nbd and nbdkit do).
    let c = Client::export_name(&d.sock, "g/d", true);
    assert_ne!(c.tflags & TF_SEND_DF, 0);
}

#[test]
fn flush_with_offset_or_length_is_refused() {
    let env = Env::new();
    let d = setup(&env);
    let mut c = Client::go(&d.sock, "g/d", true, false);
    // "For a flush request, length and offset are reserved, and MUST be set to
    // all-zero."
    assert_eq!(c.call(0, CMD_FLUSH, 512, 0, &[]).error, EINVAL);
    assert_eq!(c.call(0, CMD_FLUSH, 0, 512, &[]).error, EINVAL);
    assert_eq!(c.call(0, CMD_FLUSH, 0, 0, &[]).error, 0);
}

/// GO g/d on a negotiated stream, then one BLOCK_STATUS: its error.
fn go_and_block_status(mut s: std::os::unix::net::UnixStream) -> u32 {
    let (size, tflags) = go(&mut s, "g/d").unwrap();
    let mut c = Client {
        s,
        size,
        tflags,
        structured: true,
    };
    c.call(0, CMD_BLOCK_STATUS, 0, LEN, &[]).error
}

#[test]
fn block_status_needs_the_meta_context_of_the_served_export() {
    let env = Env::new();
    let d = setup(&env);
    // base:allocation selected for g/e, then GO g/d: "the final time it was sent,
    // it referred to the same export name used to enter transmission phase".
    let mut s = hello(&d.sock, 3);
    negotiate_structured(&mut s);
    assert_eq!(set_meta(&mut s, "g/e"), REP_ACK);
    assert_eq!(go_and_block_status(s), EINVAL);
    // A failed SET_META_CONTEXT clears an earlier selection.
    let mut s = hello(&d.sock, 3);
    negotiate_structured(&mut s);
    assert_eq!(set_meta(&mut s, "g/d"), REP_ACK);
    assert_eq!(set_meta(&mut s, "g/nope"), REP_ERR_UNKNOWN);
    assert_eq!(go_and_block_status(s), EINVAL);
    // The same export: allowed.
    let mut c = Client::go(&d.sock, "g/d", true, true);
    assert_eq!(c.call(0, CMD_BLOCK_STATUS, 0, LEN, &[]).error, 0);
}

#[test]
fn oversized_requests_get_einval_and_the_stream_stays_in_sync() {
    let env = Env::new();
    let d = setup(&env);
    let mut c = Client::go(&d.sock, "g/d", true, false);
    // Past the advertised maximum block size: EINVAL (EOVERFLOW is only for DF).
    let big = MAX_PAYLOAD + 1;
    assert_eq!(c.call(0, CMD_READ, 0, big, &[]).error, EINVAL);
    let payload = vec![0x5a; big as usize];
    assert_eq!(c.call(0, CMD_WRITE, 0, big, &payload).error, EINVAL);
    assert_eq!(
        c.call(0, CMD_READ, 0, LEN, &[]).data,
        vec![0u8; LEN as usize]
    );
}
