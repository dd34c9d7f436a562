//! The raw schema, exactly as operators write it. Fields that need semantic
//! checks are `Spanned`, so their errors carry a line.

use serde::Deserialize;
use toml::Spanned;

use crate::Problem;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// `[[listener]]` tables.
    #[serde(default)]
    pub listener: Vec<ListenerFile>,
    /// `[[backend]]` tables.
    #[serde(default)]
    pub backend: Vec<BackendFile>,
    /// `[[rule]]` tables, tried in order.
    #[serde(default)]
    pub rule: Vec<RuleFile>,
    /// `[[pool]]` tables: pools whose backends come from DNS.
    #[serde(default)]
    pub pool: Vec<PoolFile>,
    /// The `[balancer]` table.
    pub balancer: Option<BalancerFile>,
    /// The `[health]` table.
    pub health: Option<HealthFile>,
    /// The `[eviction]` table.
    pub eviction: Option<EvictionFile>,
    /// The `[admission]` table.
    pub admission: Option<AdmissionFile>,
    /// The `[admin]` table.
    pub admin: Option<AdminFile>,
    /// The `[broker]` table (for `mqlb broker`).
    pub broker: Option<BrokerFile>,
    /// The `[cluster]` table (for `mqlb broker` as a cluster member).
    pub cluster: Option<ClusterFile>,
    /// The `[log]` table.
    pub log: Option<LogFile>,
}

/// `[log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    /// "text" (default) or "json".
    pub format: Option<Spanned<String>>,
}

/// `[cluster]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// This node's name (what placement hashes; the balancer's backend name).
    pub node_id: Spanned<String>,
    /// Cluster listener, IP:port.
    pub listen: Spanned<String>,
    /// The other members, as "NAME@HOST:PORT" (HOST an IP address or a DNS
    /// name, resolved at each dial).
    #[serde(default)]
    pub peers: Vec<Spanned<String>>,
    /// Retired: the shared secret of earlier versions (an error saying
    /// how to make certificates instead).
    pub secret_file: Option<Spanned<String>>,
    /// This node's certificate (it names the node: `mqlb://node/ID`).
    pub tls_cert: Option<Spanned<String>>,
    /// Its private key.
    pub tls_key: Option<Spanned<String>>,
    /// The cluster CA every member's certificate chains to.
    pub tls_ca: Option<Spanned<String>>,
    /// Copies of each persistent session, default 2.
    pub replication_factor: Option<Spanned<i64>>,
    /// Join a running cluster (an admin call on a member adds this node).
    pub join: Option<bool>,
    /// Directory for the Raft state, kept across restarts.
    pub state_dir: Option<Spanned<String>>,
    /// How far ahead of this node's clock a peer's stamp may be, default
    /// "1m".
    pub max_clock_drift: Option<Spanned<String>>,
}

