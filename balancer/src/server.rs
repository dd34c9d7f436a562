//! Listeners and the per-connection task.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use mqlb_config::Config;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{field, Instrument};

use mqlb_healthcheck::{
    CheckSettings, Checker, Observer, Outcome, ProbeSpec, Target, Thresholds, Transition,
};
use mqlb_protocol::{ProtocolVersion, RefusalStyle};

use crate::evict::Evictor;
use crate::forward;
use crate::handshake::{self, read_connect};
use crate::limit::ConnectionLimit;
use crate::metrics::{GaugeGuard, Metrics, RejectReason};
use crate::registry::Registry;
use crate::select::{placement_key, Backends};
use crate::shared::Shared;

/// Feeds probe results into metrics, and moves clients off a backend that
/// goes down.
struct HealthObserver {
    backends: Arc<Backends>,
    evictor: Evictor,
    journal: Arc<crate::journal::Journal>,
}

impl Observer for HealthObserver {
    fn on_probe(&self, target: &str, outcome: &Outcome) {
        if let Some(b) = self.backends.get(target) {
            let i = match outcome {
                Outcome::Up(r) => {
                    b.probe_rtt.observe(r.ping);
                    0
                }
                Outcome::Down(_) => 1,
                Outcome::Misconfigured(_) => 2,
            };
            crate::metrics::bump(&b.probes, i);
        }
    }

    fn on_transition(&self, target: &str, t: Transition) {
        let mut why = None;
        if let Some(b) = self.backends.get(target) {
            crate::metrics::bump(&b.transitions, t.to as usize);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            b.last_transition_ms.store(now, Ordering::Relaxed);
            why = b.health().and_then(|h| match &h.report().last_outcome {
                Some(o @ (Outcome::Down(_) | Outcome::Misconfigured(_))) => Some(o.summary()),
                _ => None,
            });
        }
        // The event says why ("down: connection refused"), as the log does.
        let what = format!("{} -> {}", t.from.label(), t.to.label());
        self.journal.record(
            "health",
            target,
            match why {
                Some(why) if !t.to.is_usable() => format!("{what}: {why}"),
                _ => what,
            },
        );
        if !t.to.is_usable() {
            self.evictor.evict_backend(target);
        }
    }
}

/// The probe settings from configuration.
fn check_settings(h: &mqlb_config::HealthSettings) -> CheckSettings {
    CheckSettings {
        interval: h.interval,
        jitter: h.jitter,
        thresholds: Thresholds {
            rise: h.rise,
            fall: h.fall,
            passive_fall: h.passive_fall,
        },
        spec: ProbeSpec {
            version: match h.protocol {
                mqlb_config::ProbeProtocol::V311 => ProtocolVersion::V3_1_1,
                mqlb_config::ProbeProtocol::V5 => ProtocolVersion::V5,
            },
            timeout: h.timeout,
            client_id: String::new(),
            username: h.username.clone(),
            password: h.password.clone(),
            deep: h.deep,
            deep_topic: h.deep_topic.clone(),
            proxy_local: false,
            tls: None,
            websocket: None,
        },
    }
}

/// A balancer with its listeners bound, ready to serve.
///
/// Binding is separate from serving so that callers (tests, the CLI) learn
/// the real addresses of port-0 listeners before traffic starts.
#[derive(Debug)]
pub struct Balancer {
    shared: Arc<Shared>,
    /// Per listener, one socket per worker thread (an `SO_REUSEPORT`
    /// group: see [`workers`]).
    listeners: Vec<(
        mqlb_config::Listener,
        Vec<std::net::TcpListener>,
        Option<Arc<mqlb_listener::tls::Slot>>,
    )>,
    admin: Option<TcpListener>,
    /// Stops the checker and evictor when serving ends.
    background: CancellationToken,
}

