//! The backend conformance suite on the MPI backend, one process per rank
//! under `mpirun` (CI runs it at 2, 3, 4 and 8 ranks):
//!
//! ```text
//! cargo build -p rankweave --features mpi --example mpi_conformance
//! mpirun --allow-run-as-root --oversubscribe -n 4 target/debug/examples/mpi_conformance
//! ```
//!
//! Every rank runs `tests/conformance`'s [`suite`] (every collective, dtype,
//! reduce op and size class, point-to-point, argument checks, bitwise
//! identity) and the large counts on the world, the suite on a subgroup,
//! then the coordinator on top (objects, tensor dicts, `in_the_same_node_as`),
//! the TP x PP layout (`tp 2 x pp n/2`, with tensor dicts sent over PP with
//! the TP group as `all_gather_group`) and the error paths MPI can return
//! (a receive timing out names its peer; a receive of the wrong length is a
//! mismatch). Prints `PASS` per rank; any failure aborts the job.
//!
//! With `--watchdog`, rank 0 enters a barrier (300 ms timeout) that the
//! other ranks never enter: the watchdog must abort the job, naming the
//! operation, group and rank (CI checks the message and the failed exit).
//!
//! With `--mismatch`, mismatched calls: collectives in check mode
//! ([`rankweave::backend::mpi::CHECK_ENV`]) with different counts,
//! dtypes, reduce ops, collectives and roots, where every rank must fail
//! with `Error::Mismatch` within seconds, naming the group and every
//! rank's call, and the communicator must keep working afterwards; and
//! point-to-point messages (no check mode needed) of another length or
//! dtype than the receive, a large one included, where the receiver must
//! fail the same way, its buffer untouched, and the sender must not hang. CI also runs the whole
//! suite with `RANKWEAVE_MPI_CHECK=1`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/conformance/mod.rs"]
mod conformance;

use conformance::{large, suite, Level, FULL};
use rankweave::backend::mpi::{MpiFactory, Runtime};
use rankweave::backend::Call;
use rankweave::group::{BackendFactory, GroupInfo};
use rankweave::parallel_state::{Backend, InitOptions, ParallelState};
use rankweave::tensor::{Tensor, TensorDict, Value};
use rankweave::transport::{OpCode, OpDesc};
use rankweave::{DType, Error, GroupOptions, HashStore, ProcessGroup, ReduceOp};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(120);

fn dict(tag: i64) -> TensorDict {
    TensorDict::new()
        .with("input_ids", Tensor::from_vec(vec![1i64, 2, 3, 4, 5, 6], [2, 3]).unwrap())
        .with("hidden", Tensor::from_f64(&[0.5, -1.0, 2.0, 3.25], [2, 2], DType::BF16).unwrap())
        .with("scale", Tensor::from_f64(&[1.5, 2.5, 3.5, 4.5], [4], DType::F16).unwrap())
        .with("empty", Tensor::zeros([0, 4], DType::F32).unwrap())
        .with("odd", Tensor::from_vec(vec![1.0f32, 2.0, 3.0], [3]).unwrap())
        .with("step", tag)
        .with("name", "batch")
        .with("nested", Value::List(vec![3i64.into(), "x".into()]))
}

/// A world over MPI with a short timeout, for the error cases.
fn short_world(rank: usize, n: usize) -> ProcessGroup {
    let factory = Arc::new(MpiFactory::new(Runtime::get().unwrap()));
    let opts = GroupOptions { timeout: Duration::from_millis(300), ..GroupOptions::default() };
    ProcessGroup::new_world_with(factory, Arc::new(HashStore::new()), rank, n, opts).unwrap()
}

/// A world over MPI with the collectives' check mode set to `check`.
fn checked_world(rank: usize, n: usize, check: bool) -> ProcessGroup {
    let factory = Arc::new(MpiFactory::new(Runtime::get().unwrap()).check(check));
    let opts = GroupOptions { timeout: Duration::from_secs(20), ..GroupOptions::default() };
    ProcessGroup::new_world_with(factory, Arc::new(HashStore::new()), rank, n, opts).unwrap()
}

