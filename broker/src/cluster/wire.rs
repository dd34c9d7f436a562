//! The frames nodes exchange on a peer link, after the handshake.
//!
//! Each frame is `u32 length | u8 kind | body`. Messages travel as MQTT 5
//! PUBLISH packets encoded by our own codec (topic, payload, QoS, retain
//! and every property, with Message Expiry counted down to what is left),
//! so a forwarded message is exactly what a client would have received.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mqlb_protocol::{MqttStr, Packet, PacketId, Properties, ProtocolVersion, Subscribe};

use crate::hlc::Hlc;
use crate::message::{Message, Pending, Sub};
use crate::session::SessionChange;
use crate::snapshot::{
    get_packet, get_str, message_to_publish, publish_to_message, put_str, SnapshotError,
};

/// The version of these frames, exchanged in the handshake: a node
/// refuses a peer that speaks another, and says so, instead of misreading
/// its frames (2: cluster links over mutual TLS, with `Promoted`; 3: a
/// whole session copy says how far along its epoch it is,
/// `SessionChange::Counted`, and a session's pending will goes down its
/// chain, `SessionChange::WillSet`).
pub const VERSION: u8 = 3;

/// Largest frame accepted: a maximum-size MQTT packet plus routing data.
pub const MAX_FRAME: usize = 2 << 20;

/// One frame on a peer link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Nothing to say; proves the sender is alive.
    Ping,
    /// The sender's whole interest follows: forget what it said before.
    Reset,
    /// The sender's sessions gained or lost their last subscription to a
    /// filter.
    Interest {
        /// Topic filter (shared ones whole, with `$share/{group}/`).
        filter: String,
        /// Gained (`true`) or lost.
        gained: bool,
    },
    /// The snapshot (interest and retained messages) that follows a link's
    /// opening is complete.
    SyncDone,
    /// A retained write (`None` deletes) at a version.
    Retained {
        /// Topic.
        topic: String,
        /// The message, or `None` for a deletion.
        message: Option<Message>,
        /// Its version: last writer wins.
        version: Hlc,
    },
    /// Changes to one session, for a member of its chain. `seq` comes
    /// back in an [`Frame::Ack`] once they are applied.
    Replicate {
        /// Acknowledgement handle.
        seq: u64,
        /// Client ID.
        client: String,
        /// The writer's epoch: a copy with a newer one refuses these.
        epoch: u64,
        /// The node serving the session live ("" when the sender only keeps
        /// a copy and knows of no live holder).
        holder: String,
        /// The changes, in order.
        changes: Vec<SessionChange>,
    },
    /// Changes sent with this `seq` are applied.
    Ack {
        /// From the [`Frame::Replicate`].
        seq: u64,
    },
    /// A publish for the receiver's matching sessions, and for one local
    /// member of each listed shared group.
    Forward {
        /// Non-zero: send an [`Frame::Ack`] with it once committed.
        seq: u64,
        /// The message.
        message: Message,
        /// Shared groups (`$share/{group}/{filter}`) this node serves.
        groups: Vec<Arc<str>>,
        /// Forwarded again after another peer died or refused it: only
        /// sessions taken over since this node first had it get it.
        again: bool,
    },
    /// A message of the Raft group that commits the view (protobuf, as
    /// raft-rs encodes it; see `consensus`).
    Raft(Bytes),
    /// The peers the sender hears from (itself included): the leader
    /// drops a member from the view only when a majority cannot hear it,
    /// so a link that fails between two nodes evicts neither.
    Observed(Vec<String>),
    /// The sender is stopping gracefully: count it out of the live set, so
    /// the view moves its sessions to their replicas before it goes.
    Leaving,
    /// The [`Frame::Forward`] sent with this `seq` was not delivered: the
    /// receiver no longer serves sessions. The sender holds the message
    /// and forwards it again to whoever took them over.
    Refused {
        /// From the forward.
        seq: u64,
    },
    /// A state store request for a key the receiver owns: it executes it,
    /// routes the answer, and sends [`Frame::StoreAck`] with `seq`.
    StoreInvoke {
        /// Acknowledgement handle.
        seq: u64,
        /// The requesting client.
        client: String,
        /// Times it was passed on already (views that disagree for a
        /// moment must not bounce it for ever).
        hops: u8,
        /// The request as published.
        message: Message,
    },
    /// A key's new state, for a member of its chain; or, without a copy,
    /// a barrier: the [`Frame::StoreAck`] proves everything sent before it
    /// is applied (what makes reads at the owner linearizable).
    StoreCopy {
        /// Acknowledgement handle (0: none wanted).
        seq: u64,
        /// The sender's view: a receiver in a newer one refuses.
        view: u64,
        /// The key's state.
        copy: Option<mqlb_statestore::store::KeyCopy>,
    },
    /// [`Frame::StoreCopy`] or [`Frame::StoreInvoke`] `seq` was applied
    /// (`ok`) or refused.
    StoreAck {
        /// From the frame.
        seq: u64,
        /// Applied.
        ok: bool,
    },
    /// The sender has sent every key copy that view `view`'s chains need
    /// from it: the receiver may answer for the keys it owns in that view.
    StoreSynced {
        /// The view.
        view: u64,
    },
    /// The sender has promoted every session copy it owns in view `view`
    /// and announced their interest (earlier on this link): a publish
    /// held for a dead node's sessions can be routed again at once.
    Promoted {
        /// The view.
        view: u64,
    },
    /// A client's session ended: the owners of the keys it watched drop
    /// its watches.
    StoreForget {
        /// The client.
        client: String,
    },
    /// Fingerprints of the messages a session was given lately, sent to a
    /// chain member ahead of the session whole: a message routed again
    /// after a failure is then not given twice by whichever node takes the
    /// session over, though the copy no longer holds it (delivered and
    /// acknowledged meanwhile).
    Seen {
        /// The session's client ID.
        client: String,
        /// Fingerprints (see `core::fingerprint`).
        prints: Vec<u64>,
    },
}

