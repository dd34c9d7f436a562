//! Scripted MQTT clients, as a client library behaves: persistent
//! sessions, packet identifiers, resends with DUP after a reconnect, and a
//! QoS 2 receiver's unreleased identifiers kept across connections. They
//! speak real packets (`mqlb-protocol`), and they check what they are given:
//! a QoS 2 message delivered to the application twice, or a publisher's
//! messages out of order, is a violation.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use mqlb_protocol::{Ack, MqttStr, Packet, PacketId, Properties, Publish, QoS};

use crate::rng::draw;

/// The topic filter every subscriber holds.
pub const FILTER: &str = "t/#";

/// What a client asks its connection to do.
#[derive(Debug)]
pub enum Action {
    /// Send this packet (boxed: a PUBLISH is large, a SUBSCRIBE small).
    Send(Box<Packet>),
    /// Subscribe to [`FILTER`] at QoS 2 (the shell's SUBSCRIBE: the
    /// simulation does not test the SUBSCRIBE codec, the fuzz targets do).
    Subscribe,
}

/// One message a publisher has sent and not finished.
#[derive(Debug, Clone, Copy)]
struct Out {
    no: u32,
    qos: QoS,
    /// PUBREC came (QoS 2): PUBREL is what is resent.
    released: bool,
}

/// A publisher of `total` messages on `t/{index}`, QoS 1 and 2 mixed on one
/// connection, at most `window` unfinished.
#[derive(Debug)]
pub struct Publisher {
    /// Which publisher (its messages say so).
    pub index: usize,
    total: u32,
    window: usize,
    next: u32,
    next_pid: u16,
    inflight: BTreeMap<u16, Out>,
    /// Messages acknowledged (PUBACK, or PUBREC for QoS 2): the broker has
    /// promised them.
    pub acked: BTreeSet<u32>,
    /// Messages finished (PUBACK or PUBCOMP).
    pub finished: u32,
    /// Resends after a reconnect.
    pub resent: u64,
    /// New messages it may send now (paced: one more per tick).
    allowance: usize,
    seed: u64,
    /// It left for good, without DISCONNECT, once done (with wills:
    /// [`crate::Config::wills`]).
    pub gone: bool,
}

impl Publisher {
    /// Publisher `index` of `total` messages.
    pub fn new(seed: u64, index: usize, total: u32, window: usize) -> Self {
        Publisher {
            index,
            total,
            window,
            next: 0,
            next_pid: 0,
            inflight: BTreeMap::new(),
            acked: BTreeSet::new(),
            finished: 0,
            resent: 0,
            allowance: 0,
            seed,
            gone: false,
        }
    }

    /// Whether every message is finished.
    pub fn done(&self) -> bool {
        self.finished == self.total
    }

    /// The QoS of message `no` (drawn from the seed).
    pub fn qos_of(seed: u64, index: usize, no: u32) -> QoS {
        if draw(seed, 0x9000 + index as u64, u64::from(no)).is_multiple_of(2) {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        }
    }

    fn publish(&self, pid: u16, o: Out, dup: bool) -> Packet {
        Packet::Publish(Publish {
            dup,
            qos: o.qos,
            // Every seventh message is retained: the nodes' retained
            // stores must converge.
            retain: o.no % 7 == 3,
            topic: MqttStr::try_from(format!("t/{}", self.index).as_str())
                .expect("t/N is a topic name"),
            packet_id: PacketId::new(pid),
            properties: Properties::default(),
            payload: Bytes::from(format!("{}:{}", self.index, o.no)),
        })
    }

    /// Connected: resend what is unfinished (in packet-identifier order,
    /// the order they were first sent while identifiers do not wrap), then
    /// new messages if `start`.
    pub fn on_connack(&mut self, start: bool) -> Vec<Action> {
        let mut out = Vec::new();
        let mut order: Vec<(u16, Out)> = self.inflight.iter().map(|(p, o)| (*p, *o)).collect();
        order.sort_by_key(|(_, o)| o.no);
        for (pid, o) in order {
            self.resent += 1;
            let p = match (o.released, PacketId::new(pid)) {
                (true, Some(id)) => Packet::Pubrel(Ack::new(id)),
                _ => self.publish(pid, o, true),
            };
            out.push(Action::Send(Box::new(p)));
        }
        if start {
            out.extend(self.fill());
        }
        out
    }

