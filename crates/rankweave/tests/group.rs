//! Process groups as threads over an in-process store: world creation,
//! `new_group` memberships and unique names, validation, point-to-point,
//! independence of groups, poisoning and destroy; then every collective end
//! to end over TCP, two groups from two threads, mismatches and a rank
//! leaving mid-all_reduce.

use rankweave::transport::{OpCode, Tag};
use rankweave::{DType, Error, GroupOptions, HashStore, ProcessGroup, ReduceOp, SharedStore, TransportKind};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn opts() -> GroupOptions {
    GroupOptions {
        timeout: Duration::from_secs(20),
        transport: TransportKind::Tcp,
        listen_host: Some("127.0.0.1".into()),
        ..GroupOptions::builtin()
    }
}

fn spawn<R, F>(n: usize, f: F) -> Vec<R>
where
    R: Send + 'static,
    F: Fn(ProcessGroup) -> R + Send + Sync + 'static,
{
    let store: SharedStore = Arc::new(HashStore::new());
    let f = Arc::new(f);
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let (store, f) = (store.clone(), f.clone());
            std::thread::spawn(move || f(ProcessGroup::new_world(store, r, n, opts()).expect("new_world")))
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
}

#[test]
fn new_world_validates_its_arguments() {
    let store: SharedStore = Arc::new(HashStore::new());
    let e = ProcessGroup::new_world(store.clone(), 3, 3, opts()).unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("rank 3") && m.contains("world_size 3")), "{e}");
    let e = ProcessGroup::new_world(store, 0, 0, opts()).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)));
}

#[test]
fn world_reports_ranks_names_and_namespaced_store() {
    let out = spawn(3, |g| {
        assert_eq!(g.name(), "world:0");
        assert_eq!(g.size(), 3);
        assert_eq!(g.global_rank(), g.rank());
        assert_eq!(g.global_ranks(), &[0, 1, 2]);
        assert_eq!(g.transport_kind(), TransportKind::Tcp);
        assert_eq!(g.timeout(), Duration::from_secs(20));
        g.store().set(&format!("k{}", g.rank()), b"v").unwrap();
        g.store().wait(&["k0", "k1", "k2"], Duration::from_secs(10)).unwrap();
        g.group_id()
    });
    assert!(out.windows(2).all(|w| w[0] == w[1]), "every rank has the same group id");
}

#[test]
fn a_second_world_on_the_same_store_gets_a_new_name() {
    let store: SharedStore = Arc::new(HashStore::new());
    let first = ProcessGroup::new_world(store.clone(), 0, 1, opts()).unwrap();
    let second = ProcessGroup::new_world(store, 0, 1, opts()).unwrap();
    assert_eq!((first.name(), second.name()), ("world:0", "world:1"));
}

/// tp = contiguous blocks of 2, pp = stride 2 (8 ranks: tp 2, pp 4).
#[test]
fn new_group_memberships_names_and_ranks_match_the_model_parallel_layout() {
    let out = spawn(8, |w| {
        let me = w.rank();
        let mut tp = None;
        for b in 0..4 {
            let ranks = [2 * b, 2 * b + 1];
            let g = w.new_group(&ranks, "tp").unwrap();
            assert_eq!(g.is_some(), ranks.contains(&me), "rank {me} membership in {ranks:?}");
            tp = tp.or(g);
        }
        let mut pp = None;
        for i in 0..2 {
            let ranks: Vec<usize> = (i..8).step_by(2).collect();
            pp = pp.or(w.new_group(&ranks, "pp").unwrap());
        }
        let (tp, pp) = (tp.unwrap(), pp.unwrap());
        assert_eq!((tp.name(), tp.size(), tp.rank()), ("tp:0", 2, me % 2));
        assert_eq!(tp.global_ranks(), &[me - me % 2, me - me % 2 + 1]);
        assert_eq!((pp.name(), pp.size(), pp.rank()), ("pp:0", 4, me / 2));
        assert_eq!(pp.global_ranks(), (me % 2..8).step_by(2).collect::<Vec<_>>().as_slice());
        assert_eq!((tp.global_rank(), pp.global_rank()), (me, me));

        // Traffic inside each subgroup reaches the right global ranks.
        let peer = 1 - tp.rank();
        let mut buf = [0u8];
        let tag = Tag::new(OpCode::SendRecv, 1);
        let deadline = Instant::now() + Duration::from_secs(20);
        tp.transport().unwrap().send_recv(peer, tag, &[me as u8], peer, tag, &mut buf, deadline).unwrap();
        assert_eq!(buf[0] as usize, tp.global_ranks()[peer]);
        let n = pp.size();
        let (to, from) = ((pp.rank() + 1) % n, (pp.rank() + n - 1) % n);
        pp.transport().unwrap().send_recv(to, tag, &[me as u8], from, tag, &mut buf, deadline).unwrap();
        assert_eq!(buf[0] as usize, pp.global_ranks()[from]);
        (tp.group_id(), pp.group_id())
    });
    // Different tp groups are different groups on the wire.
    assert_ne!(out[0].0, out[2].0);
    assert_eq!(out[0].0, out[1].0);
    assert_eq!(out[0].1, out[2].1);
    assert_ne!(out[0].1, out[1].1);
}

