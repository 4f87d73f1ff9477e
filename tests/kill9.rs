//! `kill -9` of `drclone serve` under load, 50 times: nothing acknowledged as
//! durable is lost.
//!
//! Each iteration starts the server, runs a libnbd writer (Debian's python3) and
//! fio (`--ioengine=nbd --fsync=16`) on two volumes, and kills the server with
//! SIGKILL when the writer has made a seeded number of writes.  The writer keeps
//! a ledger (fsynced at every completed FLUSH): each write before it is sent, each
//! FUA write once acknowledged, each FLUSH once completed.  After the restart,
//! every 4 KiB page of the volume must hold the newest durable write to it (one
//! covered by a completed FLUSH, or acknowledged with FUA), or one of the writes
//! sent after that (they may or may not have landed); a page no write touched
//! keeps what the previous iteration found there.  In a seeded half of the
//! iterations `drclone gc` and `drclone point create` also run in a loop, so the
//! kill can land in a GC or a point; every point whose creation was acknowledged
//! is there after the restart.  `drclone verify` runs every 10 iterations and at
//! the end.
//!
//! Seeded: `DRCLONE_KILL9_SEED` (default 9) picks every choice; failure messages
//! name the seed and the iteration.

mod common;

use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const ITERATIONS: u64 = 50;
/// The writer's volume.
const VOL: u64 = 16 * MIB;

