//! Device memory shared between processes on one GPU, through CUDA IPC.
//!
//! NCCL refuses two ranks on one GPU; CUDA IPC does not: one process
//! allocates an [`IpcBuffer`] and sends its [`IpcHandle`] (plain bytes,
//! [`IpcHandle::to_bytes`]) to another over any CPU channel (a CPU group),
//! which maps the same memory with [`IpcMapping::open`].
//!
//! The memory comes from `cuMemAlloc`, not from cudarc's stream-ordered
//! pool: the driver gives IPC handles only for the former. Copies in and
//! out are synchronous local copies (`cuMemcpyHtoD`/`DtoH`): they involve
//! no peer and so cannot wait on one. Ordering between the processes is
//! the caller's (a barrier on the CPU group after a write, before the
//! other side reads). The exporting process must keep its buffer alive
//! while others have it mapped.

use super::cuda::{driver_err, CudaDevice};
use crate::error::{Error, Result};
use cudarc::driver::sys;

/// Bytes of the driver's IPC memory handle (`CUipcMemHandle`).
pub const IPC_HANDLE_BYTES: usize = 64;

/// The encoding's first bytes and version.
const MAGIC: [u8; 4] = *b"RWIP";
const VERSION: u8 = 1;
/// magic, version, pid (8), ordinal (4), len (8), handle (64).
const ENCODED: usize = 4 + 1 + 8 + 4 + 8 + IPC_HANDLE_BYTES;

/// What another process needs to map an [`IpcBuffer`]: the driver's handle,
/// the device, the length and the exporting process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpcHandle {
    /// The device index in the exporting process.
    pub ordinal: usize,
    /// Bytes of the buffer.
    pub len: usize,
    /// The exporting process's id (a process cannot open its own handle).
    pub pid: u32,
    /// The driver's opaque handle.
    pub raw: [u8; IPC_HANDLE_BYTES],
}

impl IpcHandle {
    /// The handle as bytes for a CPU channel (little-endian, versioned).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODED);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&u64::from(self.pid).to_le_bytes());
        out.extend_from_slice(&(self.ordinal as u32).to_le_bytes());
        out.extend_from_slice(&(self.len as u64).to_le_bytes());
        out.extend_from_slice(&self.raw);
        out
    }

    /// Decodes [`Self::to_bytes`]'s output, as a peer sent it: a wrong
    /// length, magic, version or a value that does not fit is an error.
    pub fn from_bytes(b: &[u8]) -> Result<IpcHandle> {
        let bad = |what: &str| Error::invalid(format!("CUDA IPC handle from a peer: {what}"));
        if b.len() != ENCODED {
            return Err(bad(&format!("{} bytes, expected {ENCODED}", b.len())));
        }
        if b[..4] != MAGIC {
            return Err(bad("not an IPC handle (wrong magic)"));
        }
        if b[4] != VERSION {
            return Err(bad(&format!("encoding version {}, this build reads {VERSION}", b[4])));
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let pid = u32::try_from(u64_at(5)).map_err(|_| bad("process id out of range"))?;
        let mut o = [0u8; 4];
        o.copy_from_slice(&b[13..17]);
        let ordinal = u32::from_le_bytes(o) as usize;
        let len = usize::try_from(u64_at(17)).map_err(|_| bad("length does not fit this machine"))?;
        let mut raw = [0u8; IPC_HANDLE_BYTES];
        raw.copy_from_slice(&b[25..]);
        Ok(IpcHandle { ordinal, len, pid, raw })
    }
}

/// A driver error of an IPC call; "not supported" gets its own message.
fn ipc_err(what: &str, e: cudarc::driver::DriverError) -> Error {
    use sys::cudaError_enum as E;
    match e.0 {
        E::CUDA_ERROR_NOT_SUPPORTED | E::CUDA_ERROR_NOT_PERMITTED => Error::Unsupported(format!(
            "CUDA IPC is not supported here ({what}: {e}); it needs Linux, a device and driver with IPC, and \
             processes that may share device memory"
        )),
        _ => driver_err(what, e),
    }
}

