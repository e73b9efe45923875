//! A small CPU tensor, the [`TensorDict`] the coordinator moves, and the
//! codecs for objects and tensor-dict metadata.
//!
//! [`Tensor`] is not a math library: it holds a dtype, a shape, contiguous
//! row-major bytes and a [`Device`], and offers only what the coordinator
//! needs: typed views, reshape (with `-1` inference), narrow/select, and the
//! copies behind `all_gather`/`gather` along a dimension (`cat`, `movedim`).
//!
//! The bytes live in a [`Storage`]: today always host memory
//! ([`Storage::Host`], a `u64`-backed [`HostBuffer`], so every typed view
//! such as `as_slice::<f64>()` is correctly aligned). A device backend adds
//! its own variant; code outside this module reaches the bytes only through
//! [`Tensor::as_bytes`] / [`Tensor::as_bytes_mut`], which return
//! [`Error::Unsupported`] for storage that is not in host memory, and asks
//! [`Tensor::device`] where they live.
//!
//! Buffers whose size comes from outside (a peer's metadata, a caller's
//! shape) are allocated fallibly: a size that does not fit in memory is an
//! [`Error::OutOfMemory`], never an abort.
//!
//! ```
//! use rankweave::tensor::Tensor;
//! let t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3])?;
//! let r = t.reshape(&[3, -1])?;
//! assert_eq!(r.shape(), &[3, 2]);
//! assert_eq!(r.as_slice::<f32>()?, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
//! let c = Tensor::cat(&[&t, &t], -1)?;
//! assert_eq!(c.shape(), &[2, 6]);
//! assert_eq!(c.as_slice::<f32>()?[..6], [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
//! # Ok::<(), rankweave::Error>(())
//! ```

#[cfg(feature = "candle")]
mod candle_conv;
pub mod codec;
mod dict;
#[cfg(feature = "ndarray")]
mod ndarray_conv;

pub use codec::{DecodeLimits, MetadataEntry, TensorMetadata};
pub use dict::{TensorDict, TensorDictValue, Value};

use crate::dtype::{DType, Element};
use crate::error::{Context, Error, Result};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// Where a tensor's bytes live.
///
/// [`Device::Cpu`] always; [`Device::Cuda`] with the `nccl` feature (the
/// device is looked for when a tensor is first put on it). Without the
/// feature the variant still exists, so that metadata from a device-backed
/// peer decodes and is refused with a clear [`Error::Unsupported`] rather
/// than misread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Device {
    /// Host memory.
    #[default]
    Cpu,
    /// A CUDA device by index (feature `nccl`).
    Cuda(usize),
}

impl Device {
    /// The device type without index (`cpu`, `cuda`), as the seed's
    /// metadata carries it.
    pub const fn type_name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
        }
    }

    /// `Ok` for devices this build can hold tensors on (whether the device
    /// exists is checked when a tensor is put on it).
    pub fn check_supported(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "nccl")]
            Device::Cuda(_) => Ok(()),
            #[cfg(not(feature = "nccl"))]
            other => {
                Err(Error::Unsupported(format!("tensors on device {other}; this build supports only cpu tensors")))
            }
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Device> {
        let s = s.trim().to_ascii_lowercase();
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        if s == "cuda" {
            return Ok(Device::Cuda(0));
        }
        if let Some(i) = s.strip_prefix("cuda:").and_then(|i| i.parse::<usize>().ok()) {
            return Ok(Device::Cuda(i));
        }
        Err(Error::invalid(format!("unknown device `{s}`; expected `cpu`, `cuda` or `cuda:N`")))
    }
}

/// Number of elements of `shape`, or an error when the product overflows.
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Byte size of a tensor of `shape` and `dtype`, or `None` on overflow.
pub fn checked_nbytes(shape: &[usize], dtype: DType) -> Option<usize> {
    checked_numel(shape)?.checked_mul(dtype.size())
}

fn shape_str(shape: &[usize]) -> String {
    format!("{shape:?}")
}

/// Normalizes a possibly negative `dim` for a tensor of `ndim` dimensions
/// (`-ndim <= dim < ndim`), with an error that names what was expected.
pub fn normalize_dim(dim: isize, shape: &[usize]) -> Result<usize> {
    let nd = shape.len() as isize;
    if dim < -nd || dim >= nd {
        return Err(Error::invalid(format!(
            "invalid dim ({dim}) for input tensor with shape {}; expected {} <= dim < {nd}",
            shape_str(shape),
            -nd
        )));
    }
    Ok(if dim < 0 { (dim + nd) as usize } else { dim as usize })
}

/// A dense, contiguous, row-major tensor.
///
/// Equality ([`PartialEq`]) compares dtype, shape, device and the bytes, so
/// two float tensors holding the same NaN bits are equal.
/// Two tensors on a device other than the host never compare equal here
/// (their bytes are not visible).
#[derive(Clone)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    storage: Storage,
}

impl PartialEq for Tensor {
    fn eq(&self, other: &Self) -> bool {
        self.dtype == other.dtype
            && self.shape == other.shape
            && self.device() == other.device()
            && matches!((self.storage.host_bytes(), other.storage.host_bytes()), (Some(a), Some(b)) if a == b)
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOW: usize = 8;
        let mut d = f.debug_struct("Tensor");
        d.field("dtype", &self.dtype).field("shape", &self.shape).field("device", &self.device());
        if self.storage.host_bytes().is_none() {
            d.field("values", &"<not in host memory>");
        } else if self.numel() <= SHOW {
            d.field("values", &self.to_f64_vec().unwrap_or_default());
        } else {
            // Convert only what is shown: tensors can be large.
            let head = self.prefix(SHOW).and_then(|h| h.to_f64_vec()).unwrap_or_default();
            d.field("first_values", &head);
        }
        d.finish()
    }
}

