//! Direct scatter.
//!
//! Terms: the root's input holds `n` equal *blocks*, block `i` for rank `i`.
//!
//! Steps: the root sends block `i` to rank `i` in rank order and copies its
//! own; the others receive straight into their output.
//!
//! Bytes on the wire: `(n - 1) * S` out of the root, `S` into every other
//! rank, in one round of `n - 1` messages; every byte crosses the wire once
//! (the lower bound). Reference: Thakur, Rabenseifner & Gropp, "Optimization
//! of collective communication operations in MPICH", IJHPCA 19(1), 2005.

use super::Comm;
use crate::error::{Error, Result};
use crate::transport::OpCode;

/// Direct scatter of root's `input` (`n * output.len()` bytes, `Some` on
/// root; ignored elsewhere): block `r` lands in rank `r`'s `output`.
pub fn scatter_direct(c: &mut Comm<'_>, input: Option<&[u8]>, output: &mut [u8], root: usize) -> Result<()> {
    let n = c.size();
    super::check(c, OpCode::Scatter).root(root)?;
    let l = c.link(OpCode::Scatter);
    let s = output.len();
    if l.rank() != root {
        return if s == 0 { Ok(()) } else { l.recv(root, output) };
    }
    let input = input.ok_or_else(|| Error::invalid("scatter: the root must pass an input buffer"))?;
    if input.len() != n * s {
        return Err(Error::invalid(format!(
            "scatter: input has {} bytes, expected {n} x {s} = {} bytes",
            input.len(),
            n * s
        )));
    }
    output.copy_from_slice(&input[root * s..(root + 1) * s]);
    if s == 0 {
        return Ok(());
    }
    for peer in (0..n).filter(|&p| p != root) {
        l.send(peer, &input[peer * s..(peer + 1) * s])?;
    }
    Ok(())
}
