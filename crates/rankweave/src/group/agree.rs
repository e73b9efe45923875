//! How the members of a group agree on its backend.
//!
//! With `Auto` or `Shm`, every member publishes its node identity in the
//! group's store; when all match, rank 0 creates the segment, every other
//! rank test-opens it and publishes `ok` or why not, and every rank reads
//! every answer, so the whole group agrees: shared memory for all, or (with
//! `Auto`) TCP for all. `Shm` turns a group that spans nodes, or a segment
//! some rank cannot open, into an error. A group spanning nodes runs
//! all_reduce hierarchically when every node could set up its segment
//! ([`crate::backend::hier`]), else plain TCP.

use super::{GroupOptions, TransportKind};
use crate::backend::hier::NodeLayout;
use crate::collectives::shm::{segment_bytes, ShmComm, ShmOptions};
use crate::error::{Context, Error, Result};
use crate::store::Store;
use crate::sys::shm::ShmSegment;
use std::time::{Duration, Instant};

/// Logs that a group falls back to TCP because shared memory is unavailable:
/// one WARN per process (the first group; the reason names the size needed
/// and the fix when `/dev/shm` is too small), DEBUG for later groups.
fn fallback_warning(name: &str, rank: usize, why: &str) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            group = %name,
            rank,
            "shared memory is unavailable, so collectives use TCP (several times slower): {why} \
             (logged once per process)"
        );
    } else {
        tracing::debug!(group = %name, rank, "shared memory unavailable ({why}): collectives use TCP");
    }
}

/// Reads `key`, which rank `peer` publishes, waiting until `deadline`; a
/// timeout names the operation, the group and `peer`.
fn get_from(store: &dyn Store, key: &str, deadline: Instant, ctx: Context) -> Result<Vec<u8>> {
    let start = Instant::now();
    let left = deadline.saturating_duration_since(start).max(Duration::from_millis(1));
    match store.get_timeout(key, left) {
        Err(Error::Timeout { .. }) => {
            let peer = ctx.peer.map_or_else(|| "a peer".to_string(), |p| format!("rank {p}"));
            Err(Error::timeout(ctx, start.elapsed(), format!("{peer} to publish `{key}` in the store")))
        }
        other => other,
    }
}

/// Opens segment `name` of `len` bytes and closes it again.
pub(super) fn open_probe(name: &str, len: usize) -> Result<()> {
    ShmSegment::open(name, len).map(drop)
}

/// How a group of more than one rank runs its collectives.
pub(super) enum Plan {
    /// Over the TCP mesh.
    Tcp,
    /// Over one shared-memory segment (every member on this node).
    Shm(ShmComm),
    /// all_reduce hierarchically (members span nodes), the rest over TCP.
    Hier(NodeLayout),
}

