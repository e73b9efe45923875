//! Integration tests for `rankweave launch` and `rankweave demo`: they run
//! the real binary with `sh` workers.

mod common;

use common::{assert_gone, Scratch};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Every test run is killed after this long so a bug cannot hang the suite.
const GUARD: Duration = Duration::from_secs(40);

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

fn launcher(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rankweave"));
    cmd.arg("launch").args(args).env_remove("RANKWEAVE_JOB_ID").env_remove("RUST_LOG");
    cmd
}

/// Spawns `cmd`, calls `during(pid)` while it runs, and collects its output.
fn run_with(mut cmd: Command, during: impl FnOnce(Pid)) -> Run {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn rankweave");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    during(Pid::from_raw(child.id() as i32));
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > GUARD {
            let _ = child.kill();
            panic!("rankweave did not finish within {GUARD:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    Run { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap(), elapsed }
}

fn run(cmd: Command) -> Run {
    run_with(cmd, |_| {})
}

/// Splits `[rank] rest` lines; panics on an unprefixed line.
fn by_rank(text: &str) -> BTreeMap<usize, Vec<String>> {
    let mut map: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let rest = line.strip_prefix('[').unwrap_or_else(|| panic!("unprefixed line {line:?}"));
        let (rank, body) = rest.split_once("] ").unwrap_or_else(|| panic!("bad prefix in {line:?}"));
        map.entry(rank.parse().unwrap()).or_default().push(body.to_string());
    }
    map
}

const ENV_SCRIPT: &str = "echo $RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $GROUP_RANK $MASTER_ADDR $MASTER_PORT \
                          ${OMP_NUM_THREADS:-unset} $RANKWEAVE_JOB_ID";

#[test]
fn every_rank_gets_its_environment() {
    let mut cmd = launcher(&["--nproc-per-node", "3", "--", "sh", "-c", ENV_SCRIPT]);
    cmd.env_remove("OMP_NUM_THREADS");
    let r = run(cmd);
    assert!(r.status.success(), "{r:?}", r = r.stderr);
    let lines = by_rank(&r.stdout);
    assert_eq!(lines.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
    let mut ports = Vec::new();
    let mut jobs = Vec::new();
    for (rank, body) in &lines {
        assert_eq!(body.len(), 1);
        let f: Vec<&str> = body[0].split(' ').collect();
        assert_eq!(f.len(), 9, "{body:?}");
        let r = rank.to_string();
        assert_eq!(&f[..6], &[r.as_str(), r.as_str(), "3", "3", "0", "127.0.0.1"]);
        ports.push(f[6].parse::<u16>().unwrap());
        assert_eq!(f[7], "1", "OMP_NUM_THREADS=1 with more than one worker");
        assert!(!f[8].is_empty() && f[8].chars().all(|c| c.is_ascii_alphanumeric()), "job id {:?}", f[8]);
        jobs.push(f[8].to_string());
    }
    assert!(ports[0] != 0 && ports.iter().all(|&p| p == ports[0]), "{ports:?}");
    assert!(jobs.iter().all(|j| *j == jobs[0]));
}

#[test]
fn an_explicit_port_is_used_as_given() {
    // (Several nodes: tests/multinode.rs; the 29500 default: a unit test.)
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    // One worker: no OMP_NUM_THREADS; an explicit port is used as given.
    let mut cmd = launcher(&["--nproc-per-node", "1", "--master-port", &port, "--", "sh", "-c", ENV_SCRIPT]);
    cmd.env_remove("OMP_NUM_THREADS");
    let r = run(cmd);
    assert!(r.status.success(), "{}", r.stderr);
    let f: Vec<String> = by_rank(&r.stdout)[&0][0].split(' ').map(String::from).collect();
    assert_eq!(&f[..8], &["0", "0", "1", "1", "0", "127.0.0.1", port.as_str(), "unset"]);
}

#[test]
fn job_id_from_environment_is_reused() {
    let mut cmd = launcher(&["--nproc-per-node", "2", "--", "sh", "-c", "echo $RANKWEAVE_JOB_ID"]);
    cmd.env("RANKWEAVE_JOB_ID", "given_42");
    let r = run(cmd);
    assert!(r.status.success(), "{}", r.stderr);
    let lines = by_rank(&r.stdout);
    assert_eq!(lines[&0], vec!["given_42"]);
    assert_eq!(lines[&1], vec!["given_42"]);
}

#[test]
fn output_is_prefixed_line_by_line_under_load() {
    const LINES: usize = 400;
    let script = format!(
        "i=0; while [ $i -lt {LINES} ]; do echo \"out $RANK $i abcdefghijklmnopqrstuvwxyz0123456789\"; \
         echo \"err $RANK $i\" >&2; i=$((i+1)); done; printf \"tail $RANK\"; printf \"etail $RANK\" >&2"
    );
    let r = run(launcher(&["--nproc-per-node", "4", "--", "sh", "-c", &script]));
    assert!(r.status.success(), "{}", r.stderr);
    for (text, kind, tail) in [(&r.stdout, "out", "tail"), (&r.stderr, "err", "etail")] {
        let lines = by_rank(text);
        assert_eq!(lines.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2, 3], "{kind}");
        for (rank, body) in lines {
            assert_eq!(body.len(), LINES + 1, "rank {rank} {kind}");
            for (i, line) in body[..LINES].iter().enumerate() {
                let mut want = format!("{kind} {rank} {i}");
                if kind == "out" {
                    want.push_str(" abcdefghijklmnopqrstuvwxyz0123456789");
                }
                assert_eq!(line, &want);
            }
            // The last fragment had no newline and still arrives, prefixed.
            assert_eq!(body[LINES], format!("{tail} {rank}"));
        }
    }
}

#[test]
fn no_prefix_passes_output_through() {
    let r = run(launcher(&["--no-prefix", "--nproc-per-node", "2", "--", "sh", "-c", "echo plain$RANK"]));
    assert!(r.status.success(), "{}", r.stderr);
    let mut lines: Vec<&str> = r.stdout.lines().collect();
    lines.sort();
    assert_eq!(lines, vec!["plain0", "plain1"]);
}

#[test]
fn failing_rank_stops_the_others_and_sets_the_exit_code() {
    let dir = Scratch::new("fail");
    // Ranks 0, 2, 3 record their pid and a background child's pid, then
    // wait; rank 1 exits 3 once all of them are ready.
    let script = format!(
        "D={d}; if [ $RANK = 1 ]; then for r in 0 2 3; do while [ ! -s $D/bg$r ]; do sleep 0.02; done; done; exit 3; fi; \
         echo $$ > $D/w$RANK; sleep 30 & echo $! > $D/bg$RANK; wait",
        d = dir.path()
    );
    let r = run(launcher(&["--nproc-per-node", "4", "--", "sh", "-c", &script]));
    assert_eq!(r.status.code(), Some(3), "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(10), "took {:?}", r.elapsed);
    let msg: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("rankweave launch:")).collect();
    assert_eq!(msg.len(), 1, "{}", r.stderr);
    assert!(msg[0].contains("rank 1 (pid ") && msg[0].contains("exited with code 3"), "{}", msg[0]);
    assert!(msg[0].contains("stopping 3 other workers"), "{}", msg[0]);
    let pids = dir.recorded_pids();
    assert_eq!(pids.len(), 6);
    assert_gone(&pids, Duration::from_secs(2));
}

#[test]
fn death_by_signal_exits_128_plus_signal() {
    let script = "if [ $RANK = 0 ]; then sleep 0.1; kill -9 $$; fi; exec sleep 30";
    let r = run(launcher(&["--nproc-per-node", "2", "--", "sh", "-c", script]));
    assert_eq!(r.status.code(), Some(128 + 9), "{}", r.stderr);
    assert!(r.stderr.contains("rank 0 (pid ") && r.stderr.contains("signal 9 (SIGKILL)"), "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(10));
}

#[test]
fn workers_ignoring_sigterm_are_killed_after_the_grace_period() {
    let dir = Scratch::new("grace");
    let script = format!(
        "D={d}; if [ $RANK = 0 ]; then while [ ! -s $D/w1 ] || [ ! -s $D/w2 ]; do sleep 0.02; done; exit 5; fi; \
         trap '' TERM; echo $$ > $D/w$RANK; exec sleep 30",
        d = dir.path()
    );
    let r = run(launcher(&["--nproc-per-node", "3", "--grace", "1", "--", "sh", "-c", &script]));
    assert_eq!(r.status.code(), Some(5), "{}", r.stderr);
    assert!(r.elapsed >= Duration::from_millis(900), "SIGKILL came before the grace period: {:?}", r.elapsed);
    assert!(r.elapsed < Duration::from_secs(10), "took {:?}", r.elapsed);
    let pids = dir.recorded_pids();
    assert_eq!(pids.len(), 2);
    assert_gone(&pids, Duration::from_secs(2));
}

#[test]
fn sigterm_to_the_launcher_is_forwarded() {
    let dir = Scratch::new("sigterm");
    let script = format!("echo $$ > {d}/w$RANK; exec sleep 30", d = dir.path());
    let cmd = launcher(&["--nproc-per-node", "3", "--", "sh", "-c", &script]);
    let mut sent = Instant::now();
    let r = run_with(cmd, |pid| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while dir.recorded_pids().len() < 3 {
            assert!(Instant::now() < deadline, "workers did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        sent = Instant::now();
        kill(pid, Signal::SIGTERM).unwrap();
    });
    assert_eq!(r.status.code(), Some(128 + 15), "{}", r.stderr);
    assert!(sent.elapsed() < Duration::from_secs(5), "launcher took {:?} after SIGTERM", sent.elapsed());
    assert!(r.stderr.contains("received SIGTERM; stopping 3 workers"), "{}", r.stderr);
    assert_gone(&dir.recorded_pids(), Duration::from_secs(2));
}

#[test]
fn bad_arguments_exit_2() {
    let cases: &[&[&str]] = &[
        &["--nproc-per-node", "0", "--", "true"],
        &["--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "2", "--", "true"],
        &["--nproc-per-node", "1", "--nnodes", "0", "--", "true"],
        &["--nproc-per-node", "2"],
        &["--nproc-per-node", "2", "--"],
        &["--nproc-per-node", "x", "--", "true"],
        &["--nproc-per-node", "1", "--grace", "nan", "--", "true"],
        &["--", "true"],
    ];
    for args in cases {
        let r = run(launcher(args));
        assert_eq!(r.status.code(), Some(2), "{args:?}: {}", r.stderr);
        assert!(!r.stderr.trim().is_empty(), "{args:?}: no message");
        assert!(r.stdout.is_empty(), "{args:?}: {}", r.stdout);
    }
}

#[test]
fn missing_program_exits_127() {
    let r = run(launcher(&["--nproc-per-node", "2", "--", "/nonexistent/rankweave-no-such-program"]));
    assert_eq!(r.status.code(), Some(127), "{}", r.stderr);
    assert!(r.stderr.contains("cannot start"), "{}", r.stderr);
}

#[test]
fn leftover_shared_memory_of_the_job_is_removed() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm; skipping");
        return;
    }
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let job = format!("t{}x{nanos}", std::process::id());
    // Another job whose id shares our id as a prefix keeps its segment, and
    // so does a live job that shares our very id (its creator, pid 1 here,
    // is none of this launcher's workers).
    let other = shm.join(format!("rankweave-{job}2-keep"));
    std::fs::write(&other, b"x").unwrap();
    let twin = shm.join(format!("rankweave-{job}-twin-1-0"));
    std::fs::write(&twin, b"x").unwrap();
    // Segment names end in `-<creator pid>-<n>`; `$$` is the worker's pid.
    let script = "touch /dev/shm/rankweave-${RANKWEAVE_JOB_ID}-seg$RANK-$$-0; if [ $RANK = 1 ]; then kill -9 $$; fi";
    let mut cmd = launcher(&["--nproc-per-node", "2", "--", "sh", "-c", script]);
    cmd.env("RANKWEAVE_JOB_ID", &job);
    let r = run(cmd);
    assert_eq!(r.status.code(), Some(137), "{}", r.stderr);
    let left: Vec<String> = std::fs::read_dir(shm)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with(&format!("rankweave-{job}-seg")))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(other.exists(), "another job's segment was removed");
    assert!(twin.exists(), "a segment of another job with the same id was removed");
    std::fs::remove_file(&twin).unwrap();
    std::fs::remove_file(&other).unwrap();
}

#[test]
fn demo_passes() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rankweave"));
    // A tiny three-stage pipeline; tests/demo.rs covers the other layouts.
    let tiny = ["--hidden", "32", "--heads", "2", "--layers", "3", "--vocab", "64", "--tokens", "3"];
    cmd.args(["demo", "--nproc", "3", "--tp", "1", "--pp", "3"]).args(tiny).env_remove("RANKWEAVE_JOB_ID");
    let r = run(cmd);
    assert!(r.status.success(), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(
        r.stdout.lines().filter(|l| l.contains("] rank ") && l.contains(": tp group")).count(),
        3,
        "{}",
        r.stdout
    );
    assert!(r.stdout.lines().any(|l| l.starts_with("[0] PASS")), "{}", r.stdout);
}

#[test]
fn topology_prints_the_seed_layout() {
    let r = run({
        let mut c = Command::new(env!("CARGO_BIN_EXE_rankweave"));
        c.args(["topology", "--world", "8", "--tp", "2", "--pp", "4"]);
        c
    });
    assert!(r.status.success(), "{}", r.stderr);
    for g in ["[0, 1]", "[2, 3]", "[4, 5]", "[6, 7]", "[0, 2, 4, 6]", "[1, 3, 5, 7]"] {
        assert!(r.stdout.contains(g), "missing group {g} in:\n{}", r.stdout);
    }
    let bad = run({
        let mut c = Command::new(env!("CARGO_BIN_EXE_rankweave"));
        c.args(["topology", "--world", "8", "--tp", "3", "--pp", "2"]);
        c
    });
    assert_eq!(bad.status.code(), Some(2), "{}", bad.stderr);
    assert!(bad.stderr.contains("8") && bad.stderr.contains("3") && bad.stderr.contains("2"), "{}", bad.stderr);
}

/// `Cpus_allowed_list` of this process (as `/proc/self/status` writes it).
fn my_cpu_list() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string()
}

