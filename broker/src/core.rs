//! Broker state: sessions, subscriptions, shared groups, retained messages,
//! and the one routing function every publish goes through.
//!
//! All of it sits behind one mutex, held only for in-memory work and never
//! across an await. Sessions are plain data (subscriptions, inflight and
//! queued messages, packet ids) so that the cluster layer can export and
//! import them later.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqlb_protocol::{
    MqttStr, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS, ReasonCode,
    RetainHandling, SubscriptionOptions,
};

use crate::snapshot::{
    message_to_publish, publish_to_message, InflightState, SessionSnapshot, SnapshotMessage,
};
use crate::trie::{filter_matches, Trie};

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

/// A message as routed: what was published, plus who published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: MqttStr,
    /// Payload.
    pub payload: Bytes,
    /// QoS as published.
    pub qos: QoS,
    /// Retain flag as published.
    pub retain: bool,
    /// v5 properties to forward (user properties, content type, ...); dropped
    /// when delivering to 3.x subscribers.
    pub properties: Properties,
    /// Publisher's client ID, for No Local.
    pub origin: Option<Arc<str>>,
    /// When the broker received it: Message Expiry counts down from here.
    pub received: Instant,
}

impl Message {
    /// Remaining Message Expiry Interval, `Some(0)`-free: `None` when the
    /// message never expires, `Err(())` when it has expired.
    fn remaining_expiry(&self, now: Instant) -> Result<Option<u32>, ()> {
        match self.properties.message_expiry_interval {
            None => Ok(None),
            Some(secs) => {
                let left =
                    u64::from(secs).saturating_sub(now.duration_since(self.received).as_secs());
                if left == 0 {
                    Err(())
                } else {
                    Ok(Some(u32::try_from(left).unwrap_or(u32::MAX)))
                }
            }
        }
    }
}

/// The mailbox between the core and one connection task, and the only way
/// to queue bytes for a connection.
///
/// It counts the bytes it holds under the same lock that queues and takes
/// them, so the backlog a slow consumer is judged by cannot drift: nothing
/// can be queued past the count, and the count can never go below zero.
///
/// A queue behind a mutex plus a `Notify`, rather than a channel: tokio's
/// channels allocate a 32-slot block up front, and most connections are
/// idle. This allocates nothing until something is sent.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: std::sync::Mutex<Queued>,
    notify: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Queued {
    items: VecDeque<Outbound>,
    /// Sum of the `Outbound::Bytes` lengths in `items`.
    bytes: usize,
    /// A close was queued: the connection is on its way out.
    closing: bool,
}

impl Outbox {
    fn queued(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues encoded packets and wakes the connection task.
    pub fn push(&self, b: Bytes) {
        {
            let mut q = self.queued();
            q.bytes += b.len();
            q.items.push_back(Outbound::Bytes(b));
        }
        self.notify.notify_one();
    }

    /// Asks the connection task to close; bytes queued before this are
    /// written first.
    pub fn close(&self, why: Closing) {
        {
            let mut q = self.queued();
            q.closing = true;
            q.items.push_back(Outbound::Close(why));
        }
        self.notify.notify_one();
    }

    /// Whether a close was asked for.
    pub fn is_closing(&self) -> bool {
        self.queued().closing
    }

    /// Bytes queued and not yet taken by the connection task.
    pub fn backlog(&self) -> usize {
        self.queued().bytes
    }

    /// Takes everything queued (possibly nothing).
    pub fn take(&self) -> VecDeque<Outbound> {
        let mut q = self.queued();
        q.bytes = 0;
        std::mem::take(&mut q.items)
    }

    /// Resolves when something was sent since the last wake-up.
    pub async fn ready(&self) {
        self.notify.notified().await
    }
}

/// Why the broker closes a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// Another connection took the session (v5: DISCONNECT 0x8E); the will
    /// is published, as for any connection that ends without DISCONNECT.
    TakenOver,
    /// The broker is shutting down (v5: DISCONNECT 0x8B). The session stays
    /// for the client to resume elsewhere, so its will is kept too, unless
    /// the session ends with the connection.
    ShuttingDown,
}

impl Closing {
    /// The reason code a v5 client gets.
    pub fn reason_code(self) -> ReasonCode {
        match self {
            Closing::TakenOver => ReasonCode::SESSION_TAKEN_OVER,
            Closing::ShuttingDown => ReasonCode::SERVER_SHUTTING_DOWN,
        }
    }
}

/// What a connection task receives from the core.
#[derive(Debug)]
pub enum Outbound {
    /// Encoded packets to write.
    Bytes(Bytes),
    /// Close the connection, after what was queued before.
    Close(Closing),
}

/// A subscription with its identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sub {
    /// Options from SUBSCRIBE.
    pub options: SubscriptionOptions,
    /// v5 subscription identifier.
    pub id: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AwaitAck {
    Puback,
    Pubrec,
    Pubcomp,
}

/// A message owed to a session, not yet sent.
#[derive(Debug, Clone)]
struct Pending {
    msg: Message,
    qos: QoS,
    sub_ids: Vec<u32>,
    retain: bool,
    /// The shared group it was given to, so it can go to another member.
    shared: Option<Arc<str>>,
}

#[derive(Debug, Clone)]
struct Inflight {
    publish: Publish,
    state: AwaitAck,
    pending: Pending,
}

/// Bytes queued for a connection task and not yet taken by it. Above this,
/// QoS 0 messages to that client are dropped (counted): a slow consumer must
/// not grow the broker's memory without bound. QoS 1/2 are bounded by the
/// inflight window instead.
pub const MAX_BACKLOG_BYTES: usize = 8 << 20;

/// The connection a session is attached to, with what it told us.
#[derive(Debug)]
struct Attached {
    conn: u64,
    tx: Arc<Outbox>,
    version: ProtocolVersion,
    receive_maximum: u16,
    /// Client's Maximum Packet Size: larger messages are not sent (3.1.2.11.4).
    maximum_packet_size: usize,
    /// Outbound topic aliases: topic → alias, up to the client's maximum.
    aliases: HashMap<MqttStr, u16>,
    topic_alias_maximum: u16,
}

