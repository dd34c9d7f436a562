//! What every connection of a broker node shares: the core behind its
//! lock, authentication, and the change log.
//!
//! # The locking contract
//! This is the one place it is written down; other modules point here.
//!
//! * **One core lock** ([`State`]'s mutex around [`Core`]). Outside this
//!   crate it is reached only through calls that take it for one step
//!   ([`State::act`], [`State::ask`], [`State::counts`],
//!   [`State::export_session`], [`State::render_metrics`]); inside, through
//!   `State::core()`.
//! * **Under it**: the core's own state change (the core makes no call
//!   out: it returns effects as data); the time it is given; the numbering
//!   of its log entries (session records, interest, retained writes) as
//!   the next batch of the node's ordered log (`State::sequence`: a counter
//!   and a queue push); a new connection's mailbox registration; a stall's
//!   registration. Cluster code that must act atomically with the core
//!   holds it too: a link's snapshot (which notes the last batch it
//!   covers), a whole re-send of the interest (likewise), telling the core
//!   which peers are reachable, forgetting a dead peer's interest,
//!   installing a committed view together with the publishes held for the
//!   copies it orphans here (`Cluster::deliver`: a client the new view
//!   sends here cannot publish in between).
//! * **The ordered log**: after the lock, `State::commit` hands every
//!   batch numbered so far to the [`ChangeLog`] in order, one at a time
//!   (under its own `appending` mutex; whoever comes first appends the
//!   others' batches too), so every peer and chain member gets the entries
//!   in the order the core made them, encoded outside the core's lock.
//! * **After it**: mailbox pushes and encoding for clients, wake-ups,
//!   forwarded publishes, and every wait for a commit. Nothing awaits while
//!   holding it (it is a `std` mutex: an await under it would not compile
//!   in a `Send` task).
//! * **Order**: the core lock, then the sequencer's queue (a push) or the
//!   mailbox map, or the cluster's mutexes (a step each); or,
//!   without the core lock, `appending`, then the queue (a pop), then the
//!   cluster's own mutexes (the link map, a link's buffer, the peer table,
//!   replicas, the commit waits), each held for a step. No cluster mutex is
//!   held while the core lock or `appending` is taken, so none can deadlock,
//!   with one exception: the cluster's `promoting` mutex is held across a
//!   copy's whole promotion (taking the copy out, importing it into the
//!   core) and across a peer's session changes being applied (whether the
//!   core or a copy takes them), taken with no other lock held and never
//!   under the core lock, so that neither a client of the session nor a
//!   change to it finds it in neither place.
//! * **Nested cluster mutexes**, each always in this order and never the
//!   other way round: the state store's waits, then the link map (a
//!   round's wait is registered under the same lock as its frames are
//!   sent, so no acknowledgement comes before it: `store_round`); the link
//!   map, then the early answers (an answer for a link not yet open waits
//!   for it: `answer`); and, in a link's opening under the core lock, the
//!   state store, then the link map, then the early answers (the link is
//!   registered under the store's lock, so a key change made after its
//!   copies reaches it).
//! * **Known cost**: a link's snapshot exports and encodes every session
//!   under the core lock, and a re-chain exports them under it (and
//!   encodes after). A `/metrics` scrape or a `$SYS` update no longer
//!   scans: the core keeps its counts of connected clients and
//!   subscriptions as they change (3.6 ms under the lock per scrape with
//!   100,000 sessions before; a few nanoseconds now).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::auth::Auth;
use crate::core::Core;
use crate::effects::{ChangeLog, Committed, Effects, LocalLog, LogEntry, NotCommitted};
use crate::outbox::{Outbox, Outgoing};

/// What a node holds and has done (see [`State::counts`]).
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    /// Connected clients.
    pub clients: usize,
    /// Sessions, connected or not.
    pub sessions: usize,
    /// Subscriptions (shared group memberships included).
    pub subscriptions: usize,
    /// Retained messages.
    pub retained: usize,
    /// Messages in, out and dropped.
    pub stats: crate::core::Stats,
}

