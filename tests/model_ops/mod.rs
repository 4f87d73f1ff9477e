//! The model-based test's machinery, shared by `tests/model.rs` (local packs) and
//! `tests/s3.rs` (packs on a real radosgw): random sequences of write, trim, point,
//! clone, remove, gc and reopen, checked against "volume = Vec<u8>, point = copy".
#![allow(dead_code)]

use std::collections::BTreeMap;

use drclone::engine::s3::S3Config;
use drclone::engine::store::{InitOptions, Store};
use proptest::prelude::*;

// Four 4 KiB overlay pages per block: writes hit whole pages, page edges and
// whole blocks.
pub const CS: u64 = 16384;
pub const VOL: u64 = 16 * CS;

#[derive(Debug, Clone)]
pub enum Op {
    /// Write `len` bytes of a pattern seeded by `seed` (seed % 4 == 0: zeros,
    /// seed % 4 == 1: one of 4 repeated blocks, else unique) at `off` of volume `v`.
    Write {
        v: usize,
        off: u64,
        len: u64,
        seed: u32,
    },
    Trim {
        v: usize,
        off: u64,
        len: u64,
    },
    Point,
    Clone {
        point: usize,
        disk: usize,
    },
    RemovePoint {
        point: usize,
    },
    RemoveVolume {
        v: usize,
    },
    Gc,
    Reopen,
    /// Drop the store without closing it, like `kill -9`: the overlay is lost from
    /// memory and must come back from the journal.
    Crash,
    Flush,
    /// Wait until every sealed pack is uploaded (object-store backend only; a
    /// no-op on local packs), so later reads go to the object store.
    Drain,
}

/// Offsets: anywhere, or on a 4 KiB page boundary (what VMs mostly write).
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![0..VOL, (0..VOL / 4096).prop_map(|p| p * 4096)]
}

fn length(max: u64) -> impl Strategy<Value = u64> {
    prop_oneof![1..max, (1..max / 4096).prop_map(|p| p * 4096)]
}

pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..8usize, offset(), length(3 * CS), any::<u32>()).prop_map(|(v, off, len, seed)| Op::Write { v, off, len, seed }),
        2 => (0..8usize, offset(), length(4 * CS)).prop_map(|(v, off, len)| Op::Trim { v, off, len }),
        2 => Just(Op::Point),
        2 => (0..8usize, 0..2usize).prop_map(|(point, disk)| Op::Clone { point, disk }),
        1 => (0..8usize).prop_map(|point| Op::RemovePoint { point }),
        1 => (0..8usize).prop_map(|v| Op::RemoveVolume { v }),
        1 => Just(Op::Gc),
        1 => Just(Op::Reopen),
        2 => Just(Op::Crash),
        1 => Just(Op::Flush),
    ]
}

/// [`op`], plus waits for the upload queue to drain (object-store runs).
pub fn op_with_drain() -> impl Strategy<Value = Op> {
    prop_oneof![8 => op(), 1 => Just(Op::Drain)]
}

fn pattern(seed: u32, len: usize, off: u64) -> Vec<u8> {
    match seed % 4 {
        0 => vec![0u8; len],
        1 => {
            // Block-aligned repeated content so dedup kicks in.
            (0..len as u64)
                .map(|i| (((off + i) % CS) as u8) ^ (seed as u8 & 3))
                .collect()
        }
        _ => {
            let mut x = seed as u64 | 1;
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        }
    }
}

struct Model {
    /// (group, disk) -> content
    vols: BTreeMap<(String, String), Vec<u8>>,
    /// point id -> (group, disk -> content)
    points: BTreeMap<u64, BTreeMap<String, Vec<u8>>>,
    clones: usize,
}

fn check_all(s: &Store, m: &Model) {
    for ((g, d), want) in &m.vols {
        let v = s.view(g, d, None).unwrap();
        assert_eq!(&s.read(&v, 0, VOL as usize).unwrap(), want, "head {g}/{d}");
        // Block by block too: single-block lookups go through the head-map cache.
        for b in 0..VOL / CS {
            let r = (b * CS) as usize..((b + 1) * CS) as usize;
            assert_eq!(
                &s.read(&v, b * CS, CS as usize).unwrap()[..],
                &want[r],
                "head {g}/{d} block {b}"
            );
        }
    }
    for (id, disks) in &m.points {
        for (d, want) in disks {
            let v = s.view("app", d, Some(&id.to_string())).unwrap();
            assert_eq!(
                &s.read(&v, 0, VOL as usize).unwrap(),
                want,
                "point {id} disk {d}"
            );
        }
    }
}

