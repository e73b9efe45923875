//! Collectives through one shared-memory segment, for groups whose ranks all
//! run on one node.
//!
//! # Terms
//! - **segment**: one POSIX shared-memory mapping per group
//!   ([`ShmSegment`]), created by rank 0 and opened by the others.
//! - **step**: one synchronization point. Each rank owns two control cache
//!   lines (one per step parity); at step `e` it writes its line `e % 2`
//!   (optional inline payload, an op descriptor, the CPU it runs on, then
//!   the step number with Release) and waits until every rank's line
//!   `e % 2` shows step `e` (Acquire). A step is therefore a barrier that can carry up to
//!   [`INLINE_BYTES`] bytes per rank in the same cache line as the flag.
//!   A rank waiting for a peer that last signalled from the waiter's own
//!   CPU skips spinning and yields at once: that peer cannot run meanwhile
//!   (ranks outnumbering cores). A rank that waits past the yield stage
//!   sleeps on a bell in the header, which every signalling rank rings
//!   while the header counts a sleeper.
//! - **slot**: each rank's data area of `slot_bytes`, split into two
//!   **halves**; consecutive transfer units alternate halves. The halves
//!   of one parity lie side by side in rank order, so a unit's halves
//!   form one contiguous **area** of `size` halves.
//! - **unit**: one use of the slot halves (write, step, read). A rank writes
//!   half `u % 2` again only at unit `u + 2`, after the step of unit `u + 1`,
//!   which every rank signals only once it has finished reading unit `u`.
//!   The same argument covers the inline payloads, one line per parity.
//!
//! # Algorithms (bytes copied per rank for `S` bytes, `n` ranks)
//! - all_reduce, at most [`INLINE_BYTES`]: inputs inline, one step, every
//!   rank reduces all `n` inputs itself in rank order.
//! - all_reduce, small (up to `ShmOptions::direct_all_reduce_bytes`): inputs
//!   into the slots, one step, every rank reduces all inputs (`n * S` read).
//! - all_reduce, large: per segment of one half: write the input but this
//!   rank's own `1/n` share (`S - S/n`), step A, reduce the own share: its
//!   own input, then every other slot in rank order (`S`), store it into its
//!   own slot (`S/n`), step B, copy the other shares out (`S - S/n`).
//!   Each element is computed by exactly one rank in a fixed order, so
//!   every rank ends with bitwise identical results.
//! - all_gather, broadcast: write, step, read; one step per segment.
//! - reduce_scatter: each rank writes the matching segment of every output
//!   block, step, reduces its own block's segments in rank order.
//! - reduce: the all_reduce algorithm (every rank gets the result; in
//!   shared memory that costs the root nothing extra).
//! - gather, scatter, all_to_all: write, step, read what is addressed to
//!   this rank (scatter and all_to_all carry `n` blocks per slot half).
//! - barrier: one step.
//! - blob broadcast (an encoded object, length known only to the root):
//!   no step; through a ring of entries of one slot each (see [`ring`]).
//!   The root encodes the object in place in the next entry and returns;
//!   the others decode it straight out of the segment, so its bytes are
//!   written once and read once, and the root runs up to
//!   [`RING_ENTRIES`] broadcasts ahead of its slowest reader. A larger
//!   blob follows in units of one area through steps.
//!
//! Every step carries a descriptor (operation, dtype, reduce op, length)
//! and the count of blob broadcasts the rank has made: ranks that call
//! different collectives get [`Error::Mismatch`] naming the peer instead of
//! corrupt data. A rank that does not arrive within the
//! timeout gets [`Error::Timeout`] naming every late rank. After either, the
//! communicator is poisoned (see [`Error::Poisoned`]).
//!
//! Each rank also records its pid: a waiting step checks every 100 ms that
//! the late ranks' processes still run and reports one that exited (gone,
//! or a zombie its parent has not reaped) as [`Error::PeerLost`] at once
//! instead of at the timeout.
//!
//! Point-to-point messages between the group's ranks use per-pair channels
//! at the end of the segment (see [`p2p`]); buffers that change hands
//! without a copy live in per-rank pools of their own (see [`zc`]).
//!
//! Rank 0 unlinks the segment's name as soon as every rank has attached, so
//! nothing stays in `/dev/shm` even when ranks are killed later.

use crate::dtype::DType;
use crate::error::{Context, Error, Result};
use crate::reduce::{finish_avg, reduce_into, ReduceOp};
use crate::store::Store;
use crate::sync::{current_cpu, Backoff};
use crate::sys::futex;
use crate::sys::shm::ShmSegment;
use crate::transport::{OpCode, OpDesc};
use crate::validate::Check;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod choice;
pub mod p2p;
pub mod ring;
pub mod zc;
use p2p::P2p;
pub use ring::RING_ENTRIES;
pub use zc::ShmBuf;

/// Inline payload bytes per control line (a 64-byte line minus the step,
/// the descriptor and the CPU hint).
pub const INLINE_BYTES: usize = 40;
/// Offset of the inline payload in a control line.
const INLINE_AT: usize = 24;

