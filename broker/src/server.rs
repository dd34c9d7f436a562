//! The broker's listener and housekeeping.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use mqlb_config::broker::BrokerConfig;

use crate::auth::Auth;
use crate::cluster::Cluster;
use crate::conn::{handle, handle_identified, Settings};
use crate::core::{Core, Limits};
use crate::effects::LocalLog;
use crate::front::Front;
use crate::node::Node;
use crate::outbox::Closing;
use crate::state::State;

/// How long a retained-message deletion is remembered, so that an older
/// write replicated late cannot bring the message back.
const RETAINED_DELETION_MEMORY: Duration = Duration::from_secs(3600);

/// A broker node with its listener bound.
#[derive(Debug)]
pub struct Broker {
    listener: TcpListener,
    state: Arc<Node>,
    sys_interval: Duration,
    settings: Settings,
    shutdown_rate: u32,
    shutdown_grace: Duration,
    cluster: Option<(Arc<Cluster>, TcpListener)>,
    /// `[[broker.listener]]`s: TLS, WebSocket, PROXY protocol.
    fronts: Vec<(Arc<Front>, TcpListener)>,
}

impl Broker {
    /// Binds an open broker (anonymous, no ACL) on `addr`.
    pub async fn bind(addr: SocketAddr) -> io::Result<Broker> {
        Self::bind_config(&BrokerConfig {
            listen: addr,
            ..BrokerConfig::default()
        })
        .await
    }

