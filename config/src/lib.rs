//! mqlb's configuration: one TOML file, validated before anything binds.
//!
//! # Layout
//! * [`mod@file`]: the raw serde schema as written by operators. Unknown keys are
//!   errors (`deny_unknown_fields`), so a typo never passes silently.
//! * [`duration`]: `"250ms"`, `"10s"`, `"2m"` parsing.
//! * This module: the validated [`Config`], whose fields are already typed
//!   (socket addresses, durations, non-empty backend list), and [`ConfigError`],
//!   which names the key and the line.
//!
//! Validation reports every problem at once (linkerd's `parse_config` habit),
//! so an operator fixes a file in one pass.
//!
//! Dependencies: `serde` and `toml` (the de-facto TOML parser; its `Spanned`
//! wrapper gives us line numbers for semantic errors, not just syntax ones).

#![forbid(unsafe_code)]

pub mod broker;
pub mod duration;
pub mod file;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

/// Default time a client has to send its whole CONNECT.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default largest CONNECT accepted, in bytes.
pub const DEFAULT_MAX_CONNECT_SIZE: usize = 64 * 1024;
/// Default time to establish a TCP connection to a backend.
pub const DEFAULT_BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default limit of concurrent client connections per balancer.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Default backend weight.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Largest accepted weight: keeps weighted scores well inside f64 precision.
pub const MAX_WEIGHT: u32 = 10_000;

/// A validated balancer configuration. Every field is already usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where clients connect. Never empty.
    pub listeners: Vec<Listener>,
    /// Brokers behind the balancer. Never empty; names are unique.
    pub backends: Vec<Backend>,
    /// Client CONNECT handling and backend connection settings.
    pub balancer: BalancerSettings,
    /// Active and passive health checking.
    pub health: HealthSettings,
    /// How sessions are moved off a failed or drained backend.
    pub eviction: EvictionSettings,
    /// Caps that shape reconnect storms.
    pub admission: AdmissionSettings,
    /// Routing rules, tried in order; the first match picks the pool.
    pub rules: Vec<Rule>,
    /// Pools discovered in DNS.
    pub dns_pools: Vec<DnsPool>,
    /// Admin HTTP API address, if enabled.
    pub admin: Option<SocketAddr>,
    /// Who may call the admin API.
    pub admin_access: AdminAccess,
    /// Log line format, when the file sets one (`[log] format`).
    pub log_format: Option<LogFormat>,
}

/// Who may call an admin API (the balancer's `[admin]`, a broker node's
/// `[broker] admin_*`).
///
/// With a token, every state-changing call needs it (`Authorization:
/// Bearer TOKEN`), and so does every read when the API is not bound to
/// loopback, `/healthz` and `/readyz` aside. Without one, state-changing
/// calls are refused. Requests whose `Host` header names anything but a
/// loopback address, the API's own address or one of `allowed_hosts` are
/// refused (DNS rebinding).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminAccess {
    /// The file holding the token (re-read when it changes).
    pub token_file: Option<PathBuf>,
    /// Host names the API answers to besides loopback ones.
    pub allowed_hosts: Vec<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines; colour only on a terminal.
    #[default]
    Text,
    /// One JSON object per line, for container log pipelines.
    Json,
}

impl LogFormat {
    /// Parses `"text"` or `"json"`.
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// `[log] format` of a file's raw tables, with a problem for a bad value.
fn log_format(raw: &file::File, c: &mut Collector<'_>) -> Option<LogFormat> {
    let v = raw.log.as_ref()?.format.as_ref()?;
    let f = LogFormat::parse(v.get_ref());
    if f.is_none() {
        c.at(
            "log.format",
            v,
            format!("\"{}\" is not one of \"text\", \"json\"", v.get_ref()),
        );
    }
    f
}

/// Default probe interval: with fall 2 and a 500 ms timeout a dead broker is
/// out in well under a second.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_millis(250);
/// Default limit for each probe step.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_millis(500);
/// Default client closes per second when moving a backend's sessions.
pub const DEFAULT_EVICTION_RATE: u32 = 1000;

/// Which MQTT version probes speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProbeProtocol {
    /// MQTT 3.1.1 (default: every broker speaks it).
    #[default]
    V311,
    /// MQTT 5.0.
    V5,
}

/// Health check settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// Off only for backends that must see no probe traffic.
    pub enabled: bool,
    /// Time between probes.
    pub interval: Duration,
    /// Limit per probe step.
    pub timeout: Duration,
    /// Successes to mark a backend up.
    pub rise: u32,
    /// Failures to mark it down.
    pub fall: u32,
    /// Data-path failures (connect refused, CONNACK unavailable) to mark it down.
    pub passive_fall: u32,
    /// Maximum random delay before the first probe.
    pub jitter: Duration,
    /// Probe protocol version.
    pub protocol: ProbeProtocol,
    /// Probe user name.
    pub username: Option<String>,
    /// Probe password.
    pub password: Option<String>,
    /// Also run the publish/subscribe round trip.
    pub deep: bool,
    /// Topic prefix for the round trip.
    pub deep_topic: String,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            rise: 2,
            fall: 2,
            passive_fall: 3,
            jitter: DEFAULT_HEALTH_INTERVAL,
            protocol: ProbeProtocol::V311,
            username: None,
            password: None,
            deep: false,
            deep_topic: "mqlb/probe".into(),
        }
    }
}

/// Admission control: caps that shape a reconnect storm. Every cap is off
/// (0) by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionSettings {
    /// New CONNECTs per second forwarded to one backend (a token bucket).
    pub backend_connect_rate: u32,
    /// The bucket's size: how many may go at once after a quiet spell.
    pub backend_connect_burst: u32,
    /// CONNECTs forwarded to one backend and not yet answered by CONNACK.
    pub backend_pending_connacks: u32,
    /// Concurrent connections from one source IP.
    pub per_ip_connections: u32,
    /// CONNECTs per second from one source IP.
    pub per_ip_connect_rate: u32,
    /// How long a 3.x client over a cap is held for room before it gets
    /// return code 3 (v5 clients are answered at once).
    pub hold: Duration,
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        Self {
            backend_connect_rate: 0,
            backend_connect_burst: 0,
            backend_pending_connacks: 0,
            per_ip_connections: 0,
            per_ip_connect_rate: 0,
            hold: Duration::from_secs(2),
        }
    }
}

/// Session-move settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvictionSettings {
    /// Client closes per second, per balancer.
    pub rate: u32,
    /// When set, v5 clients get DISCONNECT 0x9C Use another server with this
    /// Server Reference instead of 0x8B Server shutting down.
    pub server_reference: Option<String>,
    /// On SIGTERM or Ctrl-C, clients are closed at `rate` for at most this
    /// long; whoever is left then is cut at once.
    pub shutdown_grace: Duration,
}

/// Default time to close clients at the eviction rate on shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

