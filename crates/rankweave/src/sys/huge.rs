//! Zeroed anonymous memory on transparent huge pages, for large host
//! buffers.
//!
//! [`HugeWords`] owns one private anonymous mapping of whole huge pages
//! that starts at a huge page boundary and is advised `MADV_HUGEPAGE`
//! before any byte of it is touched, so that the kernel backs each 2 MiB of
//! it with one huge page where it can. The kernel's copy between two
//! processes (`process_vm_readv` / `process_vm_writev`, the split copy of
//! the shared-memory point-to-point) pins the pages it copies one by one,
//! and on the machine of `docs/PERFORMANCE.md` (run 18) that pinning made a
//! 4 MiB copy between base pages 2.1-2.4x as long as between huge pages.
//!
//! Where the kernel has no transparent huge pages, or refuses the advice,
//! the mapping keeps base pages and works the same.

use nix::sys::mman::{madvise, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};
use std::num::NonZeroUsize;
use std::ptr::NonNull;

/// Bytes of a transparent huge page on x86-64 and of the alignment
/// [`HugeWords`] keeps.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// `n` zeroed `u64` words in a mapping of their own that starts at a
/// [`HUGE_PAGE`] boundary and is advised as huge pages.
pub(crate) struct HugeWords {
    /// Start of the words (a huge page boundary).
    ptr: NonNull<u64>,
    /// Number of words.
    n: usize,
    /// Bytes mapped from `ptr` (whole huge pages).
    mapped: usize,
}

// SAFETY: `HugeWords` owns its mapping exclusively, as a `Vec<u64>` owns its
// allocation: shared references only read it, and writes need `&mut self`.
unsafe impl Send for HugeWords {}
// SAFETY: as above; `&HugeWords` gives read-only access.
unsafe impl Sync for HugeWords {}

impl HugeWords {
    /// Maps `n` zeroed words (at least one), or `None` when the kernel
    /// refuses the mapping or the size overflows. The mapping is rounded up
    /// to whole huge pages: a tail on base pages would be faulted in one
    /// base page at a time, and on the machine of `docs/PERFORMANCE.md`
    /// (run 18) the split copy into a fresh 3 MiB buffer whose last MiB was
    /// on base pages took about 3x as long as into one on two huge pages. The
    /// memory past the words is touched by nobody, but a huge page is
    /// allocated whole: up to one huge page more than the words need.
    pub(crate) fn zeroed(n: usize) -> Option<HugeWords> {
        let bytes = n.checked_mul(8)?.max(1);
        let mapped = bytes.checked_next_multiple_of(HUGE_PAGE)?;
        // Map one huge page more than needed, then unmap what lies before
        // the first huge page boundary and after the end.
        let span = mapped.checked_add(HUGE_PAGE)?;
        // SAFETY: a fresh private anonymous mapping at an address the kernel
        // chooses; it aliases nothing.
        let base = unsafe {
            mmap_anonymous(
                None,
                NonZeroUsize::new(span)?,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .ok()?;
        let head = (base.as_ptr() as usize).next_multiple_of(HUGE_PAGE) - base.as_ptr() as usize;
        let tail = span - head - mapped;
        // SAFETY: `head < HUGE_PAGE < span`, so both pointers stay inside
        // the mapping just made (the second at most at its end).
        let (ptr, end) = unsafe {
            let ptr = base.cast::<u8>().add(head);
            (ptr, ptr.add(mapped))
        };
        // SAFETY: both ranges lie inside the mapping just made, start and end
        // on base page boundaries (mmap returns page-aligned memory, and
        // `mapped` is a multiple of the huge page), and nothing refers to
        // them.
        unsafe {
            if head > 0 {
                let _ = munmap(base, head);
            }
            if tail > 0 {
                let _ = munmap(end.cast(), tail);
            }
        }
        // Refused where the kernel has no transparent huge pages: base pages
        // then, which is what any other buffer has.
        // SAFETY: the advice covers exactly our mapping and changes only how
        // the kernel backs it.
        let _ = unsafe { madvise(ptr.cast(), mapped, MmapAdvise::MADV_HUGEPAGE) };
        Some(HugeWords { ptr: ptr.cast(), n, mapped })
    }

    /// The words.
    pub(crate) fn as_slice(&self) -> &[u64] {
        // SAFETY: `ptr` is the start of a live mapping of at least `n * 8`
        // readable bytes, aligned for u64 (a huge page boundary), zero-filled
        // by the kernel, and owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.n) }
    }

    /// The words, mutable.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u64] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.n) }
    }
}

impl Drop for HugeWords {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`mapped` are exactly the range this value kept
        // mapped, and no slice of it outlives `self`.
        let _ = unsafe { munmap(self.ptr.cast(), self.mapped) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `VmFlags` line of the mapping that holds `addr`, from
    /// `/proc/self/smaps`.
    fn vm_flags(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return Some(flags.trim().to_string());
                }
            }
        }
        None
    }

    /// Whether the kernel has transparent huge pages at all (then it takes
    /// the advice, whatever its policy says).
    fn thp_available() -> bool {
        std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists()
    }

    #[test]
    fn words_are_zeroed_aligned_writable_and_advised_as_huge_pages() {
        for n in [1, 1000, (5 << 20) / 8 + 3, (4 << 20) / 8] {
            let mut w = HugeWords::zeroed(n).unwrap();
            assert_eq!(w.as_slice().len(), n);
            assert_eq!(w.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
            assert!(w.as_slice().iter().all(|&x| x == 0));
            for (i, x) in w.as_mut_slice().iter_mut().enumerate() {
                *x = i as u64 ^ 0x5a5a;
            }
            assert!(w.as_slice().iter().enumerate().all(|(i, &x)| x == i as u64 ^ 0x5a5a));
            assert_eq!(w.mapped % HUGE_PAGE, 0);
            assert!(w.mapped >= n * 8 && w.mapped < n * 8 + HUGE_PAGE);
            if thp_available() {
                let flags = vm_flags(w.as_slice().as_ptr() as usize).unwrap();
                assert!(flags.split_whitespace().any(|f| f == "hg"), "no huge page advice: {flags}");
            }
        }
    }

    #[test]
    fn sizes_that_overflow_are_refused() {
        assert!(HugeWords::zeroed(usize::MAX / 4).is_none());
        assert!(HugeWords::zeroed(usize::MAX / 8).is_none());
    }
}
