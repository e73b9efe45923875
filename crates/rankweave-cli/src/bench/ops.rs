//! One descriptor per benchmarked operation: how a size maps to buffers, the
//! bus-bandwidth factor, the verifiable input pattern, one run, and the check.
//!
//! Conventions (nccl-tests'): `S` is the size printed and written to the CSV.
//! - all_reduce, broadcast, reduce, sendrecv: `S` is the buffer.
//! - all_gather and gather: `S` is the whole output (each rank sends `S/n`).
//! - reduce_scatter: `S` is the whole input (each rank receives `S/n`).
//! - all_to_all: `S` is each rank's whole send buffer (`n` blocks of `S/n`).
//!
//! Bus-bandwidth factors (nccl-tests' `busbw = algbw * factor`): all_reduce
//! `2(n-1)/n`; all_gather, reduce_scatter, all_to_all and gather `(n-1)/n`;
//! broadcast, reduce, sendrecv and object broadcasts 1.
//!
//! Verification data are small integers, exactly representable in every
//! dtype (bf16 holds integers up to 256 exactly), chosen per rank and per
//! element so that a block landing in the wrong place or a missing rank's
//! contribution changes the result.

use rankweave::collectives::shm::ShmBuf;
use rankweave::{DType, Element, Error, ProcessGroup, ReduceOp, Result};
use serde::{Deserialize, Serialize};

/// An operation `rankweave bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// In-place all_reduce.
    AllReduce,
    /// all_gather, sized by its output.
    AllGather,
    /// reduce_scatter, sized by its input.
    ReduceScatter,
    /// In-place broadcast from the root.
    Broadcast,
    /// In-place reduce to the root.
    Reduce,
    /// gather to the root, sized by the root's output.
    Gather,
    /// all_to_all, sized by one rank's send buffer.
    AllToAll,
    /// Ping-pong between ranks 0 and 1; time is half the round trip.
    SendRecv,
    /// Ping-pong of one zero-copy shared-memory buffer between ranks 0 and
    /// 1 (`shm_buffer`, `send_shm`, `recv_shm`): each hop writes one word
    /// per 4 KiB page before sending and reads them after receiving (with
    /// `--check 1`, rank 0 fills the pattern and both ranks verify every
    /// element); time is half the round trip. Shared-memory groups only.
    SendRecvShm,
    /// A serde object broadcast from the root over the group (size, then bytes).
    BcastObj,
    /// A serde object broadcast through the shared-memory MessageQueue.
    Mq,
}

impl OpKind {
    /// Every operation, in the order `all` runs them (`all` leaves out the
    /// MessageQueue and sendrecv_shm, which need shared memory).
    pub const ALL: [OpKind; 11] = [
        OpKind::AllReduce,
        OpKind::AllGather,
        OpKind::ReduceScatter,
        OpKind::Broadcast,
        OpKind::Reduce,
        OpKind::Gather,
        OpKind::AllToAll,
        OpKind::SendRecv,
        OpKind::SendRecvShm,
        OpKind::BcastObj,
        OpKind::Mq,
    ];

    /// The operations the anchor benchmarks measure (../bench-anchors).
    pub const ANCHORS: [OpKind; 5] =
        [OpKind::AllReduce, OpKind::AllGather, OpKind::Broadcast, OpKind::SendRecv, OpKind::BcastObj];

