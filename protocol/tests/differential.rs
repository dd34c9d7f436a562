//! Differential tests: rmqtt-codec and mqtt5-protocol as oracles.
//!
//! * On valid packets (a fixed corpus plus generated ones), they must decode
//!   what we encode and agree with us on type, topic, payload, packet id and
//!   client id. Where we disagree on a valid packet, one of us is wrong.
//! * On the malformed cases a strict server must reject, we record which
//!   oracle lets each one through. The expected lists are pinned, so a change
//!   in either oracle (or in our reading of the spec) shows up here.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::string_slice)]

use bytes::BytesMut;
use mqlb_protocol::{decode, Packet, ProtocolVersion};
use proptest::prelude::*;
use tokio_util::codec::Decoder;

mod common;

/// The fields all three codecs can be compared on.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Summary {
    kind: &'static str,
    topic: Option<String>,
    payload: Option<Vec<u8>>,
    packet_id: Option<u16>,
    client_id: Option<String>,
}

impl Summary {
    fn kind(kind: &'static str) -> Self {
        Summary {
            kind,
            topic: None,
            payload: None,
            packet_id: None,
            client_id: None,
        }
    }
}

fn ours(bytes: &[u8], v: ProtocolVersion) -> Result<Summary, String> {
    let mut buf = BytesMut::from(bytes);
    let p = decode(&mut buf, v, 1 << 20)
        .map_err(|e| e.to_string())?
        .ok_or("incomplete")?;
    if !buf.is_empty() {
        return Err("trailing".into());
    }
    Ok(match p {
        Packet::Connect(c) => Summary {
            client_id: Some(c.client_id.to_string()),
            ..Summary::kind("connect")
        },
        Packet::Connack(_) => Summary::kind("connack"),
        Packet::Publish(p) => Summary {
            topic: Some(p.topic.to_string()),
            payload: Some(p.payload.to_vec()),
            packet_id: p.packet_id.map(|x| x.get()),
            ..Summary::kind("publish")
        },
        Packet::Puback(a) => Summary {
            packet_id: Some(a.packet_id.get()),
            ..Summary::kind("puback")
        },
        Packet::Pubrec(a) => Summary {
            packet_id: Some(a.packet_id.get()),
            ..Summary::kind("pubrec")
        },
        Packet::Pubrel(a) => Summary {
            packet_id: Some(a.packet_id.get()),
            ..Summary::kind("pubrel")
        },
        Packet::Pubcomp(a) => Summary {
            packet_id: Some(a.packet_id.get()),
            ..Summary::kind("pubcomp")
        },
        Packet::Subscribe(s) => Summary {
            packet_id: Some(s.packet_id.get()),
            ..Summary::kind("subscribe")
        },
        Packet::Suback(s) => Summary {
            packet_id: Some(s.packet_id.get()),
            ..Summary::kind("suback")
        },
        Packet::Unsubscribe(s) => Summary {
            packet_id: Some(s.packet_id.get()),
            ..Summary::kind("unsubscribe")
        },
        Packet::Unsuback(s) => Summary {
            packet_id: Some(s.packet_id.get()),
            ..Summary::kind("unsuback")
        },
        Packet::Pingreq => Summary::kind("pingreq"),
        Packet::Pingresp => Summary::kind("pingresp"),
        Packet::Disconnect(_) => Summary::kind("disconnect"),
        Packet::Auth(_) => Summary::kind("auth"),
    })
}

