//! The `[broker]` section, for `mqlb broker --config FILE`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use toml::Spanned;

use crate::{file, ConfigError, Problem};

/// Default topic-level limit (Mosquitto's); the codec has the same value.
pub const DEFAULT_MAX_TOPIC_LEVELS: usize = 200;

/// Default MQTT listener of a broker node.
pub const DEFAULT_BROKER_LISTEN: &str = "127.0.0.1:1883";

/// What an ACL rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Subscribe and receive.
    Read,
    /// Publish.
    Write,
    /// Both.
    ReadWrite,
}

impl Access {
    /// Whether this grants reading.
    pub fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }
    /// Whether this grants writing.
    pub fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

/// One topic access rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclRule {
    /// `None` matches every client, anonymous ones included.
    pub user: Option<String>,
    /// Filter pattern with `%u` / `%c` placeholders.
    pub topic: String,
    /// What it grants.
    pub access: Access,
}

/// A validated broker configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// MQTT listener.
    pub listen: SocketAddr,
    /// Admin API address.
    pub admin: Option<SocketAddr>,
    /// Who may call the admin API (`admin_token_file`,
    /// `admin_allowed_hosts`).
    pub admin_access: crate::AdminAccess,
    /// Whether clients without a user name may connect.
    pub allow_anonymous: bool,
    /// Password file, if any.
    pub password_file: Option<PathBuf>,
    /// Queued messages per offline session.
    pub max_queued_messages: usize,
    /// Queued payload bytes per offline session.
    pub max_queued_bytes: usize,
    /// Most levels in a topic name or filter. Deeper ones are refused by the
    /// codec (v5: DISCONNECT 0x90 Topic Name Invalid / 0x8F Topic Filter
    /// Invalid; 3.x: the connection is closed, as Mosquitto does), so no
    /// per-level walk has a depth the network chose.
    pub max_topic_levels: usize,
    /// Most subscriptions one session may hold (more get 0x97 Quota
    /// exceeded): each costs memory, and a client must not grow the broker
    /// without bound.
    pub max_subscriptions: usize,
    /// Topic access rules; empty = allow all.
    pub acl: Vec<AclRule>,
    /// How often the `$SYS/broker/...` retained topics are refreshed.
    pub sys_interval: std::time::Duration,
    /// When set, v5 clients asking for a longer keep-alive (or none) get this
    /// as Server Keep Alive, so dead clients are noticed in bounded time.
    pub max_keep_alive: Option<u16>,
    /// On SIGTERM, clients are closed at this many per second (v5 with
    /// DISCONNECT 0x8B), so they reconnect elsewhere without a storm.
    pub shutdown_rate: u32,
    /// How long the paced close may take; the rest is then cut.
    pub shutdown_grace: std::time::Duration,
    /// Log line format, when the file sets one (`[log] format`).
    pub log_format: Option<crate::LogFormat>,
    /// Cluster membership, when this node is one of several.
    pub cluster: Option<ClusterConfig>,
    /// Listeners beside `listen` (`[[broker.listener]]`): TLS, WebSocket,
    /// PROXY protocol, with the balancer's `[[listener]]` keys and meaning.
    pub listeners: Vec<crate::Listener>,
    /// The state store's limits (`[broker.statestore]`).
    pub statestore: StateStoreLimits,
    /// Where the node keeps what it must remember across restarts and
    /// power losses (`data_dir`, `--data-dir`); see [`BrokerConfig::storage`].
    pub data_dir: Option<PathBuf>,
    /// When a QoS 1/2 publish is acknowledged (`durability`); `None`:
    /// "disk" with a data directory, "memory" without.
    pub durability: Option<Durability>,
    /// Past this many bytes in the data directory, new publishes that
    /// need storing are refused (`max_disk_bytes`).
    pub max_disk_bytes: Option<u64>,
    /// Start on a data directory with a corrupt record by truncating the
    /// log there (`--repair`; what is cut is moved aside and logged).
    pub repair: bool,
    /// One fsync per change-log batch instead of one per group: only to
    /// measure what group commit buys (`--fsync-per-change`, hidden).
    pub fsync_per_change: bool,
}

/// When the broker acknowledges a QoS 1/2 publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Once applied in memory (on every member of the session chains, in a
    /// cluster): a node's loss is survived, a whole site's power loss is
    /// not.
    Memory,
    /// Once every change that keeps it is on disk (fsynced, in groups).
    Disk,
}

