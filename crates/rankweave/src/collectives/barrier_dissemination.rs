//! Dissemination barrier.
//!
//! Terms: a *round* `k` uses distance `d = 2^k`.
//!
//! Steps: in each round rank `r` sends a one-byte token to `r + d` and
//! waits for one from `r - d` (mod `n`), for `d = 1, 2, 4, ... < n`. After
//! round `k` a rank has (transitively) heard from the `2^(k+1) - 1` ranks
//! before it, so after `ceil(log2 n)` rounds every rank has heard from every
//! other, i.e. all have entered. Works for any `n`.
//!
//! Bytes on the wire: one byte (plus the header) per rank and round,
//! `ceil(log2 n)` rounds. Reference: Hensgen, Finkel & Manber, "Two
//! algorithms for barrier synchronization", IJPP 17(1), 1988.

use super::util::sub_mod;
use super::Comm;
use crate::error::Result;
use crate::transport::OpCode;

/// Dissemination barrier.
pub fn barrier_dissemination(c: &mut Comm<'_>) -> Result<()> {
    let l = c.link(OpCode::Barrier);
    let (r, n) = (l.rank(), l.size());
    let mut d = 1;
    while d < n {
        let mut token = [0u8; 1];
        l.exchange((r + d) % n, &[1u8], sub_mod(r, d, n), &mut token)?;
        d <<= 1;
    }
    Ok(())
}
