//! The TCP store server: one event-loop thread serves every connection.
//!
//! # Design
//!
//! - **Readiness, not threads.** A single thread waits on a `mio::Poll`
//!   holding the listener and every client socket ([`reactor`]). A
//!   connection costs one descriptor and a small struct ([`conn`]); an idle
//!   one holds no buffer. Thread count and memory stay flat as clients grow.
//! - **Waiters are data.** A `get` or `wait` on missing keys is parked in a
//!   registry keyed by the key it misses ([`waiters`]), answered by the `set`
//!   that completes it or by its deadline, and removed the moment its client
//!   disconnects (the loop keeps reading a waiting connection to notice).
//!   Client-given timeouts are capped by [`TcpStoreServerBuilder::max_wait`].
//! - **Admission.** At most [`TcpStoreServerBuilder::max_connections`]
//!   connections (by default the descriptor limit less a reserve for the
//!   rest of the process). With a token, an unauthenticated connection must
//!   finish the whole handshake within
//!   [`TcpStoreServerBuilder::handshake_timeout`], may not stay silent longer
//!   than [`TcpStoreServerBuilder::pending_idle_timeout`], and at most
//!   [`TcpStoreServerBuilder::max_pending`] such connections exist at once.
//!   When a limit is reached or descriptors run out, the oldest connection
//!   that has not completed its handshake (without a token: has not sent a
//!   request yet) is shed first, so ranks that are already served keep
//!   being served. Authenticated connections are never timed out for
//!   idleness: ranks may rightly sit idle for hours between store calls.
//! - **Same wire format.** Frames are checked exactly as before
//!   ([`crate::store::protocol`]): the header before any payload byte is
//!   buffered, and input buffers grow only with bytes that arrived.
//!
//! Dropping the [`TcpStoreServer`] (or [`TcpStoreServer::shutdown`]) stops
//! the loop and closes every connection, so blocked clients see the server
//! go away at once.

mod conn;
mod reactor;
mod waiters;

use crate::error::{Context, Error, Result};
use crate::store::protocol;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Descriptors left to the rest of the process when the connection limit
/// is derived from `RLIMIT_NOFILE`.
pub const DEFAULT_FD_RESERVE: usize = 256;
/// Default of [`TcpStoreServerBuilder::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`TcpStoreServerBuilder::pending_idle_timeout`].
pub const DEFAULT_PENDING_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`TcpStoreServerBuilder::max_wait`].
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(3600);
/// Default of [`TcpStoreServerBuilder::write_timeout`].
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Reads `RANKWEAVE_TOKEN`; an unset or empty variable means no token.
pub(crate) fn token_from_env() -> Option<Vec<u8>> {
    std::env::var_os("RANKWEAVE_TOKEN").map(|v| v.into_encoded_bytes()).filter(|v| !v.is_empty())
}

/// Compares two tokens in time that depends only on their lengths.
fn token_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The resolved limits the loop enforces.
#[derive(Debug, Clone)]
struct Limits {
    max_connections: usize,
    max_pending: usize,
    handshake_timeout: Duration,
    pending_idle_timeout: Duration,
    max_wait: Duration,
    write_timeout: Duration,
}

/// Counters the loop publishes and the stop flag it obeys.
#[derive(Debug, Default)]
struct Stats {
    stop: AtomicBool,
    connections: AtomicUsize,
    waiters: AtomicUsize,
}

/// The soft `RLIMIT_NOFILE`, if it can be read.
fn nofile_soft() -> Option<usize> {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
    usize::try_from(soft).ok()
}

/// Listen backlog asked for (the kernel caps it at `net.core.somaxconn`).
/// std's 128 overflows when thousands of ranks connect at once: the kernel
/// then drops handshakes and the clients retry only after a second.
const BACKLOG: i32 = 65_535;

