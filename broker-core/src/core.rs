//! The broker's state machine: sessions, routing and retained messages.
//!
//! A sans-IO core in the manner of quinn-proto: every method takes an input
//! (a packet's meaning, a timer, an import) and returns [`Effects`], what
//! must happen as a result (mailbox items, change records), instead of doing
//! it. Callers hold the core's lock only for the call and apply the effects
//! after releasing it; encoding happens in the connection tasks.
//!
//! Sessions change only through [`SessionChange`] records; those of
//! persistent sessions are returned in the effects, in order, for the
//! change log (the cluster's replication stream).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqlb_protocol::{PacketId, Publish, QoS, RetainHandling};
use xxhash_rust::xxh3::Xxh3;

use crate::effects::{ChangeRecord, Deferred, Effects, Forward, LogEntry, Route};
use crate::hlc::{Clock, Hlc};
use crate::message::{Message, Pending, Sub};
use crate::outbox::{Backlog, Closing, Outgoing};
use crate::retained::Retained;
use crate::router::{shared_inner, Interest, NodeId, Pick, Router};
use crate::session::{InflightState, Session, SessionChange};
use crate::snapshot::{message_to_publish, publish_to_message, SessionSnapshot, SnapshotMessage};

/// Limits that protect the broker from one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Messages queued per session; at the limit the oldest is dropped.
    pub max_queued_messages: usize,
    /// Payload bytes queued per session; at the limit the oldest is dropped.
    pub max_queued_bytes: usize,
    /// Outbound QoS 1/2 window per client, whatever its Receive Maximum
    /// (3.x clients have none): bounds what one slow client can pin in
    /// memory beyond its bounded queue.
    pub max_inflight: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_queued_messages: 1000,
            max_queued_bytes: 16 << 20,
            max_inflight: 100,
        }
    }
}

/// Bytes queued for a connection task and not yet taken by it. Above this,
/// QoS 0 messages to that client are dropped (counted): a slow consumer must
/// not grow the broker's memory without bound. QoS 1/2 are bounded by the
/// inflight window instead.
pub const MAX_BACKLOG_BYTES: usize = 8 << 20;

/// Why the broker dropped a message instead of delivering it. Every reason
/// is exported (`$SYS/broker/messages/dropped/{label}` and
/// `mqlb_broker_messages_dropped_total{reason}`) by iterating
/// [`DropReason::ALL`], so a new reason cannot be forgotten there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A queued message dropped at a per-session limit (count or bytes).
    QueueFull,
    /// Its Message Expiry passed while it was queued.
    Expired,
    /// Larger than the client's Maximum Packet Size.
    TooLarge,
    /// QoS 0 to a client that was not reading (backlog over the limit).
    SlowConsumer,
}

impl DropReason {
    /// Every reason, for exporters.
    pub const ALL: [DropReason; 4] = [
        DropReason::QueueFull,
        DropReason::Expired,
        DropReason::TooLarge,
        DropReason::SlowConsumer,
    ];

    /// A fixed label for topics and metrics.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Expired => "expired",
            DropReason::TooLarge => "too_large",
            DropReason::SlowConsumer => "slow_consumer",
        }
    }
}

/// Counters for `$SYS` and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// PUBLISH packets routed.
    pub messages_in: u64,
    /// PUBLISH packets handed to connections.
    pub messages_out: u64,
    /// Peers' retained writes refused because their clock stamp was too
    /// far ahead of this node's.
    pub clock_drift_refused: u64,
    dropped: [u64; DropReason::ALL.len()],
}

impl Stats {
    /// Messages dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped.get(reason as usize).copied().unwrap_or(0)
    }

    /// Messages dropped for any reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }

    fn drop_one(&mut self, reason: DropReason) {
        if let Some(n) = self.dropped.get_mut(reason as usize) {
            *n += 1;
        }
    }
}

/// The result of a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connected {
    /// A previous session was resumed.
    pub session_present: bool,
    /// This connection's id, for detaching.
    pub conn: u64,
    /// The session's epoch from now on.
    pub epoch: u64,
}

/// Messages queued behind a connected subscriber's window above which it
/// counts as behind (see [`Core::route`]'s flow control).
pub const CONGESTED_DEPTH: usize = 64;

/// Queue depth at which a subscriber that was behind has drained: held-back
/// publishers are woken.
pub const DRAINED_DEPTH: usize = 16;

/// A subscriber that has acknowledged nothing for this long while behind
/// is stuck, not slow: it no longer counts for flow control (it costs only
/// its own bounded queue).
pub const STUCK_AFTER: Duration = Duration::from_secs(1);

/// The connection a session is attached to.
#[derive(Debug)]
struct Attached {
    conn: u64,
    /// Counts it among the node's connected clients while it lives.
    _counted: Counted,
    /// Its mailbox's backlog (see [`Backlog`]).
    backlog: Backlog,
    /// The outbound QoS 1/2 window.
    receive_maximum: u16,
    /// When the client last acknowledged a delivery (or attached): a
    /// subscriber behind its queue that has not moved since
    /// [`STUCK_AFTER`] is stuck.
    progress: Instant,
}

