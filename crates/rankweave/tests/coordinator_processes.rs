//! The coordinator across real OS processes: this test binary re-runs itself
//! as 4 worker processes that meet through `env://` (a TCP store and TCP
//! transports), as under `rankweave launch`.

use rankweave::parallel_state as ps;
use rankweave::tensor::{Tensor, TensorDict, Value};
use rankweave::DType;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "RANKWEAVE_COORD_TEST_CHILD";
const WORLD: usize = 4;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn dict(tag: i64) -> TensorDict {
    TensorDict::new()
        .with("x", Tensor::from_vec((0..24).map(|i| i as f32 + tag as f32).collect::<Vec<_>>(), [2, 3, 4]).unwrap())
        .with("odd", Tensor::from_vec(vec![1i64, 2, 3], [3]).unwrap())
        .with("empty", Tensor::zeros([0], DType::BF16).unwrap())
        .with("meta", Value::Map(vec![("tag".into(), tag.into())]))
}

/// What every worker process runs.
fn worker() -> rankweave::Result<()> {
    ps::init_distributed_environment(-1, -1, "env://", -1, "gloo")?;
    ps::initialize_model_parallel(2, 2, None)?;
    let world = ps::get_world_group()?;
    let tp = ps::get_tp_group()?;
    let pp = ps::get_pp_group()?;
    let rank = world.rank();
    assert_eq!(world.local_rank(), rank);
    assert_eq!(tp.ranks(), if rank < 2 { &[0, 1] } else { &[2, 3] });
    assert_eq!(pp.ranks(), if rank % 2 == 0 { &[0, 2] } else { &[1, 3] });

    let s = tp.all_reduce(Tensor::from_vec(vec![rank as i64 + 1], [1])?)?;
    assert_eq!(s.to_vec::<i64>()?, vec![if rank < 2 { 3 } else { 7 }]);
    let g = world.all_gather(&Tensor::from_vec(vec![rank as i32; 2], [1, 2])?, 1)?;
    assert_eq!(g.to_vec::<i32>()?, vec![0, 0, 1, 1, 2, 2, 3, 3]);
    let obj = world.broadcast_object((rank == 3).then(|| ("plan".to_string(), vec![1u32, 2])), 3)?;
    assert_eq!(obj, ("plan".to_string(), vec![1, 2]));

    // Stage 0 -> stage 1, with the TP group as all_gather_group.
    if pp.is_first_rank() {
        pp.send_tensor_dict(&dict(7), None, Some(&tp))?;
    } else {
        let got = pp.recv_tensor_dict(None, Some(&tp))?.expect("a dict");
        assert_eq!(got, dict(7));
    }
    assert_eq!(world.in_the_same_node_as(0)?, vec![true; WORLD]);
    world.barrier()?;
    ps::destroy_model_parallel();
    ps::destroy_distributed_environment();
    Ok(())
}

fn wait_all(mut children: Vec<Child>, limit: Duration) -> Vec<(usize, std::process::Output)> {
    let deadline = Instant::now() + limit;
    loop {
        let done = children.iter_mut().all(|c| matches!(c.try_wait(), Ok(Some(_))));
        if done || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    children
        .into_iter()
        .enumerate()
        .map(|(rank, mut c)| {
            if !matches!(c.try_wait(), Ok(Some(_))) {
                let _ = c.kill();
            }
            (rank, c.wait_with_output().expect("collect worker output"))
        })
        .collect()
}

#[test]
fn four_processes_tp2_pp2() {
    if std::env::var_os(CHILD_ENV).is_some() {
        if let Err(e) = worker() {
            panic!("worker failed: {e}");
        }
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let port = free_port().to_string();
    let children: Vec<Child> = (0..WORLD)
        .map(|rank| {
            Command::new(&exe)
                .args(["four_processes_tp2_pp2", "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, "1")
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", WORLD.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("RANKWEAVE_TIMEOUT", "60")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn worker")
        })
        .collect();
    let outs = wait_all(children, Duration::from_secs(120));
    let failed: Vec<String> = outs
        .iter()
        .filter(|(_, o)| !o.status.success())
        .map(|(r, o)| format!("rank {r}: {}\n{}", o.status, String::from_utf8_lossy(&o.stderr)))
        .collect();
    assert!(failed.is_empty(), "workers failed:\n{}", failed.join("\n"));
    for (rank, o) in &outs {
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains("1 passed"), "rank {rank} did not run the worker:\n{stdout}");
    }
}
