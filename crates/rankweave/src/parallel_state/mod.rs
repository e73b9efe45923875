//! The model-parallel state: world, tensor-, pipeline- and data-parallel
//! groups.
//!
//! [`ParallelState`] is an explicit value that owns the groups, so several
//! independent states can live in one process (ranks as threads in tests).
//! The seed's free functions ([`init_distributed_environment`],
//! [`initialize_model_parallel`], [`get_tp_group`], ...) are thin wrappers
//! over one process-wide state, [`global_state`].
//!
//! The typical sequence, as in the seed: `init_distributed_environment`,
//! then `initialize_model_parallel` (or `ensure_model_parallel_initialized`),
//! then the work, then `destroy_model_parallel` and
//! `destroy_distributed_environment` (after which a fresh init works).
//! Asking for a group before it was built is [`Error::NotInitialized`];
//! after it was destroyed, [`Error::Destroyed`].
//!
//! From Rust, [`ParallelState::init`] takes an [`InitOptions`] (built
//! explicitly, from the environment with [`InitOptions::from_env`], or both:
//! explicit options win); the seed's `init_distributed_environment` is a
//! thin shim over it. Every group is registered under its unique name:
//! [`ParallelState::lookup_group`], [`inplace_all_reduce`] and
//! [`outplace_all_reduce`] find it as the seed's custom ops do.
//!
//! ```
//! use rankweave::parallel_state::ParallelState;
//! use rankweave::tensor::Tensor;
//! use rankweave::HashStore;
//! use std::sync::Arc;
//!
//! // A world of one over an in-process store (threads or real processes
//! // use the same calls with more ranks).
//! let state = ParallelState::init_with_store(Arc::new(HashStore::new()), 1, 0, 0)?;
//! state.initialize_model_parallel(1, 1, None)?;
//! let tp = state.get_tp_group()?;
//! assert_eq!(tp.unique_name(), "tp:0");
//! let x = tp.all_reduce(Tensor::vec1(&[1.0f32, 2.0]))?;
//! assert_eq!(x.as_slice::<f32>()?, &[1.0, 2.0]);
//! state.destroy_model_parallel();
//! state.destroy_distributed_environment();
//! # Ok::<(), rankweave::Error>(())
//! ```

mod layout;
mod options;

pub use crate::coordinator::in_the_same_node_as;
pub use layout::{model_parallel_layout, Layout, RankPosition};
pub use options::{Backend, InitOptions, TIMEOUT_ENV};

use crate::coordinator::{CoordinatorOptions, GraphCaptureContext, GroupCoordinator, UniqueNames};
use crate::error::{Error, Result};
use crate::group::{GroupOptions, ProcessGroup};
use crate::reduce::ReduceOp;
use crate::store::SharedStore;
use crate::tensor::{Device, Tensor};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Sizes of the model-parallel dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelParallelConfig {
    /// Tensor-parallel size.
    pub tensor_model_parallel_size: usize,
    /// Pipeline-parallel size.
    pub pipeline_model_parallel_size: usize,
    /// Data-parallel size (1 in the seed).
    pub data_parallel_size: usize,
}

impl Default for ModelParallelConfig {
    fn default() -> Self {
        ModelParallelConfig { tensor_model_parallel_size: 1, pipeline_model_parallel_size: 1, data_parallel_size: 1 }
    }
}

impl ModelParallelConfig {
    /// The seed's configuration: `tp x pp`, no data parallelism.
    pub fn new(tp: usize, pp: usize) -> Self {
        ModelParallelConfig { tensor_model_parallel_size: tp, pipeline_model_parallel_size: pp, data_parallel_size: 1 }
    }
    /// With a data-parallel dimension.
    pub fn with_dp(mut self, dp: usize) -> Self {
        self.data_parallel_size = dp;
        self
    }
}

#[derive(Default)]
struct State {
    world_pg: Option<ProcessGroup>,
    world: Option<GroupCoordinator>,
    tp: Option<GroupCoordinator>,
    pp: Option<GroupCoordinator>,
    dp: Option<GroupCoordinator>,
    tp_patched: bool,
    backend: String,
    /// Where the world's tensors live (`cuda:local_rank` with NCCL).
    device: Device,
    /// The rendezvous store when this state made it (rank 0's handle keeps
    /// the store server alive).
    store: Option<SharedStore>,
    /// This process hosts the store server (rank 0 without a launcher
    /// hosting it): destroying the world waits for the other ranks to leave.
    hosts_store: bool,
    layout: Option<Layout>,
    /// The world was destroyed (and not re-initialized since).
    world_destroyed: bool,
    /// The model-parallel groups were destroyed (and not rebuilt since).
    mp_destroyed: bool,
}

