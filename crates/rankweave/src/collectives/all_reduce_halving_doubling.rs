//! Recursive-halving / recursive-doubling all_reduce (Rabenseifner), for
//! medium and large messages on a power-of-two number of ranks.
//!
//! Terms: the buffer of `S` bytes is cut into `n` element-aligned *blocks*
//! as for the ring (block `i` ends up reduced by rank `i`). A *range* is a
//! run of consecutive blocks; at a step with distance `m` (a power of two)
//! rank `r` pairs with `r ^ m`.
//!
//! Steps:
//! 1. Reduce-scatter by recursive halving, `m = n/2, n/4, ..., 1`: rank `r`
//!    owns the range of the `2m` blocks that share its bits above `m`; it
//!    keeps the half its own bit `m` selects, sends the other half to its
//!    partner and receives the partner's partial values of the half it
//!    keeps, combining them as `lower rank op higher rank`. After `log2 n`
//!    steps rank `r` holds the full reduction of block `r`, computed once
//!    (the Avg divide is applied to it there).
//! 2. All-gather by recursive doubling, `m = 1, 2, ..., n/2`: partners swap
//!    the ranges they hold, straight into place; every block is copied,
//!    never recomputed, so every rank ends with the same bits.
//!
//! Each exchange is cut into pieces of at most [`super::SEGMENT_BYTES`], so
//! the scratch space stays one segment and a rank reduces one piece while
//! the next is in flight.
//!
//! Bytes on the wire per rank: `2 (n - 1) / n * S` sent and as many
//! received, the same as the ring, in `2 log2 n` steps instead of
//! `2 (n - 1)` (4 instead of 6 at `n = 4`). Reference: Thakur, Rabenseifner
//! & Gropp, "Optimization of collective communication operations in MPICH",
//! IJHPCA 19(1), 2005 (Rabenseifner's algorithm).

use super::util::{scratch, split, split_pair, Blocks, Link};
use super::{Comm, SEGMENT_BYTES};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::reduce::{finish_avg, reduce_into, ReduceOp};
use crate::transport::OpCode;
use std::ops::Range;

/// Byte range of blocks `first .. first + count`.
fn range(blocks: &Blocks, first: usize, count: usize) -> Range<usize> {
    blocks.block(first).start..blocks.block(first + count - 1).end
}

/// Piece `i` of `parts` of byte range `r`, element-aligned.
fn piece(r: &Range<usize>, es: usize, parts: usize, i: usize) -> Range<usize> {
    let (s, l) = split(r.len() / es, parts, i);
    r.start + s * es..r.start + (s + l) * es
}

/// Pieces both partners cut the exchange of ranges `a` and `b` into (the
/// same number on both sides, whichever range each sends).
fn pieces(a: &Range<usize>, b: &Range<usize>) -> usize {
    a.len().max(b.len()).div_ceil(SEGMENT_BYTES).max(1)
}

/// The halving/doubling all_reduce of `buf` in place on a power-of-two
/// group (Avg divide included); `tmp` holds at least one piece
/// ([`SEGMENT_BYTES`] plus an element).
fn halving_doubling(l: Link<'_>, buf: &mut [u8], dtype: DType, op: ReduceOp, tmp: &mut [u8]) -> Result<()> {
    let (r, n) = (l.rank(), l.size());
    let es = dtype.size();
    let blocks = Blocks::new(buf.len(), n, es, SEGMENT_BYTES);
    let mut m = n / 2;
    while m >= 1 {
        let peer = r ^ m;
        let keep = range(&blocks, r & !(m - 1), m);
        let give = range(&blocks, peer & !(m - 1), m);
        let parts = pieces(&keep, &give);
        for i in 0..parts {
            let (g, k) = (piece(&give, es, parts, i), piece(&keep, es, parts, i));
            let t = &mut tmp[..k.len()];
            l.exchange(peer, &buf[g], peer, t)?;
            let own = &mut buf[k];
            if r < peer {
                reduce_into(own, t, dtype, op);
            } else {
                reduce_into(t, own, dtype, op);
                own.copy_from_slice(t);
            }
        }
        m /= 2;
    }
    if op == ReduceOp::Avg {
        finish_avg(&mut buf[blocks.block(r)], dtype, n);
    }
    let mut m = 1;
    while m < n {
        let peer = r ^ m;
        let have = range(&blocks, r & !(m - 1), m);
        let get = range(&blocks, peer & !(m - 1), m);
        let parts = pieces(&have, &get);
        for i in 0..parts {
            let (data, into) = split_pair(buf, piece(&have, es, parts, i), piece(&get, es, parts, i));
            l.exchange(peer, data, peer, into)?;
        }
        m *= 2;
    }
    Ok(())
}

/// Halving/doubling all_reduce of `buf` in place (Avg included). The group
/// size must be a power of two ([`Error::InvalidArgument`] otherwise).
pub fn all_reduce_halving_doubling(c: &mut Comm<'_>, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
    super::check(c, OpCode::AllReduce).elems(buf.len(), dtype)?;
    let n = c.size();
    if !n.is_power_of_two() {
        return Err(Error::invalid(format!(
            "all_reduce: halving/doubling needs a power-of-two group, this one has {n} ranks"
        )));
    }
    if n == 1 || buf.is_empty() {
        return Ok(());
    }
    let l = c.link(OpCode::AllReduce);
    let tmp = scratch(c.scratch, SEGMENT_BYTES.div_ceil(dtype.size()) * dtype.size() + dtype.size());
    halving_doubling(l, buf, dtype, op, tmp)
}
