//! The MPI backend (cargo feature `mpi`): every group is an MPI
//! communicator, its collectives MPI's own (so the MPI library's transports
//! carry them: shared memory inside a node, InfiniBand, RoCE or TCP
//! between nodes).
//!
//! - **The world** comes from MPI: under `mpirun` or `srun`, [`world`]
//!   initializes MPI (once per process, `MPI_THREAD_MULTIPLE`, or
//!   `MPI_THREAD_SERIALIZED` with [`THREADS_ENV`]), takes the
//!   rank and size of `MPI_COMM_WORLD` and the local rank from the node's
//!   shared-memory communicator (`MPI_Comm_split_type(SHARED)`); no
//!   `MASTER_ADDR` is needed. Rank 0 also starts a rankweave store (on
//!   loopback when the job fits one node) and broadcasts its port over
//!   MPI, so [`crate::ProcessGroup::store`] works as on the CPU backends.
//! - **Groups**: the world group is a duplicate of `MPI_COMM_WORLD`; each
//!   subgroup is `MPI_Comm_create_group` over its members (collective over
//!   the members only, as rankweave's `new_group`).
//! - **Reductions**: MPI's built-in operations where they give rankweave's
//!   results (integers; Sum and Prod on f32/f64); f16, bf16 and the float
//!   Min/Max through a user-defined operation running rankweave's own kernel
//!   ([`crate::reduce::reduce_into`]); `Avg` is a Sum and one division by the
//!   group size on every rank ([`crate::reduce::finish_avg`]).
//! - **Errors**: `MPI_ERRORS_RETURN` is set on every communicator, and a
//!   failed call is an [`Error::Io`] naming the operation, group and rank
//!   with MPI's message. A receive waits until the group's deadline for the
//!   peer's message, failing with [`Error::Timeout`] naming the peer. MPI cannot
//!   cancel a collective (or a send) once started, so a **timed-out
//!   collective aborts the job**: a watchdog thread looks at every
//!   operation in flight every 50 ms and, once one has run past its
//!   timeout, logs which operation, group and rank timed out and calls
//!   `MPI_Abort`. A process that dies makes the
//!   MPI launcher end the job (Open MPI's default), as with any MPI program.
//! - **Mismatches**: a point-to-point message's tag carries its descriptor
//!   beside the pair's sequence number (below 4096 bytes its exact
//!   length). A small receive is posted at once and, while it waits,
//!   probes for the peer's message of this turn under another tag; a larger
//!   one first matches the peer's next message (`MPI_Improbe`) and takes it
//!   only when tag and length are its own. Either way a mismatched message
//!   is drained (its sender returns) and the receive fails with
//!   [`Error::Mismatch`] naming the peer and both descriptors, its buffer
//!   untouched, and MPI never truncates a message into a buffer. MPI's collectives carry no descriptor; in the check mode
//!   ([`CHECK_ENV`]) each first agrees on a hash of its descriptor in one
//!   small `MPI_Allreduce`, so that ranks calling different ones all fail
//!   with [`Error::Mismatch`]; without it a mismatched collective may fail
//!   with MPI's truncation error, hang until the watchdog aborts the job,
//!   or return wrong data.
//! - **Finalization**: MPI is finalized when the last handle on the
//!   [`Runtime`] goes (the last group destroyed), or at process exit;
//!   MPI cannot be initialized again afterwards.

mod ffi;

use super::{Backend, Call, Communicator, Link};
use crate::dtype::DType;
use crate::error::{Context, Error, Result};
use crate::group::{BackendFactory, GroupInfo, GroupOptions, ProcessGroup, TransportKind};
use crate::reduce::ReduceOp;
use crate::store::{SharedStore, TcpStore};
use crate::sync::SPIN_LIMIT;
use crate::transport::OpDesc;
use ffi::{Code, RawComm};
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Set while rankweave owns an initialized, not yet finalized MPI.
static OWNS_MPI: AtomicBool = AtomicBool::new(false);

pub(crate) fn runtime_owns_mpi() -> bool {
    OWNS_MPI.load(Ordering::Acquire)
}

/// Environment variable of the MPI thread level, read when MPI is
/// initialized: `multiple` (the default, `MPI_THREAD_MULTIPLE`: groups may
/// run from several threads at once) or `serialized`
/// (`MPI_THREAD_SERIALIZED`: rankweave lets one MPI call run at a time, so
/// a collective blocked on one thread holds up the other threads' groups;
/// for MPI builds without `MPI_THREAD_MULTIPLE`: Open MPI 4.1 is no faster
/// at this level, see `docs/PERFORMANCE.md`).
pub const THREADS_ENV: &str = "RANKWEAVE_MPI_THREADS";

/// Environment variable of the collectives' check mode, read when a group
/// is created (unless [`MpiFactory::check`] decides): `1` (or `on`,
/// `true`) makes every collective first run one small `MPI_Allreduce` of a
/// hash of its descriptor (operation, dtype, reduce op, root, size), so
/// that ranks calling different collectives all fail with
/// [`Error::Mismatch`] instead of hanging or reducing garbage; `0`, `off`
/// or unset (the default) skips it. It doubles the latency of small
/// collectives. Every rank of a group must agree (checked at creation).
pub const CHECK_ENV: &str = "RANKWEAVE_MPI_CHECK";

/// The check mode [`CHECK_ENV`] asks for.
fn check_from_env() -> Result<bool> {
    match std::env::var(CHECK_ENV).ok().as_deref().map(str::trim) {
        None | Some("") => Ok(false),
        Some(v) if ["1", "on", "true", "yes"].iter().any(|t| v.eq_ignore_ascii_case(t)) => Ok(true),
        Some(v) if ["0", "off", "false", "no"].iter().any(|t| v.eq_ignore_ascii_case(t)) => Ok(false),
        Some(v) => Err(Error::invalid(format!("environment variable {CHECK_ENV}=`{v}`: expected `1` or `0`"))),
    }
}

