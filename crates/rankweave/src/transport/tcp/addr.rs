//! Where a rank listens for its peers, and how long a silent link may live.
//!
//! # The listen address
//! [`listen_host`] turns the options into the one address a mesh binds and
//! advertises, in this order:
//! 1. an explicit `listen_host` is used as given (a wildcard, `0.0.0.0` or
//!    `::`, advertises the address of the interface routing to the job's
//!    master, see [`super::advertised_ip`]);
//! 2. an interface named by [`IFNAME_ENV`] (as `GLOO_SOCKET_IFNAME` and
//!    `NCCL_SOCKET_IFNAME` do): that interface's address, IPv4 first unless
//!    the master is reached over IPv6;
//! 3. a master address (`MASTER_ADDR`) that is not loopback: the local
//!    address of the interface the kernel routes to it through;
//! 4. otherwise loopback (`127.0.0.1`, or `::1` for an IPv6 loopback master):
//!    a job on one machine never listens on the network.
//!
//! Binding one concrete address (not a wildcard) keeps the mesh off the
//! interfaces the job does not use, and what is bound is what peers dial.
//!
//! # Dead links
//! A peer that vanishes without a reset (link down, power loss, a partition)
//! sends no FIN: a socket waiting for it would wait for the operation's
//! whole deadline. Every connection of a mesh (and of the store clients)
//! bounds that with the kernel's own machinery:
//! - `TCP_USER_TIMEOUT`: data sent but not acknowledged for the link
//!   timeout fails the socket with `ETIMEDOUT` (a slow but live peer whose
//!   window is full keeps answering zero-window probes and is not cut);
//! - keepalive: an idle connection (nothing in flight, e.g. a rank waiting
//!   to receive) is probed after a quarter of the link timeout, every
//!   eighth, and fails when the probes go unanswered, within the link
//!   timeout in all.
//!
//! This is chosen over an application heartbeat because it costs nothing on
//! the data path (no frames interleaved with the collectives' streams, no
//! thread per group), works while a rank is blocked anywhere, including in
//! a long computation between operations, and the kernel tells the live side
//! which connection died, so the error names the unreachable rank. Inside one
//! node the shared-memory backends check their peers' processes instead.

use crate::error::{Error, Result};
use socket2::{Socket, TcpKeepalive};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

/// Environment variable naming the network interface groups listen on
/// (`eth0`, `ib0`, ...), read by [`crate::GroupOptions::from_env`].
pub const IFNAME_ENV: &str = "RANKWEAVE_SOCKET_IFNAME";

/// Environment variable with the link timeout in seconds, read by
/// [`crate::GroupOptions::from_env`].
pub const LINK_TIMEOUT_ENV: &str = "RANKWEAVE_LINK_TIMEOUT";

/// How long a link may stay silent before its peer counts as unreachable,
/// by default.
pub const DEFAULT_LINK_TIMEOUT: Duration = Duration::from_secs(8);

/// Resolves `host` (a name, an IPv4 address or an IPv6 one, bracketed or
/// not) with `port`; IPv4 results first.
pub(crate) fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    let host = host.trim().trim_start_matches('[').trim_end_matches(']');
    let mut addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs
        .into_iter()
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host} resolves to no address")))
}

/// The local address the kernel would send from to reach `target` (a UDP
/// socket's `connect` sends nothing; it only picks the route).
pub(crate) fn route_source(target: IpAddr) -> io::Result<IpAddr> {
    let local: SocketAddr =
        if target.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let udp = UdpSocket::bind(local)?;
    udp.connect((target, 9))?;
    let ip = udp.local_addr()?.ip();
    if ip.is_unspecified() {
        return Err(io::Error::new(io::ErrorKind::AddrNotAvailable, format!("no route to {target}")));
    }
    Ok(ip)
}

/// The addresses of interface `name` (IPv6 link-local ones left out: they
/// are not reachable without a scope), and the names of every interface, for
/// the error when `name` has none.
fn interface_addrs(name: &str) -> io::Result<(Vec<IpAddr>, Vec<String>)> {
    let mut found = Vec::new();
    let mut names = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        if !names.contains(&ifa.interface_name) {
            names.push(ifa.interface_name.clone());
        }
        if ifa.interface_name != name {
            continue;
        }
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            found.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let ip = v6.ip();
            if ip.segments()[0] & 0xffc0 != 0xfe80 {
                found.push(IpAddr::V6(ip));
            }
        }
    }
    Ok((found, names))
}

