//! Zero-copy point-to-point: buffers that live in shared memory and change
//! hands between the ranks of a group instead of being copied.
//!
//! # What a buffer is
//! Each rank owns a pool of blocks. A block is one anonymous shared-memory
//! file (`memfd`, never named in `/dev/shm`, so a killed job leaves nothing
//! behind) of a power-of-two capacity (at least [`BUF_MIN`]), with a
//! 4 KiB header page before the data. [`ShmComm::shm_buffer`] hands out a
//! free block of the right class (or makes one) as a [`ShmBuf`]: a view of
//! `len` bytes that only its holder reads or writes.
//!
//! # Moving it
//! [`ShmComm::send_shm`] consumes the buffer and sends a 32-byte descriptor
//! (owner, serial, the owner's descriptor number, length) through the
//! pair's channel (the inline path of [`super::p2p`], so it returns at
//! once); [`ShmComm::recv_shm`] takes the descriptor and returns a
//! [`ShmBuf`] over the same bytes. The first time a rank receives a block
//! of another rank it maps it through `/proc/<owner pid>/fd/<fd>` (pages
//! populated) and keeps the mapping for the group's life, so later messages
//! cost no system call and no page fault. A received buffer can be sent on
//! (a ping-pong or a pipeline passes the same bytes along). Dropping a
//! buffer, on any rank, marks its block free in the block's header, and its
//! owner hands it out again.
//!
//! The data are published by the channel's Release/Acquire on the message
//! number, and a block comes back to its owner's pool by a Release store of
//! its state that the owner's claim reads with Acquire.
//!
//! # Trust and lifetime
//! - A descriptor is checked before use: the owner must be a member, the
//!   block must be one of the owner's (header magic, owner and serial, read
//!   from the mapping this rank made), and the length must fit the size
//!   of the file as this rank's own `fstat` reports it. A hostile or buggy
//!   peer can therefore not make this rank read or write outside a mapping.
//! - A block this process already holds (a peer sending it twice) is
//!   refused ([`Error::Protocol`]), and the owner hands out only blocks that
//!   are free in its process as well as in the header: two `ShmBuf` of one
//!   process never alias, whatever a peer writes into shared memory.
//! - Every mapping is reference counted: a buffer held after its group
//!   closed, or after its owner died, stays mapped and valid until dropped
//!   (the memory lives while any process maps it). The pools are released
//!   with the communicator and the last buffer.
//! - A group whose ranks do not all share one pid namespace cannot map each
//!   other's blocks: [`ShmComm::shm_buffer`] fails with
//!   [`Error::Unsupported`] there.

use super::p2p::BUFFER;
use super::ShmComm;
use crate::error::{Context, Error, Result};
use crate::sys::shm::ShmSegment;
use crate::transport::OpCode;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Smallest block capacity: requests are rounded up to a power of two of
/// at least this many bytes.
pub const BUF_MIN: usize = 64 << 10;
/// Where the data start in a block (the header takes the first page).
const DATA_AT: usize = 4096;
const MAGIC: u64 = 0x7261_6e6b_7a63_6231; // "rankzcb1"
                                          // Header words.
const H_MAGIC: usize = 0;
const H_OWNER: usize = 8;
const H_SERIAL: usize = 16;
const H_STATE: usize = 24;
const FREE: u64 = 0;
const HELD: u64 = 1;
/// Bytes of a descriptor on the wire.
const DESC_BYTES: usize = 32;

/// One block of a pool, as mapped into this process.
#[derive(Debug)]
struct Block {
    seg: ShmSegment,
    owner: usize,
    serial: u64,
    /// Data bytes (the mapping's length less the header).
    cap: usize,
    /// The owner's descriptor number for the block.
    fd: i32,
    /// The communicator it belongs to (see [`Zc::id`]).
    comm: u64,
    /// Whether a [`ShmBuf`] of this process holds it now.
    here: AtomicBool,
}

impl Block {
    fn state(&self) -> &AtomicU64 {
        self.seg.atomic_u64(H_STATE)
    }
}