impl State {
    /// `NotInitialized` or `Destroyed` for the group `what`.
    fn missing(&self, what: &str, model_parallel: bool) -> Error {
        let destroyed = if model_parallel { self.mp_destroyed || self.world_destroyed } else { self.world_destroyed };
        if destroyed {
            Error::Destroyed(format!("{what} was destroyed; initialize it again before use"))
        } else {
            Error::NotInitialized(format!("{what} is not initialized"))
        }
    }
}

/// One rank's distributed state: the world group and the model-parallel
/// groups built over it.
pub struct ParallelState {
    state: Mutex<State>,
    names: Option<Arc<UniqueNames>>,
}

impl std::fmt::Debug for ParallelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("ParallelState")
            .field("world", &s.world)
            .field("tp", &s.tp)
            .field("pp", &s.pp)
            .field("dp", &s.dp)
            .field("tp_patched", &s.tp_patched)
            .finish()
    }
}

impl Default for ParallelState {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a backend's tensors live: `cuda:local_rank` for NCCL (the seed's
/// `torch.device(f"cuda:{local_rank}")`), the host otherwise.
fn device_for(backend: Backend, local_rank: usize) -> Device {
    match backend {
        Backend::Nccl => Device::Cuda(local_rank),
        Backend::Cpu | Backend::Mpi => Device::Cpu,
    }
}

/// Parses a backend name and checks that this build runs it; empty means
/// "the world's backend" ([`Backend::Cpu`]).
fn check_backend(backend: &str) -> Result<Backend> {
    let b = if backend.trim().is_empty() { Backend::Cpu } else { backend.parse::<Backend>()? };
    b.check_supported()?;
    Ok(b)
}

impl ParallelState {
    /// An uninitialized state with its own group-name counters.
    pub fn new() -> Self {
        ParallelState { state: Mutex::new(State::default()), names: Some(Arc::new(UniqueNames::new())) }
    }

    /// The process-wide state's constructor: names come from
    /// [`UniqueNames::global`], as the seed's module-level counter.
    fn new_global() -> Self {
        ParallelState { state: Mutex::new(State::default()), names: None }
    }

    /// A state whose world group is built over an existing store (ranks as
    /// threads over a [`crate::HashStore`], or a store already rendezvoused).
    pub fn init_with_store(store: SharedStore, world_size: usize, rank: usize, local_rank: usize) -> Result<Self> {
        let s = ParallelState::new();
        s.init_world_with_store(store, world_size, rank, local_rank, GroupOptions::default())?;
        Ok(s)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state as consistent as
        // the last completed assignment; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn names(&self) -> &UniqueNames {
        match &self.names {
            Some(n) => n,
            None => UniqueNames::global(),
        }
    }

    fn opts(&self, name: &str, mq: bool, device: Device) -> CoordinatorOptions {
        CoordinatorOptions {
            group_name: Some(name.into()),
            use_message_queue_broadcaster: mq,
            names: self.names.clone(),
            limits: None,
            device,
        }
    }

    /// Builds the world group over `store` (every rank calls it). Calling it
    /// again with the same world size is a no-op; another size is an error.
    pub fn init_world_with_store(
        &self,
        store: SharedStore,
        world_size: usize,
        rank: usize,
        local_rank: usize,
        opts: GroupOptions,
    ) -> Result<()> {
        self.init_world_on(store, world_size, rank, local_rank, opts, Device::Cpu)
    }

    fn init_world_on(
        &self,
        store: SharedStore,
        world_size: usize,
        rank: usize,
        local_rank: usize,
        opts: GroupOptions,
        device: Device,
    ) -> Result<()> {
        let mut s = self.lock();
        if let Some(w) = &s.world {
            return check_same_world(w, world_size);
        }
        if world_size == 0 || rank >= world_size {
            return Err(Error::invalid(format!(
                "rank {rank} and world_size {world_size}: expected 0 <= rank < world_size"
            )));
        }
        let pg = ProcessGroup::new_world(store, rank, world_size, opts)?;
        let ranks: Vec<usize> = (0..world_size).collect();
        let world = GroupCoordinator::new(&pg, &[ranks], local_rank, self.opts("world", false, device))?;
        s.world_pg = Some(pg);
        s.device = device;
        s.world = Some(world);
        s.world_destroyed = false;
        if s.backend.is_empty() {
            s.backend = Backend::Cpu.name().into();
        }
        Ok(())
    }

