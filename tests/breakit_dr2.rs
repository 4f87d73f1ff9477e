//! Hostile review of failback, restore and recovery plans (issue 12; commits
//! 3b89139, 7433a4d, ee11beb and their follow-ups).
//!
//! Every test reproduces a defect (it failed on the code it was written
//! against) or pins behaviour an attack showed to hold; its doc comment says
//! which, with the reproduction.  Sites are real `drclone serve` processes
//! with replication ports ([`Site`]); restore and plans run the real binary.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use drclone::repl::wire;

const MIB: u64 = 1 << 20;

fn points(s: &Site, g: &str) -> Vec<Value> {
    s.env
        .json(&["point", "list", g])
        .as_array()
        .unwrap()
        .clone()
}

fn addr(s: &Site) -> String {
    format!("127.0.0.1:{}", s.repl)
}

fn role(s: &Site, g: &str) -> String {
    s.env
        .json(&["status"])
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["group"] == g)
        .unwrap_or_else(|| panic!("no group {g} in status"))["role"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Original site O with group `g` (one disk of `size`, 2 MiB written from
/// `seed`, a point), pushed to the DR site D, which fails over.  (Tests run
/// in parallel: [`nbd_write_random`] needs a seed of their own.)
fn failed_over(size: &str, seed: u64) -> (Site, Site) {
    let o = Site::new();
    let d = Site::new();
    o.env.ok(&["group", "create", "g"]);
    o.env.ok(&["volume", "create", "g/d0", "--size", size]);
    nbd_write_random(&o.uri("g/d0"), 0, 2 * MIB as usize, seed);
    o.env.ok(&["point", "create", "g"]);
    o.env.json(&["push", "g", "--target", &addr(&d)]);
    d.env.json(&["failover", "g"]);
    (o, d)
}

/// A proxy from a new port to `127.0.0.1:target`.  `gate(up, n)` is asked,
/// for `n` bytes just read (client to server when `up`), how many to pass
/// now: the rest is offered again shortly (0 holds it), and None cuts the
/// connection both ways.
fn proxy(target: u16, gate: impl Fn(bool, usize) -> Option<usize> + Send + Sync + 'static) -> u16 {
    let gate = Arc::new(gate);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { break };
            let Ok(t) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let (c2, t2) = (c.try_clone().unwrap(), t.try_clone().unwrap());
            for (up, from, to) in [(true, c, t), (false, t2, c2)] {
                let gate = gate.clone();
                std::thread::spawn(move || relay(from, to, |n| gate(up, n)));
            }
        }
    });
    port
}

