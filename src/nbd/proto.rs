//! The NBD wire protocol: constants and pure encode/decode, per `doc/proto.md` of
//! NetworkBlockDevice/nbd.  Nothing here knows about the engine or sockets (no
//! `use crate::...`, no I/O), so a fuzz crate can include this file with `#[path]`;
//! every decoder takes a byte slice and returns an error (never panics) on short or
//! malformed input.
//!
//! Decoder entry points (names are stable: the fuzz targets call them):
//! [`client_flags`], [`option_header`], [`parse_export_name`],
//! [`parse_info_request`], [`parse_meta_request`], [`Request::decode`] (the 28-byte
//! request header), [`request_payload`] (what follows a header on the wire) and
//! [`check_request_flags`] (which command flags are allowed where).
//!
//! Implemented: fixed newstyle handshake with `NO_ZEROES`; options `EXPORT_NAME`,
//! `ABORT`, `LIST`, `INFO`, `GO` (with `NBD_INFO_EXPORT`, `NBD_INFO_NAME`,
//! `NBD_INFO_BLOCK_SIZE`), `STRUCTURED_REPLY`, `LIST_META_CONTEXT`,
//! `SET_META_CONTEXT` (`base:allocation`); every other option gets
//! `NBD_REP_ERR_UNSUP`.  Transmission: simple and structured replies
//! (`OFFSET_DATA`, `BLOCK_STATUS`, `ERROR`, `NONE`).  Extended headers are not
//! negotiated, so `NBD_CMD_FLAG_PAYLOAD_LEN` is never valid.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers only (`NBD_OPT_EXTENDED_HEADERS`, which this server does not
/// negotiate): always rejected here.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation states.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// The only error values the protocol allows.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

pub const BASE_ALLOCATION: &str = "base:allocation";
/// Longest option payload we accept (names are at most 4096 bytes).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Largest READ/WRITE payload, advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// A WRITE larger than [`MAX_PAYLOAD`] but at most this is read and discarded (the
/// stream stays in sync, the request fails with `EINVAL`); a larger one is taken as
/// a denial of service and the client is dropped (spec, "Block size constraints").
pub const MAX_DISCARDED_PAYLOAD: u32 = 256 << 20;
/// Longest string the spec allows (export names, error messages).
pub const MAX_STRING: usize = 4096;

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError(pub String);

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

type PResult<T> = Result<T, ProtoError>;

fn err<T>(msg: impl Into<String>) -> PResult<T> {
    Err(ProtoError(msg.into()))
}

/// A bounds-checked big-endian reader over a byte slice.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    pub fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        if self.buf.len() < n {
            return err(format!(
                "message truncated: wanted {n} more bytes, have {}",
                self.buf.len()
            ));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    pub fn u16(&mut self) -> PResult<u16> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> PResult<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> PResult<u64> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A string prefixed by a u32 length.
    pub fn string32(&mut self) -> PResult<String> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return err(format!("string of {n} bytes is longer than {MAX_STRING}"));
        }
        check_string(self.take(n)?)
    }
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
}

/// The server's greeting.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// Decode an option header: (option, payload length).
pub fn option_header(h: &[u8]) -> PResult<(u32, u32)> {
    let mut r = Reader::new(h);
    if r.u64()? != IHAVEOPT {
        return err("option does not start with IHAVEOPT");
    }
    Ok((r.u32()?, r.u32()?))
}

/// The client's flags (sent once, right after the greeting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Decode the client's 32-bit flags.  Unknown bits are an error: the server MUST
/// drop the connection (spec, "Client flags"); `NO_ZEROES` is allowed because the
/// greeting advertises `NBD_FLAG_NO_ZEROES`.
pub fn client_flags(b: &[u8]) -> PResult<ClientFlags> {
    let f = Reader::new(b).u32()?;
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if f & !known != 0 {
        return err(format!("unknown client flags {:#x}", f & !known));
    }
    Ok(ClientFlags {
        fixed_newstyle: f & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: f & FLAG_C_NO_ZEROES != 0,
    })
}

/// `NBD_OPT_EXPORT_NAME` payload: the whole payload is the name (a spec string:
/// UTF-8, no NUL, at most [`MAX_STRING`] bytes).
pub fn parse_export_name(data: &[u8]) -> PResult<String> {
    check_string(data)
}

