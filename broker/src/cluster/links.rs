//! The links between nodes: every cluster connection is accepted or
//! dialled here, authenticated by the handshake, and then either carries
//! one peer's frames (applied in order) or relays one MQTT client to the
//! node serving its session.

use super::*;

/// What reading one peer's link carries from one frame to the next.
#[derive(Debug, Default)]
pub(super) struct LinkRead {
    /// The peer's last `Seen` frame, until the frame after it (`apply`).
    seen: seen::Stash,
    /// During the peer's link snapshot (the link's first frames, up to
    /// `SyncDone`), the
    /// sessions it sent whole as their holder: at its end, copies here
    /// naming the peer as holder that it did not send are of sessions it
    /// no longer serves (`Replicas::holder_serves_only`).
    snapshot: Option<std::collections::HashSet<String>>,
}

/// Frames waiting for one peer's outbound link.
#[derive(Debug, Default)]
pub(super) struct LinkTx {
    pub(super) buf: Mutex<BytesMut>,
    pub(super) ready: Notify,
    /// A frame did not fit in [`LINK_BUFFER`]: the link is closed and
    /// dialled again, so the peer gets a whole snapshot instead of a
    /// stream with a hole in it (a lost replication frame would leave its
    /// change waiting, and the copy wrong).
    overflowed: std::sync::atomic::AtomicBool,
    /// The last batch of the node's ordered change log that the link's
    /// snapshot already holds: later batches only are sent on it.
    snapshot_covers: AtomicU64,
    /// The same for session changes, which whole copies sent again on the
    /// open link (`resync_link`) may cover further.
    copies_cover: AtomicU64,
}

impl LinkTx {
    pub(super) fn push(&self, f: &Frame, dropped: &AtomicU64) {
        self.push_all(std::slice::from_ref(f), dropped);
    }

