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

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/conformance/mod.rs"]
mod conformance;

use conformance::{large, suite, Level, FULL};
use rankweave::backend::mpi::{MpiFactory, Runtime};
use rankweave::parallel_state::{Backend, InitOptions, ParallelState};
use rankweave::tensor::{Tensor, TensorDict, Value};
use rankweave::{DType, Error, GroupOptions, HashStore, ProcessGroup, ReduceOp};
use std::sync::Arc;
use std::time::Duration;

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
