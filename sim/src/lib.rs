//! The bundled broker's cluster under deterministic simulation.
//!
//! One thread runs N broker nodes, the balancer's placement and scripted
//! MQTT clients on simulated time and a simulated network, from a seed:
//! the same seed gives the same run, event for event, so any failure
//! replays exactly ([`Outcome::replay`] prints the line). Faults come from
//! the seed too: `kill -9` of a node and its restart, a client's connection
//! cut, a node stalled, the wall clock stepped, the network slowed, and
//! network delays that reorder everything that is not on one connection.
//!
//! The checks are the cluster's guarantees (docs/cluster.md) as code: no
//! message acknowledged to a publisher is lost for a persistent subscriber,
//! QoS 2 is delivered once, a publisher's messages arrive in order, one
//! node at most serves a client, no queue grows without bound, and every
//! publisher finishes once the faults stop.
//!
//! Anchors: FoundationDB's simulation and TigerBeetle's VOPR (the whole
//! system from a seed, faults included); this is a plain event loop over
//! the broker's sans-IO parts rather than turmoil or madsim, because those
//! parts take the time and return effects already, so no runtime needs
//! faking. [`world`] says which parts are the broker's own code and what
//! the loop does around them.
//!
//! The simulator proves it bites: [`Config::mutation`] puts a fixed bug
//! back (`mqlb_broker_core::mutations`), and the tests check that the
//! default seeds find it.

// The simulator indexes its own tables by the ids it hands out; an index
// out of range is a bug in the simulator, and a panic is what a test wants.
#![allow(clippy::indexing_slicing)]

pub mod clients;
pub mod rng;
pub mod world;

use std::time::Duration;

pub use mqlb_broker_core::mutations::Mutation;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Config {
    /// Broker nodes.
    pub nodes: usize,
    /// Copies of each session (the cluster's `replication_factor`).
    pub replication: usize,
    /// Publishing clients.
    pub publishers: usize,
    /// Subscribing clients (persistent sessions, QoS 2).
    pub subscribers: usize,
    /// Messages per publisher (QoS 1 and 2 mixed).
    pub messages: u32,
    /// Unfinished messages per publisher.
    pub window: usize,
    /// Whether faults are injected.
    pub faults: bool,
    /// Faults happen within this much simulated time from the start.
    pub fault_window: u64,
    /// A fixed bug put back, to prove the checks find it.
    pub mutation: Option<Mutation>,
    /// Whether cluster links between live nodes break now and then.
    pub link_drops: bool,
    /// Whether a node is now and then cut off from the others (it steps
    /// down, the view drops it, and the partition heals).
    pub partitions: bool,
    /// Whether each node's clock is off by up to ±2 s and now and then one
    /// node's clock steps alone.
    pub clock_skew: bool,
    /// Whether state store clients run beside the MQTT ones (their
    /// histories checked for linearizability).
    pub store: bool,
    /// Whether the view comes from the broker's own Raft group (elections
    /// included) rather than an oracle that drops a crashed node 0.3-1.5 s
    /// after its crash and counts a returning one 0.1-0.5 s after it is up.
    pub raft: bool,
    /// Whether every node has a data directory (`--data-dir`): its change
    /// log and Raft state on a simulated disk its crashes leave alone, read
    /// back by the broker's own recovery; faults add a power loss of the
    /// whole site (the unsynced tail torn at any byte), failed fsyncs and
    /// full disks.
    pub disk: bool,
    /// Whether now and then a node hangs past the failure detector (with
    /// the view from Raft): its peers drop their links to it and the view
    /// drops it; it resumes, its clients' packets handled before or after
    /// its tick notices.
    pub hangs: bool,
    /// Whether publishers connect with a will (QoS 2, a Will Delay of
    /// 0.2-1.5 s, sent when a connection of theirs goes without its
    /// client coming back in time), and leave for good, without
    /// DISCONNECT, once done: their last will must reach every subscriber
    /// once its scheduling was committed, whatever failed meanwhile.
    pub wills: bool,
    /// Client IDs drawn freely, so sessions sit on different chains and
    /// publishes cross nodes as forwards (`Frame::Forward`), not only while
    /// sessions move.
    pub spread: bool,
    /// A broken cluster link counts as a failure: none while a node is
    /// down, and no crash, hang or partition while one is broken (either
    /// would leave no majority: two failures at once).
    pub links_count_as_failures: bool,
    /// About half the crashes are graceful stops instead (SIGTERM, as a
    /// rolling restart does; Raft view only): the node stops serving and
    /// refuses forwards, closes its clients, waits for its chain changes,
    /// hands its sessions over, tells its peers it is leaving, and exits
    /// once the view drops it (`Cluster::leave`).
    pub graceful_stops: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nodes: 3,
            replication: 2,
            publishers: 2,
            subscribers: 2,
            messages: 150,
            window: 4,
            faults: true,
            fault_window: 6_000_000,
            mutation: None,
            link_drops: true,
            partitions: true,
            clock_skew: true,
            store: true,
            raft: true,
            disk: false,
            hangs: true,
            wills: false,
            spread: false,
            links_count_as_failures: false,
            graceful_stops: false,
        }
    }
}

