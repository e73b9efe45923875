//! Bruck all_gather, for small messages.
//!
//! Terms: the output holds `n` *blocks* of `S` bytes. During the algorithm
//! it is used in *rotated* order: slot `i` holds the block of rank
//! `(r + i) mod n`, so this rank's own block is slot 0. A *round* `k` uses
//! distance `d = 2^k`.
//!
//! Steps: in round `k` (while `d < n`) rank `r` sends its first
//! `c = min(d, n - d)` slots to rank `r - d` and receives `c` slots from
//! rank `r + d` into slots `d .. d + c`; after the round the first
//! `min(2d, n)` slots are filled. A final in-memory rotation by `r` blocks
//! puts every block in rank order.
//!
//! Bytes on the wire per rank: `(n - 1) * S` sent and received, like the
//! ring, but in `ceil(log2 n)` rounds instead of `n - 1`, for any `n` (not
//! only powers of two). Used below [`super::SMALL_MESSAGE_BYTES`]. Reference:
//! Bruck, Ho, Kipnis, Upfal & Weathersby, "Efficient algorithms for
//! all-to-all communications in multiport message-passing systems", IEEE
//! TPDS 8(11), 1997; Thakur, Rabenseifner & Gropp, IJHPCA 19(1), 2005.

use super::util::{split_pair, sub_mod};
use super::Comm;
use crate::error::{Error, Result};
use crate::transport::OpCode;

/// Bruck all_gather over `buf` (`n` blocks of `s` bytes) whose slot 0 holds
/// this rank's block; leaves the blocks in rank order.
fn bruck(c: &mut Comm<'_>, buf: &mut [u8], s: usize) -> Result<()> {
    let l = c.link(OpCode::AllGather);
    let (r, n) = (l.rank(), l.size());
    let mut d = 1;
    while d < n {
        let cnt = d.min(n - d);
        let (data, into) = split_pair(buf, 0..cnt * s, d * s..(d + cnt) * s);
        l.exchange(sub_mod(r, d, n), data, (r + d) % n, into)?;
        d <<= 1;
    }
    buf.rotate_right(r * s);
    Ok(())
}

/// Out-of-place Bruck all_gather: `output.len() == n * input.len()`.
pub fn all_gather_bruck(c: &mut Comm<'_>, input: &[u8], output: &mut [u8]) -> Result<()> {
    super::check(c, OpCode::AllGather).len("output (size x input)", c.size() * input.len(), output.len())?;
    output[..input.len()].copy_from_slice(input);
    bruck(c, output, input.len())
}

/// In-place Bruck all_gather: `buf` holds `n` equal blocks, block `rank`
/// filled by the caller.
pub fn all_gather_bruck_inplace(c: &mut Comm<'_>, buf: &mut [u8]) -> Result<()> {
    let n = c.size();
    if buf.len() % n != 0 {
        return Err(Error::invalid(format!(
            "all_gather: in-place buffer of {} bytes does not split into {n} equal blocks",
            buf.len()
        )));
    }
    let s = buf.len() / n;
    let r = c.rank();
    buf.copy_within(r * s..(r + 1) * s, 0);
    bruck(c, buf, s)
}
