//! scatter: every root, world sizes 1..=8, counts 0/1/7/1000 and large.

mod common;

use common::*;
use rankweave::collectives;
use rankweave::{DType, Error};

fn check(n: usize, counts: &[usize], dtypes: &[DType]) {
    run_mem(n, |rk| {
        let r = rk.rank();
        for &dtype in dtypes {
            for &count in counts {
                let len = count * dtype.size();
                for root in (0..n).filter(|&x| len < 10_000 || x == 0 || x == n - 1) {
                    let all: Vec<u8> =
                        if r == root { (0..n).flat_map(|k| pattern(k, len, root)).collect() } else { Vec::new() };
                    let i = (r == root).then_some(&all[..]);
                    let mut out = vec![0xEE; len];
                    collectives::scatter(&mut rk.comm(), i, &mut out, root).unwrap();
                    assert!(out == pattern(r, len, root), "n={n} root={root} rank {r} {dtype} count={count}");
                }
            }
        }
    });
}

#[test]
fn matrix_small_counts() {
    for n in WORLD_SIZES {
        check(n, &COUNTS, &DType::ALL);
    }
}

#[test]
fn matrix_large_count() {
    for n in [2, 3, 8] {
        check(n, &[LARGE / 2], &[DType::I32]);
    }
}

#[test]
fn root_input_length_is_checked() {
    run_mem(2, |rk| {
        if rk.rank() == 0 {
            let err = collectives::scatter(&mut rk.comm(), Some(&[0u8; 6]), &mut [0u8; 4], 0).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
            assert!(err.to_string().contains("expected 2 x 4 = 8"), "{err}");
            let err = collectives::scatter(&mut rk.comm(), None, &mut [0u8; 4], 0).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        }
    });
}

#[test]
fn group_scatter() {
    for n in [1, 2, 3, 4, 5, 8] {
        run_group(n, |pg| {
            for count in [0usize, 7, 100_000] {
                for root in 0..n {
                    let all: Vec<u8> = (0..n).flat_map(|k| pattern(k, count, root)).collect();
                    let mut out = vec![0; count];
                    pg.scatter_bytes((pg.rank() == root).then_some(&all[..]), &mut out, root).unwrap();
                    assert_eq!(out, pattern(pg.rank(), count, root));
                }
            }
        });
    }
}
