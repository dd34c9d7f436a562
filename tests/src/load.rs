//! Load generators and process meters shared by the benchmarks, so every
//! bench measures the same way: connect storms, a QoS 1 fan-in/fan-out
//! with per-message latency, resident memory and CPU of a process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mqlb_protocol::{decode, Packet, ProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::raw;

/// Resident memory of a process, KiB.
pub fn rss_kib(pid: u32) -> f64 {
    status_kib(pid, "VmRSS:")
}

/// The anonymous part of a process's resident memory (heap, stacks), KiB:
/// what growth per connection is measured in. `VmRSS` also counts the
/// program's own code as it is first run (file pages, shared with the page
/// cache): the first client through a fresh `mqlb balance` faults in about
/// 0.7 MiB of it, which no later client adds.
pub fn anon_rss_kib(pid: u32) -> f64 {
    status_kib(pid, "RssAnon:")
}

fn status_kib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // utime and stime are fields 14 and 15; count after the command name,
    // which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0);
    ticks / 100.0
}

/// The most events in any window of length `window`, over sorted event
/// times (anything ordered that subtracts to a `Duration`: `Instant`s or
/// offsets). Pacing tests judge rates with this.
pub fn max_in_window<T>(sorted: &[T], window: Duration) -> usize
where
    T: Copy + std::ops::Sub<Output = Duration>,
{
    let (mut max, mut j) = (0, 0);
    for i in 0..sorted.len() {
        while sorted[i] - sorted[j] > window {
            j += 1;
        }
        max = max.max(i - j + 1);
    }
    max
}

/// The `p` quantile (0..=1) of sorted values.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A fleet reconnecting: `n` clients, `at_once` connecting concurrently,
/// each CONNECT → CONNACK → DISCONNECT. Returns (connects/s, p50 µs, p99 µs).
pub async fn concurrent_connects(addr: &str, n: usize, at_once: usize) -> (f64, f64, f64) {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..at_once {
        let (addr, next) = (addr.to_string(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return lat;
                }
                let t = Instant::now();
                let (mut s, ack) = raw::connect_and_ack(&addr, &format!("storm-{i}"), 4).await;
                assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "storm client {i}");
                lat.push(t.elapsed().as_secs_f64() * 1e6);
                let _ = s.write_all(&[0xE0, 0x00]).await;
            }
        }));
    }
    let mut lat = Vec::with_capacity(n);
    for w in workers {
        lat.extend(w.await.unwrap_or_default());
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    (rate, quantile(&lat, 0.5), quantile(&lat, 0.99))
}

/// What a QoS 1 fan-out run measured.
#[derive(Debug, Clone, Copy)]
pub struct Fanout {
    /// Deliveries per second, counted at the subscribers.
    pub rate: f64,
    /// Publish → subscriber receipt, µs.
    pub p50_us: f64,
    /// Publish → subscriber receipt, µs.
    pub p99_us: f64,
    /// Deliveries that never arrived.
    pub lost: usize,
}

fn publish_frame(topic: &[u8], pid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    body.extend_from_slice(&pid.to_be_bytes());
    body.extend_from_slice(payload);
    raw::frame(0x32, &body)
}

/// `pubs` publishers × `subs` subscribers at QoS 1 on one topic: each
/// publisher sends `per_pub` 64-byte messages with at most `window`
/// unacknowledged; every subscriber gets every message and acknowledges
/// it. Each payload carries its send time, so latency is measured under
/// the load.
pub async fn qos1_fanout(
    addr: &str,
    tag: &str,
    pubs: usize,
    subs: usize,
    per_pub: usize,
    window: usize,
) -> Fanout {
    fanout(addr, tag, pubs, subs, per_pub, window, true).await
}

/// [`qos1_fanout`] with persistent subscribers (clean session 0): every
/// delivery is a change to a session a durable broker must keep, so each
/// PUBACK waits for it to be stored.
pub async fn qos1_fanout_persistent(
    addr: &str,
    tag: &str,
    pubs: usize,
    subs: usize,
    per_pub: usize,
    window: usize,
) -> Fanout {
    fanout(addr, tag, pubs, subs, per_pub, window, false).await
}

