//! Resource limits of the NBD server: what one client, and all clients together,
//! can make the server hold, whatever they send.
//!
//! | bound                                 | default            | set by                         |
//! |---------------------------------------|--------------------|--------------------------------|
//! | request payloads in flight, per conn  | 64 MiB             | `DRCLONE_NBD_CONN_MIB`         |
//! | request payloads in flight, in total  | 512 MiB            | `DRCLONE_NBD_TOTAL_MIB`        |
//! | one READ/WRITE payload                | 32 MiB             | [`MAX_PAYLOAD`] (advertised)   |
//! | queued requests per connection        | 64                 | [`QUEUE_DEPTH`]                |
//! | idle read buffers kept for reuse      | 32 MiB in total    | [`BufPool`]                    |
//! | connections (handshake + transmission)| 512                | `serve --max-connections`      |
//! | refused connections answered at once  | 64 (others closed) | [`MAX_REFUSING`]               |
//! | handshake (greeting to GO)            | 30 s               | `serve --handshake-timeout`    |
//! | idle transmission (nothing in flight) | off                | `serve --idle-timeout`         |
//!
//! A payload is a WRITE's data or a READ's reply buffer.  The connection's reader
//! takes a [`Lease`] of the payload's size from its connection's [`Budget`], then
//! from the global one, before it allocates or reads a byte of it; the worker that
//! serves the request drops the lease after the reply is sent.  While a budget is
//! spent the reader simply stops reading the socket (back-pressure through TCP);
//! an accepted request is never dropped.  So payload memory is at most
//! min(connections x 64 MiB, 512 MiB) (plus one request per connection when a
//! single payload is larger than what is left, never more than the limit itself).
//!
//! Other memory per connection is fixed and small: a 16 KiB read buffer, a 64 KiB
//! reply buffer, and its threads (a reader and [`super::server`]'s workers).
//!
//! Known limit: a client that sends READs and never reads the replies keeps its
//! leases (its workers block writing to the socket), so eight such clients hold
//! the whole global budget and stall everyone's large requests until they are
//! disconnected (`--idle-timeout` does not catch them: they have requests in
//! flight).  No socket write timeout is set by default, because a paused VM must
//! not lose its disk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::proto::MAX_PAYLOAD;

/// Requests a connection's reader may queue for its workers.
pub const QUEUE_DEPTH: usize = 64;
/// Connections over the cap that are answered (with an error) at once; more are
/// closed without a word.
pub const MAX_REFUSING: usize = 64;
/// Most options a refused client gets an error reply to before it is closed.
pub const MAX_REFUSED_OPTIONS: usize = 16;

const MIB: u64 = 1 << 20;

/// The server's limits.  [`Limits::default`] reads the environment.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Payload bytes in flight per connection (at least [`MAX_PAYLOAD`]).
    pub conn_bytes: u64,
    /// Payload bytes in flight over all connections (at least [`MAX_PAYLOAD`]).
    pub total_bytes: u64,
    /// Connections served at once (handshake or transmission); more are refused.
    pub max_connections: usize,
    /// A client that has not entered transmission after this long is dropped.
    pub handshake_timeout: Duration,
    /// A client in transmission with nothing in flight for this long is dropped
    /// (None: never; an idle VM must not lose its disk).
    pub idle_timeout: Option<Duration>,
}

fn env_mib(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|m| m * MIB)
        .unwrap_or(default)
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            conn_bytes: env_mib("DRCLONE_NBD_CONN_MIB", 64 * MIB),
            total_bytes: env_mib("DRCLONE_NBD_TOTAL_MIB", 512 * MIB),
            max_connections: 512,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: None,
        }
    }
}

/// A byte budget shared by the requests that hold a [`Lease`] of it.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    /// (bytes leased, threads waiting).
    used: Mutex<(u64, usize)>,
    freed: Condvar,
}

/// Bytes of a [`Budget`], given back on drop.
#[derive(Debug)]
pub struct Lease {
    budget: Option<Arc<Budget>>,
    bytes: u64,
}

impl Lease {
    /// A lease of nothing.
    pub fn none() -> Lease {
        Lease {
            budget: None,
            bytes: 0,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            let mut g = b.used.lock().unwrap();
            g.0 -= self.bytes;
            // Only wake when someone waits: a wake-up is a syscall per request.
            if g.1 > 0 {
                b.freed.notify_all();
            }
        }
    }
}

impl Budget {
    /// A budget of `limit` bytes (raised to [`MAX_PAYLOAD`], so that every legal
    /// request fits on its own).
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit: limit.max(MAX_PAYLOAD as u64),
            used: Mutex::new((0, 0)),
            freed: Condvar::new(),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes leased now.
    pub fn used(&self) -> u64 {
        self.used.lock().unwrap().0
    }

