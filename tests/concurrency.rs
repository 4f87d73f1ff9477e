//! The concurrency model test of issue 9: writers, points, GC, flushes, block
//! status and the background destager all at once, with failpoints widening every
//! race window of the engine (needs `--features failpoints`; `scripts/test.sh`
//! always passes it).
//!
//! Checked against a model of what each writer had acknowledged:
//! * every acknowledged write reads back (by its writer, right after the ack, and
//!   at the end, and after a reopen);
//! * every recovery point holds a prefix of each writer's acknowledged writes: a
//!   writer writes counter i to disk0 (a 4 KiB page), waits for the ack, then to
//!   disk1 (a whole block); a point must hold disk0 = disk1 or disk0 = disk1 + 1,
//!   at least what was acknowledged before the point began, and nothing that had
//!   not been issued when it ended;
//! * block status never reports a hole over acknowledged data;
//! * `verify` passes at the end, and every point still reads as it did.
#![cfg(feature = "failpoints")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use drclone::engine::gc::gc;
use drclone::engine::maint::verify;
use drclone::engine::store::{InitOptions, Store};
use drclone::{Block, View};

const CS: u64 = 16384;
const WRITERS: u64 = 3;
const ROUNDS: u64 = 1000;

fn stamp(w: u64, i: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for c in v.chunks_mut(16) {
        c[..8].copy_from_slice(&w.to_le_bytes());
        c[8..].copy_from_slice(&i.to_le_bytes());
    }
    v
}

/// The counter a stamped buffer holds (0 for zeros); panics on anything else.
fn counter(w: u64, buf: &[u8], what: &str) -> u64 {
    if buf.iter().all(|&b| b == 0) {
        return 0;
    }
    let i = u64::from_le_bytes(buf[8..16].try_into().unwrap());
    assert_eq!(
        buf,
        &stamp(w, i, buf.len())[..],
        "{what}: not one whole write"
    );
    i
}

struct Shared {
    acked0: Vec<AtomicU64>,
    acked1: Vec<AtomicU64>,
    started0: Vec<AtomicU64>,
    started1: Vec<AtomicU64>,
    done: AtomicBool,
}

fn load(v: &[AtomicU64]) -> Vec<u64> {
    v.iter().map(|a| a.load(Ordering::SeqCst)).collect()
}

