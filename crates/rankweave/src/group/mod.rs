//! Process groups: the members' global ranks, this rank's position, one
//! backend ([`crate::backend`]) and the sequence counters.
//!
//! Files, one concern each: `options` (options and the environment they
//! are read from), this module (the group and its dispatch: each operation
//! is validated once in `crate::validate`, short-circuited for a group of one,
//! then handed to the backend once under the group lock with the next
//! sequence number and a deadline of now plus [`GroupOptions::timeout`]),
//! `node` (node identity), `agree` (how members agree on shared memory)
//! and `factory` (which backend a new group gets).
//!
//! # Backend choice
//! Every CPU group connects a TCP mesh (point-to-point traffic, aborts,
//! fallback). Its collectives use shared memory instead when the resolved
//! [`TransportKind`] allows it and every member runs on this node
//! ([`node_identity`]); all members agree through the store (see `agree`),
//! so a group uses shared memory on every rank or on none. A group spanning
//! nodes runs all_reduce hierarchically (shared memory inside each node,
//! TCP between node leaders) and its other collectives over TCP, and
//! reports [`TransportKind::Tcp`]. [`ProcessGroup::transport_kind`] and
//! [`ProcessGroup::backend_name`] report the outcome.

mod agree;
pub(crate) mod arrive;
mod factory;
mod node;
mod options;

pub use factory::{BackendFactory, CpuFactory, GroupInfo};
pub use node::{in_the_same_node_as, node_identity};
pub use options::{GroupOptions, TransportKind, TRANSPORT_ENV};

use crate::backend::{Backend, BlobRole, Call, Communicator, Link};
use crate::collectives::shm::ShmBuf;
use crate::collectives::Comm;
use crate::dtype::{DType, Element};
use crate::error::{Context, Error, Result};
use crate::reduce::ReduceOp;
use crate::store::{PrefixStore, SharedStore};
use crate::tensor::codec;
use crate::tensor::DecodeLimits;
use crate::transport::tcp::group_id_of;
use crate::transport::{OpCode, OpDesc, Transport};
use crate::validate::Check;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// A group of ranks that run collectives together. Cheap to clone.
///
/// Operations on one group are serialized by a lock inside it; different
/// groups are independent and may run at once from different threads. After
/// an operation fails with a timeout, a lost peer, a mismatch or an I/O error
/// the group is poisoned (every member is told, see
/// [`crate::transport::tcp`]): later calls return [`Error::Poisoned`]; drop
/// or [`ProcessGroup::destroy`] it and build a new one.
///
/// ```
/// use rankweave::{GroupOptions, HashStore, ProcessGroup, ReduceOp, SharedStore};
/// use std::sync::Arc;
///
/// // Two ranks as threads meeting at an in-process store.
/// let store: SharedStore = Arc::new(HashStore::new());
/// let ranks: Vec<_> = (0..2)
///     .map(|rank: usize| {
///         let store = store.clone();
///         std::thread::spawn(move || -> rankweave::Result<()> {
///             let world = ProcessGroup::new_world(store, rank, 2, GroupOptions::default())?;
///             let mut x = [rank as f32 + 1.0; 4];
///             world.all_reduce(&mut x, ReduceOp::Sum)?;
///             assert_eq!(x, [3.0; 4]);
///             let pair = world.new_group(&[1, 0], "pair")?.expect("every rank is a member");
///             assert_eq!((pair.name(), pair.rank()), ("pair:0", 1 - rank));
///             Ok(())
///         })
///     })
///     .collect();
/// for r in ranks {
///     r.join().unwrap()?;
/// }
/// # Ok::<(), rankweave::Error>(())
/// ```
#[derive(Clone)]
pub struct ProcessGroup {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    /// Store namespace of this group; its hash is the wire group id.
    namespace: String,
    rank: usize,
    size: usize,
    global_ranks: Vec<usize>,
    /// The un-namespaced store every group of the world shares.
    root: SharedStore,
    store: SharedStore,
    opts: GroupOptions,
    /// What the collectives actually use (never `Auto`).
    kind: TransportKind,
    backend_name: &'static str,
    link: Arc<dyn Link>,
    factory: Arc<dyn BackendFactory>,
    state: Mutex<OpState>,
    /// Whether the backend broadcasts blobs itself
    /// ([`Communicator::has_blob_broadcast`]).
    blob_direct: bool,
    /// The buffer of [`ProcessGroup::broadcast_blob`], kept across calls (a
    /// fresh one of a MiB or more pays a page fault per 4 KiB each time).
    blob: Mutex<Vec<u8>>,
    /// Why the group is unusable, once an operation failed or it was destroyed.
    poison: OnceLock<String>,
    /// Subgroups created from this group so far (by every caller, members or not).
    children: AtomicU64,
    /// Unique-name counters, one registry per world instance.
    names: Arc<Mutex<HashMap<String, u64>>>,
}

