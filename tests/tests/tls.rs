//! TLS termination on a listener: mosquitto_pub/sub with `--cafile` and a
//! rustls client reach a plain-TCP Mosquitto through the balancer; a PROXY
//! header arriving in the same segment as the ClientHello still works; plain
//! MQTT on a TLS port gets a TLS alert and is closed, and a broken TLS
//! config is refused naming the key or file. With a client CA, only
//! clients with a certificate it signed get through (mTLS). A reload
//! re-reads rotated certificate files without dropping TLS sessions.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used
)]

use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mqlb_balancer::metrics::RejectReason;
use mqlb_tests::raw;
use mqlb_tests::*;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

const T: Duration = Duration::from_secs(5);

fn certificate() -> (std::path::PathBuf, CertificateDer<'static>) {
    mqlb_tests::pki::server_certificate()
}

fn client_config(ca: CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A TLS handshake with the listener at `addr` as 127.0.0.1, trusting
/// only `ca`; the handshake's own error when it fails.
async fn handshake_trusting(
    addr: std::net::SocketAddr,
    ca: CertificateDer<'static>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(client_config(ca));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    tokio::time::timeout(T, connector.connect(name, tcp))
        .await
        .unwrap()
}

/// Writes `prefix` in the same write as the first bytes of the stream (the
/// ClientHello), as a load balancer coalescing its PROXY header might.
struct Prefixed {
    prefix: Vec<u8>,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        let mut all = std::mem::take(&mut self.prefix);
        let plen = all.len();
        all.extend_from_slice(buf);
        // Loopback takes a small write whole; anything short is a test bug.
        match Pin::new(&mut self.inner).poll_write(cx, &all) {
            Poll::Ready(Ok(n)) => {
                assert_eq!(n, all.len(), "short coalesced write");
                Poll::Ready(Ok(n - plen))
            }
            other => {
                all.truncate(plen);
                self.prefix = all;
                other.map(|r| r.map(|_| 0))
            }
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_terminates_for_real_clients() {
    let m = Mosquitto::start();
    let (dir, ca) = certificate();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let text = format!(
        "[[listener]]\nname = \"mqtts\"\naddress = \"127.0.0.1:0\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\n\
         [[listener]]\nname = \"mqtts-behind-nlb\"\naddress = \"127.0.0.1:0\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\n\
         proxy_protocol = true\nproxy_trusted = [\"127.0.0.1/32\"]\n\
         [[backend]]\nname = \"m\"\naddress = \"{a}\"\n\
         [balancer]\nconnect_timeout = \"1s\"\n[health]\nenabled = false\n[admin]\naddress = \"127.0.0.1:0\"\n",
        c = cert.display(),
        k = key.display(),
        a = m.addr()
    );
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let (tls_port, nlb) = (lb.addrs[0].port().to_string(), lb.addrs[1].to_string());
    let admin = lb.admin.unwrap().to_string();
    let cafile = cert.display().to_string();

    // mosquitto_sub / mosquitto_pub over TLS, v3.1.1 and v5.
    for v in ["mqttv311", "mqttv5"] {
        let topic = format!("tls/{v}");
        let mut sub = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &tls_port, "--cafile", &cafile])
            .args(["-V", v, "-i", &format!("tls-sub-{v}"), "-t", &topic])
            .args(["-C", "1", "-W", "10", "-q", "1"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        assert!(
            m.saw_client(&format!("tls-sub-{v}"), T),
            "subscriber did not arrive"
        );
        for _ in 0..20 {
            let st = Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &tls_port, "--cafile", &cafile])
                .args(["-V", v, "-t", &topic, "-m", "over-tls", "-q", "1"])
                .status()
                .unwrap();
            assert!(st.success(), "mosquitto_pub over TLS failed");
            std::thread::sleep(Duration::from_millis(100));
            if sub.try_wait().unwrap().is_some() {
                break;
            }
        }
        let out = sub.wait_with_output().unwrap();
        assert!(out.status.success(), "mosquitto_sub {v}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "over-tls");
    }

    // A PROXY v1 header in the same segment as the ClientHello: the TLS
    // handshake still sees the whole hello, and /clients the real address.
    let ca_for_v5 = ca.clone();
    let connector = tokio_rustls::TlsConnector::from(client_config(ca));
    let tcp = TcpStream::connect(&nlb).await.unwrap();
    let prefixed = Prefixed {
        prefix: b"PROXY TCP4 192.0.2.44 127.0.0.1 7777 8883\r\n".to_vec(),
        inner: tcp,
    };
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut s = tokio::time::timeout(T, connector.connect(name, prefixed))
        .await
        .unwrap()
        .unwrap();
    s.write_all(&raw::connect("tls-behind-nlb", 4))
        .await
        .unwrap();
    assert_eq!(raw::read_n(&mut s, 4, T).await, [0x20, 0x02, 0x00, 0x00]);
    let (_, body) = http(&admin, "GET", "/clients/tls-behind-nlb").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["address"], "192.0.2.44:7777", "{body}");
    assert_eq!(v["placed_on"], "m", "{body}");

    // Plain MQTT on the TLS port: no CONNACK, closed, counted.
    let before = lb.shared.metrics.rejected(RejectReason::PlainOnTls);
    let mut plain = TcpStream::connect(lb.addrs[0]).await.unwrap();
    plain
        .write_all(&raw::connect("plain-on-tls", 4))
        .await
        .unwrap();
    // Everything until EOF: a TLS alert record (0x15), never a CONNACK.
    let got = raw::read_n(&mut plain, 64, T).await;
    assert!(got.len() < 64, "not closed: {got:?}");
    assert!(got.is_empty() || got[0] == 0x15, "plain MQTT got {got:?}");
    assert!(!m.saw_client("plain-on-tls", Duration::from_millis(200)));
    let counted = wait_until(T, || {
        lb.shared.metrics.rejected(RejectReason::PlainOnTls) > before
    })
    .await;
    assert!(counted.is_some(), "plain MQTT on TLS not counted");
    let (_, metrics) = http(&admin, "GET", "/metrics").await;
    assert!(metrics.contains("reason=\"plain_on_tls\"} 1"), "{metrics}");
    // Eviction through TLS: draining the backend sends the v5 client its
    // DISCONNECT (0x8B or 0x9C) inside the TLS session, then closes it.
    let connector = tokio_rustls::TlsConnector::from(client_config(ca_for_v5));
    let tcp = TcpStream::connect(lb.addrs[0]).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut v5 = connector.connect(name, tcp).await.unwrap();
    v5.write_all(&raw::connect("tls-v5-evicted", 5))
        .await
        .unwrap();
    let head = raw::read_n(&mut v5, 2, T).await;
    assert_eq!(head.first(), Some(&0x20), "{head:?}");
    let ack = raw::read_n(&mut v5, usize::from(head[1]), T).await;
    assert_eq!(ack.get(1), Some(&0x00), "CONNACK refused: {ack:?}");
    let (status, body) = http(&admin, "POST", "/backends/m/drain").await;
    assert_eq!(status, 200, "{body}");
    let got = raw::read_n(&mut v5, 64, T).await;
    assert_eq!(got.first(), Some(&0xE0), "no DISCONNECT over TLS: {got:?}");
    assert!(matches!(got.get(2), Some(0x8B | 0x9C)), "{got:?}");
    drop(s);
    lb.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A half-configured or unreadable TLS listener is a config error naming
/// the key; a file that is not PEM fails binding, naming the file.
#[tokio::test]
async fn broken_tls_config_is_refused_by_name() {
    let base = "[[backend]]\nname = \"m\"\naddress = \"127.0.0.1:1\"\n";
    let text =
        format!("[[listener]]\naddress = \"127.0.0.1:0\"\ntls_cert = \"/etc/hostname\"\n{base}");
    let e = mqlb_config::Config::parse("<t>", &text)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("listener[0].tls") && e.contains("go together"),
        "{e}"
    );

    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/etc/hostname\"\n{base}"
    );
    let e = mqlb_config::Config::parse("<t>", &text)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("listener[0].tls_cert") && e.contains("<t>:3"),
        "{e}"
    );

    // Exists but holds no PEM block: refused by key and line.
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls_cert = \"/etc/hostname\"\ntls_key = \"/etc/hostname\"\n{base}"
    );
    let e = mqlb_config::Config::parse("<t>", &text)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("<t>:3: listener[0].tls_cert") && e.contains("holds no PEM certificate"),
        "{e}"
    );
    assert!(
        e.contains("<t>:4: listener[0].tls_key") && e.contains("holds no PEM private key"),
        "{e}"
    );

    // A PEM block that does not parse: binding fails and says which file.
    let dir = scratch_dir("bad-pem");
    let bad = dir.join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls_cert = \"{b}\"\ntls_key = \"{b}\"\n{base}",
        b = bad.display()
    );
    let config = mqlb_config::Config::parse("<t>", &text).unwrap();
    let e = mqlb_balancer::server::Balancer::bind(config)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("TLS") && e.contains("bad.pem"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CA and a client certificate it signs, written as PEM under `dir`
/// (`{name}-ca.pem`, `{name}-client.pem`, `{name}-client.key`).
fn client_pki(dir: &std::path::Path, name: &str) {
    mqlb_tests::pki::client_pki(dir, name, None);
}

/// A CA and a client certificate it signed, with subject CN `cn` if given.
fn client_pki_cn(dir: &std::path::Path, name: &str, cn: Option<&str>) {
    mqlb_tests::pki::client_pki(dir, name, cn);
}

/// mTLS: with `tls_client_ca`, mosquitto_pub gets through only with a
/// client certificate that CA signed; none, or one from another CA, fails
/// the handshake (counted as tls) and never reaches the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_with_a_client_ca() {
    let m = Mosquitto::start();
    let (dir, _) = certificate();
    client_pki(&dir, "good");
    client_pki(&dir, "rogue");
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\ntls_client_ca = \"{ca}\"\n\
         [[backend]]\nname = \"m\"\naddress = \"{a}\"\n\
         [balancer]\nconnect_timeout = \"1s\"\n[health]\nenabled = false\n",
        c = dir.join("cert.pem").display(),
        k = dir.join("key.pem").display(),
        ca = dir.join("good-ca.pem").display(),
        a = m.addr()
    );
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let port = lb.addr.port().to_string();
    let cafile = dir.join("cert.pem").display().to_string();
    let publish = |id: &str, client: Option<&str>| {
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(["-h", "127.0.0.1", "-p", &port, "--cafile", &cafile])
            .args(["-i", id, "-t", "mtls", "-m", "x", "-q", "1"]);
        if let Some(name) = client {
            cmd.arg("--cert")
                .arg(dir.join(format!("{name}-client.pem")))
                .arg("--key")
                .arg(dir.join(format!("{name}-client.key")));
        }
        cmd.output().unwrap()
    };
    let before = lb.shared.metrics.rejected(RejectReason::Tls);
    let ok = publish("mtls-good", Some("good"));
    assert!(ok.status.success(), "{ok:?}");
    assert!(m.saw_client("mtls-good", T));
    for (id, client) in [("mtls-none", None), ("mtls-rogue", Some("rogue"))] {
        let out = publish(id, client);
        assert!(!out.status.success(), "{id} got through: {out:?}");
        assert!(
            !m.saw_client(id, Duration::from_millis(300)),
            "{id} reached the broker"
        );
    }
    let counted = wait_until(T, || {
        lb.shared.metrics.rejected(RejectReason::Tls) >= before + 2
    })
    .await;
    assert!(counted.is_some(), "mTLS failures not counted");

    // A client CA without TLS is a config error naming the key.
    let bad = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls_client_ca = \"{ca}\"\n[[backend]]\nname = \"m\"\naddress = \"{a}\"\n",
        ca = dir.join("good-ca.pem").display(),
        a = m.addr()
    );
    let e = mqlb_config::Config::parse("<t>", &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("listener[0].tls_client_ca"), "{e}");
    lb.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Certificate rotation: files replaced in place and `POST /reload` put the
