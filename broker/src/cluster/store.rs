//! The state store across the cluster: keys placed and chain-replicated
//! like sessions.
//!
//! * **Placement.** A key's owner is rank 0 of the rendezvous hash (the
//!   `placement` crate, as for client IDs) of the key over the committed
//!   view; its chain is the top `replication_factor` ranks.
//! * **Requests** are executed by the key's owner only. A node that gets
//!   a request for a key it does not own passes it on
//!   ([`Frame::StoreInvoke`]); the owner's answer (and any key
//!   notification) is an ordinary publish, routed back by the requester's
//!   subscription to its response topic.
//! * **The rule.** The owner answers only after every other live member
//!   of the key's chain has applied the change ([`Frame::StoreCopy`],
//!   acknowledged by [`Frame::StoreAck`]), so an acknowledged `SET`
//!   survives the loss of any one node at R = 2. A read sends the chain a
//!   barrier (a copy-less `StoreCopy`) and answers after its
//!   acknowledgement: nothing it returns can be lost with the owner, so
//!   reads are linearizable. A member that is already in a newer view
//!   refuses, and the owner answers with an error instead of `OK`.
//! * **View changes.** Each node sends every key it holds (deletions
//!   included, newest revision wins) to the key's new chain, then
//!   [`Frame::StoreSynced`]; a node answers for its keys in a view only
//!   once every live peer has said it is synced for that view. A change
//!   and the copy taken at a view change are ordered by the store's lock
//!   (the owner check runs under it), so a new owner has every change an
//!   old one acknowledged.
//! * **Expiry** (`PX`) is an absolute time set by the owner's clock and
//!   travels with the key; only the owner tells watchers.

use super::store_steps::{Next, Owner, Request, Round, Settle, RETRY};
use super::*;
use mqlb_protocol::Publish;

/// One round of a state store change sent to its chain: the frames'
/// number, the wait for their answers (`None`: nobody to wait for), and
/// what the change's settling does next ([`Round::Send`]: wait).
#[derive(Debug)]
struct StoreRound {
    seq: u64,
    rx: Option<tokio::sync::oneshot::Receiver<acks::Answer>>,
    step: Round,
}

/// Why a request got an error instead of an answer.
const UNAVAILABLE: &str =
    "the state store is unavailable: the key's owner is changing or unreachable; try again";
/// The request reached the owner, which was lost before it answered: it
/// may or may not have been applied.
const LOST: &str =
    "the state store node handling the request was lost; the request may or may not have been applied";

impl Cluster {
    /// `key`'s owner in the committed view.
    pub fn key_owner(&self, key: &[u8]) -> String {
        let view = lock(&self.view);
        let members: Vec<Member<'_>> = view.members.iter().map(|n| Member(n)).collect();
        mqlb_placement::pick(key, &members, |_| true)
            .map_or_else(|| self.me.clone(), |m| m.0.to_string())
    }

    fn key_chain(&self, key: &[u8]) -> Vec<String> {
        let view = lock(&self.view);
        let members: Vec<Member<'_>> = view.members.iter().map(|n| Member(n)).collect();
        mqlb_placement::rank(key, &members)
            .into_iter()
            .take(self.replication)
            .map(|m| m.0.to_string())
            .collect()
    }

    /// Whether this node may answer for the keys it owns: it serves, and
    /// every live peer has sent what the current view's chains need.
    pub fn store_ready(&self) -> bool {
        if !self.is_serving() {
            return false;
        }
        let view = self.view();
        if view.number == 0 {
            return false;
        }
        let synced = lock(&self.store_synced);
        view.members.iter().filter(|m| **m != self.me).all(|m| {
            self.id_of(m)
                .and_then(|id| synced.get(&id))
                .is_some_and(|v| *v >= view.number)
        })
    }

    /// Serves one state store request from a client of this node: resolves
    /// once it is answered (here or by the key's owner).
    pub fn store_request(
        self: &Arc<Self>,
        state: &Arc<State>,
        client: &str,
        p: Publish,
    ) -> Committed {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let me = self.clone();
        let state = state.clone();
        let client = client.to_string();
        tokio::spawn(async move {
            if me.serve_store(&state, &client, &p, 0).await {
                let _ = tx.send(());
            }
        });
        Committed::when(rx)
    }

