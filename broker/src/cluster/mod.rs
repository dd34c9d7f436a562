//! The cluster layer: broker nodes that act as one broker.
//!
//! # What is built
//! * **Links.** Every node dials every peer and keeps one authenticated
//!   TCP connection per direction ([`handshake`]); a node's outbound link
//!   carries its frames ([`wire`]), its inbound links carry its peers'.
//! * **Interest.** Each node tells its peers which filters its sessions
//!   hold (whole, when a link opens, then changes in order). A publish is
//!   forwarded once per interested node and never forwarded again, so it
//!   never loops, and one link per pair keeps each publisher's order.
//! * **Shared subscriptions** across nodes: a group's turn rotates over its
//!   local members and the peers that have members; a peer given the turn
//!   hands the message to one of its own members.
//! * **Retained messages** go to every node, each write versioned by the
//!   hybrid logical clock, last writer wins; a link that opens sends the
//!   whole set, deletion markers included, so a returning node catches up.
//! * **The view** is this node plus the peers whose links are up in both
//!   directions and heard from within [`FAILURE_TIMEOUT`]; every change
//!   bumps the view number. A client's owner is rank 0 of the rendezvous
//!   hash (the balancer's `placement` crate) of its client ID over the
//!   view's node names.
//! * **One session per client ID.** A client that reaches a node that does
//!   not serve its session is relayed (`links`) to the node that does:
//!   the live holder of the session if this node keeps a replica of it,
//!   else its owner. Chosen over a takeover: a session never moves while
//!   its holder lives, so no handover window can lose messages, and the
//!   balancer's placement agrees with the cluster's when the backend names
//!   are the node IDs.
//! * **Session replication** (`replication`): each persistent session's
//!   change records stream to the other members of its chain (R copies,
//!   `replication_factor`, default 2); the
//!   acknowledgements of a batch wait until it has applied them, and a
//!   QoS 1/2 publish forwarded to a peer waits for that peer's commit. When
//!   a holder dies, the next node of the chain promotes its replica with a
//!   new epoch (a stale writer's changes are refused, its messages
//!   adopted); publishes for the dead node's sessions are held until then.
//! * **Majority.** A node whose view holds less than a majority of the
//!   configured members steps down: clients closed (v5: 0x8B), new ones
//!   refused (0x88), sessions turned into replica copies, so the majority
//!   side's copies win when the partition heals.
//! * **Readiness.** A node is ready once it has a majority and every live
//!   peer has sent it its snapshot (interest, retained messages, the
//!   sessions whose chain holds it), or has been unreachable for longer
//!   than [`FAILURE_TIMEOUT`] since start.
//!
//! # Not built yet
//! The Raft-committed view: the view here is each node's own observation
//! (guarded by the majority rule), so two nodes can briefly disagree on an
//! owner while a link flaps; membership is the configured list, with no
//! add or remove by admin call.

pub mod handshake;
mod links;
mod replication;
pub mod wire;

pub use links::relay;
use links::LinkTx;
use replication::{whole, Waiting};

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use mqlb_config::broker::ClusterConfig;

use crate::conn::Settings;
use crate::effects::{ChangeLog, ChangeRecord, Committed};
use crate::fabric::Fabric;
use crate::hlc::Hlc;
use crate::message::Message;
use crate::router::NodeId;
use crate::session::{Session, SessionChange};
use crate::state::State;
use handshake::{Purpose, Refusal};
use wire::Frame;

/// A peer not heard from for this long leaves the view. Links send a ping
/// every [`PING_EVERY`] when idle.
pub const FAILURE_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle links ping this often.
pub const PING_EVERY: Duration = Duration::from_millis(500);
/// Frames buffered for one peer beyond which new ones are dropped (and
/// counted): a stalled peer must not grow this node without bound.
pub const LINK_BUFFER: usize = 64 << 20;

/// Lock that survives a panic elsewhere (the data stays consistent between
/// calls).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The current view: who is in, and its number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// Bumped at every change of `members`.
    pub number: u64,
    /// Live node names, this one included, sorted.
    pub members: Vec<String>,
}