impl Durability {
    /// Reads `"memory"` or `"disk"`.
    pub fn parse(s: &str) -> Option<Durability> {
        match s {
            "memory" => Some(Durability::Memory),
            "disk" => Some(Durability::Disk),
            _ => None,
        }
    }
}

/// Where a node stores and how it acknowledges, once the deprecated alias
/// is resolved (see [`BrokerConfig::storage`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    /// The data directory, if any.
    pub data_dir: Option<PathBuf>,
    /// The durability rule.
    pub durability: Durability,
    /// Whether `[cluster] state_dir` / `--state-dir` named it (deprecated).
    pub from_state_dir: bool,
}

impl BrokerConfig {
    /// The data directory (`data_dir`, or the deprecated `[cluster]
    /// state_dir`) and the durability rule, or why they contradict each
    /// other.
    pub fn storage(&self) -> Result<Storage, String> {
        let state_dir = self.cluster.as_ref().and_then(|c| c.state_dir.clone());
        let (data_dir, from_state_dir) = match (&self.data_dir, state_dir) {
            (Some(d), Some(s)) if *d != s => {
                return Err(format!(
                    "data_dir ({}) and the deprecated [cluster] state_dir / --state-dir ({}) name different directories: keep data_dir only",
                    d.display(),
                    s.display()
                ))
            }
            (Some(d), _) => (Some(d.clone()), false),
            (None, Some(s)) => (Some(s), true),
            (None, None) => (None, false),
        };
        // "disk" is the default with a data directory named as such; a
        // directory named by the deprecated `state_dir` keeps what it
        // meant before (the Raft state only, sessions in memory).
        let durability = self
            .durability
            .unwrap_or(if data_dir.is_some() && !from_state_dir {
                Durability::Disk
            } else {
                Durability::Memory
            });
        if durability == Durability::Disk && data_dir.is_none() {
            return Err(
                "durability = \"disk\" needs a data directory (data_dir, --data-dir)".into(),
            );
        }
        Ok(Storage {
            data_dir,
            durability,
            from_state_dir,
        })
    }
}

/// Caps on what a node's state store holds (copies kept for other nodes
/// of a cluster included); over one, a write gets the protocol's "the
/// quota has been exceeded". The store's own type, so the defaults live in
/// one place.
pub type StateStoreLimits = mqlb_statestore::store::Limits;

/// Where a peer's cluster listener is: an IP address or a DNS name, and a
/// port. A name is resolved each time the peer is dialled, so a member
/// whose address changes (a Kubernetes pod, a Compose container) is found
/// again by its stable name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerAddr {
    host: String,
    port: u16,
}

impl PeerAddr {
    /// The IP address or DNS name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether this is a loopback IP address (a name never is).
    pub fn is_loopback(&self) -> bool {
        self.host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
    }
}

