//! Process groups: the members' global ranks, this rank's position, a
//! transport and a sequence counter.
//!
//! The signatures here are the API the coordinator, benchmark and demo
//! build on. Each `*_bytes` method checks its arguments (lengths, ranks)
//! locally, short-circuits a group of one, then runs the collective's front
//! door in [`crate::collectives`] under the group lock with the next sequence
//! number and a deadline of now plus [`GroupOptions::timeout`].
//!
//! # Transport choice
//! Every group connects a TCP mesh (point-to-point traffic, fallback). The
//! collectives use shared memory ([`ShmComm`]) instead when the resolved
//! [`TransportKind`] allows it: [`GroupOptions::transport`], overridden by
//! the environment variable [`TRANSPORT_ENV`] (`RANKWEAVE_TRANSPORT=tcp|shm|auto`).
//! With `Auto` or `Shm`, every member publishes its node identity (host name
//! and kernel boot id) in the group's store; when all match, rank 0 creates
//! the segment, every other rank test-opens it and publishes `ok` or why
//! not, and every rank reads every answer, so the whole group agrees: shared
//! memory for all, or (with `Auto`) TCP for all. `Shm` turns a group that
//! spans nodes, or a segment some rank cannot open, into an error.
//!
//! With `Auto`, a group spanning nodes runs all_reduce hierarchically:
//! reduce inside each node through that node's own segment, all_reduce among
//! the node leaders (each node's lowest group rank) over TCP, broadcast
//! inside each node; every rank ends with the same bits. Its other
//! collectives use TCP, and it reports [`TransportKind::Tcp`]. If any node
//! cannot set up its segment, the whole group uses plain TCP.
//! [`ProcessGroup::transport_kind`] reports the outcome.

use crate::collectives::{self, Comm};
use crate::dtype::{DType, Element};
use crate::error::{Context, Error, Result};
use crate::reduce::ReduceOp;
use crate::store::{PrefixStore, SharedStore, Store};
use crate::sys::shm::ShmSegment;
use crate::transport::shm::{segment_bytes, ShmComm, ShmOptions};
use crate::transport::tcp::{group_id_of, TcpTransport};
use crate::transport::{OpCode, Tag, Transport};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Which transport a group uses for its collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// Shared memory when all members share a node, TCP otherwise.
    #[default]
    Auto,
    /// Always TCP.
    Tcp,
    /// Shared memory (an error when members span nodes).
    Shm,
}

/// Environment variable that overrides [`GroupOptions::transport`] for every
/// group a process creates: `tcp`, `shm` or `auto` (case-insensitive; empty
/// means unset).
pub const TRANSPORT_ENV: &str = "RANKWEAVE_TRANSPORT";

impl TransportKind {
    /// Lower-case name: `auto`, `tcp`, `shm`.
    pub const fn name(self) -> &'static str {
        match self {
            TransportKind::Auto => "auto",
            TransportKind::Tcp => "tcp",
            TransportKind::Shm => "shm",
        }
    }

    /// The kind a group is built with: `env_override` (the value of
    /// [`TRANSPORT_ENV`], if any) replaces `requested` unless it is empty.
    /// An unknown override is an error, not silently ignored.
    pub fn resolve(requested: TransportKind, env_override: Option<&str>) -> Result<TransportKind> {
        match env_override.map(str::trim) {
            None | Some("") => Ok(requested),
            Some(v) => v
                .parse()
                .map_err(|_| Error::invalid(format!("{TRANSPORT_ENV}={v:?}: expected one of `tcp`, `shm`, `auto`"))),
        }
    }

    /// [`TransportKind::resolve`] with the override read from the process
    /// environment.
    pub fn resolve_from_env(requested: TransportKind) -> Result<TransportKind> {
        let env = std::env::var(TRANSPORT_ENV).ok();
        TransportKind::resolve(requested, env.as_deref())
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TransportKind {
    type Err = Error;
    /// Parses `tcp`, `shm` or `auto` (case-insensitive).
    fn from_str(s: &str) -> Result<TransportKind> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(TransportKind::Auto),
            "tcp" => Ok(TransportKind::Tcp),
            "shm" => Ok(TransportKind::Shm),
            _ => Err(Error::invalid(format!("unknown transport {s:?}: expected `tcp`, `shm` or `auto`"))),
        }
    }
}