    /// Wait until `bytes` fit, then lease them.  Returns None if `cancel` became
    /// true first (the connection is being closed).  `bytes` over the limit are
    /// clamped to it.
    pub fn acquire(self: &Arc<Self>, bytes: u64, cancel: &AtomicBool) -> Option<Lease> {
        let bytes = bytes.min(self.limit);
        if bytes == 0 {
            return Some(Lease::none());
        }
        let mut g = self.used.lock().unwrap();
        while g.0 + bytes > self.limit {
            if cancel.load(Ordering::Relaxed) {
                return None;
            }
            g.1 += 1;
            g = self
                .freed
                .wait_timeout(g, Duration::from_millis(100))
                .unwrap()
                .0;
            g.1 -= 1;
        }
        g.0 += bytes;
        Some(Lease {
            budget: Some(self.clone()),
            bytes,
        })
    }
}

/// Reply buffers for READs up to [`BufPool::MAX_BUF`], reused across requests and
/// connections so that a read neither allocates nor zeroes fresh memory; at most
/// [`BufPool::MAX_RETAINED`] bytes are kept while idle.
#[derive(Debug, Default)]
pub struct BufPool {
    bufs: Mutex<(Vec<Vec<u8>>, usize)>,
}

impl BufPool {
    /// Larger reads get a buffer of their own (their lease bounds them).
    pub const MAX_BUF: usize = 4 << 20;
    /// Idle bytes kept, over all buffers.
    pub const MAX_RETAINED: usize = 32 << 20;

    /// A zero-initialised (or reused) buffer of exactly `len` bytes.
    pub fn take(&self, len: usize) -> Vec<u8> {
        if len <= Self::MAX_BUF {
            let mut g = self.bufs.lock().unwrap();
            if let Some(i) = g.0.iter().rposition(|b| b.capacity() >= len) {
                let mut b = g.0.swap_remove(i);
                g.1 -= b.capacity();
                drop(g);
                // Reused bytes are overwritten by the read; only growth is zeroed.
                b.resize(len, 0);
                return b;
            }
        }
        vec![0u8; len]
    }

    /// Give a buffer back (kept if it is small and there is room).
    pub fn give(&self, b: Vec<u8>) {
        if b.capacity() > Self::MAX_BUF {
            return;
        }
        let mut g = self.bufs.lock().unwrap();
        if g.1 + b.capacity() <= Self::MAX_RETAINED {
            g.1 += b.capacity();
            g.0.push(b);
        }
    }

    /// Idle bytes kept now.
    pub fn retained(&self) -> usize {
        self.bufs.lock().unwrap().1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_blocks_until_a_lease_is_dropped_and_cancel_wins() {
        let b = Budget::new(64 << 20);
        let no = AtomicBool::new(false);
        let a = b.acquire(32 << 20, &no).unwrap();
        let c = b.acquire(32 << 20, &no).unwrap();
        assert_eq!(b.used(), 64 << 20);
        let b2 = b.clone();
        let t = std::thread::spawn(move || {
            let no = AtomicBool::new(false);
            b2.acquire(1 << 20, &no).map(|l| l.bytes)
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished());
        drop(a);
        assert_eq!(t.join().unwrap(), Some(1 << 20));
        let yes = AtomicBool::new(true);
        assert!(b.acquire(40 << 20, &yes).is_none());
        drop(c);
        assert_eq!(b.used(), 0);
        // Over the limit is clamped, not refused; zero is free.
        assert_eq!(b.acquire(u64::MAX, &no).unwrap().bytes, 64 << 20);
        assert_eq!(b.acquire(0, &yes).unwrap().bytes, 0);
        assert_eq!(Budget::new(1).limit(), MAX_PAYLOAD as u64);
    }

    #[test]
    fn pool_reuses_and_bounds_what_it_keeps() {
        let p = BufPool::default();
        let mut v = p.take(4096);
        v[0] = 7;
        p.give(v);
        assert_eq!(p.retained(), 4096);
        let v = p.take(100);
        assert_eq!(v.len(), 100);
        assert_eq!(p.retained(), 0);
        p.give(v);
        for _ in 0..20 {
            p.give(vec![0u8; BufPool::MAX_BUF]);
        }
        assert!(p.retained() <= BufPool::MAX_RETAINED);
        p.give(vec![0u8; BufPool::MAX_BUF + 1]);
        assert!(p.retained() <= BufPool::MAX_RETAINED);
        assert_eq!(p.take(BufPool::MAX_BUF + 1).len(), BufPool::MAX_BUF + 1);
    }
}
