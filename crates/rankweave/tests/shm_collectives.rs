//! Shared-memory collectives with ranks as threads, checked against a
//! straightforward reference on exactly representable data.

mod common;

use half::{bf16, f16};
use rankweave::collectives::shm::{ShmComm, ShmOptions};
use rankweave::{DType, Error, HashStore, ReduceOp};
use std::sync::Arc;
use std::time::Duration;

/// Small slots (two 2 KiB halves) so that a few thousand bytes already take
/// several pipelined segments.
fn small_opts() -> ShmOptions {
    ShmOptions { slot_bytes: 4096, timeout: Duration::from_secs(20), ..Default::default() }
}

/// Value of element `i` on rank `r`: small integers so every reduction is exact.
fn value(r: usize, i: usize, op: ReduceOp, dtype: DType) -> f64 {
    if op == ReduceOp::Prod {
        return (1 + (r + i) % 2) as f64;
    }
    let v = ((r * 3 + i * 5) % 4) as f64 + 1.0;
    if dtype == DType::U8 {
        v
    } else {
        v - 2.0
    }
}

fn encode(dtype: DType, vals: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(vals.len() * dtype.size());
    for &v in vals {
        match dtype {
            DType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            DType::F64 => out.extend_from_slice(&v.to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f16::from_f64(v).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&bf16::from_f64(v).to_le_bytes()),
            DType::I8 => out.extend_from_slice(&(v as i8).to_le_bytes()),
            DType::U8 => out.push(v as u8),
            DType::I32 => out.extend_from_slice(&(v as i32).to_le_bytes()),
            DType::I64 => out.extend_from_slice(&(v as i64).to_le_bytes()),
        }
    }
    out
}

/// The expected result of reducing element `i` over `n` ranks.
fn expected(n: usize, i: usize, op: ReduceOp, dtype: DType) -> Vec<u8> {
    let vals: Vec<f64> = (0..n).map(|r| value(r, i, op, dtype)).collect();
    let v = match op {
        ReduceOp::Sum | ReduceOp::Avg => vals.iter().sum(),
        ReduceOp::Prod => vals.iter().product(),
        ReduceOp::Min => vals.iter().copied().fold(f64::INFINITY, f64::min),
        ReduceOp::Max => vals.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    };
    if op != ReduceOp::Avg {
        return encode(dtype, &[v]);
    }
    let nf = n as f32;
    match dtype {
        DType::F32 => ((v as f32) / nf).to_le_bytes().to_vec(),
        DType::F64 => (v / n as f64).to_le_bytes().to_vec(),
        DType::F16 => f16::from_f32(v as f32 / nf).to_le_bytes().to_vec(),
        DType::BF16 => bf16::from_f32(v as f32 / nf).to_le_bytes().to_vec(),
        // Integers: truncating division.
        _ => encode(dtype, &[((v as i64) / n as i64) as f64]),
    }
}

const COUNTS: [usize; 6] = [0, 1, 7, 1000, 3001, 12];

#[test]
fn all_reduce_matches_reference_every_dtype_op_and_world_size() {
    for n in 1..=6 {
        let results = common::run_shm(n, small_opts(), move |comm| {
            let mut out = Vec::new();
            for dtype in DType::ALL {
                for op in ReduceOp::ALL {
                    for count in COUNTS {
                        let vals: Vec<f64> = (0..count).map(|i| value(comm.rank(), i, op, dtype)).collect();
                        let mut buf = encode(dtype, &vals);
                        comm.all_reduce(&mut buf, dtype, op).expect("all_reduce");
                        out.push(buf);
                    }
                }
            }
            out
        });
        let mut k = 0;
        for dtype in DType::ALL {
            for op in ReduceOp::ALL {
                for count in COUNTS {
                    let want: Vec<u8> = (0..count).flat_map(|i| expected(n, i, op, dtype)).collect();
                    for (r, res) in results.iter().enumerate() {
                        assert!(
                            res[k] == want,
                            "n={n} {dtype} {op} count={count}: rank {r} differs from the reference"
                        );
                    }
                    k += 1;
                }
            }
        }
    }
}

