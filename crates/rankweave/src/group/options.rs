//! Group options and the environment they are read from, once.
//!
//! Environment variables are read at this edge only: [`GroupOptions::default`]
//! applies the process environment (read once per process, on first use) to
//! the built-in defaults, [`GroupOptions::from_env_with`] applies any
//! environment given as a lookup function, and [`GroupOptions::builtin`]
//! ignores the environment. [`TRANSPORT_ENV`] is the one override that
//! beats explicit options: every group of the process resolves its
//! transport through [`TransportKind::resolve_from_env`] (the variable is
//! read once). Nothing below the group reads a variable.

use crate::error::{Error, Result};
use crate::transport::tcp::addr::{DEFAULT_LINK_TIMEOUT, IFNAME_ENV, LINK_TIMEOUT_ENV};
use crate::transport::tcp::TcpOptions;
use std::sync::OnceLock;
use std::time::Duration;

/// Which transport a group uses for its collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// Shared memory when all members share a node, TCP otherwise.
    #[default]
    Auto,
    /// Always TCP.
    Tcp,
    /// Shared memory (an error when members span nodes).
    Shm,
}

/// Environment variable that overrides [`GroupOptions::transport`] for every
/// group a process creates: `tcp`, `shm` or `auto` (case-insensitive; empty
/// means unset).
pub const TRANSPORT_ENV: &str = "RANKWEAVE_TRANSPORT";

impl TransportKind {
    /// Every kind, in the order `auto`, `tcp`, `shm`.
    pub const ALL: [TransportKind; 3] = [TransportKind::Auto, TransportKind::Tcp, TransportKind::Shm];

    /// Lower-case name: `auto`, `tcp`, `shm`.
    pub const fn name(self) -> &'static str {
        match self {
            TransportKind::Auto => "auto",
            TransportKind::Tcp => "tcp",
            TransportKind::Shm => "shm",
        }
    }

    /// The kind a group is built with: `env_override` (the value of
    /// [`TRANSPORT_ENV`], if any) replaces `requested` unless it is empty.
    /// An unknown override is an error, not silently ignored.
    pub fn resolve(requested: TransportKind, env_override: Option<&str>) -> Result<TransportKind> {
        match env_override.map(str::trim) {
            None | Some("") => Ok(requested),
            Some(v) => v.parse().map_err(|e: Error| Error::invalid(format!("{TRANSPORT_ENV}: {e}"))),
        }
    }

    /// [`TransportKind::resolve`] with the override of this process's
    /// environment (read once, on first use): what every group built with
    /// `requested` uses.
    pub fn resolve_from_env(requested: TransportKind) -> Result<TransportKind> {
        static OVERRIDE: OnceLock<Option<String>> = OnceLock::new();
        TransportKind::resolve(requested, OVERRIDE.get_or_init(|| std::env::var(TRANSPORT_ENV).ok()).as_deref())
    }

    /// Parses a comma-separated list (`tcp,shm`); empty items are skipped.
    pub fn parse_list(s: &str) -> Result<Vec<TransportKind>> {
        s.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::parse).collect()
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TransportKind {
    type Err = Error;
    /// Parses `tcp`, `shm` or `auto` (case-insensitive).
    fn from_str(s: &str) -> Result<TransportKind> {
        TransportKind::ALL
            .into_iter()
            .find(|k| s.trim().eq_ignore_ascii_case(k.name()))
            .ok_or_else(|| Error::invalid(format!("unknown transport {s:?}: expected `tcp`, `shm` or `auto`")))
    }
}

/// Options for creating groups; subgroups inherit them.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// Deadline of each operation (`RANKWEAVE_TIMEOUT`, default 300 s).
    pub timeout: Duration,
    /// Which transport collectives use ([`TRANSPORT_ENV`] overrides it).
    pub transport: TransportKind,
    /// Address this rank listens on for peers (`127.0.0.1`, `0.0.0.0`, `::`,
    /// a NIC's address). `None` (the default): the address of `interface`
    /// when set, else of the interface that routes to `route_to`, else
    /// loopback; see [`crate::transport::tcp::addr`].
    pub listen_host: Option<String>,
    /// The network interface to listen on when `listen_host` is `None`
    /// (`RANKWEAVE_SOCKET_IFNAME`, as `GLOO_SOCKET_IFNAME`).
    pub interface: Option<String>,
    /// The host peers reach the job through (`MASTER_ADDR`): ranks listen
    /// on the interface that routes there (loopback when it is loopback).
    pub route_to: Option<String>,
    /// How long a connection to a peer may stay silent (the peer gone
    /// without a reset: link down, power loss) before the peer counts as
    /// unreachable (`RANKWEAVE_LINK_TIMEOUT`, default 8 s); `None` leaves
    /// the kernel's defaults (hours).
    pub link_timeout: Option<Duration>,
    /// Ranks of the job on this node (`LOCAL_WORLD_SIZE`); `None`: the
    /// group's size. Decides whether waiting spins briefly before sleeping.
    pub local_ranks: Option<usize>,
    /// This rank's node identity, overriding the detected one (host name and
    /// kernel boot id). Ranks with equal identities use shared memory among
    /// themselves; tests use it to simulate nodes.
    pub node: Option<String>,
}

