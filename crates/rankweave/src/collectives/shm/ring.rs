//! The blob broadcast's ring: an encoded object goes from its root to the
//! other ranks through one of [`RING_ENTRIES`] entries at the end of the
//! segment, without a step.
//!
//! # Why not a step
//! A step is a barrier: every rank waits for every other. A broadcast needs
//! less: the readers wait for the root, and the root waits only to reuse an
//! entry. Through the ring the root encodes its next objects while the
//! readers still decode earlier ones, and a reader never waits for another
//! reader. With more ranks than cores that is what costs: on the 2-core
//! machine of `docs/PERFORMANCE.md` (run 20), 4 ranks took 5.2-7.0 us a
//! broadcast of a small object through steps and 0.27-0.42 us through the
//! ring. [`RING_ENTRIES`] is 4: with 2 the root of 4 ranks on 2 cores
//! caught up with its readers and the small broadcast took 4.5-28 us, 8
//! measured the same as 4.
//!
//! # Layout (after the point-to-point channels)
//! - a line with the count of ranks asleep in the ring and their bell;
//! - a line per rank: `DONE`, the ring broadcasts this rank has finished
//!   (as root once the object is published, as reader once it read it),
//!   `WAIT`, the number (counted from 1) of the broadcast it waits in, 0
//!   when it waits in none, and `CPU`, the CPU it last ran on (a hint);
//! - a header line per entry: `SEQ`, the number of the broadcast the entry
//!   holds (published last, Release), `CLAIM`, that number and its root
//!   (`number << 24 | root`), and the blob's length and mode;
//! - the entries' data, one slot's bytes each.
//!
//! # Protocol (broadcast `b`, counted from 0 on every rank alike)
//! - The root waits until every other rank's `DONE` is at least
//!   `b + 1 - RING_ENTRIES` (the entry's last readers are done), claims
//!   entry `b % RING_ENTRIES` by a compare-exchange of `CLAIM` (a second
//!   rank that thinks it is the root loses, and gets a mismatch), encodes
//!   the object into the entry, publishes `SEQ = b + 1` and returns.
//! - A reader waits until `SEQ` is `b + 1`, checks that the claim names its
//!   root, reads the blob in place (decoded straight out of the segment),
//!   then sets `DONE = b + 1`.
//! - A blob larger than an entry is *staged*: the entry carries only its
//!   length, and the bytes follow in units of one area through steps, as
//!   the other collectives move data.
//!
//! # Mismatches
//! Every step compares, besides the descriptors, the ring broadcasts each
//! rank has finished (the top half of the step's CPU word): a rank that
//! skipped a `broadcast_object` or made one more is a
//! [`Error::Mismatch`] at the next step. While a rank waits in a step it
//! checks every liveness interval that no late rank waits in the ring for a
//! broadcast it will not make and that no broadcast it did not take sits
//! in the ring; while a rank waits in the ring it checks that the ranks it
//! waits for are not in a step it has not entered. So a broadcast facing
//! another collective ends in a mismatch on the waiting side, not at the
//! deadline; the root, which does not wait, learns of it at its next
//! operation (through the group's abort word where the group has one).

use super::{ShmComm, BLOB_DIRECT, BLOB_FAILED, BLOB_STAGED, LINE, LIVENESS_EVERY};
use crate::backend::BlobRole;
use crate::error::{Error, Result};
use crate::sync::{current_cpu, Backoff};
use crate::sys::futex;
use crate::transport::OpCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Entries of the ring: how many broadcasts the root may run ahead of its
/// slowest reader.
pub const RING_ENTRIES: usize = 4;

/// Bits of `CLAIM` that hold the root.
const ROOT_BITS: u32 = 24;

// Words of the ring's first line.
const SLEEPERS: usize = 0;
const BELL: usize = 8;
// Words of a rank's line.
const DONE: usize = 0;
const WAIT: usize = 8;
const CPU: usize = 16;
// Words of an entry's header line.
const SEQ: usize = 0;
const CLAIM: usize = 8;
const LEN: usize = 16;
const MODE: usize = 24;

