//! Pairwise-exchange all_to_all.
//!
//! Terms: input and output hold `n` equal *blocks* of `S` bytes; block `j`
//! of rank `i`'s input is destined for block `i` of rank `j`'s output.
//!
//! Steps: rank `r` copies its own block, then in step `s = 1..n` sends
//! input block `r + s` to rank `r + s` while receiving output block `r - s`
//! from rank `r - s` (mod `n`). Every rank sends to and receives from a
//! different peer in each step, so no link is oversubscribed.
//!
//! Bytes on the wire per rank: `(n - 1) * S` sent and received in `n - 1`
//! steps (each byte crosses once). Reference: Thakur, Rabenseifner & Gropp,
//! "Optimization of collective communication operations in MPICH", IJHPCA
//! 19(1), 2005 (pairwise exchange for long messages).

use super::util::sub_mod;
use super::Comm;
use crate::error::Result;
use crate::transport::OpCode;

/// Pairwise-exchange all_to_all.
pub fn all_to_all_pairwise(c: &mut Comm<'_>, input: &[u8], output: &mut [u8]) -> Result<()> {
    let n = c.size();
    super::check_all_to_all(c, input.len(), output.len())?;
    let s = input.len() / n;
    let l = c.link(OpCode::AllToAll);
    let r = l.rank();
    output[r * s..(r + 1) * s].copy_from_slice(&input[r * s..(r + 1) * s]);
    if s == 0 {
        return Ok(());
    }
    for step in 1..n {
        let to = (r + step) % n;
        let from = sub_mod(r, step, n);
        l.exchange(to, &input[to * s..(to + 1) * s], from, &mut output[from * s..(from + 1) * s])?;
    }
    Ok(())
}
