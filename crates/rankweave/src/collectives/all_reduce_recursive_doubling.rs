//! Recursive-doubling all_reduce, for small messages.
//!
//! Terms: `p` is the largest power of two `<= n`; the `e = n - p` *extra*
//! ranks are the even ranks below `2e`. A *round* pairs each of the `p`
//! remaining ranks with the rank whose *virtual rank* differs in one bit.
//!
//! Steps:
//! 1. Fold: each extra rank `2i` sends its buffer to `2i + 1`, which combines
//!    it into its own; the extras then wait for the result.
//! 2. `log2 p` rounds: with `mask = 1, 2, 4, ...` each remaining rank swaps
//!    its whole buffer with virtual partner `v ^ mask` and both compute
//!    `lower op higher` (the operand of the lower virtual rank on the left).
//!    Both partners combine the same two values in the same order, so after
//!    every round each pair, then each group of four, ... holds identical
//!    bits, and at the end all `p` ranks do.
//! 3. Unfold: rank `2i + 1` sends the result to `2i` (a copy, same bits).
//!
//! Bytes on the wire per rank: `S * log2 p` (plus `S` twice on folded pairs)
//! in `log2 p` (+2) rounds: latency-optimal, so it is used below
//! [`super::SMALL_MESSAGE_BYTES`]. Reference: Thakur, Rabenseifner & Gropp,
//! "Optimization of collective communication operations in MPICH", IJHPCA
//! 19(1), 2005 (recursive doubling, and the fold for non-powers of two).

use super::util::{scratch, Link};
use super::Comm;
use crate::dtype::DType;
use crate::error::Result;
use crate::reduce::{finish_avg, reduce_into, ReduceOp};
use crate::transport::OpCode;

/// Recursive-doubling all_reduce of `buf` in place; `tmp` must be at least
/// `buf.len()` bytes. No Avg divide.
pub(crate) fn recursive_doubling(
    l: Link<'_>,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
    tmp: &mut [u8],
) -> Result<()> {
    let (r, n) = (l.rank(), l.size());
    if n == 1 || buf.is_empty() {
        return Ok(());
    }
    let tmp = &mut tmp[..buf.len()];
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let extra = n - p;
    // Fold the extras into their odd neighbours.
    let v = if r < 2 * extra {
        if r % 2 == 0 {
            l.send(r + 1, buf)?;
            return l.recv(r + 1, buf);
        }
        l.recv(r - 1, tmp)?;
        // Lower rank's operand first.
        reduce_into(tmp, buf, dtype, op);
        buf.copy_from_slice(tmp);
        r / 2
    } else {
        r - extra
    };
    let real = |v: usize| if v < extra { 2 * v + 1 } else { v + extra };
    let mut mask = 1;
    while mask < p {
        let pv = v ^ mask;
        let peer = real(pv);
        l.exchange(peer, buf, peer, tmp)?;
        if v < pv {
            reduce_into(buf, tmp, dtype, op);
        } else {
            reduce_into(tmp, buf, dtype, op);
            buf.copy_from_slice(tmp);
        }
        mask <<= 1;
    }
    if r < 2 * extra {
        l.send(r - 1, buf)?;
    }
    Ok(())
}

/// Recursive-doubling all_reduce of `buf` in place (any size; chosen by
/// [`super::all_reduce`] for small buffers).
pub fn all_reduce_recursive_doubling(c: &mut Comm<'_>, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
    super::check(c, OpCode::AllReduce).elems(buf.len(), dtype)?;
    let l = c.link(OpCode::AllReduce);
    let tmp = scratch(c.scratch, buf.len());
    recursive_doubling(l, buf, dtype, op, tmp)?;
    if op == ReduceOp::Avg {
        finish_avg(buf, dtype, c.size());
    }
    Ok(())
}
