//! Catching SIGINT, SIGTERM and SIGHUP sent to the launcher so it can forward
//! them to its workers instead of dying and leaving them orphaned.
//!
//! The handler only stores the signal number in an atomic; the supervision
//! loop polls [`take`] every few milliseconds.

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::sync::atomic::{AtomicI32, Ordering};

/// The last signal caught and not yet taken, 0 when none.
static PENDING: AtomicI32 = AtomicI32::new(0);

/// The signals the launcher forwards.
pub const FORWARDED: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

extern "C" fn on_signal(sig: nix::libc::c_int) {
    // An atomic store is async-signal-safe; nothing else happens here.
    PENDING.store(sig, Ordering::Relaxed);
}

/// Installs the handler for every signal in [`FORWARDED`].
pub fn install() -> std::io::Result<()> {
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in FORWARDED {
        // SAFETY: `on_signal` is async-signal-safe (one relaxed atomic store)
        // and the previous handler is not needed afterwards.
        let old = unsafe { sigaction(sig, &action) }.map_err(std::io::Error::from)?;
        if old.handler() == SigHandler::SigIgn && sig != Signal::SIGTERM {
            // Started with SIGINT/SIGHUP ignored (a background job, nohup):
            // keep ignoring it, as a shell would.
            let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
            // SAFETY: restoring the ignore disposition installs no handler.
            unsafe { sigaction(sig, &ignore) }.map_err(std::io::Error::from)?;
        }
    }
    Ok(())
}

/// The signal caught since the last call, if any.
pub fn take() -> Option<Signal> {
    match PENDING.swap(0, Ordering::Relaxed) {
        0 => None,
        n => Signal::try_from(n).ok(),
    }
}
