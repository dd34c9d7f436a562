//! What each session was given lately, by message fingerprint: one
//! component that owns the logs, plain data in and out, given the time.
//! A node keeps one for every session it serves or keeps a copy of. When a
//! copy is promoted after its holder died, a publish held for the dead
//! holder and routed again is not given to the session a second time if
//! the holder had already put it in (a QoS 2 message must arrive once);
//! the log goes along whenever a session is sent whole.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// How long a message is remembered: longer than a dead holder's held
/// publishes wait before they are routed again.
pub(crate) const SEEN_FOR: Duration = Duration::from_secs(20);

/// One session's fingerprints of the last [`SEEN_FOR`], oldest first.
#[derive(Debug, Default)]
struct SeenLog {
    order: VecDeque<(Instant, u64)>,
    set: HashSet<u64>,
}

impl SeenLog {
    fn insert(&mut self, now: Instant, print: u64) {
        while let Some(&(t, p)) = self.order.front() {
            if now.duration_since(t) < SEEN_FOR {
                break;
            }
            self.order.pop_front();
            self.set.remove(&p);
        }
        if self.set.insert(print) {
            self.order.push_back((now, print));
        }
    }

    /// Whether everything in it is older than [`SEEN_FOR`].
    fn stale(&self, now: Instant) -> bool {
        self.order
            .back()
            .is_none_or(|&(t, _)| now.duration_since(t) >= SEEN_FOR)
    }
}

/// Every session's log.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    logs: HashMap<String, SeenLog>,
}

impl Seen {
    /// `client`'s session was given the message printed `print` at `now`.
    /// Allocates the client's name only for its first entry.
    pub(crate) fn note(&mut self, client: &str, print: u64, now: Instant) {
        match self.logs.get_mut(client) {
            Some(log) => log.insert(now, print),
            None => self
                .logs
                .entry(client.to_string())
                .or_default()
                .insert(now, print),
        }
    }

    /// Every fingerprint of `client`'s log (for the session taking over).
    pub(crate) fn prints(&self, client: &str) -> HashSet<u64> {
        self.logs
            .get(client)
            .map(|l| l.set.clone())
            .unwrap_or_default()
    }

    /// The newest `most` fingerprints of `client`'s log, newest first; `None`
    /// without a log.
    pub(crate) fn newest(&self, client: &str, most: usize) -> Option<Vec<u64>> {
        let log = self.logs.get(client)?;
        Some(log.order.iter().rev().take(most).map(|&(_, p)| p).collect())
    }

    /// Forgets `client`'s log (its session ended).
    pub(crate) fn forget(&mut self, client: &str) {
        self.logs.remove(client);
    }

    /// Forgets the logs with nothing newer than [`SEEN_FOR`] as of `now`
    /// (sessions that ended or went quiet).
    pub(crate) fn prune(&mut self, now: Instant) {
        self.logs.retain(|_, log| !log.stale(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a clock the test gives: prints are kept for SEEN_FOR, newest
    /// first on request, and a quiet log goes.
    #[test]
    fn prints_are_kept_for_their_time_on_a_given_clock() {
        let t0 = Instant::now();
        let mut s = Seen::default();
        s.note("dev", 1, t0);
        s.note("dev", 2, t0 + Duration::from_secs(1));
        s.note("dev", 2, t0 + Duration::from_secs(2));
        assert_eq!(s.newest("dev", 10), Some(vec![2, 1]));
        assert_eq!(s.newest("dev", 1), Some(vec![2]));
        assert_eq!(s.prints("dev"), HashSet::from([1, 2]));
        // Past SEEN_FOR the oldest falls out as a new one comes.
        s.note("dev", 3, t0 + SEEN_FOR + Duration::from_millis(500));
        assert_eq!(s.prints("dev"), HashSet::from([2, 3]));
        s.prune(t0 + SEEN_FOR * 3);
        assert_eq!(s.newest("dev", 10), None);
        s.note("other", 9, t0);
        s.forget("other");
        assert!(s.prints("other").is_empty());
    }
}
