//! The event loop: one thread, one `mio::Poll`, every connection.
//!
//! Sockets are registered edge-triggered for reading and writing once, at
//! accept. On any event the connection is *driven*: queued replies are
//! written, complete frames are taken from its buffer and answered, and more
//! input is read, until the socket would block or the connection must wait
//! (a parked request, a full socket). Whatever unblocks it later (a `set`
//! completing its waiter, a deadline, a writable event) drives it again, so
//! no readiness is ever lost.
//!
//! Deadlines (handshake, idle, linger, stalled writes) live in one heap of
//! `(instant, connection)`; a connection records the one entry that counts
//! and ignores stale ones. Waiter deadlines live in the waiter registry. The
//! poll timeout is the earliest of both.
//!
//! Admission: at most `max_connections` connections; with a token at most
//! `max_pending` of them unauthenticated. When a limit is hit, or `accept`
//! fails for want of descriptors, the oldest connection that has not
//! completed its handshake is shed to make room; if there is none the new
//! connection is refused. A spare descriptor is kept so that a refused
//! connection can still be accepted and closed (the client sees a prompt
//! close, not a hang in the backlog).

use super::conn::{Conn, Fill, Parsed, Phase, Reply};
use super::waiters::{Done, Map, Waiters, Want};
use super::{token_eq, Limits, Stats};
use crate::store::protocol::{Request, Response};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Token of the listening socket.
pub(super) const LISTENER: Token = Token(0);
/// Token of the shutdown waker.
pub(super) const WAKER: Token = Token(1);
/// First connection id (ids double as poll tokens and are never reused).
const FIRST_CONN: u64 = 2;
/// Size of the read buffer shared by all connections.
const SCRATCH: usize = 64 * 1024;
/// How long a closing connection gets to take its error reply.
const LINGER: Duration = Duration::from_millis(500);

/// Why a connection is closed.
enum Why<'a> {
    /// Normal end (EOF between frames, shed, shutdown): logged at debug.
    Quiet(&'a str),
    /// Something went wrong with this client: logged as a warning.
    Loud(String),
}

/// The loop's state; owned by the server thread.
pub(super) struct Reactor {
    pub poll: Poll,
    listener: TcpListener,
    addr: SocketAddr,
    token: Option<Vec<u8>>,
    limits: Limits,
    stats: Arc<Stats>,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    map: Map,
    waiters: Waiters,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Connections in accept order while fresh (stale entries are skipped).
    fresh: VecDeque<u64>,
    /// Fresh connections (unauthenticated ones, when there is a token).
    fresh_count: usize,
    /// Connections to drive before the next poll.
    ready: Vec<u64>,
    /// A descriptor given up to accept-and-close when out of descriptors.
    spare: Option<File>,
    /// Accepting stopped for want of descriptors; retry when one is freed.
    accept_starved: bool,
    scratch: Vec<u8>,
    done: Vec<Done>,
}

fn spare_fd() -> Option<File> {
    File::open("/dev/null").ok()
}

fn out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE)
}