    /// The name on the command line and in the `op` column of the CSV.
    pub const fn name(self) -> &'static str {
        match self {
            OpKind::AllReduce => "all_reduce",
            OpKind::AllGather => "all_gather",
            OpKind::ReduceScatter => "reduce_scatter",
            OpKind::Broadcast => "broadcast",
            OpKind::Reduce => "reduce",
            OpKind::Gather => "gather",
            OpKind::AllToAll => "all_to_all",
            OpKind::SendRecv => "sendrecv",
            OpKind::SendRecvShm => "sendrecv_shm",
            OpKind::BcastObj => "bcast_obj",
            OpKind::Mq => "mq",
        }
    }

    /// The `op` column of the CSV: the MessageQueue is an object broadcast
    /// too, so it shares `bcast_obj` with the anchors and differs by `impl`.
    pub const fn csv_name(self) -> &'static str {
        match self {
            OpKind::Mq => "bcast_obj",
            other => other.name(),
        }
    }

    /// Parses one name (aliases: `allreduce`, `broadcast_object`, ...).
    pub fn parse(s: &str) -> Result<OpKind> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        Ok(match norm.as_str() {
            "all_reduce" | "allreduce" => OpKind::AllReduce,
            "all_gather" | "allgather" => OpKind::AllGather,
            "reduce_scatter" | "reducescatter" => OpKind::ReduceScatter,
            "broadcast" | "bcast" => OpKind::Broadcast,
            "reduce" => OpKind::Reduce,
            "gather" => OpKind::Gather,
            "all_to_all" | "alltoall" => OpKind::AllToAll,
            "sendrecv" | "send_recv" | "pingpong" => OpKind::SendRecv,
            "sendrecv_shm" | "pingpong_shm" => OpKind::SendRecvShm,
            "bcast_obj" | "broadcast_object" => OpKind::BcastObj,
            "mq" | "message_queue" => OpKind::Mq,
            _ => {
                return Err(Error::invalid(format!(
                    "unknown operation `{s}`; expected one of {}, `anchors` or `all`",
                    OpKind::ALL.map(OpKind::name).join(", ")
                )))
            }
        })
    }

    /// nccl-tests' bus-bandwidth factor at group size `n`.
    pub fn busbw_factor(self, n: usize) -> f64 {
        let n = n.max(1) as f64;
        match self {
            OpKind::AllReduce => 2.0 * (n - 1.0) / n,
            OpKind::AllGather | OpKind::ReduceScatter | OpKind::AllToAll | OpKind::Gather => (n - 1.0) / n,
            OpKind::Broadcast
            | OpKind::Reduce
            | OpKind::SendRecv
            | OpKind::SendRecvShm
            | OpKind::BcastObj
            | OpKind::Mq => 1.0,
        }
    }

    /// True when the operation has a root (printed in the `root` column).
    pub const fn rooted(self) -> bool {
        matches!(self, OpKind::Broadcast | OpKind::Reduce | OpKind::Gather | OpKind::BcastObj | OpKind::Mq)
    }

    /// True when the operation reduces (printed in the `redop` column).
    pub const fn reduces(self) -> bool {
        matches!(self, OpKind::AllReduce | OpKind::Reduce | OpKind::ReduceScatter)
    }

    /// True when the group API offers this operation in place (same buffer
    /// in and out); the others are measured out of place. rankweave's API
    /// has exactly one form of each, so the other column reads `N/A`.
    pub const fn in_place(self) -> bool {
        matches!(self, OpKind::AllReduce | OpKind::Broadcast | OpKind::Reduce)
    }

    /// True for the ping-pongs between ranks 0 and 1 (at least 2 ranks).
    pub const fn pairwise(self) -> bool {
        matches!(self, OpKind::SendRecv | OpKind::SendRecvShm)
    }

    /// True for the object broadcasts, which use two fixed objects instead of sizes.
    pub const fn is_object(self) -> bool {
        matches!(self, OpKind::BcastObj | OpKind::Mq)
    }

    /// Divisor applied to each measured time (sendrecv reports half a round trip).
    pub const fn time_divisor(self) -> f64 {
        match self {
            OpKind::SendRecv | OpKind::SendRecvShm => 2.0,
            _ => 1.0,
        }
    }
}

/// Parses a comma-separated list of operations; `anchors` expands to the
/// anchor set and `all` to every collective (the MessageQueue excluded).
pub fn parse_ops(s: &str) -> Result<Vec<OpKind>> {
    let mut out: Vec<OpKind> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let add: Vec<OpKind> = match part.to_ascii_lowercase().as_str() {
            "anchors" => OpKind::ANCHORS.to_vec(),
            "all" => OpKind::ALL.iter().copied().filter(|o| !matches!(o, OpKind::Mq | OpKind::SendRecvShm)).collect(),
            _ => vec![OpKind::parse(part)?],
        };
        for op in add {
            if !out.contains(&op) {
                out.push(op);
            }
        }
    }
    if out.is_empty() {
        return Err(Error::invalid("no operation given"));
    }
    Ok(out)
}

/// How one requested size becomes buffers for one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The size reported (`S`, in bytes), after rounding to whole elements.
    pub bytes: u64,
    /// Elements in `S`.
    pub count: usize,
    /// Elements per rank block (`S/n` for the blocked ops, `count` otherwise).
    pub block: usize,
}

/// The layout of `op` for a requested size of `size` bytes: at least one
/// element (one per rank for the blocked operations), sizes rounded down to
/// whole elements (whole blocks).
pub fn layout(op: OpKind, size: u64, dtype: DType, n: usize) -> Layout {
    let elt = dtype.size() as u64;
    let n = n.max(1);
    let elems = (size / elt).max(1) as usize;
    match op {
        OpKind::AllGather | OpKind::Gather | OpKind::ReduceScatter | OpKind::AllToAll => {
            let block = (elems / n).max(1);
            Layout { bytes: (block * n) as u64 * elt, count: block * n, block }
        }
        _ => Layout { bytes: elems as u64 * elt, count: elems, block: elems },
    }
}

