//! The MPI C API behind a small safe interface: the only `unsafe` of the MPI
//! backend.
//!
//! rsmpi's safe layer (`mpi::topology`, `mpi::collective`) ignores the
//! return codes of the calls it makes and has no communicator creation over
//! a subgroup with a tag, so the backend calls the C functions of
//! `mpi::ffi` (rsmpi's `mpi-sys`) here, each wrapped in a function on
//! slices that returns MPI's error code. The contract:
//! - MPI is initialized by [`init`] with `MPI_THREAD_MULTIPLE` (the groups
//!   of a process may run from several threads), or on request with
//!   `MPI_THREAD_SERIALIZED` and one process-wide lock around every call
//!   here (for MPI builds without `MPI_THREAD_MULTIPLE`); every communicator
//!   this module hands out has `MPI_ERRORS_RETURN` set, so failures come
//!   back as codes instead of aborting the job.
//! - A [`RawComm`] is a valid communicator handle until [`RawComm::free`];
//!   the caller (one owner per handle) frees it once, after its last use.
//! - Buffers are Rust slices whose lengths were checked by the group, so the
//!   counts passed fit the buffers; counts above `i32::MAX` are refused
//!   before MPI sees them ([`count`]).

use crate::dtype::DType;
use crate::reduce::ReduceOp;
use mpi::ffi;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Set when MPI runs below `MPI_THREAD_MULTIPLE`: every call takes [`LOCK`].
static SERIAL: AtomicBool = AtomicBool::new(false);
static LOCK: Mutex<()> = Mutex::new(());

/// True when MPI runs below `MPI_THREAD_MULTIPLE` (calls serialized here).
pub(crate) fn serialized() -> bool {
    SERIAL.load(Ordering::Relaxed)
}

/// Holds the process's MPI lock when MPI is not `MPI_THREAD_MULTIPLE`
/// (one MPI call at a time, as `MPI_THREAD_SERIALIZED` requires).
fn serial() -> Option<MutexGuard<'static, ()>> {
    if SERIAL.load(Ordering::Relaxed) {
        Some(LOCK.lock().unwrap_or_else(|e| e.into_inner()))
    } else {
        None
    }
}

/// An MPI error code (not `MPI_SUCCESS`).
pub(crate) type Code = c_int;

fn check(rc: c_int) -> Result<(), Code> {
    if rc == 0 {
        Ok(())
    } else {
        Err(rc)
    }
}

/// A count in MPI's `int`, or `None` when it does not fit.
pub(crate) fn count(n: usize) -> Option<c_int> {
    c_int::try_from(n).ok()
}

/// A communicator handle. `Copy` so that the owner can hand it to the
/// watchdog; only the owner frees it.
#[derive(Clone, Copy)]
pub(crate) struct RawComm(ffi::MPI_Comm);

// SAFETY: an MPI handle is an opaque value that MPI accepts from any thread
// once initialized with MPI_THREAD_MULTIPLE, which `init` requires.
unsafe impl Send for RawComm {}
// SAFETY: as for `Send`: MPI_THREAD_MULTIPLE makes concurrent calls legal.
unsafe impl Sync for RawComm {}

/// What [`init`] found.
pub(crate) struct Started {
    /// True when this call initialized MPI (so rankweave finalizes it).
    pub ours: bool,
}