/// Binds the first address `addr` resolves to that accepts a bind, with
/// `SO_REUSEADDR` (as std does) and a deep backlog; returns a nonblocking
/// listener.
fn listen(addr: &str) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::net::ToSocketAddrs;
    let mut last = std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("`{addr}` resolves to no address"));
    for a in addr.to_socket_addrs()? {
        let attempt = (|| {
            let s = Socket::new(Domain::for_address(a), Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            s.bind(&a.into())?;
            s.listen(BACKLOG)?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(std::net::TcpListener::from(s))
        })();
        match attempt {
            Ok(l) => return Ok(l),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Builder for a [`TcpStoreServer`] with explicit options.
#[derive(Debug, Clone)]
pub struct TcpStoreServerBuilder {
    token: Option<Option<Vec<u8>>>,
    max_connections: Option<usize>,
    max_pending: Option<usize>,
    handshake_timeout: Duration,
    pending_idle_timeout: Duration,
    max_wait: Duration,
    write_timeout: Duration,
}

impl Default for TcpStoreServerBuilder {
    fn default() -> Self {
        TcpStoreServerBuilder {
            token: None,
            max_connections: None,
            max_pending: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            pending_idle_timeout: DEFAULT_PENDING_IDLE_TIMEOUT,
            max_wait: DEFAULT_MAX_WAIT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }
}

impl TcpStoreServerBuilder {
    /// Requires every connection to authenticate with `token` first (`None`:
    /// no authentication). Without this call the server uses `RANKWEAVE_TOKEN`.
    pub fn token(mut self, token: Option<&[u8]>) -> Self {
        self.token = Some(token.filter(|t| !t.is_empty()).map(<[u8]>::to_vec));
        self
    }

    /// Most connections open at once (at least 1). Default: the soft
    /// `RLIMIT_NOFILE` at bind time less [`DEFAULT_FD_RESERVE`] (at least 64).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = Some(n.max(1));
        self
    }

    /// Most unauthenticated connections at once when a token is required
    /// (at least 1); a new one beyond it sheds the oldest. Default: a
    /// quarter of the connection limit (at least 16).
    pub fn max_pending(mut self, n: usize) -> Self {
        self.max_pending = Some(n.max(1));
        self
    }

    /// Time from accept by which a connection must have authenticated, when
    /// a token is required, however it trickles its bytes. Default
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// Longest silence of an unauthenticated connection, when a token is
    /// required. Default [`DEFAULT_PENDING_IDLE_TIMEOUT`].
    pub fn pending_idle_timeout(mut self, t: Duration) -> Self {
        self.pending_idle_timeout = t;
        self
    }

    /// Cap on the timeout a client gives `get` and `wait`; a longer wait is
    /// answered `Timeout` at the cap. Default [`DEFAULT_MAX_WAIT`].
    pub fn max_wait(mut self, t: Duration) -> Self {
        self.max_wait = t;
        self
    }

    /// How long replies may sit unread (no write progress) before the
    /// connection is dropped. Default [`DEFAULT_WRITE_TIMEOUT`].
    pub fn write_timeout(mut self, t: Duration) -> Self {
        self.write_timeout = t;
        self
    }

    /// Binds `addr` (`"127.0.0.1:0"` picks a free port) and starts serving.
    pub fn bind(self, addr: &str) -> Result<TcpStoreServer> {
        let token = self.token.unwrap_or_else(token_from_env);
        if token.as_ref().is_some_and(|t| t.len() > protocol::MAX_TOKEN_LEN) {
            return Err(Error::invalid(format!("RANKWEAVE_TOKEN is longer than {} bytes", protocol::MAX_TOKEN_LEN)));
        }
        let max_connections = self
            .max_connections
            .unwrap_or_else(|| nofile_soft().map_or(1024, |n| n.saturating_sub(DEFAULT_FD_RESERVE)).max(64));
        let limits = Limits {
            max_connections,
            max_pending: self.max_pending.unwrap_or((max_connections / 4).max(16)),
            handshake_timeout: self.handshake_timeout,
            pending_idle_timeout: self.pending_idle_timeout,
            max_wait: self.max_wait,
            write_timeout: self.write_timeout,
        };
        let ctx = || Context { op: "store.bind".into(), group: format!("tcp://{addr}"), ..Default::default() };
        let io = |e| Error::io(ctx(), e);
        let std_listener = listen(addr).map_err(io)?;
        let local = std_listener.local_addr().map_err(io)?;
        let listener = mio::net::TcpListener::from_std(std_listener);
        let poll = mio::Poll::new().map_err(io)?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), reactor::WAKER).map_err(io)?);
        let stats = Arc::new(Stats::default());
        let r = reactor::Reactor::new(poll, listener, local, token, limits.clone(), Arc::clone(&stats)).map_err(io)?;
        let thread = std::thread::Builder::new()
            .name(format!("rankweave-store-{}", local.port()))
            .spawn(move || r.run())
            .map_err(io)?;
        tracing::debug!(addr = %local, ?limits, "store server listening");
        Ok(TcpStoreServer { stats, waker, thread: Some(thread), addr: local, limits })
    }
}

/// A running TCP store server. It serves until dropped or shut down.
pub struct TcpStoreServer {
    stats: Arc<Stats>,
    waker: Arc<mio::Waker>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
    limits: Limits,
}

impl std::fmt::Debug for TcpStoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStoreServer")
            .field("addr", &self.addr)
            .field("max_connections", &self.limits.max_connections)
            .finish_non_exhaustive()
    }
}

impl TcpStoreServer {
    /// Binds `addr` (e.g. `"127.0.0.1:0"`, port 0 picks a free one) and
    /// serves from a background thread. Uses `RANKWEAVE_TOKEN` when set.
    pub fn bind(addr: &str) -> Result<TcpStoreServer> {
        TcpStoreServerBuilder::default().bind(addr)
    }

    /// A builder for options (token, limits, timeouts).
    pub fn builder() -> TcpStoreServerBuilder {
        TcpStoreServerBuilder::default()
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Number of client connections currently open.
    pub fn num_connections(&self) -> usize {
        self.stats.connections.load(Ordering::Acquire)
    }

    /// Number of `get` and `wait` requests currently parked.
    pub fn num_waiters(&self) -> usize {
        self.stats.waiters.load(Ordering::Acquire)
    }

    /// The connection limit in force.
    pub fn max_connections(&self) -> usize {
        self.limits.max_connections
    }

    /// Stops serving: closes the listener and every connection (waking every
    /// blocked client with a closed connection) and waits for the server
    /// thread. Idempotent; also done on drop.
    pub fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        self.stats.stop.store(true, Ordering::Release);
        match self.waker.wake() {
            Ok(()) => {
                if thread.join().is_err() {
                    tracing::warn!(addr = %self.addr, "store server thread panicked");
                }
            }
            // Joining could hang; the thread exits at its next event.
            Err(e) => tracing::warn!(addr = %self.addr, error = %e, "cannot wake the store server thread"),
        }
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::token_eq;

    #[test]
    fn token_comparison() {
        assert!(token_eq(b"abc", b"abc"));
        assert!(!token_eq(b"abc", b"abd"));
        assert!(!token_eq(b"abc", b"abcd"));
        assert!(token_eq(b"", b""));
    }
}