/// `[broker]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerFile {
    /// MQTT listener, default "127.0.0.1:1883".
    pub listen: Option<Spanned<String>>,
    /// Admin API (metrics, health), off by default.
    pub admin: Option<Spanned<String>>,
    /// File holding the bearer token the admin API requires.
    pub admin_token_file: Option<Spanned<String>>,
    /// Host names (besides loopback ones) the admin API answers to.
    pub admin_allowed_hosts: Option<Vec<Spanned<String>>>,
    /// Default true.
    pub allow_anonymous: Option<bool>,
    /// Mosquitto-format password file (`user:$7$...`, from mosquitto_passwd or `mqlb passwd`).
    pub password_file: Option<Spanned<String>>,
    /// Default 1000.
    pub max_queued_messages: Option<Spanned<i64>>,
    /// Default 16 MiB.
    pub max_queued_bytes: Option<Spanned<i64>>,
    /// Most levels in a topic name or filter, default 200 (Mosquitto's).
    pub max_topic_levels: Option<Spanned<i64>>,
    /// Most subscriptions per session, default 10000.
    pub max_subscriptions: Option<Spanned<i64>>,
    /// How often `$SYS` topics are refreshed, default "10s".
    pub sys_interval: Option<Spanned<String>>,
    /// Longest keep-alive granted to v5 clients (Server Keep Alive), off by default.
    pub max_keep_alive: Option<Spanned<String>>,
    /// Closes per second on SIGTERM, default 1000.
    pub shutdown_rate: Option<Spanned<i64>>,
    /// How long the paced close on SIGTERM may take, default "30s".
    pub shutdown_grace: Option<Spanned<String>>,
    /// Topic access rules; none means everything is allowed.
    #[serde(default)]
    pub acl: Vec<AclFile>,
    /// `[[broker.listener]]`: more listeners (TLS, WebSocket, PROXY
    /// protocol), with the keys of a balancer `[[listener]]`.
    #[serde(default)]
    pub listener: Vec<ListenerFile>,
    /// `[broker.statestore]`: the state store's limits.
    pub statestore: Option<StateStoreFile>,
    /// Where the node keeps what it must remember across restarts.
    pub data_dir: Option<Spanned<String>>,
    /// "memory" or "disk" (the default with a data_dir, on a single node).
    pub durability: Option<Spanned<String>>,
    /// Past this many bytes in the data directory, new publishes that need
    /// storing are refused.
    pub max_disk_bytes: Option<Spanned<i64>>,
}

/// `[broker.statestore]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateStoreFile {
    /// Keys held, default 100000.
    pub max_keys: Option<Spanned<i64>>,
    /// Bytes in one key, default 1024.
    pub max_key_bytes: Option<Spanned<i64>>,
    /// Bytes in one value, default 1 MiB.
    pub max_value_bytes: Option<Spanned<i64>>,
    /// Bytes the store keeps in all, default 64 MiB.
    pub max_total_bytes: Option<Spanned<i64>>,
    /// Keys one client may watch at once, default 1000.
    pub max_watches_per_client: Option<Spanned<i64>>,
}

/// `[[broker.acl]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclFile {
    /// User name the rule applies to; "*" for everyone (anonymous included).
    pub user: Spanned<String>,
    /// Topic filter; `%u` is the user name, `%c` the client ID.
    pub topic: Spanned<String>,
    /// "read", "write" or "readwrite".
    pub access: Spanned<String>,
}

/// `[health]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    /// Default true.
    pub enabled: Option<bool>,
    /// Default "250ms".
    pub interval: Option<Spanned<String>>,
    /// Default "500ms".
    pub timeout: Option<Spanned<String>>,
    /// Default 2.
    pub rise: Option<Spanned<i64>>,
    /// Default 2.
    pub fall: Option<Spanned<i64>>,
    /// Default 3.
    pub passive_fall: Option<Spanned<i64>>,
    /// Default "250ms".
    pub jitter: Option<Spanned<String>>,
    /// "3.1.1" (default) or "5".
    pub protocol: Option<Spanned<String>>,
    /// Optional probe credentials.
    pub username: Option<String>,
    /// Optional probe credentials.
    pub password: Option<String>,
    /// Default false.
    pub deep: Option<bool>,
    /// Default "mqlb/probe".
    pub deep_topic: Option<Spanned<String>>,
}

/// `[admission]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionFile {
    /// New CONNECTs per second per backend; 0 (default) = no cap.
    pub backend_connect_rate: Option<Spanned<i64>>,
    /// Bucket size for the per-backend rate, default one tenth of a second's worth.
    pub backend_connect_burst: Option<Spanned<i64>>,
    /// CONNECTs forwarded to a backend and not yet answered; 0 = no cap.
    pub backend_pending_connacks: Option<Spanned<i64>>,
    /// Concurrent connections per source IP; 0 = no cap.
    pub per_ip_connections: Option<Spanned<i64>>,
    /// CONNECTs per second per source IP; 0 = no cap.
    pub per_ip_connect_rate: Option<Spanned<i64>>,
    /// How long a 3.x client over a cap waits for room, default "2s".
    pub hold: Option<Spanned<String>>,
}

