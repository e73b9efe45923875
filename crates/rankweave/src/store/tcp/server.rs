//! The TCP store server: one accept thread, one thread per connection.
//!
//! All connections share one map behind a mutex; `get` and `wait` block only
//! their own connection's thread on a condvar that every mutation notifies.
//! A connection that sends anything malformed is logged and closed; the rest
//! are unaffected. Dropping the [`TcpStoreServer`] (or calling
//! [`TcpStoreServer::shutdown`]) closes the listener and every connection and
//! wakes every waiter.

use crate::error::{Context, Error, Result};
use crate::store::protocol::{self, Header, Request, Response, HEADER_LEN};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Stack of each connection thread: requests are parsed into heap buffers,
/// so a small stack keeps hundreds of connections cheap.
const CONN_STACK: usize = 256 * 1024;
/// How long writes to a client may block before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection may take to authenticate when a token is required,
/// so that stray connections cannot hold threads forever.
const AUTH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for connection threads to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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

struct Shared {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
    stop: AtomicBool,
    token: Option<Vec<u8>>,
    /// Clones of live connection sockets, so shutdown can close them.
    conns: Mutex<HashMap<u64, TcpStream>>,
    conns_gone: Condvar,
    next_id: AtomicU64,
    addr: SocketAddr,
}

impl Shared {
    fn lock_map(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // The map is never left half-updated, so a poisoned lock is still usable.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn lock_conns(&self) -> MutexGuard<'_, HashMap<u64, TcpStream>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Waits until `ready` holds, the deadline passes (`None`) or the server
    /// stops (`None`).
    fn wait_for<F: Fn(&HashMap<String, Vec<u8>>) -> bool>(
        &self,
        timeout_ms: u64,
        ready: F,
    ) -> Option<MutexGuard<'_, HashMap<String, Vec<u8>>>> {
        let deadline = Instant::now().checked_add(Duration::from_millis(timeout_ms));
        let mut guard = self.lock_map();
        loop {
            if ready(&guard) {
                return Some(guard);
            }
            if self.stopping() {
                return None;
            }
            guard = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    self.changed.wait_timeout(guard, d - now).unwrap_or_else(|e| e.into_inner()).0
                }
                None => self.changed.wait(guard).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }

    fn handle(&self, req: Request) -> Response {
        match req {
            // Only reached when the connection is already authenticated or the
            // server has no token: accept it either way.
            Request::Auth { .. } => Response::Ok,
            Request::Set { key, value } => {
                self.lock_map().insert(key, value);
                self.changed.notify_all();
                Response::Ok
            }
            Request::Get { key, timeout_ms } => match self.wait_for(timeout_ms, |m| m.contains_key(&key)) {
                Some(m) => Response::Value(m.get(&key).cloned().unwrap_or_default()),
                None => Response::Timeout,
            },
            Request::Wait { keys, timeout_ms } => {
                match self.wait_for(timeout_ms, |m| keys.iter().all(|k| m.contains_key(k))) {
                    Some(_) => Response::Ok,
                    None => Response::Timeout,
                }
            }
            Request::Add { key, delta } => {
                let mut m = self.lock_map();
                let cur = match m.get(&key) {
                    None => 0,
                    Some(v) => match std::str::from_utf8(v).ok().and_then(|s| s.parse::<i64>().ok()) {
                        Some(c) => c,
                        None => {
                            return Response::Error(format!("add: key `{key}` holds a value that is not a counter"))
                        }
                    },
                };
                let new = cur.wrapping_add(delta);
                m.insert(key, new.to_string().into_bytes());
                drop(m);
                self.changed.notify_all();
                Response::Int(new)
            }
            Request::CompareSet { key, expected, desired } => {
                let mut m = self.lock_map();
                let matches = match m.get(&key) {
                    None => expected.is_empty(),
                    Some(cur) => *cur == expected,
                };
                if matches {
                    m.insert(key, desired.clone());
                    drop(m);
                    self.changed.notify_all();
                    Response::Value(desired)
                } else {
                    Response::Value(m.get(&key).cloned().unwrap_or_default())
                }
            }
            Request::DeleteKey { key } => Response::Bool(self.lock_map().remove(&key).is_some()),
            Request::NumKeys => Response::Int(i64::try_from(self.lock_map().len()).unwrap_or(i64::MAX)),
            Request::Check { keys } => {
                let m = self.lock_map();
                Response::Bool(keys.iter().all(|k| m.contains_key(k)))
            }
        }
    }
}

