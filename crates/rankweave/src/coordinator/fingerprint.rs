//! Debug-detail mode: a fixed-size fingerprint of each coordinator call,
//! exchanged before the call so that ranks calling different operations (or
//! the same one with other dtypes or shapes) get an error naming the ranks
//! that differ instead of a hang or corrupted data.
//!
//! Collectives all-gather the fingerprints of every rank on the CPU group;
//! point-to-point calls send the sender's fingerprint to the receiver, which
//! checks that it is the matching half (`send` for `recv`, ...).

use crate::dtype::DType;
use crate::reduce::ReduceOp;

/// Size of an encoded fingerprint on the wire.
pub(crate) const FP_BYTES: usize = 64;
const NO_DTYPE: u8 = 0xFF;
const SHOWN_DIMS: usize = 4;

/// The coordinator operations, as fingerprinted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum CoordOp {
    AllReduce = 1,
    AllGather = 2,
    Gather = 3,
    Broadcast = 4,
    BroadcastObject = 5,
    BroadcastObjectList = 6,
    BroadcastTensorDict = 7,
    Barrier = 8,
    Send = 9,
    Recv = 10,
    SendObject = 11,
    RecvObject = 12,
    SendTensorDict = 13,
    RecvTensorDict = 14,
    Reduce = 15,
    ReduceScatter = 16,
    AllToAll = 17,
}

impl CoordOp {
    const ALL: [CoordOp; 17] = [
        CoordOp::AllReduce,
        CoordOp::AllGather,
        CoordOp::Gather,
        CoordOp::Broadcast,
        CoordOp::BroadcastObject,
        CoordOp::BroadcastObjectList,
        CoordOp::BroadcastTensorDict,
        CoordOp::Barrier,
        CoordOp::Send,
        CoordOp::Recv,
        CoordOp::SendObject,
        CoordOp::RecvObject,
        CoordOp::SendTensorDict,
        CoordOp::RecvTensorDict,
        CoordOp::Reduce,
        CoordOp::ReduceScatter,
        CoordOp::AllToAll,
    ];

    /// The operation whose discriminant is `code`.
    pub(crate) fn from_code(code: u8) -> Option<CoordOp> {
        CoordOp::ALL.into_iter().find(|o| *o as u8 == code)
    }

    pub(crate) const fn name(self) -> &'static str {
        match self {
            CoordOp::AllReduce => "all_reduce",
            CoordOp::AllGather => "all_gather",
            CoordOp::Gather => "gather",
            CoordOp::Broadcast => "broadcast",
            CoordOp::BroadcastObject => "broadcast_object",
            CoordOp::BroadcastObjectList => "broadcast_object_list",
            CoordOp::BroadcastTensorDict => "broadcast_tensor_dict",
            CoordOp::Barrier => "barrier",
            CoordOp::Send => "send",
            CoordOp::Recv => "recv",
            CoordOp::SendObject => "send_object",
            CoordOp::RecvObject => "recv_object",
            CoordOp::SendTensorDict => "send_tensor_dict",
            CoordOp::RecvTensorDict => "recv_tensor_dict",
            CoordOp::Reduce => "reduce",
            CoordOp::ReduceScatter => "reduce_scatter",
            CoordOp::AllToAll => "all_to_all",
        }
    }

    fn from_u8(b: u8) -> Option<CoordOp> {
        CoordOp::ALL.iter().copied().find(|o| *o as u8 == b)
    }

    /// The operation the peer of a point-to-point call must be running.
    pub(crate) const fn counterpart(self) -> CoordOp {
        match self {
            CoordOp::Send => CoordOp::Recv,
            CoordOp::Recv => CoordOp::Send,
            CoordOp::SendObject => CoordOp::RecvObject,
            CoordOp::RecvObject => CoordOp::SendObject,
            CoordOp::SendTensorDict => CoordOp::RecvTensorDict,
            CoordOp::RecvTensorDict => CoordOp::SendTensorDict,
            other => other,
        }
    }

    /// What the first argument means in a description (`src 0`, `dim -1`).
    const fn arg_name(self) -> Option<&'static str> {
        match self {
            CoordOp::AllGather | CoordOp::ReduceScatter => Some("dim"),
            CoordOp::Gather | CoordOp::Reduce => Some("dst"),
            CoordOp::AllToAll => Some("scatter_dim"),
            CoordOp::Broadcast
            | CoordOp::BroadcastObject
            | CoordOp::BroadcastObjectList
            | CoordOp::BroadcastTensorDict => Some("src"),
            _ => None,
        }
    }
}

