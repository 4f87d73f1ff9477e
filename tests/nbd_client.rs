//! The NBD client (`drclone::nbd::client`) against real servers: qemu-nbd serving a
//! qcow2 image with a persistent dirty bitmap (`-B`), and `drclone serve`; plus a
//! scripted hostile server for the bounds checks.  Bytes on the wire are counted
//! by a proxy, not by the client.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use common::*;
use drclone::nbd::client::{Client, Extent};
use drclone::nbd::proto::*;
use drclone::Error;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// `qemu-nbd` serving a qcow2 image read-only with dirty bitmap `b0`, export
/// `disk`, on a unix socket; killed on drop.
struct QemuNbd {
    child: std::process::Child,
    sock: PathBuf,
}

impl QemuNbd {
    /// Create a `size`-byte qcow2 image; write `before` (offset, len, byte)
    /// before adding bitmap `b0` and `after` once it records, then serve it.
    fn start(env: &Env, size: u64, before: &[(u64, u64, u8)], after: &[(u64, u64, u8)]) -> QemuNbd {
        need("qemu-nbd");
        need("qemu-img");
        need("qemu-io");
        let img = env.path("d.qcow2");
        let img_s = img.to_str().unwrap();
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", img_s, &size.to_string()],
        );
        let write = |regions: &[(u64, u64, u8)]| {
            if regions.is_empty() {
                return;
            }
            let mut args = vec!["-f".to_string(), "qcow2".into()];
            for (o, l, b) in regions {
                args.push("-c".into());
                args.push(format!("write -P {b:#x} {o} {l}"));
            }
            args.push(img_s.into());
            let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            run("qemu-io", &a);
        };
        write(before);
        run("qemu-img", &["bitmap", "--add", img_s, "b0"]);
        write(after);
        let sock = env.path("qemu.sock");
        let child = std::process::Command::new("qemu-nbd")
            .args([
                "-r", "-t", "-B", "b0", "-x", "disk", "-f", "qcow2", "--socket",
            ])
            .arg(&sock)
            .arg(&img)
            .spawn()
            .unwrap();
        for _ in 0..500 {
            if UnixStream::connect(&sock).is_ok() {
                return QemuNbd { child, sock };
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("qemu-nbd did not start");
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn ext(offset: u64, length: u64, flags: u32) -> Extent {
    Extent {
        offset,
        length,
        flags,
    }
}

/// The image's expected content.
fn model(size: u64, regions: &[(u64, u64, u8)]) -> Vec<u8> {
    let mut m = vec![0u8; size as usize];
    for (o, l, b) in regions {
        m[*o as usize..(*o + *l) as usize].fill(*b);
    }
    m
}

/// Read each extent and compare with the image written in `writes` (in order);
/// returns the whole expected image.
fn read_extents_match(
    c: &mut Client,
    extents: &[Extent],
    size: u64,
    writes: &[&[(u64, u64, u8)]],
) -> Vec<u8> {
    let m = model(size, &writes.concat());
    for e in extents {
        let got = c.read(e.offset, e.length as usize).unwrap();
        assert!(
            got == m[e.offset as usize..e.end() as usize],
            "extent {e:?}"
        );
    }
    m
}

#[test]
fn qemu_nbd_dirty_bitmap_reads_holes_and_allocation() {
    let env = Env::new();
    let size = 64 * MIB;
    let before = [(0, 64 * KIB, 0x11), (32 * MIB, 128 * KIB, 0x12)];
    let after = [
        (MIB, 64 * KIB, 0x61),
        (10 * MIB, 192 * KIB, 0x62),
        (32 * MIB + 64 * KIB, 64 * KIB, 0x63),
        (40 * MIB, 64 * KIB, 0x64),
    ];
    let q = QemuNbd::start(&env, size, &before, &after);
    let mut c = Client::connect(
        &q.uri("disk"),
        &[BASE_ALLOCATION, &dirty_bitmap_context("b0")],
    )
    .unwrap();
    assert_eq!(c.size(), size);
    assert_eq!(c.export(), "disk");
    assert!(c.transmission_flags() & TF_READ_ONLY != 0);

    // Exactly the regions written after the bitmap was added.
    let dirty = c.dirty_extents("b0").unwrap();
    let want: Vec<Extent> = after
        .iter()
        .map(|(o, l, _)| ext(*o, *l, STATE_DIRTY))
        .collect();
    assert_eq!(dirty, want);
    // Allocation: everything ever written, merged where touching.
    assert_eq!(
        c.allocated_extents().unwrap(),
        vec![
            ext(0, 64 * KIB, 0),
            ext(MIB, 64 * KIB, 0),
            ext(10 * MIB, 192 * KIB, 0),
            ext(32 * MIB, 128 * KIB, 0),
            ext(40 * MIB, 64 * KIB, 0),
        ]
    );
    // A sub-range is clipped to what was asked.
    assert_eq!(
        c.block_status(MIB + 4 * KIB, 8 * KIB, &dirty_bitmap_context("b0"))
            .unwrap(),
        vec![ext(MIB + 4 * KIB, 8 * KIB, STATE_DIRTY)]
    );
    let ba = c
        .block_status(MIB - 4 * KIB, 72 * KIB, BASE_ALLOCATION)
        .unwrap();
    assert_eq!(
        ba,
        vec![
            ext(MIB - 4 * KIB, 4 * KIB, STATE_HOLE | STATE_ZERO),
            ext(MIB, 64 * KIB, 0),
            ext(MIB + 64 * KIB, 4 * KIB, STATE_HOLE | STATE_ZERO),
        ]
    );

    // Reads return the written bytes; holes read as zeros.
    let m = read_extents_match(&mut c, &dirty, size, &[&before[..], &after[..]]);
    assert_eq!(
        c.read(5 * MIB, 64 * KIB as usize).unwrap(),
        vec![0u8; 64 << 10]
    );
    // Unaligned, spanning data and holes.
    let got = c.read(MIB - 3, 64 * KIB as usize + 10).unwrap();
    assert!(got == m[(MIB - 3) as usize..(MIB + 64 * KIB + 7) as usize]);
    // The whole disk in one call: split at the server's 32 MiB maximum.
    let (_, _, max) = c.block_sizes();
    assert!(max as u64 <= 32 * MIB, "{max}");
    let whole = c.read(0, size as usize).unwrap();
    assert!(whole == m, "whole-disk read differs");

    // Caller errors are typed and leave the connection usable.
    assert!(matches!(c.read(size - 1, 2), Err(Error::Invalid(_))));
    assert!(matches!(
        c.block_status(0, 4096, "qemu:dirty-bitmap:other"),
        Err(Error::Invalid(_))
    ));
    assert_eq!(c.read(MIB, 1).unwrap(), vec![0x61]);
    c.disconnect().unwrap();

    // The server refuses: an unknown bitmap, an unknown export.
    let e = Client::connect(&q.uri("disk"), &[&dirty_bitmap_context("nope")]).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("dirty bitmap nope") && msg.contains("\"disk\""),
        "{msg}"
    );
    let e = Client::connect(&q.uri("elsewhere"), &[BASE_ALLOCATION]).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    assert!(e.to_string().contains("elsewhere"), "{e}");
    let e = Client::connect(&q.uri("elsewhere"), &[]).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    // Without contexts, reads still work and block status is refused locally.
    let mut plain = Client::connect(&q.uri("disk"), &[]).unwrap();
    assert_eq!(plain.read(10 * MIB, 2).unwrap(), vec![0x62, 0x62]);
    assert!(matches!(plain.allocated_extents(), Err(Error::Invalid(_))));
}

#[test]
fn drclone_serve_reads_and_base_allocation() {
    let env = Env::new();
    env.ok(&["init"]);
    env.ok(&["group", "create", "app"]);
    env.ok(&["volume", "create", "app/d", "--size", "48M"]);
    let srv = Server::start(&env);
    let data = random_bytes(7, MIB as usize);
    let src = env.path("src.bin");
    std::fs::write(&src, &data).unwrap();
    // 1 MiB of random data at 0 (nbdcopy) and 2 MiB of 0x5a at 40 MiB (qemu-io).
    need("nbdcopy");
    run("nbdcopy", &[src.to_str().unwrap(), &srv.unix("app/d")]);
    qemu_io(&srv.tcp("app/d"), &["write -P 0x5a 40M 2M"]);
    let mut c = Client::connect(&srv.tcp("app/d"), &[BASE_ALLOCATION]).unwrap();
    assert_eq!(c.size(), 48 * MIB);
    assert!(c.read(0, MIB as usize).unwrap() == data);
    assert_eq!(
        c.read(40 * MIB, 2 * MIB as usize).unwrap(),
        vec![0x5au8; 2 << 20]
    );
    assert_eq!(c.read(20 * MIB, 4096).unwrap(), vec![0u8; 4096]);
    assert_eq!(
        c.allocated_extents().unwrap(),
        vec![ext(0, MIB, 0), ext(40 * MIB, 2 * MIB, 0)]
    );
    // Larger than one request; over the unix socket too.
    let mut u = Client::connect(&srv.unix("app/d"), &[]).unwrap();
    let whole = u.read(0, 48 * MIB as usize).unwrap();
    assert!(whole[..MIB as usize] == data[..]);
    assert!(whole[40 << 20..42 << 20].iter().all(|&b| b == 0x5a));
    assert!(whole[MIB as usize..40 << 20].iter().all(|&b| b == 0));
    u.disconnect().unwrap();
    c.disconnect().unwrap();

    // drclone offers no dirty bitmaps; unknown exports are named.
    let e = Client::connect(&srv.tcp("app/d"), &[&dirty_bitmap_context("b0")]).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    assert!(e.to_string().contains("dirty bitmap b0"), "{e}");
    let e = Client::connect(&srv.unix("app/nope"), &[]).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    assert!(e.to_string().contains("app/nope"), "{e}");
}

#[test]
fn malformed_uris_and_dead_peers_are_typed_errors() {
    for bad in [
        "nbd:/x",
        "nbd://",
        "nbd://h:x/e",
        "nbd+unix:///e",
        "nbd+unix:///e?socket=s&tls=on",
        "file:///e",
    ] {
        let e = Client::connect(bad, &[]).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{bad}: {e:?}");
        assert!(e.to_string().contains("malformed NBD URI"), "{bad}: {e}");
    }
    assert!(matches!(
        Client::connect("nbds://h/e", &[]),
        Err(Error::Unsupported(_))
    ));
    let env = Env::new();
    let e = Client::connect(
        &format!("nbd+unix:///e?socket={}", env.path("none").display()),
        &[],
    )
    .unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    let e = Client::connect(&format!("nbd://127.0.0.1:{}/e", free_port()), &[]).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
}

/// Forwards unix-socket connections on `listen` to `upstream`, counting bytes
/// each way.
#[test]
fn reading_only_dirty_extents_moves_about_the_dirty_bytes() {
    let env = Env::new();
    let size = 64 * MIB;
    // 1 MiB dirty in sixteen 64 KiB regions spread over the disk, over a disk
    // whose other 8 MiB were written before the bitmap (allocated, not dirty).
    let before: Vec<(u64, u64, u8)> = (0..8).map(|i| (i * 8 * MIB, MIB, 0x40 + i as u8)).collect();
    let after: Vec<(u64, u64, u8)> = (0..16)
        .map(|i| {
            (
                i * 4 * MIB + 2 * MIB + i * 64 * KIB,
                64 * KIB,
                0x80 + i as u8,
            )
        })
        .collect();
    let q = QemuNbd::start(&env, size, &before, &after);
    let psock = env.path("proxy.sock");
    let p = unix_proxy(&psock, &q.sock);
    let uri = format!("nbd+unix:///disk?socket={}", psock.display());
    let mut c = Client::connect(&uri, &[&dirty_bitmap_context("b0")]).unwrap();
    let dirty = c.dirty_extents("b0").unwrap();
    assert_eq!(dirty.iter().map(|e| e.length).sum::<u64>(), MIB);
    assert_eq!(dirty.len(), 16);
    read_extents_match(&mut c, &dirty, size, &[&before[..], &after[..]]);
    c.disconnect().unwrap();
    // The proxy counts before forwarding, so every byte the client read is counted.
    let s2c = p.down.load(Ordering::SeqCst);
    let c2s = p.up.load(Ordering::SeqCst);
    eprintln!(
        "dirty-bitmap read of a 64 MiB disk with 1 MiB dirty: {s2c} bytes server->client, \
         {c2s} bytes client->server"
    );
    assert!(s2c >= MIB, "{s2c}");
    assert!(
        s2c < MIB * 12 / 10,
        "{s2c} bytes crossed the wire for 1 MiB dirty"
    );
}

// ---------------------------------------------------------------------------
// A scripted hostile server: a correct handshake (or a tweaked one), then for
// each request the bytes `reply` returns.

type ReplyFn = Box<dyn Fn(&Request) -> Vec<u8> + Send>;

fn read_n(s: &mut UnixStream, n: usize) -> Option<Vec<u8>> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).ok().map(|_| v)
}

