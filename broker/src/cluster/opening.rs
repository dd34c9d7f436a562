//! Which sessions a peer link opens with, as plain data: the sessions this
//! node serves and the copies it keeps whose chain holds the peer, each
//! whole, then `SyncDone` and this node's `Promoted` word. A function of
//! the core, the copies and the view it is given: no lock, clock or I/O of
//! its own. The cluster's link writer runs it under the core's lock (a
//! change made after it reaches the link, none before it is sent twice);
//! the simulator (`mqlb-sim`) runs the same function when its links open.

use std::time::Instant;

use super::wire::Frame;
use crate::core::Core;
use crate::replicas::Replicas;
use crate::router::NodeId;

/// What is asked of [`sessions`]: who this node is and how to name things.
pub struct Opening<'a> {
    /// This node's name: the holder of the sessions it serves.
    pub me: &'a str,
    /// The number this node's own sessions go acknowledged under: once the
    /// peer has them all, what it was owed before is confirmed
    /// (`Commits::expect_resync`).
    pub seq: u64,
    /// The time the copies' snapshots are taken at.
    pub now: Instant,
    /// Whether a session's (or copy's) chain, in the view with the peer
    /// counted, holds the peer.
    pub in_chain: &'a dyn Fn(&str) -> bool,
    /// A peer's name, by its id (a copy's holder).
    pub name_of: &'a dyn Fn(NodeId) -> Option<String>,
    /// The `Seen` frame (what the session was given) to go before a
    /// session's whole copy, if any.
    pub seen: &'a dyn Fn(&str) -> Option<Frame>,
    /// The view this node last said it promoted its copies for (0: none).
    pub promoted: u64,
}

/// Hands `emit` the frames of a link's opening that carry sessions, in
/// order; returns how many of this node's own sessions they hold.
///
/// Own sessions go first, in client ID order, each acknowledged under
/// `seq`; then the copies kept for others (after a partition the side that
/// kept serving may be reachable only through them, and the newest epoch
/// wins wherever they land), but only copies their holders updated: a
/// relayed one is not passed on (it may be stale; its holder's own
/// snapshot, or the copies handed over when the holder leaves, are
/// fresher).
pub fn sessions(
    core: &Core,
    replicas: &Replicas,
    o: &Opening<'_>,
    emit: &mut dyn FnMut(Frame),
) -> usize {
    let mut own = 0;
    let mut ids = core.persistent_sessions();
    ids.sort();
    for id in ids {
        if !(o.in_chain)(&id) {
            continue;
        }
        if let Some(snap) = core.export_session(&id) {
            own += 1;
            if let Some(seen) = (o.seen)(&id) {
                emit(seen);
            }
            emit(Frame::Replicate {
                seq: o.seq,
                client: id.to_string(),
                epoch: snap.epoch,
                holder: o.me.to_string(),
                changes: crate::replicas::whole(snap, o.now),
            });
        }
    }
    let mut kept = replicas.snapshots(|c| (o.in_chain)(c) && !replicas.is_relayed(c), o.now);
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    for (client, snap, holder) in kept {
        if let Some(seen) = (o.seen)(&client) {
            emit(seen);
        }
        emit(Frame::Replicate {
            seq: 0,
            client,
            epoch: snap.epoch,
            holder: holder.and_then(o.name_of).unwrap_or_default(),
            changes: crate::replicas::whole(snap, o.now),
        });
    }
    emit(Frame::SyncDone);
    if o.promoted > 0 {
        emit(Frame::Promoted { view: o.promoted });
    }
    own
}
