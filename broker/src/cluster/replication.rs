//! Session replication down chains: the change log that streams each
//! persistent session's records to the other member of its chain and
//! commits once it has applied them; the replica copies a node keeps for
//! others; promotion when a holder dies; re-chaining after a view change;
//! stepping down without a majority.

use super::*;
use crate::commits::Released;

impl Cluster {
    /// Before serving `client_id` here: if this node holds a replica of its
    /// session and not the session itself, the replica becomes the session
    /// (its records then stream to the rest of the chain).
    pub fn promote(&self, client_id: &str, state: &State) {
        // One promotion at a time, whole: between taking the copy out and
        // importing it neither the copies nor the core hold the session,
        // and a client of it connecting then (`conn::place` finds no
        // session and no copy) was served a new, empty one while the
        // tick's promotion, finding a session, dropped the copy: the
        // session and every message queued in it were lost (seen in the
        // cluster tests after a kill of the leader, 2 runs in 22 with
        // trace logging slowing the core's lock). The connection calls
        // this before it attaches, so it waits here for a promotion under
        // way and then finds the session.
        let _one = lock(&self.promoting);
        let (session, ticket) = {
            let mut replicas = lock(&self.replicas);
            let Some(session) = replicas.take(client_id) else {
                return;
            };
            // The disk's copy goes too (numbered under the copies' lock,
            // before the session's own records below): a restart must not
            // find it after the session ended.
            let ticket = state.disk().is_some().then_some(()).and_then(|()| {
                state.sequence(vec![LogEntry::Replica {
                    client: client_id.to_string(),
                    epoch: session.epoch,
                    changes: vec![SessionChange::Ended],
                }])
            });
            (session, ticket)
        };
        drop(state.commit(ticket));
        // The log stays: this node now adds what it gives the session, and
        // sends it along whenever it sends the session whole.
        let seen = lock(&self.replica_seen).prints(client_id);
        // A takeover starts a new epoch, so this copy wins over any older
        // one still held elsewhere (a stale owner's writes are refused).
        let mut snap = crate::core::snapshot_of(&session, Instant::now());
        snap.epoch += 1;
        snap.changes = 0;
        let _ = state.act(|core| {
            if core.has_session(client_id) {
                return crate::effects::Effects::none();
            }
            tracing::info!(client_id, epoch = snap.epoch, "replica promoted to session");
            let fx = core
                .import_session(client_id, snap)
                .unwrap_or_else(|_| crate::effects::Effects::none());
            core.note_seen(client_id, seen);
            fx
        });
    }

    /// A copy of every session this node keeps for another, for the data
    /// directory's snapshot (taken with the core's lock held: the lock
    /// order is the core's, then the copies').
    pub(crate) fn replica_copies(&self) -> Vec<(String, crate::snapshot::SessionSnapshot)> {
        lock(&self.replicas)
            .snapshots(|_| true, Instant::now())
            .into_iter()
            .map(|(c, s, _)| (c, s))
            .collect()
    }

    /// Takes what the data directory held as copies: the view decides
    /// whose each is (a copy this node owns in it is promoted once the
    /// node is ready, after its peers' newer copies, if any, replaced it).
    /// `seen`: what each was given (`durable::Restored::seen`), which goes
    /// to the session on promotion as a copy's log does.
    pub fn restore_copies(&self, sessions: Vec<(String, Session)>, seen: Vec<(String, Vec<u64>)>) {
        lock(&self.replicas).restore(sessions);
        let now = Instant::now();
        let mut log = lock(&self.replica_seen);
        for (client, prints) in seen {
            for p in prints {
                log.note(&client, p, now);
            }
        }
    }

    /// Whether the committed view still counts a member this node has no
    /// link to (it has not caught up with a failure yet).
    pub(super) fn view_has_unreachable(&self, view: &View) -> bool {
        let links = lock(&self.links);
        view.members
            .iter()
            .filter(|m| **m != self.me)
            .any(|m| self.id_of(m).is_none_or(|id| !links.contains_key(&id)))
    }

    /// The live peer that holds `client_id`'s session, if this node keeps
    /// a replica of it.
    pub fn live_holder(&self, client_id: &str) -> Option<String> {
        let holder = lock(&self.replicas).holder(client_id)?;
        let name = self.name_of(holder)?;
        let live = self.view().members.contains(&name);
        (live && name != self.me).then_some(name)
    }