/// One rank's side of a mismatched collective.
#[derive(Clone, Copy, Debug)]
enum Coll {
    AllReduce(DType, ReduceOp, usize),
    Broadcast(usize, usize),
    Reduce(DType, ReduceOp, usize, usize),
    AllGather(usize),
    Barrier,
}

impl Coll {
    fn desc(self) -> OpDesc {
        match self {
            Coll::AllReduce(d, o, c) => OpDesc::new(OpCode::AllReduce, Some(d), Some(o), None, c * d.size()),
            Coll::Broadcast(len, root) => OpDesc::new(OpCode::Broadcast, None, None, Some(root), len),
            Coll::Reduce(d, o, c, root) => OpDesc::new(OpCode::Reduce, Some(d), Some(o), Some(root), c * d.size()),
            Coll::AllGather(len) => OpDesc::new(OpCode::AllGather, None, None, None, len),
            Coll::Barrier => OpDesc::new(OpCode::Barrier, None, None, None, 0),
        }
    }

    fn run(self, pg: &ProcessGroup) -> rankweave::Result<()> {
        match self {
            Coll::AllReduce(d, o, c) => pg.all_reduce_bytes(&mut vec![0u8; c * d.size()], d, o),
            Coll::Broadcast(len, root) => pg.broadcast_bytes(&mut vec![1u8; len], root),
            Coll::Reduce(d, o, c, root) => pg.reduce_bytes(&mut vec![0u8; c * d.size()], d, o, root),
            Coll::AllGather(len) => pg.all_gather_bytes(&vec![2u8; len], &mut vec![0u8; len * pg.size()]),
            Coll::Barrier => pg.barrier(),
        }
    }
}

