//! The NCCL device group (feature `nccl`).
//!
//! Two kinds of tests live here:
//! - tests that need no device and run everywhere (this project's CI has no
//!   GPU): building an NCCL group without the CUDA driver is a clean error
//!   on every rank, at once; a CPU group refuses a caller's stream and a
//!   CUDA graph; a CPU group's batched sends and receives;
//! - `#[ignore]`d tests that need one CUDA GPU, the driver and NCCL. They
//!   are run by `scripts/gpu-check.sh` on a GPU machine with `--ignored`.
//!   NCCL refuses two ranks on one GPU, so multi-rank NCCL traffic is not
//!   covered; what one GPU allows is: world size 1 (every operation, every
//!   dtype, against the CPU group's answer; the caller's stream in both
//!   completion modes; an all_reduce captured into a CUDA graph and
//!   launched twice; a batched send to self), a peer that never joins (a
//!   timeout naming the group, not a hang), two ranks on one GPU (an
//!   error, not a hang) and CUDA IPC between two processes on one GPU.
#![cfg(feature = "nccl")]

use rankweave::coordinator::{CoordinatorOptions, DeviceGroup, GraphCaptureContext, GroupCoordinator, P2pOp};
use rankweave::device::{self, Completion, CudaDevice, IpcBuffer, IpcHandle, IpcMapping, NcclComm, P2p};
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

