//! The NCCL device group (feature `nccl`).
//!
//! Two kinds of tests live here:
//! - tests that need no device and run everywhere (this project's CI has no
//!   GPU): building an NCCL group without the CUDA driver is a clean error
//!   on every rank, at once;
//! - `#[ignore]`d tests that need one CUDA GPU, the driver and NCCL. They
//!   are run by `scripts/gpu-check.sh` on a GPU machine with `--ignored`.
//!   NCCL refuses two ranks on one GPU, so multi-rank NCCL traffic is not
//!   covered; what one GPU allows is: world size 1 (every operation, every
//!   dtype, against the CPU group's answer), a peer that never joins (a
//!   timeout naming the group, not a hang) and two ranks on one GPU (an
//!   error, not a hang).
#![cfg(feature = "nccl")]

use rankweave::coordinator::{CoordinatorOptions, DeviceGroup, GroupCoordinator};
use rankweave::device::{self, NcclComm};
use rankweave::tensor::{Device, Tensor, TensorDict};
use rankweave::{DType, Error, GroupOptions, HashStore, ProcessGroup, ReduceOp};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GPU: Device = Device::Cuda(0);

/// `n` ranks of one world over an in-process store, one thread each.
fn worlds(n: usize, timeout: Duration) -> Vec<ProcessGroup> {
    let store: rankweave::store::SharedStore = Arc::new(HashStore::new());
    let hs: Vec<_> = (0..n)
        .map(|r| {
            let store = store.clone();
            let opts = GroupOptions { timeout, ..GroupOptions::default() };
            std::thread::spawn(move || ProcessGroup::new_world(store, r, n, opts))
        })
        .collect();
    hs.into_iter().map(|h| h.join().expect("rank thread").expect("world")).collect()
}

fn cuda_opts() -> CoordinatorOptions {
    CoordinatorOptions { group_name: Some("gpu".into()), device: GPU, ..CoordinatorOptions::default() }
}

#[test]
fn without_a_driver_every_rank_fails_cleanly_and_at_once() {
    if device::probe::cuda_driver().is_ok() {
        return; // a GPU machine: the ignored tests below cover this path
    }
    let start = Instant::now();
    let hs: Vec<_> = worlds(2, Duration::from_secs(60))
        .into_iter()
        .map(|pg| std::thread::spawn(move || GroupCoordinator::new(&pg, &[vec![0, 1]], 0, cuda_opts())))
        .collect();
    for h in hs {
        let e = h.join().unwrap().unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
        assert!(e.to_string().contains("no CUDA driver found"), "{e}");
    }
    // The probe fails before any rank waits on another: no timeout ran.
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    let e = Tensor::zeros_on([4], DType::F32, GPU).unwrap_err().to_string();
    assert!(e.contains("no CUDA driver found"), "{e}");
    let e = Tensor::vec1(&[1.0f32]).to_device(GPU).unwrap_err().to_string();
    assert!(e.contains("no CUDA driver found"), "{e}");
}

#[test]
fn device_metadata_from_a_peer_decodes_and_is_placed_on_this_groups_device() {
    // A dict holding a device tensor splits into metadata (device type,
    // dtype, shape) and the tensor; the metadata names `cuda`.
    let mut d = TensorDict::new();
    d.insert("x", Tensor::vec1(&[1i32, 2, 3]));
    let (meta, tensors) = rankweave::tensor::codec::encode_dict_metadata(&d).unwrap();
    assert_eq!(tensors.len(), 1);
    let decoded = rankweave::tensor::codec::decode_metadata(&meta, &Default::default()).unwrap();
    assert_eq!(decoded.len(), 1);
    let m = rankweave::tensor::TensorMetadata { device: Device::Cuda(5), dtype: DType::BF16, shape: vec![2, 2] };
    assert_eq!(m.device.type_name(), "cuda");
    // Metadata of a device tensor and a value, as a peer on a GPU sends it.
    use rankweave::tensor::{MetadataEntry, Value};
    let entries = vec![
        ("h".to_string(), MetadataEntry::Tensor(m.clone())),
        ("n".to_string(), MetadataEntry::Value(Value::Int(3))),
    ];
    let bytes = rankweave::tensor::codec::encode_metadata(&entries).unwrap();
    assert_eq!(rankweave::tensor::codec::decode_metadata(&bytes, &Default::default()).unwrap(), entries);
    if device::probe::cuda_driver().is_err() {
        let e = m.zeros().unwrap_err().to_string();
        assert!(e.contains("no CUDA driver found"), "{e}");
    }
}

// ----- on a GPU ------------------------------------------------------------

fn values(n: usize) -> Vec<f64> {
    (0..n).map(|i| ((i * 37) % 23) as f64 - 7.0).collect()
}

/// The ignored tests are for a GPU machine: without the driver they fail
/// here, loudly, rather than pass for the wrong reason.
fn require_gpu() {
    if let Err(e) = device::probe::cuda_driver().and_then(|_| device::probe::nccl_library()) {
        panic!("this test needs a CUDA GPU and NCCL: {e}");
    }
}