    /// Binds the configured listener, loading the password file first.
    pub async fn bind_config(config: &BrokerConfig) -> io::Result<Broker> {
        let auth = Auth::from_config(config)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let storage = config
            .storage()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if storage.from_state_dir {
            tracing::warn!("[cluster] state_dir / --state-dir is deprecated: it is the node's data directory now; say data_dir / --data-dir");
        }
        let cluster = match &config.cluster {
            Some(c) => {
                // The Raft state lives in the data directory.
                let mut c = c.clone();
                c.state_dir = storage.data_dir.clone();
                c.repair = config.repair;
                Some(Cluster::bind(&c).await?)
            }
            None => None,
        };
        let mut core = Core::with_limits(Limits {
            max_queued_messages: config.max_queued_messages,
            max_queued_bytes: config.max_queued_bytes,
            ..Limits::default()
        });
        let statestore = crate::statestore::StateStore::new(
            config
                .cluster
                .as_ref()
                .map_or("mqlb", |c| c.node_id.as_str()),
            config.statestore,
        );
        let mut disk = match (&storage.data_dir, storage.durability) {
            (Some(dir), mqlb_config::broker::Durability::Disk) => {
                Some(open_data_dir(dir, config, &mut core, &statestore)?)
            }
            _ => None,
        };
        if let Some((_, restored)) = &mut disk {
            let sessions = std::mem::take(&mut restored.sessions);
            let seen = std::mem::take(&mut restored.seen);
            match &cluster {
                // Copies until the view says whose each is.
                Some((c, _)) => c.restore_copies(sessions, seen),
                None => crate::durable::serve_restored(&mut core, sessions, seen)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            }
        }
        // A member's session records stream down their chains; a single
        // node's are committed at once; with a data directory, once on
        // disk as well.
        let inner: Arc<dyn crate::effects::ChangeLog> = match &cluster {
            Some((c, _)) => c.clone(),
            None => Arc::new(LocalLog::default()),
        };
        let log: Arc<dyn crate::effects::ChangeLog> = match &disk {
            Some((store, _)) => Arc::new(crate::durable::DiskLog::new(inner, store.clone())),
            None => inner,
        };
        let mut fronts = Vec::new();
        for l in &config.listeners {
            let front = Arc::new(Front::new(l)?);
            let bound = bind_clients(l.address).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("listener {} on {}: {e}", l.name, l.address),
                )
            })?;
            fronts.push((front, bound));
        }
        let broker = Broker {
            fronts,
            listener: bind_clients(config.listen)?,
            state: Node::new(
                State::with_store(core, auth, log, statestore),
                cluster.as_ref().map(|(c, _)| c.clone()),
            ),
            sys_interval: config.sys_interval,
            settings: Settings {
                max_keep_alive: config.max_keep_alive,
                max_topic_levels: config.max_topic_levels,
                max_subscriptions: config.max_subscriptions,
            },
            shutdown_rate: config.shutdown_rate,
            shutdown_grace: config.shutdown_grace,
            cluster,
        };
        if let Some((store, restored)) = disk {
            broker.state.state().use_disk(store, restored.last_seq);
        }
        Ok(broker)
    }

    /// The cluster listener's address, in a cluster.
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.cluster.as_ref().and_then(|(_, l)| l.local_addr().ok())
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Each `[[broker.listener]]`'s name and bound address, in order.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.fronts
            .iter()
            .filter_map(|(f, l)| Some((f.spec.name.clone(), l.local_addr().ok()?)))
            .collect()
    }

    /// The node (for the admin API).
    pub fn node(&self) -> Arc<Node> {
        self.state.clone()
    }

    /// Shared state (for tests and the admin side).
    pub fn state(&self) -> Arc<State> {
        self.state.state().clone()
    }

    /// Serves until `shutdown`, then shuts down gracefully: stops
    /// accepting, closes clients at the shutdown rate (v5 clients get
    /// DISCONNECT 0x8B after everything queued for them), keeps persistent
    /// sessions and their wills, and after the grace period cuts whoever is
    /// left.
    ///
    /// Returns an error if it stopped because its data directory failed
    /// (an fsync failed): nothing more could be acknowledged, and the
    /// process should exit non-zero and be restarted on what is on disk.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), String> {
        // Background tasks and the hard stop end with this function.
        let hard = CancellationToken::new();
        let _stop = hard.clone().drop_guard();
        let disk_failed = CancellationToken::new();
        if let Some(store) = self.state.state().disk().cloned() {
            tokio::spawn(keep_disk(
                self.state.clone(),
                store,
                hard.clone(),
                disk_failed.clone(),
            ));
        }
        if let Some(cluster) = self.state.cluster() {
            // Raft state that cannot be persisted stops the node as a
            // failed data directory does.
            let (stop, failed) = (hard.clone(), disk_failed.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => return,
                    }
                    if cluster.persist_failed().is_some() {
                        failed.cancel();
                        return;
                    }
                }
            });
        }
        // Peers keep hearing from this node until its clients are gone.
        let member = self.cluster.as_ref().map(|(c, _)| c.clone());
        if let Some((cluster, listener)) = self.cluster {
            // Clients a peer relays here are served as owned (never relayed
            // again), with this node's settings.
            let (node, settings) = (self.state.clone(), self.settings);
            let serve_relayed: crate::cluster::ServeRelayed =
                Arc::new(move |stream, peer, identity| {
                    Box::pin(crate::conn::handle_owned(
                        stream,
                        node.clone(),
                        settings,
                        peer,
                        identity,
                    ))
                });
            cluster.start(
                listener,
                self.state.state().clone(),
                serve_relayed,
                hard.clone(),
            );
        }
        let state = self.state.clone();
        let sweeper_stop = hard.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let now = std::time::Instant::now();
                        // Only a key's owner tells its watchers it expired.
                        let cluster = state.cluster();
                        let expired_keys = state.statestore.expire(|k| {
                            cluster.as_ref().is_none_or(|c| c.key_owner(k) == c.me())
                        });
                        let (n, _) = state.ask(|core| {
                            let (n, mut fx) = core.expire_sessions(now);
                            fx.extend(core.publish_due_wills(now));
                            core.prune_retained_deletions(RETAINED_DELETION_MEMORY);
                            for m in expired_keys {
                                fx.extend(core.route(m));
                            }
                            (n, fx)
                        });
                        if n > 0 {
                            tracing::debug!(expired = n, "sessions expired");
                        }
                    }
                    _ = sweeper_stop.cancelled() => return,
                }
            }
        });
        let state = self.state.clone();
        let sys_stop = hard.clone();
        let interval = self.sys_interval;
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let _ = state.act(|core| crate::sys::publish(core, started.elapsed()));
                    }
                    _ = sys_stop.cancelled() => return,
                }
            }
        });
        tracing::info!(
            address = self.listener.local_addr().ok().map(tracing::field::display),
            "broker listening"
        );
        let conns = TaskTracker::new();
        let slots: Vec<_> = self
            .fronts
            .iter()
            .filter_map(|(f, _)| f.tls.clone())
            .collect();
        if !slots.is_empty() {
            let state = self.state.clone();
            let stop = hard.clone();
            tokio::spawn(async move {
                mqlb_listener::tls::watch(
                    || slots.clone(),
                    mqlb_listener::tls::WATCH_INTERVAL,
                    stop.cancelled(),
                    |_, r| {
                        let c = match r {
                            mqlb_listener::tls::Refresh::Reloaded => &state.fronts.tls_reloads,
                            mqlb_listener::tls::Refresh::Failed(_) => {
                                &state.fronts.tls_reload_failures
                            }
                            mqlb_listener::tls::Refresh::Unchanged => return,
                        };
                        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    },
                )
                .await;
            });
        }
        let mut front_loops = Vec::new();
        for (front, listener) in self.fronts {
            tracing::info!(
                listener = %front.spec.name,
                address = ?listener.local_addr().ok(),
                tls = front.tls.is_some(),
                websocket = ?front.spec.websocket,
                proxy_protocol = !front.spec.proxy_trusted.is_empty(),
                "broker listening"
            );
            front_loops.push(tokio::spawn(accept_front(
                front,
                listener,
                self.state.clone(),
                self.settings,
                conns.clone(),
                shutdown.clone(),
                hard.clone(),
            )));
        }
        loop {
            let (stream, peer) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
                _ = disk_failed.cancelled() => break,
            };
            // TCP_NODELAY came from the listener (`bind_clients`).
            #[cfg(not(target_os = "linux"))]
            let _ = stream.set_nodelay(true);
            // Made outside the task's block, which would keep the
            // arguments beside the connection's state for its whole life.
            let serving = handle(stream, self.state.clone(), self.settings);
            let conn = crate::conn::Until::new(serving, hard.clone());
            // Without debug logging the span is off: then the task does not
            // carry it.
            let span = tracing::debug_span!("client", %peer);
            if span.is_disabled() {
                conns.spawn(conn);
            } else {
                conns.spawn(conn.instrument(span));
            }
        }
        self.state.stopping.cancel();
        if let Some(c) = &member {
            c.leave(&self.state, Duration::from_secs(5)).await;
        }
        drop(self.listener);
        for l in front_loops {
            let _ = l.await;
        }
        conns.close();
        let open = self.state.core().connected();
        tracing::info!(open, rate = self.shutdown_rate, grace = ?self.shutdown_grace, "shutting down: closing clients at the shutdown rate");
        let closer = close_paced(
            self.state.state().clone(),
            self.shutdown_rate,
            conns.clone(),
        );
        if tokio::time::timeout(self.shutdown_grace, closer)
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.state.core().connected(),
                "grace period over; closing remaining connections"
            );
        }
        tracing::info!("clients closed");
        if let Some(c) = member {
            c.settle(Duration::from_secs(2)).await;
            tracing::info!("cluster settled");
        }
        // A last snapshot: the next start reads it instead of the log.
        let state = self.state.state();
        if let (Some(store), false) = (state.disk(), disk_failed.is_cancelled()) {
            match crate::durable::snapshot(&self.state, store).await {
                Ok(()) => tracing::info!("data directory snapshot written"),
                Err(e) => {
                    tracing::warn!(error = %e, "could not write a snapshot on the way out; the log holds everything")
                }
            }
        }
        hard.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), conns.wait()).await;
        if let Some(f) = state.disk().and_then(|d| d.failed()) {
            return Err(f.to_string());
        }
        match self.state.cluster().and_then(|c| c.persist_failed()) {
            Some(e) => Err(format!("the Raft state cannot be persisted: {e}")),
            None => Ok(()),
        }
    }
}

