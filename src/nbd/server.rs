//! The NBD server: maps NBD requests onto the engine.  Protocol encoding lives in
//! [`super::proto`]; this module owns connections, option negotiation and the
//! concurrent request loop.
//!
//! Each connection has one reader (the accepting thread), a pool of workers that
//! serve requests concurrently, and one writer lock through which every reply goes
//! whole, so replies may leave out of order (NBD allows it; nbdcopy keeps 64
//! requests in flight).  FLUSH and FUA call [`Store::flush`], which makes every
//! write any connection has completed durable: that is what `CAN_MULTI_CONN`
//! promises.
//!
//! Memory and time are bounded by [`super::limits`]: the reader leases a
//! payload's bytes from its connection's and the server's budget before it reads
//! or allocates them, and every connection is a [`Session`] in the server's
//! registry, through which it can be disconnected.

use std::io::{BufReader, BufWriter, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use super::limits::{Budget, BufPool, Lease, Limits, MAX_REFUSED_OPTIONS, QUEUE_DEPTH};
use super::proto::*;
use super::sessions::{Session, SessionState, Sessions};
use crate::engine::store::{Block, Store, View};
use crate::error::Error;

/// Worker threads per connection: `DRCLONE_NBD_WORKERS`, default twice the cores
/// (at least 4, at most 16).  More threads than that only add wake-ups when the
/// data is cached; fewer would cap the preads in flight when it is not.
fn workers_per_connection() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("DRCLONE_NBD_WORKERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| (1..=64).contains(n))
            .unwrap_or_else(|| {
                let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
                (cores * 2).clamp(4, 16)
            })
    })
}
/// What every connection of one server shares: the store, the limits, the
/// global payload budget, the reply-buffer pool and the session registry.
pub struct Shared {
    pub store: Arc<Store>,
    /// What the empty export name means (None: it is refused).
    pub default_export: Option<String>,
    pub limits: Limits,
    pub sessions: Arc<Sessions>,
    budget: Arc<Budget>,
    bufs: BufPool,
}

impl Shared {
    pub fn new(store: Arc<Store>, default_export: Option<String>, limits: Limits) -> Arc<Shared> {
        Arc::new(Shared {
            store,
            default_export,
            budget: Budget::new(limits.total_bytes),
            limits,
            sessions: Sessions::new(),
            bufs: BufPool::default(),
        })
    }

    /// Payload bytes leased by all connections now.
    pub fn budget_used(&self) -> u64 {
        self.budget.used()
    }
}

/// Export names: heads as `GROUP/DISK`, points as `GROUP/DISK@ID`.
pub fn export_names(store: &Store) -> crate::Result<Vec<String>> {
    let mut names: Vec<String> = store
        .volumes(None)?
        .into_iter()
        .map(|v| format!("{}/{}", v.group, v.disk))
        .collect();
    for p in store.all_points()? {
        for v in &p.volumes {
            names.push(format!("{}/{}@{}", p.group, v.disk, p.id));
        }
    }
    Ok(names)
}

/// The transmission flags announced for `view`, on every path (`NBD_OPT_INFO`,
/// `NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`):
///
/// - always: `HAS_FLAGS`, `SEND_FLUSH`, `SEND_FUA`, `CAN_MULTI_CONN` (FLUSH makes
///   every connection's completed writes durable), `SEND_CACHE`;
/// - writable views: `SEND_TRIM`, `SEND_WRITE_ZEROES`, `SEND_FAST_ZERO` (zeroing
///   is a metadata operation, so it is always fast); points: `READ_ONLY`;
/// - `SEND_DF` only once structured replies are negotiated: the spec says the
///   server "MUST leave this flag clear if structured replies have not been
///   negotiated".  A client may negotiate them before `NBD_OPT_EXPORT_NAME` too;
///   then DF is announced there as well, as qemu-nbd and nbdkit do.
///
/// Never: `ROTATIONAL`, `SEND_RESIZE`, `BLOCK_STATUS_PAYLOAD` (extended headers).
fn transmission_flags(view: &View, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
    if structured {
        f |= TF_SEND_DF;
    }
    if view.writable {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    } else {
        f |= TF_READ_ONLY;
    }
    f
}

