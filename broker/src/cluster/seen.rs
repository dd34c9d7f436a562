//! What each session was given lately, by message fingerprint: one
//! component that owns the logs, plain data in and out, given the time.
//! A node keeps one for every session it serves or keeps a copy of. When a
//! copy is promoted after its holder died, a publish held for the dead
//! holder and routed again is not given to the session a second time if
//! the holder had already put it in (a QoS 2 message must arrive once);
//! the log goes along whenever a session is sent whole.
//!
//! The rules for what a peer's copy brings (`Seen::copy_arrived`,
//! `Stash`, `apply_copy`) are here too, so that the broker's link reader
//! and the simulator run the same ones.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use mqlb_broker_core::effects::LogEntry;
use mqlb_broker_core::replicas::{Applied, Incoming, Replicas};
use mqlb_broker_core::session::SessionChange;

use super::wire::Frame;

/// How long a message is remembered: longer than a dead holder's held
/// publishes wait before they are routed again.
pub const SEEN_FOR: Duration = Duration::from_secs(20);

/// The most prints one [`Frame::Seen`] carries (the newest): well inside
/// the wire's frame limit (a subscriber given over 6,500 messages a second
/// for [`SEEN_FOR`] has the oldest left out).
pub const MAX_SEEN_PRINTS: usize = 1 << 17;

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
pub struct Seen {
    logs: HashMap<String, SeenLog>,
}

impl Seen {
    /// `client`'s session was given the message printed `print` at `now`.
    /// Allocates the client's name only for its first entry.
    pub fn note(&mut self, client: &str, print: u64, now: Instant) {
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
    pub fn prints(&self, client: &str) -> HashSet<u64> {
        self.logs
            .get(client)
            .map(|l| l.set.clone())
            .unwrap_or_default()
    }

    /// The newest `most` fingerprints of `client`'s log, newest first; `None`
    /// without a log.
    pub fn newest(&self, client: &str, most: usize) -> Option<Vec<u64>> {
        let log = self.logs.get(client)?;
        Some(log.order.iter().rev().take(most).map(|&(_, p)| p).collect())
    }

    /// Notes every print a chain member's `Seen` frame named for
    /// `client`.
    pub fn note_prints(&mut self, client: &str, prints: Vec<u64>, now: Instant) {
        for p in prints {
            self.note(client, p, now);
        }
    }

    /// Notes the messages `changes` gave `client`'s session.
    pub fn note_changes(&mut self, client: &str, changes: &[SessionChange], now: Instant) {
        for c in changes {
            if let SessionChange::Enqueued(p) | SessionChange::Sent { pending: p, .. } = c {
                self.note(client, crate::core::fingerprint(&p.msg), now);
            }
        }
    }

    /// A peer's copy of `client`'s session arrived with `prints` (its
    /// `Seen` frame, if one came just before it) and this node did
    /// `incoming` with it. A whole copy (`whole`: it begins with
    /// `Ended`) applied here brings its prints in place of the old copy's,
    /// which may name messages the new copy never had (taken as given,
    /// they were lost when sent again: found by the simulator); adopted
    /// messages add theirs; a refused copy's prints are refused with it.
    pub fn copy_arrived(
        &mut self,
        client: &str,
        prints: Option<Vec<u64>>,
        incoming: Incoming,
        whole: bool,
        now: Instant,
    ) {
        let Some(prints) = prints else {
            return;
        };
        match incoming {
            Incoming::Refuse => return,
            Incoming::Apply { .. } if whole => self.forget(client),
            Incoming::Apply { .. } | Incoming::Adopt => {}
        }
        self.note_prints(client, prints, now);
    }

    /// What `client`'s session was given lately, as a frame for a chain
    /// member about to get the session whole: the newest prints, as many
    /// as fit in a frame.
    pub fn frame(&self, client: &str) -> Option<Frame> {
        let prints = self.newest(client, MAX_SEEN_PRINTS)?;
        Some(Frame::Seen {
            client: client.to_string(),
            prints,
        })
    }

    /// Forgets `client`'s log (its session ended).
    pub fn forget(&mut self, client: &str) {
        self.logs.remove(client);
    }

    /// Forgets the logs with nothing newer than [`SEEN_FOR`] as of `now`
    /// (sessions that ended or went quiet).
    pub fn prune(&mut self, now: Instant) {
        self.logs.retain(|_, log| !log.stale(now));
    }
}

/// A link's last `Seen` frame, kept until the frame after it: when that
/// frame is the same session's copy, the prints go with the copy
/// ([`Seen::copy_arrived`]); otherwise they are noted beside what this
/// node had.
#[derive(Debug, Default)]
pub struct Stash(Option<(String, Vec<u64>)>);

impl Stash {
    /// A `Seen` frame arrived.
    pub fn hold(&mut self, client: String, prints: Vec<u64>) {
        self.0 = Some((client, prints));
    }

    /// Whether a `Seen` frame waits for the frame after it.
    pub fn holds(&self) -> bool {
        self.0.is_some()
    }

    /// The frame after it arrived, a copy of `copy_of`'s session if
    /// `Some`: returns the prints that go with that copy; any others are
    /// noted in `seen` now.
    pub fn next_frame(
        &mut self,
        copy_of: Option<&str>,
        seen: &mut Seen,
        now: Instant,
    ) -> Option<Vec<u64>> {
        let (client, prints) = self.0.take()?;
        if copy_of == Some(client.as_str()) {
            return Some(prints);
        }
        seen.note_prints(&client, prints, now);
        None
    }