impl Balancer {
    /// Binds every configured listener.
    pub async fn bind(config: Config) -> io::Result<Balancer> {
        // Unusable backend TLS files stop the start, naming the backend
        // (a reload with them skips that backend instead).
        for b in &config.backends {
            if let Some(t) = &b.tls {
                crate::select::tls_client(t).map_err(|e| {
                    io::Error::new(e.kind(), format!("backend {} TLS: {e}", b.name))
                })?;
            }
        }
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let tls = match &l.tls {
                Some(files) => Some(Arc::new(
                    mqlb_listener::tls::Slot::new(&l.name, files).map_err(|e| {
                        io::Error::new(e.kind(), format!("listener {} TLS: {e}", l.name))
                    })?,
                )),
                None => None,
            };
            let group = bind_group(l.address, workers()).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("listener {} on {}: {e}", l.name, l.address),
                )
            })?;
            listeners.push((l.clone(), group, tls));
        }
        let admin = match config.admin {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("admin API on {addr}: {e}")))?,
            ),
            None => None,
        };
        let admin_access = match &admin {
            Some(l) => Some(Arc::new(crate::http::Access::new(
                &config.admin_access,
                l.local_addr()?,
            )?)),
            None => None,
        };
        let background = CancellationToken::new();
        let backends = Arc::new(Backends::new(&config.backends));
        let journal = Arc::new(crate::journal::Journal::default());
        let registry = Arc::new(Registry::default());
        let evictor = Evictor::spawn(
            registry.clone(),
            backends.clone(),
            config.eviction.rate,
            config.eviction.server_reference.clone(),
            journal.clone(),
            background.clone(),
        );
        let checker = if config.health.enabled {
            let targets: Vec<Target> = backends
                .snapshot()
                .iter()
                .map(|b| b.probe_target())
                .collect();
            let observer = Arc::new(HealthObserver {
                backends: backends.clone(),
                evictor: evictor.clone(),
                journal: journal.clone(),
            });
            let instance = format!("{:08x}", fastrand::u32(..));
            Some(Checker::spawn(
                &targets,
                &check_settings(&config.health),
                &instance,
                observer,
                background.clone(),
            ))
        } else {
            None
        };
        if let Some(checker) = &checker {
            for b in backends.snapshot().iter() {
                if let Some(cell) = checker.cell(&b.name) {
                    b.attach_health(cell);
                }
            }
        }
        let limit = ConnectionLimit::new(config.balancer.max_connections);
        let admission = Arc::new(crate::admission::Admission::new(config.admission.clone()));
        let resolver = crate::discovery::resolver(&config.balancer.dns_servers);
        let sources = forward::Sources::new(config.balancer.source_addresses.clone());
        sources.check()?;
        let shared = Arc::new(Shared {
            backends,
            metrics: Metrics::default(),
            registry,
            evictor,
            config: ArcSwap::from_pointee(config),
            checker: checker.map(Mutex::new),
            config_path: std::sync::OnceLock::new(),
            limit,
            sources: ArcSwap::from_pointee(sources),
            admission,
            dns_members: Mutex::new(std::collections::HashMap::new()),
            resolver,
            journal,
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            tls: Mutex::new(listeners.iter().filter_map(|(_, _, t)| t.clone()).collect()),
            admin_access,
            started: std::time::SystemTime::now(),
        });
        // One sample of every backend and of the totals a second, for the
        // console's charts.
        let (sampled, sampler_stop) = (shared.clone(), background.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => sampled
                        .journal
                        .sample(&sampled.backends.snapshot(), &sampled.metrics),
                    _ = sampler_stop.cancelled() => return,
                }
            }
        });
        tokio::spawn(crate::clusterview::follow(
            shared.clone(),
            background.clone(),
        ));
        for pool in shared.config().dns_pools.clone() {
            tokio::spawn(crate::discovery::follow(
                shared.clone(),
                pool,
                background.clone(),
            ));
        }
        // Forget idle source IPs, so per-IP state stays as small as the set
        // of recently active clients.
        let (swept, sweep_stop) = (shared.clone(), background.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => swept.admission.sweep(),
                    _ = sweep_stop.cancelled() => return,
                }
            }
        });
        Ok(Balancer {
            shared,
            listeners,
            admin,
            background,
        })
    }

    /// The admin API's bound address, when enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound addresses, in configuration order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(_, g, _)| g.first().and_then(|l| l.local_addr().ok()))
            .collect()
    }

    /// Shared state, for the admin API and tests.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` is cancelled, then shuts down gracefully:
    ///
    /// 1. stops accepting, and `/readyz` answers 503 so a load balancer in
    ///    front stops sending;
    /// 2. closes clients that have not finished their CONNECT (they have no
    ///    backend session yet);
    /// 3. closes forwarded clients at the eviction rate, each at a packet
    ///    boundary, v5 clients with DISCONNECT 0x8B (or 0x9C), so they
    ///    reconnect to another replica without a storm;
    /// 4. after `grace`, cuts whoever is left.
    ///
    /// The admin API serves until the end.
    pub async fn serve(self, shutdown: CancellationToken, grace: Duration) {
        let _stop_background = self.background.clone().drop_guard();
        // Cancelled when the grace period is over: the hard stop.
        let hard = CancellationToken::new();
        let _stop_hard = hard.clone().drop_guard();
        let admin = self.admin.map(|admin| {
            tokio::spawn(crate::admin::serve(
                admin,
                self.shared.clone(),
                hard.clone(),
            ))
        });
        // Rotated certificates are picked up from disk, no reload needed.
        let watched: Vec<_> = self
            .listeners
            .iter()
            .filter_map(|(_, _, t)| t.clone())
            .collect();
        if !watched.is_empty() {
            let shared = self.shared.clone();
            let stop = hard.clone();
            tokio::spawn(async move {
                let m = &shared.metrics;
                mqlb_listener::tls::watch(
                    || watched.clone(),
                    mqlb_listener::tls::WATCH_INTERVAL,
                    stop.cancelled(),
                    |slot, r| match r {
                        mqlb_listener::tls::Refresh::Reloaded => {
                            m.tls_reloads.fetch_add(1, Ordering::Relaxed);
                            shared.journal.record(
                                "tls",
                                &slot.listener,
                                "certificate files changed: re-read",
                            );
                        }
                        mqlb_listener::tls::Refresh::Failed(e) => {
                            m.tls_reload_failures.fetch_add(1, Ordering::Relaxed);
                            shared.journal.record(
                                "tls",
                                &slot.listener,
                                format!("changed files unusable, old certificate kept: {e}"),
                            );
                        }
                        mqlb_listener::tls::Refresh::Unchanged => {}
                    },
                )
                .await;
            });
        }
        let tracker = TaskTracker::new();
        let stops = Stops {
            graceful: shutdown.clone(),
            hard: hard.clone(),
        };
        // Worker k serves socket k of every listener, on its own thread.
        let mut per_worker: Vec<Vec<_>> = Vec::new();
        for (spec, group, tls) in self.listeners {
            let address = group.first().and_then(|l| l.local_addr().ok());
            tracing::info!(listener = %spec.name, address = address.map(field::display), workers = group.len(), "listening");
            for (k, socket) in group.into_iter().enumerate() {
                if per_worker.len() <= k {
                    per_worker.resize_with(k + 1, Vec::new);
                }
                if let Some(w) = per_worker.get_mut(k) {
                    w.push((spec.clone(), socket, tls.clone()));
                }
            }
        }
        let workers_done = CancellationToken::new();
        let _stop_workers = workers_done.clone().drop_guard();
        let mut exited = Vec::new();
        for (k, sockets) in per_worker.into_iter().enumerate() {
            exited.push(spawn_worker(
                k,
                sockets,
                self.shared.clone(),
                tracker.clone(),
                stops.clone(),
                workers_done.clone(),
            ));
        }
        shutdown.cancelled().await;
        let open = self.shared.registry.len();
        let rate = self.shared.config().eviction.rate;
        self.shared.shutting_down.store(true, Ordering::Relaxed);
        tracing::info!(
            open,
            rate,
            grace = ?grace,
            "shutting down: closing clients at the eviction rate"
        );
        if open as f64 / f64::from(rate.max(1)) > grace.as_secs_f64() {
            tracing::warn!(
                open,
                rate,
                grace = ?grace,
                "the grace period is too short to close every client at the eviction rate; the rest will be cut"
            );
        }
        self.shared.evictor.evict_all();
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::info!(
                open = self.shared.registry.len(),
                "grace period over; closing remaining connections"
            );
            hard.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
        }
        hard.cancel();
        workers_done.cancel();
        for w in exited {
            let _ = tokio::time::timeout(Duration::from_secs(1), w).await;
        }
        if let Some(admin) = admin {
            let _ = tokio::time::timeout(Duration::from_secs(1), admin).await;
        }
    }
}

