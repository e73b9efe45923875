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

/// Bytes in an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// NCCL's data type for a rankweave dtype (NCCL has all eight).
pub fn nccl_dtype(dtype: DType) -> sys::ncclDataType_t {
    use sys::ncclDataType_t as T;
    match dtype {
        DType::F32 => T::ncclFloat32,
        DType::F64 => T::ncclFloat64,
        DType::F16 => T::ncclFloat16,
        DType::BF16 => T::ncclBfloat16,
        DType::I8 => T::ncclInt8,
        DType::U8 => T::ncclUint8,
        DType::I32 => T::ncclInt32,
        DType::I64 => T::ncclInt64,
    }
}

/// NCCL's reduction for a rankweave operator. `ncclAvg` divides the sum by
/// the group size (truncating for integers), as [`ReduceOp::Avg`] does.
pub fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    use sys::ncclRedOp_t as O;
    match op {
        ReduceOp::Sum => O::ncclSum,
        ReduceOp::Prod => O::ncclProd,
        ReduceOp::Min => O::ncclMin,
        ReduceOp::Max => O::ncclMax,
        ReduceOp::Avg => O::ncclAvg,
    }
}

/// NCCL's name for a result code.
fn result_name(r: sys::ncclResult_t) -> &'static str {
    use sys::ncclResult_t as R;
    match r {
        R::ncclSuccess => "ncclSuccess",
        R::ncclUnhandledCudaError => "ncclUnhandledCudaError",
        R::ncclSystemError => "ncclSystemError",
        R::ncclInternalError => "ncclInternalError",
        R::ncclInvalidArgument => "ncclInvalidArgument",
        R::ncclInvalidUsage => "ncclInvalidUsage",
        R::ncclRemoteError => "ncclRemoteError",
        R::ncclInProgress => "ncclInProgress",
        // Code 8: ncclTimeout in NCCL >= 2.30, past the end before.
        R::ncclNumResults => "ncclTimeout (code 8)",
    }
}

/// The crate's error for an NCCL failure `r` during `ctx` (`last` is NCCL's
/// own last message, when there is one). A remote failure is a lost peer; a
/// bad argument is the caller's; the rest (system, internal, CUDA) poison
/// the group as I/O errors do.
pub(crate) fn nccl_error(ctx: Context, r: sys::ncclResult_t, last: &str) -> Error {
    use sys::ncclResult_t as R;
    let detail = if last.is_empty() { result_name(r).to_string() } else { format!("{}: {last}", result_name(r)) };
    match r {
        R::ncclRemoteError => Error::PeerLost { ctx, detail: format!("NCCL reports a remote failure ({detail})") },
        R::ncclInvalidArgument | R::ncclInvalidUsage => {
            Error::InvalidArgument(format!("{ctx}: NCCL refused: {detail}"))
        }
        R::ncclNumResults => Error::timeout(ctx, Duration::ZERO, format!("NCCL's own timeout ({detail})")),
        _ => Error::io(ctx, std::io::Error::other(format!("NCCL failed: {detail}"))),
    }
}

/// The oldest NCCL this build calls (2.14: `ncclCommInitRankConfig`, the
/// non-blocking mode and `ncclGetLastError`); an older library lacks
/// symbols, which cudarc turns into a panic.
pub const MIN_NCCL_VERSION: i32 = 21_400;

/// The NCCL library's version code (`22703` for 2.27.3), after probing for it.
pub fn nccl_version() -> Result<i32> {
    probe::nccl_library()?;
    cudarc::nccl::result::get_nccl_version().map_err(|e| nccl_error(Context::op("ncclGetVersion"), e.0, ""))
}

/// `Ok` for NCCL at least [`MIN_NCCL_VERSION`].
fn check_nccl_version(v: i32) -> Result<()> {
    if v < MIN_NCCL_VERSION {
        return Err(Error::Unsupported(format!(
            "NCCL {}.{}.{} is older than the 2.14 this build needs; install a newer nvidia-nccl",
            v / 10_000,
            (v % 10_000) / 100,
            v % 100
        )));
    }
    Ok(())
}

/// A fresh NCCL unique id (`ncclGetUniqueId`), after probing for the library.
pub fn new_unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
    probe::nccl_library()?;
    let id = cudarc::nccl::result::get_uniqueid().map_err(|e| nccl_error(Context::op("ncclGetUniqueId"), e.0, ""))?;
    Ok(id.internal.map(|c| c as u8))
}

