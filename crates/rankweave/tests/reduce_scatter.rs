//! reduce_scatter: out-of-place, in-place and ring, world sizes 1..=8,
//! per-rank counts 0/1/7/1000 and large, every dtype and op.

mod common;

use common::*;
use rankweave::collectives;
use rankweave::{DType, Error, ReduceOp};

fn check(n: usize, cases: &[(DType, ReduceOp, usize)]) {
    run_mem(n, |rk| {
        let r = rk.rank();
        for &(dtype, op, count) in cases {
            let es = dtype.size();
            let full = expected(dtype, op, n, n * count);
            let want = &full[r * count * es..(r + 1) * count * es];
            let inp = input(dtype, op, r, n * count);
            let mut out = vec![0xEE; count * es];
            collectives::reduce_scatter(&mut rk.comm(), &inp, &mut out, dtype, op).unwrap();
            assert!(
                out == want,
                "front door n={n} rank {r} {dtype} {op} count={count}: {}",
                first_diff(&out, want, es)
            );
            let mut out = vec![0xEE; count * es];
            collectives::reduce_scatter_ring(&mut rk.comm(), &inp, &mut out, dtype, op).unwrap();
            assert!(out == want, "ring n={n} rank {r} {dtype} {op} count={count}: {}", first_diff(&out, want, es));
            let mut buf = inp.clone();
            collectives::reduce_scatter_inplace(&mut rk.comm(), &mut buf, dtype, op).unwrap();
            let got = &buf[r * count * es..(r + 1) * count * es];
            assert!(got == want, "in place n={n} rank {r} {dtype} {op} count={count}");
            let mut buf = inp.clone();
            collectives::reduce_scatter_ring_inplace_with(&mut rk.comm(), &mut buf, dtype, op, 40).unwrap();
            let got = &buf[r * count * es..(r + 1) * count * es];
            assert!(got == want, "ring in place, 40 B segments, n={n} rank {r} {dtype} {op} count={count}");
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
        check(n, &cases);
    }
}

#[test]
fn matrix_large_count() {
    for n in [2, 3] {
        check(n, &[(DType::F32, ReduceOp::Sum, LARGE / 4), (DType::BF16, ReduceOp::Max, LARGE / 4 + 1)]);
    }
}

#[test]
fn wrong_lengths_are_rejected() {
    run_mem(2, |rk| {
        let err = collectives::reduce_scatter(&mut rk.comm(), &[0u8; 12], &mut [0u8; 4], DType::F32, ReduceOp::Sum)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("must be 8 bytes, got 12"), "{err}");
        let err =
            collectives::reduce_scatter_inplace(&mut rk.comm(), &mut [0u8; 12], DType::I64, ReduceOp::Sum).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    });
}

#[test]
fn group_reduce_scatter() {
    for n in [1, 2, 3, 4, 5, 8] {
        run_group(n, |pg| {
            let r = pg.rank();
            for dtype in DType::ALL {
                for op in ReduceOp::ALL {
                    for count in [0usize, 7, 20_000] {
                        let es = dtype.size();
                        let full = expected(dtype, op, n, n * count);
                        let mut out = vec![0; count * es];
                        pg.reduce_scatter_bytes(&input(dtype, op, r, n * count), &mut out, dtype, op).unwrap();
                        assert_eq!(
                            out,
                            &full[r * count * es..(r + 1) * count * es],
                            "n={n} {dtype} {op} count={count}"
                        );
                    }
                }
            }
        });
    }
}