/// One rank's description of the call it is about to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    pub op: u8,
    pub dtype: u8,
    pub ndim: u8,
    /// Second argument (gather's dim, broadcast_object_list's length).
    pub arg2: i32,
    /// First argument (root rank or dim).
    pub arg: i64,
    /// Per-group call counter (collectives only).
    pub counter: u64,
    pub dims: [u64; SHOWN_DIMS],
    pub shape_hash: u64,
}

fn hash_shape(shape: &[usize]) -> u64 {
    // FNV-1a over the dims: stable across processes, unlike `DefaultHasher`.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &d in shape {
        for b in (d as u64).to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Fingerprint {
    pub(crate) fn new(op: CoordOp, counter: u64) -> Self {
        Fingerprint {
            op: op as u8,
            dtype: NO_DTYPE,
            ndim: 0,
            arg2: 0,
            arg: 0,
            counter,
            dims: [0; SHOWN_DIMS],
            shape_hash: hash_shape(&[]),
        }
    }

    pub(crate) fn tensor(mut self, dtype: DType, shape: &[usize]) -> Self {
        self.dtype = dtype.code();
        self.ndim = shape.len().min(u8::MAX as usize) as u8;
        for (slot, &d) in self.dims.iter_mut().zip(shape) {
            *slot = d as u64;
        }
        self.shape_hash = hash_shape(shape);
        self
    }

    pub(crate) fn arg(mut self, arg: i64) -> Self {
        self.arg = arg;
        self
    }

    pub(crate) fn arg2(mut self, arg2: i32) -> Self {
        self.arg2 = arg2;
        self
    }

    pub(crate) fn encode(&self) -> [u8; FP_BYTES] {
        let mut b = [0u8; FP_BYTES];
        b[0] = self.op;
        b[1] = self.dtype;
        b[2] = self.ndim;
        b[4..8].copy_from_slice(&self.arg2.to_le_bytes());
        b[8..16].copy_from_slice(&self.arg.to_le_bytes());
        b[16..24].copy_from_slice(&self.counter.to_le_bytes());
        for (i, d) in self.dims.iter().enumerate() {
            b[24 + 8 * i..32 + 8 * i].copy_from_slice(&d.to_le_bytes());
        }
        b[56..64].copy_from_slice(&self.shape_hash.to_le_bytes());
        b
    }

    /// Decodes 64 bytes; never fails (unknown codes are described as such).
    pub(crate) fn decode(b: &[u8; FP_BYTES]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let mut dims = [0u64; SHOWN_DIMS];
        for (i, d) in dims.iter_mut().enumerate() {
            *d = u64_at(24 + 8 * i);
        }
        Fingerprint {
            op: b[0],
            dtype: b[1],
            ndim: b[2],
            arg2: i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            arg: u64_at(8) as i64,
            counter: u64_at(16),
            dims,
            shape_hash: u64_at(56),
        }
    }

    fn op(&self) -> Option<CoordOp> {
        CoordOp::from_u8(self.op)
    }

    /// `all_gather(shape [4, 8], float32, dim -1)`.
    pub(crate) fn describe(&self, with_counter: bool) -> String {
        let op = self.op();
        let mut parts = Vec::new();
        if self.dtype != NO_DTYPE {
            let shown = (self.ndim as usize).min(SHOWN_DIMS);
            let mut dims: Vec<String> = self.dims[..shown].iter().map(u64::to_string).collect();
            if self.ndim as usize > SHOWN_DIMS {
                dims.push(format!("... ({} dims, hash {:016x})", self.ndim, self.shape_hash));
            }
            parts.push(format!("shape [{}]", dims.join(", ")));
            parts
                .push(DType::from_code(self.dtype).map_or_else(|| format!("dtype #{}", self.dtype), |d| d.to_string()));
        }
        if let Some(name) = op.and_then(CoordOp::arg_name) {
            parts.push(format!("{name} {}", self.arg));
        }
        match op {
            Some(CoordOp::AllReduce) => {
                // Sum is the seed's only reduction: name the others.
                let red = usize::try_from(self.arg).ok().and_then(|i| ReduceOp::ALL.get(i));
                match red {
                    Some(ReduceOp::Sum) => {}
                    Some(r) => parts.push(format!("op {r}")),
                    None => parts.push(format!("op #{}", self.arg)),
                }
            }
            Some(CoordOp::Reduce | CoordOp::ReduceScatter) => {
                match usize::try_from(self.arg2).ok().and_then(|i| ReduceOp::ALL.get(i)) {
                    Some(ReduceOp::Sum) => {}
                    Some(r) => parts.push(format!("op {r}")),
                    None => parts.push(format!("op #{}", self.arg2)),
                }
            }
            Some(CoordOp::AllToAll) => parts.push(format!("gather_dim {}", self.arg2)),
            Some(CoordOp::Gather) => parts.push(format!("dim {}", self.arg2)),
            Some(CoordOp::BroadcastObjectList) => parts.push(format!("{} objects", self.arg2)),
            _ => {}
        }
        let name = op.map_or_else(|| format!("<unknown op {}>", self.op), |o| o.name().to_string());
        let mut s = format!("{name}({})", parts.join(", "));
        if with_counter {
            s.push_str(&format!(" as call #{} on this group", self.counter));
        }
        s
    }
}

fn ranks_str(ranks: &[usize]) -> String {
    let list: Vec<String> = ranks.iter().map(usize::to_string).collect();
    if ranks.len() == 1 {
        format!("rank {}", list[0])
    } else {
        format!("ranks {}", list.join(", "))
    }
}

/// Compares every rank's fingerprint (index = group rank) on rank `me`.
/// Returns `None` when all agree, else the first rank whose call differs
/// from `me`'s (never `me` itself) and a description such as `rank 1 called
/// all_gather(shape [4, 8], float32, dim 0) while rank 0 called
/// all_reduce(shape [4, 8], float32)`, the same on every rank.
pub(crate) fn compare(all: &[Fingerprint], me: usize) -> Option<(usize, String)> {
    let reference = all.first()?;
    if all.iter().all(|f| f == reference) {
        return None;
    }
    // Classes of identical fingerprints, in order of first appearance.
    let mut classes: Vec<(&Fingerprint, Vec<usize>)> = Vec::new();
    for (r, f) in all.iter().enumerate() {
        match classes.iter_mut().find(|(g, _)| *g == f) {
            Some((_, v)) => v.push(r),
            None => classes.push((f, vec![r])),
        }
    }
    let counters_differ = all.iter().any(|f| f.counter != reference.counter);
    let (ref_fp, ref_ranks) = &classes[0];
    let ref_desc = ref_fp.describe(counters_differ);
    let parts: Vec<String> = classes[1..]
        .iter()
        .map(|(fp, ranks)| {
            format!(
                "{} called {} while {} called {}",
                ranks_str(ranks),
                fp.describe(counters_differ),
                ranks_str(ref_ranks),
                ref_desc
            )
        })
        .collect();
    let mine = all.get(me).unwrap_or(reference);
    let peer = all.iter().position(|f| f != mine).unwrap_or(classes[1].1[0]);
    Some((peer, parts.join("; ")))
}

/// Checks a point-to-point peer's fingerprint against this rank's call.
/// `mine` is this rank's fingerprint; returns a description on mismatch.
pub(crate) fn compare_p2p(mine: &Fingerprint, my_rank: usize, theirs: &Fingerprint, peer: usize) -> Option<String> {
    let my_op = mine.op()?;
    let ok_op = theirs.op == my_op.counterpart() as u8;
    let ok_tensor = !matches!(my_op, CoordOp::Send | CoordOp::Recv)
        || (mine.dtype == theirs.dtype && mine.ndim == theirs.ndim && mine.shape_hash == theirs.shape_hash);
    if ok_op && ok_tensor {
        return None;
    }
    Some(format!("rank {peer} called {} while rank {my_rank} called {}", theirs.describe(false), mine.describe(false)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let f = Fingerprint::new(CoordOp::Gather, 7).tensor(DType::BF16, &[1, 2, 3, 4, 5]).arg(3).arg2(-1);
        assert_eq!(Fingerprint::decode(&f.encode()), f);
        assert!(f.describe(false).starts_with("gather(shape [1, 2, 3, 4, ... (5 dims"));
        assert!(f.describe(false).ends_with("bfloat16, dst 3, dim -1)"), "{}", f.describe(false));
        // Arbitrary bytes decode to something printable.
        let junk = Fingerprint::decode(&[0xAB; FP_BYTES]);
        assert!(junk.describe(true).contains("unknown op"));
    }

    #[test]
    fn compare_names_the_differing_ranks() {
        let ar = Fingerprint::new(CoordOp::AllReduce, 0).tensor(DType::F32, &[4, 8]);
        let ag = Fingerprint::new(CoordOp::AllGather, 0).tensor(DType::F32, &[4, 8]).arg(0);
        assert_eq!(compare(&[ar.clone(), ar.clone()], 0), None);
        let (peer, msg) = compare(&[ar.clone(), ag.clone(), ar.clone()], 0).unwrap();
        assert_eq!(peer, 1);
        // The odd one out names the first rank that differs from it.
        let (peer1, msg1) = compare(&[ar.clone(), ag.clone(), ar.clone()], 1).unwrap();
        assert_eq!((peer1, &msg1), (0, &msg));
        assert_eq!(compare(&[ar.clone(), ag.clone(), ar.clone()], 2).unwrap().0, 1);
        assert_eq!(
            msg,
            "rank 1 called all_gather(shape [4, 8], float32, dim 0) while ranks 0, 2 called all_reduce(shape [4, 8], float32)"
        );
        let max = Fingerprint::new(CoordOp::AllReduce, 0).tensor(DType::F32, &[4, 8]).arg(ReduceOp::Max as i64);
        let (_, msg) = compare(&[ar.clone(), max], 0).unwrap();
        assert!(
            msg.contains(
                "all_reduce(shape [4, 8], float32, op max) while rank 0 called all_reduce(shape [4, 8], float32)"
            ),
            "{msg}"
        );
        let later = Fingerprint::new(CoordOp::AllReduce, 1).tensor(DType::F32, &[4, 8]);
        let (_, msg) = compare(&[ar, later], 1).unwrap();
        assert!(msg.contains("call #1") && msg.contains("call #0"), "{msg}");
    }

    #[test]
    fn p2p_pairs() {
        let s = Fingerprint::new(CoordOp::Send, 0).tensor(DType::F32, &[4]);
        let r = Fingerprint::new(CoordOp::Recv, 0).tensor(DType::F32, &[4]);
        let r2 = Fingerprint::new(CoordOp::Recv, 0).tensor(DType::F32, &[4, 2]);
        assert_eq!(compare_p2p(&r, 1, &s, 0), None);
        let msg = compare_p2p(&r2, 1, &s, 0).unwrap();
        assert_eq!(msg, "rank 0 called send(shape [4], float32) while rank 1 called recv(shape [4, 2], float32)");
        let so = Fingerprint::new(CoordOp::SendObject, 0);
        assert!(compare_p2p(&r, 1, &so, 0).is_some());
    }
}