    /// Executes the request if this node owns its key, else passes it to
    /// the owner; either way the client gets an answer. Where it goes, when
    /// it tries again and when it gives up is [`Request`]'s (the
    /// simulator's too); this drives it.
    /// Returns whether the answer was committed (routed to the client's
    /// session and held by its chain).
    async fn serve_store(&self, state: &Arc<State>, client: &str, p: &Publish, hops: u8) -> bool {
        let store = &state.statestore;
        let request = Request::new(hops, Instant::now());
        // A malformed request names no key: answered here at once.
        let key = crate::statestore::StateStore::key_of(p);
        // Linked and heard (`hears` takes the links lock itself).
        let reachable = |id: NodeId| {
            self.name_of(id).is_some_and(|n| self.hears(&n)) && lock(&self.links).contains_key(&id)
        };
        let outcome = loop {
            let view = self.view().number;
            let owner = match &key {
                None => Owner::NoKey,
                Some(k) => match self.key_owner(k) {
                    o if o == self.me => Owner::Me,
                    o => Owner::Peer(self.id_of(&o)),
                },
            };
            let ready = owner == Owner::Me && self.store_ready();
            let mut next = request.next(Instant::now(), owner, ready, reachable);
            if next == Next::Here {
                match store.handle_in(client, p, view, &|k| self.key_owner(k) == self.me) {
                    crate::statestore::Handled::Done { outcome, key, copy } => {
                        let Some(key) = key else { break outcome };
                        // Through the node's change log, like every change:
                        // its consumer sends the key's chain the change (or a
                        // read's barrier) and, with a data directory, writes
                        // it to disk; committed once both have it. A read
                        // writes the key's state to disk again and answers
                        // once that is there: everything logged before it is
                        // then on disk too (the writer keeps order), so a
                        // value read is not one a power loss takes back (a
                        // change still waiting for its fsync, read and then
                        // lost: found by the simulator, seed 48836 of the
                        // data-directory runs).
                        let entry = match copy {
                            Some(copy) => LogEntry::Store { view, copy },
                            None => LogEntry::StoreRead {
                                current: state
                                    .disk()
                                    .and_then(|_| store.copy_of(&key))
                                    .map(Box::new),
                                key,
                                view,
                            },
                        };
                        let committed = state.log([entry]);
                        if committed.wait().await.is_ok() {
                            break outcome;
                        }
                        tracing::info!(
                            "state store change not committed: a chain member in a newer view refused it, \
                             one did not answer in time, or the disk did not keep it"
                        );
                        break store.unavailable(p, UNAVAILABLE);
                    }
                    // The view changed in between.
                    crate::statestore::Handled::Elsewhere(key) => {
                        let owner = self.id_of(&self.key_owner(&key));
                        next = request.elsewhere(Instant::now(), owner, reachable);
                    }
                }
            }
            match next {
                Next::Here | Next::Retry => tokio::time::sleep(RETRY).await,
                Next::Unavailable => break store.unavailable(p, UNAVAILABLE),
                Next::Pass(id) => match self.pass_store(id, client, p, request.hops()).await {
                    // Its link closed meanwhile: as if unreachable.
                    None => tokio::time::sleep(RETRY).await,
                    Some(true) => return true,
                    Some(false) => break store.unavailable(p, LOST),
                },
            }
        };
        if let crate::statestore::Outcome::Route(msgs) = outcome {
            let committed = state.act(|core| {
                let mut fx = crate::effects::Effects::none();
                for m in msgs {
                    fx.extend(core.route(m));
                }
                fx
            });
            return committed.wait().await.is_ok();
        }
        true
    }

    /// Passes the request on to peer `id` and waits for its answer: whether
    /// the owner answered the client (`None`: no link to it now).
    async fn pass_store(&self, id: NodeId, client: &str, p: &Publish, hops: u8) -> Option<bool> {
        let tx = lock(&self.links).get(&id).cloned()?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let rx = self.store_wait(seq, id);
        self.stats.store_passed.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let message = crate::snapshot::publish_to_message(p, Some(client), now);
        tx.push(
            &Frame::StoreInvoke {
                seq,
                client: client.to_string(),
                hops: hops + 1,
                message,
            },
            &self.stats.dropped,
        );
        let until = tokio::time::Instant::from_std(Request::passed_until(now));
        let answer = match tokio::time::timeout_at(until, rx).await {
            Ok(Ok(answer)) => Some(answer),
            _ => None,
        };
        let answered = Request::owner_answered(answer.as_ref());
        if !answered {
            lock(&self.store_waits).cancel(seq);
        }
        Some(answered)
    }

