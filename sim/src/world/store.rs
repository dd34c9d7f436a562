//! The state store under simulation, and the check that it is
//! linearizable.
//!
//! Each node runs the broker's own `StateStore` (on its simulated wall
//! clock), its own `acks::Acks`, and its own steps of a request
//! (`cluster::store_steps`): `Request` says where a request goes next (run
//! by its key's owner in the view, passed on to it by any other node with
//! `StoreInvoke` and answered by `StoreAck`, retried each tick, failed at
//! its deadline), and `Settle` how its change settles on the key's chain
//! (answered only once every member of the chain in the view has it: a
//! member without a link, or whose link broke, is owed it until it answers
//! a barrier sent after its link opened again, or leaves the view). What
//! is left here is the driving: frames, waits and timers on simulated time.
//! A link opens with the keys whose chain holds the peer and the word that
//! the node is synced for its view; a view change sends every key to its
//! new chain and that word to every peer (`store_rechain`); an owner
//! answers only once every peer in the view is synced (`store_ready`).
//!
//! What it leaves out: the answer reaches the client when the owner has it
//! (the publish that carries it over MQTT is the message path's business,
//! checked by the other invariants), and watches, expiry and fencing are
//! not used. Two clients each make a bounded number of `SET`s (each value
//! unique) and `GET`s on two keys, sequentially, from the node the
//! balancer gives them; the history of each key is checked to be
//! linearizable as a register (Wing and Gong's search): a `SET` answered
//! with an error, or not at all, may or may not have taken effect; a `GET`
//! answered with an error says nothing.

use std::collections::HashSet;

use mqlb_broker::cluster::acks::{Acks, Answer};
use mqlb_broker::cluster::store_steps::{Next, Owner, Request, Round, Settle, RETRY};
use mqlb_broker::statestore::{Handled, Outcome, StateStore, INVOKE_TOPIC};
use mqlb_protocol::{MqttStr, Properties, Publish};

use super::*;

/// The keys the clients use.
const KEYS: [&str; 2] = ["sk0", "sk1"];
/// Clients of the store.
pub(super) const STORE_CLIENTS: usize = 2;
/// Operations per client: bounds the history the check searches.
const OPS: u32 = 14;
/// How long a client waits for an answer.
const CLIENT_WAIT: Time = 10 * SECOND;

/// What an operation asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `SET key v`, with a value no other `SET` uses.
    Set(u32),
    Get,
}

/// What an answer said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Said {
    Ok,
    /// A `GET`'s value (`None`: nil).
    Value(Option<u32>),
}

/// One operation of a client, for the check.
#[derive(Debug, Clone)]
pub(super) struct Op {
    client: usize,
    key: usize,
    kind: Kind,
    invoked: Time,
    /// The first answer: when, and what it said (`None`: an error).
    answer: Option<(Time, Option<Said>)>,
}

/// A store client: sequential operations.
#[derive(Debug, Default)]
pub(super) struct StoreClient {
    made: u32,
    /// The operation it waits for.
    waiting: Option<usize>,
}

/// A node's store side (what a crash loses).
#[derive(Debug)]
pub(super) struct StoreNode {
    pub(super) store: StateStore,
    /// Each peer's word on the view it is synced for.
    pub(super) synced: BTreeMap<usize, u64>,
    /// The broker's own waits for answers, each for a request (by index).
    waits: Acks<usize>,
    /// The sequence numbers of its store frames (its own counter, so the
    /// session frames number as they would without the store).
    next_seq: u64,
    /// The request each state store batch of the change log is for, by
    /// the batch's gate: the log's consumer sends its first round.
    logged: BTreeMap<usize, usize>,
}

impl StoreNode {
    pub(super) fn new(name: &str) -> StoreNode {
        StoreNode {
            store: StateStore::new(name, mqlb_statestore::store::Limits::default()),
            synced: BTreeMap::new(),
            waits: Acks::default(),
            next_seq: 1,
            logged: BTreeMap::new(),
        }
    }
}

/// Where a request stands on the node serving it. (A run has a few dozen
/// requests: their size does not matter.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Phase {
    /// To be tried (again) at the next step.
    Try,
    /// Passed on to the key's owner: waiting for its `StoreAck` (wait
    /// `seq`) until `until`.
    Passed {
        until: Time,
        seq: u64,
    },
    /// Executed here: its change goes down the key's chain.
    Replicating {
        /// The key's chain when the change was made (but this node).
        chain: HashSet<usize>,
        /// The revision the change made (`None`: a read's barrier).
        rev: Option<mqlb_statestore::store::Rev>,
        /// Whom the change is owed to, until the log's consumer hands it
        /// on (`Cluster::replicate_key` runs from `ChangeLog::append`).
        owed: HashSet<u32>,
        /// Its settling on the chain (the broker's own `Settle`), from
        /// when the log's consumer handed it on; until then there is
        /// nothing to do.
        settle: Option<Settle>,
        /// The wait of the settle's current round.
        round: u64,
        copy: Option<Box<mqlb_statestore::store::KeyCopy>>,
        view: u64,
        outcome: Vec<Message>,
        /// The gate of the change's batch in this node's change log: with
        /// a data directory, the answer waits for its write to disk too.
        kept: usize,
    },
    Done,
}