#[test]
fn all_reduce_large_buffer_with_default_slots_is_bitwise_identical() {
    // Non-exact float data: ranks must still agree bit for bit.
    let count = 700_001; // 2.8 MB of f32: two segments of 1 MiB and a tail.
    let results =
        common::run_shm(3, ShmOptions { timeout: Duration::from_secs(30), ..Default::default() }, move |comm| {
            let r = comm.rank() as f32;
            let vals: Vec<f32> = (0..count).map(|i| (i as f32 * 0.37 + r * 1.31).sin()).collect();
            let mut buf = bytemuck::cast_slice::<f32, u8>(&vals).to_vec();
            comm.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap();
            buf
        });
    assert!(results.iter().all(|b| *b == results[0]));
    let got: &[f32] = bytemuck::cast_slice(&results[0]);
    let x = |i: usize, r: f32| (i as f32 * 0.37 + r * 1.31).sin();
    for (i, g) in got.iter().enumerate() {
        let exact = (0..3).map(|r| x(i, r as f32) as f64).sum::<f64>();
        assert!((*g as f64 - exact).abs() < 1e-5, "element {i}: {g} vs {exact}");
    }
    // Rank 0 owns the first share of each segment: its own input first, then
    // the others in rank order.
    for i in [0, 1, 262_144] {
        assert_eq!(got[i], (x(i, 0.0) + x(i, 1.0)) + x(i, 2.0), "element {i}");
    }
}

#[test]
fn all_gather_broadcast_reduce_scatter_barrier() {
    for n in 1..=6 {
        let results = common::run_shm(n, small_opts(), move |comm| {
            let r = comm.rank();
            let mut out = Vec::new();
            for s in [0usize, 1, 5, 40, 41, 1000, 5000] {
                let input: Vec<u8> = (0..s).map(|i| (i * 7 + r * 13) as u8).collect();
                let mut gathered = vec![0u8; n * s];
                comm.all_gather(&input, &mut gathered).unwrap();
                out.push(gathered);
                for root in 0..n {
                    let mut buf: Vec<u8> = if r == root { input.clone() } else { vec![0xee; s] };
                    comm.broadcast(&mut buf, root).unwrap();
                    out.push(buf);
                }
                // reduce_scatter of i32 blocks of s elements.
                let vals: Vec<i32> = (0..n * s).map(|i| (i as i32) * 3 + r as i32).collect();
                let mut rs = vec![0i32; s];
                comm.reduce_scatter(
                    bytemuck::cast_slice(&vals),
                    bytemuck::cast_slice_mut(&mut rs),
                    DType::I32,
                    ReduceOp::Sum,
                )
                .unwrap();
                out.push(bytemuck::cast_slice(&rs).to_vec());
                comm.barrier().unwrap();
            }
            out
        });
        for (r, res) in results.iter().enumerate() {
            let mut k = 0;
            for s in [0usize, 1, 5, 40, 41, 1000, 5000] {
                let input = |q: usize| -> Vec<u8> { (0..s).map(|i| (i * 7 + q * 13) as u8).collect() };
                let want: Vec<u8> = (0..n).flat_map(input).collect();
                assert_eq!(res[k], want, "all_gather n={n} s={s} rank {r}");
                k += 1;
                for root in 0..n {
                    assert_eq!(res[k], input(root), "broadcast n={n} s={s} root {root} rank {r}");
                    k += 1;
                }
                let want: Vec<i32> =
                    (0..s).map(|i| (0..n).map(|q| ((r * s + i) as i32) * 3 + q as i32).sum()).collect();
                assert_eq!(res[k], bytemuck::cast_slice::<i32, u8>(&want), "reduce_scatter n={n} s={s} rank {r}");
                k += 1;
            }
        }
    }
}

#[test]
fn a_late_rank_is_named_in_the_timeout() {
    // Long enough that ranks 0 and 1 are never that late to each other.
    let opts = ShmOptions { timeout: Duration::from_secs(1), ..small_opts() };
    let results = common::run_shm(3, opts, |comm| {
        if comm.rank() == 2 {
            return None; // never calls the collective
        }
        let mut buf = vec![0u8; 8];
        let err = comm.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap_err();
        let again = comm.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap_err();
        Some((err, again))
    });
    for (err, again) in results.into_iter().flatten() {
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert_eq!(err.peer(), Some(2), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("all_reduce") && msg.contains("rank(s) [2]"), "{msg}");
        assert!(matches!(again, Error::Poisoned { .. }), "{again}");
    }
}

#[test]
fn different_collectives_are_a_mismatch_not_garbage() {
    let results = common::run_shm(2, small_opts(), |comm| {
        if comm.rank() == 0 {
            let mut buf = vec![0u8; 8];
            comm.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap_err()
        } else {
            let mut out = vec![0u8; 32];
            comm.all_gather(&[1u8; 16], &mut out).unwrap_err()
        }
    });
    for (r, err) in results.iter().enumerate() {
        assert!(matches!(err, Error::Mismatch { .. }), "{err}");
        assert_eq!(err.peer(), Some(1 - r));
        assert!(err.to_string().contains("all_gather of 16 bytes"), "{err}");
    }
}

