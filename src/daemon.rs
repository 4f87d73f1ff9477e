//! The daemon (`drclone serve`): NBD listeners (TCP, unix socket, or one captive
//! connection on stdin/stdout) and the control socket.
//!
//! RocksDB admits one process per store, so while the daemon runs it owns the store
//! and every other `drclone` command talks to it over `STORE/control.sock`: the
//! client sends its argv and working directory as one JSON line, the daemon runs the
//! same command code against its open store and answers with the exit code and the
//! captured stdout and stderr.  Clients find the daemon by themselves.
//!
//! SIGTERM or SIGINT stops the listeners, flushes and seals the store, removes the
//! sockets and exits 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::nbd::server::serve_connection;
use crate::store::Store;

pub const CONTROL_SOCKET: &str = "control.sock";

/// A command forwarded to the daemon.
#[derive(Debug, Serialize, Deserialize)]
pub struct ControlRequest {
    pub argv: Vec<String>,
    pub cwd: PathBuf,
}

/// The daemon's answer.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ControlResponse {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a forwarded command against the daemon's open store.
pub type Handler = dyn Fn(&Arc<Store>, ControlRequest) -> ControlResponse + Send + Sync;

pub fn control_path(store_dir: &Path) -> PathBuf {
    store_dir.join(CONTROL_SOCKET)
}

/// Connect to a running daemon of this store, if there is one.
pub fn connect(store_dir: &Path) -> Option<UnixStream> {
    UnixStream::connect(control_path(store_dir)).ok()
}

/// Forward a command to the daemon.
pub fn forward(mut s: UnixStream, req: &ControlRequest) -> Result<ControlResponse> {
    let path = PathBuf::from(CONTROL_SOCKET);
    let mut line = serde_json::to_vec(req).expect("request serializes");
    line.push(b'\n');
    s.write_all(&line).at(&path)?;
    s.shutdown(std::net::Shutdown::Write).at(&path)?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).at(&path)?;
    serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("daemon sent a bad reply: {e}")))
}

pub struct Options {
    pub listen: Option<String>,
    pub socket: Option<PathBuf>,
    /// What the empty export name serves.
    pub default_export: Option<String>,
}

/// Serve one NBD connection on stdin/stdout (the captive-server pattern).
pub fn serve_stdio(store: Arc<Store>, default_export: Option<&str>) -> Result<()> {
    serve_connection(
        store.clone(),
        Box::new(std::io::stdin()),
        Box::new(std::io::stdout()),
        "stdio",
        default_export,
    );
    store.close()
}

/// The listening socket systemd-style socket activation passed us (fd 3), if any.
/// libnbd's `nbdinfo -- [ CMD ]` starts servers this way.
pub fn activation_listener() -> Option<UnixListener> {
    use std::os::unix::io::FromRawFd;
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || fds < 1 {
        return None;
    }
    // SAFETY: the activation protocol hands us fd 3 as a listening socket we own.
    Some(unsafe { UnixListener::from_raw_fd(3) })
}

/// Serve connections on a socket-activation listener until SIGTERM/SIGINT.
pub fn serve_activated(
    store: Arc<Store>,
    l: UnixListener,
    default_export: Option<String>,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| Error::io("signal handler", e))?;
    }
    l.set_nonblocking(true)
        .map_err(|e| Error::io("activation socket", e))?;
    accept_loop(
        stop.clone(),
        "activation socket".into(),
        move || would_block(l.accept()).map(|o| o.map(|(s, _)| (s, "activated".to_string()))),
        store.clone(),
        default_export,
    );
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
    store.close()
}

