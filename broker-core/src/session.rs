//! One client's session as plain data, and the typed changes that are the
//! only way to modify it.
//!
//! Every mutation of a [`Session`] is a [`SessionChange`] passed to
//! [`Session::apply`]. The core records the changes of persistent sessions
//! before applying them; the cluster streams those records down a
//! replication chain, and a replica that applies them in order holds the
//! same session. A snapshot is the state those changes built, and importing
//! one replays it as changes.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use mqlb_protocol::{PacketId, Publish};

use crate::message::{Pending, Sub};

/// Where a message sent to the client stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightState {
    /// Sent at QoS 1, waiting for PUBACK.
    AwaitPuback,
    /// Sent at QoS 2, waiting for PUBREC.
    AwaitPubrec,
    /// PUBREC received, PUBREL sent, waiting for PUBCOMP.
    AwaitPubcomp,
}

/// A message sent and not yet fully acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inflight {
    /// The PUBLISH as sent (resent with DUP after a reconnect).
    pub publish: Publish,
    /// The acknowledgement it waits for.
    pub state: InflightState,
    /// What it was made from, for handing it to another shared-group member.
    pub pending: Pending,
}

/// One change to a session. Applied in order, the changes of a session
/// rebuild it exactly.
// The message-carrying variants are moved straight into the session; boxing
// them would cost two allocations per QoS 1/2 message on the hot path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionChange {
    /// A connection attached (first connect, resume or takeover), starting
    /// a new epoch, with the Session Expiry it asked for.
    Attached {
        /// The session's new epoch.
        epoch: u64,
        /// Session Expiry; `None` = never.
        expiry: Option<Duration>,
    },
    /// The connection went away; expiry counts from now.
    Detached,
    /// The session ended (clean start, expiry, replaced by an import).
    Ended,
    /// A v5 DISCONNECT changed the Session Expiry.
    ExpirySet(Option<Duration>),
    /// A subscription was added or replaced.
    Subscribed {
        /// Topic filter, as sent (shared ones with their `$share/` prefix).
        filter: String,
        /// Its options.
        sub: Sub,
    },
    /// A subscription was removed.
    Unsubscribed {
        /// Topic filter.
        filter: String,
    },
    /// A message joined the back of the queue.
    Enqueued(Pending),
    /// The message at the front of the queue left it (sent, expired or
    /// dropped at a limit).
    Dequeued,
    /// Queued messages at these positions left for another shared-group
    /// member (ascending).
    QueueRemoved(Vec<u32>),
    /// A QoS 1/2 message was sent with this packet id.
    Sent {
        /// Packet id; also the last id handed out.
        pid: PacketId,
        /// The PUBLISH as sent.
        publish: Publish,
        /// What it was made from.
        pending: Pending,
    },
    /// PUBREC arrived for `pid`; PUBREL was sent.
    Received(PacketId),
    /// The exchange for `pid` is over (PUBACK, PUBCOMP, discarded as if
    /// delivered, or handed to another member).
    Completed(PacketId),
    /// An inbound QoS 2 PUBLISH with this id was routed.
    Qos2Received(PacketId),
    /// PUBREL released an inbound QoS 2 id.
    Qos2Released(PacketId),
    /// The last packet id handed out (restoring a snapshot).
    PidCursor(u16),
    /// The session's will is waiting out its Will Delay (`Some`), or it
    /// went (`None`: published). A chain member keeps it with its copy, so
    /// the node that takes the session over publishes it when it is due,
    /// if the node that held it died first. An attach cancels it.
    WillSet(Option<Box<Will>>),
    /// How many changes the session's epoch had made when it was sent
    /// whole (the last change of a snapshot's replay): a whole copy counts
    /// as far as the session it was taken from, not as its own changes.
    Counted(u64),
}

/// One client's session: subscriptions, inflight and queued messages,
/// packet ids, expiry, epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// Filter → subscription.
    pub subs: HashMap<String, Sub>,
    /// Sent, not yet fully acknowledged, by packet id.
    pub inflight: BTreeMap<u16, Inflight>,
    /// Not yet sent.
    pub queue: VecDeque<Pending>,
    /// Payload bytes in `queue`.
    pub queued_bytes: usize,
    /// Inbound QoS 2 ids received and not yet released: kept with the
    /// session so a resent PUBLISH after a reconnect is not routed twice.
    pub qos2_in: HashSet<u16>,
    /// Last packet id handed out.
    pub next_pid: u16,
    /// Session Expiry; `None` = never (3.x clean session 0).
    pub expiry: Option<Duration>,
    /// Bumped by every attach: a stale owner's writes carry an older one.
    pub epoch: u64,
    /// When the connection went away (node-local time, for expiry).
    pub disconnected_at: Option<Instant>,
    /// How many recorded changes made the session since its epoch began
    /// (see [`Progress`]).
    pub changes: u64,
    /// Its client's will, waiting out its Will Delay (boxed: most
    /// sessions have none, and every idle client has a session).
    pub will: Option<Box<Will>>,
}

