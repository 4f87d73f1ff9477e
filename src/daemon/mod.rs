//! The daemon (`drclone serve`): NBD listeners (TCP, unix socket, or one captive
//! connection on stdin/stdout) and the control socket.
//!
//! RocksDB admits one process per store, so while the daemon runs it owns the store
//! and every other `drclone` command talks to it over `STORE/control.sock`: the
//! client sends its argv and working directory as one JSON line, the daemon runs the
//! same command code against its open store and answers with the exit code and the
//! captured stdout and stderr.  Clients find the daemon by themselves.
//!
//! Every NBD connection is a session in the server's registry
//! ([`crate::nbd::sessions`]); the limits of [`crate::nbd::limits`] apply
//! (connection cap, handshake and idle timeouts, payload budgets).  A reaper
//! thread enforces the timeouts.
//!
//! SIGTERM or SIGINT drains: the listeners stop accepting; every session stops
//! taking requests (its socket is shut down for reading) while what it already
//! took is served and answered; sessions still busy after [`DRAIN_GRACE`] are
//! dropped.  Then the mounts go, the store is flushed, destaged and sealed
//! ([`Store::close`]), the sockets are removed, and the daemon exits 0.  If a
//! session never leaves (a request stuck in the engine), the store is flushed but
//! not closed, and the daemon exits with an error.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::store::Store;
use crate::error::{Error, IoContext, Result};
use crate::nbd::limits::{Limits, MAX_REFUSING};
use crate::nbd::server::{refuse_connection, serve_connection, serve_session, Shared};
use crate::nbd::sessions::Sessions;

pub mod replication;

/// How long a SIGTERM drain waits for sessions to finish what they took (and
/// then again after dropping the rest).
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// The session registry of the NBD server running in this process, if any (for
/// `drclone sessions` over the control socket, and failover later).
pub fn sessions() -> Option<Arc<Sessions>> {
    CURRENT.get().map(|s| s.sessions.clone())
}

static CURRENT: OnceLock<Arc<Shared>> = OnceLock::new();

pub const CONTROL_SOCKET: &str = "control.sock";

/// A command forwarded to the daemon.
#[derive(Debug, Serialize, Deserialize)]
pub struct ControlRequest {
    pub argv: Vec<String>,
    pub cwd: PathBuf,
    /// The requesting user: set by the daemon from the control socket's peer
    /// credentials (SO_PEERCRED), never read from the request.
    #[serde(skip)]
    pub uid: Option<u32>,
}

static ENDPOINTS: OnceLock<Vec<String>> = OnceLock::new();

/// How long a DR action waits for the NBD clients of a head to leave.
pub const DISCONNECT_WAIT: Duration = Duration::from_secs(10);

/// The NBD URI of export `name` (canonical `GROUP/DISK`) on this process's
/// listener: TCP if it listens there, else its unix socket.  None when this
/// process serves no NBD.
pub fn export_uri(name: &str) -> Option<String> {
    let base = ENDPOINTS.get()?.first()?;
    Some(match base.strip_prefix("nbd+unix:///") {
        // nbd+unix:///?socket=P -> nbd+unix:///NAME?socket=P
        Some(q) => format!("nbd+unix:///{name}{q}"),
        None => format!("{base}/{name}"),
    })
}

/// Close the NBD sessions of export `name` in this process's server (none if it
/// serves none) and wait for them to go.  The [`crate::dr::Disconnect`] of
/// forwarded DR commands.  Errors: `Busy` if one does not leave within
/// [`DISCONNECT_WAIT`].
pub fn disconnect(name: &str) -> Result<usize> {
    match sessions() {
        Some(s) => s.disconnect_export(name, DISCONNECT_WAIT),
        None => Ok(0),
    }
}

/// The uid of a unix socket's peer.
fn peer_uid(s: &UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// A period from the environment variable `var` in whole seconds (at least 1),
/// or `default` seconds.
fn env_secs(var: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
            .max(1),
    )
}

/// Seconds between maintenance rounds (drill expiry, retention, retired
/// heads): `DRCLONE_MAINT_SECS`, default 5.
fn maintenance_interval() -> Duration {
    env_secs("DRCLONE_MAINT_SECS", 5)
}

