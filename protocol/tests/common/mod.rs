//! Proptest strategies for valid packets, shared by the round-trip and
//! differential tests.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice
)]

use bytes::Bytes;
use mqlb_protocol::*;
use proptest::prelude::*;

fn s(x: String) -> MqttStr {
    MqttStr::try_from(x).unwrap()
}

fn topic() -> impl Strategy<Value = MqttStr> {
    "[a-z0-9é/]{1,20}".prop_map(s)
}

fn filter() -> impl Strategy<Value = MqttStr> {
    prop_oneof![
        "[a-z]{1,5}(/[a-z]{1,5}){0,3}".prop_map(s),
        "[a-z]{1,5}/\\+/[a-z]{1,3}".prop_map(s),
        "([a-z]{1,5}/)?#".prop_map(s),
    ]
}

fn text() -> impl Strategy<Value = MqttStr> {
    "[ -~]{0,12}".prop_map(s)
}

fn pid() -> impl Strategy<Value = PacketId> {
    (1u16..=u16::MAX).prop_map(|v| PacketId::new(v).unwrap())
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn bin() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from)
}

fn user_props() -> impl Strategy<Value = Vec<(MqttStr, MqttStr)>> {
    proptest::collection::vec((text(), text()), 0..3)
}

/// Properties valid in `ctx`, or none before v5.
fn props(v5: bool, ctx: PropertyContext) -> BoxedStrategy<Properties> {
    if !v5 {
        return Just(Properties::default()).boxed();
    }
    (
        user_props(),
        proptest::option::of(text()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(1u16..),
        proptest::option::of(topic()),
        proptest::option::of(bin()),
    )
        .prop_map(move |(user, reason, n32, n16, t, b)| {
            use PropertyContext::*;
            let mut p = Properties {
                user_properties: user,
                ..Default::default()
            };
            match ctx {
                Connect => {
                    p.session_expiry_interval = n32;
                    p.receive_maximum = n16;
                    p.authentication_data = b.clone();
                    p.authentication_method = b.map(|_| s("m".into()));
                }
                Will => {
                    p.will_delay_interval = n32;
                    p.response_topic = t;
                    p.correlation_data = b;
                }
                Connack => {
                    p.reason_string = reason;
                    p.session_expiry_interval = n32;
                    p.server_keep_alive = n16;
                    p.maximum_qos = n16.map(|v| (v % 2) as u8);
                }
                Publish => {
                    p.message_expiry_interval = n32;
                    p.topic_alias = n16;
                    p.response_topic = t;
                    p.correlation_data = b;
                    p.content_type = reason;
                    p.subscription_identifiers =
                        n32.map(|v| vec![v % 1000 + 1, 7]).unwrap_or_default();
                }
                Subscribe => {
                    p.subscription_identifiers = n16.map(|v| vec![u32::from(v)]).unwrap_or_default()
                }
                Disconnect => {
                    p.reason_string = reason;
                    p.server_reference = t;
                    p.session_expiry_interval = n32;
                }
                Auth => {
                    p.reason_string = reason;
                    p.authentication_method = Some(t.unwrap_or_else(|| s("SCRAM-SHA-1".into())));
                    p.authentication_data = b;
                }
                Unsubscribe => {}
                Ack | Suback | Unsuback => p.reason_string = reason,
            }
            p
        })
        .boxed()
}

pub fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![
        Just(ProtocolVersion::V3_1),
        Just(ProtocolVersion::V3_1_1),
        Just(ProtocolVersion::V5)
    ]
}

/// A reason code defined for packet type `t` (success only before v5).
fn reason_for(v5: bool, t: PacketType) -> BoxedStrategy<ReasonCode> {
    if v5 {
        proptest::sample::select(allowed_codes(t))
            .prop_map(ReasonCode)
            .boxed()
    } else {
        Just(ReasonCode::SUCCESS).boxed()
    }
}

