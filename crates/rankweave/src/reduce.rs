//! Reduction operators and the element kernels that apply them.
//!
//! All reductions in the crate go through [`reduce_into`], so every rank
//! combines values in the same order and results are bitwise identical.

use crate::dtype::{DType, Element};
use bytemuck::Pod;
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
// loop into packed SIMD in the release build. The loops are compiled twice:
// for the baseline target (SSE2 on x86-64) and, in `x86::reduce_avx2`, with
// AVX2 enabled, picked at run time. Checked with
// `cargo rustc --release -p rankweave --lib -- --emit asm`: the baseline f32
// Sum loop is `addps` on xmm registers (plus `cmpunordps` and a blend that
// canonicalize NaN results); the AVX2 variant is `vaddps`, `vcmpunordps`,
// `vblendvps` on ymm registers; f64 uses `addpd`/`vaddpd`, integers
// `vpaddd`/`vpaddq`/`vpmulld`, float Min/Max `vcmpltps` + blends, and the
// f16/bf16 conversions packed integer ops (`vpsrld`, `vpand`, `vpminud`).
// No loop is left scalar and none uses masked stores (see `zip_select`).
// With `-C target-cpu=native` on this machine (AVX-512) the f32 Sum loop
// also used `vaddps` on zmm registers.
//
// Measured with `cargo bench -p rankweave --bench reduce` (1 MiB, GB/s of
// input, on this shared 2-core machine under load, so +-30%): f32 Sum 20,
// Max 31; f64 Sum 19; bf16 Sum 8, Max 15; f16 Sum 2.5, Prod 1.0 (integer
// conversions, no F16C); i32 Sum 15; memcpy of the same bytes 12-22. All
// but f16 reduce at about memcpy speed, well above what the transports
// move.
// ---------------------------------------------------------------------------

/// Elements per stack chunk for the unaligned path.
const CHUNK: usize = 512;

/// Combines `src` into `dst` element-wise: `dst[i] = dst[i] op src[i]`.
///
/// Both slices hold elements of `dtype` as raw (native-endian) bytes and may
/// have any alignment. [`ReduceOp::Avg`] adds here; divide once at the end
/// with [`finish_avg`]. Floats follow IEEE arithmetic; `Min`/`Max` return
/// NaN when either operand is NaN (as torch does); NaN results of Sum, Prod
/// and Avg are the canonical quiet NaN whatever the operands' payloads, so
/// every instruction set gives the same bits. f16 and bf16 are widened
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
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU supports AVX2, checked at run time just above.
        unsafe { x86::reduce_avx2(dst, src, dtype, op) };
        return;
    }
    reduce_generic(dst, src, dtype, op)
}

/// [`reduce_into`]'s dispatch, inlined into each instruction-set variant.
#[inline(always)]
fn reduce_generic(dst: &mut [u8], src: &[u8], dtype: DType, op: ReduceOp) {
    match dtype {
        DType::F32 => apply2::<f32>(dst, src, op),
        DType::F64 => apply2::<f64>(dst, src, op),
        DType::F16 => apply2::<f16>(dst, src, op),
        DType::BF16 => apply2::<bf16>(dst, src, op),
        DType::I8 => apply2::<i8>(dst, src, op),
        DType::U8 => apply2::<u8>(dst, src, op),
        DType::I32 => apply2::<i32>(dst, src, op),
        DType::I64 => apply2::<i64>(dst, src, op),
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
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU supports AVX2, checked at run time just above.
        unsafe { x86::finish_avg_avx2(buf, dtype, n) };
        return;
    }
    finish_avg_generic(buf, dtype, n)
}