impl Default for EvictionSettings {
    fn default() -> Self {
        Self {
            rate: DEFAULT_EVICTION_RATE,
            server_reference: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// How a listener answers a malformed, invalid or oversized v5 CONNECT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// Close without a CONNACK, as Mosquitto does, so the balancer cannot be
    /// told apart from the broker behind it.
    #[default]
    Close,
    /// Send CONNACK 0x81 / 0x82 / 0x95 first, so the client learns why.
    ReasonCode,
}

/// A listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Label used in logs and metrics.
    pub name: String,
    /// Bind address.
    pub address: SocketAddr,
    /// How a refused v5 CONNECT is answered.
    pub connect_refusal: ConnectRefusal,
    /// Sources whose connections start with a PROXY protocol header (the
    /// client's real address); empty: PROXY protocol is off. A header from
    /// any other source is refused.
    pub proxy_trusted: Vec<Cidr>,
    /// Terminate TLS here with these files; `None`: plain MQTT.
    pub tls: Option<TlsFiles>,
    /// MQTT over WebSocket on this HTTP path (after TLS, when set);
    /// `None`: MQTT straight over TCP.
    pub websocket: Option<String>,
}

/// A certificate chain and its key, PEM files read when listeners are bound
/// (and checked by `mqlb config check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
    /// CAs a client certificate must chain to; `None`: no client
    /// certificate asked for.
    pub client_ca: Option<std::path::PathBuf>,
    /// CRLs checked against client certificates (with `client_ca`).
    pub client_crl: Option<std::path::PathBuf>,
    /// Where the client certificate's identity goes in the CONNECT, when
    /// set (needs `client_ca`).
    pub identity_as: Option<IdentityAs>,
    /// More certificates, by the server names they serve (SNI).
    pub sni: Vec<SniCert>,
}

/// A certificate chosen when the client asks for one of its names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniCert {
    /// Lower-case names; a leading `*.` matches one label.
    pub server_names: Vec<String>,
    /// Certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// Its private key.
    pub key: std::path::PathBuf,
}

/// Which CONNECT field a client certificate's identity replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityAs {
    /// The user name (a client-supplied one is replaced, never trusted).
    Username,
    /// The client ID (and so the placement key).
    ClientId,
}

/// A backend broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Stable identity: placement hashes the name, so changing an address
    /// keeps clients in place while renaming moves them.
    pub name: String,
    /// `host:port`; host names are resolved at connect time.
    pub address: String,
    /// Relative share of clients; 0 takes no new clients.
    pub weight: u32,
    /// The pool it belongs to; placement and health work per pool.
    pub pool: String,
    /// The broker expects a PROXY protocol v2 header with the client's
    /// address (Mosquitto 2.1+, EMQX, HiveMQ, VerneMQ); probes send LOCAL.
    pub send_proxy: bool,
    /// TLS towards this broker (data path and probes alike).
    pub tls: Option<BackendTls>,
    /// MQTT over WebSocket to this broker on this HTTP path (after TLS,
    /// when set; data path and probes alike); `None`: MQTT over TCP.
    pub websocket: Option<String>,
    /// The admin API (`host:port`) of this mqlb cluster node: its view of
    /// the cluster is followed as well as the probes.
    pub cluster_admin: Option<String>,
}

/// TLS towards one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTls {
    /// CA bundle the broker's certificate must chain to.
    pub ca: std::path::PathBuf,
    /// Client certificate and key, for brokers that ask for one.
    pub client: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// The name the broker's certificate must carry.
    pub server_name: String,
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
pub fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A pool whose backends come from DNS, re-resolved at the record TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsPool {
    /// Pool name.
    pub name: String,
    /// The name to resolve.
    pub dns: String,
    /// SRV records (port and weight from the record) instead of A/AAAA.
    pub srv: bool,
    /// Port for A/AAAA answers.
    pub port: u16,
    /// Shortest re-resolution interval.
    pub min_ttl: Duration,
    /// Longest re-resolution interval.
    pub max_ttl: Duration,
    /// Whether an empty answer empties the pool (otherwise the last set stays).
    pub allow_empty: bool,
}

/// The pool of backends without a `pool` key.
pub const DEFAULT_POOL: &str = "default";

/// An IP network, `addr/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: std::net::IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8` or `2001:db8::/32` (a bare address is a /32 or /128).
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, l) = s.split_once('/').map_or((s, None), |(a, l)| (a, Some(l)));
        let addr: std::net::IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max)?,
            None => max,
        };
        Some(Cidr { addr, len })
    }

    fn bits(ip: std::net::IpAddr) -> (u128, u8) {
        match ip {
            std::net::IpAddr::V4(v) => (u128::from(u32::from(v)) << 96, 32),
            std::net::IpAddr::V6(v) => (u128::from(v), 128),
        }
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let (net, w1) = Self::bits(self.addr);
        let (x, w2) = Self::bits(ip);
        if w1 != w2 {
            return false;
        }
        // Both are left-aligned in 128 bits: the prefix is the top bits.
        let mask = if self.len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.len))
        };
        net & mask == x & mask
    }

    /// Whether every address of `other` is inside.
    pub fn covers(&self, other: &Cidr) -> bool {
        self.len <= other.len && self.contains(other.addr)
    }
}

/// What a rule looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// The listener the client came in on.
    Listener(String),
    /// A client ID prefix.
    ClientIdPrefix(String),
    /// A client ID glob: `*` any run, `?` one character.
    ClientIdGlob(String),
    /// The CONNECT's user name.
    Username(String),
    /// The protocol level (3, 4 or 5).
    Protocol(u8),
    /// The client's source network.
    SourceCidr(Cidr),
}

/// Whether `text` matches `glob` (`*` any run, `?` one character), in
/// linear time (the classic backtrack-to-last-star loop, no recursion).
pub fn glob_matches(glob: &str, text: &str) -> bool {
    let (g, t): (Vec<char>, Vec<char>) = (glob.chars().collect(), text.chars().collect());
    let (mut gi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while let Some(&tc) = t.get(ti) {
        match g.get(gi) {
            Some(&gc) if gc == '?' || gc == tc => {
                gi += 1;
                ti += 1;
            }
            Some('*') => {
                star = Some((gi, ti));
                gi += 1;
            }
            _ => match star {
                Some((sg, st)) => {
                    gi = sg + 1;
                    ti = st + 1;
                    star = Some((sg, st + 1));
                }
                None => return false,
            },
        }
    }
    g.iter().skip(gi).all(|c| *c == '*')
}

impl Matcher {
    /// Whether this matcher covers everything `later` would match, so a
    /// rule with `later` after it can never match.
    pub fn covers(&self, later: &Matcher) -> bool {
        match (self, later) {
            (Matcher::ClientIdGlob(g), _) if g.chars().all(|c| c == '*') => true,
            (Matcher::Listener(a), Matcher::Listener(b))
            | (Matcher::Username(a), Matcher::Username(b)) => a == b,
            (Matcher::Protocol(a), Matcher::Protocol(b)) => a == b,
            (Matcher::ClientIdPrefix(a), Matcher::ClientIdPrefix(b)) => b.starts_with(a.as_str()),
            (Matcher::ClientIdPrefix(a), Matcher::ClientIdGlob(b)) => {
                b.starts_with(a.as_str()) && !a.contains(['*', '?'])
            }
            (Matcher::ClientIdGlob(a), Matcher::ClientIdGlob(b)) => a == b || glob_matches(a, b),
            (Matcher::SourceCidr(a), Matcher::SourceCidr(b)) => a.covers(b),
            _ => false,
        }
    }
}

/// One routing rule: clients it matches go to `pool`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Target pool.
    pub pool: String,
    /// What it looks at.
    pub matcher: Matcher,
}

/// What to hash when a client sends an empty client ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmptyClientId {
    /// Hash the source IP: the same device keeps its backend (default).
    #[default]
    SourceIp,
    /// Hash source IP and port: spreads NATed devices, no stickiness.
    SourceAddress,
}

