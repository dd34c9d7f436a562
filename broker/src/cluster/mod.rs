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
//! * **One session per client ID.** A client that connects to a node that
//!   is not its owner is proxied to the owner over an authenticated cluster
//!   connection (chosen over a takeover: the session never moves while its
//!   owner lives, and the balancer's placement and the cluster's agree when
//!   the backend names are the node IDs).
//! * **Readiness.** A node is ready once every live peer has sent it its
//!   snapshot (interest and retained messages), or has been unreachable for
//!   longer than [`FAILURE_TIMEOUT`] since start.
//!
//! # Not built yet
//! Session replication down chains and the Raft-committed view: the view
//! here is each node's own observation, so two nodes can briefly disagree
//! on an owner while a link flaps, and a node's persistent sessions are
//! lost with it. Both are the next steps of the cluster issue.

pub mod handshake;
pub mod wire;

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

/// Frames waiting for one peer's outbound link.
#[derive(Debug, Default)]
struct LinkTx {
    buf: Mutex<BytesMut>,
    ready: Notify,
}

impl LinkTx {
    fn push(&self, f: &Frame, dropped: &AtomicU64) {
        let mut b = lock(&self.buf);
        if b.len() > LINK_BUFFER {
            dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if f.encode(&mut b).is_err() {
            dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        drop(b);
        self.ready.notify_one();
    }
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
    links: Mutex<HashMap<NodeId, Arc<LinkTx>>>,
    peers: Mutex<Vec<Peer>>,
    view: Mutex<View>,
    started: Instant,
    /// Copies of sessions this node is a chain member for but does not
    /// serve, rebuilt from the holder's change records.
    replicas: Mutex<HashMap<String, Session>>,
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

/// One append's outstanding acknowledgements, per chain member.
#[derive(Debug)]
struct Waiting {
    per_node: HashMap<NodeId, usize>,
    tx: Option<tokio::sync::oneshot::Sender<()>>,
    /// A forwarded publish, kept until its peer confirms it: if the peer
    /// dies first, it is forwarded again to whoever took over.
    resend: Option<(Message, Vec<Arc<str>>)>,
}

/// Copies of each persistent session: its holder plus this many − 1 chain
/// members (rank 0 and 1 of the client ID over the view).
pub const REPLICATION_FACTOR: usize = 2;

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
                links: Mutex::new(HashMap::new()),
                replicas: Mutex::new(HashMap::new()),
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
            .take(REPLICATION_FACTOR)
            .map(|m| m.0.to_string())
            .collect()
    }

    /// Session copies held for other nodes.
    pub fn replica_count(&self) -> usize {
        lock(&self.replicas).len()
    }

    /// Before serving `client_id` here: if this node holds a replica of its
    /// session and not the session itself, the replica becomes the session
    /// (its records then stream to the rest of the chain).
    pub fn promote(&self, client_id: &str, state: &State) {
        let Some(session) = lock(&self.replicas).remove(client_id) else {
            return;
        };
        lock(&self.holders).remove(client_id);
        // A takeover starts a new epoch, so this copy wins over any older
        // one still held elsewhere (a stale owner's writes are refused).
        let mut snap = crate::core::snapshot_of(&session);
        snap.epoch += 1;
        let _ = state.act(|core| {
            if core.has_session(client_id) {
                return crate::effects::Effects::none();
            }
            tracing::info!(client_id, epoch = snap.epoch, "replica promoted to session");
            core.import_session(client_id, snap)
                .unwrap_or_else(|_| crate::effects::Effects::none())
        });
    }

    /// The live peer that holds `client_id`'s session, if this node keeps
    /// a replica of it.
    pub fn live_holder(&self, client_id: &str) -> Option<String> {
        if !lock(&self.replicas).contains_key(client_id) {
            return None;
        }
        let holder = *lock(&self.holders).get(client_id)?;
        let name = self.names.get(holder as usize)?;
        let live = self.view().members.iter().any(|m| m == name);
        (live && *name != self.me).then(|| name.clone())
    }

    /// Where a client with this ID is served: `None` here, or the node to
    /// relay it to: the live holder of its session, else its owner.
    pub fn server_for(&self, client_id: &str, state: &State) -> Option<String> {
        if state.core().has_session(client_id) {
            return None;
        }
        if let Some(h) = self.live_holder(client_id) {
            return Some(h);
        }
        let owner = self.owner(client_id);
        (owner != self.me).then_some(owner)
    }

    /// Promotes the replicas this node owns in the current view, once it is
    /// ready: only then has it the newest copy every live peer holds (their
    /// link snapshots come before it says ready).
    fn promote_owned(&self, state: &State) {
        if !self.ready() {
            return;
        }
        let held: Vec<String> = lock(&self.replicas).keys().cloned().collect();
        let owned: Vec<String> = held
            .into_iter()
            .filter(|c| self.owner(c) == self.me && self.live_holder(c).is_none())
            .collect();
        for c in owned {
            self.promote(&c, state);
        }
    }

    /// After a view change: send every session this node holds whole to
    /// its chain (a new chain member has nothing; an old one may have
    /// missed changes).
    fn rechain(&self, state: &State) {
        let records: Vec<ChangeRecord> = {
            let core = state.core();
            let mut out = Vec::new();
            for id in core.persistent_sessions() {
                let Some(snap) = core.export_session(&id) else {
                    continue;
                };
                let epoch = snap.epoch;
                for change in whole(snap) {
                    out.push(ChangeRecord {
                        client: id.clone(),
                        epoch,
                        change,
                    });
                }
            }
            out
        };
        if !records.is_empty() {
            drop(self.append(records));
        }
    }

    /// This node lost its majority: the other side may take its sessions
    /// over, so it stops serving. Clients are closed (v5: DISCONNECT 0x8B)
    /// to reconnect on the majority side, and its sessions become replica
    /// copies, so that when the partition heals the majority's copies (which
    /// took the messages published meanwhile) win.
    fn step_down(&self, state: &State) {
        tracing::warn!(
            quorum = self.quorum(),
            "lost the majority of the cluster: closing clients and handing sessions over"
        );
        let demoted: Vec<(String, crate::snapshot::SessionSnapshot)> = {
            let core = state.core();
            core.persistent_sessions()
                .into_iter()
                .filter_map(|c| core.export_session(&c).map(|s| (c.to_string(), s)))
                .collect()
        };
        for (client, snap) in demoted {
            let epoch = snap.epoch;
            self.apply_replica(&client, epoch, whole(snap));
            let _ = state.act(|core| core.evict_session_shutting_down(&client));
        }
        for outbox in state.core().open_connections() {
            outbox.close(crate::outbox::Closing::ShuttingDown);
        }
    }

    /// A chain member's copy of a session changed.
    fn replicate(
        &self,
        from: NodeId,
        seq: u64,
        client: String,
        epoch: u64,
        changes: Vec<SessionChange>,
        state: &State,
    ) {
        // A session this node holds with an older epoch has moved on: the
        // writer's copy is the live one now.
        let held = state.core().epoch(&client);
        match held {
            Some(mine) if mine > epoch => {
                // A writer that has not yet heard that the session moved
                // here: its bookkeeping is refused, but the messages it
                // accepted for the session are adopted (a QoS 1 duplicate
                // is possible; losing them is not).
                tracing::debug!(
                    client,
                    mine,
                    epoch,
                    "stale session changes: adopting their messages"
                );
                let adopted: Vec<crate::message::Pending> = changes
                    .into_iter()
                    .filter_map(|c| match c {
                        SessionChange::Enqueued(p) | SessionChange::Sent { pending: p, .. } => {
                            Some(p)
                        }
                        _ => None,
                    })
                    .collect();
                if !adopted.is_empty() {
                    let committed = state.act(|core| core.adopt(&client, adopted));
                    if let Some(tx) = lock(&self.links).get(&from).cloned() {
                        tokio::spawn(async move {
                            committed.wait().await;
                            tx.push(&Frame::Ack { seq }, &AtomicU64::new(0));
                        });
                    }
                    return;
                }
            }
            Some(_) if !state.core().is_connected(&client) || held < Some(epoch) => {
                if held < Some(epoch) {
                    tracing::info!(client, "session moved to another node; local copy dropped");
                    let _ = state.act(|core| core.evict_session(&client));
                }
                self.apply_replica(&client, epoch, changes);
            }
            Some(_) => {}
            None => self.apply_replica(&client, epoch, changes),
        }
        if let Some(tx) = lock(&self.links).get(&from).cloned() {
            tx.push(&Frame::Ack { seq }, &self.stats.dropped);
        }
    }

    fn apply_replica(&self, client: &str, epoch: u64, changes: Vec<SessionChange>) {
        let mut replicas = lock(&self.replicas);
        let s = replicas.entry(client.to_string()).or_default();
        if s.epoch > epoch {
            return;
        }
        for c in changes {
            if c == SessionChange::Ended {
                *s = Session::default();
            } else {
                s.apply(c);
            }
        }
        if s == &Session::default() {
            replicas.remove(client);
            lock(&self.holders).remove(client);
        }
    }

    fn acked(&self, from: NodeId, seq: u64) {
        let mut waiting = lock(&self.waiting);
        let done = match waiting.get_mut(&seq) {
            Some(w) => {
                if let Some(n) = w.per_node.get_mut(&from) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        w.per_node.remove(&from);
                    }
                }
                w.per_node.is_empty()
            }
            None => false,
        };
        if done {
            if let Some(mut w) = waiting.remove(&seq) {
                if let Some(tx) = w.tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    }

    /// A member left the view: appends waiting for it wait no longer (the
    /// copy it would have held is re-made on the new chain by `rechain`).
    fn release_waits(&self, gone: &[NodeId]) {
        let mut waiting = lock(&self.waiting);
        let mut done = Vec::new();
        for (seq, w) in waiting.iter_mut() {
            let before = w.per_node.len();
            for g in gone {
                w.per_node.remove(g);
            }
            if w.per_node.is_empty() && before > 0 {
                done.push(*seq);
            }
        }
        for seq in done {
            let Some(mut w) = waiting.remove(&seq) else {
                continue;
            };
            let Some(tx) = w.tx.take() else {
                continue;
            };
            match w.resend.take() {
                None => {
                    let _ = tx.send(());
                }
                // Which other peers had it is not known here: one that did
                // may see it twice (QoS 1 allows; see the README).
                Some((m, groups)) => self.hold_for_takeover(m, groups, Vec::new(), tx),
            }
        }
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

    /// Opens an authenticated client connection to `owner`, over which an
    /// MQTT client's bytes are relayed.
    pub async fn dial_client(&self, owner: &str) -> io::Result<TcpStream> {
        let id = self
            .id_of(owner)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "unknown node"))?;
        let addr = self.addrs[id as usize];
        let mut s = tokio::time::timeout(FAILURE_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let _ = s.set_nodelay(true);
        let name = handshake::dial(&mut s, &self.me, Purpose::Client, &self.secret)
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
        if name != owner {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "wrong node"));
        }
        self.stats.proxied.fetch_add(1, Ordering::Relaxed);
        Ok(s)
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
        if view.number != before.number {
            let gone: Vec<NodeId> = (0..self.names.len())
                .filter(|&i| !view.members.contains(&self.names[i]))
                .filter_map(|i| NodeId::try_from(i).ok())
                .collect();
            self.release_waits(&gone);
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

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        state: Arc<State>,
        settings: Settings,
        stop: CancellationToken,
    ) {
        loop {
            let (mut stream, addr) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let _ = stream.set_nodelay(true);
            let me = self.clone();
            let state = state.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let known = |n: &str| me.id_of(n).is_some_and(|id| id != me.my_id);
                let (name, purpose) =
                    match handshake::accept(&mut stream, &me.me, &me.secret, known).await {
                        Ok(x) => x,
                        Err(r) => {
                            me.refused(r);
                            tracing::warn!(%addr, reason = r.label(), "cluster connection refused");
                            return;
                        }
                    };
                let Some(id) = me.id_of(&name) else {
                    return;
                };
                match purpose {
                    Purpose::Link => {
                        let span = tracing::info_span!("inbound", peer = %name);
                        tokio::select! {
                            _ = me.read_link(id, stream, state).instrument(span) => {}
                            _ = stop.cancelled() => {}
                        }
                    }
                    Purpose::Client => {
                        tokio::select! {
                            _ = crate::conn::handle_owned(stream, state, settings, id) => {}
                            _ = stop.cancelled() => {}
                        }
                    }
                }
            });
        }
    }

    fn refused(&self, r: Refusal) {
        let i = match r {
            Refusal::Garbage => 0,
            Refusal::BadSecret => 1,
            Refusal::UnknownNode => 2,
            Refusal::Timeout => 3,
        };
        self.stats.refused[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Applies a peer's frames until its link closes or goes quiet.
    async fn read_link(&self, id: NodeId, mut stream: TcpStream, state: Arc<State>) {
        let generation = {
            let mut peers = lock(&self.peers);
            let p = &mut peers[id as usize];
            p.generation += 1;
            p.synced = false;
            p.heard = Some(Instant::now());
            p.generation
        };
        tracing::info!("peer link up");
        let mut buf = BytesMut::with_capacity(64 << 10);
        loop {
            let r = tokio::time::timeout(FAILURE_TIMEOUT, stream.read_buf(&mut buf)).await;
            match r {
                Ok(Ok(n)) if n > 0 => {}
                _ => break,
            }
            {
                let mut peers = lock(&self.peers);
                let p = &mut peers[id as usize];
                if p.generation != generation {
                    return; // a newer link from this peer took over
                }
                p.heard = Some(Instant::now());
            }
            loop {
                let frame = match Frame::decode(&mut buf) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "bad frame from peer; closing its link");
                        self.link_down(id, generation, &state);
                        return;
                    }
                };
                self.apply(id, generation, frame, &state);
            }
        }
        self.link_down(id, generation, &state);
    }

    fn link_down(&self, id: NodeId, generation: u64, state: &State) {
        {
            let mut peers = lock(&self.peers);
            let p = &mut peers[id as usize];
            if p.generation != generation {
                return;
            }
            p.heard = None;
            p.synced = false;
        }
        tracing::warn!("peer link down");
        // Its interest is kept a while: publishes for its sessions are held
        // (see `forward`) until whoever takes them over has said so, instead
        // of matching nobody in between.
        let (Some(st), Some(cluster)) = (
            self.state.get().and_then(std::sync::Weak::upgrade),
            self.state_owner.get().and_then(std::sync::Weak::upgrade),
        ) else {
            state.core().forget_peer(id);
            return;
        };
        tokio::spawn(async move {
            tokio::time::sleep(INTEREST_HOLD).await;
            let still_down = lock(&cluster.peers)[id as usize].generation == generation;
            if still_down {
                tracing::debug!(peer = id, "forgetting a lost peer's interest");
                st.core().forget_peer(id);
            }
        });
    }

    /// Holds `m` for a dead peer and forwards it again, after
    /// [`FAILURE_TIMEOUT`], to the live peers interested by then (the node
    /// that took over the dead peer's sessions announces them when it
    /// promotes them); `done` fires once those have committed it.
    fn hold_for_takeover(
        &self,
        m: Message,
        groups: Vec<Arc<str>>,
        exclude: Vec<NodeId>,
        done: tokio::sync::oneshot::Sender<()>,
    ) {
        let (Some(state), Some(cluster)) = (
            self.state.get().and_then(std::sync::Weak::upgrade),
            self.state_owner.get().and_then(std::sync::Weak::upgrade),
        ) else {
            let _ = done.send(());
            return;
        };
        self.stats.held.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            tokio::time::sleep(FAILURE_TIMEOUT).await;
            let linked: Vec<NodeId> = lock(&cluster.links).keys().copied().collect();
            let committed = state.act(|core| core.reforward(m, groups, &linked, &exclude));
            committed.wait().await;
            let _ = done.send(());
        });
    }

    fn apply(&self, id: NodeId, generation: u64, frame: Frame, state: &State) {
        match frame {
            Frame::Ping => {}
            Frame::Reset => state.core().forget_peer(id),
            Frame::Interest { filter, gained } => state.core().peer_interest(id, &filter, gained),
            Frame::SyncDone => {
                let mut peers = lock(&self.peers);
                let p = &mut peers[id as usize];
                if p.generation == generation {
                    p.synced = true;
                }
            }
            Frame::Retained {
                topic,
                message,
                version,
            } => {
                state
                    .core()
                    .set_retained_from_peer(&topic, message, version);
            }
            Frame::Replicate {
                seq,
                client,
                epoch,
                holder,
                changes,
            } => {
                if let Some(h) = self.id_of(&holder) {
                    lock(&self.holders).insert(client.clone(), h);
                }
                self.replicate(id, seq, client, epoch, changes, state)
            }
            Frame::Ack { seq } => self.acked(id, seq),
            Frame::Forward {
                seq,
                message,
                groups,
            } => {
                self.stats.received.fetch_add(1, Ordering::Relaxed);
                let committed = state.act(|core| core.route_from_peer(message, &groups));
                if seq != 0 {
                    // The publisher's acknowledgement waits for this node's
                    // copies (and their chains) to hold the message.
                    let tx = lock(&self.links).get(&id).cloned();
                    if let Some(tx) = tx {
                        if committed.is_done() {
                            tx.push(&Frame::Ack { seq }, &self.stats.dropped);
                        } else {
                            // Dropped acks (a full buffer) are not counted
                            // from here; the link closing shows the fault.
                            let counter = Arc::new(AtomicU64::new(0));
                            tokio::spawn(async move {
                                committed.wait().await;
                                tx.push(&Frame::Ack { seq }, &counter);
                            });
                        }
                    }
                }
            }
        }
    }

    /// Keeps the outbound link to peer `id` open: dial, prove the secret,
    /// send the snapshot, then stream frames; redial when it drops.
    async fn dial_loop(self: Arc<Self>, id: NodeId, state: Arc<State>, stop: CancellationToken) {
        let addr = self.addrs[id as usize];
        let name = self.names[id as usize].clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = async {
                let mut s = tokio::time::timeout(FAILURE_TIMEOUT, TcpStream::connect(addr))
                    .await
                    .map_err(|_| "connect timed out".to_string())?
                    .map_err(|e| e.to_string())?;
                let _ = s.set_nodelay(true);
                let peer = handshake::dial(&mut s, &self.me, Purpose::Link, &self.secret)
                    .await
                    .map_err(|e| e.to_string())?;
                if peer != name {
                    return Err(format!("answered as {peer}"));
                }
                Ok(s)
            };
            let stream = tokio::select! {
                r = attempt => r,
                _ = stop.cancelled() => return,
            };
            match stream {
                Ok(s) => {
                    backoff = Duration::from_millis(100);
                    tracing::info!("link to peer open");
                    tokio::select! {
                        _ = self.write_link(id, s, &state) => {}
                        _ = stop.cancelled() => return,
                    }
                    tracing::warn!("link to peer closed");
                }
                Err(e) => tracing::debug!(error = %e, "cannot reach peer"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Sends the snapshot, registers the link for live changes, then writes
    /// whatever is queued until the connection fails.
    async fn write_link(&self, id: NodeId, mut s: TcpStream, state: &State) {
        let tx = Arc::new(LinkTx::default());
        {
            // Under the core's lock: changes made after the snapshot reach
            // this link, and none made before it is sent twice or lost.
            let core = state.core();
            tx.push(&Frame::Reset, &self.stats.dropped);
            for filter in core.local_interest() {
                tx.push(
                    &Frame::Interest {
                        filter,
                        gained: true,
                    },
                    &self.stats.dropped,
                );
            }
            for (topic, message, version) in core.retained_all() {
                tx.push(
                    &Frame::Retained {
                        topic,
                        message,
                        version,
                    },
                    &self.stats.dropped,
                );
            }
            // The sessions whose chain (with the peer in the view) holds
            // the peer: a returning owner or replica must have them before
            // it says ready.
            let peer = self.names[id as usize].as_str();
            let mut members = self.view().members;
            if !members.iter().any(|m| m == peer) {
                members.push(peer.to_string());
            }
            let in_chain = |client: &str| {
                let ms: Vec<Member<'_>> = members.iter().map(|n| Member(n)).collect();
                mqlb_placement::rank(client.as_bytes(), &ms)
                    .into_iter()
                    .take(REPLICATION_FACTOR)
                    .any(|m| m.0 == peer)
            };
            let mut copies: Vec<(String, crate::snapshot::SessionSnapshot, String)> = Vec::new();
            for client in core.persistent_sessions() {
                if in_chain(&client) {
                    if let Some(snap) = core.export_session(&client) {
                        copies.push((client.to_string(), snap, self.me.clone()));
                    }
                }
            }
            // Copies kept for others go too: after a partition the side
            // that kept serving may be reachable only through them, and
            // the newest epoch wins wherever they land.
            {
                let replicas = lock(&self.replicas);
                let holders = lock(&self.holders);
                for (client, session) in replicas.iter() {
                    if in_chain(client) {
                        let holder = holders
                            .get(client)
                            .and_then(|h| self.names.get(*h as usize))
                            .cloned()
                            .unwrap_or_default();
                        copies.push((client.clone(), crate::core::snapshot_of(session), holder));
                    }
                }
            }
            for (client, snap, holder) in copies {
                tx.push(
                    &Frame::Replicate {
                        seq: 0,
                        client,
                        epoch: snap.epoch,
                        holder,
                        changes: whole(snap),
                    },
                    &self.stats.dropped,
                );
            }
            tx.push(&Frame::SyncDone, &self.stats.dropped);
            lock(&self.links).insert(id, tx.clone());
        }
        loop {
            let _ = tokio::time::timeout(PING_EVERY, tx.ready.notified()).await;
            let mut out = std::mem::take(&mut *lock(&tx.buf));
            if out.is_empty() {
                let _ = Frame::Ping.encode(&mut out);
            }
            match tokio::time::timeout(FAILURE_TIMEOUT, s.write_all(&out)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        let mut links = lock(&self.links);
        if links.get(&id).is_some_and(|t| Arc::ptr_eq(t, &tx)) {
            links.remove(&id);
        }
    }

    fn broadcast(&self, f: &Frame) {
        for tx in lock(&self.links).values() {
            tx.push(f, &self.stats.dropped);
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

impl ChangeLog for Cluster {
    /// Streams each session's records to the other members of its chain;
    /// committed once each has applied them (at once with no other member
    /// live: the copy here is then the only one, as on a single node).
    fn append(&self, records: Vec<ChangeRecord>) -> Committed {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut per_node: HashMap<NodeId, usize> = HashMap::new();
        let mut i = 0;
        while i < records.len() {
            let client = records[i].client.clone();
            let mut j = i;
            let mut epoch = 0;
            let mut changes = Vec::new();
            while j < records.len() && records[j].client == client {
                epoch = epoch.max(records[j].epoch);
                if let SessionChange::Attached { epoch: e, .. } = &records[j].change {
                    epoch = epoch.max(*e);
                }
                changes.push(records[j].change.clone());
                j += 1;
            }
            i = j;
            let frame = Frame::Replicate {
                seq,
                client: client.to_string(),
                epoch,
                holder: self.me.clone(),
                changes,
            };
            for member in self.chain(&client) {
                if member == self.me {
                    continue;
                }
                let Some(id) = self.id_of(&member) else {
                    continue;
                };
                if let Some(tx) = lock(&self.links).get(&id).cloned() {
                    tx.push(&frame, &self.stats.dropped);
                    *per_node.entry(id).or_insert(0) += 1;
                }
            }
        }
        if per_node.is_empty() {
            return Committed::now();
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&self.waiting).insert(
            seq,
            Waiting {
                per_node,
                tx: Some(tx),
                resend: None,
            },
        );
        Committed::when(rx)
    }
}

impl Fabric for Cluster {
    fn linked(&self, node: NodeId) -> bool {
        lock(&self.links).contains_key(&node)
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

/// The changes that make a copy of a session equal to `snap`, whatever the
/// copy held before.
fn whole(snap: crate::snapshot::SessionSnapshot) -> Vec<SessionChange> {
    let mut out = vec![SessionChange::Ended];
    out.extend(crate::core::snapshot_changes(
        snap,
        Instant::now(),
        Arc::from,
    ));
    out
}

/// Writes `bytes` and then relays both ways between a client and its
/// owner's node until either side closes.
pub async fn relay<C>(client: &mut C, owner: &mut TcpStream, first: &[u8]) -> io::Result<()>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    owner.write_all(first).await?;
    tokio::io::copy_bidirectional(client, owner)
        .await
        .map(|_| ())
}