fn check_string(b: &[u8]) -> PResult<String> {
    if b.len() > MAX_STRING {
        return err(format!(
            "string of {} bytes is longer than {MAX_STRING}",
            b.len()
        ));
    }
    if b.contains(&0) {
        return err("string contains NUL");
    }
    String::from_utf8(b.to_vec()).map_err(|_| ProtoError("string is not UTF-8".into()))
}

/// An option reply.
pub fn option_reply(opt: u32, typ: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` payload: (export name, requested info types).
pub fn parse_info_request(data: &[u8]) -> PResult<(String, Vec<u16>)> {
    let mut r = Reader::new(data);
    let name = r.string32()?;
    let n = r.u16()? as usize;
    let mut infos = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        infos.push(r.u16()?);
    }
    if r.remaining() != 0 {
        return err("trailing bytes after the info requests");
    }
    Ok((name, infos))
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` payload: (export name, queries).
pub fn parse_meta_request(data: &[u8]) -> PResult<(String, Vec<String>)> {
    let mut r = Reader::new(data);
    let name = r.string32()?;
    let n = r.u32()? as usize;
    if n > 1024 {
        return err(format!("{n} meta context queries is too many"));
    }
    let mut q = Vec::with_capacity(n);
    for _ in 0..n {
        q.push(r.string32()?);
    }
    if r.remaining() != 0 {
        return err("trailing bytes after the meta context queries");
    }
    Ok((name, q))
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

pub fn info_name(name: &str) -> Vec<u8> {
    let mut v = INFO_NAME.to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v
}

/// `NBD_REP_SERVER` payload for one export name.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

/// `NBD_REP_META_CONTEXT` payload.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = id.to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

/// Reply to `NBD_OPT_EXPORT_NAME` (no zero padding: we set `NO_ZEROES`, and honour
/// the client's choice).
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(134);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        v.extend_from_slice(&[0u8; 124]);
    }
    v
}

/// A transmission request header (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub const REQUEST_LEN: usize = 28;

