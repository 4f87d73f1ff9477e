//! Replication (issue 10) between two processes on loopback: the agent
//! (`drclone replicate`) and the receiver inside `drclone serve`.  Bytes on the
//! wire are counted by a proxy between them, not by drclone's own report.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;

const MIB: usize = 1 << 20;

/// The agent's bytes on the wire, counted by a proxy between it and `target`.
struct Proxy {
    port: u16,
    count: CountingProxy,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let (port, count) = tcp_proxy(target);
        Proxy { port, count }
    }

    fn take(&self) -> u64 {
        self.count.take_up()
    }

    fn sent(&self) -> u64 {
        self.count.up_now()
    }
}

/// A target: a store served with a replication port (and `extra` flags).
struct Target(Site);

impl std::ops::Deref for Target {
    type Target = Site;
    fn deref(&self) -> &Site {
        &self.0
    }
}

impl std::ops::DerefMut for Target {
    fn deref_mut(&mut self) -> &mut Site {
        &mut self.0
    }
}

impl Target {
    fn new(extra: &[&str]) -> Target {
        Target(Site::with_args(extra))
    }

    /// `drclone replicate` through `via` (a port); returns the JSON report.
    fn replicate(
        &self,
        via: u16,
        vols: &[(&str, &std::path::Path)],
        extra: &[&str],
    ) -> serde_json::Value {
        let out = self.replicate_raw(via, vols, extra);
        assert!(
            out.status.success(),
            "replicate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn replicate_raw(
        &self,
        via: u16,
        vols: &[(&str, &std::path::Path)],
        extra: &[&str],
    ) -> std::process::Output {
        self.agent(via, vols, extra).output().unwrap()
    }

    /// `drclone --json replicate` through `via`, with this target's state dir.
    fn agent(
        &self,
        via: u16,
        vols: &[(&str, &std::path::Path)],
        extra: &[&str],
    ) -> std::process::Command {
        let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"));
        c.env_remove("DRCLONE_STORE")
            .args([
                "--json",
                "replicate",
                "--target",
                &format!("127.0.0.1:{via}"),
            ])
            .arg("--state-dir")
            .arg(self.env.path("agent-state"));
        for (name, src) in vols {
            c.arg("--volume").arg(format!("{name}={}", src.display()));
        }
        c.args(extra);
        c
    }
}

fn file(env: &Env, name: &str, data: &[u8]) -> std::path::PathBuf {
    let p = env.path(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// Seed: at most 1.05x the data on the wire.  Incremental after changing 1%
/// in 1 MiB regions: at most 1.5x the changed bytes.  Compressible text: at
/// most 0.4x its size.  Every point lands byte-identical.
#[test]
fn seed_incremental_and_text_stay_within_their_byte_budgets() {
    let t = Target::new(&[]);
    let proxy = Proxy::start(t.repl);
    let size = 100 * MIB;
    let mut data = random_bytes(11, size);
    let src = file(&t.env, "d0.raw", &data);
    let st = t.env.json(&["status"]);
    assert_eq!(
        st.as_array().unwrap().len(),
        0,
        "no group before the first cycle"
    );
    let r = t.replicate(proxy.port, &[("g/d0", &src)], &[]);
    let seed = proxy.take();
    let st = t.env.json(&["status"]);
    assert_eq!(st[0]["replication"]["state"], "idle", "{st}");
    assert_eq!(st[0]["replication"]["last_cycle"]["point"], 1, "{st}");
    assert!(
        st[0]["replication"]["last_cycle"]["bytes"]
            .as_u64()
            .unwrap()
            >= size as u64
    );
    assert!(st[0]["rpo_seconds"].as_u64().is_some());
    println!("seed of {size} bytes: {seed} bytes on the wire ({r})");
    assert!(seed as f64 <= 1.05 * size as f64, "seed sent {seed} bytes");
    assert_eq!(r["point"], 1);
    assert!(
        t.export("g/d0@1") == data,
        "seed point differs from the source"
    );

    // 1% changed, in 1 MiB regions.
    for region in [7usize, 50] {
        let fresh = random_bytes(100 + region as u64, MIB / 2);
        data[region * MIB..region * MIB + MIB / 2].copy_from_slice(&fresh);
    }
    std::fs::write(&src, &data).unwrap();
    let r = t.replicate(proxy.port, &[("g/d0", &src)], &[]);
    let inc = proxy.take();
    println!("incremental of 1 MiB changed: {inc} bytes on the wire ({r})");
    assert!(
        inc as f64 <= 1.5 * MIB as f64,
        "incremental sent {inc} bytes"
    );
    assert!(t.export("g/d0@2") == data, "incremental point differs");
    assert_eq!(r["bytes_logical"], MIB as u64);

    let text = text_bytes(5, 32 * MIB);
    let tsrc = file(&t.env, "t.raw", &text);
    t.replicate(proxy.port, &[("txt/d", &tsrc)], &[]);
    let sent = proxy.take();
    println!("text of {} bytes: {sent} bytes on the wire", text.len());
    assert!(
        sent as f64 <= 0.4 * text.len() as f64,
        "text sent {sent} bytes"
    );
    assert!(t.export("txt/d@latest") == text);
}

/// kill -9 of the agent mid-seed, then a rerun: at most 1.2x the data in total
/// (what arrived is not resent).  A target killed mid-cycle leaves no partial
/// point, and the rerun lands the same data; both volumes of one cycle land in
/// one point.
#[test]
fn interrupted_cycles_resume_and_leave_no_partial_point() {
    let mut t = Target::new(&[]);
    let proxy = Proxy::start(t.repl);
    let size = 48 * MIB;
    let d0 = random_bytes(21, size);
    let d1 = random_bytes(22, 16 * MIB);
    let s0 = file(&t.env, "d0.raw", &d0);
    let s1 = file(&t.env, "d1.raw", &d1);
    // The agent, slowed to 16 MiB/s, killed after about half the seed.
    let mut c = t.agent(
        proxy.port,
        &[("g/d0", &s0), ("g/d1", &s1)],
        &["--bwlimit", "16M"],
    );
    let mut agent = c.spawn().unwrap();
    while proxy.sent() < (size / 2) as u64 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    agent.kill().unwrap();
    agent.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        t.env
            .json(&["point", "list", "g"])
            .as_array()
            .unwrap()
            .is_empty(),
        "a killed cycle left a point"
    );
    let r = t.replicate(proxy.port, &[("g/d0", &s0), ("g/d1", &s1)], &[]);
    let total = proxy.take();
    let all = (size + 16 * MIB) as f64;
    println!("seed interrupted then resumed: {total} bytes in total for {all} ({r})");
    assert!(total as f64 <= 1.2 * all, "sent {total} bytes in total");
    let p = r["point"].as_u64().unwrap();
    assert!(t.export(&format!("g/d0@{p}")) == d0);
    assert!(
        t.export(&format!("g/d1@{p}")) == d1,
        "both volumes in the one point"
    );

    // The target killed mid-cycle (a slowed agent), then restarted.
    let mut d0b = d0.clone();
    d0b[..8 * MIB].copy_from_slice(&random_bytes(23, 8 * MIB));
    std::fs::write(&s0, &d0b).unwrap();
    let mut c = t.agent(
        proxy.port,
        &[("g/d0", &s0), ("g/d1", &s1)],
        &["--bwlimit", "2M"],
    );
    c.stderr(std::process::Stdio::piped());
    let agent = c.spawn().unwrap();
    while proxy.sent() < 2 * MIB as u64 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    t.kill9();
    let out = agent.wait_with_output().unwrap();
    assert!(!out.status.success(), "the cycle cannot have committed");
    t.start(&[]);
    let pts = t.env.json(&["point", "list", "g"]);
    assert_eq!(pts.as_array().unwrap().len(), 1, "no partial point: {pts}");
    assert!(
        t.export("g/d0") == d0,
        "the head shows no half-applied cycle"
    );
    let r = t.replicate(proxy.port, &[("g/d0", &s0), ("g/d1", &s1)], &[]);
    let p = r["point"].as_u64().unwrap();
    assert!(t.export(&format!("g/d0@{p}")) == d0b);
    assert!(t.export(&format!("g/d1@{p}")) == d1);
}

/// Security and hostile input: a wrong or missing token is refused before
/// anything is stored; garbage on the port and a chunk whose id does not match
/// its data get errors, and the daemon goes on serving.
#[test]
fn tokens_garbage_and_lying_chunks_are_refused() {
    let env0 = Env::new();
    let tok = env0.path("token");
    std::fs::write(&tok, "s3cret\n").unwrap();
    let bad = env0.path("bad");
    std::fs::write(&bad, "guess\n").unwrap();
    let t = Target::new(&["--replication-token-file", tok.to_str().unwrap()]);
    let data = random_bytes(31, 4 * MIB);
    let src = file(&t.env, "d.raw", &data);
    for extra in [vec![], vec!["--token-file", bad.to_str().unwrap()]] {
        let out = t.replicate_raw(t.repl, &[("g/d", &src)], &extra);
        assert!(!out.status.success());
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains("wrong or missing replication token"), "{e}");
    }
    assert!(
        !t.env.ok(&["group", "list"]).contains('g'),
        "a refused agent created nothing"
    );
    // Garbage, and an HTTP request, on the replication port.
    for junk in [
        &random_bytes(1, 4096)[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", t.repl)).unwrap();
        let _ = s.write_all(junk);
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    // A lying length and a chunk whose id does not match its data.
    {
        use drclone::repl::wire;
        let mut s = TcpStream::connect(("127.0.0.1", t.repl)).unwrap();
        wire::write_handshake(&mut s).unwrap();
        wire::read_handshake(&mut s).unwrap();
        let hello = wire::Hello {
            token: Some("s3cret".into()),
            group: "h".into(),
            volumes: vec![("d".into(), MIB as u64)],
            source: "test".into(),
            epoch: None,
        };
        wire::write_frame(&mut s, wire::HELLO, &serde_json::to_vec(&hello).unwrap()).unwrap();
        let (t1, _) = wire::read_frame(&mut s).unwrap();
        assert_eq!(t1, wire::WELCOME);
        // Offered (HAVE) and lacked, so CHUNKS may carry it; its data lies.
        wire::write_frame(&mut s, wire::HAVE, &wire::encode_ids(&[[7u8; 32]])).unwrap();
        assert_eq!(wire::read_frame(&mut s).unwrap().0, wire::LACK);
        let c = wire::pack([7u8; 32], &random_bytes(3, 65536));
        wire::write_frame(&mut s, wire::CHUNKS, &wire::encode_chunks(&[c])).unwrap();
        let (t2, body) = wire::read_frame(&mut s).unwrap();
        assert_eq!(t2, wire::ERROR);
        let msg = String::from_utf8_lossy(&body);
        assert!(msg.contains("does not match its data"), "{msg}");
        let mut s = TcpStream::connect(("127.0.0.1", t.repl)).unwrap();
        wire::write_handshake(&mut s).unwrap();
        wire::read_handshake(&mut s).unwrap();
        s.write_all(&u32::MAX.to_be_bytes()).unwrap();
        s.write_all(&[wire::HELLO]).unwrap();
        let (t3, body) = wire::read_frame(&mut s).unwrap();
        assert_eq!(t3, wire::ERROR);
        assert!(String::from_utf8_lossy(&body).contains("out of bounds"));
        // Bounds: a HELLO of 300 volumes; a cycle that maps one 1 MiB volume's
        // zero range over and over (CPU), or offers ids without end (memory).
        let session = |vols: usize| {
            let mut s = TcpStream::connect(("127.0.0.1", t.repl)).unwrap();
            wire::write_handshake(&mut s).unwrap();
            wire::read_handshake(&mut s).unwrap();
            let hello = wire::Hello {
                token: Some("s3cret".into()),
                group: "caps".into(),
                volumes: (0..vols).map(|i| (format!("d{i}"), MIB as u64)).collect(),
                source: "test".into(),
                epoch: None,
            };
            wire::write_frame(&mut s, wire::HELLO, &serde_json::to_vec(&hello).unwrap()).unwrap();
            s
        };
        let mut s = session(300);
        let (t4, body) = wire::read_frame(&mut s).unwrap();
        assert_eq!(t4, wire::ERROR);
        assert!(String::from_utf8_lossy(&body).contains("at most 256"));
        let mut s = session(1);
        assert_eq!(wire::read_frame(&mut s).unwrap().0, wire::WELCOME);
        let zeros = vec![
            wire::Entry::Zeros {
                first: 0,
                count: 16
            };
            10_000
        ];
        wire::write_frame(&mut s, wire::MAP, &wire::encode_map("d0", &zeros)).unwrap();
        let (t5, body) = wire::read_frame(&mut s).unwrap();
        assert_eq!(t5, wire::ERROR);
        let msg = String::from_utf8_lossy(&body);
        assert!(msg.contains("past its bound"), "{msg}");
        let mut s = session(1);
        assert_eq!(wire::read_frame(&mut s).unwrap().0, wire::WELCOME);
        let ids: Vec<[u8; 32]> = (0..70_000u32)
            .map(|i| *blake3::hash(&i.to_be_bytes()).as_bytes())
            .collect();
        wire::write_frame(&mut s, wire::HAVE, &wire::encode_ids(&ids)).unwrap();
        let (t6, body) = wire::read_frame(&mut s).unwrap();
        assert_eq!(t6, wire::ERROR);
        let msg = String::from_utf8_lossy(&body);
        assert!(
            msg.contains("HAVE takes this cycle past its bound"),
            "{msg}"
        );
    }
    // Still serving: the right token works and the data lands.
    let r = t.replicate(
        t.repl,
        &[("g/d", &src)],
        &["--token-file", tok.to_str().unwrap()],
    );
    assert!(t.export(&format!("g/d@{}", r["point"])) == data);
    run(
        "nbdinfo",
        &["--size", &format!("nbd://127.0.0.1:{}/g/d", t.nbd)],
    );
}

/// Fencing: replication into a failed-over group is refused, by name, and
/// resumes after undo; a volume an NBD client has open is refused too.
#[test]
fn failed_over_groups_and_busy_volumes_refuse_cycles() {
    let t = Target::new(&[]);
    let data = random_bytes(41, 2 * MIB);
    let src = file(&t.env, "d.raw", &data);
    t.replicate(t.repl, &[("g/d", &src)], &[]);
    t.env.ok(&["failover", "g"]);
    let out = t.replicate_raw(t.repl, &[("g/d", &src)], &[]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("failed-over") && e.contains("refused"), "{e}");
    assert_eq!(
        t.env.json(&["status"])[0]["replication"]["state"],
        "refused"
    );
    t.env.ok(&["failover", "g", "--undo"]);
    // The agent's last cycle saw an older fencing epoch: refused until the
    // operator re-protects on purpose.
    let out = t.replicate_raw(t.repl, &[("g/d", &src)], &[]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--reprotect"), "{e}");
    t.replicate(t.repl, &[("g/d", &src)], &["--reprotect"]);
    t.replicate(t.repl, &[("g/d", &src)], &[]);
    // An NBD client holding the head: one writer at a time.
    let mut hold = PyChild::spawn(
        &t.env,
        "hold",
        &format!(
            "h = connect('nbd://127.0.0.1:{}/g/d')\nsay('open')\nsys.stdin.readline()",
            t.nbd
        ),
    );
    assert_eq!(hold.line(), "open");
    let out = t.replicate_raw(t.repl, &[("g/d", &src)], &[]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("one writer at a time"),
        "{e}"
    );
    hold.send("done");
    hold.finish();
    // ...and the reverse: while a (slowed) cycle writes the head, an NBD client
    // cannot open it.
    let big = random_bytes(42, 12 * MIB);
    std::fs::write(&src, &big).unwrap();
    let proxy = Proxy::start(t.repl);
    let mut agent = t
        .agent(proxy.port, &[("g/d", &src)], &["--bwlimit", "2M"])
        .spawn()
        .unwrap();
    while proxy.sent() < MIB as u64 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = std::process::Command::new("nbdinfo")
        .args(["--size", &format!("nbd://127.0.0.1:{}/g/d", t.nbd)])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an NBD client opened a head a cycle is writing"
    );
    // NBD_REP_ERR_POLICY (libnbd shows the code, not the server's text).
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("policy"), "{e}");
    assert!(agent.wait().unwrap().success());
    assert!(t.export("g/d@latest") == big);
    run(
        "nbdinfo",
        &["--size", &format!("nbd://127.0.0.1:{}/g/d", t.nbd)],
    );
}

/// A chunk the receiver said it holds stays alive until the cycle that
/// references it commits, even if GC runs in between.
#[test]
fn gc_between_have_and_commit_keeps_the_pinned_chunks() {
    use drclone::repl::wire;
    let t = Target::new(&[]);
    let cs = 64 * 1024;
    let blocks: Vec<Vec<u8>> = (0..16).map(|i| random_bytes(500 + i, cs)).collect();
    let ids: Vec<[u8; 32]> = blocks.iter().map(|b| *blake3::hash(b).as_bytes()).collect();
    let mut s = TcpStream::connect(("127.0.0.1", t.repl)).unwrap();
    wire::write_handshake(&mut s).unwrap();
    wire::read_handshake(&mut s).unwrap();
    let hello = wire::Hello {
        token: None,
        group: "g".into(),
        volumes: vec![("d".into(), 16 * cs as u64)],
        source: "test".into(),
        epoch: None,
    };
    wire::write_frame(&mut s, wire::HELLO, &serde_json::to_vec(&hello).unwrap()).unwrap();
    assert_eq!(wire::read_frame(&mut s).unwrap().0, wire::WELCOME);
    // The chunks arrive (offered, lacked, stored, unreferenced), in a first
    // session that ends.
    wire::write_frame(&mut s, wire::HAVE, &wire::encode_ids(&ids)).unwrap();
    assert_eq!(wire::read_frame(&mut s).unwrap().0, wire::LACK);
    let chunks: Vec<wire::WireChunk> = ids
        .iter()
        .zip(&blocks)
        .map(|(i, b)| wire::pack(*i, b))
        .collect();
    wire::write_frame(&mut s, wire::CHUNKS, &wire::encode_chunks(&chunks)).unwrap();
    assert_eq!(wire::read_frame(&mut s).unwrap().0, wire::STORED);
    drop(s);
    // A second session: the receiver says it holds them...
    let mut s = TcpStream::connect(("127.0.0.1", t.repl)).unwrap();
    wire::write_handshake(&mut s).unwrap();
    wire::read_handshake(&mut s).unwrap();
    wire::write_frame(&mut s, wire::HELLO, &serde_json::to_vec(&hello).unwrap()).unwrap();
    assert_eq!(wire::read_frame(&mut s).unwrap().0, wire::WELCOME);
    wire::write_frame(&mut s, wire::HAVE, &wire::encode_ids(&ids)).unwrap();
    let (tl, body) = wire::read_frame(&mut s).unwrap();
    assert_eq!(tl, wire::LACK);
    assert!(
        wire::decode_bits(&body, ids.len())
            .unwrap()
            .iter()
            .all(|l| !l),
        "all held"
    );
    // ...then GC runs, twice, before the cycle commits.
    let g1 = t.env.json(&["gc"]);
    t.env.ok(&["gc"]);
    let entries: Vec<wire::Entry> = ids
        .iter()
        .enumerate()
        .map(|(b, id)| wire::Entry::Data {
            block: b as u64,
            id: *id,
        })
        .collect();
    wire::write_frame(&mut s, wire::MAP, &wire::encode_map("d", &entries)).unwrap();
    let commit = wire::Commit {
        label: None,
        app: false,
        source_point: None,
        time: None,
    };
    wire::write_frame(&mut s, wire::COMMIT, &serde_json::to_vec(&commit).unwrap()).unwrap();
    let (tc, body) = wire::read_frame(&mut s).unwrap();
    assert_eq!(tc, wire::COMMITTED, "{}", String::from_utf8_lossy(&body));
    drop(s);
    assert!(
        t.export("g/d@latest") == blocks.concat(),
        "GC took a pinned chunk ({g1})"
    );
    t.env.ok(&["verify"]);
}

/// qemu-nbd serving `img` (qcow2) with dirty bitmap `b0` on a unix socket.
struct QemuNbd(std::process::Child);

impl QemuNbd {
    fn start(img: &std::path::Path, sock: &std::path::Path) -> QemuNbd {
        let _ = std::fs::remove_file(sock);
        let child = std::process::Command::new("qemu-nbd")
            .args([
                "-r", "-t", "-B", "b0", "-x", "disk", "-f", "qcow2", "--socket",
            ])
            .arg(sock)
            .arg(img)
            .spawn()
            .unwrap();
        for _ in 0..500 {
            if std::os::unix::net::UnixStream::connect(sock).is_ok() {
                return QemuNbd(child);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("qemu-nbd did not start");
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// A dirty-bitmap source (qemu-img bitmap --add, writes with qemu-io, served by
/// qemu-nbd -B): the seed reads the allocated blocks, the next cycle reads only
/// about the dirty bytes (counted on the NBD connection), and both land
/// byte-identical to the image.
#[test]
fn dirty_bitmap_cycles_read_only_the_dirty_blocks() {
    let t = Target::new(&[]);
    let img = t.env.path("vm.qcow2");
    let img_s = img.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", img_s, "64M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 24M",
            "-c",
            "write -P 0x12 40M 8M",
            img_s,
        ],
    );
    run("qemu-img", &["bitmap", "--add", img_s, "b0"]);
    let (up, sock) = (t.env.path("qemu.sock"), t.env.path("proxy.sock"));
    let counted = unix_proxy(&sock, &up);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let raw = t.env.path("img.raw");
    let expect = |p: u64| {
        let _ = std::fs::remove_file(&raw);
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                img_s,
                raw.to_str().unwrap(),
            ],
        );
        assert!(
            t.export(&format!("g/d@{p}")) == std::fs::read(&raw).unwrap(),
            "point {p} differs"
        );
    };
    let q = QemuNbd::start(&img, &up);
    let r = t.replicate(
        t.repl,
        &[("g/d", std::path::Path::new(&uri))],
        &["--dirty-bitmap", "b0"],
    );
    let seed = counted.take_down();
    println!("seed from qemu-nbd: {seed} bytes read over NBD ({r})");
    assert!(
        seed >= 32 * MIB as u64 && seed < 34 * MIB as u64,
        "seed read {seed} bytes"
    );
    drop(q);
    expect(r["point"].as_u64().unwrap());
    // 1 MiB dirtied in sixteen 64 KiB regions; the bitmap records it.
    let mut args = vec!["-f".to_string(), "qcow2".into()];
    for i in 0..16u64 {
        args.push("-c".into());
        args.push(format!(
            "write -P 0x{:x} {} 64k",
            0x40 + i,
            i * 3 * MIB as u64 + 128 * 1024
        ));
    }
    args.push(img_s.into());
    run(
        "qemu-io",
        &args.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    );
    let _q = QemuNbd::start(&img, &up);
    let r = t.replicate(
        t.repl,
        &[("g/d", std::path::Path::new(&uri))],
        &["--dirty-bitmap", "b0"],
    );
    let inc = counted.take_down();
    println!("dirty-bitmap cycle: {inc} bytes read over NBD for 1 MiB dirty ({r})");
    assert!(inc as f64 <= 1.2 * MIB as f64, "read {inc} bytes");
    expect(r["point"].as_u64().unwrap());
}

/// Continuous protection: the daemon checkpoints a group every second while a
/// writer alternates dependent writes between its two disks over NBD (write
/// disk0 = i, wait for the ack, write disk1 = i).  Every checkpoint holds a
/// prefix: disk1 = i only with disk0 = i (write-order fidelity).
#[test]
fn checkpoints_keep_write_order_across_the_group() {
    let t = Target::new(&[]);
    t.env.ok(&["group", "create", "g"]);
    t.env.ok(&["volume", "create", "g/d0", "--size", "1M"]);
    t.env.ok(&["volume", "create", "g/d1", "--size", "1M"]);
    let j = t
        .env
        .json(&["group", "set", "g", "--checkpoint-interval", "1s"]);
    assert_eq!(j["checkpoint_interval"], 1);
    let mut w = PyChild::spawn(
        &t.env,
        "writer",
        &format!(
            r#"
watch_stdin()
a = connect('nbd://127.0.0.1:{p}/g/d0')
b = connect('nbd://127.0.0.1:{p}/g/d1')
n = 0
say("started")
while not stop.is_set():
    n += 1
    a.pwrite(stamp(n, 4096), 0)
    b.pwrite(stamp(n, 65536), 0)
say(n)
"#,
            p = t.nbd
        ),
    );
    assert_eq!(w.line(), "started");
    let mut pts = 0;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        pts = t
            .env
            .json(&["point", "list", "g"])
            .as_array()
            .unwrap()
            .len();
        if pts >= 4 {
            break;
        }
    }
    w.send("stop");
    let n: u64 = w.line().parse().unwrap();
    w.finish();
    t.env
        .ok(&["group", "set", "g", "--checkpoint-interval", "off"]);
    assert!(pts >= 4, "only {pts} checkpoints in 10 s");
    let points = t.env.json(&["point", "list", "g"]);
    let mut moving = 0;
    for p in points.as_array().unwrap() {
        assert_eq!(p["label"], "checkpoint");
        let id = p["id"].as_u64().unwrap();
        let a = u64::from_le_bytes(t.export(&format!("g/d0@{id}"))[..8].try_into().unwrap());
        let b = u64::from_le_bytes(t.export(&format!("g/d1@{id}"))[..8].try_into().unwrap());
        assert!(
            b <= a && a <= b + 1,
            "point {id}: disk0 = {a}, disk1 = {b}: not a prefix"
        );
        if a > 0 {
            moving += 1;
        }
    }
    assert!(
        moving >= 2 && n > 10,
        "the writer barely moved: {n} writes, {moving} points with data"
    );
}

/// A planned failover waits for the replication cycle in flight to commit, so
/// its final point (and the failover head) holds that cycle's data.
#[test]
fn planned_failover_waits_for_the_cycle_in_flight() {
    let t = Target::new(&[]);
    let src = file(&t.env, "d.raw", &random_bytes(61, 8 * MIB));
    t.replicate(t.repl, &[("g/d", &src)], &[]);
    let newer = random_bytes(62, 8 * MIB);
    std::fs::write(&src, &newer).unwrap();
    let proxy = Proxy::start(t.repl);
    let mut c = t.agent(proxy.port, &[("g/d", &src)], &["--bwlimit", "2M"]);
    c.stdout(std::process::Stdio::piped());
    let agent = c.spawn().unwrap();
    while proxy.sent() < MIB as u64 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let f = t.env.json(&["failover", "g", "--planned"]);
    let out = agent.wait_with_output().unwrap();
    assert!(out.status.success(), "the cycle in flight was cut off");
    let cycle: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        f["point"].as_u64().unwrap() > cycle["point"].as_u64().unwrap(),
        "the planned point {f} comes after the cycle's {cycle}"
    );
    assert!(
        t.export("g/d") == newer,
        "the failover head holds the last cycle"
    );
}

