//! Between the core and a connection task: the mailbox, what goes in it,
//! and the per-connection encoder that turns it into bytes.
//!
//! The core decides *what* a client gets; the connection task decides *how*
//! it is written (protocol version, outbound topic aliases, the client's
//! Maximum Packet Size) and does the encoding outside the core's lock.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use mqlb_protocol::{Ack, MqttStr, Packet, PacketId, ProtocolVersion, Publish, ReasonCode};

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
    /// A change this connection waited for was not committed in time: a
    /// publish stays unacknowledged, or a delivery is held back (v5:
    /// DISCONNECT 0x80). The session stays, as for a shutdown; the client
    /// sends or gets the message again when it comes back.
    NotCommitted,
}

impl Closing {
    /// The reason code a v5 client gets.
    pub fn reason_code(self) -> ReasonCode {
        match self {
            Closing::TakenOver => ReasonCode::SESSION_TAKEN_OVER,
            Closing::ShuttingDown => ReasonCode::SERVER_SHUTTING_DOWN,
            Closing::NotCommitted => ReasonCode::UNSPECIFIED_ERROR,
        }
    }
}

/// What the core sends a connection.
// Moved from the core to the mailbox and encoded at once, never stored:
// boxing the PUBLISH would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// A PUBLISH, before topic-alias substitution.
    Publish(Publish),
    /// PUBREL for an outbound QoS 2 message whose PUBREC arrived.
    Pubrel(PacketId),
    /// Close the connection, after what was queued before.
    Close(Closing),
}

