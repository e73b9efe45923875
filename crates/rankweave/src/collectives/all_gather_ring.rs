//! Ring all_gather.
//!
//! Terms: the buffer is cut into `n` *blocks* (one per rank), each into the
//! same number of *segments* (see [`super::SEGMENT_BYTES`]); a *step* moves
//! one block one hop around the ring `r -> r+1`.
//!
//! Steps: rank `r` starts with block `(r + k) mod n` filled (`k` is the
//! ownership offset: 0 for all_gather, 1 after the ring reduce-scatter of
//! all_reduce). In step `s = 0..n-1` it sends block `(r + k - s) mod n` to
//! `r + 1` and receives block `(r + k - s - 1) mod n` from `r - 1` straight
//! into place. Every block is copied, never recomputed, so all ranks end
//! with the same bits.
//!
//! Bytes on the wire per rank: `(n - 1) / n * S` sent and received for a
//! result of `S` bytes, in `n - 1` steps; bandwidth-optimal. Reference:
//! Thakur, Rabenseifner & Gropp, "Optimization of collective communication
//! operations in MPICH", IJHPCA 19(1), 2005 (ring algorithm for allgather).

use super::util::{split_pair, sub_mod, Blocks, Link};
use super::{Comm, SEGMENT_BYTES};
use crate::error::{Error, Result};
use crate::transport::OpCode;

/// The ring all-gather over `buf` in place; rank `r` starts with block
/// `(r + k) mod n` and ends with every block.
pub(crate) fn ring_all_gather(l: Link<'_>, buf: &mut [u8], blocks: &Blocks, k: usize) -> Result<()> {
    let (r, n) = (l.rank(), l.size());
    if n == 1 {
        return Ok(());
    }
    let (right, left) = ((r + 1) % n, sub_mod(r, 1, n));
    for s in 0..n - 1 {
        let send_block = sub_mod(r + k + n, s, n);
        let recv_block = sub_mod(r + k + n, s + 1, n);
        for j in 0..blocks.segs {
            let (data, into) = split_pair(buf, blocks.seg(send_block, j), blocks.seg(recv_block, j));
            l.exchange(right, data, left, into)?;
        }
    }
    Ok(())
}

/// In-place ring all_gather: `buf` holds `n` equal blocks, block `rank`
/// filled by the caller; afterwards every block holds that rank's data.
pub fn all_gather_ring_inplace(c: &mut Comm<'_>, buf: &mut [u8]) -> Result<()> {
    let n = c.size();
    if buf.len() % n != 0 {
        return Err(Error::invalid(format!(
            "all_gather: in-place buffer of {} bytes does not split into {n} equal blocks",
            buf.len()
        )));
    }
    let blocks = Blocks::new(buf.len(), n, 1, SEGMENT_BYTES);
    ring_all_gather(c.link(OpCode::AllGather), buf, &blocks, 0)
}

/// Out-of-place ring all_gather: `output.len() == n * input.len()`.
pub fn all_gather_ring(c: &mut Comm<'_>, input: &[u8], output: &mut [u8]) -> Result<()> {
    super::check(c, OpCode::AllGather).len("output (size x input)", c.size() * input.len(), output.len())?;
    let r = c.rank();
    output[r * input.len()..(r + 1) * input.len()].copy_from_slice(input);
    all_gather_ring_inplace(c, output)
}
