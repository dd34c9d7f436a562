//! The balancer end to end: real Mosquitto and rumqttd backends, real
//! clients (rumqttc, mosquitto_pub/sub, paho-mqtt), real sockets on loopback.
//! Every test is bounded by a timeout and a fixed number of connections.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used
)]

use std::process::Command;
use std::time::Duration;

use mqlb_balancer::metrics::RejectReason;
use mqlb_tests::raw::{self, closed, connect_and_ack, read_n};
use mqlb_tests::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

async fn three_mosquittos() -> (Vec<Mosquitto>, RunningBalancer) {
    let ms: Vec<Mosquitto> = (0..3).map(|_| Mosquitto::start()).collect();
    let backends: Vec<(&str, String)> = ["b1", "b2", "b3"]
        .iter()
        .zip(&ms)
        .map(|(n, m)| (*n, m.addr()))
        .collect();
    let lb = RunningBalancer::start(config(&backends, "")).await;
    (ms, lb)
}

/// mosquitto_sub and mosquitto_pub, MQTT 3.1 / 3.1.1 / 5.0, through the
/// balancer; the two IDs are chosen to share a backend (these Mosquittos are
/// not clustered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_pubsub_all_versions() {
    let (ms, lb) = three_mosquittos().await;
    let port = lb.addr.port().to_string();
    for (i, v) in ["mqttv31", "mqttv311", "mqttv5"].iter().enumerate() {
        let ids = ids_on(&lb, "b2", &format!("mosq-{v}"), 2);
        let mut sub = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port, "-V", v, "-i", &ids[0]])
            .args(["-t", &format!("e2e/{i}"), "-C", "1", "-W", "10", "-q", "1"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        assert!(ms[1].saw_client(&ids[0], T), "subscriber not on b2");
        // The SUBSCRIBE follows the CONNACK; publish until the subscriber
        // has its message and exits (at most 20 tries).
        for attempt in 0..20 {
            let st = Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port, "-V", v, "-i", &ids[1]])
                .args([
                    "-t",
                    &format!("e2e/{i}"),
                    "-m",
                    &format!("hello-{v}"),
                    "-q",
                    "1",
                ])
                .status()
                .unwrap();
            assert!(
                st.success(),
                "mosquitto_pub {v} failed on attempt {attempt}"
            );
            std::thread::sleep(Duration::from_millis(100));
            if sub.try_wait().unwrap().is_some() {
                break;
            }
        }
        let out = sub.wait_with_output().unwrap();
        assert!(out.status.success(), "mosquitto_sub {v}: {:?}", out);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("hello-{v}")
        );
        assert!(ms[1].saw_client(&ids[1], T));
    }
    lb.stop().await;
}

/// paho-mqtt (Python) with MQTT 3.1, 3.1.1 and 5.0: one client subscribes
/// and publishes to itself through the balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_python_all_versions() {
    let (ms, lb) = three_mosquittos().await;
    for proto in ["31", "311", "5"] {
        let id = format!("paho-{proto}");
        let backend = lb.first_choice(&id);
        paho_roundtrip(lb.addr.port(), proto, &id, 1).await;
        assert!(
            ms[backend_index(&backend)].saw_client(&id, T),
            "paho {proto} not on {backend}"
        );
    }
    lb.stop().await;
}