/// The two ways serving stops.
#[derive(Debug, Clone)]
struct Stops {
    /// Stop accepting, abandon handshakes, close clients at the paced rate.
    graceful: CancellationToken,
    /// Close everything now.
    hard: CancellationToken,
}

/// How many threads accept and serve clients: one per core. Each has its
/// own single-threaded runtime and its own socket of every listener (an
/// `SO_REUSEPORT` group, the kernel spreading connections over them), so a
/// client is accepted, placed, connected to its backend and spliced on one
/// thread, with no hand-off between threads and no wake-up of another
/// (a work-stealing runtime woke an idle worker for each spawned
/// connection). HAProxy's and nginx's shape.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Binds `n` listening sockets to `addr` as one `SO_REUSEPORT` group (for
/// port 0, the port the first one got). A plain bind first: it fails when
/// anything already listens there, so a second `mqlb` on the same port is
/// refused as before instead of quietly sharing its clients.
fn bind_group(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    use nix::sys::socket::{
        self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage,
    };
    use std::os::fd::AsRawFd;
    let addr = std::net::TcpListener::bind(addr)?.local_addr()?;
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    (0..n.max(1))
        .map(|_| {
            let fd = socket::socket(
                family,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            socket::setsockopt(&fd, sockopt::ReusePort, &true)?;
            // Accepted sockets inherit it: no `setsockopt` per client.
            socket::setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
            socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
            // tokio's backlog for `TcpListener::bind`.
            socket::listen(&fd, Backlog::new(1024)?)?;
            Ok(std::net::TcpListener::from(fd))
        })
        .collect()
}

/// Worker `k`: a thread with a single-threaded runtime that accepts on its
/// sockets and serves those clients until `done`. The returned future ends
/// when the thread has.
fn spawn_worker(
    k: usize,
    sockets: Vec<(
        mqlb_config::Listener,
        std::net::TcpListener,
        Option<Arc<mqlb_listener::tls::Slot>>,
    )>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    stops: Stops,
    done: CancellationToken,
) -> tokio::sync::oneshot::Receiver<()> {
    let (exited, on_exit) = tokio::sync::oneshot::channel();
    let run = move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                // Its sockets close with this thread and leave the group:
                // the other workers take every client.
                tracing::error!(worker = k, error = %e, "cannot start a worker runtime");
                return;
            }
        };
        rt.block_on(async move {
            for (spec, socket, tls) in sockets {
                let name = spec.name.clone();
                match TcpListener::from_std(socket) {
                    Ok(listener) => {
                        tokio::spawn(tracker.track_future(accept_loop(
                            spec,
                            listener,
                            tls,
                            shared.clone(),
                            tracker.clone(),
                            stops.clone(),
                        )));
                    }
                    Err(e) => {
                        tracing::error!(listener = %name, worker = k, error = %e, "cannot serve a listener socket")
                    }
                }
            }
            done.cancelled().await;
        });
        let _ = exited.send(());
    };
    if let Err(e) = std::thread::Builder::new()
        .name(format!("mqlb-worker-{k}"))
        .spawn(run)
    {
        tracing::error!(worker = k, error = %e, "cannot start a worker thread");
    }
    on_exit
}

