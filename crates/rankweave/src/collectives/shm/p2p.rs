//! Point-to-point through the group's segment: one channel per ordered pair
//! of ranks, at the end of the segment.
//!
//! # A channel (sender `s`, receiver `r`)
//! - the sender's line: the number of the message posted last (`POST`),
//!   its descriptor and length, the address of the sender's buffer, the
//!   state word of a large message and the count of pipelined chunks posted;
//! - a line of the two sides' sleep flags, written only when a side goes
//!   to sleep (it also keeps their lines apart, so that neither side's
//!   writes invalidate the other's line);
//! - the receiver's line: the number of the message consumed last
//!   (`TAKEN`), the count of chunks consumed (`ACKED`), and for a split
//!   copy the address of the receiver's buffer and where it is divided;
//! - a data area, which holds either [`QUEUE`] slots of queued messages or
//!   one exclusive message (two halves for the pipelined path).
//!
//! # Queued and exclusive messages
//! A message of bytes that fits a slot ([`ShmComm::queued_max`]: an eighth
//! of the data area less a line, at most [`EAGER_MAX`]) is *queued*: message `k`
//! goes to slot `k % QUEUE`, a line of header (its number, descriptor,
//! length and kind, and up to [`P2P_INLINE`] bytes of payload) followed by
//! the rest of its payload. The sender writes it once `TAKEN >= k - QUEUE`
//! and every exclusive message before it was taken, and returns at once: a
//! sender runs up to [`QUEUE`] small messages ahead of its receiver (a
//! tensor dict's metadata and tensors, a pipeline stage's next hidden state
//! while the next stage still computes). Any other message is *exclusive*:
//! the sender writes it only once `TAKEN >= k - 1` (the channel is empty)
//! and describes it in its own line; no later message is written until it
//! was taken. The receiver of message `k` tells the two apart by the number
//! in slot `k % QUEUE`'s header, which only a queued message `k` writes.
//! Messages arrive in the order they were sent.
//!
//! # Sizes
//! - up to [`ShmComm::queued_max`] bytes: queued; `send` returns at once.
//! - up to the eager limit (the data area, at most [`EAGER_MAX`]): copied
//!   into the data area; `send` returns at once.
//! - Both copy payloads from
//!   [`super::ShmOptions::streaming_store_min`] bytes (8 KiB) with
//!   streaming stores, unless the receiver last ran on the sender's CPU:
//!   a plain store would first take each line back from the receiver's
//!   cache, which read the same slot a few messages before, and on the VM
//!   of `docs/PERFORMANCE.md` (run 21) that cost 16 KiB messages 2.4-3.1
//!   us against 2.0-2.6, and 9-10.6 us against 2.3-2.7 while its two vCPUs
//!   were far apart.
//! - larger: `send` posts the address of its buffer and waits until the
//!   receiver claims the message, for a *split* copy or for the pipeline
//!   (below). By default the receiver picks whichever of the two took less
//!   time per byte for the recent messages of that size from that sender,
//!   trying the other on three messages in every 32 (`collectives/shm/choice.rs`); with
//!   [`super::ShmOptions::adaptive_copy`] off it always splits. For a
//!   split copy it posts the address of its own buffer and reads one
//!   half straight from the sender's memory (`process_vm_readv`,
//!   cross-memory attach) while the sender writes the other half
//!   straight into the receiver's (`process_vm_writev`); `send` returns
//!   once the receiver has its half. One copy of each byte, half on each
//!   core: on the machine of `docs/PERFORMANCE.md` (run 12) 0.58-0.82 of
//!   the pipeline's time from 64 KiB to 64 MiB, but in run 20 twice the
//!   pipeline's between plain heap buffers (the kernel copies page by
//!   page). The lower-numbered rank of
//!   the pair copies the first half whichever way the message goes, so
//!   that a buffer sent back and forth keeps each half in the cache of
//!   the core that copies it (run 13: a ping-pong takes 0.38-0.48 of the
//!   time it took with the receiver always reading the first half, from
//!   64 KiB to 1 MiB).
//! - below [`super::ShmOptions::split_copy_min`] (by default no large
//!   message), or where the kernel refuses cross-memory attach either way
//!   (ptrace restrictions, another pid namespace, a seccomp filter, or
//!   [`super::ShmOptions::cross_memory_attach`] off), the *pipelined*
//!   path: the sender copies chunks (about [`PIPE_CHUNK`] bytes, between 2
//!   and [`MAX_PARTS`] of them in the data area) into the data area's
//!   parts in turn while the receiver copies the previous ones out, and
//!   `send` returns once the last chunk is in the segment. A sender whose
//!   write is refused hands its half back (the receiver reads it too) and
//!   the receiver does not ask it again; a receiver whose read is refused
//!   moves the message to the pipeline.
//! - from [`super::ShmOptions::single_copy_min`] bytes (off by default):
//!   one `process_vm_readv` of the whole message by the receiver, and
//!   `send` waits until that read is over.
//!
//! # The state word of a large message
//! `k << 4 | phase`, phases `OPEN` (posted), `READING` (the receiver is in
//! `process_vm_readv`), `SLOTS` (pipelined), `CANCELLED` (the sender gave
//! up), and for a split copy `SHARED` (claimed), `WRITING` (the sender
//! writes its half), `WRITTEN` or `DECLINED` (its half is in the
//! receiver's buffer, or left to the receiver) and `REVOKED` (the receiver
//! gave up). The receiver claims a message by a compare-exchange `OPEN ->
//! READING` (or `SHARED`) and the sender gives up by `OPEN -> CANCELLED`:
//! exactly one wins, so the receiver never reads a buffer its sender has
//! already returned (the sender that lost waits for the read to end, which
//! takes no longer than a copy, or for the receiver's process to vanish).
//! In the same way the sender writes into the receiver's buffer only after
//! `SHARED -> WRITING`, and a receiver that gives up first revokes by
//! `SHARED -> REVOKED` (or, having lost, waits for the write to end), so
//! that no write lands in a buffer its receiver has returned; a sender that
//! gives up declines its half by `SHARED -> DECLINED`.
//!
//! # Two senders facing each other
//! A large `send` blocks until its receiver takes the message. So that two
//! ranks that both send before they receive (or a ring of them) do not wait
//! for each other until the deadline, a `send` that has waited for
//! [`DRAIN_AFTER`] takes the messages other ranks have posted to this rank
//! into memory (allocated with `try_reserve`); a later `recv` from that
//! peer returns them first, in order. It takes only what it can copy
//! without the sender's help (inline, eager, and large messages of any
//! size by cross-memory attach): where cross-memory attach is refused, ranks that
//! all send messages above the eager limit to each other before receiving
//! wait for each other until the deadline, as `MPI_Send` may.
//!
//! Every wait ends at the call's deadline ([`Error::Timeout`]), at once when
//! the group was aborted or the peer closed it, and within 100 ms when the peer's
//! process exited ([`Error::PeerLost`]). A receive whose length differs
//! from the message's is an [`Error::Mismatch`] naming both descriptors.

use super::choice::Way;
use super::{describe, ShmComm, LINE, LIVENESS_EVERY};
use crate::error::{Context, Error, Result};
use crate::sync::{current_cpu, Backoff};
use crate::sys::futex;
use crate::transport::{OpCode, OpDesc};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Payload bytes a queued message carries in its slot's header line.
pub const P2P_INLINE: usize = LINE - SLOT_PAYLOAD_IN_HEADER;
/// Queued messages a channel holds at once.
pub const QUEUE: usize = 8;
/// Largest message copied through the data area without waiting for the
/// receiver (larger ones go by cross-memory attach or pipelined chunks).
pub const EAGER_MAX: usize = 32 << 10;
/// How long a blocked `send` waits before it takes in messages posted to
/// this rank (see the module docs).
pub const DRAIN_AFTER: Duration = Duration::from_millis(2);

/// Bytes of all channels' data areas together, before clamping per channel.
const BUDGET: usize = 8 << 20;
const AREA_MAX: usize = 1 << 20;
/// Target bytes of a pipelined chunk: a data area holds between 2 and
/// [`MAX_PARTS`] chunks of about this size.
pub const PIPE_CHUNK: usize = 64 << 10;
/// Most chunks of a pipelined message in a data area at once.
pub const MAX_PARTS: usize = 8;
const AREA_MIN: usize = 16 << 10;
/// Control bytes per channel: sender line, a spacer line, receiver line.
const CHAN_CTRL: usize = 3 * LINE;
// Words of a slot's header line; its payload starts at
// `SLOT_PAYLOAD_IN_HEADER` when it fits the header line, else at the next line.
const SEQ: usize = 0;
const SDESC: usize = 8;
const SLEN: usize = 16;
const SKIND: usize = 24;
const SLOT_PAYLOAD_IN_HEADER: usize = 32;

