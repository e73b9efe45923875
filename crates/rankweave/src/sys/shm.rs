//! POSIX shared-memory segments (`shm_open` + `mmap`).
//!
//! Names are `/rankweave-<job>-<purpose>`: [`job_id`] comes from
//! `RANKWEAVE_JOB_ID` (set by `rankweave launch`) or from this process, so
//! the launcher can remove what a killed job left in `/dev/shm`.

use crate::error::{Error, Result};
use nix::fcntl::OFlag;
use nix::sys::mman::{mmap, munmap, shm_open, shm_unlink, MapFlags, ProtFlags};
use nix::sys::stat::Mode;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

/// The job id used in segment names.
pub fn job_id() -> String {
    match std::env::var("RANKWEAVE_JOB_ID") {
        Ok(v) if !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => v,
        _ => format!("p{}", std::process::id()),
    }
}

/// A shared-memory segment mapped read-write into this process.
///
/// The creator unlinks the name on drop; every holder unmaps.
#[derive(Debug)]
pub struct ShmSegment {
    name: String,
    ptr: NonNull<u8>,
    len: usize,
    owner: bool,
}

// SAFETY: the mapping is plain shared memory; all access goes through raw
// pointers whose synchronization is the caller's (atomics in the users).
unsafe impl Send for ShmSegment {}
// SAFETY: as above; `&ShmSegment` only hands out raw pointers.
unsafe impl Sync for ShmSegment {}

impl ShmSegment {
    /// Creates a new segment `name` (must start with `/`) of `len` bytes, zeroed.
    /// Fails if it already exists.
    pub fn create(name: &str, len: usize) -> Result<Self> {
        Self::map(name, len, true)
    }

    /// Opens an existing segment of at least `len` bytes.
    pub fn open(name: &str, len: usize) -> Result<Self> {
        Self::map(name, len, false)
    }

    fn map(name: &str, len: usize, create: bool) -> Result<Self> {
        let size = NonZeroUsize::new(len).ok_or_else(|| Error::invalid("shared-memory segment of 0 bytes"))?;
        let flags = if create { OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR } else { OFlag::O_RDWR };
        let fd = shm_open(name, flags, Mode::S_IRUSR | Mode::S_IWUSR)
            .map_err(|e| Error::SharedMemory(format!("shm_open {name}: {e}")))?;
        let fail = |what: &str, e: nix::Error| {
            if create {
                let _ = shm_unlink(name);
            }
            Error::SharedMemory(format!("{what} {name} ({len} bytes): {e}"))
        };
        if create {
            nix::unistd::ftruncate(&fd, len as i64).map_err(|e| fail("ftruncate", e))?;
        } else {
            let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(|e| fail("fstat", e))?;
            if (st.st_size as u64) < len as u64 {
                return Err(Error::SharedMemory(format!("{name} has {} bytes, expected at least {len}", st.st_size)));
            }
        }
        // SAFETY: mapping a fresh shared file descriptor at a kernel-chosen
        // address; no existing memory is affected.
        let ptr =
            unsafe { mmap(None, size, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, &fd, 0) }
                .map_err(|e| fail("mmap", e))?;
        Ok(ShmSegment { name: name.to_string(), ptr: ptr.cast(), len, owner: create })
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: segments have at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segment's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this handle created the segment (and unlinks it on drop).
    pub fn is_owner(&self) -> bool {
        self.owner
    }

    /// Removes the name now (mappings stay valid); idempotent.
    pub fn unlink(&mut self) {
        if self.owner {
            let _ = shm_unlink(self.name.as_str());
            self.owner = false;
        }
    }
}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned and nothing else
        // unmaps them.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
        self.unlink();
    }
}