#[test]
fn unique_names_count_per_name_and_order_of_ranks_sets_group_ranks() {
    spawn(3, |w| {
        let a = w.new_group(&[2, 0, 1], "x").unwrap().unwrap();
        let b = w.new_group(&[0, 1, 2], "x").unwrap().unwrap();
        let c = w.new_group(&[1, 2, 0], "y").unwrap().unwrap();
        assert_eq!((a.name(), b.name(), c.name()), ("x:0", "x:1", "y:0"));
        assert_eq!(a.global_ranks(), &[2, 0, 1]);
        assert_eq!(a.rank(), [1, 2, 0][w.rank()]);
        // A subgroup of a subgroup maps through to global ranks.
        let sub = a.new_group(&[0, 2], "z").unwrap();
        match w.rank() {
            2 | 1 => {
                let sub = sub.unwrap();
                assert_eq!(sub.global_ranks(), &[2, 1]);
                assert_eq!(sub.name(), "z:0");
            }
            _ => assert!(sub.is_none()),
        }
    });
}

#[test]
fn new_group_rejects_bad_rank_lists() {
    spawn(2, |w| {
        let bad = [(vec![], "empty"), (vec![0, 2], "out of range"), (vec![1, 1], "appears twice")];
        for (ranks, why) in bad {
            let e = w.new_group(&ranks, "bad").unwrap_err();
            assert!(matches!(&e, Error::InvalidArgument(m) if m.contains(why)), "{ranks:?}: {e}");
        }
        // Rejected calls do not desynchronize the namespaces: a good call still meets.
        let g = w.new_group(&[0, 1], "ok").unwrap().unwrap();
        assert_eq!(g.name(), "ok:0");
    });
}

#[test]
fn point_to_point_keeps_order_per_peer() {
    spawn(3, |w| {
        let me = w.rank();
        if me == 0 {
            for i in 0..5i32 {
                w.send(&[i, 10 + i], 1).unwrap();
                w.send(&[100 + i], 2).unwrap();
            }
        } else {
            for i in 0..5i32 {
                if me == 1 {
                    let mut b = [0i32; 2];
                    w.recv(&mut b, 0).unwrap();
                    assert_eq!(b, [i, 10 + i]);
                } else {
                    let mut b = [0i32; 1];
                    w.recv(&mut b, 0).unwrap();
                    assert_eq!(b, [100 + i]);
                }
            }
        }
        assert!(matches!(w.send(&[1u8], me), Err(Error::InvalidArgument(_))));
        assert!(matches!(w.recv(&mut [1u8], 3), Err(Error::InvalidArgument(_))));
    });
}