#[test]
fn writers_points_gc_flush_and_destage_interleaved_lose_nothing() {
    let scenario = fail::FailScenario::setup();
    for (fp, action) in [
        ("gc-after-pack-listing", "sleep(3)"),
        ("gc-before-zero-drop", "sleep(3)"),
        ("point-before-gate", "sleep(2)"),
        ("extents-between-overlay-and-map", "1%sleep(1)"),
        ("flush-between-open-and-seal", "20%sleep(1)"),
        ("destage-before-commit", "20%sleep(1)"),
    ] {
        fail::cfg(fp, action).unwrap();
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("s");
    Store::init(
        &dir,
        &InitOptions {
            chunk_size: CS as u32,
            pack_size: 256 << 10,
            ..Default::default()
        },
    )
    .unwrap();
    let mut s = Store::open(&dir, None).unwrap();
    s.set_dirty_limit(4);
    s.set_journal_limit(256 << 10, 64 << 10);
    let s = Arc::new(s);
    s.start_destager();
    s.create_group("g").unwrap();
    s.create_volume("g", "d0", 16 * CS).unwrap();
    s.create_volume("g", "d1", 16 * CS).unwrap();
    s.create_volume("g", "scratch", 16 * CS).unwrap();
    let sh = Arc::new(Shared {
        acked0: (0..WRITERS).map(|_| AtomicU64::new(0)).collect(),
        acked1: (0..WRITERS).map(|_| AtomicU64::new(0)).collect(),
        started0: (0..WRITERS).map(|_| AtomicU64::new(0)).collect(),
        started1: (0..WRITERS).map(|_| AtomicU64::new(0)).collect(),
        done: AtomicBool::new(false),
    });
    let view = |disk: &str| -> View { s.view("g", disk, None).unwrap() };
    let mut threads = Vec::new();
    for w in 0..WRITERS {
        let (s, sh) = (s.clone(), sh.clone());
        let (d0, d1, sc) = (view("d0"), view("d1"), view("scratch"));
        threads.push(std::thread::spawn(move || {
            for i in 1..=ROUNDS {
                let off = w * CS;
                sh.started0[w as usize].store(i, Ordering::SeqCst);
                s.write(&d0, off, &stamp(w, i, 4096)).unwrap();
                sh.acked0[w as usize].store(i, Ordering::SeqCst);
                // Readable at once, and block status says data.
                let got = s.read(&d0, off, 4096).unwrap();
                assert_eq!(counter(w, &got, "d0 after ack"), i);
                let ext = s.extents(&d0, off, CS).unwrap();
                assert!(
                    ext.iter().all(|e| matches!(e.2, Block::Data(_))),
                    "writer {w} round {i}: block status {ext:?} over acknowledged data"
                );
                sh.started1[w as usize].store(i, Ordering::SeqCst);
                s.write(&d1, off, &stamp(w, i, CS as usize)).unwrap();
                sh.acked1[w as usize].store(i, Ordering::SeqCst);
                let got = s.read(&d1, off, CS as usize).unwrap();
                assert_eq!(counter(w, &got, "d1 after ack"), i);
                // Zero, then rewrite the same key (GC's zero-marker window).
                let so = (w * 4 + i % 4) * CS;
                if i % 3 == 0 {
                    s.zero(&sc, so, CS).unwrap();
                    s.write(&sc, so, &stamp(w, i, CS as usize)).unwrap();
                    assert_eq!(
                        counter(w, &s.read(&sc, so, CS as usize).unwrap(), "scratch"),
                        i
                    );
                } else {
                    s.write(&sc, so + 4096 * (i % 4), &stamp(w, i, 4096))
                        .unwrap();
                }
                if i % 16 == 0 {
                    s.flush().unwrap();
                }
            }
        }));
    }
    // Points, checked against the writers' acknowledgements.
    let points = {
        let (s, sh) = (s.clone(), sh.clone());
        std::thread::spawn(move || {
            let mut kept: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
            let mut n = 0;
            while !sh.done.load(Ordering::SeqCst) {
                let before0 = load(&sh.acked0);
                let before1 = load(&sh.acked1);
                let p = s.create_point("g", false, None).unwrap();
                let after0 = load(&sh.started0);
                let after1 = load(&sh.started1);
                let id = p.id.to_string();
                let (p0, p1) = (
                    s.view("g", "d0", Some(&id)).unwrap(),
                    s.view("g", "d1", Some(&id)).unwrap(),
                );
                let mut vals = Vec::new();
                for w in 0..WRITERS {
                    let a = counter(w, &s.read(&p0, w * CS, 4096).unwrap(), "point d0");
                    let b = counter(w, &s.read(&p1, w * CS, CS as usize).unwrap(), "point d1");
                    let wi = w as usize;
                    assert!(
                        a == b || a == b + 1,
                        "point {id}, writer {w}: disk0 = {a}, disk1 = {b}: not a prefix"
                    );
                    assert!(
                        a >= before0[wi] && b >= before1[wi],
                        "point {id} misses acked writes"
                    );
                    assert!(
                        a <= after0[wi] && b <= after1[wi],
                        "point {id} holds unissued writes"
                    );
                    vals.push((a, b));
                }
                kept.insert(p.id, vals);
                // Keep a few; remove the rest (GC then has versions to drop).
                if kept.len() > 4 {
                    let old = *kept.keys().next().unwrap();
                    s.remove_point("g", &old.to_string()).unwrap();
                    kept.remove(&old);
                }
                n += 1;
            }
            (kept, n)
        })
    };
    let gcs = {
        let (s, sh) = (s.clone(), sh.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !sh.done.load(Ordering::SeqCst) {
                gc(&s).unwrap();
                n += 1;
            }
            n
        })
    };
    let flusher = {
        let (s, sh) = (s.clone(), sh.clone());
        std::thread::spawn(move || {
            while !sh.done.load(Ordering::SeqCst) {
                s.flush().unwrap();
                std::thread::yield_now();
            }
        })
    };
    for t in threads {
        t.join().unwrap();
    }
    sh.done.store(true, Ordering::SeqCst);
    let (kept, npoints) = points.join().unwrap();
    let ngc = gcs.join().unwrap();
    flusher.join().unwrap();
    assert!(
        npoints >= 3 && ngc >= 3,
        "{npoints} points and {ngc} GCs ran"
    );
    drop(scenario);

    let check = |s: &Store| {
        for w in 0..WRITERS {
            let d0 = s
                .read(&s.view("g", "d0", None).unwrap(), w * CS, 4096)
                .unwrap();
            let d1 = s
                .read(&s.view("g", "d1", None).unwrap(), w * CS, CS as usize)
                .unwrap();
            assert_eq!(counter(w, &d0, "final d0"), ROUNDS);
            assert_eq!(counter(w, &d1, "final d1"), ROUNDS);
        }
        for (id, vals) in &kept {
            let id = id.to_string();
            for (w, (a, b)) in vals.iter().enumerate() {
                let w = w as u64;
                let p0 = s.view("g", "d0", Some(&id)).unwrap();
                let p1 = s.view("g", "d1", Some(&id)).unwrap();
                assert_eq!(
                    counter(w, &s.read(&p0, w * CS, 4096).unwrap(), "kept d0"),
                    *a
                );
                assert_eq!(
                    counter(w, &s.read(&p1, w * CS, CS as usize).unwrap(), "kept d1"),
                    *b
                );
            }
        }
        let rep = verify(s, &indicatif::ProgressBar::hidden()).unwrap();
        assert!(rep.bad.is_empty(), "verify: {:?}", rep.bad);
    };
    check(&s);
    gc(&s).unwrap();
    check(&s);
    s.close().unwrap();
    drop(s);
    let s = Store::open(&dir, None).unwrap();
    check(&s);
    eprintln!(
        "{npoints} points, {ngc} GC runs, {} writers x {ROUNDS} rounds",
        WRITERS
    );
}
