//! One deterministic test per race window of issue 9 ("Nothing lost, proven").
//!
//! Each test opens the window with a failpoint (the `fail` crate; this file needs
//! `--features failpoints`, which `scripts/test.sh` always passes) and runs the
//! racing operation inside it, in the same thread, so the interleaving that used
//! to lose data happens every time.  Each test failed on the code before its fix
//! (the failure each one saw is in its doc comment) and passes after it.
//! docs/DESIGN.md §8 lists the invariants these tests check.
#![cfg(feature = "failpoints")]

use std::path::Path;
use std::sync::{Arc, Mutex};

use drclone::engine::gc::gc;
use drclone::engine::maint::verify;
use drclone::engine::store::{InitOptions, Store};
use drclone::{Block, View};

const CS: u64 = 16384;

/// Failpoints are process-global: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> (
    std::sync::MutexGuard<'static, ()>,
    fail::FailScenario<'static>,
) {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    (g, fail::FailScenario::setup())
}

fn init(dir: &Path, pack_size: u64) -> Arc<Store> {
    Store::init(
        dir,
        &InitOptions {
            chunk_size: CS as u32,
            pack_size,
            ..Default::default()
        },
    )
    .unwrap();
    Arc::new(Store::open(dir, None).unwrap())
}

/// A store with packs of `pack_size` bytes and one volume `g/d` of `blocks`
/// blocks; returns its directory guard, the store and the head.
fn setup(pack_size: u64, blocks: u64) -> (tempfile::TempDir, Arc<Store>, View) {
    let d = tempfile::tempdir().unwrap();
    let s = init(&d.path().join("s"), pack_size);
    s.create_group("g").unwrap();
    s.create_volume("g", "d", blocks * CS).unwrap();
    let h = head(&s, "g", "d");
    (d, s, h)
}

fn block(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; CS as usize];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}

fn assert_verifies(s: &Store) {
    let rep = verify(s, &indicatif::ProgressBar::hidden()).unwrap();
    assert!(rep.bad.is_empty(), "verify found bad chunks: {:?}", rep.bad);
}

fn head(s: &Store, g: &str, d: &str) -> View {
    s.view(g, d, None).unwrap()
}

/// Hypothesis 1: GC listed the pack files after releasing the gate and deleted
/// every pack it had not seen a record for, including one a writer opened in
/// between.  Before the fix: the flushed blocks written in the window read back as
/// "pack ... No such file or directory" and verify failed.
#[test]
fn h1_gc_never_deletes_a_pack_opened_after_its_listing() {
    let (_g, _f) = serial();
    let d = tempfile::tempdir().unwrap();
    // 64 KiB packs: a few blocks rotate them.
    let s = init(&d.path().join("s"), 64 << 10);
    s.create_group("g").unwrap();
    s.create_volume("g", "d", 64 * CS).unwrap();
    let h = head(&s, "g", "d");
    for b in 0..8 {
        s.write(&h, b * CS, &block(b)).unwrap();
    }
    s.flush().unwrap();
    let s2 = s.clone();
    let h2 = h.clone();
    fail::cfg_callback("gc-after-pack-listing", move || {
        // A writer fills new packs (flushed) while GC is between its listing and
        // its deletions.
        for b in 8..40 {
            s2.write(&h2, b * CS, &block(b)).unwrap();
        }
        s2.flush().unwrap();
    })
    .unwrap();
    gc(&s).unwrap();
    fail::remove("gc-after-pack-listing");
    for b in 0..40 {
        assert_eq!(
            s.read(&h, b * CS, CS as usize).unwrap(),
            block(b),
            "block {b}"
        );
    }
    assert_verifies(&s);
}

