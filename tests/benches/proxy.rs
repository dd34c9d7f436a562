//! Side-by-side proxy benchmark: one Mosquitto reached directly, through
//! HAProxy 2.6 (client-ID hashing and an MQTT check, as in the team's
//! reference config), and through mqlb. Same machine, same run, interleaved
//! rounds; reports medians and ratios.
//!
//! mqlb runs as its own process (`mqlb balance`), like HAProxy, so that
//! its memory and CPU are measured the same way.
//!
//! Run: `cargo build --release && cargo bench -p mqlb-tests --bench proxy`
//! (needs `mosquitto` and `haproxy`; `.ci/run` installs both). Env
//! `MQLB_BENCH_SCALE` (default 1) multiplies the work per round;
//! `MQLB_BENCH_IDLE` (default "1000,9000") lists the idle-connection counts
//! at which RSS per connection is measured; `MQLB_BENCH_BACKEND=mqlb` puts
//! the bundled broker behind both proxies instead of Mosquitto;
//! `MQLB_BENCH_ONLY=connects` or `=idle` runs those rows alone;
//! `MQLB_BENCH_ROUNDS` (default 3) sets the rounds. `MQLB_BIN` runs another
//! build of `mqlb`.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used,
    missing_docs
)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mqlb_tests::load::{anon_rss_kib, concurrent_connects, cpu_seconds, qos1_fanout};
use mqlb_tests::raw::{self, read_n};
use mqlb_tests::{free_port, mqlb_bin, scratch_dir, wait_listening, KillOnDrop, Mosquitto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Rounds by default; `MQLB_BENCH_ROUNDS` changes it (the connect rows
/// swing by about 10 % from round to round on two shared cores).
const ROUNDS: usize = 3;

struct Haproxy(Child, std::path::PathBuf);

impl Haproxy {
    fn start(backend: &str) -> (Haproxy, u16) {
        let port = free_port();
        let dir = scratch_dir("haproxy");
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                r#"global
    maxconn 9500
defaults
    mode tcp
    timeout connect 5s
    timeout client  90s
    timeout server  90s
    timeout check   3s
frontend fe_mqtt
    bind 127.0.0.1:{port}
    tcp-request inspect-delay 5s
    tcp-request content reject unless {{ req.payload(0,0),mqtt_is_valid }}
    tcp-request content set-var(sess.cid) req.payload(0,0),mqtt_field_value(connect,client_identifier)
    default_backend be_mqtt
backend be_mqtt
    balance hash var(sess.cid)
    hash-type consistent
    option tcp-check
    tcp-check connect
    tcp-check send-binary 100c00044d5154540402003c0000
    tcp-check expect binary 20020000
    tcp-check send-binary c000
    tcp-check expect binary d000
    tcp-check send-binary e000
    default-server check inter 2s fall 2 rise 2 on-marked-down shutdown-sessions
    server b1 {backend}
"#
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
        assert!(wait_listening(
            &format!("127.0.0.1:{port}"),
            Duration::from_secs(5)
        ));
        (Haproxy(child, dir), port)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// CONNECT → CONNACK → DISCONNECT, sequentially. Returns (conn/s, p50, p99).
async fn connects(addr: &str, n: usize) -> (f64, Duration, Duration) {
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let (mut s, ack) = raw::connect_and_ack(addr, &format!("bench-c{i}"), 4).await;
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
        lat.push(t.elapsed());
        s.write_all(&[0xE0, 0x00]).await.unwrap();
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    (rate, pct(&lat, 0.5), pct(&lat, 0.99))
}

async fn subscribe(addr: &str, id: &str, topic: &str) -> TcpStream {
    let (mut s, ack) = raw::connect_and_ack(addr, id, 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    let mut body = vec![0, 1];
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.push(0);
    s.write_all(&raw::frame(0x82, &body)).await.unwrap();
    assert_eq!(
        read_n(&mut s, 5, Duration::from_secs(5)).await,
        [0x90, 0x03, 0, 1, 0]
    );
    s
}

/// QoS 0 fan-through: one publisher, one subscriber, `n` 64-byte messages.
/// Returns messages per second as counted by the subscriber.
async fn qos0_throughput(addr: &str, n: usize) -> f64 {
    let mut sub = subscribe(addr, "bench-sub", "bench/q0").await;
    let (mut publ, ack) = raw::connect_and_ack(addr, "bench-pub", 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    let frame = raw::publish("bench/q0", 0, 0, &[0x5A; 64]);
    let frame_len = frame.len();
    let batch: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame_len * 100)
        .collect();
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0usize;
        let want = n * frame_len;
        while got < want {
            match tokio::time::timeout(Duration::from_secs(5), sub.read(&mut buf)).await {
                Ok(Ok(k)) if k > 0 => got += k,
                _ => break,
            }
        }
        (got / frame_len, Instant::now())
    });
    for _ in 0..n / 100 {
        publ.write_all(&batch).await.unwrap();
    }
    let (received, end) = reader.await.unwrap();
    assert!(received >= n * 99 / 100, "lost messages: {received} of {n}");
    received as f64 / (end - start).as_secs_f64()
}

/// QoS 1 PUBLISH → PUBACK round trips, sequential. Returns (p50, p99).
async fn qos1_latency(addr: &str, n: usize) -> (Duration, Duration) {
    let (mut s, ack) = raw::connect_and_ack(addr, "bench-q1", 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let pid = (i % 65_000 + 1) as u16;
        let t = Instant::now();
        s.write_all(&raw::publish("bench/q1", 1, pid, &[0x5A; 64]))
            .await
            .unwrap();
        let ack = read_n(&mut s, 4, Duration::from_secs(5)).await;
        assert_eq!(ack[..2], [0x40, 0x02]);
        lat.push(t.elapsed());
    }
    lat.sort();
    (pct(&lat, 0.5), pct(&lat, 0.99))
}

/// Opens `n` idle MQTT connections (CONNECT, CONNACK, then nothing) through
/// `addr`, and returns the proxy process's RSS growth per connection, KiB.
async fn idle_rss_per_conn(addr: &str, pid: u32, n: usize) -> f64 {
    let before = anon_rss_kib(pid);
    let mut held = Vec::with_capacity(n);
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(50));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (addr, sem) = (addr.to_string(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let (s, ack) = raw::connect_and_ack(&addr, &format!("idle-{i}"), 4).await;
            assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "idle connection {i}");
            s
        }));
    }
    for t in tasks {
        held.push(t.await.unwrap());
    }
    // Let both sides settle, as an idle fleet does.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = anon_rss_kib(pid);
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    (after - before) / n as f64
}

