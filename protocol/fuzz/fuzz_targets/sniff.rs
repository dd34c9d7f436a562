//! The balancer's CONNECT sniffer on arbitrary first bytes: never panics,
//! and agrees with the full decoder about what is a valid CONNECT.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqlb_protocol::{decode, sniff_connect, Packet, ProtocolVersion, Sniff};

fuzz_target!(|data: &[u8]| {
    let sniffed = sniff_connect(data, 1 << 16);
    let mut buf = BytesMut::from(data);
    let decoded = decode(&mut buf, ProtocolVersion::V5, 1 << 16);
    match sniffed {
        Sniff::Connect { connect, frame_len } => {
            assert!(frame_len <= data.len());
            match decoded {
                Ok(Some(Packet::Connect(c))) => {
                    assert_eq!(c.client_id.as_str(), connect.client_id);
                    assert_eq!(c.version, connect.version);
                }
                other => panic!("sniffer accepted what decode gave {other:?}"),
            }
        }
        Sniff::NeedMore => assert!(matches!(decoded, Ok(None))),
        Sniff::Reject(_) => {
            // The sniffer may reject a non-CONNECT first byte that the
            // decoder accepts as another packet type; a CONNECT must agree.
            if data.first() == Some(&0x10) {
                assert!(decoded.is_err(), "decode accepted a CONNECT the sniffer rejected");
            }
        }
    }
});
