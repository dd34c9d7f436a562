//! Regression tests for defects found by outside testing of the bundled
//! broker, each run against `mqlb broker` as a process and against Debian's
//! Mosquitto as the reference.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used
)]

use std::time::Duration;

use mqlb_protocol::{Packet, ProtocolVersion, QoS};
use mqlb_tests::client::{connect_packet, qos, Client};
use mqlb_tests::raw;
use mqlb_tests::*;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(5);

/// A SUBSCRIBE (or PUBLISH) with `levels` topic levels, all empty.
fn deep_subscribe(v5: bool, levels: usize) -> Vec<u8> {
    let filter = "/".repeat(levels - 1);
    let mut body = vec![0, 1];
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(0);
    raw::frame(0x82, &body)
}

fn deep_publish(v5: bool, levels: usize) -> Vec<u8> {
    let topic = "/".repeat(levels - 1);
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(b"x");
    raw::frame(0x30, &body)
}

/// Sends one packet after CONNECT and returns every byte the server sent
/// back until it closed (or 2 s passed) and whether it closed.
async fn answer(addr: &str, level: u8, packet: &[u8]) -> (Vec<u8>, bool) {
    let (mut s, ack) = raw::connect_and_ack(addr, "deep", level).await;
    assert_eq!(ack.get(3).copied(), Some(0), "CONNACK {ack:02x?}");
    s.write_all(packet).await.unwrap();
    // A follow-up UNSUBSCRIBE/PUBLISH is what used to abort the process.
    let _ = s.write_all(&deep_publish(level == 5, 65_000)).await;
    let got = raw::read_n(&mut s, 64, Duration::from_secs(2)).await;
    let closed = got.len() < 64 && raw::closed(&mut s, Duration::from_millis(500)).await;
    (got, closed)
}

/// Defect: a SUBSCRIBE to 65,000 `/` was granted and the next PUBLISH or
/// UNSUBSCRIBE overflowed the worker's stack, killing every client on the
/// node. Now the codec refuses topics deeper than `max_topic_levels`
/// (default 200): v5 gets DISCONNECT 0x8F / 0x90, 3.x is closed, as
/// Mosquitto closes. Other clients keep being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_very_deep_topic_is_refused_and_the_broker_survives() {
    let mut ours = BrokerProcess::start(&[]);
    let mosquitto = Mosquitto::start();
    for (peer, addr) in [("mqlb", ours.addr.clone()), ("mosquitto", mosquitto.addr())] {
        // A bystander that must not notice anything.
        let (mut by, _) = Client::connect(
            &addr,
            connect_packet("bystander", ProtocolVersion::V5, true),
        )
        .await;
        by.subscribe("by/#", qos(QoS::AtLeastOnce)).await;
        for level in [4u8, 5] {
            let v5 = level == 5;
            let (got, closed) = answer(&addr, level, &deep_subscribe(v5, 65_000)).await;
            assert!(
                closed,
                "{peer} v{level}: deep SUBSCRIBE left the connection open"
            );
            assert!(
                got.first() != Some(&0x90),
                "{peer} v{level}: deep SUBSCRIBE was granted: {got:02x?}"
            );
            let (got_pub, closed) = answer(&addr, level, &deep_publish(v5, 65_000)).await;
            assert!(
                closed,
                "{peer} v{level}: deep PUBLISH left the connection open"
            );
            if peer == "mqlb" {
                // The reason code says why (Mosquitto sends 0x81 / 0x82).
                if v5 {
                    assert_eq!(got, [0xE0, 0x01, 0x8F], "v5 SUBSCRIBE");
                    assert_eq!(got_pub, [0xE0, 0x01, 0x90], "v5 PUBLISH");
                } else {
                    assert!(got.is_empty() && got_pub.is_empty(), "3.x gets no reason");
                }
            }
            // At the limit is fine: 200 levels are granted.
            let (mut s, _) = raw::connect_and_ack(&addr, "limit", level).await;
            s.write_all(&deep_subscribe(v5, 200)).await.unwrap();
            let suback = raw::read_n(&mut s, if v5 { 6 } else { 5 }, T).await;
            assert_eq!(
                suback.first(),
                Some(&0x90),
                "{peer} v{level}: {suback:02x?}"
            );
            assert_eq!(suback.last(), Some(&0x00), "{peer} v{level}: {suback:02x?}");
        }
        if peer == "mqlb" {
            assert!(ours.alive(), "the broker process died");
        }
        // The bystander is still connected and served.
        let (mut p, _) = Client::connect(
            &addr,
            connect_packet("by-pub", ProtocolVersion::V3_1_1, true),
        )
        .await;
        p.publish(
            "by/x",
            b"still here",
            QoS::AtLeastOnce,
            false,
            Default::default(),
        )
        .await;
        let got = by.next_publish(T, true).await.expect("bystander served");
        assert_eq!(&got.payload[..], b"still here", "{peer}");
    }
}

