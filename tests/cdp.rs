//! Continuous protection (issue 10, part 2): a real qemu-storage-daemon
//! mirrors two running disks into a drclone group (`blockdev-mirror
//! copy-mode=write-blocking`, started and stopped by `tools/cdp-mirror`), and the
//! daemon checkpoints the group every 2 s (`group set --checkpoint-interval`).
//! Writers use the disks through QSD's own NBD exports, as a VM would.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const MIB: u64 = 1 << 20;
/// Size of each disk, in bytes.
const DISK: u64 = 64 * MIB;
/// Where each source starts with random data (2 MiB); the rest is holes.
const SEED_AT: u64 = 40 * MIB;
const SEED_LEN: usize = 2 * MIB as usize;
/// The dependent writer's 4 KiB block on each disk (fio stays below 16 MiB).
const WRITER_AT: u64 = 60 * MIB;

fn tool(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tools")
        .join(name)
}

/// `tools/cdp-mirror ARGS` (bounded by `timeout`), its output unchecked.
fn cdp_mirror(args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["--kill-after=10", "300"])
        .arg(tool("cdp-mirror"))
        .args(args)
        .output()
        .unwrap()
}

/// A mirror set run by `tools/cdp-mirror` from `state`.  On drop (a failed
/// test) its qemu-storage-daemon, a daemon and not our child, is killed by
/// the PID the tool recorded.
struct Mirror {
    state: PathBuf,
}

impl Mirror {
    fn arg(&self) -> &str {
        self.state.to_str().unwrap()
    }

    fn qsd_pid(&self) -> Option<i32> {
        let env = std::fs::read_to_string(self.state.join("env")).ok()?;
        env.lines()
            .find_map(|l| l.strip_prefix("QSD_PID="))
            .and_then(|p| p.trim().parse().ok())
    }

    /// `cdp-mirror start` into `srv`'s NBD port with `extra` options, one
    /// `g/dI=SOURCE` per source; its output unchecked.
    fn start(&self, srv: &Server, extra: &[&str], srcs: &[PathBuf]) -> Output {
        let target = format!("127.0.0.1:{}", srv.port);
        let vols: Vec<String> = srcs
            .iter()
            .enumerate()
            .map(|(i, p)| format!("g/d{i}={}", p.display()))
            .collect();
        let mut a = vec!["start", "--state", self.arg(), "--target", &target];
        a.extend_from_slice(extra);
        a.extend(vols.iter().map(|s| s.as_str()));
        cdp_mirror(&a)
    }