/// What this node knows about one peer.
#[derive(Debug, Default, Clone)]
struct Peer {
    /// Last frame from it on its inbound link.
    heard: Option<Instant>,
    /// Which inbound link is current (a newer one replaces an older).
    generation: u64,
    /// Its snapshot arrived on the current inbound link.
    synced: bool,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Cluster connections refused, by [`Refusal`] (garbage, bad secret,
    /// unknown node, timeout).
    pub refused: [AtomicU64; 4],
    /// Publishes forwarded to peers.
    pub forwarded: AtomicU64,
    /// Publishes received from peers.
    pub received: AtomicU64,
    /// Frames dropped: no link to the peer, or its buffer was full.
    pub dropped: AtomicU64,
    /// Client connections proxied to their owner.
    pub proxied: AtomicU64,
    /// Publishes held for a lost peer's sessions and forwarded again to
    /// whoever took them over.
    pub held: AtomicU64,
}

/// One node's membership in the cluster; the core's [`Fabric`].
#[derive(Debug)]
pub struct Cluster {
    me: String,
    my_id: NodeId,
    /// Node names by id (sorted; ids are positions).
    names: Vec<String>,
    addrs: Vec<SocketAddr>,
    secret: Vec<u8>,
    /// Copies of each persistent session: its holder plus this many − 1
    /// chain members (the top ranks of the client ID over the view).
    replication: usize,
    links: Mutex<HashMap<NodeId, Arc<LinkTx>>>,
    peers: Mutex<Vec<Peer>>,
    view: Mutex<View>,
    started: Instant,
    /// Copies of sessions this node is a chain member for but does not
    /// serve, rebuilt from the holder's change records.
    replicas: Mutex<HashMap<String, Session>>,
    /// For each replica, the messages its changes carried lately (see
    /// [`SeenLog`]).
    replica_seen: Mutex<HashMap<String, SeenLog>>,
    /// For each replica, the node whose changes built it: the node that
    /// holds the live session. While it lives, clients of that session are
    /// relayed to it rather than taking the session over, so a session
    /// never moves under a live holder (no handover window to lose
    /// messages in); it moves when its holder dies.
    holders: Mutex<HashMap<String, NodeId>>,
    /// Appends waiting for chain members' acknowledgements.
    waiting: Mutex<HashMap<u64, Waiting>>,
    seq: AtomicU64,
    /// Counters.
    pub stats: ClusterStats,
    /// The node's state and this cluster itself, for tasks spawned from
    /// `&self` (weak: the state owns the cluster).
    state: std::sync::OnceLock<std::sync::Weak<State>>,
    state_owner: std::sync::OnceLock<std::sync::Weak<Cluster>>,
}

/// How long a lost peer's interest is kept, so publishes for its sessions
/// are held for whoever takes them over rather than matching nobody.
pub const INTEREST_HOLD: Duration = Duration::from_secs(6);

/// How long a replica remembers the messages its changes carried: longer
/// than a dead holder's held publishes wait before they are routed again.
const SEEN_FOR: Duration = Duration::from_secs(20);

/// Fingerprints of the messages a replica's changes carried in the last
/// [`SEEN_FOR`], delivered and acknowledged since or not. When the replica
/// is promoted, a publish held for the dead holder and routed again is not
/// given to the session a second time if the holder had already put it in
/// (a QoS 2 message must arrive once).
#[derive(Debug, Default)]
pub(crate) struct SeenLog {
    order: std::collections::VecDeque<(Instant, u64)>,
    set: std::collections::HashSet<u64>,
}

impl SeenLog {
    fn insert(&mut self, now: Instant, print: u64) {
        while let Some(&(t, p)) = self.order.front() {
            if now.duration_since(t) < SEEN_FOR {
                break;
            }
            self.order.pop_front();
            self.set.remove(&p);
        }
        if self.set.insert(print) {
            self.order.push_back((now, print));
        }
    }
}

/// A name is a placement node of weight 1.
struct Member<'a>(&'a str);