/// Builder for a [`TcpStoreServer`] with explicit options.
#[derive(Debug, Clone, Default)]
pub struct TcpStoreServerBuilder {
    token: Option<Option<Vec<u8>>>,
}

impl TcpStoreServerBuilder {
    /// Requires every connection to authenticate with `token` first (`None`:
    /// no authentication). Without this call the server uses `RANKWEAVE_TOKEN`.
    pub fn token(mut self, token: Option<&[u8]>) -> Self {
        self.token = Some(token.filter(|t| !t.is_empty()).map(<[u8]>::to_vec));
        self
    }

    /// Binds `addr` (`"127.0.0.1:0"` picks a free port) and starts serving.
    pub fn bind(self, addr: &str) -> Result<TcpStoreServer> {
        let token = self.token.unwrap_or_else(token_from_env);
        if token.as_ref().is_some_and(|t| t.len() > protocol::MAX_TOKEN_LEN) {
            return Err(Error::invalid(format!("RANKWEAVE_TOKEN is longer than {} bytes", protocol::MAX_TOKEN_LEN)));
        }
        let ctx = || Context { op: "store.bind".into(), group: format!("tcp://{addr}"), ..Default::default() };
        let listener = TcpListener::bind(addr).map_err(|e| Error::io(ctx(), e))?;
        let local = listener.local_addr().map_err(|e| Error::io(ctx(), e))?;
        let shared = Arc::new(Shared {
            map: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            token,
            conns: Mutex::new(HashMap::new()),
            conns_gone: Condvar::new(),
            next_id: AtomicU64::new(0),
            addr: local,
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name(format!("rankweave-store-accept-{}", local.port()))
            .spawn(move || accept_loop(listener, s))
            .map_err(|e| Error::io(ctx(), e))?;
        tracing::debug!(addr = %local, "store server listening");
        Ok(TcpStoreServer { shared, accept: Some(accept) })
    }
}

/// A running TCP store server. It serves until dropped or shut down.
pub struct TcpStoreServer {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TcpStoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStoreServer").field("addr", &self.shared.addr).finish_non_exhaustive()
    }
}

impl TcpStoreServer {
    /// Binds `addr` (e.g. `"127.0.0.1:0"`, port 0 picks a free one) and
    /// serves from background threads. Uses `RANKWEAVE_TOKEN` when set.
    pub fn bind(addr: &str) -> Result<TcpStoreServer> {
        TcpStoreServerBuilder::default().bind(addr)
    }

    /// A builder for options (token).
    pub fn builder() -> TcpStoreServerBuilder {
        TcpStoreServerBuilder::default()
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.shared.addr.port()
    }

    /// Number of client connections currently open.
    pub fn num_connections(&self) -> usize {
        self.shared.lock_conns().len()
    }