struct OpState {
    seq: u64,
    send_seq: Vec<u64>,
    recv_seq: Vec<u64>,
    comm: Box<dyn Communicator>,
    /// Scratch of [`ProcessGroup::with_comm`].
    scratch: Vec<u8>,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("name", &self.inner.name)
            .field("rank", &self.inner.rank)
            .field("size", &self.inner.size)
            .field("global_ranks", &self.inner.global_ranks)
            .field("backend", &self.inner.backend_name)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves counters consistent (they are
    // bumped before any I/O), and a panicking operation closes the group,
    // so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The length word of a two-broadcast blob whose root failed to make it.
const BLOB_FAILED_LEN: u64 = u64::MAX;
/// Largest blob buffer a group keeps for the next call.
const BLOB_KEEP_MAX: usize = 64 << 20;

/// Puts `scratch` back as the group's blob buffer unless it grew too big.
fn keep_blob(slot: &Mutex<Vec<u8>>, scratch: Vec<u8>) {
    if scratch.capacity() <= BLOB_KEEP_MAX {
        *lock(slot) = scratch;
    }
}

/// Which counter an operation's sequence number comes from.
enum Seq {
    Collective,
    SendTo(usize),
    RecvFrom(usize),
}

impl ProcessGroup {
    #[allow(clippy::too_many_arguments)]
    fn build(
        name: String,
        namespace: String,
        rank: usize,
        global_ranks: Vec<usize>,
        root: SharedStore,
        opts: GroupOptions,
        names: Arc<Mutex<HashMap<String, u64>>>,
        factory: Arc<dyn BackendFactory>,
    ) -> Result<ProcessGroup> {
        let mut opts = opts;
        opts.transport = TransportKind::resolve_from_env(opts.transport)?;
        let size = global_ranks.len();
        let store: SharedStore = Arc::new(PrefixStore::new(namespace.clone(), root.clone()));
        let info = GroupInfo {
            name: &name,
            rank,
            size,
            global_ranks: &global_ranks,
            store: store.clone(),
            group_id: group_id_of(&namespace),
            opts: &opts,
        };
        let Backend { comm, link, kind } = factory.build(&info)?;
        let backend_name = comm.name();
        let blob_direct = comm.has_blob_broadcast();
        tracing::debug!(group = %name, rank, size, transport = %kind, backend = backend_name, "group ready");
        Ok(ProcessGroup {
            inner: Arc::new(Inner {
                name,
                namespace,
                rank,
                size,
                global_ranks,
                root,
                store,
                opts,
                kind,
                backend_name,
                link,
                factory,
                state: Mutex::new(OpState {
                    seq: 0,
                    send_seq: vec![0; size],
                    recv_seq: vec![0; size],
                    comm,
                    scratch: Vec::new(),
                }),
                blob_direct,
                blob: Mutex::new(Vec::new()),
                poison: OnceLock::new(),
                children: AtomicU64::new(0),
                names,
            }),
        })
    }

    /// Builds the world group: every rank calls it with the same store and
    /// world size and its own rank.
    ///
    /// The world is named `world:N`, where `N` counts the worlds this rank
    /// built on this store before (so normally `world:0`); its keys live under
    /// `rankweave/world:N/` in the store. Connects the full mesh before
    /// returning (a world of one opens no socket).
    pub fn new_world(store: SharedStore, rank: usize, world_size: usize, opts: GroupOptions) -> Result<ProcessGroup> {
        ProcessGroup::new_world_with(Arc::new(CpuFactory), store, rank, world_size, opts)
    }

    /// [`ProcessGroup::new_world`] with the backends `factory` builds (for
    /// the world and every subgroup created from it).
    pub fn new_world_with(
        factory: Arc<dyn BackendFactory>,
        store: SharedStore,
        rank: usize,
        world_size: usize,
        opts: GroupOptions,
    ) -> Result<ProcessGroup> {
        if world_size == 0 {
            return Err(Error::invalid("new_world: world_size must be at least 1, got 0"));
        }
        if rank >= world_size {
            return Err(Error::invalid(format!("new_world: rank {rank} is out of range for world_size {world_size}")));
        }
        let generation = store.add(&format!("rankweave/world_gen/{rank}"), 1)? - 1;
        let name = format!("world:{generation}");
        let names = Arc::new(Mutex::new(HashMap::from([("world".to_string(), generation as u64 + 1)])));
        let namespace = format!("rankweave/{name}");
        ProcessGroup::build(name, namespace, rank, (0..world_size).collect(), store, opts, names, factory)
    }

    /// Creates a subgroup. Every member of `self` calls it with the same
    /// `ranks` (ranks of `self`'s numbering, i.e. global ranks for the world)
    /// in the same order; members get `Some`, the others `None`.
    /// `name` prefixes the group's unique name (`tp` -> `tp:0`).
    ///
    /// The unique name counts, per world instance, the groups of that `name`
    /// this rank is a member of (as the seed's `_get_unique_name`), so with
    /// the usual partition into blocks every member of every TP group calls
    /// its group `tp:0`. Group rank `i` is `ranks[i]`.
    ///
    /// As torch's `new_group`, it returns on every rank of `self` only once
    /// every rank of `self` has entered it (and the members have connected),
    /// so a rank that is not a member cannot run ahead and end the job while
    /// others still create their groups.
    pub fn new_group(&self, ranks: &[usize], name: &str) -> Result<Option<ProcessGroup>> {
        let inner = &self.inner;
        if ranks.is_empty() {
            return Err(Error::invalid(format!("new_group {name:?}: ranks must not be empty")));
        }
        let mut seen = vec![false; inner.size];
        for &r in ranks {
            if r >= inner.size {
                return Err(Error::invalid(format!(
                    "new_group {name:?}: rank {r} is out of range for group {} of size {}",
                    inner.name, inner.size
                )));
            }
            if std::mem::replace(&mut seen[r], true) {
                return Err(Error::invalid(format!("new_group {name:?}: rank {r} appears twice in {ranks:?}")));
            }
        }
        let child = inner.children.fetch_add(1, Ordering::Relaxed);
        let Some(my_rank) = ranks.iter().position(|&r| r == inner.rank) else {
            self.enter_all(child, name)?;
            return Ok(None);
        };
        let unique = {
            let mut names = lock(&inner.names);
            let n = names.entry(name.to_string()).or_insert(0);
            *n += 1;
            format!("{name}:{}", *n - 1)
        };
        let namespace = format!("{}/sub{child}", inner.namespace);
        let global_ranks = ranks.iter().map(|&r| inner.global_ranks[r]).collect();
        let group = ProcessGroup::build(
            unique,
            namespace,
            my_rank,
            global_ranks,
            inner.root.clone(),
            inner.opts.clone(),
            inner.names.clone(),
            inner.factory.clone(),
        )?;
        self.enter_all(child, name)?;
        Ok(Some(group))
    }

    /// The synchronization torch's `new_group` gives the seed: every rank of
    /// `self` (members of the new group or not) has finished creating
    /// subgroup `child` before any returns, so no rank runs ahead, finishes
    /// its job and takes the store (hosted by rank 0) away while others
    /// still build their groups through it. Three store requests per rank;
    /// bounded by the group's timeout, naming the ranks that never came.
    fn enter_all(&self, child: u64, name: &str) -> Result<()> {
        let inner = &self.inner;
        if inner.size == 1 {
            return Ok(());
        }
        let base = format!("{}/sub{child}/entered", inner.namespace);
        match arrive::arrive(&*inner.root, &base, inner.rank, inner.size, inner.opts.timeout)? {
            Ok(()) => Ok(()),
            Err(absent) => {
                let mut ctx = crate::error::Context::new("new_group", inner.name.as_str(), inner.rank);
                ctx.peer = absent.ranks.first().copied();
                Err(Error::timeout(
                    ctx,
                    absent.waited,
                    format!(
                        "rank(s) {:?} of {} to create group {name:?} (every rank of the parent group calls \
                         new_group, members or not)",
                        absent.ranks, inner.name
                    ),
                ))
            }
        }
    }

    /// This rank's position in the group.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }
    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.inner.size
    }
    /// This process's global (world) rank.
    pub fn global_rank(&self) -> usize {
        self.inner.global_ranks[self.inner.rank]
    }
    /// The members' global ranks, in group order.
    pub fn global_ranks(&self) -> &[usize] {
        &self.inner.global_ranks
    }
    /// Unique name, e.g. `world:0`, `tp:1`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    /// The store, namespaced for this group.
    pub fn store(&self) -> SharedStore {
        self.inner.store.clone()
    }
    /// Per-operation deadline.
    pub fn timeout(&self) -> Duration {
        self.inner.opts.timeout
    }
    /// The transport collectives use in this group: [`TransportKind::Shm`]
    /// or [`TransportKind::Tcp`], never `Auto` (see the module docs for how
    /// it is chosen). A group of one reports `Shm` unless TCP was forced.
    /// Point-to-point traffic ([`ProcessGroup::send_bytes`]) takes the same
    /// way: the segment's per-pair channels in a shared-memory group, TCP
    /// otherwise.
    pub fn transport_kind(&self) -> TransportKind {
        self.inner.kind
    }
    /// The backend's short name: `tcp`, `shm`, `hier`, `mem`, ...
    pub fn backend_name(&self) -> &'static str {
        self.inner.backend_name
    }
    /// The options the group was created with (subgroups inherit them).
    pub fn options(&self) -> &GroupOptions {
        &self.inner.opts
    }
    /// The backend's point-to-point transport, for traffic outside the
    /// group's operations (callers must not interleave it with them); an
    /// error for a backend without one.
    pub fn transport(&self) -> Result<&dyn Transport> {
        self.inner.link.transport().ok_or_else(|| {
            Error::Unsupported(format!(
                "group {}: the {} backend has no point-to-point transport",
                self.inner.name, self.inner.backend_name
            ))
        })
    }
    /// The id carried in every message header of this group.
    pub fn group_id(&self) -> u64 {
        group_id_of(&self.inner.namespace)
    }
    /// Why the group is unusable, once it failed or was destroyed.
    pub fn poisoned(&self) -> Option<&str> {
        self.inner.poison.get().map(String::as_str)
    }
    /// Closes every connection of this group (on every clone); peers still
    /// talking to this rank see it as lost (peers waiting in a shared-memory
    /// collective see it late, at their timeout). Later calls return
    /// [`Error::Poisoned`]. Dropping the last clone closes too.
    pub fn destroy(&self) {
        let _ = self.inner.poison.set("group destroyed".into());
        self.inner.link.close();
    }

