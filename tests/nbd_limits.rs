//! Resource limits of `drclone serve` against hostile and careless clients (raw
//! sockets), with real peers (qemu-io, nbdinfo) checking that everyone else is
//! still served: bounded memory whatever one client queues, many idle
//! connections, the connection cap's error, the handshake and idle timeouts,
//! clients killed mid-payload, disconnecting every client of one export, and the
//! SIGTERM drain.  The RSS bounds are stated where they are checked.

mod common;
mod nbd_raw;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use drclone::nbd::proto::*;
use nbd_raw::*;

const MIB: u64 = 1 << 20;

fn store(env: &Env, vols: &[(&str, &str)]) {
    env.ok(&["init"]);
    env.ok(&["group", "create", "g"]);
    for (v, size) in vols {
        env.ok(&["volume", "create", &format!("g/{v}"), "--size", size]);
    }
}

/// 32 MiB write number `i`: a 64 KiB block, different per write, repeated (so the
/// store dedups it to one chunk and the test costs CPU, not disk).
fn big_payload(i: u64) -> Vec<u8> {
    let block = random_bytes(1000 + i, 64 << 10);
    block.repeat((MAX_PAYLOAD as usize) / block.len())
}

/// Samples VmRSS of `pid` until told to stop; returns the largest, in KiB.
fn rss_sampler(d: &Daemon) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let pid = d.pid();
    let t = std::thread::spawn(move || {
        let mut max = 0;
        while !s.load(Ordering::Relaxed) {
            if let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                if let Some(v) = st
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    max = max.max(v);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        max
    });
    (stop, t)
}