/// Hypothesis 2: GC dropped a parentless lineage's oldest zero marker using the key
/// from its snapshot, without the gate.  A write at the same epoch reuses that key,
/// so GC deleted fresh data: before the fix the block read back as zeros.
#[test]
fn h2_gc_keeps_a_write_that_reuses_a_zero_markers_key() {
    let (_g, _f) = serial();
    let (_d, s, h) = setup(1 << 20, 4);
    s.write(&h, 0, &block(1)).unwrap();
    s.zero(&h, 0, CS).unwrap(); // a zero marker at the current epoch, nothing older
    let (s2, h2) = (s.clone(), h.clone());
    fail::cfg_callback("gc-before-zero-drop", move || {
        s2.write(&h2, 0, &block(2)).unwrap();
    })
    .unwrap();
    gc(&s).unwrap();
    fail::remove("gc-before-zero-drop");
    assert_eq!(s.read(&h, 0, CS as usize).unwrap(), block(2));
    // With no writer in the window, the marker (which shadows nothing) is dropped.
    s.zero(&h, 0, CS).unwrap();
    let rep = gc(&s).unwrap();
    assert!(rep.versions_dropped >= 1, "{rep:?}");
    assert_eq!(s.resolve(h.lineage, h.epoch, 0, 1).unwrap()[0], Block::Hole);
    assert_verifies(&s);
}

