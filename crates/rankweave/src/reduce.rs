//! Reduction operators and the element kernels that apply them.
//!
//! All reductions in the crate go through [`reduce_into`], so every rank
//! combines values in the same order and results are bitwise identical.

use crate::dtype::{DType, Element};
use bytemuck::Pod;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// A reduction operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise product.
    Prod,
    /// Element-wise minimum.
    Min,
    /// Element-wise maximum.
    Max,
    /// Sum divided by the group size (integers: truncating division).
    Avg,
}

impl ReduceOp {
    /// Every operator.
    pub const ALL: [ReduceOp; 5] = [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max, ReduceOp::Avg];

    /// nccl-tests' name: `sum`, `prod`, `min`, `max`, `avg`.
    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
            ReduceOp::Avg => "avg",
        }
    }
}

impl std::fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ReduceOp {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "sum" => ReduceOp::Sum,
            "prod" => ReduceOp::Prod,
            "min" => ReduceOp::Min,
            "max" => ReduceOp::Max,
            "avg" | "mean" => ReduceOp::Avg,
            o => {
                return Err(crate::Error::invalid(format!(
                    "unknown reduce op `{o}`; expected sum, prod, min, max or avg"
                )))
            }
        })
    }
}
// ---------------------------------------------------------------------------
// Kernels
//
// Every kernel is a plain zip loop over two slices of one element type, with
// the operator chosen once per call (outside the loop), so LLVM turns each
// loop into packed SIMD in the release build. Checked with
// `cargo rustc --release -p rankweave --lib -- --emit asm` on x86-64 (default
// target, SSE2 only): the f32 Sum loop is unrolled into `addps` on xmm
// registers (four `movups`/`addps` pairs per iteration), f64 uses `addpd`,
// i32 `paddd`, i8/u8 `paddb`; Min/Max compile to `cmpltps`/`cmpunordps` plus
// bitwise blends; f16 goes through `half`'s slice conversion (F16C when the
// CPU has it) and the same f32 loop. With `-C target-cpu=native` the same
// loops use `vaddps` on ymm registers.
// ---------------------------------------------------------------------------

/// Elements per stack chunk for the unaligned path and for f16/bf16 widening.
const CHUNK: usize = 512;

/// Combines `src` into `dst` element-wise: `dst[i] = dst[i] op src[i]`.
///
/// Both slices hold elements of `dtype` as raw (native-endian) bytes and may
/// have any alignment. [`ReduceOp::Avg`] adds here; divide once at the end
/// with [`finish_avg`]. Floats follow IEEE arithmetic; `Min`/`Max` return
/// NaN when either operand is NaN (as torch does). f16 and bf16 are widened
/// to f32, combined, and rounded back once per call. Integers wrap on
/// overflow.
///
/// The result depends only on the two operands and their order, so every
/// rank that combines the same values in the same order gets the same bits.
///
/// # Panics
/// If the slices differ in length or the length is not a multiple of the
/// element size (a bug in the caller, as with `copy_from_slice`).
pub fn reduce_into(dst: &mut [u8], src: &[u8], dtype: DType, op: ReduceOp) {
    assert_eq!(dst.len(), src.len(), "reduce_into: dst and src lengths differ");
    assert_eq!(dst.len() % dtype.size(), 0, "reduce_into: length is not a multiple of the {dtype} element size");
    match dtype {
        DType::F32 => apply2::<f32>(dst, src, |d, s| f32::combine(d, s, op)),
        DType::F64 => apply2::<f64>(dst, src, |d, s| f64::combine(d, s, op)),
        DType::F16 => apply2::<f16>(dst, src, |d, s| f16::combine(d, s, op)),
        DType::BF16 => apply2::<bf16>(dst, src, |d, s| bf16::combine(d, s, op)),
        DType::I8 => apply2::<i8>(dst, src, |d, s| i8::combine(d, s, op)),
        DType::U8 => apply2::<u8>(dst, src, |d, s| u8::combine(d, s, op)),
        DType::I32 => apply2::<i32>(dst, src, |d, s| i32::combine(d, s, op)),
        DType::I64 => apply2::<i64>(dst, src, |d, s| i64::combine(d, s, op)),
    }
}

