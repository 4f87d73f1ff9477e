//! The replication listener of `serve` (`--replication-listen`): one thread
//! per agent connection, each a [`crate::repl::receiver`] session.  A session
//! that fails (bad input, a refusal, a dropped agent) ends alone; the daemon
//! goes on serving everyone else.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::repl::link::Stream;
use crate::repl::receiver::{self, Config};
use crate::Store;

/// An agent silent this long is dropped (its cycle leaves no point).
pub const IDLE: Duration = Duration::from_secs(300);
/// A connection must finish its TLS handshake and HELLO within this.
pub const HANDSHAKE: Duration = Duration::from_secs(30);

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
    let h = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, peer)) => {
                    let (store, cfg) = (store.clone(), cfg.clone());
                    std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(HANDSHAKE));
                        let _ = s.set_nodelay(true);
                        let peer = peer.to_string();
                        // A clone shares the socket: its timeout moves to IDLE once
                        // the TLS handshake is done.
                        let raw = s.try_clone();
                        let s: Box<dyn Stream> = match &cfg.tls {
                            Some(tls) => match tls.accept(s) {
                                Ok(s) => s,
                                Err(e) => {
                                    log::warn!("replication from {peer}: {e}");
                                    return;
                                }
                            },
                            None => Box::new(s),
                        };
                        if let Ok(r) = raw {
                            let _ = r.set_read_timeout(Some(IDLE));
                        }
                        match receiver::serve_connection(&store, s, &peer, &cfg) {
                            Ok(()) => log::info!("replication from {peer}: session ended"),
                            Err(e) => log::warn!("replication from {peer}: session failed: {e}"),
                        }
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => log::warn!("replication listener: {e}"),
            }
        }
    });
    Ok((bound, h))
}
