//! One client connection: its socket, the bytes read but not yet parsed,
//! the replies not yet written, and what it is doing now.
//!
//! A connection never blocks the event loop. Input is appended to `inbuf`
//! only as it arrives (growth checked with `try_reserve`), and a frame is
//! taken from it once the header has passed the protocol's checks and the
//! whole payload is there; the header's limit therefore bounds the buffer.
//! Replies are queued as chunks; a stored value is shared with the map
//! (`Arc`), never copied, however many clients read it. An idle connection
//! holds no buffer at all: only this struct and the kernel's socket.

use super::waiters::WaiterId;
use crate::store::protocol::{self, Header, Request, Response, HEADER_LEN};
use mio::net::TcpStream;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// Input buffered beyond the frame being read (pipelined requests, or bytes
/// sent while a request waits). Past it the connection stops reading until
/// the earlier work is done.
const READ_AHEAD: usize = 64 * 1024;
/// A buffer larger than this is released once it is empty again, so that a
/// big `set` or `wait` does not pin its memory on a connection that goes
/// quiet (thousands of ranks each sending one long key list would otherwise
/// keep thousands of such buffers).
const KEEP_CAPACITY: usize = 4 * 1024;
/// Values up to this size are copied into the reply frame (one write);
/// larger ones are sent from the shared copy.
const INLINE_VALUE: usize = 4 * 1024;

/// What the connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Reading requests and answering them.
    Open,
    /// A `get` or `wait` is parked in the waiter registry; nothing else is
    /// processed until it is answered (the protocol is one request at a
    /// time), but input is still read so a departure is noticed.
    Waiting(WaiterId),
    /// Sending a last error reply, then discarding input until `until`, so
    /// that the reply is not destroyed by a reset (unread input on close).
    Closing {
        /// When the connection is closed regardless.
        until: Instant,
        /// Whether the write side has been shut down (after the reply).
        write_shut: bool,
    },
}

/// A reply waiting to be written.
enum Chunk {
    Owned(Vec<u8>, usize),
    Shared(Arc<Vec<u8>>, usize),
}

impl Chunk {
    fn rest(&self) -> &[u8] {
        match self {
            Chunk::Owned(v, pos) => &v[*pos..],
            Chunk::Shared(v, pos) => &v[*pos..],
        }
    }
    fn advance(&mut self, n: usize) {
        match self {
            Chunk::Owned(_, pos) | Chunk::Shared(_, pos) => *pos += n,
        }
    }
}

/// A reply to queue.
pub(super) enum Reply {
    /// A response encoded as usual.
    Frame(Response),
    /// A `Value` response whose bytes are shared with the map.
    Value(Arc<Vec<u8>>),
}

/// The next thing in the input buffer.
pub(super) enum Parsed {
    /// Not a whole frame yet.
    Incomplete,
    /// A whole, decoded request (already removed from the buffer).
    Request(Request),
    /// The header or payload is malformed; the message is for the client.
    Bad(String),
    /// An unauthenticated connection sent something other than `Auth`.
    NotAuth,
}

/// What a read brought.
pub(super) enum Fill {
    /// Some bytes (maybe more are waiting: read again when there is room).
    Progress,
    /// Nothing more for now.
    WouldBlock,
    /// The peer closed its side.
    Eof,
    /// The read-ahead room is full.
    Full,
}

/// One client connection.
pub(super) struct Conn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    inbuf: Vec<u8>,
    /// The checked header of the frame being read, once it is complete.
    header: Option<Header>,
    out: VecDeque<Chunk>,
    /// Passed the token (always true when the server has none).
    pub authed: bool,
    /// Has not yet completed its handshake: authentication when the server
    /// has a token, else its first request. Fresh connections are the
    /// first to be shed under pressure.
    pub fresh: bool,
    pub phase: Phase,
    pub accepted: Instant,
    /// Last time bytes arrived.
    pub last_read: Instant,
    /// Last time queued output made progress (or was queued on an empty queue).
    pub last_write: Instant,
    /// The deadline this connection has in the timer heap, if any.
    pub scheduled: Option<Instant>,
}

impl Conn {
    pub fn new(stream: TcpStream, peer: SocketAddr, authed: bool, now: Instant) -> Conn {
        Conn {
            stream,
            peer,
            inbuf: Vec::new(),
            header: None,
            out: VecDeque::new(),
            authed,
            fresh: true,
            phase: Phase::Open,
            accepted: now,
            last_read: now,
            last_write: now,
            scheduled: None,
        }
    }

    /// True while replies wait to be written.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// True when a partial frame is buffered.
    pub fn mid_frame(&self) -> bool {
        !self.inbuf.is_empty()
    }