/// Exportable device memory (`cuMemAlloc`), freed on drop.
#[derive(Debug)]
pub struct IpcBuffer {
    device: CudaDevice,
    ptr: u64,
    len: usize,
}

impl CudaDevice {
    /// `len` bytes of device memory that other processes can map
    /// ([`IpcBuffer::handle`]); `len` must be non-zero.
    pub fn alloc_ipc(&self, len: usize) -> Result<IpcBuffer> {
        if len == 0 {
            return Err(Error::invalid("an IPC buffer needs at least one byte"));
        }
        self.context().bind_to_thread().map_err(|e| driver_err("cuda ipc alloc", e))?;
        // SAFETY: the context is current on this thread; the allocation is
        // owned by the returned buffer and freed once, in its drop.
        let ptr = unsafe { cudarc::driver::result::malloc_sync(len) }.map_err(|e| driver_err("cuda ipc alloc", e))?;
        Ok(IpcBuffer { device: self.clone(), ptr, len })
    }
}

impl IpcBuffer {
    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Always false (an IPC buffer holds at least one byte).
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The device address.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// The handle another process opens with [`IpcMapping::open`].
    pub fn handle(&self) -> Result<IpcHandle> {
        self.device.context().bind_to_thread().map_err(|e| driver_err("cuIpcGetMemHandle", e))?;
        let mut h = sys::CUipcMemHandle { reserved: [0; IPC_HANDLE_BYTES] };
        // SAFETY: `h` is a valid out pointer; `ptr` is the base of a live
        // `cuMemAlloc` allocation of this context.
        let r = unsafe { sys::cuIpcGetMemHandle(&mut h, self.ptr) };
        r.result().map_err(|e| ipc_err("cuIpcGetMemHandle", e))?;
        Ok(IpcHandle {
            ordinal: self.device.ordinal(),
            len: self.len,
            pid: std::process::id(),
            raw: h.reserved.map(|c| c as u8),
        })
    }

    /// Copies `bytes` (the buffer's length) into the buffer.
    pub fn upload(&mut self, bytes: &[u8]) -> Result<()> {
        copy_in(&self.device, self.ptr, self.len, bytes)
    }
    /// Copies the buffer into `out` (the buffer's length).
    pub fn download(&self, out: &mut [u8]) -> Result<()> {
        copy_out(&self.device, self.ptr, self.len, out)
    }
}

impl Drop for IpcBuffer {
    fn drop(&mut self) {
        if self.device.context().bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from `cuMemAlloc` in this context and is
            // freed only here.
            let _ = unsafe { cudarc::driver::result::free_sync(self.ptr) };
        }
    }
}

fn check_len(what: &str, want: usize, got: usize) -> Result<()> {
    if want != got {
        return Err(Error::invalid(format!("{what}: a host buffer of {got} bytes for {want} device bytes")));
    }
    Ok(())
}

fn copy_in(dev: &CudaDevice, ptr: u64, len: usize, bytes: &[u8]) -> Result<()> {
    check_len("cuda ipc upload", len, bytes.len())?;
    dev.context().bind_to_thread().map_err(|e| driver_err("cuda ipc upload", e))?;
    // SAFETY: `ptr` addresses `len` live device bytes (checked equal to
    // `bytes.len()`); the copy is synchronous, so `bytes` outlives it.
    unsafe { cudarc::driver::result::memcpy_htod_sync(ptr, bytes) }.map_err(|e| driver_err("cuda ipc upload", e))
}

fn copy_out(dev: &CudaDevice, ptr: u64, len: usize, out: &mut [u8]) -> Result<()> {
    check_len("cuda ipc download", len, out.len())?;
    dev.context().bind_to_thread().map_err(|e| driver_err("cuda ipc download", e))?;
    // SAFETY: as in `copy_in`, with `out` written by a synchronous copy.
    unsafe { cudarc::driver::result::memcpy_dtoh_sync(out, ptr) }.map_err(|e| driver_err("cuda ipc download", e))
}

/// Another process's [`IpcBuffer`], mapped into this one; unmapped on drop.
#[derive(Debug)]
pub struct IpcMapping {
    device: CudaDevice,
    ptr: u64,
    len: usize,
}

