//! [`GroupCoordinator`]: the seed's operations on tensors, objects and tensor
//! dicts over one group of ranks.
//!
//! A coordinator owns two groups over the same ranks, as the seed does: a
//! CPU [`ProcessGroup`] for metadata, objects and barriers, and a
//! [`DeviceGroup`] for tensors ([`DeviceGroup::Cpu`], or an NCCL
//! communicator with the `nccl` feature and [`CoordinatorOptions::device`]
//! on a CUDA device). Ranks
//! passed to methods
//! (`src`, `dst`) are positions in the group (`rank_in_group`), as in the
//! seed; [`GroupCoordinator::rank`] and [`GroupCoordinator::ranks`] are
//! global ranks.
//!
//! A group of one short-circuits where the seed does: `all_reduce`,
//! `all_gather`, `gather`, `broadcast`, `broadcast_object(_list)` and the
//! tensor-dict operations return their input without communicating.
//!
//! With `RANKWEAVE_DEBUG=detail` (read when the coordinator is created, or
//! [`GroupCoordinator::set_debug_detail`] on every rank), each operation
//! first checks that all ranks make the same call, and returns
//! [`Error::Mismatch`] naming the ranks that differ (`ctx.peer` is the first
//! rank whose call differs from this rank's).
//!
//! Errors name the coordinator's group and operation as the caller knows
//! them (`broadcast_tensor_dict in group tp:0`), also when the failure
//! happened in one of its inner groups or its message queue (those are
//! named in brackets: `[mq.dequeue in mq:62cd...]`).
//!
//! After any error that [poisons](Error::poisons_group) a group (a
//! mismatch, a timeout, a lost peer...), every later operation of the
//! coordinator returns [`Error::Poisoned`]: call
//! [`GroupCoordinator::destroy`] on every rank and build new groups. After
//! `destroy`, operations return [`Error::Destroyed`].
//!
//! Every coordinator is registered under its unique name in the
//! [`UniqueNames`] that named it; [`lookup_group`] (process-wide) and
//! [`UniqueNames::lookup`] find it again, as the seed's `_groups` does for
//! `inplace_all_reduce(tensor, group_name)`.

pub(crate) mod device;
mod fingerprint;
mod wire;

pub use crate::group::in_the_same_node_as;
#[cfg(feature = "nccl")]
pub use device::DeviceOnStream;
pub use device::{DeviceGroup, P2pOp};

use crate::backend::BlobRole;
use crate::dtype::DType;
use crate::error::{Context, Error, Result};
use crate::group::ProcessGroup;
use crate::message_queue::{MessageQueue, DEFAULT_MAX_CHUNKS, DEFAULT_MAX_CHUNK_BYTES};
use crate::reduce::ReduceOp;
use crate::tensor::codec::{self, DecodeLimits, MetadataEntry};
use crate::tensor::{normalize_dim, Device, Tensor, TensorDict, TensorDictValue};
use fingerprint::{CoordOp, Fingerprint, FP_BYTES};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

/// Hands out the seed's unique group names (`tp:0`, `tp:1`, ...) and keeps
/// the registry of the coordinators it named (the seed's `_groups`).
///
/// Every rank creates groups in the same order, so each rank's own counter
/// yields the same name for the same group. A [`crate::parallel_state::ParallelState`]
/// owns one; [`UniqueNames::global`] is the process-wide one.
#[derive(Debug, Default)]
pub struct UniqueNames {
    counters: Mutex<HashMap<String, usize>>,
    groups: Mutex<HashMap<String, Weak<Inner>>>,
}

impl UniqueNames {
    /// A fresh counter set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide counters (the seed's `_group_name_counter`).
    pub fn global() -> &'static UniqueNames {
        static GLOBAL: OnceLock<UniqueNames> = OnceLock::new();
        GLOBAL.get_or_init(UniqueNames::new)
    }

    /// `name:N` with `N` counting per name from 0.
    pub fn next(&self, name: &str) -> String {
        let mut m = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(name.to_string()).or_insert(0);
        let out = format!("{name}:{n}");
        *n += 1;
        out
    }

    fn register(&self, c: &GroupCoordinator) {
        let mut m = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(c.unique_name().to_string(), Arc::downgrade(&c.inner));
    }

    /// The coordinator registered as `unique_name` (`tp:0`).
    ///
    /// [`Error::NotFound`] when no coordinator of that name was built here
    /// (the message lists the names that exist); [`Error::Destroyed`] when
    /// it was destroyed or dropped.
    pub fn lookup(&self, unique_name: &str) -> Result<GroupCoordinator> {
        let m = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(unique_name) {
            None => {
                let mut known: Vec<&str> = m.keys().map(String::as_str).collect();
                known.sort_unstable();
                Err(Error::NotFound(format!(
                    "no group named `{unique_name}`; registered groups: [{}]",
                    known.join(", ")
                )))
            }
            Some(w) => match w.upgrade().map(|inner| GroupCoordinator { inner }) {
                Some(c) if !c.is_destroyed() => Ok(c),
                _ => Err(Error::Destroyed(format!("group {unique_name} was destroyed"))),
            },
        }
    }

    /// Unique names of the registered coordinators that are alive.
    pub fn registered(&self) -> Vec<String> {
        let m = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<String> = m
            .iter()
            .filter(|(_, w)| w.upgrade().is_some_and(|i| i.groups.read().unwrap_or_else(|e| e.into_inner()).is_some()))
            .map(|(k, _)| k.clone())
            .collect();
        v.sort_unstable();
        v
    }
}

/// The coordinator registered as `unique_name` in the process-wide
/// [`UniqueNames::global`] (coordinators built without their own
/// [`CoordinatorOptions::names`], such as the process-wide parallel state's).
pub fn lookup_group(unique_name: &str) -> Result<GroupCoordinator> {
    UniqueNames::global().lookup(unique_name)
}

/// How to build a [`GroupCoordinator`] beyond its ranks.
#[derive(Debug, Clone, Default)]
pub struct CoordinatorOptions {
    /// Base name; the unique name is `name:N` (`anonymous` when `None`).
    pub group_name: Option<String>,
    /// Broadcast objects from group rank 0 through the shared-memory
    /// message queue (the seed enables it for the TP group).
    pub use_message_queue_broadcaster: bool,
    /// Where unique names come from; [`UniqueNames::global`] when `None`.
    pub names: Option<Arc<UniqueNames>>,
    /// Limits on what peers may declare (object sizes, tensor shapes).
    pub limits: Option<DecodeLimits>,
    /// Where the group's tensors live: [`Device::Cpu`] (a CPU device
    /// group) by default; [`Device::Cuda`] makes the device group an NCCL
    /// communicator on that GPU (feature `nccl`; without it, or without a
    /// CUDA driver and NCCL, building the coordinator is a clean error).
    pub device: Device,
}

