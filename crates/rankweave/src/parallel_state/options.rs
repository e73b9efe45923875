//! [`InitOptions`]: the Rust-shaped way to start the distributed
//! environment, and the [`Backend`] names.
//!
//! Environment variables are read in one place, [`InitOptions::from_env`]
//! (or [`InitOptions::from_env_map`] with an explicit map, for tests and
//! embedders), never deeper down: `WORLD_SIZE`, `RANK`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`, `RANKWEAVE_TIMEOUT` (seconds) and
//! `RANKWEAVE_TRANSPORT` (`tcp`, `shm`, `auto`). Options set explicitly win
//! over the environment ([`InitOptions::or`]).
//!
//! ```
//! use rankweave::parallel_state::{Backend, InitOptions};
//! use std::collections::HashMap;
//! use std::time::Duration;
//!
//! let env = HashMap::from([("RANK".to_string(), "3".to_string()), ("WORLD_SIZE".into(), "4".into())]);
//! let opts = InitOptions::new().rank(1).timeout(Duration::from_secs(5)).with_env_map(&env)?;
//! assert_eq!((opts.rank, opts.world_size), (Some(1), Some(4))); // explicit rank wins
//! assert_eq!("gloo".parse::<Backend>()?, Backend::Cpu);
//! assert!("tpu".parse::<Backend>().unwrap_err().to_string().contains("gloo, cpu, mpi, nccl"));
//! # Ok::<(), rankweave::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::group::{GroupOptions, TransportKind, TRANSPORT_ENV};
use crate::store::DEFAULT_TIMEOUT;
use crate::transport::tcp::addr::{IFNAME_ENV, LINK_TIMEOUT_ENV};
use std::collections::HashMap;
use std::time::Duration;

/// The process-group backend of a distributed environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// CPU process groups (torch's `gloo`): shared memory or TCP. Parsed from
    /// `gloo` or `cpu`.
    #[default]
    Cpu,
    /// MPI (parsed; not built in yet, refused at init).
    Mpi,
    /// NCCL on CUDA devices (parsed; not built in yet, refused at init).
    Nccl,
}