/// A request on one node (the one the client reached, or an owner it was
/// passed to).
#[derive(Debug)]
pub(super) struct StoreReq {
    op: usize,
    node: usize,
    inc: u64,
    publish: Publish,
    key: Vec<u8>,
    /// Its hand-offs and deadline (the broker's own `Request`).
    request: Request,
    phase: Phase,
    /// The node that passed it here, its incarnation and the `seq` to
    /// answer.
    passer: Option<(usize, u64, u64)>,
}

fn store_stream(n: usize) -> u64 {
    (10 << 32) | n as u64
}

/// The store's frames from `from` to `to`: a FIFO of their own beside the
/// link's session frames (nothing orders the two kinds against each
/// other), so a seed's session traffic is the same with or without the
/// store.
fn store_link_stream(from: usize, to: usize) -> u64 {
    (11 << 32) | (from as u64) << 8 | to as u64
}

impl World {
    // ---- clients ---------------------------------------------------------

    /// Schedules each store client's first operation.
    pub(super) fn start_store_clients(&mut self) {
        for c in 0..STORE_CLIENTS {
            let s = store_stream(1_000 + c);
            let d = within(draw(self.seed, s, 0), 50 * MS, 400 * MS);
            self.schedule(s, d, Ev::StoreOp { client: c });
        }
    }

