//! [`DeviceGroup`]: the group a coordinator moves tensors over.
//!
//! The seed gives every coordinator a device group (NCCL on GPUs) next to
//! its CPU group. [`DeviceGroup::Cpu`] moves host tensors over a CPU process
//! group; with the `nccl` feature, `DeviceGroup::Nccl` moves CUDA tensors
//! through an NCCL communicator ([`crate::device::NcclComm`]).
//!
//! Both run a batch of sends and receives as one call
//! ([`DeviceGroup::batch_isend_irecv`], a send to this rank itself included
//! when its receive is in the batch). An NCCL group also runs its
//! operations on a caller's stream ([`DeviceGroup::with_stream`]) and, while
//! a coordinator's `graph_capture` routes it, on the capture stream.

use super::GraphCaptureContext;
use crate::error::{Error, Result};
use crate::group::ProcessGroup;
use crate::reduce::ReduceOp;
use crate::tensor::{Device, Tensor};
#[cfg(feature = "nccl")]
use std::sync::Arc;

/// The group a [`super::GroupCoordinator`] runs its tensor collectives on.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum DeviceGroup {
    /// A CPU process group: tensors in host memory over shared memory or TCP.
    Cpu(ProcessGroup),
    /// An NCCL communicator over CUDA tensors (feature `nccl`).
    #[cfg(feature = "nccl")]
    Nccl(Arc<crate::device::NcclComm>),
}

impl DeviceGroup {
    /// The device its tensors live on.
    pub fn device(&self) -> Device {
        match self {
            DeviceGroup::Cpu(_) => Device::Cpu,
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => Device::Cuda(c.device().ordinal()),
        }
    }

    /// The underlying CPU process group, when it is one.
    pub fn as_process_group(&self) -> Option<&ProcessGroup> {
        match self {
            DeviceGroup::Cpu(pg) => Some(pg),
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(_) => None,
        }
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        match self {
            DeviceGroup::Cpu(pg) => pg.size(),
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => c.size(),
        }
    }

    /// This rank's position.
    pub fn rank(&self) -> usize {
        match self {
            DeviceGroup::Cpu(pg) => pg.rank(),
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => c.rank(),
        }
    }

    /// The group's own name (the coordinator reports errors under its name).
    pub fn name(&self) -> &str {
        match self {
            DeviceGroup::Cpu(pg) => pg.name(),
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => c.name(),
        }
    }

    /// The NCCL communicator, when this is an NCCL group.
    #[cfg(feature = "nccl")]
    pub fn as_nccl(&self) -> Option<&crate::device::NcclComm> {
        match self {
            DeviceGroup::Nccl(c) => Some(c),
            DeviceGroup::Cpu(_) => None,
        }
    }

    /// The stream a graph capture records on: the capture stream routing
    /// this NCCL group's operations while a capture is active, else the
    /// group's own stream (its `CUstream` as an integer); `None` for a CPU
    /// group.
    pub fn capture_stream(&self) -> Option<u64> {
        match self {
            DeviceGroup::Cpu(_) => None,
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => Some(c.capture_stream().unwrap_or_else(|| c.stream().clone()).cu_stream() as u64),
        }
    }

    /// The context of a new graph capture: none for a CPU group; for an
    /// NCCL group a fresh stream, ordered after the work enqueued so far on
    /// the group's and the device's streams.
    pub(crate) fn new_capture_context(&self) -> Result<GraphCaptureContext> {
        match self {
            DeviceGroup::Cpu(_) => Ok(GraphCaptureContext::default()),
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => {
                let s = c.new_capture_stream()?;
                Ok(GraphCaptureContext { stream: Some(s.cu_stream() as u64), cuda: Some(s) })
            }
        }
    }

