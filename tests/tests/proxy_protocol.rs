//! PROXY protocol in: a trusted load balancer's v1 and v2 headers give the
//! client's real address to `/clients`, logs and per-IP limits; a header
//! from an untrusted source, a bogus v2 length, or a trusted source without
//! a header are refused quickly and counted.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used
)]

use std::time::Duration;

use mqlb_balancer::metrics::RejectReason;
use mqlb_tests::raw;
use mqlb_tests::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

fn v2_header(src: [u8; 4], sport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // TCP over IPv4
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&1883u16.to_be_bytes());
    h
}

/// Sends `prefix` then a CONNECT for `id`; the CONNACK bytes (empty if closed).
async fn connect_with(addr: &str, prefix: &[u8], id: &str) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut bytes = prefix.to_vec();
    bytes.extend(raw::connect(id, 4));
    let _ = s.write_all(&bytes).await;
    let ack = raw::read_n(&mut s, 4, T).await;
    (s, ack)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_headers_carry_the_client_address() {
    let m = Mosquitto::start();
    let text = format!(
        "[[listener]]\nname = \"behind-nlb\"\naddress = \"127.0.0.1:0\"\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.1/32\"]\n\
         [[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\nproxy_protocol = true\nproxy_trusted = [\"10.0.0.0/8\"]\n\
         [[backend]]\nname = \"m\"\naddress = \"{}\"\n\
         [balancer]\nconnect_timeout = \"1s\"\n[health]\nenabled = false\n[admin]\naddress = \"127.0.0.1:0\"\n\
         [admission]\nper_ip_connections = 1\n",
        m.addr()
    );
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let (trusted, public) = (lb.addrs[0].to_string(), lb.addrs[1].to_string());
    let admin = lb.admin.unwrap().to_string();

    // v1 and v2 from the trusted balancer: the client's address is the header's.
    let (_a, ack) = connect_with(
        &trusted,
        b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 1883\r\n",
        "pp-v1",
    )
    .await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    let (_b, ack) = connect_with(&trusted, &v2_header([198, 51, 100, 9], 6666), "pp-v2").await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    for (id, want) in [("pp-v1", "192.0.2.7:5555"), ("pp-v2", "198.51.100.9:6666")] {
        let (_, body) = http(&admin, "GET", &format!("/clients/{id}")).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["address"], want, "{body}");
    }
    // Per-IP limits see the real client: a second connection "from"
    // 192.0.2.7 is over its limit of 1, though every TCP peer is 127.0.0.1.
    let (_c, ack) = connect_with(
        &trusted,
        b"PROXY TCP4 192.0.2.7 127.0.0.1 5556 1883\r\n",
        "pp-v1b",
    )
    .await;
    assert_eq!(
        ack,
        [0x20, 0x02, 0x00, 0x03],
        "per-IP limit by header address"
    );

    let m_before = lb.shared.metrics.rejected(RejectReason::ProxyHeader);
    // A trusted source that sends no header, and a v2 header with a bogus length.
    let (_d, ack) = connect_with(&trusted, b"", "no-header").await;
    assert!(ack.is_empty(), "{ack:02x?}");
    let mut bogus = v2_header([192, 0, 2, 1], 1);
    bogus[14] = 0xFF;
    bogus[15] = 0xFF;
    let started = std::time::Instant::now();
    let (mut e, ack) = connect_with(&trusted, &bogus, "bogus").await;
    assert!(ack.is_empty());
    assert!(raw::closed(&mut e, T).await);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "not refused at once"
    );
    assert_eq!(
        lb.shared.metrics.rejected(RejectReason::ProxyHeader) - m_before,
        2
    );

    // The public listener trusts nobody here: a header is refused, plain MQTT works.
    let (_f, ack) = connect_with(
        &public,
        b"PROXY TCP4 192.0.2.8 127.0.0.1 1 1883\r\n",
        "spoof",
    )
    .await;
    assert!(ack.is_empty(), "{ack:02x?}");
    assert_eq!(lb.shared.metrics.rejected(RejectReason::ProxyUntrusted), 1);
    let (_g, ack) = connect_with(&public, b"", "plain").await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    lb.stop().await;
}

/// What a PROXY-aware backend saw: (command byte, source address).
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(u8, Option<std::net::SocketAddr>)>>>;

/// A minimal broker that expects a PROXY v2 header, records it, and then
/// answers CONNECT and PINGREQ (enough for clients and health probes).
async fn proxy_aware_backend() -> (String, Seen) {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen: Seen = Default::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut head = [0u8; 16];
                if s.read_exact(&mut head).await.is_err() || &head[..12] != b"\r\n\r\n\0\r\nQUIT\n"
                {
                    return;
                }
                let mut body = vec![0u8; usize::from(u16::from_be_bytes([head[14], head[15]]))];
                if s.read_exact(&mut body).await.is_err() {
                    return;
                }
                let src = (head[13] == 0x11 && body.len() >= 12).then(|| {
                    let ip = std::net::Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                    std::net::SocketAddr::from((ip, u16::from_be_bytes([body[8], body[9]])))
                });
                record.lock().unwrap().push((head[12], src));
                let mut buf = [0u8; 512];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let reply: &[u8] = match buf[0] {
                        0x10 => &[0x20, 0x02, 0x00, 0x00],
                        0xC0 => &[0xD0, 0x00],
                        _ => &[],
                    };
                    if !reply.is_empty() && s.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// PROXY out: a backend marked `proxy_protocol = true` gets a v2 header
/// with the client's address first (here the address a trusted load
/// balancer gave in a v1 header), and its health probes open with a LOCAL
/// header, so the backend can tell them apart and stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_get_the_client_address_in_a_v2_header() {
    let (backend, seen) = proxy_aware_backend().await;
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.1\"]\n\
         [[backend]]\nname = \"pp\"\naddress = \"{backend}\"\nproxy_protocol = true\n\
         [health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 1\njitter = \"0ms\"\n"
    );
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let up = wait_until(T, || {
        lb.shared.backends.get("pp").unwrap().health_state() == mqlb_healthcheck::HealthState::Up
    })
    .await;
    assert!(
        up.is_some(),
        "probes with a LOCAL header did not bring it up"
    );
    let (_c, ack) = connect_with(
        &lb.addr.to_string(),
        b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 1883\r\n",
        "through",
    )
    .await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter().any(|(cmd, _)| *cmd == 0x20),
        "no LOCAL probe: {seen:?}"
    );
    assert!(
        seen.contains(&(0x21, Some("192.0.2.7:5555".parse().unwrap()))),
        "{seen:?}"
    );
    lb.stop().await;
}