/// [`finish_avg`]'s dispatch, inlined into each instruction-set variant.
#[inline(always)]
fn finish_avg_generic(buf: &mut [u8], dtype: DType, n: usize) {
    match dtype {
        DType::F32 => apply1::<f32>(buf, n),
        DType::F64 => apply1::<f64>(buf, n),
        DType::F16 => apply1::<f16>(buf, n),
        DType::BF16 => apply1::<bf16>(buf, n),
        DType::I8 => apply1::<i8>(buf, n),
        DType::U8 => apply1::<u8>(buf, n),
        DType::I32 => apply1::<i32>(buf, n),
        DType::I64 => apply1::<i64>(buf, n),
    }
}

/// Runs `T`'s kernel on `dst`/`src` viewed as `T`, directly when both are aligned for
/// `T`, otherwise through aligned stack copies of `CHUNK` elements.
#[inline(always)]
fn apply2<T: Kernel>(dst: &mut [u8], src: &[u8], op: ReduceOp) {
    if let (Ok(d), Ok(s)) = (bytemuck::try_cast_slice_mut::<u8, T>(dst), bytemuck::try_cast_slice::<u8, T>(src)) {
        T::combine(d, s, op);
        return;
    }
    let es = std::mem::size_of::<T>();
    let mut a = [T::zeroed(); CHUNK];
    let mut b = [T::zeroed(); CHUNK];
    for (dc, sc) in dst.chunks_mut(CHUNK * es).zip(src.chunks(CHUNK * es)) {
        let m = dc.len() / es;
        bytemuck::cast_slice_mut::<T, u8>(&mut a[..m]).copy_from_slice(dc);
        bytemuck::cast_slice_mut::<T, u8>(&mut b[..m]).copy_from_slice(sc);
        T::combine(&mut a[..m], &b[..m], op);
        dc.copy_from_slice(bytemuck::cast_slice(&a[..m]));
    }
}

