//! What replication costs a publisher: QoS 1 PUBLISH → PUBACK latency
//! against one `mqlb broker` alone and against a 3-node cluster, in one run
//! on this machine, with a persistent QoS 1 subscriber (so every delivery is
//! a session change the chain must hold before the PUBACK):
//!
//! * `single`: one node, no cluster;
//! * `cluster, same node`: publisher and subscriber on the subscriber's
//!   owner; the PUBACK waits for the chain's second node;
//! * `cluster, across nodes`: publisher on another node; the PUBACK waits
//!   for the forward, the owner's commit and its chain.
//!
//! The same three at QoS 2, end to end: PUBLISH sent → the subscriber has
//! it. In a cluster a QoS 2 PUBLISH leaves for its subscriber only once the
//! record naming its packet identifier is on the replica.
//!
//! Interleaved rounds; medians of each round's p50/p99 and ratios to
//! `single` are printed.
//!
//! Run: `cargo build --release && cargo bench -p mqlb-tests --bench cluster`
//!
//! `MQLB_BENCH_ONLY=across` (or `same`, `across2`, `same2` for QoS 2) runs
//! only that path, once, with `MQLB_BENCH_N` publishes (default 2000): for
//! counting one node's instructions under callgrind (docs/performance.md).

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used,
    missing_docs
)]

use std::time::{Duration, Instant};

use mqlb_protocol::{Ack, MqttStr, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS};
use mqlb_tests::client::{connect_packet, qos, Client};
use mqlb_tests::cluster::TestCluster;
use mqlb_tests::BrokerProcess;

const ROUNDS: usize = 3;
const N: usize = 2000;
const ALL: [&str; 3] = ["n1", "n2", "n3"];

/// Sequential publishes at `q` from `pub_addr` to a persistent subscriber
/// on `sub_addr`; returns (p50, p99) in microseconds of PUBLISH → PUBACK
/// at QoS 1, and of PUBLISH → the subscriber has it at QoS 2 (the
/// publisher completes each exchange before the next).
async fn run(q: QoS, pub_addr: &str, sub_addr: &str, sub_id: &str, pub_id: &str) -> (f64, f64) {
    let n = count();
    let mut cp = connect_packet(sub_id, ProtocolVersion::V5, false);
    cp.clean_start = false;
    cp.properties.session_expiry_interval = Some(600);
    let (mut s, _) = Client::connect(sub_addr, cp).await;
    // A topic per QoS: the other QoS's sessions, offline, match nothing.
    let topic = if q == QoS::ExactlyOnce {
        "lat2"
    } else {
        "lat1"
    };
    s.subscribe(&format!("{topic}/#"), qos(q)).await;
    let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut got_n = 0;
        while got_n < n {
            match s.next_publish(Duration::from_secs(10), true).await {
                Some(_) => {
                    got_n += 1;
                    let _ = got_tx.send(Instant::now());
                }
                None => break,
            }
        }
    });
    let (mut p, _) =
        Client::connect(pub_addr, connect_packet(pub_id, ProtocolVersion::V5, true)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let pid = PacketId::new(u16::try_from(i % 60000 + 1).unwrap()).unwrap();
        let t = Instant::now();
        p.send(Packet::Publish(Publish {
            dup: false,
            qos: q,
            retain: false,
            topic: MqttStr::try_from(format!("{topic}/x")).unwrap(),
            packet_id: Some(pid),
            properties: Properties::default(),
            payload: bytes::Bytes::from_static(b"0123456789abcdef"),
        }))
        .await;
        if q == QoS::ExactlyOnce {
            loop {
                match p.recv(Duration::from_secs(10)).await {
                    Some(Packet::Pubrec(a)) if a.packet_id == pid => {
                        p.send(Packet::Pubrel(Ack::new(pid))).await;
                    }
                    Some(Packet::Pubcomp(a)) if a.packet_id == pid => break,
                    Some(_) => {}
                    None => panic!("no PUBCOMP"),
                }
            }
            let at = tokio::time::timeout(Duration::from_secs(10), got.recv())
                .await
                .ok()
                .flatten()
                .expect("the subscriber did not get it");
            lat.push(at.duration_since(t).as_secs_f64() * 1e6);
            continue;
        }
        loop {
            if let Some(Packet::Puback(Ack { packet_id, .. })) =
                p.recv(Duration::from_secs(10)).await
            {
                if packet_id == pid {
                    break;
                }
            }
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        let _ = got.try_recv();
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), reader).await;
    lat.sort_by(|a, b| a.total_cmp(b));
    (lat[n / 2], lat[n * 99 / 100])
}