/// Seconds between catalog checkpoints of an object-store backend when the
/// metadata changed (docs/DESIGN.md §20b): `DRCLONE_CATALOG_SECS`, default 300.
/// Points, GC and open take their own.
fn catalog_interval() -> Duration {
    env_secs("DRCLONE_CATALOG_SECS", 300)
}

fn maintenance(stop: Arc<AtomicBool>, store: Arc<Store>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let every = maintenance_interval();
        let mut next = std::time::Instant::now() + every;
        let cat_every = catalog_interval();
        let mut cat_next = std::time::Instant::now() + cat_every;
        let mut checkpoints = crate::dr::checkpoint::Checkpoints::default();
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            checkpoints.tick(&store, std::time::Instant::now());
            if std::time::Instant::now() >= cat_next {
                cat_next = std::time::Instant::now() + cat_every;
                if store.catalog_changed() {
                    if let Err(e) = store.checkpoint_catalog("interval") {
                        log::warn!("catalog checkpoint: {e}");
                    }
                }
            }
            if std::time::Instant::now() < next {
                continue;
            }
            next = std::time::Instant::now() + every;
            if let Err(e) = crate::dr::maintain(&store, crate::util::now_secs(), &disconnect) {
                log::warn!("maintenance: {e}");
            }
        }
    })
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
    /// Connection cap, timeouts and memory budgets of the NBD server.
    pub limits: Limits,
    /// Serve Prometheus metrics (`GET /metrics`) on this address.
    pub metrics: Option<String>,
    /// The replication receiver's address; `required` makes a failure to bind
    /// fatal (an address the operator named), otherwise it is logged.
    pub replication: Option<(String, bool)>,
    /// Receiver settings (the token).
    pub replication_cfg: crate::repl::receiver::Config,
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

/// Serve connections on a socket-activation listener until the last client has
/// disconnected (after at least one came, like `qemu-nbd` without
/// `--persistent`; a client whose handshake failed counts), until the parent
/// process dies, or until SIGTERM/SIGINT.  A server started by a client
/// (`nbdinfo -- [ drclone serve ]`) thus never outlives it holding the store.
pub fn serve_activated(
    store: Arc<Store>,
    l: UnixListener,
    default_export: Option<String>,
    limits: Limits,
) -> Result<()> {
    let stop = stop_on_signals()?;
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    l.set_nonblocking(true)
        .map_err(|e| Error::io("activation socket", e))?;
    let shared = start_shared(store.clone(), default_export, limits);
    let accepted = Arc::new(AccountedAccepts::default());
    let mut threads = vec![accept_loop(
        stop.clone(),
        "activation socket".into(),
        {
            let accepted = accepted.clone();
            move || {
                let r = would_block(l.accept());
                accepted.call(matches!(r, Ok(Some(_))));
                r.map(|o| o.map(|(s, _)| (s, "activated".to_string())))
            }
        },
        shared.clone(),
    )];
    threads.push(reaper(stop.clone(), shared.clone()));
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: as above.
        if unsafe { libc::getppid() } != parent {
            log::info!("socket activation: the parent process is gone; shutting down");
            break;
        }
        if accepted.all_gone(&shared.sessions) {
            log::info!("socket activation: the last client disconnected; shutting down");
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    drain(&store, &shared, threads)?;
    store.close()
}

/// The connections an accept loop took, for "has the last client gone?": each
/// is registered as a session by the loop before it calls accept again.
#[derive(Default)]
struct AccountedAccepts {
    /// Connections accepted so far.
    taken: AtomicUsize,
    /// The last accepted connection may not be registered yet.
    in_hand: AtomicBool,
}

impl AccountedAccepts {
    /// Called by the accept closure on each call: `took` if it returns a
    /// connection.  The call itself shows the previous one was registered.
    fn call(&self, took: bool) {
        if took {
            self.in_hand.store(true, Ordering::SeqCst);
            self.taken.fetch_add(1, Ordering::SeqCst);
        } else {
            self.in_hand.store(false, Ordering::SeqCst);
        }
    }

    /// At least one connection came, and every one has ended.
    fn all_gone(&self, sessions: &Sessions) -> bool {
        let before = self.taken.load(Ordering::SeqCst);
        if before == 0 || self.in_hand.load(Ordering::SeqCst) {
            return false;
        }
        let live = sessions.count();
        live == 0 && self.taken.load(Ordering::SeqCst) == before
    }
}

fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| Error::io("signal handler", e))?;
    }
    Ok(stop)
}