/// rumqttc v4 and v5 through the balancer, against Mosquitto.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v4_and_v5() {
    let (ms, lb) = three_mosquittos().await;
    // v4
    {
        let mut opts = rumqttc::MqttOptions::new("rumqttc-v4", "127.0.0.1", lb.addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 10);
        client
            .subscribe("rc/v4", rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        client
            .publish("rc/v4", rumqttc::QoS::AtLeastOnce, false, "v4-payload")
            .await
            .unwrap();
        let got = tokio::time::timeout(T, async {
            loop {
                if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
                    events.poll().await.unwrap()
                {
                    return p.payload;
                }
            }
        })
        .await
        .expect("v4 message");
        assert_eq!(&got[..], b"v4-payload");
        let backend = lb.first_choice("rumqttc-v4");
        assert!(ms[backend_index(&backend)].saw_client("rumqttc-v4", T));
    }
    // v5
    {
        use rumqttc::v5::{mqttbytes::QoS, AsyncClient, Event, MqttOptions};
        let mut opts = MqttOptions::new("rumqttc-v5", "127.0.0.1", lb.addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(opts, 10);
        client.subscribe("rc/v5", QoS::AtLeastOnce).await.unwrap();
        client
            .publish("rc/v5", QoS::AtLeastOnce, false, "v5-payload")
            .await
            .unwrap();
        let got = tokio::time::timeout(T, async {
            loop {
                if let Event::Incoming(rumqttc::v5::Incoming::Publish(p)) =
                    events.poll().await.unwrap()
                {
                    return p.payload;
                }
            }
        })
        .await
        .expect("v5 message");
        assert_eq!(&got[..], b"v5-payload");
        let backend = lb.first_choice("rumqttc-v5");
        assert!(ms[backend_index(&backend)].saw_client("rumqttc-v5", T));
    }
    lb.stop().await;
}

/// rumqttd, embedded, as a second broker implementation behind the balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttd_backend_with_rumqttc() {
    let port = free_port();
    let conf = format!(
        r#"
id = 0
[router]
max_connections = 100
max_outgoing_packet_count = 200
max_segment_size = 1048576
max_segment_count = 10
[v4.1]
name = "v4"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 0
[v4.1.connections]
connection_timeout_ms = 5000
max_payload_size = 20480
max_inflight_count = 100
"#
    );
    let conf: rumqttd::Config = toml::from_str(&conf).unwrap();
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(conf);
        let _ = broker.start();
    });
    assert!(wait_listening(&format!("127.0.0.1:{port}"), T));
    let lb = RunningBalancer::start(config(&[("rumqttd", format!("127.0.0.1:{port}"))], "")).await;

    let mut opts = rumqttc::MqttOptions::new("via-lb", "127.0.0.1", lb.addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    // Room for every request before the event loop is first polled.
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 100);
    client
        .subscribe("rd/t", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    for i in 0..10u8 {
        client
            .publish("rd/t", rumqttc::QoS::AtLeastOnce, false, vec![i; 100])
            .await
            .unwrap();
    }
    let mut seen = 0;
    tokio::time::timeout(T, async {
        while seen < 10 {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
                events.poll().await.unwrap()
            {
                assert_eq!(p.payload.len(), 100);
                seen += 1;
            }
        }
    })
    .await
    .expect("10 messages via rumqttd");
    assert_eq!(
        lb.shared
            .backends
            .get("rumqttd")
            .unwrap()
            .forwarded
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    lb.stop().await;
}

/// The same client ID lands on the same backend across reconnects and across
/// two independent balancer processes given the same backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_backend_across_reconnects_and_processes() {
    let ms: Vec<Mosquitto> = (0..3).map(|_| Mosquitto::start()).collect();
    let mut procs = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..2 {
        let port = free_port();
        let mut cmd = Command::new(mqlb_bin());
        cmd.args(["balance", "--listen", &format!("127.0.0.1:{port}")]);
        for (i, m) in ms.iter().enumerate() {
            cmd.args(["--backend", &format!("b{}={}", i + 1, m.addr())]);
        }
        procs.push(KillOnDrop(
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        ));
        assert!(wait_listening(&format!("127.0.0.1:{port}"), T));
        ports.push(port);
    }
    for i in 0..30 {
        let id = format!("sticky-{i}");
        let mut seen_on = Vec::new();
        for round in 0..4 {
            let port = ports[round % 2];
            let (mut s, ack) = connect_and_ack(&format!("127.0.0.1:{port}"), &id, 4).await;
            assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "{id} round {round}");
            s.write_all(&[0xE0, 0x00]).await.unwrap();
            assert!(closed(&mut s, T).await);
            // Exactly one broker has seen this ID, as many times as we connected.
            let counts: Vec<usize> = ms
                .iter()
                .map(|m| m.clients().iter().filter(|c| **c == id).count())
                .collect();
            let owner = counts.iter().position(|&c| c > 0).unwrap();
            assert_eq!(
                counts.iter().filter(|&&c| c > 0).count(),
                1,
                "{id}: {counts:?}"
            );
            seen_on.push(owner);
        }
        assert!(
            seen_on.windows(2).all(|w| w[0] == w[1]),
            "{id}: {seen_on:?}"
        );
    }
}

