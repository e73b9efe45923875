//! all_reduce: every algorithm (ring, recursive doubling, halving/doubling), world sizes 1..=8, counts 0/1/7/1000 and a
//! large subset, every dtype and op, bitwise identity with random floats,
//! mismatch and timeout errors.

mod common;

use common::*;
use rankweave::collectives::{self, Comm};
use rankweave::{DType, Error, ReduceOp};
use std::time::Duration;

type AllReduceFn = fn(&mut Comm<'_>, &mut [u8], DType, ReduceOp) -> rankweave::Result<()>;

fn ring_tiny_segments(c: &mut Comm<'_>, buf: &mut [u8], dtype: DType, op: ReduceOp) -> rankweave::Result<()> {
    // Tiny segments: many per block, some empty, some uneven (bounded so
    // large buffers do not turn into millions of messages).
    let seg = if buf.len() <= 8192 { 24 } else { 64 * 1024 };
    collectives::all_reduce_ring_with(c, buf, dtype, op, seg)
}

/// Halving/doubling where the group size is a power of two; elsewhere it
/// must refuse (and the ring stands in, so the matrix still checks a result).
fn halving_doubling(c: &mut Comm<'_>, buf: &mut [u8], dtype: DType, op: ReduceOp) -> rankweave::Result<()> {
    if c.size().is_power_of_two() {
        return collectives::all_reduce_halving_doubling(c, buf, dtype, op);
    }
    let err = collectives::all_reduce_halving_doubling(c, buf, dtype, op).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    collectives::all_reduce_ring(c, buf, dtype, op)
}

const ALGOS: [(&str, AllReduceFn); 5] = [
    ("front door", collectives::all_reduce),
    ("ring", collectives::all_reduce_ring),
    ("ring/tiny segments", ring_tiny_segments),
    ("recursive doubling", collectives::all_reduce_recursive_doubling),
    ("halving/doubling", halving_doubling),
];

fn check_matrix(n: usize, cases: &[(DType, ReduceOp, usize)]) {
    run_mem(n, |rk| {
        let r = rk.rank();
        for &(dtype, op, count) in cases {
            let want = expected(dtype, op, n, count);
            for (name, f) in ALGOS {
                let mut buf = input(dtype, op, r, count);
                f(&mut rk.comm(), &mut buf, dtype, op).unwrap();
                assert!(
                    buf == want,
                    "{name} n={n} rank {r} {dtype} {op} count={count}: {}",
                    first_diff(&buf, &want, dtype.size())
                );
            }
        }
    });
}

#[test]
fn matrix_small_counts() {
    for n in WORLD_SIZES {
        let mut cases = Vec::new();
        for dtype in DType::ALL {
            for op in ReduceOp::ALL {
                for count in COUNTS {
                    cases.push((dtype, op, count));
                }
            }
        }
        check_matrix(n, &cases);
    }
}

#[test]
fn matrix_large_count() {
    let cases = [
        (DType::F32, ReduceOp::Sum, LARGE),
        (DType::BF16, ReduceOp::Avg, LARGE),
        (DType::I64, ReduceOp::Max, LARGE + 3),
        (DType::I8, ReduceOp::Prod, LARGE - 1),
    ];
    for n in [2, 3, 4, 8] {
        check_matrix(n, &cases);
    }
    check_matrix(5, &[(DType::F16, ReduceOp::Min, LARGE), (DType::U8, ReduceOp::Sum, 3 * LARGE + 1)]);
}

/// Random floats whose sums round differently in different orders: every
/// rank must still hold the same bits, for every algorithm.
#[test]
fn bitwise_identical_on_every_rank() {
    for n in [2, 3, 4, 5, 7, 8] {
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            for count in [1usize, 33, 5000, 40_000] {
                for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Avg] {
                    let results = run_mem(n, |rk| {
                        let seed = (rk.rank() * 1000 + count) as u64;
                        ALGOS
                            .iter()
                            .map(|(_, f)| {
                                let mut buf = random_floats(dtype, seed, count);
                                f(&mut rk.comm(), &mut buf, dtype, op).unwrap();
                                buf
                            })
                            .collect::<Vec<_>>()
                    });
                    for (a, (name, _)) in ALGOS.iter().enumerate() {
                        for r in 1..n {
                            assert!(
                                results[r][a] == results[0][a],
                                "{name} n={n} {dtype} {op} count={count}: rank {r} differs from rank 0: {}",
                                first_diff(&results[r][a], &results[0][a], dtype.size())
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn invalid_length_is_rejected() {
    run_mem(2, |rk| {
        let mut buf = vec![0u8; 6];
        let err = collectives::all_reduce(&mut rk.comm(), &mut buf, DType::F32, ReduceOp::Sum).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("6 bytes"), "{err}");
    });
}

/// Rank 0 all_reduces 10 elements, rank 1 12: both get an error, no hang.
#[test]
fn mismatched_sizes_fail_on_both_ranks() {
    for f in [collectives::all_reduce, collectives::all_reduce_ring] {
        let res = run_mem_timeout(2, Duration::from_secs(5), |rk| {
            let mut buf = vec![0u8; if rk.rank() == 0 { 40 } else { 48 }];
            f(&mut rk.comm(), &mut buf, DType::F32, ReduceOp::Sum)
        });
        for (r, e) in res.iter().enumerate() {
            let e = e.as_ref().unwrap_err();
            assert!(matches!(e, Error::Mismatch { .. }), "rank {r}: {e}");
            assert_eq!(e.peer(), Some(1 - r), "rank {r}: {e}");
        }
    }
}

/// Another collective on the peer is reported as a mismatch too: rank 1
/// waits for a broadcast from rank 0 and receives rank 0's all_reduce
/// message instead; rank 0 fails too (mismatch, or its peer gone), no hang.
#[test]
fn mismatched_collective_fails() {
    let res = run_mem_timeout(2, Duration::from_secs(5), |rk| {
        let mut buf = vec![0u8; 16];
        if rk.rank() == 0 {
            collectives::all_reduce(&mut rk.comm(), &mut buf, DType::F32, ReduceOp::Sum)
        } else {
            collectives::broadcast(&mut rk.comm(), &mut buf, 0)
        }
    });
    let e = res[1].as_ref().unwrap_err();
    assert!(matches!(e, Error::Mismatch { .. }), "{e}");
    assert!(e.to_string().contains("broadcast") && e.to_string().contains("all_reduce"), "{e}");
    assert!(res[0].is_err(), "rank 0 must fail too");
}

/// A rank that never joins: the others time out naming it.
#[test]
fn absent_peer_times_out() {
    let res = run_mem_timeout(3, Duration::from_millis(200), |rk| {
        if rk.rank() == 2 {
            // Alive (transport held) but never joins.
            std::thread::sleep(Duration::from_millis(600));
            return None;
        }
        let mut buf = vec![0u8; 64];
        Some(collectives::all_reduce(&mut rk.comm(), &mut buf, DType::I32, ReduceOp::Sum))
    });
    // Recursive doubling on 3 ranks: rank 0 folds into rank 1, which waits
    // for rank 2; rank 0 waits for rank 1.
    let e1 = res[1].as_ref().unwrap().as_ref().unwrap_err();
    assert!(matches!(e1, Error::Timeout { .. }), "{e1}");
    assert_eq!(e1.peer(), Some(2));
    let msg = e1.to_string();
    assert!(msg.contains("all_reduce") && msg.contains("mem3:0"), "{msg}");
    assert!(res[0].as_ref().unwrap().is_err());
}

/// A rank that returns early (its transport dropped): peers waiting on it
/// fail at once with PeerLost naming it.
#[test]
fn dropped_peer_is_lost() {
    let res = run_mem_timeout(2, Duration::from_secs(20), |rk| {
        if rk.rank() == 1 {
            return None;
        }
        let mut buf = vec![0u8; 64];
        Some(collectives::all_reduce(&mut rk.comm(), &mut buf, DType::I32, ReduceOp::Sum))
    });
    let e = res[0].as_ref().unwrap().as_ref().unwrap_err();
    assert!(matches!(e, Error::PeerLost { .. }), "{e}");
    assert_eq!(e.peer(), Some(1));
}

/// The same matrix through real process groups (TCP between threads).
#[test]
fn group_all_reduce() {
    for n in [1, 2, 3, 4, 5, 8] {
        run_group(n, |pg| {
            let r = pg.rank();
            for dtype in DType::ALL {
                for op in ReduceOp::ALL {
                    for count in [0usize, 1, 7, 1000, 20_000] {
                        let mut buf = input(dtype, op, r, count);
                        pg.all_reduce_bytes(&mut buf, dtype, op).unwrap();
                        assert_eq!(buf, expected(dtype, op, n, count), "n={n} {dtype} {op} count={count}");
                    }
                }
            }
            let mut big = input(DType::F32, ReduceOp::Sum, r, LARGE);
            pg.all_reduce_bytes(&mut big, DType::F32, ReduceOp::Sum).unwrap();
            assert!(big == expected(DType::F32, ReduceOp::Sum, n, LARGE));
        });
    }
}

/// Over TCP: rank 0 all_reduces 10 elements, rank 1 12 (and a large pair
/// on the ring path): both ranks return an error promptly, no hang.
#[test]
fn group_mismatched_sizes_fail_on_both_ranks() {
    for (a, b) in [(10usize, 12usize), (100_000, 100_001)] {
        let start = std::time::Instant::now();
        let res = run_group(2, |pg| {
            let mut buf = vec![1.0f32; if pg.rank() == 0 { a } else { b }];
            pg.all_reduce(&mut buf, ReduceOp::Sum)
        });
        assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
        for (r, e) in res.iter().enumerate() {
            let e = e.as_ref().unwrap_err();
            assert!(e.poisons_group(), "rank {r}: {e}");
        }
        assert!(res.iter().any(|e| matches!(e, Err(Error::Mismatch { .. }))), "{res:?}");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Any world size, length and segment size: the ring and recursive
    /// doubling give the exact result.
    #[test]
    fn any_shape(n in 1usize..=8, count in 0usize..3000, seg in 1usize..400, d in 0usize..8, o in 0usize..5) {
        let (dtype, op) = (DType::ALL[d], ReduceOp::ALL[o]);
        let want = expected(dtype, op, n, count);
        let got = run_mem(n, |rk| {
            let mut a = input(dtype, op, rk.rank(), count);
            collectives::all_reduce_ring_with(&mut rk.comm(), &mut a, dtype, op, seg).unwrap();
            let mut b = input(dtype, op, rk.rank(), count);
            collectives::all_reduce_recursive_doubling(&mut rk.comm(), &mut b, dtype, op).unwrap();
            (a, b)
        });
        for (r, (a, b)) in got.iter().enumerate() {
            proptest::prop_assert!(a == &want, "ring rank {}: {}", r, first_diff(a, &want, dtype.size()));
            proptest::prop_assert!(b == &want, "rd rank {}: {}", r, first_diff(b, &want, dtype.size()));
        }
    }
}
