//! Shared-memory latency and bandwidth, ranks as threads (loop mode, as in
//! the bench anchors: back-to-back calls, the median of each rank's
//! per-call times, the maximum over ranks).
//!
//! `cargo run --release -p rankweave --example shm_bench`
//! (`SHM_BENCH_SIZES=8,1024` picks the all_reduce sizes,
//! `SHM_BENCH_DIRECT=BYTES` the largest all_reduce on the one-step path).

use rankweave::collectives::shm::{ShmComm, ShmOptions};
use rankweave::message_queue::{MessageQueue, MqOptions, DEFAULT_MAX_CHUNKS, DEFAULT_MAX_CHUNK_BYTES};
use rankweave::{DType, HashStore, ReduceOp};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if std::env::var("SHM_BENCH_PCT").is_ok() {
        let p = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
        eprintln!("  p10 {:.3} p25 {:.3} p50 {:.3} p75 {:.3} p90 {:.3}", p(0.1), p(0.25), p(0.5), p(0.75), p(0.9));
    }
    v[v.len() / 2]
}

/// Runs `iters` timed calls of `f` on every rank; returns max over ranks of the median per-call time (us).
fn run_ranks<S: Send + 'static>(
    states: Vec<S>,
    iters: usize,
    warmup: usize,
    f: impl Fn(&mut S) + Send + Sync + 'static,
) -> f64 {
    let f = Arc::new(f);
    let hs: Vec<_> = states
        .into_iter()
        .map(|mut s| {
            let f = f.clone();
            std::thread::spawn(move || {
                for _ in 0..warmup {
                    f(&mut s);
                }
                let mut t = Vec::with_capacity(iters);
                let mut last = Instant::now();
                for _ in 0..iters {
                    f(&mut s);
                    let now = Instant::now();
                    t.push((now - last).as_secs_f64() * 1e6);
                    last = now;
                }
                median(t)
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).fold(0.0, f64::max)
}

fn comms(n: usize) -> Vec<ShmComm> {
    let store = Arc::new(HashStore::new());
    let hs: Vec<_> = (0..n)
        .map(|r| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut opts = ShmOptions { timeout: Duration::from_secs(60), ..Default::default() };
                if let Some(b) = std::env::var("SHM_BENCH_DIRECT").ok().and_then(|v| v.parse().ok()) {
                    opts.direct_all_reduce_bytes = b;
                }
                ShmComm::create(r, n, "bench", &*store, "k", &opts).unwrap()
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

#[derive(Serialize, Deserialize)]
struct Small {
    rank: u32,
    step: u64,
    name: String,
    ids: Vec<u32>,
    flag: bool,
    req: String,
    pad: [u64; 6],
}

/// A request-like object of about 100 bytes (postcard).
fn small() -> Small {
    Small {
        rank: 0,
        step: 12345,
        name: "decode".into(),
        ids: vec![1, 2, 3, 4],
        flag: true,
        req: "req-0001-abcdefgh".into(),
        pad: [u64::MAX; 6],
    }
}

fn main() {
    println!("op,ranks,bytes,median_us,busbw_GBps");
    let sizes: Vec<usize> = match std::env::var("SHM_BENCH_SIZES") {
        Ok(v) => v.split(',').filter_map(|s| s.parse().ok()).collect(),
        Err(_) => vec![8, 1 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20],
    };
    for bytes in sizes {
        let n = 2;
        let iters = if bytes <= 1 << 16 { 20000 } else { (256 << 20) / bytes }.max(20);
        let states: Vec<(ShmComm, Vec<u8>)> = comms(n)
            .into_iter()
            .map(|c| {
                // Zeros stay zeros: no overflow, no denormals, across iterations.
                (c, vec![0u8; bytes])
            })
            .collect();
        let us = run_ranks(states, iters, iters / 10 + 10, |(c, buf)| {
            c.all_reduce(buf, DType::F32, ReduceOp::Sum).unwrap();
        });
        let busbw = bytes as f64 / (us * 1e-6) * 2.0 * (n - 1) as f64 / n as f64 / 1e9;
        println!("shm_all_reduce_f32_sum,{n},{bytes},{us:.3},{busbw:.3}");
    }

    // More ranks than cores: must not crawl.
    for n in [4usize, 8] {
        for bytes in [8usize, 1 << 20] {
            let iters = if bytes == 8 { 5000 } else { 100 };
            let states: Vec<(ShmComm, Vec<u8>)> = comms(n).into_iter().map(|c| (c, vec![0u8; bytes])).collect();
            let us = run_ranks(states, iters, iters / 10, |(c, buf)| {
                c.all_reduce(buf, DType::F32, ReduceOp::Sum).unwrap();
            });
            let busbw = bytes as f64 / (us * 1e-6) * 2.0 * (n - 1) as f64 / n as f64 / 1e9;
            println!("shm_all_reduce_f32_sum,{n},{bytes},{us:.3},{busbw:.3}");
        }
    }

    // One-way latency: ping-pong over two queues, half the round trip.
    {
        let o = MqOptions {
            timeout: Duration::from_secs(60),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        let (a, ha) = MessageQueue::new_writer(1, 0, DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_CHUNKS, o.clone()).unwrap();
        let (b, hb) = MessageQueue::new_writer(1, 0, DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_CHUNKS, o.clone()).unwrap();
        let a_reader = MessageQueue::from_handle(&ha, 1, o.clone()).unwrap();
        let b_reader = MessageQueue::from_handle(&hb, 1, o).unwrap();
        let iters = 20000;
        let echo = std::thread::spawn(move || {
            for _ in 0..iters + 1000 {
                let s: Small = a_reader.dequeue().unwrap();
                b.enqueue(&s).unwrap();
            }
        });
        let mut t = Vec::with_capacity(iters);
        for i in 0..iters + 1000 {
            let t0 = Instant::now();
            a.enqueue(&small()).unwrap();
            let _: Small = b_reader.dequeue().unwrap();
            if i >= 1000 {
                t.push(t0.elapsed().as_secs_f64() * 1e6 / 2.0);
            }
        }
        echo.join().unwrap();
        println!("mq_object_one_way_pingpong,2,{},{:.3},", postcard::to_allocvec(&small()).unwrap().len(), median(t));
    }

    for readers in [1usize, 3] {
        let o = MqOptions {
            timeout: Duration::from_secs(60),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        let (w, h) =
            MessageQueue::new_writer(readers, 0, DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_CHUNKS, o.clone()).unwrap();
        let mut qs = vec![w];
        qs.extend((1..=readers).map(|r| MessageQueue::from_handle(&h, r, o.clone()).unwrap()));
        let len = postcard::to_allocvec(&small()).unwrap().len();
        let us = run_ranks(qs, 20000, 2000, move |q| {
            if q.is_writer() {
                q.enqueue(&small()).unwrap();
            } else {
                let got: Small = q.dequeue().unwrap();
                assert_eq!(got.step, 12345);
            }
        });
        println!("mq_broadcast_object,{},{len},{us:.3},", readers + 1);

        let (w, h) =
            MessageQueue::new_writer(readers, 0, DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_CHUNKS, o.clone()).unwrap();
        let mut qs = vec![w];
        qs.extend((1..=readers).map(|r| MessageQueue::from_handle(&h, r, o.clone()).unwrap()));
        let big = Arc::new(vec![b'x'; 1 << 20]);
        let us = run_ranks(qs, 500, 50, move |q| {
            if q.is_writer() {
                q.enqueue_bytes(&big).unwrap();
            } else {
                // A copy out, as a Python reader's bytes object would be.
                assert_eq!(q.dequeue_bytes().unwrap().len(), 1 << 20);
            }
        });
        println!("mq_enqueue_bytes,{},{},{us:.3},{:.3}", readers + 1, 1 << 20, (1 << 20) as f64 / us / 1e3);
    }
}