impl Backend {
    /// Every backend, in the order the names are listed.
    pub const ALL: [Backend; 3] = [Backend::Cpu, Backend::Mpi, Backend::Nccl];
    /// The names [`str::parse`] accepts.
    pub const NAMES: [&'static str; 4] = ["gloo", "cpu", "mpi", "nccl"];

    /// The name torch uses for it: `gloo`, `mpi`, `nccl`.
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "gloo",
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
        }
    }

    /// `Ok` for the backends this build runs ([`Backend::Cpu`], and
    /// [`Backend::Nccl`] with the `nccl` feature: whether the CUDA driver
    /// and NCCL are there is checked when its groups are built);
    /// [`Error::Unsupported`] for the others.
    pub fn check_supported(self) -> Result<()> {
        match self {
            Backend::Cpu => Ok(()),
            #[cfg(feature = "nccl")]
            Backend::Nccl => Ok(()),
            other => Err(Error::Unsupported(format!(
                "backend `{other}` is not available in this build; it runs CPU process groups only (`gloo` or `cpu`)"
            ))),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Backend {
    type Err = Error;
    /// `gloo` or `cpu`, `mpi`, `nccl` (case-insensitive); anything else is
    /// an [`Error::InvalidArgument`] listing the valid names.
    fn from_str(s: &str) -> Result<Backend> {
        match s.trim().to_ascii_lowercase().as_str() {
            "gloo" | "cpu" => Ok(Backend::Cpu),
            "mpi" => Ok(Backend::Mpi),
            "nccl" => Ok(Backend::Nccl),
            _ => Err(Error::invalid(format!("unknown backend `{s}`; expected one of {}", Backend::NAMES.join(", ")))),
        }
    }
}

/// Environment variable of the default operation timeout, in seconds.
pub const TIMEOUT_ENV: &str = "RANKWEAVE_TIMEOUT";

/// How to start the distributed environment; see the module docs.
///
/// `None` fields are filled from the environment by
/// [`InitOptions::with_env`] and otherwise take their defaults: init method
/// `env://`, local rank from `LOCAL_RANK` or else the rank, timeout 300 s,
/// transport `auto`.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct InitOptions {
    /// Number of ranks (`WORLD_SIZE`).
    pub world_size: Option<usize>,
    /// This process's rank (`RANK`).
    pub rank: Option<usize>,
    /// Rank on this node (`LOCAL_RANK`).
    pub local_rank: Option<usize>,
    /// `env://` or `tcp://host:port`.
    pub init_method: Option<String>,
    /// Store host for `env://` (`MASTER_ADDR`).
    pub master_addr: Option<String>,
    /// Store port for `env://` (`MASTER_PORT`).
    pub master_port: Option<u16>,
    /// Deadline of each operation and of the rendezvous (`RANKWEAVE_TIMEOUT`).
    pub timeout: Option<Duration>,
    /// Transport of the collectives (`RANKWEAVE_TRANSPORT`).
    pub transport: Option<TransportKind>,
    /// Ranks of the job on this node (`LOCAL_WORLD_SIZE`).
    pub local_world_size: Option<usize>,
    /// The network interface groups listen on (`RANKWEAVE_SOCKET_IFNAME`);
    /// unset: the one that routes to the master address.
    pub interface: Option<String>,
    /// How long a silent link lives before its peer counts as unreachable
    /// (`RANKWEAVE_LINK_TIMEOUT`, default 8 s).
    pub link_timeout: Option<Duration>,
    /// The backend; [`Backend::Cpu`] by default.
    pub backend: Backend,
}

fn parse_var<T: std::str::FromStr>(env: &HashMap<String, String>, name: &str) -> Result<Option<T>> {
    match env.get(name).map(|v| v.trim()) {
        None | Some("") => Ok(None),
        Some(v) => v.parse::<T>().map(Some).map_err(|_| {
            Error::invalid(format!("environment variable {name}=`{v}` is not a valid {}", std::any::type_name::<T>()))
        }),
    }
}

impl InitOptions {
    /// Nothing set: every field from the environment or its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// The options the process environment sets (read once, here).
    pub fn from_env() -> Result<Self> {
        Self::from_env_map(&std::env::vars().collect())
    }

    /// The options `env` sets; malformed values are an
    /// [`Error::InvalidArgument`] naming the variable.
    pub fn from_env_map(env: &HashMap<String, String>) -> Result<Self> {
        let timeout = match parse_var::<f64>(env, TIMEOUT_ENV)? {
            None => None,
            Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
            Some(s) => {
                return Err(Error::invalid(format!("environment variable {TIMEOUT_ENV}=`{s}`: expected seconds > 0")))
            }
        };
        let transport = match env.get(TRANSPORT_ENV).map(|v| v.trim()) {
            None | Some("") => None,
            Some(v) => Some(TransportKind::resolve(TransportKind::Auto, Some(v))?),
        };
        Ok(InitOptions {
            world_size: parse_var(env, "WORLD_SIZE")?,
            rank: parse_var(env, "RANK")?,
            local_rank: parse_var(env, "LOCAL_RANK")?,
            init_method: None,
            master_addr: env.get("MASTER_ADDR").map(|s| s.trim().to_string()).filter(|s| !s.is_empty()),
            master_port: parse_var(env, "MASTER_PORT")?,
            timeout,
            transport,
            local_world_size: parse_var(env, "LOCAL_WORLD_SIZE")?,
            interface: env.get(IFNAME_ENV).map(|s| s.trim().to_string()).filter(|s| !s.is_empty()),
            link_timeout: match parse_var::<f64>(env, LINK_TIMEOUT_ENV)? {
                None => None,
                Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Some(Duration::from_secs_f64(s)),
                Some(s) => {
                    return Err(Error::invalid(format!(
                        "environment variable {LINK_TIMEOUT_ENV}=`{s}`: expected seconds > 0"
                    )))
                }
            },
            backend: Backend::default(),
        })
    }

    /// `self`, with every unset field taken from `fallback` (explicit
    /// options beat the environment: `explicit.or(from_env)`). The backend
    /// is `self`'s.
    pub fn or(self, fallback: InitOptions) -> InitOptions {
        InitOptions {
            world_size: self.world_size.or(fallback.world_size),
            rank: self.rank.or(fallback.rank),
            local_rank: self.local_rank.or(fallback.local_rank),
            init_method: self.init_method.or(fallback.init_method),
            master_addr: self.master_addr.or(fallback.master_addr),
            master_port: self.master_port.or(fallback.master_port),
            timeout: self.timeout.or(fallback.timeout),
            transport: self.transport.or(fallback.transport),
            local_world_size: self.local_world_size.or(fallback.local_world_size),
            interface: self.interface.or(fallback.interface),
            link_timeout: self.link_timeout.or(fallback.link_timeout),
            backend: self.backend,
        }
    }

    /// `self.or(InitOptions::from_env()?)`.
    pub fn with_env(self) -> Result<InitOptions> {
        Ok(self.or(InitOptions::from_env()?))
    }

    /// `self.or(InitOptions::from_env_map(env)?)`.
    pub fn with_env_map(self, env: &HashMap<String, String>) -> Result<InitOptions> {
        Ok(self.or(InitOptions::from_env_map(env)?))
    }

    /// Sets the world size.
    pub fn world_size(mut self, n: usize) -> Self {
        self.world_size = Some(n);
        self
    }
    /// Sets this process's rank.
    pub fn rank(mut self, r: usize) -> Self {
        self.rank = Some(r);
        self
    }
    /// Sets the local rank.
    pub fn local_rank(mut self, r: usize) -> Self {
        self.local_rank = Some(r);
        self
    }
    /// Sets the init method (`env://`, `tcp://host:port`).
    pub fn init_method(mut self, m: impl Into<String>) -> Self {
        self.init_method = Some(m.into());
        self
    }
    /// Sets the store address for `env://`.
    pub fn master(mut self, addr: impl Into<String>, port: u16) -> Self {
        self.master_addr = Some(addr.into());
        self.master_port = Some(port);
        self
    }
    /// Sets the operation timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }
    /// Sets the transport.
    pub fn transport(mut self, t: TransportKind) -> Self {
        self.transport = Some(t);
        self
    }
    /// Sets the backend.
    pub fn backend(mut self, b: Backend) -> Self {
        self.backend = b;
        self
    }

    /// The init method, `env://` when unset.
    pub fn init_method_or_default(&self) -> &str {
        self.init_method.as_deref().unwrap_or("env://")
    }

    /// The timeout, 300 s when unset.
    pub fn timeout_or_default(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }

    /// The group options these settle: timeout, transport, the host peers
    /// reach the job through (`MASTER_ADDR`) and the ranks on this node
    /// (defaults for what is unset; nothing is read from the environment
    /// here).
    pub fn group_options(&self) -> GroupOptions {
        GroupOptions {
            timeout: self.timeout_or_default(),
            transport: self.transport.unwrap_or_default(),
            route_to: self.master_addr.clone().or_else(|| self.init_method_host()),
            local_ranks: self.local_world_size,
            interface: self.interface.clone(),
            link_timeout: self.link_timeout.or(GroupOptions::builtin().link_timeout),
            ..GroupOptions::builtin()
        }
    }

    /// The host of a `tcp://host:port` init method.
    fn init_method_host(&self) -> Option<String> {
        let rest = self.init_method.as_deref()?.trim().strip_prefix("tcp://")?;
        let host = match rest.strip_prefix('[') {
            Some(v6) => v6.split_once(']')?.0,
            None => rest.rsplit_once(':').map_or(rest, |(h, _)| h),
        };
        Some(host.to_string()).filter(|h| !h.is_empty())
    }

    /// The variables `rendezvous` reads, answered from these options:
    /// `MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, and
    /// `RANKWEAVE_TOKEN` passed through from `env_token`.
    pub(crate) fn rendezvous_var(&self, name: &str, token: Option<&str>) -> Option<String> {
        match name {
            "MASTER_ADDR" => self.master_addr.clone(),
            "MASTER_PORT" => self.master_port.map(|p| p.to_string()),
            "RANK" => self.rank.map(|r| r.to_string()),
            "WORLD_SIZE" => self.world_size.map(|r| r.to_string()),
            "LOCAL_RANK" => self.local_rank.map(|r| r.to_string()),
            "RANKWEAVE_TOKEN" => token.map(str::to_string),
            LINK_TIMEOUT_ENV => self.link_timeout.map(|t| t.as_secs_f64().to_string()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn backend_names() {
        for (s, b) in [("gloo", Backend::Cpu), ("CPU", Backend::Cpu), (" mpi", Backend::Mpi), ("nccl", Backend::Nccl)] {
            assert_eq!(s.parse::<Backend>().unwrap(), b, "{s}");
        }
        let e = "hccl".parse::<Backend>().unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains("unknown backend `hccl`; expected one of gloo, cpu, mpi, nccl"), "{e}");
        assert!(Backend::Cpu.check_supported().is_ok());
        let refused: &[Backend] = if cfg!(feature = "nccl") { &[Backend::Mpi] } else { &[Backend::Mpi, Backend::Nccl] };
        assert_eq!(Backend::Nccl.check_supported().is_ok(), cfg!(feature = "nccl"));
        for &b in refused {
            let e = b.check_supported().unwrap_err();
            assert!(matches!(e, Error::Unsupported(_)) && e.to_string().contains(b.name()), "{e}");
        }
    }

    #[test]
    fn env_map_parses_every_variable() {
        let o = InitOptions::from_env_map(&env(&[
            ("WORLD_SIZE", "8"),
            ("RANK", "5"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", " node-0 "),
            ("MASTER_PORT", "29500"),
            ("RANKWEAVE_TIMEOUT", "2.5"),
            ("RANKWEAVE_TRANSPORT", "TCP"),
            ("UNRELATED", "x"),
        ]))
        .unwrap();
        assert_eq!((o.world_size, o.rank, o.local_rank), (Some(8), Some(5), Some(1)));
        assert_eq!((o.master_addr.as_deref(), o.master_port), (Some("node-0"), Some(29500)));
        assert_eq!(o.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(o.transport, Some(TransportKind::Tcp));
        let g = o.group_options();
        assert_eq!((g.timeout, g.transport), (Duration::from_millis(2500), TransportKind::Tcp));
        assert_eq!(InitOptions::from_env_map(&HashMap::new()).unwrap(), InitOptions::new());
        assert_eq!(InitOptions::new().group_options().timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn malformed_variables_name_themselves() {
        for (k, v) in [("RANK", "-1"), ("WORLD_SIZE", "four"), ("MASTER_PORT", "70000"), ("RANKWEAVE_TIMEOUT", "0")] {
            let e = InitOptions::from_env_map(&env(&[(k, v)])).unwrap_err().to_string();
            assert!(e.contains(k), "{k}: {e}");
        }
        let e = InitOptions::from_env_map(&env(&[("RANKWEAVE_TRANSPORT", "udp")])).unwrap_err().to_string();
        assert!(e.contains("RANKWEAVE_TRANSPORT"), "{e}");
    }

    #[test]
    fn explicit_options_beat_the_environment() {
        let e = env(&[("WORLD_SIZE", "4"), ("RANK", "3"), ("LOCAL_RANK", "3"), ("RANKWEAVE_TIMEOUT", "9")]);
        let o = InitOptions::new()
            .rank(0)
            .timeout(Duration::from_secs(1))
            .backend(Backend::Nccl)
            .init_method("tcp://h:1")
            .with_env_map(&e)
            .unwrap();
        assert_eq!((o.world_size, o.rank, o.local_rank), (Some(4), Some(0), Some(3)));
        assert_eq!(o.timeout, Some(Duration::from_secs(1)));
        assert_eq!(o.backend, Backend::Nccl);
        assert_eq!(o.init_method_or_default(), "tcp://h:1");
        assert_eq!(InitOptions::new().init_method_or_default(), "env://");
        assert_eq!(o.rendezvous_var("RANK", None).as_deref(), Some("0"));
        assert_eq!(o.rendezvous_var("MASTER_ADDR", None), None);
    }
}