/// 10,000 client IDs through a balancer with backends b1..b3, then through a
/// balancer with b2 removed: only b2's clients move, and each goes to its
/// second choice. Placement is observed from the brokers' own logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_backend_moves_only_its_clients() {
    const N: usize = 10_000;
    let ms: Vec<Mosquitto> = (0..3)
        .map(|_| Mosquitto::start_with("max_connections -1"))
        .collect();
    let all: Vec<(&str, String)> = vec![
        ("b1", ms[0].addr()),
        ("b2", ms[1].addr()),
        ("b3", ms[2].addr()),
    ];
    // Probes would add their own client IDs to the brokers' logs.
    let no_probes = "[health]\nenabled = false\n";
    let lb3 = RunningBalancer::start(config(&all, no_probes)).await;
    let lb2 = RunningBalancer::start(config(&[all[0].clone(), all[2].clone()], no_probes)).await;

    async fn connect_all(addr: std::net::SocketAddr, prefix: &str) {
        let ids: Vec<String> = (0..N).map(|i| format!("{prefix}{i}")).collect();
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
        let mut tasks = Vec::new();
        for id in ids {
            let permit = sem.clone().acquire_owned().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let (mut s, ack) = connect_and_ack(&addr.to_string(), &id, 4).await;
                assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "{id}");
                let _ = s.write_all(&[0xE0, 0x00]).await;
                drop(permit);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    tokio::time::timeout(Duration::from_secs(120), async {
        connect_all(lb3.addr, "move-").await;
        // Same IDs again, placement from the 2-backend balancer. Tell the
        // rounds apart by waiting for the first round's log lines.
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while ms.iter().map(|m| m.clients().len()).sum::<usize>() < N
            && std::time::Instant::now() < end
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("first round within 120 s");
    let first: Vec<Vec<String>> = ms.iter().map(|m| m.clients()).collect();
    assert_eq!(first.iter().map(Vec::len).sum::<usize>(), N);
    tokio::time::timeout(Duration::from_secs(120), connect_all(lb2.addr, "move-"))
        .await
        .expect("second round within 120 s");
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while ms.iter().map(|m| m.clients().len()).sum::<usize>() < 2 * N
        && std::time::Instant::now() < end
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut owner_before = std::collections::HashMap::new();
    for (b, ids) in first.iter().enumerate() {
        for id in ids {
            owner_before.insert(id.clone(), b);
        }
    }
    let mut moved = 0;
    let mut b2_clients = 0;
    for (b, m) in ms.iter().enumerate() {
        let all_ids = m.clients();
        for id in &all_ids[first[b].len()..] {
            let before = owner_before[id];
            assert_ne!(b, 1, "b2 was removed but received {id}");
            if before != b {
                assert_eq!(
                    before,
                    1,
                    "{id} moved from b{} to b{} although b{} stayed",
                    before + 1,
                    b + 1,
                    before + 1
                );
                let second = &lb3.shared.backends.candidates(id.as_bytes())[1].name;
                assert_eq!(
                    second,
                    &format!("b{}", b + 1),
                    "{id} did not go to its second choice"
                );
                moved += 1;
            }
        }
    }
    b2_clients += first[1].len();
    assert_eq!(moved, b2_clients, "every b2 client moved, nothing else");
    assert!(b2_clients > N / 5, "b2 owned only {b2_clients} of {N}");
    lb3.stop().await;
    lb2.stop().await;
}

/// With a backend killed, a reconnecting client lands on its next backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_client_reconnects_to_next() {
    let (mut ms, lb) = three_mosquittos().await;
    let id = ids_on(&lb, "b1", "failover", 1).remove(0);
    let (mut s, ack) = connect_and_ack(&lb.addr.to_string(), &id, 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    assert!(ms[0].saw_client(&id, T));
    ms[0].kill();
    // The balancer passes the backend's close through to the client.
    assert!(
        closed(&mut s, T).await,
        "client not closed after its backend died"
    );
    let second = lb.shared.backends.candidates(id.as_bytes())[1].name.clone();
    let (_s, ack) = connect_and_ack(&lb.addr.to_string(), &id, 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    assert!(
        ms[backend_index(&second)].saw_client(&id, T),
        "{id} not on {second}"
    );
    let failures = lb.connect_failures("b1");
    assert_eq!(failures, 1);
    lb.stop().await;
}

/// With no backend reachable: v5 gets CONNACK 0x88, 3.1.1 gets return code 3.
#[tokio::test]
async fn no_backend_gives_server_unavailable() {
    let dead = format!("127.0.0.1:{}", free_port());
    let lb = RunningBalancer::start(config(&[("gone", dead)], "")).await;
    let (_, ack5) = connect_and_ack(&lb.addr.to_string(), "x", 5).await;
    assert_eq!(ack5, [0x20, 0x03, 0x00, 0x88, 0x00]);
    let (_, ack4) = connect_and_ack(&lb.addr.to_string(), "x", 4).await;
    assert_eq!(ack4, [0x20, 0x02, 0x00, 0x03]);
    assert_eq!(lb.shared.metrics.rejected(RejectReason::NoBackend), 2);
    lb.stop().await;
}

/// Bad input opens no backend connection, is counted, and gets the answer a
/// strict broker would give.
#[tokio::test]
async fn bad_input_opens_no_backend_connection() {
    let counting = CountingBackend::start().await;
    let lb = RunningBalancer::start(config(
        &[("counting", counting.addr.to_string())],
        "connect_timeout = \"1s\"\nmax_connect_size = 1024\n[health]\nenabled = false\n",
    ))
    .await;
    let addr = lb.addr.to_string();
    let m = &lb.shared.metrics;

    // Garbage / HTTP: closed without a reply.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(closed(&mut s, T).await);
    // A non-CONNECT first packet (PINGREQ, then a PUBLISH).
    for first in [&[0xC0u8, 0x00][..], &[0x30, 0x03, 0x00, 0x01, b't']] {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(first).await.unwrap();
        assert!(closed(&mut s, T).await);
    }
    // Oversized v5 CONNECT: refused from the header alone, closed without a
    // CONNACK as Mosquitto does (see transparency.rs for the opt-in codes).
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let mut big = raw::connect(&"x".repeat(2000), 5);
    s.write_all(&big[..20]).await.unwrap();
    assert!(closed(&mut s, T).await);
    // Oversized 3.1.1 CONNECT: closed (3.x has no code for it).
    let mut s = TcpStream::connect(&addr).await.unwrap();
    big = raw::connect(&"x".repeat(2000), 4);
    let _ = s.write_all(&big).await;
    assert!(closed(&mut s, T).await);
    // Slowloris: half a CONNECT, then silence past the 1 s timeout.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&raw::connect("slow", 4)[..6]).await.unwrap();
    let started = std::time::Instant::now();
    assert!(closed(&mut s, T).await);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the timeout"
    );
    // Malformed v5 CONNECT (reserved flag): closed, as Mosquitto does.
    let mut bad5 = raw::connect("m", 5);
    bad5[9] |= 0x01;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&bad5).await.unwrap();
    assert!(closed(&mut s, T).await);
    // Unsupported protocol level 2: return code 1, as Mosquitto answers.
    let mut l2 = raw::connect("m", 4);
    l2[8] = 2;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&l2).await.unwrap();
    assert_eq!(read_n(&mut s, 4, T).await, [0x20, 0x02, 0x00, 0x01]);
    // Close before completing.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&raw::connect("early", 4)[..4]).await.unwrap();
    drop(s);

    let end = std::time::Instant::now() + T;
    while m.rejected_total() < 10 && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(m.rejected(RejectReason::NotConnect), 3);
    assert_eq!(m.rejected(RejectReason::TooLarge), 2);
    assert_eq!(m.rejected(RejectReason::Timeout), 1);
    assert_eq!(m.rejected(RejectReason::Malformed), 1);
    assert_eq!(m.rejected(RejectReason::UnsupportedProtocol), 1);
    assert_eq!(m.rejected(RejectReason::ClosedEarly), 1);
    assert_eq!(
        counting.count(),
        0,
        "a backend connection was opened for bad input"
    );
    // A valid CONNECT does reach the counting backend: the check can fail.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&raw::connect("good", 4)).await.unwrap();
    let end = std::time::Instant::now() + T;
    while counting.count() == 0 && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(counting.count(), 1);
    assert_eq!(
        m.active.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "refused connections leaked"
    );
    lb.stop().await;
}

