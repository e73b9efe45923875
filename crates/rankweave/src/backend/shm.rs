//! The shared-memory backend: collectives and point-to-point through one
//! segment ([`ShmComm`]) for a group whose ranks share a node; the group's
//! TCP mesh carries abort messages (and traffic outside the group's
//! operations).

use super::{Backend, BlobRole, Call, Communicator, Link};
use crate::collectives::shm::{ShmAbort, ShmBuf, ShmComm};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::group::TransportKind;
use crate::reduce::ReduceOp;
use crate::transport::tcp::TcpTransport;
use crate::transport::Transport;
use std::sync::Arc;

/// Shared-memory collectives and point-to-point.
pub struct ShmBackend {
    shm: ShmComm,
}

impl ShmBackend {
    /// The backend over `shm`, with `mesh` for aborts.
    pub fn backend(shm: ShmComm, mesh: Arc<TcpTransport>) -> Backend {
        let link = Arc::new(MeshAndSegments { mesh, segments: vec![shm.abort_handle()] });
        Backend { comm: Box::new(ShmBackend { shm }), link, kind: TransportKind::Shm }
    }
}

/// The link of a backend that uses the TCP mesh and shared-memory
/// segments: an abort goes to both, so peers waiting in either stop at once.
pub(crate) struct MeshAndSegments {
    pub mesh: Arc<TcpTransport>,
    pub segments: Vec<ShmAbort>,
}

impl Link for MeshAndSegments {
    fn abort(&self, err: &Error) {
        for s in &self.segments {
            s.abort(err);
        }
        self.mesh.abort(err);
    }
    fn close(&self) {
        for s in &self.segments {
            s.close();
        }
        self.mesh.close();
    }
    fn transport(&self) -> Option<&dyn Transport> {
        Some(&*self.mesh)
    }
}

impl Communicator for ShmBackend {
    fn name(&self) -> &'static str {
        "shm"
    }
    fn all_reduce(&mut self, _call: Call, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        self.shm.all_reduce(buf, dtype, op)
    }
    fn broadcast(&mut self, _call: Call, buf: &mut [u8], root: usize) -> Result<()> {
        self.shm.broadcast(buf, root)
    }
    fn all_gather(&mut self, _call: Call, input: &[u8], output: &mut [u8]) -> Result<()> {
        self.shm.all_gather(input, output)
    }
    fn gather(&mut self, _call: Call, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()> {
        self.shm.gather(input, output, root)
    }
    fn scatter(&mut self, _call: Call, input: Option<&[u8]>, output: &mut [u8], root: usize) -> Result<()> {
        self.shm.scatter(input, output, root)
    }
    fn reduce(&mut self, _call: Call, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
        self.shm.reduce(buf, dtype, op, root)
    }
    fn reduce_scatter(
        &mut self,
        _call: Call,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.shm.reduce_scatter(input, output, dtype, op)
    }
    fn all_to_all(&mut self, _call: Call, input: &[u8], output: &mut [u8]) -> Result<()> {
        self.shm.all_to_all(input, output)
    }
    fn barrier(&mut self, _call: Call) -> Result<()> {
        self.shm.barrier()
    }
    fn send(&mut self, call: Call, data: &[u8], dst: usize) -> Result<()> {
        self.shm.send(data, dst, call.timeout)
    }
    fn recv(&mut self, call: Call, buf: &mut [u8], src: usize) -> Result<()> {
        self.shm.recv(buf, src, call.timeout)
    }
    fn shm_messages_sent(&self, peer: usize) -> u64 {
        self.shm.messages_sent(peer)
    }
    fn shm_buffer(&mut self, len: usize) -> Result<ShmBuf> {
        self.shm.shm_buffer(len)
    }
    fn send_shm(&mut self, call: Call, buf: ShmBuf, dst: usize) -> Result<()> {
        self.shm.send_shm(buf, dst, call.timeout)
    }
    fn recv_shm(&mut self, call: Call, src: usize) -> Result<ShmBuf> {
        self.shm.recv_shm(src, call.timeout)
    }
    fn has_blob_broadcast(&self) -> bool {
        true
    }
    fn broadcast_blob(&mut self, _call: Call, role: BlobRole<'_>, scratch: &mut Vec<u8>, root: usize) -> Result<()> {
        self.shm.broadcast_blob(role, scratch, root)
    }
}