    fn check_ready(&self) -> Result<()> {
        match self.inner.poison.get() {
            Some(cause) => Err(Error::Poisoned { group: self.inner.name.clone(), cause: cause.clone() }),
            None => Ok(()),
        }
    }

    fn check(&self, op: &'static str) -> Check<'_> {
        Check { op, group: &self.inner.name, rank: self.inner.rank, size: self.inner.size }
    }

    /// Records a failure: poisons the group and tells the peers.
    fn failed(&self, e: &Error) {
        if e.poisons_group() {
            let _ = self.inner.poison.set(e.to_string());
            self.inner.link.abort(e);
        }
    }

    /// Runs one operation on the backend under the group lock with the next
    /// sequence number and a fresh deadline; a failure poisons the group,
    /// and a panic closes it (the peers are left mid-operation).
    #[inline]
    fn run<R>(&self, seq: Seq, desc: OpDesc, f: impl FnOnce(&mut dyn Communicator, Call) -> Result<R>) -> Result<R> {
        self.check_ready()?;
        let inner = &self.inner;
        let mut state = lock(&inner.state);
        let seq = match seq {
            Seq::Collective => {
                state.seq += 1;
                state.seq
            }
            Seq::SendTo(p) => {
                state.send_seq[p] += 1;
                state.send_seq[p]
            }
            Seq::RecvFrom(p) => {
                state.recv_seq[p] += 1;
                state.recv_seq[p]
            }
        };
        let call = Call { seq, timeout: inner.opts.timeout, desc };
        let guard = CloseOnPanic(inner);
        let res = f(&mut *state.comm, call);
        drop(guard);
        if let Err(e) = &res {
            self.failed(e);
        }
        res
    }

    /// Runs a custom algorithm over the backend's point-to-point transport
    /// as one collective: takes the group lock, advances the sequence number
    /// (every rank counts the same), sets the deadline to now plus the group
    /// timeout and hands `f` a [`Comm`]. A failure poisons the group as for
    /// the built-in operations.
    pub fn with_comm<R>(&self, f: impl FnOnce(&mut Comm<'_>) -> Result<R>) -> Result<R> {
        let transport = self.transport()?;
        self.check_ready()?;
        let inner = &self.inner;
        let mut state = lock(&inner.state);
        state.seq += 1;
        let OpState { seq, scratch, .. } = &mut *state;
        let mut comm =
            Comm { transport, seq: *seq, deadline: Instant::now() + inner.opts.timeout, scratch, desc: OpDesc::NONE };
        let guard = CloseOnPanic(inner);
        let res = f(&mut comm);
        drop(guard);
        if let Err(e) = &res {
            self.failed(e);
        }
        res
    }

    /// In-place all_reduce of `buf` (elements of `dtype`).
    pub fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        self.check("all_reduce").elems(buf.len(), dtype)?;
        self.check_ready()?;
        if self.inner.size == 1 {
            return Ok(());
        }
        let desc = OpDesc::new(OpCode::AllReduce, Some(dtype), Some(op), None, buf.len());
        self.run(Seq::Collective, desc, |c, call| c.all_reduce(call, buf, dtype, op))
    }
    /// In-place broadcast from group rank `root`.
    pub fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.check("broadcast").root(root)?;
        self.check_ready()?;
        if self.inner.size == 1 {
            return Ok(());
        }
        let desc = OpDesc::new(OpCode::Broadcast, None, None, Some(root), buf.len());
        self.run(Seq::Collective, desc, |c, call| c.broadcast(call, buf, root))
    }
    /// `output.len() == size * input.len()`.
    pub fn all_gather_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()> {
        self.check("all_gather").len("output (size x input)", self.inner.size * input.len(), output.len())?;
        self.check_ready()?;
        if self.inner.size == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        let desc = OpDesc::new(OpCode::AllGather, None, None, None, input.len());
        self.run(Seq::Collective, desc, |c, call| c.all_gather(call, input, output))
    }
    /// `output` is `Some` (`size * input.len()` bytes) on root only.
    pub fn gather_bytes(&self, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()> {
        let n = self.inner.size;
        self.check("gather").root_buffer("output", root, output.as_ref().map(|o| o.len()), n * input.len())?;
        self.check_ready()?;
        if n == 1 {
            if let Some(out) = output {
                out.copy_from_slice(input);
            }
            return Ok(());
        }
        let desc = OpDesc::new(OpCode::Gather, None, None, Some(root), input.len());
        self.run(Seq::Collective, desc, |c, call| c.gather(call, input, output, root))
    }
    /// `input` is `Some` (`size * output.len()` bytes) on root only.
    pub fn scatter_bytes(&self, input: Option<&[u8]>, output: &mut [u8], root: usize) -> Result<()> {
        let n = self.inner.size;
        self.check("scatter").root_buffer("input", root, input.map(<[u8]>::len), n * output.len())?;
        self.check_ready()?;
        if n == 1 {
            if let Some(inp) = input {
                output.copy_from_slice(inp);
            }
            return Ok(());
        }
        let desc = OpDesc::new(OpCode::Scatter, None, None, Some(root), output.len());
        self.run(Seq::Collective, desc, |c, call| c.scatter(call, input, output, root))
    }
    /// In place; the result is defined on root only.
    pub fn reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
        let check = self.check("reduce");
        check.root(root)?;
        check.elems(buf.len(), dtype)?;
        self.check_ready()?;
        if self.inner.size == 1 {
            return Ok(());
        }
        let desc = OpDesc::new(OpCode::Reduce, Some(dtype), Some(op), Some(root), buf.len());
        self.run(Seq::Collective, desc, |c, call| c.reduce(call, buf, dtype, op, root))
    }
    /// `input.len() == size * output.len()`.
    pub fn reduce_scatter_bytes(&self, input: &[u8], output: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let check = self.check("reduce_scatter");
        check.elems(output.len(), dtype)?;
        check.len("input (size x output)", self.inner.size * output.len(), input.len())?;
        self.check_ready()?;
        if self.inner.size == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        let desc = OpDesc::new(OpCode::ReduceScatter, Some(dtype), Some(op), None, output.len());
        self.run(Seq::Collective, desc, |c, call| c.reduce_scatter(call, input, output, dtype, op))
    }
    /// Both `size * S` bytes.
    pub fn all_to_all_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()> {
        let check = self.check("all_to_all");
        check.len("output (same as input)", input.len(), output.len())?;
        check.blocks(input.len(), None)?;
        self.check_ready()?;
        if self.inner.size == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        let desc = OpDesc::new(OpCode::AllToAll, None, None, None, input.len());
        self.run(Seq::Collective, desc, |c, call| c.all_to_all(call, input, output))
    }
    /// Sends `data` to group rank `dst`; `recv_bytes` on `dst` must expect the same length.
    pub fn send_bytes(&self, data: &[u8], dst: usize) -> Result<()> {
        self.check("send").peer(dst)?;
        let desc = OpDesc::new(OpCode::SendRecv, None, None, None, data.len());
        self.run(Seq::SendTo(dst), desc, |c, call| c.send(call, data, dst))
    }
    /// Receives exactly `buf.len()` bytes from group rank `src`.
    pub fn recv_bytes(&self, buf: &mut [u8], src: usize) -> Result<()> {
        self.check("recv").peer(src)?;
        let desc = OpDesc::new(OpCode::SendRecv, None, None, None, buf.len());
        self.run(Seq::RecvFrom(src), desc, |c, call| c.recv(call, buf, src))
    }
    /// A zero-copy buffer of `len` bytes from this rank's pool in shared
    /// memory ([`ShmBuf`]; see [`crate::collectives::shm::zc`]): fill it and
    /// hand it to a peer with [`ProcessGroup::send_shm`] instead of copying.
    /// For groups on the shared-memory backend (every rank on one node)
    /// and, in a group spanning nodes, between ranks of one node (a rank
    /// alone on its node has no pool); elsewhere, and to or from a rank on
    /// another node, [`Error::Unsupported`]. Not a collective.
    pub fn shm_buffer(&self, len: usize) -> Result<ShmBuf> {
        self.check_ready()?;
        let res = lock(&self.inner.state).comm.shm_buffer(len);
        res.map_err(|e| self.name_unsupported(e))
    }
    /// Puts the group's name into an [`Error::Unsupported`].
    fn name_unsupported(&self, e: Error) -> Error {
        match e {
            Error::Unsupported(why) if !why.contains(&format!("group {}", self.inner.name)) => {
                Error::Unsupported(format!("group {}: {why}", self.inner.name))
            }
            other => other,
        }
    }
    /// Hands `buf` to group rank `dst` without copying its bytes (its
    /// [`ProcessGroup::recv_shm`] gets a view of them); the buffer may come
    /// from this rank's pool or have been received. Returns once the
    /// handover is posted. Ordered with `send_bytes` to the same peer.
    pub fn send_shm(&self, buf: ShmBuf, dst: usize) -> Result<()> {
        self.check("send_shm").peer(dst)?;
        let desc = OpDesc::new(OpCode::SendRecv, None, None, None, buf.len());
        self.run(Seq::SendTo(dst), desc, |c, call| c.send_shm(call, buf, dst)).map_err(|e| self.name_unsupported(e))
    }
    /// Receives the buffer group rank `src` handed over with
    /// [`ProcessGroup::send_shm`]; a plain message there instead is an
    /// [`Error::Mismatch`]. Dropping the buffer returns it to its owner.
    pub fn recv_shm(&self, src: usize) -> Result<ShmBuf> {
        self.check("recv_shm").peer(src)?;
        let desc = OpDesc::new(OpCode::SendRecv, None, None, None, 0);
        self.run(Seq::RecvFrom(src), desc, |c, call| c.recv_shm(call, src)).map_err(|e| self.name_unsupported(e))
    }
    /// Point-to-point messages this rank has sent to group rank `peer`
    /// through shared memory (0 where that pair talks over the network): a
    /// statistic, to see which path a pair takes.
    pub fn shm_messages_sent(&self, peer: usize) -> u64 {
        lock(&self.inner.state).comm.shm_messages_sent(peer)
    }
    /// Broadcasts a blob whose length only `root` knows, as one
    /// collective: the root passes [`BlobRole::Send`] with what to send,
    /// every other rank [`BlobRole::Receive`] with the most bytes it takes
    /// and what to do with them. On the shared-memory backend a blob of up
    /// to `size` half slots (2 MiB for two ranks by default) goes in one
    /// step, written by the root straight into the segment and read in
    /// place by the others ([`crate::collectives::shm`]); elsewhere the
    /// length and the bytes go as two broadcasts through a buffer the group
    /// keeps. A root that cannot produce the blob, or a receiver that
    /// refuses its size or fails in `read`, returns the error after the
    /// collective (on the shared-memory backend; elsewhere a refused size
    /// leaves the root's bytes unreceived and the group's next collective
    /// fails); the others get an error naming the root.
    pub fn broadcast_blob(&self, role: BlobRole<'_>, root: usize) -> Result<()> {
        self.check("broadcast_blob").root(root)?;
        self.check_ready()?;
        let me = self.inner.rank;
        if matches!(role, BlobRole::Send(_)) != (me == root) {
            return Err(Error::invalid(format!(
                "broadcast_blob in group {}: rank {me} must pass {} since the root is rank {root}",
                self.inner.name,
                if me == root { "BlobRole::Send" } else { "BlobRole::Receive" }
            )));
        }
        if self.inner.size == 1 {
            return Ok(());
        }
        if self.inner.blob_direct {
            let desc = OpDesc::new(OpCode::Object, None, None, Some(root), 0);
            return self.run(Seq::Collective, desc, |c, call| {
                let mut scratch = std::mem::take(&mut *lock(&self.inner.blob));
                let res = c.broadcast_blob(call, role, &mut scratch, root);
                keep_blob(&self.inner.blob, scratch);
                res
            });
        }
        let mut scratch = std::mem::take(&mut *lock(&self.inner.blob));
        let res = self.broadcast_blob_in_two(role, &mut scratch, root);
        keep_blob(&self.inner.blob, scratch);
        res
    }