/// Another client, served now: qemu-io writes and reads back a pattern on `vol`.
fn other_client_served(d: &Daemon, vol: &str, pattern: u8) {
    let uri = format!("nbd+unix:///g/{vol}?socket={}", d.sock.display());
    qemu_io(&uri, &[&format!("write -P {pattern} 0 64k")]);
    let out = qemu_io(&uri, &[&format!("read -P {pattern} 0 64k")]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// Bound on the server's RSS while one client queues 64 x 32 MiB writes: the
/// connection's payload budget (64 MiB) plus 96 MiB for the process baseline
/// (about 21 MiB) and the engine's working set.  Measured: VmHWM 96 MiB; with the
/// budgets lifted (`DRCLONE_NBD_CONN_MIB=4096`) 287 MiB, and up to 2 GiB (64
/// queued payloads) when the engine is slower than the socket.
const QUEUED_WRITES_RSS_BOUND_KIB: u64 = 160 * 1024;

#[test]
fn one_client_queueing_64_writes_of_32_mib_keeps_rss_bounded() {
    need("qemu-io");
    let env = Env::new();
    store(&env, &[("big", "2G"), ("other", "64M")]);
    let d = Daemon::start(&env.store, &env.path("nbd.sock"), &[], &[]);
    let base_kib = d.status_kib("VmRSS");
    let (stop_rss, rss) = rss_sampler(&d);

    let mut c = Client::go(&d.sock, "g/big", false, false);
    let mut r = c.try_clone();
    let acked = Arc::new(AtomicUsize::new(0));
    let acked2 = acked.clone();
    // Replies are read on their own thread; the writer never waits for them.
    let reader = std::thread::spawn(move || {
        let mut errors = vec![];
        for _ in 0..64 {
            let rep = r.reply(0).unwrap();
            if rep.error != 0 {
                errors.push((rep.cookie, rep.error));
            }
            acked2.fetch_add(1, Ordering::Relaxed);
        }
        errors
    });
    // Meanwhile another client is served, again and again, while the 63 writes
    // are pushed.
    let pushing = Arc::new(AtomicBool::new(true));
    let other = {
        let pushing = pushing.clone();
        let sock = d.sock.clone();
        std::thread::spawn(move || {
            let uri = format!("nbd+unix:///g/other?socket={}", sock.display());
            let mut served = 0;
            while pushing.load(Ordering::Relaxed) && served < 50 {
                qemu_io(&uri, &["write -P 7 0 64k", "read -P 7 0 64k"]);
                served += 1;
            }
            served
        })
    };
    for i in 0..63u64 {
        c.send(
            0,
            CMD_WRITE,
            i,
            i * MAX_PAYLOAD as u64,
            MAX_PAYLOAD,
            &big_payload(i),
        );
    }
    // The 64th: header and half its payload; the server holds a partial request.
    let last = big_payload(63);
    c.send(
        0,
        CMD_WRITE,
        63,
        63 * MAX_PAYLOAD as u64,
        MAX_PAYLOAD,
        &last[..last.len() / 2],
    );
    pushing.store(false, Ordering::Relaxed);
    assert!(other.join().unwrap() >= 1, "no other client was served");
    while acked.load(Ordering::Relaxed) < 63 {
        std::thread::sleep(Duration::from_millis(20));
    }
    // 63 answered, one half-sent: the server still serves others.
    other_client_served(&d, "other", 9);
    run(
        "nbdinfo",
        &[&format!("nbd+unix:///g/other?socket={}", d.sock.display())],
    );
    c.s.write_all(&last[last.len() / 2..]).unwrap();
    assert_eq!(reader.join().unwrap(), vec![], "failed writes");
    stop_rss.store(true, Ordering::Relaxed);
    let max_kib = rss.join().unwrap();
    let hwm_kib = d.status_kib("VmHWM");
    eprintln!(
        "64 x 32 MiB queued writes: RSS baseline {} MiB, max sampled {} MiB, VmHWM {} MiB \
         (bound {} MiB)",
        base_kib >> 10,
        max_kib >> 10,
        hwm_kib >> 10,
        QUEUED_WRITES_RSS_BOUND_KIB >> 10
    );
    assert!(hwm_kib < QUEUED_WRITES_RSS_BOUND_KIB, "VmHWM {hwm_kib} KiB");
    // Every write landed where it was sent.
    assert_eq!(c.call(0, CMD_FLUSH, 0, 0, &[]).error, 0);
    for i in [0u64, 17, 62, 63] {
        let want = big_payload(i);
        let off = i * MAX_PAYLOAD as u64 + 5 * (64 << 10);
        let r = c.call(0, CMD_READ, off, 64 << 10, &[]);
        assert_eq!(r.data, want[..64 << 10], "write {i}");
    }
    c.disconnect();
    assert!(d.stop().success());
    env.ok(&["verify"]);
}

/// Bound on the RSS 200 idle connections add: their threads' stacks and buffers
/// (a few hundred KiB each at most).
const IDLE_CONNECTIONS_RSS_BOUND_KIB: u64 = 64 * 1024;

#[test]
fn two_hundred_idle_connections_then_the_cap_refuses_with_a_clear_error() {
    need("nbdinfo");
    need("qemu-img");
    let env = Env::new();
    store(&env, &[("d", "64M")]);
    let d = Daemon::start(&env.store, &env.path("nbd.sock"), &[], &[]);
    let base_kib = d.status_kib("VmRSS");
    let mut idle: Vec<Client> = (0..200)
        .map(|_| Client::go(&d.sock, "g/d", true, true))
        .collect();
    // Each one did one small read, so its workers and buffers exist.
    for c in idle.iter_mut() {
        assert_eq!(c.call(0, CMD_READ, 0, 4096, &[]).error, 0);
    }
    let with_kib = d.status_kib("VmRSS");
    eprintln!(
        "200 idle connections: RSS {} MiB -> {} MiB (+{} KiB per connection; bound +{} MiB)",
        base_kib >> 10,
        with_kib >> 10,
        (with_kib.saturating_sub(base_kib)) / 200,
        IDLE_CONNECTIONS_RSS_BOUND_KIB >> 10
    );
    assert!(
        with_kib < base_kib + IDLE_CONNECTIONS_RSS_BOUND_KIB,
        "{base_kib} -> {with_kib} KiB"
    );
    other_client_served(&d, "d", 3);
    drop(idle);
    drop(d);

    // A small cap: connection N+1 gets the error on its first option, and again
    // on every option (so libnbd shows it), then is closed.
    let d = Daemon::start(
        &env.store,
        &env.path("nbd2.sock"),
        &["--max-connections", "4"],
        &[],
    );
    let held: Vec<Client> = (0..4)
        .map(|_| Client::go(&d.sock, "g/d", false, false))
        .collect();
    let mut s = hello(&d.sock, 3);
    send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]).unwrap();
    let (opt, typ, msg) = opt_reply(&mut s).unwrap();
    assert_eq!((opt, typ), (OPT_STRUCTURED_REPLY, REP_ERR_POLICY));
    assert_eq!(
        String::from_utf8_lossy(&msg),
        "too many connections (limit 4)"
    );
    send_opt(&mut s, OPT_ABORT, &[]).unwrap();
    assert_eq!(opt_reply(&mut s).unwrap().1, REP_ACK);
    // What an operator sees: qemu prints the server's message ("Denied by server
    // for option 7 (go)", "server reported: too many connections (limit 4)");
    // libnbd logs it with LIBNBD_DEBUG=1.
    let uri = format!("nbd+unix:///g/d?socket={}", d.sock.display());
    let out = std::process::Command::new("qemu-img")
        .args(["info", &uri])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("too many connections (limit 4)"), "{err}");
    let out = std::process::Command::new("nbdinfo")
        .arg(&uri)
        .env("LIBNBD_DEBUG", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server error message: too many connections (limit 4)"),
        "{err}"
    );
    // The old path cannot carry an error: the server closes.
    let mut s = hello(&d.sock, 3);
    send_opt(&mut s, OPT_EXPORT_NAME, b"g/d").unwrap();
    assert!(closed_by_peer(&mut s));
    // One leaves: a new client gets in.
    let mut held = held;
    held.pop().unwrap().disconnect();
    let mut got_in = false;
    for _ in 0..500 {
        let mut s = hello(&d.sock, 3);
        if go(&mut s, "g/d").is_ok() {
            got_in = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(got_in, "the cap did not free a slot");
}

#[test]
fn handshake_timeout_drops_silent_clients_and_idle_timeout_is_opt_in() {
    let env = Env::new();
    store(&env, &[("d", "64M")]);
    let d = Daemon::start(
        &env.store,
        &env.path("nbd.sock"),
        &["--handshake-timeout", "1"],
        &[],
    );
    // Connects, reads the greeting, never sends its flags.
    let mut silent = UnixStream::connect(&d.sock).unwrap();
    assert_eq!(rx(&mut silent, 18).unwrap()[..8], *b"NBDMAGIC");
    assert!(closed_by_peer(&mut silent), "a silent client was kept");
    // Sends flags and one option, then stalls.
    let mut stalled = hello(&d.sock, 3);
    send_opt(&mut stalled, OPT_STRUCTURED_REPLY, &[]).unwrap();
    assert_eq!(opt_reply(&mut stalled).unwrap().1, REP_ACK);
    assert!(closed_by_peer(&mut stalled));
    // A client in transmission is not bound by the handshake timeout, and with
    // no --idle-timeout an idle one keeps its disk.
    let mut c = Client::go(&d.sock, "g/d", false, false);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.call(0, CMD_READ, 0, 512, &[]).error, 0);
    drop(d);

    let d = Daemon::start(
        &env.store,
        &env.path("nbd2.sock"),
        &["--idle-timeout", "1"],
        &[],
    );
    let mut c = Client::go(&d.sock, "g/d", false, false);
    assert_eq!(c.call(0, CMD_READ, 0, 512, &[]).error, 0);
    assert!(closed_by_peer(&mut c.s), "an idle client was kept");
}

