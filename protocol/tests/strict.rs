//! Golden bytes and the strictness list: every malformed case other codecs let
//! through, rejected here with the reason code a server must send.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::string_slice)]

use bytes::{Bytes, BytesMut};
use mqlb_protocol::*;

const MAX: usize = 1 << 20;

fn dec(bytes: &[u8], v: ProtocolVersion) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    decode(&mut buf, v, MAX)
}

fn rejects(bytes: &[u8], v: ProtocolVersion) -> DecodeError {
    match dec(bytes, v) {
        Err(e) => e,
        Ok(p) => panic!("accepted {bytes:02x?} as {p:?}"),
    }
}

mod common;
use common::{connect_body, frame};

use ProtocolVersion::*;

#[test]
fn golden_connect_311_decodes() {
    let bytes = frame(0x10, &connect_body(b"MQTT", 4, 0x02, b"\x00\x03abc"));
    let Packet::Connect(c) = dec(&bytes, V3_1_1).unwrap().unwrap() else {
        panic!()
    };
    assert_eq!(c.version, V3_1_1);
    assert_eq!(c.client_id.as_str(), "abc");
    assert!(c.clean_start);
    assert_eq!(c.keep_alive, 60);
    assert_eq!(Packet::Connect(c).to_bytes(V3_1_1).unwrap(), bytes);
}

#[test]
fn golden_connect_31_and_bridge_levels() {
    for (name, level, version, bridge) in [
        (&b"MQIsdp"[..], 3, V3_1, false),
        (b"MQIsdp", 0x83, V3_1, true),
        (b"MQTT", 0x84, V3_1_1, true),
    ] {
        let bytes = frame(0x10, &connect_body(name, level, 0x02, b"\x00\x01a"));
        let Packet::Connect(c) = dec(&bytes, V3_1_1).unwrap().unwrap() else {
            panic!()
        };
        assert_eq!((c.version, c.bridge), (version, bridge));
        assert_eq!(Packet::Connect(c).to_bytes(version).unwrap(), bytes);
    }
}

#[test]
fn golden_v5_packets_round_trip() {
    let cases: &[&[u8]] = &[
        // CONNECT v5 with session expiry and a will with delay, user+password.
        &[
            0x10, 0x27, 0, 4, b'M', b'Q', b'T', b'T', 5, 0xEE, 0, 10, 5, 0x11, 0, 0, 0, 30, 0, 1,
            b'c', 5, 0x18, 0, 0, 0, 5, 0, 1, b'w', 0, 2, b'h', b'i', 0, 1, b'u', 0, 2, b'p', b'w',
        ][..],
        // CONNACK with assigned client id.
        &[0x20, 0x08, 0x00, 0x00, 0x05, 0x12, 0x00, 0x02, b'i', b'd'],
        // PUBLISH QoS 1 with topic alias and user property.
        &[
            0x32, 0x12, 0, 1, b't', 0, 7, 0x0A, 0x23, 0, 1, 0x26, 0, 1, b'k', 0, 1, b'v', b'x',
            b'y',
        ],
        // PUBACK with reason only; PUBREC success; PUBREL with reason string.
        &[0x40, 0x03, 0, 7, 0x10],
        &[0x50, 0x02, 0, 7],
        &[0x62, 0x08, 0, 7, 0x92, 0x04, 0x1F, 0, 1, b'r'],
        // SUBSCRIBE with subscription identifier and all options.
        &[0x82, 0x0A, 0, 9, 2, 0x0B, 5, 0, 2, b'a', b'/', 0x2E],
        // SUBACK, UNSUBSCRIBE, UNSUBACK.
        &[0x90, 0x05, 0, 9, 0, 0x01, 0x80],
        &[0xA2, 0x06, 0, 9, 0, 0, 1, b'a'],
        &[0xB0, 0x05, 0, 9, 0, 0x00, 0x11],
        &[0xC0, 0x00],
        &[0xD0, 0x00],
        // DISCONNECT: empty, reason only, reason + server reference.
        &[0xE0, 0x00],
        &[0xE0, 0x01, 0x8E],
        &[0xE0, 0x06, 0x9C, 0x04, 0x1C, 0, 1, b'h'],
        // AUTH.
        &[0xF0, 0x00],
        &[0xF0, 0x07, 0x18, 0x05, 0x15, 0, 2, b'm', b'x'],
    ];
    for &bytes in cases {
        let p = dec(bytes, V5)
            .unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"))
            .unwrap_or_else(|| panic!("{bytes:02x?}: incomplete"));
        assert_eq!(p.to_bytes(V5).unwrap(), bytes, "{p:?}");
    }
}

