//! Operating-system specifics behind small safe interfaces (private).
//!
//! The contract with the rest of the crate:
//! - `shm::ShmSegment` owns one POSIX shared-memory mapping and is the only
//!   place that turns an offset into a pointer: atomics
//!   (`ShmSegment::atomic_u64`) and copies (`write`, `read`, `bytes`) by
//!   offset, each bounds checked. The unsafe copy functions leave exactly one
//!   obligation to the caller, stated on each: the module's own
//!   Release/Acquire protocol must give it exclusive access to the bytes.
//! - Segment names carry the job id (`/rankweave-<job>-…`); the job-id rule,
//!   listing and cleanup live here too. Failures keep the operating
//!   system's error as an `std::io::Error` inside [`crate::Error::Io`].
//!
//! - `stream::copy` copies with streaming (non-temporal) stores and a
//!   store fence, for bytes that another core reads next
//!   (`ShmSegment::write_streaming`).
//!
//! - `cma::read_from` copies from another process's memory
//!   (`process_vm_readv`, cross-memory attach); it is safe Rust (the kernel
//!   checks the remote range), and the caller's protocol must keep the
//!   remote buffer alive and unchanged during the call.
//!
//! - `huge::HugeWords` owns zeroed anonymous memory at a huge page
//!   boundary, advised as transparent huge pages (large host buffers).
//!
//! - `futex::wait`/`wake` sleep on and wake a word of a shared mapping
//!   (process-shared futexes on the low half of a 64-bit counter).
//!
//! What users need of it is re-exported by [`crate::segments`].

pub(crate) mod cma;
pub(crate) mod futex;
pub(crate) mod huge;
pub(crate) mod net;
pub(crate) mod proc;
pub(crate) mod shm;
pub(crate) mod stream;