/// Opens the data directory and puts back what it holds into `core` and
/// `statestore`; the store, and the last batch number it holds.
fn open_data_dir(
    dir: &std::path::Path,
    config: &BrokerConfig,
    core: &mut Core,
    statestore: &crate::statestore::StateStore,
) -> io::Result<(Arc<mqlb_storage::Store>, crate::durable::Restored)> {
    let started = std::time::Instant::now();
    let (store, found) = mqlb_storage::Store::open(
        dir,
        mqlb_storage::Options {
            max_disk_bytes: config.max_disk_bytes,
            repair: config.repair,
            sync: if config.fsync_per_change {
                mqlb_storage::SyncMode::EachRecord
            } else {
                mqlb_storage::SyncMode::Group
            },
            ..mqlb_storage::Options::default()
        },
    )
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    core.log_retained_writes();
    let restored = crate::durable::restore(core, statestore, &found).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("data directory {}: {e}", dir.display()),
        )
    })?;
    tracing::info!(
        dir = %dir.display(),
        sessions = restored.sessions.len(),
        retained = restored.retained,
        state_store_keys = restored.keys,
        records = found.records.len(),
        torn_bytes = found.torn_bytes,
        repaired = found.repaired.len(),
        took = ?started.elapsed(),
        "data directory read back"
    );
    Ok((Arc::new(store), restored))
}

