//! Health checking, session moves and the admin API, end to end: real
//! Mosquitto processes killed with SIGKILL or frozen with SIGSTOP, byte-level
//! v5 clients, and the `mqlb` binary's `check` and `healthcheck` commands.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used
)]

use std::process::Command;
use std::time::{Duration, Instant};

use mqlb_healthcheck::HealthState;
use mqlb_tests::raw::{closed, connect_and_ack, read_n};
use mqlb_tests::*;
use tokio::io::AsyncReadExt;

const T: Duration = Duration::from_secs(5);
/// interval 250 ms × fall 2 + timeout 500 ms, plus first-probe jitter.
const FAST_HEALTH: &str =
    "[health]\ninterval = \"250ms\"\ntimeout = \"500ms\"\nfall = 2\nrise = 2\njitter = \"0ms\"\n";
const DETECTION_BOUND: Duration = Duration::from_millis(250 * 2 + 500);

async fn cluster(extra: &str) -> (Vec<Mosquitto>, RunningBalancer) {
    let ms: Vec<Mosquitto> = (0..3).map(|_| Mosquitto::start()).collect();
    let backends: Vec<(&str, String)> = ["b1", "b2", "b3"]
        .iter()
        .zip(&ms)
        .map(|(n, m)| (*n, m.addr()))
        .collect();
    let lb = RunningBalancer::start(config(&backends, &format!("{FAST_HEALTH}{extra}"))).await;
    // All three are probed up before the test starts.
    wait_until(T, || {
        lb.shared
            .backends
            .snapshot()
            .iter()
            .all(|b| b.health_state() == HealthState::Up)
    })
    .await
    .expect("backends up");
    (ms, lb)
}

fn state(lb: &RunningBalancer, name: &str) -> HealthState {
    lb.shared.backends.get(name).unwrap().health_state()
}

/// A Mosquitto killed with SIGKILL is marked down within
/// interval × fall + timeout, and its client reconnects to another backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_broker_is_marked_down_in_time() {
    let (mut ms, lb) = cluster("").await;
    let id = ids_on(&lb, "b1", "k9", 1).remove(0);
    let (mut s, ack) = connect_and_ack(&lb.addr.to_string(), &id, 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    // Give the probe loop a moment to be mid-interval, as in production.
    tokio::time::sleep(Duration::from_millis(100)).await;
    ms[0].kill();
    let took = wait_until(T, || state(&lb, "b1") == HealthState::Down)
        .await
        .expect("marked down");
    eprintln!("SIGKILL detected in {took:?} (bound {DETECTION_BOUND:?})");
    // Measured from the kill; one interval of slack for scheduling on a busy box.
    assert!(
        // Slack for scheduling while the other tests here load the 2 cores.
        took <= DETECTION_BOUND + Duration::from_millis(500),
        "took {took:?}"
    );
    assert!(closed(&mut s, T).await);
    let (_s, ack) = connect_and_ack(&lb.addr.to_string(), &id, 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    let second = lb.shared.backends.candidates(id.as_bytes())[0].name.clone();
    assert_ne!(second, "b1");
    let i: usize = backend_index(&second);
    assert!(ms[i].saw_client(&id, T));
    // Placement skipped b1 without even trying to connect to it.
    let failures = lb.connect_failures("b1");
    assert_eq!(failures, 0);
    // The event says why it is down.
    let events = lb.shared.journal.events_json().to_string();
    assert!(
        events.contains("up -> down: ") && events.to_lowercase().contains("refused"),
        "{events}"
    );
    lb.stop().await;
}

/// A SIGSTOPped Mosquitto still completes TCP handshakes, but is marked down,
/// and its v5 client gets DISCONNECT 0x8B Server shutting down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_broker_is_marked_down_and_v5_client_told() {
    let (ms, lb) = cluster("").await;
    let id = ids_on(&lb, "b1", "stop", 1).remove(0);
    let (mut s, ack) = connect_and_ack(&lb.addr.to_string(), &id, 5).await;
    assert_eq!(&ack[..4], &[0x20, ack[1], 0x00, 0x00]);
    ms[0].signal("STOP");
    let took = wait_until(T, || state(&lb, "b1") == HealthState::Down)
        .await
        .expect("marked down");
    eprintln!("SIGSTOP detected in {took:?} (bound {DETECTION_BOUND:?})");
    assert!(
        // Slack for scheduling while the other tests here load the 2 cores.
        took <= DETECTION_BOUND + Duration::from_millis(500),
        "took {took:?}"
    );
    // The kernel still accepts TCP for the frozen process: a TCP check says "up".
    assert!(std::net::TcpStream::connect_timeout(&ms[0].addr().parse().unwrap(), T).is_ok());
    assert_eq!(read_n(&mut s, 3, T).await, [0xE0, 0x01, 0x8B]);
    assert!(closed(&mut s, T).await);
    ms[0].signal("CONT");
    lb.stop().await;
}

