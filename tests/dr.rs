//! DR workflows (issue 11) through the real binary and real NBD clients:
//! drills (`drclone test`), failover with undo and commit, retention, status,
//! audit.  The VM boot drill is in tests/vm_boot.rs.

mod common;

use common::*;
use serde_json::Value;

const MIB: usize = 1 << 20;

/// A store with group `g` of two disks (d0 16 MiB, d1 8 MiB); d0 holds
/// `block("A")` at 0..1 MiB and point 1 is taken.  Returns the served env.
fn setup() -> (Env, Server) {
    let env = Env::new();
    env.ok(&["init"]);
    env.ok(&["group", "create", "g"]);
    env.ok(&["volume", "create", "g/d0", "--size", "16M"]);
    env.ok(&["volume", "create", "g/d1", "--size", "8M"]);
    let a = env.path("a.bin");
    std::fs::write(&a, random_bytes(1, MIB)).unwrap();
    env.ok(&["import", "g/d0", a.to_str().unwrap()]);
    env.ok(&["point", "create", "g"]);
    let srv = Server::start_env(&env, &[("DRCLONE_MAINT_SECS", "1")]);
    (env, srv)
}

/// Bytes `len` at `off` of an NBD export.
fn read_nbd(uri: &str, off: usize, len: usize) -> Vec<u8> {
    let out = py(&format!(
        "{PY_PRELUDE}\nh = connect({uri:?})\nsys.stdout.write(h.pread({len}, {off}).hex())"
    ));
    hex(&out)
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.trim().len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Write `data` at `off` of an NBD export, then FLUSH.
fn write_nbd(uri: &str, off: usize, data: &[u8]) {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), data).unwrap();
    py(&format!(
        "{PY_PRELUDE}\nh = connect({uri:?})\nh.pwrite(open({:?}, 'rb').read(), {off})\nh.flush()",
        f.path().display().to_string()
    ));
}

fn exports(srv: &Server) -> String {
    run(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://127.0.0.1:{}", srv.port)],
    )
}