/// Hypothesis 3: destage committed the map entry unsynced and then appended a
/// journal tombstone; if the tombstone reached the disk and the map entry did not
/// (write-back, or FLUSH syncing the journal before the WAL), replay voided
/// flushed small writes.  Simulated here: the metadata database goes back to its
/// state before the destage while the journal keeps everything after it.  Before
/// the fix the flushed pages read back as the old content.
#[test]
fn h3_a_lost_destage_never_voids_flushed_small_writes() {
    let (_g, _f) = serial();
    let (d, s, h) = setup(1 << 20, 4);
    let dir = d.path().join("s");
    s.write(&h, 0, &block(1)).unwrap();
    s.write(&h, 4096, &[7u8; 4096]).unwrap(); // a page, journaled
    s.flush().unwrap();
    let mut want = block(1);
    want[4096..8192].fill(7);
    // The database as a power loss right after the FLUSH would leave it.
    copy_dir(&dir.join("meta"), &d.path().join("meta.before"));
    s.destage(None).unwrap();
    drop(s); // a crash: no close
    std::fs::remove_dir_all(dir.join("meta")).unwrap();
    copy_dir(&d.path().join("meta.before"), &dir.join("meta"));
    let s = Store::open(&dir, None).unwrap();
    let h = head(&s, "g", "d");
    assert_eq!(s.read(&h, 0, CS as usize).unwrap(), want);
    assert_verifies(&s);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Hypothesis 4: `point create` destaged before it took the gate.  A small write
/// acknowledged in between landed after the point while a whole-block write
/// acknowledged later landed in it: before the fix the point held disk1 = 2 with
/// disk0 = 1, not a prefix of what the writer had acknowledged.
#[test]
fn h4_a_point_holds_a_prefix_of_acknowledged_writes() {
    let (_g, _f) = serial();
    let d = tempfile::tempdir().unwrap();
    let s = init(&d.path().join("s"), 1 << 20);
    s.create_group("g").unwrap();
    s.create_volume("g", "d0", 4 * CS).unwrap();
    s.create_volume("g", "d1", 4 * CS).unwrap();
    let (h0, h1) = (head(&s, "g", "d0"), head(&s, "g", "d1"));
    s.write(&h0, 0, &[1u8; 4096]).unwrap();
    s.write(&h1, 0, &vec![1u8; CS as usize]).unwrap();
    let (s2, a, b) = (s.clone(), h0.clone(), h1.clone());
    fail::cfg_callback("point-before-gate", move || {
        // The log record (small), then the data block (whole): acknowledged in
        // that order while the point is being taken.
        s2.write(&a, 0, &[2u8; 4096]).unwrap();
        s2.write(&b, 0, &vec![2u8; CS as usize]).unwrap();
    })
    .unwrap();
    let p = s.create_point("g", false, None).unwrap();
    fail::remove("point-before-gate");
    let id = p.id.to_string();
    let p0 = s
        .read(&s.view("g", "d0", Some(&id)).unwrap(), 0, 4096)
        .unwrap();
    let p1 = s
        .read(&s.view("g", "d1", Some(&id)).unwrap(), 0, 1)
        .unwrap();
    assert!(
        p0[0] >= p1[0],
        "the point holds data block {} but log record {}",
        p1[0],
        p0[0]
    );
    assert_eq!(
        (p0[0], p1[0]),
        (2, 2),
        "both were acknowledged before the gate"
    );
    assert_verifies(&s);
}

/// Hypothesis 5: block status resolved the map before it looked at the overlay;
/// a destage in between hid an acknowledged block (reported as a hole, so nbdcopy,
/// `cp --sparse` and failback would skip it).
#[test]
fn h5_block_status_never_reports_a_hole_over_acknowledged_data() {
    let (_g, _f) = serial();
    let (_d, s, h) = setup(1 << 20, 4);
    s.write(&h, CS, &[9u8; 4096]).unwrap(); // pages in the overlay, nothing in the map
    let s2 = s.clone();
    fail::cfg_callback("extents-between-overlay-and-map", move || {
        s2.destage(None).unwrap();
    })
    .unwrap();
    let ext = s.extents(&h, 0, 4 * CS).unwrap();
    fail::remove("extents-between-overlay-and-map");
    let data: Vec<_> = ext
        .iter()
        .filter(|e| matches!(e.2, Block::Data(_)))
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(data, vec![(CS, CS)], "extents {ext:?}");
}

/// Hypothesis 6: FLUSH sealed the queued packs, then took the open pack; a pack
/// that rotated in between was neither, so FLUSH returned while its records (and
/// the WAL entries pointing at them, which it then synced) were not durable.  The
/// background sealer is held inside its fsync here, so only FLUSH itself can have
/// sealed the rotated pack when it returns.
#[test]
fn h6_flush_covers_a_pack_that_rotates_during_it() {
    let (_g, _f) = serial();
    let (_d, s, h) = setup(64 << 10, 64);
    s.write(&h, 0, &block(0)).unwrap();
    let (s2, h2) = (s.clone(), h.clone());
    fail::cfg_callback("flush-between-open-and-seal", move || {
        // Enough whole blocks to rotate the open pack (64 KiB) at least once.
        for b in 1..6 {
            s2.write(&h2, b * CS, &block(b)).unwrap();
        }
    })
    .unwrap();
    fail::cfg("pack-seal", "sleep(300)").unwrap();
    s.flush().unwrap();
    fail::remove("flush-between-open-and-seal");
    fail::remove("pack-seal");
    // Every pack but the open one must be sealed the moment FLUSH returns.
    let unsealed = s.chunks.unsealed_packs().unwrap();
    let open = s.chunks.open_pack_id();
    let stray: Vec<u64> = unsealed.into_iter().filter(|p| Some(*p) != open).collect();
    assert!(
        stray.is_empty(),
        "FLUSH returned with packs {stray:?} unsealed"
    );
    assert_verifies(&s);
}

/// Hypothesis 7 (fsyncgate): a failed pack seal was logged and dropped, so the next
/// FLUSH returned success.  Now the first failed sync latches the store read-only,
/// naming the file; reads still work; a restart recovers what was flushed.
#[test]
fn h7_a_failed_sync_latches_the_store_and_a_restart_recovers() {
    let (_g, _f) = serial();
    let (d, s, h) = setup(1 << 20, 8);
    let dir = d.path().join("s");
    s.write(&h, 0, &block(1)).unwrap();
    s.flush().unwrap();
    s.write(&h, CS, &block(2)).unwrap();
    fail::cfg("pack-sync", "return").unwrap();
    let err = s.flush().unwrap_err().to_string();
    fail::remove("pack-sync");
    assert!(
        err.contains("read-only after a failed fdatasync of pack"),
        "{err}"
    );
    assert!(err.contains(".pack"), "names the file: {err}");
    // Sticky: the disk "recovered", but nothing is acknowledged any more.
    for e in [
        s.flush().unwrap_err(),
        s.write(&h, 2 * CS, &block(3)).unwrap_err(),
        s.zero(&h, 0, 4096).unwrap_err(),
        s.create_point("g", false, None).unwrap_err(),
    ] {
        assert!(e.to_string().contains("read-only after a failed"), "{e}");
    }
    assert_eq!(
        s.read(&h, 0, CS as usize).unwrap(),
        block(1),
        "reads still work"
    );
    drop(s);
    let s = Store::open(&dir, None).unwrap();
    let h = head(&s, "g", "d");
    assert_eq!(
        s.read(&h, 0, CS as usize).unwrap(),
        block(1),
        "flushed data survives"
    );
    s.write(&h, 2 * CS, &block(3)).unwrap();
    s.flush().unwrap();
    assert_verifies(&s);
}

/// The same latch for the journal and for the database WAL.
#[test]
fn h7_journal_and_wal_sync_failures_latch_too() {
    let (_g, _f) = serial();
    for fp in ["journal-sync", "wal-sync"] {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("s");
        let s = init(&dir, 1 << 20);
        s.create_group("g").unwrap();
        s.create_volume("g", "d", 8 * CS).unwrap();
        let h = head(&s, "g", "d");
        s.write(&h, 0, &[5u8; 4096]).unwrap();
        s.write(&h, CS, &block(2)).unwrap();
        s.flush().unwrap();
        s.write(&h, 8192, &[6u8; 4096]).unwrap();
        s.write(&h, 2 * CS, &block(3)).unwrap();
        fail::cfg(fp, "return").unwrap();
        let err = s.flush().unwrap_err().to_string();
        fail::remove(fp);
        assert!(err.contains("read-only after a failed"), "{fp}: {err}");
        assert!(s.write(&h, 0, &[1u8; 4096]).is_err(), "{fp}: latched");
        drop(s);
        let s = Store::open(&dir, None).unwrap();
        let h = head(&s, "g", "d");
        assert_eq!(s.read(&h, 0, 4096).unwrap(), vec![5u8; 4096], "{fp}");
        assert_eq!(s.read(&h, CS, CS as usize).unwrap(), block(2), "{fp}");
        assert_verifies(&s);
    }
}

/// Hypothesis 8: removing a point (or a volume) that a client reads.  Refused
/// while the lease is held; allowed once it is dropped.
#[test]
fn h8_a_served_view_cannot_be_removed_under_its_reader() {
    let (_g, _f) = serial();
    let (_d, s, h) = setup(1 << 20, 4);
    s.write(&h, 0, &block(1)).unwrap();
    let p = s.create_point("g", false, None).unwrap();
    let pv = s.view("g", "d", Some(&p.id.to_string())).unwrap();
    let lease = s.lease(&pv, "nbd client 1").unwrap();
    let err = s
        .remove_point("g", &p.id.to_string())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("in use") && err.contains("nbd client 1"),
        "{err}"
    );
    s.write(&h, 0, &block(2)).unwrap();
    gc(&s).unwrap();
    assert_eq!(s.read(&pv, 0, CS as usize).unwrap(), block(1));
    let hl = s.lease(&h, "fuse").unwrap();
    let err = s.remove_volume("g", "d").unwrap_err().to_string();
    assert!(err.contains("in use"), "{err}");
    drop((lease, hl));
    s.remove_point("g", &p.id.to_string()).unwrap();
    // A view resolved before its removal cannot be leased after it.
    assert!(s.lease(&pv, "late").is_err());
    s.remove_volume("g", "d").unwrap();
}