// Words of the sender's line.
const POST: usize = 0;
const DESC: usize = 8;
const LEN: usize = 16;
const ADDR: usize = 24;
const STATE: usize = 32;
const CHUNKS: usize = 40;
const SCPU: usize = 48;
/// What the message is: [`BYTES`] or [`BUFFER`] (a zero-copy buffer's
/// descriptor, see [`super::zc`]).
const KIND: usize = 56;
// Words of the receiver's line.
const TAKEN: usize = 0;
const ACKED: usize = 8;
const RCPU: usize = 16;
/// The receiver's buffer and where the split copy divides it (the sender
/// writes the half [`sender_copies_head`] gives it), set before the claim
/// `OPEN -> SHARED`.
const RADDR: usize = 24;
const RSPLIT: usize = 32;
// Words of the spacer line, each written only when its side goes to sleep
// (so that the other side's check of it on every message reads a line
// that stays in its cache): a flag set while the sender (`SPARK`) or the
// receiver (`RPARK`) sleeps, and the bell each sleeps on (`SBELL`,
// `RBELL`), which the other side rings after changing anything the
// sleeper waits for when it sees the flag. A sleeper therefore never
// misses a change of a word other than the one its futex watches (the
// sender that waits for `TAKEN` is also woken by the receiver's claim,
// which changes `STATE`).
const SPARK: usize = 0;
const RPARK: usize = 8;
const SBELL: usize = 16;
const RBELL: usize = 24;

/// Which half of a split copy the sender writes: the lower-numbered rank
/// of a pair always copies the first half of the messages between the
/// two, whichever way they go. A buffer passed back and forth (an echo, a
/// ping-pong, a stage that returns what it got) then has each half's lines
/// in the cache of the core that copies that half next: the one that
/// wrote them last time.
fn sender_copies_head(src: usize, dst: usize) -> bool {
    src < dst
}

// Phases of a large message (the low bits of STATE; see the module docs).
const OPEN: u64 = 0;
const READING: u64 = 1;
const SLOTS: u64 = 2;
const CANCELLED: u64 = 3;
const SHARED: u64 = 4;
const WRITING: u64 = 5;
const WRITTEN: u64 = 6;
const DECLINED: u64 = 7;
const REVOKED: u64 = 8;
const PHASE_BITS: u32 = 4;

/// A message of plain bytes.
pub(super) const BYTES: u64 = 0;
/// The descriptor of a zero-copy buffer.
pub(super) const BUFFER: u64 = 1;

fn state(k: u64, phase: u64) -> u64 {
    (k << PHASE_BITS) | phase
}

/// Whether a queued or eager payload of `len` bytes goes with streaming
/// stores: from `min` bytes, unless the receiver last ran on `cpu`, the
/// sender's CPU (`receiver_cpu`: its `RCPU` as the sender last read it,
/// with `TAKEN` from the same line); there the bytes it reads next are
/// best left in the cache both share.
fn streams(len: usize, min: usize, receiver_cpu: Option<u64>, cpu: u64) -> bool {
    len >= min && receiver_cpu != Some(cpu)
}

/// The phase of state word `st` when it is message `k`'s.
fn phase_of(st: u64, k: u64) -> Option<u64> {
    (st >> PHASE_BITS == k).then_some(st & ((1 << PHASE_BITS) - 1))
}

/// Bytes of one channel's data area in a group of `size` ranks (0 for one
/// rank): a fixed budget (8 MiB) shared among the `size * (size - 1)` channels,
/// between 16 KiB and 1 MiB each.
pub(super) fn area_bytes(size: usize) -> usize {
    if size < 2 {
        return 0;
    }
    let channels = size.saturating_mul(size - 1);
    (BUDGET / channels).clamp(AREA_MIN, AREA_MAX) / (2 * LINE) * (2 * LINE)
}

/// Bytes of every channel of a group of `size` ranks.
pub(super) fn channels_bytes(size: usize) -> Option<usize> {
    size.checked_mul(size.saturating_sub(1))?.checked_mul(CHAN_CTRL + area_bytes(size))
}

/// This rank's point-to-point state.
#[derive(Debug, Default)]
pub(super) struct P2p {
    /// Offset of the first channel.
    base: usize,
    /// Bytes of each channel's data area.
    area: usize,
    /// Bytes of each of a data area's [`QUEUE`] slots (whole lines).
    slot: usize,
    /// Parts of the data area a pipelined message cycles through, and the
    /// bytes of each (whole lines).
    parts: usize,
    chunk: usize,
    /// Smallest large message read by cross-memory attach.
    single_copy_min: usize,
    /// Smallest large message whose copy the two sides split.
    split_copy_min: usize,
    /// Smallest queued or eager payload written with streaming stores.
    streaming_min: usize,
    /// Whether this rank, receiving, may ask each sender to write its half.
    split: Vec<bool>,
    /// Number of the last exclusive message sent to each rank.
    last_exclusive: Vec<u64>,
    /// The receiver's `TAKEN` as this rank last read it, per rank: a
    /// queued send needs a fresh read only when its slot is not known free.
    taken_seen: Vec<u64>,
    /// The CPU this rank last wrote as its `SCPU` (as sender) and `RCPU`
    /// (as receiver) in each rank's channel: the hint is rewritten only
    /// when it changed, so that a message does not take the line from a
    /// peer that polls it just to store the same number.
    scpu_said: Vec<u64>,
    rcpu_said: Vec<u64>,
    /// Each receiver's `RCPU` as this rank last read it (with `TAKEN`).
    rcpu_seen: Vec<u64>,
    /// Messages sent to / received from each rank.
    sent: Vec<u64>,
    recvd: Vec<u64>,
    /// Pipelined chunks posted to / taken from each rank (never reset).
    chunks_out: Vec<u64>,
    chunks_in: Vec<u64>,
    /// Whether cross-memory attach may be tried with each rank.
    cma: Vec<bool>,
    /// Whether the receiver picks the split copy or the pipeline by the
    /// time recent messages took ([`super::choice`]), and its figures.
    adaptive: bool,
    chooser: super::choice::Chooser,
    /// Messages taken in while blocked in a send, per sender, in order,
    /// with their kind.
    pending: Vec<VecDeque<(u64, Vec<u8>)>>,
}

impl P2p {
    pub(super) fn new(
        base: usize,
        size: usize,
        cma: bool,
        single_copy_min: usize,
        split_copy_min: usize,
        adaptive: bool,
        streaming_min: usize,
    ) -> P2p {
        let area = area_bytes(size);
        let parts = (area / PIPE_CHUNK).clamp(2, MAX_PARTS);
        P2p {
            base,
            area,
            slot: area / QUEUE / LINE * LINE,
            parts,
            chunk: area / parts / LINE * LINE,
            single_copy_min,
            split_copy_min,
            streaming_min,
            split: vec![cma; size],
            last_exclusive: vec![0; size],
            taken_seen: vec![0; size],
            scpu_said: vec![u64::MAX; size],
            rcpu_said: vec![u64::MAX; size],
            rcpu_seen: vec![u64::MAX; size],
            sent: vec![0; size],
            recvd: vec![0; size],
            chunks_out: vec![0; size],
            chunks_in: vec![0; size],
            cma: vec![cma; size],
            adaptive,
            chooser: super::choice::Chooser::new(size),
            pending: (0..size).map(|_| VecDeque::new()).collect(),
        }
    }
}

/// A posted message, as its receiver finds it.
#[derive(Clone, Copy, Debug)]
struct Posted {
    /// In a slot (else exclusive, described in the sender's line).
    queued: bool,
    kind: u64,
    len: usize,
}

/// What a wait is for, for its timeout message.
#[derive(Clone, Copy)]
enum Awaiting {
    Taken(u64),
    Posted(u64),
    Chunk(u64),
    Ack(u64),
    /// The sender's half of a split copy of message `k`.
    Half(u64),
}

impl std::fmt::Display for Awaiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Awaiting::Taken(k) => write!(f, "to take message {k}"),
            Awaiting::Posted(k) => write!(f, "to send message {k}"),
            Awaiting::Chunk(g) => write!(f, "to post chunk {g}"),
            Awaiting::Ack(g) => write!(f, "to take chunk {g}"),
            Awaiting::Half(k) => write!(f, "to write its half of message {k}"),
        }
    }
}

