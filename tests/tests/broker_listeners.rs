//! The bundled broker's extra listeners (`[[broker.listener]]`), with real
//! clients: mosquitto_pub/sub over TLS with a client certificate whose CN
//! becomes the user name (ACLs prove it), SNI, paho-mqtt and rumqttc over
//! WebSocket (plain and TLS), one session whichever way a client comes,
//! and mqlb in front of mqlb keeping the client's address with PROXY v2.
//! Bad input on each listener is refused quickly and counted.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used
)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use mqlb_broker::front::Refusal;
use mqlb_config::broker::BrokerConfig;
use mqlb_tests::pki;
use mqlb_tests::raw;
use mqlb_tests::*;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

const T: Duration = Duration::from_secs(5);

async fn broker(text: &str) -> OurBroker {
    OurBroker::start_with(BrokerConfig::parse("<test>", text, None).unwrap()).await
}

fn tls_client(roots: &[CertificateDer<'static>]) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Waits until the connection is closed by the other side; true if it was
/// within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 256];
    let r = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    r.is_ok()
}

/// MQTT over TLS on the broker: with `tls_identity_as = "username"` the
/// certificate's CN is the user name whatever the client claims, and it
/// is the credential (no password file needed); an ACL on `%u` proves the
/// broker used it. No certificate, or plain MQTT on the TLS port, is
/// refused at once and counted; SNI picks a certificate on another
/// listener and refuses a name it has none for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_certificate_identity_sni_and_refusals() {
    let (dir, server_der) = pki::server_certificate();
    pki::client_pki(&dir, "dev", Some("device-7"));
    let other = rcgen::generate_simple_self_signed(vec!["other.test".into()]).unwrap();
    std::fs::write(dir.join("other.pem"), other.cert.pem()).unwrap();
    std::fs::write(dir.join("other.key"), other.key_pair.serialize_pem()).unwrap();
    let f = |n: &str| dir.join(n).display().to_string();
    let text = format!(
        "[broker]\nallow_anonymous = false\n\
         [[broker.acl]]\nuser = \"*\"\ntopic = \"devices/%u/#\"\naccess = \"readwrite\"\n\
         [[broker.listener]]\nname = \"mqtts\"\naddress = \"127.0.0.1:0\"\n\
         tls_cert = \"{c}\"\ntls_key = \"{k}\"\ntls_client_ca = \"{ca}\"\ntls_identity_as = \"username\"\n\
         [[broker.listener]]\nname = \"sni\"\naddress = \"127.0.0.1:0\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\n\
         [[broker.listener.sni]]\nserver_names = [\"other.test\"]\ntls_cert = \"{oc}\"\ntls_key = \"{ok}\"\n",
        c = f("cert.pem"),
        k = f("key.pem"),
        ca = f("dev-ca.pem"),
        oc = f("other.pem"),
        ok = f("other.key"),
    );
    let b = broker(&text).await;
    let port = b.listeners[0].port().to_string();
    let cafile = f("cert.pem");
    let tls_args = |cert: &str| {
        vec![
            "-h".to_string(),
            "127.0.0.1".into(),
            "-p".into(),
            port.clone(),
            "--cafile".into(),
            cafile.clone(),
            "--cert".into(),
            f(&format!("dev-{cert}.pem")),
            "--key".into(),
            f(&format!("dev-{cert}.key")),
        ]
    };
    let mut sub = KillOnDrop(
        Command::new("mosquitto_sub")
            .args(tls_args("client"))
            .args(["-i", "tls-sub", "-t", "devices/device-7/#", "-C", "1"])
            .args(["-W", "15", "-q", "1", "-u", "nobody", "-P", "wrong"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let subscribed = wait_until(Duration::from_secs(10), || {
        b.state.counts().subscriptions > 0
    })
    .await;
    assert!(
        subscribed.is_some(),
        "mosquitto_sub never subscribed over TLS"
    );
    // The client claims to be `evil`; the certificate says device-7.
    let publish = Command::new("mosquitto_pub")
        .args(tls_args("client"))
        .args(["-i", "tls-pub", "-t", "devices/device-7/temp", "-m", "21.5"])
        .args(["-q", "1", "-u", "evil", "-P", "x"])
        .output()
        .unwrap();
    assert!(publish.status.success(), "{publish:?}");
    let mut out = String::new();
    let mut stdout = sub.0.stdout.take().unwrap();
    std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
    assert_eq!(
        out.trim(),
        "21.5",
        "the subscriber got nothing: ACL saw another user"
    );

    // No client certificate: the handshake fails, nothing is served.
    let refused_tls = b.state.fronts.refused(Refusal::Tls);
    let no_cert = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "--cafile", &cafile])
        .args(["-i", "tls-anon", "-t", "devices/x", "-m", "x", "-q", "1"])
        .output()
        .unwrap();
    assert!(!no_cert.status.success(), "{no_cert:?}");
    // Plain MQTT on the TLS port: closed at once (by its first byte), not
    // after the CONNECT timeout.
    let mut plain = TcpStream::connect(b.listeners[0]).await.unwrap();
    plain.write_all(&raw::connect("plain", 4)).await.unwrap();
    assert!(closed_within(&mut plain, Duration::from_secs(2)).await);
    let counted = wait_until(T, || {
        b.state.fronts.refused(Refusal::Tls) > refused_tls
            && b.state.fronts.refused(Refusal::PlainOnTls) == 1
    })
    .await;
    assert!(
        counted.is_some(),
        "TLS refusals not counted: before {refused_tls} tls {} plain_on_tls {}",
        b.state.fronts.refused(Refusal::Tls),
        b.state.fronts.refused(Refusal::PlainOnTls)
    );
    // The plain listener refuses the anonymous client (no password file):
    // only a certificate is a credential here.
    let (_, ack) = raw::connect_and_ack(&b.addr.to_string(), "anon", 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x05], "anonymous client let in");

    // SNI: the name picks the certificate; an unknown name is refused.
    let sni = b.listeners[1];
    let connector = tls_client(&[server_der, other.cert.der().clone()]);
    let hello = |name: &'static str| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(sni).await.unwrap();
            let name = ServerName::try_from(name).unwrap();
            let s = tokio::time::timeout(T, connector.connect(name, tcp)).await;
            s.unwrap()
                .map(|s| s.get_ref().1.peer_certificates().unwrap()[0].clone())
        }
    };
    assert_eq!(
        hello("other.test").await.unwrap(),
        *other.cert.der(),
        "other.test got the wrong certificate"
    );
    assert!(hello("localhost").await.is_ok());
    assert!(hello("nope.test").await.is_err(), "unknown name answered");
    let _ = std::fs::remove_dir_all(&dir);
}