/// Serve one connection: export of 1 MiB with `base:allocation` (id 1).  `go`
/// replaces the replies to NBD_OPT_GO when given.
fn hostile(env: &Env, name: &str, go: Option<Vec<u8>>, reply: ReplyFn) -> String {
    let path = env.path(name);
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&greeting()).unwrap();
        read_n(&mut s, 4);
        loop {
            let Some(h) = read_n(&mut s, 16) else { return };
            let (opt, len) = option_header(&h).unwrap();
            read_n(&mut s, len as usize);
            let out = match opt {
                OPT_SET_META_CONTEXT => {
                    let mut v =
                        option_reply(opt, REP_META_CONTEXT, &rep_meta_context(1, BASE_ALLOCATION));
                    v.extend(option_reply(opt, REP_ACK, &[]));
                    v
                }
                OPT_GO => match &go {
                    Some(g) => g.clone(),
                    None => {
                        let mut v = option_reply(opt, REP_INFO, &info_export(MIB, TF_HAS_FLAGS));
                        v.extend(option_reply(opt, REP_ACK, &[]));
                        v
                    }
                },
                _ => option_reply(opt, REP_ACK, &[]),
            };
            if s.write_all(&out).is_err() {
                return;
            }
            if opt == OPT_GO {
                break;
            }
        }
        while let Some(h) = read_n(&mut s, REQUEST_LEN) {
            let req = Request::decode(&h).unwrap();
            let out = reply(&req);
            // An empty script closes the connection.
            if req.typ == CMD_DISC || out.is_empty() || s.write_all(&out).is_err() {
                return;
            }
        }
    });
    format!("nbd+unix:///x?socket={}", path.display())
}

