//! The replication connection: TCP, or TLS over TCP (rustls), seen by both
//! ends as one byte stream; and the sending end's [`Link`], which frames,
//! counts and paces what it writes (docs/DESIGN.md §18).
//!
//! TLS: the receiver presents `serve --tls-cert`/`--tls-key` (PEM) and then
//! speaks only TLS: a plaintext agent's handshake is not a TLS record, so the
//! session ends before anything is read.  The sender checks the receiver's
//! certificate against `--tls-ca` (PEM; a self-signed certificate may be its
//! own CA) for the host name (or IP address) of `--target HOST:PORT`.  TLS 1.2
//! and 1.3, rustls's safe defaults, the `ring` provider.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::engine::keys::ChunkId;
use crate::error::{Error, Result};
use crate::repl::wire;

/// A connection's byte stream (plain TCP or TLS).
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("{what}: {e}"))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| tls_err(&format!("TLS certificates in {}", path.display()), e))?;
    if certs.is_empty() {
        return Err(Error::invalid(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The receiver's TLS settings (`serve --tls-cert --tls-key`).
#[derive(Clone)]
pub struct ServerTls(Arc<rustls::ServerConfig>);

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// Load a PEM certificate chain and its PEM private key.  Errors: a file
    /// that cannot be read, holds no certificate or key, or a key that does not
    /// match the certificate.
    pub fn load(cert: &Path, key: &Path) -> Result<Self> {
        let chain = certs(cert)?;
        let key_path = key;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => Error::invalid(format!(
                "{} holds no PEM private key (BEGIN PRIVATE KEY, or EC or RSA PRIVATE KEY)",
                key_path.display()
            )),
            e => tls_err(&format!("TLS private key in {}", key_path.display()), e),
        })?;
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("TLS", e))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => Error::invalid(format!(
                    "the private key in {} does not match the certificate in {}",
                    key_path.display(),
                    cert.display()
                )),
                e => tls_err(&format!("TLS certificate {}", cert.display()), e),
            })?;
        Ok(Self(Arc::new(cfg)))
    }

    /// Complete the TLS handshake on an accepted connection by `deadline`
    /// (every read waits at most until then; the socket's read timeout is
    /// left set for the caller to change).  Errors: the peer does not speak
    /// TLS (a plaintext agent), the handshake fails, or it is not done by
    /// `deadline`.
    pub fn accept(&self, mut s: TcpStream, deadline: Instant) -> Result<Box<dyn Stream>> {
        let mut conn =
            rustls::ServerConnection::new(self.0.clone()).map_err(|e| tls_err("TLS", e))?;
        while conn.is_handshaking() {
            // complete_io reads on while bytes come: the deadline is checked on
            // each read, not each call (a peer sending a byte a second kept a
            // per-call bound from ever expiring: tests/breakit_repl.rs).
            conn.complete_io(&mut Deadline {
                s: &mut s,
                at: deadline,
            })
            .map_err(|e| {
                Error::Refused(format!(
                    "TLS handshake failed ({e}); this receiver speaks only TLS: give the \
                     agent --tls-ca"
                ))
            })?;
        }
        Ok(Box::new(rustls::StreamOwned::new(conn, s)))
    }
}

/// A socket whose every read must end by `at`.
struct Deadline<'a> {
    s: &'a mut TcpStream,
    at: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "not done in time",
            ));
        }
        self.s.set_read_timeout(Some(left))?;
        self.s.read(b)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.s.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// The sender's TLS settings (`--tls-ca`).
#[derive(Clone)]
pub struct ClientTls(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// Trust the PEM certificates in `ca` (a CA, or the receiver's own
    /// self-signed certificate).  Errors: unreadable, empty or bad PEM.
    pub fn load(ca: &Path) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(ca)? {
            roots
                .add(c)
                .map_err(|e| tls_err(&format!("TLS CA {}", ca.display()), e))?;
        }
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("TLS", e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self(Arc::new(cfg)))
    }
}

