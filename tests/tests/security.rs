//! The attacks of the security review, each performed against the real
//! thing and each asserting the refusal: admin APIs (DNS rebinding, no
//! token, a wrong token, starved probes, a raw escape that once panicked
//! a connection task), forged `$SYS` topics and state store
//! notifications, and WebSocket frames before the CONNECT (bounded by the
//! balancer's RSS). The cluster port's attacks are in `cluster.rs`
//! (`the_cluster_port_refuses_strangers`, `a_relayed_client_keeps_its_certificate_identity`),
//! KEYNOTIFY's in `statestore.rs`.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used,
    missing_docs
)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mqlb_protocol::{
    Ack, MqttStr, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS, ReasonCode,
};
use mqlb_tests::client::{connect_packet, qos, Client};
use mqlb_tests::{
    config, free_port, http, mqlb_bin, scratch_dir, try_http_with, wait_listening, KillOnDrop,
    Mosquitto, OurBroker, RunningBalancer, ADMIN_TOKEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(5);

/// A balancer with an admin API (token: [`ADMIN_TOKEN`]) in front of one
/// Mosquitto.
async fn balancer(extra: &str) -> (Mosquitto, RunningBalancer, String) {
    let m = Mosquitto::start();
    let cfg = config(
        &[("b1", m.addr())],
        &format!("[health]\nenabled = false\n[admin]\naddress = \"127.0.0.1:0\"\n{extra}"),
    );
    let lb = RunningBalancer::start(cfg).await;
    let admin = lb.admin.unwrap().to_string();
    (m, lb, admin)
}

fn draining(lb: &RunningBalancer) -> bool {
    lb.shared.backends.get("b1").unwrap().is_draining()
}

async fn refused_count(admin: &str) -> f64 {
    let (_, body) = http(admin, "GET", "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix("mqlb_admin_refused_total ")?.parse().ok())
        .expect("no mqlb_admin_refused_total")
}

/// `curl -X POST -H 'Host: rebind.evil.example:PORT' -H 'Origin: ...'`
/// drained a backend: a web page that rebinds its name to 127.0.0.1 could
/// drive the API from a browser. Now the `Host` is checked, the token is
/// required, a wrong one is refused, and every refusal is counted.
#[tokio::test]
async fn admin_calls_need_the_token_and_a_host_that_names_the_api() {
    let (_m, lb, admin) = balancer("").await;
    let port = lb.admin.unwrap().port();
    let token = format!("Authorization: Bearer {ADMIN_TOKEN}\r\n");
    let before = refused_count(&admin).await;
    // DNS rebinding, with the right token even: refused by Host.
    let evil = format!(
        "Host: rebind.evil.example:{port}\r\nOrigin: http://rebind.evil.example:{port}\r\n{token}"
    );
    for path in ["/backends/b1/drain", "/reload"] {
        let (status, body) = try_http_with(&admin, "POST", path, &evil).await.unwrap();
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("Host"), "{body}");
    }
    let (status, _) = try_http_with(&admin, "GET", "/backends", &evil)
        .await
        .unwrap();
    assert_eq!(status, 403, "a rebound page read the backends");
    assert!(!draining(&lb));
    // No token, and a wrong one of the right length.
    let host = format!("Host: 127.0.0.1:{port}\r\n");
    let (status, _) = try_http_with(&admin, "POST", "/backends/b1/drain", &host)
        .await
        .unwrap();
    assert_eq!(status, 401);
    let wrong = format!(
        "{host}Authorization: Bearer {}\r\n",
        "x".repeat(ADMIN_TOKEN.len())
    );
    let (status, _) = try_http_with(&admin, "POST", "/backends/b1/drain", &wrong)
        .await
        .unwrap();
    assert_eq!(status, 401);
    assert!(!draining(&lb), "drained without the token");
    // `localhost` is loopback too; reads on a loopback API need no token.
    let (status, _) = try_http_with(&admin, "GET", "/backends", "Host: localhost\r\n")
        .await
        .unwrap();
    assert_eq!(status, 200);
    // 3 rebinding + 2 token refusals.
    assert_eq!(refused_count(&admin).await - before, 5.0);
    // With the token, from the API's own address: drained.
    let (status, _) = http(&admin, "POST", "/backends/b1/drain").await;
    assert_eq!(status, 200);
    assert!(draining(&lb));
}

/// The token file is re-read when it changes (a rotated Secret applies
/// without a restart); a balancer without one refuses every
/// state-changing call and says how to set one; bound off loopback, reads
/// need the token too but `/healthz` and `/readyz` do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_rotates_from_disk_and_off_loopback_reads_need_it() {
    let m = Mosquitto::start();
    let dir = scratch_dir("token");
    let file = dir.join("token");
    std::fs::write(&file, "first-token-abcdefgh\n").unwrap();
    let port = free_port();
    let admin = format!("127.0.0.1:{port}");
    let mut cfg = config(
        &[("b1", m.addr())],
        &format!("[health]\nenabled = false\n[admin]\naddress = \"0.0.0.0:{port}\"\n"),
    );
    cfg.admin_access.token_file = Some(file.clone());
    let lb = RunningBalancer::start(cfg).await;
    let host = format!("Host: 127.0.0.1:{port}\r\n");
    let with = |t: &str| format!("{host}Authorization: Bearer {t}\r\n");
    // Off loopback: a read needs the token, probes do not.
    let get = |path: &'static str, h: String| {
        let admin = admin.clone();
        async move { try_http_with(&admin, "GET", path, &h).await.unwrap().0 }
    };
    assert_eq!(get("/backends", host.clone()).await, 401);
    assert_eq!(get("/healthz", host.clone()).await, 200);
    assert_eq!(get("/readyz", host.clone()).await, 200);
    assert_eq!(get("/backends", with("first-token-abcdefgh")).await, 200);
    // Rotated on disk: the old token stops working, the new one works.
    std::fs::write(&file, "second-token-12345678\n").unwrap();
    let mut ok = false;
    for _ in 0..100 {
        if get("/backends", with("second-token-12345678")).await == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the rotated token was never accepted");
    assert_eq!(get("/backends", with("first-token-abcdefgh")).await, 401);
    drop(lb);

    // No token configured: reads on loopback work, changes are refused
    // with the way to allow them.
    let lport = free_port();
    let aport = free_port();
    let _child = KillOnDrop(
        Command::new(mqlb_bin())
            .args(["balance", "--listen", &format!("127.0.0.1:{lport}")])
            .args(["--backend", &format!("b1={}", m.addr())])
            .args(["--admin", &format!("127.0.0.1:{aport}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let admin = format!("127.0.0.1:{aport}");
    assert!(wait_listening(&admin, T));
    let host = format!("Host: {admin}\r\n");
    let (status, _) = try_http_with(&admin, "GET", "/backends", &host)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let bearer = format!("{host}Authorization: Bearer {ADMIN_TOKEN}\r\n");
    let (status, body) = try_http_with(&admin, "POST", "/backends/b1/drain", &bearer)
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--admin-token-file"), "{body}");
}

/// A bound socket from `source` to `to`, left idle.
async fn idle_from(source: &str, to: &str) -> Option<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4().ok()?;
    s.bind(format!("{source}:0").parse().ok()?).ok()?;
    s.connect(to.parse().ok()?).await.ok()
}

/// 64 idle connections made `/healthz` time out for about 10 s, so a
/// liveness probe would restart the balancer. Now one source holds at most
/// 8, and past the 64 general slots probes still get a reserved one: held
/// and reopened, the connections never fail a probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_answered_under_held_connections() {
    let (_m, lb, admin) = balancer("").await;
    let _ = lb;
    // One greedy source: only 8 of its 64 are kept open.
    let mut greedy = Vec::new();
    for _ in 0..64 {
        greedy.extend(idle_from("127.0.0.2", &admin).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut open = 0;
    for s in &mut greedy {
        let mut b = [0u8; 1];
        // A closed one reads EOF at once; a kept one times out.
        if tokio::time::timeout(Duration::from_millis(20), s.read(&mut b))
            .await
            .is_err()
        {
            open += 1;
        }
    }
    assert_eq!(open, 8, "one source kept {open} connections");
    drop(greedy);
    // 64 from eight sources fill every general slot; they are reopened
    // every 2 s while a probe runs every 250 ms.
    let mut failed = 0;
    let mut probes = 0;
    let start = Instant::now();
    let mut held = Vec::new();
    let mut reopened = Instant::now() - Duration::from_secs(10);
    while start.elapsed() < Duration::from_secs(6) {
        if reopened.elapsed() >= Duration::from_secs(2) {
            held.clear();
            tokio::time::sleep(Duration::from_millis(200)).await;
            for src in 3..11 {
                for _ in 0..8 {
                    held.extend(idle_from(&format!("127.0.0.{src}"), &admin).await);
                }
            }
            reopened = Instant::now();
        }
        for path in ["/healthz", "/readyz"] {
            probes += 1;
            let r = tokio::time::timeout(
                Duration::from_secs(1),
                try_http_with(&admin, "GET", path, "Host: 10.0.0.7:9100\r\n"),
            )
            .await;
            if !matches!(r, Ok(Some((200, _)))) {
                failed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(held.len(), 64);
    assert_eq!(failed, 0, "{failed} of {probes} probes failed");
    // What is not a probe gets a clear "busy" meanwhile.
    let (status, _) = http(&admin, "GET", "/backends").await;
    assert_eq!(status, 503);
    drop(held);
}

/// A raw `GET /clients/%a\xc3\xa9` panicked the connection task ("not a
/// char boundary"). Now it is answered like any other client ID (an
/// escape that is not one is kept as it is), and the API keeps serving.
#[tokio::test]
async fn a_raw_escape_is_answered_not_a_panic() {
    let (_m, _lb, admin) = balancer("").await;
    for path in [
        &b"/clients/%a\xc3\xa9"[..],
        b"/clients/%\xc3\xa9",
        b"/clients/%",
        b"/clients/%%%",
        b"/clients/\xff\xfe%e",
    ] {
        let mut s = tokio::net::TcpStream::connect(&admin).await.unwrap();
        let mut req = b"GET ".to_vec();
        req.extend_from_slice(path);
        req.extend_from_slice(
            format!(
                " HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        s.write_all(&req).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        // Answered (an unknown client's placement, or a bad request),
        // not a connection closed by a panicking task.
        assert!(
            ["HTTP/1.1 200", "HTTP/1.1 400", "HTTP/1.1 404"]
                .iter()
                .any(|s| text.starts_with(s)),
            "{:?}: {text}",
            String::from_utf8_lossy(path)
        );
    }
    assert_eq!(http(&admin, "GET", "/backends").await.0, 200);
}

/// A broker node's admin API has the same rules: `POST /cluster/members/..`
/// needs the token and a Host that names it, and refusals are counted in
/// its metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_admin_api_needs_the_token_too() {
    let aport = free_port();
    let admin = format!("127.0.0.1:{aport}");
    let token = mqlb_tests::admin_token_file();
    let _b = mqlb_tests::BrokerProcess::start(&[
        "--admin",
        &admin,
        "--admin-token-file",
        token.to_str().unwrap(),
    ]);
    assert!(wait_listening(&admin, T));
    let host = format!("Host: {admin}\r\n");
    let post = |h: String| {
        let admin = admin.clone();
        async move {
            try_http_with(&admin, "POST", "/cluster/members/n2/remove", &h)
                .await
                .unwrap()
                .0
        }
    };
    assert_eq!(post(host.clone()).await, 401);
    assert_eq!(
        post(format!(
            "Host: evil.example:{aport}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
        ))
        .await,
        403
    );
    // With the token the call is served (no cluster here: not found).
    let served = post(format!("{host}Authorization: Bearer {ADMIN_TOKEN}\r\n")).await;
    assert!(served != 401 && served != 403, "{served}");
    let (_, metrics) = http(&admin, "GET", "/metrics").await;
    assert!(
        metrics.contains("mqlb_admin_refused_total 2"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("admin"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A v5 QoS 1 publish, returning the PUBACK reason.
async fn publish_v5(c: &mut Client, topic: &str, payload: &str, retain: bool, q: QoS) -> u8 {
    let pid = PacketId::new(9).unwrap();
    c.send(Packet::Publish(Publish {
        dup: false,
        qos: q,
        retain,
        topic: MqttStr::try_from(topic).unwrap(),
        packet_id: Some(pid),
        properties: Properties::default(),
        payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
    }))
    .await;
    loop {
        match c.recv(T).await {
            Some(Packet::Puback(a)) | Some(Packet::Pubrec(a)) if a.packet_id == pid => {
                if q == QoS::ExactlyOnce && a.reason.0 < 0x80 {
                    c.send(Packet::Pubrel(Ack::new(pid))).await;
                }
                return a.reason.0;
            }
            Some(_) => {}
            None => panic!("no acknowledgement for {topic}"),
        }
    }
}

/// Everything `sub` receives within `within`, as (topic, payload).
async fn received(sub: &mut Client, within: Duration) -> Vec<(String, String)> {
    let mut got = Vec::new();
    let end = tokio::time::Instant::now() + within;
    loop {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        match sub.next_publish(left, true).await {
            Some(p) => got.push((
                p.topic.to_string(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            )),
            None => return got,
        }
    }
}

/// A retained publish to `$SYS/broker/version` ("FORGED 0.0") was served to
/// monitoring clients. Now a client's `$SYS` publish is refused (v5: 0x87;
/// 3.x: dropped, as Mosquitto does), except a bridge's own connection
/// state, as Mosquitto allows.
#[tokio::test]
async fn a_client_cannot_forge_sys_topics() {
    let b = OurBroker::start().await;
    let addr = b.addr.to_string();
    let (mut monitor, _) =
        Client::connect(&addr, connect_packet("monitor", ProtocolVersion::V5, true)).await;
    assert_eq!(
        monitor.subscribe("$SYS/#", qos(QoS::AtLeastOnce)).await,
        [1]
    );
    let first = received(&mut monitor, Duration::from_millis(500)).await;
    assert!(
        first
            .iter()
            .any(|(t, p)| t == "$SYS/broker/version" && p.starts_with("mqlb ")),
        "{first:?}"
    );
    let (mut v5, _) =
        Client::connect(&addr, connect_packet("forger5", ProtocolVersion::V5, true)).await;
    for q in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let code = publish_v5(&mut v5, "$SYS/broker/version", "FORGED 0.0", true, q).await;
        assert_eq!(code, ReasonCode::NOT_AUTHORIZED.0, "{q:?}");
    }
    v5.publish(
        "$SYS/broker/uptime",
        b"FORGED",
        QoS::AtMostOnce,
        true,
        Properties::default(),
    )
    .await;
    let (mut v3, _) = Client::connect(
        &addr,
        connect_packet("forger3", ProtocolVersion::V3_1_1, true),
    )
    .await;
    v3.publish(
        "$SYS/broker/version",
        b"FORGED 3",
        QoS::AtLeastOnce,
        true,
        Properties::default(),
    )
    .await;
    // A bridge: its own state only.
    let mut cp = connect_packet("edge-bridge", ProtocolVersion::V3_1_1, true);
    cp.bridge = true;
    let (mut bridge, ack) = Client::connect(&addr, cp).await;
    assert_eq!(ack.reason.0, 0);
    bridge
        .publish(
            "$SYS/broker/connection/edge-bridge/state",
            b"1",
            QoS::AtLeastOnce,
            true,
            Properties::default(),
        )
        .await;
    bridge
        .publish(
            "$SYS/broker/connection/other-bridge/state",
            b"FORGED",
            QoS::AtLeastOnce,
            true,
            Properties::default(),
        )
        .await;
    let seen = received(&mut monitor, Duration::from_millis(500)).await;
    assert!(
        !seen.iter().any(|(_, p)| p.contains("FORGED")),
        "a forgery reached the monitor: {seen:?}"
    );
    assert!(
        seen.contains(&(
            "$SYS/broker/connection/edge-bridge/state".into(),
            "1".into()
        )),
        "{seen:?}"
    );
    // And nothing forged was retained.
    let (mut late, _) =
        Client::connect(&addr, connect_packet("late", ProtocolVersion::V5, true)).await;
    late.subscribe("$SYS/broker/#", qos(QoS::AtLeastOnce)).await;
    let retained = received(&mut late, Duration::from_millis(500)).await;
    assert!(
        !retained.iter().any(|(_, p)| p.contains("FORGED")),
        "{retained:?}"
    );
}

/// Any client could publish a `NOTIFY DELETE` into another's state store
/// notification topic. Now only the broker publishes there.
#[tokio::test]
async fn a_client_cannot_forge_state_store_notifications() {
    let b = OurBroker::start().await;
    let addr = b.addr.to_string();
    let hex: String = "victim".bytes().map(|b| format!("{b:02X}")).collect();
    let topic = format!(
        "clients/statestore/v1/FA9AE35F-2F64-47CD-9BFF-08E2B32A0FE8/{hex}/command/notify/6B6579"
    );
    let (mut victim, _) =
        Client::connect(&addr, connect_packet("victim", ProtocolVersion::V5, true)).await;
    assert_eq!(
        victim
            .subscribe(
                &format!(
                    "clients/statestore/v1/FA9AE35F-2F64-47CD-9BFF-08E2B32A0FE8/{hex}/command/notify/#"
                ),
                qos(QoS::AtLeastOnce)
            )
            .await,
        [1]
    );
    let (mut forger, _) =
        Client::connect(&addr, connect_packet("forger", ProtocolVersion::V5, true)).await;
    let code = publish_v5(
        &mut forger,
        &topic,
        "*2\r\n$6\r\nNOTIFY\r\n$6\r\nDELETE\r\n",
        false,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(code, ReasonCode::NOT_AUTHORIZED.0);
    forger
        .publish(
            &topic,
            b"*2\r\n$6\r\nNOTIFY\r\n$6\r\nDELETE\r\n",
            QoS::AtMostOnce,
            false,
            Properties::default(),
        )
        .await;
    let got = received(&mut victim, Duration::from_millis(500)).await;
    assert!(got.is_empty(), "a forged notification arrived: {got:?}");
}

/// A TCP connection to `addr` that completed a WebSocket upgrade.
async fn ws_upgraded(addr: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /mqtt HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "upgrade refused");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// The process's resident memory, in MiB.
fn rss_mib(pid: u32) -> f64 {
    mqlb_tests::load::rss_kib(pid) / 1024.0
}

/// 10 WebSocket connections that each sent 15.6 MiB of a declared 16 MiB
/// frame before any CONNECT grew the balancer by 322 MiB. Now a frame
/// declaring more than `max_connect_size` before the CONNECT is refused
/// from its header: the connection closes at once and the balancer's RSS
/// stays put; a CONNECT sent in many small frames still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frames_before_connect_take_no_memory() {
    let m = Mosquitto::start();
    let dir = scratch_dir("ws-rss");
    let (port, file) = (free_port(), dir.join("mqlb.toml"));
    std::fs::write(
        &file,
        format!(
            "[[listener]]\naddress = \"127.0.0.1:{port}\"\nkind = \"websocket\"\n\
             [[backend]]\nname = \"b1\"\naddress = \"{}\"\n[health]\nenabled = false\n",
            m.addr()
        ),
    )
    .unwrap();
    let child = KillOnDrop(
        Command::new(mqlb_bin())
            .args(["balance", "--config"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}");
    assert!(wait_listening(&addr, T));
    let pid = child.0.id();
    let before = rss_mib(pid);
    // A masked binary frame header declaring 16 MiB, then the bytes.
    const DECLARED: u64 = 16 << 20;
    let chunk = vec![0x41u8; 64 * 1024];
    let mut closed_after = Vec::new();
    let mut peak = before;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let mut s = ws_upgraded(&addr).await;
        let chunk = chunk.clone();
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut header = vec![0x82, 0x80 | 127];
            header.extend_from_slice(&DECLARED.to_be_bytes());
            header.extend_from_slice(&[1, 2, 3, 4]);
            let mut sent = 0usize;
            if s.write_all(&header).await.is_ok() {
                while sent < (15 << 20) + (600 << 10) {
                    if s.write_all(&chunk).await.is_err() {
                        break;
                    }
                    sent += chunk.len();
                }
            }
            // Whatever was sent, the balancer closes this connection.
            let mut b = [0u8; 256];
            let end = Instant::now() + Duration::from_secs(5);
            loop {
                match tokio::time::timeout_at(end.into(), s.read(&mut b)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(_)) => continue,
                    Err(_) => panic!("still open 5 s after a 16 MiB frame header"),
                }
            }
            (start.elapsed(), sent)
        }));
    }
    for t in tasks {
        while !t.is_finished() {
            peak = peak.max(rss_mib(pid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        closed_after.push(t.await.unwrap());
    }
    peak = peak.max(rss_mib(pid));
    eprintln!("RSS {before:.1} MiB before, {peak:.1} MiB at most; closed after {closed_after:?}");
    assert!(
        peak - before < 24.0,
        "the balancer grew by {:.1} MiB for 10 oversized frames",
        peak - before
    );
    for (took, sent) in &closed_after {
        assert!(
            *sent < 8 << 20,
            "{sent} bytes of the frame were taken before the close ({took:?})"
        );
    }
}