const MQ_TRAILER_MAGIC: [u8; 3] = *b"RWq";
const MQ_TRAILER_LEN: usize = 4;

/// What ends every message the coordinator puts in its message queue: a
/// magic and the operation's code.
fn mq_trailer(op: CoordOp) -> [u8; MQ_TRAILER_LEN] {
    let [a, b, c] = MQ_TRAILER_MAGIC;
    [a, b, c, op as u8]
}

/// A broadcaster of byte blobs from group rank 0 (the shared-memory message
/// queue plugs in here).
pub(crate) trait ObjectBroadcaster: Send + Sync {
    /// On group rank 0 `data` is `Some`; every rank gets the bytes back
    /// (the writer its own buffer, without a copy).
    fn broadcast_bytes(&self, data: Option<Vec<u8>>) -> Result<Vec<u8>>;
}

/// What a graph capture runs with (the seed's `GraphCaptureContext`): the
/// device stream the captured work is recorded on. CPU groups have no
/// streams, so `stream` is `None`; an NCCL group gives a fresh capture
/// stream (with the `nccl` feature, also as cudarc's stream:
/// `GraphCaptureContext::cuda_stream`).
#[derive(Clone, Default)]
pub struct GraphCaptureContext {
    /// The capture stream (a `CUstream` as an integer), when there is a device.
    pub stream: Option<u64>,
    /// The capture stream itself.
    #[cfg(feature = "nccl")]
    pub(crate) cuda: Option<Arc<crate::device::CudaStream>>,
}

impl PartialEq for GraphCaptureContext {
    fn eq(&self, other: &Self) -> bool {
        // `stream` is the handle of `cuda` when there is one.
        self.stream == other.stream
    }
}
impl Eq for GraphCaptureContext {}

impl std::fmt::Debug for GraphCaptureContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphCaptureContext").field("stream", &self.stream).finish()
    }
}

#[cfg(feature = "nccl")]
impl GraphCaptureContext {
    /// The capture stream, for an NCCL group's capture.
    pub fn cuda_stream(&self) -> Option<&Arc<crate::device::CudaStream>> {
        self.cuda.as_ref()
    }

    /// Records what `f` enqueues on the capture stream into a CUDA graph
    /// ([`crate::device::capture_graph`]); the device groups routed to this
    /// context (inside [`GroupCoordinator::graph_capture`]) only enqueue
    /// while it records. A context without a CUDA stream is an error.
    pub fn capture<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<(R, crate::device::CudaGraph)> {
        let s = self
            .cuda
            .as_ref()
            .ok_or_else(|| Error::Unsupported("graph capture: this context has no CUDA stream (a CPU group)".into()))?;
        crate::device::capture_graph(s, f)
    }
}

impl ObjectBroadcaster for MessageQueue {
    fn broadcast_bytes(&self, data: Option<Vec<u8>>) -> Result<Vec<u8>> {
        if self.is_writer() {
            let data = data.ok_or_else(|| Error::invalid("message queue broadcast: the writer must pass the bytes"))?;
            self.enqueue_bytes(&data)?;
            Ok(data)
        } else {
            self.dequeue_bytes()
        }
    }
}

#[derive(Clone)]
struct Groups {
    cpu: ProcessGroup,
    device: DeviceGroup,
}

struct Inner {
    unique_name: String,
    rank: usize,
    ranks: Vec<usize>,
    local_rank: usize,
    rank_in_group: usize,
    device: Device,
    groups: RwLock<Option<Groups>>,
    /// The first poisoning error, one line; later operations refuse.
    poisoned: Mutex<Option<String>>,
    debug_detail: AtomicBool,
    calls: AtomicU64,
    use_message_queue_broadcaster: bool,
    mq_broadcaster: Mutex<Option<Arc<dyn ObjectBroadcaster>>>,
    limits: DecodeLimits,
}

/// A group of ranks and every operation the seed runs over it.
///
/// Cheap to clone: clones share the groups (and [`GroupCoordinator::destroy`]).
#[derive(Clone)]
pub struct GroupCoordinator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GroupCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCoordinator")
            .field("unique_name", &self.inner.unique_name)
            .field("rank", &self.inner.rank)
            .field("ranks", &self.inner.ranks)
            .field("rank_in_group", &self.inner.rank_in_group)
            .field("local_rank", &self.inner.local_rank)
            .field("destroyed", &self.is_destroyed())
            .finish()
    }
}

/// True when `RANKWEAVE_DEBUG` asks for detail checks.
pub fn debug_detail_from_env() -> bool {
    std::env::var("RANKWEAVE_DEBUG").is_ok_and(|v| v.trim().eq_ignore_ascii_case("detail"))
}

/// Validates `group_ranks` against a world of `world_size` ranks and finds
/// the list holding `rank`: `(index of the list, position in it)`.
pub fn find_own_group(group_ranks: &[Vec<usize>], world_size: usize, rank: usize) -> Result<(usize, usize)> {
    let mut found = None;
    for (g, ranks) in group_ranks.iter().enumerate() {
        if ranks.is_empty() {
            return Err(Error::invalid(format!("group list {g} is empty; every group needs at least one rank")));
        }
        for (i, &r) in ranks.iter().enumerate() {
            if r >= world_size {
                return Err(Error::invalid(format!(
                    "group list {g} names rank {r}; expected ranks below the world size {world_size}"
                )));
            }
            if ranks[..i].contains(&r) {
                return Err(Error::invalid(format!("group list {g} names rank {r} twice")));
            }
            if r == rank {
                if let Some((g0, _)) = found {
                    return Err(Error::invalid(format!(
                        "rank {rank} appears in group lists {g0} and {g}; expected exactly one"
                    )));
                }
                found = Some((g, i));
            }
        }
    }
    found.ok_or_else(|| Error::invalid(format!("rank {rank} is in none of the group lists {group_ranks:?}")))
}

