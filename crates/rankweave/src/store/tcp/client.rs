//! The TCP store client: one request at a time per connection, a small pool
//! of connections per handle.

use super::server::{token_from_env, TcpStoreServer};
use crate::error::{Context, Error, Result};
use crate::store::protocol::{self, Request, Response, HEADER_LEN};
use crate::store::Store;
use crate::sys::net::retry_connect;
use crate::transport::tcp::addr::DEFAULT_LINK_TIMEOUT;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Extra time the client waits for a reply beyond the server-side wait, so
/// that a reply which is on its way is not cut off.
fn reply_margin(t: Duration) -> Duration {
    Duration::from_secs(1).saturating_add(t / 50)
}

/// Idle connections kept per handle; more are opened on demand and closed
/// after use.
const MAX_IDLE: usize = 4;
/// Longest single attempt to open an extra connection.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`Store`] client talking to a [`TcpStoreServer`]. Thread-safe: each
/// call borrows a connection from the handle's pool (opening one when all
/// are busy), so a thread blocked in `get` never holds up another thread's
/// `set` on the same handle. A connection whose reply failed or timed out is
/// discarded, never reused.
pub struct TcpStore {
    idle: Mutex<Vec<TcpStream>>,
    host: String,
    addr: String,
    port: u16,
    token: Option<Vec<u8>>,
    timeout: Mutex<Duration>,
    /// See [`TcpStoreBuilder::link_timeout`].
    link_timeout: Option<Duration>,
    /// The in-process server when this handle is the master; it lives as
    /// long as the handle.
    server: Option<TcpStoreServer>,
}

impl std::fmt::Debug for TcpStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStore").field("addr", &self.addr).field("master", &self.server.is_some()).finish()
    }
}

/// Options for [`TcpStore`] connections.
#[derive(Debug, Clone)]
pub struct TcpStoreBuilder {
    host: String,
    port: u16,
    timeout: Duration,
    token: Option<Option<Vec<u8>>>,
    is_master: bool,
    link_timeout: Option<Duration>,
}

impl TcpStoreBuilder {
    /// How long a connection to the server may stay silent (the server's
    /// node gone without a reset) before a request fails; `None`: the
    /// kernel's defaults. Default: [`DEFAULT_LINK_TIMEOUT`].
    pub fn link_timeout(mut self, t: Option<Duration>) -> Self {
        self.link_timeout = t;
        self
    }
    /// The store's default timeout, also the limit on connecting.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// The shared secret (`None`: none). Without this call `RANKWEAVE_TOKEN` is used.
    pub fn token(mut self, token: Option<&[u8]>) -> Self {
        self.token = Some(token.filter(|t| !t.is_empty()).map(<[u8]>::to_vec));
        self
    }
    /// Host the server in this process on `port` (0 picks a free one) and
    /// connect to it. The server listens on `host` when it is a loopback
    /// address, else on every interface (as torch does).
    pub fn master(mut self, is_master: bool) -> Self {
        self.is_master = is_master;
        self
    }
    /// Starts the server if master, then connects (retrying while the server
    /// starts, until the timeout).
    pub fn connect(self) -> Result<TcpStore> {
        let token = self.token.clone().unwrap_or_else(token_from_env);
        if !self.is_master && self.port == 0 {
            return Err(Error::invalid(
                "store port 0: only the master can pick a free port; clients need the real one",
            ));
        }
        if !self.is_master {
            return TcpStore::connect_inner(&self, self.port, token.as_deref(), None);
        }
        let bind = join_host_port(&listen_host(&self.host), self.port);
        let server = TcpStoreServer::builder().token(token.as_deref()).bind(&bind)?;
        let port = server.port();
        TcpStore::connect_inner(&self, port, token.as_deref(), Some(server))
    }
}

/// Where the master's server listens. A loopback host is kept (nothing
/// outside this machine can connect then); any other name or address gets
/// the wildcard of its family, as torch does, because the name the other
/// nodes use for this host may resolve to a different interface here.
fn listen_host(host: &str) -> String {
    let addrs: Vec<SocketAddr> = match (host, 0u16).to_socket_addrs() {
        Ok(a) => a.collect(),
        // Let the bind report the unresolvable name.
        Err(_) => return host.to_string(),
    };
    if !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()) {
        host.to_string()
    } else if addrs.iter().any(SocketAddr::is_ipv4) || addrs.is_empty() {
        "0.0.0.0".into()
    } else {
        "::".into()
    }
}

