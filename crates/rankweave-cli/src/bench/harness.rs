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

use rankweave::{DType, ProcessGroup, ReduceOp, Result};
use std::time::Instant;

/// The group operations the benchmark drives. [`ProcessGroup`] implements
/// it; the unit tests implement it with threads.
pub trait Comm {
    /// This rank's position in the group.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// In-place all_reduce.
    fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()>;
    /// In-place broadcast.
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// all_gather; `output.len() == size * input.len()`.
    fn all_gather_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()>;
    /// gather to `root`.
    fn gather_bytes(&self, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()>;
    /// In-place reduce to `root`.
    fn reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()>;
    /// reduce_scatter; `input.len() == size * output.len()`.
    fn reduce_scatter_bytes(&self, input: &[u8], output: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()>;
    /// all_to_all.
    fn all_to_all_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()>;
    /// Point-to-point send.
    fn send_bytes(&self, data: &[u8], dst: usize) -> Result<()>;
    /// Point-to-point receive.
    fn recv_bytes(&self, buf: &mut [u8], src: usize) -> Result<()>;
    /// Returns once every rank entered.
    fn barrier(&self) -> Result<()>;
}

impl Comm for ProcessGroup {
    fn rank(&self) -> usize {
        ProcessGroup::rank(self)
    }
    fn size(&self) -> usize {
        ProcessGroup::size(self)
    }
    fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        ProcessGroup::all_reduce_bytes(self, buf, dtype, op)
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        ProcessGroup::broadcast_bytes(self, buf, root)
    }
    fn all_gather_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()> {
        ProcessGroup::all_gather_bytes(self, input, output)
    }
    fn gather_bytes(&self, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()> {
        ProcessGroup::gather_bytes(self, input, output, root)
    }
    fn reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
        ProcessGroup::reduce_bytes(self, buf, dtype, op, root)
    }
    fn reduce_scatter_bytes(&self, input: &[u8], output: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        ProcessGroup::reduce_scatter_bytes(self, input, output, dtype, op)
    }
    fn all_to_all_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()> {
        ProcessGroup::all_to_all_bytes(self, input, output)
    }
    fn send_bytes(&self, data: &[u8], dst: usize) -> Result<()> {
        ProcessGroup::send_bytes(self, data, dst)
    }
    fn recv_bytes(&self, buf: &mut [u8], src: usize) -> Result<()> {
        ProcessGroup::recv_bytes(self, buf, src)
    }
    fn barrier(&self) -> Result<()> {
        ProcessGroup::barrier(self)
    }
}

/// Element-wise maximum of `vals` over all ranks, in place.
pub fn max_over_ranks(comm: &dyn Comm, vals: &mut [f64]) -> Result<()> {
    comm.all_reduce_bytes(bytemuck::cast_slice_mut(vals), DType::F64, ReduceOp::Max)
}

/// Sum of `v` over all ranks.
pub fn sum_over_ranks(comm: &dyn Comm, v: u64) -> Result<u64> {
    let mut x = [i64::try_from(v).unwrap_or(i64::MAX)];
    comm.all_reduce_bytes(bytemuck::cast_slice_mut(&mut x), DType::I64, ReduceOp::Sum)?;
    Ok(x[0].max(0) as u64)
}

/// Every rank's `vals`, rank after rank.
pub fn gather_i64(comm: &dyn Comm, vals: &[i64]) -> Result<Vec<i64>> {
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
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Median seconds per operation.
    pub median_s: f64,
    /// Mean seconds per operation.
    pub mean_s: f64,
    /// Fastest operation, seconds.
    pub min_s: f64,
    /// Timed iterations.
    pub iters: usize,
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
fn estimate(comm: &dyn Comm, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
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
pub fn measure(comm: &dyn Comm, mode: Mode, plan: &Plan, div: f64, f: &mut dyn FnMut() -> Result<()>) -> Result<Stats> {
    match mode {
        Mode::Loop => time_loop(comm, plan, div, f),
        Mode::Sync => time_sync(comm, plan, div, f),
    }
}

fn time_loop(comm: &dyn Comm, plan: &Plan, div: f64, f: &mut dyn FnMut() -> Result<()>) -> Result<Stats> {
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
    max_over_ranks(comm, &mut st)?;
    Ok(Stats { median_s: st[0], mean_s: st[1], min_s: st[2], iters })
}

fn time_sync(comm: &dyn Comm, plan: &Plan, div: f64, f: &mut dyn FnMut() -> Result<()>) -> Result<Stats> {
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
    let mut lat: Vec<f64> = (0..iters)
        .map(|i| {
            let t0 = (0..n).map(|r| all[r * 2 * iters + 2 * i]).max().unwrap_or(0);
            let t1 = (0..n).map(|r| all[r * 2 * iters + 2 * i + 1]).max().unwrap_or(0);
            (t1 - t0).max(0) as f64 * 1e-9 / div
        })
        .collect();
    let mean = lat.iter().sum::<f64>() / iters as f64;
    let min = lat.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(Stats { median_s: median(&mut lat), mean_s: mean, min_s: min, iters })
}

#[cfg(test)]
pub mod testing {
    //! Ranks as threads over one shared board: each collective deposits
    //! every rank's input, waits for all, and computes its result from the
    //! deposits. Slow, simple and obviously correct; enough to exercise the
    //! harness and the checks before a real group exists.

    use super::Comm;
    use crate::bench::ops::Num;
    use rankweave::{DType, Error, ReduceOp, Result};
    use std::sync::{Arc, Barrier, Mutex};

    struct Shared {
        barrier: Barrier,
        slots: Mutex<Vec<Vec<u8>>>,
        mail: Mutex<Vec<Vec<Option<Vec<u8>>>>>,
        mail_cv: std::sync::Condvar,
    }

    /// One rank of a thread world.
    pub struct ThreadComm {
        rank: usize,
        n: usize,
        shared: Arc<Shared>,
        /// When set, all_reduce adds 1 to element 0 on this rank (to test #wrong).
        pub corrupt: bool,
    }

    /// `n` connected ranks.
    pub fn world(n: usize) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            barrier: Barrier::new(n),
            slots: Mutex::new(vec![Vec::new(); n]),
            mail: Mutex::new(vec![vec![None; n]; n]),
            mail_cv: std::sync::Condvar::new(),
        });
        (0..n).map(|rank| ThreadComm { rank, n, shared: shared.clone(), corrupt: false }).collect()
    }

