//! Wire format of the TCP rendezvous store.
//!
//! Every message, in both directions, is one frame:
//!
//! ```text
//! +---------+--------+----------------+-------------------------+
//! | version | kind   | payload length | payload                 |
//! | u8 = 1  | u8     | u32 LE         | `payload length` bytes  |
//! +---------+--------+----------------+-------------------------+
//! ```
//!
//! The 6-byte header is read first and checked (version, known kind, length
//! not above that kind's limit) before a single payload byte is read, so a
//! peer can never make the reader allocate more than the limit of the kind it
//! announced. The payload is a sequence of fields, all little-endian:
//!
//! - `str` / `bytes`: `u32` length, then that many bytes (`str` is UTF-8);
//! - `list`: `u32` count, then that many `str`;
//! - `u64`, `i64`, `bool` (one byte, 0 or 1).
//!
//! Requests (client to server), kind byte and payload:
//!
//! | kind | request       | payload                                   | reply            |
//! |------|---------------|-------------------------------------------|------------------|
//! | 0x01 | `Auth`        | token `bytes`                             | `Ok`             |
//! | 0x02 | `Set`         | key `str`, value `bytes`                  | `Ok`             |
//! | 0x03 | `Get`         | key `str`, timeout ms `u64`               | `Value`/`Timeout`|
//! | 0x04 | `Wait`        | keys `list`, timeout ms `u64`             | `Ok`/`Timeout`   |
//! | 0x05 | `Add`         | key `str`, delta `i64`                    | `Int`            |
//! | 0x06 | `CompareSet`  | key `str`, expected `bytes`, desired `bytes` | `Value`       |
//! | 0x07 | `DeleteKey`   | key `str`                                 | `Bool`           |
//! | 0x08 | `NumKeys`     | (empty)                                   | `Int`            |
//! | 0x09 | `Check`       | keys `list`                               | `Bool`           |
//!
//! Responses (server to client):
//!
//! | kind | response       | payload          |
//! |------|----------------|------------------|
//! | 0x80 | `Ok`           | (empty)          |
//! | 0x81 | `Value`        | `bytes`          |
//! | 0x82 | `Int`          | `i64`            |
//! | 0x83 | `Bool`         | `bool`           |
//! | 0x84 | `Timeout`      | (empty)          |
//! | 0x85 | `Error`        | message `str`    |
//! | 0x86 | `Unauthorized` | message `str`    |
//!
//! Limits: a key is at most [`MAX_KEY_LEN`] bytes, a value at most
//! [`MAX_VALUE_LEN`], a key list at most [`MAX_KEYS`] keys, a token at most
//! [`MAX_TOKEN_LEN`], an error message at most [`MAX_MESSAGE_LEN`]. A frame
//! whose payload has bytes left over after its last field is rejected too.
//!
//! When the server has a token, the first frame of every connection must be
//! `Auth` with that token; anything else gets `Unauthorized` and the
//! connection is closed.

use crate::error::{Context, Error, Result};
use std::io::Read;

/// The protocol version this build speaks (first byte of every frame).
pub const VERSION: u8 = 1;
/// Size of a frame header: version, kind, payload length.
pub const HEADER_LEN: usize = 6;
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 4 * 1024;
/// Longest value, in bytes.
pub const MAX_VALUE_LEN: usize = 64 * 1024 * 1024;
/// Most keys in one `wait` or `check`.
pub const MAX_KEYS: usize = 4096;
/// Longest authentication token, in bytes.
pub const MAX_TOKEN_LEN: usize = 4 * 1024;
/// Longest error message in a response, in bytes.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

const LEN_FIELD: usize = 4;
const KEY_FIELD: usize = LEN_FIELD + MAX_KEY_LEN;
const VALUE_FIELD: usize = LEN_FIELD + MAX_VALUE_LEN;
const LIST_FIELD: usize = LEN_FIELD + MAX_KEYS * KEY_FIELD;

