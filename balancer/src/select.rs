//! The backend set and placement by client ID.
//!
//! The set is an `ArcSwap` snapshot: the data path loads it without a lock,
//! and a reload or a health change publishes a new one. Ranking is
//! [`mqlb_placement`]'s rendezvous hash; whether a backend is usable is a
//! filter applied afterwards, so the hash itself never depends on health.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use mqlb_config::EmptyClientId;
use mqlb_healthcheck::{HealthCell, HealthState};

use crate::metrics::Histogram;

/// One backend broker as the data path sees it.
#[derive(Debug)]
pub struct Backend {
    /// Placement identity.
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// Relative share.
    pub weight: u32,
    /// The pool it belongs to.
    pub pool: String,
    /// Send it a PROXY protocol v2 header first.
    pub send_proxy: bool,
    /// TLS towards it: the client built from its files, or why they were
    /// unusable (then it takes no clients).
    pub tls: Option<Result<mqlb_healthcheck::tls::TlsClient, String>>,
    /// What `tls` was built from, to tell a changed backend on reload.
    tls_spec: Option<mqlb_config::BackendTls>,
    /// MQTT over WebSocket to it on this path; `None`: over TCP.
    pub websocket: Option<String>,
    /// Its admin API, when it is an mqlb cluster node.
    pub cluster_admin: Option<String>,
    /// Set while a majority of the cluster's ready nodes leave it out of
    /// their view (see `clusterview`): no new clients then.
    out_of_view: AtomicBool,
    /// What the node last said of itself and its cluster (`GET /cluster`),
    /// for the console; `None` until it answers, or when it stops.
    cluster_node: std::sync::Mutex<Option<crate::nodeview::NodeView>>,
    /// Set by an operator (admin API): no new clients, existing ones are
    /// moved at the eviction rate. Kept apart from health, as pingora keeps
    /// `enabled` apart from `healthy`.
    draining: AtomicBool,
    /// Published by the health checker; unset when checks are disabled.
    health: OnceLock<Arc<HealthCell>>,
    /// Client connections forwarded to it now.
    pub active: AtomicU64,
    /// Client connections forwarded to it in total.
    pub forwarded: AtomicU64,
    /// TCP connects to it that failed or timed out.
    pub connect_failures: AtomicU64,
    /// Bytes relayed to and from it.
    pub bytes: crate::metrics::ByteCounts,
    /// Clients closed to move them off this backend.
    pub evictions: AtomicU64,
    /// CONNACK codes this backend answered, by wire byte (3.x return codes
    /// are stored as their v5 equivalents).
    pub connacks: Box<[AtomicU64; 256]>,
    /// Time from writing the CONNECT to the CONNACK's arrival.
    pub connect_latency: Histogram,
    /// Probe PINGREQ → PINGRESP round-trip times.
    pub probe_rtt: Histogram,
    /// Probes by result: up, down, misconfigured.
    pub probes: [AtomicU64; 3],
    /// Health transitions by target state (indexed by `HealthState as u8`).
    pub transitions: [AtomicU64; 4],
    /// Unix milliseconds of the last health transition; 0 before the first.
    pub last_transition_ms: AtomicU64,
    /// CONNECTs forwarded and not yet answered by a CONNACK.
    pub pending_connacks: AtomicU64,
    /// Refusals because the client's session was moving between cluster
    /// nodes: not counted against the backend's health.
    pub sessions_moving: AtomicU64,
    /// Clients placed here that admission control refused, by reason.
    pub admission_refused: crate::refusal::Refused,
}

/// The TLS client for a backend's settings (files read now).
pub fn tls_client(
    t: &mqlb_config::BackendTls,
) -> std::io::Result<mqlb_healthcheck::tls::TlsClient> {
    mqlb_healthcheck::tls::TlsClient::new(
        &t.ca,
        t.client.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        &t.server_name,
    )
}

impl Backend {
    /// A backend with zeroed counters, not draining, health unknown.
    pub fn new(spec: &mqlb_config::Backend) -> Self {
        Self {
            name: spec.name.clone(),
            address: spec.address.clone(),
            weight: spec.weight,
            pool: spec.pool.clone(),
            send_proxy: spec.send_proxy,
            tls: spec.tls.as_ref().map(|t| {
                tls_client(t).map_err(|e| {
                    tracing::error!(backend = %spec.name, error = %e, "backend TLS settings unusable; the backend is skipped");
                    e.to_string()
                })
            }),
            tls_spec: spec.tls.clone(),
            websocket: spec.websocket.clone(),
            cluster_admin: spec.cluster_admin.clone(),
            out_of_view: AtomicBool::new(false),
            cluster_node: std::sync::Mutex::new(None),
            draining: AtomicBool::new(false),
            health: OnceLock::new(),
            active: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            bytes: crate::metrics::ByteCounts::default(),
            evictions: AtomicU64::new(0),
            connacks: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
            connect_latency: Histogram::default(),
            probe_rtt: Histogram::default(),
            probes: Default::default(),
            transitions: Default::default(),
            last_transition_ms: AtomicU64::new(0),
            pending_connacks: AtomicU64::new(0),
            sessions_moving: AtomicU64::new(0),
            admission_refused: Default::default(),
        }
    }

