//! Cross-memory attach: one copy straight out of, or into, another
//! process's memory.

use nix::errno::Errno;
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;
use std::io::{IoSlice, IoSliceMut};

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
    let len = out.len();
    whole(len, |done| {
        let remote = [RemoteIoVec { base: addr.checked_add(done).ok_or(Errno::EFAULT)?, len: len - done }];
        process_vm_readv(Pid::from_raw(pid), &mut [IoSliceMut::new(&mut out[done..])], &remote)
    })
}

/// Copies `data` to address `addr` of process `pid` (`process_vm_writev`,
/// repeated after a partial transfer); the errors of [`read_from`].
pub(crate) fn write_to(pid: i32, addr: usize, data: &[u8]) -> Result<(), Errno> {
    #[cfg(test)]
    if let Some(e) = REFUSE_WRITE.with(std::cell::Cell::get) {
        return Err(e);
    }
    whole(data.len(), |done| {
        let remote = [RemoteIoVec { base: addr.checked_add(done).ok_or(Errno::EFAULT)?, len: data.len() - done }];
        process_vm_writev(Pid::from_raw(pid), &[IoSlice::new(&data[done..])], &remote)
    })
}

/// Lets any process of this user attach to this one (Yama's
/// `PR_SET_PTRACER_ANY`), once per process: without it, Yama's
/// `ptrace_scope` 1 allows cross-memory attach only into descendants,
/// never between sibling ranks. Where Yama is absent the call fails with
/// `EINVAL` and nothing is needed; any failure is only logged (the peers'
/// attempts are then refused, and they fall back).
pub(crate) fn allow_peer_attach() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        if let Err(e) = rustix::process::set_ptracer(rustix::process::PTracer::Any) {
            tracing::debug!("PR_SET_PTRACER_ANY not set ({e}): Yama absent or the call refused");
        }
    });
}

/// Repeats `step(bytes done so far)` until `len` bytes are done; a step
/// that moves nothing is `EFAULT` (the range ends in unmapped memory).
fn whole(len: usize, mut step: impl FnMut(usize) -> Result<usize, Errno>) -> Result<(), Errno> {
    let mut done = 0;
    while done < len {
        match step(done)? {
            0 => return Err(Errno::EFAULT),
            n => done += n,
        }
    }
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Unit tests: make [`read_from`] fail on this thread as a kernel that
    /// refuses cross-memory attach would.
    pub(crate) static REFUSE: std::cell::Cell<Option<Errno>> = const { std::cell::Cell::new(None) };
    /// The same for [`write_to`].
    pub(crate) static REFUSE_WRITE: std::cell::Cell<Option<Errno>> = const { std::cell::Cell::new(None) };
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

    #[test]
    fn writes_this_process_and_refuses_a_bad_address() {
        let src: Vec<u8> = (0..100_000u32).map(|i| (i * 13) as u8).collect();
        let mut out = vec![0u8; src.len()];
        let me = std::process::id() as i32;
        match write_to(me, out.as_mut_ptr() as usize, &src) {
            Ok(()) => assert_eq!(out, src),
            Err(e) => assert!(matches!(e, Errno::EPERM | Errno::ENOSYS), "{e}"),
        }
        assert!(write_to(me, usize::MAX - 10, &src[..100]).is_err());
    }
}
