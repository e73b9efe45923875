//! Binomial-tree reduce, for small messages.
//!
//! Terms: ranks are renumbered relative to the root, `v = (r - root) mod n`;
//! the tree is the broadcast tree of [`super::broadcast_tree`](mod@super::broadcast_tree) run upwards.
//!
//! Steps: with `mask = 1, 2, 4, ...`: a rank whose `v` has bit `mask` set
//! sends its partial result to `v - mask` and is done; otherwise, if
//! `v + mask < n`, it receives that child's partial result and combines it
//! (`own op child`). After `ceil(log2 n)` rounds the root holds the result.
//!
//! Bytes on the wire: `S` sent per non-root rank, `S * ceil(log2 n)` at most
//! received by the root. Large messages use [`super::reduce_ring`](mod@super::reduce_ring).
//! Non-root buffers are used as accumulators and hold partial values
//! afterwards. Reference: Thakur, Rabenseifner & Gropp, "Optimization of
//! collective communication operations in MPICH", IJHPCA 19(1), 2005.

use super::util::scratch;
use super::Comm;
use crate::dtype::DType;
use crate::error::Result;
use crate::reduce::{finish_avg, reduce_into, ReduceOp};
use crate::transport::OpCode;

/// Binomial-tree reduce of every rank's `buf` into root's `buf`.
pub fn reduce_tree(c: &mut Comm<'_>, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
    let n = c.size();
    super::check(c, OpCode::Reduce).root(root)?;
    super::check(c, OpCode::Reduce).elems(buf.len(), dtype)?;
    if n == 1 || buf.is_empty() {
        return Ok(());
    }
    let l = c.link(OpCode::Reduce);
    let tmp = scratch(c.scratch, buf.len());
    let v = (l.rank() + n - root) % n;
    let real = |v: usize| (v + root) % n;
    let mut mask = 1;
    while mask < n {
        if v & mask != 0 {
            return l.send(real(v - mask), buf);
        }
        if v + mask < n {
            l.recv(real(v + mask), tmp)?;
            reduce_into(buf, tmp, dtype, op);
        }
        mask <<= 1;
    }
    if op == ReduceOp::Avg {
        finish_avg(buf, dtype, n);
    }
    Ok(())
}