/// `host:port`, bracketing IPv6 literals.
pub(crate) fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl TcpStore {
    /// Connects to a server at `host:port`, retrying with backoff (10 ms
    /// growing to 500 ms) while it starts, until `timeout` passes. `timeout`
    /// is also the store's default timeout. Uses `RANKWEAVE_TOKEN` when set.
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStore> {
        Self::builder(host, port).timeout(timeout).connect()
    }

    /// torch's `TCPStore(host, port, is_master, timeout)`: the master hosts the
    /// server in this process (kept alive by the returned handle; port 0 picks
    /// a free port, see [`TcpStore::port`]); everyone connects to it.
    pub fn new(host: &str, port: u16, is_master: bool, timeout: Duration) -> Result<TcpStore> {
        Self::builder(host, port).master(is_master).timeout(timeout).connect()
    }

    /// A builder for further options (token).
    pub fn builder(host: &str, port: u16) -> TcpStoreBuilder {
        TcpStoreBuilder {
            host: host.to_string(),
            port,
            timeout: crate::store::default_timeout(),
            token: None,
            is_master: false,
            link_timeout: Some(DEFAULT_LINK_TIMEOUT),
        }
    }

    fn connect_inner(
        b: &TcpStoreBuilder,
        port: u16,
        token: Option<&[u8]>,
        server: Option<TcpStoreServer>,
    ) -> Result<TcpStore> {
        let (host, timeout, link) = (b.host.as_str(), b.timeout, b.link_timeout);
        let addr = format!("tcp://{}", join_host_port(host, port));
        let ctx = || Context { op: "store.connect".into(), group: addr.clone(), ..Default::default() };
        let deadline = Instant::now().checked_add(timeout);
        let mut stream = retry_connect(deadline, |left| try_connect(host, port, left, link)).map_err(|g| {
            Error::timeout(ctx(), g.waited, format!("store server at {addr} to accept a connection{}", g.why()))
        })?;
        let store = TcpStore {
            idle: Mutex::new(Vec::new()),
            host: host.to_string(),
            addr: addr.clone(),
            port,
            token: token.map(<[u8]>::to_vec),
            timeout: Mutex::new(timeout),
            link_timeout: link,
            server,
        };
        store.authenticate(&mut stream)?;
        store.lock_idle().push(stream);
        Ok(store)
    }

    /// Presents the token (if any) on a fresh connection.
    fn authenticate(&self, stream: &mut TcpStream) -> Result<()> {
        let Some(token) = &self.token else { return Ok(()) };
        let op = "store.auth";
        let frame = protocol::encode_request(&Request::Auth { token: token.clone() })?;
        let wait = self.timeout();
        match exchange(stream, &frame, Instant::now().checked_add(wait)) {
            Ok(Ok(Response::Ok)) => Ok(()),
            Ok(Ok(Response::Unauthorized(m))) => {
                Err(Error::Unauthorized(format!("store server at {}: {m}", self.addr)))
            }
            Ok(Ok(other)) => Err(self.unexpected(op, &other)),
            Ok(Err(e)) => Err(Error::protocol(self.ctx(op), e.to_string())),
            Err(e) => Err(self.io_error(op, e, wait)),
        }
    }

    /// Opens one more connection (a single attempt: the server is known to
    /// have been up).
    fn open(&self, op: &str, limit: Duration) -> Result<TcpStream> {
        let mut stream = try_connect(&self.host, self.port, Some(limit.min(RECONNECT_TIMEOUT)), self.link_timeout)
            .map_err(|e| Error::PeerLost {
                ctx: self.ctx(op),
                detail: format!("cannot reach store server at {}: {e}", self.addr),
            })?;
        self.authenticate(&mut stream)?;
        Ok(stream)
    }

    /// The server's port (the one picked when the master asked for port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// True when this handle hosts the server.
    pub fn is_master(&self) -> bool {
        self.server.is_some()
    }

    /// The in-process server, when this handle is the master.
    pub fn server(&self) -> Option<&TcpStoreServer> {
        self.server.as_ref()
    }

    fn ctx(&self, op: &str) -> Context {
        Context { op: op.into(), group: self.addr.clone(), ..Default::default() }
    }

    fn lock_idle(&self) -> MutexGuard<'_, Vec<TcpStream>> {
        // The pool only holds whole, idle connections; a panic elsewhere
        // cannot leave it inconsistent.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unexpected(&self, op: &str, resp: &Response) -> Error {
        Error::protocol(self.ctx(op), format!("unexpected reply {resp:?} from store server"))
    }

    /// Maps a failed read/write to an error naming the store address.
    fn io_error(&self, op: &str, e: io::Error, reply_wait: Duration) -> Error {
        use io::ErrorKind as K;
        match e.kind() {
            K::WouldBlock | K::TimedOut => Error::timeout(
                self.ctx(op),
                reply_wait,
                format!("a reply from store server at {} (server hung or unreachable)", self.addr),
            ),
            K::UnexpectedEof
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::ConnectionRefused
            | K::BrokenPipe
            | K::NotConnected => {
                Error::PeerLost { ctx: self.ctx(op), detail: format!("store server at {} went away: {e}", self.addr) }
            }
            _ => Error::io(self.ctx(op), e),
        }
    }

    /// Sends one request on a pooled connection and reads its reply,
    /// waiting at most `reply_wait` for it.
    fn call(&self, op: &str, req: &Request, reply_wait: Duration) -> Result<Response> {
        let frame = protocol::encode_request(req)?;
        let pooled = self.lock_idle().pop();
        let mut stream = match pooled {
            Some(s) => s,
            // A short call does not wait longer to connect than for its reply.
            None => self.open(op, self.timeout().min(reply_wait.max(Duration::from_millis(1))))?,
        };
        match exchange(&mut stream, &frame, Instant::now().checked_add(reply_wait)) {
            Ok(Ok(resp)) => {
                // An unauthorized connection is being closed by the server.
                if !matches!(resp, Response::Unauthorized(_)) {
                    let mut idle = self.lock_idle();
                    if idle.len() < MAX_IDLE {
                        idle.push(stream);
                    }
                }
                Ok(resp)
            }
            Ok(Err(e)) => Err(Error::protocol(self.ctx(op), e.to_string())),
            Err(e) => Err(self.io_error(op, e, reply_wait)),
        }
    }

    fn call_default(&self, op: &str, req: &Request) -> Result<Response> {
        let resp = self.call(op, req, self.timeout())?;
        self.check_error(op, resp)
    }

    fn check_error(&self, op: &str, resp: Response) -> Result<Response> {
        match resp {
            Response::Error(m) => Err(Error::Store(format!("{op} at {}: {m}", self.addr))),
            Response::Unauthorized(m) => Err(Error::Unauthorized(format!("{op} at {}: {m}", self.addr))),
            r => Ok(r),
        }
    }
}

