//! The NBD server against real clients: nbdinfo, nbdcopy, nbdsh (libnbd), qemu-img,
//! qemu-io and fio.  `scripts/setup.sh` installs them; a missing tool fails the test.

mod common;

use common::*;

const MIB: usize = 1 << 20;

fn store_with_disk(env: &Env, size: &str) {
    env.ok(&["init"]);
    env.ok(&["group", "create", "app1"]);
    env.ok(&["volume", "create", "app1/disk0", "--size", size]);
}

#[test]
fn nbdinfo_lists_exports_and_reports_capabilities() {
    need("nbdinfo");
    let env = Env::new();
    store_with_disk(&env, "64M");
    env.ok(&["volume", "create", "app1/disk1", "--size", "32M"]);
    env.ok(&["point", "create", "app1"]);
    let srv = Server::start(&env);
    let list = run("nbdinfo", &["--list", "--json", &srv.tcp("")]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    for want in ["app1/disk0", "app1/disk1", "app1/disk0@1", "app1/disk1@1"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let info: serde_json::Value =
        serde_json::from_str(&run("nbdinfo", &["--json", &srv.unix("app1/disk0")])).unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], 64 * MIB as u64);
    for flag in [
        "can_multi_conn",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_fua",
        "can_flush",
        "can_cache",
    ] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_preferred"], 65536);
    let ctx: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(ctx.contains(&"base:allocation"), "{ctx:?}");
    // A point is read-only.
    let info: serde_json::Value =
        serde_json::from_str(&run("nbdinfo", &["--json", &srv.tcp("app1/disk0@latest")])).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], true);
    // Unknown exports get an error, not a dropped server.
    let out = std::process::Command::new("nbdinfo")
        .arg(srv.tcp("app1/nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("app1/nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run("nbdinfo", &[&srv.tcp("app1/disk1")]);
}

/// An image with data in some 64 KiB-aligned ranges and holes elsewhere.
fn sparse_image(path: &std::path::Path, size: usize) -> Vec<(usize, usize)> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size as u64).unwrap();
    let ranges = vec![
        (0, 256 << 10),
        (MIB, 64 << 10),
        (3 * MIB, 2 * MIB),
        (size - (128 << 10), 128 << 10),
    ];
    for (i, (o, l)) in ranges.iter().enumerate() {
        f.write_all_at(&random_bytes(i as u64 + 10, *l), *o as u64)
            .unwrap();
    }
    ranges
}

/// Data ranges of a `qemu-img map --output=json` or `nbdinfo --map --json` listing.
fn data_ranges(
    v: &serde_json::Value,
    start_key: &str,
    is_data: impl Fn(&serde_json::Value) -> bool,
) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = vec![];
    for e in v.as_array().unwrap() {
        if !is_data(e) {
            continue;
        }
        let (o, l) = (
            e[start_key].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
        );
        match out.last_mut() {
            Some(last) if last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l)),
        }
    }
    out
}

#[test]
fn map_shows_holes_and_agrees_with_qemu_img_map_of_the_file() {
    need("nbdinfo");
    need("qemu-img");
    let env = Env::new();
    store_with_disk(&env, "8M");
    let img = env.path("sparse.img");
    let ranges = sparse_image(&img, 8 * MIB);
    env.ok(&["import", "app1/disk0", img.to_str().unwrap()]);
    let srv = Server::start(&env);
    let nbd_map: serde_json::Value = serde_json::from_str(&run(
        "nbdinfo",
        &["--map", "--json", &srv.unix("app1/disk0")],
    ))
    .unwrap();
    let file_map: serde_json::Value = serde_json::from_str(&run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", img.to_str().unwrap()],
    ))
    .unwrap();
    let from_nbd = data_ranges(&nbd_map, "offset", |e| e["type"].as_u64().unwrap() & 1 == 0);
    let from_file = data_ranges(&file_map, "start", |e| e["data"] == true);
    let want: Vec<(u64, u64)> = ranges.iter().map(|&(o, l)| (o as u64, l as u64)).collect();
    assert_eq!(from_nbd, want, "nbdinfo --map: {nbd_map}");
    assert_eq!(from_file, want, "qemu-img map of the file: {file_map}");
    // Holes are reported as hole+zero (type 3).
    assert!(nbd_map.as_array().unwrap().iter().any(|e| e["type"] == 3));
    // qemu-img's own view over NBD agrees too.
    let q: serde_json::Value = serde_json::from_str(&run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &srv.tcp("app1/disk0")],
    ))
    .unwrap();
    assert_eq!(data_ranges(&q, "start", |e| e["data"] == true), want);
}

