//! When this node first had each QoS 1/2 message it was given more than
//! once may matter for: a peer's forward, or a QoS 2 resend routed here.
//!
//! A forward is confirmed by each peer on its own; when one peer dies or
//! refuses, the message is forwarded again to every interested peer, and
//! one that had it already gives it only to the sessions it has taken over
//! since (a QoS 2 message must arrive once). A publisher's QoS 2 resend
//! (DUP) routed here after its node died likewise skips the sessions that
//! were here when this node first had the message from that node.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long a message's first time is kept: as long as a dead node's late
/// frames and a publisher's resends take to come (the core's
/// `LATE_CHANGES_WITHIN`, which a test of the core keeps equal).
pub const KEPT_FOR: Duration = Duration::from_secs(20);

/// The most messages [`FirstHad`] remembers: a bound on its memory (about
/// 10 MB) whatever the forwarding rate; past it, the oldest are forgotten
/// first.
pub const FIRST_HAD_MAX: usize = 1 << 18;

/// When this node first had each message, by fingerprint, for the last
/// [`KEPT_FOR`] and at most [`FIRST_HAD_MAX`] messages.
#[derive(Debug, Default)]
pub struct FirstHad {
    order: VecDeque<(Instant, u64)>,
    at: crate::hashing::HashMap<u64, Instant>,
}

impl FirstHad {
    /// Notes that this node has `print` at `now`; returns when it first
    /// had it, if it had it before.
    pub fn had(&mut self, now: Instant, print: u64) -> Option<Instant> {
        while let Some(&(t, p)) = self.order.front() {
            if now.saturating_duration_since(t) < KEPT_FOR && self.order.len() < FIRST_HAD_MAX {
                break;
            }
            self.order.pop_front();
            if self.at.get(&p) == Some(&t) {
                self.at.remove(&p);
            }
        }
        match self.at.entry(print) {
            std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(now);
                self.order.push_back((now, print));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first time is kept however often a message comes again, and
    /// the log forgets by age and by count, oldest first.
    #[test]
    fn first_had_keeps_the_first_time_and_forgets_the_oldest() {
        let mut log = FirstHad::default();
        let t0 = Instant::now();
        assert_eq!(log.had(t0, 1), None);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(log.had(t1, 1), Some(t0));
        assert_eq!(log.had(t1, 2), None);
        // Past KEPT_FOR, 1 is forgotten; 2 (noted a second later) too.
        let late = t0 + KEPT_FOR + Duration::from_secs(1);
        assert_eq!(log.had(late, 1), None);
        assert_eq!(log.at.len(), 1);
        for p in 10..10 + FIRST_HAD_MAX as u64 {
            log.had(late, p);
        }
        assert!(log.at.len() <= FIRST_HAD_MAX);
        assert_eq!(log.order.len(), log.at.len());
        assert_eq!(log.had(late, 1), None, "the oldest was not forgotten");
    }
}