    /// Where a client with this ID is served: `None` here, or the node to
    /// relay it to: the live holder of its session, else its owner.
    pub fn server_for(&self, client_id: &str, state: &State) -> Option<String> {
        if state.core().has_session(client_id) {
            return None;
        }
        if let Some(h) = self.live_holder(client_id) {
            return Some(h);
        }
        let owner = self.owner(client_id);
        (owner != self.me).then_some(owner)
    }

    /// Whether `client_id`'s copy here is a relayed one that may still be
    /// replaced by a fresher copy (`Replicas::promotable`): its client is
    /// held meanwhile, as while a session moves.
    pub fn copy_settling(&self, client_id: &str) -> bool {
        let r = lock(&self.replicas);
        r.epoch(client_id).is_some() && !r.promotable(client_id, Instant::now())
    }

    /// Whether a copy this node owns and would promote is a relayed one
    /// still waiting for a fresher copy (`Replicas::promotable`): this
    /// node's word that it has promoted its copies for the view
    /// (`Frame::Promoted`) waits for it, and so do the publishes held for
    /// the lost holder, which are then routed to the promoted session.
    pub(super) fn owns_settling_copies(&self) -> bool {
        // Owner and holder judged in one reading of the view.
        let view = self.view();
        let live = self.live_peers(&view);
        lock(&self.replicas).owns_settling(
            Instant::now(),
            |c| self.owner_in(&view, c) == self.me,
            |h| live.contains(&h),
        )
    }

    /// The ids of `view`'s members but this node: the holders whose
    /// copies are not orphans.
    fn live_peers(&self, view: &View) -> std::collections::HashSet<NodeId> {
        view.members
            .iter()
            .filter(|m| **m != self.me)
            .filter_map(|m| self.id_of(m))
            .collect()
    }

    /// Whether this node owns a copy whose holder the view no longer
    /// counts and has not promoted it yet: one handed over by a chain
    /// member after this node said it promoted its copies for the view
    /// (`nodes_left`), until the next tick promotes it. Publishes held for
    /// the lost holder wait for it (`takeover_done`): released before, they
    /// would match nobody for that session (found by the simulator). Owners
    /// are computed only for copies whose holder is gone.
    pub(super) fn owns_unpromoted_copies(&self, view: &View) -> bool {
        !self.unpromoted_copies(view).is_empty()
    }

    /// The filters of the copies whose publishes this node holds, sorted:
    /// those [`Cluster::owns_unpromoted_copies`] finds, until they are
    /// promoted, and the orphans another member owns, until it has said it
    /// promoted its copies for the view (its interest for them goes out
    /// before that word). Without the second kind, a copy whose owner moved
    /// to another node by a view change before this one promoted it matched
    /// nobody here until the new owner promoted it (found by the simulator,
    /// once promotions waited for a view confirmed current).
    pub(super) fn unpromoted_filters(&self) -> Vec<String> {
        let copies = self.copies_to_hold(&self.view());
        if copies.is_empty() {
            return Vec::new();
        }
        let mut filters: Vec<String> = {
            let r = lock(&self.replicas);
            copies.iter().flat_map(|c| r.filters(c)).collect()
        };
        filters.sort();
        filters.dedup();
        filters
    }

    /// Holds publishes matching the copies this node owns and has not
    /// promoted (`Core::hold_for_copies`), judged under the core's lock
    /// the caller holds: as a view is installed (`deliver`).
    pub(super) fn hold_for_copies_in(&self, core: &mut crate::core::Core) {
        core.hold_for_copies(&self.unpromoted_filters());
    }

    /// [`Cluster::hold_for_copies_in`] at a tick: the copies are judged
    /// outside the core's lock (every copy is looked at), and again under
    /// it only if a view was installed meanwhile, whose hold must not be
    /// replaced by one judged in the view before.
    pub(super) fn hold_for_copies(&self, state: &State) {
        let judged_in = lock(&self.view).number;
        let held = self.unpromoted_filters();
        let mut core = state.core();
        if lock(&self.view).number == judged_in {
            core.hold_for_copies(&held);
        } else {
            self.hold_for_copies_in(&mut core);
        }
    }

