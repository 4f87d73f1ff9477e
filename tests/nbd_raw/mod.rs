//! A raw NBD client over std sockets, for tests that must send what real clients
//! never send (bad flags, unknown client flags, queued writes without waiting,
//! half-sent payloads), plus a `drclone serve` starter that takes extra flags.
//! It speaks the wire format itself (constants from `drclone::nbd::proto`) so a
//! server bug cannot be hidden by a shared encoder.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drclone::nbd::proto::*;

/// One reply: simple (`chunks` empty) or structured (every chunk until DONE).
#[derive(Debug, Clone)]
pub struct Reply {
    pub cookie: u64,
    /// The error: a simple reply's error field, or the first error chunk's.
    pub error: u32,
    pub structured: bool,
    /// (flags, type, payload length) of each structured chunk.
    pub chunks: Vec<(u16, u16, u32)>,
    /// READ data (simple reply payload, or OFFSET_DATA bytes after the offset).
    pub data: Vec<u8>,
}

pub struct Client {
    pub s: UnixStream,
    pub size: u64,
    pub tflags: u16,
    pub structured: bool,
}

pub fn rx(s: &mut impl Read, n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Connect, read the greeting, send `cflags`.
pub fn hello(sock: &Path, cflags: u32) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let g = rx(&mut s, 18).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    s.write_all(&cflags.to_be_bytes()).unwrap();
    s
}

pub fn send_opt(s: &mut UnixStream, opt: u32, data: &[u8]) -> std::io::Result<()> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// One option reply: (option, reply type, data).
pub fn opt_reply(s: &mut UnixStream) -> std::io::Result<(u32, u32, Vec<u8>)> {
    let h = rx(s, 20)?;
    assert_eq!(be64(&h), OPT_REPLY_MAGIC);
    let d = rx(s, be32(&h[16..]) as usize)?;
    Ok((be32(&h[8..]), be32(&h[12..]), d))
}

/// Option replies up to and including the final one (ACK or an error).
pub fn opt_replies(s: &mut UnixStream) -> std::io::Result<Vec<(u32, u32, Vec<u8>)>> {
    let mut v = Vec::new();
    loop {
        let r = opt_reply(s)?;
        let last = r.1 == REP_ACK || r.1 & (1 << 31) != 0;
        v.push(r);
        if last {
            return Ok(v);
        }
    }
}

fn name32(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

pub fn negotiate_structured(s: &mut UnixStream) {
    send_opt(s, OPT_STRUCTURED_REPLY, &[]).unwrap();
    let r = opt_replies(s).unwrap();
    assert_eq!(r.last().unwrap().1, REP_ACK);
}

/// `NBD_OPT_SET_META_CONTEXT` of base:allocation on `export`; the final reply type.
pub fn set_meta(s: &mut UnixStream, export: &str) -> u32 {
    let mut d = name32(export);
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&name32(BASE_ALLOCATION));
    send_opt(s, OPT_SET_META_CONTEXT, &d).unwrap();
    opt_replies(s).unwrap().last().unwrap().1
}

/// `NBD_OPT_GO`: returns (size, transmission flags) or the error reply.
pub fn go(s: &mut UnixStream, export: &str) -> Result<(u64, u16), (u32, String)> {
    let mut d = name32(export);
    d.extend_from_slice(&0u16.to_be_bytes());
    send_opt(s, OPT_GO, &d).unwrap();
    let mut info = None;
    for (_, typ, data) in opt_replies(s).unwrap() {
        if typ == REP_INFO && be16(&data) == INFO_EXPORT {
            info = Some((be64(&data[2..]), be16(&data[10..])));
        } else if typ & (1 << 31) != 0 {
            return Err((typ, String::from_utf8_lossy(&data).into()));
        }
    }
    Ok(info.expect("GO succeeded without NBD_INFO_EXPORT"))
}

