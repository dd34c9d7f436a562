//! What a node sends when the committed view changes, decided from plain
//! data (the core, the copies, what sessions were given, the time) and
//! returned as frames and log entries, so that the broker's view loop and
//! the simulator run the same code:
//!
//! * holders that have just left: the retained messages they wrote last
//!   go to every peer again ([`retained_written_by`]), and the copies they
//!   updated go whole to each session's new owner ([`orphans`]);
//! * every view change: each session this node serves goes whole down its
//!   chain ([`rechain`]).

use std::time::Instant;

use mqlb_broker_core::core::Core;
use mqlb_broker_core::effects::{ChangeRecord, LogEntry};
use mqlb_broker_core::replicas::{whole, Replicas};
use mqlb_broker_core::router::NodeId;

use super::seen::Seen;
use super::wire::Frame;

/// The retained messages whose last writer is one of the nodes stamped
/// `stamps`, as frames for every peer: a peer whose link from the writer
/// broke may have missed them, and the writer can no longer send them in
/// a link snapshot. Last writer wins, so a peer that has them already
/// keeps them.
pub fn retained_written_by(core: &Core, stamps: &[u32]) -> Vec<Frame> {
    core.retained_all()
        .into_iter()
        .filter(|(_, _, v)| stamps.contains(&v.node))
        .map(|(topic, message, version)| Frame::Retained {
            topic,
            message,
            version,
        })
        .collect()
}

/// The copies this node keeps whose holder is one of `left` (holders that
/// have just left the view; copies whose holder left earlier were handed
/// over then, and may be stale by now), each for its session's new owner:
/// its `Seen` frame, then the copy whole (a snapshot's frame, number 0).
/// The owner may hold only a relayed copy, older than this one
/// (`Replicas::promotable`). `owner_of`: the owner in the view the
/// hand-over is for, `None` when it is this node; `name_of`: a holder's
/// name. Sorted by session, so a simulated run replays alike.
pub fn orphans(
    copies: &Replicas,
    seen: &Seen,
    left: &[NodeId],
    owner_of: impl Fn(&str) -> Option<NodeId>,
    name_of: impl Fn(NodeId) -> Option<String>,
    now: Instant,
) -> Vec<(NodeId, Vec<Frame>)> {
    let mut orphans = copies.orphans(|h| !left.contains(&h), now);
    orphans.sort_by(|a, b| a.0.cmp(&b.0));
    orphans
        .into_iter()
        .filter_map(|(client, snap, holder)| {
            let owner = owner_of(&client)?;
            let holder = name_of(holder)?;
            let mut frames: Vec<Frame> = seen.frame(&client).into_iter().collect();
            frames.push(Frame::Replicate {
                seq: 0,
                epoch: snap.epoch,
                changes: whole(snap, now),
                client,
                holder,
            });
            Some((owner, frames))
        })
        .collect()
}

/// Every session this node serves, whole, for its chain after a view
/// change (a new chain member has nothing; an old one may have missed
/// changes), in one reading of the core: the caller holds the core's lock
/// and numbers the records before it lets go, so no change made after
/// this export reaches a chain member before it.
#[derive(Debug, Default)]
pub struct Rechain {
    /// Per session, what it was given lately, for the chain's other
    /// members: sent before the records.
    pub seen: Vec<(String, Frame)>,
    /// The sessions' records, for the node's ordered log.
    pub records: Vec<LogEntry>,
}