/// A buffer in shared memory that the ranks of a group hand to each other
/// without copying (see the [module docs](self)): get one from
/// [`crate::ProcessGroup::shm_buffer`], fill it, pass it on with
/// [`crate::ProcessGroup::send_shm`]; the receiver's
/// [`crate::ProcessGroup::recv_shm`] returns a view of the same bytes.
/// Dropping it, on whichever rank holds it then, returns it to its owner's
/// pool.
///
/// A pipeline stage writes its hidden state straight into one: allocate
/// `pg.shm_buffer(rows * cols * dtype.size())`, let the layer write its
/// output into `&mut buf[..]` (or cast it with `bytemuck::cast_slice_mut`
/// to the element type: the data start page aligned), and send it to the
/// next stage, which reads it in place and drops it (or reuses it for its
/// own output and sends that on).
#[derive(Debug)]
pub struct ShmBuf {
    block: Option<Arc<Block>>,
    len: usize,
}

impl ShmBuf {
    /// Bytes of the buffer.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes the buffer's block can hold (its size class).
    pub fn capacity(&self) -> usize {
        self.block.as_ref().map_or(0, |b| b.cap)
    }
    /// The group rank (in its communicator) whose pool the buffer comes from.
    pub fn owner(&self) -> usize {
        self.block.as_ref().map_or(0, |b| b.owner)
    }
    /// Changes the length within the capacity (the bytes are kept).
    pub fn set_len(&mut self, len: usize) -> Result<()> {
        if len > self.capacity() {
            return Err(Error::invalid(format!(
                "shared-memory buffer: length {len} exceeds its capacity of {} bytes",
                self.capacity()
            )));
        }
        self.len = len;
        Ok(())
    }
    /// Gives up the block without returning it to the pool (it was sent).
    fn sent(mut self) {
        if let Some(b) = self.block.take() {
            b.here.store(false, Ordering::Release);
        }
    }
}

impl std::ops::Deref for ShmBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.block {
            // SAFETY: the block is this buffer's alone (the ownership
            // protocol of the module docs), and `len <= cap` keeps the range
            // inside the mapping (checked again by `bytes`).
            Some(b) => unsafe { b.seg.bytes(DATA_AT, self.len) },
            None => &[],
        }
    }
}

impl std::ops::DerefMut for ShmBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &self.block {
            // SAFETY: the bytes are this buffer's alone while it lives (the
            // ownership protocol of the module docs), and `&mut self` makes
            // this the only view of them in this process; `bytes_mut` checks
            // the range against the mapping.
            Some(b) => unsafe { b.seg.bytes_mut(DATA_AT, self.len) },
            None => &mut [],
        }
    }
}

impl Drop for ShmBuf {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            b.here.store(false, Ordering::Release);
            // Release: our reads and writes of the data happen before the
            // owner's claim (Acquire) hands the block out again.
            b.state().store(FREE, Ordering::Release);
        }
    }
}

/// This rank's pool and the blocks of other ranks it has mapped.
#[derive(Debug, Default)]
pub(super) struct Zc {
    /// Unique per communicator in this process (buffers of another group
    /// are refused).
    id: u64,
    own: Vec<Arc<Block>>,
    mapped: HashMap<(usize, u64), Arc<Block>>,
    next_serial: u64,
}

impl Zc {
    pub(super) fn new() -> Zc {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Zc { id: NEXT.fetch_add(1, Ordering::Relaxed), ..Zc::default() }
    }
}

impl ShmComm {
    fn zc_ctx(&self, peer: Option<usize>) -> Context {
        let ctx = Context::new(OpCode::SendRecv.name(), self.group.clone(), self.name_of(self.rank));
        match peer {
            Some(p) => ctx.with_peer(self.name_of(p)),
            None => ctx,
        }
    }