impl ShmComm {
    /// Offset of the channel from `s` to `r`.
    fn chan(&self, s: usize, r: usize) -> usize {
        debug_assert!(s != r && s < self.size && r < self.size);
        let idx = s * (self.size - 1) + if r < s { r } else { r - 1 };
        self.p2p.base + idx * (CHAN_CTRL + self.p2p.area)
    }
    fn sword(&self, s: usize, r: usize, w: usize) -> &AtomicU64 {
        self.seg.atomic_u64(self.chan(s, r) + w)
    }
    fn rword(&self, s: usize, r: usize, w: usize) -> &AtomicU64 {
        self.seg.atomic_u64(self.chan(s, r) + 2 * LINE + w)
    }
    fn area_at(&self, s: usize, r: usize) -> usize {
        self.chan(s, r) + CHAN_CTRL
    }
    /// In the channel from `s` to `r`: the offsets of the bell a wait for
    /// `what` sleeps on and of the flag its waiter sets while it sleeps.
    /// The sender's (waiting for `TAKEN` or `ACKED`) and the receiver's
    /// (waiting for anything else) serve every wait of their side (each
    /// side waits for one thing at a time).
    fn park_at(&self, s: usize, r: usize, what: Awaiting) -> (usize, usize) {
        let c = self.chan(s, r) + LINE;
        match what {
            Awaiting::Taken(_) | Awaiting::Ack(_) => (c + SBELL, c + SPARK),
            Awaiting::Posted(_) | Awaiting::Chunk(_) | Awaiting::Half(_) => (c + RBELL, c + RPARK),
        }
    }
    /// Offset of the slot of queued message `k` from `s` to `r`.
    fn queue_slot_at(&self, s: usize, r: usize, k: u64) -> usize {
        self.area_at(s, r) + (k % QUEUE as u64) as usize * self.p2p.slot
    }
    /// Where a queued message of `len` bytes starts in its slot.
    fn slot_payload(len: usize) -> usize {
        if len <= P2P_INLINE {
            SLOT_PAYLOAD_IN_HEADER
        } else {
            LINE
        }
    }
    /// Largest queued message: a slot less its header line, at most
    /// [`EAGER_MAX`].
    pub fn queued_max(&self) -> usize {
        self.p2p.slot.saturating_sub(LINE).min(EAGER_MAX)
    }
    fn eager_max(&self) -> usize {
        self.p2p.area.min(EAGER_MAX)
    }

    /// Copies a queued or eager message's payload for `dst` into the
    /// segment at `off`, with streaming stores where [`streams`] says so;
    /// `cpu` is the CPU this rank runs on.
    ///
    /// # Safety
    /// As [`ShmSegment::write`](crate::sys::shm::ShmSegment::write).
    unsafe fn write_payload(&self, off: usize, data: &[u8], dst: usize, cpu: u64) {
        if streams(data.len(), self.p2p.streaming_min, self.p2p.rcpu_seen.get(dst).copied(), cpu) {
            // SAFETY: the caller's contract.
            unsafe { self.seg.write_streaming(off, data) }
        } else {
            // SAFETY: the caller's contract.
            unsafe { self.seg.write(off, data) }
        }
    }
    fn p2p_ctx(&self, peer: usize) -> Context {
        Context::new(OpCode::SendRecv.name(), self.group.clone(), self.name_of(self.rank)).with_peer(self.name_of(peer))
    }

    /// Waits until `ready` holds, for `peer` (whose CPU hint is `cpu`):
    /// spin, yield, sleep; stops at the deadline, at an abort of the group
    /// and when the peer's process is gone. With `drain`, takes in posted
    /// messages once it has waited [`DRAIN_AFTER`].
    fn p2p_wait(
        &mut self,
        peer: usize,
        cpu: u64,
        timeout: Duration,
        what: Awaiting,
        drain: bool,
        mut ready: impl FnMut(&ShmComm) -> bool,
    ) -> Result<()> {
        if ready(self) {
            return Ok(());
        }
        let mut backoff = Backoff::new();
        let me = current_cpu();
        if me != u32::MAX && cpu == me as u64 {
            backoff.skip_spin();
        }
        // The bell we sleep on, and our flag that says we sleep; the side
        // that changes what we wait for rings the bell when it sees the flag.
        let (bell, flag) = match what {
            Awaiting::Taken(_) | Awaiting::Ack(_) => self.park_at(self.rank, peer, what),
            Awaiting::Posted(_) | Awaiting::Chunk(_) | Awaiting::Half(_) => self.park_at(peer, self.rank, what),
        };
        let mut start: Option<Instant> = None;
        let mut check_after = LIVENESS_EVERY;
        let mut drained_at = Duration::ZERO;
        loop {
            {
                let seg = self.seg.clone();
                let (bell, flag) = (seg.atomic_u64(bell), seg.atomic_u64(flag));
                // Read before our flag is set: a waker rings only after it
                // saw the flag, so a ring after this read makes the futex
                // wait below return at once.
                let rung = bell.load(Ordering::SeqCst) as u32;
                if ready(self) {
                    return Ok(());
                }
                let me: &ShmComm = self;
                backoff.snooze_with(|interval| {
                    // Store, fence, then the check: pairs with the waker's
                    // change, fence and load of the flag (one of the two
                    // sides sees the other's store): either `ready` sees the
                    // change, or the waker sees the flag and rings.
                    flag.store(1, Ordering::SeqCst);
                    std::sync::atomic::fence(Ordering::SeqCst);
                    if !ready(me) {
                        futex::wait(bell, rung, interval);
                    }
                    flag.store(0, Ordering::Relaxed);
                });
            }
            if ready(self) {
                return Ok(());
            }
            if backoff.is_spinning() {
                continue;
            }
            let now = Instant::now();
            let waited = now - *start.get_or_insert(now);
            if let Some(e) = self.aborted(OpCode::SendRecv) {
                return Err(e);
            }
            if drain && waited >= DRAIN_AFTER && waited - drained_at >= DRAIN_AFTER {
                drained_at = waited;
                self.drain(timeout)?;
                if ready(self) {
                    return Ok(());
                }
            }
            let liveness = waited >= check_after;
            if liveness {
                check_after = waited + LIVENESS_EVERY;
            }
            if let Some(err) = self.peer_gone(peer, self.name_of(peer), &what, liveness, || self.p2p_ctx(peer)) {
                return Err(err);
            }
            if waited >= timeout {
                return Err(Error::timeout(self.p2p_ctx(peer), waited, format!("rank {} {what}", self.name_of(peer))));
            }
        }
    }

    /// Point-to-point messages this rank has sent to member `peer` through
    /// the segment (0 for itself or a rank out of range).
    pub fn messages_sent(&self, peer: usize) -> u64 {
        self.p2p.sent.get(peer).copied().unwrap_or(0)
    }

    /// Sends `data` to rank `dst` (see the module docs), waiting at most
    /// `timeout`.
    pub fn send(&mut self, data: &[u8], dst: usize, timeout: Duration) -> Result<()> {
        self.check()?;
        self.args(OpCode::SendRecv).peer(dst)?;
        let res = self.send_inner(data, dst, timeout, BYTES);
        res.map_err(|e| self.fail(e))
    }

    pub(super) fn send_inner(&mut self, data: &[u8], dst: usize, timeout: Duration, kind: u64) -> Result<()> {
        let me = self.rank;
        let k = self.p2p.sent[dst] + 1;
        let len = data.len();
        // A zero-copy buffer's descriptor stays exclusive: its sender must
        // not run ahead and drop its pool before the receiver mapped it.
        let queued = kind == BYTES && len <= self.queued_max();
        // A queued message needs its slot (message k - QUEUE taken) and no
        // exclusive message in the data area; an exclusive one an empty
        // channel.
        let need = if queued { k.saturating_sub(QUEUE as u64).max(self.p2p.last_exclusive[dst]) } else { k - 1 };
        if self.p2p.taken_seen[dst] < need {
            // Where the receiver last ran (a hint for the wait).
            let rcpu = self.rword(me, dst, RCPU).load(Ordering::Relaxed);
            self.p2p_wait(dst, rcpu, timeout, Awaiting::Taken(need), true, |c| {
                // Acquire: pairs with the receiver's Release store of TAKEN, after
                // which it no longer reads those messages' slots or the data area.
                c.rword(me, dst, TAKEN).load(Ordering::Acquire) >= need
            })?;
            // Acquire, as above.
            self.p2p.taken_seen[dst] = self.rword(me, dst, TAKEN).load(Ordering::Acquire);
            // The same line, just read: where the receiver last ran.
            self.p2p.rcpu_seen[dst] = self.rword(me, dst, RCPU).load(Ordering::Relaxed);
        }
        let d = OpDesc::new(OpCode::SendRecv, None, None, None, len).0;
        let cpu = u64::from(current_cpu());
        if self.p2p.scpu_said[dst] != cpu {
            self.p2p.scpu_said[dst] = cpu;
            self.sword(me, dst, SCPU).store(cpu, Ordering::Relaxed);
        }
        self.p2p.sent[dst] = k;
        if queued {
            let at = self.queue_slot_at(me, dst, k);
            // The payload first, then the header line's words one after
            // another: the receiver polls the header line, and every store
            // to it takes the line back from the receiver's cache.
            // SAFETY: slot k % QUEUE of our own channel: the receiver took
            // the message that used it before (the wait above) and reads it
            // again only once it sees the slot's number k or our POST of
            // message k (below); `len` fits the slot after its payload
            // offset (queued_max).
            unsafe { self.write_payload(at + Self::slot_payload(len), data, dst, cpu) };
            for (w, v) in [(SDESC, d), (SLEN, len as u64), (SKIND, kind)] {
                self.seg.atomic_u64(at + w).store(v, Ordering::Relaxed);
            }
            // Release: publishes the slot to a receiver that polls it (one
            // line, payload included, instead of POST's line and then it).
            self.seg.atomic_u64(at + SEQ).store(k, Ordering::Release);
            // Release: publishes the slot.
            self.post(dst, k);
            return Ok(());
        }
        self.p2p.last_exclusive[dst] = k;
        let eager = len <= self.eager_max();
        if eager {
            // The data before the words of our line, which the receiver
            // polls (as for a queued message's header line).
            // SAFETY: our own channel's data area, free since TAKEN >= k - 1.
            unsafe { self.write_payload(self.area_at(me, dst), data, dst, cpu) };
        }
        self.sword(me, dst, DESC).store(d, Ordering::Relaxed);
        self.sword(me, dst, LEN).store(len as u64, Ordering::Relaxed);
        self.sword(me, dst, KIND).store(kind, Ordering::Relaxed);
        if eager {
            self.post(dst, k);
            return Ok(());
        }
        self.sword(me, dst, ADDR).store(data.as_ptr() as u64, Ordering::Relaxed);
        self.sword(me, dst, STATE).store(state(k, OPEN), Ordering::Relaxed);
        self.post(dst, k);
        let rcpu = self.rword(me, dst, RCPU).load(Ordering::Relaxed);
        self.send_large(data, dst, k, timeout, rcpu).inspect_err(|_| self.withdraw(dst, k))
    }