    /// Client `c` makes its next operation, at the node the balancer gives
    /// it (its ID's owner in the view).
    pub(super) fn store_op(&mut self, c: usize) {
        let client = &self.store_clients[c];
        if client.waiting.is_some() || client.made >= OPS {
            return;
        }
        let made = client.made;
        let s = store_stream(1_000 + c);
        let v = draw(self.seed, s, u64::from(made) + 1);
        let key = (v % 2) as usize;
        let kind = if (v >> 8).is_multiple_of(2) {
            Kind::Set(c as u32 * 1_000 + made)
        } else {
            Kind::Get
        };
        let id = format!("ss{c}");
        let Some(node) = self.chain(&id).first().copied().filter(|&n| self.serves(n)) else {
            // No node to reach now: again a little later.
            self.schedule(s, 100 * MS, Ev::StoreOp { client: c });
            return;
        };
        self.store_clients[c].made += 1;
        let op = self.store_ops.len();
        self.store_ops.push(Op {
            client: c,
            key,
            kind,
            invoked: self.now,
            answer: None,
        });
        self.store_clients[c].waiting = Some(op);
        self.cov.store_ops += 1;
        let value;
        let args: Vec<&[u8]> = match kind {
            Kind::Set(x) => {
                value = format!("v{x}");
                vec![b"SET", KEYS[key].as_bytes(), value.as_bytes()]
            }
            Kind::Get => vec![b"GET", KEYS[key].as_bytes()],
        };
        let ts = mqlb_statestore::hlc::Hlc {
            wall_ms: self.true_ms(),
            counter: u64::from(made),
            node: id.clone(),
        };
        let str_of = |s: &str| MqttStr::try_from(s).unwrap_or_default();
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: str_of(INVOKE_TOPIC),
            packet_id: mqlb_protocol::PacketId::new(1),
            properties: Properties {
                response_topic: Some(str_of(&format!("clients/{id}/resp"))),
                correlation_data: Some(Bytes::from(op.to_le_bytes().to_vec())),
                user_properties: vec![(str_of("__ts"), str_of(&ts.to_string()))],
                ..Properties::default()
            },
            payload: Bytes::from(mqlb_statestore::resp3::array(&args)),
        };
        let key = KEYS[key].as_bytes().to_vec();
        self.new_store_req(op, node, publish, key, 0, None);
        // On a stream of its own: the client's next operation is not
        // queued behind it.
        self.schedule_unordered(
            store_stream(2_000 + c),
            CLIENT_WAIT,
            Ev::StoreGiveUp { client: c, op },
        );
    }

    /// Client `c` stops waiting for `op` (no answer within its time).
    pub(super) fn store_give_up(&mut self, c: usize, op: usize) {
        if self.store_clients[c].waiting == Some(op) {
            self.store_clients[c].waiting = None;
            self.cov.store_unanswered += 1;
            self.next_store_op(c);
        }
    }

    fn next_store_op(&mut self, c: usize) {
        let s = store_stream(1_000 + c);
        let d = within(
            draw(self.seed, s, 1 << 20 | self.store_ops.len() as u64),
            MS,
            700 * MS,
        );
        self.schedule(s, d, Ev::StoreOp { client: c });
    }

    /// The answer to `op` reaches its client (the first one counts).
    fn store_answer(&mut self, op: usize, msgs: &[Message]) {
        let o = &mut self.store_ops[op];
        if o.answer.is_some() {
            return;
        }
        let said = msgs.first().and_then(|m| parse_reply(&m.payload));
        o.answer = Some((self.now, said));
        let c = o.client;
        if said.is_some() {
            self.cov.store_ok += 1;
        } else {
            self.cov.store_errors += 1;
        }
        if self.store_clients[c].waiting == Some(op) {
            self.store_clients[c].waiting = None;
            self.next_store_op(c);
        }
    }

    /// True time in milliseconds since the epoch (a client's clock).
    fn true_ms(&self) -> u64 {
        1_790_000_000_000 + self.now / MS
    }

    /// Node `n`'s wall clock in milliseconds since the epoch.
    pub(super) fn wall_ms(&self, n: usize) -> u64 {
        self.wall(n)
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    // ---- serving (`serve_store`) -----------------------------------------

    fn new_store_req(
        &mut self,
        op: usize,
        node: usize,
        publish: Publish,
        key: Vec<u8>,
        hops: u8,
        passer: Option<(usize, u64, u64)>,
    ) {
        let r = self.store_reqs.len();
        self.store_reqs.push(StoreReq {
            op,
            node,
            inc: self.nodes[node].inc,
            publish,
            key,
            request: Request::new(hops, self.instant()),
            phase: Phase::Try,
            passer,
        });
        self.store_step(r);
    }

    /// `key`'s owner and chain in the view installed on node `n`.
    fn key_chain(&self, n: usize, key: &[u8]) -> Vec<usize> {
        let members: Vec<usize> = self.nodes[n].view.iter().copied().collect();
        let mut r = self.rank_over_bytes(key, &members);
        r.truncate(self.cfg.replication);
        r
    }

    fn rank_over_bytes(&self, key: &[u8], among: &[usize]) -> Vec<usize> {
        let members: Vec<Member<'_>> = among
            .iter()
            .map(|&i| Member(&self.nodes[i].name, i))
            .collect();
        mqlb_placement::rank(key, &members)
            .into_iter()
            .map(|m| m.1)
            .collect()
    }

    /// `store_ready`: `n` serves, in a committed view (not the one a
    /// process starts with), and every peer in the view has said it is
    /// synced for the view.
    fn store_ready(&self, n: usize) -> bool {
        let node = &self.nodes[n];
        self.serves(n)
            && node.view_number > 0
            && node.view.iter().all(|&p| {
                p == n
                    || node
                        .store
                        .synced
                        .get(&p)
                        .is_some_and(|v| *v >= node.view_number)
            })
    }

    fn req_alive(&self, r: usize) -> bool {
        let q = &self.store_reqs[r];
        !matches!(q.phase, Phase::Done) && self.nodes[q.node].up && self.nodes[q.node].inc == q.inc
    }

    /// Simulated time at `at` (not before now).
    fn time_at(&self, at: Instant) -> Time {
        let after = at.saturating_duration_since(self.instant());
        self.now + Time::try_from(after.as_micros()).unwrap_or(Time::MAX / 2)
    }

    /// One step of request `r` on its node (`store::serve_store`, driving
    /// the broker's `Request` and `Settle`).
    pub(super) fn store_step(&mut self, r: usize) {
        if !self.req_alive(r) {
            return;
        }
        let n = self.store_reqs[r].node;
        let now = self.instant();
        match &self.store_reqs[r].phase {
            Phase::Try => {}
            &Phase::Passed { until, seq } => {
                if self.now >= until {
                    self.store_cancel(n, seq);
                    self.store_fail(r, true);
                }
                return;
            }
            Phase::Replicating { settle: None, .. } => return,
            &Phase::Replicating {
                settle: Some(ref s),
                round,
                ..
            } => {
                if !s.waiting() {
                    return self.store_replicate(r);
                }
                if now < s.deadline() {
                    return;
                }
                // A hung chain member: not acknowledged, so not `OK`.
                self.store_cancel(n, round);
                return self.store_settled(r, None);
            }
            Phase::Done => return,
        }
        let key = self.store_reqs[r].key.clone();
        let owner = match self.key_chain(n, &key).first().copied() {
            Some(o) if o == n => Owner::Me,
            o => Owner::Peer(o.map(node_id)),
        };
        let ready = owner == Owner::Me && self.store_ready(n);
        let request = self.store_reqs[r].request;
        let next = request.next(now, owner, ready, |o| self.linked(n, o as usize));
        if next != Next::Here {
            self.cov.store_not_ready += u64::from(owner == Owner::Me && next == Next::Retry);
            return self.store_next(r, next);
        }
        let view = self.nodes[n].view_number;
        let now = self.wall_ms(n);
        let q = &self.store_reqs[r];
        let client = format!("ss{}", self.store_ops[q.op].client);
        let chain_owner = |k: &[u8]| self.key_chain(n, k).first() == Some(&n);
        let handled =
            self.nodes[n]
                .store
                .store
                .handle_in_at(&client, &q.publish, view, &chain_owner, now);
        match handled {
            Handled::Elsewhere(k) => {
                let owner = self.key_chain(n, &k).first().map(|&o| node_id(o));
                let next = request.elsewhere(self.instant(), owner, |o| self.linked(n, o as usize));
                self.store_next(r, next);
            }
            Handled::Done { outcome, key, copy } => {
                let msgs = match outcome {
                    Outcome::Route(m) => m,
                    Outcome::Refuse(_) => Vec::new(),
                };
                if key.is_none() {
                    return self.store_done(r, &msgs);
                }
                let chain: HashSet<usize> = self
                    .key_chain(n, &self.store_reqs[r].key)
                    .into_iter()
                    .filter(|&m| m != n)
                    .collect();
                // Through the change log (`store::serve_store`): its
                // consumer sends the chain the change, or a read's barrier,
                // and writes it to a data directory. A read writes the
                // key's state again and answers once it is on disk.
                let entry = match &copy {
                    Some(c) => LogEntry::Store {
                        view,
                        copy: c.clone(),
                    },
                    None => LogEntry::StoreRead {
                        key: key.clone().unwrap_or_default(),
                        view,
                        current: key
                            .as_deref()
                            .filter(|_| self.cfg.disk)
                            .and_then(|k| self.nodes[n].store.store.copy_of(k))
                            .map(Box::new),
                    },
                };
                let Some(kept) = self.sequence_drawing(n, vec![entry], store_stream(n)) else {
                    return;
                };
                self.nodes[n].store.logged.insert(kept, r);
                self.store_reqs[r].phase = Phase::Replicating {
                    owed: chain.iter().map(|&m| node_id(m)).collect(),
                    chain,
                    rev: copy.as_ref().map(|c| c.rev),
                    settle: None,
                    round: 0,
                    copy,
                    view,
                    outcome: msgs,
                    kept,
                };
            }
        }
    }

    /// Request `r` goes where the broker's `Request` said (not `Here`).
    fn store_next(&mut self, r: usize, next: Next) {
        match next {
            Next::Pass(o) => self.store_pass(r, o as usize),
            Next::Retry => self.store_retry(r),
            Next::Here | Next::Unavailable => self.store_fail(r, false),
        }
    }

    /// Passes request `r` to the key's owner `o` (linked).
    fn store_pass(&mut self, r: usize, o: usize) {
        let n = self.store_reqs[r].node;
        let seq = self.nodes[n].store.next_seq;
        self.nodes[n].store.next_seq += 1;
        self.store_register(n, seq, HashSet::from([o]), r);
        self.cov.store_passed += 1;
        let q = &self.store_reqs[r];
        let client = format!("ss{}", self.store_ops[q.op].client);
        let message = mqlb_broker_core::snapshot::publish_to_message(
            &q.publish,
            Some(&client),
            self.instant(),
        );
        let frame = Frame::StoreInvoke {
            seq,
            client,
            hops: q.request.hops() + 1,
            message,
        };
        let until = self.time_at(Request::passed_until(self.instant()));
        self.store_reqs[r].phase = Phase::Passed { until, seq };
        self.send_store(n, o, &frame);
        // Unordered: a deadline on the node's stream would hold back every
        // retry queued after it (every request of the node), to the deadline.
        self.schedule_unordered(store_stream(n), until - self.now, Ev::StoreStep { req: r });
    }

    fn store_retry(&mut self, r: usize) {
        let n = self.store_reqs[r].node;
        let retry = Time::try_from(RETRY.as_micros()).unwrap_or(Time::MAX / 2);
        self.schedule(store_stream(n), retry, Ev::StoreStep { req: r });
    }

    /// Node `n` gives up wait `seq`.
    fn store_cancel(&mut self, n: usize, seq: u64) {
        self.nodes[n].store.waits.cancel(seq);
    }

    /// The log's consumer handed on the state store batch behind `gate`
    /// on `n` (`Cluster::append`): its request's settling starts, and its
    /// first round goes out.
    pub(super) fn store_handed_on(&mut self, n: usize, gate: usize) {
        let Some(r) = self.nodes[n].store.logged.remove(&gate) else {
            return;
        };
        let now = self.instant();
        if let Phase::Replicating { owed, settle, .. } = &mut self.store_reqs[r].phase {
            *settle = Some(Settle::new(std::mem::take(owed), now));
            self.store_replicate(r);
        }
    }

    /// `store_round`: one round of the change (or a barrier) to the
    /// members it is owed to that have a link.
    fn store_replicate(&mut self, r: usize) {
        let n = self.store_reqs[r].node;
        let now = self.instant();
        let view: HashSet<u32> = self.nodes[n].view.iter().map(|&m| node_id(m)).collect();
        let linked: HashSet<u32> = (0..self.nodes.len())
            .filter(|&m| m != n && self.linked(n, m))
            .map(node_id)
            .collect();
        let seq = self.nodes[n].store.next_seq;
        let Phase::Replicating {
            settle: Some(settle),
            copy,
            view: made_in,
            round,
            ..
        } = &mut self.store_reqs[r].phase
        else {
            return;
        };
        let to = match settle.round(now, |m| view.contains(&m), |m| linked.contains(&m)) {
            Round::Send(to) => to,
            other => return self.store_round_over(r, other),
        };
        *round = seq;
        self.nodes[n].store.next_seq += 1;
        let frame = Frame::StoreCopy {
            seq,
            view: *made_in,
            copy: copy.take().map(|c| *c),
        };
        let until = settle.deadline();
        for &m in &to {
            self.send_store(n, m as usize, &frame);
        }
        self.store_register(n, seq, to.iter().map(|&m| m as usize).collect(), r);
        let at = self.time_at(until);
        self.schedule_unordered(store_stream(n), at - self.now, Ev::StoreStep { req: r });
    }

    /// The wait of request `r`'s round ended with `answer` (`None`: its
    /// deadline passed).
    fn store_settled(&mut self, r: usize, answer: Option<Answer>) {
        let now = self.instant();
        let Phase::Replicating {
            settle: Some(settle),
            ..
        } = &mut self.store_reqs[r].phase
        else {
            return;
        };
        self.cov.store_refused += u64::from(answer == Some(Answer::Refused));
        let next = settle.ended(answer, now);
        self.store_round_over(r, next);
    }

    /// What request `r`'s settling does after a round (not `Send`).
    fn store_round_over(&mut self, r: usize, next: Round) {
        match next {
            Round::Committed => self.store_finish(r),
            Round::Retry => {
                self.cov.store_owed += 1;
                self.store_retry(r);
            }
            Round::Failed | Round::Send(_) => self.store_fail(r, false),
        }
    }

    fn store_register(&mut self, n: usize, seq: u64, nodes: HashSet<usize>, r: usize) {
        let ids: HashSet<u32> = nodes.iter().map(|&m| node_id(m)).collect();
        // Every caller names someone: nothing is given back.
        let _ = self.nodes[n].store.waits.register(seq, ids, r);
    }

    /// The node request `r` is on.
    pub(super) fn store_node(&self, r: usize) -> usize {
        self.store_reqs[r].node
    }

    /// Request `r`'s wait ended with `answer`.
    fn store_answered(&mut self, r: usize, answer: Answer) {
        if !self.req_alive(r) {
            return;
        }
        match &self.store_reqs[r].phase {
            Phase::Passed { .. } => {
                if Request::owner_answered(Some(&answer)) {
                    // The owner answered the client.
                    self.store_reqs[r].phase = Phase::Done;
                } else {
                    self.store_fail(r, true);
                }
            }
            Phase::Replicating { .. } => self.store_settled(r, Some(answer)),
            _ => {}
        }
    }

    /// The change is on every member: the answer goes out. Checked here:
    /// every member of the key's chain still in the view has the key at
    /// this revision or newer (docs/statestore.md, "the rule"); and the
    /// revision is noted as acknowledged.
    pub(super) fn store_finish(&mut self, r: usize) {
        if !self.req_alive(r) {
            return;
        }
        if let Phase::Replicating { kept: g, .. } = self.store_reqs[r].phase {
            match self.gates[g].state {
                GateState::Pending => return self.join(vec![g], Then::StoreFinish(r)),
                GateState::Failed => return self.store_fail(r, false),
                GateState::Done => {}
            }
        }
        let (msgs, chain, made) = match &mut self.store_reqs[r].phase {
            Phase::Replicating {
                outcome,
                chain,
                rev,
                ..
            } => (std::mem::take(outcome), std::mem::take(chain), *rev),
            _ => (Vec::new(), HashSet::new(), None),
        };
        let n = self.store_reqs[r].node;
        let key = self.store_reqs[r].key.clone();
        if let Some(rev) = made {
            let mut members: Vec<usize> = chain.into_iter().collect();
            members.sort_unstable();
            for m in members {
                // (A member down now answered from its disk: it reads the
                // change back when it restarts, which the linearizability
                // check then covers.)
                let up = self.nodes[m].up;
                let counted = self.nodes[n].view.contains(&m);
                if counted && up && self.store_rev(m, &key).is_none_or(|h| h < rev) {
                    if self.trace {
                        println!(
                            "{:>10.3}ms store: {} answered at {:?} on {}, {} has {:?}",
                            self.now as f64 / 1000.0,
                            String::from_utf8_lossy(&key),
                            rev,
                            self.nodes[n].name,
                            self.nodes[m].name,
                            self.store_rev(m, &key)
                        );
                    }
                    self.bad.push(format!(
                        "state store: a change to {} answered while {} in its chain lacks it",
                        String::from_utf8_lossy(&key),
                        self.nodes[m].name
                    ));
                }
            }
            let acked = self.store_acked_rev.entry(key).or_default();
            *acked = (*acked).max(rev);
        }
        self.store_done(r, &msgs);
    }

    /// `key`'s revision on node `n`, if it has the key.
    fn store_rev(&self, n: usize, key: &[u8]) -> Option<mqlb_statestore::store::Rev> {
        if !self.nodes[n].up {
            return None;
        }
        self.nodes[n]
            .store
            .store
            .copies(|k| k == key)
            .first()
            .map(|c| c.rev)
    }

    /// Whether `n` is the only live node holding some key's last
    /// acknowledged revision: the other chain member was lost (or came
    /// back blank) and the key was not copied again yet (its link was
    /// down). Losing `n` too is a second failure, outside what R = 2
    /// promises: the runs do not crash or cut off such a node.
    pub(super) fn store_sole_holder(&self, n: usize) -> bool {
        self.store_acked_rev.iter().any(|(key, acked)| {
            self.store_rev(n, key).is_some_and(|r| r >= *acked)
                && !(0..self.nodes.len())
                    .any(|m| m != n && self.store_rev(m, key).is_some_and(|r| r >= *acked))
        })
    }

    /// Request `r` is answered with `msgs` (the owner's answer); a passer
    /// hears that it was.
    fn store_done(&mut self, r: usize, msgs: &[Message]) {
        self.store_reqs[r].phase = Phase::Done;
        let op = self.store_reqs[r].op;
        self.store_answer(op, msgs);
        if let Some((p, p_inc, seq)) = self.store_reqs[r].passer {
            let n = self.store_reqs[r].node;
            if self.nodes[p].up && self.nodes[p].inc == p_inc {
                self.answer(n, p, Frame::StoreAck { seq, ok: true }, true);
            }
        }
    }

    /// Request `r` gets an error (`lost`: it reached an owner that was
    /// lost before it answered).
    fn store_fail(&mut self, r: usize, lost: bool) {
        let why = if lost {
            "the state store node handling the request was lost"
        } else {
            "the state store is unavailable"
        };
        let n = self.store_reqs[r].node;
        let msgs = match self.nodes[n]
            .store
            .store
            .unavailable(&self.store_reqs[r].publish, why)
        {
            Outcome::Route(m) => m,
            Outcome::Refuse(_) => Vec::new(),
        };
        // Answered: for a passed-on request, with a failure.
        self.store_reqs[r].phase = Phase::Done;
        let op = self.store_reqs[r].op;
        self.store_answer(op, &msgs);
        if let Some((p, p_inc, seq)) = self.store_reqs[r].passer {
            if self.nodes[p].up && self.nodes[p].inc == p_inc {
                self.answer(n, p, Frame::StoreAck { seq, ok: false }, true);
            }
        }
    }

    // ---- frames ------------------------------------------------------------

    /// `send_frame` on the store's own stream of the link.
    pub(super) fn send_store(&mut self, from: usize, to: usize, frame: &Frame) {
        let open = self.can_send(from, to);
        self.send_on(store_link_stream(from, to), from, to, frame, open);
    }

    /// A link from `from` to `to` opens: after the session snapshot, the
    /// store's part (`store_link_frames`).
    pub(super) fn store_link_open(&mut self, from: usize, to: usize) {
        for f in self.store_link_frames(from, to) {
            self.send_store(from, to, &f);
        }
    }

    /// A store frame from `from` at `to`.
    pub(super) fn store_frame(&mut self, from: usize, from_inc: u64, to: usize, f: Frame) {
        match f {
            Frame::StoreInvoke {
                seq,
                client: _,
                hops,
                message,
            } => {
                let Some(op) = message
                    .properties
                    .correlation_data
                    .as_ref()
                    .and_then(|c| <[u8; 8]>::try_from(c.as_ref()).ok())
                    .map(usize::from_le_bytes)
                else {
                    return;
                };
                let p = mqlb_broker_core::snapshot::message_to_publish(
                    &message,
                    message.qos,
                    false,
                    &[],
                    self.instant(),
                );
                let key = StateStore::key_of(&p).unwrap_or_default();
                self.new_store_req(op, to, p, key, hops, Some((from, from_inc, seq)));
            }
            Frame::StoreCopy { seq, view, copy } => {
                let ok = view >= self.nodes[to].view_number;
                let mut kept = None;
                if let Some(c) = copy {
                    let now = self.wall_ms(to);
                    // On this node's disk before it is acknowledged.
                    let logged = self.cfg.disk.then(|| c.clone());
                    self.nodes[to].store.store.install_at(c, now);
                    if let Some(c) = logged {
                        kept = self.sequence(to, vec![LogEntry::StoreReplica(Box::new(c))]);
                    }
                }
                if seq == 0 {
                    return;
                }
                match kept {
                    Some(g) => {
                        let then = Then::StoreAck {
                            node: to,
                            inc: self.nodes[to].inc,
                            to: from,
                            to_inc: from_inc,
                            seq,
                            ok,
                        };
                        self.join(vec![g], then);
                    }
                    None => self.answer(to, from, Frame::StoreAck { seq, ok }, true),
                }
            }
            Frame::StoreAck { seq, ok } => {
                if let Some((r, answer)) = self.nodes[to].store.waits.acked(node_id(from), seq, ok)
                {
                    self.store_answered(r, answer);
                }
            }
            Frame::StoreSynced { view } => {
                let v = self.nodes[to].store.synced.entry(from).or_insert(0);
                *v = (*v).max(view);
            }
            _ => {}
        }
    }

    /// `n`'s link to `g` is gone: its waits on `g` end.
    pub(super) fn store_link_lost(&mut self, n: usize, g: usize) {
        self.store_waits_end(n, &[node_id(g)]);
    }

    /// `n`'s waits on `gone` end (`release_store_waits`).
    pub(super) fn store_waits_end(&mut self, n: usize, gone: &[u32]) {
        for (r, answer) in self.nodes[n].store.waits.lost(gone) {
            self.store_answered(r, answer);
        }
    }

    /// The frames a link from `from` to `to` opens with, after the session
    /// snapshot: the keys whose chain (with `to` in the view) holds `to`,
    /// then the word that `from` is synced for its view.
    fn store_link_frames(&self, from: usize, to: usize) -> Vec<Frame> {
        let mut members: Vec<usize> = self.nodes[from].view.iter().copied().collect();
        if !members.contains(&to) {
            members.push(to);
        }
        let r = self.cfg.replication;
        let mut copies = self.nodes[from].store.store.copies(|k| {
            self.rank_over_bytes(k, &members)
                .into_iter()
                .take(r)
                .any(|m| m == to)
        });
        copies.sort_by(|a, b| a.key.cmp(&b.key));
        let mut frames: Vec<Frame> = copies
            .into_iter()
            .map(|c| Frame::StoreCopy {
                seq: 0,
                view: self.nodes[from].view_number,
                copy: Some(c),
            })
            .collect();
        frames.push(Frame::StoreSynced {
            view: self.nodes[from].view_number,
        });
        frames
    }

    /// `store_rechain` on every live node after a view change.
    pub(super) fn store_rechain(&mut self, n: usize) {
        if !self.nodes[n].up {
            return;
        }
        let mut copies = self.nodes[n].store.store.copies(|_| true);
        copies.sort_by(|a, b| a.key.cmp(&b.key));
        for c in copies {
            let chain = self.key_chain(n, &c.key);
            let frame = Frame::StoreCopy {
                seq: 0,
                view: self.nodes[n].view_number,
                copy: Some(c),
            };
            for m in chain {
                if m != n && self.linked(n, m) {
                    self.send_store(n, m, &frame);
                }
            }
        }
        let synced = Frame::StoreSynced {
            view: self.nodes[n].view_number,
        };
        for p in 0..self.nodes.len() {
            if p != n && self.linked(n, p) {
                self.send_store(n, p, &synced);
            }
        }
    }

    // ---- the check ---------------------------------------------------------

    /// Each key's history is linearizable as a register.
    pub(super) fn check_store(&mut self) {
        for (key, name) in KEYS.iter().enumerate() {
            let ops: Vec<&Op> = self
                .store_ops
                .iter()
                .filter(|o| o.key == key)
                // A failed or unanswered `GET` says nothing.
                .filter(|o| o.kind != Kind::Get || matches!(o.answer, Some((_, Some(_)))))
                .collect();
            if let Err(why) = linearizable(&ops) {
                self.bad.push(format!(
                    "state store key {name} not linearizable ({why}): {}",
                    history(&ops)
                ));
            }
        }
    }
}

