//! What durability costs, in one run on this machine: the pipelined 4x4
//! QoS 1 fan-out to persistent subscribers (every delivery a change the
//! broker keeps) against one bundled broker node with
//! `durability = "memory"`, `"disk"` (group commit), and `"disk"` with an
//! fsync per change (what group commit buys), beside Mosquitto with
//! `persistence true`. Then what each loses to `kill -9`: an offline
//! persistent subscriber, 2,000 acknowledged QoS 1 messages, the broker
//! killed and restarted on its data.
//!
//! Run: `cargo build --release && cargo bench -p mqlb-tests --bench durability`

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used,
    missing_docs
)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use mqlb_protocol::{decode, Packet, ProtocolVersion};
use mqlb_tests::load::qos1_fanout_persistent;
use mqlb_tests::raw::{self, connect_and_ack_with};
use mqlb_tests::{free_port, mqlb_bin, scratch_dir, wait_listening, KillOnDrop, Mosquitto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUNDS: usize = 5;
const LOSS_MESSAGES: u16 = 2_000;

fn mqlb(port: u16, extra: &[&str]) -> KillOnDrop {
    let addr = format!("127.0.0.1:{port}");
    // The same queue limit as the Mosquitto below (both default to 1,000
    // queued messages per session, which the loss test would pass).
    let cfg = scratch_dir("bench-durable-config").join("mqlb.toml");
    std::fs::write(&cfg, "[broker]\nmax_queued_messages = 100000\n").unwrap();
    let child = Command::new(mqlb_bin())
        .args(["broker", "--listen", &addr, "--config"])
        .arg(&cfg)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run `cargo build --release` first");
    assert!(wait_listening(&addr, Duration::from_secs(10)));
    KillOnDrop(child)
}

fn mosquitto(data: &Path) -> Mosquitto {
    Mosquitto::start_with(&format!(
        "persistence true\npersistence_location {}/\nmax_queued_messages 100000\n",
        data.display()
    ))
}

/// An offline persistent subscriber to `loss/#`, then `LOSS_MESSAGES`
/// QoS 1 publishes, each acknowledged before the next.
async fn fill(addr: &str) {
    let (mut s, ack) = connect_and_ack_with(addr, "loss-keeper", 4, false).await;
    assert_eq!(ack.len(), 4);
    s.write_all(&raw::frame(
        0x82,
        &[0, 1, 0, 6, b'l', b'o', b's', b's', b'/', b'#', 1],
    ))
    .await
    .unwrap();
    assert_eq!(
        raw::read_n(&mut s, 5, Duration::from_secs(5)).await[0],
        0x90
    );
    s.write_all(&[0xE0, 0]).await.unwrap();
    drop(s);
    let (mut p, _) = connect_and_ack_with(addr, "loss-pub", 4, true).await;
    for i in 1..=LOSS_MESSAGES {
        p.write_all(&raw::publish("loss/x", 1, i, b"kept?"))
            .await
            .unwrap();
        let ack = raw::read_n(&mut p, 4, Duration::from_secs(5)).await;
        assert_eq!(ack.first(), Some(&0x40), "message {i} not acknowledged");
    }
}

/// How many of the filled messages the subscriber gets back.
async fn drain(addr: &str) -> usize {
    let (mut s, _) = connect_and_ack_with(addr, "loss-keeper", 4, false).await;
    let mut buf = BytesMut::new();
    let mut got = 0;
    loop {
        while let Ok(Some(p)) = decode(&mut buf, ProtocolVersion::V3_1_1, 1 << 20) {
            if let Packet::Publish(p) = p {
                got += 1;
                if let Some(id) = p.packet_id {
                    let id = id.get();
                    let _ = s.write_all(&[0x40, 2, (id >> 8) as u8, id as u8]).await;
                }
            }
        }
        match tokio::time::timeout(Duration::from_secs(2), s.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return got,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dirs: Vec<_> = (0..3)
        .map(|i| scratch_dir(&format!("bench-durable-{i}")))
        .collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let d = |i: usize| dirs[i].to_str().unwrap().to_string();
    let (d1, d2) = (d(1), d(2));
    let _memory = mqlb(ports[0], &["--durability", "memory"]);
    let _disk = mqlb(ports[1], &["--data-dir", &d1]);
    let _each = mqlb(ports[2], &["--data-dir", &d2, "--fsync-per-change"]);
    let mosq_dir = scratch_dir("bench-durable-mosquitto");
    let mosq = mosquitto(&mosq_dir);
    let peers = [
        ("mqlb memory", format!("127.0.0.1:{}", ports[0]), 10_000),
        ("mqlb disk", format!("127.0.0.1:{}", ports[1]), 10_000),
        (
            "mqlb disk, fsync each",
            format!("127.0.0.1:{}", ports[2]),
            500,
        ),
        ("mosquitto persistence", mosq.addr(), 10_000),
    ];
    let mut rates = vec![Vec::new(); peers.len()];
    let mut p99s = vec![Vec::new(); peers.len()];
    rt.block_on(async {
        for round in 0..ROUNDS {
            for (i, (name, addr, per_pub)) in peers.iter().enumerate() {
                let tag = format!("{}{round}", name.replace([' ', ','], ""));
                let f = qos1_fanout_persistent(addr, &tag, 4, 4, *per_pub, 20).await;
                assert_eq!(f.lost, 0, "{name}: deliveries lost");
                rates[i].push(f.rate);
                p99s[i].push(f.p99_us);
            }
            eprintln!("round {round} done");
        }
    });
    let memory = median(rates[0].clone());
    println!(
        "\n4 publishers x 4 persistent subscribers, QoS 1, 20 in flight each; median of {ROUNDS} rounds"
    );
    println!(
        "{:<24} {:>14} {:>12} {:>12}",
        "", "deliveries/s", "p99 us", "vs memory"
    );
    for (i, (name, _, _)) in peers.iter().enumerate() {
        let r = median(rates[i].clone());
        println!(
            "{:<24} {:>14.0} {:>12.0} {:>12.2}",
            name,
            r,
            median(p99s[i].clone()),
            r / memory
        );
    }
    drop(_memory);
    drop(_each);

    // kill -9 and restart on the same data.
    let mut disk = _disk;
    let disk_addr = format!("127.0.0.1:{}", ports[1]);
    rt.block_on(fill(&disk_addr));
    let _ = disk.0.kill();
    let _ = disk.0.wait();
    let port = free_port();
    let _disk = mqlb(port, &["--data-dir", &d1]);
    let mqlb_back = rt.block_on(drain(&format!("127.0.0.1:{port}")));

    let mut mosq = mosq;
    rt.block_on(fill(&mosq.addr()));
    mosq.kill();
    let mosq = mosquitto(&mosq_dir);
    let mosq_back = rt.block_on(drain(&mosq.addr()));
    println!("\nkill -9 after {LOSS_MESSAGES} acknowledged QoS 1 messages to an offline persistent subscriber:");
    println!("{:<24} {:>10} {:>10}", "", "delivered", "lost");
    for (name, back) in [
        ("mqlb disk", mqlb_back),
        ("mosquitto persistence", mosq_back),
    ] {
        println!(
            "{:<24} {:>10} {:>10}",
            name,
            back,
            usize::from(LOSS_MESSAGES).saturating_sub(back)
        );
    }
}
