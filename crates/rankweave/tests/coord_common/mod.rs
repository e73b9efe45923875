//! Ranks as threads over one in-process store, for the coordinator and
//! parallel-state tests.
#![allow(dead_code)]

use rankweave::parallel_state::ParallelState;
use rankweave::{GroupOptions, HashStore, SharedStore};
use std::sync::Arc;
use std::time::Duration;

/// Per-operation deadline in tests: long enough for 2 busy cores, short
/// enough that a bug fails the test instead of hanging CI.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Group options for tests.
pub fn opts() -> GroupOptions {
    GroupOptions { timeout: TEST_TIMEOUT, ..GroupOptions::default() }
}

/// A fresh in-process store.
pub fn store() -> SharedStore {
    let s = HashStore::new();
    s.set_timeout_for_tests();
    Arc::new(s)
}

trait TestTimeout {
    fn set_timeout_for_tests(&self);
}

impl TestTimeout for HashStore {
    fn set_timeout_for_tests(&self) {
        rankweave::Store::set_timeout(self, TEST_TIMEOUT);
    }
}

/// Runs `f(rank, store)` on `world` threads sharing one store; returns the
/// results in rank order and re-raises the first panic with its rank.
pub fn run_ranks<R, F>(world: usize, f: F) -> Vec<R>
where
    R: Send + 'static,
    F: Fn(usize, SharedStore) -> R + Send + Sync + 'static,
{
    let store = store();
    let f = Arc::new(f);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let f = Arc::clone(&f);
            let store = Arc::clone(&store);
            std::thread::Builder::new()
                .name(format!("rank{rank}"))
                .spawn(move || f(rank, store))
                .expect("spawn rank thread")
        })
        .collect();
    let mut out = Vec::with_capacity(world);
    let mut panic = None;
    for (rank, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(r) => out.push(r),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic.get_or_insert(format!("rank {rank} panicked: {msg}"));
            }
        }
    }
    if let Some(p) = panic {
        panic!("{p}");
    }
    out
}

/// A world state for `rank` of `world` over `store`.
pub fn world_state(store: SharedStore, world: usize, rank: usize) -> ParallelState {
    let s = ParallelState::new();
    s.init_world_with_store(store, world, rank, rank, opts()).expect("init world");
    s
}

/// Runs `f(rank, state)` with the world and the model-parallel groups
/// (`tp x pp x dp`) initialized on every rank.
pub fn run_parallel<R, F>(tp: usize, pp: usize, dp: usize, f: F) -> Vec<R>
where
    R: Send + 'static,
    F: Fn(usize, &ParallelState) -> R + Send + Sync + 'static,
{
    let world = tp * pp * dp;
    run_ranks(world, move |rank, store| {
        let s = world_state(store, world, rank);
        let cfg = rankweave::parallel_state::ModelParallelConfig::new(tp, pp).with_dp(dp);
        s.initialize_model_parallel_with(cfg, None).expect("initialize_model_parallel");
        let r = f(rank, &s);
        s.destroy_model_parallel();
        s.destroy_distributed_environment();
        r
    })
}