/// While a writer keeps writing to the replica head, a drill's command writes
/// into its clone: neither sees the other's writes, and the point is untouched.
/// The clones are listed by `nbdinfo --list` during the drill, gone after it,
/// and the report is kept.
#[test]
fn drill_isolates_writes_both_ways_and_keeps_its_report() {
    let (env, srv) = setup();
    let point_a = random_bytes(1, MIB);
    // The writer: stamps counter n into block 0 of the head, flushing each.
    let mut w = PyChild::spawn(
        &env,
        "writer",
        &format!(
            r#"
watch_stdin()
h = connect({:?})
n = 0
say("started")
while not stop.is_set():
    n += 1
    h.pwrite(stamp(n, 65536), 0)
    h.flush()
say(n)
"#,
            srv.unix("g/d0")
        ),
    );
    assert_eq!(w.line(), "started");
    // The drill's command: list the exports, write "DRILL" blocks into the
    // first clone over NBD and read them back.
    let script = env.path("drill.sh");
    std::fs::write(
        &script,
        r#"set -e
first=$(echo "$DRCLONE_EXPORTS" | head -1)
n=$(echo "$DRCLONE_EXPORTS" | wc -l)
echo "exports: $n"
nbdinfo --list "$(echo "$first" | sed 's|g\.drill[^?]*||')" | grep -o 'g\.drill-[0-9]*/d[01]' | sort -u
qemu-io -f raw "$first" -c 'write -P 0x44 0 65536' -c 'write -P 0x44 2M 65536' >/dev/null
qemu-io -f raw "$first" -c 'read -P 0x44 0 65536' -c 'read -P 0x44 2M 65536' | grep -c 'read 65536'
echo drill-done
"#,
    )
    .unwrap();
    let r = env.json(&["test", "g", "--exec", &format!("sh {}", script.display())]);
    w.send("stop");
    let n: u64 = w.line().parse().unwrap();
    w.finish();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["point"], 1);
    let id = r["drill"].as_u64().unwrap();
    let ex: Vec<String> = serde_json::from_value(r["exports"].clone()).unwrap();
    assert_eq!(ex.len(), 2, "one export per disk, in disk order: {ex:?}");
    assert!(ex[0].contains(&format!("g.drill-{id}/d0")), "{ex:?}");
    assert!(ex[1].contains(&format!("g.drill-{id}/d1")), "{ex:?}");
    assert!(r["time_to_ready_ms"].as_u64().is_some());
    // The head holds the writer's last stamp, not the drill's 0x44 blocks.
    let head0 = read_nbd(&srv.unix("g/d0"), 0, 65536);
    assert_eq!(
        head0,
        n.to_le_bytes().repeat(8192),
        "head block 0: the writer's last write"
    );
    let head2 = read_nbd(&srv.unix("g/d0"), 2 * MIB, 65536);
    assert_eq!(
        head2,
        vec![0u8; 65536],
        "the drill's write stayed out of the head"
    );
    // The point is exactly what it was.
    let pt = read_nbd(&srv.unix("g/d0@1"), 0, MIB);
    assert!(pt == point_a, "point 1 changed");
    // The report is kept, with the command's output.
    let d = env.json(&["drill", "show", &id.to_string()]);
    assert_eq!(d["ok"], true);
    assert!(d["clones_removed"].as_u64().is_some(), "{d}");
    let tail = d["output_tail"].as_str().unwrap();
    assert!(tail.contains("exports: 2"), "{tail}");
    assert!(
        tail.contains(&format!("g.drill-{id}/d0")),
        "listed by nbdinfo --list: {tail}"
    );
    assert!(tail.contains(&format!("g.drill-{id}/d1")), "{tail}");
    assert!(
        tail.contains("\n2\n") && tail.contains("drill-done"),
        "{tail}"
    );
    // The clones are gone: not listed, not in the store.
    let list = exports(&srv);
    assert!(!list.contains("drill"), "{list}");
    let vols = env.ok(&["volume", "list"]);
    assert!(!vols.contains("drill"), "{vols}");
    let listed = env.json(&["drill", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
}

/// A failing command fails the drill (non-zero exit, ok false), and the clones
/// still go; a kept drill's clones stay until its TTL, then the daemon removes
/// them.
#[test]
fn failing_command_fails_the_drill_and_kept_drills_expire() {
    let (env, srv) = setup();
    let out = env
        .cmd()
        .args(["test", "g", "--json", "--exec", "echo boom >&2; exit 7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a failed drill exits 1");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], false);
    assert_eq!(r["exit_code"], 7);
    let d = env.json(&["drill", "show", &r["drill"].to_string()]);
    assert!(d["output_tail"].as_str().unwrap().contains("boom"), "{d}");
    assert!(d["clones_removed"].as_u64().is_some());

    let r = env.json(&["test", "g", "--keep", "--ttl", "3s"]);
    assert_eq!(r["ok"], true, "no command: the drill passes once exported");
    let id = r["drill"].as_u64().unwrap();
    let uri = srv.unix(&format!("g.drill-{id}/d0"));
    // Served, and writable, while kept.
    write_nbd(&uri, 0, b"kept drill write");
    assert_eq!(read_nbd(&uri, 0, 16), b"kept drill write");
    let mut gone = false;
    for _ in 0..300 {
        let d = env.json(&["drill", "show", &id.to_string()]);
        if d["clones_removed"].as_u64().is_some() {
            gone = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(gone, "the kept drill did not expire");
    assert!(!env.ok(&["volume", "list"]).contains("drill"));
    let audit = env.json(&["audit"]);
    let acts: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(acts.contains(&"drill-expire"), "{acts:?}");
    env.fails(&["drill", "show", "999"]);
}

/// Failover serves the point's data read-write under the production names and
/// disconnects the clients of the old heads; undo restores the replica heads
/// exactly; a second failover is refused; commit keeps the failover writes.
/// Every action is in the audit log and status shows the role.
#[test]
fn failover_undo_commit_and_the_audit_trail() {
    let (env, srv) = setup();
    let point_a = random_bytes(1, MIB);
    // After the point, the replica head moves on: block B at 0.
    let b = random_bytes(2, MIB);
    write_nbd(&srv.unix("g/d0"), 0, &b);
    // A client of the old head, connected before the failover.
    let mut old = PyChild::spawn(
        &env,
        "old",
        &format!(
            r#"
h = connect({:?})
say("connected")
sys.stdin.readline()
try:
    h.pread(4096, 0)
    say("still connected")
except nbd.Error as e:
    say("disconnected")
"#,
            srv.unix("g/d0")
        ),
    );
    assert_eq!(old.line(), "connected");
    let f = env.json(&["failover", "g", "--point", "1"]);
    assert_eq!(f["point"], 1);
    assert_eq!(f["role"], "failed-over");
    assert_eq!(
        f["exports"][0],
        format!("nbd://127.0.0.1:{}/g/d0", srv.port)
    );
    assert!(f["time_ms"].as_u64().is_some());
    assert!(f["disconnected"].as_u64().unwrap() >= 1, "{f}");
    old.send("go");
    assert_eq!(old.line(), "disconnected");
    old.finish();
    // The production name serves the point, read-write.
    let got = read_nbd(&srv.unix("g/d0"), 0, MIB);
    assert!(
        got == point_a,
        "failover head != point 1 (it reads {})",
        if got == b {
            "the replica head's B".to_string()
        } else if got.iter().all(|&x| x == 0) {
            "zeros".to_string()
        } else {
            format!("something else: {:?}", &got[..16])
        }
    );
    write_nbd(&srv.unix("g/d0"), 4 * MIB, b"written after failover");
    assert_eq!(
        read_nbd(&srv.unix("g/d0"), 4 * MIB, 22),
        b"written after failover"
    );
    // A second failover is refused, by name.
    let e = env.fails(&["failover", "g"]);
    assert!(e.contains("already failed over"), "{e}");
    let st = env.json(&["status"]);
    assert_eq!(st[0]["role"], "failed-over");
    assert_eq!(st[0]["replication"]["state"], "refused");
    // Undo: the replica head, exactly (B, and nothing of the failover writes).
    let u = env.json(&["failover", "g", "--undo"]);
    assert_eq!(u["role"], "protected");
    assert!(
        read_nbd(&srv.unix("g/d0"), 0, MIB) == b,
        "undo did not restore the replica head"
    );
    assert_eq!(read_nbd(&srv.unix("g/d0"), 4 * MIB, 22), vec![0u8; 22]);
    // Commit keeps the failover writes.
    env.ok(&["failover", "g", "--point", "latest"]);
    write_nbd(&srv.unix("g/d1"), 0, b"kept after commit");
    let c = env.json(&["failover", "g", "--commit"]);
    assert_eq!(c["role"], "committed");
    assert_eq!(read_nbd(&srv.unix("g/d1"), 0, 17), b"kept after commit");
    let e = env.fails(&["failover", "g", "--undo"]);
    assert!(e.contains("not failed over"), "{e}");
    // Status fields and the audit trail.
    let st = env.json(&["status"]);
    let g = &st[0];
    for k in [
        "group",
        "role",
        "epoch",
        "latest_point",
        "latest_app_point",
        "rpo_seconds",
        "replication",
        "last_drill",
        "last_successful_drill",
    ] {
        assert!(g.get(k).is_some(), "status lacks {k}: {g}");
    }
    assert_eq!(g["role"], "committed");
    assert_eq!(g["epoch"], 4, "four role changes");
    env.ok(&["point", "create", "g"]);
    env.ok(&["point", "rm", "g", "1"]);
    env.ok(&["retention", "set", "g", "1m:1h"]);
    let audit = env.json(&["audit"]);
    let acts: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["uid"].as_u64().is_some() && e["time"].as_u64().is_some());
            (
                e["action"].as_str().unwrap().to_string(),
                e["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [
        ("failover", "ok"),
        ("failover", "group g is already failed over"),
        ("failover-undo", "ok"),
        ("failover", "ok"),
        ("failover-commit", "ok"),
        ("failover-undo", "group g is committed"),
        ("point-rm", "ok"),
        ("retention-set", "ok"),
    ];
    assert_eq!(acts.len(), want.len(), "{acts:?}");
    for ((a, o), (wa, wo)) in acts.iter().zip(want) {
        assert_eq!(a, wa, "{acts:?}");
        assert!(o.starts_with(wo), "{a}: {o}");
    }
}

/// Failover copies nothing: failing over a group holding 1 GiB of written data
/// adds no more to the store than for 16 MiB (a few metadata records).  The
/// times are printed (benchmarks compare them; tests assert no time).
#[test]
fn failover_copies_nothing_whatever_the_size() {
    let mut grew = Vec::new();
    for (mib, seed) in [(16usize, 7u64), (1024, 8)] {
        let env = Env::new();
        env.ok(&["init"]);
        env.ok(&["group", "create", "g"]);
        env.ok(&["volume", "create", "g/d0", "--size", &format!("{mib}M")]);
        let img = env.path("img.bin");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&img).unwrap();
            for i in 0..mib {
                f.write_all(&random_bytes(seed * 100_000 + i as u64, MIB))
                    .unwrap();
            }
        }
        env.ok(&["import", "g/d0", img.to_str().unwrap()]);
        std::fs::remove_file(&img).unwrap();
        env.ok(&["point", "create", "g"]);
        let before = du_bytes(&env.store);
        let f = env.json(&["failover", "g"]);
        let after = du_bytes(&env.store);
        println!(
            "failover of {mib} MiB written: {} ms, store grew {} bytes",
            f["time_ms"],
            after as i64 - before as i64
        );
        grew.push(after.saturating_sub(before));
        assert_eq!(f["role"], "failed-over");
    }
    for g in &grew {
        assert!(
            *g < 4 * MIB as u64,
            "failover copied data: store grew {grew:?}"
        );
    }
}

