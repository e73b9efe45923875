//! Nonblocking frame I/O with deadlines.
//!
//! An [`Outgoing`] frame is a header plus a borrowed payload, written with
//! one `sendmsg` of two iovecs per attempt (no copy, no allocation). An
//! [`Incoming`] frame reads its header and payload with one `recvmsg` of two
//! iovecs per attempt straight into the caller's buffer; the header is checked
//! as soon as its 32 bytes are in. [`drive`] advances up to one of each at
//! once and sleeps in `poll(2)` on both sockets until the deadline, so a ring
//! where every rank sends and receives large buffers always progresses.
//!
//! Sends use `MSG_NOSIGNAL`: a write to a dead peer returns `EPIPE` instead of
//! raising `SIGPIPE`, and the process-wide signal disposition is left alone.

use super::header::{HEADER_LEN, MAX_ABORT_PAYLOAD};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use socket2::Socket;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;

/// A frame being written.
pub(crate) struct Outgoing<'a> {
    pub peer: usize,
    pub sock: &'a Socket,
    pub hdr: [u8; HEADER_LEN],
    pub data: &'a [u8],
    pub sent: usize,
}

impl<'a> Outgoing<'a> {
    pub fn new(peer: usize, sock: &'a Socket, hdr: [u8; HEADER_LEN], data: &'a [u8]) -> Self {
        Outgoing { peer, sock, hdr, data, sent: 0 }
    }

    pub fn total(&self) -> usize {
        HEADER_LEN + self.data.len()
    }

    pub fn done(&self) -> bool {
        self.sent == self.total()
    }