    /// See [`Cluster::unpromoted_filters`].
    fn copies_to_hold(&self, view: &View) -> Vec<String> {
        let live = self.live_peers(view);
        // Who has said it: read first, one lock at a time.
        let said: Vec<&String> = {
            let promotions = lock(&self.promotions);
            view.members
                .iter()
                .filter(|m| {
                    **m != self.me
                        && self
                            .id_of(m)
                            .is_some_and(|id| promotions.said(id, view.number))
                })
                .collect()
        };
        lock(&self.replicas).orphans_owned(
            |c| {
                let owner = self.owner_in(view, c);
                owner == self.me || !said.contains(&&owner)
            },
            |h| live.contains(&h),
        )
    }

    /// The copies this node owns whose holder the view no longer counts.
    /// Asked every tick: only the orphaned copies' names are copied.
    fn unpromoted_copies(&self, view: &View) -> Vec<String> {
        let live = self.live_peers(view);
        lock(&self.replicas)
            .orphans_owned(|c| self.owner_in(view, c) == self.me, |h| live.contains(&h))
    }

    /// Promotes the replicas this node owns in the current view, once it is
    /// synced: only then has it the newest copy every live peer holds
    /// (their link snapshots come first).
    pub(super) fn promote_owned(&self, state: &State) {
        if !self.synced() {
            return;
        }
        // Owner and holder judged in one reading of the view (see
        // `takeover_done`).
        let view = self.view();
        let live = self.live_peers(&view);
        let owned = lock(&self.replicas).to_promote(
            Instant::now(),
            |c| self.owner_in(&view, c) == self.me,
            |h| live.contains(&h),
        );
        if owned.is_empty() {
            return;
        }
        // Only on a view known to be the newest: one learned from a data
        // directory, or held while the leader cannot be heard, may drop a
        // holder that a newer view counts and that serves the session now.
        if !self.view_is_current() {
            return;
        }
        for c in owned {
            self.promote(&c, state);
        }
    }

    /// After a view change that dropped members: the copies this node's
    /// holders updated whose holder left go whole to each session's new
    /// owner, when that is another node (the owner may hold only a relayed
    /// copy, older than this one: `Replicas::promotable`), and the retained
    /// messages those members wrote last go to every peer again.
    pub(super) fn nodes_left(&self, previous: &View, state: &State) {
        let view = self.view();
        // Holders that have just left: in the previous view, not in this
        // one (copies whose holder left earlier were handed over then, and
        // may be stale by now).
        let left: Vec<crate::router::NodeId> = previous
            .members
            .iter()
            .filter(|m| !view.members.contains(*m))
            .filter_map(|m| self.id_of(m))
            .collect();
        if left.is_empty() {
            return;
        }
        let now = Instant::now();
        // Copies cut off from a holder that has now left wait a little for
        // the fresher ones handed over below (`Replicas::holders_left`).
        lock(&self.replicas).holders_left(&left, now);
        let stamps: Vec<u32> = previous
            .members
            .iter()
            .filter(|m| !view.members.contains(*m))
            .map(|m| stamp_of(m))
            .collect();
        let retained = handover::retained_written_by(&state.core(), &stamps);
        for f in &retained {
            self.broadcast(f);
        }
        let orphans = handover::orphans(
            &lock(&self.replicas),
            &lock(&self.replica_seen),
            &left,
            // Owned in the view the hand-over is for.
            |client| {
                let owner = self.owner_in(&view, client);
                (owner != self.me).then(|| self.id_of(&owner)).flatten()
            },
            |holder| self.name_of(holder),
            now,
        );
        for (owner, frames) in orphans {
            let Some(tx) = lock(&self.links).get(&owner).cloned() else {
                continue;
            };
            // Each copy back to back with its prints.
            tx.push_all(&frames, &self.stats.dropped);
        }
    }

