//! [`DeviceGroup`]: the group a coordinator moves tensors over.
//!
//! The seed gives every coordinator a device group (NCCL on GPUs) next to
//! its CPU group. [`DeviceGroup::Cpu`] moves host tensors over a CPU process
//! group; with the `nccl` feature, `DeviceGroup::Nccl` moves CUDA tensors
//! through an NCCL communicator ([`crate::device::NcclComm`]).

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

    /// The stream a graph capture records on: the NCCL group's stream (its
    /// `CUstream` as an integer); `None` for a CPU group.
    pub fn capture_stream(&self) -> Option<u64> {
        match self {
            DeviceGroup::Cpu(_) => None,
            #[cfg(feature = "nccl")]
            DeviceGroup::Nccl(c) => Some(c.stream().cu_stream() as u64),
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

#[cfg(feature = "nccl")]
fn dev(t: &Tensor) -> Result<&crate::device::CudaBuffer> {
    t.cuda_buffer().ok_or_else(|| Error::Unsupported(format!("a tensor on {} in an NCCL group", t.device())))
}

#[cfg(feature = "nccl")]
fn dev_mut(t: &mut Tensor) -> Result<&mut crate::device::CudaBuffer> {
    let device = t.device();
    t.cuda_buffer_mut()?.ok_or_else(|| Error::Unsupported(format!("a tensor on {device} in an NCCL group")))
}