/// Where a tensor's bytes are held.
///
/// Host memory, and with the `nccl` feature CUDA device memory. Code
/// outside [`crate::tensor`] does not match on this enum: it calls
/// [`Tensor::as_bytes`] (host bytes or [`Error::Unsupported`]) and
/// [`Tensor::device`] (and, for device work, `Tensor::cuda_buffer`).
#[derive(Clone)]
#[non_exhaustive]
pub enum Storage {
    /// Host memory.
    Host(HostBuffer),
    /// CUDA device memory, shared between clones of a tensor; a tensor
    /// written to while shared gets its own copy first (copy on write).
    #[cfg(feature = "nccl")]
    Cuda(std::sync::Arc<crate::device::CudaBuffer>),
}

impl Default for Storage {
    fn default() -> Self {
        Storage::Host(HostBuffer::default())
    }
}

impl Storage {
    /// The device the bytes live on.
    pub fn device(&self) -> Device {
        match self {
            Storage::Host(_) => Device::Cpu,
            #[cfg(feature = "nccl")]
            Storage::Cuda(b) => Device::Cuda(b.ordinal()),
        }
    }
    /// Number of bytes held.
    pub fn nbytes(&self) -> usize {
        match self {
            Storage::Host(h) => h.len(),
            #[cfg(feature = "nccl")]
            Storage::Cuda(b) => b.len(),
        }
    }
    /// The bytes, when they are in host memory.
    pub fn host_bytes(&self) -> Option<&[u8]> {
        match self {
            Storage::Host(h) => Some(h.as_bytes()),
            #[cfg(feature = "nccl")]
            Storage::Cuda(_) => None,
        }
    }
    /// The bytes, mutable, when they are in host memory.
    pub fn host_bytes_mut(&mut self) -> Option<&mut [u8]> {
        match self {
            Storage::Host(h) => Some(h.as_bytes_mut()),
            #[cfg(feature = "nccl")]
            Storage::Cuda(_) => None,
        }
    }
}

/// Zero-initialized host bytes in `u64` words, so that views of every
/// element type are aligned; bytes past [`HostBuffer::len`] stay zero.
///
/// From [`HUGE_PAGE_MIN`] bytes a buffer is a mapping of its own, of whole
/// 2 MiB pages advised as transparent huge pages. The kernel's copy between
/// two processes (the shared-memory point-to-point's split copy of a large
/// tensor) pins the pages it copies one by one and faults fresh ones in one
/// by one; on the machine of `docs/PERFORMANCE.md` (run 18) a pipeline
/// stage's `send` of a tensor and the next stage's `recv` into a fresh one
/// took 0.39-0.69 of the time between plain buffers at 16 MiB and
/// 0.22-0.24 at 64 MiB. (At 4-8 MiB it took 0.52-0.98 in two rounds, but
/// 1.4-3.1x as long in a third that caught the host's slow state, hence
/// the threshold.) The last huge page is allocated whole, so such a buffer
/// takes up to 2 MiB (an eighth) more memory than it holds, and a fresh one
/// of 16-32 MiB takes longer to fault in than the heap block glibc recycles
/// for that size (up to about 0.7 ms more there); `RANKWEAVE_HUGE_PAGES=0`
/// keeps every buffer on the heap.
#[derive(Default)]
pub struct HostBuffer {
    words: Words,
    len: usize,
}

/// Where a [`HostBuffer`]'s words are.
enum Words {
    Heap(Vec<u64>),
    Huge(crate::sys::huge::HugeWords),
}

impl Default for Words {
    fn default() -> Self {
        Words::Heap(Vec::new())
    }
}

impl Words {
    fn as_slice(&self) -> &[u64] {
        match self {
            Words::Heap(v) => v,
            Words::Huge(h) => h.as_slice(),
        }
    }
    fn as_mut_slice(&mut self) -> &mut [u64] {
        match self {
            Words::Heap(v) => v,
            Words::Huge(h) => h.as_mut_slice(),
        }
    }
}

/// Smallest [`HostBuffer`] that [`HostBuffer::try_zeroed`] puts on huge
/// pages (eight of them, 16 MiB: the memory a buffer takes beyond its bytes
/// is then at most an eighth of them).
pub const HUGE_PAGE_MIN: usize = 8 * crate::sys::huge::HUGE_PAGE;

/// Whether large host buffers go on huge pages: not when
/// `RANKWEAVE_HUGE_PAGES` is `0`, `off`, `no` or `false`.
fn huge_pages_wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| {
        std::env::var("RANKWEAVE_HUGE_PAGES")
            .map(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "0" | "off" | "no" | "false"))
            .unwrap_or(true)
    })
}

impl Clone for HostBuffer {
    fn clone(&self) -> Self {
        HostBuffer::from_bytes(self.as_bytes())
    }
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer").field("len", &self.len).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Host(h) => f.debug_tuple("Host").field(h).finish(),
            #[cfg(feature = "nccl")]
            Storage::Cuda(b) => f.debug_tuple("Cuda").field(b).finish(),
        }
    }
}