    /// Sends a session whole on `tx` (seq 0: a snapshot's copy), after
    /// what it was given lately (`Frame::Seen`), so the node that may
    /// promote it knows that too: a link's snapshot, a hand-over.
    pub(super) fn send_whole(
        &self,
        tx: &LinkTx,
        seq: u64,
        client: String,
        snap: crate::snapshot::SessionSnapshot,
        holder: String,
    ) {
        let seen = self.seen_frame(&client);
        let copy = Frame::Replicate {
            seq,
            client,
            epoch: snap.epoch,
            holder,
            changes: whole(snap),
        };
        // Back to back: the prints go with the copy (`LinkTx::push_all`).
        match seen {
            Some(seen) => tx.push_all(&[seen, copy], &self.stats.dropped),
            None => tx.push(&copy, &self.stats.dropped),
        }
    }

    /// After a view change: send every session this node holds whole to
    /// its chain (a new chain member has nothing; an old one may have
    /// missed changes).
    pub(super) fn rechain(&self, state: &State) {
        // Numbered under the core's lock, like every change (see
        // `State::act`): a change made after the export must not reach a
        // chain member before this older whole copy. Encoded and sent after
        // the lock, in that order; each session's `Seen` frame goes first.
        let core = state.core();
        let rechain = handover::rechain(&core, &lock(&self.replica_seen), Instant::now());
        for (client, seen) in &rechain.seen {
            self.send_to_chain(client, seen);
        }
        let ticket = state.sequence(rechain.records);
        drop(core);
        drop(state.commit(ticket));
    }

    /// What `client`'s session was given lately, as a frame for a chain
    /// member that is about to get the session whole.
    pub(super) fn seen_frame(&self, client: &str) -> Option<Frame> {
        lock(&self.replica_seen).frame(client)
    }

    /// Sends `frame` to the other live members of `client`'s chain.
    fn send_to_chain(&self, client: &str, frame: &Frame) {
        for member in self.chain(client) {
            if member == self.me {
                continue;
            }
            let Some(id) = self.id_of(&member) else {
                continue;
            };
            if let Some(tx) = lock(&self.links).get(&id).cloned() {
                tx.push(frame, &self.stats.dropped);
            }
        }
    }

    /// This node lost its majority: the other side may take its sessions
    /// over, so it stops serving. Clients are closed (v5: DISCONNECT 0x8B)
    /// to reconnect on the majority side, and its sessions become replica
    /// copies, so that when the partition heals the majority's copies (which
    /// took the messages published meanwhile) win.
    pub(super) fn step_down(&self, state: &State) {
        self.serving_now.store(false, Ordering::Relaxed);
        // Back in service it must hear every live peer's snapshot again,
        // and promote the copies it owns again before it tells its peers
        // it has (a word kept from before let a peer route publishes held
        // for a lost node while this node's copies were unpromoted and its
        // interest unsent: they matched nobody; found by the simulator
        // with sessions on different chains).
        self.synced_once.store(false, Ordering::Release);
        lock(&self.promotions).stepped_down();
        tracing::warn!(
            quorum = self.quorum(),
            "lost the majority of the cluster: closing clients and handing sessions over"
        );
        let demoted: Vec<(String, crate::snapshot::SessionSnapshot)> = {
            let core = state.core();
            core.persistent_sessions()
                .into_iter()
                .filter_map(|c| core.export_session(&c).map(|s| (c.to_string(), s)))
                .collect()
        };
        for (client, snap) in demoted {
            let epoch = snap.epoch;
            // On disk as well, before the eviction below is (it is numbered
            // first): a restart finds the copy.
            drop(self.apply_replica(&client, epoch, whole(snap), state));
            let _ = state.act(|core| core.evict_session_shutting_down(&client));
        }
        for outbox in state.open_connections() {
            outbox.close(crate::outbox::Closing::ShuttingDown);
        }
    }

    /// After a step down for a lost majority: peers still linked hear that
    /// this node serves nothing now (a `SyncDone` after the link's
    /// snapshot is an empty one), so their copies stop naming it as the
    /// holder and each session's owner promotes its copy. Else, with its
    /// links up and a view change moving ownership, no node served those
    /// sessions until their clients came back, and what was published for
    /// them matched nobody (found by the simulator with the view from Raft:
    /// a node that lost its majority for a few milliseconds). Its interest
    /// is kept: publishes forwarded to it are refused and held for the new
    /// holder. Not on a graceful stop, whose copies are promoted only once
    /// the view without it commits.
    pub(super) fn serves_nothing(&self) {
        for tx in lock(&self.links).values() {
            tx.push(&Frame::SyncDone, &self.stats.dropped);
        }
    }

