//! Graceful shutdown under load, for the balancer and for the bundled
//! broker: SIGTERM (or Ctrl-C) stops accepting, then closes clients at the
//! eviction rate (v5 clients get DISCONNECT 0x8B), and no message a
//! publisher got an acknowledgement for is lost.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used
)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqlb_protocol::{Ack, MqttStr, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS};
use mqlb_tests::client::{connect_packet, qos, Client};
use mqlb_tests::*;

const SUBS: usize = 120;
const PUBS: usize = 8;

/// What one subscriber saw.
#[derive(Debug, Default)]
struct Seen {
    payloads: HashSet<String>,
    disconnect: Option<u8>,
    closed_at: Option<Instant>,
}

fn version(i: usize) -> ProtocolVersion {
    if i.is_multiple_of(2) {
        ProtocolVersion::V5
    } else {
        ProtocolVersion::V3_1_1
    }
}

/// A persistent-session CONNECT (v5 with a one-hour Session Expiry).
fn persistent(id: &str, v: ProtocolVersion) -> mqlb_protocol::Connect {
    let mut c = connect_packet(id, v, false);
    if v.is_v5() {
        c.properties.session_expiry_interval = Some(3600);
    }
    c
}

/// Receives until the connection closes, acknowledging QoS 1.
async fn subscriber(mut c: Client, seen: Arc<Mutex<Seen>>) {
    loop {
        match c.recv(Duration::from_secs(60)).await {
            Some(Packet::Publish(p)) => {
                seen.lock()
                    .unwrap()
                    .payloads
                    .insert(String::from_utf8_lossy(&p.payload).to_string());
                if let Some(id) = p.packet_id {
                    // A failed PUBACK means the broker closed; what it sent
                    // before closing (its DISCONNECT) is still to be read.
                    let _ = c.try_send(Packet::Puback(Ack::new(id))).await;
                }
            }
            Some(Packet::Disconnect(d)) => seen.lock().unwrap().disconnect = Some(d.reason.0),
            Some(_) => {}
            None => break,
        }
    }
    seen.lock().unwrap().closed_at = Some(Instant::now());
}

/// Publishes QoS 1 to its share of the subscribers' topics, one at a time,
/// recording what was acknowledged, until its connection closes.
async fn publisher(mut c: Client, k: usize, acked: Arc<Mutex<Vec<(usize, String)>>>) -> Instant {
    let mut seq = 0u32;
    loop {
        let i = (k + PUBS * seq as usize) % SUBS;
        let payload = format!("{i}:{k}:{seq}");
        let pid = PacketId::new((seq % 60_000 + 1) as u16).unwrap();
        let sent = c
            .try_send(Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: MqttStr::try_from(format!("gs/{i}")).unwrap(),
                packet_id: Some(pid),
                properties: Properties::default(),
                payload: Bytes::from(payload.clone()),
            }))
            .await;
        if !sent {
            return Instant::now();
        }
        loop {
            match c.recv(Duration::from_secs(60)).await {
                Some(Packet::Puback(a)) if a.packet_id == pid => {
                    acked.lock().unwrap().push((i, payload));
                    break;
                }
                Some(_) => {}
                None => return Instant::now(),
            }
        }
        seq += 1;
    }
}

use mqlb_tests::load::max_in_window as max_in;

