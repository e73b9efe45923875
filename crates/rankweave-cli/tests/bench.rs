//! `rankweave bench` end to end: the real binary, real processes.

use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rankweave"));
    c.env_remove("RANK").env_remove("WORLD_SIZE").env_remove("MASTER_ADDR").env_remove("MASTER_PORT");
    c.env("RANKWEAVE_TIMEOUT", "60");
    c
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rankweave-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run rankweave")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `bench ARGS --check 1 --csv NAME`, which must succeed with every
/// element right; returns its standard output and the CSV.
fn run_checked_csv(name: &str, args: &[&str]) -> (String, String) {
    let csv = tmp(name);
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--check", "1", "--csv", csv.to_str().unwrap()]);
    let o = run(&all);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("Out of bounds values : 0 OK"), "{}", text(&o));
    (out, std::fs::read_to_string(&csv).unwrap())
}

const COLUMNS: &str = "impl,op,mode,world_size,bytes,iters,median_us,mean_us,min_us,algbw_GBps,busbw_GBps,note";

#[test]
fn all_reduce_over_two_processes_writes_the_anchor_csv() {
    let csv = tmp("ar.csv");
    let o = run(&[
        "bench",
        "all_reduce",
        "--nproc",
        "2",
        "-b",
        "8",
        "-e",
        "64K",
        "-f",
        "4",
        "-n",
        "5",
        "-w",
        "1",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("# Out of bounds values : 0 OK"), "{}", text(&o));
    assert!(out.contains("# Avg bus bandwidth"), "{}", text(&o));
    assert!(out.contains("#wrong"));
    let body = std::fs::read_to_string(&csv).unwrap();
    let mut lines = body.lines();
    assert_eq!(lines.next(), Some(COLUMNS));
    let rows: Vec<Vec<String>> = lines.map(|l| l.split(',').map(str::to_string).collect()).collect();
    let sizes: Vec<u64> = rows.iter().map(|r| r[4].parse().unwrap()).collect();
    assert_eq!(sizes, vec![8, 32, 128, 512, 2048, 8192, 32768]);
    for r in &rows {
        assert_eq!(r.len(), 12, "{r:?}");
        assert_eq!(&r[0], "rankweave-auto");
        assert_eq!(&r[1], "all_reduce");
        assert_eq!(&r[2], "loop");
        assert_eq!(&r[3], "2");
        assert_eq!(&r[5], "5");
        let (med, min, algbw, busbw): (f64, f64, f64, f64) =
            (r[6].parse().unwrap(), r[8].parse().unwrap(), r[9].parse().unwrap(), r[10].parse().unwrap());
        assert!(med > 0.0 && med < 1e6 && min <= med, "{r:?}");
        assert_eq!(algbw, busbw, "2(n-1)/n = 1 at n = 2: {r:?}");
    }
}

#[test]
fn every_operation_at_three_ranks_in_both_modes_with_json_and_plot() {
    let (json, svg) = (tmp("all.json"), tmp("all.svg"));
    let o = run(&[
        "bench",
        "all",
        "--nproc",
        "3",
        "-b",
        "4",
        "-e",
        "4K",
        "-f",
        "32",
        "-n",
        "3",
        "-w",
        "1",
        "-r",
        "2",
        "--mode",
        "both",
        "--transport",
        "tcp",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("FAILED"), "{}", text(&o));
    for op in [
        "all_reduce",
        "all_gather",
        "reduce_scatter",
        "broadcast",
        "reduce",
        "gather",
        "all_to_all",
        "sendrecv",
        "bcast_obj",
    ] {
        assert!(out.contains(&format!("# {op}  mode=loop")), "{op}: {}", text(&o));
        assert!(out.contains(&format!("# {op}  mode=sync")), "{op}: {}", text(&o));
    }
    let j = std::fs::read_to_string(&json).unwrap();
    assert!(j.contains("\"impl\": \"rankweave-tcp\""));
    assert!(j.contains("\"op\": \"reduce_scatter\""));
    assert!(!j.contains("\"wrong\": 1"));
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg"), "{s}");
    assert!(s.trim_end().ends_with("</svg>"));
    assert!(s.matches("<polyline").count() >= 2 * 9, "a line per op and mode on both panels");
}

#[test]
fn plot_draws_csv_files() {
    let (a, b, svg) = (tmp("a.csv"), tmp("b.csv"), tmp("ab.svg"));
    std::fs::write(&a, format!("{COLUMNS}\nrankweave-tcp,all_reduce,loop,2,8,10,5.0,5.0,4.0,0.0016,0.0016,\nrankweave-tcp,all_reduce,loop,2,1024,10,9.0,9.0,8.0,0.11,0.11,\n")).unwrap();
    std::fs::write(&b, format!("{COLUMNS}\nopenmpi-shm,all_reduce,loop,2,8,10,0.3,0.3,0.2,0.026,0.026,\nopenmpi-shm,all_reduce,loop,2,1024,10,1.0,1.0,0.9,1.0,1.0,\nopenmpi-shm,broadcast,loop,2,8,10,0.1,0.1,0.1,0.1,0.1,\n")).unwrap();
    let o = run(&[
        "bench",
        "plot",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--only",
        "all_reduce",
        "-o",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg"));
    assert_eq!(s.matches("<polyline").count(), 4, "two series on two panels");
    assert!(s.contains("openmpi-shm") && s.contains("rankweave-tcp"));
    // no output file: a usage error
    let o = run(&["bench", "plot", a.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[test]
fn bad_arguments_exit_with_2_and_say_why() {
    for args in [
        &["bench", "all_reduce", "-b", "1Q"][..],
        &["bench", "all_reduce", "-d", "float8", "--nproc", "2"],
        &["bench", "nope", "--nproc", "2"],
        &["bench", "broadcast", "--nproc", "2", "-r", "5"],
        &["bench", "all_reduce", "-b", "64K", "-e", "1K", "--nproc", "2"],
        &["bench", "all_reduce", "--nproc", "2", "--busy-threads", "65"],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(!o.stderr.is_empty());
    }
    // neither a launcher's environment nor --nproc
    let o = run(&["bench", "all_reduce"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--nproc"), "{}", text(&o));
}

#[test]
fn a_failing_rank_fails_the_run_and_its_output_is_shown() {
    let t = std::time::Instant::now();
    let o = bin()
        .args(["bench", "all_reduce", "--nproc", "2", "-e", "1K", "-n", "2", "-w", "0"])
        .env("RANKWEAVE_BENCH_FAIL_RANK", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("rank 1 of 2 failed (exit code 3)"), "{}", text(&o));
    assert!(err.contains("RANKWEAVE_BENCH_FAIL_RANK"), "rank 1's own message is shown: {}", text(&o));
    assert!(t.elapsed() < std::time::Duration::from_secs(30), "the other rank was stopped");
}

#[test]
fn runs_under_the_launcher() {
    let csv = tmp("launch.csv");
    let exe = env!("CARGO_BIN_EXE_rankweave");
    let o = run(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        exe,
        "bench",
        "all_reduce,broadcast",
        "-e",
        "1K",
        "-f",
        "16",
        "-n",
        "2",
        "-w",
        "0",
        "-r",
        "1",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("[0] # Out of bounds values : 0 OK"), "rank 0 prints, prefixed: {}", text(&o));
    assert!(!out.contains("[1] #"), "only rank 0 prints the table: {}", text(&o));
    let body = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(body.lines().next(), Some(COLUMNS));
    assert_eq!(body.lines().count(), 1 + 2 * 2, "8 B and 128 B for each op: {body}");
    assert!(body.lines().skip(1).all(|l| l.starts_with("rankweave-auto,") && l.contains(",loop,2,")), "{body}");
}

#[test]
fn message_queue_broadcast_rows_are_bcast_obj_rows() {
    let csv = tmp("mq.csv");
    let o = run(&[
        "bench",
        "mq",
        "--nproc",
        "3",
        "--mode",
        "both",
        "-n",
        "20",
        "-w",
        "2",
        "-e",
        "64K",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let body = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<&str> = body.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "the small object in loop and sync mode (the 1 MiB one is above -e): {body}");
    for (r, mode) in rows.iter().zip(["loop", "sync"]) {
        assert!(r.starts_with(&format!("rankweave-mq,bcast_obj,{mode},3,103,20,")), "{r}");
        assert!(r.contains("readers=2"), "{r}");
    }
}

#[test]
fn shared_memory_transport_checks_out_and_leaves_nothing_in_dev_shm() {
    let csv = tmp("shm.csv");
    let before: Vec<_> =
        std::fs::read_dir("/dev/shm").map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    let o = run(&[
        "bench",
        "all",
        "--nproc",
        "3",
        "--transport",
        "shm",
        "-b",
        "4",
        "-e",
        "64K",
        "-f",
        "64",
        "-n",
        "3",
        "-w",
        "1",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("FAILED"), "{}", text(&o));
    let body = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<&str> = body.lines().skip(1).collect();
    assert!(rows.iter().all(|r| r.starts_with("rankweave-shm,")), "{body}");
    for op in ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce", "gather", "all_to_all", "bcast_obj"]
    {
        assert_eq!(
            rows.iter().filter(|r| r.split(',').nth(1) == Some(op)).count(),
            if op == "bcast_obj" { 1 } else { 3 },
            "{op}: {body}"
        );
    }
    let after: Vec<_> =
        std::fs::read_dir("/dev/shm").map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    let leaked: Vec<_> =
        after.iter().filter(|n| !before.contains(n) && n.to_string_lossy().contains("bench")).collect();
    assert!(leaked.is_empty(), "{leaked:?}");
}

#[test]
fn sendrecv_shm_checks_every_element_and_is_refused_over_tcp() {
    let (_, body) = run_checked_csv(
        "zc.csv",
        &["sendrecv_shm", "--nproc", "2", "--transport", "shm", "--sizes", "8,70K,3M", "-n", "3", "-w", "1"],
    );
    let rows: Vec<&str> = body.lines().skip(1).filter(|r| r.split(',').nth(1) == Some("sendrecv_shm")).collect();
    assert_eq!(rows.len(), 3, "{body}");
    assert!(rows.iter().all(|r| r.contains("zero-copy")), "{body}");

    let o = run(&["bench", "sendrecv_shm", "--nproc", "2", "--transport", "tcp", "--sizes", "8", "-n", "2"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("zero-copy shared-memory buffers"), "{}", text(&o));
}

#[test]
fn busy_threads_beside_the_ranks_are_named_in_every_row_and_change_no_result() {
    let args = "sendrecv,all_reduce --nproc 2 --transport tcp,shm --busy-threads 1 --sizes 8,64K -n 20 -w 2";
    let (out, body) = run_checked_csv("busy.csv", &args.split(' ').collect::<Vec<_>>());
    assert!(out.contains("# 1 busy thread beside the ranks"), "{out}");
    let rows: Vec<&str> = body.lines().skip(1).collect();
    // two ops, two transports, two sizes
    assert_eq!(rows.len(), 8, "{body}");
    assert!(rows.iter().all(|r| r.contains("1 busy thread beside the ranks")), "{body}");
    // Under a launcher nothing spawns the ranks, so nothing runs the threads.
    let o = bin()
        .args(["bench", "all_reduce", "--busy-threads", "1"])
        .env("RANK", "0")
        .env("WORLD_SIZE", "1")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--busy-threads needs --nproc"), "{}", text(&o));
}