    fn reduce_into(dtype: DType, op: ReduceOp, n: usize, parts: &[&[u8]], out: &mut [u8]) {
        macro_rules! go {
            ($T:ty) => {{
                let outs: &mut [$T] = bytemuck::cast_slice_mut(out);
                for (i, o) in outs.iter_mut().enumerate() {
                    let vals = parts.iter().map(|p| {
                        let s: &[$T] = bytemuck::cast_slice(p);
                        s[i].to_f64()
                    });
                    let v = match op {
                        ReduceOp::Sum => vals.sum::<f64>(),
                        ReduceOp::Prod => vals.product::<f64>(),
                        ReduceOp::Min => vals.fold(f64::INFINITY, f64::min),
                        ReduceOp::Max => vals.fold(f64::NEG_INFINITY, f64::max),
                        ReduceOp::Avg => {
                            let s = vals.sum::<f64>() / n as f64;
                            if dtype.is_float() {
                                s
                            } else {
                                s.trunc()
                            }
                        }
                    };
                    *o = <$T as Num>::from_f64(v);
                }
            }};
        }
        match dtype {
            DType::F32 => go!(f32),
            DType::F64 => go!(f64),
            DType::F16 => go!(half::f16),
            DType::BF16 => go!(half::bf16),
            DType::I8 => go!(i8),
            DType::U8 => go!(u8),
            DType::I32 => go!(i32),
            DType::I64 => go!(i64),
        }
    }

    impl ThreadComm {
        /// Deposits `data`, waits for everyone, runs `f` on all deposits,
        /// waits again so the slots can be reused.
        fn exchange<R>(&self, data: Vec<u8>, f: impl FnOnce(&[Vec<u8>]) -> R) -> R {
            self.shared.slots.lock().unwrap()[self.rank] = data;
            self.shared.barrier.wait();
            let r = {
                let slots = self.shared.slots.lock().unwrap().clone();
                f(&slots)
            };
            self.shared.barrier.wait();
            r
        }
    }

