//! Scatter + ring all-gather broadcast (van de Geijn), for large messages.
//!
//! Terms: the buffer of `S` bytes is cut into `n` *blocks*, block `i` for
//! rank `i`, each cut into segments as in [`super::all_gather_ring`](mod@super::all_gather_ring).
//!
//! Steps: the root sends block `i` to rank `i` (direct scatter; `n - 1`
//! messages of `S / n`), then a ring all-gather gives every rank every
//! block. Blocks are copied, never recomputed.
//!
//! Bytes on the wire: the root sends `2 (n - 1) / n * S`, every other rank
//! receives `(n - 1) / n * S + S / n` and sends `(n - 1) / n * S`, so no
//! link carries much more than `2 S` however large `n`, against
//! `S * log2 n` out of the root of a binomial tree. Reference: Thakur,
//! Rabenseifner & Gropp, "Optimization of collective communication
//! operations in MPICH", IJHPCA 19(1), 2005 (long-message broadcast).

use super::all_gather_ring::ring_all_gather;
use super::util::Blocks;
use super::{Comm, SEGMENT_BYTES};
use crate::error::Result;
use crate::transport::OpCode;

/// Scatter + ring all-gather broadcast of `buf` from group rank `root`.
pub fn broadcast_scatter_all_gather(c: &mut Comm<'_>, buf: &mut [u8], root: usize) -> Result<()> {
    let n = c.size();
    super::check(c, OpCode::Broadcast).root(root)?;
    if n == 1 || buf.is_empty() {
        return Ok(());
    }
    let l = c.link(OpCode::Broadcast);
    let r = l.rank();
    let blocks = Blocks::new(buf.len(), n, 1, SEGMENT_BYTES);
    if r == root {
        for peer in (0..n).filter(|&p| p != root) {
            let b = blocks.block(peer);
            if !b.is_empty() {
                l.send(peer, &buf[b])?;
            }
        }
    } else {
        let b = blocks.block(r);
        if !b.is_empty() {
            l.recv(root, &mut buf[b])?;
        }
    }
    ring_all_gather(l, buf, &blocks, 0)
}