impl From<SocketAddr> for PeerAddr {
    fn from(a: SocketAddr) -> Self {
        PeerAddr {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for PeerAddr {
    type Err = String;
    /// `IP:PORT`, `[IPv6]:PORT` or `NAME:PORT` (a DNS name: labels of
    /// letters, digits and '-', separated by dots, at most 253 in all).
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a.into());
        }
        let bad = || format!("\"{s}\" is not IP:PORT or NAME:PORT");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(bad());
        }
        Ok(PeerAddr {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// A node's place in a cluster of bundled brokers (`[cluster]`, or
/// `--node-id`, `--cluster-listen`, `--peer`, `--cluster-secret-file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's name: what placement hashes, so it must equal the
    /// balancer's backend name for this node.
    pub node_id: String,
    /// Where peers connect.
    pub listen: SocketAddr,
    /// The other members by name.
    pub peers: Vec<(String, PeerAddr)>,
    /// Mutual TLS on every cluster connection; required unless `listen` is
    /// loopback.
    pub tls: Option<ClusterTls>,
    /// Copies of each persistent session (the holder included): 2 survives
    /// the loss of any one node, 3 of any two (with 5 or more nodes, so a
    /// majority is left).
    pub replication_factor: usize,
    /// This node joins a running cluster (`--join`): `peers` are its
    /// current members, and an admin call on one of them adds this node.
    pub join: bool,
    /// Where the node keeps its Raft state across restarts (`--state-dir`);
    /// without one it is caught up from scratch by the leader.
    pub state_dir: Option<PathBuf>,
    /// How far ahead of this node's clock a peer's retained-message stamp
    /// may be before the write is refused (a skewed or forged clock would
    /// otherwise win every last-writer-wins race).
    pub max_clock_drift: std::time::Duration,
    /// Seeds every random choice the node's cluster components make (Raft
    /// election timeouts), so a run can be replayed; `None`: from the
    /// operating system. Not in the file: for tests and simulation.
    pub seed: Option<u64>,
    /// Set an unreadable Raft state file aside instead of refusing to
    /// start (the broker's `--repair`). Not in the file.
    pub repair: bool,
}

/// `max_clock_drift` unless configured.
pub const DEFAULT_MAX_CLOCK_DRIFT: std::time::Duration = std::time::Duration::from_secs(60);

/// A node's cluster TLS files (`tls_cert`, `tls_key`, `tls_ca`, or the
/// `--cluster-tls-*` flags): all three or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTls {
    /// This node's certificate chain; its leaf names the node in a URI SAN
    /// `mqlb://node/ID`.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The cluster CA bundle.
    pub ca: PathBuf,
}

/// What replaced the shared cluster secret, for the error that refuses it.
pub const SECRET_RETIRED: &str = "the cluster's shared secret is retired: cluster links now use mutual TLS. Make a CA once with `mqlb cert create-ca --out DIR`, a certificate for each node with `mqlb cert create-node NODE_ID --host ADDRESS --ca DIR --out DIR`, and give each node tls_cert, tls_key and tls_ca in [cluster] (or --cluster-tls-cert, --cluster-tls-key, --cluster-tls-ca)";

/// Session copies unless configured: survives the loss of any one node.
pub const DEFAULT_REPLICATION_FACTOR: usize = 2;

impl ClusterConfig {
    /// Parses a `--peer` / `peers` entry, `NAME@HOST:PORT` (HOST an IP
    /// address or a DNS name).
    pub fn parse_peer(s: &str) -> Result<(String, PeerAddr), String> {
        let (name, addr) = s
            .split_once('@')
            .ok_or_else(|| format!("\"{s}\" is not NAME@HOST:PORT"))?;
        let name = Self::check_name(name)?;
        Ok((name, addr.parse()?))
    }

    /// A node name: 1 to 64 of `[A-Za-z0-9_.-]`.
    pub fn check_name(name: &str) -> Result<String, String> {
        let ok = (1..=64).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(name.to_string())
        } else {
            Err(format!(
                "node name \"{name}\" must be 1 to 64 letters, digits, '-', '_' or '.'"
            ))
        }
    }

    /// Checks what cannot be checked field by field: no duplicate names,
    /// and a non-loopback listener only with TLS.
    pub fn validate(&self) -> Result<(), String> {
        let mut names: Vec<&str> = self.peers.iter().map(|(n, _)| n.as_str()).collect();
        names.push(&self.node_id);
        names.sort_unstable();
        if let Some([twice, _]) = names.windows(2).find(|w| matches!(w, [a, b] if a == b)) {
            return Err(format!("node name \"{twice}\" appears twice"));
        }
        if self.replication_factor < 1 || self.replication_factor > names.len() {
            return Err(format!(
                "replication_factor {} must be between 1 and the number of nodes ({})",
                self.replication_factor,
                names.len()
            ));
        }
        if self.tls.is_none() && !self.listen.ip().is_loopback() {
            return Err(format!(
                "cluster listener {} is not loopback: give the node its cluster certificates (tls_cert, tls_key and tls_ca in [cluster], or --cluster-tls-cert, --cluster-tls-key, --cluster-tls-ca; `mqlb cert` makes them), or every host that reaches it could join",
                self.listen
            ));
        }
        Ok(())
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_BROKER_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 1883))),
            admin: None,
            admin_access: crate::AdminAccess::default(),
            allow_anonymous: true,
            password_file: None,
            max_queued_messages: 1000,
            max_queued_bytes: 16 << 20,
            max_topic_levels: DEFAULT_MAX_TOPIC_LEVELS,
            max_subscriptions: 10_000,
            acl: Vec::new(),
            sys_interval: std::time::Duration::from_secs(10),
            max_keep_alive: None,
            shutdown_rate: 1000,
            shutdown_grace: std::time::Duration::from_secs(30),
            log_format: None,
            cluster: None,
            listeners: Vec::new(),
            statestore: StateStoreLimits::default(),
            data_dir: None,
            durability: None,
            max_disk_bytes: None,
            repair: false,
            fsync_per_change: false,
        }
    }
}

impl BrokerConfig {
    /// Reads the `[broker]` section of a file (other sections are ignored
    /// but still checked for syntax and unknown keys).
    pub fn load(path: &Path) -> Result<BrokerConfig, ConfigError> {
        let (name, text) = crate::read_file(path)?;
        Self::parse(&name, &text, path.parent())
    }