fn rmqtt_v3(bytes: &[u8]) -> Result<Summary, String> {
    use rmqtt_codec::v3::{Codec, Packet as P};
    let mut buf = BytesMut::from(bytes);
    let (p, _) = Codec::new(1 << 20)
        .decode(&mut buf)
        .map_err(|e| format!("{e:?}"))?
        .ok_or("incomplete")?;
    if !buf.is_empty() {
        return Err("trailing".into());
    }
    Ok(match p {
        P::Connect(c) => Summary {
            client_id: Some(c.client_id.to_string()),
            ..Summary::kind("connect")
        },
        P::ConnectAck(_) => Summary::kind("connack"),
        P::Publish(p) => Summary {
            topic: Some(p.topic.to_string()),
            payload: Some(p.payload.to_vec()),
            packet_id: p.packet_id.map(|x| x.get()),
            ..Summary::kind("publish")
        },
        P::PublishAck { packet_id } => Summary {
            packet_id: Some(packet_id.get()),
            ..Summary::kind("puback")
        },
        P::PublishReceived { packet_id } => Summary {
            packet_id: Some(packet_id.get()),
            ..Summary::kind("pubrec")
        },
        P::PublishRelease { packet_id } => Summary {
            packet_id: Some(packet_id.get()),
            ..Summary::kind("pubrel")
        },
        P::PublishComplete { packet_id } => Summary {
            packet_id: Some(packet_id.get()),
            ..Summary::kind("pubcomp")
        },
        P::Subscribe { packet_id, .. } => Summary {
            packet_id: Some(packet_id.get()),
            ..Summary::kind("subscribe")
        },
        P::SubscribeAck { packet_id, .. } => Summary {
            packet_id: Some(packet_id.get()),
            ..Summary::kind("suback")
        },
        P::Unsubscribe { packet_id, .. } => Summary {
            packet_id: Some(packet_id.get()),
            ..Summary::kind("unsubscribe")
        },
        P::UnsubscribeAck { packet_id } => Summary {
            packet_id: Some(packet_id.get()),
            ..Summary::kind("unsuback")
        },
        P::PingRequest => Summary::kind("pingreq"),
        P::PingResponse => Summary::kind("pingresp"),
        P::Disconnect => Summary::kind("disconnect"),
    })
}

fn rmqtt_v5(bytes: &[u8]) -> Result<Summary, String> {
    use rmqtt_codec::v5::{Codec, Packet as P};
    let mut buf = BytesMut::from(bytes);
    let (p, _) = Codec::new(1 << 20, 1 << 20)
        .decode(&mut buf)
        .map_err(|e| format!("{e:?}"))?
        .ok_or("incomplete")?;
    if !buf.is_empty() {
        return Err("trailing".into());
    }
    Ok(match p {
        P::Connect(c) => Summary {
            client_id: Some(c.client_id.to_string()),
            ..Summary::kind("connect")
        },
        P::ConnectAck(_) => Summary::kind("connack"),
        P::Publish(p) => Summary {
            topic: Some(p.topic.to_string()),
            payload: Some(p.payload.to_vec()),
            packet_id: p.packet_id.map(|x| x.get()),
            ..Summary::kind("publish")
        },
        P::PublishAck(a) => Summary {
            packet_id: Some(a.packet_id.get()),
            ..Summary::kind("puback")
        },
        P::PublishReceived(a) => Summary {
            packet_id: Some(a.packet_id.get()),
            ..Summary::kind("pubrec")
        },
        P::PublishRelease(a) => Summary {
            packet_id: Some(a.packet_id.get()),
            ..Summary::kind("pubrel")
        },
        P::PublishComplete(a) => Summary {
            packet_id: Some(a.packet_id.get()),
            ..Summary::kind("pubcomp")
        },
        P::Subscribe(s) => Summary {
            packet_id: Some(s.packet_id.get()),
            ..Summary::kind("subscribe")
        },
        P::SubscribeAck(s) => Summary {
            packet_id: Some(s.packet_id.get()),
            ..Summary::kind("suback")
        },
        P::Unsubscribe(s) => Summary {
            packet_id: Some(s.packet_id.get()),
            ..Summary::kind("unsubscribe")
        },
        P::UnsubscribeAck(s) => Summary {
            packet_id: Some(s.packet_id.get()),
            ..Summary::kind("unsuback")
        },
        P::PingRequest => Summary::kind("pingreq"),
        P::PingResponse => Summary::kind("pingresp"),
        P::Disconnect(_) => Summary::kind("disconnect"),
        P::Auth(_) => Summary::kind("auth"),
    })
}

