//! Decodes arbitrary bytes as a stream of packets in every protocol version,
//! and re-encodes whatever decodes: decoding must never panic, and a decoded
//! packet must encode and decode back to itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqlb_protocol::{decode, ProtocolVersion};

fuzz_target!(|data: &[u8]| {
    for v in [ProtocolVersion::V3_1, ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(p)) = decode(&mut buf, v, 1 << 16) {
            // CONNECT carries its own version.
            let ev = match &p {
                mqlb_protocol::Packet::Connect(c) => c.version,
                _ => v,
            };
            let wire = p.to_bytes(ev).expect("a decoded packet encodes");
            let mut again = BytesMut::from(&wire[..]);
            let back = decode(&mut again, ev, 1 << 17).expect("re-decodes").expect("whole");
            assert_eq!(back, p);
        }
    }
});
