//! Wire encodings for objects and tensor-dict metadata (postcard).
//!
//! Objects (`send_object`, `broadcast_object`) are any serde type, encoded
//! with postcard. Tensor-dict metadata is the seed's `metadata_list`: the
//! keys in order, each with either a plain [`Value`] or a tensor's
//! [`TensorMetadata`] (device, dtype, shape); the tensors' bytes follow
//! separately. Both decoders treat their input as hostile: any byte string
//! yields a value or an error, never a panic; sequence lengths declared in
//! the bytes are not trusted for preallocation (serde's cautious size
//! hints), and a declared tensor whose size overflows or exceeds
//! [`DecodeLimits`] is refused before anything is allocated for it. A
//! tensor within the limits is allocated fallibly ([`TensorMetadata::zeros`]
//! returns [`Error::OutOfMemory`] when it does not fit in memory).

use super::dict::{TensorDict, TensorDictValue, Value};
use super::{checked_nbytes, Device, Tensor};
use crate::dtype::DType;
use crate::error::{Context, Error, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Default cap on one tensor declared by metadata: 16 GiB.
pub const DEFAULT_MAX_TENSOR_BYTES: u64 = 16 << 30;
/// Default cap on one serialized object: 1 GiB.
pub const DEFAULT_MAX_OBJECT_BYTES: u64 = 1 << 30;

/// First bytes of encoded metadata: a tag and a format version.
const METADATA_MAGIC: [u8; 4] = *b"RWM1";

/// Limits applied when decoding bytes that came from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest byte size of one tensor declared by metadata.
    pub max_tensor_bytes: u64,
    /// Largest byte size of all tensors of one tensor dict together.
    pub max_total_tensor_bytes: u64,
    /// Largest serialized object (checked before its buffer is allocated).
    pub max_object_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_tensor_bytes: DEFAULT_MAX_TENSOR_BYTES,
            max_total_tensor_bytes: DEFAULT_MAX_TENSOR_BYTES,
            max_object_bytes: DEFAULT_MAX_OBJECT_BYTES,
        }
    }
}

impl DecodeLimits {
    /// Defaults, overridden by `RANKWEAVE_MAX_TENSOR_BYTES` (also the total)
    /// and `RANKWEAVE_MAX_OBJECT_BYTES` when set to a positive integer.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<u64>().ok()).filter(|v| *v > 0);
        let mut l = DecodeLimits::default();
        if let Some(v) = var("RANKWEAVE_MAX_TENSOR_BYTES") {
            l.max_tensor_bytes = v;
            l.max_total_tensor_bytes = v;
        }
        if let Some(v) = var("RANKWEAVE_MAX_OBJECT_BYTES") {
            l.max_object_bytes = v;
        }
        l
    }

    /// Checks a declared object length against the limit; returns it as `usize`.
    pub fn check_object_len(&self, len: u64) -> Result<usize> {
        if len > self.max_object_bytes {
            return Err(Error::Serialization {
                ctx: Context::op("decode_object"),
                detail: format!(
                    "declared object size {len} bytes exceeds the limit of {} bytes (RANKWEAVE_MAX_OBJECT_BYTES)",
                    self.max_object_bytes
                ),
            });
        }
        usize::try_from(len).map_err(|_| Error::Serialization {
            ctx: Context::op("decode_object"),
            detail: format!("declared object size {len} does not fit in memory"),
        })
    }
}

/// What the seed's `TensorMetadata` namedtuple carries: device, dtype, size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorMetadata {
    /// Device the sender's tensor lives on.
    pub device: Device,
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
}

impl TensorMetadata {
    /// Byte size, or an error if it overflows or exceeds `limit`.
    pub fn checked_nbytes(&self, limit: u64) -> Result<usize> {
        let n = checked_nbytes(&self.shape, self.dtype).ok_or_else(|| Error::Serialization {
            ctx: Context::op("decode_metadata"),
            detail: format!("declared tensor shape {:?} of {} overflows", self.shape, self.dtype),
        })?;
        if n as u64 > limit {
            return Err(Error::Serialization {
                ctx: Context::op("decode_metadata"),
                detail: format!(
                    "declared tensor shape {:?} of {} is {n} bytes, over the limit of {limit} bytes \
                     (RANKWEAVE_MAX_TENSOR_BYTES)",
                    self.shape, self.dtype
                ),
            });
        }
        Ok(n)
    }

