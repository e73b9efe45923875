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
//! finish on its stream by polling a CUDA event, until the group's
//! timeout. When the deadline passes, or NCCL reports an asynchronous error
//! (a dead peer shows up as `ncclRemoteError` or `ncclSystemError`), the
//! communicator is aborted with `ncclCommAbort`, later calls fail with
//! [`Error::Poisoned`], and the error names the operation and the group.
//!
//! # Streams
//!
//! An operation runs on one of three streams: the group's own (the
//! methods of [`NcclComm`]); a caller's ([`NcclComm::with_stream`]), in
//! [`Completion::Wait`] (the wait above) or [`Completion::Enqueue`]
//! (return once NCCL enqueued; [`NcclOnStream::synchronize`] does the wait
//! later); or a graph capture's ([`NcclComm::capture_on`]). Whenever the
//! stream is capturing a CUDA graph the operation only enqueues: no event
//! query and no host wait, which a capture forbids.

use super::cuda::{backoff, driver_err, CudaBuffer, CudaDevice};
use super::mapping::{
    check_nccl_version, exchange_unique_id, nccl_dtype, nccl_error, nccl_op, nonblocking_config, UNIQUE_ID_BYTES,
};
use super::probe;
use crate::coordinator::device::{p2p_plan, P2pShape};
use crate::dtype::DType;
use crate::error::{Context, Error, Result};
use crate::group::ProcessGroup;
use crate::reduce::ReduceOp;
use cudarc::driver::sys::CUstreamCaptureStatus as CaptureStatus;
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

/// How an operation on a caller's stream ([`NcclComm::with_stream`])
/// completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Return once the work finished on the stream: an event recorded after
    /// it is polled until the group's timeout, and the communicator is
    /// aborted when the deadline passes or NCCL reports an error.
    Wait,
    /// Return once NCCL has enqueued the work (as vLLM's pynccl does: the
    /// caller's stream orders everything after it). Completion and NCCL's
    /// asynchronous errors are checked by [`NcclOnStream::synchronize`],
    /// within the group's timeout, aborting past it.
    Enqueue,
}

/// How one operation runs: its stream's capture state decides between the
/// caller's [`Completion`] and [`Mode::Capture`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Wait,
    Enqueue,
    /// The stream is capturing a CUDA graph: enqueue only, with no event
    /// query or host wait (both illegal while capturing) and untracked
    /// buffer addresses (a wait on an event recorded outside the capture
    /// is illegal too).
    Capture,
}

/// The stream and mode of one operation.
struct Exec {
    stream: Arc<CudaStream>,
    mode: Mode,
}

impl Exec {
    /// Whether buffer accesses go through cudarc's events.
    fn tracked(&self) -> bool {
        self.mode != Mode::Capture
    }
}