    /// One more new message may go (the publisher's pace).
    pub fn tick(&mut self) {
        self.allowance = (self.allowance + 1).min(self.window);
    }

    /// New messages, up to the window and the pace.
    pub fn fill(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while self.inflight.len() < self.window && self.next < self.total && self.allowance > 0 {
            self.allowance -= 1;
            let pid = loop {
                self.next_pid = self.next_pid.checked_add(1).unwrap_or(1);
                if !self.inflight.contains_key(&self.next_pid) {
                    break self.next_pid;
                }
            };
            let o = Out {
                no: self.next,
                qos: Self::qos_of(self.seed, self.index, self.next),
                released: false,
            };
            self.next += 1;
            self.inflight.insert(pid, o);
            out.push(Action::Send(Box::new(self.publish(pid, o, false))));
        }
        out
    }

    /// A packet from the broker.
    pub fn on_packet(&mut self, p: &Packet) -> Vec<Action> {
        match p {
            Packet::Puback(a) => {
                let pid = a.packet_id.get();
                if self
                    .inflight
                    .get(&pid)
                    .is_some_and(|o| o.qos == QoS::AtLeastOnce)
                {
                    if let Some(o) = self.inflight.remove(&pid) {
                        self.acked.insert(o.no);
                        self.finished += 1;
                    }
                    return self.fill();
                }
                Vec::new()
            }
            Packet::Pubrec(a) => {
                let pid = a.packet_id.get();
                match self.inflight.get_mut(&pid) {
                    Some(o) if o.qos == QoS::ExactlyOnce => {
                        o.released = true;
                        self.acked.insert(o.no);
                        vec![Action::Send(Box::new(Packet::Pubrel(Ack::new(
                            a.packet_id,
                        ))))]
                    }
                    _ => Vec::new(),
                }
            }
            Packet::Pubcomp(a) => {
                let pid = a.packet_id.get();
                if self.inflight.get(&pid).is_some_and(|o| o.released) {
                    self.inflight.remove(&pid);
                    self.finished += 1;
                    return self.fill();
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }
}

/// A persistent subscriber to [`FILTER`] at QoS 2.
#[derive(Debug, Default)]
pub struct Subscriber {
    /// Its SUBACK came (since the session was last found missing).
    pub subscribed: bool,
    /// Ever subscribed.
    pub ever_subscribed: bool,
    /// QoS 2 identifiers received and not yet released (PUBREL): a
    /// PUBLISH with one of these is the same message again.
    unreleased: BTreeSet<u16>,
    /// Messages given to the application, by (publisher, number), and
    /// how often.
    pub got: BTreeMap<(usize, u32), u32>,
    /// Per publisher, the newest message given the first time.
    newest: BTreeMap<usize, u32>,
    /// Sessions found missing on a reconnect.
    pub sessions_lost: u64,
    /// QoS 1 messages given again (allowed: at least once).
    pub qos1_again: u64,
    /// QoS 2 PUBLISH resends absorbed by the unreleased identifiers.
    pub qos2_resends: u64,
    /// Wills given, by (publisher, connection it was the will of), and
    /// how often (at least once: a holder that dies after sending one,
    /// before its chain heard, leaves a copy that sends it again).
    pub wills: BTreeMap<(usize, u64), u32>,
}

/// Why a run failed, as one line.
pub type Violation = String;

impl Subscriber {
    /// Connected: subscribe if the session is new (or lost).
    pub fn on_connack(&mut self, present: bool) -> Vec<Action> {
        if present && self.ever_subscribed {
            return Vec::new();
        }
        if self.ever_subscribed {
            self.sessions_lost += 1;
            // A new session: its identifiers start again.
            self.unreleased.clear();
        }
        self.subscribed = false;
        vec![Action::Subscribe]
    }

    /// The subscription is in place.
    pub fn on_suback(&mut self) {
        self.subscribed = true;
        self.ever_subscribed = true;
    }

    /// A packet from the broker; violations found are added to `bad`.
    pub fn on_packet(&mut self, p: &Packet, me: &str, bad: &mut Vec<Violation>) -> Vec<Action> {
        match p {
            Packet::Publish(p) => {
                let reply = match (p.qos, p.packet_id) {
                    (QoS::AtLeastOnce, Some(id)) => Some(Packet::Puback(Ack::new(id))),
                    (QoS::ExactlyOnce, Some(id)) => Some(Packet::Pubrec(Ack::new(id))),
                    _ => None,
                };
                let fresh = match (p.qos, p.packet_id) {
                    (QoS::ExactlyOnce, Some(id)) => {
                        let first = self.unreleased.insert(id.get());
                        if !first {
                            self.qos2_resends += 1;
                        }
                        first
                    }
                    _ => true,
                };
                if fresh {
                    self.deliver(p, me, bad);
                }
                reply
                    .map(|r| Action::Send(Box::new(r)))
                    .into_iter()
                    .collect()
            }
            Packet::Pubrel(a) => {
                self.unreleased.remove(&a.packet_id.get());
                vec![Action::Send(Box::new(Packet::Pubcomp(Ack::new(
                    a.packet_id,
                ))))]
            }
            _ => Vec::new(),
        }
    }

    /// A message given to the application.
    fn deliver(&mut self, p: &Publish, me: &str, bad: &mut Vec<Violation>) {
        if p.topic.as_str().starts_with(WILLS) {
            let Some((publisher, conn)) = parse_will(&p.payload) else {
                bad.push(format!("{me}: a will it was not sent: {:?}", p.payload));
                return;
            };
            *self.wills.entry((publisher, conn)).or_insert(0) += 1;
            return;
        }
        let Some((publisher, no)) = parse(&p.payload) else {
            bad.push(format!("{me}: a message it was not sent: {:?}", p.payload));
            return;
        };
        let n = self.got.entry((publisher, no)).or_insert(0);
        *n += 1;
        if *n > 1 {
            if p.qos == QoS::ExactlyOnce {
                bad.push(format!(
                    "{me}: QoS 2 message {publisher}:{no} delivered {} times",
                    *n
                ));
            } else {
                self.qos1_again += 1;
            }
            return;
        }
        let newest = self.newest.entry(publisher).or_insert(no);
        if no < *newest {
            bad.push(format!(
                "{me}: publisher {publisher}'s message {no} came after its message {newest}"
            ));
        }
        *newest = (*newest).max(no);
    }
}

/// Where a publisher's will goes (under [`FILTER`]): `t/will/{index}`.
pub const WILLS: &str = "t/will/";

/// A publisher's will for its connection `conn`: topic and payload.
pub fn will_of(index: usize, conn: u64) -> (String, Bytes) {
    (
        format!("{WILLS}{index}"),
        Bytes::from(format!("will:{index}:{conn}")),
    )
}

/// `will:publisher:connection` from a will's payload.
fn parse_will(payload: &[u8]) -> Option<(usize, u64)> {
    let s = std::str::from_utf8(payload).ok()?.strip_prefix("will:")?;
    let (p, c) = s.split_once(':')?;
    Some((p.parse().ok()?, c.parse().ok()?))
}

/// `publisher:number` from a payload.
fn parse(payload: &[u8]) -> Option<(usize, u32)> {
    let s = std::str::from_utf8(payload).ok()?;
    let (p, n) = s.split_once(':')?;
    Some((p.parse().ok()?, n.parse().ok()?))
}

/// What a client is.
#[derive(Debug)]
pub enum Role {
    /// Publishes.
    Publisher(Publisher),
    /// Subscribes.
    Subscriber(Subscriber),
}

/// One scripted client.
#[derive(Debug)]
pub struct Client {
    /// Its client ID.
    pub id: Arc<str>,
    /// What it does.
    pub role: Role,
    /// Its connection now, if any (opening or open).
    pub conn: Option<usize>,
    /// Whether that connection has its CONNACK.
    pub open: bool,
    /// Connection attempts.
    pub attempts: u64,
}
