//! A client must not be able to tell whether it talks to Mosquitto directly
//! or through mqlb. Every refusal path of the balancer's CONNECT handshake
//! is exercised with raw bytes, sent once to Mosquitto directly and once
//! through mqlb in front of that Mosquitto, and the bytes that come back
//! (and whether the connection closed) must be identical.
//!
//! Paths of `balancer/src/handshake.rs` and where they are covered:
//! * not a CONNECT (HTTP, TLS, another packet first): `http`, `tls`, `pingreq`;
//! * unsupported protocol level: `level*`, `mqisdp_level4`, `mqtt_level3`;
//! * bad protocol name: `bad_name`;
//! * malformed / invalid v5 and 3.x CONNECTs: the `v5_*` and `v311_*` cases;
//! * oversized CONNECT: `oversized_*` (Mosquitto with the same `max_packet_size`);
//! * accepted CONNECTs that the broker itself refuses: forwarded, so
//!   Mosquitto answers (`v311_empty_id_persistent`, `v5_auth_method`);
//! * timeout and early close: the client sees a close in both cases, and
//!   Mosquitto has no CONNECT timeout to compare with; `handshake.rs` unit
//!   tests cover them;
//! * no backend reachable: mqlb answers as a down broker would (v5 0x88,
//!   3.x return code 3), tested in `balancer.rs`.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used
)]

use std::time::Duration;

use mqlb_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_CONNECT: usize = 1000;