/// Client-facing and backend-facing connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancerSettings {
    /// Time a client has to deliver its whole CONNECT.
    pub connect_timeout: Duration,
    /// Largest CONNECT accepted, in bytes.
    pub max_connect_size: usize,
    /// Time to establish TCP to one backend before trying the next.
    pub backend_connect_timeout: Duration,
    /// Concurrent client connections; further clients wait in the accept queue.
    pub max_connections: usize,
    /// Placement key for clients with an empty client ID.
    pub empty_client_id: EmptyClientId,
    /// Local addresses backend connections are opened from, in turn (as
    /// HAProxy's `source`). One source IP gives about 28,000 ephemeral
    /// ports per backend address; more sources, more connections. Empty:
    /// the kernel chooses.
    pub source_addresses: Vec<std::net::IpAddr>,
    /// Pool for clients no rule matches; `None` refuses them.
    pub default_pool: Option<String>,
    /// DNS servers for discovery and backend host names; empty: the system's.
    pub dns_servers: Vec<SocketAddr>,
    /// The bearer token file for the cluster nodes' admin APIs the
    /// balancer reads the view from (`cluster_admin` on a backend).
    pub cluster_admin_token_file: Option<PathBuf>,
}

impl Default for BalancerSettings {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_connect_size: DEFAULT_MAX_CONNECT_SIZE,
            backend_connect_timeout: DEFAULT_BACKEND_CONNECT_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            empty_client_id: EmptyClientId::SourceIp,
            source_addresses: Vec::new(),
            default_pool: Some(DEFAULT_POOL.to_string()),
            dns_servers: Vec::new(),
            cluster_admin_token_file: None,
        }
    }
}

/// One problem in a configuration, located by key and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, for example `backend[1].address`.
    pub key: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong and what is expected.
    pub message: String,
}

/// Every problem found in a configuration source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file name, or a label such as `<flags>`.
    pub source_name: String,
    /// All problems, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match p.line {
                Some(line) => write!(f, "{}:{}: {}: {}", self.source_name, line, p.key, p.message)?,
                None => write!(f, "{}: {}: {}", self.source_name, p.key, p.message)?,
            }
        }
        Ok(())
    }
}

/// Collects problems with their lines while validating.
pub(crate) struct Collector<'a> {
    pub(crate) text: &'a str,
    pub(crate) problems: Vec<Problem>,
}

impl Collector<'_> {
    fn line_of(&self, offset: usize) -> usize {
        file::line_of(self.text, offset)
    }

    fn at<T>(&mut self, key: impl Into<String>, spanned: &Spanned<T>, message: impl Into<String>) {
        let line = Some(self.line_of(spanned.span().start));
        self.problems.push(Problem {
            key: key.into(),
            line,
            message: message.into(),
        });
    }

    fn nowhere(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            line: None,
            message: message.into(),
        });
    }
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (name, text) = read_file(path)?;
        Config::parse(&name, &text)
    }

    /// Parses and validates TOML text; `source_name` labels errors.
    pub fn parse(source_name: &str, text: &str) -> Result<Config, ConfigError> {
        let raw: file::File = file::parse_all(text).map_err(|problems| ConfigError {
            source_name: source_name.to_string(),
            problems,
        })?;
        let mut c = Collector {
            text,
            problems: Vec::new(),
        };
        let config = validate(raw, &mut c);
        if c.problems.is_empty() {
            if let Some(config) = config {
                return Ok(config);
            }
        }
        c.problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
        Err(ConfigError {
            source_name: source_name.to_string(),
            problems: c.problems,
        })
    }

    /// Builds a configuration from command-line values, with the same checks
    /// as a file. A backend is `ADDR` or `NAME=ADDR`; without a name the
    /// address is the name, so replicas given the same flags agree.
    pub fn from_flags(
        listen: &[String],
        backends: &[String],
        admin: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let mut text = String::new();
        if let Some(a) = admin {
            text.push_str(&format!("[admin]\naddress = {}\n", toml_str(a)));
        }
        for l in listen {
            text.push_str(&format!("[[listener]]\naddress = {}\n", toml_str(l)));
        }
        for b in backends {
            let (name, addr) = b.split_once('=').unwrap_or((b, b));
            text.push_str(&format!(
                "[[backend]]\nname = {}\naddress = {}\n",
                toml_str(name),
                toml_str(addr)
            ));
        }
        Config::parse("<flags>", &text).map_err(|mut e| {
            for p in &mut e.problems {
                p.line = None;
                // Said in the flags' language, not the file's.
                if p.key == "listener" && listen.is_empty() {
                    p.message = "no listener: give --listen ADDRESS:PORT (for example \
                                 --listen 0.0.0.0:1883), or --config FILE; `mqlb` alone \
                                 runs the demo"
                        .to_string();
                } else if p.key == "backend" && backends.is_empty() {
                    p.message = "no backend: give --backend NAME=HOST:PORT once per broker \
                                 (for example --backend b1=10.0.0.1:1883), or --config FILE"
                        .to_string();
                }
            }
            e
        })
    }
}

/// Reads a configuration file, naming it in errors.
/// Why the PEM file at `path`, set by `key`, cannot serve: unreadable, or
/// without the PEM block that key needs (a certificate, a private key, a
/// CRL). The TLS code parses it fully at start and reload; this catches the
/// common mistakes with the key's name and line.
fn pem_problem(path: &str, key: &str) -> Result<(), String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read \"{path}\": {e}"))?;
    let text = String::from_utf8_lossy(&text);
    let (label, want) = if key.ends_with("_key") {
        ("PRIVATE KEY-----", "PEM private key")
    } else if key.ends_with("_crl") {
        ("BEGIN X509 CRL-----", "PEM CRL (BEGIN X509 CRL)")
    } else {
        (
            "BEGIN CERTIFICATE-----",
            "PEM certificate (BEGIN CERTIFICATE)",
        )
    };
    if text.contains(label) {
        Ok(())
    } else {
        Err(format!("\"{path}\" holds no {want}"))
    }
}

/// Whether the file configures a broker node only (`[broker]` or
/// `[cluster]`, and no balancer listeners, backends or pools), so that
/// `mqlb config check` checks it as `mqlb broker --config` reads it.
pub fn is_broker_file(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Ok(t) = text.parse::<toml::Table>() else {
        return false;
    };
    let has = |k: &str| t.contains_key(k);
    (has("broker") || has("cluster")) && !has("listener") && !has("backend") && !has("pool")
}

pub(crate) fn read_file(path: &Path) -> Result<(String, String), ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        source_name: name.clone(),
        problems: vec![Problem {
            key: "(file)".into(),
            line: None,
            message: format!("cannot read: {e}"),
        }],
    })?;
    Ok((name, text))
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Checks that `host:port` has a non-empty host and a valid non-zero port.
fn check_host_port(s: &str) -> Result<(), String> {
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("\"{s}\" is not host:port"))?;
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("\"{s}\" has no valid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("\"{s}\" has no valid port (1-65535)")),
    }
}