#[test]
fn golden_v3_packets_round_trip() {
    let cases: &[&[u8]] = &[
        &[0x20, 0x02, 0x01, 0x00],
        &[0x20, 0x02, 0x00, 0x05],
        &[0x3B, 0x06, 0, 1, b't', 0, 3, b'x'],
        &[0x30, 0x04, 0, 1, b't', b'x'],
        &[0x40, 0x02, 0, 7],
        &[0x50, 0x02, 0, 7],
        &[0x62, 0x02, 0, 7],
        &[0x70, 0x02, 0, 7],
        &[0x82, 0x06, 0, 9, 0, 1, b'#', 1],
        &[0x90, 0x04, 0, 9, 1, 0x80],
        &[0xA2, 0x05, 0, 9, 0, 1, b'a'],
        &[0xB0, 0x02, 0, 9],
        &[0xC0, 0x00],
        &[0xD0, 0x00],
        &[0xE0, 0x00],
    ];
    for v in [V3_1, V3_1_1] {
        for &bytes in cases {
            let p = dec(bytes, v).unwrap().unwrap();
            assert_eq!(p.to_bytes(v).unwrap(), bytes, "{p:?}");
        }
    }
}

#[test]
fn mqttbytes_regressions() {
    // mqttbytes rejects this valid v5 DISCONNECT...
    assert_eq!(
        dec(&[0xE0, 0x00], V5).unwrap(),
        Some(Packet::Disconnect(Disconnect::default()))
    );
    // ...and desynchronises the stream on this one: we consume exactly 3 bytes.
    let mut buf = BytesMut::from(&[0xE0, 0x01, 0x8E, 0xC0, 0x00][..]);
    let p = decode(&mut buf, V5, MAX).unwrap().unwrap();
    assert_eq!(
        p,
        Packet::Disconnect(Disconnect::new(ReasonCode::SESSION_TAKEN_OVER))
    );
    assert_eq!(decode(&mut buf, V5, MAX).unwrap(), Some(Packet::Pingreq));
    assert!(buf.is_empty());
}

#[test]
fn partial_frames_consume_nothing() {
    let bytes = [0x32, 0x08, 0, 1, b't', 0, 7, 0, b'x', b'y'];
    for cut in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..cut]);
        assert_eq!(decode(&mut buf, V5, MAX), Ok(None));
        assert_eq!(buf.len(), cut);
    }
}

#[test]
fn strictness_list() {
    let cases = common::malformed_cases();
    for (name, bytes, v, code) in cases {
        let e = rejects(&bytes, v);
        assert_eq!(e.reason_code().0, code, "{name}: {e}");
    }
}

#[test]
fn connect_strictness() {
    let cases = common::malformed_connects();
    for (name, bytes, code) in cases {
        let e = rejects(&bytes, V3_1_1);
        assert_eq!(e.reason_code().0, code, "{name}: {e}");
        // The sniffer agrees with the decoder.
        match sniff_connect(&bytes, MAX) {
            Sniff::Reject(r) => assert_eq!(r.error, e, "{name}"),
            other => panic!("{name}: sniffer said {other:?}"),
        }
    }
    // v5 allows a password without a user name.
    let ok = frame(
        0x10,
        &connect_body(b"MQTT", 5, 0x42, b"\x00\x00\x01a\x00\x01p"),
    );
    assert!(dec(&ok, V5).unwrap().is_some());
}

#[test]
fn too_large_is_095() {
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0x7F][..]);
    let e = decode(&mut buf, V5, 1024).unwrap_err();
    assert_eq!(e.reason_code(), ReasonCode::PACKET_TOO_LARGE);
}