/// Bytes of the ring of a group of `size` ranks whose entries hold
/// `entry` bytes each.
pub(super) fn ring_bytes(size: usize, entry: usize) -> Option<usize> {
    let lines = 1usize.checked_add(size)?.checked_add(RING_ENTRIES)?;
    lines.checked_mul(LINE)?.checked_add(RING_ENTRIES.checked_mul(entry)?)
}

/// What a ring wait waits for (for errors).
#[derive(Clone, Copy)]
enum Awaiting {
    /// The root, to publish broadcast `b`.
    Published(u64),
    /// Readers, to finish broadcast `b`.
    Read(u64),
}

impl ShmComm {
    fn ring_line(&self, j: usize) -> usize {
        self.ring + (1 + j) * LINE
    }
    fn rank_word(&self, j: usize, w: usize) -> &AtomicU64 {
        self.seg.atomic_u64(self.ring_line(j) + w)
    }
    fn entry_header(&self, b: u64) -> usize {
        self.ring + (1 + self.size + (b % RING_ENTRIES as u64) as usize) * LINE
    }
    fn entry_word(&self, b: u64, w: usize) -> &AtomicU64 {
        self.seg.atomic_u64(self.entry_header(b) + w)
    }
    fn entry_data(&self, b: u64) -> usize {
        self.ring + (1 + self.size + RING_ENTRIES) * LINE + (b % RING_ENTRIES as u64) as usize * self.slot
    }

    /// Marks broadcast `b` finished on this rank and wakes sleepers.
    fn finish(&mut self, b: u64) {
        self.blobs = b + 1;
        // The CPU plus one: 0 is a rank that never said.
        self.rank_word(self.rank, CPU).store(u64::from(current_cpu()) + 1, Ordering::Relaxed);
        // Release: this rank is done with the entry (a reader) or has
        // published it (the root).
        self.rank_word(self.rank, DONE).store(b + 1, Ordering::Release);
        self.ring_wake();
    }

    /// Rings the ring's bell if anyone sleeps on it. The fence pairs with
    /// the sleeper's count and check in `ring_wait`: either it sees our
    /// change, or we see its count.
    fn ring_wake(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.seg.atomic_u64(self.ring + SLEEPERS).load(Ordering::Relaxed) != 0 {
            let bell = self.seg.atomic_u64(self.ring + BELL);
            bell.fetch_add(1, Ordering::SeqCst);
            futex::wake(bell);
        }
    }

    /// The first rank, other than `root`, still reading the broadcast
    /// before `need` (its `DONE` below `need`).
    fn unread(&self, root: usize, need: u64) -> Option<usize> {
        // Acquire: pairs with the Release store in `finish`.
        (0..self.size).find(|&j| j != root && self.rank_word(j, DONE).load(Ordering::Acquire) < need)
    }

    /// A mismatch for a rank waiting in the ring: `peer`, which it waits
    /// for, is in a step this rank has not entered (it called another
    /// collective), and the wait is still `pending` after seeing that.
    fn stepped_ahead(&self, op: OpCode, peer: usize, pending: &impl Fn(&ShmComm) -> Option<usize>) -> Option<Error> {
        let e = self.step + 1;
        let p = (e & 1) as usize;
        // Acquire: what the peer did before that step (its ring stores
        // included) is visible below.
        if self.line_step(peer, p).load(Ordering::Acquire) < e || pending(self).is_none() {
            return None;
        }
        let theirs = super::describe(self.line_desc(peer, p).load(Ordering::Relaxed));
        Some(Error::Mismatch {
            ctx: self.ctx(op).with_peer(peer),
            detail: format!("rank {peer} called {theirs}, this rank called a blob broadcast (broadcast_object)"),
        })
    }

