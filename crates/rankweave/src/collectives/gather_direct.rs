//! Direct gather.
//!
//! Terms: the root's output holds `n` equal *blocks*, block `i` from rank `i`.
//!
//! Steps: every non-root rank sends its block to the root, which receives
//! them in rank order straight into place and copies its own.
//!
//! Bytes on the wire: `(n - 1) * S` into the root, `S` out of every other
//! rank, in one round of `n - 1` messages. Every byte crosses the wire
//! exactly once (the lower bound); a binomial tree would only save latency
//! on small messages at the price of forwarding, which matters little at the
//! group sizes this crate targets. Reference: Thakur, Rabenseifner & Gropp,
//! "Optimization of collective communication operations in MPICH", IJHPCA
//! 19(1), 2005.

use super::Comm;
use crate::error::{Error, Result};
use crate::transport::OpCode;

/// Direct gather of every rank's `input` into root's `output`
/// (`n * input.len()` bytes, `Some` on root; ignored elsewhere).
pub fn gather_direct(c: &mut Comm<'_>, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()> {
    let n = c.size();
    super::check(c, OpCode::Gather).root(root)?;
    let l = c.link(OpCode::Gather);
    let s = input.len();
    if l.rank() != root {
        return if s == 0 { Ok(()) } else { l.send(root, input) };
    }
    let output = output.ok_or_else(|| Error::invalid("gather: the root must pass an output buffer"))?;
    if output.len() != n * s {
        return Err(Error::invalid(format!(
            "gather: output has {} bytes, expected {n} x {s} = {} bytes",
            output.len(),
            n * s
        )));
    }
    output[root * s..(root + 1) * s].copy_from_slice(input);
    if s == 0 {
        return Ok(());
    }
    for peer in (0..n).filter(|&p| p != root) {
        l.recv(peer, &mut output[peer * s..(peer + 1) * s])?;
    }
    Ok(())
}