const LINE: usize = 64;
/// Control bytes per rank: two step lines and one line about the process.
const CTRL: usize = 3 * LINE;
/// How often a waiting step checks that late ranks' processes still exist.
const LIVENESS_EVERY: Duration = Duration::from_millis(100);
const HEADER: usize = 64;
const MAGIC: u64 = 0x7261_6e6b_7368_6d31; // "rankshm1"
const VERSION: u64 = 12;
/// Offset of the abort word in the header (see [`ShmAbort`]).
const ABORT_AT: usize = 32;
/// Offsets in the header of the number of ranks asleep in a step and of
/// the bell they sleep on: a rank that signals a step rings the bell when
/// the count is not zero, so that a sleeping waiter wakes when the rank it
/// waits for arrives instead of at the end of its sleep interval (up to 1
/// ms, 5 ms once idle). Best effort (see `step`); the interval bounds a
/// missed ring.
const STEP_SLEEPERS_AT: usize = 40;
const STEP_BELL_AT: usize = 48;
/// Modes of a blob broadcast's header (see `ShmComm::broadcast_blob`): the
/// blob is in the area, it follows in units, or the root failed to encode it.
const BLOB_DIRECT: u64 = 1;
const BLOB_STAGED: u64 = 2;
const BLOB_FAILED: u64 = 3;
/// Interval of the warning that names the ranks a step waits for.
const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Default bytes per rank slot (two halves of 1 MiB).
pub const DEFAULT_SLOT_BYTES: usize = 2 << 20;
/// Default largest all_reduce that takes the one-step direct path (2 ranks
/// measured about even at 8 KiB, the two-step path ahead from 16-32 KiB).
pub const DEFAULT_DIRECT_ALL_REDUCE_BYTES: usize = 8 << 10;

/// Default [`ShmOptions::split_copy_min`]: every large message (above the
/// eager limit, [`p2p::EAGER_MAX`]) is split.
pub const DEFAULT_SPLIT_COPY_MIN: usize = 0;
/// Default of [`ShmOptions::streaming_store_min`]: 8 KiB.
///
/// On the 2-vCPU machine of `docs/PERFORMANCE.md` (run 21, AMD EPYC),
/// sendrecv ping-pongs at N = 2 and 4, plain / streaming stores, where a
/// line the other vCPU wrote costs little: 8 KiB 1.4-1.9 / 1.4-1.9 us,
/// 16 KiB 2.4-3.1 / 2.0-2.6, 32 KiB 4.7-5.7 / 3.0-4.9; in the host's state
/// where such a line costs several times more (the two vCPUs far apart):
/// 5.0-5.3 / 1.5-1.9, 9.0-10.6 / 2.3-2.7 and 16.5-18.0 / 3.8-3.9 us. At
/// 4 KiB streaming stores took 0.8-1.1 us against 0.6-0.8 in the first
/// state, hence the limit.
pub const DEFAULT_STREAMING_STORE_MIN: usize = 8 << 10;

/// Settings of a [`ShmComm`]. Every rank must use the same `slot_bytes`.
#[derive(Debug, Clone)]
pub struct ShmOptions {
    /// Bytes of each rank's data slot (rounded up to 128); a large buffer is
    /// processed in segments of half of it.
    pub slot_bytes: usize,
    /// Deadline of every step (a peer later than this is reported).
    pub timeout: Duration,
    /// all_reduce up to this many bytes uses the one-step direct algorithm.
    pub direct_all_reduce_bytes: usize,
    /// Whether point-to-point may copy a large message straight between
    /// the two processes' memories (`process_vm_readv`/`process_vm_writev`)
    /// where the kernel allows it: the split copy, the whole-message read
    /// from [`ShmOptions::single_copy_min`] bytes, and always when a rank
    /// blocked in a send takes in the messages posted to it. Off, large
    /// messages always take the pipelined path through the segment.
    ///
    /// Where Yama's `ptrace_scope` is 1 (Ubuntu's default) a process may
    /// attach only to its descendants, and ranks are siblings. So that
    /// they can reach each other, a communicator created with this on
    /// declares, once per process, that any process of the same user may
    /// attach to it (`prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY)`, as Open
    /// MPI's shared-memory transport does). Turn it off to keep Yama's
    /// restriction for the process (and the pipeline for every large
    /// message); with `ptrace_scope` 2 or 3 the kernel refuses cross-memory
    /// attach whatever this says, and the pipeline takes over.
    pub cross_memory_attach: bool,
    /// Smallest large point-to-point message the receiver copies whole
    /// straight from the sender's memory (one `process_vm_readv` on one
    /// core); smaller ones take the split copy or the pipelined path. The
    /// default, `usize::MAX`, never does: on the 2-core machine of
    /// `docs/PERFORMANCE.md` (run 11) the pipeline took 0.44-0.88 of the
    /// time of one `process_vm_readv` from 64 KiB to 64 MiB.
    pub single_copy_min: usize,
    /// Smallest large point-to-point message (below `single_copy_min`)
    /// whose copy the two sides split where cross-memory attach is
    /// allowed: the receiver reads one half straight from the sender's
    /// memory (`process_vm_readv`) while the sender writes the other half
    /// straight into the receiver's (`process_vm_writev`), one copy of
    /// each byte, on two cores at once (the lower rank of the pair always
    /// copies the first half, so a buffer passed back and forth stays in
    /// the caches that copy it). Smaller messages take the
    /// pipelined path. `usize::MAX` turns the split off.
    pub split_copy_min: usize,
    /// Whether the receiver of a large message that may be split chooses
    /// between the split copy and the pipeline by the time the recent
    /// messages of that size from that sender took (the default; see
    /// [`p2p`]). Off, every such message is split. On the machine of
    /// `docs/PERFORMANCE.md` (run 20) the pipeline took half the split
    /// copy's time between plain heap buffers and twice it between
    /// huge-page buffers, and which way is faster changes with the host's
    /// state.
    pub adaptive_copy: bool,
    /// Smallest point-to-point payload that the sender copies into the
    /// segment (a queued or eager message, up to 32 KiB) with streaming
    /// stores, which write whole lines towards memory instead of taking
    /// them into the sender's cache from the receiver's, where the
    /// receiver read the same slot the last time round. `usize::MAX`
    /// turns them off. The default is
    /// [`DEFAULT_STREAMING_STORE_MIN`].
    pub streaming_store_min: usize,
}

