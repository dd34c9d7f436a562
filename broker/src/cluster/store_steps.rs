//! A state store request's steps, as two plain state machines on a
//! supplied clock: where a request goes next on the node that has it
//! ([`Request`]), and how a change it made settles on its key's chain
//! ([`Settle`]). They hold no handle, take no lock and wait for nothing:
//! the caller sends the frames, waits for the answers and calls again.
//! The broker's `store.rs` drives them from its tasks; the simulator
//! (`mqlb-sim`) drives the same ones from its event loop, so both follow
//! one rule for every retry, hand-off and deadline.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::acks::{owed_after, Answer};
use super::consensus::TICK;
use crate::router::NodeId;

/// How long a request waits for its key's owner to be able to answer (a
/// dead owner is replaced within the failure timeout plus an election),
/// how long a node that passed a request on waits for the owner's answer,
/// and how long a change waits for its chain.
pub const STORE_WAIT: Duration = Duration::from_secs(8);

/// Times a request may be passed on between nodes whose views disagree.
pub const MAX_HOPS: u8 = 3;

/// How long a step waits before it tries again: one tick of the view,
/// within which a view change or a link coming back can change the answer.
pub const RETRY: Duration = TICK;

/// Who owns a request's key, in the view of the node that has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The request names no key (malformed): it is answered where it is.
    NoKey,
    /// This node.
    Me,
    /// A peer: its id, if this node knows one for it.
    Peer(Option<NodeId>),
}

/// What a request does next on the node that has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Executed here: this node owns the key and may answer for it.
    Here,
    /// Passed on to the key's owner, which is linked and heard; its answer
    /// is waited for until [`Request::passed_until`].
    Pass(NodeId),
    /// Tried again after [`RETRY`]: the owner is not ready, or cannot be
    /// reached now (the view will drop a dead one).
    Retry,
    /// Answered with an error: past its deadline, or passed on too often.
    Unavailable,
}

/// A request on the node that has it (the one its client reached, or an
/// owner it was passed to): how often it was passed on, and its deadline.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    hops: u8,
    deadline: Instant,
}

impl Request {
    /// A request that came here after `hops` hand-offs, at `now`.
    pub fn new(hops: u8, now: Instant) -> Self {
        Self {
            hops,
            deadline: now + STORE_WAIT,
        }
    }

    /// The hand-offs so far (the next one carries one more).
    pub fn hops(&self) -> u8 {
        self.hops
    }

    /// When it stops waiting for its key's owner.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Where it goes at `now`: `owner` owns its key, `ready` says whether
    /// this node may answer for the keys it owns (`store_ready`), and
    /// `reachable` whether a peer is linked and heard.
    pub fn next(
        &self,
        now: Instant,
        owner: Owner,
        ready: bool,
        reachable: impl Fn(NodeId) -> bool,
    ) -> Next {
        match owner {
            Owner::NoKey => Next::Here,
            Owner::Me if ready => Next::Here,
            Owner::Me if now >= self.deadline => Next::Unavailable,
            Owner::Me => Next::Retry,
            // Passed on whatever this node's own state (a node on its way
            // out still passes requests to the keys' new owners).
            Owner::Peer(owner) => self.elsewhere(now, owner, reachable),
        }
    }

    /// The key is a peer's (`owner`, by id if known), whether found before
    /// executing or by the store while executing it (a view changed in
    /// between).
    pub fn elsewhere(
        &self,
        now: Instant,
        owner: Option<NodeId>,
        reachable: impl Fn(NodeId) -> bool,
    ) -> Next {
        if self.hops >= MAX_HOPS || now >= self.deadline {
            return Next::Unavailable;
        }
        match owner.filter(|&o| reachable(o)) {
            Some(o) => Next::Pass(o),
            // A dead or hung owner (no link, or not heard): the view will
            // drop it, and the key's next owner will answer.
            None => Next::Retry,
        }
    }

    /// Until when a node that passed the request on at `now` waits for
    /// the owner's answer: a hung owner whose link stays up answers no
    /// more than a dead one.
    pub fn passed_until(now: Instant) -> Instant {
        now + STORE_WAIT
    }

