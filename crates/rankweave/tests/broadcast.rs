//! broadcast: tree, scatter+all-gather and the pipelined chain, every root, world sizes 1..=8,
//! counts 0/1/7/1000 and large, every element size.

mod common;

use common::*;
use rankweave::collectives::{self, Comm};
use rankweave::{DType, Error};

type BroadcastFn = fn(&mut Comm<'_>, &mut [u8], usize) -> rankweave::Result<()>;

const ALGOS: [(&str, BroadcastFn); 4] = [
    ("front door", collectives::broadcast),
    ("tree", collectives::broadcast_tree),
    ("scatter+all-gather", collectives::broadcast_scatter_all_gather),
    ("chain", collectives::broadcast_chain),
];

fn check(n: usize, counts: &[usize], dtypes: &[DType], all_roots: bool) {
    run_mem(n, |rk| {
        let r = rk.rank();
        for &dtype in dtypes {
            for &count in counts {
                let len = count * dtype.size();
                for root in (0..n).filter(|&x| all_roots || x == 0 || x == n - 1) {
                    let want = pattern(root, len, count);
                    for (name, f) in ALGOS {
                        let mut buf = if r == root { want.clone() } else { vec![0xEE; len] };
                        f(&mut rk.comm(), &mut buf, root).unwrap();
                        assert!(buf == want, "{name} n={n} root={root} rank {r} {dtype} count={count}");
                    }
                }
            }
        }
    });
}

#[test]
fn matrix_small_counts() {
    for n in WORLD_SIZES {
        check(n, &COUNTS, &DType::ALL, true);
    }
}

#[test]
fn matrix_large_count() {
    for n in [2, 3, 4, 5, 8] {
        check(n, &[LARGE, LARGE + 1], &[DType::F32], false);
    }
}

#[test]
fn bad_root_is_rejected() {
    run_mem(3, |rk| {
        let err = collectives::broadcast(&mut rk.comm(), &mut [0u8; 4], 3).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("root 3"), "{err}");
    });
}

#[test]
fn group_broadcast() {
    for n in [1, 2, 3, 4, 5, 8] {
        run_group(n, |pg| {
            for count in [0usize, 1, 7, 1000, 100_000] {
                for root in 0..n {
                    let want = pattern(root, count * 4, count);
                    let mut buf = if pg.rank() == root { want.clone() } else { vec![0; count * 4] };
                    pg.broadcast_bytes(&mut buf, root).unwrap();
                    assert_eq!(buf, want, "n={n} root={root} count={count}");
                }
            }
        });
    }
}