impl Default for ShmOptions {
    fn default() -> Self {
        ShmOptions {
            slot_bytes: DEFAULT_SLOT_BYTES,
            timeout: crate::store::default_timeout(),
            direct_all_reduce_bytes: DEFAULT_DIRECT_ALL_REDUCE_BYTES,
            cross_memory_attach: true,
            single_copy_min: usize::MAX,
            split_copy_min: DEFAULT_SPLIT_COPY_MIN,
            adaptive_copy: true,
            streaming_store_min: DEFAULT_STREAMING_STORE_MIN,
        }
    }
}

impl ShmOptions {
    fn slot(&self) -> usize {
        // Saturates; segment_bytes then reports the overflow.
        self.slot_bytes.max(2 * LINE).checked_next_multiple_of(2 * LINE).unwrap_or(usize::MAX)
    }
}

/// Bytes of the segment for `size` ranks with `slot_bytes` per slot (the
/// collectives' slots, the point-to-point channels and the blob
/// broadcast's ring of [`RING_ENTRIES`] slots).
/// `None` when it does not fit in the address space.
pub fn segment_bytes(size: usize, slot_bytes: usize) -> Option<usize> {
    let slot = slot_bytes.max(2 * LINE).checked_next_multiple_of(2 * LINE)?;
    size.checked_mul(CTRL + slot)?
        .checked_add(HEADER)?
        .checked_add(p2p::channels_bytes(size)?)?
        .checked_add(ring::ring_bytes(size, slot)?)
}

/// Aborts a shared-memory group from any thread: the first failure is
/// written to the segment's abort word, and every rank waiting in a step
/// stops with an error naming the culprit at once instead of at its
/// deadline.
#[derive(Debug, Clone)]
pub struct ShmAbort {
    seg: Arc<ShmSegment>,
    rank: usize,
}

impl ShmAbort {
    /// Records `err` (when it poisons the group) as this group's failure;
    /// the first recorded failure wins.
    pub fn abort(&self, err: &Error) {
        if !err.poisons_group() {
            return;
        }
        let kind: u64 = match err {
            Error::PeerLost { .. } => 0,
            Error::Timeout { .. } => 1,
            Error::Mismatch { .. } => 2,
            _ => 3,
        };
        let culprit = err.peer().unwrap_or(self.rank) as u64 & 0x0fff_ffff;
        let word = (1 << 63) | (kind << 56) | ((self.rank as u64 & 0x0fff_ffff) << 28) | culprit;
        // Release: pairs with the Acquire load of waiting ranks.
        let _ = self.seg.atomic_u64(ABORT_AT).compare_exchange(0, word, Ordering::Release, Ordering::Relaxed);
    }

    /// Marks this rank as gone from the group (it closed it): peers waiting
    /// for its point-to-point messages stop with [`Error::PeerLost`].
    pub fn close(&self) {
        // Release: pairs with the Acquire load in the peers' waits.
        self.seg.atomic_u64(HEADER + self.rank * CTRL + 2 * LINE + CLOSED_WORD * 8).store(1, Ordering::Release);
    }
}

/// Word of a rank's process line that says it closed the group.
const CLOSED_WORD: usize = 2;

/// Something else this rank should keep an eye on while it waits in the
/// segment (for a hierarchical group, the TCP mesh to the other nodes):
/// called every liveness interval of a wait; an error ends the wait.
pub type Watch = Box<dyn Fn() -> Option<Error> + Send + Sync>;

/// One rank's handle on a group's shared-memory collectives.
#[derive(Debug)]
pub struct ShmComm {
    seg: Arc<ShmSegment>,
    rank: usize,
    size: usize,
    group: String,
    slot: usize,
    half: usize,
    direct_max: usize,
    timeout: Duration,
    step: u64,
    unit: u64,
    /// Blob broadcasts this rank has finished (see [`ring`]).
    blobs: u64,
    /// Offset of the blob broadcast's ring.
    ring: usize,
    poisoned: Option<String>,
    p2p: P2p,
    watch: Watcher,
    /// The rank each member has in the enclosing group, for errors (empty:
    /// the communicator's own ranks).
    names: Vec<usize>,
    /// Zero-copy buffers: this rank's pool and the blocks it mapped.
    zc: zc::Zc,
}

/// The optional [`Watch`] (a named type so that `ShmComm` stays `Debug`).
#[derive(Default)]
struct Watcher(Option<Watch>);

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(watch)" } else { "None" })
    }
}

/// A step's descriptor: what the rank is doing, compared across ranks (the
/// crate's one descriptor format, [`OpDesc`]).
fn desc(op: OpCode, dtype: Option<DType>, rop: Option<ReduceOp>, root: Option<usize>, len: usize) -> u64 {
    OpDesc::new(op, dtype, rop, root, len).0
}

fn describe(desc: u64) -> String {
    OpDesc(desc).to_string()
}

/// A step's CPU word: the CPU in the low half, the count of blob
/// broadcasts made so far (modulo 2^32) in the high half.
fn cpu_word(cpu: u32, blobs: u64) -> u64 {
    (blobs << 32) | u64::from(cpu)
}

/// The inode of this process's pid namespace (0 when unknown).
fn pid_namespace() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino())
}

/// Splits `len` bytes of `esize`-byte elements into `n` shares aligned to
/// 64 bytes where possible; returns share `j` as a byte range.
fn share(len: usize, esize: usize, n: usize, j: usize) -> (usize, usize) {
    let m = len / esize;
    let align = (LINE / esize).max(1);
    let per = m.div_ceil(n).div_ceil(align) * align;
    let lo = (j * per).min(m);
    let hi = ((j + 1) * per).min(m);
    (lo * esize, hi * esize)
}

