//! Process groups across real OS processes: the test binary re-runs itself
//! as workers (`RW_GROUP_WORKER` selects the role) that meet at a TCP store
//! served by the parent (or by rank 0), build a world over the TCP transport
//! and run collectives and raw exchanges. Covers world sizes 2, 3 and 4, and
//! workers killed by SIGKILL in the middle of an all_reduce or an exchange.

use rankweave::store::{TcpStore, TcpStoreServer};
use rankweave::transport::{OpCode, Tag};
use rankweave::{Error, GroupOptions, ProcessGroup, ReduceOp, SharedStore, TransportKind};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROLE: &str = "RW_GROUP_WORKER";

fn env_usize(k: &str) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("worker needs {k}"))
}

/// Worker entry: a no-op in a normal test run; the role when spawned.
#[test]
fn worker() {
    let Ok(scenario) = std::env::var(ROLE) else { return };
    let (rank, n, port) = (env_usize("RANK"), env_usize("WORLD_SIZE"), env_usize("RW_STORE_PORT"));
    let timeout = Duration::from_secs(30);
    // With RW_STORE_MASTER, rank 0 hosts the store (as `rankweave launch` jobs do).
    let master = std::env::var("RW_STORE_MASTER").is_ok() && rank == 0;
    let store: SharedStore = Arc::new(TcpStore::new("127.0.0.1", port as u16, master, timeout).unwrap());
    let transport =
        if std::env::var("RW_TRANSPORT").as_deref() == Ok("shm") { TransportKind::Shm } else { TransportKind::Tcp };
    let opts = GroupOptions { timeout, transport, listen_host: Some("127.0.0.1".into()), ..GroupOptions::builtin() };
    let g = ProcessGroup::new_world(store, rank, n, opts).unwrap();
    match scenario.as_str() {
        "ring" => {
            let (to, from) = ((rank + 1) % n, (rank + n - 1) % n);
            for (step, len) in [0usize, 1, 1000, 8 << 20].into_iter().enumerate() {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + rank) as u8).collect();
                let mut buf = vec![0u8; len];
                let tag = Tag::new(OpCode::AllGather, step as u64);
                let deadline = Instant::now() + timeout;
                g.transport().unwrap().send_recv(to, tag, &data, from, tag, &mut buf, deadline).unwrap();
                assert!(buf.iter().enumerate().all(|(i, &b)| b == (i * 7 + from) as u8), "rank {rank} len {len}");
            }
            println!("rank {rank} ok");
        }
        "all_reduce" => {
            for len in [1usize, 1000, 1 << 20] {
                let mut x: Vec<f32> = (0..len).map(|i| (rank * 3 + i % 5) as f32).collect();
                g.all_reduce(&mut x, ReduceOp::Sum).unwrap();
                for (i, v) in x.iter().enumerate() {
                    let want = (3 * n * (n - 1) / 2 + n * (i % 5)) as f32;
                    assert_eq!(*v, want, "rank {rank} element {i} of {len}");
                }
            }
            let mut all = vec![0i32; n];
            g.all_gather(&[rank as i32], &mut all).unwrap();
            assert_eq!(all, (0..n as i32).collect::<Vec<_>>());
            g.barrier().unwrap();
            println!("rank {rank} ok");
        }
        "kill_all_reduce" => {
            let victim = 1;
            let mut x = vec![1f32; 1 << 20];
            for step in 0..100_000 {
                if rank == victim && step == 3 {
                    nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL).unwrap();
                }
                if let Err(e) = g.all_reduce(&mut x, ReduceOp::Sum) {
                    println!("rank {rank} error: {e}");
                    assert!(matches!(e, Error::PeerLost { .. }), "{e}");
                    assert_eq!(e.peer(), Some(victim), "{e}");
                    return;
                }
                x.fill(1.0);
            }
            panic!("rank {rank} never noticed rank {victim} was killed");
        }
        "kill_bcast_root" | "kill_bcast_reader" => {
            // Rank 0 broadcasts objects as fast as it can, up to the ring's
            // entries ahead of its readers; the victim dies mid-stream.
            let victim = if scenario == "kill_bcast_root" { 0 } else { 1 };
            let obj: Vec<u32> = (0..16 << 10).collect();
            let limits = rankweave::tensor::DecodeLimits::default();
            for step in 0..100_000 {
                if rank == victim && step == 10 {
                    nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL).unwrap();
                }
                match g.broadcast_object((rank == 0).then_some(&obj), 0, &limits) {
                    Ok(got) => assert!(got.is_none_or(|v| v == obj), "rank {rank} got another object"),
                    Err(e) => {
                        println!("rank {rank} error: {e}");
                        assert!(matches!(e, Error::PeerLost { .. }), "{e}");
                        assert_eq!(e.peer(), Some(victim), "{e}");
                        return;
                    }
                }
            }
            panic!("rank {rank} never noticed rank {victim} was killed");
        }
        "kill" | "kill0" => {
            let victim = if scenario == "kill0" { 0 } else { n - 1 };
            let (to, from) = ((rank + 1) % n, (rank + n - 1) % n);
            let data = vec![rank as u8; 1 << 20];
            let mut buf = vec![0u8; 1 << 20];
            for step in 0..100_000u64 {
                if rank == victim && step == 3 {
                    nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL).unwrap();
                }
                let tag = Tag::new(OpCode::AllReduce, step);
                let deadline = Instant::now() + timeout;
                if let Err(e) = g.transport().unwrap().send_recv(to, tag, &data, from, tag, &mut buf, deadline) {
                    println!("rank {rank} error: {e}");
                    assert!(matches!(e, Error::PeerLost { .. }), "{e}");
                    assert_eq!(e.peer(), Some(victim), "{e}");
                    return;
                }
            }
            panic!("rank {rank} never noticed rank {victim} was killed");
        }
        other => panic!("unknown scenario {other}"),
    }
}

