//! Acknowledgements a state store change or a passed-on request waits
//! for, from peers: one component that owns them, plain data in and out
//! (the waiter gets a channel; acknowledgements and lost peers come in as
//! calls). It takes no lock and does no I/O; the cluster keeps it behind
//! one mutex, under which it also sends the frames a wait is for (an
//! acknowledgement that came before its wait was registered would be
//! lost).

use std::collections::{HashMap, HashSet};

use crate::router::NodeId;

/// One wait: the peers still to answer, and whether all so far applied.
#[derive(Debug)]
struct Wait {
    nodes: HashSet<NodeId>,
    ok: bool,
    /// A passed-on request: its node's loss is a failure (a key copy's
    /// member's loss is not: the copy here is then the only one, as for
    /// sessions, and the next view's chain gets it).
    lost_fails: bool,
    tx: Option<tokio::sync::oneshot::Sender<bool>>,
}

/// Every outstanding wait, by the sequence number its frames carry.
#[derive(Debug, Default)]
pub(crate) struct Acks {
    waits: HashMap<u64, Wait>,
}

impl Acks {
    /// Waits for each of `nodes` to answer `seq`: resolves `true` once all
    /// did and applied it (or were lost, unless `lost_fails`), `false` if
    /// any refused. `None` when there is no one to wait for.
    pub(crate) fn register(
        &mut self,
        seq: u64,
        nodes: HashSet<NodeId>,
        lost_fails: bool,
    ) -> Option<tokio::sync::oneshot::Receiver<bool>> {
        if nodes.is_empty() {
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waits.insert(
            seq,
            Wait {
                nodes,
                ok: true,
                lost_fails,
                tx: Some(tx),
            },
        );
        Some(rx)
    }

    /// `from` answered `seq`: applied (`ok`) or refused.
    pub(crate) fn acked(&mut self, from: NodeId, seq: u64, ok: bool) {
        let Some(w) = self.waits.get_mut(&seq) else {
            return;
        };
        if w.nodes.remove(&from) {
            w.ok &= ok;
        }
        if w.nodes.is_empty() {
            self.finish(seq);
        }
    }

    /// Peers whose links are gone answer no more.
    pub(crate) fn lost(&mut self, gone: &[NodeId]) {
        let mut done = Vec::new();
        for (seq, w) in &mut self.waits {
            for g in gone {
                if w.nodes.remove(g) && w.lost_fails {
                    w.ok = false;
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
    pub(crate) fn cancel(&mut self, seq: u64) {
        self.waits.remove(&seq);
    }

    /// Resolves `seq` with what every answer said together.
    fn finish(&mut self, seq: u64) {
        if let Some(mut w) = self.waits.remove(&seq) {
            if let Some(tx) = w.tx.take() {
                let _ = tx.send(w.ok);
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
        let mut rx = a.register(7, HashSet::from([1, 2]), false).unwrap();
        a.acked(1, 7, false);
        assert!(rx.try_recv().is_err(), "still waiting for 2");
        a.acked(2, 7, true);
        assert_eq!(rx.try_recv(), Ok(false));
    }

    /// A lost member counts as applied for a key copy and as failed for a
    /// passed-on request; nobody to wait for is no wait; a cancelled wait
    /// is forgotten.
    #[test]
    fn lost_members_and_cancelled_waits() {
        let mut a = Acks::default();
        let mut copy = a.register(1, HashSet::from([3]), false).unwrap();
        let mut passed = a.register(2, HashSet::from([3]), true).unwrap();
        a.lost(&[3]);
        assert_eq!(copy.try_recv(), Ok(true));
        assert_eq!(passed.try_recv(), Ok(false));
        assert!(a.register(3, HashSet::new(), false).is_none());
        let mut gone = a.register(4, HashSet::from([5]), false).unwrap();
        a.cancel(4);
        assert!(gone.try_recv().is_err());
        a.acked(5, 4, true);
        assert!(a.waits.is_empty());
    }
}