/// Initializes MPI at thread level `multiple` (`MPI_THREAD_MULTIPLE`) or
/// else `MPI_THREAD_SERIALIZED` (then this module serializes every MPI
/// call of the process with one lock) unless it already is, and sets
/// `MPI_ERRORS_RETURN` on `MPI_COMM_WORLD`. `Err` carries a message.
pub(crate) fn init(multiple: bool) -> Result<Started, String> {
    let (mut inited, mut finalized) = (0, 0);
    // SAFETY: MPI_Initialized and MPI_Finalized may be called at any time,
    // before MPI_Init and after MPI_Finalize; they write one int each.
    unsafe {
        check(ffi::MPI_Finalized(&mut finalized)).map_err(|c| format!("MPI_Finalized failed: {}", error_string(c)))?;
        check(ffi::MPI_Initialized(&mut inited)).map_err(|c| format!("MPI_Initialized failed: {}", error_string(c)))?;
    }
    if finalized != 0 {
        return Err("MPI was already finalized in this process (after its last MPI group was destroyed); \
                    MPI cannot be initialized twice"
            .into());
    }
    let mut provided = 0;
    let ours = inited == 0;
    // SAFETY: MPI_Init_thread accepts null argc/argv (MPI-2); it runs once,
    // guarded by `inited`, and the callers serialize `init` (one runtime per
    // process, built under a mutex). MPI_Query_thread writes one int.
    unsafe {
        if ours {
            let required = if multiple { ffi::RSMPI_THREAD_MULTIPLE } else { ffi::RSMPI_THREAD_SERIALIZED };
            check(ffi::MPI_Init_thread(std::ptr::null_mut(), std::ptr::null_mut(), required, &mut provided))
                .map_err(|c| format!("MPI_Init_thread failed: {}", error_string(c)))?;
        } else {
            check(ffi::MPI_Query_thread(&mut provided))
                .map_err(|c| format!("MPI_Query_thread failed: {}", error_string(c)))?;
        }
    }
    // SAFETY: constants of an initialized MPI.
    let (full, serialized) = unsafe { (ffi::RSMPI_THREAD_MULTIPLE, ffi::RSMPI_THREAD_SERIALIZED) };
    if provided < serialized {
        return Err(format!(
            "this MPI provides thread level {provided}, rankweave needs at least MPI_THREAD_SERIALIZED \
             ({serialized}), and MPI_THREAD_MULTIPLE ({full}) to run groups from several threads at once"
        ));
    }
    if multiple && provided < full {
        return Err(format!(
            "this MPI provides thread level {provided}, not MPI_THREAD_MULTIPLE ({full}); set \
             RANKWEAVE_MPI_THREADS=serialized to run with one MPI call at a time"
        ));
    }
    SERIAL.store(provided < full, Ordering::Release);
    // SAFETY: MPI is initialized; COMM_WORLD and ERRORS_RETURN are
    // predefined handles.
    check(unsafe { ffi::MPI_Comm_set_errhandler(ffi::RSMPI_COMM_WORLD, ffi::RSMPI_ERRORS_RETURN) })
        .map_err(|c| format!("MPI_Comm_set_errhandler failed: {}", error_string(c)))?;
    if ours {
        // SAFETY: registers a plain `extern "C" fn()` with the C runtime.
        unsafe { nix::libc::atexit(finalize_at_exit) };
    }
    Ok(Started { ours })
}

/// Finalizes MPI if it is initialized and not finalized yet (idempotent).
pub(crate) fn finalize() {
    let (mut inited, mut finalized) = (0, 0);
    // SAFETY: the query functions are always callable; MPI_Finalize runs
    // only on an initialized, not yet finalized MPI.
    unsafe {
        let known = ffi::MPI_Initialized(&mut inited) == 0 && ffi::MPI_Finalized(&mut finalized) == 0;
        if known && inited != 0 && finalized == 0 {
            ffi::MPI_Finalize();
        }
    }
}

extern "C" fn finalize_at_exit() {
    // A process that still holds groups at exit (a static state) finalizes
    // here, so that the launcher sees a clean exit.
    if super::runtime_owns_mpi() {
        finalize();
    }
}