/// MPI, initialized for this process. Every MPI group holds it; when the
/// last handle goes, MPI is finalized (if rankweave initialized it). Hold
/// one ([`Runtime::get`]) to keep MPI up across several worlds.
pub struct Runtime {
    ours: bool,
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    tags: Tags,
    watchdog: Watchdog,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("local_rank", &self.local_rank)
            .field("local_size", &self.local_size)
            .finish_non_exhaustive()
    }
}

fn mpi_error(op: &str, group: &str, rank: Option<usize>, code: Code) -> Error {
    let ctx = Context { op: op.into(), group: group.into(), rank, peer: None };
    Error::io(ctx, std::io::Error::other(format!("MPI: {}", ffi::error_string(code))))
}

impl Runtime {
    /// The process's MPI runtime: initializes MPI on first use (an
    /// [`Error::Unsupported`] if it was finalized already, or lacks
    /// `MPI_THREAD_MULTIPLE`).
    pub fn get() -> Result<Arc<Runtime>> {
        static CURRENT: Mutex<Weak<Runtime>> = Mutex::new(Weak::new());
        let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rt) = cur.upgrade() {
            return Ok(rt);
        }
        let multiple = match std::env::var(THREADS_ENV).ok().as_deref().map(str::trim) {
            None | Some("") => true,
            Some(v) if v.eq_ignore_ascii_case("multiple") => true,
            Some(v) if v.eq_ignore_ascii_case("serialized") => false,
            Some(v) => {
                return Err(Error::invalid(format!(
                    "environment variable {THREADS_ENV}=`{v}`: expected `multiple` or `serialized`"
                )))
            }
        };
        let started = ffi::init(multiple).map_err(|e| Error::Unsupported(format!("MPI backend: {e}")))?;
        if started.ours {
            OWNS_MPI.store(true, Ordering::Release);
        }
        let err = |op: &str, c| mpi_error(op, "MPI_COMM_WORLD", None, c);
        let world = RawComm::world();
        let rank = world.rank().map_err(|c| err("MPI_Comm_rank", c))?;
        let size = world.size().map_err(|c| err("MPI_Comm_size", c))?;
        let node = world.split_shared().map_err(|c| err("MPI_Comm_split_type", c))?;
        let local = (node.rank(), node.size());
        node.free();
        let (local_rank, local_size) =
            (local.0.map_err(|c| err("MPI_Comm_rank", c))?, local.1.map_err(|c| err("MPI_Comm_size", c))?);
        // Ranks that outnumber the node's CPUs keep yielding in every wait.
        crate::sync::note_local_ranks(local_size);
        let tags = Tags::new(ffi::tag_ub().map_err(|c| err("MPI_Comm_get_attr(MPI_TAG_UB)", c))?);
        tracing::debug!(rank, size, local_rank, local_size, serialized = ffi::serialized(), library = %ffi::library_version(), ?tags, "MPI initialized");
        let rt = Arc::new(Runtime {
            ours: started.ours,
            rank,
            size,
            local_rank,
            local_size,
            tags,
            watchdog: Watchdog::default(),
        });
        *cur = Arc::downgrade(&rt);
        Ok(rt)
    }
    /// This process's rank in `MPI_COMM_WORLD`.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Size of `MPI_COMM_WORLD`.
    pub fn size(&self) -> usize {
        self.size
    }
    /// This process's rank among the processes on its node.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }
    /// Number of processes of the job on this node.
    pub fn local_size(&self) -> usize {
        self.local_size
    }
    /// The MPI library's version string.
    pub fn library_version(&self) -> String {
        ffi::library_version()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.watchdog.stop();
        // Unwinding from a panic: peers may be waiting in a collective, and
        // MPI_Finalize would wait for them; leave the job to the launcher.
        if self.ours && !std::thread::panicking() {
            OWNS_MPI.store(false, Ordering::Release);
            ffi::finalize();
        }
    }
}

// ---------------------------------------------------------------- watchdog

/// Operation names, indexed by [`Slot::op`].
const OPS: [&str; 13] = [
    "idle",
    "all_reduce",
    "broadcast",
    "all_gather",
    "gather",
    "scatter",
    "reduce",
    "reduce_scatter",
    "all_to_all",
    "barrier",
    "send",
    "recv",
    "create_group",
];

fn op_index(name: &str) -> u8 {
    OPS.iter().position(|o| *o == name).unwrap_or(0) as u8
}

/// One communicator's operation in flight, as the watchdog sees it. The
/// hot path reads no clock: arming stores the operation's number and
/// timeout, and the watchdog times each number from when it first sees it
/// (so it fires between the timeout and the timeout plus one round).
struct Slot {
    /// Number of the operation in flight; 0 when idle.
    active: AtomicU64,
    /// Operations armed so far (only the slot's owner writes it).
    count: AtomicU64,
    op: AtomicU8,
    timeout_ns: AtomicU64,
    group: String,
    rank: usize,
    /// The watchdog's own record: the operation number it saw and when.
    seen: Mutex<(u64, Option<Instant>)>,
}

impl Slot {
    #[inline]
    fn arm(&self, op: &'static str, timeout: Duration) {
        let n = self.count.load(Ordering::Relaxed) + 1;
        self.count.store(n, Ordering::Relaxed);
        self.op.store(op_index(op), Ordering::Relaxed);
        self.timeout_ns.store(u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.active.store(n, Ordering::Release);
    }
    #[inline]
    fn disarm(&self) {
        self.active.store(0, Ordering::Release);
    }
    /// The watchdog's check: true once the same operation has been in flight
    /// for longer than its timeout.
    fn overdue(&self, now: Instant) -> bool {
        let active = self.active.load(Ordering::Acquire);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if active == 0 {
            *seen = (0, None);
            return false;
        }
        match *seen {
            (n, Some(since)) if n == active => {
                now.duration_since(since) > Duration::from_nanos(self.timeout_ns.load(Ordering::Relaxed))
            }
            _ => {
                *seen = (active, Some(now));
                false
            }
        }
    }
}

/// Aborts the job when an operation passes its deadline (MPI cannot cancel
/// a started collective, so there is no error to return). One thread per
/// process, sleeping between rounds, started with the first slot.
#[derive(Default)]
struct Watchdog {
    started: AtomicBool,
    stop: Arc<AtomicBool>,
}

/// How often the watchdog looks (sleeping in between).
const WATCH_EVERY: Duration = Duration::from_millis(50);

/// Every slot of the process.
fn watch_registry() -> &'static Mutex<Vec<Weak<Slot>>> {
    static REG: Mutex<Vec<Weak<Slot>>> = Mutex::new(Vec::new());
    &REG
}