fn data_chunk(cookie: u64, flags: u16, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v =
        structured_header(cookie, flags, REPLY_TYPE_OFFSET_DATA, 8 + data.len() as u32).to_vec();
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn is_protocol_error(e: &Error) -> bool {
    matches!(e, Error::Io { .. }) && e.to_string().contains("NBD protocol")
}

#[test]
fn hostile_servers_get_typed_errors_never_panics() {
    let env = Env::new();
    // A well-behaved script first: split data and hole chunks, then an error.
    let uri = hostile(
        &env,
        "good.sock",
        None,
        Box::new(|r: &Request| {
            if r.offset == 0 {
                let half = r.length / 2;
                let mut v = structured_header(r.cookie, 0, REPLY_TYPE_OFFSET_HOLE, 12).to_vec();
                v.extend_from_slice(&(r.offset + half as u64).to_be_bytes());
                v.extend_from_slice(&(r.length - half).to_be_bytes());
                v.extend(data_chunk(
                    r.cookie,
                    REPLY_FLAG_DONE,
                    0,
                    &vec![7u8; half as usize],
                ));
                v
            } else {
                structured_error(r.cookie, EIO, "disk on fire")
            }
        }),
    );
    let mut c = Client::connect(&uri, &[BASE_ALLOCATION]).unwrap();
    let got = c.read(0, 8).unwrap();
    assert_eq!(got, vec![7, 7, 7, 7, 0, 0, 0, 0]);
    let e = c.read(4096, 8).unwrap_err();
    assert!(
        e.to_string().contains("EIO") && e.to_string().contains("disk on fire"),
        "{e}"
    );
    // A server-reported error leaves the stream in step.
    assert_eq!(c.read(0, 2).unwrap(), vec![7, 0]);

    // Each hostile reply: a typed error, and the connection refuses further use.
    let cases: Vec<(&str, ReplyFn)> = vec![
        (
            "huge chunk",
            Box::new(|r: &Request| {
                structured_header(r.cookie, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, u32::MAX)
                    .to_vec()
            }),
        ),
        (
            "data outside the request",
            Box::new(|r: &Request| data_chunk(r.cookie, REPLY_FLAG_DONE, r.offset + 4096, &[1; 8])),
        ),
        (
            "data past the request's end",
            Box::new(|r: &Request| data_chunk(r.cookie, REPLY_FLAG_DONE, r.offset, &[1; 64])),
        ),
        (
            "short cover",
            Box::new(|r: &Request| data_chunk(r.cookie, REPLY_FLAG_DONE, r.offset, &[1; 4])),
        ),
        (
            "overlap",
            Box::new(|r: &Request| {
                let mut v = data_chunk(r.cookie, 0, r.offset, &[1; 4]);
                v.extend(data_chunk(r.cookie, REPLY_FLAG_DONE, r.offset, &[1; 8]));
                v
            }),
        ),
        (
            "wrong cookie",
            Box::new(|r: &Request| simple_reply(r.cookie + 1, 0).to_vec()),
        ),
        (
            "bad magic",
            Box::new(|_: &Request| b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()),
        ),
        (
            "zero-length extent",
            Box::new(|r: &Request| block_status(r.cookie, 1, &[(0, 0)])),
        ),
        (
            "unknown chunk type",
            Box::new(|r: &Request| structured_header(r.cookie, REPLY_FLAG_DONE, 77, 0).to_vec()),
        ),
        (
            "lying error length",
            Box::new(|r: &Request| {
                let mut v =
                    structured_header(r.cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 7).to_vec();
                v.extend_from_slice(&[0, 0, 0, 5, 0xff, 0xff, b'x']);
                v
            }),
        ),
        ("close", Box::new(|_: &Request| Vec::new())),
    ];
    for (i, (what, f)) in cases.into_iter().enumerate() {
        let uri = hostile(&env, &format!("h{i}.sock"), None, f);
        let mut c = Client::connect(&uri, &[BASE_ALLOCATION]).unwrap();
        c.set_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let e = if what == "zero-length extent" {
            c.block_status(0, 4096, BASE_ALLOCATION).unwrap_err()
        } else if what == "close" {
            // The server closes instead of replying: EOF, not a hang.
            let e = c.read(0, 8).unwrap_err();
            assert!(matches!(e, Error::Io { .. }), "{what}: {e:?}");
            assert!(e.to_string().contains("closed the connection"), "{e}");
            assert!(c.read(0, 8).is_err());
            continue;
        } else {
            c.read(0, 8).unwrap_err()
        };
        assert!(is_protocol_error(&e), "{what}: {e:?}");
        assert!(
            c.read(0, 8).is_err(),
            "{what}: usable after a protocol error"
        );
    }

    // Handshake lies: an option reply longer than any honest one, a GO without
    // the export info, and a greeting from something that is not NBD.
    let mut huge = option_reply(OPT_GO, REP_INFO, &[]);
    huge[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    let no_info = option_reply(OPT_GO, REP_ACK, &[]);
    let mut bad_sizes = option_reply(OPT_GO, REP_INFO, &info_block_size(3, 4096, 1 << 20));
    bad_sizes.extend(option_reply(OPT_GO, REP_ACK, &[]));
    for (i, go) in [huge, no_info, bad_sizes].into_iter().enumerate() {
        let uri = hostile(
            &env,
            &format!("g{i}.sock"),
            Some(go),
            Box::new(|_: &Request| Vec::new()),
        );
        let e = Client::connect(&uri, &[]).unwrap_err();
        assert!(is_protocol_error(&e), "{i}: {e:?}");
    }
    let path = env.path("http.sock");
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let e = Client::connect(&format!("nbd+unix:///x?socket={}", path.display()), &[]).unwrap_err();
    assert!(is_protocol_error(&e), "{e:?}");
    assert!(e.to_string().contains("not an NBD server"), "{e}");
}
