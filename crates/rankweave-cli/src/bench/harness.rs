//! The shared measurement harness: warm-up, calibration, the two timing
//! modes, and the cross-rank reductions of the timings.
//!
//! - **loop**: warm-up, a barrier, then `iters` back-to-back operations with
//!   a timestamp after each. Each rank takes the median of its per-op deltas;
//!   the reported median is the maximum over ranks (mean and min likewise).
//! - **sync**: per iteration a barrier (not timed), `t0`, the operation,
//!   `t1`. Processes of one host share `CLOCK_MONOTONIC`, so an iteration's
//!   latency is `max_r t1 - max_r t0`: from the last rank's entry to the last
//!   rank's exit. The timestamps are exchanged with one all_gather at the end.
//!
//! Both are the definitions of ../bench-anchors/RESULTS.md, so rows compare
//! with torch gloo's and OpenMPI's.
//!
//! Everything runs on a [`ProcessGroup`] directly (the library's backend
//! seam); the unit tests build groups of threads on the in-process backend.

use rankweave::{DType, ProcessGroup, ReduceOp, Result};
use std::time::Instant;

/// Element-wise maximum of `vals` over all ranks, in place.
pub fn max_over_ranks(comm: &ProcessGroup, vals: &mut [f64]) -> Result<()> {
    comm.all_reduce_bytes(bytemuck::cast_slice_mut(vals), DType::F64, ReduceOp::Max)
}

/// Sum of `v` over all ranks.
pub fn sum_over_ranks(comm: &ProcessGroup, v: u64) -> Result<u64> {
    let mut x = [i64::try_from(v).unwrap_or(i64::MAX)];
    comm.all_reduce_bytes(bytemuck::cast_slice_mut(&mut x), DType::I64, ReduceOp::Sum)?;
    Ok(x[0].max(0) as u64)
}

/// Every rank's `vals`, rank after rank.
pub fn gather_i64(comm: &ProcessGroup, vals: &[i64]) -> Result<Vec<i64>> {
    let mut out = vec![0i64; vals.len() * comm.size()];
    comm.all_gather_bytes(bytemuck::cast_slice(vals), bytemuck::cast_slice_mut(&mut out))?;
    Ok(out)
}

/// Nanoseconds of `CLOCK_MONOTONIC`, comparable between processes of one host.
pub fn mono_ns() -> i64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() * 1_000_000_000 + ts.tv_nsec(),
        // CLOCK_MONOTONIC always exists on Linux; fall back to a process-local clock.
        Err(_) => {
            static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
            START.get_or_init(Instant::now).elapsed().as_nanos() as i64
        }
    }
}

/// Timing mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Back-to-back operations (throughput per op).
    Loop,
    /// Barrier-separated operations (latency).
    Sync,
}

impl Mode {
    /// `loop` or `sync`, as in the CSV.
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Loop => "loop",
            Mode::Sync => "sync",
        }
    }
}

/// How many iterations to run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Fixed timed iterations (`-n`), used when `iters_time` is `None`.
    pub iters: usize,
    /// Fixed warm-up iterations (`-w`), used when `iters_time` is `None`.
    pub warmup: usize,
    /// Seconds each (size, mode) should last; iterations are calibrated.
    pub iters_time: Option<f64>,
    /// Upper bound of calibrated iterations in loop mode.
    pub max_iters: usize,
    /// Upper bound of calibrated iterations in sync mode.
    pub sync_max_iters: usize,
}

/// Fewest timed iterations a calibrated measurement runs.
pub const MIN_ITERS: usize = 3;

/// Timings of one measurement, identical on every rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Median seconds per operation.
    pub median_s: f64,
    /// Mean seconds per operation.
    pub mean_s: f64,
    /// Fastest operation, seconds.
    pub min_s: f64,
    /// Timed iterations.
    pub iters: usize,
    /// Each rank's own `[median, mean]` seconds per operation, in rank
    /// order: in loop mode its per-op deltas, in sync mode its own time
    /// from entry to exit (the reported figures are cross-rank).
    pub per_rank: Vec<[f64; 2]>,
}

/// Every rank's `[median, mean]`, rank after rank (loop mode; sync mode
/// has every rank's stamps already).
fn gather_pairs(comm: &ProcessGroup, mine: [f64; 2]) -> Result<Vec<[f64; 2]>> {
    let mut all = vec![[0f64; 2]; comm.size()];
    comm.all_gather_bytes(bytemuck::cast_slice(&mine), bytemuck::cast_slice_mut(&mut all))?;
    Ok(all)
}

