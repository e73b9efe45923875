//! Point-to-point through the shared-memory segment (ranks as threads and
//! as processes): every size path (inline, eager, cross-memory attach,
//! split, pipelined), order, ranks that send to each other before receiving,
//! length mismatches, deadlines and a killed peer.

mod common;

use common::pattern;
use rankweave::collectives::shm::{ShmComm, ShmOptions};
use rankweave::{DType, Error, ReduceOp};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);
/// Lengths around every threshold: inline (64), eager (32 KiB), then large.
const SIZES: [usize; 12] = [0, 1, 8, 64, 65, 1000, 32 << 10, (32 << 10) + 1, 100_000, 1 << 20, 3 << 20, 9_000_001];

/// How large messages travel.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    /// The default: the receiver chooses between the split copy and the
    /// pipeline by their recent times.
    Default,
    /// Always a split copy (the receiver reads one half from the sender's
    /// memory, the sender writes the other into the receiver's).
    Split,
    /// Every large message by the receiver's cross-memory attach.
    SingleCopy,
    /// Pipelined through the segment; cross-memory attach only when a
    /// blocked send takes in the messages posted to it.
    Pipeline,
    /// No cross-memory attach at all.
    NoCma,
}
const PATHS: [Path; 5] = [Path::Default, Path::Split, Path::SingleCopy, Path::Pipeline, Path::NoCma];

fn opts(path: Path) -> ShmOptions {
    let o = ShmOptions { timeout: T, ..ShmOptions::default() };
    match path {
        Path::Default => o,
        Path::Split => ShmOptions { adaptive_copy: false, ..o },
        Path::SingleCopy => ShmOptions { single_copy_min: 0, ..o },
        Path::Pipeline => ShmOptions { split_copy_min: usize::MAX, ..o },
        Path::NoCma => ShmOptions { cross_memory_attach: false, ..o },
    }
}

#[test]
fn every_size_arrives_intact_in_a_ring_on_every_path() {
    for path in PATHS {
        for n in [2, 3, 4] {
            common::run_shm(n, opts(path), move |c| {
                let (r, n) = (c.rank(), c.size());
                let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
                for len in SIZES {
                    let mut got = vec![0u8; len];
                    if r % 2 == 0 {
                        c.send(&pattern(r, len, 1), next, T).unwrap();
                        c.recv(&mut got, prev, T).unwrap();
                    } else {
                        c.recv(&mut got, prev, T).unwrap();
                        c.send(&pattern(r, len, 1), next, T).unwrap();
                    }
                    assert!(got == pattern(prev, len, 1), "{path:?} n={n} rank {r} len {len}");
                }
            });
        }
    }
}

#[test]
fn messages_keep_their_order_mixed_with_collectives() {
    common::run_shm(3, opts(Path::Default), |c| {
        let r = c.rank();
        for round in 0..40usize {
            let len = SIZES[round % SIZES.len()].min(200_000);
            if r == 0 {
                for dst in [1, 2] {
                    c.send(&pattern(dst, len, round), dst, T).unwrap();
                    c.send(&pattern(dst, round, len), dst, T).unwrap();
                }
            } else {
                let mut a = vec![0u8; len];
                let mut b = vec![0u8; round];
                c.recv(&mut a, 0, T).unwrap();
                c.recv(&mut b, 0, T).unwrap();
                assert!(a == pattern(r, len, round) && b == pattern(r, round, len), "round {round}");
            }
            let mut x = [r as i64 + round as i64];
            c.all_reduce(bytemuck::cast_slice_mut(&mut x), DType::I64, ReduceOp::Sum).unwrap();
            assert_eq!(x[0], 3 + 3 * round as i64);
        }
    });
}

#[test]
fn ranks_that_all_send_before_receiving_do_not_deadlock() {
    // Large messages are taken in by cross-memory attach; without it only
    // messages up to the eager limit can be (the pipelined path needs the
    // blocked sender to stream).
    for (path, sizes) in [
        (Path::Default, &[100_000usize, 4 << 20][..]),
        (Path::SingleCopy, &[100_000usize, 4 << 20][..]),
        (Path::Pipeline, &[100_000usize, 4 << 20][..]),
        (Path::NoCma, &[1000usize, 32 << 10][..]),
    ] {
        for n in [2, 3] {
            common::run_shm(n, opts(path), move |c| {
                let (r, n) = (c.rank(), c.size());
                let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
                for &len in sizes {
                    // Two messages each, then receive: every second send
                    // blocks on a rank that is itself sending.
                    c.send(&pattern(r, len, 2), next, T).unwrap();
                    c.send(&pattern(r, len, 3), next, T).unwrap();
                    let mut got = vec![0u8; len];
                    c.recv(&mut got, prev, T).unwrap();
                    assert!(got == pattern(prev, len, 2), "{path:?} n={n} len={len} first");
                    c.recv(&mut got, prev, T).unwrap();
                    assert!(got == pattern(prev, len, 3), "{path:?} n={n} len={len} second");
                }
            });
        }
    }
}

