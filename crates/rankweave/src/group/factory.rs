//! Which backend a new group gets: a [`BackendFactory`] builds one for every
//! group of a world (the world itself and each subgroup), so a world of MPI
//! communicators splits into MPI subgroups and a CPU world into CPU ones.

use super::agree::{open_probe, setup_shm, Plan};
use super::{node_identity, GroupOptions, TransportKind};
use crate::backend::hier::HierBackend;
use crate::backend::shm::ShmBackend;
use crate::backend::tcp::tcp_backend;
use crate::backend::Backend;
use crate::error::Result;
use crate::store::SharedStore;
use crate::transport::tcp::TcpTransport;
use std::sync::Arc;
use std::time::Instant;

/// What a factory knows of the group it builds a backend for.
#[derive(Clone)]
pub struct GroupInfo<'a> {
    /// The group's unique name (`tp:0`), for errors.
    pub name: &'a str,
    /// This rank's position in the group.
    pub rank: usize,
    /// Number of ranks.
    pub size: usize,
    /// The members' global ranks, in group order.
    pub global_ranks: &'a [usize],
    /// The store, namespaced for this group (every member sees the same keys).
    pub store: SharedStore,
    /// The id every wire message of this group carries.
    pub group_id: u64,
    /// The group's options.
    pub opts: &'a GroupOptions,
}

/// Builds the backend of each new group; every member of the group calls
/// [`BackendFactory::build`] collectively, with the same group.
pub trait BackendFactory: Send + Sync {
    /// The backend of `group`, connected to every other member.
    fn build(&self, group: &GroupInfo<'_>) -> Result<Backend>;
}

/// The CPU backends: a TCP mesh for every group, with shared-memory
/// collectives inside a node and the hierarchical all_reduce across nodes
/// (see the [`crate::group`] docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuFactory;

impl BackendFactory for CpuFactory {
    fn build(&self, g: &GroupInfo<'_>) -> Result<Backend> {
        let opts = g.opts;
        let requested = opts.transport;
        let deadline = Instant::now() + opts.timeout;
        let mesh = Arc::new(TcpTransport::connect(
            g.store.clone(),
            g.rank,
            g.size,
            g.name,
            g.group_id,
            &opts.tcp(),
            deadline,
        )?);
        let plan = match (requested, g.size) {
            (TransportKind::Tcp, _) | (_, 1) => Plan::Tcp,
            _ => {
                let node = opts.node.clone().unwrap_or_else(node_identity);
                setup_shm(&*g.store, g.rank, g.size, g.name, requested, opts, &node, &open_probe)?
            }
        };
        Ok(match plan {
            Plan::Shm(comm) => ShmBackend::backend(comm, mesh),
            Plan::Hier(layout) => HierBackend::backend(layout, g.size, mesh),
            Plan::Tcp => {
                let mut b = tcp_backend(mesh);
                // One rank talks to nobody: it trivially shares its node.
                if g.size == 1 && requested != TransportKind::Tcp {
                    b.kind = TransportKind::Shm;
                }
                b
            }
        })
    }
}