/// Options for creating groups.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// Deadline of each operation.
    pub timeout: Duration,
    /// Which transport collectives use.
    pub transport: TransportKind,
    /// Address this rank listens on for peers (`127.0.0.1`, `0.0.0.0`, a NIC's IP).
    pub listen_host: String,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            timeout: crate::store::default_timeout(),
            transport: TransportKind::Auto,
            listen_host: "127.0.0.1".into(),
        }
    }
}

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
    transport: TcpTransport,
    /// What the collectives actually use (never `Auto`).
    kind: TransportKind,
    /// Collectives go to `OpState::shm` (shared memory, more than one rank).
    use_shm: bool,
    /// all_reduce goes through `OpState::hier` (members span nodes).
    use_hier: bool,
    state: Mutex<OpState>,
    /// Subgroups created from this group so far (by every caller, members or not).
    children: AtomicU64,
    /// Unique-name counters, one registry per world instance.
    names: Arc<Mutex<HashMap<String, u64>>>,
}

struct OpState {
    seq: u64,
    send_seq: Vec<u64>,
    recv_seq: Vec<u64>,
    scratch: Vec<u8>,
    /// The shared-memory communicator, when the group uses one.
    shm: Option<ShmComm>,
    /// The hierarchical all_reduce, when members span nodes.
    hier: Option<Hier>,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("name", &self.inner.name)
            .field("rank", &self.inner.rank)
            .field("size", &self.inner.size)
            .field("global_ranks", &self.inner.global_ranks)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves counters consistent (they are
    // bumped before any I/O), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn check_len(op: &str, what: &str, expected: usize, actual: usize) -> Result<()> {
    if expected != actual {
        return Err(Error::invalid(format!("{op}: {what} must be {expected} bytes, got {actual}")));
    }
    Ok(())
}

fn check_elems(op: &str, len: usize, dtype: DType) -> Result<()> {
    if len % dtype.size() != 0 {
        return Err(Error::invalid(format!(
            "{op}: buffer of {len} bytes is not a whole number of {} elements ({} bytes each)",
            dtype.name(),
            dtype.size()
        )));
    }
    Ok(())
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
    ) -> Result<ProcessGroup> {
        let requested = TransportKind::resolve_from_env(opts.transport)?;
        let size = global_ranks.len();
        let store: SharedStore = Arc::new(PrefixStore::new(namespace.clone(), root.clone()));
        let deadline = Instant::now() + opts.timeout;
        let transport = TcpTransport::connect(
            store.clone(),
            rank,
            size,
            &name,
            group_id_of(&namespace),
            &opts.listen_host,
            deadline,
        )?;
        let plan = match (requested, size) {
            (TransportKind::Tcp, _) | (_, 1) => Plan::Tcp,
            _ => setup_shm(&*store, rank, size, &name, requested, &opts, &node_identity(), &open_probe)?,
        };
        let kind = match (requested, size, &plan) {
            (TransportKind::Tcp, _, _) => TransportKind::Tcp,
            // One rank talks to nobody: it trivially shares its node.
            (_, 1, _) => TransportKind::Shm,
            (_, _, Plan::Shm(_)) => TransportKind::Shm,
            _ => TransportKind::Tcp,
        };
        let (shm, hier) = match plan {
            Plan::Tcp => (None, None),
            Plan::Shm(c) => (Some(c), None),
            Plan::Hier(h) => (None, Some(h)),
        };
        let use_shm = shm.is_some();
        let use_hier = hier.is_some();
        tracing::debug!(group = %name, rank, size, transport = %kind, "group ready");
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
                transport,
                kind,
                use_shm,
                use_hier,
                state: Mutex::new(OpState {
                    seq: 0,
                    send_seq: vec![0; size],
                    recv_seq: vec![0; size],
                    scratch: Vec::new(),
                    shm,
                    hier,
                }),
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
        ProcessGroup::build(name, namespace, rank, (0..world_size).collect(), store, opts, names)
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
        )?;
        Ok(Some(group))
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
    /// Point-to-point traffic ([`ProcessGroup::send_bytes`]) is always TCP.
    pub fn transport_kind(&self) -> TransportKind {
        self.inner.kind
    }
    /// The options the group was created with (subgroups inherit them).
    pub fn options(&self) -> &GroupOptions {
        &self.inner.opts
    }
    /// The group's transport, for point-to-point traffic outside collectives
    /// (callers must not interleave it with the group's own operations).
    pub fn transport(&self) -> &dyn Transport {
        &self.inner.transport
    }
    /// The id carried in every message header of this group.
    pub fn group_id(&self) -> u64 {
        self.inner.transport.group_id()
    }
    /// Why the group is unusable, once it failed or was destroyed.
    pub fn poisoned(&self) -> Option<&str> {
        self.inner.transport.poisoned()
    }
    /// Closes every connection of this group (on every clone); peers still
    /// talking to this rank see it as lost (peers waiting in a shared-memory
    /// collective see it late, at their timeout). Later calls return
    /// [`Error::Poisoned`]. Dropping the last clone closes too.
    pub fn destroy(&self) {
        self.inner.transport.close();
    }