impl GroupCoordinator {
    /// Builds a coordinator: for every list of `group_ranks` (global ranks),
    /// in order, creates a device group and a CPU group over `world`; this
    /// rank keeps the pair of the list it belongs to. Every rank of `world`
    /// must call it with the same lists.
    pub fn new(
        world: &ProcessGroup,
        group_ranks: &[Vec<usize>],
        local_rank: usize,
        opts: CoordinatorOptions,
    ) -> Result<GroupCoordinator> {
        let rank = world.global_rank();
        let (own, rank_in_group) = find_own_group(group_ranks, world.size(), rank)?;
        let base = opts.group_name.as_deref().unwrap_or("anonymous");
        let names: &UniqueNames = match &opts.names {
            Some(n) => n,
            None => UniqueNames::global(),
        };
        let unique_name = names.next(base);
        // World-relative ranks: `new_group` takes ranks in `world`'s numbering.
        let to_world = |ranks: &[usize]| -> Result<Vec<usize>> {
            ranks
                .iter()
                .map(|g| {
                    world.global_ranks().iter().position(|w| w == g).ok_or_else(|| {
                        Error::invalid(format!("global rank {g} is not a member of world group {}", world.name()))
                    })
                })
                .collect()
        };
        let mut mine = None;
        // The inner groups get names of their own (`tp_device:0`,
        // `tp_cpu:0`): only the coordinator is `tp:0`, and errors from the
        // inner groups are renamed to it at this boundary (`run`).
        let device_name = format!("{base}_device");
        let cpu_name = format!("{base}_cpu");
        for (g, ranks) in group_ranks.iter().enumerate() {
            let wr = to_world(ranks)?;
            let device = world.new_group(&wr, &device_name)?;
            let cpu = world.new_group(&wr, &cpu_name)?;
            if g == own {
                match (device, cpu) {
                    (Some(device), Some(cpu)) => mine = Some(Groups { cpu, device: DeviceGroup::Cpu(device) }),
                    _ => {
                        return Err(Error::invalid(format!(
                            "new_group did not return a group for member rank {rank} of {ranks:?}"
                        )))
                    }
                }
            }
        }
        let groups = mine.ok_or_else(|| Error::invalid(format!("rank {rank} found no group")))?;
        opts.device.check_supported()?;
        // With a CUDA device, the device group becomes an NCCL communicator
        // of the same ranks: rank 0 makes the unique id and the others get
        // it over the (CPU) device process group. Only members take part,
        // after every group of the list exists.
        #[cfg(feature = "nccl")]
        let groups = match (opts.device, &groups.device) {
            (Device::Cuda(ordinal), DeviceGroup::Cpu(pg)) => {
                let comm = crate::device::NcclComm::new(pg, pg.name(), ordinal)
                    .map_err(|e| e.in_group("nccl init", &unique_name, rank_in_group))?;
                Groups { cpu: groups.cpu, device: DeviceGroup::Nccl(Arc::new(comm)) }
            }
            _ => groups,
        };
        let ranks = group_ranks[own].clone();
        // As the seed: groups that ask for it broadcast objects (and the
        // metadata of tensor dicts) from rank 0 through a shared-memory queue
        // of 6 chunks of 4 MiB; readers on other nodes get them by socket.
        let mq_broadcaster: Option<Arc<dyn ObjectBroadcaster>> = if opts.use_message_queue_broadcaster
            && groups.cpu.size() > 1
        {
            let mq =
                MessageQueue::create_from_process_group(&groups.cpu, DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_CHUNKS, 0)
                    .map_err(|e| e.in_group("create message queue", &unique_name, rank_in_group))?;
            Some(Arc::new(mq))
        } else {
            None
        };
        let device = groups.device.device();
        let coordinator = GroupCoordinator {
            inner: Arc::new(Inner {
                unique_name,
                rank,
                ranks,
                local_rank,
                rank_in_group,
                device,
                groups: RwLock::new(Some(groups)),
                poisoned: Mutex::new(None),
                debug_detail: AtomicBool::new(debug_detail_from_env()),
                calls: AtomicU64::new(0),
                use_message_queue_broadcaster: opts.use_message_queue_broadcaster,
                mq_broadcaster: Mutex::new(mq_broadcaster),
                limits: opts.limits.unwrap_or_else(DecodeLimits::from_env),
            }),
        };
        names.register(&coordinator);
        Ok(coordinator)
    }

    // ----- accessors -------------------------------------------------------

