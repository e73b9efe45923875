//! An NCCL communicator for one group, in non-blocking mode, behind a mutex.
//!
//! # Ownership and threads
//!
//! cudarc's `Comm` is neither `Send` nor `Sync` because it holds a raw
//! `ncclComm_t`. [`NcclComm`] holds the raw handle itself, inside a
//! [`Mutex`], and every NCCL call on it is made with that mutex held: the
//! handle moves between threads but is never used by two at once, which is
//! exactly NCCL's rule for communicators (they are not bound to the thread
//! that created them, and calls on one communicator must be serialized).
//! Only [`CommHandle`] carries an `unsafe impl Send`; the argument is next to
//! it.
//!
//! # Deadlines
//!
//! The communicator is created with `blocking = 0`: initialization and
//! enqueueing return at once (`ncclInProgress`) and progress is polled with
//! `ncclCommGetAsyncError`. Every operation then waits for its work to
//! finish on the group's stream by polling a CUDA event, until the group's
//! timeout. When the deadline passes, or NCCL reports an asynchronous error
//! (a dead peer shows up as `ncclRemoteError` or `ncclSystemError`), the
//! communicator is aborted with `ncclCommAbort`, later calls fail with
//! [`Error::Poisoned`], and the error names the operation and the group.

use super::cuda::{driver_err, CudaBuffer, CudaDevice};
use super::mapping::{
    check_nccl_version, exchange_unique_id, nccl_dtype, nccl_error, nccl_op, nonblocking_config, UNIQUE_ID_BYTES,
};
use super::probe;
use crate::dtype::DType;
use crate::error::{Context, Error, Result};
use crate::group::ProcessGroup;
use crate::reduce::ReduceOp;
use cudarc::driver::CudaStream;
use cudarc::nccl::sys;
use std::ffi::{c_int, c_void, CStr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The NCCL library's version code (`22703` for 2.27.3), after probing for it.
pub fn nccl_version() -> Result<i32> {
    probe::nccl_library()?;
    cudarc::nccl::result::get_nccl_version().map_err(|e| nccl_error(Context::op("ncclGetVersion"), e.0, ""))
}

/// A fresh NCCL unique id (`ncclGetUniqueId`), after probing for the library.
pub fn new_unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
    probe::nccl_library()?;
    let id = cudarc::nccl::result::get_uniqueid().map_err(|e| nccl_error(Context::op("ncclGetUniqueId"), e.0, ""))?;
    Ok(id.internal.map(|c| c as u8))
}

/// The raw communicator and whether it was aborted.
struct CommHandle {
    raw: sys::ncclComm_t,
    /// Why it was aborted; `Some` once `ncclCommAbort` ran (the handle is
    /// then freed and never passed to NCCL again).
    aborted: Option<String>,
}

// SAFETY: `ncclComm_t` is a pointer to NCCL's communicator state, which NCCL
// does not tie to the creating thread (no thread-local state is keyed on it;
// NCCL's documentation allows using a communicator from any thread as long
// as calls on it are not concurrent). `CommHandle` lives only inside
// `NcclComm::handle`, a `Mutex`, and every function that passes `raw` to
// NCCL holds that lock for the whole call and the polling after it, so no
// two threads ever use the handle at once. `Sync` is not implemented: the
// `Mutex` provides it.
unsafe impl Send for CommHandle {}

/// One group's NCCL communicator on one CUDA device, with its own stream.
pub struct NcclComm {
    name: String,
    rank: usize,
    size: usize,
    device: CudaDevice,
    stream: Arc<CudaStream>,
    timeout: Duration,
    handle: Mutex<CommHandle>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("name", &self.name)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("device", &self.device.ordinal())
            .finish()
    }
}

