//! Broker state: sessions, subscriptions, retained messages, and the one
//! routing function every publish goes through.
//!
//! All of it sits behind one mutex, held only for in-memory work and never
//! across an await. Sessions are plain data (subscriptions, inflight and
//! queued messages, packet ids) so that the cluster layer can export and
//! import them later.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqlb_protocol::{
    MqttStr, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS, ReasonCode,
    RetainHandling, SubscriptionOptions,
};
use tokio::sync::mpsc;

use crate::trie::{filter_matches, Trie};

/// Messages queued per offline session before the oldest are dropped.
pub const DEFAULT_MAX_QUEUED: usize = 1000;

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
}

/// What a connection task receives from the core.
#[derive(Debug)]
pub enum Outbound {
    /// Encoded packets to write.
    Bytes(Bytes),
    /// Close the connection; v5 clients first get DISCONNECT with this code.
    Close(ReasonCode),
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

#[derive(Debug, Clone)]
struct Inflight {
    publish: Publish,
    state: AwaitAck,
}

#[derive(Debug)]
struct Attached {
    conn: u64,
    tx: mpsc::UnboundedSender<Outbound>,
    version: ProtocolVersion,
    receive_maximum: u16,
}

/// One client's session.
#[derive(Debug)]
struct Session {
    subs: HashMap<String, Sub>,
    attached: Option<Attached>,
    inflight: BTreeMap<u16, Inflight>,
    queue: VecDeque<(Message, QoS, Vec<u32>, bool)>,
    /// QoS 2 packet ids received and not yet released: kept with the
    /// session so a resent PUBLISH after a reconnect is not routed twice.
    qos2_in: std::collections::HashSet<u16>,
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
            qos2_in: std::collections::HashSet::new(),
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

/// Counters for `$SYS` and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// PUBLISH packets received.
    pub messages_in: u64,
    /// PUBLISH packets sent.
    pub messages_out: u64,
    /// Queued messages dropped at the per-session limit.
    pub dropped_queue_full: u64,
}

/// The result of a CONNECT.
#[derive(Debug)]
pub struct Connected {
    /// A previous session was resumed.
    pub session_present: bool,
    /// This connection's id, for detaching.
    pub conn: u64,
}

/// The broker's state.
#[derive(Debug, Default)]
pub struct Core {
    sessions: HashMap<String, Session>,
    trie: Trie<Sub>,
    retained: BTreeMap<String, Message>,
    next_conn: u64,
    stats: Stats,
    max_queued: usize,
}

impl Core {
    /// An empty broker.
    pub fn new() -> Self {
        Self {
            max_queued: DEFAULT_MAX_QUEUED,
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

    /// Attaches a connection to `client_id`'s session, taking over any other
    /// connection with that ID, and resends what the session owes.
    pub fn connect(
        &mut self,
        client_id: &str,
        clean_start: bool,
        expiry: Option<Duration>,
        version: ProtocolVersion,
        receive_maximum: u16,
        tx: mpsc::UnboundedSender<Outbound>,
    ) -> Connected {
        self.next_conn += 1;
        let conn = self.next_conn;
        if let Some(old) = self
            .sessions
            .get_mut(client_id)
            .and_then(|s| s.attached.take())
        {
            let _ = old.tx.send(Outbound::Close(ReasonCode::SESSION_TAKEN_OVER));
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
            version,
            receive_maximum: receive_maximum.max(1),
        });
        Connected {
            session_present,
            conn,
        }
    }

    /// Resends inflight messages (DUP) and sends queued ones; call after the
    /// CONNACK is written.
    pub fn resume(&mut self, client_id: &str) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let Some(a) = &s.attached else { return };
        let mut sent = 0;
        for inflight in s.inflight.values_mut() {
            let packet = match inflight.state {
                AwaitAck::Pubcomp => match inflight.publish.packet_id {
                    Some(pid) => Packet::Pubrel(mqlb_protocol::Ack::new(pid)),
                    None => continue,
                },
                _ => {
                    inflight.publish.dup = true;
                    Packet::Publish(inflight.publish.clone())
                }
            };
            if let Ok(b) = packet.to_bytes(a.version) {
                let _ = a.tx.send(Outbound::Bytes(b));
                sent += 1;
            }
        }
        self.stats.messages_out += sent;
        self.pump(client_id);
    }