/// Typed form of [`reduce_into`]: `dst[i] = dst[i] op src[i]`.
///
/// # Panics
/// If the slices differ in length.
pub fn reduce_elements<T: Element>(dst: &mut [T], src: &[T], op: ReduceOp) {
    reduce_into(bytemuck::cast_slice_mut(dst), bytemuck::cast_slice(src), T::DTYPE, op)
}

/// Finishes an average: divides every element of `buf` by `n` (the group
/// size). Floats divide (f16/bf16 in f32, rounded once); integers use
/// truncating division. `n == 0` or `n == 1` leaves `buf` unchanged.
///
/// # Panics
/// If the length is not a multiple of the element size.
pub fn finish_avg(buf: &mut [u8], dtype: DType, n: usize) {
    assert_eq!(buf.len() % dtype.size(), 0, "finish_avg: length is not a multiple of the {dtype} element size");
    if n <= 1 {
        return;
    }
    match dtype {
        DType::F32 => apply1::<f32>(buf, |d| f32::div_n(d, n)),
        DType::F64 => apply1::<f64>(buf, |d| f64::div_n(d, n)),
        DType::F16 => apply1::<f16>(buf, |d| f16::div_n(d, n)),
        DType::BF16 => apply1::<bf16>(buf, |d| bf16::div_n(d, n)),
        DType::I8 => apply1::<i8>(buf, |d| i8::div_n(d, n)),
        DType::U8 => apply1::<u8>(buf, |d| u8::div_n(d, n)),
        DType::I32 => apply1::<i32>(buf, |d| i32::div_n(d, n)),
        DType::I64 => apply1::<i64>(buf, |d| i64::div_n(d, n)),
    }
}

/// Runs `f` on `dst`/`src` viewed as `T`, directly when both are aligned for
/// `T`, otherwise through aligned stack copies of `CHUNK` elements.
#[inline]
fn apply2<T: Pod>(dst: &mut [u8], src: &[u8], f: impl Fn(&mut [T], &[T])) {
    if let (Ok(d), Ok(s)) = (bytemuck::try_cast_slice_mut::<u8, T>(dst), bytemuck::try_cast_slice::<u8, T>(src)) {
        f(d, s);
        return;
    }
    let es = std::mem::size_of::<T>();
    let mut a = [T::zeroed(); CHUNK];
    let mut b = [T::zeroed(); CHUNK];
    for (dc, sc) in dst.chunks_mut(CHUNK * es).zip(src.chunks(CHUNK * es)) {
        let m = dc.len() / es;
        bytemuck::cast_slice_mut::<T, u8>(&mut a[..m]).copy_from_slice(dc);
        bytemuck::cast_slice_mut::<T, u8>(&mut b[..m]).copy_from_slice(sc);
        f(&mut a[..m], &b[..m]);
        dc.copy_from_slice(bytemuck::cast_slice(&a[..m]));
    }
}

/// One-slice form of [`apply2`].
#[inline]
fn apply1<T: Pod>(buf: &mut [u8], f: impl Fn(&mut [T])) {
    if let Ok(d) = bytemuck::try_cast_slice_mut::<u8, T>(buf) {
        f(d);
        return;
    }
    let es = std::mem::size_of::<T>();
    let mut a = [T::zeroed(); CHUNK];
    for dc in buf.chunks_mut(CHUNK * es) {
        let m = dc.len() / es;
        bytemuck::cast_slice_mut::<T, u8>(&mut a[..m]).copy_from_slice(dc);
        f(&mut a[..m]);
        dc.copy_from_slice(bytemuck::cast_slice(&a[..m]));
    }
}

/// `dst[i] = f(dst[i], src[i])`: the one loop shape every kernel uses.
#[inline(always)]
fn zip_with<T: Copy>(dst: &mut [T], src: &[T], f: impl Fn(T, T) -> T) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f(*d, *s);
    }
}

