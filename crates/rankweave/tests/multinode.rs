//! Several nodes for real: ranks started inside network namespaces
//! (`tests/netns`), each "node" with its own host name and address, meeting
//! through `init_distributed_environment(-1, -1, "env://", -1, "gloo")` as a
//! user's program would, with nothing but `MASTER_ADDR` pointing at node 0.
//! The test binary re-runs itself as the workers (`RW_MN_ROLE`).
//!
//! - the conformance suite across 3 nodes with 1, 2 and 3 ranks (the
//!   hierarchical backend, every collective over the veths);
//! - IPv6 and `RANKWEAVE_SOCKET_IFNAME`;
//! - a link cut mid-collective: every rank errors within the link timeout,
//!   naming a rank on the other side;
//! - the early-exit shape (node 0's ranks done while node 1's still build
//!   their groups), 20 runs out of 20, with rank 0 hosting the store.

mod common;
mod conformance;
mod netns;

use netns::Cluster;
use rankweave::parallel_state as ps;
use rankweave::tensor::Tensor;
use rankweave::ReduceOp;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ROLE: &str = "RW_MN_ROLE";
const PORT: &str = "29500";

fn env_usize(k: &str) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("worker needs {k}"))
}

/// Worker entry: a no-op in a normal test run; the role when spawned.
#[test]
fn worker() {
    let Ok(role) = std::env::var(ROLE) else { return };
    let rank = env_usize("RANK");
    ps::init_distributed_environment(-1, -1, "env://", -1, "gloo").unwrap();
    let world = ps::global_state().get_world_group().unwrap();
    let pg = world.cpu_group().unwrap();
    match role.as_str() {
        "suite" => {
            conformance::suite(&pg, conformance::FULL);
            println!("rank {rank} ok backend={} transport={}", pg.backend_name(), pg.transport_kind());
        }
        "small" => {
            let n = pg.size();
            let mut x: Vec<f32> = (0..1 << 16).map(|i| (rank + i % 7) as f32).collect();
            pg.all_reduce(&mut x, ReduceOp::Sum).unwrap();
            assert!(x.iter().enumerate().all(|(i, v)| *v == (n * (n - 1) / 2 + n * (i % 7)) as f32));
            let mut all = vec![0i32; n];
            pg.all_gather(&[rank as i32], &mut all).unwrap();
            assert_eq!(all, (0..n as i32).collect::<Vec<_>>());
            println!("rank {rank} ok backend={}", pg.backend_name());
        }
        "cut" => {
            let mut x = vec![1f32; 1 << 14];
            let start = Instant::now();
            for step in 0u64.. {
                if let Err(e) = pg.all_reduce(&mut x, ReduceOp::Sum) {
                    println!("rank {rank} failed peer={:?}: {e}", e.peer());
                    std::process::exit(3);
                }
                if step == 0 {
                    println!("rank {rank} ready");
                }
                x.fill(1.0);
                assert!(start.elapsed() < Duration::from_secs(120), "the link was never cut");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        "early" => {
            // Node 1's ranks come late to the model-parallel groups and
            // stay after them; node 0's are done at once.
            let late = env_usize("GROUP_RANK") == 1;
            if late {
                std::thread::sleep(Duration::from_millis(300));
            }
            ps::initialize_model_parallel(2, 2, None).unwrap();
            let tp = ps::global_state().get_tp_group().unwrap();
            let t = tp.all_reduce(Tensor::from_vec(vec![rank as f32; 4], vec![4]).unwrap()).unwrap();
            let base = rank - rank % 2;
            assert_eq!(t.to_vec::<f32>().unwrap(), vec![(2 * base + 1) as f32; 4]);
            if late {
                std::thread::sleep(Duration::from_millis(300));
            }
            ps::global_state().destroy_model_parallel();
            ps::global_state().destroy_distributed_environment();
            println!("rank {rank} done");
        }
        other => panic!("unknown role {other}"),
    }
}

/// Ranks per node, in node order; global ranks are laid out node by node.
struct Job<'a> {
    cluster: &'a Cluster,
    per_node: &'a [usize],
    role: &'a str,
    master: String,
    env: Vec<(&'static str, String)>,
}

impl Job<'_> {
    fn spawn(&self) -> Vec<(usize, Child)> {
        let world: usize = self.per_node.iter().sum();
        let exe = std::env::current_exe().unwrap();
        let mut out = Vec::new();
        let mut rank = 0;
        for (node, &local_world) in self.per_node.iter().enumerate() {
            for local in 0..local_world {
                let mut c: Command = self.cluster.command(node, &exe);
                c.args(["worker", "--exact", "--nocapture", "--test-threads", "1", "-q"])
                    .env_remove("RANKWEAVE_TRANSPORT")
                    .env_remove("RANKWEAVE_SOCKET_IFNAME")
                    .env(ROLE, self.role)
                    .env("RANK", rank.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("LOCAL_RANK", local.to_string())
                    .env("LOCAL_WORLD_SIZE", local_world.to_string())
                    .env("GROUP_RANK", node.to_string())
                    .env("MASTER_ADDR", &self.master)
                    .env("MASTER_PORT", PORT)
                    .env("RANKWEAVE_TIMEOUT", "90")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                for (k, v) in &self.env {
                    c.env(k, v);
                }
                out.push((rank, c.spawn().expect("spawning a worker in its namespace")));
                rank += 1;
            }
        }
        out
    }
}

/// Lines of every worker's stdout, tagged with its rank, as they come.
fn lines(children: &mut [(usize, Child)]) -> mpsc::Receiver<(usize, String)> {
    let (tx, rx) = mpsc::channel();
    for (rank, child) in children.iter_mut() {
        let out = child.stdout.take().unwrap();
        let (tx, rank) = (tx.clone(), *rank);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((rank, line));
            }
        });
    }
    rx
}

