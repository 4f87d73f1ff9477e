//! The registry of NBD sessions: every connection registers on accept and leaves
//! when its last thread is done, so the server can list its clients, enforce the
//! connection cap and the timeouts, and disconnect every client of one export
//! (failover fences a volume this way) or all of them (SIGTERM drain).
//!
//! Disconnecting is a socket shutdown, never a thread kill: the connection's
//! reader sees end of stream and stops taking requests, its workers finish what
//! was already queued (replying if the socket can still be written), and the
//! session leaves the registry only after all of that, which is what
//! [`Sessions::disconnect_export`] waits for.

use std::collections::HashMap;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::{Error, Result};

/// Shuts the connection's socket down (`Read`: stop taking requests but let
/// replies out; `Both`: drop the client).
pub type Closer = Box<dyn Fn(Shutdown) + Send + Sync>;

/// One session, as listed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: u64,
    /// Peer address (`IP:port`, `unix`, `stdio`, ...).
    pub peer: String,
    /// The export served (canonical name), once in transmission.
    pub export: Option<String>,
    pub writable: bool,
    /// Connected at, seconds since the Unix epoch.
    pub started: u64,
    /// Requests being served now.
    pub in_flight: usize,
}

/// The live state of one session, shared by its threads and the registry.
pub struct SessionState {
    id: u64,
    peer: String,
    started: u64,
    born: Instant,
    export: Mutex<Option<(String, bool)>>,
    in_flight: AtomicUsize,
    /// Milliseconds since `born` of the last request or reply.
    last_active: AtomicU64,
    closing: AtomicBool,
    closer: Closer,
}

impl SessionState {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// True once the session is being closed: its reader must stop waiting.
    pub fn closing(&self) -> &AtomicBool {
        &self.closing
    }

    /// The session entered transmission on `export`.
    pub fn set_export(&self, export: &str, writable: bool) {
        *self.export.lock().unwrap() = Some((export.to_string(), writable));
        self.touch();
    }

    pub fn export(&self) -> Option<String> {
        self.export.lock().unwrap().as_ref().map(|e| e.0.clone())
    }

    fn touch(&self) {
        self.last_active
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// A request was taken off the socket.
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    /// A request was answered (or failed).
    pub fn request_done(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }

    /// Shut the socket down (idempotent).
    pub fn close(&self, how: Shutdown) {
        self.closing.store(true, Ordering::Relaxed);
        (self.closer)(how);
    }

    fn info(&self) -> SessionInfo {
        let e = self.export.lock().unwrap().clone();
        SessionInfo {
            id: self.id,
            peer: self.peer.clone(),
            writable: e.as_ref().is_some_and(|e| e.1),
            export: e.map(|e| e.0),
            started: self.started,
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }

    /// Idle for: time since the last request or reply, if nothing is in flight.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) != 0 {
            return None;
        }
        let now = self.born.elapsed().as_millis() as u64;
        Some(Duration::from_millis(
            now.saturating_sub(self.last_active.load(Ordering::Relaxed)),
        ))
    }
}

/// Every live session of one server.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<u64, Arc<SessionState>>>,
    gone: Condvar,
    next: AtomicU64,
}

/// A registered session; dropping it unregisters (and wakes waiters).
pub struct Session {
    sessions: Arc<Sessions>,
    state: Arc<SessionState>,
}

impl Session {
    /// The shared state, for threads that outlive a borrow of the guard.
    pub fn state(&self) -> &Arc<SessionState> {
        &self.state
    }
}

impl std::ops::Deref for Session {
    type Target = SessionState;
    fn deref(&self) -> &SessionState {
        &self.state
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.sessions.map.lock().unwrap().remove(&self.state.id);
        self.sessions.gone.notify_all();
    }
}

impl Sessions {
    pub fn new() -> Arc<Sessions> {
        Arc::new(Sessions::default())
    }

    /// Register a new connection from `peer`; `closer` shuts its socket down.
    pub fn register(self: &Arc<Self>, peer: &str, closer: Closer) -> Session {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let state = Arc::new(SessionState {
            id,
            peer: peer.to_string(),
            started: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            born: Instant::now(),
            export: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            last_active: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            closer,
        });
        self.map.lock().unwrap().insert(id, state.clone());
        Session {
            sessions: self.clone(),
            state,
        }
    }

    /// Live sessions (handshake and transmission).
    pub fn count(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    /// Every live session, oldest first.
    pub fn list(&self) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = self
            .map
            .lock()
            .unwrap()
            .values()
            .map(|s| s.info())
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    fn matching(&self, pred: impl Fn(&SessionState) -> bool) -> Vec<Arc<SessionState>> {
        self.map
            .lock()
            .unwrap()
            .values()
            .filter(|s| pred(s))
            .cloned()
            .collect()
    }

    /// Wait until none of `ids` is registered; false if `timeout` passed first.
    pub fn wait_gone(&self, ids: &[u64], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut map = self.map.lock().unwrap();
        while ids.iter().any(|id| map.contains_key(id)) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            map = self.gone.wait_timeout(map, deadline - now).unwrap().0;
        }
        true
    }