#[test]
fn qemu_img_compare_and_nbdcopy_round_trip() {
    need("qemu-img");
    need("nbdcopy");
    let env = Env::new();
    store_with_disk(&env, "48M");
    let img = env.path("a.img");
    let mut data = random_bytes(1, 16 * MIB);
    data.extend(vec![0u8; 16 * MIB]);
    data.extend(text_bytes(2, 16 * MIB));
    std::fs::write(&img, &data).unwrap();
    env.ok(&["import", "app1/disk0", img.to_str().unwrap()]);
    env.ok(&["volume", "create", "app1/copy", "--size", "48M"]);
    let srv = Server::start(&env);
    qemu_compare(&srv.tcp("app1/disk0"), &img);
    // nbdcopy a local file into another volume, then back out.
    run("nbdcopy", &[img.to_str().unwrap(), &srv.unix("app1/copy")]);
    let out = env.path("out.img");
    run("nbdcopy", &[&srv.tcp("app1/copy"), out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == data,
        "nbdcopy round trip changed the data"
    );
    // The CLI sees the same bytes through the daemon.
    let out2 = env.path("out2.img");
    env.ok(&["export", "app1/copy", out2.to_str().unwrap()]);
    assert!(std::fs::read(&out2).unwrap() == data);
    // A point of the copy compares equal as well.
    env.ok(&["point", "create", "app1"]);
    qemu_compare(&srv.tcp("app1/copy@latest"), &img);
}

#[test]
fn qemu_io_write_fua_flush_discard_and_write_zeroes() {
    need("qemu-io");
    let env = Env::new();
    store_with_disk(&env, "4M");
    let srv = Server::start(&env);
    let uri = srv.tcp("app1/disk0");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 128k",
            "-c",
            "write -f -P 0xcd 70000 5000",
            "-c",
            "flush",
            "-c",
            "write -P 0x11 1M 256k",
            "-c",
            "discard 1M 128k",
            "-c",
            "write -z 1152k 64k",
            "-c",
            "write -z -u 2M 64k",
            "-c",
            "read -P 0xab 0 70000",
            "-c",
            "read -P 0xcd 70000 5000",
            "-c",
            "read -P 0xab 75000 56072",
            "-c",
            "read -P 0 1M 192k",
            "-c",
            "read -P 0x11 1216k 64k",
            "-c",
            "read -P 0 2M 64k",
        ],
    );
    assert!(!out.contains("fail") && !out.contains("error"), "{out}");
    assert_eq!(out.matches("read ").count(), 6, "{out}");
    // Discarded and zeroed ranges are holes again.
    let m: serde_json::Value = serde_json::from_str(&run(
        "nbdinfo",
        &["--map", "--json", &srv.unix("app1/disk0")],
    ))
    .unwrap();
    let data = data_ranges(&m, "offset", |e| e["type"].as_u64().unwrap() & 1 == 0);
    assert_eq!(data, vec![(0, 128 << 10), (1216 << 10, 64 << 10)], "{m}");
}

