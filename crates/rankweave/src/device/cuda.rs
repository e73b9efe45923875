//! CUDA contexts and device buffers, over cudarc's driver API.
//!
//! Every entry point first checks [`super::probe::cuda_driver`], so a
//! machine without the driver gets `no CUDA driver found ...` instead of
//! cudarc's panic. Buffers are plain bytes ([`CudaBuffer`]); the tensor
//! layer keeps the dtype and shape.

use super::probe;
use crate::error::{Context, Error, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, SyncOnDrop};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Maps a driver error to the crate's error, naming what was being done.
pub(crate) fn driver_err(what: &str, e: DriverError) -> Error {
    let oom = e.0 == cudarc::driver::sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY;
    if oom {
        return Error::OutOfMemory { ctx: Context::op(what), bytes: 0, detail: format!("CUDA device memory ({e})") };
    }
    Error::Unsupported(format!("CUDA driver call failed during {what}: {e}"))
}

/// One CUDA device as this process uses it: its primary context and the
/// stream tensors are allocated and copied on.
#[derive(Clone)]
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("ordinal", &self.ordinal).finish_non_exhaustive()
    }
}

impl CudaDevice {
    /// The device `ordinal` (cached per process): probes for the driver,
    /// initializes it and retains the device's primary context.
    pub fn get(ordinal: usize) -> Result<CudaDevice> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, CudaDevice>>> = OnceLock::new();
        check_driver_version(driver_version()?)?;
        let mut m = DEVICES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = m.get(&ordinal) {
            return Ok(d.clone());
        }
        let count = CudaContext::device_count().map_err(|e| driver_err("cuDeviceGetCount", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::invalid(format!(
                "cuda:{ordinal} does not exist: this machine has {count} CUDA devices"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("CUDA context creation", e))?;
        let stream = ctx.new_stream().map_err(|e| driver_err("CUDA stream creation", e))?;
        let d = CudaDevice { ordinal, ctx, stream };
        m.insert(ordinal, d.clone());
        Ok(d)
    }

    /// Number of CUDA devices, or the clean error when there is no driver.
    pub fn count() -> Result<usize> {
        check_driver_version(driver_version()?)?;
        let n = CudaContext::device_count().map_err(|e| driver_err("cuDeviceGetCount", e))?;
        Ok(n.max(0) as usize)
    }

    /// The device index.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// cudarc's context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream tensors are allocated and copied on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `len` zero bytes on the device.
    pub fn zeros(&self, len: usize) -> Result<CudaBuffer> {
        if len == 0 {
            return Ok(CudaBuffer { ordinal: self.ordinal, len, ptr: 0, slice: None });
        }
        let slice = self.stream.alloc_zeros::<u8>(len).map_err(|e| with_bytes(driver_err("cuda alloc", e), len))?;
        Ok(self.wrap(slice))
    }

    /// Wraps a fresh slice of this device, noting its address once (a read
    /// on the allocating stream, which orders nothing new).
    fn wrap(&self, slice: CudaSlice<u8>) -> CudaBuffer {
        let ptr = {
            let (p, _record) = slice.device_ptr(&self.stream);
            p
        };
        CudaBuffer { ordinal: self.ordinal, len: slice.len(), ptr, slice: Some(slice) }
    }

    /// A new stream on this device (for example the one a caller runs
    /// collectives on, or a graph capture's).
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.ctx.new_stream().map_err(|e| driver_err("CUDA stream creation", e))
    }

    /// A device copy of the `len` bytes at device address `src` on this
    /// device: the way in for tensors of other CUDA libraries (candle,
    /// another cudarc version), which all expose their allocations'
    /// addresses. Waits for the copy, up to `timeout`.
    ///
    /// From candle (its `cuda` feature cannot be built beside this crate's
    /// dynamic loading of the driver, so this is the bridge). A sketch of
    /// the candle side, not compiled here and not run on a GPU yet:
    ///
    /// ```text
    /// let (storage, layout) = t.storage_and_layout();      // t: contiguous candle CUDA tensor
    /// let candle_core::Storage::Cuda(cs) = &*storage else { .. };
    /// let slice = cs.as_cuda_slice::<f32>()?;              // candle's cudarc
    /// let (ptr, _guard) = slice.device_ptr(cs.device().cuda_stream().as_ref());
    /// t.device().synchronize()?;                           // its writes are done
    /// let buf = unsafe { dev.copy_from_device_ptr(ptr + 4 * layout.start_offset() as u64, 4 * t.elem_count(), timeout)? };
    /// let ours = rankweave::tensor::Tensor::from_cuda(buf, t.dims().to_vec(), DType::F32)?;
    /// ```
    ///
    /// # Safety
    ///
    /// `src` must address at least `len` bytes of device memory on this
    /// device, allocated in its primary context (the context cudarc and
    /// candle use), with every write to them finished (synchronize the
    /// stream that made them first); they must not be freed or written until
    /// this call returns.
    pub unsafe fn copy_from_device_ptr(&self, src: u64, len: usize, timeout: Duration) -> Result<CudaBuffer> {
        let mut out = self.zeros(len)?;
        if len == 0 {
            return Ok(out);
        }
        let (dst, guard) = out.write_ptr(&self.stream, true);
        self.ctx.bind_to_thread().map_err(|e| driver_err("cuda copy from a device address", e))?;
        // SAFETY: `dst` is `len` bytes of our fresh allocation, ordered on
        // `self.stream` by its guard; `src` holds `len` finished bytes on
        // this device by the caller's contract; both live until the copy
        // finished (waited for below, before returning).
        let r = unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, len, self.stream.cu_stream()) };
        drop(guard);
        r.map_err(|e| driver_err("cuda copy from a device address", e))?;
        wait_for_stream(&self.stream, "cuda copy from a device address", timeout)?;
        Ok(out)
    }

    /// A device copy of `bytes`.
    pub fn upload(&self, bytes: &[u8]) -> Result<CudaBuffer> {
        if bytes.is_empty() {
            return self.zeros(0);
        }
        let slice = self.stream.clone_htod(bytes).map_err(|e| with_bytes(driver_err("cuda upload", e), bytes.len()))?;
        Ok(self.wrap(slice))
    }
}