/// `[eviction]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvictionFile {
    /// Closes per second, default 1000.
    pub rate: Option<Spanned<i64>>,
    /// Opt-in: v5 clients get 0x9C Use another server with this reference.
    pub server_reference: Option<Spanned<String>>,
    /// On SIGTERM, how long clients are closed at `rate` before the rest
    /// are cut, default "30s".
    pub shutdown_grace: Option<Spanned<String>>,
}

/// `[admin]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// `IP:port` of the admin HTTP API.
    pub address: Spanned<String>,
    /// File holding the bearer token the API requires.
    pub token_file: Option<Spanned<String>>,
    /// Host names (besides loopback ones) the API answers to.
    pub allowed_hosts: Option<Vec<Spanned<String>>>,
}

/// `[[listener]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    /// Optional label (default `listenerN`).
    pub name: Option<String>,
    /// `IP:port` to bind.
    pub address: Spanned<String>,
    /// "close" (default, as Mosquitto) or "reason-code" (v5 CONNACK 0x81/0x82/0x95).
    pub connect_refusal: Option<Spanned<String>>,
    /// Expect a PROXY protocol v1/v2 header from `proxy_trusted` sources.
    pub proxy_protocol: Option<bool>,
    /// Sources (CIDRs) allowed to send a PROXY header.
    pub proxy_trusted: Option<Vec<Spanned<String>>>,
    /// PEM certificate chain: terminate TLS on this listener.
    pub tls_cert: Option<Spanned<String>>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<Spanned<String>>,
    /// PEM CA certificates: require a client certificate they sign (mTLS).
    pub tls_client_ca: Option<Spanned<String>>,
    /// PEM CRLs: client certificates they revoke are refused (needs
    /// `tls_client_ca`).
    pub tls_client_crl: Option<Spanned<String>>,
    /// With `tls_client_ca`: "username" or "client_id" takes the client
    /// certificate's identity (subject CN, else the first DNS SAN) into the
    /// CONNECT (Mosquitto's `use_identity_as_username`).
    pub tls_identity_as: Option<Spanned<String>>,
    /// More certificates, chosen by the name the client asks for (SNI);
    /// `tls_cert` is the default for clients that ask for none.
    #[serde(default)]
    pub sni: Vec<SniFile>,
    /// "mqtt" (default) or "websocket" (MQTT over WebSocket, plain or TLS).
    pub kind: Option<Spanned<String>>,
    /// HTTP path of the WebSocket upgrade, default "/mqtt".
    pub websocket_path: Option<Spanned<String>>,
}

/// `[[listener.sni]]`: a certificate for some server names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniFile {
    /// The names it serves (`a.example.com`, `*.example.com`).
    pub server_names: Spanned<Vec<String>>,
    /// PEM certificate chain.
    pub tls_cert: Spanned<String>,
    /// PEM private key.
    pub tls_key: Spanned<String>,
}

/// `[[backend]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    /// Unique, stable name (the placement identity).
    pub name: Spanned<String>,
    /// `host:port`.
    pub address: Spanned<String>,
    /// Default 1.
    pub weight: Option<Spanned<u32>>,
    /// The pool it belongs to, default "default".
    pub pool: Option<Spanned<String>>,
    /// Send a PROXY protocol v2 header (the client's address) first.
    pub proxy_protocol: Option<bool>,
    /// PEM CA bundle: speak TLS to this broker, verifying it against these.
    pub tls_ca: Option<Spanned<String>>,
    /// PEM client certificate for brokers that ask for one.
    pub tls_cert: Option<Spanned<String>>,
    /// PEM key for `tls_cert`.
    pub tls_key: Option<Spanned<String>>,
    /// The name the broker's certificate must carry (default: the
    /// address's host).
    pub tls_server_name: Option<Spanned<String>>,
    /// Speak MQTT over WebSocket to this broker, upgrading on this path
    /// (e.g. "/mqtt"); default: MQTT straight over TCP.
    pub websocket_path: Option<Spanned<String>>,
    /// This backend is an mqlb cluster node whose admin API is here
    /// (`host:port`): the balancer follows the cluster's view too.
    pub cluster_admin: Option<Spanned<String>>,
}

