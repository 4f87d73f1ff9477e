//! Hostile review of replication over TLS, store-to-store `push` and the
//! receiver's bounds (issue 10; commits 624ca51, ff5c96c, 8d38eda).
//!
//! Every test reproduces a defect (it failed on the code it was written
//! against) or pins behaviour an attack showed to hold; its doc comment says
//! which, with the reproduction.  The target is the real `drclone serve` with a
//! replication port; the source store is driven with the CLI (`import`,
//! `point create`, `push`), as an operator would.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use drclone::repl::wire;

const MIB: usize = 1 << 20;

/// The target: a [`Site`] (a store served with NBD and replication ports).
type Target = Site;

trait TargetExt {
    fn addr(&self) -> String;
    fn points(&self, group: &str) -> Vec<serde_json::Value>;
    fn pid(&self) -> u32;
}

impl TargetExt for Site {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.repl)
    }

    fn points(&self, group: &str) -> Vec<serde_json::Value> {
        points(&self.env, group)
    }

    fn pid(&self) -> u32 {
        self.srv.as_ref().unwrap().id()
    }
}

/// The points of `group`, oldest first (none if the group does not exist).
fn points(env: &Env, group: &str) -> Vec<serde_json::Value> {
    let (ok, out, err) = try_cmd(env, &["--json", "point", "list", group]);
    if !ok {
        assert!(err.contains("not found"), "{err}");
        return Vec::new();
    }
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// A source store (no daemon: the CLI opens it) with group `g`.
fn source() -> Env {
    let s = Env::new();
    s.ok(&["init"]);
    s.ok(&["group", "create", "g"]);
    s
}

/// Import `data` (a whole disk image) into `vol` of `env`.
fn put(env: &Env, vol: &str, data: &[u8]) {
    let f = env.path("img.raw");
    std::fs::write(&f, data).unwrap();
    env.ok(&["import", vol, f.to_str().unwrap()]);
}

/// Export a head or point of `env` and return its bytes.
fn export(env: &Env, what: &str) -> Vec<u8> {
    let f = env.path("export.raw");
    let _ = std::fs::remove_file(&f);
    env.ok(&["export", what, f.to_str().unwrap()]);
    std::fs::read(f).unwrap()
}

fn push(src: &Env, group: &str, target: &str, extra: &[&str]) -> (bool, String, String) {
    let mut a = vec!["--json", "push", group, "--target", target];
    a.extend_from_slice(extra);
    try_cmd(src, &a)
}

fn push_ok(src: &Env, group: &str, target: &str) -> serde_json::Value {
    let (ok, out, err) = push(src, group, target, &[]);
    assert!(ok, "push failed: {err}");
    serde_json::from_str(&out).unwrap()
}

/// Every point of `group` on the target that came from `src` (and that `src`
/// still holds) holds exactly the disks of its source point, each of the same
/// size and bytes.  Returns how many it compared.
fn assert_points_identical(src: &Env, t: &Target, group: &str) -> usize {
    let sp = points(src, group);
    let mut n = 0;
    for tp in t.points(group) {
        let Some(sid) = tp["origin"]["point"].as_u64() else {
            continue;
        };
        // A source point removed since (retention) cannot be compared.
        let Some(s) = sp.iter().find(|p| p["id"].as_u64() == Some(sid)) else {
            continue;
        };
        assert_eq!(
            tp["volumes"], s["volumes"],
            "target point {} (source point {sid}) holds other disks",
            tp["id"]
        );
        for d in s["volumes"].as_array().unwrap() {
            let d = d.as_str().unwrap();
            let a = export(src, &format!("{group}/{d}@{sid}"));
            let b = export(&t.env, &format!("{group}/{d}@{}", tp["id"]));
            assert_eq!(
                a.len(),
                b.len(),
                "{group}/{d}: source point {sid} is {} bytes, target point {} is {}",
                a.len(),
                tp["id"],
                b.len()
            );
            assert!(
                a == b,
                "{group}/{d}: target point {} differs from source point {sid}",
                tp["id"]
            );
        }
        n += 1;
    }
    n
}

// ---- push: geometry between points --------------------------------------------

/// DEFECT (fixed): a volume that grew between two points landed on the target
/// at its largest size in every point: HELLO named each disk at the largest
/// size any point holds, so the target grew the head before the first point.
///
/// Reproduction: g/d of 4 MiB, point 1; `volume resize g/d --size 8M`, data
/// in the new half, point 2; push: the target's point 1 was 8 MiB.
#[test]
fn push_lands_each_point_at_its_own_size() {
    let t = Site::new();
    let src = source();
    src.ok(&["volume", "create", "g/d", "--size", "4M"]);
    put(&src, "g/d", &random_bytes(1, 4 * MIB));
    src.ok(&["point", "create", "g"]);
    src.ok(&["volume", "resize", "g/d", "--size", "8M"]);
    let mut grown = random_bytes(1, 4 * MIB);
    grown.extend(random_bytes(2, 4 * MIB));
    put(&src, "g/d", &grown);
    src.ok(&["point", "create", "g"]);
    let r = push_ok(&src, "g", &t.addr());
    assert_eq!(r["points"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(assert_points_identical(&src, &t, "g"), 2);
    // And incrementally: another growth after a push.
    src.ok(&["volume", "resize", "g/d", "--size", "12M"]);
    grown.extend(random_bytes(3, 4 * MIB));
    put(&src, "g/d", &grown);
    src.ok(&["point", "create", "g"]);
    push_ok(&src, "g", &t.addr());
    assert_eq!(assert_points_identical(&src, &t, "g"), 3);
}

/// DEFECT (fixed): a disk added between two points was in every point the
/// target landed, the earlier ones too (as an empty disk): HELLO created
/// every disk any point holds before the first point.
///
/// Reproduction: g/d0, point 1; `volume create g/d1`, data, point 2; push:
/// the target's point 1 held d0 and d1.
#[test]
fn push_lands_each_point_with_its_own_disks() {
    let t = Site::new();
    let src = source();
    src.ok(&["volume", "create", "g/d0", "--size", "2M"]);
    put(&src, "g/d0", &random_bytes(1, 2 * MIB));
    src.ok(&["point", "create", "g"]);
    src.ok(&["volume", "create", "g/d1", "--size", "2M"]);
    put(&src, "g/d1", &random_bytes(2, 2 * MIB));
    src.ok(&["point", "create", "g"]);
    push_ok(&src, "g", &t.addr());
    assert_eq!(assert_points_identical(&src, &t, "g"), 2);
}

/// DEFECT (fixed, by refusing): a disk removed from the source group between
/// two points stayed in the target's later points (the receiver cannot remove
/// a disk; nothing told it to).  Push now refuses, naming the disk, and lands
/// nothing that differs.
///
/// Reproduction: g/d0 and g/d1, point 1, push; `volume rm g/d1`, point 2,
/// push: the target's point 2 held d1.
#[test]
fn push_never_lands_a_point_holding_a_disk_the_source_removed() {
    let t = Site::new();
    let src = source();
    for (i, d) in ["d0", "d1"].iter().enumerate() {
        src.ok(&["volume", "create", &format!("g/{d}"), "--size", "1M"]);
        put(&src, &format!("g/{d}"), &random_bytes(i as u64, MIB));
    }
    src.ok(&["point", "create", "g"]);
    push_ok(&src, "g", &t.addr());
    src.ok(&["volume", "rm", "g/d1"]);
    put(&src, "g/d0", &random_bytes(7, MIB));
    src.ok(&["point", "create", "g"]);
    let (ok, _, err) = push(&src, "g", &t.addr(), &[]);
    if !ok {
        assert!(err.contains("d1"), "the refusal names the disk: {err}");
        assert_eq!(t.points("g").len(), 1, "a refused push landed a point");
    }
    assert_points_identical(&src, &t, "g");
}

/// DEFECT (fixed, by refusing): after a failover commit on the source to a
/// point where a disk was smaller, the next point has the smaller size; push
/// landed it at the old, larger size, with the old data in the tail.
///
/// Reproduction: g/d 2 MiB, point 1; resize to 4 MiB, data, point 2; push;
/// `failover g --point 1`, `failover g --commit`, point 3; push: the target's
/// point 3 was 4 MiB, its last 2 MiB from point 2.
#[test]
fn push_never_lands_a_shrunk_disk_at_its_old_size() {
    let t = Site::new();
    let src = source();
    src.ok(&["volume", "create", "g/d", "--size", "2M"]);
    put(&src, "g/d", &random_bytes(1, 2 * MIB));
    src.ok(&["point", "create", "g"]);
    src.ok(&["volume", "resize", "g/d", "--size", "4M"]);
    put(&src, "g/d", &random_bytes(2, 4 * MIB));
    src.ok(&["point", "create", "g"]);
    push_ok(&src, "g", &t.addr());
    src.ok(&["failover", "g", "--point", "1"]);
    src.ok(&["failover", "g", "--commit"]);
    src.ok(&["point", "create", "g"]);
    let (ok, _, err) = push(&src, "g", &t.addr(), &[]);
    if !ok {
        assert!(err.contains("g/d"), "the refusal names the disk: {err}");
        assert_eq!(t.points("g").len(), 2, "a refused push landed a point");
    }
    assert_points_identical(&src, &t, "g");
}

// ---- push: choosing the base ---------------------------------------------------

/// DEFECT (fixed): retention (or `point rm`) on the source removing the newest
/// point the target holds made every later push refuse, for ever: push took
/// the newest common point the source still held as the base, and the
/// target's head, one point further, had "moved on" since it.
///
/// Reproduction: points 1, 2, push; point 3, push; `point rm g 3` on the
/// source; point 4, push: refused ("moved on since point 2").
#[test]
fn push_after_the_source_thinned_the_newest_common_point() {
    let t = Site::new();
    let src = source();
    src.ok(&["volume", "create", "g/d", "--size", "4M"]);
    let mut data = random_bytes(1, 4 * MIB);
    put(&src, "g/d", &data);
    src.ok(&["point", "create", "g"]);
    push_ok(&src, "g", &t.addr());
    data[MIB..2 * MIB].copy_from_slice(&random_bytes(2, MIB));
    data[3 * MIB..].fill(0);
    put(&src, "g/d", &data);
    src.ok(&["point", "create", "g"]);
    push_ok(&src, "g", &t.addr());
    src.ok(&["point", "rm", "g", "2"]);
    data[..MIB].copy_from_slice(&random_bytes(3, MIB));
    put(&src, "g/d", &data);
    src.ok(&["point", "create", "g"]);
    let r = push_ok(&src, "g", &t.addr());
    assert_eq!(r["points"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(assert_points_identical(&src, &t, "g"), 2);
    assert!(
        export(&t.env, "g/d@latest") == data,
        "the target's newest point is not the source's"
    );
    // Nothing left to send: the next push sends nothing.
    let r = push_ok(&src, "g", &t.addr());
    assert!(r["points"].as_array().unwrap().is_empty(), "{r}");
}

/// Holds: a second store pushing into a group that came from another store is
/// refused, and so is a first push into a group the target created itself.
#[test]
fn two_sources_into_one_group_are_refused() {
    let t = Site::new();
    let (a, b) = (source(), source());
    for (i, s) in [&a, &b].iter().enumerate() {
        s.ok(&["volume", "create", "g/d", "--size", "1M"]);
        put(s, "g/d", &random_bytes(i as u64, MIB));
        s.ok(&["point", "create", "g"]);
    }
    push_ok(&a, "g", &t.addr());
    let (ok, _, err) = push(&b, "g", &t.addr(), &[]);
    assert!(!ok && err.contains("none came from this store"), "{err}");
    // The point ids collide (both stores' point 1): the target's origin names
    // the store, so b's point 1 is not taken for a's.
    assert_eq!(t.points("g").len(), 1);
    assert_points_identical(&a, &t, "g");
}

/// DEFECT (fixed): nothing held the points a push was sending: retention or
/// `point rm` on the source could remove one mid-push, and GC then dropped the
/// map versions only it saw, so the push sent the previous point's blocks
/// under its id (a point on the target that never existed here).  Now the
/// points to send are held (leased) until the push ends: removing one is
/// refused meanwhile, and retention keeps it for now.
///
/// Reproduction: points 1, 2, 3 of a 4 MiB disk, each rewritten whole, then
/// the head rewritten again; the source served; push --bwlimit 2M; once point
/// 1 landed, `point rm g 3` and `gc` on the source: the target's copy of
/// point 3 held point 2's data.
#[test]
fn a_point_removed_and_collected_mid_push_is_not_sent_as_another() {
    let t = Site::new();
    let src = source();
    src.ok(&["volume", "create", "g/d", "--size", "4M"]);
    for i in 1..=3 {
        put(&src, "g/d", &random_bytes(20 + i, 4 * MIB));
        src.ok(&["point", "create", "g"]);
    }
    let third = export(&src, "g/d@3");
    put(&src, "g/d", &random_bytes(30, 4 * MIB));
    let srv = Server::start(&src);
    let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"))
        .env("DRCLONE_STORE", &src.store)
        .args(["push", "g", "--target", &t.addr(), "--bwlimit", "2M"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..3000 {
        if !t.points("g").is_empty() {
            break;
        }
        assert!(c.try_wait().unwrap().is_none(), "the push ended early");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (removed, _, err) = try_cmd(&src, &["point", "rm", "g", "3"]);
    if !removed {
        assert!(err.contains("in use") || err.contains("push"), "{err}");
    }
    src.ok(&["gc"]);
    let out = c.wait_with_output().unwrap();
    drop(srv);
    let landed: Vec<_> = t
        .points("g")
        .into_iter()
        .filter(|p| p["origin"]["point"] == 3)
        .collect();
    if let Some(p) = landed.first() {
        assert!(
            export(&t.env, &format!("g/d@{}", p["id"])) == third,
            "the target's point {} (source point 3) is not point 3 (removed: {removed}; push: {})",
            p["id"],
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---- push: the target moved on -------------------------------------------------

/// DEFECT (fixed): a target head grown (`volume resize`) after the common
/// point was not a change to BASE: push went ahead and its point took the
/// target's size, not the source's.
#[test]
fn push_refuses_a_target_head_resized_since_the_common_point() {
    let t = Site::new();
    let src = source();
    src.ok(&["volume", "create", "g/d", "--size", "1M"]);
    put(&src, "g/d", &random_bytes(1, MIB));
    src.ok(&["point", "create", "g"]);
    push_ok(&src, "g", &t.addr());
    t.env.ok(&["volume", "resize", "g/d", "--size", "2M"]);
    put(&src, "g/d", &random_bytes(2, MIB));
    src.ok(&["point", "create", "g"]);
    let (ok, _, err) = push(&src, "g", &t.addr(), &[]);
    assert!(!ok, "a push over a resized target head was accepted");
    assert!(err.contains("g/d"), "{err}");
    assert_eq!(t.points("g").len(), 1);
}

/// DEFECT (fixed): BASE checked only the disks HELLO named: a disk created in
/// the target's group after the common point (`volume create` + `import`, or
/// a `clone` into the group) was not a change, and the pushed points held it
/// (disks and data the source point does not have).
#[test]
fn push_refuses_a_target_group_with_a_disk_the_source_lacks() {
    let t = Site::new();
    let src = source();
    src.ok(&["volume", "create", "g/d", "--size", "1M"]);
    put(&src, "g/d", &random_bytes(1, MIB));
    src.ok(&["point", "create", "g"]);
    push_ok(&src, "g", &t.addr());
    put(&src, "g/d", &random_bytes(2, MIB));
    src.ok(&["point", "create", "g"]);

    t.env.ok(&["volume", "create", "g/extra", "--size", "1M"]);
    put(&t.env, "g/extra", &random_bytes(3, MIB));
    let (ok, _, err) = push(&src, "g", &t.addr(), &[]);
    assert!(!ok, "a push into a group with an extra disk was accepted");
    assert!(err.contains("g/extra"), "{err}");
    assert_eq!(t.points("g").len(), 1);
    t.env.ok(&["volume", "rm", "g/extra"]);

    t.env.ok(&["clone", "g/d@1", "g/copy"]);
    let (ok, _, err) = push(&src, "g", &t.addr(), &[]);
    assert!(!ok, "a push into a group with a clone in it was accepted");
    assert!(err.contains("g/copy"), "{err}");
    t.env.ok(&["volume", "rm", "g/copy"]);

    push_ok(&src, "g", &t.addr());
    assert_eq!(assert_points_identical(&src, &t, "g"), 2);
}

/// Holds: every other way the target's head can move on after the common
/// point is refused (an import changing one byte; the volume removed
/// and recreated; a failover committed and re-protected), and one that leaves
/// the heads as they were (a failover undone) is not.
#[test]
fn push_refuses_every_target_change_since_the_common_point() {
    let src = source();
    src.ok(&["volume", "create", "g/d", "--size", "1M"]);
    put(&src, "g/d", &random_bytes(1, MIB));
    src.ok(&["point", "create", "g"]);
    let fresh = || {
        let t = Site::new();
        push_ok(&src, "g", &t.addr());
        t
    };
    // A new source point after the target changed.
    let n = std::cell::Cell::new(10);
    let next = || {
        n.set(n.get() + 1);
        put(&src, "g/d", &random_bytes(n.get(), MIB));
        src.ok(&["point", "create", "g"]);
    };
    let refused = |t: &Target, why: &str, want: &str| {
        let had = t.points("g").len();
        next();
        let (ok, _, err) = push(&src, "g", &t.addr(), &[]);
        assert!(!ok, "{why}: the push was accepted");
        assert!(err.contains(want), "{why}: {err}");
        assert_eq!(t.points("g").len(), had, "{why}");
    };

    let t = fresh();
    let mut d = export(&t.env, "g/d");
    d[4096] ^= 1;
    put(&t.env, "g/d", &d);
    refused(&t, "import on the target", "moved on");

    let t = fresh();
    t.env.ok(&["volume", "rm", "g/d"]);
    t.env.ok(&["volume", "create", "g/d", "--size", "1M"]);
    refused(&t, "volume recreated on the target", "moved on");

    let t = fresh();
    t.env.ok(&["failover", "g", "--point", "latest"]);
    refused(&t, "failed over", "failed");
    t.env.ok(&["failover", "g", "--commit"]);
    refused(&t, "committed", "committed");

    // A failover undone: the heads are the replica heads, untouched.
    let t = fresh();
    t.env.ok(&["failover", "g", "--point", "latest"]);
    t.env.ok(&["failover", "g", "--undo"]);
    next();
    push_ok(&src, "g", &t.addr());
    assert_points_identical(&src, &t, "g");
}

/// Holds: a push cut off part-way (kill -9 of the sender, then of the
/// receiver) leaves only whole points, and the next push lands the rest,
/// identical, from where the target is.
#[test]
fn a_push_cut_off_part_way_resumes_with_whole_points() {
    let mut t = Site::new();
    let src = source();
    src.ok(&["volume", "create", "g/d", "--size", "4M"]);
    for i in 0..4 {
        put(&src, "g/d", &random_bytes(10 + i, 4 * MIB));
        src.ok(&["point", "create", "g"]);
    }
    let target = t.addr();
    let start = || {
        std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"))
            .env("DRCLONE_STORE", &src.store)
            .args(["push", "g", "--target", &target, "--bwlimit", "3M"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let wait_points = |t: &Target, n: usize, c: &mut std::process::Child| {
        for _ in 0..3000 {
            if t.points("g").len() >= n {
                return true;
            }
            if c.try_wait().unwrap().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no point landed");
    };
    // The sender dies after the first point.
    let mut c = start();
    assert!(wait_points(&t, 1, &mut c), "the push ended before a point");
    c.kill().unwrap();
    c.wait().unwrap();
    let landed = t.points("g").len();
    assert!((1..4).contains(&landed), "{landed} points");
    assert_points_identical(&src, &t, "g");
    // The receiver dies after the next one.
    let mut c = start();
    assert!(
        wait_points(&t, landed + 1, &mut c),
        "the push ended before a point"
    );
    t.kill9();
    let _ = c.wait();
    t.start(&[]);
    assert_points_identical(&src, &t, "g");
    push_ok(&src, "g", &t.addr());
    assert_eq!(assert_points_identical(&src, &t, "g"), 4);
}

// ---- TLS ----------------------------------------------------------------------

/// Holds: a certificate for another name (its CN is the address, but its
/// subjectAltName is not) is refused by `push`, and nothing lands; with the
/// right name, push over TLS lands identical points.
#[test]
fn tls_refuses_a_certificate_for_another_name_and_push_works_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_pki(dir.path(), "wrong", "DNS:other.example");
    let t = Site::with_args(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let src = source();
    src.ok(&["volume", "create", "g/d", "--size", "1M"]);
    put(&src, "g/d", &random_bytes(1, MIB));
    src.ok(&["point", "create", "g"]);
    let (ok, _, err) = push(&src, "g", &t.addr(), &["--tls-ca", ca.to_str().unwrap()]);
    assert!(!ok, "a certificate for another name was accepted");
    assert!(err.contains("TLS handshake"), "{err}");
    assert!(t.env.json(&["status"]).as_array().unwrap().is_empty());
    drop(t);

    let (ca, cert, key) = tls_pki(dir.path(), "right", "IP:127.0.0.1");
    let t = Site::with_args(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let (ok, _, err) = push(&src, "g", &t.addr(), &[]);
    assert!(!ok && err.contains("--tls-ca"), "plaintext push: {err}");
    let (ok, _, err) = push(&src, "g", &t.addr(), &["--tls-ca", ca.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(assert_points_identical(&src, &t, "g"), 1);
}

/// Holds: bad certificate and key files stop `serve` with a message naming the
/// file and what is wrong (no panic, no listener that fails every handshake).
#[test]
fn bad_tls_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_pki(dir.path(), "a", "IP:127.0.0.1");
    let (_, _, other_key) = tls_pki(dir.path(), "b", "IP:127.0.0.1");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a pem file\n").unwrap();
    let env = Env::new();
    env.ok(&["init"]);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cases: Vec<(String, String, &str)> = vec![
        (s(&cert), s(&other_key), "match"),
        (s(&cert), s(&cert), "key"),
        (s(&garbage), s(&key), "certificate"),
        (s(&cert), s(&dir.path().join("nosuch.key")), "nosuch.key"),
        (s(&ca), s(&garbage), "garbage.pem"),
    ];
    for (c, k, want) in cases {
        let port = free_port().to_string();
        let out = env
            .cmd()
            .args(["serve", "--listen", "127.0.0.1:0", "--replication-listen"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["--tls-cert", &c, "--tls-key", &k])
            .timeout(Duration::from_secs(20))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "serve started with {c} {k}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.to_lowercase().contains(want),
            "{c} {k}: the error does not say {want:?}: {err}"
        );
    }
}

/// DEFECT (fixed): every connection to the replication port took a thread
/// until it finished its handshakes, with no bound on how many: 500 peers that
/// send half a TLS record and wait held 500 threads (and std's spawn panics
/// when the OS refuses one, ending the listener).  Now at most
/// `MAX_PENDING` connections wait in their handshakes; more are closed at once,
/// and the receiver goes on serving once they go.
#[test]
fn a_flood_of_silent_connections_takes_bounded_threads() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_pki(dir.path(), "t", "IP:127.0.0.1");
    let t = Site::with_args(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let threads = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .count()
    };
    let before = threads(t.pid());
    let mut held = Vec::new();
    for _ in 0..500 {
        let mut c = TcpStream::connect(("127.0.0.1", t.repl)).unwrap();
        let _ = c.write_all(&[0x16, 3, 1, 2, 0]);
        held.push(c);
    }
    // Let the listener accept them all.
    std::thread::sleep(Duration::from_millis(1500));
    let during = threads(t.pid());
    println!("threads: {before} before, {during} with 500 silent connections");
    assert!(
        during < before + 200,
        "500 silent connections took {} threads",
        during - before
    );
    drop(held);
    // Once they are gone, an agent is served.
    let src = source();
    src.ok(&["volume", "create", "g/d", "--size", "1M"]);
    put(&src, "g/d", &random_bytes(1, MIB));
    src.ok(&["point", "create", "g"]);
    let mut ok = false;
    for _ in 0..100 {
        if push(&src, "g", &t.addr(), &["--tls-ca", ca.to_str().unwrap()]).0 {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "the receiver no longer serves");
}

/// Send `bytes` to `port` one every 2 s, reading what comes back; returns
/// how many were sent when the peer closed the connection, if it did.
fn dribble(port: u16, bytes: &[u8]) -> Option<usize> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    for (i, b) in bytes.iter().enumerate() {
        if c.write_all(&[*b]).is_err() {
            return Some(i);
        }
        for _ in 0..200 {
            let mut buf = [0u8; 64];
            match c.read(&mut buf) {
                Ok(0) => return Some(i + 1),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Some(i + 1),
            }
        }
    }
    None
}

/// DEFECT (fixed): the handshake bound (30 s) applied to each read, not to the
/// handshake: a peer sending one byte every few seconds held its thread for
/// ever, in drclone's handshake and HELLO or in the TLS handshake.  Now the
/// handshakes, up to HELLO, must arrive within 30 s in all.
///
/// Reproduction: drclone's handshake and a 100-byte HELLO, or a TLS record
/// header and its 512 bytes, one byte every 2 s: the receiver read them all.
#[test]
fn a_slow_handshake_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = tls_pki(dir.path(), "t", "IP:127.0.0.1");
    let tls = Site::with_args(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let plain = Site::new();
    let mut hs = Vec::new();
    wire::write_handshake(&mut hs).unwrap();
    wire::write_frame(&mut hs, wire::HELLO, &[b' '; 100]).unwrap();
    let mut record = vec![0x16, 3, 1, 2, 0];
    record.extend_from_slice(&[0u8; 512]);
    // The whole would take 230 s and 1034 s; the receiver must drop each
    // connection long before its last byte (after about 30 s).
    let port = tls.repl;
    let r = record.clone();
    let t = std::thread::spawn(move || dribble(port, &r));
    let p = dribble(plain.repl, &hs);
    let t = t.join().unwrap();
    println!(
        "dropped after {p:?} of {} and {t:?} of {} bytes",
        hs.len(),
        record.len()
    );
    assert!(
        p.is_some_and(|n| n < hs.len()),
        "a handshake and HELLO dribbled over minutes were read"
    );
    assert!(
        t.is_some_and(|n| n < record.len()),
        "a TLS handshake dribbled over minutes was read"
    );
}

// ---- receiver bounds -----------------------------------------------------------

/// Open a plaintext session: handshakes, then HELLO; returns the stream and
/// the receiver's answer (type, body).
fn hello(port: u16, group: &str, vols: &[(String, u64)]) -> (TcpStream, u8, String) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    wire::write_handshake(&mut c).unwrap();
    wire::read_handshake(&mut c).unwrap();
    let h = wire::Hello {
        token: None,
        group: group.into(),
        volumes: vols.to_vec(),
        source: "breakit".into(),
        epoch: None,
    };
    wire::write_frame(&mut c, wire::HELLO, &serde_json::to_vec(&h).unwrap()).unwrap();
    let (t, body) = wire::read_frame(&mut c).unwrap();
    (c, t, String::from_utf8_lossy(&body).into_owned())
}

/// DEFECT (fixed): a refused HELLO created the group: open_session created a
/// missing group before it checked the volumes, so a HELLO naming no volume,
/// a bad disk name, too many volumes or one disk twice left an empty group
/// behind (and one disk twice created the disk before failing).
#[test]
fn a_refused_hello_creates_nothing() {
    let t = Site::new();
    let cases: Vec<(&str, Vec<(String, u64)>)> = vec![
        ("none", vec![]),
        ("badname", vec![("../x".into(), 1 << 20)]),
        ("badsize", vec![("d".into(), 1000)]),
        (
            "toomany",
            (0..257).map(|i| (format!("d{i}"), 1 << 20)).collect(),
        ),
        ("twice", vec![("d".into(), 1 << 20), ("d".into(), 2 << 20)]),
    ];
    for (group, vols) in cases {
        let (_c, typ, body) = hello(t.repl, group, &vols);
        assert_eq!(typ, wire::ERROR, "{group}: HELLO accepted: {body}");
        let st = t.env.json(&["status"]);
        assert!(
            st.as_array().unwrap().is_empty(),
            "{group}: a refused HELLO left {st}"
        );
    }
}

/// Found by this review: CHUNKS were not bounded, and a chunk need not have
/// been offered (HAVE) or lacked, so one session stored and pinned any number
/// of chunks without mapping one.  Now CHUNKS may carry only chunks the cycle
/// said it lacks: HELLO one 512-byte volume; CHUNKS of chunks never offered
/// are refused at once.
#[test]
fn chunks_without_have_count_against_the_cycle_budget() {
    let t = Site::new();
    let (mut c, typ, body) = hello(t.repl, "g", &[("d".into(), 512)]);
    assert_eq!(typ, wire::WELCOME, "{body}");
    let mut n = 0u64;
    let mut refused = None;
    'send: for _ in 0..7 {
        let mut frame = Vec::new();
        for _ in 0..10_000 {
            n += 1;
            let mut data = [0u8; 16];
            data[..8].copy_from_slice(&n.to_be_bytes());
            frame.push(wire::WireChunk {
                id: *blake3::hash(&data).as_bytes(),
                raw_len: 16,
                codec: wire::CODEC_RAW,
                payload: data.to_vec(),
            });
        }
        if wire::write_frame(&mut c, wire::CHUNKS, &wire::encode_chunks(&frame)).is_err() {
            refused = Some(String::new());
            break;
        }
        match wire::read_frame(&mut c) {
            Ok((t, _)) if t == wire::STORED => {}
            Ok((_, body)) => {
                refused = Some(String::from_utf8_lossy(&body).into_owned());
                break 'send;
            }
            Err(e) => {
                refused = Some(e.to_string());
                break 'send;
            }
        }
    }
    assert!(
        refused.is_some(),
        "{n} chunks never offered were stored in one cycle of a 1-block volume"
    );
    let msg = refused.unwrap();
    assert!(n <= 10_000, "{n} chunks sent before the refusal");
    assert!(msg.is_empty() || msg.contains("did not ask for"), "{msg}");
}

/// Found by the review of failback: FUSE did not check writer leases, so a
/// file opened for writing on a head a replication session (or a failback
/// fence) held could write under it.  Now such an open fails with EBUSY, as
/// NBD refuses it; reading stays allowed, and writing works again once the
/// session ends.
#[test]
fn fuse_refuses_a_writer_while_replication_holds_the_head() {
    let t = Site::new();
    t.env.ok(&["group", "create", "g"]);
    t.env.ok(&["volume", "create", "g/d", "--size", "1M"]);
    let m = Mount::start(&t.env);
    let file = m.dir.join("g").join("d");
    let (c, typ, body) = hello(t.repl, "g", &[("d".into(), 1 << 20)]);
    assert_eq!(typ, wire::WELCOME, "{body}");
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect_err("a FUSE writer was let in under a replication session");
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    std::fs::File::open(&file).expect("reading stays allowed");
    drop(c);
    let mut ok = false;
    for _ in 0..100 {
        if std::fs::OpenOptions::new().write(true).open(&file).is_ok() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ok, "writing stayed refused after the session ended");
    m.stop();
}

// ---- hostile review of the pipeline ---------------------------------------------
// Commits d243830 (the receiver stores each CHUNKS frame on a worker thread while
// it reads the next) and 601e579 (agent and push share one pipelined send path).

/// The receiver's peak resident memory (VmHWM), bytes.
fn peak_rss(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = st.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// DEFECT (fixed): a CHUNKS frame was decompressed whole before any chunk was
/// checked, so a frame of zstd bombs within the 32 MiB frame limit made the
/// receiver hold their whole plaintext at once.  Reproduction: HELLO one
/// 4 MiB volume, HAVE 16,384 made-up ids (within the cycle's budget), then
/// one CHUNKS frame of ~1 MiB: each id with a 64 KiB block of zeros
/// compressed to a few bytes.  The daemon's peak RSS grew by over 1 GiB
/// before it found the first id wrong (65,536 ids, which any 1-block volume's
/// budget allows, make it 4 GiB; 64 sessions at once, 256 GiB).  Now a frame
/// is decompressed, checked and stored in slices of bounded plaintext.
#[test]
fn a_frame_of_zstd_bombs_is_not_inflated_whole() {
    let t = Site::new();
    let pid = t.pid();
    let (mut c, typ, body) = hello(t.repl, "g", &[("d".into(), 4 * MIB as u64)]);
    assert_eq!(typ, wire::WELCOME, "{body}");
    const N: u64 = 16_384;
    let ids: Vec<[u8; 32]> = (0..N)
        .map(|i| *blake3::hash(&i.to_be_bytes()).as_bytes())
        .collect();
    wire::write_frame(&mut c, wire::HAVE, &wire::encode_ids(&ids)).unwrap();
    let (ty, _) = wire::read_frame(&mut c).unwrap();
    assert_eq!(ty, wire::LACK);
    let zeros = vec![0u8; 64 << 10];
    let bomb = wire::pack(ids[0], &zeros);
    assert_eq!(bomb.codec, wire::CODEC_ZSTD);
    let frame: Vec<wire::WireChunk> = ids
        .iter()
        .map(|id| wire::WireChunk {
            id: *id,
            ..bomb.clone()
        })
        .collect();
    let frame = wire::encode_chunks(&frame);
    assert!(frame.len() < 2 * MIB, "{} bytes", frame.len());
    let before = peak_rss(pid);
    wire::write_frame(&mut c, wire::CHUNKS, &frame).unwrap();
    let (ty, body) = wire::read_frame(&mut c).unwrap();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(ty, wire::ERROR, "{text}");
    assert!(text.contains("does not match its data"), "{text}");
    let grew = peak_rss(pid).saturating_sub(before);
    assert!(
        grew < 256 * MIB as u64,
        "a {} KiB frame grew the receiver's peak memory by {} MiB",
        frame.len() >> 10,
        grew >> 20
    );
    // The daemon serves on.
    let (_c, typ, body) = hello(t.repl, "g", &[("d".into(), 4 * MIB as u64)]);
    assert_eq!(typ, wire::WELCOME, "{body}");
}

/// DEFECT (fixed): while a CHUNKS frame was being stored, the receiver read
/// on for as long as the sender sent, holding every reply in memory until the
/// store was done; a sender that sends without reading its replies met no
/// back-pressure at all (before the pipeline the receiver's own writes
/// blocked it).  Reproduction: the store of one frame held (failpoint
/// `repl-store-frame`, as a slow disk holds it), the sender writes empty HAVE
/// frames (5 bytes each, free of the cycle's budget) and reads nothing: the
/// receiver took all 8 MiB of them, holding 1.7 million replies (about
/// 60 bytes of memory per 5 bytes sent, for as long as the store takes).
/// Now at most `receiver::MAX_HELD` replies wait behind a store; past that
/// the receiver waits for the store before it reads on.
#[cfg(feature = "failpoints")]
#[test]
fn a_sender_that_reads_no_replies_is_held_back_while_a_frame_is_stored() {
    use drclone::engine::store::{InitOptions, Store};
    use std::os::unix::net::UnixStream;
    use std::sync::{mpsc, Arc, Mutex};
    let _f = fail::FailScenario::setup();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("s");
    Store::init(
        &dir,
        &InitOptions {
            chunk_size: 64 << 10,
            ..Default::default()
        },
    )
    .unwrap();
    let s = Arc::new(Store::open(&dir, None).unwrap());
    let (mut a, b) = UnixStream::pair().unwrap();
    let s2 = s.clone();
    let h = std::thread::spawn(move || {
        drclone::repl::receiver::serve_connection(&s2, b, "test", &Default::default())
    });
    wire::write_handshake(&mut a).unwrap();
    wire::read_handshake(&mut a).unwrap();
    let hello = wire::Hello {
        token: None,
        group: "g".into(),
        volumes: vec![("d".into(), 64 << 10)],
        source: "agent:breakit".into(),
        epoch: None,
    };
    wire::write_frame(&mut a, wire::HELLO, &serde_json::to_vec(&hello).unwrap()).unwrap();
    assert_eq!(wire::read_frame(&mut a).unwrap().0, wire::WELCOME);
    let data = random_bytes(7, 64 << 10);
    let id = *blake3::hash(&data).as_bytes();
    wire::write_frame(&mut a, wire::HAVE, &wire::encode_ids(&[id])).unwrap();
    assert_eq!(wire::read_frame(&mut a).unwrap().0, wire::LACK);
    // The worker's store waits until the test lets it go.
    let (go, wait) = mpsc::channel::<()>();
    let wait = Mutex::new(wait);
    fail::cfg_callback("repl-store-frame", move || {
        let _ = wait.lock().unwrap().recv();
    })
    .unwrap();
    let c = wire::pack(id, &data);
    wire::write_frame(&mut a, wire::CHUNKS, &wire::encode_chunks(&[c])).unwrap();
    let mut flood = Vec::new();
    for _ in 0..13_107 {
        wire::write_frame(&mut flood, wire::HAVE, &[]).unwrap();
    }
    a.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut taken = 0usize;
    while taken < 8 * MIB {
        match a.write(&flood) {
            Ok(n) => taken += n,
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "{e}"
                );
                break;
            }
        }
    }
    let _ = go.send(());
    fail::remove("repl-store-frame");
    a.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (t, body) = wire::read_frame(&mut a).unwrap();
    assert_eq!((t, body), (wire::STORED, 1u32.to_be_bytes().to_vec()));
    drop(a);
    let _ = h.join().unwrap();
    assert!(
        taken < 4 * MIB,
        "the receiver read {taken} bytes of frames ahead of a store it had not \
         finished, holding a reply to each"
    );
}

/// HELD: a store error on the worker while the sender has more large frames
/// on the way reaches the sender as the receiver's ERROR text (not only a
/// reset connection), no point is made, and the daemon serves on.  A CHUNKS
/// frame whose chunk lies about its id, then 48 MiB more of good frames
/// written without reading a reply (the receiver closes under them).
#[test]
fn a_store_error_mid_pipeline_reaches_the_sender_as_its_text() {
    let t = Site::new();
    let (mut c, typ, body) = hello(t.repl, "g", &[("d".into(), 64 * MIB as u64)]);
    assert_eq!(typ, wire::WELCOME, "{body}");
    let blocks: Vec<Vec<u8>> = (0..768).map(|i| random_bytes(500 + i, 64 << 10)).collect();
    let liar_id = *blake3::hash(b"claimed").as_bytes();
    let mut offer: Vec<[u8; 32]> = vec![liar_id];
    offer.extend(blocks.iter().map(|b| *blake3::hash(b).as_bytes()));
    wire::write_frame(&mut c, wire::HAVE, &wire::encode_ids(&offer)).unwrap();
    assert_eq!(wire::read_frame(&mut c).unwrap().0, wire::LACK);
    let lie = wire::WireChunk {
        id: liar_id,
        raw_len: 64 << 10,
        codec: wire::CODEC_RAW,
        payload: random_bytes(9, 64 << 10),
    };
    wire::write_frame(&mut c, wire::CHUNKS, &wire::encode_chunks(&[lie])).unwrap();
    let mut write_failed = false;
    for part in blocks.chunks(256) {
        let f: Vec<wire::WireChunk> = part
            .iter()
            .map(|b| wire::pack(*blake3::hash(b).as_bytes(), b))
            .collect();
        if wire::write_frame(&mut c, wire::CHUNKS, &wire::encode_chunks(&f)).is_err() {
            write_failed = true;
            break;
        }
    }
    let (ty, body) = wire::read_frame(&mut c).expect("the ERROR frame can be read");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(ty, wire::ERROR, "write failed: {write_failed}; {text}");
    assert!(text.contains("does not match its data"), "{text}");
    drop(c);
    assert!(t.points("g").is_empty());
    let (_c, typ, body) = hello(t.repl, "g", &[("d".into(), 64 * MIB as u64)]);
    assert_eq!(typ, wire::WELCOME, "{body}");
}