#[test]
fn sniffer_every_split_point() {
    let bytes = frame(
        0x10,
        &connect_body(
            b"MQTT",
            5,
            0xC2,
            b"\x05\x11\x00\x00\x00\x1e\x00\x04dev1\x00\x01u\x00\x01p",
        ),
    );
    for cut in 0..bytes.len() {
        assert_eq!(
            sniff_connect(&bytes[..cut], MAX),
            Sniff::NeedMore,
            "cut {cut}"
        );
    }
    let mut with_extra = bytes.clone();
    with_extra.extend_from_slice(&[0xC0, 0x00]);
    let Sniff::Connect { connect, frame_len } = sniff_connect(&with_extra, MAX) else {
        panic!()
    };
    assert_eq!(frame_len, bytes.len());
    assert_eq!(connect.client_id, "dev1");
    assert_eq!(connect.username, Some("u"));
    assert_eq!(connect.password, Some(&b"p"[..]));
    assert_eq!(connect.session_expiry_interval(), Some(30));
    assert_eq!(connect.version, V5);
}

#[test]
fn sniffer_rejects_non_mqtt_at_first_byte() {
    for junk in [
        &b"GET / HTTP/1.1\r\n"[..],
        &[0x16, 0x03, 0x01],
        &[0x30],
        &[0xC0, 0x00],
    ] {
        let Sniff::Reject(r) = sniff_connect(junk, MAX) else {
            panic!("{junk:02x?}")
        };
        assert_eq!(r.connack(RefusalStyle::Close), None);
        assert_eq!(r.connack(RefusalStyle::ReasonCode), None);
    }
}

#[test]
fn sniffer_rejection_replies() {
    let reply = |bytes: &[u8], max| match sniff_connect(bytes, max) {
        Sniff::Reject(r) => r.connack(RefusalStyle::ReasonCode),
        other => panic!("{other:?}"),
    };
    let transparent = |bytes: &[u8], max| match sniff_connect(bytes, max) {
        Sniff::Reject(r) => r.connack(RefusalStyle::Close),
        other => panic!("{other:?}"),
    };
    // Unsupported levels, 6 and above included: 3.1.1 return code 1, as
    // Mosquitto answers and MQTT-3.1.2-2 requires, in both styles.
    for level in [0u8, 2, 6, 9, 255] {
        let l = frame(0x10, &connect_body(b"MQTT", level, 2, b"\x00\x01a"));
        assert_eq!(reply(&l, MAX), Some(&[0x20, 0x02, 0x00, 0x01][..]));
        assert_eq!(transparent(&l, MAX), Some(&[0x20, 0x02, 0x00, 0x01][..]));
    }
    // Oversized v5 CONNECT: answered 0x95 from the partial header alone.
    let big = frame(0x10, &connect_body(b"MQTT", 5, 2, &[b'x'; 200]));
    assert_eq!(
        reply(&big[..12], 100),
        Some(&[0x20, 0x03, 0x00, 0x95, 0x00][..])
    );
    // Oversized 3.1.1: closed, as 3.x has no code.
    let big3 = frame(0x10, &connect_body(b"MQTT", 4, 2, &[b'x'; 200]));
    assert_eq!(reply(&big3[..12], 100), None);
    // Malformed v5: 0x81. Protocol error v5: 0x82.
    let bad5 = frame(0x10, &connect_body(b"MQTT", 5, 3, b"\x00\x00\x01a"));
    assert_eq!(reply(&bad5, MAX), Some(&[0x20, 0x03, 0x00, 0x81, 0x00][..]));
    let dup5 = frame(
        0x10,
        &connect_body(b"MQTT", 5, 2, b"\x04\x17\x01\x17\x01\x00\x01a"),
    );
    assert_eq!(reply(&dup5, MAX), Some(&[0x20, 0x03, 0x00, 0x82, 0x00][..]));
    // The default style closes all of these silently, as Mosquitto does.
    for bytes in [&bad5[..], &dup5[..], &big[..12]] {
        assert_eq!(transparent(bytes, 100.max(bytes.len())), None);
    }
}

#[test]
fn zero_copy_topic_and_payload() {
    let mut buf = BytesMut::from(&[0x30, 0x06, 0, 2, b'a', b'b', b'x', b'y'][..]);
    let base = buf.as_ptr() as usize;
    let Some(Packet::Publish(p)) = decode(&mut buf, V3_1_1, MAX).unwrap() else {
        panic!()
    };
    // Both point into the original buffer.
    assert_eq!(p.topic.as_bytes().as_ptr() as usize, base + 4);
    assert_eq!(p.payload.as_ptr() as usize, base + 6);
    assert_eq!(p.payload, Bytes::from_static(b"xy"));
}