/// One client's session.
#[derive(Debug)]
struct Session {
    subs: HashMap<String, Sub>,
    attached: Option<Attached>,
    inflight: BTreeMap<u16, Inflight>,
    queue: VecDeque<Pending>,
    queued_bytes: usize,
    /// QoS 2 packet ids received and not yet released: kept with the
    /// session so a resent PUBLISH after a reconnect is not routed twice.
    qos2_in: HashSet<u16>,
    next_pid: u16,
    /// None = never expires (3.x clean session 0).
    expiry: Option<Duration>,
    disconnected_at: Option<Instant>,
}

impl Session {
    fn new(expiry: Option<Duration>) -> Self {
        Self {
            subs: HashMap::new(),
            attached: None,
            inflight: BTreeMap::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            qos2_in: HashSet::new(),
            next_pid: 0,
            expiry,
            disconnected_at: None,
        }
    }

    fn alloc_pid(&mut self) -> Option<PacketId> {
        for _ in 0..u16::MAX {
            self.next_pid = self.next_pid.wrapping_add(1);
            if self.next_pid != 0 && !self.inflight.contains_key(&self.next_pid) {
                return PacketId::new(self.next_pid);
            }
        }
        None
    }
}

/// A shared subscription group: `$share/{group}/{filter}`. Keyed by group
/// *and* filter, so two groups with one name on different filters are
/// separate (rumqttd keys by name only).
#[derive(Debug, Default)]
struct Group {
    members: Vec<(String, Sub)>,
    next: usize,
}

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
    /// PUBLISH packets sent.
    pub messages_out: u64,
    dropped: [u64; DropReason::ALL.len()],
}

impl Stats {
    /// Messages dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize]
    }

    /// Messages dropped for any reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }

    fn drop_one(&mut self, reason: DropReason) {
        self.dropped[reason as usize] += 1;
    }
}

/// The result of a CONNECT.
#[derive(Debug)]
pub struct Connected {
    /// A previous session was resumed.
    pub session_present: bool,
    /// This connection's id, for detaching.
    pub conn: u64,
}

/// What a client declared in its CONNECT that shapes delivery to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Protocol version.
    pub version: ProtocolVersion,
    /// Receive Maximum (inflight QoS 1/2 window).
    pub receive_maximum: u16,
    /// Maximum Packet Size.
    pub maximum_packet_size: u32,
    /// Topic Alias Maximum.
    pub topic_alias_maximum: u16,
}

/// The broker's state.
#[derive(Debug, Default)]
pub struct Core {
    sessions: HashMap<String, Session>,
    trie: Trie<Sub>,
    groups: HashMap<Arc<str>, Group>,
    retained: BTreeMap<String, Message>,
    next_conn: u64,
    stats: Stats,
    limits: Limits,
}

/// The trie key under which a shared group is stored: `\0{group}\0{filter}`.
/// U+0000 cannot occur in a client ID, so it never collides with one, and
/// the part after the first `\0` is the group's key in `Core::groups`.
fn group_key(group: &str, filter: &str) -> String {
    format!("\0{group}\0{filter}")
}

/// Splits `$share/{group}/{filter}`.
fn parse_shared(filter: &str) -> Option<(&str, &str)> {
    filter.strip_prefix("$share/")?.split_once('/')
}

