//! The hierarchical backend, for a group whose members span nodes.
//!
//! all_reduce reduces inside each node through that node's own
//! shared-memory segment, all-reduces among the node leaders (each node's
//! lowest group rank) over TCP, and broadcasts inside each node; `Avg` sums
//! throughout and divides once, on the leaders, so every rank ends with the
//! same bits. Every other collective runs over the TCP mesh.
//!
//! Point-to-point between two ranks of one node goes through that node's
//! segment ([`ShmComm::send`]/[`ShmComm::recv`]: per-pair channels, one copy
//! or none); between nodes it goes over TCP. Zero-copy buffers
//! ([`ShmBuf`]) come from the node's segment and go between ranks of one
//! node; to or from another node they are [`Error::Unsupported`] on both
//! sides. Whether two ranks share a node
//! is fixed when the group is built, so all messages of a pair take one
//! path and keep their order. Errors of the node-local path name group
//! ranks, as those of TCP do.

use super::shm::MeshAndSegments;
use super::tcp::TransportComm;
use super::{Backend, Call, Communicator};
use crate::collectives::shm::{ShmBuf, ShmComm};
use crate::collectives::{self, Comm};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::group::TransportKind;
use crate::reduce::ReduceOp;
use crate::transport::tcp::TcpTransport;
use crate::transport::{Tag, Transport};
use std::sync::Arc;
use std::time::Instant;

/// Where this rank sits in a group spanning nodes.
#[derive(Debug)]
pub struct NodeLayout {
    /// Shared memory among this node's members (`None` when alone on it).
    pub local: Option<ShmComm>,
    /// Group ranks of this node's members, in order (their ranks in
    /// `local` are the positions here); this rank alone when alone.
    pub local_ranks: Vec<usize>,
    /// Group ranks of the node leaders, in node order.
    pub leaders: Vec<usize>,
    /// This rank's index in `leaders`, when it leads its node.
    pub leader_index: Option<usize>,
}

/// Hierarchical all_reduce plus TCP for everything else.
pub struct HierBackend {
    layout: NodeLayout,
    size: usize,
    mesh: Arc<TcpTransport>,
    tcp: TransportComm<TcpTransport>,
    scratch: Vec<u8>,
}

impl HierBackend {
    /// The backend of a group of `size` ranks laid out as `layout` over `mesh`.
    pub fn backend(mut layout: NodeLayout, size: usize, mesh: Arc<TcpTransport>) -> Backend {
        let tcp = TransportComm::new(mesh.clone(), "tcp");
        if let Some(local) = layout.local.as_mut() {
            local.set_rank_names(layout.local_ranks.clone());
            // A rank waiting in its node's segment still hears the other
            // nodes: a peer that waits for it in another operation (a
            // mismatch) or aborted stops the wait at once.
            let m = mesh.clone();
            local.set_watch(Some(Box::new(move || m.watch_outside())));
        }
        let segments = layout.local.iter().map(ShmComm::abort_handle).collect();
        let link = Arc::new(MeshAndSegments { mesh: mesh.clone(), segments });
        let comm = Box::new(HierBackend { layout, size, mesh, tcp, scratch: Vec::new() });
        Backend { comm, link, kind: TransportKind::Tcp }
    }
}

/// The TCP mesh restricted to some of its ranks (the node leaders), renumbered
/// `0..members.len()`; errors still name the peers' group ranks.
struct SubTransport<'a> {
    inner: &'a TcpTransport,
    members: &'a [usize],
    rank: usize,
}

impl Transport for SubTransport<'_> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.members.len()
    }
    fn group_name(&self) -> &str {
        self.inner.group_name()
    }
    fn send(&self, peer: usize, tag: Tag, data: &[u8], deadline: Instant) -> Result<()> {
        self.inner.send(self.members[peer], tag, data, deadline)
    }
    fn recv(&self, peer: usize, tag: Tag, buf: &mut [u8], deadline: Instant) -> Result<()> {
        self.inner.recv(self.members[peer], tag, buf, deadline)
    }
    fn send_recv(
        &self,
        to: usize,
        send_tag: Tag,
        data: &[u8],
        from: usize,
        recv_tag: Tag,
        buf: &mut [u8],
        deadline: Instant,
    ) -> Result<()> {
        self.inner.send_recv(self.members[to], send_tag, data, self.members[from], recv_tag, buf, deadline)
    }
}

impl HierBackend {
    /// The node-local communicator and `peer`'s rank in it, when `peer`
    /// shares this rank's node.
    fn local_peer(&mut self, peer: usize) -> Option<(&mut ShmComm, usize)> {
        let i = self.layout.local_ranks.iter().position(|&j| j == peer)?;
        self.layout.local.as_mut().map(|c| (c, i))
    }
}