/// One connected client, counted while it lives: every way a connection
/// leaves its session (a disconnect, a takeover, the session's removal)
/// drops its [`Attached`], and with it the count, so the count cannot
/// drift from the sessions and a metrics scrape reads it without a scan
/// under the core's lock.
#[derive(Debug)]
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Counted(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How one publish's audience stands, for flow control: its connected
/// QoS 1/2 subscribers, and how many of them are behind and still moving.
#[derive(Debug, Default, Clone, Copy)]
struct Audience {
    fed: usize,
    behind: usize,
}

impl Audience {
    /// The node as a whole cannot keep up with this publisher: at least
    /// two of its subscribers, and more than half, are behind. One slow or
    /// stuck subscriber never holds a publisher back.
    fn congested(self) -> bool {
        self.behind >= 2 && self.behind * 2 > self.fed
    }
}

/// A session and, while connected, its connection.
#[derive(Debug)]
struct Entry {
    id: Arc<str>,
    session: Session,
    attached: Option<Attached>,
    /// Set when this node took the session over from a copy (a replica
    /// promoted, a snapshot imported). Boxed: most sessions never move.
    imported: Option<Box<Imported>>,
}

/// What a session that moved between nodes has already been given, so a
/// message arriving again by another path is not given twice.
#[derive(Debug, Default)]
struct Imported {
    /// When this node took the session over from a copy (`None`: it did
    /// not, the session only adopted messages): messages routed here
    /// before then went to the node that held it.
    at: Option<Instant>,
    /// Fingerprints of the messages the copy held (queued or in flight)
    /// and of every message adopted since: a message held for a dead
    /// holder and routed again, or a stale writer's copy adopted again, is
    /// not given twice (a QoS 2 message must arrive once).
    seen: HashSet<u64>,
    /// The inbound QoS 2 ids the copy held: messages the node that held
    /// the session routed (see [`Core::qos2_resent`]).
    qos2_in: Vec<u16>,
}

/// How long after a takeover a session notes what it is given, so that
/// the old holder's late changes are not adopted twice: longer than a
/// dead node's last frames take to arrive (the cluster keeps what each
/// session was given as long, `SEEN_FOR`).
pub const LATE_CHANGES_WITHIN: Duration = Duration::from_secs(20);

/// The peer whose interest stands for the copies this node owns and has
/// not promoted yet ([`Core::hold_for_copies`]): never reachable, so what
/// matches it is held.
pub const PENDING_COPIES: NodeId = NodeId::MAX;

/// Identifies a message by publisher, topic, payload and properties.
///
/// The same on every node and every version (prints travel in `Seen`
/// frames): XXH3-64 over a fixed encoding. The value is pinned by a test;
/// changing it is a wire change.
pub fn fingerprint(m: &Message) -> u64 {
    // Each field length-prefixed (little-endian) or tagged absent, so no two
    // different messages feed the same bytes; no allocation (this runs for
    // every message a replica's changes carry).
    fn bytes(h: &mut Xxh3, b: &[u8]) {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    }
    fn opt(h: &mut Xxh3, b: Option<&[u8]>) {
        match b {
            None => h.update(&[0]),
            Some(b) => {
                h.update(&[1]);
                bytes(h, b);
            }
        }
    }
    let mut h = Xxh3::new();
    opt(&mut h, m.origin.as_deref().map(str::as_bytes));
    bytes(&mut h, m.topic.as_str().as_bytes());
    bytes(&mut h, &m.payload);
    // The properties a publisher sets.
    let p = &m.properties;
    opt(
        &mut h,
        p.content_type.as_ref().map(|s| s.as_str().as_bytes()),
    );
    opt(
        &mut h,
        p.response_topic.as_ref().map(|s| s.as_str().as_bytes()),
    );
    opt(&mut h, p.correlation_data.as_deref());
    h.update(&(p.user_properties.len() as u64).to_le_bytes());
    for (k, v) in &p.user_properties {
        bytes(&mut h, k.as_str().as_bytes());
        bytes(&mut h, v.as_str().as_bytes());
    }
    opt(
        &mut h,
        p.payload_format_indicator
            .as_ref()
            .map(std::slice::from_ref),
    );
    h.digest()
}

/// Records `change` (for a persistent session) and applies it. Returns the
/// message a `Dequeued` took off the queue.
fn change(
    now: Instant,
    fx: &mut Effects,
    id: &Arc<str>,
    s: &mut Session,
    c: SessionChange,
) -> Option<Pending> {
    // A session is recorded while it is persistent, and on the change that
    // makes it so. A brand-new session (epoch 0) that ends with its
    // connection records nothing at all.
    let keep = match &c {
        SessionChange::Attached { expiry, .. } => {
            *expiry != Some(Duration::ZERO) || (s.epoch > 0 && s.is_persistent())
        }
        SessionChange::ExpirySet(expiry) => *expiry != Some(Duration::ZERO) || s.is_persistent(),
        _ => s.is_persistent(),
    };
    if keep {
        fx.records.push(LogEntry::Session(ChangeRecord {
            client: id.clone(),
            epoch: s.epoch,
            change: c.clone(),
        }));
    }
    let out = s.apply(c, now);
    if !keep {
        // Only recorded changes count: a copy sees nothing else.
        s.changes = 0;
    }
    out
}

/// `$SYS/...` describes one node: it is neither forwarded nor replicated.
fn is_node_local(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

/// The broker's state.
#[derive(Debug, Default)]
pub struct Core {
    sessions: crate::hashing::HashMap<Arc<str>, Entry>,
    /// Sessions with a connection attached (see [`Counted`]).
    connected: Arc<AtomicUsize>,
    /// Wills waiting out their Will Delay, at most one per client: a client
    /// that reconnects and leaves again replaces its pending will instead of
    /// adding one, so their number is bounded by the sessions.
    wills: crate::hashing::HashMap<Arc<str>, (Instant, Message)>,
    router: Router,
    /// The filters publishes are held for ([`Core::hold_for_copies`]).
    held_for_copies: Vec<String>,
    retained: Retained,
    clock: Clock,
    next_conn: u64,
    stats: Stats,
    limits: Limits,
    /// In a cluster: the peers reachable now (linked, and in the view), as
    /// the cluster last said ([`Core::set_reachable`]); `None` on a single
    /// node.
    peers: Option<Vec<NodeId>>,
    /// Retained writes are logged for the disk ([`Core::log_retained_writes`]).
    durable: bool,
    /// The time, as the shell last gave it ([`Core::advance`]).
    now: Option<Instant>,
    /// The last [`Core::stamp`].
    last_stamp: Option<Instant>,
    /// The wall clock (Unix milliseconds) at an instant, as the shell last
    /// gave it ([`Core::calibrate_wall`]): the wall clock of a later call
    /// is counted on from there.
    wall: Option<(Instant, u64)>,
    /// How many publishes of each publisher the shell holds for a takeover
    /// ([`Route::Held`], [`Route::Deferred`], [`Core::note_held`]): while
    /// one is held, that publisher's later publishes wait behind it, so a
    /// session promoted meanwhile gets them in the order they were sent.
    held_from: crate::hashing::HashMap<Arc<str>, u32>,
    /// When this node first had each message a peer forwarded, or a
    /// publisher sent again ([`crate::first_had`]).
    first_had: crate::first_had::FirstHad,
}

impl Core {
    /// Sets the time the next calls happen at: the node's state does
    /// before every call, a simulator with its own clock. The core reads
    /// no clock of its own once it has been given one (a core never told
    /// the time, such as one a unit test drives directly, reads the
    /// system's).
    pub fn advance(&mut self, now: Instant) {
        // Never back: callers on several threads read the clock a moment
        // apart, and a session's expiry must not move the wrong way.
        self.now = Some(self.now.map_or(now, |t| t.max(now)));
    }

    /// Sets the time and what the wall clock reads at it: retained writes
    /// are stamped (hybrid logical clock) and peers' stamps bounded by the
    /// wall clock counted on from here. The shell calibrates every second
    /// or so, so a stepped wall clock is followed within that.
    pub fn calibrate_wall(&mut self, now: Instant, wall: std::time::SystemTime) {
        let ms = wall
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.advance(now);
        self.wall = Some((now, ms));
    }

    /// The time of the current call.
    fn now(&self) -> Instant {
        self.now.unwrap_or_else(Instant::now)
    }

    /// The time of the current call, strictly later than any stamp before
    /// it: when a message was first had and when a session was imported
    /// are compared to tell whether the session can have had it, and two
    /// calls can be given the same time (or times read by different tasks
    /// out of the order they take the lock in). Ordered by the calls
    /// themselves, a session imported in the call after a message's first
    /// routing is never taken as there before it (found by the simulator:
    /// a subscriber that connected at the same instant as a held publish
    /// came was skipped when it was routed again, and never got it).
    fn stamp(&mut self) -> Instant {
        let now = self.now();
        let t = match self.last_stamp {
            Some(last) if now <= last => last + Duration::from_nanos(1),
            _ => now,
        };
        self.last_stamp = Some(t);
        t
    }

    /// The wall clock of the current call, in Unix milliseconds.
    fn wall_ms(&self) -> u64 {
        match self.wall {
            Some((at, ms)) => {
                let now = self.now();
                let ahead = u64::try_from(now.saturating_duration_since(at).as_millis())
                    .unwrap_or(u64::MAX);
                let behind = u64::try_from(at.saturating_duration_since(now).as_millis())
                    .unwrap_or(u64::MAX);
                ms.saturating_add(ahead).saturating_sub(behind)
            }
            None => crate::hlc::wall_ms(),
        }
    }

    /// An empty broker with default limits.
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// An empty broker.
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            limits,
            // Unit tests drive several cores in one thread and look their
            // connections up by id: each core numbers them apart.
            #[cfg(test)]
            next_conn: tests::conn_base(),
            ..Default::default()
        }
    }

    /// Joins a cluster: interest and retained writes become log entries
    /// for peers, publishes for peers become forwards, and retained
    /// versions carry `stamp` (this node's tie breaker). No peer is
    /// reachable until the cluster says so.
    pub fn join_cluster(&mut self, stamp: u32) {
        self.clock = Clock::new(stamp);
        self.peers = Some(Vec::new());
    }

    /// The peers reachable now, as the cluster sees them: called when a
    /// link opens or closes and when a view is committed.
    pub fn set_reachable(&mut self, peers: impl IntoIterator<Item = NodeId>) {
        if let Some(p) = self.peers.as_mut() {
            p.clear();
            p.extend(peers);
            p.sort_unstable();
            p.dedup();
        }
    }

    /// Whether peer `n` can be reached now.
    fn reachable(&self, n: NodeId) -> bool {
        self.peers
            .as_ref()
            .is_some_and(|p| p.binary_search(&n).is_ok())
    }

    /// Whether this node is in a cluster.
    fn clustered(&self) -> bool {
        self.peers.is_some()
    }

    /// Whether retained writes become log entries: for peers in a
    /// cluster, for the disk on a durable node.
    fn logs_retained(&self) -> bool {
        self.clustered() || self.durable
    }

    /// Makes retained writes log entries on a single node too, for its
    /// data directory.
    pub fn log_retained_writes(&mut self) {
        self.durable = true;
    }

    /// Puts back a retained write read from disk at start-up (last writer
    /// wins by `version`, as from a peer, without the drift check: the
    /// stamp is this node's own), and moves the clock past it so later
    /// writes win.
    pub fn restore_retained(&mut self, topic: &str, message: Option<Message>, version: Hlc) {
        let _ = self.clock.observe_at(version, self.wall_ms());
        self.retained.set(topic, message, version);
    }

    /// In a cluster, logs a change of this node's interest for its peers.
    fn note_interest(&self, filter: &str, i: Interest, fx: &mut Effects) {
        if !self.clustered() {
            return;
        }
        let gained = match i {
            Interest::Gained => true,
            Interest::Lost => false,
            Interest::Same => return,
        };
        fx.records.push(LogEntry::Interest {
            filter: filter.to_string(),
            gained,
        });
    }

    /// The filters this node's sessions hold: sent whole to a peer whose
    /// link (re)opens, before any change.
    pub fn local_interest(&self) -> Vec<String> {
        self.router.local_interest().map(str::to_string).collect()
    }

    /// Every retained message and remembered deletion with its version:
    /// sent whole to a peer whose link (re)opens.
    pub fn retained_all(&self) -> Vec<(String, Option<Message>, Hlc)> {
        self.retained.all()
    }

    /// Peer `node` gained or lost interest in `filter`.
    pub fn peer_interest(&mut self, node: NodeId, filter: &str, gained: bool) {
        if gained {
            self.router.subscribe_node(node, filter);
        } else {
            self.router.unsubscribe_node(node, filter);
        }
    }

    /// Forgets peer `node`'s interest (its link closed, or it is about to
    /// resend all of it).
    pub fn forget_peer(&mut self, node: NodeId) {
        if node == PENDING_COPIES {
            self.held_for_copies.clear();
        }
        self.router.forget_node(node);
    }

    /// The filters of the copies this node owns and has not promoted yet:
    /// a publish matching one is held, as for an unreachable peer, until
    /// the shell says none is left, instead of matching nobody for the
    /// session about to be promoted here (found by the simulator). Replaces
    /// what was said before; the same filters again change nothing, so the
    /// cluster may say it on every tick and whenever a view is installed.
    pub fn hold_for_copies(&mut self, filters: &[String]) {
        if self.held_for_copies == filters {
            return;
        }
        self.held_for_copies = filters.to_vec();
        self.router.forget_node(PENDING_COPIES);
        for f in filters {
            self.router.subscribe_node(PENDING_COPIES, f);
        }
    }

    /// A publish a peer handed over: delivered to matching local sessions
    /// and, for each of `groups`, to one local member. Never forwarded
    /// again (so never loops) and never written to the retained store
    /// (retained writes are replicated on their own).
    pub fn route_from_peer(&mut self, m: Message, groups: &[Arc<str>]) -> Effects {
        let mut fx = Effects::none();
        self.stats.messages_in += 1;
        // One fingerprint for both of its uses below (found by counting
        // instructions across nodes: it was computed twice).
        let print = (m.qos != QoS::AtMostOnce).then(|| fingerprint(&m));
        if let Some(p) = print {
            let now = self.stamp();
            self.first_had.had(now, p);
        }
        let targets = self
            .router
            .matches(m.topic.as_str(), m.qos, m.origin.as_deref());
        if targets.sessions.is_empty() && groups.is_empty() {
            tracing::debug!(topic = %m.topic, origin = m.origin.as_deref(), "a peer's publish matched no session here");
        }
        // A QoS 2 forward that comes late, after a session it is for was
        // taken over here from a copy that had it already (the copy's
        // holder was given it too, and died): not given again (found by
        // the simulator with sessions on different chains). The skip goes
        // by the message's fingerprint, as a resend's does (see
        // `route_resent`).
        let print = print.filter(|_| m.qos == QoS::ExactlyOnce);
        for t in targets.sessions {
            if print
                .is_some_and(|p| self.had_lately(&t.client, p) || self.given_lately(&t.client, p))
            {
                continue;
            }
            self.deliver_to(t, &m, &mut fx);
        }
        for group in groups {
            if let Some(key) = self.router.group_key(group) {
                self.deliver_to_group(&key, m.clone(), None, true, &mut fx);
            }
        }
        fx
    }

    /// A publish a peer forwarded again ([`Core::reforward`]): as
    /// [`Core::route_from_peer`], but only to the sessions that cannot have
    /// it yet. One that was here when this node first had it (at `first`)
    /// had it then; one made from a copy that held it has it.
    pub fn route_again_from_peer(&mut self, m: Message, groups: &[Arc<str>]) -> Effects {
        let mut fx = Effects::none();
        self.stats.messages_in += 1;
        // A resend of it routed here (a partition held the first attempt
        // on the node it was cut off with, which forwards it now) counts
        // as having it: found by the simulator with sessions on different
        // chains, a QoS 2 message given twice after the partition healed.
        let first = self.first_had_now(&m);
        let targets = self
            .router
            .matches(m.topic.as_str(), m.qos, m.origin.as_deref());
        self.deliver_to_taken_over(targets.sessions, &m, first, &mut fx);
        for group in groups {
            if let Some(key) = self.router.group_key(group) {
                self.deliver_to_group(&key, m.clone(), None, true, &mut fx);
            }
        }
        fx
    }

    /// Delivers `m` to those of `sessions` that cannot hold it already:
    /// with `since`, only the ones taken over here after it; and never one
    /// made from a copy whose changes carried it.
    fn deliver_to_taken_over(
        &mut self,
        sessions: Vec<crate::router::SessionTarget>,
        m: &Message,
        since: Option<Instant>,
        fx: &mut Effects,
    ) {
        let print = fingerprint(m);
        for t in sessions {
            let Some(e) = self.sessions.get(&t.client) else {
                continue;
            };
            let imported = e.imported.as_deref();
            let fresh = match (since, imported) {
                (None, _) => true,
                (Some(since), Some(imp)) => imp.at.is_some_and(|at| at > since),
                (Some(_), None) => false,
            };
            if !fresh || imported.is_some_and(|imp| imp.seen.contains(&print)) {
                tracing::trace!(client = %t.client, fresh, payload = %String::from_utf8_lossy(&m.payload), "not given again: may have it");
                continue;
            }
            // Noted as had, so a message routed again once more (an
            // interested peer was unreachable, and it was held again)
            // does not reach this session twice.
            if let Some(e) = self.sessions.get_mut(&t.client) {
                e.imported
                    .get_or_insert_with(Box::default)
                    .seen
                    .insert(print);
            }
            self.deliver_to(t, m, fx);
        }
    }

    /// Routes `m` again after the node it went to died or refused it: to
    /// the peers now interested in it, as [`Route::Again`] (the node that
    /// took over the dead one's sessions has announced their interest
    /// since; only peers in `alive` and not in `exclude`, which refused it,
    /// are candidates), and to the sessions this node itself took over
    /// after `m` arrived. Local sessions that were here already had it.
    pub fn reforward(
        &mut self,
        m: Message,
        groups: Vec<Arc<str>>,
        alive: &[NodeId],
        exclude: &[NodeId],
    ) -> Effects {
        self.release_held(&m);
        let mut fx = Effects::none();
        let targets = self
            .router
            .matches(m.topic.as_str(), m.qos, m.origin.as_deref());
        // Sessions taken over here since the message arrived were on the
        // dead node then: it may have died before they held the message, so
        // they get it now, unless the copy they were made from had it (the
        // dead node replicated it first; it may even have been delivered
        // since).
        let routed = self.first_had_now(&m).unwrap_or(m.received);
        self.deliver_to_taken_over(targets.sessions, &m, Some(routed), &mut fx);
        // An interested peer that is not reachable now (a link that
        // flapped again, a node whose interest is kept until its sessions
        // have moved) may hold sessions the message is for: it is held
        // once more rather than counted as delivered.
        let unreachable = targets
            .nodes
            .iter()
            .any(|n| !alive.contains(n) && !exclude.contains(n));
        let mut peers: Vec<(NodeId, Vec<Arc<str>>)> = targets
            .nodes
            .into_iter()
            .filter(|n| alive.contains(n) && !exclude.contains(n))
            .map(|n| (n, Vec::new()))
            .collect();
        // The shared groups it was meant for take another turn, here or at
        // a live peer.
        for group in groups {
            let Some(key) = self.router.group_key(&group) else {
                continue;
            };
            if let Some(n) = self.deliver_to_group(&key, m.clone(), None, false, &mut fx) {
                match peers.iter_mut().find(|(p, _)| *p == n) {
                    Some((_, g)) => g.push(key),
                    None => peers.push((n, vec![key])),
                }
            }
        }
        if self.clustered() {
            for (node, groups) in peers {
                fx.forwards.push(Forward {
                    node,
                    message: m.clone(),
                    groups,
                    route: Route::Again,
                });
            }
            if unreachable && m.qos != QoS::AtMostOnce {
                self.hold(m, Vec::new(), &mut fx);
            }
        }
        fx
    }

    /// Notes that this node has `m` now; when it first had it, if it had
    /// it before (QoS 1 and 2 only).
    fn first_had_now(&mut self, m: &Message) -> Option<Instant> {
        if m.qos == QoS::AtMostOnce {
            return None;
        }
        let now = self.stamp();
        self.first_had.had(now, fingerprint(m))
    }

    /// Asks the shell to hold `m` for a takeover ([`Route::Held`]); its
    /// publisher's later publishes wait behind it.
    fn hold(&mut self, m: Message, groups: Vec<Arc<str>>, fx: &mut Effects) {
        // When this node routed it, in the order of the calls (a stamp):
        // routed again, it goes to the sessions imported after this
        // (`reforward`). The connection's clock reading, taken before the
        // lock, does not order it with a session imported meanwhile (found
        // by the simulator: a subscriber promoted as its client connected
        // at the same instant the publish came was skipped when the held
        // publish was routed again, and never got it).
        self.first_had_now(&m);
        self.note_held(&m);
        fx.forwards.push(Forward {
            node: 0,
            message: m,
            groups,
            route: Route::Held,
        });
    }

    /// The shell holds `m` for a takeover on its own account (a forward
    /// lost with its link, or refused): its publisher's later publishes
    /// wait behind it until [`Core::reforward`] routes it again.
    pub fn note_held(&mut self, m: &Message) {
        if let Some(o) = &m.origin {
            *self.held_from.entry(o.clone()).or_insert(0) += 1;
        }
    }

    /// A held publish is routed again (or, deferred, routed now).
    fn release_held(&mut self, m: &Message) {
        let Some(o) = &m.origin else {
            return;
        };
        if let Some(n) = self.held_from.get_mut(o) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.held_from.remove(o);
            }
        }
    }

    /// Whether `m` waits behind a publish of its publisher the shell holds.
    fn defers(&self, m: &Message) -> bool {
        if crate::mutations::on(crate::mutations::Mutation::LaterPublishesNotDeferred) {
            return false;
        }
        !self.held_from.is_empty()
            && m.qos != QoS::AtMostOnce
            && self.clustered()
            && m.origin
                .as_ref()
                .is_some_and(|o| self.held_from.contains_key(o))
    }

    /// Routes a publish that waited behind its publisher's held ones
    /// ([`Route::Deferred`]), now that they went: as it would have been
    /// routed when it came (its retained write was made then).
    pub fn route_deferred(&mut self, m: Message, how: Deferred) -> Effects {
        self.release_held(&m);
        let resent = match how {
            Deferred::New { resent } => resent,
            Deferred::Resent => return self.resent_to_targets(&m),
        };
        // A QoS 2 one goes to peers as sent again: its publisher, whose
        // answer waited, may have sent it again through another node
        // meanwhile (cut off with this one, it reconnected elsewhere), so a
        // peer that had it gives it only to sessions that cannot have it
        // (found by the simulator with sessions on different chains: given
        // twice after a partition healed).
        let again = (resent || m.qos == QoS::ExactlyOnce)
            && !crate::mutations::on(crate::mutations::Mutation::ResendNotDeduplicated);
        // A deferred resend also skips a session taken over lately that
        // was given the message while the resend waited: adopted from
        // the dead holder's late frames (found by the simulator, seed
        // 69732 of the in-memory runs; routed at once, the resend came
        // first and the adoption found it held).
        self.route_to_targets(m, resent, again, resent, Effects::none())
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Connected clients.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// Sessions, connected or not.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Retained messages stored.
    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// Subscriptions `client_id`'s session holds.
    pub fn subscription_count(&self, client_id: &str) -> usize {
        self.sessions
            .get(client_id)
            .map_or(0, |e| e.session.subs.len())
    }

    /// Whether `client_id`'s session holds a subscription to `filter`.
    pub fn has_subscription(&self, client_id: &str, filter: &str) -> bool {
        self.sessions
            .get(client_id)
            .is_some_and(|e| e.session.subs.contains_key(filter))
    }

    /// Subscriptions (shared group memberships included).
    pub fn subscriptions(&self) -> usize {
        self.router.local_subscriptions()
    }

    /// Whether the counts kept for [`Core::connected`] and
    /// [`Core::subscriptions`] agree with a scan of every session, the
    /// scan they spare a metrics scrape: for tests and the simulator.
    pub fn check_counts(&self) -> Result<(), String> {
        let connected = self
            .sessions
            .values()
            .filter(|e| e.attached.is_some())
            .count();
        let subscriptions: usize = self.sessions.values().map(|e| e.session.subs.len()).sum();
        if (connected, subscriptions) == (self.connected(), self.subscriptions()) {
            return Ok(());
        }
        Err(format!(
            "counts kept: {} connected, {} subscriptions; counted: {connected}, {subscriptions}",
            self.connected(),
            self.subscriptions()
        ))
    }

    /// Attaches a connection to `client_id`'s session, taking over any other
    /// connection with that ID (it gets [`Closing::TakenOver`]). Every
    /// attach starts a new epoch, even after a clean start.
    pub fn connect(
        &mut self,
        client_id: &str,
        clean_start: bool,
        expiry: Option<Duration>,
        receive_maximum: u16,
        backlog: Backlog,
    ) -> (Connected, Effects) {
        let mut fx = Effects::none();
        self.next_conn += 1;
        let conn = self.next_conn;
        let mut epoch = 1;
        if let Some(e) = self.sessions.get_mut(client_id) {
            epoch = e.session.epoch + 1;
            if let Some(old) = e.attached.take() {
                fx.send(old.conn, Outgoing::Close(Closing::TakenOver));
                fx.drained = true;
            }
        }
        // Back before its Will Delay ran out: the will is not sent
        // (3.1.3.2.2; the attach below takes it off the session too).
        self.wills.remove(client_id);
        if clean_start {
            self.drop_session(client_id, &mut fx);
        }
        let session_present = self.sessions.contains_key(client_id);
        let id: Arc<str> = match self.sessions.get(client_id) {
            Some(e) => e.id.clone(),
            None => Arc::from(client_id),
        };
        let now = self.now();
        let e = self.sessions.entry(id.clone()).or_insert_with(|| Entry {
            id: id.clone(),
            session: Session::default(),
            attached: None,
            imported: None,
        });
        change(
            now,
            &mut fx,
            &id,
            &mut e.session,
            SessionChange::Attached { epoch, expiry },
        );
        e.attached = Some(Attached {
            conn,
            _counted: Counted::new(&self.connected),
            backlog,
            receive_maximum: receive_maximum.clamp(1, self.limits.max_inflight.max(1)),
            progress: now,
        });
        self.resume(&id, &mut fx);
        (
            Connected {
                session_present,
                conn,
                epoch,
            },
            fx,
        )
    }

    /// Resends inflight messages (DUP, or PUBREL where the PUBREC came) and
    /// sends queued ones. Part of [`Core::connect`], under the same lock:
    /// a publish routed between the two would otherwise go out ahead of the
    /// queue and then be sent again as a resend of an inflight one. The
    /// mailbox holds them until the connection has written its CONNACK.
    fn resume(&mut self, client_id: &str, fx: &mut Effects) {
        let Some(e) = self.sessions.get(client_id) else {
            return;
        };
        let Some(a) = &e.attached else {
            return;
        };
        for (&pid, inflight) in &e.session.inflight {
            let o = match (inflight.state, PacketId::new(pid)) {
                (InflightState::AwaitPubcomp, Some(pid)) => Outgoing::Pubrel(pid),
                _ => {
                    let mut p = inflight.publish.clone();
                    tracing::trace!(client = client_id, pid, payload = %String::from_utf8_lossy(&p.payload), "deliver again (dup)");
                    p.dup = true;
                    self.stats.messages_out += 1;
                    Outgoing::Publish(p)
                }
            };
            fx.send(a.conn, o);
        }
        self.pump(client_id, fx);
    }

    /// Detaches connection `conn`. Messages it held for a shared group go to
    /// another member; the session is removed if it expires now.
    pub fn disconnect(&mut self, client_id: &str, conn: u64) -> Effects {
        let now = self.now();
        let mut fx = Effects::none();
        let Some(e) = self.sessions.get_mut(client_id) else {
            return fx;
        };
        if e.attached.as_ref().map(|a| a.conn) != Some(conn) {
            return fx; // taken over already
        }
        if e.attached.take().is_some() {
            fx.drained = true;
        }
        // Shared-group messages are not kept waiting for this member when
        // another member can take them; the last member keeps its own.
        let router = &self.router;
        let has_other = |p: &Pending| {
            p.shared
                .as_deref()
                .is_some_and(|g| router.has_other_member(g, client_id))
        };
        let mut handover = Vec::new();
        let pids: Vec<u16> = e
            .session
            .inflight
            .iter()
            .filter(|(_, i)| i.state != InflightState::AwaitPubcomp && has_other(&i.pending))
            .map(|(&pid, _)| pid)
            .collect();
        for pid in pids.into_iter().filter_map(PacketId::new) {
            if let Some(i) = e.session.inflight.get(&pid.get()) {
                handover.push(i.pending.clone());
            }
            change(
                now,
                &mut fx,
                &e.id,
                &mut e.session,
                SessionChange::Completed(pid),
            );
        }
        let positions: Vec<u32> = e
            .session
            .queue
            .iter()
            .enumerate()
            .filter(|(_, p)| has_other(p))
            .filter_map(|(i, _)| u32::try_from(i).ok())
            .collect();
        if !positions.is_empty() {
            for &i in &positions {
                if let Some(p) = e.session.queue.get(i as usize) {
                    handover.push(p.clone());
                }
            }
            change(
                now,
                &mut fx,
                &e.id,
                &mut e.session,
                SessionChange::QueueRemoved(positions),
            );
        }
        if e.session.is_persistent() {
            change(now, &mut fx, &e.id, &mut e.session, SessionChange::Detached);
        } else {
            self.drop_session(client_id, &mut fx);
        }
        for p in handover {
            if let Some(group) = p.shared.clone() {
                self.deliver_to_group(&group, p.msg, Some(client_id), true, &mut fx);
            }
        }
        fx
    }

    /// Holds `will` until `delay` has passed, or until the session ends if
    /// that is sooner; a reconnect cancels it. Replaces an earlier pending
    /// will of the same client.
    pub fn schedule_will(&mut self, client_id: &str, will: Message, delay: Duration) -> Effects {
        let mut fx = Effects::none();
        let now = self.now();
        let due = now + delay;
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let due_ms = self.wall_ms().saturating_add(ms);
        let kept = !crate::mutations::on(crate::mutations::Mutation::WillOnlyOnHolder);
        let id = match self.sessions.get_mut(client_id).filter(|_| kept) {
            Some(e) => {
                // Kept with the session: its chain and the disk have it.
                let w = crate::session::Will {
                    due_ms,
                    message: will.clone(),
                };
                change(
                    now,
                    &mut fx,
                    &e.id,
                    &mut e.session,
                    SessionChange::WillSet(Some(Box::new(w))),
                );
                e.id.clone()
            }
            None => Arc::from(client_id),
        };
        self.wills.insert(id, (due, will));
        fx
    }

    /// Puts back a will, due at `due_ms` (Unix milliseconds; at once if
    /// that has passed): a session's, imported, or one read from a data
    /// directory written before wills were kept with their sessions.
    pub fn restore_will(&mut self, client_id: &str, due_ms: u64, will: Message) {
        let left = Duration::from_millis(due_ms.saturating_sub(self.wall_ms()));
        let due = self.now() + left;
        self.wills.insert(Arc::from(client_id), (due, will));
    }

    /// Wills waiting out their delay.
    pub fn pending_wills(&self) -> usize {
        self.wills.len()
    }

    /// Publishes the wills whose delay has passed or whose session has
    /// ended (MQTT 5 3.1.3.2.2: whichever comes first).
    pub fn publish_due_wills(&mut self, now: Instant) -> Effects {
        let mut fx = Effects::none();
        let sessions = &self.sessions;
        let due: Vec<Arc<str>> = self
            .wills
            .iter()
            .filter(|(id, (at, _))| *at <= now || !sessions.contains_key(&***id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some((_, mut will)) = self.wills.remove(&id) {
                // Its Message Expiry counts from now, when it is published
                // (3.1.3.2.4), not from the disconnect.
                will.received = now;
                // Sent: off the session, so the node that takes it over
                // does not send it again.
                if let Some(e) = self.sessions.get_mut(&id) {
                    if e.session.will.is_some() {
                        change(
                            now,
                            &mut fx,
                            &e.id,
                            &mut e.session,
                            SessionChange::WillSet(None),
                        );
                    }
                }
                fx.extend(self.route(will));
            }
        }
        fx
    }

    /// Whether a connection is attached to `client_id`'s session.
    pub fn is_connected(&self, client_id: &str) -> bool {
        self.sessions
            .get(client_id)
            .is_some_and(|e| e.attached.is_some())
    }

    /// Whether `conn` still owns `client_id` (false after a takeover).
    pub fn owns(&self, client_id: &str, conn: u64) -> bool {
        self.sessions
            .get(client_id)
            .and_then(|e| e.attached.as_ref())
            .is_some_and(|a| a.conn == conn)
    }

    /// Whether a session exists for `client_id`.
    pub fn has_session(&self, client_id: &str) -> bool {
        self.sessions.contains_key(client_id)
    }

    /// The connections attached to sessions now, for a graceful shutdown
    /// (the shell knows their mailboxes).
    pub fn attached_connections(&self) -> Vec<u64> {
        self.sessions
            .values()
            .filter_map(|e| e.attached.as_ref())
            .map(|a| a.conn)
            .collect()
    }

    /// Whether `client_id`'s session ends when its connection does
    /// (Session Expiry 0, or 3.x clean session).
    pub fn ends_with_connection(&self, client_id: &str) -> bool {
        self.sessions
            .get(client_id)
            .is_none_or(|e| !e.session.is_persistent())
    }

    /// Updates the session expiry (v5 DISCONNECT may change it).
    pub fn set_expiry(&mut self, client_id: &str, expiry: Option<Duration>) -> Effects {
        let now = self.now();
        let mut fx = Effects::none();
        if let Some(e) = self.sessions.get_mut(client_id) {
            change(
                now,
                &mut fx,
                &e.id,
                &mut e.session,
                SessionChange::ExpirySet(expiry),
            );
        }
        fx
    }

    fn drop_session(&mut self, client_id: &str, fx: &mut Effects) {
        let now = self.now();
        if let Some(mut e) = self.sessions.remove(client_id) {
            for filter in e.session.subs.keys() {
                let i = self.router.unsubscribe(client_id, filter);
                self.note_interest(filter, i, fx);
            }
            change(now, fx, &e.id, &mut e.session, SessionChange::Ended);
        }
    }

    /// Removes sessions whose expiry has passed. Returns how many.
    pub fn expire_sessions(&mut self, now: Instant) -> (usize, Effects) {
        let mut fx = Effects::none();
        let expired: Vec<Arc<str>> = self
            .sessions
            .values()
            .filter(|e| match (e.session.disconnected_at, e.session.expiry) {
                (Some(at), Some(x)) => now.duration_since(at) >= x,
                _ => false,
            })
            .map(|e| e.id.clone())
            .collect();
        for id in &expired {
            self.drop_session(id, &mut fx);
        }
        (expired.len(), fx)
    }

    /// Adds a subscription and sends the retained messages its retain
    /// handling asks for. Returns whether it existed.
    pub fn subscribe(&mut self, client_id: &str, filter: &str, sub: Sub) -> (bool, Effects) {
        let now = self.now();
        let mut fx = Effects::none();
        let Some(e) = self.sessions.get_mut(client_id) else {
            return (false, fx);
        };
        let id = e.id.clone();
        let existed = e.session.subs.contains_key(filter);
        change(
            now,
            &mut fx,
            &id,
            &mut e.session,
            SessionChange::Subscribed {
                filter: filter.to_string(),
                sub,
            },
        );
        let i = self.router.subscribe(&id, filter, sub);
        self.note_interest(filter, i, &mut fx);
        if shared_inner(filter).is_some() {
            // Shared subscriptions never get retained messages (4.8.2).
            return (existed, fx);
        }
        let send_retained = match sub.options.retain_handling {
            RetainHandling::SendAtSubscribe => true,
            RetainHandling::SendIfNew => !existed,
            RetainHandling::DoNotSend => false,
        };
        if send_retained {
            let mut matching = Vec::new();
            self.retained.matching(filter, |m| matching.push(m.clone()));
            for m in matching {
                let qos = m.qos.min(sub.options.qos);
                self.deliver(
                    &id,
                    Pending {
                        msg: m,
                        qos,
                        sub_ids: sub.id.into_iter().collect(),
                        retain: true,
                        shared: None,
                    },
                    &mut fx,
                );
            }
        }
        (existed, fx)
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&mut self, client_id: &str, filter: &str) -> (bool, Effects) {
        let now = self.now();
        let mut fx = Effects::none();
        let Some(e) = self.sessions.get_mut(client_id) else {
            return (false, fx);
        };
        if !e.session.subs.contains_key(filter) {
            return (false, fx);
        }
        change(
            now,
            &mut fx,
            &e.id,
            &mut e.session,
            SessionChange::Unsubscribed {
                filter: filter.to_string(),
            },
        );
        let i = self.router.unsubscribe(client_id, filter);
        self.note_interest(filter, i, &mut fx);
        (true, fx)
    }

    /// The retained message on `topic`.
    pub fn retained(&self, topic: &str) -> Option<&Message> {
        self.retained.get(topic)
    }

    /// Applies a retained message (an empty payload deletes) written at
    /// `version`, if it is newer than what the topic holds: last writer
    /// wins. For replicating retained messages between nodes.
    pub fn set_retained(&mut self, m: Message, version: Hlc) -> bool {
        if !self.clock.observe_at(version, self.wall_ms()) {
            self.stats.clock_drift_refused += 1;
            return false;
        }
        let topic = m.topic.clone();
        let message = (!m.payload.is_empty()).then_some(m);
        self.retained.set(topic.as_str(), message, version)
    }

    /// A peer's retained write (`None` deletes) at `version`; applied if
    /// newer than what `topic` holds.
    pub fn set_retained_from_peer(
        &mut self,
        topic: &str,
        message: Option<Message>,
        version: Hlc,
    ) -> bool {
        if !self.clock.observe_at(version, self.wall_ms()) {
            self.stats.clock_drift_refused += 1;
            tracing::warn!(
                topic,
                ?version,
                "a peer's retained write stamped too far in the future was refused"
            );
            return false;
        }
        self.retained.set(topic, message, version)
    }

    /// Sets how far ahead of this node's clock a peer's stamp may be.
    pub fn set_max_clock_drift(&mut self, drift: Duration) {
        self.clock.set_max_drift(drift);
    }

    /// Forgets retained-message deletions older than `age`: after that, no
    /// older write can still be in flight from another node.
    pub fn prune_retained_deletions(&mut self, age: Duration) -> usize {
        let mut cutoff = self.clock.now_at(self.wall_ms());
        let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        cutoff.wall_ms = cutoff.wall_ms.saturating_sub(age_ms);
        self.retained.prune_deletions(cutoff)
    }

    /// The version of `topic`'s last retained write.
    pub fn retained_version(&self, topic: &str) -> Option<Hlc> {
        self.retained.version(topic)
    }

    /// The routing function: every publish, from any source, goes here.
    pub fn route(&mut self, m: Message) -> Effects {
        self.route_as(m, false)
    }

    /// Routes a QoS 2 PUBLISH its publisher sent again (DUP) whose packet
    /// id its session does not hold, as a first publish, except to the
    /// sessions taken over here lately whose copy already held this very
    /// message now: the attempt the publisher never saw acknowledged reached
    /// their copy, not the publisher's (found by the simulator, seed 5650
    /// of the data-directory runs: after a power loss a subscriber's copy
    /// read back held the message in flight while the publisher's lacked
    /// its id, and the resend was given to it a second time). The skip goes
    /// by the message's fingerprint: two identical QoS 2 messages from one
    /// publisher, both sent again with DUP within [`LATE_CHANGES_WITHIN`]
    /// of a takeover, would reach such a session once.
    pub fn route_resent(&mut self, m: Message) -> Effects {
        let again = !crate::mutations::on(crate::mutations::Mutation::ResendRoutedAsNew);
        self.route_as(m, again)
    }

    /// Whether `client`'s session was taken over here within
    /// [`LATE_CHANGES_WITHIN`] and holds the message printed `print` now
    /// (queued or in flight). Not what it was ever given: a message noted
    /// as seen that the session no longer holds may be one a later copy
    /// lacked (skipping by that lost acknowledged messages in the
    /// simulator).
    fn had_lately(&self, client: &str, print: u64) -> bool {
        let now = self.now();
        let Some(e) = self.sessions.get(client) else {
            return false;
        };
        let lately = e.imported.as_deref().is_some_and(|imp| {
            imp.at
                .is_some_and(|at| now.saturating_duration_since(at) < LATE_CHANGES_WITHIN)
        });
        lately
            && e.session
                .queue
                .iter()
                .chain(e.session.inflight.values().map(|i| &i.pending))
                .any(|p| fingerprint(&p.msg) == print)
    }

    /// Whether `client`'s session was taken over here within
    /// [`LATE_CHANGES_WITHIN`] from a copy whose holder had given it the
    /// message printed `print` (its `Seen` prints, or its records).
    fn given_lately(&self, client: &str, print: u64) -> bool {
        let now = self.now();
        self.sessions
            .get(client)
            .and_then(|e| e.imported.as_deref())
            .is_some_and(|imp| {
                imp.at
                    .is_some_and(|at| now.saturating_duration_since(at) < LATE_CHANGES_WITHIN)
                    && imp.seen.contains(&print)
            })
    }

    fn route_as(&mut self, m: Message, resent: bool) -> Effects {
        let mut fx = Effects::none();
        self.stats.messages_in += 1;
        if m.retain {
            let version = self.clock.now_at(self.wall_ms());
            let message = (!m.payload.is_empty()).then(|| m.clone());
            if self.logs_retained() && !is_node_local(m.topic.as_str()) {
                fx.records.push(LogEntry::Retained {
                    topic: m.topic.to_string(),
                    message: message.clone(),
                    version,
                });
            }
            self.retained.set(m.topic.as_str(), message, version);
        }
        if self.defers(&m) {
            // Behind its publisher's held publishes: delivered nowhere
            // yet, not even here (a session promoted here since would get
            // it before them).
            self.note_held(&m);
            fx.forwards.push(Forward {
                node: 0,
                message: m,
                groups: Vec::new(),
                route: Route::Deferred(Deferred::New { resent }),
            });
            return fx;
        }
        self.route_to_targets(m, resent, resent, false, fx)
    }

    /// Delivers `m` to its subscribers here and forwards it to the peers
    /// interested in it.
    /// `again`: to peers as a message sent again ([`Route::Again`]);
    /// `skip_given`: not to a session taken over lately that was given it.
    fn route_to_targets(
        &mut self,
        m: Message,
        resent: bool,
        again: bool,
        skip_given: bool,
        mut fx: Effects,
    ) -> Effects {
        let targets = self
            .router
            .matches(m.topic.as_str(), m.qos, m.origin.as_deref());
        if targets.sessions.is_empty() && targets.nodes.is_empty() && targets.groups.is_empty() {
            tracing::debug!(topic = %m.topic, origin = m.origin.as_deref(), "a publish matched no subscriber");
        }
        let mut now = None;
        let mut audience = Audience::default();
        let print = resent.then(|| fingerprint(&m));
        // A resend of a message a peer forwarded here before (its node
        // died before the publisher had its PUBREC): the sessions here
        // then had it; only those taken over since may not (found by the
        // simulator with sessions on different chains).
        let first =
            if resent && !crate::mutations::on(crate::mutations::Mutation::ResendNotDeduplicated) {
                self.first_had_now(&m)
            } else {
                None
            };
        for t in targets.sessions {
            if print.is_some_and(|p| {
                self.had_lately(&t.client, p) || (skip_given && self.given_lately(&t.client, p))
            }) {
                continue;
            }
            if let (Some(first), Some(p)) = (first, print) {
                let fresh = self
                    .sessions
                    .get(&t.client)
                    .and_then(|e| e.imported.as_deref())
                    .is_some_and(|imp| {
                        imp.at.is_some_and(|at| at > first) && !imp.seen.contains(&p)
                    });
                if !fresh {
                    continue;
                }
            }
            if t.qos != QoS::AtMostOnce {
                self.tally(&t.client, m.origin.as_deref(), &mut now, &mut audience);
            }
            self.deliver_to(t, &m, &mut fx);
        }
        // Flow control, for the node as a whole: when most of the
        // publish's connected subscribers are behind (and still moving),
        // its publisher's next read waits for one to drain (at most
        // MAX_STALL). The shell registers the wait before it releases the
        // lock, so the drain cannot come first and be missed.
        if audience.congested() {
            fx.wants_stall = true;
        }
        let mut peers: Vec<(NodeId, Vec<Arc<str>>)> =
            targets.nodes.iter().map(|&n| (n, Vec::new())).collect();
        for group in targets.groups {
            if let Some(n) = self.deliver_to_group(&group, m.clone(), None, false, &mut fx) {
                match peers.iter_mut().find(|(p, _)| *p == n) {
                    Some((_, g)) => g.push(group),
                    None => peers.push((n, vec![group])),
                }
            }
        }
        if self.clustered() && !is_node_local(m.topic.as_str()) {
            let (live, gone): (Vec<_>, Vec<_>) =
                peers.into_iter().partition(|(n, _)| self.reachable(*n));
            // A resend goes to peers as a message sent again: one that
            // had it gives it only to sessions that cannot have it yet.
            let again =
                again && !crate::mutations::on(crate::mutations::Mutation::ResendNotDeduplicated);
            let route = if again { Route::Again } else { Route::First };
            for (node, groups) in live {
                fx.forwards.push(Forward {
                    node,
                    message: m.clone(),
                    groups,
                    route,
                });
            }
            if !gone.is_empty() && m.qos != QoS::AtMostOnce {
                let mut groups: Vec<Arc<str>> = gone.into_iter().flat_map(|(_, g)| g).collect();
                groups.dedup();
                self.hold(m, groups, &mut fx);
            }
        }
        fx
    }

    /// Gives `m` to one member of a shared group, round robin, preferring
    /// connected members with room in their window; `except` is skipped.
    /// Returns the peer node whose turn it was (the caller forwards it
    /// there); with `local_only`, only local members are candidates.
    fn deliver_to_group(
        &mut self,
        group: &Arc<str>,
        m: Message,
        except: Option<&str>,
        local_only: bool,
        fx: &mut Effects,
    ) -> Option<NodeId> {
        let sessions = &self.sessions;
        let ready = |client: &str| {
            sessions.get(client).map(|e| {
                e.attached
                    .as_ref()
                    .is_some_and(|a| e.session.inflight.len() < usize::from(a.receive_maximum))
            })
        };
        let peers = &self.peers;
        let reachable = |n: NodeId| peers.as_ref().is_some_and(|p| p.binary_search(&n).is_ok());
        let (client, sub) = match self
            .router
            .pick(group, except, local_only, ready, reachable)?
        {
            Pick::Local(client, sub) => (client, sub),
            Pick::Node(n) => return Some(n),
        };
        let qos = m.qos.min(sub.options.qos);
        self.deliver(
            &client,
            Pending {
                msg: m,
                qos,
                sub_ids: sub.id.into_iter().collect(),
                retain: false,
                shared: Some(group.clone()),
            },
            fx,
        );
        None
    }

    /// Delivers `m` to one matching session as its subscriptions ask: the
    /// delivered QoS, their identifiers, and RETAIN kept only with Retain
    /// As Published (otherwise a routed message has RETAIN 0, 3.3.1.3).
    fn deliver_to(&mut self, t: crate::router::SessionTarget, m: &Message, fx: &mut Effects) {
        // A session taken over here lately may still get its old holder's
        // late changes, whose messages are adopted (`adopt`) unless the
        // session was given them: what it is given meanwhile is noted too.
        // (Found by the simulator with the view from Raft: a publisher's
        // resend routed here before the dead holder's last frames came was
        // given a second time by the adoption.)
        if t.qos != QoS::AtMostOnce {
            let now = self.now();
            if let Some(imp) = self
                .sessions
                .get_mut(&t.client)
                .and_then(|e| e.imported.as_deref_mut())
                .filter(|imp| {
                    imp.at
                        .is_some_and(|at| now.saturating_duration_since(at) < LATE_CHANGES_WITHIN)
                })
            {
                imp.seen.insert(fingerprint(m));
            }
        }
        let retain = t.retain_as_published && m.retain;
        tracing::trace!(client = %t.client, payload = %String::from_utf8_lossy(&m.payload), "given");
        self.deliver(
            &t.client,
            Pending {
                msg: m.clone(),
                qos: t.qos,
                sub_ids: t.sub_ids,
                retain,
                shared: None,
            },
            fx,
        );
    }

    /// Counts `client` (a QoS 1/2 subscriber of a publish from `origin`)
    /// in the publish's [`Audience`]: connected, and behind if its queue is
    /// past [`CONGESTED_DEPTH`] and it acknowledged something within
    /// [`STUCK_AFTER`]. A publisher is never counted for its own queue.
    fn tally(
        &self,
        client: &str,
        origin: Option<&str>,
        now: &mut Option<Instant>,
        audience: &mut Audience,
    ) {
        if origin == Some(client) {
            return;
        }
        let Some(e) = self.sessions.get(client) else {
            return;
        };
        let Some(a) = &e.attached else {
            return;
        };
        audience.fed += 1;
        if e.session.queue.len() > CONGESTED_DEPTH
            && now
                .get_or_insert_with(|| self.now())
                .duration_since(a.progress)
                < STUCK_AFTER
        {
            audience.behind += 1;
        }
    }

    /// Sends (or queues) one message to one session.
    fn deliver(&mut self, client_id: &str, p: Pending, fx: &mut Effects) {
        let now = self.now();
        let Some(e) = self.sessions.get_mut(client_id) else {
            return;
        };
        let can_send = e.attached.as_ref().is_some_and(|a| {
            p.qos == QoS::AtMostOnce || e.session.inflight.len() < usize::from(a.receive_maximum)
        });
        if can_send {
            self.send(client_id, p, fx);
            return;
        }
        if p.qos == QoS::AtMostOnce {
            return; // QoS 0 is not queued for offline sessions
        }
        change(now, fx, &e.id, &mut e.session, SessionChange::Enqueued(p));
        while e.session.queue.len() > self.limits.max_queued_messages
            || e.session.queued_bytes > self.limits.max_queued_bytes
        {
            if e.session.queue.is_empty() {
                break;
            }
            change(now, fx, &e.id, &mut e.session, SessionChange::Dequeued);
            self.stats.drop_one(DropReason::QueueFull);
        }
    }

    /// Moves queued messages into the inflight window.
    fn pump(&mut self, client_id: &str, fx: &mut Effects) {
        let now = self.now();
        loop {
            let Some(e) = self.sessions.get_mut(client_id) else {
                return;
            };
            let Some(max) = e.attached.as_ref().map(|a| usize::from(a.receive_maximum)) else {
                return;
            };
            if e.session.inflight.len() >= max || e.session.queue.is_empty() {
                return;
            }
            let Some(p) = change(now, fx, &e.id, &mut e.session, SessionChange::Dequeued) else {
                return;
            };
            if e.session.queue.len() == DRAINED_DEPTH {
                fx.drained = true;
            }
            self.send(client_id, p, fx);
        }
    }

    /// Builds one PUBLISH for an attached session, recording it as inflight
    /// for QoS > 0.
    fn send(&mut self, client_id: &str, p: Pending, fx: &mut Effects) {
        let now = self.now();
        let Some(e) = self.sessions.get_mut(client_id) else {
            return;
        };
        let expiry = match p.msg.remaining_expiry(now) {
            Ok(x) => x,
            Err(()) => {
                self.stats.drop_one(DropReason::Expired);
                return;
            }
        };
        let Some(a) = e.attached.as_ref() else {
            return;
        };
        if p.qos == QoS::AtMostOnce && a.backlog.bytes() > MAX_BACKLOG_BYTES {
            self.stats.drop_one(DropReason::SlowConsumer);
            return;
        }
        let packet_id = if p.qos == QoS::AtMostOnce {
            None
        } else {
            match e.session.free_pid() {
                Some(id) => Some(id),
                None => return,
            }
        };
        let mut properties = (*p.msg.properties).clone();
        properties.subscription_identifiers = p.sub_ids.clone();
        properties.topic_alias = None;
        properties.message_expiry_interval = expiry;
        let publish = Publish {
            dup: false,
            qos: p.qos,
            retain: p.retain,
            topic: p.msg.topic.clone(),
            packet_id,
            properties,
            payload: p.msg.payload.clone(),
        };
        let to = a.conn;
        tracing::trace!(client = client_id, pid = ?packet_id, qos = ?p.qos, payload = %String::from_utf8_lossy(&p.msg.payload), "deliver");
        if let Some(pid) = packet_id {
            change(
                now,
                fx,
                &e.id,
                &mut e.session,
                SessionChange::Sent {
                    pid,
                    publish: publish.clone(),
                    pending: p,
                },
            );
        }
        fx.send(to, Outgoing::Publish(publish));
        self.stats.messages_out += 1;
    }

    /// The connection could not send a message because it exceeds the
    /// client's Maximum Packet Size: it counts as delivered (MQTT 5
    /// 3.1.2.11.4), and its packet id is free again.
    pub fn discarded(&mut self, client_id: &str, pid: Option<PacketId>) -> Effects {
        let now = self.now();
        let mut fx = Effects::none();
        self.stats.drop_one(DropReason::TooLarge);
        self.stats.messages_out = self.stats.messages_out.saturating_sub(1);
        let Some(pid) = pid else {
            return fx;
        };
        if let Some(e) = self.sessions.get_mut(client_id) {
            if e.session.inflight.contains_key(&pid.get()) {
                change(
                    now,
                    &mut fx,
                    &e.id,
                    &mut e.session,
                    SessionChange::Completed(pid),
                );
            }
        }
        self.pump(client_id, &mut fx);
        fx
    }

    /// Records an inbound QoS 2 packet id; true the first time (route it),
    /// false for a resend (acknowledge only). `None` if the session holds
    /// `limit` unreleased ids already.
    pub fn qos2_received(
        &mut self,
        client_id: &str,
        pid: PacketId,
        limit: usize,
    ) -> (Option<bool>, Effects) {
        let now = self.now();
        let mut fx = Effects::none();
        let Some(e) = self.sessions.get_mut(client_id) else {
            return (None, fx);
        };
        if e.session.qos2_in.contains(&pid.get()) {
            return (Some(false), fx);
        }
        if e.session.qos2_in.len() >= limit {
            return (None, fx);
        }
        change(
            now,
            &mut fx,
            &e.id,
            &mut e.session,
            SessionChange::Qos2Received(pid),
        );
        (Some(true), fx)
    }

    /// A QoS 2 PUBLISH sent again with an id `client_id`'s session already
    /// holds: acknowledged, not routed again; except when the session was
    /// taken over from a copy that held the id. Then the node that routed
    /// the message may have died before this node had it for every session
    /// it was for (a batch reaches a chain member one session at a time,
    /// and a link can break in between), and the sessions taken over here
    /// that were not given it get it now, each once by its print (found by
    /// the simulator). Sessions that were here already had it from the
    /// node that routed it if this node had it at all ([`crate::first_had`]);
    /// if not, that node died holding its forward (a link down), and they
    /// get it now; interested peers get it as sent again ([`Route::Again`]:
    /// one that had it gives it only to sessions taken over since). Found
    /// by the simulator with sessions on different chains: the id reached
    /// this node in the dead node's link snapshot, the message never did,
    /// and the resend was only acknowledged.
    /// When the message matches a peer that cannot be reached, or copies
    /// this node owns and has not promoted yet (they may be the sessions
    /// the dead node had not given it to), it is held like a first publish
    /// and routed again once they are served (found by the simulator, seed
    /// 57086: the copies were promoted just after the resend).
    pub fn qos2_resent(&mut self, client_id: &str, pid: PacketId, m: &Message) -> Effects {
        let mut fx = Effects::none();
        let routed_elsewhere = self
            .sessions
            .get(client_id)
            .and_then(|e| e.imported.as_deref())
            .is_some_and(|imp| imp.qos2_in.contains(&pid.get()));
        if !routed_elsewhere {
            return fx;
        }
        if self.defers(m) {
            // Behind its publisher's held publishes (routed as this
            // resend once its turn comes).
            self.note_held(m);
            fx.forwards.push(Forward {
                node: 0,
                message: m.clone(),
                groups: Vec::new(),
                route: Route::Deferred(Deferred::Resent),
            });
            return fx;
        }
        self.resent_to_targets(m)
    }

    /// [`Core::qos2_resent`]'s routing, once it is the resend's turn.
    fn resent_to_targets(&mut self, m: &Message) -> Effects {
        let mut fx = Effects::none();
        let print = fingerprint(m);
        let had_here = self.first_had_now(m).is_some();
        let targets = self
            .router
            .matches(m.topic.as_str(), m.qos, m.origin.as_deref());
        for t in targets.sessions {
            let taken_over = self
                .sessions
                .get_mut(&t.client)
                .and_then(|e| e.imported.as_deref_mut())
                .filter(|imp| imp.at.is_some());
            let only_taken_over =
                crate::mutations::on(crate::mutations::Mutation::ResendOnlyToTakenOver);
            let give = match taken_over {
                Some(imp) => imp.seen.insert(print),
                // Here all along: it had it when this node did.
                None => !had_here && !only_taken_over,
            };
            if !give {
                continue;
            }
            self.deliver_to(t, m, &mut fx);
        }
        if self.clustered() && m.qos != QoS::AtMostOnce {
            let (live, gone): (Vec<NodeId>, Vec<NodeId>) =
                targets.nodes.iter().partition(|&&n| self.reachable(n));
            let live = if crate::mutations::on(crate::mutations::Mutation::ResendOnlyToTakenOver) {
                Vec::new()
            } else {
                live
            };
            for node in live {
                fx.forwards.push(Forward {
                    node,
                    message: m.clone(),
                    groups: Vec::new(),
                    route: Route::Again,
                });
            }
            if !gone.is_empty() {
                self.hold(m.clone(), Vec::new(), &mut fx);
            }
        }
        fx
    }

    /// Whether `client_id` holds `limit` unreleased inbound QoS 2 ids and
    /// `pid` is not one of them (a new one would be over the limit).
    pub fn qos2_full(&self, client_id: &str, pid: PacketId, limit: usize) -> bool {
        self.sessions.get(client_id).is_some_and(|e| {
            !e.session.qos2_in.contains(&pid.get()) && e.session.qos2_in.len() >= limit
        })
    }

    /// PUBREL: forgets the id; false if it was unknown.
    pub fn qos2_released(&mut self, client_id: &str, pid: PacketId) -> (bool, Effects) {
        let now = self.now();
        let mut fx = Effects::none();
        let Some(e) = self.sessions.get_mut(client_id) else {
            return (false, fx);
        };
        if !e.session.qos2_in.contains(&pid.get()) {
            return (false, fx);
        }
        change(
            now,
            &mut fx,
            &e.id,
            &mut e.session,
            SessionChange::Qos2Released(pid),
        );
        (true, fx)
    }

    /// Handles PUBACK / PUBREC / PUBCOMP from the client. True when a
    /// PUBREL is due: the caller sends it once the change is committed, so
    /// a node that dies between the two cannot leave a copy that still
    /// waits for PUBREC (its holder would send the PUBLISH again to a client
    /// that has already released the id: a QoS 2 duplicate).
    pub fn acked(
        &mut self,
        client_id: &str,
        pid: PacketId,
        kind: mqlb_protocol::PacketType,
    ) -> (bool, Effects) {
        use mqlb_protocol::PacketType as T;
        let mut fx = Effects::none();
        let now = self.now();
        let Some(e) = self.sessions.get_mut(client_id) else {
            return (false, fx);
        };
        let mut pubrel = false;
        if let Some(a) = e.attached.as_mut() {
            a.progress = now;
        }
        match (kind, e.session.inflight.get(&pid.get()).map(|i| i.state)) {
            (T::Puback, Some(InflightState::AwaitPuback))
            | (T::Pubcomp, Some(InflightState::AwaitPubcomp)) => {
                change(
                    now,
                    &mut fx,
                    &e.id,
                    &mut e.session,
                    SessionChange::Completed(pid),
                );
                self.pump(client_id, &mut fx);
            }
            (T::Pubrec, Some(InflightState::AwaitPubrec)) => {
                change(
                    now,
                    &mut fx,
                    &e.id,
                    &mut e.session,
                    SessionChange::Received(pid),
                );
                pubrel = e.attached.is_some();
                if pubrel && crate::mutations::on(crate::mutations::Mutation::PubrelBeforeCommit) {
                    if let Some(a) = &e.attached {
                        fx.send(a.conn, Outgoing::Pubrel(pid));
                    }
                    pubrel = false;
                }
            }
            _ => {} // unknown id: ignore
        }
        (pubrel, fx)
    }

    /// Everything `client_id`'s session owns, for replication. `None`
    /// without a session.
    pub fn export_session(&self, client_id: &str) -> Option<SessionSnapshot> {
        Some(snapshot_of(
            &self.sessions.get(client_id)?.session,
            self.now(),
        ))
    }
}

/// A session's state as a snapshot (for a replica, an import, a move).
/// Message ages are counted to `now`.
pub fn snapshot_of(s: &Session, now: Instant) -> SessionSnapshot {
    {
        let mut subscriptions: Vec<(String, Sub)> =
            s.subs.iter().map(|(f, sub)| (f.clone(), *sub)).collect();
        subscriptions.sort_by(|a, b| a.0.cmp(&b.0));
        let mut qos2_in: Vec<u16> = s.qos2_in.iter().copied().collect();
        qos2_in.sort_unstable();
        let message = |p: &Pending, publish: Publish| SnapshotMessage {
            publish,
            shared: p.shared.as_deref().map(str::to_string),
            origin: p.msg.origin.as_deref().map(str::to_string),
        };
        SessionSnapshot {
            expiry: s.expiry,
            epoch: s.epoch,
            changes: s.changes,
            will: s.will.as_ref().map(|w| {
                let m = &w.message;
                (
                    w.due_ms,
                    SnapshotMessage {
                        publish: message_to_publish(m, m.qos, m.retain, &[], now),
                        shared: None,
                        origin: m.origin.as_deref().map(str::to_string),
                    },
                )
            }),
            next_pid: s.next_pid,
            qos2_in,
            subscriptions,
            inflight: s
                .inflight
                .values()
                .map(|i| (i.state, message(&i.pending, i.publish.clone())))
                .collect(),
            queued: s
                .queue
                .iter()
                .map(|p| {
                    message(
                        p,
                        message_to_publish(&p.msg, p.qos, p.retain, &p.sub_ids, now),
                    )
                })
                .collect(),
        }
    }
}

/// The changes that rebuild the session `snap` describes, in order, on an
/// empty session. `group_key` turns a shared group's name into the shared
/// key the caller keeps for it.
pub fn snapshot_changes(
    snap: SessionSnapshot,
    now: Instant,
    group_key: impl Fn(String) -> Arc<str>,
) -> Vec<SessionChange> {
    let mut out = vec![SessionChange::Attached {
        epoch: snap.epoch,
        expiry: snap.expiry,
    }];
    for (filter, sub) in snap.subscriptions {
        out.push(SessionChange::Subscribed { filter, sub });
    }
    for pid in snap.qos2_in.iter().filter_map(|&p| PacketId::new(p)) {
        out.push(SessionChange::Qos2Received(pid));
    }
    let pending = |m: SnapshotMessage| Pending {
        msg: publish_to_message(&m.publish, m.origin.as_deref(), now),
        qos: m.publish.qos,
        sub_ids: m.publish.properties.subscription_identifiers.clone(),
        retain: m.publish.retain,
        shared: m.shared.map(&group_key),
    };
    for (state, m) in snap.inflight {
        let Some(pid) = m.publish.packet_id else {
            continue;
        };
        let publish = m.publish.clone();
        out.push(SessionChange::Sent {
            pid,
            publish,
            pending: pending(m),
        });
        if state == InflightState::AwaitPubcomp {
            out.push(SessionChange::Received(pid));
        }
    }
    for m in snap.queued {
        out.push(SessionChange::Enqueued(pending(m)));
    }
    if let Some((due_ms, m)) = snap.will {
        out.push(SessionChange::WillSet(Some(Box::new(
            crate::session::Will {
                due_ms,
                message: publish_to_message(&m.publish, m.origin.as_deref(), now),
            },
        ))));
    }
    out.push(SessionChange::PidCursor(snap.next_pid));
    out.push(SessionChange::Detached);
    out.push(SessionChange::Counted(snap.changes));
    out
}

impl Core {
    /// Installs a session from a snapshot (offline, as after a failover),
    /// replacing any offline session with that ID, by replaying it as
    /// session changes. Refused while a client is connected with that ID.
    pub fn import_session(
        &mut self,
        client_id: &str,
        snap: SessionSnapshot,
    ) -> Result<Effects, &'static str> {
        let now = self.now();
        if self.is_connected(client_id) {
            return Err("client is connected");
        }
        let mut fx = Effects::none();
        self.drop_session(client_id, &mut fx);
        let id: Arc<str> = Arc::from(client_id);
        let mut e = Entry {
            id: id.clone(),
            session: Session::default(),
            attached: None,
            imported: None,
        };
        // A copy elsewhere (a replica) starts again from nothing.
        change(now, &mut fx, &id, &mut e.session, SessionChange::Ended);
        let router = &self.router;
        let changes = snapshot_changes(snap, now, |k| {
            router.group_key(&k).unwrap_or_else(|| Arc::from(k))
        });
        for c in changes {
            change(now, &mut fx, &id, &mut e.session, c);
        }
        let subs: Vec<(String, Sub)> = e
            .session
            .subs
            .iter()
            .map(|(f, s)| (f.clone(), *s))
            .collect();
        for (filter, sub) in &subs {
            let i = self.router.subscribe(&id, filter, *sub);
            self.note_interest(filter, i, &mut fx);
        }
        let held = e
            .session
            .queue
            .iter()
            .chain(e.session.inflight.values().map(|i| &i.pending))
            .map(|p| fingerprint(&p.msg))
            .collect();
        let qos2_in = e.session.qos2_in.iter().copied().collect();
        e.imported = Some(Box::new(Imported {
            at: Some(self.stamp()),
            seen: held,
            qos2_in,
        }));
        // Its will, if it waits out its delay, is this node's to send now
        // (at once if it is already due).
        self.wills.remove(client_id);
        if let Some(w) = &e.session.will {
            self.restore_will(client_id, w.due_ms, w.message.clone());
        }
        self.sessions.insert(id, e);
        Ok(fx)
    }

    /// Every persistent session's client ID: a new owner or replica is
    /// sent each whole.
    pub fn persistent_sessions(&self) -> Vec<Arc<str>> {
        self.sessions
            .values()
            .filter(|e| e.session.is_persistent())
            .map(|e| e.id.clone())
            .collect()
    }

    /// Removes a session without recording anything (another node holds
    /// the live copy now); a connection still attached is closed as taken
    /// over.
    pub fn evict_session(&mut self, client_id: &str) -> Effects {
        let mut fx = Effects::none();
        // The will goes with the session: the node that holds it now sends
        // it when it is due, unless its client is back (left here, it
        // would go out once the session was gone from here, even with the
        // client connected elsewhere).
        self.wills.remove(client_id);
        if let Some(mut e) = self.sessions.remove(client_id) {
            fx.records.push(LogEntry::Evicted(e.id.clone()));
            if let Some(a) = e.attached.take() {
                fx.send(a.conn, Outgoing::Close(Closing::TakenOver));
                fx.drained = true;
            }
            for filter in e.session.subs.keys() {
                let i = self.router.unsubscribe(client_id, filter);
                self.note_interest(filter, i, &mut fx);
            }
        }
        fx
    }

    /// [`Core::evict_session`], closing an attached connection as shutting
    /// down (v5: 0x8B) rather than taken over.
    pub fn evict_session_shutting_down(&mut self, client_id: &str) -> Effects {
        if let Some(a) = self
            .sessions
            .get_mut(client_id)
            .and_then(|e| e.attached.take())
        {
            let mut fx = Effects::none();
            fx.send(a.conn, Outgoing::Close(Closing::ShuttingDown));
            fx.drained = true;
            fx.extend(self.evict_session(client_id));
            return fx;
        }
        self.evict_session(client_id)
    }

    /// Records that the copy `client_id`'s session was taken over from had
    /// held these messages at some point (fingerprints), even if they were
    /// delivered and acknowledged since: routed again, they are not given
    /// twice.
    pub fn note_seen(&mut self, client_id: &str, seen: HashSet<u64>) {
        if let Some(e) = self.sessions.get_mut(client_id) {
            e.imported
                .get_or_insert_with(Box::default)
                .seen
                .extend(seen);
        }
    }

    /// Delivers messages another node accepted for `client_id`'s session
    /// before it learned the session had moved here.
    pub fn adopt(&mut self, client_id: &str, messages: Vec<Pending>) -> Effects {
        let mut fx = Effects::none();
        for p in messages {
            let Some(e) = self.sessions.get_mut(client_id) else {
                break;
            };
            // A stale writer may send the same messages more than once (a
            // change, then its whole session when a link reopens): each is
            // adopted once.
            let print = fingerprint(&p.msg);
            let held = e
                .session
                .queue
                .iter()
                .chain(e.session.inflight.values().map(|i| &i.pending))
                .any(|q| fingerprint(&q.msg) == print);
            let seen = &mut e.imported.get_or_insert_with(Box::default).seen;
            let first_time = seen.insert(print);
            if held || !first_time {
                continue;
            }
            tracing::trace!(client = client_id, payload = %String::from_utf8_lossy(&p.msg.payload), "adopted");
            self.deliver(client_id, p, &mut fx);
        }
        fx
    }

    /// The inbound QoS 2 bookkeeping among a stale writer's `changes` to
    /// `client_id`'s session (the node that held it before it moved here,
    /// heard late): an id it received the PUBLISH for is held here from now
    /// on, as an id the session's copy held, and one it released is
    /// released. Else the publisher's resend of that id would be routed a
    /// second time while the subscribers' sessions had adopted the message
    /// from the same writer: a QoS 2 duplicate (found by the simulator once
    /// the view came from Raft, which can drop a dead node before its last
    /// frames arrive). The resend then goes only to sessions taken over
    /// here that were not given it ([`Core::qos2_resent`]).
    pub fn adopt_qos2(&mut self, client_id: &str, changes: &[SessionChange]) -> Effects {
        let now = self.now();
        let mut fx = Effects::none();
        let Some(e) = self.sessions.get_mut(client_id) else {
            return fx;
        };
        for c in changes {
            match *c {
                SessionChange::Qos2Received(pid) if !e.session.qos2_in.contains(&pid.get()) => {
                    change(now, &mut fx, &e.id, &mut e.session, c.clone());
                    e.imported
                        .get_or_insert_with(Box::default)
                        .qos2_in
                        .push(pid.get());
                }
                SessionChange::Qos2Released(pid) if e.session.qos2_in.contains(&pid.get()) => {
                    change(now, &mut fx, &e.id, &mut e.session, c.clone());
                }
                _ => {}
            }
        }
        fx
    }

    /// The epoch of `client_id`'s session here.
    pub fn epoch(&self, client_id: &str) -> Option<u64> {
        self.sessions.get(client_id).map(|e| e.session.epoch)
    }

    /// Rebuilds a session from its change records alone, as a replica
    /// would, replacing any session with that ID; the live session and the
    /// rebuilt one are the same data. For the cluster and for tests.
    pub fn replay(&mut self, client_id: &str, records: &[ChangeRecord]) -> Effects {
        let now = self.now();
        let mut fx = Effects::none();
        self.drop_session(client_id, &mut fx);
        let id: Arc<str> = Arc::from(client_id);
        let mut session = Session::default();
        for r in records.iter().filter(|r| &*r.client == client_id) {
            if r.change == SessionChange::Ended {
                session = Session::default();
                continue;
            }
            session.apply(r.change.clone(), now);
        }
        for (filter, sub) in &session.subs {
            let i = self.router.subscribe(&id, filter, *sub);
            self.note_interest(filter, i, &mut fx);
        }
        self.sessions.insert(
            id.clone(),
            Entry {
                id,
                session,
                attached: None,
                imported: None,
            },
        );
        fx
    }
}

