//! The status console in a real browser: headless Chromium loads the page
//! from the admin port, the backend table matches `/backends`, a killed
//! backend's row changes, and a screenshot is saved under `target/`.
//! Skips, saying why, where Chromium is not installed (`.ci/run` installs
//! Debian's `chromium`).

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use mqlb_tests::raw::connect_and_ack;
use mqlb_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);
const FAST_HEALTH: &str =
    "[health]\ninterval = \"100ms\"\ntimeout = \"300ms\"\nrise = 1\nfall = 1\njitter = \"0ms\"\n";

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Runs headless Chromium on `url` with `args`; its stdout, within 60 s.
fn browse(browser: &Path, url: &str, args: &[String]) -> String {
    let profile = scratch_dir("chromium");
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&profile);
    reader.join().unwrap_or_default()
}

/// Saves a screenshot of `url` as `target/NAME` (for people) and checks it
/// is a PNG.
async fn screenshot(browser: &Path, url: &str, name: &str) {
    let shot = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).join(name);
    let _ = std::fs::remove_file(&shot);
    let (b, u, s) = (browser.to_path_buf(), url.to_string(), shot.clone());
    tokio::task::spawn_blocking(move || {
        browse(
            &b,
            &u,
            &[
                format!("--screenshot={}", s.display()),
                "--window-size=1280,900".into(),
                "--hide-scrollbars".into(),
            ],
        )
    })
    .await
    .unwrap();
    let png = std::fs::read(&shot).unwrap_or_default();
    assert!(
        png.starts_with(b"\x89PNG"),
        "no screenshot at {}",
        shot.display()
    );
    eprintln!("screenshot: {} ({} bytes)", shot.display(), png.len());
}

/// (backend, state) for each row of the console's backend table.
fn rows(dom: &str) -> Vec<(String, String)> {
    // Only the rendered table, not the script that renders it.
    let table = dom
        .split("<tbody id=\"backends\">")
        .nth(1)
        .and_then(|t| t.split("</tbody>").next())
        .unwrap_or_default();
    table
        .split("<tr data-backend=\"")
        .skip(1)
        .filter_map(|row| {
            let name = row.split('"').next()?.to_string();
            let state = row
                .split("class=\"state ")
                .nth(1)?
                .split('"')
                .next()?
                .to_string();
            Some((name, state))
        })
        .collect()
}

async fn states(admin: &str) -> Vec<(String, String)> {
    let (_, body) = http(admin, "GET", "/backends").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_real_browser() {
    let Some(browser) = chromium() else {
        eprintln!("SKIPPED: chromium is not installed (apt-get install chromium; .ci/run does)");
        return;
    };
    let mut ms: Vec<Mosquitto> = (0..2).map(|_| Mosquitto::start()).collect();
    let backends: Vec<(&str, String)> = vec![("b1", ms[0].addr()), ("b2", ms[1].addr())];
    let lb = RunningBalancer::start(config(
        &backends,
        &format!("{FAST_HEALTH}[admin]\naddress = \"127.0.0.1:0\"\n"),
    ))
    .await;
    let admin = lb.admin.unwrap().to_string();
    let url = format!("http://{admin}/");
    let all_up = wait_until(T, || {
        lb.shared
            .backends
            .snapshot()
            .iter()
            .all(|b| b.health_state() == mqlb_healthcheck::HealthState::Up)
    })
    .await;
    assert!(all_up.is_some(), "backends not up");
    let (_client, _) = connect_and_ack(&lb.addr.to_string(), "console-client", 4).await;
    // History needs a couple of samples for the charts.
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let b = browser.clone();
    let u = url.clone();
    let dom = tokio::task::spawn_blocking(move || browse(&b, &u, &["--dump-dom".into()]))
        .await
        .unwrap();
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page did not render:\n{dom}"
    );
    let mut want = states(&admin).await;
    let mut got = rows(&dom);
    want.sort();
    got.sort();
    assert_eq!(got, want, "table differs from /backends");
    assert!(dom.contains("class=\"chart\""), "no charts");
    assert!(dom.contains("<polyline"), "no chart lines");
    // One quantity per chart, its unit named, a time axis ending now.
    for (id, unit) in [
        ("chart-connections", "(connections)"),
        ("chart-rtt", "(ms)"),
        ("chart-rate", "(connections/s)"),
        ("chart-bytes", "(bytes/s)"),
    ] {
        let chart = dom
            .split(&format!("id=\"{id}\""))
            .nth(1)
            .and_then(|c| c.split("</svg>").next())
            .unwrap_or_else(|| panic!("no chart {id}"));
        assert!(chart.contains(unit), "{id} names no unit {unit}: {chart}");
        assert!(
            chart.contains(">now</text>"),
            "{id} has no time axis: {chart}"
        );
        assert!(chart.contains(">0</text>"), "{id} has no y axis: {chart}");
    }
    // The totals agree with the API.
    let (_, summary) = http(&admin, "GET", "/summary").await;
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert!(
        dom.contains(&format!(
            "data-accepted=\"{}\"",
            summary["connections"]["accepted"]
        )),
        "totals differ from /summary {summary}: {dom}"
    );
    assert!(
        dom.contains(&format!(
            "<span id=\"version\" class=\"muted\">{}</span>",
            env!("CARGO_PKG_VERSION")
        )),
        "no version: {dom}"
    );
    assert!(dom.contains("data-totals=\"1\""), "no totals row");

    // Kill b1: its row turns down.
    ms[0].kill();
    let down = wait_until(T, || {
        lb.shared
            .backends
            .get("b1")
            .is_some_and(|b| b.health_state() == mqlb_healthcheck::HealthState::Down)
    })
    .await;
    assert!(down.is_some(), "b1 not marked down");
    let (b, u) = (browser.clone(), url.clone());
    let dom = tokio::task::spawn_blocking(move || browse(&b, &u, &["--dump-dom".into()]))
        .await
        .unwrap();
    let got = rows(&dom);
    assert!(got.contains(&("b1".into(), "down".into())), "{got:?}");
    assert!(got.contains(&("b2".into(), "up".into())), "{got:?}");
    assert!(
        dom.contains("up -&gt; down") || dom.contains("up -> down"),
        "no event for b1"
    );

    // A screenshot for people.
    screenshot(&browser, &url, "console.png").await;
    lb.stop().await;
}

