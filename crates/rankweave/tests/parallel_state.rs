//! ParallelState: layouts, groups, patching, destroy/re-init and the
//! same-node probe, ranks as threads over an in-process store.

mod coord_common;

use coord_common::{opts, run_parallel, run_ranks, world_state};
use rankweave::parallel_state::{self as ps, model_parallel_layout, ModelParallelConfig, ParallelState};
use rankweave::tensor::Tensor;
use rankweave::{Error, HashStore, PrefixStore, SharedStore};
use std::sync::Arc;

#[test]
fn seed_layout_8_ranks_tp2_pp4() {
    let out = run_parallel(2, 4, 1, |rank, s| {
        let tp = s.get_tp_group().unwrap();
        let pp = s.get_pp_group().unwrap();
        assert_eq!(s.get_tensor_model_parallel_world_size().unwrap(), 2);
        assert_eq!(s.get_tensor_model_parallel_rank().unwrap(), rank % 2);
        assert_eq!(pp.rank_in_group(), rank / 2);
        assert!(s.model_parallel_is_initialized());
        assert_eq!(s.layout().unwrap(), model_parallel_layout(8, 2, 4, 1).unwrap());
        // Reductions stay inside each group.
        let t = tp.all_reduce(Tensor::from_vec(vec![rank as i64], [1]).unwrap()).unwrap();
        let p = pp.all_gather(&Tensor::from_vec(vec![rank as i64], [1]).unwrap(), 0).unwrap();
        (tp.ranks().to_vec(), pp.ranks().to_vec(), t.to_vec::<i64>().unwrap()[0], p.to_vec::<i64>().unwrap())
    });
    let tp_groups = [[0, 1], [2, 3], [4, 5], [6, 7]];
    for (rank, (tp, pp, tsum, pgather)) in out.into_iter().enumerate() {
        assert_eq!(tp, tp_groups[rank / 2]);
        let expect_pp: Vec<usize> = (rank % 2..8).step_by(2).collect();
        assert_eq!(pp, expect_pp);
        assert_eq!(tsum, (tp[0] + tp[1]) as i64);
        assert_eq!(pgather, expect_pp.iter().map(|&r| r as i64).collect::<Vec<_>>());
    }
}

#[test]
fn dp_variant_tp2_pp2_dp2() {
    let out = run_parallel(2, 2, 2, |rank, s| {
        let dp = s.get_dp_group().unwrap();
        let sum = dp.all_reduce(Tensor::from_vec(vec![rank as i32], [1]).unwrap()).unwrap();
        (
            s.get_tp_group().unwrap().ranks().to_vec(),
            s.get_pp_group().unwrap().ranks().to_vec(),
            dp.ranks().to_vec(),
            sum.to_vec::<i32>().unwrap()[0],
        )
    });
    let l = model_parallel_layout(8, 2, 2, 2).unwrap();
    for (rank, (tp, pp, dp, sum)) in out.into_iter().enumerate() {
        assert_eq!(tp, l.tp_group_of(rank).unwrap());
        assert_eq!(pp, l.pp_group_of(rank).unwrap());
        assert_eq!(dp, l.dp_group_of(rank).unwrap());
        assert_eq!(dp, vec![rank % 4, rank % 4 + 4]);
        assert_eq!(sum as usize, 2 * (rank % 4) + 4);
    }
}

#[test]
fn layout_and_init_errors_follow_the_seed() {
    run_ranks(4, |rank, store| {
        let s = world_state(store.clone(), 4, rank);
        let e = s.initialize_model_parallel(2, 3, None).unwrap_err().to_string();
        assert!(
            e.contains(
                "world_size (4) is not equal to tensor_model_parallel_size (2) x pipeline_model_parallel_size (3)"
            ),
            "{e}"
        );
        assert!(matches!(s.initialize_model_parallel(2, 2, Some("nccl")), Err(Error::Unsupported(_))));
        // Re-initializing the world with the same size is a no-op; another size is an error.
        s.init_world_with_store(store.clone(), 4, rank, rank, opts()).unwrap();
        let e = s.init_world_with_store(store, 8, rank, rank, opts()).unwrap_err();
        assert!(matches!(e, Error::AlreadyInitialized(_)), "{e}");
        assert!(e.to_string().contains("different world size"), "{e}");
        s.ensure_model_parallel_initialized(2, 2, None).unwrap();
        s.ensure_model_parallel_initialized(2, 2, None).unwrap();
        let e = s.ensure_model_parallel_initialized(4, 1, None).unwrap_err().to_string();
        assert!(e.contains("get_tensor_model_parallel_world_size()=2 vs. tensor_model_parallel_size=4"), "{e}");
        let e = s.ensure_model_parallel_initialized(2, 1, None).unwrap_err().to_string();
        assert!(e.contains("pp_world_size=2 vs. pipeline_model_parallel_size=1"), "{e}");
        assert!(matches!(s.initialize_model_parallel(2, 2, None), Err(Error::AlreadyInitialized(_))));
    });
}