/// Waits for every worker (killing all at `limit`); returns each one's
/// exit code, stdout lines and stderr, in rank order.
fn finish(mut children: Vec<(usize, Child)>, limit: Duration) -> Vec<(Option<i32>, String, String)> {
    let rx = lines(&mut children);
    let errs: Vec<_> = children
        .iter_mut()
        .map(|(_, c)| {
            let mut e = c.stderr.take().unwrap();
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = std::io::Read::read_to_string(&mut e, &mut s);
                s
            })
        })
        .collect();
    let deadline = Instant::now() + limit;
    let mut codes = Vec::new();
    for (_, c) in children.iter_mut() {
        let code = loop {
            if let Some(st) = c.try_wait().unwrap() {
                break st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        codes.push(code);
    }
    let mut outs = vec![String::new(); children.len()];
    while let Ok((r, l)) = rx.recv_timeout(Duration::from_millis(200)) {
        outs[r] += &l;
        outs[r].push('\n');
    }
    codes.into_iter().zip(outs).zip(errs.into_iter().map(|h| h.join().unwrap())).map(|((c, o), e)| (c, o, e)).collect()
}

fn assert_all_ok(results: &[(Option<i32>, String, String)], what: &str) {
    for (r, (code, out, err)) in results.iter().enumerate() {
        assert_eq!(*code, Some(0), "{what}: rank {r} exited {code:?}\nstdout:\n{out}\nstderr:\n{err}");
    }
}

#[test]
fn conformance_suite_across_three_nodes_with_one_two_and_three_ranks() {
    let Some(c) = Cluster::new(3) else { return };
    let job = Job { cluster: &c, per_node: &[1, 2, 3], role: "suite", master: c.addr(0), env: vec![] };
    let before = c.tx_bytes(1);
    let results = finish(job.spawn(), Duration::from_secs(240));
    assert_all_ok(&results, "suite across 3 nodes");
    for (r, (_, out, _)) in results.iter().enumerate() {
        assert!(out.contains(&format!("rank {r} ok backend=hier")), "rank {r}: {out}");
    }
    // The traffic went over the veths, not loopback.
    assert!(c.tx_bytes(1) > before + 100_000, "node 1 sent {} bytes on eth0", c.tx_bytes(1) - before);
}

#[test]
fn ipv6_and_a_named_interface() {
    let Some(c) = Cluster::new(2) else { return };
    let job = Job { cluster: &c, per_node: &[1, 1], role: "small", master: c.addr6(0), env: vec![] };
    assert_all_ok(&finish(job.spawn(), Duration::from_secs(60)), "IPv6 master");
    let env = vec![("RANKWEAVE_SOCKET_IFNAME", "eth0".to_string())];
    let job = Job { cluster: &c, per_node: &[2, 1], role: "small", master: c.addr(0), env };
    assert_all_ok(&finish(job.spawn(), Duration::from_secs(60)), "RANKWEAVE_SOCKET_IFNAME=eth0");
    // A wrong interface is refused at once, naming the variable.
    let env = vec![("RANKWEAVE_SOCKET_IFNAME", "ib7".to_string())];
    let job = Job { cluster: &c, per_node: &[1, 1], role: "small", master: c.addr(0), env };
    let results = finish(job.spawn(), Duration::from_secs(60));
    for (r, (code, _, err)) in results.iter().enumerate() {
        assert_ne!(*code, Some(0), "rank {r} passed with a missing interface");
        assert!(err.contains("RANKWEAVE_SOCKET_IFNAME=ib7"), "rank {r}: {err}");
    }
}

#[test]
fn a_partition_fails_every_rank_within_the_link_timeout_naming_the_other_side() {
    cut_mid_collective(false);
}

#[test]
fn a_pulled_cable_fails_every_rank_within_the_link_timeout_naming_the_other_side() {
    cut_mid_collective(true);
}

/// 2 nodes x 2 ranks all-reducing in a loop; node 1 is partitioned away
/// (or its link set down, with `unplug`). Every rank must fail within the
/// link timeout (plus the abort's grace and scheduling on 2 cores), well
/// before the operation timeout, blaming a rank on the other side.
fn cut_mid_collective(unplug: bool) {
    let Some(c) = Cluster::new(2) else { return };
    let link = 3.0;
    let env = vec![("RANKWEAVE_LINK_TIMEOUT", link.to_string())];
    let job = Job { cluster: &c, per_node: &[2, 2], role: "cut", master: c.addr(0), env };
    let mut children = job.spawn();
    let rx = lines(&mut children);
    let mut ready = 0;
    let mut seen = vec![String::new(); 4];
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready < 4 {
        let (r, l) =
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("workers never got ready");
        ready += usize::from(l.contains("ready"));
        seen[r] += &l;
    }
    if unplug {
        c.unplug(1);
    } else {
        c.cut(1);
    }
    let cut = Instant::now();
    let mut ended = [None; 4];
    while ended.iter().any(Option::is_none) && cut.elapsed() < Duration::from_secs(60) {
        for (i, (_, ch)) in children.iter_mut().enumerate() {
            if ended[i].is_none() {
                if let Some(st) = ch.try_wait().unwrap() {
                    ended[i] = Some((cut.elapsed(), st.code()));
                }
            }
        }
        while let Ok((r, l)) = rx.try_recv() {
            seen[r] += &l;
            seen[r].push('\n');
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (_, ch) in children.iter_mut() {
        let _ = ch.kill();
        let _ = ch.wait();
    }
    while let Ok((r, l)) = rx.recv_timeout(Duration::from_millis(200)) {
        seen[r] += &l;
        seen[r].push('\n');
    }
    for r in 0..4 {
        let (after, code) = ended[r].unwrap_or_else(|| panic!("rank {r} never failed after the cut:\n{}", seen[r]));
        assert_eq!(code, Some(3), "rank {r}: {}", seen[r]);
        // The link timeout, plus the abort's grace and scheduling on 2 cores.
        assert!(after < Duration::from_secs_f64(link + 4.0), "rank {r} took {after:?}: {}", seen[r]);
        let other_side: &[usize] = if r < 2 { &[2, 3] } else { &[0, 1] };
        assert!(
            other_side.iter().any(|p| seen[r].contains(&format!("peer=Some({p})"))),
            "rank {r} blamed a rank on its own side: {}",
            seen[r]
        );
        eprintln!("rank {r} failed {after:?} after the cut: {}", seen[r].lines().last().unwrap_or(""));
    }
}

#[test]
fn node_zero_done_early_never_breaks_node_one_twenty_runs_of_twenty() {
    let Some(c) = Cluster::new(2) else { return };
    for run in 0..20 {
        let job = Job { cluster: &c, per_node: &[2, 2], role: "early", master: c.addr(0), env: vec![] };
        let results = finish(job.spawn(), Duration::from_secs(60));
        assert_all_ok(&results, &format!("early exit, run {run}"));
    }
}
