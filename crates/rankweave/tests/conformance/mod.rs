//! The backend conformance suite: every operation of a
//! [`ProcessGroup`], every dtype and reduce op, counts 0/1/7/1000 (and a
//! large subset), every root, point-to-point and argument checks, run by
//! each rank on its own group. A new backend proves itself by passing
//! [`suite`] on every rank at world sizes 1..=8 (ranks as threads, as in
//! `tests/conformance_backends.rs`, or as processes under a launcher).
//!
//! Expected values are computed locally from the rank and the world size
//! (`common::input` / `common::expected`: small integers, exact in every
//! dtype), so no rank trusts another's answer; bitwise identity of
//! rounding-sensitive float sums is checked by gathering every rank's bits.
#![allow(dead_code)]

use crate::common::{expected, first_diff, input, pattern, random_floats, COUNTS, LARGE};
use rankweave::{DType, Error, ProcessGroup, ReduceOp};

/// How much of the matrix to run.
#[derive(Debug, Clone, Copy)]
pub struct Level {
    /// Element counts of every case.
    pub counts: &'static [usize],
    /// Also run the large-count subset.
    pub large: bool,
}

/// Every count, no large cases.
pub const FULL: Level = Level { counts: &COUNTS, large: false };

/// Runs the whole suite on `pg` (call it on every rank of the group at once).
pub fn suite(pg: &ProcessGroup, level: Level) {
    reductions(pg, level.counts);
    data_movement(pg, level.counts);
    point_to_point(pg);
    arguments_are_checked_without_poisoning(pg);
    bitwise_identical(pg);
    pg.barrier().unwrap();
    if level.large {
        large(pg);
    }
    assert!(pg.poisoned().is_none(), "{}: the suite left the group poisoned", pg.name());
}

fn tag(pg: &ProcessGroup, what: &str, dtype: DType, op: Option<ReduceOp>, count: usize) -> String {
    let op = op.map_or(String::new(), |o| format!(" {o}"));
    format!(
        "{what} on {} backend {} n={} rank {} {dtype}{op} count={count}",
        pg.name(),
        pg.backend_name(),
        pg.size(),
        pg.rank()
    )
}

/// all_reduce, reduce (every root), reduce_scatter: every dtype and op.
pub fn reductions(pg: &ProcessGroup, counts: &[usize]) {
    let (r, n) = (pg.rank(), pg.size());
    for dtype in DType::ALL {
        for op in ReduceOp::ALL {
            for &count in counts {
                let es = dtype.size();
                let want = expected(dtype, op, n, count);
                let mut buf = input(dtype, op, r, count);
                pg.all_reduce_bytes(&mut buf, dtype, op).unwrap();
                assert!(
                    buf == want,
                    "{}: {}",
                    tag(pg, "all_reduce", dtype, Some(op), count),
                    first_diff(&buf, &want, es)
                );

                let root = (count + dtype as usize) % n;
                let mut buf = input(dtype, op, r, count);
                pg.reduce_bytes(&mut buf, dtype, op, root).unwrap();
                if r == root {
                    assert!(
                        buf == want,
                        "{} root {root}: {}",
                        tag(pg, "reduce", dtype, Some(op), count),
                        first_diff(&buf, &want, es)
                    );
                }

                // reduce_scatter: every rank contributes n blocks of `count`.
                let full = input(dtype, op, r, n * count);
                let want_all = expected(dtype, op, n, n * count);
                let mut out = vec![0u8; count * es];
                pg.reduce_scatter_bytes(&full, &mut out, dtype, op).unwrap();
                let mine = &want_all[r * count * es..(r + 1) * count * es];
                assert!(
                    out == mine,
                    "{}: {}",
                    tag(pg, "reduce_scatter", dtype, Some(op), count),
                    first_diff(&out, mine, es)
                );
            }
        }
    }
}