    /// Starts the distributed environment from `opts`: meets the other ranks
    /// through the init method (`env://` by default: the store at
    /// `master_addr:master_port`; or `tcp://host:port`), then builds the
    /// world group with `opts`' timeout and transport. Fields left `None`
    /// are not read from the environment here: call
    /// [`InitOptions::with_env`] first for that. The local rank defaults to
    /// 0 with `env://` and to the rank otherwise.
    ///
    /// [`Backend::Mpi`] is [`Error::Unsupported`]; [`Backend::Nccl`] needs
    /// the `nccl` feature and puts every group's tensors on
    /// `cuda:local_rank` through NCCL (without a CUDA driver or NCCL, a clean
    /// error). Called again once initialized, it only checks that the
    /// world size matches.
    pub fn init(&self, opts: &InitOptions) -> Result<()> {
        opts.backend.check_supported()?;
        if let Some(w) = self.lock().world.clone() {
            return match opts.world_size {
                Some(n) => check_same_world(&w, n),
                None => Ok(()),
            };
        }
        let method = opts.init_method_or_default();
        // Where this rank will listen, checked before meeting the others: a
        // bad interface or an unroutable master fails every rank at once
        // instead of leaving the others waiting at the store.
        let group_opts = opts.group_options();
        crate::transport::tcp::addr::listen_host(
            group_opts.listen_host.as_deref(),
            group_opts.interface.as_deref(),
            group_opts.route_to.as_deref(),
        )?;
        // The store's auth token is a secret, not an option: it is passed
        // through from the process environment to the store only.
        let token = std::env::var("RANKWEAVE_TOKEN").ok();
        let env = |name: &str| opts.rendezvous_var(name, token.as_deref());
        let rv = crate::store::init::rendezvous_with_env(
            method,
            opts.rank,
            opts.world_size,
            opts.timeout_or_default(),
            &env,
        )?;
        let local_rank = match (opts.local_rank, method.trim() == "env://") {
            (Some(l), _) => l,
            (None, true) => 0,
            (None, false) => rv.rank,
        };
        let device = device_for(opts.backend, local_rank);
        self.init_world_on(rv.store.clone(), rv.world_size, rv.rank, local_rank, group_opts, device)?;
        let mut s = self.lock();
        s.backend = opts.backend.name().into();
        s.store = Some(rv.store);
        s.hosts_store = rv.hosts_store;
        Ok(())
    }

    /// The seed's `init_distributed_environment`: meets the other ranks
    /// through `init_method` (`env://` or `tcp://host:port`; see
    /// [`crate::store::init::rendezvous`]) and builds the world group.
    ///
    /// `world_size` and `rank` of `-1` come from the environment (`env://`).
    /// `local_rank == -1` means `LOCAL_RANK` (0 when unset) with `env://`,
    /// else the rank. `backend` is a [`Backend`] name (empty: `gloo`).
    /// Called again once initialized, it only checks that the world size
    /// matches. A shim over [`ParallelState::init`] with
    /// [`InitOptions::with_env`].
    pub fn init_distributed_environment(
        &self,
        world_size: isize,
        rank: isize,
        init_method: &str,
        local_rank: isize,
        backend: &str,
    ) -> Result<()> {
        let backend = check_backend(backend)?;
        let mut explicit = InitOptions::new().init_method(init_method.trim()).backend(backend);
        explicit.world_size = usize::try_from(world_size).ok();
        explicit.rank = usize::try_from(rank).ok();
        explicit.local_rank = match usize::try_from(local_rank) {
            Ok(l) => Some(l),
            // The seed: LOCAL_RANK only with env://, the rank otherwise.
            Err(_) if init_method.trim() != "env://" => explicit.rank,
            Err(_) => None,
        };
        let (rank, world_size, local_rank) = (explicit.rank, explicit.world_size, explicit.local_rank);
        let mut opts = explicit.with_env()?;
        if init_method.trim() != "env://" {
            // As the seed: only env:// takes the rank and sizes from the
            // environment; tcp:// needs them from the caller.
            (opts.rank, opts.world_size, opts.local_rank) = (rank, world_size, local_rank);
        }
        self.init(&opts)
    }

    /// True once the world group exists.
    pub fn is_initialized(&self) -> bool {
        self.lock().world.is_some()
    }