/// The drain buttons' POSTs are refused from another origin (a page
/// elsewhere must not drain backends through a visitor's browser) and
/// served from the console's own origin and from tools like curl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_posts_from_other_origins_are_refused() {
    let m = Mosquitto::start();
    let lb = RunningBalancer::start(config(
        &[("b1", m.addr())],
        "[health]\nenabled = false\n[admin]\naddress = \"127.0.0.1:0\"\n",
    ))
    .await;
    let admin = lb.admin.unwrap().to_string();
    let post = |origin: Option<String>| {
        let admin = admin.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(&admin).await.unwrap();
            let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
            s.write_all(
                format!(
                    "POST /backends/b1/drain HTTP/1.1\r\nHost: {admin}\r\n{origin}Authorization: Bearer {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    mqlb_tests::ADMIN_TOKEN
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            out
        }
    };
    let evil = post(Some("http://evil.example".into())).await;
    assert!(evil.starts_with("HTTP/1.1 403"), "{evil}");
    assert!(!lb.shared.backends.get("b1").unwrap().is_draining());
    let same = post(Some(format!("http://{admin}"))).await;
    assert!(same.starts_with("HTTP/1.1 200"), "{same}");
    assert!(lb.shared.backends.get("b1").unwrap().is_draining());
    let (status, _) = http(&admin, "POST", "/backends/b1/undrain").await;
    assert_eq!(status, 200, "curl-style POST");
    let (_, events) = http(&admin, "GET", "/events").await;
    assert!(events.contains("\"kind\":\"drain\""), "{events}");
    assert!(events.contains("\"kind\":\"undrain\""), "{events}");
    lb.stop().await;
}

