//! Byte blobs over a process group (an 8-byte little-endian length, then the
//! bytes) and the same-node probe.

use crate::backend::BlobRole;
use crate::error::{Context, Error, Result};
use crate::group::ProcessGroup;
use crate::tensor::{try_zeroed_vec, DecodeLimits};

/// Broadcasts `data` (on `root`) to every rank; returns the bytes
/// everywhere ([`ProcessGroup::broadcast_blob`]).
pub(crate) fn broadcast_blob(
    pg: &ProcessGroup,
    data: Option<Vec<u8>>,
    root: usize,
    limits: &DecodeLimits,
) -> Result<Vec<u8>> {
    if pg.rank() == root {
        let data = data.ok_or_else(|| Error::invalid("broadcast: the root must provide the bytes"))?;
        pg.broadcast_blob(BlobRole::Send(&mut &data[..]), root)?;
        return Ok(data);
    }
    let mut out = Vec::new();
    let mut read = |bytes: &[u8]| {
        out = alloc_blob(bytes.len(), "broadcast_object", pg, root)?;
        out.copy_from_slice(bytes);
        Ok(())
    };
    let limit = usize::try_from(limits.max_object_bytes).unwrap_or(usize::MAX);
    pg.broadcast_blob(BlobRole::Receive { limit, read: &mut read }, root)?;
    Ok(out)
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