async fn accept_loop(
    spec: mqlb_config::Listener,
    listener: TcpListener,
    tls: Option<Arc<mqlb_listener::tls::Slot>>,
    shared: Arc<Shared>,
    conns: TaskTracker,
    stops: Stops,
) {
    let shutdown = stops.graceful.clone();
    let name = spec.name.clone();
    let info = Arc::new(ListenerInfo {
        name: spec.name,
        style: match spec.connect_refusal {
            mqlb_config::ConnectRefusal::Close => RefusalStyle::Close,
            mqlb_config::ConnectRefusal::ReasonCode => RefusalStyle::ReasonCode,
        },
        proxy_trusted: spec.proxy_trusted,
        tls,
        websocket: spec.websocket,
    });
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: log, back off briefly, keep serving.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        // Then the permit: at the limit this client waits here, accepted but
        // not served, and the next ones wait in this socket's backlog. The
        // permit cannot come first: a worker holding it would wait on its
        // own socket while the client waits in another worker's.
        let permit = tokio::select! {
            p = shared.limit.acquire() => match p {
                Some(p) => p,
                None => return,
            },
            _ = shutdown.cancelled() => return,
        };
        // Debug: a span the subscriber keeps costs each idle connection
        // about 360 bytes; at info, each event below names its client.
        let span = tracing::debug_span!(
            "conn",
            %peer,
            client = field::Empty,
            client_id = field::Empty,
            pool = field::Empty,
            backend = field::Empty
        );
        let conn = handle(
            stream,
            peer,
            info.clone(),
            shared.clone(),
            stops.clone(),
            permit,
        );
        // Without debug logging the span is off: then the task does not
        // carry it (40 bytes that took the task past an allocation step).
        if span.is_disabled() {
            conns.spawn(conn);
        } else {
            conns.spawn(conn.instrument(span));
        }
    }
}

/// One client connection, from accept to close.
/// What a connection needs to know about its listener.
#[derive(Debug)]
struct ListenerInfo {
    name: String,
    style: RefusalStyle,
    /// Sources that send a PROXY header first; empty: PROXY protocol off.
    proxy_trusted: Vec<mqlb_config::Cidr>,
    /// Terminates TLS (after any PROXY header, before the CONNECT).
    tls: Option<Arc<mqlb_listener::tls::Slot>>,
    /// MQTT over WebSocket on this path (after TLS).
    websocket: Option<String>,
}

/// One client connection, from accept to close.
///
/// Everything up to the splice (PROXY header, TLS, WebSocket, the CONNECT,
/// placement, the backend connect) runs in a boxed future that is freed
/// once the client is placed: an idle connection's task holds the splice
/// and the few handles it needs, not the state of how it got there
/// (tests/tests/memory.rs guards the bytes).
fn handle(
    client: TcpStream,
    peer: SocketAddr,
    listener: Arc<ListenerInfo>,
    shared: Arc<Shared>,
    stops: Stops,
    permit: crate::limit::Slot,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    // Built here, not in the block below: whatever an async block captures
    // stays in its state for its whole life.
    let arriving = Box::pin(arrive(
        client,
        peer,
        listener,
        shared.clone(),
        stops.graceful.clone(),
    ));
    async move {
        let _active = GaugeGuard::new(&shared.metrics.active);
        let serve = async {
            match arriving.await {
                Arrived::Placed(placed) => relay(placed, &shared, &stops.graceful).await,
                Arrived::Elsewhere(serving) => serving.await,
                Arrived::Gone => {}
            }
        };
        tokio::select! {
            _ = serve => {}
            _ = stops.hard.cancelled() => tracing::debug!("cut at the end of the grace period"),
        }
        drop(permit);
    }
}

/// Where a client stands once [`arrive`] is done with it.
enum Arrived {
    /// Refused, or gone: nothing more to do.
    Gone,
    /// Plain MQTT, placed: the connection's task splices it.
    Placed(Box<Placed<TcpStream>>),
    /// TLS or WebSocket: served by a future of its own, on the heap, which
    /// the task runs once `arrive`'s state (sized by the plain path's
    /// placement, 2.6 KiB) is freed; it held on for the connection's life.
    Elsewhere(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>),
}

/// A client from accept until it is placed on a backend: PROXY header,
/// then plain MQTT (returned placed, for the caller's task to splice) or
/// TLS / WebSocket (returned as the future that serves it).
async fn arrive(
    mut client: TcpStream,
    peer: SocketAddr,
    listener_info: Arc<ListenerInfo>,
    shared_state: Arc<Shared>,
    shutdown_token: CancellationToken,
) -> Arrived {
    let (listener, shared, shutdown) = (&*listener_info, &*shared_state, &shutdown_token);
    let m = &shared.metrics;
    m.accepted.fetch_add(1, Ordering::Relaxed);
    // TCP_NODELAY came with the socket from its listener (`bind_group`).
    let config = shared.config();
    let settings = &config.balancer;
    tracing::debug!("accepted");

    // A trusted load balancer first says who the client really is; that
    // address is used for logs, empty-client-ID placement, per-IP limits
    // and /clients. A PROXY header from anyone else is refused below.
    let mut peer = peer;
    let mut initial = bytes::BytesMut::new();
    if listener.proxy_trusted.iter().any(|c| c.contains(peer.ip())) {
        let header = handshake::read_proxy_header(&mut client, settings.connect_timeout);
        match tokio::select! {
            r = header => r,
            _ = shutdown.cancelled() => return Arrived::Gone,
        } {
            Ok((addr, rest)) => {
                if let Some(a) = addr {
                    peer = a;
                }
                initial = rest;
            }
            Err(refused) => {
                m.reject(refused.reason);
                tracing::info!(%peer, reason = refused.reason.label(), detail = %refused.detail, "refused");
                return Arrived::Gone;
            }
        }
    }
    tracing::Span::current().record("client", tracing::field::display(peer));
    // Only a backend that takes the PROXY protocol is told the address the
    // client reached: a system call per connection spared otherwise.
    let local = if shared.backends.snapshot().iter().any(|b| b.send_proxy) {
        client.local_addr().unwrap_or(peer)
    } else {
        peer
    };
    let arrival = Arrival {
        peer,
        local,
        identity: None,
        tls: None,
    };
    // Not awaited here: this future is sized by the plain path's placement
    // and would stay allocated under a TLS or WebSocket client's whole life.
    match listener.tls.clone() {
        None if listener.websocket.is_none() => {
            match place(client, arrival, initial, listener, shared, shutdown).await {
                Some(placed) => Arrived::Placed(placed),
                None => Arrived::Gone,
            }
        }
        None => {
            let client = mqlb_listener::rewind::Rewind::new(initial, client);
            Arrived::Elsewhere(Box::pin(async move {
                serve_websocket(
                    client,
                    arrival,
                    &listener_info,
                    &shared_state,
                    &shutdown_token,
                )
                .await
            }))
        }
        Some(tls) => Arrived::Elsewhere(Box::pin(async move {
            serve_tls(
                client,
                arrival,
                initial,
                &tls,
                &listener_info,
                &shared_state,
                &shutdown_token,
            )
            .await
        })),
    }
}

