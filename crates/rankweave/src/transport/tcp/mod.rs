//! The TCP transport: a full mesh of sockets between the ranks of a group.
//!
//! Files: `header` (the 32-byte frame header and ABORT payload), `mesh`
//! (listen, publish, connect, handshake), `io` (nonblocking frame I/O driven
//! by `poll(2)` with a deadline), and this module, which checks headers,
//! turns socket failures into errors naming the peer, and propagates
//! failures.
//!
//! Failure propagation: when an operation fails (a peer lost, a timeout, a
//! mismatch), this rank poisons the transport, sends an ABORT frame carrying
//! `(kind, culprit, reporter, reason)` to every peer whose stream is at a
//! frame boundary, records the same under `tcp/abort` in the group store
//! (first writer wins), and shuts every socket down. A rank
//! that reads an ABORT frame, or whose peer vanishes after an abort was
//! recorded, fails naming the original culprit and aborts in turn, so every
//! rank of the group errors promptly. A rank whose *send* to an aborted peer
//! fails reads that peer's pending ABORT frame from the other direction of
//! the connection (skipping frames it had not read yet), so the original
//! culprit is named even when the store died with it. Later calls return
//! [`Error::Poisoned`].

pub mod addr;
pub mod header;
mod io;
mod mesh;

pub use header::{decode_header, AbortInfo, AbortKind, FrameKind, Header, HEADER_LEN};
pub use mesh::advertised_ip;

use crate::error::{Context, Error, Result};
use crate::store::SharedStore;
use crate::transport::{OpCode, OpDesc, Tag, Transport};
use io::{DriveFault, HeaderVerdict, Incoming, Outgoing, ReadFault};
use socket2::Socket;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const ABORT_KEY: &str = "tcp/abort";
/// A wait checks the store's abort record first after this long...
const ABORT_CHECK_AFTER: Duration = Duration::from_millis(200);
/// ...and then at this interval (one small store request each).
const ABORT_CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long a failing rank spends delivering ABORT frames.
const ABORT_GRACE: Duration = Duration::from_millis(200);

/// 64-bit FNV-1a of a group's store namespace: the group id in every header.
pub fn group_id_of(namespace: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in namespace.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// How a mesh listens, what it advertises and how it waits; filled from
/// [`crate::GroupOptions`] (which reads the environment once, at the edge).
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// Address to listen on (`127.0.0.1`, `0.0.0.0`, `::`, a NIC's
    /// address); `None`: chosen from `interface` and `route_to` (see
    /// [`addr`]).
    pub listen_host: Option<String>,
    /// The network interface to listen on when `listen_host` is `None`
    /// ([`addr::IFNAME_ENV`]).
    pub interface: Option<String>,
    /// A host peers reach this job through (its `MASTER_ADDR`): the mesh
    /// listens on the interface that routes there (or advertises that
    /// interface's address for a wildcard `listen_host`).
    pub route_to: Option<String>,
    /// Ranks of the job on this node (`LOCAL_WORLD_SIZE`), which decides
    /// whether a short busy phase before `poll` pays off; `None`: the
    /// group's size.
    pub local_ranks: Option<usize>,
    /// How long a link may stay silent (peer gone without a reset) before
    /// the peer counts as unreachable; `None`: the kernel's defaults.
    pub link_timeout: Option<Duration>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            listen_host: None,
            interface: None,
            route_to: None,
            local_ranks: None,
            link_timeout: Some(addr::DEFAULT_LINK_TIMEOUT),
        }
    }
}

/// An error plus, when it came from another rank's abort, that abort to pass on.
pub(crate) struct Failure {
    err: Error,
    forward: Option<AbortInfo>,
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        Failure { err, forward: None }
    }
}

impl From<Error> for Box<Failure> {
    fn from(err: Error) -> Self {
        Box::new(Failure { err, forward: None })
    }
}