    /// Routes this group's operations to `context`'s stream until the
    /// returned guard drops (nothing to route for a CPU group or a context
    /// without a CUDA stream).
    pub(crate) fn route_capture(&self, context: &GraphCaptureContext) -> Result<Option<CaptureGuard<'_>>> {
        match self {
            DeviceGroup::Cpu(_) => {
                let _ = context;
                Ok(None)
            }
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => match &context.cuda {
                Some(s) => Ok(Some(CaptureGuard { _route: c.capture_on(s)? })),
                None => Ok(None),
            },
        }
    }

    /// This NCCL group's operations on the caller's `stream` (on the
    /// group's device), completing as `completion` says (see
    /// [`crate::device::NcclComm::with_stream`]). A CPU group has no
    /// streams: an error.
    #[cfg(feature = "nccl")]
    pub fn with_stream(
        &self,
        stream: &Arc<crate::device::CudaStream>,
        completion: crate::device::Completion,
    ) -> Result<DeviceOnStream<'_>> {
        match self {
            DeviceGroup::Nccl(c) => Ok(DeviceOnStream { group: self, ops: c.with_stream(stream, completion)? }),
            DeviceGroup::Cpu(pg) => {
                Err(Error::Unsupported(format!("group {} is a CPU group: it has no CUDA streams", pg.name())))
            }
        }
    }

    /// Runs the sends and receives of `ops` as one call (torch's
    /// `batch_isend_irecv`): on NCCL one group call; on a CPU group the
    /// transfers with each peer in order, peers in ascending rank, the
    /// lower rank of a pair sending first. Transfers to this rank itself
    /// are allowed when paired (the k-th send to self goes to the k-th
    /// receive from self, equal lengths); a lone one is an error, not a
    /// hang.
    pub fn batch_isend_irecv(&self, ops: &mut [P2pOp<'_>]) -> Result<()> {
        for o in ops.iter() {
            self.check(o.tensor())?;
        }
        match self {
            DeviceGroup::Cpu(pg) => cpu_batch(pg, ops),
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => c.batch_p2p(&mut nccl_ops(ops)?),
        }
    }

    fn check(&self, t: &Tensor) -> Result<()> {
        if t.device() != self.device() {
            return Err(Error::Unsupported(format!(
                "a tensor on {} in a device group of {}",
                t.device(),
                self.device()
            )));
        }
        Ok(())
    }

    /// In-place all-reduce of `t` (the tensor's device must be the group's).
    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.check(t)?;
        let dtype = t.dtype();
        match self {
            DeviceGroup::Cpu(pg) => pg.all_reduce_bytes(t.as_bytes_mut()?, dtype, op),
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => c.all_reduce(dev_mut(t)?, dtype, op),
        }
    }

    /// Gathers every rank's `input` into `out` (`(size, *input.shape)`, rank order).
    pub fn all_gather(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        self.check(input)?;
        match self {
            DeviceGroup::Cpu(pg) => pg.all_gather_bytes(input.as_bytes()?, out.as_bytes_mut()?),
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => c.all_gather(dev(input)?, dev_mut(out)?),
        }
    }

    /// Gathers every rank's `input` into `out` on `root` (`Some` there only).
    pub fn gather(&self, input: &Tensor, out: Option<&mut Tensor>, root: usize) -> Result<()> {
        self.check(input)?;
        match self {
            DeviceGroup::Cpu(pg) => {
                let out = match out {
                    Some(t) => Some(t.as_bytes_mut()?),
                    None => None,
                };
                pg.gather_bytes(input.as_bytes()?, out, root)
            }
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => {
                let out = match out {
                    Some(t) => Some(dev_mut(t)?),
                    None => None,
                };
                c.gather(dev(input)?, out, root)
            }
        }
    }

    /// In-place broadcast of `t` from group rank `root`.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.check(t)?;
        match self {
            DeviceGroup::Cpu(pg) => pg.broadcast_bytes(t.as_bytes_mut()?, root),
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => c.broadcast(dev_mut(t)?, root),
        }
    }

    /// In-place reduce of `t` onto group rank `root`.
    pub fn reduce(&self, t: &mut Tensor, op: ReduceOp, root: usize) -> Result<()> {
        self.check(t)?;
        let dtype = t.dtype();
        match self {
            DeviceGroup::Cpu(pg) => pg.reduce_bytes(t.as_bytes_mut()?, dtype, op, root),
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => c.reduce(dev_mut(t)?, dtype, op, root),
        }
    }

    /// Reduces `input` (`size` equal leading blocks) and leaves block `rank` in `out`.
    pub fn reduce_scatter(&self, input: &Tensor, out: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.check(input)?;
        let dtype = input.dtype();
        match self {
            DeviceGroup::Cpu(pg) => pg.reduce_scatter_bytes(input.as_bytes()?, out.as_bytes_mut()?, dtype, op),
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => c.reduce_scatter(dev(input)?, dev_mut(out)?, dtype, op),
        }
    }

    /// Sends leading block `j` of `input` to rank `j`; block `i` of `out` comes from rank `i`.
    pub fn all_to_all(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        self.check(input)?;
        match self {
            DeviceGroup::Cpu(pg) => pg.all_to_all_bytes(input.as_bytes()?, out.as_bytes_mut()?),
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => c.all_to_all(dev(input)?, dev_mut(out)?),
        }
    }

    /// Sends `t` to group rank `dst`.
    pub fn send(&self, t: &Tensor, dst: usize) -> Result<()> {
        self.check(t)?;
        match self {
            DeviceGroup::Cpu(pg) => pg.send_bytes(t.as_bytes()?, dst),
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => c.send(dev(t)?, dst),
        }
    }

    /// Receives into `t` from group rank `src`.
    pub fn recv(&self, t: &mut Tensor, src: usize) -> Result<()> {
        self.check(t)?;
        match self {
            DeviceGroup::Cpu(pg) => pg.recv_bytes(t.as_bytes_mut()?, src),
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => c.recv(dev_mut(t)?, src),
        }
    }
}