impl HostBuffer {
    /// `len` zero bytes, or [`Error::OutOfMemory`] when they cannot be
    /// allocated (the allocator refused, or the size overflows). From
    /// [`HUGE_PAGE_MIN`] bytes they lie on huge pages (see the type's docs).
    pub fn try_zeroed(len: usize) -> Result<HostBuffer> {
        let n = len.div_ceil(8);
        if len >= HUGE_PAGE_MIN && huge_pages_wanted() {
            if let Some(h) = crate::sys::huge::HugeWords::zeroed(n) {
                return Ok(HostBuffer { words: Words::Huge(h), len });
            }
        }
        let words = try_zeroed_vec::<u64>(n).ok_or_else(|| out_of_memory(len))?;
        Ok(HostBuffer { words: Words::Heap(words), len })
    }
    /// `len` zero bytes on huge pages whatever their number (a mapping of
    /// whole 2 MiB pages, so a small buffer takes a whole huge page of
    /// memory): for a buffer below [`HUGE_PAGE_MIN`] that carries large
    /// point-to-point messages again and again (on the machine of
    /// `docs/PERFORMANCE.md`, run 18, a 1 MiB sendrecv between such buffers
    /// took 0.5 of the time between plain ones). [`Error::OutOfMemory`] when
    /// the kernel refuses the mapping; where it has no huge pages the buffer
    /// keeps base pages.
    pub fn try_zeroed_huge(len: usize) -> Result<HostBuffer> {
        let h = crate::sys::huge::HugeWords::zeroed(len.div_ceil(8)).ok_or_else(|| out_of_memory(len))?;
        Ok(HostBuffer { words: Words::Huge(h), len })
    }
    /// A copy of `bytes` (memory the caller already holds, so this does not
    /// fail), on huge pages from [`HUGE_PAGE_MIN`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> HostBuffer {
        let mut b = HostBuffer::try_zeroed(bytes.len()).unwrap_or_else(|_| HostBuffer {
            words: Words::Heap(vec![0u64; bytes.len().div_ceil(8)]),
            len: bytes.len(),
        });
        b.as_bytes_mut().copy_from_slice(bytes);
        b
    }
    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Whether the bytes are a mapping advised as huge pages (whether the
    /// kernel granted them is its choice).
    pub fn on_huge_pages(&self) -> bool {
        matches!(self.words, Words::Huge(_))
    }
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(self.words.as_slice())[..self.len]
    }
    /// The bytes, mutable.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<u64, u8>(self.words.as_mut_slice())[..self.len]
    }
}

fn out_of_memory(len: usize) -> Error {
    Error::OutOfMemory { ctx: Context::op("alloc"), bytes: len as u64, detail: "host tensor storage".into() }
}

fn not_on_host(device: Device) -> Error {
    Error::Unsupported(format!("the bytes of a tensor on {device} are not in host memory; copy it to the cpu first"))
}

