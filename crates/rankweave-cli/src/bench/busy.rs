//! `--busy-threads N`: CPU-bound threads in the spawning process while its
//! ranks run, the way an engine's other threads or another program share
//! the cores with the ranks. What it shows: how a wait behaves when the
//! task queued beside a rank is not a peer rank (`docs/PERFORMANCE.md`,
//! run 19). Each thread stops when the run ends, and after [`MAX_RUN`] in
//! any case.

use rankweave::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The longest a busy thread runs, whatever the run does.
pub const MAX_RUN: Duration = Duration::from_secs(3600);

/// Text added to the note of every record measured beside busy threads.
pub fn tag(n: usize) -> String {
    format!("{n} busy thread{} beside the ranks", if n == 1 { "" } else { "s" })
}

/// Running busy threads; dropping them stops and joins them.
#[derive(Debug)]
pub struct BusyThreads {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<u64>>,
}

impl BusyThreads {
    /// Starts `n` threads that compute until stopped, or for `max_run`.
    pub fn start(n: usize, max_run: Duration) -> Result<BusyThreads> {
        let mut busy = BusyThreads { stop: Arc::new(AtomicBool::new(false)), threads: Vec::with_capacity(n) };
        for i in 0..n {
            let stop = busy.stop.clone();
            let t = std::thread::Builder::new()
                .name(format!("busy-{i}"))
                .spawn(move || spin_until(&stop, Instant::now() + max_run))
                .map_err(|e| Error::invalid(format!("--busy-threads: thread {i} not started: {e}")))?;
            busy.threads.push(t);
        }
        Ok(busy)
    }

    /// Stops and joins the threads; returns how many rounds of work each did.
    pub fn stop(mut self) -> Vec<u64> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.drain(..).map(|t| t.join().unwrap_or(0)).collect()
    }
}

impl Drop for BusyThreads {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Rounds of integer work (about a microsecond each) until `stop` or `end`.
fn spin_until(stop: &AtomicBool, end: Instant) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rounds = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..1024 {
            x = std::hint::black_box(x.rotate_left(5) ^ 0x2545_f491_4f6c_dd1d).wrapping_mul(3);
        }
        rounds += 1;
        if rounds % 1024 == 0 && Instant::now() >= end {
            break;
        }
    }
    std::hint::black_box(x);
    rounds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_threads_compute_until_stopped() {
        let busy = BusyThreads::start(2, MAX_RUN).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let rounds = busy.stop();
        assert_eq!(rounds.len(), 2);
        assert!(rounds.iter().all(|&r| r > 0), "{rounds:?}");
    }

    #[test]
    fn busy_threads_stop_at_their_time_limit_and_on_drop() {
        let start = Instant::now();
        let busy = BusyThreads::start(1, Duration::from_millis(20)).unwrap();
        while !busy.threads[0].is_finished() {
            assert!(start.elapsed() < Duration::from_secs(30), "the thread ignored its limit");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(busy);
        let busy = BusyThreads::start(1, MAX_RUN).unwrap();
        drop(busy);
        assert!(start.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn the_tag_names_the_count() {
        assert_eq!(tag(1), "1 busy thread beside the ranks");
        assert_eq!(tag(2), "2 busy threads beside the ranks");
    }
}