/// MQTT over WebSocket on the broker, plain and TLS: paho-mqtt (3.1.1 and
/// 5) and rumqttc round-trip; a session made over WebSocket is the one a
/// TCP client with the same ID resumes, queued message included; a wrong
/// path is refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_plain_and_tls_with_one_session_across_transports() {
    let (dir, _) = pki::server_certificate();
    let f = |n: &str| dir.join(n).display().to_string();
    let text = format!(
        "[[broker.listener]]\nname = \"ws\"\naddress = \"127.0.0.1:0\"\nkind = \"websocket\"\n\
         [[broker.listener]]\nname = \"wss\"\naddress = \"127.0.0.1:0\"\nkind = \"websocket\"\n\
         websocket_path = \"/secure\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\n",
        c = f("cert.pem"),
        k = f("key.pem"),
    );
    let b = broker(&text).await;
    let (ws, wss) = (b.listeners[0], b.listeners[1]);
    paho_ws(ws.port(), "/mqtt", "311", "bws-paho-311", None).await;
    paho_ws(ws.port(), "/mqtt", "5", "bws-paho-5", None).await;
    paho_ws(
        wss.port(),
        "/secure",
        "311",
        "bwss-paho",
        Some(&dir.join("cert.pem")),
    )
    .await;
    rumqttc_ws(ws, "bws-rumqttc").await;

    // A persistent session made over WebSocket, resumed over TCP.
    let python = python_with_paho().expect("paho-mqtt missing: run .ci/run");
    let script = r#"