/// With the opt-in, the DISCONNECT carries 0x9C Use another server and the
/// configured Server Reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_in_server_reference() {
    let (ms, lb) = cluster("[eviction]\nserver_reference = \"mqtt.example:1883\"\n").await;
    let id = ids_on(&lb, "b2", "ref", 1).remove(0);
    let (mut s, _) = connect_and_ack(&lb.addr.to_string(), &id, 5).await;
    ms[1].signal("STOP");
    wait_until(T, || state(&lb, "b2") == HealthState::Down)
        .await
        .expect("marked down");
    let reference = b"mqtt.example:1883";
    let mut expected = vec![
        0xE0,
        (2 + 3 + reference.len()) as u8,
        0x9C,
        (3 + reference.len()) as u8,
        0x1C,
        0x00,
        reference.len() as u8,
    ];
    expected.extend_from_slice(reference);
    assert_eq!(read_n(&mut s, expected.len(), T).await, expected);
    ms[1].signal("CONT");
    lb.stop().await;
}

/// A 3.1.1 client on a failed backend is closed (3.x has no DISCONNECT from
/// the server), and a recovered backend does not pull clients back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_client_closed_and_recovery_does_not_move_clients_back() {
    let (ms, lb) = cluster("").await;
    let id = ids_on(&lb, "b3", "v3", 1).remove(0);
    let (mut s, _) = connect_and_ack(&lb.addr.to_string(), &id, 4).await;
    ms[2].signal("STOP");
    wait_until(T, || state(&lb, "b3") == HealthState::Down)
        .await
        .expect("down");
    let mut b = [0u8; 8];
    let n = tokio::time::timeout(T, s.read(&mut b))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "3.1.1 client got bytes instead of a close");
    // It reconnects elsewhere.
    let (_moved, ack) = connect_and_ack(&lb.addr.to_string(), &id, 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    let elsewhere = lb.shared.registry.find_client(&id);
    assert_eq!(elsewhere.len(), 1);
    assert_ne!(elsewhere[0].backend.name, "b3");
    // b3 recovers: the moved client stays where it is; new connections follow the hash.
    ms[2].signal("CONT");
    wait_until(T, || state(&lb, "b3") == HealthState::Up)
        .await
        .expect("up again");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        lb.shared.registry.find_client(&id)[0].backend.name,
        elsewhere[0].backend.name
    );
    assert_eq!(lb.first_choice(&id), "b3");
    lb.stop().await;
}

