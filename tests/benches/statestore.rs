//! State store throughput and latency: sequential SET and GET requests
//! (RESP3 over MQTT 5, QoS 1, each waiting for its response) from one
//! client, to one `mqlb broker` directly, through `mqlb balance`, and to a
//! 3-node cluster through `mqlb balance` (keys on all three nodes, each
//! change applied by its chain before the answer), in one run on this
//! machine. Prints requests per second and p50/p99 of request →
//! response, medians of 3 interleaved rounds.
//!
//! Run: `cargo build --release && cargo bench -p mqlb-tests --bench statestore`

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used,
    missing_docs
)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mqlb_protocol::{Ack, MqttStr, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS};
use mqlb_tests::client::{connect_packet, qos, Client};
use mqlb_tests::{free_port, mqlb_bin, wait_listening, BrokerProcess, KillOnDrop};

const ROUNDS: usize = 3;
const N: usize = 3000;
const INVOKE: &str = "statestore/v1/FA9AE35F-2F64-47CD-9BFF-08E2B32A0FE8/command/invoke";

use mqlb_statestore::resp3::array as resp;

fn hlc() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    format!("{ms:015}:00000:bench")
}

/// `N` sequential requests made by `make(i)`: (requests/s, p50 µs, p99 µs).
async fn requests(c: &mut Client, make: impl Fn(usize) -> Vec<u8>) -> (f64, f64, f64) {
    let mut lat = Vec::with_capacity(N);
    let start = Instant::now();
    for i in 0..N {
        let pid = PacketId::new(u16::try_from(i % 60_000 + 1).unwrap()).unwrap();
        let t = Instant::now();
        c.send(Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: MqttStr::try_from(INVOKE).unwrap(),
            packet_id: Some(pid),
            properties: Properties {
                response_topic: Some(MqttStr::try_from("bench/resp").unwrap()),
                correlation_data: Some(Bytes::from(i.to_be_bytes().to_vec())),
                user_properties: vec![(
                    MqttStr::try_from("__ts").unwrap(),
                    MqttStr::try_from(hlc()).unwrap(),
                )],
                ..Properties::default()
            },
            payload: Bytes::from(make(i)),
        }))
        .await;
        // The PUBACK and the response, in either order.
        let (mut acked, mut answered) = (false, false);
        while !(acked && answered) {
            match c.recv(Duration::from_secs(10)).await.expect("stalled") {
                Packet::Puback(a) if a.packet_id == pid => acked = true,
                Packet::Publish(p) => {
                    if let Some(id) = p.packet_id {
                        c.send(Packet::Puback(Ack::new(id))).await;
                    }
                    answered = true;
                }
                _ => {}
            }
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let rate = N as f64 / start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    (rate, pct(0.5), pct(0.99))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let broker = BrokerProcess::start(&[]);
    let lport = free_port();
    let _lb = KillOnDrop(
        Command::new(mqlb_bin())
            .args(["balance", "--listen", &format!("127.0.0.1:{lport}")])
            .args(["--backend", &format!("b1={}", broker.addr)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run `cargo build --release` first"),
    );
    let lb = format!("127.0.0.1:{lport}");
    assert!(wait_listening(&lb, Duration::from_secs(5)));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut cluster = mqlb_tests::cluster::TestCluster::start(3, &[]);
    assert!(rt.block_on(cluster.wait_converged(Duration::from_secs(30))));
    let cport = free_port();
    let mut balance = Command::new(mqlb_bin());
    balance.args(["balance", "--listen", &format!("127.0.0.1:{cport}")]);
    for n in &cluster.nodes {
        balance.args(["--backend", &format!("{}={}", n.name, n.addr)]);
    }
    let _clb = KillOnDrop(
        balance
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run the balancer"),
    );
    let clb = format!("127.0.0.1:{cport}");
    assert!(wait_listening(&clb, Duration::from_secs(5)));
    let paths = [
        ("direct", broker.addr.clone()),
        ("through mqlb", lb),
        ("cluster", clb),
    ];
    // [path][SET rate, SET p50, SET p99, GET rate, GET p50, GET p99]
    let mut rows = vec![vec![Vec::new(); 6]; paths.len()];
    rt.block_on(async {
        for round in 0..ROUNDS {
            for (k, (name, addr)) in paths.iter().enumerate() {
                let id = format!("ss-bench-{round}-{k}");
                let (mut c, _) =
                    Client::connect(addr, connect_packet(&id, ProtocolVersion::V5, true)).await;
                c.subscribe("bench/resp", qos(QoS::AtLeastOnce)).await;
                let set = requests(&mut c, |i| {
                    resp(&[b"SET", format!("key-{}", i % 100).as_bytes(), &[0x5A; 64]])
                })
                .await;
                let get = requests(&mut c, |i| {
                    resp(&[b"GET", format!("key-{}", i % 100).as_bytes()])
                })
                .await;
                for (j, v) in [set.0, set.1, set.2, get.0, get.1, get.2]
                    .into_iter()
                    .enumerate()
                {
                    rows[k][j].push(v);
                }
                eprintln!("round {round} {name} done");
            }
        }
    });
    println!("\nsequential requests, 64-byte values, 100 keys; median of {ROUNDS} rounds");
    println!(
        "{:<14} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "", "SET/s", "SET p50", "SET p99", "GET/s", "GET p50", "GET p99"
    );
    for (k, (name, _)) in paths.iter().enumerate() {
        let m: Vec<f64> = rows[k].iter().map(|v| median(v.clone())).collect();
        println!(
            "{:<14} {:>10.0} {:>8.0}us {:>8.0}us {:>10.0} {:>8.0}us {:>8.0}us",
            name, m[0], m[1], m[2], m[3], m[4], m[5]
        );
    }
}
