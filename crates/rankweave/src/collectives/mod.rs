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
//!
//! Algorithms (one file each, each documenting its steps and bytes on the
//! wire): below [`SMALL_MESSAGE_BYTES`] the latency-optimal ones (recursive
//! doubling all_reduce, binomial trees for broadcast and reduce), at and above
//! it the bandwidth-optimal ones (ring all_reduce = ring reduce-scatter + ring
//! all-gather, or recursive halving + doubling on a power-of-two group of
//! more than two ranks; scatter + all-gather broadcast, and from
//! [`CHAIN_BROADCAST_BYTES`] a pipelined chain; ring reduce), pipelined in
//! segments of [`SEGMENT_BYTES`]. all_gather uses Bruck's algorithm when small
//! and a ring otherwise; reduce_scatter a ring (recursive doubling on a copy
//! when small); gather and
//! scatter go direct, all_to_all uses pairwise exchange and barrier the
//! dissemination algorithm. Every front door validates lengths
//! ([`crate::Error::InvalidArgument`] with expected vs actual), and returns at once
//! for a single rank (copying where input and output differ). An empty
//! buffer still takes part: its ranks meet in a barrier whose messages carry
//! the call's descriptor ([`Comm::desc`]), so a peer that called the same
//! collective with data is reported as a mismatch, not left waiting.
//!
//! Results are bitwise identical on every rank: every reduced value is
//! computed once by one rank and copied (ring), or by both partners from the
//! same operands in the same order (recursive doubling).

use crate::dtype::DType;
use crate::error::{Context, Result};
use crate::reduce::ReduceOp;
use crate::transport::{OpCode, OpDesc, Tag, Transport};
use crate::validate::Check;
use std::time::Instant;

mod util;

pub mod shm;

pub mod all_gather_bruck;
pub mod all_gather_ring;
pub mod all_reduce_halving_doubling;
pub mod all_reduce_recursive_doubling;
pub mod all_reduce_ring;
pub mod all_to_all_pairwise;
pub mod barrier_dissemination;
pub mod broadcast_chain;
pub mod broadcast_scatter_all_gather;
pub mod broadcast_tree;
pub mod gather_direct;
pub mod reduce_ring;
pub mod reduce_scatter_ring;
pub mod reduce_tree;
pub mod scatter_direct;

pub use all_gather_bruck::{all_gather_bruck, all_gather_bruck_inplace};
pub use all_gather_ring::{all_gather_ring, all_gather_ring_inplace};
pub use all_reduce_halving_doubling::all_reduce_halving_doubling;
pub use all_reduce_recursive_doubling::all_reduce_recursive_doubling;
pub use all_reduce_ring::{all_reduce_ring, all_reduce_ring_with};
pub use all_to_all_pairwise::all_to_all_pairwise;
pub use barrier_dissemination::barrier_dissemination;
pub use broadcast_chain::{broadcast_chain, chain_segment_bytes};
pub use broadcast_scatter_all_gather::broadcast_scatter_all_gather;
pub use broadcast_tree::broadcast_tree;
pub use gather_direct::gather_direct;
pub use reduce_ring::reduce_ring;
pub use reduce_scatter_ring::{reduce_scatter_ring, reduce_scatter_ring_inplace, reduce_scatter_ring_inplace_with};
pub use reduce_tree::reduce_tree;
pub use scatter_direct::scatter_direct;

/// Messages below this many bytes take the latency-optimal algorithms
/// (recursive doubling, binomial trees); larger ones the bandwidth-optimal
/// rings. At 32 KiB a message costs about as much to move as the extra
/// `2 (n - 1)` latencies of a ring over loopback TCP (tens of microseconds
/// each), so below it latency dominates and above it bandwidth does.
pub const SMALL_MESSAGE_BYTES: usize = 32 * 1024;

/// Broadcasts of at least this many bytes on three or more ranks take the
/// pipelined chain ([`broadcast_chain()`]); from [`SMALL_MESSAGE_BYTES`] up to
/// it, scatter + all-gather.
pub const CHAIN_BROADCAST_BYTES: usize = 512 * 1024;

