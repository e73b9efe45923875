//! reduce: tree and ring, every root, world sizes 1..=8, counts 0/1/7/1000
//! and large, every dtype and op.

mod common;

use common::*;
use rankweave::collectives::{self, Comm};
use rankweave::{DType, ReduceOp};

type ReduceFn = fn(&mut Comm<'_>, &mut [u8], DType, ReduceOp, usize) -> rankweave::Result<()>;

const ALGOS: [(&str, ReduceFn); 3] =
    [("front door", collectives::reduce), ("tree", collectives::reduce_tree), ("ring", collectives::reduce_ring)];

fn check(n: usize, cases: &[(DType, ReduceOp, usize)], roots: &[usize]) {
    run_mem(n, |rk| {
        let r = rk.rank();
        for &(dtype, op, count) in cases {
            let want = expected(dtype, op, n, count);
            for &root in roots.iter().filter(|&&x| x < n) {
                for (name, f) in ALGOS {
                    let mut buf = input(dtype, op, r, count);
                    f(&mut rk.comm(), &mut buf, dtype, op, root).unwrap();
                    if r == root {
                        assert!(
                            buf == want,
                            "{name} n={n} root={root} {dtype} {op} count={count}: {}",
                            first_diff(&buf, &want, dtype.size())
                        );
                    }
                }
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
        check(n, &cases, &[0, n - 1, n / 2]);
    }
}

#[test]
fn matrix_large_count() {
    let cases = [(DType::F32, ReduceOp::Sum, LARGE), (DType::I32, ReduceOp::Avg, LARGE + 5)];
    for n in [2, 3, 8] {
        check(n, &cases, &[1]);
    }
}

#[test]
fn group_reduce() {
    for n in [1, 2, 3, 4, 5, 8] {
        run_group(n, |pg| {
            for dtype in DType::ALL {
                for op in ReduceOp::ALL {
                    for count in [0usize, 7, 20_000] {
                        let root = n - 1;
                        let mut buf = input(dtype, op, pg.rank(), count);
                        pg.reduce_bytes(&mut buf, dtype, op, root).unwrap();
                        if pg.rank() == root {
                            assert_eq!(buf, expected(dtype, op, n, count), "n={n} {dtype} {op} count={count}");
                        }
                    }
                }
            }
        });
    }
}