    fn check_ready(&self) -> Result<()> {
        match self.inner.transport.poisoned() {
            Some(cause) => Err(Error::Poisoned { group: self.inner.name.clone(), cause: cause.to_string() }),
            None => Ok(()),
        }
    }

    fn check_root(&self, op: &str, root: usize) -> Result<()> {
        if root >= self.inner.size {
            return Err(Error::invalid(format!(
                "{op}: root {root} is out of range for group {} of size {}",
                self.inner.name, self.inner.size
            )));
        }
        Ok(())
    }

    fn check_peer(&self, op: &str, peer: usize) -> Result<()> {
        if peer >= self.inner.size || peer == self.inner.rank {
            return Err(Error::invalid(format!(
                "{op}: peer {peer} is invalid for rank {} of group {} of size {}",
                self.inner.rank, self.inner.name, self.inner.size
            )));
        }
        Ok(())
    }

    /// Runs one collective: takes the group lock, advances the sequence
    /// number (every rank counts the same), sets the deadline to now plus the
    /// group timeout and hands `f` a [`Comm`] over the TCP mesh (also in a
    /// group whose own collectives use shared memory). A failure that poisons
    /// the group aborts it on every member.
    pub fn with_comm<R>(&self, f: impl FnOnce(&mut Comm<'_>) -> Result<R>) -> Result<R> {
        self.check_ready()?;
        let inner = &self.inner;
        let mut state = lock(&inner.state);
        state.seq += 1;
        let OpState { seq, scratch, .. } = &mut *state;
        let mut comm =
            Comm { transport: &inner.transport, seq: *seq, deadline: Instant::now() + inner.opts.timeout, scratch };
        // A panic inside the algorithm leaves the streams mid-operation: close
        // the group so that peers and later calls fail instead of desynchronizing.
        let guard = CloseOnPanic(&inner.transport);
        let res = f(&mut comm);
        drop(guard);
        if let Err(e) = &res {
            inner.transport.abort(e);
        }
        res
    }

    /// Runs one collective on the shared-memory communicator under the group
    /// lock, with the next sequence number; a failure that poisons the group
    /// aborts it on every member (as [`ProcessGroup::with_comm`]).
    #[inline]
    fn with_shm<R>(&self, f: impl FnOnce(&mut ShmComm) -> Result<R>) -> Result<R> {
        let inner = &self.inner;
        let mut state = lock(&inner.state);
        state.seq += 1;
        let Some(shm) = state.shm.as_mut() else {
            return Err(Error::invalid(format!("group {} has no shared-memory communicator", inner.name)));
        };
        // A panic mid-collective leaves the peers mid-step: close the group.
        let guard = CloseOnPanic(&inner.transport);
        let res = f(shm);
        drop(guard);
        if let Err(e) = &res {
            inner.transport.abort(e);
        }
        res
    }

    /// all_reduce of a group spanning nodes: reduce inside the node (shared
    /// memory), all_reduce among node leaders (TCP), broadcast inside the
    /// node. Avg sums throughout and divides once, on the leaders.
    fn hier_all_reduce(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let inner = &self.inner;
        let mut state = lock(&inner.state);
        state.seq += 1;
        let OpState { seq, scratch, hier, .. } = &mut *state;
        let Some(h) = hier.as_mut() else {
            return Err(Error::invalid(format!("group {} has no hierarchical all_reduce", inner.name)));
        };
        let guard = CloseOnPanic(&inner.transport);
        let sum_op = if op == ReduceOp::Avg { ReduceOp::Sum } else { op };
        let res = (|| {
            if let Some(local) = h.local.as_mut() {
                local.reduce(buf, dtype, sum_op, 0)?;
            }
            if let Some(li) = h.leader_index {
                if h.leaders.len() > 1 {
                    let sub = SubTransport { inner: &inner.transport, members: &h.leaders, rank: li };
                    let deadline = Instant::now() + inner.opts.timeout;
                    let mut comm = Comm { transport: &sub, seq: *seq, deadline, scratch };
                    collectives::all_reduce(&mut comm, buf, dtype, sum_op)?;
                }
                if op == ReduceOp::Avg {
                    crate::reduce::finish_avg(buf, dtype, inner.size);
                }
            }
            if let Some(local) = h.local.as_mut() {
                local.broadcast(buf, 0)?;
            }
            Ok(())
        })();
        drop(guard);
        if let Err(e) = &res {
            inner.transport.abort(e);
        }
        res
    }

    /// In-place all_reduce of `buf` (elements of `dtype`).
    pub fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        check_elems("all_reduce", buf.len(), dtype)?;
        self.check_ready()?;
        if self.inner.size == 1 {
            return Ok(());
        }
        if self.inner.use_shm {
            return self.with_shm(|s| s.all_reduce(buf, dtype, op));
        }
        if self.inner.use_hier {
            return self.hier_all_reduce(buf, dtype, op);
        }
        self.with_comm(|c| collectives::all_reduce(c, buf, dtype, op))
    }
    /// In-place broadcast from group rank `root`.
    pub fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.check_root("broadcast", root)?;
        self.check_ready()?;
        if self.inner.size == 1 {
            return Ok(());
        }
        if self.inner.use_shm {
            return self.with_shm(|s| s.broadcast(buf, root));
        }
        self.with_comm(|c| collectives::broadcast(c, buf, root))
    }
    /// `output.len() == size * input.len()`.
    pub fn all_gather_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()> {
        check_len("all_gather", "output (size * input)", self.inner.size * input.len(), output.len())?;
        self.check_ready()?;
        if self.inner.size == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        if self.inner.use_shm {
            return self.with_shm(|s| s.all_gather(input, output));
        }
        self.with_comm(|c| collectives::all_gather(c, input, output))
    }
    /// `output` is `Some` on root only.
    pub fn gather_bytes(&self, input: &[u8], output: Option<&mut [u8]>, root: usize) -> Result<()> {
        self.check_root("gather", root)?;
        let is_root = self.inner.rank == root;
        match (&output, is_root) {
            (Some(out), true) => {
                check_len("gather", "root's output (size * input)", self.inner.size * input.len(), out.len())?
            }
            (None, true) => return Err(Error::invalid(format!("gather: root {root} must pass an output buffer"))),
            (Some(_), false) => {
                return Err(Error::invalid(format!(
                    "gather: only root {root} passes an output buffer, rank {} did",
                    self.inner.rank
                )))
            }
            (None, false) => {}
        }
        self.check_ready()?;
        if self.inner.size == 1 {
            if let Some(out) = output {
                out.copy_from_slice(input);
            }
            return Ok(());
        }
        if self.inner.use_shm {
            return self.with_shm(|s| s.gather(input, output, root));
        }
        self.with_comm(|c| collectives::gather(c, input, output, root))
    }
    /// `input` is `Some` on root only.
    pub fn scatter_bytes(&self, input: Option<&[u8]>, output: &mut [u8], root: usize) -> Result<()> {
        self.check_root("scatter", root)?;
        let is_root = self.inner.rank == root;
        match (input, is_root) {
            (Some(inp), true) => {
                check_len("scatter", "root's input (size * output)", self.inner.size * output.len(), inp.len())?
            }
            (None, true) => return Err(Error::invalid(format!("scatter: root {root} must pass an input buffer"))),
            (Some(_), false) => {
                return Err(Error::invalid(format!(
                    "scatter: only root {root} passes an input buffer, rank {} did",
                    self.inner.rank
                )))
            }
            (None, false) => {}
        }
        self.check_ready()?;
        if self.inner.size == 1 {
            if let Some(inp) = input {
                output.copy_from_slice(inp);
            }
            return Ok(());
        }
        if self.inner.use_shm {
            return self.with_shm(|s| s.scatter(input, output, root));
        }
        self.with_comm(|c| collectives::scatter(c, input, output, root))
    }
    /// In place; the result is defined on root only.
    pub fn reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
        self.check_root("reduce", root)?;
        check_elems("reduce", buf.len(), dtype)?;
        self.check_ready()?;
        if self.inner.size == 1 {
            return Ok(());
        }
        if self.inner.use_shm {
            return self.with_shm(|s| s.reduce(buf, dtype, op, root));
        }
        self.with_comm(|c| collectives::reduce(c, buf, dtype, op, root))
    }
    /// `input.len() == size * output.len()`.
    pub fn reduce_scatter_bytes(&self, input: &[u8], output: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        check_len("reduce_scatter", "input (size * output)", self.inner.size * output.len(), input.len())?;
        check_elems("reduce_scatter", output.len(), dtype)?;
        self.check_ready()?;
        if self.inner.size == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        if self.inner.use_shm {
            return self.with_shm(|s| s.reduce_scatter(input, output, dtype, op));
        }
        self.with_comm(|c| collectives::reduce_scatter(c, input, output, dtype, op))
    }
    /// Both `size * S` bytes.
    pub fn all_to_all_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()> {
        check_len("all_to_all", "output (same as input)", input.len(), output.len())?;
        if input.len() % self.inner.size != 0 {
            return Err(Error::invalid(format!(
                "all_to_all: {} bytes do not split into {} equal blocks",
                input.len(),
                self.inner.size
            )));
        }
        self.check_ready()?;
        if self.inner.size == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        if self.inner.use_shm {
            return self.with_shm(|s| s.all_to_all(input, output));
        }
        self.with_comm(|c| collectives::all_to_all(c, input, output))
    }
    /// Sends `data` to group rank `dst`; `recv_bytes` on `dst` must expect the same length.
    pub fn send_bytes(&self, data: &[u8], dst: usize) -> Result<()> {
        self.check_peer("send", dst)?;
        self.check_ready()?;
        let inner = &self.inner;
        let mut state = lock(&inner.state);
        state.send_seq[dst] += 1;
        let tag = Tag::new(OpCode::SendRecv, state.send_seq[dst]);
        inner.transport.send(dst, tag, data, Instant::now() + inner.opts.timeout)
    }
    /// Receives exactly `buf.len()` bytes from group rank `src`.
    pub fn recv_bytes(&self, buf: &mut [u8], src: usize) -> Result<()> {
        self.check_peer("recv", src)?;
        self.check_ready()?;
        let inner = &self.inner;
        let mut state = lock(&inner.state);
        state.recv_seq[src] += 1;
        let tag = Tag::new(OpCode::SendRecv, state.recv_seq[src]);
        inner.transport.recv(src, tag, buf, Instant::now() + inner.opts.timeout)
    }
    /// Returns once every rank entered.
    pub fn barrier(&self) -> Result<()> {
        self.check_ready()?;
        if self.inner.size == 1 {
            return Ok(());
        }
        if self.inner.use_shm {
            return self.with_shm(ShmComm::barrier);
        }
        self.with_comm(collectives::barrier)
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

/// Closes the group's transport when dropped during a panic (a collective
/// that panicked left its peers mid-operation).
struct CloseOnPanic<'a>(&'a TcpTransport);