    /// Waits until the receiver took large message `k`, streaming it when
    /// the receiver asks for the pipelined path.
    fn send_large(&mut self, data: &[u8], dst: usize, k: u64, timeout: Duration, rcpu: u64) -> Result<()> {
        let me = self.rank;
        loop {
            self.p2p_wait(dst, rcpu, timeout, Awaiting::Taken(k), true, |c| {
                c.rword(me, dst, TAKEN).load(Ordering::Acquire) >= k
                    || matches!(
                        phase_of(c.sword(me, dst, STATE).load(Ordering::Acquire), k),
                        Some(SLOTS | SHARED | REVOKED)
                    )
            })?;
            // Acquire: pairs with the receiver's Release of TAKEN (its read
            // of our buffer is over).
            if self.rword(me, dst, TAKEN).load(Ordering::Acquire) >= k {
                return Ok(());
            }
            // Acquire: pairs with the receiver's claim (its RADDR, RSPLIT).
            match phase_of(self.sword(me, dst, STATE).load(Ordering::Acquire), k) {
                Some(SLOTS) => return self.stream(data, dst, timeout, rcpu),
                Some(SHARED) => self.write_half(data, dst, k)?,
                Some(REVOKED) => {
                    return Err(Error::PeerLost {
                        ctx: self.p2p_ctx(dst),
                        detail: format!(
                            "rank {} gave up receiving message {k} (it failed or timed out)",
                            self.name_of(dst)
                        ),
                    })
                }
                // Our half is written or declined (or a claim was revoked
                // before we wrote): wait again.
                _ => {}
            }
        }
    }