    /// Writes until done or the socket is full. `Ok(true)` when done.
    pub fn advance(&mut self) -> io::Result<bool> {
        while !self.done() {
            let res = if self.sent < HEADER_LEN {
                let bufs = [IoSlice::new(&self.hdr[self.sent..]), IoSlice::new(self.data)];
                self.sock.send_vectored_with_flags(&bufs, nix::libc::MSG_NOSIGNAL)
            } else {
                let rest = &self.data[self.sent - HEADER_LEN..];
                self.sock.send_with_flags(rest, nix::libc::MSG_NOSIGNAL)
            };
            match res {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes")),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// What became of an incoming frame's header once its 32 bytes arrived.
pub(crate) enum HeaderVerdict {
    /// The header matches; read the payload.
    Accept,
    /// A frame without payload that is not the one expected (a peer's
    /// probe): drop it and read the next header.
    Skip,
    /// Stop with this failure.
    Reject(Box<super::Failure>),
}

/// A frame being read into a caller's buffer.
pub(crate) struct Incoming<'a> {
    pub peer: usize,
    pub sock: &'a Socket,
    pub buf: &'a mut [u8],
    pub hdr: [u8; HEADER_LEN],
    pub hdr_got: usize,
    pub got: usize,
    pub checked: bool,
}

impl<'a> Incoming<'a> {
    pub fn new(peer: usize, sock: &'a Socket, buf: &'a mut [u8]) -> Self {
        Incoming { peer, sock, buf, hdr: [0; HEADER_LEN], hdr_got: 0, got: 0, checked: false }
    }

    pub fn done(&self) -> bool {
        self.checked && self.got == self.buf.len()
    }

    /// Reads until done or the socket is empty. `check` judges the header
    /// once complete. `Ok(true)` when done.
    pub fn advance(&mut self, check: &mut dyn FnMut(&mut Incoming<'_>) -> HeaderVerdict) -> Result<bool, ReadFault> {
        loop {
            if self.done() {
                return Ok(true);
            }
            let mut sock = self.sock;
            let res = if self.hdr_got < HEADER_LEN {
                let (h, b) = (&mut self.hdr[self.hdr_got..], &mut self.buf[self.got..]);
                let mut bufs = [IoSliceMut::new(h), IoSliceMut::new(b)];
                sock.read_vectored(&mut bufs)
            } else {
                sock.read(&mut self.buf[self.got..])
            };
            match res {
                Ok(0) => return Err(ReadFault::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"))),
                Ok(n) => {
                    let h = n.min(HEADER_LEN - self.hdr_got);
                    self.hdr_got += h;
                    self.got += n - h;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadFault::Io(e)),
            }
            while self.hdr_got == HEADER_LEN && !self.checked {
                match check(self) {
                    HeaderVerdict::Accept => self.checked = true,
                    HeaderVerdict::Skip => self.drop_header(),
                    HeaderVerdict::Reject(f) => return Err(ReadFault::Rejected(f)),
                }
            }
        }
    }

    /// Drops the header just read (a frame without payload): what the
    /// vectored read put into the payload buffer is the start of the next
    /// frame, so it moves back into the header (and payload) position.
    fn drop_header(&mut self) {
        let spilled = self.got;
        let h = spilled.min(HEADER_LEN);
        self.hdr[..h].copy_from_slice(&self.buf[..h]);
        self.buf.copy_within(h..spilled, 0);
        self.hdr_got = h;
        self.got = spilled - h;
        self.checked = false;
    }

    /// Bytes received so far (header included), for messages.
    pub fn progress(&self) -> usize {
        self.hdr_got + self.got
    }
}

/// Why reading stopped.
pub(crate) enum ReadFault {
    /// The socket failed or closed.
    Io(io::Error),
    /// The header was rejected (mismatch, abort, garbage).
    Rejected(Box<super::Failure>),
}

/// Why [`drive`] stopped without finishing.
pub(crate) enum DriveFault {
    /// Writing to the outgoing peer failed.
    Send(io::Error),
    /// Reading from the incoming peer failed.
    Recv(ReadFault),
    /// The deadline passed.
    Timeout,
    /// `poll` itself failed.
    Poll(io::Error),
    /// The watch hook stopped the wait (another rank aborted the group).
    Aborted(Box<super::Failure>),
}

/// Milliseconds until `deadline`, rounded up so that a short remainder sleeps
/// instead of spinning.
fn poll_timeout(deadline: Instant, now: Instant) -> PollTimeout {
    let left = deadline.saturating_duration_since(now);
    let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as u32;
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

/// How long [`drive`] retries non-blocking I/O (yielding between tries)
/// before sleeping in `poll`.
const SPIN_BEFORE_POLL: std::time::Duration = std::time::Duration::from_micros(40);

/// The busy phase when `local_ranks` ranks share this node:
/// [`SPIN_BEFORE_POLL`] up to four ranks per core, none beyond.
///
/// Oversubscribed ranks take the busy phase too: each try yields, so a peer
/// queued on our core runs at once, and a core that does not fall idle
/// needs no wake-up. On this project's 2-core VM a wake-up from `poll` took
/// tens of microseconds: with 4 ranks going straight to `poll`, an 8 B
/// sendrecv took 44 us and an 8 B all_reduce 60 us, with the busy phase 4.5
/// and 24 us; with 8 ranks, 48 -> 5 us and 154 -> 76 us (docs/PERFORMANCE.md,
/// run 11). Beyond four ranks per core (not measured) they go straight to
/// `poll`, as every oversubscribed rank did before.
pub(crate) fn spin_budget(local_ranks: usize) -> std::time::Duration {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if local_ranks <= cores.saturating_mul(4) {
        SPIN_BEFORE_POLL
    } else {
        std::time::Duration::ZERO
    }
}

/// Advances `out` and `inc` until both are done, a fault, or `deadline`.
/// [`drive`] first calls its `watch` hook after this long waiting, then
/// every [`WATCH_EVERY`].
pub(crate) const PROBE_AFTER: std::time::Duration = std::time::Duration::from_millis(20);
/// Interval of the later `watch` calls of one wait.
pub(crate) const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// What a long wait in [`drive`] does now and then: `(waited, receiving
/// only)`; an error stops the wait.
pub(crate) type Watch<'w> = &'w mut dyn FnMut(std::time::Duration, bool) -> Result<(), Box<super::Failure>>;

pub(crate) fn drive(
    mut out: Option<&mut Outgoing<'_>>,
    mut inc: Option<&mut Incoming<'_>>,
    check: &mut dyn FnMut(&mut Incoming<'_>) -> HeaderVerdict,
    deadline: Instant,
    spin: std::time::Duration,
    watch: Watch<'_>,
) -> Result<(), DriveFault> {
    let start = Instant::now();
    let mut next_watch = PROBE_AFTER;
    // Poll's wake-up after a blocking sleep costs tens of microseconds on a
    // loaded VM; a short busy phase of non-blocking retries catches replies
    // that arrive within microseconds (the common case for small messages)
    // without sleeping. It is bounded in time, so oversubscribed ranks soon
    // fall back to poll and give the core away.
    let mut spin_until: Option<Instant> = None;
    let mut moved = 0usize;
    loop {
        if let Some(o) = out.as_deref_mut() {
            o.advance().map_err(DriveFault::Send)?;
        }
        if let Some(i) = inc.as_deref_mut() {
            i.advance(check).map_err(DriveFault::Recv)?;
        }
        // A stream that is still moving renews the busy phase: while a large
        // frame flows, the next bytes are microseconds away, and a sleep in
        // `poll` per socket-buffer's worth would cost a wake-up each.
        let now_moved = out.as_deref().map_or(0, |o| o.sent) + inc.as_deref().map_or(0, |i| i.progress());
        if now_moved != moved {
            moved = now_moved;
            spin_until = None;
        }
        let want_out = out.as_deref().filter(|o| !o.done());
        let want_in = inc.as_deref().filter(|i| !i.done());
        if want_out.is_none() && want_in.is_none() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(DriveFault::Timeout);
        }
        let spin_end = *spin_until.get_or_insert(now + spin);
        if now < spin_end {
            // Yield rather than spin: when other work has taken the other
            // cores, the peer we wait for may be queued on ours, and a pure
            // spin kept it off for the whole busy phase (8 B sendrecv, 2
            // ranks, one core busy elsewhere: 47 us). With nothing else
            // runnable the yield returns at once, like the retry itself.
            // While yields hand the core to a task of someone else for a
            // time slice, `yield_core` spins instead: the busy phase bounds
            // the spin, and the poll after it sleeps.
            crate::sync::yield_core();
            continue;
        }
        let waited = now - start;
        if waited >= next_watch {
            watch(waited, want_out.is_none()).map_err(DriveFault::Aborted)?;
            next_watch = waited + WATCH_EVERY;
        }
        let timeout = poll_timeout(deadline.min(start + next_watch), now);
        let res = match (want_out, want_in) {
            (Some(o), Some(i)) if o.sock.as_raw_fd() == i.sock.as_raw_fd() => {
                let mut fds = [PollFd::new(o.sock.as_fd(), PollFlags::POLLOUT | PollFlags::POLLIN)];
                nix::poll::poll(&mut fds, timeout)
            }
            (Some(o), Some(i)) => {
                let mut fds =
                    [PollFd::new(o.sock.as_fd(), PollFlags::POLLOUT), PollFd::new(i.sock.as_fd(), PollFlags::POLLIN)];
                nix::poll::poll(&mut fds, timeout)
            }
            (Some(o), None) => nix::poll::poll(&mut [PollFd::new(o.sock.as_fd(), PollFlags::POLLOUT)], timeout),
            (None, Some(i)) => nix::poll::poll(&mut [PollFd::new(i.sock.as_fd(), PollFlags::POLLIN)], timeout),
            (None, None) => unreachable!("checked above"),
        };
        match res {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(DriveFault::Poll(io::Error::from(e))),
        }
    }
}

/// Sleeps in `poll` until `sock` is ready for `flags` or `deadline` passes
/// (then `TimedOut`); the small blocking helpers below share it.
fn wait_ready(sock: &Socket, flags: PollFlags, deadline: Instant) -> io::Result<()> {
    let now = Instant::now();
    if now >= deadline {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
    }
    match nix::poll::poll(&mut [PollFd::new(sock.as_fd(), flags)], poll_timeout(deadline, now)) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Reads exactly `n` (at most [`MAX_ABORT_PAYLOAD`]) bytes from `sock` by
/// `deadline`; used for the tail of an ABORT frame.
pub(crate) fn read_small(sock: &Socket, mut have: Vec<u8>, n: usize, deadline: Instant) -> io::Result<Vec<u8>> {
    let n = n.min(MAX_ABORT_PAYLOAD as usize);
    have.truncate(n);
    let mut off = have.len();
    have.resize(n, 0);
    let mut s = sock;
    while off < n {
        match s.read(&mut have[off..]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed")),
            Ok(k) => off += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_ready(sock, PollFlags::POLLIN, deadline)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(have)
}

/// Writes all of `bytes` to `sock` by `deadline` (handshakes and ABORT frames).
pub(crate) fn write_small(sock: &Socket, bytes: &[u8], deadline: Instant) -> io::Result<()> {
    let mut off = 0;
    while off < bytes.len() {
        match sock.send_with_flags(&bytes[off..], nix::libc::MSG_NOSIGNAL) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes")),
            Ok(k) => off += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_ready(sock, PollFlags::POLLOUT, deadline)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads and discards `n` bytes from `sock` by `deadline`.
pub(crate) fn skip(sock: &Socket, mut n: u64, deadline: Instant) -> io::Result<()> {
    let mut scratch = [0u8; 4096];
    let mut s = sock;
    while n > 0 {
        let want = n.min(scratch.len() as u64) as usize;
        match s.read(&mut scratch[..want]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed")),
            Ok(k) => n -= k as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_ready(sock, PollFlags::POLLIN, deadline)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