#[test]
fn two_groups_run_at_once_from_two_threads() {
    spawn(4, |w| {
        let a = w.new_group(&[0, 1, 2, 3], "a").unwrap().unwrap();
        let b = w.new_group(&[3, 2, 1, 0], "b").unwrap().unwrap();
        let run = |g: ProcessGroup, salt: u8| {
            std::thread::spawn(move || {
                let n = g.size();
                let me = g.rank();
                let len = 2 << 20;
                let mut buf = vec![0u8; len];
                for step in 0..4u64 {
                    let data = vec![salt ^ (me as u8) ^ step as u8; len];
                    let (to, from) = ((me + 1) % n, (me + n - 1) % n);
                    let tag = Tag::new(OpCode::AllGather, step);
                    let deadline = Instant::now() + Duration::from_secs(20);
                    g.transport().unwrap().send_recv(to, tag, &data, from, tag, &mut buf, deadline).unwrap();
                    assert!(buf.iter().all(|&x| x == salt ^ (from as u8) ^ step as u8));
                }
            })
        };
        let (ta, tb) = (run(a, 0x10), run(b, 0x20));
        ta.join().unwrap();
        tb.join().unwrap();
    });
}

#[test]
fn world_of_one_short_circuits_every_collective() {
    let store: SharedStore = Arc::new(HashStore::new());
    let g = ProcessGroup::new_world(store, 0, 1, opts()).unwrap();
    let mut x = [1.5f32, -2.0];
    g.all_reduce(&mut x, ReduceOp::Sum).unwrap();
    g.broadcast(&mut x, 0).unwrap();
    g.reduce(&mut x, ReduceOp::Max, 0).unwrap();
    assert_eq!(x, [1.5, -2.0]);
    let mut out = [0f32; 2];
    g.all_gather(&x, &mut out).unwrap();
    assert_eq!(out, x);
    let mut out = [0i32; 3];
    g.gather(&[4, 5, 6], Some(&mut out), 0).unwrap();
    assert_eq!(out, [4, 5, 6]);
    let mut out = [0u8; 2];
    g.scatter(Some(&[7u8, 8]), &mut out, 0).unwrap();
    assert_eq!(out, [7, 8]);
    let mut out = [0i64; 2];
    g.reduce_scatter(&[9i64, 10], &mut out, ReduceOp::Sum).unwrap();
    assert_eq!(out, [9, 10]);
    let mut out = [0u8; 4];
    g.all_to_all(&[1u8, 2, 3, 4], &mut out).unwrap();
    assert_eq!(out, [1, 2, 3, 4]);
    g.barrier().unwrap();
    assert!(matches!(g.send(&[1u8], 0), Err(Error::InvalidArgument(_))));
}

#[test]
fn collectives_validate_lengths_and_roots_before_any_traffic() {
    spawn(2, |g| {
        let check = |r: rankweave::Result<()>, want: &str| match r {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(want), "{m:?} lacks {want:?}"),
            other => panic!("expected InvalidArgument containing {want:?}, got {other:?}"),
        };
        check(g.all_gather_bytes(&[0; 4], &mut [0; 7]), "must be 8 bytes, got 7");
        check(g.reduce_scatter_bytes(&[0; 6], &mut [0; 4], DType::F32, ReduceOp::Sum), "must be 8 bytes, got 6");
        check(g.all_reduce_bytes(&mut [0; 6], DType::F32, ReduceOp::Sum), "float32");
        check(g.broadcast_bytes(&mut [0; 4], 2), "root 2");
        check(g.all_to_all_bytes(&[0; 3], &mut [0; 3]), "equal blocks");
        if g.rank() == 0 {
            check(g.gather_bytes(&[0; 2], None, 0), "must pass an output");
            check(g.gather_bytes(&[0; 2], Some(&mut [0; 3]), 0), "must be 4 bytes, got 3");
            check(g.scatter_bytes(Some(&[0; 2]), &mut [0; 2], 1), "only root 1");
        }
        assert!(g.poisoned().is_none());
    });
}