/// Waits, up to `timeout`, until the work enqueued on `stream` so far has
/// finished: records an event and polls it (a short spin, then yields,
/// then short sleeps). `what` names the operation in the timeout error.
pub fn wait_for_stream(stream: &CudaStream, what: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let event = stream.context().new_event(None).map_err(|e| driver_err(what, e))?;
    event.record(stream).map_err(|e| driver_err(what, e))?;
    let mut polls = 0;
    loop {
        if event.try_is_complete().map_err(|e| driver_err(what, e))? {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(Error::timeout(Context::op(what), start.elapsed(), "the work on the CUDA stream to finish"));
        }
        backoff(&mut polls);
    }
}

/// Waits with a short spin, then yields, then sleeps (the machine may be
/// shared; device work can take long).
pub(crate) fn backoff(polls: &mut u32) {
    *polls = polls.saturating_add(1);
    if *polls < 64 {
        std::hint::spin_loop();
    } else if *polls < 1024 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The oldest driver API this build calls (cudarc's `cuda-12040` bindings):
/// an older driver would lack symbols, which cudarc turns into a panic.
pub const MIN_DRIVER_VERSION: i32 = 12_040;

/// The driver's CUDA version (`12040` for 12.4), after probing for it.
pub fn driver_version() -> Result<i32> {
    probe::cuda_driver()?;
    let mut v: std::ffi::c_int = 0;
    // SAFETY: the driver library is loaded (probed above) and
    // `cuDriverGetVersion`, present in every driver, only writes the int.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r != cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS {
        return Err(Error::Unsupported(format!("cuDriverGetVersion failed: {r:?}")));
    }
    Ok(v)
}

/// `Ok` for drivers at least [`MIN_DRIVER_VERSION`].
pub(crate) fn check_driver_version(v: i32) -> Result<()> {
    if v < MIN_DRIVER_VERSION {
        return Err(Error::Unsupported(format!(
            "the CUDA driver supports CUDA {}.{}, older than the 12.4 this build needs; update the NVIDIA driver",
            v / 1000,
            (v % 1000) / 10
        )));
    }
    Ok(())
}

fn with_bytes(mut e: Error, n: usize) -> Error {
    if let Error::OutOfMemory { bytes, .. } = &mut e {
        *bytes = n as u64;
    }
    e
}

/// Bytes in CUDA device memory (a tensor's storage on `cuda:N`).
pub struct CudaBuffer {
    ordinal: usize,
    len: usize,
    /// The device address (`0` for zero bytes), for the untracked accesses
    /// of a graph capture.
    ptr: u64,
    /// `None` for zero bytes (the driver refuses empty allocations).
    slice: Option<CudaSlice<u8>>,
}

impl std::fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBuffer").field("device", &self.ordinal).field("len", &self.len).finish()
    }
}

impl CudaBuffer {
    /// The device index.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device address of the bytes (`0` for zero bytes), for other CUDA
    /// libraries ([`CudaDevice::copy_from_device_ptr`] and
    /// [`CudaBuffer::copy_to_device_ptr`] on their side). Work this crate
    /// enqueued on the buffer may still be running: synchronize the device's
    /// stream before another library reads or writes through the address.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
    /// The cudarc slice (`None` for zero bytes).
    pub fn slice(&self) -> Option<&CudaSlice<u8>> {
        self.slice.as_ref()
    }

    /// A device-to-device copy; device memory exhaustion is an error.
    pub fn try_clone(&self) -> Result<CudaBuffer> {
        let dev = CudaDevice::get(self.ordinal)?;
        let Some(src) = &self.slice else {
            return dev.zeros(0);
        };
        let mut out = dev.zeros(self.len)?;
        if let Some(dst) = out.slice.as_mut() {
            dev.stream.memcpy_dtod(src, dst).map_err(|e| driver_err("cuda copy", e))?;
        }
        Ok(out)
    }