    /// Queues a reply. Fails only if the reply cannot be encoded, which
    /// cannot happen for replies built from checked requests; the caller
    /// then closes the connection.
    pub fn push(&mut self, reply: Reply, now: Instant) -> crate::Result<()> {
        if self.out.is_empty() {
            self.last_write = now;
        }
        match reply {
            Reply::Frame(resp) => {
                let frame = protocol::encode_response(&resp)
                    .or_else(|e| protocol::encode_response(&Response::Error(e.to_string())))?;
                self.out.push_back(Chunk::Owned(frame, 0));
            }
            Reply::Value(v) => {
                let prefix = protocol::encode_value_prefix(v.len())?;
                if v.len() <= INLINE_VALUE {
                    let mut frame = Vec::with_capacity(prefix.len() + v.len());
                    frame.extend_from_slice(&prefix);
                    frame.extend_from_slice(&v);
                    self.out.push_back(Chunk::Owned(frame, 0));
                } else {
                    self.out.push_back(Chunk::Owned(prefix.to_vec(), 0));
                    self.out.push_back(Chunk::Shared(v, 0));
                }
            }
        }
        Ok(())
    }

    /// Writes queued replies until done (`Ok(true)`) or the socket is full
    /// (`Ok(false)`).
    pub fn flush(&mut self, now: Instant) -> io::Result<bool> {
        while let Some(front) = self.out.front_mut() {
            let rest = front.rest();
            if rest.is_empty() {
                self.out.pop_front();
                continue;
            }
            match self.stream.write(rest) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes")),
                Ok(n) => {
                    front.advance(n);
                    self.last_write = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.out.capacity() > 16 {
            self.out = VecDeque::new();
        }
        Ok(true)
    }

    /// How many more bytes may be buffered now.
    fn room(&self) -> usize {
        let frame = self.header.map_or(HEADER_LEN, |h| HEADER_LEN + h.len);
        let limit = match self.phase {
            Phase::Open => frame.max(READ_AHEAD),
            // Only to notice a departure (and tolerate a little pipelining).
            Phase::Waiting(_) | Phase::Closing { .. } => READ_AHEAD,
        };
        limit.saturating_sub(self.inbuf.len())
    }

    /// Reads what the socket has, up to the room left, through `scratch`.
    pub fn fill(&mut self, scratch: &mut [u8], now: Instant) -> io::Result<Fill> {
        let room = self.room();
        if room == 0 {
            return Ok(Fill::Full);
        }
        let n = room.min(scratch.len());
        match self.stream.read(&mut scratch[..n]) {
            Ok(0) => Ok(Fill::Eof),
            Ok(got) => {
                self.last_read = now;
                if matches!(self.phase, Phase::Closing { .. }) {
                    // Discarded: only the room matters (it bounds the linger).
                    self.inbuf.truncate(0);
                    return Ok(Fill::Progress);
                }
                self.inbuf.try_reserve(got).map_err(|_| {
                    io::Error::new(io::ErrorKind::OutOfMemory, format!("cannot buffer {got} more input bytes"))
                })?;
                self.inbuf.extend_from_slice(&scratch[..got]);
                Ok(Fill::Progress)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Fill::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Fill::Progress),
            Err(e) => Err(e),
        }
    }

    /// Takes the next request from the input buffer if it is complete.
    /// `require_auth`: only an `Auth` frame is acceptable.
    pub fn parse(&mut self, require_auth: bool) -> Parsed {
        let header = match self.header {
            Some(h) => h,
            None => {
                let Some(head) = self.inbuf.get(..HEADER_LEN).and_then(|h| <&[u8; HEADER_LEN]>::try_from(h).ok())
                else {
                    return Parsed::Incomplete;
                };
                let h = match protocol::parse_request_header(head) {
                    Ok(h) => h,
                    Err(e) => return Parsed::Bad(e.to_string()),
                };
                if require_auth && h.kind != protocol::AUTH_KIND {
                    return Parsed::NotAuth;
                }
                self.header = Some(h);
                h
            }
        };
        let total = HEADER_LEN + header.len;
        let Some(payload) = self.inbuf.get(HEADER_LEN..total) else { return Parsed::Incomplete };
        let decoded = protocol::decode_request_payload(header.kind, payload);
        self.header = None;
        self.inbuf.drain(..total);
        if self.inbuf.is_empty() && self.inbuf.capacity() > KEEP_CAPACITY {
            self.inbuf = Vec::new();
        }
        match decoded {
            Ok(r) => Parsed::Request(r),
            Err(e) => Parsed::Bad(e.to_string()),
        }
    }

    /// Enters the closing phase: the queued reply goes out, then input is
    /// discarded until EOF or `until`.
    pub fn start_closing(&mut self, until: Instant) {
        self.phase = Phase::Closing { until, write_shut: false };
        self.inbuf = Vec::new();
        self.header = None;
    }
}
