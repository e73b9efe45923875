//! The message-passing backend: the algorithms of [`crate::collectives`]
//! over a [`Transport`] (the TCP mesh, or [`MemTransport`] in tests).

use super::{Backend, Call, Communicator, Link};
use crate::collectives::{self, Comm};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::group::TransportKind;
use crate::group::{BackendFactory, GroupInfo};
use crate::reduce::ReduceOp;
use crate::transport::mem::MemTransport;
use crate::transport::tcp::TcpTransport;
use crate::transport::{OpCode, Tag, Transport};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Collectives and point-to-point over one transport, with a scratch buffer
/// reused across calls.
pub struct TransportComm<T: Transport + 'static> {
    transport: Arc<T>,
    scratch: Vec<u8>,
    name: &'static str,
}

impl<T: Transport + 'static> TransportComm<T> {
    /// A communicator over `transport`, reported as `name`.
    pub fn new(transport: Arc<T>, name: &'static str) -> Self {
        TransportComm { transport, scratch: Vec::new(), name }
    }

    fn comm(&mut self, call: Call) -> Comm<'_> {
        Comm {
            transport: &*self.transport,
            seq: call.seq,
            deadline: call.deadline(),
            scratch: &mut self.scratch,
            desc: call.desc,
        }
    }
}

/// The TCP backend over a connected mesh.
pub fn tcp_backend(mesh: Arc<TcpTransport>) -> Backend {
    Backend { comm: Box::new(TransportComm::new(mesh.clone(), "tcp")), link: mesh, kind: TransportKind::Tcp }
}

/// An in-process backend over one rank's end of a [`MemTransport::mesh`]
/// (ranks as threads; for tests of the group and the conformance suite).
pub fn mem_backend(t: MemTransport) -> Backend {
    let t = Arc::new(t);
    Backend { comm: Box::new(TransportComm::new(t.clone(), "mem")), link: t, kind: TransportKind::Tcp }
}

/// Builds in-process backends for a world whose ranks are threads of one
/// process: one [`MemTransport::mesh`] per group, handed out rank by rank.
/// Share one factory (an `Arc`) between the ranks' threads and pass it to
/// [`crate::ProcessGroup::new_world_with`].
#[derive(Default)]
pub struct InProcessFactory {
    meshes: Mutex<HashMap<u64, Vec<Option<MemTransport>>>>,
}

impl BackendFactory for InProcessFactory {
    fn build(&self, g: &GroupInfo<'_>) -> Result<Backend> {
        let mut meshes = self.meshes.lock().unwrap_or_else(|e| e.into_inner());
        let mesh = meshes
            .entry(g.group_id)
            .or_insert_with(|| MemTransport::mesh(g.size, g.name).into_iter().map(Some).collect());
        let t = mesh.get_mut(g.rank).and_then(Option::take).ok_or_else(|| {
            Error::invalid(format!("group {}: rank {} built its in-process backend twice", g.name, g.rank))
        })?;
        if mesh.iter().all(Option::is_none) {
            meshes.remove(&g.group_id);
        }
        Ok(mem_backend(t))
    }
}

/// Point-to-point on any transport: one message tagged with the pair's
/// sequence number.
pub(crate) fn send_on(t: &dyn Transport, call: Call, data: &[u8], dst: usize) -> Result<()> {
    t.send(dst, Tag::new(OpCode::SendRecv, call.seq).with_desc(call.desc), data, call.deadline())
}

/// The receiving side of [`send_on`].
pub(crate) fn recv_on(t: &dyn Transport, call: Call, buf: &mut [u8], src: usize) -> Result<()> {
    t.recv(src, Tag::new(OpCode::SendRecv, call.seq).with_desc(call.desc), buf, call.deadline())
}

impl<T: Transport + 'static> Communicator for TransportComm<T> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn all_reduce(&mut self, call: Call, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        collectives::all_reduce(&mut self.comm(call), buf, dtype, op)
    }
    fn broadcast(&mut self, call: Call, buf: &mut [u8], root: usize) -> Result<()> {
        collectives::broadcast(&mut self.comm(call), buf, root)
    }
    fn all_gather(&mut self, call: Call, input: &[u8], output: &mut [u8]) -> Result<()> {
        collectives::all_gather(&mut self.comm(call), input, output)
    }
    fn gather(&mut self, call: Call, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()> {
        collectives::gather(&mut self.comm(call), input, output, root)
    }
    fn scatter(&mut self, call: Call, input: Option<&[u8]>, output: &mut [u8], root: usize) -> Result<()> {
        collectives::scatter(&mut self.comm(call), input, output, root)
    }
    fn reduce(&mut self, call: Call, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
        collectives::reduce(&mut self.comm(call), buf, dtype, op, root)
    }
    fn reduce_scatter(
        &mut self,
        call: Call,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        collectives::reduce_scatter(&mut self.comm(call), input, output, dtype, op)
    }
    fn all_to_all(&mut self, call: Call, input: &[u8], output: &mut [u8]) -> Result<()> {
        collectives::all_to_all(&mut self.comm(call), input, output)
    }
    fn barrier(&mut self, call: Call) -> Result<()> {
        collectives::barrier(&mut self.comm(call))
    }
    fn send(&mut self, call: Call, data: &[u8], dst: usize) -> Result<()> {
        send_on(&*self.transport, call, data, dst)
    }
    fn recv(&mut self, call: Call, buf: &mut [u8], src: usize) -> Result<()> {
        recv_on(&*self.transport, call, buf, src)
    }
}

impl Link for TcpTransport {
    fn abort(&self, err: &Error) {
        TcpTransport::abort(self, err);
    }
    fn close(&self) {
        TcpTransport::close(self);
    }
    fn transport(&self) -> Option<&dyn Transport> {
        Some(self)
    }
}

impl Link for MemTransport {
    /// The in-process mesh has no abort message: peers waiting on this rank
    /// fail at their deadline, or at once when it is closed.
    fn abort(&self, _err: &Error) {}
    fn close(&self) {
        self.leave();
    }
    fn transport(&self) -> Option<&dyn Transport> {
        Some(self)
    }
}