/// Checks one `[[listener]]` (or `[[broker.listener]]`) table; `key` is
/// its place in the file, for errors (`at`).
pub(crate) fn validate_listener(
    at: &str,
    default_name: &str,
    l: &file::ListenerFile,
    c: &mut Collector<'_>,
) -> Option<Listener> {
    let connect_refusal = match l.connect_refusal.as_ref().map(|v| v.get_ref().as_str()) {
        None | Some("close") => ConnectRefusal::Close,
        Some("reason-code") => ConnectRefusal::ReasonCode,
        Some(other) => {
            if let Some(v) = &l.connect_refusal {
                c.at(
                    format!("{at}.connect_refusal"),
                    v,
                    format!("\"{other}\" is not one of \"close\", \"reason-code\""),
                );
            }
            ConnectRefusal::Close
        }
    };
    let mut proxy_trusted = Vec::new();
    for (k, v) in l.proxy_trusted.iter().flatten().enumerate() {
        match Cidr::parse(v.get_ref()) {
            Some(cidr) => proxy_trusted.push(cidr),
            None => c.at(
                format!("{at}.proxy_trusted[{k}]"),
                v,
                format!("\"{}\" is not an address or CIDR", v.get_ref()),
            ),
        }
    }
    if l.proxy_protocol == Some(true) && proxy_trusted.is_empty() {
        c.nowhere(
            format!("{at}.proxy_trusted"),
            "proxy_protocol = true needs the load balancers' addresses in proxy_trusted",
        );
    }
    if l.proxy_protocol != Some(true) {
        proxy_trusted.clear();
    }
    let tls = match (&l.tls_cert, &l.tls_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let files = [("tls_cert", cert), ("tls_key", key)];
            let ca = l.tls_client_ca.as_ref().map(|v| ("tls_client_ca", v));
            let crl = l.tls_client_crl.as_ref().map(|v| ("tls_client_crl", v));
            for (name, v) in files.into_iter().chain(ca).chain(crl) {
                if let Err(m) = pem_problem(v.get_ref(), name) {
                    c.at(format!("{at}.{name}"), v, m);
                }
            }
            Some(TlsFiles {
                cert: cert.get_ref().into(),
                key: key.get_ref().into(),
                client_ca: l.tls_client_ca.as_ref().map(|v| v.get_ref().into()),
                client_crl: l.tls_client_crl.as_ref().map(|v| v.get_ref().into()),
                sni: l
                    .sni
                    .iter()
                    .enumerate()
                    .filter_map(|(k, e)| {
                        for (name, v) in [("tls_cert", &e.tls_cert), ("tls_key", &e.tls_key)] {
                            if let Err(m) = pem_problem(v.get_ref(), name) {
                                c.at(format!("{at}.sni[{k}].{name}"), v, m);
                            }
                        }
                        if e.server_names.get_ref().is_empty() {
                            c.at(
                                format!("{at}.sni[{k}].server_names"),
                                &e.server_names,
                                "needs at least one name",
                            );
                            return None;
                        }
                        Some(SniCert {
                            server_names: e
                                .server_names
                                .get_ref()
                                .iter()
                                .map(|n| n.to_ascii_lowercase())
                                .collect(),
                            cert: e.tls_cert.get_ref().into(),
                            key: e.tls_key.get_ref().into(),
                        })
                    })
                    .collect(),
                identity_as: match l.tls_identity_as.as_ref() {
                    None => None,
                    Some(v) => match (v.get_ref().as_str(), &l.tls_client_ca) {
                        (_, None) => {
                            c.at(
                                format!("{at}.tls_identity_as"),
                                v,
                                "a certificate identity needs client certificates: set tls_client_ca",
                            );
                            None
                        }
                        ("username", Some(_)) => Some(IdentityAs::Username),
                        ("client_id", Some(_)) => Some(IdentityAs::ClientId),
                        (other, Some(_)) => {
                            c.at(
                                format!("{at}.tls_identity_as"),
                                v,
                                format!("\"{other}\" is not one of \"username\", \"client_id\""),
                            );
                            None
                        }
                    },
                },
            })
        }
        (Some(v), None) | (None, Some(v)) => {
            c.at(format!("{at}.tls"), v, "tls_cert and tls_key go together");
            None
        }
    };
    if let (None, Some(e)) = (&tls, l.sni.first()) {
        c.at(
            format!("{at}.sni"),
            &e.tls_cert,
            "SNI certificates need TLS: set tls_cert and tls_key (the default certificate) too",
        );
    }
    if let (Some(v), None) = (&l.tls_client_crl, &l.tls_client_ca) {
        c.at(
            format!("{at}.tls_client_crl"),
            v,
            "a CRL revokes client certificates: set tls_client_ca too",
        );
    }
    if let (None, Some(v)) = (&tls, &l.tls_client_ca) {
        if l.tls_cert.is_none() && l.tls_key.is_none() {
            c.at(
                format!("{at}.tls_client_ca"),
                v,
                "client certificates need TLS: set tls_cert and tls_key too",
            );
        }
    }
    let websocket = match l.kind.as_ref().map(|v| v.get_ref().as_str()) {
        None | Some("mqtt") => {
            if let Some(v) = &l.websocket_path {
                c.at(
                    format!("{at}.websocket_path"),
                    v,
                    "websocket_path needs kind = \"websocket\"",
                );
            }
            None
        }
        Some("websocket") => {
            let path = l
                .websocket_path
                .as_ref()
                .map_or_else(|| "/mqtt".to_string(), |v| v.get_ref().clone());
            if !path.starts_with('/') {
                if let Some(v) = &l.websocket_path {
                    c.at(
                        format!("{at}.websocket_path"),
                        v,
                        format!("\"{path}\" must start with '/'"),
                    );
                }
            }
            Some(path)
        }
        Some(other) => {
            if let Some(v) = &l.kind {
                c.at(
                    format!("{at}.kind"),
                    v,
                    format!("\"{other}\" is not one of \"mqtt\", \"websocket\""),
                );
            }
            None
        }
    };
    match l.address.get_ref().parse::<SocketAddr>() {
        Ok(address) => Some(Listener {
            name: l.name.clone().unwrap_or_else(|| default_name.to_string()),
            address,
            connect_refusal,
            proxy_trusted,
            tls,
            websocket,
        }),
        Err(_) => {
            c.at(
                format!("{at}.address"),
                &l.address,
                format!(
                    "\"{}\" is not an IP:port socket address",
                    l.address.get_ref()
                ),
            );
            None
        }
    }
}

