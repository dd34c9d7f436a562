//! TLS termination, side by side: one Mosquitto reached over TLS directly
//! (its own TLS listener), through HAProxy 2.6 terminating TLS (with the
//! same client-ID hashing as the proxy benchmark), and through mqlb
//! terminating TLS. The same certificate (ECDSA P-256, made here by rcgen)
//! and the same cipher suite everywhere: the client offers only TLS 1.3
//! TLS_AES_128_GCM_SHA256 with X25519, so every server negotiates exactly
//! that. Same machine, same run, interleaved rounds; medians and ratios.
//!
//! Run: `cargo build --release && cargo bench -p mqlb-tests --bench tls`
//! (needs `mosquitto` and `haproxy`; `.ci/run` installs both). Env
//! `MQLB_BENCH_SCALE` (default 1) multiplies the work per round.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used,
    missing_docs
)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqlb_tests::load::cpu_seconds;
use mqlb_tests::raw::{self, read_n};
use mqlb_tests::{free_port, mqlb_bin, scratch_dir, wait_listening, KillOnDrop, Mosquitto};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;

const ROUNDS: usize = 3;
const T: Duration = Duration::from_secs(5);

struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn haproxy(pem: &std::path::Path, backend: &str) -> (Haproxy, u16) {
    let port = free_port();
    let dir = scratch_dir("haproxy-tls");
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            r#"global
    maxconn 9500
    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode tcp
    timeout connect 5s
    timeout client  90s
    timeout server  90s
frontend fe_mqtts
    bind 127.0.0.1:{port} ssl crt {pem}
    tcp-request inspect-delay 5s
    tcp-request content reject unless {{ req.payload(0,0),mqtt_is_valid }}
    tcp-request content set-var(sess.cid) req.payload(0,0),mqtt_field_value(connect,client_identifier)
    default_backend be_mqtt
backend be_mqtt
    balance hash var(sess.cid)
    hash-type consistent
    server b1 {backend}
"#,
            pem = pem.display()
        ),
    )
    .unwrap();
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&cfg)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy not installed: apt-get install haproxy");
    assert!(wait_listening(&format!("127.0.0.1:{port}"), T));
    (Haproxy(child), port)
}

/// The one client configuration: trusts the test certificate, offers one
/// cipher suite.
fn connector(ca: rustls_pki_types::CertificateDer<'static>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let base = rustls::crypto::ring::default_provider();
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![rustls::crypto::ring::kx_group::X25519],
        ..base
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn tls(c: &tokio_rustls::TlsConnector, addr: &str) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let s = tokio::time::timeout(T, c.connect(name, tcp))
        .await
        .unwrap()
        .unwrap();
    let suite = s.get_ref().1.negotiated_cipher_suite().unwrap().suite();
    assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    s
}

async fn connect_ack<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, id: &str) {
    s.write_all(&raw::connect(id, 4)).await.unwrap();
    assert_eq!(read_n(s, 4, T).await, [0x20, 0x02, 0x00, 0x00], "{id}");
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// TCP + TLS handshake + CONNECT → CONNACK, then DISCONNECT, sequentially.
/// Returns (connections/s, p50, p99).
async fn handshakes(
    c: &tokio_rustls::TlsConnector,
    addr: &str,
    n: usize,
) -> (f64, Duration, Duration) {
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let mut s = tls(c, addr).await;
        connect_ack(&mut s, &format!("tls-c{i}")).await;
        lat.push(t.elapsed());
        let _ = s.write_all(&[0xE0, 0x00]).await;
        let _ = s.shutdown().await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    (rate, pct(&lat, 0.5), pct(&lat, 0.99))
}

/// QoS 0, one publisher and one subscriber over TLS, `n` 64-byte messages:
/// messages per second as the subscriber counts them.
async fn qos0(c: &tokio_rustls::TlsConnector, addr: &str, n: usize) -> f64 {
    let mut sub = tls(c, addr).await;
    connect_ack(&mut sub, "tls-sub").await;
    let mut body = vec![0, 1, 0, 9];
    body.extend_from_slice(b"bench/tls");
    body.push(0);
    sub.write_all(&raw::frame(0x82, &body)).await.unwrap();
    assert_eq!(read_n(&mut sub, 5, T).await, [0x90, 0x03, 0, 1, 0]);
    let mut publ = tls(c, addr).await;
    connect_ack(&mut publ, "tls-pub").await;
    let frame = raw::publish("bench/tls", 0, 0, &[0x5A; 64]);
    let len = frame.len();
    let batch: Vec<u8> = frame.iter().copied().cycle().take(len * 100).collect();
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let (mut got, want) = (0usize, n * len);
        while got < want {
            match tokio::time::timeout(T, sub.read(&mut buf)).await {
                Ok(Ok(k)) if k > 0 => got += k,
                _ => break,
            }
        }
        (got / len, Instant::now())
    });
    for _ in 0..n / 100 {
        publ.write_all(&batch).await.unwrap();
    }
    let (received, end) = reader.await.unwrap();
    assert!(received >= n * 99 / 100, "lost messages: {received} of {n}");
    received as f64 / (end - start).as_secs_f64()
}

