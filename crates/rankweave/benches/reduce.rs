//! Reduction kernel throughput: `reduce_into` at 1 MiB per dtype and op,
//! against a plain copy of the same bytes.
//!
//! Run: `cargo bench -p rankweave --bench reduce`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rankweave::reduce::{finish_avg, reduce_into};
use rankweave::{DType, ReduceOp};

const BYTES: usize = 1 << 20;

/// Small values valid in every dtype, so no NaN/inf/denormal slows floats.
fn data(dtype: DType, seed: u8) -> Vec<u8> {
    let es = dtype.size();
    let mut v = vec![0u8; BYTES];
    let one: Vec<u8> = match dtype {
        DType::F32 => 1.5f32.to_ne_bytes().to_vec(),
        DType::F64 => 1.5f64.to_ne_bytes().to_vec(),
        DType::F16 => half::f16::from_f32(1.5).to_ne_bytes().to_vec(),
        DType::BF16 => half::bf16::from_f32(1.5).to_ne_bytes().to_vec(),
        DType::I8 | DType::U8 => vec![seed],
        DType::I32 => (seed as i32).to_ne_bytes().to_vec(),
        DType::I64 => (seed as i64).to_ne_bytes().to_vec(),
    };
    for c in v.chunks_exact_mut(es) {
        c.copy_from_slice(&one);
    }
    v
}

fn kernels(c: &mut Criterion) {
    let mut g = c.benchmark_group("reduce_1MiB");
    for dtype in DType::ALL {
        g.throughput(Throughput::Elements((BYTES / dtype.size()) as u64));
        let src = data(dtype, 3);
        let mut dst = data(dtype, 1);
        for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max] {
            g.bench_with_input(BenchmarkId::new(op.name(), dtype.name()), &src, |b, src| {
                // Sums and products grow to inf (floats) or wrap (integers)
                // over the iterations; neither slows x86 arithmetic (only
                // subnormals would), so the timing is representative.
                b.iter(|| reduce_into(black_box(&mut dst), black_box(src), dtype, op))
            });
        }
        g.bench_function(BenchmarkId::new("avg_finish", dtype.name()), |b| {
            b.iter(|| finish_avg(black_box(&mut dst), dtype, 3))
        });
        g.bench_with_input(BenchmarkId::new("memcpy", dtype.name()), &src, |b, src| {
            b.iter(|| dst.copy_from_slice(black_box(src)))
        });
    }
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
