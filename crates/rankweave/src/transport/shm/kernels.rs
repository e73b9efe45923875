//! Element reductions used by the shared-memory collectives.
//!
//! A minimal scalar stand-in with the same contract as the crate's reduce
//! kernels (`reduce_into(dst, src, dtype, op)`: `dst = dst op src`
//! element-wise, `Avg` sums; `finish_avg(buf, dtype, n)` divides by `n`,
//! truncating for integers; f16/bf16 combine in f32 and round once per step).
//! It goes away once the vectorized kernels in `crate::reduce` land.

use crate::dtype::DType;
use crate::reduce::ReduceOp;
use half::{bf16, f16};

#[inline(always)]
fn zip<T: bytemuck::Pod>(dst: &mut [u8], src: &[u8], f: impl Fn(T, T) -> T) {
    // Aligned buffers (the usual case) take a loop the compiler vectorizes.
    if let (Ok(d), Ok(s)) = (bytemuck::try_cast_slice_mut::<u8, T>(dst), bytemuck::try_cast_slice::<u8, T>(src)) {
        for (a, b) in d.iter_mut().zip(s) {
            *a = f(*a, *b);
        }
        return;
    }
    // A caller's byte buffer need not suit T's alignment: read and write unaligned.
    let n = dst.len() / std::mem::size_of::<T>();
    for i in 0..n {
        let r = i * std::mem::size_of::<T>()..(i + 1) * std::mem::size_of::<T>();
        let a: T = bytemuck::pod_read_unaligned(&dst[r.clone()]);
        let b: T = bytemuck::pod_read_unaligned(&src[r.clone()]);
        dst[r].copy_from_slice(bytemuck::bytes_of(&f(a, b)));
    }
}

macro_rules! int_op {
    ($t:ty, $dst:expr, $src:expr, $op:expr) => {
        match $op {
            ReduceOp::Sum | ReduceOp::Avg => zip::<$t>($dst, $src, |a, b| a.wrapping_add(b)),
            ReduceOp::Prod => zip::<$t>($dst, $src, |a, b| a.wrapping_mul(b)),
            ReduceOp::Min => zip::<$t>($dst, $src, |a, b| a.min(b)),
            ReduceOp::Max => zip::<$t>($dst, $src, |a, b| a.max(b)),
        }
    };
}

macro_rules! float_op {
    ($t:ty, $dst:expr, $src:expr, $op:expr, $to:expr, $from:expr) => {
        match $op {
            ReduceOp::Sum | ReduceOp::Avg => zip::<$t>($dst, $src, |a, b| $from($to(a) + $to(b))),
            ReduceOp::Prod => zip::<$t>($dst, $src, |a, b| $from($to(a) * $to(b))),
            ReduceOp::Min => zip::<$t>($dst, $src, |a, b| if $to(b) < $to(a) { b } else { a }),
            ReduceOp::Max => zip::<$t>($dst, $src, |a, b| if $to(b) > $to(a) { b } else { a }),
        }
    };
}

/// `dst = dst op src`, element-wise; both the same length, a multiple of the element size.
pub(crate) fn reduce_into(dst: &mut [u8], src: &[u8], dtype: DType, op: ReduceOp) {
    debug_assert_eq!(dst.len(), src.len());
    match dtype {
        DType::F32 => float_op!(f32, dst, src, op, |x: f32| x, |x: f32| x),
        DType::F64 => float_op!(f64, dst, src, op, |x: f64| x, |x: f64| x),
        DType::F16 => {
            float_op!(u16, dst, src, op, |x: u16| f16::from_bits(x).to_f32(), |x: f32| f16::from_f32(x).to_bits())
        }
        DType::BF16 => {
            float_op!(u16, dst, src, op, |x: u16| bf16::from_bits(x).to_f32(), |x: f32| bf16::from_f32(x).to_bits())
        }
        DType::I8 => int_op!(i8, dst, src, op),
        DType::U8 => int_op!(u8, dst, src, op),
        DType::I32 => int_op!(i32, dst, src, op),
        DType::I64 => int_op!(i64, dst, src, op),
    }
}

fn map<T: bytemuck::Pod>(buf: &mut [u8], f: impl Fn(T) -> T) {
    for c in buf.chunks_exact_mut(std::mem::size_of::<T>()) {
        let a: T = bytemuck::pod_read_unaligned(c);
        c.copy_from_slice(bytemuck::bytes_of(&f(a)));
    }
}

/// Divides every element by `n` (the `Avg` epilogue; integers truncate).
pub(crate) fn finish_avg(buf: &mut [u8], dtype: DType, n: usize) {
    match dtype {
        DType::F32 => map::<f32>(buf, |x| x / n as f32),
        DType::F64 => map::<f64>(buf, |x| x / n as f64),
        DType::F16 => map::<u16>(buf, |x| f16::from_f32(f16::from_bits(x).to_f32() / n as f32).to_bits()),
        DType::BF16 => map::<u16>(buf, |x| bf16::from_f32(bf16::from_bits(x).to_f32() / n as f32).to_bits()),
        DType::I8 => map::<i8>(buf, |x| (x as i64 / n as i64) as i8),
        DType::U8 => map::<u8>(buf, |x| (x as u64 / n as u64) as u8),
        DType::I32 => map::<i32>(buf, |x| (x as i64 / n as i64) as i32),
        DType::I64 => map::<i64>(buf, |x| x / n as i64),
    }
}
