//! GroupCoordinator operations, ranks as threads over an in-process store.

mod coord_common;

use coord_common::{run_parallel, run_ranks, world_state};
use rankweave::coordinator::GroupCoordinator;
use rankweave::tensor::{Tensor, TensorDict, Value};
use rankweave::{DType, Error, ReduceOp};
use serde::{Deserialize, Serialize};

/// Rank `r`'s block for all_gather tests: values `r * 1000 + i`.
fn block(rank: usize, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n as i64).map(|i| rank as i64 * 1000 + i).collect::<Vec<_>>(), shape.to_vec()).unwrap()
}

fn world(s: &rankweave::parallel_state::ParallelState) -> GroupCoordinator {
    s.get_world_group().unwrap()
}

#[test]
fn accessors_follow_the_seed() {
    let out = run_parallel(2, 2, 1, |rank, s| {
        let w = world(s);
        assert_eq!((w.rank(), w.world_size(), w.rank_in_group(), w.unique_name()), (rank, 4, rank, "world:0"));
        assert_eq!(w.ranks(), &[0, 1, 2, 3]);
        let tp = s.get_tp_group().unwrap();
        let pp = s.get_pp_group().unwrap();
        assert_eq!(tp.unique_name(), "tp:0");
        assert_eq!(pp.unique_name(), "pp:0");
        assert_eq!(s.get_dp_group().unwrap().unique_name(), "dp:0");
        assert_eq!(tp.local_rank(), rank);
        (
            tp.ranks().to_vec(),
            pp.ranks().to_vec(),
            pp.first_rank(),
            pp.last_rank(),
            pp.is_first_rank(),
            pp.is_last_rank(),
            pp.next_rank(),
            pp.prev_rank(),
        )
    });
    assert_eq!(out[0], (vec![0, 1], vec![0, 2], 0, 2, true, false, 2, 2));
    assert_eq!(out[3], (vec![2, 3], vec![1, 3], 1, 3, false, true, 1, 1));
}

#[test]
fn all_reduce_sums_and_world_of_one_returns_input() {
    let out = run_ranks(3, |rank, store| {
        let s = world_state(store, 3, rank);
        let w = world(&s);
        let x = Tensor::from_vec(vec![rank as i32 + 1, 10 * rank as i32], [2]).unwrap();
        let y = w.all_reduce(x).unwrap();
        let f = Tensor::from_vec(vec![0.5f32 * rank as f32; 3], [3]).unwrap();
        let g = w.all_reduce(f).unwrap();
        (y.to_vec::<i32>().unwrap(), g.to_vec::<f32>().unwrap())
    });
    for (ints, floats) in out {
        assert_eq!(ints, vec![6, 30]);
        assert_eq!(floats, vec![1.5; 3]);
    }
    // A group of one communicates nothing and returns the input as is.
    run_parallel(1, 2, 1, |_, s| {
        let tp = s.get_tp_group().unwrap();
        let x = Tensor::from_vec(vec![7i64], [1]).unwrap();
        assert_eq!(tp.all_reduce(x.clone()).unwrap(), x);
        assert_eq!(tp.all_gather(&x, 5).unwrap(), x, "world 1 bypasses before the dim check, as the seed");
        assert_eq!(tp.broadcast(x.clone(), 0).unwrap(), x);
        assert!(tp.broadcast(x.clone(), 1).is_err(), "src is checked before the bypass, as the seed");
        assert_eq!(tp.gather(&x, 0, 0).unwrap(), Some(x.clone()));
        assert_eq!(tp.broadcast_object(Some(3u8), 0).unwrap(), 3);
        assert!(tp.recv_object::<u8>(0).is_err());
        let d = TensorDict::new().with("x", x.clone());
        assert_eq!(tp.broadcast_tensor_dict(Some(&d), 0).unwrap(), d);
        tp.send_tensor_dict(&d, None, None).unwrap();
        assert_eq!(tp.recv_tensor_dict(None, None).unwrap(), None);
        tp.barrier().unwrap();
    });
}