const PING: u8 = 0;
const RESET: u8 = 1;
const INTEREST: u8 = 2;
const SYNC_DONE: u8 = 3;
const RETAINED: u8 = 4;
const FORWARD: u8 = 5;
const REPLICATE: u8 = 6;
const ACK: u8 = 7;
const RAFT: u8 = 8;
const OBSERVED: u8 = 9;
const LEAVING: u8 = 10;
const REFUSED: u8 = 11;
const STORE_INVOKE: u8 = 12;
const STORE_COPY: u8 = 13;
const STORE_ACK: u8 = 14;
const STORE_SYNCED: u8 = 15;
const STORE_FORGET: u8 = 16;
const FORWARD_AGAIN: u8 = 17;
const SEEN: u8 = 18;
const PROMOTED: u8 = 19;

fn put_bytes(b: &mut BytesMut, v: &[u8]) -> Result<(), SnapshotError> {
    b.put_u32(u32::try_from(v.len()).map_err(|_| SnapshotError("bytes too long"))?);
    b.put_slice(v);
    Ok(())
}

fn get_bytes(b: &mut Bytes) -> Result<Vec<u8>, SnapshotError> {
    need(b, 4)?;
    let n = b.get_u32() as usize;
    need(b, n)?;
    Ok(b.split_to(n).to_vec())
}

fn put_hlc(b: &mut BytesMut, h: Option<&mqlb_statestore::hlc::Hlc>) -> Result<(), SnapshotError> {
    put_str(b, h.map(ToString::to_string).as_deref())
}

fn get_hlc(b: &mut Bytes) -> Result<Option<mqlb_statestore::hlc::Hlc>, SnapshotError> {
    match get_str(b)? {
        None => Ok(None),
        Some(s) => mqlb_statestore::hlc::Hlc::parse(&s)
            .map(Some)
            .ok_or(SnapshotError("bad timestamp")),
    }
}

fn put_key_copy(
    b: &mut BytesMut,
    c: &mqlb_statestore::store::KeyCopy,
) -> Result<(), SnapshotError> {
    put_bytes(b, &c.key)?;
    b.put_u64(c.rev.view);
    b.put_u64(c.rev.seq);
    match &c.entry {
        None => b.put_u8(0),
        Some(e) => {
            b.put_u8(1);
            put_bytes(b, &e.value)?;
            put_hlc(b, Some(&e.version))?;
            put_hlc(b, e.fence.as_ref())?;
            b.put_u64(e.expires_ms.unwrap_or(u64::MAX));
        }
    }
    b.put_u32(u32::try_from(c.watchers.len()).map_err(|_| SnapshotError("watchers"))?);
    for w in &c.watchers {
        put_str(b, Some(w))?;
    }
    Ok(())
}

fn get_key_copy(b: &mut Bytes) -> Result<mqlb_statestore::store::KeyCopy, SnapshotError> {
    use mqlb_statestore::store::{Entry, KeyCopy, Rev};
    let key = get_bytes(b)?;
    need(b, 17)?;
    let rev = Rev {
        view: b.get_u64(),
        seq: b.get_u64(),
    };
    let entry = match b.get_u8() {
        0 => None,
        1 => {
            let value = get_bytes(b)?;
            let version = get_hlc(b)?.ok_or(SnapshotError("missing version"))?;
            let fence = get_hlc(b)?;
            need(b, 8)?;
            let expires_ms = Some(b.get_u64()).filter(|t| *t != u64::MAX);
            Some(Entry {
                value,
                version,
                fence,
                expires_ms,
            })
        }
        _ => return Err(SnapshotError("bad entry tag")),
    };
    need(b, 4)?;
    let n = b.get_u32() as usize;
    need(b, n.saturating_mul(2))?;
    let mut watchers = Vec::with_capacity(n);
    for _ in 0..n {
        watchers.push(get_str(b)?.ok_or(SnapshotError("empty watcher"))?);
    }
    Ok(KeyCopy {
        key,
        rev,
        entry,
        watchers,
    })
}