/// Retention keeps the points a clone depends on (and the newest), and
/// thins the rest once they age out of the policy.
#[test]
fn retention_keeps_the_point_a_clone_depends_on() {
    let env = Env::new();
    env.ok(&["init"]);
    env.ok(&["group", "create", "g"]);
    env.ok(&["group", "create", "h"]);
    env.ok(&["volume", "create", "g/d0", "--size", "1M"]);
    for _ in 0..4 {
        env.ok(&["point", "create", "g"]);
    }
    env.ok(&["clone", "g/d0@2", "h/c"]);
    env.ok(&["retention", "set", "g", "1s:1s"]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let r = env.json(&["retention", "apply", "g"]);
    assert_eq!(r["removed"], serde_json::json!([1, 3]), "{r}");
    let ids: Vec<u64> = env
        .json(&["point", "list", "g"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["id"]
                .as_str()
                .map_or_else(|| p["id"].as_u64().unwrap(), |s| s.parse().unwrap())
        })
        .collect();
    assert_eq!(ids, vec![2, 4], "the clone's point and the newest stay");
    let e = env.fails(&["retention", "set", "g", "1h:1m"]);
    assert!(e.contains("less than their interval"), "{e}");
}

/// `serve --metrics ADDR` answers `GET /metrics` with the documented names:
/// NBD operations and latency, sessions, per-group RPO, role, points and last
/// drill, and the store's bytes and ratios.
#[test]
fn metrics_endpoint_has_the_documented_names() {
    let (env, srv) = setup();
    env.ok(&["test", "g"]);
    drop(srv);
    let port = free_port();
    let mport = free_port();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"))
        .env("DRCLONE_STORE", &env.store)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics",
            &format!("127.0.0.1:{mport}"),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let uri = format!("nbd://127.0.0.1:{port}/g/d0");
    let mut up = false;
    for _ in 0..250 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && std::net::TcpStream::connect(("127.0.0.1", mport)).is_ok()
        {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(up, "serve --metrics did not start");
    qemu_io(&uri, &["read 0 64k", "write -P 7 1M 64k", "flush"]);
    let body = py(&format!(
        "import urllib.request\nprint(urllib.request.urlopen('http://127.0.0.1:{mport}/metrics').read().decode())"
    ));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    for name in [
        "drclone_nbd_requests_total{op=\"read\"}",
        "drclone_nbd_requests_total{op=\"write\"}",
        "drclone_nbd_requests_total{op=\"flush\"}",
        "drclone_nbd_request_duration_seconds_bucket{le=",
        "drclone_nbd_request_duration_seconds_count{op=\"read\"}",
        "drclone_nbd_sessions ",
        "drclone_group_rpo_seconds{group=\"g\"}",
        "drclone_group_points{group=\"g\"} 1",
        "drclone_group_role{group=\"g\",role=\"protected\"} 1",
        "drclone_group_last_drill_ok{group=\"g\"} 1",
        "drclone_group_last_drill_timestamp_seconds{group=\"g\"}",
        "drclone_store_logical_bytes ",
        "drclone_store_stored_bytes ",
        "drclone_store_dedup_ratio ",
        "drclone_store_compression_ratio ",
        "# TYPE drclone_replication_received_bytes counter",
    ] {
        assert!(body.contains(name), "metrics lack {name}:\n{body}");
    }
}
