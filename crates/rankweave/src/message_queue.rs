//! The shared-memory broadcaster: one writer, many readers, strict FIFO.
//!
//! # Layout
//! One segment holds `max_chunks` **chunks**. Chunk `k` starts with a cache
//! line whose first word is its **written** sequence number (the number of
//! the message in it, 0 = never written) and whose second word is the
//! message length (top bit: **overflow**, the bytes travel by socket); the
//! data follows in the same line, so a small message costs a reader one
//! cache-line transfer. After the chunks, each local reader owns its own
//! cache lines with one **read** sequence number per chunk.
//!
//! # Protocol
//! Message `m` (1, 2, ...) goes into chunk `(m - 1) % max_chunks`.
//! - Writer: wait until every local reader's read number for the chunk is
//!   at least `m - max_chunks` (the previous occupant was read by everyone;
//!   never skip ahead), copy the data, store the length, then store
//!   `written = m` with Release. Remote readers, and local readers of an
//!   overflowing message, then get `[m][len][bytes]` over their socket.
//! - Reader: wait for `written == m` (Acquire), read, then store its read
//!   number `m` with Release.
//!
//! Sequence numbers instead of boolean flags mean nobody ever clears a flag
//! another process sets, which removes the reset races of a boolean scheme.
//!
//! # Handshake
//! Every reader opens the segment (local) and connects to the writer's TCP
//! listener, sending a hello with the queue's token and its rank;
//! [`MessageQueue::wait_until_ready`] on the writer accepts every expected
//! reader, answers each with a ready byte and unlinks the segment's name.
//! Nothing is sent before that, so no reader misses the first message.
//!
//! # Failure
//! The writer's wait has a deadline ([`MqOptions::timeout`]) and a periodic
//! warning ([`MqOptions::warn_interval`]); both name the readers that have
//! not read yet. A reader whose socket closed is reported as lost at once.
//! A reader's own timeout ([`MqOptions::read_timeout`]) with nothing
//! received leaves the queue intact: call `dequeue` again. Any other error
//! poisons the queue ([`Error::Poisoned`] afterwards); build a new one.

use crate::error::{Context, Error, Result};
use crate::group::ProcessGroup;
use crate::sync::Backoff;
use crate::sys::net::retry_connect;
use crate::sys::shm::ShmSegment;
use crate::transport::tcp::advertised_ip;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const LINE: usize = 64;
const HEADER: usize = 64;
const CHUNK_HEADER: usize = 16;
const MAGIC: u64 = 0x7261_6e6b_6d71_3031; // "rankmq01"
const OVERFLOW: u64 = 1 << 63;
/// Data bytes per chunk of the queues the coordinator builds (the seed's
/// `1 << 22`, 4 MiB); the one place this number lives.
pub const DEFAULT_MAX_CHUNK_BYTES: usize = 1 << 22;
/// Number of chunks of the queues the coordinator builds (the seed's 6).
pub const DEFAULT_MAX_CHUNKS: usize = 6;

/// How often a waiting side checks its peers' sockets for a hang-up.
const LIVENESS_EVERY: Duration = Duration::from_millis(100);

/// Settings of a [`MessageQueue`].
#[derive(Debug, Clone)]
pub struct MqOptions {
    /// Longest the writer waits for a free chunk or for a reader's socket,
    /// and either side waits in the ready handshake.
    pub timeout: Duration,
    /// Longest a reader waits for the next message; `None` waits for ever
    /// (an idle worker waiting for its next request), still warning.
    pub read_timeout: Option<Duration>,
    /// Interval of the writer's warning that names the readers it waits for
    /// (readers waiting for the writer only log at debug level: idle is
    /// normal for them).
    pub warn_interval: Duration,
    /// Address the writer's listener binds to (port 0: the OS picks).
    pub listen_host: String,
    /// Address remote readers connect to; `None`: `listen_host`, or for a
    /// wildcard listener the address that routes to the other nodes.
    pub connect_host: Option<String>,
    /// The host remote readers reach the job through (`MASTER_ADDR`), which
    /// picks the advertised address of a wildcard listener.
    pub route_to: Option<String>,
}

impl Default for MqOptions {
    fn default() -> Self {
        MqOptions {
            timeout: crate::store::default_timeout(),
            read_timeout: None,
            warn_interval: Duration::from_secs(60),
            listen_host: "127.0.0.1".into(),
            connect_host: None,
            route_to: None,
        }
    }
}

/// What a reader needs to join a queue; serializable (postcard) so the
/// writer can broadcast it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handle {
    /// The writer's rank.
    pub writer_rank: usize,
    /// Ranks that read through shared memory, in reader-index order.
    pub local_reader_ranks: Vec<usize>,
    /// Ranks that read through the socket only.
    pub remote_reader_ranks: Vec<usize>,
    /// Data bytes per chunk.
    pub max_chunk_bytes: usize,
    /// Number of chunks.
    pub max_chunks: usize,
    /// The segment's name (`None` without local readers).
    pub segment: Option<String>,
    /// `host:port` of the writer's listener.
    pub addr: String,
    /// Identifies this queue in the hello.
    pub token: u64,
}

