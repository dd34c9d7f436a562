//! `mqlb demo` (and `mqlb` with no command): the balancer in front of a
//! three-node cluster of bundled brokers, on loopback, with nothing to
//! configure.
//!
//! The nodes are child processes (`mqlb broker`), so one can be killed for
//! real to watch a failover; the demo restarts a node that exits after a
//! few seconds, and stops them all on Ctrl-C. The balancer's backend names
//! are the nodes' IDs, so the balancer and the cluster place every client
//! on the same node.
//!
//! The nodes' cluster links are mutual TLS, as in production: the demo
//! makes a throw-away CA and a certificate per node in a private temporary
//! directory at start, and removes it at exit, so even on loopback no
//! other local user can join the demo's cluster.

use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a node that exited stays down before the demo restarts it.
pub const RESTART_AFTER: Duration = Duration::from_secs(5);

/// Ports of the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// MQTT port of the balancer; the nodes take the next three.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Admin API port of the balancer; the nodes' admin APIs take the
    /// next three.
    #[arg(long, default_value_t = 9100)]
    pub admin_port: u16,
    /// Cluster port of the first node; the others take the next two.
    #[arg(long, default_value_t = 7001)]
    pub cluster_port: u16,
}

impl Default for DemoArgs {
    fn default() -> Self {
        Self {
            port: 1883,
            admin_port: 9100,
            cluster_port: 7001,
        }
    }
}

struct Node {
    name: String,
    args: Vec<String>,
    child: Option<Child>,
    down_since: Option<std::time::Instant>,
}

impl Node {
    fn spawn(&mut self) {
        let exe = std::env::current_exe().unwrap_or_else(|_| "mqlb".into());
        // Its own process group: Ctrl-C reaches the demo alone, which then
        // stops every node at once (no node watches its peers leave one by
        // one, and no hand-over is waited for: everything goes together).
        match Command::new(exe)
            .arg("broker")
            .args(&self.args)
            .args(["--exit-with-parent", &std::process::id().to_string()])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
        {
            Ok(mut c) => {
                println!("node {} started (pid {})", self.name, c.id());
                // Its log lines, tagged with its name: four processes
                // share this terminal.
                if let Some(err) = c.stderr.take() {
                    let name = self.name.clone();
                    std::thread::spawn(move || {
                        use std::io::{BufRead, Write};
                        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                            let mut e = std::io::stderr().lock();
                            let _ = writeln!(e, "{name} | {line}");
                        }
                    });
                }
                self.child = Some(c);
                self.down_since = None;
            }
            Err(e) => eprintln!("node {}: cannot start: {e}", self.name),
        }
    }
}

/// In a node the demo started: asks the kernel to kill this process when
/// its parent dies (`PR_SET_PDEATHSIG`), so a demo ended by `kill -9`, a
/// crash or a closed terminal leaves no node behind holding its ports. A
/// parent that died before the request leaves this process to init: then
/// it exits at once.
pub fn die_with_parent(parent: i32) {
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        tracing::warn!(error = %e, "cannot ask to die with the parent process");
    }
    if nix::unistd::getppid().as_raw() != parent {
        eprintln!("the process that started this node ({parent}) is gone; exiting");
        std::process::exit(1);
    }
}

/// The ports the demo needs that another process holds already (another
/// demo, most likely), as `port (what)`.
fn taken_ports(a: &DemoArgs, nodes: &[(String, u16, u16, u16)]) -> Vec<String> {
    let mut wanted = vec![
        (a.port, "the balancer's MQTT port".to_string()),
        (a.admin_port, "the balancer's admin port".to_string()),
    ];
    for (name, port, admin, cluster) in nodes {
        wanted.push((*port, format!("node {name}'s MQTT port")));
        wanted.push((*admin, format!("node {name}'s admin port")));
        wanted.push((*cluster, format!("node {name}'s cluster port")));
    }
    wanted
        .into_iter()
        .filter(|(port, _)| std::net::TcpListener::bind(("127.0.0.1", *port)).is_err())
        .map(|(port, what)| format!("{port} ({what})"))
        .collect()
}

/// The demo's private directory: its throw-away cluster CA and node
/// certificates. Removed when dropped.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes the demo's directory (readable by this user only), its CA and a
/// certificate per node. Directories left by demos that were killed are
/// removed first.
fn scratch(nodes: &[(String, u16, u16, u16)]) -> std::io::Result<Scratch> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("mqlb-demo-"))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = tmp.join(format!("mqlb-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let s = Scratch(dir);
    let mut raw = [0u8; 24];
    getrandom::getrandom(&mut raw).map_err(std::io::Error::other)?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(s.0.join("admin.token"))?;
        writeln!(f, "{token}")?;
    }
    crate::cert::create_ca(&s.0, "mqlb demo cluster CA")?;
    for (name, ..) in nodes {
        crate::cert::create_node(name, &["127.0.0.1".to_string()], &s.0, &s.0)?;
    }
    Ok(s)
}