    /// The backend the world was initialized with ([`Backend::name`]: `gloo`).
    pub fn backend(&self) -> Option<String> {
        let s = self.lock();
        s.world.as_ref().map(|_| s.backend.clone())
    }

    /// The seed's `initialize_model_parallel(tp, pp, backend)`.
    pub fn initialize_model_parallel(&self, tp: usize, pp: usize, backend: Option<&str>) -> Result<()> {
        self.initialize_model_parallel_with(ModelParallelConfig::new(tp, pp), backend)
    }

    /// Builds the TP, PP and DP groups (layout DP x PP x TP; see
    /// [`model_parallel_layout`]). Every rank of the world calls it.
    pub fn initialize_model_parallel_with(&self, config: ModelParallelConfig, backend: Option<&str>) -> Result<()> {
        let mut s = self.lock();
        let (world_pg, world) = match (&s.world_pg, &s.world) {
            (Some(pg), Some(w)) => (pg.clone(), w.clone()),
            _ => return Err(s.missing("world group (call init_distributed_environment first)", false)),
        };
        let device = match backend {
            Some(b) if !b.trim().is_empty() => device_for(check_backend(b)?, world.local_rank()),
            _ => s.device,
        };
        let layout = model_parallel_layout(
            world.world_size(),
            config.tensor_model_parallel_size,
            config.pipeline_model_parallel_size,
            config.data_parallel_size,
        )?;
        if s.tp.is_some() {
            return Err(Error::AlreadyInitialized("tensor model parallel group is already initialized".into()));
        }
        if s.pp.is_some() {
            return Err(Error::AlreadyInitialized("pipeline model parallel group is already initialized".into()));
        }
        let local_rank = world.local_rank();
        // The message-queue broadcaster is only used in the TP group.
        let tp = GroupCoordinator::new(&world_pg, &layout.tp_groups, local_rank, self.opts("tp", true, device))?;
        let pp = GroupCoordinator::new(&world_pg, &layout.pp_groups, local_rank, self.opts("pp", false, device))?;
        let dp = GroupCoordinator::new(&world_pg, &layout.dp_groups, local_rank, self.opts("dp", false, device))?;
        s.tp = Some(tp);
        s.pp = Some(pp);
        s.dp = Some(dp);
        s.layout = Some(layout);
        s.mp_destroyed = false;
        Ok(())
    }

    /// Builds the model-parallel groups if they do not exist, else checks
    /// that they have the expected sizes.
    pub fn ensure_model_parallel_initialized(&self, tp: usize, pp: usize, backend: Option<&str>) -> Result<()> {
        if !self.model_parallel_is_initialized() {
            return self.initialize_model_parallel(tp, pp, backend);
        }
        let tp_size = self.get_tensor_model_parallel_world_size()?;
        if tp_size != tp {
            return Err(Error::AlreadyInitialized(format!(
                "tensor parallel group already initialized, but of unexpected size: \
                 get_tensor_model_parallel_world_size()={tp_size} vs. tensor_model_parallel_size={tp}"
            )));
        }
        let pp_size = self.get_pp_group()?.world_size();
        if pp_size != pp {
            return Err(Error::AlreadyInitialized(format!(
                "pipeline parallel group already initialized, but of unexpected size: \
                 pp_world_size={pp_size} vs. pipeline_model_parallel_size={pp}"
            )));
        }
        Ok(())
    }

    /// True once the TP and PP groups exist.
    pub fn model_parallel_is_initialized(&self) -> bool {
        let s = self.lock();
        s.tp.is_some() && s.pp.is_some()
    }

    /// The layout the model-parallel groups were built from.
    pub fn layout(&self) -> Option<Layout> {
        self.lock().layout.clone()
    }

    /// The world group.
    pub fn get_world_group(&self) -> Result<GroupCoordinator> {
        let s = self.lock();
        s.world.clone().ok_or_else(|| s.missing("world group", false))
    }
    /// The tensor-parallel group.
    pub fn get_tp_group(&self) -> Result<GroupCoordinator> {
        let s = self.lock();
        s.tp.clone().ok_or_else(|| s.missing("tensor model parallel group", true))
    }
    /// Alias of [`ParallelState::get_tp_group`], kept as in the seed.
    pub fn get_tensor_model_parallel_group(&self) -> Result<GroupCoordinator> {
        self.get_tp_group()
    }
    /// The pipeline-parallel group.
    pub fn get_pp_group(&self) -> Result<GroupCoordinator> {
        let s = self.lock();
        s.pp.clone().ok_or_else(|| s.missing("pipeline model parallel group", true))
    }
    /// Alias of [`ParallelState::get_pp_group`], kept as in the seed.
    pub fn get_pipeline_model_parallel_group(&self) -> Result<GroupCoordinator> {
        self.get_pp_group()
    }
    /// The data-parallel group.
    pub fn get_dp_group(&self) -> Result<GroupCoordinator> {
        let s = self.lock();
        s.dp.clone().ok_or_else(|| s.missing("data parallel group", true))
    }