    /// For a rank waiting in step `e` (line `p`) for the ranks `late`: a
    /// mismatch when one of them waits in the ring for a broadcast this rank
    /// will not make before the step, or when a broadcast this rank did not
    /// take sits in the ring and its root has not come to the step.
    pub(super) fn ring_strays(&self, op: OpCode, e: u64, late: &[usize]) -> Option<Error> {
        let p = (e & 1) as usize;
        let mine = self.blobs;
        // Each time the ring word is read first (Acquire, pairing with the
        // Release stores of WAIT and SEQ), then the step: a rank that
        // arrived at the step before it went on to a later broadcast is seen
        // to have arrived, and is no stray.
        for &j in late {
            let w = self.rank_word(j, WAIT).load(Ordering::Acquire);
            if w > mine && self.line_step(j, p).load(Ordering::Acquire) < e {
                return Some(Error::Mismatch {
                    ctx: self.ctx(op).with_peer(j),
                    detail: format!(
                        "rank {j} waits in blob broadcast (broadcast_object) number {w}, this rank called {} after \
                         {mine} blob broadcasts",
                        op.name()
                    ),
                });
            }
        }
        if self.entry_word(mine, SEQ).load(Ordering::Acquire) == mine + 1 {
            let root = (self.entry_word(mine, CLAIM).load(Ordering::Relaxed) & ((1 << ROOT_BITS) - 1)) as usize;
            if root < self.size && self.line_step(root, p).load(Ordering::Acquire) < e {
                return Some(Error::Mismatch {
                    ctx: self.ctx(op).with_peer(root),
                    detail: format!(
                        "rank {root} broadcast an object (blob broadcast number {}), this rank called {}",
                        mine + 1,
                        op.name()
                    ),
                });
            }
        }
        None
    }

    /// Waits until `pending` (the rank the wait is still for) returns
    /// `None`: spin, yield, sleep on the ring's bell; stops at the deadline,
    /// at an abort, when the rank it waits for closed the group, exited or
    /// is in a step this rank has not entered.
    fn ring_wait(
        &mut self,
        op: OpCode,
        b: u64,
        what: Awaiting,
        pending: impl Fn(&ShmComm) -> Option<usize>,
    ) -> Result<()> {
        if pending(self).is_none() {
            return Ok(());
        }
        self.rank_word(self.rank, WAIT).store(b + 1, Ordering::Release);
        match self.ring_wait_inner(op, what, &pending) {
            Ok(()) => {
                self.rank_word(self.rank, WAIT).store(0, Ordering::Relaxed);
                Ok(())
            }
            // The word stays: a peer waiting in a step for this rank, which
            // will not come, then sees where it stopped (a mismatch).
            Err(e) => Err(self.fail(e)),
        }
    }

