//! `mqlb demo` (what `cargo run --release` starts): three bundled broker
//! nodes in a cluster behind the balancer, on loopback, with nothing to
//! configure.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used,
    missing_docs
)]

use std::process::{Command, Stdio};
use std::time::Duration;

use mqlb_protocol::{Properties, ProtocolVersion, QoS};
use mqlb_tests::client::{connect_packet, qos, Client};
use mqlb_tests::{mqlb_bin, try_http, wait_listening, wait_until, KillOnDrop};

/// A base port with `n` free ports after it, below Linux's ephemeral range
/// (32768 and up): a port picked there could be taken by any outgoing
/// connection between this check and the demo's bind (a node that never
/// listened, now and then).
fn free_run(n: u16) -> u16 {
    loop {
        let base = 20_000 + fastrand::u16(..12_000);
        let free = (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
    }
}

#[tokio::test]
async fn the_demo_serves_through_a_three_node_cluster_and_stops_cleanly() {
    let port = free_run(4);
    let admin = free_run(4);
    let cluster = free_run(3);
    let log_dir = mqlb_tests::scratch_dir("demo-log");
    let log_path = log_dir.join("stderr.log");
    let mut demo = KillOnDrop(
        Command::new(mqlb_bin())
            .args([
                "demo",
                "--port",
                &port.to_string(),
                "--admin-port",
                &admin.to_string(),
                "--cluster-port",
                &cluster.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()))
            .spawn()
            .unwrap(),
    );
    // Standard output, read as it comes: the banner is printed once the
    // balancer is ready, which may be after the traffic below has passed.
    let printed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    {
        let mut stdout = demo.0.stdout.take().unwrap();
        let printed = printed.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                printed
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    let mqtt = format!("127.0.0.1:{port}");
    assert!(
        wait_listening(&mqtt, Duration::from_secs(15)),
        "the balancer did not listen"
    );
    // Every node sees all three and is ready.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for i in 1..=3 {
        loop {
            let r = try_http(&format!("127.0.0.1:{}", admin + i), "GET", "/cluster").await;
            if r.as_ref().is_some_and(|(s, b)| {
                *s == 200 && b.contains("[\"n1\",\"n2\",\"n3\"]") && b.contains("\"ready\":true")
            }) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "node n{i}: {r:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A subscriber and a publisher through the balancer (on whichever
    // nodes their IDs place them), and one publishing to a node directly.
    // The balancer takes a node once its probes have passed `rise` times.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match Client::try_connect(&mqtt, connect_packet("demo-sub", ProtocolVersion::V5, true))
            .await
        {
            Some((s, ack)) if ack.reason.0 == 0 => break s,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                other.map(|(_, a)| a)
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    s.subscribe("demo/#", qos(QoS::AtLeastOnce)).await;
    let mut published = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    'outer: loop {
        for (addr, id) in [
            (mqtt.clone(), "demo-pub"),
            (format!("127.0.0.1:{}", port + 2), "demo-direct"),
        ] {
            let (mut p, _) =
                Client::connect(&addr, connect_packet(id, ProtocolVersion::V3_1_1, true)).await;
            p.publish(
                "demo/hello",
                id.as_bytes(),
                QoS::AtLeastOnce,
                false,
                Properties::default(),
            )
            .await;
            published += 1;
        }
        let mut got = Vec::new();
        while let Some(m) = s.next_publish(Duration::from_millis(500), true).await {
            got.push(String::from_utf8(m.payload.to_vec()).unwrap());
        }
        if got.contains(&"demo-pub".to_string()) && got.contains(&"demo-direct".to_string()) {
            break 'outer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after {published} publishes got {got:?}"
        );
    }
    // The banner told the user what to run (once the balancer is ready).
    let banner = wait_until(Duration::from_secs(20), || {
        printed.lock().unwrap().contains("mosquitto_sub -p")
    })
    .await;
    assert!(banner.is_some(), "no banner: {}", printed.lock().unwrap());
    // What the banner points at (the admin token, the nodes' TLS files and
    // data directories) stays while the demo runs: the banner's thread once
    // took the directory with it when it ended, a moment after printing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let scratch = std::env::temp_dir().join(format!("mqlb-demo-{}", demo.0.id()));
    assert!(
        scratch.join("admin.token").is_file(),
        "{} is gone while the demo runs",
        scratch.display()
    );
    // Ctrl-C (SIGINT) stops the demo and its nodes, all at once.
    let asked = std::time::Instant::now();
    Command::new("kill")
        .args(["-INT", &demo.0.id().to_string()])
        .status()
        .unwrap();
    let mut exited = false;
    for _ in 0..300 {
        if let Ok(Some(_)) = demo.0.try_wait() {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(exited, "the demo did not stop within 15 s");
    assert!(!scratch.exists(), "{} left behind", scratch.display());
    // The figure for docs/operations.md (not asserted: timing).
    eprintln!("the demo stopped {:?} after Ctrl-C", asked.elapsed());
    for i in 1..=3 {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port + i)).is_err(),
            "node n{i} still running after the demo stopped"
        );
    }
    // Everything it printed, the nodes' stop lines included.
    let _ = wait_until(Duration::from_secs(5), || {
        printed.lock().unwrap().matches(" stopped").count() >= 3
    })
    .await;
    let out = printed.lock().unwrap().clone();
    assert!(out.contains("mosquitto_sub -p"), "{out}");
    assert!(out.contains("kill -9"), "{out}");
    // A quiet start: no election steps, no backend found up (expected) or
    // down (the balancer waits for the nodes), no warnings.
    let log = std::fs::read_to_string(&log_path).unwrap();
    for noise in [
        "PreCandidate",
        "role=Candidate",
        "from=\"unknown\"",
        " WARN ",
        "lost the majority",
    ] {
        assert!(!log.contains(noise), "{noise:?} in the demo's log:\n{log}");
    }
    let _ = std::fs::remove_dir_all(&log_dir);
    // One line per node as it stops.
    for i in 1..=3 {
        assert_eq!(
            out.matches(&format!("node n{i} stopped")).count(),
            1,
            "{out}"
        );
    }
}

/// A demo ended by `kill -9` (or a crash, or a closed terminal) leaves no
/// node behind: they die with it and free their ports. A second demo on
/// ports that are taken says so and exits instead of starting nodes that
/// cannot bind.
#[tokio::test]
async fn a_killed_demo_leaves_no_node_behind_and_a_second_demo_says_its_ports_are_taken() {
    let port = free_run(4);
    let admin = free_run(4);
    let cluster = free_run(3);
    let args = |cmd: &mut Command| {
        cmd.args([
            "demo",
            "--port",
            &port.to_string(),
            "--admin-port",
            &admin.to_string(),
            "--cluster-port",
            &cluster.to_string(),
        ]);
    };
    let mut first = Command::new(mqlb_bin());
    args(&mut first);
    let mut demo = KillOnDrop(
        first
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for i in 1..=3 {
        assert!(
            wait_listening(&format!("127.0.0.1:{}", port + i), Duration::from_secs(15)),
            "node n{i} did not listen"
        );
    }
    // The balancer starts once the nodes are ready.
    assert!(
        wait_listening(&format!("127.0.0.1:{port}"), Duration::from_secs(30)),
        "the balancer did not listen"
    );
    // While it runs, a second demo on the same ports refuses to start.
    let mut second = Command::new(mqlb_bin());
    args(&mut second);
    let out = second.output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use") && err.contains(&port.to_string()),
        "{err}"
    );
    // kill -9 of the demo: every node dies with it.
    let _ = demo.0.kill();
    let _ = demo.0.wait();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for i in 1..=3 {
        while std::net::TcpStream::connect(("127.0.0.1", port + i)).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "node n{i} outlived its demo"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