pub fn packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    use PropertyContext as C;
    let v5 = v.is_v5();
    let connect = (
        any::<bool>(),
        any::<u16>(),
        "[a-zA-Z0-9-]{0,23}",
        proptest::option::of((qos(), any::<bool>(), topic(), bin(), props(v5, C::Will))),
        proptest::option::of((text(), proptest::option::of(bin()))),
        props(v5, C::Connect),
    )
        .prop_map(move |(clean, ka, id, will, auth, properties)| {
            let (username, password) = match auth {
                Some((u, p)) => (Some(u), p),
                None => (None, None),
            };
            Packet::Connect(Box::new(Connect {
                version: v,
                bridge: false,
                clean_start: clean,
                keep_alive: ka,
                properties,
                client_id: s(id),
                will: will.map(|(qos, retain, topic, payload, properties)| Will {
                    qos,
                    retain,
                    properties,
                    topic,
                    payload,
                }),
                username,
                password,
            }))
        });
    let connack_reason = if v5 {
        reason_for(true, PacketType::Connack)
    } else {
        (0u8..=5)
            .prop_map(|c| ConnackReturnCode::from_u8(c).unwrap().to_reason_code())
            .boxed()
    };
    let connack = (any::<bool>(), connack_reason, props(v5, C::Connack)).prop_map(
        |(sp, reason, properties)| {
            Packet::Connack(Connack {
                session_present: sp && reason.is_success(),
                reason,
                properties,
            })
        },
    );
    let publish = (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic(),
        pid(),
        props(v5, C::Publish),
        bin(),
    )
        .prop_map(|(dup, qos, retain, topic, id, properties, payload)| {
            Packet::Publish(Publish {
                dup: dup && qos != QoS::AtMostOnce,
                qos,
                retain,
                topic,
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                properties,
                payload,
            })
        });
    let ack = (0u8..4)
        .prop_flat_map(move |k| {
            let t = [
                PacketType::Puback,
                PacketType::Pubrec,
                PacketType::Pubrel,
                PacketType::Pubcomp,
            ][k as usize];
            (Just(k), pid(), reason_for(v5, t), props(v5, C::Ack))
        })
        .prop_map(|(k, packet_id, reason, properties)| {
            let a = Ack {
                packet_id,
                reason,
                properties,
            };
            match k {
                0 => Packet::Puback(a),
                1 => Packet::Pubrec(a),
                2 => Packet::Pubrel(a),
                _ => Packet::Pubcomp(a),
            }
        });
    let sub_opts =
        (qos(), any::<bool>(), any::<bool>(), 0u8..3).prop_map(move |(qos, nl, rap, rh)| {
            if v5 {
                SubscriptionOptions {
                    qos,
                    no_local: nl,
                    retain_as_published: rap,
                    retain_handling: [
                        RetainHandling::SendAtSubscribe,
                        RetainHandling::SendIfNew,
                        RetainHandling::DoNotSend,
                    ][rh as usize],
                }
            } else {
                SubscriptionOptions {
                    qos,
                    ..Default::default()
                }
            }
        });
    let subscribe = (
        pid(),
        props(v5, C::Subscribe),
        proptest::collection::vec((filter(), sub_opts), 1..4),
    )
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                properties,
                filters,
            })
        });
    let suback_codes = if v5 {
        proptest::collection::vec(reason_for(true, PacketType::Suback), 1..4).boxed()
    } else {
        proptest::collection::vec(
            prop_oneof![Just(0u8), Just(1), Just(2), Just(0x80)].prop_map(ReasonCode),
            1..4,
        )
        .boxed()
    };
    let suback =
        (pid(), props(v5, C::Suback), suback_codes).prop_map(|(packet_id, properties, reasons)| {
            Packet::Suback(Suback {
                packet_id,
                properties,
                reasons,
            })
        });
    let unsubscribe = (
        pid(),
        props(v5, C::Unsubscribe),
        proptest::collection::vec(filter(), 1..4),
    )
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                properties,
                filters,
            })
        });
    let unsuback_codes = if v5 {
        proptest::collection::vec(reason_for(true, PacketType::Unsuback), 1..4).boxed()
    } else {
        Just(Vec::new()).boxed()
    };
    let unsuback = (pid(), props(v5, C::Unsuback), unsuback_codes).prop_map(
        |(packet_id, properties, reasons)| {
            Packet::Unsuback(Unsuback {
                packet_id,
                properties,
                reasons,
            })
        },
    );
    let disconnect = (
        reason_for(v5, PacketType::Disconnect),
        props(v5, C::Disconnect),
    )
        .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }));
    let mut options = vec![
        connect.boxed(),
        connack.boxed(),
        publish.boxed(),
        ack.boxed(),
        subscribe.boxed(),
        suback.boxed(),
        unsubscribe.boxed(),
        unsuback.boxed(),
        Just(Packet::Pingreq).boxed(),
        Just(Packet::Pingresp).boxed(),
        disconnect.boxed(),
    ];
    if v5 {
        options.push(
            (reason_for(true, PacketType::Auth), props(true, C::Auth))
                .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }))
                .boxed(),
        );
    }
    proptest::strategy::Union::new(options).boxed()
}

