//! Tensor-parallel collectives through the seed's API, asserting results.
//!
//! Under the launcher (`rankweave launch --nproc-per-node 3 -- <this example>`)
//! every process joins through `env://`; run directly it is a world of one.

use rankweave::parallel_state as ps;
use rankweave::tensor::Tensor;

fn main() -> rankweave::Result<()> {
    let launched = std::env::var_os("WORLD_SIZE").is_some();
    if launched {
        ps::init_distributed_environment(-1, -1, "env://", -1, "gloo")?;
    } else {
        ps::init_distributed_environment(1, 0, "tcp://127.0.0.1:0", -1, "gloo")?;
    }
    let world = ps::get_world_group()?;
    let n = world.world_size();
    ps::initialize_model_parallel(n, 1, None)?;
    let tp = ps::get_tp_group()?;
    let r = ps::get_tensor_model_parallel_rank()?;
    assert_eq!(ps::get_tensor_model_parallel_world_size()?, n);

    // all_reduce: every rank contributes r + 1 -> n (n + 1) / 2.
    let sum = tp.all_reduce(Tensor::full([2, 3], (r + 1) as f32)?)?;
    assert_eq!(sum.as_slice::<f32>()?, &[(n * (n + 1) / 2) as f32; 6]);

    // all_gather along the last dim of a (2, 2) block: rank order along dim 1.
    let x = Tensor::from_vec(vec![10 * r as i64, 10 * r as i64 + 1, 100 + r as i64, 101 + r as i64], [2, 2])?;
    let g = tp.all_gather(&x, -1)?;
    assert_eq!(g.shape(), &[2, 2 * n]);
    let row0: Vec<i64> = (0..n).flat_map(|k| [10 * k as i64, 10 * k as i64 + 1]).collect();
    assert_eq!(&g.as_slice::<i64>()?[..2 * n], row0.as_slice());

    // gather to the last rank along dim 0.
    let dst = n - 1;
    match tp.gather(&x, dst, 0)? {
        Some(t) => {
            assert_eq!(r, dst);
            assert_eq!(t.shape(), &[2 * n, 2]);
        }
        None => assert_ne!(r, dst),
    }

    // broadcast from rank 0.
    let b = tp.broadcast(if r == 0 { Tensor::vec1(&[3i32, 1, 4]) } else { Tensor::vec1(&[0i32; 3]) }, 0)?;
    assert_eq!(b.as_slice::<i32>()?, &[3, 1, 4]);

    tp.barrier()?;
    if r == 0 {
        println!("tensor_parallel: ok on {n} ranks");
    }
    ps::destroy_model_parallel();
    ps::destroy_distributed_environment();
    Ok(())
}
