//! The copies a node keeps of sessions that other nodes hold (it is a
//! member of their chains), and which node holds each: one component that
//! owns them, plain data in and out. It takes the time as an argument,
//! takes no lock and does no I/O; the broker's cluster keeps it behind one
//! mutex and does the sending, the logging and the promotions around it,
//! and the simulator (`mqlb-sim`) drives the same code on simulated time.

use crate::hashing::HashMap;
use std::time::{Duration, Instant};

use crate::router::NodeId;
use crate::session::{Progress, Session, SessionChange};
use crate::snapshot::SessionSnapshot;

/// What [`Replicas::apply`] did with a batch of changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The copy has a newer epoch than the writer's: nothing changed.
    Refused,
    /// Applied; the copy is still there.
    Kept,
    /// Applied, and the copy is now empty (the session ended): it is gone,
    /// with its holder.
    Gone,
}

/// Session copies kept for their holders.
#[derive(Debug, Default)]
pub struct Replicas {
    copies: HashMap<String, Session>,
    /// The node whose changes built each copy: the node serving the live
    /// session (see `Cluster::live_holder`). Set when a holder's frame
    /// names it, which may come before the copy's first change.
    holders: HashMap<String, NodeId>,
    /// Copies that came relayed (a peer's link snapshot of a copy it keeps
    /// for the holder) while their holder was live, and that the holder has
    /// not updated since, with when they came: such a copy stops where the
    /// peer's stood, and the peer may go on receiving the holder's changes
    /// (see [`Replicas::promotable`]); and the copies cut off from their
    /// holder ([`Replicas::unlinked_from`]).
    relayed: HashMap<String, Mark>,
}

/// Why a copy waits before it may be promoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// It came relayed at this time.
    Relayed(Instant),
    /// Its holder's stream to this node broke while this node was not in
    /// the view; since when the holder has left the view, if it has.
    CutOff(Option<Instant>),
}

/// Where the copy a node keeps of a session came from, for
/// [`keeps_snapshot_copy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Its holder updated it.
    Updated,
    /// A peer relayed it while the holder was live.
    Relayed,
    /// Its holder's stream to this node broke (see
    /// [`Replicas::unlinked_from`]).
    CutOff,
}

/// How long a relayed copy waits before it may be promoted without a
/// fresher one: a peer that keeps a copy the holder updated hands it over
/// when the view drops the holder ([`Replicas::orphans`]); this bounds the
/// wait if no such peer is left.
pub const RELAYED_WAIT: Duration = Duration::from_secs(2);

impl Replicas {
    /// Applies a holder's changes (made in `epoch`) to the copy of
    /// `client`'s session, at `now`; changes from an older epoch than the
    /// copy's are refused.
    pub fn apply(
        &mut self,
        client: &str,
        epoch: u64,
        changes: Vec<SessionChange>,
        now: Instant,
    ) -> Applied {
        let s = self.copies.entry(client.to_string()).or_default();
        if s.epoch > epoch {
            return Applied::Refused;
        }
        // Changes applied make the copy one its holder updated (a relayed
        // whole copy is marked again by the caller after this).
        if !self.relayed.is_empty() {
            self.relayed.remove(client);
        }
        for c in changes {
            if c == SessionChange::Ended {
                *s = Session::default();
            } else {
                s.apply(c, now);
            }
        }
        if *s == Session::default() {
            self.copies.remove(client);
            self.holders.remove(client);
            self.relayed.remove(client);
            return Applied::Gone;
        }
        Applied::Kept
    }

    /// Takes `client`'s copy out (it becomes the live session here), and
    /// forgets its holder.
    pub fn take(&mut self, client: &str) -> Option<Session> {
        self.holders.remove(client);
        self.relayed.remove(client);
        self.copies.remove(client)
    }

    /// Puts back copies read from the data directory; a copy already
    /// here as far along or further wins.
    pub fn restore(&mut self, sessions: Vec<(String, Session)>) {
        for (client, s) in sessions {
            if self
                .copies
                .get(&client)
                .is_some_and(|held| compared(held.progress()) >= compared(s.progress()))
            {
                continue;
            }
            self.copies.insert(client, s);
        }
    }

    /// Notes that `holder` serves `client`'s live session.
    pub fn set_holder(&mut self, client: &str, holder: NodeId) {
        self.holders.insert(client.to_string(), holder);
    }

    /// `holder`'s link snapshot sent, of the sessions it serves, only
    /// `held`: the copies naming it as holder that it did not send are of
    /// sessions it no longer serves (it restarted, or stepped down). They
    /// name no holder from now on, so their owner promotes them; a copy cut
    /// off from it waits `RELAYED_WAIT` from `now` for a fresher one. Found
    /// by the simulator: a restarted holder still counted as the live one,
    /// and the session was served nowhere until its client came back.
    /// Returns how many copies it freed.
    pub fn holder_serves_only(
        &mut self,
        holder: NodeId,
        held: &std::collections::HashSet<String>,
        now: Instant,
    ) -> usize {
        let gone: Vec<String> = self
            .holders
            .iter()
            .filter(|(c, h)| **h == holder && !held.contains(*c) && self.copies.contains_key(*c))
            .map(|(c, _)| c.clone())
            .collect();
        for c in &gone {
            self.holders.remove(c);
            if let Some(m) = self.relayed.get_mut(c) {
                if *m == Mark::CutOff(None) {
                    *m = Mark::CutOff(Some(now));
                }
            }
        }
        gone.len()
    }

    /// The node serving `client`'s live session, if this node keeps a copy
    /// of it and knows.
    pub fn holder(&self, client: &str) -> Option<NodeId> {
        if !self.copies.contains_key(client) {
            return None;
        }
        self.holders.get(client).copied()
    }