/// See [`Rechain`]. Sorted by session, so a simulated run replays alike.
pub fn rechain(core: &Core, seen: &Seen, now: Instant) -> Rechain {
    let mut ids = core.persistent_sessions();
    ids.sort();
    let mut out = Rechain::default();
    for id in ids {
        let Some(snap) = core.export_session(&id) else {
            continue;
        };
        if let Some(f) = seen.frame(&id) {
            out.seen.push((id.to_string(), f));
        }
        let epoch = snap.epoch;
        for change in whole(snap, now) {
            out.records.push(LogEntry::Session(ChangeRecord {
                client: id.clone(),
                epoch,
                change,
            }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use mqlb_broker_core::hlc::Hlc;
    use mqlb_broker_core::outbox::Outbox;
    use mqlb_broker_core::session::SessionChange;
    use mqlb_protocol::{MqttStr, QoS};
    use std::time::Duration;

    fn message(topic: &str) -> Message {
        Message {
            topic: MqttStr::try_from(topic).expect("a valid topic"),
            payload: bytes::Bytes::from_static(b"x"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Default::default(),
            origin: None,
            received: Instant::now(),
        }
    }

    /// Only the retained messages the departed writers wrote last go out
    /// again.
    #[test]
    fn the_retained_messages_of_departed_writers_go_out_again() {
        let mut core = Core::new();
        let wall_ms = 1;
        for (topic, node) in [("a", 2), ("b", 3), ("c", 2)] {
            let version = Hlc {
                wall_ms,
                logical: 0,
                node,
            };
            assert!(core.set_retained_from_peer(topic, Some(message(topic)), version));
        }
        let mut topics: Vec<String> = retained_written_by(&core, &[2])
            .into_iter()
            .filter_map(|f| match f {
                Frame::Retained { topic, .. } => Some(topic),
                _ => None,
            })
            .collect();
        topics.sort();
        assert_eq!(topics, ["a", "c"]);
        assert!(retained_written_by(&core, &[9]).is_empty());
    }

    /// A copy whose holder has just left goes to its owner, after what it
    /// was given; one this node owns, one of a holder still there, and one
    /// whose holder has no name stay.
    #[test]
    fn copies_of_a_departed_holder_go_whole_to_their_owners() {
        let now = Instant::now();
        let mut copies = Replicas::default();
        let mut seen = Seen::default();
        let attach = SessionChange::Attached {
            epoch: 4,
            expiry: Some(Duration::from_secs(600)),
        };
        for (client, holder) in [("a", 2), ("b", 2), ("c", 3), ("d", 5)] {
            copies.apply(client, 4, vec![attach.clone()], now);
            copies.set_holder(client, holder);
        }
        seen.note("a", 42, now);
        let owner_of = |c: &str| (c != "b").then_some(7);
        let name_of = |h: NodeId| (h != 5).then(|| format!("n{h}"));
        let out = orphans(&copies, &seen, &[2, 5], owner_of, name_of, now);
        assert_eq!(out.len(), 1, "{out:?}");
        let (owner, frames) = &out[0];
        assert_eq!(*owner, 7);
        assert!(matches!(&frames[..], [
            Frame::Seen { client: s, prints },
            Frame::Replicate { seq: 0, client, epoch: 4, holder, changes },
        ] if s == "a" && prints == &[42] && client == "a" && holder == "n2"
            && changes.first() == Some(&SessionChange::Ended)));
    }

    /// Every persistent session goes whole, in order of name, each with
    /// its prints; a session that ends with its connection does not.
    #[test]
    fn every_persistent_session_is_rechained_whole() {
        let now = Instant::now();
        let mut core = Core::new();
        let mut seen = Seen::default();
        for (client, secs) in [("b", 600), ("a", 600), ("gone", 0)] {
            let expiry = Some(Duration::from_secs(secs));
            let backlog = Outbox::default().gauge();
            let _ = core.connect(client, false, expiry, 10, backlog);
        }
        seen.note("b", 7, now);
        let r = rechain(&core, &seen, now);
        let whole_of: Vec<&str> = r
            .records
            .iter()
            .filter_map(|e| match e {
                LogEntry::Session(c) if c.change == SessionChange::Ended => Some(&*c.client),
                _ => None,
            })
            .collect();
        assert_eq!(whole_of, ["a", "b"]);
        assert_eq!(r.seen.len(), 1);
        assert_eq!(r.seen[0].0, "b");
    }
}
