//! The hidden `selftest` worker that `demo` launches: it checks the
//! environment `rankweave launch` sets and prints one line.

use rankweave::Result;

/// Arguments of the hidden `rankweave selftest`.
#[derive(Debug, clap::Args)]
pub struct SelftestArgs {
    /// The WORLD_SIZE this worker must see.
    #[arg(long, value_name = "N")]
    pub expect_world: Option<usize>,
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