/// `n` zeroed elements, or `None` when the allocator refuses (or the byte
/// size overflows) instead of aborting the process as `vec![0; n]` does.
/// Zeroed pages come from the allocator's zeroing path, so a large buffer is
/// not written twice.
pub(crate) fn try_zeroed_vec<T: bytemuck::Zeroable>(n: usize) -> Option<Vec<T>> {
    if n == 0 || std::mem::size_of::<T>() == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(n).ok()?;
    // SAFETY: `layout` has a non-zero size (n > 0 and T is not zero-sized).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` was just allocated by the global allocator with the
    // layout of `[T; n]` (so its alignment and size are those a `Vec<T>` of
    // capacity `n` uses), and all-zero bytes are a valid `T` (`Zeroable`),
    // so all `n` elements are initialized.
    Some(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

impl Tensor {
    /// A zero-filled tensor. Fails if the byte size overflows `usize`.
    pub fn zeros(shape: impl Into<Vec<usize>>, dtype: DType) -> Result<Tensor> {
        let shape = shape.into();
        let nbytes = checked_nbytes(&shape, dtype).ok_or_else(|| {
            Error::invalid(format!("tensor of shape {} and dtype {dtype} is too large", shape_str(&shape)))
        })?;
        let storage = Storage::Host(HostBuffer::try_zeroed(nbytes).map_err(|e| match e {
            Error::OutOfMemory { ctx, bytes, .. } => Error::OutOfMemory {
                ctx,
                bytes,
                detail: format!("tensor of shape {} and dtype {dtype}", shape_str(&shape)),
            },
            other => other,
        })?);
        Ok(Tensor { dtype, shape, storage })
    }

    /// A zero-filled tensor on `device` ([`Device::Cuda`] needs the `nccl`
    /// feature and a CUDA driver; without either it is a clean error).
    pub fn zeros_on(shape: impl Into<Vec<usize>>, dtype: DType, device: Device) -> Result<Tensor> {
        device.check_supported()?;
        match device {
            Device::Cpu => Tensor::zeros(shape, dtype),
            #[cfg(feature = "nccl")]
            Device::Cuda(i) => {
                let shape = shape.into();
                let nbytes = checked_nbytes(&shape, dtype).ok_or_else(|| {
                    Error::invalid(format!("tensor of shape {} and dtype {dtype} is too large", shape_str(&shape)))
                })?;
                let buf = crate::device::CudaDevice::get(i)?.zeros(nbytes)?;
                Ok(Tensor { dtype, shape, storage: Storage::Cuda(std::sync::Arc::new(buf)) })
            }
            #[cfg(not(feature = "nccl"))]
            Device::Cuda(_) => Err(not_on_host(device)),
        }
    }

    /// A 0-element tensor of `dtype` with shape `[0]`.
    pub fn empty(dtype: DType) -> Tensor {
        Tensor { dtype, shape: vec![0], storage: Storage::default() }
    }

    /// A tensor of `shape` holding `data` (row-major). The element count must match.
    pub fn from_slice<T: Element>(data: &[T], shape: impl Into<Vec<usize>>) -> Result<Tensor> {
        let shape = shape.into();
        let numel =
            checked_numel(&shape).ok_or_else(|| Error::invalid(format!("shape {} overflows", shape_str(&shape))))?;
        if numel != data.len() {
            return Err(Error::invalid(format!(
                "shape {} holds {numel} elements but {} values were given",
                shape_str(&shape),
                data.len()
            )));
        }
        let bytes: &[u8] = bytemuck::cast_slice(data);
        Ok(Tensor { dtype: T::DTYPE, shape, storage: Storage::Host(HostBuffer::from_bytes(bytes)) })
    }

    /// Like [`Tensor::from_slice`], taking ownership of the values.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Vec<usize>>) -> Result<Tensor> {
        Tensor::from_slice(&data, shape)
    }

    /// A 1-D tensor holding `data`.
    pub fn vec1<T: Element>(data: &[T]) -> Tensor {
        Tensor {
            dtype: T::DTYPE,
            shape: vec![data.len()],
            storage: Storage::Host(HostBuffer::from_bytes(bytemuck::cast_slice(data))),
        }
    }

    /// A tensor of `shape` and `dtype` from raw little-endian element bytes.
    pub fn from_bytes(bytes: &[u8], shape: impl Into<Vec<usize>>, dtype: DType) -> Result<Tensor> {
        let shape = shape.into();
        let nbytes = checked_nbytes(&shape, dtype);
        if nbytes != Some(bytes.len()) {
            return Err(Error::invalid(format!(
                "shape {} of {dtype} needs {} bytes but {} were given",
                shape_str(&shape),
                nbytes.map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string()),
                bytes.len()
            )));
        }
        Ok(Tensor { dtype, shape, storage: Storage::Host(HostBuffer::from_bytes(bytes)) })
    }

    /// A tensor of `shape` and `dtype` whose elements are `values` converted
    /// with Rust `as` casts (integers saturate, floats round). Handy for tests
    /// that run the same data through every dtype.
    pub fn from_f64(values: &[f64], shape: impl Into<Vec<usize>>, dtype: DType) -> Result<Tensor> {
        fn conv<T: Element>(v: &[f64], shape: Vec<usize>, f: impl Fn(f64) -> T) -> Result<Tensor> {
            Tensor::from_vec(v.iter().map(|&x| f(x)).collect::<Vec<T>>(), shape)
        }
        let shape = shape.into();
        match dtype {
            DType::F32 => conv(values, shape, |x| x as f32),
            DType::F64 => conv(values, shape, |x| x),
            DType::F16 => conv(values, shape, f16::from_f64),
            DType::BF16 => conv(values, shape, bf16::from_f64),
            DType::I8 => conv(values, shape, |x| x as i8),
            DType::U8 => conv(values, shape, |x| x as u8),
            DType::I32 => conv(values, shape, |x| x as i32),
            DType::I64 => conv(values, shape, |x| x as i64),
        }
    }

    /// A tensor of `shape` with every element equal to `value`.
    pub fn full<T: Element>(shape: impl Into<Vec<usize>>, value: T) -> Result<Tensor> {
        let mut t = Tensor::zeros(shape, T::DTYPE)?;
        t.as_slice_mut::<T>()?.fill(value);
        Ok(t)
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Alias of [`Tensor::shape`] in torch's words.
    pub fn size(&self) -> &[usize] {
        &self.shape
    }
    /// Number of dimensions.
    pub fn dim(&self) -> usize {
        self.shape.len()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.nbytes() / self.dtype.size()
    }
    /// Number of bytes.
    pub fn nbytes(&self) -> usize {
        self.storage.nbytes()
    }
    /// Where the bytes live.
    pub fn device(&self) -> Device {
        self.storage.device()
    }
    /// True for host tensors.
    pub fn is_cpu(&self) -> bool {
        self.device() == Device::Cpu
    }
    /// The storage (host memory in this build).
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    /// The metadata the seed sends ahead of a tensor: device type, dtype, shape.
    pub fn metadata(&self) -> TensorMetadata {
        TensorMetadata { device: self.device(), dtype: self.dtype, shape: self.shape.clone() }
    }

    /// The element bytes, row-major; [`Error::Unsupported`] when the storage
    /// is not in host memory.
    pub fn as_bytes(&self) -> Result<&[u8]> {
        self.storage.host_bytes().ok_or_else(|| not_on_host(self.storage.device()))
    }
    /// The element bytes, mutable; [`Error::Unsupported`] when the storage
    /// is not in host memory.
    pub fn as_bytes_mut(&mut self) -> Result<&mut [u8]> {
        let device = self.storage.device();
        self.storage.host_bytes_mut().ok_or_else(|| not_on_host(device))
    }

    fn check_dtype<T: Element>(&self) -> Result<()> {
        if T::DTYPE != self.dtype {
            return Err(Error::invalid(format!(
                "tensor holds {} elements, but a view of {} was requested",
                self.dtype,
                T::DTYPE
            )));
        }
        Ok(())
    }

    /// The elements as `&[T]`; `T` must match the dtype.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        self.check_dtype::<T>()?;
        // The storage is u64-aligned and nbytes is a multiple of size_of::<T>(),
        // so the cast cannot fail.
        bytemuck::try_cast_slice(self.as_bytes()?)
            .map_err(|e| Error::invalid(format!("cannot view tensor bytes as {}: {e}", T::DTYPE)))
    }
    /// The elements as `&mut [T]`; `T` must match the dtype.
    pub fn as_slice_mut<T: Element>(&mut self) -> Result<&mut [T]> {
        self.check_dtype::<T>()?;
        bytemuck::try_cast_slice_mut(self.as_bytes_mut()?)
            .map_err(|e| Error::invalid(format!("cannot view tensor bytes as {}: {e}", T::DTYPE)))
    }
    /// The elements copied into a `Vec<T>`; `T` must match the dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        Ok(self.as_slice::<T>()?.to_vec())
    }

    /// The first `n` elements as a 1-D tensor (for printing).
    fn prefix(&self, n: usize) -> Result<Tensor> {
        let n = n.min(self.numel());
        let bytes = &self.as_bytes()?[..n * self.dtype.size()];
        Tensor::from_bytes(bytes, [n], self.dtype)
    }

    /// Every element converted to `f64` (for printing and tolerant
    /// comparisons); [`Error::Unsupported`] when not in host memory.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        fn conv<T: Element>(b: &[u8], f: impl Fn(T) -> f64) -> Vec<f64> {
            bytemuck::cast_slice::<u8, T>(b).iter().map(|&x| f(x)).collect()
        }
        let b = self.as_bytes()?;
        Ok(match self.dtype {
            DType::F32 => conv(b, |x: f32| x as f64),
            DType::F64 => conv(b, |x: f64| x),
            DType::F16 => conv(b, |x: f16| x.to_f64()),
            DType::BF16 => conv(b, |x: bf16| x.to_f64()),
            DType::I8 => conv(b, |x: i8| x as f64),
            DType::U8 => conv(b, |x: u8| x as f64),
            DType::I32 => conv(b, |x: i32| x as f64),
            DType::I64 => conv(b, |x: i64| x as f64),
        })
    }

    /// True when shapes and dtypes match and every element differs by at most
    /// `atol + rtol * |other|` (compared in `f64`). Tensors whose bytes are
    /// not in host memory are never close.
    pub fn allclose(&self, other: &Tensor, rtol: f64, atol: f64) -> bool {
        let (Ok(a), Ok(b)) = (self.to_f64_vec(), other.to_f64_vec()) else {
            return false;
        };
        self.dtype == other.dtype
            && self.shape == other.shape
            && a.iter().zip(b).all(|(a, b)| (a - b).abs() <= atol + rtol * b.abs() || (a.is_nan() && b.is_nan()))
    }

    /// Returns `Ok` for host tensors, [`Error::Unsupported`] otherwise.
    pub fn check_cpu(&self) -> Result<()> {
        self.as_bytes().map(|_| ())
    }

    /// Moves the tensor to `device` (a copy between host and CUDA memory;
    /// CUDA devices need the `nccl` feature).
    pub fn to_device(self, device: Device) -> Result<Tensor> {
        device.check_supported()?;
        if self.device() == device {
            return Ok(self);
        }
        #[cfg(feature = "nccl")]
        {
            let host = match &self.storage {
                Storage::Host(_) => self,
                Storage::Cuda(b) => {
                    let mut h = Tensor::zeros(self.shape.clone(), self.dtype)?;
                    b.download(h.as_bytes_mut()?)?;
                    h
                }
            };
            match device {
                Device::Cpu => Ok(host),
                Device::Cuda(i) => {
                    let buf = crate::device::CudaDevice::get(i)?.upload(host.as_bytes()?)?;
                    Ok(Tensor {
                        dtype: host.dtype,
                        shape: host.shape,
                        storage: Storage::Cuda(std::sync::Arc::new(buf)),
                    })
                }
            }
        }
        #[cfg(not(feature = "nccl"))]
        Err(Error::Unsupported(format!("moving a tensor from {} to {device}", self.device())))
    }

    /// The device bytes of a CUDA tensor (`None` for a host tensor).
    #[cfg(feature = "nccl")]
    pub fn cuda_buffer(&self) -> Option<&crate::device::CudaBuffer> {
        match &self.storage {
            Storage::Cuda(b) => Some(b),
            Storage::Host(_) => None,
        }
    }

    /// The device bytes of a CUDA tensor, for writing: a buffer shared with
    /// a clone is copied first (on the device; running out of device memory
    /// is an error). `None` for a host tensor.
    #[cfg(feature = "nccl")]
    pub fn cuda_buffer_mut(&mut self) -> Result<Option<&mut crate::device::CudaBuffer>> {
        match &mut self.storage {
            Storage::Host(_) => Ok(None),
            Storage::Cuda(b) => {
                if std::sync::Arc::get_mut(b).is_none() {
                    *b = std::sync::Arc::new(b.try_clone()?);
                }
                Ok(std::sync::Arc::get_mut(b))
            }
        }
    }

    /// A tensor of `shape` and `dtype` over device bytes `buf` (whose
    /// length must match).
    #[cfg(feature = "nccl")]
    pub fn from_cuda(buf: crate::device::CudaBuffer, shape: impl Into<Vec<usize>>, dtype: DType) -> Result<Tensor> {
        let shape = shape.into();
        if checked_nbytes(&shape, dtype) != Some(buf.len()) {
            return Err(Error::invalid(format!(
                "shape {} of {dtype} does not fit a device buffer of {} bytes",
                shape_str(&shape),
                buf.len()
            )));
        }
        Ok(Tensor { dtype, shape, storage: Storage::Cuda(std::sync::Arc::new(buf)) })
    }

    /// For the copying operations (`narrow`, `cat`, `permute`) on a device
    /// tensor: a round trip through host memory, so that the coordinator's
    /// pre- and post-processing (`all_gather` along an inner dim...) works on
    /// every device. Slower than a device kernel; `None` for host tensors.
    #[cfg(feature = "nccl")]
    fn via_host(&self, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Option<Result<Tensor>> {
        let Device::Cuda(_) = self.device() else { return None };
        let dev = self.device();
        Some(self.clone().to_device(Device::Cpu).and_then(|h| f(&h)).and_then(|t| t.to_device(dev)))
    }

    /// Resolves a target shape with at most one `-1` against `numel`.
    fn resolve_shape(&self, dims: &[isize]) -> Result<Vec<usize>> {
        let bad = |why: &str| {
            Error::invalid(format!(
                "cannot reshape tensor of shape {} ({} elements) into {dims:?}: {why}",
                shape_str(&self.shape),
                self.numel()
            ))
        };
        let mut infer = None;
        let mut known: usize = 1;
        for (i, &d) in dims.iter().enumerate() {
            if d == -1 {
                if infer.replace(i).is_some() {
                    return Err(bad("only one dimension may be -1"));
                }
            } else if d < 0 {
                return Err(bad("dimensions must be >= 0 or -1"));
            } else {
                known = known.checked_mul(d as usize).ok_or_else(|| bad("size overflows"))?;
            }
        }
        let numel = self.numel();
        let mut out: Vec<usize> = dims.iter().map(|&d| d.max(0) as usize).collect();
        match infer {
            Some(i) => {
                if known == 0 || numel % known != 0 {
                    return Err(bad("the -1 dimension cannot be inferred"));
                }
                out[i] = numel / known;
            }
            None if known != numel => return Err(bad("element counts differ")),
            None => {}
        }
        Ok(out)
    }

    /// The same elements with another shape; one dimension may be `-1`
    /// (inferred). Copies the tensor; see [`Tensor::into_reshape`].
    pub fn reshape(&self, dims: &[isize]) -> Result<Tensor> {
        let shape = self.resolve_shape(dims)?;
        Ok(Tensor { shape, ..self.clone() })
    }

    /// [`Tensor::reshape`] without a copy.
    pub fn into_reshape(mut self, dims: &[isize]) -> Result<Tensor> {
        self.shape = self.resolve_shape(dims)?;
        Ok(self)
    }

    /// Reinterprets with a `usize` shape of the same element count.
    pub fn into_shape(mut self, shape: impl Into<Vec<usize>>) -> Result<Tensor> {
        let shape = shape.into();
        if checked_numel(&shape) != Some(self.numel()) {
            return Err(Error::invalid(format!(
                "cannot reshape tensor of shape {} ({} elements) into {}",
                shape_str(&self.shape),
                self.numel(),
                shape_str(&shape)
            )));
        }
        self.shape = shape;
        Ok(self)
    }

    /// Elements `start..start + len` along `dim` (a copy).
    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Tensor> {
        #[cfg(feature = "nccl")]
        if let Some(r) = self.via_host(|h| h.narrow(dim, start, len)) {
            return r;
        }
        let d = normalize_dim(dim, &self.shape)?;
        let size = self.shape[d];
        if !matches!(start.checked_add(len), Some(end) if end <= size) {
            return Err(Error::invalid(format!(
                "narrow({dim}, {start}, {len}) out of range for shape {}; expected start + len <= {size}",
                shape_str(&self.shape)
            )));
        }
        let es = self.dtype.size();
        let inner: usize = self.shape[d + 1..].iter().product::<usize>() * es;
        let outer: usize = self.shape[..d].iter().product();
        let mut shape = self.shape.clone();
        shape[d] = len;
        let mut out = Tensor::zeros(shape, self.dtype)?;
        let src = self.as_bytes()?;
        let run = len * inner;
        let dst = out.as_bytes_mut()?;
        for o in 0..outer {
            let s = (o * size + start) * inner;
            dst[o * run..(o + 1) * run].copy_from_slice(&src[s..s + run]);
        }
        Ok(out)
    }

    /// Index `index` along `dim`, dropping that dimension (torch's `select`;
    /// `t.select(0, i)` is `t[i]`).
    pub fn select(&self, dim: isize, index: usize) -> Result<Tensor> {
        let d = normalize_dim(dim, &self.shape)?;
        let mut t = self.narrow(dim, index, 1)?;
        t.shape.remove(d);
        Ok(t)
    }

    /// Concatenates tensors along `dim`: same dtype, device and number of
    /// dimensions, equal sizes except along `dim`.
    pub fn cat(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
        let first = tensors.first().ok_or_else(|| Error::invalid("cat of an empty list of tensors"))?;
        let d = normalize_dim(dim, &first.shape)?;
        let mut total = 0usize;
        for (i, t) in tensors.iter().enumerate() {
            let same_others = t.shape.len() == first.shape.len()
                && t.shape.iter().zip(&first.shape).enumerate().all(|(k, (a, b))| k == d || a == b);
            if t.dtype != first.dtype || t.device() != first.device() || !same_others {
                return Err(Error::invalid(format!(
                    "cat along dim {dim}: tensor {i} has {} {} on {}, expected {} on {} with shape {} except along dim {d}",
                    t.dtype,
                    shape_str(&t.shape),
                    t.device(),
                    first.dtype,
                    first.device(),
                    shape_str(&first.shape)
                )));
            }
            total += t.shape[d];
        }
        #[cfg(feature = "nccl")]
        if let Device::Cuda(_) = first.device() {
            let host = tensors.iter().map(|t| (*t).clone().to_device(Device::Cpu)).collect::<Result<Vec<_>>>()?;
            let refs: Vec<&Tensor> = host.iter().collect();
            return Tensor::cat(&refs, dim)?.to_device(first.device());
        }
        let mut shape = first.shape.clone();
        shape[d] = total;
        let mut out = Tensor::zeros(shape, first.dtype)?;
        let es = first.dtype.size();
        let inner: usize = first.shape[d + 1..].iter().product::<usize>() * es;
        let outer: usize = first.shape[..d].iter().product();
        let srcs = tensors.iter().map(|t| t.as_bytes()).collect::<Result<Vec<&[u8]>>>()?;
        let dst = out.as_bytes_mut()?;
        let mut pos = 0;
        for o in 0..outer {
            for (t, src) in tensors.iter().zip(&srcs) {
                let run = t.shape[d] * inner;
                dst[pos..pos + run].copy_from_slice(&src[o * run..(o + 1) * run]);
                pos += run;
            }
        }
        Ok(out)
    }

    /// Reorders the dimensions: output dimension `i` is input dimension
    /// `perm[i]` (a copy into row-major order).
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        #[cfg(feature = "nccl")]
        if let Some(r) = self.via_host(|h| h.permute(perm)) {
            return r;
        }
        let nd = self.shape.len();
        let mut seen = vec![false; nd];
        if perm.len() != nd || perm.iter().any(|&p| p >= nd || std::mem::replace(&mut seen[p], true)) {
            return Err(Error::invalid(format!(
                "permute({perm:?}) of a tensor with shape {}: expected a permutation of 0..{nd}",
                shape_str(&self.shape)
            )));
        }
        let out_shape: Vec<usize> = perm.iter().map(|&p| self.shape[p]).collect();
        let mut out = Tensor::zeros(out_shape.clone(), self.dtype)?;
        if self.nbytes() == 0 {
            return Ok(out);
        }
        // Trailing dimensions that stay in place are copied as one run.
        let mut k = nd;
        while k > 0 && perm[k - 1] == k - 1 && perm[..k - 1].iter().all(|&p| p < k - 1) {
            k -= 1;
        }
        let es = self.dtype.size();
        let run = self.shape[k..].iter().product::<usize>() * es;
        let mut in_strides = vec![0usize; nd];
        let mut acc = run / es;
        for i in (0..k).rev() {
            in_strides[i] = acc;
            acc *= self.shape[i];
        }
        let src = self.as_bytes()?;
        let dst = out.as_bytes_mut()?;
        let mut idx = vec![0usize; k];
        let mut pos = 0;
        loop {
            let off: usize = (0..k).map(|i| idx[i] * in_strides[perm[i]]).sum::<usize>() * es;
            dst[pos..pos + run].copy_from_slice(&src[off..off + run]);
            pos += run;
            // Advance the row-major counter over the outer output dimensions.
            let mut i = k;
            loop {
                if i == 0 {
                    return Ok(out);
                }
                i -= 1;
                idx[i] += 1;
                if idx[i] < out_shape[i] {
                    break;
                }
                idx[i] = 0;
            }
        }
    }

    /// Moves dimension `source` to position `destination`, keeping the order
    /// of the others (torch's `movedim`).
    pub fn movedim(&self, source: isize, destination: isize) -> Result<Tensor> {
        let s = normalize_dim(source, &self.shape)?;
        let d = normalize_dim(destination, &self.shape)?;
        let mut perm: Vec<usize> = (0..self.shape.len()).filter(|&i| i != s).collect();
        perm.insert(d, s);
        self.permute(&perm)
    }

    /// The seed's all_gather epilogue: `self` has shape `(world, *input)`;
    /// returns `movedim(0, dim)` reshaped so that `dim` is `world` times longer.
    pub fn unstack_into_dim(self, dim: usize) -> Result<Tensor> {
        if self.shape.len() < 2 || dim + 1 >= self.shape.len() {
            return Err(Error::invalid(format!(
                "unstack_into_dim({dim}) of a tensor with shape {}; expected a (world, *input) tensor and dim < {}",
                shape_str(&self.shape),
                self.shape.len().saturating_sub(1)
            )));
        }
        let world = self.shape[0];
        let mut out_shape: Vec<usize> = self.shape[1..].to_vec();
        out_shape[dim] *= world;
        let moved = if dim == 0 { self } else { self.movedim(0, dim as isize)? };
        moved.into_shape(out_shape)
    }
}

