//! Recording device work into a CUDA graph (the capture a coordinator's
//! `graph_capture` gives a stream for).

use super::cuda::driver_err;
use super::probe;
use crate::error::{Error, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaStream};
use std::sync::Arc;

/// Records what `f` enqueues on `stream` into a CUDA graph and returns
/// `f`'s result with the instantiated graph (launch it with
/// [`CudaGraph::launch`], on `stream`; synchronize `stream` before reading
/// its outputs elsewhere).
///
/// The capture is in relaxed mode: calls on other threads are not
/// affected, and calls that are merely "unsafe" during a capture are
/// allowed; illegal ones (a query or host wait on the capturing stream)
/// still invalidate it, which is why an NCCL group only enqueues while its
/// stream captures ([`super::NcclComm::capture_on`]). The capture always
/// ends, also when `f` fails (then its error is returned and the partial
/// graph dropped). A capture that recorded nothing is an error.
///
/// The graph holds raw device addresses: every buffer a captured
/// operation used must stay alive, and at the same address (no
/// copy-on-write of a shared tensor), for as long as the graph is
/// launched.
pub fn capture_graph<R>(stream: &Arc<CudaStream>, f: impl FnOnce() -> Result<R>) -> Result<(R, CudaGraph)> {
    probe::cuda_driver()?;
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(|e| driver_err("graph capture (begin)", e))?;
    let r = f();
    let graph = stream.end_capture(CUgraphInstantiate_flags(0));
    let r = r?;
    match graph.map_err(|e| driver_err("graph capture (end and instantiate)", e))? {
        Some(g) => Ok((r, g)),
        None => Err(Error::invalid("graph capture: nothing was recorded on the capture stream")),
    }
}