/// Keeps a group's operations on a capture stream (see
/// [`DeviceGroup::route_capture`]).
pub(crate) struct CaptureGuard<'a> {
    #[cfg(feature = "nccl")]
    _route: crate::device::CaptureRoute<'a>,
    #[cfg(not(feature = "nccl"))]
    _never: std::marker::PhantomData<&'a ()>,
}

/// One transfer of [`DeviceGroup::batch_isend_irecv`]: a tensor and the
/// group rank on the other end.
#[derive(Debug)]
pub enum P2pOp<'a> {
    /// Send the tensor's bytes to the rank.
    Send(&'a Tensor, usize),
    /// Receive the tensor's bytes from the rank.
    Recv(&'a mut Tensor, usize),
}

impl P2pOp<'_> {
    fn tensor(&self) -> &Tensor {
        match self {
            P2pOp::Send(t, _) => t,
            P2pOp::Recv(t, _) => t,
        }
    }
    fn shape(&self) -> P2pShape {
        match self {
            P2pOp::Send(t, peer) => P2pShape { send: true, peer: *peer, len: t.nbytes() },
            P2pOp::Recv(t, peer) => P2pShape { send: false, peer: *peer, len: t.nbytes() },
        }
    }
}

/// What the checks of a point-to-point batch look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct P2pShape {
    pub(crate) send: bool,
    pub(crate) peer: usize,
    pub(crate) len: usize,
}

/// What a valid batch tells about its peers.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct P2pPlan {
    /// The only peer of the batch, when there is exactly one (errors name it).
    pub(crate) single_peer: Option<usize>,
}

/// Checks a batch of sends and receives on rank `rank` of `size`: every
/// peer in range, and the transfers to this rank itself paired (the k-th
/// send to self with the k-th receive from self, equal lengths). A lone
/// send to self would wait forever for its receive; this refuses it.
pub(crate) fn p2p_plan(
    rank: usize,
    size: usize,
    ops: impl Iterator<Item = P2pShape>,
) -> std::result::Result<P2pPlan, String> {
    let (mut to_self, mut from_self) = (Vec::new(), Vec::new());
    let mut peers: Option<Option<usize>> = None;
    for o in ops {
        if o.peer >= size {
            return Err(format!("rank {} out of range for {size} ranks", o.peer));
        }
        if o.peer == rank {
            if o.send {
                to_self.push(o.len);
            } else {
                from_self.push(o.len);
            }
        }
        peers = Some(match peers {
            None => Some(o.peer),
            Some(Some(p)) if p == o.peer => Some(p),
            Some(_) => None,
        });
    }
    if to_self.len() != from_self.len() {
        return Err(format!(
            "{} sends to this rank ({rank}) itself and {} receives from it: each send to self needs its receive in \
             the same batch",
            to_self.len(),
            from_self.len()
        ));
    }
    if let Some(k) = to_self.iter().zip(&from_self).position(|(a, b)| a != b) {
        return Err(format!("send {k} to this rank itself has {} bytes but its receive {}", to_self[k], from_self[k]));
    }
    Ok(P2pPlan { single_peer: peers.flatten() })
}