/// One broker node's shared state.
#[derive(Debug)]
pub struct State {
    core: Mutex<Locked>,
    /// Credentials and topic rules.
    pub auth: Arc<Auth>,
    /// Where persistent-session changes go, in order (see [`State::commit`]).
    log: Arc<dyn ChangeLog>,
    /// Numbers batches of change records under the core's lock.
    sequencer: Mutex<mqlb_broker_core::log::Sequencer<Batch>>,
    /// Held while batches are handed to the log, one at a time.
    appending: Mutex<()>,
    /// Publishers held back by flow control wait here; notified whenever a
    /// subscriber that was behind drains or goes.
    drained: Arc<tokio::sync::Notify>,
    /// The node's peers, in a cluster: where forwards go.
    fabric: std::sync::OnceLock<Arc<dyn crate::fabric::Fabric>>,
    /// What the listeners refused before a CONNECT, and certificate reloads.
    pub fronts: crate::front::FrontStats,
    /// The state store (a single node's; see the module).
    pub statestore: crate::statestore::StateStore,
    /// Changes waited for and not committed, by [`NotCommitted`] reason.
    pub not_committed: [std::sync::atomic::AtomicU64; 2],
    /// Cancelled when a graceful shutdown begins: what holds no session
    /// here (a client relayed to another node) lets go at once instead of
    /// keeping the node up for the grace period.
    pub stopping: tokio_util::sync::CancellationToken,
    /// From reading a QoS 1 / QoS 2 PUBLISH to writing its PUBACK /
    /// PUBREC: what a publisher waits, commits to the session chains
    /// included.
    pub publish_latency: [mqlb_metrics::Histogram; 2],
    /// The data directory, on a durable node (the disk is one of the
    /// change log's consumers; this handle answers whether it is full and
    /// renders its metrics).
    disk: std::sync::OnceLock<Arc<mqlb_storage::Store>>,
    /// QoS 1/2 publishes refused because the data directory was full.
    pub disk_refused: std::sync::atomic::AtomicU64,
    /// Publishes the cluster holds for a takeover on its own account (a
    /// forward lost with its link, or refused), told to the core at its
    /// next lock ([`State::note_held`]): a leaf lock, so a hold made while
    /// the core's lock is held (a link's snapshot) cannot deadlock.
    held_notes: Mutex<Vec<crate::message::Message>>,
    /// Whether `held_notes` has any (checked at every lock, without it).
    has_held_notes: std::sync::atomic::AtomicBool,
}

impl State {
    /// A node with these parts (and a state store with default limits).
    pub fn new(core: Core, auth: Auth, log: Arc<dyn ChangeLog>) -> Arc<State> {
        Self::with_store(core, auth, log, crate::statestore::StateStore::default())
    }