impl Client {
    /// Fixed newstyle, optionally structured replies and base:allocation, then GO.
    pub fn go(sock: &Path, export: &str, structured: bool, meta: bool) -> Client {
        let mut s = hello(sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        if structured {
            negotiate_structured(&mut s);
        }
        if meta {
            assert_eq!(set_meta(&mut s, export), REP_ACK);
        }
        let (size, tflags) = go(&mut s, export).unwrap_or_else(|e| panic!("GO {export}: {e:?}"));
        Client {
            s,
            size,
            tflags,
            structured,
        }
    }

    /// The old path: (optionally structured replies, then) `NBD_OPT_EXPORT_NAME`.
    pub fn export_name(sock: &Path, export: &str, structured: bool) -> Client {
        let mut s = hello(sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        if structured {
            negotiate_structured(&mut s);
        }
        send_opt(&mut s, OPT_EXPORT_NAME, export.as_bytes()).unwrap();
        let r = rx(&mut s, 10).unwrap();
        Client {
            s,
            size: be64(&r),
            tflags: be16(&r[8..]),
            structured,
        }
    }

    /// A second handle on the same connection (to read replies on another thread).
    pub fn try_clone(&self) -> Client {
        Client {
            s: self.s.try_clone().unwrap(),
            size: self.size,
            tflags: self.tflags,
            structured: self.structured,
        }
    }

    pub fn send(
        &mut self,
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        self.try_send(flags, typ, cookie, offset, length, payload)
            .unwrap()
    }

    pub fn try_send(
        &mut self,
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b)
    }

    /// Read one whole reply.  `read_len` is the data a successful simple READ
    /// reply carries (0 for every other command).
    pub fn reply(&mut self, read_len: usize) -> std::io::Result<Reply> {
        let magic = be32(&rx(&mut self.s, 4)?);
        if magic == SIMPLE_REPLY_MAGIC {
            let h = rx(&mut self.s, 12)?;
            let error = be32(&h);
            let data = if error == 0 {
                rx(&mut self.s, read_len)?
            } else {
                Vec::new()
            };
            return Ok(Reply {
                cookie: be64(&h[4..]),
                error,
                structured: false,
                chunks: vec![],
                data,
            });
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "bad reply magic {magic:#x}");
        let mut r = Reply {
            cookie: 0,
            error: 0,
            structured: true,
            chunks: vec![],
            data: vec![],
        };
        loop {
            let h = rx(&mut self.s, 16)?;
            let (flags, typ, cookie, len) =
                (be16(&h), be16(&h[2..]), be64(&h[4..]), be32(&h[12..]));
            let p = rx(&mut self.s, len as usize)?;
            r.cookie = cookie;
            r.chunks.push((flags, typ, len));
            if typ & (1 << 15) != 0 && r.error == 0 {
                r.error = be32(&p);
            }
            if typ == REPLY_TYPE_OFFSET_DATA {
                r.data.extend_from_slice(&p[8..]);
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return Ok(r);
            }
            let m = be32(&rx(&mut self.s, 4)?);
            assert_eq!(m, STRUCTURED_REPLY_MAGIC);
        }
    }

    /// Send one request and wait for its reply.
    pub fn call(
        &mut self,
        flags: u16,
        typ: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Reply {
        self.send(flags, typ, 7, offset, length, payload);
        let read_len = if typ == CMD_READ { length as usize } else { 0 };
        let r = self.reply(read_len).unwrap();
        assert_eq!(r.cookie, 7);
        r
    }

    pub fn disconnect(mut self) {
        let _ = self.try_send(0, CMD_DISC, 0, 0, 0, &[]);
    }
}

/// True once the peer has closed: a read returns EOF or an error (reset).
pub fn closed_by_peer(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => {
            e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut
        }
    }
}

/// A `drclone serve --no-tcp --socket SOCK EXTRA...` daemon; SIGTERM on drop.
pub struct Daemon {
    pub child: std::process::Child,
    pub sock: PathBuf,
}

impl Daemon {
    pub fn start(store: &Path, sock: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let bin = assert_cmd::cargo::cargo_bin("drclone");
        let _ = std::fs::remove_file(sock);
        let child = std::process::Command::new(bin)
            .env("DRCLONE_STORE", store)
            .env_remove("DRCLONE_KEY_FILE")
            .envs(env.iter().copied())
            .args(["serve", "--no-tcp", "--socket"])
            .arg(sock)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            sock: sock.to_path_buf(),
        };
        let ctl = store.join("control.sock");
        for _ in 0..1000 {
            if UnixStream::connect(&ctl).is_ok() && sock.exists() {
                return d;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("drclone serve did not start");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait; the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().unwrap();
        std::mem::forget(self);
        st
    }

    /// Is the process still running?
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
    pub fn status_kib(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find(|l| l.starts_with(&format!("{field}:")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{field} not in /proc status"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