/// Bound on the RSS while 20 clients die mid-payload: if every half-received
/// payload were in memory at once (7 x 32 MiB + 13 x 4 MiB, each leased before it
/// is read), plus the 96 MiB of process and engine.  Measured: 106-116 MiB (a
/// dead client's payload is freed with its connection).
const KILLED_CLIENTS_RSS_BOUND_KIB: u64 = 384 * 1024;

#[test]
fn clients_killed_mid_write_payload_leave_the_server_serving_and_the_store_clean() {
    need("qemu-io");
    let env = Env::new();
    store(&env, &[("d", "256M"), ("other", "64M")]);
    let d = Daemon::start(&env.store, &env.path("nbd.sock"), &[], &[]);
    let base_kib = d.status_kib("VmRSS");
    let (stop_rss, rss) = rss_sampler(&d);
    let killers: Vec<_> = (0..20u64)
        .map(|i| {
            let sock = d.sock.clone();
            std::thread::spawn(move || {
                let mut c = Client::go(&sock, "g/d", i % 2 == 0, false);
                let off = i * 8 * MIB;
                // Some full writes first (not waited for), then one cut short.
                for k in 0..(i % 4) {
                    c.send(
                        0,
                        CMD_WRITE,
                        k,
                        off + k * MIB,
                        MIB as u32,
                        &random_bytes(i * 10 + k, MIB as usize),
                    );
                }
                let len = if i % 3 == 0 {
                    MAX_PAYLOAD
                } else {
                    4 * MIB as u32
                };
                let p = random_bytes(i, len as usize / 2 + 7);
                c.send(CMD_FLAG_FUA, CMD_WRITE, 99, off, len, &p);
                // The client dies: its socket goes with the payload half sent.
                drop(c);
            })
        })
        .collect();
    for k in killers {
        k.join().unwrap();
    }
    other_client_served(&d, "other", 5);
    let mut d = d;
    assert!(d.alive());
    // The half-received requests were dropped with their payloads.
    let mut c = Client::go(&d.sock, "g/d", true, false);
    assert_eq!(c.call(0, CMD_FLUSH, 0, 0, &[]).error, 0);
    assert_eq!(c.call(0, CMD_READ, 0, 4096, &[]).error, 0);
    c.disconnect();
    stop_rss.store(true, Ordering::Relaxed);
    let max_kib = rss.join().unwrap();
    eprintln!(
        "20 clients killed mid-write: RSS baseline {} MiB, max sampled {} MiB",
        base_kib >> 10,
        max_kib >> 10
    );
    assert!(max_kib < KILLED_CLIENTS_RSS_BOUND_KIB, "{max_kib} KiB");
    assert!(d.stop().success());
    env.ok(&["verify"]);
}

