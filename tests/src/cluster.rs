//! A cluster of `mqlb broker` processes on loopback, for the cluster tests.
//!
//! Each node is its own process (so `kill -9` is real), on free ports, with
//! an admin API for `/readyz`, `/cluster` and `/metrics`, and its cluster
//! links over mutual TLS with certificates made for the test (`mqlb cert`'s
//! code), as in production.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{free_port, mqlb_bin, wait_listening, KillOnDrop};

/// A node's MQTT, admin and cluster ports.
type Ports = (u16, u16, u16);

/// Proxies by (from, to) node index.
type Links = [(usize, usize, FaultyLink)];

/// A node name as a placement node of weight 1.
struct Named(String);

impl mqlb_placement::Node for Named {
    fn name(&self) -> &str {
        &self.0
    }
    fn weight(&self) -> u32 {
        1
    }
}

/// `mqlb broker` arguments for node `name` on loopback ports (MQTT, admin,
/// cluster).
fn node_args(name: &str, (mqtt, admin, cluster): Ports) -> Vec<String> {
    vec![
        "broker".into(),
        "--listen".into(),
        format!("127.0.0.1:{mqtt}"),
        "--admin".into(),
        format!("127.0.0.1:{admin}"),
        "--node-id".into(),
        name.to_string(),
        "--cluster-listen".into(),
        format!("127.0.0.1:{cluster}"),
        "--admin-token-file".into(),
        crate::admin_token_file().display().to_string(),
    ]
}

/// One node's addresses and process.
pub struct ClusterNode {
    pub name: String,
    /// MQTT listener.
    pub addr: String,
    /// Admin API.
    pub admin: String,
    /// Cluster listener.
    pub cluster: String,
    args: Vec<String>,
    child: Option<KillOnDrop>,
}

impl ClusterNode {
    /// A node not started yet.
    fn new(name: String, (mqtt, admin, cluster): Ports, args: Vec<String>) -> ClusterNode {
        ClusterNode {
            name,
            addr: format!("127.0.0.1:{mqtt}"),
            admin: format!("127.0.0.1:{admin}"),
            cluster: format!("127.0.0.1:{cluster}"),
            args,
            child: None,
        }
    }

    /// True while its process runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.0.try_wait(), Ok(None)))
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.0.id())
    }
}

/// N nodes that know each other.
pub struct TestCluster {
    pub nodes: Vec<ClusterNode>,
    pub dir: PathBuf,
    /// With [`TestCluster::start_partitionable`]: the proxies every
    /// cluster connection goes through, by (from, to) node index.
    pub links: Vec<(usize, usize, FaultyLink)>,
}

/// A TCP proxy between two nodes' cluster ports that a test can cut (every
/// open connection closed, new ones refused) and heal.
pub struct FaultyLink {
    pub addr: String,
    cut: tokio::sync::watch::Sender<bool>,
}

impl FaultyLink {
    /// Starts a proxy to `to` on a free port.
    pub async fn start(to: String) -> FaultyLink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (cut, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    return;
                };
                if *rx.borrow() {
                    continue; // cut: refused (closed at once)
                }
                let to = to.clone();
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(&to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = rx.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        FaultyLink { addr, cut }
    }

    /// Cuts (`true`) or heals (`false`) the link.
    pub fn set_cut(&self, cut: bool) {
        let _ = self.cut.send(cut);
    }
}

impl TestCluster {
    /// Starts `n` nodes named n1..nN, each with its cluster certificate.
    /// Waits until each is listening.
    pub fn start(n: usize, extra: &[&str]) -> TestCluster {
        Self::build(n, extra, None, &|_| Vec::new())
    }

    /// Like [`TestCluster::start`], with arguments for each node from
    /// `each(i)` (its own `--config` file, say).
    pub fn start_each(n: usize, each: &dyn Fn(usize) -> Vec<String>) -> TestCluster {
        Self::build(n, &[], None, each)
    }