/// A fresh `mqlb balance` in front of `backend`, and its port.
fn start_mqlb(backend: &str) -> (KillOnDrop, u16) {
    let lport = free_port();
    let lb = KillOnDrop(
        Command::new(mqlb_bin())
            .args([
                "balance",
                "--listen",
                &format!("127.0.0.1:{lport}"),
                "--backend",
                &format!("b1={backend}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run `cargo build --release` first"),
    );
    assert!(wait_listening(
        &format!("127.0.0.1:{lport}"),
        Duration::from_secs(5)
    ));
    (lb, lport)
}

/// Anonymous RSS per idle MQTT-over-WebSocket client of a fresh `mqlb
/// balance` with a WebSocket listener in front of `backend` (HAProxy cannot
/// hash a client ID inside WebSocket frames, so mqlb alone), KiB.
async fn fresh_idle_websocket(backend: &str, n: usize) -> f64 {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let port = free_port();
    let dir = scratch_dir("bench-ws");
    let cfg = dir.join("mqlb.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listener]]\nname = \"ws\"\naddress = \"127.0.0.1:{port}\"\nkind = \"websocket\"\n\
             [[backend]]\nname = \"b1\"\naddress = \"{backend}\"\n"
        ),
    )
    .unwrap();
    let lb = KillOnDrop(
        Command::new(mqlb_bin())
            .args(["balance", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run `cargo build --release` first"),
    );
    let addr = format!("127.0.0.1:{port}");
    assert!(wait_listening(&addr, Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(700)).await; // its check is up
    let pid = lb.0.id();
    let before = anon_rss_kib(pid);
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let tcp = TcpStream::connect(&addr).await.unwrap();
        let mut req = format!("ws://{addr}/mqtt").into_client_request().unwrap();
        req.headers_mut()
            .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
        ws.send(Message::binary(raw::connect(&format!("ws-idle-{i}"), 4)))
            .await
            .unwrap();
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], [0x20, 0x02, 0x00, 0x00]),
            other => panic!("WebSocket client {i}: {other:?}"),
        }
        held.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = anon_rss_kib(pid);
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
    (after - before) / n as f64
}

/// Idle RSS per connection of HAProxy and mqlb, each a fresh process
/// (started for this count alone, nothing run through it before): a warm
/// process's heap already holds freed memory and hides growth.
async fn fresh_idle(backend: &str, n: usize) -> [f64; 2] {
    let (haproxy, hport) = Haproxy::start(backend);
    tokio::time::sleep(Duration::from_millis(700)).await; // its check is up
    let h = idle_rss_per_conn(&format!("127.0.0.1:{hport}"), haproxy.0.id(), n).await;
    drop(haproxy);
    let (lb, lport) = start_mqlb(backend);
    tokio::time::sleep(Duration::from_millis(700)).await; // its check is up
    let m = idle_rss_per_conn(&format!("127.0.0.1:{lport}"), lb.0.id(), n).await;
    drop(lb);
    [h, m]
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
    // MQLB_BENCH_ONLY=connects: the connect rows alone (no idle, no
    // traffic); MQLB_BENCH_ONLY=idle: the idle-memory rows alone.
    let only = std::env::var("MQLB_BENCH_ONLY").unwrap_or_default();
    let connects_only = only == "connects";
    let idle_only = only == "idle";
    let rounds: usize = std::env::var("MQLB_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ROUNDS);
    let idle_counts: Vec<usize> = std::env::var("MQLB_BENCH_IDLE")
        .unwrap_or_else(|_| if connects_only { "" } else { "1000,9000" }.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    // The broker behind both proxies: Mosquitto, or the bundled broker with
    // MQLB_BENCH_BACKEND=mqlb.
    let bundled = std::env::var("MQLB_BENCH_BACKEND").is_ok_and(|v| v == "mqlb");
    let (_mosquitto, _bundled, backend) = if bundled {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let b = KillOnDrop(
            Command::new(mqlb_bin())
                .args(["broker", "--listen", &addr])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run `cargo build --release` first"),
        );
        assert!(wait_listening(&addr, Duration::from_secs(5)));
        (None, Some(b), addr)
    } else {
        let m = Mosquitto::start_with(
            "max_queued_messages 1000000\nmax_inflight_messages 0\nmax_connections -1",
        );
        let addr = m.addr();
        (Some(m), None, addr)
    };
    eprintln!(
        "backend: {}",
        if bundled { "mqlb broker" } else { "mosquitto" }
    );
    let (haproxy, hport) = Haproxy::start(&backend);
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // Idle memory first, from fresh processes, once per count.
    let idle: Vec<[f64; 2]> = idle_counts
        .iter()
        .map(|n| {
            let v = client_rt.block_on(fresh_idle(&backend, *n));
            eprintln!(
                "idle {n}: haproxy {:.2}, mqlb {:.2} KiB per connection",
                v[0], v[1]
            );
            v
        })
        .collect();
    let ws_idle = if connects_only {
        None
    } else {
        let v = client_rt.block_on(fresh_idle_websocket(&backend, 1000));
        eprintln!("idle WebSocket 1000: mqlb {v:.2} KiB per connection");
        Some(v)
    };
    let (lb, lport) = start_mqlb(&backend);

    let paths = [
        ("direct", backend.clone(), None),
        (
            "haproxy",
            format!("127.0.0.1:{hport}"),
            Some(haproxy.0.id()),
        ),
        ("mqlb", format!("127.0.0.1:{lport}"), Some(lb.0.id())),
    ];
    let mut rows: Vec<(String, Vec<Vec<f64>>)> = [
        "connects/s (sequential)",
        "CONNECT->CONNACK p50 us (seq)",
        "CONNECT->CONNACK p99 us (seq)",
        "connects/s (50 at once)",
        "CONNECT->CONNACK p50 us (50)",
        "CONNECT->CONNACK p99 us (50)",
        "QoS0 msgs/s (64 B)",
        "proxy CPU s per 1M QoS0 msgs",
        "QoS1 PUBLISH->PUBACK p50 us",
        "QoS1 PUBLISH->PUBACK p99 us",
        "QoS1 deliveries/s (4 pub x 4 sub)",
        "QoS1 p99 us under 4x4 load",
        "proxy CPU s per 1M QoS1 deliv.",
        "proxy CPU us per connect (50)",
    ]
    .iter()
    .map(|l| (l.to_string(), vec![Vec::new(); 3]))
    .collect();
    for n in &idle_counts {
        rows.push((format!("RSS KiB per idle conn ({n})"), vec![Vec::new(); 3]));
    }
    if let Some(v) = ws_idle {
        rows.push((
            "RSS KiB per idle WebSocket conn (1000)".to_string(),
            vec![vec![f64::NAN], vec![f64::NAN], vec![v]],
        ));
    }
    client_rt.block_on(async {
        for round in 0..if idle_only { 0 } else { rounds } {
            // Each round starts with the next path: every connection leaves a
            // TIME_WAIT socket, which makes the kernel's search for a free
            // port slower for whoever runs later, so no path always goes last.
            for i in (0..paths.len()).map(|k| (k + round) % paths.len()) {
                let (name, addr, pid) = &paths[i];
                let (rate, p50, p99) = connects(addr, 1000 * scale).await;
                rows[0].1[i].push(rate);
                rows[1].1[i].push(p50.as_secs_f64() * 1e6);
                rows[2].1[i].push(p99.as_secs_f64() * 1e6);
                let cpu0 = pid.map_or(0.0, cpu_seconds);
                let (rate, p50, p99) = concurrent_connects(addr, 3000 * scale, 50).await;
                let cpu = pid.map_or(0.0, cpu_seconds) - cpu0;
                rows[3].1[i].push(rate);
                rows[4].1[i].push(p50);
                rows[5].1[i].push(p99);
                rows[13].1[i].push(cpu * 1e6 / (3000 * scale) as f64);
                if connects_only {
                    eprintln!("round {round} {name} done");
                    continue;
                }
                let cpu0 = pid.map_or(0.0, cpu_seconds);
                let n = 100_000 * scale;
                rows[6].1[i].push(qos0_throughput(addr, n).await);
                let cpu = pid.map_or(0.0, cpu_seconds) - cpu0;
                rows[7].1[i].push(cpu * 1e6 / n as f64);
                let (a, b) = qos1_latency(addr, 3000 * scale).await;
                rows[8].1[i].push(a.as_secs_f64() * 1e6);
                rows[9].1[i].push(b.as_secs_f64() * 1e6);
                let cpu0 = pid.map_or(0.0, cpu_seconds);
                let f =
                    qos1_fanout(addr, &format!("{name}{round}"), 4, 4, 10_000 * scale, 20).await;
                let cpu = pid.map_or(0.0, cpu_seconds) - cpu0;
                rows[10].1[i].push(f.rate);
                rows[11].1[i].push(f.p99_us);
                let deliveries = (16 * 10_000 * scale - f.lost) as f64;
                rows[12].1[i].push(cpu * 1e6 / deliveries.max(1.0));
                eprintln!("round {round} {name} done");
            }
        }
        for (k, v) in idle.iter().enumerate() {
            for _ in 0..rounds {
                rows[14 + k].1[0].push(f64::NAN);
                rows[14 + k].1[1].push(v[0]);
                rows[14 + k].1[2].push(v[1]);
            }
        }
    });
    println!(
        "\n{:<32} {:>12} {:>12} {:>12} {:>14} {:>14}",
        format!("median of {rounds} rounds"),
        "direct",
        "haproxy",
        "mqlb",
        "mqlb/direct",
        "mqlb/haproxy"
    );
    for (label, data) in &rows {
        if data.iter().any(|v| v.is_empty()) {
            continue;
        }
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
}