impl ShmComm {
    /// Creates the communicator collectively, exchanging the segment's name
    /// through `store` under `key` (rank 0 sets it, the others wait for it).
    /// Every rank of the group calls it with the same `size`, `group`,
    /// `key` and `opts.slot_bytes`.
    pub fn create(
        rank: usize,
        size: usize,
        group: &str,
        store: &dyn Store,
        key: &str,
        opts: &ShmOptions,
    ) -> Result<ShmComm> {
        Self::create_with(rank, size, group, opts, |name| match name {
            Some(n) => {
                store.set(key, n.as_bytes())?;
                Ok(n.to_string())
            }
            None => {
                let v = store.get_timeout(key, opts.timeout)?;
                String::from_utf8(v).map_err(|_| {
                    Error::protocol(Context::new("shm.create", group, rank), format!("store key {key} is not UTF-8"))
                })
            }
        })
    }

    /// Like [`ShmComm::create`], with the name exchange left to `exchange`:
    /// rank 0 gets `Some(name)` and publishes it (returning it), the others
    /// get `None` and return the name rank 0 published.
    pub fn create_with(
        rank: usize,
        size: usize,
        group: &str,
        opts: &ShmOptions,
        exchange: impl FnOnce(Option<&str>) -> Result<String>,
    ) -> Result<ShmComm> {
        if size == 0 || rank >= size {
            return Err(Error::invalid(format!("shm communicator rank {rank} of {size}")));
        }
        crate::sync::note_local_ranks(size);
        // A group of one never moves data: keep its segment tiny.
        let slot = if size == 1 { 2 * LINE } else { opts.slot() };
        let len = segment_bytes(size, slot)
            .ok_or_else(|| Error::invalid(format!("{size} shm slots of {slot} bytes do not fit in memory")))?;
        let seg = if rank == 0 {
            let seg = ShmSegment::create_unique(group, len)?;
            let words = [MAGIC, VERSION, size as u64, slot as u64];
            // SAFETY: nobody else knows the segment's name yet.
            unsafe { seg.write(0, bytemuck::cast_slice(&words)) };
            exchange(Some(seg.name()))?;
            seg
        } else {
            let name = exchange(None)?;
            let seg = ShmSegment::open(&name, len)?;
            let mut words = [0u64; 4];
            // SAFETY: rank 0 wrote the header before publishing the name (the
            // store's exchange orders it) and never writes it again.
            unsafe { seg.read(0, bytemuck::cast_slice_mut(&mut words)) };
            if words != [MAGIC, VERSION, size as u64, slot as u64] {
                return Err(Error::protocol(
                    Context::new("shm.create", group, rank).with_peer(0),
                    format!(
                        "segment {name} has header {words:x?}, expected version {VERSION}, {size} ranks, \
                         {slot}-byte slots (every rank must use the same slot size)"
                    ),
                ));
            }
            seg
        };
        let mut comm = ShmComm {
            seg: Arc::new(seg),
            rank,
            size,
            group: group.to_string(),
            slot,
            half: slot / 2,
            direct_max: opts.direct_all_reduce_bytes.min(slot / 2),
            timeout: opts.timeout,
            step: 0,
            unit: 0,
            blobs: 0,
            ring: HEADER + size * (CTRL + slot) + p2p::channels_bytes(size).unwrap_or(0),
            poisoned: None,
            p2p: P2p::new(
                HEADER + size * (CTRL + slot),
                size,
                opts.cross_memory_attach,
                opts.single_copy_min,
                opts.split_copy_min,
                opts.adaptive_copy,
                opts.streaming_store_min,
            ),
            watch: Watcher::default(),
            names: Vec::new(),
            zc: zc::Zc::new(),
        };
        comm.info(rank, 0).store(std::process::id() as u64, Ordering::Relaxed);
        comm.info(rank, 1).store(pid_namespace(), Ordering::Relaxed);
        if opts.cross_memory_attach && size > 1 {
            // Before the hello step: once it is over, every rank lets its
            // peers attach.
            crate::sys::cma::allow_peer_attach();
        }
        // The hello step's Release store publishes the process line.
        comm.step(OpCode::Hello, desc(OpCode::Hello, None, None, None, 0), None)?;
        // Everyone has the mapping: the name is no longer needed.
        comm.seg.unlink();
        Ok(comm)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }
    /// The group's name, for errors.
    pub fn group(&self) -> &str {
        &self.group
    }
    /// The segment's name (already unlinked once every rank attached).
    pub fn segment_name(&self) -> &str {
        self.seg.name()
    }
    /// Bytes processed per pipelined segment (half a slot).
    pub fn segment_bytes(&self) -> usize {
        self.half
    }
    /// The per-step deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// Changes the per-step deadline.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Calls `watch` every liveness interval while a step waits (`None`
    /// removes it); an error it returns fails the step.
    pub fn set_watch(&mut self, watch: Option<Watch>) {
        self.watch = Watcher(watch);
    }

    /// Names the members by their ranks in an enclosing group (a node's
    /// communicator inside a group spanning nodes): point-to-point errors
    /// then name `names[j]` for member `j`. Ignored unless it has one entry
    /// per member.
    pub fn set_rank_names(&mut self, names: Vec<usize>) {
        if names.len() == self.size {
            self.names = names;
        }
    }

    /// Member `j`'s rank for errors (see [`ShmComm::set_rank_names`]).
    fn name_of(&self, j: usize) -> usize {
        self.names.get(j).copied().unwrap_or(j)
    }

    fn ctx(&self, op: OpCode) -> Context {
        Context::new(op.name(), self.group.clone(), self.rank)
    }

