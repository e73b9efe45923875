//! Building the full mesh of connections of one group.
//!
//! Every rank binds `{listen_host}:0`, publishes the address peers should dial
//! under `tcp/addr/{rank}` in the group's (namespaced) store, then connects
//! to every lower rank and accepts every higher rank. Each connection starts
//! with a handshake: the dialer sends a Hello frame carrying
//! `(its rank, the rank it meant to reach, group size)` under the group id;
//! the listener checks all of it, drops strays (another group, a duplicate,
//! a garbage client), and answers with its own Hello, which the dialer checks
//! the same way. Everything shares the group-creation deadline; connects that
//! are refused (the peer is not listening yet) retry with backoff until then.
//!
//! Advertised address: when `listen_host` is a concrete address it is
//! published as bound. For a wildcard (`0.0.0.0`, `::`) the rank publishes the
//! local address of the interface that routes to `MASTER_ADDR` (found by
//! connecting a UDP socket, which sends nothing); without `MASTER_ADDR` it
//! resolves the host name and takes the first non-loopback address, else
//! loopback.

use super::addr::{guard_link, resolve, IFNAME_ENV};
use super::header::{AbortInfo, AbortKind, FrameKind, Header, HEADER_LEN};
use super::io::{read_small, write_small};
use crate::error::{Context, Error, Result};
use crate::store::Store;
use crate::sys::net::retry_connect;
use crate::transport::OpCode;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// Longest a freshly accepted connection may take to say hello before it is
/// dropped as a stray.
const HELLO_GRACE: Duration = Duration::from_secs(5);

const HELLO_LEN: usize = 24;

pub(crate) fn addr_key(rank: usize) -> String {
    format!("tcp/addr/{rank}")
}

/// No Nagle delay, and the congestion control of [`congestion`]. The
/// socket buffers are left to the kernel's autotuning
/// (`net.ipv4.tcp_wmem`/`tcp_rmem`): fixing them (4 MiB each until run 7)
/// switches autotuning off, and over loopback the autotuned buffers moved
/// large messages 10-20% faster (docs/PERFORMANCE.md, run 7).
fn tune(sock: &Socket) -> io::Result<()> {
    sock.set_nodelay(true)?;
    if let Some(ca) = congestion() {
        // Not allowed (a kernel without the module, or one outside
        // `net.ipv4.tcp_allowed_congestion_control`): keep the default.
        if let Err(e) = sock.set_tcp_congestion(ca.as_bytes()) {
            tracing::debug!("TCP congestion control {ca} refused ({e}); the kernel's default stays");
        }
    }
    Ok(())
}

/// Congestion control the mesh connections ask for: `cubic`, unless
/// `RANKWEAVE_TCP_CONGESTION` names another, or `system` for the kernel's
/// default (`net.ipv4.tcp_congestion_control`). BBR, the default of many
/// cloud images, paces every burst and released paced segments from timers
/// on either core, which reordered loopback streams into spurious
/// retransmissions: a 1 MiB ping-pong took 1.8-2x as long under BBR as
/// under cubic (docs/PERFORMANCE.md, run 11).
pub(crate) fn congestion() -> Option<&'static str> {
    static CA: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    CA.get_or_init(|| congestion_from(std::env::var("RANKWEAVE_TCP_CONGESTION").ok().as_deref())).as_deref()
}

fn congestion_from(var: Option<&str>) -> Option<String> {
    match var.map(str::trim) {
        None | Some("") => Some("cubic".to_string()),
        Some("system") => None,
        Some(name) => Some(name.to_string()),
    }
}

