//! Acknowledgements a state store change or a passed-on request waits
//! for, from peers: one component that owns them, plain data in and out.
//! Acknowledgements and lost peers come in as calls; a wait that ended
//! comes back out with its answer. It takes no lock, does no I/O and keeps
//! no channel: `D` is whatever the caller wakes its waiter with (a oneshot
//! sender in the broker, a request's index in the simulator), as in
//! `commits`. The cluster keeps it behind one mutex, under which it also
//! sends the frames a wait is for (an acknowledgement that came before its
//! wait was registered would be lost). The simulator (`mqlb-sim`) drives
//! the same component, and the same rule for what a change is still owed
//! ([`owed_after`]).

use std::collections::{BTreeMap, HashSet};

use crate::router::NodeId;

/// How a wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Every peer applied it.
    Applied,
    /// A peer refused it (it is in a newer view than the sender).
    Refused,
    /// None refused, but these peers were lost before they answered (their
    /// link broke, or the view dropped them): they may or may not have it.
    /// The caller decides what that means (a passed-on request failed; a
    /// key copy is owed to them: `store_replicate`).
    Lost(Vec<NodeId>),
}

/// The chain members a state store change is still owed to, after a wait
/// for the ones it was `sent` to ended without a refusal, `lost` naming
/// those that answered no more: a member counts as having the change only
/// once it answered. One never sent it (no link) or lost is still owed it.
pub fn owed_after<T: Eq + std::hash::Hash>(owed: &mut HashSet<T>, sent: &HashSet<T>, lost: &[T]) {
    if mqlb_broker_core::mutations::on(mqlb_broker_core::mutations::Mutation::StoreMemberCountedOut)
    {
        owed.clear();
        return;
    }
    owed.retain(|id| !sent.contains(id) || lost.contains(id));
}

/// One wait: the peers still to answer, and what those that did said.
#[derive(Debug)]
struct Wait<D> {
    nodes: HashSet<NodeId>,
    refused: bool,
    lost: Vec<NodeId>,
    done: D,
}

impl<D> Wait<D> {
    /// What every answer said together.
    fn answer(self) -> (D, Answer) {
        let answer = if self.refused {
            Answer::Refused
        } else if self.lost.is_empty() {
            Answer::Applied
        } else {
            Answer::Lost(self.lost)
        };
        (self.done, answer)
    }
}

/// Every outstanding wait, by the sequence number its frames carry. An
/// ordered map: what a call ends comes out in the same order on every run
/// (the simulator replays seeds).
#[derive(Debug)]
pub struct Acks<D> {
    waits: BTreeMap<u64, Wait<D>>,
}

impl<D> Default for Acks<D> {
    fn default() -> Self {
        Acks {
            waits: BTreeMap::new(),
        }
    }
}

impl<D> Acks<D> {
    /// Waits for each of `nodes` to answer `seq`; `done` comes back with
    /// the answer. Gives `done` back at once when there is no one to wait
    /// for.
    #[must_use = "a waiter given back has no one to wait for"]
    pub fn register(&mut self, seq: u64, nodes: HashSet<NodeId>, done: D) -> Option<D> {
        if nodes.is_empty() {
            return Some(done);
        }
        self.waits.insert(
            seq,
            Wait {
                nodes,
                refused: false,
                lost: Vec::new(),
                done,
            },
        );
        None
    }

    /// `from` answered `seq`: applied (`ok`) or refused. The wait, with
    /// its answer, if that was the last one it waited for.
    #[must_use = "an ended wait's waiter is to be told"]
    pub fn acked(&mut self, from: NodeId, seq: u64, ok: bool) -> Option<(D, Answer)> {
        let w = self.waits.get_mut(&seq)?;
        if w.nodes.remove(&from) {
            w.refused |= !ok;
        }
        if !w.nodes.is_empty() {
            return None;
        }
        self.waits.remove(&seq).map(Wait::answer)
    }

    /// Peers whose links are gone answer no more: the waits left with
    /// nobody to wait for, with their answers.
    #[must_use = "an ended wait's waiter is to be told"]
    pub fn lost(&mut self, gone: &[NodeId]) -> Vec<(D, Answer)> {
        let mut done = Vec::new();
        for (seq, w) in &mut self.waits {
            for g in gone {
                if w.nodes.remove(g) {
                    w.lost.push(*g);
                }
            }
            if w.nodes.is_empty() {
                done.push(*seq);
            }
        }
        done.into_iter()
            .filter_map(|seq| self.waits.remove(&seq))
            .map(Wait::answer)
            .collect()
    }

    /// The waiter gave up on `seq` (its deadline passed).
    pub fn cancel(&mut self, seq: u64) {
        self.waits.remove(&seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal from one member is not undone by another's later
    /// acceptance (three copies: two members answer).
    #[test]
    fn one_refusal_fails_the_wait_whoever_answers_last() {
        let mut a = Acks::default();
        assert!(a.register(7, HashSet::from([1, 2]), "w").is_none());
        assert_eq!(a.acked(1, 7, false), None, "still waiting for 2");
        assert_eq!(a.acked(2, 7, true), Some(("w", Answer::Refused)));
    }

    /// A lost member is named, not counted as having applied it (a key
    /// copy is owed to it until it confirms one; found like the session
    /// chains' "counted out" bug); nobody to wait for is no wait; a
    /// cancelled wait is forgotten.
    #[test]
    fn lost_members_and_cancelled_waits() {
        let mut a = Acks::default();
        assert!(a.register(1, HashSet::from([3, 4]), 1).is_none());
        assert_eq!(a.acked(4, 1, true), None);
        assert_eq!(a.lost(&[3]), vec![(1, Answer::Lost(vec![3]))]);
        assert!(a.register(2, HashSet::from([3]), 2).is_none());
        assert_eq!(a.acked(3, 2, true), Some((2, Answer::Applied)));
        assert_eq!(a.register(3, HashSet::new(), 3), Some(3));
        assert!(a.register(4, HashSet::from([5]), 4).is_none());
        a.cancel(4);
        assert_eq!(a.acked(5, 4, true), None);
        assert!(a.waits.is_empty());
    }
}
