//! Mismatched calls on every backend: ranks that call different
//! collectives, dtypes, reduce ops, roots or sizes (a zero-length call
//! included) get errors within milliseconds, never `Ok` with wrong data and
//! never a hang.
//!
//! Every call carries its descriptor ([`rankweave::transport::OpDesc`]) on
//! every transport and every receiver checks it. A rank that only *sends*
//! in a call (the root of a tree broadcast, the leaves of a tree reduce,
//! gather's non-roots, scatter's root) cannot see the mismatch inside that
//! call without an acknowledgement that would double small-message
//! latency; it learns of it from the detecting rank's abort at its next
//! operation, as does a rank of three that never exchanged with the odd
//! one. The property tests assert exactly that: no rank hangs, some rank
//! reports the mismatch, and every rank fails in the mismatched call or one
//! of the two barriers after it, all within two seconds.

mod common;

use common::{input, pattern, run_world, Under};
use proptest::prelude::*;
use rankweave::transport::{OpCode, OpDesc};
use rankweave::{DType, Error, ProcessGroup, ReduceOp};
use std::time::{Duration, Instant};

const BACKENDS: [Under; 4] = [Under::Tcp, Under::Shm, Under::Hier(2), Under::Mem];

/// Runs `f(rank, group)` on the ranks of a fresh world of `n` (timeout 4 s).
fn world<R: Send>(under: Under, n: usize, f: impl Fn(usize, &ProcessGroup) -> R + Sync) -> Vec<R> {
    run_world(under, n, Duration::from_secs(4), |r, pg| f(r, &pg))
}

/// One rank's call.
#[derive(Clone, Copy, Debug)]
enum Call {
    AllReduce(DType, ReduceOp, usize),
    Reduce(DType, ReduceOp, usize, usize),
    ReduceScatter(DType, ReduceOp, usize),
    Broadcast(usize, usize),
    AllGather(usize),
    Gather(usize, usize),
    Scatter(usize, usize),
    AllToAll(usize),
    Barrier,
}

impl Call {
    /// The descriptor the group computes for this call on a rank.
    fn desc(self) -> OpDesc {
        use Call::*;
        match self {
            AllReduce(d, o, c) => OpDesc::new(OpCode::AllReduce, Some(d), Some(o), None, c * d.size()),
            Reduce(d, o, c, root) => OpDesc::new(OpCode::Reduce, Some(d), Some(o), Some(root), c * d.size()),
            ReduceScatter(d, o, c) => OpDesc::new(OpCode::ReduceScatter, Some(d), Some(o), None, c * d.size()),
            Broadcast(len, root) => OpDesc::new(OpCode::Broadcast, None, None, Some(root), len),
            AllGather(len) => OpDesc::new(OpCode::AllGather, None, None, None, len),
            Gather(len, root) => OpDesc::new(OpCode::Gather, None, None, Some(root), len),
            Scatter(len, root) => OpDesc::new(OpCode::Scatter, None, None, Some(root), len),
            AllToAll(len) => OpDesc::new(OpCode::AllToAll, None, None, None, len),
            Barrier => OpDesc::new(OpCode::Barrier, None, None, None, 0),
        }
    }

    fn run(self, r: usize, pg: &ProcessGroup) -> rankweave::Result<()> {
        use Call::*;
        let n = pg.size();
        match self {
            AllReduce(d, o, c) => pg.all_reduce_bytes(&mut input(d, o, r, c), d, o),
            Reduce(d, o, c, root) => pg.reduce_bytes(&mut input(d, o, r, c), d, o, root),
            ReduceScatter(d, o, c) => pg.reduce_scatter_bytes(&input(d, o, r, n * c), &mut vec![0; c * d.size()], d, o),
            Broadcast(len, root) => pg.broadcast_bytes(&mut pattern(r, len, 1), root),
            AllGather(len) => pg.all_gather_bytes(&pattern(r, len, 2), &mut vec![0; n * len]),
            Gather(len, root) => {
                let mut out = vec![0; n * len];
                pg.gather_bytes(&pattern(r, len, 3), (r == root).then_some(&mut out[..]), root)
            }
            Scatter(len, root) => {
                let all = pattern(r, n * len, 4);
                pg.scatter_bytes((r == root).then_some(&all[..]), &mut vec![0; len], root)
            }
            AllToAll(len) => pg.all_to_all_bytes(&pattern(r, n * len, 5), &mut vec![0; n * len]),
            Barrier => pg.barrier(),
        }
    }
}

/// Runs `calls[r]` on rank `r`; returns each rank's result and time taken.
fn mismatched(under: Under, calls: &[Call]) -> Vec<(rankweave::Result<()>, Duration)> {
    world(under, calls.len(), |r, pg| {
        let t = Instant::now();
        let res = calls[r].run(r, pg);
        (res, t.elapsed())
    })
}

fn is_mismatch(e: &Error) -> bool {
    matches!(e, Error::Mismatch { .. }) || e.to_string().contains("mismatch")
}

