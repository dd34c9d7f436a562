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
//! * **The view** (members, live set, number) is committed through Raft
//!   (`consensus`, raft-rs). Every node reports whom it hears (links up
//!   both ways, heard within [`FAILURE_TIMEOUT`]); the leader proposes as
//!   live the members a majority hears, and every node computes placement
//!   over the committed view. A client's owner is rank 0 of the rendezvous
//!   hash (the balancer's `placement` crate) of its client ID over the
//!   view's live names.
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
//! * **Majority.** A node that hears from less than a majority of the
//!   members, or that the committed view leaves out, steps down: clients
//!   closed (v5: 0x8B), new ones refused (0x88), QoS 1/2 publishes not
//!   acknowledged, forwards refused ([`wire::Frame::Refused`]), sessions
//!   turned into replica copies, so the majority side's copies win when the
//!   partition heals. Its interest stays at its peers until it serves
//!   again, so what they publish for its sessions is held, not dropped.
//! * **Graceful stop** ([`Cluster::leave`]): leadership handed over,
//!   clients closed, chain acknowledgements awaited, step down, then a
//!   view without this node is committed and its sessions' next chain
//!   nodes promote their copies.
//! * **Readiness.** A node is ready once it has a majority, the committed
//!   view counts it in, and every peer that view counts live has sent it
//!   its snapshot (interest, retained messages, the sessions whose chain
//!   holds it).
//! * **The state store** (`store`): keys placed like client IDs and
//!   chain-replicated; the owner answers once the chain holds the change.
//! * **Membership** starts as the configured list and changes through the
//!   Raft log: [`Cluster::add_member`] (`POST /cluster/members/{name}@{addr}`,
//!   for a node started with `--join`) and [`Cluster::remove_member`]
//!   (`POST /cluster/members/{name}/remove`). Each node keeps a directory of
//!   the members it knows (ids are local positions, never reused) and learns
//!   new ones from the committed membership.
//! * **Raft state** is persisted with a state directory (see `consensus`).

pub mod acks;
pub mod consensus;
pub mod departures;
pub mod forwards;
pub mod handover;
pub mod handshake;
mod links;
pub mod opening;
pub mod peer_tls;
mod peers;
mod replication;
pub mod seen;
mod store;
pub mod store_steps;
pub mod tick;
pub mod view_loop;
pub mod wire;

use crate::held::{self, Held, HeldAs, HeldQueue, Release};
pub use links::relay;
use links::LinkTx;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use mqlb_config::broker::{ClusterConfig, PeerAddr};

use crate::effects::{ChangeLog, ChangeRecord, Committed, LogEntry};
use crate::fabric::Fabric;
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

/// Node `name`'s stamp for its hybrid logical clock (see
/// [`Cluster::stamp`]).
fn stamp_of(name: &str) -> u32 {
    (mqlb_placement::node_hash(name, b"hlc") >> 32) as u32
}

/// The members this node knows of: names and cluster addresses by
/// [`NodeId`]. Ids are positions, local to this node and never reused; a
/// member added to a running cluster gets the next one.
#[derive(Debug, Default)]
struct Directory {
    names: Vec<String>,
    addrs: Vec<PeerAddr>,
}

/// Serves a client that a peer relayed here because this node holds its
/// session (the connection's code: `conn::handle_owned`), with the peer it
/// came through and the identity that peer verified from the client's
/// certificate. Given to [`Cluster::start`], so the cluster does not depend
/// on the connections that depend on it.
pub type ServeRelayed = Arc<
    dyn Fn(
            handshake::PeerStream,
            NodeId,
            Option<(mqlb_config::IdentityAs, String)>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// How this node's links to one peer stand (see [`Cluster::peer_links`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Both directions: this node's link to it is open and its own link
    /// carried a frame within the failure timeout.
    Up,
    /// This node's link to it is open, but nothing heard from it lately.
    OutboundOnly,
    /// It is heard from, but this node's link to it is not open.
    InboundOnly,
    /// Neither.
    Down,
    /// It said it is stopping.
    Leaving,
}

impl LinkState {
    /// As the admin API and the console show it.
    pub fn label(self) -> &'static str {
        match self {
            LinkState::Up => "up",
            LinkState::OutboundOnly => "outbound only",
            LinkState::InboundOnly => "inbound only",
            LinkState::Down => "down",
            LinkState::Leaving => "leaving",
        }
    }
}

