//! f32 sum all_reduce through [`ProcessGroup`] over shared memory and over
//! TCP, ranks as threads (loop mode as in the bench anchors: back-to-back
//! calls, each rank's median per-call time, the maximum over ranks).
//!
//! `cargo run --release -p rankweave --example group_transport_bench [RANKS]`
//!
//! Prints CSV: `transport,ranks,bytes,iters,median_us,busbw_GBps`.
//!
//! Measured 2026-11-29 08:18 UTC on the project's 2-core VM, idle (load 0.2),
//! 2 thread-ranks (two runs; `rankweave bench all_reduce --nproc 2 --sizes
//! 8,4K,1M,64M --mode loop --iters-time 0.3 --transport shm,tcp`, 2 processes,
//! in brackets):
//!
//! | bytes  | shm median       | shm busbw     | tcp median       | tcp busbw     |
//! |--------|------------------|---------------|------------------|---------------|
//! | 8      | 0.15-0.16 us [0.16] | -          | 17-23 us [16.6]  | -             |
//! | 4 KiB  | 0.75-0.78 us [0.76] | 5.2-5.5 GB/s | 25-29 us [19.2] | 0.14-0.16 GB/s |
//! | 1 MiB  | 52 us [52.1]     | 20.1 GB/s [20.1] | 180-352 us [183] | 3.0-5.8 GB/s [5.7] |
//! | 64 MiB | 7.4 ms [8.0]     | 9.0 GB/s [8.3] | 22-46 ms [25.9] | 1.5-3.0 GB/s [2.6] |

use rankweave::{GroupOptions, HashStore, ProcessGroup, ReduceOp, SharedStore, TransportKind};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Max over ranks of the median time (us) of one all_reduce of `bytes`.
fn bench(n: usize, kind: TransportKind, bytes: usize, iters: usize) -> f64 {
    let store: SharedStore = Arc::new(HashStore::new());
    let hs: Vec<_> = (0..n)
        .map(|r| {
            let store = store.clone();
            std::thread::spawn(move || {
                let opts = GroupOptions { timeout: Duration::from_secs(120), transport: kind, ..Default::default() };
                let g = ProcessGroup::new_world(store, r, n, opts).expect("new_world");
                assert_eq!(g.transport_kind(), kind, "RANKWEAVE_TRANSPORT overrides the requested transport");
                // Zeros stay zeros: no overflow, no denormals.
                let mut buf = vec![0f32; bytes / 4];
                for _ in 0..iters / 10 + 5 {
                    g.all_reduce(&mut buf, ReduceOp::Sum).expect("all_reduce");
                }
                g.barrier().expect("barrier");
                let mut t = Vec::with_capacity(iters);
                let mut last = Instant::now();
                for _ in 0..iters {
                    g.all_reduce(&mut buf, ReduceOp::Sum).expect("all_reduce");
                    let now = Instant::now();
                    t.push((now - last).as_secs_f64() * 1e6);
                    last = now;
                }
                median(t)
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().expect("rank")).fold(0.0, f64::max)
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    println!("transport,ranks,bytes,iters,median_us,busbw_GBps");
    for kind in [TransportKind::Shm, TransportKind::Tcp] {
        for bytes in [8usize, 4 << 10, 1 << 20, 64 << 20] {
            let iters = match bytes {
                b if b <= 4 << 10 => 20000,
                b => ((512 << 20) / b).max(20),
            };
            let us = bench(n, kind, bytes, iters);
            let busbw = bytes as f64 / (us * 1e-6) * 2.0 * (n - 1) as f64 / n as f64 / 1e9;
            println!("{kind},{n},{bytes},{iters},{us:.3},{busbw:.3}");
        }
    }
}