/// The ring algorithms move each block in segments of at most this many
/// bytes, so a rank reduces one segment while the next is in flight. Small
/// enough to sit in a socket buffer, large enough that per-message overhead
/// (header, syscalls) stays below 1%.
pub const SEGMENT_BYTES: usize = 512 * 1024;

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
    /// The call's descriptor, carried by every message of the call and
    /// checked by every receiver ([`OpDesc::NONE`]: tag and length only).
    pub desc: OpDesc,
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
        Tag::new(op, self.seq).with_desc(self.desc)
    }
    /// Error context for `op` on this rank.
    pub fn ctx(&self, op: OpCode) -> Context {
        Context::new(op.name(), self.transport.group_name(), self.rank())
    }
    /// The transport, tag and deadline for `op`, free of the scratch borrow.
    pub(crate) fn link(&self, op: OpCode) -> util::Link<'a> {
        util::Link { t: self.transport, tag: self.tag(op), deadline: self.deadline }
    }
}

/// Reduces `buf` across all ranks in place; every rank gets the same bits.
pub fn all_reduce(c: &mut Comm<'_>, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
    check(c, OpCode::AllReduce).elems(buf.len(), dtype)?;
    if c.size() == 1 {
        return Ok(());
    }
    if buf.is_empty() {
        return empty_call(c);
    }
    // Halving/doubling moves the ring's bytes in 2 log2 n steps instead of
    // 2 (n - 1): fewer hand-overs wherever n is a power of two above 2.
    match (buf.len() < SMALL_MESSAGE_BYTES, c.size() > 2 && c.size().is_power_of_two()) {
        (true, _) => all_reduce_recursive_doubling(c, buf, dtype, op),
        (false, true) => all_reduce_halving_doubling(c, buf, dtype, op),
        (false, false) => all_reduce_ring(c, buf, dtype, op),
    }
}

/// Copies root's `buf` to every rank.
pub fn broadcast(c: &mut Comm<'_>, buf: &mut [u8], root: usize) -> Result<()> {
    check(c, OpCode::Broadcast).root(root)?;
    if c.size() == 1 {
        return Ok(());
    }
    if buf.is_empty() {
        return empty_call(c);
    }
    // With two ranks the tree is one message, already optimal. Large
    // messages take the pipelined chain, which moves fewer bytes than
    // scatter + all-gather (see broadcast_chain).
    match (c.size() > 2, buf.len()) {
        (true, len) if len >= CHAIN_BROADCAST_BYTES => broadcast_chain(c, buf, root),
        (true, len) if len >= SMALL_MESSAGE_BYTES => broadcast_scatter_all_gather(c, buf, root),
        _ => broadcast_tree(c, buf, root),
    }
}

/// Concatenates every rank's `input` in rank order into `output`.
pub fn all_gather(c: &mut Comm<'_>, input: &[u8], output: &mut [u8]) -> Result<()> {
    check(c, OpCode::AllGather).len("output (size x input)", c.size() * input.len(), output.len())?;
    if c.size() == 1 {
        output.copy_from_slice(input);
        return Ok(());
    }
    if input.is_empty() {
        return empty_call(c);
    }
    match output.len() < SMALL_MESSAGE_BYTES {
        true => all_gather_bruck(c, input, output),
        false => all_gather_ring(c, input, output),
    }
}

/// In-place all_gather: `buf` holds `n` equal blocks and this rank filled
/// block `rank`; afterwards every block holds its rank's data.
pub fn all_gather_inplace(c: &mut Comm<'_>, buf: &mut [u8]) -> Result<()> {
    if c.size() == 1 || buf.is_empty() {
        return Ok(());
    }
    match buf.len() < SMALL_MESSAGE_BYTES {
        true => all_gather_bruck_inplace(c, buf),
        false => all_gather_ring_inplace(c, buf),
    }
}

/// Concatenates every rank's `input` into root's `output`.
pub fn gather(c: &mut Comm<'_>, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()> {
    check(c, OpCode::Gather).root(root)?;
    if c.size() > 1 && input.is_empty() {
        return empty_call(c);
    }
    gather_direct(c, input, output, root)
}

/// Splits root's `input` into equal blocks, block `r` to rank `r`.
pub fn scatter(c: &mut Comm<'_>, input: Option<&[u8]>, output: &mut [u8], root: usize) -> Result<()> {
    check(c, OpCode::Scatter).root(root)?;
    if c.size() > 1 && output.is_empty() {
        return empty_call(c);
    }
    scatter_direct(c, input, output, root)
}

/// Reduces every rank's `buf` into root's `buf`. Other ranks' buffers are
/// used as workspace and hold unspecified (partial) values afterwards.
pub fn reduce(c: &mut Comm<'_>, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
    check(c, OpCode::Reduce).root(root)?;
    check(c, OpCode::Reduce).elems(buf.len(), dtype)?;
    if c.size() == 1 {
        return Ok(());
    }
    if buf.is_empty() {
        return empty_call(c);
    }
    match buf.len() < SMALL_MESSAGE_BYTES {
        true => reduce_tree(c, buf, dtype, op, root),
        false => reduce_ring(c, buf, dtype, op, root),
    }
}