#[test]
fn all_gather_dims_0_1_and_minus_1_of_3d_tensors() {
    let shape = [2usize, 3, 4];
    let out = run_ranks(3, move |rank, store| {
        let s = world_state(store, 3, rank);
        let w = world(&s);
        let x = block(rank, &shape);
        let got: Vec<Tensor> = [0isize, 1, -1, 2, -3].iter().map(|&d| w.all_gather(&x, d).unwrap()).collect();
        let err = w.all_gather(&x, 3).unwrap_err();
        let err2 = w.all_gather(&x, -4).unwrap_err();
        (got, err.to_string(), err2.to_string())
    });
    let blocks: Vec<Tensor> = (0..3).map(|r| block(r, &shape)).collect();
    let refs: Vec<&Tensor> = blocks.iter().collect();
    for (got, err, err2) in out {
        assert_eq!(got[0].shape(), &[6, 3, 4]);
        assert_eq!(got[1].shape(), &[2, 9, 4]);
        assert_eq!(got[2].shape(), &[2, 3, 12]);
        assert_eq!(got[0], Tensor::cat(&refs, 0).unwrap());
        assert_eq!(got[1], Tensor::cat(&refs, 1).unwrap());
        assert_eq!(got[2], Tensor::cat(&refs, -1).unwrap());
        assert_eq!(got[3], got[2]);
        assert_eq!(got[4], got[0]);
        // Row 0 along the last dim: rank 0's 4 values, then rank 1's, then rank 2's.
        assert_eq!(
            &got[2].as_slice::<i64>().unwrap()[..12],
            &[0, 1, 2, 3, 1000, 1001, 1002, 1003, 2000, 2001, 2002, 2003]
        );
        assert!(err.contains("invalid dim (3)") && err.contains("expected -3 <= dim < 3"), "{err}");
        assert!(err2.contains("invalid dim (-4)"), "{err2}");
    }
}

#[test]
fn gather_to_a_non_zero_dst() {
    let out = run_ranks(3, |rank, store| {
        let s = world_state(store, 3, rank);
        let w = world(&s);
        let x = block(rank, &[2, 2]);
        let g = w.gather(&x, 2, 1).unwrap();
        let bad = w.gather(&x, 3, 0).unwrap_err();
        assert!(matches!(bad, Error::InvalidArgument(_)));
        assert!(bad.to_string().contains("expected 0 <= dst < 3"), "{bad}");
        g
    });
    assert_eq!(out[0], None);
    assert_eq!(out[1], None);
    let g = out[2].as_ref().unwrap();
    assert_eq!(g.shape(), &[2, 6]);
    assert_eq!(g.as_slice::<i64>().unwrap(), &[0, 1, 1000, 1001, 2000, 2001, 2, 3, 1002, 1003, 2002, 2003]);
}