/// A will waiting out its Will Delay (MQTT 5 3.1.3.2.2), kept with the
/// session: it goes wherever the session goes (its chain, the disk, the
/// node that takes it over).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// When it is due, in Unix milliseconds: a wall-clock time, so that it
    /// means the same on every node and after a restart.
    pub due_ms: u64,
    /// The will message.
    pub message: crate::message::Message,
}

/// How far along a session is: its epoch, then how many recorded changes
/// its holder made in that epoch. Two copies of one epoch were built from
/// the same holder's changes, in order, so the one with more changes is the
/// fresher: what tells apart the copy a chain member read back from its data
/// directory and the one a peer kept receiving while it was down (the epoch
/// alone cannot; found by the simulator). Ordered by epoch, then changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Progress {
    /// The session's epoch.
    pub epoch: u64,
    /// Changes made in it.
    pub changes: u64,
}

impl Session {
    /// Whether the session outlives its connection, so its changes must be
    /// kept (and, in a cluster, replicated).
    pub fn is_persistent(&self) -> bool {
        self.expiry != Some(Duration::ZERO)
    }

    /// How far along it is, to choose the fresher of two copies.
    pub fn progress(&self) -> Progress {
        Progress {
            epoch: self.epoch,
            changes: self.changes,
        }
    }

    /// The packet id the next QoS 1/2 send will use, if one is free.
    pub fn free_pid(&self) -> Option<PacketId> {
        let mut id = self.next_pid;
        for _ in 0..u16::MAX {
            id = id.wrapping_add(1);
            if id != 0 && !self.inflight.contains_key(&id) {
                return PacketId::new(id);
            }
        }
        None
    }

    /// Applies one change. The only way a session changes. Returns the
    /// message a [`SessionChange::Dequeued`] took off the queue, so the
    /// caller can send it without a copy.
    /// `now` is when the change happens (a detach starts the expiry
    /// countdown then).
    pub fn apply(&mut self, change: SessionChange, now: Instant) -> Option<Pending> {
        // Every change counts one, in its epoch: an attach begins one, an
        // end or a whole copy's count sets it.
        self.changes = self.changes.saturating_add(1);
        match change {
            SessionChange::Attached { epoch, expiry } => {
                self.epoch = epoch;
                self.expiry = expiry;
                self.disconnected_at = None;
                self.changes = 1;
                // Back before its Will Delay ran out: not sent (3.1.3.2.2).
                self.will = None;
            }
            SessionChange::Detached => self.disconnected_at = Some(now),
            SessionChange::Ended => *self = Session::default(),
            SessionChange::ExpirySet(e) => self.expiry = e,
            SessionChange::Subscribed { filter, sub } => {
                self.subs.insert(filter, sub);
            }
            SessionChange::Unsubscribed { filter } => {
                self.subs.remove(&filter);
            }
            SessionChange::Enqueued(p) => {
                self.queued_bytes += p.msg.payload.len();
                self.queue.push_back(p);
            }
            SessionChange::Dequeued => {
                let p = self.queue.pop_front()?;
                self.queued_bytes -= p.msg.payload.len();
                return Some(p);
            }
            SessionChange::QueueRemoved(positions) => {
                let mut i = 0u32;
                let mut drop = positions.iter().peekable();
                self.queue.retain(|_| {
                    let gone = drop.peek() == Some(&&i);
                    if gone {
                        drop.next();
                    }
                    i += 1;
                    !gone
                });
                self.queued_bytes = self.queue.iter().map(|p| p.msg.payload.len()).sum();
            }
            SessionChange::Sent {
                pid,
                publish,
                pending,
            } => {
                let state = if publish.qos == mqlb_protocol::QoS::ExactlyOnce {
                    InflightState::AwaitPubrec
                } else {
                    InflightState::AwaitPuback
                };
                self.next_pid = pid.get();
                self.inflight.insert(
                    pid.get(),
                    Inflight {
                        publish,
                        state,
                        pending,
                    },
                );
            }
            SessionChange::Received(pid) => {
                if let Some(i) = self.inflight.get_mut(&pid.get()) {
                    i.state = InflightState::AwaitPubcomp;
                }
            }
            SessionChange::Completed(pid) => {
                self.inflight.remove(&pid.get());
            }
            SessionChange::Qos2Received(pid) => {
                self.qos2_in.insert(pid.get());
            }
            SessionChange::Qos2Released(pid) => {
                self.qos2_in.remove(&pid.get());
            }
            SessionChange::PidCursor(pid) => self.next_pid = pid,
            SessionChange::Counted(n) => self.changes = n,
            SessionChange::WillSet(w) => self.will = w,
        }
        None
    }
}