/// A buffer aligned for every dtype (8 bytes), viewed as bytes or typed:
/// plain heap memory (what the anchors' buffers are), or with
/// `--huge-pages` a mapping on transparent huge pages
/// ([`rankweave::tensor::HostBuffer::try_zeroed_huge`]).
pub struct Buf {
    words: BufWords,
    len: usize,
}

enum BufWords {
    Plain(Vec<u64>),
    Huge(rankweave::tensor::HostBuffer),
}

impl Buf {
    /// `len` zero bytes of plain heap memory.
    pub fn zeroed(len: usize) -> Buf {
        Buf { words: BufWords::Plain(vec![0u64; len.div_ceil(8)]), len }
    }
    /// `len` zero bytes on huge pages (a whole huge page at least).
    pub fn zeroed_huge(len: usize) -> Result<Buf> {
        Ok(Buf { words: BufWords::Huge(rankweave::tensor::HostBuffer::try_zeroed_huge(len)?), len })
    }
    /// Whether the bytes lie on huge pages.
    #[cfg(test)]
    pub fn huge(&self) -> bool {
        matches!(self.words, BufWords::Huge(_))
    }
    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.words {
            BufWords::Plain(w) => &bytemuck::cast_slice(w)[..self.len],
            BufWords::Huge(h) => h.as_bytes(),
        }
    }
    /// The bytes, mutable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.words {
            BufWords::Plain(w) => &mut bytemuck::cast_slice_mut(w)[..self.len],
            BufWords::Huge(h) => h.as_bytes_mut(),
        }
    }
    /// Sets every byte to zero.
    pub fn zero(&mut self) {
        self.bytes_mut().fill(0);
    }
}

/// Conversions between an element type and f64 (exact for the small
/// integers the checks use).
pub trait Num: Element {
    /// Rounds `v` to this type.
    fn from_f64(v: f64) -> Self;
    /// Widens to f64.
    fn to_f64(self) -> f64;
}

macro_rules! num_as {
    ($($t:ty),*) => {$(
        impl Num for $t {
            fn from_f64(v: f64) -> Self { v as $t }
            fn to_f64(self) -> f64 { self as f64 }
        }
    )*};
}
num_as!(f32, f64, i8, u8, i32, i64);

macro_rules! num_half {
    ($($t:ty),*) => {$(
        impl Num for $t {
            fn from_f64(v: f64) -> Self { <$t>::from_f64(v) }
            fn to_f64(self) -> f64 { <$t>::to_f64(self) }
        }
    )*};
}
num_half!(half::f16, half::bf16);

/// Runs `$body` with `$T` bound to the element type of `$dtype`.
macro_rules! with_num {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            DType::I8 => {
                type $T = i8;
                $body
            }
            DType::U8 => {
                type $T = u8;
                $body
            }
            DType::I32 => {
                type $T = i32;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
        }
    };
}

/// Writes `f(i)` into element `i` of `bytes[..]` for every element.
pub fn fill(dtype: DType, bytes: &mut [u8], f: impl Fn(usize) -> f64) {
    with_num!(dtype, T => {
        let s: &mut [T] = bytemuck::cast_slice_mut(bytes);
        for (i, x) in s.iter_mut().enumerate() {
            *x = T::from_f64(f(i));
        }
    })
}

/// Counts elements of `bytes` that differ from `f(i)` by more than
/// `rel_tol * |f(i)|` (0 = exact).
pub fn count_wrong(dtype: DType, bytes: &[u8], rel_tol: f64, f: impl Fn(usize) -> f64) -> u64 {
    with_num!(dtype, T => {
        let s: &[T] = bytemuck::cast_slice(bytes);
        s.iter()
            .enumerate()
            .filter(|(i, x)| {
                let want = f(*i);
                let got = (**x).to_f64();
                let ok = (got - want).abs() <= rel_tol * want.abs();
                !ok
            })
            .count() as u64
    })
}

/// Verifiable data, as functions of rank, element index and group size.
pub mod pattern {
    use rankweave::{DType, ReduceOp};

    /// Rank `r`'s own data for the copy-only collectives: 1..=99, varying
    /// with the rank and the element.
    pub fn base(r: usize, i: usize) -> f64 {
        ((r * 7 + i % 13 + 1) % 100) as f64
    }

