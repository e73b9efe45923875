//! The communicator seam: every way a group can run its operations sits
//! behind one trait, [`Communicator`], and a [`crate::ProcessGroup`] holds
//! exactly one and calls it once per operation.
//!
//! # Why a trait object and not an enum
//! crossbeam's channel dispatches its flavours with one `match` per method,
//! which suits a closed set compiled together. Backends here are an open set:
//! MPI and NCCL come behind cargo features with their own system libraries,
//! and tests plug in-process backends in. A `Box<dyn Communicator>` keeps
//! each backend in its own file with no `#[cfg]` arms in the group, and its
//! cost (one indirect call per collective, a few nanoseconds) is far below
//! the cheapest operation (a shared-memory barrier, about 100 ns).
//!
//! # The contract
//! The group does everything that is the same for every backend, once:
//! - **validation**: lengths, roots, peers, whole elements and who passes
//!   an output buffer are checked by [`crate::group`] before a backend is
//!   called (backends may `debug_assert!` them);
//! - **a group of one**: short-circuited by the group (copies only);
//! - **sequencing and deadlines**: each call gets a [`Call`] with the
//!   sequence number (the same on every rank for collectives, per peer pair
//!   for point-to-point) and its deadline;
//! - **poisoning**: after an error that [`crate::Error::poisons_group`], the
//!   group records it, calls [`Link::abort`] so peers learn of it, and
//!   refuses later calls with [`crate::Error::Poisoned`].
//!
//! A new backend implements:
//! 1. [`Communicator`]: the nine collectives, `send`, `recv` and `barrier`
//!    on byte buffers (a [`crate::DType`] and [`crate::ReduceOp`] where a
//!    reduction needs them), each failing by its [`Call::deadline`] at the
//!    latest with an error naming the operation, the group, this rank and
//!    the peer at fault. Results must be bitwise identical on every rank.
//! 2. [`Link`]: `abort` (tell the peers this rank failed) and `close`
//!    (release connections; peers see this rank as gone), both callable
//!    from any thread while an operation is in flight.
//! 3. Optionally, [`Communicator::broadcast_blob`] (with
//!    [`Communicator::has_blob_broadcast`]): a blob whose length only the
//!    root knows in one collective, its bytes produced by a
//!    [`BlobSource`] straight into the backend's memory. Without it the
//!    group sends the length and the bytes as two broadcasts.
//!
//! It proves itself by passing the conformance suite,
//! `crates/rankweave/tests/conformance/mod.rs` (every collective, dtype,
//! reduce op and world size, point-to-point, mismatch and timeout
//! errors), run per rank so that it works for ranks as threads and as
//! processes; `tests/conformance_backends.rs` runs it over every backend here.
//!
//! # The backends
//! - [`tcp::TransportComm`]: the algorithms of [`crate::collectives`] over
//!   any [`crate::transport::Transport`]: the TCP mesh, or the in-process
//!   transport in tests.
//! - [`shm::ShmBackend`]: the shared-memory collectives and point-to-point
//!   ([`crate::collectives::shm::ShmComm`]) for groups on one node, the TCP
//!   mesh for aborts.
//! - [`hier::HierBackend`]: groups spanning nodes: all_reduce through each
//!   node's shared memory and TCP among node leaders, the rest over TCP.
//! - `mpi::MpiComm` (cargo feature `mpi`): groups as MPI communicators,
//!   their collectives MPI's own, for jobs started by `mpirun` or `srun`.

pub mod hier;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod shm;
pub mod tcp;

use crate::collectives::shm::ShmBuf;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::group::TransportKind;
use crate::reduce::ReduceOp;
use crate::transport::{OpDesc, Transport};
use std::time::Instant;

/// What the group hands a backend with every operation.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    /// Sequence number: for collectives the group's count of collectives
    /// (the same on every rank), for `send`/`recv` the count of messages
    /// between this pair of ranks in that direction.
    pub seq: u64,
    /// How long the whole operation may take, from [`Call::deadline`]'s
    /// first reading (a backend that never blocks on a clock, such as the
    /// shared-memory one with its own per-step timeout, skips the clock read).
    pub timeout: std::time::Duration,
    /// What this rank calls (operation, dtype, reduce op, root, size): a
    /// backend carries it with the call's messages and fails with
    /// [`crate::Error::Mismatch`] naming both descriptors when a peer's
    /// differs, also for empty buffers (a zero-length call still takes part).
    pub desc: OpDesc,
}

