//! Ring reduce-scatter.
//!
//! Terms: the buffer is cut into `n` element-aligned *blocks* (one per rank,
//! sizes differing by at most one element); each block is cut into the same
//! number of *segments* of at most [`super::SEGMENT_BYTES`]. A *step* moves
//! one block (segment by segment) one hop around the ring `r -> r+1`.
//!
//! Steps: in step `s = 0..n-1` rank `r` sends its partial sum of block
//! `(r + k - 1 - s) mod n` to `r + 1` and receives the partial sum of block
//! `(r + k - 2 - s) mod n` from `r - 1`, combining it into its own copy
//! (`own op partial`) segment by segment. After `n - 1` steps rank `r` holds
//! the full reduction of block `(r + k) mod n`; `k` is the *ownership
//! offset* (0 for reduce_scatter, 1 inside the ring all_reduce).
//!
//! Each block's reduction runs along one chain of ranks, computed exactly
//! once, so its bits do not depend on which rank later reads it. Segments
//! pipeline the step: while rank `r` reduces segment `j`, its neighbour is
//! already writing segment `j + 1` into the transport.
//!
//! Bytes on the wire per rank: `(n - 1) / n * S` sent and received, for a
//! buffer of `S` bytes; `n - 1` steps of latency. This is the first half of
//! the bandwidth-optimal all_reduce of Patarasuk & Yuan, "Bandwidth optimal
//! all-reduce algorithms for clusters of workstations", JPDC 69(2), 2009;
//! see also Thakur, Rabenseifner & Gropp, "Optimization of collective
//! communication operations in MPICH", IJHPCA 19(1), 2005.

use super::util::{scratch, sub_mod, Blocks, Link};
use super::{Comm, SEGMENT_BYTES};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::reduce::{finish_avg, reduce_into, ReduceOp};
use crate::transport::OpCode;

/// The ring reduce-scatter over `buf` in place: afterwards block
/// `(rank + k) mod n` of `buf` (by `blocks`) holds the reduction over all
/// ranks (without the Avg divide); other blocks hold partial values.
/// `tmp` must hold at least `blocks.max_seg_bytes()` bytes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn ring_reduce_scatter(
    l: Link<'_>,
    buf: &mut [u8],
    blocks: &Blocks,
    k: usize,
    dtype: DType,
    op: ReduceOp,
    tmp: &mut [u8],
) -> Result<()> {
    let (r, n) = (l.rank(), l.size());
    if n == 1 {
        return Ok(());
    }
    let (right, left) = ((r + 1) % n, sub_mod(r, 1, n));
    for s in 0..n - 1 {
        let send_block = sub_mod(r + k + n, 1 + s, n);
        let recv_block = sub_mod(r + k + n, 2 + s, n);
        for j in 0..blocks.segs {
            let sr = blocks.seg(send_block, j);
            let rr = blocks.seg(recv_block, j);
            let t = &mut tmp[..rr.len()];
            l.exchange(right, &buf[sr], left, t)?;
            reduce_into(&mut buf[rr], t, dtype, op);
        }
    }
    Ok(())
}

/// Ring reduce-scatter in place with an explicit segment size: `buf` holds
/// `n` equal blocks; afterwards block `rank` of `buf` holds the reduction of
/// block `rank` over all ranks (Avg divided); the other blocks are left with
/// partial values.
pub fn reduce_scatter_ring_inplace_with(
    c: &mut Comm<'_>,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
    segment_bytes: usize,
) -> Result<()> {
    let n = c.size();
    super::check(c, OpCode::ReduceScatter).elems(buf.len(), dtype)?;
    if buf.len() % (n * dtype.size()) != 0 {
        return Err(Error::invalid(format!(
            "reduce_scatter: buffer of {} bytes does not split into {n} blocks of whole {dtype} elements",
            buf.len()
        )));
    }
    let blocks = Blocks::new(buf.len(), n, dtype.size(), segment_bytes);
    let l = c.link(OpCode::ReduceScatter);
    let tmp = scratch(c.scratch, blocks.max_seg_bytes());
    ring_reduce_scatter(l, buf, &blocks, 0, dtype, op, tmp)?;
    if op == ReduceOp::Avg {
        finish_avg(&mut buf[blocks.block(c.rank())], dtype, n);
    }
    Ok(())
}

/// [`reduce_scatter_ring_inplace_with`] with [`SEGMENT_BYTES`] segments.
pub fn reduce_scatter_ring_inplace(c: &mut Comm<'_>, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
    reduce_scatter_ring_inplace_with(c, buf, dtype, op, SEGMENT_BYTES)
}

/// Out-of-place ring reduce-scatter: copies `input` (`n * output.len()`
/// bytes) into scratch, reduces there and copies block `rank` to `output`.
pub fn reduce_scatter_ring(
    c: &mut Comm<'_>,
    input: &[u8],
    output: &mut [u8],
    dtype: DType,
    op: ReduceOp,
) -> Result<()> {
    let n = c.size();
    super::check_reduce_scatter(c, input.len(), output.len(), dtype)?;
    let blocks = Blocks::new(input.len(), n, dtype.size(), SEGMENT_BYTES);
    let l = c.link(OpCode::ReduceScatter);
    let space = scratch(c.scratch, input.len() + blocks.max_seg_bytes());
    let (work, tmp) = space.split_at_mut(input.len());
    work.copy_from_slice(input);
    ring_reduce_scatter(l, work, &blocks, 0, dtype, op, tmp)?;
    output.copy_from_slice(&work[blocks.block(l.rank())]);
    if op == ReduceOp::Avg {
        finish_avg(output, dtype, n);
    }
    Ok(())
}