    /// The group registered as `group_name` (`tp:0`, `world:0`) by this
    /// state: [`Error::NotFound`] for a name never built here,
    /// [`Error::Destroyed`] for a destroyed group.
    pub fn lookup_group(&self, group_name: &str) -> Result<GroupCoordinator> {
        self.names().lookup(group_name)
    }

    /// The seed's `inplace_all_reduce(tensor, group_name)`: sums `tensor`
    /// in place over the group registered as `group_name`.
    pub fn inplace_all_reduce(&self, tensor: &mut Tensor, group_name: &str) -> Result<()> {
        self.lookup_group(group_name)?.all_reduce_in_place(tensor, ReduceOp::Sum)
    }

    /// The seed's `outplace_all_reduce(tensor, group_name)`: the sum of
    /// `tensor` over the group registered as `group_name`, in a new tensor.
    pub fn outplace_all_reduce(&self, tensor: &Tensor, group_name: &str) -> Result<Tensor> {
        self.lookup_group(group_name)?.all_reduce(tensor.clone())
    }
    /// Size of the TP group.
    pub fn get_tensor_model_parallel_world_size(&self) -> Result<usize> {
        Ok(self.get_tp_group()?.world_size())
    }
    /// This rank's position in the TP group.
    pub fn get_tensor_model_parallel_rank(&self) -> Result<usize> {
        Ok(self.get_tp_group()?.rank_in_group())
    }

    /// Runs `f` inside a graph capture of the tensor- and pipeline-parallel
    /// groups (the seed's module-level `graph_capture`): the TP group starts
    /// the capture and the PP group joins its context. On CPU the context
    /// carries no stream and collectives run eagerly.
    pub fn graph_capture<R>(&self, f: impl FnOnce(&GraphCaptureContext) -> Result<R>) -> Result<R> {
        let (tp, pp) = (self.get_tp_group()?, self.get_pp_group()?);
        tp.graph_capture(None, |context| pp.graph_capture(Some(context.clone()), f))
    }

    /// Replaces the TP group until the returned guard is dropped (also when
    /// unwinding from a panic), then restores the previous one. Patching an
    /// already patched state is an error.
    pub fn patch_tensor_parallel_group(&self, tp_group: GroupCoordinator) -> Result<TpGroupPatch<'_>> {
        let mut s = self.lock();
        if s.tp_patched {
            return Err(Error::invalid("patch_tensor_parallel_group: the tensor parallel group is already patched"));
        }
        let old = s.tp.clone().ok_or_else(|| s.missing("tensor model parallel group", true))?;
        s.tp = Some(tp_group);
        s.tp_patched = true;
        Ok(TpGroupPatch { state: self, old: Some(old) })
    }

    /// Destroys the TP, PP and DP groups; `initialize_model_parallel` may be
    /// called again afterwards.
    pub fn destroy_model_parallel(&self) {
        let mut s = self.lock();
        let mut any = false;
        for g in [s.tp.take(), s.pp.take(), s.dp.take()].into_iter().flatten() {
            g.destroy();
            any = true;
        }
        s.mp_destroyed |= any;
        s.layout = None;
    }

    /// Destroys the world group; a fresh `init_*` works afterwards.
    ///
    /// Every rank records that it left in the store. The rank hosting the
    /// store server (rank 0 when no launcher hosts it) then waits, bounded by
    /// the world's timeout, until every rank has left, so that its exit never
    /// breaks a rank still creating groups or finishing operations through
    /// the store; ranks that have not left are named in a warning every
    /// 10 s, and when the bound passes it gives up with a warning.
    pub fn destroy_distributed_environment(&self) {
        let mut s = self.lock();
        let leaving = s.world_pg.as_ref().map(|pg| (pg.clone(), s.hosts_store));
        if let Some(w) = s.world.take() {
            w.destroy();
            s.world_destroyed = true;
        }
        s.world_pg = None;
        let store = s.store.take();
        s.hosts_store = false;
        drop(s);
        if let (Some((pg, hosts)), Some(store)) = (leaving, store) {
            wait_for_everyone_to_leave(&pg, &*store, hosts);
        }
    }
}