impl<T: Element> From<Vec<T>> for Tensor {
    /// A 1-D tensor.
    fn from(v: Vec<T>) -> Tensor {
        Tensor::vec1(&v)
    }
}

impl<T: Element> From<&[T]> for Tensor {
    /// A 1-D tensor.
    fn from(v: &[T]) -> Tensor {
        Tensor::vec1(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iota(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n as i32).collect::<Vec<_>>(), shape.to_vec()).unwrap()
    }

    #[test]
    fn views_are_aligned_for_every_dtype() {
        for dt in DType::ALL {
            let t = Tensor::from_f64(&[1.0, 2.0, 3.0], [3], dt).unwrap();
            assert_eq!(t.to_f64_vec().unwrap(), vec![1.0, 2.0, 3.0], "{dt}");
            assert_eq!(t.nbytes(), 3 * dt.size());
        }
        let t = Tensor::from_vec(vec![1.5f64, -2.0], [2]).unwrap();
        assert_eq!(t.as_slice::<f64>().unwrap(), &[1.5, -2.0]);
        let err = t.as_slice::<f32>().unwrap_err().to_string();
        assert!(err.contains("float64") && err.contains("float32"), "{err}");
    }

    #[test]
    fn constructors_check_counts() {
        assert!(Tensor::from_vec(vec![1i64, 2, 3], [2, 2]).is_err());
        assert!(Tensor::zeros([usize::MAX, 2], DType::F32).is_err());
        assert!(Tensor::from_bytes(&[0u8; 7], [2], DType::F32).is_err());
        let t = Tensor::from_bytes(&1.0f32.to_le_bytes(), [1], DType::F32).unwrap();
        assert_eq!(t.as_slice::<f32>().unwrap(), &[1.0]);
        assert_eq!(Tensor::full([2, 2], 7u8).unwrap().to_vec::<u8>().unwrap(), vec![7; 4]);
        assert_eq!(Tensor::from(vec![1i32, 2]).shape(), &[2]);
        assert_eq!(Tensor::empty(DType::BF16).numel(), 0);
        assert!(Tensor::zeros_on([1], DType::F32, Device::Cuda(0)).is_err());
    }