impl mqlb_placement::Node for Member<'_> {
    fn name(&self) -> &str {
        self.0
    }
    fn weight(&self) -> u32 {
        1
    }
}

impl Cluster {
    /// Checks the configuration, reads the secret and binds the cluster
    /// listener.
    pub async fn bind(config: &ClusterConfig) -> io::Result<(Arc<Cluster>, TcpListener)> {
        config
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let secret = match &config.secret_file {
            Some(p) => {
                let s = std::fs::read(p).map_err(|e| {
                    io::Error::new(e.kind(), format!("cluster secret {}: {e}", p.display()))
                })?;
                let s = s.trim_ascii().to_vec();
                if s.len() < 16 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("cluster secret {}: shorter than 16 bytes", p.display()),
                    ));
                }
                s
            }
            None => Vec::new(),
        };
        let mut all: Vec<(String, SocketAddr)> = config.peers.clone();
        all.push((config.node_id.clone(), config.listen));
        all.sort();
        let listener = TcpListener::bind(config.listen).await?;
        let names: Vec<String> = all.iter().map(|(n, _)| n.clone()).collect();
        let my_id = names
            .iter()
            .position(|n| *n == config.node_id)
            .and_then(|i| NodeId::try_from(i).ok())
            .unwrap_or(0);
        Ok((
            Arc::new(Cluster {
                me: config.node_id.clone(),
                my_id,
                addrs: all.iter().map(|(_, a)| *a).collect(),
                peers: Mutex::new(vec![Peer::default(); names.len()]),
                view: Mutex::new(View {
                    number: 1,
                    members: vec![config.node_id.clone()],
                }),
                names,
                secret,
                replication: config.replication_factor.max(1),
                links: Mutex::new(HashMap::new()),
                replicas: Mutex::new(HashMap::new()),
                replica_seen: Mutex::new(HashMap::new()),
                holders: Mutex::new(HashMap::new()),
                waiting: Mutex::new(HashMap::new()),
                seq: AtomicU64::new(1),
                started: Instant::now(),
                stats: ClusterStats::default(),
                state: std::sync::OnceLock::new(),
                state_owner: std::sync::OnceLock::new(),
            }),
            listener,
        ))
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// A stamp for this node's hybrid logical clock: a hash of its name, so
    /// ties break the same way everywhere.
    pub fn stamp(&self) -> u32 {
        (mqlb_placement::node_hash(&self.me, b"hlc") >> 32) as u32
    }

    /// The current view.
    pub fn view(&self) -> View {
        lock(&self.view).clone()
    }

    /// The name of `client_id`'s owner in the current view.
    pub fn owner(&self, client_id: &str) -> String {
        let view = lock(&self.view);
        let members: Vec<Member<'_>> = view.members.iter().map(|n| Member(n)).collect();
        mqlb_placement::pick(client_id.as_bytes(), &members, |_| true)
            .map_or_else(|| self.me.clone(), |m| m.0.to_string())
    }

    /// `client_id`'s chain in the current view: owner first.
    pub fn chain(&self, client_id: &str) -> Vec<String> {
        let view = lock(&self.view);
        let members: Vec<Member<'_>> = view.members.iter().map(|n| Member(n)).collect();
        mqlb_placement::rank(client_id.as_bytes(), &members)
            .into_iter()
            .take(self.replication)
            .map(|m| m.0.to_string())
            .collect()
    }

    /// Session copies held for other nodes.
    pub fn replica_count(&self) -> usize {
        lock(&self.replicas).len()
    }

    /// Members a view needs to serve: a majority of the configured
    /// cluster, so two sides of a partition never both serve.
    pub fn quorum(&self) -> usize {
        self.names.len() / 2 + 1
    }

    /// Whether the current view holds a majority.
    pub fn has_quorum(&self) -> bool {
        self.view().members.len() >= self.quorum()
    }

    /// On a graceful stop, after the clients are gone: waits (at most
    /// `within`) until every session change sent down a chain has been
    /// acknowledged and every link has written what it holds, so the
    /// copies on the other nodes are complete when this node exits rather
    /// than the change in flight being re-made after the failure timeout.
    pub async fn settle(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let pending = !lock(&self.waiting).is_empty()
                || lock(&self.links).values().any(|t| !lock(&t.buf).is_empty());
            if !pending || tokio::time::Instant::now() >= deadline {
                if pending {
                    tracing::warn!("stopping with session changes not yet acknowledged by peers");
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether this node has what it needs to take clients: a majority in
    /// its view, and the snapshot of every live peer or proof that a peer
    /// is down.
    pub fn ready(&self) -> bool {
        if !self.has_quorum() {
            return false;
        }
        let now = Instant::now();
        let warm = now.duration_since(self.started) > FAILURE_TIMEOUT;
        lock(&self.peers).iter().enumerate().all(|(i, p)| {
            i == self.my_id as usize
                || p.synced
                || (warm
                    && p.heard
                        .is_none_or(|h| now.duration_since(h) > FAILURE_TIMEOUT))
        })
    }

    /// A member's id by name.
    pub fn node_id(&self, name: &str) -> Option<NodeId> {
        self.id_of(name)
    }

    fn id_of(&self, name: &str) -> Option<NodeId> {
        self.names
            .iter()
            .position(|n| n == name)
            .and_then(|i| NodeId::try_from(i).ok())
    }

    /// Runs the cluster until `stop`: accepts peers and proxied clients on
    /// `listener`, keeps a link to every peer, and maintains the view.
    pub fn start(
        self: &Arc<Self>,
        listener: TcpListener,
        state: Arc<State>,
        settings: Settings,
        stop: CancellationToken,
    ) {
        let _ = self.state.set(Arc::downgrade(&state));
        let _ = self.state_owner.set(Arc::downgrade(self));
        let me = self.clone();
        let st = state.clone();
        let s = stop.clone();
        tokio::spawn(async move { me.accept_loop(listener, st, settings, s).await });
        for id in 0..self.names.len() {
            let Ok(id) = NodeId::try_from(id) else {
                continue;
            };
            if id == self.my_id {
                continue;
            }
            let me = self.clone();
            let st = state.clone();
            let s = stop.clone();
            let span = tracing::info_span!("link", peer = %self.names[id as usize]);
            tokio::spawn(async move { me.dial_loop(id, st, s).await }.instrument(span));
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = tick.tick() => me.update_view_and_rechain(&state),
                    _ = stop.cancelled() => return,
                }
            }
        });
    }

    /// Recomputes the live set; a change bumps the view number, releases
    /// waits on members that left, and re-chains sessions.
    fn update_view_and_rechain(&self, state: &Arc<State>) {
        let before = self.view();
        self.update_view();
        let view = self.view();
        let quorum = self.quorum();
        if before.members.len() >= quorum && view.members.len() < quorum {
            self.step_down(state);
        }
        self.promote_owned(state);
        // Every tick, not only on a change: a forward can be queued for a
        // peer after the view dropped it (its outbound link not yet seen
        // failing), and must not wait for it forever.
        let gone: Vec<NodeId> = (0..self.names.len())
            .filter(|&i| !view.members.contains(&self.names[i]))
            .filter_map(|i| NodeId::try_from(i).ok())
            .collect();
        self.release_waits(&gone);
        if view.number != before.number {
            self.rechain(state);
        }
    }

    /// Recomputes the live set; a change bumps the view number.
    fn update_view(&self) {
        let now = Instant::now();
        let mut members = vec![self.me.clone()];
        {
            let links = lock(&self.links);
            let peers = lock(&self.peers);
            for (i, p) in peers.iter().enumerate() {
                let Ok(id) = NodeId::try_from(i) else {
                    continue;
                };
                let heard = p
                    .heard
                    .is_some_and(|h| now.duration_since(h) <= FAILURE_TIMEOUT);
                if id != self.my_id && heard && links.contains_key(&id) {
                    members.push(self.names[i].clone());
                }
            }
        }
        members.sort();
        let mut view = lock(&self.view);
        if view.members != members {
            view.number += 1;
            view.members = members;
            tracing::info!(view = view.number, members = ?view.members, "view changed");
        }
    }

    /// Prometheus lines for the cluster.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let view = self.view();
        let _ = writeln!(out, "# HELP mqlb_cluster_view Current view number.\n# TYPE mqlb_cluster_view gauge\nmqlb_cluster_view {}", view.number);
        let _ = writeln!(out, "# HELP mqlb_cluster_members Live members in the view, this node included.\n# TYPE mqlb_cluster_members gauge\nmqlb_cluster_members {}", view.members.len());
        let _ = writeln!(out, "# HELP mqlb_cluster_ready Whether this node has synced from every live peer.\n# TYPE mqlb_cluster_ready gauge\nmqlb_cluster_ready {}", u8::from(self.ready()));
        let _ = writeln!(out, "# HELP mqlb_cluster_replicas Session copies held for chain members.\n# TYPE mqlb_cluster_replicas gauge\nmqlb_cluster_replicas {}", self.replica_count());
        let _ = writeln!(out, "# HELP mqlb_cluster_refused_total Cluster connections refused.\n# TYPE mqlb_cluster_refused_total counter");
        for (i, label) in ["garbage", "bad_secret", "unknown_node", "timeout"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                out,
                "mqlb_cluster_refused_total{{reason=\"{label}\"}} {}",
                self.stats.refused[i].load(Ordering::Relaxed)
            );
        }
        for (name, help, v) in [
            (
                "mqlb_cluster_forwarded_total",
                "Publishes forwarded to peers.",
                &self.stats.forwarded,
            ),
            (
                "mqlb_cluster_received_total",
                "Publishes received from peers.",
                &self.stats.received,
            ),
            (
                "mqlb_cluster_dropped_total",
                "Frames for peers dropped (no link, or its buffer full).",
                &self.stats.dropped,
            ),
            (
                "mqlb_cluster_proxied_total",
                "Client connections proxied to their owner.",
                &self.stats.proxied,
            ),
            (
                "mqlb_cluster_held_total",
                "Publishes held for a lost peer's sessions, then forwarded to whoever took them over.",
                &self.stats.held,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

impl Fabric for Cluster {
    fn linked(&self, node: NodeId) -> bool {
        let name = self.names.get(node as usize);
        lock(&self.links).contains_key(&node)
            && name.is_some_and(|n| lock(&self.view).members.contains(n))
    }

    fn hold(
        &self,
        m: Message,
        groups: Vec<Arc<str>>,
        exclude: Vec<NodeId>,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.hold_for_takeover(m, groups, exclude, done);
        Some(wait)
    }

    fn interest(&self, filter: &str, gained: bool) {
        self.broadcast(&Frame::Interest {
            filter: filter.to_string(),
            gained,
        });
    }

    fn retained(&self, topic: &str, message: Option<&Message>, version: Hlc) {
        self.broadcast(&Frame::Retained {
            topic: topic.to_string(),
            message: message.cloned(),
            version,
        });
    }

    fn forward(
        &self,
        node: NodeId,
        m: &Message,
        groups: &[Arc<str>],
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let Some(tx) = lock(&self.links).get(&node).cloned() else {
            // The peer is gone but its interest is still held: its sessions
            // are being taken over. QoS 0 is dropped, as in flight.
            if m.qos == mqlb_protocol::QoS::AtMostOnce {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            let (done, wait) = tokio::sync::oneshot::channel();
            self.hold_for_takeover(m.clone(), groups.to_vec(), Vec::new(), done);
            return Some(wait);
        };
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let mut seq = 0;
        let mut rx = None;
        if m.qos != mqlb_protocol::QoS::AtMostOnce {
            seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let (done, wait) = tokio::sync::oneshot::channel();
            lock(&self.waiting).insert(
                seq,
                Waiting {
                    per_node: HashMap::from([(node, 1)]),
                    tx: Some(done),
                    resend: Some((m.clone(), groups.to_vec())),
                },
            );
            rx = Some(wait);
        }
        tx.push(
            &Frame::Forward {
                seq,
                message: m.clone(),
                groups: groups.to_vec(),
            },
            &self.stats.dropped,
        );
        rx
    }
}