#[test]
fn the_segment_name_is_gone_once_every_rank_attached() {
    let names = common::run_shm(3, small_opts(), |comm| {
        comm.barrier().unwrap();
        comm.segment_name().to_string()
    });
    assert!(names.iter().all(|n| *n == names[0]));
    assert!(names[0].starts_with(&format!("/rankweave-{}-", rankweave::segments::job_id())), "{}", names[0]);
    assert!(!std::path::Path::new(&format!("/dev/shm{}", names[0])).exists());
}

#[test]
fn absurd_slot_sizes_are_errors() {
    let store = HashStore::new();
    for slot_bytes in [usize::MAX, usize::MAX / 2] {
        let opts = ShmOptions { slot_bytes, ..small_opts() };
        assert!(matches!(ShmComm::create(0, 2, "absurd", &store, "k", &opts), Err(Error::InvalidArgument(_))));
    }
    assert_eq!(rankweave::collectives::shm::segment_bytes(usize::MAX, 4096), None);
}

#[test]
fn different_slot_sizes_are_rejected() {
    let store = Arc::new(HashStore::new());
    let s2 = store.clone();
    let t = std::thread::spawn(move || {
        ShmComm::create(0, 2, "slots", &*s2, "k", &ShmOptions { timeout: Duration::from_millis(500), ..small_opts() })
            .unwrap_err()
    });
    let err =
        ShmComm::create(1, 2, "slots", &*store, "k", &ShmOptions { slot_bytes: 2048, ..small_opts() }).unwrap_err();
    assert!(err.to_string().contains("slot"), "{err}");
    let err0 = t.join().unwrap();
    assert_eq!(err0.peer(), Some(1), "{err0}");
}

/// Many mixed collectives of mixed sizes back to back, more ranks than
/// cores: exercises the reuse of slot halves and inline lines across
/// operations of different shapes.
#[test]
fn mixed_sequence_stress() {
    let n = 4;
    let results = common::run_shm(n, small_opts(), move |comm| {
        let r = comm.rank();
        let mut seed = 12345u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        for it in 0..1500 {
            let kind = next() % 4;
            let count = match next() % 4 {
                0 => next() % 12,
                1 => next() % 100,
                2 => next() % 3000,
                _ => 1 + next() % 40,
            };
            let input = |q: usize| -> Vec<i32> { (0..count).map(|i| (i * 31 + q * 7 + it) as i32).collect() };
            match kind {
                0 => {
                    let mut buf = input(r);
                    comm.all_reduce(bytemuck::cast_slice_mut(&mut buf), DType::I32, ReduceOp::Sum).unwrap();
                    let all: Vec<Vec<i32>> = (0..n).map(input).collect();
                    let want: Vec<i32> = (0..count).map(|i| all.iter().map(|v| v[i]).sum()).collect();
                    assert_eq!(buf, want, "all_reduce it={it} count={count} rank {r}");
                }
                1 => {
                    let mut out = vec![0i32; n * count];
                    comm.all_gather(bytemuck::cast_slice(&input(r)), bytemuck::cast_slice_mut(&mut out)).unwrap();
                    let want: Vec<i32> = (0..n).flat_map(input).collect();
                    assert_eq!(out, want, "all_gather it={it} count={count} rank {r}");
                }
                2 => {
                    let root = it % n;
                    let mut buf = if r == root { input(r) } else { vec![-1; count] };
                    comm.broadcast(bytemuck::cast_slice_mut(&mut buf), root).unwrap();
                    assert_eq!(buf, input(root), "broadcast it={it} count={count} rank {r}");
                }
                _ => comm.barrier().unwrap(),
            }
        }
        true
    });
    assert!(results.into_iter().all(|ok| ok));
}

