//! Property tests: encode → decode is the identity for every packet type and
//! version, and decoding arbitrary bytes never panics.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::string_slice)]

use bytes::BytesMut;
use mqlb_protocol::*;
use proptest::prelude::*;

mod common;
use common::{packet, version};

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn encode_then_decode_is_identity((v, p) in version().prop_flat_map(|v| (Just(v), packet(v)))) {
        let bytes = p.to_bytes(v).unwrap();
        let mut buf = BytesMut::from(&bytes[..]);
        let back = decode(&mut buf, v, 1 << 20).unwrap().unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!(back, p);
    }

    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), v in version()) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode(&mut buf, v, 1 << 20) {}
        let _ = sniff_connect(&bytes, 1 << 20);
    }
}