impl Call {
    /// When the whole operation must be done: now plus [`Call::timeout`]
    /// (read it once per operation).
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }
}

/// One group's operations on byte buffers (see the module docs for the
/// contract). Called with the group's lock held, so one operation at a time;
/// buffers are valid and checked.
///
/// Buffer conventions (`n` ranks, `S` one rank's contribution) are those of
/// [`crate::collectives`]: `all_gather` output `n * S`, `gather` output on
/// the root only, `scatter` input on the root only, `reduce_scatter` input
/// `n * S`, `all_to_all` both `n * S`.
pub trait Communicator: Send {
    /// Short name for logs and errors: `tcp`, `shm`, `hier`, `mem`, ...
    fn name(&self) -> &'static str;
    /// In-place all_reduce.
    fn all_reduce(&mut self, call: Call, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()>;
    /// In-place broadcast from `root`.
    fn broadcast(&mut self, call: Call, buf: &mut [u8], root: usize) -> Result<()>;
    /// Every rank's `input` in rank order into `output`.
    fn all_gather(&mut self, call: Call, input: &[u8], output: &mut [u8]) -> Result<()>;
    /// Every rank's `input` in rank order into root's `output`.
    fn gather(&mut self, call: Call, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()>;
    /// Block `r` of root's `input` into rank `r`'s `output`.
    fn scatter(&mut self, call: Call, input: Option<&[u8]>, output: &mut [u8], root: usize) -> Result<()>;
    /// In-place reduce; only root's result is defined.
    fn reduce(&mut self, call: Call, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()>;
    /// Block `r` of the reduction of every `input` into rank `r`'s `output`.
    fn reduce_scatter(&mut self, call: Call, input: &[u8], output: &mut [u8], dtype: DType, op: ReduceOp)
        -> Result<()>;
    /// Block `j` of rank `i`'s input into block `i` of rank `j`'s output.
    fn all_to_all(&mut self, call: Call, input: &[u8], output: &mut [u8]) -> Result<()>;
    /// Returns once every rank entered.
    fn barrier(&mut self, call: Call) -> Result<()>;
    /// Sends `data` to `dst`, whose `recv` expects the same length.
    fn send(&mut self, call: Call, data: &[u8], dst: usize) -> Result<()>;
    /// Receives exactly `buf.len()` bytes from `src`.
    fn recv(&mut self, call: Call, buf: &mut [u8], src: usize) -> Result<()>;
    /// Point-to-point messages this rank has sent to `peer` through shared
    /// memory (a statistic; 0 for backends without it).
    fn shm_messages_sent(&self, _peer: usize) -> u64 {
        0
    }
    /// A zero-copy buffer of `len` bytes from this rank's pool
    /// ([`crate::collectives::shm::zc`]); [`Error::Unsupported`] for
    /// backends whose ranks do not all share memory.
    fn shm_buffer(&mut self, _len: usize) -> Result<ShmBuf> {
        Err(no_shm_buffers(self.name()))
    }
    /// Hands `buf` to `dst` without copying it.
    fn send_shm(&mut self, _call: Call, _buf: ShmBuf, _dst: usize) -> Result<()> {
        Err(no_shm_buffers(self.name()))
    }
    /// Receives a buffer `src` handed over with `send_shm`.
    fn recv_shm(&mut self, _call: Call, _src: usize) -> Result<ShmBuf> {
        Err(no_shm_buffers(self.name()))
    }
    /// Whether [`Communicator::broadcast_blob`] is this backend's own; when
    /// it is not, the group sends a blob as two broadcasts (its length,
    /// then its bytes) and never calls it.
    fn has_blob_broadcast(&self) -> bool {
        false
    }
    /// One collective that broadcasts a blob whose length only `root`
    /// knows (see [`BlobRole`]); `scratch` is a buffer the group keeps
    /// across calls. A rank whose side fails (the root cannot encode, a
    /// receiver refuses the size or cannot decode) still completes the
    /// collective, so that the group stays usable, and then returns the
    /// error. Called only when [`Communicator::has_blob_broadcast`] is true.
    fn broadcast_blob(&mut self, _call: Call, _role: BlobRole<'_>, _scratch: &mut Vec<u8>, _root: usize) -> Result<()> {
        Err(Error::Unsupported(format!("the {} backend has no blob broadcast of its own", self.name())))
    }
}

/// What the root of a blob broadcast sends: bytes produced on demand, so
/// that a backend can have them written straight into its own memory (an
/// object encoded into shared memory, not into a buffer and then copied).
pub trait BlobSource {
    /// Writes the blob at the front of `out` and returns its length, or
    /// `Ok(None)` when it needs more than `out.len()` bytes (what it wrote
    /// is then ignored and [`BlobSource::write_vec`] follows).
    fn write_into(&mut self, out: &mut [u8]) -> Result<Option<usize>>;
    /// Appends the whole blob to `out`.
    fn write_vec(&mut self, out: &mut Vec<u8>) -> Result<()>;
}

/// A blob already in memory.
impl BlobSource for &[u8] {
    fn write_into(&mut self, out: &mut [u8]) -> Result<Option<usize>> {
        Ok(out.get_mut(..self.len()).map(|o| {
            o.copy_from_slice(self);
            self.len()
        }))
    }
    fn write_vec(&mut self, out: &mut Vec<u8>) -> Result<()> {
        out.extend_from_slice(self);
        Ok(())
    }
}

/// The error of a receiver whose blob broadcast's root could not make the
/// blob (its encoding failed; the root returns the reason).
pub(crate) fn blob_not_made(ctx: crate::error::Context, root: usize) -> Error {
    Error::Serialization { ctx, detail: format!("rank {root}, the root, could not encode the object it broadcast") }
}

/// The error of a receiver that refuses a blob of `len` bytes above its
/// `limit`.
pub(crate) fn blob_refused(ctx: crate::error::Context, root: usize, len: u64, limit: usize) -> Error {
    Error::Serialization {
        ctx,
        detail: format!("rank {root} broadcast an object of {len} bytes, above this rank's limit of {limit} bytes"),
    }
}

/// The error of a receiver that cannot allocate the `len` bytes of a blob.
pub(crate) fn blob_no_memory(ctx: crate::error::Context, root: usize, len: u64) -> Error {
    Error::OutOfMemory { ctx, bytes: len, detail: format!("an object of {len} bytes broadcast by rank {root}") }
}

/// One rank's side of a blob broadcast.
pub enum BlobRole<'a> {
    /// The root: what it sends.
    Send(&'a mut dyn BlobSource),
    /// Every other rank.
    Receive {
        /// The most bytes this rank accepts: a larger declared length is
        /// refused before anything is allocated.
        limit: usize,
        /// Called once with the blob, which may live in the backend's
        /// memory: valid only during the call.
        read: &'a mut dyn FnMut(&[u8]) -> Result<()>,
    },
}

impl std::fmt::Debug for BlobRole<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlobRole::Send(_) => f.write_str("Send"),
            BlobRole::Receive { limit, .. } => f.debug_struct("Receive").field("limit", limit).finish_non_exhaustive(),
        }
    }
}

/// The error of a backend without zero-copy buffers.
fn no_shm_buffers(backend: &str) -> Error {
    Error::Unsupported(format!(
        "the {backend} backend has no zero-copy shared-memory buffers: they need a group whose ranks \
         all run on one node with shared memory (the shm backend)"
    ))
}

/// The half of a backend that any thread may use while an operation is in
/// flight: failure propagation and teardown.
pub trait Link: Send + Sync {
    /// Tells the peers that this rank failed with `err` (a no-op for errors
    /// that do not poison, or once already aborted or closed).
    fn abort(&self, err: &Error);
    /// Releases the connections; peers see this rank as gone. Idempotent.
    fn close(&self);
    /// The point-to-point transport under the backend, for traffic outside
    /// the group's own operations, when it has one.
    fn transport(&self) -> Option<&dyn Transport> {
        None
    }
}

/// A backend: its operations and its link.
pub struct Backend {
    /// The operations, used under the group's lock.
    pub comm: Box<dyn Communicator>,
    /// Abort and close, usable from any thread.
    pub link: std::sync::Arc<dyn Link>,
    /// What [`crate::ProcessGroup::transport_kind`] reports.
    pub kind: TransportKind,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("comm", &self.comm.name()).finish_non_exhaustive()
    }
}