    /// Parses text; a relative `password_file` is resolved against `base`.
    pub fn parse(
        source_name: &str,
        text: &str,
        base: Option<&Path>,
    ) -> Result<BrokerConfig, ConfigError> {
        let raw: file::File = file::parse_all(text).map_err(|problems| ConfigError {
            source_name: source_name.to_string(),
            problems,
        })?;
        let mut problems = Vec::new();
        let line = |span: std::ops::Range<usize>| Some(file::line_of(text, span.start));
        let mut at = |key: String, span: std::ops::Range<usize>, message: String| {
            problems.push(Problem {
                key,
                line: line(span),
                message,
            })
        };
        let mut c = BrokerConfig::default();
        if let Some(v) = raw.log.as_ref().and_then(|l| l.format.as_ref()) {
            c.log_format = crate::LogFormat::parse(v.get_ref());
            if c.log_format.is_none() {
                at(
                    "log.format".into(),
                    v.span(),
                    format!("\"{}\" is not one of \"text\", \"json\"", v.get_ref()),
                );
            }
        }
        if let Some(b) = &raw.broker {
            let mut addr = |key: &str, v: &Spanned<String>| match v.get_ref().parse::<SocketAddr>()
            {
                Ok(a) => Some(a),
                Err(_) => {
                    at(
                        format!("broker.{key}"),
                        v.span(),
                        format!("\"{}\" is not an IP:port socket address", v.get_ref()),
                    );
                    None
                }
            };
            if let Some(v) = &b.listen {
                if let Some(a) = addr("listen", v) {
                    c.listen = a;
                }
            }
            if let Some(v) = &b.admin {
                c.admin = addr("admin", v);
            }
            if let Some(p) = &b.admin_token_file {
                let path = PathBuf::from(p.get_ref());
                c.admin_access.token_file = Some(match base {
                    Some(dir) if path.is_relative() => dir.join(path),
                    _ => path,
                });
            }
            c.admin_access.allowed_hosts = b
                .admin_allowed_hosts
                .iter()
                .flatten()
                .map(|h| h.get_ref().to_ascii_lowercase())
                .collect();
            c.allow_anonymous = b.allow_anonymous.unwrap_or(true);
            if let Some(p) = &b.password_file {
                let path = PathBuf::from(p.get_ref());
                c.password_file = Some(match base {
                    Some(dir) if path.is_relative() => dir.join(path),
                    _ => path,
                });
            }
            let none = None;
            let ss = |f: fn(&file::StateStoreFile) -> &Option<Spanned<i64>>| {
                b.statestore.as_ref().map_or(&none, f)
            };
            for (key, v, out) in [
                (
                    "max_queued_messages",
                    &b.max_queued_messages,
                    &mut c.max_queued_messages,
                ),
                (
                    "max_queued_bytes",
                    &b.max_queued_bytes,
                    &mut c.max_queued_bytes,
                ),
                (
                    "max_topic_levels",
                    &b.max_topic_levels,
                    &mut c.max_topic_levels,
                ),
                (
                    "max_subscriptions",
                    &b.max_subscriptions,
                    &mut c.max_subscriptions,
                ),
                (
                    "statestore.max_keys",
                    ss(|s| &s.max_keys),
                    &mut c.statestore.max_keys,
                ),
                (
                    "statestore.max_key_bytes",
                    ss(|s| &s.max_key_bytes),
                    &mut c.statestore.max_key_bytes,
                ),
                (
                    "statestore.max_value_bytes",
                    ss(|s| &s.max_value_bytes),
                    &mut c.statestore.max_value_bytes,
                ),
                (
                    "statestore.max_total_bytes",
                    ss(|s| &s.max_total_bytes),
                    &mut c.statestore.max_total_bytes,
                ),
                (
                    "statestore.max_watches_per_client",
                    ss(|s| &s.max_watches_per_client),
                    &mut c.statestore.max_watches_per_client,
                ),
            ] {
                if let Some(v) = v {
                    match usize::try_from(*v.get_ref()) {
                        Ok(n) if n > 0 => *out = n,
                        _ => at(
                            format!("broker.{key}"),
                            v.span(),
                            "must be at least 1".into(),
                        ),
                    }
                }
            }
            if let Some(p) = &b.data_dir {
                let path = PathBuf::from(p.get_ref());
                c.data_dir = Some(match base {
                    Some(dir) if path.is_relative() => dir.join(path),
                    _ => path,
                });
            }
            if let Some(v) = &b.durability {
                c.durability = Durability::parse(v.get_ref());
                if c.durability.is_none() {
                    at(
                        "broker.durability".into(),
                        v.span(),
                        format!("\"{}\" is not one of \"memory\", \"disk\"", v.get_ref()),
                    );
                }
            }
            if let Some(v) = &b.max_disk_bytes {
                match u64::try_from(*v.get_ref()) {
                    Ok(n) if n > 0 => c.max_disk_bytes = Some(n),
                    _ => at(
                        "broker.max_disk_bytes".into(),
                        v.span(),
                        "must be at least 1".into(),
                    ),
                }
            }
            if let Some(v) = &b.sys_interval {
                match crate::duration::parse(v.get_ref()) {
                    Ok(d) if !d.is_zero() => c.sys_interval = d,
                    Ok(_) => at(
                        "broker.sys_interval".into(),
                        v.span(),
                        "must be greater than 0".into(),
                    ),
                    Err(m) => at("broker.sys_interval".into(), v.span(), m),
                }
            }
            if let Some(v) = &b.max_keep_alive {
                match crate::duration::parse(v.get_ref()) {
                    Ok(d) if (1..=65_535).contains(&d.as_secs()) => {
                        c.max_keep_alive = u16::try_from(d.as_secs()).ok()
                    }
                    Ok(_) => at(
                        "broker.max_keep_alive".into(),
                        v.span(),
                        "must be between 1 s and 65535 s".into(),
                    ),
                    Err(m) => at("broker.max_keep_alive".into(), v.span(), m),
                }
            }
            if let Some(v) = &b.shutdown_rate {
                match u32::try_from(*v.get_ref()) {
                    Ok(n) if (1..=1_000_000).contains(&n) => c.shutdown_rate = n,
                    _ => at(
                        "broker.shutdown_rate".into(),
                        v.span(),
                        "must be between 1 and 1000000 per second".into(),
                    ),
                }
            }
            if let Some(v) = &b.shutdown_grace {
                match crate::duration::parse(v.get_ref()) {
                    Ok(d) => c.shutdown_grace = d,
                    Err(m) => at("broker.shutdown_grace".into(), v.span(), m),
                }
            }
            for (i, r) in b.acl.iter().enumerate() {
                let access = match r.access.get_ref().as_str() {
                    "read" => Access::Read,
                    "write" => Access::Write,
                    "readwrite" => Access::ReadWrite,
                    other => {
                        at(
                            format!("broker.acl[{i}].access"),
                            r.access.span(),
                            format!("\"{other}\" is not one of \"read\", \"write\", \"readwrite\""),
                        );
                        continue;
                    }
                };
                let topic = r.topic.get_ref();
                let probe = topic.replace("%u", "u").replace("%c", "c");
                if probe.is_empty() || mqlb_check_filter(&probe).is_err() {
                    at(
                        format!("broker.acl[{i}].topic"),
                        r.topic.span(),
                        format!("\"{topic}\" is not a valid topic filter"),
                    );
                    continue;
                }
                let user = r.user.get_ref();
                c.acl.push(AclRule {
                    user: (user != "*").then(|| user.clone()),
                    topic: topic.clone(),
                    access,
                });
            }
        }
        if let Some(cl) = &raw.cluster {
            let node_id = match ClusterConfig::check_name(cl.node_id.get_ref()) {
                Ok(n) => Some(n),
                Err(m) => {
                    at("cluster.node_id".into(), cl.node_id.span(), m);
                    None
                }
            };
            let listen = match cl.listen.get_ref().parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    at(
                        "cluster.listen".into(),
                        cl.listen.span(),
                        format!(
                            "\"{}\" is not an IP:port socket address",
                            cl.listen.get_ref()
                        ),
                    );
                    None
                }
            };
            let mut peers = Vec::new();
            for (i, p) in cl.peers.iter().enumerate() {
                match ClusterConfig::parse_peer(p.get_ref()) {
                    Ok(x) => peers.push(x),
                    Err(m) => at(format!("cluster.peers[{i}]"), p.span(), m),
                }
            }
            if let Some(p) = &cl.secret_file {
                at(
                    "cluster.secret_file".into(),
                    p.span(),
                    SECRET_RETIRED.to_string(),
                );
            }
            let path_of = |p: &Spanned<String>| {
                let path = PathBuf::from(p.get_ref());
                match base {
                    Some(dir) if path.is_relative() => dir.join(path),
                    _ => path,
                }
            };
            let tls = match (&cl.tls_cert, &cl.tls_key, &cl.tls_ca) {
                (None, None, None) => None,
                (Some(cert), Some(key), Some(ca)) => Some(ClusterTls {
                    cert: path_of(cert),
                    key: path_of(key),
                    ca: path_of(ca),
                }),
                (cert, key, ca) => {
                    let span = [cert, key, ca]
                        .iter()
                        .find_map(|x| x.as_ref().map(|s| s.span()))
                        .unwrap_or(0..0);
                    at(
                        "cluster.tls_cert".into(),
                        span,
                        "tls_cert, tls_key and tls_ca go together: give all three or none"
                            .to_string(),
                    );
                    None
                }
            };
            if let (Some(node_id), Some(listen)) = (node_id, listen) {
                let peers_len = peers.len();
                let cc = ClusterConfig {
                    node_id,
                    listen,
                    peers,
                    tls,
                    max_clock_drift: DEFAULT_MAX_CLOCK_DRIFT,
                    seed: None,
                    repair: false,
                    replication_factor: DEFAULT_REPLICATION_FACTOR.min(peers_len + 1),
                    join: cl.join.unwrap_or(false),
                    state_dir: cl.state_dir.as_ref().map(|p| {
                        let path = PathBuf::from(p.get_ref());
                        match base {
                            Some(dir) if path.is_relative() => dir.join(path),
                            _ => path,
                        }
                    }),
                };
                let mut cc = cc;
                if let Some(v) = &cl.max_clock_drift {
                    match crate::duration::parse(v.get_ref()) {
                        Ok(d) if !d.is_zero() => cc.max_clock_drift = d,
                        _ => at(
                            "cluster.max_clock_drift".into(),
                            v.span(),
                            format!("\"{}\" is not a duration such as \"1m\"", v.get_ref()),
                        ),
                    }
                }
                if let Some(r) = &cl.replication_factor {
                    let nodes = cc.peers.len() + 1;
                    match usize::try_from(*r.get_ref()) {
                        Ok(n) if (1..=nodes).contains(&n) => cc.replication_factor = n,
                        _ => at(
                            "cluster.replication_factor".into(),
                            r.span(),
                            format!(
                                "{} must be between 1 and the number of nodes ({nodes})",
                                r.get_ref()
                            ),
                        ),
                    }
                }
                match cc.validate() {
                    Ok(()) => c.cluster = Some(cc),
                    Err(m) => at("cluster.listen".into(), cl.listen.span(), m),
                }
            }
        }
        let mut lc = crate::Collector {
            text,
            problems: Vec::new(),
        };
        for (i, l) in raw
            .broker
            .iter()
            .flat_map(|b| b.listener.iter())
            .enumerate()
        {
            let at = format!("broker.listener[{i}]");
            if let Some(v) = &l.connect_refusal {
                // The broker always answers a refused CONNECT as Mosquitto does.
                lc.at(format!("{at}.connect_refusal"), v, "is a balancer setting");
            }
            if let Some(l) = crate::validate_listener(&at, &format!("listener{i}"), l, &mut lc) {
                c.listeners.push(l);
            }
        }
        problems.extend(lc.problems);
        if let (true, Err(e)) = (problems.is_empty(), c.storage()) {
            problems.push(Problem {
                key: "broker.data_dir".into(),
                line: None,
                message: e,
            });
        }
        if problems.is_empty() {
            Ok(c)
        } else {
            Err(ConfigError {
                source_name: source_name.to_string(),
                problems,
            })
        }
    }
}

