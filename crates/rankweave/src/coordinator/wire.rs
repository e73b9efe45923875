//! Byte blobs over a process group (an 8-byte little-endian length, then the
//! bytes) and the same-node probe.

use crate::error::{Context, Error, Result};
use crate::group::ProcessGroup;
use crate::sys::shm::{job_id, ShmSegment};
use crate::tensor::{try_zeroed_vec, DecodeLimits};
use std::sync::atomic::{AtomicU64, Ordering};

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

const PROBE_BYTES: usize = 128;

/// For every rank of `pg`, whether it runs on the same node as group rank
/// `source_rank`: the source creates a small shared-memory segment holding a
/// magic string and broadcasts its name and node identity (host name and boot id, as groups use); each other rank opens
/// it and checks both; the answers are all-reduced. A rank that cannot open
/// the segment (another host, a private `/dev/shm`) answers "different
/// node". A collective: every rank of `pg` calls it.
pub fn in_the_same_node_as(pg: &ProcessGroup, source_rank: usize) -> Result<Vec<bool>> {
    let n = pg.size();
    if source_rank >= n {
        return Err(Error::invalid(format!(
            "in_the_same_node_as: invalid source rank ({source_rank}) for group {} of size {n}; expected 0 <= source_rank < {n}",
            pg.name()
        )));
    }
    let rank = pg.rank();
    let mut answers = vec![0i32; n];
    let limits = DecodeLimits::default();
    let host = crate::group::node_identity();
    let mut segment = None;
    if rank == source_rank {
        static PROBES: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let seq = PROBES.fetch_add(1, Ordering::Relaxed);
        let name = format!("/rankweave-{}-node-{}-{seq}-{:x}", job_id(), pg.global_rank(), nanos & 0xffff_ffff);
        let magic = format!("rankweave-same-node {name} {nanos}");
        // Creation can fail (no /dev/shm); the others then read an empty name
        // and answer "different node" rather than hang.
        let created = ShmSegment::create(&name, PROBE_BYTES).ok().inspect(|seg| {
            let bytes = magic.as_bytes();
            let len = bytes.len().min(PROBE_BYTES);
            // SAFETY: the mapping is PROBE_BYTES long and freshly created by
            // this rank; nobody else knows its name before the broadcast below.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), seg.as_ptr(), len) };
        });
        let msg = match &created {
            Some(_) => crate::tensor::codec::encode_object(&(name.as_str(), host.as_str(), magic.as_str()))?,
            None => crate::tensor::codec::encode_object(&("", host.as_str(), ""))?,
        };
        segment = created;
        broadcast_blob(pg, Some(msg), source_rank, &limits)?;
        answers[rank] = 1;
    } else {
        let msg = broadcast_blob(pg, None, source_rank, &limits)?;
        // Bytes that do not decode read as "different node": every rank must
        // still reach the barrier and the all_reduce below.
        let (name, src_host, magic): (String, String, String) =
            crate::tensor::codec::decode_object(&msg).unwrap_or_default();
        if !name.is_empty() && src_host == host {
            if let Ok(seg) = ShmSegment::open(&name, PROBE_BYTES) {
                let mut buf = [0u8; PROBE_BYTES];
                // SAFETY: the mapping is at least PROBE_BYTES long (checked by
                // `open`); the source wrote it before the broadcast we
                // received and does not write again.
                unsafe { std::ptr::copy_nonoverlapping(seg.as_ptr(), buf.as_mut_ptr(), PROBE_BYTES) };
                let len = magic.len().min(PROBE_BYTES);
                if buf[..len] == magic.as_bytes()[..len] {
                    answers[rank] = 1;
                }
            }
        }
    }
    // Everyone has looked before the source unlinks the segment.
    pg.barrier()?;
    drop(segment);
    pg.all_reduce(&mut answers, crate::reduce::ReduceOp::Sum)?;
    Ok(answers.iter().map(|&a| a == 1).collect())
}