    /// What its health checker probes: the same address, PROXY and TLS
    /// settings as the data path.
    pub fn probe_target(&self) -> mqlb_healthcheck::checker::Target {
        mqlb_healthcheck::checker::Target {
            name: self.name.clone(),
            address: self.address.clone(),
            proxy: self.send_proxy,
            tls: self.tls.as_ref().and_then(|t| t.as_ref().ok().cloned()),
            websocket: self.websocket.clone(),
        }
    }

    /// Whether new clients may be placed here: not draining, and healthy
    /// or not yet checked.
    pub fn is_usable(&self) -> bool {
        !self.is_draining() && !self.is_out_of_view() && self.health_state().is_usable()
    }

    /// Whether the cluster it belongs to has left it out of its view.
    pub fn is_out_of_view(&self) -> bool {
        self.out_of_view.load(Ordering::Acquire)
    }

    /// Records whether the cluster's view leaves it out; true if that
    /// changed.
    pub fn set_out_of_view(&self, out: bool) -> bool {
        self.out_of_view.swap(out, Ordering::AcqRel) != out
    }

    /// What the node last answered on its `/cluster` (its readiness, view
    /// and leader), if it answered the last time it was asked.
    pub fn cluster_node(&self) -> Option<crate::nodeview::NodeView> {
        self.cluster_node
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps the node's latest `/cluster` answer (or its absence), with
    /// its message rates since the answer before.
    pub fn set_cluster_node(&self, v: Option<crate::nodeview::NodeView>) {
        let mut kept = self.cluster_node.lock().unwrap_or_else(|p| p.into_inner());
        *kept = match (v, kept.as_ref()) {
            (Some(mut new), Some(old)) if new.node == old.node => {
                new.traffic = new
                    .traffic
                    .with_rates_since(&old.traffic, new.at.duration_since(old.at));
                Some(new)
            }
            (v, _) => v,
        };
    }

    /// Whether an operator is draining it.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Starts or stops draining. Returns the previous value.
    pub fn set_draining(&self, draining: bool) -> bool {
        self.draining.swap(draining, Ordering::AcqRel)
    }

    /// The published health state (`Unknown` when checks are off).
    pub fn health_state(&self) -> HealthState {
        self.health
            .get()
            .map_or(HealthState::Unknown, |h| h.state())
    }

    /// The health cell, when checks run.
    pub fn health(&self) -> Option<&Arc<HealthCell>> {
        self.health.get()
    }

    /// Connects the backend to its health checker (once).
    pub fn attach_health(&self, cell: Arc<HealthCell>) {
        let _ = self.health.set(cell);
    }

    /// A data-path failure, counted towards the passive threshold.
    pub fn passive_failure(&self) {
        if let Some(h) = self.health.get() {
            h.passive_failure();
        }
    }
}

impl mqlb_placement::Node for Backend {
    fn name(&self) -> &str {
        &self.name
    }
    fn weight(&self) -> u32 {
        self.weight
    }
}

/// The current backends, swappable without blocking readers.
#[derive(Debug)]
pub struct Backends {
    current: ArcSwap<Vec<Arc<Backend>>>,
}

impl Backends {
    /// Builds the set from configuration.
    pub fn new(specs: &[mqlb_config::Backend]) -> Self {
        Self {
            current: ArcSwap::from_pointee(
                specs.iter().map(|b| Arc::new(Backend::new(b))).collect(),
            ),
        }
    }

    /// A snapshot of the set.
    pub fn snapshot(&self) -> Arc<Vec<Arc<Backend>>> {
        self.current.load_full()
    }

    /// Usable backends for `key`, best first. The caller tries them in
    /// order, so a refused connect falls through to the client's next choice
    /// (which is also where it lands when its first choice is removed).
    pub fn candidates(&self, key: &[u8]) -> Vec<Arc<Backend>> {
        self.candidates_in(mqlb_config::DEFAULT_POOL, key)
    }

    /// The usable backends of `pool`, best first, for `key`: placement and
    /// health work per pool.
    pub fn candidates_in(&self, pool: &str, key: &[u8]) -> Vec<Arc<Backend>> {
        let set = self.current.load();
        let members: Vec<&Arc<Backend>> = set.iter().filter(|b| b.pool == pool).collect();
        mqlb_placement::rank(key, &members)
            .into_iter()
            .filter(|b| b.is_usable())
            .map(|b| Arc::clone(b))
            .collect()
    }

