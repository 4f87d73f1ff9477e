//! Power cuts under replication (issue 10): the receiver stores CHUNKS frames
//! without syncing them (COMMIT's point creation syncs every pack before the
//! point exists), so this checks what that promises.
//!
//! The target store lives on `support::crashfs` (unsynced data is lost at a
//! cut, see tests/powerloss.rs); the receiver runs in this process on a
//! loopback port, and the real agent (`drclone::repl::agent::cycle`)
//! replicates a file whose blocks change between cycles, some copied from
//! other blocks (deduplicated on the target).  A cut comes after a random
//! number of file operations, so it lands in HELLO, in the middle of the
//! CHUNKS frames, in COMMIT or after it.  After each cut the store is reopened
//! on what was durable, and:
//! * every point whose cycle the agent saw COMMITTED exists and reads exactly
//!   as the source did at that cycle;
//! * a point of the cycle cut in flight is absent or exact;
//! * `verify` finds no bad chunk;
//! * the next cycles (whose agent's manifest may now be stale) land exactly.
//!
//! `DRCLONE_POWERLOSS_SEED=N` runs only seed N.

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use drclone::engine::store::{InitOptions, Store};
use drclone::repl::{agent, receiver};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use support::crashfs::{CrashFs, Tear};

const CS: usize = 16 << 10;
const BLOCKS: usize = 40;
const CUTS: u64 = 12;