/// The NBD server's shared state, published for [`sessions`].
fn start_shared(store: Arc<Store>, default_export: Option<String>, limits: Limits) -> Arc<Shared> {
    log::info!(
        "nbd limits: {} connections, {} MiB in flight per connection, {} MiB in total, \
         handshake timeout {} s, idle timeout {}",
        limits.max_connections,
        limits.conn_bytes >> 20,
        limits.total_bytes >> 20,
        limits.handshake_timeout.as_secs(),
        limits
            .idle_timeout
            .map_or("off".to_string(), |t| format!("{} s", t.as_secs()))
    );
    let shared = Shared::new(store, default_export, limits);
    let _ = CURRENT.set(shared.clone());
    shared
}

/// Enforce the handshake and idle timeouts until `stop`.
fn reaper(stop: Arc<AtomicBool>, shared: Arc<Shared>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let l = &shared.limits;
        let shortest = l
            .idle_timeout
            .map_or(l.handshake_timeout, |i| i.min(l.handshake_timeout));
        let tick = (shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(tick);
            shared.sessions.reap(l.handshake_timeout, l.idle_timeout);
        }
    })
}

/// The SIGTERM drain (see the module doc): called once `stop` is set.
fn drain(store: &Store, shared: &Shared, threads: Vec<JoinHandle<()>>) -> Result<()> {
    // No new connections: every accept loop has returned.
    for t in threads {
        let _ = t.join();
    }
    let n = shared.sessions.count();
    if n > 0 {
        log::info!("draining {n} NBD sessions");
    }
    if !shared.sessions.drain(DRAIN_GRACE) {
        let left = shared.sessions.count();
        log::error!("{left} NBD sessions did not finish: flushing, leaving the store open");
        store.flush()?;
        return Err(Error::Busy(format!(
            "store {} ({left} NBD sessions would not stop)",
            store.dir().display()
        )));
    }
    Ok(())
}

