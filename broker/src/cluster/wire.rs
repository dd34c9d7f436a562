//! The frames nodes exchange on a peer link, after the handshake.
//!
//! Each frame is `u32 length | u8 kind | body`. Messages travel as MQTT 5
//! PUBLISH packets encoded by our own codec (topic, payload, QoS, retain
//! and every property, with Message Expiry counted down to what is left),
//! so a forwarded message is exactly what a client would have received.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mqlb_protocol::{Packet, ProtocolVersion};

use crate::hlc::Hlc;
use crate::message::Message;
use crate::snapshot::{
    get_packet, get_str, message_to_publish, publish_to_message, put_str, SnapshotError,
};

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
    /// A publish for the receiver's matching sessions, and for one local
    /// member of each listed shared group.
    Forward {
        /// The message.
        message: Message,
        /// Shared groups (`$share/{group}/{filter}`) this node serves.
        groups: Vec<Arc<str>>,
    },
}

const PING: u8 = 0;
const RESET: u8 = 1;
const INTEREST: u8 = 2;
const SYNC_DONE: u8 = 3;
const RETAINED: u8 = 4;
const FORWARD: u8 = 5;

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
            Frame::Forward { message, groups } => {
                out.put_u8(FORWARD);
                out.put_u16(u16::try_from(groups.len()).map_err(|_| SnapshotError("groups"))?);
                for g in groups {
                    put_str(out, Some(g))?;
                }
                put_message(out, message)?;
            }
        }
        let len = out.len() - start - 4;
        if len > MAX_FRAME {
            out.truncate(start);
            return Err(SnapshotError("frame too large"));
        }
        let len = u32::try_from(len).map_err(|_| SnapshotError("frame too large"))?;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    /// Takes one whole frame off the front of `buf`: `Ok(None)` until one
    /// has arrived.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, SnapshotError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(SnapshotError("bad frame length"));
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        buf.advance(4);
        let mut b = buf.split_to(len).freeze();
        let f = match b.get_u8() {
            PING => Frame::Ping,
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
            FORWARD => {
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
                    message: get_message(&mut b)?,
                    groups,
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
            properties: Properties {
                content_type: MqttStr::try_from("text/plain").ok(),
                ..Properties::default()
            },
            origin: Some(Arc::from("pub1")),
            received: Instant::now(),
        }
    }

    #[test]
    fn frames_round_trip_and_every_truncation_is_refused() {
        let frames = vec![
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
                message: msg(),
                groups: vec![Arc::from("$share/g/a/#")],
            },
        ];
        for f in frames {
            let mut b = BytesMut::new();
            assert!(f.encode(&mut b).is_ok());
            let whole = b.clone();
            let got = Frame::decode(&mut b);
            let Ok(Some(mut got)) = got else {
                panic!("{f:?} did not decode: {got:?}");
            };
            if let (
                Frame::Forward { message: a, .. }
                | Frame::Retained {
                    message: Some(a), ..
                },
                Frame::Forward { message: e, .. }
                | Frame::Retained {
                    message: Some(e), ..
                },
            ) = (&mut got, &f)
            {
                a.received = e.received;
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
    }
}
