//! `rankweave demo` end to end: real worker processes through the launcher,
//! a tiny model, every (tp, pp) layout the issue names.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A run is killed after this long so a hang fails the test instead of the suite.
const GUARD: Duration = Duration::from_secs(120);

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn demo(args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rankweave"));
    cmd.arg("demo")
        .args(args)
        .env_remove("RANKWEAVE_JOB_ID")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
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
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > GUARD {
            let _ = child.kill();
            panic!("rankweave demo {args:?} did not finish within {GUARD:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run { code: status.code(), stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() }
}

/// A model small enough for the debug build; seed 3 generates four different
/// tokens, so the KV cache sees varied inputs.
const TINY: [&str; 14] = [
    "--hidden",
    "64",
    "--heads",
    "4",
    "--layers",
    "2",
    "--vocab",
    "128",
    "--tokens",
    "4",
    "--prompt-len",
    "3",
    "--seed",
    "3",
];

fn check_layout(tp: usize, pp: usize) {
    let (tp_s, pp_s) = (tp.to_string(), pp.to_string());
    let mut args = vec!["--tp", &tp_s, "--pp", &pp_s];
    args.extend_from_slice(&TINY);
    let r = demo(&args);
    let all = format!("stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert_eq!(r.code, Some(0), "tp {tp} pp {pp}: {all}");
    assert!(r.stdout.lines().any(|l| l.contains("] PASS: 4 generated token ids equal")), "{all}");
    assert!(!r.stdout.contains("FAIL"), "{all}");
    // Every rank reports its place in the layout.
    for rank in 0..tp * pp {
        assert!(r.stdout.contains(&format!("rank {rank}: tp group")), "rank {rank} missing: {all}");
    }
    assert!(r.stdout.contains("tokens/s"), "{all}");
    assert!(r.stdout.contains("single-process reference: "), "{all}");
    assert!(r.stdout.contains("tokens [44, 102, 19, 122]"), "the seeded model changed: {all}");
    if (tp, pp) == (2, 2) {
        assert!(r.stdout.contains("groups: tp [0, 1] [2, 3]; pp [0, 2] [1, 3]"), "{all}");
        assert!(
            r.stdout.contains("[3] rank 3: tp group [2, 3] (rank 1 in it), pp group [1, 3] (stage 1 of 2)"),
            "{all}"
        );
    }
    for op in ["all_reduce", "all_gather", "broadcast_tensor_dict", "send_tensor_dict", "recv_tensor_dict"] {
        assert!(r.stdout.contains(op), "{op} missing from the report: {all}");
    }
}

#[test]
fn tp1_pp1() {
    check_layout(1, 1);
}

#[test]
fn tp2_pp1() {
    check_layout(2, 1);
}

#[test]
fn tp1_pp2() {
    check_layout(1, 2);
}

#[test]
fn tp2_pp2() {
    check_layout(2, 2);
}

#[test]
fn tp4_pp1() {
    check_layout(4, 1);
}

/// `--sequences`: several sequences in flight at once, round robin through
/// the stages; each is checked against its own single-process run.
fn check_sequences(tp: usize, pp: usize, sequences: usize) {
    let (tp_s, pp_s, n_s) = (tp.to_string(), pp.to_string(), sequences.to_string());
    let mut args = vec!["--tp", &tp_s, "--pp", &pp_s, "--sequences", &n_s];
    args.extend_from_slice(&TINY);
    let r = demo(&args);
    let all = format!("stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert_eq!(r.code, Some(0), "tp {tp} pp {pp} sequences {sequences}: {all}");
    assert!(r.stdout.contains(&format!("({sequences} sequences of 4)")), "{all}");
    let passes = r.stdout.lines().filter(|l| l.contains("] PASS: 4 generated token ids equal")).count();
    assert_eq!(passes, sequences, "one PASS per sequence: {all}");
    assert!(!r.stdout.contains("FAIL"), "{all}");
    for s in 0..sequences {
        assert!(r.stdout.contains(&format!("[0] sequence {s}:")), "sequence {s} missing: {all}");
    }
    // Sequence 0 has the prompt of a one-sequence run, so its tokens too;
    // the others have prompts of their own.
    assert!(r.stdout.contains("tokens [44, 102, 19, 122]"), "the seeded model changed: {all}");
    let refs: Vec<&str> = r.stdout.lines().filter(|l| l.contains("single-process reference: ")).collect();
    assert_eq!(refs.len(), sequences, "{all}");
    let tokens = |l: &str| l.split("tokens ").nth(1).unwrap_or_default().to_string();
    assert_ne!(tokens(refs[0]), tokens(refs[1]), "two sequences decoded the same prompt: {all}");
}

#[test]
fn two_sequences_through_two_stages() {
    check_sequences(2, 2, 2);
}

#[test]
fn three_sequences_through_two_stages_and_one_stage() {
    check_sequences(1, 2, 3);
    check_sequences(2, 1, 3);
}

#[test]
fn fail_is_reported_with_a_non_zero_exit() {
    // Summing two TP partials rounds differently from one full dot product,
    // so a zero tolerance must fail (while the tokens still agree).
    let mut args = vec!["--tp", "2", "--pp", "1", "--tolerance", "0"];
    args.extend_from_slice(&TINY);
    let r = demo(&args);
    let all = format!("stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert_eq!(r.code, Some(1), "{all}");
    assert!(r.stdout.contains("[0] FAIL: max |logit difference|"), "{all}");
    assert!(!r.stdout.contains("token ids differ"), "{all}");
    assert!(!r.stdout.contains("PASS"), "{all}");
}

#[test]
fn a_mismatched_nproc_is_refused_before_starting() {
    let r = demo(&["--nproc", "3"]);
    assert_eq!(r.code, Some(2), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("--nproc (3) must equal tp (2) x pp (2) = 4"), "{}", r.stderr);
}

#[test]
fn an_unsplittable_model_is_refused() {
    let r = demo(&["--tp", "3", "--pp", "1", "--heads", "4"]);
    assert_eq!(r.code, Some(2), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("heads (4) must divide by tp (3)"), "{}", r.stderr);
}
