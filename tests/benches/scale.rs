//! The long run: a fleet of idle MQTT clients through one `mqlb balance`
//! process in front of three Mosquittos, and what happens when a backend
//! dies under it.
//!
//! * **Scale.** `MQLB_SCALE_CLIENTS` (default 9,000) clients connect with a
//!   60 s keep-alive and send PINGREQ on schedule. Reported: time to open
//!   them all (100 connecting at once), balancer RSS per connection, balancer
//!   CPU while the fleet idles, and RSS projected to 100k and 1M clients.
//! * **Failover.** The backend holding the most clients is `kill -9`ed (its
//!   sockets reset at once, so its clients are cut at once), or SIGSTOPped
//!   (a hung broker: its clients are moved by the paced evictor, at the
//!   default 1,000/s and at 5,000/s). Reported: time to detect, and time
//!   until every affected client is connected again. Clients reconnect at
//!   once when cut, as most device SDKs do, with up to 100 ms of jitter.
//!
//! Run: `cargo build --release && cargo bench -p mqlb-tests --bench scale`.
//! Every proxied client costs the balancer two file descriptors: the run
//! needs a hard `ulimit -n` of at least twice the clients plus slack.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used,
    missing_docs
)]

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqlb_tests::load::{anon_rss_kib, cpu_seconds};
use mqlb_tests::raw;
use mqlb_tests::{free_port, http, mqlb_bin, wait_listening, KillOnDrop, Mosquitto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEEP_ALIVE: Duration = Duration::from_secs(60);

/// Fleet-wide counters.
#[derive(Default)]
struct Fleet {
    connected: AtomicUsize,
    /// Connections lost (cut by the balancer or the backend).
    cuts: AtomicUsize,
    /// Reconnects completed after a cut.
    recovered: AtomicUsize,
    stop: AtomicBool,
    /// Milliseconds since the fleet started: first and last cut, last
    /// recovery (for the failover timeline).
    first_cut_ms: std::sync::atomic::AtomicU64,
    last_cut_ms: std::sync::atomic::AtomicU64,
    last_back_ms: std::sync::atomic::AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl Fleet {
    fn now_ms(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as u64
    }
}

/// One device: connect (retrying), idle with PINGREQs on schedule, and
/// reconnect when cut.
async fn device(lb: String, id: String, fleet: Arc<Fleet>, gate: Arc<tokio::sync::Semaphore>) {
    let mut first = true;
    while !fleet.stop.load(Ordering::Relaxed) {
        let permit = gate.acquire().await.unwrap();
        let c = connect_packet(&id);
        let stream = async {
            let mut s = TcpStream::connect(&lb).await.ok()?;
            s.write_all(&c).await.ok()?;
            let ack = raw::read_n(&mut s, 4, Duration::from_secs(10)).await;
            (ack == [0x20, 0x02, 0x00, 0x00]).then_some(s)
        }
        .await;
        drop(permit);
        let Some(mut s) = stream else {
            tokio::time::sleep(Duration::from_millis(50 + fastrand::u64(..100))).await;
            continue;
        };
        fleet.connected.fetch_add(1, Ordering::Relaxed);
        if !first {
            fleet.recovered.fetch_add(1, Ordering::Relaxed);
            fleet
                .last_back_ms
                .fetch_max(fleet.now_ms(), Ordering::Relaxed);
        }
        first = false;
        // Idle, pinging on schedule (first ping at a random point).
        let mut next_ping = tokio::time::Instant::now() + KEEP_ALIVE.mul_f64(fastrand::f64());
        let mut buf = [0u8; 64];
        loop {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                _ = tokio::time::sleep_until(next_ping) => {
                    if s.write_all(&[0xC0, 0x00]).await.is_err() {
                        break;
                    }
                    next_ping += KEEP_ALIVE;
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if fleet.stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
            }
        }
        fleet.connected.fetch_sub(1, Ordering::Relaxed);
        let now = fleet.now_ms();
        let _ = fleet
            .first_cut_ms
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        fleet.last_cut_ms.fetch_max(now, Ordering::Relaxed);
        fleet.cuts.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(fastrand::u64(..100))).await;
    }
}

fn connect_packet(id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    body.extend_from_slice(&(KEEP_ALIVE.as_secs() as u16).to_be_bytes());
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    raw::frame(0x10, &body)
}

async fn wait_for(within: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if f() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// The balancer's view of each backend: (name, state, connections).
async fn backends(admin: &str) -> Vec<(String, String, u64)> {
    let (_, body) = http(admin, "GET", "/backends").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    (
                        b["name"].as_str().unwrap_or_default().to_string(),
                        b["state"].as_str().unwrap_or_default().to_string(),
                        b["connections"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Failure {
    Kill,
    Stop,
}

struct Run {
    open: Duration,
    rss_per_conn_kib: f64,
    idle_cpu_pct: f64,
    base_rss_kib: f64,
    affected: usize,
    detect: Option<Duration>,
    recovered: Option<Duration>,
}

async fn run(n: usize, failure: Failure, rate: u32) -> Run {
    let mut brokers: Vec<Mosquitto> = (0..3)
        .map(|_| Mosquitto::start_with("max_connections -1"))
        .collect();
    let port = free_port();
    let admin_port = free_port();
    let lb_addr = format!("127.0.0.1:{port}");
    let admin = format!("127.0.0.1:{admin_port}");
    let cfg = mqlb_tests::scratch_dir("scale").join("mqlb.toml");
    let mut text = format!(
        "[[listener]]\naddress = \"{lb_addr}\"\n[admin]\naddress = \"{admin}\"\ntoken_file = {:?}\n\
         [balancer]\nmax_connections = {}\n[eviction]\nrate = {rate}\n",
        mqlb_tests::admin_token_file(),
        n + 1000
    );
    for (i, b) in brokers.iter().enumerate() {
        text.push_str(&format!(
            "[[backend]]\nname = \"b{}\"\naddress = \"{}\"\n",
            i + 1,
            b.addr()
        ));
    }
    std::fs::write(&cfg, text).unwrap();
    let lb = KillOnDrop(
        Command::new(mqlb_bin())
            .args(["balance", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run `cargo build --release` first"),
    );
    let pid = lb.0.id();
    assert!(wait_listening(&lb_addr, Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(700)).await; // backends up
    let base_rss_kib = anon_rss_kib(pid);

    let fleet = Arc::new(Fleet::default());
    fleet.now_ms();
    let gate = Arc::new(tokio::sync::Semaphore::new(100));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tasks.push(tokio::spawn(device(
            lb_addr.clone(),
            format!("dev-{i}"),
            fleet.clone(),
            gate.clone(),
        )));
    }
    wait_for(Duration::from_secs(120), || {
        fleet.connected.load(Ordering::Relaxed) == n
    })
    .await
    .expect("fleet did not connect");
    let open = start.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = anon_rss_kib(pid);
    let cpu0 = cpu_seconds(pid);
    let idle_window = Duration::from_secs(10);
    tokio::time::sleep(idle_window).await;
    let idle_cpu_pct = (cpu_seconds(pid) - cpu0) / idle_window.as_secs_f64() * 100.0;

    // Fail the backend holding the most clients.
    let view = backends(&admin).await;
    let (victim, _, held) = view.iter().max_by_key(|b| b.2).cloned().unwrap();
    let idx: usize = victim[1..].parse::<usize>().unwrap() - 1;
    let cuts_before = fleet.cuts.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let t0_ms = fleet.now_ms();
    match failure {
        Failure::Kill => brokers[idx].kill(),
        Failure::Stop => brokers[idx].signal("STOP"),
    }
    let mut detect = None;
    let mut recovered = None;
    while t0.elapsed() < Duration::from_secs(60) {
        if detect.is_none() {
            let v = backends(&admin).await;
            if v.iter().any(|b| b.0 == victim && b.1 != "up") {
                detect = Some(t0.elapsed());
            }
        }
        let cut = fleet.cuts.load(Ordering::Relaxed) - cuts_before;
        if cut as u64 >= held && fleet.connected.load(Ordering::Relaxed) == n {
            recovered = Some(t0.elapsed());
        }
        if detect.is_some() && recovered.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let affected = fleet.cuts.load(Ordering::Relaxed) - cuts_before;
    let rel = |ms: u64| ms.saturating_sub(t0_ms);
    eprintln!(
        "  timeline: first cut +{} ms, last cut +{} ms, last back +{} ms",
        rel(fleet.first_cut_ms.load(Ordering::Relaxed)),
        rel(fleet.last_cut_ms.load(Ordering::Relaxed)),
        rel(fleet.last_back_ms.load(Ordering::Relaxed))
    );
    fleet.stop.store(true, Ordering::Relaxed);
    brokers[idx].signal("CONT");
    for t in tasks {
        t.abort();
    }
    drop(lb);
    Run {
        open,
        rss_per_conn_kib: (rss - base_rss_kib) / n as f64,
        idle_cpu_pct,
        base_rss_kib,
        affected,
        detect,
        recovered,
    }
}

fn main() {
    let n: usize = std::env::var("MQLB_SCALE_CLIENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(9000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let runs = [
        ("kill -9, default rate 1000/s", Failure::Kill, 1000),
        ("SIGSTOP, default rate 1000/s", Failure::Stop, 1000),
        ("SIGSTOP, rate 5000/s", Failure::Stop, 5000),
    ];
    let mut results = Vec::new();
    for (label, failure, rate) in runs {
        let r = rt.block_on(run(n, failure, rate));
        eprintln!(
            "{label}: opened {n} in {:?}, {:.2} KiB/conn, idle CPU {:.1} %, {} cut, detect {:?}, all back {:?}",
            r.open, r.rss_per_conn_kib, r.idle_cpu_pct, r.affected, r.detect, r.recovered
        );
        results.push((label, r));
    }
    let first = &results[0].1;
    println!("\n{n} idle clients through one mqlb process (3 Mosquitto backends):");
    println!(
        "  time to open all (100 at once)   {:>8.2} s",
        first.open.as_secs_f64()
    );
    println!(
        "  RSS per connection               {:>8.2} KiB",
        first.rss_per_conn_kib
    );
    println!(
        "  CPU while idle (PINGREQ/60 s)     {:>8.2} %",
        first.idle_cpu_pct
    );
    for clients in [100_000f64, 1_000_000f64] {
        println!(
            "  projected RSS at {:>9} clients {:>8.0} MiB",
            clients as u64,
            (first.base_rss_kib + first.rss_per_conn_kib * clients) / 1024.0
        );
    }
    println!(
        "\n{:<32} {:>10} {:>14} {:>18}",
        "failover", "clients", "detected s", "all back s"
    );
    for (label, r) in &results {
        println!(
            "{:<32} {:>10} {:>14} {:>18}",
            label,
            r.affected,
            r.detect
                .map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64())),
            r.recovered
                .map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64()))
        );
    }
}