/// Keeps the data directory: a snapshot at start (what was read back,
/// so the next start need not replay the log again), another whenever
/// enough log has been written (or, full, every 10 s, to give space
/// back), and `failed` cancelled if the directory fails (the node then
/// stops: it cannot acknowledge anything more).
async fn keep_disk(
    state: Arc<Node>,
    store: Arc<mqlb_storage::Store>,
    stop: CancellationToken,
    failed: CancellationToken,
) {
    use std::sync::atomic::Ordering;
    let snap = |why: &'static str| {
        let (state, store) = (state.clone(), store.clone());
        async move {
            if let Err(e) = crate::durable::snapshot(&state, &store).await {
                tracing::warn!(error = %e, why, "could not write a data directory snapshot");
            }
        }
    };
    snap("start").await;
    let mut last = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if let Some(f) = store.failed() {
            tracing::error!(error = %f, "stopping: the data directory cannot persist any more (restart the node on it: everything acknowledged is there)");
            failed.cancel();
            return;
        }
        let log = store.stats().log_bytes.load(Ordering::Relaxed);
        let full = store.is_full() && last.elapsed() >= Duration::from_secs(10);
        if log >= crate::durable::SNAPSHOT_AFTER_BYTES || full {
            snap(if full { "full" } else { "log size" }).await;
            last = std::time::Instant::now();
        }
    }
}

/// Accepts on one `[[broker.listener]]` until `shutdown`: each connection
/// goes through the listener's front (PROXY header, TLS, WebSocket upgrade)
/// within the CONNECT timeout, then is served like any other.
async fn accept_front(
    front: Arc<Front>,
    listener: TcpListener,
    state: Arc<Node>,
    settings: Settings,
    conns: TaskTracker,
    shutdown: CancellationToken,
    hard: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        // TCP_NODELAY came from the listener (`bind_clients`).
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let front = front.clone();
        let stop = hard.clone();
        let span = tracing::debug_span!("client", listener = %front.spec.name, peer = %peer);
        conns.spawn(
            async move {
                // Boxed, and freed once through: inline, the TLS and
                // WebSocket handshakes' state would stay in every such
                // client's task for its life.
                let arriving = Box::pin(crate::front::accept(
                    stream,
                    peer,
                    &front,
                    crate::conn::CONNECT_TIMEOUT,
                ));
                let arrived = tokio::select! {
                    r = arriving => r,
                    _ = stop.cancelled() => return,
                };
                let arrived = match arrived {
                    Ok(a) => a,
                    Err((reason, detail)) => {
                        state.fronts.refuse(reason);
                        tracing::info!(reason = reason.label(), %detail, "refused");
                        return;
                    }
                };
                tracing::Span::current().record("peer", tracing::field::display(arrived.peer));
                tokio::select! {
                    _ = handle_identified(arrived.stream, state, settings, arrived.identity) => {}
                    _ = stop.cancelled() => {}
                }
            }
            .instrument(span),
        );
    }
}

/// Binds a listener for MQTT clients whose accepted sockets come with
/// TCP_NODELAY already set (Linux copies it from the listening socket): a
/// `setsockopt` per client spared. Otherwise as `TcpListener::bind`
/// (address reuse, a backlog of 1,024).
fn bind_clients(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Asks every connected client to close, `rate` per second with up to half
/// a slot of jitter, until every connection task has ended. Clients that
/// finish their CONNECT meanwhile are picked up by the next pass.
async fn close_paced(state: Arc<State>, rate: u32, conns: TaskTracker) {
    let slot = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut next = tokio::time::Instant::now();
    loop {
        let mut open = state.open_connections();
        if open.is_empty() {
            tokio::select! {
                _ = conns.wait() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => continue,
            }
        }
        fastrand::shuffle(&mut open);
        for outbox in open {
            next = next.max(tokio::time::Instant::now());
            tokio::time::sleep_until(next + slot.mul_f64(fastrand::f64() * 0.5)).await;
            next += slot;
            outbox.close(Closing::ShuttingDown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clients' sockets come with TCP_NODELAY from the listener (so the
    /// accept loop sets nothing per client), on Linux where it is copied.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_clients_inherit_nodelay() -> io::Result<()> {
        let listener = bind_clients("127.0.0.1:0".parse().map_err(io::Error::other)?)?;
        let addr = listener.local_addr()?;
        let _client = tokio::net::TcpStream::connect(addr).await?;
        let (accepted, _) = listener.accept().await?;
        assert!(accepted.nodelay()?, "TCP_NODELAY not inherited");
        Ok(())
    }
}
