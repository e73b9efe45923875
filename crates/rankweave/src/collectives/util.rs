//! Pieces every algorithm shares: a copyable handle on the transport for one
//! call ([`Link`]), element-aligned block/segment arithmetic ([`Blocks`]) and
//! scratch-space helpers.

use crate::error::Result;
use crate::transport::{Tag, Transport};
use std::ops::Range;
use std::time::Instant;

/// The transport, tag and deadline of one collective call. `Copy`, so an
/// algorithm can hold it while it borrows the call's scratch space.
#[derive(Clone, Copy)]
pub(crate) struct Link<'a> {
    pub t: &'a dyn Transport,
    pub tag: Tag,
    pub deadline: Instant,
}

impl Link<'_> {
    pub fn rank(&self) -> usize {
        self.t.rank()
    }
    pub fn size(&self) -> usize {
        self.t.size()
    }
    pub fn send(&self, to: usize, data: &[u8]) -> Result<()> {
        self.t.send(to, self.tag, data, self.deadline)
    }
    pub fn recv(&self, from: usize, buf: &mut [u8]) -> Result<()> {
        self.t.recv(from, self.tag, buf, self.deadline)
    }
    /// Sends `data` to `to` while receiving `buf` from `from`. An empty side
    /// is skipped: both ends compute the same lengths, so the peer skips the
    /// matching message too. Algorithms only ever pair an empty side with at
    /// most one element on the other, so a lone blocking send stays tiny.
    pub fn exchange(&self, to: usize, data: &[u8], from: usize, buf: &mut [u8]) -> Result<()> {
        match (data.is_empty(), buf.is_empty()) {
            (false, false) => self.t.send_recv(to, self.tag, data, from, self.tag, buf, self.deadline),
            (false, true) => self.send(to, data),
            (true, false) => self.recv(from, buf),
            (true, true) => Ok(()),
        }
    }
}

/// `parts` near-equal pieces of `total` units: piece `i`'s (start, len); the
/// first `total % parts` pieces are one unit longer.
pub(crate) fn split(total: usize, parts: usize, i: usize) -> (usize, usize) {
    let q = total / parts;
    let r = total % parts;
    (i * q + i.min(r), q + usize::from(i < r))
}

/// A buffer of `elems` elements of `es` bytes cut into `n` element-aligned
/// blocks (one per rank), each cut into the same number of segments.
///
/// Every block has the same segment count, so two ranks that exchange
/// segment `j` of different blocks always agree on how many messages there
/// are; blocks differ by at most one element, so do their segments.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Blocks {
    elems: usize,
    n: usize,
    es: usize,
    /// Segments per block (at least 1).
    pub segs: usize,
}

impl Blocks {
    pub fn new(bytes: usize, n: usize, es: usize, segment_bytes: usize) -> Blocks {
        let elems = bytes / es;
        let max_block = elems.div_ceil(n) * es;
        let segs = max_block.div_ceil(segment_bytes.max(es)).max(1);
        Blocks { elems, n, es, segs }
    }

    /// Elements in block `i`.
    fn block_elems(&self, i: usize) -> (usize, usize) {
        split(self.elems, self.n, i)
    }

    /// Byte range of block `i`.
    pub fn block(&self, i: usize) -> Range<usize> {
        let (s, l) = self.block_elems(i);
        s * self.es..(s + l) * self.es
    }

    /// Byte range (in the whole buffer) of segment `j` of block `i`.
    pub fn seg(&self, i: usize, j: usize) -> Range<usize> {
        let (bs, bl) = self.block_elems(i);
        let (s, l) = split(bl, self.segs, j);
        (bs + s) * self.es..(bs + s + l) * self.es
    }

    /// Bytes in the largest segment.
    pub fn max_seg_bytes(&self) -> usize {
        self.elems.div_ceil(self.n).div_ceil(self.segs) * self.es
    }
}

/// `buf[a]` to read and `buf[b]` to write, for disjoint ranges.
pub(crate) fn split_pair(buf: &mut [u8], a: Range<usize>, b: Range<usize>) -> (&[u8], &mut [u8]) {
    debug_assert!(a.end <= b.start || b.end <= a.start || a.is_empty() || b.is_empty());
    if a.is_empty() {
        return (&[], &mut buf[b]);
    }
    if b.is_empty() {
        return (&buf[a], &mut []);
    }
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.end - a.start], &mut lo[b])
    }
}

/// Grows `scratch` to at least `len` bytes (never shrinks) and returns the
/// first `len`.
pub(crate) fn scratch(scratch: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if scratch.len() < len {
        scratch.resize(len, 0);
    }
    &mut scratch[..len]
}

/// `(a - b) mod n` for `a, b < n`-ish values, without underflow.
pub(crate) fn sub_mod(a: usize, b: usize, n: usize) -> usize {
    (a + n - b % n) % n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_buffer_and_segments_agree() {
        for n in 1..=9 {
            for elems in [0usize, 1, 5, 7, 8, 100, 1001] {
                for seg in [1usize, 4, 12, 64, 1 << 20] {
                    let b = Blocks::new(elems * 4, n, 4, seg);
                    let mut next = 0;
                    for i in 0..n {
                        let r = b.block(i);
                        assert_eq!(r.start, next);
                        let mut sn = r.start;
                        for j in 0..b.segs {
                            let s = b.seg(i, j);
                            assert_eq!(s.start, sn);
                            assert!(s.len() <= b.max_seg_bytes());
                            sn = s.end;
                            // Segments of different blocks differ by at most one element.
                            for k in 0..n {
                                assert!(b.seg(k, j).len().abs_diff(s.len()) <= 4);
                            }
                        }
                        assert_eq!(sn, r.end);
                        next = r.end;
                    }
                    assert_eq!(next, elems * 4);
                }
            }
        }
    }

    #[test]
    fn split_pair_both_orders() {
        let mut v: Vec<u8> = (0..10).collect();
        let (a, b) = split_pair(&mut v, 6..8, 1..3);
        assert_eq!(a, &[6, 7]);
        b.copy_from_slice(&[9, 9]);
        let (a, b) = split_pair(&mut v, 0..2, 4..5);
        assert_eq!(a, &[0, 9]);
        assert_eq!(b, &[4]);
    }
}