/// The mailbox between the core and one connection task, and the only way
/// to queue anything for a connection.
///
/// Items are encoded as they are pushed, by the pushing thread after the
/// core's lock is released, straight into one buffer per connection: no
/// allocation per message, and the connection task writes whatever has
/// accumulated in one call. The backlog a slow consumer is judged by is that
/// buffer's length, counted under the same lock that fills and drains it,
/// so it cannot drift or go below zero.
///
/// A mutex plus a `Notify`, rather than a channel: tokio's channels
/// allocate a 32-slot block up front, and most connections are idle. This
/// allocates nothing until something is sent.
#[derive(Debug)]
pub struct Outbox {
    queue: std::sync::Mutex<Queued>,
    /// `Queued::bytes.len()`, readable without the lock (and by the core,
    /// through [`Backlog`]).
    backlog: Backlog,
    /// Set when something was pushed (or a gate let go) since the
    /// connection task last looked; with the task's waker, the wake-up a
    /// `Notify` permit would be, without a runtime.
    woken: AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

#[derive(Debug)]
struct Queued {
    bytes: BytesMut,
    encoder: Encoder,
    /// Packet ids of messages too large for the client, for the core to
    /// forget (MQTT 5 3.1.2.11.4: discarded as if delivered).
    discarded: Vec<Option<PacketId>>,
    /// A close was queued: nothing more is accepted.
    close: Option<Closing>,
    /// Where held items start in `bytes`, each with the flag that lets it
    /// go: an item pushed with [`Outbox::push_held`] and everything after
    /// it wait until it is let go (order is kept).
    gates: VecDeque<(usize, Arc<AtomicBool>)>,
}

/// Bytes queued for one connection and not yet taken by its task: a plain
/// shared number, which the mailbox sets and the core reads.
#[derive(Debug, Clone, Default)]
pub struct Backlog(Arc<AtomicUsize>);

impl Backlog {
    /// Bytes queued now.
    pub fn bytes(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// What a connection task takes from its mailbox.
#[derive(Debug, Default)]
pub struct Taken {
    /// Encoded packets to write.
    pub bytes: Bytes,
    /// Messages not sent because they exceed the client's Maximum Packet
    /// Size; tell the core with `Core::discarded`.
    pub discarded: Vec<Option<PacketId>>,
    /// Close after writing `bytes`.
    pub close: Option<Closing>,
}

impl Default for Outbox {
    /// A mailbox for an MQTT 5 client without limits.
    fn default() -> Self {
        Self::new(Encoder::new(ProtocolVersion::V5, u32::MAX, 0))
    }
}

impl Outbox {
    /// A mailbox that encodes with `encoder` (the client's version and
    /// limits).
    pub fn new(encoder: Encoder) -> Self {
        Self {
            queue: std::sync::Mutex::new(Queued {
                bytes: BytesMut::new(),
                encoder,
                discarded: Vec::new(),
                close: None,
                gates: VecDeque::new(),
            }),
            backlog: Backlog::default(),
            woken: AtomicBool::new(false),
            waker: futures_util::task::AtomicWaker::new(),
        }
    }

    fn queued(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Encodes one item into the mailbox and wakes the connection task.
    /// After a close nothing more is accepted.
    pub fn push(&self, o: Outgoing) {
        {
            let mut q = self.queued();
            if q.close.is_some() {
                return;
            }
            let q = &mut *q;
            match q.encoder.encode(o, &mut q.bytes) {
                Encoded::Written => {}
                Encoded::TooLarge(pid) => q.discarded.push(pid),
                Encoded::Close(c) => q.close = Some(c),
            }
            self.backlog.0.store(q.bytes.len(), Ordering::Relaxed);
        }
        self.wake();
    }

    /// [`Outbox::push`], but `o` and whatever is pushed after it are held
    /// until `gate` is set and [`Outbox::wake`] called: a QoS 2 PUBLISH in
    /// a cluster leaves only once the record that names its packet
    /// identifier is on the replica, or a node taking over after a crash
    /// could send it again under another one (a duplicate).
    pub fn push_held(&self, o: Outgoing, gate: Arc<AtomicBool>) {
        {
            let mut q = self.queued();
            if q.close.is_some() {
                return;
            }
            let q = &mut *q;
            let at = q.bytes.len();
            match q.encoder.encode(o, &mut q.bytes) {
                Encoded::Written => q.gates.push_back((at, gate)),
                Encoded::TooLarge(pid) => q.discarded.push(pid),
                Encoded::Close(c) => q.close = Some(c),
            }
            self.backlog.0.store(q.bytes.len(), Ordering::Relaxed);
        }
        self.wake();
    }

    /// Drops everything from the first held item on (it was never
    /// written; the session still holds it) and closes with `why`: a held
    /// delivery whose record could not be committed.
    pub fn abort_held(&self, why: Closing) {
        {
            let mut q = self.queued();
            if let Some(&(at, _)) = q.gates.front() {
                q.bytes.truncate(at);
                q.gates.clear();
            }
            q.close.get_or_insert(why);
            self.backlog.0.store(q.bytes.len(), Ordering::Relaxed);
        }
        self.wake();
    }

    /// Wakes the connection task after a gate was set.
    pub fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Asks the connection task to close; what was queued before is
    /// written first.
    pub fn close(&self, why: Closing) {
        self.push(Outgoing::Close(why));
    }

    /// Whether a close was asked for.
    pub fn is_closing(&self) -> bool {
        self.queued().close.is_some()
    }

    /// Bytes queued and not yet taken by the connection task.
    pub fn backlog(&self) -> usize {
        self.backlog.bytes()
    }

    /// The gauge of this mailbox's backlog, for the core: the one number
    /// about a connection it reads (a QoS 0 message for a subscriber this
    /// far behind is dropped), without holding the mailbox.
    pub fn gauge(&self) -> Backlog {
        self.backlog.clone()
    }

    /// Takes everything queued (possibly nothing).
    /// Takes everything queued (possibly nothing) up to the first item
    /// still held; a close comes only once nothing is held.
    pub fn take(&self) -> Taken {
        let mut q = self.queued();
        while q
            .gates
            .front()
            .is_some_and(|(_, g)| g.load(Ordering::Acquire))
        {
            q.gates.pop_front();
        }
        let upto = q.gates.front().map_or(q.bytes.len(), |(at, _)| *at);
        for (at, _) in q.gates.iter_mut() {
            *at -= upto;
        }
        let bytes = q.bytes.split_to(upto).freeze();
        self.backlog.0.store(q.bytes.len(), Ordering::Relaxed);
        Taken {
            bytes,
            discarded: std::mem::take(&mut q.discarded),
            close: if q.gates.is_empty() { q.close } else { None },
        }
    }

    /// Resolves when something was sent since the last wake-up.
    pub fn ready(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            if self.woken.swap(false, Ordering::AcqRel) {
                return std::task::Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // Woken between the check and the registration: seen now.
            if self.woken.swap(false, Ordering::AcqRel) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }
}

/// What became of one outgoing item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoded {
    /// Appended to the output.
    Written,
    /// Larger than the client's Maximum Packet Size: not sent, and per
    /// MQTT 5 3.1.2.11.4 treated as delivered. The core must forget the
    /// packet id (for QoS 1/2).
    TooLarge(Option<PacketId>),
    /// The connection must close.
    Close(Closing),
}

/// Turns outgoing items into one client's bytes: its protocol version, its
/// outbound topic aliases, its Maximum Packet Size.
#[derive(Debug)]
pub struct Encoder {
    version: ProtocolVersion,
    maximum_packet_size: usize,
    alias_maximum: u16,
    /// Boxed and made on first use: most clients use no aliases, and this
    /// lives in every idle connection.
    // One pointer in every idle connection instead of a 48-byte map.
    #[allow(clippy::box_collection)]
    aliases: Option<Box<HashMap<MqttStr, u16>>>,
}

impl Encoder {
    /// For a client of `version` that accepts packets up to
    /// `maximum_packet_size` and `alias_maximum` topic aliases (v5).
    pub fn new(version: ProtocolVersion, maximum_packet_size: u32, alias_maximum: u16) -> Self {
        Self {
            version,
            maximum_packet_size: usize::try_from(maximum_packet_size).unwrap_or(usize::MAX),
            alias_maximum: if version.is_v5() { alias_maximum } else { 0 },
            aliases: None,
        }
    }

    /// Appends `o`'s bytes to `out`; on refusal `out` is unchanged.
    pub fn encode(&mut self, o: Outgoing, out: &mut BytesMut) -> Encoded {
        let mut publish = match o {
            Outgoing::Close(c) => return Encoded::Close(c),
            Outgoing::Pubrel(pid) => {
                let _ = Packet::Pubrel(Ack::new(pid)).encode(self.version, out);
                return Encoded::Written;
            }
            Outgoing::Publish(p) => p,
        };
        let pid = publish.packet_id;
        // Outbound topic alias: the first use sends topic + alias, later
        // uses an empty topic + alias. A new alias counts only once the
        // packet carrying it is really sent.
        let mut new_alias = None;
        if self.alias_maximum > 0 {
            let aliases = self.aliases.get_or_insert_with(Box::default);
            match aliases.get(&publish.topic) {
                Some(&alias) => {
                    publish.properties.topic_alias = Some(alias);
                    publish.topic = MqttStr::default();
                }
                None => {
                    let next = u16::try_from(aliases.len() + 1).unwrap_or(u16::MAX);
                    if next <= self.alias_maximum {
                        publish.properties.topic_alias = Some(next);
                        new_alias = Some((publish.topic.clone(), next));
                    }
                }
            }
        }
        let start = out.len();
        let encoded = Packet::Publish(publish).encode(self.version, out);
        if encoded.is_err() || out.len() - start > self.maximum_packet_size {
            out.truncate(start);
            return Encoded::TooLarge(pid);
        }
        if let (Some((topic, alias)), Some(aliases)) = (new_alias, self.aliases.as_mut()) {
            aliases.insert(topic, alias);
        }
        Encoded::Written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqlb_protocol::{Properties, QoS};

    fn publish(topic: &str, payload: &[u8]) -> Outgoing {
        Outgoing::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: MqttStr::try_from(topic).unwrap_or_default(),
            packet_id: None,
            properties: Properties::default(),
            payload: Bytes::copy_from_slice(payload),
        })
    }

    fn decode_all(v: ProtocolVersion, bytes: &[u8]) -> Vec<Publish> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Ok(Some(Packet::Publish(p))) = mqlb_protocol::decode(&mut buf, v, 1 << 20) {
            out.push(p);
        }
        out
    }

    /// A held item and everything after it wait for its gate, in order;
    /// a close queued behind them waits too; gates let go out of order
    /// release nothing past one still shut.
    #[test]
    fn held_items_wait_for_their_gate_in_order() {
        let o = Outbox::default();
        let payloads = |t: &Taken| -> Vec<Vec<u8>> {
            decode_all(ProtocolVersion::V5, &t.bytes)
                .into_iter()
                .map(|p| p.payload.to_vec())
                .collect()
        };
        let (g1, g2) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        o.push(publish("t", b"a"));
        o.push_held(publish("t", b"b"), g1.clone());
        o.push(publish("t", b"c"));
        o.push_held(publish("t", b"d"), g2.clone());
        o.close(Closing::ShuttingDown);
        let t = o.take();
        assert_eq!(payloads(&t), vec![b"a".to_vec()]);
        assert_eq!(t.close, None);
        assert!(o.backlog() > 0);
        g2.store(true, Ordering::Release);
        assert!(
            o.take().bytes.is_empty(),
            "a later gate let an earlier item go"
        );
        g1.store(true, Ordering::Release);
        let t = o.take();
        assert_eq!(
            payloads(&t),
            vec![b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]
        );
        assert_eq!(t.close, Some(Closing::ShuttingDown));
        assert_eq!(o.backlog(), 0);
    }

    #[test]
    fn topic_aliases_and_maximum_packet_size() {
        let v = ProtocolVersion::V5;
        let mut e = Encoder::new(v, 60, 1);
        let mut out = BytesMut::new();
        assert_eq!(
            e.encode(publish("long/topic/name", b"a"), &mut out),
            Encoded::Written
        );
        assert_eq!(
            e.encode(publish("long/topic/name", b"b"), &mut out),
            Encoded::Written
        );
        assert_eq!(e.encode(publish("other", b"c"), &mut out), Encoded::Written);
        // Too large for the client: not sent, and its alias is not taken.
        assert_eq!(
            e.encode(publish("x", &[0; 100]), &mut out),
            Encoded::TooLarge(None)
        );
        let got: Vec<(String, Option<u16>)> = decode_all(v, &out)
            .into_iter()
            .map(|p| (p.topic.to_string(), p.properties.topic_alias))
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

    /// A message too large for the client must not leave an alias behind
    /// that the client never learnt.
    #[test]
    fn a_dropped_packet_does_not_assign_an_alias() {
        let v = ProtocolVersion::V5;
        let mut e = Encoder::new(v, 40, 5);
        let mut out = BytesMut::new();
        assert_eq!(
            e.encode(publish("t", &[0; 100]), &mut out),
            Encoded::TooLarge(None)
        );
        assert_eq!(e.encode(publish("t", b"small"), &mut out), Encoded::Written);
        let got = decode_all(v, &out);
        assert_eq!(got[0].topic.as_str(), "t", "alias used before it was sent");
    }

    #[test]
    fn backlog_counts_what_is_queued_and_never_underflows() {
        let o = Outbox::new(Encoder::new(ProtocolVersion::V5, 200, 0));
        o.push(publish("t", &[0; 100]));
        o.push(Outgoing::Pubrel(PacketId::MIN));
        let first = o.backlog();
        assert_eq!(first, 106 + 4);
        // Too large: not queued, reported for the core to forget.
        o.push(publish("t", &[0; 300]));
        assert_eq!(o.backlog(), first);
        let t = o.take();
        assert_eq!(t.bytes.len(), first);
        assert_eq!(t.discarded, [None]);
        assert_eq!(o.backlog(), 0);
        assert!(o.take().bytes.is_empty());
        assert_eq!(o.backlog(), 0);
        assert!(!o.is_closing());
        o.close(Closing::ShuttingDown);
        o.push(publish("t", b"late"));
        assert!(o.is_closing());
        let t = o.take();
        assert_eq!(t.close, Some(Closing::ShuttingDown));
        assert!(t.bytes.is_empty(), "nothing is accepted after a close");
    }
}
