//! A steady load on one `mqlb broker` for profiling its hot paths: one
//! QoS 0 publisher into one subscriber, then sequential connects, for
//! `MQLB_HOTPATH_SECS` seconds each (default 10), printing the broker's
//! PID first so `perf record -g -p PID` can attach. With
//! `MQLB_HOTPATH_DECODE=1` the subscriber decodes every packet, as the
//! broker bench's does (a slower reader: larger batches per write).
//!
//! Run: `cargo build --release && cargo bench -p mqlb-tests --bench hotpath`
//! (`MQLB_BIN=/path/to/mqlb` profiles another build).

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::expect_used,
    missing_docs
)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mqlb_tests::raw::{self, connect_and_ack};
use mqlb_tests::{free_port, mqlb_bin, wait_listening, KillOnDrop};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() {
    let secs: u64 = std::env::var("MQLB_HOTPATH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let bin = mqlb_bin();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let broker = KillOnDrop(
        Command::new(bin)
            .args(["broker", "--listen", &addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run `cargo build --release` first"),
    );
    // Long enough for a broker started under valgrind.
    assert!(wait_listening(&addr, Duration::from_secs(120)));
    println!("broker pid {}", broker.0.id());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // `MQLB_HOTPATH_CHURN=N`: N connections opened (all at once) and
        // closed first, as the broker bench's earlier workloads do.
        let churn: usize = std::env::var("MQLB_HOTPATH_CHURN")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut held = Vec::with_capacity(churn);
        for i in 0..churn {
            held.push(connect_and_ack(&addr, &format!("churn{i}"), 4).await.0);
        }
        drop(held);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (mut sub, _) = connect_and_ack(&addr, "hot-sub", 4).await;
        sub.write_all(&raw::frame(0x82, &[0, 1, 0, 3, b'h', b'o', b't', 0]))
            .await
            .unwrap();
        let _ = raw::read_n(&mut sub, 5, Duration::from_secs(5)).await;
        let decode = std::env::var_os("MQLB_HOTPATH_DECODE").is_some();
        let reader = tokio::spawn(async move {
            let mut buf = bytes::BytesMut::with_capacity(1 << 16);
            let mut bytes = 0u64;
            let mut last = Instant::now();
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(2), sub.read_buf(&mut buf)).await
            {
                if n == 0 {
                    break;
                }
                bytes += n as u64;
                last = Instant::now();
                if decode {
                    while let Ok(Some(_)) = mqlb_protocol::decode(
                        &mut buf,
                        mqlb_protocol::ProtocolVersion::V3_1_1,
                        1 << 20,
                    ) {}
                } else {
                    buf.clear();
                }
            }
            (bytes, last)
        });
        let (mut p, _) = connect_and_ack(&addr, "hot-pub", 4).await;
        let one = raw::publish("hot", 0, 0, &[0x5A; 64]);
        let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 500).collect();
        // `MQLB_HOTPATH_BURST=N`: N messages as fast as they go, then
        // stop (the broker bench's shape), instead of a steady stream.
        let burst: Option<u64> = std::env::var("MQLB_HOTPATH_BURST")
            .ok()
            .and_then(|s| s.parse().ok());
        let start = Instant::now();
        let mut sent = 0u64;
        while burst.map_or(start.elapsed() < Duration::from_secs(secs), |n| sent < n) {
            p.write_all(&batch).await.unwrap();
            sent += 500;
        }
        let elapsed = start.elapsed().as_secs_f64();
        drop(p);
        let (bytes, last) = reader.await.unwrap();
        let got = bytes / one.len() as u64;
        println!(
            "QoS 0: {:.0} msgs/s sent, {:.0} delivered/s (until the last arrived), {} of {sent} delivered",
            sent as f64 / elapsed,
            got as f64 / (last - start).as_secs_f64(),
            got
        );
        // `MQLB_HOTPATH_CONNECTS=N`: N connects, not a duration's worth
        // (fixed work, for instruction counts under callgrind).
        let connects: Option<u64> = std::env::var("MQLB_HOTPATH_CONNECTS")
            .ok()
            .and_then(|s| s.parse().ok());
        let start = Instant::now();
        let mut n = 0u64;
        while connects.map_or(start.elapsed() < Duration::from_secs(secs), |c| n < c) {
            let (mut s, _) = connect_and_ack(&addr, &format!("hot-c{n}"), 4).await;
            s.write_all(&[0xE0, 0]).await.unwrap();
            n += 1;
        }
        println!(
            "connects: {:.0}/s",
            n as f64 / start.elapsed().as_secs_f64()
        );
    });
    // A graceful stop (SIGTERM), so a profiler wrapping the broker (such
    // as callgrind) writes its output.
    let mut broker = broker;
    let _ = Command::new("kill")
        .args(["-TERM", &broker.0.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = broker.0.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