/// new certificate in force for new clients; a TLS session opened before
/// keeps working; a broken replacement refuses the reload and changes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rotates_the_certificate_without_dropping_clients() {
    let m = Mosquitto::start();
    let (dir, old_ca) = certificate();
    let path = dir.join("mqlb.toml");
    let text = format!(
        "[[listener]]\nname = \"mqtts\"\naddress = \"127.0.0.1:0\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\n\
         [[backend]]\nname = \"m\"\naddress = \"{a}\"\n\
         [balancer]\nconnect_timeout = \"1s\"\n[health]\nenabled = false\n[admin]\naddress = \"127.0.0.1:0\"\n",
        c = dir.join("cert.pem").display(),
        k = dir.join("key.pem").display(),
        a = m.addr()
    );
    std::fs::write(&path, &text).unwrap();
    let lb = RunningBalancer::start(mqlb_config::Config::load(&path).unwrap()).await;
    lb.shared.set_config_path(path.clone());
    let admin = lb.admin.unwrap().to_string();
    let addr = lb.addr;
    let handshake = |ca| handshake_trusting(addr, ca);

    let mut before = handshake(old_ca.clone()).await.unwrap();
    before
        .write_all(&raw::connect("rotate-before", 4))
        .await
        .unwrap();
    assert_eq!(
        raw::read_n(&mut before, 4, T).await,
        [0x20, 0x02, 0x00, 0x00]
    );

    // Rotate: a new key pair and certificate at the same paths.
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
    let new_ca = ck.cert.der().clone();
    let (status, body) = http(&admin, "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"tls_reloaded\":[\"mqtts\"]"), "{body}");

    let mut after = handshake(new_ca.clone()).await.unwrap();
    after
        .write_all(&raw::connect("rotate-after", 4))
        .await
        .unwrap();
    assert_eq!(
        raw::read_n(&mut after, 4, T).await,
        [0x20, 0x02, 0x00, 0x00]
    );
    assert!(
        handshake(old_ca).await.is_err(),
        "the old certificate is still served"
    );
    // The session from before the rotation still round-trips a PINGREQ.
    before.write_all(&[0xC0, 0x00]).await.unwrap();
    assert_eq!(raw::read_n(&mut before, 2, T).await, [0xD0, 0x00]);

    // A broken replacement: the reload is refused, the new cert stays.
    std::fs::write(dir.join("key.pem"), "not a key").unwrap();
    let (status, body) = http(&admin, "POST", "/reload").await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("listener[0].tls_key") && body.contains("key.pem"),
        "{body}"
    );
    assert!(handshake(new_ca).await.is_ok());
    drop((before, after));
    lb.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// mTLS identity: with `tls_identity_as = "username"`, the certificate's CN
