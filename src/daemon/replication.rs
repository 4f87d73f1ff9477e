//! The replication listener of `serve` (`--replication-listen`): one thread
//! per agent connection, each a [`crate::repl::receiver`] session.  A session
//! that fails (bad input, a refusal, a dropped agent) ends alone; the daemon
//! goes on serving everyone else.
//!
//! Bounds against peers that connect and stall (found by
//! tests/breakit_repl.rs: 500 silent connections held 500 threads, and a peer
//! sending a byte every few seconds held one for ever): a connection must
//! finish its handshakes (TLS, drclone's, HELLO) within [`HANDSHAKE`] in all;
//! at most [`MAX_PENDING`] connections are in their handshakes at once and at
//! most [`MAX_CONNECTIONS`] open, and a connection beyond either is closed as
//! it arrives.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::repl::link::Stream;
use crate::repl::receiver::{self, Config};
use crate::Store;

/// An agent silent this long is dropped (its cycle leaves no point); so is
/// one that reads nothing this long while the receiver writes to it.
pub const IDLE: Duration = Duration::from_secs(300);
/// A connection must finish its TLS handshake, drclone's handshake and HELLO
/// within this, in all.
pub const HANDSHAKE: Duration = Duration::from_secs(30);
/// Connections in their handshakes (not yet answered HELLO) at most at once.
pub const MAX_PENDING: usize = 64;
/// Open replication connections at most at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// One place in a count of connections, given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(count: &Arc<AtomicUsize>) -> Slot {
        count.fetch_add(1, Ordering::SeqCst);
        Slot(count.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection's stream while it may still be in its handshakes: every read
/// must end by the deadline, until the receiver has written more than its
/// 12-byte handshake (what follows answers HELLO: WELCOME or ERROR).  Then
/// reads wait at most [`IDLE`] each, and the connection's pending slot is
/// given back.
struct Handshaking {
    s: Box<dyn Stream>,
    /// The socket under `s` (TLS or not), to set its read timeout.
    raw: TcpStream,
    deadline: Option<Instant>,
    written: u64,
    pending: Option<Slot>,
}

impl Read for Handshaking {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the handshake and HELLO took more than {} s",
                        HANDSHAKE.as_secs()
                    ),
                ));
            }
            self.raw.set_read_timeout(Some(left))?;
        }
        self.s.read(b)
    }
}

impl Write for Handshaking {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.s.write(b)?;
        self.written += n as u64;
        if self.deadline.is_some() && self.written > 12 {
            self.deadline = None;
            self.pending = None;
            self.raw.set_read_timeout(Some(IDLE))?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

impl receiver::Conn for Handshaking {
    fn socket_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.raw.as_raw_fd())
    }
}

/// Serve one accepted connection (its own thread).
fn serve(store: &Store, cfg: &Config, s: TcpStream, peer: &str, pending: Slot) {
    let deadline = Instant::now() + HANDSHAKE;
    let _ = s.set_nonblocking(false);
    let _ = s.set_nodelay(true);
    let _ = s.set_write_timeout(Some(IDLE));
    // A clone shares the socket: the deadline and IDLE are set through it.
    let raw = match s.try_clone() {
        Ok(r) => r,
        Err(e) => {
            log::warn!("replication from {peer}: {e}");
            return;
        }
    };
    let s: Box<dyn Stream> = match &cfg.tls {
        Some(tls) => match tls.accept(s, deadline) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("replication from {peer}: {e}");
                return;
            }
        },
        None => Box::new(s),
    };
    let s = Handshaking {
        s,
        raw,
        deadline: Some(deadline),
        written: 0,
        pending: Some(pending),
    };
    match receiver::serve_connection(store, s, peer, cfg) {
        Ok(()) => log::info!("replication from {peer}: session ended"),
        Err(e) => log::warn!("replication from {peer}: session failed: {e}"),
    }
}

/// Listen on `addr` until `stop`.  Errors: binding `addr`.
pub fn listen(
    addr: &str,
    store: Arc<Store>,
    cfg: Config,
    stop: Arc<AtomicBool>,
) -> Result<(String, JoinHandle<()>)> {
    let l =
        TcpListener::bind(addr).map_err(|e| Error::io(format!("replication listen {addr}"), e))?;
    l.set_nonblocking(true).map_err(|e| Error::io(addr, e))?;
    let bound = l
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| addr.to_string());
    log::info!("replication receiver on {bound}");
    let cfg = Arc::new(cfg);
    let pending = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let h = std::thread::spawn(move || {
        // When a connection was last turned away (warned once a minute).
        let mut last_full: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, peer)) => {
                    let (p, o) = (pending.load(Ordering::SeqCst), open.load(Ordering::SeqCst));
                    if p >= MAX_PENDING || o >= MAX_CONNECTIONS {
                        if last_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                            log::warn!(
                                "replication listener: {p} connection(s) in their handshakes \
                                 and {o} open (at most {MAX_PENDING} and {MAX_CONNECTIONS}): \
                                 closing new ones, {peer} first"
                            );
                            last_full = Some(Instant::now());
                        }
                        drop(s);
                        continue;
                    }
                    let (store, cfg) = (store.clone(), cfg.clone());
                    let (ps, os) = (Slot::take(&pending), Slot::take(&open));
                    let peer = peer.to_string();
                    let spawned = std::thread::Builder::new()
                        .name("replication".into())
                        .spawn(move || {
                            let _open = os;
                            serve(&store, &cfg, s, &peer, ps);
                        });
                    if let Err(e) = spawned {
                        // The closure, its socket and slots are dropped with it.
                        log::warn!("replication listener: no thread for a connection: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => {
                    log::warn!("replication listener: {e}");
                    // EMFILE and the like: do not spin.
                    std::thread::sleep(Duration::from_millis(20))
                }
            }
        }
    });
    Ok((bound, h))
}
