//! rankweave: vLLM's distributed state layer in Rust.
//!
//! Process groups with every collective, the [`coordinator::GroupCoordinator`],
//! the model-parallel layout (world, tensor-, pipeline- and data-parallel
//! groups) and a shared-memory broadcaster, on CPU today.
//!
//! Four ranks, run here as threads over an in-process store, form a
//! tensor-parallel x pipeline-parallel layout of 2 x 2 and all-reduce
//! inside their tensor-parallel group, exactly as vLLM's
//! `get_tp_group().all_reduce(x)`:
//!
//! ```
//! use rankweave::parallel_state::ParallelState;
//! use rankweave::tensor::Tensor;
//! use rankweave::{HashStore, SharedStore};
//! use std::sync::Arc;
//!
//! let store: SharedStore = Arc::new(HashStore::new());
//! let ranks: Vec<_> = (0..4)
//!     .map(|rank| {
//!         let store = store.clone();
//!         std::thread::spawn(move || -> rankweave::Result<Vec<f32>> {
//!             let state = ParallelState::init_with_store(store, 4, rank, rank)?;
//!             state.initialize_model_parallel(2, 2, None)?;
//!             let tp = state.get_tp_group()?; // ranks [0, 1] or [2, 3]
//!             let x = Tensor::from_vec(vec![rank as f32; 3], [3])?;
//!             tp.all_reduce(x)?.to_vec::<f32>()
//!         })
//!     })
//!     .collect();
//! let sums: Vec<Vec<f32>> = ranks.into_iter().map(|h| h.join().expect("rank thread").unwrap()).collect();
//! assert_eq!(sums[0], vec![1.0; 3]); // 0 + 1
//! assert_eq!(sums[3], vec![5.0; 3]); // 2 + 3
//! ```
//!
//! Across processes, start the program with `rankweave launch
//! --nproc-per-node N -- PROGRAM` and call
//! [`parallel_state::init_distributed_environment`] with `env://`.
//!
//! Layers, bottom up: [`store`] (rendezvous), [`transport`] (point-to-point
//! bytes: the TCP mesh), [`collectives`] (algorithms over a transport, and the
//! shared-memory collectives), [`backend`] (the seam: one [`backend::Communicator`]
//! per group, built by a [`group::BackendFactory`]), [`group`] (process
//! groups), [`tensor`], [`coordinator`], [`message_queue`],
//! [`parallel_state`], [`segments`] (shared-memory naming and cleanup).
#![warn(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod collectives;
pub mod coordinator;
#[cfg(feature = "nccl")]
pub mod device;
pub mod dtype;
pub mod error;
pub mod group;
pub mod message_queue;
pub mod parallel_state;
pub mod reduce;
pub mod segments;
pub mod store;
mod sync;
mod sys;
pub mod tensor;
pub mod transport;
mod validate;

pub use dtype::{DType, Element};
pub use error::{Context, Error, Result};
pub use group::{GroupOptions, ProcessGroup, TransportKind};
pub use reduce::ReduceOp;
pub use store::{HashStore, PrefixStore, SharedStore, Store};
pub use store::{Rendezvous, TcpStore, TcpStoreServer};

/// The README's Rust code, compiled as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
