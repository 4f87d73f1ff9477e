//! Hostile review of the DR workflows (issue 11) and the first part of
//! replication (issue 10): races, crashes and hostile input against drills,
//! failover, retention, the replication receiver and the agent.
//!
//! Every test here reproduces a defect (it fails on the code it was written
//! against) or pins behaviour an attack showed to hold.  The doc comment of each
//! says which, with the minimal reproduction.  Everything runs in-process on a
//! store in a temporary directory (receiver sessions over a socket pair or on a
//! loopback port), so the interleavings are deterministic.
#![cfg(feature = "failpoints")]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use drclone::dr::drill::{self, DrillOptions};
use drclone::dr::failover::{self, Request};
use drclone::dr::{no_clients, Actor};
use drclone::engine::store::{InitOptions, Store};
use drclone::repl::agent::{self, VolumeSpec};
use drclone::repl::receiver::{self, Config};
use drclone::repl::wire;

const CS: u64 = 16 << 10;

/// Failpoints are process-global: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> (
    std::sync::MutexGuard<'static, ()>,
    fail::FailScenario<'static>,
) {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    (g, fail::FailScenario::setup())
}

fn init(dir: &Path) -> Arc<Store> {
    Store::init(
        dir,
        &InitOptions {
            chunk_size: CS as u32,
            pack_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    Arc::new(Store::open(dir, None).unwrap())
}

/// Incompressible, never-zero content of `len` bytes, different per `seed`.
fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 255 + 1) as u8
        })
        .collect()
}

/// The `db-write` action that lets `n` metadata writes through, then fails
/// every later one (latching the store, as a crash at that write would).
fn fail_after(n: u32) -> String {
    if n == 0 {
        "return".into()
    } else {
        format!("{n}*off->return")
    }
}

/// A store with group `g`, volume `g/d` of `blocks` blocks holding data, and
/// one point of it.
fn protected(dir: &Path, blocks: u64) -> Arc<Store> {
    let s = init(dir);
    s.create_group("g").unwrap();
    s.create_volume("g", "d", blocks * CS).unwrap();
    let h = s.view("g", "d", None).unwrap();
    s.write(&h, 0, &fill(1, (blocks * CS) as usize)).unwrap();
    s.create_point("g", false, None).unwrap();
    s
}

/// A receiver session on one end of a socket pair, served by a thread named
/// `recv`; returns the agent's end, after the handshakes.
fn session(s: &Arc<Store>) -> (UnixStream, JoinHandle<drclone::Result<()>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let s2 = s.clone();
    let h = std::thread::Builder::new()
        .name("recv".into())
        .spawn(move || receiver::serve_connection(&s2, b, "test", &Config::default()))
        .unwrap();
    let mut a = a;
    wire::write_handshake(&mut a).unwrap();
    wire::read_handshake(&mut a).unwrap();
    (a, h)
}

fn hello(a: &mut UnixStream, group: &str, vols: &[(&str, u64)]) -> (u8, String) {
    let h = wire::Hello {
        token: None,
        group: group.into(),
        volumes: vols.iter().map(|(d, s)| (d.to_string(), *s)).collect(),
        source: "test".into(),
        epoch: None,
    };
    wire::write_frame(a, wire::HELLO, &serde_json::to_vec(&h).unwrap()).unwrap();
    let (t, body) = wire::read_frame(a).unwrap();
    (t, String::from_utf8_lossy(&body).into_owned())
}

