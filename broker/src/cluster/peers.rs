//! The failure detector: what this node last heard from each peer on its
//! inbound link, and whether the peer said it is leaving or sent its
//! snapshot; one component that owns that table, plain data in and out,
//! given the time (no lock or I/O of its own; the cluster keeps it behind
//! one mutex and the links update it).

use std::time::Instant;

use super::FAILURE_TIMEOUT;
use crate::router::NodeId;

/// What this node knows of one peer, from the peer's inbound link.
#[derive(Debug, Default, Clone)]
pub(crate) struct Peer {
    /// Last frame from it on its inbound link.
    pub(crate) heard: Option<Instant>,
    /// Which inbound link is current (a newer one replaces an older).
    pub(crate) generation: u64,
    /// Its snapshot arrived on the current inbound link.
    pub(crate) synced: bool,
    /// It said it is stopping (on the current inbound link).
    pub(crate) leaving: bool,
}

impl Peer {
    /// Heard within [`FAILURE_TIMEOUT`] as of `now`.
    pub(crate) fn heard_within(&self, now: Instant) -> bool {
        self.heard
            .is_some_and(|h| now.saturating_duration_since(h) <= FAILURE_TIMEOUT)
    }
}

/// Every member's entry, by node id (this node's own included, unused).
#[derive(Debug, Default)]
pub(crate) struct Peers {
    all: Vec<Peer>,
}

impl Peers {
    /// A table for `n` members.
    pub(crate) fn new(n: usize) -> Self {
        Self {
            all: vec![Peer::default(); n],
        }
    }

    /// Entries for `n` more members (ids are handed out in order).
    pub(crate) fn grow(&mut self, n: usize) {
        self.all.extend((0..n).map(|_| Peer::default()));
    }

    /// Runs `f` on peer `id`'s entry, if it has one.
    pub(crate) fn with<R>(&mut self, id: NodeId, f: impl FnOnce(&mut Peer) -> R) -> Option<R> {
        self.all.get_mut(id as usize).map(f)
    }

    /// A copy of peer `id`'s entry (a blank one if it has none).
    pub(crate) fn get(&self, id: NodeId) -> Peer {
        self.all.get(id as usize).cloned().unwrap_or_default()
    }

    /// Whether peer `id` is heard (within [`FAILURE_TIMEOUT`] of `now`)
    /// and not leaving.
    pub(crate) fn hears(&self, id: NodeId, now: Instant) -> bool {
        self.all
            .get(id as usize)
            .is_some_and(|p| !p.leaving && p.heard_within(now))
    }

    /// The peers (not `me`) heard and not leaving as of `now`.
    pub(crate) fn heard(&self, me: NodeId, now: Instant) -> Vec<NodeId> {
        (0..self.all.len())
            .filter_map(|i| NodeId::try_from(i).ok())
            .filter(|&id| id != me && self.hears(id, now))
            .collect()
    }

    /// Whether `answer`s for peer `id`'s inbound link `generation` are
    /// still for its current link.
    pub(crate) fn is_current(&self, id: NodeId, generation: u64) -> bool {
        self.all
            .get(id as usize)
            .is_some_and(|p| p.generation == generation)
    }

    /// Whether every peer this node must hear from has sent its snapshot:
    /// each one `wanted` (by id), except one the detector says is dead
    /// (not heard within [`FAILURE_TIMEOUT`], once the detector is
    /// `armed`: this node has been up longer than that).
    pub(crate) fn synced_with_live(
        &self,
        me: NodeId,
        now: Instant,
        armed: bool,
        wanted: impl Fn(usize) -> bool,
    ) -> bool {
        self.all.iter().enumerate().all(|(i, p)| {
            let dead = armed && !p.heard_within(now);
            i == me as usize || p.synced || dead || !wanted(i)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// On a clock the test gives: a peer is heard for FAILURE_TIMEOUT
    /// after its last frame, never while leaving; a dead peer is not
    /// waited for once the detector is armed; answers are for the
    /// current link only.
    #[test]
    fn the_detector_runs_on_a_given_clock() {
        let t0 = Instant::now();
        let mut p = Peers::new(3);
        p.with(1, |x| x.heard = Some(t0));
        p.with(2, |x| {
            x.heard = Some(t0);
            x.generation = 4;
        });
        assert_eq!(p.heard(0, t0 + Duration::from_secs(1)), vec![1, 2]);
        assert!(p
            .heard(0, t0 + FAILURE_TIMEOUT + Duration::from_millis(1))
            .is_empty());
        p.with(2, |x| x.leaving = true);
        assert!(!p.hears(2, t0));
        assert!(p.is_current(2, 4) && !p.is_current(2, 3));
        // Peer 1 synced, peer 2 silent: waited for until the detector is
        // armed and says it is dead.
        p.with(1, |x| x.synced = true);
        let later = t0 + FAILURE_TIMEOUT * 2;
        assert!(!p.synced_with_live(0, later, false, |_| true));
        assert!(p.synced_with_live(0, later, true, |_| true));
        assert!(p.synced_with_live(0, t0, false, |i| i != 2));
        p.grow(1);
        assert_eq!(p.get(3).generation, 0);
    }
}
