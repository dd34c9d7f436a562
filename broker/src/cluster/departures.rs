//! Which peers a node stops waiting for, decided at each tick from plain
//! facts about every peer: whether the committed view counts it, whether
//! a link to it is open, whether it is heard. The broker's view loop
//! (`Cluster::on_tick`) and the simulator (`mqlb-sim`, at each node's tick)
//! both act on what [`at_tick`] returns, so the rule for releasing waits
//! and forgetting a lost peer's interest is one rule.

use crate::router::NodeId;

/// What a node knows of one peer (not itself) at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The peer's id.
    pub id: NodeId,
    /// The committed view counts it.
    pub in_view: bool,
    /// A link to it is open (frames for it have somewhere to go).
    pub linked: bool,
    /// It was heard lately and has not said it is leaving.
    pub heard: bool,
}

/// What a node stops waiting for at a tick.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Departures {
    /// Gone and out of the view: nothing waits for them any more, chain
    /// changes included (their copies are re-made on the new chains):
    /// `Commits::lost`.
    pub lost: Vec<NodeId>,
    /// Members of the view without a link: the publishes forwarded to them
    /// come back to be sent again, and the chain changes they missed stay
    /// owed until their next link's snapshot confirms them:
    /// `Commits::forwards_lost`.
    pub unlinked_members: Vec<NodeId>,
    /// Whose state store waits end: every peer gone, and every peer the
    /// view dropped (hung or cut off: it can neither answer nor refuse).
    pub store: Vec<NodeId>,
    /// Out of the view and not heard: their interest is forgotten once
    /// their sessions have moved (`takeover_done`); until then a publish
    /// for them is held, not matched to nobody.
    pub moved: Vec<NodeId>,
}

/// The departures at a tick in view `view_number` (0: none committed yet,
/// when nobody counts as dropped), given every peer.
///
/// A peer is *gone* when no link to it is open, or when the view has
/// dropped it and it is not heard (a hung node, whose link may stay
/// open). A peer the view dropped but still heard is waited for: it either
/// answers (it delivered before it stepped down, and a second copy would
/// be a duplicate) or refuses, and a gracefully leaving node drains its
/// link before it exits.
pub fn at_tick(view_number: u64, peers: impl IntoIterator<Item = Peer>) -> Departures {
    let committed = view_number > 0;
    let mut d = Departures::default();
    for p in peers {
        let dropped = committed && !p.in_view;
        let gone = !p.linked || (dropped && !p.heard);
        if gone && p.in_view {
            d.unlinked_members.push(p.id);
        } else if gone {
            d.lost.push(p.id);
        }
        if gone || dropped {
            d.store.push(p.id);
        }
        if dropped && !p.heard {
            d.moved.push(p.id);
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: NodeId, in_view: bool, linked: bool, heard: bool) -> Peer {
        Peer {
            id,
            in_view,
            linked,
            heard,
        }
    }

    /// Each kind of peer: a live member, a member whose link broke, a dead
    /// node the view dropped, a hung one (dropped, link open, not heard)
    /// and a leaving one still heard (dropped, waited for).
    #[test]
    fn each_kind_of_peer() {
        let d = at_tick(
            4,
            [
                peer(1, true, true, true),
                peer(2, true, false, false),
                peer(3, false, false, false),
                peer(4, false, true, false),
                peer(5, false, true, true),
            ],
        );
        assert_eq!(d.unlinked_members, vec![2]);
        assert_eq!(d.lost, vec![3, 4]);
        assert_eq!(d.store, vec![2, 3, 4, 5]);
        assert_eq!(d.moved, vec![3, 4]);
    }

    /// Before any view is committed nobody counts as dropped: only a peer
    /// without a link is gone.
    #[test]
    fn before_the_first_view() {
        let d = at_tick(
            0,
            [peer(1, false, true, false), peer(2, false, false, false)],
        );
        assert_eq!(d.lost, vec![2]);
        assert!(d.unlinked_members.is_empty());
        assert_eq!(d.store, vec![2]);
        assert!(d.moved.is_empty());
    }
}