#[test]
fn patch_tensor_parallel_group_restores_also_on_panic() {
    run_parallel(2, 2, 1, |_, s| {
        let original = s.get_tp_group().unwrap();
        let world = s.get_world_group().unwrap();
        {
            let _patch = s.patch_tensor_parallel_group(world.clone()).unwrap();
            assert_eq!(s.get_tp_group().unwrap().unique_name(), "world:0");
            assert_eq!(s.get_tensor_model_parallel_world_size().unwrap(), 4);
            assert!(s.patch_tensor_parallel_group(world.clone()).is_err(), "patching twice is an error");
        }
        assert_eq!(s.get_tp_group().unwrap().unique_name(), original.unique_name());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _patch = s.patch_tensor_parallel_group(world.clone()).unwrap();
            panic!("draft model failed");
        }));
        assert!(r.is_err());
        assert_eq!(s.get_tensor_model_parallel_world_size().unwrap(), 2);
        // Not patched any more: patching works again.
        drop(s.patch_tensor_parallel_group(world).unwrap());
    });
}

#[test]
fn destroy_then_reinit() {
    run_ranks(4, |rank, store| {
        let s = world_state(store.clone(), 4, rank);
        s.initialize_model_parallel(2, 2, None).unwrap();
        let old_tp = s.get_tp_group().unwrap();
        s.destroy_model_parallel();
        assert!(!s.model_parallel_is_initialized());
        assert!(old_tp.is_destroyed());
        assert!(matches!(s.get_pp_group(), Err(Error::Destroyed(_))));
        s.destroy_distributed_environment();
        assert!(!s.is_initialized());
        // A fresh world (new namespace in the same store) with another layout.
        let fresh: SharedStore = Arc::new(PrefixStore::new("round2", store));
        s.init_world_with_store(fresh, 4, rank, rank, opts()).unwrap();
        s.initialize_model_parallel(4, 1, None).unwrap();
        let tp = s.get_tp_group().unwrap();
        assert_eq!(tp.unique_name(), "tp:1", "names keep counting, as the seed's");
        assert_eq!(tp.ranks(), &[0, 1, 2, 3]);
        let sum = tp.all_reduce(Tensor::from_vec(vec![1u8], [1]).unwrap()).unwrap();
        assert_eq!(sum.to_vec::<u8>().unwrap(), vec![4]);
        s.destroy_model_parallel();
        s.destroy_distributed_environment();
    });
}

#[test]
fn in_the_same_node_as_is_true_for_local_ranks() {
    let out = run_ranks(3, |rank, store| {
        let s = world_state(store, 3, rank);
        let w = s.get_world_group().unwrap();
        let a = w.in_the_same_node_as(1).unwrap();
        let b = ps::in_the_same_node_as(&w.cpu_group().unwrap(), 0).unwrap();
        assert!(w.in_the_same_node_as(3).is_err());
        (a, b)
    });
    for (a, b) in out {
        assert_eq!(a, vec![true; 3]);
        assert_eq!(b, vec![true; 3]);
    }
}