/// `[[pool]]`: a pool whose backends are discovered in DNS.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    /// Pool name (what rules and `default_pool` refer to).
    pub name: Spanned<String>,
    /// The DNS name to resolve.
    pub dns: Spanned<String>,
    /// "A" (A and AAAA; default) or "SRV".
    pub record: Option<Spanned<String>>,
    /// Port for A/AAAA answers, default 1883.
    pub port: Option<Spanned<i64>>,
    /// Shortest re-resolution interval, default "5s".
    pub min_ttl: Option<Spanned<String>>,
    /// Longest re-resolution interval, default "5m".
    pub max_ttl: Option<Spanned<String>>,
    /// Take an empty answer as "no backends" (default false: keep the last set).
    pub allow_empty: Option<bool>,
}

/// `[[rule]]`: sends matching clients to a pool. Exactly one matcher.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// Target pool.
    pub pool: Spanned<String>,
    /// The listener's name.
    pub listener: Option<Spanned<String>>,
    /// Client IDs starting with this.
    pub client_id_prefix: Option<Spanned<String>>,
    /// Client IDs matching this glob (`*`, `?`).
    pub client_id_glob: Option<Spanned<String>>,
    /// The CONNECT's user name.
    pub username: Option<Spanned<String>>,
    /// "3.1", "3.1.1" or "5".
    pub protocol: Option<Spanned<String>>,
    /// The client's address is in this CIDR.
    pub source_cidr: Option<Spanned<String>>,
}

/// `[balancer]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerFile {
    /// Default "10s".
    pub connect_timeout: Option<Spanned<String>>,
    /// Default 65536.
    pub max_connect_size: Option<Spanned<i64>>,
    /// Default "3s".
    pub backend_connect_timeout: Option<Spanned<String>>,
    /// Default 100000.
    pub max_connections: Option<Spanned<i64>>,
    /// "source-ip" (default) or "source-address".
    pub empty_client_id: Option<Spanned<String>>,
    /// Local IPs to open backend connections from, used in turn.
    pub source_addresses: Option<Vec<Spanned<String>>>,
    /// Pool for clients no rule matches.
    pub default_pool: Option<Spanned<String>>,
    /// DNS servers (`IP:port`) for discovery and backend host names;
    /// default: the system's.
    pub dns_servers: Option<Vec<Spanned<String>>>,
    /// Token file for the cluster nodes' admin APIs (`cluster_admin`).
    pub cluster_admin_token_file: Option<Spanned<String>>,
}

/// The 1-based line of byte `offset` in `text` (counted on bytes: an
/// offset inside a character cannot panic).
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text.bytes().take(offset).filter(|b| *b == b'\n').count() + 1
}

