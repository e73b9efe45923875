//! Init methods: how the ranks of a job find each other's store.
//!
//! - `env://`: `MASTER_ADDR`, `MASTER_PORT`, `RANK` and `WORLD_SIZE` from the
//!   environment (the caller's `rank`/`world_size` win when given);
//!   `LOCAL_RANK` is read when present.
//! - `tcp://host:port`: the caller gives `rank` and `world_size`.
//!
//! Rank 0 hosts the [`TcpStoreServer`](super::tcp::TcpStoreServer) on the
//! master address and port (port 0 picks a free one, reported in
//! [`Rendezvous::master_port`]); the other ranks connect, retrying while the
//! server starts. The server lives as long as rank 0's store handle.
//! `RANKWEAVE_TOKEN`, when set, is required by the server and presented by
//! every client.
//!
//! Under `rankweave launch` the store is hosted by node 0's launcher, not by
//! rank 0, so that no worker's exit takes it away from the others (as
//! torchrun's agent hosts it). The launcher tells its workers so by setting
//! [`STORE_HOSTED_ENV`] (`RANKWEAVE_STORE_HOSTED`) to `1`: rank 0 then
//! connects as a client like every other rank. The variable is read through the `env` of
//! [`rendezvous_with_env`] and, when that does not answer it, from the
//! process environment: it describes how the process was started, not an
//! option of one call. Any value other than `1` (or `0`) is an
//! `InvalidArgument`.

use super::tcp::{join_host_port, TcpStore};
use super::SharedStore;
use crate::error::{Error, Result};
use crate::transport::tcp::addr::{DEFAULT_LINK_TIMEOUT, LINK_TIMEOUT_ENV};
use std::sync::Arc;
use std::time::Duration;

/// Set to `1` by `rankweave launch` when the job's store is already hosted
/// (by node 0's launcher): rank 0 then connects to it instead of hosting it.
pub const STORE_HOSTED_ENV: &str = "RANKWEAVE_STORE_HOSTED";

/// Whether [`STORE_HOSTED_ENV`] says the store is hosted outside the ranks:
/// `env`'s answer, else the process environment's; unset means no.
pub fn store_hosted(env: &dyn Fn(&str) -> Option<String>) -> Result<bool> {
    let value = env(STORE_HOSTED_ENV).or_else(|| std::env::var(STORE_HOSTED_ENV).ok());
    match value.as_deref().map(str::trim) {
        None | Some("") | Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(v) => Err(Error::invalid(format!(
            "environment variable {STORE_HOSTED_ENV}=`{v}` must be 1 (the launcher hosts the store) or 0"
        ))),
    }
}

/// What a rank knows after meeting the others at the store.
#[derive(Clone)]
pub struct Rendezvous {
    /// The job's store (rank 0's handle also keeps the server alive).
    pub store: SharedStore,
    /// This process's global rank.
    pub rank: usize,
    /// Number of ranks in the job.
    pub world_size: usize,
    /// Rank on this node, when known (`LOCAL_RANK`).
    pub local_rank: Option<usize>,
    /// The store host.
    pub master_addr: String,
    /// The store port (the picked one when 0 was asked for).
    pub master_port: u16,
    /// This process hosts the store server: it must outlive every other
    /// rank's use of the store (see
    /// [`crate::parallel_state::ParallelState::destroy_distributed_environment`]).
    pub hosts_store: bool,
}

impl std::fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendezvous")
            .field("store", &self.store.describe())
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("local_rank", &self.local_rank)
            .field("master_addr", &self.master_addr)
            .field("master_port", &self.master_port)
            .field("hosts_store", &self.hosts_store)
            .finish()
    }
}

/// Meets the other ranks of the job through `init_method` (`env://` or
/// `tcp://host:port`) and returns the store plus this rank's coordinates.
/// Rank 0 hosts the store unless [`STORE_HOSTED_ENV`] is `1`.
/// `timeout` bounds connecting and is the store's default timeout; pass
/// [`default_timeout`](super::default_timeout) for `RANKWEAVE_TIMEOUT` / 300 s.
///
/// Missing or invalid settings are an `InvalidArgument` naming the variable.
pub fn rendezvous(
    init_method: &str,
    rank: Option<usize>,
    world_size: Option<usize>,
    timeout: Duration,
) -> Result<Rendezvous> {
    rendezvous_with_env(init_method, rank, world_size, timeout, &|name| std::env::var(name).ok())
}