/// How often the run reached states worth reaching: the report that says
/// whether the faults reach what they are meant to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)] // each field is named for what it counts
pub struct Coverage {
    pub crashes: u64,
    /// Graceful stops ([`Config::graceful_stops`]), and how many of them
    /// exited once the view dropped them.
    pub graceful_stops: u64,
    pub graceful_exits: u64,
    /// Crashes scheduled just after a node answered a client.
    pub targeted_crashes: u64,
    pub crashes_skipped: u64,
    pub crashes_of_holder: u64,
    /// A crash of a node serving a session in the middle of a QoS 2
    /// exchange (PUBREC or PUBCOMP awaited, or an unreleased identifier).
    pub crashes_mid_qos2: u64,
    /// A crash with batches not yet handed on or not yet committed.
    pub crashes_uncommitted: u64,
    pub restarts: u64,
    pub view_changes: u64,
    pub promotions: u64,
    pub relays: u64,
    pub sessions_rechained: u64,
    pub link_snapshots: u64,
    pub link_drops: u64,
    /// Retained topics the nodes agreed on at the end of each run.
    pub retained_topics: u64,
    /// Messages of a stale writer adopted by the session's new holder.
    pub adopted: u64,
    /// Copies that came relayed while their holder was live.
    pub relayed_copies: u64,
    /// Copies handed to a new owner when the view dropped their holder.
    pub orphans_handed: u64,
    /// Clients held while the copy to promote was a relayed one.
    pub connects_held: u64,
    /// Publishes held for a lost node's sessions.
    pub held_publishes: u64,
    /// Held publishes routed again.
    pub reforwards: u64,
    pub forwards_refused: u64,
    /// Forwards whose routing here did not commit (a commit deadline):
    /// refused, so their sender routes them again.
    pub forwards_not_committed: u64,
    pub promoted_words: u64,
    pub client_drops: u64,
    pub stalls: u64,
    pub clock_steps: u64,
    pub slow_periods: u64,
    /// Batches committed because a chain member left the view.
    pub commits_by_loss: u64,
    /// Batches owed to a chain member without a link (or whose link's
    /// snapshot it had not confirmed yet).
    pub owed_batches: u64,
    /// Owed batches committed once the member confirmed a link snapshot.
    pub owed_released_by_resync: u64,
    /// Links from a holder to a node outside the view that broke (its
    /// copies wait for fresher ones before they may be promoted).
    pub copies_cut_off: u64,
    /// Frames a node had sent when it crashed that its peers still read
    /// before they saw its links drop.
    pub frames_drained_at_crash: u64,
    /// Nodes cut off from the others (partitions), and of those, ones
    /// serving sessions, and ones in the middle of a QoS 2 exchange.
    pub partitions: u64,
    pub partitions_of_holder: u64,
    pub partitions_mid_qos2: u64,
    /// Nodes that stepped down (lost their majority).
    pub step_downs: u64,
    /// Steps of one node's clock alone.
    pub node_clock_steps: u64,
    /// Copies whose holder's link snapshot showed it no longer serves them.
    pub holders_forgotten: u64,
    /// Times a node held publishes for copies it owned and had not yet
    /// promoted.
    pub held_for_copies: u64,
    /// State store operations made, answered with a result, answered with
    /// an error, and not answered within the client's time.
    pub store_ops: u64,
    pub store_ok: u64,
    pub store_errors: u64,
    pub store_unanswered: u64,
    /// State store requests passed on to their key's owner.
    pub store_passed: u64,
    /// Rounds a state store change waited for a chain member without a
    /// link (or whose link broke before it answered).
    pub store_owed: u64,
    /// Tries of a state store request at an owner not synced yet.
    pub store_not_ready: u64,
    /// State store changes refused by a member in a newer view.
    pub store_refused: u64,
    /// Crashes and partitions not made because the node was the only one
    /// left with a key's last acknowledged value (a second failure).
    pub store_sole_holder_spared: u64,
    /// Views the Raft group committed; elections (campaigns started when
    /// the leader was lost); crashes and partitions of the Raft leader.
    pub raft_views: u64,
    pub raft_campaigns: u64,
    pub leader_crashes: u64,
    pub leader_partitions: u64,
    /// Nodes back in service after a step down: in the view, with a
    /// majority again.
    pub quorum_regained: u64,
    /// Ticks back in service that sent the node's whole interest again
    /// (`resend_interest`).
    pub interest_resent: u64,
    pub commit_deadlines: u64,
    pub not_committed_closes: u64,
    /// Log hand-offs that carried several batches (calls interleaved
    /// between a batch's numbering and its hand-off).
    pub appends_of_several: u64,
    pub publisher_resends: u64,
    pub qos1_again: u64,
    pub qos2_resends_absorbed: u64,
    pub sessions_lost: u64,
    /// Site-wide power losses; fsyncs; fsyncs that failed (the node
    /// stopped); disks that filled up, and writes that failed on them;
    /// unsynced bytes a power loss took; torn last records cut off at
    /// start; sessions a node read back from its directory.
    pub power_losses: u64,
    /// Nodes hung past the failure detector; of those, the Raft leader,
    /// and nodes serving sessions.
    pub hangs: u64,
    pub leader_hangs: u64,
    pub hangs_of_holder: u64,
    /// Power losses while a session held messages not yet delivered.
    pub power_losses_undelivered: u64,
    pub fsyncs: u64,
    pub fsync_failures: u64,
    pub disks_full: u64,
    pub disk_write_errors: u64,
    pub unsynced_bytes_lost: u64,
    pub torn_records_cut: u64,
    pub sessions_read_back: u64,
    /// Wills scheduled (a publisher's connection went).
    pub wills_scheduled: u64,
    /// Copies promoted that held a will waiting out its delay: the new
    /// holder sends it.
    pub wills_taken_over: u64,
    /// Wills given to subscribers.
    pub wills_delivered: u64,
    /// Last wills whose scheduling was committed (each must reach every
    /// subscriber).
    pub last_wills_promised: u64,
    /// Publishes the core sent to peers (none without `Config::spread`,
    /// but while sessions move).
    pub forwards: u64,
    /// Publishes that waited behind their publisher's held ones
    /// (`Route::Deferred`).
    pub deferred: u64,
}