    /// The link ended: a stashed frame no copy followed is noted.
    pub fn flush(&mut self, seen: &mut Seen, now: Instant) {
        self.next_frame(None, seen, now);
    }
}

/// Applies a chain member's `changes` to the copy this node keeps of
/// `client`'s session (`replication::apply_replica`, and the simulator's):
/// refused from an older epoch than the copy's; otherwise what they gave
/// the session is noted in `seen`, and a copy they end forgets its log.
/// Returns the entry for the node's ordered log when `logged` (a data
/// directory keeps copies); the caller numbers it while it still holds
/// the copies, so the disk has them in the order they were applied.
pub fn apply_copy(
    copies: &mut Replicas,
    seen: &mut Seen,
    client: &str,
    epoch: u64,
    changes: Vec<SessionChange>,
    logged: bool,
    now: Instant,
) -> Option<LogEntry> {
    if copies.epoch(client).is_some_and(|e| e > epoch) {
        return None;
    }
    let entry = logged.then(|| LogEntry::Replica {
        client: client.to_string(),
        epoch,
        changes: changes.clone(),
    });
    seen.note_changes(client, &changes, now);
    if copies.apply(client, epoch, changes, now) == Applied::Gone {
        seen.forget(client);
    }
    entry
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

    fn given(payload: &'static str) -> (SessionChange, u64) {
        let msg = crate::message::Message {
            topic: mqlb_protocol::MqttStr::try_from("t").expect("a valid topic"),
            payload: bytes::Bytes::from_static(payload.as_bytes()),
            qos: mqlb_protocol::QoS::ExactlyOnce,
            retain: false,
            properties: Default::default(),
            origin: None,
            received: Instant::now(),
        };
        let print = crate::core::fingerprint(&msg);
        let p = crate::message::Pending {
            msg,
            qos: mqlb_protocol::QoS::ExactlyOnce,
            sub_ids: Vec::new(),
            retain: false,
            shared: None,
        };
        (SessionChange::Enqueued(p), print)
    }

    /// A copy's prints: a whole copy applied replaces the log, adopted
    /// messages and changes add to it, a refused copy's are dropped.
    #[test]
    fn a_copys_prints_replace_add_or_are_refused() {
        let t0 = Instant::now();
        let whole_apply = Incoming::Apply { evict_first: false };
        let mut s = Seen::default();
        s.note_prints("dev", vec![1, 2], t0);
        s.copy_arrived("dev", Some(vec![3]), Incoming::Refuse, true, t0);
        assert_eq!(s.prints("dev"), HashSet::from([1, 2]), "refused");
        s.copy_arrived("dev", Some(vec![3]), Incoming::Adopt, true, t0);
        assert_eq!(s.prints("dev"), HashSet::from([1, 2, 3]), "adopted");
        s.copy_arrived("dev", Some(vec![4]), whole_apply, false, t0);
        assert_eq!(s.prints("dev"), HashSet::from([1, 2, 3, 4]), "changes");
        s.copy_arrived("dev", None, whole_apply, true, t0);
        assert_eq!(
            s.prints("dev").len(),
            4,
            "no prints came: nothing to replace"
        );
        s.copy_arrived("dev", Some(vec![9]), whole_apply, true, t0);
        assert_eq!(s.prints("dev"), HashSet::from([9]), "a whole copy replaces");
        assert_eq!(
            s.frame("dev"),
            Some(Frame::Seen {
                client: "dev".into(),
                prints: vec![9]
            })
        );
        assert_eq!(s.frame("other"), None);
    }

    /// A `Seen` frame goes with the copy of its session right after it;
    /// followed by anything else (or by the link's end) it is noted.
    #[test]
    fn a_stashed_frame_goes_with_the_next_copy_or_is_noted() {
        let t0 = Instant::now();
        let mut s = Seen::default();
        let mut stash = Stash::default();
        assert!(!stash.holds());
        assert_eq!(stash.next_frame(Some("dev"), &mut s, t0), None);
        stash.hold("dev".into(), vec![5]);
        assert!(stash.holds());
        assert_eq!(stash.next_frame(Some("dev"), &mut s, t0), Some(vec![5]));
        assert!(s.prints("dev").is_empty(), "the copy's caller notes them");
        stash.hold("dev".into(), vec![6]);
        assert_eq!(stash.next_frame(Some("other"), &mut s, t0), None);
        assert_eq!(s.prints("dev"), HashSet::from([6]));
        stash.hold("b".into(), vec![7]);
        stash.flush(&mut s, t0);
        assert!(!stash.holds());
        assert_eq!(s.prints("b"), HashSet::from([7]));
    }

    /// Applying a copy: an older epoch is refused (nothing noted); its
    /// messages are noted; the log entry comes only when asked for; an
    /// ended copy forgets its log.
    #[test]
    fn applying_a_copy_notes_what_it_gave_and_forgets_it_when_gone() {
        let t0 = Instant::now();
        let mut copies = Replicas::default();
        let mut s = Seen::default();
        let attach = SessionChange::Attached {
            epoch: 3,
            expiry: Some(Duration::from_secs(600)),
        };
        let (hello, print) = given("hello");
        let entry = apply_copy(&mut copies, &mut s, "dev", 3, vec![attach, hello], true, t0);
        assert!(matches!(entry, Some(LogEntry::Replica { epoch: 3, .. })));
        assert_eq!(s.prints("dev"), HashSet::from([print]));
        let (older, old_print) = given("older");
        assert!(apply_copy(&mut copies, &mut s, "dev", 2, vec![older], true, t0).is_none());
        assert!(!s.prints("dev").contains(&old_print), "refused: not noted");
        let ended = apply_copy(
            &mut copies,
            &mut s,
            "dev",
            3,
            vec![SessionChange::Ended],
            false,
            t0,
        );
        assert!(ended.is_none(), "no data directory: no entry");
        assert!(s.prints("dev").is_empty(), "gone with its copy");
        assert_eq!(copies.len(), 0);
    }
}