    /// Whether the owner answered the client, from how the wait for its
    /// answer ended (`None`: it did not end in time). Otherwise the client
    /// is told that the node handling its request was lost: the request
    /// may or may not have been applied.
    pub fn owner_answered(answer: Option<&Answer>) -> bool {
        matches!(answer, Some(Answer::Applied))
    }
}

/// What a change's settling does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// Send this round's frame (the change the first time, a barrier
    /// after) to these members, in this order, wait for their answers
    /// until [`Settle::deadline`], and call [`Settle::ended`].
    Send(Vec<NodeId>),
    /// Members are owed the change and none of them could be sent it:
    /// call [`Settle::round`] again after [`RETRY`].
    Retry,
    /// Every member of the chain has the change (or left the view).
    Committed,
    /// Not committed: a member refused it (it is in a newer view), or the
    /// deadline passed first.
    Failed,
}

/// A state store change (or a read's barrier) settling on its key's chain:
/// the members still owed it, those the current round went to, and the
/// deadline. A member counts as having the change only once it answered,
/// or once it left the view; one without a link, or whose link broke
/// before it answered, is owed it (its next link sends it every key its
/// chain holds, and a barrier after that confirms it). Counted out, it
/// could take over the key without an acknowledged change.
#[derive(Debug, Clone)]
pub struct Settle {
    owed: HashSet<NodeId>,
    sent: HashSet<NodeId>,
    waiting: bool,
    deadline: Instant,
}

impl Settle {
    /// A change owed to `owed` (its chain but this node), made at `now`.
    pub fn new(owed: HashSet<NodeId>, now: Instant) -> Self {
        Self {
            owed,
            sent: HashSet::new(),
            waiting: false,
            deadline: now + STORE_WAIT,
        }
    }

    /// When it gives up: a hung member answers no more than a dead one.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether a round's answers are being waited for.
    pub fn waiting(&self) -> bool {
        self.waiting
    }

    /// Starts a round at `now`: members the view dropped (`in_view` says
    /// no) are owed it no more; those still owed that are `linked` get
    /// the frame.
    pub fn round(
        &mut self,
        now: Instant,
        in_view: impl Fn(NodeId) -> bool,
        linked: impl Fn(NodeId) -> bool,
    ) -> Round {
        self.owed.retain(|&m| in_view(m));
        if self.owed.is_empty() {
            return Round::Committed;
        }
        if now >= self.deadline {
            return Round::Failed;
        }
        let mut to: Vec<NodeId> = self.owed.iter().copied().filter(|&m| linked(m)).collect();
        to.sort_unstable();
        self.sent = to.iter().copied().collect();
        if to.is_empty() {
            // Nobody to wait for: the round ends at once, and every member
            // is still owed it (by the same rule as an answered round).
            owed_after(&mut self.owed, &self.sent, &[]);
            return if self.owed.is_empty() {
                Round::Committed
            } else {
                Round::Retry
            };
        }
        self.waiting = true;
        Round::Send(to)
    }