/// Sends group rank 0's unique id to every rank over the CPU group `pg`.
///
/// Rank 0 calls `make`; its outcome travels as one status byte ahead of the
/// id, so that a rank 0 that could not make one fails the others at once
/// (naming rank 0) instead of leaving them to time out.
pub fn exchange_unique_id(
    pg: &ProcessGroup,
    make: impl FnOnce() -> Result<[u8; UNIQUE_ID_BYTES]>,
) -> Result<[u8; UNIQUE_ID_BYTES]> {
    let mut frame = [0u8; 1 + UNIQUE_ID_BYTES];
    let mut local_err = None;
    if pg.rank() == 0 {
        match make() {
            Ok(id) => {
                frame[0] = 1;
                frame[1..].copy_from_slice(&id);
            }
            Err(e) => local_err = Some(e),
        }
    }
    pg.broadcast_bytes(&mut frame, 0)?;
    if let Some(e) = local_err {
        return Err(e);
    }
    match frame[0] {
        1 => {
            let mut id = [0u8; UNIQUE_ID_BYTES];
            id.copy_from_slice(&frame[1..]);
            Ok(id)
        }
        0 => Err(Error::Unsupported(format!(
            "nccl unique id in group {}: group rank 0 could not create one (see its log)",
            pg.name()
        ))),
        b => Err(Error::protocol(
            Context::new("nccl unique id", pg.name(), pg.rank()).with_peer(0),
            format!("status byte {b}, expected 0 or 1"),
        )),
    }
}

/// The non-blocking configuration: NCCL's `NCCL_CONFIG_INITIALIZER` with
/// `blocking = 0` (fields left at NCCL's "undefined" markers take NCCL's
/// defaults).
fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF_INT: c_int = c_int::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        // NCCL_VERSION(2, 24, 0): the header these bindings come from.
        version: 2 * 10_000 + 24 * 100,
        blocking: 0,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: UNDEF_INT,
    }
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
    use super::*;
    use crate::group::{GroupOptions, ProcessGroup};
    use crate::store::HashStore;
    use std::sync::Arc;

    #[test]
    fn dtypes_and_ops_map_to_nccl_codes() {
        // The numeric values are NCCL's ABI (nccl.h): they must not drift.
        let codes: Vec<u32> = DType::ALL.iter().map(|&d| nccl_dtype(d) as u32).collect();
        // F32, F64, F16, BF16, I8, U8, I32, I64
        assert_eq!(codes, vec![7, 8, 6, 9, 0, 1, 2, 4]);
        let ops: Vec<u32> = ReduceOp::ALL.iter().map(|&o| nccl_op(o) as u32).collect();
        // Sum, Prod, Min, Max, Avg
        assert_eq!(ops, vec![0, 1, 3, 2, 4]);
    }

    #[test]
    fn config_is_nonblocking_and_versioned() {
        let c = nonblocking_config();
        assert_eq!(c.blocking, 0);
        assert_eq!(c.magic, 0xcafe_beef);
        assert_eq!(c.version, 22_400);
        assert_eq!(c.size, std::mem::size_of::<sys::ncclConfig_t>());
        assert_eq!(c.minCTAs, c_int::MIN);
    }

    #[test]
    fn errors_map_by_kind() {
        let ctx = Context::new("all_reduce", "tp:0", 1);
        let e = nccl_error(ctx.clone(), sys::ncclResult_t::ncclRemoteError, "peer 0 gone");
        assert!(matches!(e, Error::PeerLost { .. }) && e.poisons_group(), "{e}");
        assert!(e.to_string().contains("tp:0") && e.to_string().contains("peer 0 gone"), "{e}");
        let e = nccl_error(ctx.clone(), sys::ncclResult_t::ncclInvalidUsage, "");
        assert!(matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("ncclInvalidUsage"), "{e}");
        let e = nccl_error(ctx.clone(), sys::ncclResult_t::ncclSystemError, "");
        assert!(e.poisons_group() && e.to_string().contains("all_reduce in group tp:0"), "{e}");
        let e = nccl_error(ctx, sys::ncclResult_t::ncclNumResults, "");
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
    }

    fn world(n: usize) -> Vec<ProcessGroup> {
        let store: crate::store::SharedStore = Arc::new(HashStore::new());
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let store = store.clone();
                std::thread::spawn(move || ProcessGroup::new_world(store, r, n, GroupOptions::default()))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("rank thread").expect("world")).collect()
    }

    #[test]
    fn rank_zeros_id_reaches_every_rank() {
        let pgs = world(3);
        let id: [u8; UNIQUE_ID_BYTES] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hs: Vec<_> = pgs
            .into_iter()
            .map(|pg| {
                let made = made.clone();
                std::thread::spawn(move || {
                    exchange_unique_id(&pg, || {
                        made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        Ok(id)
                    })
                })
            })
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap().unwrap(), id);
        }
        assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 1, "only rank 0 makes the id");
    }

    #[test]
    fn a_failing_rank_zero_fails_every_rank_at_once() {
        let pgs = world(2);
        let hs: Vec<_> = pgs
            .into_iter()
            .map(|pg| {
                std::thread::spawn(move || {
                    exchange_unique_id(&pg, || Err(Error::Unsupported("NCCL library not found (test)".into())))
                })
            })
            .collect();
        let errs: Vec<String> = hs.into_iter().map(|h| h.join().unwrap().unwrap_err().to_string()).collect();
        assert!(errs[0].contains("NCCL library not found"), "{}", errs[0]);
        assert!(errs[1].contains("group rank 0 could not create one"), "{}", errs[1]);
    }

    #[test]
    fn old_nccl_is_refused_by_name() {
        let e = check_nccl_version(21_304).unwrap_err().to_string();
        assert!(e.contains("NCCL 2.13.4") && e.contains("2.14"), "{e}");
        assert!(check_nccl_version(23_007).is_ok());
    }

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