/// How long a sender waits for the receiver to read or answer (a large
/// cycle's COMMIT writes its whole map in one batch).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(600);

/// Connect to `target` (`HOST:PORT`), over TLS when `tls` is given.  Errors:
/// connecting; a TLS handshake that fails (wrong CA, a name the certificate
/// does not carry, a plaintext receiver).
pub fn connect(target: &str, tls: Option<&ClientTls>) -> Result<Box<dyn Stream>> {
    let s = TcpStream::connect(target)
        .map_err(|e| Error::io(format!("replication target {target}"), e))?;
    let _ = s.set_nodelay(true);
    // A target that accepts and then hangs ends the cycle instead of the agent.
    let _ = s.set_read_timeout(Some(REPLY_TIMEOUT));
    let _ = s.set_write_timeout(Some(REPLY_TIMEOUT));
    let Some(tls) = tls else {
        return Ok(Box::new(s));
    };
    let host = target
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(target)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| tls_err(&format!("TLS server name {host:?}"), e))?;
    let mut conn =
        rustls::ClientConnection::new(tls.0.clone(), name).map_err(|e| tls_err("TLS", e))?;
    let mut s = s;
    while conn.is_handshaking() {
        conn.complete_io(&mut s).map_err(|e| {
            // webpki's name for a certificate marked CA:TRUE presented by a
            // server (openssl's `req -x509` default).
            let text = e.to_string();
            let hint = if text.contains("CaUsedAsEndEntity") {
                " (the target presents a CA certificate: give serve --tls-cert a server \
                 certificate signed by that CA)"
            } else if text.contains("UnknownIssuer") {
                " (give --tls-ca the certificate of the CA that signed the target's \
                 certificate, not the target's own)"
            } else if text.contains("NotValidForName") {
                " (the target's certificate does not carry this host name or address: \
                 connect by one it carries, or reissue it with that name in its \
                 subjectAltName)"
            } else {
                ""
            };
            Error::Refused(format!("TLS handshake with {target} failed: {e}{hint}"))
        })?;
    }
    Ok(Box::new(rustls::StreamOwned::new(conn, s)))
}

/// Counts and paces what is written.
struct Paced {
    s: Box<dyn Stream>,
    sent: u64,
    received: u64,
    limit: Option<u64>,
    t0: Instant,
}

impl Read for Paced {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.s.read(b)?;
        self.received += n as u64;
        Ok(n)
    }
}