/// An element type with typed kernels.
trait Kernel: Pod {
    /// `dst = dst op src`, element-wise (Avg adds).
    fn combine(dst: &mut [Self], src: &[Self], op: ReduceOp);
    /// `buf /= n`, element-wise.
    fn div_n(buf: &mut [Self], n: usize);
}

macro_rules! float_kernel {
    ($t:ty) => {
        impl Kernel for $t {
            fn combine(dst: &mut [$t], src: &[$t], op: ReduceOp) {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => zip_with(dst, src, |a, b| a + b),
                    ReduceOp::Prod => zip_with(dst, src, |a, b| a * b),
                    // NaN-propagating and branch-free: `a != a` is `a.is_nan()`.
                    #[allow(clippy::eq_op)]
                    ReduceOp::Min => zip_with(dst, src, |a, b| if a < b || a != a { a } else { b }),
                    #[allow(clippy::eq_op)]
                    ReduceOp::Max => zip_with(dst, src, |a, b| if a > b || a != a { a } else { b }),
                }
            }
            fn div_n(buf: &mut [$t], n: usize) {
                let n = n as $t;
                for x in buf.iter_mut() {
                    *x /= n;
                }
            }
        }
    };
}
float_kernel!(f32);
float_kernel!(f64);

macro_rules! int_kernel {
    ($t:ty) => {
        impl Kernel for $t {
            fn combine(dst: &mut [$t], src: &[$t], op: ReduceOp) {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => zip_with(dst, src, <$t>::wrapping_add),
                    ReduceOp::Prod => zip_with(dst, src, <$t>::wrapping_mul),
                    ReduceOp::Min => zip_with(dst, src, Ord::min),
                    ReduceOp::Max => zip_with(dst, src, Ord::max),
                }
            }
            fn div_n(buf: &mut [$t], n: usize) {
                // In i64 so that n > <$t>::MAX (e.g. 200 ranks on i8) still divides.
                let n = i64::try_from(n).unwrap_or(i64::MAX);
                for x in buf.iter_mut() {
                    *x = (*x as i64 / n) as $t;
                }
            }
        }
    };
}
int_kernel!(i8);
int_kernel!(u8);
int_kernel!(i32);
int_kernel!(i64);

impl Kernel for f16 {
    fn combine(dst: &mut [f16], src: &[f16], op: ReduceOp) {
        let mut a = [0f32; CHUNK];
        let mut b = [0f32; CHUNK];
        for (dc, sc) in dst.chunks_mut(CHUNK).zip(src.chunks(CHUNK)) {
            let m = dc.len();
            dc.convert_to_f32_slice(&mut a[..m]);
            sc.convert_to_f32_slice(&mut b[..m]);
            f32::combine(&mut a[..m], &b[..m], op);
            dc.convert_from_f32_slice(&a[..m]);
        }
    }
    fn div_n(buf: &mut [f16], n: usize) {
        let mut a = [0f32; CHUNK];
        for dc in buf.chunks_mut(CHUNK) {
            let m = dc.len();
            dc.convert_to_f32_slice(&mut a[..m]);
            f32::div_n(&mut a[..m], n);
            dc.convert_from_f32_slice(&a[..m]);
        }
    }
}

/// bf16 bits to f32: the bf16 is the top half of the f32.
#[inline(always)]
fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 to bf16 bits, rounding to nearest even; NaN stays a quiet NaN. Same
/// results as `half::bf16::from_f32`, written without branches so the
/// conversion loop vectorizes.
#[inline(always)]
fn f32_to_bf16_bits(f: f32) -> u16 {
    let x = f.to_bits();
    let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((x >> 16) | 0x0040) as u16;
    if x & 0x7fff_ffff > 0x7f80_0000 {
        quiet_nan
    } else {
        rounded
    }
}

fn bf16_widen(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(bytemuck::cast_slice::<bf16, u16>(src)) {
        *d = bf16_bits_to_f32(*s);
    }
}

fn bf16_narrow(src: &[f32], dst: &mut [bf16]) {
    for (d, s) in bytemuck::cast_slice_mut::<bf16, u16>(dst).iter_mut().zip(src) {
        *d = f32_to_bf16_bits(*s);
    }
}