mod kind {
    pub const AUTH: u8 = 0x01;
    pub const SET: u8 = 0x02;
    pub const GET: u8 = 0x03;
    pub const WAIT: u8 = 0x04;
    pub const ADD: u8 = 0x05;
    pub const COMPARE_SET: u8 = 0x06;
    pub const DELETE_KEY: u8 = 0x07;
    pub const NUM_KEYS: u8 = 0x08;
    pub const CHECK: u8 = 0x09;

    pub const OK: u8 = 0x80;
    pub const VALUE: u8 = 0x81;
    pub const INT: u8 = 0x82;
    pub const BOOL: u8 = 0x83;
    pub const TIMEOUT: u8 = 0x84;
    pub const ERROR: u8 = 0x85;
    pub const UNAUTHORIZED: u8 = 0x86;
}

/// The kind byte of an `Auth` request (the only kind accepted before
/// authentication when the server has a token).
pub const AUTH_KIND: u8 = kind::AUTH;

/// A request from a store client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Present the shared secret (`RANKWEAVE_TOKEN`).
    Auth {
        /// The token bytes.
        token: Vec<u8>,
    },
    /// Set a key.
    Set {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
    /// Get a key, waiting up to `timeout_ms` for it.
    Get {
        /// Key.
        key: String,
        /// Server-side wait, milliseconds.
        timeout_ms: u64,
    },
    /// Wait for keys to exist.
    Wait {
        /// Keys.
        keys: Vec<String>,
        /// Server-side wait, milliseconds.
        timeout_ms: u64,
    },
    /// Atomic counter add.
    Add {
        /// Key.
        key: String,
        /// Amount to add.
        delta: i64,
    },
    /// Atomic compare-and-set.
    CompareSet {
        /// Key.
        key: String,
        /// Expected current value (empty matches a missing key).
        expected: Vec<u8>,
        /// Value to store on a match.
        desired: Vec<u8>,
    },
    /// Delete a key.
    DeleteKey {
        /// Key.
        key: String,
    },
    /// Count the keys.
    NumKeys,
    /// Check keys exist, without waiting.
    Check {
        /// Keys.
        keys: Vec<String>,
    },
}

/// A response from the store server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Done, nothing to return.
    Ok,
    /// A value (`get`, `compare_set`).
    Value(Vec<u8>),
    /// An integer (`add`, `num_keys`).
    Int(i64),
    /// A boolean (`delete_key`, `check`).
    Bool(bool),
    /// The server-side wait passed its deadline.
    Timeout,
    /// The request failed (message for the user).
    Error(String),
    /// The connection did not authenticate; it is being closed.
    Unauthorized(String),
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Kind byte.
    pub kind: u8,
    /// Payload length, already checked against the kind's limit.
    pub len: usize,
}

fn perr(detail: impl Into<String>) -> Error {
    Error::protocol(Context::op("store.decode"), detail)
}

/// Largest payload a request of `kind` may carry, or `None` for an unknown kind.
pub fn max_request_payload(kind: u8) -> Option<usize> {
    Some(match kind {
        kind::AUTH => LEN_FIELD + MAX_TOKEN_LEN,
        kind::SET => KEY_FIELD + VALUE_FIELD,
        kind::GET => KEY_FIELD + 8,
        kind::WAIT => LIST_FIELD + 8,
        kind::ADD => KEY_FIELD + 8,
        kind::COMPARE_SET => KEY_FIELD + 2 * VALUE_FIELD,
        kind::DELETE_KEY => KEY_FIELD,
        kind::NUM_KEYS => 0,
        kind::CHECK => LIST_FIELD,
        _ => return None,
    })
}

/// Largest payload a response of `kind` may carry, or `None` for an unknown kind.
pub fn max_response_payload(kind: u8) -> Option<usize> {
    Some(match kind {
        kind::OK | kind::TIMEOUT => 0,
        kind::VALUE => VALUE_FIELD,
        kind::INT => 8,
        kind::BOOL => 1,
        kind::ERROR | kind::UNAUTHORIZED => LEN_FIELD + MAX_MESSAGE_LEN,
        _ => return None,
    })
}

