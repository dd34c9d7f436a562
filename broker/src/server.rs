//! The broker's listener and housekeeping.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use mqlb_config::broker::BrokerConfig;

use crate::auth::Auth;
use crate::conn::{handle, lock, Settings};
use crate::core::{Closing, Core, Limits};

/// A broker node with its listener bound.
#[derive(Debug)]
pub struct Broker {
    listener: TcpListener,
    core: Arc<Mutex<Core>>,
    auth: Arc<Auth>,
    sys_interval: Duration,
    settings: Settings,
    shutdown_rate: u32,
    shutdown_grace: Duration,
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
        Ok(Broker {
            listener: TcpListener::bind(config.listen).await?,
            core: Arc::new(Mutex::new(Core::with_limits(Limits {
                max_queued_messages: config.max_queued_messages,
                max_queued_bytes: config.max_queued_bytes,
                ..Limits::default()
            }))),
            auth: Arc::new(auth),
            sys_interval: config.sys_interval,
            settings: Settings {
                max_keep_alive: config.max_keep_alive,
                max_topic_levels: config.max_topic_levels,
            },
            shutdown_rate: config.shutdown_rate,
            shutdown_grace: config.shutdown_grace,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Shared state (for tests and the admin side).
    pub fn core(&self) -> Arc<Mutex<Core>> {
        self.core.clone()
    }

    /// Serves until `shutdown`, then shuts down gracefully: stops
    /// accepting, closes clients at the shutdown rate (v5 clients get
    /// DISCONNECT 0x8B after everything queued for them), keeps persistent
    /// sessions and their wills, and after the grace period cuts whoever is
    /// left.
    pub async fn serve(self, shutdown: CancellationToken) {
        // Background tasks and the hard stop end with this function.
        let hard = CancellationToken::new();
        let _stop = hard.clone().drop_guard();
        let core = self.core.clone();
        let sweeper_stop = hard.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let n = lock(&core).expire_sessions(std::time::Instant::now());
                        if n > 0 {
                            tracing::debug!(expired = n, "sessions expired");
                        }
                    }
                    _ = sweeper_stop.cancelled() => return,
                }
            }
        });
        let core = self.core.clone();
        let sys_stop = hard.clone();
        let interval = self.sys_interval;
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = tick.tick() => crate::sys::publish(&mut lock(&core), started.elapsed()),
                    _ = sys_stop.cancelled() => return,
                }
            }
        });
        tracing::info!(address = ?self.listener.local_addr().ok(), "broker listening");
        let conns = TaskTracker::new();
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
            };
            let _ = stream.set_nodelay(true);
            let core = self.core.clone();
            let auth = self.auth.clone();
            let settings = self.settings;
            let stop = hard.clone();
            conns.spawn(
                async move {
                    tokio::select! {
                        _ = handle(stream, core, auth, settings) => {}
                        _ = stop.cancelled() => {}
                    }
                }
                .instrument(tracing::debug_span!("client", %peer)),
            );
        }
        drop(self.listener);
        conns.close();
        let open = lock(&self.core).connected();
        tracing::info!(open, rate = self.shutdown_rate, grace = ?self.shutdown_grace, "shutting down: closing clients at the shutdown rate");
        let closer = close_paced(self.core.clone(), self.shutdown_rate, conns.clone());
        if tokio::time::timeout(self.shutdown_grace, closer)
            .await
            .is_err()
        {
            tracing::warn!(
                open = lock(&self.core).connected(),
                "grace period over; closing remaining connections"
            );
        }
        hard.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), conns.wait()).await;
    }
}

/// Asks every connected client to close, `rate` per second with up to half
/// a slot of jitter, until every connection task has ended. Clients that
/// finish their CONNECT meanwhile are picked up by the next pass.
async fn close_paced(core: Arc<Mutex<Core>>, rate: u32, conns: TaskTracker) {
    let slot = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut next = tokio::time::Instant::now();
    loop {
        let mut open = lock(&core).open_connections();
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