fn host(t: &Tensor) -> Tensor {
    t.clone().to_device(Device::Cpu).expect("download")
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL: scripts/gpu-check.sh"]
fn gpu_upload_download_and_copy_on_write() {
    require_gpu();
    for dt in DType::ALL {
        let t = Tensor::from_f64(&values(1000), [10, 100], dt).unwrap();
        let g = t.clone().to_device(GPU).unwrap();
        assert_eq!(g.device(), GPU);
        assert!(g.as_bytes().is_err(), "device bytes are not host bytes");
        assert_eq!(host(&g), t, "{dt}");
        // A clone shares the device buffer; a write through one copies first.
        let mut c = g.clone();
        let before = c.cuda_buffer().unwrap() as *const _;
        let _ = c.cuda_buffer_mut().unwrap().unwrap();
        assert_ne!(before, c.cuda_buffer().unwrap() as *const _);
        assert_eq!(host(&c), t);
        // Copying ops go through host memory and come back to the device.
        let n = g.narrow(1, 10, 5).unwrap();
        assert_eq!(n.device(), GPU);
        assert_eq!(host(&n), t.narrow(1, 10, 5).unwrap());
        let p = g.permute(&[1, 0]).unwrap();
        assert_eq!(host(&p), t.permute(&[1, 0]).unwrap());
        let k = Tensor::cat(&[&g, &g], 1).unwrap();
        assert_eq!(host(&k), Tensor::cat(&[&t, &t], 1).unwrap());
    }
    let z = Tensor::zeros_on([0], DType::F32, GPU).unwrap();
    assert_eq!(host(&z).numel(), 0);
    let e = Tensor::zeros_on([4], DType::F32, Device::Cuda(1 << 20)).unwrap_err().to_string();
    assert!(e.contains("does not exist"), "{e}");
}

/// Runs `op` on the NCCL device group and on a CPU group of one rank with
/// the same inputs, and checks the outputs are bit-identical.
fn same_as_cpu(nccl: &DeviceGroup, cpu: &DeviceGroup, what: &str, op: impl Fn(&DeviceGroup, Device) -> Vec<Tensor>) {
    let want = op(cpu, Device::Cpu);
    let got: Vec<Tensor> = op(nccl, GPU).iter().map(host).collect();
    assert_eq!(got, want, "{what}");
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL: scripts/gpu-check.sh"]
fn gpu_world_of_one_every_op_every_dtype_matches_the_cpu_group() {
    require_gpu();
    let pg = worlds(1, Duration::from_secs(60)).pop().unwrap();
    let coord = GroupCoordinator::new(&pg, &[vec![0]], 0, cuda_opts()).expect("NCCL group of one");
    assert_eq!(coord.device(), GPU);
    let nccl = coord.device_group().unwrap();
    assert!(nccl.as_nccl().is_some());
    let cpu = DeviceGroup::Cpu(pg.new_group(&[0], "cpu_ref").unwrap().unwrap());
    for n in [1usize, 7, 1000, 1 << 20] {
        for dt in DType::ALL {
            let input = Tensor::from_f64(&values(n), [n], dt).unwrap();
            let on = |d: Device| input.clone().to_device(d).unwrap();
            for op in ReduceOp::ALL {
                same_as_cpu(&nccl, &cpu, &format!("all_reduce {op:?} {dt} x{n}"), |g, d| {
                    let mut t = on(d);
                    g.all_reduce(&mut t, op).unwrap();
                    vec![t]
                });
                same_as_cpu(&nccl, &cpu, &format!("reduce {op:?} {dt} x{n}"), |g, d| {
                    let mut t = on(d);
                    g.reduce(&mut t, op, 0).unwrap();
                    vec![t]
                });
                same_as_cpu(&nccl, &cpu, &format!("reduce_scatter {op:?} {dt} x{n}"), |g, d| {
                    let mut out = Tensor::zeros_on([n], dt, d).unwrap();
                    g.reduce_scatter(&on(d), &mut out, op).unwrap();
                    vec![out]
                });
            }
            same_as_cpu(&nccl, &cpu, &format!("all_gather {dt} x{n}"), |g, d| {
                let mut out = Tensor::zeros_on([1, n], dt, d).unwrap();
                g.all_gather(&on(d), &mut out).unwrap();
                vec![out]
            });
            same_as_cpu(&nccl, &cpu, &format!("gather {dt} x{n}"), |g, d| {
                let mut out = Tensor::zeros_on([1, n], dt, d).unwrap();
                g.gather(&on(d), Some(&mut out), 0).unwrap();
                vec![out]
            });
            same_as_cpu(&nccl, &cpu, &format!("broadcast {dt} x{n}"), |g, d| {
                let mut t = on(d);
                g.broadcast(&mut t, 0).unwrap();
                vec![t]
            });
            same_as_cpu(&nccl, &cpu, &format!("all_to_all {dt} x{n}"), |g, d| {
                let mut out = Tensor::zeros_on([n], dt, d).unwrap();
                g.all_to_all(&on(d), &mut out).unwrap();
                vec![out]
            });
        }
    }
    // The coordinator on the device: a group of one keeps its input (as
    // the seed does), reduce_scatter along an inner dim copies on the
    // device, and the graph capture context carries the group's stream.
    let t = Tensor::from_f64(&values(24), [2, 3, 4], DType::F32).unwrap();
    let g = t.clone().to_device(GPU).unwrap();
    assert_eq!(host(&coord.all_reduce(g.clone()).unwrap()), t);
    assert_eq!(host(&coord.all_gather(&g, 1).unwrap()), t);
    assert_eq!(host(&coord.reduce_scatter(&g, 2).unwrap()), t);
    let stream = coord.graph_capture(None, |c| Ok(c.stream)).unwrap();
    assert_eq!(stream, nccl.capture_stream());
    assert!(stream.is_some());
    // A host tensor in an NCCL group is refused, not misread.
    let mut h = t.clone();
    assert!(nccl.all_reduce(&mut h, ReduceOp::Sum).is_err());
    // A tensor dict with a device tensor and a host tensor.
    let mut d = TensorDict::new();
    d.insert("gpu", g.clone());
    d.insert("cpu", t.clone());
    let out = coord.broadcast_tensor_dict(Some(&d), 0).unwrap();
    assert_eq!(out.get_tensor("gpu").map(host), Some(t.clone()));
    assert_eq!(out.get_tensor("cpu").map(|x| x.device()), Some(Device::Cpu));
    coord.destroy();
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL: scripts/gpu-check.sh"]
fn gpu_a_peer_that_never_joins_is_a_timeout_naming_the_group() {
    require_gpu();
    let timeout = Duration::from_secs(5);
    let mut pgs = worlds(2, timeout);
    let pg1 = pgs.pop().unwrap();
    let pg0 = pgs.pop().unwrap();
    // Rank 1 takes part in the unique-id exchange, then never initializes.
    let absent = std::thread::spawn(move || device::exchange_unique_id(&pg1, device::new_unique_id).map(|_| pg1));
    let start = Instant::now();
    let e = NcclComm::new(&pg0, "lonely", 0).unwrap_err();
    let waited = start.elapsed();
    let _pg1 = absent.join().unwrap().unwrap();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    let s = e.to_string();
    assert!(s.contains("nccl init") && s.contains("lonely"), "{s}");
    assert!(waited < timeout * 4, "waited {waited:?}");
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL: scripts/gpu-check.sh"]
fn gpu_two_ranks_on_one_gpu_fail_instead_of_hanging() {
    require_gpu();
    let timeout = Duration::from_secs(20);
    let start = Instant::now();
    let hs: Vec<_> = worlds(2, timeout)
        .into_iter()
        .map(|pg| std::thread::spawn(move || NcclComm::new(&pg, "dup", 0).map(|_| ())))
        .collect();
    let results: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    eprintln!("two ranks on one GPU: {results:?} after {:?}", start.elapsed());
    assert!(results.iter().any(|r| r.is_err()), "NCCL accepted two ranks on one GPU: {results:?}");
    assert!(start.elapsed() < timeout * 4, "took {:?}", start.elapsed());
}

#[test]
fn an_nccl_world_without_a_driver_is_refused_cleanly_through_init() {
    if device::probe::cuda_driver().is_ok() {
        return; // a GPU machine: gpu_parallel_state_on_nccl covers init
    }
    use rankweave::parallel_state::{Backend, InitOptions, ParallelState};
    let s = ParallelState::new();
    let opts = InitOptions::new().init_method("tcp://127.0.0.1:0").world_size(1).rank(0).backend(Backend::Nccl);
    let e = s.init(&opts).unwrap_err();
    assert!(e.to_string().contains("no CUDA driver found"), "{e}");
    assert!(s.get_world_group().is_err(), "a failed init leaves no world");
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL: scripts/gpu-check.sh"]
fn gpu_parallel_state_on_nccl() {
    require_gpu();
    use rankweave::parallel_state::{Backend, InitOptions, ParallelState};
    let s = ParallelState::new();
    let opts = InitOptions::new().init_method("tcp://127.0.0.1:0").world_size(1).rank(0).backend(Backend::Nccl);
    s.init(&opts).unwrap();
    assert_eq!(s.backend().as_deref(), Some("nccl"));
    s.initialize_model_parallel(1, 1, None).unwrap();
    for g in
        [s.get_world_group().unwrap(), s.get_tp_group().unwrap(), s.get_pp_group().unwrap(), s.get_dp_group().unwrap()]
    {
        assert_eq!(g.device(), GPU, "{}", g.unique_name());
        assert!(g.device_group().unwrap().as_nccl().is_some(), "{}", g.unique_name());
        assert!(g.cpu_group().is_ok());
        g.barrier().unwrap();
    }
    let tp = s.get_tp_group().unwrap();
    let t = Tensor::from_f64(&values(64), [8, 8], DType::BF16).unwrap();
    let mut g = t.clone().to_device(GPU).unwrap();
    tp.device_group().unwrap().all_reduce(&mut g, ReduceOp::Max).unwrap();
    assert_eq!(host(&g), t);
    s.destroy_model_parallel();
    s.destroy_distributed_environment();
}
