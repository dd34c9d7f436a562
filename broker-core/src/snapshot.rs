//! Session export and import, for the cluster layer's replication.
//!
//! A [`SessionSnapshot`] is everything a session owns: subscriptions,
//! inflight and queued messages with their packet ids, unreleased inbound
//! QoS 2 ids, the expiry and the epoch. Its byte form reuses the MQTT 5 wire format
//! for the parts MQTT already defines (each message is a v5 PUBLISH frame,
//! each subscription a v5 SUBSCRIBE frame), so it is compact, versioned by
//! the codec we already fuzz, and readable with any MQTT dissector.
//!
//! Layout (big-endian): `"MQLBS3"`, expiry u32 (`u32::MAX` = never),
//! epoch u64, next packet id u16, then counted sections: QoS 2 ids (u16 each),
//! subscriptions (SUBSCRIBE frame), inflight (state u8, shared key, origin,
//! PUBLISH frame), queued (retain u8, shared key, origin, PUBLISH frame),
//! then the changes made in the epoch, u64, and the will waiting out its
//! delay (u8 0 = none, or 1, due in Unix ms u64, shared key, origin,
//! PUBLISH frame). `"MQLBS2"` snapshots, written before those two, end
//! before them (read as 0 changes, no will).
//! Strings are u16-length-prefixed UTF-8; an empty string means "none".

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mqlb_protocol::{
    MqttStr, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS, Subscribe,
};

use crate::message::{Message, Sub};
pub use crate::session::InflightState;

const MAGIC: &[u8; 6] = b"MQLBS3";
/// The layout before the epoch's change count was added (read, not
/// written: data directories written before it still start).
const MAGIC_V2: &[u8; 6] = b"MQLBS2";

/// A message owed to the session. For queued messages the packet id is a
/// placeholder (ids are assigned when sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMessage {
    /// The PUBLISH as it will be (re)sent: QoS, packet id (inflight only),
    /// retain flag, subscription identifiers, remaining message expiry.
    pub publish: Publish,
    /// Shared group key, when it came through a shared subscription.
    pub shared: Option<String>,
    /// Publisher, for No Local.
    pub origin: Option<String>,
}

/// Everything a session owns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionSnapshot {
    /// Session Expiry; `None` = never.
    pub expiry: Option<Duration>,
    /// The session's epoch: bumped by every attach, so a stale owner's
    /// writes can be told apart.
    pub epoch: u64,
    /// Changes made in the epoch (`Session::changes`).
    pub changes: u64,
    /// The will waiting out its Will Delay, with when it is due (Unix ms).
    pub will: Option<(u64, SnapshotMessage)>,
    /// Last packet id handed out.
    pub next_pid: u16,
    /// Inbound QoS 2 ids awaiting PUBREL.
    pub qos2_in: Vec<u16>,
    /// Filter → subscription.
    pub subscriptions: Vec<(String, Sub)>,
    /// Sent, not yet fully acknowledged.
    pub inflight: Vec<(InflightState, SnapshotMessage)>,
    /// Not yet sent.
    pub queued: Vec<SnapshotMessage>,
}