/// The limit is a broker setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topic_level_limit_is_configurable() {
    let dir = scratch_dir("levels");
    let cfg = dir.join("mqlb.toml");
    std::fs::write(&cfg, "[broker]\nmax_topic_levels = 3\n").unwrap();
    let b = BrokerProcess::start(&["--config", cfg.to_str().unwrap()]);
    let (mut c, _) =
        Client::connect(&b.addr, connect_packet("lv", ProtocolVersion::V5, true)).await;
    assert_eq!(c.subscribe("a/b/c", qos(QoS::AtMostOnce)).await, [0]);
    let (got, closed) = answer(&b.addr, 5, &deep_subscribe(true, 4)).await;
    assert!(closed);
    assert_eq!(got, [0xE0, 0x01, 0x8F]);
}

/// Defect: after a QoS 2 delivery, QoS 0 delivery to the same client
/// stopped silently. The PUBREL bypassed the outbound byte accounting, the
/// backlog counter underflowed, and every QoS 0 message then counted as
/// over the slow-consumer limit. Mosquitto delivers all 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_still_flows_after_a_qos2_delivery() {
    let ours = BrokerProcess::start(&[]);
    let mosquitto = Mosquitto::start();
    for (peer, addr) in [("mqlb", ours.addr.clone()), ("mosquitto", mosquitto.addr())] {
        for v in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let (mut sub, _) = Client::connect(&addr, connect_packet("mixsub", v, true)).await;
            sub.subscribe("t/a", qos(QoS::ExactlyOnce)).await;
            sub.subscribe("t/b", qos(QoS::AtMostOnce)).await;
            let (mut publ, _) = Client::connect(&addr, connect_packet("mixpub", v, true)).await;
            let mut on_a = 0;
            for i in 0..5 {
                publ.publish(
                    "t/a",
                    format!("a{i}").as_bytes(),
                    QoS::ExactlyOnce,
                    false,
                    Default::default(),
                )
                .await;
                // Receive it and complete the QoS 2 handshake (PUBREC, then
                // PUBCOMP for the PUBREL) before the next one.
                let p = sub.next_publish(T, true).await.expect("QoS 2 message");
                assert_eq!(p.topic.as_str(), "t/a");
                on_a += 1;
            }
            for i in 0..200 {
                publ.publish(
                    "t/b",
                    format!("b{i}").as_bytes(),
                    QoS::AtMostOnce,
                    false,
                    Default::default(),
                )
                .await;
            }
            // A QoS 1 marker after the QoS 0 burst: once it arrives,
            // everything before it has too.
            let mut on_b = 0;
            let mut seen = Vec::new();
            loop {
                match sub.recv(T).await {
                    Some(Packet::Publish(p)) if p.topic.as_str() == "t/b" => {
                        seen.push(String::from_utf8_lossy(&p.payload).to_string());
                        on_b += 1;
                        if on_b == 200 {
                            break;
                        }
                    }
                    Some(Packet::Pubrel(a)) => {
                        sub.send(Packet::Pubcomp(mqlb_protocol::Ack::new(a.packet_id)))
                            .await
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            assert_eq!(on_a, 5, "{peer} {v:?}");
            assert_eq!(on_b, 200, "{peer} {v:?}: QoS 0 stopped after QoS 2");
            let want: Vec<String> = (0..200).map(|i| format!("b{i}")).collect();
            assert_eq!(seen, want, "{peer} {v:?}: order");
        }
    }
}

/// A session's subscriptions are capped (`max_subscriptions`): past the
/// cap, v5 gets 0x97 Quota exceeded and 3.x 0x80 for each extra filter;
/// replacing an existing subscription is always allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_per_session_are_capped() {
    let dir = scratch_dir("subcap");
    let cfg = dir.join("mqlb.toml");
    std::fs::write(&cfg, "[broker]\nmax_subscriptions = 3\n").unwrap();
    let b = BrokerProcess::start(&["--config", cfg.to_str().unwrap()]);
    for (v, over) in [(5u8, 0x97u8), (4, 0x80)] {
        let (mut s, _) = raw::connect_and_ack(&b.addr, &format!("cap{v}"), v).await;
        let mut body = vec![0, 7];
        if v == 5 {
            body.push(0);
        }
        for f in ["a", "b", "c", "d"] {
            body.extend_from_slice(&[0, 1]);
            body.extend_from_slice(f.as_bytes());
            body.push(1);
        }
        s.write_all(&raw::frame(0x82, &body)).await.unwrap();
        let head = if v == 5 { 5 } else { 4 };
        let suback = raw::read_n(&mut s, head + 4, T).await;
        assert_eq!(&suback[head..], [1, 1, 1, over], "v{v}: {suback:02x?}");
        // Re-subscribing to one it holds is not a new subscription.
        let mut body = vec![0, 8];
        if v == 5 {
            body.push(0);
        }
        body.extend_from_slice(&[0, 1, b'a', 0]);
        s.write_all(&raw::frame(0x82, &body)).await.unwrap();
        let suback = raw::read_n(&mut s, head + 1, T).await;
        assert_eq!(suback.last(), Some(&0), "v{v}: {suback:02x?}");
    }
}