    /// A buffer of `len` bytes from this rank's pool (reused when a block
    /// of its size class is free, else a new one); its contents are
    /// whatever the block last held. Fails with [`Error::Unsupported`] when
    /// some member runs in another pid namespace (it could not map it).
    pub fn shm_buffer(&mut self, len: usize) -> Result<ShmBuf> {
        self.check()?;
        if let Some(j) = (0..self.size).find(|&j| j != self.rank && self.same_namespace_pid(j).is_none()) {
            return Err(Error::Unsupported(format!(
                "group {}: zero-copy shared-memory buffers need every rank in one pid namespace, \
                 and rank {} runs in another",
                self.group,
                self.name_of(j)
            )));
        }
        let class = len.max(BUF_MIN).checked_next_power_of_two().ok_or_else(|| {
            Error::invalid(format!(
                "shm_buffer in group {} on rank {}: no size class holds {len} bytes",
                self.group,
                self.name_of(self.rank)
            ))
        })?;
        for b in self.zc.own.iter().filter(|b| b.cap == class) {
            if b.here.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_err() {
                continue;
            }
            // Acquire: pairs with the Release store of FREE by the last
            // holder (its accesses are over).
            if b.state().compare_exchange(FREE, HELD, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                return Ok(ShmBuf { block: Some(b.clone()), len });
            }
            b.here.store(false, Ordering::Release);
        }
        let serial = self.zc.next_serial;
        self.zc.next_serial += 1;
        let seg = ShmSegment::create_anonymous(&format!("{}-buf{serial}", self.group), DATA_AT + class)?;
        let fd = seg.raw_fd().unwrap_or(-1);
        seg.atomic_u64(H_OWNER).store(self.rank as u64, Ordering::Relaxed);
        seg.atomic_u64(H_SERIAL).store(serial, Ordering::Relaxed);
        seg.atomic_u64(H_STATE).store(HELD, Ordering::Relaxed);
        // Release: a peer that maps the block (after our message's Release)
        // sees the header whole.
        seg.atomic_u64(H_MAGIC).store(MAGIC, Ordering::Release);
        let block = Arc::new(Block {
            seg,
            owner: self.rank,
            serial,
            cap: class,
            fd,
            comm: self.zc.id,
            here: AtomicBool::new(true),
        });
        self.zc.own.push(block.clone());
        Ok(ShmBuf { block: Some(block), len })
    }

    /// Bytes of this rank's pool (all its blocks, held or free).
    pub fn shm_pool_bytes(&self) -> usize {
        self.zc.own.iter().map(|b| b.cap).sum()
    }