/// Copy `from` to `to` through `gate` (see [`proxy`]).
fn relay(mut from: TcpStream, mut to: TcpStream, gate: impl Fn(usize) -> Option<usize>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut done = 0;
        while done < n {
            match gate(n - done) {
                None => {
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
                Some(0) => std::thread::sleep(Duration::from_millis(20)),
                Some(k) => {
                    if to.write_all(&buf[done..done + k]).is_err() {
                        return;
                    }
                    done += k;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A proxy to `127.0.0.1:target` that cuts every connection (both ways) once
/// `limit` bytes went up in all, and every connection after that.
fn cut_proxy(target: u16, limit: u64) -> u16 {
    let up = AtomicU64::new(0);
    proxy(target, move |is_up, n| {
        let after = if is_up {
            up.fetch_add(n as u64, Ordering::SeqCst) + n as u64
        } else {
            up.load(Ordering::SeqCst)
        };
        (after < limit).then_some(n)
    })
}

/// A proxy to `127.0.0.1:target` that passes nothing from the server to the
/// client past its 12-byte handshake while `hold` is set (client to server
/// flows freely); `down` counts the bytes the server sent.
fn held_proxy(target: u16, hold: Arc<AtomicBool>, down: Arc<AtomicU64>) -> u16 {
    let passed = AtomicU64::new(0);
    proxy(target, move |up, n| {
        if up {
            return Some(n);
        }
        let before = passed.load(Ordering::SeqCst);
        down.fetch_max(before + n as u64, Ordering::SeqCst);
        let k = if hold.load(Ordering::SeqCst) {
            (12u64.saturating_sub(before) as usize).min(n)
        } else {
            n
        };
        passed.fetch_add(k as u64, Ordering::SeqCst);
        Some(k)
    })
}

// ---- failback ---------------------------------------------------------------

/// The original site removed the common point (`point rm`, or its retention
/// thinned it while the group ran at the DR site).  Found: every failback
/// attempt made the original site take a `diverged-...` point of heads that
/// had not moved, then failed with "point 1 of group g not found" (the
/// rollback's), so each retry added a stray point there and the operator was
/// not told why.  Now BASE refuses at once, naming the gone base, and the
/// original site is left as it was.
#[test]
fn failback_to_a_site_that_removed_the_common_point_changes_nothing_there() {
    let (o, d) = failed_over("8M", 100);
    nbd_write_random(&d.uri("g/d0"), 4 * MIB, 64 << 10, 101);
    let head = o.export("g/d0");
    o.env.ok(&["point", "rm", "g", "1"]);
    for _ in 0..2 {
        let e = d.env.fails(&["failback", "g", "--target", &addr(&o)]);
        assert!(e.contains("is gone from the target"), "{e}");
    }
    assert!(
        points(&o, "g").is_empty(),
        "failback attempts left points on the original site: {:?}",
        points(&o, "g")
    );
    assert!(o.export("g/d0") == head, "the original head changed");
    assert_eq!(role(&d, "g"), "failed-over");
}

/// A failback cut off (the connection dies: kill -9 of either side, a network
/// cut) after the original site kept its own writes in a `diverged-...` point
/// and rolled back.  Found: the rerun found the heads at the base and
/// reported no diverged point, so the only failback that completed never
/// told the operator that the original site's writes sit in a point.  Now
/// the rerun names it.  Nothing is lost: the kept point holds the original
/// site's writes, and the rerun lands the DR site's head.
#[test]
fn a_failback_cut_off_after_the_rollback_still_reports_the_diverged_point() {
    let (o, d) = failed_over("16M", 200);
    // Written at O after the last point it sent: never reached D.
    nbd_write_random(&o.uri("g/d0"), 12 * MIB, MIB as usize, 201);
    let mine = o.export("g/d0");
    nbd_write_random(&d.uri("g/d0"), 2 * MIB, 4 * MIB as usize, 202);
    let cut = cut_proxy(o.repl, MIB);
    let (ok, _, err) = try_cmd(
        &d.env,
        &["failback", "g", "--target", &format!("127.0.0.1:{cut}")],
    );
    assert!(!ok, "the cut failback succeeded");
    println!("cut failback: {err}");
    let kept: Vec<Value> = points(&o, "g")
        .into_iter()
        .filter(|p| p["label"].as_str().unwrap_or("").starts_with("diverged-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let kept = kept[0]["id"].as_u64().unwrap();
    assert!(o.export(&format!("g/d0@{kept}")) == mine);
    let r = d.env.json(&["failback", "g", "--target", &addr(&o)]);
    assert_eq!(
        r["diverged"].as_u64(),
        Some(kept),
        "the completed failback does not name the kept point: {r}"
    );
    assert!(o.export("g/d0") == d.export("g/d0"));
    assert!(
        o.export(&format!("g/d0@{kept}")) == mine,
        "kept writes lost"
    );
    // Once a failback landed after it, it is not reported again.
    let r = d.env.json(&["failback", "g", "--target", &addr(&o)]);
    assert!(r["diverged"].is_null(), "{r}");
}

/// A file of the failed-over head open in a FUSE mount at the DR site during
/// a planned failback.  Found: the fence only refuses and disconnects NBD
/// clients, so the failback switched roles and reported success while the
/// file stayed open; a write through it after the last pass landed in what
/// is now a replica and never reached the original site.  Now the planned
/// failback stops before the last pass, naming the file's holder, and the DR
/// site keeps serving (still failed over); closed, the failback completes.
#[test]
fn a_planned_failback_refuses_a_head_a_fuse_file_holds() {
    let (o, d) = failed_over("8M", 300);
    nbd_write_random(&d.uri("g/d0"), MIB, MIB as usize, 301);
    let m = Mount::start(&d.env);
    let file = m.dir.join("g/d0");
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    let (ok, _, err) = try_cmd(
        &d.env,
        &["failback", "g", "--target", &addr(&o), "--planned"],
    );
    if ok {
        // What the defect allowed: a write after the role switch.
        use std::os::unix::fs::FileExt;
        f.write_all_at(&random_bytes(302, 65536), 6 * MIB).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let same = o.export("g/d0") == d.export("g/d0");
        panic!(
            "planned failback switched roles with a FUSE file open (role {}); the original \
             head {} the DR head after a write through it",
            role(&d, "g"),
            if same { "equals" } else { "differs from" }
        );
    }
    assert!(err.contains("FUSE"), "{err}");
    assert_eq!(role(&d, "g"), "failed-over");
    drop(f);
    let r = d
        .env
        .json(&["failback", "g", "--target", &addr(&o), "--planned"]);
    assert_eq!(r["role"], "protected", "{r}");
    m.stop();
    assert!(o.export("g/d0") == d.export("g/d0"));
}

// ---- restore ----------------------------------------------------------------

/// `drclone restore ARGS` with no store: (exit code, stdout, stderr).
fn restore(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"))
        .env_remove("DRCLONE_STORE")
        .arg("restore")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A site with `g/d0` of `size` bytes holding `data` at 0, and a point.
fn restore_site(size: &str, data: &[u8]) -> Site {
    let s = Site::new();
    s.env.ok(&["group", "create", "g"]);
    s.env.ok(&["volume", "create", "g/d0", "--size", size]);
    let f = s.env.path("img.raw");
    std::fs::write(&f, data).unwrap();
    s.env.ok(&["import", "g/d0", f.to_str().unwrap()]);
    s.env.ok(&["point", "create", "g"]);
    s
}

/// A file longer than the disk.  Found: restore cut it to the disk's size
/// (`set_len`), silently destroying everything past the disk's end, while a
/// block device longer than the disk keeps its tail.  Now it is refused,
/// naming the bytes it would cut, unless --force.
#[test]
fn restore_does_not_cut_a_longer_file_unless_forced() {
    let d = restore_site("1M", &random_bytes(400, MIB as usize));
    let point = d.export("g/d0@latest");
    let f = d.env.path("longer.raw");
    let local = random_bytes(401, 2 * MIB as usize);
    std::fs::write(&f, &local).unwrap();
    let to = f.to_str().unwrap();
    let (code, _, err) = restore(&["g/d0", "--from", &addr(&d), "--to", to]);
    assert_eq!(code, 1, "restore into a longer file: {err}");
    assert!(err.contains("--force"), "{err}");
    assert!(
        std::fs::read(&f).unwrap() == local,
        "a refused restore wrote"
    );
    let (code, _, err) = restore(&["g/d0", "--from", &addr(&d), "--to", to, "--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(&f).unwrap() == point);
}

/// A fake store on the replication port: answers the handshake, reads OPEN,
/// then runs `answer` on the connection (for each connection).
fn fake_store(answer: fn(&mut TcpStream)) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            std::thread::spawn(move || {
                wire::read_handshake(&mut c).unwrap();
                wire::write_handshake(&mut c).unwrap();
                let (t, _) = wire::read_frame(&mut c).unwrap();
                assert_eq!(t, wire::OPEN);
                answer(&mut c);
                let _ = c.flush();
                // Let the client read everything before the close.
                let mut sink = Vec::new();
                let _ = c.read_to_end(&mut sink);
            });
        }
    });
    port
}

fn opened(c: &mut TcpStream, size: u64, chunk_size: u64) {
    let o = wire::Opened {
        size,
        chunk_size,
        point: 1,
    };
    wire::write_frame(c, wire::OPENED, &serde_json::to_vec(&o).unwrap()).unwrap();
}

fn map(c: &mut TcpStream, entries: &[wire::Entry]) {
    wire::write_frame(c, wire::MAP, &wire::encode_map("d0", entries)).unwrap();
}

/// The chunk the lying store maps at block 0 (and the data it sends instead).
fn promised() -> (Vec<u8>, Vec<u8>) {
    (random_bytes(410, 65536), random_bytes(411, 65536))
}

/// A store that lies.  Found: a chunk size of 0 panicked the client
/// (division by zero) and a disk of 2^60 bytes in 4 KiB chunks aborted it
/// (capacity overflow), and a chunk whose data did not hash to its id was
/// written to the disk before the final verification caught it (DESIGN §19
/// says each chunk is checked against its id before it is written).  Now
/// each is a clean error and the disk is not written.
#[test]
fn restore_survives_a_store_that_lies() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("disk.raw");
    let local = random_bytes(412, 2 * 65536);
    let to = f.to_str().unwrap().to_string();
    let cases: [(&str, fn(&mut TcpStream), &str); 4] = [
        (
            "chunk size 0",
            |c| {
                opened(c, MIB, 0);
                map(c, &[]);
            },
            "chunk size",
        ),
        (
            "a disk of 2^60 bytes",
            |c| {
                opened(c, 1 << 60, 4096);
                map(c, &[]);
            },
            "",
        ),
        (
            "a map entry beyond the disk",
            |c| {
                opened(c, 2 * 65536, 65536);
                map(c, &[wire::Entry::Zeros { first: 1, count: 2 }]);
            },
            "beyond the disk",
        ),
        (
            "a chunk that is not its id",
            |c| {
                let (want, _) = promised();
                let id = *blake3::hash(&want).as_bytes();
                opened(c, 2 * 65536, 65536);
                map(
                    c,
                    &[
                        wire::Entry::Data { block: 0, id },
                        wire::Entry::Data { block: 1, id },
                    ],
                );
                map(c, &[]);
                let (t, _) = wire::read_frame(c).unwrap();
                assert_eq!(t, wire::GET);
                let (_, lie) = promised();
                let chunk = wire::WireChunk {
                    id,
                    raw_len: lie.len() as u32,
                    codec: wire::CODEC_RAW,
                    payload: lie,
                };
                wire::write_frame(c, wire::CHUNKS, &wire::encode_chunks(&[chunk])).unwrap();
            },
            "does not match",
        ),
    ];
    for (what, answer, says) in cases {
        std::fs::write(&f, &local).unwrap();
        let port = fake_store(answer);
        let from = format!("127.0.0.1:{port}");
        let (code, _, err) = restore(&["g/d0", "--from", &from, "--to", &to]);
        assert_eq!(code, 1, "{what}: exit code {code}: {err}");
        assert!(err.contains(says), "{what}: {err}");
        assert!(
            std::fs::read(&f).unwrap() == local,
            "{what}: the disk was written"
        );
    }
}

/// Two restores into one file at once.  Found: the in-use check runs before
/// the target is opened, which happens only once the store answered, so a
/// second restore started meanwhile passed it and both wrote.  Now the
/// target is opened (and locked) before the store is asked: the second is
/// refused.  Also pinned: the point stays (`point rm` refused) while a
/// restore reads it, and the first restore then completes and verifies.
#[test]
fn a_second_restore_into_the_same_file_is_refused() {
    let data = random_bytes(420, 4 * MIB as usize);
    let d = restore_site("4M", &data);
    let f = d.env.path("disk.raw");
    std::fs::write(&f, random_bytes(421, 4 * MIB as usize)).unwrap();
    let hold = Arc::new(AtomicBool::new(true));
    let down = Arc::new(AtomicU64::new(0));
    let port = held_proxy(d.repl, hold.clone(), down.clone());
    let bin = assert_cmd::cargo::cargo_bin("drclone");
    let first = std::process::Command::new(&bin)
        .env_remove("DRCLONE_STORE")
        .args(["--json", "restore", "g/d0", "--from"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--to")
        .arg(&f)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The store answered OPEN (past its 12-byte handshake): the point is
    // leased, and the answer is held in the proxy.
    for _ in 0..500 {
        if down.load(Ordering::SeqCst) > 12 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        down.load(Ordering::SeqCst) > 12,
        "the store never answered OPEN"
    );
    let (ok, _, err) = try_cmd(&d.env, &["point", "rm", "g", "1"]);
    assert!(!ok, "point rm removed the point a restore reads");
    assert!(err.contains("restore by"), "{err}");
    let (code, _, err) = restore(&["g/d0", "--from", &addr(&d), "--to", f.to_str().unwrap()]);
    hold.store(false, Ordering::SeqCst);
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the first restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(code, 1, "a second restore into the same file ran: {err}");
    assert!(
        err.contains("open for writing") || err.contains("being restored"),
        "{err}"
    );
    assert!(std::fs::read(&f).unwrap() == data);
}

/// Restore to block devices (loop devices): one larger than the disk gets
/// the disk and keeps its tail, one smaller is refused before anything is
/// written, and the file backing a loop device is refused.  (Pins
/// behaviour: held.)
#[test]
fn restore_to_a_block_device() {
    need("losetup");
    let data = random_bytes(430, MIB as usize);
    let d = restore_site("1M", &data);
    let attach = |name: &str, len: usize, seed: u64| {
        let f = d.env.path(name);
        std::fs::write(&f, random_bytes(seed, len)).unwrap();
        let dev = run("losetup", &["-f", "--show", f.to_str().unwrap()])
            .trim()
            .to_string();
        (f, dev)
    };
    let (big_f, big) = attach("big.img", 2 * MIB as usize, 431);
    let (small_f, small) = attach("small.img", MIB as usize / 2, 432);
    let detach = || {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &big, &small])
            .status();
    };
    let r = std::panic::catch_unwind(|| {
        let (code, _, err) = restore(&["g/d0", "--from", &addr(&d), "--to", &small]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("holds 524288 bytes"), "{err}");
        let (code, _, err) = restore(&["g/d0", "--from", &addr(&d), "--to", &big]);
        assert_eq!(code, 0, "{err}");
        let (code, _, err) =
            restore(&["g/d0", "--from", &addr(&d), "--to", big_f.to_str().unwrap()]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("backs loop device"), "{err}");
    });
    detach();
    r.unwrap();
    let got = std::fs::read(&big_f).unwrap();
    assert!(
        got[..MIB as usize] == data[..],
        "the device does not hold the disk"
    );
    assert!(
        got[MIB as usize..] == random_bytes(431, 2 * MIB as usize)[MIB as usize..],
        "the device's tail was written"
    );
    assert!(std::fs::read(&small_f).unwrap() == random_bytes(432, MIB as usize / 2));
}

/// Restore through the token and TLS paths: a wrong or missing token is
/// refused by name, plain TCP to a TLS port fails cleanly, and with the CA
/// it works.  (Pins behaviour: held.)
#[test]
fn restore_over_tls_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, crt, key) = tls_pki(dir.path(), "site", "IP:127.0.0.1");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "guess\n").unwrap();
    let d = Site::with_args(&[
        "--tls-cert",
        crt.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--replication-token-file",
        token.to_str().unwrap(),
    ]);
    d.env.ok(&["group", "create", "g"]);
    d.env.ok(&["volume", "create", "g/d0", "--size", "1M"]);
    let img = d.env.path("img.raw");
    let data = random_bytes(440, MIB as usize);
    std::fs::write(&img, &data).unwrap();
    d.env.ok(&["import", "g/d0", img.to_str().unwrap()]);
    d.env.ok(&["point", "create", "g"]);
    let f = dir.path().join("disk.raw");
    let to = f.to_str().unwrap();
    let from = addr(&d);
    let ca = ca.to_str().unwrap();
    let (code, _, err) = restore(&["g/d0", "--from", &from, "--to", to, "--tls-ca", ca]);
    assert_eq!(code, 1);
    assert!(err.contains("token"), "{err}");
    let w = wrong.to_str().unwrap();
    let args = [
        "g/d0",
        "--from",
        &from,
        "--to",
        to,
        "--tls-ca",
        ca,
        "--token-file",
        w,
    ];
    let (code, _, err) = restore(&args);
    assert_eq!(code, 1);
    assert!(err.contains("token"), "{err}");
    let t = token.to_str().unwrap();
    let (code, _, err) = restore(&["g/d0", "--from", &from, "--to", to, "--token-file", t]);
    assert_eq!(code, 1, "plain TCP to a TLS port: {err}");
    let args = [
        "g/d0",
        "--from",
        &from,
        "--to",
        to,
        "--tls-ca",
        ca,
        "--token-file",
        t,
    ];
    let (code, _, err) = restore(&args);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(&f).unwrap() == data);
}

// ---- recovery plans ---------------------------------------------------------

/// A store with groups `db` and `app` (a 1 MiB volume each, written, a
/// point of each), and a plan file `name` holding `text` next to it.
fn plan_env(name: &str, text: &str) -> (Env, String) {
    let env = Env::new();
    env.ok(&["init"]);
    for (i, g) in ["db", "app"].iter().enumerate() {
        env.ok(&["group", "create", g]);
        env.ok(&["volume", "create", &format!("{g}/vol"), "--size", "1M"]);
        let f = env.path(&format!("{g}.bin"));
        std::fs::write(&f, random_bytes(500 + i as u64, MIB as usize)).unwrap();
        env.ok(&["import", &format!("{g}/vol"), f.to_str().unwrap()]);
        env.ok(&["point", "create", g]);
    }
    let p = env.path(name);
    std::fs::write(&p, text).unwrap();
    (env, p.display().to_string())
}

/// `drclone plan ARGS --json` (the store's daemon started by the plan if
/// none runs): (exit code, report, stderr).
fn plan_json(env: &Env, args: &[&str]) -> (i32, Value, String) {
    let out = env
        .cmd()
        .arg("plan")
        .args(args)
        .arg("--json")
        .timeout(Duration::from_secs(300))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {err}"));
    (out.status.code().unwrap_or(-1), v, err)
}

fn drill_records(env: &Env) -> Vec<Value> {
    env.json(&["drill", "list"]).as_array().unwrap().clone()
}

/// Drills whose clones still exist (a finished drill's record stays as
/// evidence).
fn live_drills(env: &Env) -> Vec<Value> {
    drill_records(env)
        .into_iter()
        .filter(|d| d["clones_removed"].is_null())
        .collect()
}

/// A drill whose clone group name (`GROUP.drill-ID`) an operator's group
/// already has.  Found (data loss): the drill could not create the group,
/// and its cleanup of the failed start removed that existing group's volumes
/// and the group itself; the failed start also left a drill record, so
/// `plan run --test` left a record behind.  Now the drill fails naming the
/// group, which keeps its data, and no record is left.
#[test]
fn a_drill_never_removes_a_group_it_did_not_make() {
    let (env, file) = plan_env(
        "p.toml",
        "name = \"p\"\n[[step]]\nname = \"db\"\ngroups = [\"db\"]\n",
    );
    // The operator's group, named as drill 1 of db would name its clones.
    env.ok(&["group", "create", "db.drill-1"]);
    env.ok(&["volume", "create", "db.drill-1/precious", "--size", "1M"]);
    let f = env.path("precious.bin");
    let precious = random_bytes(510, MIB as usize);
    std::fs::write(&f, &precious).unwrap();
    env.ok(&["import", "db.drill-1/precious", f.to_str().unwrap()]);
    let (code, r, err) = plan_json(&env, &["run", "--test", &file]);
    assert_eq!(code, 1, "{r:#}\n{err}");
    let e = r["steps"][0]["groups"][0]["error"].as_str().unwrap_or("");
    assert!(e.contains("db.drill-1"), "{r:#}");
    let g = env.export("db.drill-1/precious");
    assert!(g == precious, "the operator's group lost its data");
    assert!(
        drill_records(&env).is_empty(),
        "a drill record is left: {:?}",
        drill_records(&env)
    );
    // The next drill gets the next id, and works.
    let (code, r, err) = plan_json(&env, &["run", "--test", &file]);
    assert_eq!(code, 0, "{r:#}\n{err}");
    assert!(env.export("db.drill-1/precious") == precious);
}

trait EnvExport {
    fn export(&self, what: &str) -> Vec<u8>;
}

impl EnvExport for Env {
    fn export(&self, what: &str) -> Vec<u8> {
        let f = self.path("export.bin");
        let _ = std::fs::remove_file(&f);
        self.ok(&["export", what, f.to_str().unwrap()]);
        std::fs::read(f).unwrap()
    }
}

/// Durations past what the clock holds.  Found: `timeout =
/// "18446744073709551615s"` (a valid duration) panicked `plan run` when the
/// script started (overflow when adding a duration to an instant), and so
/// did such a `wait`.  Now they mean "never": the script runs to its end,
/// and the wait lasts until the plan is interrupted, which still cleans up.
#[test]
fn a_plan_with_an_endless_timeout_or_wait_runs() {
    let (env, file) = plan_env(
        "p.toml",
        r#"name = "p"
[[step]]
name = "db"
groups = ["db"]
post = "touch waiting.flag"
timeout = "18446744073709551615s"
wait = "18446744073709551615s"

[[step]]
name = "app"
groups = ["app"]
"#,
    );
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"));
    cmd.env("DRCLONE_STORE", &env.store)
        .args(["plan", "run", "--test", "--json", &file]);
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let flag = env.path("waiting.flag");
    let seen = (0..3000).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        flag.exists()
    });
    assert!(seen, "the post script never ran");
    // Well into the wait (or panicked already).
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["steps"][0]["outcome"], "ok", "{r:#}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("interrupted before step app"),
        "{r:#}"
    );
    assert_eq!(r["cleanup"]["drills_removed"].as_array().unwrap().len(), 1);
    assert!(live_drills(&env).is_empty());
    // The evidence stays: the interrupted plan's drill is recorded as failed.
    assert_eq!(drill_records(&env)[0]["ok"], false);
}