/// TLS: an agent with the CA lands a point (and the wire carries no plaintext);
/// a plaintext agent is refused by the TLS receiver, which goes on serving;
/// an agent trusting another CA refuses the receiver; a TLS agent against a
/// plaintext receiver says so.
#[test]
fn tls_works_and_a_plaintext_agent_is_refused() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_pki(certs.path(), "target", "IP:127.0.0.1,DNS:localhost");
    let (other, _, _) = tls_pki(certs.path(), "impostor", "IP:127.0.0.1,DNS:localhost");
    let t = Target::new(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    // Text, so plaintext on the wire would be recognisable.
    let data = text_bytes(3, 4 * MIB);
    let src = file(&t.env, "d.raw", &data);
    let ca = ca.to_str().unwrap();

    let out = t.replicate_raw(t.repl, &[("g/d", &src)], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a plaintext agent was accepted");
    assert!(
        err.contains("speaks TLS") && err.contains("--tls-ca"),
        "{err}"
    );
    let out = t.replicate_raw(
        t.repl,
        &[("g/d", &src)],
        &["--tls-ca", other.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an untrusted certificate was accepted"
    );
    assert!(err.contains("TLS handshake"), "{err}");
    assert!(
        t.env.json(&["status"]).as_array().unwrap().is_empty(),
        "a refused agent left a group"
    );

    // Through a recording proxy: the wire holds no line of the text.
    let (port, rec) = recording_proxy(t.repl);
    let r = t.replicate(port, &[("g/d", &src)], &["--tls-ca", ca]);
    assert_eq!(r["point"], 1);
    assert!(t.export("g/d@1") == data, "the TLS cycle's point differs");
    let wire = rec.lock().unwrap().clone();
    assert!(wire.len() > 1000, "the proxy saw {} bytes", wire.len());
    let needle = &data[MIB..MIB + 64];
    assert!(
        !wire.windows(needle.len()).any(|w| w == needle),
        "plaintext on the TLS wire"
    );

    // A plaintext receiver: the TLS agent says what failed.
    let plain = Target::new(&[]);
    let out = plain.replicate_raw(plain.repl, &[("g/d", &src)], &["--tls-ca", ca]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("TLS handshake"), "{err}");
    // serve refuses a certificate without its key, and a bad key file.
    let e = t
        .env
        .fails(&["serve", "--tls-cert", cert.to_str().unwrap()]);
    assert!(e.contains("--tls-key"), "{e}");
}

/// A proxy from a new port to `target` that records the client's bytes.
fn recording_proxy(target: u16) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let rec = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let r2 = rec.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let s = TcpStream::connect(("127.0.0.1", target)).unwrap();
            let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
            });
            let rec = r2.clone();
            std::thread::spawn(move || {
                let (mut c, mut s) = (c, s);
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, rec)
}