/// One peer's links, as this node sees them.
#[derive(Debug, Clone)]
pub struct PeerLink {
    /// The peer's name.
    pub peer: String,
    /// Both directions at once.
    pub state: LinkState,
    /// Since its last frame on its inbound link; `None`: never heard.
    pub heard_ago: Option<Duration>,
    /// Its snapshot arrived on the current inbound link.
    pub synced: bool,
    /// Bytes queued for it on this node's outbound link.
    pub buffered: usize,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Cluster connections refused, by [`Refusal`] (in
    /// [`Refusal::ALL`]'s order).
    pub refused: [AtomicU64; Refusal::ALL.len()],
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
    /// State store requests passed on to their key's owner.
    pub store_passed: AtomicU64,
    /// Times a state store change waited for a chain member that had no
    /// link, or lost it before it answered (`store_replicate`).
    pub store_owed: AtomicU64,
    /// CONNECTs held because the client's session was moving (its holder
    /// had just died).
    pub held_connects: AtomicU64,
    /// CONNECTs refused because the session was still moving after
    /// [`TAKEOVER_WITHIN`].
    pub moving_refused: AtomicU64,
}

/// One node's membership in the cluster; the core's [`Fabric`].
#[derive(Debug)]
pub struct Cluster {
    me: String,
    my_id: NodeId,
    /// The members this node knows of, by id.
    directory: std::sync::RwLock<Directory>,
    /// Cancelled when the cluster stops (for links to members added later).
    stop: std::sync::OnceLock<CancellationToken>,
    /// Mutual TLS for every cluster connection; `None` only on a loopback
    /// cluster listener.
    tls: Option<Arc<peer_tls::PeerTls>>,
    /// Copies of each persistent session: its holder plus this many − 1
    /// chain members (the top ranks of the client ID over the view).
    replication: usize,
    /// How far ahead of this node's clock a peer's stamp may be.
    max_clock_drift: Duration,
    links: Mutex<HashMap<NodeId, Arc<LinkTx>>>,
    /// The failure detector's table (see [`peers`]).
    peers: Mutex<peers::Peers>,
    /// The committed view (see [`consensus`]).
    /// Shared, so a hot path reads it without copying its names.
    view: Mutex<Arc<View>>,
    /// The Raft state is kept in a data directory (`off_worker`).
    raft_on_disk: bool,
    /// This node's member of the Raft group that commits the view.
    consensus: Mutex<consensus::Consensus>,
    /// This node plus the peers it hears from: what it proposes as the
    /// live set when it leads, and what the majority rule counts.
    observed: Mutex<Vec<String>>,
    /// What the view loop carries from tick to tick, each peer's report
    /// of whom it hears included (see [`view_loop`]).
    view_loop: Mutex<view_loop::ViewLoop>,
    /// Whether this node serves sessions, as of the last tick (see
    /// [`Cluster::serving`]); read on every QoS 1/2 publish.
    serving_now: std::sync::atomic::AtomicBool,
    /// This node is stopping gracefully (see [`Cluster::leave`]).
    leaving: std::sync::atomic::AtomicBool,
    /// This node has had the snapshot of every live peer since it last
    /// began serving (see [`Cluster::ready`]); cleared when it steps down,
    /// since its sessions then become copies that a healed partition
    /// replaces.
    synced_once: std::sync::atomic::AtomicBool,
    /// When this node started: its failure detector says nothing about a
    /// peer before [`FAILURE_TIMEOUT`] has passed.
    started: Instant,
    /// ... and has handed its sessions over, so peers may drop it from the
    /// view: [`Frame::Leaving`] goes out every tick from then on.
    announced: std::sync::atomic::AtomicBool,
    /// Copies of sessions this node is a chain member for but does not
    /// serve, rebuilt from the holder's change records, and their holders
    /// (see [`replicas`]).
    replicas: Mutex<crate::replicas::Replicas>,
    /// Linked peers the committed view does not count (returning nodes),
    /// by name: they are sent the changes of the sessions their link
    /// snapshot held (`chain::targets`). Kept with the reachable peers.
    joining: Mutex<Vec<String>>,
    /// For each session served or copied here, the messages it was given
    /// lately (see [`seen`]).
    replica_seen: Mutex<seen::Seen>,
    /// Appends waiting for chain members' acknowledgements.
    waiting: Mutex<crate::commits::Commits<tokio::sync::oneshot::Sender<()>>>,
    /// Answers for peers whose link from this node is not open yet (see
    /// [`Cluster::answer`]).
    early_answers: Mutex<HashMap<NodeId, Vec<Frame>>>,
    /// State store changes and passed-on requests waiting for peers.
    store_waits: Mutex<acks::Acks<tokio::sync::oneshot::Sender<acks::Answer>>>,
    /// The newest view each peer said it sent its key copies for (see
    /// `store`).
    store_synced: Mutex<HashMap<NodeId, u64>>,
    /// Who has promoted the copies it owns, per view: this node's word
    /// and each peer's ([`Frame::Promoted`], on its current link).
    promotions: Mutex<crate::promotions::Promotions>,
    /// Held for the whole of a copy's promotion (`replication::promote`).
    promoting: Mutex<()>,
    /// Publishes held for a takeover, in the order they were held
    /// (`replication::hold_publish`).
    held: Mutex<HeldQueue<tokio::sync::oneshot::Sender<()>>>,
    /// Whether the task that routes held publishes again runs.
    releasing: std::sync::atomic::AtomicBool,
    /// Lost peers whose interest this node has forgotten (their sessions
    /// moved); cleared when a peer links up again.
    forgotten: Mutex<std::collections::HashSet<NodeId>>,
    seq: AtomicU64,
    /// The last batch of the ordered log whose interest entries the last
    /// whole re-send of this node's interest covered (see
    /// `resend_interest`).
    interest_covers: AtomicU64,
    /// Counters.
    pub stats: ClusterStats,
    /// The node's state and this cluster itself, for tasks spawned from
    /// `&self` (weak: the state's core holds this cluster as its fabric).
    state: std::sync::OnceLock<std::sync::Weak<State>>,
    state_owner: std::sync::OnceLock<std::sync::Weak<Cluster>>,
}

/// The longest a session takes to move off a dead holder: the failure
/// detector's timeout, an election, the view change and the promotion.
/// Clients of a moving session and publishes for it are held this long at
/// most.
pub const TAKEOVER_WITHIN: Duration = Duration::from_secs(6);

/// A held publish routed again to whoever is interested by then.
const AGAIN: HeldAs = HeldAs::Again {
    exclude: Vec::new(),
    refused: false,
};

/// How often the view loop runs.
pub const TICK: Duration = consensus::TICK;

/// Runs `f`, which may block on an fsync when `fsyncs` (the Raft state is
/// persisted before the messages that depend on it leave), so that the
/// async worker's other tasks move to another worker meanwhile. Without a
/// data directory, or on a current-thread runtime (tests) or outside one,
/// it simply runs: handing the worker over costs a thread wake-up each
/// time, some 20 a second (found with `strace -c` on a node under load).
fn off_worker<R>(fsyncs: bool, f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) if fsyncs => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// How long an admin call to retire a member keeps proposing it.
pub const RETIRE_FOR: Duration = Duration::from_secs(30);

/// How long a lost peer's interest is kept, so publishes for its sessions
/// are held for whoever takes them over rather than matching nobody.
pub const INTEREST_HOLD: Duration = Duration::from_secs(6);

/// The most answers kept for one peer whose link is not open yet; past
/// it they are dropped (and counted).
const MAX_EARLY_ANSWERS: usize = 1 << 16;

/// Where an answer to a peer's frame goes: the peer, as it was connected
/// when it sent the frame. An answer is never given to a later connection
/// from it (it may be a new process, whose sequence numbers start again).
#[derive(Debug, Clone, Copy)]
pub(super) struct ReplyTo {
    pub(super) id: NodeId,
    pub(super) generation: u64,
}

/// What the view loop carries from one tick to the next.
struct Ticker {
    /// What the last tick acted on (the order of a tick's steps).
    tick: tick::Tick,
    /// The committed view at the last tick.
    last: View,
    /// The observation last sent to peers.
    reported: Vec<String>,
    ticks: u64,
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
    /// Runs `f` on peer `id`'s link state under the lock; `None` for an
    /// ID this node does not know.
    fn with_peer<R>(&self, id: NodeId, f: impl FnOnce(&mut peers::Peer) -> R) -> Option<R> {
        lock(&self.peers).with(id, f)
    }