/// Draining 2,000 clients at 500 per second takes about 4 s, and no second
/// (nor any 200 ms window) sees more closes than the rate allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_is_paced() {
    const N: usize = 2000;
    let (_ms, lb) = cluster("[eviction]\nrate = 500\n[admin]\naddress = \"127.0.0.1:0\"\n").await;
    let ids = ids_on(&lb, "b1", "drain", N);
    let addr = lb.addr.to_string();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(50));
    let mut conns = Vec::new();
    for id in ids {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let addr = addr.clone();
        conns.push(tokio::spawn(async move {
            let r = connect_and_ack(&addr, &id, 4).await;
            drop(permit);
            r
        }));
    }
    let mut streams = Vec::new();
    for c in conns {
        let (s, ack) = c.await.unwrap();
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
        streams.push(s);
    }
    assert_eq!(
        lb.shared
            .backends
            .get("b1")
            .unwrap()
            .active
            .load(std::sync::atomic::Ordering::Relaxed),
        N as u64
    );
    let watchers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut b = [0u8; 16];
                let _ = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b)).await;
                Instant::now()
            })
        })
        .collect();
    let admin = lb.admin.unwrap().to_string();
    let start = Instant::now();
    let (status, body) = http(&admin, "POST", "/backends/b1/drain").await;
    assert_eq!(status, 200, "{body}");
    let mut closes = Vec::new();
    for w in watchers {
        closes.push(w.await.unwrap() - start);
    }
    closes.sort();
    let span = *closes.last().unwrap();
    assert!(
        span >= Duration::from_millis(3500) && span <= Duration::from_secs(8),
        "drain took {span:?}"
    );
    let max_in = |window: Duration| mqlb_tests::load::max_in_window(&closes, window);
    // Closes are timed where the clients see them, so scheduling noise on a
    // busy 2-core box can bunch a few; 5 % tolerance still catches a burst
    // (without pacing, all 2,000 land in one window).
    let (per_s, per_200ms) = (
        max_in(Duration::from_secs(1)),
        max_in(Duration::from_millis(200)),
    );
    eprintln!("max closes: {per_s} in any 1 s, {per_200ms} in any 200 ms");
    assert!(per_s <= 525, "burst: {per_s} in 1 s");
    assert!(per_200ms <= 125, "burst: {per_200ms} in 200 ms");
    assert_eq!(
        lb.shared
            .backends
            .get("b1")
            .unwrap()
            .evictions
            .load(std::sync::atomic::Ordering::Relaxed),
        N as u64
    );
    // Drained: new clients of b1 go to their next choice, and metrics show it.
    let id = ids_on(&lb, "b2", "after-drain", 1).remove(0);
    assert_eq!(lb.first_choice(&id), "b2");
    let (_, metrics) = http(&admin, "GET", "/metrics").await;
    assert!(
        metrics.contains(&format!("mqlb_evictions_total{{backend=\"b1\"}} {N}")),
        "{metrics}"
    );
    assert!(metrics.contains("mqlb_backend_draining{backend=\"b1\"} 1"));
    // The console's event says how many moved and how long it took.
    let (_, events) = http(&admin, "GET", "/events").await;
    let moved = format!("moved {N} clients in ");
    assert!(events.contains(&moved), "no \"{moved}\" event: {events}");
    let (status, _) = http(&admin, "POST", "/backends/b1/undrain").await;
    assert_eq!(status, 200);
    assert!(lb.shared.backends.get("b1").unwrap().is_usable());
    eprintln!("drained {N} clients in {span:?}");
    lb.stop().await;
}