/// `push` between two stores: a full seed, then only the chunks the target
/// lacks (counted on the wire), several points in order with their labels and
/// origins, nothing when the target is current; it refuses when the target's
/// head moved on, and a first push into a group that holds other data.
#[test]
fn push_sends_only_what_the_target_lacks_and_refuses_a_moved_head() {
    let t = Target::new(&[]);
    let proxy = Proxy::start(t.repl);
    let src = Env::new();
    src.ok(&["init"]);
    let size = 16 * MIB;
    src.ok(&["group", "create", "g"]);
    for d in ["d0", "d1"] {
        src.ok(&["volume", "create", &format!("g/{d}"), "--size", "16M"]);
    }
    let s = Server::start(&src);
    nbd_write_random(&s.tcp("g/d0"), 0, size, 701);
    nbd_write_random(&s.tcp("g/d1"), 0, size / 2, 702);
    src.ok(&["point", "create", "g", "--label", "first"]);
    let target = format!("127.0.0.1:{}", proxy.port);
    let push = |what: &str| src.json(&["push", what, "--target", &target]);

    let r = push("g");
    let seed = proxy.take();
    println!("push seed: {seed} bytes on the wire ({r})");
    assert_eq!(r["points"].as_array().unwrap().len(), 1, "{r}");
    assert!(r["base"].is_null(), "{r}");
    let data = (size + size / 2) as f64;
    assert!(seed as f64 <= 1.05 * data, "seed sent {seed} bytes");
    assert!(
        seed as f64 >= data,
        "seed sent {seed} bytes: less than the data?"
    );

    // Two more points: 1 MiB changed on d0, then 1 MiB on d1 and a trim on d0.
    nbd_write_random(&s.tcp("g/d0"), 3 * MIB as u64, MIB, 703);
    src.ok(&["point", "create", "g", "--label", "second"]);
    nbd_write_random(&s.tcp("g/d1"), 12 * MIB as u64, MIB, 704);
    qemu_io(&s.tcp("g/d0"), &["discard 8M 2M"]);
    src.ok(&["point", "create", "g", "--label", "third"]);
    let r = push("g");
    let inc = proxy.take();
    println!("push of 2 points, 2 MiB changed: {inc} bytes on the wire ({r})");
    assert_eq!(r["base"], 1, "{r}");
    assert_eq!(r["points"].as_array().unwrap().len(), 2, "{r}");
    assert!(inc as f64 <= 1.5 * (2 * MIB) as f64, "sent {inc} bytes");
    assert!(inc as f64 >= (2 * MIB) as f64, "sent {inc} bytes");
    // Every point landed identical, in order, with its label and origin.
    let tp = t.env.json(&["point", "list", "g"]);
    let sp = src.json(&["point", "list", "g"]);
    let tp = tp.as_array().unwrap();
    assert_eq!(tp.len(), 3, "{tp:?}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.store.join("store.json")).unwrap()).unwrap();
    let uuid = cfg["uuid"].clone();
    assert!(uuid.is_string(), "{cfg}");
    for (i, p) in tp.iter().enumerate() {
        let s_id = sp[i]["id"].as_u64().unwrap();
        assert_eq!(p["label"], sp[i]["label"]);
        assert_eq!(p["time"], sp[i]["time"], "a pushed point keeps its time");
        assert_eq!(p["origin"]["point"], s_id, "{p}");
        assert_eq!(p["origin"]["source"], uuid, "{p}");
        for d in ["d0", "d1"] {
            let here = src.path(&format!("s-{d}-{s_id}.raw"));
            src.ok(&["export", &format!("g/{d}@{s_id}"), here.to_str().unwrap()]);
            assert!(
                t.export(&format!("g/{d}@{}", p["id"])) == std::fs::read(&here).unwrap(),
                "point {s_id} of {d} differs on the target"
            );
        }
    }
    let r = push("g");
    assert!(r["points"].as_array().unwrap().is_empty(), "{r}");

    // The target's head moves on (an NBD write there): refused, nothing lands.
    nbd_write_random(&t.uri("g/d1"), 0, 4096, 705);
    nbd_write_random(&s.tcp("g/d0"), 0, MIB, 706);
    src.ok(&["point", "create", "g"]);
    let e = src.fails(&["push", "g", "--target", &target]);
    assert!(e.contains("moved on since point 3"), "{e}");
    assert_eq!(
        t.env
            .json(&["point", "list", "g"])
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // A first push into a group the target holds from elsewhere: refused.
    let other = file(&t.env, "h.raw", &random_bytes(4, MIB));
    t.replicate(t.repl, &[("h/d0", &other)], &[]);
    src.ok(&["group", "create", "h"]);
    src.ok(&["volume", "create", "h/d0", "--size", "1M"]);
    src.ok(&["point", "create", "h"]);
    let e = src.fails(&["push", "h", "--target", &target]);
    assert!(e.contains("none came from this store"), "{e}");
    // A group without points, and an unknown one, are errors here.
    src.ok(&["group", "create", "k"]);
    src.ok(&["volume", "create", "k/d0", "--size", "1M"]);
    let e = src.fails(&["push", "k", "--target", &target]);
    assert!(e.contains("no recovery point"), "{e}");
    let e = src.fails(&["push", "nosuch", "--target", &target]);
    assert!(e.contains("nosuch"), "{e}");
}

/// A cycle is one crash-consistent point of the whole group: an agent that
/// names only some of the group's disks is refused, by name (found by a
/// new-user run: the point listed the left-out disk with older data).
#[test]
fn a_cycle_naming_only_some_disks_of_the_group_is_refused() {
    let t = Target::new(&[]);
    let a = file(&t.env, "a.raw", &random_bytes(41, MIB));
    let b = file(&t.env, "b.raw", &random_bytes(42, MIB));
    t.replicate(t.repl, &[("g/d0", &a), ("g/d1", &b)], &[]);
    let out = t.replicate_raw(t.repl, &[("g/d0", &a)], &[]);
    assert!(!out.status.success(), "a partial cycle made a point");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("also has disk(s) d1"), "{e}");
    assert_eq!(
        t.env
            .json(&["point", "list", "g"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