/// Topic filter syntax (kept here so `config` does not depend on the codec).
fn mqlb_check_filter(f: &str) -> Result<(), ()> {
    let mut levels = f.split('/').peekable();
    while let Some(l) = levels.next() {
        if l.contains('#') && (l != "#" || levels.peek().is_some()) {
            return Err(());
        }
        if l.contains('+') && l != "+" {
            return Err(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_peer_is_an_ip_or_a_dns_name_with_a_port() {
        let ok = |s: &str| ClusterConfig::parse_peer(s).map(|(n, a)| (n, a.to_string()));
        assert_eq!(
            ok("n1@10.0.0.1:7000"),
            Ok(("n1".into(), "10.0.0.1:7000".into()))
        );
        assert_eq!(ok("n1@[::1]:7000"), Ok(("n1".into(), "[::1]:7000".into())));
        assert_eq!(
            ok("n2@mqlb-1.mqlb-peers.default.svc.cluster.local:7000"),
            Ok((
                "n2".into(),
                "mqlb-1.mqlb-peers.default.svc.cluster.local:7000".into()
            ))
        );
        assert_eq!(
            ok("n3@Broker-3:7000"),
            Ok(("n3".into(), "broker-3:7000".into()))
        );
        for bad in [
            "n1@broker",
            "n1@broker:",
            "n1@broker:70000",
            "n1@-broker:7000",
            "n1@bro ker:7000",
            "n1@a..b:7000",
            "n1@:7000",
            "n1@bröker:7000",
            "broker:7000",
        ] {
            assert!(ClusterConfig::parse_peer(bad).is_err(), "{bad} accepted");
        }
        let a: PeerAddr = "127.0.0.1:7000".parse().unwrap();
        assert!(a.is_loopback());
        let a: PeerAddr = "localhost:7000".parse().unwrap();
        assert!(!a.is_loopback(), "a name is never taken for loopback");
    }

    use super::*;

    #[test]
    fn broker_section() {
        let text = "[broker]\nlisten = \"127.0.0.1:2883\"\nallow_anonymous = false\npassword_file = \"passwd\"\n\
                    [[broker.acl]]\nuser = \"*\"\ntopic = \"devices/%c/#\"\naccess = \"readwrite\"\n\
                    [[broker.acl]]\nuser = \"ops\"\ntopic = \"#\"\naccess = \"read\"\n";
        let c = BrokerConfig::parse("b.toml", text, Some(Path::new("/etc/mqlb"))).unwrap();
        assert_eq!(c.listen, "127.0.0.1:2883".parse().unwrap());
        assert!(!c.allow_anonymous);
        assert_eq!(c.password_file, Some(PathBuf::from("/etc/mqlb/passwd")));
        assert_eq!(c.acl.len(), 2);
        assert_eq!(c.acl[0].user, None);
        assert_eq!(c.acl[1].access, Access::Read);
        assert_eq!(c.max_topic_levels, DEFAULT_MAX_TOPIC_LEVELS);
        let c = BrokerConfig::parse("b.toml", "[broker]\nmax_topic_levels = 16\n", None).unwrap();
        assert_eq!(c.max_topic_levels, 16);
        let e = BrokerConfig::parse("b.toml", "[broker]\n\nmax_topic_levels = 0\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.toml:3: broker.max_topic_levels"), "{e}");
    }

    /// `data_dir` means "disk" on a single node; `state_dir` is its
    /// deprecated name; contradictions are refused with what to do.
    #[test]
    fn data_dir_durability_and_the_state_dir_alias() {
        let parse = |t: &str| BrokerConfig::parse("b.toml", t, Some(Path::new("/etc/mqlb")));
        let c = parse("[broker]\ndata_dir = \"data\"\nmax_disk_bytes = 1000000\n").unwrap();
        let s = c.storage().unwrap();
        assert_eq!(s.data_dir, Some(PathBuf::from("/etc/mqlb/data")));
        assert_eq!(s.durability, Durability::Disk);
        assert_eq!(c.max_disk_bytes, Some(1_000_000));
        let c = parse("[broker]\ndata_dir = \"d\"\ndurability = \"memory\"\n").unwrap();
        assert_eq!(c.storage().unwrap().durability, Durability::Memory);
        assert_eq!(
            BrokerConfig::default().storage().unwrap().durability,
            Durability::Memory
        );
        let e = parse("[broker]\ndurability = \"disk\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs a data directory"), "{e}");
        let e = parse("[broker]\ndurability = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.toml:2: broker.durability"), "{e}");
        let cluster = "[cluster]\nnode_id = \"n1\"\nlisten = \"127.0.0.1:7001\"\npeers = [\"n2@127.0.0.1:7002\"]\n";
        // The deprecated name alone: the data directory, "memory" as before.
        let c = parse(&format!("{cluster}state_dir = \"s\"\n")).unwrap();
        let s = c.storage().unwrap();
        assert_eq!(s.data_dir, Some(PathBuf::from("/etc/mqlb/s")));
        assert!(s.from_state_dir);
        assert_eq!(s.durability, Durability::Memory);
        let e = parse(&format!(
            "[broker]\ndata_dir = \"d\"\n{cluster}state_dir = \"s\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("name different directories"), "{e}");
        let c = parse(&format!("[broker]\ndata_dir = \"d\"\n{cluster}")).unwrap();
        assert_eq!(c.storage().unwrap().durability, Durability::Disk);
    }

    #[test]
    fn cluster_join_and_state_dir() {
        let text = "[cluster]\nnode_id = \"n4\"\nlisten = \"127.0.0.1:7004\"\npeers = [\"n1@127.0.0.1:7001\"]\njoin = true\nstate_dir = \"state\"\n";
        let c = BrokerConfig::parse("b.toml", text, Some(Path::new("/var/lib/mqlb")))
            .unwrap()
            .cluster
            .unwrap();
        assert!(c.join);
        assert_eq!(c.state_dir, Some(PathBuf::from("/var/lib/mqlb/state")));
        let text = "[cluster]\nnode_id = \"n1\"\nlisten = \"127.0.0.1:7001\"\n";
        let c = BrokerConfig::parse("b.toml", text, None)
            .unwrap()
            .cluster
            .unwrap();
        assert!(!c.join);
        assert_eq!(c.state_dir, None);
    }

    #[test]
    fn statestore_limits() {
        let c = BrokerConfig::parse("b.toml", "[broker]\n", None).unwrap();
        assert_eq!(c.statestore, StateStoreLimits::default());
        let text = "[broker.statestore]\nmax_keys = 10\nmax_total_bytes = 4096\n";
        let c = BrokerConfig::parse("b.toml", text, None).unwrap();
        assert_eq!(
            (c.statestore.max_keys, c.statestore.max_total_bytes),
            (10, 4096)
        );
        assert_eq!(c.statestore.max_value_bytes, 1 << 20);
        let e = BrokerConfig::parse(
            "b.toml",
            "[broker.statestore]\nmax_keys = 1\nmax_value_bytes = -1\n",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("b.toml:3: broker.statestore.max_value_bytes"),
            "{e}"
        );
        let e = BrokerConfig::parse("b.toml", "[broker.statestore]\nmax_keyz = 1\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_keyz"), "{e}");
    }

    #[test]
    fn broker_errors_name_key_and_line() {
        let text = "[broker]\nlisten = \"nope\"\n[[broker.acl]]\nuser = \"*\"\ntopic = \"a/#/b\"\naccess = \"all\"\n";
        let e = BrokerConfig::parse("b.toml", text, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.toml:2: broker.listen"), "{e}");
        assert!(e.contains("b.toml:6: broker.acl[0].access"), "{e}");
    }

    #[test]
    fn replication_factor_is_checked_against_the_members() {
        let text = |r: i64| {
            format!(
                "[cluster]\nnode_id = \"n1\"\nlisten = \"127.0.0.1:7001\"\npeers = [\"n2@127.0.0.1:7002\", \"n3@127.0.0.1:7003\"]\nreplication_factor = {r}\n"
            )
        };
        let c = BrokerConfig::parse("b.toml", &text(3), None).unwrap();
        assert_eq!(c.cluster.map(|c| c.replication_factor), Some(3));
        for bad in [0, 4, -1] {
            let e = BrokerConfig::parse("b.toml", &text(bad), None)
                .unwrap_err()
                .to_string();
            assert!(e.contains("b.toml:5: cluster.replication_factor"), "{e}");
        }
        let text = "[cluster]\nnode_id = \"n1\"\nlisten = \"127.0.0.1:7001\"\n";
        let c = BrokerConfig::parse("b.toml", text, None).unwrap();
        // Alone, a node keeps the one copy it can.
        assert_eq!(c.cluster.map(|c| c.replication_factor), Some(1));
    }

    #[test]
    fn broker_listener_mistakes_name_key_and_line() {
        let text = "[broker]\n\
                    [[broker.listener]]\naddress = \"127.0.0.1:8883\"\n\
                    tls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"\n\
                    tls_client_crl = \"/nonexistent/crl.pem\"\n\
                    connect_refusal = \"close\"\n\
                    [[broker.listener]]\naddress = \"127.0.0.1:8083\"\nkind = \"websockets\"\n\
                    proxy_trusted = [\"10.0.0.0/33\"]\n";
        let e = BrokerConfig::parse("b.toml", text, None)
            .unwrap_err()
            .to_string();
        for want in [
            "b.toml:4: broker.listener[0].tls_cert",
            "b.toml:5: broker.listener[0].tls_key",
            "b.toml:6: broker.listener[0].tls_client_crl",
            "broker.listener[0].tls_client_crl: a CRL revokes client certificates",
            "b.toml:7: broker.listener[0].connect_refusal",
            "b.toml:10: broker.listener[1].kind",
            "b.toml:11: broker.listener[1].proxy_trusted[0]",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        let ok = "[[broker.listener]]\nname = \"ws\"\naddress = \"127.0.0.1:8083\"\nkind = \"websocket\"\n";
        let c = BrokerConfig::parse("b.toml", ok, None).unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].websocket.as_deref(), Some("/mqtt"));
    }
}