/// The CPU group's batch: paired transfers to self as copies, then each
/// peer in ascending rank order, the lower rank of a pair sending first.
fn cpu_batch(pg: &ProcessGroup, ops: &mut [P2pOp<'_>]) -> Result<()> {
    let rank = pg.rank();
    p2p_plan(rank, pg.size(), ops.iter().map(P2pOp::shape))
        .map_err(|m| Error::invalid(format!("batch_isend_irecv in group {} on rank {rank}: {m}", pg.name())))?;
    // Transfers to self: the k-th send into the k-th receive.
    let sends: Vec<usize> =
        ops.iter().enumerate().filter(|(_, o)| matches!(o, P2pOp::Send(_, p) if *p == rank)).map(|(i, _)| i).collect();
    let recvs: Vec<usize> =
        ops.iter().enumerate().filter(|(_, o)| matches!(o, P2pOp::Recv(_, p) if *p == rank)).map(|(i, _)| i).collect();
    for (&s, &r) in sends.iter().zip(&recvs) {
        let src = match &ops[s] {
            P2pOp::Send(t, _) => *t,
            P2pOp::Recv(..) => unreachable!("index of a send"),
        };
        if let P2pOp::Recv(dst, _) = &mut ops[r] {
            dst.as_bytes_mut()?.copy_from_slice(src.as_bytes()?);
        }
    }
    let mut peers: Vec<usize> = ops.iter().map(|o| o.shape().peer).filter(|&p| p != rank).collect();
    peers.sort_unstable();
    peers.dedup();
    for peer in peers {
        let phases: [bool; 2] = if rank < peer { [true, false] } else { [false, true] };
        for send_phase in phases {
            for o in ops.iter_mut() {
                match o {
                    P2pOp::Send(t, p) if *p == peer && send_phase => pg.send_bytes(t.as_bytes()?, peer)?,
                    P2pOp::Recv(t, p) if *p == peer && !send_phase => pg.recv_bytes(t.as_bytes_mut()?, peer)?,
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

#[cfg(feature = "nccl")]
fn nccl_ops<'a>(ops: &'a mut [P2pOp<'_>]) -> Result<Vec<crate::device::P2p<'a>>> {
    ops.iter_mut()
        .map(|o| match o {
            P2pOp::Send(t, peer) => Ok(crate::device::P2p::Send(dev(t)?, *peer)),
            P2pOp::Recv(t, peer) => Ok(crate::device::P2p::Recv(dev_mut(t)?, *peer)),
        })
        .collect()
}

/// An NCCL group's operations on a caller's stream, on tensors
/// ([`DeviceGroup::with_stream`]). Each method is the [`DeviceGroup`]
/// method of the same name, on the stream.
#[cfg(feature = "nccl")]
#[derive(Debug)]
pub struct DeviceOnStream<'a> {
    group: &'a DeviceGroup,
    ops: crate::device::NcclOnStream<'a>,
}

#[cfg(feature = "nccl")]
impl DeviceOnStream<'_> {
    /// The stream.
    pub fn stream(&self) -> &Arc<crate::device::CudaStream> {
        self.ops.stream()
    }
    /// Waits for the stream's work so far, within the group's timeout,
    /// checking NCCL's asynchronous errors (see
    /// [`crate::device::NcclOnStream::synchronize`]).
    pub fn synchronize(&self) -> Result<()> {
        self.ops.synchronize()
    }
    /// In-place all-reduce of `t`.
    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.group.check(t)?;
        let dtype = t.dtype();
        self.ops.all_reduce(dev_mut(t)?, dtype, op)
    }
    /// Gathers every rank's `input` into `out`.
    pub fn all_gather(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        self.group.check(input)?;
        self.ops.all_gather(dev(input)?, dev_mut(out)?)
    }
    /// Gathers every rank's `input` into `out` on `root`.
    pub fn gather(&self, input: &Tensor, out: Option<&mut Tensor>, root: usize) -> Result<()> {
        self.group.check(input)?;
        let out = match out {
            Some(t) => Some(dev_mut(t)?),
            None => None,
        };
        self.ops.gather(dev(input)?, out, root)
    }
    /// In-place broadcast of `t` from `root`.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.group.check(t)?;
        self.ops.broadcast(dev_mut(t)?, root)
    }
    /// In-place reduce of `t` onto `root`.
    pub fn reduce(&self, t: &mut Tensor, op: ReduceOp, root: usize) -> Result<()> {
        self.group.check(t)?;
        let dtype = t.dtype();
        self.ops.reduce(dev_mut(t)?, dtype, op, root)
    }
    /// Reduces `input` and leaves block `rank` in `out`.
    pub fn reduce_scatter(&self, input: &Tensor, out: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.group.check(input)?;
        let dtype = input.dtype();
        self.ops.reduce_scatter(dev(input)?, dev_mut(out)?, dtype, op)
    }
    /// Block `j` of `input` to rank `j`; block `i` of `out` from rank `i`.
    pub fn all_to_all(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        self.group.check(input)?;
        self.ops.all_to_all(dev(input)?, dev_mut(out)?)
    }
    /// Sends `t` to `dst`.
    pub fn send(&self, t: &Tensor, dst: usize) -> Result<()> {
        self.group.check(t)?;
        self.ops.send(dev(t)?, dst)
    }
    /// Receives into `t` from `src`.
    pub fn recv(&self, t: &mut Tensor, src: usize) -> Result<()> {
        self.group.check(t)?;
        self.ops.recv(dev_mut(t)?, src)
    }
    /// [`DeviceGroup::batch_isend_irecv`] on the stream.
    pub fn batch_isend_irecv(&self, ops: &mut [P2pOp<'_>]) -> Result<()> {
        for o in ops.iter() {
            self.group.check(o.tensor())?;
        }
        self.ops.batch_p2p(&mut nccl_ops(ops)?)
    }
}

#[cfg(feature = "nccl")]
fn dev(t: &Tensor) -> Result<&crate::device::CudaBuffer> {
    t.cuda_buffer().ok_or_else(|| Error::Unsupported(format!("a tensor on {} in an NCCL group", t.device())))
}

#[cfg(feature = "nccl")]
fn dev_mut(t: &mut Tensor) -> Result<&mut crate::device::CudaBuffer> {
    let device = t.device();
    t.cuda_buffer_mut()?.ok_or_else(|| Error::Unsupported(format!("a tensor on {device} in an NCCL group")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(send: bool, peer: usize, len: usize) -> P2pShape {
        P2pShape { send, peer, len }
    }

    #[test]
    fn a_batch_pairs_its_transfers_to_self_and_refuses_lone_ones() {
        // World size 1: a send to self with its receive is one valid batch.
        let ok = p2p_plan(0, 1, [shape(true, 0, 8), shape(false, 0, 8)].into_iter()).unwrap();
        assert_eq!(ok.single_peer, Some(0));
        // Pairs go in order: the k-th send with the k-th receive.
        let two = [shape(true, 0, 4), shape(false, 0, 4), shape(false, 0, 16), shape(true, 0, 16)];
        assert!(p2p_plan(0, 1, two.into_iter()).is_ok());
        let crossed = [shape(true, 0, 4), shape(true, 0, 16), shape(false, 0, 16), shape(false, 0, 4)];
        let e = p2p_plan(0, 1, crossed.into_iter()).unwrap_err();
        assert!(e.contains("send 0") && e.contains("4 bytes") && e.contains("16"), "{e}");
        // A lone send to self would wait forever: refused.
        let e = p2p_plan(0, 1, [shape(true, 0, 8)].into_iter()).unwrap_err();
        assert!(e.contains("1 sends") && e.contains("0 receives"), "{e}");
        // Peers out of range are named.
        let e = p2p_plan(1, 2, [shape(false, 2, 8)].into_iter()).unwrap_err();
        assert!(e.contains("rank 2 out of range for 2 ranks"), "{e}");
        // Transfers with other ranks need no pairing here; several peers
        // leave no single peer to name.
        let mixed = [shape(true, 0, 8), shape(false, 2, 8), shape(true, 2, 1)];
        assert_eq!(p2p_plan(1, 3, mixed.into_iter()).unwrap().single_peer, None);
        assert_eq!(p2p_plan(1, 3, [shape(true, 2, 1)].into_iter()).unwrap().single_peer, Some(2));
        assert_eq!(p2p_plan(0, 2, std::iter::empty()).unwrap().single_peer, None);
    }

    #[test]
    fn a_cpu_group_of_one_sends_to_itself_in_a_batch() {
        let store: crate::store::SharedStore = std::sync::Arc::new(crate::store::HashStore::new());
        let pg = ProcessGroup::new_world(store, 0, 1, crate::GroupOptions::default()).unwrap();
        let g = DeviceGroup::Cpu(pg);
        let a = Tensor::vec1(&[1.5f32, -2.0, 3.0]);
        let b = Tensor::vec1(&[7i64, 8]);
        let (mut ra, mut rb) =
            (Tensor::zeros([3], crate::DType::F32).unwrap(), Tensor::zeros([2], crate::DType::I64).unwrap());
        g.batch_isend_irecv(&mut [
            P2pOp::Recv(&mut ra, 0),
            P2pOp::Send(&a, 0),
            P2pOp::Send(&b, 0),
            P2pOp::Recv(&mut rb, 0),
        ])
        .unwrap();
        assert_eq!((ra, rb), (a.clone(), b.clone()));
        let e = g.batch_isend_irecv(&mut [P2pOp::Send(&a, 0)]).unwrap_err().to_string();
        assert!(e.contains("needs its receive"), "{e}");
        let mut short = Tensor::zeros([2], crate::DType::F32).unwrap();
        let e = g.batch_isend_irecv(&mut [P2pOp::Send(&a, 0), P2pOp::Recv(&mut short, 0)]).unwrap_err().to_string();
        assert!(e.contains("12 bytes but its receive 8"), "{e}");
        g.batch_isend_irecv(&mut []).unwrap();
    }

    #[test]
    fn three_cpu_ranks_exchange_with_everyone_in_one_batch_each() {
        // Each rank sends to every rank (itself included) and receives
        // from every rank, receives listed in descending rank order: as
        // plain blocking calls in this order the ranks would wait on each
        // other; as a batch they do not.
        let store: crate::store::SharedStore = std::sync::Arc::new(crate::store::HashStore::new());
        let hs: Vec<_> = (0..3)
            .map(|rank| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let opts =
                        crate::GroupOptions { timeout: std::time::Duration::from_secs(60), ..Default::default() };
                    let pg = ProcessGroup::new_world(store, rank, 3, opts).unwrap();
                    let g = DeviceGroup::Cpu(pg);
                    // 4 MiB each: more than a transport buffers without a reader.
                    const N: usize = 1 << 20;
                    let out: Vec<Tensor> = (0..3).map(|r| Tensor::vec1(&vec![(10 * rank + r) as i32; N])).collect();
                    let mut got: Vec<Tensor> = (0..3).map(|_| Tensor::zeros([N], crate::DType::I32).unwrap()).collect();
                    let mut ops: Vec<P2pOp<'_>> =
                        got.iter_mut().enumerate().rev().map(|(r, t)| P2pOp::Recv(t, r)).collect();
                    ops.extend(out.iter().enumerate().map(|(r, t)| P2pOp::Send(t, r)));
                    g.batch_isend_irecv(&mut ops).unwrap();
                    drop(ops);
                    for (r, t) in got.iter().enumerate() {
                        assert_eq!(t.to_vec::<i32>().unwrap(), vec![(10 * r + rank) as i32; N], "rank {rank} from {r}");
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    }
}
