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

/// What one call is doing, as every rank of the call must agree: the
/// operation, dtype, reduce op, root and this rank's buffer length in bytes
/// (which with the dtype fixes the element count), packed in 64 bits:
/// operation (8), dtype (4), reduce op (4), root (8), length (40).
///
/// The group computes it once per call; every transport carries it (the TCP
/// frame header, the shared-memory step line, the in-process message) and
/// every receiver compares it with its own, so ranks that call different
/// collectives, dtypes, ops, roots or sizes get [`crate::Error::Mismatch`]
/// naming both descriptors instead of corrupt data or a hang.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OpDesc(pub u64);

const DESC_LEN_MASK: u64 = (1 << 40) - 1;

impl OpDesc {
    /// No descriptor (internal messages checked by tag and length only).
    pub const NONE: OpDesc = OpDesc(0);

    /// The descriptor of `op` with `dtype`, `rop`, `root` over `len` bytes.
    /// Roots above 254 and lengths of 2^40 bytes or more are folded (they
    /// still compare equal on ranks that agree).
    pub fn new(
        op: OpCode,
        dtype: Option<crate::DType>,
        rop: Option<crate::ReduceOp>,
        root: Option<usize>,
        len: usize,
    ) -> OpDesc {
        let d = dtype.map_or(0xf, |d| d.code() as u64);
        let r = rop.map_or(0xf, |r| r as u64);
        let root = root.map_or(0xff, |x| x.min(0xfe) as u64);
        OpDesc(((op as u64) << 56) | (d << 52) | (r << 48) | (root << 40) | (len as u64 & DESC_LEN_MASK))
    }

    /// The operation, when the descriptor names one.
    pub fn op(self) -> Option<OpCode> {
        OpCode::from_u8((self.0 >> 56) as u8)
    }

    /// The buffer length in bytes (modulo 2^40).
    pub fn bytes(self) -> u64 {
        self.0 & DESC_LEN_MASK
    }

    /// Whether this is [`OpDesc::NONE`].
    pub fn is_none(self) -> bool {
        self == OpDesc::NONE
    }
}

impl std::fmt::Display for OpDesc {
    /// `all_reduce of 48 bytes of f32 (sum)`, `broadcast of 8 bytes with root 1`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_none() {
            return f.write_str("an internal message");
        }
        let op = self.op().map_or("?", |o| o.name());
        write!(f, "{op} of {} bytes", self.bytes())?;
        if let Some(d) = crate::DType::from_code(((self.0 >> 52) & 0xf) as u8) {
            write!(f, " of {d}")?;
        }
        if let Some(r) = crate::ReduceOp::ALL.get(((self.0 >> 48) & 0xf) as usize) {
            write!(f, " ({r})")?;
        }
        let root = (self.0 >> 40) & 0xff;
        if root != 0xff {
            write!(f, " with root {root}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for OpDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpDesc({self})")
    }
}

/// Identifies one message: the operation, its sequence number and the
/// descriptor of the call it belongs to.
///
/// Collectives use the group's sequence number (every rank counts the same);
/// point-to-point messages use a per-peer-pair counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag {
    /// The operation (of the algorithm's step; a collective may be built of
    /// others, e.g. all_reduce of reduce_scatter and all_gather steps).
    pub op: OpCode,
    /// The sequence number.
    pub seq: u64,
    /// The call's descriptor ([`OpDesc::NONE`] for internal messages).
    pub desc: OpDesc,
}

impl Tag {
    /// A tag for `op` at `seq`, without a descriptor.
    pub const fn new(op: OpCode, seq: u64) -> Self {
        Tag { op, seq, desc: OpDesc::NONE }
    }

    /// This tag carrying the call descriptor `desc`.
    pub const fn with_desc(self, desc: OpDesc) -> Self {
        Tag { desc, ..self }
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