/// One transfer of a batch of point-to-point operations
/// ([`NcclComm::batch_p2p`]): a buffer and the group rank on the other end.
#[derive(Debug)]
pub enum P2p<'a> {
    /// Send the buffer's bytes to the rank.
    Send(&'a CudaBuffer, usize),
    /// Receive the buffer's length in bytes from the rank.
    Recv(&'a mut CudaBuffer, usize),
}

/// One group's NCCL communicator on one CUDA device, with its own stream.
pub struct NcclComm {
    name: String,
    rank: usize,
    size: usize,
    device: CudaDevice,
    stream: Arc<CudaStream>,
    timeout: Duration,
    handle: Mutex<CommHandle>,
    /// While a graph capture routes this group's operations
    /// ([`NcclComm::capture_on`]): the capture stream.
    capture: Mutex<Option<Arc<CudaStream>>>,
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

fn is_ok(r: sys::ncclResult_t) -> bool {
    matches!(r, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress)
}

/// A device-to-device copy enqueued on `s`, as an NCCL result code (the
/// local block of gather and all_to_all, which NCCL does not move).
///
/// # Safety
/// `dst` and `src` must address `n` bytes each on the stream's device,
/// alive until the copy ran.
unsafe fn local_copy(dst: u64, src: u64, n: usize, s: sys::cudaStream_t) -> sys::ncclResult_t {
    if n == 0 {
        return sys::ncclResult_t::ncclSuccess;
    }
    // SAFETY: the caller's contract above.
    match unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, n, s as _) } {
        Ok(()) => sys::ncclResult_t::ncclSuccess,
        Err(_) => sys::ncclResult_t::ncclUnhandledCudaError,
    }
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
        let stream = device.new_stream()?;
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
        if !is_ok(r) {
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
            capture: Mutex::new(None),
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
    /// The group's own stream: where its operations run unless a caller
    /// gives one ([`Self::with_stream`]) or a capture routes them
    /// ([`Self::capture_on`]).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// The group's timeout (every wait's deadline).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// Why the communicator was aborted, once it was.
    pub fn aborted(&self) -> Option<String> {
        self.lock().aborted.clone()
    }

    fn ctx(&self, op: &str) -> Context {
        Context::new(op, &self.name, self.rank)
    }

    /// `Ok` when `stream` belongs to this group's device (context).
    fn check_stream(&self, stream: &CudaStream, op: &str) -> Result<()> {
        if stream.context().cu_ctx() != self.device.context().cu_ctx() {
            return Err(Error::invalid(format!(
                "{}: a stream of cuda:{} for a group on cuda:{}",
                self.ctx(op),
                stream.context().ordinal(),
                self.device.ordinal()
            )));
        }
        Ok(())
    }

    /// The operations of this group on the caller's `stream` (which must be
    /// on the group's device), completing as `completion` says. Buffers are
    /// ordered on `stream` through cudarc's events: the stream first waits
    /// for a buffer's last write elsewhere, and later users elsewhere wait
    /// for this stream's use. While `stream` is capturing a CUDA graph, the
    /// operations only enqueue, whatever `completion` says (see
    /// [`Self::capture_on`] for what a capture needs).
    pub fn with_stream(&self, stream: &Arc<CudaStream>, completion: Completion) -> Result<NcclOnStream<'_>> {
        self.check_stream(stream, "with_stream")?;
        Ok(NcclOnStream { comm: self, stream: stream.clone(), completion })
    }

    /// Routes this group's own operations (the methods of [`NcclComm`]
    /// itself, and so the coordinator's) to `stream` until the returned
    /// guard is dropped; the previous route comes back then. While `stream`
    /// captures a graph the operations enqueue without host waits or event
    /// queries; outside an active capture they run on it and wait, as
    /// usual.
    ///
    /// Inside an active capture buffer addresses are taken as they are,
    /// without cudarc's cross-stream events (waiting on an event recorded
    /// before the capture is illegal in it). So every buffer a captured
    /// operation uses must be ready on `stream` before the capture begins
    /// (for example: made before, and `stream` ordered after the streams
    /// that wrote it, which [`Self::new_capture_stream`] does for the
    /// group's and the device's streams), and after a launch of the graph
    /// the caller synchronizes `stream` before using them elsewhere.
    pub fn capture_on(&self, stream: &Arc<CudaStream>) -> Result<CaptureRoute<'_>> {
        self.check_stream(stream, "graph_capture")?;
        let prev = self.capture.lock().unwrap_or_else(|e| e.into_inner()).replace(stream.clone());
        Ok(CaptureRoute { comm: self, prev })
    }

    /// A fresh stream for a graph capture, ordered (on the device, without
    /// a host wait) after the work enqueued so far on the group's stream
    /// and on the device's stream.
    pub fn new_capture_stream(&self) -> Result<Arc<CudaStream>> {
        let s = self.device.new_stream()?;
        s.join(&self.stream).map_err(|e| driver_err("graph_capture", e))?;
        s.join(self.device.stream()).map_err(|e| driver_err("graph_capture", e))?;
        Ok(s)
    }

    /// The stream a capture routes this group's operations to, if any.
    pub fn capture_stream(&self) -> Option<Arc<CudaStream>> {
        self.capture.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The stream and mode of one of the group's own operations.
    fn default_exec(&self, op: &str) -> Result<Exec> {
        let stream = self.capture_stream().unwrap_or_else(|| self.stream.clone());
        self.exec(op, stream, Completion::Wait)
    }

    fn exec(&self, op: &str, stream: Arc<CudaStream>, completion: Completion) -> Result<Exec> {
        let mode = match stream.capture_status().map_err(|e| driver_err(op, e))? {
            CaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE => Mode::Capture,
            CaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE => match completion {
                Completion::Wait => Mode::Wait,
                Completion::Enqueue => Mode::Enqueue,
            },
            CaptureStatus::CU_STREAM_CAPTURE_STATUS_INVALIDATED => {
                return Err(Error::invalid(format!(
                    "{}: the graph capture on this stream was invalidated (an illegal call during the capture); end it \
                     before running more operations on the stream",
                    self.ctx(op)
                )))
            }
        };
        Ok(Exec { stream, mode })
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

    fn live<'a>(&'a self, op: &str) -> Result<std::sync::MutexGuard<'a, CommHandle>> {
        let h = self.lock();
        if let Some(cause) = &h.aborted {
            return Err(Error::Poisoned { group: self.name.clone(), cause: cause.clone() });
        }
        self.device.context().bind_to_thread().map_err(|e| driver_err(op, e))?;
        Ok(h)
    }

    /// Polls `ncclCommGetAsyncError` until the communicator is no longer
    /// in progress (init done, or a non-blocking call fully enqueued). A
    /// host-side query of NCCL's state: legal during a graph capture.
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

    /// Waits until the work enqueued on `stream` so far has finished,
    /// watching NCCL's asynchronous errors; aborts at the deadline.
    fn wait_done(&self, h: &mut CommHandle, op: &str, stream: &CudaStream, start: Instant) -> Result<()> {
        let event = self.device.context().new_event(None).map_err(|e| driver_err(op, e))?;
        event.record(stream).map_err(|e| driver_err(op, e))?;
        let mut polls = 0;
        loop {
            if event.try_is_complete().map_err(|e| driver_err(op, e))? {
                return Ok(());
            }
            let state = async_state(h.raw);
            if !is_ok(state) {
                let e = nccl_error(self.ctx(op), state, &last_error(h.raw));
                self.abort(h, &e.to_string());
                return Err(e);
            }
            if start.elapsed() >= self.timeout {
                let e = Error::timeout(self.ctx(op), start.elapsed(), "the collective to finish on the device");
                self.abort(h, &e.to_string());
                return Err(e);
            }
            backoff(&mut polls);
        }
    }

    /// Runs one operation: `enqueue` gets the communicator and the stream
    /// and makes the NCCL calls; then, in [`Mode::Wait`], waits until the
    /// work has finished on the stream, or aborts at the deadline.
    fn run(
        &self,
        op: &str,
        x: &Exec,
        enqueue: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t,
    ) -> Result<()> {
        let mut h = self.live(op)?;
        let start = Instant::now();
        let r = enqueue(h.raw, x.stream.cu_stream() as sys::cudaStream_t);
        if !is_ok(r) {
            let e = nccl_error(self.ctx(op), r, &last_error(h.raw));
            if e.poisons_group() {
                self.abort(&mut h, &e.to_string());
            }
            return Err(e);
        }
        self.wait_ready(&mut h, op, start)?;
        match x.mode {
            Mode::Wait => self.wait_done(&mut h, op, &x.stream, start),
            Mode::Enqueue | Mode::Capture => Ok(()),
        }
    }

    /// Waits, up to the group's timeout, until the work on `stream` so far
    /// has finished, and checks NCCL's asynchronous errors; aborts the
    /// communicator when the deadline passes or NCCL reports an error.
    fn synchronize_stream(&self, stream: &CudaStream) -> Result<()> {
        const OP: &str = "synchronize";
        let mut h = self.live(OP)?;
        if stream.capture_status().map_err(|e| driver_err(OP, e))? != CaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Err(Error::invalid(format!(
                "{}: the stream is capturing a graph; end the capture before waiting on it",
                self.ctx(OP)
            )));
        }
        self.wait_done(&mut h, OP, stream, Instant::now())
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

    /// In-place all-reduce of `buf` (elements of `dtype`).
    pub fn all_reduce(&self, buf: &mut CudaBuffer, dtype: DType, op: ReduceOp) -> Result<()> {
        self.all_reduce_in(&self.default_exec("all_reduce")?, buf, dtype, op)
    }

    /// Gathers every rank's `input` into `out` (`size * input.len()` bytes,
    /// rank order).
    pub fn all_gather(&self, input: &CudaBuffer, out: &mut CudaBuffer) -> Result<()> {
        self.all_gather_in(&self.default_exec("all_gather")?, input, out)
    }

    /// Reduces `input` (`size` equal blocks) and leaves block `rank` in `out`.
    pub fn reduce_scatter(&self, input: &CudaBuffer, out: &mut CudaBuffer, dtype: DType, op: ReduceOp) -> Result<()> {
        self.reduce_scatter_in(&self.default_exec("reduce_scatter")?, input, out, dtype, op)
    }

    /// In-place broadcast of `buf` from `root`.
    pub fn broadcast(&self, buf: &mut CudaBuffer, root: usize) -> Result<()> {
        self.broadcast_in(&self.default_exec("broadcast")?, buf, root)
    }

    /// In-place reduce of `buf` onto `root` (other ranks' `buf` is left as is).
    pub fn reduce(&self, buf: &mut CudaBuffer, dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
        self.reduce_in(&self.default_exec("reduce")?, buf, dtype, op, root)
    }

    /// Gathers every rank's `input` on `root` into `out` (`Some` on `root`
    /// only): grouped sends and receives, since NCCL has no gather.
    pub fn gather(&self, input: &CudaBuffer, out: Option<&mut CudaBuffer>, root: usize) -> Result<()> {
        self.gather_in(&self.default_exec("gather")?, input, out, root)
    }

    /// Sends block `j` of `input` to rank `j` and places the block from rank
    /// `i` at block `i` of `out` (grouped sends and receives).
    pub fn all_to_all(&self, input: &CudaBuffer, out: &mut CudaBuffer) -> Result<()> {
        self.all_to_all_in(&self.default_exec("all_to_all")?, input, out)
    }

    /// Sends `buf` to `dst` (another rank: a send to this rank itself needs
    /// its receive in the same call, [`Self::batch_p2p`]).
    pub fn send(&self, buf: &CudaBuffer, dst: usize) -> Result<()> {
        self.batch_p2p_in(&self.default_exec("send")?, "send", &mut [P2p::Send(buf, dst)])
    }

    /// Receives `buf.len()` bytes from `src` into `buf` (another rank; see
    /// [`Self::send`]).
    pub fn recv(&self, buf: &mut CudaBuffer, src: usize) -> Result<()> {
        self.batch_p2p_in(&self.default_exec("recv")?, "recv", &mut [P2p::Recv(buf, src)])
    }

    /// Runs the sends and receives of `ops` as one NCCL group call (as
    /// torch's `batch_isend_irecv`): their order across ranks does not
    /// matter, and a send to this rank itself is allowed when the batch
    /// also holds its receive (the k-th send to self goes to the k-th
    /// receive from self; their lengths must match). An empty batch does
    /// nothing.
    pub fn batch_p2p(&self, ops: &mut [P2p<'_>]) -> Result<()> {
        self.batch_p2p_in(&self.default_exec("batch_p2p")?, "batch_p2p", ops)
    }

    fn all_reduce_in(&self, x: &Exec, buf: &mut CudaBuffer, dtype: DType, op: ReduceOp) -> Result<()> {
        self.check_ordinal(buf, "all_reduce")?;
        let count = buf.len() / dtype.size();
        let (p, _g) = buf.write_ptr(&x.stream, x.tracked());
        self.run("all_reduce", x, |comm, s| {
            // SAFETY: `p` addresses `count` elements of `dtype` on this
            // group's device, kept alive (and ordered) by `_g` until the
            // work was enqueued (and cudarc's stream-ordered free after
            // it); in-place all-reduce is allowed by NCCL.
            unsafe {
                sys::ncclAllReduce(p as *const c_void, p as *mut c_void, count, nccl_dtype(dtype), nccl_op(op), comm, s)
            }
        })
    }

    fn all_gather_in(&self, x: &Exec, input: &CudaBuffer, out: &mut CudaBuffer) -> Result<()> {
        self.check_ordinal(input, "all_gather")?;
        self.check_ordinal(out, "all_gather")?;
        self.check_len("all_gather", out.len(), input.len().checked_mul(self.size))?;
        let n = input.len();
        let (sp, _g1) = input.read_ptr(&x.stream, x.tracked());
        let (rp, _g2) = out.write_ptr(&x.stream, x.tracked());
        self.run("all_gather", x, |comm, s| {
            // SAFETY: `sp` holds `n` bytes and `rp` `size * n` bytes on this
            // group's device (checked above), alive as in all_reduce.
            unsafe {
                sys::ncclAllGather(sp as *const c_void, rp as *mut c_void, n, sys::ncclDataType_t::ncclUint8, comm, s)
            }
        })
    }

    fn reduce_scatter_in(
        &self,
        x: &Exec,
        input: &CudaBuffer,
        out: &mut CudaBuffer,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.check_ordinal(input, "reduce_scatter")?;
        self.check_ordinal(out, "reduce_scatter")?;
        self.check_len("reduce_scatter", input.len(), out.len().checked_mul(self.size))?;
        let count = out.len() / dtype.size();
        let (sp, _g1) = input.read_ptr(&x.stream, x.tracked());
        let (rp, _g2) = out.write_ptr(&x.stream, x.tracked());
        self.run("reduce_scatter", x, |comm, s| {
            // SAFETY: `sp` holds `size * count` and `rp` `count` elements of
            // `dtype` on this device (checked above), alive as in all_reduce.
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

    fn broadcast_in(&self, x: &Exec, buf: &mut CudaBuffer, root: usize) -> Result<()> {
        self.check_ordinal(buf, "broadcast")?;
        let root = self.peer("broadcast", root)?;
        let n = buf.len();
        let (p, _g) = buf.write_ptr(&x.stream, x.tracked());
        self.run("broadcast", x, |comm, s| {
            // SAFETY: `p` holds `n` bytes on this device, alive as in all_reduce.
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

    fn reduce_in(&self, x: &Exec, buf: &mut CudaBuffer, dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
        self.check_ordinal(buf, "reduce")?;
        let root = self.peer("reduce", root)?;
        let count = buf.len() / dtype.size();
        let (p, _g) = buf.write_ptr(&x.stream, x.tracked());
        self.run("reduce", x, |comm, s| {
            // SAFETY: `p` holds `count` elements of `dtype` on this device,
            // alive as in all_reduce; NCCL allows an in-place reduce.
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

    fn gather_in(&self, x: &Exec, input: &CudaBuffer, out: Option<&mut CudaBuffer>, root: usize) -> Result<()> {
        self.check_ordinal(input, "gather")?;
        let root_c = self.peer("gather", root)?;
        let n = input.len();
        match out {
            Some(out) if self.rank == root => {
                self.check_ordinal(out, "gather")?;
                self.check_len("gather", out.len(), n.checked_mul(self.size))?;
                let (sp, _g1) = input.read_ptr(&x.stream, x.tracked());
                let (rp, _g2) = out.write_ptr(&x.stream, x.tracked());
                self.grouped("gather", x, |comm, s| {
                    let mut calls = Vec::with_capacity(self.size);
                    for r in 0..self.size {
                        let dst = rp + (r * n) as u64;
                        // SAFETY: block `r` of `out` (`n` bytes, in range by
                        // the length check) and `input` (`n` bytes) are on
                        // this device and alive until the group was enqueued.
                        calls.push(unsafe {
                            if r == self.rank {
                                local_copy(dst, sp, n, s)
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
            _ => {
                let (sp, _g1) = input.read_ptr(&x.stream, x.tracked());
                self.grouped("gather", x, |comm, s| {
                    // SAFETY: `input` holds `n` bytes on this device, alive until enqueued.
                    vec![unsafe {
                        sys::ncclSend(sp as *const c_void, n, sys::ncclDataType_t::ncclUint8, root_c, comm, s)
                    }]
                })
            }
        }
    }

    fn all_to_all_in(&self, x: &Exec, input: &CudaBuffer, out: &mut CudaBuffer) -> Result<()> {
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
        let (sp, _g1) = input.read_ptr(&x.stream, x.tracked());
        let (rp, _g2) = out.write_ptr(&x.stream, x.tracked());
        self.grouped("all_to_all", x, |comm, s| {
            let mut calls = Vec::with_capacity(2 * self.size);
            for r in 0..self.size {
                let (src, dst) = (sp + (r * b) as u64, rp + (r * b) as u64);
                // SAFETY: blocks `r` of `input` and `out` (`b` bytes each,
                // in range: both hold `size * b`) are on this device and
                // alive until the group was enqueued.
                unsafe {
                    if r == self.rank {
                        calls.push(local_copy(dst, src, b, s));
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

    fn batch_p2p_in(&self, x: &Exec, op: &str, ops: &mut [P2p<'_>]) -> Result<()> {
        let plan = p2p_plan(self.rank, self.size, ops.iter().map(|o| o.shape()))
            .map_err(|m| Error::invalid(format!("{}: {m}", self.ctx(op))))?;
        for o in ops.iter() {
            self.check_ordinal(o.buffer(), op)?;
        }
        if ops.is_empty() {
            return Ok(());
        }
        let tracked = x.tracked();
        let mut guards = Vec::with_capacity(ops.len());
        let mut calls = Vec::with_capacity(ops.len());
        for o in ops.iter_mut() {
            match o {
                P2p::Send(b, peer) => {
                    let n = b.len();
                    let (p, g) = b.read_ptr(&x.stream, tracked);
                    guards.push(g);
                    calls.push((true, p, n, *peer as c_int));
                }
                P2p::Recv(b, peer) => {
                    let n = b.len();
                    let (p, g) = b.write_ptr(&x.stream, tracked);
                    guards.push(g);
                    calls.push((false, p, n, *peer as c_int));
                }
            }
        }
        let result = self.grouped(op, x, |comm, s| {
            calls
                .iter()
                .map(|&(send, p, n, peer)| {
                    // SAFETY: `p` addresses the `n` bytes of one buffer of
                    // `ops` on this device (checked above), kept alive and
                    // ordered by `guards` until the group was enqueued; the
                    // peer is in range (checked by the plan).
                    unsafe {
                        if send {
                            sys::ncclSend(p as *const c_void, n, sys::ncclDataType_t::ncclUint8, peer, comm, s)
                        } else {
                            sys::ncclRecv(p as *mut c_void, n, sys::ncclDataType_t::ncclUint8, peer, comm, s)
                        }
                    }
                })
                .collect()
        });
        drop(guards);
        match plan.single_peer {
            Some(peer) => result.map_err(|e| with_peer(e, peer)),
            None => result,
        }
    }

    /// Runs several NCCL calls as one group (`ncclGroupStart`/`End`); the
    /// first failing call's code is the result.
    fn grouped(
        &self,
        op: &str,
        x: &Exec,
        calls: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Vec<sys::ncclResult_t>,
    ) -> Result<()> {
        self.run(op, x, |comm, s| {
            // SAFETY: group calls take no arguments; every start is matched
            // by the end below, whatever the calls in between return.
            let start = unsafe { sys::ncclGroupStart() };
            if start != sys::ncclResult_t::ncclSuccess {
                return start;
            }
            let results = calls(comm, s);
            // SAFETY: closes the group opened above.
            let end = unsafe { sys::ncclGroupEnd() };
            results.into_iter().find(|r| !is_ok(*r)).unwrap_or(end)
        })
    }
}

impl P2p<'_> {
    fn buffer(&self) -> &CudaBuffer {
        match self {
            P2p::Send(b, _) => b,
            P2p::Recv(b, _) => b,
        }
    }
    fn shape(&self) -> P2pShape {
        match self {
            P2p::Send(b, peer) => P2pShape { send: true, peer: *peer, len: b.len() },
            P2p::Recv(b, peer) => P2pShape { send: false, peer: *peer, len: b.len() },
        }
    }
}

/// A route of a group's operations to a capture stream
/// ([`NcclComm::capture_on`]); dropping it restores the previous route.
#[must_use = "the route ends when the guard is dropped"]
pub struct CaptureRoute<'a> {
    comm: &'a NcclComm,
    prev: Option<Arc<CudaStream>>,
}

impl std::fmt::Debug for CaptureRoute<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureRoute").field("group", &self.comm.name).finish_non_exhaustive()
    }
}

impl Drop for CaptureRoute<'_> {
    fn drop(&mut self) {
        *self.comm.capture.lock().unwrap_or_else(|e| e.into_inner()) = self.prev.take();
    }
}

/// A group's operations on a caller's stream ([`NcclComm::with_stream`]).
pub struct NcclOnStream<'a> {
    comm: &'a NcclComm,
    stream: Arc<CudaStream>,
    completion: Completion,
}

impl std::fmt::Debug for NcclOnStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclOnStream")
            .field("group", &self.comm.name)
            .field("completion", &self.completion)
            .finish_non_exhaustive()
    }
}

impl NcclOnStream<'_> {
    fn exec(&self, op: &str) -> Result<Exec> {
        self.comm.exec(op, self.stream.clone(), self.completion)
    }
    /// The communicator.
    pub fn comm(&self) -> &NcclComm {
        self.comm
    }
    /// The caller's stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// How the operations complete.
    pub fn completion(&self) -> Completion {
        self.completion
    }
    /// Waits, up to the group's timeout, until the work enqueued on the
    /// stream so far has finished, and checks NCCL's asynchronous errors;
    /// aborts the communicator at the deadline or on an error (later
    /// operations then fail with [`Error::Poisoned`]). Refused while the
    /// stream captures a graph.
    pub fn synchronize(&self) -> Result<()> {
        self.comm.synchronize_stream(&self.stream)
    }
    /// [`NcclComm::all_reduce`] on the stream.
    pub fn all_reduce(&self, buf: &mut CudaBuffer, dtype: DType, op: ReduceOp) -> Result<()> {
        self.comm.all_reduce_in(&self.exec("all_reduce")?, buf, dtype, op)
    }
    /// [`NcclComm::all_gather`] on the stream.
    pub fn all_gather(&self, input: &CudaBuffer, out: &mut CudaBuffer) -> Result<()> {
        self.comm.all_gather_in(&self.exec("all_gather")?, input, out)
    }
    /// [`NcclComm::reduce_scatter`] on the stream.
    pub fn reduce_scatter(&self, input: &CudaBuffer, out: &mut CudaBuffer, dtype: DType, op: ReduceOp) -> Result<()> {
        self.comm.reduce_scatter_in(&self.exec("reduce_scatter")?, input, out, dtype, op)
    }
    /// [`NcclComm::broadcast`] on the stream.
    pub fn broadcast(&self, buf: &mut CudaBuffer, root: usize) -> Result<()> {
        self.comm.broadcast_in(&self.exec("broadcast")?, buf, root)
    }
    /// [`NcclComm::reduce`] on the stream.
    pub fn reduce(&self, buf: &mut CudaBuffer, dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
        self.comm.reduce_in(&self.exec("reduce")?, buf, dtype, op, root)
    }
    /// [`NcclComm::gather`] on the stream.
    pub fn gather(&self, input: &CudaBuffer, out: Option<&mut CudaBuffer>, root: usize) -> Result<()> {
        self.comm.gather_in(&self.exec("gather")?, input, out, root)
    }
    /// [`NcclComm::all_to_all`] on the stream.
    pub fn all_to_all(&self, input: &CudaBuffer, out: &mut CudaBuffer) -> Result<()> {
        self.comm.all_to_all_in(&self.exec("all_to_all")?, input, out)
    }
    /// [`NcclComm::send`] on the stream.
    pub fn send(&self, buf: &CudaBuffer, dst: usize) -> Result<()> {
        self.comm.batch_p2p_in(&self.exec("send")?, "send", &mut [P2p::Send(buf, dst)])
    }
    /// [`NcclComm::recv`] on the stream.
    pub fn recv(&self, buf: &mut CudaBuffer, src: usize) -> Result<()> {
        self.comm.batch_p2p_in(&self.exec("recv")?, "recv", &mut [P2p::Recv(buf, src)])
    }
    /// [`NcclComm::batch_p2p`] on the stream.
    pub fn batch_p2p(&self, ops: &mut [P2p<'_>]) -> Result<()> {
        self.comm.batch_p2p_in(&self.exec("batch_p2p")?, "batch_p2p", ops)
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
            // drop must not hang on a dead one. Operations in enqueue-only
            // mode may still be running: their buffers are freed in stream
            // order (cudarc), and abort cancels what is left.
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