/// replaces whatever user name the client sent. A Mosquitto backend whose
/// ACL lets only user `device-7` use `devices/device-7/#` proves the broker
/// saw the mapped name: a client claiming to be `evil` round-trips there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_identity_replaces_the_user_name() {
    let (dir, _) = certificate();
    let acl = dir.join("acl");
    std::fs::write(&acl, "user device-7\ntopic readwrite devices/device-7/#\n").unwrap();
    let m = Mosquitto::start_with(&format!("acl_file {}", acl.display()));
    client_pki_cn(&dir, "dev", Some("device-7"));
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\ntls_client_ca = \"{ca}\"\ntls_identity_as = \"username\"\n\
         [[backend]]\nname = \"m\"\naddress = \"{a}\"\n\
         [balancer]\nconnect_timeout = \"2s\"\n[health]\nenabled = false\n",
        c = dir.join("cert.pem").display(),
        k = dir.join("key.pem").display(),
        ca = dir.join("dev-ca.pem").display(),
        a = m.addr()
    );
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let port = lb.addr.port().to_string();
    let cafile = dir.join("cert.pem").display().to_string();
    let tls_args = |cmd: &mut Command| {
        cmd.args(["-h", "127.0.0.1", "-p", &port, "--cafile", &cafile])
            .arg("--cert")
            .arg(dir.join("dev-client.pem"))
            .arg("--key")
            .arg(dir.join("dev-client.key"))
            .args(["-u", "evil", "-P", "whatever"]);
    };
    let mut sub = Command::new("mosquitto_sub");
    tls_args(&mut sub);
    sub.args([
        "-i",
        "id-sub",
        "-t",
        "devices/device-7/t",
        "-C",
        "1",
        "-W",
        "10",
        "-q",
        "1",
    ]);
    let sub = sub.stdout(std::process::Stdio::piped()).spawn().unwrap();
    assert!(
        m.saw_client("id-sub", T),
        "subscriber did not reach the broker"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut publ = Command::new("mosquitto_pub");
    tls_args(&mut publ);
    let out = publ
        .args([
            "-i",
            "id-pub",
            "-t",
            "devices/device-7/t",
            "-m",
            "mapped",
            "-q",
            "1",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let got = tokio::task::spawn_blocking(move || sub.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "mapped",
        "{got:?}"
    );
    // Mosquitto logs the user name it saw.
    let log = std::fs::read_to_string(m.log_path()).unwrap();
    assert!(log.contains("u'device-7'"), "{log}");
    assert!(
        !log.contains("u'evil'"),
        "the client-supplied name reached the broker"
    );
    // Without client certificates the mapping is a config error by key.
    let bad = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\ntls_identity_as = \"username\"\n[[backend]]\nname = \"m\"\naddress = \"{a}\"\n",
        c = dir.join("cert.pem").display(),
        k = dir.join("key.pem").display(),
        a = m.addr()
    );
    let e = mqlb_config::Config::parse("<t>", &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("listener[0].tls_identity_as"), "{e}");
    lb.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// SNI: each client gets the certificate for the name it asks for (exact
/// or `*.` wildcard), a client that asks for none gets the default, and a
/// name no certificate is for is refused with an alert and counted. ALPN
/// `mqtt` is agreed when offered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_refuses_unknown_names() {
    let dir = scratch_dir("sni");
    let mut roots = rustls::RootCertStore::empty();
    let mut ders = std::collections::HashMap::new();
    for (file, names) in [
        ("default", vec!["mqtt.test".to_string()]),
        ("a", vec!["a.test".to_string()]),
        ("b", vec!["*.b.test".to_string()]),
    ] {
        let ck = rcgen::generate_simple_self_signed(names).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), ck.cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), ck.key_pair.serialize_pem()).unwrap();
        roots.add(ck.cert.der().clone()).unwrap();
        ders.insert(file, ck.cert.der().to_vec());
    }
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls_cert = \"{d}/default.pem\"\ntls_key = \"{d}/default.key\"\n\
         [[listener.sni]]\nserver_names = [\"a.test\"]\ntls_cert = \"{d}/a.pem\"\ntls_key = \"{d}/a.key\"\n\
         [[listener.sni]]\nserver_names = [\"*.b.test\"]\ntls_cert = \"{d}/b.pem\"\ntls_key = \"{d}/b.key\"\n\
         [[backend]]\nname = \"m\"\naddress = \"127.0.0.1:9\"\n[health]\nenabled = false\n",
        d = dir.display()
    );
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"mqtt".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = |name: ServerName<'static>| {
        let connector = connector.clone();
        let addr = lb.addr;
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let s = tokio::time::timeout(T, connector.connect(name, tcp))
                .await
                .unwrap()?;
            let (_, conn) = s.get_ref();
            let cert = conn.peer_certificates().unwrap()[0].to_vec();
            let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
            Ok::<_, std::io::Error>((cert, alpn))
        }
    };
    let name = |n: &str| ServerName::try_from(n.to_string()).unwrap();
    for (asked, want) in [("a.test", "a"), ("x.b.test", "b"), ("mqtt.test", "default")] {
        let (cert, alpn) = handshake(name(asked)).await.unwrap();
        assert_eq!(cert, ders[want], "{asked} got the wrong certificate");
        assert_eq!(alpn.as_deref(), Some(&b"mqtt"[..]));
    }
    // No SNI at all: the default certificate (a client that verifies it
    // as mqtt.test gets through; one expecting a.test does not).
    let mut no_sni = (**connector.config()).clone();
    no_sni.enable_sni = false;
    let plain = tokio_rustls::TlsConnector::from(Arc::new(no_sni));
    for (expect, ok) in [("mqtt.test", true), ("a.test", false)] {
        let tcp = TcpStream::connect(lb.addr).await.unwrap();
        let r = tokio::time::timeout(T, plain.connect(name(expect), tcp))
            .await
            .unwrap();
        assert_eq!(r.is_ok(), ok, "no SNI, verified as {expect}");
    }
    let before = lb.shared.metrics.rejected(RejectReason::Tls);
    assert!(
        handshake(name("c.test")).await.is_err(),
        "an unknown name got a certificate"
    );
    let counted = wait_until(T, || lb.shared.metrics.rejected(RejectReason::Tls) > before).await;
    assert!(counted.is_some(), "the unknown name was not counted");
    lb.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// TLS towards backends: a Mosquitto that only speaks TLS (and wants a