/// Terminates TLS (refusing plain MQTT on a TLS port at its first byte),
/// then serves MQTT or MQTT over WebSocket inside it.
async fn serve_tls(
    client: TcpStream,
    arrival: Arrival,
    initial: bytes::BytesMut,
    tls: &mqlb_listener::tls::Slot,
    listener: &ListenerInfo,
    shared: &Shared,
    shutdown: &CancellationToken,
) {
    let m = &shared.metrics;
    let peer = arrival.peer;
    let settings = &shared.config().balancer;
    // Plain MQTT on a TLS port is told apart (and refused at once) by its
    // first byte.
    let peek = mqlb_listener::tls::starts_tls(&client, &initial, settings.connect_timeout);
    match tokio::select! {
        r = peek => r,
        _ = shutdown.cancelled() => return,
    } {
        Ok(true) => {}
        Ok(false) => {
            m.reject(RejectReason::PlainOnTls);
            tracing::info!(
                %peer,
                reason = "plain_on_tls",
                detail = "not a TLS ClientHello",
                "refused"
            );
            return;
        }
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            m.reject(RejectReason::Timeout);
            tracing::info!(%peer, reason = "timeout", detail = "TLS handshake", "refused");
            return;
        }
        Err(_) => {
            m.reject(RejectReason::ClosedEarly);
            return;
        }
    }
    // The PROXY header may have arrived with the start of the ClientHello.
    let client = mqlb_listener::rewind::Rewind::new(initial, client);
    let acceptor = tls.current.load_full();
    let accept = tokio::time::timeout(settings.connect_timeout, acceptor.accept(client));
    let client = match tokio::select! {
        r = accept => r,
        _ = shutdown.cancelled() => return,
    } {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            m.reject(RejectReason::Tls);
            tracing::info!(%peer, reason = "tls", detail = %e, "refused");
            return;
        }
        Err(_) => {
            m.reject(RejectReason::Timeout);
            tracing::info!(%peer, reason = "timeout", detail = "TLS handshake", "refused");
            return;
        }
    };
    // The verified certificate names the client (when configured): it
    // replaces what the CONNECT claims.
    let identity = match tls.files.identity_as {
        None => None,
        Some(field) => match mqlb_listener::tls::peer_identity(client.get_ref().1) {
            Some(name) => Some((field, name)),
            None => {
                m.reject(RejectReason::Tls);
                tracing::info!(
                    %peer,
                    reason = "tls",
                    detail = "client certificate names no CN or DNS name",
                    "refused"
                );
                return;
            }
        },
    };
    let conn = client.get_ref().1;
    let tls_info = forward::TlsInfo {
        version: match conn.protocol_version() {
            Some(tokio_rustls::rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "TLSv1.3",
        },
        sni: conn.server_name().map(str::to_string),
        client_cn: mqlb_listener::tls::peer_identity(conn),
    };
    let arrival = Arrival {
        identity,
        tls: Some(tls_info),
        ..arrival
    };
    // Each on the heap: inline, the WebSocket upgrade's state (12 KiB)
    // sized every TLS connection's future, WebSocket or not.
    if listener.websocket.is_some() {
        return Box::pin(serve_websocket(client, arrival, listener, shared, shutdown)).await;
    }
    let initial = bytes::BytesMut::new();
    Box::pin(serve_client(
        client, arrival, initial, listener, shared, shutdown,
    ))
    .await
}