    fn check(&self) -> Result<()> {
        match &self.poisoned {
            Some(cause) => Err(Error::Poisoned { group: self.group.clone(), cause: cause.clone() }),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: Error) -> Error {
        if e.poisons_group() && self.poisoned.is_none() {
            self.poisoned = Some(e.to_string());
        }
        e
    }

    /// Offset of control line `p` (0 or 1) of rank `j`.
    fn line(&self, j: usize, p: usize) -> usize {
        debug_assert!(j < self.size && p < 2);
        HEADER + j * CTRL + p * LINE
    }

    fn line_step(&self, j: usize, p: usize) -> &AtomicU64 {
        self.seg.atomic_u64(self.line(j, p))
    }

    fn line_desc(&self, j: usize, p: usize) -> &AtomicU64 {
        self.seg.atomic_u64(self.line(j, p) + 8)
    }

    /// Rank `j`'s process: word 0 its pid, word 1 its pid namespace, word 2
    /// set once it closed the group ([`ShmAbort::close`]).
    fn info(&self, j: usize, w: usize) -> &AtomicU64 {
        debug_assert!(j < self.size && w <= CLOSED_WORD);
        self.seg.atomic_u64(HEADER + j * CTRL + 2 * LINE + w * 8)
    }

    /// A late rank whose process no longer exists, if any. Only ranks in our
    /// pid namespace can be checked (a pid means nothing across namespaces),
    /// and a killed process counts as gone once it has exited, reaped or not
    /// (a zombie).
    fn vanished(&self, mut late: impl Iterator<Item = usize>) -> Option<usize> {
        let me = std::process::id() as u64;
        let ns = self.info(self.rank, 1).load(Ordering::Relaxed);
        if ns == 0 {
            return None;
        }
        late.find(|&j| {
            let pid = self.info(j, 0).load(Ordering::Relaxed);
            pid != 0
                && pid != me
                && self.info(j, 1).load(Ordering::Relaxed) == ns
                && i32::try_from(pid).is_ok_and(crate::sys::proc::process_gone)
        })
    }

    /// For a wait on member `j` (`name` in errors) for `what`: the error to
    /// stop with when `j` closed the group, and, with `liveness` (once per
    /// liveness interval), when the watch fails or `j`'s process exited.
    fn peer_gone(
        &self,
        j: usize,
        name: usize,
        what: &dyn std::fmt::Display,
        liveness: bool,
        ctx: impl Fn() -> Context,
    ) -> Option<Error> {
        // Acquire: pairs with the Release store in `ShmAbort::close`.
        if self.info(j, CLOSED_WORD).load(Ordering::Acquire) != 0 {
            let detail = format!("rank {name} closed the group while this rank waited for it {what}");
            return Some(Error::PeerLost { ctx: ctx(), detail });
        }
        if !liveness {
            return None;
        }
        if let Some(err) = self.watch.0.as_ref().and_then(|w| w()) {
            return Some(err);
        }
        self.vanished(std::iter::once(j)).map(|_| Error::PeerLost {
            ctx: ctx(),
            detail: format!("the process of rank {name} exited while this rank waited for it {what}"),
        })
    }

    /// The CPU rank `j` ran on when it last signalled on line `p` (a hint;
    /// the low half, see [`cpu_word`]).
    fn line_cpu(&self, j: usize, p: usize) -> &AtomicU64 {
        self.seg.atomic_u64(self.line(j, p) + 16)
    }

    /// Inline payload of rank `j`'s line `p`, read side.
    fn inline(&self, j: usize, p: usize, len: usize) -> &[u8] {
        assert!(len <= INLINE_BYTES);
        // SAFETY: the caller reads only after the Acquire load of that
        // line's step and before its own next step, while the owner writes
        // the payload again only two steps later (see the module docs).
        unsafe { self.seg.bytes(self.line(j, p) + INLINE_AT, len) }
    }

    /// Offset of the halves `u % 2` of every slot: they lie side by side,
    /// in rank order (all halves 0, then all halves 1), so that a unit's
    /// halves form one contiguous area of `size` halves.
    fn unit_area_at(&self, u: u64) -> usize {
        HEADER + self.size * CTRL + (u as usize & 1) * self.size * self.half
    }

    /// Offset of half `u % 2` of rank `j`'s slot.
    fn slot_at(&self, j: usize, u: u64) -> usize {
        self.unit_area_at(u) + j * self.half
    }

    /// Read view of `len` bytes at `off` in half `u % 2` of rank `j`'s slot.
    fn slot(&self, j: usize, u: u64, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.half);
        // SAFETY: read only between the step that published the unit and
        // this rank's next step, while the owner writes the half again only
        // at unit u + 2 (see the module docs).
        unsafe { self.seg.bytes(self.slot_at(j, u) + off, len) }
    }