/// Records that this rank left world `pg`; the host of the store waits for
/// the others (see [`ParallelState::destroy_distributed_environment`]).
fn wait_for_everyone_to_leave(pg: &ProcessGroup, store: &dyn crate::store::Store, hosts: bool) {
    use crate::group::arrive::{mark, wait_all};
    let base = format!("rankweave/{}/left", pg.name());
    let (rank, size, bound) = (pg.rank(), pg.size(), pg.timeout());
    if let Err(e) = mark(store, &base, rank, size) {
        tracing::debug!("destroy_distributed_environment: could not record rank {rank} leaving: {e}");
        return;
    }
    if !hosts {
        return;
    }
    let start = std::time::Instant::now();
    loop {
        let slice = std::time::Duration::from_secs(10).min(bound.saturating_sub(start.elapsed()));
        let absent = match wait_all(store, &base, size, slice) {
            Ok(Ok(())) => return,
            Ok(Err(absent)) => absent,
            Err(e) => {
                tracing::warn!("destroy_distributed_environment: rank {rank} could not wait for the others: {e}");
                return;
            }
        };
        if start.elapsed() >= bound {
            tracing::warn!(
                "destroy_distributed_environment: rank {rank} hosts the store and gave up after {bound:?} waiting \
                 for rank(s) {:?} of {} to leave; they lose the store now",
                absent.ranks,
                pg.name()
            );
            return;
        }
        tracing::warn!(
            "destroy_distributed_environment: rank {rank} hosts the store and waits for rank(s) {:?} of {} to \
             leave (waited {:.0?} of at most {bound:?})",
            absent.ranks,
            pg.name(),
            start.elapsed()
        );
    }
}

fn check_same_world(w: &GroupCoordinator, world_size: usize) -> Result<()> {
    if w.world_size() != world_size {
        return Err(Error::AlreadyInitialized(format!(
            "world group already initialized with a different world size ({} ranks, now asked for {world_size})",
            w.world_size()
        )));
    }
    Ok(())
}

/// Restores the previous TP group when dropped; see
/// [`ParallelState::patch_tensor_parallel_group`].
#[must_use = "the TP group is restored as soon as the guard is dropped"]
pub struct TpGroupPatch<'a> {
    state: &'a ParallelState,
    old: Option<GroupCoordinator>,
}

impl std::fmt::Debug for TpGroupPatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpGroupPatch").field("restores", &self.old).finish()
    }
}

impl Drop for TpGroupPatch<'_> {
    fn drop(&mut self) {
        let mut s = self.state.lock();
        s.tp = self.old.take();
        s.tp_patched = false;
    }
}

// ----- the seed's free functions over one process-wide state ---------------

static CUSTOM_ALL_REDUCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// The seed's `set_custom_all_reduce`: whether model-parallel groups may use
/// a custom (device) all-reduce. Recorded for API parity; CPU groups have no
/// custom all-reduce, so it changes nothing in this build.
pub fn set_custom_all_reduce(enable: bool) {
    CUSTOM_ALL_REDUCE.store(enable, std::sync::atomic::Ordering::Relaxed);
}

/// The value last set by [`set_custom_all_reduce`] (default `true`, as the seed).
pub fn custom_all_reduce_enabled() -> bool {
    CUSTOM_ALL_REDUCE.load(std::sync::atomic::Ordering::Relaxed)
}

/// The seed's `init_world_group`: a coordinator named `world` over `ranks`
/// of the `world` process group. Every rank of `world` calls it.
pub fn init_world_group(
    world: &ProcessGroup,
    ranks: &[usize],
    local_rank: usize,
    backend: &str,
) -> Result<GroupCoordinator> {
    let device = device_for(check_backend(backend)?, local_rank);
    let opts = CoordinatorOptions { group_name: Some("world".into()), device, ..CoordinatorOptions::default() };
    GroupCoordinator::new(world, &[ranks.to_vec()], local_rank, opts)
}