/// Invariant I11: RocksDB may persist a map entry on its own (WAL write-back, a
/// memtable flush) before the pack bytes of an unflushed whole-block write.  A power
/// cut then loses the chunk while the map points at it.  Simulated: the process
/// dies with the map entry in the WAL and the pack is cut back to its length at the
/// last FLUSH.  The block must read as of that FLUSH (NBD allows old or new), never
/// as an error or as zeros, and verify must pass.  Before the fix the overwrite
/// replaced the flushed entry in place, so the flushed content was gone too.
#[test]
fn i11_a_lost_unflushed_overwrite_reads_as_of_the_last_flush() {
    let (_g, _f) = serial();
    let (d, s, h) = setup(1 << 20, 4);
    let dir = d.path().join("s");
    s.write(&h, 0, &block(1)).unwrap();
    s.write(&h, CS, &block(5)).unwrap();
    s.flush().unwrap();
    let packs = pack_lengths(&dir);
    s.write(&h, 0, &block(2)).unwrap(); // overwrite, not flushed
    s.write(&h, 2 * CS, &block(3)).unwrap(); // new block, not flushed
    drop(s); // the WAL holds both map entries; the packs keep nothing new:
    truncate_packs(&packs); // a power cut: what no FLUSH covered is gone
    let s = Store::open(&dir, None).unwrap();
    let h = head(&s, "g", "d");
    assert_eq!(
        s.read(&h, 0, CS as usize).unwrap(),
        block(1),
        "as of the last FLUSH"
    );
    assert_eq!(s.read(&h, CS, CS as usize).unwrap(), block(5));
    assert_eq!(
        s.read(&h, 2 * CS, CS as usize).unwrap(),
        vec![0u8; CS as usize]
    );
    assert_verifies(&s);
}