/// A CONNECT written one byte per segment is accepted and forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_in_one_byte_writes() {
    let (ms, lb) = three_mosquittos().await;
    for level in [3u8, 4, 5] {
        let id = format!("drip-{level}");
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        for b in raw::connect(&id, level) {
            s.write_all(&[b]).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let ack = read_n(&mut s, 4, T).await;
        assert_eq!(
            &ack[..2],
            if level == 5 {
                &[0x20, 0x09][..]
            } else {
                &[0x20, 0x02][..]
            },
            "level {level}"
        );
        let backend = lb.first_choice(&id);
        assert!(
            ms[backend_index(&backend)].saw_client(&id, T),
            "{id} {backend} {:?}",
            ms.iter().map(|m| m.clients()).collect::<Vec<_>>()
        );
    }
    lb.stop().await;
}

/// Bridge CONNECTs (level 0x83 / 0x84) are placed and forwarded; HAProxy
/// 2.6's `mqtt_is_valid` rejects them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_connects_are_forwarded() {
    let (ms, lb) = three_mosquittos().await;
    for level in [0x83u8, 0x84] {
        let id = format!("bridge-{level:x}");
        let (_s, ack) = connect_and_ack(&lb.addr.to_string(), &id, level).await;
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "level {level:#x}");
        let backend = lb.first_choice(&id);
        assert!(ms[backend_index(&backend)].saw_client(&id, T));
    }
    lb.stop().await;
}

