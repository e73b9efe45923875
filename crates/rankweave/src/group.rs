//! Process groups: the members' global ranks, this rank's position, a
//! transport and a sequence counter.
//!
//! The signatures here are the API the coordinator, benchmark and demo
//! build on. Each `*_bytes` method checks its arguments (lengths, ranks)
//! locally, short-circuits a group of one, then runs the collective's front
//! door in [`crate::collectives`] under the group lock with the next sequence
//! number and a deadline of now plus [`GroupOptions::timeout`].

use crate::collectives::{self, Comm};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::reduce::ReduceOp;
use crate::store::{PrefixStore, SharedStore};
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
        if opts.transport == TransportKind::Shm {
            return Err(Error::Unsupported(format!(
                "group {name}: the shared-memory transport is not available yet; use TransportKind::Tcp or Auto"
            )));
        }
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
        tracing::debug!(group = %name, rank, size, "group ready");
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
                state: Mutex::new(OpState {
                    seq: 0,
                    send_seq: vec![0; size],
                    recv_seq: vec![0; size],
                    scratch: Vec::new(),
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
    /// The transport collectives use in this group. Today always
    /// [`TransportKind::Tcp`]: `Auto` resolves to TCP until the shared-memory
    /// transport is wired into groups, and `Shm` is refused at creation.
    pub fn transport_kind(&self) -> TransportKind {
        TransportKind::Tcp
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
    /// talking to this rank see it as lost. Later calls return
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
    /// group timeout and hands `f` a [`Comm`]. A failure that poisons the
    /// group aborts it on every member.
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
        struct CloseOnPanic<'a>(&'a TcpTransport);
        impl Drop for CloseOnPanic<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.close();
                }
            }
        }
        let guard = CloseOnPanic(&inner.transport);
        let res = f(&mut comm);
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
        self.with_comm(|c| collectives::all_reduce(c, buf, dtype, op))
    }
    /// In-place broadcast from group rank `root`.
    pub fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.check_root("broadcast", root)?;
        self.check_ready()?;
        if self.inner.size == 1 {
            return Ok(());
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
