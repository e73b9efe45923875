//! [`DeviceGroup`]: the group a coordinator moves tensors over.
//!
//! The seed gives every coordinator a device group (NCCL on GPUs) next to
//! its CPU group. This build has only CPU process groups, so the one variant
//! is [`DeviceGroup::Cpu`]; a device backend adds its own variant here and
//! implements the tensor operations below for it, without touching the
//! coordinator.

use crate::error::{Error, Result};
use crate::group::ProcessGroup;
use crate::reduce::ReduceOp;
use crate::tensor::{Device, Tensor};

/// The group a [`super::GroupCoordinator`] runs its tensor collectives on.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum DeviceGroup {
    /// A CPU process group: tensors in host memory over shared memory or TCP.
    Cpu(ProcessGroup),
}

impl DeviceGroup {
    /// The device its tensors live on.
    pub fn device(&self) -> Device {
        match self {
            DeviceGroup::Cpu(_) => Device::Cpu,
        }
    }

    /// The underlying CPU process group, when it is one.
    pub fn as_process_group(&self) -> Option<&ProcessGroup> {
        match self {
            DeviceGroup::Cpu(pg) => Some(pg),
        }
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        match self {
            DeviceGroup::Cpu(pg) => pg.size(),
        }
    }

    /// This rank's position.
    pub fn rank(&self) -> usize {
        match self {
            DeviceGroup::Cpu(pg) => pg.rank(),
        }
    }

    /// The group's own name (the coordinator reports errors under its name).
    pub fn name(&self) -> &str {
        match self {
            DeviceGroup::Cpu(pg) => pg.name(),
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

    pub(crate) fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.check(t)?;
        let dtype = t.dtype();
        match self {
            DeviceGroup::Cpu(pg) => pg.all_reduce_bytes(t.as_bytes_mut()?, dtype, op),
        }
    }

    pub(crate) fn all_gather(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        self.check(input)?;
        match self {
            DeviceGroup::Cpu(pg) => pg.all_gather_bytes(input.as_bytes()?, out.as_bytes_mut()?),
        }
    }

    pub(crate) fn gather(&self, input: &Tensor, out: Option<&mut Tensor>, root: usize) -> Result<()> {
        self.check(input)?;
        match self {
            DeviceGroup::Cpu(pg) => {
                let out = match out {
                    Some(t) => Some(t.as_bytes_mut()?),
                    None => None,
                };
                pg.gather_bytes(input.as_bytes()?, out, root)
            }
        }
    }

    pub(crate) fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.check(t)?;
        match self {
            DeviceGroup::Cpu(pg) => pg.broadcast_bytes(t.as_bytes_mut()?, root),
        }
    }

    pub(crate) fn reduce(&self, t: &mut Tensor, op: ReduceOp, root: usize) -> Result<()> {
        self.check(t)?;
        let dtype = t.dtype();
        match self {
            DeviceGroup::Cpu(pg) => pg.reduce_bytes(t.as_bytes_mut()?, dtype, op, root),
        }
    }

    pub(crate) fn reduce_scatter(&self, input: &Tensor, out: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.check(input)?;
        let dtype = input.dtype();
        match self {
            DeviceGroup::Cpu(pg) => pg.reduce_scatter_bytes(input.as_bytes()?, out.as_bytes_mut()?, dtype, op),
        }
    }

    pub(crate) fn all_to_all(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        self.check(input)?;
        match self {
            DeviceGroup::Cpu(pg) => pg.all_to_all_bytes(input.as_bytes()?, out.as_bytes_mut()?),
        }
    }

    pub(crate) fn send(&self, t: &Tensor, dst: usize) -> Result<()> {
        self.check(t)?;
        match self {
            DeviceGroup::Cpu(pg) => pg.send_bytes(t.as_bytes()?, dst),
        }
    }

    pub(crate) fn recv(&self, t: &mut Tensor, src: usize) -> Result<()> {
        self.check(t)?;
        match self {
            DeviceGroup::Cpu(pg) => pg.recv_bytes(t.as_bytes_mut()?, src),
        }
    }
}