    /// This process's global rank.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }
    /// The members' global ranks, in group order.
    pub fn ranks(&self) -> &[usize] {
        &self.inner.ranks
    }
    /// Number of ranks in the group.
    pub fn world_size(&self) -> usize {
        self.inner.ranks.len()
    }
    /// The local rank (device index on this node).
    pub fn local_rank(&self) -> usize {
        self.inner.local_rank
    }
    /// This rank's position in the group.
    pub fn rank_in_group(&self) -> usize {
        self.inner.rank_in_group
    }
    /// The unique name, e.g. `tp:0`.
    pub fn unique_name(&self) -> &str {
        &self.inner.unique_name
    }
    /// Global rank of the first member.
    pub fn first_rank(&self) -> usize {
        self.inner.ranks[0]
    }
    /// Global rank of the last member.
    pub fn last_rank(&self) -> usize {
        self.inner.ranks[self.inner.ranks.len() - 1]
    }
    /// True on the first member.
    pub fn is_first_rank(&self) -> bool {
        self.rank() == self.first_rank()
    }
    /// True on the last member.
    pub fn is_last_rank(&self) -> bool {
        self.rank() == self.last_rank()
    }
    /// Global rank of the member after this one (wrapping).
    pub fn next_rank(&self) -> usize {
        self.inner.ranks[(self.rank_in_group() + 1) % self.world_size()]
    }
    /// Global rank of the member before this one (wrapping).
    pub fn prev_rank(&self) -> usize {
        let n = self.world_size();
        self.inner.ranks[(self.rank_in_group() + n - 1) % n]
    }
    /// The CPU group (metadata, objects, barriers).
    pub fn cpu_group(&self) -> Result<ProcessGroup> {
        Ok(self.groups()?.cpu)
    }
    /// The device group (tensors): [`DeviceGroup::Cpu`], or an NCCL group.
    pub fn device_group(&self) -> Result<DeviceGroup> {
        Ok(self.groups()?.device)
    }
    /// The device this group's tensors live on (the seed's `self.device`):
    /// [`Device::Cpu`], or `cuda:N` for an NCCL group.
    pub fn device(&self) -> Device {
        self.inner.device
    }
    /// Why the group is unusable, once an error poisoned it.
    pub fn poisoned(&self) -> Option<String> {
        self.inner.poisoned.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Whether objects and tensor-dict metadata go through the shared-memory
    /// message queue (the group asked for one and has more than one rank).
    pub fn uses_message_queue_broadcaster(&self) -> bool {
        self.inner.use_message_queue_broadcaster
            && self.inner.mq_broadcaster.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
    /// True after [`GroupCoordinator::destroy`].
    pub fn is_destroyed(&self) -> bool {
        self.inner.groups.read().unwrap_or_else(|e| e.into_inner()).is_none()
    }
    /// Whether debug-detail mismatch checks are on.
    pub fn debug_detail(&self) -> bool {
        self.inner.debug_detail.load(Ordering::Relaxed)
    }
    /// Turns debug-detail mismatch checks on or off. Every rank of the group
    /// must make the same choice before its next operation.
    pub fn set_debug_detail(&self, on: bool) {
        self.inner.debug_detail.store(on, Ordering::Relaxed)
    }
    /// The decode limits applied to what peers send.
    pub fn limits(&self) -> DecodeLimits {
        self.inner.limits
    }

    /// The groups, or why they cannot be used (destroyed, poisoned).
    fn groups(&self) -> Result<Groups> {
        let g = self
            .inner
            .groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Error::Destroyed(format!("group {} was destroyed", self.inner.unique_name)))?;
        if let Some(cause) = self.poisoned() {
            return Err(Error::Poisoned { group: self.inner.unique_name.clone(), cause });
        }
        Ok(g)
    }

    /// Runs one operation: `f` gets the groups; its error is renamed to this
    /// coordinator's group and `op`, and poisons the coordinator when it is
    /// of a poisoning kind.
    fn run<R>(&self, op: CoordOp, f: impl FnOnce(&Groups) -> Result<R>) -> Result<R> {
        let g = self.groups()?;
        f(&g).map_err(|e| self.fail(op.name(), e))
    }

    fn fail(&self, op: &str, e: Error) -> Error {
        let e = e.in_group(op, self.unique_name(), self.rank_in_group());
        if e.poisons_group() {
            let mut p = self.inner.poisoned.lock().unwrap_or_else(|e| e.into_inner());
            if p.is_none() {
                *p = Some(e.to_string());
            }
        }
        e
    }

    fn ctx(&self, op: CoordOp) -> Context {
        Context::new(op.name(), self.unique_name(), self.rank_in_group())
    }

    fn check_rank(&self, op: CoordOp, what: &str, r: usize) -> Result<()> {
        if r >= self.world_size() {
            return Err(Error::invalid(format!(
                "{}: invalid {what} rank ({r}) for group {} of size {}; expected 0 <= {what} < {}",
                op.name(),
                self.unique_name(),
                self.world_size(),
                self.world_size()
            )));
        }
        Ok(())
    }

    fn check_peer(&self, op: CoordOp, what: &str, r: usize) -> Result<()> {
        self.check_rank(op, what, r)?;
        if r == self.rank_in_group() {
            return Err(Error::invalid(format!(
                "{}: invalid {what} rank ({r}): it is this rank's own position in group {}; expected another rank",
                op.name(),
                self.unique_name()
            )));
        }
        Ok(())
    }

    // ----- debug-detail checks ---------------------------------------------

    fn next_fingerprint(&self, op: CoordOp) -> Fingerprint {
        Fingerprint::new(op, self.inner.calls.fetch_add(1, Ordering::Relaxed))
    }

    /// All-gathers `fp` on the CPU group and fails on any difference.
    fn check_collective(&self, g: &Groups, op: CoordOp, build: impl FnOnce(Fingerprint) -> Fingerprint) -> Result<()> {
        if !self.debug_detail() {
            return Ok(());
        }
        let fp = build(self.next_fingerprint(op));
        let n = self.world_size();
        let mut all = vec![0u8; n * FP_BYTES];
        g.cpu.all_gather_bytes(&fp.encode(), &mut all)?;
        let fps: Vec<Fingerprint> = all
            .chunks_exact(FP_BYTES)
            .map(|c| {
                let mut a = [0u8; FP_BYTES];
                a.copy_from_slice(c);
                Fingerprint::decode(&a)
            })
            .collect();
        match fingerprint::compare(&fps, self.rank_in_group()) {
            None => Ok(()),
            Some((peer, detail)) => Err(Error::Mismatch {
                ctx: self.ctx(op).with_peer(peer),
                detail: format!("{detail} (group {}, global ranks {:?})", self.unique_name(), self.ranks()),
            }),
        }
    }

    /// Point-to-point check: the sender sends its fingerprint, the receiver
    /// compares it with its own call.
    fn check_p2p(
        &self,
        g: &Groups,
        op: CoordOp,
        peer: usize,
        sending: bool,
        build: impl FnOnce(Fingerprint) -> Fingerprint,
    ) -> Result<()> {
        if !self.debug_detail() {
            return Ok(());
        }
        let fp = build(Fingerprint::new(op, 0));
        if sending {
            return g.cpu.send_bytes(&fp.encode(), peer);
        }
        let mut buf = [0u8; FP_BYTES];
        g.cpu.recv_bytes(&mut buf, peer)?;
        let theirs = Fingerprint::decode(&buf);
        match fingerprint::compare_p2p(&fp, self.rank_in_group(), &theirs, peer) {
            None => Ok(()),
            Some(detail) => Err(Error::Mismatch {
                ctx: self.ctx(op).with_peer(peer),
                detail: format!("{detail} (group {}, global ranks {:?})", self.unique_name(), self.ranks()),
            }),
        }
    }

    // ----- tensors ---------------------------------------------------------

    /// Sums `input` over the group and returns it (in place; the seed's
    /// `all_reduce`). A group of one returns `input` untouched.
    pub fn all_reduce(&self, input: Tensor) -> Result<Tensor> {
        self.all_reduce_with(input, ReduceOp::Sum)
    }

    /// [`GroupCoordinator::all_reduce`] with another reduction.
    pub fn all_reduce_with(&self, mut input: Tensor, op: ReduceOp) -> Result<Tensor> {
        self.all_reduce_in_place(&mut input, op)?;
        Ok(input)
    }

    /// Reduces `tensor` over the group in place (the seed's
    /// `inplace_all_reduce` body). A group of one leaves it untouched.
    pub fn all_reduce_in_place(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let cop = CoordOp::AllReduce;
        self.run(cop, |g| {
            self.check_collective(g, cop, |f| f.tensor(tensor.dtype(), tensor.shape()).arg(op_index(op)))?;
            g.device.all_reduce(tensor, op)
        })
    }

    /// Gathers every rank's `input` along `dim` (negative counts from the
    /// end): the output's `dim` is `world_size` times longer, in rank order.
    /// A group of one returns a copy of `input`.
    pub fn all_gather(&self, input: &Tensor, dim: isize) -> Result<Tensor> {
        let n = self.world_size();
        if n == 1 {
            return Ok(input.clone());
        }
        let d = normalize_dim(dim, input.shape())?;
        let op = CoordOp::AllGather;
        self.run(op, |g| {
            // The normalized dim, so that -1 and ndim - 1 compare equal.
            self.check_collective(g, op, |f| f.tensor(input.dtype(), input.shape()).arg(d as i64))?;
            let mut out = Tensor::zeros_on(stacked_shape(n, input.shape()), input.dtype(), input.device())?;
            g.device.all_gather(input, &mut out)?;
            out.unstack_into_dim(d)
        })
    }

    /// Gathers every rank's `input` along `dim` on group rank `dst`, which
    /// gets `Some`; the others get `None`. A group of one returns a copy.
    pub fn gather(&self, input: &Tensor, dst: usize, dim: isize) -> Result<Option<Tensor>> {
        let n = self.world_size();
        if n == 1 {
            return Ok(Some(input.clone()));
        }
        let d = normalize_dim(dim, input.shape())?;
        let op = CoordOp::Gather;
        self.check_rank(op, "dst", dst)?;
        self.run(op, |g| {
            self.check_collective(g, op, |f| f.tensor(input.dtype(), input.shape()).arg(dst as i64).arg2(d as i32))?;
            if self.rank_in_group() == dst {
                let mut out = Tensor::zeros_on(stacked_shape(n, input.shape()), input.dtype(), input.device())?;
                g.device.gather(input, Some(&mut out), dst)?;
                Ok(Some(out.unstack_into_dim(d)?))
            } else {
                g.device.gather(input, None, dst)?;
                Ok(None)
            }
        })
    }

    /// Broadcasts `input` from group rank `src` (every rank passes a tensor
    /// of the same shape and dtype) and returns it.
    pub fn broadcast(&self, mut input: Tensor, src: usize) -> Result<Tensor> {
        let op = CoordOp::Broadcast;
        self.check_rank(op, "src", src)?;
        if self.world_size() == 1 {
            return Ok(input);
        }
        self.run(op, |g| {
            self.check_collective(g, op, |f| f.tensor(input.dtype(), input.shape()).arg(src as i64))?;
            g.device.broadcast(&mut input, src)
        })?;
        Ok(input)
    }

    /// Sums every rank's `input` on group rank `dst`, which gets `Some`; the
    /// others get `None`. A group of one returns `Some(input)`.
    pub fn reduce(&self, input: Tensor, dst: usize) -> Result<Option<Tensor>> {
        self.reduce_with(input, dst, ReduceOp::Sum)
    }

    /// [`GroupCoordinator::reduce`] with another reduction.
    pub fn reduce_with(&self, mut input: Tensor, dst: usize, op: ReduceOp) -> Result<Option<Tensor>> {
        let cop = CoordOp::Reduce;
        self.check_rank(cop, "dst", dst)?;
        if self.world_size() == 1 {
            return Ok(Some(input));
        }
        self.run(cop, |g| {
            self.check_collective(g, cop, |f| {
                f.tensor(input.dtype(), input.shape()).arg(dst as i64).arg2(op_index(op) as i32)
            })?;
            g.device.reduce(&mut input, op, dst)
        })?;
        Ok((self.rank_in_group() == dst).then_some(input))
    }

    /// Sums `input` over the group and leaves each rank its block of `dim`
    /// (negative counts from the end): `dim` splits into `world_size` equal
    /// blocks and rank `i` gets the reduced block `i`, so the output's `dim`
    /// is `world_size` times shorter (vLLM's `reduce_scatter`). A group of
    /// one returns a copy.
    pub fn reduce_scatter(&self, input: &Tensor, dim: isize) -> Result<Tensor> {
        self.reduce_scatter_with(input, dim, ReduceOp::Sum)
    }

    /// [`GroupCoordinator::reduce_scatter`] with another reduction.
    pub fn reduce_scatter_with(&self, input: &Tensor, dim: isize, op: ReduceOp) -> Result<Tensor> {
        let cop = CoordOp::ReduceScatter;
        let n = self.world_size();
        let d = normalize_dim(dim, input.shape())?;
        self.check_split(cop, input.shape(), d)?;
        if n == 1 {
            return Ok(input.clone());
        }
        self.run(cop, |g| {
            self.check_collective(g, cop, |f| {
                f.tensor(input.dtype(), input.shape()).arg(d as i64).arg2(op_index(op) as i32)
            })?;
            // Blocks of `dim` are contiguous once `dim` is the leading one.
            let moved = if d == 0 { input.clone() } else { input.movedim(d as isize, 0)? };
            let mut shape = moved.shape().to_vec();
            shape[0] /= n;
            let mut out = Tensor::zeros_on(shape, input.dtype(), input.device())?;
            g.device.reduce_scatter(&moved, &mut out, op)?;
            if d == 0 {
                Ok(out)
            } else {
                out.movedim(0, d as isize)
            }
        })
    }

    /// Exchanges blocks between all ranks: `scatter_dim` of `input` splits
    /// into `world_size` equal blocks, block `j` goes to rank `j`, and the
    /// blocks received from ranks `0..world_size` are concatenated along
    /// `gather_dim` (negative dims count from the end). With
    /// `scatter_dim == gather_dim` the shape is unchanged. A group of one
    /// returns a copy.
    pub fn all_to_all(&self, input: &Tensor, scatter_dim: isize, gather_dim: isize) -> Result<Tensor> {
        let op = CoordOp::AllToAll;
        let n = self.world_size();
        let s = normalize_dim(scatter_dim, input.shape())?;
        let gd = normalize_dim(gather_dim, input.shape())?;
        self.check_split(op, input.shape(), s)?;
        if n == 1 {
            return Ok(input.clone());
        }
        self.run(op, |g| {
            self.check_collective(g, op, |f| f.tensor(input.dtype(), input.shape()).arg(s as i64).arg2(gd as i32))?;
            let moved = if s == 0 { input.clone() } else { input.movedim(s as isize, 0)? };
            let mut out = Tensor::zeros_on(moved.shape().to_vec(), input.dtype(), input.device())?;
            g.device.all_to_all(&moved, &mut out)?;
            // Received: block i (from rank i) is out[i*c..(i+1)*c] in the
            // moved layout. As (n, c, rest...), move the block's own leading
            // dimension back to `scatter_dim`, then stack along `gather_dim`.
            let mut split = vec![n, moved.shape()[0] / n];
            split.extend_from_slice(&moved.shape()[1..]);
            let stacked = out.into_shape(split)?;
            let stacked = if s == 0 { stacked } else { stacked.movedim(1, s as isize + 1)? };
            stacked.unstack_into_dim(gd)
        })
    }

    fn check_split(&self, op: CoordOp, shape: &[usize], d: usize) -> Result<()> {
        let n = self.world_size();
        if shape[d] % n != 0 {
            return Err(Error::invalid(format!(
                "{}: dim {d} of shape {shape:?} has size {}, which does not split into {n} equal blocks for group {}",
                op.name(),
                shape[d],
                self.unique_name()
            )));
        }
        Ok(())
    }

    /// Sends `tensor` to group rank `dst` (default: the next rank).
    pub fn send(&self, tensor: &Tensor, dst: Option<usize>) -> Result<()> {
        let dst = dst.unwrap_or((self.rank_in_group() + 1) % self.world_size());
        let op = CoordOp::Send;
        self.check_peer(op, "dst", dst)?;
        self.run(op, |g| {
            self.check_p2p(g, op, dst, true, |f| f.tensor(tensor.dtype(), tensor.shape()))?;
            if tensor.nbytes() > 0 {
                g.device.send(tensor, dst)?;
            }
            Ok(())
        })
    }

    /// Receives a tensor of `shape` and `dtype` from group rank `src`
    /// (default: the previous rank).
    pub fn recv(&self, shape: &[usize], dtype: DType, src: Option<usize>) -> Result<Tensor> {
        let n = self.world_size();
        let src = src.unwrap_or((self.rank_in_group() + n - 1) % n);
        let op = CoordOp::Recv;
        self.check_peer(op, "src", src)?;
        let mut t = Tensor::zeros_on(shape.to_vec(), dtype, self.device())?;
        self.run(op, |g| {
            self.check_p2p(g, op, src, false, |f| f.tensor(dtype, shape))?;
            if t.nbytes() > 0 {
                g.device.recv(&mut t, src)?;
            }
            Ok(())
        })?;
        Ok(t)
    }

    /// Blocks until every rank of the group reached the barrier (CPU group).
    pub fn barrier(&self) -> Result<()> {
        let op = CoordOp::Barrier;
        self.run(op, |g| {
            self.check_collective(g, op, |f| f)?;
            g.cpu.barrier()
        })
    }

    // ----- objects ---------------------------------------------------------

    /// Broadcasts bytes from `src` over the CPU group (or the message queue).
    fn broadcast_blob(&self, g: &Groups, data: Option<Vec<u8>>, src: usize, op: CoordOp) -> Result<Vec<u8>> {
        let mq = self.inner.mq_broadcaster.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(mq) = mq {
            if src != 0 {
                return Err(Error::invalid(format!(
                    "{}: the message queue broadcaster of group {} only supports src = 0, got {src}",
                    op.name(),
                    self.unique_name()
                )));
            }
            // Every message carries the writer's operation in a trailer, so
            // a reader in another operation fails with a mismatch instead of
            // decoding the wrong bytes.
            let data = data.map(|mut d| {
                d.extend_from_slice(&mq_trailer(op));
                d
            });
            let mut bytes = mq.broadcast_bytes(data)?;
            let at = bytes.len().checked_sub(MQ_TRAILER_LEN).ok_or_else(|| {
                Error::protocol(self.ctx(op).with_peer(0), "message queue message without its operation trailer")
            })?;
            let trailer: [u8; MQ_TRAILER_LEN] = bytes[at..].try_into().unwrap_or([0; MQ_TRAILER_LEN]);
            bytes.truncate(at);
            if trailer == mq_trailer(op) {
                return Ok(bytes);
            }
            let theirs = (trailer[..3] == MQ_TRAILER_MAGIC).then(|| CoordOp::from_code(trailer[3])).flatten();
            return Err(match theirs {
                Some(w) => Error::Mismatch {
                    ctx: self.ctx(op).with_peer(0),
                    detail: format!(
                        "rank 0 (the message queue's writer) called {}, rank {} called {}",
                        w.name(),
                        self.rank_in_group(),
                        op.name()
                    ),
                },
                None => Error::protocol(self.ctx(op).with_peer(0), "message queue message with a bad trailer"),
            });
        }
        wire::broadcast_blob(&g.cpu, data, src, &self.inner.limits)
    }

    /// Broadcasts an object from group rank `src`, which passes `Some(obj)`;
    /// every rank returns the source's value.
    pub fn broadcast_object<T: Serialize + DeserializeOwned>(&self, obj: Option<T>, src: usize) -> Result<T> {
        let op = CoordOp::BroadcastObject;
        self.check_rank(op, "src", src)?;
        let missing = || {
            Error::invalid(format!(
                "broadcast_object: the src rank ({src}) of group {} must pass Some(object)",
                self.unique_name()
            ))
        };
        if self.world_size() == 1 {
            return obj.ok_or_else(missing);
        }
        if obj.is_none() && self.rank_in_group() == src {
            return Err(missing());
        }
        self.run(op, |g| {
            self.check_collective(g, op, |f| f.arg(src as i64))?;
            if self.inner.mq_broadcaster.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
                // One blob broadcast: on shared memory encoded straight into
                // the segment and decoded straight out of it.
                return match obj {
                    Some(obj) if self.rank_in_group() == src => {
                        g.cpu.broadcast_object(Some(&obj), src, &self.inner.limits)?;
                        Ok(obj)
                    }
                    _ => g
                        .cpu
                        .broadcast_object::<T>(None, src, &self.inner.limits)
                        .map_err(|e| self.at_peer(e, op, src))?
                        .ok_or_else(|| {
                            self.at_peer(Error::protocol(Context::op(op.name()), "no object came back"), op, src)
                        }),
                };
            }
            if let (true, Some(obj)) = (self.rank_in_group() == src, obj) {
                self.broadcast_blob(g, Some(codec::encode_object(&obj)?), src, op)?;
                Ok(obj)
            } else {
                let bytes = self.broadcast_blob(g, None, src, op).map_err(|e| self.at_peer(e, op, src))?;
                codec::decode_object(&bytes).map_err(|e| self.at_peer(e, op, src))
            }
        })
    }