/// Map an engine error onto an NBD error number (only legal values).
pub fn nbd_errno(e: &Error) -> u32 {
    match e.kind().errno() {
        libc::EPERM => EPERM,
        libc::ENOSPC => ENOSPC,
        libc::EINVAL => EINVAL,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        libc::ENOMEM => ENOMEM,
        _ => EIO,
    }
}

struct Conn {
    shared: Arc<Shared>,
    store: Arc<Store>,
    session: Arc<SessionState>,
    /// The lease on the served view, taken before the client is told it may use
    /// the export (so removal is refused from then on, and the session registry
    /// names the export before the client can send a request: failover's
    /// disconnect-by-export never misses a client that just connected).
    lease: Option<crate::engine::store::Lease>,
    structured: bool,
    /// The export (canonical name) the last `NBD_OPT_SET_META_CONTEXT` selected
    /// `base:allocation` for; BLOCK_STATUS is allowed only if it is the one served.
    meta_context: Option<String>,
    no_zeroes: bool,
    /// Transmission flags announced for the served export (set on entering
    /// transmission); command flags are checked against them.
    tflags: u16,
}

type Writer = Arc<Mutex<BufWriter<Box<dyn Write + Send>>>>;

/// A request on its way to a worker, with the budget it holds.
struct Job {
    req: Request,
    payload: Vec<u8>,
    /// (this connection's lease, the server's lease) of the payload's bytes.
    lease: (Lease, Lease),
}