/// The address peers should dial to reach a socket bound to `bound`:
/// `bound` itself when concrete; for a wildcard, the address of the
/// interface that routes to host `route_to` (the job's `MASTER_ADDR`), else a non-loopback address of the host name, else
/// loopback.
pub fn advertised_ip(bound: IpAddr, route_to: Option<&str>) -> IpAddr {
    if !bound.is_unspecified() {
        return bound;
    }
    if let Some(master) = route_to {
        // Connecting a UDP socket sends nothing: it only asks the kernel for
        // the route, so any port will do.
        if let Ok(target) = resolve(master, 29500) {
            let local = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            if let Ok(udp) = UdpSocket::bind(local) {
                if udp.connect(target).is_ok() {
                    if let Ok(a) = udp.local_addr() {
                        if !a.ip().is_unspecified() {
                            return a.ip();
                        }
                    }
                }
            }
        }
    }
    if let Ok(name) = nix::unistd::gethostname() {
        if let Some(name) = name.to_str() {
            if let Ok(addrs) = (name, 0u16).to_socket_addrs() {
                let mut addrs: Vec<SocketAddr> = addrs.collect();
                addrs.sort_by_key(|a| !a.is_ipv4());
                if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback() && a.is_ipv4() == bound.is_ipv4()) {
                    return a.ip();
                }
            }
        }
    }
    if bound.is_ipv4() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])
    }
}

/// Binds a nonblocking listener on `{host}:0`; returns it and the address to publish.
pub fn listen(host: &str, route_to: Option<&str>, backlog: usize) -> io::Result<(Socket, SocketAddr)> {
    let addr = resolve(host, 0)?;
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Buffer sizes set before listen() are inherited by accepted sockets and
    // let the kernel pick a large enough window scale.
    tune(&sock)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog.clamp(16, 4096) as i32)?;
    sock.set_nonblocking(true)?;
    let bound = sock.local_addr()?.as_socket().ok_or_else(|| io::Error::other("listener has no inet address"))?;
    Ok((sock, SocketAddr::new(advertised_ip(bound.ip(), route_to), bound.port())))
}

fn hello(group_id: u64, seq: u64, from: usize, to: usize, size: usize) -> Vec<u8> {
    let h = Header { kind: FrameKind::Op(OpCode::Hello), group_id, seq, len: HELLO_LEN as u64, desc: 0 };
    let mut v = h.encode().to_vec();
    for x in [from, to, size] {
        v.extend_from_slice(&(x as u64).to_le_bytes());
    }
    v
}

/// Why a handshake failed.
enum HelloError {
    /// The socket failed, closed or timed out.
    Io(io::Error),
    /// The bytes were not a valid hello of this group.
    Bad(String),
}

impl std::fmt::Display for HelloError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HelloError::Io(e) => write!(f, "{e}"),
            HelloError::Bad(s) => f.write_str(s),
        }
    }
}

impl From<String> for HelloError {
    fn from(s: String) -> Self {
        HelloError::Bad(s)
    }
}

/// Reads a Hello frame; returns `(from, to, size, seq)`.
fn read_hello(sock: &Socket, group_id: u64, deadline: Instant) -> std::result::Result<[u64; 4], HelloError> {
    let raw = read_small(sock, Vec::new(), HEADER_LEN, deadline).map_err(HelloError::Io)?;
    let h = super::header::decode_header(&raw).map_err(|e| e.to_string())?;
    if h.kind == FrameKind::Abort {
        let payload = read_small(sock, Vec::new(), h.len as usize, deadline).map_err(HelloError::Io)?;
        let reason = AbortInfo::decode(&payload).map(|i| i.reason).unwrap_or_default();
        return Err(format!("connection refused by the peer: {reason}").into());
    }
    if h.kind != FrameKind::Op(OpCode::Hello) || h.len != HELLO_LEN as u64 {
        return Err(format!("expected a hello frame, got {} of {} bytes", h.kind.name(), h.len).into());
    }
    if h.group_id != group_id {
        return Err(format!("hello for group id {:#x}, this group is {group_id:#x}", h.group_id).into());
    }
    let raw = read_small(sock, Vec::new(), HELLO_LEN, deadline).map_err(HelloError::Io)?;
    let f = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&raw[8 * i..8 * i + 8]);
        u64::from_le_bytes(a)
    };
    Ok([f(0), f(1), f(2), h.seq])
}

/// Inputs of a mesh build.
pub(crate) struct MeshSpec<'a> {
    pub store: &'a dyn Store,
    pub rank: usize,
    pub size: usize,
    pub name: &'a str,
    pub group_id: u64,
    pub listen_host: &'a str,
    pub route_to: Option<&'a str>,
    /// See [`super::addr`]: how long a silent link lives.
    pub link_timeout: Option<Duration>,
    pub deadline: Instant,
}