    /// Broadcasts a list of objects from group rank `src` into `obj_list` on
    /// every rank; all ranks pass lists of the same length.
    pub fn broadcast_object_list<T: Serialize + DeserializeOwned>(&self, obj_list: &mut [T], src: usize) -> Result<()> {
        let op = CoordOp::BroadcastObjectList;
        self.check_rank(op, "src", src)?;
        if self.world_size() == 1 {
            return Ok(());
        }
        let len = obj_list.len();
        self.run(op, |g| {
            self.check_collective(g, op, |f| f.arg(src as i64).arg2(len.min(i32::MAX as usize) as i32))?;
            if self.rank_in_group() == src {
                return g.cpu.broadcast_blob(BlobRole::Send(&mut codec::Encoder(&*obj_list)), src);
            }
            let mut got: Vec<T> = Vec::new();
            let mut read = |bytes: &[u8]| {
                got = codec::decode_object(bytes)?;
                Ok(())
            };
            let limit = usize::try_from(self.inner.limits.max_object_bytes).unwrap_or(usize::MAX);
            g.cpu
                .broadcast_blob(BlobRole::Receive { limit, read: &mut read }, src)
                .map_err(|e| self.at_peer(e, op, src))?;
            if got.len() != len {
                return Err(Error::invalid(format!(
                    "broadcast_object_list: src rank {src} sent {} objects but this rank's list holds {len}; \
                     expected lists of equal length",
                    got.len()
                )));
            }
            for (slot, v) in obj_list.iter_mut().zip(got) {
                *slot = v;
            }
            Ok(())
        })
    }