impl Core {
    /// An empty broker with default limits.
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// An empty broker.
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            limits,
            ..Default::default()
        }
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Connected clients.
    pub fn connected(&self) -> usize {
        self.sessions
            .values()
            .filter(|s| s.attached.is_some())
            .count()
    }

    /// Sessions, connected or not.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Retained messages stored.
    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// Subscriptions (shared group memberships included).
    pub fn subscriptions(&self) -> usize {
        self.sessions.values().map(|s| s.subs.len()).sum()
    }

    /// Attaches a connection to `client_id`'s session, taking over any other
    /// connection with that ID.
    pub fn connect(
        &mut self,
        client_id: &str,
        clean_start: bool,
        expiry: Option<Duration>,
        limits: ClientLimits,
        tx: Arc<Outbox>,
    ) -> Connected {
        self.next_conn += 1;
        let conn = self.next_conn;
        if let Some(old) = self
            .sessions
            .get_mut(client_id)
            .and_then(|s| s.attached.take())
        {
            old.tx.close(Closing::TakenOver);
        }
        if clean_start {
            self.drop_session(client_id);
        }
        let session_present = self.sessions.contains_key(client_id);
        let s = self
            .sessions
            .entry(client_id.to_string())
            .or_insert_with(|| Session::new(expiry));
        s.expiry = expiry;
        s.disconnected_at = None;
        s.attached = Some(Attached {
            conn,
            tx,
            version: limits.version,
            receive_maximum: limits
                .receive_maximum
                .clamp(1, self.limits.max_inflight.max(1)),
            maximum_packet_size: usize::try_from(limits.maximum_packet_size).unwrap_or(usize::MAX),
            aliases: HashMap::new(),
            topic_alias_maximum: if limits.version.is_v5() {
                limits.topic_alias_maximum
            } else {
                0
            },
        });
        Connected {
            session_present,
            conn,
        }
    }

    /// Resends inflight messages (DUP, or PUBREL where the PUBREC came) and
    /// sends queued ones; call after the CONNACK is written.
    pub fn resume(&mut self, client_id: &str) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let Some(a) = &s.attached else { return };
        let mut sent = 0;
        for inflight in s.inflight.values_mut() {
            let packet = match (inflight.state, inflight.publish.packet_id) {
                (AwaitAck::Pubcomp, Some(pid)) => Packet::Pubrel(mqlb_protocol::Ack::new(pid)),
                _ => {
                    inflight.publish.dup = true;
                    // Aliases do not survive the connection: send the topic.
                    inflight.publish.properties.topic_alias = None;
                    Packet::Publish(inflight.publish.clone())
                }
            };
            if let Ok(b) = packet.to_bytes(a.version) {
                a.tx.push(b);
                sent += 1;
            }
        }
        self.stats.messages_out += sent;
        self.pump(client_id);
    }

    /// Detaches connection `conn`. Messages it held for a shared group go to
    /// another member; the session is removed if it expires now.
    pub fn disconnect(&mut self, client_id: &str, conn: u64) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        if s.attached.as_ref().map(|a| a.conn) != Some(conn) {
            return; // taken over already
        }
        s.attached = None;
        // Shared-group messages are not kept waiting for this member when
        // another member can take them; the last member keeps its own.
        let groups = &self.groups;
        let has_other = |p: &Pending| {
            p.shared
                .as_ref()
                .and_then(|k| groups.get(k))
                .is_some_and(|g| g.members.iter().any(|(c, _)| c != client_id))
        };
        let mut handover = Vec::new();
        s.inflight.retain(|_, i| {
            if i.state != AwaitAck::Pubcomp && has_other(&i.pending) {
                handover.push(i.pending.clone());
                false
            } else {
                true
            }
        });
        let mut kept = VecDeque::new();
        for p in s.queue.drain(..) {
            if has_other(&p) {
                handover.push(p);
            } else {
                kept.push_back(p);
            }
        }
        s.queued_bytes = kept.iter().map(|p| p.msg.payload.len()).sum();
        s.queue = kept;
        if s.expiry == Some(Duration::ZERO) {
            self.drop_session(client_id);
        } else if let Some(s) = self.sessions.get_mut(client_id) {
            s.disconnected_at = Some(Instant::now());
        }
        for p in handover {
            if let Some(group) = p.shared.clone() {
                self.deliver_to_group(&group, p.msg, Some(client_id));
            }
        }
    }

    /// Mailboxes of the connected clients not yet asked to close, for a
    /// graceful shutdown.
    pub fn open_connections(&self) -> Vec<Arc<Outbox>> {
        self.sessions
            .values()
            .filter_map(|s| s.attached.as_ref())
            .filter(|a| !a.tx.is_closing())
            .map(|a| a.tx.clone())
            .collect()
    }

    /// Whether `client_id`'s session ends when its connection does
    /// (Session Expiry 0, or 3.x clean session).
    pub fn ends_with_connection(&self, client_id: &str) -> bool {
        self.sessions
            .get(client_id)
            .is_none_or(|s| s.expiry == Some(Duration::ZERO))
    }

    /// Whether a connection is attached to `client_id`'s session.
    pub fn is_connected(&self, client_id: &str) -> bool {
        self.sessions
            .get(client_id)
            .is_some_and(|s| s.attached.is_some())
    }

    /// Whether `conn` still owns `client_id` (false after a takeover).
    pub fn owns(&self, client_id: &str, conn: u64) -> bool {
        self.sessions
            .get(client_id)
            .and_then(|s| s.attached.as_ref())
            .is_some_and(|a| a.conn == conn)
    }

    /// Whether a session exists for `client_id`.
    pub fn has_session(&self, client_id: &str) -> bool {
        self.sessions.contains_key(client_id)
    }

    /// Updates the session expiry (v5 DISCONNECT may change it).
    pub fn set_expiry(&mut self, client_id: &str, expiry: Option<Duration>) {
        if let Some(s) = self.sessions.get_mut(client_id) {
            s.expiry = expiry;
        }
    }

    fn drop_session(&mut self, client_id: &str) {
        if let Some(s) = self.sessions.remove(client_id) {
            for filter in s.subs.keys() {
                self.remove_subscription(client_id, filter);
            }
        }
    }

    fn remove_subscription(&mut self, client_id: &str, filter: &str) {
        match parse_shared(filter) {
            Some((group, inner)) => {
                let key: Arc<str> = Arc::from(format!("{group}\0{inner}"));
                if let Some(g) = self.groups.get_mut(&key) {
                    g.members.retain(|(c, _)| c != client_id);
                    if g.members.is_empty() {
                        self.groups.remove(&key);
                        self.trie.remove(inner, &group_key(group, inner));
                    }
                }
            }
            None => {
                self.trie.remove(filter, client_id);
            }
        }
    }

    /// Removes sessions whose expiry has passed. Returns how many.
    pub fn expire_sessions(&mut self, now: Instant) -> usize {
        let expired: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| match (s.disconnected_at, s.expiry) {
                (Some(at), Some(e)) => now.duration_since(at) >= e,
                _ => false,
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            self.drop_session(id);
        }
        expired.len()
    }

    /// Adds a subscription and sends the retained messages its retain
    /// handling asks for. Returns whether it existed.
    pub fn subscribe(&mut self, client_id: &str, filter: &str, sub: Sub) -> bool {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return false;
        };
        let existed = s.subs.insert(filter.to_string(), sub).is_some();
        if let Some((group, inner)) = parse_shared(filter) {
            let key: Arc<str> = Arc::from(format!("{group}\0{inner}"));
            let g = self.groups.entry(key).or_default();
            match g.members.iter_mut().find(|(c, _)| c == client_id) {
                Some(m) => m.1 = sub,
                None => g.members.push((client_id.to_string(), sub)),
            }
            self.trie.insert(inner, &group_key(group, inner), sub);
            // Shared subscriptions never get retained messages (4.8.2).
            return existed;
        }
        self.trie.insert(filter, client_id, sub);
        let send_retained = match sub.options.retain_handling {
            RetainHandling::SendAtSubscribe => true,
            RetainHandling::SendIfNew => !existed,
            RetainHandling::DoNotSend => false,
        };
        if send_retained {
            let matching: Vec<Message> = self
                .retained
                .values()
                .filter(|m| filter_matches(filter, m.topic.as_str()))
                .cloned()
                .collect();
            for m in matching {
                let qos = m.qos.min(sub.options.qos);
                self.deliver(
                    client_id,
                    Pending {
                        msg: m,
                        qos,
                        sub_ids: sub.id.into_iter().collect(),
                        retain: true,
                        shared: None,
                    },
                );
            }
        }
        existed
    }

    /// Records a subscription in the session, the trie and its shared group.
    /// `None` without a session; otherwise whether it existed.
    fn add_subscription(&mut self, client_id: &str, filter: &str, sub: Sub) -> Option<bool> {
        let s = self.sessions.get_mut(client_id)?;
        let existed = s.subs.insert(filter.to_string(), sub).is_some();
        match parse_shared(filter) {
            Some((group, inner)) => {
                let key: Arc<str> = Arc::from(format!("{group}\0{inner}"));
                let g = self.groups.entry(key).or_default();
                match g.members.iter_mut().find(|(c, _)| c == client_id) {
                    Some(m) => m.1 = sub,
                    None => g.members.push((client_id.to_string(), sub)),
                }
                self.trie.insert(inner, &group_key(group, inner), sub);
            }
            None => {
                self.trie.insert(filter, client_id, sub);
            }
        }
        Some(existed)
    }

    /// Everything `client_id`'s session owns, for replication. `None`
    /// without a session.
    pub fn export_session(&self, client_id: &str) -> Option<SessionSnapshot> {
        let s = self.sessions.get(client_id)?;
        let now = Instant::now();
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
        Some(SessionSnapshot {
            expiry: s.expiry,
            next_pid: s.next_pid,
            qos2_in,
            subscriptions,
            inflight: s
                .inflight
                .values()
                .map(|i| {
                    let state = match i.state {
                        AwaitAck::Puback => InflightState::AwaitPuback,
                        AwaitAck::Pubrec => InflightState::AwaitPubrec,
                        AwaitAck::Pubcomp => InflightState::AwaitPubcomp,
                    };
                    (state, message(&i.pending, i.publish.clone()))
                })
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
        })
    }

    /// Installs a session from a snapshot (offline, as after a failover),
    /// replacing any offline session with that ID. Refused while a client
    /// is connected with that ID.
    pub fn import_session(
        &mut self,
        client_id: &str,
        snap: SessionSnapshot,
    ) -> Result<(), &'static str> {
        if self.is_connected(client_id) {
            return Err("client is connected");
        }
        self.drop_session(client_id);
        let now = Instant::now();
        let mut session = Session::new(snap.expiry);
        session.next_pid = snap.next_pid;
        session.qos2_in = snap.qos2_in.into_iter().collect();
        session.disconnected_at = Some(now);
        self.sessions.insert(client_id.to_string(), session);
        for (filter, sub) in &snap.subscriptions {
            self.add_subscription(client_id, filter, *sub);
        }
        let groups = &self.groups;
        let pending = |m: SnapshotMessage| {
            let shared = m.shared.map(|k| match groups.get_key_value(k.as_str()) {
                Some((key, _)) => key.clone(),
                None => Arc::from(k),
            });
            Pending {
                msg: publish_to_message(&m.publish, m.origin.as_deref(), now),
                qos: m.publish.qos,
                sub_ids: m.publish.properties.subscription_identifiers.clone(),
                retain: m.publish.retain,
                shared,
            }
        };
        let mut inflight = BTreeMap::new();
        for (state, m) in snap.inflight {
            let Some(pid) = m.publish.packet_id else {
                continue;
            };
            let publish = m.publish.clone();
            let state = match state {
                InflightState::AwaitPuback => AwaitAck::Puback,
                InflightState::AwaitPubrec => AwaitAck::Pubrec,
                InflightState::AwaitPubcomp => AwaitAck::Pubcomp,
            };
            inflight.insert(
                pid.get(),
                Inflight {
                    publish,
                    state,
                    pending: pending(m),
                },
            );
        }
        let queue: VecDeque<Pending> = snap.queued.into_iter().map(pending).collect();
        if let Some(s) = self.sessions.get_mut(client_id) {
            s.queued_bytes = queue.iter().map(|p| p.msg.payload.len()).sum();
            s.queue = queue;
            s.inflight = inflight;
        }
        Ok(())
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&mut self, client_id: &str, filter: &str) -> bool {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return false;
        };
        let existed = s.subs.remove(filter).is_some();
        if existed {
            self.remove_subscription(client_id, filter);
        }
        existed
    }

    /// The retained message on `topic`.
    pub fn retained(&self, topic: &str) -> Option<&Message> {
        self.retained.get(topic)
    }

    /// Sets (or, with an empty payload, deletes) a retained message. Public
    /// so the cluster layer can replicate retained messages.
    pub fn set_retained(&mut self, m: Message) {
        if m.payload.is_empty() {
            self.retained.remove(m.topic.as_str());
        } else {
            self.retained.insert(m.topic.as_str().to_string(), m);
        }
    }

    /// The routing function: every publish, from any source, goes here.
    /// Returns the number of sessions and groups it was given to.
    pub fn route(&mut self, m: Message) -> usize {
        self.stats.messages_in += 1;
        if m.retain {
            self.set_retained(m.clone());
        }
        // One delivery per client: the highest QoS of its matching
        // subscriptions, with all their identifiers.
        let mut targets: HashMap<&str, (QoS, Vec<u32>, bool)> = HashMap::new();
        let mut groups: Vec<String> = Vec::new();
        self.trie.matches(m.topic.as_str(), |client, sub| {
            if let Some(group) = client.strip_prefix('\0') {
                groups.push(group.to_string());
                return;
            }
            if sub.options.no_local && m.origin.as_deref() == Some(client) {
                return;
            }
            let e = targets
                .entry(client)
                .or_insert((QoS::AtMostOnce, Vec::new(), false));
            e.0 = e.0.max(m.qos.min(sub.options.qos));
            e.1.extend(sub.id);
            e.2 |= sub.options.retain_as_published;
        });
        let targets: Vec<(String, QoS, Vec<u32>, bool)> = targets
            .into_iter()
            .map(|(c, (q, ids, rap))| (c.to_string(), q, ids, rap))
            .collect();
        let n = targets.len() + groups.len();
        for (client, qos, sub_ids, rap) in targets {
            // Retain As Published keeps the flag; otherwise a routed message
            // is delivered with RETAIN 0 (3.3.1.3).
            self.deliver(
                &client,
                Pending {
                    msg: m.clone(),
                    qos,
                    sub_ids,
                    retain: rap && m.retain,
                    shared: None,
                },
            );
        }
        // One member of each matching shared group.
        for key in groups {
            let Some((key, _)) = self.groups.get_key_value(key.as_str()) else {
                continue;
            };
            let key = key.clone();
            self.deliver_to_group(&key, m.clone(), None);
        }
        n
    }

    /// Gives `m` to one member of a shared group, round robin, preferring
    /// connected members with room in their window; `except` is skipped.
    fn deliver_to_group(&mut self, key: &Arc<str>, m: Message, except: Option<&str>) {
        let Some(g) = self.groups.get_mut(key) else {
            return;
        };
        let n = g.members.len();
        if n == 0 {
            return;
        }
        let start = g.next;
        let mut chosen = None;
        let mut fallback = None;
        for i in 0..n {
            let (client, sub) = &g.members[(start + i) % n];
            if Some(client.as_str()) == except {
                continue;
            }
            let Some(s) = self.sessions.get(client) else {
                continue;
            };
            let ready = s
                .attached
                .as_ref()
                .is_some_and(|a| s.inflight.len() < usize::from(a.receive_maximum));
            if ready {
                chosen = Some(((start + i) % n, client.clone(), *sub));
                break;
            }
            if fallback.is_none() {
                fallback = Some(((start + i) % n, client.clone(), *sub));
            }
        }
        let Some((idx, client, sub)) = chosen.or(fallback) else {
            return;
        };
        g.next = idx + 1;
        let qos = m.qos.min(sub.options.qos);
        self.deliver(
            &client,
            Pending {
                msg: m,
                qos,
                sub_ids: sub.id.into_iter().collect(),
                retain: false,
                shared: Some(key.clone()),
            },
        );
    }

    /// Sends (or queues) one message to one session.
    fn deliver(&mut self, client_id: &str, p: Pending) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let can_send = s.attached.as_ref().is_some_and(|a| {
            p.qos == QoS::AtMostOnce || s.inflight.len() < usize::from(a.receive_maximum)
        });
        if can_send {
            self.send(client_id, p);
            return;
        }
        if p.qos == QoS::AtMostOnce {
            return; // QoS 0 is not queued for offline sessions
        }
        s.queued_bytes += p.msg.payload.len();
        s.queue.push_back(p);
        while s.queue.len() > self.limits.max_queued_messages
            || s.queued_bytes > self.limits.max_queued_bytes
        {
            let Some(old) = s.queue.pop_front() else {
                break;
            };
            s.queued_bytes -= old.msg.payload.len();
            self.stats.drop_one(DropReason::QueueFull);
        }
    }

    /// Moves queued messages into the inflight window.
    fn pump(&mut self, client_id: &str) {
        loop {
            let Some(s) = self.sessions.get_mut(client_id) else {
                return;
            };
            let Some(max) = s.attached.as_ref().map(|a| usize::from(a.receive_maximum)) else {
                return;
            };
            if s.inflight.len() >= max {
                return;
            }
            let Some(p) = s.queue.pop_front() else { return };
            s.queued_bytes -= p.msg.payload.len();
            self.send(client_id, p);
        }
    }

    /// Encodes and sends one PUBLISH on an attached session, recording it as
    /// inflight for QoS > 0.
    fn send(&mut self, client_id: &str, p: Pending) {
        let now = Instant::now();
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let expiry = match p.msg.remaining_expiry(now) {
            Ok(e) => e,
            Err(()) => {
                self.stats.drop_one(DropReason::Expired);
                return;
            }
        };
        let packet_id = if p.qos == QoS::AtMostOnce {
            None
        } else {
            match s.alloc_pid() {
                Some(id) => Some(id),
                None => return,
            }
        };
        let Some(a) = s.attached.as_mut() else { return };
        if p.qos == QoS::AtMostOnce && a.tx.backlog() > MAX_BACKLOG_BYTES {
            self.stats.drop_one(DropReason::SlowConsumer);
            return;
        }
        let mut properties = p.msg.properties.clone();
        properties.subscription_identifiers = p.sub_ids.clone();
        properties.topic_alias = None;
        properties.message_expiry_interval = expiry;
        let mut publish = Publish {
            dup: false,
            qos: p.qos,
            retain: p.retain,
            topic: p.msg.topic.clone(),
            packet_id,
            properties,
            payload: p.msg.payload.clone(),
        };
        let inflight_copy = publish.clone();
        // Outbound topic alias: first use sends topic + alias, later uses
        // send an empty topic + alias.
        if a.topic_alias_maximum > 0 {
            let next = u16::try_from(a.aliases.len() + 1).unwrap_or(u16::MAX);
            match a.aliases.get(&publish.topic) {
                Some(&alias) => {
                    publish.properties.topic_alias = Some(alias);
                    publish.topic = MqttStr::default();
                }
                None if next <= a.topic_alias_maximum => {
                    a.aliases.insert(publish.topic.clone(), next);
                    publish.properties.topic_alias = Some(next);
                }
                None => {}
            }
        }
        let Ok(bytes) = Packet::Publish(publish).to_bytes(a.version) else {
            return;
        };
        if bytes.len() > a.maximum_packet_size {
            // 3.1.2.11.4: discard as if delivered.
            self.stats.drop_one(DropReason::TooLarge);
            return;
        }
        a.tx.push(bytes);
        self.stats.messages_out += 1;
        if let Some(pid) = packet_id {
            let state = if p.qos == QoS::AtLeastOnce {
                AwaitAck::Puback
            } else {
                AwaitAck::Pubrec
            };
            s.inflight.insert(
                pid.get(),
                Inflight {
                    publish: inflight_copy,
                    state,
                    pending: p,
                },
            );
        }
    }

    /// Records an inbound QoS 2 packet id; true the first time (route it),
    /// false for a resend (acknowledge only). `None` if the session holds
    /// `limit` unreleased ids already.
    pub fn qos2_received(&mut self, client_id: &str, pid: PacketId, limit: usize) -> Option<bool> {
        let s = self.sessions.get_mut(client_id)?;
        if s.qos2_in.contains(&pid.get()) {
            return Some(false);
        }
        if s.qos2_in.len() >= limit {
            return None;
        }
        s.qos2_in.insert(pid.get());
        Some(true)
    }

    /// PUBREL: forgets the id; false if it was unknown.
    pub fn qos2_released(&mut self, client_id: &str, pid: PacketId) -> bool {
        self.sessions
            .get_mut(client_id)
            .is_some_and(|s| s.qos2_in.remove(&pid.get()))
    }

    /// Handles PUBACK / PUBREC / PUBCOMP from the client.
    pub fn acked(&mut self, client_id: &str, pid: PacketId, kind: mqlb_protocol::PacketType) {
        use mqlb_protocol::PacketType as T;
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let key = pid.get();
        match (kind, s.inflight.get(&key).map(|i| i.state)) {
            (T::Puback, Some(AwaitAck::Puback)) | (T::Pubcomp, Some(AwaitAck::Pubcomp)) => {
                s.inflight.remove(&key);
            }
            (T::Pubrec, Some(AwaitAck::Pubrec)) => {
                if let Some(i) = s.inflight.get_mut(&key) {
                    i.state = AwaitAck::Pubcomp;
                }
                if let Some(a) = &s.attached {
                    if let Ok(b) = Packet::Pubrel(mqlb_protocol::Ack::new(pid)).to_bytes(a.version)
                    {
                        a.tx.push(b);
                    }
                }
                return;
            }
            _ => return, // unknown id: ignore
        }
        self.pump(client_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, qos: QoS, retain: bool, payload: &str) -> Message {
        Message {
            topic: MqttStr::try_from(topic).unwrap(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos,
            retain,
            properties: Properties::default(),
            origin: None,
            received: Instant::now(),
        }
    }

    fn limits(v: ProtocolVersion, receive_maximum: u16) -> ClientLimits {
        ClientLimits {
            version: v,
            receive_maximum,
            maximum_packet_size: u32::MAX,
            topic_alias_maximum: 0,
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

    /// A connection's mailbox, twice: one end for the core, one to read.
    fn outbox() -> (Arc<Outbox>, Arc<Outbox>) {
        let o = Arc::new(Outbox::default());
        (o.clone(), o)
    }

    fn drain(rx: &Arc<Outbox>, v: ProtocolVersion) -> Vec<Packet> {
        let mut out = Vec::new();
        for o in rx.take() {
            let Outbound::Bytes(b) = o else { continue };
            let mut buf = bytes::BytesMut::from(&b[..]);
            while let Ok(Some(p)) = mqlb_protocol::decode(&mut buf, v, 1 << 20) {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn delivered_qos_is_the_minimum() {
        let mut c = Core::new();
        let (tx, rx) = outbox();
        c.connect(
            "s",
            true,
            Some(Duration::ZERO),
            limits(ProtocolVersion::V3_1_1, 10),
            tx,
        );
        c.subscribe("s", "t", sub(QoS::AtLeastOnce));
        c.route(msg("t", QoS::ExactlyOnce, false, "a"));
        c.route(msg("t", QoS::AtMostOnce, false, "b"));
        let got = drain(&rx, ProtocolVersion::V3_1_1);
        let qos: Vec<QoS> = got
            .iter()
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
        c.route(msg("r", QoS::AtMostOnce, true, "keep"));
        c.route(msg("r", QoS::AtMostOnce, false, ""));
        assert_eq!(
            c.retained("r").unwrap().payload,
            Bytes::from_static(b"keep")
        );
        c.route(msg("r", QoS::AtMostOnce, true, ""));
        assert!(c.retained("r").is_none());
    }

    #[test]
    fn offline_queue_is_bounded_and_counted() {
        let mut c = Core::with_limits(Limits {
            max_queued_messages: 3,
            ..Limits::default()
        });
        let (tx, _rx) = outbox();
        let conn = c
            .connect("p", false, None, limits(ProtocolVersion::V3_1_1, 10), tx)
            .conn;
        c.subscribe("p", "q", sub(QoS::AtLeastOnce));
        c.disconnect("p", conn);
        for i in 0..5 {
            c.route(msg("q", QoS::AtLeastOnce, false, &i.to_string()));
        }
        assert_eq!(c.stats().dropped(DropReason::QueueFull), 2);
        let (tx, rx) = outbox();
        assert!(
            c.connect("p", false, None, limits(ProtocolVersion::V3_1_1, 10), tx)
                .session_present
        );
        c.resume("p");
        let payloads: Vec<Bytes> = drain(&rx, ProtocolVersion::V3_1_1)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => p.payload,
                _ => panic!(),
            })
            .collect();
        assert_eq!(
            payloads,
            ["2", "3", "4"].map(|s| Bytes::from(s.as_bytes().to_vec()))
        );
    }

    #[test]
    fn receive_maximum_limits_inflight_and_acks_release_more() {
        let mut c = Core::new();
        let (tx, rx) = outbox();
        c.connect(
            "w",
            true,
            Some(Duration::ZERO),
            limits(ProtocolVersion::V5, 2),
            tx,
        );
        c.subscribe("w", "t", sub(QoS::AtLeastOnce));
        for i in 0..5 {
            c.route(msg("t", QoS::AtLeastOnce, false, &i.to_string()));
        }
        let first = drain(&rx, ProtocolVersion::V5);
        assert_eq!(first.len(), 2);
        let Packet::Publish(p) = &first[0] else {
            panic!()
        };
        c.acked("w", p.packet_id.unwrap(), mqlb_protocol::PacketType::Puback);
        assert_eq!(drain(&rx, ProtocolVersion::V5).len(), 1);
    }

    #[test]
    fn v5_properties_are_dropped_for_v3_subscribers() {
        let mut c = Core::new();
        let (tx, rx) = outbox();
        c.connect(
            "old",
            true,
            Some(Duration::ZERO),
            limits(ProtocolVersion::V3_1_1, 10),
            tx,
        );
        c.subscribe("old", "p", sub(QoS::AtMostOnce));
        let mut m = msg("p", QoS::AtMostOnce, false, "x");
        m.properties.user_properties.push((
            MqttStr::try_from("k").unwrap(),
            MqttStr::try_from("v").unwrap(),
        ));
        m.properties.content_type = Some(MqttStr::try_from("text/plain").unwrap());
        c.route(m);
        let got = drain(&rx, ProtocolVersion::V3_1_1);
        let Packet::Publish(p) = &got[0] else {
            panic!()
        };
        assert_eq!(p.payload, Bytes::from_static(b"x"));
        assert!(p.properties.is_empty());
    }

    #[test]
    fn takeover_closes_the_old_connection_with_0x8e() {
        let mut c = Core::new();
        let (tx1, rx1) = outbox();
        let first = c
            .connect("dup", false, None, limits(ProtocolVersion::V5, 10), tx1)
            .conn;
        let (tx2, _rx2) = outbox();
        let second = c.connect("dup", false, None, limits(ProtocolVersion::V5, 10), tx2);
        assert!(second.session_present);
        assert!(matches!(
            rx1.take().pop_front(),
            Some(Outbound::Close(Closing::TakenOver))
        ));
        // The old connection's late disconnect does not detach the new one.
        c.disconnect("dup", first);
        assert!(c.owns("dup", second.conn));
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

    #[test]
    fn shared_groups_round_robin_and_are_keyed_by_group_and_filter() {
        let mut c = Core::new();
        let v = ProtocolVersion::V5;
        let (ta, ra) = outbox();
        let (tb, rb) = outbox();
        let (tc, rc) = outbox();
        c.connect("a", true, Some(Duration::ZERO), limits(v, 10), ta);
        c.connect("b", true, Some(Duration::ZERO), limits(v, 10), tb);
        c.connect("c", true, Some(Duration::ZERO), limits(v, 10), tc);
        c.subscribe("a", "$share/g/t/+", sub(QoS::AtLeastOnce));
        c.subscribe("b", "$share/g/t/+", sub(QoS::AtLeastOnce));
        // Same group name, other filter: a separate group.
        c.subscribe("c", "$share/g/t/#", sub(QoS::AtLeastOnce));
        for i in 0..4 {
            c.route(msg("t/x", QoS::AtLeastOnce, false, &i.to_string()));
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
        let (ta, ra) = outbox();
        let (tb, rb) = outbox();
        let a = c.connect("a", false, None, limits(v, 10), ta).conn;
        c.connect("b", false, None, limits(v, 10), tb);
        c.subscribe("a", "$share/g/job", sub(QoS::AtLeastOnce));
        c.subscribe("b", "$share/g/job", sub(QoS::AtLeastOnce));
        c.route(msg("job", QoS::AtLeastOnce, false, "task"));
        let (got_a, got_b) = (payloads(&ra, v), payloads(&rb, v));
        let (holder, other, other_rx) = if got_a.len() == 1 {
            ("a", "b", rb)
        } else {
            ("b", "a", ra)
        };
        assert_eq!(got_a.len() + got_b.len(), 1);
        let conn = if holder == "a" {
            a
        } else {
            c.sessions[holder].attached.as_ref().unwrap().conn
        };
        c.disconnect(holder, conn);
        assert_eq!(
            payloads(&other_rx, v),
            ["task"],
            "{other} did not get the handed-over message"
        );
    }

    #[test]
    fn message_expiry_counts_down_while_queued() {
        let mut c = Core::new();
        let v = ProtocolVersion::V5;
        let (tx, _rx) = outbox();
        let conn = c.connect("e", false, None, limits(v, 10), tx).conn;
        c.subscribe("e", "x", sub(QoS::AtLeastOnce));
        c.disconnect("e", conn);
        let mut old = msg("x", QoS::AtLeastOnce, false, "stale");
        old.properties.message_expiry_interval = Some(5);
        old.received = Instant::now() - Duration::from_secs(10);
        let mut fresh = msg("x", QoS::AtLeastOnce, false, "fresh");
        fresh.properties.message_expiry_interval = Some(100);
        fresh.received = Instant::now() - Duration::from_secs(40);
        c.route(old);
        c.route(fresh);
        let (tx, rx) = outbox();
        c.connect("e", false, None, limits(v, 10), tx);
        c.resume("e");
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
    fn queue_byte_limit_and_maximum_packet_size() {
        let mut c = Core::with_limits(Limits {
            max_queued_messages: 100,
            max_queued_bytes: 10,
            ..Limits::default()
        });
        let v = ProtocolVersion::V5;
        let (tx, _rx) = outbox();
        let conn = c.connect("q", false, None, limits(v, 10), tx).conn;
        c.subscribe("q", "b", sub(QoS::AtLeastOnce));
        c.disconnect("q", conn);
        for p in ["aaaa", "bbbb", "cccc"] {
            c.route(msg("b", QoS::AtLeastOnce, false, p));
        }
        assert_eq!(c.stats().dropped(DropReason::QueueFull), 1);
        // A client with a 20-byte Maximum Packet Size never gets a bigger packet.
        let (tx, rx) = outbox();
        let mut l = limits(v, 10);
        l.maximum_packet_size = 20;
        c.connect("small", true, Some(Duration::ZERO), l, tx);
        c.subscribe("small", "m", sub(QoS::AtMostOnce));
        c.route(msg("m", QoS::AtMostOnce, false, "ok"));
        c.route(msg("m", QoS::AtMostOnce, false, &"x".repeat(50)));
        assert_eq!(payloads(&rx, v), ["ok"]);
        assert_eq!(c.stats().dropped(DropReason::TooLarge), 1);
    }

    #[test]
    fn outbound_topic_aliases() {
        let mut c = Core::new();
        let v = ProtocolVersion::V5;
        let (tx, rx) = outbox();
        let mut l = limits(v, 10);
        l.topic_alias_maximum = 1;
        c.connect("al", true, Some(Duration::ZERO), l, tx);
        c.subscribe("al", "#", sub(QoS::AtMostOnce));
        c.route(msg("long/topic/name", QoS::AtMostOnce, false, "1"));
        c.route(msg("long/topic/name", QoS::AtMostOnce, false, "2"));
        c.route(msg("other", QoS::AtMostOnce, false, "3"));
        let got: Vec<(String, Option<u16>)> = drain(&rx, v)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => (p.topic.to_string(), p.properties.topic_alias),
                _ => panic!(),
            })
            .collect();
        assert_eq!(
            got,
            [
                ("long/topic/name".to_string(), Some(1)),
                (String::new(), Some(1)),
                ("other".to_string(), None)
            ]
        );
    }

    #[test]
    fn slow_qos0_consumer_is_bounded() {
        let mut c = Core::new();
        let v = ProtocolVersion::V3_1_1;
        let (tx, _never_read) = outbox();
        c.connect("slow", true, Some(Duration::ZERO), limits(v, 10), tx);
        c.subscribe("slow", "big", sub(QoS::AtMostOnce));
        let mb = "x".repeat(1 << 20);
        for _ in 0..12 {
            c.route(msg("big", QoS::AtMostOnce, false, &mb));
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
        let (tx, rx) = outbox();
        let conn = c.connect("only", false, None, limits(v, 10), tx).conn;
        c.subscribe("only", "$share/g/work", sub(QoS::AtLeastOnce));
        c.route(msg("work", QoS::AtLeastOnce, false, "job"));
        assert_eq!(payloads(&rx, v), ["job"]);
        c.disconnect("only", conn);
        let (tx, rx) = outbox();
        assert!(
            c.connect("only", false, None, limits(v, 10), tx)
                .session_present
        );
        c.resume("only");
        let again = drain(&rx, v);
        let Packet::Publish(p) = &again[0] else {
            panic!()
        };
        assert!(p.dup);
        assert_eq!(p.payload, Bytes::from_static(b"job"));
        // Still serving others.
        let (tx, rx2) = outbox();
        c.connect("other", true, Some(Duration::ZERO), limits(v, 10), tx);
        c.subscribe("other", "x", sub(QoS::AtMostOnce));
        c.route(msg("x", QoS::AtMostOnce, false, "alive"));
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
        let conn = a
            .connect(
                "dev",
                false,
                Some(Duration::from_secs(3600)),
                limits(v, 2),
                tx,
            )
            .conn;
        a.subscribe(
            "dev",
            "cmd/#",
            Sub {
                options: SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    ..Default::default()
                },
                id: Some(7),
            },
        );
        a.subscribe("dev", "$share/g/jobs", sub(QoS::AtLeastOnce));
        let pid = PacketId::new(42).unwrap();
        assert_eq!(a.qos2_received("dev", pid, 10), Some(true));
        for i in 0..4 {
            let mut m = msg("cmd/x", QoS::AtLeastOnce, false, &format!("m{i}"));
            m.properties.message_expiry_interval = Some(600);
            a.route(m);
        }
        // Two went out (receive maximum 2), two are queued.
        let sent = drain(&rx, v);
        assert_eq!(sent.len(), 2);
        a.disconnect("dev", conn);
        let snap = a.export_session("dev").unwrap();
        assert_eq!(snap.inflight.len(), 2);
        assert_eq!(snap.queued.len(), 2);
        let bytes = snap.to_bytes().unwrap();
        let back = SessionSnapshot::from_bytes(bytes.clone()).unwrap();
        assert_eq!(back, snap);
        assert!(SessionSnapshot::from_bytes(bytes.slice(..bytes.len() - 1)).is_err());

        let mut b = Core::new();
        b.import_session("dev", back).unwrap();
        // The imported subscription routes.
        let (tx, rx) = outbox();
        let c = b.connect(
            "dev",
            false,
            Some(Duration::from_secs(3600)),
            limits(v, 10),
            tx,
        );
        assert!(c.session_present);
        b.resume("dev");
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
        assert_eq!(b.qos2_received("dev", pid, 10), Some(false));
        b.route(msg("cmd/y", QoS::AtLeastOnce, false, "new"));
        let new = drain(&rx, v);
        let Packet::Publish(p) = &new[0] else {
            panic!()
        };
        assert_eq!(p.properties.subscription_identifiers, [7]);
        assert_eq!(b.subscriptions(), 2);
    }

    #[test]
    fn outbound_window_is_capped_for_clients_without_receive_maximum() {
        let mut c = Core::new();
        let v = ProtocolVersion::V3_1_1;
        let (tx, rx) = outbox();
        c.connect("v3", true, Some(Duration::ZERO), limits(v, u16::MAX), tx);
        c.subscribe("v3", "w", sub(QoS::AtLeastOnce));
        for i in 0..250 {
            c.route(msg("w", QoS::AtLeastOnce, false, &i.to_string()));
        }
        assert_eq!(
            drain(&rx, v).len(),
            usize::from(Limits::default().max_inflight)
        );
    }
}