/// client certificate) behind the balancer. Plain clients on the front get
/// through, the health probes use the same TLS settings (the backend is
/// healthy), and a wrong CA fails both the probes and the data path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_backend_with_a_client_certificate() {
    let (dir, _) = certificate(); // the broker's certificate: localhost
    client_pki(&dir, "lb"); // the balancer's client certificate and its CA
    let m = Mosquitto::start_with(&format!(
        "certfile {d}/cert.pem\nkeyfile {d}/key.pem\ncafile {d}/lb-ca.pem\nrequire_certificate true",
        d = dir.display()
    ));
    let config = |ca: &str| {
        format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[backend]]\nname = \"m\"\naddress = \"{a}\"\ntls_ca = \"{ca}\"\ntls_cert = \"{d}/lb-client.pem\"\ntls_key = \"{d}/lb-client.key\"\ntls_server_name = \"localhost\"\n\
             [balancer]\nconnect_timeout = \"2s\"\nbackend_connect_timeout = \"2s\"\n\
             [health]\ninterval = \"200ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1\njitter = \"0ms\"\n[admin]\naddress = \"127.0.0.1:0\"\n",
            a = m.addr(),
            d = dir.display()
        )
    };
    let good = config(&dir.join("cert.pem").display().to_string());
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &good).unwrap()).await;
    let admin = lb.admin.unwrap().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http(&admin, "GET", "/backends").await;
        if body.contains("\"health\":\"up\"") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "TLS probes never found the backend up: {body}\n{}",
            std::fs::read_to_string(m.log_path()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &lb.addr.port().to_string()])
        .args(["-i", "via-tls", "-t", "t", "-m", "x", "-q", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        m.saw_client("via-tls", T),
        "the client did not reach the TLS backend"
    );
    lb.stop().await;

    // A CA that did not sign the broker's certificate: the probes say
    // down, and a client gets "server unavailable", not a plain-text
    // connection.
    client_pki(&dir, "other");
    let wrong = config(&dir.join("other-ca.pem").display().to_string());
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &wrong).unwrap()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, ack) = raw::connect_and_ack(&lb.addr.to_string(), "via-wrong-ca", 4).await;
    assert_eq!(
        ack,
        vec![0x20, 0x02, 0x00, 0x03],
        "expected CONNACK server unavailable"
    );
    assert!(!m.saw_client("via-wrong-ca", Duration::from_millis(300)));
    lb.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// PROXY v2 towards a backend carries the client's TLS session: the SNI as