/// splitmix64: small, seedable, good enough to pick moments and sizes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The writer: seeded writes of 4 KiB and 64 KiB (aligned to 4 KiB, so some cross
/// chunks), one in ten with FUA, a FLUSH after a seeded number of them; prints
/// `at K` after its K-th acknowledged write and goes on until the server dies.
fn writer_script(uri: &str, ledger: &Path, seed: u64, tag: &str, kill_at: u64) -> String {
    format!(
        r#"
import random
rnd = random.Random({seed})
led = open("{ledger}", "w")
h = connect("{uri}")
s = 0
try:
    while s < 200000:
        batch = rnd.randint(1, 16)
        for _ in range(batch):
            s += 1
            ln = 65536 if rnd.random() < 0.3 else 4096
            off = rnd.randrange(0, ({VOL} - ln) // 4096 + 1) * 4096
            fua = rnd.random() < 0.1
            led.write("w %d %d %d %d\n" % (s, off, ln, fua))
            led.flush()
            h.pwrite(block("{tag}", s, ln), off, nbd.CMD_FLAG_FUA if fua else 0)
            if fua:
                led.write("a %d\n" % s)
            if s == {kill_at}:
                say("at %d" % s)
        h.flush()
        led.write("f %d\n" % s)
        led.flush()
        os.fsync(led.fileno())
except nbd.Error as e:
    led.write("e server gone at write %d: %s\n" % (s, e))
led.flush()
os.fsync(led.fileno())
say("done %d" % s)
"#,
        ledger = ledger.display()
    )
}

/// The checker: reads the whole volume, checks every page against the ledger and
/// the state the previous iteration left, and saves the state it found.
fn check_script(uri: &str, ledger: &Path, state: &Path, tag: &str) -> String {
    format!(
        r#"
P = 4096
state = open("{state}", "rb").read()
writes, durable, flushed = [], set(), 0
for line in open("{ledger}"):
    f = line.split()
    if f[0] == "w":
        writes.append((int(f[1]), int(f[2]), int(f[3])))
    elif f[0] == "a":
        durable.add(int(f[1]))
    elif f[0] == "f":
        flushed = int(f[1])
durable |= set(range(1, flushed + 1))
lens = {{s: ln for (s, _, ln) in writes}}
# Per page: the writes covering it, oldest first.
cover = {{}}
for (s, off, ln) in writes:
    for p in range(off // P, (off + ln) // P):
        cover.setdefault(p, []).append((s, off))
cache = {{}}
def page_of(s, off, p):
    if s not in cache:
        cache[s] = block("{tag}", s, lens[s])
    k = p * P - off
    return cache[s][k:k + P]
h = connect("{uri}")
got = h.pread({VOL}, 0)
bad = []
checked = 0
for p, ws in cover.items():
    last = max((i for i, (s, _) in enumerate(ws) if s in durable), default=None)
    if last is None:
        ok = [state[p * P:(p + 1) * P]] + [page_of(s, off, p) for (s, off) in ws]
    else:
        checked += 1
        ok = [page_of(s, off, p) for (s, off) in ws[last:]]
    g = got[p * P:(p + 1) * P]
    if g not in ok:
        what = "zeros" if g == bytes(P) else ("the previous state" if g == state[p * P:(p + 1) * P] else "other bytes")
        bad.append("page %d: %s, expected durable write %s or later of %s" % (p, what, ws[last][0] if last is not None else None, [s for s, _ in ws]))
open("{state}", "wb").write(got)
say(json.dumps({{"bad": bad, "writes": len(writes), "flushed": flushed, "durable_pages": checked}}))
"#,
        state = state.display(),
        ledger = ledger.display()
    )
}

fn start(env: &Env, rng: &mut Rng, log: &Path) -> Server {
    let dirty = ["", "1", "4"][rng.below(3) as usize];
    let journal = ["", "1"][rng.below(2) as usize];
    let mut vars = Vec::new();
    if !dirty.is_empty() {
        vars.push(("DRCLONE_DIRTY_MIB", dirty));
    }
    if !journal.is_empty() {
        vars.push(("DRCLONE_JOURNAL_MIB", journal));
    }
    Server::start_logged(env, &vars, log)
}

fn fio(uri: &str, seed: u64) -> Child {
    Command::new("timeout")
        .args(["--kill-after=10", "300", "fio"])
        .args([
            "--name=noise",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bssplit=4k/70:64k/30",
            "--size=32M",
            "--io_size=256M",
            "--iodepth=8",
            "--fsync=16",
            &format!("--randseed={seed}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// `drclone gc` and `drclone point create g` in turn until `killing` is set;
/// returns how many point creations were acknowledged.
fn maintenance(env: &Env, killing: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let store = env.store.clone();
    std::thread::spawn(move || {
        let mut acked = 0;
        let mut n = 0u64;
        while !killing.load(Ordering::SeqCst) && n < 1000 {
            let args: &[&str] = if n % 2 == 0 {
                &["gc"]
            } else {
                &["point", "create", "g"]
            };
            let ok = Command::new(assert_cmd::cargo::cargo_bin("drclone"))
                .env("DRCLONE_STORE", &store)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success();
            if ok && n % 2 == 1 {
                acked += 1;
            }
            n += 1;
        }
        acked
    })
}

#[test]
fn fifty_kill_9s_under_fio_lose_nothing_flushed() {
    need("fio");
    need("nbdsh");
    let base: u64 = std::env::var("DRCLONE_KILL9_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(9);
    let mut rng = Rng(base);
    let env = Env::new();
    let log = env.path("server.log");
    env.ok(&["init", "--pack-size", "4M"]);
    env.ok(&["group", "create", "g"]);
    env.ok(&["volume", "create", "g/w", "--size", "16M"]);
    env.ok(&["volume", "create", "g/f", "--size", "32M"]);
    let state = env.path("state");
    std::fs::write(&state, vec![0u8; VOL as usize]).unwrap();
    let mut srv = start(&env, &mut rng, &log);
    let (mut total_writes, mut total_durable, mut total_points) = (0u64, 0u64, 0u64);
    for it in 0..ITERATIONS {
        let seed = rng.next();
        let kill_at = 16 + rng.below(600);
        let ctx =
            format!("seed {base}, iteration {it} (writer seed {seed}, kill after write {kill_at})");
        let tag = format!("{base}/{it}");
        let ledger = env.path(&format!("ledger-{it}"));
        let mut noise = fio(&srv.unix("g/f"), seed);
        let killing = Arc::new(AtomicBool::new(false));
        let maint = (rng.below(2) == 0).then(|| maintenance(&env, killing.clone()));
        let mut w = PyChild::spawn(
            &env,
            &format!("writer-{it}"),
            &writer_script(&srv.unix("g/w"), &ledger, seed, &tag, kill_at),
        );
        let first = w.line();
        assert_eq!(first, format!("at {kill_at}"), "{ctx}");
        // SIGKILL, at a moment the seeded writer chose.  No maintenance command
        // starts after this; one in flight fails, or (if it had not reached the
        // server yet) runs on the store itself, and ends before the restart.
        killing.store(true, Ordering::SeqCst);
        srv.kill9();
        let points_acked = maint.map(|t| t.join().unwrap()).unwrap_or(0);
        let done = w.finish();
        assert!(done.trim().starts_with("done"), "{ctx}: {done}");
        let _ = noise.wait();
        srv = start(&env, &mut rng, &log);
        let out = py(&format!(
            "{PY_PRELUDE}\n{}",
            check_script(&srv.unix("g/w"), &ledger, &state, &tag)
        ));
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let bad = v["bad"].as_array().unwrap();
        assert!(
            bad.is_empty(),
            "{ctx}: {} pages lost durable writes ({} writes, FLUSH completed through {}): {:?}\nserver log:\n{}",
            bad.len(),
            v["writes"],
            v["flushed"],
            &bad[..bad.len().min(10)],
            log_tail(&log, 30)
        );
        let points = env.json(&["point", "list", "g"]).as_array().unwrap().len() as u64;
        assert!(
            points >= total_points + points_acked,
            "{ctx}: {points} points after the restart, {} were acknowledged",
            total_points + points_acked
        );
        total_points = points;
        total_writes += v["writes"].as_u64().unwrap();
        total_durable += v["durable_pages"].as_u64().unwrap();
        if it % 10 == 9 {
            srv.stop();
            let (ok, out, err) = try_cmd(&env, &["verify"]);
            assert!(
                ok,
                "{ctx}: verify failed:\n{out}{err}\nserver log:\n{}",
                log_tail(&log, 30)
            );
            srv = start(&env, &mut rng, &log);
        }
    }
    srv.stop();
    env.ok(&["verify"]);
    println!(
        "seed {base}: {ITERATIONS} kill -9s, {total_writes} writes, {total_durable} page checks against durable writes, {total_points} points: nothing lost"
    );
}