    /// [`Mirror::start`] that must succeed; returns its stdout.
    fn started(&self, srv: &Server, extra: &[&str], srcs: &[PathBuf]) -> String {
        let out = self.start(srv, extra, srcs);
        assert!(
            out.status.success(),
            "cdp-mirror start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `status`: (exit success, the JSON).
    fn status(&self) -> (bool, serde_json::Value) {
        let out = cdp_mirror(&["status", "--state", self.arg()]);
        let j = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "cdp-mirror status printed no JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), j)
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        if let Some(pid) = self.qsd_pid() {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A store with group `g`, served by a daemon (log `serve.log`), and a mirror
/// state directory; each of `tools` must be installed.
fn setup(tools: &[&str]) -> (Env, Server, Mirror) {
    for t in tools {
        need(t);
    }
    let env = Env::new();
    env.ok(&["init"]);
    env.ok(&["group", "create", "g"]);
    let srv = Server::start_logged(&env, &[], &env.path("serve.log"));
    let mirror = Mirror {
        state: env.path("cdp"),
    };
    (env, srv, mirror)
}

/// A sparse raw image `name` of `size` bytes holding `data` at offset `at`.
fn source(env: &Env, name: &str, size: u64, data: &[u8], at: u64) -> PathBuf {
    let p = env.path(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, data, at).unwrap();
    p
}

/// A child process (under `timeout`) that is stopped by its PID on drop.
struct Guarded(Option<Child>);

impl Guarded {
    fn spawn(mut c: Command) -> Guarded {
        Guarded(Some(c.spawn().unwrap()))
    }

    fn wait(mut self) -> Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            // `timeout` passes SIGTERM on to the command it runs.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// fio's job over both disks: 4 KiB random writes with crc32c verify headers
/// in [0, 16 MiB) of each, a fixed seed; `verify_only` re-reads and checks
/// the same blocks instead of writing.
fn fio(uris: [&str; 2], verify_only: bool) -> Command {
    let mut c = Command::new("timeout");
    c.args(["--kill-after=10", "300", "fio"]).args([
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4k",
        "--size=16M",
        "--offset=0",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randseed=1234",
    ]);
    if verify_only {
        c.arg("--verify_only");
    }
    for (i, u) in uris.iter().enumerate() {
        c.arg(format!("--name=d{i}")).arg(format!("--uri={u}"));
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn points(env: &Env) -> Vec<u64> {
    env.json(&["point", "list", "g"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect()
}

/// Wait (polling, up to 120 s) until the group has a checkpoint newer than
/// `after`; returns the newest point id.
fn next_point(env: &Env, after: u64) -> u64 {
    for _ in 0..1200 {
        if let Some(&p) = points(env).last() {
            if p > after {
                return p;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("no checkpoint after point {after} in 120 s");
}

/// The writer's seq numbers (disk0, disk1) at each point, read over NBD from
/// `serve`; a torn block (not one seq in every word) is an error.
fn seqs_at(srv: &Server, ids: &[u64]) -> Vec<(u64, u64, u64)> {
    let uris: Vec<String> = ids
        .iter()
        .flat_map(|id| {
            [
                srv.tcp(&format!("g/d0@{id}")),
                srv.tcp(&format!("g/d1@{id}")),
            ]
        })
        .collect();
    let out = py(&format!(
        "{PY_PRELUDE}\nfor u in {uris:?}:\n    h = connect(u)\n    s = unstamp(h.pread(4096, {WRITER_AT}))\n    say('torn' if s is None else s)\n    h.shutdown()\n"
    ));
    let v: Vec<&str> = out.lines().collect();
    assert_eq!(v.len(), 2 * ids.len(), "{out}");
    ids.iter()
        .enumerate()
        .map(|(i, &id)| {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            assert!(a != "torn" && b != "torn", "point {id}: a torn 4 KiB write");
            (id, a.parse().unwrap(), b.parse().unwrap())
        })
        .collect()
}

/// qemu-storage-daemon mirrors two disks (write-blocking) into drclone while fio
/// writes with verify and a writer alternates dependent writes between the
/// disks (disk0 = n, wait for the ack, disk1 = n).  Every checkpoint the daemon
/// took shows write-order fidelity (disk1 <= disk0 <= disk1 + 1); the mirror's
/// zero writes of the holes are stored as nothing; the checkpoint after the
/// last write holds it on both disks, also after a `kill -9` and restart of
/// the daemon; and fio's verify passes on a clone of the latest point, which
/// equals the sources byte for byte.
#[test]
fn qemu_mirror_into_checkpointed_group_keeps_write_order() {
    let (env, srv, mirror) = setup(&["qemu-storage-daemon", "qemu-img", "nbdinfo", "fio"]);
    // The sources: mostly holes, 2 MiB of random data each.
    let srcs: Vec<PathBuf> = (0..2u64)
        .map(|i| {
            let data = random_bytes(70 + i, SEED_LEN);
            source(&env, &format!("src{i}.img"), DISK, &data, SEED_AT)
        })
        .collect();
    let start = |extra: &[&str]| mirror.start(&srv, extra, &srcs);

    // Clear refusals before anything starts: no volume, then a wrong size.
    let out = start(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without drclone volumes");
    assert!(
        err.contains("has no volume g/d0")
            && err.contains("drclone volume create g/d0 --size 67108864"),
        "{err}"
    );
    env.ok(&["volume", "create", "g/d0", "--size", "64M"]);
    env.ok(&["volume", "create", "g/d1", "--size", "32M"]);
    let out = start(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a 32 MiB target");
    assert!(
        err.contains("g/d1: drclone's volume is 33554432 bytes")
            && err.contains("drclone volume resize g/d1 --size 67108864"),
        "{err}"
    );
    assert!(mirror.qsd_pid().is_none(), "a refused start left a daemon");
    env.ok(&["volume", "resize", "g/d1", "--size", "64M"]);

    // The mirrors: READY and actively synced, every source byte on drclone.
    let qsd_port = free_port();
    let listen = format!("127.0.0.1:{qsd_port}");
    let stdout = mirror.started(&srv, &["--listen", &listen], &srcs);
    let ready = stdout
        .lines()
        .find_map(|l| l.strip_prefix("READY seconds="))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no READY line: {stdout}"))
        .to_string();
    let src_uri = |i: usize| format!("nbd://127.0.0.1:{qsd_port}/g/d{i}");
    for i in 0..2 {
        assert!(
            stdout.contains(&format!(
                "g/d{i} source={} target={}",
                src_uri(i),
                srv.tcp(&format!("g/d{i}"))
            )),
            "{stdout}"
        );
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                &src_uri(i),
                &srv.tcp(&format!("g/d{i}")),
            ],
        );
    }
    let (healthy, st) = mirror.status();
    assert!(healthy, "{st}");
    assert_eq!(st["mirrors"].as_array().unwrap().len(), 2);
    for m in st["mirrors"].as_array().unwrap() {
        assert!(
            m["ready"] == true && m["actively_synced"] == true && m["error"].is_null(),
            "{m}"
        );
    }

    // Checkpoints from READY on (a point taken during the initial copy would
    // hold a partial copy: see initial_sync_points_are_not_crash_consistent).
    let j = env.json(&["group", "set", "g", "--checkpoint-interval", "2s"]);
    assert_eq!(j["checkpoint_interval"], 2);

    // The initial sync sent 124 MiB of holes as zero writes: they are stored as
    // nothing (only the 4 MiB of data is referenced, and the store stays small).
    let synced = next_point(&env, points(&env).last().copied().unwrap_or(0));
    let df = env.json(&["df"]);
    let logical = df["logical_bytes"].as_u64().unwrap();
    let packs = df["pack_bytes"].as_u64().unwrap();
    let on_disk = du_bytes(&env.store) - du_bytes(&env.store.join("reserve"));
    println!(
        "mirror READY in {ready} s; after point {synced}: logical {logical} bytes, packs {packs} \
         bytes, store {on_disk} bytes (du -sb, without the reserve) for 2 x {DISK} bytes of disk"
    );
    assert!(
        logical <= 2 * SEED_LEN as u64,
        "the zero writes were stored as data: {df}"
    );
    assert!(packs < 3 * SEED_LEN as u64, "{df}");
    assert!(on_disk < 16 * MIB, "the store holds {on_disk} bytes");

    // fio and the dependent writer, through QSD's exports, across checkpoints.
    let first = points(&env).last().copied().unwrap();
    let mut w = PyChild::spawn(
        &env,
        "writer",
        &format!(
            r#"
watch_stdin()
a = connect('{a}')
b = connect('{b}')
n = 0
say("started")
while not stop.is_set():
    n += 1
    a.pwrite(stamp(n, 4096), {WRITER_AT})
    b.pwrite(stamp(n, 4096), {WRITER_AT})
say(n)
"#,
            a = src_uri(0),
            b = src_uri(1)
        ),
    );
    assert_eq!(w.line(), "started");
    let fio_w = Guarded::spawn(fio([&src_uri(0), &src_uri(1)], false)).wait();
    assert!(
        fio_w.status.success(),
        "fio failed: {}{}",
        String::from_utf8_lossy(&fio_w.stdout),
        String::from_utf8_lossy(&fio_w.stderr)
    );
    // Let the writer run across at least four more checkpoints.
    let mut last = first;
    for _ in 0..4 {
        last = next_point(&env, last);
    }
    w.send("stop");
    let n: u64 = w.line().parse().unwrap();
    w.finish();
    let at_stop = points(&env).last().copied().unwrap();
    let after = next_point(&env, at_stop);
    let (healthy, st) = mirror.status();
    assert!(healthy, "a mirror failed while it ran: {st}");

    // Write-order fidelity at every point the daemon took.
    let ids = points(&env);
    let seqs = seqs_at(&srv, &ids);
    let mut seen = std::collections::BTreeSet::new();
    for &(id, a, b) in &seqs {
        assert!(
            b <= a && a <= b + 1,
            "point {id}: disk0 = {a}, disk1 = {b}: not a prefix of the acknowledged writes"
        );
        seen.insert(a);
    }
    println!(
        "{} points, writer reached {n}, {} distinct seq values at points: {:?}",
        ids.len(),
        seen.len(),
        seqs
    );
    assert!(
        seen.len() >= 3,
        "the points show only {} writer states: the check could not fail",
        seen.len()
    );
    // The first checkpoint after the last acknowledged write holds it on both.
    assert_eq!(seqs_at(&srv, &[after])[0], (after, n, n));

    // A clean stop, then the durability of what a checkpoint holds: kill -9.
    let out = cdp_mirror(&["stop", "--state", mirror.arg()]);
    assert!(
        out.status.success(),
        "cdp-mirror stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(mirror.qsd_pid().is_none());
    srv.kill9();
    let srv = Server::start_logged(&env, &[], &env.path("serve.log"));
    assert_eq!(seqs_at(&srv, &[after])[0], (after, n, n));

    // fio's verify on a clone of the latest point; the clone equals the sources.
    env.ok(&["group", "create", "c"]);
    for i in 0..2 {
        env.ok(&["clone", &format!("g/d{i}@latest"), &format!("c/d{i}")]);
        qemu_compare(&srv.tcp(&format!("c/d{i}")), &srcs[i]);
    }
    let v = Guarded::spawn(fio([&srv.tcp("c/d0"), &srv.tcp("c/d1")], true)).wait();
    assert!(
        v.status.success(),
        "fio verify on the clone failed: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    let df = env.json(&["df"]);
    println!(
        "at the end: {} points, logical {} bytes, packs {} bytes",
        points(&env).len(),
        df["logical_bytes"],
        df["pack_bytes"]
    );
    env.ok(&["group", "set", "g", "--checkpoint-interval", "off"]);
}

/// A mirror whose target goes away ends without failing the source's writes
/// (qemu's choice); the operator sees it: `cdp-mirror watch` prints
/// BLOCK_JOB_COMPLETED with the error and exits 1, `status` says unhealthy
/// with the error, and `stop` exits 1 naming the disk.
#[test]
fn a_lost_target_ends_the_mirror_visibly_while_the_source_goes_on() {
    let (env, srv, mirror) = setup(&["qemu-storage-daemon", "qemu-img", "nbdinfo", "qemu-io"]);
    env.ok(&["volume", "create", "g/d0", "--size", "8M"]);
    let src = source(&env, "src0.img", 8 * MIB, &[], 0);
    let qsd_port = free_port();
    let listen = format!("127.0.0.1:{qsd_port}");
    mirror.started(&srv, &["--listen", &listen], &[src]);
    let src_uri = format!("nbd://127.0.0.1:{qsd_port}/g/d0");
    qemu_io(&src_uri, &["write -P 0x11 0 64k"]);
    let mut watch = Command::new("timeout");
    watch
        .args(["--kill-after=10", "300"])
        .arg(tool("cdp-mirror"))
        .args(["watch", "--state", mirror.arg()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut watch = Guarded::spawn(watch);
    // Its first line is the state it found; then it waits for events.
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        watch.0.as_mut().unwrap().stdout.take().unwrap(),
    ));
    let first = lines.next().unwrap().unwrap();
    assert!(
        first.contains("\"STATE\"") && first.contains("\"ready\""),
        "{first}"
    );
    srv.kill9();
    // The source's write succeeds although its mirror cannot.
    qemu_io(&src_uri, &["write -P 0x22 1M 64k"]);
    qemu_io(&src_uri, &["read -P 0x22 1M 64k"]);
    let events: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let w = watch.wait();
    assert_eq!(w.status.code(), Some(1), "watch: {events:?}");
    assert!(
        events.iter().any(|e| e.contains("\"BLOCK_JOB_ERROR\""))
            && events
                .iter()
                .any(|e| e.contains("\"BLOCK_JOB_COMPLETED\"") && e.contains("\"error\": \"")),
        "watch printed: {events:?}"
    );
    let (healthy, st) = mirror.status();
    assert!(!healthy, "{st}");
    assert_eq!(st["healthy"], false);
    let m = &st["mirrors"][0];
    assert!(
        m["volume"] == "g/d0" && m["status"] == "concluded" && m["error"].is_string(),
        "{st}"
    );
    let out = cdp_mirror(&["stop", "--state", mirror.arg()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stop hid the failure: {err}");
    assert!(
        err.contains("a mirror had failed") && err.contains("g/d0: "),
        "{err}"
    );
    assert!(mirror.qsd_pid().is_none(), "stop left the daemon");
}