    /// Hands `buf` to rank `dst` without copying its bytes (see the module
    /// docs); returns once the descriptor is posted (at once unless the
    /// channel still holds an earlier message). On failure the buffer is
    /// dropped (back to its owner's pool).
    pub fn send_shm(&mut self, buf: ShmBuf, dst: usize, timeout: Duration) -> Result<()> {
        self.check()?;
        self.args(OpCode::SendRecv).peer(dst)?;
        let Some(b) = buf.block.as_ref() else {
            return Err(Error::invalid(format!(
                "send_shm in group {} on rank {} to rank {}: the buffer holds no block",
                self.group,
                self.name_of(self.rank),
                self.name_of(dst)
            )));
        };
        if b.comm != self.zc.id {
            return Err(Error::invalid(format!(
                "send_shm in group {} on rank {} to rank {}: the buffer belongs to another group's pool",
                self.group,
                self.name_of(self.rank),
                self.name_of(dst)
            )));
        }
        let words = [b.owner as u64, b.serial, b.fd as u64, buf.len as u64];
        let desc: &[u8] = bytemuck::cast_slice(&words);
        let res = self.send_inner(desc, dst, timeout, BUFFER);
        match res {
            Ok(()) => {
                buf.sent();
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Receives a buffer from rank `src` (sent with [`ShmComm::send_shm`]):
    /// a view of the bytes the sender held, after checking the descriptor
    /// (module docs). A plain message there is an [`Error::Mismatch`].
    pub fn recv_shm(&mut self, src: usize, timeout: Duration) -> Result<ShmBuf> {
        self.check()?;
        self.args(OpCode::SendRecv).peer(src)?;
        let res = self.recv_shm_inner(src, timeout);
        res.map_err(|e| self.fail(e))
    }

    fn recv_shm_inner(&mut self, src: usize, timeout: Duration) -> Result<ShmBuf> {
        let mut raw = [0u64; DESC_BYTES / 8];
        self.recv_kind(bytemuck::cast_slice_mut(&mut raw), src, timeout, BUFFER)?;
        let [owner, serial, fd, len] = raw;
        let ctx = self.zc_ctx(Some(src));
        let bad = |why: String| Error::protocol(ctx.clone(), why);
        let owner = usize::try_from(owner)
            .ok()
            .filter(|&o| o < self.size)
            .ok_or_else(|| bad(format!("rank {} sent a buffer of owner {owner}, not a member", self.name_of(src))))?;
        let block = if owner == self.rank {
            self.zc.own.iter().find(|b| b.serial == serial).cloned().ok_or_else(|| {
                bad(format!("rank {} sent back buffer {serial}, which this rank never made", self.name_of(src)))
            })?
        } else {
            match self.zc.mapped.get(&(owner, serial)) {
                Some(b) => b.clone(),
                None => {
                    let b = Arc::new(self.map_block(src, owner, serial, fd)?);
                    self.zc.mapped.insert((owner, serial), b.clone());
                    b
                }
            }
        };
        let len = usize::try_from(len).ok().filter(|&l| l <= block.cap).ok_or_else(|| {
            bad(format!("rank {} sent a buffer of {len} bytes in a block of {} bytes", self.name_of(src), block.cap))
        })?;
        if block.here.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return Err(bad(format!(
                "rank {} sent buffer {serial} of rank {}, which this rank holds already",
                self.name_of(src),
                self.name_of(owner)
            )));
        }
        Ok(ShmBuf { block: Some(block), len })
    }

    /// Maps block `serial` of rank `owner` (descriptor `fd` in its process)
    /// and checks its header.
    fn map_block(&self, src: usize, owner: usize, serial: u64, fd: u64) -> Result<Block> {
        let Some(pid) = self.same_namespace_pid(owner) else {
            return Err(Error::Unsupported(format!(
                "group {}: rank {} runs in another pid namespace; its shared-memory buffers cannot be mapped",
                self.group,
                self.name_of(owner)
            )));
        };
        let fd = i32::try_from(fd).map_err(|_| {
            Error::protocol(self.zc_ctx(Some(src)), format!("rank {} sent descriptor number {fd}", self.name_of(src)))
        })?;
        let seg = ShmSegment::open_fd_of(pid, fd, DATA_AT + BUF_MIN).map_err(|e| match e {
            _ if crate::sys::proc::process_gone(pid) => Error::PeerLost {
                ctx: self.zc_ctx(Some(owner)),
                detail: format!(
                    "the process of rank {} (owner of a buffer rank {} sent) is gone",
                    self.name_of(owner),
                    self.name_of(src)
                ),
            },
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
                Error::Unsupported(format!(
                    "group {}: the kernel does not let rank {} map rank {}'s shared-memory buffers ({source})",
                    self.group,
                    self.name_of(self.rank),
                    self.name_of(owner)
                ))
            }
            // Not open, not a shared-memory file, too small: a bad descriptor.
            other => Error::protocol(
                self.zc_ctx(Some(src)),
                format!(
                    "rank {} sent buffer {serial} of rank {} as descriptor {fd}, which this rank cannot map: {other}",
                    self.name_of(src),
                    self.name_of(owner)
                ),
            ),
        })?;
        // Acquire: pairs with the owner's Release store of the magic.
        let ok = seg.atomic_u64(H_MAGIC).load(Ordering::Acquire) == MAGIC
            && seg.atomic_u64(H_OWNER).load(Ordering::Relaxed) == owner as u64
            && seg.atomic_u64(H_SERIAL).load(Ordering::Relaxed) == serial;
        if !ok {
            return Err(Error::protocol(
                self.zc_ctx(Some(src)),
                format!(
                    "rank {} sent buffer {serial} of rank {}, but that descriptor holds no such block",
                    self.name_of(src),
                    self.name_of(owner)
                ),
            ));
        }
        let cap = seg.len() - DATA_AT;
        Ok(Block { seg, owner, serial, cap, fd, comm: self.zc.id, here: AtomicBool::new(false) })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ShmComm, ShmOptions};
    use super::{BUFFER, BUF_MIN};
    use crate::Error;
    use std::sync::mpsc;
    use std::time::Duration;

    const T: Duration = Duration::from_secs(20);

    fn pair() -> (ShmComm, ShmComm) {
        let opts = ShmOptions { timeout: T, ..ShmOptions::default() };
        let (tx, rx) = mpsc::channel::<String>();
        let o2 = opts.clone();
        let t = std::thread::spawn(move || {
            ShmComm::create_with(1, 2, "zc-unit", &o2, |_| rx.recv().map_err(|_| crate::Error::invalid("no name")))
        });
        let c0 = ShmComm::create_with(0, 2, "zc-unit", &opts, |n| {
            let n = n.unwrap_or_default().to_string();
            tx.send(n.clone()).map_err(|_| crate::Error::invalid("no peer"))?;
            Ok(n)
        })
        .unwrap();
        (c0, t.join().unwrap().unwrap())
    }

    /// Rank 1 posts a forged descriptor; rank 0's `recv_shm` must refuse it.
    fn forged(words: impl FnOnce(&mut ShmComm) -> [u64; 4]) -> Error {
        let (mut c0, mut c1) = pair();
        let w = words(&mut c1);
        c1.send_inner(bytemuck::cast_slice(&w), 0, T, BUFFER).unwrap();
        let e = c0.recv_shm(1, T).unwrap_err();
        // Poisoned afterwards, like every protocol error.
        assert!(matches!(c0.recv_shm(1, T).unwrap_err(), Error::Poisoned { .. }));
        drop(c1);
        e
    }

    #[test]
    fn forged_descriptors_are_refused_before_any_access() {
        // An owner that is not a member.
        let e = forged(|_| [7, 0, 3, 10]);
        assert!(matches!(e, Error::Protocol { .. }) && e.to_string().contains("not a member"), "{e}");
        // "Our own" block that we never made.
        let e = forged(|_| [0, 41, 3, 10]);
        assert!(matches!(e, Error::Protocol { .. }) && e.to_string().contains("never made"), "{e}");
        // A descriptor number of the sender that is not a block (stdin, a
        // closed or absurd number, a socket-free shared file that is not one
        // of its blocks).
        for fd in [0u64, 1 << 40, 999_999] {
            let e = forged(|_| [1, 0, fd, 10]);
            assert!(matches!(e, Error::Protocol { .. }), "fd {fd}: {e}");
        }
        let stray = crate::sys::shm::ShmSegment::create_anonymous("stray", 4096 + BUF_MIN).unwrap();
        let fd = stray.raw_fd().unwrap() as u64;
        let e = forged(|_| [1, 0, fd, 10]);
        assert!(matches!(e, Error::Protocol { .. }) && e.to_string().contains("no such block"), "{e}");
        // A real block, a length beyond its capacity.
        let e = forged(|c1| {
            let b = c1.shm_buffer(100).unwrap();
            let blk = b.block.as_ref().unwrap();
            let w = [1, blk.serial, blk.fd as u64, (BUF_MIN + 1) as u64];
            std::mem::forget(b);
            w
        });
        assert!(matches!(e, Error::Protocol { .. }) && e.to_string().contains("in a block of"), "{e}");
    }

    #[test]
    fn a_block_sent_twice_is_refused_while_held() {
        let (mut c0, mut c1) = pair();
        let b = c1.shm_buffer(1000).unwrap();
        let blk = b.block.as_ref().unwrap();
        let w = [1u64, blk.serial, blk.fd as u64, 1000];
        c1.send_shm(b, 0, T).unwrap();
        let held = c0.recv_shm(1, T).unwrap();
        c1.send_inner(bytemuck::cast_slice(&w), 0, T, BUFFER).unwrap();
        let e = c0.recv_shm(1, T).unwrap_err();
        assert!(matches!(e, Error::Protocol { .. }) && e.to_string().contains("holds already"), "{e}");
        assert_eq!(held.len(), 1000);
    }

    #[test]
    fn the_owner_never_hands_out_a_block_it_still_holds() {
        // A peer (here: a forged header store) marking a held block free
        // must not make two buffers of one process alias.
        let (mut c0, _c1) = pair();
        let a = c0.shm_buffer(10).unwrap();
        a.block.as_ref().unwrap().state().store(super::FREE, std::sync::atomic::Ordering::Release);
        let b = c0.shm_buffer(10).unwrap();
        assert_ne!(a.as_ptr(), b.as_ptr());
        assert_eq!(c0.shm_pool_bytes(), 2 * BUF_MIN);
        drop(a);
        let c = c0.shm_buffer(10).unwrap();
        assert_eq!(c0.shm_pool_bytes(), 2 * BUF_MIN, "the dropped block is reused");
        assert_ne!(b.as_ptr(), c.as_ptr());
    }
}