impl Reactor {
    pub fn new(
        poll: Poll,
        mut listener: TcpListener,
        addr: SocketAddr,
        token: Option<Vec<u8>>,
        limits: Limits,
        stats: Arc<Stats>,
    ) -> io::Result<Reactor> {
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Reactor {
            poll,
            listener,
            addr,
            token,
            limits,
            stats,
            conns: HashMap::new(),
            next_id: FIRST_CONN,
            map: Map::new(),
            waiters: Waiters::default(),
            timers: BinaryHeap::new(),
            fresh: VecDeque::new(),
            fresh_count: 0,
            ready: Vec::new(),
            spare: spare_fd(),
            accept_starved: false,
            scratch: vec![0; SCRATCH],
            done: Vec::new(),
        })
    }

    /// Serves until the stop flag is raised (and the waker rung).
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        while !self.stats.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            let next = [self.timers.peek().map(|Reverse((t, _))| *t), self.waiters.next_deadline()]
                .into_iter()
                .flatten()
                .min();
            // Round up so that a deadline is never polled for repeatedly.
            let timeout = next.map(|t| t.saturating_duration_since(now) + Duration::from_millis(1));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(addr = %self.addr, error = %e, "store server poll failed; stopping");
                break;
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_all(),
                    WAKER => {}
                    Token(t) => self.drive(t as u64),
                }
            }
            self.run_timers(Instant::now());
            while let Some(id) = self.ready.pop() {
                self.drive(id);
            }
        }
        let n = self.conns.len();
        self.conns.clear();
        self.stats.connections.store(0, Ordering::Release);
        self.stats.waiters.store(0, Ordering::Release);
        tracing::debug!(addr = %self.addr, closed = n, "store server stopped");
    }

    fn publish(&self) {
        self.stats.connections.store(self.conns.len(), Ordering::Release);
        self.stats.waiters.store(self.waiters.len(), Ordering::Release);
    }

    // ---- admission -------------------------------------------------------

    fn accept_all(&mut self) {
        self.accept_starved = false;
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
                Err(e) if out_of_fds(&e) => {
                    if self.shed_one("out of file descriptors") {
                        continue;
                    }
                    // Nothing to shed: accept with the spare descriptor and
                    // close at once, so the client is told promptly.
                    match self.spare.take() {
                        Some(spare) => {
                            drop(spare);
                            if let Ok((s, peer)) = self.listener.accept() {
                                tracing::warn!(addr = %self.addr, %peer, "store connection refused: out of file descriptors");
                                drop(s);
                            }
                            self.spare = spare_fd();
                        }
                        None => {
                            self.spare = spare_fd();
                            self.accept_starved = true;
                            tracing::warn!(addr = %self.addr, "store server out of file descriptors");
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(addr = %self.addr, error = %e, "store accept failed");
                    return;
                }
            }
        }
    }

    fn admit(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        if self.conns.len() >= self.limits.max_connections && !self.shed_one("connection limit reached") {
            tracing::warn!(addr = %self.addr, %peer, limit = self.limits.max_connections,
                "store connection refused: connection limit reached");
            return;
        }
        let authed = self.token.is_none();
        if !authed && self.fresh_count >= self.limits.max_pending {
            self.shed_one("too many unauthenticated connections");
        }
        let id = self.next_id;
        self.next_id += 1;
        if let Err(e) =
            self.poll.registry().register(&mut stream, Token(id as usize), Interest::READABLE | Interest::WRITABLE)
        {
            tracing::warn!(addr = %self.addr, %peer, error = %e, "store connection refused: cannot register");
            return;
        }
        let _ = stream.set_nodelay(true);
        let sock = socket2::SockRef::from(&stream);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10))
            .with_retries(6);
        let _ = sock.set_tcp_keepalive(&keepalive);
        let now = Instant::now();
        self.conns.insert(id, Conn::new(stream, peer, authed, now));
        self.fresh.push_back(id);
        self.fresh_count += 1;
        self.schedule(id);
        self.publish();
        // The socket may already hold the first request; epoll reports it
        // on registration, but driving now saves a round of the loop.
        self.ready.push(id);
    }

    /// Closes the oldest connection that has not completed its handshake.
    fn shed_one(&mut self, why: &str) -> bool {
        while let Some(id) = self.fresh.pop_front() {
            if self.conns.get(&id).is_some_and(|c| c.fresh) {
                self.close(id, Why::Quiet(why));
                return true;
            }
        }
        false
    }

    /// The connection completed its handshake (or first request).
    fn settle(&mut self, id: u64) {
        if let Some(c) = self.conns.get_mut(&id) {
            if c.fresh {
                c.fresh = false;
                self.fresh_count -= 1;
                if self.fresh.len() > 64 && self.fresh.len() > 2 * self.fresh_count {
                    let conns = &self.conns;
                    self.fresh.retain(|i| conns.get(i).is_some_and(|c| c.fresh));
                }
            }
        }
    }

    fn close(&mut self, id: u64, why: Why<'_>) {
        let Some(c) = self.conns.remove(&id) else { return };
        if let Phase::Waiting(w) = c.phase {
            self.waiters.cancel(w);
        }
        if c.fresh {
            self.fresh_count -= 1;
        }
        match why {
            Why::Quiet(m) => tracing::debug!(addr = %self.addr, peer = %c.peer, "closing store connection: {m}"),
            Why::Loud(m) => tracing::warn!(addr = %self.addr, peer = %c.peer, "closing store connection: {m}"),
        }
        drop(c);
        self.publish();
        if self.accept_starved {
            self.accept_all();
        }
    }

    // ---- deadlines -------------------------------------------------------

    /// The earliest deadline of connection `c`.
    fn deadline_of(&self, c: &Conn) -> Option<Instant> {
        let mut d: Option<Instant> = None;
        let mut at = |t: Instant| d = Some(d.map_or(t, |x| x.min(t)));
        if let Phase::Closing { until, .. } = c.phase {
            at(until);
        }
        if !c.authed {
            at(c.accepted + self.limits.handshake_timeout);
            at(c.last_read + self.limits.pending_idle_timeout);
        }
        if c.has_output() {
            at(c.last_write + self.limits.write_timeout);
        }
        d
    }

    fn schedule(&mut self, id: u64) {
        let Some(c) = self.conns.get(&id) else { return };
        let Some(d) = self.deadline_of(c) else { return };
        if c.scheduled.is_some_and(|s| s <= d) {
            return;
        }
        if let Some(c) = self.conns.get_mut(&id) {
            c.scheduled = Some(d);
        }
        self.timers.push(Reverse((d, id)));
    }

    fn run_timers(&mut self, now: Instant) {
        while let Some(Reverse((t, id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(c) = self.conns.get_mut(&id) else { continue };
            if c.scheduled != Some(t) {
                continue;
            }
            c.scheduled = None;
            let c = &*c;
            let why = if let Phase::Closing { until, .. } = c.phase {
                (now >= until).then_some("lingered long enough after an error")
            } else if !c.authed && now >= c.accepted + self.limits.handshake_timeout {
                Some("did not authenticate in time (handshake deadline)")
            } else if !c.authed && now >= c.last_read + self.limits.pending_idle_timeout {
                Some("unauthenticated and idle")
            } else if c.has_output() && now >= c.last_write + self.limits.write_timeout {
                Some("client stopped reading its replies")
            } else {
                None
            };
            match why {
                Some(m) => self.close(id, Why::Quiet(m)),
                None => self.schedule(id),
            }
        }
        let mut expired = Vec::new();
        self.waiters.expire(now, &mut expired);
        if !expired.is_empty() {
            for conn in expired {
                self.answer(conn, Reply::Frame(Response::Timeout));
            }
            self.publish();
        }
    }

    /// Delivers the answer of a parked request and drives its connection.
    fn answer(&mut self, id: u64, reply: Reply) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        c.phase = Phase::Open;
        if let Err(e) = c.push(reply, Instant::now()) {
            self.close(id, Why::Loud(format!("cannot encode reply: {e}")));
            return;
        }
        self.ready.push(id);
    }

    // ---- serving ---------------------------------------------------------

    /// Makes all the progress connection `id` allows now.
    fn drive(&mut self, id: u64) {
        if let Err(why) = self.drive_inner(id) {
            self.close(id, why);
        } else {
            self.schedule(id);
        }
    }

    fn drive_inner(&mut self, id: u64) -> Result<(), Why<'static>> {
        let now = Instant::now();
        let require_auth = self.token.is_some();
        loop {
            let Some(c) = self.conns.get_mut(&id) else { return Ok(()) };
            let flushed = c.flush(now).map_err(|e| Why::Loud(format!("write failed: {e}")))?;
            if let Phase::Closing { until, write_shut } = c.phase {
                if !flushed {
                    return Ok(());
                }
                if !write_shut {
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                    c.phase = Phase::Closing { until, write_shut: true };
                }
                return match c.fill(&mut self.scratch, now) {
                    Ok(Fill::Progress) => continue,
                    Ok(Fill::WouldBlock) => Ok(()),
                    Ok(Fill::Eof | Fill::Full) | Err(_) => Err(Why::Quiet("closed after an error reply")),
                };
            }
            if !flushed {
                // Read no more until the client takes its replies.
                return Ok(());
            }
            if let Phase::Waiting(_) = c.phase {
                // Only watch for the client leaving.
                return match c.fill(&mut self.scratch, now) {
                    Ok(Fill::Progress) => continue,
                    Ok(Fill::WouldBlock | Fill::Full) => Ok(()),
                    Ok(Fill::Eof) => Err(Why::Quiet("client left while waiting")),
                    Err(_) => Err(Why::Quiet("client left while waiting (read error)")),
                };
            }
            match c.parse(require_auth && !c.authed) {
                Parsed::Request(req) => self.serve(id, req, now)?,
                Parsed::Bad(msg) => {
                    self.fail(id, Response::Error(msg.clone()), now);
                    return self.linger(id, Why::Loud(msg));
                }
                Parsed::NotAuth => {
                    self.fail(id, Response::Unauthorized("this store requires RANKWEAVE_TOKEN".into()), now);
                    return self.linger(id, Why::Loud("first frame is not an authentication frame".into()));
                }
                Parsed::Incomplete => match c.fill(&mut self.scratch, now) {
                    Ok(Fill::Progress) => {}
                    Ok(Fill::WouldBlock | Fill::Full) => return Ok(()),
                    Ok(Fill::Eof) => {
                        return Err(if c.mid_frame() {
                            Why::Loud("connection closed in the middle of a frame".into())
                        } else {
                            Why::Quiet("client closed the connection")
                        })
                    }
                    Err(e) => return Err(Why::Loud(format!("read failed: {e}"))),
                },
            }
        }
    }

    /// Queues a final error reply and enters the closing phase.
    fn fail(&mut self, id: u64, resp: Response, now: Instant) {
        if let Some(c) = self.conns.get_mut(&id) {
            let _ = c.push(Reply::Frame(resp), now);
            c.start_closing(now + LINGER);
        }
    }

    /// Logs why a connection is being closed, then lets it linger (the drive
    /// loop continues with the closing phase).
    fn linger(&mut self, id: u64, why: Why<'_>) -> Result<(), Why<'static>> {
        if let (Why::Loud(m), Some(c)) = (&why, self.conns.get(&id)) {
            tracing::warn!(addr = %self.addr, peer = %c.peer, "closing store connection: {m}");
        }
        self.ready.push(id);
        Ok(())
    }

    /// Answers one request (or parks it).
    fn serve(&mut self, id: u64, req: Request, now: Instant) -> Result<(), Why<'static>> {
        let Some(c) = self.conns.get_mut(&id) else { return Ok(()) };
        if !c.authed {
            let ok = match (&req, &self.token) {
                (Request::Auth { token }, Some(expected)) => token_eq(token, expected),
                _ => false,
            };
            if !ok {
                self.fail(id, Response::Unauthorized("wrong RANKWEAVE_TOKEN".into()), now);
                return self.linger(id, Why::Loud("wrong authentication token".into()));
            }
            c.authed = true;
            self.settle(id);
            return self.reply(id, Reply::Frame(Response::Ok), now);
        }
        self.settle(id);
        let reply = match req {
            // Already authenticated, or the server has no token.
            Request::Auth { .. } => Reply::Frame(Response::Ok),
            Request::Set { key, value } => {
                self.map.insert(key.clone(), Arc::new(value));
                self.wake(&key);
                Reply::Frame(Response::Ok)
            }
            Request::Get { key, timeout_ms } => return self.park(id, Want::Get(key), timeout_ms, now),
            Request::Wait { keys, timeout_ms } => return self.park(id, Want::Wait(keys), timeout_ms, now),
            Request::Add { key, delta } => {
                let cur = match self.map.get(&key) {
                    None => Some(0),
                    Some(v) => std::str::from_utf8(v).ok().and_then(|s| s.parse::<i64>().ok()),
                };
                match cur {
                    None => {
                        Reply::Frame(Response::Error(format!("add: key `{key}` holds a value that is not a counter")))
                    }
                    Some(cur) => {
                        let new = cur.wrapping_add(delta);
                        self.map.insert(key.clone(), Arc::new(new.to_string().into_bytes()));
                        self.wake(&key);
                        Reply::Frame(Response::Int(new))
                    }
                }
            }
            Request::CompareSet { key, expected, desired } => {
                let matches = match self.map.get(&key) {
                    None => expected.is_empty(),
                    Some(cur) => **cur == expected,
                };
                if matches {
                    let v = Arc::new(desired);
                    self.map.insert(key.clone(), Arc::clone(&v));
                    self.wake(&key);
                    Reply::Value(v)
                } else {
                    Reply::Value(self.map.get(&key).cloned().unwrap_or_default())
                }
            }
            Request::DeleteKey { key } => Reply::Frame(Response::Bool(self.map.remove(&key).is_some())),
            Request::NumKeys => Reply::Frame(Response::Int(i64::try_from(self.map.len()).unwrap_or(i64::MAX))),
            Request::Check { keys } => Reply::Frame(Response::Bool(keys.iter().all(|k| self.map.contains_key(k)))),
        };
        self.reply(id, reply, now)
    }

    fn reply(&mut self, id: u64, reply: Reply, now: Instant) -> Result<(), Why<'static>> {
        match self.conns.get_mut(&id) {
            Some(c) => c.push(reply, now).map_err(|e| Why::Loud(format!("cannot encode reply: {e}"))),
            None => Ok(()),
        }
    }

    /// Parks a `get` or `wait`, or answers it when it can be answered now.
    fn park(&mut self, id: u64, want: Want, timeout_ms: u64, now: Instant) -> Result<(), Why<'static>> {
        let wait = Duration::from_millis(timeout_ms).min(self.limits.max_wait);
        let deadline = now + wait;
        match self.waiters.park(&self.map, id, want, deadline) {
            Ok(Done::Value(_, v)) => self.reply(id, Reply::Value(v), now),
            Ok(Done::Ready(_)) => self.reply(id, Reply::Frame(Response::Ok), now),
            Err(w) if wait.is_zero() => {
                // A zero timeout only checks.
                self.waiters.cancel(w);
                self.reply(id, Reply::Frame(Response::Timeout), now)
            }
            Err(w) => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.phase = Phase::Waiting(w);
                }
                self.publish();
                Ok(())
            }
        }
    }

    /// `key` was set: answers the requests it completes.
    fn wake(&mut self, key: &str) {
        let mut done = std::mem::take(&mut self.done);
        self.waiters.on_set(&self.map, key, &mut done);
        let any = !done.is_empty();
        for d in done.drain(..) {
            match d {
                Done::Value(conn, v) => self.answer(conn, Reply::Value(v)),
                Done::Ready(conn) => self.answer(conn, Reply::Frame(Response::Ok)),
            }
        }
        self.done = done;
        if any {
            self.publish();
        }
    }
}