impl MeshSpec<'_> {
    fn ctx(&self, op: &str) -> Context {
        Context::new(op, self.name, self.rank)
    }

    fn timeout_err(&self, start: Instant, peer: Option<usize>, detail: String) -> Error {
        let mut ctx = self.ctx("connect");
        ctx.peer = peer;
        Error::timeout(ctx, start.elapsed(), detail)
    }
}

/// Connects every pair of ranks; `peers[r]` is the socket to rank `r`
/// (`None` for this rank), nonblocking and tuned.
pub(crate) fn build(spec: &MeshSpec<'_>) -> Result<Vec<Option<Socket>>> {
    let start = Instant::now();
    let mut peers: Vec<Option<Socket>> = (0..spec.size).map(|_| None).collect();
    if spec.size == 1 {
        return Ok(peers);
    }
    let (listener, addr) =
        listen(spec.listen_host, spec.route_to, spec.size).map_err(|e| Error::io(spec.ctx("listen"), e))?;
    tracing::debug!(group = spec.name, rank = spec.rank, %addr, "listening");
    spec.store.set(&addr_key(spec.rank), addr.to_string().as_bytes())?;

    for (peer, slot) in peers.iter_mut().enumerate().take(spec.rank) {
        *slot = Some(dial(spec, peer, start)?);
    }
    let mut missing = spec.size - 1 - spec.rank;
    while missing > 0 {
        let now = Instant::now();
        if now >= spec.deadline {
            let absent: Vec<usize> = (spec.rank + 1..spec.size).filter(|r| peers[*r].is_none()).collect();
            return Err(spec.timeout_err(start, absent.first().copied(), format!("connections from ranks {absent:?}")));
        }
        let ms = spec.deadline.saturating_duration_since(now).as_millis().clamp(1, i32::MAX as u128) as u32;
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(Error::io(spec.ctx("accept"), e.into())),
        }
        let (sock, from) = match listener.accept() {
            Ok(x) => x,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(Error::io(spec.ctx("accept"), e)),
        };
        let from = from.as_socket().map(|a| a.to_string()).unwrap_or_else(|| "?".into());
        match accept_one(spec, sock, &peers) {
            Ok((r, sock)) => {
                peers[r] = Some(sock);
                missing -= 1;
            }
            Err(why) => {
                tracing::warn!(group = spec.name, rank = spec.rank, %from, "rejected connection: {why}");
            }
        }
    }
    Ok(peers)
}

fn accept_one(
    spec: &MeshSpec<'_>,
    sock: Socket,
    peers: &[Option<Socket>],
) -> std::result::Result<(usize, Socket), String> {
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    tune(&sock).map_err(|e| e.to_string())?;
    guard_link(&sock, spec.link_timeout).map_err(|e| e.to_string())?;
    let deadline = spec.deadline.min(Instant::now() + HELLO_GRACE);
    let res = check_hello(spec, &sock, peers, deadline);
    if let Err(why) = &res {
        // Tell a rankweave dialer why (an ABORT frame); others just see the close.
        let info = AbortInfo {
            kind: AbortKind::Other,
            culprit: spec.rank as u64,
            reporter: spec.rank as u64,
            reason: format!("rank {} of group {} rejected the handshake: {why}", spec.rank, spec.name),
        };
        let payload = info.encode();
        let hdr =
            Header { kind: FrameKind::Abort, group_id: spec.group_id, seq: 0, len: payload.len() as u64, desc: 0 };
        let mut frame = hdr.encode().to_vec();
        frame.extend_from_slice(&payload);
        let _ = write_small(&sock, &frame, Instant::now() + Duration::from_millis(100));
    }
    res.map(|from| (from, sock))
}

fn check_hello(
    spec: &MeshSpec<'_>,
    sock: &Socket,
    peers: &[Option<Socket>],
    deadline: Instant,
) -> std::result::Result<usize, String> {
    let [from, to, size, _] = read_hello(sock, spec.group_id, deadline).map_err(|e| e.to_string())?;
    let from = from as usize;
    if to as usize != spec.rank || size as usize != spec.size {
        return Err(format!(
            "hello from rank {from} meant for rank {to} of {size}, this is rank {} of {}",
            spec.rank, spec.size
        ));
    }
    if from <= spec.rank || from >= spec.size {
        return Err(format!("hello from rank {from}, expected a rank in {}..{}", spec.rank + 1, spec.size));
    }
    if peers[from].is_some() {
        return Err(format!("duplicate connection from rank {from}"));
    }
    let ack = hello(spec.group_id, 1, spec.rank, from, spec.size);
    write_small(sock, &ack, deadline).map_err(|e| format!("answering hello: {e}"))?;
    Ok(from)
}