    impl Comm for ThreadComm {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.n
        }
        fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
            let n = self.n;
            self.exchange(buf.to_vec(), |s| {
                let parts: Vec<&[u8]> = s.iter().map(|v| v.as_slice()).collect();
                reduce_into(dtype, op, n, &parts, buf)
            });
            if self.corrupt && !buf.is_empty() {
                buf[0] ^= 0x40;
            }
            Ok(())
        }
        fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
            self.exchange(buf.to_vec(), |s| buf.copy_from_slice(&s[root]));
            Ok(())
        }
        fn all_gather_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()> {
            if output.len() != self.n * input.len() {
                return Err(Error::invalid("all_gather: output size"));
            }
            self.exchange(input.to_vec(), |s| {
                for (r, part) in s.iter().enumerate() {
                    output[r * input.len()..(r + 1) * input.len()].copy_from_slice(part);
                }
            });
            Ok(())
        }
        fn gather_bytes(&self, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()> {
            self.exchange(input.to_vec(), |s| {
                if let Some(out) = output {
                    assert_eq!(self.rank, root);
                    for (r, part) in s.iter().enumerate() {
                        out[r * input.len()..(r + 1) * input.len()].copy_from_slice(part);
                    }
                }
            });
            Ok(())
        }
        fn reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
            let n = self.n;
            let me = self.rank;
            self.exchange(buf.to_vec(), |s| {
                if me == root {
                    let parts: Vec<&[u8]> = s.iter().map(|v| v.as_slice()).collect();
                    reduce_into(dtype, op, n, &parts, buf)
                }
            });
            Ok(())
        }
        fn reduce_scatter_bytes(&self, input: &[u8], output: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
            let (n, me, blk) = (self.n, self.rank, output.len());
            self.exchange(input.to_vec(), |s| {
                let parts: Vec<&[u8]> = s.iter().map(|v| &v[me * blk..(me + 1) * blk]).collect();
                reduce_into(dtype, op, n, &parts, output)
            });
            Ok(())
        }
        fn all_to_all_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()> {
            let (n, me) = (self.n, self.rank);
            let blk = input.len() / n;
            self.exchange(input.to_vec(), |s| {
                for (src, part) in s.iter().enumerate() {
                    output[src * blk..(src + 1) * blk].copy_from_slice(&part[me * blk..(me + 1) * blk]);
                }
            });
            Ok(())
        }
        fn send_bytes(&self, data: &[u8], dst: usize) -> Result<()> {
            let mut mail = self.shared.mail.lock().unwrap();
            while mail[self.rank][dst].is_some() {
                mail = self.shared.mail_cv.wait(mail).unwrap();
            }
            mail[self.rank][dst] = Some(data.to_vec());
            self.shared.mail_cv.notify_all();
            Ok(())
        }
        fn recv_bytes(&self, buf: &mut [u8], src: usize) -> Result<()> {
            let mut mail = self.shared.mail.lock().unwrap();
            loop {
                if let Some(m) = mail[src][self.rank].take() {
                    buf.copy_from_slice(&m);
                    self.shared.mail_cv.notify_all();
                    return Ok(());
                }
                mail = self.shared.mail_cv.wait(mail).unwrap();
            }
        }
        fn barrier(&self) -> Result<()> {
            self.shared.barrier.wait();
            Ok(())
        }
    }

    /// Runs `f` on every rank of an `n`-rank thread world; returns the results in rank order.
    pub fn run_world<R: Send>(n: usize, corrupt_rank: Option<usize>, f: impl Fn(&ThreadComm) -> R + Sync) -> Vec<R> {
        let mut comms = world(n);
        if let Some(c) = corrupt_rank {
            comms[c].corrupt = true;
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = comms.iter().map(|c| s.spawn(|| f(c))).collect();
            handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
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
        let (l, s) = stats[0];
        assert!((MIN_ITERS..=30).contains(&l.iters), "{l:?}");
        assert!((MIN_ITERS..=7).contains(&s.iters), "{s:?}");
    }
}
