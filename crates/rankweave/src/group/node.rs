//! Node identity: which ranks share a machine (and so can share memory),
//! and the seed's probe of it over a group, [`in_the_same_node_as`].

use crate::error::{Context, Error, Result};
use crate::reduce::ReduceOp;
use crate::sys::shm::ShmSegment;
use crate::ProcessGroup;

/// This node's identity: the host name and, where readable, the kernel's
/// boot id (two containers with one host name but separate kernels, or a
/// host name reused across reboots, then differ). Every "same node"
/// decision of the crate (shared-memory groups, the message queue's local
/// readers, [`in_the_same_node_as`]) uses it.
pub fn node_identity() -> String {
    let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    format!("{host}/{}", boot.trim())
}

/// Bytes of the probe segment (the source's magic string).
const PROBE_BYTES: usize = 128;
/// Longest probe message the source may announce.
const PROBE_MSG_MAX: usize = 4096;

/// For every rank of `pg`, whether it runs on the same node as group rank
/// `source_rank`: the source creates a small shared-memory segment holding a
/// magic string and broadcasts its name and node identity ([`node_identity`]);
/// each other rank opens it and checks both; the answers are all-reduced. A
/// rank that cannot open the segment (another host, a private `/dev/shm`)
/// answers "different node". A collective: every rank of `pg` calls it.
pub fn in_the_same_node_as(pg: &ProcessGroup, source_rank: usize) -> Result<Vec<bool>> {
    let n = pg.size();
    if source_rank >= n {
        return Err(Error::invalid(format!(
            "in_the_same_node_as: invalid source rank ({source_rank}) for group {} of size {n}; expected 0 <= source_rank < {n}",
            pg.name()
        )));
    }
    let rank = pg.rank();
    let host = node_identity();
    let mut answers = vec![0i32; n];
    let mut segment = None;
    // The message: segment name, node identity and magic, one per line
    // (none holds a newline: segment names are letters, digits, `_` and `-`).
    let mut msg = Vec::new();
    let mut len = [0i64];
    if rank == source_rank {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        // Creation can fail (no /dev/shm); the others then read an empty
        // name and answer "different node" rather than hang.
        segment = ShmSegment::create_unique("node", PROBE_BYTES).ok();
        let (name, magic) = match &segment {
            Some(seg) => {
                let magic = format!("rankweave-same-node {} {nanos}", seg.name());
                let bytes = &magic.as_bytes()[..magic.len().min(PROBE_BYTES)];
                // SAFETY: nobody else knows the fresh segment's name before
                // the broadcast below.
                unsafe { seg.write(0, bytes) };
                (seg.name().to_string(), magic)
            }
            None => (String::new(), String::new()),
        };
        msg = format!("{name}\n{host}\n{magic}").into_bytes();
        len[0] = msg.len() as i64;
        answers[rank] = 1;
    }
    pg.broadcast(&mut len, source_rank)?;
    let announced = usize::try_from(len[0]).ok().filter(|l| *l <= PROBE_MSG_MAX).ok_or_else(|| {
        Error::protocol(
            Context::new("in_the_same_node_as", pg.name(), rank).with_peer(source_rank),
            format!("rank {source_rank} announced a probe message of {} bytes (at most {PROBE_MSG_MAX})", len[0]),
        )
    })?;
    msg.resize(announced, 0);
    pg.broadcast_bytes(&mut msg, source_rank)?;
    if rank != source_rank {
        let text = String::from_utf8_lossy(&msg);
        let mut parts = text.splitn(3, '\n');
        let (name, src_host, magic) =
            (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if !name.is_empty() && src_host == host {
            if let Ok(seg) = ShmSegment::open(name, PROBE_BYTES) {
                let mut buf = [0u8; PROBE_BYTES];
                // SAFETY: the source wrote the magic before the broadcast we
                // received and does not write again.
                unsafe { seg.read(0, &mut buf) };
                let m = &magic.as_bytes()[..magic.len().min(PROBE_BYTES)];
                if buf[..m.len()] == *m {
                    answers[rank] = 1;
                }
            }
        }
    }
    // Everyone has looked before the source unlinks the segment.
    pg.barrier()?;
    drop(segment);
    pg.all_reduce(&mut answers, ReduceOp::Sum)?;
    Ok(answers.iter().map(|&a| a == 1).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_identity_is_stable_and_names_the_host() {
        let id = node_identity();
        assert_eq!(id, node_identity());
        let host = nix::unistd::gethostname().unwrap();
        assert!(id.starts_with(&*host.to_string_lossy()), "{id}");
    }
}