impl Write for Paced {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Some(l) = self.limit {
            let due = self.sent as f64 / l as f64;
            let el = self.t0.elapsed().as_secs_f64();
            if due > el {
                std::thread::sleep(Duration::from_secs_f64(due - el));
            }
        }
        // Pace in pieces of at most 64 KiB so the limit holds within a frame.
        let n = self.s.write(&b[..b.len().min(64 << 10)])?;
        self.sent += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// The sending end of a replication connection (agent, push): whole frames
/// out, counted and paced; frames in, an ERROR frame turned into the error it
/// names.
pub struct Link {
    s: BufReader<Paced>,
    frame: Vec<u8>,
    peer: String,
    /// Replies still to read, in the order their frames went (see
    /// [`Link::offer`], [`Link::send_chunks`]).
    replies: std::collections::VecDeque<Reply>,
}

/// A reply the sender still has to read.
enum Reply {
    /// LACK for a HAVE of that many ids.
    Lack(usize),
    /// STORED for a CHUNKS frame of that many chunks.
    Stored(u32),
}

impl Link {
    /// Connect to `target`, exchange handshakes.  `bwlimit`: bytes per second
    /// written, if limited.  Errors: as [`connect`]; a peer that is not a
    /// drclone receiver of this protocol version (named as such).
    pub fn open(target: &str, tls: Option<&ClientTls>, bwlimit: Option<u64>) -> Result<Self> {
        let s = connect(target, tls)?;
        let mut link = Link {
            s: BufReader::with_capacity(
                64 << 10,
                Paced {
                    s,
                    sent: 0,
                    received: 0,
                    limit: bwlimit,
                    t0: Instant::now(),
                },
            ),
            frame: Vec::new(),
            peer: target.to_string(),
            replies: Default::default(),
        };
        let mut hs = Vec::new();
        wire::write_handshake(&mut hs).expect("in memory");
        link.write(&hs)?;
        let mut b = [0u8; 12];
        let mut got = 0;
        while got < b.len() {
            match link.s.read(&mut b[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if got == 0 => {
                    return Err(Error::io(format!("replication target {target}"), e))
                }
                Err(_) => break,
            }
        }
        if got > 0 && tls.is_none() && (b[0] == 0x15 || b[0] == 0x16) {
            return Err(Error::Refused(format!(
                "the target {target} speaks TLS: give --tls-ca with its CA certificate"
            )));
        }
        if got < b.len() {
            return Err(Error::invalid(format!(
                "replication protocol: {target} closed the connection during the handshake \
                 ({got} of 12 bytes){}",
                if tls.is_none() {
                    "; if it is a TLS receiver, give --tls-ca"
                } else {
                    ""
                }
            )));
        }
        wire::check_handshake(&b)?;
        Ok(link)
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        let w = self.s.get_mut();
        w.write_all(b)
            .and_then(|_| w.flush())
            .map_err(|e| Error::io(format!("replication connection to {}", self.peer), e))
    }

    /// Send one frame of type `t`.  Errors: I/O on the connection.  While
    /// replies are outstanding, a target that refused an earlier frame has
    /// sent ERROR and closed, so this write may fail: the refusal, if it can
    /// still be read, is the error returned, not the broken pipe.
    pub fn send(&mut self, t: u8, body: &[u8]) -> Result<()> {
        let r = if body.len() > 64 << 10 {
            // A large body goes from where it is: no copy into `frame`.
            let len = (body.len() + 1) as u32;
            let mut hdr = [0u8; 5];
            hdr[..4].copy_from_slice(&len.to_be_bytes());
            hdr[4] = t;
            self.write(&hdr).and_then(|()| self.write(body))
        } else {
            let mut frame = std::mem::take(&mut self.frame);
            frame.clear();
            wire::write_frame(&mut frame, t, body).expect("in memory");
            let r = self.write(&frame);
            self.frame = frame;
            r
        };
        let e = match r {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if self.replies.is_empty() {
            return Err(e);
        }
        match self.settle() {
            Err(r @ Error::Refused(_)) => Err(r),
            _ => Err(e),
        }
    }

    /// Offer `ids` (HAVE) without waiting for the answer: [`Link::next_lack`]
    /// reads it, in turn.  Errors: as [`Link::send`].
    pub fn offer(&mut self, ids: &[ChunkId]) -> Result<()> {
        self.send(wire::HAVE, &wire::encode_ids(ids))?;
        self.replies.push_back(Reply::Lack(ids.len()));
        Ok(())
    }

    /// Send a CHUNKS frame of `n` chunks without waiting for its STORED (read,
    /// and its count checked, in turn).  Errors: as [`Link::send`].
    pub fn send_chunks(&mut self, body: &[u8], n: u32) -> Result<()> {
        self.send(wire::CHUNKS, body)?;
        self.replies.push_back(Reply::Stored(n));
        Ok(())
    }

    /// Read the replies due, in order, checking each STORED's count, up to and
    /// including the LACK of the oldest HAVE not answered yet; returns its
    /// bits (true: send it).  Errors: no HAVE outstanding, I/O, the
    /// receiver's refusal, a wrong count.
    pub fn next_lack(&mut self) -> Result<Vec<bool>> {
        self.read_replies(true)?
            .ok_or_else(|| Error::invalid("replication: a LACK was expected, but no HAVE is due"))
    }

    /// Read every reply still due.  Errors: as [`Link::next_lack`].
    pub fn settle(&mut self) -> Result<()> {
        self.read_replies(false).map(|_| ())
    }

    fn read_replies(&mut self, until_lack: bool) -> Result<Option<Vec<bool>>> {
        while let Some(r) = self.replies.pop_front() {
            match r {
                Reply::Stored(n) => {
                    let b = self.expect_now(wire::STORED)?;
                    if b.len() != 4 || u32::from_be_bytes(b[..].try_into().unwrap()) != n {
                        return Err(Error::invalid(format!(
                            "replication protocol: the target stored other than the {n} chunks \
                             sent"
                        )));
                    }
                }
                Reply::Lack(n) => {
                    let bits = wire::decode_bits(&self.expect_now(wire::LACK)?, n)?;
                    if until_lack {
                        return Ok(Some(bits));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Send `v` as a JSON frame of type `t`.
    pub fn send_json<T: serde::Serialize>(&mut self, t: u8, v: &T) -> Result<()> {
        self.send(t, &serde_json::to_vec(v).expect("serializes"))
    }

    /// The next frame, which must be `want`, after the replies still due
    /// ([`Link::settle`]); an ERROR frame becomes [`Error::Refused`] with the
    /// receiver's text.  Errors: I/O, another type.
    pub fn expect(&mut self, want: u8) -> Result<Vec<u8>> {
        self.settle()?;
        self.expect_now(want)
    }

    fn expect_now(&mut self, want: u8) -> Result<Vec<u8>> {
        let (t, body) = wire::read_frame(&mut self.s).map_err(|e| match e {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof => {
                Error::io(
                    format!("replication connection to {}", self.peer),
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection (see its log for why)",
                    ),
                )
            }
            e => e,
        })?;
        if t == wire::ERROR {
            return Err(Error::Refused(format!(
                "the target refused: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        if t != want {
            return Err(Error::invalid(format!(
                "replication protocol: expected message type {want}, got {t}"
            )));
        }
        Ok(body)
    }

    /// Protocol bytes written so far (before TLS, which adds about 22 bytes per
    /// 16 KiB record).
    pub fn sent(&self) -> u64 {
        self.s.get_ref().sent
    }

    /// Protocol bytes read so far (after TLS).
    pub fn received(&self) -> u64 {
        self.s.get_ref().received
    }
}

/// Offer `ids` (HAVE), then send the chunks the receiver lacks (LACK), each
/// built by `chunk` (which packs one id's data; called in parallel), in CHUNKS
/// frames of about 16 MiB, without waiting for their STORED: the receiver
/// stores one frame while the next is built and on its way, and the replies
/// are read (checked) before the next LACK or any other reply.  Duplicate ids
/// are offered once.  Returns the number of chunks sent.  Errors: I/O, the
/// receiver's refusal, `chunk`'s.
pub fn send_lacking(
    link: &mut Link,
    ids: &[ChunkId],
    chunk: &(dyn Fn(&ChunkId) -> Result<wire::WireChunk> + Sync),
) -> Result<u64> {
    use rayon::prelude::*;
    /// Chunks packed at once (in parallel), then framed.
    const PACK: usize = 256;
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(0);
    }
    link.offer(&ids)?;
    let lack = link.next_lack()?;
    let want: Vec<ChunkId> = ids
        .iter()
        .zip(&lack)
        .filter(|(_, l)| **l)
        .map(|(id, _)| *id)
        .collect();
    let mut body = Vec::new();
    let mut n = 0u32;
    for part in want.chunks(PACK) {
        let packed = part.par_iter().map(chunk).collect::<Result<Vec<_>>>()?;
        for c in &packed {
            wire::append_chunk(&mut body, c);
            n += 1;
            if body.len() >= 16 << 20 {
                link.send_chunks(&body, n)?;
                body.clear();
                n = 0;
            }
        }
    }
    if n > 0 {
        link.send_chunks(&body, n)?;
    }
    Ok(want.len() as u64)
}