#[test]
fn process_wide_free_functions() {
    // The only test touching the process-wide state: a world of one.
    let store: SharedStore = Arc::new(HashStore::new());
    assert!(matches!(ps::get_world_group(), Err(Error::NotInitialized(_))));
    ps::init_distributed_environment_with_store(store.clone(), 1, 0, 0).unwrap();
    ps::initialize_model_parallel(1, 1, None).unwrap();
    assert!(ps::model_parallel_is_initialized());
    ps::ensure_model_parallel_initialized(1, 1, None).unwrap();
    assert_eq!(ps::get_tensor_model_parallel_world_size().unwrap(), 1);
    assert_eq!(ps::get_tensor_model_parallel_rank().unwrap(), 0);
    assert_eq!(ps::get_pp_group().unwrap().world_size(), 1);
    assert_eq!(
        ps::get_pipeline_model_parallel_group().unwrap().unique_name(),
        ps::get_pp_group().unwrap().unique_name()
    );
    assert_eq!(ps::get_dp_group().unwrap().world_size(), 1);
    let tp_name = ps::get_tp_group().unwrap().unique_name().to_string();
    {
        let _g = ps::patch_tensor_parallel_group(ps::get_world_group().unwrap()).unwrap();
        assert_eq!(
            ps::get_tensor_model_parallel_group().unwrap().unique_name(),
            ps::get_world_group().unwrap().unique_name()
        );
    }
    assert_eq!(ps::get_tp_group().unwrap().unique_name(), tp_name);
    // The seed's custom ops find the group by name.
    let mut t = Tensor::vec1(&[2.0f32, 3.0]);
    ps::inplace_all_reduce(&mut t, &tp_name).unwrap();
    assert_eq!(ps::outplace_all_reduce(&t, &tp_name).unwrap(), Tensor::vec1(&[2.0f32, 3.0]));
    ps::destroy_model_parallel();
    ps::destroy_distributed_environment();
    assert!(matches!(ps::get_tp_group(), Err(Error::Destroyed(_))));
    assert!(matches!(ps::get_world_group(), Err(Error::Destroyed(_))));
    assert!(matches!(ps::inplace_all_reduce(&mut Tensor::vec1(&[1i32]), &tp_name), Err(Error::Destroyed(_))));
    assert!(matches!(ps::outplace_all_reduce(&Tensor::vec1(&[1i32]), "nope:0"), Err(Error::NotFound(_))));
    drop(store);
    // A fresh init through the seed's entry point (a TCP store on a free port).
    assert!(matches!(
        ps::init_distributed_environment(1, 0, "tcp://127.0.0.1:0", -1, "nccl"),
        Err(Error::Unsupported(_))
    ));
    ps::init_distributed_environment(1, 0, "tcp://127.0.0.1:0", -1, "gloo").unwrap();
    ps::init_distributed_environment(1, 0, "tcp://127.0.0.1:0", -1, "gloo").unwrap();
    assert!(ps::init_distributed_environment(2, 0, "tcp://127.0.0.1:0", -1, "gloo").is_err());
    assert_eq!(ps::get_world_group().unwrap().local_rank(), 0);
    ps::initialize_model_parallel_with(ModelParallelConfig::new(1, 1), None).unwrap();
    assert!(ps::model_parallel_is_initialized());
    ps::destroy_model_parallel();
    ps::destroy_distributed_environment();
}

#[test]
fn independent_states_in_one_process() {
    let a = ParallelState::new();
    let b = ParallelState::new();
    a.init_world_with_store(Arc::new(HashStore::new()), 1, 0, 0, opts()).unwrap();
    assert!(a.is_initialized() && !b.is_initialized());
    assert_eq!(a.get_world_group().unwrap().unique_name(), "world:0");
    b.init_world_with_store(Arc::new(HashStore::new()), 1, 0, 0, opts()).unwrap();
    assert_eq!(b.get_world_group().unwrap().unique_name(), "world:0");
}

#[test]
fn seed_group_constructors() {
    run_ranks(4, |rank, store| {
        let world = rankweave::ProcessGroup::new_world(store, rank, 4, opts()).unwrap();
        let w = ps::init_world_group(&world, &[0, 1, 2, 3], rank, "gloo").unwrap();
        assert!(w.unique_name().starts_with("world:"));
        assert_eq!(w.ranks(), &[0, 1, 2, 3]);
        let g = ps::init_model_parallel_group(&world, &[vec![0, 3], vec![1, 2]], rank, "gloo", false, Some("pair"))
            .unwrap();
        assert!(g.unique_name().starts_with("pair:"));
        assert_eq!(g.ranks(), if rank == 0 || rank == 3 { &[0, 3] } else { &[1, 2] });
        let sum = g.all_reduce(Tensor::from_vec(vec![rank as i32], [1]).unwrap()).unwrap();
        assert_eq!(sum.to_vec::<i32>().unwrap(), vec![3]);
        assert!(ps::init_model_parallel_group(&world, &[vec![0, 1, 2, 3]], rank, "nccl", false, None).is_err());
        assert!(ps::custom_all_reduce_enabled());
    });
}

/// The TP group broadcasts objects and tensor-dict metadata through the
/// shared-memory message queue (the seed's `mq_broadcaster`), which only
/// takes src = 0, as the seed asserts.
#[test]
fn tp_group_broadcasts_objects_through_the_message_queue() {
    use rankweave::tensor::{Tensor, TensorDict};
    let out = run_parallel(3, 1, 1, |rank, s| {
        let tp = s.get_tp_group().expect("tp group");
        assert!(tp.uses_message_queue_broadcaster());
        let mut seen = Vec::new();
        for step in 0..50u64 {
            let obj = (rank == 0).then(|| (step, format!("step-{step}"), vec![step; 3]));
            seen.push(tp.broadcast_object(obj, 0).expect("broadcast_object"));
        }
        let mut dict = TensorDict::new();
        if rank == 0 {
            dict.insert("ids", Tensor::from_vec(vec![7i64, 8, 9], [3]).expect("tensor"));
        }
        let got = tp.broadcast_tensor_dict((rank == 0).then_some(&dict), 0).expect("broadcast_tensor_dict");
        let ids = got.get_tensor("ids").expect("ids").to_vec::<i64>().expect("i64");
        let refused = tp.broadcast_object(Some(1u8), 1).is_err();
        (seen, ids, refused)
    });
    for (seen, ids, refused) in out {
        assert_eq!(seen.len(), 50);
        for (step, (s, name, v)) in seen.into_iter().enumerate() {
            assert_eq!((s, name, v), (step as u64, format!("step-{step}"), vec![step as u64; 3]));
        }
        assert_eq!(ids, vec![7, 8, 9]);
        assert!(refused, "src != 0 must be refused by the message-queue broadcaster");
    }
}

