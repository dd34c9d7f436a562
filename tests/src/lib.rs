//! Fixtures for end-to-end tests: real brokers, real balancers, real clients,
//! all on loopback, all stopped when dropped.
//!
//! * [`Mosquitto`]: a Debian `mosquitto` process on a free port whose log
//!   tells which client IDs connected to it.
//! * [`RunningBalancer`]: an in-process balancer bound to port 0.
//! * [`CountingBackend`]: a TCP listener that only counts connections, to
//!   prove the balancer opened none.
//! * [`raw`]: byte-level MQTT client helpers, so tests assert on wire bytes
//!   and do not depend on our own codec to judge our own codec.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    missing_docs
)]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqlb_balancer::shared::Shared;
use mqlb_config::Config;
use tokio_util::sync::CancellationToken;

pub mod client;
pub mod cluster;
pub mod dns;
pub mod exposition;
pub mod load;
pub mod pki;
pub mod raw;
pub mod statestore;

/// The `mqlb` binary built by this `cargo test` run. Cargo builds it for
/// `balancer/tests/cli.rs`; it sits in the target directory next to `deps/`.
/// `MQLB_BIN` names another build instead (a bench run on an older one,
/// to compare).
pub fn mqlb_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("MQLB_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("mqlb");
    assert!(
        bin.exists(),
        "{} is missing: run the workspace tests (cargo test), which build it",
        bin.display()
    );
    bin
}

/// A port that was free a moment ago on 127.0.0.1, for a process the test
/// starts to bind.
///
/// Chosen below the kernel's ephemeral range (32768-60999 by default):
/// a port from `bind(0)` comes from that range, so between our check and
/// the child's bind an outgoing connection anywhere on the machine could
/// take it as its local port ("did not listen", seen in CI). Below the
/// range only another explicit bind can, and no port is handed out twice
/// in one test process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..1000 {
        let port = fastrand::u16(20_000..32_000);
        if given.contains(&port) {
            continue;
        }
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh scratch directory, removed by the fixture that owns it.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "mqlb-test-{}-{}-{}",
        std::process::id(),
        tag,
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    // Mosquitto started as root drops to the `mosquitto` user, which must
    // still be able to write its log here.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// Blocks until something accepts TCP on `addr`, at most `within`.