#[test]
fn broadcast_from_src_1() {
    let out = run_ranks(3, |rank, store| {
        let s = world_state(store, 3, rank);
        let w = world(&s);
        let x = if rank == 1 {
            Tensor::from_vec(vec![1.5f64, -2.0], [2]).unwrap()
        } else {
            Tensor::zeros([2], DType::F64).unwrap()
        };
        let e = w.broadcast(x.clone(), 3).unwrap_err().to_string();
        assert!(e.contains("invalid src rank (3)"), "{e}");
        w.broadcast(x, 1).unwrap()
    });
    for t in out {
        assert_eq!(t.as_slice::<f64>().unwrap(), &[1.5, -2.0]);
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Schedule {
    step: u64,
    requests: Vec<Request>,
    meta: Option<std::collections::BTreeMap<String, Vec<i32>>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Request {
    id: String,
    tokens: Vec<u32>,
    temperature: f32,
    extra: Value,
}

fn schedule() -> Schedule {
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("blocks".to_string(), vec![3, 1, 4]);
    Schedule {
        step: 42,
        requests: vec![
            Request { id: "a".into(), tokens: vec![1, 2, 3], temperature: 0.5, extra: Value::None },
            Request {
                id: "b".into(),
                tokens: vec![],
                temperature: 1.0,
                extra: Value::List(vec![1i64.into(), "x".into()]),
            },
        ],
        meta: Some(meta),
    }
}

#[test]
fn objects_round_trip_nested_serde_structs() {
    let out = run_ranks(3, |rank, store| {
        let s = world_state(store, 3, rank);
        let w = world(&s);
        let b = w.broadcast_object(if rank == 2 { Some(schedule()) } else { None }, 2).unwrap();
        let mut list = if rank == 0 {
            vec![schedule(), schedule()]
        } else {
            vec![Schedule { step: 0, requests: vec![], meta: None }; 2]
        };
        w.broadcast_object_list(&mut list, 0).unwrap();
        // A ring of send_object / recv_object; even ranks send first.
        let next = (rank + 1) % 3;
        let prev = (rank + 2) % 3;
        let mine = Schedule { step: rank as u64, ..schedule() };
        let got: Schedule = if rank % 2 == 0 {
            w.send_object(&mine, next).unwrap();
            w.recv_object(prev).unwrap()
        } else {
            let g = w.recv_object(prev).unwrap();
            w.send_object(&mine, next).unwrap();
            g
        };
        let own = w.send_object(&1u8, rank).unwrap_err();
        let far = w.recv_object::<u8>(7).unwrap_err();
        assert!(matches!(own, Error::InvalidArgument(_)), "{own}");
        assert!(own.to_string().contains("own position"), "{own}");
        assert!(far.to_string().contains("expected 0 <= src < 3"), "{far}");
        let missing = w.broadcast_object::<u8>(None, rank);
        assert!(missing.is_err());
        (b, list, got.step)
    });
    for (rank, (b, list, step)) in out.into_iter().enumerate() {
        assert_eq!(b, schedule());
        assert_eq!(list, vec![schedule(), schedule()]);
        assert_eq!(step, ((rank + 2) % 3) as u64);
    }
}

fn mixed_dict(rank_tag: i64) -> TensorDict {
    TensorDict::new()
        .with("input_ids", Tensor::from_vec(vec![1i64, 2, 3, 4, 5, 6], [2, 3]).unwrap())
        .with("positions", Tensor::from_vec(vec![0i32, 1, 2, 3, 4, 5, 6, 7], [8]).unwrap())
        .with("hidden", Tensor::from_f64(&[0.5, -1.0, 2.0, 3.25], [2, 2], DType::BF16).unwrap())
        .with("scale", Tensor::from_f64(&[1.5, 2.5, 3.5], [3], DType::F16).unwrap())
        .with("bytes", Tensor::from_vec(vec![7u8, 8, 9], [3]).unwrap())
        .with("empty", Tensor::zeros([0, 4], DType::F32).unwrap())
        .with("logits", Tensor::from_vec(vec![0.25f64; 6], [3, 2]).unwrap())
        .with("is_prompt", true)
        .with("step", rank_tag)
        .with("name", "batch-1")
        .with("nothing", Value::None)
        .with(
            "nested",
            Value::Map(vec![
                ("lens".into(), Value::List(vec![3i64.into(), 1i64.into()])),
                ("temp".into(), 0.75f64.into()),
            ]),
        )
        .with("i8", Tensor::from_vec(vec![-3i8, 4], [1, 2]).unwrap())
        .with("f32", Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0], [5]).unwrap())
}

#[test]
fn broadcast_tensor_dict_mixed_values_empty_tensors_and_dtypes() {
    let out = run_ranks(3, |rank, store| {
        let s = world_state(store, 3, rank);
        let w = world(&s);
        let d = mixed_dict(9);
        let got = w.broadcast_tensor_dict(if rank == 1 { Some(&d) } else { None }, 1).unwrap();
        // A src rank without a dict is refused before anything is sent.
        assert!(matches!(w.broadcast_tensor_dict(None, rank), Err(Error::InvalidArgument(_))));
        got
    });
    for got in out {
        assert_eq!(got, mixed_dict(9));
        assert_eq!(got.keys().collect::<Vec<_>>(), mixed_dict(9).keys().collect::<Vec<_>>());
    }
}

#[test]
fn pp_send_recv_tensor_dict_with_and_without_all_gather_group() {
    // tp 2 x pp 2: PP groups [0, 2] and [1, 3]; stage 0 sends to stage 1.
    let out = run_parallel(2, 2, 1, |_, s| {
        let pp = s.get_pp_group().unwrap();
        let tp = s.get_tp_group().unwrap();
        let d = mixed_dict(pp.rank() as i64);
        let mut got = Vec::new();
        for ag in [None, Some(&tp)] {
            if pp.is_first_rank() {
                pp.send_tensor_dict(&d, None, ag).unwrap();
            } else {
                got.push(pp.recv_tensor_dict(None, ag).unwrap().unwrap());
            }
        }
        (pp.rank(), got)
    });
    for (rank, got) in out {
        if rank >= 2 {
            assert_eq!(got.len(), 2);
            // The sender was the first rank of this PP group: global rank - 2.
            for g in got {
                assert_eq!(g, mixed_dict(rank as i64 - 2));
            }
        } else {
            assert!(got.is_empty());
        }
    }
}

#[test]
fn send_recv_default_to_next_and_prev() {
    let out = run_ranks(2, |rank, store| {
        let s = world_state(store, 2, rank);
        let w = world(&s);
        let x = Tensor::from_vec(vec![rank as f32 + 0.5; 4], [2, 2]).unwrap();
        if rank == 0 {
            w.send(&x, None).unwrap();
            w.recv(&[2, 2], DType::F32, None).unwrap()
        } else {
            let r = w.recv(&[2, 2], DType::F32, None).unwrap();
            w.send(&x, None).unwrap();
            r
        }
    });
    assert_eq!(out[0].as_slice::<f32>().unwrap(), &[1.5; 4]);
    assert_eq!(out[1].as_slice::<f32>().unwrap(), &[0.5; 4]);
}

#[test]
fn large_tensors_on_huge_pages_cross_intact_both_ways() {
    use rankweave::tensor::{Storage, HUGE_PAGE_MIN};
    // One tensor above the huge-page threshold (its storage is a huge-page
    // mapping on both sides) and one below, each way.
    let sizes = [HUGE_PAGE_MIN + 4096 + 12, HUGE_PAGE_MIN / 2 + 8];
    let pattern = |rank: usize, n: usize| -> Tensor {
        Tensor::from_vec((0..n as i32).map(|i| i.wrapping_mul(-1640531535) ^ rank as i32).collect::<Vec<_>>(), [n])
            .unwrap()
    };
    let out = run_ranks(2, move |rank, store| {
        let s = world_state(store, 2, rank);
        let w = world(&s);
        let mut got = Vec::new();
        for bytes in sizes {
            let n = bytes / 4;
            let x = pattern(rank, n);
            let r = if rank == 0 {
                w.send(&x, None).unwrap();
                w.recv(&[n], DType::I32, None).unwrap()
            } else {
                let r = w.recv(&[n], DType::I32, None).unwrap();
                w.send(&x, None).unwrap();
                r
            };
            let huge = matches!(r.storage(), Storage::Host(h) if h.on_huge_pages());
            got.push((r, huge));
        }
        got
    });
    let on = !matches!(std::env::var("RANKWEAVE_HUGE_PAGES").as_deref(), Ok("0" | "off" | "no" | "false"));
    for (rank, got) in out.into_iter().enumerate() {
        for ((r, huge), bytes) in got.into_iter().zip(sizes) {
            assert_eq!(r, pattern(1 - rank, bytes / 4), "rank {rank}, {bytes} bytes");
            assert_eq!(huge, on && bytes >= HUGE_PAGE_MIN, "rank {rank}, {bytes} bytes");
        }
    }
}

#[test]
fn barrier_and_destroy() {
    run_ranks(3, |rank, store| {
        let s = world_state(store, 3, rank);
        let w = world(&s);
        w.barrier().unwrap();
        w.destroy();
        assert!(w.is_destroyed());
        let e = w.all_reduce(Tensor::from_vec(vec![1i32], [1]).unwrap()).unwrap_err();
        assert!(matches!(e, Error::Destroyed(_)), "{e}");
        assert!(e.to_string().contains("world:0 was destroyed"), "{e}");
        assert_eq!(w.world_size(), 3);
        w.destroy();
    });
}

#[test]
fn debug_detail_reports_mismatched_collectives() {
    let out = run_ranks(2, |rank, store| {
        let s = world_state(store, 2, rank);
        let w = world(&s);
        w.set_debug_detail(true);
        // Matching calls pass the check.
        let x = Tensor::from_vec(vec![1.0f32; 32], [4, 8]).unwrap();
        assert_eq!(w.all_reduce(x.clone()).unwrap().as_slice::<f32>().unwrap(), &[2.0; 32]);
        w.barrier().unwrap();
        // Then rank 1 calls all_gather while rank 0 calls all_reduce.
        let e = if rank == 0 { w.all_reduce(x).unwrap_err() } else { w.all_gather(&x, 0).unwrap_err() };
        assert!(w.poisoned().is_some());
        let after = w.barrier().unwrap_err();
        (e, after)
    });
    for (rank, (e, after)) in out.into_iter().enumerate() {
        assert!(matches!(e, Error::Mismatch { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("rank 1 called all_gather(shape [4, 8], float32, dim 0) while rank 0 called all_reduce(shape [4, 8], float32"),
            "{msg}"
        );
        assert!(msg.contains("in group world:0"), "{msg}");
        // Each rank names the other one, never itself.
        let other = 1 - rank;
        assert_eq!(e.peer(), Some(other), "{msg}");
        assert!(msg.contains(&format!("on rank {rank} (peer rank {other})")), "{msg}");
        // The group is poisoned: later calls refuse without communicating.
        assert!(matches!(&after, Error::Poisoned { group, .. } if group == "world:0"), "{after}");
    }
}

#[test]
fn debug_detail_reports_mismatched_point_to_point_calls() {
    let out = run_ranks(2, |rank, store| {
        let s = rankweave::parallel_state::ParallelState::new();
        let short = rankweave::GroupOptions { timeout: std::time::Duration::from_secs(5), ..coord_common::opts() };
        s.init_world_with_store(store, 2, rank, rank, short).unwrap();
        let w = world(&s);
        w.set_debug_detail(true);
        if rank == 0 {
            // The receiver refuses after the fingerprint; whatever happens to
            // this send (buffered or timed out), it must not hang.
            let _ = w.send(&Tensor::zeros([4], DType::F32).unwrap(), Some(1));
            None
        } else {
            Some(w.recv(&[4, 2], DType::F32, Some(0)).unwrap_err())
        }
    });
    let e = out[1].as_ref().unwrap();
    assert!(matches!(e, Error::Mismatch { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("rank 0 called send(shape [4], float32) while rank 1 called recv(shape [4, 2], float32)"),
        "{msg}"
    );
}

#[test]
fn world_size_matrix() {
    for n in [2usize, 3, 4, 5, 8] {
        let out = run_ranks(n, move |rank, store| {
            let s = world_state(store, n, rank);
            let w = world(&s);
            let sum = w.all_reduce(Tensor::from_vec(vec![rank as i64, 1], [2]).unwrap()).unwrap();
            assert_eq!(sum.to_vec::<i64>().unwrap(), vec![(n * (n - 1) / 2) as i64, n as i64]);
            let x = block(rank, &[2, 1, 3]);
            let g = w.all_gather(&x, 1).unwrap();
            assert_eq!(g.shape(), &[2, n, 3]);
            let blocks: Vec<Tensor> = (0..n).map(|r| block(r, &[2, 1, 3])).collect();
            let refs: Vec<&Tensor> = blocks.iter().collect();
            assert_eq!(g, Tensor::cat(&refs, 1).unwrap());
            let gathered = w.gather(&x, n - 1, -1).unwrap();
            assert_eq!(gathered.is_some(), rank == n - 1);
            if let Some(t) = gathered {
                assert_eq!(t, Tensor::cat(&refs, -1).unwrap());
            }
            let src = n / 2;
            let d = w.broadcast_tensor_dict((rank == src).then(|| mixed_dict(src as i64)).as_ref(), src).unwrap();
            assert_eq!(d, mixed_dict(src as i64));
            // A ring of tensor dicts: even ranks send first, odd ranks receive first.
            let mine = mixed_dict(rank as i64);
            let got = if rank % 2 == 0 {
                w.send_tensor_dict(&mine, None, None).unwrap();
                w.recv_tensor_dict(None, None).unwrap()
            } else {
                let got = w.recv_tensor_dict(None, None).unwrap();
                w.send_tensor_dict(&mine, None, None).unwrap();
                got
            };
            assert_eq!(got.unwrap(), mixed_dict(((rank + n - 1) % n) as i64));
            w.barrier().unwrap();
        });
        assert_eq!(out.len(), n);
    }
}

/// Rank `r`'s input for the reduce tests: `r * 100 + i`, shape [4, 6].
fn ramp(rank: usize) -> Tensor {
    Tensor::from_vec((0..24).map(|i| rank as i64 * 100 + i).collect::<Vec<_>>(), [4, 6]).unwrap()
}

/// The element-wise sum of `ramp(r)` over `n` ranks.
fn ramp_sum(n: usize) -> Tensor {
    let v: Vec<i64> = (0..24).map(|i| (0..n as i64).map(|r| r * 100 + i).sum()).collect();
    Tensor::from_vec(v, [4, 6]).unwrap()
}

#[test]
fn reduce_sums_on_dst_only() {
    let out = run_ranks(3, |rank, store| {
        let s = world_state(store, 3, rank);
        let w = world(&s);
        let r = w.reduce(ramp(rank), 2).unwrap();
        let m = w.reduce_with(Tensor::from_vec(vec![rank as f32, -(rank as f32)], [2]).unwrap(), 0, ReduceOp::Max);
        assert!(w.reduce(ramp(rank), 3).is_err(), "dst out of range");
        (r, m.unwrap())
    });
    assert_eq!(out[2].0.as_ref(), Some(&ramp_sum(3)));
    assert!(out[0].0.is_none() && out[1].0.is_none());
    assert_eq!(out[0].1.as_ref().unwrap().to_vec::<f32>().unwrap(), vec![2.0, 0.0]);
    assert!(out[1].1.is_none() && out[2].1.is_none());
}

#[test]
fn reduce_scatter_along_first_and_last_dims() {
    let out = run_ranks(2, |rank, store| {
        let s = world_state(store, 2, rank);
        let w = world(&s);
        let d0 = w.reduce_scatter(&ramp(rank), 0).unwrap();
        let d1 = w.reduce_scatter(&ramp(rank), -1).unwrap();
        let e = w.reduce_scatter(&Tensor::zeros([3, 2], DType::F32).unwrap(), 0).unwrap_err();
        assert!(e.to_string().contains("does not split into 2 equal blocks"), "{e}");
        (d0, d1)
    });
    let sum = ramp_sum(2);
    for (rank, (d0, d1)) in out.iter().enumerate() {
        assert_eq!(d0, &sum.narrow(0, rank * 2, 2).unwrap(), "rank {rank} dim 0");
        assert_eq!(d1, &sum.narrow(1, rank * 3, 3).unwrap(), "rank {rank} dim -1");
    }
}

#[test]
fn all_to_all_exchanges_blocks() {
    let n = 3;
    let out = run_ranks(n, move |rank, store| {
        let s = world_state(store, n, rank);
        let w = world(&s);
        let x = Tensor::from_vec((0..18).map(|i| rank as i32 * 100 + i).collect::<Vec<_>>(), [3, 6]).unwrap();
        let same = w.all_to_all(&x, 1, 1).unwrap();
        let moved = w.all_to_all(&x, 1, 0).unwrap();
        (same, moved)
    });
    let inputs: Vec<Tensor> = (0..n)
        .map(|r| Tensor::from_vec((0..18).map(|i| r as i32 * 100 + i).collect::<Vec<_>>(), [3, 6]).unwrap())
        .collect();
    for (rank, (same, moved)) in out.iter().enumerate() {
        // Rank `rank` receives block `rank` of dim 1 from every rank.
        let blocks: Vec<Tensor> = inputs.iter().map(|t| t.narrow(1, rank * 2, 2).unwrap()).collect();
        let refs: Vec<&Tensor> = blocks.iter().collect();
        assert_eq!(same, &Tensor::cat(&refs, 1).unwrap(), "rank {rank}");
        assert_eq!(moved.shape(), &[9, 2]);
        assert_eq!(moved, &Tensor::cat(&refs, 0).unwrap(), "rank {rank}");
    }
}

#[test]
fn groups_are_found_by_name_for_the_seed_custom_ops() {
    let out = run_parallel(2, 2, 1, |rank, s| {
        let tp = s.get_tp_group().unwrap();
        assert_eq!(tp.device(), rankweave::tensor::Device::Cpu);
        assert_eq!(tp.device_group().unwrap().device(), rankweave::tensor::Device::Cpu);
        assert_eq!(s.lookup_group("world:0").unwrap().world_size(), 4);
        let mut t = Tensor::from_vec(vec![rank as i64 + 1; 2], [2]).unwrap();
        s.inplace_all_reduce(&mut t, "tp:0").unwrap();
        let pp_sum = s.outplace_all_reduce(&Tensor::from_vec(vec![rank as i64], [1]).unwrap(), "pp:0").unwrap();
        let missing = s.lookup_group("tp:5").unwrap_err();
        assert!(matches!(missing, Error::NotFound(_)), "{missing}");
        assert!(missing.to_string().contains("pp:0") && missing.to_string().contains("world:0"), "{missing}");
        tp.destroy();
        let gone = s.inplace_all_reduce(&mut t, "tp:0").unwrap_err();
        assert!(matches!(gone, Error::Destroyed(_)), "{gone}");
        (t.to_vec::<i64>().unwrap(), pp_sum.to_vec::<i64>().unwrap())
    });
    // TP groups [0, 1] and [2, 3]; PP groups [0, 2] and [1, 3].
    assert_eq!(out[0], (vec![3, 3], vec![2]));
    assert_eq!(out[3], (vec![7, 7], vec![4]));
}

#[test]
fn world_errors_name_world_0_and_poison_it() {
    let out = run_ranks(2, |rank, store| {
        let s = rankweave::parallel_state::ParallelState::new();
        let short = rankweave::GroupOptions { timeout: std::time::Duration::from_secs(3), ..coord_common::opts() };
        s.init_world_with_store(store, 2, rank, rank, short).unwrap();
        let w = world(&s);
        w.barrier().unwrap();
        if rank == 1 {
            // Rank 1 leaves; rank 0's next all_reduce fails (lost peer or timeout).
            w.destroy();
            return None;
        }
        let e = w.all_reduce(Tensor::from_vec(vec![1.0f32; 4], [4]).unwrap()).unwrap_err();
        let after = w.all_reduce(Tensor::from_vec(vec![1.0f32; 4], [4]).unwrap()).unwrap_err();
        Some((e, after))
    });
    let (e, after) = out[0].as_ref().unwrap();
    let msg = e.to_string();
    assert!(e.poisons_group(), "{msg}");
    assert!(msg.contains("all_reduce") && msg.contains("in group world:0 on rank 0"), "{msg}");
    assert!(!msg.contains("world:1"), "{msg}");
    assert!(matches!(after, Error::Poisoned { group, .. } if group == "world:0"), "{after}");
}

#[test]
fn tp_broadcast_failures_name_tp_0_and_the_operation() {
    let out = run_parallel(2, 1, 1, |rank, s| {
        let tp = s.get_tp_group().unwrap();
        assert!(tp.uses_message_queue_broadcaster());
        let d = TensorDict::new().with("x", Tensor::from_vec(vec![1i32, 2], [2]).unwrap());
        let got = tp.broadcast_tensor_dict((rank == 0).then_some(&d), 0).unwrap();
        assert_eq!(got, d);
        tp.barrier().unwrap();
        if rank == 0 {
            // The writer leaves: its queue closes under the waiting reader.
            tp.destroy();
            return None;
        }
        Some(tp.broadcast_tensor_dict(None, 0).unwrap_err())
    });
    let e = out[1].as_ref().unwrap();
    let msg = e.to_string();
    assert!(msg.contains("broadcast_tensor_dict") && msg.contains("in group tp:0 on rank 1"), "{msg}");
    assert!(msg.contains("[mq.dequeue in mq:"), "the queue stays visible as the inner cause: {msg}");
    assert_eq!(e.peer(), Some(0), "{msg}");
}

#[test]
fn a_reader_in_another_operation_than_the_message_queue_writer_gets_a_mismatch() {
    let out = run_parallel(2, 1, 1, |rank, s| {
        let tp = s.get_tp_group().unwrap();
        assert!(tp.uses_message_queue_broadcaster());
        if rank == 0 {
            // The writer only sends: it cannot see the reader's call.
            tp.broadcast_object(Some(vec![7u32; 3]), 0).map(|_| ()).err()
        } else {
            tp.broadcast_tensor_dict(None, 0).map(|_| ()).err()
        }
    });
    assert!(out[0].is_none(), "{:?}", out[0]);
    let e = out[1].as_ref().expect("the reader must not return Ok");
    let msg = e.to_string();
    assert!(matches!(e, Error::Mismatch { .. }), "{msg}");
    assert!(msg.contains("broadcast_object") && msg.contains("broadcast_tensor_dict"), "{msg}");
    assert_eq!(e.peer(), Some(0), "{msg}");
}