    /// all_to_all: element `j` of the block rank `src` sends to rank `dst`.
    pub fn a2a(src: usize, dst: usize, j: usize, n: usize) -> f64 {
        ((src * n + dst) % 64 + j % 31) as f64
    }

    /// Rank `r`'s input element `i` for a reduction with `op`.
    pub fn red_in(op: ReduceOp, r: usize, i: usize, n: usize) -> f64 {
        match op {
            ReduceOp::Sum => ((r + i) % 3) as f64,
            ReduceOp::Prod => {
                if r == i % n {
                    (i % 3 + 1) as f64
                } else {
                    1.0
                }
            }
            ReduceOp::Min | ReduceOp::Max => ((r + i) % n + i % 4) as f64,
            ReduceOp::Avg => (i % 5 + 1) as f64,
        }
    }

    /// The reduction of element `i` over `n` ranks.
    pub fn red_expect(op: ReduceOp, i: usize, n: usize) -> f64 {
        match op {
            ReduceOp::Sum => (0..n).map(|r| ((r + i) % 3) as f64).sum(),
            ReduceOp::Prod => (i % 3 + 1) as f64,
            ReduceOp::Min => (i % 4) as f64,
            ReduceOp::Max => ((n - 1) + i % 4) as f64,
            ReduceOp::Avg => (i % 5 + 1) as f64,
        }
    }

    /// Relative tolerance of the check: exact, except a float average,
    /// whose division may be done as a multiplication by `1/n`.
    pub fn tolerance(op: ReduceOp, dtype: DType) -> f64 {
        match (op, dtype) {
            (ReduceOp::Avg, DType::F16 | DType::BF16) => 1e-2,
            (ReduceOp::Avg, DType::F32 | DType::F64) => 1e-6,
            _ => 0.0,
        }
    }
}

/// Buffers and parameters of one (collective, size) measurement.
pub struct CollBench {
    op: OpKind,
    layout: Layout,
    dtype: DType,
    redop: ReduceOp,
    root: usize,
    rank: usize,
    n: usize,
    /// The in-place buffer, or the input.
    a: Buf,
    /// The output (empty for in-place operations and non-roots of gather).
    b: Buf,
    /// sendrecv only: rank 0 receives the echo into the buffer it sent, as
    /// the anchors' ping-pong does (one buffer per rank, the same working
    /// set). Off for the checked run, whose echo lands in the zeroed output
    /// so that a receive that wrote nothing is caught.
    echo_in_place: bool,
    /// sendrecv_shm: rank 0's buffer between runs.
    zc: Option<ShmBuf>,
    /// sendrecv_shm: fill and verify the pattern (else touch pages only).
    zc_check: bool,
    /// sendrecv_shm: wrong elements rank 1 saw.
    zc_wrong: u64,
}

impl CollBench {
    /// Allocates the buffers of `op` at `layout` for this rank.
    pub fn new(
        op: OpKind,
        layout: Layout,
        dtype: DType,
        redop: ReduceOp,
        root: usize,
        rank: usize,
        n: usize,
    ) -> Result<CollBench> {
        if op.is_object() {
            return Err(Error::invalid(format!("{} is not a sized collective", op.name())));
        }
        if op.pairwise() && n < 2 {
            return Err(Error::invalid(format!("{} needs at least 2 ranks", op.name())));
        }
        if op.rooted() && root >= n {
            return Err(Error::invalid(format!("root {root} is out of range for {n} ranks")));
        }
        let elt = dtype.size();
        let (a_elems, b_elems) = match op {
            OpKind::AllReduce | OpKind::Broadcast | OpKind::Reduce => (layout.count, 0),
            OpKind::AllGather => (layout.block, layout.count),
            OpKind::Gather => (layout.block, if rank == root { layout.count } else { 0 }),
            OpKind::ReduceScatter => (layout.count, layout.block),
            OpKind::AllToAll => (layout.count, layout.count),
            OpKind::SendRecv => {
                if rank < 2 {
                    (layout.count, layout.count)
                } else {
                    (0, 0)
                }
            }
            OpKind::SendRecvShm | OpKind::BcastObj | OpKind::Mq => (0, 0),
        };
        Ok(CollBench {
            op,
            layout,
            dtype,
            redop,
            root,
            rank,
            n,
            a: Buf::zeroed(a_elems * elt),
            b: Buf::zeroed(b_elems * elt),
            echo_in_place: false,
            zc: None,
            zc_check: false,
            zc_wrong: 0,
        })
    }

    /// With `huge`, puts the buffers on huge pages (`--huge-pages`); the
    /// zero-copy and object operations keep theirs.
    pub fn huge_pages(mut self, huge: bool) -> Result<CollBench> {
        if huge {
            for buf in [&mut self.a, &mut self.b] {
                if buf.len > 0 {
                    *buf = Buf::zeroed_huge(buf.len)?;
                }
            }
        }
        Ok(self)
    }

