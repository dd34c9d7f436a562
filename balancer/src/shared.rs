//! The state every connection task, the admin API and the health observer
//! share: configuration in force (swapped on reload), backends, counters,
//! live connections and the evictor.
//!
//! Its own module so that the admin API and the server both depend on it
//! instead of on each other.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use mqlb_config::Config;
use mqlb_healthcheck::{Checker, HealthState};

use crate::evict::Evictor;
use crate::limit::ConnectionLimit;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::select::Backends;

/// State every connection task shares.
#[derive(Debug)]
pub struct Shared {
    /// When this balancer started, for the console's uptime.
    pub started: std::time::SystemTime,
    /// Validated configuration in force; swapped whole on reload.
    pub(crate) config: ArcSwap<Config>,
    /// The health checker, when checks are enabled; reload adds and removes
    /// targets. Never touched by the data path.
    pub(crate) checker: Option<Mutex<Checker>>,
    /// The file the configuration came from, for SIGHUP and `POST /reload`.
    pub(crate) config_path: std::sync::OnceLock<std::path::PathBuf>,
    /// Backends, their health and counters.
    pub backends: Arc<Backends>,
    /// Balancer-wide counters.
    pub metrics: Metrics,
    /// Live forwarded connections.
    pub registry: Arc<Registry>,
    /// Paced session mover.
    pub evictor: Evictor,
    /// `max_connections`, resized on reload.
    pub limit: Arc<ConnectionLimit>,
    /// Local addresses backend connections come from (swapped on reload).
    pub sources: arc_swap::ArcSwap<crate::forward::Sources>,
    /// Backends DNS discovery found, by pool.
    pub(crate) dns_members: Mutex<std::collections::HashMap<String, Vec<mqlb_config::Backend>>>,
    /// Resolves DNS pools and backend host names, with a TTL cache.
    pub resolver: hickory_resolver::TokioAsyncResolver,
    /// Admission control's caps and state.
    pub admission: Arc<crate::admission::Admission>,
    /// Recent events and per-backend history, for the console.
    pub journal: Arc<crate::journal::Journal>,
    /// Set once a graceful shutdown has begun: `/readyz` answers 503.
    pub shutting_down: std::sync::atomic::AtomicBool,
    /// TLS listeners' acceptors, re-read from their files on reload.
    pub(crate) tls: Mutex<Vec<Arc<mqlb_listener::tls::Slot>>>,
    /// Who may call the admin API, when it is enabled.
    pub admin_access: Option<Arc<crate::http::Access>>,
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Backends added (or replaced because their address or weight changed).
    pub added: Vec<String>,
    /// Backends removed; their open connections are left to finish.
    pub removed: Vec<String>,
    /// Settings that only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
    /// TLS listeners whose certificate and key were re-read.
    pub tls_reloaded: Vec<String>,
}

impl Shared {
    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Applies a new configuration without dropping connections: the
    /// backend set is swapped (unchanged backends keep their health,
    /// counters and drain state), new backends get health checks, removed
    /// ones lose theirs, and CONNECT/backend settings apply to new
    /// connections. Listener and admin addresses need a restart.
    pub fn reload(&self, new: Config) -> Reloaded {
        let old = self.config();
        let mut r = Reloaded::default();
        if new.listeners != old.listeners {
            r.needs_restart.push("listener");
        }
        if new.admin != old.admin {
            r.needs_restart.push("admin");
        }
        if new.eviction != old.eviction {
            r.needs_restart.push("eviction");
        }
        if new.admission != old.admission {
            r.needs_restart.push("admission");
        }
        if new.health != old.health {
            r.needs_restart
                .push("health (applies to added backends only)");
        }
        if new.balancer.max_connections != old.balancer.max_connections {
            self.limit.resize(new.balancer.max_connections);
        }
        if new.balancer.source_addresses != old.balancer.source_addresses {
            self.sources.store(Arc::new(crate::forward::Sources::new(
                new.balancer.source_addresses.clone(),
            )));
        }
        if new.dns_pools != old.dns_pools || new.balancer.dns_servers != old.balancer.dns_servers {
            r.needs_restart.push("DNS pools");
        }
        let statics = new.backends.clone();
        self.config.store(Arc::new(new));
        let (added, removed) = self.apply_backends(&statics);
        r.added = added;
        r.removed = removed;
        tracing::info!(added = ?r.added, removed = ?r.removed, needs_restart = ?r.needs_restart, "configuration reloaded");
        r
    }