pub fn wait_listening(addr: &str, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if std::net::TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A Mosquitto broker process.
pub struct Mosquitto {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    log: PathBuf,
}

impl Mosquitto {
    /// Starts `mosquitto` on a free loopback port with anonymous access and
    /// TCP_NODELAY, logging connections to a file.
    pub fn start() -> Mosquitto {
        Self::start_with("")
    }

    /// Like [`Mosquitto::start`] with extra configuration lines.
    pub fn start_with(extra: &str) -> Mosquitto {
        for _ in 0..5 {
            let port = free_port();
            let dir = scratch_dir("mosquitto");
            let conf = dir.join("mosquitto.conf");
            let log = dir.join("mosquitto.log");
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n\
                     log_dest file {}\nlog_type all\nconnection_messages true\n{extra}\n",
                    log.display()
                ),
            )
            .unwrap();
            let child = Command::new("mosquitto")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("mosquitto not installed: run .ci/run or apt-get install mosquitto");
            let mut m = Mosquitto {
                port,
                child: Some(child),
                dir,
                log,
            };
            if wait_listening(&m.addr(), Duration::from_secs(5)) {
                return m;
            }
            m.kill();
        }
        panic!("mosquitto did not start");
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Client IDs that connected so far, in order.
    pub fn clients(&self) -> Vec<String> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter_map(|l| {
                let rest = l.split(" connected from ").nth(1)?;
                let id = rest.split(" as ").nth(1)?;
                Some(id.rsplit_once(" (")?.0.to_string())
            })
            .collect()
    }

    /// The broker's log file.
    pub fn log_path(&self) -> &std::path::Path {
        &self.log
    }

    /// Waits until `id` has connected here, at most `within`.
    pub fn saw_client(&self, id: &str, within: Duration) -> bool {
        let end = Instant::now() + within;
        loop {
            if self.clients().iter().any(|c| c == id) {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process ID, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (for example SIGSTOP / SIGCONT) to the process.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.signal("CONT");
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Builds a validated config: one listener on 127.0.0.1:0 and the given
/// `(name, address)` backends, plus extra `[balancer]` lines.
pub fn config(backends: &[(&str, String)], balancer_toml: &str) -> Config {
    let mut text = String::from("[[listener]]\naddress = \"127.0.0.1:0\"\n");
    for (name, addr) in backends {
        text.push_str(&format!(
            "[[backend]]\nname = \"{name}\"\naddress = \"{addr}\"\n"
        ));
    }
    text.push_str("[balancer]\nbackend_connect_timeout = \"1s\"\n");
    text.push_str(balancer_toml);
    Config::parse("<test>", &text).unwrap()
}

/// The admin token every fixture configures and [`http`] sends: admin
/// APIs refuse state-changing calls without one.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// A file holding [`ADMIN_TOKEN`], written once per test process.
pub fn admin_token_file() -> PathBuf {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let dir = scratch_dir("admin-token");
        let path = dir.join("token");
        std::fs::write(&path, ADMIN_TOKEN).unwrap();
        path
    })
    .clone()
}

/// A balancer running in this process.
pub struct RunningBalancer {
    pub addr: SocketAddr,
    /// Every listener's address, in configuration order (`addr` is the first).
    pub addrs: Vec<SocketAddr>,
    /// The admin API, when the config enables it.
    pub admin: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningBalancer {
    /// Binds and serves `config` on the current runtime.
    /// With an admin API and no token file, [`ADMIN_TOKEN`]'s is used.
    pub async fn start(mut config: Config) -> RunningBalancer {
        if config.admin.is_some() && config.admin_access.token_file.is_none() {
            config.admin_access.token_file = Some(admin_token_file());
        }
        let grace = config.eviction.shutdown_grace;
        let b = mqlb_balancer::Balancer::bind(config).await.unwrap();
        let addrs = b.local_addrs();
        let addr = addrs[0];
        let admin = b.admin_addr();
        let shared = b.shared();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(b.serve(shutdown.clone(), grace));
        RunningBalancer {
            addr,
            addrs,
            admin,
            shared,
            shutdown,
            task: Some(task),
        }
    }

    /// Begins a graceful shutdown, as SIGTERM does, without waiting.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits up to `within` for serving to end after a shutdown; true if it did.
    pub async fn finished(&mut self, within: Duration) -> bool {
        let Some(t) = self.task.as_mut() else {
            return true;
        };
        let done = tokio::time::timeout(within, t).await.is_ok();
        if done {
            self.task = None;
        }
        done
    }

    /// Stops serving and waits for the tasks to end.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }

    /// TCP connects to backend `name` that failed so far.
    pub fn connect_failures(&self, name: &str) -> u64 {
        self.shared
            .backends
            .get(name)
            .map_or(0, |b| b.connect_failures.load(Ordering::Relaxed))
    }

    /// Which backend `client_id` is placed on first, by the balancer's own rule.
    pub fn first_choice(&self, client_id: &str) -> String {
        self.shared.backends.candidates(client_id.as_bytes())[0]
            .name
            .clone()
    }
}

impl Drop for RunningBalancer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A TCP listener that counts connections and holds them open.
pub struct CountingBackend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingBackend {
    pub async fn start() -> CountingBackend {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        CountingBackend {
            addr,
            accepted,
            task,
        }
    }

    pub fn count(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CountingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A Python 3 interpreter that can import paho-mqtt (Debian's
/// python3-paho-mqtt installs for /usr/bin/python3).
pub fn python_with_paho() -> Option<PathBuf> {
    for p in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(p)
            .args(["-c", "import paho.mqtt.client"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// The position of backend `bN` in a list of brokers started in order.
pub fn backend_index(name: &str) -> usize {
    name[1..]
        .parse::<usize>()
        .expect("backend names are b1, b2, ...")
        - 1
}

/// Client IDs (with `prefix`) that the balancer places first on `backend`.
pub fn ids_on(b: &RunningBalancer, backend: &str, prefix: &str, n: usize) -> Vec<String> {
    (0..100_000)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|id| b.first_choice(id) == backend)
        .take(n)
        .collect()
}

/// [`http`], but `None` instead of a panic when nothing answers (a node
/// that is still starting).
pub async fn try_http(addr: &str, method: &str, path: &str) -> Option<(u16, String)> {
    try_http_with(
        addr,
        method,
        path,
        &format!("Host: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"),
    )
    .await
}

/// An HTTP/1.1 request with exactly the given header lines (each ending in
/// CRLF): for tests of who may call an admin API.
pub async fn try_http_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// A minimal HTTP/1.1 request over a fresh connection: returns status and body.
pub async fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    try_http(addr, method, path)
        .await
        .unwrap_or_else(|| panic!("no HTTP response from {addr}{path} within 5 s"))
}

/// Polls `f` every 10 ms until it is true or `within` passes; returns the
/// time it took, or `None` on timeout.
pub async fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if f() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// The bundled broker, in this process, on a free port.
pub struct OurBroker {
    pub addr: SocketAddr,
    /// Each `[[broker.listener]]`'s bound address, in order.
    pub listeners: Vec<SocketAddr>,
    /// Its state, to look inside sessions after the fact.
    pub state: Arc<mqlb_broker::state::State>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl OurBroker {
    pub async fn start() -> OurBroker {
        Self::start_with(mqlb_config::broker::BrokerConfig::default()).await
    }

    /// With a configuration; its listen address is replaced by a free port.
    pub async fn start_with(mut config: mqlb_config::broker::BrokerConfig) -> OurBroker {
        config.listen = "127.0.0.1:0".parse().unwrap();
        let b = mqlb_broker::Broker::bind_config(&config).await.unwrap();
        let addr = b.local_addr().unwrap();
        let listeners = b.listener_addrs().into_iter().map(|(_, a)| a).collect();
        let state = b.state();
        let shutdown = CancellationToken::new();
        let shutdown_for_task = shutdown.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = b.serve(shutdown_for_task).await {
                eprintln!("the broker stopped on a failed data directory: {e}");
            }
        });
        OurBroker {
            addr,
            listeners,
            state,
            shutdown,
            task: Some(task),
        }
    }

    /// Begins a graceful shutdown, as SIGTERM does, without waiting.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits up to `within` for serving to end; true if it did.
    pub async fn finished(&mut self, within: Duration) -> bool {
        let Some(t) = self.task.as_mut() else {
            return true;
        };
        let done = tokio::time::timeout(within, t).await.is_ok();
        if done {
            self.task = None;
        }
        done
    }
}

impl Drop for OurBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `mqlb broker` as its own process on a free port, so that a crash shows as
/// a dead process instead of taking the test with it.
pub struct BrokerProcess {
    pub addr: String,
    child: KillOnDrop,
}

impl BrokerProcess {
    /// Starts `mqlb broker --listen 127.0.0.1:PORT` plus `extra` arguments.
    pub fn start(extra: &[&str]) -> BrokerProcess {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(mqlb_bin())
            .args(["broker", "--listen", &addr])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(wait_listening(&addr, Duration::from_secs(10)));
        BrokerProcess {
            addr,
            child: KillOnDrop(child),
        }
    }

    /// `kill -9`: the process dies at once, as in a power loss (what it
    /// had not fsynced is what the kernel had not written either way).
    pub fn kill(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }

    /// True while the process has not exited.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(None))
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Waits up to `within` for the process to exit; its status if it did.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.0.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// A child process killed (and reaped) when dropped, so a failing test never
/// leaves it running.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One paho-mqtt (Python) client that subscribes to a topic, publishes to it
/// at `qos`, and waits for its own message. `proto` is "31", "311" or "5".
/// Panics unless the message came back within 10 s.
pub async fn paho_roundtrip(port: u16, proto: &'static str, client_id: &str, qos: u8) {
    const SCRIPT: &str = r#"
import sys, threading, paho.mqtt.client as mqtt
port, proto, cid, qos = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
version = {"31": mqtt.MQTTv31, "311": mqtt.MQTTv311, "5": mqtt.MQTTv5}[proto]
got = threading.Event()
c = mqtt.Client(client_id=cid, protocol=version)
c.on_connect = lambda c, u, f, rc, p=None: c.subscribe("paho/" + cid, qos=qos)
c.on_subscribe = lambda c, u, mid, g, p=None: c.publish("paho/" + cid, "hi-" + proto, qos=qos)
def on_message(c, u, m):
    print(m.payload.decode()); got.set()
c.on_message = on_message
c.connect("127.0.0.1", port, 30); c.loop_start()
ok = got.wait(10); c.disconnect(); c.loop_stop()
sys.exit(0 if ok else 1)
"#;
    let python = python_with_paho()
        .expect("paho-mqtt missing: run .ci/run or apt-get install python3-paho-mqtt");
    let id = client_id.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args([
                "-c",
                SCRIPT,
                &port.to_string(),
                proto,
                &id,
                &qos.to_string(),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "paho {proto}: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("hi-{proto}")
    );
}

/// paho-mqtt over WebSocket (`wss` when `cafile` is given): subscribes,
/// publishes at QoS 1, and waits for its own message. `proto` is "311" or
/// "5". Panics unless the message came back within 10 s.
pub async fn paho_ws(
    port: u16,
    path: &str,
    proto: &'static str,
    cid: &str,
    cafile: Option<&std::path::Path>,
) {
    const SCRIPT: &str = r#"
import sys, threading, paho.mqtt.client as mqtt
port, path, proto, cid, cafile = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
version = {"311": mqtt.MQTTv311, "5": mqtt.MQTTv5}[proto]
got = threading.Event()
c = mqtt.Client(client_id=cid, protocol=version, transport="websockets")
c.ws_set_options(path=path)
if cafile:
    c.tls_set(ca_certs=cafile)
c.on_connect = lambda c, u, f, rc, p=None: c.subscribe("ws/" + cid, qos=1)
c.on_subscribe = lambda c, u, mid, g, p=None: c.publish("ws/" + cid, "hi-ws-" + proto, qos=1)
def on_message(c, u, m):
    print(m.payload.decode()); got.set()
c.on_message = on_message
c.connect("127.0.0.1", port, 30); c.loop_start()
ok = got.wait(10); c.disconnect(); c.loop_stop()
sys.exit(0 if ok else 1)
"#;
    let python = python_with_paho()
        .expect("paho-mqtt missing: run .ci/run or apt-get install python3-paho-mqtt");
    let (path, cid) = (path.to_string(), cid.to_string());
    let cafile = cafile.map(|p| p.display().to_string()).unwrap_or_default();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(["-c", SCRIPT, &port.to_string(), &path, proto, &cid, &cafile])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "paho over WebSocket, {proto}: {out:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("hi-ws-{proto}")
    );
}

/// rumqttc over WebSocket (path `/mqtt`): subscribes, publishes at QoS 1,
/// and waits for its own message. Panics unless it came back within 10 s.
pub async fn rumqttc_ws(addr: std::net::SocketAddr, id: &str) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
    let url = format!("ws://{addr}/mqtt");
    let mut opts = MqttOptions::new(id, url, addr.port());
    opts.set_transport(Transport::Ws);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 10);
    client
        .subscribe("ws/rumqttc", QoS::AtLeastOnce)
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    client
                        .publish("ws/rumqttc", QoS::AtLeastOnce, false, "hi-rumqttc")
                        .await
                        .unwrap();
                }
                Ok(Event::Incoming(Packet::Publish(p))) => return p.payload,
                Ok(_) => {}
                Err(e) => panic!("rumqttc over WebSocket: {e}"),
            }
        }
    })
    .await
    .expect("rumqttc got nothing back over WebSocket");
    assert_eq!(&got[..], b"hi-rumqttc");
}