/// Reduces block `r` of every rank's `input` into rank `r`'s `output`.
pub fn reduce_scatter(c: &mut Comm<'_>, input: &[u8], output: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
    let n = c.size();
    check_reduce_scatter(c, input.len(), output.len(), dtype)?;
    if n == 1 {
        output.copy_from_slice(input);
        return Ok(());
    }
    if input.is_empty() {
        return empty_call(c);
    }
    if input.len() >= SMALL_MESSAGE_BYTES {
        return reduce_scatter_ring(c, input, output, dtype, op);
    }
    // Small: all_reduce a copy by recursive doubling (log2 n rounds instead
    // of the ring's n - 1) and keep this rank's block.
    let l = c.link(OpCode::ReduceScatter);
    let space = util::scratch(c.scratch, 2 * input.len());
    let (work, tmp) = space.split_at_mut(input.len());
    work.copy_from_slice(input);
    all_reduce_recursive_doubling::recursive_doubling(l, work, dtype, op, tmp)?;
    let r = l.rank();
    output.copy_from_slice(&work[r * output.len()..(r + 1) * output.len()]);
    if op == ReduceOp::Avg {
        crate::reduce::finish_avg(output, dtype, n);
    }
    Ok(())
}

/// In-place reduce_scatter: `buf` holds `n` equal blocks; afterwards block
/// `rank` holds the reduction of that block over all ranks. The other
/// blocks hold unspecified (partial) values.
pub fn reduce_scatter_inplace(c: &mut Comm<'_>, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
    let n = c.size();
    check(c, OpCode::ReduceScatter).elems(buf.len(), dtype)?;
    check(c, OpCode::ReduceScatter).blocks(buf.len(), Some(dtype))?;
    if n == 1 || buf.is_empty() {
        return Ok(());
    }
    if buf.len() >= SMALL_MESSAGE_BYTES {
        return reduce_scatter_ring_inplace(c, buf, dtype, op);
    }
    let l = c.link(OpCode::ReduceScatter);
    let tmp = util::scratch(c.scratch, buf.len());
    all_reduce_recursive_doubling::recursive_doubling(l, buf, dtype, op, tmp)?;
    if op == ReduceOp::Avg {
        let s = buf.len() / n;
        let r = c.rank();
        crate::reduce::finish_avg(&mut buf[r * s..(r + 1) * s], dtype, n);
    }
    Ok(())
}

/// Block `j` of rank `i`'s input goes to block `i` of rank `j`'s output.
pub fn all_to_all(c: &mut Comm<'_>, input: &[u8], output: &mut [u8]) -> Result<()> {
    check_all_to_all(c, input.len(), output.len())?;
    if c.size() == 1 {
        output.copy_from_slice(input);
        return Ok(());
    }
    if input.is_empty() {
        return empty_call(c);
    }
    all_to_all_pairwise(c, input, output)
}

/// A call with nothing to move still takes part: its ranks meet in a
/// barrier whose messages carry the call's descriptor, so a peer that
/// called the same collective with data (or anything else) is reported as
/// a mismatch on both sides instead of leaving one rank waiting.
fn empty_call(c: &mut Comm<'_>) -> Result<()> {
    barrier_dissemination(c)
}

/// Returns once every rank has entered the barrier.
pub fn barrier(c: &mut Comm<'_>) -> Result<()> {
    if c.size() == 1 {
        return Ok(());
    }
    barrier_dissemination(c)
}

/// The checks of `op` in `c`'s group ([`crate::validate`], the same
/// checks and wording as the group's).
pub(crate) fn check<'a>(c: &'a Comm<'_>, op: OpCode) -> Check<'a> {
    Check { op: op.name(), group: c.transport.group_name(), rank: c.rank(), size: c.size() }
}

/// `input == n * output`, whole elements.
pub(crate) fn check_reduce_scatter(c: &Comm<'_>, input: usize, output: usize, dtype: DType) -> Result<()> {
    let check = check(c, OpCode::ReduceScatter);
    check.elems(output, dtype)?;
    check.len("input (size x output)", c.size() * output, input)
}

/// Equal lengths, divisible by `n`.
pub(crate) fn check_all_to_all(c: &Comm<'_>, input: usize, output: usize) -> Result<()> {
    let check = check(c, OpCode::AllToAll);
    check.len("output (same as input)", input, output)?;
    check.blocks(input, None)
}
