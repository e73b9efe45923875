//! Point-to-point byte movement between the ranks of one group.
//!
//! A [`Transport`] knows peers by group-local rank and moves byte buffers
//! with a [`Tag`] and a deadline. It knows nothing of tensors or algorithms.
//! Every message carries a header (group id, sequence number, operation,
//! length) so that a receiver detects a peer that runs another collective or
//! another size, and reports it instead of hanging or corrupting data.

pub mod mem;
pub mod tcp;

use crate::error::Result;
use std::time::Instant;

/// Which operation a message belongs to; carried in every header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum OpCode {
    /// all_reduce.
    AllReduce = 1,
    /// broadcast.
    Broadcast = 2,
    /// all_gather.
    AllGather = 3,
    /// gather.
    Gather = 4,
    /// scatter.
    Scatter = 5,
    /// reduce.
    Reduce = 6,
    /// reduce_scatter.
    ReduceScatter = 7,
    /// all_to_all.
    AllToAll = 8,
    /// point-to-point send/recv.
    SendRecv = 9,
    /// barrier.
    Barrier = 10,
    /// object send/recv/broadcast (coordinator level).
    Object = 11,
    /// debug-mode fingerprint exchange.
    Fingerprint = 12,
    /// connection handshake.
    Hello = 13,
}

impl OpCode {
    /// Every opcode.
    pub const ALL: [OpCode; 13] = [
        OpCode::AllReduce,
        OpCode::Broadcast,
        OpCode::AllGather,
        OpCode::Gather,
        OpCode::Scatter,
        OpCode::Reduce,
        OpCode::ReduceScatter,
        OpCode::AllToAll,
        OpCode::SendRecv,
        OpCode::Barrier,
        OpCode::Object,
        OpCode::Fingerprint,
        OpCode::Hello,
    ];

    /// The operation's name as users know it.
    pub const fn name(self) -> &'static str {
        match self {
            OpCode::AllReduce => "all_reduce",
            OpCode::Broadcast => "broadcast",
            OpCode::AllGather => "all_gather",
            OpCode::Gather => "gather",
            OpCode::Scatter => "scatter",
            OpCode::Reduce => "reduce",
            OpCode::ReduceScatter => "reduce_scatter",
            OpCode::AllToAll => "all_to_all",
            OpCode::SendRecv => "send/recv",
            OpCode::Barrier => "barrier",
            OpCode::Object => "object",
            OpCode::Fingerprint => "fingerprint",
            OpCode::Hello => "hello",
        }
    }

    /// Decodes a wire byte.
    pub fn from_u8(b: u8) -> Option<OpCode> {
        OpCode::ALL.iter().copied().find(|o| *o as u8 == b)
    }
}

/// Identifies one message: the operation and its sequence number.
///
/// Collectives use the group's sequence number (every rank counts the same);
/// point-to-point messages use a per-peer-pair counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag {
    /// The operation.
    pub op: OpCode,
    /// The sequence number.
    pub seq: u64,
}

impl Tag {
    /// A tag for `op` at `seq`.
    pub const fn new(op: OpCode, seq: u64) -> Self {
        Tag { op, seq }
    }
}

/// Moves bytes between the ranks of one group.
///
/// Implementations are `Send + Sync`; the group serializes operations, but
/// `send_recv` must make progress on both directions at once so that a ring
/// of ranks each sending a large buffer to its neighbour never deadlocks.
/// Every call fails at `deadline` at the latest, with an error naming the
/// operation, the group, this rank and the peer.
pub trait Transport: Send + Sync {
    /// This rank in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// The group's unique name, for errors.
    fn group_name(&self) -> &str;
    /// Sends `data` to `peer`. The receiver must post a `recv` with the same
    /// tag and length; anything else is reported as a mismatch there.
    fn send(&self, peer: usize, tag: Tag, data: &[u8], deadline: Instant) -> Result<()>;
    /// Receives exactly `buf.len()` bytes from `peer`, checking the header
    /// against `tag` and the length.
    fn recv(&self, peer: usize, tag: Tag, buf: &mut [u8], deadline: Instant) -> Result<()>;
    /// Sends `data` to `to` while receiving `buf` from `from`, both at once.
    #[allow(clippy::too_many_arguments)]
    fn send_recv(
        &self,
        to: usize,
        send_tag: Tag,
        data: &[u8],
        from: usize,
        recv_tag: Tag,
        buf: &mut [u8],
        deadline: Instant,
    ) -> Result<()>;
}
