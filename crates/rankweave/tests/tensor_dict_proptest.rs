//! Property tests for the object and tensor-dict metadata decoders: any
//! bytes give a value or an error, never a panic; declared tensors that are
//! too large are refused; valid encodings round-trip.

use proptest::prelude::*;
use rankweave::tensor::codec::{decode_metadata, decode_object, encode_metadata, encode_object};
use rankweave::tensor::{DecodeLimits, Device, MetadataEntry, TensorMetadata, Value};
use rankweave::DType;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Inner {
    name: String,
    weights: Vec<f32>,
    tag: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Outer {
    id: u64,
    inner: Vec<Inner>,
    extra: Value,
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::None),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        (-1e12f64..1e12).prop_map(Value::Float),
        "[a-z0-9 ]{0,12}".prop_map(Value::Str),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::List),
            prop::collection::vec(("[a-z]{1,6}", inner), 0..4).prop_map(Value::Map),
        ]
    })
}

fn dtype() -> impl Strategy<Value = DType> {
    (0u8..8).prop_map(|c| DType::from_code(c).unwrap())
}

fn entries() -> impl Strategy<Value = Vec<(String, MetadataEntry)>> {
    let entry = prop_oneof![
        value().prop_map(MetadataEntry::Value),
        (dtype(), prop::collection::vec(0usize..6, 0..4))
            .prop_map(|(dtype, shape)| MetadataEntry::Tensor(TensorMetadata { device: Device::Cpu, dtype, shape })),
    ];
    prop::collection::vec(entry, 0..6)
        .prop_map(|v| v.into_iter().enumerate().map(|(i, e)| (format!("key{i}"), e)).collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn metadata_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_metadata(&bytes, &DecodeLimits::default());
        let mut tagged = b"RWM1".to_vec();
        tagged.extend_from_slice(&bytes);
        let _ = decode_metadata(&tagged, &DecodeLimits::default());
    }

    #[test]
    fn object_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_object::<Value>(&bytes);
        let _ = decode_object::<Outer>(&bytes);
        let _ = decode_object::<Vec<(String, Value)>>(&bytes);
        let _ = decode_object::<(u64, String, Vec<i32>)>(&bytes);
    }

    #[test]
    fn metadata_round_trips(e in entries()) {
        let bytes = encode_metadata(&e).unwrap();
        prop_assert_eq!(decode_metadata(&bytes, &DecodeLimits::default()).unwrap(), e);
    }

    #[test]
    fn corrupted_metadata_is_an_error_or_valid(e in entries(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        let mut bytes = encode_metadata(&e).unwrap();
        for (pos, b) in flips {
            let n = bytes.len();
            bytes[pos % n] ^= b | 1;
        }
        if let Ok(decoded) = decode_metadata(&bytes, &DecodeLimits::default()) {
            for (_, entry) in decoded {
                if let MetadataEntry::Tensor(m) = entry {
                    prop_assert!(m.checked_nbytes(DecodeLimits::default().max_tensor_bytes).is_ok());
                }
            }
        }
    }

    #[test]
    fn declared_sizes_are_bounded(dtype in dtype(), shape in prop::collection::vec(any::<usize>(), 1..5), limit in 1u64..(1 << 40)) {
        let e = vec![("t".to_string(), MetadataEntry::Tensor(TensorMetadata { device: Device::Cpu, dtype, shape: shape.clone() }))];
        let limits = DecodeLimits { max_tensor_bytes: limit, max_total_tensor_bytes: limit, ..DecodeLimits::default() };
        let bytes = encode_metadata(&e).unwrap();
        let exact = shape.iter().try_fold(dtype.size() as u128, |a, &d| a.checked_mul(d as u128));
        match decode_metadata(&bytes, &limits) {
            Ok(_) => prop_assert!(matches!(exact, Some(n) if n <= limit as u128 && n <= usize::MAX as u128)),
            Err(_) => prop_assert!(!matches!(exact, Some(n) if n <= limit as u128 && n <= usize::MAX as u128)),
        }
    }

    #[test]
    fn nested_structs_round_trip(id in any::<u64>(), names in prop::collection::vec("[a-z]{0,8}", 0..4), extra in value()) {
        let obj = Outer {
            id,
            inner: names.iter().enumerate().map(|(i, n)| Inner { name: n.clone(), weights: vec![i as f32; i], tag: (i % 2 == 0).then_some(i as u8) }).collect(),
            extra,
        };
        let bytes = encode_object(&obj).unwrap();
        prop_assert_eq!(decode_object::<Outer>(&bytes).unwrap(), obj);
    }
}

#[test]
fn declared_object_sizes_are_checked_before_allocating() {
    let limits = DecodeLimits::default();
    assert!(limits.check_object_len(u64::MAX).is_err());
    assert!(limits.check_object_len(limits.max_object_bytes + 1).is_err());
    assert_eq!(limits.check_object_len(16).unwrap(), 16);
}
