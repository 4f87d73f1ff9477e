//! Helpers shared by the integration tests: run the real `drclone` binary on a
//! temporary store.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        Env { dir, store }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cmd(&self) -> assert_cmd::Command {
        let mut c = assert_cmd::Command::cargo_bin("drclone").unwrap();
        c.env("DRCLONE_STORE", &self.store)
            .env_remove("DRCLONE_KEY_FILE");
        c
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "drclone {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run and require failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out: Output = self.cmd().args(args).output().unwrap();
        assert!(
            !out.status.success(),
            "drclone {args:?} unexpectedly succeeded"
        );
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }
}

/// `du -sb` of a directory: apparent bytes of every file.
pub fn du_bytes(p: &Path) -> u64 {
    let out = std::process::Command::new("du")
        .arg("-sb")
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Deterministic English-like text.
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the",
        "replication",
        "disk",
        "volume",
        "recovery",
        "point",
        "of",
        "and",
        "a",
        "to",
        "site",
        "failover",
        "application",
        "consistent",
        "crash",
        "storage",
        "block",
        "data",
        "is",
        "in",
        "for",
        "with",
        "that",
        "server",
        "network",
        "snapshot",
        "clone",
        "write",
        "read",
        "chunk",
        "deduplicated",
        "compressed",
        "encrypted",
        "operator",
        "host",
        "time",
    ];
    let r = random_bytes(seed, len / 2 + 16);
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0;
    while out.len() < len {
        let w = WORDS[r[i % r.len()] as usize % WORDS.len()];
        out.extend_from_slice(w.as_bytes());
        out.push(if r[(i + 7) % r.len()] % 11 == 0 {
            b'\n'
        } else {
            b' '
        });
        i += 1;
    }
    out.truncate(len);
    out
}

/// Fail loudly (never skip) when a peer tool is missing.
pub fn need(tool: &str) {
    let ok = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{tool} is not installed: run scripts/setup.sh (scripts/test.sh does)"
    );
}

/// A `drclone serve` daemon on a store, stopped with SIGTERM on drop.
pub struct Server {
    pub child: std::process::Child,
    pub port: u16,
    pub sock: PathBuf,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    pub fn start(env: &Env) -> Server {
        Server::start_env(env, &[])
    }

    /// Start with extra environment (e.g. tiny overlay and journal limits).
    pub fn start_env(env: &Env, vars: &[(&str, &str)]) -> Server {
        let port = free_port();
        let sock = env.path("nbd.sock");
        let bin = assert_cmd::cargo::cargo_bin("drclone");
        let child = std::process::Command::new(bin)
            .env("DRCLONE_STORE", &env.store)
            .envs(vars.iter().copied())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--socket",
            ])
            .arg(&sock)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let s = Server { child, port, sock };
        let ctl = env.store.join("control.sock");
        for _ in 0..500 {
            if std::os::unix::net::UnixStream::connect(&ctl).is_ok() && s.sock.exists() {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("drclone serve did not start");
    }

    /// NBD URI of an export over TCP.
    pub fn tcp(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    /// NBD URI of an export over the unix socket.
    pub fn unix(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        std::mem::forget(self);
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().unwrap();
        std::mem::forget(self);
        st
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Run a command, require success, return stdout.  A peer that hangs (a server
/// that stops answering) fails the test after 5 minutes instead of hanging CI.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("timeout")
        .args(["--kill-after=10", "300", cmd])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed{}: {}{}",
        if out.status.code() == Some(124) {
            " (timed out after 300 s)"
        } else {
            ""
        },
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run a Python script under Debian's python3 (which has libnbd's `nbd` module).
pub fn py(script: &str) -> String {
    run("/usr/bin/python3", &["-c", script])
}

/// `qemu-img compare` of a raw NBD export (or file) against a raw file; must match.
pub fn qemu_compare(a: &str, b: &Path) {
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", a, b.to_str().unwrap()],
    );
}

/// Run `qemu-io -f raw URI -c CMD ...`; returns stdout.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    run("qemu-io", &args)
}

impl Server {
    /// Start with extra environment, logging at info level (RUST_LOG=info unless
    /// `vars` sets it) to the file `log`, so a test can quote the server's lines.
    pub fn start_logged(env: &Env, vars: &[(&str, &str)], log: &Path) -> Server {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut all = vec![("RUST_LOG", "info")];
        all.extend_from_slice(vars);
        let port = free_port();
        let sock = env.path("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"))
            .env("DRCLONE_STORE", &env.store)
            .envs(all.iter().copied())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--socket",
            ])
            .arg(&sock)
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let s = Server { child, port, sock };
        let ctl = env.store.join("control.sock");
        for _ in 0..1500 {
            if std::os::unix::net::UnixStream::connect(&ctl).is_ok() && s.sock.exists() {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("drclone serve did not start: {}", log_tail(log, 20));
    }

    /// The process id (for `kill -9` at a chosen moment).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The last `n` lines of a log file (for failure messages).
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Lines of a log file that contain any of `pats` (at most 40, for failure messages).
pub fn log_grep(log: &Path, pats: &[&str]) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let hits: Vec<&str> = text
        .lines()
        .filter(|l| pats.iter().any(|p| l.contains(p)))
        .collect();
    let n = hits.len();
    let mut out = hits[..n.min(40)].join("\n");
    if n > 40 {
        out.push_str(&format!("\n... {} more", n - 40));
    }
    out
}

