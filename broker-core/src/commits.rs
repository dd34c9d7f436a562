//! What a node's changes wait for before they count as committed: each
//! append's outstanding acknowledgements per peer, as one component that
//! owns them, plain data in and out. Acknowledgements, refusals, lost
//! peers, broken links and confirmed link snapshots come in as calls; what
//! is released comes back out ([`Released`]): a waiter to tell it is
//! committed, or a forwarded publish to send again. It takes no lock, does
//! no I/O and keeps no channel: `D` is whatever the caller wakes its
//! waiter with (a oneshot sender in the broker, a gate in the simulator).
//!
//! # Owed members
//! A chain member that a change was not sent to, because its link is down
//! or because the link's opening snapshot holds the change but the member
//! has not yet confirmed it, is still *owed* the change: the wait keeps it
//! until the member confirms a link snapshot that holds the change
//! ([`Commits::expect_resync`]) or leaves the view ([`Commits::lost`]).
//! Counting such a member out instead (as a lost one) would commit a
//! change its copy lacks, and if the holder then died, the member would
//! promote that copy and lose what was acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::message::Message;
use crate::router::NodeId;

/// A forwarded publish and the shared groups it serves: kept until its
/// peer confirms it, sent again if the peer is lost or refuses it.
pub type Forwarded = (Message, Vec<Arc<str>>);

/// What a call released.
#[derive(Debug)]
pub enum Released<D> {
    /// Every peer it waited for has it: committed.
    Committed(D),
    /// A forwarded publish whose peer was lost or refused it: to be
    /// forwarded again; `D` says when that is committed.
    Resend(Message, Vec<Arc<str>>, D),
}

/// One append's outstanding acknowledgements.
#[derive(Debug)]
struct Waiting<D> {
    /// The batch of the node's ordered log it carries (0 for a forward).
    log_seq: u64,
    /// Acknowledgements still owed, per peer (a few peers: a list).
    per_node: Vec<(NodeId, usize)>,
    done: D,
    /// Boxed: most waits are chain changes without one, and a small entry
    /// keeps the ordered map's inserts and removals cheap (found by
    /// counting instructions across nodes).
    resend: Option<Box<Forwarded>>,
}

/// A link snapshot sent to `peer` holding every batch up to `covers`:
/// confirmed once each of its `left` session copies is acknowledged.
#[derive(Debug)]
struct Resync {
    peer: NodeId,
    left: usize,
    covers: u64,
}

/// Every outstanding append, by the number its frames carry. Ordered maps:
/// what a call releases comes out in the same order on every run (the
/// simulator replays seeds).
#[derive(Debug)]
pub struct Commits<D> {
    waits: BTreeMap<u64, Waiting<D>>,
    resyncs: BTreeMap<u64, Resync>,
    /// Per peer, the last batch a link snapshot it confirmed holds, for
    /// the link now open (forgotten when it breaks).
    confirmed: BTreeMap<NodeId, u64>,
}

impl<D> Default for Commits<D> {
    fn default() -> Self {
        Commits {
            waits: BTreeMap::new(),
            resyncs: BTreeMap::new(),
            confirmed: BTreeMap::new(),
        }
    }
}

impl<D> Commits<D> {
    /// Waits for `sent` acknowledgements of `seq` (so many from each peer)
    /// and for each `owed` member to confirm a link snapshot holding batch
    /// `log_seq` (see the module docs; one that already has is not waited
    /// for). `resend`: a forwarded publish, given back if its peer is lost
    /// or refuses it. Gives `done` back when there is nothing to wait for.
    #[must_use = "a waiter given back is committed at once"]
    pub fn register(
        &mut self,
        seq: u64,
        log_seq: u64,
        sent: impl IntoIterator<Item = (NodeId, usize)>,
        owed: &[NodeId],
        resend: Option<Forwarded>,
        done: D,
    ) -> Option<D> {
        let mut per_node: Vec<(NodeId, usize)> = sent.into_iter().filter(|(_, n)| *n > 0).collect();
        let owed = if crate::mutations::on(crate::mutations::Mutation::UnlinkedMemberCountedOut) {
            &[]
        } else {
            owed
        };
        for &p in owed {
            if self.confirmed.get(&p).is_some_and(|&c| c >= log_seq) {
                continue;
            }
            match per_node.iter_mut().find(|(q, _)| *q == p) {
                Some((_, n)) => *n += 1,
                None => per_node.push((p, 1)),
            }
        }
        if per_node.is_empty() {
            return Some(done);
        }
        self.waits.insert(
            seq,
            Waiting {
                log_seq,
                per_node,
                done,
                resend: resend.map(Box::new),
            },
        );
        None
    }