/// Decides how a group of `size > 1` ranks runs its collectives and builds
/// the shared-memory communicators it needs (see the module docs). `node`
/// is this rank's node identity, `probe` test-opens a segment.
#[allow(clippy::too_many_arguments)]
pub(super) fn setup_shm(
    store: &dyn Store,
    rank: usize,
    size: usize,
    name: &str,
    requested: TransportKind,
    opts: &GroupOptions,
    node: &str,
    probe: &dyn Fn(&str, usize) -> Result<()>,
) -> Result<Plan> {
    const OP: &str = "group.transport";
    let forced = requested == TransportKind::Shm;
    let deadline = Instant::now() + opts.timeout;
    let ctx = |peer: usize| Context::new(OP, name, rank).with_peer(peer);

    store.set(&format!("transport/node/{rank}"), node.as_bytes())?;
    let mut nodes = Vec::with_capacity(size);
    for j in 0..size {
        nodes.push(if j == rank {
            node.as_bytes().to_vec()
        } else {
            get_from(store, &format!("transport/node/{j}"), deadline, ctx(j))?
        });
    }
    let sopts = ShmOptions { timeout: opts.timeout, ..ShmOptions::default() };
    if nodes.iter().all(|n| n == &nodes[0]) {
        let all: Vec<usize> = (0..size).collect();
        return match create_agreed(store, "transport/shm", rank, &all, name, name, &sopts, deadline, probe)? {
            Ok(comm) => Ok(Plan::Shm(comm)),
            Err(why) if forced => Err(Error::SharedMemory(format!(
                "group {name}: the shared-memory transport was forced but is unavailable: {why}"
            ))),
            Err(why) => {
                fallback_warning(name, rank, &why);
                Ok(Plan::Tcp)
            }
        };
    }
    if forced {
        let j = nodes.iter().position(|n| n != node.as_bytes()).unwrap_or(0);
        return Err(Error::Unsupported(format!(
            "group {name}: the shared-memory transport was forced but the members span nodes \
             (rank {rank} runs on {node:?}, rank {j} on {:?}); use `tcp` or `auto`",
            String::from_utf8_lossy(&nodes[j])
        )));
    }
    // Nodes in order of their lowest member; that member leads the node.
    let leaders: Vec<usize> = (0..size).filter(|&j| !nodes[..j].contains(&nodes[j])).collect();
    let k = leaders.iter().position(|&l| nodes[l] == nodes[rank]).unwrap_or(0);
    let local: Vec<usize> = (0..size).filter(|&j| nodes[j] == nodes[rank]).collect();
    let me = local.iter().position(|&j| j == rank).unwrap_or(0);
    let (comm, status) = if local.len() > 1 {
        let seg = format!("{name}-node{k}");
        match create_agreed(store, &format!("transport/node{k}"), me, &local, name, &seg, &sopts, deadline, probe)? {
            Ok(c) => (Some(c), "ok".to_string()),
            Err(why) => (None, why),
        }
    } else {
        (None, "ok".to_string())
    };
    // Every node must have its shared memory, or the group runs plain TCP.
    store.set(&format!("transport/hier/{rank}"), status.as_bytes())?;
    for j in 0..size {
        let v = get_from(store, &format!("transport/hier/{j}"), deadline, ctx(j))?;
        if v != b"ok" {
            tracing::debug!(group = %name, rank, "node of rank {j} has no shared memory: collectives use TCP");
            return Ok(Plan::Tcp);
        }
    }
    let leader_index = leaders.iter().position(|&l| l == rank);
    tracing::debug!(group = %name, rank, nodes = leaders.len(), "members span nodes: hierarchical all_reduce");
    Ok(Plan::Hier(NodeLayout { local: comm, local_ranks: local, leaders, leader_index }))
}