/// Python helpers for libnbd clients; every script given to [`PyChild`] or
/// [`py`] may start with it.
///  * `block(tag, n, size)`: deterministic incompressible bytes, unique per (tag, n);
///  * `stamp(n, size)` / `unstamp(b)`: a counter in every 8-byte word (None if torn);
///  * `stop`: an Event set when the test writes a line to stdin (`watch_stdin()`);
///  * `say(...)`: print and flush (the test reads lines as they come).
pub const PY_PRELUDE: &str = r#"
import nbd, os, sys, struct, hashlib, threading, json, errno
def block(tag, n, size):
    return hashlib.shake_128(b"%s:%d" % (tag.encode(), n)).digest(size)
def stamp(n, size):
    return struct.pack("<Q", n) * (size // 8)
def unstamp(b):
    w = b[:8]
    return struct.unpack("<Q", w)[0] if w * (len(b) // 8) == b else None
stop = threading.Event()
def watch_stdin():
    def w():
        sys.stdin.readline()
        stop.set()
    threading.Thread(target=w, daemon=True).start()
def say(*a):
    print(*a, flush=True)
def connect(uri, meta=None):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(meta)
    h.connect_uri(uri)
    return h
"#;

/// A Python client (Debian's /usr/bin/python3, which has libnbd) running beside
/// the test: the test reads its output line by line and writes lines to its stdin.
/// It runs under `timeout` so a hung peer fails the test instead of hanging CI.
pub struct PyChild {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    err: PathBuf,
}

impl PyChild {
    /// Start `PY_PRELUDE` + `script`; its stderr goes to `ENV/NAME.err`.
    pub fn spawn(env: &Env, name: &str, script: &str) -> PyChild {
        let err = env.path(&format!("{name}.err"));
        let mut child = std::process::Command::new("timeout")
            .args(["--kill-after=10", "600", "/usr/bin/python3", "-c"])
            .arg(format!("{PY_PRELUDE}\n{script}"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        PyChild { child, out, err }
    }

    /// The next line of output (without the newline); panics with the script's
    /// stderr if it ended instead.
    pub fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        if l.is_empty() {
            let st = self.child.wait().unwrap();
            panic!(
                "python client ended ({st}) before printing a line: {}",
                std::fs::read_to_string(&self.err).unwrap_or_default()
            );
        }
        l.trim_end().to_string()
    }

    /// Write one line to the script's stdin.
    pub fn send(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Close stdin, wait, require success; returns the rest of its output.
    pub fn finish(mut self) -> String {
        use std::io::Read;
        drop(self.child.stdin.take());
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        let st = self.child.wait().unwrap();
        assert!(
            st.success(),
            "python client failed ({st}): {}{rest}",
            std::fs::read_to_string(&self.err).unwrap_or_default()
        );
        rest
    }
}

impl Drop for PyChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `drclone mount` of the store at `ENV/mnt` (hosted by the daemon when one
/// runs); unmounted on drop.
pub struct Mount {
    pub child: std::process::Child,
    pub dir: PathBuf,
}

impl Mount {
    pub fn start(env: &Env) -> Mount {
        let dir = env.path("mnt");
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"))
            .env("DRCLONE_STORE", &env.store)
            .arg("mount")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..500 {
            if std::fs::read_to_string("/proc/self/mounts")
                .unwrap()
                .contains(&format!(" {} fuse", dir.display()))
            {
                return Mount { child, dir };
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("drclone mount did not come up");
    }

    /// Unmount with SIGTERM; the mount process must exit cleanly.
    pub fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().unwrap();
        assert!(st.success(), "drclone mount exited with {st}");
        assert!(!std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .contains(&format!(" {} fuse", self.dir.display())));
        std::mem::forget(self);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.dir)
            .status();
    }
}

/// A `drclone` command's result without asserting on it: (success, stdout, stderr).
pub fn try_cmd(env: &Env, args: &[&str]) -> (bool, String, String) {
    let out = env.cmd().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Bytes a [`CountingProxy`] carried, each way.
#[derive(Clone, Default)]
pub struct CountingProxy {
    /// Client to server.
    pub up: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Server to client.
    pub down: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CountingProxy {
    /// Client-to-server bytes so far, and reset.
    pub fn take_up(&self) -> u64 {
        self.up.swap(0, std::sync::atomic::Ordering::SeqCst)
    }
    /// Server-to-client bytes so far, and reset.
    pub fn take_down(&self) -> u64 {
        self.down.swap(0, std::sync::atomic::Ordering::SeqCst)
    }
    pub fn up_now(&self) -> u64 {
        self.up.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Copy `from` into `to` until either ends, counting bytes.
fn pump<R: std::io::Read, W: std::io::Write>(
    mut from: R,
    mut to: W,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                count.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

/// A byte-counting proxy from a new TCP port to `127.0.0.1:target`; returns
/// its port.  It counts what crosses the wire, not what drclone reports.
pub fn tcp_proxy(target: u16) -> (u16, CountingProxy) {
    use std::net::{Shutdown, TcpListener, TcpStream};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let p = CountingProxy::default();
    let q = p.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { break };
            let Ok(t) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let (c2, t2) = (c.try_clone().unwrap(), t.try_clone().unwrap());
            let (up, down) = (q.up.clone(), q.down.clone());
            std::thread::spawn(move || {
                pump(&c, &t, up);
                let _ = t.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || {
                pump(&t2, &c2, down);
                let _ = c2.shutdown(Shutdown::Write);
            });
        }
    });
    (port, p)
}

/// A byte-counting proxy from a new unix socket `listen` to `upstream`.
pub fn unix_proxy(listen: &Path, upstream: &Path) -> CountingProxy {
    use std::os::unix::net::{UnixListener, UnixStream};
    let l = UnixListener::bind(listen).unwrap();
    let up_path = upstream.to_path_buf();
    let p = CountingProxy::default();
    let q = p.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { break };
            let Ok(s) = UnixStream::connect(&up_path) else {
                continue;
            };
            let (c2, s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            let (up, down) = (q.up.clone(), q.down.clone());
            std::thread::spawn(move || {
                pump(&c, &s, up);
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                pump(&s2, &c2, down);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    p
}

/// A drclone site: a store served over NBD (TCP) with a replication port.
pub struct Site {
    pub env: Env,
    pub srv: Option<std::process::Child>,
    pub repl: u16,
    pub nbd: u16,
}

impl Site {
    /// A new store, served.
    pub fn new() -> Site {
        Site::with_args(&[])
    }

    /// A new store, served with `extra` flags for `serve`.
    pub fn with_args(extra: &[&str]) -> Site {
        let env = Env::new();
        env.ok(&["init"]);
        let mut s = Site {
            env,
            srv: None,
            repl: free_port(),
            nbd: free_port(),
        };
        s.start(extra);
        s
    }

    /// Start `serve` (again, after [`Site::kill9`]) with `extra` flags.
    pub fn start(&mut self, extra: &[&str]) {
        let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"))
            .env("DRCLONE_STORE", &self.env.store)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{}", self.nbd),
                "--replication-listen",
                &format!("127.0.0.1:{}", self.repl),
            ])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.srv = Some(child);
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", self.repl)).is_ok()
                && self.env.store.join("control.sock").exists()
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("drclone serve did not start");
    }

    /// kill -9 of `serve`.
    pub fn kill9(&mut self) {
        let mut c = self.srv.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// NBD URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.nbd)
    }

    /// Export a head or point to a file and return its bytes.
    pub fn export(&self, what: &str) -> Vec<u8> {
        let out = self.env.path("export.bin");
        let _ = std::fs::remove_file(&out);
        self.env.ok(&["export", what, out.to_str().unwrap()]);
        std::fs::read(out).unwrap()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut c) = self.srv.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// Write `len` random bytes (from `seed`) at `off` of an NBD export, then FLUSH.
pub fn nbd_write_random(uri: &str, off: u64, len: usize, seed: u64) {
    let p = std::env::temp_dir().join(format!("drclone-w-{}-{seed}-{off}", std::process::id()));
    std::fs::write(&p, random_bytes(seed, len)).unwrap();
    // In pieces of 16 MiB: NBD servers cap a request's length.
    py(&format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri({uri:?})\nd = open({:?}, 'rb').read()\n\
         for i in range(0, len(d), 16 << 20):\n    h.pwrite(d[i:i + (16 << 20)], {off} + i)\n\
         h.flush()\nh.shutdown()\n",
        p.display().to_string()
    ));
    let _ = std::fs::remove_file(&p);
}

/// A CA and a server certificate it signs with subjectAltName `san`:
/// (CA cert, server cert, server key).
pub fn tls_pki(dir: &Path, name: &str, san: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    let s = |f: &str| p(f).to_str().unwrap().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let subj = format!("/CN={name} CA");
    let (ca_key, ca_crt) = (s("ca.key"), s("ca.crt"));
    let mut a = vec!["req", "-x509", "-days", "2", "-subj", &subj];
    a.extend_from_slice(&ec);
    a.extend_from_slice(&["-keyout", &ca_key, "-out", &ca_crt]);
    run("openssl", &a);
    let (key, csr, crt) = (s("server.key"), s("server.csr"), s("server.crt"));
    let mut a = vec!["req", "-new", "-subj", "/CN=127.0.0.1"];
    a.extend_from_slice(&ec);
    a.extend_from_slice(&["-keyout", &key, "-out", &csr]);
    run("openssl", &a);
    let ext = p("ext.cnf");
    std::fs::write(&ext, format!("subjectAltName={san}\n")).unwrap();
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            &crt,
        ],
    );
    (p("ca.crt"), p("server.crt"), p("server.key"))
}