/// A broker answering CONNACK "not authorized" is reported misconfigured,
/// not down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_authorized_is_misconfigured() {
    let locked = Mosquitto::start_with("allow_anonymous false");
    // start_with appends after "allow_anonymous true"; Mosquitto takes the last.
    let lb = RunningBalancer::start(config(
        &[("locked", locked.addr())],
        &format!("{FAST_HEALTH}[admin]\naddress = \"127.0.0.1:0\"\n"),
    ))
    .await;
    wait_until(T, || state(&lb, "locked") == HealthState::Misconfigured)
        .await
        .expect("misconfigured");
    let (status, body) = http(&lb.admin.unwrap().to_string(), "GET", "/backends").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["name"], "locked");
    assert_eq!(v[0]["state"], "misconfigured");
    assert!(
        v[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("not_authorized"),
        "{body}"
    );
    let (status, _) = http(&lb.admin.unwrap().to_string(), "GET", "/readyz").await;
    assert_eq!(status, 503);
    let out = Command::new(mqlb_bin())
        .args(["check", &locked.addr()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("misconfigured"));
    lb.stop().await;
}

/// The admin API's read endpoints over a real socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_reports_backends_clients_and_metrics() {
    let (_ms, lb) = cluster("[admin]\naddress = \"127.0.0.1:0\"\n").await;
    let admin = lb.admin.unwrap().to_string();
    assert_eq!(http(&admin, "GET", "/healthz").await.0, 200);
    assert_eq!(http(&admin, "GET", "/readyz").await.0, 200);
    let (_s, _) = connect_and_ack(&lb.addr.to_string(), "admin/dev 1", 4).await;
    let (status, body) = http(&admin, "GET", "/clients/admin%2Fdev%201").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["client_id"], "admin/dev 1");
    assert_eq!(v["connected"], true);
    assert_eq!(v["placed_on"], v["connected_to"][0]);
    let (_, body) = http(&admin, "GET", "/backends").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    for b in v.as_array().unwrap() {
        assert_eq!(b["state"], "up");
        assert!(b["last_rtt_ms"].as_f64().unwrap() > 0.0);
        assert!(b["last_check"].as_str().unwrap().ends_with('Z'));
        assert_eq!(b["consecutive_failures"], 0);
    }
    let total: u64 = v
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["connections"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 1);
    let (_, m) = http(&admin, "GET", "/metrics").await;
    // Well-formed: each family typed once, no series twice, histograms
    // cumulative.
    if let Err(e) = mqlb_tests::exposition::parse(&m) {
        panic!("{e}\n{m}");
    }
    for family in [
        "mqlb_connections_accepted_total 1",
        "mqlb_connect_rejected_total{reason=\"malformed\"} 0",
        "mqlb_backend_connack_total{backend=",
        "code=\"0x00\",reason=\"success\"} 1",
        "mqlb_backend_connect_latency_seconds_count{backend=",
        "mqlb_backend_probe_rtt_seconds_bucket{backend=\"b1\",le=\"+Inf\"}",
        "mqlb_backend_health{backend=\"b1\",state=\"up\"} 1",
        "mqlb_backend_health_transitions_total{backend=\"b1\",to=\"up\"} 1",
        // A code never seen is there as 0, not missing ("no data").
        "code=\"0x88\",reason=\"server_unavailable\"} 0",
        "process_cpu_seconds_total ",
        "process_open_fds ",
        "process_max_fds ",
        "process_start_time_seconds ",
    ] {
        assert!(m.contains(family), "missing {family}");
    }
    let rss: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .expect("process_resident_memory_bytes");
    assert!(rss > 1e6, "resident memory {rss}");
    // Bytes as they pass: the 3.1.1 CONNACK (4 bytes) to the client, the
    // CONNECT to the backend, while the connection is still open.
    let families = mqlb_tests::exposition::parse(&m).unwrap();
    let bytes = |dir: &str| -> f64 {
        ["b1", "b2", "b3"]
            .iter()
            .filter_map(|b| {
                mqlb_tests::exposition::sample(
                    &families,
                    &format!("mqlb_backend_bytes_total{{backend=\"{b}\",direction=\"{dir}\"}}"),
                )
            })
            .sum()
    };
    assert_eq!(bytes("to_client"), 4.0);
    assert!(bytes("to_backend") > 10.0, "{m}");
    assert!(m.contains(&format!(
        "mqlb_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    // The console's header and totals row.
    let (status, body) = http(&admin, "GET", "/summary").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["connections"]["accepted"], 1);
    assert_eq!(v["connections"]["active"], 1);
    assert_eq!(v["connections"]["refused"], 0);
    assert_eq!(v["bytes"]["to_clients"], 4);
    assert_eq!(
        v["bytes"]["to_backends"].as_f64(),
        Some(bytes("to_backend"))
    );
    assert!(v["uptime_s"].as_u64().is_some());
    assert!(v["limits"]["max_connections"].as_u64().unwrap() > 0);
    assert_eq!(http(&admin, "POST", "/backends/nope/drain").await.0, 404);
    assert_eq!(http(&admin, "GET", "/nope").await.0, 404);
    lb.stop().await;
}

/// Backend names reach Prometheus label values escaped: a `"`, `\` or
/// newline in a name must not break the scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_escape_label_values() {
    let m = Mosquitto::start();
    let name = "we\"ird\\name";
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[admin]\naddress = \"127.0.0.1:0\"\n\
         [[backend]]\nname = '{name}'\naddress = \"{}\"\n{FAST_HEALTH}",
        m.addr()
    );
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let admin = lb.admin.unwrap().to_string();
    let (_s, _) = connect_and_ack(&lb.addr.to_string(), "esc", 4).await;
    let (_, metrics) = http(&admin, "GET", "/metrics").await;
    let mut samples = 0;
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        // name{label="value",...} number, with the text format's escapes.
        let (series, value) = line.rsplit_once(' ').expect(line);
        assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
        let Some((_, labels)) = series.split_once('{') else {
            continue;
        };
        let labels = labels.strip_suffix('}').expect(line);
        let mut chars = labels.chars();
        let mut values = Vec::new();
        loop {
            let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
            if key.is_empty() {
                break;
            }
            assert_eq!(chars.next(), Some('"'), "{line:?}");
            let mut v = String::new();
            loop {
                match chars.next().expect(line) {
                    '\\' => match chars.next().expect(line) {
                        'n' => v.push('\n'),
                        c @ ('\\' | '"') => v.push(c),
                        c => panic!("bad escape \\{c} in {line:?}"),
                    },
                    '"' => break,
                    c => v.push(c),
                }
            }
            values.push((key, v));
            match chars.next() {
                Some(',') => continue,
                None => break,
                Some(c) => panic!("unexpected {c:?} in {line:?}"),
            }
        }
        if let Some((_, v)) = values.iter().find(|(k, _)| k == "backend") {
            assert_eq!(v, name, "{line:?}");
            samples += 1;
        }
    }
    assert!(samples > 10, "only {samples} backend samples:\n{metrics}");
    lb.stop().await;
}