/// One-slice form of [`apply2`].
#[inline(always)]
fn apply1<T: Kernel>(buf: &mut [u8], n: usize) {
    if let Ok(d) = bytemuck::try_cast_slice_mut::<u8, T>(buf) {
        T::div_n(d, n);
        return;
    }
    let es = std::mem::size_of::<T>();
    let mut a = [T::zeroed(); CHUNK];
    for dc in buf.chunks_mut(CHUNK * es) {
        let m = dc.len() / es;
        bytemuck::cast_slice_mut::<T, u8>(&mut a[..m]).copy_from_slice(dc);
        T::div_n(&mut a[..m], n);
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

/// NaN becomes the canonical quiet NaN. When both operands of `+` or `*`
/// are NaN, which payload survives depends on operand order in the
/// instruction, and LLVM may commute `fadd`/`fmul` differently in the SSE2
/// and AVX2 builds; canonical NaNs keep every rank's bits equal.
#[inline(always)]
fn canonical<F: num_like::Float>(x: F) -> F {
    #[allow(clippy::eq_op)]
    if x != x {
        F::NAN
    } else {
        x
    }
}

mod num_like {
    /// f32 and f64, for [`super::canonical`].
    pub trait Float: Copy + PartialEq {
        const NAN: Self;
    }
    impl Float for f32 {
        const NAN: Self = f32::NAN;
    }
    impl Float for f64 {
        const NAN: Self = f64::NAN;
    }
}

/// `dst[i] = if keep_dst(dst[i], src[i]) { dst[i] } else { src[i] }`.
///
/// Written through a stack buffer: in place, LLVM sees that the "keep"
/// branch stores back the value it loaded, drops that store and vectorizes
/// the rest as a masked store (`vmaskmovps`), which is microcoded and about
/// five times slower on AMD CPUs than a blend and a plain store.
#[inline(always)]
fn zip_select<T: Pod>(dst: &mut [T], src: &[T], keep_dst: impl Fn(T, T) -> bool) {
    const K: usize = 256;
    let mut out = [T::zeroed(); K];
    for (dc, sc) in dst.chunks_mut(K).zip(src.chunks(K)) {
        let out = &mut out[..dc.len()];
        for ((o, a), b) in out.iter_mut().zip(dc.iter()).zip(sc) {
            *o = if keep_dst(*a, *b) { *a } else { *b };
        }
        dc.copy_from_slice(out);
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
            #[inline(always)]
            fn combine(dst: &mut [$t], src: &[$t], op: ReduceOp) {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => zip_with(dst, src, |a, b| canonical(a + b)),
                    ReduceOp::Prod => zip_with(dst, src, |a, b| canonical(a * b)),
                    // NaN-propagating: `a != a` is `a.is_nan()`.
                    #[allow(clippy::eq_op)]
                    ReduceOp::Min => zip_select(dst, src, |a, b| (a < b) | (a != a)),
                    #[allow(clippy::eq_op)]
                    ReduceOp::Max => zip_select(dst, src, |a, b| (a > b) | (a != a)),
                }
            }
            #[inline(always)]
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
            #[inline(always)]
            fn combine(dst: &mut [$t], src: &[$t], op: ReduceOp) {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => zip_with(dst, src, <$t>::wrapping_add),
                    ReduceOp::Prod => zip_with(dst, src, <$t>::wrapping_mul),
                    // x86 has no packed 64-bit min/max before AVX-512: the
                    // select would become a masked store, see `zip_select`.
                    ReduceOp::Min if std::mem::size_of::<$t>() == 8 => zip_select(dst, src, |a, b| a < b),
                    ReduceOp::Max if std::mem::size_of::<$t>() == 8 => zip_select(dst, src, |a, b| a > b),
                    ReduceOp::Min => zip_with(dst, src, Ord::min),
                    ReduceOp::Max => zip_with(dst, src, Ord::max),
                }
            }
            #[inline(always)]
            fn div_n(buf: &mut [$t], n: usize) {
                if std::mem::size_of::<$t>() <= 4 {
                    // Truncating division through f64, which vectorizes
                    // (integer division does not): for |x| < 2^53 the f64
                    // quotient is off by less than 2^-53 * |x| / n < 1 / n,
                    // the least distance from a non-integer x / n to an
                    // integer, so truncation gives exactly x / n.
                    let nf = n as f64;
                    for x in buf.iter_mut() {
                        *x = (*x as f64 / nf).trunc() as $t;
                    }
                } else {
                    // In i64 so that any n (even above <$t>::MAX) divides.
                    let n = i64::try_from(n).unwrap_or(i64::MAX);
                    for x in buf.iter_mut() {
                        *x = (*x as i64 / n) as $t;
                    }
                }
            }
        }
    };
}
int_kernel!(i8);
int_kernel!(u8);
int_kernel!(i32);
int_kernel!(i64);

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

/// f16 bits to f32, exactly; NaNs are quieted as `half` and F16C do.
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    // Finite: move exponent and mantissa into f32 position and rescale by
    // 2^112 (the bias difference). Exact, and the product normalizes f16
    // subnormals (which are f32 subnormals before the multiply).
    let finite = (f32::from_bits(em << 13) * f32::from_bits(0x7780_0000)).to_bits();
    let quiet = if em & 0x03ff != 0 { 0x0040_0000 } else { 0 };
    let special = 0x7f80_0000 | ((em & 0x03ff) << 13) | quiet;
    f32::from_bits(if em >= 0x7c00 { special } else { finite } | sign)
}