#[test]
fn destroy_poisons_every_clone_and_the_peer_sees_it_lost() {
    let out = spawn(2, |g| {
        if g.rank() == 1 {
            let clone = g.clone();
            g.destroy();
            assert!(matches!(clone.barrier(), Err(Error::Poisoned { .. })));
            assert!(matches!(clone.send(&[1u8], 0), Err(Error::Poisoned { .. })));
            return None;
        }
        let mut b = [0u8; 4];
        Some(g.recv(&mut b, 1).unwrap_err())
    });
    let e = out[0].as_ref().unwrap();
    assert!(matches!(e, Error::PeerLost { .. }), "{e}");
    assert_eq!(e.peer(), Some(1));
}

#[test]
fn a_forced_shared_memory_world_of_one_reports_shm() {
    let store: SharedStore = Arc::new(HashStore::new());
    let o = GroupOptions { transport: TransportKind::Shm, ..opts() };
    let g = ProcessGroup::new_world(store, 0, 1, o).unwrap();
    assert_eq!(g.transport_kind(), TransportKind::Shm);
}

#[test]
fn destroy_from_another_thread_interrupts_a_blocked_receive() {
    let done = Arc::new(std::sync::Barrier::new(2));
    spawn(2, move |g| {
        if g.rank() == 0 {
            let closer = {
                let g = g.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(200));
                    g.destroy();
                })
            };
            let start = Instant::now();
            let e = g.recv(&mut [0u8; 4], 1).unwrap_err();
            assert!(matches!(e, Error::Poisoned { .. }), "{e}");
            assert!(start.elapsed() < Duration::from_secs(5));
            closer.join().unwrap();
        }
        done.wait();
    });
}

// ---- Collectives end to end over TCP (the algorithms from collectives/) ----

#[test]
fn all_reduce_sums_exactly_for_world_sizes_1_to_8() {
    for n in 1..=8usize {
        let out = spawn(n, move |g| {
            let r = g.rank() as f32;
            let mut x: Vec<f32> = (0..1000).map(|i| r * 1000.0 + i as f32).collect();
            g.all_reduce(&mut x, ReduceOp::Sum).unwrap();
            let mut m = [g.rank() as i64 * 3 - 7];
            g.all_reduce(&mut m, ReduceOp::Max).unwrap();
            (x, m[0])
        });
        let tri = (n * (n - 1) / 2) as f32;
        let want: Vec<f32> = (0..1000).map(|i| tri * 1000.0 + (n * i) as f32).collect();
        for (x, m) in out {
            assert_eq!(x, want, "world size {n}");
            assert_eq!(m, (n as i64 - 1) * 3 - 7);
        }
    }
}

#[test]
fn large_all_reduce_is_bitwise_identical_on_every_rank() {
    let out = spawn(3, |g| {
        let r = g.rank();
        let mut x: Vec<f32> = (0..(1 << 20)).map(|i| ((i * 7 + r * 13) % 1024) as f32 * 0.25).collect();
        g.all_reduce(&mut x, ReduceOp::Sum).unwrap();
        x
    });
    for (i, v) in out[0].iter().enumerate().step_by(997) {
        let want: f32 = (0..3).map(|r| ((i * 7 + r * 13) % 1024) as f32 * 0.25).sum();
        assert_eq!(*v, want, "element {i}");
    }
    assert!(out.iter().all(|x| x == &out[0]));
}

