//! The broker's listener and housekeeping.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use mqlb_config::broker::BrokerConfig;

use crate::auth::Auth;
use crate::conn::{handle, lock, Settings};
use crate::core::{Core, Limits};

/// A broker node with its listener bound.
#[derive(Debug)]
pub struct Broker {
    listener: TcpListener,
    core: Arc<Mutex<Core>>,
    auth: Arc<Auth>,
    sys_interval: Duration,
    settings: Settings,
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

    /// Serves until `shutdown`.
    pub async fn serve(self, shutdown: CancellationToken) {
        let core = self.core.clone();
        let sweeper_stop = shutdown.clone();
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
        let sys_stop = shutdown.clone();
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
                _ = shutdown.cancelled() => return,
            };
            let _ = stream.set_nodelay(true);
            let core = self.core.clone();
            let auth = self.auth.clone();
            let settings = self.settings;
            let stop = shutdown.clone();
            tokio::spawn(
                async move {
                    tokio::select! {
                        _ = handle(stream, core, auth, settings) => {}
                        _ = stop.cancelled() => {}
                    }
                }
                .instrument(tracing::debug_span!("client", %peer)),
            );
        }
    }
}
