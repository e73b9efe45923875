//! Ring reduce-scatter + gather reduce, for large messages.
//!
//! Terms: blocks and segments as in [`super::reduce_scatter_ring`](mod@super::reduce_scatter_ring).
//!
//! Steps: a ring reduce-scatter with ownership offset 1 leaves rank `r`
//! with the full reduction of block `(r + 1) mod n`; every non-root rank
//! then sends that block to the root, which receives each straight into
//! place (Rabenseifner's reduce, with a direct gather).
//!
//! Bytes on the wire: `(n - 1) / n * S` per rank in the reduce-scatter plus
//! `S / n` per rank into the root: about `2 S` into the root however large
//! `n`, and the reduction work is spread over all ranks. Non-root buffers
//! are used as workspace and hold partial values afterwards. Reference:
//! Rabenseifner, "Optimization of collective reduction operations", ICCS
//! 2004; Thakur, Rabenseifner & Gropp, IJHPCA 19(1), 2005.

use super::reduce_scatter_ring::ring_reduce_scatter;
use super::util::{scratch, Blocks};
use super::{Comm, SEGMENT_BYTES};
use crate::dtype::DType;
use crate::error::Result;
use crate::reduce::{finish_avg, ReduceOp};
use crate::transport::OpCode;

/// Ring reduce-scatter + gather reduce of every rank's `buf` into root's.
pub fn reduce_ring(c: &mut Comm<'_>, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
    let n = c.size();
    super::check(c, OpCode::Reduce).root(root)?;
    super::check(c, OpCode::Reduce).elems(buf.len(), dtype)?;
    if n == 1 || buf.is_empty() {
        return Ok(());
    }
    let blocks = Blocks::new(buf.len(), n, dtype.size(), SEGMENT_BYTES);
    let l = c.link(OpCode::Reduce);
    let r = l.rank();
    let tmp = scratch(c.scratch, blocks.max_seg_bytes());
    ring_reduce_scatter(l, buf, &blocks, 1, dtype, op, tmp)?;
    if r != root {
        let b = blocks.block((r + 1) % n);
        return if b.is_empty() { Ok(()) } else { l.send(root, &buf[b]) };
    }
    for peer in (0..n).filter(|&p| p != root) {
        let b = blocks.block((peer + 1) % n);
        if !b.is_empty() {
            l.recv(peer, &mut buf[b])?;
        }
    }
    if op == ReduceOp::Avg {
        finish_avg(buf, dtype, n);
    }
    Ok(())
}
