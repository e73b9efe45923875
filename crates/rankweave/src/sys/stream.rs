//! Copies with non-temporal ("streaming") stores, for bytes that another
//! core reads next.
//!
//! A plain store first takes the line into the writing core's cache, and
//! when the reader's core holds an old copy of it (a slot it read the last
//! time round), the write waits for that copy to be invalidated. A
//! streaming store writes whole lines towards memory without reading them,
//! and the reader's next load finds no stale copy to fight over. Which
//! costs less depends on how far apart the two cores are (the same cache,
//! or caches that talk through the memory fabric): see
//! `collectives/shm/p2p.rs`, which measures both.

/// Copies `src` to `dst` with streaming stores for the 16-byte-aligned part
/// of the destination and plain copies for the ends, then fences, so that a
/// later Release store publishes every byte (streaming stores are not
/// ordered by it).
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` bytes that no other thread
/// or process accesses until the caller publishes them, and must not
/// overlap `src`.
pub(crate) unsafe fn copy(src: &[u8], dst: *mut u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        let len = src.len();
        let head = dst.align_offset(16).min(len);
        let body = (len - head) / 16 * 16;
        // SAFETY: the first `head` bytes of both buffers, inside them
        // (`head <= len`); no overlap is the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, head) };
        let mut off = head;
        while off < head + body {
            // SAFETY: `off + 16 <= head + body <= len`, so both 16-byte
            // accesses lie inside the buffers; the destination is 16-byte
            // aligned (`head` aligned it, and `off - head` is a multiple of
            // 16); SSE2, which these intrinsics need, is part of x86_64.
            unsafe {
                let v = _mm_loadu_si128(src.as_ptr().add(off).cast::<__m128i>());
                _mm_stream_si128(dst.add(off).cast::<__m128i>(), v);
            }
            off += 16;
        }
        // SAFETY: the remaining `len - off` bytes of both buffers.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(off), dst.add(off), len - off) };
        // SAFETY: a store fence has no memory operands; it orders the
        // streaming stores before every later store (the publishing one).
        unsafe { _mm_sfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // SAFETY: as the caller's contract states.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_length_and_alignment_copies_every_byte() {
        let src: Vec<u8> = (0..320u32).map(|i| (i * 7 + 3) as u8).collect();
        for src_off in [0, 1, 8, 15] {
            for dst_off in 0..17 {
                for len in [0, 1, 15, 16, 17, 31, 32, 33, 64, 100, 255, 283] {
                    let from = &src[src_off..src_off + len];
                    let mut dst = vec![0xAAu8; 320];
                    // SAFETY: `dst_off + len <= 300 < 320`, a distinct buffer.
                    unsafe { super::copy(from, dst.as_mut_ptr().add(dst_off)) };
                    assert_eq!(&dst[dst_off..dst_off + len], from, "offsets {src_off} -> {dst_off}, {len} bytes");
                    assert!(dst[..dst_off].iter().all(|&b| b == 0xAA));
                    assert!(dst[dst_off + len..].iter().all(|&b| b == 0xAA));
                }
            }
        }
    }
}