    /// `from` acknowledged `seq` once.
    pub fn acked(&mut self, from: NodeId, seq: u64) -> Vec<Released<D>> {
        if let Some(r) = self.resyncs.get_mut(&seq) {
            if r.peer != from {
                return Vec::new();
            }
            r.left = r.left.saturating_sub(1);
            if r.left > 0 {
                return Vec::new();
            }
            let Some(r) = self.resyncs.remove(&seq) else {
                return Vec::new();
            };
            return self.resynced(r.peer, r.covers);
        }
        let Some(w) = self.waits.get_mut(&seq) else {
            return Vec::new();
        };
        if let Some(i) = w.per_node.iter().position(|(p, _)| *p == from) {
            if let Some((_, n)) = w.per_node.get_mut(i) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    w.per_node.swap_remove(i);
                }
            }
        }
        if !w.per_node.is_empty() {
            return Vec::new();
        }
        self.waits
            .remove(&seq)
            .map(|w| Released::Committed(w.done))
            .into_iter()
            .collect()
    }

    /// `from` did not deliver the forward `seq` (it no longer serves
    /// sessions): once nobody else is waited for, the publish comes back
    /// to be forwarded again (or the wait is done, without one).
    pub fn refused(&mut self, from: NodeId, seq: u64) -> Option<Released<D>> {
        let w = self.waits.get_mut(&seq)?;
        w.per_node.retain(|(p, _)| *p != from);
        if !w.per_node.is_empty() {
            return None;
        }
        self.waits.remove(&seq).map(release)
    }

    /// Peers that left the view are waited for no longer (their copies are
    /// re-made on the new chains); the publishes that were waiting only
    /// for them come back, to be forwarded again.
    pub fn lost(&mut self, gone: &[NodeId]) -> Vec<Released<D>> {
        self.resyncs.retain(|_, r| !gone.contains(&r.peer));
        self.confirmed.retain(|p, _| !gone.contains(p));
        self.release_where(|_, p| gone.contains(&p))
    }

    /// The link to `peer`, a member of the view, broke: what was in flight
    /// on it is lost. A forward waits for it no longer and comes back; a
    /// chain change keeps waiting, now owed to it (see the module docs).
    pub fn unlinked(&mut self, peer: NodeId) -> Vec<Released<D>> {
        self.resyncs.retain(|_, r| r.peer != peer);
        self.confirmed.remove(&peer);
        if crate::mutations::on(crate::mutations::Mutation::UnlinkedMemberCountedOut) {
            return self.release_where(|_, p| p == peer);
        }
        self.forwards_lost(peer)
    }

    /// The forwards waiting for `peer` wait no longer and come back (its
    /// link is down; what was on it is lost). Chain changes keep waiting.
    pub fn forwards_lost(&mut self, peer: NodeId) -> Vec<Released<D>> {
        self.release_where(|w, p| p == peer && w.resend.is_some())
    }

    /// A link snapshot went to `peer` holding every batch up to `covers`,
    /// with `copies` session copies sent as `seq`: once each is
    /// acknowledged, what was owed to `peer` up to `covers` is released.
    pub fn expect_resync(
        &mut self,
        seq: u64,
        peer: NodeId,
        copies: usize,
        covers: u64,
    ) -> Vec<Released<D>> {
        self.resyncs.retain(|_, r| r.peer != peer);
        if copies == 0 {
            return self.resynced(peer, covers);
        }
        self.resyncs.insert(
            seq,
            Resync {
                peer,
                left: copies,
                covers,
            },
        );
        Vec::new()
    }

    /// `peer` has every batch up to `covers`.
    fn resynced(&mut self, peer: NodeId, covers: u64) -> Vec<Released<D>> {
        let c = self.confirmed.entry(peer).or_insert(0);
        *c = (*c).max(covers);
        self.release_where(|w, p| p == peer && w.resend.is_none() && w.log_seq <= covers)
    }

    /// Removes the peers `drop` picks from every wait; releases the waits
    /// left with nobody.
    fn release_where(&mut self, drop: impl Fn(&Waiting<D>, NodeId) -> bool) -> Vec<Released<D>> {
        let mut done = Vec::new();
        for (seq, w) in &mut self.waits {
            let before = w.per_node.len();
            let gone: Vec<NodeId> = w
                .per_node
                .iter()
                .map(|(p, _)| *p)
                .filter(|&p| drop(w, p))
                .collect();
            w.per_node.retain(|(p, _)| !gone.contains(p));
            if w.per_node.is_empty() && before > 0 {
                done.push(*seq);
            }
        }
        done.into_iter()
            .filter_map(|seq| self.waits.remove(&seq))
            .map(release)
            .collect()
    }

    /// How many appends are waiting.
    pub fn len(&self) -> usize {
        self.waits.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.waits.is_empty()
    }

    /// Up to `most` waits: their numbers, the peers still to answer, and
    /// whether each is a forward (for a log line).
    pub fn sample(&self, most: usize) -> Vec<(u64, Vec<NodeId>, bool)> {
        self.waits
            .iter()
            .take(most)
            .map(|(seq, w)| {
                (
                    *seq,
                    w.per_node.iter().map(|(p, _)| *p).collect(),
                    w.resend.is_some(),
                )
            })
            .collect()
    }
}