    /// A chain member's copy of a session changed; `seen`: the prints that
    /// came with it (`links::apply`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn replicate(
        &self,
        from: ReplyTo,
        seq: u64,
        client: String,
        epoch: u64,
        changes: Vec<SessionChange>,
        seen: Option<Vec<u64>>,
        state: &State,
    ) {
        // What the prints that came with it do: `Seen::copy_arrived`.
        let whole = changes.first() == Some(&SessionChange::Ended);
        let note_seen = |incoming| {
            lock(&self.replica_seen).copy_arrived(&client, seen, incoming, whole, Instant::now());
        };
        // Not while a copy is being promoted: taken out of the copies and
        // not yet in the core, the session would look absent, and these
        // changes would start a copy of their own beside the promoted
        // session, their messages never delivered.
        let _one = lock(&self.promoting);
        // What this node serves of the session decides (one lock, one
        // reading): see `replicas::incoming`.
        let (held, connected) = {
            let core = state.core();
            (core.epoch(&client), core.is_connected(&client))
        };
        let incoming = crate::replicas::incoming(held, connected, epoch);
        note_seen(incoming);
        match incoming {
            crate::replicas::Incoming::Adopt => {
                tracing::debug!(
                    client,
                    mine = held,
                    epoch,
                    "stale session changes: adopting their messages"
                );
                // Its inbound QoS 2 ids too (`Core::adopt_qos2`).
                let qos2 = state.act(|core| core.adopt_qos2(&client, &changes));
                let adopted: Vec<crate::message::Pending> = changes
                    .into_iter()
                    .filter_map(|c| match c {
                        SessionChange::Enqueued(p) | SessionChange::Sent { pending: p, .. } => {
                            Some(p)
                        }
                        _ => None,
                    })
                    .collect();
                if !adopted.is_empty() || !qos2.is_done() {
                    let mut committed = state.act(|core| core.adopt(&client, adopted));
                    committed.merge(qos2);
                    if let Some(me) = self.state_owner.get().and_then(std::sync::Weak::upgrade) {
                        tokio::spawn(async move {
                            // Unacknowledged if not committed: the writer's
                            // wait ends at its deadline, as not committed.
                            if committed.wait().await.is_ok() {
                                me.answer(from, Frame::Ack { seq });
                            }
                        });
                    }
                    return;
                }
            }
            crate::replicas::Incoming::Apply { evict_first } => {
                if evict_first {
                    tracing::info!(client, "session moved to another node; local copy dropped");
                    let _ = state.act(|core| core.evict_session(&client));
                }
                let kept = self.apply_replica(&client, epoch, changes, state);
                return self.answer_when(from, seq, kept);
            }
            // A copy of a session served here: refused, prints and all.
            crate::replicas::Incoming::Refuse => {}
        }
        self.answer(from, Frame::Ack { seq });
    }

    /// Acknowledges `seq` once `kept` (the copy's changes on this node's
    /// disk, with a data directory) resolves; never if it is not.
    fn answer_when(&self, from: ReplyTo, seq: u64, kept: crate::effects::Committed) {
        if kept.is_done() {
            return self.answer(from, Frame::Ack { seq });
        }
        let Some(me) = self.state_owner.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        tokio::spawn(async move {
            // Unacknowledged if not kept: the writer's wait ends at its
            // deadline, as not committed.
            if kept.wait().await.is_ok() {
                me.answer(from, Frame::Ack { seq });
            }
        });
    }

    /// Applies changes to the copy kept of `client`'s session (refused
    /// from an older epoch than the copy's). With a data directory they
    /// are numbered in the node's ordered log under the copies' lock (so
    /// the disk has them in the order they were applied) and the result
    /// resolves once they are on disk.
    pub(super) fn apply_replica(
        &self,
        client: &str,
        epoch: u64,
        changes: Vec<SessionChange>,
        state: &State,
    ) -> crate::effects::Committed {
        let ticket = self.apply_replica_locked(client, epoch, changes, state);
        state.commit(ticket)
    }

    fn apply_replica_locked(
        &self,
        client: &str,
        epoch: u64,
        changes: Vec<SessionChange>,
        state: &State,
    ) -> Option<crate::state::Ticket> {
        let mut copies = lock(&self.replicas);
        let entry = super::seen::apply_copy(
            &mut copies,
            &mut lock(&self.replica_seen),
            client,
            epoch,
            changes,
            state.disk().is_some(),
            Instant::now(),
        )?;
        state.sequence(vec![entry])
    }

    pub(super) fn acked(&self, from: NodeId, seq: u64) {
        let released = lock(&self.waiting).acked(from, seq);
        self.act_on(released);
    }

    /// Peer `from` did not deliver the forward `seq`: held and forwarded
    /// again once its sessions' new holders have announced them.
    pub(super) fn forward_refused(&self, from: NodeId, seq: u64) {
        let again = lock(&self.waiting).refused(from, seq);
        if let Some(r) = again {
            match r {
                Released::Committed(tx) => {
                    let _ = tx.send(());
                }
                // Not to the refuser again: it keeps its old interest until
                // it is gone, and each round would give the message once
                // more to the node that took its sessions over.
                Released::Resend(m, groups, tx) => {
                    self.hold_publish(
                        m,
                        groups,
                        HeldAs::Again {
                            exclude: vec![from],
                            refused: true,
                        },
                        tx,
                        false,
                    );
                }
            }
        }
    }

    /// A member left the view: appends waiting for it wait no longer (the
    /// copy it would have held is re-made on the new chain by `rechain`).
    pub(super) fn release_waits(&self, gone: &[NodeId]) {
        let released = lock(&self.waiting).lost(gone);
        self.act_on(released);
    }

    /// The link to `peer` broke. A member of the view is owed the chain
    /// changes that were in flight on it until it confirms the next link's
    /// snapshot (`commits`: committing without it could lose them); one
    /// the view does not count (a joiner) is waited for no longer.
    pub(super) fn unlinked(&self, peer: NodeId) {
        let member = self
            .name_of(peer)
            .is_some_and(|n| self.view().members.contains(&n));
        if !member {
            return self.release_waits(&[peer]);
        }
        let released = lock(&self.waiting).unlinked(peer);
        self.act_on(released);
    }

    /// Acts on what `commits` released: waiters told they are committed,
    /// forwards held for the takeover and sent again.
    pub(super) fn act_on(&self, released: Vec<Released<tokio::sync::oneshot::Sender<()>>>) {
        for r in released {
            match r {
                Released::Committed(tx) => {
                    let _ = tx.send(());
                }
                // Which other peers had each is not known here: one that
                // did may see it twice (QoS 1 allows; see the README).
                Released::Resend(m, groups, tx) => {
                    self.hold_publish(m, groups, AGAIN, tx, false);
                }
            }
        }
    }

    /// Holds `m` for a takeover: routed again once the view has dropped
    /// the lost peer and its sessions' next nodes have promoted them (see
    /// `release_held`), or, [`HeldAs::New`], once no earlier publish of
    /// its publisher is held; `done` fires once that routing has
    /// committed. `noted`: the core counted it already (it asked for the
    /// hold); else it is told, so the publisher's later publishes wait
    /// behind this one.
    pub(super) fn hold_publish(
        &self,
        m: Message,
        groups: Vec<Arc<str>>,
        how: HeldAs,
        done: tokio::sync::oneshot::Sender<()>,
        noted: bool,
    ) {
        let (Some(state), Some(cluster)) = (
            self.state.get().and_then(std::sync::Weak::upgrade),
            self.state_owner.get().and_then(std::sync::Weak::upgrade),
        ) else {
            // Shutting down: dropped unsent, `done` says not committed.
            return;
        };
        if !noted {
            state.note_held(&m);
        }
        tracing::trace!(how = ?how, payload = %String::from_utf8_lossy(&m.payload), "held");
        if matches!(how, HeldAs::Again { .. }) {
            self.stats.held.fetch_add(1, Ordering::Relaxed);
        }
        lock(&self.held).push(Held {
            message: m,
            groups,
            how,
            since: Instant::now(),
            token: done,
        });
        if self.releasing.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(consensus::TICK / 4).await;
                cluster.release_held(&state);
                if !lock(&cluster.held).is_empty() {
                    continue;
                }
                cluster.releasing.store(false, Ordering::Release);
                // One held since the check above, whose holder saw this
                // task still running, is released here.
                if lock(&cluster.held).is_empty() || cluster.releasing.swap(true, Ordering::AcqRel)
                {
                    break;
                }
            }
        });
    }

    /// One pass over the held publishes, in the order they came: each
    /// whose takeover is done (the committed view holds only reachable
    /// members and none that refused it, and every member has promoted the
    /// copies it owns), or that waited [`TAKEOVER_WITHIN`], is routed
    /// again to the live peers interested by then; a deferred one once no
    /// earlier publish of its publisher is still held. A publisher whose
    /// publish stays held holds its later ones back too, so no session
    /// gets them out of order (found by the simulator with sessions on
    /// different chains: a publish made after a session was promoted here
    /// reached it before one held for the node that had died with it).
    fn release_held(&self, state: &Arc<State>) {
        let pending = lock(&self.held).take();
        // One reading of the view for the whole pass (`takeover_done`).
        let view = self.view();
        let settled = self.takeover_done(&view);
        let pass = Release {
            now: Instant::now(),
            settled,
            patience: TAKEOVER_WITHIN,
        };
        let in_view = |n: NodeId| self.name_of(n).is_some_and(|r| view.members.contains(&r));
        let kept = held::release(pending, pass, in_view, |h| {
            let Held {
                message: m,
                groups,
                how,
                token: done,
                ..
            } = h;
            let origin = m.origin.clone();
            let committed = match how {
                HeldAs::New(how) => state.act(|core| core.route_deferred(m, how)),
                HeldAs::Again { exclude, .. } => {
                    tracing::debug!(settled, payload = %String::from_utf8_lossy(&m.payload), "held publish routed again");
                    // Peers with a link that the view still counts: one it
                    // dropped (a hung node's link can stay open) is no
                    // candidate. Members the view has dropped are not
                    // waited for again: their sessions have moved, and the
                    // new holders are among the linked peers.
                    let linked: Vec<NodeId> = self.reachable_peers();
                    let mut exclude = exclude;
                    exclude.extend(
                        self.names()
                            .iter()
                            .enumerate()
                            .filter(|(_, n)| view.number > 0 && !view.members.contains(n))
                            .filter_map(|(i, _)| NodeId::try_from(i).ok()),
                    );
                    state.act(|core| core.reforward(m, groups, &linked, &exclude))
                }
            };
            tokio::spawn(async move {
                if committed.wait().await.is_ok() {
                    let _ = done.send(());
                }
            });
            // Held again by that routing (a peer unreachable once more):
            // its publisher's later publishes stay behind it.
            lock(&self.held).holds_from(&origin)
        });
        lock(&self.held).put_back(kept);
    }
}

