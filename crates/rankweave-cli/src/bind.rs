//! `--bind-to`: one CPU of its own for each worker of a node, as `mpirun`
//! gives its ranks.
//!
//! - `none` leaves the workers to the scheduler (torchrun's way, and what a
//!   worker running its own thread pool wants).
//! - `core` gives local rank k the k-th CPU of the starting process's own
//!   affinity mask (so a `taskset` or cgroup around the launcher is honoured)
//!   and refuses more workers than CPUs.
//! - `auto` is `core` when every worker gets a CPU of its own and `none`
//!   otherwise. Open MPI 4.1's `mpirun` does the same with two ranks on this
//!   project's two-core machine (rank k on core k, `--report-bindings`) and
//!   leaves four unbound.
//!
//! A bound worker is never moved between cores, so its caches stay warm and
//! two ranks that talk to each other never queue behind each other on one
//! core; docs/PERFORMANCE.md (run 14) has what that does to small TCP
//! messages. The pinning happens in the child between fork and exec, so
//! every thread the worker starts inherits it.

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use rankweave::{Context, Error, Result};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Where the workers of a node run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BindTo {
    /// Wherever the scheduler puts them.
    #[default]
    None,
    /// Local rank k on the k-th allowed CPU; an error with more workers than CPUs.
    Core,
    /// `core` when there are at most as many workers as CPUs, else `none`.
    Auto,
}

/// The CPUs this process may run on, in increasing order.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0))
        .map_err(|e| Error::io(Context::op("read this process's CPU affinity"), e.into()))?;
    Ok((0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect())
}

/// The CPU of each of `workers` local ranks under `bind`, given the allowed
/// `cpus`; `None` leaves them all unbound.
pub fn plan(bind: BindTo, workers: usize, cpus: &[usize]) -> Result<Option<Vec<usize>>> {
    match bind {
        BindTo::None => Ok(None),
        _ if workers <= cpus.len() => Ok(Some(cpus[..workers].to_vec())),
        BindTo::Auto => Ok(None),
        BindTo::Core => Err(Error::invalid(format!(
            "--bind-to core: {workers} workers on this node but this process may run on only {} CPU{} ({cpus:?}); \
             use --bind-to auto (binds only when every worker gets a CPU of its own) or none",
            cpus.len(),
            if cpus.len() == 1 { "" } else { "s" }
        ))),
    }
}

/// [`plan`] for this process's own CPUs (none are read under `none`).
pub fn plan_here(bind: BindTo, workers: usize) -> Result<Option<Vec<usize>>> {
    if bind == BindTo::None {
        return Ok(None);
    }
    plan(bind, workers, &allowed_cpus()?)
}

/// Makes the process `cmd` starts run only on `cpu`, from before its first
/// instruction.
pub fn pin(cmd: &mut Command, cpu: usize) -> std::io::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("CPU {cpu} is beyond what a CPU set holds ({e})"))
    })?;
    // SAFETY: the closure runs in the forked child before exec; it makes one
    // system call (sched_setaffinity) on a set built before the fork, and
    // allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || sched_setaffinity(Pid::from_raw(0), &set).map_err(std::io::Error::from));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_gives_each_worker_its_own_cpu_or_leaves_them_alone() {
        let cpus = [2, 3, 5];
        assert_eq!(plan(BindTo::None, 2, &cpus).unwrap(), None);
        assert_eq!(plan(BindTo::Core, 2, &cpus).unwrap(), Some(vec![2, 3]));
        assert_eq!(plan(BindTo::Auto, 3, &cpus).unwrap(), Some(vec![2, 3, 5]));
        assert_eq!(plan(BindTo::Auto, 4, &cpus).unwrap(), None);
        let e = plan(BindTo::Core, 4, &cpus).unwrap_err().to_string();
        assert!(matches!(plan(BindTo::Core, 4, &cpus), Err(Error::InvalidArgument(_))));
        assert!(e.contains("4 workers") && e.contains("3 CPUs") && e.contains("[2, 3, 5]"), "{e}");
    }

    #[test]
    fn a_pinned_child_runs_only_on_its_cpu() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        let cpu = *cpus.last().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "grep Cpus_allowed_list /proc/self/status"]);
        pin(&mut cmd, cpu).unwrap();
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.split_whitespace().last(), Some(cpu.to_string().as_str()), "{text}");
        if cpus.len() > 1 {
            // An unbound child keeps the whole mask.
            let out = Command::new("sh").args(["-c", "grep Cpus_allowed_list /proc/self/status"]).output().unwrap();
            let whole = String::from_utf8_lossy(&out.stdout);
            assert_ne!(whole.split_whitespace().last(), Some(cpu.to_string().as_str()), "{whole}");
        }
    }
}