    /// Fills the inputs with this rank's verifiable pattern and the outputs
    /// with zeros (a value no check expects for a copied block).
    pub fn prepare_check(&mut self) {
        let (r, n, root, op, redop, block) = (self.rank, self.n, self.root, self.op, self.redop, self.layout.block);
        let dt = self.dtype;
        self.b.zero();
        self.echo_in_place = false;
        match op {
            OpKind::AllReduce | OpKind::Reduce | OpKind::ReduceScatter => {
                fill(dt, self.a.bytes_mut(), |i| pattern::red_in(redop, r, i, n))
            }
            OpKind::Broadcast | OpKind::AllGather | OpKind::Gather => {
                fill(dt, self.a.bytes_mut(), |i| pattern::base(r, i))
            }
            OpKind::AllToAll => fill(dt, self.a.bytes_mut(), |i| pattern::a2a(r, i / block, i % block, n)),
            OpKind::SendRecv => {
                if r == 0 {
                    fill(dt, self.a.bytes_mut(), |i| pattern::base(0, i))
                } else {
                    self.a.zero()
                }
            }
            OpKind::SendRecvShm => {
                self.zc = None;
                self.zc_check = true;
                self.zc_wrong = 0;
            }
            OpKind::BcastObj | OpKind::Mq => {}
        }
        let _ = root;
    }

    /// Zeroes every buffer: zeros are a fixed point of every reduction, so
    /// thousands of timed iterations never overflow or hit denormals.
    pub fn prepare_timing(&mut self) {
        self.a.zero();
        self.b.zero();
        self.echo_in_place = true;
        self.zc_check = false;
    }

    /// Runs the operation once.
    pub fn run(&mut self, comm: &ProcessGroup) -> Result<()> {
        let (dt, op, root) = (self.dtype, self.redop, self.root);
        match self.op {
            OpKind::AllReduce => comm.all_reduce_bytes(self.a.bytes_mut(), dt, op),
            OpKind::Broadcast => comm.broadcast_bytes(self.a.bytes_mut(), root),
            OpKind::Reduce => comm.reduce_bytes(self.a.bytes_mut(), dt, op, root),
            OpKind::AllGather => comm.all_gather_bytes(self.a.bytes(), self.b.bytes_mut()),
            OpKind::Gather => {
                let out = if self.rank == root { Some(self.b.bytes_mut()) } else { None };
                comm.gather_bytes(self.a.bytes(), out, root)
            }
            OpKind::ReduceScatter => comm.reduce_scatter_bytes(self.a.bytes(), self.b.bytes_mut(), dt, op),
            OpKind::AllToAll => comm.all_to_all_bytes(self.a.bytes(), self.b.bytes_mut()),
            OpKind::SendRecv => match self.rank {
                0 => {
                    comm.send_bytes(self.a.bytes(), 1)?;
                    let back = if self.echo_in_place { &mut self.a } else { &mut self.b };
                    comm.recv_bytes(back.bytes_mut(), 1)
                }
                1 => {
                    comm.recv_bytes(self.b.bytes_mut(), 0)?;
                    comm.send_bytes(self.b.bytes(), 0)
                }
                _ => Ok(()),
            },
            OpKind::SendRecvShm => self.run_zero_copy(comm),
            OpKind::BcastObj | OpKind::Mq => Err(Error::invalid("object broadcasts are not sized collectives")),
        }
    }

    /// Counts this rank's wrong elements after one run on
    /// [`CollBench::prepare_check`]'s data.
    pub fn verify(&self) -> u64 {
        let (r, n, root, redop, block, dt) = (self.rank, self.n, self.root, self.redop, self.layout.block, self.dtype);
        let tol = pattern::tolerance(redop, dt);
        match self.op {
            OpKind::AllReduce => count_wrong(dt, self.a.bytes(), tol, |i| pattern::red_expect(redop, i, n)),
            OpKind::Reduce if r == root => count_wrong(dt, self.a.bytes(), tol, |i| pattern::red_expect(redop, i, n)),
            OpKind::Reduce => 0,
            OpKind::Broadcast => count_wrong(dt, self.a.bytes(), 0.0, |i| pattern::base(root, i)),
            OpKind::AllGather => count_wrong(dt, self.b.bytes(), 0.0, |i| pattern::base(i / block, i % block)),
            OpKind::Gather if r == root => {
                count_wrong(dt, self.b.bytes(), 0.0, |i| pattern::base(i / block, i % block))
            }
            OpKind::Gather => 0,
            OpKind::ReduceScatter => {
                count_wrong(dt, self.b.bytes(), tol, |j| pattern::red_expect(redop, r * block + j, n))
            }
            OpKind::AllToAll => count_wrong(dt, self.b.bytes(), 0.0, |i| pattern::a2a(i / block, r, i % block, n)),
            OpKind::SendRecv if r < 2 => count_wrong(dt, self.b.bytes(), 0.0, |i| pattern::base(0, i)),
            OpKind::SendRecvShm if r == 0 => match &self.zc {
                Some(buf) => count_wrong(dt, buf, 0.0, |i| pattern::base(0, i)),
                None => self.layout.count as u64,
            },
            OpKind::SendRecvShm if r == 1 => self.zc_wrong,
            OpKind::SendRecv | OpKind::SendRecvShm | OpKind::BcastObj | OpKind::Mq => 0,
        }
    }

