//! The frame-header decoder never panics: random, truncated and mutated bytes
//! give an error, and every valid header round-trips.

use proptest::prelude::*;
use rankweave::transport::tcp::header::{decode_header, AbortInfo, FrameKind, Header, HEADER_LEN, MAX_PAYLOAD};
use rankweave::transport::OpCode;
use rankweave::Error;

fn kind() -> impl Strategy<Value = FrameKind> {
    prop_oneof![(0..OpCode::ALL.len()).prop_map(|i| FrameKind::Op(OpCode::ALL[i])), Just(FrameKind::Abort),]
}

fn valid_header() -> impl Strategy<Value = Header> {
    (kind(), any::<u64>(), any::<u64>(), 0..=1024u64, any::<u64>())
        .prop_map(|(kind, group_id, seq, len, desc)| Header { kind, group_id, seq, len, desc })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        match decode_header(&bytes) {
            Ok(h) => {
                prop_assert_eq!(bytes.len(), HEADER_LEN);
                prop_assert_eq!(&h.encode()[..], &bytes[..]);
            }
            Err(e) => prop_assert!(matches!(e, Error::Protocol { .. }), "{e}"),
        }
    }

    #[test]
    fn random_bytes_after_a_valid_prefix_never_panic(
        h in valid_header(),
        keep in 0..HEADER_LEN,
        tail in proptest::collection::vec(any::<u8>(), HEADER_LEN),
    ) {
        let mut b = h.encode();
        b[keep..].copy_from_slice(&tail[keep..]);
        if let Ok(d) = decode_header(&b) {
            prop_assert_eq!(d.encode(), b);
            prop_assert!(d.len <= MAX_PAYLOAD);
        }
    }

    #[test]
    fn truncated_headers_are_errors(h in valid_header(), cut in 0..HEADER_LEN) {
        let b = h.encode();
        prop_assert!(decode_header(&b[..cut]).is_err());
        let mut longer = b.to_vec();
        longer.push(0);
        prop_assert!(decode_header(&longer).is_err());
    }

    #[test]
    fn valid_headers_round_trip(h in valid_header()) {
        prop_assert_eq!(decode_header(&h.encode()).unwrap(), h);
    }

    #[test]
    fn corrupted_fixed_fields_are_errors(h in valid_header(), at in prop_oneof![0..5usize, 6..8usize], x in 1..=255u8) {
        let mut b = h.encode();
        b[at] ^= x;
        prop_assert!(decode_header(&b).is_err());
    }

    #[test]
    fn abort_payload_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let d = AbortInfo::decode(&bytes);
        prop_assert_eq!(d.is_some(), bytes.len() >= 17);
    }
}