/// Waits with a short spin, then yields, then sleeps (the machine may be
/// shared; a collective can take long).
fn backoff(polls: &mut u32) {
    *polls = polls.saturating_add(1);
    if *polls < 64 {
        std::hint::spin_loop();
    } else if *polls < 1024 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn last_error(raw: sys::ncclComm_t) -> String {
    // SAFETY: `ncclGetLastError` accepts any communicator (or null) and
    // returns a pointer to a NUL-terminated string owned by NCCL that stays
    // valid until the next NCCL call on this thread; it is copied at once.
    unsafe {
        let p = sys::ncclGetLastError(raw);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

fn async_state(raw: sys::ncclComm_t) -> sys::ncclResult_t {
    let mut state = sys::ncclResult_t::ncclSuccess;
    // SAFETY: `raw` is a live (not aborted) communicator: callers hold the
    // handle's lock and checked `aborted`; `state` is a valid out pointer.
    let r = unsafe { sys::ncclCommGetAsyncError(raw, &mut state) };
    if r != sys::ncclResult_t::ncclSuccess {
        return r;
    }
    state
}

impl NcclComm {
    /// Creates the communicator of `pg`'s ranks on `cuda:ordinal`: probes
    /// for the driver and NCCL, exchanges rank 0's unique id over `pg` (a
    /// CPU group), then initializes in non-blocking mode within `pg`'s
    /// timeout. Every rank of `pg` must call it.
    pub fn new(pg: &ProcessGroup, name: &str, ordinal: usize) -> Result<NcclComm> {
        let ctx = Context::new("nccl init", name, pg.rank());
        probe::cuda_driver()?;
        check_nccl_version(nccl_version()?)?;
        let device = CudaDevice::get(ordinal)?;
        let id = exchange_unique_id(pg, new_unique_id)?;
        let stream = device.context().new_stream().map_err(|e| driver_err("CUDA stream creation", e))?;
        let timeout = pg.timeout();
        let size = c_int::try_from(pg.size()).map_err(|_| Error::invalid("group too large for NCCL"))?;
        let rank = c_int::try_from(pg.rank()).map_err(|_| Error::invalid("rank too large for NCCL"))?;
        device.context().bind_to_thread().map_err(|e| driver_err("nccl init", e))?;
        let mut config = nonblocking_config();
        let mut raw: sys::ncclComm_t = std::ptr::null_mut();
        let uid = sys::ncclUniqueId { internal: id.map(|b| b as std::ffi::c_char) };
        // SAFETY: `raw` and `config` are valid for writes and reads for the
        // call; `config` is NCCL's initializer for the header version it
        // names; `uid` is the id rank 0 produced, the same on every rank.
        let r = unsafe { sys::ncclCommInitRankConfig(&mut raw, size, uid, rank, &mut config) };
        if !matches!(r, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
            let last = last_error(raw);
            if !raw.is_null() {
                // SAFETY: a non-null handle from a failed init is NCCL's to
                // free with abort; it is not used afterwards.
                unsafe { sys::ncclCommAbort(raw) };
            }
            return Err(nccl_error(ctx, r, &last));
        }
        let comm = NcclComm {
            name: name.to_string(),
            rank: pg.rank(),
            size: pg.size(),
            device,
            stream,
            timeout,
            handle: Mutex::new(CommHandle { raw, aborted: None }),
        };
        {
            let mut h = comm.lock();
            comm.wait_ready(&mut h, "nccl init", Instant::now())?;
        }
        Ok(comm)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CommHandle> {
        self.handle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Group name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// This rank's position.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }
    /// The device.
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }
    /// The stream the group's collectives run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Why the communicator was aborted, once it was.
    pub fn aborted(&self) -> Option<String> {
        self.lock().aborted.clone()
    }

    fn ctx(&self, op: &str) -> Context {
        Context::new(op, &self.name, self.rank)
    }

    /// Aborts the communicator (frees it; pending work is cancelled) and
    /// records why.
    fn abort(&self, h: &mut CommHandle, why: &str) {
        if h.aborted.is_none() {
            // SAFETY: the handle is live (not aborted yet) and the lock is
            // held; after this call it is never passed to NCCL again.
            unsafe { sys::ncclCommAbort(h.raw) };
            h.aborted = Some(why.to_string());
        }
    }

    /// Polls `ncclCommGetAsyncError` until the communicator is no longer
    /// in progress (init done, or a non-blocking call fully enqueued).
    fn wait_ready(&self, h: &mut CommHandle, op: &str, start: Instant) -> Result<()> {
        let mut polls = 0;
        loop {
            match async_state(h.raw) {
                sys::ncclResult_t::ncclSuccess => return Ok(()),
                sys::ncclResult_t::ncclInProgress => {}
                r => {
                    let e = nccl_error(self.ctx(op), r, &last_error(h.raw));
                    self.abort(h, &e.to_string());
                    return Err(e);
                }
            }
            if start.elapsed() >= self.timeout {
                let e = Error::timeout(self.ctx(op), start.elapsed(), "NCCL to finish enqueueing (a peer may be gone)");
                self.abort(h, &e.to_string());
                return Err(e);
            }
            backoff(&mut polls);
        }
    }

    /// Runs one operation: `enqueue` gets the communicator and the stream
    /// and makes the NCCL calls; then waits until the work has finished on
    /// the stream, or aborts at the deadline.
    fn run(
        &self,
        op: &str,
        enqueue: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t,
    ) -> Result<()> {
        let mut h = self.lock();
        if let Some(cause) = &h.aborted {
            return Err(Error::Poisoned { group: self.name.clone(), cause: cause.clone() });
        }
        let start = Instant::now();
        self.device.context().bind_to_thread().map_err(|e| driver_err(op, e))?;
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        let r = enqueue(h.raw, stream);
        if !matches!(r, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
            let e = nccl_error(self.ctx(op), r, &last_error(h.raw));
            if e.poisons_group() {
                self.abort(&mut h, &e.to_string());
            }
            return Err(e);
        }
        self.wait_ready(&mut h, op, start)?;
        let event = self.device.context().new_event(None).map_err(|e| driver_err(op, e))?;
        event.record(&self.stream).map_err(|e| driver_err(op, e))?;
        let mut polls = 0;
        loop {
            if event.try_is_complete().map_err(|e| driver_err(op, e))? {
                return Ok(());
            }
            let state = async_state(h.raw);
            if !matches!(state, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
                let e = nccl_error(self.ctx(op), state, &last_error(h.raw));
                self.abort(&mut h, &e.to_string());
                return Err(e);
            }
            if start.elapsed() >= self.timeout {
                let e = Error::timeout(self.ctx(op), start.elapsed(), "the collective to finish on the device");
                self.abort(&mut h, &e.to_string());
                return Err(e);
            }
            backoff(&mut polls);
        }
    }

    fn check_ordinal(&self, b: &CudaBuffer, op: &str) -> Result<()> {
        if b.ordinal() != self.device.ordinal() {
            return Err(Error::invalid(format!(
                "{}: a tensor on cuda:{} in a group on cuda:{}",
                self.ctx(op),
                b.ordinal(),
                self.device.ordinal()
            )));
        }
        Ok(())
    }

    fn peer(&self, op: &str, r: usize) -> Result<c_int> {
        if r >= self.size {
            return Err(Error::invalid(format!("{}: rank {r} out of range for {} ranks", self.ctx(op), self.size)));
        }
        Ok(r as c_int)
    }

    /// In-place all-reduce of `buf` (elements of `dtype`).
    pub fn all_reduce(&self, buf: &mut CudaBuffer, dtype: DType, op: ReduceOp) -> Result<()> {
        self.check_ordinal(buf, "all_reduce")?;
        let count = buf.len() / dtype.size();
        let (p, _g) = buf.write_ptr(&self.stream);
        self.run("all_reduce", |comm, s| {
            // SAFETY: `p` addresses `count` elements of `dtype` on this
            // group's device, kept alive (and ordered) by `_g` until the
            // work finished; in-place all-reduce is allowed by NCCL.
            unsafe {
                sys::ncclAllReduce(p as *const c_void, p as *mut c_void, count, nccl_dtype(dtype), nccl_op(op), comm, s)
            }
        })
    }

    /// Gathers every rank's `input` into `out` (`size * input.len()` bytes,
    /// rank order).
    pub fn all_gather(&self, input: &CudaBuffer, out: &mut CudaBuffer) -> Result<()> {
        self.check_ordinal(input, "all_gather")?;
        self.check_ordinal(out, "all_gather")?;
        self.check_len("all_gather", out.len(), input.len().checked_mul(self.size))?;
        let n = input.len();
        let (sp, _g1) = input.read_ptr(&self.stream);
        let (rp, _g2) = out.write_ptr(&self.stream);
        self.run("all_gather", |comm, s| {
            // SAFETY: `sp` holds `n` bytes and `rp` `size * n` bytes on this
            // group's device (checked above), alive until the work finished.
            unsafe {
                sys::ncclAllGather(sp as *const c_void, rp as *mut c_void, n, sys::ncclDataType_t::ncclUint8, comm, s)
            }
        })
    }

    /// Reduces `input` (`size` equal blocks) and leaves block `rank` in `out`.
    pub fn reduce_scatter(&self, input: &CudaBuffer, out: &mut CudaBuffer, dtype: DType, op: ReduceOp) -> Result<()> {
        self.check_ordinal(input, "reduce_scatter")?;
        self.check_ordinal(out, "reduce_scatter")?;
        self.check_len("reduce_scatter", input.len(), out.len().checked_mul(self.size))?;
        let count = out.len() / dtype.size();
        let (sp, _g1) = input.read_ptr(&self.stream);
        let (rp, _g2) = out.write_ptr(&self.stream);
        self.run("reduce_scatter", |comm, s| {
            // SAFETY: `sp` holds `size * count` and `rp` `count` elements of
            // `dtype` on this device (checked above), alive until finished.
            unsafe {
                sys::ncclReduceScatter(
                    sp as *const c_void,
                    rp as *mut c_void,
                    count,
                    nccl_dtype(dtype),
                    nccl_op(op),
                    comm,
                    s,
                )
            }
        })
    }

    /// In-place broadcast of `buf` from `root`.
    pub fn broadcast(&self, buf: &mut CudaBuffer, root: usize) -> Result<()> {
        self.check_ordinal(buf, "broadcast")?;
        let root = self.peer("broadcast", root)?;
        let n = buf.len();
        let (p, _g) = buf.write_ptr(&self.stream);
        self.run("broadcast", |comm, s| {
            // SAFETY: `p` holds `n` bytes on this device, alive until finished.
            unsafe {
                sys::ncclBroadcast(
                    p as *const c_void,
                    p as *mut c_void,
                    n,
                    sys::ncclDataType_t::ncclUint8,
                    root,
                    comm,
                    s,
                )
            }
        })
    }

    /// In-place reduce of `buf` onto `root` (other ranks' `buf` is left as is).
    pub fn reduce(&self, buf: &mut CudaBuffer, dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
        self.check_ordinal(buf, "reduce")?;
        let root = self.peer("reduce", root)?;
        let count = buf.len() / dtype.size();
        let (p, _g) = buf.write_ptr(&self.stream);
        self.run("reduce", |comm, s| {
            // SAFETY: `p` holds `count` elements of `dtype` on this device,
            // alive until finished; NCCL allows an in-place reduce.
            unsafe {
                sys::ncclReduce(
                    p as *const c_void,
                    p as *mut c_void,
                    count,
                    nccl_dtype(dtype),
                    nccl_op(op),
                    root,
                    comm,
                    s,
                )
            }
        })
    }

    /// Gathers every rank's `input` on `root` into `out` (`Some` on `root`
    /// only): grouped sends and receives, since NCCL has no gather.
    pub fn gather(&self, input: &CudaBuffer, out: Option<&mut CudaBuffer>, root: usize) -> Result<()> {
        self.check_ordinal(input, "gather")?;
        let root_c = self.peer("gather", root)?;
        let n = input.len();
        let (sp, _g1) = input.read_ptr(&self.stream);
        match out {
            Some(out) if self.rank == root => {
                self.check_ordinal(out, "gather")?;
                self.check_len("gather", out.len(), n.checked_mul(self.size))?;
                let (rp, _g2) = out.write_ptr(&self.stream);
                self.grouped("gather", |comm, s| {
                    let mut calls = Vec::with_capacity(self.size);
                    for r in 0..self.size {
                        let dst = rp + (r * n) as u64;
                        // SAFETY: block `r` of `out` (`n` bytes, in range by
                        // the length check) and `input` (`n` bytes) are on
                        // this device and alive until the group finished.
                        calls.push(unsafe {
                            if r == self.rank {
                                match cudarc::driver::result::memcpy_dtod_async(dst, sp, n, s as _) {
                                    Ok(()) => sys::ncclResult_t::ncclSuccess,
                                    Err(_) => sys::ncclResult_t::ncclUnhandledCudaError,
                                }
                            } else {
                                sys::ncclRecv(
                                    dst as *mut c_void,
                                    n,
                                    sys::ncclDataType_t::ncclUint8,
                                    r as c_int,
                                    comm,
                                    s,
                                )
                            }
                        });
                    }
                    calls
                })
            }
            Some(_) | None if self.rank == root => {
                Err(Error::invalid(format!("{}: the root must pass an output", self.ctx("gather"))))
            }
            _ => self.grouped("gather", |comm, s| {
                // SAFETY: `input` holds `n` bytes on this device, alive until finished.
                vec![unsafe { sys::ncclSend(sp as *const c_void, n, sys::ncclDataType_t::ncclUint8, root_c, comm, s) }]
            }),
        }
    }

    /// Sends block `j` of `input` to rank `j` and places the block from rank
    /// `i` at block `i` of `out` (grouped sends and receives).
    pub fn all_to_all(&self, input: &CudaBuffer, out: &mut CudaBuffer) -> Result<()> {
        self.check_ordinal(input, "all_to_all")?;
        self.check_ordinal(out, "all_to_all")?;
        self.check_len("all_to_all", out.len(), Some(input.len()))?;
        if input.len() % self.size != 0 {
            return Err(Error::invalid(format!(
                "{}: {} bytes do not split into {} blocks",
                self.ctx("all_to_all"),
                input.len(),
                self.size
            )));
        }
        let b = input.len() / self.size;
        let (sp, _g1) = input.read_ptr(&self.stream);
        let (rp, _g2) = out.write_ptr(&self.stream);
        self.grouped("all_to_all", |comm, s| {
            let mut calls = Vec::with_capacity(2 * self.size);
            for r in 0..self.size {
                let (src, dst) = (sp + (r * b) as u64, rp + (r * b) as u64);
                // SAFETY: blocks `r` of `input` and `out` (`b` bytes each,
                // in range: both hold `size * b`) are on this device and
                // alive until the group finished.
                unsafe {
                    if r == self.rank {
                        calls.push(match cudarc::driver::result::memcpy_dtod_async(dst, src, b, s as _) {
                            Ok(()) => sys::ncclResult_t::ncclSuccess,
                            Err(_) => sys::ncclResult_t::ncclUnhandledCudaError,
                        });
                    } else {
                        calls.push(sys::ncclSend(
                            src as *const c_void,
                            b,
                            sys::ncclDataType_t::ncclUint8,
                            r as c_int,
                            comm,
                            s,
                        ));
                        calls.push(sys::ncclRecv(
                            dst as *mut c_void,
                            b,
                            sys::ncclDataType_t::ncclUint8,
                            r as c_int,
                            comm,
                            s,
                        ));
                    }
                }
            }
            calls
        })
    }

    /// Sends `buf` to `dst`.
    pub fn send(&self, buf: &CudaBuffer, dst: usize) -> Result<()> {
        self.check_ordinal(buf, "send")?;
        let peer = self.peer("send", dst)?;
        let n = buf.len();
        let (p, _g) = buf.read_ptr(&self.stream);
        self.run("send", |comm, s| {
            // SAFETY: `p` holds `n` bytes on this device, alive until finished.
            unsafe { sys::ncclSend(p as *const c_void, n, sys::ncclDataType_t::ncclUint8, peer, comm, s) }
        })
        .map_err(|e| with_peer(e, dst))
    }

    /// Receives `buf.len()` bytes from `src` into `buf`.
    pub fn recv(&self, buf: &mut CudaBuffer, src: usize) -> Result<()> {
        self.check_ordinal(buf, "recv")?;
        let peer = self.peer("recv", src)?;
        let n = buf.len();
        let (p, _g) = buf.write_ptr(&self.stream);
        self.run("recv", |comm, s| {
            // SAFETY: `p` holds `n` bytes on this device, alive until finished.
            unsafe { sys::ncclRecv(p as *mut c_void, n, sys::ncclDataType_t::ncclUint8, peer, comm, s) }
        })
        .map_err(|e| with_peer(e, src))
    }

    /// Runs several NCCL calls as one group (`ncclGroupStart`/`End`); the
    /// first failing call's code is the result.
    fn grouped(
        &self,
        op: &str,
        calls: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Vec<sys::ncclResult_t>,
    ) -> Result<()> {
        self.run(op, |comm, s| {
            // SAFETY: group calls take no arguments; every start is matched
            // by the end below, whatever the calls in between return.
            let start = unsafe { sys::ncclGroupStart() };
            if start != sys::ncclResult_t::ncclSuccess {
                return start;
            }
            let results = calls(comm, s);
            // SAFETY: closes the group opened above.
            let end = unsafe { sys::ncclGroupEnd() };
            results
                .into_iter()
                .find(|r| !matches!(r, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress))
                .unwrap_or(end)
        })
    }

    fn check_len(&self, op: &str, got: usize, want: Option<usize>) -> Result<()> {
        if want != Some(got) {
            return Err(Error::invalid(format!(
                "{}: buffer of {got} bytes, expected {}",
                self.ctx(op),
                want.map_or_else(|| "more than usize::MAX".into(), |w| w.to_string())
            )));
        }
        Ok(())
    }
}

fn with_peer(mut e: Error, peer: usize) -> Error {
    if let Some(c) = e.context_mut() {
        c.peer.get_or_insert(peer);
    }
    e
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let h = self.handle.get_mut().unwrap_or_else(|e| e.into_inner());
        if h.aborted.is_none() {
            // Abort rather than destroy: destroy waits for peers, and a
            // drop must not hang on a dead one. Every operation already
            // waited for its work, so nothing useful is cancelled.
            if self.device.context().bind_to_thread().is_ok() {
                // SAFETY: the handle is live and this is its last use
                // (`&mut self`: no other thread holds the lock).
                unsafe { sys::ncclCommAbort(h.raw) };
            }
            h.aborted = Some("dropped".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::mapping::tests::world;
    use super::super::mapping::MIN_NCCL_VERSION;
    use super::*;

    #[test]
    fn unique_ids_come_from_nccl_or_a_clean_error() {
        match probe::nccl_library() {
            Ok(_) => {
                let v = nccl_version().unwrap();
                assert!(v >= MIN_NCCL_VERSION, "{v}");
                // NCCL's id needs no GPU: two calls give two different ids.
                let (a, b) = (new_unique_id().unwrap(), new_unique_id().unwrap());
                assert_ne!(a, b);
                assert!(a.iter().any(|&x| x != 0));
            }
            Err(e) => assert!(new_unique_id().unwrap_err().to_string().contains("NCCL library not found"), "{e}"),
        }
    }

    #[test]
    fn without_the_libraries_init_is_a_clean_error() {
        // On a machine with neither library (this project's CI), creating a
        // communicator fails with the probe's message and never panics.
        if probe::cuda_driver().is_ok() && probe::nccl_library().is_ok() {
            return; // a GPU machine: the device tests cover this path
        }
        let pg = world(1).pop().unwrap();
        let e = NcclComm::new(&pg, "tp:0", 0).unwrap_err().to_string();
        assert!(e.contains("no CUDA driver found") || e.contains("NCCL library not found"), "{e}");
        let e = new_unique_id();
        if probe::nccl_library().is_err() {
            assert!(e.unwrap_err().to_string().contains("NCCL library not found"));
        }
    }
}