fn s(b: &[u8]) -> Vec<u8> {
    let mut v = (b.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(b);
    v
}

fn connect(level: u8, name: &[u8], flags: u8, cid: &[u8], props: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut body = s(name);
    body.extend_from_slice(&[level, flags, 0, 60]);
    if level == 5 {
        body.push(props.len() as u8);
        body.extend_from_slice(props);
    }
    body.extend(s(cid));
    body.extend_from_slice(extra);
    raw::frame(0x10, &body)
}

fn v5(flags: u8, cid: &[u8], extra: &[u8]) -> Vec<u8> {
    connect(5, b"MQTT", flags, cid, &[], extra)
}

fn v311(flags: u8, cid: &[u8], extra: &[u8]) -> Vec<u8> {
    connect(4, b"MQTT", flags, cid, &[], extra)
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let big = vec![b'x'; 2 * MAX_CONNECT];
    vec![
        // Unsupported protocol levels: 3.1.1 return code 1, whatever the level.
        ("level6", connect(6, b"MQTT", 2, b"c", &[], &[])),
        ("level0", connect(0, b"MQTT", 2, b"c", &[], &[])),
        ("level2", connect(2, b"MQTT", 2, b"c", &[], &[])),
        ("level7", connect(7, b"MQTT", 2, b"c", &[], &[])),
        ("level255", connect(255, b"MQTT", 2, b"c", &[], &[])),
        ("mqisdp_level4", connect(4, b"MQIsdp", 2, b"c", &[], &[])),
        ("mqtt_level3", connect(3, b"MQTT", 2, b"c", &[], &[])),
        ("bad_name", connect(4, b"MQTX", 2, b"c", &[], &[])),
        // Malformed or invalid v5 CONNECTs: closed without CONNACK.
        ("v5_client_id_nul", v5(2, b"a\0b", &[])),
        ("v5_user_not_utf8", v5(0x82, b"c", &s(b"\xff\xfe"))),
        ("v5_user_without_flag", v5(2, b"c", &s(b"bob"))),
        (
            "v5_password_without_flag",
            v5(0x82, b"c", &cat(&[&s(b"bob"), &s(b"pw")])),
        ),
        (
            "v5_will_topic_not_utf8",
            v5(0x06, b"c", &cat(&[&[0], &s(b"\xff"), &s(b"x")])),
        ),
        (
            "v5_will_topic_empty",
            v5(0x06, b"c", &cat(&[&[0], &s(b""), &s(b"x")])),
        ),
        (
            "v5_will_without_flag",
            v5(0x02, b"c", &cat(&[&[0], &s(b"t"), &s(b"x")])),
        ),
        ("v5_reserved_flag", v5(0x03, b"c", &[])),
        (
            "v5_will_qos3",
            v5(0x1E, b"c", &cat(&[&[0], &s(b"t"), &s(b"x")])),
        ),
        (
            "v5_unknown_property",
            connect(5, b"MQTT", 2, b"c", &[0x01, 0x01], &[]),
        ),
        (
            "v5_duplicate_property",
            connect(
                5,
                b"MQTT",
                2,
                b"c",
                &[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 1],
                &[],
            ),
        ),
        (
            "v5_receive_maximum_zero",
            connect(5, b"MQTT", 2, b"c", &[0x21, 0, 0], &[]),
        ),
        (
            "v5_truncated",
            raw::frame(0x10, &cat(&[&s(b"MQTT"), &[5, 2, 0, 60, 0], b"\x00\x05ab"])),
        ),
        // Malformed 3.1.1 CONNECTs.
        ("v311_client_id_nul", v311(2, b"a\0b", &[])),
        ("v311_reserved_flag", v311(3, b"c", &[])),
        ("v311_password_without_user", v311(0x42, b"c", &s(b"pw"))),
        (
            "v311_will_qos3",
            v311(0x1E, b"c", &cat(&[&s(b"t"), &s(b"x")])),
        ),
        ("v311_user_without_flag", v311(2, b"c", &s(b"bob"))),
        (
            "v311_truncated",
            raw::frame(0x10, &cat(&[&s(b"MQTT"), &[4, 2, 0, 60], b"\x00\x05ab"])),
        ),
        ("connect_flags_nibble", {
            let mut c = v311(2, b"c", &[]);
            c[0] = 0x11;
            c
        }),
        // Oversized (Mosquitto runs with max_packet_size = mqlb's max_connect_size).
        ("oversized_v5", v5(2, &big, &[])),
        ("oversized_v311", v311(2, &big, &[])),
        // Not MQTT, or not a CONNECT first.
        ("pingreq", vec![0xC0, 0x00]),
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("tls", vec![0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]),
        // Valid for mqlb, refused by the broker: forwarded, so identical.
        ("v311_empty_id_persistent", v311(0, b"", &[])),
        (
            "v5_auth_method",
            connect(5, b"MQTT", 2, b"c", &cat(&[&[0x15], &s(b"SCRAM")]), &[]),
        ),
    ]
}

/// Sends `bytes` and returns what came back before the server closed (or
/// 1.5 s passed), and whether it closed.
async fn exchange(addr: &str, bytes: &[u8]) -> (Vec<u8>, bool) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let _ = c.write_all(bytes).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let closed = loop {
        match tokio::time::timeout(Duration::from_millis(1500), c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (got, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_byte_identical_to_mosquitto() {
    let m = Mosquitto::start_with(&format!("max_packet_size {MAX_CONNECT}"));
    let mut text = String::from(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nconnect_refusal = \"reason-code\"\n",
    );
    text.push_str(&format!(
        "[[backend]]\nname = \"m\"\naddress = \"{}\"\n[balancer]\nmax_connect_size = {MAX_CONNECT}\n\
         [health]\nenabled = false\n",
        m.addr()
    ));
    let b = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let (plain, with_codes) = (b.addrs[0].to_string(), b.addrs[1].to_string());
    // Run the cases concurrently in small batches: each waits up to 1.5 s.
    let mut failures = Vec::new();
    for chunk in cases().chunks(8) {
        let mut tasks = Vec::new();
        for (name, bytes) in chunk.iter().cloned() {
            let (direct, through, coded) = (m.addr(), plain.clone(), with_codes.clone());
            tasks.push(tokio::spawn(async move {
                let want = exchange(&direct, &bytes).await;
                let got = exchange(&through, &bytes).await;
                let with_codes = exchange(&coded, &bytes).await;
                (name, bytes, want, got, with_codes)
            }));
        }
        for t in tasks {
            let (name, bytes, want, got, coded) = t.await.unwrap();
            if want != got {
                failures.push(format!(
                    "{name}: mosquitto {:02x?} closed={}, mqlb {:02x?} closed={}",
                    want.0, want.1, got.0, got.1
                ));
            }
            // The opt-in listener tells v5 clients why, and nothing else changes.
            let is_v5_refusal =
                name.starts_with("v5_") && name != "v5_auth_method" || name == "oversized_v5";
            if is_v5_refusal {
                assert!(
                    matches!(
                        coded.0.as_slice(),
                        [0x20, 0x03, 0x00, 0x81 | 0x82 | 0x95, 0x00]
                    ),
                    "{name} on the reason-code listener: {:02x?} ({bytes:02x?})",
                    coded.0
                );
                assert!(coded.1, "{name}: not closed after the reason code");
            } else {
                assert_eq!(
                    coded, got,
                    "{name}: the listener option changed a non-v5 answer"
                );
            }
        }
    }
    assert!(
        failures.is_empty(),
        "not transparent:\n{}",
        failures.join("\n")
    );
}