    /// The sender's half of a split copy of message `k` (the receiver
    /// claimed it `SHARED`): writes its side of `RSPLIT` (see
    /// [`sender_copies_head`]) into the receiver's buffer, or declines, so
    /// that the receiver copies it itself.
    fn write_half(&mut self, data: &[u8], dst: usize, k: u64) -> Result<()> {
        let me = self.rank;
        let seg = self.seg.clone();
        let st = seg.atomic_u64(self.chan(me, dst) + STATE);
        // Acquire: the claim published RADDR and RSPLIT. A receiver that
        // gave up in between revoked the claim: then nothing is written.
        if st.compare_exchange(state(k, SHARED), state(k, WRITING), Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Ok(());
        }
        let addr = self.rword(me, dst, RADDR).load(Ordering::Relaxed) as usize;
        let split = usize::try_from(self.rword(me, dst, RSPLIT).load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        let (part, at) = match sender_copies_head(me, dst) {
            true => (data.get(..split), Some(addr)),
            false => (data.get(split..), addr.checked_add(split)),
        };
        let written = match (self.same_namespace_pid(dst), part, at) {
            (Some(pid), Some(part), Some(at)) => crate::sys::cma::write_to(pid, at, part),
            _ => Err(nix::errno::Errno::EINVAL),
        };
        let outcome = match written {
            Ok(()) => WRITTEN,
            Err(e) => {
                tracing::debug!(group = %self.group, rank = me, "writing into rank {dst} refused ({e}): it copies the rest");
                DECLINED
            }
        };
        // Release: our writes into the receiver's buffer are over.
        st.store(state(k, outcome), Ordering::Release);
        self.wake_parked(self.park_at(me, dst, Awaiting::Half(k)));
        match written {
            Err(nix::errno::Errno::ESRCH) => Err(Error::PeerLost {
                ctx: self.p2p_ctx(dst),
                detail: format!("the process of rank {} exited while receiving message {k}", self.name_of(dst)),
            }),
            _ => Ok(()),
        }
    }

    /// Streams `data` through the data area's parts (the pipelined path).
    fn stream(&mut self, data: &[u8], dst: usize, timeout: Duration, rcpu: u64) -> Result<()> {
        let me = self.rank;
        let (parts, size) = (self.p2p.parts, self.p2p.chunk);
        for chunk in data.chunks(size) {
            let g = self.p2p.chunks_out[dst] + 1;
            // Part g % parts held chunk g - parts: wait until it was taken.
            let need = g.saturating_sub(parts as u64);
            self.p2p_wait(dst, rcpu, timeout, Awaiting::Ack(need), false, |c| {
                // Acquire: the receiver finished copying chunk `need` out.
                c.rword(me, dst, ACKED).load(Ordering::Acquire) >= need
            })?;
            let at = self.area_at(me, dst) + (g % parts as u64) as usize * size;
            // SAFETY: our channel's part g % parts, which the receiver no
            // longer reads (it acknowledged chunk g - parts) and reads again
            // only after the Release store of CHUNKS below; a chunk is at
            // most `size` bytes and `parts * size` fits the data area.
            unsafe { self.seg.write(at, chunk) };
            self.p2p.chunks_out[dst] = g;
            self.sword(me, dst, CHUNKS).store(g, Ordering::Release);
            self.wake_parked(self.park_at(me, dst, Awaiting::Chunk(g)));
        }
        // Every byte is in the segment: the caller's buffer is free. The
        // next message waits until the receiver took this one.
        Ok(())
    }

    /// After a failed large send: makes sure the receiver is not and will
    /// not be reading our buffer before the caller gets it back.
    fn withdraw(&self, dst: usize, k: u64) {
        let me = self.rank;
        let st = self.sword(me, dst, STATE);
        // A split copy not written yet is handed back: the receiver copies
        // the rest itself (it reads our buffer in any case, below).
        // AcqRel: as the claim's other side.
        if st.compare_exchange(state(k, SHARED), state(k, DECLINED), Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.wake_parked(self.park_at(me, dst, Awaiting::Half(k)));
        }
        // The phases in which the receiver may be reading our buffer.
        let reading = |s: u64| matches!(phase_of(s, k), Some(READING | SHARED | WRITTEN | DECLINED));
        loop {
            // AcqRel: on success the receiver's later claim fails; on failure
            // we see its claim.
            match st.compare_exchange(state(k, OPEN), state(k, CANCELLED), Ordering::AcqRel, Ordering::Acquire) {
                Err(s) if reading(s) => {
                    // The read is one copy: wait for it to end (or for the
                    // receiver's process to vanish), whatever the deadline.
                    let mut backoff = Backoff::new();
                    let mut check_at = Instant::now() + LIVENESS_EVERY;
                    // Acquire: pairs with the receiver's Release stores.
                    while reading(st.load(Ordering::Acquire)) {
                        if self.rword(me, dst, TAKEN).load(Ordering::Acquire) >= k {
                            return;
                        }
                        if !backoff.is_spinning() && Instant::now() >= check_at {
                            if self.vanished(std::iter::once(dst)).is_some() {
                                return;
                            }
                            check_at = Instant::now() + LIVENESS_EVERY;
                        }
                        backoff.snooze();
                    }
                    if self.rword(me, dst, TAKEN).load(Ordering::Acquire) >= k {
                        return;
                    }
                    // Handed back (OPEN), switched to the pipeline or
                    // revoked: retry.
                }
                // Withdrawn, or the receiver no longer reads our buffer
                // (the pipeline, a revoked split).
                _ => return,
            }
        }
    }

    /// Receives exactly `buf.len()` bytes from rank `src`, waiting at most
    /// `timeout`.
    pub fn recv(&mut self, buf: &mut [u8], src: usize, timeout: Duration) -> Result<()> {
        self.check()?;
        self.args(OpCode::SendRecv).peer(src)?;
        let res = self.recv_inner(buf, src, timeout);
        res.map_err(|e| self.fail(e))
    }

    fn recv_inner(&mut self, buf: &mut [u8], src: usize, timeout: Duration) -> Result<()> {
        self.recv_kind(buf, src, timeout, BYTES)
    }

    /// Receives the next message from `src`, which must be of `kind` and
    /// exactly `buf.len()` bytes.
    pub(super) fn recv_kind(&mut self, buf: &mut [u8], src: usize, timeout: Duration, kind: u64) -> Result<()> {
        if let Some((theirs, msg)) = self.p2p.pending[src].pop_front() {
            if theirs != kind || msg.len() != buf.len() {
                return Err(self.mismatch(src, (theirs, msg.len()), (kind, buf.len())));
            }
            buf.copy_from_slice(&msg);
            return Ok(());
        }
        let posted = self.wait_posted(src, timeout)?;
        if posted.kind != kind || posted.len != buf.len() {
            return Err(self.mismatch(src, (posted.kind, posted.len), (kind, buf.len())));
        }
        self.take(buf, src, timeout, posted)
    }

    /// `theirs` and `mine` are (kind, length) of the message.
    fn mismatch(&self, src: usize, theirs: (u64, usize), mine: (u64, usize)) -> Error {
        let d = |(kind, len): (u64, usize)| {
            if kind == BUFFER {
                "a zero-copy shared-memory buffer".to_string()
            } else {
                describe(OpDesc::new(OpCode::SendRecv, None, None, None, len).0)
            }
        };
        Error::Mismatch {
            ctx: self.p2p_ctx(src),
            detail: format!(
                "rank {} expected {}, rank {} sent {}",
                self.name_of(self.rank),
                d(mine),
                self.name_of(src),
                d(theirs)
            ),
        }
    }

    /// Waits for the next message from `src` and says what it is.
    fn wait_posted(&mut self, src: usize, timeout: Duration) -> Result<Posted> {
        let me = self.rank;
        let k = self.p2p.recvd[src] + 1;
        let scpu = self.sword(src, me, SCPU).load(Ordering::Relaxed);
        let slot = self.queue_slot_at(src, me, k) + SEQ;
        self.p2p_wait(src, scpu, timeout, Awaiting::Posted(k), false, |c| {
            // Acquire: pairs with the sender's Release store of the slot's
            // number (a queued message) or of POST (any message).
            c.seg.atomic_u64(slot).load(Ordering::Acquire) == k || c.sword(src, me, POST).load(Ordering::Acquire) >= k
        })?;
        Ok(self.posted(src, k))
    }

    /// What message `k` of `src` is (after an Acquire of a POST of at least
    /// `k` or of its slot's number `k`). Its slot's number is `k` only when
    /// it is queued: an exclusive message `k` keeps later messages out of
    /// the channel until it was taken, so the slot still holds an older
    /// number.
    fn posted(&self, src: usize, k: u64) -> Posted {
        let me = self.rank;
        let at = self.queue_slot_at(src, me, k);
        let word = |w: usize| self.seg.atomic_u64(at + w).load(Ordering::Relaxed);
        let len = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        if word(SEQ) == k {
            Posted { queued: true, kind: word(SKIND), len: len(word(SLEN)) }
        } else {
            let kind = self.sword(src, me, KIND).load(Ordering::Relaxed);
            Posted { queued: false, kind, len: len(self.sword(src, me, LEN).load(Ordering::Relaxed)) }
        }
    }

    /// Takes the posted message from `src`, of exactly `buf.len()` bytes.
    fn take(&mut self, buf: &mut [u8], src: usize, timeout: Duration, posted: Posted) -> Result<()> {
        let me = self.rank;
        let k = self.p2p.recvd[src] + 1;
        let len = buf.len();
        let cpu = u64::from(current_cpu());
        if self.p2p.rcpu_said[src] != cpu {
            self.p2p.rcpu_said[src] = cpu;
            self.rword(src, me, RCPU).store(cpu, Ordering::Relaxed);
        }
        if posted.queued {
            if len > self.queued_max() {
                return Err(Error::Protocol {
                    ctx: self.p2p_ctx(src),
                    detail: format!("rank {} queued {len} bytes, more than a slot holds", self.name_of(src)),
                });
            }
            let at = self.queue_slot_at(src, me, k) + Self::slot_payload(len);
            // SAFETY: published by POST (Acquire in `wait_posted`/`drain`);
            // the sender writes this slot again only after our TAKEN store
            // of k; `len` fits the slot (checked above).
            unsafe { self.seg.read(at, buf) };
        } else if len <= self.eager_max() {
            // SAFETY: as above, for the data area.
            unsafe { self.seg.read(self.area_at(src, me), buf) };
        } else {
            self.recv_large(buf, src, k, timeout)?;
        }
        self.taken(src, k);
        Ok(())
    }

    /// Records message `k` of `src` as taken.
    fn taken(&mut self, src: usize, k: u64) {
        self.p2p.recvd[src] = k;
        // Release: we are done with the slot, the data area and the sender's
        // buffer.
        self.rword(src, self.rank, TAKEN).store(k, Ordering::Release);
        self.wake_parked(self.park_at(src, self.rank, Awaiting::Taken(k)));
    }

    /// Posts message `k` to `dst` (Release: publishes its slot or words)
    /// and wakes the receiver if it sleeps on it.
    fn post(&self, dst: usize, k: u64) {
        self.sword(self.rank, dst, POST).store(k, Ordering::Release);
        self.wake_parked(self.park_at(self.rank, dst, Awaiting::Posted(k)));
    }

    /// After a change of something the peer may wait for: rings the bell
    /// at `bell` and wakes the peer when its flag at `flag` says it sleeps.
    /// The fence pairs with the sleeper's SeqCst store of its flag and its
    /// check in `p2p_wait`: either it saw the change, or we see its flag.
    fn wake_parked(&self, (bell, flag): (usize, usize)) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.seg.atomic_u64(flag).load(Ordering::Relaxed) != 0 {
            let bell = self.seg.atomic_u64(bell);
            bell.fetch_add(1, Ordering::SeqCst);
            futex::wake(bell);
        }
    }

    /// Copies large message `k` of `src` straight from the sender's memory.
    /// `Ok(false)`: cross-memory attach is not available with `src` (then
    /// nothing was claimed) or was refused now (then the claim moves to
    /// `on_refusal`: `SLOTS` to continue by the pipeline, `OPEN` to hand
    /// the message back untouched).
    fn read_by_cma(&mut self, buf: &mut [u8], src: usize, k: u64, on_refusal: u64) -> Result<bool> {
        let me = self.rank;
        let pid = match self.same_namespace_pid(src) {
            Some(pid) if self.p2p.cma[src] => pid,
            _ => {
                self.p2p.cma[src] = false;
                return Ok(false);
            }
        };
        let seg = self.seg.clone();
        let st = seg.atomic_u64(self.chan(src, me) + STATE);
        // AcqRel: the claim pairs with the sender's withdrawal.
        if st.compare_exchange(state(k, OPEN), state(k, READING), Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Err(self.cancelled(src, k));
        }
        let addr = self.sword(src, me, ADDR).load(Ordering::Relaxed) as usize;
        if self.copy_from_sender(pid, addr, buf, src, k)? {
            return Ok(true);
        }
        self.set_phase(src, k, on_refusal);
        Ok(false)
    }