fn mqtt5(bytes: &[u8], version: u8) -> Result<Summary, String> {
    use bytes::Buf;
    use mqtt5_protocol::packet::{FixedHeader, Packet as P};
    let mut buf = bytes::Bytes::copy_from_slice(bytes);
    let h = FixedHeader::decode(&mut buf).map_err(|e| e.to_string())?;
    if buf.remaining() != h.remaining_length as usize {
        return Err("length mismatch".into());
    }
    let p = P::decode_from_body_with_version(h.packet_type, &h, &mut buf, version)
        .map_err(|e| e.to_string())?;
    if buf.has_remaining() {
        return Err("trailing".into());
    }
    Ok(match p {
        P::Connect(c) => Summary {
            client_id: Some(c.client_id.clone()),
            ..Summary::kind("connect")
        },
        P::ConnAck(_) => Summary::kind("connack"),
        P::Publish(p) => Summary {
            topic: Some(p.topic_name.clone()),
            payload: Some(p.payload.to_vec()),
            packet_id: p.packet_id,
            ..Summary::kind("publish")
        },
        P::PubAck(a) => Summary {
            packet_id: Some(a.packet_id),
            ..Summary::kind("puback")
        },
        P::PubRec(a) => Summary {
            packet_id: Some(a.packet_id),
            ..Summary::kind("pubrec")
        },
        P::PubRel(a) => Summary {
            packet_id: Some(a.packet_id),
            ..Summary::kind("pubrel")
        },
        P::PubComp(a) => Summary {
            packet_id: Some(a.packet_id),
            ..Summary::kind("pubcomp")
        },
        P::Subscribe(s) => Summary {
            packet_id: Some(s.packet_id),
            ..Summary::kind("subscribe")
        },
        P::SubAck(s) => Summary {
            packet_id: Some(s.packet_id),
            ..Summary::kind("suback")
        },
        P::Unsubscribe(s) => Summary {
            packet_id: Some(s.packet_id),
            ..Summary::kind("unsubscribe")
        },
        P::UnsubAck(s) => Summary {
            packet_id: Some(s.packet_id),
            ..Summary::kind("unsuback")
        },
        P::PingReq => Summary::kind("pingreq"),
        P::PingResp => Summary::kind("pingresp"),
        P::Disconnect(_) => Summary::kind("disconnect"),
        P::Auth(_) => Summary::kind("auth"),
    })
}

/// What each oracle makes of the same bytes.
fn oracles(bytes: &[u8], v: ProtocolVersion) -> Vec<(&'static str, Result<Summary, String>)> {
    match v {
        // mqtt5-protocol does not speak 3.1; rmqtt's v3 codec covers 3.1 and 3.1.1.
        ProtocolVersion::V3_1 => vec![("rmqtt-codec", rmqtt_v3(bytes))],
        ProtocolVersion::V3_1_1 => vec![
            ("rmqtt-codec", rmqtt_v3(bytes)),
            ("mqtt5-protocol", mqtt5(bytes, 4)),
        ],
        ProtocolVersion::V5 => vec![
            ("rmqtt-codec", rmqtt_v5(bytes)),
            ("mqtt5-protocol", mqtt5(bytes, 5)),
        ],
    }
}

