//! Node 0's launcher hosts the job's rendezvous store.
//!
//! The store listens where the other nodes can reach it: on the master
//! address itself when it is an address of this machine (a loopback address
//! keeps the job on this machine), else on the wildcard of its family (the
//! name or address the other nodes use may be translated or resolve to
//! another interface here, as torch's store assumes too). Workers are told
//! through [`rankweave::store::init::STORE_HOSTED_ENV`] that rank 0 need not
//! host it. `RANKWEAVE_TOKEN`, when set, is required of every connection.

use rankweave::{Context, Error, Result, TcpStoreServer};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs};

/// The master address without the brackets of an IPv6 literal.
pub fn bare_host(host: &str) -> &str {
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// `host:port`, bracketing IPv6 literals.
pub fn host_port(host: &str, port: u16) -> String {
    let host = bare_host(host);
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn wildcard(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// The addresses to try binding, best first, for `master_addr`.
pub fn bind_candidates(master_addr: &str) -> Result<Vec<IpAddr>> {
    let host = bare_host(master_addr.trim());
    if let Ok(ip) = host.parse::<IpAddr>() {
        // Exactly the master address when it is one of ours, else the
        // wildcard (the address may be translated on the way here).
        return Ok(if ip.is_loopback() || ip.is_unspecified() { vec![ip] } else { vec![ip, wildcard(ip)] });
    }
    let addrs: Vec<IpAddr> = (host, 0u16)
        .to_socket_addrs()
        .map_err(|e| Error::invalid(format!("--master-addr {master_addr}: cannot resolve it on this node: {e}")))?
        .map(|a| a.ip())
        .collect();
    // A name: the other nodes may resolve it to another address than this
    // node does (e.g. 127.0.1.1 here), so listen on every interface.
    let mut out = Vec::new();
    if addrs.iter().any(IpAddr::is_ipv4) {
        out.push(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }
    if addrs.iter().any(IpAddr::is_ipv6) {
        out.push(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    }
    if out.is_empty() {
        return Err(Error::invalid(format!("--master-addr {master_addr} resolves to no address on this node")));
    }
    Ok(out)
}

/// The address this node's own clients use to reach a server bound to `ip`.
pub fn local_connect_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) if a.is_unspecified() => Ipv4Addr::LOCALHOST.to_string(),
        IpAddr::V6(a) if a.is_unspecified() => Ipv6Addr::LOCALHOST.to_string(),
        ip => ip.to_string(),
    }
}

/// Binds the store for `master_addr:port`; returns the server and the host
/// this node's launcher connects to.
pub fn host_store(master_addr: &str, port: u16) -> Result<(TcpStoreServer, String)> {
    let mut first_error = None;
    for ip in bind_candidates(master_addr)? {
        let addr = host_port(&ip.to_string(), port);
        match TcpStoreServer::bind(&addr) {
            Ok(server) => {
                tracing::info!(addr = %server.local_addr(), "launcher hosts the rendezvous store");
                return Ok((server, local_connect_host(ip)));
            }
            Err(e) => {
                tracing::debug!(addr, error = %e, "cannot bind the store here");
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| {
        Error::io(
            Context::op("launch: host the store"),
            std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, format!("no address to bind for {master_addr}")),
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_prefer_the_master_address() {
        let v = |s: &str| bind_candidates(s).unwrap().iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(v("127.0.0.1"), ["127.0.0.1"]);
        assert_eq!(v("::1"), ["::1"]);
        assert_eq!(v("[::1]"), ["::1"]);
        assert_eq!(v("10.9.8.7"), ["10.9.8.7", "0.0.0.0"]);
        assert_eq!(v("[fd00::2]"), ["fd00::2", "::"]);
        assert!(v("localhost").iter().all(|a| a == "0.0.0.0" || a == "::"));
        assert!(bind_candidates("no-such-host.invalid").is_err());
    }

    #[test]
    fn local_clients_reach_a_wildcard_through_loopback() {
        assert_eq!(local_connect_host("0.0.0.0".parse().unwrap()), "127.0.0.1");
        assert_eq!(local_connect_host("::".parse().unwrap()), "::1");
        assert_eq!(local_connect_host("10.0.0.2".parse().unwrap()), "10.0.0.2");
        assert_eq!(host_port("::1", 5), "[::1]:5");
        assert_eq!(host_port("[::1]", 5), "[::1]:5");
    }

    #[test]
    fn loopback_is_bound_as_given() {
        let (server, connect) = host_store("127.0.0.1", 0).unwrap();
        assert_eq!(server.local_addr().ip().to_string(), "127.0.0.1");
        assert_eq!(connect, "127.0.0.1");
    }
}