    fn store_wait(&self, seq: u64, node: NodeId) -> tokio::sync::oneshot::Receiver<acks::Answer> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiter = std::collections::HashSet::from([node]);
        // One node is always someone to wait for (a sender given back
        // would be dropped here, and the wait end as lost).
        drop(lock(&self.store_waits).register(seq, waiter, tx));
        rx
    }

    /// The change log's state store entry: sends a key's new state (`copy`)
    /// or a read's barrier (`None`), decided in `view`, to the other
    /// members of its chain. Committed once every one of them has it: each
    /// member of the view acknowledged it, or a barrier sent after it, or
    /// left the view. Not committed if one refuses it (it is in a newer
    /// view) or does not answer within
    /// [`STORE_WAIT`](super::store_steps::STORE_WAIT).
    ///
    /// A member without a link, or whose link broke before it answered, is
    /// owed the change, not counted out ([`Settle`], which the simulator
    /// runs too): the change waits for its link to open again, which sends
    /// it every key whose chain holds it, and then for its answer to a
    /// barrier.
    pub(super) fn replicate_key(
        &self,
        key: &[u8],
        view: u64,
        copy: Option<mqlb_statestore::store::KeyCopy>,
    ) -> Committed {
        let owed: std::collections::HashSet<NodeId> = self
            .key_chain(key)
            .iter()
            .filter(|m| **m != self.me)
            .filter_map(|m| self.id_of(m))
            .collect();
        if owed.is_empty() {
            return Committed::now();
        }
        let Some(me) = self.state_owner.get().and_then(std::sync::Weak::upgrade) else {
            return Committed::lost();
        };
        let mut settle = Settle::new(owed, Instant::now());
        // The first round is sent here, in the log's order: changes to a
        // key reach its chain in the order its owner made them.
        let round = self.store_round(&mut settle, view, copy);
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if me.store_settle(settle, view, round).await {
                let _ = tx.send(());
            }
        });
        Committed::when(rx)
    }

    /// Starts a round of `settle` (the key's state the first time, a
    /// barrier after that): sends it to the members it names and registers
    /// the wait for their answers under the same lock as the sends (an
    /// acknowledgement that came before it would find nothing to release,
    /// and the request would time out though applied).
    fn store_round(
        &self,
        settle: &mut Settle,
        view: u64,
        copy: Option<mqlb_statestore::store::KeyCopy>,
    ) -> StoreRound {
        let members: std::collections::HashSet<NodeId> = self
            .current_view()
            .members
            .iter()
            .filter_map(|m| self.id_of(m))
            .collect();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut waits = lock(&self.store_waits);
        let links = lock(&self.links);
        let step = settle.round(
            Instant::now(),
            |id| members.contains(&id),
            |id| links.contains_key(&id),
        );
        let mut rx = None;
        if let Round::Send(to) = &step {
            let frame = Frame::StoreCopy { seq, view, copy };
            for id in to {
                if let Some(tx) = links.get(id) {
                    tx.push(&frame, &self.stats.dropped);
                }
            }
            let (tx, waiter) = tokio::sync::oneshot::channel();
            // `Send` names someone: nothing is given back.
            if waits
                .register(seq, to.iter().copied().collect(), tx)
                .is_none()
            {
                rx = Some(waiter);
            }
        }
        StoreRound { seq, rx, step }
    }

    /// Drives `settle` from its first `round` until the change is on every
    /// member it is owed to, or fails (see [`Cluster::replicate_key`]).
    async fn store_settle(&self, mut settle: Settle, view: u64, mut round: StoreRound) -> bool {
        loop {
            match round.step {
                Round::Committed => return true,
                Round::Failed => return false,
                Round::Retry => {
                    self.stats.store_owed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(RETRY).await;
                    round = self.store_round(&mut settle, view, None);
                }
                Round::Send(_) => {
                    let until = tokio::time::Instant::from_std(settle.deadline());
                    let answer = match round.rx.take() {
                        Some(rx) => tokio::time::timeout_at(until, rx)
                            .await
                            .ok()
                            .and_then(Result::ok),
                        None => None,
                    };
                    if answer.is_none() {
                        // A hung chain member: not acknowledged, so not `OK`.
                        lock(&self.store_waits).cancel(round.seq);
                    }
                    round.step = settle.ended(answer, Instant::now());
                }
            }
        }
    }

    /// Sends `frame` to the other members of `key`'s chain that are
    /// linked; returns them.
    fn push_to_chain(
        &self,
        links: &HashMap<NodeId, Arc<LinkTx>>,
        key: &[u8],
        frame: &Frame,
    ) -> std::collections::HashSet<NodeId> {
        let mut sent = std::collections::HashSet::new();
        for member in self.key_chain(key) {
            if member == self.me {
                continue;
            }
            if let Some((id, tx)) = self
                .id_of(&member)
                .and_then(|id| Some((id, links.get(&id)?)))
            {
                tx.push(frame, &self.stats.dropped);
                sent.insert(id);
            }
        }
        sent
    }

    /// A peer's [`Frame::StoreAck`].
    pub(super) fn store_acked(&self, from: NodeId, seq: u64, ok: bool) {
        let ended = lock(&self.store_waits).acked(from, seq, ok);
        if let Some((tx, answer)) = ended {
            let _ = tx.send(answer);
        }
    }

    /// Peers whose links are gone answer no more.
    pub(super) fn release_store_waits(&self, gone: &[NodeId]) {
        let ended = lock(&self.store_waits).lost(gone);
        for (tx, answer) in ended {
            let _ = tx.send(answer);
        }
    }

    /// A key copy from a peer: installed if newer; acknowledged as applied
    /// unless this node is in a newer view than the sender (an owner that
    /// has not yet heard of a view change must not get an acknowledgement
    /// that the new owner might not see).
    pub(super) fn store_copy(
        &self,
        from: ReplyTo,
        seq: u64,
        view: u64,
        copy: Option<mqlb_statestore::store::KeyCopy>,
        state: &State,
    ) {
        let ok = view >= self.view().number;
        let mut kept = crate::effects::Committed::now();
        if let Some(c) = copy {
            let logged = state.disk().is_some().then(|| c.clone());
            state.statestore.install(c);
            if let Some(c) = logged {
                // On this node's disk before it is acknowledged.
                kept = state.log([LogEntry::StoreReplica(Box::new(c))]);
            }
        }
        if seq == 0 {
            return;
        }
        if kept.is_done() {
            return self.answer(from, Frame::StoreAck { seq, ok });
        }
        let Some(me) = self.state_owner.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        tokio::spawn(async move {
            if kept.wait().await.is_ok() {
                me.answer(from, Frame::StoreAck { seq, ok });
            }
        });
    }

    /// A request a peer passed on: served here (or passed on again), then
    /// acknowledged to the peer.
    pub(super) fn store_invoked(
        &self,
        from: ReplyTo,
        seq: u64,
        client: String,
        hops: u8,
        m: Message,
    ) {
        let (Some(state), Some(me)) = (
            self.state.get().and_then(std::sync::Weak::upgrade),
            self.state_owner.get().and_then(std::sync::Weak::upgrade),
        ) else {
            return;
        };
        tokio::spawn(async move {
            let p = crate::snapshot::message_to_publish(&m, m.qos, false, &[], Instant::now());
            let ok = me.serve_store(&state, &client, &p, hops).await;
            me.answer(from, Frame::StoreAck { seq, ok });
        });
    }

    /// A client's session ended on this node: its watches go everywhere
    /// (each key's owner drops it and sends the key's chain the change).
    pub fn store_forget(&self, client: &str, state: &State) {
        self.broadcast(&Frame::StoreForget {
            client: client.to_string(),
        });
        self.store_forgotten(client, state);
    }

    /// Drops `client`'s watches on the keys this node owns; the keys' new
    /// states go through the change log like any change (to their chains
    /// and the disk). Nobody waits for them.
    pub(super) fn store_forgotten(&self, client: &str, state: &State) {
        let view = self.view().number;
        let copies = state
            .statestore
            .forget(client, view, |k| self.key_owner(k) == self.me);
        if copies.is_empty() {
            return;
        }
        let _unwaited = state.log(copies.into_iter().map(|copy| LogEntry::Store {
            view,
            copy: Box::new(copy),
        }));
    }

    /// A peer is synced for `view`.
    pub(super) fn store_synced(&self, from: NodeId, view: u64) {
        let mut synced = lock(&self.store_synced);
        let v = synced.entry(from).or_insert(0);
        *v = (*v).max(view);
    }

    /// After a view change: every key held here goes to its new chain,
    /// then every peer hears that this node is synced for the view.
    pub(super) fn store_rechain(&self, state: &State, view: &View) {
        let copies = state.statestore.copies(|_| true);
        let links = lock(&self.links);
        for copy in copies {
            let key = copy.key.clone();
            let frame = Frame::StoreCopy {
                seq: 0,
                view: view.number,
                copy: Some(copy),
            };
            self.push_to_chain(&links, &key, &frame);
        }
        for tx in links.values() {
            tx.push(
                &Frame::StoreSynced { view: view.number },
                &self.stats.dropped,
            );
        }
    }
}