fn release<D>(w: Waiting<D>) -> Released<D> {
    match w.resend.map(|r| *r) {
        Some((m, groups)) => Released::Resend(m, groups, w.done),
        None => Released::Committed(w.done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqlb_protocol::{MqttStr, QoS};

    /// A wait stays a small entry of the ordered map (its forward boxed):
    /// every insert and removal shifts entries, for every batch a chain
    /// holds (found by counting instructions across nodes).
    #[test]
    fn a_wait_is_a_small_entry() {
        assert!(
            std::mem::size_of::<Waiting<usize>>() <= 48,
            "{} bytes",
            std::mem::size_of::<Waiting<usize>>()
        );
    }

    fn message() -> Message {
        Message {
            topic: MqttStr::try_from("t").unwrap_or_default(),
            payload: bytes::Bytes::from_static(b"m"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Arc::default(),
            origin: None,
            received: std::time::Instant::now(),
        }
    }

    fn committed(r: &[Released<u32>]) -> Vec<u32> {
        r.iter()
            .filter_map(|r| match r {
                Released::Committed(d) => Some(*d),
                Released::Resend(..) => None,
            })
            .collect()
    }

    /// A session change waits for every acknowledgement it was sent for,
    /// from each member; a lost member waits no longer.
    #[test]
    fn changes_commit_once_every_member_acknowledged() {
        let mut c = Commits::default();
        assert!(c.register(1, 1, [(2, 2), (3, 1)], &[], None, 10).is_none());
        assert!(c.acked(2, 1).is_empty());
        assert!(c.acked(3, 1).is_empty(), "2 owes one more");
        assert_eq!(committed(&c.acked(2, 1)), vec![10]);
        assert!(c.register(2, 2, [(4, 1)], &[], None, 11).is_none());
        assert_eq!(committed(&c.lost(&[4])), vec![11]);
        assert!(c.is_empty());
        assert_eq!(c.register(3, 3, [], &[], None, 12), Some(12));
    }

    /// A forward refused, or whose peer is lost or whose link broke, comes
    /// back to be sent again, its wait still open until then.
    #[test]
    fn forwards_come_back_when_refused_lost_or_unlinked() {
        let mut c: Commits<u32> = Commits::default();
        let _ = c.register(5, 0, [(2, 1)], &[], Some((message(), Vec::new())), 1);
        match c.refused(2, 5) {
            Some(Released::Resend(m, _, 1)) => assert_eq!(&m.payload[..], b"m"),
            other => panic!("not given back: {other:?}"),
        }
        let _ = c.register(6, 0, [(3, 1)], &[], Some((message(), Vec::new())), 2);
        assert_eq!(c.sample(8), vec![(6, vec![3], true)]);
        assert!(matches!(
            c.lost(&[3]).as_slice(),
            [Released::Resend(_, _, 2)]
        ));
        let _ = c.register(7, 0, [(3, 1)], &[], Some((message(), Vec::new())), 3);
        assert!(matches!(
            c.unlinked(3).as_slice(),
            [Released::Resend(_, _, 3)]
        ));
        assert!(c.is_empty());
    }

    /// The bug the simulator found: a chain member whose link broke was
    /// counted out, the change committed without it, and the member could
    /// then promote a copy missing it. Now the change waits until the
    /// member confirms a link snapshot holding it, or leaves the view.
    #[test]
    fn a_member_whose_link_broke_is_owed_the_change_until_it_resyncs() {
        let mut c = Commits::default();
        // Batch 7 went to 2 and 3; the link to 2 breaks before its answer.
        assert!(c.register(100, 7, [(2, 1), (3, 1)], &[], None, 1).is_none());
        assert!(c.unlinked(2).is_empty(), "not released by the break");
        assert!(c.acked(3, 100).is_empty(), "still owed to 2");
        // Batch 8 is made while the link is down: owed to 2, sent to 3.
        assert!(c.register(101, 8, [(3, 1)], &[2], None, 2).is_none());
        assert!(c.acked(3, 101).is_empty());
        // The link opens again; its snapshot holds batches up to 8, with
        // two session copies sent as 200. A copy acknowledged from another
        // peer, or only one of the two, is not enough.
        assert!(c.expect_resync(200, 2, 2, 8).is_empty());
        assert!(c.acked(3, 200).is_empty());
        assert!(c.acked(2, 200).is_empty());
        assert_eq!(committed(&c.acked(2, 200)), vec![1, 2]);
        // Batch 8 again (numbered before the snapshot, handed off after
        // the link opened): 2 confirmed it, nothing is owed.
        assert_eq!(c.register(102, 8, [], &[2], None, 3), Some(3));
        // Batch 9 on a link whose snapshot is not confirmed yet: owed.
        assert!(c.unlinked(2).is_empty());
        assert!(c.register(103, 9, [], &[2], None, 4).is_none());
        assert!(c.expect_resync(201, 2, 1, 8).is_empty());
        assert!(c.acked(2, 201).is_empty(), "a snapshot up to 8 misses 9");
        // Leaving the view releases it.
        assert_eq!(committed(&c.lost(&[2])), vec![4]);
        assert!(c.is_empty());
    }

    /// A snapshot with no session copy for the peer confirms at once; a
    /// snapshot on a link that broke again confirms nothing.
    #[test]
    fn resyncs_end_with_their_link() {
        let mut c = Commits::default();
        assert!(c.register(1, 3, [], &[2], None, 1).is_none());
        assert!(c.expect_resync(9, 2, 1, 3).is_empty());
        assert!(c.unlinked(2).is_empty());
        assert!(c.acked(2, 9).is_empty(), "the old link's snapshot");
        assert_eq!(committed(&c.expect_resync(10, 2, 0, 3)), vec![1]);
    }
}