    /// One round trip of sendrecv_shm (see [`OpKind::SendRecvShm`]).
    fn run_zero_copy(&mut self, comm: &ProcessGroup) -> Result<()> {
        const PAGE: usize = 4096;
        let (dt, bytes) = (self.dtype, self.layout.bytes as usize);
        match self.rank {
            0 => {
                let mut buf = match self.zc.take() {
                    Some(b) => b,
                    None => comm.shm_buffer(bytes)?,
                };
                if self.zc_check {
                    fill(dt, &mut buf, |i| pattern::base(0, i));
                } else {
                    for p in buf.chunks_mut(PAGE) {
                        p[0] = p[0].wrapping_add(1);
                    }
                }
                comm.send_shm(buf, 1)?;
                let buf = comm.recv_shm(1)?;
                let seen = buf.chunks(PAGE).fold(0u8, |a, p| a ^ p[0]);
                std::hint::black_box(seen);
                self.zc = Some(buf);
                Ok(())
            }
            1 => {
                let mut buf = comm.recv_shm(0)?;
                if self.zc_check {
                    self.zc_wrong = count_wrong(dt, &buf, 0.0, |i| pattern::base(0, i));
                } else {
                    for p in buf.chunks_mut(PAGE) {
                        p[0] = p[0].wrapping_add(1);
                    }
                }
                comm.send_shm(buf, 0)
            }
            _ => Ok(()),
        }
    }
}

/// The small object of the anchors (RESULTS.md), as a serde struct:
/// `{"rank":0,"step":12345,"name":"decode","ids":[1,2,3,4],"flag":True,"req":"req-0001-abcdefgh"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmallObject {
    /// Sender rank.
    pub rank: i64,
    /// Step counter.
    pub step: i64,
    /// Phase name.
    pub name: String,
    /// Token ids.
    pub ids: Vec<i64>,
    /// A flag.
    pub flag: bool,
    /// Request id.
    pub req: String,
}

impl SmallObject {
    /// The anchors' object.
    pub fn anchor() -> SmallObject {
        SmallObject {
            rank: 0,
            step: 12345,
            name: "decode".into(),
            ids: vec![1, 2, 3, 4],
            flag: true,
            req: "req-0001-abcdefgh".into(),
        }
    }
}

/// The objects the object broadcasts send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BenchObject {
    /// The anchors' small dict.
    Small(SmallObject),
    /// The anchors' large object: `b"x" * 2**20`.
    Big(Blob),
}

