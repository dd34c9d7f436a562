//! Heap held per idle connection, counted by a global allocator: the
//! guard for the idle-memory figures in docs/performance.md. A count of
//! bytes, not a timing, so it fails the same way on any machine.
//!
//! The balancer runs in this process in front of a Mosquitto (its own
//! process, so its memory is not counted); the clients are blocking std
//! sockets, which hold no heap here. What grows while the idle fleet is
//! open is what the balancer keeps per connection: its task (the state
//! machine of the whole connection), registry entry, socket registrations
//! and anything a connection forgot to give back.

// A global allocator is unsafe to implement; this one only forwards to the
// system allocator and counts.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use mqlb_tests::{config, raw, Mosquitto, RunningBalancer};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call goes straight to the system allocator; the counter is
// only arithmetic on the sizes it was given.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Opens `n` MQTT connections through `addr`, each answered with a CONNACK,
/// and returns them idle.
fn open(addr: std::net::SocketAddr, n: usize, tag: &str) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&raw::connect(&format!("{tag}-{i}"), 4))
                .unwrap();
            let mut ack = [0u8; 4];
            s.read_exact(&mut ack).unwrap();
            assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "client {i} refused");
            s
        })
        .collect()
}

/// Opens `n` MQTT-over-WebSocket connections to `addr` (the handshake and
/// a masked binary frame written by hand on blocking std sockets, so the
/// clients hold no heap here), each answered with a CONNACK, and returns
/// them idle.
fn open_websocket(addr: std::net::SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(
                b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                  Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
            )
            .unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            assert!(head.starts_with(b"HTTP/1.1 101"), "client {i} not upgraded");
            let connect = raw::connect(&format!("ws-idle-{i}"), 4);
            let mask = [0x12u8, 0x34, 0x56, 0x78];
            let mut frame = vec![0x82, 0x80 | connect.len() as u8];
            frame.extend_from_slice(&mask);
            frame.extend(connect.iter().enumerate().map(|(k, b)| b ^ mask[k % 4]));
            s.write_all(&frame).unwrap();
            let mut ack = [0u8; 6];
            s.read_exact(&mut ack).unwrap();
            assert_eq!(
                ack,
                [0x82, 0x04, 0x20, 0x02, 0x00, 0x00],
                "client {i} refused"
            );
            s
        })
        .collect()
}

/// One measurement at a time: the counter is the whole process's.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Logging as `mqlb` does by default: what a subscriber keeps per
/// connection is part of what a connection costs.
fn log_as_mqlb() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(std::io::sink)
        .try_init();
}

/// Live heap bytes once the balancer has settled (its tasks finished what
/// they were doing with the last connection).
async fn settled() -> isize {
    tokio::time::sleep(Duration::from_millis(300)).await;
    LIVE.load(Ordering::Relaxed)
}

/// Heap bytes each of `n` idle connections to `addr` holds, after a
/// warm-up that brings pools and tables to size; the connections stay open.
async fn heap_per_idle_connection(
    addr: std::net::SocketAddr,
    n: usize,
) -> (Vec<std::net::TcpStream>, f64) {
    heap_per_idle(
        move |k| open(addr, k, if k == n { "idle" } else { "warm" }),
        n,
    )
    .await
}

/// Heap bytes each of `n` idle connections that `open` makes holds, after a
/// warm-up of 50; the connections (whatever `open` returns holding them)
/// stay open.
async fn heap_per_idle<T: Send + 'static>(
    open: impl Fn(usize) -> T + Send + Sync + 'static,
    n: usize,
) -> (T, f64) {
    let open = std::sync::Arc::new(open);
    let o = open.clone();
    let warm = tokio::task::spawn_blocking(move || o(50)).await.unwrap();
    drop(warm);
    let before = settled().await;
    let fleet = tokio::task::spawn_blocking(move || open(n)).await.unwrap();
    let after = settled().await;
    (fleet, (after - before) as f64 / n as f64)
}

/// The heap an idle plain-TCP proxied connection holds, logging at the
/// default `info`: 22.6 KiB when the TLS and WebSocket paths were part of
/// every connection's task (a task is as large as its largest state),
/// 2,774 bytes once they were boxed, 2,286 since (release build): the
/// connection's set-up (PROXY header, CONNECT, placement, backend connect)
/// runs in a boxed future freed once the client is placed, the placement's
/// box is freed rather than kept to the end, and the task holds only the
/// splice and what it keeps (a 1,536-byte task, two 256-byte socket
/// registrations, the eviction switch and the registry entry). One more
/// 128-byte step of the task, or a span kept at `info` (about 360 bytes),
/// fails the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_plain_connection_holds_little_heap() {
    const N: usize = 400;
    let _one = SERIAL.lock().await;
    log_as_mqlb();
    let broker = Mosquitto::start_with("max_connections -1");
    let lb = RunningBalancer::start(config(&[("m", broker.addr())], "")).await;
    let addr = lb.addr;
    // Warm up: pools, registry shards, tokio's slabs reach their size.
    let (fleet, per) = heap_per_idle_connection(addr, N).await;
    println!("heap per idle proxied connection: {per:.0} bytes ({N} connections)");
    assert_eq!(lb.shared.registry.len(), N, "the fleet is not all placed");
    assert!(
        per < 2400.0,
        "an idle plain connection holds {per:.0} bytes of heap (bound 2400)"
    );
    drop(fleet);
    lb.stop().await;
}