    /// A zeroed tensor of this description, on its device (`cuda` needs the
    /// `nccl` feature and a CUDA driver).
    pub fn zeros(&self) -> Result<Tensor> {
        Tensor::zeros_on(self.shape.clone(), self.dtype, self.device)
    }
}

/// One entry of tensor-dict metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetadataEntry {
    /// A tensor: its bytes follow the metadata.
    Tensor(TensorMetadata),
    /// A plain value, complete.
    Value(Value),
}

// Borrowing twin of `MetadataEntry` with the same serde shape, so encoding
// does not clone values.
#[derive(Serialize)]
#[serde(rename = "MetadataEntry")]
enum MetadataEntryRef<'a> {
    Tensor(TensorMetadata),
    Value(&'a Value),
}

fn ser_err(op: &str, e: postcard::Error) -> Error {
    Error::Serialization { ctx: Context::op(op), detail: e.to_string() }
}

/// Encodes any serde value.
pub fn encode_object<T: Serialize + ?Sized>(obj: &T) -> Result<Vec<u8>> {
    postcard::to_allocvec(obj).map_err(|e| ser_err("encode_object", e))
}

/// [`encode_object`] appended to `out` (a buffer reused across calls).
pub fn encode_object_into<T: Serialize + ?Sized>(obj: &T, out: &mut Vec<u8>) -> Result<()> {
    postcard::to_io(obj, out).map(|_| ()).map_err(|e| ser_err("encode_object", e))
}

/// An object as a [`crate::backend::BlobSource`]: encoded as
/// [`encode_object`] does, straight into the backend's memory when it fits.
#[derive(Debug)]
pub struct Encoder<'a, T: ?Sized>(pub &'a T);

impl<T: Serialize + ?Sized> crate::backend::BlobSource for Encoder<'_, T> {
    fn write_into(&mut self, out: &mut [u8]) -> Result<Option<usize>> {
        match postcard::to_slice(self.0, out) {
            Ok(used) => Ok(Some(used.len())),
            Err(postcard::Error::SerializeBufferFull) => Ok(None),
            Err(e) => Err(ser_err("encode_object", e)),
        }
    }
    fn write_vec(&mut self, out: &mut Vec<u8>) -> Result<()> {
        encode_object_into(self.0, out)
    }
}

/// Decodes a value written by [`encode_object`]. Trailing bytes are an error.
pub fn decode_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let (v, rest) = postcard::take_from_bytes::<T>(bytes).map_err(|e| ser_err("decode_object", e))?;
    if !rest.is_empty() {
        return Err(Error::Serialization {
            ctx: Context::op("decode_object"),
            detail: format!("{} trailing bytes after the object", rest.len()),
        });
    }
    Ok(v)
}

/// Encodes a dict's metadata (keys, values, tensor descriptions) and returns
/// it with the dict's tensors in order.
pub fn encode_dict_metadata(dict: &TensorDict) -> Result<(Vec<u8>, Vec<&Tensor>)> {
    let mut entries = Vec::with_capacity(dict.len());
    let mut tensors = Vec::new();
    for (k, v) in dict.iter() {
        match v {
            TensorDictValue::Tensor(t) => {
                entries.push((k, MetadataEntryRef::Tensor(t.metadata())));
                tensors.push(t);
            }
            TensorDictValue::Value(v) => entries.push((k, MetadataEntryRef::Value(v))),
        }
    }
    let mut out = METADATA_MAGIC.to_vec();
    postcard::to_io(&entries, &mut out).map_err(|e| ser_err("encode_metadata", e))?;
    Ok((out, tensors))
}

/// Encodes metadata entries (as produced by [`TensorDict::split`]).
pub fn encode_metadata(entries: &[(String, MetadataEntry)]) -> Result<Vec<u8>> {
    let mut out = METADATA_MAGIC.to_vec();
    postcard::to_io(entries, &mut out).map_err(|e| ser_err("encode_metadata", e))?;
    Ok(out)
}

