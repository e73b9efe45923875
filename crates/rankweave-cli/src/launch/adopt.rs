//! Processes the workers leave behind.
//!
//! The launcher makes itself a child subreaper (Linux), so a process whose
//! parent (a worker or its child) died is re-parented to the launcher rather
//! than to init. The launcher reaps those as they end, and when the job is
//! over it kills and reaps the ones still running (e.g. something that left
//! the worker's process group with `setsid`), so the job leaves no orphan.

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// Makes orphaned descendants of the launcher its children. Best effort.
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::debug!("cannot become a child subreaper: {e}");
    }
}

/// Reaps every ended child that is not one of `workers` (those are reaped
/// through their `Child`). Returns how many were reaped.
pub fn reap_adopted(workers: &[Pid]) -> usize {
    let mut reaped = 0;
    loop {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let pid = match waitid(Id::All, flags) {
            Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _)) => pid,
            _ => return reaped,
        };
        if workers.contains(&pid) {
            // Stop here; the supervisor reaps it on its next poll.
            return reaped;
        }
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return reaped,
            Ok(_) => reaped += 1,
        }
    }
}

/// The launcher's current children, from `/proc/self/task/*/children`.
fn children() -> Vec<Pid> {
    let mut pids = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return pids };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(text.split_whitespace().filter_map(|p| p.parse().ok()).map(Pid::from_raw));
        }
    }
    pids
}

/// Kills and reaps every remaining child (call once all workers are reaped).
/// Gives up after `limit`. Returns how many were killed.
pub fn kill_adopted(limit: Duration) -> usize {
    reap_adopted(&[]);
    let mut killed = 0;
    for pid in children() {
        // Zombies need reaping only; count the ones that were still running.
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
            .unwrap_or(true);
        if !zombie {
            killed += 1;
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
    let deadline = Instant::now() + limit;
    while !children().is_empty() && Instant::now() < deadline {
        reap_adopted(&[]);
        std::thread::sleep(Duration::from_millis(2));
    }
    reap_adopted(&[]);
    killed
}
