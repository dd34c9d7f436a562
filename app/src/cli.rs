//! Command line: `mqlb balance` and `mqlb config check`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mqlb_config::Config;
use mqlb_healthcheck::{CheckSettings, Outcome, ProbeSpec, Thresholds};
use mqlb_protocol::ProtocolVersion;

pub use crate::run::EXIT_USAGE;
use crate::run::{init_tracing, run, runtime, shutdown_on_signals};

/// mqlb: an MQTT-aware load balancer.
#[derive(Debug, Parser)]
#[command(name = "mqlb", version, about)]
pub struct Cli {
    /// Log line format: text (colour only on a terminal) or json (one
    /// object per line). Overrides `[log] format` in a config file.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
    /// Without one, `demo`: three bundled broker nodes behind the
    /// balancer on loopback.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for mqlb_config::LogFormat {
    fn from(a: LogFormatArg) -> Self {
        match a {
            LogFormatArg::Text => mqlb_config::LogFormat::Text,
            LogFormatArg::Json => mqlb_config::LogFormat::Json,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the balancer, from flags or from a config file.
    Balance(BalanceArgs),
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Run one node of the bundled MQTT broker, alone or as a member of a
    /// cluster (`--node-id`, `--cluster-listen`, `--peer`).
    Broker {
        /// Address to listen on (overrides `[broker] listen`).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// TOML file with a `[broker]` section (auth, ACL, limits) and an
        /// optional `[cluster]` section.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Serve /metrics, /healthz, /readyz and /cluster here (overrides
        /// `[broker] admin`).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// File with the bearer token the admin API requires (overrides
        /// `[broker] admin_token_file`).
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
        /// Keep sessions, queued messages, retained messages and state
        /// store keys here, across restarts and power losses (overrides
        /// `[broker] data_dir`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// When a QoS 1/2 publish is acknowledged: "disk" (once everything
        /// that keeps it is fsynced; the default with a data directory) or
        /// "memory" (overrides `[broker] durability`).
        #[arg(long, value_parser = ["memory", "disk"])]
        durability: Option<String>,
        /// Start on a data directory with a corrupt record: truncate the
        /// log there, move what follows aside to a .corrupt file, and log
        /// what was dropped.
        #[arg(long)]
        repair: bool,
        /// One fsync per change instead of one per group (benchmarks only:
        /// what group commit buys).
        #[arg(long, hide = true)]
        fsync_per_change: bool,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Exit when the process with this PID (the parent that started
        /// this node, such as `mqlb demo`) is gone, however it ended.
        #[arg(long, hide = true)]
        exit_with_parent: Option<i32>,
    },
    /// Three bundled broker nodes in a cluster behind the balancer, on
    /// loopback, with nothing to configure (the default command).
    Demo(crate::demo::DemoArgs),
    /// Print a password-file line (`user:$7$...`, Mosquitto-compatible) for
    /// `[broker] password_file`. Reads the password from stdin.
    Passwd {
        /// The user name.
        user: String,
    },
    /// Make the certificates a cluster's links need (mutual TLS).
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Probe one broker over MQTT once; exit 0 if healthy, 1 if not.
    Check(CheckArgs),
    /// Serve GET /health backed by MQTT probes of one broker (a sidecar for
    /// HTTP-only load balancers and Kubernetes probes).
    Healthcheck(SidecarArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct ProbeArgs {
    /// Probe with MQTT 5.0 instead of 3.1.1.
    #[arg(long)]
    v5: bool,
    /// Also subscribe, publish, and wait for the message to come back.
    #[arg(long)]
    deep: bool,
    /// Limit for each probe step (connect, CONNACK, PINGRESP, round trip).
    #[arg(long, default_value = "2s")]
    timeout: String,
    /// User name for the probe.
    #[arg(long)]
    username: Option<String>,
    /// Password for the probe.
    #[arg(long, requires = "username")]
    password: Option<String>,
    /// Client ID for the probe (default: empty, the broker assigns one; some
    /// 3.1.1 brokers need one).
    #[arg(long, default_value = "")]
    client_id: String,
    /// Speak MQTT over WebSocket, upgrading on this path (e.g. /mqtt).
    #[arg(long)]
    websocket_path: Option<String>,
}

impl ProbeArgs {
    fn spec(&self) -> Result<ProbeSpec, String> {
        let timeout =
            mqlb_config::duration::parse(&self.timeout).map_err(|e| format!("--timeout: {e}"))?;
        if timeout.is_zero() {
            return Err("--timeout: must be greater than 0".into());
        }
        Ok(ProbeSpec {
            version: if self.v5 {
                ProtocolVersion::V5
            } else {
                ProtocolVersion::V3_1_1
            },
            timeout,
            client_id: self.client_id.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            deep: self.deep,
            deep_topic: "mqlb/probe".into(),
            proxy_local: false,
            tls: None,
            websocket: self.websocket_path.clone(),
        })
    }
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// Broker address, host:port.
    addr: String,
    #[command(flatten)]
    probe: ProbeArgs,
}

#[derive(Debug, clap::Args)]
struct SidecarArgs {
    /// Broker address, host:port.
    #[arg(long)]
    target: String,
    /// HTTP address to serve /health on.
    #[arg(long)]
    listen: String,
    /// Time between probes.
    #[arg(long, default_value = "1s")]
    interval: String,
    #[command(flatten)]
    probe: ProbeArgs,
}

#[derive(Debug, clap::Args)]
struct BalanceArgs {
    /// TOML configuration file. Cannot be combined with --listen/--backend.
    #[arg(long, conflicts_with_all = ["listen", "backend"])]
    config: Option<PathBuf>,
    /// Address to listen on (repeatable).
    #[arg(long)]
    listen: Vec<String>,
    /// Backend broker as ADDR or NAME=ADDR (repeatable). Without a name the
    /// address is the placement identity.
    #[arg(long)]
    backend: Vec<String>,
    /// Serve the admin HTTP API (health, backends, metrics, drain) here.
    #[arg(long, conflicts_with = "config")]
    admin: Option<String>,
    /// File with the bearer token the admin API requires for drains,
    /// reloads and (off loopback) reads (overrides `[admin] token_file`,
    /// so a systemd credential or a mounted secret can supply it).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
}

/// Cluster membership flags of `mqlb broker` (override `[cluster]`).
#[derive(Debug, clap::Args)]
struct ClusterArgs {
    /// This node's name; the balancer's backend name for it must be the
    /// same, so both place clients alike.
    #[arg(long, requires = "cluster_listen")]
    node_id: Option<String>,
    /// Where peers connect.
    #[arg(long, requires = "node_id")]
    cluster_listen: Option<std::net::SocketAddr>,
    /// Another member as NAME@HOST:PORT, HOST an IP address or a DNS name
    /// resolved at each dial (its cluster listener; repeatable).
    #[arg(long, requires = "node_id")]
    peer: Vec<String>,
    /// Retired: cluster links use mutual TLS now (see --cluster-tls-cert).
    #[arg(long, hide = true)]
    cluster_secret_file: Option<PathBuf>,
    /// This node's cluster certificate (`mqlb cert create-node` makes it);
    /// with --cluster-tls-key and --cluster-tls-ca, every cluster
    /// connection is mutual TLS. Required unless the cluster listener is
    /// loopback.
    #[arg(long, requires_all = ["node_id", "cluster_tls_key", "cluster_tls_ca"])]
    cluster_tls_cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, requires = "cluster_tls_cert")]
    cluster_tls_key: Option<PathBuf>,
    /// The cluster CA every member's certificate chains to.
    #[arg(long, requires = "cluster_tls_cert")]
    cluster_tls_ca: Option<PathBuf>,
    /// Copies of each persistent session, the holder included (default 2:
    /// survives the loss of any one node).
    #[arg(long, requires = "node_id")]
    replication_factor: Option<usize>,
    /// Join a running cluster: the `--peer`s are its current members, and
    /// `POST /cluster/members/NAME@HOST:PORT` on one of them adds this node.
    #[arg(long, requires = "node_id")]
    join: bool,
    /// Deprecated: the old name of --data-dir (the node's Raft state is
    /// kept in its data directory).
    #[arg(long, requires = "node_id")]
    state_dir: Option<PathBuf>,
}

impl ClusterArgs {
    /// Applies the flags over the file's `[cluster]` section.
    fn apply(self, cfg: &mut mqlb_config::broker::BrokerConfig) -> Result<(), String> {
        use mqlb_config::broker::ClusterConfig;
        if self.cluster_secret_file.is_some() {
            return Err(format!(
                "--cluster-secret-file: {}",
                mqlb_config::broker::SECRET_RETIRED
            ));
        }
        let (Some(node_id), Some(listen)) = (self.node_id, self.cluster_listen) else {
            return Ok(());
        };
        let tls = match (
            self.cluster_tls_cert,
            self.cluster_tls_key,
            self.cluster_tls_ca,
        ) {
            (Some(cert), Some(key), Some(ca)) => {
                Some(mqlb_config::broker::ClusterTls { cert, key, ca })
            }
            _ => None,
        };
        let c = ClusterConfig {
            node_id: ClusterConfig::check_name(&node_id)?,
            listen,
            peers: self
                .peer
                .iter()
                .map(|p| ClusterConfig::parse_peer(p))
                .collect::<Result<_, _>>()?,
            tls,
            replication_factor: self.replication_factor.unwrap_or(
                mqlb_config::broker::DEFAULT_REPLICATION_FACTOR.min(self.peer.len() + 1),
            ),
            join: self.join,
            state_dir: self.state_dir,
            max_clock_drift: mqlb_config::broker::DEFAULT_MAX_CLOCK_DRIFT,
            seed: None,
            repair: false,
        };
        c.validate()?;
        cfg.cluster = Some(c);
        Ok(())
    }
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Make a cluster CA: DIR/ca.pem and DIR/ca.key (keep the key off the
    /// nodes if you can; only `create-node` needs it).
    CreateCa {
        /// Where to write them.
        #[arg(long)]
        out: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = crate::cert::DEFAULT_CA_NAME)]
        name: String,
    },
    /// Make node ID's certificate, signed by the CA in --ca: DIR/ID.pem and
    /// DIR/ID.key. It names the node (URI SAN mqlb://node/ID) and each
    /// --host (DNS name or IP address).
    CreateNode {
        /// The node's ID (its --node-id).
        id: String,
        /// A DNS name or IP address the node is reached at (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// The directory holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// Where to write the certificate and key.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file; exits 0 if valid, 64 if not.
    Check {
        /// The file to check.
        file: PathBuf,
        /// Also look up every backend's and cluster peer's host name now,
        /// as the process will (a name that does not resolve is a problem).
        #[arg(long)]
        resolve: bool,
    },
}

/// `config check --resolve`: looks up each `(what, host:port)` with the
/// system's resolver, as the process will; prints every one that fails.
fn resolves(file: &std::path::Path, names: &[(String, String)]) -> bool {
    use std::net::ToSocketAddrs;
    let mut ok = true;
    for (what, addr) in names {
        match addr.to_socket_addrs().map(|mut found| found.next()) {
            Ok(Some(_)) => {}
            Ok(None) => {
                eprintln!(
                    "{}: {what}: \"{addr}\" resolves to no address",
                    file.display()
                );
                ok = false;
            }
            Err(e) => {
                eprintln!(
                    "{}: {what}: \"{addr}\" does not resolve: {e}",
                    file.display()
                );
                ok = false;
            }
        }
    }
    ok
}

/// Process entry point.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let flag = cli.log_format.map(mqlb_config::LogFormat::from);
    // Commands with a config file start logging once it is read, so its
    // `[log] format` applies; the rest start now.
    let command = cli
        .command
        .unwrap_or_else(|| Command::Demo(crate::demo::DemoArgs::default()));
    let from_file = matches!(&command, Command::Balance(a) if a.config.is_some())
        || matches!(
            &command,
            Command::Broker {
                config: Some(_),
                ..
            }
        );
    if !from_file {
        init_tracing(flag.unwrap_or_default());
    }
    match command {
        Command::Demo(args) => crate::demo::run(args),
        Command::Config {
            command: ConfigCommand::Check { file, resolve },
        } if mqlb_config::is_broker_file(&file) => {
            match mqlb_config::broker::BrokerConfig::load(&file) {
                Ok(c) => {
                    for l in &c.listeners {
                        if let Some(Err(e)) = l.tls.as_ref().map(mqlb_listener::tls::acceptor) {
                            eprintln!("{}: broker listener {} TLS: {e}", file.display(), l.name);
                            return ExitCode::from(EXIT_USAGE);
                        }
                    }
                    if resolve {
                        let peers = c.cluster.iter().flat_map(|cl| cl.peers.iter());
                        let names: Vec<(String, String)> = peers
                            .map(|(n, a)| (format!("cluster peer {n}"), a.to_string()))
                            .collect();
                        if !resolves(&file, &names) {
                            return ExitCode::from(EXIT_USAGE);
                        }
                    }
                    println!(
                        "{}: ok (broker, {} extra listener(s){})",
                        file.display(),
                        c.listeners.len(),
                        if c.cluster.is_some() {
                            ", cluster member"
                        } else {
                            ""
                        }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(EXIT_USAGE)
                }
            }
        }
        Command::Config {
            command: ConfigCommand::Check { file, resolve },
        } => match Config::load(&file) {
            Ok(c) => {
                // The config names the files; reading them shows a bad PEM
                // before a deploy rather than at start.
                for l in &c.listeners {
                    if let Some(Err(e)) = l.tls.as_ref().map(mqlb_listener::tls::acceptor) {
                        eprintln!("{}: listener {} TLS: {e}", file.display(), l.name);
                        return ExitCode::from(EXIT_USAGE);
                    }
                }
                for b in &c.backends {
                    if let Some(Err(e)) = b.tls.as_ref().map(mqlb_balancer::select::tls_client) {
                        eprintln!("{}: backend {} TLS: {e}", file.display(), b.name);
                        return ExitCode::from(EXIT_USAGE);
                    }
                }
                if resolve {
                    let names: Vec<(String, String)> = c
                        .backends
                        .iter()
                        .map(|b| (format!("backend {}", b.name), b.address.clone()))
                        .collect();
                    if !resolves(&file, &names) {
                        return ExitCode::from(EXIT_USAGE);
                    }
                }
                println!(
                    "{}: ok ({} listener(s), {} backend(s))",
                    file.display(),
                    c.listeners.len(),
                    c.backends.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_USAGE)
            }
        },
        Command::Balance(args) => {
            let config = match &args.config {
                Some(path) => Config::load(path),
                None => Config::from_flags(&args.listen, &args.backend, args.admin.as_deref()),
            };
            let mut config = match config {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            if args.admin_token_file.is_some() {
                config.admin_access.token_file = args.admin_token_file;
            }
            if from_file {
                init_tracing(flag.or(config.log_format).unwrap_or_default());
            }
            run(config, args.config)
        }
        Command::Cert {
            command: CertCommand::CreateCa { out, name },
        } => match crate::cert::create_ca(&out, &name) {
            Ok((cert, key)) => {
                println!("{}\n{}", cert.display(), key.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Cert {
            command: CertCommand::CreateNode { id, hosts, ca, out },
        } => match crate::cert::create_node(&id, &hosts, &ca, &out) {
            Ok((cert, key)) => {
                println!("{}\n{}", cert.display(), key.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Passwd { user } => {
            let mut password = String::new();
            if std::io::stdin().read_line(&mut password).is_err() || password.trim_end().is_empty()
            {
                eprintln!("expected the password on stdin");
                return ExitCode::from(EXIT_USAGE);
            }
            match mqlb_broker::auth::hash_line(&user, password.trim_end_matches(['\r', '\n'])) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Broker {
            listen,
            config,
            admin,
            admin_token_file,
            data_dir,
            durability,
            repair,
            fsync_per_change,
            cluster,
            exit_with_parent,
        } => {
            if let Some(parent) = exit_with_parent {
                crate::demo::die_with_parent(parent);
            }
            let mut cfg = match &config {
                Some(path) => match mqlb_config::broker::BrokerConfig::load(path) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(EXIT_USAGE);
                    }
                },
                None => mqlb_config::broker::BrokerConfig::default(),
            };
            if from_file {
                init_tracing(flag.or(cfg.log_format).unwrap_or_default());
            }
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if admin.is_some() {
                cfg.admin = admin;
            }
            if admin_token_file.is_some() {
                cfg.admin_access.token_file = admin_token_file;
            }
            if data_dir.is_some() {
                cfg.data_dir = data_dir;
            }
            if let Some(d) = durability {
                cfg.durability = mqlb_config::broker::Durability::parse(&d);
            }
            cfg.repair = repair;
            cfg.fsync_per_change = fsync_per_change;
            if let Err(e) = cluster
                .apply(&mut cfg)
                .and_then(|()| cfg.storage().map(drop))
            {
                eprintln!("{e}");
                return ExitCode::from(EXIT_USAGE);
            }
            match mqlb_balancer::fdlimit::raise() {
                Ok(limit) => tracing::debug!(limit, "open-file limit"),
                Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
            }
            let Some(rt) = runtime() else {
                return ExitCode::FAILURE;
            };
            rt.block_on(async {
                let broker = match mqlb_broker::Broker::bind_config(&cfg).await {
                    Ok(b) => b,
                    Err(e) => {
                        eprintln!("broker on {}: {e}", cfg.listen);
                        return ExitCode::FAILURE;
                    }
                };
                let shutdown = shutdown_on_signals();
                if let Some(admin) = cfg.admin {
                    let listener = match tokio::net::TcpListener::bind(admin).await {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("admin API on {admin}: {e}");
                            return ExitCode::FAILURE;
                        }
                    };
                    let access = match listener
                        .local_addr()
                        .and_then(|own| mqlb_balancer::http::Access::new(&cfg.admin_access, own))
                    {
                        Ok(a) => a,
                        Err(e) => {
                            eprintln!("admin API: {e}");
                            return ExitCode::from(EXIT_USAGE);
                        }
                    };
                    let state = broker.node();
                    tokio::spawn(mqlb_balancer::http::serve(
                        listener,
                        shutdown.clone(),
                        move |method, path, headers| {
                            if let Err(refused) = access.check(method, path, headers) {
                                return refused;
                            }
                            if method == hyper::Method::POST {
                                return crate::node_admin::post(&state, path);
                            }
                            let mut reply = crate::node_admin::get(&state, path);
                            if path == "/metrics" {
                                use std::fmt::Write as _;
                                let _ = write!(
                                    reply.body,
                                    "# HELP mqlb_admin_refused_total Admin API requests refused: a missing or wrong token, a foreign Host, a cross-site POST.\n# TYPE mqlb_admin_refused_total counter\nmqlb_admin_refused_total {}\n",
                                    access.refused.load(std::sync::atomic::Ordering::Relaxed)
                                );
                            }
                            reply
                        },
                    ));
                }
                match broker.serve(shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("broker: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Check(args) => {
            let spec = match args.probe.spec() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let Some(rt) = runtime() else {
                return ExitCode::FAILURE;
            };
            let outcome = rt.block_on(mqlb_healthcheck::probe(&args.addr, &spec));
            println!("{} {}", args.addr, outcome.summary());
            if matches!(outcome, Outcome::Up(_)) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Command::Healthcheck(args) => {
            let spec = match args.probe.spec() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let interval = match mqlb_config::duration::parse(&args.interval) {
                Ok(d) if !d.is_zero() => d,
                _ => {
                    eprintln!("--interval: expected a duration such as \"1s\"");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let Some(rt) = runtime() else {
                return ExitCode::FAILURE;
            };
            rt.block_on(async {
                let listener = match tokio::net::TcpListener::bind(&args.listen).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("--listen {}: {e}", args.listen);
                        return ExitCode::FAILURE;
                    }
                };
                let settings = CheckSettings {
                    interval,
                    jitter: Duration::ZERO,
                    // The endpoint reports the latest probe as it is.
                    thresholds: Thresholds {
                        rise: 1,
                        fall: 1,
                        passive_fall: 1,
                    },
                    spec,
                };
                let shutdown = shutdown_on_signals();
                crate::sidecar::run(args.target, listener, settings, shutdown).await;
                ExitCode::SUCCESS
            })
        }
    }
}
