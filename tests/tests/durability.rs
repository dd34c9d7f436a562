//! `--data-dir`: what a node acknowledged survives `kill -9` (the whole
//! process gone at once, as in a power loss), and the faults a data
//! directory must survive, over real sockets: a full disk, a failed fsync,
//! a corrupt record, a second process on the same directory.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used
)]

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use mqlb_protocol::{Ack, MqttStr, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS};
use mqlb_statestore::resp3::array as resp;
use mqlb_tests::client::{connect_packet, qos, Client};
use mqlb_tests::statestore::{hlc, Caller, T};
use mqlb_tests::{mqlb_bin, scratch_dir, BrokerProcess, OurBroker};

/// A v5 CONNECT for a session kept an hour after its connection.
fn persistent(id: &str) -> mqlb_protocol::Connect {
    let mut c = connect_packet(id, ProtocolVersion::V5, false);
    c.properties.session_expiry_interval = Some(3600);
    c
}

fn publish(topic: &str, q: QoS, pid: u16, retain: bool, payload: &[u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: q,
        retain,
        topic: MqttStr::try_from(topic).unwrap(),
        packet_id: (q != QoS::AtMostOnce).then(|| PacketId::new(pid).unwrap()),
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload),
    })
}

/// A QoS 2 PUBLISH sent again (DUP) by a publisher that never had its
/// PUBREC.
fn resent(topic: &str, pid: u16, payload: &[u8]) -> Packet {
    match publish(topic, QoS::ExactlyOnce, pid, false, payload) {
        Packet::Publish(mut p) => {
            p.dup = true;
            Packet::Publish(p)
        }
        other => other,
    }
}

/// The reason code of the acknowledgement (PUBACK or PUBREC) of `pid`;
/// `None` if none came within `within` or the connection closed.
async fn ack_of(c: &mut Client, pid: u16, within: Duration) -> Option<u8> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv(left).await? {
            Packet::Puback(a) | Packet::Pubrec(a) if a.packet_id.get() == pid => {
                return Some(a.reason.0)
            }
            _ => {}
        }
    }
}