/// The ports every part of the demo uses, derived from the arguments.
fn layout(a: &DemoArgs) -> Vec<(String, u16, u16, u16)> {
    (0..3u16)
        .map(|i| {
            (
                format!("n{}", i + 1),
                a.port.saturating_add(i + 1),
                a.admin_port.saturating_add(i + 1),
                a.cluster_port.saturating_add(i),
            )
        })
        .collect()
}

/// Runs the demo until Ctrl-C.
pub fn run(args: DemoArgs) -> ExitCode {
    let nodes = layout(&args);
    let taken = taken_ports(&args, &nodes);
    if !taken.is_empty() {
        eprintln!(
            "mqlb demo: these ports are in use: {}.\nIs another mqlb demo running? Stop it, or choose other ports with --port, --admin-port and --cluster-port.",
            taken.join(", ")
        );
        return ExitCode::from(crate::run::EXIT_USAGE);
    }
    let scratch = match scratch(&nodes) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mqlb demo: cannot make the cluster's certificates: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut children: Vec<Node> = nodes
        .iter()
        .map(|(name, port, admin, cport)| {
            let mut a = vec![
                "--node-id".to_string(),
                name.clone(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--admin".into(),
                format!("127.0.0.1:{admin}"),
                "--cluster-listen".into(),
                format!("127.0.0.1:{cport}"),
            ];
            for (peer, _, _, pport) in &nodes {
                if peer != name {
                    a.push("--peer".into());
                    a.push(format!("{peer}@127.0.0.1:{pport}"));
                }
            }
            let file = |f: String| scratch.0.join(f).display().to_string();
            a.extend([
                "--admin-token-file".to_string(),
                file("admin.token".to_string()),
                "--cluster-tls-cert".to_string(),
                file(format!("{name}.pem")),
                "--cluster-tls-key".to_string(),
                file(format!("{name}.key")),
                "--cluster-tls-ca".to_string(),
                file("ca.pem".to_string()),
                // The real mode: every acknowledged message on disk, so
                // a killed node restarted by the demo comes back with it.
                "--data-dir".to_string(),
                file(format!("data-{name}")),
            ]);
            Node {
                name: name.clone(),
                args: a,
                child: None,
                down_since: None,
            }
        })
        .collect();
    for n in &mut children {
        n.spawn();
    }
    let children = Arc::new(Mutex::new(children));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let supervisor = {
        let children = children.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let mut nodes = children.lock().unwrap_or_else(|p| p.into_inner());
                for n in nodes.iter_mut() {
                    if let Some(c) = &mut n.child {
                        if let Ok(Some(status)) = c.try_wait() {
                            println!(
                                "node {} exited ({status}); restarting it in {} s",
                                n.name,
                                RESTART_AFTER.as_secs()
                            );
                            n.child = None;
                            n.down_since = Some(std::time::Instant::now());
                        }
                    }
                    if n.down_since.is_some_and(|t| t.elapsed() >= RESTART_AFTER)
                        && !stop.load(std::sync::atomic::Ordering::Relaxed)
                    {
                        n.spawn();
                    }
                }
            }
        })
    };
    // The balancer follows the cluster's view (cluster_admin), and its
    // admin API and the nodes' take the demo's token.
    let token_file = scratch.0.join("admin.token");
    let token = std::fs::read_to_string(&token_file).unwrap_or_default();
    let q = |s: &std::path::Path| format!("{:?}", s.display().to_string());
    let mut text = format!(
        "[[listener]]\naddress = \"127.0.0.1:{}\"\n[admin]\naddress = \"127.0.0.1:{}\"\ntoken_file = {}\n[balancer]\ncluster_admin_token_file = {}\n",
        args.port,
        args.admin_port,
        q(&token_file),
        q(&token_file)
    );
    for (name, port, admin, _) in &nodes {
        text.push_str(&format!(
            "[[backend]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\ncluster_admin = \"127.0.0.1:{admin}\"\n"
        ));
    }
    let config = match mqlb_config::Config::parse("<demo>", &text) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // The balancer starts once the nodes are ready (its first probes then
    // find them up, with nothing to report), and the banner once the
    // balancer is, after the start-up lines, so it is what the terminal
    // shows last.
    println!("mqlb demo: starting 3 nodes and the balancer ...");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !nodes.iter().all(|(_, _, admin, _)| ready(*admin))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    {
        let (args, nodes, children) = (args.clone(), nodes.clone(), children.clone());
        let token = token.trim().to_string();
        // The path only: the scratch directory lives (and is removed) with
        // this function, not with the banner's thread, which ends once it
        // has printed (the nodes' TLS files, data directories and the
        // admin token were deleted under them a moment after start).
        let dir = scratch.0.clone();
        std::thread::spawn(move || {
            // The balancer's own /readyz (a backend is up): no MQTT
            // connection, which it would log as refused.
            while !ready(args.admin_port) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            // A moment for the last start-up lines to land above it.
            std::thread::sleep(Duration::from_millis(300));
            print_banner(&args, &nodes, &children, &token, &dir);
        });
    }
    let code = crate::run::run(config, None);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = supervisor.join();
    let mut nodes = children.lock().unwrap_or_else(|p| p.into_inner());
    // The whole cluster goes at once: its state is the demo's, thrown away
    // with it, so there is nothing to hand over. Every node is frozen
    // first (SIGSTOP, and waited for until it has stopped: the signal
    // lands a moment after it is sent), then killed: one killed while
    // another still ran would be seen to drop its links, a warning on the
    // way out.
    let pids: Vec<nix::unistd::Pid> = nodes
        .iter()
        .filter_map(|n| n.child.as_ref().and_then(|c| i32::try_from(c.id()).ok()))
        .map(nix::unistd::Pid::from_raw)
        .collect();
    for &pid in &pids {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP);
    }
    for &pid in &pids {
        let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WUNTRACED));
    }
    for n in nodes.iter_mut() {
        if let Some(c) = n.child.as_mut() {
            let _ = c.kill();
        }
    }
    for n in nodes.iter_mut() {
        if let Some(mut c) = n.child.take() {
            let _ = c.wait();
            // Not println!: with standard output closed it would panic
            // before the other nodes are stopped.
            let _ = writeln!(std::io::stdout(), "node {} stopped", n.name);
        }
    }
    code
}