    /// Checks the configuration, reads the TLS files and binds the cluster
    /// listener.
    pub async fn bind(config: &ClusterConfig) -> io::Result<(Arc<Cluster>, TcpListener)> {
        config
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = match &config.tls {
            Some(t) => Some(Arc::new(peer_tls::PeerTls::load(
                &config.node_id,
                peer_tls::Paths {
                    cert: t.cert.clone(),
                    key: t.key.clone(),
                    ca: t.ca.clone(),
                },
            )?)),
            None => {
                tracing::warn!(
                    listen = %config.listen,
                    "cluster links are not authenticated (no cluster TLS): any process on this host can join the cluster; `mqlb cert` makes the certificates"
                );
                None
            }
        };
        let mut all: Vec<(String, PeerAddr)> = config.peers.clone();
        all.push((config.node_id.clone(), config.listen.into()));
        all.sort();
        let listener = TcpListener::bind(config.listen).await?;
        let names: Vec<String> = all.iter().map(|(n, _)| n.clone()).collect();
        let my_id = names
            .iter()
            .position(|n| *n == config.node_id)
            .and_then(|i| NodeId::try_from(i).ok())
            .unwrap_or(0);
        // A node joining a running cluster is not a founding member: its
        // Raft node starts empty and the leader catches it up once an
        // admin call has added it.
        let founders: Vec<(String, PeerAddr)> = if config.join {
            config.peers.clone()
        } else {
            all.clone()
        };
        let state_file = match &config.state_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    io::Error::new(e.kind(), format!("state directory {}: {e}", dir.display()))
                })?;
                let file = dir.join(format!("raft-{}.state", config.node_id));
                if config.repair {
                    consensus::Consensus::repair_state_file(&file);
                }
                Some(file)
            }
            None => None,
        };
        let consensus = consensus::Consensus::with_state(
            &config.node_id,
            &founders,
            state_file.as_deref(),
            config.seed.unwrap_or_else(|| fastrand::u64(..)),
        )
        .map_err(|e| io::Error::other(format!("raft: {e}")))?;
        // A node restarted from its state file starts from the view it had
        // committed (a later one comes from the leader).
        let saved = consensus.view();
        let restored = if saved.number > 0 {
            View {
                number: saved.number,
                members: saved.live,
            }
        } else {
            View {
                number: 0,
                members: vec![config.node_id.clone()],
            }
        };
        Ok((
            Arc::new(Cluster {
                me: config.node_id.clone(),
                my_id,
                peers: Mutex::new(peers::Peers::new(names.len())),
                view: Mutex::new(Arc::new(restored)),
                raft_on_disk: consensus.persists(),
                consensus: Mutex::new(consensus),
                observed: Mutex::new(vec![config.node_id.clone()]),
                view_loop: Mutex::new(view_loop::ViewLoop::new()),
                leaving: std::sync::atomic::AtomicBool::new(false),
                synced_once: std::sync::atomic::AtomicBool::new(false),
                started: Instant::now(),
                announced: std::sync::atomic::AtomicBool::new(false),
                serving_now: std::sync::atomic::AtomicBool::new(true),
                directory: std::sync::RwLock::new(Directory {
                    names,
                    addrs: all.iter().map(|(_, a)| a.clone()).collect(),
                }),
                stop: std::sync::OnceLock::new(),
                tls,
                replication: config.replication_factor.max(1),
                max_clock_drift: config.max_clock_drift,
                links: Mutex::new(HashMap::new()),
                replicas: Mutex::default(),
                joining: Mutex::default(),
                replica_seen: Mutex::default(),
                early_answers: Mutex::new(HashMap::new()),
                waiting: Mutex::default(),
                store_waits: Mutex::default(),
                store_synced: Mutex::new(HashMap::new()),
                promotions: Mutex::default(),
                promoting: Mutex::new(()),
                held: Mutex::default(),
                releasing: std::sync::atomic::AtomicBool::new(false),
                forgotten: Mutex::new(std::collections::HashSet::new()),
                seq: AtomicU64::new(1),
                interest_covers: AtomicU64::new(0),
                stats: ClusterStats::default(),
                state: std::sync::OnceLock::new(),
                state_owner: std::sync::OnceLock::new(),
            }),
            listener,
        ))
    }

    /// How far ahead of this node's clock a peer's retained-message stamp
    /// may be (`[cluster] max_clock_drift`).
    pub fn max_clock_drift(&self) -> Duration {
        self.max_clock_drift
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// A stamp for this node's hybrid logical clock: a hash of its name, so
    /// ties break the same way everywhere.
    pub fn stamp(&self) -> u32 {
        stamp_of(&self.me)
    }

    /// The committed view (number 0 and this node alone until the first
    /// one is learnt).
    pub fn view(&self) -> View {
        View::clone(&lock(&self.view))
    }

    /// The current view, shared: no copy of its names (a change to send
    /// down its chains reads it for every batch).
    fn current_view(&self) -> Arc<View> {
        Arc::clone(&lock(&self.view))
    }

    /// The committed membership: every member, live or not.
    pub fn membership(&self) -> Vec<String> {
        lock(&self.consensus).view().members.into_keys().collect()
    }

    /// The committed membership, or every configured member before one is
    /// known.
    fn membership_or_known(&self) -> Vec<String> {
        let members = self.membership();
        if members.is_empty() {
            self.names()
        } else {
            members
        }
    }

    /// The Raft leader, if this node knows one.
    pub fn leader(&self) -> Option<String> {
        lock(&self.consensus).leader()
    }

    /// Why this node's Raft state could not be persisted, once it could
    /// not: it takes no further part, and the process should stop.
    pub fn persist_failed(&self) -> Option<String> {
        lock(&self.consensus).failed().map(str::to_string)
    }

    /// The Raft term this node is in: it rises with each election, so an
    /// operator who sees it climb knows the cluster keeps re-electing.
    pub fn term(&self) -> u64 {
        lock(&self.consensus).term()
    }

    /// The state of this node's links to each other member, for the
    /// admin API and the console (one lock at a time, as `observe`).
    pub fn peer_links(&self) -> Vec<PeerLink> {
        let now = Instant::now();
        let names = self.names();
        let outbound: HashMap<NodeId, usize> = lock(&self.links)
            .iter()
            .map(|(id, tx)| (*id, lock(&tx.buf).len()))
            .collect();
        let peers = &lock(&self.peers);
        names
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let id = NodeId::try_from(i).ok()?;
                if id == self.my_id {
                    return None;
                }
                let p = peers.get(id);
                let heard_ago = p.heard.map(|h| now.saturating_duration_since(h));
                let inbound = p.heard_within(now);
                let buffered = outbound.get(&id).copied();
                Some(PeerLink {
                    peer: name.clone(),
                    state: match (p.leaving, buffered.is_some(), inbound) {
                        (true, _, _) => LinkState::Leaving,
                        (false, true, true) => LinkState::Up,
                        (false, true, false) => LinkState::OutboundOnly,
                        (false, false, true) => LinkState::InboundOnly,
                        (false, false, false) => LinkState::Down,
                    },
                    heard_ago,
                    synced: p.synced,
                    buffered: buffered.unwrap_or(0),
                })
            })
            .collect()
    }

    /// The name of `client_id`'s owner in the current view.
    pub fn owner(&self, client_id: &str) -> String {
        let view = lock(&self.view);
        self.owner_in(&view, client_id)
    }

    /// `client_id`'s owner in `view`.
    fn owner_in(&self, view: &View, client_id: &str) -> String {
        let members: Vec<Member<'_>> = view.members.iter().map(|n| Member(n)).collect();
        mqlb_placement::pick(client_id.as_bytes(), &members, |_| true)
            .map_or_else(|| self.me.clone(), |m| m.0.to_string())
    }

    /// `client_id`'s chain in the current view: owner first.
    pub fn chain(&self, client_id: &str) -> Vec<String> {
        let view = lock(&self.view);
        let members: Vec<&str> = view.members.iter().map(String::as_str).collect();
        crate::chain::chain(client_id, &members, self.replication)
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// Session copies held for other nodes.
    pub fn replica_count(&self) -> usize {
        lock(&self.replicas).len()
    }

    /// Members a view needs to serve: a majority of the cluster's
    /// committed membership, so two sides of a partition never both serve.
    pub fn quorum(&self) -> usize {
        let members = lock(&self.consensus).member_count();
        if members == 0 {
            self.node_count() / 2 + 1
        } else {
            members / 2 + 1
        }
    }

    /// Removes `name` from the cluster's membership (a node retired for
    /// good): a configuration change through the Raft log, after which
    /// majorities are counted without it. Returns once proposed; the
    /// proposal is made again every second for [`RETIRE_FOR`] until it
    /// commits (a proposal sent to a leader that just died is lost), and
    /// `/cluster` shows the result.
    pub fn remove_member(&self, name: &str) -> Result<(), String> {
        if !self.membership().iter().any(|m| m == name) {
            return Err(format!("{name} is not a member"));
        }
        let Some(me) = self.state_owner.get().and_then(std::sync::Weak::upgrade) else {
            return Err("the cluster is not running".to_string());
        };
        let name = name.to_string();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + RETIRE_FOR;
            while me.membership().contains(&name) && tokio::time::Instant::now() < deadline {
                let proposed =
                    lock(&me.consensus).propose_membership(consensus::Command::Leave(name.clone()));
                match proposed {
                    Ok(out) => {
                        tracing::info!(member = %name, messages = out.messages.len(), "retirement proposed");
                        me.deliver(out);
                    }
                    Err(e) => tracing::info!(error = %e, "retirement not proposed yet"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if me.membership().contains(&name) {
                tracing::warn!(member = %name, "retirement did not commit (is a majority up?)");
            }
        });
        Ok(())
    }

    /// Adds `name`, whose cluster listener is `addr`, to the cluster's
    /// membership: a configuration change through the Raft log. The new
    /// node is started with `--join` (it is not a founding member) and the
    /// current members as its peers; once the change commits, every member
    /// links to it and the leader catches it up, and it takes its share of
    /// sessions when a majority hears it. Proposed again every second for
    /// [`RETIRE_FOR`] until it commits, like [`Cluster::remove_member`].
    pub fn add_member(&self, name: &str, addr: PeerAddr) -> Result<(), String> {
        let name = mqlb_config::broker::ClusterConfig::check_name(name)?;
        if let Some(old) = lock(&self.consensus).view().members.get(&name) {
            return Err(format!("{name} is already a member (at {old})"));
        }
        let Some(me) = self.state_owner.get().and_then(std::sync::Weak::upgrade) else {
            return Err("the cluster is not running".to_string());
        };
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + RETIRE_FOR;
            while !me.membership().contains(&name) && tokio::time::Instant::now() < deadline {
                let command = consensus::Command::Join(name.clone(), addr.clone());
                // Bound first: the consensus lock is not held while the
                // output is delivered (which may ask the consensus again).
                let proposed = lock(&me.consensus).propose_membership(command);
                match proposed {
                    Ok(out) => {
                        tracing::info!(member = %name, %addr, "addition proposed");
                        me.deliver(out);
                    }
                    Err(e) => tracing::info!(error = %e, "addition not proposed yet"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if !me.membership().contains(&name) {
                tracing::warn!(member = %name, "addition did not commit (is a majority up?)");
            }
        });
        Ok(())
    }

    /// Whether this node serves sessions: it hears from a majority and the
    /// committed view counts it in (a node on its way out, or cut off,
    /// has stepped down).
    pub fn serving(&self) -> bool {
        // Checked for every forwarded publish: no copy of the view.
        let in_view = {
            let view = lock(&self.view);
            view.number == 0 || view.members.contains(&self.me)
        };
        in_view && !self.leaving.load(Ordering::Relaxed) && self.has_quorum()
    }

    /// [`Cluster::serving`] as of the last tick, without a lock: a node
    /// that has stepped down must not acknowledge a publish, which could
    /// match nobody while its sessions are being promoted elsewhere.
    pub fn is_serving(&self) -> bool {
        self.serving_now.load(Ordering::Relaxed)
    }

    /// Whether this node's failure detector hears `name` (this node
    /// always hears itself): a node that is not heard is not dialled for a
    /// relay, since it would only time out.
    pub fn hears(&self, name: &str) -> bool {
        if name == self.me {
            return true;
        }
        // Read now, not as of the last tick: a link that just went silent
        // counts at once.
        let Some(id) = self.id_of(name) else {
            return false;
        };
        // One lock at a time (`observe` takes links, then peers).
        let now = Instant::now();
        let heard = lock(&self.peers).hears(id, now);
        heard && lock(&self.links).contains_key(&id)
    }

    /// Whether this node hears from a majority (itself included).
    pub fn has_quorum(&self) -> bool {
        lock(&self.observed).len() >= self.quorum()
    }

    /// The first step of a graceful stop: hands Raft leadership to a peer,
    /// closes the clients (0x8B, after what is queued for them) and waits for
    /// them to go, lets the chains catch up, steps down (sessions kept as
    /// copies, forwards refused), then tells the peers this node is leaving
    /// and waits for a committed view without it (the waits for the clients
    /// and for the view take at most `within` each). That view moves the
    /// sessions to the next node of their chains, which promote their
    /// copies only once this node has stopped changing them: a QoS 2 PUBLISH
    /// already on the wire has its packet identifier in the copies, so the
    /// new holder sends it again under the same one. No client bounces back
    /// to a node on its way out, and nothing waits for an election after it
    /// has gone.
    pub async fn leave(&self, state: &State, within: Duration) {
        let heir = lock(&self.observed)
            .iter()
            .find(|n| **n != self.me)
            .cloned();
        if let Some(heir) = heir {
            let out = lock(&self.consensus).hand_over(&heir);
            self.deliver(out);
        }
        self.leaving.store(true, Ordering::Relaxed);
        self.serving_now.store(false, Ordering::Relaxed);
        for outbox in state.open_connections() {
            outbox.close(crate::outbox::Closing::ShuttingDown);
        }
        let quiet = tokio::time::Instant::now() + within;
        while state.core().connected() > 0 && tokio::time::Instant::now() < quiet {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.settle(Duration::from_secs(2)).await;
        self.step_down(state);
        self.announced.store(true, Ordering::Relaxed);
        self.broadcast(&Frame::Leaving);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let view = self.view();
            if view.number > 0 && !view.members.contains(&self.me) {
                tracing::info!(view = view.number, "left the view");
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("leaving without a committed view that drops this node");
                return;
            }
            tokio::time::sleep(consensus::TICK).await;
        }
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
                    let waits = lock(&self.waiting).sample(8);
                    tracing::warn!(
                        waiting = lock(&self.waiting).len(),
                        ?waits,
                        "stopping with session changes not yet acknowledged by peers"
                    );
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether this node has what it needs to take clients: a majority in
    /// its view, and, once since it last began serving, the snapshot of
    /// every live peer.
    ///
    /// Readiness never depends on a dead peer: a node that hears a
    /// majority stays ready through an election and through the view
    /// change that drops a dead member (the leader included), and a peer
    /// that dies or comes back does not make it unready. Only the sessions
    /// the dead peer held are unavailable, until their replicas are
    /// promoted; clients of those wait ([`Cluster::server_for`],
    /// [`Cluster::copy_settling`]).
    ///
    /// Ready comes a tick after synced (`Cluster::synced`): that tick
    /// promotes the copies the snapshots brought that this node owns and
    /// holds publishes for the ones it cannot promote yet. Taking clients
    /// in between, a publish could match nobody for a session whose copy
    /// had just come (found by the simulator with the view from Raft: a
    /// node back from a restart before the view dropped it).
    pub fn ready(&self) -> bool {
        self.serving_in_view() && self.synced_once.load(Ordering::Acquire)
    }

    /// Whether this node has had, since it last began serving, the snapshot
    /// of every live peer (with a majority, in its view): what promoting
    /// its copies needs ([`Cluster::ready`] comes a tick later).
    pub(super) fn synced(&self) -> bool {
        self.serving_in_view()
            && (self.synced_once.load(Ordering::Acquire) || self.synced_with_live_peers())
    }

    /// A majority heard, not leaving, and a member of a committed view.
    fn serving_in_view(&self) -> bool {
        if !self.has_quorum() || self.leaving.load(Ordering::Relaxed) {
            return false;
        }
        let view = lock(&self.view);
        view.number > 0 && view.members.contains(&self.me)
    }

    /// Whether every peer this node must hear from before it first serves
    /// has sent its snapshot: each member of the committed view, except
    /// one the failure detector says is dead (not heard for
    /// [`FAILURE_TIMEOUT`] while this node has been up longer than that).
    /// A peer merely slow to link up is waited for: its snapshot holds the
    /// copies of sessions whose chain includes this node.
    fn synced_with_live_peers(&self) -> bool {
        let view = self.view();
        let names = self.names();
        let now = Instant::now();
        let detector_armed = now.duration_since(self.started) > FAILURE_TIMEOUT;
        lock(&self.peers).synced_with_live(self.my_id, now, detector_armed, |i| {
            names.get(i).is_some_and(|n| view.members.contains(n))
        })
    }

    /// A member's id by name.
    pub fn node_id(&self, name: &str) -> Option<NodeId> {
        self.id_of(name)
    }

    fn id_of(&self, name: &str) -> Option<NodeId> {
        self.directory()
            .names
            .iter()
            .position(|n| n == name)
            .and_then(|i| NodeId::try_from(i).ok())
    }

    fn directory(&self) -> std::sync::RwLockReadGuard<'_, Directory> {
        self.directory.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether node `id` is named `name`, without copying its name (a
    /// chain member asks for every copy a peer sends).
    fn is_named(&self, id: NodeId, name: &str) -> bool {
        self.directory()
            .names
            .get(id as usize)
            .is_some_and(|n| n == name)
    }

    /// A member's name by id.
    fn name_of(&self, id: NodeId) -> Option<String> {
        self.directory().names.get(id as usize).cloned()
    }

    /// A member's cluster address by id.
    fn addr_of(&self, id: NodeId) -> Option<PeerAddr> {
        self.directory().addrs.get(id as usize).cloned()
    }

    /// Every member this node knows of, by id.
    fn names(&self) -> Vec<String> {
        self.directory().names.clone()
    }

    fn node_count(&self) -> usize {
        self.directory().names.len()
    }

    /// Members the committed membership has and this node did not know
    /// (added by an admin call): their ids, addresses and links.
    fn learn_members(&self, members: &std::collections::BTreeMap<String, PeerAddr>) {
        let new: Vec<(&String, &PeerAddr)> = {
            let dir = self.directory();
            members
                .iter()
                .filter(|(n, _)| !dir.names.contains(n))
                .collect()
        };
        if new.is_empty() {
            return;
        }
        // The peer entries first: an id is handed out only once its entry
        // exists (no lock is held while the other is taken).
        lock(&self.peers).grow(new.len());
        let mut added = Vec::new();
        {
            let mut dir = self.directory.write().unwrap_or_else(|p| p.into_inner());
            for (name, addr) in new {
                let Ok(id) = NodeId::try_from(dir.names.len()) else {
                    continue;
                };
                dir.names.push(name.clone());
                dir.addrs.push(addr.clone());
                tracing::info!(member = %name, %addr, "member added to the cluster");
                added.push(id);
            }
        }
        for id in added {
            self.spawn_link(id);
        }
    }

    /// Keeps a link to member `id` (once the cluster runs).
    fn spawn_link(&self, id: NodeId) {
        let (Some(stop), Some(state), Some(me)) = (
            self.stop.get().cloned(),
            self.state.get().and_then(std::sync::Weak::upgrade),
            self.state_owner.get().and_then(std::sync::Weak::upgrade),
        ) else {
            return;
        };
        let span = tracing::info_span!("link", peer = %self.name_of(id).unwrap_or_default());
        tokio::spawn(async move { me.dial_loop(id, state, stop).await }.instrument(span));
    }

    /// Runs the cluster until `stop`: accepts peers and proxied clients on
    /// `listener`, keeps a link to every peer, and maintains the view.
    /// Clients relayed here by a peer are served by `serve_relayed`.
    pub fn start(
        self: &Arc<Self>,
        listener: TcpListener,
        state: Arc<State>,
        serve_relayed: ServeRelayed,
        stop: CancellationToken,
    ) {
        let _ = self.state.set(Arc::downgrade(&state));
        let _ = self.state_owner.set(Arc::downgrade(self));
        let _ = self.stop.set(stop.clone());
        let me = self.clone();
        let st = state.clone();
        let s = stop.clone();
        tokio::spawn(async move { me.accept_loop(listener, st, serve_relayed, s).await });
        for id in 0..self.node_count() {
            let Ok(id) = NodeId::try_from(id) else {
                continue;
            };
            if id != self.my_id {
                self.spawn_link(id);
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(consensus::TICK);
            let last = me.view();
            let mut ticker = Ticker {
                tick: tick::Tick::new(last.number, last.members.contains(&me.me)),
                last,
                reported: Vec::new(),
                ticks: 0,
            };
            loop {
                tokio::select! {
                    // A tick may persist the Raft state (an fsync).
                    _ = tick.tick() => off_worker(me.raft_on_disk, || me.on_tick(&state, &mut ticker)),
                    _ = stop.cancelled() => return,
                }
            }
        });
    }

    /// Sends what the Raft node produced and installs a newly committed
    /// view.
    fn deliver(&self, out: consensus::Output) {
        for (to, m) in out.messages {
            let tx = self
                .id_of(&to)
                .and_then(|id| lock(&self.links).get(&id).cloned());
            if let Some(tx) = tx {
                tx.push(&Frame::Raft(m), &self.stats.dropped);
            }
        }
        if let Some(c) = out.view {
            // Installed under the core's lock, and from that moment
            // publishes matching the copies it orphans here are held: a
            // client the new view sends here may publish before the next
            // tick would hold them, and for a copy whose holder's interest
            // this node never had, such a publish matched nobody (found by
            // the simulator once each node acts on a view at its own tick:
            // a holder back from a power loss that crashed again before it
            // served its sessions).
            let state = self.state.get().and_then(std::sync::Weak::upgrade);
            let mut core = state.as_ref().map(|s| s.core());
            let installed = {
                let mut view = lock(&self.view);
                let newer = c.number > view.number;
                if newer {
                    *view = Arc::new(View {
                        number: c.number,
                        members: c.live,
                    });
                }
                newer
            };
            if let (true, Some(core)) = (installed, core.as_deref_mut()) {
                self.tell_reachable(core);
                self.hold_for_copies_in(core);
            }
            drop(core);
            if installed {
                // Promotions wait for the leader to confirm the view is
                // the newest (`view_is_current`): asked at once, so the
                // answer is in by the next tick.
                self.ask_current();
            }
        }
    }

    /// Asks the leader to confirm that this node's view is the newest
    /// ([`consensus::Consensus::ask_current`]).
    fn ask_current(&self) {
        let out = off_worker(self.raft_on_disk, || lock(&self.consensus).ask_current());
        self.deliver(out);
    }

    /// Whether this node's view is known to be the newest
    /// ([`consensus::Consensus::current`]); if not, asks again, for the
    /// next tick.
    pub(super) fn view_is_current(&self) -> bool {
        if lock(&self.consensus).current() {
            return true;
        }
        self.ask_current();
        false
    }

    /// A peer's Raft message.
    pub(super) fn raft_message(&self, from: NodeId, m: &[u8]) {
        let Some(name) = self.name_of(from) else {
            return;
        };
        let out = off_worker(self.raft_on_disk, || lock(&self.consensus).step(&name, m));
        self.deliver(out);
    }

    /// Every [`consensus::TICK`]: observes the peers, drives the Raft node
    /// (the leader proposes what it observes), and acts on a new committed
    /// view: steps down if this node lost its majority or was left out,
    /// promotes the replicas it now owns, releases waits on members that
    /// left, and re-chains sessions.
    fn on_tick(&self, state: &Arc<State>, t: &mut Ticker) {
        let members = lock(&self.consensus).view().members;
        self.learn_members(&members);
        let observed = self.observe();
        t.ticks += 1;
        if self.announced.load(Ordering::Relaxed) {
            self.broadcast(&Frame::Leaving);
        }
        if t.ticks.is_multiple_of(50) {
            // Sessions that ended or went quiet leave their logs behind.
            let now = Instant::now();
            lock(&self.replica_seen).prune(now);
        }
        if observed != t.reported || t.ticks.is_multiple_of(5) {
            self.broadcast(&Frame::Observed(observed.clone()));
            t.reported.clone_from(&observed);
        }
        let members = self.membership_or_known();
        let quorum = self.quorum();
        let ticked = {
            let mut view_loop = lock(&self.view_loop);
            let mut c = lock(&self.consensus);
            view_loop.tick(
                &mut c,
                &self.me,
                &members,
                &observed,
                quorum,
                Instant::now(),
            )
        };
        self.deliver(ticked.out);
        let view = self.view();
        let serving = self.serving();
        let steps = t.tick.next(tick::Facts {
            view: view.number,
            counted: view.members.contains(&self.me),
            lost_quorum: ticked.lost_quorum,
            leaving: self.leaving.load(Ordering::Relaxed),
            serving,
        });
        for step in steps {
            match step {
                tick::Step::StepDown => self.step_down(state),
                tick::Step::ServesNothing => self.serves_nothing(),
                // What `is_serving` reads until the next tick (a step down
                // cleared it).
                tick::Step::NoteServing => self.serving_now.store(serving, Ordering::Relaxed),
                tick::Step::ResendInterest => self.resend_interest(state),
                tick::Step::HandOver => self.nodes_left(&t.last, state),
                tick::Step::Promote => self.promote_owned(state),
                tick::Step::HoldForCopies => self.hold_for_copies(state),
                tick::Step::NoteSynced => {
                    // Ready from now on (`ready`): its copies are promoted
                    // or held for.
                    if !self.synced_once.load(Ordering::Acquire) && self.synced() {
                        self.synced_once.store(true, Ordering::Release);
                    }
                }
                tick::Step::SayPromoted => {
                    if self.ready()
                        && view.number > lock(&self.promotions).mine()
                        && !self.owns_settling_copies()
                        && !self.owns_unpromoted_copies(&view)
                        && lock(&self.promotions).promoted(view.number)
                    {
                        // Every copy this node owns in this view is a
                        // session now, and its interest went out before
                        // this word.
                        self.broadcast(&Frame::Promoted { view: view.number });
                    }
                }
                tick::Step::Departures => {
                    // What waits for a peer that is gone waits no longer
                    // (no link, or dropped by the view and not heard); a
                    // member of the view without a link is owed the chain
                    // changes it missed until its next link's snapshot
                    // confirms them (`commits`), and only its forwards
                    // come back.
                    let departures = departures::at_tick(view.number, self.peer_facts(&view));
                    self.forget_moved_peers(state, &view, &departures.moved);
                    self.release_waits(&departures.lost);
                    for i in departures.unlinked_members {
                        let released = lock(&self.waiting).forwards_lost(i);
                        self.act_on(released);
                    }
                    self.release_store_waits(&departures.store);
                }
                tick::Step::Rechain => {
                    self.rechain(state);
                    self.store_rechain(state, &view);
                }
            }
        }
        t.last = view;
    }

    /// Whether the sessions of every member the view has dropped have
    /// moved: the view holds only members this node can reach, and every
    /// one of them (this node included) has promoted the copies it owns in
    /// it. Publishes held for a lost node are routed again from then on,
    /// and its interest is forgotten.
    /// Everything is judged in the one committed `view` the caller read:
    /// a view installed meanwhile (by a peer's Raft message, on its link's
    /// task) must not mix with the caller's reading of it. A publish held
    /// because a leaving node refused it was routed again at once when
    /// the view dropped the node: "settled" was judged in the view before
    /// (where the leaving node still counted, its copies not yet
    /// anyone's to promote), "the refuser has left" in the view after;
    /// the publish matched nobody (acknowledged QoS 2 messages lost in
    /// rolling restarts, about 1 run in 30).
    pub(super) fn takeover_done(&self, view: &View) -> bool {
        let reachable = !self.view_has_unreachable(view);
        let owns_unpromoted = reachable && self.owns_unpromoted_copies(view);
        // A member without an id is none this node can have heard from.
        let members: Vec<NodeId> = view
            .members
            .iter()
            .map(|m| self.id_of(m).unwrap_or(NodeId::MAX))
            .collect();
        lock(&self.promotions).takeover_done(
            view.number,
            self.my_id,
            members,
            reachable,
            owns_unpromoted,
        )
    }

    /// Forgets the interest of peers that are gone (`moved`: not heard, out
    /// of the view; a hung one's link may still be open) once their
    /// sessions have moved: from then on a publish goes straight to the new
    /// holders instead of being held for the dead node (its interest was
    /// kept until now so that nothing published meanwhile matched nobody).
    fn forget_moved_peers(&self, state: &State, view: &View, moved: &[NodeId]) {
        if view.number == 0 {
            return;
        }
        let lost: Vec<NodeId> = {
            let forgotten = lock(&self.forgotten);
            moved
                .iter()
                .copied()
                .filter(|i| !forgotten.contains(i))
                .collect()
        };
        if lost.is_empty() || !self.takeover_done(view) {
            return;
        }
        let mut core = state.core();
        for id in lost {
            tracing::debug!(
                peer = id,
                "its sessions moved: forgetting a lost peer's interest"
            );
            core.forget_peer(id);
            lock(&self.forgotten).insert(id);
        }
    }

    /// What this node knows of every peer for [`departures::at_tick`]:
    /// whether `view` counts it, whether a link to it is open, whether it
    /// is heard.
    fn peer_facts(&self, view: &View) -> Vec<departures::Peer> {
        let others: Vec<(NodeId, String)> = self
            .names()
            .into_iter()
            .enumerate()
            .filter_map(|(i, n)| NodeId::try_from(i).ok().map(|i| (i, n)))
            .filter(|(i, _)| *i != self.my_id)
            .collect();
        // `hears` takes the links lock itself: not under it.
        let heard: Vec<bool> = others.iter().map(|(_, n)| self.hears(n)).collect();
        let links = lock(&self.links);
        others
            .into_iter()
            .zip(heard)
            .map(|((id, name), heard)| departures::Peer {
                id,
                in_view: view.members.contains(&name),
                linked: links.contains_key(&id),
                heard,
            })
            .collect()
    }

    /// Back in service: peers still hold the interest this node had when it
    /// stepped down. Tells every peer to forget it and sends the current
    /// one, under the core's lock so no change slips between.
    fn resend_interest(&self, state: &State) {
        let core = state.core();
        // Interest entries numbered so far are in what is sent here: the
        // log does not send them again.
        self.interest_covers
            .store(state.last_sequenced(), Ordering::Release);
        let filters = core.local_interest();
        for tx in lock(&self.links).values() {
            tx.push(&Frame::Reset, &self.stats.dropped);
            for filter in &filters {
                tx.push(
                    &Frame::Interest {
                        filter: filter.clone(),
                        gained: true,
                    },
                    &self.stats.dropped,
                );
            }
        }
    }

    /// This node plus the peers whose links are up both ways and heard
    /// from within [`FAILURE_TIMEOUT`], sorted; kept for the majority rule.
    fn observe(&self) -> Vec<String> {
        let now = Instant::now();
        let mut members = vec![self.me.clone()];
        let names = self.names();
        {
            let links = lock(&self.links);
            let heard = lock(&self.peers).heard(self.my_id, now);
            for id in heard {
                if links.contains_key(&id) {
                    if let Some(n) = names.get(id as usize) {
                        members.push(n.clone());
                    }
                }
            }
        }
        members.sort();
        lock(&self.observed).clone_from(&members);
        members
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
        for (i, r) in Refusal::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "mqlb_cluster_refused_total{{reason=\"{}\"}} {}",
                r.label(),
                self.stats
                    .refused
                    .get(i)
                    .map_or(0, |c| c.load(Ordering::Relaxed))
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
            (
                "mqlb_cluster_store_passed_total",
                "State store requests passed on to the node that owns their key.",
                &self.stats.store_passed,
            ),
            (
                "mqlb_cluster_store_owed_total",
                "Times a state store change waited for a chain member whose link was down before its answer.",
                &self.stats.store_owed,
            ),
            (
                "mqlb_cluster_held_connects_total",
                "CONNECTs held because the client's session was moving off a dead node.",
                &self.stats.held_connects,
            ),
            (
                "mqlb_cluster_moving_refused_total",
                "CONNECTs refused because the client's session was still moving after the hold.",
                &self.stats.moving_refused,
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

impl Cluster {
    /// The peers reachable now: linked, and in the committed view.
    pub(super) fn reachable_peers(&self) -> Vec<NodeId> {
        // One lock at a time: the links, then the directory, then the view.
        let linked: Vec<NodeId> = lock(&self.links).keys().copied().collect();
        let names: Vec<Option<String>> = {
            let dir = self.directory();
            linked
                .iter()
                .map(|n| dir.names.get(*n as usize).cloned())
                .collect()
        };
        let (reachable, joining): (Vec<_>, Vec<_>) = {
            let view = lock(&self.view);
            linked
                .into_iter()
                .zip(names)
                .filter_map(|(id, name)| name.map(|n| (id, n)))
                .filter(|(_, n)| *n != self.me)
                .partition(|(_, n)| view.members.contains(n))
        };
        *lock(&self.joining) = joining.into_iter().map(|(_, n)| n).collect();
        reachable.into_iter().map(|(id, _)| id).collect()
    }

    /// Tells the core which peers it can reach (under its lock, which the
    /// caller holds: a link's opening, closing, or a new view).
    pub(super) fn tell_reachable(&self, core: &mut crate::core::Core) {
        core.set_reachable(self.reachable_peers());
    }
}

impl Fabric for Cluster {
    fn hold(
        &self,
        m: Message,
        groups: Vec<Arc<str>>,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let (done, wait) = tokio::sync::oneshot::channel();
        // Counted by the core, which asked for it.
        self.hold_publish(m, groups, AGAIN, done, true);
        Some(wait)
    }

    fn defer(
        &self,
        m: Message,
        how: crate::effects::Deferred,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.hold_publish(m, Vec::new(), HeldAs::New(how), done, true);
        Some(wait)
    }

    fn forward(
        &self,
        node: NodeId,
        m: &Message,
        groups: &[Arc<str>],
        again: bool,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let Some(tx) = lock(&self.links).get(&node).cloned() else {
            // The peer is gone but its interest is still held: its sessions
            // are being taken over. QoS 0 is dropped, as in flight.
            if m.qos == mqlb_protocol::QoS::AtMostOnce {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            let (done, wait) = tokio::sync::oneshot::channel();
            let again = AGAIN;
            self.hold_publish(m.clone(), groups.to_vec(), again, done, false);
            return Some(wait);
        };
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(peer = node, again, payload = %String::from_utf8_lossy(&m.payload), "forward out");
        let mut seq = 0;
        let mut rx = None;
        if m.qos != mqlb_protocol::QoS::AtMostOnce {
            seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let (done, wait) = tokio::sync::oneshot::channel();
            // (Never given back: one peer is waited for.)
            drop(lock(&self.waiting).register(
                seq,
                0,
                [(node, 1)],
                &[],
                Some((m.clone(), groups.to_vec())),
                done,
            ));
            rx = Some(wait);
        }
        tx.push(
            &Frame::Forward {
                seq,
                message: m.clone(),
                groups: groups.to_vec(),
                again,
            },
            &self.stats.dropped,
        );
        rx
    }
}