    /// Stops serving: closes the listener and every connection, wakes every
    /// waiter, and waits (a few seconds at most) for the threads to exit.
    /// Idempotent; also done on drop.
    pub fn shutdown(&mut self) {
        let Some(accept) = self.accept.take() else { return };
        self.shared.stop.store(true, Ordering::Release);
        // Taking the map lock orders the flag before any waiter's next check.
        drop(self.shared.lock_map());
        self.shared.changed.notify_all();
        // Wake the accept thread with a connection of our own. If that fails
        // the thread exits at its next accept; joining it could hang.
        match TcpStream::connect_timeout(&wake_addr(self.shared.addr), Duration::from_secs(1)) {
            Ok(_) => {
                if accept.join().is_err() {
                    tracing::warn!(addr = %self.shared.addr, "store accept thread panicked");
                }
            }
            Err(e) => tracing::warn!(addr = %self.shared.addr, error = %e, "cannot wake the store accept thread"),
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        let mut conns = self.shared.lock_conns();
        for s in conns.values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        while !conns.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(addr = %self.shared.addr, left = conns.len(), "store connections still closing");
                break;
            }
            conns = self.shared.conns_gone.wait_timeout(conns, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        tracing::debug!(addr = %self.shared.addr, "store server stopped");
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Where to connect to reach a listener bound to `addr` from this host.
fn wake_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stopping() {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: back off briefly, keep serving.
                tracing::warn!(addr = %shared.addr, error = %e, "store accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        match stream.try_clone() {
            Ok(clone) => {
                shared.lock_conns().insert(id, clone);
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "store connection refused: cannot track socket");
                continue;
            }
        }
        let s = Arc::clone(&shared);
        let spawned =
            std::thread::Builder::new().name("rankweave-store-conn".into()).stack_size(CONN_STACK).spawn(move || {
                serve_connection(&s, stream, peer);
                s.lock_conns().remove(&id);
                s.conns_gone.notify_all();
            });
        if let Err(e) = spawned {
            tracing::warn!(%peer, error = %e, "store connection refused: cannot spawn thread");
            if let Some(s) = shared.lock_conns().remove(&id) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Why a connection ended.
enum End {
    /// The client closed cleanly between frames.
    Closed,
    /// The server is stopping.
    Stopping,
    /// Bad bytes, auth failure or I/O error: logged by the caller.
    Bad(String),
}

/// Reads one frame header; `Ok(None)` on a clean EOF before its first byte.
fn read_header(stream: &mut TcpStream) -> io::Result<Option<[u8; HEADER_LEN]>> {
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match stream.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed after {got} of {HEADER_LEN} header bytes"),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(head))
}

fn send(stream: &mut TcpStream, resp: &Response) -> io::Result<()> {
    let frame = protocol::encode_response(resp)
        .or_else(|e| protocol::encode_response(&Response::Error(e.to_string())))
        .map_err(|e| io::Error::other(e.to_string()))?;
    stream.write_all(&frame)
}

fn serve_connection(shared: &Shared, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    match serve_frames(shared, &mut stream) {
        End::Closed | End::Stopping => {}
        End::Bad(why) => {
            tracing::warn!(addr = %shared.addr, %peer, "closing store connection: {why}");
            linger_close(&mut stream);
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Closes the sending side, then discards what the client still sends for a
/// moment: closing a socket with unread input makes the kernel send a reset,
/// which can destroy the error reply before the client reads it.
fn linger_close(stream: &mut TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut sink = [0u8; 4096];
    let mut left: usize = 64 * 1024;
    while left > 0 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

fn serve_frames(shared: &Shared, stream: &mut TcpStream) -> End {
    let mut authed = shared.token.is_none();
    if !authed {
        let _ = stream.set_read_timeout(Some(AUTH_TIMEOUT));
    }
    loop {
        let head = match read_header(stream) {
            Ok(Some(h)) => h,
            Ok(None) => return if shared.stopping() { End::Stopping } else { End::Closed },
            Err(_) if shared.stopping() => return End::Stopping,
            Err(e) => return End::Bad(format!("read failed: {e}")),
        };
        let header: Header = match protocol::parse_request_header(&head) {
            Ok(h) => h,
            Err(e) => {
                let _ = send(stream, &Response::Error(e.to_string()));
                return End::Bad(e.to_string());
            }
        };
        if !authed && header.kind != protocol::AUTH_KIND {
            let _ = send(stream, &Response::Unauthorized("this store requires RANKWEAVE_TOKEN".into()));
            return End::Bad("first frame is not an authentication frame".into());
        }
        let payload = match protocol::read_payload(stream, header) {
            Ok(p) => p,
            Err(_) if shared.stopping() => return End::Stopping,
            Err(e) => return End::Bad(format!("read failed: {e}")),
        };
        let req = match protocol::decode_request_payload(header.kind, &payload) {
            Ok(r) => r,
            Err(e) => {
                let _ = send(stream, &Response::Error(e.to_string()));
                return End::Bad(e.to_string());
            }
        };
        drop(payload);
        if !authed {
            let ok = match (&req, &shared.token) {
                (Request::Auth { token }, Some(expected)) => token_eq(token, expected),
                _ => false,
            };
            if !ok {
                let _ = send(stream, &Response::Unauthorized("wrong RANKWEAVE_TOKEN".into()));
                return End::Bad("wrong authentication token".into());
            }
            authed = true;
            let _ = stream.set_read_timeout(None);
            if let Err(e) = send(stream, &Response::Ok) {
                return End::Bad(format!("write failed: {e}"));
            }
            continue;
        }
        let resp = shared.handle(req);
        if shared.stopping() && resp == Response::Timeout {
            // The wait ended because the server is going away, not because
            // the deadline passed; let the client see the connection close.
            return End::Stopping;
        }
        if let Err(e) = send(stream, &resp) {
            if shared.stopping() {
                return End::Stopping;
            }
            return End::Bad(format!("write failed: {e}"));
        }
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
