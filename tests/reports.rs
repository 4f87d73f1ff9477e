//! Findings from public bug reports against other storage servers, tried on
//! drclone with real clients (libnbd from Debian's python3, fio's nbd engine, the
//! FUSE mount) and the real binary.  Each test proves one promise; see issue 9,
//! "Found by trying public bug reports", and the hypotheses it names.
//!
//! Every loop is bounded by a count, never by a clock: the test waits for a peer
//! to report progress before it starts the disturbing operation, and stops the
//! peer after a fixed number of operations.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const BS: u64 = 64 << 10;

/// Create a group with the given volumes (`disk`, size).
fn group_with(env: &Env, group: &str, disks: &[(&str, &str)]) {
    env.ok(&["group", "create", group]);
    for (d, size) in disks {
        env.ok(&["volume", "create", &format!("{group}/{d}"), "--size", size]);
    }
}

/// Run `f` while fio writes at random (blocks of `bs`) over the first 64 MiB of an
/// NBD export without a pause: run after run of `io_size` each (at most
/// `max_runs`), the one running when `f` returns stopped.  Returns what `f`
/// returned and the number of fio runs started.
fn beside_fio<T>(
    uri: String,
    bs: &str,
    io_size: &str,
    max_runs: u32,
    f: impl FnOnce() -> T,
) -> (T, u32) {
    let stop = Arc::new(AtomicBool::new(false));
    let args: Vec<String> = [
        "--name=load".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        "--rw=randwrite".to_string(),
        format!("--bs={bs}"),
        "--size=64M".to_string(),
        format!("--io_size={io_size}"),
        "--iodepth=8".to_string(),
        "--randrepeat=0".to_string(),
        "--output-format=terse".to_string(),
    ]
    .into();
    let fio = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(Ordering::SeqCst) && runs < max_runs {
                let mut c = std::process::Command::new("fio")
                    .args(&args)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                runs += 1;
                loop {
                    if let Some(st) = c.try_wait().unwrap() {
                        let mut err = String::new();
                        std::io::Read::read_to_string(&mut c.stderr.take().unwrap(), &mut err)
                            .unwrap();
                        assert!(st.success(), "fio run {runs} failed ({st}): {err}");
                        break;
                    }
                    if stop.load(Ordering::SeqCst) {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
            runs
        })
    };
    let t = f();
    stop.store(true, Ordering::SeqCst);
    (t, fio.join().unwrap())
}

/// `drclone gc` `n` times through the daemon; every run must succeed.
fn gc_runs(env: &Env, n: u32, log: &Path) {
    for i in 0..n {
        let (ok, _, err) = try_cmd(env, &["gc"]);
        assert!(
            ok,
            "gc run {i} failed: {err}\nserver log:\n{}",
            log_tail(log, 30)
        );
    }
}

/// `drclone verify` on a stopped server's store: must pass; the failure message
/// quotes verify and the server's GC lines.
fn verify_clean(env: &Env, log: &Path, what: &str) {
    let (ok, out, err) = try_cmd(env, &["verify"]);
    assert!(
        ok,
        "{what}: verify failed:\n{out}{err}\nserver log (gc, warnings, errors):\n{}",
        log_grep(log, &["gc:", "WARN", "ERROR"])
    );
}