struct Outcome {
    codes: Vec<Option<i32>>,
    output: Vec<String>,
    elapsed: Duration,
}

fn launch(n: usize, scenario: &str) -> Outcome {
    launch_with(n, scenario, false)
}

/// Runs `n` workers; the store is served by this process, or by rank 0 when
/// `rank0_hosts_store`.
fn launch_with(n: usize, scenario: &str, rank0_hosts_store: bool) -> Outcome {
    launch_env(n, scenario, rank0_hosts_store, &[])
}

fn launch_env(n: usize, scenario: &str, rank0_hosts_store: bool, env: &[(&str, &str)]) -> Outcome {
    let mut server = None;
    let port = if rank0_hosts_store {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    } else {
        server.insert(TcpStoreServer::bind("127.0.0.1:0").unwrap()).port()
    };
    let exe = std::env::current_exe().unwrap();
    let start = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|rank| {
            let mut cmd = Command::new(&exe);
            cmd.args(["--exact", "worker", "--nocapture", "--test-threads=1"])
                .env(ROLE, scenario)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("RW_STORE_PORT", port.to_string())
                .envs(env.iter().copied())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            cmd
        })
        .collect();
    let children: Vec<_> = children
        .into_iter()
        .map(|mut c| {
            if rank0_hosts_store {
                c.env("RW_STORE_MASTER", "1");
            }
            c.spawn().unwrap()
        })
        .collect();
    let mut codes = Vec::new();
    let mut output = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        codes.push(out.status.code());
        output.push(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    }
    drop(server);
    Outcome { codes, output, elapsed: start.elapsed() }
}

#[test]
fn ring_exchange_across_processes_for_world_sizes_2_3_4() {
    for n in [2, 3, 4] {
        let o = launch(n, "ring");
        for (rank, code) in o.codes.iter().enumerate() {
            assert_eq!(*code, Some(0), "world {n} rank {rank}:\n{}", o.output[rank]);
            assert!(o.output[rank].contains(&format!("rank {rank} ok")));
        }
    }
}

