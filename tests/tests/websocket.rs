//! MQTT over WebSocket on a balancer listener (`kind = "websocket"`):
//! real clients (paho-mqtt with `transport="websockets"`) through the
//! balancer to plain-TCP Mosquitto backends, placement shared with TCP,
//! eviction inside a WebSocket frame, and every kind of bad upgrade or
//! frame refused, counted, and never forwarded.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used,
    missing_docs
)]

use std::process::Command;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mqlb_config::Config;
use mqlb_tests::{http, paho_ws, CountingBackend, Mosquitto, RunningBalancer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A balancer with a TCP listener and a WebSocket listener (at `path`) in
/// front of `backends`, with an admin API.
async fn balancer(backends: &[(&str, String)], path: Option<&str>, extra: &str) -> RunningBalancer {
    let mut text = String::from("[[listener]]\nname = \"tcp\"\naddress = \"127.0.0.1:0\"\n");
    text.push_str("[[listener]]\nname = \"ws\"\naddress = \"127.0.0.1:0\"\nkind = \"websocket\"\n");
    if let Some(p) = path {
        text.push_str(&format!("websocket_path = \"{p}\"\n"));
    }
    for (name, addr) in backends {
        text.push_str(&format!(
            "[[backend]]\nname = \"{name}\"\naddress = \"{addr}\"\n"
        ));
    }
    text.push_str("[balancer]\nbackend_connect_timeout = \"1s\"\nconnect_timeout = \"2s\"\n[admin]\naddress = \"127.0.0.1:0\"\n");
    text.push_str(extra);
    RunningBalancer::start(Config::parse("<test>", &text).unwrap()).await
}

async fn rejected(lb: &RunningBalancer, reason: &str) -> u64 {
    let (_, body) = http(&lb.admin.unwrap().to_string(), "GET", "/metrics").await;
    let sample = format!("mqlb_connect_rejected_total{{reason=\"{reason}\"}}");
    body.lines()
        .find_map(|l| l.strip_prefix(&sample)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn paho_over_websocket_reaches_tcp_backends_placed_like_tcp_clients() {
    let ms: Vec<Mosquitto> = (0..3).map(|_| Mosquitto::start()).collect();
    let backends: Vec<(&str, String)> = ["b1", "b2", "b3"]
        .iter()
        .copied()
        .zip(ms.iter().map(Mosquitto::addr))
        .collect();
    let lb = balancer(&backends, Some("/mqtt"), "").await;
    let ws_port = lb.addrs[1].port();
    paho_ws(ws_port, "/mqtt", "311", "ws-paho-311", None).await;
    paho_ws(ws_port, "/mqtt", "5", "ws-paho-5", None).await;
    mqlb_tests::rumqttc_ws(lb.addrs[1], "ws-rumqttc").await;
    // The same client ID over WebSocket and over TCP lands on the same
    // backend: the one placement says.
    for id in ["ws-paho-311", "ws-paho-5", "ws-rumqttc"] {
        let want = lb.first_choice(id);
        let i = mqlb_tests::backend_index(&want);
        assert!(
            ms[i].saw_client(id, Duration::from_secs(5)),
            "{id} not on {want}"
        );
        let (s, _) = mqlb_tests::raw::connect_and_ack(&lb.addrs[0].to_string(), id, 4).await;
        drop(s);
        let seen = ms
            .iter()
            .filter(|m| m.clients().iter().any(|c| c == id))
            .count();
        assert_eq!(seen, 1, "{id} reached more than one backend");
    }
}

/// A raw WebSocket client: the upgrade, then bytes in binary frames.
async fn ws_connect(
    addr: std::net::SocketAddr,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("mqtt")
    );
    ws
}

/// Reads binary frames until `n` bytes have come (or none for 5 s).
async fn ws_read(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    n: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => out.extend_from_slice(&b),
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    out
}

/// A CONNECT split over two frames, then SUBSCRIBE and PUBLISH joined in
/// one frame; a ping answered; and a v5 client evicted by a drain gets its
/// DISCONNECT 0x8B inside a frame.
#[tokio::test]
async fn frames_may_split_and_join_packets_and_eviction_arrives_in_a_frame() {
    let m = Mosquitto::start();
    let lb = balancer(&[("b1", m.addr())], None, "[eviction]\nrate = 100\n").await;
    let mut ws = ws_connect(lb.addrs[1], "/mqtt").await;
    let connect = mqlb_tests::raw::connect("ws-raw", 5);
    let (a, b) = connect.split_at(5);
    ws.send(Message::Binary(a.to_vec().into())).await.unwrap();
    ws.send(Message::Binary(b.to_vec().into())).await.unwrap();
    let connack = ws_read(&mut ws, 3).await;
    assert_eq!(connack[0], 0x20, "{connack:?}");
    // SUBSCRIBE ws/t QoS 0 (v5) + PUBLISH ws/t "x" QoS 0, one frame.
    let mut two = mqlb_tests::raw::frame(0x82, &[0, 1, 0, 0, 4, b'w', b's', b'/', b't', 0]);
    two.extend(mqlb_tests::raw::frame(
        0x30,
        &[0, 4, b'w', b's', b'/', b't', 0, b'x'],
    ));
    ws.send(Message::Binary(two.into())).await.unwrap();
    let got = ws_read(&mut ws, 5 + 2 + 1 + 4 + 2).await;
    assert!(got.windows(1).any(|w| w[0] == 0x90), "no SUBACK in {got:?}");
    assert!(got.ends_with(b"x"), "publish did not come back: {got:?}");
    ws.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(matches!(pong, Ok(Some(Ok(Message::Pong(_))))), "{pong:?}");
    // Drain the only backend: the v5 client is told, in a binary frame.
    let admin = lb.admin.unwrap().to_string();
    let (status, _) = http(&admin, "POST", "/backends/b1/drain").await;
    assert_eq!(status, 200);
    let bye = ws_read(&mut ws, 3).await;
    assert_eq!(&bye[..3], &[0xE0, 0x01, 0x8B], "{bye:?}");
}

/// Bad upgrades and bad frames: each refused within the CONNECT timeout,
/// counted under `websocket` (or `timeout`), and no backend connection.
#[tokio::test]
async fn bad_upgrades_and_frames_are_refused_counted_and_never_forwarded() {
    let backend = CountingBackend::start().await;
    // No health probes: they would be the backend's only connections.
    let lb = balancer(
        &[("b1", backend.addr.to_string())],
        None,
        "[health]\nenabled = false\n",
    )
    .await;
    let ws_addr = lb.addrs[1];
    // Wrong path: 404.
    let mut s = tokio::net::TcpStream::connect(ws_addr).await.unwrap();
    s.write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 404"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // A subprotocol other than MQTT: 400.
    let mut s = tokio::net::TcpStream::connect(ws_addr).await.unwrap();
    s.write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // A 1 MB upgrade request: cut off long before it is all read.
    let mut s = tokio::net::TcpStream::connect(ws_addr).await.unwrap();
    let mut big = b"GET /mqtt HTTP/1.1\r\nX-Pad: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 1 << 20));
    let started = std::time::Instant::now();
    let _ = s.write_all(&big).await; // the balancer may close before all of it is sent
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut sink)).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    // Plain MQTT on the WebSocket port: not HTTP.
    let mut s = tokio::net::TcpStream::connect(ws_addr).await.unwrap();
    s.write_all(&mqlb_tests::raw::connect("plain", 4))
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut sink)).await;
    // A text frame where the CONNECT should be.
    let mut ws = ws_connect(ws_addr, "/mqtt").await;
    ws.send(Message::Text("hello".into())).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(3), ws.next()).await;
    assert!(
        matches!(
            end,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_))))
        ),
        "{end:?}"
    );
    // An unmasked client frame (clients must mask): raw bytes after a
    // proper upgrade.
    let mut s = tokio::net::TcpStream::connect(ws_addr).await.unwrap();
    s.write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").await.unwrap();
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 101"));
    let connect = mqlb_tests::raw::connect("unmasked", 4);
    let mut frame = vec![0x82, u8::try_from(connect.len()).unwrap()];
    frame.extend(connect);
    s.write_all(&frame).await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut sink)).await;
    assert!(
        !sink.windows(2).any(|w| w == [0x20, 0x02]),
        "an unmasked CONNECT got a CONNACK"
    );
    // Every one counted, none forwarded.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ws_refusals = rejected(&lb, "websocket").await;
    assert!(
        ws_refusals >= 4,
        "websocket refusals counted: {ws_refusals}"
    );
    assert_eq!(backend.count(), 0, "a bad client reached the backend");
}