async fn fanout(
    addr: &str,
    tag: &str,
    pubs: usize,
    subs: usize,
    per_pub: usize,
    window: usize,
    clean: bool,
) -> Fanout {
    let topic = format!("bench/fan/{tag}");
    let base = Instant::now();
    let want = pubs * per_pub;
    let mut readers = Vec::new();
    for k in 0..subs {
        let (mut s, ack) =
            raw::connect_and_ack_with(addr, &format!("fan-sub-{tag}-{k}"), 4, clean).await;
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
        let mut body = vec![0, 1];
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.push(1);
        s.write_all(&raw::frame(0x82, &body)).await.unwrap();
        assert_eq!(
            raw::read_n(&mut s, 5, Duration::from_secs(5)).await,
            [0x90, 0x03, 0, 1, 1]
        );
        readers.push(tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(1 << 16);
            let mut lat = Vec::with_capacity(want);
            let mut last = Instant::now();
            let mut acks = Vec::new();
            while lat.len() < want {
                while let Ok(Some(p)) = decode(&mut buf, ProtocolVersion::V3_1_1, 1 << 20) {
                    if let Packet::Publish(p) = p {
                        let mut t = [0u8; 8];
                        t.copy_from_slice(&p.payload[..8]);
                        let sent = Duration::from_nanos(u64::from_be_bytes(t));
                        lat.push((base.elapsed().saturating_sub(sent)).as_secs_f64() * 1e6);
                        last = Instant::now();
                        if let Some(id) = p.packet_id {
                            acks.extend_from_slice(&[
                                0x40,
                                2,
                                (id.get() >> 8) as u8,
                                id.get() as u8,
                            ]);
                        }
                    }
                }
                if !acks.is_empty() {
                    if s.write_all(&acks).await.is_err() {
                        break;
                    }
                    acks.clear();
                }
                if lat.len() >= want {
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(3), s.read_buf(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => break,
                }
            }
            (lat, last)
        }));
    }
    let start = Instant::now();
    let mut writers = Vec::new();
    for k in 0..pubs {
        let (mut p, ack) = raw::connect_and_ack(addr, &format!("fan-pub-{tag}-{k}"), 4).await;
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
        let topic = topic.clone();
        writers.push(tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(1 << 16);
            let mut in_flight = 0usize;
            let mut sent = 0usize;
            let mut payload = [0x5Au8; 64];
            while sent < per_pub || in_flight > 0 {
                let mut batch = Vec::new();
                while sent < per_pub && in_flight < window {
                    let ns = base.elapsed().as_nanos() as u64;
                    payload[..8].copy_from_slice(&ns.to_be_bytes());
                    let pid = (sent % 60_000 + 1) as u16;
                    batch.extend_from_slice(&publish_frame(topic.as_bytes(), pid, &payload));
                    sent += 1;
                    in_flight += 1;
                }
                if !batch.is_empty() && p.write_all(&batch).await.is_err() {
                    return;
                }
                match tokio::time::timeout(Duration::from_secs(5), p.read_buf(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                }
                while let Ok(Some(pkt)) = decode(&mut buf, ProtocolVersion::V3_1_1, 1 << 20) {
                    if let Packet::Puback(_) = pkt {
                        in_flight = in_flight.saturating_sub(1);
                    }
                }
            }
        }));
    }
    for w in writers {
        let _ = w.await;
    }
    let mut all = Vec::new();
    let mut end = start;
    for r in readers {
        let (lat, last) = r.await.unwrap_or_else(|_| (Vec::new(), Instant::now()));
        end = end.max(last);
        all.extend(lat);
    }
    let delivered = all.len();
    all.sort_by(f64::total_cmp);
    Fanout {
        rate: delivered as f64 / (end - start).as_secs_f64().max(1e-9),
        p50_us: quantile(&all, 0.5),
        p99_us: quantile(&all, 0.99),
        lost: (want * subs).saturating_sub(delivered),
    }
}