/// The seed's `init_model_parallel_group`: a coordinator over one of
/// `group_ranks` (global ranks), built by every rank of `world` in the same
/// order. Names come from the process-wide counters (`tp:0`, `tp:1`, ...).
pub fn init_model_parallel_group(
    world: &ProcessGroup,
    group_ranks: &[Vec<usize>],
    local_rank: usize,
    backend: &str,
    use_message_queue_broadcaster: bool,
    group_name: Option<&str>,
) -> Result<GroupCoordinator> {
    let device = device_for(check_backend(backend)?, local_rank);
    let opts = CoordinatorOptions {
        group_name: group_name.map(str::to_string),
        use_message_queue_broadcaster,
        device,
        ..CoordinatorOptions::default()
    };
    GroupCoordinator::new(world, group_ranks, local_rank, opts)
}

/// The process-wide state behind the free functions.
pub fn global_state() -> &'static ParallelState {
    static GLOBAL: OnceLock<ParallelState> = OnceLock::new();
    GLOBAL.get_or_init(ParallelState::new_global)
}

/// [`ParallelState::init`] on the process-wide state.
pub fn init(opts: &InitOptions) -> Result<()> {
    global_state().init(opts)
}

/// [`ParallelState::init_distributed_environment`] on the process-wide state.
pub fn init_distributed_environment(
    world_size: isize,
    rank: isize,
    init_method: &str,
    local_rank: isize,
    backend: &str,
) -> Result<()> {
    global_state().init_distributed_environment(world_size, rank, init_method, local_rank, backend)
}

/// [`ParallelState::init_world_with_store`] on the process-wide state.
pub fn init_distributed_environment_with_store(
    store: SharedStore,
    world_size: usize,
    rank: usize,
    local_rank: usize,
) -> Result<()> {
    global_state().init_world_with_store(store, world_size, rank, local_rank, GroupOptions::default())
}

/// [`ParallelState::initialize_model_parallel`] on the process-wide state.
pub fn initialize_model_parallel(tp: usize, pp: usize, backend: Option<&str>) -> Result<()> {
    global_state().initialize_model_parallel(tp, pp, backend)
}

/// [`ParallelState::initialize_model_parallel_with`] on the process-wide state.
pub fn initialize_model_parallel_with(config: ModelParallelConfig, backend: Option<&str>) -> Result<()> {
    global_state().initialize_model_parallel_with(config, backend)
}

/// [`ParallelState::ensure_model_parallel_initialized`] on the process-wide state.
pub fn ensure_model_parallel_initialized(tp: usize, pp: usize, backend: Option<&str>) -> Result<()> {
    global_state().ensure_model_parallel_initialized(tp, pp, backend)
}

/// [`ParallelState::model_parallel_is_initialized`] on the process-wide state.
pub fn model_parallel_is_initialized() -> bool {
    global_state().model_parallel_is_initialized()
}

/// The process-wide world group.
pub fn get_world_group() -> Result<GroupCoordinator> {
    global_state().get_world_group()
}

/// The process-wide tensor-parallel group.
pub fn get_tp_group() -> Result<GroupCoordinator> {
    global_state().get_tp_group()
}

/// Alias of [`get_tp_group`], kept as in the seed.
pub fn get_tensor_model_parallel_group() -> Result<GroupCoordinator> {
    get_tp_group()
}

/// The process-wide pipeline-parallel group.
pub fn get_pp_group() -> Result<GroupCoordinator> {
    global_state().get_pp_group()
}

/// Alias of [`get_pp_group`], kept as in the seed.
pub fn get_pipeline_model_parallel_group() -> Result<GroupCoordinator> {
    get_pp_group()
}

/// The process-wide data-parallel group.
pub fn get_dp_group() -> Result<GroupCoordinator> {
    global_state().get_dp_group()
}

/// Size of the process-wide TP group.
pub fn get_tensor_model_parallel_world_size() -> Result<usize> {
    global_state().get_tensor_model_parallel_world_size()
}

/// This rank's position in the process-wide TP group.
pub fn get_tensor_model_parallel_rank() -> Result<usize> {
    global_state().get_tensor_model_parallel_rank()
}

/// [`ParallelState::graph_capture`] on the process-wide state.
pub fn graph_capture<R>(f: impl FnOnce(&GraphCaptureContext) -> Result<R>) -> Result<R> {
    global_state().graph_capture(f)
}

/// [`ParallelState::patch_tensor_parallel_group`] on the process-wide state.
pub fn patch_tensor_parallel_group(tp_group: GroupCoordinator) -> Result<TpGroupPatch<'static>> {
    global_state().patch_tensor_parallel_group(tp_group)
}