impl ChangeLog for Cluster {
    /// Sends interest and retained writes to every peer and streams each
    /// session's records to the other members of its chain; committed once
    /// each chain member has applied them (at once with no other member
    /// live: the copy here is then the only one, as on a single node).
    fn append(&self, log_seq: u64, entries: Vec<LogEntry>) -> Committed {
        let mut records = Vec::with_capacity(entries.len());
        let mut keys = Committed::now();
        for e in entries {
            match e {
                LogEntry::Session(r) => records.push(r),
                // A state store key's change, or a read's barrier, down
                // the key's chain.
                LogEntry::Store { view, copy } => {
                    let key = copy.key.clone();
                    keys.merge(self.replicate_key(&key, view, Some(*copy)));
                }
                LogEntry::StoreRead { key, view, .. } => {
                    keys.merge(self.replicate_key(&key, view, None));
                }
                LogEntry::Interest { filter, gained } => {
                    // Stepping down drops this node's sessions and with
                    // them their filters; peers keep the old interest, so
                    // what they publish for those sessions is held until
                    // the nodes that took them over announce theirs,
                    // rather than matching nobody. Back in service, the
                    // whole interest is sent again, and what it covers is
                    // not sent twice.
                    if self.is_serving() && log_seq > self.interest_covers.load(Ordering::Acquire) {
                        self.broadcast_after(log_seq, &Frame::Interest { filter, gained });
                    }
                }
                // For a data directory only.
                LogEntry::StoreReplica(_) | LogEntry::Replica { .. } | LogEntry::Evicted(_) => {}
                LogEntry::Retained {
                    topic,
                    message,
                    version,
                } => self.broadcast_after(
                    log_seq,
                    &Frame::Retained {
                        topic,
                        message,
                        version,
                    },
                ),
            }
        }
        let mut committed = self.send_down_chains(log_seq, records);
        committed.merge(keys);
        committed
    }
}