/// Where an oracle is known to refuse or misread a valid packet. Each entry
/// is a limitation of that oracle (checked by hand against the spec), not a
/// licence for us to differ.
fn known_oracle_gap(oracle: &str, p: &Packet, _v: ProtocolVersion) -> bool {
    match (oracle, p) {
        // rmqtt-codec refuses an empty client ID with clean session/start 0
        // as a decode error. The spec makes that the server's decision
        // (3.1.1: CONNACK 0x02; 5.0: it may assign an ID or answer 0x85), so
        // a balancer must forward it and let the broker answer.
        ("rmqtt-codec", Packet::Connect(c)) => c.client_id.is_empty() && !c.clean_start,
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    /// Every valid packet we encode decodes the same in both oracles.
    #[test]
    fn oracles_agree_on_valid_packets((v, p) in common::version().prop_flat_map(|v| (Just(v), common::packet(v)))) {
        let wire = p.to_bytes(v).unwrap();
        let mine = ours(&wire, v).unwrap();
        for (name, theirs) in oracles(&wire, v) {
            if known_oracle_gap(name, &p, v) {
                continue;
            }
            match theirs {
                Ok(t) => prop_assert_eq!(&t, &mine, "{} disagrees on {:02x?}", name, &wire[..]),
                Err(e) => prop_assert!(false, "{} rejected valid {:?}: {} ({:02x?})", name, p, e, &wire[..]),
            }
        }
    }
}

/// Every malformed case: we reject it; list which oracle accepts it.
fn oracle_acceptances() -> Vec<String> {
    let mut cases: Vec<(&str, Vec<u8>, ProtocolVersion)> = common::malformed_cases()
        .into_iter()
        .map(|(n, b, v, _)| (n, b, v))
        .collect();
    for (n, b, _) in common::malformed_connects() {
        cases.push((n, b, ProtocolVersion::V3_1_1));
    }
    let mut accepted = Vec::new();
    for (name, bytes, v) in cases {
        assert!(ours(&bytes, v).is_err(), "we accept malformed case {name}");
        // A CONNECT declares its own version: ask both oracle dialects.
        let versions = if bytes[0] == 0x10 {
            vec![ProtocolVersion::V3_1_1, ProtocolVersion::V5]
        } else {
            vec![v]
        };
        for v in versions {
            for (oracle, result) in oracles(&bytes, v) {
                if result.is_ok() {
                    accepted.push(format!("{oracle} ({}) accepts: {name}", v.label()));
                }
            }
        }
    }
    accepted.sort();
    accepted.dedup();
    accepted
}

/// The cases the oracles let through and we reject, pinned. Printed with
/// `cargo test -p mqlb-protocol --test differential -- --nocapture`.
#[test]
fn malformed_cases_the_oracles_accept() {
    let got = oracle_acceptances();
    for line in &got {
        println!("{line}");
    }
    let expected: Vec<String> = EXPECTED_ACCEPTANCES.iter().map(|s| s.to_string()).collect();
    assert_eq!(got, expected);
}

const EXPECTED_ACCEPTANCES: &[&str] = &[
    "mqtt5-protocol (3.1.1) accepts: AUTH in 3.1.1",
    "mqtt5-protocol (3.1.1) accepts: QoS 3 subscription",
    "mqtt5-protocol (3.1.1) accepts: bridge bit on v5",
    "mqtt5-protocol (3.1.1) accepts: invalid filter a#",
    "mqtt5-protocol (3.1.1) accepts: non-minimal remaining length",
    "mqtt5-protocol (3.1.1) accepts: packet id 0 in PUBACK",
    "mqtt5-protocol (3.1.1) accepts: packet id 0 with QoS 1",
    "mqtt5-protocol (3.1.1) accepts: protocol level 9",
    "mqtt5-protocol (3.1.1) accepts: request problem information 2",
    "mqtt5-protocol (3.1.1) accepts: session present with refusal",
    "mqtt5-protocol (3.1.1) accepts: trailing bytes after PUBACK (v3)",
    "mqtt5-protocol (3.1.1) accepts: v3 DISCONNECT with a body",
    "mqtt5-protocol (3.1.1) accepts: wildcard # in PUBLISH topic",
    "mqtt5-protocol (3.1.1) accepts: wildcard in will topic",
    "mqtt5-protocol (3.1.1) accepts: will property in CONNECT properties",
    "mqtt5-protocol (5.0) accepts: bridge bit on v5",
    "mqtt5-protocol (5.0) accepts: empty topic without alias",
    "mqtt5-protocol (5.0) accepts: property not allowed in PUBLISH",
    "mqtt5-protocol (5.0) accepts: protocol level 9",
    "mqtt5-protocol (5.0) accepts: receive maximum 0",
    "mqtt5-protocol (5.0) accepts: request problem information 2",
    "mqtt5-protocol (5.0) accepts: subscription identifier 0",
    "mqtt5-protocol (5.0) accepts: topic alias 0",
    "mqtt5-protocol (5.0) accepts: wildcard in will topic",
    "mqtt5-protocol (5.0) accepts: will property in CONNECT properties",
    "rmqtt-codec (3.1.1) accepts: DUP on QoS 0",
    "rmqtt-codec (3.1.1) accepts: PINGREQ with a body",
    "rmqtt-codec (3.1.1) accepts: U+0000 in client id",
    "rmqtt-codec (3.1.1) accepts: U+0000 in topic",
    "rmqtt-codec (3.1.1) accepts: invalid filter a#",
    "rmqtt-codec (3.1.1) accepts: non-minimal remaining length",
    "rmqtt-codec (3.1.1) accepts: password without user name (3.1.1)",
    "rmqtt-codec (3.1.1) accepts: reserved connack return code",
    "rmqtt-codec (3.1.1) accepts: session present with refusal",
    "rmqtt-codec (3.1.1) accepts: trailing bytes after CONNECT",
    "rmqtt-codec (3.1.1) accepts: v3 DISCONNECT with a body",
    "rmqtt-codec (3.1.1) accepts: wildcard # in PUBLISH topic",
    "rmqtt-codec (3.1.1) accepts: wildcard in will topic",
    "rmqtt-codec (5.0) accepts: empty topic without alias",
];