    /// Sends an object to group rank `dst`: its size, then its bytes, over
    /// the CPU group. `dst` must be another rank of the group.
    pub fn send_object<T: Serialize + ?Sized>(&self, obj: &T, dst: usize) -> Result<()> {
        let op = CoordOp::SendObject;
        self.check_peer(op, "dst", dst)?;
        self.run(op, |g| {
            self.check_p2p(g, op, dst, true, |f| f)?;
            wire::send_blob(&g.cpu, &codec::encode_object(obj)?, dst)
        })
    }

    /// Receives an object sent by group rank `src` with
    /// [`GroupCoordinator::send_object`].
    pub fn recv_object<T: DeserializeOwned>(&self, src: usize) -> Result<T> {
        let op = CoordOp::RecvObject;
        self.check_peer(op, "src", src)?;
        self.run(op, |g| {
            self.check_p2p(g, op, src, false, |f| f)?;
            let bytes = wire::recv_blob(&g.cpu, src, &self.inner.limits)?;
            codec::decode_object(&bytes).map_err(|e| self.at_peer(e, op, src))
        })
    }

    // ----- tensor dicts ----------------------------------------------------

    /// A zeroed tensor for metadata declared by group rank `peer`; refusals
    /// (an unsupported device, a size that does not fit in memory) name the
    /// peer and the size.
    fn build_tensor(&self, m: &crate::tensor::TensorMetadata, op: CoordOp, peer: usize) -> Result<Tensor> {
        // A device tensor lands on this group's device (the sender's index
        // is its own business), as the seed allocates on `self.device`.
        let device = match (m.device, self.device()) {
            (Device::Cuda(_), mine @ Device::Cuda(_)) => mine,
            (d, _) => d,
        };
        Tensor::zeros_on(m.shape.clone(), m.dtype, device).map_err(|e| match e {
            Error::Unsupported(d) => Error::Unsupported(format!(
                "{} in group {} (tensor declared by peer rank {peer}): {d}",
                op.name(),
                self.unique_name()
            )),
            other => self.at_peer(other, op, peer),
        })
    }