/// The host a mesh binds (see the module docs): `listen_host` if given,
/// else the address of `interface`, else the local address routing to
/// `route_to`, else loopback. An interface without an address, or a master
/// that does not resolve or cannot be routed to, is an
/// [`Error::InvalidArgument`] naming the setting to change.
pub fn listen_host(listen_host: Option<&str>, interface: Option<&str>, route_to: Option<&str>) -> Result<String> {
    if let Some(h) = listen_host.map(str::trim).filter(|h| !h.is_empty()) {
        return Ok(h.to_string());
    }
    let master = match route_to.map(str::trim).filter(|h| !h.is_empty()) {
        Some(m) => Some((
            m,
            resolve(m, 0).map_err(|e| {
                Error::invalid(format!(
                    "the master address MASTER_ADDR={m} does not resolve ({e}); set it to an address of node 0"
                ))
            })?,
        )),
        None => None,
    };
    let want_v6 = master.is_some_and(|(_, a)| a.is_ipv6());
    if let Some(name) = interface.map(str::trim).filter(|n| !n.is_empty()) {
        let (addrs, names) = interface_addrs(name)
            .map_err(|e| Error::invalid(format!("{IFNAME_ENV}={name}: cannot list the interfaces: {e}")))?;
        let pick = addrs.iter().find(|a| a.is_ipv6() == want_v6).or(addrs.first());
        return match pick {
            Some(ip) => Ok(ip.to_string()),
            None => Err(Error::invalid(format!(
                "{IFNAME_ENV}={name}: no interface of that name with an address on this host (interfaces: {})",
                names.join(", ")
            ))),
        };
    }
    match master {
        Some((_, a)) if a.ip().is_loopback() => {
            Ok(if a.is_ipv6() { Ipv6Addr::LOCALHOST.to_string() } else { Ipv4Addr::LOCALHOST.to_string() })
        }
        Some((m, a)) => route_source(a.ip()).map(|ip| ip.to_string()).map_err(|e| {
            Error::invalid(format!(
                "no interface routes to the master address MASTER_ADDR={m} ({e}); set {IFNAME_ENV} to the \
                 interface the nodes share"
            ))
        }),
        None => Ok(Ipv4Addr::LOCALHOST.to_string()),
    }
}

/// Bounds how long `sock` survives a silent peer (see the module docs);
/// `None` leaves the kernel's defaults (hours).
pub(crate) fn guard_link(sock: &Socket, link_timeout: Option<Duration>) -> io::Result<()> {
    let Some(t) = link_timeout else { return Ok(()) };
    let t = t.max(Duration::from_millis(800));
    // Keepalive times are whole seconds: idle for a quarter, then probes
    // every eighth, as many as fit in the rest of the budget.
    let idle = (t / 4).max(Duration::from_secs(1));
    let every = (t / 8).max(Duration::from_secs(1));
    let probes = ((t.saturating_sub(idle)).as_secs() / every.as_secs().max(1)).clamp(1, 127) as u32;
    let ka = TcpKeepalive::new().with_time(idle).with_interval(every).with_retries(probes);
    sock.set_tcp_keepalive(&ka)?;
    sock.set_tcp_user_timeout(Some(t))?;
    Ok(())
}

/// Whether `e` is the kernel's verdict that a link died without a reset
/// (keepalive or the user timeout gave up, or the route vanished), as
/// opposed to a deadline of ours, which has no OS error code.
pub(crate) fn is_dead_link(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::ETIMEDOUT | Errno::EHOSTUNREACH | Errno::ENETUNREACH | Errno::ENETDOWN | Errno::EHOSTDOWN)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_then_interface_then_route_then_loopback() {
        assert_eq!(listen_host(Some(" 0.0.0.0 "), Some("nope0"), Some("10.9.9.9")).unwrap(), "0.0.0.0");
        assert_eq!(listen_host(None, Some("lo"), None).unwrap(), "127.0.0.1");
        assert_eq!(listen_host(None, None, Some("127.0.0.1")).unwrap(), "127.0.0.1");
        assert_eq!(listen_host(None, None, Some("localhost")).unwrap(), "127.0.0.1");
        assert_eq!(listen_host(None, None, None).unwrap(), "127.0.0.1");
        assert_eq!(listen_host(Some(""), None, Some("[::1]")).unwrap(), "::1");
        let e = listen_host(None, Some("nope0"), None).unwrap_err().to_string();
        assert!(e.contains(IFNAME_ENV) && e.contains("nope0") && e.contains("lo"), "{e}");
        let e = listen_host(None, None, Some("no-such-host.invalid")).unwrap_err().to_string();
        assert!(e.contains("MASTER_ADDR=no-such-host.invalid"), "{e}");
    }

    #[test]
    fn dead_link_errors_are_the_kernels_not_our_deadlines() {
        assert!(is_dead_link(&io::Error::from_raw_os_error(nix::errno::Errno::ETIMEDOUT as i32)));
        assert!(!is_dead_link(&io::Error::new(io::ErrorKind::TimedOut, "timed out")));
        assert!(!is_dead_link(&io::Error::from(io::ErrorKind::ConnectionReset)));
    }

    #[test]
    fn link_guard_fits_the_timeout() {
        let s = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        guard_link(&s, Some(Duration::from_secs(8))).unwrap();
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(8)));
        assert_eq!(s.keepalive_time().unwrap(), Duration::from_secs(2));
        assert_eq!(s.keepalive_interval().unwrap(), Duration::from_secs(1));
        assert_eq!(s.keepalive_retries().unwrap(), 6);
        assert!(s.keepalive().unwrap());
    }
}