impl Drop for CloseOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.close();
        }
    }
}

/// This node's identity: the host name and, where readable, the kernel's
/// boot id (two containers with one host name but separate kernels, or a
/// host name reused across reboots, then differ).
pub(crate) fn node_identity() -> String {
    #[cfg(test)]
    if let Some(id) = tests::NODE.with(|n| n.borrow().clone()) {
        return id;
    }
    let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    format!("{host}/{}", boot.trim())
}

/// Reads `key`, which rank `peer` publishes, waiting until `deadline`; a
/// timeout names the operation, the group and `peer`.
fn get_from(store: &dyn Store, key: &str, deadline: Instant, ctx: Context) -> Result<Vec<u8>> {
    let start = Instant::now();
    let left = deadline.saturating_duration_since(start).max(Duration::from_millis(1));
    match store.get_timeout(key, left) {
        Err(Error::Timeout { .. }) => {
            let peer = ctx.peer.map_or_else(|| "a peer".to_string(), |p| format!("rank {p}"));
            Err(Error::timeout(ctx, start.elapsed(), format!("{peer} to publish `{key}` in the store")))
        }
        other => other,
    }
}

/// Opens segment `name` of `len` bytes and closes it again.
fn open_probe(name: &str, len: usize) -> Result<()> {
    ShmSegment::open(name, len).map(drop)
}