#[test]
fn point_exports_reject_writes_on_the_server() {
    need("nbdsh");
    let env = Env::new();
    store_with_disk(&env, "1M");
    env.ok(&["point", "create", "app1"]);
    let srv = Server::start(&env);
    let out = py(&format!(
        r#"
import nbd, errno
h = nbd.NBD()
h.set_strict_mode(0)   # send the write anyway: the server must refuse it
h.connect_uri("{}")
assert h.is_read_only()
for op in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(4096, 0), lambda: h.zero(4096, 0)):
    try:
        op()
        raise SystemExit("write to a point succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
# Out-of-range and oversize requests get errors, and the connection survives.
for op in (lambda: h.pread(512, 1 << 20), lambda: h.pread(64 << 20, 0)):
    try:
        op()
        raise SystemExit("bad read succeeded")
    except nbd.Error as e:
        assert e.errnum in (errno.EINVAL, errno.EOVERFLOW), e
assert h.pread(512, 0) == bytes(512)
print("ok")
"#,
        srv.unix("app1/disk0@1")
    ));
    assert_eq!(out.trim(), "ok");
}

#[test]
fn fio_verify_with_four_jobs_at_iodepth_16() {
    need("fio");
    let env = Env::new();
    store_with_disk(&env, "64M");
    // A 2 MiB overlay and 1 MiB journal: the background destager, writers waiting
    // at the limit and journal trims all run under the verified workload.
    let srv = Server::start_env(
        &env,
        &[("DRCLONE_DIRTY_MIB", "2"), ("DRCLONE_JOURNAL_MIB", "1")],
    );
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", srv.unix("app1/disk0")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=4",
            "--size=16M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 4);
    for j in jobs {
        assert_eq!(j["error"], 0, "{j}");
        assert_eq!(j["write"]["io_bytes"].as_u64().unwrap(), 16 * MIB as u64);
        assert!(
            j["read"]["io_bytes"].as_u64().unwrap() >= 16 * MIB as u64,
            "verify read back"
        );
    }
}

#[test]
fn flushed_writes_survive_kill_9() {
    need("qemu-io");
    let env = Env::new();
    store_with_disk(&env, "8M");
    let srv = Server::start(&env);
    let uri = srv.tcp("app1/disk0");
    qemu_io(
        &uri,
        &[
            "write -P 0x5a 0 1M",
            // Small writes: page-aligned, and unaligned (journal + overlay).
            "write -P 0x77 3M 12k",
            "write -P 0x44 6291968 1536",
            "flush",
        ],
    );
    // FUA without an explicit flush.
    qemu_io(&uri, &["write -f -P 0x33 5M 64k"]);
    srv.kill9();
    // The store reopens after the crash (recovery seals the open pack) ...
    let srv = Server::start(&env);
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            &srv.tcp("app1/disk0"),
            "-c",
            "read -P 0x5a 0 1M",
            "-c",
            "read -P 0x77 3M 12k",
            "-c",
            "read -P 0x33 5M 64k",
            "-c",
            "read -P 0x44 6291968 1536",
            "-c",
            "read -P 0 6M 512",
            "-c",
            "read -P 0 6293504 512",
            "-c",
            "read -P 0 1M 2M",
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    assert_eq!(out.matches("read ").count(), 7, "{out}");
    drop(srv);
    env.ok(&["verify"]);
}

