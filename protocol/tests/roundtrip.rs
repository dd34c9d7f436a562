//! Property tests: encode → decode is the identity for every packet type and
//! version, and decoding arbitrary bytes never panics.

#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
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
                    p.authentication_method = t;
                    p.authentication_data = b;
                }
                Unsubscribe => {}
                Ack | Suback | Unsuback => p.reason_string = reason,
            }
            p
        })
        .boxed()
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![
        Just(ProtocolVersion::V3_1),
        Just(ProtocolVersion::V3_1_1),
        Just(ProtocolVersion::V5)
    ]
}

fn reason(v5: bool) -> BoxedStrategy<ReasonCode> {
    if v5 {
        any::<u8>().prop_map(ReasonCode).boxed()
    } else {
        Just(ReasonCode::SUCCESS).boxed()
    }
}

fn packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
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
        any::<u8>().prop_map(ReasonCode).boxed()
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
    let ack = (0u8..4, pid(), reason(v5), props(v5, C::Ack)).prop_map(
        |(k, packet_id, reason, properties)| {
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
        },
    );
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
        proptest::collection::vec(any::<u8>().prop_map(ReasonCode), 1..4).boxed()
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
        proptest::collection::vec(any::<u8>().prop_map(ReasonCode), 1..4).boxed()
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
    let disconnect = (reason(v5), props(v5, C::Disconnect))
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
            (reason(true), props(true, C::Auth))
                .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }))
                .boxed(),
        );
    }
    proptest::strategy::Union::new(options).boxed()
}

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
