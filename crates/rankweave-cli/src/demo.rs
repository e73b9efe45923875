//! `rankweave demo`: an end-to-end check through the launcher.
//!
//! For now it starts `--nproc` copies of the hidden `selftest` worker with
//! the launcher machinery; each worker checks the environment the launcher
//! gave it and prints one line. PASS when every worker succeeded.

use crate::launch::{self, JobSpec};
use rankweave::{Context, Error, Result};
use std::time::Duration;

/// Arguments of `rankweave demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of worker processes.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub nproc: usize,
}

/// Runs `rankweave demo`; returns the exit code (0 on PASS, 1 on FAIL).
pub fn run(args: DemoArgs) -> Result<i32> {
    if args.nproc == 0 {
        return Err(Error::invalid("--nproc must be at least 1"));
    }
    let exe = std::env::current_exe().map_err(|e| Error::io(Context::op("demo: locate own executable"), e))?;
    let n = args.nproc;
    println!("rankweave demo: launching {n} workers");
    let spec = JobSpec {
        nproc_per_node: n,
        nnodes: 1,
        node_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: None,
        grace: Duration::from_secs(5),
        prefix: true,
        program: exe.into_os_string(),
        args: vec!["selftest".into(), "--expect-world".into(), n.to_string().into()],
    };
    let code = launch::run_job(&spec)?;
    if code == 0 {
        println!("PASS: {n} workers saw consistent RANK/LOCAL_RANK/WORLD_SIZE and exited 0");
        Ok(0)
    } else {
        println!("FAIL: the workers ended with exit code {code}");
        Ok(1)
    }
}
