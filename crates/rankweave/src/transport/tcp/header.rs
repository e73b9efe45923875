//! The wire format of one TCP frame header.
//!
//! Every frame on a rankweave TCP connection is a fixed 40-byte header
//! followed by `len` payload bytes. All integers are little-endian:
//!
//! ```text
//! offset size field
//!      0    4 magic  b"RKWV"
//!      4    1 version (WIRE_VERSION)
//!      5    1 op      an OpCode byte, or ABORT_OP (0xFF)
//!      6    2 reserved, zero
//!      8    8 group id (hash of the group's store namespace)
//!     16    8 sequence number
//!     24    8 payload length in bytes
//!     32    8 the call's descriptor (crate::transport::OpDesc; 0 = none)
//! ```
//!
//! [`decode_header`] is pure and total: any byte string either decodes to a
//! [`Header`] or returns [`Error::Protocol`]; it never panics.

use crate::error::{Context, Error, Result};
use crate::transport::OpCode;

/// Size of an encoded header in bytes.
pub const HEADER_LEN: usize = 40;
/// The four bytes every header starts with.
pub const MAGIC: [u8; 4] = *b"RKWV";
/// Wire protocol version; a peer with another version is rejected.
pub const WIRE_VERSION: u8 = 2;
/// Reserved op byte of an ABORT frame (not an [`OpCode`]).
pub const ABORT_OP: u8 = 0xFF;
/// Reserved op byte of a PROBE frame (not an [`OpCode`]): no payload; its
/// sequence number and descriptor say which collective the sender waits in.
pub const PROBE_OP: u8 = 0xFE;
/// Largest payload an ABORT frame may carry.
pub const MAX_ABORT_PAYLOAD: u64 = 1024;
/// Largest payload a data frame may announce (256 TiB; anything larger is garbage).
pub const MAX_PAYLOAD: u64 = 1 << 48;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Data of an operation (or a handshake, [`OpCode::Hello`]).
    Op(OpCode),
    /// The sender's group failed; the payload names the culprit rank and why.
    Abort,
    /// The sender has waited a while for data from the receiver in the
    /// collective its sequence number and descriptor name (no payload).
    Probe,
}

impl FrameKind {
    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        match self {
            FrameKind::Op(op) => op as u8,
            FrameKind::Abort => ABORT_OP,
            FrameKind::Probe => PROBE_OP,
        }
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Op(op) => op.name(),
            FrameKind::Abort => "abort",
            FrameKind::Probe => "probe",
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// What the frame carries.
    pub kind: FrameKind,
    /// The group this frame belongs to.
    pub group_id: u64,
    /// Sequence number (collective counter, or per-peer point-to-point counter).
    pub seq: u64,
    /// Payload length in bytes.
    pub len: u64,
    /// The descriptor of the call the frame belongs to (0: none).
    pub desc: u64,
}

impl Header {
    /// Encodes the header into its 40 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = WIRE_VERSION;
        b[5] = self.kind.to_u8();
        b[8..16].copy_from_slice(&self.group_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b[32..40].copy_from_slice(&self.desc.to_le_bytes());
        b
    }
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes exactly [`HEADER_LEN`] bytes into a [`Header`].
///
/// Errors ([`Error::Protocol`]) on a wrong length, magic, version, op byte,
/// non-zero reserved bytes, or a length over [`MAX_PAYLOAD`]
/// ([`MAX_ABORT_PAYLOAD`] for ABORT frames).
pub fn decode_header(bytes: &[u8]) -> Result<Header> {
    let bad = |detail: String| Error::protocol(Context::op("decode_header"), detail);
    if bytes.len() != HEADER_LEN {
        return Err(bad(format!("header is {} bytes, expected {HEADER_LEN}", bytes.len())));
    }
    if bytes[0..4] != MAGIC {
        return Err(bad(format!("bad magic {:02x?}, expected {:02x?}", &bytes[0..4], MAGIC)));
    }
    if bytes[4] != WIRE_VERSION {
        return Err(bad(format!("wire version {} unsupported, expected {WIRE_VERSION}", bytes[4])));
    }
    let kind = if bytes[5] == ABORT_OP {
        FrameKind::Abort
    } else if bytes[5] == PROBE_OP {
        FrameKind::Probe
    } else {
        match OpCode::from_u8(bytes[5]) {
            Some(op) => FrameKind::Op(op),
            None => return Err(bad(format!("unknown op byte {}", bytes[5]))),
        }
    };
    if bytes[6] != 0 || bytes[7] != 0 {
        return Err(bad(format!("reserved bytes {:02x} {:02x} are not zero", bytes[6], bytes[7])));
    }
    let group_id = le_u64(bytes, 8);
    let seq = le_u64(bytes, 16);
    let len = le_u64(bytes, 24);
    let desc = le_u64(bytes, 32);
    let max = match kind {
        FrameKind::Abort => MAX_ABORT_PAYLOAD,
        FrameKind::Probe => 0,
        FrameKind::Op(_) => MAX_PAYLOAD,
    };
    if len > max {
        return Err(bad(format!("{} frame announces {len} bytes, more than the limit {max}", kind.name())));
    }
    Ok(Header { kind, group_id, seq, len, desc })
}

/// Why a group aborted; carried in ABORT frames and the store's abort record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AbortKind {
    /// A peer closed its connection or died.
    Lost = 0,
    /// A peer did not answer before the deadline.
    Timeout = 1,
    /// A peer ran another collective or another size.
    Mismatch = 2,
    /// Anything else (protocol or I/O error, local failure).
    Other = 3,
}