/// The three cases: different large counts, different dtypes of
/// the same byte count, and a zero-length call on one rank only. Every
/// rank must fail in that very call, quickly, naming both descriptors.
#[test]
fn the_three_all_reduce_cases_fail_on_every_rank_at_once() {
    let big = 1 << 20;
    let cases: [(&str, [Call; 2]); 3] = [
        (
            "counts",
            [Call::AllReduce(DType::F32, ReduceOp::Sum, big), Call::AllReduce(DType::F32, ReduceOp::Sum, big - 64)],
        ),
        (
            "dtypes",
            [Call::AllReduce(DType::F32, ReduceOp::Sum, 1000), Call::AllReduce(DType::I32, ReduceOp::Sum, 1000)],
        ),
        ("zero", [Call::AllReduce(DType::F32, ReduceOp::Sum, 0), Call::AllReduce(DType::F32, ReduceOp::Sum, 12)]),
    ];
    for under in BACKENDS {
        for (what, calls) in cases {
            for (r, (res, took)) in mismatched(under, &calls).into_iter().enumerate() {
                let e = match res {
                    Err(e) => e,
                    Ok(()) => panic!("{under:?} {what}: rank {r} returned Ok"),
                };
                assert!(took < Duration::from_secs(2), "{under:?} {what}: rank {r} took {took:?}: {e}");
                assert!(is_mismatch(&e), "{under:?} {what}: rank {r}: {e}");
                if matches!(under, Under::Tcp | Under::Mem) {
                    // Both descriptors are named.
                    let text = e.to_string();
                    for c in calls {
                        assert!(text.contains(&c.desc().to_string()), "{under:?} {what}: rank {r}: {text}");
                    }
                }
            }
        }
    }
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

fn rop() -> impl Strategy<Value = ReduceOp> {
    prop::sample::select(ReduceOp::ALL.to_vec())
}

fn call(n: usize) -> impl Strategy<Value = Call> {
    let count = prop_oneof![Just(0usize), Just(1), Just(7), Just(100), 1usize..20_000];
    prop_oneof![
        (dtype(), rop(), count.clone()).prop_map(|(d, o, c)| Call::AllReduce(d, o, c)),
        (dtype(), rop(), count.clone(), 0..n).prop_map(|(d, o, c, r)| Call::Reduce(d, o, c, r)),
        (dtype(), rop(), count.clone()).prop_map(|(d, o, c)| Call::ReduceScatter(d, o, c)),
        (count.clone(), 0..n).prop_map(|(c, r)| Call::Broadcast(c, r)),
        count.clone().prop_map(Call::AllGather),
        (count.clone(), 0..n).prop_map(|(c, r)| Call::Gather(c, r)),
        (count.clone(), 0..n).prop_map(|(c, r)| Call::Scatter(c, r)),
        count.prop_map(Call::AllToAll),
        Just(Call::Barrier),
    ]
}

fn check_random_calls(under: Under, calls: &[Call]) -> Result<(), TestCaseError> {
    // A rank may finish its own part of a mismatched call correctly (it did
    // not exchange with the odd rank); the abort of the rank that noticed
    // reaches it at its next operation. So: the call, then up to two
    // barriers, and every rank must have failed by then.
    let outs = world(under, calls.len(), |r, pg| {
        let t = Instant::now();
        let mut res = calls[r].run(r, pg);
        for _ in 0..2 {
            if res.is_ok() {
                res = pg.barrier();
            }
        }
        (res, t.elapsed())
    });
    let mut mismatch_seen = false;
    for (r, (res, took)) in outs.into_iter().enumerate() {
        prop_assert!(took < Duration::from_secs(2), "{under:?} {calls:?}: rank {r} took {took:?}");
        match res {
            Err(e) => mismatch_seen |= is_mismatch(&e),
            Ok(()) => return Err(TestCaseError::fail(format!("{under:?} {calls:?}: rank {r} never failed"))),
        }
    }
    prop_assert!(mismatch_seen, "{under:?} {calls:?}: no rank reported a mismatch");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_mismatched_pairs_fail_on_every_rank(a in call(2), b in call(2), backend in 0..BACKENDS.len()) {
        prop_assume!(a.desc() != b.desc());
        check_random_calls(BACKENDS[backend], &[a, b])?;
    }

    /// Three ranks, one of them calling something else, over TCP, shared
    /// memory and the hierarchical backend (where a rank waiting in its
    /// node's segment keeps reading the other nodes' probes). Not over the
    /// in-process test backend, which probes only the peer it waits on.
    #[test]
    fn one_rank_of_three_calling_something_else_fails_everywhere(a in call(3), b in call(3), odd in 0..3usize, backend in 0..3usize) {
        prop_assume!(a.desc() != b.desc());
        let mut calls = [a; 3];
        calls[odd] = b;
        check_random_calls([Under::Tcp, Under::Shm, Under::Hier(2)][backend], &calls)?;
    }
}