/// DEFECT, fixed since (GC vs a replication cycle): GC deletes the pack holding chunks a
/// CHUNKS frame is storing, and the cycle then commits a point whose blocks
/// read "No such file".
///
/// Reproduction: a session sends CHUNKS into a store whose open pack holds
/// nothing indexed; `ChunkStore::put_received` appends the records to the open
/// pack, then (in `sync_packs_recorded`, failpoint
/// `flush-between-open-and-seal`) GC runs before the index entries are
/// written.  GC's phase 4 seals the open pack, finds no `R` entry in it
/// (`live_bytes == 0`) and deletes the file.  `put_received` then indexes the
/// chunks at the deleted pack, STORED is sent, MAP and COMMIT succeed, and the
/// point (and head) cannot be read.  (With other live chunks in the pack the
/// pack is compacted instead, which copies only indexed records: same loss.)
///
/// Expected: the committed point reads back what was sent.  Actual: read error
/// (pack missing), `verify` reports the chunks.
///
/// Root cause: `put_received` (src/engine/chunks.rs, `put_received`) stores
/// chunks without holding the store's gate, while GC's phase 4
/// (src/engine/gc.rs, "Under the gate, no write is between appending a record
/// and committing its index entries") relies on every writer holding it from
/// append to index.  Pins protect only the index sweep (phase 3), not pack
/// deletion.  Fix: hold `gate.shared()` in `put_received` from the first
/// append until the index batch is written, as `write.rs` does.
#[test]
fn gc_while_chunks_arrive_keeps_the_received_chunks() {
    let (_g, _f) = serial();
    let d = tempfile::tempdir().unwrap();
    let s = init(&d.path().join("s"));
    let blocks: Vec<Vec<u8>> = (0..4).map(|i| fill(100 + i, CS as usize)).collect();
    let ids: Vec<[u8; 32]> = blocks.iter().map(|b| *blake3::hash(b).as_bytes()).collect();
    let (mut a, h) = session(&s);
    let (t, m) = hello(&mut a, "g", &[("d", 4 * CS)]);
    assert_eq!(t, wire::WELCOME, "{m}");
    // GC starts inside the window (from the receiver's store thread, once,
    // between appending the records and indexing them; the window used to be
    // the per-frame pack sync, which COMMIT now does instead).  Since the fix
    // the receiver holds the shared gate there, so GC waits for the chunks to
    // be indexed (and pinned) instead of deleting their pack: it runs on
    // another thread, which the test joins after STORED.
    let once = Arc::new(AtomicBool::new(false));
    let gc_thread: Arc<Mutex<Option<JoinHandle<()>>>> = Arc::default();
    let (s2, o2, t2) = (s.clone(), once.clone(), gc_thread.clone());
    fail::cfg_callback("received-before-index", move || {
        if std::thread::current().name() == Some(receiver::STORE_THREAD)
            && !o2.swap(true, Ordering::SeqCst)
        {
            let s3 = s2.clone();
            *t2.lock().unwrap() = Some(std::thread::spawn(move || {
                drclone::engine::gc::gc(&s3).unwrap();
            }));
            // Give GC the chance to run in the window if nothing stops it.
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    })
    .unwrap();
    // Offered and lacked first: CHUNKS carries only what the cycle asked for.
    wire::write_frame(&mut a, wire::HAVE, &wire::encode_ids(&ids)).unwrap();
    assert_eq!(wire::read_frame(&mut a).unwrap().0, wire::LACK);
    let chunks: Vec<wire::WireChunk> = ids
        .iter()
        .zip(&blocks)
        .map(|(i, b)| wire::pack(*i, b))
        .collect();
    wire::write_frame(&mut a, wire::CHUNKS, &wire::encode_chunks(&chunks)).unwrap();
    let (t, body) = wire::read_frame(&mut a).unwrap();
    fail::remove("received-before-index");
    assert!(once.load(Ordering::SeqCst), "GC started inside the window");
    if let Some(t) = gc_thread.lock().unwrap().take() {
        t.join().unwrap();
    }
    assert_eq!(t, wire::STORED, "{}", String::from_utf8_lossy(&body));
    let entries: Vec<wire::Entry> = ids
        .iter()
        .enumerate()
        .map(|(b, id)| wire::Entry::Data {
            block: b as u64,
            id: *id,
        })
        .collect();
    wire::write_frame(&mut a, wire::MAP, &wire::encode_map("d", &entries)).unwrap();
    let c = wire::Commit {
        label: None,
        app: false,
        source_point: None,
        time: None,
    };
    wire::write_frame(&mut a, wire::COMMIT, &serde_json::to_vec(&c).unwrap()).unwrap();
    let (t, body) = wire::read_frame(&mut a).unwrap();
    assert_eq!(t, wire::COMMITTED, "{}", String::from_utf8_lossy(&body));
    drop(a);
    h.join().unwrap().unwrap();
    let v = s.view("g", "d", Some("latest")).unwrap();
    match s.read(&v, 0, (4 * CS) as usize) {
        Ok(got) => assert!(got == blocks.concat(), "the point reads other data"),
        Err(e) => panic!("the committed point cannot be read: {e}"),
    }
}

/// DEFECT, fixed since (crash mid-drill): a drill interrupted between its clones and its
/// record leaves a clone group `g.drill-N` that nothing ever removes.
///
/// Reproduction: `drill::start` writes, in separate synced batches, the drill
/// counter, the clone group, each clone, then the `DrillRec`.  The metadata
/// write number n fails (failpoint `db-write`, which latches the store as a
/// crash would; kill -9 of the daemon at that moment leaves the same state);
/// the store is reopened and a maintenance round runs far in the future (every
/// drill expired).  For every n from the clone group's creation on (n = 2:
/// the clone's own write; a crash there leaves the group empty, the
/// best-effort cleanup cannot run; later n: the clone too), `g.drill-1`
/// stays: no record names it, so
/// `drill::expire` never sees them, `drill list` does not show them, `status`
/// lists them as a protected group, and their parent point is pinned against
/// retention for ever.
///
/// Expected: after recovery plus a maintenance round, no clone group without a
/// drill (the doc of `start`: "A failure part-way removes the clones made so
/// far").  Actual: an orphan `g.drill-1`.
///
/// Root cause: src/dr/drill.rs `start`: the record is written last, and only a
/// `clone_volume` failure triggers cleanup.  Fix: write the `DrillRec`
/// (state Running, clones listed) before making the clones, or sweep clone
/// groups without a record in `maintain`.
#[test]
fn a_drill_cut_off_at_any_write_leaves_no_orphan_clone_group() {
    let (_g, _f) = serial();
    for n in 0..16 {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("s");
        let s = protected(&dir, 2);
        fail::cfg("db-write", &fail_after(n)).unwrap();
        let r = drill::start(
            &s,
            Actor { uid: 0 },
            "g",
            &DrillOptions {
                keep: true,
                ..Default::default()
            },
        );
        fail::remove("db-write");
        drop(s);
        let s = Store::open(&dir, None).unwrap();
        // Far in the future: every drill has expired.
        drill::expire(&s, u64::MAX / 2, &no_clients).unwrap();
        let groups: Vec<String> = s.groups().unwrap().into_iter().map(|g| g.name).collect();
        assert_eq!(
            groups,
            vec!["g".to_string()],
            "cut off at metadata write {n}: clone groups left after recovery and expiry \
             (drills recorded: {:?})",
            drill::list(&s)
                .unwrap()
                .iter()
                .map(|d| d.id)
                .collect::<Vec<_>>()
        );
        if r.is_ok() {
            return;
        }
    }
    panic!("drill::start never succeeded");
}

/// DEFECT, fixed since (CLI hostile input, `--ttl`): an absurd TTL makes a kept drill
/// expire at once instead of never.
///
/// Reproduction: `drclone test g --keep --ttl 18446744073709551615s`
/// (`parse_duration` accepts it: u64::MAX seconds).  `drill::start` computes
/// `expires: now + ttl`, which wraps in a release build (`now - 1`), so the
/// next maintenance round removes the clones the operator asked to keep.  (A
/// debug build panics in the daemon's control handler instead.)
///
/// Expected: the drill stays until `drill rm` (or the TTL is refused as too
/// long).  Actual: expired by the first maintenance round.
///
/// Root cause: src/dr/drill.rs `start`, `expires: now + opts.ttl...`; fix
/// with `saturating_add` (or bound the TTL in `parse_duration`'s callers).
#[test]
fn an_absurd_ttl_keeps_the_drill_instead_of_expiring_it_at_once() {
    let (_g, _f) = serial();
    let d = tempfile::tempdir().unwrap();
    let s = protected(&d.path().join("s"), 1);
    let ttl = drclone::engine::types::parse_duration("18446744073709551615s").unwrap();
    let rec = drill::start(
        &s,
        Actor { uid: 0 },
        "g",
        &DrillOptions {
            keep: true,
            ttl: Some(ttl),
            ..Default::default()
        },
    )
    .unwrap();
    let expired = drill::expire(&s, drclone::util::now_secs(), &no_clients).unwrap();
    assert!(
        expired.is_empty(),
        "a drill kept with a TTL of {ttl} s expired at once (expires = {})",
        rec.expires
    );
    assert!(s.volumes(Some(&rec.clone_group)).unwrap().len() == 1);
}

/// DEFECT, fixed since (drill expiry vs a client still attached): `--ttl` counts from the
/// start of the drill, so the daemon removes the clones (and disconnects the
/// boot check) while the drill's command is still running.
///
/// Reproduction: `drclone test g --keep --ttl 10s --exec tools/boot-check`
/// (booting takes 14-24 s under TCG here).  `drill::start` sets `expires =
/// now + ttl`; `finish` never moves it; the maintenance round 10 s after the
/// start sees a Running drill past `expires`, disconnects the VM's NBD
/// connections and removes the clones mid-boot, and the drill fails.  The
/// same with no `--ttl` for any command longer than 2 h.
///
/// Expected: a running drill is not expired by its keep TTL (DESIGN §17: "a
/// kept one after `--ttl`", i.e. after it finished; an unfinished one after
/// 2 h); the TTL of a kept drill counts from its finish.  Actual: expired 61 s
/// into a drill started with `--ttl 60s`.
///
/// Root cause: src/dr/drill.rs `start` (`expires: now + opts.ttl...`) and
/// `finish` (does not set `expires = finished + ttl`); `expire` treats
/// Running and Finished drills alike.
#[test]
fn a_running_drill_is_not_expired_by_its_keep_ttl() {
    let (_g, _f) = serial();
    let d = tempfile::tempdir().unwrap();
    let s = protected(&d.path().join("s"), 1);
    let rec = drill::start(
        &s,
        Actor { uid: 0 },
        "g",
        &DrillOptions {
            keep: true,
            ttl: Some(60),
            command: Some("tools/boot-check".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let gone = drill::expire(&s, rec.started + 61, &no_clients).unwrap();
    assert!(
        gone.is_empty(),
        "drill {} was expired 61 s after its start while its command still ran (--ttl 60s)",
        rec.id
    );
}

/// DEFECT, fixed since (agent manifest trusted against a head that changed): after `volume
/// rm` of a replicated volume, the next cycle recreates it empty and sends
/// only the blocks changed at the source, so the new point is mostly zeros.
///
/// Reproduction: `drclone replicate --volume g/d=FILE` (point 1, manifest
/// names point 1); `drclone volume rm g/d`; `drclone replicate --volume
/// g/d=FILE` again with FILE unchanged.  HELLO recreates `g/d` empty; WELCOME
/// says the latest point is still 1 (points outlive the volume), so the agent
/// trusts its manifest, finds no changed block and commits point 2 with no
/// data.  The same happens when anything else writes the head between cycles
/// (`import`, an NBD client, which the drill design explicitly allows): the
/// next points silently keep that foreign data instead of the source's.
///
/// Expected: point 2 reads as FILE.  Actual: zeros.
///
/// Root cause: src/repl/agent.rs (manifest load, `Some(m.point) !=
/// w.latest_point`) validates the manifest against the group's latest point
/// id, not against the state of each head; the receiver (src/repl/receiver.rs,
/// `open_session`/WELCOME) gives the agent nothing that changes when a head is
/// recreated or written out of band.  Fix: WELCOME per volume the head's
/// lineage and a write generation (or "head unchanged since point P"), and
/// treat the manifest as stale when they differ.
#[test]
fn a_recreated_volume_gets_the_whole_source_not_just_the_changes() {
    let (_g, _f) = serial();
    let d = tempfile::tempdir().unwrap();
    let s = init(&d.path().join("s"));
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, lh) = drclone::daemon::replication::listen(
        "127.0.0.1:0",
        s.clone(),
        Config::default(),
        stop.clone(),
    )
    .unwrap();
    let data = fill(7, (8 * CS) as usize);
    let src = d.path().join("src.raw");
    std::fs::File::create(&src)
        .unwrap()
        .write_all(&data)
        .unwrap();
    let opts = agent::Options {
        target: addr,
        volumes: vec![VolumeSpec {
            group: "g".into(),
            disk: "d".into(),
            source: src.clone(),
        }],
        state_dir: d.path().join("state"),
        token: None,
        label: None,
        bwlimit: None,
        pre_snapshot: None,
        post_snapshot: None,
        progress: false,
        dirty_bitmap: None,
        reprotect: false,
        tls: None,
    };
    let p1 = agent::cycle(&opts).unwrap();
    assert_eq!(
        s.read(
            &s.view("g", "d", Some(&p1.point.to_string())).unwrap(),
            0,
            data.len()
        )
        .unwrap(),
        data
    );
    // The session lets go of the head once it sees the agent's EOF.
    let mut removed = false;
    for _ in 0..500 {
        match s.remove_volume("g", "d") {
            Ok(()) => {
                removed = true;
                break;
            }
            Err(drclone::Error::Busy(_)) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(removed, "the replication session kept its lease");
    let p2 = agent::cycle(&opts).unwrap();
    stop.store(true, Ordering::Relaxed);
    lh.join().unwrap();
    let got = s
        .read(
            &s.view("g", "d", Some(&p2.point.to_string())).unwrap(),
            0,
            data.len(),
        )
        .unwrap();
    assert!(
        got == data,
        "point {} of the recreated volume is not the source ({} of {} bytes are zero; \
         the cycle sent {} chunks)",
        p2.point,
        got.iter().filter(|b| **b == 0).count(),
        got.len(),
        p2.chunks_sent
    );
}

/// DEFECT, fixed since (one writer per volume): a HELLO that is refused because an NBD
/// client writes the volume still resizes that volume under the client.
///
/// Reproduction: an NBD client has `g/d` (4 blocks) open for writing (a lease
/// `nbd ...`); an agent sends HELLO naming `g/d` with 8 blocks.  The receiver
/// answers ERROR "one writer at a time", but `g/d` is now 8 blocks: the size
/// the NBD client negotiated is wrong, and the next point records the agent's
/// size.  Any unauthenticated-by-lease peer (no token configured) can grow any
/// protected volume up to 2^60 bytes this way without committing anything.
///
/// Expected: a refused session changes nothing.  Actual: the volume grew.
///
/// Root cause: src/repl/receiver.rs `open_session` calls `resize_volume` (and
/// `create_volume`) before `lease_if` checks for other writers.  Fix: take the
/// leases (and check the role) first, and grow only after every lease is held.
#[test]
fn a_refused_hello_does_not_resize_a_volume_another_writer_holds() {
    let (_g, _f) = serial();
    let d = tempfile::tempdir().unwrap();
    let s = protected(&d.path().join("s"), 4);
    let h = s.view("g", "d", None).unwrap();
    let lease = s.lease(&h, "nbd 127.0.0.1:1 (session 1)").unwrap();
    let (mut a, j) = session(&s);
    let (t, m) = hello(&mut a, "g", &[("d", 8 * CS)]);
    assert_eq!(t, wire::ERROR, "{m}");
    assert!(m.contains("one writer at a time"), "{m}");
    drop(a);
    let _ = j.join().unwrap();
    drop(lease);
    assert_eq!(
        s.volume("g", "d").unwrap().size,
        4 * CS,
        "a refused replication session resized a volume an NBD client was writing"
    );
}

/// PIN (hostile HELLO and MAP): weird names, absurd sizes and out-of-range MAP
/// entries get an ERROR naming the problem and create nothing; a session after
/// them still commits.
#[test]
fn hostile_hellos_and_maps_are_refused_and_create_nothing() {
    let (_g, _f) = serial();
    let d = tempfile::tempdir().unwrap();
    let s = init(&d.path().join("s"));
    let long = "x".repeat(200);
    let cases: Vec<(&str, Vec<(&str, u64)>)> = vec![
        ("../x", vec![("d", CS)]),
        ("", vec![("d", CS)]),
        (&long, vec![("d", CS)]),
        ("g", vec![("../d", CS)]),
        ("g", vec![("", CS)]),
        ("g", vec![("d", 0)]),
        ("g", vec![("d", 1 << 63)]),
        ("g", vec![("d", 1000)]),
        ("g", vec![]),
    ];
    for (g, vols) in &cases {
        let (mut a, j) = session(&s);
        let (t, m) = hello(&mut a, g, vols);
        assert_eq!(t, wire::ERROR, "HELLO {g:?} {vols:?} was accepted: {m}");
        drop(a);
        assert!(j.join().unwrap().is_err());
    }
    assert!(
        s.volumes(None).unwrap().is_empty(),
        "refused HELLOs created volumes"
    );
    // MAP entries out of range, each in a session of its own.
    let id = *blake3::hash(&fill(3, CS as usize)).as_bytes();
    let maps = [
        wire::Entry::Data { block: 4, id },
        wire::Entry::Data {
            block: u64::MAX,
            id,
        },
        wire::Entry::Zeros { first: 3, count: 2 },
        wire::Entry::Zeros {
            first: u64::MAX - 1,
            count: 5,
        },
        wire::Entry::Zeros {
            first: 0,
            count: u64::MAX,
        },
        // A block the cycle neither holds nor sent.
        wire::Entry::Data { block: 0, id },
    ];
    for e in maps {
        let (mut a, j) = session(&s);
        let (t, m) = hello(&mut a, "g", &[("d", 4 * CS)]);
        assert_eq!(t, wire::WELCOME, "{m}");
        wire::write_frame(&mut a, wire::MAP, &wire::encode_map("d", &[e])).unwrap();
        let (t, body) = wire::read_frame(&mut a).unwrap();
        assert_eq!(t, wire::ERROR, "MAP {e:?}");
        assert!(!String::from_utf8_lossy(&body).is_empty());
        drop(a);
        assert!(j.join().unwrap().is_err());
    }
    assert!(
        s.points("g").unwrap().is_empty(),
        "no point from a refused MAP"
    );
    // Still serving: an honest empty cycle commits.
    let (mut a, j) = session(&s);
    assert_eq!(hello(&mut a, "g", &[("d", 4 * CS)]).0, wire::WELCOME);
    let c = wire::Commit {
        label: None,
        app: false,
        source_point: None,
        time: None,
    };
    wire::write_frame(&mut a, wire::COMMIT, &serde_json::to_vec(&c).unwrap()).unwrap();
    assert_eq!(wire::read_frame(&mut a).unwrap().0, wire::COMMITTED);
    drop(a);
    j.join().unwrap().unwrap();
}

/// PIN (crash between the head swap and the drop of retired heads, then
/// undo): a change of point cut off at any metadata write, recovered by a
/// reopen and a maintenance round, leaves a group that `--undo` returns to the
/// replica heads exactly (the replica head's writes made after the point
/// included), and `verify` passes.
#[test]
fn a_change_of_point_cut_off_anywhere_still_undoes_to_the_replica_heads() {
    let (_g, _f) = serial();
    for n in 0..12 {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("s");
        let s = protected(&dir, 2);
        // The replica head moves on after point 1; point 2 is newer still.
        let h = s.view("g", "d", None).unwrap();
        s.write(&h, 0, &fill(2, CS as usize)).unwrap();
        s.create_point("g", false, None).unwrap();
        s.write(&h, CS, &fill(3, CS as usize)).unwrap();
        s.flush().unwrap();
        let replica = s.read(&h, 0, (2 * CS) as usize).unwrap();
        let who = Actor { uid: 0 };
        failover::run(&s, who, "g", &Request::To(Some("1".into())), &no_clients).unwrap();
        let f = s.view("g", "d", None).unwrap();
        s.write(&f, 0, &fill(4, CS as usize)).unwrap();
        // Change the point (retires the first failover head), cut off at write n.
        fail::cfg("db-write", &fail_after(n)).unwrap();
        let r = failover::run(&s, who, "g", &Request::To(Some("2".into())), &no_clients);
        fail::remove("db-write");
        drop((h, f));
        drop(s);
        let s = Store::open(&dir, None).unwrap();
        let _ = drclone::dr::maintain(&s, drclone::util::now_secs(), &no_clients);
        assert!(s.group("g").unwrap().retired.is_empty(), "write {n}");
        failover::run(&s, who, "g", &Request::Undo, &no_clients).unwrap();
        let _ = drclone::dr::maintain(&s, drclone::util::now_secs(), &no_clients);
        let h = s.view("g", "d", None).unwrap();
        assert!(
            s.read(&h, 0, (2 * CS) as usize).unwrap() == replica,
            "undo after a change of point cut off at write {n} did not restore the replica"
        );
        drclone::engine::gc::gc(&s).unwrap();
        let rep = drclone::engine::maint::verify(&s, &indicatif::ProgressBar::hidden()).unwrap();
        assert!(rep.bad.is_empty(), "write {n}: {:?}", rep.bad);
        if r.is_ok() {
            return;
        }
    }
    panic!("the change of point never succeeded");
}