impl Request {
    pub fn decode(b: &[u8]) -> PResult<Request> {
        let mut r = Reader::new(b);
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return err(format!("bad request magic {magic:#x}"));
        }
        Ok(Request {
            flags: r.u16()?,
            typ: r.u16()?,
            cookie: r.u64()?,
            offset: r.u64()?,
            length: r.u32()?,
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// What follows a request header on the wire, decided from the header alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Nothing: the next request header follows.
    None,
    /// A WRITE payload of this many bytes, to read and serve.
    Data(u32),
    /// A WRITE payload over [`MAX_PAYLOAD`]: read and discard this many bytes to
    /// stay in sync, then fail the request with `EINVAL`.
    Discard(u32),
    /// A WRITE payload over [`MAX_DISCARDED_PAYLOAD`]: drop the client.
    TooLarge(u32),
}

/// The payload that follows `req`.  Only `NBD_CMD_WRITE` carries one; its size is
/// the request length (compact headers: `NBD_CMD_FLAG_PAYLOAD_LEN` does not change
/// it, and is rejected by [`check_request_flags`]).
pub fn request_payload(req: &Request) -> Payload {
    if req.typ != CMD_WRITE || req.length == 0 {
        Payload::None
    } else if req.length <= MAX_PAYLOAD {
        Payload::Data(req.length)
    } else if req.length <= MAX_DISCARDED_PAYLOAD {
        Payload::Discard(req.length)
    } else {
        Payload::TooLarge(req.length)
    }
}

/// The command flags the spec allows on command `typ`, given the transmission
/// flags `tflags` the server announced (spec, "Command flags" and "Request
/// types"):
///
/// | flag        | allowed on                     | only if announced      |
/// |-------------|--------------------------------|------------------------|
/// | FUA         | every command                  | `SEND_FUA`             |
/// | NO_HOLE     | WRITE_ZEROES                   | `SEND_WRITE_ZEROES`    |
/// | DF          | READ                           | `SEND_DF`              |
/// | REQ_ONE     | BLOCK_STATUS                   | (meta context)         |
/// | FAST_ZERO   | WRITE_ZEROES                   | `SEND_FAST_ZERO`       |
/// | PAYLOAD_LEN | never (no extended headers)    |                        |
/// | bits 6..15  | never (unknown)                |                        |
///
/// FUA is accepted on every command because the spec says the server "MUST
/// accept all commands with this bit set (even by ignoring the bit)".
pub fn allowed_command_flags(typ: u16, tflags: u16) -> u16 {
    let mut ok = 0;
    if tflags & TF_SEND_FUA != 0 {
        ok |= CMD_FLAG_FUA;
    }
    match typ {
        CMD_READ if tflags & TF_SEND_DF != 0 => ok |= CMD_FLAG_DF,
        CMD_WRITE_ZEROES => {
            if tflags & TF_SEND_WRITE_ZEROES != 0 {
                ok |= CMD_FLAG_NO_HOLE;
            }
            if tflags & TF_SEND_FAST_ZERO != 0 {
                ok |= CMD_FLAG_FAST_ZERO;
            }
        }
        CMD_BLOCK_STATUS => ok |= CMD_FLAG_REQ_ONE,
        _ => {}
    }
    ok
}

/// Check a request's flags against what is allowed (see
/// [`allowed_command_flags`]).  Errors name the offending bits; the caller
/// answers them with `NBD_EINVAL` ("The server SHOULD return NBD_EINVAL if it
/// receives an unknown command flag ... or a flag not explicitly documented as
/// applicable to the given request").
pub fn check_request_flags(req: &Request, tflags: u16) -> PResult<()> {
    let bad = req.flags & !allowed_command_flags(req.typ, tflags);
    if bad != 0 {
        return err(format!(
            "command flags {bad:#x} are not allowed on command {}",
            req.typ
        ));
    }
    Ok(())
}

pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

pub fn structured_header(cookie: u64, flags: u16, typ: u16, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A structured error chunk (always the final chunk: DONE set).
pub fn structured_error(cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let mut v = structured_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    )
    .to_vec();
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// A `BLOCK_STATUS` chunk for one context: descriptors of (length, flags).
pub fn block_status(cookie: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len() as u32;
    let mut v = structured_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, len).to_vec();
    v.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_short_or_bad_input_errors() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            typ: CMD_WRITE,
            cookie: 77,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        for n in 0..REQUEST_LEN {
            assert!(Request::decode(&r.encode()[..n]).is_err());
        }
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert!(Request::decode(&bad).unwrap_err().0.contains("magic"));
    }

    #[test]
    fn option_payloads_parse_and_reject_garbage() {
        let mut go = Vec::new();
        go.extend_from_slice(&5u32.to_be_bytes());
        go.extend_from_slice(b"app/d");
        go.extend_from_slice(&2u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        go.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&go).unwrap(),
            ("app/d".into(), vec![3, 1])
        );
        for n in 0..go.len() {
            assert!(parse_info_request(&go[..n]).is_err(), "prefix {n}");
        }
        let mut long = go.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_err());
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&huge).is_err());

        let mut meta = Vec::new();
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(b"x");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(
            parse_meta_request(&meta).unwrap(),
            ("x".into(), vec![BASE_ALLOCATION.to_string()])
        );
        for n in 0..meta.len() {
            assert!(parse_meta_request(&meta[..n]).is_err());
        }
        assert!(option_header(&[0u8; 16]).is_err());
        assert!(option_header(&[0u8; 3]).is_err());
    }

    #[test]
    fn client_flags_reject_unknown_bits() {
        assert_eq!(
            client_flags(&3u32.to_be_bytes()).unwrap(),
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            }
        );
        assert_eq!(
            client_flags(&0u32.to_be_bytes()).unwrap(),
            ClientFlags::default()
        );
        for bad in [0x103u32, 4, 1 << 31] {
            assert!(client_flags(&bad.to_be_bytes()).is_err(), "{bad:#x}");
        }
        assert!(client_flags(&[0, 0, 1]).is_err());
    }

    #[test]
    fn export_names_are_spec_strings() {
        assert_eq!(parse_export_name(b"g/d@1").unwrap(), "g/d@1");
        assert_eq!(parse_export_name(b"").unwrap(), "");
        assert!(parse_export_name(b"a\0b").is_err());
        assert!(parse_export_name(&[0xff, 0xfe]).is_err());
        assert!(parse_export_name(&[b'a'; MAX_STRING + 1]).is_err());
        assert!(parse_export_name(&[b'a'; MAX_STRING]).is_ok());
    }

    #[test]
    fn payload_follows_only_writes_and_is_bounded() {
        let mut r = Request {
            flags: 0,
            typ: CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: 4096,
        };
        assert_eq!(request_payload(&r), Payload::Data(4096));
        r.flags = CMD_FLAG_PAYLOAD_LEN;
        assert_eq!(request_payload(&r), Payload::Data(4096));
        r.length = 0;
        assert_eq!(request_payload(&r), Payload::None);
        r.length = MAX_PAYLOAD + 1;
        assert_eq!(request_payload(&r), Payload::Discard(MAX_PAYLOAD + 1));
        r.length = u32::MAX;
        assert_eq!(request_payload(&r), Payload::TooLarge(u32::MAX));
        for typ in [CMD_READ, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS, 99] {
            r.typ = typ;
            assert_eq!(request_payload(&r), Payload::None);
        }
    }

    #[test]
    fn command_flags_follow_the_spec_table() {
        let all =
            TF_HAS_FLAGS | TF_SEND_FUA | TF_SEND_DF | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        let req = |typ, flags| Request {
            flags,
            typ,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        let ok = |typ, flags, tf| check_request_flags(&req(typ, flags), tf).is_ok();
        for typ in 0..=8u16 {
            assert!(ok(typ, CMD_FLAG_FUA, all));
            assert!(!ok(typ, CMD_FLAG_FUA, TF_HAS_FLAGS));
            assert!(!ok(typ, CMD_FLAG_PAYLOAD_LEN, all));
            for bit in 6..16 {
                assert!(!ok(typ, 1 << bit, all));
            }
            assert_eq!(ok(typ, CMD_FLAG_DF, all), typ == CMD_READ);
            assert_eq!(ok(typ, CMD_FLAG_REQ_ONE, all), typ == CMD_BLOCK_STATUS);
            assert_eq!(ok(typ, CMD_FLAG_NO_HOLE, all), typ == CMD_WRITE_ZEROES);
            assert_eq!(ok(typ, CMD_FLAG_FAST_ZERO, all), typ == CMD_WRITE_ZEROES);
        }
        assert!(!ok(CMD_READ, CMD_FLAG_DF, all & !TF_SEND_DF));
        assert!(!ok(
            CMD_WRITE_ZEROES,
            CMD_FLAG_FAST_ZERO,
            all & !TF_SEND_FAST_ZERO
        ));
        assert!(!ok(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, TF_SEND_FUA));
    }

    #[test]
    fn replies_have_the_documented_layout() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        let s = simple_reply(9, EIO);
        assert_eq!(u32::from_be_bytes(s[4..8].try_into().unwrap()), 5);
        let e = structured_error(1, EPERM, "read-only");
        assert_eq!(e.len(), 20 + 6 + 9);
        let bs = block_status(1, 1, &[(4096, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(u32::from_be_bytes(bs[16..20].try_into().unwrap()), 12);
        assert_eq!(export_name_reply(1, 2, false).len(), 134);
        assert_eq!(export_name_reply(1, 2, true).len(), 10);
        assert_eq!(option_reply(OPT_GO, REP_ACK, &[]).len(), 20);
    }
}

// ---------------------------------------------------------------------------
// Client side: what a client sends during option haggling and decodes from the
// server (used by `super::client`).  Same rules: pure, bounds-checked, no panics.

/// The IANA port of NBD, used when an `nbd://` URI names none.
pub const DEFAULT_PORT: u16 = 10809;
/// Oldstyle greeting's second magic (unsupported by the client).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
/// Error chunk with an offset (`error`, message, then a 64-bit offset).
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// `qemu:dirty-bitmap:*` state: the block was written since the bitmap started.
pub const STATE_DIRTY: u32 = 1 << 0;
/// Prefix of qemu's dirty-bitmap metadata contexts.
pub const QEMU_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// The metadata context name qemu (`qemu-nbd -B NAME`, `qemu-storage-daemon`)
/// gives the persistent dirty bitmap `name`.
pub fn dirty_bitmap_context(name: &str) -> String {
    format!("{QEMU_DIRTY_BITMAP}{name}")
}

/// Decode the server's 18-byte greeting; returns its handshake flags.  Errors on
/// a non-NBD peer and on oldstyle servers (which this client does not speak).
pub fn parse_greeting(b: &[u8]) -> PResult<u16> {
    let mut r = Reader::new(b);
    if r.u64()? != NBDMAGIC {
        return err("peer is not an NBD server (no NBDMAGIC)");
    }
    match r.u64()? {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => return err("server speaks the oldstyle handshake, not newstyle"),
        m => return err(format!("bad greeting magic {m:#x}")),
    }
    let flags = r.u16()?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return err("server does not offer the fixed newstyle handshake");
    }
    Ok(flags)
}

/// An option request: `IHAVEOPT`, option, length, data.
pub fn option_request(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` payload (the inverse of [`parse_info_request`]).
pub fn info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` payload (the inverse of
/// [`parse_meta_request`]).
pub fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Decode an option reply header: (option, reply type, payload length).
pub fn option_reply_header(h: &[u8]) -> PResult<(u32, u32, u32)> {
    let mut r = Reader::new(h);
    let magic = r.u64()?;
    if magic != OPT_REPLY_MAGIC {
        return err(format!("bad option reply magic {magic:#x}"));
    }
    Ok((r.u32()?, r.u32()?, r.u32()?))
}

/// What an `NBD_REP_INFO` reply says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// Export size in bytes and transmission flags.
    Export { size: u64, flags: u16 },
    /// Block size constraints in bytes: minimum, preferred, maximum.
    BlockSize { min: u32, preferred: u32, max: u32 },
    /// Any other info type (name, description, ...), ignored by the client.
    Other(u16),
}

/// Decode an `NBD_REP_INFO` payload.  Known types must have their exact length.
pub fn parse_info(data: &[u8]) -> PResult<Info> {
    let mut r = Reader::new(data);
    let typ = r.u16()?;
    let info = match typ {
        INFO_EXPORT => Info::Export {
            size: r.u64()?,
            flags: r.u16()?,
        },
        INFO_BLOCK_SIZE => Info::BlockSize {
            min: r.u32()?,
            preferred: r.u32()?,
            max: r.u32()?,
        },
        other => return Ok(Info::Other(other)),
    };
    if r.remaining() != 0 {
        return err(format!("NBD_INFO type {typ} has trailing bytes"));
    }
    Ok(info)
}

/// Decode an `NBD_REP_META_CONTEXT` payload: (context id, name).
pub fn parse_rep_meta_context(data: &[u8]) -> PResult<(u32, String)> {
    let mut r = Reader::new(data);
    let id = r.u32()?;
    let rest = r.take(r.remaining())?;
    Ok((id, check_string(rest)?))
}

/// Decode a simple reply (16 bytes, magic included): (error, cookie).
pub fn parse_simple_reply(b: &[u8]) -> PResult<(u32, u64)> {
    let mut r = Reader::new(b);
    let magic = r.u32()?;
    if magic != SIMPLE_REPLY_MAGIC {
        return err(format!("bad simple reply magic {magic:#x}"));
    }
    Ok((r.u32()?, r.u64()?))
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    /// Payload length in bytes.
    pub length: u32,
}

impl ChunkHeader {
    /// Decode the 20-byte header (magic included); the inverse of
    /// [`structured_header`].
    pub fn decode(b: &[u8]) -> PResult<ChunkHeader> {
        let mut r = Reader::new(b);
        let magic = r.u32()?;
        if magic != STRUCTURED_REPLY_MAGIC {
            return err(format!("bad structured reply magic {magic:#x}"));
        }
        Ok(ChunkHeader {
            flags: r.u16()?,
            typ: r.u16()?,
            cookie: r.u64()?,
            length: r.u32()?,
        })
    }

    /// Whether this is the last chunk of its reply.
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    /// Whether this is an error chunk (bit 15 of the type).
    pub fn is_error(&self) -> bool {
        self.typ & (1 << 15) != 0
    }
}

/// Decode an `OFFSET_HOLE` payload (exactly 12 bytes): (offset, nonzero length).
pub fn parse_offset_hole(data: &[u8]) -> PResult<(u64, u32)> {
    if data.len() != 12 {
        return err(format!(
            "OFFSET_HOLE payload of {} bytes, not 12",
            data.len()
        ));
    }
    let mut r = Reader::new(data);
    let (off, len) = (r.u64()?, r.u32()?);
    if len == 0 {
        return err("OFFSET_HOLE of zero bytes");
    }
    Ok((off, len))
}

/// Decode an error chunk payload: (errno, message, offset for `ERROR_OFFSET`).
/// Other error types may carry trailing fields, which are ignored.
pub fn parse_error_chunk(typ: u16, data: &[u8]) -> PResult<(u32, String, Option<u64>)> {
    let mut r = Reader::new(data);
    let errno = r.u32()?;
    let n = r.u16()? as usize;
    let msg = String::from_utf8_lossy(r.take(n)?).into_owned();
    let off = if typ == REPLY_TYPE_ERROR_OFFSET {
        Some(r.u64()?)
    } else {
        None
    };
    if typ == REPLY_TYPE_ERROR && r.remaining() != 0 {
        return err("trailing bytes after an error chunk's message");
    }
    Ok((errno, msg, off))
}

/// Decode a `BLOCK_STATUS` payload: (context id, descriptors of (length, flags)).
/// Needs at least one descriptor, and no zero lengths.
pub fn parse_block_status(data: &[u8]) -> PResult<(u32, Vec<(u32, u32)>)> {
    if data.len() < 12 || (data.len() - 4) % 8 != 0 {
        return err(format!(
            "BLOCK_STATUS payload of {} bytes is not 4 + 8*n (n >= 1)",
            data.len()
        ));
    }
    let mut r = Reader::new(data);
    let id = r.u32()?;
    let mut d = Vec::with_capacity((data.len() - 4) / 8);
    while r.remaining() > 0 {
        let (len, flags) = (r.u32()?, r.u32()?);
        if len == 0 {
            return err("BLOCK_STATUS descriptor of zero bytes");
        }
        d.push((len, flags));
    }
    Ok((id, d))
}

/// The name of an NBD errno, for messages.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}

#[cfg(test)]
mod client_tests {
    use super::*;

    #[test]
    fn client_encoders_are_the_inverse_of_the_server_decoders() {
        let go = info_request("app/d", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            parse_info_request(&go).unwrap(),
            ("app/d".into(), vec![INFO_BLOCK_SIZE, INFO_NAME])
        );
        let q = [BASE_ALLOCATION, "qemu:dirty-bitmap:b0"];
        let meta = meta_request("x", &q);
        assert_eq!(
            parse_meta_request(&meta).unwrap(),
            ("x".into(), q.iter().map(|s| s.to_string()).collect())
        );
        let o = option_request(OPT_GO, &go);
        assert_eq!(option_header(&o[..16]).unwrap(), (OPT_GO, go.len() as u32));
        assert_eq!(&o[16..], &go[..]);
        let rep = option_reply(OPT_GO, REP_INFO, &info_export(1 << 30, TF_HAS_FLAGS));
        assert_eq!(
            option_reply_header(&rep[..20]).unwrap(),
            (OPT_GO, REP_INFO, 12)
        );
        assert_eq!(
            parse_info(&rep[20..]).unwrap(),
            Info::Export {
                size: 1 << 30,
                flags: TF_HAS_FLAGS
            }
        );
        assert_eq!(
            parse_info(&info_block_size(1, 4096, 1 << 25)).unwrap(),
            Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: 1 << 25
            }
        );
        assert_eq!(parse_info(&info_name("n")).unwrap(), Info::Other(INFO_NAME));
        assert_eq!(
            parse_rep_meta_context(&rep_meta_context(7, BASE_ALLOCATION)).unwrap(),
            (7, BASE_ALLOCATION.into())
        );
        assert_eq!(dirty_bitmap_context("b0"), "qemu:dirty-bitmap:b0");
        assert_eq!(
            parse_greeting(&greeting()).unwrap(),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
    }

    #[test]
    fn client_decoders_reject_short_or_bad_input() {
        let g = greeting();
        for n in 0..g.len() {
            assert!(parse_greeting(&g[..n]).is_err());
        }
        let mut old = g;
        old[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        assert!(parse_greeting(&old).unwrap_err().0.contains("oldstyle"));
        let mut unfixed = g;
        unfixed[16..18].copy_from_slice(&0u16.to_be_bytes());
        assert!(parse_greeting(&unfixed).is_err());
        assert!(parse_greeting(b"HTTP/1.1 200 OK\r\n\r\n").is_err());

        let rep = option_reply(OPT_GO, REP_ACK, &[]);
        for n in 0..20 {
            assert!(option_reply_header(&rep[..n]).is_err());
        }
        assert!(option_reply_header(&[0u8; 20]).is_err());
        let ie = info_export(5, 1);
        for n in 0..ie.len() {
            assert!(parse_info(&ie[..n]).is_err(), "prefix {n}");
        }
        let mut long = ie.clone();
        long.push(0);
        assert!(parse_info(&long).is_err());
        assert!(parse_rep_meta_context(&[0, 0, 1]).is_err());
        assert!(parse_rep_meta_context(&rep_meta_context(1, "a\0b")).is_err());
    }

    #[test]
    fn reply_chunks_round_trip_and_are_bounds_checked() {
        let s = simple_reply(42, EIO);
        assert_eq!(parse_simple_reply(&s).unwrap(), (EIO, 42));
        assert!(parse_simple_reply(&s[..15]).is_err());
        assert!(parse_simple_reply(&structured_header(1, 0, 0, 0)[..16]).is_err());

        let h = structured_header(9, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 4104);
        let c = ChunkHeader::decode(&h).unwrap();
        assert_eq!(
            c,
            ChunkHeader {
                flags: REPLY_FLAG_DONE,
                typ: REPLY_TYPE_OFFSET_DATA,
                cookie: 9,
                length: 4104
            }
        );
        assert!(c.done() && !c.is_error());
        for n in 0..20 {
            assert!(ChunkHeader::decode(&h[..n]).is_err());
        }
        assert!(ChunkHeader::decode(&s[..]).is_err());

        let e = structured_error(3, EPERM, "read-only");
        let ch = ChunkHeader::decode(&e[..20]).unwrap();
        assert!(ch.is_error() && ch.done());
        assert_eq!(
            parse_error_chunk(ch.typ, &e[20..]).unwrap(),
            (EPERM, "read-only".into(), None)
        );
        for n in 0..e.len() - 20 {
            assert!(parse_error_chunk(ch.typ, &e[20..20 + n]).is_err(), "{n}");
        }
        let mut eo = e[20..].to_vec();
        eo.extend_from_slice(&77u64.to_be_bytes());
        assert_eq!(
            parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &eo).unwrap(),
            (EPERM, "read-only".into(), Some(77))
        );
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &eo).is_err());
        // A message length past the payload is an error, not a panic.
        let lying = [0, 0, 0, 5, 0xff, 0xff, b'x'];
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &lying).is_err());

        let mut hole = 4096u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&512u32.to_be_bytes());
        assert_eq!(parse_offset_hole(&hole).unwrap(), (4096, 512));
        assert!(parse_offset_hole(&hole[..11]).is_err());
        hole[8..12].copy_from_slice(&0u32.to_be_bytes());
        assert!(parse_offset_hole(&hole).is_err());

        let bs = block_status(1, 5, &[(4096, STATE_HOLE), (8192, 0)]);
        assert_eq!(
            parse_block_status(&bs[20..]).unwrap(),
            (5, vec![(4096, STATE_HOLE), (8192, 0)])
        );
        for n in 0..bs.len() - 20 {
            let whole = n >= 12 && (n - 4) % 8 == 0;
            assert_eq!(parse_block_status(&bs[20..20 + n]).is_ok(), whole, "{n}");
        }
        assert!(parse_block_status(&block_status(1, 5, &[(0, 0)])[20..]).is_err());
        assert_eq!(errno_name(EIO), "EIO");
        assert_eq!(errno_name(999), "unknown error");
    }
}