impl Kernel for bf16 {
    fn combine(dst: &mut [bf16], src: &[bf16], op: ReduceOp) {
        let mut a = [0f32; CHUNK];
        let mut b = [0f32; CHUNK];
        for (dc, sc) in dst.chunks_mut(CHUNK).zip(src.chunks(CHUNK)) {
            let m = dc.len();
            bf16_widen(dc, &mut a[..m]);
            bf16_widen(sc, &mut b[..m]);
            f32::combine(&mut a[..m], &b[..m], op);
            bf16_narrow(&a[..m], dc);
        }
    }
    fn div_n(buf: &mut [bf16], n: usize) {
        let mut a = [0f32; CHUNK];
        for dc in buf.chunks_mut(CHUNK) {
            let m = dc.len();
            bf16_widen(dc, &mut a[..m]);
            f32::div_n(&mut a[..m], n);
            bf16_narrow(&a[..m], dc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T: Pod>(v: &[T]) -> Vec<u8> {
        bytemuck::cast_slice(v).to_vec()
    }

    #[test]
    fn f32_ops() {
        let a = [1.0f32, -2.0, 3.5, f32::NAN, 0.0];
        let b = [2.0f32, 5.0, -1.0, 1.0, f32::NAN];
        let want: [(ReduceOp, [f32; 5]); 4] = [
            (ReduceOp::Sum, [3.0, 3.0, 2.5, f32::NAN, f32::NAN]),
            (ReduceOp::Prod, [2.0, -10.0, -3.5, f32::NAN, f32::NAN]),
            (ReduceOp::Min, [1.0, -2.0, -1.0, f32::NAN, f32::NAN]),
            (ReduceOp::Max, [2.0, 5.0, 3.5, f32::NAN, f32::NAN]),
        ];
        for (op, w) in want {
            let mut d = a;
            reduce_elements(&mut d, &b, op);
            for (x, y) in d.iter().zip(w) {
                assert!(x == &y || (x.is_nan() && y.is_nan()), "{op}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn ints_wrap_and_avg() {
        let mut d = [i8::MAX, -3, 100, 7];
        reduce_elements(&mut d, &[1i8, -5, 100, 2], ReduceOp::Sum);
        assert_eq!(d, [i8::MIN, -8, -56, 9]);
        let mut d = [250u8, 3, 0, 9];
        reduce_elements(&mut d, &[10u8, 5, 1, 2], ReduceOp::Prod);
        assert_eq!(d, [196, 15, 0, 18]);
        let mut d = [5i64, -7, i64::MIN];
        reduce_elements(&mut d, &[6i64, -8, 0], ReduceOp::Max);
        assert_eq!(d, [6, -7, 0]);
        let mut d = [5i32, -7, 9];
        reduce_elements(&mut d, &[6i32, -8, 9], ReduceOp::Min);
        assert_eq!(d, [5, -8, 9]);
        let mut b = bytes(&[9i32, -9, 10]);
        finish_avg(&mut b, DType::I32, 4);
        assert_eq!(bytemuck::cast_slice::<u8, i32>(&b), &[2, -2, 2]);
        let mut b = vec![200u8, 7];
        finish_avg(&mut b, DType::U8, 300);
        assert_eq!(b, [0, 0]);
        let mut b = bytes(&[-128i8, 127]);
        finish_avg(&mut b, DType::I8, 200);
        assert_eq!(bytemuck::cast_slice::<u8, i8>(&b), &[0, 0]);
        let mut b = bytes(&[3.0f32, -1.5]);
        finish_avg(&mut b, DType::F32, 3);
        assert_eq!(bytemuck::cast_slice::<u8, f32>(&b), &[1.0, -0.5]);
    }

    #[test]
    fn half_types_accumulate_in_f32_per_step() {
        // 2048 + 1 is not representable in f16 (spacing 2 above 2048); the
        // step rounds once, to nearest even.
        let mut d = [f16::from_f32(2048.0), f16::from_f32(0.5), f16::from_f32(-1.0)];
        reduce_elements(&mut d, &[f16::from_f32(3.0), f16::from_f32(0.25), f16::from_f32(2.0)], ReduceOp::Sum);
        assert_eq!(d.map(f32::from), [2052.0, 0.75, 1.0]);
        let mut d = [bf16::from_f32(256.0), bf16::from_f32(1.5)];
        reduce_elements(&mut d, &[bf16::from_f32(1.0), bf16::from_f32(2.0)], ReduceOp::Prod);
        assert_eq!(d.map(f32::from), [256.0, 3.0]);
        let mut b = bytes(&[bf16::from_f32(6.0), bf16::from_f32(-3.0)]);
        finish_avg(&mut b, DType::BF16, 3);
        assert_eq!(bytemuck::cast_slice::<u8, bf16>(&b).iter().map(|x| x.to_f32()).collect::<Vec<_>>(), [2.0, -1.0]);
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let mut specials = vec![
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1.0 + f32::EPSILON,
            f32::from_bits(0x7f7f_8000),
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0xffff_ffff),
            f32::from_bits(0x7fc0_0001),
        ];
        let mut x: u32 = 0x1234_5678;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            specials.push(f32::from_bits(x));
        }
        for f in specials {
            assert_eq!(f32_to_bf16_bits(f), bf16::from_f32(f).to_bits(), "{f:e} ({:#x})", f.to_bits());
        }
        for b in 0..=u16::MAX {
            // `half` quiets signalling NaNs on widening; we keep the bits (a NaN either way).
            let (got, want) = (bf16_bits_to_f32(b), bf16::from_bits(b).to_f32());
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{b:#x}");
        }
    }

    #[test]
    fn unaligned_matches_aligned() {
        for dtype in DType::ALL {
            for op in ReduceOp::ALL {
                let es = dtype.size();
                let n = 1500; // more than one stack chunk
                let len = n * es;
                // Small non-negative values that are valid in every dtype.
                let mk = |seed: u8| -> Vec<u8> {
                    let v: Vec<f64> = (0..n).map(|i| ((i * 7 + seed as usize) % 5) as f64).collect();
                    match dtype {
                        DType::F32 => bytes(&v.iter().map(|x| *x as f32).collect::<Vec<_>>()),
                        DType::F64 => bytes(&v),
                        DType::F16 => bytes(&v.iter().map(|x| f16::from_f64(*x)).collect::<Vec<_>>()),
                        DType::BF16 => bytes(&v.iter().map(|x| bf16::from_f64(*x)).collect::<Vec<_>>()),
                        DType::I8 => bytes(&v.iter().map(|x| *x as i8).collect::<Vec<_>>()),
                        DType::U8 => bytes(&v.iter().map(|x| *x as u8).collect::<Vec<_>>()),
                        DType::I32 => bytes(&v.iter().map(|x| *x as i32).collect::<Vec<_>>()),
                        DType::I64 => bytes(&v.iter().map(|x| *x as i64).collect::<Vec<_>>()),
                    }
                };
                let (a, b) = (mk(1), mk(3));
                let mut want = a.clone();
                reduce_into(&mut want, &b, dtype, op);
                // Shift both operands by one byte inside larger buffers.
                let mut da = vec![0u8; len + 1];
                da[1..].copy_from_slice(&a);
                let mut sb = vec![0u8; len + 3];
                sb[3..].copy_from_slice(&b);
                reduce_into(&mut da[1..], &sb[3..], dtype, op);
                assert_eq!(&da[1..], &want[..], "{dtype} {op}");
                let mut w2 = want.clone();
                finish_avg(&mut w2, dtype, 3);
                finish_avg(&mut da[1..], dtype, 3);
                assert_eq!(&da[1..], &w2[..], "{dtype} {op} avg");
            }
        }
    }

    #[test]
    fn empty_is_noop() {
        for dtype in DType::ALL {
            reduce_into(&mut [], &[], dtype, ReduceOp::Sum);
            finish_avg(&mut [], dtype, 4);
        }
    }
}