/// The CPUs this process may run on, in order.
fn my_cpus() -> Vec<usize> {
    let set = nix::sched::sched_getaffinity(Pid::from_raw(0)).unwrap();
    (0..nix::sched::CpuSet::count()).filter(|&c| set.is_set(c).unwrap()).collect()
}

const CPU_SCRIPT: &str = "grep Cpus_allowed_list /proc/self/status | cut -f2";

#[test]
fn bound_workers_each_run_on_a_cpu_of_their_own() {
    let cpus = my_cpus();
    let n = cpus.len().min(3);
    for policy in ["core", "auto"] {
        let r = run(launcher(&["--nproc-per-node", &n.to_string(), "--bind-to", policy, "--", "sh", "-c", CPU_SCRIPT]));
        assert!(r.status.success(), "{}", r.stderr);
        let lines = by_rank(&r.stdout);
        assert_eq!(lines.len(), n, "{}", r.stdout);
        for (k, body) in &lines {
            assert_eq!(body, &vec![cpus[*k].to_string()], "--bind-to {policy}: rank {k} of {n}, CPUs {cpus:?}");
        }
    }
}

#[test]
fn more_workers_than_cpus_stay_unbound_under_auto_and_are_refused_under_core() {
    let n = (my_cpus().len() + 1).to_string();
    let whole = my_cpu_list();
    for args in [vec!["--bind-to", "auto"], vec![]] {
        let mut a = vec!["--nproc-per-node", n.as_str()];
        a.extend(args);
        a.extend(["--", "sh", "-c", CPU_SCRIPT]);
        let r = run(launcher(&a));
        assert!(r.status.success(), "{}", r.stderr);
        for body in by_rank(&r.stdout).values() {
            assert_eq!(body, &vec![whole.clone()], "{a:?}");
        }
    }
    let r = run(launcher(&["--nproc-per-node", &n, "--bind-to", "core", "--", "sh", "-c", CPU_SCRIPT]));
    assert_eq!(r.status.code(), Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("--bind-to core") && r.stderr.contains(&format!("{n} workers")), "{}", r.stderr);
    assert!(r.stdout.is_empty(), "no worker starts: {}", r.stdout);
}