fn try_connect(
    host: &str,
    port: u16,
    remaining: Option<Duration>,
    link_timeout: Option<Duration>,
) -> io::Result<TcpStream> {
    let per_try = remaining.unwrap_or(Duration::MAX).clamp(Duration::from_millis(1), Duration::from_secs(5));
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("`{host}` resolves to no address"));
    for a in addrs {
        match TcpStream::connect_timeout(&a, per_try) {
            Ok(s) => {
                s.set_nodelay(true)?;
                // A server that vanishes without a reset (its node lost)
                // fails requests within the link timeout, not the store's.
                crate::transport::tcp::addr::guard_link(&socket2::SockRef::from(&s), link_timeout)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Sets the socket timeout to what is left of `deadline`.
fn arm(stream: &TcpStream, deadline: Option<Instant>, write: bool) -> io::Result<()> {
    let t = match deadline {
        None => None,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
            }
            Some(left)
        }
    };
    if write {
        stream.set_write_timeout(t)
    } else {
        stream.set_read_timeout(t)
    }
}

fn read_full(stream: &mut TcpStream, buf: &mut [u8], deadline: Option<Instant>) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        arm(stream, deadline, false)?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed by the store server")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes a request frame and reads one reply. The outer error is I/O, the
/// inner one a malformed reply.
fn exchange(stream: &mut TcpStream, frame: &[u8], deadline: Option<Instant>) -> io::Result<Result<Response>> {
    arm(stream, deadline, true)?;
    stream.write_all(frame)?;
    let mut head = [0u8; HEADER_LEN];
    read_full(stream, &mut head, deadline)?;
    let header = match protocol::parse_response_header(&head) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    let mut payload = Vec::new();
    // The header already capped the length; grow with what arrives.
    let mut chunk = vec![0u8; header.len.min(64 * 1024)];
    while payload.len() < header.len {
        let n = (header.len - payload.len()).min(chunk.len());
        read_full(stream, &mut chunk[..n], deadline)?;
        payload.extend_from_slice(&chunk[..n]);
    }
    Ok(protocol::decode_response_payload(header.kind, &payload))
}

fn ms(t: Duration) -> u64 {
    u64::try_from(t.as_millis()).unwrap_or(u64::MAX)
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        match self.call_default("store.set", &Request::Set { key: key.into(), value: value.to_vec() })? {
            Response::Ok => Ok(()),
            r => Err(self.unexpected("store.set", &r)),
        }
    }

    fn get_timeout(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let req = Request::Get { key: key.into(), timeout_ms: ms(timeout) };
        let resp = self.call("store.get", &req, timeout.saturating_add(reply_margin(timeout)))?;
        match self.check_error("store.get", resp)? {
            Response::Value(v) => Ok(v),
            Response::Timeout => Err(Error::timeout(self.ctx("store.get"), timeout, format!("key `{key}`"))),
            r => Err(self.unexpected("store.get", &r)),
        }
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        let req = Request::Wait { keys: keys.iter().map(|k| k.to_string()).collect(), timeout_ms: ms(timeout) };
        let resp = self.call("store.wait", &req, timeout.saturating_add(reply_margin(timeout)))?;
        match self.check_error("store.wait", resp)? {
            Response::Ok => Ok(()),
            Response::Timeout => Err(Error::timeout(self.ctx("store.wait"), timeout, format!("keys {keys:?}"))),
            r => Err(self.unexpected("store.wait", &r)),
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        match self.call_default("store.add", &Request::Add { key: key.into(), delta })? {
            Response::Int(v) => Ok(v),
            r => Err(self.unexpected("store.add", &r)),
        }
    }

    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        let req = Request::CompareSet { key: key.into(), expected: expected.to_vec(), desired: desired.to_vec() };
        match self.call_default("store.compare_set", &req)? {
            Response::Value(v) => Ok(v),
            r => Err(self.unexpected("store.compare_set", &r)),
        }
    }

    fn delete_key(&self, key: &str) -> Result<bool> {
        match self.call_default("store.delete_key", &Request::DeleteKey { key: key.into() })? {
            Response::Bool(b) => Ok(b),
            r => Err(self.unexpected("store.delete_key", &r)),
        }
    }

    fn num_keys(&self) -> Result<usize> {
        match self.call_default("store.num_keys", &Request::NumKeys)? {
            Response::Int(n) => usize::try_from(n).map_err(|_| self.unexpected("store.num_keys", &Response::Int(n))),
            r => Err(self.unexpected("store.num_keys", &r)),
        }
    }

    fn check(&self, keys: &[&str]) -> Result<bool> {
        let req = Request::Check { keys: keys.iter().map(|k| k.to_string()).collect() };
        match self.call_default("store.check", &req)? {
            Response::Bool(b) => Ok(b),
            r => Err(self.unexpected("store.check", &r)),
        }
    }

    fn check_within(&self, keys: &[&str], reply_wait: Duration) -> Result<bool> {
        let req = Request::Check { keys: keys.iter().map(|k| k.to_string()).collect() };
        let resp = self.call("store.check", &req, reply_wait.min(self.timeout()))?;
        match self.check_error("store.check", resp)? {
            Response::Bool(b) => Ok(b),
            r => Err(self.unexpected("store.check", &r)),
        }
    }

    fn timeout(&self) -> Duration {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_timeout(&self, timeout: Duration) {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner()) = timeout;
    }

    fn describe(&self) -> String {
        self.addr.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::{join_host_port, listen_host};

    #[test]
    fn loopback_hosts_stay_private() {
        assert_eq!(listen_host("127.0.0.1"), "127.0.0.1");
        assert_eq!(listen_host("::1"), "::1");
        assert_eq!(listen_host("10.1.2.3"), "0.0.0.0");
        assert_eq!(listen_host("fd00::5"), "::");
    }

    #[test]
    fn host_port_joining() {
        assert_eq!(join_host_port("::1", 5), "[::1]:5");
        assert_eq!(join_host_port("[::1]", 5), "[::1]:5");
        assert_eq!(join_host_port("node", 5), "node:5");
    }
}