/// A 3.1.1 client that subscribes to `filter` at QoS 1 with a 2 KiB
/// receive buffer and never reads again: the stuck subscriber whose cost
/// must stay its own. Dropping the stream disconnects it.
pub async fn stuck_subscriber(addr: &str, id: &str, filter: &str) -> tokio::net::TcpStream {
    let to: std::net::SocketAddr = addr.parse().expect("an address");
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(2048).expect("SO_RCVBUF");
    let mut s = socket.connect(to).await.expect("connects");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(&raw::connect(id, 4)).await.expect("CONNECT");
    let ack = raw::read_n(&mut s, 4, Duration::from_secs(5)).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "stuck subscriber refused");
    let mut body = vec![0, 1];
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(1);
    s.write_all(&raw::frame(0x82, &body))
        .await
        .expect("SUBSCRIBE");
    let suback = raw::read_n(&mut s, 5, Duration::from_secs(5)).await;
    assert_eq!(suback, [0x90, 0x03, 0, 1, 1], "no SUBACK");
    s
}

/// A 3.1.1 subscriber to `filter` at `qos` that reads and acknowledges
/// everything; the counter says how many messages it has had.
pub async fn counting_subscriber(
    addr: &str,
    id: &str,
    filter: &str,
    qos: u8,
) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let (mut s, ack) = raw::connect_and_ack(addr, id, 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "subscriber refused");
    let mut body = vec![0, 1];
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(qos);
    s.write_all(&raw::frame(0x82, &body))
        .await
        .expect("SUBSCRIBE");
    let suback = raw::read_n(&mut s, 5, Duration::from_secs(5)).await;
    assert_eq!(suback, [0x90, 0x03, 0, 1, qos], "no SUBACK");
    let got = Arc::new(AtomicUsize::new(0));
    let count = got.clone();
    let task = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(1 << 16);
        let mut acks = Vec::new();
        loop {
            while let Ok(Some(p)) = decode(&mut buf, ProtocolVersion::V3_1_1, 1 << 20) {
                if let Packet::Publish(p) = p {
                    count.fetch_add(1, Ordering::Relaxed);
                    if let Some(id) = p.packet_id {
                        acks.extend_from_slice(&[0x40, 2, (id.get() >> 8) as u8, id.get() as u8]);
                    }
                }
            }
            if !acks.is_empty() {
                if s.write_all(&acks).await.is_err() {
                    return;
                }
                acks.clear();
            }
            match s.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
    });
    (got, task)
}

/// A pipelined QoS 1 publisher (3.1.1, at most `window` unacknowledged)
/// on `topic` for `run`: returns PUBACKs per second.
pub async fn puback_rate(addr: &str, id: &str, topic: &str, window: usize, run: Duration) -> f64 {
    let (mut p, ack) = raw::connect_and_ack(addr, id, 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "publisher refused");
    let payload = [0x5Au8; 64];
    let mut buf = BytesMut::with_capacity(1 << 16);
    let (mut sent, mut acked, mut in_flight) = (0usize, 0usize, 0usize);
    let start = Instant::now();
    let mut batch = Vec::with_capacity(16 * 1024);
    while start.elapsed() < run {
        batch.clear();
        while in_flight < window {
            batch.extend_from_slice(&raw::publish(
                topic,
                1,
                (sent % 60_000 + 1) as u16,
                &payload,
            ));
            sent += 1;
            in_flight += 1;
        }
        if !batch.is_empty() && p.write_all(&batch).await.is_err() {
            break;
        }
        let left = run.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, p.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
        while let Ok(Some(pkt)) = decode(&mut buf, ProtocolVersion::V3_1_1, 1 << 20) {
            if let Packet::Puback(_) = pkt {
                in_flight -= 1;
                acked += 1;
            }
        }
    }
    acked as f64 / start.elapsed().as_secs_f64()
}