    /// [`ProcessGroup::broadcast_blob`] as two broadcasts: the length (all
    /// ones when the root failed), then the bytes.
    fn broadcast_blob_in_two(&self, role: BlobRole<'_>, scratch: &mut Vec<u8>, root: usize) -> Result<()> {
        scratch.clear();
        match role {
            BlobRole::Send(src) => {
                let made = src.write_vec(scratch);
                let mut len = if made.is_ok() { scratch.len() as u64 } else { BLOB_FAILED_LEN }.to_le_bytes();
                self.broadcast_bytes(&mut len, root)?;
                made?;
                if !scratch.is_empty() {
                    self.broadcast_bytes(scratch, root)?;
                }
                Ok(())
            }
            BlobRole::Receive { limit, read } => {
                let mut len = [0u8; 8];
                self.broadcast_bytes(&mut len, root)?;
                let len = u64::from_le_bytes(len);
                let ctx = || Context::new("broadcast_blob", self.inner.name.clone(), self.inner.rank).with_peer(root);
                if len == BLOB_FAILED_LEN {
                    return Err(crate::backend::blob_not_made(ctx(), root));
                }
                if len > limit as u64 {
                    return Err(crate::backend::blob_refused(ctx(), root, len, limit));
                }
                let n = len as usize;
                if scratch.try_reserve_exact(n).is_err() {
                    return Err(crate::backend::blob_no_memory(ctx(), root, len));
                }
                scratch.resize(n, 0);
                if n > 0 {
                    self.broadcast_bytes(scratch, root)?;
                }
                read(scratch)
            }
        }
    }

