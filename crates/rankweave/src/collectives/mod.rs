//! Collective algorithms over a [`Transport`].
//!
//! One front door per collective picks an algorithm by size, world size and
//! transport, and short-circuits a single rank. Buffers are byte slices plus
//! a [`DType`] where a reduction needs one; typed wrappers live on
//! [`crate::ProcessGroup`]. Ranks (`root`) are group-local.
//!
//! Buffer conventions (`n` = group size, `S` = one rank's contribution):
//! - `all_reduce(buf)`: in place, `buf.len()` equal on every rank.
//! - `broadcast(buf, root)`: in place.
//! - `all_gather(input, output)`: `output.len() == n * input.len()`, rank order.
//! - `gather(input, output, root)`: `output` is `Some` (len `n * S`) on root only.
//! - `scatter(input, output, root)`: `input` is `Some` (len `n * S`) on root only.
//! - `reduce(buf, root)`: in place; only root's result is defined.
//! - `reduce_scatter(input, output)`: `input.len() == n * output.len()`; rank
//!   `r` receives the reduction of block `r`.
//! - `all_to_all(input, output)`: both `n * S`; block `j` of rank `i`'s input
//!   lands in block `i` of rank `j`'s output.

use crate::dtype::DType;
use crate::error::{Context, Result};
use crate::reduce::ReduceOp;
use crate::transport::{OpCode, Tag, Transport};
use std::time::Instant;

/// Everything one collective call needs: the transport, its sequence number,
/// its deadline and a reusable scratch buffer owned by the group.
pub struct Comm<'a> {
    /// The group's transport.
    pub transport: &'a dyn Transport,
    /// This operation's sequence number (same on every rank).
    pub seq: u64,
    /// When the whole operation must be done.
    pub deadline: Instant,
    /// Scratch space reused across calls (grow it, never shrink it).
    pub scratch: &'a mut Vec<u8>,
}

impl<'a> Comm<'a> {
    /// This rank.
    pub fn rank(&self) -> usize {
        self.transport.rank()
    }
    /// Group size.
    pub fn size(&self) -> usize {
        self.transport.size()
    }
    /// Tag for a message of `op` in this call.
    pub fn tag(&self, op: OpCode) -> Tag {
        Tag::new(op, self.seq)
    }
    /// Error context for `op` on this rank.
    pub fn ctx(&self, op: OpCode) -> Context {
        Context::new(op.name(), self.transport.group_name(), self.rank())
    }
}

/// Sums/reduces `buf` across all ranks in place.
pub fn all_reduce(c: &mut Comm<'_>, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
    let _ = (c, buf, dtype, op);
    todo!("collectives::all_reduce")
}

/// Copies root's `buf` to every rank.
pub fn broadcast(c: &mut Comm<'_>, buf: &mut [u8], root: usize) -> Result<()> {
    let _ = (c, buf, root);
    todo!("collectives::broadcast")
}

/// Concatenates every rank's `input` in rank order into `output`.
pub fn all_gather(c: &mut Comm<'_>, input: &[u8], output: &mut [u8]) -> Result<()> {
    let _ = (c, input, output);
    todo!("collectives::all_gather")
}

/// Concatenates every rank's `input` into root's `output`.
pub fn gather(c: &mut Comm<'_>, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()> {
    let _ = (c, input, output, root);
    todo!("collectives::gather")
}

/// Splits root's `input` into equal blocks, block `r` to rank `r`.
pub fn scatter(c: &mut Comm<'_>, input: Option<&[u8]>, output: &mut [u8], root: usize) -> Result<()> {
    let _ = (c, input, output, root);
    todo!("collectives::scatter")
}

/// Reduces every rank's `buf` into root's `buf`.
pub fn reduce(c: &mut Comm<'_>, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
    let _ = (c, buf, dtype, op, root);
    todo!("collectives::reduce")
}

/// Reduces block `r` of every rank's `input` into rank `r`'s `output`.
pub fn reduce_scatter(c: &mut Comm<'_>, input: &[u8], output: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
    let _ = (c, input, output, dtype, op);
    todo!("collectives::reduce_scatter")
}

/// Block `j` of rank `i`'s input goes to block `i` of rank `j`'s output.
pub fn all_to_all(c: &mut Comm<'_>, input: &[u8], output: &mut [u8]) -> Result<()> {
    let _ = (c, input, output);
    todo!("collectives::all_to_all")
}

/// Returns once every rank has entered the barrier.
pub fn barrier(c: &mut Comm<'_>) -> Result<()> {
    let _ = c;
    todo!("collectives::barrier")
}