/// [`ParallelState::destroy_model_parallel`] on the process-wide state.
pub fn destroy_model_parallel() {
    global_state().destroy_model_parallel()
}

/// [`ParallelState::destroy_distributed_environment`] on the process-wide state.
pub fn destroy_distributed_environment() {
    global_state().destroy_distributed_environment()
}

/// The seed's `inplace_all_reduce(tensor, group_name)`: sums `tensor` in
/// place over the process-wide group registered as `group_name` (groups of
/// the process-wide state and those built with the seed's group
/// constructors; see [`crate::coordinator::lookup_group`]).
pub fn inplace_all_reduce(tensor: &mut Tensor, group_name: &str) -> Result<()> {
    crate::coordinator::lookup_group(group_name)?.all_reduce_in_place(tensor, ReduceOp::Sum)
}

/// The seed's `outplace_all_reduce(tensor, group_name)`: the sum of `tensor`
/// over the process-wide group registered as `group_name`.
pub fn outplace_all_reduce(tensor: &Tensor, group_name: &str) -> Result<Tensor> {
    crate::coordinator::lookup_group(group_name)?.all_reduce(tensor.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uninitialized_state_says_so() {
        let s = ParallelState::new();
        assert!(!s.is_initialized());
        assert!(!s.model_parallel_is_initialized());
        let e = s.get_tp_group().unwrap_err().to_string();
        assert!(e.contains("tensor model parallel group is not initialized"), "{e}");
        assert!(matches!(s.get_world_group(), Err(Error::NotInitialized(_))));
        assert!(matches!(s.initialize_model_parallel(1, 1, None), Err(Error::NotInitialized(_))));
        s.destroy_model_parallel();
        s.destroy_distributed_environment();
    }

    #[test]
    fn backends() {
        assert_eq!(check_backend("GLOO").unwrap(), Backend::Cpu);
        assert_eq!(check_backend("").unwrap(), Backend::Cpu);
        if cfg!(feature = "nccl") {
            assert_eq!(check_backend("nccl").unwrap(), Backend::Nccl);
        } else {
            assert!(matches!(check_backend("nccl"), Err(Error::Unsupported(_))));
        }
        assert!(matches!(check_backend("mpi"), Err(Error::Unsupported(_))));
        assert!(matches!(check_backend("hccl"), Err(Error::InvalidArgument(_))));
        assert_eq!(device_for(Backend::Nccl, 3), Device::Cuda(3));
        assert_eq!(device_for(Backend::Cpu, 3), Device::Cpu);
    }

    /// An NCCL world on a machine without the CUDA driver (this project's
    /// CI) is the probe's clean error, not a panic; the state stays
    /// uninitialized.
    #[cfg(feature = "nccl")]
    #[test]
    fn nccl_world_without_a_driver_is_a_clean_error() {
        if crate::device::probe::cuda_driver().is_ok() {
            return; // a GPU machine: scripts/gpu-check.sh covers this path
        }
        let s = ParallelState::new();
        let e = s
            .init_world_on(Arc::new(crate::HashStore::new()), 1, 0, 0, GroupOptions::default(), Device::Cuda(0))
            .unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
        assert!(e.to_string().contains("no CUDA driver found"), "{e}");
        assert!(s.get_world_group().is_err());
    }

    #[test]
    fn destroyed_differs_from_never_initialized() {
        let s = ParallelState::init_with_store(Arc::new(crate::HashStore::new()), 1, 0, 0).unwrap();
        s.initialize_model_parallel(1, 1, None).unwrap();
        let tp = s.get_tp_group().unwrap();
        assert_eq!(s.lookup_group("tp:0").unwrap().unique_name(), "tp:0");
        s.destroy_model_parallel();
        assert!(matches!(s.get_tp_group(), Err(Error::Destroyed(_))));
        assert!(matches!(s.lookup_group("tp:0"), Err(Error::Destroyed(_))));
        assert!(matches!(tp.barrier(), Err(Error::Destroyed(_))));
        assert!(s.get_world_group().is_ok());
        s.destroy_distributed_environment();
        assert!(matches!(s.get_world_group(), Err(Error::Destroyed(_))));
        assert!(matches!(s.initialize_model_parallel(1, 1, None), Err(Error::Destroyed(_))));
        let e = s.lookup_group("tp:7").unwrap_err();
        assert!(matches!(e, Error::NotFound(_)) && e.to_string().contains("tp:0"), "{e}");
    }
}