    /// Broadcasts an object from `root`, which passes `Some(obj)` (the
    /// others `None`), encoded as [`crate::tensor::codec::encode_object`]
    /// does, through [`ProcessGroup::broadcast_blob`]: the others return
    /// `Some` of the decoded copy, the root `None`. A declared size above
    /// `limits.max_object_bytes` is refused before anything is allocated.
    ///
    /// ```
    /// use rankweave::tensor::DecodeLimits;
    /// use rankweave::{GroupOptions, HashStore, ProcessGroup, SharedStore};
    /// use std::sync::Arc;
    ///
    /// let store: SharedStore = Arc::new(HashStore::new());
    /// let ranks: Vec<_> = (0..2)
    ///     .map(|rank| {
    ///         let store = store.clone();
    ///         std::thread::spawn(move || -> rankweave::Result<Option<Vec<String>>> {
    ///             let pg = ProcessGroup::new_world(store, rank, 2, GroupOptions::default())?;
    ///             let plan = vec!["decode".to_string(), "req-7".to_string()];
    ///             pg.broadcast_object((rank == 0).then_some(&plan), 0, &DecodeLimits::default())
    ///         })
    ///     })
    ///     .collect();
    /// let got: Vec<_> = ranks.into_iter().map(|h| h.join().expect("rank thread").unwrap()).collect();
    /// assert_eq!(got[0], None); // the root keeps its own
    /// assert_eq!(got[1].as_deref(), Some(&["decode".to_string(), "req-7".to_string()][..]));
    /// ```
    pub fn broadcast_object<T: Serialize + DeserializeOwned>(
        &self,
        obj: Option<&T>,
        root: usize,
        limits: &DecodeLimits,
    ) -> Result<Option<T>> {
        let ctx = Context::new("broadcast_object", self.inner.name.clone(), self.inner.rank);
        if self.inner.rank == root {
            let obj = obj.ok_or_else(|| {
                Error::invalid(format!(
                    "broadcast_object in group {}: the root (rank {root}) must pass Some(object)",
                    self.inner.name
                ))
            })?;
            self.broadcast_blob(BlobRole::Send(&mut codec::Encoder(obj)), root).map_err(|e| e.within(ctx))?;
            return Ok(None);
        }
        let mut got = None;
        let mut read = |bytes: &[u8]| {
            got = Some(codec::decode_object::<T>(bytes)?);
            Ok(())
        };
        let limit = usize::try_from(limits.max_object_bytes).unwrap_or(usize::MAX);
        self.broadcast_blob(BlobRole::Receive { limit, read: &mut read }, root)
            .map_err(|e| e.within(ctx.with_peer(root)))?;
        Ok(got)
    }