/// The seed's graph_capture: the TP group starts a capture, the PP group
/// joins its context, and collectives inside run (eagerly on CPU).
#[test]
fn graph_capture_runs_collectives_inside_and_refuses_after_destroy() {
    use rankweave::tensor::Tensor;
    let out = run_parallel(2, 2, 1, |rank, s| {
        let sum = s
            .graph_capture(|ctx| {
                assert_eq!(ctx.stream, None, "no device streams on CPU");
                let t = Tensor::from_vec(vec![rank as f32; 2], [2])?;
                s.get_tp_group()?.all_reduce(t)?.to_vec::<f32>()
            })
            .expect("graph_capture");
        let tp = s.get_tp_group().expect("tp");
        tp.destroy();
        let refused = tp.graph_capture(None, |_| Ok(())).is_err();
        (rank, sum, refused)
    });
    for (rank, sum, refused) in out {
        let base = (rank / 2 * 2) as f32; // TP groups [0, 1] and [2, 3]
        assert_eq!(sum, vec![2.0 * base + 1.0; 2], "rank {rank}");
        assert!(refused);
    }
}

/// The Rust-shaped entry point: options from an explicit environment map,
/// explicit settings winning, and the backends this build refuses.
#[test]
fn init_from_options_and_an_env_map() {
    use rankweave::parallel_state::{Backend, InitOptions};
    use std::collections::HashMap;
    use std::time::Duration;
    let env: HashMap<String, String> = [
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "0"),
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "5"),
        ("RANKWEAVE_TIMEOUT", "30"),
        ("RANKWEAVE_TRANSPORT", "tcp"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let s = ParallelState::new();
    // With the `mpi` feature, `mpi` is a real backend (tested under mpirun).
    let refused: &[&str] = if cfg!(feature = "mpi") { &["nccl"] } else { &["nccl", "mpi"] };
    for &b in refused {
        let opts = InitOptions::new().backend(b.parse::<Backend>().unwrap()).with_env_map(&env).unwrap();
        assert!(matches!(s.init(&opts), Err(Error::Unsupported(_))), "{b}");
        assert!(!s.is_initialized());
    }
    let opts = InitOptions::new().local_rank(2).timeout(Duration::from_secs(20)).with_env_map(&env).unwrap();
    assert_eq!(opts.group_options().timeout, Duration::from_secs(20), "explicit timeout beats RANKWEAVE_TIMEOUT");
    s.init(&opts).unwrap();
    let w = s.get_world_group().unwrap();
    assert_eq!((w.world_size(), w.rank(), w.local_rank()), (1, 0, 2));
    assert_eq!(s.backend().as_deref(), Some("gloo"));
    // Initialized: a matching world size is a no-op, another one an error.
    s.init(&opts).unwrap();
    assert!(matches!(s.init(&opts.clone().world_size(3)), Err(Error::AlreadyInitialized(_))));
    s.initialize_model_parallel(1, 1, Some("cpu")).unwrap();
    assert!(matches!(s.initialize_model_parallel(1, 1, Some("tpu")), Err(Error::InvalidArgument(_))));
    s.destroy_model_parallel();
    s.destroy_distributed_environment();

    // Without LOCAL_RANK, env:// starts at local rank 0; tcp:// uses the rank.
    let mut no_local = env.clone();
    no_local.remove("LOCAL_RANK");
    let s = ParallelState::new();
    s.init(&InitOptions::new().with_env_map(&no_local).unwrap()).unwrap();
    assert_eq!(s.get_world_group().unwrap().local_rank(), 0);
    s.destroy_distributed_environment();
    let s = ParallelState::new();
    s.init(&InitOptions::new().init_method("tcp://127.0.0.1:0").world_size(1).rank(0)).unwrap();
    assert_eq!(s.get_world_group().unwrap().local_rank(), 0);
    s.destroy_distributed_environment();
    let e = "hccl".parse::<Backend>().unwrap_err().to_string();
    assert!(e.contains("gloo, cpu, mpi, nccl"), "{e}");
}