/// How a group of more than one rank runs its collectives.
enum Plan {
    /// Over the TCP mesh.
    Tcp,
    /// Over one shared-memory segment (every member on this node).
    Shm(ShmComm),
    /// all_reduce hierarchically (members span nodes), the rest over TCP.
    Hier(Hier),
}

/// A group spanning nodes: all_reduce reduces inside each node through
/// shared memory, all-reduces among the node leaders (the lowest group rank
/// of each node) over TCP, and broadcasts inside each node.
struct Hier {
    /// Shared memory among this node's members (`None` when alone on it).
    local: Option<ShmComm>,
    /// Group ranks of the node leaders, in node order.
    leaders: Vec<usize>,
    /// This rank's index in `leaders`, when it leads its node.
    leader_index: Option<usize>,
}

/// The TCP mesh restricted to some of its ranks (the node leaders), renumbered
/// `0..members.len()`; errors still name the peers' group ranks.
struct SubTransport<'a> {
    inner: &'a TcpTransport,
    members: &'a [usize],
    rank: usize,
}

impl Transport for SubTransport<'_> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.members.len()
    }
    fn group_name(&self) -> &str {
        self.inner.group_name()
    }
    fn send(&self, peer: usize, tag: Tag, data: &[u8], deadline: Instant) -> Result<()> {
        self.inner.send(self.members[peer], tag, data, deadline)
    }
    fn recv(&self, peer: usize, tag: Tag, buf: &mut [u8], deadline: Instant) -> Result<()> {
        self.inner.recv(self.members[peer], tag, buf, deadline)
    }
    fn send_recv(
        &self,
        to: usize,
        send_tag: Tag,
        data: &[u8],
        from: usize,
        recv_tag: Tag,
        buf: &mut [u8],
        deadline: Instant,
    ) -> Result<()> {
        self.inner.send_recv(self.members[to], send_tag, data, self.members[from], recv_tag, buf, deadline)
    }
}