    /// The directory holding the cluster CA (`ca.pem`, `ca.key`) and the
    /// nodes' certificates (`n1.pem`, `n1.key`, ...).
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// `--cluster-tls-*` arguments for node `name`, making its certificate
    /// first (and the CA, the first time).
    fn tls_args(dir: &std::path::Path, name: &str) -> Vec<String> {
        let tls = dir.join("tls");
        if !tls.join("ca.pem").exists() {
            mqlb::cert::create_ca(&tls, mqlb::cert::DEFAULT_CA_NAME).unwrap();
        }
        let (cert, key) = mqlb::cert::create_node(name, &["127.0.0.1".into()], &tls, &tls).unwrap();
        vec![
            "--cluster-tls-cert".into(),
            cert.display().to_string(),
            "--cluster-tls-key".into(),
            key.display().to_string(),
            "--cluster-tls-ca".into(),
            tls.join("ca.pem").display().to_string(),
        ]
    }

    /// Like [`TestCluster::start`], with every cluster connection going
    /// through a [`FaultyLink`], so a test can partition the cluster.
    pub async fn start_partitionable(n: usize) -> TestCluster {
        let ports: Vec<Ports> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let mut links = Vec::new();
        for i in 0..n {
            for (j, (_, _, c)) in ports.iter().enumerate() {
                if i != j {
                    links.push((i, j, FaultyLink::start(format!("127.0.0.1:{c}")).await));
                }
            }
        }
        let mut c = Self::build(n, &[], Some((ports, &links)), &|_| Vec::new());
        c.links = links;
        c
    }

    /// Cuts node `k` off from every other node's cluster links (clients
    /// still reach it), or heals that.
    pub fn isolate(&self, k: usize, cut: bool) {
        for (i, j, l) in &self.links {
            if *i == k || *j == k {
                l.set_cut(cut);
            }
        }
    }

    /// Like [`TestCluster::start`], each node naming its peers by the DNS
    /// name `localhost` instead of an IP address.
    pub fn start_by_name(n: usize) -> TestCluster {
        Self::build_on(n, &[], None, &|_| Vec::new(), "localhost")
    }

    fn build(
        n: usize,
        extra: &[&str],
        via: Option<(Vec<Ports>, &Links)>,
        each: &dyn Fn(usize) -> Vec<String>,
    ) -> TestCluster {
        Self::build_on(n, extra, via, each, "127.0.0.1")
    }

    fn build_on(
        n: usize,
        extra: &[&str],
        via: Option<(Vec<Ports>, &Links)>,
        each: &dyn Fn(usize) -> Vec<String>,
        host: &str,
    ) -> TestCluster {
        let dir = crate::scratch_dir("cluster");
        let ports: Vec<Ports> = match &via {
            Some((p, _)) => p.clone(),
            None => (0..n)
                .map(|_| (free_port(), free_port(), free_port()))
                .collect(),
        };
        let mut nodes = Vec::new();
        for (i, (mqtt, admin, cluster)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let mut args = node_args(&name, (*mqtt, *admin, *cluster));
            for (j, (_, _, c)) in ports.iter().enumerate() {
                if j != i {
                    let addr = match &via {
                        Some((_, links)) => links
                            .iter()
                            .find(|(a, b, _)| *a == i && *b == j)
                            .map(|(_, _, l)| l.addr.clone())
                            .unwrap(),
                        None => format!("{host}:{c}"),
                    };
                    args.push("--peer".into());
                    args.push(format!("n{}@{addr}", j + 1));
                }
            }
            args.extend(Self::tls_args(&dir, &name));
            args.extend(extra.iter().map(|s| s.to_string()));
            args.extend(each(i));
            nodes.push(ClusterNode::new(name, (*mqtt, *admin, *cluster), args));
        }
        let mut c = TestCluster {
            nodes,
            dir,
            links: Vec::new(),
        };
        for i in 0..n {
            c.start_node(i);
        }
        c
    }