#[test]
fn every_cli_command_works_while_serve_runs() {
    let env = Env::new();
    env.ok(&["init"]);
    let srv = Server::start(&env);
    env.ok(&["group", "create", "app1"]);
    env.ok(&["group", "create", "drill"]);
    assert_eq!(env.json(&["group", "list"]).as_array().unwrap().len(), 2);
    env.ok(&["volume", "create", "app1/disk0", "--size", "4M"]);
    env.ok(&["volume", "create", "app1/scratch", "--size", "1M"]);
    env.ok(&["volume", "resize", "app1/disk0", "--size", "8M"]);
    let img = env.path("a.img");
    std::fs::write(&img, random_bytes(4, 8 * MIB)).unwrap();
    // A relative path is resolved against the client's working directory.
    let out = env
        .cmd()
        .current_dir(env.dir.path())
        .args(["import", "app1/disk0", "a.img"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = env.json(&["point", "create", "app1", "--label", "l1"]);
    assert_eq!(p["label"], "l1");
    assert_eq!(
        env.json(&["point", "list", "app1"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    env.ok(&["retention", "set", "app1", "5m:24h"]);
    env.ok(&["clone", "app1/disk0@latest", "drill/disk0"]);
    let out = env.path("o.img");
    env.ok(&["export", "drill/disk0", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap());
    assert_eq!(env.json(&["volume", "list"]).as_array().unwrap().len(), 3);
    assert!(env.json(&["df"])["unique_bytes"].as_u64().unwrap() >= 8 * MIB as u64);
    env.ok(&["volume", "rm", "app1/scratch"]);
    env.ok(&["point", "rm", "app1", "latest"]);
    env.ok(&["gc"]);
    assert_eq!(env.json(&["verify"])["ok"], true);
    // Errors come back through the daemon with a non-zero exit.
    assert!(env
        .fails(&["volume", "create", "app1/disk0", "--size", "1M"])
        .contains("already exists"));
    assert!(env.fails(&["serve"]).contains("already running"));
    // The data written over the CLI is what NBD clients see.
    need("qemu-img");
    qemu_compare(&srv.tcp("drill/disk0"), &img);
    // SIGTERM shuts down cleanly and the store opens directly afterwards.
    assert!(srv.stop().success());
    assert!(!env.store.join("control.sock").exists());
    env.ok(&["verify"]);
}

#[test]
fn captive_stdio_server_and_hostile_input() {
    need("nbdinfo");
    let env = Env::new();
    store_with_disk(&env, "2M");
    let bin = assert_cmd::cargo::cargo_bin("drclone");
    let store = env.store.to_str().unwrap().to_string();
    let args = activating_nbdinfo("--json", &env, &["--default-export", "app1/disk0"]);
    let out = run(
        "nbdinfo",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["exports"][0]["export-size"], 2 * MIB as u64);
    // One connection on stdin/stdout (libnbd's connect_command).
    let out = py(&format!(
        r#"
import nbd
h = nbd.NBD()
h.set_export_name("app1/disk0")
h.connect_command(["{}", "--store", "{}", "serve", "--stdio"])
h.pwrite(b"stdio!" * 100, 4096)
h.flush()
assert h.pread(600, 4096) == b"stdio!" * 100
print(h.get_size())
h.shutdown()
"#,
        bin.display(),
        store
    ));
    assert_eq!(out.trim(), (2 * MIB).to_string());

    // Hostile bytes on a TCP connection never take the server down.
    use std::io::{Read, Write};
    let srv = Server::start(&env);
    for garbage in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        &[0xffu8; 64][..],
        &[0u8; 4][..],
    ] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        assert_eq!(&greet[..8], b"NBDMAGIC");
        let _ = s.write_all(garbage);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    // An oversize option length and an unknown option.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&99u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut rep = [0u8; 20];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(
        u32::from_be_bytes(rep[12..16].try_into().unwrap()),
        (1 << 31) + 1,
        "NBD_REP_ERR_UNSUP"
    );
    drop(s);
    run("nbdinfo", &[&srv.tcp("app1/disk0")]);
}

/// The arguments of `nbdinfo OPT -- [ drclone --store STORE serve SERVE_ARGS ]`:
/// libnbd starts the server with systemd-style socket activation.
fn activating_nbdinfo(opt: &str, env: &Env, serve_args: &[&str]) -> Vec<String> {
    let bin = assert_cmd::cargo::cargo_bin("drclone");
    let mut a: Vec<String> = [opt, "--", "[", bin.to_str().unwrap(), "--store"]
        .map(String::from)
        .to_vec();
    a.push(env.store.to_str().unwrap().to_string());
    a.push("serve".into());
    a.extend(serve_args.iter().map(|s| s.to_string()));
    a.push("]".into());
    a
}

/// The pids of the `drclone ... --store STORE ... serve` processes alive now.
fn serve_pids(store: &str) -> Vec<u32> {
    let mut pids = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_drclone = args.first().is_some_and(|a| a.ends_with(b"drclone"));
        if is_drclone && args.contains(&store.as_bytes()) && args.contains(&&b"serve"[..]) {
            pids.push(pid);
        }
    }
    pids
}

/// Wait (up to a minute: a liveness bound, not a timing claim) until no serve
/// process of `store` is left; kills the ones left and panics if any stays.
fn wait_serve_gone(store: &str, what: &str) {
    for _ in 0..600 {
        if serve_pids(store).is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let left = serve_pids(store);
    for &pid in &left {
        // SAFETY: a plain kill(2) of a process this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    panic!("{what}: drclone serve {left:?} stayed (killed now)");
}

/// Socket activation the way libnbd starts a server (`nbdinfo -- [ CMD ]`): the
/// server leaves once its last client has gone, also when the handshake failed
/// (no --default-export: the empty export name is unknown), and it leaves when
/// its parent dies before any client came.  An orphan would hold the store's
/// lock (every other command fails) and the caller's stdout forever.
#[test]
fn socket_activated_serve_leaves_with_its_last_client_and_its_parent() {
    need("nbdinfo");
    let env = Env::new();
    store_with_disk(&env, "2M");
    let bin = assert_cmd::cargo::cargo_bin("drclone");
    let store = env.store.to_str().unwrap().to_string();
    // Output to files: an orphaned server would keep a pipe open.
    let (out, err) = (env.path("nbdinfo.out"), env.path("nbdinfo.err"));
    let status = std::process::Command::new("timeout")
        .args(["--kill-after=10", "120", "nbdinfo"])
        .args(activating_nbdinfo("--size", &env, &[]))
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    let err_text = std::fs::read_to_string(&err).unwrap();
    assert!(
        !status.success() && err_text.contains("no export named"),
        "nbdinfo without --default-export: {status}: {err_text}"
    );
    wait_serve_gone(&store, "after a failed handshake");
    env.ok(&["volume", "list"]);

    // A successful client: the server is gone once it disconnected.
    let args = activating_nbdinfo("--size", &env, &["--default-export", "app1/disk0"]);
    let size = run(
        "nbdinfo",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(size.trim(), (2 * MIB).to_string());
    wait_serve_gone(&store, "after a served client");
    env.ok(&["volume", "list"]);

    // The parent dies (SIGKILL) before any client connects.
    let sock = env.path("act.sock");
    let mut parent = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!(
            r#"
import os, socket, time
s = socket.socket(socket.AF_UNIX)
s.bind({sock:?})
s.listen()
pid = os.fork()
if pid == 0:
    os.dup2(s.fileno(), 3)
    null = os.open("/dev/null", os.O_WRONLY)
    os.dup2(null, 1)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = "1"
    os.execv({bin:?}, [{bin:?}, "--store", {store:?}, "serve"])
print(pid, flush=True)
time.sleep(600)
"#,
            sock = sock.to_str().unwrap(),
            bin = bin.to_str().unwrap(),
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(parent.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let pid: u32 = line.trim().parse().expect("the server's pid");
    // Serving: it holds the store's lock.
    let holds_lock = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.ends_with("meta/LOCK")))
            })
            .unwrap_or(false)
    };
    let mut up = false;
    for _ in 0..600 {
        up = holds_lock();
        if up {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if !up {
        let _ = parent.kill();
        wait_serve_gone(&store, "before it opened the store");
        panic!("the activated server never opened the store");
    }
    parent.kill().unwrap();
    parent.wait().unwrap();
    wait_serve_gone(&store, "after its parent died");
    env.ok(&["volume", "list"]);
    env.ok(&["verify"]);
}
