//! The waiting strategy shared by the shared-memory code.
//!
//! The shared-memory collectives and the message queue use `std` atomics
//! directly. A loom seam was tried and removed: loom models threads of one
//! process, while these protocols run between processes over a mapped
//! segment whose every access goes through raw offsets, which loom cannot
//! follow; the protocols are covered instead by stress tests (thousands of
//! mixed collectives and messages over small slots) and by the
//! Release/Acquire pairs documented at each store and load.
//!
//! Waiting ([`Backoff`]) goes through three stages, because ranks often
//! outnumber cores (8 ranks on 2 cores must not crawl):
//! 1. spin: [`SPIN_LIMIT`] iterations with a CPU spin hint, for the
//!    sub-microsecond case where the peer is running on another core;
//! 2. yield: `yield_now` until the wait has lasted [`YIELD_FOR`], handing
//!    the core to a runnable peer sharing it. This stage must outlast one
//!    sleep of the peer: when it is shorter, two ranks fall into a convoy in
//!    which each one sleeps while the other one arrives;
//! 3. sleep: intervals that double from [`SLEEP_MIN`] up to [`SLEEP_MAX`],
//!    and up to [`IDLE_SLEEP_MAX`] once the wait has lasted [`LONG_IDLE`]
//!    (an idle reader polling between requests costs almost nothing).
//!
//! Every wait is bounded by a deadline; callers turn an expired deadline into
//! an [`Error::Timeout`](crate::Error::Timeout) that names the operation,
//! the group and the late peer.

use std::time::{Duration, Instant};

/// Spin iterations before the first yield.
///
/// Short on purpose: a spin hint (PAUSE) costs 10 to 140 cycles depending on
/// the CPU, about 80 ns in the 2-core VM this was tuned on, so this is at
/// most about 3 us. When the peer shares our core it cannot arrive while we spin; the
/// measured 2-rank loop then paid the whole spin stage on every step
/// (8 us at 100 iterations, 54 us at 1000), while a peer on another core
/// arrives within a microsecond or two.
pub(crate) const SPIN_LIMIT: u32 = 32;
/// How long a wait yields (counted from its first yield) before sleeping.
///
/// A sleep is cheap; the wake-up is not: a core that fell idle halts,
/// and on the 2-core VM this was tuned on bringing it back took tens of
/// microseconds, so a wait that outlasts the yield stage by a little paid
/// far more than it waited. Most waits between ranks that work in turns
/// (a root encoding an object while the others decode the last one, a
/// pipeline stage handing over, a tensor-parallel peer a step behind) last
/// 50-200 us. 200 us against run 13's 50 us (docs/PERFORMANCE.md, run 14):
/// a 1 MiB object broadcast 311 -> 186 us at 2 ranks and 566 -> 414 us at
/// 4, the demo with 4 ranks on 2 cores 3-29 % more tokens/s in each of four
/// rounds; 8 ranks on 2 cores, an 8 B all_reduce 12.1 -> 13.9 us.
pub(crate) const YIELD_FOR: Duration = Duration::from_micros(200);
/// First sleep interval.
pub(crate) const SLEEP_MIN: Duration = Duration::from_micros(8);
/// Longest sleep interval during an ordinary wait.
pub(crate) const SLEEP_MAX: Duration = Duration::from_millis(1);
/// After waiting this long, the wait counts as idle and may sleep longer.
pub(crate) const LONG_IDLE: Duration = Duration::from_secs(1);
/// Longest sleep interval during an idle wait.
pub(crate) const IDLE_SLEEP_MAX: Duration = Duration::from_millis(5);

/// Progressive backoff for a polling wait: spin, then yield, then sleep.
#[derive(Debug)]
pub(crate) struct Backoff {
    step: u32,
    sleep: Duration,
    started: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// A fresh backoff at the spinning stage.
    pub(crate) fn new() -> Self {
        Backoff { step: 0, sleep: SLEEP_MIN, started: None }
    }

    /// True while still in the spinning stage (callers may skip the deadline
    /// check there: it costs more than one spin).
    #[inline]
    pub(crate) fn is_spinning(&self) -> bool {
        self.step < SPIN_LIMIT
    }

    /// Skips the spinning stage: the awaited peer cannot run while we spin
    /// (it last ran on our core), so hand the core over at once.
    #[inline]
    pub(crate) fn skip_spin(&mut self) {
        self.step = self.step.max(SPIN_LIMIT);
    }

    /// Waits a little, longer with every call.
    #[inline]
    pub(crate) fn snooze(&mut self) {
        self.snooze_with(std::thread::sleep);
    }

    /// [`Backoff::snooze`], with `sleep` in place of the sleeping stage's
    /// `thread::sleep` (a futex wait that the awaited change ends early;
    /// it must not sleep longer than the interval it is given).
    #[inline]
    pub(crate) fn snooze_with(&mut self, sleep: impl FnOnce(Duration)) {
        if self.step < SPIN_LIMIT {
            self.step += 1;
            std::hint::spin_loop();
            return;
        }
        self.snooze_slow(sleep);
    }

    #[cold]
    fn snooze_slow(&mut self, sleep: impl FnOnce(Duration)) {
        let started = *self.started.get_or_insert_with(Instant::now);
        if self.step == SPIN_LIMIT {
            if started.elapsed() < YIELD_FOR {
                std::thread::yield_now();
                return;
            }
            self.step += 1;
        }
        sleep(self.sleep);
        let cap = if started.elapsed() >= LONG_IDLE { IDLE_SLEEP_MAX } else { SLEEP_MAX };
        self.sleep = (self.sleep * 2).min(cap);
    }
}

/// The CPU this thread runs on now (`u32::MAX` when unknown); a hint only,
/// the thread may migrate right after.
#[inline]
pub(crate) fn current_cpu() -> u32 {
    // SAFETY: sched_getcpu takes no arguments and only reads the CPU number
    // (vDSO on Linux); it returns -1 on failure, which maps to u32::MAX.
    let c = unsafe { nix::libc::sched_getcpu() };
    u32::try_from(c).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic;
    use std::sync::Arc;

    #[test]
    fn backoff_sees_a_store_from_another_thread() {
        let flag = Arc::new(atomic::AtomicU64::new(0));
        let f2 = flag.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            f2.store(7, atomic::Ordering::Release);
        });
        let start = Instant::now();
        let mut b = Backoff::new();
        while flag.load(atomic::Ordering::Acquire) != 7 {
            assert!(start.elapsed() < Duration::from_secs(10));
            b.snooze();
        }
        t.join().unwrap();
    }

    #[test]
    fn skip_spin_goes_straight_to_yielding() {
        let mut b = Backoff::new();
        assert!(b.is_spinning());
        b.skip_spin();
        assert!(!b.is_spinning());
    }

    #[test]
    fn current_cpu_is_known_on_linux() {
        assert!(current_cpu() < 4096);
    }

    #[test]
    fn backoff_sleeps_grow_and_stay_capped() {
        let mut b = Backoff::new();
        let start = Instant::now();
        while b.sleep == SLEEP_MIN {
            b.snooze();
        }
        assert!(start.elapsed() >= YIELD_FOR);
        for _ in 0..12 {
            b.snooze();
        }
        assert_eq!(b.sleep, SLEEP_MAX);
    }
}