/// Publishes per run: `MQLB_BENCH_N`, else [`N`].
fn count() -> usize {
    std::env::var("MQLB_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(N)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let single = BrokerProcess::start(&[]);
    let mut c = TestCluster::start(3, &[]);
    assert!(c.wait_converged(Duration::from_secs(20)).await);
    // One subscriber session per QoS: a QoS 1 one left with a QoS 2
    // subscription would take the QoS 2 messages too.
    let sub: std::collections::HashMap<&str, String> = [
        ("q1", c.id_owned_by("n1", "bench-sub-q1", &ALL)),
        ("q2", c.id_owned_by("n1", "bench-sub-q2", &ALL)),
    ]
    .into();
    let same = c.id_owned_by("n1", "bench-pub", &ALL);
    let other = c.id_owned_by("n2", "bench-pub", &ALL);
    // One run for counting instructions: QoS 1 or 2, across nodes or on
    // the subscriber's node.
    let only = std::env::var("MQLB_BENCH_ONLY").unwrap_or_default();
    let one = match only.as_str() {
        "across" => Some((QoS::AtLeastOnce, 1, &other)),
        "same" => Some((QoS::AtLeastOnce, 0, &same)),
        "across2" => Some((QoS::ExactlyOnce, 1, &other)),
        "same2" => Some((QoS::ExactlyOnce, 0, &same)),
        _ => None,
    };
    if let Some((q, at, pub_id)) = one {
        let tag = if q == QoS::ExactlyOnce { "q2" } else { "q1" };
        let (p50, p99) = run(q, &c.nodes[at].addr, &c.nodes[0].addr, &sub[tag], pub_id).await;
        println!(
            "{only}, {} publishes: p50 {p50:.0} us, p99 {p99:.0} us",
            count()
        );
        return;
    }
    for (q, title) in [
        (
            QoS::AtLeastOnce,
            "QoS 1 PUBLISH -> PUBACK, persistent QoS 1 subscriber",
        ),
        (
            QoS::ExactlyOnce,
            "QoS 2 PUBLISH -> the persistent QoS 2 subscriber has it",
        ),
    ] {
        let mut results: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
            ("single", Vec::new(), Vec::new()),
            ("cluster, same node", Vec::new(), Vec::new()),
            ("cluster, across nodes", Vec::new(), Vec::new()),
        ];
        let tag = if q == QoS::ExactlyOnce { "q2" } else { "q1" };
        for _ in 0..ROUNDS {
            let runs = [
                run(
                    q,
                    &single.addr,
                    &single.addr,
                    &format!("s-{tag}"),
                    "p-single",
                )
                .await,
                run(q, &c.nodes[0].addr, &c.nodes[0].addr, &sub[tag], &same).await,
                run(q, &c.nodes[1].addr, &c.nodes[0].addr, &sub[tag], &other).await,
            ];
            for (r, (p50, p99)) in results.iter_mut().zip(runs) {
                r.1.push(p50);
                r.2.push(p99);
            }
        }
        let base = (median(results[0].1.clone()), median(results[0].2.clone()));
        println!("{title}, {N} sequential publishes x {ROUNDS} rounds (medians of rounds)");
        println!(
            "{:<24} {:>10} {:>10} {:>8} {:>8}",
            "setup", "p50 us", "p99 us", "p50 x", "p99 x"
        );
        for (name, p50s, p99s) in results {
            let (p50, p99) = (median(p50s), median(p99s));
            println!(
                "{name:<24} {p50:>10.0} {p99:>10.0} {:>8.2} {:>8.2}",
                p50 / base.0,
                p99 / base.1
            );
        }
    }
}