/// The heap an idle client of the bundled broker holds: its connection
/// task, session, mailbox and socket registration. 3,232 bytes (release)
/// when everything up to the CONNACK stayed in the task; 2,336 once it was
/// boxed and freed; 1,955 since an idle connection holds no read buffer
/// (freed when a read would block with nothing buffered) and its task
/// keeps neither its arguments nor its span: a 1,024-byte task, the
/// 256-byte socket registration, the 184-byte mailbox, 64 bytes for the
/// split stream and three small strings, plus the core's tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_broker_client_holds_little_heap() {
    const N: usize = 400;
    let _one = SERIAL.lock().await;
    log_as_mqlb();
    let broker = mqlb_broker::server::Broker::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = broker.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(broker.serve(stop.clone()));
    let (fleet, per) = heap_per_idle_connection(addr, N).await;
    println!("heap per idle broker client: {per:.0} bytes ({N} connections)");
    assert!(
        per < 2100.0,
        "an idle broker client holds {per:.0} bytes of heap (bound 2100)"
    );
    drop(fleet);
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
}

/// A balancer with one listener (`listener`: its TOML lines after the
/// address) in front of `broker`.
async fn balancer_with(listener: &str, broker: &Mosquitto) -> RunningBalancer {
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n{listener}\n\
         [[backend]]\nname = \"m\"\naddress = \"{}\"\n",
        broker.addr()
    );
    RunningBalancer::start(mqlb_config::Config::parse("<test>", &text).unwrap()).await
}

/// The heap an idle MQTT-over-WebSocket client of the balancer holds: 139
/// KiB of RSS each while tungstenite kept its default 128 KiB read buffer
/// (allocated at once, zeroed on every read); 11,142 bytes with a 4 KiB
/// one; 9,710 since the set-up's future (sized by the plain path's
/// placement) is freed before the WebSocket client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_connection_holds_no_large_buffer() {
    const N: usize = 200;
    let _one = SERIAL.lock().await;
    log_as_mqlb();
    let broker = Mosquitto::start_with("max_connections -1");
    let lb = balancer_with("kind = \"websocket\"", &broker).await;
    let addr = lb.addr;
    let (fleet, per) = heap_per_idle(move |k| open_websocket(addr, k), N).await;
    println!("heap per idle WebSocket connection: {per:.0} bytes ({N} connections)");
    assert_eq!(lb.shared.registry.len(), N, "the fleet is not all placed");
    assert!(
        per < 10_240.0,
        "an idle WebSocket connection holds {per:.0} bytes of heap (bound 10240)"
    );
    drop(fleet);
    lb.stop().await;
}

/// Holds `n` TLS clients (Python's ssl, in its own process so that their
/// memory is not counted here) connected through `addr`, each after its
/// CONNACK, until standard input closes; prints "ready" once they are.
const TLS_CLIENTS: &str = r#"
import socket, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for i in range(n):
    s = ctx.wrap_socket(socket.create_connection((host, port), timeout=10))
    cid = ("tls-idle-%d" % i).encode()
    vh = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    s.sendall(bytes([0x10, len(vh)]) + vh)
    assert s.recv(4) == b"\x20\x02\x00\x00", i
    held.append(s)
print("ready", flush=True)
sys.stdin.read()
"#;

/// Runs [`TLS_CLIENTS`] for `n` clients and returns it once they are all
/// connected (dropping it closes them).
fn tls_clients(addr: std::net::SocketAddr, n: usize) -> mqlb_tests::KillOnDrop {
    use std::io::BufRead;
    let mut child = std::process::Command::new("python3")
        .args(["-c", TLS_CLIENTS])
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(n.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    let out = child.stdout.take().unwrap();
    std::io::BufReader::new(out).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "the TLS clients did not all connect");
    mqlb_tests::KillOnDrop(child)
}

/// The heap an idle TLS client of the balancer holds: 23.2 KiB of RSS each
/// when the WebSocket upgrade's state (12 KiB) sized every TLS
/// connection's future, WebSocket or not; 16.4 KiB since (HAProxy 17.2),
/// 16,206 bytes of heap in a release build. Of what is left, most is
/// rustls: its connection, record keys and received-record buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tls_connection_holds_no_websocket_state() {
    const N: usize = 200;
    let _one = SERIAL.lock().await;
    log_as_mqlb();
    let broker = Mosquitto::start_with("max_connections -1");
    let (dir, _) = mqlb_tests::pki::server_certificate();
    let tls = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    );
    let lb = balancer_with(&tls, &broker).await;
    let addr = lb.addr;
    let (fleet, per) = heap_per_idle(move |k| tls_clients(addr, k), N).await;
    println!("heap per idle TLS connection: {per:.0} bytes ({N} connections)");
    assert_eq!(lb.shared.registry.len(), N, "the fleet is not all placed");
    assert!(
        per < 17_408.0,
        "an idle TLS connection holds {per:.0} bytes of heap (bound 17408)"
    );
    drop(fleet);
    lb.stop().await;
}