/// broadcast, all_gather, gather, scatter, all_to_all from every root.
pub fn data_movement(pg: &ProcessGroup, counts: &[usize]) {
    let (r, n) = (pg.rank(), pg.size());
    for &len in counts {
        for root in 0..n {
            let mut buf = if r == root { pattern(root, len, 1) } else { vec![0u8; len] };
            pg.broadcast_bytes(&mut buf, root).unwrap();
            assert!(buf == pattern(root, len, 1), "{}", tag(pg, "broadcast", DType::U8, None, len));

            let mine = pattern(r, len, 2);
            let mut out = if r == root { Some(vec![0u8; n * len]) } else { None };
            pg.gather_bytes(&mine, out.as_deref_mut(), root).unwrap();
            if let Some(out) = out {
                let want: Vec<u8> = (0..n).flat_map(|j| pattern(j, len, 2)).collect();
                assert!(out == want, "{} root {root}", tag(pg, "gather", DType::U8, None, len));
            }

            let all: Vec<u8> = (0..n).flat_map(|j| pattern(j, len, 3)).collect();
            let mut out = vec![0u8; len];
            pg.scatter_bytes((r == root).then_some(&all[..]), &mut out, root).unwrap();
            assert!(out == pattern(r, len, 3), "{} root {root}", tag(pg, "scatter", DType::U8, None, len));
        }
        let mut out = vec![0u8; n * len];
        pg.all_gather_bytes(&pattern(r, len, 4), &mut out).unwrap();
        let want: Vec<u8> = (0..n).flat_map(|j| pattern(j, len, 4)).collect();
        assert!(out == want, "{}", tag(pg, "all_gather", DType::U8, None, len));

        // all_to_all: block j of rank i is pattern(i * n + j).
        let input: Vec<u8> = (0..n).flat_map(|j| pattern(r * n + j, len, 5)).collect();
        let mut out = vec![0u8; n * len];
        pg.all_to_all_bytes(&input, &mut out).unwrap();
        let want: Vec<u8> = (0..n).flat_map(|i| pattern(i * n + r, len, 5)).collect();
        assert!(out == want, "{}", tag(pg, "all_to_all", DType::U8, None, len));

        // Typed wrappers go through the same path.
        let mut x = vec![r as i64 + 1; len];
        pg.all_reduce(&mut x, ReduceOp::Sum).unwrap();
        assert!(
            x.iter().all(|v| *v == (n * (n + 1) / 2) as i64),
            "{}",
            tag(pg, "all_reduce<i64>", DType::I64, None, len)
        );
        pg.barrier().unwrap();
    }
}

/// send/recv in a ring and between every pair, in order, with exact lengths.
pub fn point_to_point(pg: &ProcessGroup) {
    let (r, n) = (pg.rank(), pg.size());
    if n == 1 {
        return;
    }
    for len in [0usize, 1, 7, 1000, 100_000] {
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        // Even ranks send first, odd ranks receive first (a ring of odd
        // size has one pair of senders in a row; messages are buffered).
        let mut got = vec![0u8; len];
        if r % 2 == 0 {
            pg.send_bytes(&pattern(r, len, 6), next).unwrap();
            pg.recv_bytes(&mut got, prev).unwrap();
        } else {
            pg.recv_bytes(&mut got, prev).unwrap();
            pg.send_bytes(&pattern(r, len, 6), next).unwrap();
        }
        assert!(got == pattern(prev, len, 6), "send/recv ring on {} n={n} rank {r} len={len}", pg.name());
    }
    // Every ordered pair, three messages each, in order.
    for a in 0..n {
        for b in 0..n {
            if a == b {
                continue;
            }
            for k in 0..3 {
                if r == a {
                    pg.send(&[(a * n + b) as i32, k], b).unwrap();
                } else if r == b {
                    let mut m = [0i32; 2];
                    pg.recv(&mut m, a).unwrap();
                    assert_eq!(m, [(a * n + b) as i32, k], "pair {a}->{b} on {}", pg.name());
                }
            }
        }
    }
    pg.barrier().unwrap();
}