/// What the balancer answers to an unsupported protocol level is what the
/// broker itself answers on a direct connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_level_answer_matches_direct_mosquitto() {
    let (ms, lb) = three_mosquittos().await;
    for level in [1u8, 2] {
        let mut pkt = raw::connect("lvl", 4);
        pkt[8] = level;
        let mut via = TcpStream::connect(lb.addr).await.unwrap();
        via.write_all(&pkt).await.unwrap();
        let mut direct = TcpStream::connect(ms[0].addr()).await.unwrap();
        direct.write_all(&pkt).await.unwrap();
        assert_eq!(
            read_n(&mut via, 4, T).await,
            read_n(&mut direct, 4, T).await,
            "level {level}"
        );
    }
    lb.stop().await;
}

/// Half-close: the client shuts down its write side, and still receives
/// what the backend sends afterwards.
#[tokio::test]
async fn half_close_keeps_the_other_direction() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap(); // until the client's FIN arrives
        s.write_all(&[0x20, 0x02, 0x00, 0x00, 0xD0, 0x00])
            .await
            .unwrap();
        got
    });
    let lb = RunningBalancer::start(config(
        &[("half", backend_addr.to_string())],
        "[health]\nenabled = false\n",
    ))
    .await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let connect = raw::connect("half", 4);
    s.write_all(&connect).await.unwrap();
    s.write_all(&[0xC0, 0x00]).await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(
        read_n(&mut s, 6, T).await,
        [0x20, 0x02, 0x00, 0x00, 0xD0, 0x00]
    );
    assert!(closed(&mut s, T).await);
    let mut expected = connect.clone();
    expected.extend_from_slice(&[0xC0, 0x00]);
    assert_eq!(
        tokio::time::timeout(T, server).await.unwrap().unwrap(),
        expected
    );
    lb.stop().await;
}