/// A full mesh of TCP connections between the ranks of one group.
///
/// Callers serialize operations (the [`crate::ProcessGroup`] does); the
/// transport itself keeps no per-operation state between calls except the
/// poison flag.
pub struct TcpTransport {
    spin: Duration,
    rank: usize,
    size: usize,
    name: String,
    group_id: u64,
    store: SharedStore,
    peers: Vec<Option<Socket>>,
    /// `mid_frame[p]`: a frame to `p` was started and not finished, so an
    /// ABORT frame may not be written to `p` (it would land inside the payload).
    mid_frame: Vec<AtomicBool>,
    /// `in_mid_frame[p]`: a frame from `p` was partly read, so the next bytes
    /// from `p` are not a header.
    in_mid_frame: Vec<AtomicBool>,
    poison: OnceLock<String>,
    /// The collective this rank runs or last ran: its sequence number and
    /// descriptor, which a peer's PROBE frame is compared with.
    current: [AtomicU64; 2],
    /// `last_sent[p]`: the sequence number of the last collective that sent
    /// `p` a frame.
    last_sent: Vec<AtomicU64>,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("name", &self.name)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("poisoned", &self.poison.get())
            .finish_non_exhaustive()
    }
}

impl TcpTransport {
    /// Builds the mesh of group `name` (rank `rank` of `size`): binds
    /// `{listen_host}:0` (chosen as [`addr`] says when unset), publishes the address in `store` (which must be
    /// namespaced for this group; keys `tcp/*` are used), connects to every
    /// peer and checks each with a handshake carrying `group_id`. Fails at
    /// `deadline` naming the missing peer. `size == 1` opens no socket.
    pub fn connect(
        store: SharedStore,
        rank: usize,
        size: usize,
        name: &str,
        group_id: u64,
        opts: &TcpOptions,
        deadline: Instant,
    ) -> Result<TcpTransport> {
        if size == 0 || rank >= size {
            return Err(Error::invalid(format!("rank {rank} is not in a group of size {size}")));
        }
        let host = addr::listen_host(opts.listen_host.as_deref(), opts.interface.as_deref(), opts.route_to.as_deref())?;
        let spec = mesh::MeshSpec {
            store: &*store,
            rank,
            size,
            name,
            group_id,
            listen_host: &host,
            route_to: opts.route_to.as_deref(),
            link_timeout: opts.link_timeout,
            deadline,
        };
        let peers = mesh::build(&spec)?;
        let local_ranks = opts.local_ranks.unwrap_or(size);
        crate::sync::note_local_ranks(local_ranks);
        Ok(TcpTransport {
            spin: io::spin_budget(local_ranks),
            rank,
            size,
            name: name.to_owned(),
            group_id,
            store,
            peers,
            mid_frame: (0..size).map(|_| AtomicBool::new(false)).collect(),
            in_mid_frame: (0..size).map(|_| AtomicBool::new(false)).collect(),
            poison: OnceLock::new(),
            current: [AtomicU64::new(0), AtomicU64::new(0)],
            last_sent: (0..size).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// The group id carried in every header.
    pub fn group_id(&self) -> u64 {
        self.group_id
    }

    /// Why the transport is unusable, once an operation failed or it was closed.
    pub fn poisoned(&self) -> Option<&str> {
        self.poison.get().map(String::as_str)
    }

    /// Shuts every connection down (peers see EOF); later calls return
    /// [`Error::Poisoned`]. Idempotent. Sockets are closed on drop.
    pub fn close(&self) {
        let _ = self.poison.set("group destroyed".into());
        self.shutdown_all();
    }

    fn shutdown_all(&self) {
        for s in self.peers.iter().flatten() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Marks the transport failed by `err` and tells every peer (see the
    /// module docs). Called by the group when an algorithm fails outside the
    /// transport; a no-op when already poisoned or when `err` does not poison.
    pub fn abort(&self, err: &Error) {
        if !err.poisons_group() || self.poison.get().is_some() {
            return;
        }
        let info = self.abort_info(err);
        self.poison_and_notify(err, info, true);
    }

    fn abort_info(&self, err: &Error) -> AbortInfo {
        let (kind, reason) = match err {
            Error::PeerLost { ctx, detail } => {
                let prefix = format!("rank {} lost: ", ctx.peer.unwrap_or(self.rank));
                (AbortKind::Lost, detail.strip_prefix(&prefix).unwrap_or(detail).to_string())
            }
            Error::Timeout { ctx, waited, detail } => {
                (AbortKind::Timeout, format!("{} timed out after {waited:?} waiting for {detail}", ctx.op))
            }
            Error::Mismatch { detail, .. } => (AbortKind::Mismatch, detail.clone()),
            other => (AbortKind::Other, other.to_string()),
        };
        AbortInfo { kind, culprit: err.peer().unwrap_or(self.rank) as u64, reporter: self.rank as u64, reason }
    }

    fn poison_and_notify(&self, err: &Error, info: AbortInfo, shutdown: bool) {
        if self.poison.set(err.to_string()).is_err() {
            return;
        }
        tracing::debug!(group = %self.name, rank = self.rank, "aborting: {err}");
        let payload = info.encode();
        let hdr =
            Header { kind: FrameKind::Abort, group_id: self.group_id, seq: 0, len: payload.len() as u64, desc: 0 };
        let mut frame = hdr.encode().to_vec();
        frame.extend_from_slice(&payload);
        let deadline = Instant::now() + ABORT_GRACE;
        for (p, s) in self.peers.iter().enumerate() {
            if let Some(s) = s {
                if !self.mid_frame[p].load(Ordering::Relaxed) {
                    let _ = io::write_small(s, &frame, deadline);
                }
            }
        }
        // Frames first (they need no store, which may have died with the
        // culprit); the record before the shutdown, so that a peer seeing EOF
        // from this rank finds it.
        self.record_abort(payload);
        if shutdown {
            self.shutdown_all();
        }
    }

    /// Writes the abort record (first writer wins), waiting at most
    /// [`ABORT_GRACE`]: a store behind a dead link must not hold up the
    /// rest of the abort. The write goes on in the background then.
    fn record_abort(&self, payload: Vec<u8>) {
        let store = self.store.clone();
        let (done, wait) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new().name("rankweave-abort".into()).spawn(move || {
            let _ = store.compare_set(ABORT_KEY, b"", &payload);
            let _ = done.send(());
        });
        match spawned {
            Ok(_) => {
                let _ = wait.recv_timeout(ABORT_GRACE);
            }
            Err(e) => tracing::debug!(group = %self.name, "no thread to record the abort: {e}"),
        }
    }

    /// Records the failure, aborts the group and returns the error.
    fn fail(&self, f: Failure) -> Error {
        if f.err.poisons_group() && self.poison.get().is_none() {
            let info = f.forward.unwrap_or_else(|| self.abort_info(&f.err));
            self.poison_and_notify(&f.err, info, true);
        }
        f.err
    }

    fn ctx(&self, tag: Tag) -> Context {
        Context::new(tag.op.name(), self.name.as_str(), self.rank)
    }

    fn failure_from_abort(&self, ctx: Context, info: &AbortInfo) -> Failure {
        let culprit = usize::try_from(info.culprit).unwrap_or(usize::MAX);
        let detail =
            format!("rank {} {}: reported by rank {}: {}", info.culprit, info.kind.verb(), info.reporter, info.reason);
        let ctx = ctx.with_peer(culprit);
        let err = match info.kind {
            AbortKind::Mismatch => Error::Mismatch { ctx, detail },
            _ => Error::PeerLost { ctx, detail },
        };
        Failure { err, forward: Some(info.clone()) }
    }

    /// The abort another rank recorded in the store, if any.
    fn recorded_abort(&self) -> Option<AbortInfo> {
        // Bounded: a store behind a dead link must not stall the wait.
        if !self.store.check_within(&[ABORT_KEY], ABORT_GRACE).ok()? {
            return None;
        }
        let raw = self.store.get_timeout(ABORT_KEY, Duration::from_millis(500)).ok()?;
        AbortInfo::decode(&raw).filter(|i| i.reporter != self.rank as u64)
    }

    /// An ABORT frame `peer` sent before going away, when this rank had not
    /// read that far: frames ahead of it are skipped. Only when the stream
    /// from `peer` is at a frame boundary; gives up after [`ABORT_GRACE`].
    fn abort_waiting_from(&self, peer: usize) -> Option<AbortInfo> {
        if self.in_mid_frame[peer].swap(true, Ordering::Relaxed) {
            return None;
        }
        let sock = self.peers[peer].as_ref()?;
        let deadline = Instant::now() + ABORT_GRACE;
        loop {
            let raw = io::read_small(sock, Vec::new(), HEADER_LEN, deadline).ok()?;
            let h = decode_header(&raw).ok()?;
            if h.kind == FrameKind::Abort {
                let payload = io::read_small(sock, Vec::new(), h.len as usize, deadline).ok()?;
                return AbortInfo::decode(&payload);
            }
            io::skip(sock, h.len, deadline).ok()?;
        }
    }

    /// Turns a socket error with `peer` into an error naming it (or the
    /// culprit of an abort recorded by another rank).
    fn socket_failure(&self, ctx: Context, peer: usize, e: std::io::Error, doing: String) -> Failure {
        use std::io::ErrorKind as K;
        let lost = matches!(
            e.kind(),
            K::UnexpectedEof
                | K::ConnectionReset
                | K::BrokenPipe
                | K::ConnectionAborted
                | K::NotConnected
                | K::WriteZero
        );
        if addr::is_dead_link(&e) {
            // The kernel gave up on the link (keepalive or the user timeout):
            // the peer is unreachable, whatever it is doing.
            if let Some(info) = self.recorded_abort() {
                return self.failure_from_abort(ctx, &info);
            }
            return Error::PeerLost {
                ctx: ctx.with_peer(peer),
                detail: format!(
                    "rank {peer} lost: unreachable ({e}: the link stayed silent past the link timeout, \
                     {}) while {doing}",
                    addr::LINK_TIMEOUT_ENV
                ),
            }
            .into();
        }
        if !lost {
            return Error::io(ctx.with_peer(peer), e).into();
        }
        if let Some(info) = self.abort_waiting_from(peer).or_else(|| self.recorded_abort()) {
            return self.failure_from_abort(ctx, &info);
        }
        Error::PeerLost { ctx: ctx.with_peer(peer), detail: format!("rank {peer} lost: {e} while {doing}") }.into()
    }

    /// A peer's PROBE frame `h` (it waits for this rank in collective
    /// `h.seq`): the mismatch it reveals, if any (see `check_header`).
    fn judge_probe(&self, ctx: Context, peer: usize, h: &Header) -> Option<Error> {
        // The peer waits for us in collective `h.seq`. If that is the
        // collective we are in (or finished last) under another
        // descriptor, nothing will ever arrive there: a mismatch both
        // ranks would otherwise sit out until the deadline. Otherwise it
        // was only early: drop it.
        let (seq, desc) = self.current();
        if h.seq < seq && self.last_sent[peer].load(Ordering::Relaxed) < h.seq {
            // We finished that collective without sending the peer
            // anything (nor since): what it waits for will never come.
            return Some(Error::Mismatch {
                ctx: ctx.clone().with_peer(peer),
                detail: format!(
                    "rank {peer} waits in {} (seq {}) for data from rank {}, which finished that \
                         collective without sending it any",
                    OpDesc(h.desc),
                    h.seq,
                    self.rank
                ),
            });
        }
        if h.seq == seq && h.desc != desc.0 && !desc.is_none() {
            return Some(Error::Mismatch {
                ctx: ctx.clone().with_peer(peer),
                detail: format!(
                    "rank {peer} waits in {} (seq {seq}), rank {} called {desc}",
                    OpDesc(h.desc),
                    self.rank
                ),
            });
        }
        None
    }

    fn check_header(&self, tag: Tag, inc: &mut Incoming<'_>) -> HeaderVerdict {
        // Built only on failure: the success path allocates nothing.
        let ctx = || self.ctx(tag);
        let peer = inc.peer;
        let h = match decode_header(&inc.hdr) {
            Ok(h) => h,
            Err(e) => {
                let detail = match e {
                    Error::Protocol { detail, .. } => detail,
                    other => other.to_string(),
                };
                return HeaderVerdict::Reject(
                    Error::protocol(ctx().with_peer(peer), format!("from rank {peer}: {detail}")).into(),
                );
            }
        };
        if h.kind == FrameKind::Probe {
            return match self.judge_probe(ctx(), peer, &h) {
                Some(err) => HeaderVerdict::Reject(err.into()),
                None => HeaderVerdict::Skip,
            };
        }
        if h.kind == FrameKind::Abort {
            let have = inc.buf[..inc.got.min(h.len as usize)].to_vec();
            let deadline = Instant::now() + ABORT_GRACE;
            let info =
                io::read_small(inc.sock, have, h.len as usize, deadline).ok().and_then(|b| AbortInfo::decode(&b));
            let info = info.unwrap_or(AbortInfo {
                kind: AbortKind::Other,
                culprit: peer as u64,
                reporter: peer as u64,
                reason: "aborted (unreadable reason)".into(),
            });
            return HeaderVerdict::Reject(Box::new(self.failure_from_abort(ctx(), &info)));
        }
        let want = (tag.op.name(), tag.seq, inc.buf.len() as u64);
        let got = (h.kind.name(), h.seq, h.len);
        if h.group_id != self.group_id {
            return HeaderVerdict::Reject(
                Error::Mismatch {
                    ctx: ctx().with_peer(peer),
                    detail: format!(
                        "rank {} expected group id {:#x} from rank {peer}, got {:#x}",
                        self.rank, self.group_id, h.group_id
                    ),
                }
                .into(),
            );
        }
        // The call descriptors first: they say what each rank called
        // (operation, dtype, reduce op, root, size), not just which step.
        if h.desc != tag.desc.0 && h.kind != FrameKind::Op(OpCode::Hello) {
            return HeaderVerdict::Reject(
                Error::Mismatch {
                    ctx: ctx().with_peer(peer),
                    detail: format!(
                        "rank {peer} called {}, rank {} called {} (seq {})",
                        OpDesc(h.desc),
                        self.rank,
                        tag.desc,
                        tag.seq
                    ),
                }
                .into(),
            );
        }
        if h.kind != FrameKind::Op(tag.op) || h.seq != tag.seq || h.len != inc.buf.len() as u64 {
            return HeaderVerdict::Reject(
                Error::Mismatch {
                    ctx: ctx().with_peer(peer),
                    detail: format!(
                        "rank {} expected {} seq {} of {} bytes from rank {peer}, got {} seq {} of {} bytes",
                        self.rank, want.0, want.1, want.2, got.0, got.1, got.2
                    ),
                }
                .into(),
            );
        }
        HeaderVerdict::Accept
    }

    fn ready(&self, tag: Tag, peers: &[usize]) -> Result<()> {
        if let Some(cause) = self.poison.get() {
            return Err(Error::Poisoned { group: self.name.clone(), cause: cause.clone() });
        }
        for &p in peers {
            if p >= self.size || p == self.rank {
                return Err(Error::invalid(format!(
                    "{}: peer rank {p} is invalid for rank {} of a group of size {}",
                    tag.op.name(),
                    self.rank,
                    self.size
                )));
            }
        }
        Ok(())
    }

    fn sock(&self, peer: usize) -> &Socket {
        match &self.peers[peer] {
            Some(s) => s,
            None => unreachable!("peer {peer} validated by ready()"),
        }
    }

    /// While waiting on `busy` (or sending): reads a PROBE or ABORT frame
    /// that starts another peer's stream (peeking first, so a data frame for
    /// a later receive stays unread), and returns the failure it reveals.
    fn look_at_other_peers(&self, tag: Tag, busy: Option<usize>) -> Option<Failure> {
        for (p, sock) in self.peers.iter().enumerate() {
            let Some(sock) = sock else { continue };
            if Some(p) == busy || self.in_mid_frame[p].load(Ordering::Relaxed) {
                continue;
            }
            let mut raw = [0u8; HEADER_LEN];
            let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
            let fd = std::os::fd::AsRawFd::as_raw_fd(sock);
            if !matches!(nix::sys::socket::recv(fd, &mut raw, flags), Ok(n) if n == HEADER_LEN) {
                continue;
            }
            let Ok(h) = decode_header(&raw) else { continue };
            let deadline = Instant::now() + ABORT_GRACE;
            match h.kind {
                FrameKind::Probe => {
                    // Consume it: it was read whole by the peek.
                    if io::read_small(sock, Vec::new(), HEADER_LEN, deadline).is_err() {
                        continue;
                    }
                    if let Some(err) = self.judge_probe(self.ctx(tag), p, &h) {
                        return Some(Failure::from(err));
                    }
                }
                FrameKind::Abort => {
                    let _ = io::read_small(sock, Vec::new(), HEADER_LEN, deadline);
                    let payload = io::read_small(sock, Vec::new(), h.len as usize, deadline).ok();
                    let info = payload.and_then(|b| AbortInfo::decode(&b)).unwrap_or(AbortInfo {
                        kind: AbortKind::Other,
                        culprit: p as u64,
                        reporter: p as u64,
                        reason: "aborted (unreadable reason)".into(),
                    });
                    return Some(self.failure_from_abort(self.ctx(tag), &info));
                }
                FrameKind::Op(op) => {
                    // A frame of the collective we are in, under another
                    // descriptor: the peer called something else. (Left
                    // unread; the group fails now.)
                    let (seq, desc) = self.current();
                    if op != OpCode::SendRecv && h.desc != 0 && h.seq == seq && h.desc != desc.0 && !desc.is_none() {
                        return Some(Failure::from(Error::Mismatch {
                            ctx: self.ctx(tag).with_peer(p),
                            detail: format!(
                                "rank {p} called {}, rank {} called {desc} (seq {seq})",
                                OpDesc(h.desc),
                                self.rank
                            ),
                        }));
                    }
                }
            }
        }
        None
    }

    /// Marks collective `(seq, desc)` as the one this rank is in while it
    /// runs it outside the mesh (in its node's shared memory), so that
    /// [`TcpTransport::watch_outside`] judges peers' probes against it.
    pub(crate) fn enter(&self, seq: u64, desc: OpDesc) {
        self.current[0].store(seq, Ordering::Relaxed);
        self.current[1].store(desc.0, Ordering::Relaxed);
    }

    /// For a rank waiting outside the mesh: the failure a peer's PROBE (it
    /// waits for this rank under another descriptor), ABORT or frame
    /// reveals, after which the mesh is aborted as for any failure here.
    pub(crate) fn watch_outside(&self) -> Option<Error> {
        if self.poison.get().is_some() {
            return None;
        }
        let (seq, desc) = self.current();
        let tag = Tag::new(desc.op().unwrap_or(OpCode::Barrier), seq).with_desc(desc);
        self.look_at_other_peers(tag, None).map(|f| self.fail(f))
    }

    /// The collective this rank runs or last ran (sequence, descriptor).
    fn current(&self) -> (u64, OpDesc) {
        (self.current[0].load(Ordering::Relaxed), OpDesc(self.current[1].load(Ordering::Relaxed)))
    }

    fn header(&self, tag: Tag, len: usize) -> [u8; HEADER_LEN] {
        Header { kind: FrameKind::Op(tag.op), group_id: self.group_id, seq: tag.seq, len: len as u64, desc: tag.desc.0 }
            .encode()
    }

    /// Runs one send and/or receive to completion; maps every fault to an
    /// error naming the peer.
    fn exchange(
        &self,
        send: Option<(usize, Tag, &[u8])>,
        recv: Option<(usize, Tag, &mut [u8])>,
        deadline: Instant,
    ) -> Result<()> {
        let start = Instant::now();
        let send_tag = send.as_ref().map(|s| s.1);
        let mut out = send.map(|(p, t, d)| (t, Outgoing::new(p, self.sock(p), self.header(t, d.len()), d)));
        let recv_tag = recv.as_ref().map(|r| r.1);
        let mut inc = recv.map(|(p, t, b)| (t, Incoming::new(p, self.sock(p), b)));
        if let Some((_, o)) = &out {
            self.mid_frame[o.peer].store(true, Ordering::Relaxed);
        }
        let mut check = |i: &mut Incoming<'_>| match recv_tag {
            Some(t) => self.check_header(t, i),
            None => HeaderVerdict::Accept,
        };
        let spin = self.spin;
        // A collective's receive that waits with nothing to send probes
        // its peer (see `check_header`); point-to-point receives do not.
        let collective = |t: &Tag| t.op != OpCode::SendRecv && !t.desc.is_none();
        let probing = recv_tag.filter(collective);
        if let Some(t) = probing.or(send_tag.filter(collective)) {
            self.current[0].store(t.seq, Ordering::Relaxed);
            self.current[1].store(t.desc.0, Ordering::Relaxed);
        }
        if let (Some(t), Some((_, o))) = (send_tag.filter(collective), out.as_ref()) {
            self.last_sent[o.peer].store(t.seq, Ordering::Relaxed);
        }
        let probe_peer = inc.as_ref().map(|(_, i)| i.peer);
        let mut probed = false;
        let mut next_abort_check = ABORT_CHECK_AFTER;
        let any_tag = recv_tag.or(send_tag);
        let mut watch = |waited: Duration, receiving_only: bool| -> Result<(), Box<Failure>> {
            // Waiting only to receive in a collective: tell the peer what
            // we wait in, once (see `check_header`).
            if let (false, true, Some(t), Some(p)) = (probed, receiving_only, probing, probe_peer) {
                probed = true;
                if !self.mid_frame[p].load(Ordering::Relaxed) {
                    let h =
                        Header { kind: FrameKind::Probe, group_id: self.group_id, seq: t.seq, len: 0, desc: t.desc.0 };
                    let _ = io::write_small(self.sock(p), &h.encode(), Instant::now() + ABORT_GRACE);
                }
            }
            // Ranks can wait on each other in a cycle, each reading only
            // the next one's stream: look at the frame boundary of every
            // other peer's stream for a probe or an abort.
            if let Some(t) = any_tag {
                if let Some(f) = self.look_at_other_peers(t, probe_peer) {
                    return Err(Box::new(f));
                }
            }
            // A rank that failed elsewhere in the group recorded why; stop
            // waiting for a peer that may be waiting on it in turn.
            if waited >= next_abort_check {
                next_abort_check = waited + ABORT_CHECK_EVERY;
                if let (Some(info), Some(t)) = (self.recorded_abort(), any_tag) {
                    return Err(Box::new(self.failure_from_abort(self.ctx(t), &info)));
                }
            }
            Ok(())
        };
        let res = io::drive(
            out.as_mut().map(|(_, o)| o),
            inc.as_mut().map(|(_, i)| i),
            &mut check,
            deadline,
            spin,
            &mut watch,
        );
        if let Some((_, o)) = &out {
            if o.done() {
                self.mid_frame[o.peer].store(false, Ordering::Relaxed);
            }
        }
        if let Some((_, i)) = &inc {
            self.in_mid_frame[i.peer].store(i.progress() > 0 && !i.done(), Ordering::Relaxed);
        }
        let fault = match res {
            Ok(()) => return Ok(()),
            Err(f) => f,
        };
        if let Some(cause) = self.poison.get() {
            // Closed from another thread while this operation waited.
            return Err(Error::Poisoned { group: self.name.clone(), cause: cause.clone() });
        }
        let describe_out = |t: Tag, o: &Outgoing<'_>| {
            format!("sending {} seq {} to rank {} ({} of {} bytes sent)", t.op.name(), t.seq, o.peer, o.sent, o.total())
        };
        let describe_in = |t: Tag, i: &Incoming<'_>| {
            format!(
                "receiving {} seq {} from rank {} ({} of {} bytes received)",
                t.op.name(),
                t.seq,
                i.peer,
                i.progress(),
                HEADER_LEN + i.buf.len()
            )
        };
        let failure = match fault {
            DriveFault::Send(e) => {
                let (t, o) = out.as_ref().map(|(t, o)| (*t, o)).expect("send fault implies a send");
                self.socket_failure(self.ctx(t), o.peer, e, describe_out(t, o))
            }
            DriveFault::Recv(ReadFault::Rejected(f)) | DriveFault::Aborted(f) => *f,
            DriveFault::Recv(ReadFault::Io(e)) => {
                let (t, i) = inc.as_ref().map(|(t, i)| (*t, i)).expect("recv fault implies a recv");
                self.socket_failure(self.ctx(t), i.peer, e, describe_in(t, i))
            }
            DriveFault::Timeout => {
                // Blame the receive when it is unfinished: a peer that never
                // sends is the usual culprit; else the peer not reading.
                // (`what` completes "waiting for ...".)
                let wait_in = |t: Tag, i: &Incoming<'_>| {
                    let total = HEADER_LEN + i.buf.len();
                    let got = i.progress();
                    format!("{} seq {} from rank {} ({got} of {total} bytes received)", t.op.name(), t.seq, i.peer)
                };
                let wait_out = |t: Tag, o: &Outgoing<'_>| {
                    let (sent, total) = (o.sent, o.total());
                    format!("rank {} to take {} seq {} ({sent} of {total} bytes sent)", o.peer, t.op.name(), t.seq)
                };
                let (t, peer, what) = match (&out, &inc) {
                    (_, Some((t, i))) if !i.done() => (*t, i.peer, wait_in(*t, i)),
                    (Some((t, o)), _) => (*t, o.peer, wait_out(*t, o)),
                    (None, Some((t, i))) => (*t, i.peer, wait_in(*t, i)),
                    (None, None) => unreachable!("timeout with nothing to do"),
                };
                let err = Error::timeout(self.ctx(t).with_peer(peer), start.elapsed(), what);
                let awaiting_header = matches!(&inc, Some((_, i)) if i.peer == peer && i.progress() == 0);
                if awaiting_header && self.poison.get().is_none() {
                    // A timeout is often a consequence: the awaited peer may
                    // itself wait on a third rank and be about to report it.
                    // Tell everyone now, then give the awaited peer a moment
                    // to say who is to blame.
                    let info = self.abort_info(&err);
                    self.poison_and_notify(&err, info, false);
                    let better = self.abort_waiting_from(peer);
                    self.shutdown_all();
                    return Err(match better {
                        Some(info) => self.failure_from_abort(self.ctx(t), &info).err,
                        None => err,
                    });
                }
                err.into()
            }
            DriveFault::Poll(e) => {
                let t = out.as_ref().map(|(t, _)| *t).or(recv_tag).expect("an operation");
                Error::io(self.ctx(t), e).into()
            }
        };
        Err(self.fail(failure))
    }
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn group_name(&self) -> &str {
        &self.name
    }

    fn send(&self, peer: usize, tag: Tag, data: &[u8], deadline: Instant) -> Result<()> {
        self.ready(tag, &[peer])?;
        self.exchange(Some((peer, tag, data)), None, deadline)
    }

    fn recv(&self, peer: usize, tag: Tag, buf: &mut [u8], deadline: Instant) -> Result<()> {
        self.ready(tag, &[peer])?;
        self.exchange(None, Some((peer, tag, buf)), deadline)
    }

    fn send_recv(
        &self,
        to: usize,
        send_tag: Tag,
        data: &[u8],
        from: usize,
        recv_tag: Tag,
        buf: &mut [u8],
        deadline: Instant,
    ) -> Result<()> {
        self.ready(send_tag, &[to, from])?;
        self.exchange(Some((to, send_tag, data)), Some((from, recv_tag, buf)), deadline)
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.shutdown_all();
    }
}