impl Cluster {
    /// Streams each session's records of batch `log_seq` to the other
    /// members of its chain.
    fn send_down_chains(&self, log_seq: u64, records: Vec<ChangeRecord>) -> Committed {
        if records.is_empty() {
            return Committed::now();
        }
        // What each session is given is remembered here too, as on its
        // replicas, so the log can go along when the session is sent whole.
        {
            let now = Instant::now();
            let mut seen = lock(&self.replica_seen);
            for r in &records {
                seen.note_changes(&r.client, std::slice::from_ref(&r.change), now);
            }
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        // Whom each session's changes go to: its chain in the view, and any
        // linked peer the view does not count yet whose chain it would be
        // in (`chain::targets`: its link snapshot held the session, so it
        // must not miss what follows). Usually nobody is joining.
        let joining = lock(&self.joining).clone();
        let joining: Vec<&str> = joining.iter().map(String::as_str).collect();
        // Every frame is addressed first and the wait registered before any
        // is sent: a peer may acknowledge within microseconds, and an
        // acknowledgement that finds no wait is lost, leaving the change
        // uncommitted for good.
        let mut per_node: Vec<(NodeId, usize)> = Vec::new();
        let mut owed: Vec<NodeId> = Vec::new();
        // Whom each change goes to and whether a member is owed it are
        // judged in one reading of the view.
        let view = self.current_view();
        let members: Vec<&str> = view.members.iter().map(String::as_str).collect();
        let mut sends: Vec<(Frame, Vec<Arc<LinkTx>>)> = Vec::new();
        for (client, epoch, changes) in crate::replicas::runs(records) {
            let frame = Frame::Replicate {
                seq,
                client: client.to_string(),
                epoch,
                holder: self.me.clone(),
                changes,
            };
            let mut to = Vec::new();
            let targets = crate::chain::targets(&client, &members, &joining, self.replication);
            for member in targets {
                if member == self.me {
                    continue;
                }
                let Some(id) = self.id_of(member) else {
                    continue;
                };
                // A link opened after this batch was numbered had it in its
                // snapshot already; a member without a link gets it in the
                // next one. Either is owed it until it confirms that
                // snapshot (`commits`). A joiner with no link is not.
                let link = lock(&self.links).get(&id).cloned();
                let covers = link.as_ref().map(|tx| tx.copies_cover());
                match (
                    crate::chain::delivery(log_seq, covers, members.contains(&member)),
                    link,
                ) {
                    (crate::chain::Delivery::Send, Some(tx)) => {
                        to.push(tx);
                        match per_node.iter_mut().find(|(p, _)| *p == id) {
                            Some((_, n)) => *n += 1,
                            None => per_node.push((id, 1)),
                        }
                    }
                    (crate::chain::Delivery::Skip, _) => {}
                    _ => owed.push(id),
                }
            }
            sends.push((frame, to));
        }
        if per_node.is_empty() && owed.is_empty() {
            return Committed::now();
        }
        let (done, rx) = tokio::sync::oneshot::channel();
        owed.sort_unstable();
        owed.dedup();
        if let Some(done) = lock(&self.waiting).register(seq, log_seq, per_node, &owed, None, done)
        {
            let _ = done.send(());
        }
        for (frame, to) in sends {
            for link in to {
                link.push(&frame, &self.stats.dropped);
            }
        }
        Committed::when(rx)
    }
}

/// [`replicas::whole`] now.
pub(super) fn whole(snap: crate::snapshot::SessionSnapshot) -> Vec<SessionChange> {
    crate::replicas::whole(snap, Instant::now())
}