#[test]
fn a_killed_process_fails_every_survivor_naming_it() {
    let n = 3;
    let o = launch(n, "kill");
    assert_eq!(o.codes[n - 1], None, "the victim died by a signal:\n{}", o.output[n - 1]);
    for rank in 0..n - 1 {
        assert_eq!(o.codes[rank], Some(0), "rank {rank}:\n{}", o.output[rank]);
        assert!(o.output[rank].contains(&format!("(peer rank {})", n - 1)), "{}", o.output[rank]);
    }
    assert!(o.elapsed < Duration::from_secs(20), "took {:?}", o.elapsed);
}

#[test]
fn killing_the_rank_that_hosts_the_store_still_fails_survivors_promptly() {
    let n = 3;
    let o = launch_with(n, "kill0", true);
    assert_eq!(o.codes[0], None, "rank 0 died by a signal:\n{}", o.output[0]);
    for rank in 1..n {
        assert_eq!(o.codes[rank], Some(0), "rank {rank}:\n{}", o.output[rank]);
        assert!(o.output[rank].contains("(peer rank 0)"), "{}", o.output[rank]);
    }
    assert!(o.elapsed < Duration::from_secs(20), "took {:?}", o.elapsed);
}

#[test]
fn all_reduce_across_processes_for_world_sizes_2_3_4() {
    for n in [2, 3, 4] {
        let o = launch(n, "all_reduce");
        for (rank, code) in o.codes.iter().enumerate() {
            assert_eq!(*code, Some(0), "world {n} rank {rank}:\n{}", o.output[rank]);
            assert!(o.output[rank].contains(&format!("rank {rank} ok")));
        }
    }
}

#[test]
fn a_process_killed_mid_all_reduce_is_named_by_every_survivor() {
    let n = 4;
    let o = launch(n, "kill_all_reduce");
    assert_eq!(o.codes[1], None, "rank 1 died by a signal:\n{}", o.output[1]);
    for rank in [0, 2, 3] {
        assert_eq!(o.codes[rank], Some(0), "rank {rank}:\n{}", o.output[rank]);
        assert!(o.output[rank].contains("(peer rank 1)"), "{}", o.output[rank]);
    }
    assert!(o.elapsed < Duration::from_secs(20), "took {:?}", o.elapsed);
}

#[test]
fn a_zombie_rank_of_a_shared_memory_group_is_lost_within_the_liveness_interval() {
    // Rank 1 kills itself mid-all_reduce and stays a zombie: this process
    // (its parent) reaps it only after rank 0 has finished. Its peers must
    // not take it for alive until their 30 s timeout.
    let n = 3;
    let o = launch_env(n, "kill_all_reduce", false, &[("RW_TRANSPORT", "shm")]);
    assert_eq!(o.codes[1], None, "rank 1 died by a signal:\n{}", o.output[1]);
    for rank in [0, 2] {
        assert_eq!(o.codes[rank], Some(0), "rank {rank}:\n{}", o.output[rank]);
        assert!(o.output[rank].contains("(peer rank 1)"), "{}", o.output[rank]);
    }
    assert!(o.elapsed < Duration::from_secs(10), "took {:?}", o.elapsed);
}

#[test]
fn a_killed_root_or_reader_of_object_broadcasts_through_shared_memory_is_named_by_every_survivor() {
    let n = 3;
    for (scenario, victim) in [("kill_bcast_root", 0), ("kill_bcast_reader", 1)] {
        let o = launch_env(n, scenario, false, &[("RW_TRANSPORT", "shm")]);
        assert_eq!(o.codes[victim], None, "{scenario}: rank {victim} died by a signal:\n{}", o.output[victim]);
        for rank in (0..n).filter(|&r| r != victim) {
            assert_eq!(o.codes[rank], Some(0), "{scenario}: rank {rank}:\n{}", o.output[rank]);
            assert!(o.output[rank].contains(&format!("(peer rank {victim})")), "{}", o.output[rank]);
        }
        assert!(o.elapsed < Duration::from_secs(10), "{scenario} took {:?}", o.elapsed);
    }
}