/// The admin port is no data path: a client that never finishes its
/// request headers is cut after the header timeout, and meanwhile other
/// requests are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_cuts_slow_clients() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = Mosquitto::start();
    let lb = RunningBalancer::start(config(
        &[("b1", m.addr())],
        "[health]\nenabled = false\n[admin]\naddress = \"127.0.0.1:0\"\n",
    ))
    .await;
    let admin = lb.admin.unwrap().to_string();
    let mut slow = tokio::net::TcpStream::connect(&admin).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert_eq!(http(&admin, "GET", "/healthz").await.0, 200);
    let started = Instant::now();
    let mut b = [0u8; 256];
    let r = tokio::time::timeout(Duration::from_secs(20), slow.read(&mut b)).await;
    assert!(r.is_ok(), "slow admin client never cut");
    eprintln!("slow admin client cut after {:?}", started.elapsed());
    lb.stop().await;
}

/// `mqlb check`: 0 against a live broker, 1 against a stopped one and
/// against a port with no listener.
#[test]
fn check_command_exit_codes() {
    let m = Mosquitto::start();
    let run = |addr: &str, extra: &[&str]| {
        Command::new(mqlb_bin())
            .args(["check", addr, "--timeout", "500ms"])
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = run(&m.addr(), &[]);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    let line = String::from_utf8_lossy(&ok.stdout);
    assert!(line.contains(" up connack_ms="), "{line}");
    let deep = run(&m.addr(), &["--v5", "--deep"]);
    assert_eq!(deep.status.code(), Some(0), "{deep:?}");
    assert!(String::from_utf8_lossy(&deep.stdout).contains("roundtrip_ms="));
    m.signal("STOP");
    let stopped = run(&m.addr(), &[]);
    m.signal("CONT");
    assert_eq!(stopped.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&stopped.stdout).contains("timeout waiting for connack"));
    let nobody = run(&format!("127.0.0.1:{}", free_port()), &[]);
    assert_eq!(nobody.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&nobody.stdout).contains("unreachable"));
}