/// Bad arguments fail locally with [`Error::InvalidArgument`] naming the
/// operation and the group, before anything is sent: the group stays usable.
pub fn arguments_are_checked_without_poisoning(pg: &ProcessGroup) {
    let (r, n) = (pg.rank(), pg.size());
    let mut errs = vec![
        pg.all_reduce_bytes(&mut [0u8; 5], DType::F32, ReduceOp::Sum).unwrap_err(),
        pg.broadcast_bytes(&mut [0u8; 4], n).unwrap_err(),
        pg.all_gather_bytes(&[1, 2], &mut [0u8; 3]).unwrap_err(),
        pg.gather_bytes(&[1], None, n + 1).unwrap_err(),
        pg.send_bytes(&[1], r).unwrap_err(),
    ];
    if n > 1 {
        errs.push(pg.all_reduce_bytes(&mut [0u8; 4], DType::F64, ReduceOp::Max).unwrap_err());
        errs.push(pg.reduce_scatter_bytes(&[0u8; 4], &mut [0u8; 4], DType::F32, ReduceOp::Sum).unwrap_err());
        // Only the root passes gather's output / scatter's input.
        let root = (r + 1) % n;
        errs.push(pg.gather_bytes(&[1], Some(&mut vec![0u8; n]), root).unwrap_err());
        errs.push(pg.scatter_bytes(Some(&vec![0u8; n]), &mut [0u8; 1], root).unwrap_err());
        errs.push(pg.gather_bytes(&[1], None, r).unwrap_err());
        errs.push(pg.all_to_all_bytes(&vec![0u8; n + 1], &mut vec![0u8; n + 1]).unwrap_err());
    }
    for e in errs {
        assert!(matches!(e, Error::InvalidArgument(_)), "{}: {e}", pg.name());
        assert!(e.to_string().contains(&format!("in group {}", pg.name())), "{e}");
    }
    assert!(pg.poisoned().is_none());
    pg.barrier().unwrap();
}

/// Rounding-sensitive float sums: every rank ends with the same bits.
pub fn bitwise_identical(pg: &ProcessGroup) {
    let (r, n) = (pg.rank(), pg.size());
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for count in [5usize, 3000, 20_000] {
            let mut buf = random_floats(dtype, (r * 1000 + count) as u64, count);
            pg.all_reduce_bytes(&mut buf, dtype, ReduceOp::Sum).unwrap();
            let mut all = vec![0u8; n * buf.len()];
            pg.all_gather_bytes(&buf, &mut all).unwrap();
            for j in 0..n {
                assert!(
                    all[j * buf.len()..(j + 1) * buf.len()] == buf[..],
                    "{}: rank {j} differs",
                    tag(pg, "bits", dtype, None, count)
                );
            }
        }
    }
}

/// A few large counts (segmented and pipelined paths).
pub fn large(pg: &ProcessGroup) {
    let (r, n) = (pg.rank(), pg.size());
    for (dtype, op, count) in [
        (DType::F32, ReduceOp::Sum, LARGE),
        (DType::BF16, ReduceOp::Avg, LARGE + 3),
        (DType::I8, ReduceOp::Prod, LARGE - 1),
    ] {
        let mut buf = input(dtype, op, r, count);
        pg.all_reduce_bytes(&mut buf, dtype, op).unwrap();
        let want = expected(dtype, op, n, count);
        assert!(
            buf == want,
            "{}: {}",
            tag(pg, "all_reduce", dtype, Some(op), count),
            first_diff(&buf, &want, dtype.size())
        );
    }
    let len = 3 * LARGE + 5;
    let mut buf = if r == n - 1 { pattern(n - 1, len, 7) } else { vec![0u8; len] };
    pg.broadcast_bytes(&mut buf, n - 1).unwrap();
    assert!(buf == pattern(n - 1, len, 7), "{}", tag(pg, "broadcast", DType::U8, None, len));
    let mut out = vec![0u8; n * LARGE];
    pg.all_gather_bytes(&pattern(r, LARGE, 8), &mut out).unwrap();
    assert!(
        out == (0..n).flat_map(|j| pattern(j, LARGE, 8)).collect::<Vec<_>>(),
        "{}",
        tag(pg, "all_gather", DType::U8, None, LARGE)
    );
    let full = input(DType::F32, ReduceOp::Max, r, n * (LARGE / 4));
    let mut out = vec![0u8; LARGE];
    pg.reduce_scatter_bytes(&full, &mut out, DType::F32, ReduceOp::Max).unwrap();
    let want = expected(DType::F32, ReduceOp::Max, n, n * (LARGE / 4));
    assert!(out[..] == want[r * LARGE..(r + 1) * LARGE], "{}", tag(pg, "reduce_scatter", DType::F32, None, LARGE / 4));
}