#[cfg(test)]
mod tests {

    /// Nodes of different versions must agree on a message's print: the
    /// encoding and hash are fixed, and so is this value.
    #[test]
    fn a_fingerprint_is_the_same_everywhere() {
        let m = Message {
            topic: MqttStr::try_from("sensors/1/temp").unwrap(),
            payload: bytes::Bytes::from_static(b"21.5"),
            qos: QoS::ExactlyOnce,
            retain: false,
            properties: Arc::new(mqlb_protocol::Properties {
                content_type: Some(MqttStr::try_from("text/plain").unwrap()),
                user_properties: vec![(
                    MqttStr::try_from("k").unwrap(),
                    MqttStr::try_from("v").unwrap(),
                )],
                ..Default::default()
            }),
            origin: Some(Arc::from("pub-1")),
            received: Instant::now(),
        };
        assert_eq!(fingerprint(&m), PINNED, "{:#x}", fingerprint(&m));
        // Moving bytes between fields changes it.
        let mut moved = m.clone();
        moved.topic = MqttStr::try_from("sensors/1/temp2").unwrap();
        moved.payload = bytes::Bytes::from_static(b"1.5");
        assert_ne!(fingerprint(&moved), fingerprint(&m));
    }
    /// Also what Python's `xxhash.xxh3_64_intdigest` gives for the same
    /// encoding: an independent implementation of the specification.
    const PINNED: u64 = 0x444e_b952_7f09_1921;