/// Python: check a ring of `slots` 64 KiB blocks written `writes` times in order
/// (write n went to slot n % slots with `block(tag, n)`); prints a JSON list of
/// the bad slots.
fn check_ring_script(uri: &str, tag: &str, writes: u64, slots: u64) -> String {
    format!(
        r#"
h = connect("{uri}")
bad = []
for s in range(min({writes}, {slots})):
    n = s + (({writes} - 1 - s) // {slots}) * {slots}
    try:
        got = h.pread({BS}, s * {BS})
    except nbd.Error as e:
        bad.append("slot %d (write %d): %s" % (s, n, e))
        continue
    if got != block("{tag}", n, {BS}):
        bad.append("slot %d (write %d): %s" % (s, n, "zeros" if got == bytes({BS}) else "other bytes"))
say(json.dumps(bad))
"#
    )
}

fn check_ring(uri: &str, tag: &str, writes: u64, slots: u64) -> Vec<String> {
    let out = py(&format!(
        "{PY_PRELUDE}\n{}",
        check_ring_script(uri, tag, writes, slots)
    ));
    serde_json::from_str(out.trim()).unwrap()
}

/// Run `ops` while a writer runs: `body` is the writer's Python loop body, run
/// until the test says stop (or `cap` passes); it counts in `i`.  `ops` starts
/// once the writer has made 64 passes, so every op overlaps writes.  Returns the
/// writer's count.
fn while_writing(env: &Env, setup: &str, body: &str, cap: u64, ops: impl FnOnce()) -> u64 {
    let body: String = body.lines().map(|l| format!("    {l}\n")).collect();
    let mut w = PyChild::spawn(
        env,
        "writer",
        &format!(
            "watch_stdin()\n{setup}\ni = 0\nwhile not stop.is_set() and i < {cap}:\n{body}    if i == 64:\n        say(\"started\")\nsay(i)\n"
        ),
    );
    assert_eq!(w.line(), "started");
    ops();
    w.send("stop");
    let n = w.line().parse().unwrap();
    w.finish();
    n
}

/// Fail with the first bad items, how many there were, and the server's log lines
/// that match `pats`.
fn assert_none_bad(bad: &[String], what: &str, log: &Path, pats: &[&str]) {
    assert!(
        bad.is_empty(),
        "{} {what}: {:?}\nserver log:\n{}",
        bad.len(),
        &bad[..bad.len().min(10)],
        log_grep(log, pats)
    );
}

/// Hypothesis 1: GC phase 4 lists pack files after releasing the gate and deletes
/// a pack a writer opened in between, with flushed chunks in it.
#[test]
fn gc_never_deletes_a_pack_a_writer_is_filling() {
    need("nbdsh");
    let env = Env::new();
    let log = env.path("server.log");
    env.ok(&["init", "--pack-size", "1M"]);
    group_with(&env, "g", &[("a", "64M")]);
    group_with(&env, "noise", &[("n", "64M")]);
    let srv = Server::start_logged(&env, &[], &log);
    let uri = srv.unix("g/a");
    let slots = 64 * MIB / BS;
    // Unique 64 KiB blocks around a ring, a FLUSH after every 8, until told to
    // stop; fio beside it on another volume, so packs fill and rotate all the time.
    let (writes, fio_runs) = beside_fio(srv.unix("noise/n"), "64k", "256M", 1, || {
        while_writing(
            &env,
            &format!("h = connect(\"{uri}\")"),
            &format!(
                "for k in range(8):\n    h.pwrite(block(\"w\", i, {BS}), (i % {slots}) * {BS})\n    i += 1\nh.flush()"
            ),
            40000,
            || gc_runs(&env, 40, &log),
        )
    });
    // Every flushed block reads back, now and after more GC and a restart.
    let bad = check_ring(&uri, "w", writes, slots);
    let what = format!(
        "of {} blocks lost after 40 GC runs under {writes} writes and {fio_runs} fio run(s)",
        writes.min(slots)
    );
    assert_none_bad(&bad, &what, &log, &["orphan", "WARN", "ERROR"]);
    gc_runs(&env, 1, &log);
    srv.stop();
    verify_clean(&env, &log, "after 40 GC runs under a writer");
    let srv = Server::start_logged(&env, &[], &log);
    let bad = check_ring(&srv.unix("g/a"), "w", writes, slots);
    assert!(bad.is_empty(), "after restart: {bad:?}");
    println!(
        "{writes} writes of 64 KiB under 40 GC runs beside {fio_runs} fio run(s): all read back"
    );
}

/// The report's variant: fio writes 64 KiB at random to volume `a` of a store
/// with 1 MiB packs while GC loops; volume `b`, written once before (its chunks
/// share packs with `a`'s, so GC compacts them) and only read since, stays exact.
#[test]
fn gc_under_fio_never_touches_a_volume_only_read() {
    need("fio");
    let env = Env::new();
    let log = env.path("server.log");
    env.ok(&["init", "--pack-size", "1M"]);
    group_with(&env, "g", &[("a", "64M"), ("b", "16M")]);
    let srv = Server::start_logged(&env, &[], &log);
    let (ua, ub) = (srv.unix("g/a"), srv.unix("g/b"));
    let blocks = 16 * MIB / BS;
    // a and b interleaved, so every pack holds both.
    py(&format!(
        r#"{PY_PRELUDE}
ha, hb = connect("{ua}"), connect("{ub}")
for k in range({blocks}):
    ha.pwrite(block("a0", k, {BS}), k * {BS})
    hb.pwrite(block("b", k, {BS}), k * {BS})
ha.flush(); hb.flush()
"#
    ));
    let ((), fio_runs) = beside_fio(ua, "64k", "256M", 2, || gc_runs(&env, 40, &log));
    let bad = check_ring(&ub, "b", blocks, blocks);
    let what = format!("of {blocks} blocks of volume b, only read, lost after 40 GC runs beside {fio_runs} fio runs");
    assert_none_bad(&bad, &what, &log, &["orphan", "WARN", "ERROR"]);
    srv.stop();
    verify_clean(&env, &log, "GC beside fio");
    println!("40 GC runs beside {fio_runs} fio run(s): volume b exact, verify clean");
}

/// Python: read the counter of every point's two disks; prints JSON
/// [[point, counter0, counter1], ...] (None for a torn block).
fn point_counters(
    srv: &Server,
    group: &str,
    disks: [(&str, u64); 2],
    points: u64,
) -> Vec<serde_json::Value> {
    let (d0, l0) = disks[0];
    let (d1, l1) = disks[1];
    let s0 = srv.unix(&format!("{group}/{d0}@POINT"));
    let s1 = srv.unix(&format!("{group}/{d1}@POINT"));
    let out = py(&format!(
        r#"{PY_PRELUDE}
res = []
for p in range(1, {points} + 1):
    a = connect("{s0}".replace("POINT", str(p)))
    b = connect("{s1}".replace("POINT", str(p)))
    res.append([p, unstamp(a.pread({l0}, 0)), unstamp(b.pread({l1}, 0))])
    a.shutdown(); b.shutdown()
say(json.dumps(res))
"#
    ));
    serde_json::from_str(out.trim()).unwrap()
}

/// Hypothesis 4: a point must hold a prefix of every writer's acknowledged
/// writes.  The writer acknowledges counter i on disk0 (4 KiB, a small write)
/// before it writes i to disk1 (64 KiB, a whole block); a point with disk1 = i
/// must have disk0 >= i.
#[test]
fn points_hold_a_prefix_of_acknowledged_writes() {
    need("nbdsh");
    let env = Env::new();
    let log = env.path("server.log");
    env.ok(&["init"]);
    group_with(&env, "g", &[("disk0", "1M"), ("disk1", "1M")]);
    group_with(&env, "noise", &[("n", "64M")]);
    let srv = Server::start_logged(&env, &[], &log);
    // fio on a volume of another group keeps the overlay full, as a busy store's is.
    let (last, fio_runs) = beside_fio(srv.unix("noise/n"), "4k", "1G", 4, || {
        while_writing(
            &env,
            &format!(
                "h0, h1 = connect(\"{}\"), connect(\"{}\")",
                srv.unix("g/disk0"),
                srv.unix("g/disk1")
            ),
            "i += 1\nh0.pwrite(stamp(i, 4096), 0)\nh1.pwrite(stamp(i, 65536), 0)",
            1_000_000,
            || {
                (0..40).for_each(|_| {
                    env.ok(&["point", "create", "g"]);
                })
            },
        )
    });
    let res = point_counters(&srv, "g", [("disk0", 4096), ("disk1", 65536)], 40);
    let mut bad = Vec::new();
    let mut prev = 0;
    for r in &res {
        let (p, c0, c1) = (&r[0], r[1].as_u64(), r[2].as_u64());
        match (c0, c1) {
            (Some(a), Some(b)) if a >= b && b >= prev => prev = b,
            _ => bad.push(format!("point {p}: disk0 {:?}, disk1 {:?}", c0, c1)),
        }
    }
    let what = "of 40 points are not a prefix of the acknowledged writes (disk0 must be >= disk1, disk1 must not go back)";
    assert_none_bad(&bad, what, &log, &["point", "WARN", "ERROR"]);
    srv.stop();
    verify_clean(&env, &log, "points under a writer");
    println!(
        "40 points under {last} counter pairs beside {fio_runs} fio run(s): every one a prefix"
    );
}

/// The report's FUA variant: a 4 KiB FUA "log record" j to disk `log`, then the
/// 64 KiB "data block" j to disk `data`, while fio writes to a third volume.  A
/// point must never hold a data block whose log record it lacks.
#[test]
fn points_never_hold_a_data_block_without_its_fua_log_record() {
    need("fio");
    let env = Env::new();
    let log = env.path("server.log");
    env.ok(&["init"]);
    group_with(
        &env,
        "g",
        &[("log", "1M"), ("data", "4M"), ("other", "64M")],
    );
    let srv = Server::start_logged(&env, &[], &log);
    let (log_slots, data_slots) = (MIB / 4096, 4 * MIB / BS);
    let (last, fio_runs) = beside_fio(srv.unix("g/other"), "4k", "1G", 4, || {
        while_writing(
        &env,
        &format!("hl, hd = connect(\"{}\"), connect(\"{}\")", srv.unix("g/log"), srv.unix("g/data")),
        &format!(
            "i += 1\nhl.pwrite(stamp(i, 4096), (i % {log_slots}) * 4096, nbd.CMD_FLAG_FUA)\nhd.pwrite(stamp(i, {BS}), (i % {data_slots}) * {BS})"
        ),
        1_000_000,
        || (0..40).for_each(|_| {
            env.ok(&["point", "create", "g"]);
        }),
    )
    });
    let out = py(&format!(
        r#"{PY_PRELUDE}
bad = []
for p in range(1, 41):
    hl = connect("{}".replace("POINT", str(p)))
    hd = connect("{}".replace("POINT", str(p)))
    logs = hl.pread({MIB}, 0)
    data = hd.pread({data_slots} * {BS}, 0)
    recs = [unstamp(logs[k * 4096:(k + 1) * 4096]) for k in range({log_slots})]
    blks = [unstamp(data[k * {BS}:(k + 1) * {BS}]) for k in range({data_slots})]
    for j in blks:
        if j is None:
            bad.append("point %d: a torn data block" % p)
        elif j > 0 and (recs[j % {log_slots}] is None or recs[j % {log_slots}] < j):
            bad.append("point %d: data block %d without its log record (log slot holds %s; newest log record %d)"
                       % (p, j, recs[j % {log_slots}], max(r or 0 for r in recs)))
say(json.dumps(bad))
"#,
        srv.unix("g/log@POINT"),
        srv.unix("g/data@POINT")
    ));
    let bad: Vec<String> = serde_json::from_str(out.trim()).unwrap();
    let what = format!("violations in 40 points under {last} log+data pairs");
    assert_none_bad(&bad, &what, &log, &["point", "WARN", "ERROR"]);
    srv.stop();
    verify_clean(&env, &log, "points under FUA log writes");
    println!(
        "40 points under {last} log+data pairs and {fio_runs} fio runs: no data without its log"
    );
}

/// Size of the volume the hypothesis 5 tests write into, one block at a time.
const VOLUME_V: u64 = 128 * MIB;
/// How many of the most recently written blocks they check after each write:
/// about what a 1 MiB overlay holds, so the blocks being destaged are among them.
const WINDOW: u64 = 256;

/// Volumes `g/busy` (64 MiB, for fio) and `g/v`, served with a 1 MiB overlay so
/// the destager runs all the time.
fn destager_store(env: &Env, log: &Path) -> Server {
    env.ok(&["init"]);
    group_with(
        env,
        "g",
        &[("busy", "64M"), ("v", &format!("{}", VOLUME_V))],
    );
    Server::start_logged(env, &[("DRCLONE_DIRTY_MIB", "1")], log)
}

/// Hypothesis 5: with the destager running constantly (`DRCLONE_DIRTY_MIB=1` and
/// fio on another volume), block status must report data over every
/// acknowledged write, every time.  After each 4 KiB write into a fresh block,
/// the client asks for the status of the last `WINDOW` blocks it wrote: the
/// destager moves those from the overlay to the block map meanwhile, which is
/// where a status that reads the two at different moments sees neither.
#[test]
fn block_status_never_reports_a_hole_over_acknowledged_data() {
    need("fio");
    let env = Env::new();
    let log = env.path("server.log");
    let srv = destager_store(&env, &log);
    let blocks = VOLUME_V / BS;
    let (out, fio_runs) = beside_fio(srv.unix("g/busy"), "4k", "1G", 4, || {
        py(&format!(
            r#"{PY_PRELUDE}
h = connect("{}", "base:allocation")
bad, written, checks = [], {{}}, 0
for b in range({blocks}):
    off = b * {BS} + (b * 7 % 16) * 4096
    h.pwrite(block("s", b, 4096), off)
    written[b] = off
    first = max(0, b + 1 - {WINDOW})
    found = []
    def cb(meta, start, entries, err):
        if meta == "base:allocation":
            found.append((start, entries))
        return 0
    h.block_status((b + 1 - first) * {BS}, first * {BS}, cb)
    for start, entries in found:
        pos = start
        for k in range(0, len(entries), 2):
            length, flags = entries[k], entries[k + 1]
            for x in range(pos // {BS}, (pos + length - 1) // {BS} + 1):
                o = written.get(x)
                if o is None or not (pos < o + 4096 and o < pos + length):
                    continue
                checks += 1
                if flags & 3:
                    bad.append("after write %d: block %d, written at %d, reported as %d+%d with flags %d"
                               % (b, x, o, pos, length, flags))
            pos += length
say(json.dumps({{"bad": bad, "checks": checks}}))
"#,
            srv.unix("g/v")
        ))
    });
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let bad: Vec<String> = serde_json::from_value(v["bad"].clone()).unwrap();
    let what = format!(
        "times block status reported a hole or zeros over an acknowledged 4 KiB write ({} checks, {blocks} writes, beside {fio_runs} fio runs)",
        v["checks"]
    );
    assert_none_bad(&bad, &what, &log, &["WARN", "ERROR"]);
    srv.stop();
    verify_clean(&env, &log, "block status under the destager");
    println!(
        "{} checks of {blocks} writes beside {fio_runs} fio runs: never a hole",
        v["checks"]
    );
}

/// Hypothesis 5 through the FUSE mount: `lseek` never finds a hole over an
/// acknowledged write.  Each 4 KiB write goes to the start of a fresh block;
/// after it, `SEEK_HOLE` from the start of the last `WINDOW` blocks written must
/// not stop at the start of any of them (it looks at all of them, like block
/// status, while the destager moves them from the overlay to the block map), and
/// `SEEK_DATA` from the start of a recent block must return that block.
#[test]
fn seek_data_never_skips_acknowledged_data() {
    need("fio");
    let env = Env::new();
    let log = env.path("server.log");
    let srv = destager_store(&env, &log);
    let m = Mount::start(&env);
    let blocks = VOLUME_V / BS;
    let (out, fio_runs) = beside_fio(srv.unix("g/busy"), "4k", "1G", 4, || {
        py(&format!(
            r#"{PY_PRELUDE}
fd = os.open("{}", os.O_RDWR)
bad, checks = [], 0
for b in range({blocks}):
    os.pwrite(fd, block("s", b, 4096), b * {BS})
    first = max(0, b + 1 - {WINDOW})
    for whence, start in ((os.SEEK_HOLE, first), (os.SEEK_DATA, b - (b * 37) % {WINDOW})):
        if start < 0:
            continue
        checks += 1
        name = "SEEK_HOLE" if whence == os.SEEK_HOLE else "SEEK_DATA"
        try:
            r = os.lseek(fd, start * {BS}, whence)
        except OSError as e:
            bad.append("after write %d: %s from block %d failed: %s" % (b, name, start, e))
            continue
        # Blocks first..b each hold data in their first 4 KiB.
        if whence == os.SEEK_HOLE and r % {BS} == 0 and r // {BS} <= b:
            bad.append("after write %d: SEEK_HOLE from block %d found a hole at block %d, over its data" % (b, start, r // {BS}))
        if whence == os.SEEK_DATA and r != start * {BS}:
            bad.append("after write %d: SEEK_DATA from block %d gave %d, past its data" % (b, start, r))
say(json.dumps({{"bad": bad, "checks": checks}}))
"#,
            m.dir.join("g/v").display()
        ))
    });
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let bad: Vec<String> = serde_json::from_value(v["bad"].clone()).unwrap();
    let what = format!(
        "times lseek found a hole over an acknowledged 4 KiB write ({} checks, {blocks} writes, beside {fio_runs} fio runs)",
        v["checks"]
    );
    assert_none_bad(&bad, &what, &log, &["WARN", "ERROR"]);
    m.stop();
    srv.stop();
    verify_clean(&env, &log, "SEEK_DATA under the destager");
    println!(
        "{} SEEK_HOLE/SEEK_DATA checks of {blocks} writes beside {fio_runs} fio runs: never a hole over data",
        v["checks"]
    );
}

/// A store for the removal tests: `g/d`, whose point 1 holds `x` and whose head
/// has moved on to other bytes (so GC frees `x` once the point goes), and `g/e`, a
/// head holding `z` that no point holds.  Returns the paths of `x` and `z`.
fn removal_store(env: &Env, seed: u64) -> (PathBuf, PathBuf) {
    env.ok(&["init"]);
    group_with(env, "g", &[("d", "4M")]);
    let (x, y, z) = (env.path("x"), env.path("y"), env.path("z"));
    for (i, f) in [&x, &y, &z].into_iter().enumerate() {
        std::fs::write(f, random_bytes(seed + i as u64, 4 * MIB as usize)).unwrap();
    }
    env.ok(&["import", "g/d", x.to_str().unwrap()]);
    env.ok(&["point", "create", "g"]);
    env.ok(&["import", "g/d", y.to_str().unwrap()]);
    env.ok(&["volume", "create", "g/e", "--size", "4M"]);
    env.ok(&["import", "g/e", z.to_str().unwrap()]);
    (x, z)
}

/// Python for a reader holding `point` (g/d@1) and `head` (g/e) open: `setup`
/// defines `read_point()` and `read_head()`; the reader prints what it reads
/// (exact, zeros, other bytes or an error) before and after a line on stdin.
fn removal_reader(env: &Env, setup: &str, x: &Path, z: &Path) -> PyChild {
    PyChild::spawn(
        env,
        "reader",
        &format!(
            r#"{setup}
want = {{"point": open("{}", "rb").read(), "head": open("{}", "rb").read()}}
reads = {{"point": read_point, "head": read_head}}
def check():
    res = {{}}
    for k, rd in reads.items():
        try:
            got = rd()
            res[k] = "exact" if got == want[k] else ("zeros" if got == bytes(len(got)) else "other bytes (%d)" % len(got))
        except (nbd.Error, OSError) as e:
            res[k] = "error: %s" % e
    return res
say(json.dumps(check()))
sys.stdin.readline()
say(json.dumps(check()))
"#,
            x.display(),
            z.display()
        ),
    )
}

/// A removal that fails must say the view is in use.  Returns whether it failed.
fn refused(what: &str, (ok, _, err): &(bool, String, String)) -> bool {
    assert!(
        *ok || err.contains("in use"),
        "{what} failed without saying the view is in use: {err}"
    );
    !ok
}

/// Run a removal once the reader has gone.  Its leases end shortly after its
/// process exits (NBD: when the server sees the disconnect; FUSE: at the kernel's
/// RELEASE after the last close), so a refusal as in use is retried, at most 100
/// times.
fn remove_once_unused(env: &Env, args: &[&str]) {
    let mut last = String::new();
    for _ in 0..100 {
        let (ok, _, err) = try_cmd(env, args);
        if ok {
            return;
        }
        assert!(err.contains("in use"), "drclone {args:?}: {err}");
        last = err;
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("drclone {args:?} still refused after the reader left: {last}");
}

/// With `reader` holding g/d@1 and g/e open: `point rm g 1`, `volume rm g/e`, GC,
/// then `overwrite` (new writes that may reuse the freed space).  Each removal is
/// refused as in use, or the reader keeps reading the exact bytes; never zeros or
/// other bytes.  Once the reader is gone, the removals go through.
fn removals_under_a_reader(env: &Env, log: &Path, mut reader: PyChild, overwrite: impl FnOnce()) {
    let exact = serde_json::json!({"point": "exact", "head": "exact"});
    let before: serde_json::Value = serde_json::from_str(&reader.line()).unwrap();
    assert_eq!(before, exact);
    let prm = try_cmd(env, &["point", "rm", "g", "1"]);
    let vrm = try_cmd(env, &["volume", "rm", "g/e"]);
    gc_runs(env, 1, log);
    overwrite();
    reader.send("go");
    let after: serde_json::Value = serde_json::from_str(&reader.line()).unwrap();
    reader.finish();
    let (p_refused, v_refused) = (
        refused("point rm g 1", &prm),
        refused("volume rm g/e", &vrm),
    );
    let said = |r| if r { "refused" } else { "accepted" };
    assert_eq!(
        after,
        exact,
        "after point rm ({}) and volume rm ({}) and gc, the open views read: {after}\nserver log:\n{}",
        said(p_refused),
        said(v_refused),
        log_grep(log, &["gc:", "WARN", "ERROR"])
    );
    if p_refused {
        remove_once_unused(env, &["point", "rm", "g", "1"]);
    }
    if v_refused {
        remove_once_unused(env, &["volume", "rm", "g/e"]);
    }
    gc_runs(env, 1, log);
    println!(
        "point rm {}, volume rm {}: the reader read exact bytes",
        said(p_refused),
        said(v_refused)
    );
}

/// Hypothesis 8: `point rm` and `volume rm` of views an NBD client holds open,
/// followed by GC, never make that client read zeros or other bytes.
#[test]
fn a_served_point_is_never_silently_replaced() {
    need("nbdsh");
    let env = Env::new();
    let log = env.path("server.log");
    let (x, z) = removal_store(&env, 1);
    let srv = Server::start_logged(&env, &[], &log);
    let setup = format!(
        "hp, he = connect(\"{}\"), connect(\"{}\")\n\
         read_point = lambda: hp.pread({MIB} * 4, 0)\n\
         read_head = lambda: he.pread({MIB} * 4, 0)\n",
        srv.unix("g/d@1"),
        srv.unix("g/e")
    );
    let reader = removal_reader(&env, &setup, &x, &z);
    removals_under_a_reader(&env, &log, reader, || {
        py(&format!(
            "{PY_PRELUDE}\nh = connect(\"{}\")\nh.pwrite(block(\"n\", 0, {MIB} * 4), 0)\nh.flush()\n",
            srv.unix("g/d")
        ));
    });
    srv.stop();
    verify_clean(&env, &log, "removals of served views");
}

/// Hypothesis 8 through the FUSE mount: a point file and a head file held open
/// while `point rm`, `volume rm` and GC run keep reading their exact bytes (the
/// kernel's cache is dropped before each read), unless the removal is refused.
#[test]
fn an_open_file_in_the_mount_is_never_silently_replaced() {
    let env = Env::new();
    let log = env.path("server.log");
    let (x, z) = removal_store(&env, 4);
    let srv = Server::start_logged(&env, &[], &log);
    let m = Mount::start(&env);
    let setup = format!(
        r#"
fp, fe = os.open("{}", os.O_RDONLY), os.open("{}", os.O_RDONLY)
def uncached(fd):
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return os.pread(fd, {MIB} * 4, 0)
read_point = lambda: uncached(fp)
read_head = lambda: uncached(fe)
"#,
        m.dir.join("g/@1/d").display(),
        m.dir.join("g/e").display()
    );
    let reader = removal_reader(&env, &setup, &x, &z);
    let head = m.dir.join("g/d");
    removals_under_a_reader(&env, &log, reader, || {
        let f = std::fs::OpenOptions::new().write(true).open(&head).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &random_bytes(9, 4 * MIB as usize), 0)
            .unwrap();
        f.sync_all().unwrap();
    });
    m.stop();
    srv.stop();
    verify_clean(&env, &log, "removals of open mount files");
}
