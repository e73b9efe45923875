//! Byte blobs over a process group (an 8-byte little-endian length, then the
//! bytes) and the same-node probe.

use crate::error::{Context, Error, Result};
use crate::group::ProcessGroup;
use crate::tensor::{try_zeroed_vec, DecodeLimits};

/// Broadcasts `data` (on `root`) to every rank; returns the bytes everywhere.
pub(crate) fn broadcast_blob(
    pg: &ProcessGroup,
    data: Option<Vec<u8>>,
    root: usize,
    limits: &DecodeLimits,
) -> Result<Vec<u8>> {
    if pg.rank() == root {
        let mut data = data.ok_or_else(|| Error::invalid("broadcast: the root must provide the bytes"))?;
        let mut len = (data.len() as u64).to_le_bytes();
        pg.broadcast_bytes(&mut len, root)?;
        if !data.is_empty() {
            pg.broadcast_bytes(&mut data, root)?;
        }
        Ok(data)
    } else {
        let mut len = [0u8; 8];
        pg.broadcast_bytes(&mut len, root)?;
        let n =
            limits.check_object_len(u64::from_le_bytes(len)).map_err(|e| peer_ctx(e, "broadcast_object", pg, root))?;
        let mut data = alloc_blob(n, "broadcast_object", pg, root)?;
        if n > 0 {
            pg.broadcast_bytes(&mut data, root)?;
        }
        Ok(data)
    }
}

/// [`broadcast_blob`] through a buffer the caller reuses: on `root`, `buf`
/// holds the bytes; elsewhere it is resized to the root's length and
/// filled. A buffer kept across calls is already mapped, so a large object
/// does not pay a page fault per 4 KiB on every call (fresh allocations of
/// a MiB or more come straight from `mmap`, or from heap pages that glibc
/// gave back at the previous free, which made the cost bimodal).
pub(crate) fn broadcast_blob_into(
    pg: &ProcessGroup,
    buf: &mut Vec<u8>,
    root: usize,
    limits: &DecodeLimits,
) -> Result<()> {
    let mut len = (buf.len() as u64).to_le_bytes();
    pg.broadcast_bytes(&mut len, root)?;
    if pg.rank() != root {
        let n =
            limits.check_object_len(u64::from_le_bytes(len)).map_err(|e| peer_ctx(e, "broadcast_object", pg, root))?;
        if n > buf.len() {
            buf.try_reserve(n - buf.len()).map_err(|_| Error::OutOfMemory {
                ctx: Context::new("broadcast_object", pg.name(), pg.rank()).with_peer(root),
                bytes: n as u64,
                detail: format!("an object of {n} bytes declared by peer rank {root}"),
            })?;
        }
        // Only bytes beyond the buffer's old length are zeroed; all are
        // overwritten below.
        buf.resize(n, 0);
    }
    if !buf.is_empty() {
        pg.broadcast_bytes(buf, root)?;
    }
    Ok(())
}

/// Sends the size of `data`, then `data`, to group rank `dst`.
pub(crate) fn send_blob(pg: &ProcessGroup, data: &[u8], dst: usize) -> Result<()> {
    pg.send_bytes(&(data.len() as u64).to_le_bytes(), dst)?;
    if !data.is_empty() {
        pg.send_bytes(data, dst)?;
    }
    Ok(())
}

/// Receives a blob sent with [`send_blob`] by group rank `src`; the declared
/// size is checked against `limits` before anything is allocated.
pub(crate) fn recv_blob(pg: &ProcessGroup, src: usize, limits: &DecodeLimits) -> Result<Vec<u8>> {
    let mut len = [0u8; 8];
    pg.recv_bytes(&mut len, src)?;
    let n = limits.check_object_len(u64::from_le_bytes(len)).map_err(|e| peer_ctx(e, "recv_object", pg, src))?;
    let mut data = alloc_blob(n, "recv_object", pg, src)?;
    if n > 0 {
        pg.recv_bytes(&mut data, src)?;
    }
    Ok(data)
}

/// A zeroed buffer for `n` bytes that `peer` declared, or an
/// [`Error::OutOfMemory`] naming the peer and the size.
fn alloc_blob(n: usize, op: &str, pg: &ProcessGroup, peer: usize) -> Result<Vec<u8>> {
    try_zeroed_vec::<u8>(n).ok_or_else(|| Error::OutOfMemory {
        ctx: Context::new(op, pg.name(), pg.rank()).with_peer(peer),
        bytes: n as u64,
        detail: format!("an object of {n} bytes declared by peer rank {peer}"),
    })
}

fn peer_ctx(e: Error, op: &str, pg: &ProcessGroup, peer: usize) -> Error {
    match e {
        Error::Serialization { detail, .. } => {
            Error::Serialization { ctx: Context::new(op, pg.name(), pg.rank()).with_peer(peer), detail }
        }
        other => other,
    }
}