#[test]
fn gather_scatter_reduce_all_to_all() {
    for n in 1..=5 {
        let results = common::run_shm(n, small_opts(), move |comm| {
            let r = comm.rank();
            let mut out: Vec<Vec<u8>> = Vec::new();
            for s in [0usize, 3, 48, 700, 4100] {
                let block =
                    |q: usize, j: usize| -> Vec<u8> { (0..s).map(|i| (i * 3 + q * 11 + j * 5) as u8).collect() };
                for root in 0..n {
                    let mut g = vec![0u8; n * s];
                    comm.gather(&block(r, 0), (r == root).then_some(&mut g[..]), root).unwrap();
                    out.push(if r == root { g } else { Vec::new() });
                    let input: Vec<u8> = (0..n).flat_map(|j| block(r, j)).collect();
                    let mut o = vec![0u8; s];
                    comm.scatter((r == root).then_some(&input[..]), &mut o, root).unwrap();
                    out.push(o);
                    let mut red: Vec<i64> = (0..s).map(|i| (i + r) as i64).collect();
                    comm.reduce(bytemuck::cast_slice_mut(&mut red), DType::I64, ReduceOp::Max, root).unwrap();
                    out.push(if r == root { bytemuck::cast_slice(&red).to_vec() } else { Vec::new() });
                }
                let input: Vec<u8> = (0..n).flat_map(|j| block(r, j)).collect();
                let mut o = vec![0u8; n * s];
                comm.all_to_all(&input, &mut o).unwrap();
                out.push(o);
            }
            out
        });
        for (r, res) in results.iter().enumerate() {
            let mut k = 0;
            for s in [0usize, 3, 48, 700, 4100] {
                let block =
                    |q: usize, j: usize| -> Vec<u8> { (0..s).map(|i| (i * 3 + q * 11 + j * 5) as u8).collect() };
                for root in 0..n {
                    let want: Vec<u8> = if r == root { (0..n).flat_map(|q| block(q, 0)).collect() } else { Vec::new() };
                    assert_eq!(res[k], want, "gather n={n} s={s} root={root} rank {r}");
                    assert_eq!(res[k + 1], block(root, r), "scatter n={n} s={s} root={root} rank {r}");
                    let want: Vec<i64> = (0..s).map(|i| (i + n - 1) as i64).collect();
                    let want: Vec<u8> = if r == root { bytemuck::cast_slice(&want).to_vec() } else { Vec::new() };
                    assert_eq!(res[k + 2], want, "reduce n={n} s={s} root={root} rank {r}");
                    k += 3;
                }
                let want: Vec<u8> = (0..n).flat_map(|q| block(q, r)).collect();
                assert_eq!(res[k], want, "all_to_all n={n} s={s} rank {r}");
                k += 1;
            }
        }
    }
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let results = common::run_shm(2, small_opts(), |comm| {
        let mut five = [0u8; 5];
        let e1 = comm.all_reduce(&mut five, DType::F32, ReduceOp::Sum).unwrap_err();
        let e2 = comm.broadcast(&mut five, 2).unwrap_err();
        let e3 = comm.all_gather(&[1, 2], &mut five).unwrap_err();
        let e4 = comm.scatter(None, &mut five, 7).unwrap_err();
        // Nothing was sent: the communicator still works.
        comm.barrier().unwrap();
        (e1, e2, e3, e4)
    });
    for (r, (e1, e2, e3, e4)) in results.into_iter().enumerate() {
        assert!(matches!(e1, Error::InvalidArgument(_)), "{e1}");
        assert!(matches!(e2, Error::InvalidArgument(_)), "{e2}");
        assert!(matches!(e3, Error::InvalidArgument(_)), "{e3}");
        assert!(matches!(e4, Error::InvalidArgument(_)), "rank {r}: {e4}");
    }
}