/// Builds a frame from a first byte and a body.
pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    mqlb_protocol::framing::put_varint(&mut out, body.len()).unwrap();
    out.extend_from_slice(body);
    out
}

pub fn connect_body(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    let mut b = (name.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(name);
    b.push(level);
    b.push(flags);
    b.extend_from_slice(&[0, 60]);
    b.extend_from_slice(rest);
    b
}

/// Malformed or invalid packets a strict server must reject, with the reason
/// code it must send. Includes every case from the team's codec study.
pub fn malformed_cases() -> Vec<(&'static str, Vec<u8>, ProtocolVersion, u8)> {
    use ProtocolVersion::*;
    vec![
        ("reserved flags on PINGREQ", vec![0xC2, 0x00], V3_1_1, 0x81),
        (
            "reserved flags on SUBSCRIBE",
            vec![0x80, 0x06, 0, 1, 0, 1, b'a', 0],
            V3_1_1,
            0x81,
        ),
        (
            "non-minimal remaining length",
            vec![0xC0, 0x80, 0x00],
            V3_1_1,
            0x81,
        ),
        (
            "5-byte remaining length",
            vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            V3_1_1,
            0x81,
        ),
        (
            "invalid UTF-8 in topic",
            vec![0x30, 0x04, 0, 2, 0xC3, 0x28],
            V3_1_1,
            0x81,
        ),
        (
            "U+0000 in topic",
            vec![0x30, 0x05, 0, 3, b'a', 0, b'b'],
            V3_1_1,
            0x81,
        ),
        (
            "wildcard # in PUBLISH topic",
            vec![0x30, 0x03, 0, 1, b'#'],
            V3_1_1,
            0x81,
        ),
        (
            "wildcard + in PUBLISH topic",
            vec![0x30, 0x05, 0, 3, b'a', b'/', b'+'],
            V5,
            0x81,
        ),
        (
            "packet id 0 with QoS 1",
            vec![0x32, 0x05, 0, 1, b't', 0, 0],
            V3_1_1,
            0x81,
        ),
        (
            "packet id 0 in PUBACK",
            vec![0x40, 0x02, 0, 0],
            V3_1_1,
            0x81,
        ),
        (
            "QoS 3 PUBLISH",
            vec![0x36, 0x05, 0, 1, b't', 0, 1],
            V3_1_1,
            0x81,
        ),
        (
            "QoS 3 subscription",
            vec![0x82, 0x06, 0, 1, 0, 1, b'a', 3],
            V3_1_1,
            0x81,
        ),
        ("DUP on QoS 0", vec![0x38, 0x03, 0, 1, b't'], V3_1_1, 0x81),
        (
            "topic alias 0",
            vec![0x30, 0x07, 0, 1, b't', 3, 0x23, 0, 0],
            V5,
            0x82,
        ),
        (
            "property not allowed in PUBLISH",
            vec![0x30, 0x09, 0, 1, b't', 5, 0x11, 0, 0, 0, 1],
            V5,
            0x81,
        ),
        (
            "duplicated property",
            vec![0x30, 0x08, 0, 1, b't', 4, 0x01, 0, 0x01, 0],
            V5,
            0x82,
        ),
        ("PINGREQ with a body", vec![0xC0, 0x01, 0x00], V3_1_1, 0x81),
        (
            "SUBSCRIBE without filters",
            vec![0x82, 0x02, 0, 1],
            V3_1_1,
            0x82,
        ),
        (
            "empty topic without alias",
            vec![0x30, 0x03, 0, 0, 0],
            V5,
            0x82,
        ),
        ("AUTH in 3.1.1", vec![0xF0, 0x00], V3_1_1, 0x81),
        (
            "v3 DISCONNECT with a body",
            vec![0xE0, 0x01, 0x00],
            V3_1_1,
            0x81,
        ),
        (
            "retain handling 3",
            vec![0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0x30],
            V5,
            0x82,
        ),
        (
            "no local on shared subscription",
            vec![
                0x82, 0x0E, 0, 1, 0, 0, 9, b'$', b's', b'h', b'a', b'r', b'e', b'/', b'g', b'/', 4,
            ],
            V5,
            0x82,
        ),
        (
            "invalid filter a#",
            vec![0x82, 0x07, 0, 1, 0, 2, b'a', b'#', 0],
            V3_1_1,
            0x81,
        ),
        (
            "receive maximum 0",
            vec![0x20, 0x06, 0, 0, 3, 0x21, 0, 0],
            V5,
            0x82,
        ),
        (
            "session present with refusal",
            vec![0x20, 0x02, 0x01, 0x05],
            V3_1_1,
            0x82,
        ),
        (
            "reserved connack return code",
            vec![0x20, 0x02, 0x00, 0x06],
            V3_1_1,
            0x81,
        ),
        (
            "subscription identifier 0",
            vec![0x82, 0x09, 0, 1, 2, 0x0B, 0, 0, 1, b'a', 0],
            V5,
            0x82,
        ),
        (
            "trailing bytes after PUBACK (v3)",
            vec![0x40, 0x03, 0, 1, 0],
            V3_1_1,
            0x81,
        ),
    ]
}

/// Malformed CONNECTs (framed) and the reason code each must get.
pub fn malformed_connects() -> Vec<(&'static str, Vec<u8>, u8)> {
    let bodies: Vec<(&'static str, Vec<u8>, u8)> = vec![
        (
            "protocol level 9",
            connect_body(b"MQTT", 9, 2, b"\x00\x01a"),
            0x84,
        ),
        (
            "protocol level 5 with MQIsdp",
            connect_body(b"MQIsdp", 5, 2, b"\x00\x01a"),
            0x84,
        ),
        (
            "bridge bit on v5",
            connect_body(b"MQTT", 0x85, 2, b"\x00\x01a"),
            0x84,
        ),
        (
            "bad protocol name",
            connect_body(b"MQTX", 4, 2, b"\x00\x01a"),
            0x81,
        ),
        (
            "reserved connect flag",
            connect_body(b"MQTT", 4, 3, b"\x00\x01a"),
            0x81,
        ),
        (
            "will QoS without will flag",
            connect_body(b"MQTT", 4, 0x0A, b"\x00\x01a"),
            0x81,
        ),
        (
            "will retain without will flag",
            connect_body(b"MQTT", 4, 0x22, b"\x00\x01a"),
            0x81,
        ),
        (
            "will QoS 3",
            connect_body(b"MQTT", 4, 0x1E, b"\x00\x01a\x00\x01t\x00\x00"),
            0x81,
        ),
        (
            "password without user name (3.1.1)",
            connect_body(b"MQTT", 4, 0x42, b"\x00\x01a\x00\x01p"),
            0x81,
        ),
        (
            "trailing bytes after CONNECT",
            connect_body(b"MQTT", 4, 2, b"\x00\x01a\x00"),
            0x81,
        ),
        (
            "wildcard in will topic",
            connect_body(b"MQTT", 4, 0x06, b"\x00\x01a\x00\x01#\x00\x00"),
            0x81,
        ),
        (
            "U+0000 in client id",
            connect_body(b"MQTT", 4, 2, b"\x00\x02a\x00"),
            0x81,
        ),
        (
            "request problem information 2",
            connect_body(b"MQTT", 5, 2, b"\x02\x17\x02\x00\x01a"),
            0x82,
        ),
        (
            "will property in CONNECT properties",
            connect_body(b"MQTT", 5, 2, b"\x05\x18\x00\x00\x00\x01\x00\x01a"),
            0x81,
        ),
    ];
    bodies
        .into_iter()
        .map(|(name, body, code)| (name, frame(0x10, &body), code))
        .collect()
}
