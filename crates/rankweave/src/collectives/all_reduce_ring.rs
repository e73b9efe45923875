//! Ring all_reduce: ring reduce-scatter, then ring all-gather.
//!
//! Terms: the buffer of `S` bytes is cut into `n` element-aligned *blocks*
//! (sizes differ by at most one element, so any length works, including
//! lengths not divisible by `n` and fewer elements than ranks, where some
//! blocks are empty); each block is cut into the same number of *segments*
//! of at most `segment_bytes` ([`super::SEGMENT_BYTES`] by default).
//!
//! Steps: `n - 1` reduce-scatter steps (see [`super::reduce_scatter_ring`](mod@super::reduce_scatter_ring))
//! leave rank `r` with the full reduction of block `(r + 1) mod n`; the Avg
//! divide is applied once to that block; `n - 1` all-gather steps (see
//! [`super::all_gather_ring`](mod@super::all_gather_ring)) copy every finished block to every rank.
//! Each block is reduced by exactly one chain of ranks in one fixed order
//! and then only copied, so the result is bitwise identical on every rank.
//! Segments pipeline each step through the transport's buffers.
//!
//! Bytes on the wire per rank: `2 (n - 1) / n * S` sent and as many
//! received, in `2 (n - 1)` steps: bandwidth-optimal (Patarasuk & Yuan,
//! "Bandwidth optimal all-reduce algorithms for clusters of workstations",
//! JPDC 69(2), 2009). Used above [`super::SMALL_MESSAGE_BYTES`].

use super::all_gather_ring::ring_all_gather;
use super::reduce_scatter_ring::ring_reduce_scatter;
use super::util::{scratch, Blocks};
use super::{Comm, SEGMENT_BYTES};
use crate::dtype::DType;
use crate::error::Result;
use crate::reduce::{finish_avg, ReduceOp};
use crate::transport::OpCode;

/// Ring all_reduce of `buf` in place with segments of at most
/// `segment_bytes` (rounded to whole elements).
pub fn all_reduce_ring_with(
    c: &mut Comm<'_>,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
    segment_bytes: usize,
) -> Result<()> {
    super::check(c, OpCode::AllReduce).elems(buf.len(), dtype)?;
    let n = c.size();
    let blocks = Blocks::new(buf.len(), n, dtype.size(), segment_bytes);
    let l = c.link(OpCode::AllReduce);
    let tmp = scratch(c.scratch, blocks.max_seg_bytes());
    ring_reduce_scatter(l, buf, &blocks, 1, dtype, op, tmp)?;
    if op == ReduceOp::Avg {
        finish_avg(&mut buf[blocks.block((c.rank() + 1) % n)], dtype, n);
    }
    ring_all_gather(l, buf, &blocks, 1)
}

/// Ring all_reduce of `buf` in place with [`SEGMENT_BYTES`] segments.
pub fn all_reduce_ring(c: &mut Comm<'_>, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
    all_reduce_ring_with(c, buf, dtype, op, SEGMENT_BYTES)
}