/// WebSocket towards the backend (`websocket_path` on a `[[backend]]`):
/// plain-TCP clients through the balancer to Mosquitto's WebSocket
/// listener and to the bundled broker's, the health probes speaking
/// WebSocket too (both backends come up), messages round-tripping across
/// the two, and a v5 client evicted by a drain told so with DISCONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clients_reach_websocket_backends() {
    let ws_port = mqlb_tests::free_port();
    let m = Mosquitto::start_with(&format!(
        "listener {ws_port} 127.0.0.1\nprotocol websockets\n"
    ));
    assert!(mqlb_tests::wait_listening(
        &format!("127.0.0.1:{ws_port}"),
        Duration::from_secs(5)
    ));
    let ours = mqlb_tests::OurBroker::start_with(
        mqlb_config::broker::BrokerConfig::parse(
            "<t>",
            "[[broker.listener]]\naddress = \"127.0.0.1:0\"\nkind = \"websocket\"\n",
            None,
        )
        .unwrap(),
    )
    .await;
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n\
         [[backend]]\nname = \"b1\"\naddress = \"127.0.0.1:{ws_port}\"\nwebsocket_path = \"/mqtt\"\n\
         [[backend]]\nname = \"b2\"\naddress = \"{ours}\"\nwebsocket_path = \"/mqtt\"\n\
         [health]\ninterval = \"100ms\"\n[eviction]\nrate = 100\n[admin]\naddress = \"127.0.0.1:0\"\n",
        ours = ours.listeners[0]
    );
    let lb = RunningBalancer::start(Config::parse("<t>", &text).unwrap()).await;
    let admin = lb.admin.unwrap().to_string();
    let up = mqlb_tests::wait_until(Duration::from_secs(10), || {
        lb.shared
            .backends
            .snapshot()
            .iter()
            .all(|b| b.health_state() == mqlb_healthcheck::HealthState::Up)
    })
    .await;
    assert!(
        up.is_some(),
        "WebSocket backends never came up: {:?}",
        http(&admin, "GET", "/backends").await
    );

    let port = lb.addr.port().to_string();
    let on_b1 = mqlb_tests::ids_on(&lb, "b1", "wsb", 2);
    let on_b2 = mqlb_tests::ids_on(&lb, "b2", "wsb", 2);
    let sub_id = on_b1[0].clone();
    // A subscriber and a publisher placed on the same backend, on each.
    for (sub, publ, topic) in [
        (&on_b1[0], &on_b1[1], "wsb/one"),
        (&on_b2[0], &on_b2[1], "wsb/two"),
    ] {
        let mut s = mqlb_tests::KillOnDrop(
            Command::new("mosquitto_sub")
                .args(["-h", "127.0.0.1", "-p", &port, "-i", sub, "-t", topic])
                .args(["-q", "1", "-C", "1", "-W", "10"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        // Published until the subscriber has it (it may not have
        // subscribed yet through the WebSocket backend).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline && matches!(s.0.try_wait(), Ok(None)) {
            let p = Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port, "-i", publ])
                .args(["-t", topic, "-m", "over-ws", "-q", "1"])
                .output()
                .unwrap();
            assert!(p.status.success(), "{p:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let mut out = String::new();
        std::io::Read::read_to_string(s.0.stdout.as_mut().unwrap(), &mut out).unwrap();
        assert_eq!(
            out.trim(),
            "over-ws",
            "nothing through the WebSocket backend for {topic}"
        );
    }
    assert!(
        m.saw_client(&sub_id, Duration::from_secs(2)),
        "{sub_id} not on Mosquitto"
    );

    // A v5 client on the bundled broker, drained: DISCONNECT 0x8B.
    let v5_id = mqlb_tests::ids_on(&lb, "b2", "wsb-v5", 1).remove(0);
    let (mut s, ack) = mqlb_tests::raw::connect_and_ack(&lb.addr.to_string(), &v5_id, 5).await;
    assert_eq!(ack.first(), Some(&0x20), "{ack:?}");
    let (status, _) = http(&admin, "POST", "/backends/b2/drain").await;
    assert_eq!(status, 200);
    let bye = mqlb_tests::raw::read_n(&mut s, 3, Duration::from_secs(5)).await;
    assert_eq!(bye, [0xE0, 0x01, 0x8B], "{bye:?}");
}