/// `PP2_TYPE_AUTHORITY` and `PP2_TYPE_SSL` with the version and the client
/// certificate's CN, as brokers that read PROXY TLVs expect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_out_carries_the_tls_version_sni_and_client_cn() {
    use tokio::io::AsyncReadExt;
    let (dir, server_der) = certificate();
    client_pki_cn(&dir, "dev", Some("sensor-1"));
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls_cert = \"{d}/cert.pem\"\ntls_key = \"{d}/key.pem\"\ntls_client_ca = \"{d}/dev-ca.pem\"\n\
         [[backend]]\nname = \"raw\"\naddress = \"{a}\"\nproxy_protocol = true\n[health]\nenabled = false\n",
        d = dir.display(),
        a = backend.local_addr().unwrap()
    );
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_der).unwrap();
    let chain: Vec<CertificateDer<'static>> = {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::pem_file_iter(dir.join("dev-client.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let key = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::PrivateKeyDer::from_pem_file(dir.join("dev-client.key")).unwrap()
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    let tcp = TcpStream::connect(lb.addr).await.unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    s.write_all(&raw::connect("tlv-client", 4)).await.unwrap();
    let (mut b, _) = tokio::time::timeout(T, backend.accept())
        .await
        .unwrap()
        .unwrap();
    let mut head = [0u8; 16];
    b.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[..12], b"\r\n\r\n\0\r\nQUIT\n");
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    let mut body = vec![0u8; len];
    b.read_exact(&mut body).await.unwrap();
    // After the IPv4 addresses and ports (12 bytes): the TLVs.
    let mut tlvs = std::collections::HashMap::new();
    let mut rest = &body[12..];
    while rest.len() >= 3 {
        let n = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        tlvs.insert(rest[0], rest[3..3 + n].to_vec());
        rest = &rest[3 + n..];
    }
    assert_eq!(tlvs.get(&0x02).map(Vec::as_slice), Some(&b"localhost"[..]));
    let ssl = tlvs.get(&0x20).expect("PP2_TYPE_SSL");
    assert_eq!(
        ssl[0] & 0x07,
        0x07,
        "client flags: SSL, cert on connection and session"
    );
    assert_eq!(&ssl[1..5], &[0, 0, 0, 0], "verified");
    let mut subs = std::collections::HashMap::new();
    let mut rest = &ssl[5..];
    while rest.len() >= 3 {
        let n = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        subs.insert(rest[0], String::from_utf8(rest[3..3 + n].to_vec()).unwrap());
        rest = &rest[3 + n..];
    }
    assert_eq!(subs.get(&0x21).map(String::as_str), Some("TLSv1.3"));
    assert_eq!(subs.get(&0x22).map(String::as_str), Some("sensor-1"));
    // Then the CONNECT itself, unchanged.
    let mut first = [0u8; 2];
    b.read_exact(&mut first).await.unwrap();
    assert_eq!(first[0], 0x10);
    lb.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rotation with no reload at all: certificate files replaced on disk are