#[test]
fn facing_large_sends_without_cross_memory_attach_fail_at_the_deadline() {
    common::run_shm(2, opts(Path::NoCma), |c| {
        let peer = 1 - c.rank();
        let start = Instant::now();
        let e = c.send(&vec![1u8; 1 << 20], peer, Duration::from_millis(300)).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
        assert!(matches!(e, Error::Timeout { .. } | Error::PeerLost { .. }), "{e}");
        assert_eq!(e.peer(), Some(peer));
    });
}

#[test]
fn a_length_mismatch_names_both_lengths_and_the_peer() {
    for (sent, expected) in [(8usize, 9usize), (1 << 20, 1000), (40_000, 1 << 20)] {
        let errs = common::run_shm(2, opts(Path::Default), move |c| {
            if c.rank() == 0 {
                // The large send fails once rank 1 gives up on it (timeout)
                // or succeeds for the eager sizes; both are fine here.
                let _ = c.send(&vec![7u8; sent], 1, Duration::from_millis(500));
                None
            } else {
                let mut buf = vec![0u8; expected];
                let e = c.recv(&mut buf, 0, T).unwrap_err();
                // Poisoned afterwards.
                assert!(matches!(c.recv(&mut buf, 0, T).unwrap_err(), Error::Poisoned { .. }));
                Some(e)
            }
        });
        let e = errs[1].as_ref().unwrap();
        assert!(matches!(e, Error::Mismatch { .. }), "{e}");
        assert_eq!(e.peer(), Some(0));
        let msg = e.to_string();
        assert!(msg.contains(&format!("{sent} bytes")) && msg.contains(&format!("{expected} bytes")), "{msg}");
    }
}

#[test]
fn deadlines_name_the_operation_the_group_and_the_peer() {
    common::run_shm(2, opts(Path::Default), |c| {
        if c.rank() == 0 {
            let start = Instant::now();
            let mut b = [0u8; 4];
            let e = c.recv(&mut b, 1, Duration::from_millis(200)).unwrap_err();
            assert!(start.elapsed() >= Duration::from_millis(200) && start.elapsed() < Duration::from_secs(5));
            assert!(matches!(e, Error::Timeout { .. }), "{e}");
            assert_eq!(e.peer(), Some(1));
            assert!(e.to_string().contains("send/recv") && e.to_string().contains(c.group()), "{e}");
        } else {
            // Once rank 0 gave up: a large send nobody receives times out
            // (its buffer is handed back only after it was withdrawn).
            std::thread::sleep(Duration::from_millis(500));
            let e = c.send(&vec![1u8; 1 << 20], 0, Duration::from_millis(200)).unwrap_err();
            assert!(matches!(e, Error::Timeout { .. }), "{e}");
            assert_eq!(e.peer(), Some(0));
        }
    });
}

#[test]
fn a_peer_that_closes_the_group_fails_a_waiting_recv_and_send() {
    common::run_shm(2, opts(Path::Default), |c| {
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(100));
            c.abort_handle().close();
            return;
        }
        let start = Instant::now();
        let mut b = [0u8; 16];
        let e = c.recv(&mut b, 1, T).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
        assert!(matches!(e, Error::PeerLost { .. }) && e.peer() == Some(1), "{e}");
        assert!(e.to_string().contains("closed the group"), "{e}");
    });
    common::run_shm(2, opts(Path::Default), |c| {
        if c.rank() == 1 {
            c.abort_handle().close();
            return;
        }
        let e = c.send(&vec![5u8; 1 << 20], 1, T).unwrap_err();
        assert!(matches!(e, Error::PeerLost { .. }) && e.peer() == Some(1), "{e}");
    });
}