/// `max_connections`: at the limit, new clients wait in the accept backlog
/// (they are not accepted and starved), and are served when a slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_queues_in_the_backlog() {
    let m = Mosquitto::start();
    let lb = RunningBalancer::start(config(
        &[("b1", m.addr())],
        "max_connections = 2\n[health]\nenabled = false\n",
    ))
    .await;
    let addr = lb.addr.to_string();
    let (first, ack1) = connect_and_ack(&addr, "limit-1", 4).await;
    let (_second, ack2) = connect_and_ack(&addr, "limit-2", 4).await;
    assert_eq!(
        (ack1.as_slice(), ack2.as_slice()),
        (&[0x20, 0x02, 0, 0][..], &[0x20, 0x02, 0, 0][..])
    );
    let mut third = TcpStream::connect(&addr).await.unwrap();
    third.write_all(&raw::connect("limit-3", 4)).await.unwrap();
    assert!(
        read_n(&mut third, 4, Duration::from_millis(500))
            .await
            .is_empty(),
        "served above the limit"
    );
    assert_eq!(
        lb.shared
            .metrics
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    drop(first);
    assert_eq!(read_n(&mut third, 4, T).await, [0x20, 0x02, 0x00, 0x00]);

    // A reload lowers the cap to 1: the two open clients stay connected,
    // and a new one waits until both have left.
    let reload = |max: usize| {
        lb.shared.reload(config(
            &[("b1", m.addr())],
            &format!("max_connections = {max}\n[health]\nenabled = false\n"),
        ))
    };
    let r = reload(1);
    assert!(r.needs_restart.is_empty(), "{r:?}");
    let mut second = _second;
    for s in [&mut second, &mut third] {
        s.write_all(&[0xC0, 0x00]).await.unwrap();
        assert_eq!(
            read_n(s, 2, T).await,
            [0xD0, 0x00],
            "kept across the reload"
        );
    }
    let mut fourth = TcpStream::connect(&addr).await.unwrap();
    fourth.write_all(&raw::connect("limit-4", 4)).await.unwrap();
    drop(second);
    assert!(
        read_n(&mut fourth, 4, Duration::from_millis(500))
            .await
            .is_empty(),
        "served above the lowered limit"
    );
    drop(third);
    assert_eq!(read_n(&mut fourth, 4, T).await, [0x20, 0x02, 0x00, 0x00]);
    // Raising it takes effect at once.
    reload(3);
    let (_fifth, ack5) = connect_and_ack(&addr, "limit-5", 4).await;
    let (_sixth, ack6) = connect_and_ack(&addr, "limit-6", 4).await;
    assert_eq!((ack5[3], ack6[3]), (0, 0));
    lb.stop().await;
}

/// `source_addresses`: backend connections are opened from the configured
/// local addresses in turn (HAProxy's `source`), so a fleet larger than one
/// source's ephemeral ports can reach one backend. A source that is not a
/// local address is refused at start-up, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connections_use_the_configured_source_addresses() {
    use std::net::IpAddr;
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = backend.local_addr().unwrap().to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<IpAddr>::new()));
    let record = seen.clone();
    let acceptor = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, peer)) = backend.accept().await {
            record.lock().unwrap().push(peer.ip());
            held.push(s);
        }
    });
    let lb = RunningBalancer::start(config(
        &[("b1", baddr)],
        "source_addresses = [\"127.0.0.2\", \"127.0.0.3\"]\n[health]\nenabled = false\n",
    ))
    .await;
    let mut clients = Vec::new();
    for i in 0..6 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        s.write_all(&raw::connect(&format!("src-{i}"), 4))
            .await
            .unwrap();
        clients.push(s);
    }
    let all = wait_until(T, || seen.lock().unwrap().len() == 6).await;
    assert!(all.is_some(), "backend saw {:?}", seen.lock().unwrap());
    let seen = seen.lock().unwrap().clone();
    for ip in ["127.0.0.2", "127.0.0.3"] {
        let ip: IpAddr = ip.parse().unwrap();
        assert_eq!(seen.iter().filter(|s| **s == ip).count(), 3, "{seen:?}");
    }
    lb.stop().await;
    acceptor.abort();
    // Not a local address: refused before serving.
    let bad = config(
        &[("b1", "127.0.0.1:1".into())],
        "source_addresses = [\"192.0.2.1\"]\n",
    );
    let e = mqlb_balancer::Balancer::bind(bad).await.unwrap_err();
    assert!(e.to_string().contains("source address 192.0.2.1"), "{e}");
}