#[test]
fn a_cpu_group_has_no_streams_and_no_graphs_but_batches_its_sends() {
    let solo = DeviceGroup::Cpu(worlds(1, Duration::from_secs(60)).pop().unwrap());
    assert_eq!(solo.capture_stream(), None);
    // The refusal of a CPU context's capture needs no driver.
    match GraphCaptureContext::default().capture(|| Ok(())) {
        Ok(_) => panic!("a CPU context captured a graph"),
        Err(e) => assert!(e.to_string().contains("no CUDA stream"), "{e}"),
    }
    let pgs = worlds(3, Duration::from_secs(60));
    // Three ranks, each sending to every rank (itself included) and
    // receiving from every rank, in one batch each, in an order that would
    // deadlock as plain blocking calls.
    let hs: Vec<_> = pgs
        .into_iter()
        .map(|pg| {
            std::thread::spawn(move || {
                let me = pg.rank();
                let g = DeviceGroup::Cpu(pg);
                let out: Vec<Tensor> = (0..3).map(|r| Tensor::vec1(&[(10 * me + r) as i32; 5])).collect();
                let mut got: Vec<Tensor> = (0..3).map(|_| Tensor::zeros([5], DType::I32).unwrap()).collect();
                let mut ops: Vec<P2pOp<'_>> = out.iter().enumerate().map(|(r, t)| P2pOp::Send(t, r)).collect();
                ops.extend(got.iter_mut().enumerate().rev().map(|(r, t)| P2pOp::Recv(t, r)));
                g.batch_isend_irecv(&mut ops).unwrap();
                drop(ops);
                for (r, t) in got.iter().enumerate() {
                    assert_eq!(t.to_vec::<i32>().unwrap(), vec![(10 * r + me) as i32; 5], "rank {me} from {r}");
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
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

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh"]
fn gpu_copies_through_device_addresses() {
    require_gpu();
    let dev = CudaDevice::get(0).unwrap();
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let a = dev.upload(&bytes).unwrap();
    let t = Duration::from_secs(30);
    // In: a copy of another allocation's bytes, whole and from an offset.
    // SAFETY: `a` holds `bytes.len()` finished bytes on device 0 (upload
    // waits) and outlives the copies.
    let b = unsafe { dev.copy_from_device_ptr(a.device_ptr(), bytes.len(), t) }.unwrap();
    let mut got = vec![0u8; bytes.len()];
    b.download(&mut got).unwrap();
    assert!(got == bytes);
    let c = unsafe { dev.copy_from_device_ptr(a.device_ptr() + 16, bytes.len() - 16, t) }.unwrap();
    let mut got = vec![0u8; bytes.len() - 16];
    c.download(&mut got).unwrap();
    assert!(got[..] == bytes[16..]);
    // Out: into another allocation, then as a tensor.
    let d = dev.zeros(bytes.len()).unwrap();
    // SAFETY: `d` holds `bytes.len()` bytes on device 0 that nothing else
    // uses during the copy.
    unsafe { a.copy_to_device_ptr(d.device_ptr(), t) }.unwrap();
    let mut got = vec![0u8; bytes.len()];
    d.download(&mut got).unwrap();
    assert!(got == bytes);
    let tensor = Tensor::from_cuda(b, [bytes.len()], DType::U8).unwrap();
    assert_eq!(host(&tensor).as_bytes().unwrap(), &bytes[..]);
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
    let (stream, routed) = coord.graph_capture(None, |c| Ok((c.stream, nccl.capture_stream()))).unwrap();
    assert!(stream.is_some());
    assert_eq!(stream, routed, "inside the capture the group's operations go to its stream");
    assert_ne!(nccl.capture_stream(), stream, "a fresh stream, routed only during the capture");
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

fn f32_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect()
}

fn download(b: &device::CudaBuffer) -> Vec<u8> {
    let mut out = vec![0u8; b.len()];
    b.download(&mut out).unwrap();
    out
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL: scripts/gpu-check.sh"]
fn gpu_callers_stream_in_both_completion_modes() {
    require_gpu();
    let pg = worlds(1, Duration::from_secs(60)).pop().unwrap();
    let comm = NcclComm::new(&pg, "stream", 0).unwrap();
    let dev = comm.device().clone();
    let s = dev.new_stream().unwrap();
    let bytes = f32_bytes(&values(4096));
    let mut buf = dev.upload(&bytes).unwrap();
    // Wait: done when the call returns.
    let on = comm.with_stream(&s, Completion::Wait).unwrap();
    assert_eq!(on.completion(), Completion::Wait);
    on.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap();
    assert_eq!(download(&buf), bytes);
    // Enqueue-only: several operations back to back, then a download on
    // the device's stream right away (cudarc's events order it after the
    // NCCL writes on the caller's stream), then synchronize.
    let on = comm.with_stream(&s, Completion::Enqueue).unwrap();
    let mut out = dev.zeros(bytes.len()).unwrap();
    on.all_gather(&buf, &mut out).unwrap();
    on.all_reduce(&mut out, DType::F32, ReduceOp::Max).unwrap();
    on.broadcast(&mut out, 0).unwrap();
    assert_eq!(download(&out), bytes);
    on.synchronize().unwrap();
    let mut rs = dev.zeros(bytes.len()).unwrap();
    on.reduce_scatter(&out, &mut rs, DType::F32, ReduceOp::Min).unwrap();
    on.synchronize().unwrap();
    assert_eq!(download(&rs), bytes);
    // Through the coordinator's device group, on tensors.
    let coord = GroupCoordinator::new(&pg, &[vec![0]], 0, cuda_opts()).unwrap();
    let dg = coord.device_group().unwrap();
    let t = Tensor::from_f64(&values(300), [3, 100], DType::BF16).unwrap();
    let mut g = t.clone().to_device(GPU).unwrap();
    let cs = dg.as_nccl().unwrap().device().new_stream().unwrap();
    let ops = dg.with_stream(&cs, Completion::Enqueue).unwrap();
    ops.all_reduce(&mut g, ReduceOp::Sum).unwrap();
    let mut gathered = Tensor::zeros_on([1, 3, 100], DType::BF16, GPU).unwrap();
    ops.all_gather(&g, &mut gathered).unwrap();
    ops.synchronize().unwrap();
    assert_eq!(host(&g), t);
    assert_eq!(host(&gathered), t.reshape(&[1, 3, 100]).unwrap());
    assert!(comm.aborted().is_none());
    coord.destroy();
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL: scripts/gpu-check.sh"]
fn gpu_graph_capture_of_an_all_reduce_launched_twice() {
    require_gpu();
    let pg = worlds(1, Duration::from_secs(60)).pop().unwrap();
    let coord = GroupCoordinator::new(&pg, &[vec![0]], 0, cuda_opts()).unwrap();
    let dg = coord.device_group().unwrap();
    let cpu = DeviceGroup::Cpu(pg.new_group(&[0], "cpu_ref").unwrap().unwrap());
    let n = 1000;
    let first = Tensor::from_f64(&values(n), [n], DType::F32).unwrap();
    let mut x = first.clone().to_device(GPU).unwrap();
    let mut y = first.clone().to_device(GPU).unwrap();
    let mut out = Tensor::zeros_on([1, n], DType::F32, GPU).unwrap();
    let (graph, stream) = coord
        .graph_capture(None, |ctx| {
            let s = ctx.cuda_stream().expect("an NCCL group's capture has a CUDA stream").clone();
            assert_eq!(dg.capture_stream(), ctx.stream, "the group's operations go to the capture stream");
            let ((), graph) = ctx.capture(|| {
                dg.all_gather(&x, &mut out)?;
                dg.all_reduce(&mut y, ReduceOp::Sum)
            })?;
            Ok((graph, s))
        })
        .unwrap();
    assert_ne!(dg.capture_stream(), Some(stream.cu_stream() as u64), "the route ends with graph_capture");
    // Captured, not run: the output is still zeros.
    assert_eq!(host(&out), Tensor::zeros([1, n], DType::F32).unwrap());
    let cpu_result = |v: &Tensor| {
        let mut want_out = Tensor::zeros([1, n], DType::F32).unwrap();
        cpu.all_gather(v, &mut want_out).unwrap();
        let mut want_y = v.clone();
        cpu.all_reduce(&mut want_y, ReduceOp::Sum).unwrap();
        (want_out, want_y)
    };
    let timeout = Duration::from_secs(60);
    for round in 0..2 {
        let v = if round == 0 {
            first.clone()
        } else {
            let second =
                Tensor::from_f64(&values(n).iter().map(|a| 3.0 * a + 1.0).collect::<Vec<_>>(), [n], DType::F32)
                    .unwrap();
            // New inputs in place (the graph holds the addresses).
            x.cuda_buffer_mut().unwrap().unwrap().copy_from_host(second.as_bytes().unwrap(), timeout).unwrap();
            y.cuda_buffer_mut().unwrap().unwrap().copy_from_host(second.as_bytes().unwrap(), timeout).unwrap();
            let zeros = vec![0u8; out.nbytes()];
            out.cuda_buffer_mut().unwrap().unwrap().copy_from_host(&zeros, timeout).unwrap();
            second
        };
        graph.launch().unwrap();
        device::wait_for_stream(&stream, "graph launch", timeout).unwrap();
        let (want_out, want_y) = cpu_result(&v);
        assert_eq!(host(&out), want_out, "launch {round}");
        assert_eq!(host(&y), want_y, "launch {round}");
    }
    // Outside a capture the same group waits as usual.
    let mut z = first.clone().to_device(GPU).unwrap();
    dg.all_reduce(&mut z, ReduceOp::Max).unwrap();
    assert_eq!(host(&z), first);
    coord.destroy();
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL: scripts/gpu-check.sh"]
fn gpu_send_to_self_at_world_one_in_a_batch() {
    require_gpu();
    let pg = worlds(1, Duration::from_secs(60)).pop().unwrap();
    let coord = GroupCoordinator::new(&pg, &[vec![0]], 0, cuda_opts()).unwrap();
    let dg = coord.device_group().unwrap();
    for dt in DType::ALL {
        let a = Tensor::from_f64(&values(777), [777], dt).unwrap();
        let b = Tensor::from_f64(&values(5), [5], dt).unwrap();
        let (ga, gb) = (a.clone().to_device(GPU).unwrap(), b.clone().to_device(GPU).unwrap());
        let mut ra = Tensor::zeros_on([777], dt, GPU).unwrap();
        let mut rb = Tensor::zeros_on([5], dt, GPU).unwrap();
        dg.batch_isend_irecv(&mut [
            P2pOp::Recv(&mut ra, 0),
            P2pOp::Send(&ga, 0),
            P2pOp::Send(&gb, 0),
            P2pOp::Recv(&mut rb, 0),
        ])
        .unwrap();
        assert_eq!(host(&ra), a, "{dt}");
        assert_eq!(host(&rb), b, "{dt}");
    }
    // On a caller's stream, enqueue-only, through the communicator.
    let comm = dg.as_nccl().unwrap();
    let s = comm.device().new_stream().unwrap();
    let bytes = f32_bytes(&values(64));
    let src = comm.device().upload(&bytes).unwrap();
    let mut dst = comm.device().zeros(bytes.len()).unwrap();
    let on = comm.with_stream(&s, Completion::Enqueue).unwrap();
    on.batch_p2p(&mut [P2p::Send(&src, 0), P2p::Recv(&mut dst, 0)]).unwrap();
    on.synchronize().unwrap();
    assert_eq!(download(&dst), bytes);
    // A lone send to self would hang in NCCL: refused before it.
    let t = Tensor::from_f64(&values(4), [4], DType::F32).unwrap().to_device(GPU).unwrap();
    let e = dg.send(&t, 0).unwrap_err().to_string();
    assert!(e.contains("needs its receive"), "{e}");
    assert!(comm.aborted().is_none());
    coord.destroy();
}

const IPC_CHILD: &str = "RANKWEAVE_IPC_TEST_CHILD";

/// One of the two processes of the IPC test: rank 0 exports a buffer,
/// rank 1 maps it, checks it and writes it back doubled.
fn ipc_worker(rank: usize, port: &str) -> rankweave::Result<()> {
    use rankweave::parallel_state::{InitOptions, ParallelState};
    let s = ParallelState::new();
    s.init(&InitOptions::new().init_method(format!("tcp://127.0.0.1:{port}")).world_size(2).rank(rank))?;
    let world = s.get_world_group()?;
    let vals = values(1 << 16);
    let doubled: Vec<f64> = vals.iter().map(|v| 2.0 * v).collect();
    if rank == 0 {
        let dev = CudaDevice::get(0)?;
        let mut buf: IpcBuffer = dev.alloc_ipc(vals.len() * 4)?;
        buf.upload(&f32_bytes(&vals))?;
        let h = buf.handle()?;
        world.broadcast_object(Some(h.to_bytes()), 0)?;
        world.barrier()?; // rank 1 wrote
        let mut back = vec![0u8; buf.len()];
        buf.download(&mut back)?;
        assert_eq!(back, f32_bytes(&doubled), "rank 1's write through the mapping");
        world.barrier()?; // rank 1 closed its mapping; the buffer may go
    } else {
        let bytes: Vec<u8> = world.broadcast_object(None, 0)?;
        let h = IpcHandle::from_bytes(&bytes)?;
        let mut m = IpcMapping::open(&h)?;
        let mut got = vec![0u8; m.len()];
        m.download(&mut got)?;
        assert_eq!(got, f32_bytes(&vals), "rank 0's values through the mapping");
        m.upload(&f32_bytes(&doubled))?;
        world.barrier()?;
        drop(m);
        world.barrier()?;
    }
    s.destroy_distributed_environment();
    Ok(())
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh"]
fn gpu_cuda_ipc_between_two_processes_on_one_gpu() {
    if let Ok(rank) = std::env::var(IPC_CHILD) {
        let port = std::env::var("RANKWEAVE_IPC_TEST_PORT").expect("port");
        ipc_worker(rank.parse().expect("rank"), &port).unwrap();
        return;
    }
    if let Err(e) = device::probe::cuda_driver() {
        panic!("this test needs a CUDA GPU: {e}");
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            std::process::Command::new(&exe)
                .args(["gpu_cuda_ipc_between_two_processes_on_one_gpu", "--exact", "--include-ignored", "--nocapture"])
                .env(IPC_CHILD, rank.to_string())
                .env("RANKWEAVE_IPC_TEST_PORT", &port)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut outs = Vec::new();
    for mut c in children {
        while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
        outs.push(c.wait_with_output().unwrap());
    }
    for (rank, o) in outs.iter().enumerate() {
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success() && text.contains("1 passed"), "IPC rank {rank}: {}\n{text}", o.status);
    }
}