/// Mismatched calls must fail on every rank within seconds, as
/// `Error::Mismatch`, and leave MPI usable.
fn mismatch_mode() {
    let rt = Runtime::get().unwrap();
    let (r, n) = (rt.rank(), rt.size());
    assert!(n >= 2, "--mismatch needs at least 2 ranks");
    let ctl = checked_world(r, n, false);
    let odd = n - 1;
    let f32s = DType::F32;
    let cases: [(&str, Coll, Coll); 8] = [
        ("counts", Coll::AllReduce(f32s, ReduceOp::Sum, 1000), Coll::AllReduce(f32s, ReduceOp::Sum, 999)),
        ("dtypes", Coll::AllReduce(f32s, ReduceOp::Sum, 64), Coll::AllReduce(DType::I32, ReduceOp::Sum, 64)),
        ("ops", Coll::AllReduce(DType::BF16, ReduceOp::Sum, 64), Coll::AllReduce(DType::BF16, ReduceOp::Max, 64)),
        ("collectives", Coll::AllReduce(f32s, ReduceOp::Sum, 16), Coll::Broadcast(64, 0)),
        ("roots", Coll::Broadcast(1 << 20, 0), Coll::Broadcast(1 << 20, 1)),
        ("reduce roots", Coll::Reduce(DType::I64, ReduceOp::Sum, 8, 0), Coll::Reduce(DType::I64, ReduceOp::Sum, 8, 1)),
        ("zero length", Coll::AllGather(0), Coll::AllGather(8)),
        ("barrier", Coll::Barrier, Coll::AllGather(8)),
    ];
    for (what, common_call, odd_call) in cases {
        let g = checked_world(r, n, true);
        let mine = if r == odd { odd_call } else { common_call };
        let t = Instant::now();
        let e = match mine.run(&g) {
            Err(e) => e,
            Ok(()) => panic!("{what}: rank {r} returned Ok from a mismatched {mine:?}"),
        };
        let took = t.elapsed();
        assert!(matches!(e, Error::Mismatch { .. }), "{what}: rank {r}: {e}");
        assert!(took < Duration::from_secs(5), "{what}: rank {r} took {took:?}: {e}");
        let text = e.to_string();
        assert!(text.contains(g.name()), "{what}: rank {r}: the group is not named: {text}");
        for c in [common_call, odd_call] {
            assert!(text.contains(&c.desc().to_string()), "{what}: rank {r}: {c:?} is not named: {text}");
        }
        assert!(text.contains(&format!("on ranks [{odd}]")), "{what}: rank {r}: the odd rank is not named: {text}");
        assert_eq!(e.peer(), Some(if r == odd { 0 } else { odd }), "{what}: rank {r}: {text}");
        // The group is poisoned by the error, as on every backend; MPI
        // itself is in step: the next world's collectives work.
        assert!(matches!(g.barrier(), Err(Error::Poisoned { .. })), "{what}: rank {r}");
        drop(g);
        let mut sum = [r as i64 + 1];
        ctl.all_reduce(&mut sum, ReduceOp::Sum).unwrap();
        assert_eq!(sum[0], (n * (n + 1) / 2) as i64, "{what}: after the mismatch");
    }
    if r == 0 {
        println!("mismatch: {} collective cases fail on every rank", cases.len());
    }

    // The same communicator keeps working after a check found a mismatch
    // (driven below the group, which poisons itself on any mismatch).
    let factory = MpiFactory::new(rt.clone()).check(true);
    let opts = GroupOptions { timeout: Duration::from_secs(20), ..GroupOptions::default() };
    let ranks: Vec<usize> = (0..n).collect();
    let info = GroupInfo {
        name: "raw",
        rank: r,
        size: n,
        global_ranks: &ranks,
        store: Arc::new(HashStore::new()),
        group_id: 77,
        opts: &opts,
    };
    let mut raw = factory.build(&info).unwrap().comm;
    let count = if r == odd { 3 } else { 4 };
    let call = |seq, count: usize| Call {
        seq,
        timeout: opts.timeout,
        desc: OpDesc::new(OpCode::AllReduce, Some(DType::I32), Some(ReduceOp::Sum), None, 4 * count),
    };
    let mut buf = vec![0u8; 4 * count];
    let e = raw.all_reduce(call(1, count), &mut buf, DType::I32, ReduceOp::Sum).unwrap_err();
    assert!(matches!(e, Error::Mismatch { .. }), "rank {r}: {e}");
    let mut v: Vec<u8> = [r as i32 + 1; 4].iter().flat_map(|x| x.to_ne_bytes()).collect();
    raw.all_reduce(call(2, 4), &mut v, DType::I32, ReduceOp::Sum).unwrap();
    let want = (n * (n + 1) / 2) as i32;
    assert!(v.chunks_exact(4).all(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]) == want), "rank {r}: {v:?}");
    drop(raw);

    // Point-to-point, check mode off: the descriptor travels in the tag.
    // (sent bytes, received bytes): longer, shorter, empty, an f32 send
    // received as f64, and a large message whose sender must not hang.
    let p2p: [(&str, usize, usize); 6] = [
        ("longer", 16, 8),
        ("large into small", 1 << 20, 8),
        ("shorter", 4, 8),
        ("empty", 0, 8),
        ("f32 sent, f64 received", 4 * 4, 4 * 8),
        ("large", 4 << 20, (4 << 20) - 8),
    ];
    for (what, sent, expected) in p2p {
        let g = checked_world(r, n, false);
        let t = Instant::now();
        if r == 0 {
            g.send_bytes(&vec![7u8; sent], 1).unwrap();
            // The message was taken off MPI's queue: a large send returns.
            assert!(t.elapsed() < Duration::from_secs(5), "{what}: the send took {:?}", t.elapsed());
        } else if r == 1 {
            let mut buf = vec![0u8; expected];
            let e = g.recv_bytes(&mut buf, 0).unwrap_err();
            assert!(matches!(e, Error::Mismatch { .. }) && e.peer() == Some(0), "{what}: {e}");
            assert!(t.elapsed() < Duration::from_secs(5), "{what}: the recv took {:?}: {e}", t.elapsed());
            let text = e.to_string();
            for len in [sent, expected] {
                let d = OpDesc::new(OpCode::SendRecv, None, None, None, len);
                assert!(text.contains(&d.to_string()), "{what}: {d} is not named: {text}");
            }
            assert!(buf.iter().all(|&b| b == 0), "{what}: the receive buffer was written");
        }
        ctl.barrier().unwrap();
    }
    if r == 0 {
        println!("mismatch: {} point-to-point cases fail on the receiver", p2p.len());
    }

    // The pair's communicator keeps working after a mismatched receive.
    let opts = GroupOptions { timeout: Duration::from_secs(20), ..GroupOptions::default() };
    let info = GroupInfo { name: "raw-p2p", group_id: 78, opts: &opts, ..info };
    let mut raw = MpiFactory::new(rt.clone()).check(false).build(&info).unwrap().comm;
    let p2p_call =
        |seq, len| Call { seq, timeout: opts.timeout, desc: OpDesc::new(OpCode::SendRecv, None, None, None, len) };
    if r == 0 {
        raw.send(p2p_call(1, 12), &[1u8; 12], 1).unwrap();
        raw.send(p2p_call(2, 8), &[9u8; 8], 1).unwrap();
    } else if r == 1 {
        let mut b = [0u8; 8];
        let e = raw.recv(p2p_call(1, 8), &mut b, 0).unwrap_err();
        assert!(matches!(e, Error::Mismatch { .. }), "{e}");
        raw.recv(p2p_call(2, 8), &mut b, 0).unwrap();
        assert_eq!(b, [9u8; 8]);
    }
    // A large message longer than the receive under the receive's own tag
    // (both calls claim the same descriptor): a mismatch, and nothing is
    // written past the buffer (Open MPI's single-copy path would write the
    // whole message into a truncating receive).
    let big = p2p_call(3, 1 << 20);
    if r == 0 {
        raw.send(big, &vec![5u8; 4 << 20], 1).unwrap();
    } else if r == 1 {
        let mut guarded = vec![0u8; 5 << 20];
        let e = raw.recv(big, &mut guarded[..1 << 20], 0).unwrap_err();
        assert!(matches!(e, Error::Mismatch { .. }) && e.to_string().contains("4194304"), "{e}");
        assert!(guarded.iter().all(|&b| b == 0), "the receive wrote into or past its buffer");
    }
    drop(raw);

    // A checked world passes the conformance suite.
    let g = checked_world(r, n, true);
    suite(&g, Level { counts: &[0, 7, 1000], large: false });
    drop(g);
    ctl.barrier().unwrap();
    drop(ctl);
    println!("PASS mismatch rank {r} of {n}");
}