/// MPI's text for an error code.
pub(crate) fn error_string(code: Code) -> String {
    let mut buf = vec![0u8; ffi::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: the buffer holds MPI_MAX_ERROR_STRING bytes as MPI requires;
    // MPI_Error_string is callable for any code.
    let rc = unsafe { ffi::MPI_Error_string(code, buf.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return format!("MPI error code {code}");
    }
    buf.truncate(usize::try_from(len).unwrap_or(0).min(buf.len()));
    format!("{} (MPI error code {code})", String::from_utf8_lossy(&buf).trim())
}

/// `MPI_Abort` on the world: ends every process of the job.
pub(crate) fn abort_job(code: c_int) -> ! {
    // SAFETY: MPI is initialized (a watchdog exists only then); MPI_Abort
    // may be called from any thread under MPI_THREAD_MULTIPLE.
    unsafe { ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, code) };
    std::process::abort()
}

/// The library's version string (`Open MPI v4.1.4, ...`).
pub(crate) fn library_version() -> String {
    let mut buf = vec![0u8; ffi::MPI_MAX_LIBRARY_VERSION_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: the buffer holds MPI_MAX_LIBRARY_VERSION_STRING bytes.
    let rc = unsafe { ffi::MPI_Get_library_version(buf.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return String::new();
    }
    buf.truncate(usize::try_from(len).unwrap_or(0).min(buf.len()));
    String::from_utf8_lossy(&buf).trim().to_string()
}

/// The largest tag `MPI_COMM_WORLD` allows (`MPI_TAG_UB`, at least 32767
/// by the standard; 2^31 - 1 in Open MPI 4.1).
pub(crate) fn tag_ub() -> Result<c_int, Code> {
    let _serial = serial();
    let mut value: *mut c_int = std::ptr::null_mut();
    let mut flag = 0;
    // SAFETY: MPI is initialized; for MPI_TAG_UB MPI writes a pointer to an
    // int it owns (valid until MPI_Finalize) into `value`, and sets `flag`.
    check(unsafe {
        ffi::MPI_Comm_get_attr(
            ffi::RSMPI_COMM_WORLD,
            ffi::MPI_TAG_UB as c_int,
            (&mut value as *mut *mut c_int).cast(),
            &mut flag,
        )
    })?;
    if flag == 0 || value.is_null() {
        return Ok(32_767);
    }
    // SAFETY: a non-null pointer MPI just handed out for this attribute.
    Ok(unsafe { *value }.max(32_767))
}

/// `MPI_IN_PLACE`, a C macro bindgen cannot translate: `(void *) 1` in
/// Open MPI, `(void *) -1` in MPICH and its derivatives. `None` for another
/// library, whose in-place operations then copy the send buffer.
fn in_place() -> Option<*const c_void> {
    static IN_PLACE: OnceLock<Option<usize>> = OnceLock::new();
    let v = *IN_PLACE.get_or_init(|| {
        let v = library_version();
        if v.starts_with("Open MPI") {
            Some(1)
        } else if v.contains("MPICH") || v.contains("Intel(R) MPI") || v.contains("MVAPICH") {
            Some(usize::MAX)
        } else {
            None
        }
    });
    v.map(|p| p as *const c_void)
}

impl RawComm {
    /// `MPI_COMM_WORLD` (never freed).
    pub(crate) fn world() -> RawComm {
        // SAFETY: a predefined handle.
        RawComm(unsafe { ffi::RSMPI_COMM_WORLD })
    }

    /// This process's rank.
    pub(crate) fn rank(self) -> Result<usize, Code> {
        let _serial = serial();
        let mut r = 0;
        // SAFETY: a valid communicator; writes one int.
        check(unsafe { ffi::MPI_Comm_rank(self.0, &mut r) })?;
        Ok(usize::try_from(r).unwrap_or(0))
    }

    /// Number of processes.
    pub(crate) fn size(self) -> Result<usize, Code> {
        let _serial = serial();
        let mut n = 0;
        // SAFETY: a valid communicator; writes one int.
        check(unsafe { ffi::MPI_Comm_size(self.0, &mut n) })?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    fn adopt(comm: ffi::MPI_Comm) -> Result<RawComm, Code> {
        // SAFETY: `comm` is a communicator MPI just created.
        check(unsafe { ffi::MPI_Comm_set_errhandler(comm, ffi::RSMPI_ERRORS_RETURN) })?;
        Ok(RawComm(comm))
    }

    /// `MPI_Comm_dup` (collective over `self`).
    pub(crate) fn dup(self) -> Result<RawComm, Code> {
        let _serial = serial();
        // SAFETY: RSMPI_COMM_NULL is a predefined handle; MPI_Comm_dup
        // writes the new handle.
        let mut out = unsafe { ffi::RSMPI_COMM_NULL };
        // SAFETY: a valid communicator.
        check(unsafe { ffi::MPI_Comm_dup(self.0, &mut out) })?;
        RawComm::adopt(out)
    }

    /// A communicator of the processes `ranks` (ranks of `self`, in the new
    /// communicator's order): `MPI_Comm_create_group`, collective over
    /// those processes only.
    pub(crate) fn create_group(self, ranks: &[c_int], tag: c_int) -> Result<RawComm, Code> {
        let _serial = serial();
        let n = count(ranks.len()).ok_or(ffi::MPI_ERR_COUNT as c_int)?;
        // SAFETY: predefined null handles, overwritten by MPI below.
        let (mut parent, mut sub, mut out) =
            unsafe { (ffi::RSMPI_GROUP_NULL, ffi::RSMPI_GROUP_NULL, ffi::RSMPI_COMM_NULL) };
        // SAFETY: `self` is valid; `ranks` holds `n` ints; each group made
        // here is freed below whatever happens.
        unsafe {
            check(ffi::MPI_Comm_group(self.0, &mut parent))?;
            let rc = ffi::MPI_Group_incl(parent, n, ranks.as_ptr(), &mut sub);
            ffi::MPI_Group_free(&mut parent);
            check(rc)?;
            let rc = ffi::MPI_Comm_create_group(self.0, sub, tag, &mut out);
            ffi::MPI_Group_free(&mut sub);
            check(rc)?;
        }
        RawComm::adopt(out)
    }

    /// The processes of `self` that share this node (`MPI_COMM_TYPE_SHARED`),
    /// ordered by their rank in `self`.
    pub(crate) fn split_shared(self) -> Result<RawComm, Code> {
        let key = count(self.rank()?).unwrap_or(0);
        let _serial = serial();
        // SAFETY: predefined handles; MPI writes `out`.
        let mut out = unsafe { ffi::RSMPI_COMM_NULL };
        // SAFETY: a valid communicator; INFO_NULL and COMM_TYPE_SHARED are
        // predefined.
        check(unsafe {
            ffi::MPI_Comm_split_type(self.0, ffi::RSMPI_COMM_TYPE_SHARED, key, ffi::RSMPI_INFO_NULL, &mut out)
        })?;
        RawComm::adopt(out)
    }

    /// Frees the communicator; the handle must not be used again.
    pub(crate) fn free(mut self) {
        let _serial = serial();
        // SAFETY: called once by the handle's owner after its last use; the
        // world is never passed here.
        unsafe { ffi::MPI_Comm_free(&mut self.0) };
    }

    /// In-place `MPI_Allreduce` of `count` elements of `ty`.
    pub(crate) fn all_reduce(self, buf: &mut [u8], n: c_int, ty: Ty, scratch: &mut Vec<u8>) -> Result<(), Code> {
        let _serial = serial();
        let send = send_in_place(buf, scratch)?;
        // SAFETY: `buf` holds `n` elements of `ty` (checked by the caller);
        // `send` is MPI_IN_PLACE or a copy of `buf` of the same length.
        check(unsafe { ffi::MPI_Allreduce(send, out_ptr(buf), n, ty.dt, ty.op, self.0) })
    }

    /// `MPI_Reduce` into `buf` on `root` (in place there).
    pub(crate) fn reduce(
        self,
        buf: &mut [u8],
        n: c_int,
        ty: Ty,
        root: c_int,
        me: bool,
        scratch: &mut Vec<u8>,
    ) -> Result<(), Code> {
        let _serial = serial();
        // SAFETY: `buf` holds `n` elements of `ty`; on the root the send
        // buffer is MPI_IN_PLACE or a copy of `buf`; elsewhere `buf` is the
        // send buffer and the receive buffer is not read.
        check(unsafe {
            if me {
                let send = send_in_place(buf, scratch)?;
                ffi::MPI_Reduce(send, out_ptr(buf), n, ty.dt, ty.op, root, self.0)
            } else {
                ffi::MPI_Reduce(in_ptr(buf), std::ptr::null_mut(), n, ty.dt, ty.op, root, self.0)
            }
        })
    }

    /// `MPI_Reduce_scatter_block`: `n` elements of `ty` per rank.
    pub(crate) fn reduce_scatter(self, input: &[u8], output: &mut [u8], n: c_int, ty: Ty) -> Result<(), Code> {
        let _serial = serial();
        // SAFETY: `output` holds `n` elements, `input` size x `n` (checked
        // by the group); distinct slices.
        check(unsafe { ffi::MPI_Reduce_scatter_block(in_ptr(input), out_ptr(output), n, ty.dt, ty.op, self.0) })
    }

    /// `MPI_Bcast` of `buf`'s bytes.
    pub(crate) fn broadcast(self, buf: &mut [u8], n: c_int, root: c_int) -> Result<(), Code> {
        let _serial = serial();
        // SAFETY: `buf` holds `n` bytes.
        check(unsafe { ffi::MPI_Bcast(out_ptr(buf), n, byte(), root, self.0) })
    }

    /// `MPI_Allgather` of `n` bytes per rank.
    pub(crate) fn all_gather(self, input: &[u8], output: &mut [u8], n: c_int) -> Result<(), Code> {
        let _serial = serial();
        // SAFETY: `input` holds `n` bytes, `output` size x `n` (checked).
        check(unsafe { ffi::MPI_Allgather(in_ptr(input), n, byte(), out_ptr(output), n, byte(), self.0) })
    }

    /// `MPI_Gather` of `n` bytes per rank; `output` on the root only.
    pub(crate) fn gather(self, input: &[u8], output: Option<&mut [u8]>, n: c_int, root: c_int) -> Result<(), Code> {
        let _serial = serial();
        let out = output.map_or(std::ptr::null_mut(), out_ptr);
        // SAFETY: `input` holds `n` bytes; the root's `output` size x `n`
        // (checked); the receive buffer is not read elsewhere.
        check(unsafe { ffi::MPI_Gather(in_ptr(input), n, byte(), out, n, byte(), root, self.0) })
    }

    /// `MPI_Scatter` of `n` bytes per rank; `input` on the root only.
    pub(crate) fn scatter(self, input: Option<&[u8]>, output: &mut [u8], n: c_int, root: c_int) -> Result<(), Code> {
        let _serial = serial();
        let inp = input.map_or(std::ptr::null(), in_ptr);
        // SAFETY: `output` holds `n` bytes; the root's `input` size x `n`
        // (checked); the send buffer is not read elsewhere.
        check(unsafe { ffi::MPI_Scatter(inp, n, byte(), out_ptr(output), n, byte(), root, self.0) })
    }

    /// `MPI_Alltoall` of `n` bytes per pair.
    pub(crate) fn all_to_all(self, input: &[u8], output: &mut [u8], n: c_int) -> Result<(), Code> {
        let _serial = serial();
        // SAFETY: both hold size x `n` bytes (checked); distinct slices.
        check(unsafe { ffi::MPI_Alltoall(in_ptr(input), n, byte(), out_ptr(output), n, byte(), self.0) })
    }

    /// `MPI_Barrier`.
    pub(crate) fn barrier(self) -> Result<(), Code> {
        let _serial = serial();
        // SAFETY: a valid communicator.
        check(unsafe { ffi::MPI_Barrier(self.0) })
    }

    /// `MPI_Send` of `data` to `dst` with `tag`.
    pub(crate) fn send(self, data: &[u8], n: c_int, dst: c_int, tag: c_int) -> Result<(), Code> {
        let _serial = serial();
        // SAFETY: `data` holds `n` bytes; the call returns once MPI no
        // longer reads it.
        check(unsafe { ffi::MPI_Send(in_ptr(data), n, byte(), dst, tag, self.0) })
    }

    /// In-place `MPI_Allreduce` with `MPI_MAX` over a few i64s.
    pub(crate) fn max_i64(self, v: &mut [i64]) -> Result<(), Code> {
        let _serial = serial();
        let n = count(v.len()).ok_or(ffi::MPI_ERR_COUNT as c_int)?;
        let copy: Vec<i64>;
        let send = match in_place() {
            Some(p) => p,
            None => {
                copy = v.to_vec();
                copy.as_ptr().cast()
            }
        };
        // SAFETY: `v` holds `n` i64s; `send` is MPI_IN_PLACE or a copy of
        // `v` that outlives the call; INT64_T and MAX are predefined.
        check(unsafe { ffi::MPI_Allreduce(send, v.as_mut_ptr().cast(), n, ffi::RSMPI_INT64_T, ffi::RSMPI_MAX, self.0) })
    }

    /// Receives at most `buf.len()` bytes from `src` with `tag`, polling
    /// `keep_waiting` between tests of the request; returns the received
    /// length, or `Ok(None)` when `keep_waiting` said stop and the receive
    /// was cancelled before anything arrived. Only for tags that pin the
    /// message's exact length (see the backend's `Tags`): Open MPI 4.1's
    /// single-copy path writes a truncated large message past the buffer.
    pub(crate) fn recv(
        self,
        buf: &mut [u8],
        n: c_int,
        src: c_int,
        tag: c_int,
        mut keep_waiting: impl FnMut() -> bool,
    ) -> Result<Option<usize>, Code> {
        // SAFETY: predefined handle, overwritten by MPI_Irecv.
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        let serial_irecv = serial();
        // SAFETY: `buf` holds `n` bytes and stays borrowed (unused by us)
        // until the request completes or is cancelled and waited for below.
        check(unsafe { ffi::MPI_Irecv(out_ptr(buf), n, byte(), src, tag, self.0, &mut req) })?;
        drop(serial_irecv);
        // SAFETY: MPI_Status is a plain C struct; zeroed is a valid value.
        let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
        loop {
            // An error completes the request too: `buf` is then free.
            if test(&mut req, &mut status)? {
                break;
            }
            if !keep_waiting() {
                let _serial = serial();
                // SAFETY: cancel the active request, then wait for it to
                // complete (cancelled or received), after which MPI no
                // longer touches `buf`.
                unsafe {
                    ffi::MPI_Cancel(&mut req);
                    check(ffi::MPI_Wait(&mut req, &mut status))?;
                }
                let mut cancelled = 0;
                // SAFETY: a status filled by MPI_Wait.
                check(unsafe { ffi::MPI_Test_cancelled(&status, &mut cancelled) })?;
                if cancelled != 0 {
                    return Ok(None);
                }
                break;
            }
        }
        let mut got = 0;
        let _serial = serial();
        // SAFETY: a status filled by MPI for a completed receive.
        check(unsafe { ffi::MPI_Get_count(&status, byte(), &mut got) })?;
        Ok(Some(usize::try_from(got).unwrap_or(usize::MAX)))
    }
    /// The first message from `src` not received yet, any tag, left in
    /// place (`MPI_Iprobe`): its tag and length in bytes.
    pub(crate) fn iprobe(self, src: c_int) -> Result<Option<(c_int, usize)>, Code> {
        let _serial = serial();
        let mut flag = 0;
        // SAFETY: MPI_Status is a plain C struct; zeroed is a valid value.
        let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
        // SAFETY: a valid communicator; MPI writes `flag` and `status`.
        check(unsafe { ffi::MPI_Iprobe(src, ffi::RSMPI_ANY_TAG, self.0, &mut flag, &mut status) })?;
        if flag == 0 {
            return Ok(None);
        }
        let mut got = 0;
        // SAFETY: a status MPI_Iprobe filled for a pending message.
        check(unsafe { ffi::MPI_Get_count(&status, byte(), &mut got) })?;
        Ok(Some((status.MPI_TAG, usize::try_from(got).unwrap_or(usize::MAX))))
    }

    /// Matches the first message from `src` under `tag` ([`any_tag`] for
    /// any) not received yet (`MPI_Improbe`): from then on it is this
    /// process's to receive, with [`RawComm::mrecv`] or [`RawComm::drain`].
    pub(crate) fn improbe(self, src: c_int, tag: c_int) -> Result<Option<Matched>, Code> {
        let _serial = serial();
        let mut flag = 0;
        // SAFETY: a predefined handle, overwritten by MPI_Improbe.
        let mut msg = unsafe { ffi::RSMPI_MESSAGE_NULL };
        // SAFETY: MPI_Status is a plain C struct; zeroed is a valid value.
        let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
        // SAFETY: a valid communicator; MPI writes `flag`, `msg`, `status`.
        check(unsafe { ffi::MPI_Improbe(src, tag, self.0, &mut flag, &mut msg, &mut status) })?;
        if flag == 0 {
            return Ok(None);
        }
        let mut got = 0;
        // SAFETY: a status MPI_Improbe filled for a matched message.
        check(unsafe { ffi::MPI_Get_count(&status, byte(), &mut got) })?;
        Ok(Some(Matched { msg, tag: status.MPI_TAG, len: usize::try_from(got).unwrap_or(usize::MAX) }))
    }

    /// Receives the matched message `m` into `buf`, which must be exactly
    /// `m.len` bytes (so MPI never truncates: Open MPI 4.1's single-copy
    /// path writes a truncated large message past the receive buffer),
    /// calling `between` between tests until it is complete.
    pub(crate) fn mrecv(self, mut m: Matched, buf: &mut [u8], mut between: impl FnMut()) -> Result<(), Code> {
        if m.len != buf.len() {
            return Err(ffi::MPI_ERR_TRUNCATE as c_int);
        }
        let n = count(buf.len()).ok_or(ffi::MPI_ERR_COUNT as c_int)?;
        // SAFETY: predefined handle, overwritten by MPI_Imrecv.
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        let serial_post = serial();
        // SAFETY: `buf` holds the message's `n` bytes and stays borrowed
        // (unused by us) until the request completes below: the loop only
        // ends when MPI_Test says so or fails, which completes it too.
        check(unsafe { ffi::MPI_Imrecv(out_ptr(buf), n, byte(), &mut m.msg, &mut req) })?;
        drop(serial_post);
        // SAFETY: MPI_Status is a plain C struct; zeroed is a valid value.
        let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
        loop {
            if test(&mut req, &mut status)? {
                return Ok(());
            }
            between();
        }
    }

    /// Receives the matched message `m` into a buffer of its size and drops
    /// it (a mismatched message: its sender, blocked in `MPI_Send` on a
    /// large one, returns). `m.len` is the peer's: reserved fallibly, and
    /// on failure the message stays matched and unreceived.
    pub(crate) fn drain(self, mut m: Matched) -> Result<(), Code> {
        let n = count(m.len).ok_or(ffi::MPI_ERR_COUNT as c_int)?;
        let mut sink: Vec<u8> = Vec::new();
        sink.try_reserve_exact(m.len).map_err(|_| ffi::MPI_ERR_NO_MEM as c_int)?;
        sink.resize(m.len, 0);
        let _serial = serial();
        // SAFETY: MPI_Status is a plain C struct; zeroed is a valid value.
        let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
        // SAFETY: `sink` holds the message's whole `n` bytes.
        check(unsafe { ffi::MPI_Mrecv(out_ptr(&mut sink), n, byte(), &mut m.msg, &mut status) })
    }
}

/// Tests the active request `req` once (`MPI_Test`, under the MPI lock):
/// `Ok(true)` once it is complete, with `status` filled. A failed test
/// completes the request too.
fn test(req: &mut ffi::MPI_Request, status: &mut ffi::MPI_Status) -> Result<bool, Code> {
    let mut done = 0;
    let _serial = serial();
    // SAFETY: `req` is an active request of the caller's; MPI writes
    // `done` and `status`.
    check(unsafe { ffi::MPI_Test(req, &mut done, status) })?;
    Ok(done != 0)
}

/// `MPI_ANY_TAG`.
pub(crate) fn any_tag() -> c_int {
    // SAFETY: a predefined constant.
    unsafe { ffi::RSMPI_ANY_TAG }
}

/// A message [`RawComm::improbe`] matched: its tag and length in bytes.
pub(crate) struct Matched {
    msg: ffi::MPI_Message,
    pub tag: c_int,
    pub len: usize,
}

/// The send buffer of an in-place operation: `MPI_IN_PLACE`, or a copy of
/// `buf` in `scratch` when the library's `MPI_IN_PLACE` is unknown.
fn send_in_place(buf: &[u8], scratch: &mut Vec<u8>) -> Result<*const c_void, Code> {
    if let Some(p) = in_place() {
        return Ok(p);
    }
    scratch.clear();
    scratch.try_reserve(buf.len()).map_err(|_| ffi::MPI_ERR_NO_MEM as c_int)?;
    scratch.extend_from_slice(buf);
    Ok(in_ptr(scratch))
}

/// Keeps empty slices away from MPI's special addresses: an empty slice's
/// dangling pointer may equal `MPI_IN_PLACE` (`(void *) 1`).
static EMPTY: [u8; 8] = [0; 8];

fn in_ptr(b: &[u8]) -> *const c_void {
    if b.is_empty() {
        EMPTY.as_ptr().cast()
    } else {
        b.as_ptr().cast()
    }
}

/// As [`in_ptr`]; MPI writes nothing through it for an empty slice.
fn out_ptr(b: &mut [u8]) -> *mut c_void {
    if b.is_empty() {
        EMPTY.as_ptr().cast_mut().cast()
    } else {
        b.as_mut_ptr().cast()
    }
}

fn byte() -> ffi::MPI_Datatype {
    // SAFETY: a predefined handle.
    unsafe { ffi::RSMPI_UINT8_T }
}

/// An element datatype and reduction operation for MPI.
#[derive(Clone, Copy)]
pub(crate) struct Ty {
    dt: ffi::MPI_Datatype,
    op: ffi::MPI_Op,
}

/// Which of [`ReduceOp`]'s operations MPI runs itself (the rest go through
/// rankweave's own kernel, [`crate::reduce::reduce_into`], as a
/// user-defined operation): every op on integers, and `Sum`/`Prod` on f32
/// and f64. MPI has no f16/bf16, and its `MPI_MIN`/`MPI_MAX` on floats keep
/// whichever operand a NaN comparison leaves, so the two ranks of a pair
/// could end with different bits; rankweave's kernel propagates NaN. (The
/// built-in f32/f64 `Sum`/`Prod` keep MPI's NaN payloads, not rankweave's
/// canonical NaN: the one case where ranks may differ in bits.)
/// `Avg` reduces as `Sum` here (the backend divides afterwards).
pub(crate) fn ty(dtype: DType, op: ReduceOp) -> Result<Ty, Code> {
    let op = if op == ReduceOp::Avg { ReduceOp::Sum } else { op };
    // SAFETY: predefined handles of an initialized MPI.
    let builtin = unsafe {
        let dt = match dtype {
            DType::F32 => ffi::RSMPI_FLOAT,
            DType::F64 => ffi::RSMPI_DOUBLE,
            DType::I8 => ffi::RSMPI_INT8_T,
            DType::U8 => ffi::RSMPI_UINT8_T,
            DType::I32 => ffi::RSMPI_INT32_T,
            DType::I64 => ffi::RSMPI_INT64_T,
            DType::F16 | DType::BF16 => ffi::RSMPI_UINT16_T,
        };
        let mop = match op {
            ReduceOp::Sum | ReduceOp::Avg => ffi::RSMPI_SUM,
            ReduceOp::Prod => ffi::RSMPI_PROD,
            ReduceOp::Min => ffi::RSMPI_MIN,
            ReduceOp::Max => ffi::RSMPI_MAX,
        };
        Ty { dt, op: mop }
    };
    let own =
        matches!((dtype, op), (DType::F16 | DType::BF16, _) | (DType::F32 | DType::F64, ReduceOp::Min | ReduceOp::Max));
    if own {
        Ok(Ty { dt: builtin.dt, op: user_op(dtype, op)? })
    } else {
        Ok(builtin)
    }
}

/// Index of `(dtype, op)` in the table of user-defined operations.
const fn slot(dtype: DType, op: ReduceOp) -> usize {
    let d = match dtype {
        DType::F16 => 0,
        DType::BF16 => 1,
        DType::F32 => 2,
        _ => 3,
    };
    let o = match op {
        ReduceOp::Sum | ReduceOp::Avg => 0,
        ReduceOp::Prod => 1,
        ReduceOp::Min => 2,
        ReduceOp::Max => 3,
    };
    d * 4 + o
}

const fn dtype_of(d: usize) -> DType {
    match d {
        0 => DType::F16,
        1 => DType::BF16,
        2 => DType::F32,
        _ => DType::F64,
    }
}

const fn op_of(o: usize) -> ReduceOp {
    match o {
        0 => ReduceOp::Sum,
        1 => ReduceOp::Prod,
        2 => ReduceOp::Min,
        _ => ReduceOp::Max,
    }
}

/// The user function of slot `S`: `inout = inout op in`, through
/// [`crate::reduce::reduce_into`].
unsafe extern "C" fn combine<const S: usize>(
    invec: *mut c_void,
    inoutvec: *mut c_void,
    len: *mut c_int,
    _datatype: *mut ffi::MPI_Datatype,
) {
    let dtype = dtype_of(S / 4);
    // SAFETY: MPI passes a valid element count.
    let n = usize::try_from(unsafe { *len }).unwrap_or(0);
    let bytes = n * dtype.size();
    if bytes == 0 {
        return;
    }
    // SAFETY: MPI hands two distinct buffers of `len` elements of the
    // datatype this op was registered for (2 bytes for f16/bf16, the
    // native size otherwise, see `ty`).
    let (src, dst) = unsafe {
        (
            std::slice::from_raw_parts(invec as *const u8, bytes),
            std::slice::from_raw_parts_mut(inoutvec as *mut u8, bytes),
        )
    };
    crate::reduce::reduce_into(dst, src, dtype, op_of(S % 4));
}

type UserFn = unsafe extern "C" fn(*mut c_void, *mut c_void, *mut c_int, *mut ffi::MPI_Datatype);

const COMBINE: [UserFn; 16] = [
    combine::<0>,
    combine::<1>,
    combine::<2>,
    combine::<3>,
    combine::<4>,
    combine::<5>,
    combine::<6>,
    combine::<7>,
    combine::<8>,
    combine::<9>,
    combine::<10>,
    combine::<11>,
    combine::<12>,
    combine::<13>,
    combine::<14>,
    combine::<15>,
];

struct Ops(Result<[ffi::MPI_Op; 16], Code>);
// SAFETY: MPI_Op handles are opaque values usable from any thread under
// MPI_THREAD_MULTIPLE.
unsafe impl Send for Ops {}
// SAFETY: as for `Send`; the table is never written after creation.
unsafe impl Sync for Ops {}

/// The user-defined operation of `(dtype, op)`; all sixteen are created
/// (commutative) on first use and live until MPI_Finalize releases them.
fn user_op(dtype: DType, op: ReduceOp) -> Result<ffi::MPI_Op, Code> {
    static OPS: OnceLock<Ops> = OnceLock::new();
    let ops = OPS.get_or_init(|| {
        let _serial = serial();
        // SAFETY: a predefined handle, overwritten by MPI_Op_create.
        let mut table = [unsafe { ffi::RSMPI_SUM }; 16];
        for (h, f) in table.iter_mut().zip(COMBINE) {
            // SAFETY: registers a function of MPI_User_function's C
            // signature; MPI writes the handle.
            let rc = unsafe { ffi::MPI_Op_create(Some(f), 1, h) };
            if rc != 0 {
                return Ops(Err(rc));
            }
        }
        Ops(Ok(table))
    });
    ops.0.map(|t| t[slot(dtype, op)])
}