/// QoS 1 PUBLISH → PUBACK over TLS, sequential: (p50, p99).
async fn qos1(c: &tokio_rustls::TlsConnector, addr: &str, n: usize) -> (Duration, Duration) {
    let mut s = tls(c, addr).await;
    connect_ack(&mut s, "tls-q1").await;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let pid = (i % 65_000 + 1) as u16;
        s.write_all(&raw::publish("bench/tls1", 1, pid, &[0x5A; 64]))
            .await
            .unwrap();
        let ack = read_n(&mut s, 4, T).await;
        assert_eq!(ack[..2], [0x40, 0x02]);
        lat.push(t.elapsed());
    }
    lat.sort();
    (pct(&lat, 0.5), pct(&lat, 0.99))
}

/// KiB of RSS `pid` holds per idle TLS client, `n` of them connected
/// (handshake, CONNECT, CONNACK) and left idle.
async fn idle_tls(c: &tokio_rustls::TlsConnector, addr: &str, pid: u32, n: usize) -> f64 {
    let before = mqlb_tests::load::anon_rss_kib(pid);
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = tls(c, addr).await;
        connect_ack(&mut s, &format!("idle-tls-{i}")).await;
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = mqlb_tests::load::anon_rss_kib(pid);
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    (after - before) / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let scale: usize = std::env::var("MQLB_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let dir = scratch_dir("bench-tls");
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert, key, pem) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("both.pem"),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    std::fs::write(
        &pem,
        format!("{}{}", ck.cert.pem(), ck.key_pair.serialize_pem()),
    )
    .unwrap();
    let tls_port = free_port();
    let m = Mosquitto::start_with(&format!(
        "max_queued_messages 1000000\nmax_inflight_messages 0\nmax_connections -1\n\
         listener {tls_port} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
        cert.display(),
        key.display()
    ));
    let direct = format!("127.0.0.1:{tls_port}");
    assert!(wait_listening(&direct, T));
    let (ha, hport) = haproxy(&pem, &m.addr());
    let lport = free_port();
    let config = dir.join("mqlb.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\naddress = \"127.0.0.1:{lport}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
             [[backend]]\nname = \"b1\"\naddress = \"{}\"\n",
            cert.display(),
            key.display(),
            m.addr()
        ),
    )
    .unwrap();
    let lb = KillOnDrop(
        Command::new(mqlb_bin())
            .args(["balance", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run `cargo build --release` first"),
    );
    assert!(wait_listening(&format!("127.0.0.1:{lport}"), T));
    let paths = [
        ("direct", direct, m.pid()),
        ("haproxy", format!("127.0.0.1:{hport}"), Some(ha.0.id())),
        ("mqlb", format!("127.0.0.1:{lport}"), Some(lb.0.id())),
    ];
    let labels = [
        "TLS connects/s (sequential)",
        "TLS+CONNECT->CONNACK p50 us",
        "TLS+CONNECT->CONNACK p99 us",
        "QoS0 msgs/s over TLS (64 B)",
        "TLS CPU s per 1M QoS0 msgs",
        "QoS1 PUBLISH->PUBACK p50 us",
        "QoS1 PUBLISH->PUBACK p99 us",
        "KiB RSS per idle TLS client (1 run)",
    ];
    let mut rows: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); 3]; labels.len()];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let c = connector(ck.cert.der().clone());
    rt.block_on(async {
        // Memory first, on fresh processes: later rounds leave freed
        // buffers an allocator keeps, which would hide what a connection
        // costs.
        for (i, (_, addr, pid)) in paths.iter().enumerate() {
            if let Some(pid) = pid {
                rows[7][i].push(idle_tls(&c, addr, *pid, 1_000).await);
            }
        }
        for round in 0..ROUNDS {
            for (i, (name, addr, pid)) in paths.iter().enumerate() {
                let (rate, p50, p99) = handshakes(&c, addr, 500 * scale).await;
                rows[0][i].push(rate);
                rows[1][i].push(p50.as_secs_f64() * 1e6);
                rows[2][i].push(p99.as_secs_f64() * 1e6);
                let cpu0 = pid.map_or(0.0, cpu_seconds);
                let n = 100_000 * scale;
                rows[3][i].push(qos0(&c, addr, n).await);
                rows[4][i].push((pid.map_or(0.0, cpu_seconds) - cpu0) * 1e6 / n as f64);
                let (a, b) = qos1(&c, addr, 3000 * scale).await;
                rows[5][i].push(a.as_secs_f64() * 1e6);
                rows[6][i].push(b.as_secs_f64() * 1e6);
                eprintln!("round {round} {name} done");
            }
        }
    });
    println!("\ncipher suite: TLS 1.3 TLS_AES_128_GCM_SHA256, X25519, ECDSA P-256 certificate");
    println!(
        "(direct: Mosquitto's own TLS listener; CPU is the terminating process's: Mosquitto, HAProxy or mqlb)"
    );
    println!(
        "\n{:<32} {:>12} {:>12} {:>12} {:>14} {:>14}",
        "median of 3 rounds", "direct", "haproxy", "mqlb", "mqlb/direct", "mqlb/haproxy"
    );
    for (label, data) in labels.iter().zip(&rows) {
        let m: Vec<f64> = data.iter().map(|v| median(v.clone())).collect();
        println!(
            "{:<32} {:>12.2} {:>12.2} {:>12.2} {:>14.2} {:>14.2}",
            label,
            m[0],
            m[1],
            m[2],
            m[2] / m[0],
            m[2] / m[1]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
