//! CUDA tensors and the NCCL device group (feature `nccl`).
//!
//! The CUDA driver and NCCL are loaded at run time through cudarc's dynamic
//! loading, so the crate builds on a machine with neither (no toolkit, no
//! GPU). Before the first call into either library, [`probe`] looks for it
//! under the names cudarc will try, and a missing one is a clean
//! [`crate::Error::Unsupported`] (`no CUDA driver found ...`, `NCCL library
//! not found ...`) instead of cudarc's panic.
//!
//! - [`CudaDevice`] / [`CudaBuffer`]: a device's primary context and stream,
//!   and the device bytes behind a tensor on [`crate::tensor::Device::Cuda`]
//!   ([`crate::tensor::Storage::Cuda`]).
//! - [`NcclComm`]: one group's communicator, in NCCL's non-blocking mode,
//!   with a deadline on every operation and an abort when it passes (see its
//!   module for why no `unsafe impl Sync` is needed).
//!   Its operations run on the group's stream, on a caller's stream
//!   ([`NcclComm::with_stream`], waiting or enqueue-only: [`Completion`]),
//!   or on a graph capture's ([`NcclComm::capture_on`], [`capture_graph`]);
//!   [`NcclComm::batch_p2p`] groups sends and receives (a send to self at
//!   world size 1 included).
//! - [`exchange_unique_id`]: rank 0's unique id to every rank over a CPU
//!   group, as the seed's `PyNcclCommunicator` does.
//! - [`IpcBuffer`] / [`IpcHandle`] / [`IpcMapping`]: device memory shared
//!   between processes on one GPU through CUDA IPC (NCCL refuses two ranks
//!   on one GPU; IPC does not).
//!
//! Status: this code builds and its device-free parts are tested on the
//! project's CI machine, which has no GPU. The device paths (allocation,
//! copies, every NCCL operation, the caller's stream, graph capture, IPC)
//! have **not yet run on a GPU**;
//! `scripts/gpu-check.sh` is the check to run on one.

mod cuda;
mod graph;
mod ipc;
mod mapping;
mod nccl;
pub mod probe;

pub use cuda::{driver_version, wait_for_stream, CudaBuffer, CudaDevice, MIN_DRIVER_VERSION};
pub use graph::capture_graph;
pub use ipc::{IpcBuffer, IpcHandle, IpcMapping, IPC_HANDLE_BYTES};
pub use mapping::{exchange_unique_id, nccl_dtype, nccl_op, MIN_NCCL_VERSION, UNIQUE_ID_BYTES};
pub use nccl::{nccl_version, new_unique_id, CaptureRoute, Completion, NcclComm, NcclOnStream, P2p};

/// cudarc's stream and graph types, as this module's API takes and returns
/// them.
pub use cudarc::driver::{CudaGraph, CudaStream};