/// Decides how a group of `size > 1` ranks runs its collectives and builds
/// the shared-memory communicators it needs (see the module docs). `node`
/// is this rank's node identity, `probe` test-opens a segment.
#[allow(clippy::too_many_arguments)]
fn setup_shm(
    store: &dyn Store,
    rank: usize,
    size: usize,
    name: &str,
    requested: TransportKind,
    opts: &GroupOptions,
    node: &str,
    probe: &dyn Fn(&str, usize) -> Result<()>,
) -> Result<Plan> {
    const OP: &str = "group.transport";
    let forced = requested == TransportKind::Shm;
    let deadline = Instant::now() + opts.timeout;
    let ctx = |peer: usize| Context::new(OP, name, rank).with_peer(peer);

    store.set(&format!("transport/node/{rank}"), node.as_bytes())?;
    let mut nodes = Vec::with_capacity(size);
    for j in 0..size {
        nodes.push(if j == rank {
            node.as_bytes().to_vec()
        } else {
            get_from(store, &format!("transport/node/{j}"), deadline, ctx(j))?
        });
    }
    let sopts = ShmOptions { timeout: opts.timeout, ..ShmOptions::default() };
    if nodes.iter().all(|n| n == &nodes[0]) {
        let all: Vec<usize> = (0..size).collect();
        return match create_agreed(store, "transport/shm", rank, &all, name, name, &sopts, deadline, probe)? {
            Ok(comm) => Ok(Plan::Shm(comm)),
            Err(why) if forced => Err(Error::SharedMemory(format!(
                "group {name}: the shared-memory transport was forced but is unavailable: {why}"
            ))),
            Err(why) => {
                tracing::debug!(group = %name, rank, "shared memory unavailable ({why}): collectives use TCP");
                Ok(Plan::Tcp)
            }
        };
    }
    if forced {
        let j = nodes.iter().position(|n| n != node.as_bytes()).unwrap_or(0);
        return Err(Error::Unsupported(format!(
            "group {name}: the shared-memory transport was forced but the members span nodes \
             (rank {rank} runs on {node:?}, rank {j} on {:?}); use `tcp` or `auto`",
            String::from_utf8_lossy(&nodes[j])
        )));
    }
    // Nodes in order of their lowest member; that member leads the node.
    let leaders: Vec<usize> = (0..size).filter(|&j| !nodes[..j].contains(&nodes[j])).collect();
    let k = leaders.iter().position(|&l| nodes[l] == nodes[rank]).unwrap_or(0);
    let local: Vec<usize> = (0..size).filter(|&j| nodes[j] == nodes[rank]).collect();
    let me = local.iter().position(|&j| j == rank).unwrap_or(0);
    let (comm, status) = if local.len() > 1 {
        let seg = format!("{name}-node{k}");
        match create_agreed(store, &format!("transport/node{k}"), me, &local, name, &seg, &sopts, deadline, probe)? {
            Ok(c) => (Some(c), "ok".to_string()),
            Err(why) => (None, why),
        }
    } else {
        (None, "ok".to_string())
    };
    // Every node must have its shared memory, or the group runs plain TCP.
    store.set(&format!("transport/hier/{rank}"), status.as_bytes())?;
    for j in 0..size {
        let v = get_from(store, &format!("transport/hier/{j}"), deadline, ctx(j))?;
        if v != b"ok" {
            tracing::debug!(group = %name, rank, "node of rank {j} has no shared memory: collectives use TCP");
            return Ok(Plan::Tcp);
        }
    }
    let leader_index = leaders.iter().position(|&l| l == rank);
    tracing::debug!(group = %name, rank, nodes = leaders.len(), "members span nodes: hierarchical all_reduce");
    Ok(Plan::Hier(Hier { local: comm, leaders, leader_index }))
}