fn parse_header(bytes: &[u8; HEADER_LEN], limit: fn(u8) -> Option<usize>) -> Result<Header> {
    if bytes[0] != VERSION {
        return Err(perr(format!("unsupported protocol version {} (this build speaks {VERSION})", bytes[0])));
    }
    let kind = bytes[1];
    let max = limit(kind).ok_or_else(|| perr(format!("unknown frame kind {kind:#04x}")))?;
    let len = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]) as usize;
    if len > max {
        return Err(perr(format!("frame kind {kind:#04x} announces {len} payload bytes, limit is {max}")));
    }
    Ok(Header { kind, len })
}

/// Checks a request header: version, known kind, length within the kind's limit.
pub fn parse_request_header(bytes: &[u8; HEADER_LEN]) -> Result<Header> {
    parse_header(bytes, max_request_payload)
}

/// Checks a response header: version, known kind, length within the kind's limit.
pub fn parse_response_header(bytes: &[u8; HEADER_LEN]) -> Result<Header> {
    parse_header(bytes, max_response_payload)
}

/// Reads a payload of `header.len` bytes. Memory grows with the bytes that
/// actually arrive, so a peer announcing a large frame and then stalling or
/// disconnecting costs at most what it sent (and never above the limit).
pub fn read_payload<R: Read>(reader: &mut R, header: Header) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(header.len.min(64 * 1024));
    let got = reader.take(header.len as u64).read_to_end(&mut buf)?;
    if got != header.len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("connection closed after {got} of {} payload bytes", header.len),
        ));
    }
    Ok(buf)
}

/// A bounds-checked cursor over a payload.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(perr(format!("truncated {what}: need {n} bytes, {} left", self.buf.len())));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u32(&mut self, what: &str) -> Result<usize> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn i64(&mut self, what: &str) -> Result<i64> {
        Ok(self.u64(what)? as i64)
    }
    fn bool(&mut self, what: &str) -> Result<bool> {
        match self.take(1, what)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(perr(format!("{what}: invalid boolean byte {b}"))),
        }
    }
    /// A length-prefixed byte string of at most `max` bytes. The length is
    /// checked against `max` and the remaining input before any allocation.
    fn bytes(&mut self, max: usize, what: &str) -> Result<&'a [u8]> {
        let n = self.u32(what)?;
        if n > max {
            return Err(perr(format!("{what} of {n} bytes exceeds the limit of {max}")));
        }
        self.take(n, what)
    }
    fn str(&mut self, max: usize, what: &str) -> Result<String> {
        let b = self.bytes(max, what)?;
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| perr(format!("{what} is not valid UTF-8")))
    }
    fn keys(&mut self) -> Result<Vec<String>> {
        let n = self.u32("key count")?;
        if n > MAX_KEYS {
            return Err(perr(format!("{n} keys exceed the limit of {MAX_KEYS}")));
        }
        // Every key needs at least its 4-byte length, so `n` is also bounded
        // by what is actually left in the input.
        if n > self.buf.len() / LEN_FIELD {
            return Err(perr(format!("truncated key list: {n} keys announced, {} bytes left", self.buf.len())));
        }
        let mut keys = Vec::with_capacity(n);
        for _ in 0..n {
            keys.push(self.str(MAX_KEY_LEN, "key")?);
        }
        Ok(keys)
    }
    fn finish(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(perr(format!("{} unexpected trailing bytes in frame", self.buf.len())))
        }
    }
}