import sys, threading, paho.mqtt.client as mqtt
done = threading.Event()
c = mqtt.Client(client_id="bws-persist", clean_session=False, transport="websockets")
c.on_connect = lambda c, u, f, rc: c.subscribe("bws/queue", qos=1)
c.on_subscribe = lambda c, u, mid, g: done.set()
c.connect("127.0.0.1", int(sys.argv[1]), 30); c.loop_start()
ok = done.wait(10); c.disconnect(); c.loop_stop()
sys.exit(0 if ok else 1)
"#;
    let made = Command::new(&python)
        .args(["-c", script, &ws.port().to_string()])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let port = b.addr.port().to_string();
    let publish = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-t", "bws/queue"])
        .args(["-m", "queued", "-q", "1"])
        .output()
        .unwrap();
    assert!(publish.status.success());
    let resumed = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", "bws-persist", "-c"])
        .args(["-t", "bws/queue", "-q", "1", "-C", "1", "-W", "5"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&resumed.stdout).trim(),
        "queued",
        "{resumed:?}"
    );

    // A wrong path: 404, counted, no session.
    let before = b.state.fronts.refused(Refusal::Websocket);
    let mut s = TcpStream::connect(ws).await.unwrap();
    s.write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.unwrap();
    let mut head = [0u8; 64];
    let n = tokio::time::timeout(T, s.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 404"),
        "{:?}",
        String::from_utf8_lossy(&head[..n])
    );
    let counted = wait_until(T, || b.state.fronts.refused(Refusal::Websocket) > before).await;
    assert!(counted.is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

/// mqlb in front of mqlb: the balancer takes the client's address from a
/// trusted PROXY v1 header and passes it on in a v2 header to the bundled
/// broker's PROXY listener, whose log names the original address. A bogus
/// v2 length straight to the broker is refused at once and counted in its
/// `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_address_survives_mqlb_in_front_of_mqlb() {
    let dir = scratch_dir("broker-proxy");
    let (proxied, admin, plain) = (free_port(), free_port(), free_port());
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nlisten = \"127.0.0.1:{plain}\"\nadmin = \"127.0.0.1:{admin}\"\n\
             [[broker.listener]]\nname = \"behind-lb\"\naddress = \"127.0.0.1:{proxied}\"\n\
             proxy_protocol = true\nproxy_trusted = [\"127.0.0.1/32\"]\n"
        ),
    )
    .unwrap();
    let log = dir.join("broker.log");
    let _node = KillOnDrop(
        Command::new(mqlb_bin())
            .args(["broker", "--config"])
            .arg(&config)
            .env("RUST_LOG", "mqlb_broker=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let proxied_addr = format!("127.0.0.1:{proxied}");
    assert!(wait_listening(&proxied_addr, Duration::from_secs(10)));
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.1/32\"]\n\
         [[backend]]\nname = \"ours\"\naddress = \"{proxied_addr}\"\nproxy_protocol = true\n\
         [balancer]\nconnect_timeout = \"2s\"\n"
    );
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let mut first = b"PROXY TCP4 203.0.113.9 127.0.0.1 40001 1883\r\n".to_vec();
    first.extend(raw::connect("behind-two-mqlbs", 4));
    s.write_all(&first).await.unwrap();
    assert_eq!(raw::read_n(&mut s, 4, T).await, [0x20, 0x02, 0x00, 0x00]);
    let seen = wait_until(T, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("203.0.113.9:40001") && l.contains("behind-two-mqlbs"))
    })
    .await;
    assert!(
        seen.is_some(),
        "the broker never logged the client's address:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    drop(s);

    // A v2 header announcing 65 KB: refused before it could arrive.
    let mut bogus = TcpStream::connect(&proxied_addr).await.unwrap();
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    bogus.write_all(&h).await.unwrap();
    assert!(closed_within(&mut bogus, Duration::from_secs(2)).await);
    // Counted as the refusal is logged, just after the socket is closed:
    // the scrape may come between the two (it did once under a full run).
    let admin = format!("127.0.0.1:{admin}");
    let want = "mqlb_broker_listener_refused_total{reason=\"proxy_header\"} 1";
    let mut metrics = String::new();
    let start = std::time::Instant::now();
    while start.elapsed() < T {
        metrics = http(&admin, "GET", "/metrics").await.1;
        if metrics.contains(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(metrics.contains(want), "{metrics}");
    lb.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