impl Handle {
    /// Encodes the handle (postcard).
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }
    /// Decodes a handle.
    pub fn from_bytes(bytes: &[u8]) -> Result<Handle> {
        postcard::from_bytes(bytes)
            .map_err(|e| Error::Serialization { ctx: Context::op("mq.handle"), detail: e.to_string() })
    }
}

/// The segment geometry both sides compute from a [`Handle`].
#[derive(Debug, Clone, Copy)]
struct Layout {
    chunks: usize,
    chunk_bytes: usize,
    stride: usize,
    readers: usize,
    flags: usize,
    reader_stride: usize,
    len: usize,
}

impl Layout {
    /// The geometry, or an error when it does not fit in memory (a handle
    /// from elsewhere may carry anything).
    fn new(chunks: usize, chunk_bytes: usize, readers: usize) -> Result<Layout> {
        let too_big = || {
            Error::invalid(format!(
                "message queue of {chunks} chunks of {chunk_bytes} bytes for {readers} readers is too large"
            ))
        };
        if chunks == 0 {
            return Err(Error::invalid("message queue with 0 chunks"));
        }
        // Every length below stays under 2^62: no overflow anywhere.
        const MAX: usize = 1 << 40;
        if chunks > MAX / 64 || chunk_bytes > MAX || readers > MAX / 64 {
            return Err(too_big());
        }
        let stride = (CHUNK_HEADER + chunk_bytes).div_ceil(LINE) * LINE;
        let flags = chunks.checked_mul(stride).and_then(|x| x.checked_add(HEADER)).ok_or_else(too_big)?;
        let reader_stride = (chunks * 8).div_ceil(LINE) * LINE;
        let len = readers.checked_mul(reader_stride).and_then(|x| x.checked_add(flags)).ok_or_else(too_big)?;
        Ok(Layout { chunks, chunk_bytes, stride, readers, flags, reader_stride, len })
    }
}

struct Shm {
    seg: ShmSegment,
    layout: Layout,
}

impl Shm {
    /// Offset of chunk `k`.
    fn chunk(&self, k: usize) -> usize {
        debug_assert!(k < self.layout.chunks);
        HEADER + k * self.layout.stride
    }
    fn written(&self, k: usize) -> &AtomicU64 {
        self.seg.atomic_u64(self.chunk(k))
    }
    fn length(&self, k: usize) -> &AtomicU64 {
        self.seg.atomic_u64(self.chunk(k) + 8)
    }
    fn read_flag(&self, i: usize, k: usize) -> &AtomicU64 {
        debug_assert!(i < self.layout.readers && k < self.layout.chunks);
        self.seg.atomic_u64(self.layout.flags + i * self.layout.reader_stride + k * 8)
    }
}

struct WriterState {
    shm: Option<Shm>,
    listener: Option<TcpListener>,
    /// Sockets of the local readers (overflow) and of the remote readers.
    local: Vec<Option<TcpStream>>,
    remote: Vec<Option<TcpStream>>,
    seq: u64,
    buf: Vec<u8>,
}

struct ReaderState {
    shm: Option<Shm>,
    /// Index among the local readers; `None` for a remote reader.
    index: Option<usize>,
    sock: TcpStream,
    seq: u64,
}

enum Role {
    Writer(WriterState),
    Reader(ReaderState),
}

struct Inner {
    role: Role,
    ready: bool,
    poisoned: Option<String>,
}

/// vLLM's shared-memory broadcaster (see the module docs). Every method
/// takes `&self`; calls on one queue are serialized internally.
pub struct MessageQueue {
    handle: Handle,
    rank: usize,
    opts: MqOptions,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for MessageQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageQueue").field("handle", &self.handle).field("rank", &self.rank).finish_non_exhaustive()
    }
}

fn token() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut x = t ^ ((std::process::id() as u64) << 32) ^ N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // splitmix64 finalizer: spread the bits.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn io_err(ctx: Context, e: std::io::Error) -> Error {
    match e.kind() {
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => Error::PeerLost { ctx, detail: e.to_string() },
        _ => Error::io(ctx, e),
    }
}

/// Reads exactly `buf.len()` bytes before `deadline` (`None`: no deadline).
fn read_full(sock: &mut TcpStream, buf: &mut [u8], deadline: Option<Instant>, ctx: impl Fn() -> Context) -> Result<()> {
    let start = Instant::now();
    let mut got = 0;
    while got < buf.len() {
        let left = match deadline {
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return Err(Error::timeout(ctx(), start.elapsed(), format!("{} more bytes", buf.len() - got)));
                }
                Some(d - now)
            }
            None => None,
        };
        sock.set_read_timeout(left).map_err(|e| Error::io(ctx(), e))?;
        match sock.read(&mut buf[got..]) {
            Ok(0) => return Err(Error::PeerLost { ctx: ctx(), detail: "connection closed".into() }),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(e) => return Err(io_err(ctx(), e)),
        }
    }
    Ok(())
}