/// Power-loss seed 4003: a cut during the open that recovers from a crash, after
/// the unsealed-pack check dropped a lost chunk's index entry and sealed its
/// pack but before the map entries that used the chunk were repaired.  The next
/// open found the pack sealed and nothing to repair: the unflushed overwrite's
/// map entry pointed at a chunk the index no longer had, and the block could not
/// be read.  The lost chunks are now kept in the metadata (`Q` keys, in the
/// batch that drops their index entries) until the repair's batch removes them.
#[test]
fn i11_a_crash_between_recovery_and_repair_still_repairs() {
    let (_g, _f) = serial();
    let (d, s, h) = setup(1 << 20, 4);
    let dir = d.path().join("s");
    s.write(&h, 0, &block(1)).unwrap();
    s.flush().unwrap();
    let packs = pack_lengths(&dir);
    s.write(&h, 0, &block(2)).unwrap(); // overwrite, not flushed
    drop(s);
    truncate_packs(&packs); // a power cut: what no FLUSH covered is gone
    fail::cfg("open-before-lost-repair", "return").unwrap();
    let err = Store::open(&dir, None)
        .err()
        .expect("the failpoint stops the open");
    assert!(err.to_string().contains("open-before-lost-repair"), "{err}");
    fail::remove("open-before-lost-repair");
    let s = Store::open(&dir, None).unwrap();
    let h = head(&s, "g", "d");
    assert_eq!(
        s.read(&h, 0, CS as usize).unwrap(),
        block(1),
        "as of the last FLUSH"
    );
    assert_verifies(&s);
}

/// A crash between a new pack's record and its file (found by
/// tests/powerloss_repl.rs, seed 7003): recovery sealed the record at length 0,
/// and verify then reported a pack that does not exist.  The record now goes.
#[test]
fn a_pack_record_without_its_file_is_dropped_at_recovery() {
    let (_g, _f) = serial();
    let (d, s, h) = setup(1 << 20, 4);
    let dir = d.path().join("s");
    s.write(&h, 0, &block(1)).unwrap();
    s.flush().unwrap();
    s.chunks.seal_open().unwrap();
    fail::cfg("new-pack-before-file", "return").unwrap();
    assert!(
        s.write(&h, CS, &block(2)).is_err(),
        "the failpoint fails the write"
    );
    fail::remove("new-pack-before-file");
    drop(s); // a crash: no close
    let s = Store::open(&dir, None).unwrap();
    let h = head(&s, "g", "d");
    assert_eq!(s.read(&h, 0, CS as usize).unwrap(), block(1));
    let rep = verify(&s, &indicatif::ProgressBar::hidden()).unwrap();
    assert!(
        rep.ok,
        "verify: packs {:?}, chunks {:?}",
        rep.bad_packs, rep.bad
    );
}

/// Cut every pack back to the length `pack_lengths` recorded.
fn truncate_packs(packs: &[(std::path::PathBuf, u64)]) {
    for (path, len) in packs {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(*len)
            .unwrap();
    }
}

fn pack_lengths(store: &Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(store.join("packs")).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let len = std::fs::metadata(&p).unwrap().len();
            out.push((p, len));
        }
    }
    out
}