/// The median of `v` (mean of the two middle values for an even length); 0 when empty.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Iteration count for a target duration: `target / per_op`, clamped to `[MIN_ITERS, max]`.
pub fn iters_for(target_s: f64, per_op_s: f64, max: usize) -> usize {
    let per = per_op_s.max(1e-7);
    let want = (target_s / per).floor();
    let want = if want.is_nan() {
        MIN_ITERS
    } else if want.is_finite() {
        want as usize
    } else {
        max
    };
    want.clamp(MIN_ITERS, max.max(MIN_ITERS))
}

/// Estimates seconds per call of `f`, the same on every rank (the maximum):
/// one call (which also pays any lazy setup), then a short batch when that
/// was quick.
fn estimate(comm: &ProcessGroup, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    let mut est = [t.elapsed().as_secs_f64()];
    max_over_ranks(comm, &mut est)?;
    if est[0] < 0.05 {
        let k = (0.02 / est[0].max(1e-6)).clamp(2.0, 64.0) as usize;
        let t = Instant::now();
        for _ in 0..k {
            f()?;
        }
        est = [t.elapsed().as_secs_f64() / k as f64];
        max_over_ranks(comm, &mut est)?;
    }
    Ok(est[0].max(1e-7))
}

/// Measures `f` in `mode`. Every rank calls it with the same plan; `div`
/// divides each measured time (2 for a ping-pong's half round trip).
pub fn measure(
    comm: &ProcessGroup,
    mode: Mode,
    plan: &Plan,
    div: f64,
    f: &mut dyn FnMut() -> Result<()>,
) -> Result<Stats> {
    match mode {
        Mode::Loop => time_loop(comm, plan, div, f),
        Mode::Sync => time_sync(comm, plan, div, f),
    }
}

fn time_loop(comm: &ProcessGroup, plan: &Plan, div: f64, f: &mut dyn FnMut() -> Result<()>) -> Result<Stats> {
    let (warmup, iters) = match plan.iters_time {
        Some(target) => {
            let per = estimate(comm, f)?;
            ((0.05 / per).min(50.0) as usize, iters_for(target, per, plan.max_iters))
        }
        None => (plan.warmup, plan.iters.max(1)),
    };
    for _ in 0..warmup {
        f()?;
    }
    comm.barrier()?;
    let mut deltas = Vec::with_capacity(iters);
    let start = Instant::now();
    let mut prev = start;
    for _ in 0..iters {
        f()?;
        let now = Instant::now();
        deltas.push((now - prev).as_secs_f64() / div);
        prev = now;
    }
    let mean = (prev - start).as_secs_f64() / iters as f64 / div;
    let min = deltas.iter().copied().fold(f64::INFINITY, f64::min);
    let mut st = [median(&mut deltas), mean, min];
    let per_rank = gather_pairs(comm, [st[0], st[1]])?;
    max_over_ranks(comm, &mut st)?;
    Ok(Stats { median_s: st[0], mean_s: st[1], min_s: st[2], iters, per_rank })
}

fn time_sync(comm: &ProcessGroup, plan: &Plan, div: f64, f: &mut dyn FnMut() -> Result<()>) -> Result<Stats> {
    let iters = match plan.iters_time {
        Some(target) => {
            f()?;
            comm.barrier()?;
            let t = Instant::now();
            f()?;
            comm.barrier()?;
            let mut est = [t.elapsed().as_secs_f64()];
            max_over_ranks(comm, &mut est)?;
            iters_for(target, est[0], plan.sync_max_iters)
        }
        None => {
            for _ in 0..plan.warmup {
                f()?;
            }
            plan.iters.max(1)
        }
    };
    let mut stamps = vec![0i64; 2 * iters];
    for i in 0..iters {
        comm.barrier()?;
        stamps[2 * i] = mono_ns();
        f()?;
        stamps[2 * i + 1] = mono_ns();
    }
    let all = gather_i64(comm, &stamps)?;
    let n = comm.size();
    // Each rank's own entry-to-exit times, from the stamps every rank now has.
    let per_rank = all
        .chunks_exact(2 * iters)
        .map(|rank| {
            let mut own: Vec<f64> = rank.chunks_exact(2).map(|p| (p[1] - p[0]).max(0) as f64 * 1e-9 / div).collect();
            let own_mean = own.iter().sum::<f64>() / iters as f64;
            [median(&mut own), own_mean]
        })
        .collect();
    let mut lat: Vec<f64> = (0..iters)
        .map(|i| {
            let t0 = (0..n).map(|r| all[r * 2 * iters + 2 * i]).max().unwrap_or(0);
            let t1 = (0..n).map(|r| all[r * 2 * iters + 2 * i + 1]).max().unwrap_or(0);
            (t1 - t0).max(0) as f64 * 1e-9 / div
        })
        .collect();
    let mean = lat.iter().sum::<f64>() / iters as f64;
    let min = lat.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(Stats { median_s: median(&mut lat), mean_s: mean, min_s: min, iters, per_rank })
}

