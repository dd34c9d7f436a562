//! Blast radius: a client that stops reading costs only itself. Real
//! `mqlb broker` processes; a subscriber with a 2 KiB receive buffer that
//! never reads, beside a healthy subscriber and a pipelined publisher.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used,
    missing_docs
)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mqlb_protocol::{decode, Packet, ProtocolVersion};
use mqlb_tests::load::{counting_subscriber, stuck_subscriber};
use mqlb_tests::{free_port, raw, BrokerProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Publishes `n` QoS 1 messages on `topic`, at most 100 unacknowledged,
/// and waits for every PUBACK (at most `within`); how long it took.
async fn publish_all(addr: &str, id: &str, topic: &str, n: usize, within: Duration) -> Duration {
    let (mut p, ack) = raw::connect_and_ack(addr, id, 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    let started = Instant::now();
    let (mut sent, mut acked) = (0usize, 0usize);
    let mut buf = BytesMut::new();
    while acked < n {
        let mut batch = Vec::new();
        while sent < n && sent - acked < 100 {
            batch.extend(raw::publish(
                topic,
                1,
                (sent % 60_000 + 1) as u16,
                b"payload",
            ));
            sent += 1;
        }
        p.write_all(&batch).await.unwrap();
        let left = within.saturating_sub(started.elapsed());
        let read = tokio::time::timeout(left, p.read_buf(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(k)) if k > 0),
            "{acked} of {n} acknowledged after {:?}: the publisher is held back",
            started.elapsed()
        );
        while let Ok(Some(pkt)) = decode(&mut buf, ProtocolVersion::V3_1_1, 1 << 20) {
            if let Packet::Puback(_) = pkt {
                acked += 1;
            }
        }
    }
    started.elapsed()
}

/// One broker, its queue limit 100: a stuck subscriber on `#` holds no
/// publisher back (3,000 pipelined QoS 1 publishes are all acknowledged;
/// the per-subscriber hold this replaced let about 40 a second through),
/// a healthy QoS 1 subscriber gets every message, and the stuck
/// subscriber's losses are counted as queue_full drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_subscriber_costs_only_itself() {
    let dir = mqlb_tests::scratch_dir("isolation");
    let cfg = dir.join("mqlb.toml");
    std::fs::write(&cfg, "[broker]\nmax_queued_messages = 100\n").unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let b = BrokerProcess::start(&["--admin", &admin, "--config", cfg.to_str().unwrap()]);
    let (got, healthy) = counting_subscriber(&b.addr, "healthy", "load/#", 1).await;
    let stuck = stuck_subscriber(&b.addr, "stuck", "#").await;
    const N: usize = 3000;
    let took = publish_all(&b.addr, "publisher", "load/x", N, Duration::from_secs(30)).await;
    eprintln!("{N} QoS 1 publishes acknowledged in {took:?} beside a stuck subscriber");
    let all =
        mqlb_tests::wait_until(Duration::from_secs(10), || got.load(Ordering::Relaxed) >= N).await;
    assert!(
        all.is_some(),
        "the healthy subscriber got {} of {N}",
        got.load(Ordering::Relaxed)
    );
    let (_, metrics) = mqlb_tests::http(&admin, "GET", "/metrics").await;
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("mqlb_broker_messages_dropped_total{reason=\"queue_full\"}")?
                .trim()
                .parse()
                .ok()
        })
        .expect("queue_full drops exported");
    // All but its queue (100) and its inflight window (100) were dropped.
    assert!(
        dropped >= (N - 200) as f64,
        "{dropped} queue_full drops counted for the stuck subscriber"
    );
    drop(stuck);
    healthy.abort();
}