    use super::*;
    use crate::outbox::{Encoder, Outbox};
    use bytes::Bytes;
    use mqlb_protocol::{MqttStr, Packet, ProtocolVersion, SubscriptionOptions};
    use std::collections::HashMap;

    fn msg(topic: &str, qos: QoS, retain: bool, payload: &str) -> Message {
        Message {
            topic: MqttStr::try_from(topic).unwrap(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos,
            retain,
            properties: Arc::default(),
            origin: None,
            received: Instant::now(),
        }
    }

    fn sub(qos: QoS) -> Sub {
        Sub {
            options: SubscriptionOptions {
                qos,
                ..Default::default()
            },
            id: None,
        }
    }

    thread_local! {
        /// The mailboxes of this test thread's connections, by id.
        static MAILBOXES: std::cell::RefCell<HashMap<u64, Arc<Outbox>>> =
            std::cell::RefCell::default();
    }

    /// Connection ids far apart for each core a test makes.
    pub(super) fn conn_base() -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        NEXT.fetch_add(1 << 32, std::sync::atomic::Ordering::Relaxed)
    }

    /// [`Core::connect`] with the mailbox `tx`, registered as a node's
    /// state would.
    fn attach(
        c: &mut Core,
        id: &str,
        clean: bool,
        expiry: Option<Duration>,
        receive_maximum: u16,
        tx: Arc<Outbox>,
    ) -> (Connected, Effects) {
        let (connected, fx) = c.connect(id, clean, expiry, receive_maximum, tx.gauge());
        MAILBOXES.with(|m| m.borrow_mut().insert(connected.conn, tx));
        (connected, fx)
    }