/// Connects the subscribers and publishers to `addr`, runs traffic, calls
/// `stop`, and returns (close times since the stop, what each subscriber
/// saw, what was acknowledged to publishers).
async fn run_under_load(
    addr: &str,
    stop: impl std::future::Future<Output = ()>,
) -> (Vec<Duration>, Vec<Arc<Mutex<Seen>>>, Vec<(usize, String)>) {
    let mut seen = Vec::new();
    let mut subs = Vec::new();
    for i in 0..SUBS {
        let (mut c, ack) =
            Client::connect(addr, persistent(&format!("gs-sub-{i}"), version(i))).await;
        assert!(ack.reason.is_success());
        assert_eq!(
            c.subscribe(&format!("gs/{i}"), qos(QoS::AtLeastOnce)).await,
            [1]
        );
        let s = Arc::new(Mutex::new(Seen::default()));
        seen.push(s.clone());
        subs.push(tokio::spawn(subscriber(c, s)));
    }
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut pubs = Vec::new();
    for k in 0..PUBS {
        let (c, _) = Client::connect(
            addr,
            connect_packet(&format!("gs-pub-{k}"), version(k + 1), true),
        )
        .await;
        pubs.push(tokio::spawn(publisher(c, k, acked.clone())));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    stop.await;
    let mut closes = Vec::new();
    for p in pubs {
        let at = tokio::time::timeout(Duration::from_secs(30), p)
            .await
            .expect("publisher closed")
            .unwrap();
        closes.push(at - start);
    }
    for s in subs {
        tokio::time::timeout(Duration::from_secs(30), s)
            .await
            .expect("subscriber closed")
            .unwrap();
    }
    for s in &seen {
        closes.push(s.lock().unwrap().closed_at.unwrap() - start);
    }
    closes.sort();
    let acked = acked.lock().unwrap().clone();
    (closes, seen, acked)
}

/// Checks pacing against `rate` per second: no 100 ms window holds more
/// closes than the rate allows (closes are timed where the clients see
/// them, so a little scheduling noise is tolerated; without pacing all of
/// them land in one window), and the whole took about clients / rate.
fn assert_paced(closes: &[Duration], rate: usize) {
    let per_100ms = max_in(closes, Duration::from_millis(100));
    let span = *closes.last().unwrap();
    eprintln!(
        "{} closes over {span:?}, at most {per_100ms} in any 100 ms (rate {rate}/s)",
        closes.len()
    );
    assert!(
        per_100ms <= rate / 10 + rate / 40 + 2,
        "burst: {per_100ms} in 100 ms"
    );
    let expected = Duration::from_secs_f64((closes.len() - 1) as f64 / rate as f64);
    assert!(
        span >= expected.mul_f64(0.8),
        "closed in {span:?}, expected about {expected:?}"
    );
}

/// Every acknowledged message reached its subscriber, before the shutdown
/// or from its persistent session afterwards.
fn assert_nothing_acked_lost(
    acked: &[(usize, String)],
    seen: &[Arc<Mutex<Seen>>],
    after: &HashMap<usize, HashSet<String>>,
) {
    let mut lost = Vec::new();
    for (i, payload) in acked {
        let before = seen[*i].lock().unwrap().payloads.contains(payload);
        let later = after.get(i).is_some_and(|s| s.contains(payload));
        if !before && !later {
            lost.push(payload.clone());
        }
    }
    eprintln!("{} messages acknowledged, {} lost", acked.len(), lost.len());
    assert!(acked.len() > 100, "too little traffic: {}", acked.len());
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
}

/// Drains what each persistent session kept, directly from `addr`, all
/// subscribers at once.
async fn drain_sessions(addr: &str) -> HashMap<usize, HashSet<String>> {
    let mut tasks = Vec::new();
    for i in 0..SUBS {
        let addr = addr.to_string();
        tasks.push(tokio::spawn(async move {
            let (mut c, ack) =
                Client::connect(&addr, persistent(&format!("gs-sub-{i}"), version(i))).await;
            assert!(ack.session_present, "gs-sub-{i} lost its session");
            let mut got = HashSet::new();
            while let Some(p) = c.next_publish(Duration::from_millis(500), true).await {
                got.insert(String::from_utf8_lossy(&p.payload).to_string());
            }
            (i, got)
        }));
    }
    let mut after = HashMap::new();
    for t in tasks {
        let (i, got) = t.await.unwrap();
        after.insert(i, got);
    }
    after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancer_shutdown_is_paced_and_loses_no_acknowledged_message() {
    const RATE: usize = 200;
    let m = Mosquitto::start();
    let mut lb = RunningBalancer::start(config(
        &[("m", m.addr())],
        &format!(
            "[health]\nenabled = false\n[eviction]\nrate = {RATE}\nshutdown_grace = \"30s\"\n"
        ),
    ))
    .await;
    let addr = lb.addr.to_string();
    let (closes, seen, acked) = run_under_load(&addr, async { lb.begin_shutdown() }).await;
    assert_paced(&closes, RATE);
    assert!(
        lb.finished(Duration::from_secs(10)).await,
        "serve did not end"
    );
    // New connections are refused once shutting down.
    assert!(tokio::net::TcpStream::connect(&addr).await.is_err());
    // v5 clients were told why, at a packet boundary.
    for (i, s) in seen.iter().enumerate() {
        if version(i).is_v5() {
            assert_eq!(s.lock().unwrap().disconnect, Some(0x8B), "gs-sub-{i}");
        }
    }
    // The clients reconnect (here straight to the broker, as through another
    // balancer replica) and get what their sessions kept.
    let after = drain_sessions(&m.addr()).await;
    assert_nothing_acked_lost(&acked, &seen, &after);
}

/// Payloads a session holds (inflight or queued), from the broker's state.
fn held(b: &OurBroker, client_id: &str) -> HashSet<String> {
    let Some(s) = b.state.export_session(client_id) else {
        return HashSet::new();
    };
    s.inflight
        .iter()
        .map(|(_, m)| m)
        .chain(s.queued.iter())
        .map(|m| String::from_utf8_lossy(&m.publish.payload).to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_shutdown_is_paced_and_loses_no_acknowledged_message() {
    const RATE: u32 = 200;
    let mut b = OurBroker::start_with(mqlb_config::broker::BrokerConfig {
        shutdown_rate: RATE,
        ..Default::default()
    })
    .await;
    let addr = b.addr.to_string();
    let (closes, seen, acked) = run_under_load(&addr, async { b.begin_shutdown() }).await;
    assert_paced(&closes, RATE as usize);
    assert!(
        b.finished(Duration::from_secs(10)).await,
        "serve did not end"
    );
    assert!(tokio::net::TcpStream::connect(&addr).await.is_err());
    for (i, s) in seen.iter().enumerate() {
        if version(i).is_v5() {
            assert_eq!(s.lock().unwrap().disconnect, Some(0x8B), "gs-sub-{i}");
        }
    }
    // A single node has nowhere to hand sessions to, so what a subscriber
    // had not received yet must still be in its session at exit (the
    // cluster replicates exactly this).
    let after: HashMap<usize, HashSet<String>> = (0..SUBS)
        .map(|i| (i, held(&b, &format!("gs-sub-{i}"))))
        .collect();
    assert_nothing_acked_lost(&acked, &seen, &after);
}

/// A session that outlives the shutdown keeps its will; one that ends with
/// the connection publishes it (MQTT 5 3.1.2.5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_shutdown_keeps_the_wills_of_persistent_sessions() {
    let mut b = OurBroker::start().await;
    let addr = b.addr.to_string();
    let (mut watcher, _) =
        Client::connect(&addr, persistent("will-watcher", ProtocolVersion::V5)).await;
    watcher.subscribe("will/#", qos(QoS::AtLeastOnce)).await;
    let mut keeps = persistent("will-keeps", ProtocolVersion::V5);
    keeps.will = Some(mqlb_tests::client::will("will/keeps", "gone", None));
    let mut ends = connect_packet("will-ends", ProtocolVersion::V5, true);
    ends.will = Some(mqlb_tests::client::will("will/ends", "gone", None));
    let (_k, _) = Client::connect(&addr, keeps).await;
    let (_e, _) = Client::connect(&addr, ends).await;
    b.begin_shutdown();
    let mut got = HashSet::new();
    while let Some(p) = watcher.next_publish(Duration::from_secs(5), true).await {
        got.insert(p.topic.to_string());
    }
    assert!(b.finished(Duration::from_secs(10)).await);
    let session = b
        .state
        .export_session("will-watcher")
        .expect("watcher session kept");
    for (_, m) in &session.inflight {
        got.insert(m.publish.topic.to_string());
    }
    for m in &session.queued {
        got.insert(m.publish.topic.to_string());
    }
    assert!(got.contains("will/ends"), "{got:?}");
    assert!(!got.contains("will/keeps"), "{got:?}");
}

/// `mqlb broker` and `mqlb balance` processes: SIGTERM tells a v5 client
/// 0x8B and the process exits 0 on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_v5_clients_with_0x8b_and_exits_cleanly() {
    use tokio::io::AsyncWriteExt;
    let mut broker = BrokerProcess::start(&[]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut lb = KillOnDrop(
        std::process::Command::new(mqlb_bin())
            .args(["balance", "--listen", &addr, "--backend", &broker.addr])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_listening(&addr, Duration::from_secs(10)));
    // One client through the balancer, one straight to the broker.
    let (mut via_lb, ack) = raw::connect_and_ack(&addr, "term-lb", 5).await;
    assert_eq!(ack.get(3), Some(&0));
    let (mut direct, ack) = raw::connect_and_ack(&broker.addr, "term-direct", 5).await;
    assert_eq!(ack.get(3), Some(&0));
    let term = |pid: u32| {
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
    };
    term(lb.0.id());
    assert_eq!(
        raw::read_n(&mut via_lb, 3, Duration::from_secs(5)).await,
        [0xE0, 0x01, 0x8B]
    );
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = lb.0.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    })
    .await
    .unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "balancer exit: {status:?}"
    );
    term(broker.pid());
    assert_eq!(
        raw::read_n(&mut direct, 3, Duration::from_secs(5)).await,
        [0xE0, 0x01, 0x8B]
    );
    let _ = direct.shutdown().await;
    let status = broker.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "broker exit: {status:?}"
    );
}
