//! Binomial-tree broadcast, for small messages and two ranks.
//!
//! Terms: ranks are renumbered relative to the root, `v = (r - root) mod n`.
//! The *parent* of `v > 0` is `v` with its lowest set bit cleared; its
//! *children* are `v + 2^i` (while below `n`) for every `2^i` smaller than
//! that lowest bit (every `2^i < n` for the root).
//!
//! Steps: a rank receives the whole buffer from its parent, then sends it to
//! its children, largest subtree first. The data reaches every rank after
//! `ceil(log2 n)` rounds.
//!
//! Bytes on the wire: `S` received per non-root rank; the root sends
//! `S * ceil(log2 n)`. Large messages on three or more ranks use
//! [`super::broadcast_scatter_all_gather`](mod@super::broadcast_scatter_all_gather) instead. Reference: Thakur,
//! Rabenseifner & Gropp, "Optimization of collective communication
//! operations in MPICH", IJHPCA 19(1), 2005 (binomial tree broadcast).

use super::util::Link;
use super::Comm;
use crate::error::Result;
use crate::transport::OpCode;

/// Binomial-tree broadcast of `buf` from `root`.
pub(crate) fn binomial_broadcast(l: Link<'_>, buf: &mut [u8], root: usize) -> Result<()> {
    let (r, n) = (l.rank(), l.size());
    if n == 1 || buf.is_empty() {
        return Ok(());
    }
    let v = (r + n - root) % n;
    let real = |v: usize| (v + root) % n;
    let mut mask = 1;
    while mask < n {
        if v & mask != 0 {
            l.recv(real(v - mask), buf)?;
            break;
        }
        mask <<= 1;
    }
    mask >>= 1;
    while mask > 0 {
        if v + mask < n {
            l.send(real(v + mask), buf)?;
        }
        mask >>= 1;
    }
    Ok(())
}

/// Binomial-tree broadcast of `buf` from group rank `root`.
pub fn broadcast_tree(c: &mut Comm<'_>, buf: &mut [u8], root: usize) -> Result<()> {
    super::check(c, OpCode::Broadcast).root(root)?;
    binomial_broadcast(c.link(OpCode::Broadcast), buf, root)
}