/// Decodes a request payload of the given (already validated) header kind.
pub fn decode_request_payload(kind: u8, payload: &[u8]) -> Result<Request> {
    let mut c = Cursor { buf: payload };
    let req = match kind {
        kind::AUTH => Request::Auth { token: c.bytes(MAX_TOKEN_LEN, "token")?.to_vec() },
        kind::SET => {
            let key = c.str(MAX_KEY_LEN, "key")?;
            Request::Set { key, value: c.bytes(MAX_VALUE_LEN, "value")?.to_vec() }
        }
        kind::GET => {
            let key = c.str(MAX_KEY_LEN, "key")?;
            Request::Get { key, timeout_ms: c.u64("timeout")? }
        }
        kind::WAIT => {
            let keys = c.keys()?;
            Request::Wait { keys, timeout_ms: c.u64("timeout")? }
        }
        kind::ADD => {
            let key = c.str(MAX_KEY_LEN, "key")?;
            Request::Add { key, delta: c.i64("delta")? }
        }
        kind::COMPARE_SET => {
            let key = c.str(MAX_KEY_LEN, "key")?;
            let expected = c.bytes(MAX_VALUE_LEN, "expected value")?.to_vec();
            Request::CompareSet { key, expected, desired: c.bytes(MAX_VALUE_LEN, "desired value")?.to_vec() }
        }
        kind::DELETE_KEY => Request::DeleteKey { key: c.str(MAX_KEY_LEN, "key")? },
        kind::NUM_KEYS => Request::NumKeys,
        kind::CHECK => Request::Check { keys: c.keys()? },
        k => return Err(perr(format!("unknown request kind {k:#04x}"))),
    };
    c.finish()?;
    Ok(req)
}

/// Decodes a response payload of the given (already validated) header kind.
pub fn decode_response_payload(kind: u8, payload: &[u8]) -> Result<Response> {
    let mut c = Cursor { buf: payload };
    let resp = match kind {
        kind::OK => Response::Ok,
        kind::VALUE => Response::Value(c.bytes(MAX_VALUE_LEN, "value")?.to_vec()),
        kind::INT => Response::Int(c.i64("integer")?),
        kind::BOOL => Response::Bool(c.bool("boolean")?),
        kind::TIMEOUT => Response::Timeout,
        kind::ERROR => Response::Error(c.str(MAX_MESSAGE_LEN, "error message")?),
        kind::UNAUTHORIZED => Response::Unauthorized(c.str(MAX_MESSAGE_LEN, "error message")?),
        k => return Err(perr(format!("unknown response kind {k:#04x}"))),
    };
    c.finish()?;
    Ok(resp)
}

fn split_frame(frame: &[u8], parse: fn(&[u8; HEADER_LEN]) -> Result<Header>) -> Result<(Header, &[u8])> {
    let head: &[u8; HEADER_LEN] = frame
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| perr(format!("truncated header: {} of {HEADER_LEN} bytes", frame.len())))?;
    let header = parse(head)?;
    let payload = &frame[HEADER_LEN..];
    if payload.len() != header.len {
        return Err(perr(format!("frame announces {} payload bytes but holds {}", header.len, payload.len())));
    }
    Ok((header, payload))
}

/// Decodes one complete request frame (header and payload, nothing more).
/// Bad input of any kind is an error, never a panic.
pub fn decode_request(frame: &[u8]) -> Result<Request> {
    let (h, payload) = split_frame(frame, parse_request_header)?;
    decode_request_payload(h.kind, payload)
}

/// Decodes one complete response frame (header and payload, nothing more).
/// Bad input of any kind is an error, never a panic.
pub fn decode_response(frame: &[u8]) -> Result<Response> {
    let (h, payload) = split_frame(frame, parse_response_header)?;
    decode_response_payload(h.kind, payload)
}

/// Builds frames, checking limits as fields are added.
struct Encoder {
    buf: Vec<u8>,
}

fn too_long(what: &str, n: usize, max: usize) -> Error {
    Error::invalid(format!("{what} of {n} bytes exceeds the store limit of {max} bytes"))
}