/// f32 to f16 bits, rounding to nearest even, overflow to infinity, NaN to
/// a quiet NaN keeping the top payload bits: the same bits as
/// `half::f16::from_f32` (tested), without branches so the loop vectorizes.
/// Subnormal results are rounded by the FPU: adding 0.5 puts the f16
/// subnormal spacing (2^-24) at the sum's last mantissa bit (after F. Giesen,
/// "half_from_float_fast3_rtne", 2016).
#[inline(always)]
fn f32_to_f16_bits(f: f32) -> u16 {
    let x = f.to_bits();
    let sign = (x >> 16) & 0x8000;
    let a = x & 0x7fff_ffff;
    let nan = 0x7e00 | ((a >> 13) & 0x03ff);
    let half = 0x3f00_0000u32; // 0.5
    let sub = (f32::from_bits(a) + f32::from_bits(half)).to_bits().wrapping_sub(half);
    let odd = (a >> 13) & 1;
    // Rebias the exponent (127 -> 15) and round the 13 dropped bits to even.
    let normal = a.wrapping_sub(112 << 23).wrapping_add(0x0fff + odd) >> 13;
    let o = if a > 0x7f80_0000 {
        nan
    } else if a >= 0x4780_0000 {
        0x7c00
    } else if a < 0x3880_0000 {
        sub
    } else {
        normal
    };
    (o | sign) as u16
}

/// f16 and bf16, one fused pass per element: widen both operands to f32,
/// combine, round back once (Sum, Prod, Avg); Min/Max compare the widened
/// values and keep the original 16 bits. Since f32 carries more than twice
/// the 16-bit types' precision plus two bits, the f32 step followed by the
/// rounding gives the correctly rounded 16-bit result (no double-rounding
/// error).
macro_rules! half_kernel {
    ($t:ty, $to_f32:ident, $from_f32:ident) => {
        impl Kernel for $t {
            #[inline(always)]
            fn combine(dst: &mut [$t], src: &[$t], op: ReduceOp) {
                let d = bytemuck::cast_slice_mut::<$t, u16>(dst);
                let s = bytemuck::cast_slice::<$t, u16>(src);
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => {
                        zip_with(d, s, |a, b| $from_f32(canonical($to_f32(a) + $to_f32(b))))
                    }
                    ReduceOp::Prod => zip_with(d, s, |a, b| $from_f32(canonical($to_f32(a) * $to_f32(b)))),
                    #[allow(clippy::eq_op)]
                    ReduceOp::Min => zip_select(d, s, |a, b| {
                        let (x, y) = ($to_f32(a), $to_f32(b));
                        (x < y) | (x != x)
                    }),
                    #[allow(clippy::eq_op)]
                    ReduceOp::Max => zip_select(d, s, |a, b| {
                        let (x, y) = ($to_f32(a), $to_f32(b));
                        (x > y) | (x != x)
                    }),
                }
            }
            #[inline(always)]
            fn div_n(buf: &mut [$t], n: usize) {
                let n = n as f32;
                for x in bytemuck::cast_slice_mut::<$t, u16>(buf) {
                    *x = $from_f32($to_f32(*x) / n);
                }
            }
        }
    };
}
half_kernel!(f16, f16_bits_to_f32, f32_to_f16_bits);
half_kernel!(bf16, bf16_bits_to_f32, f32_to_bf16_bits);

