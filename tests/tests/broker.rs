//! Conformance of the bundled broker, with the same checks run against
//! Debian's Mosquitto as the reference. Where the two differ on purpose the
//! check branches on [`Peer`] and says why.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used
)]

use std::future::Future;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqlb_protocol::{Disconnect, MqttStr, Packet, Properties, ProtocolVersion, QoS, ReasonCode};
use mqlb_tests::client::{connect_packet, qos, will, Client};
use mqlb_tests::*;

const T: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(400);
use ProtocolVersion::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Ours,
    Mosquitto,
}

/// Runs `check` against our broker, then against Mosquitto.
async fn both<F, Fut>(check: F)
where
    F: Fn(Peer, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let ours = OurBroker::start().await;
    check(Peer::Ours, ours.addr.to_string()).await;
    let m = Mosquitto::start();
    check(Peer::Mosquitto, m.addr()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_publish_with_properties_reaches_v3_subscribers() {
    // rumqttd kills the v3 subscriber's connection on exactly this.
    both(|_, addr| async move {
        let (mut sub, _) = Client::connect(&addr, connect_packet("v3sub", V3_1_1, true)).await;
        sub.subscribe("props/#", qos(QoS::AtLeastOnce)).await;
        let (mut publ, _) = Client::connect(&addr, connect_packet("v5pub", V5, true)).await;
        let props = Properties {
            user_properties: vec![(
                MqttStr::try_from("k").unwrap(),
                MqttStr::try_from("v").unwrap(),
            )],
            content_type: Some(MqttStr::try_from("text/plain").unwrap()),
            message_expiry_interval: Some(60),
            ..Default::default()
        };
        publ.publish("props/a", b"hello", QoS::AtLeastOnce, false, props)
            .await;
        let got = sub
            .next_publish(T, true)
            .await
            .expect("v3 subscriber got the message");
        assert_eq!(got.payload, Bytes::from_static(b"hello"));
        assert!(got.properties.is_empty());
        // The subscriber's connection is still healthy.
        sub.send(Packet::Pingreq).await;
        assert!(matches!(sub.recv(T).await, Some(Packet::Pingresp)));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_exactly_once_over_a_reconnect() {
    both(|_, addr| async move {
        let (mut sub, _) = Client::connect(&addr, connect_packet("q2sub", V3_1_1, true)).await;
        sub.subscribe("q2", qos(QoS::ExactlyOnce)).await;
        let pid = mqlb_protocol::PacketId::new(9).unwrap();
        let publish = |dup| {
            Packet::Publish(mqlb_protocol::Publish {
                dup,
                qos: QoS::ExactlyOnce,
                retain: false,
                topic: MqttStr::try_from("q2").unwrap(),
                packet_id: Some(pid),
                properties: Properties::default(),
                payload: Bytes::from_static(b"once"),
            })
        };
        let (mut p, _) = Client::connect(&addr, connect_packet("q2pub", V3_1_1, false)).await;
        p.send(publish(false)).await;
        assert!(matches!(p.recv(T).await, Some(Packet::Pubrec(_))));
        drop(p); // connection lost before PUBREL
        let (mut p, ack) = Client::connect(&addr, connect_packet("q2pub", V3_1_1, false)).await;
        assert!(ack.session_present);
        p.send(publish(true)).await;
        assert!(matches!(p.recv(T).await, Some(Packet::Pubrec(_))));
        p.send(Packet::Pubrel(mqlb_protocol::Ack::new(pid))).await;
        assert!(matches!(p.recv(T).await, Some(Packet::Pubcomp(_))));
        let first = sub.next_publish(T, true).await.expect("delivered");
        assert_eq!(first.payload, Bytes::from_static(b"once"));
        let second = sub.next_publish(QUIET, true).await;
        assert!(second.is_none(), "delivered twice: {second:?}");
        // Clean up the persistent publisher session.
        let _ = Client::connect(&addr, connect_packet("q2pub", V3_1_1, true)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages() {
    both(|_, addr| async move {
        let (mut p, _) = Client::connect(&addr, connect_packet("rpub", V5, true)).await;
        p.publish(
            "ret/1",
            b"keep",
            QoS::AtLeastOnce,
            true,
            Properties::default(),
        )
        .await;
        // A non-retained empty publish does not clear it.
        p.publish("ret/1", b"", QoS::AtLeastOnce, false, Properties::default())
            .await;
        let (mut s, _) = Client::connect(&addr, connect_packet("rsub1", V5, true)).await;
        s.subscribe("ret/+", qos(QoS::AtLeastOnce)).await;
        let m = s.next_publish(T, true).await.expect("retained message");
        assert_eq!(m.payload, Bytes::from_static(b"keep"));
        assert!(m.retain, "retained message delivered without RETAIN");
        // Live messages to an existing subscription carry RETAIN 0.
        p.publish(
            "ret/1",
            b"live",
            QoS::AtLeastOnce,
            true,
            Properties::default(),
        )
        .await;
        let live = s.next_publish(T, true).await.unwrap();
        assert_eq!((live.payload.as_ref(), live.retain), (&b"live"[..], false));
        // An empty retained publish deletes it.
        p.publish("ret/1", b"", QoS::AtLeastOnce, true, Properties::default())
            .await;
        let _ = s.next_publish(T, true).await;
        let (mut s2, _) = Client::connect(&addr, connect_packet("rsub2", V5, true)).await;
        s2.subscribe("ret/#", qos(QoS::AtLeastOnce)).await;
        assert!(
            s2.next_publish(QUIET, true).await.is_none(),
            "deleted retained message delivered"
        );
        // Retain handling 2: never send retained messages.
        p.publish("ret/2", b"x", QoS::AtLeastOnce, true, Properties::default())
            .await;
        let (mut s3, _) = Client::connect(&addr, connect_packet("rsub3", V5, true)).await;
        let mut o = qos(QoS::AtLeastOnce);
        o.retain_handling = mqlb_protocol::RetainHandling::DoNotSend;
        s3.subscribe("ret/#", o).await;
        assert!(s3.next_publish(QUIET, true).await.is_none());
        p.publish("ret/2", b"", QoS::AtLeastOnce, true, Properties::default())
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills() {
    both(|_, addr| async move {
        let (mut s, _) = Client::connect(&addr, connect_packet("wsub", V5, true)).await;
        s.subscribe("will/#", qos(QoS::AtLeastOnce)).await;
        // Lost connection: the will is published.
        let mut c = connect_packet("w-lost", V3_1_1, true);
        c.will = Some(will("will/lost", "gone", None));
        let (lost, _) = Client::connect(&addr, c).await;
        drop(lost);
        let m = s
            .next_publish(T, true)
            .await
            .expect("will after lost connection");
        assert_eq!(m.payload, Bytes::from_static(b"gone"));
        // Normal DISCONNECT: no will.
        let mut c = connect_packet("w-normal", V5, true);
        c.will = Some(will("will/normal", "should-not-appear", None));
        let (mut n, _) = Client::connect(&addr, c).await;
        n.send(Packet::Disconnect(Disconnect::default())).await;
        assert!(
            s.next_publish(QUIET, true).await.is_none(),
            "will after a normal DISCONNECT"
        );
        // DISCONNECT 0x04: the will is published.
        let mut c = connect_packet("w-04", V5, true);
        c.will = Some(will("will/04", "asked", None));
        let (mut w, _) = Client::connect(&addr, c).await;
        w.send(Packet::Disconnect(Disconnect::new(
            ReasonCode::DISCONNECT_WITH_WILL,
        )))
        .await;
        let m = s
            .next_publish(T, true)
            .await
            .expect("will after DISCONNECT 0x04");
        assert_eq!(m.payload, Bytes::from_static(b"asked"));
        // Will delay: a client that returns in time suppresses its will.
        let mut c = connect_packet("w-delay", V5, false);
        c.properties.session_expiry_interval = Some(30);
        c.will = Some(will("will/delay", "late", Some(1)));
        let (lost, _) = Client::connect(&addr, c.clone()).await;
        drop(lost);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (mut back, ack) = Client::connect(&addr, c).await;
        assert!(ack.session_present);
        assert!(
            s.next_publish(Duration::from_millis(1500), true)
                .await
                .is_none(),
            "delayed will sent although the client returned"
        );
        back.send(Packet::Disconnect(Disconnect::default())).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_keeps_qos1_messages() {
    both(|_, addr| async move {
        let (mut s, _) = Client::connect(&addr, connect_packet("pers", V3_1_1, false)).await;
        s.subscribe("pers/t", qos(QoS::AtLeastOnce)).await;
        s.send(Packet::Disconnect(Disconnect::default())).await;
        drop(s);
        let (mut p, _) = Client::connect(&addr, connect_packet("pers-pub", V3_1_1, true)).await;
        for i in 0..5u8 {
            p.publish(
                "pers/t",
                &[b'0' + i],
                QoS::AtLeastOnce,
                false,
                Properties::default(),
            )
            .await;
        }
        let (mut s, ack) = Client::connect(&addr, connect_packet("pers", V3_1_1, false)).await;
        assert!(ack.session_present);
        let mut got = Vec::new();
        while let Some(m) = s.next_publish(QUIET, true).await {
            got.push(m.payload[0]);
        }
        assert_eq!(got, b"01234");
        let _ = Client::connect(&addr, connect_packet("pers", V3_1_1, true)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_and_session_expiry() {
    both(|peer, addr| async move {
        let (mut first, _) = Client::connect(&addr, connect_packet("dup-id", V5, true)).await;
        let (_second, _) = Client::connect(&addr, connect_packet("dup-id", V5, true)).await;
        match (peer, first.recv(T).await) {
            (_, Some(Packet::Disconnect(d))) => {
                assert_eq!(d.reason, ReasonCode::SESSION_TAKEN_OVER)
            }
            // Difference: Mosquitto 2.0.11 closes the old v5 connection
            // without telling it why.
            (Peer::Mosquitto, None) => {}
            (_, other) => panic!("{peer:?}: expected DISCONNECT 0x8E, got {other:?}"),
        }
        // A 1 s session expires; a 60 s one survives.
        for (secs, present) in [(1u32, false), (60, true)] {
            let id = format!("exp-{secs}");
            let mut c = connect_packet(&id, V5, true);
            c.properties.session_expiry_interval = Some(secs);
            let (mut cl, _) = Client::connect(&addr, c).await;
            cl.subscribe("exp", qos(QoS::AtLeastOnce)).await;
            cl.send(Packet::Disconnect(Disconnect::default())).await;
            drop(cl);
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let mut c = connect_packet(&id, V5, false);
            c.properties.session_expiry_interval = Some(0);
            let (_cl, ack) = Client::connect(&addr, c).await;
            assert_eq!(ack.session_present, present, "expiry {secs} s");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_and_keep_alive() {
    both(|peer, addr| async move {
        // A wildcard in a PUBLISH topic: v5 gets a DISCONNECT with a reason code.
        let (mut c, _) = Client::connect(&addr, connect_packet("bad5", V5, true)).await;
        use tokio::io::AsyncWriteExt;
        c.stream
            .write_all(&[0x30, 0x04, 0x00, 0x02, b'a', b'#'])
            .await
            .unwrap();
        match (peer, c.recv(T).await) {
            (Peer::Ours, Some(Packet::Disconnect(d))) => {
                assert_eq!(d.reason, ReasonCode::MALFORMED_PACKET)
            }
            // Mosquitto answers with its own code or just closes.
            (Peer::Mosquitto, _) => {}
            (_, other) => panic!("expected DISCONNECT 0x81, got {other:?}"),
        }
        assert!(c.recv(T).await.is_none(), "connection stayed open");
        // Keep-alive 1 s: a silent client is closed after 1.5 s, not before 1 s.
        // Difference: Mosquitto checks keep-alives on a coarse timer and
        // closes after up to about 5 s; ours closes at 1.5 s.
        let mut k = connect_packet("silent", V3_1_1, true);
        k.keep_alive = 1;
        let (mut s, _) = Client::connect(&addr, k).await;
        let start = Instant::now();
        assert!(s.recv(Duration::from_secs(8)).await.is_none());
        let took = start.elapsed();
        let limit = match peer {
            Peer::Ours => Duration::from_millis(2500),
            Peer::Mosquitto => Duration::from_secs(8),
        };
        assert!(
            took >= Duration::from_millis(1000) && took < limit,
            "{peer:?} closed after {took:?}"
        );
    })
    .await;
}

/// Real clients against the bundled broker: rumqttc v4/v5, paho (3.1,
/// 3.1.1, 5.0), mosquitto_pub/sub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_against_our_broker() {
    let b = OurBroker::start().await;
    let port = b.addr.port();
    // rumqttc v4
    let mut opts = rumqttc::MqttOptions::new("rc4", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 100);
    client
        .subscribe("rc/+", rumqttc::QoS::ExactlyOnce)
        .await
        .unwrap();
    for q in [
        rumqttc::QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce,
    ] {
        client
            .publish("rc/x", q, false, format!("{q:?}"))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    tokio::time::timeout(T, async {
        while got.len() < 3 {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
                events.poll().await.unwrap()
            {
                got.push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
        }
    })
    .await
    .expect("rumqttc v4 got all three QoS levels");
    assert_eq!(got, ["AtMostOnce", "AtLeastOnce", "ExactlyOnce"]);
    // rumqttc v5
    {
        use rumqttc::v5::{mqttbytes::QoS as Q5, AsyncClient, Event, MqttOptions};
        let (client, mut events) =
            AsyncClient::new(MqttOptions::new("rc5", "127.0.0.1", port), 100);
        client.subscribe("rc5/t", Q5::ExactlyOnce).await.unwrap();
        client
            .publish("rc5/t", Q5::ExactlyOnce, false, "five")
            .await
            .unwrap();
        let p = tokio::time::timeout(T, async {
            loop {
                if let Event::Incoming(rumqttc::v5::Incoming::Publish(p)) =
                    events.poll().await.unwrap()
                {
                    return p;
                }
            }
        })
        .await
        .expect("rumqttc v5 message");
        assert_eq!(&p.payload[..], b"five");
    }
    // paho, all versions, QoS 2
    for proto in ["31", "311", "5"] {
        paho_roundtrip(port, proto, &format!("paho{proto}"), 2).await;
    }
    // mosquitto_pub / mosquitto_sub with a retained message (no race).
    let p = port.to_string();
    for v in ["mqttv31", "mqttv311", "mqttv5"] {
        let st = Command::new("mosquitto_pub")
            .args([
                "-p",
                &p,
                "-V",
                v,
                "-t",
                &format!("mq/{v}"),
                "-m",
                v,
                "-r",
                "-q",
                "1",
            ])
            .status()
            .unwrap();
        assert!(st.success());
        let out = Command::new("mosquitto_sub")
            .args([
                "-p",
                &p,
                "-V",
                v,
                "-t",
                &format!("mq/{v}"),
                "-C",
                "1",
                "-W",
                "5",
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), v);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_share_and_redeliver() {
    both(|peer, addr| async move {
        let (mut a, _) = Client::connect(&addr, connect_packet("sh-a", V5, true)).await;
        let (mut b, _) = Client::connect(&addr, connect_packet("sh-b", V5, true)).await;
        assert_eq!(
            a.subscribe("$share/workers/jobs", qos(QoS::AtLeastOnce))
                .await,
            [1]
        );
        assert_eq!(
            b.subscribe("$share/workers/jobs", qos(QoS::AtLeastOnce))
                .await,
            [1]
        );
        let (mut p, _) = Client::connect(&addr, connect_packet("sh-pub", V5, true)).await;
        for i in 0..10u8 {
            p.publish("jobs", &[i], QoS::AtLeastOnce, false, Properties::default())
                .await;
        }
        let mut ga = Vec::new();
        while let Some(m) = a.next_publish(QUIET, true).await {
            ga.push(m.payload[0]);
        }
        let mut gb = Vec::new();
        while let Some(m) = b.next_publish(QUIET, true).await {
            gb.push(m.payload[0]);
        }
        assert_eq!(ga.len() + gb.len(), 10, "{peer:?}: {ga:?} {gb:?}");
        assert!(
            !ga.is_empty() && !gb.is_empty(),
            "{peer:?}: not shared: {ga:?} {gb:?}"
        );
        // A member that leaves holding an unacked message hands it over.
        p.publish(
            "jobs",
            b"held",
            QoS::AtLeastOnce,
            false,
            Properties::default(),
        )
        .await;
        let (holder, mut other) = match a.next_publish(QUIET, false).await {
            Some(m) => {
                assert_eq!(&m.payload[..], b"held");
                (a, b)
            }
            None => {
                let m = b.next_publish(T, false).await.expect("one member got it");
                assert_eq!(&m.payload[..], b"held");
                (b, a)
            }
        };
        drop(holder); // connection lost, no PUBACK
        match (peer, other.next_publish(T, true).await) {
            (_, Some(m)) => assert_eq!(&m.payload[..], b"held"),
            // Difference: Mosquitto 2.0.11 drops a clean session's unacked
            // shared message instead of handing it to another member.
            (Peer::Mosquitto, None) => {}
            (Peer::Ours, None) => panic!("unacked shared message was not redelivered"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_both_ways_and_message_expiry() {
    both(|peer, addr| async move {
        // Inbound alias: publish with topic + alias, then alias only.
        let mut c = connect_packet("alias-sub", V5, true);
        c.properties.topic_alias_maximum = Some(10);
        let (mut s, _) = Client::connect(&addr, c).await;
        s.subscribe("alias/#", qos(QoS::AtMostOnce)).await;
        let (mut p, _) = Client::connect(&addr, connect_packet("alias-pub", V5, true)).await;
        let with_alias = Properties {
            topic_alias: Some(3),
            ..Default::default()
        };
        p.publish("alias/long/topic", b"1", QoS::AtMostOnce, false, with_alias)
            .await;
        p.send(Packet::Publish(mqlb_protocol::Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: MqttStr::default(),
            packet_id: None,
            properties: Properties {
                topic_alias: Some(3),
                ..Default::default()
            },
            payload: Bytes::from_static(b"2"),
        }))
        .await;
        let mut topics = Vec::new();
        let mut known: Option<String> = None;
        for _ in 0..2 {
            let m = s
                .next_publish(T, true)
                .await
                .expect("aliased publish delivered");
            // The subscriber allowed aliases: resolve what the broker sent.
            let topic = if m.topic.is_empty() {
                known.clone().expect("alias used before it was set")
            } else {
                known = Some(m.topic.to_string());
                m.topic.to_string()
            };
            topics.push((topic, m.payload.to_vec()));
        }
        assert_eq!(
            topics,
            [
                ("alias/long/topic".to_string(), b"1".to_vec()),
                ("alias/long/topic".to_string(), b"2".to_vec())
            ]
        );
        // Message expiry: a queued message whose expiry passes is not delivered.
        let mut c = connect_packet("exp-sub", V5, true);
        c.properties.session_expiry_interval = Some(60);
        let (mut e, _) = Client::connect(&addr, c).await;
        e.subscribe("exp/t", qos(QoS::AtLeastOnce)).await;
        e.send(Packet::Disconnect(Disconnect::default())).await;
        // Wait for the broker to close: messages must be queued, not in flight.
        assert!(e.recv(T).await.is_none());
        drop(e);
        let short = Properties {
            message_expiry_interval: Some(1),
            ..Default::default()
        };
        p.publish("exp/t", b"short-lived", QoS::AtLeastOnce, false, short)
            .await;
        p.publish(
            "exp/t",
            b"lasting",
            QoS::AtLeastOnce,
            false,
            Properties::default(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(2200)).await;
        let mut c = connect_packet("exp-sub", V5, false);
        c.properties.session_expiry_interval = Some(0);
        let (mut e, ack) = Client::connect(&addr, c).await;
        assert!(ack.session_present);
        let mut got = Vec::new();
        while let Some(m) = e.next_publish(QUIET, true).await {
            got.push(m.payload.to_vec());
        }
        assert_eq!(got, [b"lasting".to_vec()], "{peer:?}");
    })
    .await;
}

/// Password file and topic ACL, with equivalent configurations for our
/// broker and Mosquitto. Our `mqlb passwd` hashes also work in Mosquitto.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_acl() {
    use mqlb_config::broker::{Access, AclRule, BrokerConfig};
    let dir = scratch_dir("auth");
    let passwd = dir.join("passwd");
    let lines = [
        mqlb_broker::auth::hash_line("alice", "secret").unwrap(),
        mqlb_broker::auth::hash_line("bob", "hunter2").unwrap(),
    ];
    std::fs::write(&passwd, lines.join("\n") + "\n").unwrap();
    let acl = dir.join("acl");
    std::fs::write(
        &acl,
        "user alice\ntopic read #\n\npattern readwrite devices/%c/#\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in [&passwd, &acl] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let ours = OurBroker::start_with(BrokerConfig {
        allow_anonymous: false,
        password_file: Some(passwd.clone()),
        acl: vec![
            AclRule {
                user: Some("alice".into()),
                topic: "#".into(),
                access: Access::Read,
            },
            AclRule {
                user: None,
                topic: "devices/%c/#".into(),
                access: Access::ReadWrite,
            },
        ],
        ..BrokerConfig::default()
    })
    .await;
    let mosq = Mosquitto::start_with(&format!(
        "allow_anonymous false\npassword_file {}\nacl_file {}",
        passwd.display(),
        acl.display()
    ));
    let peers: [(Peer, String); 2] = [
        (Peer::Ours, ours.addr.to_string()),
        (Peer::Mosquitto, mosq.addr()),
    ];
    for (peer, addr) in peers {
        let login = |id: &str, v, user: Option<&str>, pass: &str| {
            let mut c = connect_packet(id, v, true);
            c.username = user.map(|u| MqttStr::try_from(u).unwrap());
            c.password = user.map(|_| Bytes::copy_from_slice(pass.as_bytes()));
            c
        };
        // Anonymous: not authorized. Wrong password: refused.
        let (_, ack) = Client::connect(&addr, login("anon", V5, None, "")).await;
        assert_eq!(ack.reason, ReasonCode::NOT_AUTHORIZED, "{peer:?}");
        let (_, ack) = Client::connect(&addr, login("d1", V3_1_1, Some("bob"), "wrong")).await;
        assert!(
            matches!(
                ack.reason,
                ReasonCode::BAD_USER_NAME_OR_PASSWORD | ReasonCode::NOT_AUTHORIZED
            ),
            "{peer:?}: {:?}",
            ack.reason
        );
        // bob as client d1: his own device tree only.
        let (mut bob, ack) = Client::connect(&addr, login("d1", V5, Some("bob"), "hunter2")).await;
        assert_eq!(ack.reason, ReasonCode::SUCCESS, "{peer:?}");
        assert_eq!(
            bob.subscribe("devices/d1/#", qos(QoS::AtLeastOnce)).await,
            [1],
            "{peer:?}"
        );
        let denied = bob.subscribe("devices/d2/#", qos(QoS::AtLeastOnce)).await;
        match peer {
            Peer::Ours => assert_eq!(denied, [0x87]),
            // Difference: Mosquitto 2.0.11 grants the SUBSCRIBE and filters
            // each message at delivery; we refuse it up front with 0x87.
            Peer::Mosquitto => assert_eq!(denied, [1]),
        }
        bob.send(Packet::Publish(mqlb_protocol::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: MqttStr::try_from("devices/d2/cmd").unwrap(),
            packet_id: mqlb_protocol::PacketId::new(5),
            properties: Properties::default(),
            payload: Bytes::from_static(b"x"),
        }))
        .await;
        match bob.recv(T).await {
            Some(Packet::Puback(a)) => {
                // Difference: Mosquitto acks a denied v5 publish with 0x00 or 0x87.
                if peer == Peer::Ours {
                    assert_eq!(a.reason, ReasonCode::NOT_AUTHORIZED);
                }
            }
            other => panic!("{peer:?}: expected PUBACK, got {other:?}"),
        }
        // alice reads everything and sees bob's allowed publish, not the denied one.
        let (mut alice, _) =
            Client::connect(&addr, login("ops", V5, Some("alice"), "secret")).await;
        assert_eq!(
            alice.subscribe("devices/#", qos(QoS::AtLeastOnce)).await,
            [1]
        );
        bob.publish(
            "devices/d1/temp",
            b"21",
            QoS::AtLeastOnce,
            false,
            Properties::default(),
        )
        .await;
        let m = alice.next_publish(T, true).await.expect("alice reads");
        assert_eq!(m.topic.as_str(), "devices/d1/temp");
        assert!(alice.next_publish(QUIET, true).await.is_none());
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `mqlb broker --config`: `$SYS` topics and Prometheus metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_process_sys_topics_and_metrics() {
    let dir = scratch_dir("broker-proc");
    let (port, admin) = (free_port(), free_port());
    let cfg = dir.join("mqlb.toml");
    std::fs::write(
        &cfg,
        format!("[broker]\nlisten = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{admin}\"\nsys_interval = \"200ms\"\n"),
    )
    .unwrap();
    let _child = KillOnDrop(
        Command::new(mqlb_bin())
            .args(["broker", "--config"])
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}");
    assert!(wait_listening(&addr, T));
    let (mut c, _) = Client::connect(&addr, connect_packet("sys-reader", V3_1_1, true)).await;
    c.subscribe("$SYS/broker/clients/connected", qos(QoS::AtMostOnce))
        .await;
    // The retained value may predate this client; a refresh follows within 200 ms.
    let mut seen = Vec::new();
    for _ in 0..10 {
        let m = c.next_publish(T, true).await.expect("$SYS topic");
        seen.push(m.payload.to_vec());
        if &m.payload[..] == b"1" {
            break;
        }
    }
    assert_eq!(seen.last().map(Vec::as_slice), Some(&b"1"[..]), "{seen:?}");
    // A plain `#` does not match `$SYS` topics (4.7.2).
    let (mut all, _) = Client::connect(&addr, connect_packet("hash-reader", V3_1_1, true)).await;
    all.subscribe("#", qos(QoS::AtMostOnce)).await;
    assert!(all
        .next_publish(Duration::from_millis(600), true)
        .await
        .is_none());
    let (status, body) = http(&format!("127.0.0.1:{admin}"), "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("mqlb_broker_clients_connected 2"), "{body}");
    assert!(body.contains("mqlb_broker_subscriptions 2"), "{body}");
    assert!(body.contains("\nprocess_resident_memory_bytes "), "{body}");
    assert!(body.contains("\nprocess_open_fds "), "{body}");
    // Publish latency, per QoS, from reading the PUBLISH to writing its
    // acknowledgement.
    c.publish(
        "lat/1",
        b"x",
        QoS::AtLeastOnce,
        false,
        Properties::default(),
    )
    .await;
    c.publish(
        "lat/2",
        b"x",
        QoS::ExactlyOnce,
        false,
        Properties::default(),
    )
    .await;
    let (_, body) = http(&format!("127.0.0.1:{admin}"), "GET", "/metrics").await;
    let families = mqlb_tests::exposition::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    for q in ["1", "2"] {
        let count = mqlb_tests::exposition::sample(
            &families,
            &format!("mqlb_broker_publish_ack_seconds_count{{qos=\"{q}\"}}"),
        );
        assert_eq!(count, Some(1.0), "QoS {q}: {body}");
        // On one node, well under a second.
        let fast = mqlb_tests::exposition::sample(
            &families,
            &format!("mqlb_broker_publish_ack_seconds_bucket{{qos=\"{q}\",le=\"1\"}}"),
        );
        assert_eq!(fast, Some(1.0), "QoS {q}: {body}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Server Keep Alive: a v5 client asking for no keep-alive is given the
/// broker's maximum, told so in CONNACK, and held to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keep_alive_caps_v5_clients() {
    let b = OurBroker::start_with(mqlb_config::broker::BrokerConfig {
        max_keep_alive: Some(1),
        ..Default::default()
    })
    .await;
    let mut c = connect_packet("forever", V5, true);
    c.keep_alive = 0;
    let (mut cl, ack) = Client::connect(&b.addr.to_string(), c).await;
    assert_eq!(ack.properties.server_keep_alive, Some(1));
    let start = Instant::now();
    match cl.recv(Duration::from_secs(5)).await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::KEEP_ALIVE_TIMEOUT),
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

/// Subscription options and identifiers, assigned client IDs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_options_and_assigned_ids() {
    both(|peer, addr| async move {
        // An empty v5 client ID is assigned one.
        let (_anon, ack) = Client::connect(&addr, connect_packet("", V5, true)).await;
        let assigned = ack
            .properties
            .assigned_client_identifier
            .expect("assigned client id");
        assert!(!assigned.is_empty(), "{peer:?}");
        let (mut c, _) = Client::connect(&addr, connect_packet("opts", V5, true)).await;
        // No Local: own publishes are not echoed.
        let mut nl = qos(QoS::AtLeastOnce);
        nl.no_local = true;
        c.subscribe("opt/nl", nl).await;
        c.publish(
            "opt/nl",
            b"self",
            QoS::AtLeastOnce,
            false,
            Properties::default(),
        )
        .await;
        assert!(
            c.next_publish(QUIET, true).await.is_none(),
            "{peer:?}: No Local echoed"
        );
        // Retain As Published keeps RETAIN on live messages; without it RETAIN is 0.
        let (mut p, _) = Client::connect(&addr, connect_packet("opts-pub", V5, true)).await;
        let mut rap = qos(QoS::AtLeastOnce);
        rap.retain_as_published = true;
        rap.retain_handling = mqlb_protocol::RetainHandling::DoNotSend;
        c.subscribe("opt/rap", rap).await;
        p.publish(
            "opt/rap",
            b"r",
            QoS::AtLeastOnce,
            true,
            Properties::default(),
        )
        .await;
        let m = c.next_publish(T, true).await.expect("RAP message");
        assert!(m.retain, "{peer:?}: RAP dropped RETAIN");
        // Retain handling 1: retained messages only for a new subscription.
        let mut rh1 = qos(QoS::AtLeastOnce);
        rh1.retain_handling = mqlb_protocol::RetainHandling::SendIfNew;
        c.subscribe("opt/rap", rh1).await;
        assert!(
            c.next_publish(QUIET, true).await.is_none(),
            "{peer:?}: retain handling 1 resent"
        );
        p.publish(
            "opt/rap",
            b"",
            QoS::AtLeastOnce,
            true,
            Properties::default(),
        )
        .await;
        let _ = c.next_publish(QUIET, true).await;
        // Subscription identifiers come back on matching messages.
        c.send(Packet::Subscribe(mqlb_protocol::Subscribe {
            packet_id: mqlb_protocol::PacketId::new(9).unwrap(),
            properties: Properties {
                subscription_identifiers: vec![42],
                ..Default::default()
            },
            filters: vec![(MqttStr::try_from("opt/id/+").unwrap(), qos(QoS::AtMostOnce))],
        }))
        .await;
        assert!(matches!(c.recv(T).await, Some(Packet::Suback(_))));
        p.publish(
            "opt/id/x",
            b"i",
            QoS::AtMostOnce,
            false,
            Properties::default(),
        )
        .await;
        let m = c.next_publish(T, true).await.expect("identified message");
        assert_eq!(m.properties.subscription_identifiers, [42], "{peer:?}");
    })
    .await;
}