    fn ring_wait_inner(&self, op: OpCode, what: Awaiting, pending: &impl Fn(&ShmComm) -> Option<usize>) -> Result<()> {
        let mut backoff = Backoff::new();
        let me = current_cpu();
        let mut hinted = usize::MAX;
        let mut start: Option<Instant> = None;
        let mut check_after = LIVENESS_EVERY;
        let (sleepers, bell) = (self.ring + SLEEPERS, self.ring + BELL);
        loop {
            let Some(j) = pending(self) else {
                return Ok(());
            };
            if hinted != j {
                hinted = j;
                // The peer last ran on our core: it cannot run while we spin.
                if me != u32::MAX && self.rank_word(j, CPU).load(Ordering::Relaxed) == u64::from(me) + 1 {
                    backoff.skip_spin();
                }
            }
            if !backoff.is_spinning() {
                let now = Instant::now();
                let waited = now - *start.get_or_insert(now);
                if let Some(err) = self.aborted(op) {
                    return Err(err);
                }
                if let Some(err) = self.stepped_ahead(op, j, pending) {
                    return Err(err);
                }
                let liveness = waited >= check_after;
                if liveness {
                    check_after = waited + LIVENESS_EVERY;
                }
                if let Some(err) = self.peer_gone(j, j, &what, liveness, || self.ctx(op).with_peer(j)) {
                    return Err(err);
                }
                if waited >= self.timeout {
                    return Err(Error::timeout(self.ctx(op).with_peer(j), waited, format!("rank {j} {what}")));
                }
            }
            let seg = &self.seg;
            backoff.snooze_with(|interval| {
                let (sleepers, bell) = (seg.atomic_u64(sleepers), seg.atomic_u64(bell));
                // The bell before the count: a waker that sees the count
                // rings after this read, and the futex wait returns at once.
                let rung = bell.load(Ordering::SeqCst) as u32;
                sleepers.fetch_add(1, Ordering::SeqCst);
                if pending(self).is_some() {
                    futex::wait(bell, rung, interval);
                }
                sleepers.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    /// Broadcast of a blob whose length only `root` knows (see [`super::ring`]
    /// and the module docs): the root passes [`BlobRole::Send`], every other
    /// rank [`BlobRole::Receive`]; `scratch` stages a blob larger than one
    /// entry. Every rank completes the collective even when its side fails
    /// (an encoding error on the root, a refused size or a decoding error
    /// elsewhere), so the group stays in step, and then returns the error.
    /// The root returns once its blob is in the segment (a staged one once
    /// every rank has it).
    pub fn broadcast_blob(&mut self, role: BlobRole<'_>, scratch: &mut Vec<u8>, root: usize) -> Result<()> {
        const OP: OpCode = OpCode::Object;
        self.check()?;
        self.args(OP).root(root)?;
        if matches!(role, BlobRole::Send(_)) != (self.rank == root) {
            return Err(Error::invalid(format!(
                "blob broadcast in group {}: rank {} must {} since the root is rank {root}",
                self.group,
                self.rank,
                if self.rank == root { "send" } else { "receive" }
            )));
        }
        if self.size == 1 {
            return Ok(());
        }
        let b = self.blobs;
        match role {
            BlobRole::Send(src) => self.send_blob(OP, src, scratch, b),
            BlobRole::Receive { limit, read } => self.receive_blob(OP, limit, read, scratch, root, b),
        }
    }

    fn send_blob(
        &mut self,
        op: OpCode,
        src: &mut dyn crate::backend::BlobSource,
        scratch: &mut Vec<u8>,
        b: u64,
    ) -> Result<()> {
        let me = self.rank;
        let need = (b + 1).saturating_sub(RING_ENTRIES as u64);
        self.ring_wait(op, b, Awaiting::Read(need), |c| c.unread(me, need))?;
        // Claim the entry: a second rank that takes itself for this
        // broadcast's root loses here instead of writing over ours.
        let claim = self.entry_word(b, CLAIM);
        let mine = ((b + 1) << ROOT_BITS) | me as u64;
        let mut seen = claim.load(Ordering::Acquire);
        loop {
            if seen >> ROOT_BITS > b {
                let other = (seen & ((1 << ROOT_BITS) - 1)) as usize;
                let err = Error::Mismatch {
                    ctx: self.ctx(op).with_peer(other),
                    detail: format!(
                        "rank {other} is the root of blob broadcast number {} too (this rank broadcasts as root {me})",
                        b + 1
                    ),
                };
                return Err(self.fail(err));
            }
            match claim.compare_exchange(seen, mine, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => seen = now,
            }
        }
        let cap = self.slot;
        // SAFETY: entry `b % RING_ENTRIES`, which this rank claimed above for
        // broadcast `b`: its last readers (broadcast b - RING_ENTRIES) are
        // done (their DONE, Acquire, in `unread`), and no reader looks at
        // it before the Release store of SEQ below.
        let area = unsafe { self.seg.bytes_mut(self.entry_data(b), cap) };
        let mut failure = None;
        let (len, mode) = match src.write_into(area) {
            Ok(Some(n)) if n <= cap => (n, BLOB_DIRECT),
            Ok(_) => {
                scratch.clear();
                match src.write_vec(scratch) {
                    // A source that said it does not fit may still make a
                    // blob that does.
                    Ok(()) if scratch.len() <= cap => {
                        area[..scratch.len()].copy_from_slice(scratch);
                        (scratch.len(), BLOB_DIRECT)
                    }
                    Ok(()) => (scratch.len(), BLOB_STAGED),
                    Err(e) => {
                        failure = Some(e);
                        (0, BLOB_FAILED)
                    }
                }
            }
            Err(e) => {
                failure = Some(e);
                (0, BLOB_FAILED)
            }
        };
        self.entry_word(b, LEN).store(len as u64, Ordering::Relaxed);
        self.entry_word(b, MODE).store(mode, Ordering::Relaxed);
        // Release: publishes the blob, its length and mode.
        self.entry_word(b, SEQ).store(b + 1, Ordering::Release);
        self.finish(b);
        if let Some(e) = failure {
            return Err(e);
        }
        if mode == BLOB_STAGED {
            let d = super::desc(op, None, None, Some(me), 0);
            let unit_cap = self.size * self.half;
            let mut off = 0;
            while off < len {
                let c = unit_cap.min(len - off);
                let u = self.next_unit();
                // SAFETY: unit `u`'s area, which only the root writes during
                // the unit (the others write nothing in a broadcast), and
                // which no rank reads before the step below publishes it:
                // its last readers (unit u - 2) finished before signalling
                // the step of unit u - 1, which this rank has passed.
                unsafe { self.seg.write(self.unit_area_at(u), &scratch[off..off + c]) };
                self.step(op, d, None)?;
                off += c;
            }
        }
        Ok(())
    }

    fn receive_blob(
        &mut self,
        op: OpCode,
        limit: usize,
        read: &mut dyn FnMut(&[u8]) -> Result<()>,
        scratch: &mut Vec<u8>,
        root: usize,
        b: u64,
    ) -> Result<()> {
        // Acquire: pairs with the root's Release store of SEQ.
        let unpublished = |c: &ShmComm| (c.entry_word(b, SEQ).load(Ordering::Acquire) <= b).then_some(root);
        self.ring_wait(op, b, Awaiting::Published(b), unpublished)?;
        let claim = self.entry_word(b, CLAIM).load(Ordering::Relaxed);
        let by = (claim & ((1 << ROOT_BITS) - 1)) as usize;
        if claim >> ROOT_BITS != b + 1 || by != root {
            let err = Error::Mismatch {
                ctx: self.ctx(op).with_peer(by),
                detail: format!(
                    "rank {by} broadcast blob number {} as its root, this rank expected rank {root}",
                    b + 1
                ),
            };
            return Err(self.fail(err));
        }
        let len = self.entry_word(b, LEN).load(Ordering::Relaxed);
        let mode = self.entry_word(b, MODE).load(Ordering::Relaxed);
        let ctx = |c: &ShmComm| c.ctx(op).with_peer(root);
        let refused = |c: &ShmComm, len: u64| crate::backend::blob_refused(ctx(c), root, len, limit);
        let cap = self.slot;
        match mode {
            BLOB_FAILED => {
                self.finish(b);
                Err(crate::backend::blob_not_made(ctx(self), root))
            }
            BLOB_DIRECT if len as usize <= cap => {
                let res = if len > limit as u64 {
                    Err(refused(self, len))
                } else {
                    // SAFETY: published by the root's Release store of SEQ
                    // (Acquire above), and not written again before this
                    // rank's DONE below says it is done with it.
                    read(unsafe { self.seg.bytes(self.entry_data(b), len as usize) })
                };
                self.finish(b);
                res
            }
            BLOB_STAGED if len as usize > cap => {
                self.finish(b);
                let d = super::desc(op, None, None, Some(root), 0);
                let unit_cap = self.size * self.half;
                let units = (len as usize).div_ceil(unit_cap);
                let mut refusal = (len > limit as u64).then(|| refused(self, len));
                if refusal.is_none() {
                    scratch.clear();
                    if scratch.try_reserve_exact(len as usize).is_err() {
                        refusal = Some(crate::backend::blob_no_memory(ctx(self), root, len));
                    }
                }
                for k in 0..units {
                    let unit = self.next_unit();
                    self.step(op, d, None)?;
                    if refusal.is_none() {
                        let c = unit_cap.min(len as usize - k * unit_cap);
                        // SAFETY: published by the root's step, and not
                        // written again before this rank's next step (see
                        // the module docs).
                        scratch.extend_from_slice(unsafe { self.seg.bytes(self.unit_area_at(unit), c) });
                    }
                }
                match refusal {
                    Some(e) => Err(e),
                    None => read(scratch),
                }
            }
            _ => {
                let e = Error::protocol(
                    ctx(self),
                    format!("blob broadcast header [{len}, {mode}] from rank {root} is not valid"),
                );
                Err(self.fail(e))
            }
        }
    }
}

impl std::fmt::Display for Awaiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Awaiting::Published(b) => write!(f, "to publish blob broadcast number {}", b + 1),
            Awaiting::Read(n) => write!(f, "to read blob broadcast number {n}"),
        }
    }
}