fn accept_loop<L, S>(
    stop: Arc<AtomicBool>,
    what: String,
    accept: L,
    shared: Arc<Shared>,
) -> JoinHandle<()>
where
    L: Fn() -> std::io::Result<Option<(S, String)>> + Send + 'static,
    S: Read + Write + Send + Sync + 'static + TryCloneStream,
{
    let refusing = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match accept() {
                Ok(Some((stream, peer))) => {
                    if shared.sessions.count() >= shared.limits.max_connections {
                        refuse(stream, peer, &shared.limits, &refusing);
                        continue;
                    }
                    // Registered here, not in the new thread, so the cap is exact.
                    let (r, closer) = match (stream.try_clone_stream(), stream.try_clone_stream()) {
                        (Ok(r), Ok(c)) => (r, c),
                        (Err(e), _) | (_, Err(e)) => {
                            log::warn!("nbd {peer}: {e}");
                            continue;
                        }
                    };
                    let session = shared.sessions.register(
                        &peer,
                        Box::new(move |how| {
                            let _ = closer.shut(how);
                        }),
                    );
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        serve_session(&shared, Box::new(r), Box::new(stream), &session)
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    log::warn!("{what}: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    })
}

/// A connection over the cap: answered with an error on a thread of its own
/// (at most [`MAX_REFUSING`] at once, bounded by the handshake timeout), or
/// closed at once when even those are busy.
fn refuse<S>(stream: S, peer: String, limits: &Limits, refusing: &Arc<AtomicUsize>)
where
    S: Read + Write + Send + Sync + 'static + TryCloneStream,
{
    let msg = format!("too many connections (limit {})", limits.max_connections);
    log::warn!("nbd {peer}: refused: {msg}");
    if refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        refusing.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let refusing = refusing.clone();
    let timeout = limits.handshake_timeout;
    std::thread::spawn(move || {
        if let Ok(r) = stream.try_clone_stream() {
            if stream.set_timeouts(timeout).is_ok() {
                refuse_connection(Box::new(r), Box::new(stream), &msg);
            }
        }
        refusing.fetch_sub(1, Ordering::Relaxed);
    });
}

/// Streams that can be split into a reader and a writer, and shut down.
pub trait TryCloneStream: Sized {
    fn try_clone_stream(&self) -> std::io::Result<Self>;
    fn shut(&self, how: Shutdown) -> std::io::Result<()>;
    /// Read and write timeouts (each call, not the total).
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()>;
}
impl TryCloneStream for std::net::TcpStream {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.set_nonblocking(false)?;
        self.set_nodelay(true)?;
        self.try_clone()
    }
    fn shut(&self, how: Shutdown) -> std::io::Result<()> {
        self.shutdown(how)
    }
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}
impl TryCloneStream for UnixStream {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.set_nonblocking(false)?;
        self.try_clone()
    }
    fn shut(&self, how: Shutdown) -> std::io::Result<()> {
        self.shutdown(how)
    }
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
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
    let stop = stop_on_signals()?;
    let ctl_path = control_path(store.dir());
    let ctl = bind_unix(&ctl_path)?;
    let shared = start_shared(
        store.clone(),
        opts.default_export.clone(),
        opts.limits.clone(),
    );
    let mut threads = vec![reaper(stop.clone(), shared.clone())];
    let mut endpoints = vec![];
    let mut endpoints_extra: Vec<String> = vec![];
    if let Some(addr) = &opts.listen {
        let l = TcpListener::bind(addr).map_err(|e| Error::io(format!("listen {addr}"), e))?;
        l.set_nonblocking(true).map_err(|e| Error::io(addr, e))?;
        endpoints.push(format!(
            "nbd://{}",
            l.local_addr()
                .map(|a| a.to_string())
                .unwrap_or(addr.clone())
        ));
        threads.push(accept_loop(
            stop.clone(),
            addr.clone(),
            move || would_block(l.accept()).map(|o| o.map(|(s, a)| (s, a.to_string()))),
            shared.clone(),
        ));
    }
    if let Some(path) = &opts.socket {
        let l = bind_unix(path)?;
        endpoints.push(format!("nbd+unix:///?socket={}", path.display()));
        threads.push(accept_loop(
            stop.clone(),
            path.display().to_string(),
            move || would_block(l.accept()).map(|o| o.map(|(s, _)| (s, "unix".to_string()))),
            shared.clone(),
        ));
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
    threads.push(maintenance(stop.clone(), store.clone()));
    if let Some((addr, required)) = &opts.replication {
        match replication::listen(
            addr,
            store.clone(),
            opts.replication_cfg.clone(),
            stop.clone(),
        ) {
            Ok((bound, h)) => {
                threads.push(h);
                endpoints_extra.push(format!("replication {bound}"));
            }
            Err(e) if !required => log::warn!("{e}; replication not received"),
            Err(e) => return Err(e),
        }
    }
    if let Some(addr) = &opts.metrics {
        let sessions = shared.sessions.clone();
        threads.push(crate::metrics::serve(
            addr,
            store.clone(),
            move || sessions.count(),
            stop.clone(),
        )?);
        endpoints_extra.push(format!("http://{addr}/metrics"));
    }
    log::info!(
        "serving store {} on {}",
        store.dir().display(),
        endpoints.join(", ")
    );
    let _ = ENDPOINTS.set(endpoints.clone());
    endpoints.extend(endpoints_extra);
    ready(&endpoints);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    log::info!(
        "shutting down: draining NBD clients, unmounting, flushing store {}",
        store.dir().display()
    );
    let drained = drain(&store, &shared, threads);
    crate::fuse::unmount_all();
    let _ = std::fs::remove_file(&ctl_path);
    if let Some(p) = &opts.socket {
        let _ = std::fs::remove_file(p);
    }
    drained?;
    store.close()
}

fn control_connection(store: Arc<Store>, s: UnixStream, handler: &Handler) {
    let _ = s.set_nonblocking(false);
    let mut line = String::new();
    let mut r = BufReader::new(&s);
    let resp = match r.read_line(&mut line) {
        Ok(_) => match serde_json::from_str::<ControlRequest>(&line) {
            Ok(mut req) => {
                req.uid = peer_uid(&s);
                handler(&store, req)
            }
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