    /// Detaches connection `conn`; removes the session if it expires now.
    pub fn disconnect(&mut self, client_id: &str, conn: u64) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        if s.attached.as_ref().map(|a| a.conn) != Some(conn) {
            return; // taken over already
        }
        s.attached = None;
        if s.expiry == Some(Duration::ZERO) {
            self.drop_session(client_id);
        } else {
            s.disconnected_at = Some(Instant::now());
        }
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

    /// Updates the session expiry (v5 DISCONNECT may change it).
    pub fn set_expiry(&mut self, client_id: &str, expiry: Option<Duration>) {
        if let Some(s) = self.sessions.get_mut(client_id) {
            s.expiry = expiry;
        }
    }

    fn drop_session(&mut self, client_id: &str) {
        if let Some(s) = self.sessions.remove(client_id) {
            for filter in s.subs.keys() {
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

    /// Adds a subscription; returns whether it existed, and the retained
    /// messages to send for it per its retain handling.
    pub fn subscribe(&mut self, client_id: &str, filter: &str, sub: Sub) -> bool {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return false;
        };
        let existed = s.subs.insert(filter.to_string(), sub).is_some();
        self.trie.insert(filter, client_id, sub);
        let send_retained = match sub.options.retain_handling {
            RetainHandling::SendAtSubscribe => true,
            RetainHandling::SendIfNew => !existed,
            RetainHandling::DoNotSend => false,
        };
        // Shared subscriptions never get retained messages (4.8.2).
        if send_retained && !filter.starts_with("$share/") {
            let matching: Vec<Message> = self
                .retained
                .values()
                .filter(|m| filter_matches(filter, m.topic.as_str()))
                .cloned()
                .collect();
            for m in matching {
                let qos = m.qos.min(sub.options.qos);
                self.deliver(client_id, m, qos, sub.id.into_iter().collect(), true);
            }
        }
        existed
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&mut self, client_id: &str, filter: &str) -> bool {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return false;
        };
        let existed = s.subs.remove(filter).is_some();
        self.trie.remove(filter, client_id);
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
    /// Returns the number of sessions it was delivered or queued to.
    pub fn route(&mut self, m: Message) -> usize {
        self.stats.messages_in += 1;
        if m.retain {
            self.set_retained(m.clone());
        }
        // One delivery per client: the highest QoS of its matching
        // subscriptions, with all their identifiers.
        let mut targets: HashMap<&str, (QoS, Vec<u32>, bool)> = HashMap::new();
        self.trie.matches(m.topic.as_str(), |client, sub| {
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
        let n = targets.len();
        for (client, qos, ids, rap) in targets {
            // Retain As Published keeps the flag; otherwise a routed message
            // is delivered with RETAIN 0 (3.3.1.3).
            self.deliver(&client, m.clone(), qos, ids, rap && m.retain);
        }
        n
    }

    /// Sends (or queues) one message to one session.
    fn deliver(&mut self, client_id: &str, m: Message, qos: QoS, sub_ids: Vec<u32>, retain: bool) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let can_send = s.attached.as_ref().is_some_and(|a| {
            qos == QoS::AtMostOnce || s.inflight.len() < usize::from(a.receive_maximum)
        });
        if !can_send {
            if qos == QoS::AtMostOnce || s.expiry == Some(Duration::ZERO) && s.attached.is_none() {
                return; // QoS 0 is not queued for offline sessions
            }
            if s.queue.len() >= self.max_queued {
                s.queue.pop_front();
                self.stats.dropped_queue_full += 1;
            }
            s.queue.push_back((m, qos, sub_ids, retain));
            return;
        }
        if send_now(s, m, qos, sub_ids, retain) {
            self.stats.messages_out += 1;
        }
    }

    /// Moves queued messages into the inflight window.
    fn pump(&mut self, client_id: &str) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let Some(max) = s.attached.as_ref().map(|a| usize::from(a.receive_maximum)) else {
            return;
        };
        while s.inflight.len() < max {
            let Some((m, qos, ids, retain)) = s.queue.pop_front() else {
                break;
            };
            if send_now(s, m, qos, ids, retain) {
                self.stats.messages_out += 1;
            }
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
                        let _ = a.tx.send(Outbound::Bytes(b));
                    }
                }
                return;
            }
            _ => return, // unknown id: ignore (v5 could answer 0x92)
        }
        self.pump(client_id);
    }
}