    #[test]
    fn reshape_infers_minus_one() {
        let t = iota(&[2, 3, 4]);
        assert_eq!(t.reshape(&[4, -1]).unwrap().shape(), &[4, 6]);
        assert_eq!(t.reshape(&[-1]).unwrap().shape(), &[24]);
        assert!(t.reshape(&[5, -1]).is_err());
        assert!(t.reshape(&[-1, -1]).is_err());
        assert!(t.reshape(&[2, 3]).is_err());
        assert!(t.reshape(&[-2, 12]).is_err());
        let e = Tensor::zeros([0, 3], DType::F32).unwrap();
        assert_eq!(e.reshape(&[3, 0]).unwrap().shape(), &[3, 0]);
        assert!(e.reshape(&[0, -1]).is_err());
        assert_eq!(t.clone().into_reshape(&[6, 4]).unwrap().as_bytes().unwrap(), t.as_bytes().unwrap());
    }

    #[test]
    fn narrow_select_and_dims() {
        let t = iota(&[2, 3, 4]);
        let n = t.narrow(1, 1, 2).unwrap();
        assert_eq!(n.shape(), &[2, 2, 4]);
        assert_eq!(n.as_slice::<i32>().unwrap(), &[4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 18, 19, 20, 21, 22, 23]);
        let s = t.select(0, 1).unwrap();
        assert_eq!(s.shape(), &[3, 4]);
        assert_eq!(s.as_slice::<i32>().unwrap()[0], 12);
        assert_eq!(t.select(-1, 3).unwrap().as_slice::<i32>().unwrap(), &[3, 7, 11, 15, 19, 23]);
        assert!(t.narrow(1, 2, 2).is_err());
        let err = t.select(3, 0).unwrap_err().to_string();
        assert!(err.contains("-3 <= dim < 3"), "{err}");
        assert!(normalize_dim(-4, &[1, 2, 3]).is_err());
        assert_eq!(normalize_dim(-1, &[1, 2, 3]).unwrap(), 2);
    }

