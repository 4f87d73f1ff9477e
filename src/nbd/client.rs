//! A blocking NBD client: the fixed newstyle handshake with structured replies and
//! metadata contexts (`base:allocation`, qemu's `qemu:dirty-bitmap:NAME`), then
//! READ and BLOCK_STATUS one request at a time.  It is the source side of
//! replication from an NBD export (`qemu-nbd -B NAME`, `qemu-storage-daemon`,
//! libvirt's pull-mode backup): ask for the dirty extents, read only those.
//!
//! The wire format (constants, encoders, decoders) is shared with the server in
//! [`super::proto`].  The server is not trusted: every length it sends is checked
//! against what was asked for and against [`MAX_REPLY`] before anything is
//! allocated or read, and a reply that breaks the protocol is a typed error
//! ([`Error::Io`] naming the URI); after one, the connection is out of step and
//! every later call fails.  Nothing here panics on server input.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::proto::*;
use crate::error::{Error, Result};

/// Largest payload accepted from a server in one option reply or reply chunk, in
/// bytes (64 MiB); anything longer is a protocol error.
pub const MAX_REPLY: u32 = 64 << 20;
/// Longest option reply payload accepted during the handshake, in bytes.
const MAX_OPTION_REPLY: u32 = MAX_OPTION_LEN;
/// Most option replies accepted for one option (meta contexts, infos).
const MAX_OPTION_REPLIES: usize = 1024;
/// Largest BLOCK_STATUS request, in bytes (2 GiB: a multiple of every legal
/// minimum block size).
const MAX_STATUS_REQUEST: u64 = 1 << 31;

/// Where an NBD URI points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `nbd://HOST[:PORT]/...`: a TCP host name or address and port.
    Tcp { host: String, port: u16 },
    /// `nbd+unix:///...?socket=PATH`: a unix socket.
    Unix { socket: String },
}

/// A parsed NBD URI (the subset of the NBD URI spec this client speaks: no TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub target: Target,
    /// The export name (percent-decoded path without its leading `/`).
    pub export: String,
}

impl NbdUri {
    /// Parse `nbd://HOST[:PORT][/EXPORT]` or `nbd+unix:///[EXPORT]?socket=PATH`.
    /// Hosts may be `[v6-address]`; the port defaults to 10809; the export and
    /// socket path are percent-decoded.  Errors ([`Error::Invalid`]) say what is
    /// wrong; TLS and vsock schemes are [`Error::Unsupported`].
    pub fn parse(uri: &str) -> Result<NbdUri> {
        let bad = |why: &str| Error::invalid(format!("malformed NBD URI {uri:?}: {why}"));
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
            bad("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
        })?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        if rest.contains('#') || query.is_some_and(|q| q.contains('#')) {
            return Err(bad("fragments (#) are not allowed"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).map_err(|e| bad(&e))?;
        let mut params = Vec::new();
        for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            params.push((k.to_string(), percent_decode(v).map_err(|e| bad(&e))?));
        }
        let target = match scheme {
            "nbd" => {
                if let Some((k, _)) = params.first() {
                    return Err(bad(&format!("unknown query parameter {k:?}")));
                }
                if authority.contains('@') {
                    return Err(bad("user names are not supported"));
                }
                let (host, port) = split_host_port(authority).map_err(|e| bad(&e))?;
                Target::Tcp { host, port }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad("nbd+unix takes no host (nbd+unix:///EXPORT?socket=PATH)"));
                }
                let mut socket = None;
                for (k, v) in params {
                    match k.as_str() {
                        "socket" if socket.is_none() && !v.is_empty() => socket = Some(v),
                        "socket" => return Err(bad("socket= is empty or given twice")),
                        _ => return Err(bad(&format!("unknown query parameter {k:?}"))),
                    }
                }
                Target::Unix {
                    socket: socket.ok_or_else(|| bad("nbd+unix needs ?socket=PATH"))?,
                }
            }
            "nbds" | "nbds+unix" | "nbd+vsock" | "nbds+vsock" => {
                return Err(Error::Unsupported(format!(
                    "NBD URI {uri:?}: scheme {scheme} (TLS or vsock) is not supported; use nbd:// or nbd+unix://"
                )))
            }
            _ => return Err(bad(&format!("unknown scheme {scheme:?}"))),
        };
        Ok(NbdUri { target, export })
    }
}