#[cfg(test)]
pub mod testing {
    //! Ranks as threads over the library's in-process backend, plugged in
    //! through a [`BackendFactory`]; one rank's backend may be wrapped in a
    //! [`Corrupting`] communicator to show that the checks catch a wrong
    //! result.

    use rankweave::backend::tcp::InProcessFactory;
    use rankweave::backend::{Backend, Call, Communicator};
    use rankweave::group::{BackendFactory, CpuFactory, GroupInfo};
    use rankweave::{DType, GroupOptions, HashStore, ProcessGroup, ReduceOp, Result, SharedStore, TransportKind};
    use std::sync::Arc;
    use std::time::Duration;

    /// Another backend whose all_reduce results come back with bit 6 of
    /// byte 0 flipped: a faulty backend, as the checks must see it.
    struct Corrupting(Box<dyn Communicator>);

    impl Communicator for Corrupting {
        fn name(&self) -> &'static str {
            "corrupting"
        }
        fn all_reduce(&mut self, call: Call, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
            self.0.all_reduce(call, buf, dtype, op)?;
            if let Some(b) = buf.first_mut() {
                *b ^= 0x40;
            }
            Ok(())
        }
        fn broadcast(&mut self, call: Call, buf: &mut [u8], root: usize) -> Result<()> {
            self.0.broadcast(call, buf, root)
        }
        fn all_gather(&mut self, call: Call, input: &[u8], output: &mut [u8]) -> Result<()> {
            self.0.all_gather(call, input, output)
        }
        fn gather(&mut self, call: Call, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()> {
            self.0.gather(call, input, output, root)
        }
        fn scatter(&mut self, call: Call, input: Option<&[u8]>, output: &mut [u8], root: usize) -> Result<()> {
            self.0.scatter(call, input, output, root)
        }
        fn reduce(&mut self, call: Call, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
            self.0.reduce(call, buf, dtype, op, root)
        }
        fn reduce_scatter(
            &mut self,
            call: Call,
            input: &[u8],
            output: &mut [u8],
            dtype: DType,
            op: ReduceOp,
        ) -> Result<()> {
            self.0.reduce_scatter(call, input, output, dtype, op)
        }
        fn all_to_all(&mut self, call: Call, input: &[u8], output: &mut [u8]) -> Result<()> {
            self.0.all_to_all(call, input, output)
        }
        fn barrier(&mut self, call: Call) -> Result<()> {
            self.0.barrier(call)
        }
        fn send(&mut self, call: Call, data: &[u8], dst: usize) -> Result<()> {
            self.0.send(call, data, dst)
        }
        fn recv(&mut self, call: Call, buf: &mut [u8], src: usize) -> Result<()> {
            self.0.recv(call, buf, src)
        }
    }

    /// In-process backends; the one of global rank `corrupt` is wrapped in
    /// [`Corrupting`].
    #[derive(Default)]
    struct Factory {
        mem: InProcessFactory,
        corrupt: Option<usize>,
    }

    impl BackendFactory for Factory {
        fn build(&self, g: &GroupInfo<'_>) -> Result<Backend> {
            let mut b = self.mem.build(g)?;
            if self.corrupt.is_some() && g.global_ranks.get(g.rank).copied() == self.corrupt {
                b.comm = Box::new(Corrupting(b.comm));
            }
            Ok(b)
        }
    }

    /// Runs `f` on every rank of an `n`-rank world of threads (rank
    /// `corrupt_rank`'s all_reduce corrupted); returns the results in rank order.
    pub fn run_world<R: Send>(n: usize, corrupt_rank: Option<usize>, f: impl Fn(&ProcessGroup) -> R + Sync) -> Vec<R> {
        run_world_with(Arc::new(Factory { corrupt: corrupt_rank, ..Factory::default() }), None, n, f)
    }