/// One node with a data directory is filled (an offline persistent
/// subscriber with 200 acknowledged QoS 1 messages, a QoS 2 publish
/// acknowledged but not yet released, a retained message, state store
/// keys with a lease and a fencing token), killed with SIGKILL and
/// restarted on the directory: everything is there, and the QoS 2
/// message is delivered exactly once.
#[tokio::test]
async fn a_killed_node_restarts_with_everything_it_acknowledged() {
    let dir = scratch_dir("durable");
    let data = dir.to_str().unwrap().to_string();
    let mut b = BrokerProcess::start(&["--data-dir", &data]);

    let (mut keeper, ack) = Client::connect(&b.addr, persistent("keeper")).await;
    assert!(!ack.session_present);
    assert_eq!(keeper.subscribe("d/#", qos(QoS::AtLeastOnce)).await, [1]);
    assert_eq!(keeper.subscribe("q2/#", qos(QoS::ExactlyOnce)).await, [2]);
    keeper.send(Packet::Disconnect(Default::default())).await;
    drop(keeper);

    let (mut p, _) = Client::connect(&b.addr, persistent("publisher")).await;
    for i in 0..200u16 {
        p.send(publish(
            "d/x",
            QoS::AtLeastOnce,
            i + 1,
            false,
            format!("m{i}").as_bytes(),
        ))
        .await;
        assert_eq!(ack_of(&mut p, i + 1, T).await, Some(0), "message {i}");
    }
    p.send(publish("r/1", QoS::AtLeastOnce, 300, true, b"kept"))
        .await;
    assert_eq!(ack_of(&mut p, 300, T).await, Some(0));
    // QoS 2: PUBREC received, PUBREL never sent before the power goes.
    p.send(publish("q2/x", QoS::ExactlyOnce, 400, false, b"once"))
        .await;
    assert_eq!(ack_of(&mut p, 400, T).await, Some(0));

    let mut ss = Caller::new(&b.addr, "ss-durable").await;
    assert_eq!(ss.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");
    assert_eq!(
        ss.call(&[b"SET", b"lease", b"holder-1", b"NX", b"PX", b"600000"])
            .await,
        b"+OK\r\n"
    );
    let (older, newer) = (hlc(-2000), hlc(-1000));
    let fenced = |c: &Caller, ft: &str| c.props(b"f", Some(hlc(0)), Some(ft.to_string()));
    let props = fenced(&ss, &newer);
    let (_, r) = ss
        .call_with(
            resp(&[b"SET", b"fenced", b"by-newer"]),
            QoS::AtLeastOnce,
            props,
            T,
        )
        .await;
    assert_eq!(r.unwrap().payload.to_vec(), b"+OK\r\n");
    drop(ss);
    drop(p);

    b.kill();
    let b = BrokerProcess::start(&["--data-dir", &data]);

    // The session, its queue in order, nothing lost.
    let (mut keeper, ack) = Client::connect(&b.addr, persistent("keeper")).await;
    assert!(ack.session_present, "the session did not survive");
    for i in 0..200 {
        let m = keeper
            .next_publish(T, true)
            .await
            .unwrap_or_else(|| panic!("message {i} lost"));
        assert_eq!(m.topic.as_str(), "d/x");
        assert_eq!(m.payload, format!("m{i}").as_bytes(), "out of order");
    }
    // The QoS 2 message: the publisher sends it again (DUP) and releases
    // it; the subscriber gets it once.
    let (mut p, ack) = Client::connect(&b.addr, persistent("publisher")).await;
    assert!(ack.session_present);
    p.send(resent("q2/x", 400, b"once")).await;
    assert_eq!(ack_of(&mut p, 400, T).await, Some(0));
    p.send(Packet::Pubrel(Ack::new(PacketId::new(400).unwrap())))
        .await;
    let m = keeper
        .next_publish(T, true)
        .await
        .expect("the QoS 2 message");
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("q2/x", &b"once"[..]));
    assert!(
        keeper
            .next_publish(Duration::from_millis(500), true)
            .await
            .is_none(),
        "a message came twice"
    );

    // The retained message.
    let (mut fresh, _) =
        Client::connect(&b.addr, connect_packet("fresh", ProtocolVersion::V5, true)).await;
    fresh.subscribe("r/#", qos(QoS::AtLeastOnce)).await;
    let m = fresh
        .next_publish(T, true)
        .await
        .expect("the retained message");
    assert_eq!(&m.payload[..], b"kept");

    // The state store: keys, the lease, and the fencing token's guard.
    let mut ss = Caller::new(&b.addr, "ss-durable-2").await;
    assert_eq!(ss.call(&[b"GET", b"k"]).await, b"$1\r\nv\r\n");
    assert_eq!(ss.call(&[b"GET", b"lease"]).await, b"$8\r\nholder-1\r\n");
    assert_eq!(
        ss.call(&[b"SET", b"lease", b"holder-2", b"NX", b"PX", b"600000"])
            .await,
        b":-1\r\n",
        "the lease was lost: another holder took it"
    );
    let props = fenced(&ss, &older);
    let (_, r) = ss
        .call_with(
            resp(&[b"SET", b"fenced", b"stale"]),
            QoS::AtLeastOnce,
            props,
            T,
        )
        .await;
    assert_eq!(
        r.unwrap().payload.to_vec(),
        b"-ERR the request fencing token is a lower version than the fencing token protecting the resource\r\n"
    );
    assert_eq!(ss.call(&[b"GET", b"fenced"]).await, b"$8\r\nby-newer\r\n");
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A QoS 2 message a subscriber was given and released before a
/// `kill -9`, whose publisher never had its PUBREC (it died too): after the
/// restart the publisher sends it again (DUP) and the subscriber does not
/// get it twice. The restarted node routes a resent QoS 2 message again to
/// the sessions it read back (the node that routed it may have died midway
/// in a cluster), each once by what its records show it was given; the
/// previous build knew only what was still queued, and delivered this one
/// again (found by the simulator with data directories, seed 1164).
#[tokio::test]
async fn a_qos2_message_released_before_a_kill_is_not_given_again_on_its_resend() {
    let dir = scratch_dir("durable-q2-resend");
    let data = dir.to_str().unwrap().to_string();
    let mut b = BrokerProcess::start(&["--data-dir", &data]);

    let (mut sub, _) = Client::connect(&b.addr, persistent("sub-q2")).await;
    assert_eq!(sub.subscribe("q2/#", qos(QoS::ExactlyOnce)).await, [2]);
    let (mut p, _) = Client::connect(&b.addr, persistent("pub-q2")).await;
    p.send(publish("q2/x", QoS::ExactlyOnce, 7, false, b"once"))
        .await;
    assert_eq!(ack_of(&mut p, 7, T).await, Some(0));
    // The subscriber takes it and releases it (PUBREC, PUBREL, PUBCOMP).
    let m = sub.next_publish(T, true).await.expect("the QoS 2 message");
    assert_eq!(&m.payload[..], b"once");
    assert!(sub
        .next_publish(Duration::from_millis(300), true)
        .await
        .is_none());
    sub.send(Packet::Disconnect(Default::default())).await;
    drop(sub);
    drop(p);
    // Let the PUBCOMP's change reach the disk before the kill.
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.kill();

    let b = BrokerProcess::start(&["--data-dir", &data]);
    let (mut sub, ack) = Client::connect(&b.addr, persistent("sub-q2")).await;
    assert!(ack.session_present);
    // The publisher never saw its PUBREC: it sends the message again.
    let (mut p, ack) = Client::connect(&b.addr, persistent("pub-q2")).await;
    assert!(ack.session_present);
    p.send(resent("q2/x", 7, b"once")).await;
    assert_eq!(ack_of(&mut p, 7, T).await, Some(0));
    p.send(Packet::Pubrel(Ack::new(PacketId::new(7).unwrap())))
        .await;
    let twice = sub.next_publish(Duration::from_secs(1), true).await;
    assert!(
        twice.is_none(),
        "a QoS 2 message released before the kill was given again: {twice:?}"
    );
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A broker with its data directory in `dir`, in this process (so a test
/// can inject disk faults through its store).
async fn in_process(dir: &std::path::Path) -> OurBroker {
    OurBroker::start_with(mqlb_config::broker::BrokerConfig {
        data_dir: Some(dir.to_path_buf()),
        ..Default::default()
    })
    .await
}

/// A full disk: the publish whose write failed waits (its write is
/// retried, never skipped), new QoS 1/2 publishes are refused with 0x97
/// (a 3.1.1 client is disconnected), QoS 0 deliveries go on, and once
/// there is room the waiting publish is acknowledged and kept; the
/// refused one never reaches the session.
#[tokio::test]
async fn a_full_disk_refuses_new_publishes_and_keeps_the_rest() {
    let dir = scratch_dir("durable-full");
    let b = in_process(&dir).await;
    let addr = b.addr.to_string();
    let (mut keeper, _) = Client::connect(&addr, persistent("full-keeper")).await;
    keeper.subscribe("d/#", qos(QoS::AtLeastOnce)).await;
    keeper.send(Packet::Disconnect(Default::default())).await;
    drop(keeper);
    let (mut live, _) = Client::connect(
        &addr,
        connect_packet("full-live", ProtocolVersion::V5, true),
    )
    .await;
    live.subscribe("live/#", qos(QoS::AtMostOnce)).await;

    let (mut p, _) = Client::connect(&addr, persistent("full-pub")).await;
    let disk = b.state.disk().expect("a data directory").clone();
    disk.faults()
        .fail_writes(Some(std::io::ErrorKind::StorageFull));
    p.send(publish("d/x", QoS::AtLeastOnce, 1, false, b"waits"))
        .await;
    assert_eq!(ack_of(&mut p, 1, Duration::from_millis(700)).await, None);
    assert!(b.state.disk_full());

    let (mut p2, _) = Client::connect(
        &addr,
        connect_packet("full-pub-2", ProtocolVersion::V5, true),
    )
    .await;
    p2.send(publish("d/x", QoS::AtLeastOnce, 2, false, b"refused"))
        .await;
    assert_eq!(ack_of(&mut p2, 2, T).await, Some(0x97));
    p2.send(publish("d/x", QoS::ExactlyOnce, 3, false, b"refused"))
        .await;
    assert_eq!(ack_of(&mut p2, 3, T).await, Some(0x97));
    let (mut old, _) = Client::connect(
        &addr,
        connect_packet("full-311", ProtocolVersion::V3_1_1, true),
    )
    .await;
    old.send(publish("d/x", QoS::AtLeastOnce, 4, false, b"refused"))
        .await;
    assert_eq!(ack_of(&mut old, 4, T).await, None, "3.1.1 is disconnected");

    // A persistent session cannot attach (its attach must be kept).
    let mut c = persistent("full-new");
    c.properties.session_expiry_interval = Some(60);
    let (_, ack) = Client::connect(&addr, c).await;
    assert_eq!(ack.reason.0, 0x97);

    p2.send(publish("live/x", QoS::AtMostOnce, 0, false, b"goes on"))
        .await;
    let m = live
        .next_publish(T, true)
        .await
        .expect("QoS 0 delivery while full");
    assert_eq!(&m.payload[..], b"goes on");

    disk.faults().fail_writes(None);
    assert_eq!(
        ack_of(&mut p, 1, T).await,
        Some(0),
        "acknowledged once written"
    );
    assert!(!b.state.disk_full());
    let body = b.state.render_metrics();
    let m = mqlb_tests::exposition::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let value =
        |k: &str| mqlb_tests::exposition::sample(&m, k).unwrap_or_else(|| panic!("{k}: {body}"));
    assert!(value("mqlb_broker_disk_refused_total") >= 4.0);
    assert!(value("mqlb_broker_disk_write_errors_total") >= 1.0);
    assert_eq!(value("mqlb_broker_disk_full"), 0.0);
    drop((p, p2, old, live, disk));
    let mut b = b;
    b.begin_shutdown();
    assert!(b.finished(Duration::from_secs(10)).await);
    drop(b);

    let b = in_process(&dir).await;
    let (mut keeper, ack) = Client::connect(&b.addr.to_string(), persistent("full-keeper")).await;
    assert!(ack.session_present);
    let m = keeper
        .next_publish(T, true)
        .await
        .expect("the publish that waited");
    assert_eq!(&m.payload[..], b"waits");
    assert!(
        keeper
            .next_publish(Duration::from_millis(500), true)
            .await
            .is_none(),
        "a refused publish was kept"
    );
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A failed fsync: the publish is never acknowledged, its connection is
/// closed, and the node stops (it could acknowledge nothing more), with
/// an error for the process to exit on.
#[tokio::test]
async fn a_failed_fsync_stops_the_node() {
    let dir = scratch_dir("durable-fsync");
    let mut b = in_process(&dir).await;
    let addr = b.addr.to_string();
    let (mut keeper, _) = Client::connect(&addr, persistent("fsync-keeper")).await;
    keeper.subscribe("d/#", qos(QoS::AtLeastOnce)).await;
    b.state
        .disk()
        .expect("a data directory")
        .faults()
        .fail_syncs();
    let (mut p, _) = Client::connect(&addr, persistent("fsync-pub")).await;
    p.send(publish("d/x", QoS::AtLeastOnce, 1, false, b"never"))
        .await;
    assert_eq!(
        ack_of(&mut p, 1, T).await,
        None,
        "acknowledged without fsync"
    );
    assert!(
        b.finished(Duration::from_secs(10)).await,
        "the node kept serving on a failed data directory"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `mqlb broker` on `data` and returns its exit status and
/// standard error if it exits within 10 s (`None`: still running, killed).
fn run_broker(data: &str, extra: &[&str]) -> Option<(std::process::ExitStatus, String)> {
    let port = mqlb_tests::free_port();
    let mut child = Command::new(mqlb_bin())
        .args([
            "broker",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            data,
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            return Some((
                out.status,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        if mqlb_tests::wait_listening(&format!("127.0.0.1:{port}"), Duration::from_millis(50)) {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A flipped byte in the log: the node refuses to start, naming the file
/// and offset and `--repair`; with `--repair` it starts, and what it cut
/// is kept aside in a `.corrupt` file. A second process on a directory in
/// use is refused, and so is a directory of another format.
#[tokio::test]
async fn corruption_a_second_process_and_a_foreign_format_are_refused() {
    let dir = scratch_dir("durable-corrupt");
    let data = dir.to_str().unwrap().to_string();
    let mut b = BrokerProcess::start(&["--data-dir", &data]);

    // A second process on the same directory.
    let (status, err) = run_broker(&data, &[]).expect("the second process should exit");
    assert!(!status.success());
    assert!(err.contains("in use by another process"), "{err}");

    let (mut p, _) = Client::connect(&b.addr, persistent("corrupt-pub")).await;
    for i in 0..20u16 {
        p.send(publish(
            "r/x",
            QoS::AtLeastOnce,
            i + 1,
            true,
            b"retained value",
        ))
        .await;
        assert_eq!(ack_of(&mut p, i + 1, T).await, Some(0));
    }
    b.kill();

    // Flip a byte in the middle of the newest non-empty segment.
    let mut logs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
        .collect();
    logs.sort();
    let seg = logs.pop().expect("a segment with records");
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&seg, &bytes).unwrap();

    let (status, err) = run_broker(&data, &[]).expect("a corrupt directory must stop the start");
    assert!(!status.success());
    assert!(
        err.contains("corrupt data in")
            && err.contains(seg.to_str().unwrap())
            && err.contains("offset"),
        "{err}"
    );
    assert!(err.contains("--repair"), "{err}");

    assert!(
        run_broker(&data, &["--repair"]).is_none(),
        "--repair should start the node"
    );
    let aside = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .to_string_lossy()
                .ends_with(".corrupt")
        })
        .count();
    assert!(aside >= 1, "what was cut is kept aside");
    // Repaired: it starts without --repair too.
    assert!(run_broker(&data, &[]).is_none());

    std::fs::write(dir.join("FORMAT"), "mqlb-data 99\n").unwrap();
    let (status, err) = run_broker(&data, &[]).expect("a foreign format must stop the start");
    assert!(!status.success());
    assert!(err.contains("format"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `POST /data/backup` on a node's admin API copies its data directory
/// consistently while it serves; a node started on the copy has what was
/// acknowledged before the call.
#[tokio::test]
async fn an_online_backup_restores() {
    let dir = scratch_dir("durable-backup");
    let data = dir.to_str().unwrap().to_string();
    let admin = format!("127.0.0.1:{}", mqlb_tests::free_port());
    let token = mqlb_tests::admin_token_file();
    let b = BrokerProcess::start(&[
        "--data-dir",
        &data,
        "--admin",
        &admin,
        "--admin-token-file",
        token.to_str().unwrap(),
    ]);
    let (mut p, _) = Client::connect(&b.addr, persistent("backup-pub")).await;
    p.send(publish("r/b", QoS::AtLeastOnce, 1, true, b"before"))
        .await;
    assert_eq!(ack_of(&mut p, 1, T).await, Some(0));
    let (status, body) = mqlb_tests::http(&admin, "POST", "/data/backup").await;
    assert_eq!(status, 200, "{body}");
    let copy = body.trim().to_string();
    assert!(copy.starts_with(&data), "{copy}");
    p.send(publish("r/b", QoS::AtLeastOnce, 2, true, b"after"))
        .await;
    assert_eq!(ack_of(&mut p, 2, T).await, Some(0));
    drop(b);

    let restored = BrokerProcess::start(&["--data-dir", &copy]);
    let (mut c, _) = Client::connect(
        &restored.addr,
        connect_packet("reader", ProtocolVersion::V5, true),
    )
    .await;
    c.subscribe("r/#", qos(QoS::AtLeastOnce)).await;
    let m = c.next_publish(T, true).await.expect("the retained message");
    assert_eq!(&m.payload[..], b"before");
    drop(restored);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Connects through `addr` (a balancer whose backends may still be coming
/// back), retrying for up to 30 s.
async fn connect_retrying(
    addr: &str,
    c: mqlb_protocol::Connect,
) -> (Client, mqlb_protocol::Connack) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match Client::try_connect(addr, c.clone()).await {
            Some((client, ack)) if ack.reason.0 == 0 => return (client, ack),
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "{} not accepted: {:?}",
                c.client_id,
                other.map(|(_, a)| a)
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Three nodes, each with its own data directory, behind the balancer:
/// persistent subscribers spread over the nodes, acknowledged QoS 1 and
/// QoS 2 messages queued for them, a retained message and a state store
/// key; then every node is killed at once (a site-wide power loss) and
/// restarted. Every acknowledged message is delivered, in order, the QoS 2
/// ones exactly once, and the retained message and the key are there.
#[tokio::test]
async fn a_whole_cluster_killed_at_once_loses_nothing_acknowledged() {
    const SUBS: usize = 6;
    const PER_SUB: u16 = 40;
    let dirs: Vec<String> = (1..=3)
        .map(|i| scratch_dir(&format!("durable-n{i}")).display().to_string())
        .collect();
    let mut c = mqlb_tests::cluster::TestCluster::start_each(3, &|i| {
        vec!["--data-dir".into(), dirs[i].clone()]
    });
    assert!(
        c.wait_converged(Duration::from_secs(30)).await,
        "no cluster"
    );
    let backends: Vec<(&str, String)> = c
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.addr.clone()))
        .collect();
    let lb = mqlb_tests::RunningBalancer::start(mqlb_tests::config(
        &backends,
        "[health]\ninterval = \"250ms\"\ntimeout = \"500ms\"\nfall = 2\nrise = 2\njitter = \"0ms\"\n",
    ))
    .await;
    let addr = lb.addr.to_string();

    for i in 0..SUBS {
        let (mut s, _) = connect_retrying(&addr, persistent(&format!("site-sub-{i}"))).await;
        assert_eq!(
            s.subscribe(&format!("k/{i}"), qos(QoS::AtLeastOnce)).await,
            [1]
        );
        assert_eq!(
            s.subscribe(&format!("q2/{i}"), qos(QoS::ExactlyOnce)).await,
            [2]
        );
        s.send(Packet::Disconnect(Default::default())).await;
    }
    let (mut p, _) = connect_retrying(&addr, persistent("site-pub")).await;
    let mut pid = 0u16;
    for n in 0..PER_SUB {
        for i in 0..SUBS {
            pid += 1;
            p.send(publish(
                &format!("k/{i}"),
                QoS::AtLeastOnce,
                pid,
                false,
                format!("{n}").as_bytes(),
            ))
            .await;
            assert_eq!(ack_of(&mut p, pid, T).await, Some(0), "k/{i} #{n}");
        }
    }
    for i in 0..SUBS {
        pid += 1;
        p.send(publish(
            &format!("q2/{i}"),
            QoS::ExactlyOnce,
            pid,
            false,
            b"once",
        ))
        .await;
        assert_eq!(ack_of(&mut p, pid, T).await, Some(0));
        p.send(Packet::Pubrel(Ack::new(PacketId::new(pid).unwrap())))
            .await;
    }
    pid += 1;
    p.send(publish("r/site", QoS::AtLeastOnce, pid, true, b"kept"))
        .await;
    assert_eq!(ack_of(&mut p, pid, T).await, Some(0));
    let mut ss = Caller::new(&addr, "site-ss").await;
    assert_eq!(
        ss.call(&[b"SET", b"site-key", b"site-value"]).await,
        b"+OK\r\n"
    );
    drop((p, ss));

    // The power goes: every node at once.
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.start_node(i);
    }
    assert!(
        c.wait_converged(Duration::from_secs(60)).await,
        "the cluster did not come back: {}",
        c.log(0)
    );

    for i in 0..SUBS {
        let (mut s, ack) = connect_retrying(&addr, persistent(&format!("site-sub-{i}"))).await;
        assert!(ack.session_present, "site-sub-{i}: the session was lost");
        let mut qos1 = Vec::new();
        let mut qos2 = 0;
        while let Some(m) = s.next_publish(Duration::from_secs(3), true).await {
            if m.topic.as_str().starts_with("k/") {
                qos1.push(String::from_utf8_lossy(&m.payload).into_owned());
            } else {
                qos2 += 1;
            }
        }
        let want: Vec<String> = (0..PER_SUB).map(|n| n.to_string()).collect();
        assert_eq!(
            qos1, want,
            "site-sub-{i}: QoS 1 messages lost or out of order"
        );
        assert_eq!(qos2, 1, "site-sub-{i}: the QoS 2 message not exactly once");
    }
    let (mut fresh, _) = connect_retrying(
        &addr,
        connect_packet("site-fresh", ProtocolVersion::V5, true),
    )
    .await;
    fresh.subscribe("r/#", qos(QoS::AtLeastOnce)).await;
    let m = fresh
        .next_publish(T, true)
        .await
        .expect("the retained message");
    assert_eq!(&m.payload[..], b"kept");
    let mut ss = Caller::new(&addr, "site-ss-2").await;
    assert_eq!(
        ss.call(&[b"GET", b"site-key"]).await,
        b"$10\r\nsite-value\r\n"
    );
    drop(lb);
}

/// A will waiting out its Will Delay when the power goes is still sent,
/// when it is due, after the restart.
#[tokio::test]
async fn a_pending_will_survives_a_restart() {
    let dir = scratch_dir("durable-will");
    let data = dir.to_str().unwrap().to_string();
    let mut b = BrokerProcess::start(&["--data-dir", &data]);
    let mut c = persistent("willer");
    c.will = Some(mqlb_tests::client::will("will/willer", "gone", Some(3)));
    let (w, ack) = Client::connect(&b.addr, c).await;
    assert_eq!(ack.reason.0, 0);
    // The connection drops without DISCONNECT: the will waits 3 s.
    drop(w);
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.kill();
    let b = BrokerProcess::start(&["--data-dir", &data]);
    let (mut watch, _) = Client::connect(
        &b.addr,
        connect_packet("will-watch", ProtocolVersion::V5, true),
    )
    .await;
    watch.subscribe("will/#", qos(QoS::AtLeastOnce)).await;
    let m = watch
        .next_publish(Duration::from_secs(8), true)
        .await
        .expect("the pending will was lost");
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("will/willer", &b"gone"[..])
    );
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}