/// Child-process entry: rank 1, echoes every size back (or, with
/// `RANKWEAVE_P2P_CHILD_HANG`, sleeps after the first exchange).
#[test]
fn child_rank_entry() {
    let Ok(name) = std::env::var("RANKWEAVE_P2P_CHILD_SEGMENT") else { return };
    let path = match std::env::var("RANKWEAVE_P2P_CHILD_PATH").as_deref() {
        Ok("SingleCopy") => Path::SingleCopy,
        Ok("Pipeline") => Path::Pipeline,
        Ok("NoCma") => Path::NoCma,
        _ => Path::Default,
    };
    let mut comm = ShmComm::create_with(1, 2, "p2p-procs", &opts(path), |_| Ok(name)).unwrap();
    let mut b = [0u8; 8];
    comm.recv(&mut b, 0, T).unwrap();
    comm.send(&b, 0, T).unwrap();
    if std::env::var("RANKWEAVE_P2P_CHILD_HANG").is_ok() {
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    for len in SIZES {
        let mut got = vec![0u8; len];
        comm.recv(&mut got, 0, T).unwrap();
        assert!(got == pattern(0, len, 4), "child len {len}");
        comm.send(&pattern(1, len, 5), 0, T).unwrap();
    }
}

fn spawn_child(path: Path, hang: bool) -> (ShmComm, std::process::Child) {
    let mut child = None;
    let comm = ShmComm::create_with(0, 2, "p2p-procs", &opts(path), |name| {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "child_rank_entry", "--test-threads=1"])
            .env("RANKWEAVE_P2P_CHILD_SEGMENT", name.unwrap())
            .stdout(std::process::Stdio::null());
        cmd.env("RANKWEAVE_P2P_CHILD_PATH", format!("{path:?}"));
        if hang {
            cmd.env("RANKWEAVE_P2P_CHILD_HANG", "1");
        }
        child = Some(cmd.spawn().unwrap());
        Ok(name.unwrap().to_string())
    })
    .unwrap();
    let mut comm = comm;
    comm.send(&[9u8; 8], 1, T).unwrap();
    let mut b = [0u8; 8];
    comm.recv(&mut b, 1, T).unwrap();
    assert_eq!(b, [9u8; 8]);
    (comm, child.unwrap())
}

#[test]
fn two_processes_exchange_every_size() {
    for path in PATHS {
        let (mut comm, mut child) = spawn_child(path, false);
        for len in SIZES {
            comm.send(&pattern(0, len, 4), 1, T).unwrap();
            let mut got = vec![0u8; len];
            comm.recv(&mut got, 1, T).unwrap();
            assert!(got == pattern(1, len, 5), "{path:?} len {len}");
        }
        assert!(child.wait().unwrap().success());
    }
}

#[test]
fn a_killed_peer_fails_a_blocked_send_and_recv_before_the_deadline() {
    let (mut comm, mut child) = spawn_child(Path::Default, true);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let start = Instant::now();
    let e = comm.send(&vec![3u8; 1 << 20], 1, T).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    assert!(matches!(e, Error::PeerLost { .. }), "{e}");
    assert_eq!(e.peer(), Some(1));
    assert!(e.to_string().contains("rank 1 exited"), "{e}");
}

#[test]
fn a_killed_peer_fails_a_recv_before_the_deadline() {
    let (mut comm, mut child) = spawn_child(Path::Default, true);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let start = Instant::now();
    let mut b = vec![0u8; 100];
    let e = comm.recv(&mut b, 1, T).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    assert!(matches!(e, Error::PeerLost { .. }), "{e}");
    assert_eq!(e.peer(), Some(1));
}

#[test]
fn a_sender_runs_up_to_the_queue_ahead_of_its_receiver() {
    use rankweave::collectives::shm::p2p::QUEUE;
    use std::sync::atomic::{AtomicBool, Ordering};
    static RECEIVING: AtomicBool = AtomicBool::new(false);
    // A full queue of small messages of every payload placement (in the
    // slot's header line, after it), then exclusive ones (above a slot,
    // large) between queued ones: all arrive in order.
    let small = [0, 1, 32, 33, 1000, 7, 500, 64];
    let mut lens: Vec<usize> = (0..QUEUE).map(|i| small[i % small.len()]).collect();
    lens.extend([32 << 10, 100_000, 5]);
    let expect = lens.clone();
    common::run_shm(2, opts(Path::Default), move |c| {
        if c.rank() == 0 {
            assert!(c.queued_max() >= 1000, "{}", c.queued_max());
            // The receiver sleeps before its first recv: the first QUEUE
            // messages are queued without it.
            for (i, &len) in lens.iter().take(QUEUE).enumerate() {
                c.send(&pattern(i, len, 3), 1, T).unwrap();
            }
            assert!(!RECEIVING.load(Ordering::SeqCst), "the queued sends waited for the receiver");
            // The next one needs a free slot: it returns only once the
            // receiver has taken a message.
            for (i, &len) in lens.iter().enumerate().skip(QUEUE) {
                c.send(&pattern(i, len, 3), 1, T).unwrap();
            }
            assert!(RECEIVING.load(Ordering::SeqCst));
        } else {
            std::thread::sleep(Duration::from_millis(800));
            RECEIVING.store(true, Ordering::SeqCst);
            for (i, &len) in expect.iter().enumerate() {
                let mut got = vec![0u8; len];
                c.recv(&mut got, 0, T).unwrap();
                assert!(got == pattern(i, len, 3), "message {i} of {len} bytes");
            }
        }
    });
}