    #[test]
    fn cat_along_each_dim() {
        let a = iota(&[2, 2]);
        let b = Tensor::from_vec(vec![10i32, 11, 12, 13], [2, 2]).unwrap();
        assert_eq!(Tensor::cat(&[&a, &b], 0).unwrap().as_slice::<i32>().unwrap(), &[0, 1, 2, 3, 10, 11, 12, 13]);
        assert_eq!(Tensor::cat(&[&a, &b], -1).unwrap().as_slice::<i32>().unwrap(), &[0, 1, 10, 11, 2, 3, 12, 13]);
        let c = Tensor::from_vec(vec![20i32, 21], [2, 1]).unwrap();
        let r = Tensor::cat(&[&a, &c], 1).unwrap();
        assert_eq!(r.shape(), &[2, 3]);
        assert_eq!(r.as_slice::<i32>().unwrap(), &[0, 1, 20, 2, 3, 21]);
        assert!(Tensor::cat(&[&a, &c], 0).is_err());
        assert!(Tensor::cat(&[], 0).is_err());
        let f = Tensor::zeros([2, 2], DType::F32).unwrap();
        assert!(Tensor::cat(&[&a, &f], 0).is_err());
    }

    #[test]
    fn permute_and_movedim_match_index_math() {
        let t = iota(&[2, 3, 4]);
        let p = t.permute(&[2, 0, 1]).unwrap();
        assert_eq!(p.shape(), &[4, 2, 3]);
        let v = p.as_slice::<i32>().unwrap();
        for a in 0..4 {
            for b in 0..2 {
                for c in 0..3 {
                    assert_eq!(v[a * 6 + b * 3 + c], (b * 12 + c * 4 + a) as i32);
                }
            }
        }
        let m = t.movedim(0, 2).unwrap();
        assert_eq!(m.shape(), &[3, 4, 2]);
        assert_eq!(m, t.permute(&[1, 2, 0]).unwrap());
        assert_eq!(t.movedim(1, 1).unwrap(), t);
        assert!(t.permute(&[0, 0, 1]).is_err());
    }

