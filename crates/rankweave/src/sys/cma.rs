//! Cross-memory attach: one copy straight out of another process's memory.

use nix::errno::Errno;
use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;
use std::io::IoSliceMut;

/// Copies `out.len()` bytes at address `addr` of process `pid` into `out`
/// (`process_vm_readv`, repeated after a partial transfer). The errno on
/// failure: `EPERM` where ptrace rules forbid it, `ENOSYS` where a seccomp
/// filter or the kernel lacks it, `ESRCH` when the process is gone,
/// `EFAULT` for an address range the process does not map.
pub(crate) fn read_from(pid: i32, addr: usize, out: &mut [u8]) -> Result<(), Errno> {
    #[cfg(test)]
    if let Some(e) = REFUSE.with(std::cell::Cell::get) {
        return Err(e);
    }
    let mut done = 0;
    while done < out.len() {
        let base = addr.checked_add(done).ok_or(Errno::EFAULT)?;
        let remote = [RemoteIoVec { base, len: out.len() - done }];
        let n = process_vm_readv(Pid::from_raw(pid), &mut [IoSliceMut::new(&mut out[done..])], &remote)?;
        if n == 0 {
            return Err(Errno::EFAULT);
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Unit tests: make [`read_from`] fail on this thread as a kernel that
    /// refuses cross-memory attach would.
    pub(crate) static REFUSE: std::cell::Cell<Option<Errno>> = const { std::cell::Cell::new(None) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_refuses_a_bad_address() {
        let src: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut out = vec![0u8; src.len()];
        let me = std::process::id() as i32;
        match read_from(me, src.as_ptr() as usize, &mut out) {
            Ok(()) => assert_eq!(out, src),
            // A sandbox without cross-memory attach: the error is reported.
            Err(e) => assert!(matches!(e, Errno::EPERM | Errno::ENOSYS), "{e}"),
        }
        assert!(read_from(me, usize::MAX - 10, &mut out[..100]).is_err());
    }
}