    /// Applies effects as the node's state would, after the call: each
    /// item into its connection's mailbox (a single node: nothing to wait
    /// for, no peers).
    fn run(fx: Effects) {
        let parts = fx.into_parts();
        MAILBOXES.with(|m| {
            let m = m.borrow();
            for (c, o) in parts.sends {
                if let Some(b) = m.get(&c) {
                    b.push(o);
                }
            }
        });
    }

    fn run2<T>((t, fx): (T, Effects)) -> T {
        run(fx);
        t
    }

    fn connect(
        c: &mut Core,
        id: &str,
        clean: bool,
        expiry: Option<Duration>,
        receive_maximum: u16,
        tx: Arc<Outbox>,
    ) -> Connected {
        run2(attach(c, id, clean, expiry, receive_maximum, tx))
    }

    /// A connection's mailbox for a client of `v`, twice: one end for the
    /// core, one to read.
    fn outbox_for(v: ProtocolVersion) -> (Arc<Outbox>, Arc<Outbox>) {
        let o = Arc::new(Outbox::new(Encoder::new(v, u32::MAX, 0)));
        (o.clone(), o)
    }

    fn outbox() -> (Arc<Outbox>, Arc<Outbox>) {
        outbox_for(ProtocolVersion::V5)
    }

    fn drain(rx: &Arc<Outbox>, v: ProtocolVersion) -> Vec<Packet> {
        let taken = rx.take();
        assert!(taken.discarded.is_empty());
        let mut buf = bytes::BytesMut::from(&taken.bytes[..]);
        let mut out = Vec::new();
        while let Ok(Some(p)) = mqlb_protocol::decode(&mut buf, v, 1 << 20) {
            out.push(p);
        }
        out
    }