fn write_full(sock: &mut TcpStream, parts: &[&[u8]], timeout: Duration, ctx: impl Fn() -> Context) -> Result<()> {
    sock.set_write_timeout(Some(timeout)).map_err(|e| Error::io(ctx(), e))?;
    for p in parts {
        sock.write_all(p).map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                Error::timeout(ctx(), timeout, "the reader to take the message")
            }
            _ => io_err(ctx(), e),
        })?;
    }
    Ok(())
}

/// Waits up to `timeout` (`None`: for ever) until `sock` has bytes to read
/// (or hit EOF, which the read that follows reports).
fn wait_readable(sock: &TcpStream, timeout: Option<Duration>, ctx: impl Fn() -> Context) -> Result<()> {
    let start = Instant::now();
    let deadline = timeout.map(|t| start + t);
    let mut b = [0u8; 1];
    loop {
        let left = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::timeout(ctx(), start.elapsed(), "the next message"));
                }
                Some(left)
            }
            None => None,
        };
        sock.set_read_timeout(left).map_err(|e| Error::io(ctx(), e))?;
        match sock.peek(&mut b) {
            Ok(_) => return Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(e) => return Err(io_err(ctx(), e)),
        }
    }
}

/// True when the peer of `sock` hung up (EOF or reset). The peer never sends
/// after the handshake, so pending bytes are not expected either.
fn hung_up(sock: &TcpStream) -> bool {
    if sock.set_nonblocking(true).is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    let gone = match sock.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    let _ = sock.set_nonblocking(false);
    gone
}

impl MessageQueue {
    /// Creates the writer's side with `n_local_readers` shared-memory readers
    /// (ranks `1..=n_local`) and `n_remote_readers` socket readers (the next
    /// ranks); the writer is rank 0. Readers join with
    /// [`MessageQueue::from_handle`].
    pub fn new_writer(
        n_local_readers: usize,
        n_remote_readers: usize,
        max_chunk_bytes: usize,
        max_chunks: usize,
        opts: MqOptions,
    ) -> Result<(MessageQueue, Handle)> {
        let local: Vec<usize> = (1..=n_local_readers).collect();
        let remote: Vec<usize> = (n_local_readers + 1..=n_local_readers + n_remote_readers).collect();
        Self::new_writer_with_ranks(0, &local, &remote, max_chunk_bytes, max_chunks, opts)
    }