impl IpcMapping {
    /// Maps the memory `handle` names (on `cuda:handle.ordinal`, which must
    /// be the same GPU in this process). A handle of this very process is
    /// refused (the driver does not open those).
    pub fn open(handle: &IpcHandle) -> Result<IpcMapping> {
        if handle.pid == std::process::id() {
            return Err(Error::invalid("CUDA IPC: a process cannot open its own handle; use the buffer itself"));
        }
        if handle.len == 0 {
            return Err(Error::invalid("CUDA IPC handle from a peer: zero bytes"));
        }
        let device = CudaDevice::get(handle.ordinal)?;
        device.context().bind_to_thread().map_err(|e| driver_err("cuIpcOpenMemHandle", e))?;
        let raw = sys::CUipcMemHandle { reserved: handle.raw.map(|b| b as std::ffi::c_char) };
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid out pointer; `raw` is a handle's bytes as
        // the exporting driver produced them (a forged one is rejected by
        // the driver with an error).
        let r = unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                raw,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as std::ffi::c_uint,
            )
        };
        r.result().map_err(|e| ipc_err("cuIpcOpenMemHandle", e))?;
        Ok(IpcMapping { device, ptr, len: handle.len })
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Always false (an IPC buffer holds at least one byte).
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The device address in this process.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
    /// Copies `bytes` (the buffer's length) into the shared memory.
    pub fn upload(&mut self, bytes: &[u8]) -> Result<()> {
        copy_in(&self.device, self.ptr, self.len, bytes)
    }
    /// Copies the shared memory into `out` (the buffer's length).
    pub fn download(&self, out: &mut [u8]) -> Result<()> {
        copy_out(&self.device, self.ptr, self.len, out)
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        if self.device.context().bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from `cuIpcOpenMemHandle` and is closed
            // only here.
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.ptr) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> IpcHandle {
        let mut raw = [0u8; IPC_HANDLE_BYTES];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        IpcHandle { ordinal: 3, len: 1 << 33, pid: 4242, raw }
    }

    #[test]
    fn handles_round_trip_through_bytes() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(b.len(), ENCODED);
        assert_eq!(&b[..4], b"RWIP");
        assert_eq!(IpcHandle::from_bytes(&b).unwrap(), h);
        let z = IpcHandle { ordinal: 0, len: 1, pid: 0, raw: [0; IPC_HANDLE_BYTES] };
        assert_eq!(IpcHandle::from_bytes(&z.to_bytes()).unwrap(), z);
    }

    #[test]
    fn bad_handle_bytes_from_a_peer_are_clean_errors() {
        let b = sample().to_bytes();
        let msg = |bytes: &[u8]| IpcHandle::from_bytes(bytes).unwrap_err().to_string();
        assert!(msg(&b[..b.len() - 1]).contains("88 bytes, expected 89"), "{}", msg(&b[..b.len() - 1]));
        assert!(msg(&[]).contains("0 bytes"));
        let mut m = b.clone();
        m[0] = b'X';
        assert!(msg(&m).contains("wrong magic"));
        let mut v = b.clone();
        v[4] = 9;
        assert!(msg(&v).contains("version 9"));
        let mut p = b.clone();
        p[5..13].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(msg(&p).contains("process id"));
        let mut longer = b.clone();
        longer.push(0);
        assert!(msg(&longer).contains("90 bytes"));
    }

    #[test]
    fn opening_needs_another_process_and_bytes() {
        let mut h = sample();
        h.pid = std::process::id();
        let e = IpcMapping::open(&h).unwrap_err().to_string();
        assert!(e.contains("its own handle"), "{e}");
        h.pid = std::process::id().wrapping_add(1);
        h.len = 0;
        assert!(IpcMapping::open(&h).unwrap_err().to_string().contains("zero bytes"));
        if super::super::probe::cuda_driver().is_err() {
            h.len = 16;
            let e = IpcMapping::open(&h).unwrap_err().to_string();
            assert!(e.contains("no CUDA driver found"), "{e}");
            let e = CudaDevice::get(0).and_then(|d| d.alloc_ipc(16)).unwrap_err().to_string();
            assert!(e.contains("no CUDA driver found"), "{e}");
        }
    }
}