/// Why a snapshot could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid session snapshot: {0}")]
pub struct SnapshotError(pub &'static str);

/// Writes an optional string (length-prefixed; absent is a marker), as
/// snapshots and the cluster's frames encode them.
pub fn put_str(b: &mut BytesMut, s: Option<&str>) -> Result<(), SnapshotError> {
    let s = s.unwrap_or("");
    b.put_u16(u16::try_from(s.len()).map_err(|_| SnapshotError("string too long"))?);
    b.put_slice(s.as_bytes());
    Ok(())
}

/// Reads what [`put_str`] wrote.
pub fn get_str(b: &mut Bytes) -> Result<Option<String>, SnapshotError> {
    if b.remaining() < 2 {
        return Err(SnapshotError("truncated string"));
    }
    let n = usize::from(b.get_u16());
    if b.remaining() < n {
        return Err(SnapshotError("truncated string"));
    }
    let s =
        String::from_utf8(b.split_to(n).to_vec()).map_err(|_| SnapshotError("string not UTF-8"))?;
    Ok((!s.is_empty()).then_some(s))
}

fn put_count(b: &mut BytesMut, n: usize) -> Result<(), SnapshotError> {
    b.put_u32(u32::try_from(n).map_err(|_| SnapshotError("too many entries"))?);
    Ok(())
}

fn get_count(b: &mut Bytes) -> Result<usize, SnapshotError> {
    if b.remaining() < 4 {
        return Err(SnapshotError("truncated count"));
    }
    Ok(b.get_u32() as usize)
}

/// Splits one packet off the front of `b` without copying: linear in the
/// snapshot's size however many packets it holds.
pub fn get_packet(b: &mut Bytes) -> Result<Packet, SnapshotError> {
    let header = mqlb_protocol::check(b, usize::MAX)
        .map_err(|_| SnapshotError("invalid packet"))?
        .ok_or(SnapshotError("truncated packet"))?;
    let frame = b.split_to(header.frame_len());
    // Snapshots come from nodes whose topic-level limits may be higher than
    // the codec's default; the trie walks are iterative either way.
    Packet::decode_body_limited(
        header,
        &frame.slice(header.header_len..),
        ProtocolVersion::V5,
        usize::MAX,
    )
    .map_err(|_| SnapshotError("invalid packet"))
}

impl SessionSnapshot {
    /// The byte form.
    pub fn to_bytes(&self) -> Result<Bytes, SnapshotError> {
        let mut b = BytesMut::new();
        b.put_slice(MAGIC);
        b.put_u32(self.expiry.map_or(u32::MAX, |d| {
            u32::try_from(d.as_secs()).unwrap_or(u32::MAX - 1)
        }));
        b.put_u64(self.epoch);
        b.put_u16(self.next_pid);
        put_count(&mut b, self.qos2_in.len())?;
        for id in &self.qos2_in {
            b.put_u16(*id);
        }
        put_count(&mut b, self.subscriptions.len())?;
        for (filter, sub) in &self.subscriptions {
            let p = Packet::Subscribe(Subscribe {
                packet_id: PacketId::MIN,
                properties: Properties {
                    subscription_identifiers: sub.id.into_iter().collect(),
                    ..Default::default()
                },
                filters: vec![(
                    MqttStr::try_from(filter.as_str()).map_err(|_| SnapshotError("filter"))?,
                    sub.options,
                )],
            });
            p.encode(ProtocolVersion::V5, &mut b)
                .map_err(|_| SnapshotError("subscription"))?;
        }
        let put_msg = |b: &mut BytesMut, m: &SnapshotMessage| -> Result<(), SnapshotError> {
            put_str(b, m.shared.as_deref())?;
            put_str(b, m.origin.as_deref())?;
            Packet::Publish(m.publish.clone())
                .encode(ProtocolVersion::V5, b)
                .map_err(|_| SnapshotError("message"))
        };
        put_count(&mut b, self.inflight.len())?;
        for (state, m) in &self.inflight {
            b.put_u8(*state as u8);
            put_msg(&mut b, m)?;
        }
        put_count(&mut b, self.queued.len())?;
        for m in &self.queued {
            put_msg(&mut b, m)?;
        }
        b.put_u64(self.changes);
        match &self.will {
            None => b.put_u8(0),
            Some((due_ms, m)) => {
                b.put_u8(1);
                b.put_u64(*due_ms);
                put_msg(&mut b, m)?;
            }
        }
        Ok(b.freeze())
    }

    /// Reads the byte form.
    pub fn from_bytes(mut b: Bytes) -> Result<SessionSnapshot, SnapshotError> {
        if b.remaining() < MAGIC.len() + 14 {
            return Err(SnapshotError("bad magic"));
        }
        let counted = match b.get(..MAGIC.len()) {
            Some(m) if m == &MAGIC[..] => true,
            Some(m) if m == &MAGIC_V2[..] => false,
            _ => return Err(SnapshotError("bad magic")),
        };
        b.advance(MAGIC.len());
        let expiry = match b.get_u32() {
            u32::MAX => None,
            s => Some(Duration::from_secs(u64::from(s))),
        };
        let epoch = b.get_u64();
        let next_pid = b.get_u16();
        let mut s = SessionSnapshot {
            expiry,
            epoch,
            next_pid,
            ..Default::default()
        };
        for _ in 0..get_count(&mut b)? {
            if b.remaining() < 2 {
                return Err(SnapshotError("truncated id"));
            }
            s.qos2_in.push(b.get_u16());
        }
        for _ in 0..get_count(&mut b)? {
            let Packet::Subscribe(sub) = get_packet(&mut b)? else {
                return Err(SnapshotError("expected SUBSCRIBE"));
            };
            let id = sub.properties.subscription_identifiers.first().copied();
            for (f, options) in sub.filters {
                s.subscriptions.push((f.to_string(), Sub { options, id }));
            }
        }
        let get_msg = |b: &mut Bytes| -> Result<SnapshotMessage, SnapshotError> {
            let shared = get_str(b)?;
            let origin = get_str(b)?;
            let Packet::Publish(publish) = get_packet(b)? else {
                return Err(SnapshotError("expected PUBLISH"));
            };
            Ok(SnapshotMessage {
                publish,
                shared,
                origin,
            })
        };
        for _ in 0..get_count(&mut b)? {
            if !b.has_remaining() {
                return Err(SnapshotError("truncated state"));
            }
            let state = match b.get_u8() {
                0 => InflightState::AwaitPuback,
                1 => InflightState::AwaitPubrec,
                2 => InflightState::AwaitPubcomp,
                _ => return Err(SnapshotError("bad inflight state")),
            };
            s.inflight.push((state, get_msg(&mut b)?));
        }
        for _ in 0..get_count(&mut b)? {
            s.queued.push(get_msg(&mut b)?);
        }
        if counted {
            if b.remaining() < 8 {
                return Err(SnapshotError("truncated count"));
            }
            s.changes = b.get_u64();
            if !b.has_remaining() {
                return Err(SnapshotError("truncated will"));
            }
            if b.get_u8() == 1 {
                if b.remaining() < 8 {
                    return Err(SnapshotError("truncated will"));
                }
                let due_ms = b.get_u64();
                s.will = Some((due_ms, get_msg(&mut b)?));
            }
        }
        if b.has_remaining() {
            return Err(SnapshotError("trailing bytes"));
        }
        Ok(s)
    }
}

/// A routed message as a PUBLISH for the snapshot, with its remaining expiry.
pub fn message_to_publish(
    m: &Message,
    qos: QoS,
    retain: bool,
    sub_ids: &[u32],
    now: Instant,
) -> Publish {
    let mut properties = (*m.properties).clone();
    properties.subscription_identifiers = sub_ids.to_vec();
    if let Some(secs) = properties.message_expiry_interval {
        let left = u64::from(secs).saturating_sub(now.duration_since(m.received).as_secs());
        properties.message_expiry_interval = Some(u32::try_from(left.max(1)).unwrap_or(u32::MAX));
    }
    Publish {
        dup: false,
        qos,
        retain,
        topic: m.topic.clone(),
        // A queued message has no packet id until it is sent; the wire
        // format needs one for QoS > 0, so a placeholder is stored and
        // ignored on import.
        packet_id: (qos != QoS::AtMostOnce).then_some(PacketId::MIN),
        properties,
        payload: m.payload.clone(),
    }
}

/// The routed message a snapshot PUBLISH stands for (received "now", with
/// its remaining expiry).
pub fn publish_to_message(p: &Publish, origin: Option<&str>, now: Instant) -> Message {
    let mut properties = p.properties.clone();
    properties.subscription_identifiers.clear();
    Message {
        topic: p.topic.clone(),
        payload: p.payload.clone(),
        qos: p.qos,
        retain: p.retain,
        properties: Arc::new(properties),
        origin: origin.map(Arc::from),
        received: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(i: usize) -> SnapshotMessage {
        SnapshotMessage {
            publish: Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: MqttStr::try_from(format!("t/{}", i % 97)).unwrap_or_default(),
                packet_id: PacketId::new(1),
                properties: Properties::default(),
                payload: Bytes::from(format!("payload-{i}")),
            },
            shared: None,
            origin: (i.is_multiple_of(3)).then(|| "origin".to_string()),
        }
    }

    /// A large session decodes in linear time: 200,000 queued messages
    /// (about 4 MB). Decoding used to copy the remaining buffer once per
    /// packet, which for this size is terabytes of copying; now each packet
    /// is split off without a copy.
    #[test]
    fn a_large_session_round_trips() {
        let snap = SessionSnapshot {
            expiry: Some(Duration::from_secs(3600)),
            epoch: 3,
            changes: 1 << 33,
            will: None,
            next_pid: 7,
            qos2_in: (1..=500).collect(),
            subscriptions: Vec::new(),
            inflight: (0..100)
                .map(|i| (InflightState::AwaitPuback, message(i)))
                .collect(),
            queued: (0..200_000).map(message).collect(),
        };
        let bytes = snap.to_bytes().expect("encodes");
        assert!(bytes.len() > 3_000_000, "{}", bytes.len());
        let back = SessionSnapshot::from_bytes(bytes).expect("decodes");
        assert_eq!(back, snap);
    }

    /// A snapshot in the layout before the count (a data directory written
    /// by an earlier build) still reads, at 0 changes.
    #[test]
    fn a_snapshot_without_a_count_reads_at_zero() {
        let snap = SessionSnapshot {
            epoch: 5,
            changes: 9,
            queued: (0..2).map(message).collect(),
            ..SessionSnapshot::default()
        };
        let bytes = snap.to_bytes().expect("encodes");
        // (The count, then the will's absent flag.)
        let mut old = BytesMut::from(&bytes[..bytes.len() - 9]);
        old[..MAGIC_V2.len()].copy_from_slice(MAGIC_V2);
        let back = SessionSnapshot::from_bytes(old.freeze()).expect("decodes");
        assert_eq!(back, SessionSnapshot { changes: 0, ..snap });
    }

    /// Every truncation of a snapshot is an error, never a panic or a
    /// partial session.
    #[test]
    fn truncated_snapshots_are_refused() {
        let snap = SessionSnapshot {
            expiry: None,
            epoch: 1,
            changes: 12,
            will: Some((1_790_000_000_000, message(7))),
            next_pid: 1,
            qos2_in: vec![3, 4],
            subscriptions: Vec::new(),
            inflight: vec![(InflightState::AwaitPubcomp, message(1))],
            queued: (0..3).map(message).collect(),
        };
        let bytes = snap.to_bytes().expect("encodes");
        for n in 0..bytes.len() {
            assert!(
                SessionSnapshot::from_bytes(bytes.slice(..n)).is_err(),
                "prefix of {n} bytes accepted"
            );
        }
    }
}
