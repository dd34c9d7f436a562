//! Hybrid logical clocks: timestamps that follow wall time but never go
//! backwards and order causally related events across nodes
//! (Kulkarni et al., 2014). Retained messages carry one so that nodes agree
//! on the last writer.

use std::time::{SystemTime, UNIX_EPOCH};

/// A hybrid logical timestamp. Ordered by wall time, then the logical
/// counter, then the node, so two nodes never produce equal stamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch (the largest seen, not the local clock).
    pub wall_ms: u64,
    /// Events within the same millisecond.
    pub logical: u32,
    /// The node that made the stamp: the tie breaker.
    pub node: u32,
}

/// One node's clock.
#[derive(Debug, Clone)]
pub struct Clock {
    last: Hlc,
    /// How far ahead of this node's wall clock a remote stamp may be:
    /// one node with a clock set ahead (or a forged stamp) would otherwise
    /// win last-writer-wins for every retained message for as long.
    max_drift_ms: u64,
}

/// A remote stamp more than this ahead of the local wall clock is refused
/// unless configured otherwise (`[cluster] max_clock_drift`).
pub const DEFAULT_MAX_DRIFT: std::time::Duration = std::time::Duration::from_secs(60);

impl Default for Clock {
    fn default() -> Self {
        Self::new(0)
    }
}

/// The system's wall clock in Unix milliseconds (for a core that was never
/// told the time, and for stamps made outside the core).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Clock {
    /// A clock for node `node`.
    pub fn new(node: u32) -> Self {
        Self {
            last: Hlc {
                node,
                ..Hlc::default()
            },
            max_drift_ms: u64::try_from(DEFAULT_MAX_DRIFT.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Sets how far ahead of the local wall clock a remote stamp may be.
    pub fn set_max_drift(&mut self, drift: std::time::Duration) {
        self.max_drift_ms = u64::try_from(drift.as_millis()).unwrap_or(u64::MAX);
    }

    /// A stamp for a local event, later than every stamp seen so far.
    pub fn now(&mut self) -> Hlc {
        self.now_at(wall_ms())
    }

    /// [`Clock::now`] with the wall clock at `wall` Unix milliseconds.
    pub fn now_at(&mut self, wall: u64) -> Hlc {
        if wall > self.last.wall_ms {
            self.last.wall_ms = wall;
            self.last.logical = 0;
        } else {
            self.last.logical = self.last.logical.saturating_add(1);
        }
        self.last
    }

    /// Takes in a stamp from another node, so later local stamps order
    /// after it. A stamp further ahead of the local wall clock than the
    /// allowed drift is refused (`false`): the write it came with must not
    /// be applied.
    pub fn observe(&mut self, remote: Hlc) -> bool {
        self.observe_at(remote, wall_ms())
    }

    /// [`Clock::observe`] with the wall clock at `wall` Unix milliseconds.
    /// "Ahead" counts from the later of the wall clock and this clock's
    /// own last stamp: after every node's wall clock stepped back (an NTP
    /// correction), their stamps stay at the old high-water mark, and
    /// refusing them would leave each node with its own retained writes
    /// (found by the simulator).
    pub fn observe_at(&mut self, remote: Hlc, wall: u64) -> bool {
        let local = wall.max(self.last.wall_ms);
        if remote.wall_ms > local.saturating_add(self.max_drift_ms) {
            return false;
        }
        if (remote.wall_ms, remote.logical) > (self.last.wall_ms, self.last.logical) {
            self.last.wall_ms = remote.wall_ms;
            self.last.logical = remote.logical;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_backwards_and_orders_after_what_it_saw() {
        let mut c = Clock::new(1);
        let a = c.now_at(100);
        let b = c.now_at(90); // the wall clock stepped back
        assert!(b > a);
        assert_eq!((b.wall_ms, b.logical), (100, 1));
        let remote = Hlc {
            wall_ms: 500,
            logical: 7,
            node: 2,
        };
        assert!(c.observe_at(remote, 450));
        let d = c.now_at(200);
        assert!(d > remote);
        // Same wall and counter: the node breaks the tie.
        let mut x = Clock::new(1);
        let mut y = Clock::new(2);
        assert!(y.now_at(10) > x.now_at(10));
    }

    /// A remote stamp more than the allowed drift ahead is refused and
    /// leaves the clock where it was; one within it is taken.
    #[test]
    fn a_stamp_too_far_ahead_is_refused() {
        let mut c = Clock::new(1);
        c.set_max_drift(std::time::Duration::from_secs(60));
        let now = 1_000_000;
        let ahead = Hlc {
            wall_ms: now + 11 * 24 * 3600 * 1000,
            logical: 0,
            node: 2,
        };
        assert!(!c.observe_at(ahead, now));
        assert!(c.now_at(now) < ahead);
        let near = Hlc {
            wall_ms: now + 30_000,
            ..ahead
        };
        assert!(c.observe_at(near, now));
        assert!(c.now_at(now) > near);
    }

    /// Every wall clock stepped back 90 s: a peer's stamp at the old
    /// high-water mark is not "ahead" of a clock that has stamped there.
    #[test]
    fn a_stamp_from_before_a_step_back_is_taken() {
        let mut c = Clock::new(1);
        c.set_max_drift(std::time::Duration::from_secs(60));
        let before = c.now_at(1_000_000);
        let stepped = 1_000_000 - 90_000;
        let peer = Hlc {
            wall_ms: before.wall_ms,
            logical: before.logical + 5,
            node: 2,
        };
        assert!(c.observe_at(peer, stepped));
        assert!(c.now_at(stepped) > peer);
        // Still refused: far ahead of both the wall and this clock.
        let runaway = Hlc {
            wall_ms: before.wall_ms + 3_600_000,
            logical: 0,
            node: 2,
        };
        assert!(!c.observe_at(runaway, stepped));
    }
}