    /// Starts one more node, `n{k}`, with `--join` and the running nodes as
    /// its peers (an admin call on a member adds it); returns its index.
    pub fn start_joiner(&mut self) -> usize {
        let i = self.nodes.len();
        let name = format!("n{}", i + 1);
        let ports = (free_port(), free_port(), free_port());
        let mut args = node_args(&name, ports);
        args.extend(Self::tls_args(&self.dir, &name));
        args.push("--join".into());
        for n in &self.nodes {
            args.push("--peer".into());
            args.push(format!("{}@{}", n.name, n.cluster));
        }
        self.nodes.push(ClusterNode::new(name, ports, args));
        self.start_node(i);
        i
    }

    /// (Re)starts node `i` and waits until it listens.
    pub fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        // Appended: a restarted node's earlier life stays readable.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", node.name)))
            .unwrap();
        let child = Command::new(mqlb_bin())
            .args(&node.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        node.child = Some(KillOnDrop(child));
        assert!(
            wait_listening(&node.addr, Duration::from_secs(10)),
            "{} did not listen",
            node.name
        );
    }

    /// Stops node `i` gracefully (SIGTERM) and waits up to `within` for it
    /// to exit, then kills it.
    pub fn stop_node(&mut self, i: usize, within: Duration) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.0.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + within;
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// `kill -9` node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.0.kill();
            let _ = c.0.wait();
        }
    }

    /// Waits until every running node is ready and sees exactly the running
    /// nodes in its view.
    pub async fn wait_converged(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let running: Vec<String> = self
                .nodes
                .iter_mut()
                .filter_map(|n| n.alive().then(|| n.name.clone()))
                .collect();
            let mut ok = true;
            for n in self.nodes.iter_mut().filter(|n| running.contains(&n.name)) {
                let (status, body) = crate::try_http(&n.admin, "GET", "/cluster")
                    .await
                    .unwrap_or_default();
                let want: Vec<String> = running.iter().map(|r| format!("\"{r}\"")).collect();
                if status != 200
                    || !body.contains(&format!("\"members\":[{}]", want.join(",")))
                    || !body.contains("\"ready\":true")
                {
                    ok = false;
                }
            }
            if ok {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node names of the running nodes, for placement.
    pub fn owner_of(&self, client_id: &str, live: &[&str]) -> String {
        let nodes: Vec<Named> = live.iter().map(|s| Named(s.to_string())).collect();
        mqlb_placement::rank(client_id.as_bytes(), &nodes)[0]
            .0
            .clone()
    }

    /// The second node of `client_id`'s chain among `live`.
    pub fn chain_second(&self, client_id: &str, live: &[&str]) -> String {
        let nodes: Vec<Named> = live.iter().map(|s| Named(s.to_string())).collect();
        mqlb_placement::rank(client_id.as_bytes(), &nodes)[1]
            .0
            .clone()
    }

    /// A client ID (`prefix-k`) whose owner among `live` is `node`.
    pub fn id_owned_by(&self, node: &str, prefix: &str, live: &[&str]) -> String {
        (0..10_000)
            .map(|k| format!("{prefix}-{k}"))
            .find(|id| self.owner_of(id, live) == node)
            .unwrap()
    }

    /// A Prometheus sample's value from node `i`'s `/metrics`.
    pub async fn metric(&self, i: usize, sample: &str) -> Option<f64> {
        let (_, body) = crate::try_http(&self.nodes[i].admin, "GET", "/metrics").await?;
        // Every read checks the whole exposition, cluster families included.
        if let Err(e) = crate::exposition::parse(&body) {
            panic!("node {i}'s /metrics: {e}\n{body}");
        }
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
    }

    /// Node `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.nodes[i].name)))
            .unwrap_or_default()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.child.take();
        }
        if std::thread::panicking() || std::env::var_os("MQLB_KEEP_LOGS").is_some() {
            // Kept for the post-mortem (MQLB_KEEP_LOGS=1 keeps them always).
            eprintln!("node logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