    /// Disconnect every client of `export` (canonical name, e.g. `g/d` or
    /// `g/d@3`) and wait up to `timeout` until their connections are gone, in-flight
    /// requests finished or failed.  Returns how many were disconnected.
    ///
    /// New connections to the export are not refused by this: a caller that
    /// fences the export (failover) must stop those too.
    ///
    /// Errors: `Busy` if some are still there after `timeout` (their sockets are
    /// shut down; a request stuck in the engine holds them).
    pub fn disconnect_export(&self, export: &str, timeout: Duration) -> Result<usize> {
        let victims = self.matching(|s| s.export().as_deref() == Some(export));
        for s in &victims {
            log::info!(
                "nbd session {} ({}): disconnecting from {export}",
                s.id,
                s.peer
            );
            s.close(Shutdown::Both);
        }
        let ids: Vec<u64> = victims.iter().map(|s| s.id).collect();
        if self.wait_gone(&ids, timeout) {
            Ok(ids.len())
        } else {
            Err(Error::Busy(format!(
                "{export} (clients still connected {} ms after their disconnect)",
                timeout.as_millis()
            )))
        }
    }

    /// Drain: stop every session from taking requests (sessions in transmission
    /// still send the replies of what they took; sessions in handshake are
    /// dropped), wait up to `grace` for them to finish, then drop whatever is left
    /// and wait up to `grace` again.  Returns true if every session is gone.
    pub fn drain(&self, grace: Duration) -> bool {
        let all = self.matching(|_| true);
        for s in &all {
            let how = if s.export().is_some() {
                Shutdown::Read
            } else {
                Shutdown::Both
            };
            s.close(how);
        }
        let ids: Vec<u64> = all.iter().map(|s| s.id).collect();
        if self.wait_gone(&ids, grace) {
            return true;
        }
        let left = self.matching(|_| true);
        log::warn!(
            "{} NBD sessions still busy after {} s: dropping them",
            left.len(),
            grace.as_secs()
        );
        for s in &left {
            s.close(Shutdown::Both);
        }
        let ids: Vec<u64> = left.iter().map(|s| s.id).collect();
        self.wait_gone(&ids, grace)
    }

    /// Drop sessions past a deadline: still negotiating after `handshake`, or in
    /// transmission with nothing in flight for `idle` (if set).  Returns how many.
    pub fn reap(&self, handshake: Duration, idle: Option<Duration>) -> usize {
        let late = self.matching(|s| {
            if s.closing.load(Ordering::Relaxed) {
                return false;
            }
            match s.export() {
                None => s.born.elapsed() > handshake,
                Some(_) => idle.is_some_and(|t| s.idle_for().is_some_and(|i| i > t)),
            }
        });
        for s in &late {
            match s.export() {
                None => log::warn!(
                    "nbd session {} ({}): no export chosen after {} s: dropped",
                    s.id,
                    s.peer,
                    handshake.as_secs()
                ),
                Some(e) => log::info!(
                    "nbd session {} ({}): idle on {e} for over {} s: dropped",
                    s.id,
                    s.peer,
                    idle.unwrap_or_default().as_secs()
                ),
            }
            s.close(Shutdown::Both);
        }
        late.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counting_closer(n: &Arc<AtomicUsize>) -> Closer {
        let n = n.clone();
        Box::new(move |_| {
            n.fetch_add(1, Ordering::Relaxed);
        })
    }

    #[test]
    fn disconnect_export_closes_only_its_clients_and_waits_for_them() {
        let reg = Sessions::new();
        let closed = Arc::new(AtomicUsize::new(0));
        let a = reg.register("a", counting_closer(&closed));
        a.set_export("g/d", true);
        let b = reg.register("b", counting_closer(&closed));
        b.set_export("g/e", true);
        let _c = reg.register("c", counting_closer(&closed));
        assert_eq!(reg.count(), 3);
        let l = reg.list();
        assert_eq!(l[0].export.as_deref(), Some("g/d"));
        assert_eq!(l[2].export, None);
        // `a` leaves only when its "threads" are done.
        let t = std::thread::spawn(move || {
            while !a.closing().load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(a);
        });
        assert_eq!(
            reg.disconnect_export("g/d", Duration::from_secs(10))
                .unwrap(),
            1
        );
        t.join().unwrap();
        assert_eq!(closed.load(Ordering::Relaxed), 1);
        assert_eq!(reg.count(), 2);
        assert_eq!(
            reg.disconnect_export("g/x", Duration::from_secs(1))
                .unwrap(),
            0
        );
        // A client that never leaves: Busy, after its socket was shut down.
        let e = reg
            .disconnect_export("g/e", Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(e, Error::Busy(_)), "{e}");
        assert!(b.closing().load(Ordering::Relaxed));
    }

    #[test]
    fn reap_drops_slow_handshakes_and_idle_clients_only_when_asked() {
        let reg = Sessions::new();
        let closed = Arc::new(AtomicUsize::new(0));
        let hs = reg.register("hs", counting_closer(&closed));
        let idle = reg.register("idle", counting_closer(&closed));
        idle.set_export("g/d", true);
        let busy = reg.register("busy", counting_closer(&closed));
        busy.set_export("g/d", true);
        busy.request_started();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(reg.reap(Duration::from_secs(60), None), 0);
        assert_eq!(reg.reap(Duration::from_millis(10), None), 1);
        assert!(hs.closing().load(Ordering::Relaxed));
        assert_eq!(
            reg.reap(Duration::from_secs(60), Some(Duration::from_millis(10))),
            1
        );
        assert!(idle.closing().load(Ordering::Relaxed));
        assert!(!busy.closing().load(Ordering::Relaxed));
        busy.request_done();
        assert_eq!(closed.load(Ordering::Relaxed), 2);
    }
}