    /// Queues `frames` back to back: no other task's frame comes between
    /// them. A `Seen` frame and the copy it goes with must arrive so (the
    /// reader gives the prints to the frame right after them: with an
    /// acknowledgement or a Raft message in between they were noted as the
    /// peer's own, and a copy refused here left its prints behind, which
    /// skipped a session for a QoS 2 resend it never had: found by the
    /// simulator).
    pub(super) fn push_all(&self, frames: &[Frame], dropped: &AtomicU64) {
        let mut b = lock(&self.buf);
        for f in frames {
            if self.overflowed.load(Ordering::Relaxed) {
                dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if b.len() > LINK_BUFFER {
                tracing::warn!(
                    buffered = b.len(),
                    "a peer link's buffer is full: closing it for a resync"
                );
                dropped.fetch_add(1, Ordering::Relaxed);
                self.overflowed.store(true, Ordering::Relaxed);
                continue;
            }
            if f.encode(&mut b).is_err() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(b);
        self.ready.notify_one();
    }

    /// See `snapshot_covers`.
    pub(super) fn snapshot_covers(&self) -> u64 {
        self.snapshot_covers.load(Ordering::Acquire)
    }

    /// See `copies_cover`.
    pub(super) fn copies_cover(&self) -> u64 {
        self.copies_cover.load(Ordering::Acquire)
    }

    /// Whether the link must be closed (see `overflowed`).
    pub(super) fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }
}

impl Cluster {
    /// Opens an authenticated client connection to `owner`, over which an
    /// MQTT client's bytes are relayed; `identity` is what this node
    /// verified from the client's TLS certificate, if anything, which the
    /// owner applies as it would to a direct connection.
    pub async fn dial_client(
        &self,
        owner: &str,
        identity: Option<(mqlb_config::IdentityAs, String)>,
    ) -> io::Result<handshake::PeerStream> {
        let id = self
            .id_of(owner)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "unknown node"))?;
        let addr = self
            .addr_of(id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "unknown node"))?;
        let s = tokio::time::timeout(
            FAILURE_TIMEOUT,
            TcpStream::connect((addr.host(), addr.port())),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let _ = s.set_nodelay(true);
        let s = handshake::dial(
            s,
            &self.me,
            &Purpose::Client(identity),
            self.tls.as_deref(),
            owner,
        )
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
        self.stats.proxied.fetch_add(1, Ordering::Relaxed);
        Ok(s)
    }

    pub(super) async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        state: Arc<State>,
        serve_relayed: ServeRelayed,
        stop: CancellationToken,
    ) {
        loop {
            let (stream, addr) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let _ = stream.set_nodelay(true);
            let me = self.clone();
            let state = state.clone();
            let stop = stop.clone();
            let serve_relayed = serve_relayed.clone();
            tokio::spawn(async move {
                let known = |n: &str| me.id_of(n).is_some_and(|id| id != me.my_id);
                let (stream, name, purpose) =
                    match handshake::accept(stream, &me.me, me.tls.as_deref(), known).await {
                        Ok(x) => x,
                        Err(r) => {
                            me.refused(r);
                            tracing::warn!(%addr, reason = r.label(), "cluster connection refused");
                            return;
                        }
                    };
                let Some(id) = me.id_of(&name) else {
                    return;
                };
                match purpose {
                    Purpose::Link => {
                        let span = tracing::info_span!("inbound", peer = %name);
                        tokio::select! {
                            _ = me.read_link(id, stream, state).instrument(span) => {}
                            _ = stop.cancelled() => {}
                        }
                    }
                    Purpose::Client(identity) => {
                        tokio::select! {
                            _ = serve_relayed(stream, id, identity) => {}
                            _ = stop.cancelled() => {}
                        }
                    }
                }
            });
        }
    }

    pub(super) fn refused(&self, r: Refusal) {
        if let Some(i) = Refusal::ALL.iter().position(|x| *x == r) {
            if let Some(c) = self.stats.refused.get(i) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Applies a peer's frames until its link closes or goes quiet.
    pub(super) async fn read_link(
        &self,
        id: NodeId,
        mut stream: handshake::PeerStream,
        state: Arc<State>,
    ) {
        let Some(generation) = self.with_peer(id, |p| {
            p.generation += 1;
            p.synced = false;
            p.leaving = false;
            p.heard = Some(Instant::now());
            p.generation
        }) else {
            return;
        };
        // Its key copies come again on this link, then its word that it is
        // synced. Answers still waiting for an earlier connection of it
        // are void.
        lock(&self.store_synced).remove(&id);
        lock(&self.promotions).relinked(id);
        lock(&self.forgotten).remove(&id);
        lock(&self.early_answers).remove(&id);
        // Its answers to what this node sent before may have gone down
        // its old link (one it had not yet found dead): see
        // `answers_lost`.
        self.answers_lost(id, &state);
        self.release_store_waits(&[id]);
        tracing::debug!("peer link up");
        let mut buf = BytesMut::with_capacity(64 << 10);
        // What reading the peer's frames carries from one to the next; a
        // link opens with the peer's snapshot.
        let mut stash = LinkRead {
            snapshot: Some(std::collections::HashSet::new()),
            ..LinkRead::default()
        };
        loop {
            let r = tokio::time::timeout(FAILURE_TIMEOUT, stream.read_buf(&mut buf)).await;
            match r {
                Ok(Ok(n)) if n > 0 => {}
                _ => break,
            }
            let current = self.with_peer(id, |p| {
                let current = p.generation == generation;
                if current {
                    p.heard = Some(Instant::now());
                }
                current
            });
            if current != Some(true) {
                self.flush_seen(&mut stash.seen);
                return; // a newer link from this peer took over
            }
            loop {
                let frame = match Frame::decode(&mut buf) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "bad frame from peer; closing its link");
                        self.flush_seen(&mut stash.seen);
                        self.link_down(id, generation, &state);
                        return;
                    }
                };
                self.apply(id, generation, frame, &state, &mut stash);
            }
        }
        self.flush_seen(&mut stash.seen);
        self.link_down(id, generation, &state);
    }

    /// Notes a stashed `Seen` frame that no copy of its session followed.
    fn flush_seen(&self, stash: &mut seen::Stash) {
        stash.flush(&mut lock(&self.replica_seen), Instant::now());
    }

    pub(super) fn link_down(&self, id: NodeId, generation: u64, state: &State) {
        let current = self.with_peer(id, |p| {
            let current = p.generation == generation;
            if current {
                p.heard = None;
                p.synced = false;
            }
            (current, current && p.leaving)
        });
        let Some((true, leaving)) = current else {
            return;
        };
        if leaving {
            // A graceful stop (it said so on this link): expected.
            tracing::info!("peer link down: the peer is stopping");
        } else {
            tracing::warn!("peer link down");
        }
        // Its answers in flight on this link are lost.
        self.answers_lost(id, state);
        // Outside the view this node is streamed to but not waited for:
        // its copies of the peer's sessions may miss what the peer commits
        // from now on (`Replicas::unlinked_from`). So is a node that has
        // no committed view yet (restarted without a data directory: the
        // view it starts with names only itself).
        let view = self.view();
        if view.number == 0 || !view.members.contains(&self.me) {
            lock(&self.replicas).unlinked_from(id);
        }
        self.release_store_waits(&[id]);
        // Its interest is kept a while: publishes for its sessions are held
        // (see `forward`) until whoever takes them over has said so, instead
        // of matching nobody in between.
        let (Some(st), Some(cluster)) = (
            self.state.get().and_then(std::sync::Weak::upgrade),
            self.state_owner.get().and_then(std::sync::Weak::upgrade),
        ) else {
            state.core().forget_peer(id);
            return;
        };
        tokio::spawn(async move {
            tokio::time::sleep(INTEREST_HOLD).await;
            let still_down = cluster.with_peer(id, |p| p.generation == generation);
            if still_down == Some(true) {
                tracing::debug!(peer = id, "forgetting a lost peer's interest");
                st.core().forget_peer(id);
            }
        });
    }

    /// Applies one frame of peer `id`'s link. A `Seen` frame (what a
    /// session was given) waits in `stash` for the frame after it: when
    /// that is the session's whole copy and replaces this node's, the
    /// prints replace the old copy's, which may name messages the new copy
    /// never had (taken as given, they were lost when sent again: found by
    /// the simulator); when the copy is refused, so are they; otherwise
    /// they are noted beside what this node had.
    pub(super) fn apply(
        &self,
        id: NodeId,
        generation: u64,
        frame: Frame,
        state: &State,
        read: &mut LinkRead,
    ) {
        let stash = &mut read.seen;
        let copy_of = match &frame {
            Frame::Replicate { client, .. } => Some(client.as_str()),
            _ => None,
        };
        // (Most frames find nothing stashed: no lock, no clock.)
        let stashed = stash
            .holds()
            .then(|| stash.next_frame(copy_of, &mut lock(&self.replica_seen), Instant::now()))
            .flatten();
        match frame {
            Frame::Ping => {}
            Frame::Reset => state.core().forget_peer(id),
            Frame::Interest { filter, gained } => state.core().peer_interest(id, &filter, gained),
            Frame::SyncDone => {
                self.with_peer(id, |p| p.synced |= p.generation == generation);
                // The end of the link's snapshot: the sessions it sent as
                // their holder are the ones it serves. A `SyncDone` after
                // that is an empty snapshot: the peer lost its majority and
                // serves nothing now (`serves_nothing`).
                let held = read.snapshot.take().unwrap_or_default();
                let freed = lock(&self.replicas).holder_serves_only(id, &held, Instant::now());
                // Its word that it promoted its copies comes after the
                // snapshot again (an empty one: it stepped down and must
                // promote them again before that word counts).
                lock(&self.promotions).serves_nothing(id);
                if freed > 0 {
                    tracing::info!(
                        copies = freed,
                        "peer no longer serves sessions its copies name it for"
                    );
                }
            }
            Frame::Retained {
                topic,
                message,
                version,
            } => {
                state
                    .core()
                    .set_retained_from_peer(&topic, message, version);
            }
            Frame::Replicate {
                seq,
                client,
                epoch,
                holder,
                changes,
            } => {
                let from = ReplyTo { id, generation };
                // What it does here: `Replicas::arrive`.
                let holder_id = self.id_of(&holder);
                let arrival = crate::replicas::Arrival::new(
                    seq,
                    epoch,
                    &changes,
                    self.is_named(id, &holder),
                    holder_id,
                    || {
                        // One reading of the view.
                        let view = self.view();
                        crate::replicas::Relay {
                            holder_in_view: view.members.contains(&holder),
                            view_known: view.number > 0,
                            serving: state.core().has_session(&client),
                        }
                    },
                );
                let arriving =
                    lock(&self.replicas).arrive(&client, &arrival, self.my_id, Instant::now);
                let crate::replicas::Arriving::Taken {
                    in_holders_snapshot,
                    relayed,
                    interest,
                } = arriving
                else {
                    return;
                };
                if in_holders_snapshot {
                    if let Some(held) = read.snapshot.as_mut() {
                        held.insert(client.clone());
                    }
                }
                let Some(since) = relayed else {
                    // (A holder's own changes clear a relayed mark:
                    // `Replicas::apply`.)
                    return self.replicate(from, seq, client, epoch, changes, stashed, state);
                };
                self.replicate(from, seq, client.clone(), epoch, changes, stashed, state);
                lock(&self.replicas).mark_relayed(&client, since);
                if let Some((h, filters)) = interest {
                    let mut core = state.core();
                    for f in filters {
                        core.peer_interest(h, &f, true);
                    }
                }
            }
            Frame::Ack { seq } => self.acked(id, seq),
            Frame::StoreInvoke {
                seq,
                client,
                hops,
                message,
            } => self.store_invoked(ReplyTo { id, generation }, seq, client, hops, message),
            Frame::StoreCopy { seq, view, copy } => {
                self.store_copy(ReplyTo { id, generation }, seq, view, copy, state)
            }
            Frame::StoreAck { seq, ok } => self.store_acked(id, seq, ok),
            Frame::StoreSynced { view } => self.store_synced(id, view),
            Frame::Promoted { view } => lock(&self.promotions).heard(id, view),
            Frame::StoreForget { client } => self.store_forgotten(&client, state),
            Frame::Seen { client, prints } => stash.hold(client, prints),
            Frame::Refused { seq } => self.forward_refused(id, seq),
            Frame::Raft(m) => self.raft_message(id, &m),
            Frame::Leaving => {
                self.with_peer(id, |p| p.leaving |= p.generation == generation);
            }
            Frame::Observed(names) => {
                if let Some(from) = self.name_of(id) {
                    lock(&self.view_loop).report(&from, names, Instant::now());
                }
            }
            Frame::Forward {
                seq,
                message,
                groups,
                again,
            } => {
                self.stats.received.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(
                    seq,
                    again,
                    serving = self.serving(),
                    payload = %String::from_utf8_lossy(&message.payload),
                    "forward in"
                );
                let decided = forwards::forwarded(self.serving(), message.qos, again, || {
                    // One lock at a time; the view is not copied.
                    let name = self.name_of(id);
                    let view = lock(&self.view);
                    view.number == 0 || name.is_some_and(|n| view.members.contains(&n))
                });
                let again = match decided {
                    forwards::Forwarded::Route { again } => again,
                    forwards::Forwarded::Refuse => {
                        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        if seq != 0 {
                            self.answer(ReplyTo { id, generation }, Frame::Refused { seq });
                        }
                        return;
                    }
                };
                // The core notes when it first had the message
                // (`first_had`), under its lock, so it orders with the
                // sessions' takeovers.
                let committed = state.act(|core| {
                    if again {
                        core.route_again_from_peer(message, &groups)
                    } else {
                        core.route_from_peer(message, &groups)
                    }
                });
                if seq != 0 {
                    // The publisher's acknowledgement waits for this node's
                    // copies (and their chains) to hold the message.
                    let from = ReplyTo { id, generation };
                    if committed.is_done() {
                        self.answer(from, Frame::Ack { seq });
                    } else if let Some(me) =
                        self.state_owner.get().and_then(std::sync::Weak::upgrade)
                    {
                        tokio::spawn(async move {
                            // Not committed here: refused, so the sender
                            // holds it and routes it again.
                            let answer = match committed.wait().await {
                                Ok(()) => Frame::Ack { seq },
                                Err(_) => Frame::Refused { seq },
                            };
                            me.answer(from, answer);
                        });
                    }
                }
            }
        }
    }

    /// Keeps the outbound link to peer `id` open: dial (its certificate
    /// must name it), send the snapshot, then stream frames; redial when it
    /// drops.
    pub(super) async fn dial_loop(
        self: Arc<Self>,
        id: NodeId,
        state: Arc<State>,
        stop: CancellationToken,
    ) {
        let (Some(addr), Some(name)) = (self.addr_of(id), self.name_of(id)) else {
            return;
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            // A member retired by an admin call is not dialled.
            let members = self.membership();
            if !members.is_empty() && !members.contains(&name) {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.cancelled() => return,
                }
            }
            let attempt = async {
                let s = tokio::time::timeout(
                    FAILURE_TIMEOUT,
                    TcpStream::connect((addr.host(), addr.port())),
                )
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
                let _ = s.set_nodelay(true);
                handshake::dial(s, &self.me, &Purpose::Link, self.tls.as_deref(), &name)
                    .await
                    .map_err(|e| e.to_string())
            };
            let stream = tokio::select! {
                r = attempt => r,
                _ = stop.cancelled() => return,
            };
            match stream {
                Ok(s) => {
                    backoff = Duration::from_millis(100);
                    tracing::debug!("link to peer open");
                    tokio::select! {
                        _ = self.write_link(id, s, &state) => {}
                        _ = stop.cancelled() => return,
                    }
                    tracing::warn!("link to peer closed");
                }
                Err(e) => tracing::debug!(error = %e, "cannot reach peer"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Sends the snapshot, registers the link for live changes, then writes
    /// whatever is queued until the connection fails.
    pub(super) async fn write_link(&self, id: NodeId, mut s: handshake::PeerStream, state: &State) {
        let tx = Arc::new(LinkTx::default());
        {
            // Under the core's lock: changes made after the snapshot reach
            // this link, and none made before it is sent twice or lost.
            let mut core = state.core();
            // Every change made so far is in the snapshot below: batches
            // numbered up to here are not sent on this link again.
            let covers = state.last_sequenced();
            tx.snapshot_covers.store(covers, Ordering::Release);
            tx.copies_cover.store(covers, Ordering::Release);
            tx.push(&Frame::Reset, &self.stats.dropped);
            for filter in core.local_interest() {
                tx.push(
                    &Frame::Interest {
                        filter,
                        gained: true,
                    },
                    &self.stats.dropped,
                );
            }
            for (topic, message, version) in core.retained_all() {
                tx.push(
                    &Frame::Retained {
                        topic,
                        message,
                        version,
                    },
                    &self.stats.dropped,
                );
            }
            // The sessions whose chain (with the peer in the view) holds
            // the peer: a returning owner or replica must have them before
            // it says ready.
            let peer_name = self.name_of(id).unwrap_or_default();
            let peer = peer_name.as_str();
            let mut members = self.view().members;
            if !members.iter().any(|m| m == peer) {
                members.push(peer.to_string());
            }
            let in_chain = |client: &str| {
                let ms: Vec<Member<'_>> = members.iter().map(|n| Member(n)).collect();
                mqlb_placement::rank(client.as_bytes(), &ms)
                    .into_iter()
                    .take(self.replication)
                    .any(|m| m.0 == peer)
            };
            // This node's own sessions go acknowledged: once the peer has
            // them all, the changes it was owed up to `covers` (sent on a
            // link that broke, or made while there was none) are confirmed
            // (`commits`). Then the copies kept for others, `SyncDone` and
            // the `Promoted` word (`opening::sessions`).
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let promoted = lock(&self.promotions).mine();
            let own = {
                let replicas = lock(&self.replicas);
                let opening = super::opening::Opening {
                    me: &self.me,
                    seq,
                    now: Instant::now(),
                    in_chain: &in_chain,
                    name_of: &|h| self.name_of(h),
                    seen: &|client| self.seen_frame(client),
                    promoted,
                };
                super::opening::sessions(&core, &replicas, &opening, &mut |f| {
                    tx.push(&f, &self.stats.dropped);
                })
            };
            let released = lock(&self.waiting).expect_resync(seq, id, own, covers);
            self.act_on(released);
            // The state store's keys whose chain holds the peer, then its
            // word that this node is synced for its view; the link is
            // registered under the store's lock, so a change made after
            // the copies reaches it.
            let number = self.view().number;
            let in_key_chain = |key: &[u8]| {
                let ms: Vec<Member<'_>> = members.iter().map(|n| Member(n)).collect();
                mqlb_placement::rank(key, &ms)
                    .into_iter()
                    .take(self.replication)
                    .any(|m| m.0 == peer)
            };
            state.statestore.with_copies(in_key_chain, |copies| {
                for copy in copies {
                    tx.push(
                        &Frame::StoreCopy {
                            seq: 0,
                            view: number,
                            copy: Some(copy),
                        },
                        &self.stats.dropped,
                    );
                }
                tx.push(&Frame::StoreSynced { view: number }, &self.stats.dropped);
                let mut links = lock(&self.links);
                for f in lock(&self.early_answers).remove(&id).unwrap_or_default() {
                    tx.push(&f, &self.stats.dropped);
                }
                links.insert(id, tx.clone());
            });
            self.tell_reachable(&mut core);
        }
        loop {
            let _ = tokio::time::timeout(PING_EVERY, tx.ready.notified()).await;
            if tx.overflowed() {
                // Unregistered below first: nothing more is queued for it,
                // and what waited on it is released as for a dead link.
                break;
            }
            let mut out = std::mem::take(&mut *lock(&tx.buf));
            if out.is_empty() {
                let _ = Frame::Ping.encode(&mut out);
            }
            match tokio::time::timeout(FAILURE_TIMEOUT, s.write_all(&out)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        let current = {
            let mut links = lock(&self.links);
            let current = links.get(&id).is_some_and(|t| Arc::ptr_eq(t, &tx));
            if current {
                links.remove(&id);
            }
            current
        };
        if current {
            // What was in flight on it is lost (`unlinked`).
            self.unlinked(id);
        }
        self.tell_reachable(&mut state.core());
    }

    /// `peer`'s answers in flight to this node are lost (the link they
    /// come on closed or was replaced). Its forwards are sent again; the
    /// chain changes it was sent stay owed to it (`commits`), and the
    /// sessions' copies go again, whole, on the link to it if that is open
    /// (`resync_link`); otherwise the next link's snapshot holds them.
    pub(super) fn answers_lost(&self, peer: NodeId, state: &State) {
        self.unlinked(peer);
        self.resync_link(peer, state);
    }

    /// Sends `peer`'s chain copies of this node's sessions whole again on
    /// the open link to it, acknowledged: once all are, what it is owed up
    /// to now is confirmed. Later batches only go on the link after them;
    /// interest and retained messages are unaffected (no changes of theirs
    /// were waiting).
    fn resync_link(&self, peer: NodeId, state: &State) {
        let Some(tx) = lock(&self.links).get(&peer).cloned() else {
            return;
        };
        let Some(name) = self.name_of(peer) else {
            return;
        };
        let released = {
            // Under the core's lock, like a link snapshot: the copies hold
            // every change numbered so far, and none after.
            let core = state.core();
            let covers = state.last_sequenced();
            tx.copies_cover.fetch_max(covers, Ordering::AcqRel);
            let members = self.view().members;
            let ms: Vec<Member<'_>> = members.iter().map(|n| Member(n)).collect();
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let mut own = 0;
            for client in core.persistent_sessions() {
                let in_chain = mqlb_placement::rank(client.as_bytes(), &ms)
                    .into_iter()
                    .take(self.replication)
                    .any(|m| m.0 == name);
                if !in_chain {
                    continue;
                }
                if let Some(snap) = core.export_session(&client) {
                    self.send_whole(&tx, seq, client.to_string(), snap, self.me.clone());
                    own += 1;
                }
            }
            lock(&self.waiting).expect_resync(seq, peer, own, covers)
        };
        self.act_on(released);
    }

    /// Answers a peer's frame (an acknowledgement or a refusal). The link
    /// to the peer may not be open yet: a node that starts dials its peers
    /// as they dial it, and its first frames can come before this node's
    /// link to it is up. Such answers wait for that link (sent first on
    /// it); an answer lost would leave the peer waiting for good. An
    /// answer for a connection of the peer that has since closed is
    /// dropped.
    pub(super) fn answer(&self, to: ReplyTo, frame: Frame) {
        if !lock(&self.peers).is_current(to.id, to.generation) {
            return;
        }
        let links = lock(&self.links);
        if let Some(tx) = links.get(&to.id) {
            tx.push(&frame, &self.stats.dropped);
            return;
        }
        let mut early = lock(&self.early_answers);
        let q = early.entry(to.id).or_default();
        if q.len() < MAX_EARLY_ANSWERS {
            q.push(frame);
        } else {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn broadcast(&self, f: &Frame) {
        for tx in lock(&self.links).values() {
            tx.push(f, &self.stats.dropped);
        }
    }

    /// Sends `f`, made in batch `log_seq` of the ordered log, on every link
    /// whose snapshot did not already hold it.
    pub(super) fn broadcast_after(&self, log_seq: u64, f: &Frame) {
        for tx in lock(&self.links).values() {
            if log_seq > tx.snapshot_covers() {
                tx.push(f, &self.stats.dropped);
            }
        }
    }
}

/// Writes `bytes` and then relays both ways between a client and its
/// owner's node until either side closes.
pub async fn relay<C>(
    client: &mut C,
    owner: &mut handshake::PeerStream,
    first: &[u8],
) -> io::Result<()>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    owner.write_all(first).await?;
    tokio::io::copy_bidirectional(client, owner)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Seen` frame and the copy it goes with stay back to back while
    /// other tasks push frames onto the same link.
    #[test]
    fn a_seen_frame_and_its_copy_are_never_split() {
        let tx = Arc::new(LinkTx::default());
        let dropped = Arc::new(AtomicU64::new(0));
        let pingers: Vec<_> = (0..3)
            .map(|_| {
                let (tx, dropped) = (tx.clone(), dropped.clone());
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        tx.push(&Frame::Ping, &dropped);
                    }
                })
            })
            .collect();
        for i in 0..500_u64 {
            let client = format!("c{i}");
            let seen = Frame::Seen {
                client: client.clone(),
                prints: vec![i],
            };
            let copy = Frame::Replicate {
                seq: 0,
                client,
                epoch: 1,
                holder: "n1".into(),
                changes: vec![crate::session::SessionChange::Ended],
            };
            tx.push_all(&[seen, copy], &dropped);
        }
        for p in pingers {
            p.join().expect("a pusher panicked");
        }
        let mut buf = std::mem::take(&mut *lock(&tx.buf));
        let mut frames = Vec::new();
        while let Ok(Some(f)) = Frame::decode(&mut buf) {
            frames.push(f);
        }
        let mut pairs = 0;
        for (i, f) in frames.iter().enumerate() {
            if let Frame::Seen { client, .. } = f {
                let next = frames.get(i + 1);
                assert!(
                    matches!(next, Some(Frame::Replicate { client: c, .. }) if c == client),
                    "{client}'s Seen frame was followed by {next:?}"
                );
                pairs += 1;
            }
        }
        assert_eq!(pairs, 500);
        assert_eq!(dropped.load(Ordering::Relaxed), 0);
    }

    /// Frames past the buffer's bound are dropped and counted, and the
    /// link is marked for closing (a resync), never left open with a hole.
    #[test]
    fn an_overflowing_link_is_marked_for_a_resync() {
        let tx = LinkTx::default();
        let dropped = AtomicU64::new(0);
        let big = Frame::Seen {
            client: "c".into(),
            prints: vec![7; seen::MAX_SEEN_PRINTS],
        };
        while !tx.overflowed() {
            tx.push(&big, &dropped);
        }
        assert_eq!(dropped.load(Ordering::Relaxed), 1);
        let held = lock(&tx.buf).len();
        assert!(held <= LINK_BUFFER + wire::MAX_FRAME, "{held} bytes held");
        // Nothing more is queued once it overflowed.
        tx.push(&Frame::Ping, &dropped);
        assert_eq!(lock(&tx.buf).len(), held);
        assert_eq!(dropped.load(Ordering::Relaxed), 2);
    }
}