impl Coverage {
    /// Adds `o`'s counts.
    pub fn add(&mut self, o: &Coverage) {
        macro_rules! sum {
            ($($f:ident),*) => { $( self.$f += o.$f; )* };
        }
        sum!(
            crashes,
            graceful_stops,
            graceful_exits,
            targeted_crashes,
            crashes_skipped,
            crashes_of_holder,
            crashes_mid_qos2,
            crashes_uncommitted,
            restarts,
            view_changes,
            promotions,
            relays,
            sessions_rechained,
            link_snapshots,
            link_drops,
            retained_topics,
            adopted,
            relayed_copies,
            orphans_handed,
            connects_held,
            held_publishes,
            reforwards,
            forwards_refused,
            forwards_not_committed,
            promoted_words,
            client_drops,
            stalls,
            clock_steps,
            slow_periods,
            commits_by_loss,
            owed_batches,
            owed_released_by_resync,
            copies_cut_off,
            frames_drained_at_crash,
            partitions,
            partitions_of_holder,
            partitions_mid_qos2,
            step_downs,
            node_clock_steps,
            holders_forgotten,
            held_for_copies,
            store_ops,
            store_ok,
            store_errors,
            store_unanswered,
            store_passed,
            store_owed,
            store_not_ready,
            store_refused,
            store_sole_holder_spared,
            raft_views,
            raft_campaigns,
            leader_crashes,
            leader_partitions,
            quorum_regained,
            interest_resent,
            commit_deadlines,
            not_committed_closes,
            appends_of_several,
            publisher_resends,
            qos1_again,
            qos2_resends_absorbed,
            sessions_lost,
            power_losses,
            hangs,
            leader_hangs,
            hangs_of_holder,
            power_losses_undelivered,
            fsyncs,
            fsync_failures,
            disks_full,
            disk_write_errors,
            unsynced_bytes_lost,
            torn_records_cut,
            sessions_read_back,
            wills_scheduled,
            wills_taken_over,
            wills_delivered,
            last_wills_promised,
            forwards,
            deferred
        );
    }
}