/// A reply's meaning for the check (`None`: an error).
fn parse_reply(payload: &[u8]) -> Option<Said> {
    if payload == b"+OK\r\n" {
        return Some(Said::Ok);
    }
    if payload == b"$-1\r\n" {
        return Some(Said::Value(None));
    }
    let text = std::str::from_utf8(payload).ok()?;
    let rest = text.strip_prefix('$')?;
    let (_, value) = rest.split_once("\r\n")?;
    let v = value.strip_suffix("\r\n")?.strip_prefix('v')?;
    v.parse().ok().map(|x| Said::Value(Some(x)))
}

/// The history, for the report.
fn history(ops: &[&Op]) -> String {
    ops.iter()
        .map(|o| {
            let what = match o.kind {
                Kind::Set(v) => format!("SET v{v}"),
                Kind::Get => "GET".into(),
            };
            let end = match o.answer {
                Some((t, Some(Said::Ok))) => format!("OK@{:.1}", t as f64 / 1000.0),
                Some((t, Some(Said::Value(v)))) => format!("{v:?}@{:.1}", t as f64 / 1000.0),
                Some((t, None)) => format!("ERR@{:.1}", t as f64 / 1000.0),
                None => "-".into(),
            };
            format!(
                "c{} {what} {:.1}..{end}",
                o.client,
                o.invoked as f64 / 1000.0
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Wing and Gong's search for an order of `ops` that a single register
/// explains, each taking effect between its call and its answer. A `SET`
/// without an `OK` may take effect at any time after its call, or never.
fn linearizable(ops: &[&Op]) -> Result<(), &'static str> {
    if ops.len() > 64 {
        return Err("history too long to check");
    }
    // (answer time, or never; whether it must take effect)
    let ends: Vec<(Time, bool)> = ops
        .iter()
        .map(|o| match (o.kind, o.answer) {
            (Kind::Set(_), Some((t, Some(Said::Ok)))) => (t, true),
            (Kind::Set(_), _) => (Time::MAX, false),
            (Kind::Get, Some((t, Some(_)))) => (t, true),
            (Kind::Get, _) => (Time::MAX, false),
        })
        .collect();
    let must: u64 = ends
        .iter()
        .enumerate()
        .filter(|(_, e)| e.1)
        .fold(0, |m, (i, _)| m | 1 << i);
    let mut failed: HashSet<(u64, Option<u32>)> = HashSet::new();
    fn search(
        ops: &[&Op],
        ends: &[(Time, bool)],
        must: u64,
        done: u64,
        value: Option<u32>,
        failed: &mut HashSet<(u64, Option<u32>)>,
    ) -> bool {
        if done & must == must {
            return true;
        }
        if failed.contains(&(done, value)) {
            return false;
        }
        // The earliest answer among the operations not yet placed: nothing
        // called after it can come before it.
        let horizon = (0..ops.len())
            .filter(|i| done & (1 << i) == 0)
            .map(|i| ends[i].0)
            .min()
            .unwrap_or(Time::MAX);
        for i in 0..ops.len() {
            if done & (1 << i) != 0 || ops[i].invoked > horizon {
                continue;
            }
            let next = match (ops[i].kind, ops[i].answer) {
                (Kind::Set(v), _) => Some(Some(v)),
                (Kind::Get, Some((_, Some(Said::Value(v))))) => (v == value).then_some(value),
                (Kind::Get, _) => None,
            };
            if let Some(v) = next {
                if search(ops, ends, must, done | 1 << i, v, failed) {
                    return true;
                }
            }
        }
        failed.insert((done, value));
        false
    }
    if search(ops, &ends, must, 0, None, &mut failed) {
        Ok(())
    } else {
        Err("no order of the operations explains the answers")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, kind: Kind, invoked: Time, answer: Option<(Time, Option<Said>)>) -> Op {
        Op {
            client,
            key: 0,
            kind,
            invoked,
            answer,
        }
    }

    /// The checker accepts what a register can do and refuses what it
    /// cannot: a read of an older value after a newer write was answered,
    /// a read of a value never written; a failed write may or may not
    /// have taken effect.
    #[test]
    fn the_checker_knows_a_register() {
        let ok = Some(Said::Ok);
        let val = |v| Some(Said::Value(v));
        let set1 = op(0, Kind::Set(1), 0, Some((10, ok)));
        let set2 = op(1, Kind::Set(2), 20, Some((30, ok)));
        let get2 = op(0, Kind::Get, 40, Some((50, val(Some(2)))));
        let get1 = op(0, Kind::Get, 40, Some((50, val(Some(1)))));
        assert!(linearizable(&[&set1, &set2, &get2]).is_ok());
        assert!(linearizable(&[&set1, &set2, &get1]).is_err(), "stale read");
        // Concurrent writes: either value may be read.
        let set2c = op(1, Kind::Set(2), 5, Some((30, ok)));
        assert!(linearizable(&[&set1, &set2c, &get1]).is_ok());
        // A failed write: read or not.
        let set3 = op(1, Kind::Set(3), 20, Some((30, None)));
        let get3 = op(0, Kind::Get, 40, Some((50, val(Some(3)))));
        assert!(linearizable(&[&set1, &set3, &get3]).is_ok());
        assert!(linearizable(&[&set1, &set3, &get1]).is_ok());
        // A value never written; nil after a write answered OK.
        let get9 = op(0, Kind::Get, 40, Some((50, val(Some(9)))));
        assert!(linearizable(&[&set1, &get9]).is_err());
        let nil = op(0, Kind::Get, 40, Some((50, val(None))));
        assert!(linearizable(&[&set1, &nil]).is_err());
        // Reads flip back: a read saw 3 (a failed write), a later one 1.
        let get3a = op(0, Kind::Get, 40, Some((50, val(Some(3)))));
        let get1b = op(0, Kind::Get, 60, Some((70, val(Some(1)))));
        assert!(linearizable(&[&set1, &set3, &get3a, &get1b]).is_err());
        assert_eq!(parse_reply(b"$3\r\nv12\r\n"), Some(Said::Value(Some(12))));
        assert_eq!(parse_reply(b"-ERR x\r\n"), None);
    }
}
