//! all_gather: front door, ring and Bruck, out-of-place and in-place, world
//! sizes 1..=8, counts 0/1/7/1000 and large, every element size.

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
                let mine = pattern(r, len, count);
                let mut out = vec![0xEE; n * len];
                collectives::all_gather(&mut rk.comm(), &mine, &mut out).unwrap();
                assert!(out == want, "front door n={n} rank {r} {dtype} count={count}");
                let mut out = vec![0xEE; n * len];
                collectives::all_gather_ring(&mut rk.comm(), &mine, &mut out).unwrap();
                assert!(out == want, "ring n={n} rank {r} {dtype} count={count}");
                let mut out = vec![0xEE; n * len];
                collectives::all_gather_bruck(&mut rk.comm(), &mine, &mut out).unwrap();
                assert!(out == want, "bruck n={n} rank {r} {dtype} count={count}");
                type InPlace = fn(&mut rankweave::collectives::Comm<'_>, &mut [u8]) -> rankweave::Result<()>;
                let in_place: [(&str, InPlace); 3] = [
                    ("in place", collectives::all_gather_inplace),
                    ("ring in place", collectives::all_gather_ring_inplace),
                    ("bruck in place", collectives::all_gather_bruck_inplace),
                ];
                for (name, f) in in_place {
                    let mut buf = vec![0xEE; n * len];
                    buf[r * len..(r + 1) * len].copy_from_slice(&mine);
                    f(&mut rk.comm(), &mut buf).unwrap();
                    assert!(buf == want, "{name} n={n} rank {r} {dtype} count={count}");
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
        check(n, &[LARGE / 4], &[DType::F32, DType::BF16]);
    }
}

#[test]
fn wrong_output_length_is_rejected() {
    run_mem(3, |rk| {
        let err = collectives::all_gather(&mut rk.comm(), &[0u8; 4], &mut [0u8; 8]).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("must be 12 bytes, got 8"), "{err}");
    });
}

#[test]
fn group_all_gather() {
    for n in [1, 2, 3, 4, 5, 8] {
        run_group(n, |pg| {
            for count in [0usize, 1, 7, 1000, 100_000] {
                let want: Vec<u8> = (0..n).flat_map(|k| pattern(k, count, count)).collect();
                let mut out = vec![0; n * count];
                pg.all_gather_bytes(&pattern(pg.rank(), count, count), &mut out).unwrap();
                assert_eq!(out, want, "n={n} count={count}");
            }
        });
    }
}
