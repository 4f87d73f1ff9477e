//! The S3 pack backend against a real single-node Ceph (mon, mgr, one bluestore
//! OSD on a sparse file, radosgw) started by `scripts/ceph-test-cluster.sh`: nothing
//! is mocked.  The cluster is started once for this binary, shared by its tests
//! (which take turns: one of them stops radosgw), and stopped by PID at exit.
//! A missing Ceph package fails the tests (scripts/setup.sh installs them).

mod common;
mod model_ops;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use drclone::engine::s3::S3Config;
use proptest::prelude::*;

const BUCKET: &str = "drclone-test";

struct Cluster {
    endpoint: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-test-cluster.sh")
}

/// On tmpfs when there is one: the monitor will not start on a disk with (about)
/// 0% free, and the sparse OSD file costs only what is written.
fn cluster_dir() -> PathBuf {
    // A dedicated directory when another run may be using the default one.
    if let Some(d) = std::env::var_os("DRCLONE_S3_TEST_CEPH_DIR") {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join("drclone-s3-test-ceph")
}

extern "C" fn stop_cluster() {
    let _ = std::process::Command::new(script())
        .arg("stop")
        .arg(cluster_dir())
        .status();
}

/// Run the cluster script; require success; stdout.
fn ceph(args: &[&str]) -> String {
    let out = std::process::Command::new(script())
        .args(&args[..1])
        .arg(cluster_dir())
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ceph-test-cluster.sh {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The shared cluster (started on first use) and this test's turn.
fn cluster() -> (&'static Cluster, MutexGuard<'static, ()>) {
    static C: OnceLock<Cluster> = OnceLock::new();
    static TURN: Mutex<()> = Mutex::new(());
    let c = C.get_or_init(|| {
        for t in [
            "ceph-mon", "ceph-mgr", "ceph-osd", "radosgw", "ceph", "uuidgen", "curl",
        ] {
            need(t);
        }
        // Two consecutive free ports for the monitor (v1 and v2).
        let mon = loop {
            let p = free_port();
            if p < 65000 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
                break p;
            }
        };
        let rgw = free_port();
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(stop_cluster) };
        let t0 = Instant::now();
        let out = ceph(&["start", &mon.to_string(), &rgw.to_string()]);
        let endpoint = out.lines().last().unwrap().trim().to_string();
        eprintln!("ceph cluster up in {:.1?}: {endpoint}", t0.elapsed());
        ceph(&["s3", "mb", BUCKET]);
        // Children (drclone init, serve, ...) and this process's stores use these.
        std::env::set_var("AWS_ACCESS_KEY_ID", "TESTKEY");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "TESTSECRET");
        Cluster { endpoint }
    });
    let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    (c, turn)
}

fn unique(tag: &str) -> String {
    format!("{tag}-{}", uuid::Uuid::new_v4().simple())
}

/// `drclone init` of an S3-backed store under `prefix`, with extra init args.
fn s3_store(c: &Cluster, prefix: &str, extra: &[&str]) -> Env {
    let env = Env::new();
    let url = format!("s3://{BUCKET}/{prefix}");
    let mut args = vec!["init", "--backend", &url, "--s3-endpoint", &c.endpoint];
    args.extend_from_slice(extra);
    env.ok(&args);
    env
}

/// Objects under `prefix/`: (key, size).
fn objects(prefix: &str) -> Vec<(String, u64)> {
    ceph(&["s3", "ls", BUCKET, &format!("{prefix}/")])
        .lines()
        .map(|l| {
            let (k, s) = l.rsplit_once(' ').unwrap();
            (k.to_string(), s.parse().unwrap())
        })
        .collect()
}

fn backlog(env: &Env) -> serde_json::Value {
    let st = env.json(&["status"]);
    st[0]["upload_backlog"].clone()
}