/// [`rendezvous`] reading variables through `env` instead of the process
/// environment (for tests and embedders that carry their own settings).
pub fn rendezvous_with_env(
    init_method: &str,
    rank: Option<usize>,
    world_size: Option<usize>,
    timeout: Duration,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Rendezvous> {
    let method = init_method.trim();
    let (host, port, rank, world_size, local_rank) = if method == "env://" {
        let host = env("MASTER_ADDR").filter(|h| !h.trim().is_empty()).ok_or_else(|| {
            Error::invalid("environment variable MASTER_ADDR is not set (needed by init_method env://)")
        })?;
        let port = parse_var::<u16>(env, "MASTER_PORT")?.ok_or_else(|| {
            Error::invalid("environment variable MASTER_PORT is not set (needed by init_method env://)")
        })?;
        let rank = match rank {
            Some(r) => r,
            None => parse_var::<usize>(env, "RANK")?
                .ok_or_else(|| Error::invalid("environment variable RANK is not set and no rank was given"))?,
        };
        let world_size = match world_size {
            Some(w) => w,
            None => parse_var::<usize>(env, "WORLD_SIZE")?.ok_or_else(|| {
                Error::invalid("environment variable WORLD_SIZE is not set and no world size was given")
            })?,
        };
        let local_rank = parse_var::<usize>(env, "LOCAL_RANK")?;
        (host.trim().to_string(), port, rank, world_size, local_rank)
    } else if let Some(rest) = method.strip_prefix("tcp://") {
        let (host, port) = parse_host_port(rest, method)?;
        let rank =
            rank.ok_or_else(|| Error::invalid(format!("init_method {method} needs the rank from the caller")))?;
        let world_size = world_size
            .ok_or_else(|| Error::invalid(format!("init_method {method} needs the world size from the caller")))?;
        let local_rank = parse_var::<usize>(env, "LOCAL_RANK")?;
        (host, port, rank, world_size, local_rank)
    } else {
        return Err(Error::invalid(format!("unsupported init_method `{init_method}`: use env:// or tcp://host:port")));
    };
    if world_size == 0 {
        return Err(Error::invalid("world size (WORLD_SIZE) must be at least 1"));
    }
    if rank >= world_size {
        return Err(Error::invalid(format!("rank (RANK) {rank} is out of range for world size {world_size}")));
    }
    let hosted = store_hosted(env)?;
    if port == 0 && (rank != 0 || hosted) {
        return Err(Error::invalid(format!(
            "master port (MASTER_PORT) 0 lets only a rank 0 that hosts the store pick a free port; rank {rank} \
             needs the real port"
        )));
    }
    let token = env("RANKWEAVE_TOKEN");
    let link_timeout = match env(LINK_TIMEOUT_ENV).filter(|v| !v.trim().is_empty()) {
        None => Some(DEFAULT_LINK_TIMEOUT),
        Some(v) => Some(super::parse_timeout(&v).ok_or_else(|| {
            Error::invalid(format!("environment variable {LINK_TIMEOUT_ENV}=`{v}`: expected seconds > 0"))
        })?),
    };
    let store = TcpStore::builder(&host, port)
        .master(rank == 0 && !hosted)
        .timeout(timeout)
        .token(token.as_deref().map(str::as_bytes))
        .link_timeout(link_timeout)
        .connect()?;
    let master_port = store.port();
    let hosts_store = store.is_master();
    tracing::debug!(rank, world_size, addr = %join_host_port(&host, master_port), "rendezvous done");
    Ok(Rendezvous { store: Arc::new(store), rank, world_size, local_rank, master_addr: host, master_port, hosts_store })
}

fn parse_var<T: std::str::FromStr>(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<T>> {
    match env(name) {
        None => Ok(None),
        Some(v) => v.trim().parse::<T>().map(Some).map_err(|_| {
            Error::invalid(format!("environment variable {name}=`{v}` is not a valid {}", std::any::type_name::<T>()))
        }),
    }
}

/// Splits `host:port` or `[v6]:port`.
fn parse_host_port(s: &str, method: &str) -> Result<(String, u16)> {
    let bad = |why: &str| Error::invalid(format!("init_method {method}: {why}; expected tcp://host:port"));
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once(']').ok_or_else(|| bad("unclosed `[`"))?;
        (h, p.strip_prefix(':').ok_or_else(|| bad("missing port"))?)
    } else {
        s.rsplit_once(':').ok_or_else(|| bad("missing port"))?
    };
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    let port = port.trim_end_matches('/').parse::<u16>().map_err(|_| bad(&format!("invalid port `{port}`")))?;
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::{parse_host_port, store_hosted, STORE_HOSTED_ENV};

    #[test]
    fn hosted_flag_values() {
        let of = |v: Option<&'static str>| {
            move |name: &str| if name == STORE_HOSTED_ENV { v.map(String::from) } else { None }
        };
        assert!(store_hosted(&of(Some("1"))).unwrap());
        assert!(store_hosted(&of(Some(" 1 "))).unwrap());
        assert!(!store_hosted(&of(Some("0"))).unwrap());
        let e = store_hosted(&of(Some("yes"))).unwrap_err().to_string();
        assert!(e.contains("RANKWEAVE_STORE_HOSTED=`yes`"), "{e}");
    }

    #[test]
    fn hosted_store_makes_rank_0_a_client() {
        use super::rendezvous_with_env;
        use crate::store::tcp::{TcpStore, TcpStoreServer};
        use crate::store::Store;
        use std::time::Duration;
        let server = TcpStoreServer::builder().token(None).bind("127.0.0.1:0").unwrap();
        let port = server.port().to_string();
        let env = |hosted: &'static str, rank: &'static str| {
            let port = port.clone();
            move |name: &str| match name {
                "MASTER_ADDR" => Some("127.0.0.1".to_string()),
                "MASTER_PORT" => Some(port.clone()),
                "RANK" => Some(rank.to_string()),
                "WORLD_SIZE" => Some("2".to_string()),
                STORE_HOSTED_ENV => Some(hosted.to_string()),
                _ => None,
            }
        };
        let t = Duration::from_secs(5);
        let r0 = rendezvous_with_env("env://", None, None, t, &env("1", "0")).unwrap();
        let r1 = rendezvous_with_env("env://", None, None, t, &env("1", "1")).unwrap();
        assert_eq!((r0.rank, r1.rank, r0.master_port), (0, 1, server.port()));
        r0.store.set("from0", b"x").unwrap();
        assert_eq!(r1.store.get("from0").unwrap(), b"x");
        // Rank 0 hosts nothing: the launcher's server holds both connections.
        let direct = TcpStore::builder("127.0.0.1", server.port()).token(None).timeout(t).connect().unwrap();
        assert!(!direct.is_master());
        assert_eq!(direct.get("from0").unwrap(), b"x");
        drop(r0);
        assert_eq!(r1.store.get("from0").unwrap(), b"x", "rank 0 leaving keeps the store up");
        // Without the flag rank 0 would host on the taken port and fail.
        let err = rendezvous_with_env("env://", None, None, t, &env("0", "0")).unwrap_err().to_string();
        assert!(err.contains("store.bind"), "{err}");
        // A hosted store cannot be on port 0.
        let zero = |name: &str| match name {
            "MASTER_PORT" => Some("0".to_string()),
            n => env("1", "0")(n),
        };
        let err = rendezvous_with_env("env://", None, None, t, &zero).unwrap_err().to_string();
        assert!(err.contains("MASTER_PORT"), "{err}");
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(parse_host_port("127.0.0.1:29500", "m").unwrap(), ("127.0.0.1".to_string(), 29500));
        assert_eq!(parse_host_port("[::1]:0", "m").unwrap(), ("::1".to_string(), 0));
        assert_eq!(parse_host_port("node-1:7/", "m").unwrap(), ("node-1".to_string(), 7));
        assert!(parse_host_port("host", "m").is_err());
        assert!(parse_host_port(":80", "m").is_err());
        assert!(parse_host_port("h:99999", "m").is_err());
        assert!(parse_host_port("[::1", "m").is_err());
    }
}
