//! Acknowledgements a state store change or a passed-on request waits
//! for, from peers: one component that owns them, plain data in and out
//! (the waiter gets a channel; acknowledgements and lost peers come in as
//! calls). It takes no lock and does no I/O; the cluster keeps it behind
//! one mutex, under which it also sends the frames a wait is for (an
//! acknowledgement that came before its wait was registered would be
//! lost). The simulator (`mqlb-sim`) drives the same component, and the
//! same rule for what a change is still owed ([`owed_after`]).

use std::collections::{HashMap, HashSet};

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
struct Wait {
    nodes: HashSet<NodeId>,
    refused: bool,
    lost: Vec<NodeId>,
    tx: Option<tokio::sync::oneshot::Sender<Answer>>,
}

/// Every outstanding wait, by the sequence number its frames carry.
#[derive(Debug, Default)]
pub struct Acks {
    waits: HashMap<u64, Wait>,
}

impl Acks {
    /// Waits for each of `nodes` to answer `seq`. `None` when there is no
    /// one to wait for.
    pub fn register(
        &mut self,
        seq: u64,
        nodes: HashSet<NodeId>,
    ) -> Option<tokio::sync::oneshot::Receiver<Answer>> {
        if nodes.is_empty() {
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waits.insert(
            seq,
            Wait {
                nodes,
                refused: false,
                lost: Vec::new(),
                tx: Some(tx),
            },
        );
        Some(rx)
    }

    /// `from` answered `seq`: applied (`ok`) or refused.
    pub fn acked(&mut self, from: NodeId, seq: u64, ok: bool) {
        let Some(w) = self.waits.get_mut(&seq) else {
            return;
        };
        if w.nodes.remove(&from) {
            w.refused |= !ok;
        }
        if w.nodes.is_empty() {
            self.finish(seq);
        }
    }

    /// Peers whose links are gone answer no more.
    pub fn lost(&mut self, gone: &[NodeId]) {
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
        for seq in done {
            self.finish(seq);
        }
    }

    /// The waiter gave up on `seq` (its deadline passed).
    pub fn cancel(&mut self, seq: u64) {
        self.waits.remove(&seq);
    }

    /// Resolves `seq` with what every answer said together.
    fn finish(&mut self, seq: u64) {
        if let Some(mut w) = self.waits.remove(&seq) {
            let answer = if w.refused {
                Answer::Refused
            } else if w.lost.is_empty() {
                Answer::Applied
            } else {
                Answer::Lost(std::mem::take(&mut w.lost))
            };
            if let Some(tx) = w.tx.take() {
                let _ = tx.send(answer);
            }
        }
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
        let mut rx = a.register(7, HashSet::from([1, 2])).unwrap();
        a.acked(1, 7, false);
        assert!(rx.try_recv().is_err(), "still waiting for 2");
        a.acked(2, 7, true);
        assert_eq!(rx.try_recv(), Ok(Answer::Refused));
    }

    /// A lost member is named, not counted as having applied it (a key
    /// copy is owed to it until it confirms one; found like the session
    /// chains' "counted out" bug); nobody to wait for is no wait; a
    /// cancelled wait is forgotten.
    #[test]
    fn lost_members_and_cancelled_waits() {
        let mut a = Acks::default();
        let mut copy = a.register(1, HashSet::from([3, 4])).unwrap();
        a.acked(4, 1, true);
        a.lost(&[3]);
        assert_eq!(copy.try_recv(), Ok(Answer::Lost(vec![3])));
        let mut both = a.register(2, HashSet::from([3])).unwrap();
        a.acked(3, 2, true);
        assert_eq!(both.try_recv(), Ok(Answer::Applied));
        assert!(a.register(3, HashSet::new()).is_none());
        let mut gone = a.register(4, HashSet::from([5])).unwrap();
        a.cancel(4);
        assert!(gone.try_recv().is_err());
        a.acked(5, 4, true);
        assert!(a.waits.is_empty());
    }
}
