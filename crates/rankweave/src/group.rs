//! Process groups: the members' global ranks, this rank's position, a
//! transport and a sequence counter.
//!
//! CONTRACT (filled in by the transport/group work): signatures here are the
//! API the coordinator, benchmark and demo build on.

use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::reduce::ReduceOp;
use crate::store::SharedStore;
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

/// Options for creating groups.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// Deadline of each operation.
    pub timeout: Duration,
    /// Which transport collectives use.
    pub transport: TransportKind,
    /// Address this rank listens on for peers (`127.0.0.1`, `0.0.0.0`, a NIC's IP).
    pub listen_host: String,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            timeout: crate::store::default_timeout(),
            transport: TransportKind::Auto,
            listen_host: "127.0.0.1".into(),
        }
    }
}

/// A group of ranks that run collectives together. Cheap to clone.
#[derive(Clone)]
pub struct ProcessGroup {
    _private: (),
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup").finish_non_exhaustive()
    }
}

#[allow(unused_variables)]
impl ProcessGroup {
    /// Builds the world group: every rank calls it with the same store and
    /// world size and its own rank.
    pub fn new_world(store: SharedStore, rank: usize, world_size: usize, opts: GroupOptions) -> Result<ProcessGroup> {
        todo!()
    }

    /// Creates a subgroup. Every member of `self` calls it with the same
    /// `ranks` (ranks of `self`'s numbering, i.e. global ranks for the world)
    /// in the same order; members get `Some`, the others `None`.
    /// `name` prefixes the group's unique name (`tp` -> `tp:0`).
    pub fn new_group(&self, ranks: &[usize], name: &str) -> Result<Option<ProcessGroup>> {
        todo!()
    }

    /// This rank's position in the group.
    pub fn rank(&self) -> usize {
        todo!()
    }
    /// Number of ranks.
    pub fn size(&self) -> usize {
        todo!()
    }
    /// This process's global (world) rank.
    pub fn global_rank(&self) -> usize {
        todo!()
    }
    /// The members' global ranks, in group order.
    pub fn global_ranks(&self) -> &[usize] {
        todo!()
    }
    /// Unique name, e.g. `world:0`, `tp:1`.
    pub fn name(&self) -> &str {
        todo!()
    }
    /// The store, namespaced for this group.
    pub fn store(&self) -> SharedStore {
        todo!()
    }
    /// Per-operation deadline.
    pub fn timeout(&self) -> Duration {
        todo!()
    }
    /// The transport collectives use in this group.
    pub fn transport_kind(&self) -> TransportKind {
        todo!()
    }

    /// In-place all_reduce of `buf` (elements of `dtype`).
    pub fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        todo!()
    }
    /// In-place broadcast from group rank `root`.
    pub fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        todo!()
    }
    /// `output.len() == size * input.len()`.
    pub fn all_gather_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()> {
        todo!()
    }
    /// `output` is `Some` on root only.
    pub fn gather_bytes(&self, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()> {
        todo!()
    }
    /// `input` is `Some` on root only.
    pub fn scatter_bytes(&self, input: Option<&[u8]>, output: &mut [u8], root: usize) -> Result<()> {
        todo!()
    }
    /// In place; the result is defined on root only.
    pub fn reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
        todo!()
    }
    /// `input.len() == size * output.len()`.
    pub fn reduce_scatter_bytes(&self, input: &[u8], output: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        todo!()
    }
    /// Both `size * S` bytes.
    pub fn all_to_all_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()> {
        todo!()
    }
    /// Sends `data` to group rank `dst`; `recv_bytes` on `dst` must expect the same length.
    pub fn send_bytes(&self, data: &[u8], dst: usize) -> Result<()> {
        todo!()
    }
    /// Receives exactly `buf.len()` bytes from group rank `src`.
    pub fn recv_bytes(&self, buf: &mut [u8], src: usize) -> Result<()> {
        todo!()
    }
    /// Returns once every rank entered.
    pub fn barrier(&self) -> Result<()> {
        todo!()
    }

    /// Typed [`ProcessGroup::all_reduce_bytes`].
    pub fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.all_reduce_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }
    /// Typed [`ProcessGroup::broadcast_bytes`].
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.broadcast_bytes(bytemuck::cast_slice_mut(buf), root)
    }
    /// Typed [`ProcessGroup::all_gather_bytes`].
    pub fn all_gather<T: Element>(&self, input: &[T], output: &mut [T]) -> Result<()> {
        self.all_gather_bytes(bytemuck::cast_slice(input), bytemuck::cast_slice_mut(output))
    }
    /// Typed [`ProcessGroup::gather_bytes`].
    pub fn gather<T: Element>(&self, input: &[T], output: Option<&mut [T]>, root: usize) -> Result<()> {
        self.gather_bytes(bytemuck::cast_slice(input), output.map(bytemuck::cast_slice_mut), root)
    }
    /// Typed [`ProcessGroup::scatter_bytes`].
    pub fn scatter<T: Element>(&self, input: Option<&[T]>, output: &mut [T], root: usize) -> Result<()> {
        self.scatter_bytes(input.map(bytemuck::cast_slice), bytemuck::cast_slice_mut(output), root)
    }
    /// Typed [`ProcessGroup::reduce_bytes`].
    pub fn reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.reduce_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, op, root)
    }
    /// Typed [`ProcessGroup::reduce_scatter_bytes`].
    pub fn reduce_scatter<T: Element>(&self, input: &[T], output: &mut [T], op: ReduceOp) -> Result<()> {
        self.reduce_scatter_bytes(bytemuck::cast_slice(input), bytemuck::cast_slice_mut(output), T::DTYPE, op)
    }
    /// Typed [`ProcessGroup::all_to_all_bytes`].
    pub fn all_to_all<T: Element>(&self, input: &[T], output: &mut [T]) -> Result<()> {
        self.all_to_all_bytes(bytemuck::cast_slice(input), bytemuck::cast_slice_mut(output))
    }
    /// Typed [`ProcessGroup::send_bytes`].
    pub fn send<T: Element>(&self, data: &[T], dst: usize) -> Result<()> {
        self.send_bytes(bytemuck::cast_slice(data), dst)
    }
    /// Typed [`ProcessGroup::recv_bytes`].
    pub fn recv<T: Element>(&self, buf: &mut [T], src: usize) -> Result<()> {
        self.recv_bytes(bytemuck::cast_slice_mut(buf), src)
    }
}