impl Communicator for HierBackend {
    fn name(&self) -> &'static str {
        "hier"
    }
    fn all_reduce(&mut self, call: Call, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let sum_op = if op == ReduceOp::Avg { ReduceOp::Sum } else { op };
        self.mesh.enter(call.seq, call.desc);
        let h = &mut self.layout;
        if let Some(local) = h.local.as_mut() {
            local.reduce(buf, dtype, sum_op, 0)?;
        }
        if let Some(li) = h.leader_index {
            if h.leaders.len() > 1 {
                let sub = SubTransport { inner: &self.mesh, members: &h.leaders, rank: li };
                let mut comm = Comm {
                    transport: &sub,
                    seq: call.seq,
                    deadline: call.deadline(),
                    scratch: &mut self.scratch,
                    desc: call.desc,
                };
                collectives::all_reduce(&mut comm, buf, dtype, sum_op)?;
            }
            if op == ReduceOp::Avg {
                crate::reduce::finish_avg(buf, dtype, self.size);
            }
        }
        if let Some(local) = h.local.as_mut() {
            local.broadcast(buf, 0)?;
        }
        Ok(())
    }
    fn broadcast(&mut self, call: Call, buf: &mut [u8], root: usize) -> Result<()> {
        self.tcp.broadcast(call, buf, root)
    }
    fn all_gather(&mut self, call: Call, input: &[u8], output: &mut [u8]) -> Result<()> {
        self.tcp.all_gather(call, input, output)
    }
    fn gather(&mut self, call: Call, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()> {
        self.tcp.gather(call, input, output, root)
    }
    fn scatter(&mut self, call: Call, input: Option<&[u8]>, output: &mut [u8], root: usize) -> Result<()> {
        self.tcp.scatter(call, input, output, root)
    }
    fn reduce(&mut self, call: Call, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
        self.tcp.reduce(call, buf, dtype, op, root)
    }
    fn reduce_scatter(
        &mut self,
        call: Call,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.tcp.reduce_scatter(call, input, output, dtype, op)
    }
    fn all_to_all(&mut self, call: Call, input: &[u8], output: &mut [u8]) -> Result<()> {
        self.tcp.all_to_all(call, input, output)
    }
    fn barrier(&mut self, call: Call) -> Result<()> {
        self.tcp.barrier(call)
    }
    fn send(&mut self, call: Call, data: &[u8], dst: usize) -> Result<()> {
        match self.local_peer(dst) {
            Some((local, i)) => local.send(data, i, call.timeout),
            None => self.tcp.send(call, data, dst),
        }
    }
    fn recv(&mut self, call: Call, buf: &mut [u8], src: usize) -> Result<()> {
        match self.local_peer(src) {
            Some((local, i)) => local.recv(buf, i, call.timeout),
            None => self.tcp.recv(call, buf, src),
        }
    }
    fn shm_messages_sent(&self, peer: usize) -> u64 {
        let i = self.layout.local_ranks.iter().position(|&j| j == peer);
        match (i, self.layout.local.as_ref()) {
            (Some(i), Some(local)) if i != local.rank() => local.messages_sent(i),
            _ => 0,
        }
    }
    fn shm_buffer(&mut self, len: usize) -> Result<ShmBuf> {
        match self.layout.local.as_mut() {
            Some(local) => local.shm_buffer(len),
            None => Err(Error::Unsupported(
                "zero-copy shared-memory buffers go between ranks of one node, and no other rank of this group \
                 runs on this one (send_bytes/recv_bytes cross nodes over TCP)"
                    .into(),
            )),
        }
    }
    fn send_shm(&mut self, call: Call, buf: ShmBuf, dst: usize) -> Result<()> {
        match self.local_peer(dst) {
            Some((local, i)) => local.send_shm(buf, i, call.timeout),
            None => Err(across_nodes(dst)),
        }
    }
    fn recv_shm(&mut self, call: Call, src: usize) -> Result<ShmBuf> {
        match self.local_peer(src) {
            Some((local, i)) => local.recv_shm(i, call.timeout),
            None => Err(across_nodes(src)),
        }
    }
}

/// The error of a zero-copy handover to or from a rank on another node.
/// Both sides know the layout, so both get it and neither waits.
fn across_nodes(peer: usize) -> Error {
    Error::Unsupported(format!(
        "zero-copy shared-memory buffers go between ranks of one node, and group rank {peer} runs on another \
         (send_bytes/recv_bytes cross nodes over TCP)"
    ))
}