/// Deserializes `text`, finding every problem serde would stop at one at a
/// time: a line that assigns an unknown key or a value of the wrong type
/// is reported, blanked (so later lines keep their numbers) and the text
/// parsed again, up to [`MAX_PROBLEMS`]. A syntax error stops the search.
pub(crate) fn parse_all<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Vec<Problem>> {
    let mut current = text.to_string();
    let mut problems: Vec<Problem> = Vec::new();
    loop {
        let e = match toml::from_str::<T>(&current) {
            Ok(v) if problems.is_empty() => return Ok(v),
            Ok(_) => return Err(problems),
            Err(e) => e,
        };
        let p = syntax_problem(text, &e);
        // A required key missing after an earlier problem is that
        // problem's echo (a misspelt `address` was set aside).
        if e.message().starts_with("missing field") && !problems.is_empty() {
            return Err(problems);
        }
        let line = p.line.filter(|_| p.key != "(syntax)");
        let suggestion = suggested_key(&p.message);
        problems.push(p);
        let Some(line) = line else {
            return Err(problems);
        };
        // Carry on past it: a misspelt key is read as the key it meant (so
        // its value is checked too); any other offending line is set aside.
        let carried = match suggestion {
            // Only where that line assigns the misspelt key itself (not
            // an inline table holding it).
            Some(k) if misspelt_on(&current, line, e.message()) => {
                rename_key(&mut current, line, &k)
            }
            Some(_) => false,
            None => blank_line(&mut current, line),
        };
        if problems.len() >= MAX_PROBLEMS || !carried {
            return Err(problems);
        }
    }
}

/// Whether 1-based `line` of `text` assigns the unknown key that serde's
/// `message` ("unknown field `x`, ...") names.
fn misspelt_on(text: &str, line: usize, message: &str) -> bool {
    let field = message
        .strip_prefix("unknown field `")
        .and_then(|r| r.split_once('`'))
        .map(|(f, _)| f);
    let assigned = text
        .lines()
        .nth(line.saturating_sub(1))
        .and_then(|l| l.split_once('='))
        .map(|(k, _)| k.trim());
    field.is_some() && field == assigned
}

/// The key a "did you mean" message names.
fn suggested_key(message: &str) -> Option<String> {
    let (_, rest) = message.split_once("did you mean `")?;
    rest.split_once('`').map(|(k, _)| k.to_string())
}

/// Renames the key assigned on 1-based `line` to `key`.
fn rename_key(text: &mut String, line: usize, key: &str) -> bool {
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        match l.split_once('=') {
            Some((_, value)) if i + 1 == line => {
                out.push_str(key);
                out.push_str(" =");
                out.push_str(value);
                changed = true;
            }
            _ => out.push_str(l),
        }
    }
    *text = out;
    changed
}

/// Problems listed before giving up on a file.
const MAX_PROBLEMS: usize = 50;

/// Replaces 1-based `line` of `text` with nothing, keeping the newline;
/// false if there is no such line or it was blank already.
fn blank_line(text: &mut String, line: usize) -> bool {
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i + 1 == line && !l.trim().is_empty() {
            changed = true;
            if l.ends_with('\n') {
                out.push('\n');
            }
        } else {
            out.push_str(l);
        }
    }
    *text = out;
    changed
}

/// Turns a TOML/serde error into a problem with a line and, where the line
/// assigns a key, the key path (`table.key`, `backend[1].key`), in words a
/// user of the file reads.
pub(crate) fn syntax_problem(text: &str, e: &toml::de::Error) -> Problem {
    let line = e.span().map(|s| line_of(text, s.start));
    // An unknown key's span can be its table's: find the key's own line.
    let unknown = e
        .message()
        .strip_prefix("unknown field `")
        .and_then(|r| r.split_once('`'))
        .map(|(f, _)| f);
    let line = match (line, unknown) {
        (Some(l), Some(f)) => Some(line_of_key(text, l, f).unwrap_or(l)),
        _ => line,
    };
    let missing = e
        .message()
        .strip_prefix("missing field `")
        .and_then(|r| r.split_once('`'))
        .map(|(f, _)| f);
    let key = match (line, missing) {
        (Some(l), Some(f)) => Some(match table_at_line(text, l) {
            Some(t) => format!("{t}.{f}"),
            None => f.to_string(),
        }),
        (Some(l), None) => key_at_line(text, l),
        _ => None,
    }
    .unwrap_or_else(|| "(syntax)".to_string());
    Problem {
        key,
        line,
        message: plain_words(e.message().trim()),
    }
}

