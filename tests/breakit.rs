//! Hostile review of the engine (issue 9): attacks on the promise "a write
//! acknowledged after FLUSH or FUA survives kill -9 and power loss; bad input gets
//! a clear error and harms nothing stored".
//!
//! Every test here reproduces a defect (it fails on the code it was written
//! against) or pins behaviour an attack showed to hold.  The doc comment of each
//! says which, with the minimal reproduction.
#![cfg(feature = "failpoints")]

mod support;

use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use drclone::engine::store::{InitOptions, Store, View};
use support::crashfs::{CrashFs, Tear};

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

fn init(dir: &Path, chunk_size: u64) {
    Store::init(
        dir,
        &InitOptions {
            chunk_size: chunk_size as u32,
            pack_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
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

fn head(s: &Store) -> View {
    s.view("g", "d", None).unwrap()
}

/// DEFECT: the RocksDB WAL "group commit" acknowledges a FLUSH before the WAL
/// sync that covers it has run.
///
/// `Db::sync_wal` (src/engine/meta.rs, `unsynced.swap(false)` before
/// `flush_wal(true)`) clears the "something unsynced" flag *before* it syncs.
/// A second FLUSH that arrives while the first one's WAL fsync is still in
/// progress sees the flag clear and returns success at once, although the map
/// entries of its whole-block writes are in no durable WAL yet.  A power cut at
/// that moment loses a write whose FLUSH was acknowledged (with CAN_MULTI_CONN,
/// two NBD connections flushing at once is the normal case).
///
/// Reproduction: whole-block write W over a flushed block; FLUSH A stops inside
/// its WAL sync (a callback on the `wal-sync` failpoint, which sits after the
/// swap); FLUSH B returns Ok; cut the power; reopen: the block reads the old
/// content, not W.  (If B waits for A's sync, as a correct group commit must,
/// the test lets A finish and checks nothing more.)
#[test]
fn a_flush_never_returns_before_the_wal_sync_that_covers_it() {
    let (_g, _f) = serial();
    support::init_log();
    let fs = CrashFs::mount();
    let dir = fs.root().join("store");
    init(&dir, CS);
    fs.checkpoint();
    let s = Arc::new(Store::open(&dir, None).unwrap());
    s.create_group("g").unwrap();
    s.create_volume("g", "d", 4 * CS).unwrap();
    let h = head(&s);
    let old = fill(1, CS as usize);
    let new = fill(2, CS as usize);
    s.write(&h, 0, &old).unwrap();
    s.flush().unwrap();
    s.write(&h, 0, &new).unwrap();

    // FLUSH A parks inside Db::sync_wal, after the flag swap, before the fsync.
    let (reached_tx, reached_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let parked = Arc::new(Mutex::new(Some((reached_tx, release_rx))));
    {
        let parked = parked.clone();
        fail::cfg_callback("wal-sync", move || {
            // Only the first caller parks; any later one passes straight through.
            let p = parked.lock().unwrap().take();
            if let Some((reached, release)) = p {
                reached.send(()).unwrap();
                let _ = release.recv();
            }
        })
        .unwrap();
    }
    let a = {
        let s = s.clone();
        std::thread::spawn(move || s.flush())
    };
    reached_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("FLUSH A reaches its WAL sync");
    // FLUSH B, issued after W was acknowledged, while A's WAL sync has not run.
    let (b_tx, b_rx) = mpsc::channel();
    let b = {
        let s = s.clone();
        std::thread::spawn(move || b_tx.send(s.flush()).unwrap())
    };
    match b_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(res) => {
            // B acknowledged W as durable.  Power off now, before A's sync.
            res.expect("FLUSH B");
            fs.cut();
            release_tx.send(()).unwrap();
            let _ = a.join().unwrap();
            b.join().unwrap();
            fail::remove("wal-sync");
            drop(s);
            fs.wait_closed();
            fs.reset(Tear::None, 0);
            let s = Store::open(&dir, None).unwrap();
            let got = s.read(&head(&s), 0, CS as usize).unwrap();
            assert!(
                got == new,
                "a whole-block write whose FLUSH returned Ok was lost in a power cut: the \
                 block reads {} (the content before it)",
                if got == old {
                    "old"
                } else {
                    "neither old nor new"
                }
            );
        }
        Err(_) => {
            // B waits for A's sync: the group commit is right.  Let both finish.
            release_tx.send(()).unwrap();
            a.join().unwrap().unwrap();
            b.join().unwrap();
            fail::remove("wal-sync");
        }
    }
}

/// DEFECT: a failed journal fdatasync inside a journal trim does not trip the
/// latch, so a later FLUSH succeeds (fsyncgate, invariant I7).
///
/// `Journal::trim` (src/engine/journal.rs, `self.sync()?` at the top of `trim`)
/// calls `Journal::sync` directly, not through `latch::guarded` as `Store::flush`
/// and `create_point` do.  Its callers (`Store::trim_journal`, from a writer's
/// `relieve`, the background destager, FLUSH after new records arrived) only
/// log the error and retry ("destaging the write-back overlay failed (will
/// retry)"); the write is acknowledged, and the next FLUSH's fdatasync, which
/// the kernel may answer with success after dropping the dirty pages (M5),
/// returns Ok.
///
/// Reproduction: journal limit of 1 byte (every small write destages one block
/// and trims), 100-byte segments (every record rotates); a 4 KiB write to block
/// 0, then the `journal-sync` failpoint once, then a 4 KiB write to block 1 (its
/// trim meets the failure); expected: the store is latched and FLUSH fails;
/// actual: the write and the FLUSH both return Ok and the latch is clear.
#[test]
fn a_failed_journal_fdatasync_during_a_trim_latches_the_store() {
    let (_g, _f) = serial();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("s");
    init(&dir, CS);
    let mut s = Store::open(&dir, None).unwrap();
    s.set_journal_limit(1, 100);
    s.create_group("g").unwrap();
    s.create_volume("g", "d", 4 * CS).unwrap();
    let h = head(&s);
    s.write(&h, 0, &fill(1, 4096)).unwrap();
    s.flush().unwrap();
    fail::cfg("journal-sync", "1*return->off").unwrap();
    // The failpoint fires once, in this write's trim.  (Had it not fired there,
    // the FLUSH below would meet it in its own, guarded, fdatasync and latch.)
    let w = s.write(&h, CS, &fill(2, 4096));
    let flushed = s.flush();
    fail::remove("journal-sync");
    assert!(
        s.latch().is_tripped() && flushed.is_err(),
        "after a failed journal fdatasync (write returned {:?}) the store must be \
         read-only; instead the latch is {} and the next FLUSH returned {:?}",
        w.as_ref().map(|_| "Ok"),
        if s.latch().is_tripped() {
            "tripped"
        } else {
            "clear"
        },
        flushed.as_ref().map(|_| "Ok")
    );
}

/// DEFECT: a store.json whose chunk size was changed (a corrupt or hand-edited
/// config) is trusted: the store opens and serves wrong bytes with no error, or
/// panics on a division by zero.
///
/// `Store::read_config` (src/engine/store.rs) checks only `format`; `init`'s
/// chunk-size rule (a power of two between 4K and 4M) is not applied on open,
/// and nothing stored (the database) records the chunk size to check it
/// against.  With 0: `attempt to divide by zero` at src/engine/overlay.rs:74
/// (every command, exit 101).  With 4096 on a 64 KiB store: `export` exits 0
/// with bytes 4096.. wrong, and `verify` passes.  A write under the wrong size
/// would corrupt the volume for good.
///
/// Reproduction (CLI): `drclone init` (64K), import 300 KB, edit store.json
/// `"chunk_size": 4096`, `drclone export g/d out` exits 0, `cmp` differs at byte
/// 4097.  Expected: open fails with a clear error naming store.json.
#[test]
fn a_store_json_with_a_changed_chunk_size_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("s");
    init(&dir, 64 << 10);
    let data = fill(7, 64 << 10);
    {
        let s = Store::open(&dir, None).unwrap();
        s.create_group("g").unwrap();
        s.create_volume("g", "d", 1 << 20).unwrap();
        s.write(&head(&s), 0, &data).unwrap();
        s.close().unwrap();
    }
    let cfg_path = dir.join("store.json");
    let orig = std::fs::read_to_string(&cfg_path).unwrap();
    let mut problems = Vec::new();
    for cs in [4096u64, 0, 3] {
        let mut cfg: serde_json::Value = serde_json::from_str(&orig).unwrap();
        cfg["chunk_size"] = cs.into();
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        let dir2 = dir.clone();
        let want = data.clone();
        let r = std::panic::catch_unwind(move || match Store::open(&dir2, None) {
            Err(e) => Ok(e.to_string()),
            Ok(s) => {
                let got = s.read(&head(&s), 0, want.len());
                Err(match got {
                    Ok(g) if g == want => "opened and read correctly".to_string(),
                    Ok(_) => "opened and read WRONG bytes without an error".to_string(),
                    Err(e) => format!("opened, then the read failed: {e}"),
                })
            }
        });
        match r {
            Ok(Ok(msg)) if msg.contains("store.json") || msg.contains("chunk") => {}
            Ok(Ok(msg)) => problems.push(format!("chunk_size {cs}: refused, but unclearly: {msg}")),
            Ok(Err(what)) => problems.push(format!("chunk_size {cs}: {what}")),
            Err(_) => problems.push(format!("chunk_size {cs}: open or read panicked")),
        }
    }
    // Put the real config back: nothing stored may have been harmed.
    std::fs::write(&cfg_path, &orig).unwrap();
    let s = Store::open(&dir, None).unwrap();
    assert_eq!(s.read(&head(&s), 0, data.len()).unwrap(), data);
    assert!(
        problems.is_empty(),
        "a changed chunk size in store.json was not refused: {problems:#?}"
    );
}