    /// Copies `data` into this rank's half `u % 2` at `off`.
    fn write_slot(&self, u: u64, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.half);
        // SAFETY: this rank's own half, which no rank reads during unit `u`
        // before the next step (see the module docs).
        unsafe { self.seg.write(self.slot_at(self.rank, u) + off, data) };
    }

    fn next_unit(&mut self) -> u64 {
        self.unit += 1;
        self.unit
    }

    /// One step: publish `inline` (if any) and `desc`, then wait for every
    /// rank to reach the same step with the same descriptor.
    fn step(&mut self, op: OpCode, d: u64, inline: Option<&[u8]>) -> Result<()> {
        self.step += 1;
        let e = self.step;
        let p = (e & 1) as usize;
        if let Some(data) = inline {
            assert!(data.len() <= INLINE_BYTES);
            // SAFETY: this rank's own line, bytes 24..64; readers of step e-2
            // are done (they signalled step e-1 before we got here).
            unsafe { self.seg.write(self.line(self.rank, p) + INLINE_AT, data) };
        }
        self.line_desc(self.rank, p).store(d, Ordering::Relaxed);
        let my_cpu = current_cpu();
        self.line_cpu(self.rank, p).store(cpu_word(my_cpu, self.blobs), Ordering::Relaxed);
        // Release: publishes the inline bytes, the descriptor and every slot
        // write of this step; pairs with the Acquire load below on the peers.
        self.line_step(self.rank, p).store(e, Ordering::Release);
        // Without a fence between the store and this load (it would cost
        // every step): a sleeper that counted itself in the few nanoseconds
        // before our step became visible may be missed, and then sleeps out
        // its interval, as every sleeper did before the bell.
        if self.seg.atomic_u64(STEP_SLEEPERS_AT).load(Ordering::Relaxed) != 0 {
            let bell = self.seg.atomic_u64(STEP_BELL_AT);
            bell.fetch_add(1, Ordering::SeqCst);
            futex::wake(bell);
        }

        // The clock starts after the spinning stage: most steps end before.
        let mut start: Option<Instant> = None;
        let mut warn_after = WARN_INTERVAL;
        let mut check_after = LIVENESS_EVERY;
        let mut next = 0;
        let mut hinted = usize::MAX;
        let mut backoff = Backoff::new();
        while next < self.size {
            // Acquire: pairs with the Release store of the step on rank `next`.
            if self.line_step(next, p).load(Ordering::Acquire) >= e {
                next += 1;
                continue;
            }
            if hinted != next {
                hinted = next;
                // Where the late rank signalled its previous step (the other
                // line). If that is our core, it cannot run while we spin.
                if my_cpu != u32::MAX && self.line_cpu(next, 1 - p).load(Ordering::Relaxed) as u32 == my_cpu {
                    backoff.skip_spin();
                }
            }
            if !backoff.is_spinning() {
                let now = Instant::now();
                let waited = now - *start.get_or_insert(now);
                if waited >= warn_after {
                    warn_after += WARN_INTERVAL;
                    tracing::warn!(
                        group = %self.group,
                        "{} on rank {} has waited {waited:.0?} for rank(s) {:?}",
                        op.name(),
                        self.rank,
                        self.late(p, e)
                    );
                }
                if let Some(err) = self.aborted(op) {
                    return Err(self.fail(err));
                }
                if waited >= check_after {
                    check_after = waited + LIVENESS_EVERY;
                    if let Some(err) = self.watch.0.as_ref().and_then(|w| w()) {
                        return Err(self.fail(err));
                    }
                    let late = self.late(p, e);
                    if let Some(err) = self.ring_strays(op, e, &late) {
                        return Err(self.fail(err));
                    }
                    if let Some(j) = self.vanished(late.into_iter()) {
                        let err = Error::PeerLost {
                            ctx: self.ctx(op).with_peer(j),
                            detail: format!("the process of rank {j} exited before step {e}"),
                        };
                        return Err(self.fail(err));
                    }
                }
                if waited >= self.timeout {
                    let late = self.late(p, e);
                    if !late.is_empty() {
                        let err = Error::timeout(
                            self.ctx(op).with_peer(late[0]),
                            waited,
                            format!("rank(s) {late:?} to arrive at step {e} of the shared-memory segment"),
                        );
                        return Err(self.fail(err));
                    }
                }
            }
            let me: &ShmComm = self;
            backoff.snooze_with(|interval| {
                let (sleepers, bell) = (me.seg.atomic_u64(STEP_SLEEPERS_AT), me.seg.atomic_u64(STEP_BELL_AT));
                // The bell before the count: a rank that sees the count
                // rings after this read, and the futex wait returns at once.
                let rung = bell.load(Ordering::SeqCst) as u32;
                sleepers.fetch_add(1, Ordering::SeqCst);
                // Acquire: as in the loop above.
                if (next..me.size).any(|j| me.line_step(j, p).load(Ordering::Acquire) < e) {
                    futex::wait(bell, rung, interval);
                }
                sleepers.fetch_sub(1, Ordering::Relaxed);
            });
        }
        for j in 0..self.size {
            let other = self.line_desc(j, p).load(Ordering::Relaxed);
            if other != d {
                let err = Error::Mismatch {
                    ctx: self.ctx(op).with_peer(j),
                    detail: format!("rank {j} called {}, this rank called {}", describe(other), describe(d)),
                };
                return Err(self.fail(err));
            }
            let blobs = (self.line_cpu(j, p).load(Ordering::Relaxed) >> 32) as u32;
            if blobs != self.blobs as u32 {
                let err = Error::Mismatch {
                    ctx: self.ctx(op).with_peer(j),
                    detail: format!(
                        "rank {j} called {} after {blobs} blob broadcasts (broadcast_object), this rank after {}",
                        describe(other),
                        self.blobs as u32
                    ),
                };
                return Err(self.fail(err));
            }
        }
        Ok(())
    }

    /// The error to stop with when another rank aborted the group through
    /// the segment's abort word ([`ShmAbort`]).
    fn aborted(&self, op: OpCode) -> Option<Error> {
        // Acquire: pairs with the Release compare-exchange in `ShmAbort::abort`.
        let w = self.seg.atomic_u64(ABORT_AT).load(Ordering::Acquire);
        if w == 0 {
            return None;
        }
        let (kind, reporter, culprit) =
            ((w >> 56) & 0x7f, ((w >> 28) & 0x0fff_ffff) as usize, (w & 0x0fff_ffff) as usize);
        let ctx = self.ctx(op).with_peer(culprit);
        let what = ["lost", "timed out", "mismatched", "failed"].get(kind as usize).copied().unwrap_or("failed");
        let detail = format!("rank {culprit} {what}: reported by rank {reporter}, which aborted the group");
        Some(if kind == 2 { Error::Mismatch { ctx, detail } } else { Error::PeerLost { ctx, detail } })
    }

    /// A handle that aborts this communicator's group from any thread.
    pub fn abort_handle(&self) -> ShmAbort {
        ShmAbort { seg: self.seg.clone(), rank: self.rank }
    }

    /// Ranks whose line `p` has not reached step `e`.
    fn late(&self, p: usize, e: u64) -> Vec<usize> {
        (0..self.size).filter(|&j| self.line_step(j, p).load(Ordering::Acquire) < e).collect()
    }

    /// Returns once every rank entered.
    pub fn barrier(&mut self) -> Result<()> {
        self.check()?;
        if self.size == 1 {
            return Ok(());
        }
        self.step(OpCode::Barrier, desc(OpCode::Barrier, None, None, None, 0), None)
    }

    /// In-place all_reduce of `buf` (elements of `dtype`); every rank gets
    /// bitwise identical results (see the module docs for the order).
    pub fn all_reduce(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        self.all_reduce_as(OpCode::AllReduce, None, buf, dtype, op)
    }

    /// In-place reduce to rank `root`: the result is defined on `root`
    /// (the other ranks get it too: the all_reduce algorithm costs the same
    /// in shared memory).
    pub fn reduce(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
        self.all_reduce_as(OpCode::Reduce, Some(root), buf, dtype, op)
    }

    fn all_reduce_as(
        &mut self,
        code: OpCode,
        root: Option<usize>,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.check()?;
        let es = dtype.size();
        self.args(code).elems(buf.len(), dtype)?;
        if let Some(root) = root {
            self.args(code).root(root)?;
        }
        let n = self.size;
        if n == 1 {
            return Ok(());
        }
        let d = desc(code, Some(dtype), Some(op), root, buf.len());
        let len = buf.len();
        if len <= INLINE_BYTES {
            self.step(code, d, Some(buf))?;
            let p = (self.step & 1) as usize;
            buf.copy_from_slice(self.inline(0, p, len));
            for j in 1..n {
                reduce_into(buf, self.inline(j, p, len), dtype, op);
            }
            if op == ReduceOp::Avg {
                finish_avg(buf, dtype, n);
            }
            return Ok(());
        }
        if len <= self.direct_max {
            let u = self.next_unit();
            self.write_slot(u, 0, buf);
            self.step(code, d, None)?;
            buf.copy_from_slice(self.slot(0, u, 0, len));
            for j in 1..n {
                reduce_into(buf, self.slot(j, u, 0, len), dtype, op);
            }
            if op == ReduceOp::Avg {
                finish_avg(buf, dtype, n);
            }
            return Ok(());
        }
        let mut off = 0;
        while off < len {
            let c = self.half.min(len - off);
            let u = self.next_unit();
            let (lo, hi) = share(c, es, n, self.rank);
            // Publish every share but our own: nobody else reads it before
            // step B, when it holds the result.
            self.write_slot(u, 0, &buf[off..off + lo]);
            self.write_slot(u, hi, &buf[off + hi..off + c]);
            self.step(code, d, None)?;
            if lo < hi {
                // `mine` still holds this rank's input: combine the others
                // into it in rank order (saves a copy of the share).
                let mine = &mut buf[off + lo..off + hi];
                for j in (0..n).filter(|&j| j != self.rank) {
                    reduce_into(mine, self.slot(j, u, lo, hi - lo), dtype, op);
                }
                if op == ReduceOp::Avg {
                    finish_avg(mine, dtype, n);
                }
                // Own slot, own share: only this rank reads it during step A.
                self.write_slot(u, lo, mine);
            }
            self.step(code, d, None)?;
            for j in (0..n).filter(|&j| j != self.rank) {
                let (lo, hi) = share(c, es, n, j);
                if lo < hi {
                    buf[off + lo..off + hi].copy_from_slice(self.slot(j, u, lo, hi - lo));
                }
            }
            off += c;
        }
        Ok(())
    }

    /// The argument checks of `op` ([`crate::validate`], the same checks
    /// and wording as the group's).
    fn args(&self, op: OpCode) -> Check<'_> {
        Check { op: op.name(), group: &self.group, rank: self.rank, size: self.size }
    }

    /// gather to `root`: `output` (root only, `size * input.len()` bytes)
    /// receives every rank's input in rank order.
    pub fn gather(&mut self, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()> {
        const OP: OpCode = OpCode::Gather;
        self.check()?;
        let (n, s, me) = (self.size, input.len(), self.rank);
        self.args(OP).root_buffer("output", root, output.as_ref().map(|o| o.len()), n * s)?;
        let mut output = output;
        if let Some(o) = output.as_deref_mut() {
            o[me * s..(me + 1) * s].copy_from_slice(input);
        }
        if n == 1 {
            return Ok(());
        }
        let d = desc(OP, None, None, Some(root), s);
        let mut off = 0;
        loop {
            let c = self.half.min(s - off);
            let u = self.next_unit();
            if me != root {
                self.write_slot(u, 0, &input[off..off + c]);
            }
            self.step(OP, d, None)?;
            if let Some(o) = output.as_deref_mut() {
                for j in (0..n).filter(|&j| j != me) {
                    o[j * s + off..j * s + off + c].copy_from_slice(self.slot(j, u, 0, c));
                }
            }
            off += c;
            if off >= s {
                return Ok(());
            }
        }
    }

    /// scatter from `root`: block `r` of `input` (root only, `size *
    /// output.len()` bytes) lands in rank `r`'s `output`.
    pub fn scatter(&mut self, input: Option<&[u8]>, output: &mut [u8], root: usize) -> Result<()> {
        const OP: OpCode = OpCode::Scatter;
        self.check()?;
        let (n, s, me) = (self.size, output.len(), self.rank);
        self.args(OP).root_buffer("input", root, input.map(<[u8]>::len), n * s)?;
        if let Some(i) = input {
            output.copy_from_slice(&i[me * s..(me + 1) * s]);
        }
        if n == 1 {
            return Ok(());
        }
        let d = desc(OP, None, None, Some(root), s);
        let c_max = self.block_segment(n)?;
        let mut off = 0;
        loop {
            let c = c_max.min(s - off);
            let u = self.next_unit();
            if let Some(i) = input {
                for j in 0..n {
                    self.write_slot(u, j * c, &i[j * s + off..j * s + off + c]);
                }
            }
            self.step(OP, d, None)?;
            if me != root {
                output[off..off + c].copy_from_slice(self.slot(root, u, me * c, c));
            }
            off += c;
            if off >= s {
                return Ok(());
            }
        }
    }

    /// all_to_all: block `j` of this rank's `input` lands in block `rank`
    /// of rank `j`'s `output`; both `size * S` bytes.
    pub fn all_to_all(&mut self, input: &[u8], output: &mut [u8]) -> Result<()> {
        const OP: OpCode = OpCode::AllToAll;
        self.check()?;
        let (n, me) = (self.size, self.rank);
        self.args(OP).len("output (same as input)", input.len(), output.len())?;
        self.args(OP).blocks(input.len(), None)?;
        let s = input.len() / n;
        output[me * s..(me + 1) * s].copy_from_slice(&input[me * s..(me + 1) * s]);
        if n == 1 {
            return Ok(());
        }
        let d = desc(OP, None, None, None, s);
        let c_max = self.block_segment(n)?;
        let mut off = 0;
        loop {
            let c = c_max.min(s - off);
            let u = self.next_unit();
            for j in 0..n {
                self.write_slot(u, j * c, &input[j * s + off..j * s + off + c]);
            }
            self.step(OP, d, None)?;
            for j in (0..n).filter(|&j| j != me) {
                output[j * s + off..j * s + off + c].copy_from_slice(self.slot(j, u, me * c, c));
            }
            off += c;
            if off >= s {
                return Ok(());
            }
        }
    }

    /// Bytes per block and segment when a slot half carries `n` blocks.
    fn block_segment(&self, n: usize) -> Result<usize> {
        let c = ((self.half / n) / LINE * LINE).max((self.half / n) / 8 * 8);
        if c == 0 {
            return Err(Error::invalid(format!("shm slots of {} bytes are too small for {n} ranks", self.slot)));
        }
        Ok(c)
    }

    /// In-place broadcast of `buf` from rank `root`.
    pub fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        const OP: OpCode = OpCode::Broadcast;
        self.check()?;
        self.args(OpCode::Broadcast).root(root)?;
        if self.size == 1 {
            return Ok(());
        }
        let d = desc(OP, None, None, Some(root), buf.len());
        let len = buf.len();
        if len <= INLINE_BYTES {
            let me = self.rank == root;
            self.step(OP, d, if me { Some(buf) } else { None })?;
            if !me {
                let p = (self.step & 1) as usize;
                buf.copy_from_slice(self.inline(root, p, len));
            }
            return Ok(());
        }
        let mut off = 0;
        while off < len {
            let c = self.half.min(len - off);
            let u = self.next_unit();
            if self.rank == root {
                self.write_slot(u, 0, &buf[off..off + c]);
            }
            self.step(OP, d, None)?;
            if self.rank != root {
                buf[off..off + c].copy_from_slice(self.slot(root, u, 0, c));
            }
            off += c;
        }
        Ok(())
    }

    /// all_gather: `output.len() == size * input.len()`, rank order.
    pub fn all_gather(&mut self, input: &[u8], output: &mut [u8]) -> Result<()> {
        const OP: OpCode = OpCode::AllGather;
        self.check()?;
        let (n, s) = (self.size, input.len());
        self.args(OP).len("output (size x input)", n * s, output.len())?;
        output[self.rank * s..(self.rank + 1) * s].copy_from_slice(input);
        if n == 1 {
            return Ok(());
        }
        let d = desc(OP, None, None, None, s);
        if s <= INLINE_BYTES {
            self.step(OP, d, Some(input))?;
            let p = (self.step & 1) as usize;
            for j in (0..n).filter(|&j| j != self.rank) {
                output[j * s..(j + 1) * s].copy_from_slice(self.inline(j, p, s));
            }
            return Ok(());
        }
        let mut off = 0;
        while off < s {
            let c = self.half.min(s - off);
            let u = self.next_unit();
            self.write_slot(u, 0, &input[off..off + c]);
            self.step(OP, d, None)?;
            for j in (0..n).filter(|&j| j != self.rank) {
                output[j * s + off..j * s + off + c].copy_from_slice(self.slot(j, u, 0, c));
            }
            off += c;
        }
        Ok(())
    }

    /// reduce_scatter: `input.len() == size * output.len()`; this rank gets
    /// block `rank` of the element-wise reduction, reduced in rank order.
    pub fn reduce_scatter(&mut self, input: &[u8], output: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        const OP: OpCode = OpCode::ReduceScatter;
        self.check()?;
        let (n, s) = (self.size, output.len());
        self.args(OP).elems(s, dtype)?;
        self.args(OP).len("input (size x output)", n * s, input.len())?;
        let r = self.rank;
        if n == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        let d = desc(OP, Some(dtype), Some(op), None, s);
        // Per segment, every rank writes c bytes of each of the n blocks.
        let c_max = self.block_segment(n)?;
        let mut off = 0;
        loop {
            let c = c_max.min(s - off);
            let u = self.next_unit();
            for j in 0..n {
                self.write_slot(u, j * c, &input[j * s + off..j * s + off + c]);
            }
            self.step(OP, d, None)?;
            let out = &mut output[off..off + c];
            out.copy_from_slice(self.slot(0, u, r * c, c));
            for j in 1..n {
                reduce_into(out, self.slot(j, u, r * c, c), dtype, op);
            }
            if op == ReduceOp::Avg {
                finish_avg(out, dtype, n);
            }
            off += c;
            if off >= s {
                break;
            }
        }
        Ok(())
    }
}