    /// The round's wait ended at `now` with `answer` (`None`: the deadline
    /// passed first, and the caller cancels the wait).
    pub fn ended(&mut self, answer: Option<Answer>, now: Instant) -> Round {
        self.waiting = false;
        let lost = match answer {
            None | Some(Answer::Refused) => return Round::Failed,
            Some(Answer::Applied) => Vec::new(),
            Some(Answer::Lost(lost)) => lost,
        };
        owed_after(&mut self.owed, &self.sent, &lost);
        if self.owed.is_empty() {
            Round::Committed
        } else if now >= self.deadline {
            Round::Failed
        } else {
            Round::Retry
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> HashSet<NodeId> {
        ids.iter().copied().collect()
    }

    /// On a clock the test gives: a request runs where its key is owned
    /// and the store is ready, waits (within its deadline) for a store
    /// that is not, goes to a reachable owner, waits for an unreachable
    /// one, and is answered with an error once late or passed on too
    /// often.
    #[test]
    fn a_request_goes_where_its_key_is_served() {
        let t0 = Instant::now();
        let r = Request::new(0, t0);
        let late = t0 + STORE_WAIT;
        let all = |_| true;
        let none = |_| false;
        assert_eq!(r.next(t0, Owner::NoKey, false, none), Next::Here);
        assert_eq!(r.next(t0, Owner::Me, true, none), Next::Here);
        assert_eq!(r.next(t0, Owner::Me, false, all), Next::Retry);
        assert_eq!(r.next(late, Owner::Me, false, all), Next::Unavailable);
        assert_eq!(r.next(t0, Owner::Peer(Some(2)), true, all), Next::Pass(2));
        assert_eq!(r.next(t0, Owner::Peer(Some(2)), true, none), Next::Retry);
        assert_eq!(r.next(t0, Owner::Peer(None), true, all), Next::Retry);
        assert_eq!(
            r.next(late, Owner::Peer(Some(2)), true, all),
            Next::Unavailable
        );
        let hopped = Request::new(MAX_HOPS, t0);
        assert_eq!(hopped.hops(), MAX_HOPS);
        assert_eq!(hopped.elsewhere(t0, Some(2), all), Next::Unavailable);
        assert_eq!(r.deadline(), late);
        assert_eq!(Request::passed_until(t0), late);
        assert!(Request::owner_answered(Some(&Answer::Applied)));
        assert!(!Request::owner_answered(Some(&Answer::Lost(vec![2]))));
        assert!(!Request::owner_answered(Some(&Answer::Refused)));
        assert!(!Request::owner_answered(None));
    }

    /// A member whose link is down is owed the change, not counted out:
    /// the change waits for it, and commits once it answers a later round
    /// or the view drops it.
    #[test]
    fn an_unlinked_member_is_owed_the_change() {
        let t0 = Instant::now();
        let mut s = Settle::new(set(&[1, 2]), t0);
        let linked = |m| m == 1;
        assert_eq!(s.round(t0, |_| true, linked), Round::Send(vec![1]));
        assert!(s.waiting());
        assert_eq!(s.ended(Some(Answer::Applied), t0), Round::Retry);
        assert!(!s.waiting());
        // Still unlinked: nobody to send to.
        assert_eq!(s.round(t0, |_| true, linked), Round::Retry);
        // Its link is back: the barrier goes to it alone.
        assert_eq!(s.round(t0, |_| true, |_| true), Round::Send(vec![2]));
        assert_eq!(s.ended(Some(Answer::Applied), t0), Round::Committed);
        // Dropped by the view instead: owed no more.
        let mut s = Settle::new(set(&[1, 2]), t0);
        assert_eq!(s.round(t0, |_| true, linked), Round::Send(vec![1]));
        assert_eq!(s.ended(Some(Answer::Applied), t0), Round::Retry);
        assert_eq!(s.round(t0, |m| m != 2, |_| true), Round::Committed);
    }

    /// A member lost before it answered is owed it again; a refusal, a
    /// wait that timed out, or a deadline passed fails the change; nobody
    /// to owe commits at once.
    #[test]
    fn losses_refusals_and_deadlines() {
        let t0 = Instant::now();
        let late = t0 + STORE_WAIT;
        let mut s = Settle::new(set(&[1, 2]), t0);
        assert_eq!(s.round(t0, |_| true, |_| true), Round::Send(vec![1, 2]));
        assert_eq!(s.ended(Some(Answer::Lost(vec![2])), t0), Round::Retry);
        assert_eq!(s.round(t0, |_| true, |_| true), Round::Send(vec![2]));
        assert_eq!(s.ended(Some(Answer::Lost(vec![2])), late), Round::Failed);
        let mut s = Settle::new(set(&[1]), t0);
        assert_eq!(s.round(t0, |_| true, |_| true), Round::Send(vec![1]));
        assert_eq!(s.ended(Some(Answer::Refused), t0), Round::Failed);
        let mut s = Settle::new(set(&[1]), t0);
        assert_eq!(s.round(t0, |_| true, |_| true), Round::Send(vec![1]));
        assert_eq!(s.ended(None, t0), Round::Failed);
        let mut s = Settle::new(set(&[1]), t0);
        assert_eq!(s.round(late, |_| true, |_| false), Round::Failed);
        assert_eq!(s.deadline(), late);
        let mut s = Settle::new(HashSet::new(), t0);
        assert_eq!(s.round(late, |_| true, |_| true), Round::Committed);
    }
}