/// A backend connection past its TLS and WebSocket setup.
// Lives for one match, then is moved into the splice, which holds the
// stream itself whatever the variant.
#[allow(clippy::large_enum_variant)]
enum BackendStream {
    Plain(TcpStream),
    Tls(tokio_rustls::client::TlsStream<TcpStream>),
    Ws(crate::ws::WsStream<TcpStream>),
    Wss(crate::ws::WsStream<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Upgrades a backend connection to MQTT over WebSocket within `timeout`.
async fn upgrade<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: S,
    authority: &str,
    path: &str,
    timeout: Duration,
) -> Result<crate::ws::WsStream<S>, String> {
    match tokio::time::timeout(timeout, crate::ws::connect(stream, authority, path)).await {
        Ok(r) => r,
        Err(_) => Err(format!("WebSocket upgrade took over {timeout:?}")),
    }
}

/// Completes a WebSocket upgrade (within the CONNECT timeout, at most
/// [`crate::ws::MAX_UPGRADE`] bytes), then serves the MQTT inside it.
async fn serve_websocket<S>(
    client: S,
    arrival: Arrival,
    listener: &ListenerInfo,
    shared: &Shared,
    shutdown: &CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let m = &shared.metrics;
    let peer = arrival.peer;
    let path = listener.websocket.as_deref().unwrap_or("/mqtt");
    let timeout = shared.config().balancer.connect_timeout;
    // Before the CONNECT, what a plain client may send: the CONNECT cap.
    let limits = crate::ws::Limits {
        before_connect: shared.config().balancer.max_connect_size,
        max_message: crate::ws::MAX_MESSAGE,
    };
    // Boxed, and freed once done: inline, the upgrade's state would stay in
    // this future for the connection's life.
    let upgrade = tokio::time::timeout(timeout, Box::pin(crate::ws::accept(client, path, limits)));
    let ws = match tokio::select! {
        r = upgrade => r,
        _ = shutdown.cancelled() => return,
    } {
        Ok(Ok(ws)) => ws,
        Ok(Err(detail)) => {
            m.reject(RejectReason::WebSocket);
            tracing::info!(%peer, reason = "websocket", %detail, "refused");
            return;
        }
        Err(_) => {
            m.reject(RejectReason::Timeout);
            tracing::info!(%peer, reason = "timeout", detail = "WebSocket upgrade", "refused");
            return;
        }
    };
    let initial = bytes::BytesMut::new();
    serve_client(ws, arrival, initial, listener, shared, shutdown).await
}

/// Who a connection is, once PROXY and TLS are done with.
struct Arrival {
    /// The client's address (from the PROXY header when there was one).
    peer: SocketAddr,
    /// The address it connected to, read only when a backend takes the
    /// PROXY protocol (the client's own address otherwise: nothing reads
    /// it then; a backend given the PROXY protocol by a reload sees that
    /// for clients that arrived just before).
    local: SocketAddr,
    /// A verified certificate identity and the CONNECT field it replaces.
    identity: Option<(mqlb_config::IdentityAs, String)>,
    /// The client's TLS session, for PROXY v2 TLVs towards backends.
    tls: Option<forward::TlsInfo>,
}

/// A client after PROXY and TLS: reads its CONNECT, places it, splices.
///
/// Placing is transient and boxed; what stays for the connection's life
/// is the splice and what it needs ([`Placed`]), so an idle connection's
/// task holds no state of how it got there (tests/tests/memory.rs).
async fn serve_client<
    C: forward::ClientStream + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
>(
    client: C,
    arrival: Arrival,
    initial: bytes::BytesMut,
    listener: &ListenerInfo,
    shared: &Shared,
    shutdown: &CancellationToken,
) {
    let placing = place(client, arrival, initial, listener, shared, shutdown);
    if let Some(placed) = Box::pin(placing).await {
        relay(placed, shared, shutdown).await;
    }
}

/// A client placed on a backend and connected to it: what the splice
/// needs, and nothing of how it got there.
struct Placed<C> {
    client: C,
    backend_stream: TcpStream,
    backend: Arc<crate::select::Backend>,
    hs: handshake::Handshake,
    rule: Option<usize>,
    peer: SocketAddr,
    local: SocketAddr,
    tls_info: Option<forward::TlsInfo>,
    /// Counts the CONNECT against the backend's in-flight cap until its
    /// CONNACK passes.
    pending: Option<crate::admission::Pending>,
    _ip_slot: Option<crate::admission::IpSlot>,
}

/// Reads the CONNECT, routes it, admits it and connects to its backend;
/// `None` once the client was refused (and told, where it can be).
async fn place<C>(
    mut client: C,
    arrival: Arrival,
    initial: bytes::BytesMut,
    listener: &ListenerInfo,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Option<Box<Placed<C>>>
where
    C: forward::ClientStream + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Arrival {
        peer,
        local,
        identity,
        tls: tls_info,
    } = arrival;
    let style = listener.style;
    let m = &shared.metrics;
    let config = shared.config();
    let settings = &config.balancer;
    // Until the client is forwarded it has no session on any backend, so a
    // shutdown simply closes it.
    let read = read_connect(
        &mut client,
        settings.connect_timeout,
        settings.max_connect_size,
        style,
        initial,
    );
    let hs = match tokio::select! {
        r = read => r,
        _ = shutdown.cancelled() => return None,
    } {
        Ok(hs) => hs,
        Err(refused) => {
            m.reject(refused.reason);
            tracing::info!(%peer, reason = refused.reason.label(), detail = %refused.detail, "refused");
            if let Some(reply) = refused.reply {
                handshake::send_reply(&mut client, reply).await;
            }
            return None;
        }
    };
    let mut hs = hs;
    if let Some((field, name)) = &identity {
        if let Err(detail) = handshake::rewrite_identity(&mut hs, *field, name) {
            m.reject(RejectReason::ProtocolError);
            tracing::info!(%peer, client_id = %hs.client_id, reason = "protocol_error", %detail, "refused");
            return None;
        }
    }
    let span = tracing::Span::current();
    span.record("client_id", hs.client_id.as_str());

    let route = crate::select::choose_pool(
        &config.rules,
        settings.default_pool.as_deref(),
        &crate::select::RouteInput {
            listener: &listener.name,
            client_id: &hs.client_id,
            username: hs.username.as_deref(),
            level: hs.version.level(),
            ip: peer.ip(),
        },
    );
    let Some((rule, pool)) = route else {
        m.reject(RejectReason::NoRoute);
        tracing::info!(%peer, client_id = %hs.client_id, reason = "no_route", "refused");
        let reply: &[u8] = if hs.version.is_v5() {
            &[0x20, 0x03, 0x00, 0x87, 0x00]
        } else {
            &[0x20, 0x02, 0x00, 0x05]
        };
        handshake::send_reply(&mut client, reply).await;
        return None;
    };
    span.record("pool", pool);
    let key = placement_key(&hs.client_id, peer, settings.empty_client_id);
    let candidates = shared.backends.candidates_in(pool, &key);
    // Admission: the client's IP, then its placed backend's caps.
    let mut pending = None;
    let _ip_slot = if let Some(placed) = candidates.first().cloned() {
        let v5 = hs.version.is_v5();
        let admitted = match shared.admission.admit_ip(peer.ip()) {
            Ok(slot) => {
                let wait = shared.admission.admit_backend(&placed, v5);
                match tokio::select! {
                    r = wait => r,
                    _ = shutdown.cancelled() => return None,
                } {
                    Ok(p) => {
                        pending = Some(p);
                        Ok(slot)
                    }
                    Err(r) => Err(r),
                }
            }
            Err(r) => Err(r),
        };
        match admitted {
            Ok(slot) => Some(slot),
            Err(r) => {
                m.reject(RejectReason::Admission);
                placed.admission_refused.count(r);
                tracing::info!(%peer, client_id = %hs.client_id, reason = r.label(), backend = %placed.name, "refused");
                handshake::send_reply(&mut client, r.connack(v5)).await;
                return None;
            }
        }
    } else {
        None
    };
    let sources = shared.sources.load_full();
    let connected = tokio::select! {
        c = forward::connect_first(
            &candidates,
            settings.backend_connect_timeout,
            &sources,
            &shared.resolver,
        ) => c,
        _ = shutdown.cancelled() => return None,
    };
    let Some((backend_stream, backend)) = connected else {
        m.reject(RejectReason::NoBackend);
        tracing::warn!(%peer, client_id = %hs.client_id, reason = "no_backend", tried = candidates.len(), "refused");
        handshake::send_reply(&mut client, handshake::server_unavailable(hs.version)).await;
        return None;
    };
    span.record("backend", backend.name.as_str());
    Some(Box::new(Placed {
        client,
        backend_stream,
        backend,
        hs,
        rule,
        peer,
        local,
        tls_info,
        pending,
        _ip_slot,
    }))
}

/// Splices a placed client to its backend until either side closes or the
/// client is evicted.
async fn relay<C>(placed: Box<Placed<C>>, shared: &Shared, shutdown: &CancellationToken)
where
    C: forward::ClientStream + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let m = &shared.metrics;
    // Only what the splice needs outlives this block: the handshake, the
    // client's addresses and TLS details are dropped here, not kept in
    // the task for the connection's life.
    // Moved out in a block of its own: a parameter moved out of stays
    // allocated until the function returns, which here is the connection's
    // life (360 bytes per idle connection, see tests/tests/memory.rs).
    let placed = {
        let boxed = placed;
        *boxed
    };
    let Placed {
        mut client,
        backend_stream,
        backend,
        pending,
        _ip_slot,
        ..
    } = placed;
    let (prefix, version, proxy, registration) = {
        let Placed {
            hs,
            rule,
            peer,
            local,
            tls_info,
            ..
        } = placed;
        tracing::debug!(version = hs.version.label(), bridge = hs.bridge, "placed");
        // Brokers that take PROXY protocol learn the client's address
        // first (outside TLS, as they read it).
        let proxy = backend
            .send_proxy
            .then(|| forward::proxy_v2_header_tls(peer, local, tls_info.as_ref()));
        let registration = shared
            .registry
            .register(&hs.client_id, backend.clone(), rule, peer);
        (hs.buf, hs.version, proxy, registration)
    };
    let (registration, evict) = registration;
    m.forwarded.fetch_add(1, Ordering::Relaxed);
    backend.forwarded.fetch_add(1, Ordering::Relaxed);
    let _on_backend = GaugeGuard::new(&backend.active);
    let setup_timeout = shared.config().balancer.backend_connect_timeout;
    if shutdown.is_cancelled() {
        // Forwarded just as the shutdown began, possibly after the evictor's
        // last pass: close this one at its first packet boundary.
        evict.evict(crate::registry::Eviction::ShuttingDown);
    }