    #[test]
    fn unstack_into_dim_equals_cat_of_blocks() {
        // Two "ranks" each contributing a [2, 3, 2] block.
        let blocks: Vec<Tensor> = (0..2)
            .map(|r| Tensor::from_vec((0..12).map(|i| r * 100 + i).collect::<Vec<i32>>(), [2, 3, 2]).unwrap())
            .collect();
        let refs: Vec<&Tensor> = blocks.iter().collect();
        let stacked = Tensor::cat(&refs, 0).unwrap().into_shape([2, 2, 3, 2]).unwrap();
        for dim in 0..3 {
            let got = stacked.clone().unstack_into_dim(dim).unwrap();
            assert_eq!(got, Tensor::cat(&refs, dim as isize).unwrap(), "dim {dim}");
        }
        assert!(stacked.unstack_into_dim(3).is_err());
    }

    #[test]
    fn equality_and_debug() {
        let a = Tensor::from_vec(vec![1.0f32, 2.0], [2]).unwrap();
        let b = Tensor::from_vec(vec![1.0f32, 2.0], [1, 2]).unwrap();
        assert_ne!(a, b);
        assert!(a.allclose(&a.clone(), 0.0, 0.0));
        let big = Tensor::from_vec((0..100i32).collect::<Vec<_>>(), [10, 10]).unwrap();
        let dbg = format!("{big:?}");
        assert!(dbg.contains("first_values: [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]"), "{dbg}");
        let dbg = format!("{a:?}");
        assert!(dbg.contains("F32") && dbg.contains("[2]"), "{dbg}");
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert!("tpu".parse::<Device>().is_err());
        assert!(a.clone().to_device(Device::Cuda(0)).is_err());
    }
}