/// Decodes metadata and validates it: no duplicate keys, every declared
/// tensor within `limits` (checked before any tensor is allocated).
pub fn decode_metadata(bytes: &[u8], limits: &DecodeLimits) -> Result<Vec<(String, MetadataEntry)>> {
    let bad = |detail: String| Error::Serialization { ctx: Context::op("decode_metadata"), detail };
    let body = bytes
        .strip_prefix(&METADATA_MAGIC[..])
        .ok_or_else(|| bad(format!("expected the metadata tag {METADATA_MAGIC:?} at the start")))?;
    let entries: Vec<(String, MetadataEntry)> = decode_object(body).map_err(|e| match e {
        Error::Serialization { detail, .. } => bad(detail),
        other => other,
    })?;
    let mut total: u64 = 0;
    for (i, (k, e)) in entries.iter().enumerate() {
        if entries[..i].iter().any(|(k2, _)| k2 == k) {
            return Err(bad(format!("duplicate key `{k}`")));
        }
        if let MetadataEntry::Tensor(m) = e {
            let n = m.checked_nbytes(limits.max_tensor_bytes)?;
            total = total.saturating_add(n as u64);
            if total > limits.max_total_tensor_bytes {
                return Err(bad(format!(
                    "declared tensors total more than the limit of {} bytes",
                    limits.max_total_tensor_bytes
                )));
            }
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trip() {
        let d = TensorDict::new()
            .with("x", Tensor::from_vec(vec![1i64, 2, 3, 4], [2, 2]).unwrap())
            .with("n", Value::None)
            .with("e", Tensor::empty(DType::F16))
            .with("m", Value::Map(vec![("a".into(), Value::List(vec![1i64.into(), 2.5f64.into()]))]));
        let (bytes, tensors) = encode_dict_metadata(&d).unwrap();
        assert_eq!(tensors.len(), 2);
        let back = decode_metadata(&bytes, &DecodeLimits::default()).unwrap();
        assert_eq!(back, d.split().0);
        assert_eq!(encode_metadata(&back).unwrap(), bytes);
    }

    #[test]
    fn oversized_shapes_are_refused() {
        let huge = vec![(
            "t".to_string(),
            MetadataEntry::Tensor(TensorMetadata {
                device: Device::Cpu,
                dtype: DType::F32,
                shape: vec![usize::MAX, 2],
            }),
        )];
        let err = decode_metadata(&encode_metadata(&huge).unwrap(), &DecodeLimits::default()).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
        let big = vec![(
            "t".to_string(),
            MetadataEntry::Tensor(TensorMetadata {
                device: Device::Cpu,
                dtype: DType::F64,
                shape: vec![1 << 20, 1 << 20],
            }),
        )];
        let err = decode_metadata(&encode_metadata(&big).unwrap(), &DecodeLimits::default()).unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
        let small = DecodeLimits { max_tensor_bytes: 8, max_total_tensor_bytes: 12, ..Default::default() };
        let two = vec![
            (
                "a".to_string(),
                MetadataEntry::Tensor(TensorMetadata { device: Device::Cpu, dtype: DType::I64, shape: vec![1] }),
            ),
            (
                "b".to_string(),
                MetadataEntry::Tensor(TensorMetadata { device: Device::Cpu, dtype: DType::I64, shape: vec![1] }),
            ),
        ];
        assert!(decode_metadata(&encode_metadata(&two).unwrap(), &small).is_err());
        let dup = vec![("a".to_string(), MetadataEntry::Value(Value::None)); 2];
        assert!(decode_metadata(&encode_metadata(&dup).unwrap(), &DecodeLimits::default()).is_err());
        assert!(decode_metadata(b"nope", &DecodeLimits::default()).is_err());
        assert!(DecodeLimits::default().check_object_len(u64::MAX).is_err());
    }

    #[test]
    fn declared_lengths_do_not_preallocate() {
        // A sequence declaring 2^62 elements with no bytes behind it: serde
        // preallocates cautiously, so this is an error, not an abort.
        let mut b = Vec::new();
        let mut n: u64 = 1 << 62;
        while n >= 0x80 {
            b.push((n as u8) | 0x80);
            n >>= 7;
        }
        b.push(n as u8);
        assert!(decode_object::<Vec<u64>>(&b).is_err());
        assert!(decode_object::<String>(&b).is_err());
        assert!(decode_metadata(&[&METADATA_MAGIC[..], &b].concat(), &DecodeLimits::default()).is_err());
    }

    #[test]
    fn objects_reject_trailing_bytes() {
        let mut b = encode_object(&(1u32, "x".to_string())).unwrap();
        assert_eq!(decode_object::<(u32, String)>(&b).unwrap(), (1, "x".to_string()));
        b.push(0);
        assert!(decode_object::<(u32, String)>(&b).is_err());
    }
}