#[test]
fn every_collective_over_tcp_at_world_size_3() {
    spawn(3, |g| {
        let (n, r) = (g.size(), g.rank() as i32);
        let mut b = [r; 4];
        g.broadcast(&mut b, 2).unwrap();
        assert_eq!(b, [2; 4]);
        let mut all = [0i32; 6];
        g.all_gather(&[r, r * 10], &mut all).unwrap();
        assert_eq!(all, [0, 0, 1, 10, 2, 20]);
        let mut gathered = [0i32; 3];
        let out = (g.rank() == 1).then_some(&mut gathered[..]);
        g.gather(&[r + 5], out, 1).unwrap();
        if g.rank() == 1 {
            assert_eq!(gathered, [5, 6, 7]);
        }
        let src = [100, 101, 102, 103, 104, 105];
        let mut mine = [0i32; 2];
        g.scatter((g.rank() == 0).then_some(&src[..]), &mut mine, 0).unwrap();
        assert_eq!(mine, [100 + 2 * r, 101 + 2 * r]);
        let mut red = [r + 1, 2];
        g.reduce(&mut red, ReduceOp::Prod, 0).unwrap();
        if g.rank() == 0 {
            assert_eq!(red, [6, 8]);
        }
        let input: Vec<i64> = (0..6).map(|i| i * 10 + r as i64).collect();
        let mut rs = [0i64; 2];
        g.reduce_scatter(&input, &mut rs, ReduceOp::Sum).unwrap();
        let k = 2 * g.rank() as i64;
        assert_eq!(rs, [k * 30 + 3, (k + 1) * 30 + 3]);
        let a2a_in: Vec<u8> = (0..n).map(|j| (g.rank() * 10 + j) as u8).collect();
        let mut a2a_out = vec![0u8; n];
        g.all_to_all(&a2a_in, &mut a2a_out).unwrap();
        assert_eq!(a2a_out, (0..n).map(|i| (i * 10 + g.rank()) as u8).collect::<Vec<_>>());
        g.barrier().unwrap();
    });
}

#[test]
fn two_groups_all_reduce_at_once_from_two_threads() {
    spawn(4, |w| {
        let a = w.new_group(&[0, 1, 2, 3], "a").unwrap().unwrap();
        let b = w.new_group(&[3, 2, 1, 0], "b").unwrap().unwrap();
        let run = |g: ProcessGroup, scale: i32| {
            std::thread::spawn(move || {
                for step in 0..20 {
                    let len = if step % 2 == 0 { 3 } else { 100_000 };
                    let mut x = vec![(g.global_rank() as i32 + step) * scale; len];
                    g.all_reduce(&mut x, ReduceOp::Sum).unwrap();
                    assert!(x.iter().all(|&v| v == (6 + 4 * step) * scale), "step {step}");
                }
            })
        };
        let (ta, tb) = (run(a, 1), run(b, -3));
        ta.join().unwrap();
        tb.join().unwrap();
    });
}

#[test]
fn mismatched_all_reduce_sizes_fail_on_both_ranks_and_poison() {
    let out = spawn(2, |g| {
        let mut x = vec![1f32; if g.rank() == 0 { 10 } else { 12 }];
        let e = g.all_reduce(&mut x, ReduceOp::Sum).unwrap_err();
        let again = g.all_reduce(&mut [1f32], ReduceOp::Sum).unwrap_err();
        assert!(matches!(again, Error::Poisoned { .. }), "{again}");
        e
    });
    for (r, e) in out.iter().enumerate() {
        assert!(matches!(e, Error::Mismatch { .. }), "rank {r}: {e}");
        assert_eq!(e.peer(), Some(1 - r), "rank {r}: {e}");
    }
}

#[test]
fn a_rank_leaving_mid_all_reduce_fails_every_survivor_naming_it() {
    let victim = 2;
    let out = spawn(4, move |g| {
        let mut x = vec![1f32; 1 << 20];
        for step in 0..1000 {
            if g.rank() == victim && step == 2 {
                return Err(Instant::now());
            }
            if let Err(e) = g.all_reduce(&mut x, ReduceOp::Max) {
                return Ok((Instant::now(), e));
            }
        }
        panic!("rank {} never noticed", g.rank());
    });
    let left = *out[victim].as_ref().unwrap_err();
    for (r, res) in out.into_iter().enumerate().filter(|(r, _)| *r != victim) {
        let (at, e) = res.unwrap();
        assert!(matches!(e, Error::PeerLost { .. }), "rank {r}: {e}");
        assert_eq!(e.peer(), Some(victim), "rank {r}: {e}");
        assert!(at.saturating_duration_since(left) < Duration::from_secs(3), "rank {r} took too long");
    }
}

#[test]
fn a_panic_inside_an_operation_closes_the_group() {
    spawn(2, |g| {
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            g.with_comm(|_| -> rankweave::Result<()> { panic!("bug in an algorithm") })
        }));
        assert!(caught.is_err());
        assert!(matches!(g.barrier(), Err(Error::Poisoned { .. })));
    });
}
