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
//!    which each one sleeps while the other one arrives. While yields are
//!    costly (see [`yield_core`]) this stage spins instead;
//! 3. sleep: intervals that double from [`SLEEP_MIN`] up to [`SLEEP_MAX`],
//!    and up to [`IDLE_SLEEP_MAX`] once the wait has lasted [`LONG_IDLE`]
//!    (an idle reader polling between requests costs almost nothing).
//!
//! Every wait is bounded by a deadline; callers turn an expired deadline into
//! an [`Error::Timeout`](crate::Error::Timeout) that names the operation,
//! the group and the late peer.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
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
                yield_core();
                return;
            }
            self.step += 1;
        }
        sleep(self.sleep);
        let cap = if started.elapsed() >= LONG_IDLE { IDLE_SLEEP_MAX } else { SLEEP_MAX };
        self.sleep = (self.sleep * 2).min(cap);
    }
}

/// A yield that returns after this long handed the core to a task that
/// kept it for a time slice. Ranks waiting on each other yield back within
/// microseconds; a busy task of another program (or a busy thread) that
/// shares the core keeps it until its time slice ends: 2-4 ms on the
/// project's 2-core VM (`HZ=250`), every time the waiting rank yields.
pub(crate) const COSTLY_YIELD: Duration = Duration::from_micros(500);
/// How long yields stay off after the first costly one; each costly yield
/// right after a hold doubles the next hold, up to [`COSTLY_HOLD_MAX`].
pub(crate) const COSTLY_HOLD_MIN: Duration = Duration::from_millis(250);
/// Longest hold: a core that stays shared loses at most one time slice per
/// hold to the yield that probes it (4 ms in 8 s).
pub(crate) const COSTLY_HOLD_MAX: Duration = Duration::from_secs(8);

/// When yielding is worth it (see [`yield_core`]): off for a while after a
/// yield that took longer than [`COSTLY_YIELD`], always on where this
/// process's ranks outnumber the node's CPUs. Times are nanoseconds since
/// the guard's epoch; races between threads only move a hold's ends.
#[derive(Debug)]
pub(crate) struct YieldGuard {
    epoch: OnceLock<Instant>,
    /// Ranks of this node in the largest group this process joined.
    local_ranks: AtomicUsize,
    /// Yields are off until this time (0: on).
    off_until: AtomicU64,
    /// Length of the last hold.
    hold: AtomicU64,
}