/// Creates a shared-memory communicator among `members` (group ranks; this
/// rank is `members[me]`) with the agreement described in the module docs,
/// under store keys starting with `prefix`. `Ok(Err(why))`: some member
/// cannot use it, and every member returns the same.
#[allow(clippy::too_many_arguments)]
fn create_agreed(
    store: &dyn Store,
    prefix: &str,
    me: usize,
    members: &[usize],
    name: &str,
    segment: &str,
    sopts: &ShmOptions,
    deadline: Instant,
    probe: &dyn Fn(&str, usize) -> Result<()>,
) -> Result<std::result::Result<ShmComm, String>> {
    let n = members.len();
    let rank = members[me];
    let ctx = |i: usize| Context::new("group.transport", name, rank).with_peer(members[i]);
    let seg_len = segment_bytes(n, sopts.slot_bytes).unwrap_or(usize::MAX);
    let status_key = |i: usize| format!("{prefix}/status/{i}");
    let name_key = format!("{prefix}/name");
    let mut exchanged = false;
    // Why the members do not use shared memory, as agreed through the store.
    let mut refused: Option<String> = None;
    let res = ShmComm::create_with(me, n, segment, sopts, |seg| {
        exchanged = true;
        let seg_name = match seg {
            Some(s) => {
                store.set(&name_key, s.as_bytes())?;
                store.set(&status_key(0), b"ok")?;
                s.to_string()
            }
            None => {
                let v = get_from(store, &name_key, deadline, ctx(0))?;
                let (s, status) = match String::from_utf8(v) {
                    Ok(s) if !s.is_empty() => {
                        let status = match probe(&s, seg_len) {
                            Ok(()) => "ok".to_string(),
                            Err(e) => format!("rank {rank} cannot open the segment: {e}"),
                        };
                        (s, status)
                    }
                    _ => (String::new(), format!("rank {} could not create the segment", members[0])),
                };
                store.set(&status_key(me), status.as_bytes())?;
                s
            }
        };
        // Every member reads every answer: the outcome is the same everywhere.
        for i in 0..n {
            let v = get_from(store, &status_key(i), deadline, ctx(i))?;
            if v != b"ok" {
                let why = String::from_utf8_lossy(&v).into_owned();
                refused = Some(why.clone());
                return Err(Error::SharedMemory(why));
            }
        }
        Ok(seg_name)
    });
    match res {
        Ok(comm) => Ok(Ok(comm)),
        Err(e) => {
            if !exchanged && me == 0 {
                // Creating the segment failed: tell the others.
                let why = format!("rank {rank} could not create the segment: {e}");
                store.set(&name_key, b"")?;
                store.set(&status_key(0), why.as_bytes())?;
                refused = Some(why);
            }
            match refused {
                Some(why) => Ok(Err(why)),
                None => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reduce::ReduceOp;
    use crate::store::{HashStore, SharedStore};
    use crate::ProcessGroup;
    use std::sync::Arc;

    /// Builds a world on `nodes.len()` threads, rank `r` on node `nodes[r]`,
    /// and runs `f` on each.
    fn on_nodes<R: Send>(nodes: &[&str], f: impl Fn(ProcessGroup) -> R + Sync) -> Vec<R> {
        let store: SharedStore = Arc::new(HashStore::new());
        let n = nodes.len();
        let f = &f;
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .map(|r| {
                    let store = store.clone();
                    let node = nodes[r].to_string();
                    s.spawn(move || {
                        let opts = GroupOptions {
                            timeout: Duration::from_secs(20),
                            node: Some(node),
                            ..GroupOptions::default()
                        };
                        f(ProcessGroup::new_world(store, r, n, opts).unwrap())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn value(op: ReduceOp, r: usize, i: usize) -> i64 {
        match op {
            ReduceOp::Prod => [1, 2, -1][(r + 2 * i) % 3],
            _ => ((r * 5 + i * 3) % 9) as i64 - 4,
        }
    }

    fn exact(op: ReduceOp, n: usize, i: usize) -> i64 {
        let it = (0..n).map(|r| value(op, r, i));
        match op {
            ReduceOp::Sum | ReduceOp::Avg => it.sum(),
            ReduceOp::Prod => it.product(),
            ReduceOp::Min => it.min().unwrap(),
            ReduceOp::Max => it.max().unwrap(),
        }
    }

    #[test]
    fn groups_spanning_nodes_all_reduce_hierarchically() {
        let layouts: [&[&str]; 3] = [&["a", "a", "b", "b", "b"], &["a", "b", "b", "c"], &["a", "b"]];
        for nodes in layouts {
            let n = nodes.len();
            let outs = on_nodes(nodes, |g| {
                let r = g.rank();
                if GroupOptions::default().transport != TransportKind::Auto {
                    return Vec::new();
                }
                assert_eq!(g.transport_kind(), TransportKind::Tcp);
                assert_eq!(g.backend_name(), "hier");
                for op in ReduceOp::ALL {
                    for count in [1usize, 7, 1000, 300_000] {
                        let mut x: Vec<i64> = (0..count).map(|i| value(op, r, i)).collect();
                        g.all_reduce(&mut x, op).unwrap();
                        let div = if op == ReduceOp::Avg { n as i64 } else { 1 };
                        assert!(x.iter().enumerate().all(|(i, v)| *v == exact(op, n, i) / div), "{nodes:?} {op} i64");
                        let mut y: Vec<f32> = (0..count).map(|i| value(op, r, i) as f32).collect();
                        g.all_reduce(&mut y, op).unwrap();
                        let want = |i| {
                            let e = exact(op, n, i) as f32;
                            if op == ReduceOp::Avg {
                                e / n as f32
                            } else {
                                e
                            }
                        };
                        assert!(y.iter().enumerate().all(|(i, v)| *v == want(i)), "{nodes:?} {op} f32");
                    }
                }
                // Other collectives run over TCP beside it.
                let mut all = vec![0u8; n];
                g.all_gather(&[r as u8], &mut all).unwrap();
                assert_eq!(all, (0..n as u8).collect::<Vec<_>>());
                // Rounding-sensitive sums: the same bits everywhere.
                let mut z: Vec<f32> =
                    (0..5000).map(|i| ((i * 7919 + r * 104_729) % 1000) as f32 * 1e-3 + 1e3).collect();
                g.all_reduce(&mut z, ReduceOp::Sum).unwrap();
                z.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
            });
            assert!(outs.iter().all(|o| o == &outs[0]), "{nodes:?}: ranks differ");
        }
    }

    /// Runs `setup_shm` on `n` threads over one store; rank `r` claims node
    /// `nodes[r]` and its probe fails when `fails[r]`.
    fn decide(n: usize, requested: TransportKind, nodes: &[&str], fails: &[bool], tag: &str) -> Vec<Result<bool>> {
        let store: SharedStore = Arc::new(HashStore::new());
        let opts = GroupOptions { timeout: Duration::from_secs(20), ..GroupOptions::default() };
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .map(|r| {
                    let (store, opts) = (store.clone(), opts.clone());
                    let (node, fail) = (nodes[r], fails[r]);
                    s.spawn(move || {
                        let probe = |name: &str, len: usize| {
                            if fail {
                                Err(Error::SharedMemory("injected".into()))
                            } else {
                                open_probe(name, len)
                            }
                        };
                        setup_shm(&*store, r, n, tag, requested, &opts, node, &probe).map(|p| matches!(p, Plan::Shm(_)))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn leftovers(tag: &str) -> Vec<String> {
        let clean = tag.replace(':', "_");
        crate::sys::shm::list_job(&crate::sys::shm::job_id())
            .unwrap()
            .into_iter()
            .filter(|n| n.contains(&clean))
            .collect()
    }

    #[test]
    fn same_node_and_a_working_probe_use_shared_memory() {
        let out = decide(3, TransportKind::Auto, &["a"; 3], &[false; 3], "unit-same:0");
        assert!(out.iter().all(|r| matches!(r, Ok(true))), "{out:?}");
        assert!(leftovers("unit-same:0").is_empty());
    }

    #[test]
    fn members_on_two_nodes_fall_back_together_or_fail_when_forced() {
        let nodes = ["a", "a", "b", "a"];
        let out = decide(4, TransportKind::Auto, &nodes, &[false; 4], "unit-span:0");
        assert!(out.iter().all(|r| matches!(r, Ok(false))), "{out:?}");
        let out = decide(4, TransportKind::Shm, &nodes, &[false; 4], "unit-span:1");
        for r in &out {
            assert!(matches!(r, Err(Error::Unsupported(m)) if m.contains("span nodes")), "{r:?}");
        }
    }

    #[test]
    fn one_rank_failing_to_open_the_segment_moves_every_rank_to_tcp() {
        let fails = [false, false, true];
        let out = decide(3, TransportKind::Auto, &["a"; 3], &fails, "unit-probe:0");
        assert!(out.iter().all(|r| matches!(r, Ok(false))), "{out:?}");
        assert!(leftovers("unit-probe:0").is_empty());
        let out = decide(3, TransportKind::Shm, &["a"; 3], &fails, "unit-probe:1");
        for r in &out {
            assert!(matches!(r, Err(Error::SharedMemory(m)) if m.contains("rank 2 cannot open")), "{r:?}");
        }
        assert!(leftovers("unit-probe:1").is_empty());
    }
}
