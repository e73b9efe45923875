//! rankweave: vLLM's distributed state layer in Rust.
//!
//! Process groups with every collective, the `GroupCoordinator`, the
//! model-parallel layout (world, tensor-, pipeline- and data-parallel groups)
//! and a shared-memory broadcaster, on CPU today.
#![warn(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod collectives;
pub mod coordinator;
pub mod dtype;
pub mod error;
pub mod group;
pub mod message_queue;
pub mod parallel_state;
pub mod reduce;
pub mod store;
mod sync;
pub mod sys;
pub mod tensor;
pub mod transport;

pub use dtype::{DType, Element};
pub use error::{Context, Error, Result};
pub use group::{GroupOptions, ProcessGroup, TransportKind};
pub use reduce::ReduceOp;
pub use store::{HashStore, PrefixStore, SharedStore, Store};
pub use store::{Rendezvous, TcpStore, TcpStoreServer};