/// Whether the admin API on `port` (a node's or the balancer's) answers
/// `/readyz` 200.
fn ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(300),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

fn print_banner(
    args: &DemoArgs,
    nodes: &[(String, u16, u16, u16)],
    children: &Mutex<Vec<Node>>,
    token: &str,
    dir: &std::path::Path,
) {
    let pids: Vec<String> = children
        .lock()
        .map(|c| {
            c.iter()
                .map(|n| {
                    format!(
                        "{}={}",
                        n.name,
                        n.child.as_ref().map_or(0, std::process::Child::id)
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let p = args.port;
    println!();
    println!("mqlb demo: the balancer in front of a 3-node mqlb cluster, on loopback");
    println!("  MQTT (through the balancer)  127.0.0.1:{p}");
    println!(
        "  balancer admin API           http://127.0.0.1:{}/backends  /metrics  (console at /)",
        args.admin_port
    );
    for (name, port, admin, _) in nodes {
        println!(
            "  node {name}: MQTT 127.0.0.1:{port}, admin http://127.0.0.1:{admin}/cluster  /metrics  (console at /)"
        );
    }
    println!("  admin token (drains, reloads; the console asks for it): {token}");
    println!("  cluster links: mutual TLS with a throw-away CA, removed at exit");
    println!(
        "  durability: \"disk\" (PUBACK once on disk), data in {}/data-n*, removed at exit",
        dir.display()
    );
    println!();
    println!("Try it (each in its own terminal):");
    println!("  mosquitto_sub -p {p} -i sub1 -c -q 1 -t 'demo/#' -v");
    println!("  mosquitto_pub -p {p} -i pub1 -q 1 -t demo/hello -m 'hello, cluster'");
    println!("  mosquitto_pub -p {} -i pub2 -t demo/direct -m 'to node n2 directly: routed to every node'", p + 2);
    println!();
    println!("The replicated state store (Azure IoT Operations protocol; RESP3 payloads):");
    println!("  mosquitto_sub -p {p} -V 5 -i ss-watch -t my/responses -v");
    println!(
        "  mosquitto_pub -p {p} -V 5 -i ss-set -q 1 -t {} -D publish response-topic my/responses \\",
        mqlb_broker::statestore::INVOKE_TOPIC
    );
    println!(
        "    -D publish correlation-data 1 -D publish user-property __ts \"$(date +%s%3N):00000:me\" \\"
    );
    println!("    -m $'*3\\r\\n$3\\r\\nSET\\r\\n$4\\r\\ntemp\\r\\n$2\\r\\n21\\r\\n'");
    println!();
    println!(
        "Watch a failover: kill a node ({}) with `kill -9 PID`;",
        pids.join(", ")
    );
    println!(
        "its clients are moved at the balancer's paced rate, and the demo restarts it after {} s.",
        RESTART_AFTER.as_secs()
    );
    println!("Ctrl-C stops everything.");
    println!();
}