    /// Copies the bytes to the device address `dst` on the same device:
    /// the way out to other CUDA libraries' tensors (see
    /// [`CudaDevice::copy_from_device_ptr`]). Waits for the copy, up to
    /// `timeout`.
    ///
    /// # Safety
    ///
    /// `dst` must address at least `self.len()` bytes of device memory on
    /// this buffer's device, in its primary context, that nothing else
    /// reads or writes until this call returns.
    pub unsafe fn copy_to_device_ptr(&self, dst: u64, timeout: Duration) -> Result<()> {
        let Some(src) = &self.slice else { return Ok(()) };
        let dev = CudaDevice::get(self.ordinal)?;
        let (p, guard) = src.device_ptr(&dev.stream);
        dev.ctx.bind_to_thread().map_err(|e| driver_err("cuda copy to a device address", e))?;
        // SAFETY: `p` is our `len` bytes, ordered after their last write on
        // `dev.stream` by the guard; `dst` holds `len` writable bytes on this
        // device by the caller's contract; both live until the copy
        // finished (waited for below).
        let r = unsafe { cudarc::driver::result::memcpy_dtod_async(dst, p, self.len, dev.stream.cu_stream()) };
        drop(guard);
        r.map_err(|e| driver_err("cuda copy to a device address", e))?;
        wait_for_stream(&dev.stream, "cuda copy to a device address", timeout)
    }

    /// Copies the bytes to host memory (waits for the copy).
    pub fn download(&self, out: &mut [u8]) -> Result<()> {
        if out.len() != self.len {
            return Err(Error::invalid(format!(
                "download of {} device bytes into a host buffer of {}",
                self.len,
                out.len()
            )));
        }
        let Some(src) = &self.slice else { return Ok(()) };
        let dev = CudaDevice::get(self.ordinal)?;
        dev.stream.memcpy_dtoh(src, out).map_err(|e| driver_err("cuda download", e))?;
        dev.stream.synchronize().map_err(|e| driver_err("cuda download", e))
    }

    /// Overwrites the bytes with `bytes` (same length), in place: the
    /// device address stays the same (a captured graph keeps working on
    /// it). Waits for the copy, up to `timeout`.
    pub fn copy_from_host(&mut self, bytes: &[u8], timeout: Duration) -> Result<()> {
        if bytes.len() != self.len {
            return Err(Error::invalid(format!(
                "copy of a host buffer of {} bytes into {} device bytes",
                bytes.len(),
                self.len
            )));
        }
        let Some(dst) = self.slice.as_mut() else { return Ok(()) };
        let dev = CudaDevice::get(self.ordinal)?;
        dev.stream.memcpy_htod(bytes, dst).map_err(|e| driver_err("cuda copy_from_host", e))?;
        wait_for_stream(&dev.stream, "cuda copy_from_host", timeout)
    }

    /// The device address for reading on `stream`. With `tracked`, the
    /// access goes through cudarc's events: `stream` first waits for the
    /// last write, and the returned guard, dropped once the work is
    /// enqueued, records this read so later writers wait for it. Without
    /// (inside a graph capture, where waiting on an event recorded outside
    /// the capture is illegal) only the address is returned and ordering is
    /// the caller's. `0` for an empty buffer.
    pub(crate) fn read_ptr<'a>(&'a self, stream: &'a CudaStream, tracked: bool) -> (u64, Option<SyncOnDrop<'a>>) {
        match &self.slice {
            Some(s) if tracked => {
                let (p, g) = s.device_ptr(stream);
                (p, Some(g))
            }
            _ => (self.ptr, None),
        }
    }

    /// The device address for writing on `stream` (see [`Self::read_ptr`]).
    pub(crate) fn write_ptr<'a>(&'a mut self, stream: &'a CudaStream, tracked: bool) -> (u64, Option<SyncOnDrop<'a>>) {
        match &mut self.slice {
            Some(s) if tracked => {
                let (p, g) = s.device_ptr_mut(stream);
                (p, Some(g))
            }
            _ => (self.ptr, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_drivers_are_refused_by_name() {
        let e = check_driver_version(11_080).unwrap_err().to_string();
        assert!(e.contains("CUDA 11.8") && e.contains("12.4"), "{e}");
        assert!(check_driver_version(12_040).is_ok());
        assert!(check_driver_version(13_000).is_ok());
    }

    #[test]
    fn without_a_driver_devices_are_a_clean_error() {
        if probe::cuda_driver().is_ok() {
            return; // a GPU machine: the device tests cover this path
        }
        for e in [CudaDevice::get(0).unwrap_err(), CudaDevice::count().unwrap_err(), driver_version().unwrap_err()] {
            assert!(e.to_string().contains("no CUDA driver found"), "{e}");
        }
    }
}
