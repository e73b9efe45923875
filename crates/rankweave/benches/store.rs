//! Store micro-benchmarks: set, get, add and check on the in-process store
//! and on the TCP store over loopback.
//!
//! Run with `cargo bench -p rankweave --bench store`. Each operation is
//! measured on a warm store (the key exists), so the numbers are the cost of
//! one request: a lock and a hash-map access for the in-process store, one
//! request/reply round trip to a server in this process for the TCP store.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rankweave::store::TcpStore;
use rankweave::{HashStore, Store};
use std::hint::black_box;
use std::time::Duration;

fn store_ops(c: &mut Criterion, name: &str, store: &dyn Store) {
    let mut g = c.benchmark_group(format!("store/{name}"));
    g.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(300));
    for size in [8usize, 1024, 64 * 1024] {
        let value = vec![7u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("set", size), &value, |b, v| {
            b.iter(|| store.set(black_box("bench/key"), black_box(v)).expect("set"))
        });
        store.set("bench/key", &value).expect("set");
        g.bench_with_input(BenchmarkId::new("get", size), &size, |b, _| {
            b.iter(|| black_box(store.get_timeout(black_box("bench/key"), Duration::from_secs(5)).expect("get")))
        });
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("add", |b| b.iter(|| black_box(store.add(black_box("bench/counter"), 1).expect("add"))));
    g.bench_function("check", |b| b.iter(|| black_box(store.check(black_box(&["bench/key"])).expect("check"))));
    g.finish();
}

fn hash_store(c: &mut Criterion) {
    let store = HashStore::new();
    store_ops(c, "hash", &store);
}

fn tcp_store(c: &mut Criterion) {
    let store = TcpStore::new("127.0.0.1", 0, true, Duration::from_secs(30)).expect("start a TCP store on 127.0.0.1");
    store_ops(c, "tcp", &store);
}

criterion_group!(benches, hash_store, tcp_store);
criterion_main!(benches);