impl Encoder {
    fn new(kind: u8) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&[VERSION, kind, 0, 0, 0, 0]);
        Encoder { buf }
    }
    fn bytes(&mut self, b: &[u8], max: usize, what: &str) -> Result<()> {
        if b.len() > max {
            return Err(too_long(what, b.len(), max));
        }
        self.buf.reserve(4 + b.len());
        self.buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(b);
        Ok(())
    }
    fn key(&mut self, k: &str) -> Result<()> {
        self.bytes(k.as_bytes(), MAX_KEY_LEN, "key")
    }
    fn keys<S: AsRef<str>>(&mut self, keys: &[S]) -> Result<()> {
        if keys.len() > MAX_KEYS {
            return Err(Error::invalid(format!("{} keys exceed the store limit of {MAX_KEYS}", keys.len())));
        }
        self.buf.extend_from_slice(&(keys.len() as u32).to_le_bytes());
        for k in keys {
            self.key(k.as_ref())?;
        }
        Ok(())
    }
    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn finish(mut self) -> Vec<u8> {
        let len = (self.buf.len() - HEADER_LEN) as u32;
        self.buf[2..HEADER_LEN].copy_from_slice(&len.to_le_bytes());
        self.buf
    }
}

/// Encodes a request frame. Keys, values, key lists and tokens over the
/// limits are an `InvalidArgument` error (nothing is sent).
pub fn encode_request(req: &Request) -> Result<Vec<u8>> {
    let e = match req {
        Request::Auth { token } => {
            let mut e = Encoder::new(kind::AUTH);
            e.bytes(token, MAX_TOKEN_LEN, "token")?;
            e
        }
        Request::Set { key, value } => {
            let mut e = Encoder::new(kind::SET);
            e.key(key)?;
            e.bytes(value, MAX_VALUE_LEN, "value")?;
            e
        }
        Request::Get { key, timeout_ms } => {
            let mut e = Encoder::new(kind::GET);
            e.key(key)?;
            e.u64(*timeout_ms);
            e
        }
        Request::Wait { keys, timeout_ms } => {
            let mut e = Encoder::new(kind::WAIT);
            e.keys(keys)?;
            e.u64(*timeout_ms);
            e
        }
        Request::Add { key, delta } => {
            let mut e = Encoder::new(kind::ADD);
            e.key(key)?;
            e.u64(*delta as u64);
            e
        }
        Request::CompareSet { key, expected, desired } => {
            let mut e = Encoder::new(kind::COMPARE_SET);
            e.key(key)?;
            e.bytes(expected, MAX_VALUE_LEN, "expected value")?;
            e.bytes(desired, MAX_VALUE_LEN, "desired value")?;
            e
        }
        Request::DeleteKey { key } => {
            let mut e = Encoder::new(kind::DELETE_KEY);
            e.key(key)?;
            e
        }
        Request::NumKeys => Encoder::new(kind::NUM_KEYS),
        Request::Check { keys } => {
            let mut e = Encoder::new(kind::CHECK);
            e.keys(keys)?;
            e
        }
    };
    Ok(e.finish())
}

/// Length of the bytes [`encode_value_prefix`] returns.
pub const VALUE_PREFIX_LEN: usize = HEADER_LEN + LEN_FIELD;

/// The first bytes of a `Value` response frame carrying `value_len` bytes:
/// the header and the value's length field. Followed by the value itself it
/// is exactly [`encode_response`]`(&Response::Value(..))`, so a server can
/// send a stored value without copying it into the frame. A length over
/// [`MAX_VALUE_LEN`] is an `InvalidArgument` error.
pub fn encode_value_prefix(value_len: usize) -> Result<[u8; VALUE_PREFIX_LEN]> {
    if value_len > MAX_VALUE_LEN {
        return Err(too_long("value", value_len, MAX_VALUE_LEN));
    }
    let mut out = [0u8; VALUE_PREFIX_LEN];
    out[0] = VERSION;
    out[1] = kind::VALUE;
    // Both fit in u32: the value is at most 64 MiB.
    out[2..HEADER_LEN].copy_from_slice(&((LEN_FIELD + value_len) as u32).to_le_bytes());
    out[HEADER_LEN..].copy_from_slice(&(value_len as u32).to_le_bytes());
    Ok(out)
}