/// The shared-memory collectives against the TCP ones (a real process group
/// over an in-process store) on the same inputs, including random floats
/// where only the reduction order decides the bits.
#[test]
fn shm_matches_the_tcp_process_group() {
    for n in 1..=6 {
        common::run_group(n, |pg| {
            let r = pg.rank();
            let mut comm = ShmComm::create(r, n, pg.name(), &*pg.store(), "shm-vs-tcp", &small_opts()).unwrap();
            for dtype in DType::ALL {
                for op in ReduceOp::ALL {
                    for count in [0, 1, 7, 1000] {
                        let input = common::input(dtype, op, r, count);
                        let (mut a, mut b) = (input.clone(), input);
                        pg.all_reduce_bytes(&mut a, dtype, op).unwrap();
                        comm.all_reduce(&mut b, dtype, op).unwrap();
                        assert!(a == b, "n={n} {dtype} {op} count={count} rank {r}");
                        assert!(a == common::expected(dtype, op, n, count), "n={n} {dtype} {op} count={count}");
                    }
                }
            }
            // Random f32 data with two ranks: both reduce in the same order.
            if n <= 2 {
                let mut rng = common::Rng(0x9e37_79b9 + r as u64);
                let vals: Vec<f32> = (0..3000).map(|_| (rng.next_u64() % 1_000_000) as f32 * 1.37e-3).collect();
                let (mut a, mut b) = (vals.clone(), vals);
                pg.all_reduce(&mut a, ReduceOp::Sum).unwrap();
                comm.all_reduce(bytemuck::cast_slice_mut(&mut b), DType::F32, ReduceOp::Sum).unwrap();
                assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "random f32 n={n}");
            }
            for s in [0usize, 5, 1000, 5000] {
                let input = common::pattern(r, s, 3);
                let mut a = vec![0u8; n * s];
                let mut b = vec![0u8; n * s];
                pg.all_gather_bytes(&input, &mut a).unwrap();
                comm.all_gather(&input, &mut b).unwrap();
                assert_eq!(a, b, "all_gather n={n} s={s}");
                let root = s % n;
                let (mut a, mut b) = (input.clone(), input.clone());
                pg.broadcast_bytes(&mut a, root).unwrap();
                comm.broadcast(&mut b, root).unwrap();
                assert_eq!(a, b, "broadcast n={n} s={s}");
                let big = common::input(DType::I32, ReduceOp::Sum, r, n * s);
                let mut a = vec![0u8; 4 * s];
                let mut b = vec![0u8; 4 * s];
                pg.reduce_scatter_bytes(&big, &mut a, DType::I32, ReduceOp::Sum).unwrap();
                comm.reduce_scatter(&big, &mut b, DType::I32, ReduceOp::Sum).unwrap();
                assert_eq!(a, b, "reduce_scatter n={n} s={s}");
            }
        });
    }
}

/// Child-process entry for the two-process tests: rank 1 of a communicator
/// whose segment name comes in the environment. Does nothing otherwise.
#[test]
fn child_rank_entry() {
    let Ok(name) = std::env::var("RANKWEAVE_SHM_CHILD_SEGMENT") else { return };
    let opts = ShmOptions { timeout: Duration::from_secs(20), ..small_opts() };
    let mut comm = ShmComm::create_with(1, 2, "procs", &opts, |_| Ok(name)).unwrap();
    for count in [1usize, 10, 5000] {
        let mut buf: Vec<i64> = (0..count as i64).map(|i| i * 10).collect();
        comm.all_reduce(bytemuck::cast_slice_mut(&mut buf), DType::I64, ReduceOp::Sum).unwrap();
        assert_eq!(buf, (0..count as i64).map(|i| i * 11).collect::<Vec<_>>());
    }
    comm.barrier().unwrap();
    if std::env::var("RANKWEAVE_SHM_CHILD_HANG").is_ok() {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn spawn_child_rank(opts: &ShmOptions, hang: bool) -> (ShmComm, std::process::Child) {
    let mut child = None;
    let comm = ShmComm::create_with(0, 2, "procs", opts, |name| {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "child_rank_entry", "--test-threads=1"])
            .env("RANKWEAVE_SHM_CHILD_SEGMENT", name.unwrap())
            .stdout(std::process::Stdio::null());
        if hang {
            cmd.env("RANKWEAVE_SHM_CHILD_HANG", "1");
        }
        child = Some(cmd.spawn().unwrap());
        Ok(name.unwrap().to_string())
    })
    .unwrap();
    (comm, child.unwrap())
}

#[test]
fn two_processes_share_a_communicator() {
    let opts = ShmOptions { timeout: Duration::from_secs(20), ..small_opts() };
    let (mut comm, mut child) = spawn_child_rank(&opts, false);
    for count in [1usize, 10, 5000] {
        let mut buf: Vec<i64> = (0..count as i64).collect();
        comm.all_reduce(bytemuck::cast_slice_mut(&mut buf), DType::I64, ReduceOp::Sum).unwrap();
        assert_eq!(buf, (0..count as i64).map(|i| i * 11).collect::<Vec<_>>());
    }
    comm.barrier().unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_sigkilled_rank_is_reported_lost_before_the_timeout() {
    let opts = ShmOptions { timeout: Duration::from_secs(20), ..small_opts() };
    let (mut comm, mut child) = spawn_child_rank(&opts, true);
    for count in [1usize, 10, 5000] {
        let mut buf: Vec<i64> = (0..count as i64).collect();
        comm.all_reduce(bytemuck::cast_slice_mut(&mut buf), DType::I64, ReduceOp::Sum).unwrap();
    }
    comm.barrier().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let start = std::time::Instant::now();
    let mut buf = vec![0u8; 8];
    let err = comm.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    assert!(matches!(err, Error::PeerLost { .. }), "{err}");
    assert_eq!(err.peer(), Some(1));
    assert!(err.to_string().contains("rank 1 exited"), "{err}");
}