fn main() {
    // A failed assertion must end the whole job at once, not finalize MPI
    // while the other ranks wait in a collective.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    if std::env::args().any(|a| a == "--watchdog") {
        let rt = Runtime::get().unwrap();
        let short = short_world(rt.rank(), rt.size());
        if rt.rank() == 0 {
            let _ = short.barrier();
            eprintln!("the barrier returned: the watchdog did not abort the job");
        } else {
            std::thread::sleep(Duration::from_secs(20));
        }
        std::process::exit(3);
    }
    if std::env::args().any(|a| a == "--mismatch") {
        mismatch_mode();
        return;
    }
    let state = ParallelState::new();
    state.init(&InitOptions::new().backend(Backend::Mpi).timeout(TIMEOUT)).unwrap();
    assert_eq!(state.backend().as_deref(), Some("mpi"));
    let w = state.get_world_group().unwrap();
    let pg = w.cpu_group().unwrap();
    let (r, n) = (pg.rank(), pg.size());
    assert_eq!(pg.backend_name(), "mpi");

    // The seam's conformance suite, world and subgroup.
    suite(&pg, FULL);
    large(&pg);
    if n >= 3 {
        let evens: Vec<usize> = (0..n).step_by(2).collect();
        if let Some(sub) = pg.new_group(&evens, "evens").unwrap() {
            assert_eq!(sub.backend_name(), "mpi");
            suite(&sub, Level { counts: &[0, 7, 1000], large: false });
        }
    }

    // The coordinator on top: objects, tensor dicts, node membership.
    let obj = w.broadcast_object(if r == n - 1 { Some(vec![("k".to_string(), 7u64)]) } else { None }, n - 1).unwrap();
    assert_eq!(obj, vec![("k".to_string(), 7u64)]);
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    if n > 1 {
        let got: String = if r % 2 == 0 {
            w.send_object(&format!("from {r}"), next).unwrap();
            w.recv_object(prev).unwrap()
        } else {
            let g = w.recv_object(prev).unwrap();
            w.send_object(&format!("from {r}"), next).unwrap();
            g
        };
        assert_eq!(got, format!("from {prev}"));
    }
    let five = dict(5);
    let d = w.broadcast_tensor_dict(if r == 0 { Some(&five) } else { None }, 0).unwrap();
    assert_eq!(d, dict(5));
    assert_eq!(w.in_the_same_node_as(0).unwrap(), vec![true; n], "one node under this mpirun");
    let sum = w.all_reduce(Tensor::from_vec(vec![r as i64, 1], [2]).unwrap()).unwrap();
    assert_eq!(sum.as_slice::<i64>().unwrap(), &[(n * (n - 1) / 2) as i64, n as i64]);

    // TP x PP: tp 2 x pp n/2; PP stage 0 sends a dict to stage 1, with and
    // without the TP group as all_gather_group.
    if n % 2 == 0 && n >= 4 {
        state.initialize_model_parallel(2, n / 2, Some("mpi")).unwrap();
        let tp = state.get_tp_group().unwrap();
        let pp = state.get_pp_group().unwrap();
        assert_eq!(tp.ranks(), &[r - r % 2, r - r % 2 + 1]);
        assert_eq!(pp.ranks(), (r % 2..n).step_by(2).collect::<Vec<_>>());
        let x = tp.all_reduce(Tensor::from_vec(vec![r as f32; 3], [3]).unwrap()).unwrap();
        let base = (r - r % 2) as f32;
        assert_eq!(x.as_slice::<f32>().unwrap(), &[2.0 * base + 1.0; 3]);
        // The TP group's broadcaster (message queue in shared memory).
        assert!(tp.uses_message_queue_broadcaster(), "the TP group has its message queue");
        let o = tp.broadcast_object(if tp.rank_in_group() == 0 { Some(r as u32) } else { None }, 0).unwrap();
        assert_eq!(o, (r - r % 2) as u32);
        for ag in [None, Some(&tp)] {
            if pp.rank_in_group() == 0 {
                pp.send_tensor_dict(&dict(r as i64), Some(1), ag).unwrap();
            } else if pp.rank_in_group() == 1 {
                let got = pp.recv_tensor_dict(Some(0), ag).unwrap().unwrap();
                assert_eq!(got, dict(pp.ranks()[0] as i64));
            }
        }
        let g = pp.all_gather(&Tensor::from_vec(vec![r as i32], [1]).unwrap(), 0).unwrap();
        assert_eq!(g.as_slice::<i32>().unwrap(), pp.ranks().iter().map(|&x| x as i32).collect::<Vec<_>>());
        state.destroy_model_parallel();
    }

    // Errors MPI returns: a receive past its deadline names the peer; a
    // message of the wrong length is a mismatch. The other rank of the pair
    // does nothing on those groups.
    if n >= 2 {
        let short = short_world(r, n);
        if r == 1 {
            let e = short.recv_bytes(&mut [0u8; 8], 0).unwrap_err();
            assert!(matches!(e, Error::Timeout { .. }) && e.peer() == Some(0), "{e}");
            assert!(e.to_string().contains("recv") && e.to_string().contains(short.name()), "{e}");
            assert!(matches!(short.barrier(), Err(Error::Poisoned { .. })));
        }
        pg.barrier().unwrap();
        drop(short);
        for (sent, expected) in [(16usize, 8usize), (4, 8)] {
            let short = short_world(r, n);
            if r == 0 {
                short.send_bytes(&vec![1u8; sent], 1).unwrap();
            } else if r == 1 {
                let e = short.recv_bytes(&mut vec![0u8; expected], 0).unwrap_err();
                assert!(matches!(e, Error::Mismatch { .. }) && e.peer() == Some(0), "{sent} vs {expected}: {e}");
            }
            pg.barrier().unwrap();
        }
    }

    // f16/bf16 Avg and Max, typed, through the user-defined operations.
    let mut h = vec![half::f16::from_f32(r as f32); 5];
    pg.all_reduce(&mut h, ReduceOp::Max).unwrap();
    assert!(h.iter().all(|v| v.to_f32() == (n - 1) as f32));
    let mut b = vec![half::bf16::from_f32(2.0 * r as f32); 9];
    pg.all_reduce(&mut b, ReduceOp::Avg).unwrap();
    assert!(b.iter().all(|v| v.to_f32() == (n - 1) as f32));

    pg.barrier().unwrap();
    state.destroy_distributed_environment();
    println!("PASS rank {r} of {n}");
}