/// Raw bytes that serialize as one byte string (length, then the bytes), as
/// Python pickles a `bytes` object, instead of element by element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Blob, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Blob;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<Blob, E> {
                Ok(Blob(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> std::result::Result<Blob, E> {
                Ok(Blob(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// Which of the two anchor objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjSize {
    /// The ~100-byte dict.
    Small,
    /// 1 MiB of bytes.
    Big,
}

impl ObjSize {
    /// Both, small first.
    pub const BOTH: [ObjSize; 2] = [ObjSize::Small, ObjSize::Big];

    /// The object.
    pub fn object(self) -> BenchObject {
        match self {
            ObjSize::Small => BenchObject::Small(SmallObject::anchor()),
            ObjSize::Big => BenchObject::Big(Blob(vec![b'x'; 1 << 20])),
        }
    }

    /// The `bytes` the anchors report for this object (its pickled size),
    /// so that compare.py puts rankweave's row beside theirs.
    pub const fn anchor_bytes(self) -> u64 {
        match self {
            ObjSize::Small => 103,
            ObjSize::Big => 1_048_585,
        }
    }

    /// The label in the CSV note (`obj=small`, `obj=1MiB`).
    pub const fn label(self) -> &'static str {
        match self {
            ObjSize::Small => "small",
            ObjSize::Big => "1MiB",
        }
    }
}

/// Encodes an object as the object broadcasts send it (postcard).
pub fn encode(obj: &BenchObject) -> Result<Vec<u8>> {
    postcard::to_stdvec(obj)
        .map_err(|e| Error::Serialization { ctx: rankweave::Context::op("bench.encode"), detail: e.to_string() })
}

/// Decodes what [`encode`] wrote; bad bytes are an error.
#[cfg(test)]
pub fn decode(bytes: &[u8]) -> Result<BenchObject> {
    postcard::from_bytes(bytes)
        .map_err(|e| Error::Serialization { ctx: rankweave::Context::op("bench.decode"), detail: e.to_string() })
}

/// Most bytes an object broadcast accepts from the root (a corrupt length
/// must not make a receiver allocate gigabytes).
pub const MAX_OBJECT_BYTES: u64 = 1 << 30;

/// Broadcasts an object from `root` over the group as the coordinator's
/// `broadcast_object` does ([`ProcessGroup::broadcast_object`]: on shared
/// memory one step, the object encoded straight into the segment and
/// decoded straight out of it). The root encodes on every call and the
/// others decode a fresh object, as users pay it; the root gets `None` (it
/// keeps its object).
pub fn broadcast_object(comm: &ProcessGroup, obj: Option<&BenchObject>, root: usize) -> Result<Option<BenchObject>> {
    let limits = rankweave::tensor::DecodeLimits { max_object_bytes: MAX_OBJECT_BYTES, ..Default::default() };
    comm.broadcast_object(obj, root, &limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_page_buffers_replace_plain_ones_and_keep_their_size() {
        let layout = layout(OpKind::SendRecv, 3 << 20, DType::F32, 2);
        let plain = CollBench::new(OpKind::SendRecv, layout, DType::F32, ReduceOp::Sum, 0, 0, 2).unwrap();
        assert!(!plain.a.huge() && !plain.b.huge());
        let mut huge = CollBench::new(OpKind::SendRecv, layout, DType::F32, ReduceOp::Sum, 0, 0, 2)
            .unwrap()
            .huge_pages(true)
            .unwrap();
        assert!(huge.a.huge() && huge.b.huge());
        assert_eq!((huge.a.bytes().len(), huge.b.bytes().len()), (3 << 20, 3 << 20));
        huge.a.bytes_mut()[5] = 9;
        huge.a.zero();
        assert!(huge.a.bytes().iter().all(|&b| b == 0));
        // Ranks without buffers (here rank 2 of a sendrecv) keep none.
        let idle = CollBench::new(OpKind::SendRecv, layout, DType::F32, ReduceOp::Sum, 0, 2, 3)
            .unwrap()
            .huge_pages(true)
            .unwrap();
        assert!(idle.a.bytes().is_empty() && !idle.a.huge());
    }

    #[test]
    fn busbw_factors_follow_nccl_tests() {
        assert_eq!(OpKind::AllReduce.busbw_factor(2), 1.0);
        assert_eq!(OpKind::AllReduce.busbw_factor(4), 1.5);
        assert_eq!(OpKind::AllReduce.busbw_factor(1), 0.0);
        assert_eq!(OpKind::AllGather.busbw_factor(2), 0.5);
        assert_eq!(OpKind::AllGather.busbw_factor(4), 0.75);
        assert_eq!(OpKind::ReduceScatter.busbw_factor(4), 0.75);
        assert_eq!(OpKind::AllToAll.busbw_factor(8), 0.875);
        assert_eq!(OpKind::Gather.busbw_factor(2), 0.5);
        for op in [OpKind::Broadcast, OpKind::Reduce, OpKind::SendRecv, OpKind::BcastObj, OpKind::Mq] {
            assert_eq!(op.busbw_factor(2), 1.0);
            assert_eq!(op.busbw_factor(7), 1.0);
        }
    }

    #[test]
    fn op_names_parse_and_match_the_anchor_csvs() {
        for op in OpKind::ALL {
            assert_eq!(OpKind::parse(op.name()).unwrap(), op);
        }
        assert_eq!(OpKind::parse("AllReduce").unwrap(), OpKind::AllReduce);
        assert_eq!(OpKind::parse("broadcast_object").unwrap(), OpKind::BcastObj);
        assert_eq!(OpKind::Mq.csv_name(), "bcast_obj");
        assert!(OpKind::parse("allreduce2").is_err());
        assert_eq!(parse_ops("anchors").unwrap(), OpKind::ANCHORS.to_vec());
        assert_eq!(parse_ops("all_reduce,all_reduce, sendrecv").unwrap(), vec![OpKind::AllReduce, OpKind::SendRecv]);
        assert_eq!(parse_ops("all").unwrap().len(), 9);
        assert!(parse_ops(" , ").is_err());
    }

    #[test]
    fn layouts_round_like_the_anchors() {
        let l = layout(OpKind::AllReduce, 8, DType::F32, 2);
        assert_eq!(l, Layout { bytes: 8, count: 2, block: 2 });
        let l = layout(OpKind::AllReduce, 3, DType::F32, 2);
        assert_eq!(l.bytes, 4, "at least one element");
        // all_gather at N=4: 8 B rounds up to one float per rank (16 B).
        let l = layout(OpKind::AllGather, 8, DType::F32, 4);
        assert_eq!(l, Layout { bytes: 16, count: 4, block: 1 });
        let l = layout(OpKind::AllGather, 1 << 20, DType::F32, 2);
        assert_eq!(l, Layout { bytes: 1 << 20, count: 1 << 18, block: 1 << 17 });
        let l = layout(OpKind::AllToAll, 100, DType::F64, 3);
        assert_eq!(l, Layout { bytes: 96, count: 12, block: 4 });
    }

    #[test]
    fn patterns_are_exact_in_every_dtype() {
        for dt in DType::ALL {
            for n in [1usize, 2, 3, 5, 8] {
                for op in ReduceOp::ALL {
                    let mut buf = Buf::zeroed(64 * dt.size());
                    fill(dt, buf.bytes_mut(), |i| pattern::red_expect(op, i, n));
                    assert_eq!(
                        count_wrong(dt, buf.bytes(), 0.0, |i| pattern::red_expect(op, i, n)),
                        0,
                        "{dt} {op} {n}"
                    );
                }
                let mut buf = Buf::zeroed(64 * dt.size());
                fill(dt, buf.bytes_mut(), |i| pattern::a2a(n - 1, n - 1, i, n));
                assert_eq!(count_wrong(dt, buf.bytes(), 0.0, |i| pattern::a2a(n - 1, n - 1, i, n)), 0);
            }
            let mut buf = Buf::zeroed(200 * dt.size());
            fill(dt, buf.bytes_mut(), |i| pattern::base(9, i));
            assert_eq!(count_wrong(dt, buf.bytes(), 0.0, |i| pattern::base(9, i)), 0);
            assert_eq!(count_wrong(dt, buf.bytes(), 0.0, |i| pattern::base(8, i)), 200);
        }
    }

    #[test]
    fn reduction_patterns_reduce_to_their_expectation() {
        for n in 1..=8 {
            for i in 0..40 {
                let col: Vec<f64> = (0..n).map(|r| pattern::red_in(ReduceOp::Sum, r, i, n)).collect();
                assert_eq!(col.iter().sum::<f64>(), pattern::red_expect(ReduceOp::Sum, i, n));
                let col: Vec<f64> = (0..n).map(|r| pattern::red_in(ReduceOp::Prod, r, i, n)).collect();
                assert_eq!(col.iter().product::<f64>(), pattern::red_expect(ReduceOp::Prod, i, n));
                let col: Vec<f64> = (0..n).map(|r| pattern::red_in(ReduceOp::Min, r, i, n)).collect();
                assert_eq!(col.iter().cloned().fold(f64::MAX, f64::min), pattern::red_expect(ReduceOp::Min, i, n));
                let col: Vec<f64> = (0..n).map(|r| pattern::red_in(ReduceOp::Max, r, i, n)).collect();
                assert_eq!(col.iter().cloned().fold(f64::MIN, f64::max), pattern::red_expect(ReduceOp::Max, i, n));
                let col: Vec<f64> = (0..n).map(|r| pattern::red_in(ReduceOp::Avg, r, i, n)).collect();
                assert_eq!(col.iter().sum::<f64>() / n as f64, pattern::red_expect(ReduceOp::Avg, i, n));
            }
        }
    }

    #[test]
    fn objects_round_trip_and_garbage_is_an_error() {
        for s in ObjSize::BOTH {
            let obj = s.object();
            let bytes = encode(&obj).unwrap();
            assert_eq!(decode(&bytes).unwrap(), obj);
            if s == ObjSize::Big {
                assert!(bytes.len() < (1 << 20) + 8, "one byte string: {}", bytes.len());
            }
        }
        assert!(decode(&[0xff, 0xff, 0xff]).is_err());
        assert!(decode(&[]).is_err());
    }
}