fn put_pending(b: &mut BytesMut, p: &Pending) -> Result<(), SnapshotError> {
    put_str(b, p.shared.as_deref())?;
    put_str(b, p.msg.origin.as_deref())?;
    let publish = message_to_publish(&p.msg, p.qos, p.retain, &p.sub_ids, Instant::now());
    Packet::Publish(publish)
        .encode(ProtocolVersion::V5, b)
        .map_err(|_| SnapshotError("message"))
}

fn get_pending(b: &mut Bytes) -> Result<Pending, SnapshotError> {
    let shared = get_str(b)?;
    let origin = get_str(b)?;
    let Packet::Publish(p) = get_packet(b)? else {
        return Err(SnapshotError("expected PUBLISH"));
    };
    Ok(Pending {
        msg: publish_to_message(&p, origin.as_deref(), Instant::now()),
        qos: p.qos,
        sub_ids: p.properties.subscription_identifiers.clone(),
        retain: p.retain,
        shared: shared.map(Arc::from),
    })
}

fn put_expiry(b: &mut BytesMut, e: Option<Duration>) {
    b.put_u32(e.map_or(u32::MAX, |d| {
        u32::try_from(d.as_secs()).unwrap_or(u32::MAX - 1)
    }));
}

fn get_expiry(b: &mut Bytes) -> Result<Option<Duration>, SnapshotError> {
    need(b, 4)?;
    Ok(match b.get_u32() {
        u32::MAX => None,
        s => Some(Duration::from_secs(u64::from(s))),
    })
}

fn need(b: &Bytes, n: usize) -> Result<(), SnapshotError> {
    if b.remaining() < n {
        Err(SnapshotError("truncated change"))
    } else {
        Ok(())
    }
}

fn get_pid(b: &mut Bytes) -> Result<PacketId, SnapshotError> {
    need(b, 2)?;
    PacketId::new(b.get_u16()).ok_or(SnapshotError("packet id 0"))
}

/// Appends one session change.
pub fn put_change(b: &mut BytesMut, c: &SessionChange) -> Result<(), SnapshotError> {
    match c {
        SessionChange::Attached { epoch, expiry } => {
            b.put_u8(0);
            b.put_u64(*epoch);
            put_expiry(b, *expiry);
        }
        SessionChange::Detached => b.put_u8(1),
        SessionChange::Ended => b.put_u8(2),
        SessionChange::ExpirySet(e) => {
            b.put_u8(3);
            put_expiry(b, *e);
        }
        SessionChange::Subscribed { filter, sub } => {
            b.put_u8(4);
            Packet::Subscribe(Subscribe {
                packet_id: PacketId::MIN,
                properties: Properties {
                    subscription_identifiers: sub.id.into_iter().collect(),
                    ..Properties::default()
                },
                filters: vec![(
                    MqttStr::try_from(filter.as_str()).map_err(|_| SnapshotError("filter"))?,
                    sub.options,
                )],
            })
            .encode(ProtocolVersion::V5, b)
            .map_err(|_| SnapshotError("subscription"))?;
        }
        SessionChange::Unsubscribed { filter } => {
            b.put_u8(5);
            put_str(b, Some(filter))?;
        }
        SessionChange::Enqueued(p) => {
            b.put_u8(6);
            put_pending(b, p)?;
        }
        SessionChange::Dequeued => b.put_u8(7),
        SessionChange::QueueRemoved(positions) => {
            b.put_u8(8);
            b.put_u32(u32::try_from(positions.len()).map_err(|_| SnapshotError("count"))?);
            for p in positions {
                b.put_u32(*p);
            }
        }
        SessionChange::Sent {
            pid,
            publish,
            pending,
        } => {
            b.put_u8(9);
            b.put_u16(pid.get());
            Packet::Publish(publish.clone())
                .encode(ProtocolVersion::V5, b)
                .map_err(|_| SnapshotError("message"))?;
            put_pending(b, pending)?;
        }
        SessionChange::Received(pid) => {
            b.put_u8(10);
            b.put_u16(pid.get());
        }
        SessionChange::Completed(pid) => {
            b.put_u8(11);
            b.put_u16(pid.get());
        }
        SessionChange::Qos2Received(pid) => {
            b.put_u8(12);
            b.put_u16(pid.get());
        }
        SessionChange::Qos2Released(pid) => {
            b.put_u8(13);
            b.put_u16(pid.get());
        }
        SessionChange::PidCursor(pid) => {
            b.put_u8(14);
            b.put_u16(*pid);
        }
        SessionChange::Counted(n) => {
            b.put_u8(15);
            b.put_u64(*n);
        }
        SessionChange::WillSet(w) => {
            b.put_u8(16);
            match w {
                None => b.put_u8(0),
                Some(w) => {
                    b.put_u8(1);
                    b.put_u64(w.due_ms);
                    put_message(b, &w.message)?;
                }
            }
        }
    }
    Ok(())
}