/// Logs fit where they go: `--log-format json` writes one JSON object per
/// line, and connection events (accepted, placed, closed) carry the client
/// ID, the backend and the reason; text logs written to a pipe carry no
/// colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_on_request_and_colourless_off_a_terminal() {
    use std::io::{BufRead, BufReader};
    let m = Mosquitto::start();
    for format in ["json", "text"] {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut child = KillOnDrop(
            std::process::Command::new(mqlb_bin())
                .args(["--log-format", format, "balance", "--listen", &addr])
                .args(["--backend", &format!("b1={}", m.addr())])
                .env("RUST_LOG", "debug")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stderr = child.0.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        assert!(wait_listening(&addr, T));
        let (mut s, ack) = connect_and_ack(&addr, "log-client", 4).await;
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
        s.write_all(&[0xE0, 0x00]).await.unwrap();
        drop(s);
        let mut lines = Vec::new();
        let end = std::time::Instant::now() + T;
        while std::time::Instant::now() < end {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => {
                    let done = l.contains("closed") && l.contains("log-client");
                    lines.push(l);
                    if done {
                        break;
                    }
                }
                Err(_) => continue,
            }
        }
        drop(child);
        let all = lines.join("\n");
        assert!(
            !all.contains('\u{1b}'),
            "colour codes off a terminal:\n{all}"
        );
        // Values, not Rust's debug formatting of options.
        assert!(
            !all.contains("Some(") && !all.contains("None"),
            "debug formatting in the logs:\n{all}"
        );
        if format == "json" {
            let events: Vec<serde_json::Value> = lines
                .iter()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
                .collect();
            let event = |msg: &str| {
                events
                    .iter()
                    .find(|e| e["message"] == msg && e["span"]["client_id"] == "log-client")
                    .unwrap_or_else(|| panic!("no {msg} event for log-client in\n{all}"))
            };
            assert_eq!(event("placed")["span"]["backend"], "b1");
            let closed = event("closed");
            assert_eq!(closed["reason"], "peer_closed");
            assert_eq!(closed["span"]["backend"], "b1");
            assert!(events
                .iter()
                .any(|e| e["message"] == "accepted" && e["span"]["peer"].is_string()));
        } else {
            assert!(
                all.contains("placed") && all.contains("log-client"),
                "{all}"
            );
        }
    }
}

/// A balancer whose log reader goes away (standard error closed: a log
/// pipe whose reader died) keeps serving, and still stops on SIGTERM: a
/// log line that cannot be written is dropped, not reported with a panic
/// in whichever task logged it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_log_pipe_does_not_stop_the_balancer() {
    let m = Mosquitto::start();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = KillOnDrop(
        std::process::Command::new(mqlb_bin())
            .args(["balance", "--listen", &addr])
            .args(["--backend", &format!("b1={}", m.addr())])
            .env("RUST_LOG", "debug")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The reader goes away at once: every log line from here fails.
    drop(child.0.stderr.take());
    assert!(wait_listening(&addr, T), "not listening");
    for i in 0..3 {
        let (_s, ack) = connect_and_ack(&addr, &format!("no-log-{i}"), 4).await;
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "client {i} refused");
    }
    std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut exited = false;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.0.try_wait() {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(exited, "SIGTERM did not stop it within 10 s");
}

/// `config check --resolve` looks the backends' and peers' names up as the
/// process will, and names each that does not resolve (`.invalid` never
/// does, RFC 6761); plain `config check` does not need the network.
#[test]
fn config_check_resolve_names_the_names_that_do_not_resolve() {
    let dir = mqlb_tests::scratch_dir("resolve");
    let lb = dir.join("lb.toml");
    std::fs::write(
        &lb,
        "[[listener]]\naddress = \"127.0.0.1:1883\"\n[[backend]]\nname = \"b1\"\naddress = \"no-such-host.invalid:1883\"\n[[backend]]\nname = \"b2\"\naddress = \"localhost:1883\"\n",
    )
    .unwrap();
    let node = dir.join("node.toml");
    std::fs::write(
        &node,
        "[broker]\nlisten = \"127.0.0.1:1883\"\n[cluster]\nnode_id = \"n1\"\nlisten = \"127.0.0.1:7000\"\npeers = [\"n2@localhost:7001\", \"n3@gone.invalid:7002\"]\n",
    )
    .unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(mqlb_bin())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for f in [&lb, &node] {
        let (code, err) = run(&["config".as_ref(), "check".as_ref(), f.as_os_str()]);
        assert_eq!(code, Some(0), "{err}");
    }
    let (code, err) = run(&[
        "config".as_ref(),
        "check".as_ref(),
        "--resolve".as_ref(),
        lb.as_os_str(),
    ]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("backend b1: \"no-such-host.invalid:1883\" does not resolve"),
        "{err}"
    );
    assert!(!err.contains("b2"), "{err}");
    let (code, err) = run(&[
        "config".as_ref(),
        "check".as_ref(),
        "--resolve".as_ref(),
        node.as_os_str(),
    ]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("cluster peer n3: \"gone.invalid:7002\" does not resolve"),
        "{err}"
    );
    assert!(!err.contains("n2"), "{err}");
}