impl GroupOptions {
    /// The built-in defaults, ignoring the environment: 300 s, `Auto`,
    /// loopback (no master address), an 8 s link timeout.
    pub fn builtin() -> GroupOptions {
        GroupOptions {
            timeout: crate::store::DEFAULT_TIMEOUT,
            transport: TransportKind::Auto,
            listen_host: None,
            interface: None,
            route_to: None,
            link_timeout: Some(DEFAULT_LINK_TIMEOUT),
            local_ranks: None,
            node: None,
        }
    }

    /// The built-in defaults with the environment `var` applied:
    /// `RANKWEAVE_TIMEOUT` (seconds), [`TRANSPORT_ENV`], `MASTER_ADDR`,
    /// `LOCAL_WORLD_SIZE`, `RANKWEAVE_SOCKET_IFNAME` and
    /// `RANKWEAVE_LINK_TIMEOUT` (seconds). An invalid value is an error naming the variable.
    pub fn from_env_with(var: &dyn Fn(&str) -> Option<String>) -> Result<GroupOptions> {
        let mut o = GroupOptions::builtin();
        if let Some(v) = var("RANKWEAVE_TIMEOUT").filter(|v| !v.trim().is_empty()) {
            o.timeout = crate::store::parse_timeout(&v).ok_or_else(|| {
                Error::invalid(format!("RANKWEAVE_TIMEOUT={v:?}: expected a positive number of seconds"))
            })?;
        }
        o.transport = TransportKind::resolve(o.transport, var(TRANSPORT_ENV).as_deref())?;
        o.route_to = var("MASTER_ADDR").map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        o.interface = var(IFNAME_ENV).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        if let Some(v) = var(LINK_TIMEOUT_ENV).filter(|v| !v.trim().is_empty()) {
            o.link_timeout = Some(crate::store::parse_timeout(&v).ok_or_else(|| {
                Error::invalid(format!("{LINK_TIMEOUT_ENV}={v:?}: expected a positive number of seconds"))
            })?);
        }
        if let Some(v) = var("LOCAL_WORLD_SIZE").filter(|v| !v.trim().is_empty()) {
            o.local_ranks = Some(
                v.trim()
                    .parse()
                    .map_err(|_| Error::invalid(format!("LOCAL_WORLD_SIZE={v:?}: expected a number of ranks")))?,
            );
        }
        Ok(o)
    }

    /// [`GroupOptions::from_env_with`] over the process environment.
    pub fn from_env() -> Result<GroupOptions> {
        GroupOptions::from_env_with(&|k| std::env::var(k).ok())
    }

    /// The TCP mesh's part of these options.
    pub(crate) fn tcp(&self) -> TcpOptions {
        TcpOptions {
            listen_host: self.listen_host.clone(),
            interface: self.interface.clone(),
            route_to: self.route_to.clone(),
            local_ranks: self.local_ranks,
            link_timeout: self.link_timeout,
        }
    }
}

impl Default for GroupOptions {
    /// The process environment applied to the built-in defaults (see the
    /// module docs), read once per process. An invalid variable is logged
    /// once and ignored here; [`GroupOptions::from_env`] reports it.
    fn default() -> Self {
        static FROM_ENV: OnceLock<GroupOptions> = OnceLock::new();
        FROM_ENV
            .get_or_init(|| {
                GroupOptions::from_env().unwrap_or_else(|e| {
                    tracing::warn!("ignoring the environment for group options: {e}");
                    GroupOptions::builtin()
                })
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn environment_fills_the_options_and_bad_values_name_the_variable() {
        let o = GroupOptions::from_env_with(&env(&[
            ("RANKWEAVE_TIMEOUT", "2.5"),
            ("RANKWEAVE_TRANSPORT", "TCP"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("RANKWEAVE_SOCKET_IFNAME", "eth1"),
            ("RANKWEAVE_LINK_TIMEOUT", "3"),
        ]))
        .unwrap();
        assert_eq!(o.timeout, Duration::from_millis(2500));
        assert_eq!(o.transport, TransportKind::Tcp);
        assert_eq!(o.route_to.as_deref(), Some("10.0.0.1"));
        assert_eq!(o.local_ranks, Some(4));
        assert_eq!((o.interface.as_deref(), o.link_timeout), (Some("eth1"), Some(Duration::from_secs(3))));
        let none = GroupOptions::from_env_with(&env(&[])).unwrap();
        assert_eq!(
            (none.timeout, none.transport, none.route_to),
            (Duration::from_secs(300), TransportKind::Auto, None)
        );
        for (k, v) in [
            ("RANKWEAVE_TIMEOUT", "soon"),
            ("RANKWEAVE_TRANSPORT", "ib"),
            ("LOCAL_WORLD_SIZE", "x"),
            ("RANKWEAVE_LINK_TIMEOUT", "0"),
        ] {
            let e = GroupOptions::from_env_with(&env(&[(k, v)])).unwrap_err();
            assert!(e.to_string().contains(k), "{e}");
        }
    }

    #[test]
    fn transport_names_round_trip() {
        for k in TransportKind::ALL {
            assert_eq!(k.name().parse::<TransportKind>().unwrap(), k);
        }
        assert_eq!(TransportKind::parse_list("tcp, shm,").unwrap(), vec![TransportKind::Tcp, TransportKind::Shm]);
        assert!(TransportKind::parse_list("tcp,ib").is_err());
    }
}