/// Creates a shared-memory communicator among `members` (group ranks; this
/// rank is `members[me]`) with the agreement described in the module docs,
/// under store keys starting with `prefix`. `Ok(Err(why))`: some member
/// cannot use it, and every member returns the same.
#[allow(clippy::too_many_arguments)]
fn create_agreed(
    store: &dyn Store,
    prefix: &str,
    me: usize,
    members: &[usize],
    name: &str,
    segment: &str,
    sopts: &ShmOptions,
    deadline: Instant,
    probe: &dyn Fn(&str, usize) -> Result<()>,
) -> Result<std::result::Result<ShmComm, String>> {
    let n = members.len();
    let rank = members[me];
    let ctx = |i: usize| Context::new("group.transport", name, rank).with_peer(members[i]);
    let seg_len = segment_bytes(n, sopts.slot_bytes).unwrap_or(usize::MAX);
    let status_key = |i: usize| format!("{prefix}/status/{i}");
    let name_key = format!("{prefix}/name");
    let mut exchanged = false;
    // Why the members do not use shared memory, as agreed through the store.
    let mut refused: Option<String> = None;
    let res = ShmComm::create_with(me, n, segment, sopts, |seg| {
        exchanged = true;
        let seg_name = match seg {
            Some(s) => {
                store.set(&name_key, s.as_bytes())?;
                store.set(&status_key(0), b"ok")?;
                s.to_string()
            }
            None => {
                let v = get_from(store, &name_key, deadline, ctx(0))?;
                let (s, status) = match String::from_utf8(v) {
                    Ok(s) if !s.is_empty() => {
                        let status = match probe(&s, seg_len) {
                            Ok(()) => "ok".to_string(),
                            Err(e) => format!("rank {rank} cannot open the segment: {e}"),
                        };
                        (s, status)
                    }
                    _ => (String::new(), format!("rank {} could not create the segment", members[0])),
                };
                store.set(&status_key(me), status.as_bytes())?;
                s
            }
        };
        // Every member reads every answer: the outcome is the same everywhere.
        for i in 0..n {
            let v = get_from(store, &status_key(i), deadline, ctx(i))?;
            if v != b"ok" {
                let why = String::from_utf8_lossy(&v).into_owned();
                refused = Some(why.clone());
                return Err(Error::SharedMemory(why));
            }
        }
        Ok(seg_name)
    });
    match res {
        Ok(comm) => Ok(Ok(comm)),
        Err(e) => {
            if !exchanged && me == 0 {
                // Creating the segment failed: tell the others.
                let why = format!("rank {rank} could not create the segment: {e}");
                store.set(&name_key, b"")?;
                store.set(&status_key(0), why.as_bytes())?;
                refused = Some(why);
            }
            match refused {
                Some(why) => Ok(Err(why)),
                None => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::HashStore;

    thread_local! {
        /// Overrides this thread's node identity (ranks as threads on "nodes").
        pub(super) static NODE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
    }

    /// Builds a world on `nodes.len()` threads, rank `r` on node `nodes[r]`,
    /// and runs `f` on each.
    fn on_nodes<R: Send>(nodes: &[&str], f: impl Fn(ProcessGroup) -> R + Sync) -> Vec<R> {
        let store: SharedStore = Arc::new(HashStore::new());
        let n = nodes.len();
        let f = &f;
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .map(|r| {
                    let store = store.clone();
                    let node = nodes[r].to_string();
                    s.spawn(move || {
                        NODE.with(|c| *c.borrow_mut() = Some(node));
                        let opts = GroupOptions { timeout: Duration::from_secs(20), ..GroupOptions::default() };
                        f(ProcessGroup::new_world(store, r, n, opts).unwrap())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn value(op: ReduceOp, r: usize, i: usize) -> i64 {
        match op {
            ReduceOp::Prod => [1, 2, -1][(r + 2 * i) % 3],
            _ => ((r * 5 + i * 3) % 9) as i64 - 4,
        }
    }

    fn exact(op: ReduceOp, n: usize, i: usize) -> i64 {
        let it = (0..n).map(|r| value(op, r, i));
        match op {
            ReduceOp::Sum | ReduceOp::Avg => it.sum(),
            ReduceOp::Prod => it.product(),
            ReduceOp::Min => it.min().unwrap(),
            ReduceOp::Max => it.max().unwrap(),
        }
    }

    #[test]
    fn groups_spanning_nodes_all_reduce_hierarchically() {
        let layouts: [&[&str]; 3] = [&["a", "a", "b", "b", "b"], &["a", "b", "b", "c"], &["a", "b"]];
        for nodes in layouts {
            let n = nodes.len();
            let outs = on_nodes(nodes, |g| {
                let r = g.rank();
                if TransportKind::resolve_from_env(TransportKind::Auto).unwrap() != TransportKind::Auto {
                    return Vec::new();
                }
                assert_eq!(g.transport_kind(), TransportKind::Tcp);
                assert!(g.inner.use_hier);
                for op in ReduceOp::ALL {
                    for count in [1usize, 7, 1000, 300_000] {
                        let mut x: Vec<i64> = (0..count).map(|i| value(op, r, i)).collect();
                        g.all_reduce(&mut x, op).unwrap();
                        let div = if op == ReduceOp::Avg { n as i64 } else { 1 };
                        assert!(x.iter().enumerate().all(|(i, v)| *v == exact(op, n, i) / div), "{nodes:?} {op} i64");
                        let mut y: Vec<f32> = (0..count).map(|i| value(op, r, i) as f32).collect();
                        g.all_reduce(&mut y, op).unwrap();
                        let want = |i| {
                            let e = exact(op, n, i) as f32;
                            if op == ReduceOp::Avg {
                                e / n as f32
                            } else {
                                e
                            }
                        };
                        assert!(y.iter().enumerate().all(|(i, v)| *v == want(i)), "{nodes:?} {op} f32");
                    }
                }
                // Other collectives run over TCP beside it.
                let mut all = vec![0u8; n];
                g.all_gather(&[r as u8], &mut all).unwrap();
                assert_eq!(all, (0..n as u8).collect::<Vec<_>>());
                // Rounding-sensitive sums: the same bits everywhere.
                let mut z: Vec<f32> =
                    (0..5000).map(|i| ((i * 7919 + r * 104_729) % 1000) as f32 * 1e-3 + 1e3).collect();
                g.all_reduce(&mut z, ReduceOp::Sum).unwrap();
                z.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
            });
            assert!(outs.iter().all(|o| o == &outs[0]), "{nodes:?}: ranks differ");
        }
    }

    /// Runs `setup_shm` on `n` threads over one store; rank `r` claims node
    /// `nodes[r]` and its probe fails when `fails[r]`.
    fn decide(n: usize, requested: TransportKind, nodes: &[&str], fails: &[bool], tag: &str) -> Vec<Result<bool>> {
        let store: SharedStore = Arc::new(HashStore::new());
        let opts = GroupOptions { timeout: Duration::from_secs(20), ..GroupOptions::default() };
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .map(|r| {
                    let (store, opts) = (store.clone(), opts.clone());
                    let (node, fail) = (nodes[r], fails[r]);
                    s.spawn(move || {
                        let probe = |name: &str, len: usize| {
                            if fail {
                                Err(Error::SharedMemory("injected".into()))
                            } else {
                                open_probe(name, len)
                            }
                        };
                        setup_shm(&*store, r, n, tag, requested, &opts, node, &probe).map(|p| matches!(p, Plan::Shm(_)))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn leftovers(tag: &str) -> Vec<String> {
        let clean = tag.replace(':', "_");
        crate::sys::shm::list_job(&crate::sys::shm::job_id())
            .unwrap()
            .into_iter()
            .filter(|n| n.contains(&clean))
            .collect()
    }

    #[test]
    fn same_node_and_a_working_probe_use_shared_memory() {
        let out = decide(3, TransportKind::Auto, &["a"; 3], &[false; 3], "unit-same:0");
        assert!(out.iter().all(|r| matches!(r, Ok(true))), "{out:?}");
        assert!(leftovers("unit-same:0").is_empty());
    }

    #[test]
    fn members_on_two_nodes_fall_back_together_or_fail_when_forced() {
        let nodes = ["a", "a", "b", "a"];
        let out = decide(4, TransportKind::Auto, &nodes, &[false; 4], "unit-span:0");
        assert!(out.iter().all(|r| matches!(r, Ok(false))), "{out:?}");
        let out = decide(4, TransportKind::Shm, &nodes, &[false; 4], "unit-span:1");
        for r in &out {
            assert!(matches!(r, Err(Error::Unsupported(m)) if m.contains("span nodes")), "{r:?}");
        }
    }

    #[test]
    fn one_rank_failing_to_open_the_segment_moves_every_rank_to_tcp() {
        let fails = [false, false, true];
        let out = decide(3, TransportKind::Auto, &["a"; 3], &fails, "unit-probe:0");
        assert!(out.iter().all(|r| matches!(r, Ok(false))), "{out:?}");
        assert!(leftovers("unit-probe:0").is_empty());
        let out = decide(3, TransportKind::Shm, &["a"; 3], &fails, "unit-probe:1");
        for r in &out {
            assert!(matches!(r, Err(Error::SharedMemory(m)) if m.contains("rank 2 cannot open")), "{r:?}");
        }
        assert!(leftovers("unit-probe:1").is_empty());
    }

    #[test]
    fn node_identity_is_stable_and_names_the_host() {
        let id = node_identity();
        assert_eq!(id, node_identity());
        let host = nix::unistd::gethostname().unwrap();
        assert!(id.starts_with(&*host.to_string_lossy()), "{id}");
    }
}