/// Wait (at most 180 s) until the store has no pack waiting for upload.
fn wait_drained(env: &Env) {
    let t0 = Instant::now();
    loop {
        let b = backlog(env);
        if b["packs"] == 0 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "uploads did not drain: {b}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn local_pack_files(env: &Env) -> usize {
    walk(&env.store.join("packs"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .count()
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn random_file(env: &Env, name: &str, seed: u64, len: usize) -> PathBuf {
    let p = env.path(name);
    std::fs::write(&p, random_bytes(seed, len)).unwrap();
    p
}

// ---- (a) the model-based operation mix on the S3 backend --------------------------

fn model_cfg(c: &Cluster) -> S3Config {
    S3Config {
        bucket: BUCKET.into(),
        prefix: unique("model"),
        endpoint: Some(c.endpoint.clone()),
        region: "us-east-1".into(),
        cache_size: 4 << 20,
        pending_max: None,
        credentials_file: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 50, ..ProptestConfig::default() })]

    /// Writes, trims, points, clones, removals, gc, reopen, crash, flush and
    /// waits for the upload queue to drain (so reads go to radosgw through the
    /// cache), every read checked against the model; at the end everything is
    /// removed and gc leaves no pack, local or remote.
    #[test]
    fn model_operation_mix_on_s3_matches_the_model(
        ops in prop::collection::vec(model_ops::op_with_drain(), 1..40)
    ) {
        let (c, _turn) = cluster();
        let cfg = model_cfg(c);
        let prefix = cfg.prefix.clone();
        model_ops::run(ops, false, Some(cfg));
        let left: Vec<_> = objects(&prefix)
            .into_iter()
            .filter(|(k, _)| k.contains("/packs/"))
            .collect();
        prop_assert!(left.is_empty(), "pack objects left after removing everything: {left:?}");
    }
}

// ---- (b) kill -9 of serve mid-upload -----------------------------------------------

#[test]
fn kill9_of_serve_mid_upload_loses_no_acknowledged_write_and_uploads_the_backlog() {
    let (c, _turn) = cluster();
    need("qemu-img");
    let prefix = unique("kill9");
    let env = s3_store(c, &prefix, &["--pack-size", "1M"]);
    env.ok(&["group", "create", "g"]);
    env.ok(&["volume", "create", "g/d", "--size", "16M"]);
    let data = random_file(&env, "data.raw", 9, 16 << 20);
    let srv = Server::start(&env);
    // radosgw frozen (SIGSTOP): the uploader's PUT of the first sealed pack hangs
    // mid-request while the rest queue up behind it.
    ceph(&["rgw-pause"]);
    let res = std::panic::catch_unwind(|| {
        // qemu-img convert flushes at the end: every byte is acknowledged durable.
        run(
            "qemu-img",
            &[
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "raw",
                data.to_str().unwrap(),
                &srv.tcp("g/d"),
            ],
        );
        let b = backlog(&env);
        assert!(
            b["packs"].as_u64().unwrap() >= 8,
            "packs should be waiting: {b}"
        );
        assert!(b["oldest_seconds"].as_u64().is_some(), "{b}");
    });
    srv.kill9();
    ceph(&["rgw-resume"]);
    res.unwrap();
    let waiting = local_pack_files(&env);
    assert!(
        waiting >= 8,
        "{waiting} pack files left locally by the kill"
    );
    // Restart: the packs still local are the queue; they are all uploaded.
    let srv = Server::start(&env);
    wait_drained(&env);
    assert_eq!(local_pack_files(&env), 0, "local copies go once uploaded");
    let remote = objects(&prefix)
        .iter()
        .filter(|(k, _)| k.contains("/packs/"))
        .count();
    assert!(
        remote >= waiting,
        "{remote} pack objects for {waiting} uploads"
    );
    drop(srv);
    // A fresh daemon (empty caches) reads every byte back from radosgw.
    let srv = Server::start(&env);
    qemu_compare(&srv.tcp("g/d"), &data);
    drop(srv);
    let out = env.ok(&["verify"]);
    assert!(out.contains("checked 256 chunks"), "{out}");
}

// ---- (c) radosgw down while fio writes: the bound, ENOSPC, recovery ------------------

fn fio(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("timeout")
        .args(["--kill-after=10", "300", "fio"])
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// fio arguments writing (or, with `verify_only`, checking) `size` bytes at
/// `offset` of the export, sequential 1 MiB writes of fresh random data with a
/// crc32c header per 64 KiB.
fn fio_args(uri: &str, offset: u64, size: u64, verify_only: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        "--name=s3",
        "--ioengine=nbd",
        "--rw=write",
        "--bs=1M",
        "--iodepth=1",
        "--verify=crc32c",
        "--verify_interval=64k",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--refill_buffers=1",
        "--randrepeat=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("--uri={uri}"));
    a.push(format!("--offset={offset}"));
    a.push(format!("--size={size}"));
    if verify_only {
        a.push("--verify_only=1".into());
    } else {
        a.push("--do_verify=0".into());
    }
    a
}

#[test]
fn radosgw_down_writes_go_on_under_the_bound_then_enospc_then_all_readable() {
    let (c, _turn) = cluster();
    need("fio");
    let prefix = unique("down");
    let env = s3_store(
        c,
        &prefix,
        &["--pack-size", "4M", "--s3-pending-max", "24M"],
    );
    env.ok(&["group", "create", "g"]);
    env.ok(&["volume", "create", "g/d", "--size", "64M"]);
    let log = env.path("serve.log");
    let srv = Server::start_logged(&env, &[], &log);
    let uri = srv.tcp("g/d");
    let down = Instant::now();
    ceph(&["rgw-stop"]);
    let res = std::panic::catch_unwind(|| {
        // Under the bound: every write is acknowledged from the local disk.
        let a = fio_args(&uri, 0, 12 << 20, false);
        let (ok, out) = fio(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "fio under the bound failed: {out}");
        // Past the bound: ENOSPC, and the daemon says why.
        let a = fio_args(&uri, 12 << 20, 40 << 20, false);
        let (ok, out) = fio(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!ok, "fio past the bound succeeded: {out}");
        assert!(
            out.contains("No space left on device"),
            "fio did not see ENOSPC: {out}"
        );
        // fio stops at the first failed write (iodepth 1, sequential): every
        // write before its offset was acknowledged.
        let failed_at: u64 = out
            .split("offset=")
            .nth(1)
            .and_then(|s| s.split(|ch: char| !ch.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no failed offset in fio's output: {out}"));
        assert!(
            failed_at >= 12 << 20 && failed_at <= 24 << 20,
            "failed at {failed_at}: {out}"
        );
        let b = backlog(&env);
        assert!(b["packs"].as_u64().unwrap() >= 2, "{b}");
        assert!(b["bytes"].as_u64().unwrap() <= 24 << 20, "{b}");
        assert!(!b["last_error"].is_null(), "uploads failing is shown: {b}");
        let said = log_grep(&log, &["write refused"]);
        assert!(
            said.contains("s3-pending-max") && said.contains(&format!("s3://{BUCKET}/{prefix}")),
            "the refusal names the backlog and the bound: {}",
            log_tail(&log, 20)
        );
        failed_at
    });
    // radosgw stays down about 30 s in all, then comes back.
    if let Some(rest) = Duration::from_secs(30).checked_sub(down.elapsed()) {
        std::thread::sleep(rest);
    }
    ceph(&["rgw-start"]);
    let failed_at = res.unwrap();
    wait_drained(&env);
    assert_eq!(backlog(&env)["last_error"], serde_json::Value::Null);
    // Room again: writes are accepted.
    let a = fio_args(&uri, 48 << 20, 8 << 20, false);
    let (ok, out) = fio(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "fio after recovery failed: {out}");
    drop(srv);
    // A fresh daemon reads everything acknowledged back from radosgw.
    let srv = Server::start(&env);
    let uri = srv.tcp("g/d");
    for (off, len) in [(0, failed_at), (48 << 20, 8 << 20)] {
        let a = fio_args(&uri, off, len, true);
        let (ok, out) = fio(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "verify of {off}+{len} failed: {out}");
    }
    drop(srv);
    env.ok(&["verify"]);
}

// ---- (d) verify names a corrupted and a missing object --------------------------------

#[test]
fn verify_names_a_corrupted_object_and_a_missing_one() {
    let (c, _turn) = cluster();
    let prefix = unique("verify");
    let env = s3_store(c, &prefix, &["--pack-size", "1M"]);
    env.ok(&["group", "create", "g"]);
    env.ok(&["volume", "create", "g/d", "--size", "8M"]);
    let data = random_file(&env, "data.raw", 4, 4 << 20);
    env.ok(&["import", "g/d", data.to_str().unwrap()]);
    let srv = Server::start(&env);
    wait_drained(&env);
    drop(srv);
    env.ok(&["verify"]);
    let packs: Vec<(String, u64)> = objects(&prefix)
        .into_iter()
        .filter(|(k, _)| k.contains("/packs/"))
        .collect();
    assert!(packs.len() >= 3, "{packs:?}");
    // One byte flipped in a record payload of the first object (same size).
    let (bad, _) = &packs[0];
    ceph(&["s3", "corrupt", BUCKET, bad, "5000"]);
    let out = env.cmd().arg("verify").output().unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let url = format!("s3://{BUCKET}/{bad}");
    assert!(text.contains(&url) && text.contains("CRC"), "{text}");
    // One object removed: named as missing.
    let (gone, _) = &packs[1];
    ceph(&["s3", "rm", BUCKET, gone]);
    let v = env.cmd().args(["verify", "--json"]).output().unwrap();
    assert!(!v.status.success());
    let r: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    let gone_url = format!("s3://{BUCKET}/{gone}");
    let bad_packs = r["bad_packs"].to_string();
    assert!(
        bad_packs.contains(&gone_url) && bad_packs.contains("missing"),
        "{r}"
    );
    assert!(r["bad"].to_string().contains(&url), "{r}");
}

// ---- (e) two stores, one bucket -----------------------------------------------------

#[test]
fn two_stores_in_one_bucket_never_touch_each_others_objects() {
    let (c, _turn) = cluster();
    need("qemu-img");
    let base = unique("two");
    // "a" and "a-b": one prefix is a string prefix of the other.
    let (pa, pb) = (format!("{base}/a"), format!("{base}/a-b"));
    let a = s3_store(c, &pa, &["--pack-size", "1M"]);
    let b = s3_store(c, &pb, &["--pack-size", "1M"]);
    // A prefix is claimed by its store: a third store there is refused by name.
    let third = Env::new();
    let err = third.fails(&[
        "init",
        "--backend",
        &format!("s3://{BUCKET}/{pa}"),
        "--s3-endpoint",
        &c.endpoint,
    ]);
    assert!(err.contains("give each store its own prefix"), "{err}");
    let mut files = Vec::new();
    for (i, env) in [&a, &b].into_iter().enumerate() {
        env.ok(&["group", "create", "g"]);
        env.ok(&["volume", "create", "g/d", "--size", "4M"]);
        // The same data in both: each store keeps its own copy.
        let f = random_file(env, "data.raw", 77, 3 << 20);
        env.ok(&["import", "g/d", f.to_str().unwrap()]);
        env.ok(&["volume", "create", "g/e", "--size", "4M"]);
        let g = random_file(env, "other.raw", 100 + i as u64, 2 << 20);
        env.ok(&["import", "g/e", g.to_str().unwrap()]);
        let srv = Server::start(env);
        wait_drained(env);
        drop(srv);
        files.push(f);
    }
    let b_before = objects(&pb);
    assert!(
        b_before
            .iter()
            .filter(|(k, _)| k.contains("/packs/"))
            .count()
            >= 5
    );
    // Everything of A goes, and A collects its garbage.
    a.ok(&["volume", "rm", "g/d"]);
    a.ok(&["volume", "rm", "g/e"]);
    let rep = a.json(&["gc"]);
    assert!(rep["packs_deleted"].as_u64().unwrap() >= 5, "{rep}");
    let a_left: Vec<_> = objects(&pa)
        .into_iter()
        .filter(|(k, _)| k.contains("/packs/"))
        .collect();
    assert!(a_left.is_empty(), "{a_left:?}");
    assert_eq!(objects(&pb), b_before, "gc in A touched B's objects");
    // B is whole.
    b.ok(&["verify"]);
    let srv = Server::start(&b);
    let mut want = std::fs::read(&files[1]).unwrap();
    want.resize(4 << 20, 0);
    let wf = b.path("want.raw");
    std::fs::write(&wf, want).unwrap();
    qemu_compare(&srv.tcp("g/d"), &wf);
}

// ---- rebuild on a new host: init --from-backend ------------------------------------

/// The DR host is lost (`kill -9` of its daemon, its directory never used
/// again); `init --from-backend` on a fresh directory rebuilds the store from
/// the bucket, and every point of every volume equals the original byte for
/// byte (`qemu-img compare` over NBD).  A point removed and collected before
/// the loss is gone, and so are the pack objects only it used (the sweep after
/// the GC's catalog).  The lost host, started again, uploads nothing: the
/// prefix belongs to the rebuilt store now.
#[test]
fn a_store_rebuilt_from_its_bucket_serves_every_point_byte_for_byte() {
    let (c, _turn) = cluster();
    need("qemu-img");
    let prefix = unique("rebuild");
    let env = s3_store(c, &prefix, &["--pack-size", "1M"]);
    let vols = [("db", "data", 8u64), ("db", "log", 4), ("web", "root", 6)];
    for g in ["db", "web"] {
        env.ok(&["group", "create", g]);
    }
    for (g, d, mib) in vols {
        env.ok(&[
            "volume",
            "create",
            &format!("{g}/{d}"),
            "--size",
            &format!("{mib}M"),
        ]);
    }
    let srv = Server::start(&env);
    // Four rounds: 1 MiB of new data in each volume, then a point of each group.
    let mut points: Vec<(String, u64)> = Vec::new();
    for r in 0..4u64 {
        for (i, (g, d, mib)) in vols.iter().enumerate() {
            let off = (r * 1_300_000) % ((mib - 1) << 20);
            nbd_write_random(
                &srv.tcp(&format!("{g}/{d}")),
                off,
                1 << 20,
                r * 10 + i as u64,
            );
        }
        for g in ["db", "web"] {
            let p = env.json(&["point", "create", g]);
            points.push((g.to_string(), p["id"].as_u64().unwrap()));
        }
    }
    // Point 1 of db goes, and a GC collects what only it used.
    let (g0, p0) = points.remove(0);
    env.ok(&["point", "rm", &g0, &p0.to_string()]);
    env.ok(&["gc"]);
    // The expected content of every remaining point, read from the original.
    let mut expect = Vec::new();
    for (g, id) in &points {
        for (vg, d, _) in vols {
            if vg == g {
                let f = env.path(&format!("{g}-{d}-{id}.raw"));
                run(
                    "qemu-img",
                    &[
                        "convert",
                        "-f",
                        "raw",
                        "-O",
                        "raw",
                        &srv.tcp(&format!("{g}/{d}@{id}")),
                        f.to_str().unwrap(),
                    ],
                );
                expect.push((format!("{g}/{d}@{id}"), f));
            }
        }
    }
    // Everything up and the catalog after the GC in the bucket, then the host is lost.
    wait_drained(&env);
    let t0 = Instant::now();
    loop {
        let cat = backlog(&env)["catalog"].clone();
        if cat["waiting"] == false && cat["uploaded_seq"].is_u64() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "catalog not uploaded: {cat}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    srv.kill9();

    let fresh = Env::new();
    let url = format!("s3://{BUCKET}/{prefix}");
    let rep = fresh.json(&["init", "--from-backend", &url, "--s3-endpoint", &c.endpoint]);
    assert_eq!(rep["groups"], 2, "{rep}");
    assert_eq!(rep["volumes"], 3, "{rep}");
    assert_eq!(rep["points"], points.len(), "{rep}");
    assert_eq!(rep["chunks_lost"], 0, "{rep}");
    let listed = fresh.json(&["point", "list", &g0]);
    assert!(
        listed.as_array().unwrap().iter().all(|p| p["id"] != p0),
        "the removed point came back: {listed}"
    );
    let srv2 = Server::start(&fresh);
    for (export, f) in &expect {
        qemu_compare(&srv2.tcp(export), f);
    }
    let v = fresh.ok(&["verify"]);
    assert!(v.contains("checked"), "{v}");
    drop(srv2);

    // A rebuild needs an empty directory, and a prefix holding a catalog.
    let e = fresh.fails(&["init", "--from-backend", &url, "--s3-endpoint", &c.endpoint]);
    assert!(e.contains("not empty"), "{e}");
    let none = Env::new();
    let e = none.fails(&[
        "init",
        "--from-backend",
        &format!("s3://{BUCKET}/{}", unique("nothing")),
        "--s3-endpoint",
        &c.endpoint,
    ]);
    assert!(e.contains("no catalog"), "{e}");

    // The lost host comes back: it may read, but it uploads nothing there.
    std::env::set_var("DRCLONE_S3_CLOSE_WAIT_SECS", "3");
    let before = objects(&prefix);
    let srv3 = Server::start(&env);
    nbd_write_random(&srv3.tcp("db/data"), 0, 2 << 20, 99);
    let st = env.ok(&["point", "create", "db"]);
    assert!(st.contains("created point"), "{st}");
    std::thread::sleep(Duration::from_secs(3));
    let b = backlog(&env);
    let err = b["last_error"]
        .as_str()
        .or(b["catalog"]["error"].as_str())
        .unwrap_or("");
    assert!(err.contains("rebuilt elsewhere"), "{b}");
    drop(srv3);
    let after = objects(&prefix);
    let new: Vec<_> = after
        .iter()
        .filter(|(k, _)| !before.iter().any(|(b, _)| b == k))
        .collect();
    assert!(new.is_empty(), "the old host wrote {new:?}");
    std::env::remove_var("DRCLONE_S3_CLOSE_WAIT_SECS");
}

// ---- hostile review ------------------------------------------------------------------

/// A point reached in another thread, held there until released
/// (`fail::cfg_callback`).
#[cfg(feature = "failpoints")]
#[derive(Clone, Default)]
struct Hold(std::sync::Arc<(Mutex<(bool, bool)>, std::sync::Condvar)>);

#[cfg(feature = "failpoints")]
impl Hold {
    /// Hold every thread that reaches failpoint `name` until [`Hold::release`].
    fn at(name: &str) -> Hold {
        let h = Hold::default();
        let h2 = h.clone();
        fail::cfg_callback(name, move || {
            let (m, cv) = &*h2.0;
            let mut s = m.lock().unwrap();
            s.0 = true;
            cv.notify_all();
            while !s.1 {
                s = cv.wait(s).unwrap();
            }
        })
        .unwrap();
        h
    }
    fn wait_reached(&self) {
        let (m, cv) = &*self.0;
        let mut s = m.lock().unwrap();
        while !s.0 {
            s = cv.wait_timeout(s, Duration::from_secs(120)).unwrap().0;
        }
    }
    fn release(&self) {
        let (m, cv) = &*self.0;
        m.lock().unwrap().1 = true;
        cv.notify_all();
    }
}

/// A store in this process with 64 KiB packs under a new prefix.
fn store_here(c: &Cluster, dir: &Path, tag: &str) -> (S3Config, drclone::Store) {
    let mut cfg = model_cfg(c);
    cfg.prefix = unique(tag);
    let path = dir.join("store");
    drclone::Store::init(
        &path,
        &drclone::InitOptions {
            pack_size: 64 << 10,
            s3: Some(cfg.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    (cfg, drclone::Store::open(&path, None).unwrap())
}

fn catalog_status(store: &drclone::Store) -> serde_json::Value {
    let b = store.chunks.backend.backlog().unwrap();
    serde_json::to_value(b.catalog.unwrap()).unwrap()
}

/// Found by the hostile review: a checkpoint (at a point) lists packs that are
/// still waiting for upload; a GC deletes them before they are uploaded (they
/// leave the queue, never to be uploaded); the catalog uploader then saw none
/// of its packs waiting and uploaded the catalog, which named objects that do
/// not exist.  Until the GC's own catalog replaced it, a rebuild from the bucket
/// restored the point with its chunks lost (`packs_missing` non-empty, the
/// point's blocks repaired to zeros).  A catalog is now uploaded only once
/// every pack it lists as sealed is in the bucket.
#[cfg(feature = "failpoints")]
#[test]
fn a_catalog_naming_packs_gc_deleted_before_their_upload_never_reaches_the_bucket() {
    let (c, _turn) = cluster();
    let _fp = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let (cfg, store) = store_here(c, dir.path(), "gcpending");
    let store = std::sync::Arc::new(store);
    store.create_group("g").unwrap();
    store.create_volume("g", "d", 1 << 20).unwrap();
    // The open's catalog is in the bucket.
    let t0 = Instant::now();
    while !(catalog_status(&store)["uploaded_seq"].is_u64()
        && catalog_status(&store)["waiting"] == false)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{}",
            catalog_status(&store)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let base = catalog_status(&store)["uploaded_seq"].clone();
    // Pack uploads held; a point's catalog lists the packs of 256 KiB of data.
    let uploads = Hold::at("s3-before-put");
    let view = store.view("g", "d", None).unwrap();
    store.write(&view, 0, &random_bytes(5, 256 << 10)).unwrap();
    let p = store.create_point("g", false, None).unwrap();
    uploads.wait_reached();
    assert!(catalog_status(&store)["waiting"] == true);
    // The point and the head's data go; GC deletes the packs (still queued)
    // and is held before its own checkpoint.
    store.remove_point("g", &p.id.to_string()).unwrap();
    store.zero(&view, 0, 1 << 20).unwrap();
    let gc_hold = Hold::at("gc-before-catalog");
    let s2 = store.clone();
    let gc = std::thread::spawn(move || drclone::engine::gc::gc(&s2).unwrap());
    gc_hold.wait_reached();
    let b = store.chunks.backend.backlog().unwrap();
    assert_eq!(b.packs, 0, "gc deleted the queued packs: {b:?}");
    // Uploads go on: the point's catalog must not reach the bucket (it would
    // have within a few of its 200 ms polls).
    uploads.release();
    let t0 = Instant::now();
    while catalog_status(&store)["uploaded_seq"] == base && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // The host is lost now: a rebuild from the bucket finds every pack its
    // catalog names.
    let fresh = dir.path().join("rebuilt");
    let rep = drclone::engine::s3::rebuild::rebuild(&fresh, &cfg, None).unwrap();
    assert!(
        rep.packs_missing.is_empty() && rep.chunks_lost == 0,
        "the newest catalog in the bucket names objects that do not exist: {rep:?}"
    );
    gc_hold.release();
    let rep = gc.join().unwrap();
    assert!(rep.packs_deleted >= 4, "{rep:?}");
    fail::remove("s3-before-put");
    fail::remove("gc-before-catalog");
}

/// The marker object of `prefix` (its bytes): who owns the prefix.
fn marker(prefix: &str) -> (String, u64) {
    objects(prefix)
        .into_iter()
        .find(|(k, _)| k.ends_with("/drclone-store.json"))
        .unwrap()
}

/// Found by the hostile review: `init --from-backend` of an encrypted store
/// wrote the bucket's marker (fencing the old host) and filled the directory
/// before it looked at the key, then failed to open: without `--key-file` (the
/// path recorded on the lost host is gone) or with a wrong key, the prefix was
/// taken over by a store nobody could open, and the directory had to be
/// emptied by hand to try again.  And with the right key, the rebuilt store
/// kept the lost host's key path, so every later command needed `--key-file`.
/// Now the key is checked before anything is written, and the path given is
/// recorded.
#[test]
fn rebuilding_an_encrypted_store_checks_the_key_first_and_records_it() {
    let (c, _turn) = cluster();
    let prefix = unique("enc");
    let env = Env::new();
    let key = env.path("key");
    let url = format!("s3://{BUCKET}/{prefix}");
    env.ok(&[
        "init",
        "--encrypt",
        "--key-file",
        key.to_str().unwrap(),
        "--backend",
        &url,
        "--s3-endpoint",
        &c.endpoint,
        "--pack-size",
        "1M",
    ]);
    env.ok(&["group", "create", "g"]);
    env.ok(&["volume", "create", "g/d", "--size", "4M"]);
    let data = random_file(&env, "data.raw", 31, 3 << 20);
    env.ok(&["import", "g/d", data.to_str().unwrap()]);
    let pid = env.json(&["point", "create", "g"])["id"].as_u64().unwrap();
    // The host is lost with its key file; a copy was kept elsewhere.
    let kept = Env::new();
    let copy = kept.path("kept.key");
    std::fs::rename(&key, &copy).unwrap();
    let owner = marker(&prefix);

    let fresh = Env::new();
    let e = fresh.fails(&["init", "--from-backend", &url, "--s3-endpoint", &c.endpoint]);
    assert!(e.contains("encrypted") && e.contains("--key-file"), "{e}");
    let wrong = fresh.path("wrong.key");
    let other = Env::new();
    other.ok(&["init", "--encrypt", "--key-file", wrong.to_str().unwrap()]);
    let rebuild_args = |key: &Path| {
        let k = key.to_str().unwrap().to_string();
        [
            "init",
            "--from-backend",
            &url,
            "--s3-endpoint",
            &c.endpoint,
            "--key-file",
            &k,
        ]
        .map(String::from)
    };
    let e = fresh.fails(&rebuild_args(&wrong).each_ref().map(String::as_str));
    assert!(e.contains("wrong key"), "{e}");
    // Neither attempt took the prefix or left anything behind.
    assert_eq!(marker(&prefix), owner, "a failed rebuild took the prefix");
    assert!(
        !fresh.store.exists() || std::fs::read_dir(&fresh.store).unwrap().next().is_none(),
        "a failed rebuild left files in {}",
        fresh.store.display()
    );

    let rep = fresh.json(&rebuild_args(&copy).each_ref().map(String::as_str));
    assert_eq!(rep["points"], 1, "{rep}");
    assert_eq!(rep["chunks_lost"], 0, "{rep}");
    // No --key-file from now on: the rebuilt store knows where its key is.
    let v = fresh.ok(&["verify"]);
    assert!(v.contains("checked"), "{v}");
    let srv = Server::start(&fresh);
    let mut want = std::fs::read(&data).unwrap();
    want.resize(4 << 20, 0);
    let wf = fresh.path("want.raw");
    std::fs::write(&wf, want).unwrap();
    qemu_compare(&srv.tcp(&format!("g/d@{pid}")), &wf);
}

/// A command run without a daemon while the object store is down (an operator's
/// `status` at 3 a.m.) finishes once the upload fails, instead of waiting out
/// the close's whole wait for the last packs and catalog; it says what stays
/// local, and the next open uploads it.
#[test]
fn a_command_without_a_daemon_does_not_wait_for_a_down_object_store() {
    let (c, _turn) = cluster();
    let prefix = unique("down");
    let env = s3_store(c, &prefix, &[]);
    env.ok(&["group", "create", "g"]);
    ceph(&["rgw-stop"]);
    let out = std::panic::catch_unwind(|| {
        env.cmd()
            .env("DRCLONE_S3_CLOSE_WAIT_SECS", "3600")
            .env("RUST_LOG", "warn")
            .args(["volume", "create", "g/d", "--size", "1M"])
            .timeout(Duration::from_secs(300))
            .output()
            .unwrap()
    });
    ceph(&["rgw-start"]);
    let out = out.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("stay local"), "{err}");
    // Back up: the next command's open uploads the catalog that stayed behind.
    let v = env.ok(&["volume", "list"]);
    assert!(v.contains("g/d") || v.contains(" d "), "{v}");
    assert!(
        objects(&prefix)
            .iter()
            .any(|(k, _)| k.contains("/catalog/")),
        "no catalog uploaded after radosgw came back"
    );
}
