//! Pipelined chain broadcast, for large messages on three or more ranks.
//!
//! Terms: ranks are renumbered relative to the root, `v = (r - root) mod n`,
//! and form the chain `0 -> 1 -> ... -> n - 1`. The buffer of `S` bytes is
//! cut into `k` *segments* of about [`chain_segment_bytes`]`(S)` bytes.
//!
//! Steps: the root sends segment `0`, `1`, ... to `v = 1`; every middle
//! rank receives segment `0`, then, while it receives segment `j` from its
//! predecessor, forwards segment `j - 1` to its successor (one
//! `send_recv`), and finally forwards segment `k - 1`; the last rank only
//! receives. Segments are copied, never recomputed.
//!
//! Bytes on the wire: every link of the chain carries `S` once, so each
//! rank receives `S` and sends at most `S`, and the whole job moves
//! `(n - 1) S`, against `(n - 1) S + (n - 1) / n * S` for scatter +
//! all-gather (whose root also sends `2 (n - 1) / n * S`). It takes
//! `k + n - 2` segment times, so for `k` well above `n` it finishes in
//! about `S` over one link's bandwidth. Over loopback TCP every byte on the
//! wire is two copies by the CPU, so moving fewer bytes is what counts
//! (docs/PERFORMANCE.md, run 7). Reference: Thakur, Rabenseifner & Gropp,
//! "Optimization of collective communication operations in MPICH", IJHPCA
//! 19(1), 2005, and Open MPI's pipelined broadcast.

use super::util::{split_pair, Blocks};
use super::Comm;
use crate::error::Result;
use crate::transport::OpCode;

/// Segment size of the chain for a message of `bytes`: about
/// `sqrt(bytes * 32 KiB)`, between 64 KiB and 1 MiB. Longer chains of
/// segments fill the pipeline sooner but pay one message overhead (tens of
/// microseconds over loopback) per segment; the square root balances the
/// two (1 MiB: 181 KiB segments, 64 MiB: 1 MiB).
pub fn chain_segment_bytes(bytes: usize) -> usize {
    let target = (bytes as f64 * 32.0 * 1024.0).sqrt() as usize;
    target.clamp(64 * 1024, 1024 * 1024)
}

/// Pipelined chain broadcast of `buf` from group rank `root`.
pub fn broadcast_chain(c: &mut Comm<'_>, buf: &mut [u8], root: usize) -> Result<()> {
    let n = c.size();
    super::check(c, OpCode::Broadcast).root(root)?;
    if n == 1 || buf.is_empty() {
        return Ok(());
    }
    let l = c.link(OpCode::Broadcast);
    let r = l.rank();
    let v = (r + n - root) % n;
    let (prev, next) = ((r + n - 1) % n, (r + 1) % n);
    // One block (the whole buffer), cut into segments.
    let segs = Blocks::new(buf.len(), 1, 1, chain_segment_bytes(buf.len()));
    let k = segs.segs;
    if v == 0 {
        for j in 0..k {
            l.send(next, &buf[segs.seg(0, j)])?;
        }
    } else if v == n - 1 {
        for j in 0..k {
            l.recv(prev, &mut buf[segs.seg(0, j)])?;
        }
    } else {
        l.recv(prev, &mut buf[segs.seg(0, 0)])?;
        for j in 1..k {
            let (data, into) = split_pair(buf, segs.seg(0, j - 1), segs.seg(0, j));
            l.exchange(next, data, prev, into)?;
        }
        l.send(next, &buf[segs.seg(0, k - 1)])?;
    }
    Ok(())
}