/// The console's cluster panel, in a real browser, in front of a bundled
/// 3-node cluster: the leader, the view and how many nodes are ready are
/// what the nodes' own `/cluster` answers say (read back through the
/// balancer's `/backends`), each node has its row, and a screenshot is
/// saved under `target/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_cluster() {
    let Some(browser) = chromium() else {
        eprintln!("SKIPPED: chromium is not installed (apt-get install chromium; .ci/run does)");
        return;
    };
    let mut c = mqlb_tests::cluster::TestCluster::start(3, &[]);
    assert!(
        c.wait_converged(Duration::from_secs(20)).await,
        "cluster did not converge"
    );
    let mut text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n{FAST_HEALTH}[admin]\naddress = \"127.0.0.1:0\"\n\
         [balancer]\ncluster_admin_token_file = \"{}\"\n",
        admin_token_file().display()
    );
    for n in &c.nodes {
        text.push_str(&format!(
            "[[backend]]\nname = \"{}\"\naddress = \"{}\"\ncluster_admin = \"{}\"\n",
            n.name, n.addr, n.admin
        ));
    }
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<test>", &text).unwrap()).await;
    let admin = lb.admin.unwrap().to_string();
    let all_answered = wait_until(Duration::from_secs(20), || {
        lb.shared.backends.snapshot().iter().all(|b| {
            b.cluster_node()
                .is_some_and(|v| v.ready && v.leader.is_some())
        })
    })
    .await;
    assert!(
        all_answered.is_some(),
        "the nodes' /cluster answers never reached the balancer"
    );
    let (_, body) = http(&admin, "GET", "/backends").await;
    let api: serde_json::Value = serde_json::from_str(&body).unwrap();
    let answers: Vec<&serde_json::Value> = api
        .as_array()
        .unwrap()
        .iter()
        .map(|b| &b["cluster"])
        .collect();
    let leader = answers[0]["leader"].as_str().unwrap().to_string();
    assert!(
        answers.iter().all(|a| a["leader"] == leader.as_str()),
        "the nodes name different leaders: {answers:?}"
    );
    let view = answers
        .iter()
        .map(|a| a["view"].as_u64().unwrap())
        .max()
        .unwrap();

    let url = format!("http://{admin}/");
    let (b, u) = (browser.clone(), url.clone());
    let dom = tokio::task::spawn_blocking(move || browse(&b, &u, &["--dump-dom".into()]))
        .await
        .unwrap();
    let attr = |name: &str| {
        let key = format!("{name}=\"");
        let at = dom
            .find("id=\"cluster-summary\"")
            .expect("no cluster summary");
        let tag_end = dom[at..].find('>').unwrap() + at;
        let tag = &dom[..tag_end];
        let start = tag.rfind('<').unwrap();
        let tag = &tag[start..];
        let v = tag
            .find(&key)
            .map(|i| &tag[i + key.len()..])
            .unwrap_or_default();
        v[..v.find('"').unwrap_or(0)].to_string()
    };
    assert_eq!(attr("data-leader"), leader, "{dom}");
    assert_eq!(attr("data-view"), view.to_string(), "{dom}");
    assert_eq!(attr("data-ready"), "3", "{dom}");
    assert_eq!(attr("data-nodes"), "3", "{dom}");
    let term = answers
        .iter()
        .map(|a| a["term"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(term >= 1, "{answers:?}");
    assert_eq!(attr("data-term"), term.to_string(), "{dom}");
    for (n, a) in c.nodes.iter().zip(&answers) {
        assert!(
            dom.contains(&format!("data-node=\"{}\" data-ready=\"true\"", n.name)),
            "no ready row for {}: {dom}",
            n.name
        );
        // Each node's links to its two peers are up, as it says.
        let links = a["links"].as_array().unwrap();
        assert_eq!(links.len(), 2, "{a}");
        for l in links {
            assert_eq!(l["state"], "up", "{a}");
        }
        let row = dom
            .split(&format!("data-node=\"{}\"", n.name))
            .nth(1)
            .and_then(|r| r.split("</tr>").next())
            .unwrap();
        // The term is stable here; session counts move with the health
        // probes' connections, so only their presence is checked.
        assert!(
            row.contains(&format!("data-term=\"{}\"", a["term"])),
            "{row} vs {a}"
        );
        let sessions = row
            .split("data-sessions=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|v| v.parse::<u64>().ok());
        assert!(sessions.is_some(), "no session count: {row}");
        assert_eq!(row.matches("data-link=\"up\"").count(), 2, "{row}");
    }
    screenshot(&browser, &url, "console-cluster.png").await;

    // Each node serves its own console: the same values for itself.
    let node = &c.nodes[0];
    let (_, own) = http(&node.admin.to_string(), "GET", "/status").await;
    let own: serde_json::Value = serde_json::from_str(&own).unwrap();
    let node_url = format!("http://{}/", node.admin);
    let (b, u) = (browser.clone(), node_url.clone());
    let node_dom = tokio::task::spawn_blocking(move || browse(&b, &u, &["--dump-dom".into()]))
        .await
        .unwrap();
    assert!(
        node_dom.contains("data-ready=\"1\""),
        "the node's page did not render:\n{node_dom}"
    );
    let summary = node_dom
        .split("id=\"node-summary\"")
        .nth(1)
        .and_then(|r| r.split('>').next())
        .unwrap_or_else(|| panic!("no node summary: {node_dom}"));
    for (key, want) in [
        ("data-node", own["node"].as_str().unwrap().to_string()),
        ("data-term", own["term"].to_string()),
        ("data-view", own["view"].to_string()),
        ("data-leader", own["leader"].as_str().unwrap().to_string()),
        ("data-links", "2".to_string()),
    ] {
        assert!(
            summary.contains(&format!("{key}=\"{want}\"")),
            "{key} should be {want}: {summary}"
        );
    }
    assert!(node_dom.contains("id=\"chart-messages\""), "{node_dom}");
    screenshot(&browser, &node_url, "console-node.png").await;
    lb.stop().await;
    drop(c);
}
