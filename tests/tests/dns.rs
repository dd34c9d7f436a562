//! DNS discovery against a DNS server the test runs: an A set that grows
//! from 2 to 3 and shrinks back (only the expected share of clients move),
//! SRV answers whose weights are honoured, and an outage that keeps the
//! last good set.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used
)]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use mqlb_tests::dns::{TestDns, Zone};
use mqlb_tests::raw::connect_and_ack;
use mqlb_tests::*;

const T: Duration = Duration::from_secs(10);

/// Mosquitto on `ip:port` (discovered backends share one port, as pods of
/// a headless Service do).
fn mosquitto_on(ip: &str, port: u16) -> KillOnDrop {
    let dir = scratch_dir("dns-mosquitto");
    let conf = dir.join("m.conf");
    std::fs::write(
        &conf,
        format!("listener {port} {ip}\nallow_anonymous true\n"),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_listening(&format!("{ip}:{port}"), T));
    KillOnDrop(child)
}

fn members(lb: &RunningBalancer, pool: &str) -> BTreeSet<String> {
    lb.shared
        .backends
        .snapshot()
        .iter()
        .filter(|b| b.pool == pool)
        .map(|b| b.name.clone())
        .collect()
}

fn owners(lb: &RunningBalancer, pool: &str) -> Vec<String> {
    (0..3000)
        .map(|i| {
            lb.shared
                .backends
                .candidates_in(pool, format!("dev-{i}").as_bytes())[0]
                .name
                .clone()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_follow_dns() {
    let port = free_port();
    let _brokers: Vec<KillOnDrop> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|ip| mosquitto_on(ip, port))
        .collect();
    let ip = |last: u8| Ipv4Addr::new(127, 0, 0, last);
    let mut zone = Zone {
        ttl: 1,
        ..Zone::default()
    };
    zone.a.insert("brokers.test".into(), vec![ip(2), ip(3)]);
    zone.a.insert("m2.test".into(), vec![ip(2)]);
    zone.a.insert("m3.test".into(), vec![ip(3)]);
    zone.srv.insert(
        "_mqtt._tcp.srv.test".into(),
        vec![
            (0, 1, port, "m2.test".into()),
            (0, 3, port, "m3.test".into()),
        ],
    );
    let dns = TestDns::start(zone).await;
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n\
         [[pool]]\nname = \"k8s\"\ndns = \"brokers.test\"\nport = {port}\nmin_ttl = \"100ms\"\nmax_ttl = \"500ms\"\n\
         [[pool]]\nname = \"srv\"\ndns = \"_mqtt._tcp.srv.test\"\nrecord = \"SRV\"\nmin_ttl = \"100ms\"\nmax_ttl = \"500ms\"\n\
         [[rule]]\npool = \"srv\"\nclient_id_prefix = \"s-\"\n\
         [balancer]\ndefault_pool = \"k8s\"\ndns_servers = [\"{}\"]\n[health]\nenabled = false\n",
        dns.addr
    );
    let lb = RunningBalancer::start(mqlb_config::Config::parse("<t>", &text).unwrap()).await;
    let name = |last: u8| format!("k8s/127.0.0.{last}:{port}");
    let want2: BTreeSet<String> = [name(2), name(3)].into();
    assert!(
        wait_until(T, || members(&lb, "k8s") == want2)
            .await
            .is_some(),
        "{:?}",
        members(&lb, "k8s")
    );
    // A client reaches a discovered broker.
    let (_c, ack) = connect_and_ack(&lb.addr.to_string(), "dev-live", 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);

    // SRV: port and weight from the records, names from the targets.
    let srv: BTreeSet<String> =
        [format!("srv/m2.test:{port}"), format!("srv/m3.test:{port}")].into();
    assert!(
        wait_until(T, || members(&lb, "srv") == srv).await.is_some(),
        "{:?}",
        members(&lb, "srv")
    );
    let weights: Vec<(String, u32)> = lb
        .shared
        .backends
        .snapshot()
        .iter()
        .filter(|b| b.pool == "srv")
        .map(|b| (b.name.clone(), b.weight))
        .collect();
    assert!(
        weights.contains(&(format!("srv/m2.test:{port}"), 1)),
        "{weights:?}"
    );
    assert!(
        weights.contains(&(format!("srv/m3.test:{port}"), 3)),
        "{weights:?}"
    );
    let (_s, ack) = connect_and_ack(&lb.addr.to_string(), "s-1", 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "a client of the SRV pool");

    // Grow to three: only clients that now belong to the new broker move.
    let before = owners(&lb, "k8s");
    dns.set(|z| {
        z.a.insert("brokers.test".into(), vec![ip(2), ip(3), ip(4)]);
    });
    let want3: BTreeSet<String> = [name(2), name(3), name(4)].into();
    assert!(wait_until(T, || members(&lb, "k8s") == want3)
        .await
        .is_some());
    let after = owners(&lb, "k8s");
    let moved: Vec<usize> = (0..before.len())
        .filter(|&i| before[i] != after[i])
        .collect();
    assert!(
        moved.iter().all(|&i| after[i] == name(4)),
        "a client moved between old brokers"
    );
    let share = moved.len() as f64 / before.len() as f64;
    eprintln!("grow 2 -> 3: {:.1} % of clients moved", share * 100.0);
    assert!((0.25..0.42).contains(&share), "moved {share}");

    // Shrink back: only the removed broker's clients move.
    dns.set(|z| {
        z.a.insert("brokers.test".into(), vec![ip(2), ip(3)]);
    });
    assert!(wait_until(T, || members(&lb, "k8s") == want2)
        .await
        .is_some());
    let shrunk = owners(&lb, "k8s");
    for i in 0..after.len() {
        if after[i] != name(4) {
            assert_eq!(after[i], shrunk[i], "a client of a remaining broker moved");
        }
    }
    assert_eq!(shrunk, before, "back to the original placement");

    // An outage (queries time out) keeps the last good set and says so.
    dns.set(|z| z.down = true);
    let reported = wait_until(Duration::from_secs(30), || {
        lb.shared
            .journal
            .events_json()
            .to_string()
            .contains("last set kept")
    })
    .await;
    assert!(reported.is_some(), "the failed resolution was not reported");
    assert_eq!(members(&lb, "k8s"), want2, "an outage emptied the pool");
    let (_c2, ack) = connect_and_ack(&lb.addr.to_string(), "dev-during-outage", 4).await;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    lb.stop().await;
}
