//! Whether a process still runs.

/// Whether process `pid` is gone: it does not exist, or it is a zombie
/// (exited, not yet reaped by its parent; `kill(pid, 0)` still succeeds on
/// one, so a killed rank whose parent does not reap it would otherwise look
/// alive until every peer's deadline).
pub(crate) fn process_gone(pid: i32) -> bool {
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH) {
        return true;
    }
    // /proc/<pid>/stat: "pid (comm) S ...", where comm may hold spaces and
    // parentheses: the state follows the last ')'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            matches!(stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()), Some('Z' | 'X'))
        }
        // Vanished between the two checks.
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn an_unreaped_child_is_gone_and_a_live_one_is_not() {
        let me = std::process::id() as i32;
        assert!(!process_gone(me));
        let mut child = std::process::Command::new("sh").args(["-c", "exit 0"]).spawn().unwrap();
        let pid = child.id() as i32;
        // Not reaped: a zombie once it has exited, which kill(pid, 0) alone
        // takes for alive.
        let start = Instant::now();
        while !process_gone(pid) {
            assert!(start.elapsed() < Duration::from_secs(10), "zombie {pid} not seen as gone");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok(), "the zombie still exists");
        child.wait().unwrap();
        assert!(process_gone(pid));
    }
}