fn validate(raw: file::File, c: &mut Collector<'_>) -> Option<Config> {
    let mut listeners = Vec::new();
    if raw.listener.is_empty() {
        c.nowhere("listener", "at least one [[listener]] is required");
    }
    for (i, l) in raw.listener.iter().enumerate() {
        if let Some(l) = validate_listener(&format!("listener[{i}]"), &format!("listener{i}"), l, c)
        {
            listeners.push(l);
        }
    }

    let mut backends = Vec::new();
    let mut names = HashSet::new();
    if raw.backend.is_empty() && raw.pool.is_empty() {
        c.nowhere(
            "backend",
            "at least one [[backend]] (or a [[pool]] discovered in DNS) is required",
        );
    }
    for (i, b) in raw.backend.iter().enumerate() {
        let name = b.name.get_ref().trim().to_string();
        if name.is_empty() {
            c.at(format!("backend[{i}].name"), &b.name, "must not be empty");
        } else if !names.insert(name.clone()) {
            c.at(
                format!("backend[{i}].name"),
                &b.name,
                format!("\"{name}\" is used by another backend; names must be unique"),
            );
        }
        if let Err(m) = check_host_port(b.address.get_ref()) {
            c.at(format!("backend[{i}].address"), &b.address, m);
        }
        let weight = match &b.weight {
            Some(w) if *w.get_ref() > MAX_WEIGHT => {
                c.at(
                    format!("backend[{i}].weight"),
                    w,
                    format!("{} is above the maximum of {MAX_WEIGHT}", w.get_ref()),
                );
                DEFAULT_WEIGHT
            }
            Some(w) => *w.get_ref(),
            None => DEFAULT_WEIGHT,
        };
        let pool = match &b.pool {
            Some(p) if p.get_ref().trim().is_empty() => {
                c.at(format!("backend[{i}].pool"), p, "must not be empty");
                DEFAULT_POOL.to_string()
            }
            Some(p) => p.get_ref().trim().to_string(),
            None => DEFAULT_POOL.to_string(),
        };
        let tls = match (&b.tls_ca, &b.tls_cert, &b.tls_key) {
            (None, None, None) => {
                if let Some(v) = &b.tls_server_name {
                    c.at(
                        format!("backend[{i}].tls_server_name"),
                        v,
                        "needs tls_ca (TLS to the backend)",
                    );
                }
                None
            }
            (None, Some(v), _) | (None, None, Some(v)) => {
                c.at(
                    format!("backend[{i}].tls_ca"),
                    v,
                    "a client certificate needs TLS: set tls_ca (the broker's CA) too",
                );
                None
            }
            (Some(ca), cert, key) => {
                let client = match (cert, key) {
                    (Some(cert), Some(key)) => Some((cert, key)),
                    (None, None) => None,
                    (Some(v), None) | (None, Some(v)) => {
                        c.at(
                            format!("backend[{i}].tls_cert"),
                            v,
                            "tls_cert and tls_key go together",
                        );
                        None
                    }
                };
                let files = std::iter::once(("tls_ca", ca)).chain(
                    client
                        .iter()
                        .flat_map(|(c, k)| [("tls_cert", *c), ("tls_key", *k)]),
                );
                for (key, v) in files {
                    if let Err(m) = pem_problem(v.get_ref(), key) {
                        c.at(format!("backend[{i}].{key}"), v, m);
                    }
                }
                Some(BackendTls {
                    ca: ca.get_ref().into(),
                    client: client.map(|(c, k)| (c.get_ref().into(), k.get_ref().into())),
                    server_name: b.tls_server_name.as_ref().map_or_else(
                        || host_of(b.address.get_ref()).to_string(),
                        |v| v.get_ref().clone(),
                    ),
                })
            }
        };
        let websocket = b.websocket_path.as_ref().and_then(|v| {
            if v.get_ref().starts_with('/') {
                Some(v.get_ref().clone())
            } else {
                c.at(
                    format!("backend[{i}].websocket_path"),
                    v,
                    format!("\"{}\" must start with '/'", v.get_ref()),
                );
                None
            }
        });
        let cluster_admin =
            b.cluster_admin
                .as_ref()
                .and_then(|v| match check_host_port(v.get_ref()) {
                    Ok(()) => Some(v.get_ref().clone()),
                    Err(m) => {
                        c.at(format!("backend[{i}].cluster_admin"), v, m);
                        None
                    }
                });
        backends.push(Backend {
            name,
            address: b.address.get_ref().clone(),
            weight,
            pool,
            send_proxy: b.proxy_protocol.unwrap_or(false),
            tls,
            websocket,
            cluster_admin,
        });
    }
    let mut dns_pools = Vec::new();
    for (i, p) in raw.pool.iter().enumerate() {
        let name = p.name.get_ref().trim().to_string();
        if name.is_empty() || dns_pools.iter().any(|d: &DnsPool| d.name == name) {
            c.at(
                format!("pool[{i}].name"),
                &p.name,
                "must be non-empty and unique",
            );
        }
        if p.dns.get_ref().trim().is_empty() {
            c.at(format!("pool[{i}].dns"), &p.dns, "must be a DNS name");
        }
        let srv = match p.record.as_ref().map(|r| r.get_ref().as_str()) {
            None | Some("A") | Some("a") => false,
            Some("SRV") | Some("srv") => true,
            Some(other) => {
                if let Some(r) = &p.record {
                    c.at(
                        format!("pool[{i}].record"),
                        r,
                        format!("\"{other}\" is not \"A\" or \"SRV\""),
                    );
                }
                false
            }
        };
        let port = match &p.port {
            Some(v) => match u16::try_from(*v.get_ref()) {
                Ok(n) if n > 0 => n,
                _ => {
                    c.at(format!("pool[{i}].port"), v, "must be between 1 and 65535");
                    1883
                }
            },
            None => 1883,
        };
        let mut ttl = |key: &str, v: &Option<Spanned<String>>, default: Duration| match v {
            Some(v) => match duration::parse(v.get_ref()) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    c.at(format!("pool[{i}].{key}"), v, "must be greater than 0");
                    default
                }
                Err(m) => {
                    c.at(format!("pool[{i}].{key}"), v, m);
                    default
                }
            },
            None => default,
        };
        let min_ttl = ttl("min_ttl", &p.min_ttl, Duration::from_secs(5));
        let max_ttl = ttl("max_ttl", &p.max_ttl, Duration::from_secs(300)).max(min_ttl);
        dns_pools.push(DnsPool {
            name,
            dns: p.dns.get_ref().trim().to_string(),
            srv,
            port,
            min_ttl,
            max_ttl,
            allow_empty: p.allow_empty.unwrap_or(false),
        });
    }
    let pools: std::collections::BTreeSet<String> = backends
        .iter()
        .map(|b| b.pool.clone())
        .chain(dns_pools.iter().map(|d| d.name.clone()))
        .collect();
    let mut rules = Vec::new();
    for (i, r) in raw.rule.iter().enumerate() {
        let pool = r.pool.get_ref().trim().to_string();
        if !pools.contains(&pool) {
            c.at(
                format!("rule[{i}].pool"),
                &r.pool,
                format!("no backend is in pool \"{pool}\""),
            );
        }
        let given: Vec<(&str, &Spanned<String>)> = [
            ("listener", &r.listener),
            ("client_id_prefix", &r.client_id_prefix),
            ("client_id_glob", &r.client_id_glob),
            ("username", &r.username),
            ("protocol", &r.protocol),
            ("source_cidr", &r.source_cidr),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
        .collect();
        let [(key, v)] = given.as_slice() else {
            c.at(
                format!("rule[{i}].pool"),
                &r.pool,
                "a rule needs exactly one of listener, client_id_prefix, client_id_glob, username, protocol, source_cidr",
            );
            continue;
        };
        let value = v.get_ref().clone();
        let matcher = match *key {
            "listener" => Matcher::Listener(value),
            "client_id_prefix" => Matcher::ClientIdPrefix(value),
            "client_id_glob" => Matcher::ClientIdGlob(value),
            "username" => Matcher::Username(value),
            "protocol" => match value.as_str() {
                "3.1" => Matcher::Protocol(3),
                "3.1.1" => Matcher::Protocol(4),
                "5" | "5.0" => Matcher::Protocol(5),
                other => {
                    c.at(
                        format!("rule[{i}].protocol"),
                        v,
                        format!("\"{other}\" is not one of \"3.1\", \"3.1.1\", \"5\""),
                    );
                    continue;
                }
            },
            _ => match Cidr::parse(&value) {
                Some(cidr) => Matcher::SourceCidr(cidr),
                None => {
                    c.at(
                        format!("rule[{i}].source_cidr"),
                        v,
                        format!("\"{value}\" is not an address or CIDR"),
                    );
                    continue;
                }
            },
        };
        if let Some(j) = rules.iter().position(|e: &Rule| e.matcher.covers(&matcher)) {
            c.at(
                format!("rule[{i}].{key}"),
                v,
                format!("can never match: rule[{j}] before it matches every client this one would"),
            );
        }
        rules.push(Rule { pool, matcher });
    }
    if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
        c.nowhere(
            "backend",
            "every backend has weight 0; no client could be placed",
        );
    }

    let mut balancer = BalancerSettings {
        default_pool: pools
            .contains(DEFAULT_POOL)
            .then(|| DEFAULT_POOL.to_string()),
        ..BalancerSettings::default()
    };
    if let Some(d) = raw.balancer.as_ref().and_then(|b| b.default_pool.as_ref()) {
        if pools.contains(d.get_ref().trim()) {
            balancer.default_pool = Some(d.get_ref().trim().to_string());
        } else {
            c.at(
                "balancer.default_pool",
                d,
                format!("no backend is in pool \"{}\"", d.get_ref()),
            );
        }
    }
    for p in &pools {
        let reached =
            balancer.default_pool.as_ref() == Some(p) || rules.iter().any(|r| &r.pool == p);
        if !reached {
            c.nowhere(
                format!("pool {p}"),
                "no rule sends clients to this pool and it is not the default pool",
            );
        }
    }
    if let Some(s) = &raw.balancer {
        let mut dur = |key: &str, v: &Option<Spanned<String>>, out: &mut Duration| {
            if let Some(v) = v {
                match duration::parse(v.get_ref()) {
                    Ok(d) if !d.is_zero() => *out = d,
                    Ok(_) => c.at(format!("balancer.{key}"), v, "must be greater than 0"),
                    Err(m) => c.at(format!("balancer.{key}"), v, m),
                }
            }
        };
        dur(
            "connect_timeout",
            &s.connect_timeout,
            &mut balancer.connect_timeout,
        );
        dur(
            "backend_connect_timeout",
            &s.backend_connect_timeout,
            &mut balancer.backend_connect_timeout,
        );
        if let Some(v) = &s.max_connect_size {
            match usize::try_from(*v.get_ref()) {
                Ok(n) if (64..=(256 << 20)).contains(&n) => balancer.max_connect_size = n,
                _ => c.at(
                    "balancer.max_connect_size",
                    v,
                    "must be between 64 bytes and 256 MiB",
                ),
            }
        }
        if let Some(v) = &s.max_connections {
            match usize::try_from(*v.get_ref()) {
                Ok(n) if n > 0 => balancer.max_connections = n,
                _ => c.at("balancer.max_connections", v, "must be at least 1"),
            }
        }
        if let Some(v) = &s.empty_client_id {
            match v.get_ref().as_str() {
                "source-ip" => balancer.empty_client_id = EmptyClientId::SourceIp,
                "source-address" => balancer.empty_client_id = EmptyClientId::SourceAddress,
                other => c.at(
                    "balancer.empty_client_id",
                    v,
                    format!("\"{other}\" is not one of \"source-ip\", \"source-address\""),
                ),
            }
        }
        balancer.cluster_admin_token_file = s
            .cluster_admin_token_file
            .as_ref()
            .map(|p| PathBuf::from(p.get_ref()));
        for (i, v) in s.dns_servers.iter().flatten().enumerate() {
            match v.get_ref().parse::<SocketAddr>() {
                Ok(a) => balancer.dns_servers.push(a),
                Err(_) => c.at(
                    format!("balancer.dns_servers[{i}]"),
                    v,
                    format!("\"{}\" is not an IP:port socket address", v.get_ref()),
                ),
            }
        }
        for (i, v) in s.source_addresses.iter().flatten().enumerate() {
            match v.get_ref().parse::<std::net::IpAddr>() {
                Ok(ip) => balancer.source_addresses.push(ip),
                Err(_) => c.at(
                    format!("balancer.source_addresses[{i}]"),
                    v,
                    format!("\"{}\" is not an IP address", v.get_ref()),
                ),
            }
        }
    }

    let mut health = HealthSettings::default();
    if let Some(h) = &raw.health {
        if let Some(e) = h.enabled {
            health.enabled = e;
        }
        let mut dur = |key: &str, v: &Option<Spanned<String>>, out: &mut Duration| {
            if let Some(v) = v {
                match duration::parse(v.get_ref()) {
                    Ok(d) if !d.is_zero() => *out = d,
                    Ok(_) => c.at(format!("health.{key}"), v, "must be greater than 0"),
                    Err(m) => c.at(format!("health.{key}"), v, m),
                }
            }
        };
        dur("interval", &h.interval, &mut health.interval);
        dur("timeout", &h.timeout, &mut health.timeout);
        if let Some(v) = &h.jitter {
            match duration::parse(v.get_ref()) {
                Ok(d) => health.jitter = d,
                Err(m) => c.at("health.jitter", v, m),
            }
        } else {
            health.jitter = health.interval;
        }
        let mut count = |key: &str, v: &Option<Spanned<i64>>, out: &mut u32| {
            if let Some(v) = v {
                match u32::try_from(*v.get_ref()) {
                    Ok(n) if (1..=100).contains(&n) => *out = n,
                    _ => c.at(format!("health.{key}"), v, "must be between 1 and 100"),
                }
            }
        };
        count("rise", &h.rise, &mut health.rise);
        count("fall", &h.fall, &mut health.fall);
        count("passive_fall", &h.passive_fall, &mut health.passive_fall);
        if let Some(v) = &h.protocol {
            match v.get_ref().as_str() {
                "3.1.1" | "4" => health.protocol = ProbeProtocol::V311,
                "5" | "5.0" => health.protocol = ProbeProtocol::V5,
                other => c.at(
                    "health.protocol",
                    v,
                    format!("\"{other}\" is not \"3.1.1\" or \"5\""),
                ),
            }
        }
        health.username = h.username.clone();
        health.password = h.password.clone();
        if health.password.is_some()
            && health.username.is_none()
            && health.protocol == ProbeProtocol::V311
        {
            c.nowhere(
                "health.password",
                "MQTT 3.1.1 needs a username with a password",
            );
        }
        health.deep = h.deep.unwrap_or(false);
        if let Some(v) = &h.deep_topic {
            let t = v.get_ref();
            if t.is_empty() || t.contains(['+', '#', '\0']) {
                c.at(
                    "health.deep_topic",
                    v,
                    "must be a topic name without wildcards",
                );
            } else {
                health.deep_topic = t.clone();
            }
        }
    }

    let mut eviction = EvictionSettings::default();
    if let Some(e) = &raw.eviction {
        if let Some(v) = &e.rate {
            match u32::try_from(*v.get_ref()) {
                Ok(n) if (1..=1_000_000).contains(&n) => eviction.rate = n,
                _ => c.at(
                    "eviction.rate",
                    v,
                    "must be between 1 and 1000000 per second",
                ),
            }
        }
        if let Some(v) = &e.server_reference {
            if v.get_ref().is_empty() || v.get_ref().contains('\0') {
                c.at("eviction.server_reference", v, "must be a non-empty string");
            } else {
                eviction.server_reference = Some(v.get_ref().clone());
            }
        }
        if let Some(v) = &e.shutdown_grace {
            match duration::parse(v.get_ref()) {
                Ok(d) => eviction.shutdown_grace = d,
                Err(m) => c.at("eviction.shutdown_grace", v, m),
            }
        }
    }

    let admin_access = match &raw.admin {
        Some(a) => AdminAccess {
            token_file: a.token_file.as_ref().map(|p| PathBuf::from(p.get_ref())),
            allowed_hosts: a
                .allowed_hosts
                .iter()
                .flatten()
                .map(|h| h.get_ref().to_ascii_lowercase())
                .collect(),
        },
        None => AdminAccess::default(),
    };
    let admin = match &raw.admin {
        Some(a) => match a.address.get_ref().parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                c.at(
                    "admin.address",
                    &a.address,
                    format!(
                        "\"{}\" is not an IP:port socket address",
                        a.address.get_ref()
                    ),
                );
                None
            }
        },
        None => None,
    };

    let mut admission = AdmissionSettings::default();
    if let Some(a) = &raw.admission {
        for (key, v, out) in [
            (
                "backend_connect_rate",
                &a.backend_connect_rate,
                &mut admission.backend_connect_rate,
            ),
            (
                "backend_connect_burst",
                &a.backend_connect_burst,
                &mut admission.backend_connect_burst,
            ),
            (
                "backend_pending_connacks",
                &a.backend_pending_connacks,
                &mut admission.backend_pending_connacks,
            ),
            (
                "per_ip_connections",
                &a.per_ip_connections,
                &mut admission.per_ip_connections,
            ),
            (
                "per_ip_connect_rate",
                &a.per_ip_connect_rate,
                &mut admission.per_ip_connect_rate,
            ),
        ] {
            if let Some(v) = v {
                match u32::try_from(*v.get_ref()) {
                    Ok(n) => *out = n,
                    Err(_) => c.at(
                        format!("admission.{key}"),
                        v,
                        "must be between 0 and 4294967295",
                    ),
                }
            }
        }
        if let Some(v) = &a.hold {
            match duration::parse(v.get_ref()) {
                Ok(d) if d <= Duration::from_secs(60) => admission.hold = d,
                Ok(_) => c.at("admission.hold", v, "must be at most 60s"),
                Err(m) => c.at("admission.hold", v, m),
            }
        }
    }
    if admission.backend_connect_burst == 0 {
        admission.backend_connect_burst = (admission.backend_connect_rate / 10).max(1);
    }
    let log_format = log_format(&raw, c);
    Some(Config {
        listeners,
        backends,
        balancer,
        health,
        eviction,
        admission,
        rules,
        dns_pools,
        admin,
        admin_access,
        log_format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[listener]]
name = "mqtt"
address = "127.0.0.1:1883"

[[backend]]
name = "b1"
address = "127.0.0.1:1884"

[[backend]]
name = "b2"
address = "broker-2.internal:1883"
weight = 3

[balancer]
connect_timeout = "5s"
max_connect_size = 4096
backend_connect_timeout = "500ms"
empty_client_id = "source-address"
"#;

    #[test]
    fn pools_and_rules() {
        let text = "[[listener]]\naddress = \"127.0.0.1:1\"\n\
            [[backend]]\nname = \"a1\"\naddress = \"x:1\"\npool = \"tenant-a\"\n\
            [[backend]]\nname = \"b1\"\naddress = \"y:1\"\npool = \"tenant-b\"\n\
            [[backend]]\nname = \"d1\"\naddress = \"z:1\"\n\
            [[rule]]\npool = \"tenant-a\"\nclient_id_prefix = \"a-\"\n\
            [[rule]]\npool = \"tenant-b\"\nsource_cidr = \"10.1.0.0/16\"\n";
        let c = Config::parse("p.toml", text).unwrap();
        assert_eq!(c.rules.len(), 2);
        assert_eq!(c.balancer.default_pool.as_deref(), Some(DEFAULT_POOL));
        assert_eq!(c.backends[2].pool, DEFAULT_POOL);
        // A shadowed rule and an unreachable pool are both reported.
        let bad = "[[listener]]\naddress = \"127.0.0.1:1\"\n\
            [[backend]]\nname = \"a1\"\naddress = \"x:1\"\npool = \"tenant-a\"\n\
            [[backend]]\nname = \"b1\"\naddress = \"y:1\"\npool = \"lonely\"\n\
            [[rule]]\npool = \"tenant-a\"\nclient_id_prefix = \"a-\"\n\
            [[rule]]\npool = \"tenant-a\"\nclient_id_prefix = \"a-1\"\n";
        let e = Config::parse("p.toml", bad).unwrap_err().to_string();
        assert!(
            e.contains("p.toml:16: rule[1].client_id_prefix: can never match: rule[0]"),
            "{e}"
        );
        assert!(e.contains("pool lonely"), "{e}");
        let cidr = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(cidr.contains("10.1.200.3".parse().unwrap()));
        assert!(!cidr.contains("10.2.0.1".parse().unwrap()));
        assert!(!cidr.contains("::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("192.0.2.1".parse().unwrap()));
        assert!(Cidr::parse("2001:db8::/32")
            .unwrap()
            .contains("2001:db8::5".parse().unwrap()));
        assert!(glob_matches("dev-*-x?", "dev-12-x1"));
        assert!(!glob_matches("dev-*-x?", "dev-12-x"));
        assert!(glob_matches("*", ""));
    }

    #[test]
    fn parses_a_good_file() {
        let c = Config::parse("good.toml", GOOD).unwrap();
        assert_eq!(c.listeners[0].address, "127.0.0.1:1883".parse().unwrap());
        assert_eq!(c.backends[1].weight, 3);
        assert_eq!(c.backends[0].weight, 1);
        assert_eq!(c.balancer.connect_timeout, Duration::from_secs(5));
        assert_eq!(
            c.balancer.backend_connect_timeout,
            Duration::from_millis(500)
        );
        assert_eq!(c.balancer.max_connect_size, 4096);
        assert_eq!(c.balancer.empty_client_id, EmptyClientId::SourceAddress);
        let base = "[[listener]]\naddress = \"127.0.0.1:1\"\n[[backend]]\nname = \"a\"\naddress = \"x:1\"\n";
        let with_sources =
            format!("{base}[balancer]\nsource_addresses = [\"127.0.0.2\", \"::1\"]\n");
        let c = Config::parse("s.toml", &with_sources).unwrap();
        assert_eq!(c.balancer.source_addresses.len(), 2);
        let bad = format!("{base}[balancer]\nsource_addresses = [\"127.0.0.2\",\n  \"nope\"]\n");
        let e = Config::parse("s.toml", &bad).unwrap_err().to_string();
        assert!(e.contains("s.toml:8: balancer.source_addresses[1]"), "{e}");
        let c = Config::parse("l.toml", &format!("{base}[log]\nformat = \"json\"\n")).unwrap();
        assert_eq!(c.log_format, Some(LogFormat::Json));
        let e = Config::parse("l.toml", &format!("{base}[log]\nformat = \"xml\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("l.toml:7: log.format"), "{e}");
        assert_eq!(c.balancer.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.health, HealthSettings::default());
        assert_eq!(c.eviction.rate, DEFAULT_EVICTION_RATE);
        assert_eq!(c.admin, None);
    }

    #[test]
    fn health_eviction_admin_sections() {
        let text = format!(
            "{GOOD}\n[health]\ninterval = \"100ms\"\nfall = 3\nprotocol = \"5\"\ndeep = true\n\
             [eviction]\nrate = 500\nserver_reference = \"b.example:1883\"\n[admin]\naddress = \"127.0.0.1:9100\"\n"
        );
        let c = Config::parse("h.toml", &text).unwrap();
        assert_eq!(c.health.interval, Duration::from_millis(100));
        assert_eq!(c.health.jitter, Duration::from_millis(100));
        assert_eq!(c.health.fall, 3);
        assert_eq!(c.health.protocol, ProbeProtocol::V5);
        assert!(c.health.deep);
        assert_eq!(c.eviction.rate, 500);
        assert_eq!(
            c.eviction.server_reference.as_deref(),
            Some("b.example:1883")
        );
        let bad = format!("{GOOD}\n[health]\nfall = 0\n[eviction]\nrate = -1\n");
        let e = Config::parse("h.toml", &bad).unwrap_err();
        assert!(e.to_string().contains("health.fall"), "{e}");
        assert!(e.to_string().contains("eviction.rate"), "{e}");
    }

    #[test]
    fn reports_every_problem_with_key_and_line() {
        let bad = r#"[[listener]]
address = "nope"

[[backend]]
name = "b1"
address = "127.0.0.1"

[[backend]]
name = "b1"
address = "127.0.0.1:1885"
weight = 20000

[balancer]
connect_timeout = "10 parsecs"
"#;
        let e = Config::parse("bad.toml", bad).unwrap_err();
        let text = e.to_string();
        assert_eq!(e.problems.len(), 5, "{text}");
        assert!(text.contains("bad.toml:2: listener[0].address"), "{text}");
        assert!(text.contains("bad.toml:6: backend[0].address"), "{text}");
        assert!(text.contains("bad.toml:9: backend[1].name"), "{text}");
        assert!(text.contains("bad.toml:11: backend[1].weight"), "{text}");
        assert!(
            text.contains("bad.toml:14: balancer.connect_timeout"),
            "{text}"
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = Config::parse("typo.toml", "[[listener]]\naddress = \"127.0.0.1:1\"\n\n[[backend]]\nname = \"a\"\nadress = \"x:1\"\n")
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("typo.toml:6"), "{text}");
        assert!(text.contains("adress"), "{text}");
    }

    #[test]
    fn type_error_names_key_and_line() {
        let e = Config::parse("t.toml", "[[listener]]\naddress = \"127.0.0.1:1\"\n[[backend]]\nname = \"a\"\naddress = \"x:1\"\nweight = \"heavy\"\n").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("t.toml:6: backend[0].weight"), "{text}");
        assert!(
            text.contains("expected a whole number, got the text \"heavy\""),
            "{text}"
        );
    }

    /// Every key and type problem in one pass, each with its line, in the
    /// file's words, a misspelt key with the key it probably meant; a
    /// missing required key is its own problem.
    #[test]
    fn every_problem_is_listed_at_once() {
        let text = "[[listener]]\naddress = \"0.0.0.0:1883\"\n\n[[backend]]\nname = \"b1\"\nadress = \"10.0.0.1:1883\"\n\n[[backend]]\nname = \"b2\"\naddress = \"10.0.0.2:1883\"\nwieght = 3\n\n[health]\nrise = \"fast\"\nzzz = 1\n";
        let e = Config::parse("bad.toml", text).unwrap_err();
        let lines: Vec<String> = e.to_string().lines().map(str::to_string).collect();
        assert_eq!(
            lines,
            [
                "bad.toml:6: backend[0].adress: unknown key `adress`; did you mean `address`?",
                "bad.toml:11: backend[1].wieght: unknown key `wieght`; did you mean `weight`?",
                "bad.toml:14: health.rise: expected a whole number, got the text \"fast\"",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain(std::iter::once(lines.last().cloned().unwrap_or_default()))
            .take(lines.len())
            .collect::<Vec<_>>(),
            "{lines:#?}"
        );
        assert_eq!(lines.len(), 4, "{lines:#?}");
        let last = &lines[3];
        assert!(
            last.starts_with("bad.toml:15: health.zzz: unknown key `zzz`; the keys here are "),
            "{last}"
        );
        let e = Config::parse(
            "m.toml",
            "[[listener]]\naddress = \"0.0.0.0:1883\"\n[[backend]]\nname = \"b1\"\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "m.toml:3: backend[0].address: missing key `address`");
        // A misspelt key inside an inline table is reported once, not
        // "fixed" by renaming the line's own key.
        let e = Config::parse(
            "i.toml",
            "[[listener]]\naddress = \"0.0.0.0:1883\"\n[health]\ninterval = { rize = 1 }\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.starts_with("i.toml:4: "), "{e}");
    }

    /// The listener and backend settings added for WebSocket, SNI,
    /// certificate identity and backend TLS: each mistake names its key
    /// and line.
    #[test]
    fn listener_and_backend_tls_mistakes_name_key_and_line() {
        let cases = [
            (
                "[[listener]]\naddress = \"127.0.0.1:1\"\nkind = \"http\"\n[[backend]]\nname = \"a\"\naddress = \"x:1\"\n",
                "k.toml:3: listener[0].kind",
            ),
            (
                "[[listener]]\naddress = \"127.0.0.1:1\"\nwebsocket_path = \"/mqtt\"\n[[backend]]\nname = \"a\"\naddress = \"x:1\"\n",
                "k.toml:3: listener[0].websocket_path",
            ),
            (
                "[[listener]]\naddress = \"127.0.0.1:1\"\nkind = \"websocket\"\nwebsocket_path = \"mqtt\"\n[[backend]]\nname = \"a\"\naddress = \"x:1\"\n",
                "k.toml:4: listener[0].websocket_path",
            ),
            (
                "[[listener]]\naddress = \"127.0.0.1:1\"\n[[listener.sni]]\nserver_names = [\"a\"]\ntls_cert = \"/nonexistent.pem\"\ntls_key = \"/nonexistent.key\"\n[[backend]]\nname = \"a\"\naddress = \"x:1\"\n",
                "listener[0].sni",
            ),
            (
                "[[listener]]\naddress = \"127.0.0.1:1\"\n[[backend]]\nname = \"a\"\naddress = \"x:1\"\ntls_cert = \"/c.pem\"\n",
                "k.toml:6: backend[0].tls_ca",
            ),
            (
                "[[listener]]\naddress = \"127.0.0.1:1\"\n[[backend]]\nname = \"a\"\naddress = \"x:1\"\ntls_server_name = \"x\"\n",
                "k.toml:6: backend[0].tls_server_name",
            ),
            (
                "[[listener]]\naddress = \"127.0.0.1:1\"\n[[backend]]\nname = \"a\"\naddress = \"x:1\"\nwebsocket_path = \"mqtt\"\n",
                "k.toml:6: backend[0].websocket_path",
            ),
            (
                "[[listener]]\naddress = \"127.0.0.1:1\"\n[[backend]]\nname = \"a\"\naddress = \"x:1\"\ntls_ca = \"/nonexistent-ca.pem\"\n",
                "k.toml:6: backend[0].tls_ca",
            ),
        ];
        for (text, want) in cases {
            let e = Config::parse("k.toml", text).unwrap_err().to_string();
            assert!(e.contains(want), "{want} not in: {e}");
        }
    }

    #[test]
    fn syntax_error_names_line() {
        let e = Config::parse("s.toml", "[[listener]\naddress = 1\n").unwrap_err();
        assert!(e.to_string().starts_with("s.toml:1:"), "{e}");
    }

    #[test]
    fn from_flags_names_backends_by_address_or_name() {
        let c = Config::from_flags(
            &["127.0.0.1:1883".into()],
            &["127.0.0.1:1".into(), "east=127.0.0.1:2".into()],
            Some("127.0.0.1:9100"),
        )
        .unwrap();
        assert_eq!(c.backends[0].name, "127.0.0.1:1");
        assert_eq!(c.backends[1].name, "east");
        assert_eq!(c.backends[1].address, "127.0.0.1:2");
        assert_eq!(c.admin, Some("127.0.0.1:9100".parse().unwrap()));
        let e = Config::from_flags(&["x".into()], &[], None).unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        assert!(e.to_string().starts_with("<flags>: "), "{e}");
    }

    /// `mqlb balance` with no flags is told which flags to give.
    #[test]
    fn no_flags_says_which_flags_to_give() {
        let e = Config::from_flags(&[], &[], None).unwrap_err().to_string();
        assert!(e.contains("--listen ADDRESS:PORT"), "{e}");
        assert!(e.contains("--backend NAME=HOST:PORT"), "{e}");
        assert!(!e.contains("[[listener]]"), "{e}");
    }
}
