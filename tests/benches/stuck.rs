//! What one subscriber that never reads costs everyone else: a pipelined
//! QoS 1 publisher's PUBACK rate with and without a stuck subscriber (a
//! 2 KiB receive buffer, subscribed to `#` at QoS 1, never reading again),
//! a healthy QoS 0 subscriber reading throughout.
//!
//! * one node: `mqlb broker` and Mosquitto side by side, default limits;
//! * a 3-node cluster through `mqlb balance`: the stuck client on n1, the
//!   publisher on n3, the healthy subscriber on n2.
//!
//! The target is at least 0.8× the rate without the stuck client. Medians
//! of interleaved rounds.
//!
//! Run: `cargo build --release && cargo bench -p mqlb-tests --bench stuck`

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used,
    missing_docs
)]

use std::process::{Command, Stdio};
use std::time::Duration;

use mqlb_tests::cluster::TestCluster;
use mqlb_tests::load::{counting_subscriber, puback_rate, stuck_subscriber};
use mqlb_tests::{free_port, mqlb_bin, wait_listening, KillOnDrop, Mosquitto};

const ROUNDS: usize = 3;
const RUN: Duration = Duration::from_secs(3);
const WINDOW: usize = 100;

/// PUBACKs/s without, with the stuck subscriber, and (the control) with
/// a subscriber in its place that reads and acknowledges everything: what
/// any second QoS 1 subscriber of the publisher costs on this machine.
async fn round(
    pub_addr: &str,
    sub_addr: &str,
    stuck_addr: &str,
    ids: [&str; 3],
) -> (f64, f64, f64) {
    let [p, s, k] = ids;
    let (_, healthy) = counting_subscriber(sub_addr, s, "load/#", 0).await;
    let without = puback_rate(pub_addr, p, "load/x", WINDOW, RUN).await;
    let stuck = stuck_subscriber(stuck_addr, k, "#").await;
    // Let it fall behind first: its queue fills, then stays full.
    let _ = puback_rate(pub_addr, p, "load/x", WINDOW, Duration::from_millis(500)).await;
    let with = puback_rate(pub_addr, p, "load/x", WINDOW, RUN).await;
    drop(stuck);
    let (_, reading) = counting_subscriber(stuck_addr, &format!("{k}-reading"), "#", 1).await;
    let control = puback_rate(pub_addr, p, "load/x", WINDOW, RUN).await;
    reading.abort();
    healthy.abort();
    (without, with, control)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn report(name: &str, runs: &[(f64, f64, f64)]) {
    let without = median(runs.iter().map(|r| r.0).collect());
    let with = median(runs.iter().map(|r| r.1).collect());
    let control = median(runs.iter().map(|r| r.2).collect());
    println!(
        "{name:<34} {without:>10.0} {with:>12.0} {:>6.2} {control:>14.0} {:>6.2}",
        with / without,
        control / without
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mosquitto = Mosquitto::start();
    let port = free_port();
    let ours = KillOnDrop(
        Command::new(mqlb_bin())
            .args(["broker", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run `cargo build --release` first"),
    );
    let ours_addr = format!("127.0.0.1:{port}");
    assert!(wait_listening(&ours_addr, Duration::from_secs(5)));
    if std::env::var_os("MQLB_PROFILE").is_some() {
        // For `perf record -p PID`: 20 s of load with the stuck client.
        eprintln!("broker pid {}", ours.0.id());
        let (_, _healthy) = counting_subscriber(&ours_addr, "prof-sub", "load/#", 0).await;
        let mode = std::env::var("MQLB_PROFILE").unwrap_or_default();
        let _fast = if mode == "fast" {
            Some(counting_subscriber(&ours_addr, "prof-fast", "#", 1).await)
        } else {
            None
        };
        let _stuck = match mode.as_str() {
            "without" | "fast" => None,
            "elsewhere" => Some(stuck_subscriber(&ours_addr, "prof-stuck", "other/#").await),
            _ => Some(stuck_subscriber(&ours_addr, "prof-stuck", "#").await),
        };
        let rate = puback_rate(
            &ours_addr,
            "prof-pub",
            "load/x",
            WINDOW,
            Duration::from_secs(20),
        )
        .await;
        eprintln!("{rate:.0} PUBACKs/s");
        return;
    }
    let mut mosq = Vec::new();
    let mut mqlb = Vec::new();
    for r in 0..ROUNDS {
        let ids = |tag: &str| {
            [
                format!("{tag}-pub-{r}"),
                format!("{tag}-sub-{r}"),
                format!("{tag}-stuck-{r}"),
            ]
        };
        let m = ids("m");
        let a = mosquitto.addr();
        mosq.push(round(&a, &a, &a, [&m[0], &m[1], &m[2]]).await);
        let o = ids("o");
        mqlb.push(round(&ours_addr, &ours_addr, &ours_addr, [&o[0], &o[1], &o[2]]).await);
    }
    let mut cluster = Vec::new();
    {
        let mut c = TestCluster::start(3, &[]);
        assert!(c.wait_converged(Duration::from_secs(20)).await);
        let backends: Vec<(&str, String)> = c
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.addr.clone()))
            .collect();
        let lb = mqlb_tests::RunningBalancer::start(mqlb_tests::config(&backends, "")).await;
        let addr = lb.addr.to_string();
        let all = ["n1", "n2", "n3"];
        for r in 0..ROUNDS {
            let p = c.id_owned_by("n3", &format!("c-pub-{r}"), &all);
            let s = c.id_owned_by("n2", &format!("c-sub-{r}"), &all);
            let k = c.id_owned_by("n1", &format!("c-stuck-{r}"), &all);
            cluster.push(round(&addr, &addr, &addr, [&p, &s, &k]).await);
        }
        lb.stop().await;
    }
    drop(ours);
    println!(
        "\nPipelined QoS 1 publisher (window {WINDOW}), PUBACKs/s, {} s each, medians of {ROUNDS} rounds",
        RUN.as_secs()
    );
    println!(
        "{:<34} {:>10} {:>12} {:>6} {:>14} {:>6}",
        "setup", "without", "with stuck", "ratio", "with a reader", "ratio"
    );
    report("mosquitto, one node", &mosq);
    report("mqlb broker, one node", &mqlb);
    report("mqlb cluster through the balancer", &cluster);
}
