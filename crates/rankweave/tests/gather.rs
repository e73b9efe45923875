//! gather: every root, world sizes 1..=8, counts 0/1/7/1000 and large.

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
                let want: Vec<u8> = (0..n).flat_map(|k| pattern(k, len, count)).collect();
                for root in (0..n).filter(|&x| len < 10_000 || x == 0 || x == n - 1) {
                    let mut out = vec![0xEE; n * len];
                    let o = (r == root).then_some(&mut out[..]);
                    collectives::gather(&mut rk.comm(), &pattern(r, len, count), o, root).unwrap();
                    if r == root {
                        assert!(out == want, "n={n} root={root} {dtype} count={count}");
                    } else {
                        assert!(out.iter().all(|b| *b == 0xEE), "non-root output touched");
                    }
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
fn root_without_output_is_rejected() {
    run_mem(1, |rk| {
        let err = collectives::gather(&mut rk.comm(), &[1u8; 4], None, 0).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let err = collectives::gather(&mut rk.comm(), &[1u8; 4], Some(&mut [0u8; 5]), 0).unwrap_err();
        assert!(err.to_string().contains("expected 1 x 4 = 4"), "{err}");
    });
}

#[test]
fn group_gather() {
    for n in [1, 2, 3, 4, 5, 8] {
        run_group(n, |pg| {
            for count in [0usize, 7, 100_000] {
                for root in 0..n {
                    let want: Vec<u8> = (0..n).flat_map(|k| pattern(k, count, root)).collect();
                    let mut out = vec![0; n * count];
                    let o = (pg.rank() == root).then_some(&mut out[..]);
                    pg.gather_bytes(&pattern(pg.rank(), count, root), o, root).unwrap();
                    if pg.rank() == root {
                        assert_eq!(out, want);
                    }
                }
            }
        });
    }
}