/// picked up by the watcher; a TLS session from before keeps working; a
/// broken replacement is counted and reported while the certificate in
/// service stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_changed_on_disk_are_picked_up_without_a_reload() {
    use std::sync::atomic::Ordering;
    let m = Mosquitto::start();
    let (dir, old_ca) = certificate();
    let text = format!(
        "[[listener]]\nname = \"mqtts\"\naddress = \"127.0.0.1:0\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\n\
         [[backend]]\nname = \"m\"\naddress = \"{a}\"\n\
         [balancer]\nconnect_timeout = \"1s\"\n[health]\nenabled = false\n",
        c = dir.join("cert.pem").display(),
        k = dir.join("key.pem").display(),
        a = m.addr()
    );
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let addr = lb.addr;
    let handshake = |ca| handshake_trusting(addr, ca);
    let mut before = handshake(old_ca.clone()).await.unwrap();
    before
        .write_all(&raw::connect("disk-before", 4))
        .await
        .unwrap();
    assert_eq!(
        raw::read_n(&mut before, 4, T).await,
        [0x20, 0x02, 0x00, 0x00]
    );

    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    std::fs::write(dir.join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    let new_ca = ck.cert.der().clone();
    let mut served = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !served && std::time::Instant::now() < deadline {
        served = handshake(new_ca.clone()).await.is_ok();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served, "the new certificate was never served");
    assert!(lb.shared.metrics.tls_reloads.load(Ordering::Relaxed) >= 1);
    assert!(
        handshake(old_ca).await.is_err(),
        "old certificate still served"
    );
    before.write_all(&[0xC0, 0x00]).await.unwrap();
    assert_eq!(raw::read_n(&mut before, 2, T).await, [0xD0, 0x00]);

    // A broken file: counted, and the certificate in service stays.
    let failures = lb
        .shared
        .metrics
        .tls_reload_failures
        .load(Ordering::Relaxed);
    std::fs::write(dir.join("key.pem"), "not a key").unwrap();
    let counted = wait_until(Duration::from_secs(15), || {
        lb.shared
            .metrics
            .tls_reload_failures
            .load(Ordering::Relaxed)
            > failures
    })
    .await;
    assert!(counted.is_some(), "a broken key file was not reported");
    assert!(handshake(new_ca).await.is_ok());
    drop(before);
    lb.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// mTLS with a CRL: a client certificate the CA revoked is refused in the
/// handshake (counted as tls, never reaching the broker); one it did not
/// revoke gets through. A CRL without a client CA is a config error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_certificate_is_refused() {
    let m = Mosquitto::start();
    let (dir, _) = certificate();
    client_pki(&dir, "crl");
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\n\
         tls_client_ca = \"{ca}\"\ntls_client_crl = \"{crl}\"\n\
         [[backend]]\nname = \"m\"\naddress = \"{a}\"\n\
         [balancer]\nconnect_timeout = \"1s\"\n[health]\nenabled = false\n",
        c = dir.join("cert.pem").display(),
        k = dir.join("key.pem").display(),
        ca = dir.join("crl-ca.pem").display(),
        crl = dir.join("crl-crl.pem").display(),
        a = m.addr()
    );
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let port = lb.addr.port().to_string();
    let cafile = dir.join("cert.pem").display().to_string();
    let publish = |id: &str, which: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "--cafile", &cafile])
            .args(["-i", id, "-t", "crl", "-m", "x", "-q", "1"])
            .arg("--cert")
            .arg(dir.join(format!("crl-{which}.pem")))
            .arg("--key")
            .arg(dir.join(format!("crl-{which}.key")))
            .output()
            .unwrap()
    };
    let before = lb.shared.metrics.rejected(RejectReason::Tls);
    let ok = publish("crl-good", "client");
    assert!(ok.status.success(), "{ok:?}");
    assert!(m.saw_client("crl-good", T));
    let out = publish("crl-revoked", "revoked");
    assert!(!out.status.success(), "a revoked certificate got through");
    assert!(!m.saw_client("crl-revoked", Duration::from_millis(300)));
    assert!(lb.shared.metrics.rejected(RejectReason::Tls) > before);

    let bad = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\n\
         tls_client_crl = \"{crl}\"\n[[backend]]\nname = \"m\"\naddress = \"{a}\"\n",
        c = dir.join("cert.pem").display(),
        k = dir.join("key.pem").display(),
        crl = dir.join("crl-crl.pem").display(),
        a = m.addr()
    );
    let e = mqlb_config::Config::parse("<t>", &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("listener[0].tls_client_crl"), "{e}");
    lb.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client on the wrong port is refused at once, under its own reason:
/// plain MQTT on a TLS listener (`plain_on_tls`) and a TLS ClientHello on a
/// plain one (`tls_on_plain`), neither waiting for the CONNECT timeout
/// (30 s here) nor reaching the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_port_clients_are_refused_at_once_under_their_own_reason() {
    let m = Mosquitto::start();
    let (dir, ca) = certificate();
    let text = format!(
        "[[listener]]\nname = \"plain\"\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"tls\"\naddress = \"127.0.0.1:0\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\n\
         [[backend]]\nname = \"m\"\naddress = \"{a}\"\n\
         [balancer]\nconnect_timeout = \"30s\"\n[health]\nenabled = false\n",
        c = dir.join("cert.pem").display(),
        k = dir.join("key.pem").display(),
        a = m.addr()
    );
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let (plain, tls) = (lb.addrs[0], lb.addrs[1]);

    let mut s = TcpStream::connect(tls).await.unwrap();
    s.write_all(&raw::connect("wrong-port-plain", 4))
        .await
        .unwrap();
    let got = raw::read_n(&mut s, 64, Duration::from_secs(3)).await;
    assert!(got.len() < 64 && !got.starts_with(&[0x20]), "{got:?}");
    let counted = wait_until(Duration::from_secs(3), || {
        lb.shared.metrics.rejected(RejectReason::PlainOnTls) == 1
    })
    .await;
    assert!(
        counted.is_some(),
        "plain MQTT on the TLS port not refused at once"
    );

    let connector = tokio_rustls::TlsConnector::from(client_config(ca));
    let tcp = TcpStream::connect(plain).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let r = tokio::time::timeout(Duration::from_secs(3), connector.connect(name, tcp)).await;
    assert!(
        matches!(r, Ok(Err(_))),
        "TLS on the plain port was not refused at once"
    );
    let counted = wait_until(Duration::from_secs(3), || {
        lb.shared.metrics.rejected(RejectReason::TlsOnPlain) == 1
    })
    .await;
    assert!(
        counted.is_some(),
        "TLS on the plain port not counted as tls_on_plain"
    );
    assert!(m.clients().iter().all(|c| !c.starts_with("wrong-port")));
    lb.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TLS handshake that stalls (a ClientHello record header, then
/// nothing) is cut at the CONNECT deadline, counted as a timeout, and never
/// opens a backend connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_cut_at_the_deadline() {
    let backend = CountingBackend::start().await;
    let (dir, _) = certificate();
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\n\
         [[backend]]\nname = \"b\"\naddress = \"{a}\"\n\
         [balancer]\nconnect_timeout = \"1s\"\n[health]\nenabled = false\n",
        c = dir.join("cert.pem").display(),
        k = dir.join("key.pem").display(),
        a = backend.addr
    );
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let before = lb.shared.metrics.rejected(RejectReason::Timeout);
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    // A handshake record announcing 512 bytes, and 3 of them.
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01])
        .await
        .unwrap();
    // Closed by the balancer (the read ends before its own 10 s limit),
    // and for the deadline's reason (counted as a timeout below).
    let got = raw::read_n(&mut s, 64, Duration::from_secs(10)).await;
    assert!(got.len() < 64, "not closed");
    let counted = wait_until(T, || {
        lb.shared.metrics.rejected(RejectReason::Timeout) == before + 1
    })
    .await;
    assert!(
        counted.is_some(),
        "the stalled handshake was not counted as a timeout"
    );
    assert_eq!(backend.count(), 0, "a backend connection was opened");
    lb.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