/// Run-time instruction-set dispatch: the same generic kernels compiled a
/// second time with AVX2 enabled (everything below the two entry points is
/// `#[inline(always)]`), used when the CPU has it. Element-wise IEEE
/// arithmetic and the integer bf16 rounding give the same bits at any SIMD
/// width, so ranks on CPUs with and without AVX2 still agree (tested).
/// With AVX2 the bf16 narrowing packs with `vpackusdw` instead of SSE2
/// shuffles, about three times faster.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{finish_avg_generic, reduce_generic, DType, ReduceOp};

    /// Whether the AVX2 variants may run (cached by std after the first call).
    #[inline]
    pub(super) fn has_avx2() -> bool {
        std::is_x86_feature_detected!("avx2")
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn reduce_avx2(dst: &mut [u8], src: &[u8], dtype: DType, op: ReduceOp) {
        reduce_generic(dst, src, dtype, op)
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn finish_avg_avx2(buf: &mut [u8], dtype: DType, n: usize) {
        finish_avg_generic(buf, dtype, n)
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
    fn int_avg_truncates_exactly() {
        for n in [2usize, 3, 7, 8, 100, 255, 256, 1000, 1 << 40] {
            let v: Vec<i8> = (i8::MIN..=i8::MAX).collect();
            let mut b = bytes(&v);
            finish_avg(&mut b, DType::I8, n);
            let want: Vec<i8> = v.iter().map(|x| (*x as i64 / n as i64) as i8).collect();
            assert_eq!(bytemuck::cast_slice::<u8, i8>(&b), &want[..], "n={n}");
            let v: Vec<i32> = [i32::MIN, i32::MIN + 1, -7, -1, 0, 1, 5, 6, 7, 1 << 30, i32::MAX - 1, i32::MAX].to_vec();
            let mut b = bytes(&v);
            finish_avg(&mut b, DType::I32, n);
            let want: Vec<i32> = v.iter().map(|x| (*x as i64 / n as i64) as i32).collect();
            assert_eq!(bytemuck::cast_slice::<u8, i32>(&b), &want[..], "n={n}");
        }
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
    fn f16_conversions_match_half() {
        for h in 0..=u16::MAX {
            let (got, want) = (f16_bits_to_f32(h), f16::from_bits(h).to_f32());
            assert_eq!(got.to_bits(), want.to_bits(), "{h:#x}");
            // Round trip, and the midpoints to both neighbours (ties to even).
            assert_eq!(f32_to_f16_bits(got), f16::from_f32(got).to_bits(), "{h:#x}");
            for d in [-1i32, 1] {
                let mid = f32::from_bits(got.to_bits().wrapping_add_signed(d * 0x1000));
                for v in
                    [mid, f32::from_bits(mid.to_bits().wrapping_add(1)), f32::from_bits(mid.to_bits().wrapping_sub(1))]
                {
                    assert_eq!(f32_to_f16_bits(v), f16::from_f32(v).to_bits(), "{v:e} ({:#x})", v.to_bits());
                }
            }
        }
        let mut x: u32 = 0x2545_f491;
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = f32::from_bits(x);
            assert_eq!(f32_to_f16_bits(v), f16::from_f32(v).to_bits(), "{v:e} ({x:#x})");
        }
        for v in [65504.0f32, 65519.99, 65520.0, 65536.0, 1e-8, 2.98e-8, 2.99e-8, 6.1e-5, f32::MIN_POSITIVE] {
            for v in [v, -v] {
                assert_eq!(f32_to_f16_bits(v), f16::from_f32(v).to_bits(), "{v:e}");
            }
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

    /// The AVX2 and baseline variants give identical bits on random data
    /// (including NaN, infinities and rounding ties in the half types).
    #[test]
    fn instruction_set_variants_agree() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |len: usize| -> Vec<u8> {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect()
        };
        for dtype in DType::ALL {
            for op in ReduceOp::ALL {
                let len = 4099 * dtype.size();
                let (a, b) = (rnd(len), rnd(len));
                let mut base = a.clone();
                reduce_generic(&mut base, &b, dtype, op);
                let mut dispatched = a.clone();
                reduce_into(&mut dispatched, &b, dtype, op);
                let es = dtype.size();
                let diff = base.chunks(es).zip(dispatched.chunks(es)).position(|(x, y)| x != y);
                assert!(
                    diff.is_none(),
                    "{dtype} {op}: element {diff:?} of {:?} {:?} -> {:?} vs {:?}",
                    &a[diff.unwrap_or(0) * es..][..es],
                    &b[diff.unwrap_or(0) * es..][..es],
                    &base[diff.unwrap_or(0) * es..][..es],
                    &dispatched[diff.unwrap_or(0) * es..][..es]
                );
                let mut base_avg = base.clone();
                finish_avg_generic(&mut base_avg, dtype, 7);
                finish_avg(&mut dispatched, dtype, 7);
                assert!(base_avg == dispatched, "{dtype} {op} avg");
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