/// One run's result.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Its seed.
    pub seed: u64,
    /// The bug put back, if any.
    pub mutation: Option<Mutation>,
    /// Whether the view came from the Raft group ([`Config::raft`]).
    pub raft: bool,
    /// Whether the nodes had data directories ([`Config::disk`]).
    pub disk: bool,
    /// Whether a node could hang past the failure detector
    /// ([`Config::hangs`]).
    pub hangs: bool,
    /// Whether publishers had wills ([`Config::wills`]).
    pub wills: bool,
    /// Whether sessions were on different chains ([`Config::spread`]), and
    /// links counted as failures ([`Config::links_count_as_failures`]).
    pub spread: Option<bool>,
    /// Whether some crashes were graceful stops ([`Config::graceful_stops`]).
    pub graceful_stops: bool,
    /// What went wrong, one line each; empty when every check held.
    pub violations: Vec<String>,
    /// States reached.
    pub coverage: Coverage,
    /// Events handled.
    pub events: u64,
    /// Simulated time at the end.
    pub simulated: Duration,
    /// A digest of every event's time and place: equal for equal runs.
    pub digest: u64,
}

impl Outcome {
    /// Whether every check held.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The one line that replays this run exactly.
    pub fn replay(&self) -> String {
        let mut m = match self.mutation {
            Some(m) => format!(" MQLB_SIM_MUTATION={m:?}"),
            None => String::new(),
        };
        if !self.raft {
            m.push_str(" MQLB_SIM_VIEW=oracle");
        }
        if self.disk {
            m.push_str(" MQLB_SIM_DISK=1");
        }
        if !self.hangs && self.raft {
            m.push_str(" MQLB_SIM_HANGS=0");
        }
        if self.wills {
            m.push_str(" MQLB_SIM_WILLS=1");
        }
        match self.spread {
            Some(true) => m.push_str(" MQLB_SIM_SPREAD=1"),
            Some(false) => m.push_str(" MQLB_SIM_SPREAD=early"),
            None => {}
        }
        if self.graceful_stops {
            m.push_str(" MQLB_SIM_STOPS=1");
        }
        format!(
            "MQLB_SIM_SEED={}{m} cargo test --release -p mqlb-sim --test sim replay -- --nocapture",
            self.seed
        )
    }
}

/// Runs the simulation for `seed`.
pub fn run(seed: u64, cfg: &Config) -> Outcome {
    mqlb_broker_core::mutations::set(cfg.mutation);
    let out = world::World::new(seed, cfg.clone()).run();
    mqlb_broker_core::mutations::set(None);
    out
}

/// A mutation by name (as [`Outcome::replay`] prints it).
pub fn mutation_named(name: &str) -> Option<Mutation> {
    match name {
        "PubrelBeforeCommit" => Some(Mutation::PubrelBeforeCommit),
        "LogOutOfOrder" => Some(Mutation::LogOutOfOrder),
        "JoinerMissesChanges" => Some(Mutation::JoinerMissesChanges),
        "SnapshotCopyOfLiveSession" => Some(Mutation::SnapshotCopyOfLiveSession),
        "RelayedCopyPromotedAtOnce" => Some(Mutation::RelayedCopyPromotedAtOnce),
        "UnlinkedMemberCountedOut" => Some(Mutation::UnlinkedMemberCountedOut),
        "CutOffCopyPromoted" => Some(Mutation::CutOffCopyPromoted),
        "StoreMemberCountedOut" => Some(Mutation::StoreMemberCountedOut),
        "CommitBeforeFsync" => Some(Mutation::CommitBeforeFsync),
        "CopiesOfOneEpochAlike" => Some(Mutation::CopiesOfOneEpochAlike),
        "WillOnlyOnHolder" => Some(Mutation::WillOnlyOnHolder),
        "RelayedWaitFromArrival" => Some(Mutation::RelayedWaitFromArrival),
        "ResendRoutedAsNew" => Some(Mutation::ResendRoutedAsNew),
        "LaterPublishesNotDeferred" => Some(Mutation::LaterPublishesNotDeferred),
        "StalePromotedWord" => Some(Mutation::StalePromotedWord),
        "ResendNotDeduplicated" => Some(Mutation::ResendNotDeduplicated),
        "ResendOnlyToTakenOver" => Some(Mutation::ResendOnlyToTakenOver),
        _ => None,
    }
}