    /// Creates the writer's side with explicit reader ranks.
    pub fn new_writer_with_ranks(
        writer_rank: usize,
        local_reader_ranks: &[usize],
        remote_reader_ranks: &[usize],
        max_chunk_bytes: usize,
        max_chunks: usize,
        opts: MqOptions,
    ) -> Result<(MessageQueue, Handle)> {
        if max_chunks == 0 {
            return Err(Error::invalid("message queue with 0 chunks"));
        }
        let mut all: Vec<usize> = local_reader_ranks.iter().chain(remote_reader_ranks).copied().collect();
        all.push(writer_rank);
        all.sort_unstable();
        if all.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::invalid(format!(
                "message queue ranks repeat: writer {writer_rank}, local {local_reader_ranks:?}, remote {remote_reader_ranks:?}"
            )));
        }
        let ctx = || Context { op: "mq.new_writer".into(), rank: Some(writer_rank), ..Default::default() };
        let shm = if local_reader_ranks.is_empty() {
            None
        } else {
            let layout = Layout::new(max_chunks, max_chunk_bytes, local_reader_ranks.len())?;
            let seg = ShmSegment::create_unique("mq", layout.len)?;
            let words = [MAGIC, local_reader_ranks.len() as u64, max_chunks as u64, max_chunk_bytes as u64];
            // SAFETY: nobody else knows the fresh segment's name yet.
            unsafe { seg.write(0, bytemuck::cast_slice(&words)) };
            Some(Shm { seg, layout })
        };
        let listener = TcpListener::bind((opts.listen_host.as_str(), 0)).map_err(|e| Error::io(ctx(), e))?;
        let bound = listener.local_addr().map_err(|e| Error::io(ctx(), e))?;
        let port = bound.port();
        // A wildcard listener advertises the address that reaches the other
        // nodes, as the TCP transport does.
        let host = opts
            .connect_host
            .clone()
            .unwrap_or_else(|| advertised_ip(bound.ip(), opts.route_to.as_deref()).to_string());
        let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host };
        let handle = Handle {
            writer_rank,
            local_reader_ranks: local_reader_ranks.to_vec(),
            remote_reader_ranks: remote_reader_ranks.to_vec(),
            max_chunk_bytes,
            max_chunks,
            segment: shm.as_ref().map(|s| s.seg.name().to_string()),
            addr: format!("{host}:{port}"),
            token: token(),
        };
        let state = WriterState {
            shm,
            listener: Some(listener),
            local: local_reader_ranks.iter().map(|_| None).collect(),
            remote: remote_reader_ranks.iter().map(|_| None).collect(),
            seq: 0,
            buf: Vec::new(),
        };
        let inner = Inner { role: Role::Writer(state), ready: false, poisoned: None };
        Ok((MessageQueue { handle: handle.clone(), rank: writer_rank, opts, inner: Mutex::new(inner) }, handle))
    }

    /// Joins the queue of `handle` as reader `rank`: opens the segment when
    /// `rank` is a local reader, and connects to the writer.
    pub fn from_handle(handle: &Handle, rank: usize, opts: MqOptions) -> Result<MessageQueue> {
        let ctx = || Context {
            op: "mq.from_handle".into(),
            rank: Some(rank),
            peer: Some(handle.writer_rank),
            ..Default::default()
        };
        let index = handle.local_reader_ranks.iter().position(|&r| r == rank);
        if index.is_none() && !handle.remote_reader_ranks.contains(&rank) {
            return Err(Error::invalid(format!(
                "rank {rank} is not a reader of this queue (local {:?}, remote {:?})",
                handle.local_reader_ranks, handle.remote_reader_ranks
            )));
        }
        let shm = match (index, &handle.segment) {
            (Some(_), Some(name)) => {
                let layout = Layout::new(handle.max_chunks, handle.max_chunk_bytes, handle.local_reader_ranks.len())?;
                let seg = ShmSegment::open(name, layout.len)?;
                let mut words = [0u64; 4];
                // SAFETY: the writer wrote the header before publishing the
                // handle and never writes it again.
                unsafe { seg.read(0, bytemuck::cast_slice_mut(&mut words)) };
                let want = [MAGIC, layout.readers as u64, layout.chunks as u64, layout.chunk_bytes as u64];
                if words != want {
                    return Err(Error::protocol(
                        ctx(),
                        format!("segment {name} header {words:x?}, expected {want:x?}"),
                    ));
                }
                Some(Shm { seg, layout })
            }
            (Some(_), None) => return Err(Error::protocol(ctx(), "handle lists local readers but no segment")),
            _ => None,
        };
        let sock = connect(&handle.addr, opts.timeout, ctx)?;
        let _ = sock.set_nodelay(true);
        let mut sock = sock;
        let mut hello = [0u8; 24];
        hello[..8].copy_from_slice(&MAGIC.to_le_bytes());
        hello[8..16].copy_from_slice(&handle.token.to_le_bytes());
        hello[16..].copy_from_slice(&(rank as u64).to_le_bytes());
        write_full(&mut sock, &[&hello], opts.timeout, ctx)?;
        let state = ReaderState { shm, index, sock, seq: 0 };
        let inner = Inner { role: Role::Reader(state), ready: false, poisoned: None };
        Ok(MessageQueue { handle: handle.clone(), rank, opts, inner: Mutex::new(inner) })
    }

    /// The queue's handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// This side's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// True for the writer's side.
    pub fn is_writer(&self) -> bool {
        self.rank == self.handle.writer_rank
    }

    fn name(&self) -> String {
        format!("mq:{:016x}", self.handle.token)
    }

    fn ctx(&self, op: &str, peer: Option<usize>) -> Context {
        Context { op: op.into(), group: self.name(), rank: Some(self.rank), peer }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the state as consistent as
        // any error does; the poisoned flag below covers the protocol.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks, refuses a poisoned queue, and completes the handshake if needed.
    fn ready_lock(&self) -> Result<MutexGuard<'_, Inner>> {
        let mut g = self.lock();
        if let Some(cause) = &g.poisoned {
            return Err(Error::Poisoned { group: self.name(), cause: cause.clone() });
        }
        if !g.ready {
            let r = match &mut g.role {
                Role::Writer(w) => self.writer_ready(w),
                Role::Reader(r) => self.reader_ready(r),
            };
            self.settle(&mut g, r)?;
            g.ready = true;
        }
        Ok(g)
    }

    fn settle<T>(&self, g: &mut Inner, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if g.poisoned.is_none() {
                g.poisoned = Some(e.to_string());
            }
        }
        r
    }

    /// The ready handshake: the writer waits until every reader connected
    /// and tells each it may start; a reader waits for that word. Called
    /// implicitly by the first enqueue or dequeue.
    pub fn wait_until_ready(&self) -> Result<()> {
        self.ready_lock().map(|_| ())
    }

    fn writer_ready(&self, w: &mut WriterState) -> Result<()> {
        let h = &self.handle;
        let listener = match &w.listener {
            Some(l) => l,
            None => return Ok(()),
        };
        let ctx = |peer| self.ctx("mq.wait_until_ready", peer);
        listener.set_nonblocking(true).map_err(|e| Error::io(ctx(None), e))?;
        let start = Instant::now();
        let deadline = start + self.opts.timeout;
        let mut backoff = Backoff::new();
        loop {
            let missing: Vec<usize> = h
                .local_reader_ranks
                .iter()
                .zip(&w.local)
                .chain(h.remote_reader_ranks.iter().zip(&w.remote))
                .filter(|(_, s)| s.is_none())
                .map(|(r, _)| *r)
                .collect();
            if missing.is_empty() {
                break;
            }
            let (mut sock, _) = match listener.accept() {
                Ok(s) => s,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    if Instant::now() >= deadline {
                        return Err(Error::timeout(
                            ctx(missing.first().copied()),
                            start.elapsed(),
                            format!("reader rank(s) {missing:?} to connect to {}", h.addr),
                        ));
                    }
                    backoff.snooze();
                    continue;
                }
                Err(e) => return Err(Error::io(ctx(None), e)),
            };
            let _ = sock.set_nonblocking(false);
            let _ = sock.set_nodelay(true);
            let mut hello = [0u8; 24];
            let hello_deadline = deadline.min(Instant::now() + Duration::from_secs(10));
            if let Err(e) = read_full(&mut sock, &mut hello, Some(hello_deadline), || ctx(None)) {
                tracing::warn!(queue = %self.name(), "dropping a connection that sent no hello: {e}");
                continue;
            }
            let word = |i: usize| u64::from_le_bytes(hello[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
            if word(0) != MAGIC || word(1) != h.token {
                tracing::warn!(queue = %self.name(), "dropping a connection with a foreign hello");
                continue;
            }
            let rank = word(2) as usize;
            let slot = if let Some(i) = h.local_reader_ranks.iter().position(|&r| r == rank) {
                &mut w.local[i]
            } else if let Some(i) = h.remote_reader_ranks.iter().position(|&r| r == rank) {
                &mut w.remote[i]
            } else {
                return Err(Error::protocol(ctx(Some(rank)), format!("rank {rank} is not a reader of this queue")));
            };
            if slot.is_some() {
                return Err(Error::protocol(ctx(Some(rank)), format!("reader rank {rank} connected twice")));
            }
            *slot = Some(sock);
        }
        let ranks: Vec<usize> = h.local_reader_ranks.iter().chain(&h.remote_reader_ranks).copied().collect();
        for (sock, rank) in w.local.iter_mut().chain(w.remote.iter_mut()).zip(ranks) {
            if let Some(s) = sock {
                write_full(s, &[&[1u8]], self.opts.timeout, || ctx(Some(rank)))?;
            }
        }
        w.listener = None;
        // Every local reader opened the segment before connecting.
        if let Some(shm) = &mut w.shm {
            shm.seg.unlink();
        }
        Ok(())
    }

    fn reader_ready(&self, r: &mut ReaderState) -> Result<()> {
        let mut b = [0u8; 1];
        let deadline = Instant::now() + self.opts.timeout;
        read_full(&mut r.sock, &mut b, Some(deadline), || {
            self.ctx("mq.wait_until_ready", Some(self.handle.writer_rank))
        })?;
        if b[0] != 1 {
            return Err(Error::protocol(
                self.ctx("mq.wait_until_ready", Some(self.handle.writer_rank)),
                format!("ready byte {}", b[0]),
            ));
        }
        Ok(())
    }

    /// Broadcasts `data` to every reader (writer only). Blocks while the
    /// next chunk still holds a message some local reader has not read, up
    /// to [`MqOptions::timeout`]; the error names the late readers.
    pub fn enqueue_bytes(&self, data: &[u8]) -> Result<()> {
        let mut g = self.ready_lock()?;
        let r = match &mut g.role {
            Role::Writer(w) => self.write_message(w, data),
            Role::Reader(_) => Err(self.not_writer("enqueue")),
        };
        self.settle(&mut g, r)
    }

    /// Serializes `obj` (postcard) and broadcasts it (writer only).
    pub fn enqueue<T: Serialize + ?Sized>(&self, obj: &T) -> Result<()> {
        let mut g = self.ready_lock()?;
        let r = match &mut g.role {
            Role::Writer(w) => {
                let mut buf = std::mem::take(&mut w.buf);
                buf.clear();
                match postcard::to_extend(obj, buf) {
                    Ok(buf) => {
                        let r = self.write_message(w, &buf);
                        w.buf = buf;
                        r
                    }
                    Err(e) => {
                        return Err(Error::Serialization { ctx: self.ctx("mq.enqueue", None), detail: e.to_string() })
                    }
                }
            }
            Role::Reader(_) => Err(self.not_writer("enqueue")),
        };
        self.settle(&mut g, r)
    }

    /// Receives the next message (reader only) as bytes.
    pub fn dequeue_bytes(&self) -> Result<Vec<u8>> {
        self.dequeue_with(|b| b.to_vec())
    }

    /// Receives the next message (reader only) and hands its bytes to `f`
    /// without copying them out of shared memory first.
    pub fn dequeue_with<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let mut g = self.ready_lock()?;
        let r = match &mut g.role {
            Role::Reader(r) => {
                let before = r.seq;
                let res = self.read_message(r, f);
                // Nothing arrived before the reader's timeout: the queue is
                // intact and the caller may simply try again.
                if matches!(res, Err(Error::Timeout { .. })) && r.seq == before {
                    return res;
                }
                res
            }
            Role::Writer(_) => {
                Err(Error::invalid(format!("rank {} is the writer of {}; it cannot dequeue", self.rank, self.name())))
            }
        };
        self.settle(&mut g, r)
    }

    /// Receives the next message (reader only) and deserializes it (postcard).
    pub fn dequeue<T: DeserializeOwned>(&self) -> Result<T> {
        self.dequeue_with(|b| postcard::from_bytes::<T>(b))?.map_err(|e| Error::Serialization {
            ctx: self.ctx("mq.dequeue", Some(self.handle.writer_rank)),
            detail: e.to_string(),
        })
    }

    /// The writer passes `Some(obj)` and gets it back once enqueued; readers
    /// pass `None` and get the writer's object.
    pub fn broadcast_object<T: Serialize + DeserializeOwned>(&self, obj: Option<T>) -> Result<T> {
        if self.is_writer() {
            let obj = obj.ok_or_else(|| Error::invalid("broadcast_object on the writer needs Some(object)"))?;
            self.enqueue(&obj)?;
            Ok(obj)
        } else {
            self.dequeue()
        }
    }

    fn not_writer(&self, what: &str) -> Error {
        Error::invalid(format!(
            "rank {} reads {}; only the writer (rank {}) can {what}",
            self.rank,
            self.name(),
            self.handle.writer_rank
        ))
    }

    fn write_message(&self, w: &mut WriterState, data: &[u8]) -> Result<()> {
        w.seq += 1;
        let m = w.seq;
        let len = data.len() as u64;
        let mut header = [0u8; 16];
        header[..8].copy_from_slice(&m.to_le_bytes());
        header[8..].copy_from_slice(&len.to_le_bytes());
        if let Some(shm) = &w.shm {
            let k = ((m - 1) % shm.layout.chunks as u64) as usize;
            let prev = m.saturating_sub(shm.layout.chunks as u64);
            if prev > 0 {
                self.wait_chunk_free(shm, &w.local, k, prev)?;
            }
            let overflow = data.len() > shm.layout.chunk_bytes;
            if !overflow {
                // SAFETY: chunk k's data area has chunk_bytes >= len bytes;
                // every local reader has finished with it (their read numbers
                // reached `prev`, Acquire above) and none reads it again
                // before `written` says `m` (Release below).
                unsafe { shm.seg.write(shm.chunk(k) + CHUNK_HEADER, data) };
            }
            shm.length(k).store(if overflow { len | OVERFLOW } else { len }, Ordering::Relaxed);
            // Release: publishes the data and the length; pairs with the
            // readers' Acquire load of `written` in `read_message`.
            shm.written(k).store(m, Ordering::Release);
            if overflow {
                for (s, &rank) in w.local.iter_mut().zip(&self.handle.local_reader_ranks) {
                    if let Some(s) = s {
                        write_full(s, &[&header, data], self.opts.timeout, || self.ctx("mq.enqueue", Some(rank)))?;
                    }
                }
            }
        }
        for (s, &rank) in w.remote.iter_mut().zip(&self.handle.remote_reader_ranks) {
            if let Some(s) = s {
                write_full(s, &[&header, data], self.opts.timeout, || self.ctx("mq.enqueue", Some(rank)))?;
            }
        }
        Ok(())
    }

    fn wait_chunk_free(&self, shm: &Shm, socks: &[Option<TcpStream>], k: usize, prev: u64) -> Result<()> {
        let readers = shm.layout.readers;
        // Acquire: pairs with reader i's Release store of its read number,
        // made after it finished reading the chunk.
        let done = |i: usize| shm.read_flag(i, k).load(Ordering::Acquire) >= prev;
        let mut i = 0;
        while i < readers && done(i) {
            i += 1;
        }
        if i == readers {
            return Ok(());
        }
        let start = Instant::now();
        let deadline = start + self.opts.timeout;
        let mut next_warn = start + self.opts.warn_interval;
        let mut next_check = start + LIVENESS_EVERY;
        let mut backoff = Backoff::new();
        let late = |from: usize| -> Vec<usize> {
            (from..readers).filter(|&j| !done(j)).map(|j| self.handle.local_reader_ranks[j]).collect()
        };
        while i < readers {
            if done(i) {
                i += 1;
                continue;
            }
            if !backoff.is_spinning() {
                let now = Instant::now();
                if now >= next_check {
                    next_check = now + LIVENESS_EVERY;
                    for (j, sock) in socks.iter().enumerate().skip(i) {
                        if !done(j) && sock.as_ref().is_some_and(hung_up) {
                            let rank = self.handle.local_reader_ranks[j];
                            return Err(Error::PeerLost {
                                ctx: self.ctx("mq.enqueue", Some(rank)),
                                detail: format!(
                                    "reader rank {rank} closed its connection before reading message {prev}"
                                ),
                            });
                        }
                    }
                }
                if now >= deadline {
                    let late = late(i);
                    return Err(Error::timeout(
                        self.ctx("mq.enqueue", late.first().copied()),
                        start.elapsed(),
                        format!(
                            "reader rank(s) {late:?} to read message {prev} (chunk {k}) so the writer can reuse it"
                        ),
                    ));
                }
                if now >= next_warn {
                    next_warn = now + self.opts.warn_interval;
                    tracing::warn!(
                        queue = %self.name(),
                        "no free chunk in the message queue after {:.0?}: writer rank {} waits for reader rank(s) {:?} to read message {prev}",
                        start.elapsed(),
                        self.rank,
                        late(i)
                    );
                }
            }
            backoff.snooze();
        }
        Ok(())
    }

    fn read_message<R>(&self, r: &mut ReaderState, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let writer = self.handle.writer_rank;
        let ctx = || self.ctx("mq.dequeue", Some(writer));
        r.seq += 1;
        let m = r.seq;
        let (shm, i) = match (&r.shm, r.index) {
            (Some(shm), Some(i)) => (shm, i),
            _ => {
                if let Err(e) = wait_readable(&r.sock, self.opts.read_timeout, ctx) {
                    r.seq -= 1; // nothing consumed: the caller may retry
                    return Err(e);
                }
                let bytes = self.read_frame(&mut r.sock, m)?;
                return Ok(f(&bytes));
            }
        };
        let k = ((m - 1) % shm.layout.chunks as u64) as usize;
        // Acquire: pairs with the writer's Release store of `written` after
        // it copied the data and stored the length.
        let arrived = || shm.written(k).load(Ordering::Acquire) >= m;
        if !arrived() {
            let start = Instant::now();
            let deadline = self.opts.read_timeout.map(|t| start + t);
            let mut next_warn = start + self.opts.warn_interval;
            let mut next_check = start + LIVENESS_EVERY;
            let mut backoff = Backoff::new();
            while !arrived() {
                if !backoff.is_spinning() {
                    let now = Instant::now();
                    if now >= next_check {
                        next_check = now + LIVENESS_EVERY;
                        if hung_up(&r.sock) && !arrived() {
                            return Err(Error::PeerLost {
                                ctx: ctx(),
                                detail: format!("writer closed its connection before message {m}"),
                            });
                        }
                    }
                    if deadline.is_some_and(|d| now >= d) {
                        r.seq -= 1; // nothing consumed: the caller may retry
                        return Err(Error::timeout(
                            ctx(),
                            start.elapsed(),
                            format!("message {m} from writer rank {writer}"),
                        ));
                    }
                    if now >= next_warn {
                        next_warn = now + self.opts.warn_interval;
                        // An idle reader is normal (a worker between
                        // requests): say so only at debug level. A dead
                        // writer is caught by the hang-up check above.
                        tracing::debug!(queue = %self.name(), "reader rank {} has waited {:.0?} for message {m} from writer rank {writer}", self.rank, start.elapsed());
                    }
                }
                backoff.snooze();
            }
        }
        let len = shm.length(k).load(Ordering::Relaxed);
        let out = if len & OVERFLOW != 0 {
            let bytes = self.read_frame(&mut r.sock, m)?;
            if bytes.len() as u64 != len & !OVERFLOW {
                return Err(Error::protocol(
                    ctx(),
                    format!(
                        "overflow message {m} has {} bytes on the socket, {} announced",
                        bytes.len(),
                        len & !OVERFLOW
                    ),
                ));
            }
            f(&bytes)
        } else {
            let len = len as usize;
            if len > shm.layout.chunk_bytes {
                return Err(Error::protocol(
                    ctx(),
                    format!("message {m} claims {len} bytes in a {}-byte chunk", shm.layout.chunk_bytes),
                ));
            }
            // SAFETY: `len` bytes of chunk k's data area, published by the
            // writer before its Release store of `written` (Acquire above);
            // the writer reuses the chunk only after our Release store below.
            let data = unsafe { shm.seg.bytes(shm.chunk(k) + CHUNK_HEADER, len) };
            f(data)
        };
        // Release: tells the writer we are done with chunk k; pairs with its
        // Acquire load in `wait_chunk_free`.
        shm.read_flag(i, k).store(m, Ordering::Release);
        Ok(out)
    }

    fn read_frame(&self, sock: &mut TcpStream, m: u64) -> Result<Vec<u8>> {
        let writer = self.handle.writer_rank;
        let ctx = || self.ctx("mq.dequeue", Some(writer));
        // The frame is announced (shared-memory overflow) or already waited
        // for (remote readers): give it the full operation timeout.
        let deadline = Some(Instant::now() + self.opts.timeout);
        let mut header = [0u8; 16];
        read_full(sock, &mut header, deadline, ctx)?;
        let seq = u64::from_le_bytes(header[..8].try_into().unwrap_or([0; 8]));
        let len = u64::from_le_bytes(header[8..].try_into().unwrap_or([0; 8]));
        if seq != m {
            return Err(Error::protocol(ctx(), format!("socket carries message {seq}, expected {m}")));
        }
        let mut bytes = Vec::new();
        bytes
            .try_reserve_exact(len as usize)
            .map_err(|_| Error::protocol(ctx(), format!("message {m} of {len} bytes does not fit in memory")))?;
        bytes.resize(len as usize, 0);
        // The writer already sent the whole message: give it the full
        // operation timeout rather than an idle reader's infinite wait.
        read_full(sock, &mut bytes, Some(Instant::now() + self.opts.timeout), ctx)?;
        Ok(bytes)
    }

    /// Builds a queue over `group`: `writer_rank` writes, every other rank
    /// reads, through shared memory when it shares the writer's node (it can
    /// open a probe segment the writer created) and through a socket
    /// otherwise. Collective over the group; the returned queue is ready.
    pub fn create_from_process_group(
        group: &ProcessGroup,
        max_chunk_bytes: usize,
        max_chunks: usize,
        writer_rank: usize,
    ) -> Result<MessageQueue> {
        let g = group.options();
        let opts = MqOptions {
            timeout: group.timeout(),
            // Where the group's own mesh listens: reachable by every member.
            listen_host: crate::transport::tcp::addr::listen_host(
                g.listen_host.as_deref(),
                g.interface.as_deref(),
                g.route_to.as_deref(),
            )?,
            route_to: g.route_to.clone(),
            ..Default::default()
        };
        Self::create_from_process_group_with(group, max_chunk_bytes, max_chunks, writer_rank, opts)
    }

    /// [`MessageQueue::create_from_process_group`] with explicit options.
    pub fn create_from_process_group_with(
        group: &ProcessGroup,
        max_chunk_bytes: usize,
        max_chunks: usize,
        writer_rank: usize,
        opts: MqOptions,
    ) -> Result<MessageQueue> {
        let (me, n) = (group.rank(), group.size());
        if writer_rank >= n {
            return Err(Error::invalid(format!("writer rank {writer_rank} in a group of {n}")));
        }
        let same = in_the_same_node_as(group, writer_rank)?;
        let mut handle_bytes = Vec::new();
        let mut writer = None;
        if me == writer_rank {
            let local: Vec<usize> = (0..n).filter(|&r| r != writer_rank && same[r]).collect();
            let remote: Vec<usize> = (0..n).filter(|&r| r != writer_rank && !same[r]).collect();
            let (q, h) =
                Self::new_writer_with_ranks(writer_rank, &local, &remote, max_chunk_bytes, max_chunks, opts.clone())?;
            handle_bytes = h.to_bytes();
            writer = Some(q);
        }
        let mut size = (handle_bytes.len() as u64).to_le_bytes();
        group.broadcast_bytes(&mut size, writer_rank)?;
        let size = u64::from_le_bytes(size) as usize;
        if size > 1 << 20 {
            return Err(Error::protocol(
                Context::new("mq.create", group.name(), me).with_peer(writer_rank),
                format!("handle of {size} bytes"),
            ));
        }
        handle_bytes.resize(size, 0);
        group.broadcast_bytes(&mut handle_bytes, writer_rank)?;
        let q = match writer {
            Some(q) => q,
            None => Self::from_handle(&Handle::from_bytes(&handle_bytes)?, me, opts)?,
        };
        q.wait_until_ready()?;
        Ok(q)
    }
}

/// Which ranks of `group` share a node with rank `src` (a shared-memory
/// probe plus the host name); the same function as
/// [`crate::parallel_state::in_the_same_node_as`], kept here under the name
/// the queue's users look for.
pub fn in_the_same_node_as(group: &ProcessGroup, src: usize) -> Result<Vec<bool>> {
    crate::group::in_the_same_node_as(group, src)
}

fn connect(addr: &str, timeout: Duration, ctx: impl Fn() -> Context) -> Result<TcpStream> {
    let addrs: Vec<_> = addr.to_socket_addrs().map_err(|e| Error::io(ctx(), e))?.collect();
    retry_connect(Some(Instant::now() + timeout), |left| {
        let mut last = std::io::Error::new(ErrorKind::NotFound, format!("{addr} resolves to no address"));
        for a in &addrs {
            let wait = left.unwrap_or(Duration::MAX).clamp(Duration::from_millis(1), Duration::from_secs(5));
            match TcpStream::connect_timeout(a, wait) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    })
    .map_err(|g| Error::timeout(ctx(), g.waited, format!("a connection to the writer at {addr}{}", g.why())))
}