/// `Write::write_all_vectored` (not stable yet): writev until everything is out.
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A write's payload: what the reader has buffered, then the rest straight from
/// the socket into fresh capacity (no zeroing, no copy through the buffer).
fn read_payload<R: Read>(r: &mut BufReader<R>, len: usize) -> std::io::Result<Vec<u8>> {
    use std::io::BufRead;
    let mut payload = Vec::with_capacity(len);
    let buffered = r.buffer();
    let n = buffered.len().min(len);
    payload.extend_from_slice(&buffered[..n]);
    r.consume(n);
    let got = r
        .get_mut()
        .take((len - n) as u64)
        .read_to_end(&mut payload)?;
    if n + got != len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(payload)
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<()> {
    r.read_exact(buf)
}

/// Serve one client to completion on a server of its own (default [`Limits`], a
/// registry of one): the captive `serve --stdio` case and in-process tests.
///
/// `default_export` is what the empty export name means (none: it is refused).
pub fn serve_connection(
    store: Arc<Store>,
    reader: Box<dyn Read + Send>,
    writer: Box<dyn Write + Send>,
    peer: &str,
    default_export: Option<&str>,
) {
    let shared = Shared::new(store, default_export.map(str::to_string), Limits::default());
    let session = shared.sessions.register(peer, Box::new(|_| {}));
    serve_session(&shared, reader, writer, &session);
}

/// Serve one registered client to completion.  Errors are logged, never
/// propagated: a bad client only ever loses its own connection.
pub fn serve_session(
    shared: &Arc<Shared>,
    reader: Box<dyn Read + Send>,
    writer: Box<dyn Write + Send>,
    session: &Session,
) {
    let peer = format!("{} (session {})", session.peer(), session.id());
    // Small: it batches request headers and small writes; large payloads bypass it.
    let mut r = BufReader::with_capacity(16 << 10, reader);
    // Small too: READ data bypasses it (writev), so it only holds reply headers.
    let w: Writer = Arc::new(Mutex::new(BufWriter::with_capacity(64 << 10, writer)));
    let mut c = Conn {
        shared: shared.clone(),
        store: shared.store.clone(),
        session: session.state().clone(),
        lease: None,
        structured: false,
        meta_context: None,
        no_zeroes: false,
        tflags: 0,
    };
    match c.negotiate(&mut r, &w) {
        Ok(Some(view)) => {
            // The lease the negotiation took (Conn::take) is held until the
            // connection ends: removing the view is refused meanwhile (I8).
            log::info!("nbd {peer}: serving {}", view.name);
            if let Err(e) = c.transmit(&mut r, &w, view) {
                log::info!("nbd {peer}: connection ended: {e}");
            }
        }
        Ok(None) => log::debug!("nbd {peer}: client left during negotiation"),
        Err(e) => log::info!("nbd {peer}: negotiation failed: {e}"),
    }
    let _ = w.lock().unwrap().flush();
    // Every request is answered: close the socket now, not when the last handle
    // to it goes (the registry holds one to shut it down).
    session.close(std::net::Shutdown::Both);
}

/// Answer a client the server cannot take (over `serve --max-connections`): greet
/// it, then fail every option with `NBD_REP_ERR_POLICY` and `msg` (the spec's
/// "known ... but server-side policy forbids" error; the server "MUST simply
/// error inbound options until the client gets the hint"), so that nbdinfo and
/// qemu show the message, until the client aborts or leaves, or after
/// [`MAX_REFUSED_OPTIONS`] options.  `NBD_OPT_EXPORT_NAME` cannot carry an
/// error: it is answered by closing.  The caller bounds the time (socket
/// timeouts).
pub fn refuse_connection(
    reader: Box<dyn Read + Send>,
    mut writer: Box<dyn Write + Send>,
    msg: &str,
) {
    let mut r = BufReader::with_capacity(4096, reader);
    let mut go = || -> std::io::Result<()> {
        writer.write_all(&greeting())?;
        let mut cf = [0u8; 4];
        r.read_exact(&mut cf)?;
        client_flags(&cf).map_err(|e| std::io::Error::other(e.0))?;
        for _ in 0..MAX_REFUSED_OPTIONS {
            let mut h = [0u8; 16];
            r.read_exact(&mut h)?;
            let (opt, len) = option_header(&h).map_err(|e| std::io::Error::other(e.0))?;
            if len > MAX_OPTION_LEN {
                return Ok(());
            }
            std::io::copy(&mut (&mut r).take(len as u64), &mut std::io::sink())?;
            match opt {
                OPT_EXPORT_NAME => return Ok(()),
                OPT_ABORT => {
                    writer.write_all(&option_reply(opt, REP_ACK, &[]))?;
                    return Ok(());
                }
                _ => writer.write_all(&option_reply(opt, REP_ERR_POLICY, msg.as_bytes()))?,
            }
            writer.flush()?;
        }
        Ok(())
    };
    let _ = go();
}

impl Conn {
    fn send(&self, w: &Writer, bytes: &[u8]) -> std::io::Result<()> {
        let mut g = w.lock().unwrap();
        g.write_all(bytes)?;
        g.flush()
    }

    fn resolve(&self, name: &str) -> Result<View, String> {
        let name = match (name, &self.shared.default_export) {
            ("", Some(d)) => d.as_str(),
            ("", None) => {
                return Err("no default export: name one of the exports (nbdinfo --list)".into())
            }
            (n, _) => n,
        };
        self.store.view_ref(name).map_err(|e| e.to_string())
    }

    /// Lease `view` for this connection and name it in the session registry
    /// (invariant I8); fails if the view was removed since it was resolved.
    /// Lease the view for this session.  Errors: (option reply error, text):
    /// `NBD_REP_ERR_POLICY` when another writer holds it, else `UNKNOWN` (it
    /// was removed while being opened).
    fn take(&mut self, view: View) -> Result<View, (u32, String)> {
        let name = view.name.clone();
        let lease = self
            .store
            .lease_if(
                &view,
                &format!(
                    "nbd {} (session {})",
                    self.session.peer(),
                    self.session.id()
                ),
                |users| match crate::repl::exclusive_writer(users) {
                    // A replication cycle writes this head, or a planned failback
                    // fenced it: one writer at a time.
                    Some(u) if view.writable => Err(crate::Error::Busy(format!(
                        "{name} is being written by {u}; a volume takes one writer at a time"
                    ))),
                    _ => Ok(()),
                },
            )
            .map_err(|e| {
                let code = match e {
                    crate::Error::Busy(_) => REP_ERR_POLICY,
                    _ => REP_ERR_UNKNOWN,
                };
                (code, e.to_string())
            })?;
        self.lease = Some(lease);
        self.session.set_export(&view.name, view.writable);
        Ok(view)
    }

    fn opt_error(&self, w: &Writer, opt: u32, typ: u32, msg: &str) -> std::io::Result<()> {
        self.send(w, &option_reply(opt, typ, msg.as_bytes()))
    }

    /// Option haggling.  Returns the export to serve, or None if the client left.
    fn negotiate(&mut self, r: &mut impl Read, w: &Writer) -> std::io::Result<Option<View>> {
        self.send(w, &greeting())?;
        let mut cf = [0u8; 4];
        read_exact(r, &mut cf)?;
        // Unknown client flags: "the server MUST drop the TCP connection".
        let cflags = client_flags(&cf).map_err(|e| std::io::Error::other(e.0))?;
        self.no_zeroes = cflags.no_zeroes;
        loop {
            let mut h = [0u8; 16];
            if let Err(e) = read_exact(r, &mut h) {
                return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Ok(None)
                } else {
                    Err(e)
                };
            }
            let (opt, len) = option_header(&h).map_err(|e| std::io::Error::other(e.0))?;
            if len > MAX_OPTION_LEN {
                // Too big to be honest; the spec lets us drop such a client.
                return Err(std::io::Error::other(format!(
                    "option {opt} of {len} bytes is too large"
                )));
            }
            let mut data = vec![0u8; len as usize];
            read_exact(r, &mut data)?;
            match opt {
                OPT_EXPORT_NAME => {
                    // EXPORT_NAME has no error reply: a bad name closes.
                    let name = parse_export_name(&data)
                        .map_err(|e| std::io::Error::other(format!("export name: {}", e.0)))?;
                    return match self
                        .resolve(&name)
                        .and_then(|v| self.take(v).map_err(|e| e.1))
                    {
                        Ok(view) => {
                            self.tflags = transmission_flags(&view, self.structured);
                            self.send(
                                w,
                                &export_name_reply(view.size, self.tflags, self.no_zeroes),
                            )?;
                            Ok(Some(view))
                        }
                        // EXPORT_NAME has no error reply: the server closes.
                        Err(e) => Err(std::io::Error::other(format!("export {name:?}: {e}"))),
                    };
                }
                OPT_ABORT => {
                    let _ = self.send(w, &option_reply(opt, REP_ACK, &[]));
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.opt_error(w, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                        continue;
                    }
                    match export_names(&self.store) {
                        Ok(names) => {
                            for n in names {
                                self.send(w, &option_reply(opt, REP_SERVER, &rep_server(&n)))?;
                            }
                            self.send(w, &option_reply(opt, REP_ACK, &[]))?;
                        }
                        Err(e) => self.opt_error(w, opt, REP_ERR_INVALID, &e.to_string())?,
                    }
                }
                OPT_INFO | OPT_GO => {
                    let (name, infos) = match parse_info_request(&data) {
                        Ok(x) => x,
                        Err(e) => {
                            self.opt_error(w, opt, REP_ERR_INVALID, &e.0)?;
                            continue;
                        }
                    };
                    let view = match self.resolve(&name) {
                        Ok(v) => v,
                        Err(e) => {
                            self.opt_error(w, opt, REP_ERR_UNKNOWN, &e)?;
                            continue;
                        }
                    };
                    let tflags = transmission_flags(&view, self.structured);
                    self.send(
                        w,
                        &option_reply(opt, REP_INFO, &info_export(view.size, tflags)),
                    )?;
                    if infos.contains(&INFO_NAME) {
                        self.send(w, &option_reply(opt, REP_INFO, &info_name(&view.name)))?;
                    }
                    if infos.contains(&INFO_BLOCK_SIZE) {
                        let cs = self.store.chunk_size() as u32;
                        self.send(
                            w,
                            &option_reply(
                                opt,
                                REP_INFO,
                                &info_block_size(1, cs.min(MAX_PAYLOAD), MAX_PAYLOAD),
                            ),
                        )?;
                    }
                    if opt == OPT_GO {
                        let view = match self.take(view) {
                            Ok(v) => v,
                            Err((code, e)) => {
                                self.opt_error(w, opt, code, &e)?;
                                continue;
                            }
                        };
                        self.send(w, &option_reply(opt, REP_ACK, &[]))?;
                        self.tflags = tflags;
                        return Ok(Some(view));
                    }
                    self.send(w, &option_reply(opt, REP_ACK, &[]))?;
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.opt_error(
                            w,
                            opt,
                            REP_ERR_INVALID,
                            "NBD_OPT_STRUCTURED_REPLY takes no data",
                        )?;
                        continue;
                    }
                    self.structured = true;
                    self.send(w, &option_reply(opt, REP_ACK, &[]))?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    // SET "replaces all previously-set metadata contexts (including
                    // when this command fails)".
                    if opt == OPT_SET_META_CONTEXT {
                        self.meta_context = None;
                    }
                    if opt == OPT_SET_META_CONTEXT && !self.structured {
                        self.opt_error(
                            w,
                            opt,
                            REP_ERR_INVALID,
                            "negotiate structured replies first",
                        )?;
                        continue;
                    }
                    let (name, queries) = match parse_meta_request(&data) {
                        Ok(x) => x,
                        Err(e) => {
                            self.opt_error(w, opt, REP_ERR_INVALID, &e.0)?;
                            continue;
                        }
                    };
                    let view = match self.resolve(&name) {
                        Ok(v) => v,
                        Err(e) => {
                            self.opt_error(w, opt, REP_ERR_UNKNOWN, &e)?;
                            continue;
                        }
                    };
                    let wanted = if opt == OPT_LIST_META_CONTEXT {
                        queries.is_empty()
                            || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
                    } else {
                        queries.iter().any(|q| q == BASE_ALLOCATION)
                    };
                    if wanted {
                        self.send(
                            w,
                            &option_reply(
                                opt,
                                REP_META_CONTEXT,
                                &rep_meta_context(1, BASE_ALLOCATION),
                            ),
                        )?;
                    }
                    if opt == OPT_SET_META_CONTEXT && wanted {
                        self.meta_context = Some(view.name.clone());
                    }
                    self.send(w, &option_reply(opt, REP_ACK, &[]))?;
                }
                _ => self.opt_error(w, opt, REP_ERR_UNSUP, "option not supported")?,
            }
        }
    }

    /// The transmission phase: read requests, serve them concurrently.
    fn transmit<R: Read>(
        &self,
        r: &mut BufReader<R>,
        w: &Writer,
        view: View,
    ) -> std::io::Result<()> {
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE_DEPTH);
        let rx = Arc::new(Mutex::new(rx));
        let failed = Arc::new(AtomicBool::new(false));
        let view = Arc::new(view);
        let result = std::thread::scope(|sc| {
            for _ in 0..workers_per_connection() {
                let rx = rx.clone();
                let failed = failed.clone();
                let view = view.clone();
                sc.spawn(move || loop {
                    let job = rx.lock().unwrap().recv();
                    let Ok(Job {
                        req,
                        payload,
                        lease,
                    }) = job
                    else {
                        break;
                    };
                    let (typ, t0) = (req.typ, std::time::Instant::now());
                    if self.handle(w, &view, req, payload).is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    crate::metrics::nbd_request(typ, t0.elapsed());
                    // The payload and reply buffer are gone: give the bytes back.
                    drop(lease);
                    self.session.request_done();
                });
            }
            let res = self.read_loop(r, w, &view, &tx, &failed);
            drop(tx);
            res
        });
        result
    }

    fn read_loop<R: Read>(
        &self,
        r: &mut BufReader<R>,
        w: &Writer,
        view: &View,
        tx: &mpsc::SyncSender<Job>,
        failed: &AtomicBool,
    ) -> std::io::Result<()> {
        // This connection's share of payload memory (the server's is in `shared`).
        let conn_budget = Budget::new(self.shared.limits.conn_bytes);
        let closing = self.session.closing();
        loop {
            if failed.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("a reply could not be sent"));
            }
            let mut h = [0u8; REQUEST_LEN];
            read_exact(r, &mut h)?;
            let req = Request::decode(&h).map_err(|e| std::io::Error::other(e.0))?;
            let framing = request_payload(&req);
            // Lease the bytes this request will hold (WRITE data, READ reply buffer)
            // before reading or allocating any of them; wait (reading nothing more
            // from this client) while the budgets are spent.
            let cost = match framing {
                Payload::Data(n) => n as u64,
                _ if req.typ == CMD_READ && req.length <= MAX_PAYLOAD => req.length as u64,
                _ => 0,
            };
            let lease = match conn_budget.acquire(cost, closing) {
                Some(mine) => match self.shared.budget.acquire(cost, closing) {
                    Some(all) => (mine, all),
                    None => return Ok(()),
                },
                None => return Ok(()),
            };
            let payload = match framing {
                Payload::None => Vec::new(),
                Payload::Data(n) => read_payload(r, n as usize)?,
                Payload::Discard(n) => {
                    // Consume what the client sends so the stream stays in sync.
                    std::io::copy(&mut r.take(n as u64), &mut std::io::sink())?;
                    self.reply_error(
                        w,
                        req.cookie,
                        EINVAL,
                        "write larger than the maximum block size",
                    )?;
                    continue;
                }
                Payload::TooLarge(n) => {
                    return Err(std::io::Error::other(format!(
                        "write of {n} bytes is too large"
                    )));
                }
            };
            if req.typ == CMD_DISC {
                log::debug!("client disconnected from {}", view.name);
                return Ok(());
            }
            self.session.request_started();
            let job = Job {
                req,
                payload,
                lease,
            };
            if tx.send(job).is_err() {
                self.session.request_done();
                return Err(std::io::Error::other("workers gone"));
            }
        }
    }

    fn reply_error(&self, w: &Writer, cookie: u64, errno: u32, msg: &str) -> std::io::Result<()> {
        if self.structured {
            self.send(w, &structured_error(cookie, errno, msg))
        } else {
            self.send(w, &simple_reply(cookie, errno))
        }
    }

    fn reply_ok(&self, w: &Writer, cookie: u64) -> std::io::Result<()> {
        if self.structured {
            self.send(
                w,
                &structured_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0),
            )
        } else {
            self.send(w, &simple_reply(cookie, 0))
        }
    }

    fn handle(
        &self,
        w: &Writer,
        view: &View,
        req: Request,
        payload: Vec<u8>,
    ) -> std::io::Result<()> {
        let s = &self.store;
        let len = req.length as u64;
        let in_range = req.offset.checked_add(len).is_some_and(|e| e <= view.size);
        let range_err = || {
            format!(
                "request {}+{} is beyond the end of {} ({} bytes)",
                req.offset, len, view.name, view.size
            )
        };
        if let Err(e) = check_request_flags(&req, self.tflags) {
            log::debug!("{}: request {:?} refused: {e}", view.name, req);
            return self.reply_error(w, req.cookie, EINVAL, &e.0);
        }
        let result: Result<(), (u32, String)> = match req.typ {
            CMD_READ => {
                if !in_range {
                    Err((EINVAL, range_err()))
                } else if req.length > MAX_PAYLOAD {
                    // EINVAL, not EOVERFLOW: the spec keeps EOVERFLOW for DF reads.
                    Err((EINVAL, "read larger than the maximum block size".into()))
                } else if req.length == 0 {
                    // Unspecified by the spec; like qemu-nbd, a plain success (for
                    // structured replies a final NONE chunk: an OFFSET_DATA chunk
                    // must carry at least one byte).
                    Ok(())
                } else {
                    return self.do_read(w, view, req);
                }
            }
            CMD_WRITE => {
                if !view.writable {
                    Err((
                        EPERM,
                        format!("{} is a read-only recovery point", view.name),
                    ))
                } else if !in_range {
                    Err((EINVAL, range_err()))
                } else {
                    s.write(view, req.offset, &payload)
                        .and_then(|_| {
                            if req.flags & CMD_FLAG_FUA != 0 {
                                s.flush()
                            } else {
                                Ok(())
                            }
                        })
                        .map_err(|e| (nbd_errno(&e), e.to_string()))
                }
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                if !view.writable {
                    Err((
                        EPERM,
                        format!("{} is a read-only recovery point", view.name),
                    ))
                } else if !in_range {
                    Err((EINVAL, range_err()))
                } else {
                    // Zeroing is a metadata operation here, so FAST_ZERO always holds.
                    s.zero(view, req.offset, len)
                        .and_then(|_| {
                            if req.flags & CMD_FLAG_FUA != 0 {
                                s.flush()
                            } else {
                                Ok(())
                            }
                        })
                        .map_err(|e| (nbd_errno(&e), e.to_string()))
                }
            }
            // "For a flush request, length and offset are reserved, and MUST be set
            // to all-zero" (nbdkit refuses them too; qemu-nbd ignores them).
            CMD_FLUSH if req.offset != 0 || req.length != 0 => {
                Err((EINVAL, "flush offset and length must be zero".into()))
            }
            CMD_FLUSH => s.flush().map_err(|e| (nbd_errno(&e), e.to_string())),
            CMD_CACHE => {
                if !in_range {
                    Err((EINVAL, range_err()))
                } else {
                    // Warm the page cache of the chunks behind the range.
                    s.extents(view, req.offset, len)
                        .map(|_| ())
                        .map_err(|e| (nbd_errno(&e), e.to_string()))
                }
            }
            CMD_BLOCK_STATUS => {
                if self.meta_context.as_deref() != Some(view.name.as_str()) {
                    Err((
                        EINVAL,
                        "block status needs the base:allocation meta context".into(),
                    ))
                } else if !in_range || len == 0 {
                    Err((EINVAL, range_err()))
                } else {
                    return self.do_block_status(w, view, req);
                }
            }
            other => Err((EINVAL, format!("unknown command {other}"))),
        };
        match result {
            Ok(()) => self.reply_ok(w, req.cookie),
            Err((errno, msg)) => {
                log::debug!("{}: request {:?} failed: {msg}", view.name, req);
                self.reply_error(w, req.cookie, errno, &msg)
            }
        }
    }

    fn do_read(&self, w: &Writer, view: &View, req: Request) -> std::io::Result<()> {
        // Ordinary reads reuse a pooled buffer: no allocation and no zeroing of
        // fresh memory per request.  Its bytes are leased (see `read_loop`).
        let mut buf = self.shared.bufs.take(req.length as usize);
        let res = self.send_read(w, view, req, &mut buf);
        self.shared.bufs.give(buf);
        res
    }

    fn send_read(
        &self,
        w: &Writer,
        view: &View,
        req: Request,
        buf: &mut [u8],
    ) -> std::io::Result<()> {
        if let Err(e) = self.store.read_into(view, req.offset, buf) {
            log::warn!(
                "{}: read {}+{} failed: {e}",
                view.name,
                req.offset,
                req.length
            );
            return self.reply_error(w, req.cookie, nbd_errno(&e), &e.to_string());
        }
        let mut hdr = Vec::with_capacity(40);
        if self.structured {
            hdr.extend_from_slice(&structured_header(
                req.cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                8 + req.length,
            ));
            hdr.extend_from_slice(&req.offset.to_be_bytes());
        } else {
            hdr.extend_from_slice(&simple_reply(req.cookie, 0));
        }
        let mut g = w.lock().unwrap();
        // Every reply is flushed whole, so the buffer is empty here; header and data
        // go out in one writev, the data without a copy into the buffer.
        g.flush()?;
        let inner = g.get_mut();
        write_all_vectored(inner, &mut [IoSlice::new(&hdr), IoSlice::new(buf)])?;
        // A no-op on sockets; stdout (`serve --stdio`) buffers.
        inner.flush()
    }

    fn do_block_status(&self, w: &Writer, view: &View, req: Request) -> std::io::Result<()> {
        match self.store.extents(view, req.offset, req.length as u64) {
            Ok(ext) => {
                let mut d: Vec<(u32, u32)> = ext
                    .iter()
                    .map(|(_, l, k)| {
                        let flags = match k {
                            // A zero marker stores nothing: it is a hole too.
                            Block::Hole | Block::Zero => STATE_HOLE | STATE_ZERO,
                            Block::Data(_) => 0,
                        };
                        (*l as u32, flags)
                    })
                    .collect();
                if req.flags & CMD_FLAG_REQ_ONE != 0 {
                    d.truncate(1);
                }
                self.send(w, &block_status(req.cookie, 1, &d))
            }
            Err(e) => self.reply_error(w, req.cookie, nbd_errno(&e), &e.to_string()),
        }
    }
}
