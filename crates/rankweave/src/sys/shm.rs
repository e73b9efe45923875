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
use std::sync::atomic::AtomicU64;

/// An operating-system failure of `what` on `target`, keeping the errno as
/// an [`std::io::Error`] (callers match on its kind, never on the text).
fn os_error(what: &str, target: &str, e: nix::Error) -> Error {
    Error::Io { ctx: crate::error::Context::op(format!("{what} {target}")), source: std::io::Error::from(e) }
}

/// The environment variable naming the job (set by `rankweave launch`).
pub const JOB_ID_ENV: &str = "RANKWEAVE_JOB_ID";

/// The one rule for job ids: 1 to 64 ASCII letters, digits or `_` (they
/// become part of segment names).
pub fn is_valid_job_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The job id used in segment names: [`JOB_ID_ENV`] when valid, else one of
/// this process alone (`p<pid>`). Read once per process.
pub fn job_id() -> String {
    static JOB: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    JOB.get_or_init(|| match std::env::var(JOB_ID_ENV) {
        Ok(v) if is_valid_job_id(&v) => v,
        _ => format!("p{}", std::process::id()),
    })
    .clone()
}

/// A fresh job id for a launcher: 10 random lower-case letters and digits.
pub fn new_job_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; mix in pid and time so two launches
    // in one process differ as well.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    let mut x = h.finish();
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..10)
        .map(|_| {
            let c = ALPHABET[(x % 36) as usize] as char;
            x /= 36;
            c
        })
        .collect()
}

/// Where POSIX shared-memory names live on Linux.
pub const SHM_DIR: &str = "/dev/shm";

/// The name prefix (without the leading `/`) of every segment of job `job`.
pub fn job_prefix(job: &str) -> String {
    format!("rankweave-{job}-")
}

/// A segment name for `purpose` in this job: `/rankweave-<job>-<purpose>`.
/// Characters other than ASCII letters, digits, `_` and `-` in `purpose`
/// become `_` (group names like `tp:0` are welcome).
pub fn segment_name(purpose: &str) -> String {
    let clean: String =
        purpose.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    format!("/{}{clean}", job_prefix(&job_id()))
}

/// Free bytes of the file system under `path` (for shared memory: `/dev/shm`).
pub fn free_bytes(path: &str) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| Error::SharedMemory(format!("statvfs {path}: {e}")))?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Fails when `/dev/shm` has fewer than `needed` free bytes, with an error
/// that says how much is needed, how much is free and how to give a
/// container more. Passes silently where `/dev/shm` cannot be inspected
/// (the `mmap` then reports its own error).
pub fn check_free_space(needed: u64) -> Result<()> {
    check_free_space_at(SHM_DIR, needed)
}

/// [`check_free_space`] for another mount point (tests, other platforms).
pub fn check_free_space_at(path: &str, needed: u64) -> Result<()> {
    let Ok(free) = free_bytes(path) else { return Ok(()) };
    if free < needed {
        return Err(space_error(path, free, needed));
    }
    Ok(())
}

fn space_error(path: &str, free: u64, needed: u64) -> Error {
    Error::SharedMemory(format!(
        "{path} has {free} bytes ({}) free but this segment needs {needed} bytes ({}); \
         give the container more shared memory (`docker run --shm-size=1g ...` or `--ipc=host`; \
         Kubernetes: mount an `emptyDir` with `medium: Memory` at /dev/shm), or free space in {path}",
        human(free),
        human(needed)
    ))
}

fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Names (with the leading `/`) of the segments of job `job` present now.
pub fn list_job(job: &str) -> Result<Vec<String>> {
    let prefix = job_prefix(job);
    let dir = std::fs::read_dir(SHM_DIR)
        .map_err(|e| Error::io(crate::error::Context::op(format!("read_dir {SHM_DIR}")), e))?;
    let mut names = Vec::new();
    for entry in dir.flatten() {
        if let Some(n) = entry.file_name().to_str() {
            if n.starts_with(&prefix) {
                names.push(format!("/{n}"));
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Removes every segment of job `job` (what a SIGKILLed job left behind) and
/// returns the names removed. The launcher calls it when a job ends; it is
/// safe to call while the job runs only for segments nobody opens any more.
pub fn cleanup_job(job: &str) -> Result<Vec<String>> {
    if !is_valid_job_id(job) {
        return Err(Error::invalid(format!("job id `{job}` must be 1 to 64 ASCII letters, digits or `_`")));
    }
    let mut removed = Vec::new();
    for name in list_job(job)? {
        match shm_unlink(name.as_str()) {
            Ok(()) => removed.push(name),
            // Raced with its owner unlinking it: already gone.
            Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(os_error("shm_unlink", &name, e)),
        }
    }
    Ok(removed)
}

/// The pid of the process that created segment `name`, from the
/// `-<pid>-<n>` that ends every name [`ShmSegment::create_unique`] makes.
pub fn creator_pid(name: &str) -> Option<u32> {
    let mut it = name.rsplitn(3, '-');
    let n = it.next()?;
    let pid = it.next()?;
    it.next()?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Removes the segments of job `job` that processes `pids` created (see
/// [`creator_pid`]) and returns their names: a launcher passes its own
/// workers, so a second job that happens to share the job id keeps its
/// live segments. Names without a creator pid are left alone.
pub fn cleanup_job_of(job: &str, pids: &[u32]) -> Result<Vec<String>> {
    if !is_valid_job_id(job) {
        return Err(Error::invalid(format!("job id `{job}` must be 1 to 64 ASCII letters, digits or `_`")));
    }
    let mut removed = Vec::new();
    for name in list_job(job)? {
        if !creator_pid(&name).is_some_and(|p| pids.contains(&p)) {
            continue;
        }
        match shm_unlink(name.as_str()) {
            Ok(()) => removed.push(name),
            Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(os_error("shm_unlink", &name, e)),
        }
    }
    Ok(removed)
}

/// A shared-memory segment mapped read-write into this process.
///
/// The creator unlinks the name on drop; every holder unmaps.
#[derive(Debug)]
pub struct ShmSegment {
    name: String,
    ptr: NonNull<u8>,
    len: usize,
    owner: std::sync::atomic::AtomicBool,
    /// The descriptor an anonymous segment keeps open (others map it
    /// through `/proc/<pid>/fd/<fd>`); `None` for named segments.
    fd: Option<std::os::fd::OwnedFd>,
}

// SAFETY: the mapping is plain shared memory; all access goes through raw
// pointers whose synchronization is the caller's (atomics in the users).
unsafe impl Send for ShmSegment {}
// SAFETY: as above; `&ShmSegment` only hands out raw pointers.
unsafe impl Sync for ShmSegment {}

impl ShmSegment {
    /// Creates a new segment `name` (must start with `/`) of `len` bytes, zeroed.
    /// Fails if it already exists.
    ///
    /// Checks the free space of `/dev/shm` first (see [`check_free_space`]),
    /// so that a too-small `/dev/shm` is an error here instead of a bus error
    /// on first touch.
    pub fn create(name: &str, len: usize) -> Result<Self> {
        check_free_space(len as u64)?;
        Self::map(name, len, true)
    }

    /// Creates a segment named `/rankweave-<job>-<purpose>-<pid>-<n>` with a
    /// process-wide counter `n`, skipping names that already exist (left by an
    /// earlier process of the same job id and a recycled pid).
    pub fn create_unique(purpose: &str, len: usize) -> Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        check_free_space(len as u64)?;
        let mut last = None;
        for _ in 0..16 {
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // The pid keeps processes apart: every TP group may be called
            // `tp:0`, and each process counts from 0.
            let name = segment_name(&format!("{purpose}-{}-{n}", std::process::id()));
            match Self::map(&name, len, true) {
                Ok(seg) => return Ok(seg),
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
                    last = Some(name)
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::SharedMemory(format!(
            "no free segment name for {purpose} (the last tried, {}, exists)",
            last.unwrap_or_default()
        )))
    }

    /// Opens an existing segment of at least `len` bytes.
    pub fn open(name: &str, len: usize) -> Result<Self> {
        Self::map(name, len, false)
    }

    fn map(name: &str, len: usize, create: bool) -> Result<Self> {
        let size = NonZeroUsize::new(len).ok_or_else(|| Error::invalid("shared-memory segment of 0 bytes"))?;
        let flags = if create { OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR } else { OFlag::O_RDWR };
        let fd = shm_open(name, flags, Mode::S_IRUSR | Mode::S_IWUSR).map_err(|e| os_error("shm_open", name, e))?;
        let fail = |what: &str, e: nix::Error| {
            if create {
                let _ = shm_unlink(name);
            }
            os_error(what, &format!("{name} ({len} bytes)"), e)
        };
        if create {
            nix::unistd::ftruncate(&fd, len as i64).map_err(|e| fail("ftruncate", e))?;
            // Reserve the pages now, so that a /dev/shm filled by someone
            // else since the free-space check is an error here instead of a
            // SIGBUS at the first touch.
            match nix::fcntl::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&fd), 0, len as i64) {
                Ok(()) => {}
                Err(nix::errno::Errno::ENOSPC) => {
                    let _ = shm_unlink(name);
                    return Err(space_error(SHM_DIR, free_bytes(SHM_DIR).unwrap_or(0), len as u64));
                }
                // File systems without fallocate: the free-space check has to do.
                Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOSYS | nix::errno::Errno::EINVAL) => {}
                Err(e) => return Err(fail("fallocate", e)),
            }
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
        Ok(ShmSegment { name: name.to_string(), ptr: ptr.cast(), len, owner: create.into(), fd: None })
    }

    /// Creates an anonymous segment of `len` bytes (`memfd_create`): it
    /// never has a name in `/dev/shm`, so nothing can be left behind; its
    /// memory lives as long as a process maps it. The descriptor stays open
    /// ([`ShmSegment::raw_fd`]) so that other processes of the same user and
    /// pid namespace can map it with [`ShmSegment::open_fd_of`]. The pages
    /// are reserved and mapped at once (no SIGBUS, no page faults later).
    pub fn create_anonymous(purpose: &str, len: usize) -> Result<Self> {
        let size = NonZeroUsize::new(len).ok_or_else(|| Error::invalid("shared-memory segment of 0 bytes"))?;
        let tag = std::ffi::CString::new(format!("rankweave-{purpose}")).unwrap_or_default();
        let fd = nix::sys::memfd::memfd_create(&tag, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| os_error("memfd_create", purpose, e))?;
        let what = format!("memfd {purpose} ({len} bytes)");
        nix::unistd::ftruncate(&fd, len as i64).map_err(|e| os_error("ftruncate", &what, e))?;
        match nix::fcntl::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&fd), 0, len as i64) {
            Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOSYS | nix::errno::Errno::EINVAL) => {}
            Err(e) => return Err(os_error("fallocate", &what, e)),
        }
        let ptr = map_fd(&fd, size).map_err(|e| os_error("mmap", &what, e))?;
        Ok(ShmSegment { name: what, ptr, len, owner: false.into(), fd: Some(fd) })
    }

    /// Maps the anonymous segment that process `pid` holds open as `fd`
    /// (`/proc/<pid>/fd/<fd>`), which must be a shared-memory file of at
    /// least `min_len` bytes; the mapping covers the whole file (see
    /// [`ShmSegment::len`]). Fails with an I/O error of kind `NotFound`
    /// when the process or the descriptor is gone, `PermissionDenied` where
    /// the kernel forbids it.
    pub fn open_fd_of(pid: i32, fd: i32, min_len: usize) -> Result<Self> {
        use std::os::fd::AsFd;
        let path = format!("/proc/{pid}/fd/{fd}");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(crate::error::Context::op(format!("open {path}")), e))?;
        let st =
            nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&file)).map_err(|e| os_error("fstat", &path, e))?;
        // Only a regular file can be a shared-memory segment (a socket or a
        // pipe would not map, a device might map something else).
        let regular = nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT
            == nix::sys::stat::SFlag::S_IFREG;
        let len = usize::try_from(st.st_size).unwrap_or(0);
        if !regular || len < min_len.max(1) {
            return Err(Error::SharedMemory(format!(
                "{path} is not a shared-memory segment of at least {min_len} bytes ({len} bytes)"
            )));
        }
        let size = NonZeroUsize::new(len).ok_or_else(|| Error::invalid("shared-memory segment of 0 bytes"))?;
        let ptr = map_fd(&file.as_fd(), size).map_err(|e| os_error("mmap", &path, e))?;
        Ok(ShmSegment { name: path, ptr, len, owner: false.into(), fd: None })
    }

    /// The open descriptor of an anonymous segment (see
    /// [`ShmSegment::create_anonymous`]).
    pub fn raw_fd(&self) -> Option<i32> {
        self.fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd)
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The start of `len` bytes at `off`, after checking they lie inside
    /// the mapping (a bug in the caller's layout panics here instead of
    /// touching memory outside it).
    fn range(&self, off: usize, len: usize) -> *mut u8 {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "segment {}: {len} bytes at offset {off} exceed its {} bytes",
            self.name,
            self.len
        );
        // SAFETY: `off + len <= self.len`, so the result stays inside (or one
        // past the end of) the mapping.
        unsafe { self.ptr.as_ptr().add(off) }
    }

    /// The 8-byte atomic at `off` (8-byte aligned, inside the mapping).
    ///
    /// Every process that maps the segment may access the word, but only
    /// through atomics: a layout that also reads or writes it as plain
    /// bytes is a bug of the caller.
    #[inline]
    pub fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        // One branch on the hot path (waiting loops read these words).
        if off & 7 != 0 || self.len < 8 || off > self.len - 8 {
            self.bad_atomic(off);
        }
        // SAFETY: 8 bytes at `off` lie inside the mapping (checked above).
        let p = unsafe { self.ptr.as_ptr().add(off) };
        // SAFETY: inside the mapping (checked), 8-byte aligned (the mapping
        // is page aligned and `off` is a multiple of 8), valid for the
        // lifetime of `&self`, and only ever accessed atomically (the
        // contract above).
        unsafe { &*p.cast::<AtomicU64>() }
    }

    #[cold]
    fn bad_atomic(&self, off: usize) -> ! {
        panic!("segment {}: no aligned 8-byte atomic at offset {off} of {} bytes", self.name, self.len)
    }

    /// Copies `data` into the segment at `off` (bounds checked).
    ///
    /// # Safety
    /// No other thread or process may access those bytes until a
    /// Release/Acquire handshake through one of the segment's atomics
    /// publishes them (the protocol of the module using the segment).
    pub unsafe fn write(&self, off: usize, data: &[u8]) {
        let p = self.range(off, data.len());
        // SAFETY: inside the mapping (checked); exclusive access to the
        // range is the caller's contract; `data` is a distinct local buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    /// [`ShmSegment::write`] with streaming stores (`sys::stream`): the
    /// bytes go towards memory instead of into this core's cache, for a
    /// reader on another core.
    ///
    /// # Safety
    /// As [`ShmSegment::write`].
    pub unsafe fn write_streaming(&self, off: usize, data: &[u8]) {
        let p = self.range(off, data.len());
        // SAFETY: inside the mapping (checked); exclusive access to the
        // range is the caller's contract; `data` is a distinct local buffer.
        unsafe { super::stream::copy(data, p) };
    }

    /// Copies `out.len()` bytes at `off` out of the segment (bounds checked).
    ///
    /// # Safety
    /// The bytes must have been published to this process (an Acquire load
    /// that pairs with the writer's Release store) and must not be written
    /// while they are copied.
    pub unsafe fn read(&self, off: usize, out: &mut [u8]) {
        let p = self.range(off, out.len());
        // SAFETY: inside the mapping (checked); no concurrent writer is the
        // caller's contract; `out` is a distinct local buffer.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
    }

    /// A view of `len` bytes at `off` (bounds checked), for reading in place.
    ///
    /// # Safety
    /// As [`ShmSegment::read`], for as long as the slice lives.
    pub unsafe fn bytes(&self, off: usize, len: usize) -> &[u8] {
        let p = self.range(off, len);
        // SAFETY: inside the mapping (checked) and valid for `&self`; no
        // concurrent writer while the slice lives is the caller's contract.
        unsafe { std::slice::from_raw_parts(p, len) }
    }

    /// A mutable view of `len` bytes at `off` (bounds checked), for writing
    /// in place.
    ///
    /// # Safety
    /// No other view of those bytes may exist, in this process or another,
    /// while the slice lives (the caller's ownership protocol).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, off: usize, len: usize) -> &mut [u8] {
        let p = self.range(off, len);
        // SAFETY: inside the mapping (checked) and valid for `&self`;
        // exclusive access while the slice lives is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(p, len) }
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
        self.owner.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Removes the name now (mappings stay valid); idempotent.
    pub fn unlink(&self) {
        if self.owner.swap(false, std::sync::atomic::Ordering::Relaxed) {
            let _ = shm_unlink(self.name.as_str());
        }
    }
}

/// Maps all `size` bytes of `fd` shared, read-write, with its pages
/// populated.
fn map_fd(fd: &impl std::os::fd::AsFd, size: NonZeroUsize) -> nix::Result<NonNull<u8>> {
    // SAFETY: mapping a shared file descriptor at a kernel-chosen address;
    // no existing memory is affected.
    let ptr = unsafe {
        mmap(
            None,
            size,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE,
            fd,
            0,
        )
    }?;
    Ok(ptr.cast())
}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned and nothing else
        // unmaps them.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
        self.unlink();
    }
}
