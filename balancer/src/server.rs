//! Listeners and the per-connection task.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mqlb_config::Config;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{field, Instrument};

use crate::forward;
use crate::handshake::{self, read_connect};
use crate::metrics::{GaugeGuard, Metrics, RejectReason};
use crate::select::{placement_key, Backends};

/// State every connection task shares.
#[derive(Debug)]
pub struct Shared {
    /// Validated configuration in force.
    pub config: Config,
    /// Backends and their counters.
    pub backends: Backends,
    /// Balancer-wide counters.
    pub metrics: Metrics,
}

/// A balancer with its listeners bound, ready to serve.
///
/// Binding is separate from serving so that callers (tests, the CLI) learn
/// the real addresses of port-0 listeners before traffic starts.
#[derive(Debug)]
pub struct Balancer {
    shared: Arc<Shared>,
    listeners: Vec<(String, TcpListener)>,
}

impl Balancer {
    /// Binds every configured listener.
    pub async fn bind(config: Config) -> io::Result<Balancer> {
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let listener = TcpListener::bind(l.address).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("listener {} on {}: {e}", l.name, l.address),
                )
            })?;
            listeners.push((l.name.clone(), listener));
        }
        let shared = Arc::new(Shared {
            backends: Backends::new(&config.backends),
            metrics: Metrics::default(),
            config,
        });
        Ok(Balancer { shared, listeners })
    }

    /// The bound addresses, in configuration order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(_, l)| l.local_addr().ok())
            .collect()
    }

    /// Shared state, for the admin API and tests.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting and waits
    /// up to `grace` for open connections to finish.
    pub async fn serve(self, shutdown: CancellationToken, grace: Duration) {
        let tracker = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(self.shared.config.balancer.max_connections));
        for (name, listener) in self.listeners {
            let shared = self.shared.clone();
            let shutdown = shutdown.clone();
            let permits = permits.clone();
            let conns = tracker.clone();
            tracker.spawn(accept_loop(
                name, listener, shared, permits, conns, shutdown,
            ));
        }
        shutdown.cancelled().await;
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::info!(
                open = tracker.len(),
                "grace period over; closing remaining connections"
            );
        }
    }
}

async fn accept_loop(
    name: String,
    listener: TcpListener,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    conns: TaskTracker,
    shutdown: CancellationToken,
) {
    let local = listener.local_addr().ok();
    tracing::info!(listener = %name, address = ?local, "listening");
    loop {
        // Take the permit before accepting: at the limit, new clients wait in
        // the kernel's backlog instead of being accepted and starved.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.cancelled() => return,
        };
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
        let span =
            tracing::info_span!("conn", %peer, client_id = field::Empty, backend = field::Empty);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        conns.spawn(
            async move {
                tokio::select! {
                    _ = handle(stream, peer, &shared) => {}
                    _ = shutdown.cancelled() => tracing::debug!("closed by shutdown"),
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// One client connection, from accept to close.
async fn handle(mut client: TcpStream, peer: SocketAddr, shared: &Shared) {
    let m = &shared.metrics;
    m.accepted.fetch_add(1, Ordering::Relaxed);
    let _active = GaugeGuard::new(&m.active);
    let _ = client.set_nodelay(true);
    let settings = &shared.config.balancer;

    let hs = match read_connect(
        &mut client,
        settings.connect_timeout,
        settings.max_connect_size,
    )
    .await
    {
        Ok(hs) => hs,
        Err(refused) => {
            m.reject(refused.reason);
            tracing::info!(reason = refused.reason.label(), detail = %refused.detail, "refused before CONNECT");
            if let Some(reply) = refused.reply {
                handshake::send_reply(&mut client, reply).await;
            }
            return;
        }
    };
    let span = tracing::Span::current();
    span.record("client_id", hs.client_id.as_str());

    let key = placement_key(&hs.client_id, peer, settings.empty_client_id);
    let candidates = shared.backends.candidates(&key);
    let Some((backend_stream, backend)) =
        forward::connect_first(&candidates, settings.backend_connect_timeout).await
    else {
        m.reject(RejectReason::NoBackend);
        tracing::warn!(tried = candidates.len(), "no backend reachable");
        handshake::send_reply(&mut client, handshake::server_unavailable(hs.version)).await;
        return;
    };
    span.record("backend", backend.name.as_str());
    m.forwarded.fetch_add(1, Ordering::Relaxed);
    backend.forwarded.fetch_add(1, Ordering::Relaxed);
    let _on_backend = GaugeGuard::new(&backend.active);
    tracing::debug!(
        version = hs.version.label(),
        bridge = hs.bridge,
        "forwarding"
    );

    match forward::splice(client, backend_stream, &hs.buf).await {
        Ok(s) => tracing::debug!(to_backend = s.to_backend, to_client = s.to_client, "closed"),
        Err(e) => tracing::debug!(error = %e, "closed with error"),
    }
}
