//! The hidden `selftest` worker: it checks the environment `rankweave
//! launch` sets and prints one line. With `--tp`, it also joins the world
//! (`env://`), builds the model-parallel groups, checks one all_reduce in
//! its TP group and leaves; `--delay-from-rank R --delay S` makes ranks R
//! and above sleep S seconds before `initialize_model_parallel`, so the
//! lower ranks finish and exit while they still build groups.

use rankweave::parallel_state;
use rankweave::tensor::Tensor;
use rankweave::{Error, Result};
use std::time::Duration;

/// Arguments of the hidden `rankweave selftest`.
#[derive(Debug, clap::Args)]
pub struct SelftestArgs {
    /// The WORLD_SIZE this worker must see.
    #[arg(long, value_name = "N")]
    pub expect_world: Option<usize>,
    /// Join the world and build TP x PP groups of this TP size.
    #[arg(long, value_name = "N")]
    pub tp: Option<usize>,
    /// PP size with `--tp`.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub pp: usize,
    /// Ranks from this one on sleep `--delay` seconds before building the groups.
    #[arg(long, value_name = "R")]
    pub delay_from_rank: Option<usize>,
    /// Seconds of that sleep.
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    pub delay: f64,
}

/// Joins the world, builds the groups, checks a TP all_reduce, leaves.
fn model_parallel(rank: usize, args: &SelftestArgs, tp: usize) -> Result<()> {
    parallel_state::init_distributed_environment(-1, -1, "env://", -1, "gloo")?;
    let result = (|| {
        if args.delay_from_rank.is_some_and(|r| rank >= r) && args.delay > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(args.delay.min(3600.0)));
        }
        parallel_state::initialize_model_parallel(tp, args.pp, Some("gloo"))?;
        let group = parallel_state::get_tp_group()?;
        let got: Vec<f64> = group.all_reduce(Tensor::from_vec(vec![rank as f64], vec![1])?)?.to_vec()?;
        let want: f64 = group.ranks().iter().map(|&r| r as f64).sum();
        if got != [want] {
            return Err(Error::invalid(format!("TP all_reduce of the ranks gave {got:?}, expected {want}")));
        }
        println!("rank {rank}: tp group {:?} all_reduce ok ({want})", group.ranks());
        Ok(())
    })();
    parallel_state::destroy_model_parallel();
    parallel_state::destroy_distributed_environment();
    result
}

fn var(name: &str) -> std::result::Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}

fn number(name: &str) -> std::result::Result<usize, String> {
    let v = var(name)?;
    v.parse().map_err(|_| format!("{name}={v:?} is not a number"))
}

/// What one worker saw.
#[derive(Debug)]
struct Seen {
    rank: usize,
    local_rank: usize,
    world: usize,
    local_world: usize,
    node: usize,
    master: String,
    job: String,
}

fn check(expect_world: Option<usize>) -> std::result::Result<Seen, String> {
    let s = Seen {
        rank: number("RANK")?,
        local_rank: number("LOCAL_RANK")?,
        world: number("WORLD_SIZE")?,
        local_world: number("LOCAL_WORLD_SIZE")?,
        node: number("GROUP_RANK")?,
        master: format!("{}:{}", var("MASTER_ADDR")?, number("MASTER_PORT")?),
        job: var(rankweave::segments::JOB_ID_ENV)?,
    };
    if let Some(w) = expect_world {
        if s.world != w {
            return Err(format!("WORLD_SIZE is {}, expected {w}", s.world));
        }
    }
    if s.rank >= s.world || s.local_rank >= s.local_world {
        return Err(format!("rank {} / local rank {} out of range", s.rank, s.local_rank));
    }
    if s.rank != s.node * s.local_world + s.local_rank {
        return Err(format!("RANK {} != GROUP_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK", s.rank));
    }
    if s.job.is_empty() {
        return Err("RANKWEAVE_JOB_ID is empty".into());
    }
    Ok(s)
}

/// Runs the worker; returns 0 when the environment is consistent, else 1.
pub fn run(args: SelftestArgs) -> Result<i32> {
    match check(args.expect_world) {
        Ok(s) if args.tp.is_some() => {
            let Some(tp) = args.tp else { return Ok(1) };
            match model_parallel(s.rank, &args, tp) {
                Ok(()) => Ok(0),
                Err(e) => {
                    eprintln!("rankweave selftest: rank {}: {e}", s.rank);
                    Ok(1)
                }
            }
        }
        Ok(s) => {
            println!(
                "rank {}/{} (local {}/{}, node {}, pid {}, master {}, job {}): environment ok",
                s.rank,
                s.world,
                s.local_rank,
                s.local_world,
                s.node,
                std::process::id(),
                s.master,
                s.job
            );
            Ok(0)
        }
        Err(msg) => {
            eprintln!("rankweave selftest: {msg}");
            Ok(1)
        }
    }
}