fn accept_loop<L, S>(
    stop: Arc<AtomicBool>,
    what: String,
    accept: L,
    store: Arc<Store>,
    default: Option<String>,
) where
    L: Fn() -> std::io::Result<Option<(S, String)>> + Send + 'static,
    S: Read + Write + Send + 'static + TryCloneStream,
{
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match accept() {
                Ok(Some((stream, peer))) => {
                    let store = store.clone();
                    let default = default.clone();
                    std::thread::spawn(move || match stream.try_clone_stream() {
                        Ok(r) => serve_connection(
                            store,
                            Box::new(r),
                            Box::new(stream),
                            &peer,
                            default.as_deref(),
                        ),
                        Err(e) => log::warn!("nbd {peer}: {e}"),
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    log::warn!("{what}: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });
}

/// Streams that can be split into a reader and a writer.
pub trait TryCloneStream: Sized {
    fn try_clone_stream(&self) -> std::io::Result<Self>;
}
impl TryCloneStream for std::net::TcpStream {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.set_nonblocking(false)?;
        self.set_nodelay(true)?;
        self.try_clone()
    }
}
impl TryCloneStream for UnixStream {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.set_nonblocking(false)?;
        self.try_clone()
    }
}

fn would_block<T>(r: std::io::Result<T>) -> std::io::Result<Option<T>> {
    match r {
        Ok(x) => Ok(Some(x)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Bind a unix socket, replacing a stale socket file nobody listens on.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(Error::Exists(format!(
                "a server listening on {} (is `drclone serve` already running?)",
                path.display()
            )));
        }
        std::fs::remove_file(path).at(path)?;
    }
    let l = UnixListener::bind(path).at(path)?;
    l.set_nonblocking(true).at(path)?;
    Ok(l)
}

/// Run the daemon until SIGTERM/SIGINT.  `ready` is called once every socket listens.
pub fn run(
    store: Arc<Store>,
    opts: Options,
    handler: Arc<Handler>,
    ready: impl FnOnce(&[String]),
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| Error::io("signal handler", e))?;
    }
    let ctl_path = control_path(store.dir());
    let ctl = bind_unix(&ctl_path)?;
    let mut endpoints = vec![];
    if let Some(addr) = &opts.listen {
        let l = TcpListener::bind(addr).map_err(|e| Error::io(format!("listen {addr}"), e))?;
        l.set_nonblocking(true).map_err(|e| Error::io(addr, e))?;
        endpoints.push(format!(
            "nbd://{}",
            l.local_addr()
                .map(|a| a.to_string())
                .unwrap_or(addr.clone())
        ));
        accept_loop(
            stop.clone(),
            addr.clone(),
            move || would_block(l.accept()).map(|o| o.map(|(s, a)| (s, a.to_string()))),
            store.clone(),
            opts.default_export.clone(),
        );
    }
    if let Some(path) = &opts.socket {
        let l = bind_unix(path)?;
        endpoints.push(format!("nbd+unix:///?socket={}", path.display()));
        accept_loop(
            stop.clone(),
            path.display().to_string(),
            move || would_block(l.accept()).map(|o| o.map(|(s, _)| (s, "unix".to_string()))),
            store.clone(),
            opts.default_export.clone(),
        );
    }
    {
        let store = store.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match would_block(ctl.accept()) {
                    Ok(Some((s, _))) => {
                        let store = store.clone();
                        let handler = handler.clone();
                        std::thread::spawn(move || control_connection(store, s, &*handler));
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                    Err(e) => log::warn!("control socket: {e}"),
                }
            }
        });
    }
    log::info!(
        "serving store {} on {}",
        store.dir().display(),
        endpoints.join(", ")
    );
    ready(&endpoints);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    log::info!(
        "shutting down: unmounting, flushing store {}",
        store.dir().display()
    );
    crate::fuse::unmount_all();
    let _ = std::fs::remove_file(&ctl_path);
    if let Some(p) = &opts.socket {
        let _ = std::fs::remove_file(p);
    }
    store.close()
}

fn control_connection(store: Arc<Store>, s: UnixStream, handler: &Handler) {
    let _ = s.set_nonblocking(false);
    let mut line = String::new();
    let mut r = BufReader::new(&s);
    let resp = match r.read_line(&mut line) {
        Ok(_) => match serde_json::from_str::<ControlRequest>(&line) {
            Ok(req) => handler(&store, req),
            Err(e) => ControlResponse {
                code: 2,
                stderr: format!("drclone: bad control request: {e}\n"),
                ..Default::default()
            },
        },
        Err(e) => ControlResponse {
            code: 2,
            stderr: format!("drclone: control socket read failed: {e}\n"),
            ..Default::default()
        },
    };
    let mut w = &s;
    let _ = w.write_all(&serde_json::to_vec(&resp).expect("response serializes"));
}