/// serde's messages in the file's terms: "unknown key `adress`; did you
/// mean `address`?", "expected a whole number, got the text \"fast\"".
fn plain_words(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once('`') {
            let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            let nearest = known
                .iter()
                .map(|k| (strsim::levenshtein(field, k), *k))
                .min();
            return match nearest {
                Some((d, k)) if d <= 2.max(field.len() / 3) => {
                    format!("unknown key `{field}`; did you mean `{k}`?")
                }
                _ if !known.is_empty() => format!(
                    "unknown key `{field}`; the keys here are {}",
                    known
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => format!("unknown key `{field}`"),
            };
        }
    }
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        if let Some((got, expected)) = rest.split_once(", expected ") {
            return format!("expected {}, got {}", kind_of(expected), value_of(got));
        }
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        if let Some((field, _)) = rest.split_once('`') {
            return format!("missing key `{field}`");
        }
    }
    message.to_string()
}

/// What serde expected, in words.
fn kind_of(expected: &str) -> String {
    match expected {
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "usize" | "isize" => {
            "a whole number".to_string()
        }
        "f32" | "f64" => "a number".to_string(),
        "a boolean" => "true or false".to_string(),
        "a string" => "text in quotes".to_string(),
        "a sequence" => "a list, as [ ... ]".to_string(),
        e if e.starts_with("struct ") || e.starts_with("a map") => "a table".to_string(),
        e => e.to_string(),
    }
}

/// The value serde found, in words.
fn value_of(got: &str) -> String {
    if let Some(s) = got.strip_prefix("string ") {
        format!("the text {s}")
    } else if let Some(n) = got.strip_prefix("integer ") {
        format!("the number {}", n.trim_matches('`'))
    } else if let Some(n) = got.strip_prefix("floating point ") {
        format!("the number {}", n.trim_matches('`'))
    } else if let Some(b) = got.strip_prefix("boolean ") {
        b.trim_matches('`').to_string()
    } else if got == "sequence" {
        "a list".to_string()
    } else if got == "map" {
        "a table".to_string()
    } else {
        got.to_string()
    }
}

/// The 1-based line, at or after `from` and before the next table header,
/// that assigns `key`.
fn line_of_key(text: &str, from: usize, key: &str) -> Option<usize> {
    text.lines()
        .enumerate()
        .skip(from.checked_sub(1)?)
        .take_while(|(i, l)| *i + 1 == from || !l.trim_start().starts_with('['))
        .find(|(_, l)| l.split_once('=').is_some_and(|(k, _)| k.trim() == key))
        .map(|(i, _)| i + 1)
}

/// The table (`name`, or `name[N]` for the N-th `[[name]]`) whose header
/// is on, or last before, 1-based `line`.
fn table_at_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let upto = lines.get(..line)?;
    let h = upto
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))?;
    let t = h.trim_matches(|c| c == '[' || c == ']').trim();
    Some(if h.starts_with("[[") {
        let n = upto.iter().filter(|l| l.trim() == h).count();
        format!("{t}[{}]", n.saturating_sub(1))
    } else {
        t.to_string()
    })
}

/// The key assigned on 1-based line `line`, if that line is `key = ...`,
/// with its table: `table.key`, or `table[N].key` in the N-th (from 0)
/// `[[table]]`, as validation problems name keys.
fn key_at_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let this = lines.get(line.checked_sub(1)?)?.trim();
    let (key, _) = this.split_once('=')?;
    let key = key.trim();
    let before = lines.get(..line - 1)?;
    let header = before
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['));
    Some(match header {
        Some(h) if h.starts_with("[[") => {
            let t = h.trim_matches(|c| c == '[' || c == ']').trim();
            let n = before.iter().filter(|l| l.trim() == h).count();
            format!("{t}[{}].{key}", n.saturating_sub(1))
        }
        Some(h) => format!("{}.{key}", h.trim_matches(|c| c == '[' || c == ']').trim()),
        None => key.to_string(),
    })
}