    /// Returns once every rank entered.
    pub fn barrier(&self) -> Result<()> {
        self.check_ready()?;
        if self.inner.size == 1 {
            return Ok(());
        }
        let desc = OpDesc::new(OpCode::Barrier, None, None, None, 0);
        self.run(Seq::Collective, desc, |c, call| c.barrier(call))
    }

    /// Typed [`ProcessGroup::all_reduce_bytes`].
    pub fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.all_reduce_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }
    /// Typed [`ProcessGroup::broadcast_bytes`].
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.broadcast_bytes(bytemuck::cast_slice_mut(buf), root)
    }
    /// Typed [`ProcessGroup::all_gather_bytes`].
    pub fn all_gather<T: Element>(&self, input: &[T], output: &mut [T]) -> Result<()> {
        self.all_gather_bytes(bytemuck::cast_slice(input), bytemuck::cast_slice_mut(output))
    }
    /// Typed [`ProcessGroup::gather_bytes`].
    pub fn gather<T: Element>(&self, input: &[T], output: Option<&mut [T]>, root: usize) -> Result<()> {
        self.gather_bytes(bytemuck::cast_slice(input), output.map(bytemuck::cast_slice_mut), root)
    }
    /// Typed [`ProcessGroup::scatter_bytes`].
    pub fn scatter<T: Element>(&self, input: Option<&[T]>, output: &mut [T], root: usize) -> Result<()> {
        self.scatter_bytes(input.map(bytemuck::cast_slice), bytemuck::cast_slice_mut(output), root)
    }
    /// Typed [`ProcessGroup::reduce_bytes`].
    pub fn reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.reduce_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, op, root)
    }
    /// Typed [`ProcessGroup::reduce_scatter_bytes`].
    pub fn reduce_scatter<T: Element>(&self, input: &[T], output: &mut [T], op: ReduceOp) -> Result<()> {
        self.reduce_scatter_bytes(bytemuck::cast_slice(input), bytemuck::cast_slice_mut(output), T::DTYPE, op)
    }
    /// Typed [`ProcessGroup::all_to_all_bytes`].
    pub fn all_to_all<T: Element>(&self, input: &[T], output: &mut [T]) -> Result<()> {
        self.all_to_all_bytes(bytemuck::cast_slice(input), bytemuck::cast_slice_mut(output))
    }
    /// Typed [`ProcessGroup::send_bytes`].
    pub fn send<T: Element>(&self, data: &[T], dst: usize) -> Result<()> {
        self.send_bytes(bytemuck::cast_slice(data), dst)
    }
    /// Typed [`ProcessGroup::recv_bytes`].
    pub fn recv<T: Element>(&self, buf: &mut [T], src: usize) -> Result<()> {
        self.recv_bytes(bytemuck::cast_slice_mut(buf), src)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.link.close();
    }
}

/// Poisons and closes the group when dropped during a panic (an operation
/// that panicked left its peers mid-operation).
struct CloseOnPanic<'a>(&'a Inner);

impl Drop for CloseOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.0.poison.set("an operation panicked on this rank".into());
            self.0.link.close();
        }
    }
}
