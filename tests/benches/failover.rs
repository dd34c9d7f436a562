//! How long publishers stall when a node fails: a sequential QoS 1
//! publisher on a surviving node publishes, one at a time, to a persistent
//! QoS 1 subscriber whose session lives on the node that fails. Its
//! PUBACKs wait while the session moves (the view drops the dead node and
//! the next node of the chain promotes its copy), then go straight to the
//! new holder.
//!
//! Faults, each on a fresh 3-node cluster:
//! * `kill -9` of a node that is not the Raft leader;
//! * `kill -9` of the leader (an election comes first);
//! * `SIGSTOP` of a node that is not the leader (a hung node: its links
//!   stay open, the failure detector drops it after 3 s).
//!
//! Printed per fault, as medians of the rounds: the total time the
//! publisher spent in PUBACKs slower than 100 ms (the target is at most
//! 1 s), how many there were, and the slowest.
//!
//! Run: `cargo build --release && cargo bench -p mqlb-tests --bench failover`
//! (`MQLB_FAULT=kill|leader|stop` runs one fault only).

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

const ROUNDS: usize = 3;
/// How long the publisher runs after the fault.
const AFTER: Duration = Duration::from_secs(10);
const SLOW: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillFollower,
    KillLeader,
    StopFollower,
}

async fn leader(c: &TestCluster) -> String {
    loop {
        for n in &c.nodes {
            if let Some((200, body)) = mqlb_tests::try_http(&n.admin, "GET", "/cluster").await {
                if let Some(l) = body
                    .split("\"leader\":\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                {
                    return l.to_string();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One round: returns (time in slow PUBACKs, their count, the slowest,
/// PUBACKs in all after the fault).
async fn round(fault: Fault) -> (Duration, usize, Duration, usize) {
    let mut c = TestCluster::start(3, &[]);
    assert!(c.wait_converged(Duration::from_secs(20)).await);
    let leader = leader(&c).await;
    let names: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
    let victim = match fault {
        Fault::KillLeader => leader.clone(),
        _ => names.iter().find(|n| **n != leader).unwrap().clone(),
    };
    let vi = names.iter().position(|n| *n == victim).unwrap();
    let pi = (vi + 1) % 3;
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    let sub_id = c.id_owned_by(&victim, "stall-sub", &all);
    let pub_id = c.id_owned_by(&names[pi], "stall-pub", &all);
    let mut cp = connect_packet(&sub_id, ProtocolVersion::V5, false);
    cp.clean_start = false;
    cp.properties.session_expiry_interval = Some(600);
    let (mut s, _) = Client::connect(&c.nodes[vi].addr, cp).await;
    s.subscribe("stall/#", qos(QoS::AtLeastOnce)).await;
    // The subscriber reads (and acknowledges) until its node fails.
    let reader = tokio::spawn(async move {
        while s
            .next_publish(Duration::from_secs(30), true)
            .await
            .is_some()
        {}
    });
    let (mut p, _) = Client::connect(
        &c.nodes[pi].addr,
        connect_packet(&pub_id, ProtocolVersion::V5, true),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut fault_at = None;
    let started = Instant::now();
    let (mut slow_total, mut slow, mut worst, mut after) = (Duration::ZERO, 0, Duration::ZERO, 0);
    let mut i = 0u32;
    loop {
        if fault_at.is_none() && started.elapsed() > Duration::from_secs(2) {
            match fault {
                Fault::StopFollower => {
                    let _ = std::process::Command::new("kill")
                        .args(["-STOP", &c.nodes[vi].pid().unwrap().to_string()])
                        .status();
                }
                _ => c.kill(vi),
            }
            fault_at = Some(Instant::now());
        }
        if fault_at.is_some_and(|t| t.elapsed() > AFTER) {
            break;
        }
        i += 1;
        let pid = PacketId::new(u16::try_from(i % 60000 + 1).unwrap()).unwrap();
        let t = Instant::now();
        p.send(Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: MqttStr::try_from("stall/x").unwrap(),
            packet_id: Some(pid),
            properties: Properties::default(),
            payload: bytes::Bytes::from(format!("{i}")),
        }))
        .await;
        loop {
            match p.recv(Duration::from_secs(30)).await {
                Some(Packet::Puback(Ack { packet_id, .. })) if packet_id == pid => break,
                Some(_) => {}
                None => panic!("the publisher lost its PUBACK (or its connection)"),
            }
        }
        let took = t.elapsed();
        if fault_at.is_some() {
            after += 1;
            worst = worst.max(took);
            if took > SLOW {
                slow += 1;
                slow_total += took;
            }
        }
    }
    if fault == Fault::StopFollower {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &c.nodes[vi].pid().unwrap().to_string()])
            .status();
    }
    reader.abort();
    (slow_total, slow, worst, after)
}

fn median<T: Ord + Copy>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!(
        "Sequential QoS 1 publisher on a survivor, persistent QoS 1 subscriber on the failed node; {} s after the fault, {ROUNDS} rounds (medians)",
        AFTER.as_secs()
    );
    println!(
        "{:<28} {:>16} {:>12} {:>12} {:>10}",
        "fault", "in slow PUBACKs", "slow (>100ms)", "slowest", "PUBACKs"
    );
    for (fault, name) in [
        (Fault::KillFollower, "kill -9, not the leader"),
        (Fault::KillLeader, "kill -9 of the leader"),
        (Fault::StopFollower, "SIGSTOP, not the leader"),
    ] {
        // MQLB_FAULT=kill|leader|stop runs one fault only.
        let only = std::env::var("MQLB_FAULT").unwrap_or_default();
        let tag = match fault {
            Fault::KillFollower => "kill",
            Fault::KillLeader => "leader",
            Fault::StopFollower => "stop",
        };
        if !only.is_empty() && only != tag {
            continue;
        }
        let mut runs = Vec::new();
        for _ in 0..ROUNDS {
            runs.push(round(fault).await);
        }
        let total = median(runs.iter().map(|r| r.0).collect());
        let count = median(runs.iter().map(|r| r.1).collect());
        let worst = median(runs.iter().map(|r| r.2).collect());
        let acks = median(runs.iter().map(|r| r.3).collect());
        println!(
            "{name:<28} {:>14} ms {count:>12} {:>9} ms {acks:>10}",
            total.as_millis(),
            worst.as_millis()
        );
    }
}