/// At the default `info`, a connection event names its client itself (the
/// connection span is debug-only, for memory): a CONNECT refused for want
/// of a backend says who, from where, and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_info_refusal_names_its_client() {
    use std::io::{BufRead, BufReader};
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // A backend nobody listens on.
    let dead = format!("127.0.0.1:{}", free_port());
    let mut child = KillOnDrop(
        std::process::Command::new(mqlb_bin())
            .args(["--log-format", "json", "balance", "--listen", &addr])
            .args(["--backend", &format!("b1={dead}")])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    assert!(wait_listening(&addr, T));
    let (_s, ack) = connect_and_ack(&addr, "who-am-i", 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x03], "refused: server unavailable");
    let end = std::time::Instant::now() + T;
    let mut refused = None;
    while refused.is_none() && std::time::Instant::now() < end {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            let e: serde_json::Value = serde_json::from_str(&l).unwrap();
            // (The readiness probe's connection is refused too: closed early.)
            if e["message"] == "refused" && e["reason"] != "closed_early" {
                refused = Some(e);
            }
        }
    }
    drop(child);
    let e = refused.expect("no refused event");
    assert_eq!(e["client_id"], "who-am-i", "{e}");
    assert_eq!(e["reason"], "no_backend", "{e}");
    assert!(
        e["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{e}"
    );
}

/// Pools and rules: two tenants split by client-ID prefix across two pools
/// of Mosquittos; placement stays inside each pool; `/clients` names the
/// rule and pool; a client that matches no rule, with no default pool, is
/// refused (v5 0x87, 3.1.1 return code 5) and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_go_to_their_pools() {
    let ms: Vec<Mosquitto> = (0..4).map(|_| Mosquitto::start()).collect();
    let mut text = String::from("[[listener]]\naddress = \"127.0.0.1:0\"\n");
    for (i, m) in ms.iter().enumerate() {
        let pool = if i < 2 { "tenant-a" } else { "tenant-b" };
        text.push_str(&format!(
            "[[backend]]\nname = \"m{i}\"\naddress = \"{}\"\npool = \"{pool}\"\n",
            m.addr()
        ));
    }
    text.push_str(
        "[[rule]]\npool = \"tenant-a\"\nclient_id_prefix = \"a-\"\n\
         [[rule]]\npool = \"tenant-b\"\nclient_id_prefix = \"b-\"\n\
         [health]\nenabled = false\n[admin]\naddress = \"127.0.0.1:0\"\n",
    );
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let addr = lb.addr.to_string();
    let admin = lb.admin.unwrap().to_string();
    let mut held = Vec::new();
    for (prefix, pool, mine) in [("a-", "tenant-a", 0..2), ("b-", "tenant-b", 2..4)] {
        for i in 0..12 {
            let id = format!("{prefix}{i}");
            let (s, ack) = connect_and_ack(&addr, &id, 4).await;
            assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
            held.push(s);
            let (_, body) = http(&admin, "GET", &format!("/clients/{id}")).await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["pool"], pool, "{body}");
            assert_eq!(v["rule"], if pool == "tenant-a" { 0 } else { 1 }, "{body}");
            let on: usize = v["connected_to"][0].as_str().unwrap()[1..].parse().unwrap();
            assert!(mine.contains(&on), "{id} on m{on}, outside {pool}");
            assert!(ms[on].saw_client(&id, T), "{id} not in m{on}'s log");
        }
    }
    // No rule matches and there is no default pool: refused, as a broker
    // refuses an unauthorised client.
    let (_, ack5) = connect_and_ack(&addr, "c-1", 5).await;
    assert_eq!(ack5, [0x20, 0x03, 0x00, 0x87, 0x00]);
    let (_, ack4) = connect_and_ack(&addr, "c-2", 4).await;
    assert_eq!(ack4, [0x20, 0x02, 0x00, 0x05]);
    assert_eq!(lb.shared.metrics.rejected(RejectReason::NoRoute), 2);
    let (_, body) = http(&admin, "GET", "/backends").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pools: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["pool"].as_str().unwrap())
        .collect();
    assert_eq!(pools, ["tenant-a", "tenant-a", "tenant-b", "tenant-b"]);
    lb.stop().await;
}