    /// Copies `out.len()` bytes at `addr` of the sender `src` (process
    /// `pid`) of message `k` into `out`. `Ok(false)`: the kernel refused,
    /// and cross-memory attach with `src` is not tried again.
    fn copy_from_sender(&mut self, pid: i32, addr: usize, out: &mut [u8], src: usize, k: u64) -> Result<bool> {
        match crate::sys::cma::read_from(pid, addr, out) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::ESRCH) => Err(Error::PeerLost {
                ctx: self.p2p_ctx(src),
                detail: format!("the process of rank {} exited while sending message {k}", self.name_of(src)),
            }),
            Err(e) => {
                tracing::debug!(group = %self.group, rank = self.rank, "cross-memory attach from rank {src} refused ({e}): pipelined copies");
                self.p2p.cma[src] = false;
                Ok(false)
            }
        }
    }

    /// Moves large message `k` of `src` to `phase` (Release: whatever this
    /// rank did with the sender's buffer before is over) and wakes the
    /// sender if it sleeps waiting for the message to be taken: every
    /// phase the receiver sets is news to the sender.
    fn set_phase(&self, src: usize, k: u64, phase: u64) {
        self.sword(src, self.rank, STATE).store(state(k, phase), Ordering::Release);
        self.wake_parked(self.park_at(src, self.rank, Awaiting::Taken(k)));
    }

    fn recv_large(&mut self, buf: &mut [u8], src: usize, k: u64, timeout: Duration) -> Result<()> {
        let me = self.rank;
        let scpu = self.sword(src, me, SCPU).load(Ordering::Relaxed);
        let len = buf.len();
        if len >= self.p2p.single_copy_min {
            if self.read_by_cma(buf, src, k, SLOTS)? {
                return Ok(());
            }
        } else if len >= self.p2p.split_copy_min && self.p2p.split[src] && self.p2p.cma[src] {
            if !self.p2p.adaptive {
                if self.recv_split(buf, src, k, timeout, scpu)? {
                    return Ok(());
                }
            } else {
                let way = self.p2p.chooser.choose(src, len);
                let start = Instant::now();
                let done = match way {
                    Way::Split => self.recv_split(buf, src, k, timeout, scpu)?,
                    Way::Pipeline => self.recv_pipelined(buf, src, k, timeout, scpu).map(|()| true)?,
                };
                // A refused split copy continues by the pipeline below and
                // is no figure for either way.
                if done {
                    let took = start.elapsed();
                    self.p2p.chooser.record(src, len, way, took);
                    tracing::trace!(group = %self.group, rank = me, "large message {k} of {len} B from rank {src}: {way:?} in {took:?}; figures {:?}", self.p2p.chooser.figures(src, len));
                    return Ok(());
                }
            }
        }
        self.recv_pipelined(buf, src, k, timeout, scpu)
    }

    /// Receives large message `k` through the data area's chunks: claims
    /// it for the pipeline unless a refused copy already did.
    fn recv_pipelined(&mut self, buf: &mut [u8], src: usize, k: u64, timeout: Duration, scpu: u64) -> Result<()> {
        let me = self.rank;
        let seg = self.seg.clone();
        let st = seg.atomic_u64(self.chan(src, me) + STATE);
        if st.load(Ordering::Acquire) != state(k, SLOTS) {
            if st.compare_exchange(state(k, OPEN), state(k, SLOTS), Ordering::AcqRel, Ordering::Acquire).is_err() {
                return Err(self.cancelled(src, k));
            }
            // The sender may sleep on TAKEN: the claim is news to it.
            self.wake_parked(self.park_at(src, me, Awaiting::Taken(k)));
        }
        self.recv_chunks(buf, src, timeout, scpu)
    }

    /// Receives message `k` by a split copy: this rank reads one half
    /// from the sender's memory while the sender writes the other into
    /// ours (which one: [`sender_copies_head`]). `Ok(false)`: cross-memory attach was refused before
    /// anything was claimed, or after the claim moved to `SLOTS` (then the
    /// pipeline delivers the whole message).
    fn recv_split(&mut self, buf: &mut [u8], src: usize, k: u64, timeout: Duration, scpu: u64) -> Result<bool> {
        let me = self.rank;
        let Some(pid) = self.same_namespace_pid(src) else {
            self.p2p.cma[src] = false;
            return Ok(false);
        };
        let seg = self.seg.clone();
        let st = seg.atomic_u64(self.chan(src, me) + STATE);
        // Halves divided at a page of our buffer, so that each side's copy
        // touches its own pages.
        let at = buf.as_ptr() as usize;
        let split = ((at + buf.len() / 2).next_multiple_of(4096) - at).min(buf.len());
        self.rword(src, me, RADDR).store(at as u64, Ordering::Relaxed);
        self.rword(src, me, RSPLIT).store(split as u64, Ordering::Relaxed);
        // AcqRel: publishes RADDR and RSPLIT; pairs with the sender's
        // withdrawal as in `read_by_cma`.
        if st.compare_exchange(state(k, OPEN), state(k, SHARED), Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Err(self.cancelled(src, k));
        }
        self.wake_parked(self.park_at(src, me, Awaiting::Taken(k)));
        let addr = self.sword(src, me, ADDR).load(Ordering::Relaxed) as usize;
        let (head, tail) = buf.split_at_mut(split);
        let (head_at, tail_at) = (addr, addr.saturating_add(split));
        let ((mine, mine_at), (theirs, theirs_at)) = if sender_copies_head(src, me) {
            ((tail, tail_at), (head, head_at))
        } else {
            ((head, head_at), (tail, tail_at))
        };
        let mine_copied = self.copy_from_sender(pid, mine_at, mine, src, k)?;
        // Refused, the whole message goes by the pipeline once the sender
        // no longer writes into our buffer.
        let whole = match self.settle_half(src, k, timeout, scpu)? {
            WRITTEN => mine_copied,
            // Declined: the sender cannot write here (or gave up); copy its
            // half too, and do not ask it again.
            _ => {
                self.p2p.split[src] = false;
                mine_copied && self.copy_from_sender(pid, theirs_at, theirs, src, k)?
            }
        };
        if !whole {
            self.set_phase(src, k, SLOTS);
        }
        Ok(whole)
    }

    /// Waits until the sender of split message `k` wrote or declined its
    /// half and returns which (`WRITTEN` or `DECLINED`). When the wait
    /// fails, the claim is revoked once the sender no longer writes into
    /// our buffer (whatever the deadline: the write is one copy), so that
    /// the caller gets its buffer back.
    fn settle_half(&mut self, src: usize, k: u64, timeout: Duration, scpu: u64) -> Result<u64> {
        let me = self.rank;
        let seg = self.seg.clone();
        let st = seg.atomic_u64(self.chan(src, me) + STATE);
        let settled = |s: u64| matches!(phase_of(s, k), Some(WRITTEN | DECLINED));
        let waited = self.p2p_wait(src, scpu, timeout, Awaiting::Half(k), false, |c| {
            // Acquire: pairs with the sender's Release store after its write.
            settled(c.sword(src, me, STATE).load(Ordering::Acquire))
        });
        if let Err(e) = waited {
            // Not written yet: revoke, and the sender will not write.
            if st.compare_exchange(state(k, SHARED), state(k, REVOKED), Ordering::AcqRel, Ordering::Acquire).is_err() {
                let mut backoff = Backoff::new();
                let mut check_at = Instant::now() + LIVENESS_EVERY;
                while st.load(Ordering::Acquire) == state(k, WRITING) {
                    if !backoff.is_spinning() && Instant::now() >= check_at {
                        if self.vanished(std::iter::once(src)).is_some() {
                            return Err(e);
                        }
                        check_at = Instant::now() + LIVENESS_EVERY;
                    }
                    backoff.snooze();
                }
            }
            self.set_phase(src, k, REVOKED);
            return Err(e);
        }
        Ok(st.load(Ordering::Acquire) & ((1 << PHASE_BITS) - 1))
    }

    /// Copies the chunks of a pipelined message out of the data area.
    fn recv_chunks(&mut self, buf: &mut [u8], src: usize, timeout: Duration, scpu: u64) -> Result<()> {
        let me = self.rank;
        let (parts, size) = (self.p2p.parts, self.p2p.chunk);
        for chunk in buf.chunks_mut(size) {
            let g = self.p2p.chunks_in[src] + 1;
            self.p2p_wait(src, scpu, timeout, Awaiting::Chunk(g), false, |c| {
                // Acquire: pairs with the sender's Release store of CHUNKS.
                c.sword(src, me, CHUNKS).load(Ordering::Acquire) >= g
            })?;
            let at = self.area_at(src, me) + (g % parts as u64) as usize * size;
            // SAFETY: chunk g was published (Acquire above); the sender
            // rewrites this part only after our ACKED store of g.
            unsafe { self.seg.read(at, chunk) };
            self.p2p.chunks_in[src] = g;
            self.rword(src, me, ACKED).store(g, Ordering::Release);
            self.wake_parked(self.park_at(src, me, Awaiting::Ack(g)));
        }
        Ok(())
    }

    fn cancelled(&self, src: usize, k: u64) -> Error {
        Error::PeerLost {
            ctx: self.p2p_ctx(src),
            detail: format!("rank {} gave up sending message {k} (it failed or timed out)", self.name_of(src)),
        }
    }

    /// Rank `j`'s pid when it runs in our pid namespace.
    pub(super) fn same_namespace_pid(&self, j: usize) -> Option<i32> {
        let ns = self.info(self.rank, 1).load(Ordering::Relaxed);
        let pid = self.info(j, 0).load(Ordering::Relaxed);
        (ns != 0 && self.info(j, 1).load(Ordering::Relaxed) == ns).then(|| i32::try_from(pid).ok()).flatten()
    }

    /// Takes every message posted to this rank into `pending` (called by a
    /// blocked send; see the module docs).
    fn drain(&mut self, timeout: Duration) -> Result<()> {
        let me = self.rank;
        for src in (0..self.size).filter(|&j| j != me) {
            loop {
                let k = self.p2p.recvd[src] + 1;
                // Acquire: pairs with the sender's Release store of POST.
                if self.sword(src, me, POST).load(Ordering::Acquire) < k {
                    break;
                }
                let posted = self.posted(src, k);
                let (len, kind) = (posted.len, posted.kind);
                let large = !posted.queued && len > self.eager_max();
                if large && !(self.p2p.cma[src] && self.same_namespace_pid(src).is_some()) {
                    // The pipelined path needs the sender to stream, and a
                    // sender blocked like us may be waiting in its own drain:
                    // leave it (see the module docs).
                    break;
                }
                let mut msg = Vec::new();
                msg.try_reserve_exact(len).map_err(|_| Error::Protocol {
                    ctx: self.p2p_ctx(src),
                    detail: format!(
                        "rank {} sent {len} bytes, more than this rank can hold in memory",
                        self.name_of(src)
                    ),
                })?;
                msg.resize(len, 0);
                if large {
                    // Only by cross-memory attach; refused, the message is
                    // handed back for the pipeline of a later recv.
                    if !self.read_by_cma(&mut msg, src, k, OPEN)? {
                        break;
                    }
                    self.taken(src, k);
                } else {
                    self.take(&mut msg, src, timeout, posted)?;
                }
                self.p2p.pending[src].push_back((kind, msg));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ShmComm, ShmOptions};
    use nix::errno::Errno;
    use std::sync::mpsc;
    use std::time::Duration;

    fn pair(opts: ShmOptions) -> (ShmComm, ShmComm) {
        let (tx, rx) = mpsc::channel::<String>();
        let o2 = opts.clone();
        let t = std::thread::spawn(move || {
            ShmComm::create_with(1, 2, "p2p-unit", &o2, |_| rx.recv().map_err(|_| crate::Error::invalid("no name")))
        });
        let c0 = ShmComm::create_with(0, 2, "p2p-unit", &opts, |n| {
            let n = n.unwrap_or_default().to_string();
            tx.send(n.clone()).map_err(|_| crate::Error::invalid("no peer"))?;
            Ok(n)
        })
        .unwrap();
        (c0, t.join().unwrap().unwrap())
    }

    fn data(len: usize, salt: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt ^ (i >> 9) as u8)).collect()
    }

    #[test]
    fn a_refused_cross_memory_attach_falls_back_to_the_pipeline_and_stays_there() {
        let opts = ShmOptions { timeout: Duration::from_secs(20), single_copy_min: 0, ..ShmOptions::default() };
        let (mut c0, mut c1) = pair(opts);
        let sizes = [1usize << 20, 300_001, 5 << 20];
        let t = std::thread::spawn(move || {
            for (i, &len) in sizes.iter().enumerate() {
                c0.send(&data(len, i as u8), 1, Duration::from_secs(20)).unwrap();
            }
            c0
        });
        crate::sys::cma::REFUSE.with(|r| r.set(Some(Errno::EPERM)));
        for (i, &len) in sizes.iter().enumerate() {
            let mut got = vec![0u8; len];
            c1.recv(&mut got, 0, Duration::from_secs(20)).unwrap();
            assert!(got == data(len, i as u8), "message {i} of {len} bytes");
            // After the first refusal the receiver does not try again.
            assert!(!c1.p2p.cma[0]);
        }
        let c0 = t.join().unwrap();
        assert!(c0.p2p.chunks_out[1] > 0 && c0.p2p.chunks_out[1] == c1.p2p.chunks_in[0]);
    }

    /// Sends `sizes` from rank 0 to rank 1 (with the hooks `refuse_write`
    /// on the sender's thread and `refuse_read` on the receiver's), checks
    /// every byte, and returns both ranks.
    fn transfer(
        opts: ShmOptions,
        sizes: &'static [usize],
        refuse_write: Option<Errno>,
        refuse_read: Option<Errno>,
    ) -> (ShmComm, ShmComm) {
        let (mut c0, mut c1) = pair(opts);
        let t = std::thread::spawn(move || {
            crate::sys::cma::REFUSE_WRITE.with(|r| r.set(refuse_write));
            for (i, &len) in sizes.iter().enumerate() {
                c0.send(&data(len, i as u8), 1, Duration::from_secs(20)).unwrap();
            }
            c0
        });
        crate::sys::cma::REFUSE.with(|r| r.set(refuse_read));
        for (i, &len) in sizes.iter().enumerate() {
            let mut got = vec![0u8; len];
            c1.recv(&mut got, 0, Duration::from_secs(20)).unwrap();
            assert!(got == data(len, i as u8), "message {i} of {len} bytes");
        }
        crate::sys::cma::REFUSE.with(|r| r.set(None));
        (t.join().unwrap(), c1)
    }

    const SPLIT_SIZES: &[usize] = &[super::EAGER_MAX + 1, 1 << 20, 5 << 20, 300_001];

    /// Queued and eager sizes around the line and streaming boundaries.
    const SMALL_SIZES: &[usize] = &[
        1,
        15,
        17,
        63,
        65,
        4095,
        8191,
        8192,
        8193,
        12_345,
        16 << 10,
        (32 << 10) - 33,
        super::EAGER_MAX - 1,
        super::EAGER_MAX,
        8192,
        100,
    ];

    #[test]
    fn streaming_stores_from_the_limit_unless_the_receiver_shares_the_cpu() {
        let min = super::super::DEFAULT_STREAMING_STORE_MIN;
        assert!(super::streams(min, min, Some(1), 0));
        assert!(super::streams(min, min, Some(u64::MAX), 0), "the receiver's CPU not read yet");
        assert!(!super::streams(min - 1, min, Some(1), 0), "below the limit");
        assert!(!super::streams(min, min, Some(3), 3), "the receiver last ran on our CPU");
        assert!(!super::streams(super::EAGER_MAX, usize::MAX, Some(1), 0), "turned off");
    }

    #[test]
    fn queued_and_eager_messages_keep_every_byte_with_streaming_stores_or_without() {
        for min in [0, super::super::DEFAULT_STREAMING_STORE_MIN, usize::MAX] {
            let opts =
                ShmOptions { timeout: Duration::from_secs(20), streaming_store_min: min, ..ShmOptions::default() };
            let (c0, c1) = transfer(opts, SMALL_SIZES, None, None);
            assert_eq!(c1.p2p.recvd[0], SMALL_SIZES.len() as u64, "streaming from {min} B");
            // None of them was large.
            assert_eq!((c0.p2p.chunks_out[1], c1.p2p.chunks_in[0]), (0, 0));
        }
    }

    #[test]
    fn large_messages_are_split_between_the_two_sides_when_the_choice_is_off() {
        let opts = ShmOptions { timeout: Duration::from_secs(20), adaptive_copy: false, ..ShmOptions::default() };
        let (c0, c1) = transfer(opts, SPLIT_SIZES, None, None);
        // Nothing went through the chunks, and both halves were copied
        // across (a refusal on either side would have cleared a flag).
        assert_eq!((c0.p2p.chunks_out[1], c1.p2p.chunks_in[0]), (0, 0));
        assert!(c1.p2p.split[0] && c1.p2p.cma[0]);
        assert_eq!(c1.p2p.recvd[0], SPLIT_SIZES.len() as u64);
    }

    const REPEATED: &[usize] = &[1 << 20; 2 * super::super::choice::EXPLORE_EVERY as usize];

    #[test]
    fn by_default_a_size_repeated_tries_both_ways_and_keeps_each_byte() {
        let (c0, c1) =
            transfer(ShmOptions { timeout: Duration::from_secs(20), ..ShmOptions::default() }, REPEATED, None, None);
        // The first two messages were split, the next two pipelined, and the
        // later ones took the cheaper way but for the exploring ones: both
        // ways carried messages, and every byte arrived (checked in
        // `transfer`).
        let chunked = c1.p2p.chunks_in[0] / (1u64 << 20).div_ceil(c0.p2p.chunk as u64);
        assert!(chunked >= 1 && chunked < REPEATED.len() as u64, "{chunked} of {} pipelined", REPEATED.len());
        assert!(c1.p2p.split[0] && c1.p2p.cma[0]);
        assert_eq!(c1.p2p.recvd[0], REPEATED.len() as u64);
    }

    #[test]
    fn a_sender_refused_writing_hands_its_half_back_and_is_not_asked_again() {
        let opts = ShmOptions { timeout: Duration::from_secs(20), adaptive_copy: false, ..ShmOptions::default() };
        let (c0, c1) = transfer(opts, SPLIT_SIZES, Some(Errno::EPERM), None);
        // The sender's half of the first message was read by the
        // receiver; the later ones took the pipeline.
        assert!(!c1.p2p.split[0] && c1.p2p.cma[0]);
        let chunks: u64 = SPLIT_SIZES[1..].iter().map(|&l| l.div_ceil(c0.p2p.chunk) as u64).sum();
        assert_eq!((c0.p2p.chunks_out[1], c1.p2p.chunks_in[0]), (chunks, chunks));
    }

    #[test]
    fn a_receiver_refused_reading_takes_the_whole_message_by_the_pipeline() {
        let opts = ShmOptions { timeout: Duration::from_secs(20), adaptive_copy: false, ..ShmOptions::default() };
        let (c0, c1) = transfer(opts, SPLIT_SIZES, None, Some(Errno::EPERM));
        assert!(!c1.p2p.cma[0]);
        let chunks: u64 = SPLIT_SIZES.iter().map(|&l| l.div_ceil(c0.p2p.chunk) as u64).sum();
        assert_eq!((c0.p2p.chunks_out[1], c1.p2p.chunks_in[0]), (chunks, chunks));
    }

    /// A receiver that times out on the sender's half of a split copy
    /// from rank `from` (0 or 1) to the other.
    fn receiver_gives_up_on_the_senders_half(from: usize) {
        use super::{Awaiting, ADDR, BYTES, DESC, KIND, LEN, OPEN, REVOKED, STATE};
        use crate::transport::{OpCode, OpDesc};
        use std::sync::atomic::Ordering;
        let (c0, c1) =
            pair(ShmOptions { timeout: Duration::from_secs(20), adaptive_copy: false, ..ShmOptions::default() });
        let (mut tx, mut rx) = if from == 0 { (c0, c1) } else { (c1, c0) };
        let to = 1 - from;
        // The sender posts a large message by hand and then does not
        // answer the receiver's claim, as a sender stuck elsewhere would.
        let msg = data(1 << 20, 7);
        let k = 1;
        let d = OpDesc::new(OpCode::SendRecv, None, None, None, msg.len()).0;
        for (w, v) in [(DESC, d), (LEN, msg.len() as u64), (KIND, BYTES), (ADDR, msg.as_ptr() as u64)] {
            tx.sword(from, to, w).store(v, Ordering::Relaxed);
        }
        tx.sword(from, to, STATE).store(super::state(k, OPEN), Ordering::Relaxed);
        tx.p2p.sent[to] = k;
        tx.p2p.last_exclusive[to] = k;
        tx.post(to, k);
        let mut got = vec![0u8; msg.len()];
        let e = rx.recv(&mut got, from, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, crate::Error::Timeout { .. }), "{e}");
        assert!(e.to_string().contains(&Awaiting::Half(k).to_string()), "{e}");
        assert_eq!(tx.sword(from, to, STATE).load(Ordering::Acquire), super::state(k, REVOKED));
        // The receiver read its half before it gave up (the second when
        // the sender is rank 0, the lower of the two, which copies the
        // first); the sender, late, writes nothing and learns that the
        // receiver gave up.
        let split = rx.rword(from, to, super::RSPLIT).load(Ordering::Relaxed) as usize;
        assert!(split > 0 && split < msg.len());
        let (read, left) = if from == 0 { (split..msg.len(), 0..split) } else { (0..split, split..msg.len()) };
        assert_eq!(super::sender_copies_head(from, to), from == 0);
        assert!(got[read.clone()] == msg[read] && got[left.clone()].iter().all(|&b| b == 0));
        tx.write_half(&msg, to, k).unwrap();
        assert_eq!(tx.sword(from, to, STATE).load(Ordering::Acquire), super::state(k, REVOKED));
        assert!(got[left].iter().all(|&b| b == 0));
        let e = tx.send_large(&msg, to, k, Duration::from_secs(5), 0).unwrap_err();
        assert!(e.to_string().contains("gave up receiving message 1"), "{e}");
    }

    #[test]
    fn a_receiver_that_gives_up_on_the_senders_half_revokes_it() {
        receiver_gives_up_on_the_senders_half(0);
    }

    #[test]
    fn the_higher_rank_sending_writes_the_second_half_and_a_revoke_stops_it_too() {
        receiver_gives_up_on_the_senders_half(1);
    }

    #[test]
    fn large_messages_take_the_pipeline_when_the_split_is_off() {
        let (mut c0, mut c1) =
            pair(ShmOptions { timeout: Duration::from_secs(20), split_copy_min: usize::MAX, ..ShmOptions::default() });
        let sizes = [super::EAGER_MAX + 1, 1 << 20, 5 << 20];
        let t = std::thread::spawn(move || {
            for (i, &len) in sizes.iter().enumerate() {
                c0.send(&data(len, i as u8), 1, Duration::from_secs(20)).unwrap();
            }
            c0
        });
        for (i, &len) in sizes.iter().enumerate() {
            let mut got = vec![0u8; len];
            c1.recv(&mut got, 0, Duration::from_secs(20)).unwrap();
            assert!(got == data(len, i as u8), "message {i} of {len} bytes");
        }
        let c0 = t.join().unwrap();
        // Every byte went through the chunks, and cross-memory attach was
        // not tried (a refusal would have cleared the flag).
        let chunks: u64 = sizes.iter().map(|&l| l.div_ceil(c0.p2p.chunk) as u64).sum();
        assert_eq!(c0.p2p.chunks_out[1], chunks);
        assert_eq!(c1.p2p.chunks_in[0], chunks);
        assert!(c1.p2p.cma[0]);
        assert!(c0.p2p.parts > 2 && c0.p2p.parts * c0.p2p.chunk <= c0.p2p.area);
    }

    #[test]
    fn a_drain_refused_cross_memory_attach_hands_the_message_back_to_the_pipeline() {
        // Both ranks send a large message first. Rank 1's cross-memory
        // attach is refused: when its blocked send drains, it must hand rank
        // 0's message back (rank 0 then streams it), while rank 0 takes rank
        // 1's by cross-memory attach. Which drain runs first varies; every
        // order must deliver both messages intact, whether receives read by
        // cross-memory attach (`single_copy_min` 0) or by the pipeline (the
        // default).
        for (round, single_copy_min) in (0..10u8).zip([0, usize::MAX].into_iter().cycle()) {
            let opts = ShmOptions {
                timeout: Duration::from_secs(20),
                single_copy_min,
                split_copy_min: usize::MAX,
                ..ShmOptions::default()
            };
            let (mut c0, mut c1) = pair(opts);
            let t = std::thread::spawn(move || {
                c0.send(&data(3 << 20, round), 1, Duration::from_secs(20)).unwrap();
                let mut got = vec![0u8; 2 << 20];
                c0.recv(&mut got, 1, Duration::from_secs(20)).unwrap();
                assert!(got == data(2 << 20, round + 100));
            });
            crate::sys::cma::REFUSE.with(|r| r.set(Some(Errno::EPERM)));
            c1.send(&data(2 << 20, round + 100), 0, Duration::from_secs(20)).unwrap();
            let mut got = vec![0u8; 3 << 20];
            c1.recv(&mut got, 0, Duration::from_secs(20)).unwrap();
            assert!(got == data(3 << 20, round), "round {round}");
            if single_copy_min == 0 {
                // Refused in the drain or in the receive: not tried again.
                assert!(!c1.p2p.cma[0]);
            }
            t.join().unwrap();
        }
    }

    #[test]
    fn channel_areas_fit_the_budget() {
        assert_eq!(super::area_bytes(1), 0);
        assert_eq!(super::area_bytes(2), super::AREA_MAX);
        for n in 2..=128 {
            let a = super::area_bytes(n);
            assert!((super::AREA_MIN..=super::AREA_MAX).contains(&a) && a % 128 == 0, "n={n}: {a}");
        }
    }

    #[test]
    fn a_rank_asleep_in_a_step_is_rung_awake_and_counted_out() {
        use std::sync::atomic::Ordering;
        let (c0, c1) = pair(ShmOptions { timeout: Duration::from_secs(20), ..ShmOptions::default() });
        let word = |c: &ShmComm, at: usize| c.seg.atomic_u64(at).load(Ordering::SeqCst);
        let (mut c0, mut c1) = (c0, Some(c1));
        for attempt in 0.. {
            let before = word(&c0, super::super::STEP_BELL_AT);
            let mut late = c1.take().unwrap();
            let t = std::thread::spawn(move || {
                // Long past the yield stage: rank 0 sleeps meanwhile.
                std::thread::sleep(Duration::from_millis(30));
                late.barrier().unwrap();
                late
            });
            c0.barrier().unwrap();
            c1 = Some(t.join().unwrap());
            assert_eq!(word(&c0, super::super::STEP_SLEEPERS_AT), 0, "a sleeper did not count itself out");
            // The late rank's step saw rank 0 asleep and rang (it can miss
            // only in the nanoseconds between a sleeper's look and its sleep).
            if word(&c0, super::super::STEP_BELL_AT) > before {
                break;
            }
            assert!(attempt < 5, "the late rank never rang the bell of the rank asleep in the step");
        }
    }
}