/// Run `ops` on a new store (packs on `s3` if given) against the model.
pub fn run(ops: Vec<Op>, encrypt: bool, s3: Option<S3Config>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let key = dir.path().join("key");
    Store::init(
        &path,
        &InitOptions {
            chunk_size: CS as u32,
            encrypt,
            key_file: encrypt.then(|| key.clone()),
            pack_size: 64 << 10, // small packs so GC deletes and compacts them
            s3,
            ..Default::default()
        },
    )
    .unwrap();
    // A tiny write-back overlay and journal, so partial writes are destaged under
    // pressure and journal segments rotate and are trimmed.
    let open = || {
        let mut s = Store::open(&path, None).unwrap();
        s.set_dirty_limit(3);
        s.set_journal_limit(6 * CS, 2 * CS);
        // The background destager runs beside the operations, as under `serve`.
        let s = std::sync::Arc::new(s);
        s.start_destager();
        s
    };
    let mut s = Some(open());
    let mut m = Model {
        vols: BTreeMap::new(),
        points: BTreeMap::new(),
        clones: 0,
    };
    {
        let s = s.as_ref().unwrap();
        s.create_group("app").unwrap();
        s.create_group("drill").unwrap();
        for d in ["d0", "d1"] {
            s.create_volume("app", d, VOL).unwrap();
            m.vols
                .insert(("app".into(), d.into()), vec![0u8; VOL as usize]);
        }
    }
    for op in ops {
        let store = s.as_ref().unwrap();
        let keys: Vec<(String, String)> = m.vols.keys().cloned().collect();
        match op {
            Op::Write { v, off, len, seed } => {
                if keys.is_empty() {
                    continue;
                }
                let (g, d) = &keys[v % keys.len()];
                let len = len.min(VOL - off);
                let data = pattern(seed, len as usize, off);
                let view = store.view(g, d, None).unwrap();
                store.write(&view, off, &data).unwrap();
                m.vols.get_mut(&(g.clone(), d.clone())).unwrap()
                    [off as usize..(off + len) as usize]
                    .copy_from_slice(&data);
            }
            Op::Trim { v, off, len } => {
                if keys.is_empty() {
                    continue;
                }
                let (g, d) = &keys[v % keys.len()];
                let len = len.min(VOL - off);
                let view = store.view(g, d, None).unwrap();
                store.zero(&view, off, len).unwrap();
                m.vols.get_mut(&(g.clone(), d.clone())).unwrap()
                    [off as usize..(off + len) as usize]
                    .fill(0);
            }
            Op::Point => {
                let p = store.create_point("app", false, None).unwrap();
                let snap: BTreeMap<String, Vec<u8>> = m
                    .vols
                    .iter()
                    .filter(|((g, _), _)| g == "app")
                    .map(|((_, d), c)| (d.clone(), c.clone()))
                    .collect();
                assert_eq!(p.volumes.len(), snap.len());
                m.points.insert(p.id, snap);
            }
            Op::Clone { point, disk } => {
                let ids: Vec<u64> = m.points.keys().copied().collect();
                if ids.is_empty() {
                    continue;
                }
                let id = ids[point % ids.len()];
                let disks: Vec<String> = m.points[&id].keys().cloned().collect();
                if disks.is_empty() {
                    continue;
                }
                let d = &disks[disk % disks.len()];
                m.clones += 1;
                let name = format!("c{}", m.clones);
                store
                    .clone_volume("app", d, &id.to_string(), "drill", &name)
                    .unwrap();
                let content = m.points[&id][d].clone();
                m.vols.insert(("drill".into(), name), content);
            }
            Op::RemovePoint { point } => {
                let ids: Vec<u64> = m.points.keys().copied().collect();
                if ids.is_empty() {
                    continue;
                }
                let id = ids[point % ids.len()];
                store.remove_point("app", &id.to_string()).unwrap();
                m.points.remove(&id);
            }
            Op::RemoveVolume { v } => {
                // Keep app's disks (points need a group with volumes to be useful).
                let drills: Vec<&(String, String)> =
                    keys.iter().filter(|(g, _)| g == "drill").collect();
                if drills.is_empty() {
                    continue;
                }
                let (g, d) = drills[v % drills.len()].clone();
                store.remove_volume(&g, &d).unwrap();
                m.vols.remove(&(g, d));
            }
            Op::Gc => {
                drclone::engine::gc::gc(store).unwrap();
            }
            Op::Flush => store.flush().unwrap(),
            Op::Drain => drain(store),
            Op::Reopen => {
                s.take().unwrap().close().unwrap();
                s = Some(open());
            }
            Op::Crash => {
                let st = s.take().unwrap();
                st.stop_destager();
                drop(st);
                s = Some(open());
            }
        }
        check_all(s.as_ref().unwrap(), &m);
    }
    let s = s.unwrap();
    let rep = drclone::engine::maint::verify(&s, &indicatif::ProgressBar::hidden()).unwrap();
    assert!(rep.ok, "verify: {:?}", rep.bad);
    // Remove everything: GC must leave no chunk and no pack data behind.
    for id in m.points.keys() {
        s.remove_point("app", &id.to_string()).unwrap();
    }
    for (g, d) in m.vols.keys() {
        s.remove_volume(g, d).unwrap();
    }
    drclone::engine::gc::gc(&s).unwrap();
    // An object store deletes the objects once the catalog the GC took (which
    // no longer lists them) is in the bucket: its sweep (DESIGN §20b).
    if let Some(c) = s.chunks.backend.catalog() {
        assert!(
            c.wait_idle(std::time::Duration::from_secs(120)),
            "the catalog after the gc was not uploaded: {:?}",
            c.status()
        );
    }
    let st = s.chunks.stats().unwrap();
    assert_eq!(st.chunks, 0, "every chunk is reclaimed");
    assert_eq!(
        s.chunks.backend.bytes().unwrap(),
        0,
        "every pack is deleted"
    );
}

/// Wait (at most 120 s) until the backend has no sealed pack waiting for upload.
pub fn drain(s: &Store) {
    for _ in 0..2400 {
        match s.chunks.backend.backlog() {
            None => return,
            Some(b) if b.packs == 0 => return,
            Some(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
    panic!("uploads did not drain: {:?}", s.chunks.backend.backlog());
}