/// Connects to lower rank `peer`, retrying refused connects until the deadline.
fn dial(spec: &MeshSpec<'_>, peer: usize, start: Instant) -> Result<Socket> {
    let left = spec.deadline.saturating_duration_since(Instant::now());
    let raw = spec.store.get_timeout(&addr_key(peer), left).map_err(|e| match e {
        Error::Timeout { .. } => spec.timeout_err(start, Some(peer), format!("rank {peer} to publish its address")),
        e => e,
    })?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let addr: SocketAddr = match text.parse() {
        Ok(a) => a,
        Err(_) => {
            let (host, port) = text.rsplit_once(':').unwrap_or((&text, "0"));
            resolve(host, port.parse().unwrap_or(0)).map_err(|e| {
                Error::protocol(spec.ctx("connect").with_peer(peer), format!("bad address {text:?} published: {e}"))
            })?
        }
    };
    let sock = retry_connect(Some(spec.deadline), |left| {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        tune(&sock)?;
        guard_link(&sock, spec.link_timeout)?;
        let wait = left.unwrap_or(HELLO_GRACE).clamp(Duration::from_millis(1), HELLO_GRACE);
        sock.connect_timeout(&SockAddr::from(addr), wait)?;
        sock.set_nonblocking(true)?;
        Ok(sock)
    })
    .map_err(|g| {
        spec.timeout_err(
            start,
            Some(peer),
            format!(
                "a connection to rank {peer} at {addr}, the address it advertised{}; if that address is not \
                 reachable from this host, set {IFNAME_ENV} on every rank to the interface the nodes share",
                g.why()
            ),
        )
    })?;
    write_small(&sock, &hello(spec.group_id, 0, spec.rank, peer, spec.size), spec.deadline)
        .map_err(|e| Error::io(spec.ctx("connect").with_peer(peer), e))?;
    match read_hello(&sock, spec.group_id, spec.deadline) {
        Ok([from, to, size, _]) if from as usize == peer && to as usize == spec.rank && size as usize == spec.size => {
            Ok(sock)
        }
        Ok([from, to, size, _]) => Err(Error::protocol(
            spec.ctx("connect").with_peer(peer),
            format!("rank {peer} at {addr} answered as rank {from} (to {to}, size {size})"),
        )),
        Err(HelloError::Io(e)) if e.kind() == io::ErrorKind::TimedOut => {
            Err(spec.timeout_err(start, Some(peer), format!("rank {peer} to answer the handshake")))
        }
        Err(HelloError::Io(e)) => Err(Error::PeerLost {
            ctx: spec.ctx("connect").with_peer(peer),
            detail: format!("rank {peer} lost: {e} during the handshake (at {addr})"),
        }),
        Err(HelloError::Bad(why)) => Err(Error::protocol(spec.ctx("connect").with_peer(peer), why)),
    }
}

#[cfg(test)]
mod tests {
    use super::{congestion_from, tune};
    use socket2::Socket;

    #[test]
    fn congestion_control_is_cubic_unless_named_or_left_to_the_system() {
        assert_eq!(congestion_from(None).as_deref(), Some("cubic"));
        assert_eq!(congestion_from(Some(" ")).as_deref(), Some("cubic"));
        assert_eq!(congestion_from(Some("system")), None);
        assert_eq!(congestion_from(Some(" reno ")).as_deref(), Some("reno"));
    }

    #[test]
    fn a_tuned_connection_runs_cubic_without_nagle() {
        let avail = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control").unwrap();
        assert!(avail.split_whitespace().any(|c| c == "cubic"), "this kernel has no cubic: {avail}");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = Socket::from(std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap());
        tune(&sock).unwrap();
        let ca = sock.tcp_congestion().unwrap();
        assert_eq!(String::from_utf8_lossy(&ca).trim_end_matches('\0'), "cubic");
        assert!(sock.nodelay().unwrap());
    }
}