    let on_connack = |seen: forward::ConnackSeen| {
        if let Some(p) = &pending {
            p.answered();
        }
        crate::metrics::bump(backend.connacks.as_slice(), usize::from(seen.reason.0));
        backend.connect_latency.observe(seen.latency);
        if seen.session_moving {
            backend.sessions_moving.fetch_add(1, Ordering::Relaxed);
        } else if matches!(
            seen.reason,
            mqlb_protocol::ReasonCode::SERVER_UNAVAILABLE | mqlb_protocol::ReasonCode::SERVER_BUSY
        ) {
            backend.passive_failure();
        }
    };
    let spliced = match backend.tls.as_ref().and_then(|t| t.as_ref().ok()) {
        None if backend.websocket.is_none() => {
            let prefix = match proxy {
                Some(p) => {
                    let mut b = bytes::BytesMut::from(&p[..]);
                    b.extend_from_slice(&prefix);
                    b
                }
                None => prefix,
            };
            forward::splice(client, backend_stream, prefix, version, &evict, on_connack).await
        }
        // On the heap, like the client side's TLS and WebSocket: a plain
        // connection's task does not carry these states.
        tls => match Box::pin(async {
            // TLS and/or WebSocket towards the broker: the PROXY header
            // first (outside both, as brokers read it), then TLS, then the
            // upgrade, each within the backend connect timeout.
            let mut tcp = backend_stream;
            let proxied = match &proxy {
                Some(p) => tokio::io::AsyncWriteExt::write_all(&mut tcp, p).await,
                None => Ok(()),
            };
            let ready = match (proxied, tls, &backend.websocket) {
                (Err(e), _, _) => Err(e.to_string()),
                (Ok(()), None, Some(path)) => upgrade(tcp, &backend.address, path, setup_timeout)
                    .await
                    .map(BackendStream::Ws),
                (Ok(()), Some(tls), ws) => match tls.connect(tcp, setup_timeout).await {
                    Err(e) => Err(format!("TLS: {e}")),
                    Ok(s) => match ws {
                        None => Ok(BackendStream::Tls(s)),
                        Some(path) => upgrade(s, &backend.address, path, setup_timeout)
                            .await
                            .map(BackendStream::Wss),
                    },
                },
                (Ok(()), None, None) => Ok(BackendStream::Plain(tcp)),
            };
            Some(match ready {
                Ok(BackendStream::Plain(s)) => {
                    forward::splice(client, s, prefix, version, &evict, on_connack).await
                }
                Ok(BackendStream::Tls(s)) => {
                    forward::splice(client, s, prefix, version, &evict, on_connack).await
                }
                Ok(BackendStream::Ws(s)) => {
                    forward::splice(client, s, prefix, version, &evict, on_connack).await
                }
                Ok(BackendStream::Wss(s)) => {
                    forward::splice(client, s, prefix, version, &evict, on_connack).await
                }
                Err(e) => {
                    backend.connect_failures.fetch_add(1, Ordering::Relaxed);
                    backend.passive_failure();
                    let e2 = registration.entry();
                    tracing::warn!(
                        peer = e2.as_ref().map(|e| tracing::field::display(e.address)),
                        client_id = e2.as_ref().map(|e| &*e.client_id),
                        backend = %backend.name,
                        error = %e,
                        "setting up the backend connection failed"
                    );
                    handshake::send_reply(&mut client, handshake::server_unavailable(version))
                        .await;
                    return None;
                }
            })
        })
        .await
        {
            Some(r) => r,
            None => return,
        },
    };
    match spliced {
        Ok(s) if s.evicted => {
            let reason = match evict.reason() {
                Some(crate::registry::Eviction::UseAnotherServer(_)) => {
                    "evicted_use_another_server"
                }
                _ => "evicted",
            };
            let e = registration.entry();
            tracing::info!(
                peer = e.as_ref().map(|e| tracing::field::display(e.address)),
                client_id = e.as_ref().map(|e| &*e.client_id),
                backend = %backend.name,
                reason,
                disconnect_sent = s.disconnect_sent,
                to_backend = s.to_backend,
                to_client = s.to_client,
                "closed"
            )
        }
        Ok(s) => tracing::debug!(
            reason = "peer_closed",
            to_backend = s.to_backend,
            to_client = s.to_client,
            "closed"
        ),
        Err(e) => tracing::debug!(reason = "io_error", error = %e, "closed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One port, one socket per worker; a second group on a port in use is
    /// refused (a second `mqlb` does not quietly share the clients),
    /// connections to the port are spread over the group's sockets, and
    /// each comes with TCP_NODELAY set.
    #[test]
    fn listener_groups_share_one_port_and_refuse_a_second_group() -> io::Result<()> {
        let group = bind_group("127.0.0.1:0".parse().map_err(io::Error::other)?, 2)?;
        let addrs: Vec<SocketAddr> = group
            .iter()
            .map(|l| l.local_addr())
            .collect::<io::Result<_>>()?;
        assert_eq!(addrs.len(), 2);
        assert_eq!(addrs.first(), addrs.get(1), "one port for the group");
        let port = addrs.first().copied().ok_or(io::ErrorKind::NotFound)?;
        let second = bind_group(port, 2);
        assert_eq!(
            second.err().map(|e| e.kind()),
            Some(io::ErrorKind::AddrInUse)
        );
        // Connections from many source ports land on both sockets.
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(port))
            .collect::<io::Result<_>>()?;
        let mut accepted = [0usize; 2];
        for (k, l) in group.iter().enumerate() {
            while let Ok((s, _)) = l.accept() {
                // Inherited from the listener: no set-up call per client.
                assert!(s.nodelay()?, "TCP_NODELAY not inherited");
                if let Some(n) = accepted.get_mut(k) {
                    *n += 1;
                }
            }
        }
        assert_eq!(accepted.iter().sum::<usize>(), clients.len());
        assert!(accepted.iter().all(|n| *n > 0), "{accepted:?}");
        Ok(())
    }
}