/// Encodes a response frame. Error messages longer than the limit are cut
/// (at a character boundary); a value over the limit is an error.
pub fn encode_response(resp: &Response) -> Result<Vec<u8>> {
    fn message(kind: u8, msg: &str) -> Result<Encoder> {
        let mut end = msg.len().min(MAX_MESSAGE_LEN);
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        let mut e = Encoder::new(kind);
        e.bytes(&msg.as_bytes()[..end], MAX_MESSAGE_LEN, "message")?;
        Ok(e)
    }
    let e = match resp {
        Response::Ok => Encoder::new(kind::OK),
        Response::Value(v) => {
            let mut e = Encoder::new(kind::VALUE);
            e.bytes(v, MAX_VALUE_LEN, "value")?;
            e
        }
        Response::Int(i) => {
            let mut e = Encoder::new(kind::INT);
            e.u64(*i as u64);
            e
        }
        Response::Bool(b) => {
            let mut e = Encoder::new(kind::BOOL);
            e.buf.push(u8::from(*b));
            e
        }
        Response::Timeout => Encoder::new(kind::TIMEOUT),
        Response::Error(m) => message(kind::ERROR, m)?,
        Response::Unauthorized(m) => message(kind::UNAUTHORIZED, m)?,
    };
    Ok(e.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_request() {
        let reqs = [
            Request::Auth { token: b"s3cret".to_vec() },
            Request::Set { key: "k".into(), value: vec![1, 2, 3] },
            Request::Get { key: "k".into(), timeout_ms: 1234 },
            Request::Wait { keys: vec!["a".into(), "bb".into()], timeout_ms: 7 },
            Request::Add { key: "c".into(), delta: -5 },
            Request::CompareSet { key: "k".into(), expected: vec![], desired: b"x".to_vec() },
            Request::DeleteKey { key: "k".into() },
            Request::NumKeys,
            Request::Check { keys: vec![] },
        ];
        for r in reqs {
            let f = encode_request(&r).unwrap();
            assert_eq!(decode_request(&f).unwrap(), r);
        }
    }

    #[test]
    fn round_trip_every_response() {
        let resps = [
            Response::Ok,
            Response::Value(vec![9; 100]),
            Response::Int(i64::MIN),
            Response::Bool(true),
            Response::Timeout,
            Response::Error("bad".into()),
            Response::Unauthorized("no".into()),
        ];
        for r in resps {
            let f = encode_response(&r).unwrap();
            assert_eq!(decode_response(&f).unwrap(), r);
        }
    }

    #[test]
    fn value_prefix_matches_the_encoder() {
        for v in [vec![], vec![5u8; 3], vec![1u8; 70_000]] {
            let mut f = encode_value_prefix(v.len()).unwrap().to_vec();
            f.extend_from_slice(&v);
            assert_eq!(f, encode_response(&Response::Value(v.clone())).unwrap());
        }
        assert!(encode_value_prefix(MAX_VALUE_LEN + 1).is_err());
    }

    #[test]
    fn header_checks_come_first() {
        assert!(parse_request_header(&[2, kind::SET, 0, 0, 0, 0]).is_err());
        assert!(parse_request_header(&[VERSION, 0x7f, 0, 0, 0, 0]).is_err());
        assert!(parse_request_header(&[VERSION, kind::GET, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(parse_request_header(&[VERSION, kind::NUM_KEYS, 1, 0, 0, 0]).is_err());
        assert_eq!(parse_request_header(&[VERSION, kind::NUM_KEYS, 0, 0, 0, 0]).unwrap().len, 0);
    }

    #[test]
    fn oversized_fields_are_rejected_by_encoder() {
        let key = "k".repeat(MAX_KEY_LEN + 1);
        assert!(matches!(encode_request(&Request::DeleteKey { key }), Err(Error::InvalidArgument(_))));
        let keys = vec![String::new(); MAX_KEYS + 1];
        assert!(matches!(encode_request(&Request::Check { keys }), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn key_count_beyond_input_is_rejected_without_allocating() {
        // 4096 keys announced, none present.
        let mut f = vec![VERSION, kind::CHECK, 4, 0, 0, 0];
        f.extend_from_slice(&(MAX_KEYS as u32).to_le_bytes());
        assert!(decode_request(&f).is_err());
    }
}