/// The sidecar: 200 while the broker serves, 503 once it is stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_follows_the_broker() {
    let mut m = Mosquitto::start();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _child = KillOnDrop(
        Command::new(mqlb_bin())
            .args(["healthcheck", "--target", &m.addr(), "--listen", &listen])
            .args(["--interval", "200ms", "--timeout", "300ms"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_listening(&listen, T));
    let mut last = (0, String::new());
    for _ in 0..50 {
        last = http(&listen, "GET", "/health").await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last.0, 200, "{}", last.1);
    let v: serde_json::Value = serde_json::from_str(&last.1).unwrap();
    assert_eq!(v["status"], "up");
    assert!(v["rtt_ms"].as_f64().is_some());
    m.kill();
    let mut after = (0, String::new());
    for _ in 0..50 {
        after = http(&listen, "GET", "/health").await;
        if after.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(after.0, 503, "{}", after.1);
    assert!(after.1.contains("\"status\":\"down\""), "{}", after.1);
}

/// Passive signals: with probes far apart, data-path connect failures alone
/// (passive_fall = 3) mark a dead backend down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_failures_mark_a_backend_down() {
    let mut ms: Vec<Mosquitto> = (0..2).map(|_| Mosquitto::start()).collect();
    let lb = RunningBalancer::start(config(
        &[("b1", ms[0].addr()), ("b2", ms[1].addr())],
        "[health]\ninterval = \"1h\"\njitter = \"0ms\"\npassive_fall = 3\n",
    ))
    .await;
    wait_until(T, || state(&lb, "b1") == HealthState::Up)
        .await
        .expect("first probe");
    ms[0].kill();
    let ids = ids_on(&lb, "b1", "passive", 3);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            state(&lb, "b1"),
            HealthState::Up,
            "down before {i} failures"
        );
        // Each client falls through to b2 after its connect to b1 is refused.
        let (_s, ack) = connect_and_ack(&lb.addr.to_string(), id, 4).await;
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    }
    wait_until(T, || state(&lb, "b1") == HealthState::Down)
        .await
        .expect("passively marked down");
    let b1 = lb.shared.backends.get("b1").unwrap();
    assert_eq!(
        b1.connect_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    // From now on b1 is skipped without a connect attempt.
    let (_s, _) = connect_and_ack(
        &lb.addr.to_string(),
        &ids_on(&lb, "b2", "passive-after", 1)[0],
        4,
    )
    .await;
    let (_s, _) = connect_and_ack(&lb.addr.to_string(), &ids[0], 4).await;
    assert_eq!(
        b1.connect_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    lb.stop().await;
}

/// SIGHUP / POST /reload: backends change without dropping connections; a
/// broken file changes nothing and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reload_keeps_connections() {
    let ms: Vec<Mosquitto> = (0..3).map(|_| Mosquitto::start()).collect();
    let dir = scratch_dir("reload");
    let file = dir.join("mqlb.toml");
    let (port, admin) = (free_port(), free_port());
    let write = |backends: &[usize], extra: &str| {
        let mut t = format!(
            "[[listener]]\naddress = \"127.0.0.1:{port}\"\n[admin]\naddress = \"127.0.0.1:{admin}\"\ntoken_file = {:?}\n",
            mqlb_tests::admin_token_file()
        );
        for &i in backends {
            t.push_str(&format!(
                "[[backend]]\nname = \"b{}\"\naddress = \"{}\"\n",
                i + 1,
                ms[i].addr()
            ));
        }
        t.push_str(extra);
        std::fs::write(&file, t).unwrap();
    };
    write(&[0], "");
    let child = KillOnDrop(
        Command::new(mqlb_bin())
            .args(["balance", "--config"])
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}");
    let admin = format!("127.0.0.1:{admin}");
    assert!(wait_listening(&addr, T) && wait_listening(&admin, T));
    let (mut kept, ack) = connect_and_ack(&addr, "kept", 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    assert!(ms[0].saw_client("kept", T));

    // Add b2 and b3 with SIGHUP.
    write(&[0, 1, 2], "");
    Command::new("kill")
        .args(["-HUP", &child.0.id().to_string()])
        .status()
        .unwrap();
    let mut names = Vec::new();
    for _ in 0..100 {
        let (_, body) = http(&admin, "GET", "/backends").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        names = v
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap().to_string())
            .collect();
        if names.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(names, ["b1", "b2", "b3"]);
    // The old connection still works.
    use tokio::io::AsyncWriteExt;
    kept.write_all(&[0xC0, 0x00]).await.unwrap();
    assert_eq!(read_n(&mut kept, 2, T).await, [0xD0, 0x00]);
    // New clients follow the hash over three backends, as any replica computes it.
    let specs: Vec<mqlb_config::Backend> = (0..3)
        .map(|i| mqlb_config::Backend {
            name: format!("b{}", i + 1),
            address: ms[i].addr(),
            weight: 1,
            pool: mqlb_config::DEFAULT_POOL.into(),
            send_proxy: false,
            tls: None,
            websocket: None,
            cluster_admin: None,
        })
        .collect();
    let local = mqlb_balancer::select::Backends::new(&specs);
    let mut on_new = 0;
    for i in 0..30 {
        let id = format!("after-reload-{i}");
        let (_s, ack) = connect_and_ack(&addr, &id, 4).await;
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
        let owner = &local.candidates(id.as_bytes())[0].name;
        let idx: usize = owner[1..].parse::<usize>().unwrap() - 1;
        assert!(ms[idx].saw_client(&id, T), "{id} not on {owner}");
        on_new += usize::from(idx > 0);
    }
    assert!(on_new > 0);
    // A broken file is refused with key and line; nothing changes.
    std::fs::write(&file, "[[listener]]\naddress = \"nope\"\n").unwrap();
    let (status, body) = http(&admin, "POST", "/reload").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("mqlb.toml:2: listener[0].address"), "{body}");
    // Remove b3 through the API.
    write(&[0, 1], "");
    let (status, body) = http(&admin, "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["removed"], serde_json::json!(["b3"]));
    kept.write_all(&[0xC0, 0x00]).await.unwrap();
    assert_eq!(read_n(&mut kept, 2, T).await, [0xD0, 0x00]);
    drop(child);
    let _ = std::fs::remove_dir_all(dir);
}

/// A backend that answers its health probes (`mqlb-probe-*` clients) and
/// refuses every other CONNECT with `refusal`, as an mqlb node does for a
/// client whose session is moving between nodes.
async fn refusing_backend(refusal: Vec<u8>) -> String {
    use mqlb_protocol::{Packet, ProtocolVersion};
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let refusal = refusal.clone();
            tokio::spawn(async move {
                let mut buf = bytes::BytesMut::new();
                let mut probe = false;
                loop {
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                    while let Ok(Some(p)) =
                        mqlb_protocol::decode(&mut buf, ProtocolVersion::V5, 1 << 16)
                    {
                        match p {
                            Packet::Connect(c)
                                if c.client_id.as_str().starts_with("mqlb-probe-") =>
                            {
                                probe = true;
                                let _ = s.write_all(&[0x20, 3, 0, 0, 0]).await;
                            }
                            Packet::Connect(_) => {
                                let _ = s.write_all(&refusal).await;
                                return;
                            }
                            Packet::Pingreq if probe => {
                                let _ = s.write_all(&[0xD0, 0]).await;
                            }
                            _ => {}
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A v5 CONNACK 0x88 that says the client's session is moving (an mqlb
/// node whose peer just died) is passed to the client but not counted
/// against the node, however many come; a plain 0x88 is, and marks a
/// backend down after `passive_fall` of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moving_refusal_does_not_count_against_the_node() {
    use mqlb_protocol::{Connack, Packet, Properties, ProtocolVersion, ReasonCode};
    let moving = Packet::Connack(Connack::session_moving())
        .to_bytes(ProtocolVersion::V5)
        .unwrap()
        .to_vec();
    let plain = Packet::Connack(Connack {
        session_present: false,
        reason: ReasonCode::SERVER_UNAVAILABLE,
        properties: Properties::default(),
    })
    .to_bytes(ProtocolVersion::V5)
    .unwrap()
    .to_vec();
    let (b1, b2) = (
        refusing_backend(moving.clone()).await,
        refusing_backend(plain).await,
    );
    let lb = RunningBalancer::start(config(
        &[("b1", b1), ("b2", b2)],
        "[health]\ninterval = \"1h\"\njitter = \"0ms\"\npassive_fall = 2\n",
    ))
    .await;
    wait_until(T, || {
        state(&lb, "b1") == HealthState::Up && state(&lb, "b2") == HealthState::Up
    })
    .await
    .expect("first probes");
    for id in ids_on(&lb, "b1", "moving", 5) {
        let (_s, ack) = connect_and_ack(&lb.addr.to_string(), &id, 5).await;
        assert_eq!(ack, moving, "the client gets the node's refusal as it is");
    }
    assert_eq!(state(&lb, "b1"), HealthState::Up, "counted against b1");
    let b1 = lb.shared.backends.get("b1").unwrap();
    assert_eq!(
        b1.sessions_moving
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
    for id in ids_on(&lb, "b2", "unavailable", 2) {
        let _ = connect_and_ack(&lb.addr.to_string(), &id, 5).await;
    }
    wait_until(T, || state(&lb, "b2") == HealthState::Down)
        .await
        .expect("plain 0x88 passively marked b2 down");
    lb.stop().await;
}
