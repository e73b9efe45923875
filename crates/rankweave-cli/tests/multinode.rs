//! Several `rankweave launch` processes acting as the nodes of one job, on
//! loopback: node 0's launcher hosts the store, a failure anywhere stops
//! every node naming the same rank and node, a killed launcher is found
//! through its missing heartbeats, and the demo runs TP inside a node and
//! PP across nodes. The `netns_*` tests run the same across network
//! namespaces (one per node, each with its own address and host name; see
//! `crates/rankweave/tests/netns`).

mod common;
#[path = "../../rankweave/tests/netns/mod.rs"]
mod netns;

use common::{assert_gone, Scratch};
use netns::Cluster;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A launcher still running after this long is killed and the test fails.
const GUARD: Duration = Duration::from_secs(90);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One node's launcher, running.
struct Node {
    child: Child,
    started: Instant,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
}

#[derive(Debug)]
struct Ended {
    status: ExitStatus,
    /// When it ended.
    at: Instant,
    stdout: String,
    stderr: String,
}

fn reader(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

impl Node {
    /// `rankweave <sub> --nnodes <n> --node-rank <k> --master-addr 127.0.0.1 --master-port <port> <args>`.
    fn start(sub: &str, n: usize, k: usize, port: u16, args: &[&str], env: &[(&str, &str)]) -> Node {
        Node::start_at("127.0.0.1", sub, n, k, port, args, env)
    }

    /// [`Node::start`] with another master address.
    fn start_at(addr: &str, sub: &str, n: usize, k: usize, port: u16, args: &[&str], env: &[(&str, &str)]) -> Node {
        Node::spawn(Command::new(env!("CARGO_BIN_EXE_rankweave")), sub, (n, k), (addr, port), args, env)
    }

    /// `rankweave <sub>` as node `k` of `cluster` (inside its network
    /// namespace, under its host name), the master at node 0's address.
    fn start_in(cluster: &Cluster, k: usize, sub: &str, args: &[&str], env: &[(&str, &str)]) -> Node {
        let mut cmd = cluster.command(k, env!("CARGO_BIN_EXE_rankweave"));
        cmd.env_remove("RANKWEAVE_TRANSPORT").env_remove("RANKWEAVE_SOCKET_IFNAME");
        Node::spawn(cmd, sub, (cluster.len(), k), (&cluster.addr(0), 29500), args, env)
    }

    /// Runs `cmd <sub> --nnodes n --node-rank k --master-addr A --master-port P <args>`.
    fn spawn(
        mut cmd: Command,
        sub: &str,
        (n, k): (usize, usize),
        (addr, port): (&str, u16),
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        cmd.arg(sub)
            .args(["--nnodes", &n.to_string(), "--node-rank", &k.to_string()])
            .args(["--master-addr", addr, "--master-port", &port.to_string()])
            .args(args)
            .env_remove("RANKWEAVE_JOB_ID")
            .env_remove("RANKWEAVE_TOKEN")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn rankweave");
        let out = child.stdout.take().map(reader);
        let err = child.stderr.take().map(reader);
        Node { child, started: Instant::now(), out, err }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn wait(mut self) -> Ended {
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if self.started.elapsed() > GUARD {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("a launcher did not finish within {GUARD:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let at = Instant::now();
        let stdout = self.out.take().map(|t| t.join().unwrap()).unwrap_or_default();
        let stderr = self.err.take().map(|t| t.join().unwrap()).unwrap_or_default();
        Ended { status, at, stdout, stderr }
    }
}

/// Starts `n` launchers of `nproc` workers each running `sh -c script`.
fn launch_sh(n: usize, nproc: usize, port: u16, script: &str) -> Vec<Node> {
    let nproc = nproc.to_string();
    (0..n)
        .map(|k| {
            Node::start(
                "launch",
                n,
                k,
                port,
                &["--nproc-per-node", &nproc, "--grace", "1", "--", "sh", "-c", script],
                &[],
            )
        })
        .collect()
}

/// Lines `[rank] a b c` of `text` as (rank, fields).
fn rank_lines(text: &str) -> Vec<(usize, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let (tag, rest) = l.strip_prefix('[')?.split_once("] ")?;
            Some((tag.parse().ok()?, rest.split(' ').map(String::from).collect()))
        })
        .collect()
}

#[test]
fn two_and_three_nodes_pass_with_their_environment() {
    for (n, nproc) in [(2, 2), (3, 1)] {
        let port = free_port();
        let script = "echo $RANK $LOCAL_RANK $WORLD_SIZE $GROUP_RANK $MASTER_PORT $RANKWEAVE_STORE_HOSTED";
        let ended: Vec<Ended> = launch_sh(n, nproc, port, script).into_iter().map(Node::wait).collect();
        for (k, e) in ended.iter().enumerate() {
            assert!(e.status.success(), "node {k} of {n}: {e:?}");
            let mut lines = rank_lines(&e.stdout);
            lines.sort();
            assert_eq!(lines.len(), nproc, "node {k}: {}", e.stdout);
            for (i, (rank, f)) in lines.iter().enumerate() {
                assert_eq!(*rank, k * nproc + i);
                let want = [rank.to_string(), i.to_string(), (n * nproc).to_string(), k.to_string(), port.to_string()];
                assert_eq!(&f[..5], &want, "node {k}");
                assert_eq!(f[5], "1", "the store is hosted by node 0's launcher");
            }
        }
    }
}

#[test]
fn a_failed_worker_on_node_1_stops_every_node_naming_it() {
    let port = free_port();
    // Rank 3 (node 1 of 3, two ranks a node) fails after a second; the rest would run 60 s.
    let script = "if [ $RANK = 3 ]; then sleep 1; exit 3; fi; exec sleep 60";
    let nodes = launch_sh(3, 2, port, script);
    let start = Instant::now();
    let ended: Vec<Ended> = nodes.into_iter().map(Node::wait).collect();
    for (k, e) in ended.iter().enumerate() {
        assert_eq!(e.status.code(), Some(3), "node {k}: {e:?}");
        assert!(
            e.stderr.contains("job failed: rank 3 on node 1 (host ") && e.stderr.contains(") exited with code 3"),
            "node {k} must name rank 3 on node 1: {}",
            e.stderr
        );
        // One second of work, then a few seconds to agree and stop.
        let took = e.at.duration_since(start);
        assert!(took < Duration::from_secs(12), "node {k} took {took:?}");
    }
}

#[test]
fn a_killed_launcher_of_node_1_fails_node_0_within_10_s_and_leaves_no_worker() {
    let scratch = Scratch::new("kill1");
    let port = free_port();
    let script = format!("echo $$ > {}/$RANK; exec sleep 60", scratch.path());
    let mut nodes = launch_sh(2, 2, port, &script);
    let pids = scratch.wait_pids(4);
    let node1 = nodes.pop().unwrap();
    kill(node1.pid(), Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    let e1 = node1.wait();
    assert_eq!(e1.status.code(), None, "node 1's launcher was killed: {e1:?}");
    let e0 = nodes.pop().unwrap().wait();
    let took = e0.at.duration_since(killed_at);
    assert!(!e0.status.success(), "{e0:?}");
    assert!(took < Duration::from_secs(10), "node 0 ended {took:?} after the kill");
    assert!(
        e0.stderr.contains("job failed: ranks 2-3 on node 1 (host ") && e0.stderr.contains("lost"),
        "{}",
        e0.stderr
    );
    // Node 1's workers died with their launcher; node 0's were stopped.
    assert_gone(&pids, Duration::from_secs(3));
}

#[test]
fn a_killed_launcher_of_node_0_fails_the_others_naming_node_0() {
    let port = free_port();
    let scratch = Scratch::new("kill0");
    let script = format!("echo $$ > {}/$RANK; exec sleep 60", scratch.path());
    let mut nodes = launch_sh(3, 1, port, &script);
    let pids = scratch.wait_pids(3);
    let node0 = nodes.remove(0);
    kill(node0.pid(), Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    let _ = node0.wait();
    for (k, node) in nodes.into_iter().enumerate() {
        let e = node.wait();
        let took = e.at.duration_since(killed_at);
        assert!(!e.status.success(), "node {}: {e:?}", k + 1);
        assert!(took < Duration::from_secs(10), "node {} ended {took:?} after the kill", k + 1);
        assert!(e.stderr.contains("job failed: rank 0 on node 0 (host "), "node {}: {}", k + 1, e.stderr);
    }
    assert_gone(&pids, Duration::from_secs(3));
}

#[test]
fn mismatched_tokens_and_absent_nodes_fail_within_the_bound() {
    let port = free_port();
    let args = ["--nproc-per-node", "1", "--", "sleep", "30"];
    let n0 = Node::start("launch", 2, 0, port, &args, &[("RANKWEAVE_TOKEN", "right"), ("RANKWEAVE_TIMEOUT", "4")]);
    let n1 = Node::start("launch", 2, 1, port, &args, &[("RANKWEAVE_TOKEN", "wrong")]);
    let e1 = n1.wait();
    assert!(!e1.status.success() && e1.stderr.contains("nauthorized"), "{e1:?}");
    assert!(e1.at.duration_since(n0.started) < Duration::from_secs(10), "a refused token is final");
    // Node 0 waits for node 1 until RANKWEAVE_TIMEOUT, then names it.
    let e0 = n0.wait();
    assert!(!e0.status.success(), "{e0:?}");
    assert!(e0.stderr.contains("rank 1 on node 1 never joined"), "{}", e0.stderr);
    assert!(e0.at.duration_since(e1.at) < Duration::from_secs(15), "{e0:?}");
}

/// Waits for the two launchers of a 2 x 2 demo and checks that both
/// succeeded, rank 0 printed PASS, and TP stayed inside node 0 while PP
/// crossed to node 1.
fn demo_passed(nodes: Vec<Node>) -> Vec<Ended> {
    let ended: Vec<Ended> = nodes.into_iter().map(Node::wait).collect();
    for (k, e) in ended.iter().enumerate() {
        assert!(e.status.success(), "node {k}: {e:?}");
    }
    let e0 = &ended[0];
    assert!(e0.stdout.contains("[0] PASS: 4 generated token ids equal the single-process model's"), "{}", e0.stdout);
    assert!(e0.stdout.contains("rank 0: tp group [0, 1] (rank 0 in it), pp group [0, 2] (stage 0 of 2)"), "{e0:?}");
    assert!(ended[1].stdout.contains("node 1: every worker finished"), "{:?}", ended[1]);
    ended
}

#[test]
fn demo_across_two_nodes_passes() {
    let port = free_port();
    let nodes: Vec<Node> = (0..2).map(|k| Node::start("demo", 2, k, port, &DEMO_MODEL, &[])).collect();
    let ended = demo_passed(nodes);
    let e1 = &ended[1];
    assert!(e1.stdout.contains("rank 2: tp group [2, 3] (rank 0 in it), pp group [0, 2] (stage 1 of 2)"), "{e1:?}");
}

#[test]
fn ranks_of_node_0_may_leave_while_node_1_still_builds_groups() {
    // Ranks 2 and 3 start building groups 1.5 s late; 0 and 1 finish and
    // exit first. The store lives in node 0's launcher, so nobody loses it.
    for round in 0..3 {
        let port = free_port();
        let exe = env!("CARGO_BIN_EXE_rankweave");
        let args = [
            "--nproc-per-node",
            "2",
            "--",
            exe,
            "selftest",
            "--tp",
            "2",
            "--pp",
            "2",
            "--delay-from-rank",
            "2",
            "--delay",
            "1.5",
        ];
        let env = [("RANKWEAVE_TOKEN", "s3cret"), ("RANKWEAVE_TIMEOUT", "30")];
        let nodes: Vec<Node> = (0..2).map(|k| Node::start("launch", 2, k, port, &args, &env)).collect();
        let ended: Vec<Ended> = nodes.into_iter().map(Node::wait).collect();
        for (k, e) in ended.iter().enumerate() {
            assert!(e.status.success(), "round {round}, node {k}: {e:?}");
        }
        assert!(ended[0].stdout.contains("rank 0: tp group [0, 1] all_reduce ok (1)"), "{:?}", ended[0]);
        assert!(ended[1].stdout.contains("rank 3: tp group [2, 3] all_reduce ok (5)"), "{:?}", ended[1]);
    }
}

/// A demo long enough to be killed in the middle of.
const LONG_DEMO: [&str; 10] =
    ["--layers", "2", "--hidden", "64", "--heads", "4", "--vocab", "128", "--tokens", "20000"];

/// Starts the two nodes of a long demo with `start`, SIGKILLs node 1's
/// launcher 3 s in, and returns how node 0 ended: non-zero, within 10 s.
fn kill_node_1_mid_demo(start: impl Fn(usize) -> Node) -> Ended {
    let mut nodes: Vec<Node> = (0..2).map(start).collect();
    std::thread::sleep(Duration::from_secs(3));
    let node1 = nodes.pop().unwrap();
    kill(node1.pid(), Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    let _ = node1.wait();
    let e0 = nodes.pop().unwrap().wait();
    let took = e0.at.duration_since(killed_at);
    assert!(!e0.status.success(), "{e0:?}");
    assert!(took < Duration::from_secs(10), "node 0 ended {took:?} after the kill");
    e0
}

#[test]
fn a_killed_node_is_named_even_when_its_peers_fail_first() {
    // Real collective workers: when node 1's launcher dies its workers die
    // with it and node 0's workers fail at once (peer lost); the verdict
    // still names node 1, whose heartbeat stopped, not a rank of node 0.
    let port = free_port();
    let e0 = kill_node_1_mid_demo(|k| Node::start("demo", 2, k, port, &LONG_DEMO, &[]));
    assert!(e0.stderr.contains("job failed: ranks 2-3 on node 1 (host "), "{}", e0.stderr);
    assert!(!e0.stderr.contains("job failed: rank 0 on node 0") && !e0.stderr.contains("job failed: rank 1 on node 0"));
}

#[test]
fn bench_checks_every_collective_across_two_nodes() {
    let port = free_port();
    let exe = env!("CARGO_BIN_EXE_rankweave");
    let args = ["--nproc-per-node", "2", "--", exe, "bench", "all", "-b", "8", "-e", "4K", "-f", "8"];
    let nodes: Vec<Node> = (0..2).map(|k| Node::start("launch", 2, k, port, &args, &[])).collect();
    let ended: Vec<Ended> = nodes.into_iter().map(Node::wait).collect();
    for (k, e) in ended.iter().enumerate() {
        assert!(e.status.success(), "node {k}: {e:?}");
    }
    let out = &ended[0].stdout;
    let checked = out.matches("# Out of bounds values : 0 OK").count();
    assert!(checked >= 8, "every collective checked on 4 ranks over 2 nodes: {out}");
    assert!(!out.contains("FAILED") && out.contains("world_size=4"), "{out}");
}

#[test]
fn a_launcher_given_another_shape_fails_the_job_at_once() {
    let port = free_port();
    let n0 = Node::start("launch", 2, 0, port, &["--nproc-per-node", "1", "--", "sleep", "30"], &[]);
    let n1 = Node::start("launch", 2, 1, port, &["--nproc-per-node", "2", "--", "sleep", "30"], &[]);
    let e1 = n1.wait();
    assert_eq!(e1.status.code(), Some(2), "{e1:?}");
    assert!(e1.stderr.contains("node 0 runs --nnodes 2 --nproc-per-node 1, but the launcher of node 1"), "{e1:?}");
    let e0 = n0.wait();
    assert!(!e0.status.success(), "{e0:?}");
    assert!(e0.stderr.contains("job failed: node 0 runs --nnodes 2 --nproc-per-node 1"), "{e0:?}");
    assert!(e0.at.duration_since(e1.at) < Duration::from_secs(8), "{e0:?}");
}

#[test]
fn an_ipv6_master_address_works() {
    let Ok(probe) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("SKIP an_ipv6_master_address_works: this machine has no IPv6 loopback (::1)");
        return;
    };
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let exe = env!("CARGO_BIN_EXE_rankweave");
    let args = ["--nproc-per-node", "2", "--", exe, "selftest", "--tp", "2", "--pp", "2"];
    let nodes: Vec<Node> = (0..2).map(|k| Node::start_at("::1", "launch", 2, k, port, &args, &[])).collect();
    let ended: Vec<Ended> = nodes.into_iter().map(Node::wait).collect();
    for (k, e) in ended.iter().enumerate() {
        assert!(e.status.success(), "node {k}: {e:?}");
    }
    assert!(ended[0].stdout.contains("rank 1: tp group [0, 1] all_reduce ok (1)"), "{:?}", ended[0]);
    assert!(ended[1].stdout.contains("rank 2: tp group [2, 3] all_reduce ok (5)"), "{:?}", ended[1]);
}

const DEMO_MODEL: [&str; 10] = ["--layers", "2", "--hidden", "64", "--heads", "4", "--vocab", "128", "--tokens", "4"];

#[test]
fn netns_demo_across_two_nodes_passes() {
    let Some(c) = Cluster::new(2) else { return };
    let nodes: Vec<Node> = (0..2).map(|k| Node::start_in(&c, k, "demo", &DEMO_MODEL, &[])).collect();
    demo_passed(nodes);
}

#[test]
fn netns_bench_checks_every_collective_across_two_nodes() {
    let Some(c) = Cluster::new(2) else { return };
    let exe = env!("CARGO_BIN_EXE_rankweave");
    let args = ["--nproc-per-node", "2", "--", exe, "bench", "all", "-b", "8", "-e", "64K", "-f", "8"];
    let before = c.tx_bytes(1);
    let nodes: Vec<Node> = (0..2).map(|k| Node::start_in(&c, k, "launch", &args, &[])).collect();
    let ended: Vec<Ended> = nodes.into_iter().map(Node::wait).collect();
    for (k, e) in ended.iter().enumerate() {
        assert!(e.status.success(), "node {k}: {e:?}");
    }
    let out = &ended[0].stdout;
    let checked = out.matches("# Out of bounds values : 0 OK").count();
    assert!(checked >= 8, "every collective checked on 4 ranks over 2 nodes: {out}");
    assert!(!out.contains("FAILED") && out.contains("world_size=4"), "{out}");
    assert!(c.tx_bytes(1) > before + 100_000, "the traffic crossed the veth");
}

#[test]
fn netns_a_killed_launcher_mid_run_fails_the_other_node_within_10_s_naming_it() {
    let Some(c) = Cluster::new(2) else { return };
    // `ip netns exec` execs: the child killed is the launcher itself.
    let e0 = kill_node_1_mid_demo(|k| Node::start_in(&c, k, "demo", &LONG_DEMO, &[]));
    assert!(e0.stderr.contains("job failed: ranks 2-3 on node 1 (host node1)"), "{}", e0.stderr);
}
