//! A pipeline of stages handing tensor dicts forward, and a broadcast of the
//! batch description, asserting results.
//!
//! Under the launcher every process is one pipeline stage (`pp = world`);
//! run directly it is a world of one, where sends short-circuit.

use rankweave::parallel_state as ps;
use rankweave::tensor::{Tensor, TensorDict, Value};
use rankweave::DType;

fn batch(step: i64) -> TensorDict {
    TensorDict::new()
        .with("input_ids", Tensor::from_vec(vec![101i64, 7592, 2088, 102], [1, 4]).unwrap())
        .with("hidden", Tensor::from_f64(&[0.5, -0.25, 1.0, 2.0, 0.0, 3.5], [2, 3], DType::BF16).unwrap())
        .with("empty_cache", Tensor::zeros([0, 8], DType::F16).unwrap())
        .with("step", step)
        .with("sampling", Value::Map(vec![("temperature".into(), 0.7f64.into()), ("top_k".into(), 40i64.into())]))
}

fn main() -> rankweave::Result<()> {
    if std::env::var_os("WORLD_SIZE").is_some() {
        ps::init_distributed_environment(-1, -1, "env://", -1, "gloo")?;
    } else {
        ps::init_distributed_environment(1, 0, "tcp://127.0.0.1:0", -1, "gloo")?;
    }
    let n = ps::get_world_group()?.world_size();
    ps::initialize_model_parallel(1, n, None)?;
    let pp = ps::get_pp_group()?;

    // The driver broadcasts the batch to every stage.
    let src = pp.broadcast_tensor_dict(pp.is_first_rank().then(|| batch(1)).as_ref(), 0)?;
    assert_eq!(src, batch(1));

    // Each stage receives from the previous one, bumps "step", sends on.
    let mut d = if pp.is_first_rank() { batch(0) } else { pp.recv_tensor_dict(None, None)?.expect("a dict") };
    let step = d.get_value("step").and_then(Value::as_int).expect("step");
    assert_eq!(step, pp.rank_in_group() as i64);
    d.insert("step", step + 1);
    if !pp.is_last_rank() {
        pp.send_tensor_dict(&d, None, None)?;
    } else {
        assert_eq!(d.get_tensor("hidden"), batch(0).get_tensor("hidden"));
        assert_eq!(d.get_tensor("empty_cache").map(|t| t.shape().to_vec()), Some(vec![0, 8]));
        println!("pipeline_tensor_dict: ok through {n} stages");
    }
    pp.barrier()?;
    ps::destroy_model_parallel();
    ps::destroy_distributed_environment();
    Ok(())
}