impl Watchdog {
    fn register(&self, group: &str, rank: usize) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            active: AtomicU64::new(0),
            count: AtomicU64::new(0),
            op: AtomicU8::new(0),
            timeout_ns: AtomicU64::new(0),
            group: group.to_string(),
            rank,
            seen: Mutex::new((0, None)),
        });
        let mut slots = watch_registry().lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|w| w.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
        drop(slots);
        if !self.started.swap(true, Ordering::AcqRel) {
            self.spawn();
        }
        slot
    }

    fn spawn(&self) {
        let stop = self.stop.clone();
        let spawned = std::thread::Builder::new().name("rankweave-mpi-watchdog".into()).spawn(move || {
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(WATCH_EVERY);
                let now = Instant::now();
                let slots: Vec<Arc<Slot>> = watch_registry()
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter_map(Weak::upgrade)
                    .collect();
                for s in slots {
                    if s.overdue(now) && !stop.load(Ordering::Acquire) {
                        let op = OPS[usize::from(s.op.load(Ordering::Relaxed)).min(OPS.len() - 1)];
                        let waited = Duration::from_nanos(s.timeout_ns.load(Ordering::Relaxed));
                        let msg = format!(
                            "rankweave: {op} in group {} on rank {} timed out after {waited:?} on the MPI backend; \
                             some peer of the group never entered it (MPI does not say which). MPI cannot cancel a \
                             started collective, so the job is aborted (MPI_Abort)",
                            s.group, s.rank
                        );
                        tracing::error!("{msg}");
                        eprintln!("{msg}");
                        ffi::abort_job(124);
                    }
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("MPI backend: cannot start the watchdog thread ({e}); timed-out collectives will hang");
        }
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

// ----------------------------------------------------------------- factory

/// Builds MPI communicators for the world and every subgroup of a world
/// made by [`world`] (or by [`ProcessGroup::new_world_with`] with this
/// factory, whose ranks must be `MPI_COMM_WORLD`'s).
#[derive(Debug, Clone)]
pub struct MpiFactory {
    rt: Arc<Runtime>,
    check: Option<bool>,
}

impl MpiFactory {
    /// A factory over the process's MPI runtime; its groups check their
    /// collectives when [`CHECK_ENV`] says so.
    pub fn new(rt: Arc<Runtime>) -> Self {
        MpiFactory { rt, check: None }
    }
    /// Turns the collectives' check mode on or off for the groups this
    /// factory builds, whatever [`CHECK_ENV`] says (see there). Every
    /// member of a group must build it with the same setting: a group
    /// whose ranks disagree fails to be created, on every rank.
    pub fn check(mut self, on: bool) -> Self {
        self.check = Some(on);
        self
    }
}

impl BackendFactory for MpiFactory {
    fn build(&self, g: &GroupInfo<'_>) -> Result<Backend> {
        let rt = &self.rt;
        let me = g.global_ranks.get(g.rank).copied();
        if me != Some(rt.rank) || g.global_ranks.iter().any(|&r| r >= rt.size) {
            return Err(Error::invalid(format!(
                "group {}: the MPI backend needs global ranks of MPI_COMM_WORLD (rank {} of {}), got rank {:?} of \
                 {:?}",
                g.name, rt.rank, rt.size, me, g.global_ranks
            )));
        }
        let check = match self.check {
            Some(on) => on,
            None => check_from_env()?,
        };
        let slot = rt.watchdog.register(g.name, g.rank);
        slot.arm("create_group", g.opts.timeout);
        let world = RawComm::world();
        let comm = if g.global_ranks.len() == rt.size && g.global_ranks.iter().enumerate().all(|(i, &r)| i == r) {
            world.dup()
        } else {
            let ranks: Vec<c_int> = g.global_ranks.iter().map(|&r| ffi::count(r).unwrap_or(c_int::MAX)).collect();
            // Concurrent creations over the world are told apart by tag.
            let tag = (g.group_id % 32_000) as c_int;
            world.create_group(&ranks, tag)
        };
        let comm = comm.map_err(|c| mpi_error("new_group", g.name, Some(g.rank), c));
        let comm = match comm {
            Ok(c) => c,
            Err(e) => {
                slot.disarm();
                return Err(e);
            }
        };
        // Whether MPI's shared memory can carry every collective.
        let node_size = comm.split_shared().map(|n| {
            let s = n.size();
            n.free();
            s
        });
        // Whether every member checks its collectives (a rank that checks
        // beside one that does not would pair its check with the other's
        // collective).
        let mut modes = [i64::from(check), !i64::from(check)];
        let agreed = comm.max_i64(&mut modes);
        slot.disarm();
        let kind = match (node_size, agreed) {
            (Ok(Ok(s)), Ok(())) if s == g.size => TransportKind::Shm,
            (Ok(Ok(_)), Ok(())) => TransportKind::Tcp,
            (Ok(Err(c)) | Err(c), _) | (_, Err(c)) => {
                comm.free();
                return Err(mpi_error("new_group", g.name, Some(g.rank), c));
            }
        };
        if modes != [i64::from(check), !i64::from(check)] {
            comm.free();
            return Err(Error::Mismatch {
                ctx: Context::new("new_group", g.name, g.rank),
                detail: format!(
                    "the collectives' check mode ({CHECK_ENV} or MpiFactory::check) is on on some ranks of the \
                     group and off on others; this rank has it {}",
                    if check { "on" } else { "off" }
                ),
            });
        }
        let link = Arc::new(MpiLink { aborted: AtomicBool::new(false) });
        let backend = MpiComm {
            comm,
            name: g.name.to_string(),
            rank: g.rank,
            size: g.size,
            slot,
            scratch: Vec::new(),
            check,
            tags: rt.tags,
            _rt: rt.clone(),
        };
        Ok(Backend { comm: Box::new(backend), link, kind })
    }
}

// ----------------------------------------------------------------- backend

/// One group's MPI communicator.
pub struct MpiComm {
    comm: RawComm,
    name: String,
    rank: usize,
    size: usize,
    slot: Arc<Slot>,
    scratch: Vec<u8>,
    /// Whether every collective first checks that all ranks call the same.
    check: bool,
    tags: Tags,
    /// Keeps MPI initialized while the communicator lives.
    _rt: Arc<Runtime>,
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        self.comm.free();
    }
}

/// The MPI backend's [`Link`]. MPI has no message to tell peers that this
/// rank failed short of aborting the job: peers waiting on it fail at their
/// deadline (a receive with [`Error::Timeout`], a collective by the
/// watchdog's abort). The communicator is freed when the group's last
/// handle drops, after every operation on it.
struct MpiLink {
    aborted: AtomicBool,
}

impl Link for MpiLink {
    fn abort(&self, err: &Error) {
        if !self.aborted.swap(true, Ordering::AcqRel) {
            tracing::debug!("MPI group failed: {err}");
        }
    }
    fn close(&self) {}
}

impl MpiComm {
    fn err(&self, op: &str, code: Code) -> Error {
        mpi_error(op, &self.name, Some(self.rank), code)
    }

    fn count(&self, op: &str, n: usize, unit: &str) -> Result<c_int> {
        ffi::count(n).ok_or_else(|| {
            Error::Unsupported(format!(
                "{op} in group {} on rank {}: {n} {unit} is more than MPI's int count can carry in one call",
                self.name, self.rank
            ))
        })
    }

    fn root(&self, root: usize) -> c_int {
        ffi::count(root).unwrap_or(0)
    }

    /// Runs `f` with the watchdog armed for `op`.
    #[inline]
    fn watched<R>(&mut self, call: &Call, op: &'static str, f: impl FnOnce(&mut Self) -> Result<R, Code>) -> Result<R> {
        self.slot.arm(op, call.timeout);
        let r = f(self);
        self.slot.disarm();
        r.map_err(|c| self.err(op, c))
    }

    /// Runs the collective `f` with the watchdog armed for `op`, in check
    /// mode after every rank agreed on the call ([`MpiComm::agree`]).
    #[inline]
    fn collective<R>(
        &mut self,
        call: &Call,
        op: &'static str,
        f: impl FnOnce(&mut Self) -> Result<R, Code>,
    ) -> Result<R> {
        if !self.check {
            return self.watched(call, op, f);
        }
        self.slot.arm(op, call.timeout);
        let r = self.agree(call.desc, op).and_then(|()| f(self).map_err(|c| self.err(op, c)));
        self.slot.disarm();
        r
    }

    /// The check mode's agreement: one `MPI_Allreduce` (max) over `[h, !h]`
    /// for `h` a hash of the call's descriptor tells every rank whether all
    /// hashes are equal. When they are not, every rank gathers all the
    /// descriptors and fails with the same [`Error::Mismatch`], naming them;
    /// no rank runs the collective, so the communicator stays in step.
    fn agree(&mut self, desc: OpDesc, op: &'static str) -> Result<()> {
        let h = mix(desc.0) as i64;
        let mut v = [h, !h];
        self.comm.max_i64(&mut v).map_err(|c| self.err(op, c))?;
        if v == [h, !h] {
            return Ok(());
        }
        let mut all = Vec::new();
        if all.try_reserve_exact(8 * self.size).is_err() {
            return Err(Error::OutOfMemory {
                ctx: Context::new(op, self.name.clone(), self.rank),
                bytes: 8 * self.size as u64,
                detail: "the check mode's gathered descriptors".into(),
            });
        }
        all.resize(8 * self.size, 0u8);
        let comm = self.comm;
        comm.all_gather(&desc.0.to_le_bytes(), &mut all, 8).map_err(|c| self.err(op, c))?;
        let descs: Vec<OpDesc> = all
            .chunks_exact(8)
            .map(|b| OpDesc(u64::from_le_bytes(<[u8; 8]>::try_from(b).unwrap_or_default())))
            .collect();
        Err(disagreement(&descs, desc, op, &self.name, self.rank))
    }

    fn peer_err(&self, op: &str, code: Code, peer: usize) -> Error {
        let mut e = self.err(op, code);
        if let Some(cx) = e.context_mut() {
            cx.peer = Some(peer);
        }
        e
    }

    fn ty(&self, op: &str, dtype: DType, rop: ReduceOp) -> Result<ffi::Ty> {
        ffi::ty(dtype, rop).map_err(|c| self.err(op, c))
    }
}

/// The check mode's error: which ranks called what (each distinct
/// descriptor with its ranks), the peer being the first rank whose
/// descriptor differs from this rank's.
fn disagreement(descs: &[OpDesc], mine: OpDesc, op: &str, group: &str, rank: usize) -> Error {
    let mut kinds: Vec<(OpDesc, Vec<usize>)> = Vec::new();
    for (r, d) in descs.iter().enumerate() {
        match kinds.iter_mut().find(|(k, _)| k == d) {
            Some((_, ranks)) => ranks.push(r),
            None => kinds.push((*d, vec![r])),
        }
    }
    let list: Vec<String> = kinds.iter().map(|(d, ranks)| format!("{d} on ranks {ranks:?}")).collect();
    let mut ctx = Context::new(op, group, rank);
    ctx.peer = descs.iter().position(|d| *d != mine);
    Error::Mismatch {
        ctx,
        detail: format!("the ranks of the group called different collectives ({CHECK_ENV} check): {}", list.join("; ")),
    }
}

/// A 64-bit mixing function (splitmix64's finalizer): descriptors that
/// differ in any bit hash apart.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Bits of a point-to-point tag that hold the pair's sequence number.
const SEQ_BITS: u32 = 11;
const SEQ_MASK: u32 = (1 << SEQ_BITS) - 1;
/// Descriptor bits of the wide layout (see [`Tags`]).
const WIDE_BITS: u32 = 20;
/// Lengths below this are in a wide tag exactly.
const SMALL: usize = 1 << 12;
/// How often (in polls past the spinning) a posted receive probes for a
/// mismatched message.
const PROBE_EVERY: u32 = 4;

/// How a point-to-point tag carries the message's descriptor beside the
/// pair's sequence number: `descriptor << 11 | seq mod 2048`.
///
/// With `MPI_TAG_UB` of 2^31 - 1 (Open MPI) the descriptor has 20 bits: 7
/// of a hash of the operation, dtype, reduce op and root, then a length
/// below 4096 exactly (with a flag bit), or 12 bits of a hash of a longer
/// one. A small receive's tag thus pins the message's length, and the
/// receive is posted at once, probing for a message under another tag while
/// it waits; a longer receive (or any receive under a smaller tag space,
/// where the descriptor is a hash in what is left, at least 4 bits at MPI's
/// minimum of 32767) first matches the peer's next message and takes it
/// only when tag and length are its own. So MPI never truncates a message
/// into a receive (which Open MPI 4.1's single-copy path does by writing
/// the whole message past the buffer).
#[derive(Clone, Copy, Debug)]
struct Tags {
    desc_bits: u32,
}

impl Tags {
    fn new(tag_ub: c_int) -> Tags {
        let space = u64::try_from(tag_ub).unwrap_or(32_767).max(32_767) + 1;
        let bits = 63 - space.leading_zeros();
        Tags { desc_bits: (bits - SEQ_BITS).min(WIDE_BITS) }
    }

    fn wide(self) -> bool {
        self.desc_bits == WIDE_BITS
    }

    /// Whether a receive of `len` bytes can be posted before its message
    /// is seen: its tag admits no other length.
    fn exact(self, len: usize) -> bool {
        self.wide() && len < SMALL
    }

    /// The wide layout's hash of everything but the length.
    fn head(desc: OpDesc) -> u32 {
        (mix(desc.0 >> 40) >> 57) as u32
    }

    /// The descriptor field of `desc`.
    fn code(self, desc: OpDesc) -> u32 {
        if !self.wide() {
            return (mix(desc.0) >> (64 - self.desc_bits)) as u32;
        }
        let len = desc.bytes();
        let field = if len < SMALL as u64 { SMALL as u64 | len } else { mix(len) >> 52 };
        (Tags::head(desc) << 13) | field as u32
    }

    /// The tag of the `seq`-th message of a pair, described by `desc`.
    fn tag(self, seq: u64, desc: OpDesc) -> c_int {
        ((self.code(desc) << SEQ_BITS) | (seq as u32 & SEQ_MASK)) as c_int
    }

    fn seq_of(tag: c_int) -> u32 {
        tag as u32 & SEQ_MASK
    }

    /// What a peer's message of `len` bytes under `tag` says of the call
    /// that sent it: under the wide layout, when the rest agrees with this
    /// rank's call, its descriptor; else its length and descriptor bits.
    fn describe(self, tag: c_int, len: usize, ours: OpDesc) -> String {
        let code = tag as u32 >> SEQ_BITS;
        if self.wide() && code >> 13 == Tags::head(ours) {
            let theirs = OpDesc((ours.0 & !((1 << 40) - 1)) | (len as u64 & ((1 << 40) - 1)));
            if self.code(theirs) == code {
                return theirs.to_string();
            }
        }
        let what = if self.wide() { "another operation, dtype or root" } else { "another descriptor" };
        format!("a message of {len} bytes for {what} (descriptor bits {code:#x}; this rank's {:#x})", self.code(ours))
    }
}

impl Communicator for MpiComm {
    fn name(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce(&mut self, call: Call, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let n = self.count("all_reduce", buf.len() / dtype.size(), "elements")?;
        let ty = self.ty("all_reduce", dtype, op)?;
        self.collective(&call, "all_reduce", |s| {
            let comm = s.comm;
            comm.all_reduce(buf, n, ty, &mut s.scratch)
        })?;
        if op == ReduceOp::Avg {
            crate::reduce::finish_avg(buf, dtype, self.size);
        }
        Ok(())
    }

    fn broadcast(&mut self, call: Call, buf: &mut [u8], root: usize) -> Result<()> {
        let n = self.count("broadcast", buf.len(), "bytes")?;
        let root = self.root(root);
        self.collective(&call, "broadcast", |s| s.comm.broadcast(buf, n, root))
    }

    fn all_gather(&mut self, call: Call, input: &[u8], output: &mut [u8]) -> Result<()> {
        let n = self.count("all_gather", output.len(), "bytes")?;
        let n = n / c_int::try_from(self.size).unwrap_or(1).max(1);
        self.collective(&call, "all_gather", |s| s.comm.all_gather(input, output, n))
    }

    fn gather(&mut self, call: Call, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()> {
        self.count("gather", input.len() * self.size, "bytes")?;
        let n = self.count("gather", input.len(), "bytes")?;
        let root = self.root(root);
        self.collective(&call, "gather", |s| s.comm.gather(input, output, n, root))
    }

    fn scatter(&mut self, call: Call, input: Option<&[u8]>, output: &mut [u8], root: usize) -> Result<()> {
        self.count("scatter", output.len() * self.size, "bytes")?;
        let n = self.count("scatter", output.len(), "bytes")?;
        let root = self.root(root);
        self.collective(&call, "scatter", |s| s.comm.scatter(input, output, n, root))
    }

    fn reduce(&mut self, call: Call, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
        let n = self.count("reduce", buf.len() / dtype.size(), "elements")?;
        let ty = self.ty("reduce", dtype, op)?;
        let me = root == self.rank;
        let root_c = self.root(root);
        self.collective(&call, "reduce", |s| {
            let comm = s.comm;
            comm.reduce(buf, n, ty, root_c, me, &mut s.scratch)
        })?;
        if me && op == ReduceOp::Avg {
            crate::reduce::finish_avg(buf, dtype, self.size);
        }
        Ok(())
    }

    fn reduce_scatter(
        &mut self,
        call: Call,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.count("reduce_scatter", input.len() / dtype.size(), "elements")?;
        let n = self.count("reduce_scatter", output.len() / dtype.size(), "elements")?;
        let ty = self.ty("reduce_scatter", dtype, op)?;
        self.collective(&call, "reduce_scatter", |s| s.comm.reduce_scatter(input, output, n, ty))?;
        if op == ReduceOp::Avg {
            crate::reduce::finish_avg(output, dtype, self.size);
        }
        Ok(())
    }

    fn all_to_all(&mut self, call: Call, input: &[u8], output: &mut [u8]) -> Result<()> {
        self.count("all_to_all", input.len(), "bytes")?;
        let n = self.count("all_to_all", input.len() / self.size, "bytes")?;
        self.collective(&call, "all_to_all", |s| s.comm.all_to_all(input, output, n))
    }

    fn barrier(&mut self, call: Call) -> Result<()> {
        // In check mode the agreement, an all_reduce, is the barrier.
        self.collective(&call, "barrier", |s| if s.check { Ok(()) } else { s.comm.barrier() })
    }

    fn send(&mut self, call: Call, data: &[u8], dst: usize) -> Result<()> {
        let n = self.count("send", data.len(), "bytes")?;
        let dst_c = self.root(dst);
        let tag = self.tags.tag(call.seq, call.desc);
        self.watched(&call, "send", |s| s.comm.send(data, n, dst_c, tag)).map_err(|mut e| {
            if let Some(c) = e.context_mut() {
                c.peer = Some(dst);
            }
            e
        })
    }

    fn recv(&mut self, call: Call, buf: &mut [u8], src: usize) -> Result<()> {
        let n = self.count("recv", buf.len(), "bytes")?;
        // (The group's descriptor holds the buffer's length; a caller below
        // the group whose descriptor says otherwise gets the matched path.)
        if self.tags.exact(buf.len()) && call.desc.bytes() == buf.len() as u64 {
            self.recv_posted(call, buf, n, src)
        } else {
            self.recv_matched(call, buf, src)
        }
    }
}

impl MpiComm {
    fn recv_ctx(&self, src: usize) -> Context {
        Context::new("recv", self.name.clone(), self.rank).with_peer(src)
    }

    /// The mismatch of a receive that found the peer's message of `len`
    /// bytes under `t` (already taken off MPI's queue).
    fn p2p_mismatch(&self, call: &Call, src: usize, t: c_int, len: usize, want: usize) -> Error {
        let tag = self.tags.tag(call.seq, call.desc);
        let (theirs, mine) = (Tags::seq_of(t), Tags::seq_of(tag));
        let detail = if theirs != mine {
            format!(
                "rank {src} sent its message {theirs} (mod 2048) of the pair, {}; this rank receives message {mine}, {}",
                self.tags.describe(t, len, call.desc),
                call.desc
            )
        } else if t != tag {
            format!("rank {src} sent {}; this rank receives {}", self.tags.describe(t, len, call.desc), call.desc)
        } else {
            format!("rank {src} sent {len} bytes, this rank receives {want}")
        };
        Error::Mismatch { ctx: self.recv_ctx(src), detail }
    }

    /// A small receive: posted at once under a tag that pins the length
    /// ([`Tags::exact`]). Spin briefly, then yield between tests: each
    /// MPI_Test also moves MPI's transfers along, so this wait must not
    /// sleep as the other backends' waits do. Once yielding, every few
    /// polls probe for the peer's message of this turn (this sequence
    /// number) under another tag: its call with another descriptor. (One
    /// with another sequence number is a later message: MPI keeps a pair's
    /// messages in order.)
    fn recv_posted(&mut self, call: Call, buf: &mut [u8], n: c_int, src: usize) -> Result<()> {
        let src_c = self.root(src);
        let start = Instant::now();
        let deadline = start + call.timeout;
        let tag = self.tags.tag(call.seq, call.desc);
        let (comm, want) = (self.comm, buf.len());
        let (mut spins, mut polls) = (0u32, 0u32);
        let mut other: Option<(c_int, usize)> = None;
        let mut probe_failed: Option<Code> = None;
        let got = comm
            .recv(buf, n, src_c, tag, || {
                if spins < SPIN_LIMIT {
                    spins += 1;
                    std::hint::spin_loop();
                    return true;
                }
                polls = polls.wrapping_add(1);
                if polls % PROBE_EVERY == 0 {
                    match comm.iprobe(src_c) {
                        Ok(Some((t, len))) if t != tag && Tags::seq_of(t) == Tags::seq_of(tag) => {
                            other = Some((t, len));
                            return false;
                        }
                        Ok(_) => {}
                        Err(c) => {
                            probe_failed = Some(c);
                            return false;
                        }
                    }
                }
                if Instant::now() >= deadline {
                    return false;
                }
                crate::sync::yield_core();
                true
            })
            .map_err(|c| self.peer_err("recv", c, src))?;
        match got {
            Some(len) if len == want => Ok(()),
            Some(len) => Err(self.p2p_mismatch(&call, src, tag, len, want)),
            None => {
                if let Some((t, len)) = other {
                    // Take the message off MPI's queue, so that its sender
                    // does not wait on it.
                    match comm.improbe(src_c, t) {
                        Ok(Some(m)) => {
                            if let Err(c) = comm.drain(m) {
                                tracing::debug!(
                                    "MPI recv: dropping rank {src}'s message failed: {}",
                                    ffi::error_string(c)
                                );
                            }
                        }
                        Ok(None) => {}
                        Err(c) => {
                            tracing::debug!("MPI recv: matching rank {src}'s message failed: {}", ffi::error_string(c))
                        }
                    }
                    return Err(self.p2p_mismatch(&call, src, t, len, want));
                }
                if let Some(c) = probe_failed {
                    return Err(self.peer_err("recv (MPI_Iprobe)", c, src));
                }
                Err(Error::timeout(self.recv_ctx(src), start.elapsed(), format!("{want} bytes from rank {src}")))
            }
        }
    }

    /// A larger receive: match the peer's next message first, any tag (MPI
    /// keeps a pair's messages in order, so it is the one of this turn),
    /// and receive it only when its tag and length are this call's, so that
    /// MPI never truncates it. Spins, then yields between probes (each also
    /// moves MPI's transfers along).
    fn recv_matched(&mut self, call: Call, buf: &mut [u8], src: usize) -> Result<()> {
        let src_c = self.root(src);
        let start = Instant::now();
        let deadline = start + call.timeout;
        let tag = self.tags.tag(call.seq, call.desc);
        let (comm, want, any) = (self.comm, buf.len(), ffi::any_tag());
        let mut spins = 0u32;
        let matched = loop {
            match comm.improbe(src_c, any) {
                Ok(Some(m)) => break m,
                Ok(None) => {}
                Err(c) => return Err(self.peer_err("recv", c, src)),
            }
            if spins < SPIN_LIMIT {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            if Instant::now() >= deadline {
                return Err(Error::timeout(
                    self.recv_ctx(src),
                    start.elapsed(),
                    format!("{want} bytes from rank {src}"),
                ));
            }
            crate::sync::yield_core();
        };
        if matched.tag != tag || matched.len != want {
            let (t, len) = (matched.tag, matched.len);
            // Take the message off MPI's queue, so that a sender blocked on
            // a large message returns.
            if let Err(c) = comm.drain(matched) {
                tracing::debug!("MPI recv: dropping rank {src}'s mismatched message failed: {}", ffi::error_string(c));
            }
            return Err(self.p2p_mismatch(&call, src, t, len, want));
        }
        // The message is matched and under way: MPI cannot cancel it now,
        // so the watchdog guards the rest of the transfer.
        self.slot.arm("recv", call.timeout);
        let mut spins = 0u32;
        let got = comm.mrecv(matched, buf, || {
            if spins < SPIN_LIMIT {
                spins += 1;
                std::hint::spin_loop();
            } else {
                crate::sync::yield_core();
            }
        });
        self.slot.disarm();
        got.map_err(|c| self.peer_err("recv", c, src))
    }
}

// ------------------------------------------------------------------- world

/// What [`world`] returns: the world group over `MPI_COMM_WORLD`, its store
/// and this process's place in the job.
#[derive(Clone)]
pub struct MpiWorld {
    /// The world group (its subgroups are MPI communicators too).
    pub group: ProcessGroup,
    /// The job's store, hosted by rank 0.
    pub store: SharedStore,
    /// This process's rank.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank on this node.
    pub local_rank: usize,
    /// Processes on this node.
    pub local_world_size: usize,
}

impl std::fmt::Debug for MpiWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiWorld")
            .field("group", &self.group)
            .field("store", &self.store.describe())
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("local_rank", &self.local_rank)
            .field("local_world_size", &self.local_world_size)
            .finish()
    }
}

/// Length of the store address rank 0 broadcasts.
const ADDR_LEN: usize = 512;

/// Builds the world group of an MPI job (every process calls it): MPI's
/// rank and size, a store hosted by rank 0 (its address broadcast over
/// MPI; `token` as `RANKWEAVE_TOKEN`) and groups over MPI communicators.
///
/// The store listens on loopback when the job fits one node. Across nodes
/// it listens on every interface and is reached at `store_host` when given
/// (`MASTER_ADDR`: an address of rank 0's host that the other nodes reach;
/// no port needed), else at the address rank 0's host name resolves to; a
/// host name that resolves only to loopback is an error naming
/// `MASTER_ADDR`, on every rank.
pub fn world(opts: GroupOptions, token: Option<&str>, store_host: Option<&str>) -> Result<MpiWorld> {
    let rt = Runtime::get()?;
    let (rank, size) = (rt.rank, rt.size);
    let store = job_store(&rt, opts.timeout, token, store_host)?;
    let group = ProcessGroup::new_world_with(Arc::new(MpiFactory::new(rt.clone())), store.clone(), rank, size, opts)?;
    Ok(MpiWorld { group, store, rank, world_size: size, local_rank: rt.local_rank, local_world_size: rt.local_size })
}

/// Where rank 0's store is reached, or why it cannot be.
fn store_host(rt: &Runtime, given: Option<&str>) -> Result<String> {
    if let Some(h) = given.map(str::trim).filter(|h| !h.is_empty()) {
        return Ok(h.to_string());
    }
    if rt.local_size == rt.size {
        return Ok("127.0.0.1".into());
    }
    let ip = crate::transport::tcp::advertised_ip(std::net::Ipv4Addr::UNSPECIFIED.into(), None);
    if ip.is_loopback() {
        return Err(Error::invalid(
            "MPI backend: the job spans nodes and rank 0's host name resolves to no address but loopback; set \
             MASTER_ADDR to an address of rank 0's host that the other nodes reach (no port needed)",
        ));
    }
    Ok(ip.to_string())
}

/// Rank 0 starts a store server; everyone learns its address (or rank 0's
/// failure, after a `!`) over MPI.
fn job_store(rt: &Runtime, timeout: Duration, token: Option<&str>, given: Option<&str>) -> Result<SharedStore> {
    let world = RawComm::world();
    let token = token.map(str::as_bytes);
    let mut addr = [0u8; ADDR_LEN];
    let mut served = None;
    let mut failure = None;
    if rt.rank == 0 {
        let started = store_host(rt, given).and_then(|host| {
            let s = TcpStore::builder(&host, 0).master(true).timeout(timeout).token(token).connect()?;
            Ok((format!("{host} {}", s.port()), s))
        });
        let text = match started {
            Ok((text, s)) => {
                served = Some(s);
                text
            }
            Err(e) => {
                let text = format!("!{e}");
                failure = Some(e);
                text
            }
        };
        let b = text.as_bytes();
        let n = b.len().min(ADDR_LEN);
        addr[..n].copy_from_slice(&b[..n]);
    }
    let slot = rt.watchdog.register("MPI_COMM_WORLD", rt.rank);
    slot.arm("broadcast", timeout);
    let rc = world.broadcast(&mut addr, ADDR_LEN as c_int, 0);
    slot.disarm();
    rc.map_err(|c| mpi_error("store address broadcast", "MPI_COMM_WORLD", Some(rt.rank), c))?;
    if let Some(e) = failure {
        return Err(e);
    }
    if let Some(s) = served {
        return Ok(Arc::new(s));
    }
    let text = String::from_utf8_lossy(&addr);
    let text = text.trim_end_matches('\0');
    if let Some(why) = text.strip_prefix('!') {
        return Err(Error::Store(format!("MPI backend: rank 0 could not start the job's store: {why}")));
    }
    let (host, port) = text
        .split_once(' ')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| Error::Store(format!("MPI backend: rank 0 sent no store address (got {text:?})")))?;
    Ok(Arc::new(TcpStore::builder(&host, port).timeout(timeout).token(token).connect()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::OpCode;

    fn p2p(len: usize) -> OpDesc {
        OpDesc::new(OpCode::SendRecv, None, None, None, len)
    }

    #[test]
    fn tag_layouts_fit_the_tag_space() {
        for (ub, bits) in [(32_767, 4), (65_535, 5), ((1 << 21) - 1, 10), (i32::MAX, WIDE_BITS)] {
            let t = Tags::new(ub);
            assert_eq!(t.desc_bits, bits, "tag_ub {ub}");
            let d = OpDesc::new(OpCode::Reduce, Some(DType::I64), Some(ReduceOp::Max), Some(300), usize::MAX >> 20);
            for seq in [1, 2047, 2048, u64::MAX] {
                for desc in [d, p2p(0), p2p(1 << 30)] {
                    let tag = t.tag(seq, desc);
                    assert!((0..=ub).contains(&tag), "tag_ub {ub}: tag {tag}");
                    assert_eq!(Tags::seq_of(tag), (seq % 2048) as u32);
                }
            }
        }
    }

    #[test]
    fn small_lengths_and_other_descriptors_get_other_tags() {
        let t = Tags::new(i32::MAX);
        // Below 4096 bytes the tag pins the length: any other length (a
        // longer one above all) gets another tag, so a posted receive never
        // truncates.
        for len in [0usize, 1, 8, 251, 4095] {
            assert!(t.exact(len));
            for other in (0..4096).chain([4096, 4096 + len, 1 << 20, 1 << 30]) {
                if other != len {
                    assert_ne!(t.tag(5, p2p(len)), t.tag(5, p2p(other)), "{len} vs {other}");
                }
            }
        }
        assert!(!t.exact(4096) && !Tags::new(32_767).exact(8));
        let typed = |d: DType| OpDesc::new(OpCode::SendRecv, Some(d), None, None, 64);
        assert_ne!(t.tag(5, typed(DType::F32)), t.tag(5, typed(DType::I32)));
        assert_ne!(t.tag(5, p2p(64)), t.tag(6, p2p(64)));
        assert_eq!(t.tag(5, p2p(64)), t.tag(5 + 2048, p2p(64)));
    }

    #[test]
    fn a_peer_descriptor_is_named_from_its_tag_and_length() {
        let t = Tags::new(i32::MAX);
        for (theirs, ours) in [(p2p(1000), p2p(998)), (p2p(1 << 20), p2p(8)), (p2p(0), p2p(1 << 22))] {
            let len = theirs.bytes() as usize;
            assert_eq!(t.describe(t.tag(3, theirs), len, ours), theirs.to_string());
        }
        let typed = OpDesc::new(OpCode::SendRecv, Some(DType::BF16), None, None, 1000);
        let text = t.describe(t.tag(3, typed), 1000, p2p(1000));
        assert!(text.contains("1000 bytes") && text.contains("another operation, dtype"), "{text}");
        // A small tag space holds a hash: the length and bits are named.
        let small = Tags::new(32_767);
        let text = small.describe(small.tag(3, typed), 1000, p2p(998));
        assert!(text.contains("1000 bytes") && text.contains("descriptor bits"), "{text}");
    }

    #[test]
    fn a_disagreement_names_every_call_and_its_ranks() {
        let a = OpDesc::new(OpCode::AllReduce, Some(DType::F32), Some(ReduceOp::Sum), None, 64);
        let b = OpDesc::new(OpCode::Broadcast, None, None, Some(1), 64);
        let descs = [a, a, b, a];
        let e = disagreement(&descs, a, "all_reduce", "tp:0", 1);
        assert!(matches!(e, Error::Mismatch { .. }));
        assert_eq!(e.peer(), Some(2));
        let text = e.to_string();
        assert!(text.contains(&format!("{a} on ranks [0, 1, 3]")), "{text}");
        assert!(text.contains(&format!("{b} on ranks [2]")), "{text}");
        assert!(text.contains("tp:0") && text.contains("all_reduce"), "{text}");
        assert_eq!(disagreement(&descs, b, "broadcast", "tp:0", 2).peer(), Some(0));
        assert_ne!(mix(a.0), mix(b.0));
    }
}