/// Reads one session change.
pub fn get_change(b: &mut Bytes) -> Result<SessionChange, SnapshotError> {
    need(b, 1)?;
    Ok(match b.get_u8() {
        0 => {
            need(b, 8)?;
            let epoch = b.get_u64();
            SessionChange::Attached {
                epoch,
                expiry: get_expiry(b)?,
            }
        }
        1 => SessionChange::Detached,
        2 => SessionChange::Ended,
        3 => SessionChange::ExpirySet(get_expiry(b)?),
        4 => {
            let Packet::Subscribe(s) = get_packet(b)? else {
                return Err(SnapshotError("expected SUBSCRIBE"));
            };
            let id = s.properties.subscription_identifiers.first().copied();
            let (filter, options) = s
                .filters
                .into_iter()
                .next()
                .ok_or(SnapshotError("empty SUBSCRIBE"))?;
            SessionChange::Subscribed {
                filter: filter.to_string(),
                sub: Sub { options, id },
            }
        }
        5 => SessionChange::Unsubscribed {
            filter: get_str(b)?.ok_or(SnapshotError("empty filter"))?,
        },
        6 => SessionChange::Enqueued(get_pending(b)?),
        7 => SessionChange::Dequeued,
        8 => {
            need(b, 4)?;
            let n = b.get_u32() as usize;
            need(b, n.saturating_mul(4))?;
            SessionChange::QueueRemoved((0..n).map(|_| b.get_u32()).collect())
        }
        9 => {
            let pid = get_pid(b)?;
            let Packet::Publish(publish) = get_packet(b)? else {
                return Err(SnapshotError("expected PUBLISH"));
            };
            SessionChange::Sent {
                pid,
                publish,
                pending: get_pending(b)?,
            }
        }
        10 => SessionChange::Received(get_pid(b)?),
        11 => SessionChange::Completed(get_pid(b)?),
        12 => SessionChange::Qos2Received(get_pid(b)?),
        13 => SessionChange::Qos2Released(get_pid(b)?),
        14 => {
            need(b, 2)?;
            SessionChange::PidCursor(b.get_u16())
        }
        15 => {
            need(b, 8)?;
            SessionChange::Counted(b.get_u64())
        }
        16 => {
            need(b, 1)?;
            if b.get_u8() == 0 {
                SessionChange::WillSet(None)
            } else {
                need(b, 8)?;
                let due_ms = b.get_u64();
                SessionChange::WillSet(Some(Box::new(crate::session::Will {
                    due_ms,
                    message: get_message(b)?,
                })))
            }
        }
        _ => return Err(SnapshotError("unknown change")),
    })
}

fn put_message(b: &mut BytesMut, m: &Message) -> Result<(), SnapshotError> {
    put_str(b, m.origin.as_deref())?;
    let p = message_to_publish(m, m.qos, m.retain, &[], Instant::now());
    Packet::Publish(p)
        .encode(ProtocolVersion::V5, b)
        .map_err(|_| SnapshotError("message"))
}

fn get_message(b: &mut Bytes) -> Result<Message, SnapshotError> {
    let origin = get_str(b)?;
    let Packet::Publish(p) = get_packet(b)? else {
        return Err(SnapshotError("expected PUBLISH"));
    };
    Ok(publish_to_message(&p, origin.as_deref(), Instant::now()))
}