    /// A node with these parts and this state store.
    pub fn with_store(
        core: Core,
        auth: Auth,
        log: Arc<dyn ChangeLog>,
        statestore: crate::statestore::StateStore,
    ) -> Arc<State> {
        Arc::new(State {
            core: Mutex::new(Locked {
                core,
                mailboxes: HashMap::default(),
                calibrate_at: None,
            }),
            auth: Arc::new(auth),
            log,
            sequencer: Mutex::default(),
            appending: Mutex::new(()),
            drained: Arc::default(),
            fabric: std::sync::OnceLock::new(),
            fronts: crate::front::FrontStats::default(),
            statestore,
            not_committed: Default::default(),
            publish_latency: Default::default(),
            disk: std::sync::OnceLock::new(),
            disk_refused: Default::default(),
            stopping: tokio_util::sync::CancellationToken::new(),
            held_notes: Mutex::default(),
            has_held_notes: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The cluster holds `m` for a takeover on its own account: its
    /// publisher's later publishes wait behind it (`Core::note_held`, told
    /// before the core's next call).
    pub(crate) fn note_held(&self, m: &crate::message::Message) {
        lock(&self.held_notes).push(m.clone());
        self.has_held_notes
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Counts a change that was waited for and not committed.
    pub fn not_committed(&self, e: NotCommitted) {
        if let Some(n) = self.not_committed.get(e as usize) {
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Makes this node a member of a cluster: the core reports interest,
    /// retained writes and forwards to `fabric`, stamps retained versions
    /// with `stamp` and refuses peers' stamps further ahead than
    /// `max_clock_drift`. Once, from [`crate::node::Node::new`].
    pub(crate) fn join(
        &self,
        fabric: Arc<dyn crate::fabric::Fabric>,
        stamp: u32,
        max_clock_drift: std::time::Duration,
    ) {
        let mut core = self.core();
        core.join_cluster(stamp);
        core.set_max_clock_drift(max_clock_drift);
        let _ = self.fabric.set(fabric);
    }

    /// Gives the node its data directory, whose log batches were numbered
    /// up to `last_seq` before this start: the node's batches go on from
    /// there (a snapshot's number must keep rising). Once, at start-up.
    pub fn use_disk(&self, store: Arc<mqlb_storage::Store>, last_seq: u64) {
        {
            lock(&self.sequencer).start_after(last_seq);
        }
        let _ = self.disk.set(store);
    }

    /// The data directory, on a durable node.
    pub fn disk(&self) -> Option<&Arc<mqlb_storage::Store>> {
        self.disk.get()
    }

    /// Whether new work that needs storing must be refused: the data
    /// directory is full (a write failed, or `max_disk_bytes`) or failed.
    pub fn disk_full(&self) -> bool {
        self.disk
            .get()
            .is_some_and(|d| d.is_full() || d.failed().is_some())
    }

    /// An open single node (anonymous, no ACL, local log): for tests.
    pub fn open() -> Arc<State> {
        Self::new(Core::new(), Auth::open(), Arc::new(LocalLog::default()))
    }

    /// The core, locked. A poisoned lock only means a panic elsewhere; the
    /// data is still consistent between calls. Inside this crate only:
    /// everything outside goes through the calls below, which take the
    /// lock for one step each.
    /// The shell's clock is read here, once per lock: the core is told the
    /// time and reads none itself.
    pub(crate) fn core(&self) -> CoreGuard<'_> {
        self.core_at(std::time::Instant::now())
    }

    /// [`State::core`] at `now`, a time the caller read already (a
    /// connection reads the clock once per batch of packets, not once per
    /// packet and again per lock).
    fn core_at(&self, now: std::time::Instant) -> CoreGuard<'_> {
        let mut core = CoreGuard(self.core.lock().unwrap_or_else(|p| p.into_inner()));
        core.advance(now);
        // A load first: the swap (a write) only when there are notes, so
        // the data path's every lock does not write a shared cache line.
        if self
            .has_held_notes
            .load(std::sync::atomic::Ordering::Acquire)
            && self
                .has_held_notes
                .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            for m in std::mem::take(&mut *lock(&self.held_notes)) {
                core.note_held(&m);
            }
        }
        if core.0.calibrate_at.is_none_or(|at| now >= at) {
            core.calibrate_wall(now, std::time::SystemTime::now());
            core.0.calibrate_at = now.checked_add(std::time::Duration::from_secs(1));
        }
        core
    }

    /// The core's lock, for a step that reads no time and calls nothing of
    /// the core (the shell's own tables under it): no clock read.
    fn locked_untimed(&self) -> CoreGuard<'_> {
        CoreGuard(self.core.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// What the node holds and has done, for the admin API and `$SYS`.
    pub fn counts(&self) -> Counts {
        let core = self.core();
        Counts {
            clients: core.connected(),
            sessions: core.sessions(),
            subscriptions: core.subscriptions(),
            retained: core.retained_count(),
            stats: core.stats(),
        }
    }

    /// A copy of `client_id`'s session, if this node holds one.
    pub fn export_session(&self, client_id: &str) -> Option<crate::snapshot::SessionSnapshot> {
        self.core().export_session(client_id)
    }

    /// Prometheus text for the node's core and its shared counters (the
    /// core's lock is held while its counts are read).
    pub fn render_metrics(&self) -> String {
        let mut body = crate::sys::render_metrics(&self.core());
        render_state_metrics(self, &mut body);
        body
    }

    /// Runs one core call and applies its effects: the change records are
    /// numbered under the lock (so they are logged in the order they were
    /// made) and handed to the log after it, then the rest is done.
    pub fn act(&self, f: impl FnOnce(&mut Core) -> Effects) -> Committed {
        self.locked(|guard| ((), f(guard))).1
    }

    /// Logs `entries` that no core call makes (a state store change, a
    /// copy kept for a peer): numbered under the core's lock like any
    /// other batch, so they take their place in the log's one order.
    pub(crate) fn log(&self, entries: impl IntoIterator<Item = LogEntry>) -> Committed {
        self.act(|_| {
            let mut fx = Effects::none();
            for e in entries {
                fx.log(e);
            }
            fx
        })
    }

    /// [`State::act`] for calls that also answer something.
    pub fn ask<T>(&self, f: impl FnOnce(&mut Core) -> (T, Effects)) -> (T, Committed) {
        self.locked(|guard| f(guard))
    }

    /// [`State::act`] at `now`, a time the caller has just read (the core's
    /// clock never goes back, whatever it is given).
    pub fn act_at(
        &self,
        now: std::time::Instant,
        f: impl FnOnce(&mut Core) -> Effects,
    ) -> Committed {
        self.locked_at(now, |guard| ((), f(guard))).1
    }

    /// [`State::ask`] at `now` (see [`State::act_at`]).
    pub fn ask_at<T>(
        &self,
        now: std::time::Instant,
        f: impl FnOnce(&mut Core) -> (T, Effects),
    ) -> (T, Committed) {
        self.locked_at(now, |guard| f(guard))
    }

    /// One step under the core's lock: the call, then (still under it) the
    /// stall's registration, the mailboxes of its items looked up, and its
    /// log entries numbered; after it, the log and the rest of the effects.
    fn locked<T>(&self, f: impl FnOnce(&mut CoreGuard<'_>) -> (T, Effects)) -> (T, Committed) {
        self.locked_at(std::time::Instant::now(), f)
    }

    /// [`State::locked`] at `now`.
    fn locked_at<T>(
        &self,
        now: std::time::Instant,
        f: impl FnOnce(&mut CoreGuard<'_>) -> (T, Effects),
    ) -> (T, Committed) {
        let (t, fx, sends, stall, ticket) = {
            let mut guard = self.core_at(now);
            let (t, mut fx) = f(&mut guard);
            let stall = self.hold_back(&fx);
            let sends = guard.resolve(fx.take_sends());
            let ticket = self.sequence(fx.take_records());
            (t, fx, sends, stall, ticket)
        };
        let committed = self.commit(ticket);
        (
            t,
            crate::effects::finish(
                fx,
                sends,
                stall,
                committed,
                &self.drained,
                self.fabric.get().map(|f| &**f),
            ),
        )
    }

    /// Attaches a connection whose mailbox is `outbox` to `client_id`'s
    /// session ([`Core::connect`]); the mailbox is registered under the
    /// core's lock, so the effects of any later call reach it.
    pub fn attach(
        &self,
        client_id: &str,
        clean_start: bool,
        expiry: Option<std::time::Duration>,
        receive_maximum: u16,
        outbox: Arc<Outbox>,
    ) -> (crate::core::Connected, Committed) {
        self.locked(|guard| {
            let (connected, fx) = guard.connect(
                client_id,
                clean_start,
                expiry,
                receive_maximum,
                outbox.gauge(),
            );
            guard.0.mailboxes.insert(connected.conn, outbox);
            (connected, fx)
        })
    }

    /// Detaches connection `conn` from `client_id`'s session
    /// ([`Core::disconnect`]) and forgets its mailbox, in one step under the
    /// core's lock; answers whether the session ended with it. A
    /// connection's normal end: one lock, where a disconnect and a
    /// [`State::forget_mailbox`] take two.
    pub fn detach(&self, client_id: &str, conn: u64) -> (bool, Committed) {
        self.locked(|guard| {
            let ended = guard.ends_with_connection(client_id);
            let fx = guard.disconnect(client_id, conn);
            guard.0.mailboxes.remove(&conn);
            (ended, fx)
        })
    }

    /// Forgets connection `conn`'s mailbox, once its task is done with it.
    pub fn forget_mailbox(&self, conn: u64) {
        self.locked_untimed().0.mailboxes.remove(&conn);
    }

    /// How many mailboxes the node keeps (one per connection task alive).
    #[cfg(test)]
    pub(crate) fn mailbox_count(&self) -> usize {
        self.locked_untimed().0.mailboxes.len()
    }

    /// The mailboxes of the connected clients not yet asked to close, for
    /// a graceful shutdown.
    pub fn open_connections(&self) -> Vec<Arc<Outbox>> {
        let guard = self.core();
        guard
            .attached_connections()
            .into_iter()
            .filter_map(|c| guard.0.mailboxes.get(&c).cloned())
            .filter(|o| !o.is_closing())
            .collect()
    }

    /// Flow control: when the core asks for its publisher to be held back,
    /// the wait is registered here, still under the core's lock, so a drain
    /// cannot come first and be missed.
    fn hold_back(&self, fx: &Effects) -> Option<crate::effects::Stall> {
        fx.wants_stall()
            .then(|| crate::effects::Stall::on(&self.drained))
    }

    /// Numbers `records` as the log's next batch. Called with the core's
    /// lock held (the number is the order the core made them in); nothing
    /// is appended yet. `None` when there is nothing to log.
    pub(crate) fn sequence(&self, records: Vec<LogEntry>) -> Option<Ticket> {
        if records.is_empty() {
            return None;
        }
        let done = Ticket::default();
        lock(&self.sequencer).number(Batch {
            records,
            done: done.clone(),
        });
        Some(done)
    }

    /// The number of the last batch sequenced: under the core's lock, every
    /// change the core has made so far is in a batch numbered at most this
    /// (a link's snapshot taken then already holds them).
    pub(crate) fn last_sequenced(&self) -> u64 {
        lock(&self.sequencer).last()
    }

    /// Hands every batch sequenced so far to the log, in order (whoever
    /// comes first appends the others' batches too), and returns what
    /// `ticket`'s batch waits for. Called after the core's lock is
    /// released.
    pub(crate) fn commit(&self, ticket: Option<Ticket>) -> Committed {
        let Some(ticket) = ticket else {
            return Committed::now();
        };
        {
            let _one_at_a_time = lock(&self.appending);
            loop {
                let Some((seq, b)) = lock(&self.sequencer).take_next() else {
                    break;
                };
                let c = self.log.append(seq, b.records);
                *lock(&b.done) = Some(c);
            }
        }
        // Filled by whoever appended the batch, before it let go of
        // `appending`, which this call has held since.
        let filled = lock(&ticket).take();
        filled.unwrap_or_else(Committed::lost)
    }
}

/// What the core's mutex guards: the core, and each attached connection's
/// mailbox by the core's connection id (the core names connections, the
/// shell holds their mailboxes; one lock covers both, so looking a
/// publish's mailboxes up costs no second lock).
#[derive(Debug)]
struct Locked {
    core: Core,
    mailboxes: HashMap<u64, Arc<Outbox>, foldhash::fast::RandomState>,
    /// When the core's wall clock is next calibrated (`None`: at the next
    /// lock): one comparison per lock, not a subtraction.
    calibrate_at: Option<std::time::Instant>,
}

/// The core's lock, held: derefs to the core.
pub(crate) struct CoreGuard<'a>(MutexGuard<'a, Locked>);

impl CoreGuard<'_> {
    /// The mailboxes of `sends`' connections, in order (items for
    /// connections that are gone are dropped); reuses the list's memory.
    fn resolve(&self, sends: Vec<(u64, Outgoing)>) -> Vec<(Arc<Outbox>, Outgoing)> {
        if sends.is_empty() {
            // Most connects and disconnects, and publishes no one gets.
            return Vec::new();
        }
        sends
            .into_iter()
            .filter_map(|(c, o)| self.0.mailboxes.get(&c).map(|b| (b.clone(), o)))
            .collect()
    }
}

impl std::ops::Deref for CoreGuard<'_> {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.0.core
    }
}

impl std::ops::DerefMut for CoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut Core {
        &mut self.0.core
    }
}

/// A lock whose poisoning (a panic elsewhere) leaves consistent data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a sequenced batch's [`Committed`] is left for its caller.
pub(crate) type Ticket = Arc<Mutex<Option<Committed>>>;

/// One batch of the ordered log, waiting to be appended.
#[derive(Debug)]
struct Batch {
    records: Vec<LogEntry>,
    done: Ticket,
}

/// Prometheus text for what the node's shared state counts outside the
/// core: changes waited for and not committed.
fn render_state_metrics(state: &State, o: &mut String) {
    let _ = writeln!(
        o,
        "# HELP mqlb_broker_not_committed_total Changes a client waited for that were not committed (the publish was left unacknowledged and the connection closed), by reason.\n\
         # TYPE mqlb_broker_not_committed_total counter"
    );
    for reason in NotCommitted::ALL {
        let _ = writeln!(
            o,
            "mqlb_broker_not_committed_total{{reason=\"{}\"}} {}",
            reason.label(),
            state
                .not_committed
                .get(reason as usize)
                .map_or(0, |n| n.load(std::sync::atomic::Ordering::Relaxed))
        );
    }
    let _ = writeln!(
        o,
        "# HELP mqlb_broker_publish_ack_seconds From reading a QoS 1/2 PUBLISH to writing its PUBACK/PUBREC (replication to the session chains included), by QoS.\n\
         # TYPE mqlb_broker_publish_ack_seconds histogram"
    );
    for (qos, h) in ["1", "2"].iter().zip(&state.publish_latency) {
        h.render(
            o,
            "mqlb_broker_publish_ack_seconds",
            &format!("qos=\"{qos}\""),
        );
    }
    if let Some(disk) = state.disk() {
        let _ = writeln!(
            o,
            "# HELP mqlb_broker_disk_refused_total QoS 1/2 publishes refused because the data directory was full (v5: PUBACK/PUBREC 0x97; 3.x: connection closed).\n\
             # TYPE mqlb_broker_disk_refused_total counter\n\
             mqlb_broker_disk_refused_total {}",
            state
                .disk_refused
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        disk.render(o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::ChangeRecord;
    use crate::message::{Message, Sub};
    use crate::outbox::Outbox;
    use mqlb_protocol::{MqttStr, QoS, SubscriptionOptions};
    use std::time::{Duration, Instant};

    /// A log that keeps what it is given, after a pause like a cluster's
    /// append takes: the window in which a later call could log first.
    #[derive(Debug, Default)]
    struct Recording(Mutex<Vec<ChangeRecord>>);

    impl ChangeLog for Recording {
        fn append(&self, _seq: u64, entries: Vec<LogEntry>) -> Committed {
            std::thread::yield_now();
            self.0.lock().unwrap_or_else(|p| p.into_inner()).extend(
                entries.into_iter().filter_map(|e| match e {
                    LogEntry::Session(r) => Some(r),
                    _ => None,
                }),
            );
            Committed::now()
        }
    }

    /// Calls on several threads, about one session: the log holds its
    /// records in the order the core made them, so a replica that replays
    /// the log has the live session (its queue in the same order, the same
    /// messages dropped when it overflowed).
    #[test]
    fn records_are_logged_in_the_order_they_were_made() {
        let log = Arc::new(Recording::default());
        let state = State::new(Core::new(), Auth::open(), log.clone());
        let tx = Arc::new(Outbox::default());
        let (connected, _) = state.attach("dev", false, Some(Duration::from_secs(600)), 10, tx);
        let sub = Sub {
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
            id: None,
        };
        let _ = state.ask(|core| core.subscribe("dev", "t/#", sub));
        let _ = state.act(|core| core.disconnect("dev", connected.conn));
        std::thread::scope(|s| {
            for t in 0..4 {
                let state = &state;
                s.spawn(move || {
                    for i in 0..400 {
                        let m = Message {
                            topic: MqttStr::try_from("t/x").unwrap_or_default(),
                            payload: bytes::Bytes::from(format!("{t}-{i}")),
                            qos: QoS::AtLeastOnce,
                            retain: false,
                            properties: Arc::default(),
                            origin: None,
                            received: Instant::now(),
                        };
                        let _ = state.act(|core| core.route(m));
                    }
                });
            }
        });
        let records = log.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut replica = Core::new();
        let _ = replica.replay("dev", &records);
        let live = state.core().export_session("dev");
        assert!(live.as_ref().is_some_and(|s| s.queued.len() == 1000));
        assert_eq!(replica.export_session("dev"), live);
    }
}
