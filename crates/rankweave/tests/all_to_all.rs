//! all_to_all: world sizes 1..=8, per-block counts 0/1/7/1000 and large.

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
                // Block j of rank i's input: pattern(i, len, j).
                let inp: Vec<u8> = (0..n).flat_map(|j| pattern(r, len, j)).collect();
                let want: Vec<u8> = (0..n).flat_map(|i| pattern(i, len, r)).collect();
                let mut out = vec![0xEE; n * len];
                collectives::all_to_all(&mut rk.comm(), &inp, &mut out).unwrap();
                assert!(out == want, "front door n={n} rank {r} {dtype} count={count}");
                let mut out = vec![0xEE; n * len];
                collectives::all_to_all_pairwise(&mut rk.comm(), &inp, &mut out).unwrap();
                assert!(out == want, "pairwise n={n} rank {r} {dtype} count={count}");
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
        check(n, &[LARGE / 8], &[DType::F32]);
    }
}

#[test]
fn wrong_lengths_are_rejected() {
    run_mem(3, |rk| {
        let err = collectives::all_to_all(&mut rk.comm(), &[0u8; 6], &mut [0u8; 9]).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let err = collectives::all_to_all(&mut rk.comm(), &[0u8; 7], &mut [0u8; 7]).unwrap_err();
        assert!(err.to_string().contains("3 equal blocks"), "{err}");
    });
}

#[test]
fn group_all_to_all() {
    for n in [1, 2, 3, 4, 5, 8] {
        run_group(n, |pg| {
            let r = pg.rank();
            for len in [0usize, 7, 100_000] {
                let inp: Vec<u8> = (0..n).flat_map(|j| pattern(r, len, j)).collect();
                let want: Vec<u8> = (0..n).flat_map(|i| pattern(i, len, r)).collect();
                let mut out = vec![0; n * len];
                pg.all_to_all_bytes(&inp, &mut out).unwrap();
                assert_eq!(out, want);
            }
        });
    }
}