    fn payloads(rx: &Arc<Outbox>, v: ProtocolVersion) -> Vec<String> {
        drain(rx, v)
            .into_iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(String::from_utf8_lossy(&p.payload).into_owned()),
                _ => None,
            })
            .collect()
    }

    const GONE: Option<Duration> = Some(Duration::ZERO);

    /// The counts a metrics scrape reads (connected clients,
    /// subscriptions) are kept as sessions change, not scanned: after
    /// every way a connection or a subscription comes and goes they agree
    /// with a scan.
    #[test]
    fn kept_counts_agree_with_a_scan() {
        let mut c = Core::new();
        let hour = Some(Duration::from_secs(3600));
        let check = |c: &Core, connected: usize, subscriptions: usize| {
            assert_eq!(c.check_counts(), Ok(()));
            assert_eq!(
                (c.connected(), c.subscriptions()),
                (connected, subscriptions)
            );
        };
        let (tx, _a) = outbox();
        let a = connect(&mut c, "a", false, hour, 10, tx).conn;
        let (tx, _b) = outbox();
        connect(&mut c, "b", false, hour, 10, tx);
        let (tx, _t) = outbox();
        connect(&mut c, "temp", true, None, 10, tx);
        for (id, f) in [
            ("a", "x/#"),
            ("a", "$share/g/y"),
            ("b", "$share/g/y"),
            ("temp", "z"),
        ] {
            run2(c.subscribe(id, f, sub(QoS::AtLeastOnce)));
        }
        run2(c.subscribe("a", "x/#", sub(QoS::ExactlyOnce)));
        check(&c, 3, 4);
        // A takeover: one connection replaces another.
        let (tx, _a2) = outbox();
        let a2 = connect(&mut c, "a", false, hour, 10, tx).conn;
        check(&c, 3, 4);
        // The replaced connection's late disconnect changes nothing.
        run(c.disconnect("a", a));
        check(&c, 3, 4);
        run(c.disconnect("a", a2));
        check(&c, 2, 4);
        run2(c.unsubscribe("b", "$share/g/y"));
        run2(c.unsubscribe("b", "$share/g/y"));
        check(&c, 2, 3);
        // A clean start drops the old session and its subscriptions.
        let (tx, _a3) = outbox();
        connect(&mut c, "a", true, hour, 10, tx);
        check(&c, 3, 1);
        // A session moved to another node: exported, evicted, imported.
        run2(c.subscribe("b", "w", sub(QoS::AtLeastOnce)));
        let snap = c.export_session("b").expect("b's session");
        run(c.evict_session("b"));
        check(&c, 2, 1);
        let mut other = Core::new();
        run(other.import_session("b", snap).expect("imported"));
        check(&other, 0, 1);
        run(c.evict_session_shutting_down("temp"));
        run(c.evict_session_shutting_down("a"));
        check(&c, 0, 0);
    }

    /// A publish routed right after a client reconnects, while its
    /// CONNACK is being written, goes out once and behind what was queued
    /// (connecting resumes the session under the same lock). It used to
    /// go first, then again as a resent inflight message: a QoS 2
    /// duplicate once its PUBREL had come in between.
    #[test]
    fn a_publish_routed_as_a_client_resumes_is_sent_once_in_order() {
        let mut c = Core::new();
        let v = ProtocolVersion::V5;
        let (tx, _rx) = outbox();
        let conn = connect(&mut c, "s", false, None, 10, tx).conn;
        run2(c.subscribe("s", "t", sub(QoS::ExactlyOnce)));
        run(c.disconnect("s", conn));
        for p in ["a", "b"] {
            run(c.route(msg("t", QoS::ExactlyOnce, false, p)));
        }
        let (tx, rx) = outbox();
        connect(&mut c, "s", false, None, 10, tx);
        run(c.route(msg("t", QoS::ExactlyOnce, false, "c")));
        let sent: Vec<(bool, String)> = drain(&rx, v)
            .into_iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => {
                    Some((p.dup, String::from_utf8_lossy(&p.payload).into_owned()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            sent,
            [
                (false, "a".to_string()),
                (false, "b".into()),
                (false, "c".into())
            ]
        );
    }

    /// Routes `n` QoS 1 messages on `topic` from `origin`; whether the
    /// last one held its publisher back.
    fn publish_n(c: &mut Core, topic: &str, origin: &str, n: usize) -> bool {
        let mut stalled = false;
        for i in 0..n {
            let mut m = msg(topic, QoS::AtLeastOnce, false, &i.to_string());
            m.origin = Some(Arc::from(origin));
            let fx = c.route(m);
            stalled = fx.wants_stall;
            run(fx);
        }
        stalled
    }

    /// Flow control is for the node as a whole: a subscriber that never
    /// reads (however far behind), or one slow one, never holds a
    /// publisher back; most of a publish's subscribers behind, at least
    /// two, do; and subscribers that stopped acknowledging (stuck) do not
    /// count.
    #[test]
    fn only_a_mostly_congested_audience_holds_a_publisher_back() {
        let mut c = Core::with_limits(Limits {
            max_queued_messages: 100_000,
            ..Limits::default()
        });
        let mut keep = Vec::new();
        for id in ["stuck", "a", "b", "c"] {
            let (tx, rx) = outbox();
            keep.push(rx);
            connect(&mut c, id, false, None, 1, tx);
            run2(c.subscribe(id, "t/#", sub(QoS::AtLeastOnce)));
        }
        // "stuck" alone on t/one: never acknowledges, falls far behind.
        let (tx, rx) = outbox();
        keep.push(rx);
        connect(&mut c, "lonely", false, None, 1, tx);
        run2(c.subscribe("lonely", "solo/#", sub(QoS::AtLeastOnce)));
        assert!(
            !publish_n(&mut c, "solo/x", "p", 500),
            "one subscriber behind held its publisher back"
        );
        // Four subscribers, none acknowledging: all behind, all still
        // "moving" (attached just now): the node cannot keep up.
        assert!(
            publish_n(&mut c, "t/x", "p", 200),
            "a publish whose every subscriber is behind was not held back"
        );
        // Only one of four behind: "a", "b" and "c" drain (acknowledge
        // everything), "stuck" does not.
        for id in ["a", "b", "c"] {
            for pid in 1..=u16::MAX {
                let Some(pid) = PacketId::new(pid) else {
                    continue;
                };
                if c.sessions
                    .get(id)
                    .is_none_or(|e| e.session.inflight.is_empty())
                {
                    break;
                }
                run2(c.acked(id, pid, mqlb_protocol::PacketType::Puback));
            }
            assert!(c.sessions[id].session.queue.is_empty());
        }
        assert!(
            !publish_n(&mut c, "t/x", "p", 1),
            "one stuck subscriber of four held the publisher back"
        );
        // All four behind again, but they stopped acknowledging
        // STUCK_AFTER ago: stuck, not slow; they cost only their queues.
        publish_n(&mut c, "t/x", "p", 200);
        for e in c.sessions.values_mut() {
            if let Some(a) = e.attached.as_mut() {
                a.progress -= STUCK_AFTER;
            }
        }
        assert!(
            !publish_n(&mut c, "t/x", "p", 1),
            "stuck subscribers held the publisher back"
        );
    }

    /// A stale writer's messages are adopted once, however often its copy
    /// arrives (a change, then its whole session on a reopened link), and
    /// not again after the client has had them.
    #[test]
    fn adopted_messages_are_adopted_once() {
        let hour = Some(Duration::from_secs(3600));
        let mut c = Core::new();
        let (tx, _rx) = outbox();
        let conn = connect(&mut c, "s", false, hour, 10, tx);
        run2(c.subscribe("s", "t/#", sub(QoS::ExactlyOnce)));
        run(c.disconnect("s", conn.conn));
        let stale: Vec<Pending> = (0..3)
            .map(|i| Pending {
                msg: msg("t/x", QoS::ExactlyOnce, false, &format!("m{i}")),
                qos: QoS::ExactlyOnce,
                sub_ids: Vec::new(),
                retain: false,
                shared: None,
            })
            .collect();
        let queued = |c: &Core| c.export_session("s").unwrap().queued.len();
        run(c.adopt("s", stale.clone()));
        assert_eq!(queued(&c), 3);
        run(c.adopt("s", stale.clone()));
        assert_eq!(queued(&c), 3, "adopted twice");
        // The client takes them; the stale copy arrives once more.
        let (tx, rx) = outbox();
        connect(&mut c, "s", false, hour, 10, tx);
        assert_eq!(payloads(&rx, ProtocolVersion::V5).len(), 3);
        run(c.adopt("s", stale));
        assert_eq!(
            payloads(&rx, ProtocolVersion::V5).len(),
            0,
            "delivered twice"
        );
    }

    /// A stale writer's inbound QoS 2 id is held by the session that moved
    /// here: the publisher's resend is not routed again (seed 1116 with the
    /// view from Raft); its release releases it.
    #[test]
    fn a_stale_writers_qos2_id_is_adopted() {
        let hour = Some(Duration::from_secs(3600));
        let mut c = Core::new();
        let (tx, _rx) = outbox();
        connect(&mut c, "pub", false, hour, 10, tx);
        let pid = PacketId::new(132).unwrap();
        run(c.adopt_qos2("pub", &[SessionChange::Qos2Received(pid)]));
        let (first, _) = c.qos2_received("pub", pid, 10);
        assert_eq!(first, Some(false), "the resend would be routed again");
        run(c.adopt_qos2("pub", &[SessionChange::Qos2Released(pid)]));
        let (first, _) = c.qos2_received("pub", pid, 10);
        assert_eq!(first, Some(true), "a released id is new again");
    }

    /// A message held for a dead node and routed again reaches the
    /// sessions this node took over after it arrived (they were on the dead
    /// node), not those that were here and had it already, nor one whose
    /// copy already held it (the dead node replicated it first).
    #[test]
    fn a_held_message_reaches_sessions_taken_over_since() {
        let hour = Some(Duration::from_secs(3600));
        let mut donor = Core::new();
        let persistent = |c: &mut Core, id: &str, q: QoS| {
            let (tx, _rx) = outbox();
            let conn = connect(c, id, false, hour, 10, tx);
            run2(c.subscribe(id, "t/#", sub(q)));
            run(c.disconnect(id, conn.conn));
        };
        persistent(&mut donor, "had-it", QoS::ExactlyOnce);
        // had-it's copy holds the message (replicated before the death);
        // missed-it subscribed after.
        run(donor.route(msg("t/x", QoS::ExactlyOnce, false, "held")));
        persistent(&mut donor, "missed-it", QoS::AtLeastOnce);
        let mut here = Core::new();
        let (tx, rx) = outbox();
        connect(&mut here, "local", true, GONE, 10, tx);
        run2(here.subscribe("local", "t/#", sub(QoS::ExactlyOnce)));
        // The message arrives here and goes to the (then live) holder,
        // which dies; its sessions are taken over here.
        let m = msg("t/x", QoS::ExactlyOnce, false, "held");
        std::thread::sleep(Duration::from_millis(2));
        for id in ["had-it", "missed-it"] {
            let snap = donor.export_session(id).unwrap();
            run(here.import_session(id, snap).unwrap());
        }
        let queued = |c: &Core, id: &str| c.export_session(id).unwrap().queued.len();
        let (had, missed) = (queued(&here, "had-it"), queued(&here, "missed-it"));
        assert_eq!(had, 1);
        run(here.reforward(m, Vec::new(), &[], &[]));
        assert_eq!(
            queued(&here, "missed-it"),
            missed + 1,
            "the taken-over session missed it"
        );
        assert_eq!(
            queued(&here, "had-it"),
            had,
            "a copy that had it got it twice"
        );
        assert!(
            payloads(&rx, ProtocolVersion::V5).is_empty(),
            "a local subscriber got it twice"
        );
    }

    /// In a cluster, interest and retained writes are entries of the
    /// ordered log, in the order the core made them, between the session
    /// records; `$SYS` is node-local and a single node logs neither.
    #[test]
    fn interest_and_retained_writes_are_log_entries() {
        let kinds = |fx: &Effects| -> Vec<String> {
            fx.log_entries()
                .iter()
                .map(|e| match e {
                    LogEntry::Session(_) => "session".to_string(),
                    LogEntry::Interest { filter, gained } => format!("interest {filter} {gained}"),
                    LogEntry::Retained { topic, message, .. } => {
                        format!("retained {topic} {}", message.is_some())
                    }
                    LogEntry::Store { copy, .. } => format!("store {:?}", copy.key),
                    LogEntry::StoreRead { key, .. } => format!("store read {key:?}"),
                    LogEntry::StoreReplica(c) => format!("store replica {:?}", c.key),
                    LogEntry::Replica { client, .. } => format!("replica {client}"),
                    LogEntry::Evicted(c) => format!("evicted {c}"),
                })
                .collect()
        };
        let mut c = Core::new();
        c.join_cluster(1);
        let (tx, _rx) = outbox();
        let (_, fx) = attach(&mut c, "dev", false, Some(Duration::from_secs(600)), 10, tx);
        run(fx);
        let (_, fx) = c.subscribe("dev", "a/#", sub(QoS::AtLeastOnce));
        assert_eq!(kinds(&fx), ["session", "interest a/# true"]);
        run(fx);
        let fx = c.route(msg("a/b", QoS::AtMostOnce, true, "r"));
        assert_eq!(kinds(&fx), ["retained a/b true"]);
        run(fx);
        let fx = c.route(msg("$SYS/x", QoS::AtMostOnce, true, "r"));
        assert!(kinds(&fx).is_empty(), "{:?}", kinds(&fx));
        run(fx);
        let (_, fx) = c.unsubscribe("dev", "a/#");
        assert_eq!(kinds(&fx), ["session", "interest a/# false"]);
        run(fx);
        // A single node has no peers to tell.
        let mut single = Core::new();
        let fx = single.route(msg("a/b", QoS::AtMostOnce, true, "r"));
        assert!(kinds(&fx).is_empty());
        run(fx);
    }

    /// A message routed again while an interested peer is unreachable (its
    /// link flapped again between the hold and the re-route) is held once
    /// more, never counted as delivered: that counted it as committed
    /// with no copy anywhere (a lost acknowledged message, seen in the
    /// flapping-link test).
    #[test]
    fn a_reforward_to_an_unreachable_interested_peer_is_held_again() {
        let mut c = Core::new();
        c.join_cluster(1);
        c.peer_interest(2, "t/#", true);
        let fx = c.reforward(
            msg("t/x", QoS::AtLeastOnce, false, "m"),
            Vec::new(),
            &[],
            &[],
        );
        let routes: Vec<Route> = fx.forwards.iter().map(|f| f.route).collect();
        assert_eq!(routes, [Route::Held]);
        // A peer that refused it is not waited for.
        let fx = c.reforward(
            msg("t/x", QoS::AtLeastOnce, false, "m"),
            Vec::new(),
            &[],
            &[2],
        );
        assert!(fx.forwards.is_empty());
        // Reachable: forwarded again.
        let fx = c.reforward(
            msg("t/x", QoS::AtLeastOnce, false, "m"),
            Vec::new(),
            &[2],
            &[],
        );
        let routes: Vec<Route> = fx.forwards.iter().map(|f| f.route).collect();
        assert_eq!(routes, [Route::Again]);
    }

    /// While a publish of a publisher is held for a takeover, its later
    /// publishes wait behind it, even for sessions here (one promoted here
    /// meanwhile would get them first); other publishers' are routed as
    /// ever. Routed again, the held one goes first, then the deferred ones
    /// as new (found by the simulator with sessions on different chains).
    #[test]
    fn a_publishers_later_publishes_wait_behind_its_held_one() {
        let v = ProtocolVersion::V5;
        let from = |payload: &str, origin: &str| Message {
            origin: Some(Arc::from(origin)),
            ..msg("t/x", QoS::AtLeastOnce, false, payload)
        };
        let mut c = Core::new();
        c.join_cluster(1);
        c.set_reachable([]);
        c.peer_interest(2, "t/#", true);
        let (tx, rx) = outbox();
        connect(&mut c, "here", true, GONE, 10, tx);
        run2(c.subscribe("here", "t/#", sub(QoS::AtLeastOnce)));
        // Peer 2 is unreachable: held for it, given here at once.
        let fx = c.route(from("1", "p"));
        let routes: Vec<Route> = fx.forwards.iter().map(|f| f.route).collect();
        assert_eq!(routes, [Route::Held]);
        run(fx);
        assert_eq!(payloads(&rx, v), ["1"]);
        // The next one of "p" waits whole, here too; another's does not.
        let fx = c.route(from("2", "p"));
        let routes: Vec<Route> = fx.forwards.iter().map(|f| f.route).collect();
        assert_eq!(routes, [Route::Deferred(Deferred::New { resent: false })]);
        run(fx);
        assert!(payloads(&rx, v).is_empty());
        run(c.route(from("x", "q")));
        assert_eq!(payloads(&rx, v), ["x"]);
        // Peer 2's sessions moved here; the held one goes again, then the
        // deferred one as new, and "p" is no longer held back.
        c.forget_peer(2);
        run(c.reforward(from("1", "p"), Vec::new(), &[], &[2]));
        run(c.route_deferred(from("2", "p"), Deferred::New { resent: false }));
        assert_eq!(payloads(&rx, v), ["2"]);
        let fx = c.route(from("3", "p"));
        assert!(fx.forwards.is_empty());
        run(fx);
        assert_eq!(payloads(&rx, v), ["3"]);
        // A hold the shell made on its own account counts too.
        c.note_held(&from("4", "p"));
        let routes: Vec<Route> = c
            .route(from("5", "p"))
            .forwards
            .iter()
            .map(|f| f.route)
            .collect();
        assert_eq!(routes, [Route::Deferred(Deferred::New { resent: false })]);
    }

    /// A publish matching a copy this node owns and has not promoted yet
    /// is held, not routed to nobody; once the copies are promoted it is
    /// not.
    #[test]
    fn a_publish_for_a_copy_about_to_be_promoted_is_held() {
        let mut c = Core::new();
        c.join_cluster(1);
        c.hold_for_copies(&["t/#".to_string()]);
        let fx = c.route(msg("t/x", QoS::AtLeastOnce, false, "m"));
        let routes: Vec<Route> = fx.forwards.iter().map(|f| f.route).collect();
        assert_eq!(routes, [Route::Held]);
        // Said again (at a view's install, then at the tick), the hold
        // stays; replaced, only the new filters hold.
        c.hold_for_copies(&["t/#".to_string()]);
        let held = |c: &mut Core, topic: &str| {
            let fx = c.route(msg(topic, QoS::AtLeastOnce, false, "m"));
            fx.forwards.iter().any(|f| f.route == Route::Held)
        };
        assert!(held(&mut c, "t/x"));
        c.hold_for_copies(&["u/#".to_string()]);
        assert!(!held(&mut c, "t/x") && held(&mut c, "u/x"));
        // Forgetting the pending copies' node as a peer forgets the hold:
        // saying it again holds again.
        c.forget_peer(PENDING_COPIES);
        assert!(!held(&mut c, "u/x"));
        c.hold_for_copies(&["u/#".to_string()]);
        assert!(held(&mut c, "u/x"));
        c.hold_for_copies(&[]);
        let fx = c.route(msg("t/x", QoS::AtLeastOnce, false, "m"));
        assert!(fx.forwards.is_empty());
    }

    /// A persistent session of `id`, subscribed to `t/#` at QoS 2, with
    /// no connection.
    fn offline_subscriber(c: &mut Core, id: &str) {
        let (tx, _rx) = outbox();
        let conn = connect(c, id, false, Some(Duration::from_secs(3600)), 10, tx);
        run2(c.subscribe(id, "t/#", sub(QoS::ExactlyOnce)));
        run(c.disconnect(id, conn.conn));
    }

    /// How many messages `id`'s session holds queued.
    fn queued_for(c: &Core, id: &str) -> usize {
        c.export_session(id).unwrap().queued.len()
    }

    /// A message a peer forwards again (another peer it went to died or
    /// refused it) reaches, on a node that had it first, only the sessions
    /// taken over since; on a node that never had it, every session but
    /// one whose copy carried it (given by the node it moved from).
    #[test]
    fn a_message_forwarded_again_reaches_only_sessions_that_cannot_have_it() {
        let m = msg("t/x", QoS::ExactlyOnce, false, "again");
        // A node that had it first: "was-here" got it then.
        let mut here = Core::new();
        offline_subscriber(&mut here, "was-here");
        run(here.route_from_peer(m.clone(), &[]));
        std::thread::sleep(Duration::from_millis(2));
        let mut donor = Core::new();
        offline_subscriber(&mut donor, "moved-in");
        run(here
            .import_session("moved-in", donor.export_session("moved-in").unwrap())
            .unwrap());
        run(here.route_again_from_peer(m.clone(), &[]));
        assert_eq!(queued_for(&here, "was-here"), 1, "given twice");
        assert_eq!(
            queued_for(&here, "moved-in"),
            1,
            "the moved session missed it"
        );
        // A node that never had it: a session whose copy's history holds
        // it (it was given and acknowledged where it was) does not get it.
        let mut other = Core::new();
        let mut gone = Core::new();
        offline_subscriber(&mut gone, "had-it");
        offline_subscriber(&mut gone, "missed-it");
        for id in ["had-it", "missed-it"] {
            run(other
                .import_session(id, gone.export_session(id).unwrap())
                .unwrap());
        }
        other.note_seen("had-it", HashSet::from([fingerprint(&m)]));
        run(other.route_again_from_peer(m, &[]));
        assert_eq!(queued_for(&other, "had-it"), 0, "given twice after a move");
        assert_eq!(
            queued_for(&other, "missed-it"),
            1,
            "the moved session missed it"
        );
    }

    /// A publish held for copies about to be promoted goes, routed again,
    /// to the sessions imported in a call after its routing, and only to
    /// those, whatever the times the calls were given: a session imported
    /// in the call after it at the same instant gets it, one imported in
    /// the call before it (the publisher's connection having read its
    /// clock earlier still) had it and does not get it twice.
    #[test]
    fn a_held_publish_reaches_the_sessions_imported_after_its_routing() {
        let mut donor = Core::new();
        offline_subscriber(&mut donor, "s");
        let t = Instant::now() + Duration::from_secs(1);
        let node = || {
            let mut c = Core::new();
            c.join_cluster(1);
            c.hold_for_copies(&["t/#".to_string()]);
            c
        };
        let import = |c: &mut Core, at: Instant| {
            c.advance(at);
            run(c
                .import_session("s", donor.export_session("s").unwrap())
                .unwrap());
        };
        let route = |c: &mut Core, received: Instant| {
            let mut m = msg("t/x", QoS::ExactlyOnce, false, "held");
            m.received = received;
            c.advance(t);
            let fx = c.route(m.clone());
            assert!(fx.forwards.iter().any(|f| f.route == Route::Held));
            run(fx);
            m
        };
        // Routed, then the session imported, both at `t`.
        let mut after = node();
        let m = route(&mut after, t);
        import(&mut after, t);
        after.hold_for_copies(&[]);
        run(after.reforward(m, Vec::new(), &[], &[]));
        assert_eq!(
            queued_for(&after, "s"),
            1,
            "the session imported after it missed it"
        );
        // The session imported at `t`, then the publish its connection
        // read at `t - 1 ms` routed.
        let mut before = node();
        import(&mut before, t);
        let m = route(&mut before, t - Duration::from_millis(1));
        assert_eq!(queued_for(&before, "s"), 1);
        before.hold_for_copies(&[]);
        run(before.reforward(m, Vec::new(), &[], &[]));
        assert_eq!(queued_for(&before, "s"), 1, "given twice");
    }

    /// A QoS 2 resend (DUP) of a message a peer forwarded here before
    /// (the publisher's node died before its PUBREC) skips the sessions
    /// that were here then, and goes to peers as sent again; and a peer
    /// that forwards the first attempt again later finds this node had it
    /// (found by the simulator with sessions on different chains).
    #[test]
    fn a_qos2_resend_of_a_forwarded_message_is_not_given_twice() {
        let v = ProtocolVersion::V5;
        let m = msg("t/x", QoS::ExactlyOnce, false, "fwd");
        let mut c = Core::new();
        c.join_cluster(1);
        c.set_reachable([2]);
        c.peer_interest(2, "t/#", true);
        let (tx, rx) = outbox();
        connect(&mut c, "here", true, GONE, 10, tx);
        run2(c.subscribe("here", "t/#", sub(QoS::ExactlyOnce)));
        run(c.route_from_peer(m.clone(), &[]));
        assert_eq!(payloads(&rx, v), ["fwd"]);
        let fx = c.route_resent(m.clone());
        let routes: Vec<Route> = fx.forwards.iter().map(|f| f.route).collect();
        assert_eq!(routes, [Route::Again], "a peer would give it as new");
        run(fx);
        assert!(payloads(&rx, v).is_empty(), "given twice");
        // Never forwarded here: the resend is given, and a later forward
        // again of the first attempt is not.
        let n = msg("t/x", QoS::ExactlyOnce, false, "resent-first");
        run(c.route_resent(n.clone()));
        assert_eq!(payloads(&rx, v), ["resent-first"]);
        run(c.route_again_from_peer(n, &[]));
        assert!(payloads(&rx, v).is_empty(), "given twice");
    }

    /// A QoS 2 PUBLISH sent again after its publisher's session was taken
    /// over from a copy that held its id: the node that routed it died
    /// with the batch half replicated, so a subscriber taken over with it
    /// may lack it. It gets it, once; one whose copy had it does not; and
    /// an id received here (not in the copy) is only acknowledged.
    #[test]
    fn a_qos2_resend_after_a_takeover_reaches_sessions_the_copy_missed() {
        let hour = Some(Duration::from_secs(3600));
        let persistent = |c: &mut Core, id: &str, filter: Option<&str>| {
            let (tx, _rx) = outbox();
            let conn = connect(c, id, false, hour, 10, tx);
            if let Some(f) = filter {
                run2(c.subscribe(id, f, sub(QoS::ExactlyOnce)));
            }
            run(c.disconnect(id, conn.conn));
        };
        let queued = |c: &Core, id: &str| c.export_session(id).unwrap().queued.len();
        let pid = PacketId::new(7).unwrap();
        let mut gone = Core::new();
        persistent(&mut gone, "pub", None);
        persistent(&mut gone, "had-it", Some("t/#"));
        persistent(&mut gone, "missed-it", Some("t/#"));
        let (first, _) = gone.qos2_received("pub", pid, 10);
        assert_eq!(first, Some(true));
        let mut here = Core::new();
        for id in ["pub", "had-it", "missed-it"] {
            run(here
                .import_session(id, gone.export_session(id).unwrap())
                .unwrap());
        }
        let m = msg("t/x", QoS::ExactlyOnce, false, "half");
        here.note_seen("had-it", HashSet::from([fingerprint(&m)]));
        let (first, _) = here.qos2_received("pub", pid, 10);
        assert_eq!(first, Some(false), "the copy holds the id");
        run(here.qos2_resent("pub", pid, &m));
        assert_eq!(queued(&here, "had-it"), 0, "given twice");
        assert_eq!(queued(&here, "missed-it"), 1, "lost");
        run(here.qos2_resent("pub", pid, &m));
        assert_eq!(queued(&here, "missed-it"), 1, "given twice on a third send");
        // An id this node received itself: its routing happened here.
        let own = PacketId::new(8).unwrap();
        let _ = here.qos2_received("pub", own, 10);
        run(here.qos2_resent("pub", own, &msg("t/x", QoS::ExactlyOnce, false, "own")));
        assert_eq!(queued(&here, "missed-it"), 1);
        // In a cluster, with copies matching it that this node owns and has
        // not promoted yet, the resend is held for them too (seed 57086).
        here.join_cluster(1);
        here.hold_for_copies(&["t/#".to_string()]);
        let late = msg("t/x", QoS::ExactlyOnce, false, "late");
        let fx = here.qos2_resent("pub", pid, &late);
        let routes: Vec<Route> = fx.forwards.iter().map(|f| f.route).collect();
        assert_eq!(
            routes,
            [Route::Held],
            "the copies about to be promoted lose it"
        );
        run(fx);
        here.hold_for_copies(&[]);
        assert!(here.qos2_resent("pub", pid, &late).forwards.is_empty());
    }

    /// The same resend reaches a session that was here all along when
    /// this node never had the message (the node that routed it died
    /// holding its forward here), and goes to interested peers as sent
    /// again; not when this node had it (found by the simulator with
    /// sessions on different chains: the resend was only acknowledged).
    #[test]
    fn a_qos2_resend_reaches_a_session_here_all_along_that_never_had_it() {
        let v = ProtocolVersion::V5;
        let pid = PacketId::new(7).unwrap();
        let mut gone = Core::new();
        let (tx, _rx) = outbox();
        let conn = connect(
            &mut gone,
            "pub",
            false,
            Some(Duration::from_secs(60)),
            10,
            tx,
        );
        run(gone.disconnect("pub", conn.conn));
        let _ = gone.qos2_received("pub", pid, 10);
        let mut here = Core::new();
        here.join_cluster(1);
        here.set_reachable([2]);
        here.peer_interest(2, "t/#", true);
        let (tx, rx) = outbox();
        connect(&mut here, "local", true, GONE, 10, tx);
        run2(here.subscribe("local", "t/#", sub(QoS::ExactlyOnce)));
        run(here
            .import_session("pub", gone.export_session("pub").unwrap())
            .unwrap());
        let _ = here.qos2_received("pub", pid, 10);
        let m = msg("t/x", QoS::ExactlyOnce, false, "never-here");
        let fx = here.qos2_resent("pub", pid, &m);
        let routes: Vec<Route> = fx.forwards.iter().map(|f| f.route).collect();
        assert_eq!(routes, [Route::Again]);
        run(fx);
        assert_eq!(payloads(&rx, v), ["never-here"], "lost");
        run(here.qos2_resent("pub", pid, &m));
        assert!(payloads(&rx, v).is_empty(), "given twice");
        // Forwarded here before: the session had it then.
        let n = msg("t/x", QoS::ExactlyOnce, false, "forwarded");
        run(here.route_from_peer(n.clone(), &[]));
        assert_eq!(payloads(&rx, v), ["forwarded"]);
        run(here.qos2_resent("pub", pid, &n));
        assert!(payloads(&rx, v).is_empty(), "given twice");
    }

    /// What a node first had is kept as long as late changes are looked
    /// for.
    #[test]
    fn first_had_is_kept_as_long_as_late_changes_count() {
        assert_eq!(crate::first_had::KEPT_FOR, LATE_CHANGES_WITHIN);
    }

    #[test]
    fn delivered_qos_is_the_minimum() {
        let mut c = Core::new();
        let (tx, rx) = outbox();
        connect(&mut c, "s", true, GONE, 10, tx);
        run2(c.subscribe("s", "a", sub(QoS::AtLeastOnce)));
        run2(c.subscribe("s", "b", sub(QoS::AtMostOnce)));
        run(c.route(msg("a", QoS::ExactlyOnce, false, "1")));
        run(c.route(msg("b", QoS::ExactlyOnce, false, "2")));
        let qos: Vec<QoS> = drain(&rx, ProtocolVersion::V5)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => p.qos,
                _ => panic!(),
            })
            .collect();
        assert_eq!(qos, [QoS::AtLeastOnce, QoS::AtMostOnce]);
    }

    #[test]
    fn empty_non_retained_publish_keeps_the_retained_message() {
        let mut c = Core::new();
        run(c.route(msg("r", QoS::AtMostOnce, true, "keep")));
        run(c.route(msg("r", QoS::AtMostOnce, false, "")));
        assert_eq!(
            c.retained("r").unwrap().payload,
            Bytes::from_static(b"keep")
        );
        run(c.route(msg("r", QoS::AtMostOnce, true, "")));
        assert!(c.retained("r").is_none());
        assert_eq!(c.retained_count(), 0);
    }

    #[test]
    fn retained_writes_are_versioned_last_writer_wins() {
        let mut c = Core::new();
        run(c.route(msg("r", QoS::AtMostOnce, true, "local")));
        let local = c.retained_version("r").unwrap();
        // An older write from elsewhere loses; a newer one wins.
        let older = Hlc {
            wall_ms: local.wall_ms - 1,
            ..local
        };
        assert!(!c.set_retained(msg("r", QoS::AtMostOnce, true, "old"), older));
        let newer = Hlc {
            wall_ms: local.wall_ms + 1000,
            logical: 0,
            node: 9,
        };
        assert!(c.set_retained(msg("r", QoS::AtMostOnce, true, "new"), newer));
        assert_eq!(c.retained("r").unwrap().payload, Bytes::from_static(b"new"));
        // Local writes after observing it order later.
        run(c.route(msg("r", QoS::AtMostOnce, true, "later")));
        assert!(c.retained_version("r").unwrap() > newer);
    }

    #[test]
    fn offline_queue_is_bounded_and_counted() {
        let mut c = Core::with_limits(Limits {
            max_queued_messages: 3,
            ..Limits::default()
        });
        let (tx, _rx) = outbox_for(ProtocolVersion::V3_1_1);
        let conn = connect(&mut c, "p", false, None, 10, tx).conn;
        run2(c.subscribe("p", "q", sub(QoS::AtLeastOnce)));
        run(c.disconnect("p", conn));
        for i in 0..5 {
            run(c.route(msg("q", QoS::AtLeastOnce, false, &i.to_string())));
        }
        assert_eq!(c.stats().dropped(DropReason::QueueFull), 2);
        let (tx, rx) = outbox_for(ProtocolVersion::V3_1_1);
        assert!(connect(&mut c, "p", false, None, 10, tx).session_present);
        assert_eq!(payloads(&rx, ProtocolVersion::V3_1_1), ["2", "3", "4"]);
    }

    #[test]
    fn receive_maximum_limits_inflight_and_acks_release_more() {
        let mut c = Core::new();
        let (tx, rx) = outbox();
        connect(&mut c, "w", true, GONE, 2, tx);
        run2(c.subscribe("w", "t", sub(QoS::AtLeastOnce)));
        for i in 0..5 {
            run(c.route(msg("t", QoS::AtLeastOnce, false, &i.to_string())));
        }
        let first = drain(&rx, ProtocolVersion::V5);
        assert_eq!(first.len(), 2);
        let Packet::Publish(p) = &first[0] else {
            panic!()
        };
        run(c
            .acked("w", p.packet_id.unwrap(), mqlb_protocol::PacketType::Puback)
            .1);
        assert_eq!(drain(&rx, ProtocolVersion::V5).len(), 1);
    }

    #[test]
    fn v5_properties_are_dropped_for_v3_subscribers() {
        let mut c = Core::new();
        let (tx, rx) = outbox_for(ProtocolVersion::V3_1_1);
        connect(&mut c, "old", true, GONE, 10, tx);
        run2(c.subscribe("old", "p", sub(QoS::AtMostOnce)));
        let mut m = msg("p", QoS::AtMostOnce, false, "x");
        let props = Arc::make_mut(&mut m.properties);
        props.user_properties.push((
            MqttStr::try_from("k").unwrap(),
            MqttStr::try_from("v").unwrap(),
        ));
        props.content_type = Some(MqttStr::try_from("text/plain").unwrap());
        run(c.route(m));
        let got = drain(&rx, ProtocolVersion::V3_1_1);
        let Packet::Publish(p) = &got[0] else {
            panic!()
        };
        assert_eq!(p.payload, Bytes::from_static(b"x"));
        assert!(p.properties.is_empty());
    }

    #[test]
    fn takeover_closes_the_old_connection_and_bumps_the_epoch() {
        let mut c = Core::new();
        let (tx1, rx1) = outbox();
        let first = connect(&mut c, "dup", false, None, 10, tx1);
        let (tx2, _rx2) = outbox();
        let second = connect(&mut c, "dup", false, None, 10, tx2);
        assert!(second.session_present);
        assert!(second.epoch > first.epoch);
        assert_eq!(rx1.take().close, Some(Closing::TakenOver));
        // The old connection's late disconnect does not detach the new one.
        run(c.disconnect("dup", first.conn));
        assert!(c.owns("dup", second.conn));
        // A clean start does not reset the epoch: a stale owner stays stale.
        let (tx3, _rx3) = outbox();
        let third = connect(&mut c, "dup", true, None, 10, tx3);
        assert!(third.epoch > second.epoch);
        assert_eq!(c.export_session("dup").unwrap().epoch, third.epoch);
    }

    #[test]
    fn shared_groups_round_robin_and_are_keyed_by_group_and_filter() {
        let mut c = Core::new();
        let v = ProtocolVersion::V5;
        let (ta, ra) = outbox();
        let (tb, rb) = outbox();
        let (tc, rc) = outbox();
        connect(&mut c, "a", true, GONE, 10, ta);
        connect(&mut c, "b", true, GONE, 10, tb);
        connect(&mut c, "c", true, GONE, 10, tc);
        run2(c.subscribe("a", "$share/g/t/+", sub(QoS::AtLeastOnce)));
        run2(c.subscribe("b", "$share/g/t/+", sub(QoS::AtLeastOnce)));
        // Same group name, other filter: a separate group.
        run2(c.subscribe("c", "$share/g/t/#", sub(QoS::AtLeastOnce)));
        for i in 0..4 {
            run(c.route(msg("t/x", QoS::AtLeastOnce, false, &i.to_string())));
        }
        let (a, b) = (payloads(&ra, v), payloads(&rb, v));
        assert_eq!(a.len() + b.len(), 4);
        assert_eq!(a.len(), 2, "round robin: {a:?} {b:?}");
        assert_eq!(payloads(&rc, v).len(), 4, "t/# group gets its own copy");
    }

    #[test]
    fn unacked_shared_message_goes_to_another_member_when_its_holder_leaves() {
        let mut c = Core::new();
        let v = ProtocolVersion::V3_1_1;
        let (ta, ra) = outbox_for(ProtocolVersion::V3_1_1);
        let (tb, rb) = outbox_for(ProtocolVersion::V3_1_1);
        let a = connect(&mut c, "a", false, None, 10, ta).conn;
        let b = connect(&mut c, "b", false, None, 10, tb).conn;
        run2(c.subscribe("a", "$share/g/job", sub(QoS::AtLeastOnce)));
        run2(c.subscribe("b", "$share/g/job", sub(QoS::AtLeastOnce)));
        run(c.route(msg("job", QoS::AtLeastOnce, false, "task")));
        let (got_a, got_b) = (payloads(&ra, v), payloads(&rb, v));
        assert_eq!(got_a.len() + got_b.len(), 1);
        let (holder, conn, other_rx) = if got_a.len() == 1 {
            ("a", a, rb)
        } else {
            ("b", b, ra)
        };
        run(c.disconnect(holder, conn));
        assert_eq!(payloads(&other_rx, v), ["task"]);
        assert!(c.export_session(holder).unwrap().inflight.is_empty());
    }

    #[test]
    fn message_expiry_counts_down_while_queued() {
        let mut c = Core::new();
        let v = ProtocolVersion::V5;
        let (tx, _rx) = outbox();
        let conn = connect(&mut c, "e", false, None, 10, tx).conn;
        run2(c.subscribe("e", "x", sub(QoS::AtLeastOnce)));
        run(c.disconnect("e", conn));
        let mut old = msg("x", QoS::AtLeastOnce, false, "stale");
        Arc::make_mut(&mut old.properties).message_expiry_interval = Some(5);
        old.received = Instant::now() - Duration::from_secs(10);
        let mut fresh = msg("x", QoS::AtLeastOnce, false, "fresh");
        Arc::make_mut(&mut fresh.properties).message_expiry_interval = Some(100);
        fresh.received = Instant::now() - Duration::from_secs(40);
        run(c.route(old));
        run(c.route(fresh));
        let (tx, rx) = outbox();
        connect(&mut c, "e", false, None, 10, tx);
        let got = drain(&rx, v);
        assert_eq!(got.len(), 1);
        let Packet::Publish(p) = &got[0] else {
            panic!()
        };
        assert_eq!(p.payload, Bytes::from_static(b"fresh"));
        let left = p.properties.message_expiry_interval.unwrap();
        assert!((59..=60).contains(&left), "expiry forwarded as {left}");
        assert_eq!(c.stats().dropped(DropReason::Expired), 1);
    }

    #[test]
    fn queue_byte_limit() {
        let mut c = Core::with_limits(Limits {
            max_queued_messages: 100,
            max_queued_bytes: 10,
            ..Limits::default()
        });
        let (tx, _rx) = outbox();
        let conn = connect(&mut c, "q", false, None, 10, tx).conn;
        run2(c.subscribe("q", "b", sub(QoS::AtLeastOnce)));
        run(c.disconnect("q", conn));
        for p in ["aaaa", "bbbb", "cccc"] {
            run(c.route(msg("b", QoS::AtLeastOnce, false, p)));
        }
        assert_eq!(c.stats().dropped(DropReason::QueueFull), 1);
    }

    /// A QoS 1 message too large for its client is dropped by its mailbox's
    /// encoder; the core frees its packet id and sends the next.
    #[test]
    fn a_message_too_large_for_the_client_counts_as_delivered() {
        let mut c = Core::new();
        let v = ProtocolVersion::V5;
        let o = Arc::new(Outbox::new(Encoder::new(v, 30, 0)));
        connect(&mut c, "small", true, GONE, 1, o.clone());
        run2(c.subscribe("small", "m", sub(QoS::AtLeastOnce)));
        run(c.route(msg("m", QoS::AtLeastOnce, false, &"x".repeat(50))));
        run(c.route(msg("m", QoS::AtLeastOnce, false, "ok")));
        let taken = o.take();
        assert!(
            taken.bytes.is_empty(),
            "window of one, and that one too large"
        );
        assert_eq!(taken.discarded.len(), 1);
        for pid in taken.discarded {
            run(c.discarded("small", pid));
        }
        assert_eq!(payloads(&o, v), ["ok"]);
        assert_eq!(c.stats().dropped(DropReason::TooLarge), 1);
    }

    #[test]
    fn slow_qos0_consumer_is_bounded() {
        let mut c = Core::new();
        let (tx, _never_read) = outbox();
        connect(&mut c, "slow", true, GONE, 10, tx);
        run2(c.subscribe("slow", "big", sub(QoS::AtMostOnce)));
        let mb = "x".repeat(1 << 20);
        for _ in 0..12 {
            run(c.route(msg("big", QoS::AtMostOnce, false, &mb)));
        }
        assert!(
            c.stats().messages_out <= 9,
            "sent {}",
            c.stats().messages_out
        );
        assert_eq!(
            c.stats().dropped(DropReason::SlowConsumer) + c.stats().messages_out,
            12
        );
    }

    /// rumqttd regression: the last member of a shared group leaves holding
    /// an unacked QoS 1 message. Its persistent session keeps it, it gets it
    /// again on reconnect, and the broker keeps serving.
    #[test]
    fn last_shared_member_keeps_its_unacked_message() {
        let mut c = Core::new();
        let v = ProtocolVersion::V3_1_1;
        let (tx, rx) = outbox_for(ProtocolVersion::V3_1_1);
        let conn = connect(&mut c, "only", false, None, 10, tx).conn;
        run2(c.subscribe("only", "$share/g/work", sub(QoS::AtLeastOnce)));
        run(c.route(msg("work", QoS::AtLeastOnce, false, "job")));
        assert_eq!(payloads(&rx, v), ["job"]);
        run(c.disconnect("only", conn));
        let (tx, rx) = outbox_for(ProtocolVersion::V3_1_1);
        assert!(connect(&mut c, "only", false, None, 10, tx).session_present);
        let again = drain(&rx, v);
        let Packet::Publish(p) = &again[0] else {
            panic!()
        };
        assert!(p.dup);
        assert_eq!(p.payload, Bytes::from_static(b"job"));
        // Still serving others.
        let (tx, rx2) = outbox_for(ProtocolVersion::V3_1_1);
        connect(&mut c, "other", true, GONE, 10, tx);
        run2(c.subscribe("other", "x", sub(QoS::AtMostOnce)));
        run(c.route(msg("x", QoS::AtMostOnce, false, "alive")));
        assert_eq!(payloads(&rx2, v), ["alive"]);
    }

    /// Export → bytes → import into another broker: the same subscriptions,
    /// the same inflight (resent with DUP and their packet ids) and the same
    /// queue, in order.
    #[test]
    fn session_snapshot_round_trip_moves_a_session() {
        let v = ProtocolVersion::V5;
        let mut a = Core::new();
        let (tx, rx) = outbox();
        let hour = Some(Duration::from_secs(3600));
        let conn = connect(&mut a, "dev", false, hour, 2, tx).conn;
        run2(a.subscribe(
            "dev",
            "cmd/#",
            Sub {
                options: SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    ..Default::default()
                },
                id: Some(7),
            },
        ));
        run2(a.subscribe("dev", "$share/g/jobs", sub(QoS::AtLeastOnce)));
        let pid = PacketId::new(42).unwrap();
        assert_eq!(run2(a.qos2_received("dev", pid, 10)), Some(true));
        for i in 0..4 {
            let mut m = msg("cmd/x", QoS::AtLeastOnce, false, &format!("m{i}"));
            Arc::make_mut(&mut m.properties).message_expiry_interval = Some(600);
            run(a.route(m));
        }
        // Two went out (receive maximum 2), two are queued.
        let sent = drain(&rx, v);
        assert_eq!(sent.len(), 2);
        run(a.disconnect("dev", conn));
        let snap = a.export_session("dev").unwrap();
        assert_eq!(snap.inflight.len(), 2);
        assert_eq!(snap.queued.len(), 2);
        let bytes = snap.to_bytes().unwrap();
        let back = SessionSnapshot::from_bytes(bytes.clone()).unwrap();
        assert_eq!(back, snap);
        assert!(SessionSnapshot::from_bytes(bytes.slice(..bytes.len() - 1)).is_err());

        let mut b = Core::new();
        run(b.import_session("dev", back).unwrap());
        assert_eq!(b.export_session("dev").unwrap(), snap);
        let (tx, rx) = outbox();
        let c = connect(&mut b, "dev", false, hour, 10, tx);
        assert!(c.session_present);
        assert!(c.epoch > snap.epoch);
        let got: Vec<(bool, Option<u16>, String)> = drain(&rx, v)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => (
                    p.dup,
                    p.packet_id.map(|x| x.get()),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        let first_pid = |p: &Packet| match p {
            Packet::Publish(p) => p.packet_id.map(|x| x.get()),
            _ => None,
        };
        assert_eq!(got[0], (true, first_pid(&sent[0]), "m0".to_string()));
        assert_eq!(got[1], (true, first_pid(&sent[1]), "m1".to_string()));
        assert_eq!(got[2].2, "m2");
        assert_eq!(got[3].2, "m3");
        assert_eq!(got.len(), 4);
        // The QoS 2 id is still remembered: a resend is not routed twice.
        assert_eq!(run2(b.qos2_received("dev", pid, 10)), Some(false));
        run(b.route(msg("cmd/y", QoS::AtLeastOnce, false, "new")));
        let new = drain(&rx, v);
        let Packet::Publish(p) = &new[0] else {
            panic!()
        };
        assert_eq!(p.properties.subscription_identifiers, [7]);
        assert_eq!(b.subscriptions(), 2);
    }

    /// The change log is complete: replaying a persistent session's records
    /// from nothing rebuilds exactly the live session, through subscribes,
    /// queueing, sends, acks, QoS 2 in both directions, a disconnect and a
    /// resume. Clean sessions record nothing.
    #[test]
    fn replaying_the_change_log_rebuilds_the_session() {
        let v = ProtocolVersion::V5;
        let mut live = Core::new();
        let mut log: Vec<ChangeRecord> = Vec::new();
        let mut keep = |fx: Effects| {
            log.extend(fx.records().cloned());
            run(fx);
        };
        let (tx, rx) = outbox();
        let (connected, fx) = attach(
            &mut live,
            "dev",
            false,
            Some(Duration::from_secs(60)),
            3,
            tx,
        );
        keep(fx);
        keep(live.subscribe("dev", "a/#", sub(QoS::ExactlyOnce)).1);
        keep(live.subscribe("dev", "b", sub(QoS::AtLeastOnce)).1);
        keep(live.subscribe("dev", "$share/g/c", sub(QoS::AtLeastOnce)).1);
        for i in 0..6 {
            keep(live.route(msg("a/x", QoS::ExactlyOnce, false, &format!("a{i}"))));
            keep(live.route(msg("b", QoS::AtLeastOnce, false, &format!("b{i}"))));
        }
        keep(live.route(msg("c", QoS::AtLeastOnce, false, "c0")));
        keep(live.unsubscribe("dev", "b").1);
        keep(live.qos2_received("dev", PacketId::new(9).unwrap(), 10).1);
        keep(live.qos2_received("dev", PacketId::new(10).unwrap(), 10).1);
        keep(live.qos2_released("dev", PacketId::new(9).unwrap()).1);
        // Acknowledge what went out: PUBREC for QoS 2, PUBACK for QoS 1.
        for p in drain(&rx, v) {
            if let Packet::Publish(p) = p {
                let kind = if p.qos == QoS::ExactlyOnce {
                    mqlb_protocol::PacketType::Pubrec
                } else {
                    mqlb_protocol::PacketType::Puback
                };
                keep(live.acked("dev", p.packet_id.unwrap(), kind).1);
            }
        }
        keep(live.disconnect("dev", connected.conn));
        keep(live.route(msg("a/y", QoS::AtLeastOnce, false, "offline")));
        let (tx, _rx) = outbox();
        keep(
            attach(
                &mut live,
                "dev",
                false,
                Some(Duration::from_secs(60)),
                3,
                tx,
            )
            .1,
        );
        assert!(log.len() > 20, "{} records", log.len());

        let mut replica = Core::new();
        run(replica.replay("dev", &log));
        assert_eq!(
            replica.export_session("dev").unwrap(),
            live.export_session("dev").unwrap()
        );
        // Clean sessions leave no records.
        let (tx, _rx) = outbox();
        let (_, fx) = attach(&mut live, "clean", true, GONE, 10, tx);
        assert!(fx.records().next().is_none());
        run(fx);
        let (_, fx) = live.subscribe("clean", "a/#", sub(QoS::AtLeastOnce));
        assert!(fx.records().next().is_none());
        run(fx);
        let fx = live.route(msg("a/z", QoS::AtLeastOnce, false, "x"));
        assert!(fx.records().all(|r| &*r.client == "dev"));
        run(fx);
    }

    /// Will Delay is bounded state in the core, not a sleeping task per
    /// disconnect: a client that keeps leaving has one pending will.
    #[test]
    fn delayed_wills_are_one_per_client_and_cancelled_by_a_reconnect() {
        let mut c = Core::new();
        let v = ProtocolVersion::V5;
        let (tx, rx) = outbox();
        connect(&mut c, "watch", true, GONE, 10, tx);
        run2(c.subscribe("watch", "will/#", sub(QoS::AtMostOnce)));
        let day = Duration::from_secs(86_400);
        for _ in 0..1000 {
            let (tx, _rx) = outbox();
            let conn = connect(&mut c, "flappy", false, Some(day), 10, tx).conn;
            run(c.disconnect("flappy", conn));
            let _ = c.schedule_will(
                "flappy",
                msg("will/flappy", QoS::AtMostOnce, false, "gone"),
                day,
            );
        }
        assert_eq!(c.pending_wills(), 1);
        // Coming back cancels it.
        let (tx, _rx) = outbox();
        let conn = connect(&mut c, "flappy", false, Some(day), 10, tx).conn;
        assert_eq!(c.pending_wills(), 0);
        run(c.disconnect("flappy", conn));
        // Due when the delay passes...
        let _ = c.schedule_will(
            "flappy",
            msg("will/flappy", QoS::AtMostOnce, false, "late"),
            Duration::from_secs(5),
        );
        run(c.publish_due_wills(Instant::now()));
        assert!(payloads(&rx, v).is_empty());
        run(c.publish_due_wills(Instant::now() + Duration::from_secs(6)));
        assert_eq!(payloads(&rx, v), ["late"]);
        // ...or at once when the session is gone.
        let (tx, _rx) = outbox();
        let conn = connect(&mut c, "brief", true, GONE, 10, tx).conn;
        run(c.disconnect("brief", conn));
        let _ = c.schedule_will(
            "brief",
            msg("will/brief", QoS::AtMostOnce, false, "bye"),
            day,
        );
        run(c.publish_due_wills(Instant::now()));
        assert_eq!(payloads(&rx, v), ["bye"]);
        assert_eq!(c.pending_wills(), 0);
    }

    /// A QoS 2 resend (DUP) the publisher's session has no id for is
    /// routed as new, except to a session taken over lately whose copy
    /// already held that very message.
    #[test]
    fn a_qos2_resend_skips_a_session_taken_over_with_it() {
        let v = ProtocolVersion::V5;
        let m = msg("t/x", QoS::ExactlyOnce, false, "once");
        // A copy that held the message in flight, imported here.
        let mut old = Core::new();
        let (tx, _rx) = outbox();
        let conn = connect(
            &mut old,
            "sub",
            false,
            Some(Duration::from_secs(600)),
            10,
            tx,
        )
        .conn;
        run2(old.subscribe("sub", "t/#", sub(QoS::ExactlyOnce)));
        run(old.route(m.clone()));
        run(old.disconnect("sub", conn));
        let snap = old.export_session("sub").expect("the session");
        assert_eq!(snap.inflight.len() + snap.queued.len(), 1);
        let mut c = Core::new();
        run(c.import_session("sub", snap).expect("imported"));
        let (tx, rx) = outbox();
        connect(&mut c, "sub", false, Some(Duration::from_secs(600)), 10, tx);
        let (tx, rx2) = outbox();
        connect(&mut c, "other", true, GONE, 10, tx);
        run2(c.subscribe("other", "t/#", sub(QoS::ExactlyOnce)));
        let given = payloads(&rx, v).len();
        run(c.route_resent(m.clone()));
        assert_eq!(
            payloads(&rx, v).len(),
            0,
            "given again to the session that held it"
        );
        assert_eq!(payloads(&rx2, v), ["once"], "a session without it gets it");
        assert_eq!(given, 1, "the copy's message was resent on reconnect");
        // A first publish is routed to every session, as always.
        run(c.route(m));
        assert_eq!(payloads(&rx, v), ["once"]);
    }

    /// A will waiting out its delay is part of its session: recorded for
    /// the chain and the disk, carried by the session's snapshot, sent by
    /// the node that imports the session (a chain member taking it over
    /// after its holder died) when due, and not by the node that gave the
    /// session up, which once sent it as soon as the session was gone from
    /// it (with the client back on another node).
    #[test]
    fn a_pending_will_goes_with_its_session() {
        let v = ProtocolVersion::V5;
        let day = Some(Duration::from_secs(86_400));
        let watcher = |c: &mut Core| {
            let (tx, rx) = outbox();
            connect(c, "watch", true, GONE, 10, tx);
            run2(c.subscribe("watch", "will/#", sub(QoS::AtMostOnce)));
            rx
        };
        let mut a = Core::new();
        let rx_a = watcher(&mut a);
        let (tx, _rx) = outbox();
        let conn = connect(&mut a, "dev", false, day, 10, tx).conn;
        run(a.disconnect("dev", conn));
        let fx = a.schedule_will(
            "dev",
            msg("will/dev", QoS::AtLeastOnce, false, "offline"),
            Duration::from_secs(5),
        );
        let wills: Vec<bool> = fx
            .records()
            .filter_map(|r| match &r.change {
                SessionChange::WillSet(w) => Some(w.is_some()),
                _ => None,
            })
            .collect();
        assert_eq!(wills, [true], "recorded for the chain and the disk");
        run(fx);
        let snap = a.export_session("dev").expect("the session");
        assert!(snap.will.is_some(), "the snapshot carries it");
        // Taken over elsewhere: the node that gave it up sends nothing.
        run(a.evict_session("dev"));
        assert_eq!(a.pending_wills(), 0);
        run(a.publish_due_wills(Instant::now() + Duration::from_secs(60)));
        assert!(payloads(&rx_a, v).is_empty(), "sent by the node it left");
        // The node that imported it sends it when due, once.
        let mut b = Core::new();
        let rx_b = watcher(&mut b);
        run(b.import_session("dev", snap.clone()).expect("imported"));
        assert_eq!(b.pending_wills(), 1);
        run(b.publish_due_wills(Instant::now()));
        assert!(payloads(&rx_b, v).is_empty(), "not before its delay");
        let fx = b.publish_due_wills(Instant::now() + Duration::from_secs(6));
        assert!(
            fx.records()
                .any(|r| r.change == SessionChange::WillSet(None)),
            "sent: off the session, for its chain"
        );
        run(fx);
        assert_eq!(payloads(&rx_b, v), ["offline"]);
        assert!(b.export_session("dev").is_some_and(|s| s.will.is_none()));
        // A client back before the delay cancels it, on the session too.
        let mut c = Core::new();
        let rx_c = watcher(&mut c);
        run(c.import_session("dev", snap).expect("imported"));
        let (tx, _rx) = outbox();
        connect(&mut c, "dev", false, day, 10, tx);
        assert_eq!(c.pending_wills(), 0);
        assert!(c.export_session("dev").is_some_and(|s| s.will.is_none()));
        run(c.publish_due_wills(Instant::now() + Duration::from_secs(60)));
        assert!(payloads(&rx_c, v).is_empty());
    }

    /// The core keeps the time it is given, not the system's: a session
    /// detached at a simulated time expires by that time, and a will
    /// scheduled then is due by it, whatever the real clock says.
    #[test]
    fn the_core_runs_on_the_time_it_is_given() {
        let v = ProtocolVersion::V5;
        let mut c = Core::new();
        let t0 = Instant::now() + Duration::from_secs(3600);
        let epoch = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
        c.calibrate_wall(t0, epoch);
        let (tx, rx) = outbox();
        connect(&mut c, "watch", true, GONE, 10, tx);
        run2(c.subscribe("watch", "will/#", sub(QoS::AtMostOnce)));
        let (tx, _rx) = outbox();
        let conn = connect(&mut c, "dev", false, Some(Duration::from_secs(10)), 10, tx).conn;
        run(c.disconnect("dev", conn));
        let _ = c.schedule_will(
            "dev",
            msg("will/dev", QoS::AtMostOnce, false, "gone"),
            Duration::from_secs(5),
        );
        // An hour before the simulated time (the real now): nothing due.
        run(c.publish_due_wills(Instant::now()));
        assert!(payloads(&rx, v).is_empty());
        run(c.publish_due_wills(t0 + Duration::from_secs(4)));
        assert!(payloads(&rx, v).is_empty());
        run(c.publish_due_wills(t0 + Duration::from_secs(5)));
        assert_eq!(payloads(&rx, v), ["gone"]);
        assert_eq!(c.expire_sessions(t0 + Duration::from_secs(9)).0, 0);
        assert_eq!(c.expire_sessions(t0 + Duration::from_secs(11)).0, 1);
        // Retained writes are stamped with the wall clock it was given.
        run(c.route(msg("r/1", QoS::AtMostOnce, true, "x")));
        assert_eq!(
            c.retained_version("r/1").map(|h| h.wall_ms),
            Some(1_000_000_000)
        );
    }

    #[test]
    fn outbound_window_is_capped_for_clients_without_receive_maximum() {
        let mut c = Core::new();
        let v = ProtocolVersion::V3_1_1;
        let (tx, rx) = outbox_for(ProtocolVersion::V3_1_1);
        connect(&mut c, "v3", true, GONE, u16::MAX, tx);
        run2(c.subscribe("v3", "w", sub(QoS::AtLeastOnce)));
        for i in 0..250 {
            run(c.route(msg("w", QoS::AtLeastOnce, false, &i.to_string())));
        }
        assert_eq!(
            drain(&rx, v).len(),
            usize::from(Limits::default().max_inflight)
        );
    }
}