fn split_host_port(a: &str) -> std::result::Result<(String, u16), String> {
    let (host, port) = if let Some(r) = a.strip_prefix('[') {
        let (h, tail) = r.split_once(']').ok_or("unclosed [ in the host")?;
        match tail {
            "" => (h, None),
            t => (h, Some(t.strip_prefix(':').ok_or("junk after ]")?)),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    if host.is_empty() {
        return Err("no host (nbd://HOST[:PORT]/EXPORT)".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("bad port {p:?}"))?,
    };
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent escapes are not UTF-8".into())
}

/// One run of blocks with the same status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start, in bytes from the beginning of the export.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub length: u64,
    /// The context's status flags: for `base:allocation`, [`STATE_HOLE`] and
    /// [`STATE_ZERO`]; for a dirty bitmap, [`STATE_DIRTY`].
    pub flags: u32,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Append `e`, merging it into the last extent when they touch and share flags.
fn push_merged(v: &mut Vec<Extent>, e: Extent) {
    match v.last_mut() {
        Some(l) if l.end() == e.offset && l.flags == e.flags => l.length += e.length,
        _ => v.push(e),
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A connection to one export of an NBD server, in the transmission phase.
pub struct Client {
    uri: String,
    export: String,
    r: BufReader<Stream>,
    w: Stream,
    size: u64,
    tflags: u16,
    structured: bool,
    /// Block size constraints in bytes (minimum, preferred, maximum used).
    min_block: u32,
    preferred_block: u32,
    max_block: u32,
    /// Negotiated metadata contexts: (name, server's id).
    contexts: Vec<(String, u32)>,
    cookie: u64,
    /// Set after a protocol error or I/O failure: the stream is out of step.
    broken: bool,
    disconnected: bool,
}

impl Client {
    /// Connect to `uri` (see [`NbdUri::parse`]), negotiate structured replies and
    /// the metadata `contexts` (full names such as `base:allocation` or
    /// `qemu:dirty-bitmap:NAME`, see [`dirty_bitmap_context`]), and enter the
    /// transmission phase with `NBD_OPT_GO`.
    ///
    /// Errors: a malformed URI ([`Error::Invalid`]); the socket ([`Error::Io`]);
    /// an export the server does not have ([`Error::NotFound`] "export X at URI");
    /// a dirty bitmap it does not offer ([`Error::NotFound`] "dirty bitmap NAME on
    /// export X at URI"); another context it does not offer or a server without
    /// structured replies when contexts are asked for ([`Error::Unsupported`]); an
    /// option refused by policy ([`Error::Refused`]); a protocol violation
    /// ([`Error::Io`]).
    pub fn connect(uri: &str, contexts: &[&str]) -> Result<Client> {
        let parsed = NbdUri::parse(uri)?;
        let io = |e: std::io::Error| Error::io(uri, e);
        let stream = match &parsed.target {
            Target::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).map_err(io)?;
                s.set_nodelay(true).map_err(io)?;
                Stream::Tcp(s)
            }
            Target::Unix { socket } => Stream::Unix(UnixStream::connect(socket).map_err(io)?),
        };
        let w = stream.try_clone().map_err(io)?;
        let mut c = Client {
            uri: uri.to_string(),
            export: parsed.export,
            r: BufReader::with_capacity(64 << 10, stream),
            w,
            size: 0,
            tflags: 0,
            structured: false,
            min_block: 1,
            preferred_block: 4096,
            max_block: MAX_PAYLOAD,
            contexts: Vec::new(),
            cookie: 0,
            broken: false,
            disconnected: false,
        };
        if let Err(e) = c.handshake(contexts) {
            // Spec: a client that gives up during negotiation SHOULD send
            // NBD_OPT_ABORT first (the reply is not waited for).
            if !c.broken {
                let _ = c.send_option(OPT_ABORT, &[]);
            }
            c.disconnected = true;
            c.w.shutdown();
            return Err(e);
        }
        log::debug!(
            "nbd client {}: export {:?}, {} bytes, flags {:#x}, blocks {}/{}/{}, contexts {:?}",
            c.uri,
            c.export,
            c.size,
            c.tflags,
            c.min_block,
            c.preferred_block,
            c.max_block,
            c.contexts
        );
        Ok(c)
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The export name.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The URI this client connected to.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The transmission flags the server announced (`TF_*` in [`super::proto`]).
    pub fn transmission_flags(&self) -> u16 {
        self.tflags
    }

    /// Block size constraints in bytes: (minimum, preferred, largest request this
    /// client sends, at most 32 MiB).
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        (self.min_block, self.preferred_block, self.max_block)
    }

    /// The negotiated metadata contexts: (name, the server's id).
    pub fn contexts(&self) -> &[(String, u32)] {
        &self.contexts
    }

    /// Set a timeout (seconds as a [`Duration`]) on every socket read and write;
    /// `None` waits for ever.  A timed-out call returns [`Error::Io`] and leaves
    /// the connection unusable.
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<()> {
        self.w.set_timeout(t).map_err(|e| Error::io(&self.uri, e))
    }

    // ---- handshake ----

    fn proto_err(&self, msg: impl std::fmt::Display) -> Error {
        Error::io(
            &self.uri,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("NBD protocol: {msg}"),
            ),
        )
    }

    fn handshake(&mut self, contexts: &[&str]) -> Result<()> {
        let mut g = [0u8; 18];
        self.read_exact(&mut g)?;
        let hflags = parse_greeting(&g).map_err(|e| self.proto_err(e))?;
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.write_all(&cflags.to_be_bytes())?;

        // Structured replies (needed for block status; reads work without).
        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (typ, data) = self.option_reply(OPT_STRUCTURED_REPLY)?;
        match typ {
            REP_ACK => self.structured = true,
            t if t & (1 << 31) != 0 => {
                log::debug!(
                    "{}: no structured replies: {}",
                    self.uri,
                    rep_text(t, &data)
                )
            }
            t => return Err(self.proto_err(format!("reply {t} to NBD_OPT_STRUCTURED_REPLY"))),
        }

        if !contexts.is_empty() {
            if !self.structured {
                return Err(Error::Unsupported(format!(
                    "NBD server {} does not offer structured replies, so no metadata contexts ({})",
                    self.uri,
                    contexts.join(", ")
                )));
            }
            self.set_meta_contexts(contexts)?;
        }
        self.go()
    }

    fn set_meta_contexts(&mut self, contexts: &[&str]) -> Result<()> {
        let opt = OPT_SET_META_CONTEXT;
        self.send_option(opt, &meta_request(&self.export, contexts))?;
        for _ in 0..=MAX_OPTION_REPLIES {
            let (typ, data) = self.option_reply(opt)?;
            match typ {
                REP_META_CONTEXT => {
                    let (id, name) =
                        parse_rep_meta_context(&data).map_err(|e| self.proto_err(e))?;
                    // A context not asked for (a server may expand a query) is
                    // kept, so its block status chunks are recognised and skipped.
                    if self.contexts.iter().any(|(n, i)| *n == name || *i == id) {
                        return Err(self.proto_err(format!(
                            "metadata context {name:?} (id {id}) selected twice"
                        )));
                    }
                    self.contexts.push((name, id));
                }
                REP_ACK => {
                    for want in contexts {
                        if self.contexts.iter().any(|(n, _)| n == want) {
                            continue;
                        }
                        return Err(match want.strip_prefix(QEMU_DIRTY_BITMAP) {
                            Some(bitmap) => Error::NotFound(format!(
                                "dirty bitmap {bitmap} on export {:?} at {} (the server offers no \
                                 context {want}; qemu-nbd serves one with -B {bitmap})",
                                self.export, self.uri
                            )),
                            None => Error::Unsupported(format!(
                                "NBD server {} offers no metadata context {want} on export {:?}",
                                self.uri, self.export
                            )),
                        });
                    }
                    return Ok(());
                }
                t => return Err(self.option_error(opt, t, &data)),
            }
        }
        Err(self.proto_err("too many replies to NBD_OPT_SET_META_CONTEXT"))
    }

    fn go(&mut self) -> Result<()> {
        let opt = OPT_GO;
        self.send_option(opt, &info_request(&self.export, &[INFO_BLOCK_SIZE]))?;
        let mut export = None;
        for _ in 0..=MAX_OPTION_REPLIES {
            let (typ, data) = self.option_reply(opt)?;
            match typ {
                REP_INFO => match parse_info(&data).map_err(|e| self.proto_err(e))? {
                    Info::Export { size, flags } => export = Some((size, flags)),
                    Info::BlockSize {
                        min,
                        preferred,
                        max,
                    } => self.set_block_sizes(min, preferred, max)?,
                    Info::Other(_) => {}
                },
                REP_ACK => {
                    let (size, flags) = export.ok_or_else(|| {
                        self.proto_err("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
                    })?;
                    if size > i64::MAX as u64 {
                        return Err(self.proto_err(format!("export size {size} is too large")));
                    }
                    self.size = size;
                    self.tflags = flags;
                    return Ok(());
                }
                t => return Err(self.option_error(opt, t, &data)),
            }
        }
        Err(self.proto_err("too many replies to NBD_OPT_GO"))
    }

    fn set_block_sizes(&mut self, min: u32, preferred: u32, max: u32) -> Result<()> {
        // Spec: minimum a power of two up to 64 KiB, preferred a power of two at
        // least the minimum, maximum a multiple of the minimum.
        let ok = min.is_power_of_two()
            && min <= 64 << 10
            && preferred.is_power_of_two()
            && preferred >= min
            && max >= min
            && max % min == 0;
        if !ok {
            return Err(self.proto_err(format!(
                "invalid block sizes: minimum {min}, preferred {preferred}, maximum {max}"
            )));
        }
        self.min_block = min;
        self.preferred_block = preferred;
        // Requests stay at most MAX_PAYLOAD (32 MiB), a multiple of the minimum.
        self.max_block = max.min(MAX_PAYLOAD) / min * min;
        Ok(())
    }

    /// The error for an option the server refused.
    fn option_error(&self, opt: u32, typ: u32, data: &[u8]) -> Error {
        let text = rep_text(typ, data);
        let what = match opt {
            OPT_GO => "open",
            OPT_SET_META_CONTEXT => "select metadata contexts on",
            _ => "negotiate on",
        };
        match typ {
            REP_ERR_UNKNOWN => {
                Error::NotFound(format!("export {:?} at {} ({text})", self.export, self.uri))
            }
            REP_ERR_POLICY | REP_ERR_TLS_REQD | REP_ERR_SHUTDOWN => Error::Refused(format!(
                "NBD server {} refused to {what} export {:?}: {text}",
                self.uri, self.export
            )),
            REP_ERR_UNSUP | REP_ERR_PLATFORM | REP_ERR_BLOCK_SIZE_REQD => {
                Error::Unsupported(format!(
                    "NBD server {} cannot {what} export {:?}: {text}",
                    self.uri, self.export
                ))
            }
            t if t & (1 << 31) != 0 => Error::Invalid(format!(
                "NBD server {} refused to {what} export {:?}: {text}",
                self.uri, self.export
            )),
            t => self.proto_err(format!("unexpected reply type {t} to option {opt}")),
        }
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        self.write_all(&option_request(opt, data))
    }

    /// Read one option reply to `opt`: (reply type, payload).
    fn option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>)> {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.read_exact(&mut h)?;
        let (o, typ, len) = option_reply_header(&h).map_err(|e| self.proto_err(e))?;
        if o != opt {
            return Err(self.proto_err(format!("reply to option {o} while waiting for {opt}")));
        }
        if len > MAX_OPTION_REPLY {
            return Err(self.proto_err(format!("option reply of {len} bytes is too large")));
        }
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data)?;
        Ok((typ, data))
    }

    // ---- transmission ----

    fn check_usable(&self) -> Result<()> {
        if self.broken || self.disconnected {
            return Err(Error::io(
                &self.uri,
                std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "NBD connection is closed or out of step after an earlier error",
                ),
            ));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::invalid(format!(
                "range {offset}+{len} is past the end of export {:?} at {} ({} bytes)",
                self.export, self.uri, self.size
            ))),
        }
    }

    fn send_request(&mut self, typ: u16, flags: u16, offset: u64, length: u32) -> Result<u64> {
        self.cookie = self.cookie.wrapping_add(1);
        let req = Request {
            flags,
            typ,
            cookie: self.cookie,
            offset,
            length,
        };
        self.write_all(&req.encode())?;
        Ok(self.cookie)
    }

    /// The header of the next reply to `cookie`: a simple reply's error, or a
    /// structured chunk's header (its length checked against [`MAX_REPLY`]).
    fn next_reply(&mut self, cookie: u64) -> Result<Reply> {
        let mut h = [0u8; STRUCTURED_HEADER_LEN];
        self.read_exact(&mut h[..4])?;
        let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let (reply, got) = if magic == SIMPLE_REPLY_MAGIC {
            self.read_exact(&mut h[4..SIMPLE_REPLY_LEN])?;
            let (error, c) =
                parse_simple_reply(&h[..SIMPLE_REPLY_LEN]).map_err(|e| self.proto_err(e))?;
            (Reply::Simple(error), c)
        } else if magic == STRUCTURED_REPLY_MAGIC && self.structured {
            self.read_exact(&mut h[4..])?;
            let c = ChunkHeader::decode(&h).map_err(|e| self.proto_err(e))?;
            if c.length > MAX_REPLY {
                return Err(self.proto_err(format!(
                    "reply chunk of {} bytes is larger than {MAX_REPLY}",
                    c.length
                )));
            }
            (Reply::Chunk(c), c.cookie)
        } else {
            return Err(self.proto_err(format!("bad reply magic {magic:#x}")));
        };
        if got != cookie {
            return Err(self.proto_err(format!("reply to cookie {got} while waiting for {cookie}")));
        }
        Ok(reply)
    }

    /// Read a chunk's whole payload (bounded by [`MAX_REPLY`] in `next_reply`).
    fn payload(&mut self, c: &ChunkHeader) -> Result<Vec<u8>> {
        let mut v = vec![0u8; c.length as usize];
        self.read_exact(&mut v)?;
        Ok(v)
    }

    fn server_error(&self, what: &str, errno: u32, msg: &str) -> Error {
        let msg = if msg.is_empty() {
            String::new()
        } else {
            format!(": {msg}")
        };
        Error::io(
            &self.uri,
            std::io::Error::other(format!(
                "NBD server failed {what} on export {:?}: {} ({errno}){msg}",
                self.export,
                errno_name(errno)
            )),
        )
    }

    /// Read `len` bytes at `offset` (both in bytes) into a new buffer.  Ranges
    /// larger than the server's maximum block size are split; unaligned ranges
    /// are widened to its minimum block size and trimmed.  The caller's `len` is
    /// allocated whole, so keep it modest (e.g. one extent at a time).
    ///
    /// Errors: a range past the end ([`Error::Invalid`]); an error the server
    /// reports, named with its errno and message, or a protocol violation
    /// ([`Error::Io`]).
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_into(offset, &mut buf)?;
        Ok(buf)
    }

    /// Fill `buf` with the bytes at `offset` (in bytes); see [`Client::read`].
    pub fn read_into(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_usable()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let min = self.min_block as u64;
        let end = offset + buf.len() as u64;
        let (a_start, a_end) = (offset / min * min, end.div_ceil(min) * min);
        if a_start == offset && a_end == end {
            return self.read_aligned(offset, buf);
        }
        let a_end = a_end.min(self.size);
        let mut tmp = vec![0u8; (a_end - a_start) as usize];
        self.read_aligned(a_start, &mut tmp)?;
        let skip = (offset - a_start) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    fn read_aligned(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let step = self.max_block as usize;
        for (i, piece) in buf.chunks_mut(step).enumerate() {
            let res = self.read_one(offset + (i * step) as u64, piece);
            if let Err(e) = &res {
                if !matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::Other)
                {
                    // Not a clean server-reported error: out of step.
                    self.broken = true;
                }
            }
            res?;
        }
        Ok(())
    }

    /// One READ request of at most `max_block` bytes.
    fn read_one(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        let cookie = self.send_request(CMD_READ, 0, offset, buf.len() as u32)?;
        let mut covered = 0u64;
        let mut failure: Option<(u32, String)> = None;
        loop {
            let c = match self.next_reply(cookie)? {
                Reply::Simple(0) => {
                    self.read_exact(buf)?;
                    return Ok(());
                }
                Reply::Simple(errno) => return Err(self.server_error("a read", errno, "")),
                Reply::Chunk(c) => c,
            };
            match c.typ {
                REPLY_TYPE_OFFSET_DATA => {
                    if c.length < 9 {
                        return Err(
                            self.proto_err(format!("OFFSET_DATA chunk of {} bytes", c.length))
                        );
                    }
                    let mut o = [0u8; 8];
                    self.read_exact(&mut o)?;
                    let at = u64::from_be_bytes(o);
                    let n = (c.length - 8) as u64;
                    let rel = self.chunk_range(offset, len, at, n, &mut covered)?;
                    self.read_exact(&mut buf[rel..rel + n as usize])?;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let p = self.payload(&c)?;
                    let (at, n) = parse_offset_hole(&p).map_err(|e| self.proto_err(e))?;
                    let rel = self.chunk_range(offset, len, at, n as u64, &mut covered)?;
                    buf[rel..rel + n as usize].fill(0);
                }
                REPLY_TYPE_NONE if c.length == 0 => {}
                _ if c.is_error() => self.error_chunk(&c, &mut failure)?,
                _ => return Err(self.unexpected_chunk(&c, "read")),
            }
            if c.done() {
                break;
            }
        }
        if let Some((errno, msg)) = failure {
            return Err(self.server_error(&format!("read {offset}+{len}"), errno, &msg));
        }
        if covered != len {
            return Err(self.proto_err(format!(
                "read {offset}+{len}: reply covered {covered} bytes"
            )));
        }
        Ok(())
    }

    /// Read and decode an error chunk; keep the first error in `failure` (the
    /// reply goes on until its DONE chunk, so the stream stays in step).
    fn error_chunk(&mut self, c: &ChunkHeader, failure: &mut Option<(u32, String)>) -> Result<()> {
        let p = self.payload(c)?;
        let (errno, msg, _) = parse_error_chunk(c.typ, &p).map_err(|e| self.proto_err(e))?;
        if errno == 0 {
            return Err(self.proto_err("error chunk with error 0"));
        }
        failure.get_or_insert((errno, msg));
        Ok(())
    }

    fn unexpected_chunk(&self, c: &ChunkHeader, what: &str) -> Error {
        self.proto_err(format!(
            "unexpected chunk type {} ({} bytes) in a {what} reply",
            c.typ, c.length
        ))
    }

    /// Check a content chunk [at, at+n) lies inside the request [offset,
    /// offset+len) and fits in what is not yet covered; returns its start relative
    /// to `offset`.
    fn chunk_range(
        &self,
        offset: u64,
        len: u64,
        at: u64,
        n: u64,
        covered: &mut u64,
    ) -> Result<usize> {
        let inside = at >= offset && at.checked_add(n).is_some_and(|e| e <= offset + len);
        if !inside || n == 0 || *covered + n > len {
            return Err(self.proto_err(format!(
                "content chunk {at}+{n} is outside the request {offset}+{len} or overlaps"
            )));
        }
        *covered += n;
        Ok((at - offset) as usize)
    }

    /// The status of `[offset, offset+len)` (bytes) in the negotiated metadata
    /// `context`, as extents that exactly cover the range (adjacent extents with
    /// the same flags merged).  Long ranges take several requests; a server that
    /// answers for less than asked is asked again from where it stopped.
    ///
    /// Errors: a context not negotiated in [`Client::connect`] or a range past the
    /// end ([`Error::Invalid`]); a server error or protocol violation
    /// ([`Error::Io`]).
    pub fn block_status(&mut self, offset: u64, len: u64, context: &str) -> Result<Vec<Extent>> {
        self.check_usable()?;
        self.check_range(offset, len)?;
        let id = self
            .contexts
            .iter()
            .find(|(n, _)| n == context)
            .map(|(_, i)| *i)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "metadata context {context} was not negotiated with {} (connect with it)",
                    self.uri
                ))
            })?;
        let mut out = Vec::new();
        let end = offset + len;
        let mut cur = offset;
        while cur < end {
            let n = (end - cur).min(MAX_STATUS_REQUEST);
            match self.status_one(cur, n, id, &mut out) {
                Ok(next) => cur = next,
                Err(e) => {
                    if !matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::Other)
                    {
                        self.broken = true;
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// One BLOCK_STATUS request; appends the extents of context `id` and returns
    /// where they end (> `offset`).
    fn status_one(&mut self, offset: u64, len: u64, id: u32, out: &mut Vec<Extent>) -> Result<u64> {
        let cookie = self.send_request(CMD_BLOCK_STATUS, 0, offset, len as u32)?;
        let end = offset + len;
        let mut reached: Option<u64> = None;
        let mut failure: Option<(u32, String)> = None;
        loop {
            let c = match self.next_reply(cookie)? {
                Reply::Simple(0) => {
                    return Err(self.proto_err("simple reply without data to BLOCK_STATUS"))
                }
                Reply::Simple(errno) => return Err(self.server_error("block status", errno, "")),
                Reply::Chunk(c) => c,
            };
            match c.typ {
                REPLY_TYPE_BLOCK_STATUS => {
                    let p = self.payload(&c)?;
                    let (ctx, desc) = parse_block_status(&p).map_err(|e| self.proto_err(e))?;
                    if !self.contexts.iter().any(|(_, i)| *i == ctx) {
                        return Err(
                            self.proto_err(format!("block status for unknown context id {ctx}"))
                        );
                    }
                    if ctx == id {
                        if reached.is_some() {
                            return Err(self
                                .proto_err(format!("two block status chunks for context {ctx}")));
                        }
                        let mut pos = offset;
                        for (l, flags) in desc {
                            if pos >= end {
                                break; // past the request: allowed, ignored
                            }
                            let l = (l as u64).min(end - pos);
                            push_merged(
                                out,
                                Extent {
                                    offset: pos,
                                    length: l,
                                    flags,
                                },
                            );
                            pos += l;
                        }
                        reached = Some(pos);
                    }
                }
                REPLY_TYPE_NONE if c.length == 0 => {}
                _ if c.is_error() => self.error_chunk(&c, &mut failure)?,
                _ => return Err(self.unexpected_chunk(&c, "block status")),
            }
            if c.done() {
                break;
            }
        }
        if let Some((errno, msg)) = failure {
            return Err(self.server_error(&format!("block status {offset}+{len}"), errno, &msg));
        }
        reached.ok_or_else(|| self.proto_err("block status reply without the context's extents"))
    }

    /// The extents of the whole export that qemu's dirty bitmap `bitmap` marks
    /// (context `qemu:dirty-bitmap:NAME`, negotiated in [`Client::connect`]), in
    /// order, adjacent ones merged; `flags` is [`STATE_DIRTY`].  qemu reports at
    /// its bitmap granularity (64 KiB by default).
    pub fn dirty_extents(&mut self, bitmap: &str) -> Result<Vec<Extent>> {
        let all = self.block_status(0, self.size, &dirty_bitmap_context(bitmap))?;
        Ok(keep_merged(
            all,
            |e| e.flags & STATE_DIRTY != 0,
            STATE_DIRTY,
        ))
    }

    /// The extents of the whole export that `base:allocation` (negotiated in
    /// [`Client::connect`]) does not report as holes, in order, adjacent ones
    /// merged (`flags` 0).  Everything else is unallocated and reads as zeros.
    pub fn allocated_extents(&mut self) -> Result<Vec<Extent>> {
        let all = self.block_status(0, self.size, BASE_ALLOCATION)?;
        Ok(keep_merged(all, |e| e.flags & STATE_HOLE == 0, 0))
    }

    /// End the session with `NBD_CMD_DISC` and close the socket.
    pub fn disconnect(mut self) -> Result<()> {
        self.disc()
    }

    fn disc(&mut self) -> Result<()> {
        if self.disconnected {
            return Ok(());
        }
        self.disconnected = true;
        let res = if self.broken {
            Ok(())
        } else {
            self.send_request(CMD_DISC, 0, 0, 0).map(|_| ())
        };
        self.w.shutdown();
        res
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.r.read_exact(buf).map_err(|e| {
            self.broken = true;
            let e = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                std::io::Error::new(e.kind(), "NBD server closed the connection")
            } else {
                e
            };
            Error::io(&self.uri, e)
        })
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        self.w.write_all(buf).map_err(|e| {
            self.broken = true;
            Error::io(&self.uri, e)
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.disc();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("uri", &self.uri)
            .field("export", &self.export)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

enum Reply {
    Simple(u32),
    Chunk(ChunkHeader),
}

/// Keep the extents `keep` selects, with `flags`, merging neighbours.
fn keep_merged(all: Vec<Extent>, keep: impl Fn(&Extent) -> bool, flags: u32) -> Vec<Extent> {
    let mut v = Vec::new();
    for e in all.into_iter().filter(|e| keep(e)) {
        push_merged(&mut v, Extent { flags, ..e });
    }
    v
}

/// The text of an option error reply.
fn rep_text(typ: u32, data: &[u8]) -> String {
    let name = match typ {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "refused by policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_PLATFORM => "not on this platform",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_SHUTDOWN => "server shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        REP_ERR_TOO_BIG => "too big",
        _ => "error",
    };
    let msg = String::from_utf8_lossy(&data[..data.len().min(MAX_STRING)]);
    if msg.is_empty() {
        name.to_string()
    } else {
        format!("{name}: {msg}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(h: &str, p: u16, e: &str) -> NbdUri {
        NbdUri {
            target: Target::Tcp {
                host: h.into(),
                port: p,
            },
            export: e.into(),
        }
    }

    #[test]
    fn uris_parse() {
        assert_eq!(
            NbdUri::parse("nbd://h/app/d").unwrap(),
            tcp("h", 10809, "app/d")
        );
        assert_eq!(NbdUri::parse("nbd://h:1234").unwrap(), tcp("h", 1234, ""));
        assert_eq!(NbdUri::parse("nbd://h:1234/").unwrap(), tcp("h", 1234, ""));
        assert_eq!(
            NbdUri::parse("nbd://[::1]:99/a%20b").unwrap(),
            tcp("::1", 99, "a b")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]/x").unwrap(),
            tcp("::1", 10809, "x")
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:///g/d@1?socket=/tmp/a%2Cb.sock").unwrap(),
            NbdUri {
                target: Target::Unix {
                    socket: "/tmp/a,b.sock".into()
                },
                export: "g/d@1".into()
            }
        );
        assert_eq!(NbdUri::parse("nbd+unix://?socket=s").unwrap().export, "");
    }

    #[test]
    fn malformed_uris_are_typed_errors() {
        for bad in [
            "",
            "h:10809/x",
            "http://h/x",
            "nbd://",
            "nbd:///x",
            "nbd://h:0/x",
            "nbd://h:99999/x",
            "nbd://h:port/x",
            "nbd://[::1/x",
            "nbd://[::1]x/x",
            "nbd://u@h/x",
            "nbd://h/x?socket=/s",
            "nbd://h/x%zz",
            "nbd://h/x%ff",
            "nbd://h/x#frag",
            "nbd+unix:///x",
            "nbd+unix:///x?socket=",
            "nbd+unix:///x?socket=a&socket=b",
            "nbd+unix:///x?sock=a",
            "nbd+unix://host/x?socket=a",
        ] {
            let e = NbdUri::parse(bad).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{bad}: {e:?}");
            assert!(e.to_string().contains("malformed NBD URI"), "{bad}: {e}");
        }
        for tls in ["nbds://h/x", "nbds+unix:///x?socket=s", "nbd+vsock://2/x"] {
            assert!(
                matches!(NbdUri::parse(tls), Err(Error::Unsupported(_))),
                "{tls}"
            );
        }
    }

    #[test]
    fn extents_merge_only_when_touching_with_equal_flags() {
        let e = |o, l, f| Extent {
            offset: o,
            length: l,
            flags: f,
        };
        let all = vec![e(0, 4, 1), e(4, 4, 1), e(8, 4, 0), e(12, 4, 1), e(16, 4, 3)];
        assert_eq!(
            keep_merged(all.clone(), |x| x.flags & 1 != 0, 1),
            vec![e(0, 8, 1), e(12, 8, 1)]
        );
        assert_eq!(keep_merged(all, |x| x.flags & 1 == 0, 0), vec![e(8, 4, 0)]);
    }
}