    /// Swaps in a new backend list. A backend whose name, address and weight
    /// are unchanged is kept as is (health, counters, drain state); others
    /// are created fresh. Returns (created backends, removed names).
    pub fn replace(&self, specs: &[mqlb_config::Backend]) -> (Vec<Arc<Backend>>, Vec<String>) {
        let old = self.current.load_full();
        let mut added = Vec::new();
        let next: Vec<Arc<Backend>> = specs
            .iter()
            .map(|spec| {
                match old.iter().find(|b| {
                    b.name == spec.name
                        && b.address == spec.address
                        && b.weight == spec.weight
                        && b.pool == spec.pool
                        && b.send_proxy == spec.send_proxy
                        && b.tls_spec == spec.tls
                        && b.websocket == spec.websocket
                        && b.cluster_admin == spec.cluster_admin
                }) {
                    Some(b) => b.clone(),
                    None => {
                        let b = Arc::new(Backend::new(spec));
                        added.push(b.clone());
                        b
                    }
                }
            })
            .collect();
        let removed = old
            .iter()
            .filter(|b| !specs.iter().any(|s| s.name == b.name))
            .map(|b| b.name.clone())
            .collect();
        self.current.store(Arc::new(next));
        (added, removed)
    }

    /// Looks a backend up by name.
    pub fn get(&self, name: &str) -> Option<Arc<Backend>> {
        self.current.load().iter().find(|b| b.name == name).cloned()
    }
}

/// What the routing rules look at.
#[derive(Debug, Clone, Copy)]
pub struct RouteInput<'a> {
    /// The listener's name.
    pub listener: &'a str,
    /// The client ID.
    pub client_id: &'a str,
    /// The CONNECT's user name.
    pub username: Option<&'a str>,
    /// Protocol level (3, 4 or 5).
    pub level: u8,
    /// The client's address.
    pub ip: IpAddr,
}

/// The pool for a client: the first rule that matches, else the default
/// pool. `None` when nothing matches and there is no default. Returns the
/// matching rule's index too (for `/clients`).
pub fn choose_pool<'a>(
    rules: &'a [mqlb_config::Rule],
    default_pool: Option<&'a str>,
    i: &RouteInput<'_>,
) -> Option<(Option<usize>, &'a str)> {
    use mqlb_config::Matcher as M;
    for (n, r) in rules.iter().enumerate() {
        let hit = match &r.matcher {
            M::Listener(l) => l == i.listener,
            M::ClientIdPrefix(p) => i.client_id.starts_with(p.as_str()),
            M::ClientIdGlob(g) => mqlb_config::glob_matches(g, i.client_id),
            M::Username(u) => i.username == Some(u.as_str()),
            M::Protocol(l) => *l == i.level,
            M::SourceCidr(c) => c.contains(i.ip),
        };
        if hit {
            return Some((Some(n), r.pool.as_str()));
        }
    }
    default_pool.map(|p| (None, p))
}

/// The placement key: the client ID, or for an empty ID the source address
/// as configured (the same device then keeps its backend).
pub fn placement_key(client_id: &str, peer: std::net::SocketAddr, empty: EmptyClientId) -> Vec<u8> {
    if !client_id.is_empty() {
        return client_id.as_bytes().to_vec();
    }
    let ip: IpAddr = match peer.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    match empty {
        EmptyClientId::SourceIp => format!("\0ip:{ip}").into_bytes(),
        EmptyClientId::SourceAddress => format!("\0addr:{ip}:{}", peer.port()).into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> Backends {
        let spec = |n: &str| mqlb_config::Backend {
            name: n.into(),
            address: format!("{n}:1883"),
            weight: 1,
            pool: mqlb_config::DEFAULT_POOL.into(),
            send_proxy: false,
            tls: None,
            websocket: None,
            cluster_admin: None,
        };
        Backends::new(&[spec("b1"), spec("b2"), spec("b3")])
    }

    #[test]
    fn unusable_backends_are_skipped_in_order() {
        let b = set();
        let all = b.candidates(b"dev-42");
        assert_eq!(all.len(), 3);
        all[0].set_draining(true);
        let rest = b.candidates(b"dev-42");
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0].name, all[1].name);
    }

    #[test]
    fn empty_ids_key_by_source() {
        let a: std::net::SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let b: std::net::SocketAddr = "10.0.0.1:2000".parse().unwrap();
        let ip = EmptyClientId::SourceIp;
        assert_eq!(placement_key("", a, ip), placement_key("", b, ip));
        let addr = EmptyClientId::SourceAddress;
        assert_ne!(placement_key("", a, addr), placement_key("", b, addr));
        assert_eq!(placement_key("x", a, ip), b"x");
        // A NUL-prefixed key cannot collide with a real client ID (U+0000 is
        // not allowed in MQTT strings).
        assert!(placement_key("", a, ip).starts_with(b"\0"));
    }
}