    /// Broadcasts a tensor dict from group rank `src` (which passes `Some`):
    /// its metadata as one object, then each non-empty tensor. Every rank
    /// returns the dict. A group of one returns a copy of `tensor_dict`.
    /// Host tensors travel over the CPU group and device tensors over the
    /// device group, as in the seed.
    pub fn broadcast_tensor_dict(&self, tensor_dict: Option<&TensorDict>, src: usize) -> Result<TensorDict> {
        let op = CoordOp::BroadcastTensorDict;
        let missing = || {
            Error::invalid(format!(
                "broadcast_tensor_dict: the src rank ({src}) of group {} must pass Some(tensor dict)",
                self.unique_name()
            ))
        };
        if self.world_size() == 1 {
            return tensor_dict.cloned().ok_or_else(missing);
        }
        self.check_rank(op, "src", src)?;
        let is_src = self.rank_in_group() == src;
        if is_src {
            for t in tensor_dict.ok_or_else(missing)?.tensors() {
                self.check_dict_tensor(t)?;
            }
        }
        self.run(op, |g| {
            self.check_collective(g, op, |f| f.arg(src as i64))?;
            if let (true, Some(dict)) = (is_src, tensor_dict) {
                let (meta, _) = codec::encode_dict_metadata(dict)?;
                self.broadcast_blob(g, Some(meta), src, op)?;
                let mut out = dict.clone();
                for (_, v) in out.iter_mut() {
                    if let TensorDictValue::Tensor(t) = v {
                        if t.numel() > 0 {
                            broadcast_dict_tensor(g, t, src)?;
                        }
                    }
                }
                return Ok(out);
            }
            let bytes = self.broadcast_blob(g, None, src, op).map_err(|e| self.at_peer(e, op, src))?;
            let meta = codec::decode_metadata(&bytes, &self.inner.limits).map_err(|e| self.at_peer(e, op, src))?;
            let mut out = TensorDict::new();
            for (key, entry) in meta {
                match entry {
                    MetadataEntry::Tensor(m) => {
                        let mut t = self.build_tensor(&m, op, src)?;
                        if t.numel() > 0 {
                            broadcast_dict_tensor(g, &mut t, src)?;
                        }
                        out.insert(key, t);
                    }
                    MetadataEntry::Value(v) => {
                        out.insert(key, v);
                    }
                }
            }
            Ok(out)
        })
    }

    /// Sends a tensor dict to group rank `dst` (default: the next rank):
    /// metadata, then each non-empty tensor. With an `all_gather_group` of
    /// size `k`, a tensor whose element count divides by `k` is sent as this
    /// rank's `1/k` slice of `reshape(k, -1)`; the receivers rebuild it with
    /// `all_gather`. A group of one sends nothing.
    pub fn send_tensor_dict(
        &self,
        tensor_dict: &TensorDict,
        dst: Option<usize>,
        all_gather_group: Option<&GroupCoordinator>,
    ) -> Result<()> {
        let op = CoordOp::SendTensorDict;
        if self.world_size() == 1 {
            return Ok(());
        }
        let (k, r) = all_gather_group.map_or((1, 0), |a| (a.world_size(), a.rank_in_group()));
        let dst = dst.unwrap_or((self.rank_in_group() + 1) % self.world_size());
        self.check_peer(op, "dst", dst)?;
        for t in tensor_dict.tensors() {
            self.check_dict_tensor(t)?;
        }
        self.run(op, |g| {
            self.check_p2p(g, op, dst, true, |f| f)?;
            let (meta, tensors) = codec::encode_dict_metadata(tensor_dict)?;
            wire::send_blob(&g.cpu, &meta, dst)?;
            for t in tensors {
                if t.numel() == 0 {
                    continue;
                }
                if !t.is_cpu() {
                    // Device tensors go through the device group; a slice
                    // for the all-gather group is cut via host memory.
                    if all_gather_group.is_some() && t.numel() % k == 0 {
                        let part = t.reshape(&[k as isize, -1])?.select(0, r)?;
                        g.device.send(&part, dst)?;
                    } else {
                        g.device.send(t, dst)?;
                    }
                    continue;
                }
                let bytes = t.as_bytes()?;
                if all_gather_group.is_some() && t.numel() % k == 0 {
                    let part = bytes.len() / k;
                    g.cpu.send_bytes(&bytes[r * part..(r + 1) * part], dst)?;
                } else {
                    g.cpu.send_bytes(bytes, dst)?;
                }
            }
            Ok(())
        })
    }