/// Write number `i` of the drain test: 64 KiB, compressible, unique per `i`.
fn drain_payload(i: u64) -> Vec<u8> {
    random_bytes(i, 4096).repeat(16)
}

#[test]
fn sigterm_drains_a_client_mid_stream_and_keeps_every_acknowledged_write() {
    let env = Env::new();
    store(&env, &[("d", "256M")]);
    let d = Daemon::start(&env.store, &env.path("nbd.sock"), &[], &[]);
    let c = Client::go(&d.sock, "g/d", false, false);
    let mut rs = c.try_clone();
    const BLK: u64 = 64 << 10;
    const N: u64 = 4000;
    // Replies on their own thread: every acknowledged cookie.
    let acks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let acks2 = acks.clone();
    let reader = std::thread::spawn(move || {
        while let Ok(r) = rs.reply(0) {
            assert_eq!(r.error, 0, "write {} failed", r.cookie);
            acks2.lock().unwrap().push(r.cookie);
        }
    });
    // The writer streams 64 KiB FUA writes without waiting (each costs the
    // server a sync, so it falls behind and the socket backs up), and if it ever
    // gets them all out, leaves one more half sent: SIGTERM finds the server in
    // the middle of the stream either way.
    let writer = {
        let mut w = c.try_clone();
        std::thread::spawn(move || {
            let mut sent = 0;
            for i in 0..N {
                let p = drain_payload(i);
                if w.try_send(CMD_FLAG_FUA, CMD_WRITE, i, i * BLK, BLK as u32, &p)
                    .is_err()
                {
                    break;
                }
                sent += 1;
            }
            let p = drain_payload(N);
            if sent == N {
                let _ = w.try_send(0, CMD_WRITE, N, N * BLK, BLK as u32, &p[..1000]);
            }
            (sent, w)
        })
    };
    while acks.lock().unwrap().len() < 50 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let acked_before = acks.lock().unwrap().len();
    let st = d.stop();
    assert!(st.success(), "serve exited with {st:?}");
    let (sent, _w) = writer.join().unwrap();
    reader.join().unwrap();
    let acked = acks.lock().unwrap().clone();
    eprintln!(
        "SIGTERM drain: {sent} writes sent, {acked_before} acknowledged before SIGTERM, \
         {} in all",
        acked.len()
    );
    assert!(!acked.contains(&N), "the half-sent write was acknowledged");
    // Every acknowledged write is there after a restart.
    let d = Daemon::start(&env.store, &env.path("nbd.sock"), &[], &[]);
    let mut c = Client::go(&d.sock, "g/d", false, false);
    for i in acked {
        let r = c.call(0, CMD_READ, i * BLK, BLK as u32, &[]);
        assert!(r.data == drain_payload(i), "acknowledged write {i} lost");
    }
    c.disconnect();
    assert!(d.stop().success());
    env.ok(&["verify"]);
}