impl AbortKind {
    fn from_u8(b: u8) -> AbortKind {
        match b {
            0 => AbortKind::Lost,
            1 => AbortKind::Timeout,
            2 => AbortKind::Mismatch,
            _ => AbortKind::Other,
        }
    }

    /// Verb for messages: "rank 3 lost", "rank 3 timed out".
    pub fn verb(self) -> &'static str {
        match self {
            AbortKind::Lost => "lost",
            AbortKind::Timeout => "timed out",
            AbortKind::Mismatch => "mismatched",
            AbortKind::Other => "failed",
        }
    }
}

/// The payload of an ABORT frame: who is to blame, who noticed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbortInfo {
    /// What kind of failure.
    pub kind: AbortKind,
    /// The rank the failure is attributed to.
    pub culprit: u64,
    /// The rank that first observed it.
    pub reporter: u64,
    /// Short human-readable reason.
    pub reason: String,
}

impl AbortInfo {
    /// Encodes as `kind u8, culprit u64, reporter u64, reason utf-8`, with the
    /// reason cut to fit [`MAX_ABORT_PAYLOAD`].
    pub fn encode(&self) -> Vec<u8> {
        let room = MAX_ABORT_PAYLOAD as usize - 17;
        let mut end = self.reason.len().min(room);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut v = Vec::with_capacity(17 + end);
        v.push(self.kind as u8);
        v.extend_from_slice(&self.culprit.to_le_bytes());
        v.extend_from_slice(&self.reporter.to_le_bytes());
        v.extend_from_slice(&self.reason.as_bytes()[..end]);
        v
    }

    /// Decodes [`AbortInfo::encode`]'s output; `None` when too short.
    pub fn decode(b: &[u8]) -> Option<AbortInfo> {
        if b.len() < 17 {
            return None;
        }
        Some(AbortInfo {
            kind: AbortKind::from_u8(b[0]),
            culprit: le_u64(b, 1),
            reporter: le_u64(b, 9),
            reason: String::from_utf8_lossy(&b[17..]).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_kind() {
        for kind in OpCode::ALL.iter().map(|o| FrameKind::Op(*o)).chain([FrameKind::Abort]) {
            let h = Header { kind, group_id: 0xdead_beef, seq: 7, len: 40, desc: 9 };
            assert_eq!(decode_header(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn rejects_bad_fields() {
        let good = Header { kind: FrameKind::Op(OpCode::AllReduce), group_id: 1, seq: 2, len: 3, desc: 0 }.encode();
        for (i, v) in [(0, b'X'), (4, 9), (5, 0), (5, 200), (6, 1), (7, 1)] {
            let mut b = good;
            b[i] = v;
            assert!(matches!(decode_header(&b), Err(Error::Protocol { .. })), "byte {i} = {v}");
        }
        assert!(decode_header(&good[..31]).is_err());
        let big = Header { kind: FrameKind::Abort, group_id: 1, seq: 0, len: MAX_ABORT_PAYLOAD + 1, desc: 0 }.encode();
        assert!(decode_header(&big).is_err());
    }

    #[test]
    fn abort_info_round_trip_and_truncation() {
        let a = AbortInfo { kind: AbortKind::Mismatch, culprit: 3, reporter: 1, reason: "é".repeat(2000) };
        let enc = a.encode();
        assert!(enc.len() as u64 <= MAX_ABORT_PAYLOAD);
        let d = AbortInfo::decode(&enc).unwrap();
        assert_eq!((d.kind, d.culprit, d.reporter), (AbortKind::Mismatch, 3, 1));
        assert!(a.reason.starts_with(&d.reason));
        assert!(AbortInfo::decode(&enc[..16]).is_none());
    }
}