/// A receiver on a loopback port, serving `store` until stopped.
struct Target {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Target {
    fn start(store: Arc<Store>) -> Target {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut sessions = Vec::new();
            while !st.load(Ordering::Acquire) {
                match l.accept() {
                    Ok((s, peer)) => {
                        s.set_nonblocking(false).unwrap();
                        let store = store.clone();
                        sessions.push(std::thread::spawn(move || {
                            let _ = receiver::serve_connection(
                                &store,
                                s,
                                &peer.to_string(),
                                &receiver::Config::default(),
                            );
                        }));
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
                }
            }
            // The agent closed its connection when its cycle returned.
            for s in sessions {
                let _ = s.join();
            }
        });
        Target {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap();
    }
}

fn open(dir: &Path) -> drclone::Result<Arc<Store>> {
    Ok(Arc::new(Store::open(dir, None)?))
}

/// The bytes of point `id` of g/d.
fn read_point(store: &Store, id: u64) -> Vec<u8> {
    let v = store.view("g", "d", Some(&id.to_string())).unwrap();
    store.read(&v, 0, BLOCKS * CS).unwrap()
}

/// One agent cycle of `src` into g/d.
fn replicate(t: &Target, src: &Path, work: &Path) -> drclone::Result<agent::CycleReport> {
    agent::cycle(&agent::Options {
        target: t.addr.clone(),
        volumes: vec![agent::VolumeSpec {
            group: "g".into(),
            disk: "d".into(),
            source: src.to_path_buf(),
        }],
        state_dir: work.join("agent"),
        token: None,
        label: None,
        bwlimit: None,
        pre_snapshot: None,
        post_snapshot: None,
        progress: false,
        dirty_bitmap: None,
        reprotect: false,
        tls: None,
    })
}

fn change(rng: &mut StdRng, src: &mut [u8]) {
    for _ in 0..rng.gen_range(1..=6) {
        let b = rng.gen_range(0..BLOCKS);
        let blk = &mut src[b * CS..(b + 1) * CS];
        match rng.gen_range(0..4) {
            // A copy of another block: the target holds its chunk already.
            0 => {
                let o = rng.gen_range(0..BLOCKS);
                let copy = src[o * CS..(o + 1) * CS].to_vec();
                src[b * CS..(b + 1) * CS].copy_from_slice(&copy);
            }
            1 => blk.fill(0),
            _ => rng.fill_bytes(blk),
        }
    }
}

fn run_seed(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let fs = CrashFs::mount();
    let dir = fs.root().join("store");
    Store::init(
        &dir,
        &InitOptions {
            chunk_size: CS as u32,
            pack_size: 256 << 10,
            ..Default::default()
        },
    )
    .unwrap();
    fs.checkpoint();
    let work = tempfile::tempdir().unwrap();
    let src_path = work.path().join("src.img");
    let mut src = vec![0u8; BLOCKS * CS];
    rng.fill_bytes(&mut src[..BLOCKS * CS / 2]);
    let mut store = open(&dir).unwrap();
    let mut target = Target::start(store.clone());
    // (point, what it must read as), for every cycle the agent saw commit.
    let mut acked: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut landed_after_cut = 0;
    for cut in 0..CUTS {
        let cycles = rng.gen_range(1..=3);
        let mut in_flight = None;
        for c in 0..cycles {
            change(&mut rng, &mut src);
            std::fs::write(&src_path, &src).unwrap();
            let last = c + 1 == cycles;
            if last {
                fs.arm(rng.gen_range(1..=80));
            }
            let r = replicate(&target, &src_path, work.path());
            match r {
                // COMMITTED: acknowledged, whatever the disk did after.
                Ok(rep) => acked.push((rep.point, src.clone())),
                Err(e) => {
                    assert!(
                        fs.is_dead(),
                        "seed {seed} cut {cut}: a cycle failed with the disk alive: {e}"
                    );
                    in_flight = Some(src.clone());
                }
            }
            if fs.is_dead() {
                break;
            }
        }
        fs.disarm();
        if !fs.is_dead() {
            fs.cut();
        }
        target.stop();
        drop(store);
        fs.wait_closed();
        fs.reset(Tear::All, rng.gen());
        store = open(&dir).unwrap_or_else(|e| panic!("seed {seed} cut {cut}: open: {e}"));
        let points: Vec<u64> = store
            .points("g")
            .map_or(Vec::new(), |p| p.iter().map(|p| p.id).collect());
        for (id, want) in &acked {
            assert!(
                points.contains(id),
                "seed {seed} cut {cut}: acknowledged point {id} is gone (points {points:?})"
            );
            assert!(
                read_point(&store, *id) == *want,
                "seed {seed} cut {cut}: acknowledged point {id} reads otherwise"
            );
        }
        let newest_acked = acked.last().map_or(0, |a| a.0);
        for id in points.iter().filter(|p| **p > newest_acked) {
            let want = in_flight
                .as_ref()
                .unwrap_or_else(|| panic!("seed {seed} cut {cut}: point {id} that no cycle made"));
            assert!(
                read_point(&store, *id) == *want,
                "seed {seed} cut {cut}: point {id} of the cycle cut in flight is not exact"
            );
            acked.push((*id, want.clone()));
            landed_after_cut += 1;
        }
        let rep =
            drclone::engine::maint::verify(&store, &indicatif::ProgressBar::hidden()).unwrap();
        // Chunks only: a cut while a new pack's file is being created leaves
        // an empty pack that recovery seals without a file, which verify's
        // pack check (work in progress elsewhere) reports.
        assert!(
            rep.bad.is_empty(),
            "seed {seed} cut {cut}: verify found bad chunks: {}",
            rep.bad
                .iter()
                .map(|b| format!(
                    "{} (pack {} offset {}): {}; used by {:?}",
                    b.chunk, b.pack, b.offset, b.error, b.used_by
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        target = Target::start(store.clone());
    }
    // One more cycle on the recovered store lands exactly.
    change(&mut rng, &mut src);
    std::fs::write(&src_path, &src).unwrap();
    let rep = replicate(&target, &src_path, work.path()).unwrap();
    assert!(read_point(&store, rep.point) == src);
    target.stop();
    drop(store);
    fs.wait_closed();
    eprintln!(
        "seed {seed}: {CUTS} cuts, {} points acknowledged, {landed_after_cut} landed though \
         cut in flight",
        acked.len()
    );
}

#[test]
fn replication_keeps_every_committed_point_through_power_cuts() {
    support::init_log();
    let seeds: Vec<u64> = match std::env::var("DRCLONE_POWERLOSS_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (7000..7004).collect(),
    };
    for seed in seeds {
        run_seed(seed);
    }
}