    /// The filters `client`'s copy subscribes to.
    pub fn filters(&self, client: &str) -> Vec<String> {
        self.copies
            .get(client)
            .map(|s| s.subs.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The epoch of `client`'s copy, if there is one.
    pub fn epoch(&self, client: &str) -> Option<u64> {
        self.copies.get(client).map(|s| s.epoch)
    }

    /// How many copies there are.
    pub fn len(&self) -> usize {
        self.copies.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    /// The clients whose copy names no holder that `live` counts (none, or
    /// one that is gone), without copying the others' names: what a node
    /// asks every tick (`unpromoted_copies`), with many copies and few or
    /// none of them orphaned.
    pub fn without_live_holder(&self, live: impl Fn(NodeId) -> bool) -> Vec<String> {
        self.copies
            .keys()
            .filter(|c| self.holders.get(*c).is_none_or(|h| !live(*h)))
            .cloned()
            .collect()
    }

    /// The copies this node owns (`owns`) whose holder is not live
    /// (`holder_live`; a copy whose holder is unknown has none), sorted:
    /// the sessions this node is to serve once it promotes them.
    pub fn orphans_owned(
        &self,
        owns: impl Fn(&str) -> bool,
        holder_live: impl Fn(NodeId) -> bool,
    ) -> Vec<String> {
        let mut out: Vec<String> = self
            .without_live_holder(holder_live)
            .into_iter()
            .filter(|c| owns(c))
            .collect();
        out.sort();
        out
    }

    /// Of [`Replicas::orphans_owned`], those that may be promoted at `now`
    /// ([`Replicas::promotable`]), sorted.
    pub fn to_promote(
        &self,
        now: Instant,
        owns: impl Fn(&str) -> bool,
        holder_live: impl Fn(NodeId) -> bool,
    ) -> Vec<String> {
        let mut out = self.orphans_owned(owns, holder_live);
        out.retain(|c| self.promotable(c, now));
        out
    }

    /// Whether one of [`Replicas::orphans_owned`] is a relayed copy still
    /// waiting for a fresher one (not [`Replicas::promotable`] at `now`):
    /// the node's word that it promoted its copies waits for it.
    pub fn owns_settling(
        &self,
        now: Instant,
        owns: impl Fn(&str) -> bool,
        holder_live: impl Fn(NodeId) -> bool,
    ) -> bool {
        self.copies.keys().any(|c| {
            self.is_relayed(c)
                && !self.promotable(c, now)
                && self.holders.get(c).is_none_or(|h| !holder_live(*h))
                && owns(c)
        })
    }

    /// Every client a copy is kept for.
    pub fn clients(&self) -> Vec<String> {
        self.copies.keys().cloned().collect()
    }

    /// Notes where `client`'s copy last came from: relayed by a peer while
    /// its holder was live (`Some(when)`), or from its holder, or relayed
    /// once the holder had left (`None`: no fresher copy can come).
    pub fn mark_relayed(&mut self, client: &str, since: Option<Instant>) {
        match since {
            Some(t) if self.copies.contains_key(client) => {
                self.relayed.insert(client.to_string(), Mark::Relayed(t));
            }
            _ => {
                self.relayed.remove(client);
            }
        }
    }

    /// Whether `client`'s copy is a relayed one still waiting for a
    /// fresher copy.
    pub fn is_relayed(&self, client: &str) -> bool {
        self.relayed.contains_key(client)
    }

    /// Whether `client`'s copy may become the live session at `now`: it
    /// came from its holder (or after the holder left), or it came relayed
    /// [`RELAYED_WAIT`] ago and nothing fresher came since. A relayed copy
    /// promoted at once could be older than the copy the relaying peer
    /// still keeps and updates: its owner would send completed QoS 2
    /// messages again and lose acknowledged ones (found by the simulator).
    pub fn promotable(&self, client: &str, now: Instant) -> bool {
        if crate::mutations::on(crate::mutations::Mutation::RelayedCopyPromotedAtOnce) {
            return self.copies.contains_key(client);
        }
        self.copies.contains_key(client)
            && self.relayed.get(client).is_none_or(|m| match m {
                Mark::Relayed(t) | Mark::CutOff(Some(t)) => {
                    now.saturating_duration_since(*t) >= RELAYED_WAIT
                }
                Mark::CutOff(None) => false,
            })
    }

    /// `client`'s copy, if there is one: how far along it is and where it
    /// came from.
    pub fn held(&self, client: &str) -> Option<(Progress, Held)> {
        let progress = self.copies.get(client)?.progress();
        let held = match self.relayed.get(client) {
            None => Held::Updated,
            Some(Mark::Relayed(_)) => Held::Relayed,
            Some(Mark::CutOff(_)) => Held::CutOff,
        };
        Some((progress, held))
    }

    /// The stream from `holder` to this node broke while this node was not
    /// a member of the view (a returning node, which holders stream to but
    /// do not wait for): its copies of `holder`'s sessions may miss
    /// changes committed meanwhile. Each waits, like a relayed copy, for
    /// the holder's changes or a fresher copy; once the holder has left
    /// the view, for at most [`RELAYED_WAIT`] (see `holders_left`). Found
    /// by the simulator: such a node joined the view, the holder died, and
    /// it promoted the stale copy while the old chain member handed the
    /// fresh one over.
    pub fn unlinked_from(&mut self, holder: NodeId) {
        if crate::mutations::on(crate::mutations::Mutation::CutOffCopyPromoted) {
            return;
        }
        for (c, h) in &self.holders {
            if *h == holder && self.copies.contains_key(c) {
                self.relayed.entry(c.clone()).or_insert(Mark::CutOff(None));
            }
        }
    }

    /// `gone` left the view at `now`: copies of theirs waiting for that
    /// (`unlinked_from`) wait [`RELAYED_WAIT`] more for a fresher copy, and
    /// so do relayed ones, however long ago they came: the chain member
    /// that relayed one went on getting the holder's changes until now, and
    /// hands its copy over now (`orphans`). Found by the simulator (seed
    /// 36151): a copy relayed 3 s before its holder hung was promoted at
    /// once when the view dropped the holder, before the member's fresher
    /// copy came; a QoS 2 message completed meanwhile was sent again.
    pub fn holders_left(&mut self, gone: &[NodeId], now: Instant) {
        for (c, mark) in &mut self.relayed {
            if !self.holders.get(c).is_some_and(|h| gone.contains(h)) {
                continue;
            }
            match mark {
                Mark::CutOff(None) => *mark = Mark::CutOff(Some(now)),
                Mark::Relayed(_)
                    if !crate::mutations::on(
                        crate::mutations::Mutation::RelayedWaitFromArrival,
                    ) =>
                {
                    *mark = Mark::Relayed(now);
                }
                _ => {}
            }
        }
    }

    /// The copies this node's holders updated (not relayed ones) whose
    /// holder `live` says is gone, as snapshots at `now` with their
    /// holders: handed to each session's new owner when the view drops the
    /// holder, so that the owner promotes the freshest copy.
    pub fn orphans(
        &self,
        live: impl Fn(NodeId) -> bool,
        now: Instant,
    ) -> Vec<(String, SessionSnapshot, NodeId)> {
        let mut out: Vec<(String, SessionSnapshot, NodeId)> = self
            .copies
            .iter()
            .filter(|(c, _)| !self.relayed.contains_key(*c))
            .filter_map(|(c, s)| {
                let h = *self.holders.get(c)?;
                (!live(h)).then(|| (c.clone(), crate::core::snapshot_of(s, now), h))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The copies `wanted` selects, as snapshots at `now`, with their
    /// holders.
    pub fn snapshots(
        &self,
        wanted: impl Fn(&str) -> bool,
        now: Instant,
    ) -> Vec<(String, SessionSnapshot, Option<NodeId>)> {
        self.copies
            .iter()
            .filter(|(c, _)| wanted(c))
            .map(|(c, s)| {
                (
                    c.clone(),
                    crate::core::snapshot_of(s, now),
                    self.holders.get(c).copied(),
                )
            })
            .collect()
    }
}

/// Where the holder a relayed copy names stands, for
/// [`keeps_snapshot_copy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderNow {
    /// It has left the view: the copy is a chain member's, final.
    Left,
    /// It is in the view.
    Live,
    /// It is in the view and its changes built the copy this node has: its
    /// own stream brings every change, in order.
    Streaming,
}

/// Whether a node keeps the whole copy of a session a peer's link snapshot
/// sent it. `relayed`: the peer is not the session's holder (it sends a
/// copy it keeps for another); `held`: the copy this node has, if any: how
/// far along it is, and where it came from; `copy`: how far along the one
/// sent is; `serving`: this node serves the session live; `holder`: where
/// the session's holder stands.
///
/// A relayed copy may be older than the one the holder itself gave this
/// node: one that is not further along does not replace it (a stale copy
/// promoted later would send a QoS 2 message again that was completed).
/// One further along does (a copy read back from a data directory, whose
/// holder went on with another member meanwhile, found by the simulator),
/// but never while the holder that built the copy here is live: its
/// changes still on their way were made before the relayed copy was taken,
/// and applied to it again they would put messages in twice and take
/// others out (found by the simulator, seed 99316: a stalled node got a
/// peer's relayed copy before its holder's older changes). It does replace
/// a relayed copy that is not further along. A copy cut off from its
/// holder is replaced by one of the same epoch once the holder has left
/// (then the peer's copy is final, a chain member's, handed over), or
/// by one further along.
/// And a copy of a session served here is a peer relaying back what it was
/// given: kept, it would go out in this node's own snapshots after the live
/// session, naming this node as holder, and replace the fresh copy there
/// (found by the simulator).
pub fn keeps_snapshot_copy(
    relayed: bool,
    held: Option<(Progress, Held)>,
    copy: Progress,
    serving: bool,
    holder: HolderNow,
) -> bool {
    if serving && !crate::mutations::on(crate::mutations::Mutation::SnapshotCopyOfLiveSession) {
        return false;
    }
    let copy = compared(copy);
    match (relayed, held.map(|(h, kind)| (compared(h), kind))) {
        (false, _) | (true, None) => true,
        (true, Some((h, Held::Relayed))) => h <= copy,
        (true, Some((h, Held::Updated))) => h < copy && holder != HolderNow::Streaming,
        (true, Some((h, Held::CutOff))) => {
            h < copy || (h.epoch == copy.epoch && holder == HolderNow::Left)
        }
    }
}

/// A peer's copy of a session (a `Replicate` frame) as it reaches this
/// node, with what this node knows of the session's holder.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    epoch: u64,
    changes: &'a [SessionChange],
    from_holder: bool,
    holder: Option<NodeId>,
    /// Only for a relayed whole copy ([`Arrival::new`]).
    relay: Option<Relay>,
}

/// What decides whether a relayed whole copy is kept, read by the caller
/// only for one (it takes the view and the core's lock).
#[derive(Debug, Clone, Copy)]
pub struct Relay {
    /// The named holder is a member of the committed view.
    pub holder_in_view: bool,
    /// This node has a committed view. Without one (a process started
    /// without a data directory holds a view naming only itself, numbered
    /// 0, until the leader catches it up) it cannot tell that the holder
    /// left: a holder not in that view counts as live when the copy is
    /// judged, so only a copy further along replaces this node's (found by
    /// the simulator: a copy behind the one this node had replaced it, and
    /// was promoted).
    pub view_known: bool,
    /// This node serves the session live.
    pub serving: bool,
}

impl<'a> Arrival<'a> {
    /// `seq`: the frame's number (0: part of the sender's link snapshot,
    /// which is not answered); `from_holder`: the sender is the holder the
    /// frame names (it serves the session), else it relays a copy it keeps
    /// for another; `holder`: the named holder's id here, if known;
    /// `relay`: read only when the copy is a relayed whole one, before the
    /// caller takes the copies' lock.
    pub fn new(
        seq: u64,
        epoch: u64,
        changes: &'a [SessionChange],
        from_holder: bool,
        holder: Option<NodeId>,
        relay: impl FnOnce() -> Relay,
    ) -> Arrival<'a> {
        let whole = changes.first() == Some(&SessionChange::Ended);
        let relayed = seq == 0 && whole && !from_holder;
        Arrival {
            epoch,
            changes,
            from_holder,
            holder,
            relay: relayed.then(relay),
        }
    }
}

/// What a node does with an [`Arrival`] before (and around) applying it
/// ([`Replicas::arrive`]), the same in the broker's link reader and in
/// the simulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arriving {
    /// A relayed whole copy this node does not keep
    /// ([`keeps_snapshot_copy`]): dropped, with the prints that came with
    /// it, unanswered (a snapshot's frames are not answered).
    Dropped,
    /// Applied (by [`incoming`]'s rule), and then:
    Taken {
        /// The session is whole in its holder's link snapshot: the holder
        /// serves it ([`Replicas::holder_serves_only`] at the snapshot's
        /// end).
        in_holders_snapshot: bool,
        /// A relayed whole copy: marked so after it is applied
        /// ([`Replicas::mark_relayed`]), with the time it was taken while
        /// its holder is live (it waits before it may be promoted).
        relayed: Option<Option<Instant>>,
        /// A relayed copy's filters, counted as its holder's interest
        /// (not when it names this node: an earlier incarnation of it held
        /// the session, and a node is no peer of its own).
        interest: Option<(NodeId, Vec<String>)>,
    },
}

impl Replicas {
    /// Decides what `a`, a copy of `client`'s session, does here, and
    /// notes its holder (`me`: this node's id; `now`: reads the time, only
    /// for a relayed copy: a chain member's copies, one a frame, need no
    /// clock). See [`Arriving`].
    pub fn arrive(
        &mut self,
        client: &str,
        a: &Arrival<'_>,
        me: NodeId,
        now: impl FnOnce() -> Instant,
    ) -> Arriving {
        if let Some(r) = a.relay {
            let built_by = self.holder(client);
            let holder_now = if !r.holder_in_view && r.view_known {
                HolderNow::Left
            } else if !r.holder_in_view {
                HolderNow::Live
            } else if built_by.is_some() && built_by == a.holder {
                HolderNow::Streaming
            } else {
                HolderNow::Live
            };
            let copy = progress_of(a.epoch, a.changes);
            if !keeps_snapshot_copy(true, self.held(client), copy, r.serving, holder_now) {
                return Arriving::Dropped;
            }
        }
        if let Some(h) = a.holder {
            self.set_holder(client, h);
        }
        let whole = a.changes.first() == Some(&SessionChange::Ended);
        Arriving::Taken {
            in_holders_snapshot: whole && a.from_holder,
            relayed: a.relay.map(|r| r.holder_in_view.then(now)),
            interest: a
                .holder
                .filter(|&h| a.relay.is_some() && h != me)
                .map(|h| (h, filters_of(a.changes))),
        }
    }
}

/// `p` as copies are compared: by epoch and changes (by epoch alone with
/// the `CopiesOfOneEpochAlike` mutation on).
fn compared(p: Progress) -> Progress {
    if crate::mutations::on(crate::mutations::Mutation::CopiesOfOneEpochAlike) {
        return Progress { changes: 0, ..p };
    }
    p
}

/// What a node does with a holder's changes to a session (a `Replicate`
/// frame), by what it has of that session itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// Applied to this node's copy. `evict_first`: this node served the
    /// session in an older epoch (its client has since moved to the
    /// writer), so its own session gives way to the copy.
    Apply {
        /// Drop the session served here first.
        evict_first: bool,
    },
    /// This node serves the session in a newer epoch: the writer has not
    /// yet heard that the session moved here. Its bookkeeping is refused,
    /// but the messages it accepted for the session (and its inbound QoS 2
    /// ids) are adopted: a QoS 1 duplicate is possible, losing them is not.
    Adopt,
    /// A copy of a session this node serves, connected, in the same epoch:
    /// refused.
    Refuse,
}

/// [`Incoming`] for changes made in `epoch`, this node serving the session
/// in `held` (`None`: not at all), its client `connected` here or not.
pub fn incoming(held: Option<u64>, connected: bool, epoch: u64) -> Incoming {
    match held {
        None => Incoming::Apply { evict_first: false },
        Some(mine) if mine > epoch => Incoming::Adopt,
        Some(mine) if mine < epoch => Incoming::Apply { evict_first: true },
        Some(_) if !connected => Incoming::Apply { evict_first: false },
        Some(_) => Incoming::Refuse,
    }
}

/// How far along the session a run of changes for it leaves a copy, when
/// the run is a whole copy (it ends with its count) made in `epoch`.
pub fn progress_of(epoch: u64, changes: &[SessionChange]) -> Progress {
    let changes = changes
        .iter()
        .rev()
        .find_map(|c| match c {
            SessionChange::Counted(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0);
    Progress { epoch, changes }
}

/// A batch's session records as one run of changes per session, in order:
/// what a holder sends each chain member (one `Replicate` frame per run),
/// with the epoch the run was made in (the newest its records or an attach
/// name).
pub fn runs(
    records: Vec<crate::effects::ChangeRecord>,
) -> Vec<(std::sync::Arc<str>, u64, Vec<SessionChange>)> {
    // The changes are moved, not cloned: a queued message is most of a
    // record (found by counting instructions across nodes).
    let mut out: Vec<(std::sync::Arc<str>, u64, Vec<SessionChange>)> = Vec::new();
    for r in records {
        let mut epoch = r.epoch;
        if let SessionChange::Attached { epoch: e, .. } = &r.change {
            epoch = epoch.max(*e);
        }
        match out.last_mut() {
            Some((client, run_epoch, changes)) if *client == r.client => {
                *run_epoch = (*run_epoch).max(epoch);
                changes.push(r.change);
            }
            _ => out.push((r.client, epoch, vec![r.change])),
        }
    }
    out
}

/// The filters a whole copy's session holds. A node given a copy relayed
/// (not by its holder) notes them as the holder's interest: it may never
/// have linked with the holder (it returned just before the holder died),
/// and a publish it routes for the copy's session before promoting it must
/// be held for the takeover, not routed to nobody (found by the simulator).
pub fn filters_of(changes: &[SessionChange]) -> Vec<String> {
    changes
        .iter()
        .filter_map(|c| match c {
            SessionChange::Subscribed { filter, .. } => Some(filter.clone()),
            _ => None,
        })
        .collect()
}

/// The changes that make a copy of a session equal to `snap`, whatever the
/// copy held before: how a holder sends a session whole (a new chain
/// member, a re-chain, a link's snapshot), at `now`.
pub fn whole(snap: SessionSnapshot, now: Instant) -> Vec<SessionChange> {
    let mut out = vec![SessionChange::Ended];
    out.extend(crate::core::snapshot_changes(
        snap,
        now,
        std::sync::Arc::from,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_holders_changes_are_applied_adopted_or_refused_by_epoch() {
        let apply = |evict_first| Incoming::Apply { evict_first };
        // Not served here: a copy.
        assert_eq!(incoming(None, false, 3), apply(false));
        // Served here in a newer epoch: the writer is behind.
        assert_eq!(incoming(Some(4), true, 3), Incoming::Adopt);
        assert_eq!(incoming(Some(4), false, 3), Incoming::Adopt);
        // Served here in an older epoch: the session moved on.
        assert_eq!(incoming(Some(2), true, 3), apply(true));
        assert_eq!(incoming(Some(2), false, 3), apply(true));
        // The same epoch: a copy of the live session is refused, one whose
        // client is gone is kept up to date.
        assert_eq!(incoming(Some(3), true, 3), Incoming::Refuse);
        assert_eq!(incoming(Some(3), false, 3), apply(false));
    }

    fn attach(epoch: u64) -> SessionChange {
        SessionChange::Attached {
            epoch,
            expiry: Some(Duration::from_secs(600)),
        }
    }

    /// What a peer's copy does on arrival: a holder's own changes and
    /// snapshot copies are taken (noting the holder); a relayed whole copy
    /// is kept or dropped by `keeps_snapshot_copy`, waits while its holder
    /// is live, and brings its filters as the holder's interest (not when
    /// it names this node). The relay's facts are read for relayed copies
    /// only.
    #[test]
    fn a_peers_copy_is_taken_relayed_or_dropped_on_arrival() {
        let now = Instant::now();
        let me = 1;
        let sub = SessionChange::Subscribed {
            filter: "a/#".into(),
            sub: crate::message::Sub::node(),
        };
        let whole = vec![
            SessionChange::Ended,
            attach(3),
            sub,
            SessionChange::Counted(2),
        ];
        let unread = || -> Relay { panic!("read for a copy that is not relayed") };
        let taken = |snap: bool, relayed, interest| Arriving::Taken {
            in_holders_snapshot: snap,
            relayed,
            interest,
        };
        let mut r = Replicas::default();
        // The holder's own changes, then its snapshot's whole copy.
        let changes = [attach(3)];
        let a = Arrival::new(7, 3, &changes, true, Some(2), unread);
        assert_eq!(r.arrive("dev", &a, me, || now), taken(false, None, None));
        r.apply("dev", 3, changes.to_vec(), now);
        assert_eq!(r.holder("dev"), Some(2));
        let a = Arrival::new(0, 3, &whole, true, Some(2), unread);
        assert_eq!(r.arrive("dev", &a, me, || now), taken(true, None, None));
        // Relayed by another node, the holder live and its own stream
        // building the copy here: dropped, however far along.
        let relay = |holder_in_view, serving| {
            move || Relay {
                holder_in_view,
                view_known: true,
                serving,
            }
        };
        let a = Arrival::new(0, 3, &whole, false, Some(2), relay(true, false));
        assert_eq!(r.arrive("dev", &a, me, || now), Arriving::Dropped);
        // The holder gone from the view: a copy further along is kept,
        // with no wait, and its filters count as the holder's.
        let a = Arrival::new(0, 3, &whole, false, Some(2), relay(false, false));
        let interest = Some((2, vec!["a/#".to_string()]));
        assert_eq!(
            r.arrive("dev", &a, me, || now),
            taken(false, Some(None), interest.clone())
        );
        // No copy here yet and the holder live: kept, waiting from now.
        let a = Arrival::new(0, 3, &whole, false, Some(2), relay(true, false));
        assert_eq!(
            r.arrive("new", &a, me, || now),
            taken(false, Some(Some(now)), interest)
        );
        // Naming this node: no interest of its own.
        let a = Arrival::new(0, 3, &whole, false, Some(me), relay(true, false));
        assert_eq!(
            r.arrive("mine", &a, me, || now),
            taken(false, Some(Some(now)), None)
        );
        // A session served here live: dropped.
        let a = Arrival::new(0, 3, &whole, false, Some(2), relay(true, true));
        assert_eq!(r.arrive("live", &a, me, || now), Arriving::Dropped);
        assert_eq!(r.holder("live"), None);
    }

    /// Driven on a clock the test gives: a copy follows its holder's
    /// changes, refuses an older epoch's, and goes (with its holder) when
    /// the session ends; a promotion takes it out.
    #[test]
    fn copies_follow_their_holder_on_a_given_clock() {
        let t0 = Instant::now();
        let mut r = Replicas::default();
        r.set_holder("dev", 2);
        assert_eq!(r.holder("dev"), None, "no copy yet");
        assert_eq!(
            r.apply("dev", 3, vec![attach(3), SessionChange::Detached], t0),
            Applied::Kept
        );
        assert_eq!((r.epoch("dev"), r.holder("dev")), (Some(3), Some(2)));
        // A stale writer (an older epoch) changes nothing.
        assert_eq!(
            r.apply("dev", 2, vec![SessionChange::Ended], t0),
            Applied::Refused
        );
        assert_eq!(r.epoch("dev"), Some(3));
        let later = t0 + Duration::from_secs(5);
        let snaps = r.snapshots(|c| c == "dev", later);
        assert_eq!(snaps.len(), 1);
        assert_eq!((snaps[0].1.epoch, snaps[0].2), (3, Some(2)));
        assert!(r.snapshots(|_| false, later).is_empty());
        // Ended: the copy and its holder go.
        assert_eq!(
            r.apply("dev", 3, vec![SessionChange::Ended], later),
            Applied::Gone
        );
        assert_eq!((r.len(), r.holder("dev")), (0, None));
        // Restored copies: the newer epoch wins; a promotion takes it.
        r.apply("a", 5, vec![attach(5)], later);
        let mut old = Session::default();
        old.apply(attach(4), later);
        let mut new = Session::default();
        new.apply(attach(6), later);
        r.restore(vec![("a".into(), old), ("b".into(), new)]);
        assert_eq!((r.epoch("a"), r.epoch("b")), (Some(5), Some(6)));
        let mut clients = r.clients();
        clients.sort();
        assert_eq!(clients, ["a", "b"]);
        assert_eq!(r.take("a").map(|s| s.epoch), Some(5));
        assert_eq!(r.epoch("a"), None);
    }

    /// A relayed copy waits before it may be promoted; one its holder
    /// updated may be promoted at once; the wait ends after RELAYED_WAIT
    /// or when the holder's changes come.
    #[test]
    fn a_relayed_copy_waits_before_it_may_be_promoted() {
        let t0 = Instant::now();
        let mut r = Replicas::default();
        r.apply("dev", 3, vec![attach(3)], t0);
        assert!(r.promotable("dev", t0), "a copy the holder updated");
        r.mark_relayed("dev", Some(t0));
        assert!(r.is_relayed("dev"));
        assert!(!r.promotable("dev", t0 + RELAYED_WAIT / 2));
        assert!(r.promotable("dev", t0 + RELAYED_WAIT));
        // The holder's next change makes it a copy the holder updated.
        r.apply("dev", 3, vec![SessionChange::Detached], t0);
        assert!(!r.is_relayed("dev"));
        assert!(r.promotable("dev", t0));
        // Relayed once the holder had left: nothing fresher can come.
        r.mark_relayed("dev", None);
        assert!(r.promotable("dev", t0));
        // No copy, nothing to promote or mark.
        r.mark_relayed("none", Some(t0));
        assert!(!r.promotable("none", t0) && !r.is_relayed("none"));
    }

    /// The copies a node is to promote: those it owns whose holder is not
    /// live, once each may be; a relayed one still waiting holds back the
    /// node's word that it promoted its copies.
    #[test]
    fn the_copies_to_promote_are_owned_orphans_that_may_be() {
        let t0 = Instant::now();
        let mut r = Replicas::default();
        for (c, h) in [("d", 1), ("c", 2), ("b", 2), ("a", 3)] {
            r.set_holder(c, h);
            r.apply(c, 1, vec![attach(1)], t0);
        }
        r.apply("e", 1, vec![attach(1)], t0); // no holder known
        r.mark_relayed("b", Some(t0));
        // Node 2 is gone, 1 and 3 live; this node owns all but "a".
        let owns = |c: &str| c != "a";
        let live = |h: NodeId| h != 2;
        assert_eq!(r.orphans_owned(owns, live), ["b", "c", "e"]);
        assert_eq!(r.to_promote(t0, owns, live), ["c", "e"]);
        assert!(r.owns_settling(t0, owns, live));
        // Once the relayed copy's wait is over it is promoted too.
        let later = t0 + RELAYED_WAIT;
        assert_eq!(r.to_promote(later, owns, live), ["b", "c", "e"]);
        assert!(!r.owns_settling(later, owns, live));
        // A relayed copy another node owns, or whose holder lives, is not
        // this node's to wait for.
        assert!(!r.owns_settling(t0, |c| c != "b", live));
        assert!(!r.owns_settling(t0, owns, |_| true));
        // With every holder live only the copy without one is an orphan.
        assert_eq!(r.to_promote(t0, owns, |_| true), ["e"]);
    }

    /// A copy whose holder's stream broke while this node was not in the
    /// view waits: for the holder's changes, or, once the holder has left
    /// the view, RELAYED_WAIT for a fresher copy. It is not handed on.
    #[test]
    fn a_copy_cut_off_from_its_holder_waits_for_a_fresher_one() {
        let t0 = Instant::now();
        let mut r = Replicas::default();
        for (c, h) in [("a", 1), ("b", 2)] {
            r.set_holder(c, h);
            r.apply(c, 4, vec![attach(4)], t0);
        }
        r.unlinked_from(1);
        assert!(r.is_relayed("a") && !r.is_relayed("b"));
        let one = Progress {
            epoch: 4,
            changes: 1,
        };
        assert_eq!(r.held("a"), Some((one, Held::CutOff)));
        assert_eq!(r.held("b"), Some((one, Held::Updated)));
        let later = t0 + RELAYED_WAIT * 10;
        assert!(!r.promotable("a", later), "waits while its holder lives");
        assert!(r.orphans(|h| h != 1, t0).is_empty());
        r.holders_left(&[2], t0);
        assert!(!r.promotable("a", later), "another holder left");
        r.holders_left(&[1], t0);
        assert!(!r.promotable("a", t0 + RELAYED_WAIT / 2));
        assert!(r.promotable("a", t0 + RELAYED_WAIT));
        // A holder's change (or a fresher whole copy) ends the wait.
        r.unlinked_from(1);
        r.apply("a", 4, vec![SessionChange::Detached], t0);
        assert!(r.promotable("a", t0));
    }

    /// Without a committed view a relayed copy's holder cannot be known to
    /// have left: a copy cut off from its holder is replaced only by one
    /// further along, not by one of its epoch that is behind it (which,
    /// once the view is known and the holder has left, is the chain
    /// member's final copy and does replace it).
    #[test]
    fn without_a_view_a_relayed_copy_behind_does_not_replace_a_cut_off_one() {
        let t0 = Instant::now();
        let me = 0;
        let ahead = vec![attach(4), SessionChange::Detached];
        let judged = |view_known| {
            let mut r = Replicas::default();
            r.set_holder("s", 1);
            r.apply("s", 4, ahead.clone(), t0);
            r.unlinked_from(1);
            let behind = vec![SessionChange::Ended, attach(4), SessionChange::Counted(1)];
            let a = Arrival::new(0, 4, &behind, false, Some(1), move || Relay {
                holder_in_view: false,
                view_known,
                serving: false,
            });
            r.arrive("s", &a, me, || t0)
        };
        assert_eq!(judged(false), Arriving::Dropped, "no view: kept its own");
        assert_ne!(
            judged(true),
            Arriving::Dropped,
            "holder left: the final copy"
        );
    }

    /// A holder's link snapshot that does not send a session as its own
    /// frees the copies naming it (it restarted): they name no holder, and
    /// a cut-off one starts its wait.
    #[test]
    fn copies_a_holder_no_longer_serves_name_no_holder() {
        let t0 = Instant::now();
        let mut r = Replicas::default();
        for (c, h) in [("kept", 1), ("dropped", 1), ("cut", 1), ("other", 2)] {
            r.set_holder(c, h);
            r.apply(c, 4, vec![attach(4)], t0);
        }
        r.unlinked_from(1);
        let held = std::collections::HashSet::from(["kept".to_string()]);
        assert_eq!(r.holder_serves_only(1, &held, t0), 2);
        assert_eq!(r.holder("kept"), Some(1));
        assert_eq!(r.holder("dropped"), None);
        assert_eq!(r.holder("other"), Some(2));
        assert!(!r.promotable("cut", t0), "waits for a fresher copy");
        assert!(r.promotable("cut", t0 + RELAYED_WAIT));
    }

    /// Orphans: the copies the holder updated whose holder is gone, with
    /// the holder; relayed ones are not handed on.
    #[test]
    fn orphans_are_the_updated_copies_of_a_gone_holder() {
        let t0 = Instant::now();
        let mut r = Replicas::default();
        for (c, h) in [("a", 1), ("b", 2), ("c", 1)] {
            r.set_holder(c, h);
            r.apply(c, 4, vec![attach(4)], t0);
        }
        r.mark_relayed("c", Some(t0));
        let o = r.orphans(|h| h != 1, t0);
        let names: Vec<(&str, u64, NodeId)> = o
            .iter()
            .map(|(c, s, h)| (c.as_str(), s.epoch, *h))
            .collect();
        assert_eq!(names, [("a", 4, 1)]);
        assert!(r.orphans(|_| true, t0).is_empty());
    }

    /// Copies without a live holder: none named, or one `live` says is
    /// gone.
    #[test]
    fn copies_without_a_live_holder() {
        let t0 = Instant::now();
        let mut r = Replicas::default();
        for (c, holder) in [("a", Some(1)), ("b", Some(2)), ("c", None)] {
            if let Some(h) = holder {
                r.set_holder(c, h);
            }
            r.apply(c, 1, vec![attach(1)], t0);
        }
        let mut orphans = r.without_live_holder(|h| h == 1);
        orphans.sort();
        assert_eq!(orphans, ["b", "c"]);
        assert!(r.without_live_holder(|_| false).len() == 3);
    }

    /// Which link-snapshot copies a node keeps.
    #[test]
    fn snapshot_copies_kept_or_not() {
        use HolderNow::{Left, Live, Streaming};
        let at = |epoch, changes| Progress { epoch, changes };
        // From the holder: kept (epochs are the apply's business).
        let up = Held::Updated;
        assert!(keeps_snapshot_copy(
            false,
            Some((at(5, 9), up)),
            at(4, 1),
            false,
            Live
        ));
        // Relayed, no copy here: kept.
        assert!(keeps_snapshot_copy(true, None, at(4, 1), false, Live));
        // Relayed over a copy the holder updated: only one further along
        // (a newer epoch, or more changes in it), and never while that
        // holder is live (its stream brings the changes).
        assert!(!keeps_snapshot_copy(
            true,
            Some((at(4, 7), up)),
            at(4, 7),
            false,
            Left
        ));
        assert!(!keeps_snapshot_copy(
            true,
            Some((at(4, 7), up)),
            at(4, 6),
            false,
            Left
        ));
        assert!(keeps_snapshot_copy(
            true,
            Some((at(4, 7), up)),
            at(4, 8),
            false,
            Left
        ));
        assert!(keeps_snapshot_copy(
            true,
            Some((at(4, 7), up)),
            at(4, 8),
            false,
            Live
        ));
        assert!(keeps_snapshot_copy(
            true,
            Some((at(4, 7), up)),
            at(5, 1),
            false,
            Live
        ));
        assert!(keeps_snapshot_copy(
            true,
            Some((at(4, 7), up)),
            at(5, 1),
            false,
            Left
        ));
        for copy in [at(5, 1), at(4, 8)] {
            assert!(!keeps_snapshot_copy(
                true,
                Some((at(4, 7), up)),
                copy,
                false,
                Streaming
            ));
        }
        // Relayed over a relayed copy: one as far along or further.
        let re = Held::Relayed;
        assert!(keeps_snapshot_copy(
            true,
            Some((at(4, 3), re)),
            at(4, 3),
            false,
            Live
        ));
        assert!(!keeps_snapshot_copy(
            true,
            Some((at(4, 3), re)),
            at(4, 2),
            false,
            Live
        ));
        assert!(!keeps_snapshot_copy(
            true,
            Some((at(5, 1), re)),
            at(4, 9),
            false,
            Live
        ));
        // Over a copy cut off from its holder: at the same epoch once the
        // holder has left, or further along.
        let cut = Held::CutOff;
        assert!(!keeps_snapshot_copy(
            true,
            Some((at(4, 3), cut)),
            at(4, 3),
            false,
            Live
        ));
        assert!(!keeps_snapshot_copy(
            true,
            Some((at(4, 3), cut)),
            at(4, 3),
            false,
            Streaming
        ));
        assert!(keeps_snapshot_copy(
            true,
            Some((at(4, 3), cut)),
            at(4, 2),
            false,
            Left
        ));
        assert!(keeps_snapshot_copy(
            true,
            Some((at(4, 3), cut)),
            at(4, 4),
            false,
            Live
        ));
        assert!(keeps_snapshot_copy(
            true,
            Some((at(4, 3), cut)),
            at(5, 1),
            false,
            Live
        ));
        // A session served here: never.
        assert!(!keeps_snapshot_copy(true, None, at(9, 1), true, Left));
    }

    /// A copy counts its holder's changes, and a whole copy counts as far
    /// as the session it was taken from: two members' copies of one epoch
    /// say which is further along; a restored copy yields to one that is.
    #[test]
    fn copies_count_how_far_along_their_epoch_they_are() {
        let t0 = Instant::now();
        let mut r = Replicas::default();
        r.apply("a", 4, vec![attach(4), SessionChange::Detached], t0);
        assert_eq!(
            r.held("a").map(|h| h.0),
            Some(Progress {
                epoch: 4,
                changes: 2
            })
        );
        // A whole copy of a session five changes along.
        let mut live = Session::default();
        for c in [
            attach(4),
            SessionChange::Detached,
            SessionChange::PidCursor(3),
        ] {
            live.apply(c, t0);
        }
        live.apply(SessionChange::ExpirySet(None), t0);
        live.apply(SessionChange::Detached, t0);
        assert_eq!(live.changes, 5);
        let changes = whole(crate::core::snapshot_of(&live, t0), t0);
        assert_eq!(progress_of(4, &changes), live.progress());
        r.apply("b", 4, changes, t0);
        assert_eq!(r.held("b").map(|h| h.0), Some(live.progress()));
        // Restored copies: one further along replaces, one behind does not.
        let mut behind = Session::default();
        behind.apply(attach(4), t0);
        let mut ahead = live.clone();
        ahead.apply(SessionChange::Detached, t0);
        r.restore(vec![("a".into(), ahead.clone()), ("b".into(), behind)]);
        assert_eq!(r.held("a").map(|h| h.0), Some(ahead.progress()));
        assert_eq!(r.held("b").map(|h| h.0), Some(live.progress()));
        // An end starts over; a run without a count is at 0.
        assert_eq!(progress_of(7, &[SessionChange::Ended]).changes, 0);
        assert_eq!(
            r.apply("a", 4, vec![SessionChange::Ended], t0),
            Applied::Gone
        );
    }

    #[test]
    fn a_copys_filters() {
        let sub = crate::message::Sub::node();
        let changes = vec![
            SessionChange::Ended,
            attach(2),
            SessionChange::Subscribed {
                filter: "a/#".into(),
                sub,
            },
            SessionChange::Subscribed {
                filter: "$share/g/b".into(),
                sub,
            },
            SessionChange::Detached,
        ];
        assert_eq!(filters_of(&changes), ["a/#", "$share/g/b"]);
        assert!(filters_of(&[SessionChange::Ended]).is_empty());
    }

    /// One run per session, in order, with the newest epoch an attach or a
    /// record names.
    #[test]
    fn a_batch_is_one_run_per_session() {
        use crate::effects::ChangeRecord;
        let rec = |c: &str, epoch, change| ChangeRecord {
            client: std::sync::Arc::from(c),
            epoch,
            change,
        };
        let records = vec![
            rec("a", 1, SessionChange::Detached),
            rec("a", 1, attach(2)),
            rec("b", 4, SessionChange::Detached),
            rec("a", 2, SessionChange::Detached),
        ];
        let runs: Vec<(String, u64, usize)> = runs(records)
            .into_iter()
            .map(|(c, e, ch)| (c.to_string(), e, ch.len()))
            .collect();
        assert_eq!(
            runs,
            [("a".into(), 2, 2), ("b".into(), 4, 1), ("a".into(), 2, 1)]
        );
        assert!(super::runs(Vec::new()).is_empty());
    }
}