    /// [`run_world`] on the real CPU backends (`kind`: TCP or shared memory).
    pub fn run_cpu_world<R: Send>(kind: TransportKind, n: usize, f: impl Fn(&ProcessGroup) -> R + Sync) -> Vec<R> {
        run_world_with(Arc::new(CpuFactory), Some(kind), n, f)
    }

    fn run_world_with<R: Send>(
        factory: Arc<dyn BackendFactory>,
        kind: Option<TransportKind>,
        n: usize,
        f: impl Fn(&ProcessGroup) -> R + Sync,
    ) -> Vec<R> {
        let store: SharedStore = Arc::new(HashStore::new());
        let f = &f;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|r| {
                    let (factory, store) = (factory.clone(), store.clone());
                    s.spawn(move || {
                        let mut opts = GroupOptions { timeout: Duration::from_secs(60), ..GroupOptions::builtin() };
                        opts.transport = kind.unwrap_or_default();
                        let pg = ProcessGroup::new_world_with(factory, store, r, n, opts).expect("thread world");
                        f(&pg)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::run_world;
    use super::*;

    #[test]
    fn median_and_iteration_counts() {
        assert_eq!(median(&mut []), 0.0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(iters_for(0.2, 0.001, 1000), 200);
        assert_eq!(iters_for(0.2, 10.0, 1000), MIN_ITERS);
        assert_eq!(iters_for(0.2, 0.0, 1000), 1000);
        assert_eq!(iters_for(f64::NAN, 1.0, 50), MIN_ITERS);
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = mono_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(mono_ns() - a >= 2_000_000);
    }

    #[test]
    fn loop_mode_takes_the_slowest_rank() {
        let plan = Plan { iters: 5, warmup: 1, iters_time: None, max_iters: 100, sync_max_iters: 100 };
        let stats = run_world(2, None, |c| {
            let mut f = || -> Result<()> {
                if c.rank() == 1 {
                    std::thread::sleep(std::time::Duration::from_millis(3));
                }
                Ok(())
            };
            measure(c, Mode::Loop, &plan, 1.0, &mut f).unwrap()
        });
        assert_eq!(stats[0], stats[1], "identical on every rank");
        assert_eq!(stats[0].iters, 5);
        assert!(stats[0].median_s >= 0.003 && stats[0].min_s >= 0.003, "{:?}", stats[0]);
        // Each rank's own figures: rank 0 does not wait for rank 1 here.
        let own = &stats[0].per_rank;
        assert_eq!(own.len(), 2);
        assert!(own[1][0] >= 0.003 && own[1][1] >= 0.003, "{own:?}");
        assert!(own[0][0] < 0.003, "{own:?}");
    }

    #[test]
    fn sync_mode_measures_from_last_entry_to_last_exit() {
        let plan = Plan { iters: 4, warmup: 0, iters_time: None, max_iters: 100, sync_max_iters: 100 };
        let stats = run_world(3, None, |c| {
            let mut f = || -> Result<()> {
                if c.rank() == 2 {
                    std::thread::sleep(std::time::Duration::from_millis(4));
                }
                Ok(())
            };
            measure(c, Mode::Sync, &plan, 2.0, &mut f).unwrap()
        });
        assert_eq!(stats[0], stats[2]);
        assert_eq!(stats[0].iters, 4);
        // 4 ms on the slowest rank, halved by div = 2.
        assert!(stats[0].median_s >= 0.002 && stats[0].median_s < 0.05, "{:?}", stats[0]);
        // Only rank 2's own time holds the sleep.
        let own = &stats[0].per_rank;
        assert_eq!(own.len(), 3);
        assert!(own[2][0] >= 0.002 && own[2][1] >= 0.002, "{own:?}");
        assert!(own[0][0] < 0.002 && own[1][0] < 0.002, "{own:?}");
    }

    #[test]
    fn calibrated_iterations_fit_the_target() {
        let plan = Plan { iters: 1, warmup: 0, iters_time: Some(0.03), max_iters: 1000, sync_max_iters: 7 };
        let stats = run_world(2, None, |c| {
            let mut f = || -> Result<()> {
                std::thread::sleep(std::time::Duration::from_millis(1));
                Ok(())
            };
            let l = measure(c, Mode::Loop, &plan, 1.0, &mut f).unwrap();
            let s = measure(c, Mode::Sync, &plan, 1.0, &mut f).unwrap();
            (l, s)
        });
        let (l, s) = &stats[0];
        assert!((MIN_ITERS..=30).contains(&l.iters), "{l:?}");
        assert!((MIN_ITERS..=7).contains(&s.iters), "{s:?}");
    }
}