/// Whether process `pid` runs (a zombie does not).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// A script that starts a process in the background (an application server
/// against the drill's export), writes megabytes, and exits.  Found: under
/// `--test` the background process outlived the plan's cleanup (nothing
/// stopped it).  Now the cleanup stops every script's process group and says
/// so.  Also pinned: the plan does not wait for the background process, and
/// the report keeps the last lines of the output.
#[test]
fn a_test_plan_stops_what_its_scripts_left_running() {
    let (env, file) = plan_env(
        "p.toml",
        r#"name = "p"
[[step]]
name = "db"
groups = ["db"]
post = "sleep 600 & echo $! > bg.pid; yes 0123456789 | head -c 3000000; echo; echo last line"
"#,
    );
    let (code, r, err) = plan_json(&env, &["run", "--test", &file]);
    assert_eq!(code, 0, "{r:#}\n{err}");
    let tail = r["steps"][0]["post"]["output_tail"].as_str().unwrap();
    // 3,000,000 bytes of 11-byte lines end in "012".
    assert!(tail.ends_with("0123456789\n012\nlast line"), "{tail}");
    assert_eq!(tail.lines().count(), 20, "{tail}");
    let pid: i32 = std::fs::read_to_string(env.path("bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let left = alive(pid);
    if left {
        // SAFETY: our test's own leftover process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(
        !left,
        "the script's background process outlived the test plan"
    );
    assert_eq!(r["cleanup"]["scripts_stopped"], 1, "{r:#}");
}

/// A real run whose step fails one group over and not the other (its point
/// was removed after the plan was checked).  The other group stays failed
/// over, which is what a real run does; found: the report did not say so
/// (the group showed only "at point N", with exports of a daemon the plan
/// had stopped).  Now the report lists the groups the run left failed over,
/// in JSON and in text, with how to undo them.
#[test]
fn a_real_run_that_fails_part_way_names_the_groups_it_left_failed_over() {
    let bin = assert_cmd::cargo::cargo_bin("drclone");
    let (env, file) = plan_env(
        "p.toml",
        &format!(
            "name = \"p\"\n[[step]]\nname = \"both\"\ngroups = [\"db\", \"app\"]\n\
             pre = \"{} point rm app 2\"\n",
            bin.display()
        ),
    );
    let _srv = Server::start(&env);
    let (code, r, err) = plan_json(&env, &["run", &file]);
    assert_eq!(code, 1, "{r:#}\n{err}");
    assert_eq!(r["failed_over"], serde_json::json!(["db"]), "{r:#}");
    assert_eq!(role_of(&env, "db"), "failed-over");
    assert_eq!(role_of(&env, "app"), "protected");
    // The text report says it too (the new point of app is 3).
    env.ok(&["failover", "db", "--undo"]);
    env.ok(&["point", "create", "app"]);
    let again = env.path("again.toml");
    std::fs::write(
        &again,
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("point rm app 2", "point rm app 3"),
    )
    .unwrap();
    let out = env
        .cmd()
        .arg("plan")
        .arg("run")
        .arg(&again)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("left failed over: db") && text.contains("--undo"),
        "{text}"
    );
}

fn role_of(env: &Env, g: &str) -> String {
    env.json(&["status"])
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["group"] == g)
        .unwrap()["role"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `plan check` on hostile files: nesting deep enough to exhaust a
/// recursive parser, a duplicate key, a CRLF file with non-ASCII text before
/// the problem, steps as inline tables spread over lines, a huge file.
/// Each problem names its line, nothing crashes.  (Pins behaviour: held.)
#[test]
fn plan_check_names_lines_in_hostile_files() {
    let (env, _) = plan_env("unused.toml", "");
    let check = |name: &str, text: &str| -> Vec<(u64, String)> {
        let p = env.path(name);
        std::fs::write(&p, text).unwrap();
        let (code, r, err) = plan_json(&env, &["check", p.to_str().unwrap()]);
        assert_eq!(code, 1, "{name}: {r:#}\n{err}");
        r["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["line"].as_u64().unwrap(),
                    p["message"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let deep = format!(
        "name = \"p\"\n\nx = {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let ps = check("deep.toml", &deep);
    assert_eq!(ps[0].0, 3, "{ps:?}");
    let ps = check(
        "dup.toml",
        "name = \"p\"\n[[step]]\nname = \"a\"\ngroups = [\"db\"]\ngroups = [\"app\"]\n",
    );
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert_eq!(ps[0].0, 5, "{ps:?}");
    let ps = check(
        "crlf.toml",
        "# Plan für die Datenbank — 数据库 🚀\r\nname = \"p\"\r\n[[step]]\r\n\
         name = \"データベース\"\r\ngroups = [\"db\"]\r\nwait = \"soon\"\r\n",
    );
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert_eq!(ps[0].0, 6, "{ps:?}");
    let ps = check(
        "inline.toml",
        "name = \"p\"\nstep = [\n  { name = \"a\", groups = [\"db\"] },\n\n  \
         { name = \"b\", groups = [\"nosuch\"] },\n]\n",
    );
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert_eq!(ps[0].0, 5, "{ps:?}");
    assert!(ps[0].1.contains("no group `nosuch`"), "{ps:?}");
    let mut big = String::from("name = \"p\"\n");
    for i in 0..20_000 {
        big += &format!("[[step]]\nname = \"s{i}\"\ngroups = [\"g{i}\"]\n");
    }
    big += "[[step]]\nname = \"s0\"\ngroups = [\"db\"]\n";
    let ps = check("big.toml", &big);
    // 20,000 unknown groups and the duplicate name, the last one on its line.
    assert_eq!(ps.len(), 20_001, "{}", ps.len());
    assert!(ps
        .iter()
        .any(|p| p.0 == 60_003 && p.1.contains("duplicate step name `s0`")));
}

/// The stamp (counter) in 4 KiB block `b` of a disk image; 0 for zeros.
fn stamp_at(img: &[u8], b: usize) -> u64 {
    let blk = &img[b * 4096..(b + 1) * 4096];
    let n = u64::from_le_bytes(blk[..8].try_into().unwrap());
    if !blk.chunks(8).all(|w| w == &blk[..8]) {
        let words: Vec<(usize, u64)> = blk
            .chunks(8)
            .enumerate()
            .map(|(k, w)| (k * 8, u64::from_le_bytes(w.try_into().unwrap())))
            .collect();
        let mut runs: Vec<(usize, u64)> = Vec::new();
        for (off, v) in words {
            if runs.last().is_none_or(|r| r.1 != v) {
                runs.push((off, v));
            }
        }
        panic!("block {b} is torn: (offset, stamp) runs {runs:?}");
    }
    n
}

/// An NBD writer at the DR site that reconnects whenever it is cut off (as
/// qemu's NBD client does with reconnect-delay), writing and flushing
/// stamped 4 KiB blocks throughout a planned failback.  Every write
/// acknowledged before the fence cut it off reaches the original site (its
/// head equals the DR site's last failback point); writes acknowledged after
/// the switch land in what is now a replica, and the original site's next
/// push is refused rather than overwriting them.  (Pins behaviour: held.)
#[test]
fn a_reconnecting_writer_loses_nothing_to_a_planned_failback() {
    let (o, d) = failed_over("16M", 600);
    let uri = d.uri("g/d0");
    let mut w = PyChild::spawn(
        &d.env,
        "writer",
        &format!(
            r#"
import time
watch_stdin()
h, i, cut, back = connect({uri:?}), 0, None, None
say("started")
while not stop.is_set():
    if h is None:
        try:
            h = connect({uri:?})
            if back is None:
                back = i
        except Exception:
            time.sleep(0.02)
            continue
    try:
        h.pwrite(stamp(i + 1, 4096), (i % 4096) * 4096)
        h.flush()
        i += 1
    except Exception:
        h = None
        if cut is None:
            cut = i
say(json.dumps({{"cut": cut, "back": back, "last": i}}))
"#
        ),
    );
    assert_eq!(w.line(), "started");
    std::thread::sleep(Duration::from_millis(300));
    let r = d
        .env
        .json(&["failback", "g", "--target", &addr(&o), "--planned"]);
    assert_eq!(r["role"], "protected", "{r}");
    assert!(r["disconnected"].as_u64().unwrap() >= 1, "{r}");
    // Let it reconnect and write to the replica.
    std::thread::sleep(Duration::from_millis(500));
    w.send("stop");
    let v: Value = serde_json::from_str(w.line().trim()).unwrap();
    w.finish();
    let (cut, back, last) = (
        v["cut"].as_u64().expect("never cut off") as usize,
        v["back"].as_u64().expect("never reconnected") as usize,
        v["last"].as_u64().unwrap() as usize,
    );
    println!("writer: cut off after {cut} writes, back at {back}, {last} in all");
    assert!(
        cut > 0 && back == cut && last > back + 1 && last - cut < 4096,
        "{v}"
    );
    let final_point = points(&d, "g")
        .into_iter()
        .rfind(|p| p["label"] == "failback final")
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    let home = o.export("g/d0");
    assert!(
        home == d.export(&format!("g/d0@{final_point}")),
        "the original head is not the DR site's last failback point"
    );
    // Every write acknowledged before the cut is home (the newest stamp of
    // each block among them).
    for i in cut.saturating_sub(4096)..cut {
        let b = i % 4096;
        assert_eq!(stamp_at(&home, b), i as u64 + 1, "write {i} (block {b})");
    }
    // Written after the switch (write `back` may have reached the server
    // before the cut; the next one was first tried after it): at the DR
    // site only, and not overwritten.
    let dr = d.export("g/d0");
    let after = back + 1;
    assert_eq!(stamp_at(&dr, after % 4096), after as u64 + 1);
    // At home that block holds whatever it held before (the setup's random
    // data when the cut came early, not a stamp): only its not being this
    // write's stamp is asserted.
    let blk = (after % 4096) * 4096..(after % 4096 + 1) * 4096;
    assert_ne!(
        &home[blk],
        &(after as u64 + 1).to_le_bytes().repeat(512)[..],
        "a write after the switch reached the original site"
    );
    o.env.ok(&["point", "create", "g"]);
    let e = o.env.fails(&["push", "g", "--target", &addr(&d)]);
    assert!(e.contains("has moved on"), "{e}");
    assert!(d.export("g/d0") == dr, "the push overwrote the DR site");
}

/// A failover moved to an older point (`failover --point`), written and
/// committed, then failed back (planned): the newest common point is one
/// the DR heads do not descend from, so the whole map goes (against it),
/// and the original site ends with the DR site's data, including the blocks
/// only the newer point had (zeroed, not left).  Re-protection after it is
/// incremental, and a second planned failback is refused.  (Pins
/// behaviour: held.)
#[test]
fn failback_of_a_failover_moved_to_an_older_point_and_committed() {
    let o = Site::new();
    let d = Site::new();
    o.env.ok(&["group", "create", "g"]);
    o.env.ok(&["volume", "create", "g/d0", "--size", "16M"]);
    nbd_write_random(&o.uri("g/d0"), 0, 2 * MIB as usize, 700);
    o.env.ok(&["point", "create", "g"]);
    o.env.json(&["push", "g", "--target", &addr(&d)]);
    // Only the newer point has data at 8 MiB.
    nbd_write_random(&o.uri("g/d0"), 8 * MIB, MIB as usize, 701);
    o.env.ok(&["point", "create", "g"]);
    o.env.json(&["push", "g", "--target", &addr(&d)]);
    let older = points(&d, "g")[0]["id"].as_u64().unwrap().to_string();
    d.env.json(&["failover", "g"]);
    d.env.json(&["failover", "g", "--point", &older]);
    nbd_write_random(&d.uri("g/d0"), 12 * MIB, MIB as usize, 702);
    d.env.json(&["failover", "g", "--commit"]);
    let r = d
        .env
        .json(&["failback", "g", "--target", &addr(&o), "--planned"]);
    assert_eq!(r["role"], "protected", "{r}");
    assert!(r["diverged"].is_null(), "{r}");
    let home = o.export("g/d0");
    assert!(home == d.export("g/d0"), "the original site differs");
    assert!(
        home[8 * MIB as usize..9 * MIB as usize]
            .iter()
            .all(|&b| b == 0),
        "the newer point's blocks were left at the original site"
    );
    let e = d.env.fails(&["failback", "g", "--target", &addr(&o)]);
    assert!(e.contains("failback runs on the site"), "{e}");
    // Re-protection: incremental from the last failback point.
    nbd_write_random(&o.uri("g/d0"), 4 * MIB, MIB as usize, 703);
    o.env.ok(&["point", "create", "g"]);
    let (port, count) = tcp_proxy(d.repl);
    let r = o
        .env
        .json(&["push", "g", "--target", &format!("127.0.0.1:{port}")]);
    assert!(!r["base"].is_null(), "{r}");
    let sent = count.take_up();
    assert!(sent < 2 * MIB, "re-protection sent {sent} bytes for 1 MiB");
    assert!(d.export("g/d0") == o.export("g/d0"));
}

/// kill -9 of the DR site's daemon in the middle of a planned failback (its
/// passes slowed by --bwlimit).  After a restart the DR site still serves
/// the group failed over (nothing switched half-way), the rerun completes
/// the failback from where the original site is, and both sites hold the
/// DR site's data.  (Pins behaviour: held.)
#[test]
fn a_planned_failback_killed_mid_pass_is_finished_by_a_rerun() {
    let (o, mut d) = failed_over("16M", 800);
    nbd_write_random(&d.uri("g/d0"), 4 * MIB, 6 * MIB as usize, 801);
    let want = d.export("g/d0");
    let mut fb = d.env.cmd();
    fb.args(["failback", "g", "--planned", "--bwlimit", "2M", "--target"])
        .arg(addr(&o))
        .timeout(Duration::from_secs(120));
    let run = std::thread::spawn(move || fb.output().unwrap());
    // Wait for the first pass to be on the wire, then kill.
    let seen = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        points(&d, "g")
            .iter()
            .any(|p| p["label"] == "failback pass 1")
    });
    assert!(seen, "the failback never started");
    std::thread::sleep(Duration::from_millis(700));
    d.kill9();
    let out = run.join().unwrap();
    assert!(
        !out.status.success(),
        "the failback finished before the kill"
    );
    d.start(&[]);
    assert_eq!(role(&d, "g"), "failed-over");
    assert!(d.export("g/d0") == want, "the DR head changed");
    let r = d
        .env
        .json(&["failback", "g", "--target", &addr(&o), "--planned"]);
    assert_eq!(r["role"], "protected", "{r}");
    assert!(o.export("g/d0") == want, "the original site differs");
    assert!(d.export("g/d0") == want);
}

/// Restore of a point with data, written zeros (over older data) and holes:
/// onto a disk full of other data every block is rewritten; onto an empty
/// (sparse) disk only the data blocks are fetched and nothing else written.
/// Both end byte-identical to the point.  (Pins behaviour: held.)
#[test]
fn restore_handles_zeros_and_holes_both_ways() {
    let d = Site::new();
    d.env.ok(&["group", "create", "g"]);
    d.env.ok(&["volume", "create", "g/d0", "--size", "4M"]);
    nbd_write_random(&d.uri("g/d0"), 0, 2 * MIB as usize, 900);
    py(&format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri({:?})\nh.zero({}, {})\nh.flush()\nh.shutdown()\n",
        d.uri("g/d0"),
        MIB,
        MIB
    ));
    d.env.ok(&["point", "create", "g"]);
    let point = d.export("g/d0@latest");
    assert!(point[MIB as usize..].iter().all(|&b| b == 0));
    let f = d.env.path("disk.raw");
    let to = f.to_str().unwrap();
    let json = |out: &str| -> Value { serde_json::from_str(out).unwrap() };
    std::fs::write(&f, random_bytes(901, 4 * MIB as usize)).unwrap();
    let (code, out, err) = restore(&["--json", "g/d0", "--from", &addr(&d), "--to", to]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["blocks_changed"], 64, "{out}");
    assert!(std::fs::read(&f).unwrap() == point);
    std::fs::remove_file(&f).unwrap();
    let (code, out, err) = restore(&["--json", "g/d0", "--from", &addr(&d), "--to", to]);
    assert_eq!(code, 0, "{err}");
    let r = json(&out);
    assert_eq!(r["blocks_changed"], 16, "{out}");
    assert_eq!(r["bytes_fetched"], MIB, "{out}");
    assert!(std::fs::read(&f).unwrap() == point);
    // Nothing but the data was written: the rest of the file is still sparse.
    use std::os::unix::fs::MetadataExt;
    let used = std::fs::metadata(&f).unwrap().blocks() * 512;
    assert!(used <= 2 * MIB, "{used} bytes allocated for 1 MiB of data");
}

/// A restore whose local compare takes longer than the store waits for a
/// silent session (the real receiver drops one after 5 minutes of silence;
/// this fake store after 2 s, with the client's keep-alive at 1 s through
/// DRCLONE_RESTORE_KEEPALIVE_SECS).  Found: the client said nothing while it
/// hashed the local disk, so on a disk that takes over 5 minutes to read
/// (100 GiB at 300 MB/s) its first GET found the session gone and the
/// restore failed.  Now it sends an empty GET now and then.
#[test]
fn a_long_compare_keeps_the_restore_session() {
    let port = fake_store(|c| {
        let (data, _) = promised();
        let id = *blake3::hash(&data).as_bytes();
        opened(c, 2 << 30, 65536);
        map(c, &[wire::Entry::Data { block: 0, id }]);
        map(c, &[]);
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        while let Ok((t, body)) = wire::read_frame(c) {
            assert_eq!(t, wire::GET);
            let ids = wire::decode_ids(&body).unwrap();
            let chunks: Vec<_> = ids.iter().map(|id| wire::pack(*id, &data)).collect();
            wire::write_frame(c, wire::CHUNKS, &wire::encode_chunks(&chunks)).unwrap();
        }
        // Silent for 2 s: the session is dropped.
        let _ = c.shutdown(Shutdown::Both);
    });
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("disk.raw");
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"))
        .env_remove("DRCLONE_STORE")
        .env("DRCLONE_RESTORE_KEEPALIVE_SECS", "1")
        .args([
            "restore",
            "g/d0",
            "--from",
            &format!("127.0.0.1:{port}"),
            "--to",
        ])
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut head = vec![0u8; 65536];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&f)
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert!(head == promised().0);
}

/// Two `plan run --test` on one store with no daemon: the first starts one
/// for itself, the second uses it, and the first stops it when it ends,
/// while the second still runs.  Found: the second's cleanup could not reach
/// a daemon, so its drill (clones, exports, record) was left behind and its
/// report said so.  Now a plan whose daemon went away starts its own to
/// clean up.
#[test]
fn a_test_plan_cleans_up_after_the_daemon_it_shared_went_away() {
    let (env, a) = plan_env(
        "a.toml",
        "name = \"a\"\n[[step]]\nname = \"db\"\ngroups = [\"db\"]\n\
         post = \"touch a.up; while [ ! -f b.up ]; do sleep 0.05; done\"\n",
    );
    let b = env.path("b.toml");
    std::fs::write(
        &b,
        "name = \"b\"\n[[step]]\nname = \"app\"\ngroups = [\"app\"]\n\
         post = \"touch b.up; while [ ! -f a.done ]; do sleep 0.05; done\"\n",
    )
    .unwrap();
    let spawn = |file: &str| {
        let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"));
        c.env("DRCLONE_STORE", &env.store)
            .args(["plan", "run", "--test", "--json", file])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    let first = spawn(&a);
    let up = env.path("a.up");
    assert!(
        (0..3000).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            up.exists()
        }),
        "plan a never ran its script"
    );
    let second = spawn(b.to_str().unwrap());
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(env.path("a.done"), "").unwrap();
    let out = second.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stderr));
    });
    assert_eq!(r["cleanup"]["ok"], true, "{r:#}");
    assert!(
        live_drills(&env).is_empty(),
        "drills left: {:?}",
        live_drills(&env)
    );
    let groups = env.ok(&["group", "list"]);
    assert!(!groups.contains("drill"), "{groups}");
}
