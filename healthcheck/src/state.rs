//! The rise/fall state machine.
//!
//! A backend starts `Unknown`: the first probe result decides its state at
//! once (a freshly started balancer should not wait `rise` intervals to
//! serve). After that, `fall` consecutive failures take an `Up` backend out
//! and `rise` consecutive successes bring it back, so one lost probe does not
//! flap a backend.

use crate::probe::Outcome;

/// A backend's health as the data path sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum HealthState {
    /// No probe has finished yet. Usable: a dead backend is still skipped by
    /// the connect fallback, and start-up does not refuse clients.
    Unknown = 0,
    /// Serving MQTT.
    Up = 1,
    /// Not serving (unreachable, hung, refusing).
    Down = 2,
    /// Serving, but refusing our credentials: a configuration problem.
    Misconfigured = 3,
}

impl HealthState {
    /// Decodes the atomic representation.
    pub fn from_u8(v: u8) -> HealthState {
        match v {
            1 => HealthState::Up,
            2 => HealthState::Down,
            3 => HealthState::Misconfigured,
            _ => HealthState::Unknown,
        }
    }

    /// Whether new clients may be placed on the backend.
    pub fn is_usable(self) -> bool {
        matches!(self, HealthState::Up | HealthState::Unknown)
    }

    /// Label for JSON and metrics.
    pub fn label(self) -> &'static str {
        match self {
            HealthState::Unknown => "unknown",
            HealthState::Up => "up",
            HealthState::Down => "down",
            HealthState::Misconfigured => "misconfigured",
        }
    }
}

/// Consecutive results needed to change state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Successes to go up.
    pub rise: u32,
    /// Failures to go down.
    pub fall: u32,
    /// Passive failures (data-path connect failures, refused CONNACKs) to go down.
    pub passive_fall: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            rise: 2,
            fall: 2,
            passive_fall: 3,
        }
    }
}

/// A state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// Before.
    pub from: HealthState,
    /// After.
    pub to: HealthState,
}

/// Streak counters and the current state of one backend.
#[derive(Debug, Clone)]
pub struct Tracker {
    state: HealthState,
    successes: u32,
    failures: u32,
    passive_failures: u32,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            state: HealthState::Unknown,
            successes: 0,
            failures: 0,
            passive_failures: 0,
        }
    }
}

impl Tracker {
    /// Current state.
    pub fn state(&self) -> HealthState {
        self.state
    }

    /// Consecutive failed probes.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    fn set(&mut self, to: HealthState) -> Option<Transition> {
        let from = self.state;
        self.state = to;
        (from != to).then_some(Transition { from, to })
    }

    /// Folds in one probe result.
    pub fn observe(&mut self, outcome: &Outcome, th: Thresholds) -> Option<Transition> {
        let failed_state = match outcome {
            Outcome::Up(_) => None,
            Outcome::Down(_) => Some(HealthState::Down),
            Outcome::Misconfigured(_) => Some(HealthState::Misconfigured),
        };
        match failed_state {
            None => {
                self.successes += 1;
                self.failures = 0;
                self.passive_failures = 0;
                match self.state {
                    HealthState::Up => None,
                    HealthState::Unknown => self.set(HealthState::Up),
                    _ if self.successes >= th.rise => self.set(HealthState::Up),
                    _ => None,
                }
            }
            Some(bad) => {
                self.failures += 1;
                self.successes = 0;
                match self.state {
                    HealthState::Unknown => self.set(bad),
                    HealthState::Up if self.failures >= th.fall => self.set(bad),
                    HealthState::Up => None,
                    // Already out: keep the label current (down vs misconfigured).
                    _ => self.set(bad),
                }
            }
        }
    }

    /// Folds in a failure the data path saw. Only takes an `Up` (or unknown)
    /// backend down; the active probe alone brings it back.
    pub fn observe_passive(&mut self, th: Thresholds) -> Option<Transition> {
        self.passive_failures += 1;
        if self.state.is_usable() && self.passive_failures >= th.passive_fall {
            self.successes = 0;
            return self.set(HealthState::Down);
        }
        None
    }

    /// The data path connected fine: passive failures are not consecutive.
    pub fn passive_ok(&mut self) {
        self.passive_failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{Failure, Rtts};
    use mqlb_protocol::ReasonCode;
    use std::time::Duration;

    fn up() -> Outcome {
        Outcome::Up(Rtts {
            connack: Duration::ZERO,
            ping: Duration::ZERO,
            deep: None,
        })
    }
    fn down() -> Outcome {
        Outcome::Down(Failure::Unreachable("x".into()))
    }

    #[test]
    fn first_result_decides_then_thresholds_apply() {
        let th = Thresholds {
            rise: 2,
            fall: 3,
            passive_fall: 2,
        };
        let mut t = Tracker::default();
        assert_eq!(t.observe(&up(), th).unwrap().to, HealthState::Up);
        assert_eq!(t.observe(&down(), th), None);
        assert_eq!(t.observe(&down(), th), None);
        assert_eq!(t.observe(&down(), th).unwrap().to, HealthState::Down);
        assert_eq!(t.observe(&up(), th), None);
        assert_eq!(t.observe(&up(), th).unwrap().to, HealthState::Up);
    }

    #[test]
    fn a_single_failure_does_not_flap() {
        let th = Thresholds::default();
        let mut t = Tracker::default();
        t.observe(&up(), th);
        for _ in 0..10 {
            assert_eq!(t.observe(&down(), th), None);
            assert_eq!(t.observe(&up(), th), None);
        }
        assert_eq!(t.state(), HealthState::Up);
    }

    #[test]
    fn misconfigured_is_distinct() {
        let th = Thresholds::default();
        let mut t = Tracker::default();
        let mis = Outcome::Misconfigured(ReasonCode::NOT_AUTHORIZED);
        assert_eq!(t.observe(&mis, th).unwrap().to, HealthState::Misconfigured);
        assert!(!t.state().is_usable());
        assert_eq!(t.observe(&down(), th).unwrap().to, HealthState::Down);
    }

    #[test]
    fn passive_failures_take_it_down_and_successes_reset_them() {
        let th = Thresholds {
            rise: 1,
            fall: 5,
            passive_fall: 2,
        };
        let mut t = Tracker::default();
        t.observe(&up(), th);
        assert_eq!(t.observe_passive(th), None);
        t.passive_ok();
        assert_eq!(t.observe_passive(th), None);
        assert_eq!(t.observe_passive(th).unwrap().to, HealthState::Down);
        assert_eq!(t.observe(&up(), th).unwrap().to, HealthState::Up);
    }
}