/// Encodes and sends one PUBLISH on an attached session, recording it as
/// inflight for QoS > 0. Returns whether it was sent.
fn send_now(s: &mut Session, m: Message, qos: QoS, sub_ids: Vec<u32>, retain: bool) -> bool {
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        match s.alloc_pid() {
            Some(p) => Some(p),
            None => return false,
        }
    };
    let Some(a) = &s.attached else { return false };
    let mut properties = m.properties;
    properties.subscription_identifiers = sub_ids;
    properties.topic_alias = None;
    let publish = Publish {
        dup: false,
        qos,
        retain,
        topic: m.topic,
        packet_id,
        properties,
        payload: m.payload,
    };
    let Ok(bytes) = Packet::Publish(publish.clone()).to_bytes(a.version) else {
        return false;
    };
    let _ = a.tx.send(Outbound::Bytes(bytes));
    if let Some(pid) = packet_id {
        let state = if qos == QoS::AtLeastOnce {
            AwaitAck::Puback
        } else {
            AwaitAck::Pubrec
        };
        s.inflight.insert(pid.get(), Inflight { publish, state });
    }
    true
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

    fn drain(rx: &mut mpsc::UnboundedReceiver<Outbound>, v: ProtocolVersion) -> Vec<Packet> {
        let mut out = Vec::new();
        while let Ok(Outbound::Bytes(b)) = rx.try_recv() {
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
        let (tx, mut rx) = mpsc::unbounded_channel();
        c.connect(
            "s",
            true,
            Some(Duration::ZERO),
            ProtocolVersion::V3_1_1,
            10,
            tx,
        );
        c.subscribe("s", "t", sub(QoS::AtLeastOnce));
        c.route(msg("t", QoS::ExactlyOnce, false, "a"));
        c.route(msg("t", QoS::AtMostOnce, false, "b"));
        let got = drain(&mut rx, ProtocolVersion::V3_1_1);
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
        let mut c = Core::new();
        c.max_queued = 3;
        let (tx, _rx) = mpsc::unbounded_channel();
        let conn = c
            .connect("p", false, None, ProtocolVersion::V3_1_1, 10, tx)
            .conn;
        c.subscribe("p", "q", sub(QoS::AtLeastOnce));
        c.disconnect("p", conn);
        for i in 0..5 {
            c.route(msg("q", QoS::AtLeastOnce, false, &i.to_string()));
        }
        assert_eq!(c.stats().dropped_queue_full, 2);
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert!(
            c.connect("p", false, None, ProtocolVersion::V3_1_1, 10, tx)
                .session_present
        );
        c.resume("p");
        let payloads: Vec<Bytes> = drain(&mut rx, ProtocolVersion::V3_1_1)
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
        let (tx, mut rx) = mpsc::unbounded_channel();
        c.connect("w", true, Some(Duration::ZERO), ProtocolVersion::V5, 2, tx);
        c.subscribe("w", "t", sub(QoS::AtLeastOnce));
        for i in 0..5 {
            c.route(msg("t", QoS::AtLeastOnce, false, &i.to_string()));
        }
        let first = drain(&mut rx, ProtocolVersion::V5);
        assert_eq!(first.len(), 2);
        let Packet::Publish(p) = &first[0] else {
            panic!()
        };
        c.acked("w", p.packet_id.unwrap(), mqlb_protocol::PacketType::Puback);
        assert_eq!(drain(&mut rx, ProtocolVersion::V5).len(), 1);
    }

    #[test]
    fn v5_properties_are_dropped_for_v3_subscribers() {
        let mut c = Core::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        c.connect(
            "old",
            true,
            Some(Duration::ZERO),
            ProtocolVersion::V3_1_1,
            10,
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
        let got = drain(&mut rx, ProtocolVersion::V3_1_1);
        let Packet::Publish(p) = &got[0] else {
            panic!()
        };
        assert_eq!(p.payload, Bytes::from_static(b"x"));
        assert!(p.properties.is_empty());
    }

    #[test]
    fn takeover_closes_the_old_connection_with_0x8e() {
        let mut c = Core::new();
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let first = c
            .connect("dup", false, None, ProtocolVersion::V5, 10, tx1)
            .conn;
        let (tx2, _rx2) = mpsc::unbounded_channel();
        let second = c.connect("dup", false, None, ProtocolVersion::V5, 10, tx2);
        assert!(second.session_present);
        assert!(matches!(
            rx1.try_recv(),
            Ok(Outbound::Close(ReasonCode::SESSION_TAKEN_OVER))
        ));
        // The old connection's late disconnect does not detach the new one.
        c.disconnect("dup", first);
        assert!(c.owns("dup", second.conn));
    }
}