impl YieldGuard {
    pub(crate) const fn new() -> Self {
        YieldGuard {
            epoch: OnceLock::new(),
            local_ranks: AtomicUsize::new(0),
            off_until: AtomicU64::new(0),
            hold: AtomicU64::new(0),
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        let epoch = *self.epoch.get_or_init(|| t);
        u64::try_from(t.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Calls `yield_fn` unless yields are off now; returns whether it did.
    pub(crate) fn yield_with(&self, cpus: usize, yield_fn: impl FnOnce()) -> bool {
        if self.local_ranks.load(Ordering::Relaxed) > cpus {
            yield_fn();
            return true;
        }
        let now = Instant::now();
        let at = self.nanos(now);
        let off_until = self.off_until.load(Ordering::Relaxed);
        if at < off_until {
            return false;
        }
        yield_fn();
        let took = now.elapsed();
        if took > COSTLY_YIELD {
            self.costly(at, off_until, took);
        } else if off_until != 0 {
            // The first cheap yield after a hold: the core is ours again.
            self.off_until.store(0, Ordering::Relaxed);
            self.hold.store(0, Ordering::Relaxed);
        }
        true
    }

    #[cold]
    fn costly(&self, at: u64, off_until: u64, took: Duration) {
        let (min, max) = (COSTLY_HOLD_MIN.as_nanos() as u64, COSTLY_HOLD_MAX.as_nanos() as u64);
        // Costly again right after a hold: hold twice as long.
        let hold =
            if off_until != 0 { self.hold.load(Ordering::Relaxed).saturating_mul(2).clamp(min, max) } else { min };
        self.hold.store(hold, Ordering::Relaxed);
        self.off_until.store(at.saturating_add(hold), Ordering::Relaxed);
        tracing::debug!(
            "a yield kept this rank off its core for {took:.1?}: a busy task shares it; waits spin for {:?} instead",
            Duration::from_nanos(hold)
        );
    }

    /// The length of the current or last hold (zero when none).
    #[cfg(test)]
    fn hold(&self) -> Duration {
        Duration::from_nanos(self.hold.load(Ordering::Relaxed))
    }
}

static GUARD: YieldGuard = YieldGuard::new();

/// CPUs online on this node (`sysconf(_SC_NPROCESSORS_ONLN)`), not only
/// those this process may use: a launcher that binds each rank to a CPU of
/// its own leaves each rank one, and the ranks together all of them.
fn node_cpus() -> usize {
    static CPUS: OnceLock<usize> = OnceLock::new();
    *CPUS.get_or_init(|| match nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN) {
        Ok(Some(n)) if n > 0 => usize::try_from(n).unwrap_or(1),
        _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

/// Records that a group of this process has `n` ranks on this node. Where
/// some group has more ranks here than the node has CPUs, a long yield is
/// what ranks sharing a core do to each other, and [`yield_core`] always
/// yields.
pub(crate) fn note_local_ranks(n: usize) {
    GUARD.local_ranks.fetch_max(n, Ordering::Relaxed);
}

/// One turn of a polling wait's yield stage: hands the core to another
/// runnable task (`sched_yield`), or, while yields were found costly lately,
/// gives a CPU spin hint instead.
///
/// A waiting rank yields so that a peer queued on its core can run at once.
/// When the task queued there is a busy task of someone else (a thread of
/// the engine, another program), the yield gives it the rest of its time
/// slice, and the rank stays off its core although the message it waits for
/// arrived microseconds later: an 8 B TCP sendrecv between 2 ranks on 2
/// cores took 2.0 ms with one busy loop beside them, against 5 us without
/// (`docs/PERFORMANCE.md`, run 19). A yield that took longer than
/// [`COSTLY_YIELD`] therefore turns yields off in this process for a hold
/// ([`COSTLY_HOLD_MIN`], doubling while they stay costly, at most
/// [`COSTLY_HOLD_MAX`]), and the wait spins instead: its busy stage is
/// bounded, a longer wait still sleeps, and the awaited event's wake-up
/// preempts the busy task.
///
/// Where this process's ranks outnumber the node's CPUs
/// ([`note_local_ranks`]) every call yields: there a long yield handed the
/// core to a peer rank doing awaited work, and a rank that spun instead
/// would keep the peer from it (4 ranks on 2 cores, an 8 B shared-memory
/// all_reduce 5.6 -> 26-428 us when it did).
#[inline]
pub(crate) fn yield_core() {
    if !GUARD.yield_with(node_cpus(), std::thread::yield_now) {
        std::hint::spin_loop();
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
    fn a_costly_yield_turns_yields_off_for_a_hold_that_doubles_while_they_stay_costly() {
        let g = YieldGuard::new();
        let slow = || std::thread::sleep(COSTLY_YIELD + Duration::from_millis(1));
        // A cheap yield changes nothing.
        let mut calls = 0;
        assert!(g.yield_with(2, || calls += 1));
        assert_eq!((calls, g.hold()), (1, Duration::ZERO));
        // A costly one: yields are off, and `yield_fn` is not called.
        assert!(g.yield_with(2, slow));
        assert_eq!(g.hold(), COSTLY_HOLD_MIN);
        assert!(!g.yield_with(2, || calls += 1));
        assert_eq!(calls, 1);
        // At the end of the hold a costly yield again: twice the hold.
        g.off_until.store(1, Ordering::Relaxed);
        assert!(g.yield_with(2, slow));
        assert_eq!(g.hold(), 2 * COSTLY_HOLD_MIN);
        assert!(!g.yield_with(2, || calls += 1));
        // Doubling stops at the cap.
        for _ in 0..8 {
            g.off_until.store(1, Ordering::Relaxed);
            g.yield_with(2, slow);
        }
        assert_eq!(g.hold(), COSTLY_HOLD_MAX);
        // A cheap yield after the hold: yields are on again, from the start.
        g.off_until.store(1, Ordering::Relaxed);
        assert!(g.yield_with(2, || calls += 1));
        assert_eq!((calls, g.hold()), (2, Duration::ZERO));
        assert!(g.yield_with(2, || calls += 1));
        assert_eq!(calls, 3);
        assert!(g.yield_with(2, slow));
        assert_eq!(g.hold(), COSTLY_HOLD_MIN);
    }

    #[test]
    fn ranks_that_outnumber_the_cpus_always_yield() {
        let g = YieldGuard::new();
        g.local_ranks.fetch_max(3, Ordering::Relaxed);
        let slow = || std::thread::sleep(COSTLY_YIELD + Duration::from_millis(1));
        let mut calls = 0;
        assert!(g.yield_with(2, slow));
        assert!(g.yield_with(2, || calls += 1));
        assert_eq!((calls, g.hold()), (1, Duration::ZERO));
        // With more CPUs than ranks the same costly yield turns yields off.
        assert!(g.yield_with(4, slow));
        assert!(!g.yield_with(4, || calls += 1));
        assert_eq!(calls, 1);
    }

    #[test]
    fn node_cpus_counts_at_least_the_cpus_this_process_may_use() {
        let mine = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(node_cpus() >= mine, "{} online CPUs, {mine} usable", node_cpus());
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