    /// Receives a tensor dict sent with [`GroupCoordinator::send_tensor_dict`]
    /// by group rank `src` (default: the previous rank), passing the same
    /// `all_gather_group` as the sender. A group of one returns `None`.
    pub fn recv_tensor_dict(
        &self,
        src: Option<usize>,
        all_gather_group: Option<&GroupCoordinator>,
    ) -> Result<Option<TensorDict>> {
        let op = CoordOp::RecvTensorDict;
        let n = self.world_size();
        if n == 1 {
            return Ok(None);
        }
        let k = all_gather_group.map_or(1, |a| a.world_size());
        let src = src.unwrap_or((self.rank_in_group() + n - 1) % n);
        self.check_peer(op, "src", src)?;
        self.run(op, |g| {
            self.check_p2p(g, op, src, false, |f| f)?;
            let bytes = wire::recv_blob(&g.cpu, src, &self.inner.limits)?;
            let meta = codec::decode_metadata(&bytes, &self.inner.limits).map_err(|e| self.at_peer(e, op, src))?;
            let mut out = TensorDict::new();
            for (key, entry) in meta {
                match entry {
                    MetadataEntry::Tensor(m) => {
                        let mut t = self.build_tensor(&m, op, src)?;
                        if t.numel() > 0 {
                            let on_cpu = t.is_cpu();
                            match all_gather_group {
                                Some(ag) if t.numel() % k == 0 => {
                                    let mut part = Tensor::zeros_on([t.numel() / k], t.dtype(), t.device())
                                        .map_err(|e| self.at_peer(e, op, src))?;
                                    if on_cpu {
                                        g.cpu.recv_bytes(part.as_bytes_mut()?, src)?;
                                    } else {
                                        g.device.recv(&mut part, src)?;
                                    }
                                    t = ag.all_gather(&part, 0)?.into_shape(m.shape.clone())?;
                                }
                                _ if on_cpu => g.cpu.recv_bytes(t.as_bytes_mut()?, src)?,
                                _ => g.device.recv(&mut t, src)?,
                            }
                        }
                        out.insert(key, t);
                    }
                    MetadataEntry::Value(v) => {
                        out.insert(key, v);
                    }
                }
            }
            Ok(Some(out))
        })
    }

    /// Answers, for every rank of this group, whether it shares a node
    /// (shared memory and host name) with group rank `source_rank`.
    pub fn in_the_same_node_as(&self, source_rank: usize) -> Result<Vec<bool>> {
        let g = self.groups()?;
        in_the_same_node_as(&g.cpu, source_rank).map_err(|e| self.fail("in_the_same_node_as", e))
    }

    /// Runs `f` inside a graph capture on this group, as the seed's
    /// `graph_capture` context manager: with `Some(context)` the capture joins
    /// that context (the pipeline group joining the tensor-parallel group's),
    /// otherwise a new one starts. A CPU group has no streams (`None`) and
    /// its collectives run eagerly, as outside. An NCCL group's new context
    /// carries a fresh stream, ordered after the work enqueued so far on the
    /// group's and the device's streams; while `f` runs, this group's device
    /// operations go to the context's stream, and while that stream records
    /// a graph (`GraphCaptureContext::capture`) they only enqueue (no host
    /// wait, no event query). Buffers a captured operation uses must exist
    /// before the capture begins (see `NcclComm::capture_on` in the `device`
    /// module).
    /// The group must not be destroyed.
    pub fn graph_capture<R>(
        &self,
        context: Option<GraphCaptureContext>,
        f: impl FnOnce(&GraphCaptureContext) -> Result<R>,
    ) -> Result<R> {
        let g = self.groups()?;
        let context = match context {
            Some(c) => c,
            None => g.device.new_capture_context().map_err(|e| self.fail("graph_capture", e))?,
        };
        let _route = g.device.route_capture(&context).map_err(|e| self.fail("graph_capture", e))?;
        f(&context)
    }

    /// Releases both groups and the message queue. Later operations fail
    /// with [`Error::Destroyed`] (and [`UniqueNames::lookup`] says so);
    /// accessors keep working. Idempotent.
    pub fn destroy(&self) {
        self.inner.groups.write().unwrap_or_else(|e| e.into_inner()).take();
        self.inner.mq_broadcaster.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// A tensor a tensor dict may carry here: on the host, or on this
    /// group's device.
    fn check_dict_tensor(&self, t: &Tensor) -> Result<()> {
        if t.is_cpu() || t.device() == self.device() {
            return Ok(());
        }
        Err(Error::Unsupported(format!(
            "a tensor on {} in a tensor dict of group {}, whose device is {}",
            t.device(),
            self.unique_name(),
            self.device()
        )))
    }

    /// Attaches this group's context and `peer` to an error about bytes or
    /// sizes that peer sent.
    fn at_peer(&self, e: Error, op: CoordOp, peer: usize) -> Error {
        e.within(self.ctx(op).with_peer(peer))
    }
}

/// One tensor of a broadcast tensor dict: host tensors over the CPU group,
/// device tensors over the device group.
fn broadcast_dict_tensor(g: &Groups, t: &mut Tensor, src: usize) -> Result<()> {
    if t.is_cpu() {
        g.cpu.broadcast_bytes(t.as_bytes_mut()?, src)
    } else {
        g.device.broadcast(t, src)
    }
}

/// `(n, *shape)`.
fn stacked_shape(n: usize, shape: &[usize]) -> Vec<usize> {
    let mut s = Vec::with_capacity(shape.len() + 1);
    s.push(n);
    s.extend_from_slice(shape);
    s
}

/// Position of `op` in [`ReduceOp::ALL`], as fingerprints carry it.
fn op_index(op: ReduceOp) -> i64 {
    ReduceOp::ALL.iter().position(|o| *o == op).unwrap_or(0) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_count_per_name() {
        let n = UniqueNames::new();
        assert_eq!(n.next("tp"), "tp:0");
        assert_eq!(n.next("tp"), "tp:1");
        assert_eq!(n.next("pp"), "pp:0");
    }

    #[test]
    fn group_lists_are_validated() {
        let lists = vec![vec![0, 1], vec![2, 3]];
        assert_eq!(find_own_group(&lists, 4, 3).unwrap(), (1, 1));
        assert!(find_own_group(&lists, 3, 0).unwrap_err().to_string().contains("below the world size 3"));
        assert!(find_own_group(&[vec![0, 0]], 2, 0).is_err());
        assert!(find_own_group(&[vec![0, 1], vec![1]], 2, 1).unwrap_err().to_string().contains("exactly one"));
        assert!(find_own_group(&[vec![0]], 2, 1).unwrap_err().to_string().contains("none of the group lists"));
        assert!(find_own_group(&[vec![]], 2, 1).is_err());
    }
}