    /// Puts `statics` (the configured backends) plus every DNS pool's
    /// current members in force: only changed backends are created or
    /// dropped, so only their clients move; new ones get health checks.
    /// Returns (added, removed) names.
    pub fn apply_backends(&self, statics: &[mqlb_config::Backend]) -> (Vec<String>, Vec<String>) {
        let mut specs = statics.to_vec();
        {
            let dns = self.dns_members.lock().unwrap_or_else(|p| p.into_inner());
            let mut pools: Vec<_> = dns.iter().collect();
            pools.sort_by(|a, b| a.0.cmp(b.0));
            for (_, members) in pools {
                specs.extend(members.iter().cloned());
            }
        }
        let (added, removed) = self.backends.replace(&specs);
        if let Some(checker) = &self.checker {
            let mut checker = checker.lock().unwrap_or_else(|p| p.into_inner());
            for name in &removed {
                checker.remove(name);
            }
            for b in &added {
                checker.remove(&b.name);
                b.attach_health(checker.add(&b.probe_target()));
            }
        }
        (added.iter().map(|b| b.name.clone()).collect(), removed)
    }

    /// Replaces the members DNS found for `pool` and applies the change.
    pub fn set_dns_members(&self, pool: &str, members: Vec<mqlb_config::Backend>) {
        self.dns_members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pool.to_string(), members);
        let statics = self.config().backends.clone();
        let (added, removed) = self.apply_backends(&statics);
        if !added.is_empty() || !removed.is_empty() {
            tracing::info!(pool, ?added, ?removed, "DNS changed the pool");
            self.journal
                .record("dns", pool, format!("added {added:?}, removed {removed:?}"));
        }
    }

    /// Remembers the configuration file, enabling [`Shared::reload_from_file`].
    pub fn set_config_path(&self, path: std::path::PathBuf) {
        let _ = self.config_path.set(path);
    }

    /// Re-reads the configuration file and applies it. A broken file is
    /// reported and nothing changes.
    pub fn reload_from_file(&self) -> Result<Reloaded, String> {
        let path = self
            .config_path
            .get()
            .ok_or("the balancer was started from flags, not a file; nothing to reload")?;
        let mut config = Config::load(path).map_err(|e| e.to_string())?;
        // Sized as at start: a default max_connections that the open-file
        // limit cannot hold stays lowered instead of coming back.
        if let Ok(limit) = crate::fdlimit::current() {
            if let crate::fdlimit::Sized::Short(warning) = crate::fdlimit::apply(&mut config, limit)
            {
                tracing::warn!("{warning}");
            }
        }
        // Re-read every TLS listener's files first (rotated certificates
        // keep their paths): one bad file refuses the whole reload.
        let slots = self.tls.lock().map(|s| s.clone()).unwrap_or_default();
        let mut fresh = Vec::new();
        for slot in slots {
            let same = config
                .listeners
                .iter()
                .any(|l| l.name == slot.listener && l.tls.as_ref() == Some(&slot.files));
            if same {
                // Built first, stored only if every listener's files work.
                mqlb_listener::tls::acceptor(&slot.files)
                    .map_err(|e| format!("listener {} TLS: {e}", slot.listener))?;
                fresh.push(slot);
            }
        }
        let mut r = self.reload(config);
        for slot in fresh {
            if slot.reload().is_ok() {
                r.tls_reloaded.push(slot.listener.clone());
            }
        }
        if !r.tls_reloaded.is_empty() {
            tracing::info!(listeners = ?r.tls_reloaded, "TLS certificates re-read");
        }
        Ok(r)
    }

    /// Stops new placements on `name` and moves its clients at the paced
    /// rate. Returns false for an unknown backend.
    pub fn drain(&self, name: &str) -> bool {
        let Some(b) = self.backends.get(name) else {
            return false;
        };
        if !b.set_draining(true) {
            tracing::info!(backend = %name, "draining");
            self.journal.record("drain", name, "drained by an operator");
        }
        self.evictor.evict_backend(name);
        true
    }

    /// Lets `name` take new clients again (existing placements elsewhere stay).
    pub fn undrain(&self, name: &str) -> bool {
        let Some(b) = self.backends.get(name) else {
            return false;
        };
        if b.set_draining(false) {
            tracing::info!(backend = %name, "undrained");
            self.journal
                .record("undrain", name, "taking new clients again");
        }
        true
    }

    /// True when at least one backend is up (or unchecked and not draining)
    /// and no shutdown has begun.
    pub fn is_ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Relaxed)
            && self.backends.snapshot().iter().any(|b| {
                !b.is_draining()
                    && match b.health() {
                        Some(h) => h.state() == HealthState::Up,
                        None => true,
                    }
            })
    }
}