impl Frame {
    /// Appends the frame, length prefix included, to `out`.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), SnapshotError> {
        let start = out.len();
        out.put_u32(0);
        match self {
            Frame::Ping => out.put_u8(PING),
            Frame::Leaving => out.put_u8(LEAVING),
            Frame::Reset => out.put_u8(RESET),
            Frame::SyncDone => out.put_u8(SYNC_DONE),
            Frame::Interest { filter, gained } => {
                out.put_u8(INTEREST);
                out.put_u8(u8::from(*gained));
                put_str(out, Some(filter))?;
            }
            Frame::Retained {
                topic,
                message,
                version,
            } => {
                out.put_u8(RETAINED);
                out.put_u64(version.wall_ms);
                out.put_u32(version.logical);
                out.put_u32(version.node);
                put_str(out, Some(topic))?;
                match message {
                    Some(m) => {
                        out.put_u8(1);
                        put_message(out, m)?;
                    }
                    None => out.put_u8(0),
                }
            }
            Frame::Replicate {
                seq,
                client,
                epoch,
                holder,
                changes,
            } => {
                out.put_u8(REPLICATE);
                out.put_u64(*seq);
                put_str(out, Some(client))?;
                out.put_u64(*epoch);
                put_str(out, Some(holder))?;
                out.put_u32(u32::try_from(changes.len()).map_err(|_| SnapshotError("count"))?);
                for c in changes {
                    put_change(out, c)?;
                }
            }
            Frame::Ack { seq } => {
                out.put_u8(ACK);
                out.put_u64(*seq);
            }
            Frame::Refused { seq } => {
                out.put_u8(REFUSED);
                out.put_u64(*seq);
            }
            Frame::Forward {
                seq,
                message,
                groups,
                again,
            } => {
                out.put_u8(if *again { FORWARD_AGAIN } else { FORWARD });
                out.put_u64(*seq);
                out.put_u16(u16::try_from(groups.len()).map_err(|_| SnapshotError("groups"))?);
                for g in groups {
                    put_str(out, Some(g))?;
                }
                put_message(out, message)?;
            }
            Frame::Raft(m) => {
                out.put_u8(RAFT);
                out.put_slice(m);
            }
            Frame::StoreInvoke {
                seq,
                client,
                hops,
                message,
            } => {
                out.put_u8(STORE_INVOKE);
                out.put_u64(*seq);
                out.put_u8(*hops);
                put_str(out, Some(client))?;
                put_message(out, message)?;
            }
            Frame::StoreCopy { seq, view, copy } => {
                out.put_u8(STORE_COPY);
                out.put_u64(*seq);
                out.put_u64(*view);
                match copy {
                    None => out.put_u8(0),
                    Some(c) => {
                        out.put_u8(1);
                        put_key_copy(out, c)?;
                    }
                }
            }
            Frame::StoreAck { seq, ok } => {
                out.put_u8(STORE_ACK);
                out.put_u64(*seq);
                out.put_u8(u8::from(*ok));
            }
            Frame::StoreSynced { view } => {
                out.put_u8(STORE_SYNCED);
                out.put_u64(*view);
            }
            Frame::Promoted { view } => {
                out.put_u8(PROMOTED);
                out.put_u64(*view);
            }
            Frame::StoreForget { client } => {
                out.put_u8(STORE_FORGET);
                put_str(out, Some(client))?;
            }
            Frame::Seen { client, prints } => {
                out.put_u8(SEEN);
                put_str(out, Some(client))?;
                out.put_u32(u32::try_from(prints.len()).map_err(|_| SnapshotError("prints"))?);
                for p in prints {
                    out.put_u64(*p);
                }
            }
            Frame::Observed(names) => {
                out.put_u8(OBSERVED);
                out.put_u16(u16::try_from(names.len()).map_err(|_| SnapshotError("names"))?);
                for n in names {
                    put_str(out, Some(n))?;
                }
            }
        }
        let len = out.len() - start - 4;
        if len > MAX_FRAME {
            out.truncate(start);
            return Err(SnapshotError("frame too large"));
        }
        let len = u32::try_from(len).map_err(|_| SnapshotError("frame too large"))?;
        if let Some(slot) = out.get_mut(start..start + 4) {
            slot.copy_from_slice(&len.to_be_bytes());
        }
        Ok(())
    }

    /// Takes one whole frame off the front of `buf`: `Ok(None)` until one
    /// has arrived.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, SnapshotError> {
        let Some(&[a, b, c, d]) = buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(SnapshotError("bad frame length"));
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        buf.advance(4);
        let mut b = buf.split_to(len).freeze();
        let tag = b.get_u8();
        let f = match tag {
            PING => Frame::Ping,
            LEAVING => Frame::Leaving,
            RESET => Frame::Reset,
            SYNC_DONE => Frame::SyncDone,
            INTEREST => {
                if !b.has_remaining() {
                    return Err(SnapshotError("truncated interest"));
                }
                let gained = b.get_u8() != 0;
                let filter = get_str(&mut b)?.ok_or(SnapshotError("empty filter"))?;
                Frame::Interest { filter, gained }
            }
            RETAINED => {
                if b.remaining() < 16 {
                    return Err(SnapshotError("truncated version"));
                }
                let version = Hlc {
                    wall_ms: b.get_u64(),
                    logical: b.get_u32(),
                    node: b.get_u32(),
                };
                let topic = get_str(&mut b)?.ok_or(SnapshotError("empty topic"))?;
                if !b.has_remaining() {
                    return Err(SnapshotError("truncated retained"));
                }
                let message = match b.get_u8() {
                    0 => None,
                    _ => Some(get_message(&mut b)?),
                };
                Frame::Retained {
                    topic,
                    message,
                    version,
                }
            }
            REPLICATE => {
                need(&b, 8)?;
                let seq = b.get_u64();
                let client = get_str(&mut b)?.ok_or(SnapshotError("empty client"))?;
                need(&b, 8)?;
                let epoch = b.get_u64();
                let holder = get_str(&mut b)?.unwrap_or_default();
                need(&b, 4)?;
                let n = b.get_u32() as usize;
                // Each change takes at least a byte: a bogus count fails here,
                // before anything is allocated for it.
                need(&b, n)?;
                let mut changes = Vec::with_capacity(n);
                for _ in 0..n {
                    changes.push(get_change(&mut b)?);
                }
                Frame::Replicate {
                    seq,
                    client,
                    epoch,
                    holder,
                    changes,
                }
            }
            ACK => {
                need(&b, 8)?;
                Frame::Ack { seq: b.get_u64() }
            }
            REFUSED => {
                need(&b, 8)?;
                Frame::Refused { seq: b.get_u64() }
            }
            RAFT => Frame::Raft(b.split_off(0)),
            STORE_INVOKE => {
                need(&b, 9)?;
                let seq = b.get_u64();
                let hops = b.get_u8();
                let client = get_str(&mut b)?.unwrap_or_default();
                Frame::StoreInvoke {
                    seq,
                    client,
                    hops,
                    message: get_message(&mut b)?,
                }
            }
            STORE_COPY => {
                need(&b, 17)?;
                let seq = b.get_u64();
                let view = b.get_u64();
                let copy = match b.get_u8() {
                    0 => None,
                    1 => Some(get_key_copy(&mut b)?),
                    _ => return Err(SnapshotError("bad copy tag")),
                };
                Frame::StoreCopy { seq, view, copy }
            }
            STORE_ACK => {
                need(&b, 9)?;
                let seq = b.get_u64();
                let ok = b.get_u8() != 0;
                Frame::StoreAck { seq, ok }
            }
            STORE_SYNCED => {
                need(&b, 8)?;
                Frame::StoreSynced { view: b.get_u64() }
            }
            PROMOTED => {
                need(&b, 8)?;
                Frame::Promoted { view: b.get_u64() }
            }
            STORE_FORGET => Frame::StoreForget {
                client: get_str(&mut b)?.ok_or(SnapshotError("empty client"))?,
            },
            SEEN => {
                let client = get_str(&mut b)?.ok_or(SnapshotError("empty client"))?;
                need(&b, 4)?;
                let n = usize::try_from(b.get_u32()).map_err(|_| SnapshotError("prints"))?;
                // The count is checked against what is there before
                // anything is allocated for it.
                need(&b, n.saturating_mul(8))?;
                let prints = (0..n).map(|_| b.get_u64()).collect();
                Frame::Seen { client, prints }
            }
            OBSERVED => {
                need(&b, 2)?;
                let n = usize::from(b.get_u16());
                need(&b, n.saturating_mul(2))?;
                let mut names = Vec::with_capacity(n);
                for _ in 0..n {
                    names.push(get_str(&mut b)?.ok_or(SnapshotError("empty name"))?);
                }
                Frame::Observed(names)
            }
            FORWARD | FORWARD_AGAIN => {
                need(&b, 8)?;
                let seq = b.get_u64();
                if b.remaining() < 2 {
                    return Err(SnapshotError("truncated groups"));
                }
                let n = b.get_u16();
                let mut groups = Vec::new();
                for _ in 0..n {
                    let g = get_str(&mut b)?.ok_or(SnapshotError("empty group"))?;
                    groups.push(Arc::from(g));
                }
                Frame::Forward {
                    seq,
                    message: get_message(&mut b)?,
                    groups,
                    again: tag == FORWARD_AGAIN,
                }
            }
            _ => return Err(SnapshotError("unknown frame")),
        };
        if b.has_remaining() {
            return Err(SnapshotError("trailing bytes"));
        }
        Ok(Some(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqlb_protocol::{MqttStr, Properties, QoS};

    fn msg() -> Message {
        Message {
            topic: MqttStr::try_from("a/b").unwrap_or_default(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Arc::new(Properties {
                content_type: MqttStr::try_from("text/plain").ok(),
                ..Properties::default()
            }),
            origin: Some(Arc::from("pub1")),
            received: Instant::now(),
        }
    }

    fn changes() -> Vec<SessionChange> {
        let pid = PacketId::new(5).unwrap_or(PacketId::MIN);
        // A queued message carries its delivery RETAIN flag only (the
        // published one mattered at routing time), as in a snapshot.
        let pending = Pending {
            msg: Message {
                retain: false,
                ..msg()
            },
            qos: QoS::AtLeastOnce,
            sub_ids: vec![4],
            retain: false,
            shared: Some(Arc::from("$share/g/a/#")),
        };
        vec![
            SessionChange::Attached {
                epoch: 3,
                expiry: Some(Duration::from_secs(60)),
            },
            SessionChange::Attached {
                epoch: 4,
                expiry: None,
            },
            SessionChange::Subscribed {
                filter: "a/#".into(),
                sub: Sub {
                    options: mqlb_protocol::SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        no_local: true,
                        ..Default::default()
                    },
                    id: Some(4),
                },
            },
            SessionChange::Unsubscribed { filter: "b".into() },
            SessionChange::Enqueued(pending.clone()),
            SessionChange::Dequeued,
            SessionChange::QueueRemoved(vec![1, 3]),
            SessionChange::Sent {
                pid,
                publish: message_to_publish(
                    &pending.msg,
                    QoS::AtLeastOnce,
                    false,
                    &[4],
                    Instant::now(),
                ),
                pending,
            },
            SessionChange::Received(pid),
            SessionChange::Completed(pid),
            SessionChange::Qos2Received(pid),
            SessionChange::Qos2Released(pid),
            SessionChange::PidCursor(9),
            SessionChange::Counted(1 << 40),
            SessionChange::WillSet(Some(Box::new(crate::session::Will {
                due_ms: 1_790_000_000_000,
                message: msg(),
            }))),
            SessionChange::WillSet(None),
            SessionChange::ExpirySet(None),
            SessionChange::Detached,
            SessionChange::Ended,
        ]
    }

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Ping,
            Frame::Reset,
            Frame::SyncDone,
            Frame::Interest {
                filter: "$share/g/a/+".into(),
                gained: true,
            },
            Frame::Retained {
                topic: "a/b".into(),
                message: Some(msg()),
                version: Hlc {
                    wall_ms: 7,
                    logical: 2,
                    node: 9,
                },
            },
            Frame::Retained {
                topic: "a/b".into(),
                message: None,
                version: Hlc::default(),
            },
            Frame::Forward {
                seq: 3,
                message: msg(),
                groups: vec![Arc::from("$share/g/a/#")],
                again: false,
            },
            Frame::Forward {
                seq: 4,
                message: msg(),
                groups: Vec::new(),
                again: true,
            },
            Frame::Ack { seq: 42 },
            Frame::Refused { seq: 43 },
            Frame::Leaving,
            Frame::Observed(vec!["n1".into(), "n2".into()]),
            Frame::Raft(Bytes::from_static(b"raft")),
            Frame::Replicate {
                seq: 7,
                client: "c1".into(),
                epoch: 3,
                holder: "n2".into(),
                changes: changes(),
            },
            Frame::StoreInvoke {
                seq: 9,
                client: "app".into(),
                hops: 1,
                message: msg(),
            },
            Frame::StoreCopy {
                seq: 10,
                view: 4,
                copy: Some(mqlb_statestore::store::KeyCopy {
                    key: b"k\x00ey".to_vec(),
                    rev: mqlb_statestore::store::Rev { view: 4, seq: 2 },
                    entry: Some(mqlb_statestore::store::Entry {
                        value: b"v".to_vec(),
                        version: mqlb_statestore::hlc::Hlc {
                            wall_ms: 5,
                            counter: 1,
                            node: "app".into(),
                        },
                        fence: Some(mqlb_statestore::hlc::Hlc {
                            wall_ms: 4,
                            counter: 0,
                            node: "lock:x".into(),
                        }),
                        expires_ms: Some(99),
                    }),
                    watchers: vec!["w1".into(), "w2".into()],
                }),
            },
            Frame::StoreCopy {
                seq: 11,
                view: 4,
                copy: Some(mqlb_statestore::store::KeyCopy {
                    key: b"gone".to_vec(),
                    rev: mqlb_statestore::store::Rev { view: 4, seq: 3 },
                    entry: None,
                    watchers: Vec::new(),
                }),
            },
            Frame::StoreCopy {
                seq: 12,
                view: 4,
                copy: None,
            },
            Frame::StoreAck { seq: 9, ok: false },
            Frame::Seen {
                client: "c1".into(),
                prints: vec![1, u64::MAX, 42],
            },
            Frame::Seen {
                client: "c2".into(),
                prints: Vec::new(),
            },
            Frame::StoreSynced { view: 4 },
            Frame::Promoted { view: 5 },
            Frame::StoreForget {
                client: "app".into(),
            },
        ]
    }

    /// Frames come from peers that passed the handshake, but a buggy or
    /// compromised peer must still not crash a node: valid frames with
    /// random bytes changed, inserted, removed or length fields rewritten
    /// decode to an error, need more bytes, or decode to something that
    /// encodes again, and never panic. (The cargo-fuzz target
    /// `cluster_frame` in `broker/fuzz` explores further.)
    #[test]
    fn mutated_frames_never_panic() {
        let mut rng = fastrand::Rng::with_seed(0x6d71_6c62);
        let encoded: Vec<Vec<u8>> = samples()
            .iter()
            .map(|f| {
                let mut b = BytesMut::new();
                assert!(f.encode(&mut b).is_ok());
                b.to_vec()
            })
            .collect();
        for _ in 0..200_000 {
            let mut bytes = encoded[rng.usize(..encoded.len())].clone();
            for _ in 0..rng.usize(1..4) {
                let n = bytes.len();
                match rng.u8(..4) {
                    0 if n > 0 => bytes[rng.usize(..n)] = rng.u8(..),
                    1 => bytes.insert(rng.usize(..=n), rng.u8(..)),
                    2 if n > 0 => {
                        bytes.remove(rng.usize(..n));
                    }
                    _ if n > 8 => {
                        // A big-endian count or length somewhere in the body.
                        let at = rng.usize(5..n - 3);
                        let v = [0xff, 0x7f, 0x00, rng.u8(..)];
                        bytes[at..at + 4].copy_from_slice(&v);
                    }
                    _ => {}
                }
            }
            let mut buf = BytesMut::from(&bytes[..]);
            if let Ok(Some(f)) = Frame::decode(&mut buf) {
                let mut again = BytesMut::new();
                let _ = f.encode(&mut again);
            }
        }
    }

    #[test]
    fn frames_round_trip_and_every_truncation_is_refused() {
        for f in samples() {
            let mut b = BytesMut::new();
            assert!(f.encode(&mut b).is_ok());
            let whole = b.clone();
            let got = Frame::decode(&mut b);
            let Ok(Some(mut got)) = got else {
                panic!("{f:?} did not decode: {got:?}");
            };
            if let (
                Frame::Forward { message: a, .. }
                | Frame::StoreInvoke { message: a, .. }
                | Frame::Retained {
                    message: Some(a), ..
                },
                Frame::Forward { message: e, .. }
                | Frame::StoreInvoke { message: e, .. }
                | Frame::Retained {
                    message: Some(e), ..
                },
            ) = (&mut got, &f)
            {
                a.received = e.received;
            }
            if let (Frame::Replicate { changes: a, .. }, Frame::Replicate { changes: e, .. }) =
                (&mut got, &f)
            {
                for (a, e) in a.iter_mut().zip(e) {
                    match (a, e) {
                        (SessionChange::Enqueued(a), SessionChange::Enqueued(e))
                        | (
                            SessionChange::Sent { pending: a, .. },
                            SessionChange::Sent { pending: e, .. },
                        ) => a.msg.received = e.msg.received,
                        (SessionChange::WillSet(Some(a)), SessionChange::WillSet(Some(e))) => {
                            a.message.received = e.message.received
                        }
                        _ => {}
                    }
                }
            }
            assert_eq!(got, f);
            assert!(b.is_empty());
            for cut in 0..whole.len() {
                let mut part = BytesMut::from(&whole[..cut]);
                assert!(
                    matches!(Frame::decode(&mut part), Ok(None)),
                    "{f:?} cut at {cut}"
                );
            }
            // A length that claims less than the body holds is an error, not a panic.
            if whole.len() > 5 {
                let mut short = BytesMut::from(&whole[..]);
                let len = u32::try_from(whole.len() - 5).unwrap_or(0);
                short[..4].copy_from_slice(&len.to_be_bytes());
                let _ = Frame::decode(&mut short);
            }
        }
        let mut huge = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0][..]);
        assert!(Frame::decode(&mut huge).is_err());
        let mut unknown = BytesMut::from(&[0, 0, 0, 1, 99][..]);
        assert!(Frame::decode(&mut unknown).is_err());
        // A fingerprint count far past the frame is refused before
        // anything is allocated for it.
        let mut liar = BytesMut::new();
        Frame::Seen {
            client: "c".into(),
            prints: vec![7],
        }
        .encode(&mut liar)
        .unwrap();
        let at = liar.len() - 12;
        liar[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Frame::decode(&mut liar).is_err());
    }
}
