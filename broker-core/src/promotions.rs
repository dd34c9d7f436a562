//! Who has promoted the session copies it owns, per view: this node's own
//! word and each peer's (`Frame::Promoted`).
//!
//! After a view drops a node, each of its sessions' next chain member
//! promotes its copy and announces the session's interest, then says so
//! for the view. Once every member of the view has (this node too), the
//! takeover is done: publishes held for the lost node are routed again
//! and its interest is forgotten. A word outlives its truth in three
//! ways, each of which lost acknowledged messages in the simulator before
//! it was handled here: this node stepped down (its own word is void), a
//! peer stepped down (its `SyncDone` after an empty snapshot voids its
//! word), or a peer's link was opened again (its word comes again after
//! the new link's snapshot).
//!
//! Plain data in and out: the broker's cluster keeps it behind one mutex,
//! the simulator one per node.

use std::collections::BTreeMap;

use crate::mutations::{self, Mutation};
use crate::router::NodeId;

/// This node's word and each peer's.
#[derive(Debug, Default, Clone)]
pub struct Promotions {
    /// The newest view this node has promoted its copies for and said so.
    mine: u64,
    /// The newest view each peer said it has promoted its copies for, on
    /// its current link.
    peers: BTreeMap<NodeId, u64>,
}

impl Promotions {
    /// Nobody has said anything.
    pub fn new() -> Self {
        Self::default()
    }

    /// The newest view this node said it promoted its copies for (0:
    /// none since it last began serving); sent again on every new link.
    pub fn mine(&self) -> u64 {
        self.mine
    }

    /// This node has promoted every copy it owns in `view` (and announced
    /// their interest): whether that is news, to be said to every peer.
    pub fn promoted(&mut self, view: u64) -> bool {
        let news = view > self.mine;
        self.mine = self.mine.max(view);
        news
    }

    /// This node stepped down: back in service it must promote its copies
    /// again before its word counts.
    pub fn stepped_down(&mut self) {
        if !mutations::on(Mutation::StalePromotedWord) {
            self.mine = 0;
        }
    }

    /// `peer` says it promoted its copies for `view`.
    pub fn heard(&mut self, peer: NodeId, view: u64) {
        let v = self.peers.entry(peer).or_insert(0);
        *v = (*v).max(view);
    }

    /// Whether `peer` has said, on its current link, that it promoted its
    /// copies for `view` (or a later one).
    pub fn said(&self, peer: NodeId, view: u64) -> bool {
        self.peers.get(&peer).is_some_and(|v| *v >= view)
    }

    /// `peer`'s link opened again: its word comes again after the link's
    /// snapshot (after its interest).
    pub fn relinked(&mut self, peer: NodeId) {
        self.peers.remove(&peer);
    }

    /// `peer` serves nothing now (its `SyncDone` after an empty snapshot:
    /// it stepped down): it must promote its copies again before its word
    /// counts.
    pub fn serves_nothing(&mut self, peer: NodeId) {
        if !mutations::on(Mutation::StalePromotedWord) {
            self.peers.remove(&peer);
        }
    }

    /// Whether the takeover in view `view` is done: this node (`me`) can
    /// reach every member of `members` (`reachable`), owns no copy it has
    /// not promoted, and every member has said it promoted its copies for
    /// this view.
    pub fn takeover_done(
        &self,
        view: u64,
        me: NodeId,
        members: impl IntoIterator<Item = NodeId>,
        reachable: bool,
        owns_unpromoted: bool,
    ) -> bool {
        reachable
            && !owns_unpromoted
            && self.mine >= view
            && members
                .into_iter()
                .filter(|&m| m != me)
                .all(|m| self.peers.get(&m).is_some_and(|v| *v >= view))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_once_every_member_said_it_for_this_view() {
        let mut p = Promotions::new();
        let done = |p: &Promotions| p.takeover_done(3, 0, [0, 1, 2], true, false);
        assert!(!done(&p));
        assert!(p.promoted(3));
        assert!(!p.promoted(3), "said once");
        p.heard(1, 3);
        assert!(!done(&p));
        p.heard(2, 2);
        assert!(!done(&p), "a word for an older view does not count");
        p.heard(2, 4);
        assert!(done(&p));
        assert!(
            !p.takeover_done(3, 0, [0, 1, 2], false, false),
            "unreachable"
        );
        assert!(!p.takeover_done(3, 0, [0, 1, 2], true, true), "unpromoted");
    }

    #[test]
    fn a_step_down_or_a_peers_new_link_voids_a_word() {
        let mut p = Promotions::new();
        p.promoted(5);
        p.heard(1, 5);
        assert!(p.takeover_done(5, 0, [0, 1], true, false));
        p.relinked(1);
        assert!(!p.takeover_done(5, 0, [0, 1], true, false));
        p.heard(1, 5);
        p.serves_nothing(1);
        assert!(!p.takeover_done(5, 0, [0, 1], true, false));
        p.heard(1, 5);
        p.stepped_down();
        assert_eq!(p.mine(), 0);
        assert!(!p.takeover_done(5, 0, [0, 1], true, false));
        assert!(p.promoted(5), "news again after a step down");
    }
}
