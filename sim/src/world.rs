//! The simulated cluster: nodes, connections, links, the view and the
//! fault schedule, as one event queue on simulated time.
//!
//! # What is real and what is the shell
//! Real, the code the broker runs: each node's [`Core`] (sessions, QoS
//! flows, routing, takeover, import on promotion), its [`Replicas`]
//! (the copies it keeps for other nodes' chains, epochs refused), the change
//! log's numbering ([`Sequencer`]), each connection's mailbox and encoder
//! ([`Outbox`], with its QoS 2 gates), the MQTT codec on both sides of every
//! connection, the cluster's wire frames (`Replicate`, `Ack`), and the
//! rendezvous placement (`mqlb-placement`).
//!
//! The shell here does what the broker's tokio shell does around them,
//! following it rule by rule (the function that each step mirrors is named
//! where it is done): a connection's replies wait for the commits of the
//! packets they answer (`conn.rs`, `queue_replies`); a QoS 2 delivery waits
//! for its batch (`effects::finish`); a batch is sent down its sessions'
//! chains and committed when every chain member that was sent a frame has
//! acknowledged it or left the view (`replication::send_down_chains`,
//! `Acks::lost`); a view change promotes the copies a node now owns and
//! sends every session whole to its chain (`promote_owned`, `rechain`); a
//! client that reaches a node while another serves its session is served
//! there (`links::relay`). What the shell leaves out is listed in
//! `docs/simulation.md`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use mqlb_broker::cluster::departures;
use mqlb_broker::cluster::forwards::{self, Forwarded};
use mqlb_broker::cluster::handover;
use mqlb_broker::cluster::opening::{self, Opening};
use mqlb_broker::cluster::seen::{Seen, Stash};
use mqlb_broker::cluster::tick;
use mqlb_broker::cluster::wire::Frame;
use mqlb_broker_core::chain::Delivery;
use mqlb_broker_core::commits::{Commits, Released};
use mqlb_broker_core::core::{snapshot_of, Core};
use mqlb_broker_core::effects::{ChangeRecord, Effects, LogEntry, Route};
use mqlb_broker_core::held::{self, Held, HeldAs, HeldQueue, Release};
use mqlb_broker_core::log::Sequencer;
use mqlb_broker_core::message::{Message, Sub};
use mqlb_broker_core::mutations::{self, Mutation};
use mqlb_broker_core::outbox::{Closing, Encoder, Outbox, Outgoing};
use mqlb_broker_core::promotions::Promotions;
use mqlb_broker_core::replicas::{
    incoming, whole, Arrival, Arriving, Incoming, Relay, Replicas, RELAYED_WAIT,
};
use mqlb_broker_core::session::{InflightState, SessionChange};
use mqlb_protocol::{decode, Ack, Packet, PacketType, ProtocolVersion, QoS, SubscriptionOptions};

use crate::clients::{will_of, Action, Client, Publisher, Role, Subscriber, Violation, FILTER};
use crate::rng::{draw, hash_bytes, mix, within, Rng};
use crate::{Config, Coverage, Outcome};

mod disk;
mod raft;
mod store;
use disk::{Disk, DiskFault};
use raft::RaftNode;
use store::{Op, StoreClient, StoreNode, StoreReq};

/// A publisher's last will (`Config::wills`): the connection it was the
/// will of, the gates of the batch that scheduled it, and the node that
/// saw its publisher go, when.
#[derive(Debug)]
struct LastWill {
    conn: usize,
    gates: Vec<usize>,
    node: usize,
    at: Time,
}

/// How long a node that saw a publisher go must live on for its will to
/// count as promised without its batch's commit: longer than any change
/// takes to reach a chain member that is up.
const WILL_SETTLED: Time = 200 * MS;

/// Every client speaks MQTT 5.
const V: ProtocolVersion = ProtocolVersion::V5;
/// Session expiry of every client: longer than any run.
const EXPIRY: Duration = Duration::from_secs(3600);
/// Simulated time, in microseconds.
type Time = u64;
const MS: Time = 1_000;
const SECOND: Time = 1_000_000;
/// A run that is not over by then is stuck.
const TIME_LIMIT: Time = 60 * SECOND;
/// A run that handles more events than this is running away.
const EVENT_LIMIT: u64 = 2_000_000;
/// Bounds whose crossing is a violation (an unbounded queue).
const MAX_QUEUE: usize = 200_000;
const MAX_WAITS: usize = 10_000;
const MAX_BACKLOG: usize = 4 << 20;

/// From a client to its node.
#[derive(Debug)]
enum Up {
    Connect,
    Subscribe,
    Bytes(Bytes),
    /// The client's side of the connection went away.
    Gone,
}

/// From a node to a client.
#[derive(Debug)]
enum Down {
    Connack { present: bool },
    Suback,
    Bytes(Bytes),
    Closed,
}

/// Faults, drawn from the seed before the run.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `kill -9` of a node: everything in memory is gone.
    Crash(usize),
    /// The node starts again, empty.
    Restart(usize),
    /// A client's connection is cut.
    Drop(usize),
    /// A node handles nothing for this long (a GC pause, a stalled disk),
    /// shorter than the failure detector's timeout.
    Stall(usize, Time),
    /// The wall clock of every node steps by this many milliseconds.
    ClockStep(i64),
    /// Every network delay is long for this long.
    Slow(Time),
    /// The cluster link between two live nodes breaks (both directions,
    /// what was in flight lost) and is dialled again after this long.
    LinkDrop(usize, usize, Time),
    /// The broken link is back: each side sends its snapshot.
    LinkBack(usize, usize),
    /// A node is cut off from every other (its clients still reach it):
    /// it steps down, the view drops it, and after this long past that
    /// the partition heals.
    Partition(usize, Time),
    /// The partition around a node heals: links open both ways.
    Heal(usize),
    /// One node's wall clock steps by this many milliseconds.
    NodeClockStep(usize, i64),
    /// A node stops gracefully (`Cluster::leave`) and starts again later.
    Stop(usize),
    /// A node hangs for this long, past the failure detector (a long GC
    /// pause, a VM stopped): it handles nothing; its peers' link reads
    /// time out after `FAILURE_TIMEOUT` and drop their links to it; it
    /// resumes, finds them closed, and they are dialled again.
    Hang(usize, Time),
    /// The hung node's peers drop their links to it.
    HangCut(usize),
}

#[derive(Debug)]
enum Ev {
    Up {
        conn: usize,
        item: Up,
    },
    Down {
        conn: usize,
        item: Down,
    },
    Frame {
        from: usize,
        from_inc: u64,
        to: usize,
        to_inc: u64,
        bytes: BytesMut,
    },
    Append {
        node: usize,
        inc: u64,
    },
    Deadline {
        gate: usize,
    },
    Wake {
        client: usize,
    },
    /// A publisher may send one more message.
    Tick {
        client: usize,
    },
    Fault(Fault),
    View {
        node: usize,
        join: bool,
        inc: u64,
    },
    /// A node cut off from the majority notices (`Cluster::step_down`).
    StepDown {
        node: usize,
        inc: u64,
    },
    /// `promote_owned` on `node`'s tick.
    PromoteCheck {
        node: usize,
        inc: u64,
    },
    /// A node's cluster tick (`Cluster::on_tick`): promotions, its word
    /// that it promoted, held publishes, peers forgotten.
    NodeTick {
        node: usize,
    },
    /// A state store client makes its next operation.
    StoreOp {
        client: usize,
    },
    /// A state store client stops waiting for an answer.
    StoreGiveUp {
        client: usize,
        op: usize,
    },
    /// A state store request's next step on its node.
    StoreStep {
        req: usize,
    },
    /// A node's Raft tick (`Cluster::on_tick`'s view part).
    RaftTick {
        node: usize,
        inc: u64,
    },
    /// A disk fault ([`Config::disk`]).
    DiskFault(DiskFault),
    /// A node's disk writer writes what is queued.
    DiskWrite {
        node: usize,
        inc: u64,
    },
    /// A node's fsync came back: its log is durable up to `upto` bytes,
    /// the batches waiting under `reps` with it.
    DiskSynced {
        node: usize,
        inc: u64,
        upto: usize,
        reps: Vec<u64>,
    },
    /// A stopping node's clients are gone: once its chain changes are
    /// acknowledged (or `since` is 2 s ago), it hands its sessions over
    /// and tells its peers it is leaving (`Cluster::leave`, `settle`).
    StopSettle {
        node: usize,
        inc: u64,
        since: Time,
    },
    /// A stopping node the view has dropped exits.
    StopExit {
        node: usize,
        inc: u64,
    },
    /// `from`'s link to `to` (re)opens: `from` sends its snapshot.
    LinkOpen {
        from: usize,
        from_inc: u64,
        to: usize,
        to_inc: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateState {
    Pending,
    Done,
    Failed,
}

/// One batch's commit: what its replies and QoS 2 deliveries wait for.
#[derive(Debug)]
struct Gate {
    state: GateState,
    flag: Arc<AtomicBool>,
    /// Connections with deliveries held behind it.
    held: Vec<usize>,
}

/// A numbered batch waiting to be handed on.
#[derive(Debug)]
struct Batch {
    entries: Vec<LogEntry>,
    gate: usize,
}

/// A batch sent down chains: frames each member has still to answer.
#[derive(Debug)]
struct Node {
    name: String,
    up: bool,
    /// Bumped by every crash: what was addressed to an older incarnation
    /// is lost.
    inc: u64,
    core: Core,
    replicas: Replicas,
    log: Sequencer<Batch>,
    /// What each batch waits for (`commits::Commits`, the broker's own),
    /// by gate.
    waits: Commits<usize>,
    next_rep: u64,
    /// The core's connection ids, to the simulation's.
    conns: BTreeMap<u64, usize>,
    stalled_until: Time,
    /// Per peer, the last batch the snapshot sent on the link to it holds
    /// (`LinkTx::snapshot_covers`): later batches only go on the link.
    covers: BTreeMap<usize, u64>,
    /// Peers whose snapshot this node has had since it started (or since
    /// it last stepped down).
    synced: BTreeSet<usize>,
    /// Cut off from the majority: it serves nothing (`step_down`) until the
    /// view counts it again.
    stepped_down: bool,
    /// Stopping gracefully: serves nothing, refuses forwards and clients.
    leaving: bool,
    /// ... and has told its peers (`Frame::Leaving`): they no longer
    /// count it as heard, so the view drops it.
    announced: bool,
    /// The filters publishes are held for (`Core::hold_for_copies`).
    held_for_copies: Vec<String>,
    /// Per peer, the number the last link snapshot's own session copies
    /// went with (for the coverage report).
    resync_seq: BTreeMap<usize, u64>,
    /// Publishes held for a lost node's sessions, and those waiting behind
    /// them (the broker's own queue: `held`); each resolves its gate.
    held: HeldQueue<usize>,
    /// Who has promoted the copies it owns, per view: its own word and
    /// each peer's (the broker's own component).
    promotions: Promotions,
    /// For each session served or copied here, the fingerprints of the
    /// messages it was given lately (the broker's own component, on
    /// simulated time): a promoted copy is told them.
    seen: Seen,
    /// Per peer, its last `Seen` frame, kept until the frame after it
    /// (the broker's own `seen::Stash`).
    seen_stash: BTreeMap<usize, Stash>,
    /// Per peer whose link snapshot is arriving, the sessions it sent as
    /// their holder (`links`: `Replicas::holder_serves_only` at its end).
    snapshot_from: BTreeMap<usize, std::collections::HashSet<String>>,
    /// The state store (`store`).
    store: StoreNode,
    /// Its member of the Raft group, with [`Config::raft`].
    raft: Option<RaftNode>,
    /// Its data directory ([`Config::disk`]): what its crashes leave.
    disk: Disk,
    /// `synced_once`: a tick has promoted (or held publishes for) the
    /// copies it owns since it was last synced; it takes clients only then
    /// (`Cluster::ready`, with the view from Raft).
    settled: bool,
    /// What its last tick acted on (the broker's own `tick::Tick`: the
    /// order a tick takes its steps in).
    tick: tick::Tick,
    /// The view its last tick acted on: the hand-over compares with it.
    last_view: BTreeSet<usize>,
    /// The view installed on it (`Cluster::view`, installed by
    /// `Cluster::deliver`): with Raft, the last one its own Raft member
    /// committed, so nodes learn a view one by one (a node cut off or hung
    /// learns it only once it hears the leader again); with the oracle,
    /// the view, on every node at once. Before any (a process started
    /// without a data directory), itself alone, numbered 0, as the
    /// broker's `Cluster::bind` starts it.
    view: BTreeSet<usize>,
    view_number: u64,
    /// The last batch its interest was sent whole after (a tick back in
    /// service: `resend_interest`): interest entries up to it are not
    /// sent again.
    interest_covers: u64,
}

/// What to do once every gate of a join is done.
#[derive(Debug)]
enum Then {
    /// Resolve this gate (a held publish routed again).
    Resolve(usize),
    /// Acknowledge a forwarded publish or a chain copy: its changes here
    /// are committed. If they are not, a forward is refused (`links`: the
    /// sender holds it and routes it again) and a copy goes unanswered
    /// (`answer_when`: the writer's wait ends at its deadline).
    Ack {
        node: usize,
        inc: u64,
        to: usize,
        to_inc: u64,
        seq: u64,
        forward: bool,
    },
    /// Answer a state store copy: it is on this node's disk.
    StoreAck {
        node: usize,
        inc: u64,
        to: usize,
        to_inc: u64,
        seq: u64,
        ok: bool,
    },
    /// Answer state store request `r` (its change on the owner's disk).
    StoreFinish(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    Opening,
    /// Attached; the CONNACK waits for the attach's commit.
    Attaching,
    Open,
    Closed,
}

struct Conn {
    client: usize,
    node: usize,
    inc: u64,
    state: ConnState,
    core_conn: Option<u64>,
    outbox: Arc<Outbox>,
    /// Bytes the node has read and not decoded.
    rx: BytesMut,
    /// Bytes the client has read and not decoded.
    crx: BytesMut,
    /// Replies waiting for commits, oldest first.
    waiting: VecDeque<(Vec<Down>, Vec<usize>)>,
}

struct Member<'a>(&'a str, usize);

impl mqlb_placement::Node for Member<'_> {
    fn name(&self) -> &str {
        self.0
    }
    fn weight(&self) -> u32 {
        1
    }
}

/// The whole simulated system.
pub struct World {
    seed: u64,
    cfg: Config,
    now: Time,
    base: Instant,
    wall_offset_ms: i64,
    /// Each node's own clock error on top (NTP-level skew, and steps of
    /// one node's clock), in milliseconds.
    skew_ms: Vec<i64>,
    queue: BTreeMap<(Time, u64, u64), Ev>,
    streams: BTreeMap<u64, (Time, u64)>,
    nodes: Vec<Node>,
    view: BTreeSet<usize>,
    conns: Vec<Conn>,
    clients: Vec<Client>,
    gates: Vec<Gate>,
    /// Gates that wait for others, and what then.
    joins: Vec<(Vec<usize>, Then)>,
    /// The committed view's number.
    view_number: u64,
    dirty: BTreeSet<usize>,
    publishing: bool,
    /// (node, peer): `node` has heard `peer`'s interest (with
    /// `Config::spread`, publishing starts once every subscriber's interest
    /// reached every node: a SUBACK does not wait for it).
    interest_heard: std::collections::BTreeSet<(usize, usize)>,
    /// Cluster links that are down (either direction), by node pair.
    links_down: BTreeSet<(usize, usize)>,
    /// Links being dialled, `(from, to)`: `from` cannot send to `to` until
    /// its `Ev::LinkOpen` (a node's link map holds a peer only once the
    /// handshake is done, and its snapshot goes first).
    opening: BTreeSet<(usize, usize)>,
    /// Answers (`Ack`, `Refused`, `StoreAck`) a node made for a peer
    /// whose link from it is still being dialled, in order, with whether
    /// each goes on the store's stream: sent after the link's snapshot
    /// (`Cluster::answer`'s `early_answers`).
    early: BTreeMap<(usize, usize), Vec<(bool, Frame)>>,
    /// Each publisher's last will (it left for good): the connection it
    /// was the will of, and the gates of the batch that scheduled it
    /// (`Config::wills`).
    last_wills: BTreeMap<usize, LastWill>,
    /// When each node crashed (for `check_last_wills`).
    crashed_at: Vec<(usize, Time)>,
    /// Answers sent to clients so far (the targeted crashes' draw).
    sends: u64,
    /// The clients' Receive Maximum (a small one queues messages in the
    /// session), drawn from the seed.
    receive_maximum: u16,
    /// The longest a batch waits between its numbering and its hand-off.
    append_within: Time,
    slow_until: Time,
    last_join: Time,
    /// The node a partition cuts off, until the view counts it again.
    partitioned: Option<usize>,
    bad: Vec<Violation>,
    cov: Coverage,
    events: u64,
    digest: u64,
    /// Print every event (`MQLB_SIM_TRACE=1`).
    trace: bool,
    store_clients: Vec<StoreClient>,
    store_ops: Vec<Op>,
    store_reqs: Vec<StoreReq>,
    /// The number of the last view the Raft group committed.
    raft_view_number: u64,
    /// Looks for a moment to aim the power loss at, so far.
    power_tries: u64,
    /// The node that hangs past the failure detector, and until when.
    hung: Option<(usize, Time)>,
    /// Each state store key's last acknowledged revision.
    store_acked_rev: BTreeMap<Vec<u8>, mqlb_statestore::store::Rev>,
}

// Streams: each a FIFO of its own, with its own draws.
/// The broker's id for node `n` (its position in the directory).
fn node_id(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn up_stream(conn: usize) -> u64 {
    (1 << 40) | (conn as u64) << 1
}
fn down_stream(conn: usize) -> u64 {
    up_stream(conn) | 1
}
fn link_stream(from: usize, to: usize) -> u64 {
    (1 << 32) | (from as u64) << 8 | to as u64
}
fn append_stream(node: usize) -> u64 {
    (2 << 32) | node as u64
}
fn wake_stream(client: usize) -> u64 {
    (3 << 32) | client as u64
}
fn tick_stream(client: usize) -> u64 {
    (7 << 32) | client as u64
}
fn node_tick_stream(node: usize) -> u64 {
    (8 << 32) | node as u64
}
/// A graceful stop's steps on `node`.
pub(super) fn stop_stream(node: usize) -> u64 {
    (15 << 32) | node as u64
}
/// `cluster::FAILURE_TIMEOUT`: a link that hears nothing for this long is
/// dropped.
const FAILURE_TIMEOUT_SIM: Time = 3 * SECOND;
/// The cluster's tick (`consensus::TICK`-like).
const TICK: Time = 50 * MS;
const FAULTS: u64 = 4 << 32;
const DEADLINES: u64 = 5 << 32;
const VIEWS: u64 = 6 << 32;
const CLOCKS: u64 = 9 << 32;

/// The packets in `b`, for a trace.
fn packets(b: &Bytes) -> String {
    let mut buf = BytesMut::from(&b[..]);
    let mut out = Vec::new();
    while let Ok(Some(p)) = decode(&mut buf, V, usize::MAX) {
        out.push(match p {
            Packet::Publish(p) => format!(
                "PUBLISH({:?} {} q{} dup={} {:?})",
                p.packet_id.map(|i| i.get()),
                p.topic,
                p.qos as u8,
                p.dup,
                String::from_utf8_lossy(&p.payload)
            ),
            other => format!("{other:?}"),
        });
    }
    out.join(" ")
}

fn new_core(n: usize) -> Core {
    let mut core = Core::new();
    core.join_cluster(u32::try_from(n + 1).unwrap_or(u32::MAX));
    core
}

impl World {
    /// A world for `seed`: nodes, clients whose sessions share one chain,
    /// and the fault schedule.
    pub fn new(seed: u64, cfg: Config) -> World {
        let nodes = (0..cfg.nodes)
            .map(|n| Node {
                name: format!("n{}", n + 1),
                up: true,
                inc: 0,
                core: new_core(n),
                replicas: Replicas::default(),
                log: Sequencer::default(),
                waits: Commits::default(),
                next_rep: 1,
                conns: BTreeMap::new(),
                stalled_until: 0,
                // The cluster starts linked and synced (every node starts
                // empty): every link's snapshot held nothing.
                covers: (0..cfg.nodes).filter(|&p| p != n).map(|p| (p, 0)).collect(),
                synced: (0..cfg.nodes).filter(|&p| p != n).collect(),
                resync_seq: BTreeMap::new(),
                stepped_down: false,
                leaving: false,
                announced: false,
                held_for_copies: Vec::new(),
                held: HeldQueue::new(),
                promotions: Promotions::new(),
                seen: Seen::default(),
                seen_stash: BTreeMap::new(),
                snapshot_from: BTreeMap::new(),
                store: StoreNode::new(&format!("n{}", n + 1)),
                raft: None,
                disk: Disk::default(),
                settled: true,
                tick: tick::Tick::new(1, true),
                last_view: (0..cfg.nodes).collect(),
                view: (0..cfg.nodes).collect(),
                view_number: 1,
                interest_covers: 0,
            })
            .collect::<Vec<_>>();
        let skew = cfg.clock_skew;
        let mut w = World {
            seed,
            cfg,
            now: 0,
            base: Instant::now(),
            wall_offset_ms: 0,
            skew_ms: (0..nodes.len() as u64)
                .map(|n| {
                    if skew {
                        within(draw(seed, CLOCKS, n), 0, 4_000) as i64 - 2_000
                    } else {
                        0
                    }
                })
                .collect(),
            queue: BTreeMap::new(),
            streams: BTreeMap::new(),
            view: (0..nodes.len()).collect(),
            nodes,
            conns: Vec::new(),
            clients: Vec::new(),
            gates: Vec::new(),
            joins: Vec::new(),
            view_number: 1,
            dirty: BTreeSet::new(),
            publishing: false,
            interest_heard: std::collections::BTreeSet::new(),
            links_down: BTreeSet::new(),
            opening: BTreeSet::new(),
            early: BTreeMap::new(),
            last_wills: BTreeMap::new(),
            crashed_at: Vec::new(),
            sends: 0,
            receive_maximum: u16::try_from(within(draw(seed, 0xA11, 0), 1, 16)).unwrap_or(16),
            append_within: if draw(seed, 0xA11, 1).is_multiple_of(4) {
                20 * MS
            } else {
                1_500
            },
            slow_until: 0,
            last_join: 0,
            partitioned: None,
            bad: Vec::new(),
            cov: Coverage::default(),
            events: 0,
            digest: 0,
            trace: std::env::var_os("MQLB_SIM_TRACE").is_some(),
            store_clients: Vec::new(),
            store_ops: Vec::new(),
            store_reqs: Vec::new(),
            raft_view_number: 0,
            power_tries: 0,
            hung: None,
            store_acked_rev: BTreeMap::new(),
        };
        if w.cfg.raft {
            let names: Vec<String> = w.nodes.iter().map(|n| n.name.clone()).collect();
            for n in 0..w.nodes.len() {
                let seed = w.raft_seed(n, 0);
                let keeper = w.raft_keeper(n);
                w.nodes[n].raft = Some(RaftNode::new(n, &names, seed, keeper));
                w.start_raft_ticks(n);
            }
        }
        let ids = if w.cfg.spread {
            w.spread_ids(w.cfg.publishers + w.cfg.subscribers)
        } else {
            w.shared_chain_ids(w.cfg.publishers + w.cfg.subscribers)
        };
        for (i, id) in ids.into_iter().enumerate() {
            let role = if i < w.cfg.publishers {
                Role::Publisher(Publisher::new(seed, i, w.cfg.messages, w.cfg.window))
            } else {
                Role::Subscriber(Subscriber::default())
            };
            w.clients.push(Client {
                id,
                role,
                conn: None,
                open: false,
                attempts: 0,
            });
        }
        for c in 0..w.clients.len() {
            let d = within(draw(seed, wake_stream(c), 0), 0, 20 * MS);
            w.schedule(wake_stream(c), d, Ev::Wake { client: c });
        }
        if w.cfg.store {
            // Started together, every node is synced for the first view.
            for n in 0..w.nodes.len() {
                for p in 0..w.nodes.len() {
                    if p != n {
                        w.nodes[n].store.synced.insert(p, w.view_number);
                    }
                }
            }
            w.store_clients = (0..store::STORE_CLIENTS)
                .map(|_| StoreClient::default())
                .collect();
            w.start_store_clients();
        }
        w.schedule_faults();
        w.schedule_disk_faults();
        w.schedule_hangs();
        w.update_reachable();
        for n in 0..w.nodes.len() {
            let s = node_tick_stream(n);
            let d = within(draw(seed, s, 0), 0, TICK);
            w.schedule(s, d, Ev::NodeTick { node: n });
        }
        w
    }

    /// Client IDs that rank the nodes alike (so their sessions share an
    /// owner and a chain in every view): the simulation needs no forwarding
    /// between nodes. Which ranking is the seed's choice.
    fn shared_chain_ids(&self, n: usize) -> Vec<Arc<str>> {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        let mut out: Vec<Arc<str>> = Vec::new();
        let mut target: Option<Vec<usize>> = None;
        let mut k = 0u64;
        while out.len() < n {
            let id = format!("c{:x}-{k}", self.seed & 0xffff);
            k += 1;
            let r = self.rank_over(&id, &all);
            match &target {
                None => target = Some(r),
                Some(t) if *t != r => continue,
                Some(_) => {}
            }
            out.push(Arc::from(id));
        }
        out
    }

    /// Client IDs whose sessions do not all share a chain: the first
    /// publisher and the first subscriber are owned by different nodes.
    fn spread_ids(&self, n: usize) -> Vec<Arc<str>> {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        let mut out: Vec<Arc<str>> = Vec::new();
        let mut k = 0u64;
        let first_sub = self.cfg.publishers;
        while out.len() < n {
            let id = format!("c{:x}-{k}", self.seed & 0xffff);
            k += 1;
            if out.len() == first_sub && first_sub > 0 {
                let owner = |c: &str| self.rank_over(c, &all).first().copied();
                if owner(&id) == owner(&out[0]) {
                    continue;
                }
            }
            out.push(Arc::from(id));
        }
        out
    }

    fn rank_over(&self, client: &str, among: &[usize]) -> Vec<usize> {
        let members: Vec<Member<'_>> = among
            .iter()
            .map(|&i| Member(&self.nodes[i].name, i))
            .collect();
        mqlb_placement::rank(client.as_bytes(), &members)
            .into_iter()
            .map(|m| m.1)
            .collect()
    }

    /// `client`'s chain in the cluster's view: owner first (where the
    /// balancer sends the client).
    fn chain(&self, client: &str) -> Vec<usize> {
        self.chain_in(&self.view, client)
    }

    /// `client`'s chain in the view installed on node `n`: owner first.
    fn chain_on(&self, n: usize, client: &str) -> Vec<usize> {
        self.chain_in(&self.nodes[n].view, client)
    }

    fn chain_in(&self, view: &BTreeSet<usize>, client: &str) -> Vec<usize> {
        let view: Vec<&str> = view.iter().map(|&n| self.nodes[n].name.as_str()).collect();
        let chain = mqlb_broker_core::chain::chain(client, &view, self.cfg.replication);
        chain
            .into_iter()
            .filter_map(|name| self.index_of(name))
            .collect()
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Whom `node` sends `client`'s changes to (`chain::targets`): its
    /// chain, and linked peers the view does not count yet whose chain it
    /// would be in.
    fn targets(&self, node: usize, client: &str) -> Vec<usize> {
        let installed = &self.nodes[node].view;
        let view: Vec<&str> = installed
            .iter()
            .map(|&n| self.nodes[n].name.as_str())
            .collect();
        let joining: Vec<&str> = self.nodes[node]
            .covers
            .keys()
            .filter(|m| !installed.contains(m) && self.nodes[**m].up)
            .map(|&m| self.nodes[m].name.as_str())
            .collect();
        mqlb_broker_core::chain::targets(client, &view, &joining, self.cfg.replication)
            .into_iter()
            .filter_map(|name| self.index_of(name))
            .collect()
    }

    fn owner(&self, client: &str) -> Option<usize> {
        self.chain(client).first().copied()
    }

    /// `client`'s owner in the view installed on node `n`.
    fn owner_on(&self, n: usize, client: &str) -> Option<usize> {
        self.chain_on(n, client).first().copied()
    }

    /// `Cluster::live_holder` on node `n`: the holder its copy of
    /// `client`'s session names, if the view counts it.
    fn live_holder(&self, n: usize, client: &str) -> Option<usize> {
        let h = self.nodes[n].replicas.holder(client)?;
        self.holder_live(n, h).then_some(h as usize)
    }

    /// Whether a copy on node `n` whose holder is `h` has a live holder:
    /// another node, in the view (the broker's rule, `live_peers`: a
    /// holder that has said it is leaving counts until the view drops it).
    fn holder_live(&self, n: usize, h: u32) -> bool {
        let h = h as usize;
        h != n && self.nodes[n].view.contains(&h)
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_micros(self.now)
    }

    /// Node `n`'s wall clock: true time, plus the cluster's clock steps,
    /// plus its own skew.
    fn wall(&self, n: usize) -> SystemTime {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
        let skew = self.skew_ms.get(n).copied().unwrap_or(0);
        let ms = i64::try_from(self.now / MS).unwrap_or(i64::MAX) + self.wall_offset_ms + skew;
        if ms >= 0 {
            base + Duration::from_millis(ms.unsigned_abs())
        } else {
            base - Duration::from_millis(ms.unsigned_abs())
        }
    }

    /// Queues `ev` on `stream`, `delay` from now, never before the
    /// stream's last event (each stream is FIFO).
    fn schedule(&mut self, stream: u64, delay: Time, ev: Ev) {
        let (last, n) = self.streams.entry(stream).or_insert((0, 0));
        let at = (self.now + delay).max(*last);
        *last = at;
        *n += 1;
        let key = (at, stream, *n);
        self.queue.insert(key, ev);
    }

    /// A network delay on `stream`: tens to hundreds of microseconds,
    /// sometimes milliseconds, long while the network is slow.
    fn net_delay(&self, stream: u64) -> Time {
        let n = self.streams.get(&stream).map_or(0, |s| s.1);
        let v = draw(self.seed, stream, n);
        let mut d = within(v, 30, 400);
        if self.cfg.faults && (v >> 32).is_multiple_of(50) {
            d += within(v >> 8, 2 * MS, 40 * MS);
        }
        if self.now < self.slow_until {
            d = d * 10 + 5 * MS;
        }
        d
    }

    fn schedule_faults(&mut self) {
        if !self.cfg.faults {
            return;
        }
        let mut rng = Rng::new(self.seed);
        let warmup = self.warmup();
        let mut t = 200 * MS + warmup;
        loop {
            t += rng.range(200 * MS, 1_200 * MS);
            if t > self.cfg.fault_window + warmup {
                break;
            }
            let nodes = self.nodes.len() as u64;
            let f = match rng.range(0, 99) {
                0..=39 => {
                    let n = rng.range(0, nodes - 1) as usize;
                    // Drawn apart from `rng`: runs without graceful stops
                    // keep their schedules.
                    if self.cfg.graceful_stops && self.cfg.raft && mix(self.seed ^ t) & 1 == 0 {
                        Fault::Stop(n)
                    } else {
                        Fault::Crash(n)
                    }
                }
                40..=59 => Fault::Drop(rng.range(0, self.clients.len() as u64 - 1) as usize),
                60..=74 => Fault::Stall(rng.range(0, nodes - 1) as usize, rng.range(5, 250) * MS),
                75..=84 if self.cfg.clock_skew && rng.range(0, 1) == 0 => Fault::NodeClockStep(
                    rng.range(0, nodes - 1) as usize,
                    rng.range(0, 20_000) as i64 - 10_000,
                ),
                75..=84 => Fault::ClockStep(rng.range(0, 120_000) as i64 - 60_000),
                85..=92 if self.cfg.link_drops => {
                    let a = rng.range(0, nodes - 1) as usize;
                    let b = (a + 1 + rng.range(0, nodes - 2) as usize) % nodes as usize;
                    Fault::LinkDrop(a, b, rng.range(10, 500) * MS)
                }
                93..=96 if self.cfg.partitions => {
                    Fault::Partition(rng.range(0, nodes - 1) as usize, rng.range(100, 3_000) * MS)
                }
                _ => Fault::Slow(rng.range(50, 500) * MS),
            };
            let now = self.now;
            self.now = t;
            self.schedule(FAULTS, 0, Ev::Fault(f));
            self.now = now;
        }
    }

    /// Draws the hangs past the failure detector ([`Config::hangs`], with
    /// the view from Raft, which notices them), from a generator of their
    /// own (so runs without them keep their schedules): in a third of the
    /// runs, one node hangs for 3.5-6 s.
    fn schedule_hangs(&mut self) {
        if !self.cfg.hangs || !self.cfg.raft || !self.cfg.faults {
            return;
        }
        let mut rng = Rng::new(mix(self.seed ^ 0x4A46));
        if rng.range(0, 2) != 0 {
            return;
        }
        let n = rng.range(0, self.nodes.len() as u64 - 1) as usize;
        let d = rng.range(3_500, 6_000) * MS;
        let at = 200 * MS + self.warmup() + rng.range(0, self.cfg.fault_window);
        let now = self.now;
        self.now = at;
        self.schedule_unordered(FAULTS | 9, 0, Ev::Fault(Fault::Hang(n, d)));
        self.now = now;
    }

    /// Runs to the end and checks what every client was given.
    pub fn run(mut self) -> Outcome {
        while let Some(((at, stream, n), ev)) = self.queue.pop_first() {
            self.now = at;
            self.events += 1;
            self.digest = mix(self.digest ^ at ^ mix(stream ^ (n << 1)));
            if self.events > EVENT_LIMIT {
                self.bad.push(format!("runaway: over {EVENT_LIMIT} events"));
                break;
            }
            if at > TIME_LIMIT {
                break;
            }
            if let Some(node) = self.target(&ev) {
                let until = self.nodes[node].stalled_until;
                if until > at {
                    self.queue.insert((until, stream, n), ev);
                    continue;
                }
            }
            if let Some((h, until)) = self.hung {
                if until > at && self.hung_target(&ev) == Some(h) {
                    // Everything resumes at once, each stream in its own
                    // order: its clients' packets may come before its
                    // tick notices it lost the majority.
                    let k = self.cov.hangs;
                    let resume = until + within(draw(self.seed, stream, k << 24), 0, 3 * MS);
                    self.queue.insert((resume, stream, n), ev);
                    continue;
                }
            }
            if self.trace {
                println!("{:>10.3}ms {}", at as f64 / 1000.0, self.describe(&ev));
            }
            self.handle(ev);
            self.pump_dirty();
            self.check_holders();
            if self.queue.len() > MAX_QUEUE {
                self.bad
                    .push(format!("unbounded: {} events queued", self.queue.len()));
                break;
            }
        }
        self.final_checks();
        Outcome {
            seed: self.seed,
            mutation: self.cfg.mutation,
            raft: self.cfg.raft,
            disk: self.cfg.disk,
            hangs: self.cfg.hangs,
            wills: self.cfg.wills,
            spread: self.cfg.spread.then_some(self.cfg.links_count_as_failures),
            graceful_stops: self.cfg.graceful_stops,
            violations: self.bad,
            coverage: self.cov,
            events: self.events,
            simulated: Duration::from_micros(self.now),
            digest: self.digest,
        }
    }

    /// The node an event is handled on, if it is one (a stalled node
    /// handles it later).
    fn target(&self, ev: &Ev) -> Option<usize> {
        match ev {
            Ev::Up { conn, .. } => Some(self.conns[*conn].node),
            Ev::Frame { to, .. } => Some(*to),
            Ev::Append { node, .. } => Some(*node),
            Ev::LinkOpen { from, .. } => Some(*from),
            Ev::StoreStep { req } => Some(self.store_node(*req)),
            Ev::RaftTick { node, .. } => Some(*node),
            Ev::DiskWrite { node, .. } | Ev::DiskSynced { node, .. } => Some(*node),
            _ => None,
        }
    }

    /// The node a hung node's own work is on: what [`World::target`]
    /// names, and its ticks and disk writer.
    fn hung_target(&self, ev: &Ev) -> Option<usize> {
        match ev {
            Ev::NodeTick { node }
            | Ev::PromoteCheck { node, .. }
            | Ev::StepDown { node, .. }
            | Ev::StopSettle { node, .. }
            | Ev::StopExit { node, .. }
            | Ev::DiskWrite { node, .. }
            | Ev::DiskSynced { node, .. } => Some(*node),
            other => self.target(other),
        }
    }

    fn describe(&self, ev: &Ev) -> String {
        match ev {
            Ev::Up { conn, item } => {
                let c = &self.conns[*conn];
                let what = match item {
                    Up::Bytes(b) => packets(b),
                    other => format!("{other:?}"),
                };
                format!(
                    "{} -> {} (conn {conn}): {what}",
                    self.clients[c.client].id, self.nodes[c.node].name
                )
            }
            Ev::Down { conn, item } => {
                let c = &self.conns[*conn];
                let what = match item {
                    Down::Bytes(b) => packets(b),
                    other => format!("{other:?}"),
                };
                format!(
                    "{} <- {} (conn {conn}): {what}",
                    self.clients[c.client].id, self.nodes[c.node].name
                )
            }
            Ev::Frame {
                from, to, bytes, ..
            } => {
                let mut b = bytes.clone();
                let mut fs = Vec::new();
                while let Ok(Some(f)) = Frame::decode(&mut b) {
                    fs.push(match f {
                        Frame::Replicate {
                            seq,
                            client,
                            epoch,
                            changes,
                            ..
                        } => {
                            format!("Replicate#{seq} {client} e{epoch} {changes:?}")
                        }
                        other => format!("{other:?}"),
                    });
                }
                format!(
                    "{} => {}: {}",
                    self.nodes[*from].name,
                    self.nodes[*to].name,
                    fs.join(", ")
                )
            }
            other => format!("{other:?}"),
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Up { conn, item } => self.at_node(conn, item),
            Ev::Down { conn, item } => self.at_client(conn, item),
            Ev::Frame {
                from,
                from_inc,
                to,
                to_inc,
                bytes,
            } => self.frame(from, from_inc, to, to_inc, bytes),
            Ev::Append { node, inc } => {
                if self.nodes[node].up && self.nodes[node].inc == inc {
                    self.append(node);
                }
            }
            Ev::Deadline { gate } => {
                if self.gates[gate].state == GateState::Pending {
                    self.cov.commit_deadlines += 1;
                    self.resolve(gate, GateState::Failed);
                }
            }
            Ev::Wake { client } => self.dial(client),
            Ev::Tick { client } => self.tick(client),
            Ev::Fault(f) => self.fault(f),
            Ev::LinkOpen {
                from,
                from_inc,
                to,
                to_inc,
            } => self.link_open(from, from_inc, to, to_inc),
            Ev::NodeTick { node } => self.node_tick(node),
            Ev::StoreOp { client } => self.store_op(client),
            Ev::StoreGiveUp { client, op } => self.store_give_up(client, op),
            Ev::StoreStep { req } => self.store_step(req),
            Ev::RaftTick { node, inc } => self.raft_tick(node, inc),
            Ev::DiskFault(f) => self.disk_fault(f),
            Ev::DiskWrite { node, inc } => self.disk_write(node, inc),
            Ev::DiskSynced {
                node,
                inc,
                upto,
                reps,
            } => self.disk_synced(node, inc, upto, reps),
            Ev::PromoteCheck { node, inc } => {
                if self.nodes[node].up && self.nodes[node].inc == inc {
                    self.promote_owned(node);
                    self.say_promoted(node);
                }
            }
            Ev::StepDown { node, inc } => {
                if self.nodes[node].up && self.nodes[node].inc == inc {
                    // Its tick notices it lost the majority.
                    self.cluster_tick(node, true);
                }
            }
            Ev::StopSettle { node, inc, since } => self.stop_settle(node, inc, since),
            Ev::StopExit { node, inc } => {
                if self.nodes[node].up && self.nodes[node].inc == inc {
                    self.cov.graceful_exits += 1;
                    self.crash(node);
                }
            }
            Ev::View { node, join, inc } => {
                if join {
                    self.view_join(node, inc);
                } else {
                    self.view_leave(node);
                }
            }
        }
    }

    /// The view counts `node` (incarnation `inc`) again; each node acts
    /// on it at its next tick (`cluster_tick`).
    fn view_join(&mut self, node: usize, inc: u64) {
        if !self.nodes[node].up || self.nodes[node].inc != inc || self.view.contains(&node) {
            return;
        }
        self.view.insert(node);
        self.last_join = self.now;
        if self.partitioned == Some(node) {
            // (One failure at a time: the next may come.)
            self.partitioned = None;
        }
        self.after_view();
    }

    /// The view drops `node`; each node acts on it at its next tick.
    fn view_leave(&mut self, node: usize) {
        if self.view.remove(&node) {
            self.after_view();
        }
    }

    // ---- clients -------------------------------------------------------

    /// A client opens a connection to the node the balancer sends it to:
    /// its owner in the committed view.
    fn dial(&mut self, client: usize) {
        if self.clients[client].conn.is_some() {
            return;
        }
        if matches!(&self.clients[client].role, Role::Publisher(p) if p.gone) {
            return;
        }
        let Some(node) = self.owner(&self.clients[client].id) else {
            return;
        };
        let conn = self.conns.len();
        self.conns.push(Conn {
            client,
            node,
            inc: self.nodes[node].inc,
            state: ConnState::Opening,
            core_conn: None,
            outbox: Arc::new(Outbox::new(Encoder::new(V, u32::MAX, 0))),
            rx: BytesMut::new(),
            crx: BytesMut::new(),
            waiting: VecDeque::new(),
        });
        let c = &mut self.clients[client];
        c.conn = Some(conn);
        c.open = false;
        c.attempts += 1;
        let d = self.net_delay(up_stream(conn));
        self.schedule(
            up_stream(conn),
            d,
            Ev::Up {
                conn,
                item: Up::Connect,
            },
        );
    }

    /// The client's connection is gone: it dials again after a back-off.
    fn client_lost(&mut self, client: usize) {
        let c = &mut self.clients[client];
        c.conn = None;
        c.open = false;
        let n = c.attempts;
        let d = within(draw(self.seed, wake_stream(client), n), 10 * MS, 150 * MS);
        self.schedule(wake_stream(client), d, Ev::Wake { client });
    }

    fn at_client(&mut self, conn: usize, item: Down) {
        let client = self.conns[conn].client;
        if self.clients[client].conn != Some(conn) {
            return; // an old connection's
        }
        let mut actions = Vec::new();
        match item {
            Down::Closed => return self.client_lost(client),
            Down::Connack { present } => {
                self.clients[client].open = true;
                let publishing = self.publishing;
                actions = match &mut self.clients[client].role {
                    Role::Publisher(p) => p.on_connack(publishing),
                    Role::Subscriber(s) => s.on_connack(present),
                };
            }
            Down::Suback => {
                if let Role::Subscriber(s) = &mut self.clients[client].role {
                    s.on_suback();
                }
                self.maybe_start_publishing();
            }
            Down::Bytes(b) => {
                self.conns[conn].crx.extend_from_slice(&b);
                loop {
                    let p = match decode(&mut self.conns[conn].crx, V, usize::MAX) {
                        Ok(Some(p)) => p,
                        Ok(None) => break,
                        Err(e) => {
                            self.bad
                                .push(format!("client could not decode the broker: {e}"));
                            break;
                        }
                    };
                    let id = self.clients[client].id.clone();
                    let mut bad = Vec::new();
                    actions.extend(match &mut self.clients[client].role {
                        Role::Publisher(pb) => pb.on_packet(&p),
                        Role::Subscriber(s) => s.on_packet(&p, &id, &mut bad),
                    });
                    self.bad.extend(bad);
                }
            }
        }
        self.act(conn, actions);
        self.maybe_leave(client, conn);
    }

    /// With wills, a publisher that is done leaves for good, without
    /// DISCONNECT: its session's will goes out after its delay, from
    /// whichever node holds the session by then.
    fn maybe_leave(&mut self, client: usize, conn: usize) {
        if !self.cfg.wills {
            return;
        }
        let Role::Publisher(p) = &mut self.clients[client].role else {
            return;
        };
        if !p.done() || p.gone {
            return;
        }
        p.gone = true;
        self.clients[client].conn = None;
        self.clients[client].open = false;
        self.send_up(conn, Up::Gone);
    }

    /// `conn::disconnected`: a publisher's connection went without
    /// DISCONNECT, so its will waits out its delay (`Config::wills`).
    fn schedule_will(&mut self, conn: usize) {
        if !self.cfg.wills {
            return;
        }
        let client = self.conns[conn].client;
        let (index, gone) = match &self.clients[client].role {
            Role::Publisher(p) => (p.index, p.gone),
            Role::Subscriber(_) => return,
        };
        let node = self.conns[conn].node;
        let id = self.clients[client].id.clone();
        let now = self.instant();
        let (topic, payload) = will_of(index, conn as u64);
        let will = Message {
            topic: mqlb_protocol::MqttStr::try_from(topic.as_str()).unwrap_or_default(),
            payload,
            qos: QoS::ExactlyOnce,
            retain: false,
            properties: Arc::new(mqlb_protocol::Properties::default()),
            origin: Some(id.clone()),
            received: now,
        };
        let delay = Duration::from_micros(within(
            draw(self.seed, 0x3111, index as u64),
            200 * MS,
            1_500 * MS,
        ));
        let (_, gates) = self.call(node, |core| {
            let mut fx = core.schedule_will(&id, will, delay);
            fx.extend(core.publish_due_wills(now));
            ((), fx)
        });
        self.cov.wills_scheduled += 1;
        // The last will is its last connection's: a hung node that wakes
        // up and closes an older one, whose session moved on to the
        // client's later connection elsewhere, does not replace it (that
        // will was superseded when the client came back, MQTT 5 3.1.3.2.2).
        let later = self.last_wills.get(&client).is_some_and(|w| w.conn > conn);
        if gone && !later {
            self.last_wills.insert(
                client,
                LastWill {
                    conn,
                    gates,
                    node,
                    at: self.now,
                },
            );
        }
    }

    /// Publishers start once every subscriber holds its subscription, so
    /// that every message is due to every subscriber.
    fn maybe_start_publishing(&mut self) {
        if self.publishing {
            return;
        }
        let all = self.clients.iter().all(|c| match &c.role {
            Role::Subscriber(s) => s.ever_subscribed,
            Role::Publisher(_) => true,
        });
        if !all || !self.interest_everywhere() {
            return;
        }
        self.publishing = true;
        for c in 0..self.clients.len() {
            if matches!(self.clients[c].role, Role::Publisher(_)) {
                self.tick(c);
            }
        }
    }

    /// Whether every node has heard the interest of every subscriber's
    /// node (always, without `Config::spread`: no publish crosses nodes).
    /// Interest goes to peers in log order, ahead of anything the
    /// subscriber publishes after its SUBACK, but a SUBACK does not wait
    /// for it: a publish made on another node at that moment may miss the
    /// subscription (docs/cluster.md).
    fn interest_everywhere(&self) -> bool {
        if !self.cfg.spread {
            return true;
        }
        self.clients.iter().all(|c| {
            let Some(h) = c.conn.map(|k| self.conns[k].node) else {
                return !matches!(c.role, Role::Subscriber(_));
            };
            !matches!(c.role, Role::Subscriber(_))
                || (0..self.nodes.len()).all(|n| n == h || self.interest_heard.contains(&(n, h)))
        })
    }

    /// A publisher's pace: one more message, then the next tick.
    fn tick(&mut self, client: usize) {
        let Role::Publisher(p) = &mut self.clients[client].role else {
            return;
        };
        if p.done() {
            return;
        }
        p.tick();
        if let (Some(conn), true) = (self.clients[client].conn, self.clients[client].open) {
            let actions = match &mut self.clients[client].role {
                Role::Publisher(p) => p.fill(),
                Role::Subscriber(_) => Vec::new(),
            };
            self.act(conn, actions);
        }
        let s = tick_stream(client);
        let n = self.streams.get(&s).map_or(0, |s| s.1);
        let d = within(draw(self.seed, s, n), 2 * MS, 60 * MS);
        self.schedule(s, d, Ev::Tick { client });
    }

    fn act(&mut self, conn: usize, actions: Vec<Action>) {
        let mut bytes = BytesMut::new();
        for a in actions {
            match a {
                Action::Send(p) => match p.to_bytes(V) {
                    Ok(b) => bytes.extend_from_slice(&b),
                    Err(e) => self.bad.push(format!("client could not encode: {e}")),
                },
                Action::Subscribe => {
                    if !bytes.is_empty() {
                        let b = std::mem::take(&mut bytes).freeze();
                        self.send_up(conn, Up::Bytes(b));
                    }
                    self.send_up(conn, Up::Subscribe);
                }
            }
        }
        if !bytes.is_empty() {
            self.send_up(conn, Up::Bytes(bytes.freeze()));
        }
    }

    fn send_up(&mut self, conn: usize, item: Up) {
        let s = up_stream(conn);
        let d = self.net_delay(s);
        self.schedule(s, d, Ev::Up { conn, item });
    }

    fn send_down(&mut self, conn: usize, item: Down) {
        if let Down::Bytes(b) = &item {
            self.digest = mix(self.digest ^ hash_bytes(b));
        }
        // Crashes aimed where they hurt (FoundationDB's "buggify"): now and
        // then, a node dies just after it answered a client, while what
        // the answer promised may still be on its way down a chain.
        if self.cfg.faults
            && self.now < self.cfg.fault_window + self.warmup()
            && self.now > self.warmup()
            && matches!(item, Down::Bytes(_))
        {
            self.sends += 1;
            let v = draw(self.seed, 0xB066, self.sends);
            if v.is_multiple_of(700) {
                let node = self.conns[conn].node;
                self.cov.targeted_crashes += 1;
                self.schedule_unordered(
                    FAULTS | 2,
                    within(v >> 16, 0, 3 * MS),
                    Ev::Fault(Fault::Crash(node)),
                );
            }
        }
        let s = down_stream(conn);
        let d = self.net_delay(s);
        self.schedule(s, d, Ev::Down { conn, item });
    }

    // ---- the connection shell (conn.rs) ---------------------------------

    fn at_node(&mut self, conn: usize, item: Up) {
        let c = &self.conns[conn];
        let node = c.node;
        if c.state == ConnState::Closed {
            return;
        }
        if !self.nodes[node].up || self.nodes[node].inc != c.inc {
            // Nobody listens: the client's connect (or write) fails.
            self.conns[conn].state = ConnState::Closed;
            self.send_down(conn, Down::Closed);
            return;
        }
        match item {
            Up::Connect => self.connect(conn),
            Up::Subscribe => {
                let id = self.client_id(conn);
                let sub = Sub {
                    // Retained messages are not sent at subscribe time: a
                    // subscriber that subscribes again would be given one
                    // it had (the retained stores are checked on their own).
                    options: SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        retain_handling: mqlb_protocol::RetainHandling::DoNotSend,
                        ..SubscriptionOptions::default()
                    },
                    id: None,
                };
                let (_, g) = self.call(node, |core| core.subscribe(&id, FILTER, sub));
                self.queue_replies(conn, vec![Down::Suback], g.into_iter().collect());
            }
            Up::Bytes(b) => self.read(conn, b),
            Up::Gone => self.close(conn, false),
        }
    }

    fn client_id(&self, conn: usize) -> Arc<str> {
        self.clients[self.conns[conn].client].id.clone()
    }

    /// CONNECT: served by the node holding the session if another does
    /// (relayed), a copy promoted if this node keeps one, then attached.
    fn connect(&mut self, conn: usize) {
        let id = self.client_id(conn);
        let mut node = self.conns[conn].node;
        // `Cluster::ready`: in the committed view with every live peer's
        // snapshot since it began serving. (The oracle counted a node in
        // the view only once its snapshots had come, so there serving was
        // ready; its seeds replay as they were found.)
        let ready = if self.cfg.raft {
            self.ready(node) && self.nodes[node].settled
        } else {
            self.serves(node)
        };
        if !ready {
            // Refused.
            self.conns[conn].state = ConnState::Closed;
            self.send_down(conn, Down::Closed);
            return;
        }
        // `Cluster::server_for`: the live holder its copy names, else the
        // owner; the client is relayed there (one hop).
        if !self.nodes[node].core.has_session(&id) {
            let to = self
                .live_holder(node, &id)
                .or_else(|| self.owner_on(node, &id).filter(|&o| o != node));
            if let Some(h) = to {
                self.cov.relays += 1;
                // A relayed client waits for its target's readiness too
                // (`conn::place`; here: refused, the client comes back).
                let ready = if self.cfg.raft {
                    self.ready(h) && self.nodes[h].settled
                } else {
                    self.serves(h)
                };
                if !ready {
                    self.conns[conn].state = ConnState::Closed;
                    self.send_down(conn, Down::Closed);
                    return;
                }
                node = h;
                self.conns[conn].node = h;
                self.conns[conn].inc = self.nodes[h].inc;
            }
        }
        if !self.nodes[node].core.has_session(&id) && self.nodes[node].replicas.epoch(&id).is_some()
        {
            if !self.nodes[node].replicas.promotable(&id, self.instant()) {
                // `copy_settling`: held (here: refused; the client comes
                // back) until a fresher copy comes or the wait is over.
                self.cov.connects_held += 1;
                self.conns[conn].state = ConnState::Closed;
                self.send_down(conn, Down::Closed);
                return;
            }
            self.promote(node, &id);
        }
        let now = self.instant();
        let wall = self.wall(node);
        let gauge = self.conns[conn].outbox.gauge();
        let n = &mut self.nodes[node];
        n.core.advance(now);
        n.core.calibrate_wall(now, wall);
        let receive_maximum = self.receive_maximum;
        let (connected, fx) = n
            .core
            .connect(&id, false, Some(EXPIRY), receive_maximum, gauge);
        n.conns.insert(connected.conn, conn);
        self.conns[conn].core_conn = Some(connected.conn);
        let g = self.effects(node, fx);
        self.conns[conn].state = ConnState::Attaching;
        // The CONNACK goes when the attach is committed (conn.rs: start).
        self.conns[conn].waiting.push_front((
            vec![Down::Connack {
                present: connected.session_present,
            }],
            g.into_iter().collect(),
        ));
        self.dirty.insert(conn);
    }

    /// Packets from the client, handled as one batch: their replies wait
    /// for every commit the batch made.
    fn read(&mut self, conn: usize, b: Bytes) {
        let node = self.conns[conn].node;
        let id = self.client_id(conn);
        self.conns[conn].rx.extend_from_slice(&b);
        let mut out = BytesMut::new();
        let mut gates = Vec::new();
        loop {
            let p = match decode(&mut self.conns[conn].rx, V, mqlb_broker::conn::MAX_PACKET) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    self.bad
                        .push(format!("broker could not decode a client: {e}"));
                    return self.close(conn, true);
                }
            };
            let reply = match p {
                Packet::Publish(p) => {
                    let dup = p.dup;
                    let msg = Message {
                        topic: p.topic,
                        payload: p.payload,
                        qos: p.qos,
                        retain: p.retain,
                        properties: Arc::new(p.properties),
                        origin: Some(id.clone()),
                        received: self.instant(),
                    };
                    match (p.qos, p.packet_id) {
                        (QoS::AtLeastOnce, Some(pid)) => {
                            let (_, g) = self.call(node, |core| ((), core.route(msg)));
                            gates.extend(g);
                            Some(Packet::Puback(Ack::new(pid)))
                        }
                        (QoS::ExactlyOnce, Some(pid)) => {
                            let limit = usize::from(mqlb_broker::conn::RECEIVE_MAXIMUM);
                            let (first, g) = self.call(node, |core| {
                                let (first, mut fx) = core.qos2_received(&id, pid, limit);
                                match first {
                                    Some(true) if dup => fx.extend(core.route_resent(msg)),
                                    Some(true) => fx.extend(core.route(msg)),
                                    Some(false) => fx.extend(core.qos2_resent(&id, pid, &msg)),
                                    None => {}
                                }
                                (first, fx)
                            });
                            gates.extend(g);
                            if first.is_none() {
                                self.bad.push(format!("{id}: over the QoS 2 limit"));
                                return self.close(conn, true);
                            }
                            Some(Packet::Pubrec(Ack::new(pid)))
                        }
                        _ => None,
                    }
                }
                Packet::Pubrel(a) => {
                    let (_, g) = self.call(node, |core| core.qos2_released(&id, a.packet_id));
                    gates.extend(g);
                    Some(Packet::Pubcomp(Ack::new(a.packet_id)))
                }
                Packet::Puback(a) => self.acked(conn, a.packet_id, PacketType::Puback, &mut gates),
                Packet::Pubrec(a) => self.acked(conn, a.packet_id, PacketType::Pubrec, &mut gates),
                Packet::Pubcomp(a) => {
                    self.acked(conn, a.packet_id, PacketType::Pubcomp, &mut gates)
                }
                _ => None,
            };
            if let Some(r) = reply {
                match r.to_bytes(V) {
                    Ok(b) => out.extend_from_slice(&b),
                    Err(e) => self.bad.push(format!("broker could not encode: {e}")),
                }
            }
        }
        if !out.is_empty() {
            self.queue_replies(conn, vec![Down::Bytes(out.freeze())], gates);
        } else if !gates.is_empty() {
            self.queue_replies(conn, Vec::new(), gates);
        }
    }

    /// PUBACK / PUBREC / PUBCOMP from the client (conn.rs: `acked`).
    fn acked(
        &mut self,
        conn: usize,
        pid: mqlb_protocol::PacketId,
        kind: PacketType,
        gates: &mut Vec<usize>,
    ) -> Option<Packet> {
        let node = self.conns[conn].node;
        let id = self.client_id(conn);
        let (pubrel, g) = self.call(node, |core| core.acked(&id, pid, kind));
        gates.extend(g);
        pubrel.then(|| Packet::Pubrel(Ack::new(pid)))
    }

    /// Replies wait behind earlier ones, and for their commits
    /// (conn.rs: `queue_replies`).
    fn queue_replies(&mut self, conn: usize, replies: Vec<Down>, gates: Vec<usize>) {
        let c = &mut self.conns[conn];
        if gates.is_empty() {
            if let Some(last) = c.waiting.back_mut() {
                last.0.extend(replies);
                self.dirty.insert(conn);
                return;
            }
        }
        c.waiting.push_back((replies, gates));
        self.dirty.insert(conn);
    }

    /// Ends a connection on the node: detached, and the client told if the
    /// node closed it.
    fn close(&mut self, conn: usize, tell: bool) {
        let c = &mut self.conns[conn];
        if c.state == ConnState::Closed {
            return;
        }
        c.state = ConnState::Closed;
        let node = c.node;
        let id = self.client_id(conn);
        if let Some(cc) = self.conns[conn].core_conn {
            self.nodes[node].conns.remove(&cc);
            if self.nodes[node].up && self.nodes[node].inc == self.conns[conn].inc {
                self.call(node, |core| ((), core.disconnect(&id, cc)));
                self.schedule_will(conn);
            }
        }
        if tell {
            self.send_down(conn, Down::Closed);
        }
    }

    fn pump_dirty(&mut self) {
        while let Some(conn) = self.dirty.pop_first() {
            self.pump(conn);
        }
    }

    /// Writes what may leave: replies whose commits are done, then the
    /// mailbox up to its first held delivery.
    fn pump(&mut self, conn: usize) {
        if self.conns[conn].state == ConnState::Closed {
            return;
        }
        while let Some((_, gates)) = self.conns[conn].waiting.front() {
            let states: Vec<GateState> = gates.iter().map(|g| self.gates[*g].state).collect();
            if states.contains(&GateState::Failed) {
                // Not committed: the connection closes (conn.rs), its
                // client sends again elsewhere.
                self.cov.not_committed_closes += 1;
                return self.close(conn, true);
            }
            if states.contains(&GateState::Pending) {
                break;
            }
            let Some((replies, _)) = self.conns[conn].waiting.pop_front() else {
                break;
            };
            for r in replies {
                if matches!(r, Down::Connack { .. }) {
                    self.conns[conn].state = ConnState::Open;
                }
                self.send_down(conn, r);
            }
        }
        if !matches!(self.conns[conn].state, ConnState::Open) {
            return; // nothing of the mailbox before the CONNACK
        }
        let taken = self.conns[conn].outbox.take();
        if taken.bytes.len() > MAX_BACKLOG {
            self.bad.push(format!(
                "unbounded: a mailbox of {} bytes",
                taken.bytes.len()
            ));
        }
        if !taken.bytes.is_empty() {
            self.send_down(conn, Down::Bytes(taken.bytes));
        }
        if let Some(why) = taken.close {
            if why == Closing::NotCommitted {
                self.cov.not_committed_closes += 1;
            }
            self.close(conn, true);
        }
    }

    // ---- the node's state (state.rs, effects.rs) -------------------------

    /// One call into `node`'s core at the simulated time, and its effects.
    fn call<T>(
        &mut self,
        node: usize,
        f: impl FnOnce(&mut Core) -> (T, Effects),
    ) -> (T, Vec<usize>) {
        let now = self.instant();
        let wall = self.wall(node);
        let n = &mut self.nodes[node];
        n.core.advance(now);
        n.core.calibrate_wall(now, wall);
        let (t, fx) = f(&mut n.core);
        let g = self.effects(node, fx);
        (t, g)
    }

    /// The records numbered into the log, the items into their mailboxes
    /// (a QoS 2 delivery held until its batch commits: `effects::finish`).
    fn effects(&mut self, node: usize, mut fx: Effects) -> Vec<usize> {
        let sends = fx.take_sends();
        let records = fx.take_records();
        let gate = self.sequence(node, records);
        for (c, o) in sends {
            let Some(&conn) = self.nodes[node].conns.get(&c) else {
                continue;
            };
            let held = matches!(&o, Outgoing::Publish(p) if p.qos == QoS::ExactlyOnce)
                && gate.is_some_and(|g| self.gates[g].state == GateState::Pending);
            match gate {
                Some(g) if held => {
                    self.conns[conn]
                        .outbox
                        .push_held(o, self.gates[g].flag.clone());
                    self.gates[g].held.push(conn);
                }
                _ => self.conns[conn].outbox.push(o),
            }
            self.dirty.insert(conn);
        }
        let parts = fx.into_parts();
        let mut gates: Vec<usize> = gate.into_iter().collect();
        // Publishes for peers (`effects::finish`, then the fabric): the
        // publisher's answer waits for each peer's commit.
        for f in parts.forwards {
            self.cov.forwards += 1;
            let g = self.new_gate();
            gates.push(g);
            let to = f.node as usize;
            match f.route {
                Route::First | Route::Again => {
                    let again = matches!(f.route, Route::Again);
                    self.forward(node, to, f.message, f.groups, again, g);
                }
                // Counted by the core, which asked for it.
                Route::Held => self.hold(node, f.message, f.groups, Vec::new(), false, g, true),
                Route::Deferred(how) => {
                    self.cov.deferred += 1;
                    let since = self.instant();
                    self.nodes[node].held.push(Held {
                        message: f.message,
                        groups: f.groups,
                        how: HeldAs::New(how),
                        since,
                        token: g,
                    });
                }
            }
        }
        gates
    }

    /// A gate with the commit deadline.
    fn new_gate(&mut self) -> usize {
        let gate = self.gates.len();
        self.gates.push(Gate {
            state: GateState::Pending,
            flag: Arc::new(AtomicBool::new(false)),
            held: Vec::new(),
        });
        self.schedule(
            DEADLINES,
            mqlb_broker::effects::COMMIT_DEADLINE.as_micros() as Time,
            Ev::Deadline { gate },
        );
        gate
    }

    /// `Fabric::forward`: to a linked peer, answered when its copies are
    /// committed; held for the takeover if the peer is gone.
    fn forward(
        &mut self,
        from: usize,
        to: usize,
        message: Message,
        groups: Vec<Arc<str>>,
        again: bool,
        gate: usize,
    ) {
        if !self.linked(from, to) {
            // `Fabric::forward` without a link: held, `to` not excluded
            // (a broken link is dialled again; its node may still serve).
            return self.hold(from, message, groups, Vec::new(), false, gate, false);
        }
        let seq = self.nodes[from].next_rep;
        self.nodes[from].next_rep += 1;
        let frame = Frame::Forward {
            seq,
            message: message.clone(),
            groups: groups.clone(),
            again,
        };
        // Waited for in the node's commits, as the broker's `forward` does:
        // given back to be forwarded again if `to` is lost or refuses it.
        let waits = &mut self.nodes[from].waits;
        let done = waits.register(
            seq,
            0,
            [(node_id(to), 1)],
            &[],
            Some((message, groups)),
            gate,
        );
        if let Some(g) = done {
            // (Never: one peer is waited for.)
            self.resolve(g, GateState::Done);
        }
        self.send_frame(from, to, &frame);
    }

    /// `hold_publish`: kept until the lost node's sessions have moved;
    /// `noted`: the core counted it (else it is told, `State::note_held`).
    #[allow(clippy::too_many_arguments)]
    fn hold(
        &mut self,
        node: usize,
        message: Message,
        groups: Vec<Arc<str>>,
        exclude: Vec<usize>,
        refused: bool,
        gate: usize,
        noted: bool,
    ) {
        self.cov.held_publishes += 1;
        if !noted {
            self.nodes[node].core.note_held(&message);
        }
        let since = self.instant();
        let exclude = exclude.into_iter().map(node_id).collect();
        self.nodes[node].held.push(Held {
            message,
            groups,
            how: HeldAs::Again { exclude, refused },
            since,
            token: gate,
        });
    }

    /// Numbers a batch (under the core's lock, in the broker) and hands it
    /// on a little later (after the lock: another call may number its own
    /// batch between).
    fn sequence(&mut self, node: usize, entries: Vec<LogEntry>) -> Option<usize> {
        self.sequence_drawing(node, entries, append_stream(node))
    }

    /// [`World::sequence`], its hand-on delay drawn from stream `s`: the
    /// state store's batches draw from the store's stream, so that adding
    /// them to the log left every other seed's run as it was.
    fn sequence_drawing(&mut self, node: usize, entries: Vec<LogEntry>, s: u64) -> Option<usize> {
        if entries.is_empty() {
            return None;
        }
        let gate = self.new_gate();
        self.nodes[node].log.number(Batch { entries, gate });
        let n = self.streams.get(&s).map_or(0, |s| s.1);
        // Usually within 1.5 ms; in some seeds a thread can be slow to
        // hand its batch on (preempted), for up to 20 ms.
        let d = within(draw(self.seed, s, n), 0, self.append_within);
        let inc = self.nodes[node].inc;
        // Not FIFO with other appends: each is a thread of its own.
        self.schedule_unordered(s, d, Ev::Append { node, inc });
        Some(gate)
    }

    fn schedule_unordered(&mut self, stream: u64, delay: Time, ev: Ev) {
        let (_, n) = self.streams.entry(stream).or_insert((0, 0));
        *n += 1;
        let key = (self.now + delay, stream, *n);
        self.queue.insert(key, ev);
    }

    /// Hands on every batch numbered so far, in the log's order
    /// (`State::commit`), each down its sessions' chains.
    fn append(&mut self, node: usize) {
        let mut handed = 0;
        while let Some((seq, b)) = self.nodes[node].log.take_next() {
            handed += 1;
            self.send_down_chains(node, seq, b);
        }
        if handed > 1 {
            self.cov.appends_of_several += 1;
        }
    }

    /// `replication::send_down_chains`: each session's records to the
    /// other members of its chain; committed once each has answered.
    fn send_down_chains(&mut self, node: usize, log_seq: u64, b: Batch) {
        let rep = self.nodes[node].next_rep;
        self.nodes[node].next_rep += 1;
        // `DiskLog`: what the batch keeps goes to this node's disk too,
        // and its commit waits for the fsync as for one more member.
        let on_disk = self.disk_append(node, log_seq, &b.entries, rep);
        // A state store change or read: its first round down the key's
        // chain (`Cluster::replicate_key`), in the log's order.
        self.store_handed_on(node, b.gate);
        let mut records: Vec<ChangeRecord> = Vec::new();
        for e in b.entries {
            match e {
                LogEntry::Session(r) => records.push(r),
                // `broadcast_after`: to every peer whose link snapshot did
                // not hold it, while this node serves.
                // `broadcast_after` too: every node keeps every retained
                // message, last writer wins.
                LogEntry::Retained {
                    topic,
                    message,
                    version,
                } => {
                    let frame = Frame::Retained {
                        topic,
                        message,
                        version,
                    };
                    for p in 0..self.nodes.len() {
                        let covered = self.nodes[node]
                            .covers
                            .get(&p)
                            .is_some_and(|&c| log_seq <= c);
                        if p != node && self.nodes[p].up && !covered {
                            self.send_frame(node, p, &frame);
                        }
                    }
                }
                LogEntry::Interest { filter, gained }
                    if self.serves(node) && log_seq > self.nodes[node].interest_covers =>
                {
                    let frame = Frame::Interest { filter, gained };
                    for p in 0..self.nodes.len() {
                        let covered = self.nodes[node]
                            .covers
                            .get(&p)
                            .is_some_and(|&c| log_seq <= c);
                        if p != node && self.nodes[p].up && !covered {
                            self.send_frame(node, p, &frame);
                        }
                    }
                }
                _ => {}
            }
        }
        let mut left: BTreeMap<u32, usize> = BTreeMap::new();
        if on_disk && !mutations::on(Mutation::CommitBeforeFsync) {
            left.insert(node_id(node), 1);
        }
        let mut owed: Vec<u32> = Vec::new();
        let now = self.instant();
        for (client, epoch, changes) in mqlb_broker_core::replicas::runs(records) {
            self.nodes[node].seen.note_changes(&client, &changes, now);
            let frame = Frame::Replicate {
                seq: rep,
                client: client.to_string(),
                epoch,
                holder: self.nodes[node].name.clone(),
                changes,
            };
            for m in self.targets(node, &client) {
                if m == node {
                    continue;
                }
                let id = node_id(m);
                // A link opened after this batch was numbered had it in
                // its snapshot already; a member without a link gets it in
                // the next one. Either is owed it until it confirms that
                // snapshot (`commits`). A joiner with no link is not.
                let covers = self.nodes[node]
                    .covers
                    .get(&m)
                    .copied()
                    .filter(|_| self.linked(node, m));
                let counted = self.nodes[node].view.contains(&m);
                match mqlb_broker_core::chain::delivery(log_seq, covers, counted) {
                    Delivery::Send => {
                        self.send_frame(node, m, &frame);
                        *left.entry(id).or_insert(0) += 1;
                    }
                    Delivery::Owed => owed.push(id),
                    Delivery::Skip => {}
                }
            }
        }
        owed.sort_unstable();
        owed.dedup();
        self.cov.owed_batches += u64::from(!owed.is_empty());
        if let Some(gate) = self.nodes[node]
            .waits
            .register(rep, log_seq, left, &owed, None, b.gate)
        {
            self.resolve(gate, GateState::Done);
        } else {
            if self.nodes[node].waits.len() > MAX_WAITS {
                self.bad.push(format!(
                    "unbounded: {} batches wait on {}",
                    self.nodes[node].waits.len(),
                    self.nodes[node].name
                ));
            }
        }
    }

    /// `Cluster::answer`: an answer to `to`'s frame goes on the link to it,
    /// or, while that link is still being dialled, waits for it (sent
    /// after its snapshot). `store`: on the store's stream.
    pub(super) fn answer(&mut self, from: usize, to: usize, frame: Frame, store: bool) {
        let dialling = self.opening.contains(&(from, to))
            && !self.links_down.contains(&(from.min(to), from.max(to)));
        if dialling {
            self.early
                .entry((from, to))
                .or_default()
                .push((store, frame));
        } else if store {
            self.send_store(from, to, &frame);
        } else {
            self.send_frame(from, to, &frame);
        }
    }

    fn send_frame(&mut self, from: usize, to: usize, frame: &Frame) {
        // No link: lost (owed to the peer, or released).
        let open = self.can_send(from, to);
        self.send_on(link_stream(from, to), from, to, frame, open);
    }

    /// Sends `frame` from `from` to `to` on FIFO `stream` (its digest
    /// counted either way), if the link is `open`; else it is lost.
    fn send_on(&mut self, s: u64, from: usize, to: usize, frame: &Frame, open: bool) {
        let mut bytes = BytesMut::new();
        if let Err(e) = frame.encode(&mut bytes) {
            self.bad.push(format!("frame not encoded: {e:?}"));
            return;
        }
        self.digest = mix(self.digest ^ hash_bytes(&bytes));
        if !open {
            return;
        }
        let d = self.net_delay(s);
        let (from_inc, to_inc) = (self.nodes[from].inc, self.nodes[to].inc);
        self.schedule(
            s,
            d,
            Ev::Frame {
                from,
                from_inc,
                to,
                to_inc,
                bytes,
            },
        );
    }

    fn frame(&mut self, from: usize, from_inc: u64, to: usize, to_inc: u64, mut bytes: BytesMut) {
        if !self.nodes[to].up || self.nodes[to].inc != to_inc {
            return; // the link died with the node
        }
        loop {
            let f = match Frame::decode(&mut bytes) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    self.bad.push(format!("frame not decoded: {e:?}"));
                    break;
                }
            };
            // A `Seen` frame waits for the frame after it (`links`). Raft's
            // and the state store's frames travel on streams of their own
            // here; on the broker's one link they cannot come between a
            // `Seen` frame and its copy (`LinkTx::push_all`), so they leave
            // it waiting.
            let own_stream = !matches!(
                f,
                Frame::Raft(_)
                    | Frame::StoreInvoke { .. }
                    | Frame::StoreCopy { .. }
                    | Frame::StoreAck { .. }
                    | Frame::StoreSynced { .. }
            );
            let stashed = if own_stream {
                let copy_of = match &f {
                    Frame::Replicate { client, .. } => Some(client.as_str()),
                    _ => None,
                };
                let now = self.instant();
                let n = &mut self.nodes[to];
                n.seen_stash
                    .get_mut(&from)
                    .and_then(|st| st.next_frame(copy_of, &mut n.seen, now))
            } else {
                None
            };
            match f {
                Frame::Replicate {
                    seq,
                    client,
                    epoch,
                    holder,
                    changes,
                } => {
                    // `links`: what it does here (`Replicas::arrive`).
                    let replaces = changes.first() == Some(&SessionChange::Ended);
                    let holder_at = self.index_of(&holder);
                    let arrival = Arrival::new(
                        seq,
                        epoch,
                        &changes,
                        self.nodes[from].name == holder,
                        holder_at.map(node_id),
                        || Relay {
                            holder_in_view: holder_at
                                .is_some_and(|h| self.nodes[to].view.contains(&h)),
                            view_known: self.nodes[to].view_number > 0,
                            serving: self.nodes[to].core.has_session(&client),
                        },
                    );
                    let now = self.instant();
                    let inc = self.nodes[to].inc;
                    let relayed_copy = seq == 0 && replaces && self.nodes[from].name != holder;
                    let before = self.nodes[to].replicas.held(&client);
                    let from_name = self.nodes[from].name.clone();
                    let n = &mut self.nodes[to];
                    let Arriving::Taken {
                        in_holders_snapshot,
                        relayed,
                        interest,
                    } = n.replicas.arrive(&client, &arrival, node_id(to), || now)
                    else {
                        if self.trace && relayed_copy {
                            println!(
                                "{:>10.3}ms {} drops {client}'s copy relayed by {from_name} (its own: {before:?})",
                                self.now as f64 / 1000.0,
                                n.name,
                            );
                        }
                        // Dropped, with the prints that came with it.
                        continue;
                    };
                    if self.trace && relayed_copy {
                        println!(
                            "{:>10.3}ms {} takes {client}'s copy relayed by {from_name} (its own: {before:?})",
                            self.now as f64 / 1000.0,
                            n.name,
                        );
                    }
                    if in_holders_snapshot {
                        if let Some(set) = n.snapshot_from.get_mut(&from) {
                            set.insert(client.clone());
                        }
                    }
                    if let Some((h, filters)) = interest {
                        for f in filters {
                            n.core.peer_interest(h, &f, true);
                        }
                    }
                    // `replication::replicate`: a session served here with
                    // a newer epoch adopts the stale writer's messages; one
                    // served here with an older epoch (or not connected)
                    // gives way to the copy.
                    let held = n.core.epoch(&client);
                    let connected = n.core.is_connected(&client);
                    // With a data directory, the copy's changes on disk
                    // before the answer (`answer_when`).
                    let mut kept = None;
                    let incoming = incoming(held, connected, epoch);
                    n.seen
                        .copy_arrived(&client, stashed, incoming, replaces, now);
                    match incoming {
                        Incoming::Adopt => {
                            // Its inbound QoS 2 ids too (`Core::adopt_qos2`).
                            let (_, qos2_gates) =
                                self.call(to, |core| ((), core.adopt_qos2(&client, &changes)));
                            let adopted: Vec<_> = changes
                                .into_iter()
                                .filter_map(|c| match c {
                                    SessionChange::Enqueued(p)
                                    | SessionChange::Sent { pending: p, .. } => Some(p),
                                    _ => None,
                                })
                                .collect();
                            if !adopted.is_empty() || !qos2_gates.is_empty() {
                                self.cov.adopted += adopted.len() as u64;
                                let (_, mut gates) =
                                    self.call(to, |core| ((), core.adopt(&client, adopted)));
                                gates.extend(qos2_gates);
                                let then = Then::Ack {
                                    node: to,
                                    inc,
                                    to: from,
                                    to_inc: from_inc,
                                    seq,
                                    forward: false,
                                };
                                self.join(gates, then);
                                continue;
                            }
                        }
                        Incoming::Apply { evict_first } => {
                            if evict_first {
                                self.call(to, |core| ((), core.evict_session(&client)));
                            }
                            kept = self.apply_copy(to, &client, epoch, changes);
                        }
                        // A copy of a session served here: refused, prints
                        // and all.
                        Incoming::Refuse => {}
                    }
                    if let Some(since) = relayed {
                        self.nodes[to].replicas.mark_relayed(&client, since);
                    }
                    if relayed.flatten().is_some() {
                        // `promote_owned` runs every tick in the broker:
                        // look again once the wait is over.
                        self.cov.relayed_copies += 1;
                        let wait = RELAYED_WAIT.as_micros() as Time + MS;
                        self.schedule_unordered(
                            VIEWS | 1,
                            wait,
                            Ev::PromoteCheck { node: to, inc },
                        );
                    }
                    if let Some(g) = kept {
                        let then = Then::Ack {
                            node: to,
                            inc,
                            to: from,
                            to_inc: from_inc,
                            seq,
                            forward: false,
                        };
                        self.join(vec![g], then);
                    } else if self.nodes[from].up && self.nodes[from].inc == from_inc {
                        self.answer(to, from, Frame::Ack { seq }, false);
                    }
                }
                Frame::Ack { seq } => {
                    let released = self.nodes[to].waits.acked(node_id(from), seq);
                    if self.nodes[to].resync_seq.get(&from) == Some(&seq) {
                        self.cov.owed_released_by_resync += released.len() as u64;
                    }
                    self.released(to, released, false);
                }
                Frame::SyncDone => {
                    self.nodes[to].synced.insert(from);
                    // (After the snapshot: an empty one, `serves_nothing`.)
                    let held = self.nodes[to]
                        .snapshot_from
                        .remove(&from)
                        .unwrap_or_default();
                    let now = self.instant();
                    let freed =
                        self.nodes[to]
                            .replicas
                            .holder_serves_only(node_id(from), &held, now);
                    self.cov.holders_forgotten += freed as u64;
                    // `links`: its word that it promoted comes again.
                    self.nodes[to].promotions.serves_nothing(node_id(from));
                }
                Frame::Interest { filter, gained } => {
                    let peer = u32::try_from(from).unwrap_or(u32::MAX);
                    self.nodes[to].core.peer_interest(peer, &filter, gained);
                    if gained {
                        self.interest_heard.insert((to, from));
                        self.maybe_start_publishing();
                    }
                }
                Frame::Seen { client, prints } => {
                    self.nodes[to]
                        .seen_stash
                        .entry(from)
                        .or_default()
                        .hold(client, prints);
                }
                Frame::Retained {
                    topic,
                    message,
                    version,
                } => {
                    let now = self.instant();
                    let wall = self.wall(to);
                    let core = &mut self.nodes[to].core;
                    core.advance(now);
                    core.calibrate_wall(now, wall);
                    core.set_retained_from_peer(&topic, message, version);
                }
                Frame::Reset => {
                    let peer = u32::try_from(from).unwrap_or(u32::MAX);
                    self.nodes[to].core.forget_peer(peer);
                    // A link snapshot begins. The broker forgets the peer's
                    // word that it promoted its copies when the peer's link
                    // comes up (`links`, before this frame): its snapshot
                    // says it again, after its interest.
                    self.nodes[to].promotions.relinked(node_id(from));
                    self.nodes[to]
                        .snapshot_from
                        .insert(from, Default::default());
                }
                Frame::Promoted { view } => self.nodes[to].promotions.heard(node_id(from), view),
                Frame::Forward {
                    seq,
                    message,
                    groups,
                    again,
                } => self.forwarded(from, from_inc, to, seq, message, groups, again),
                // `forward_refused`: not to the refuser again.
                Frame::Refused { seq } => match self.nodes[to].waits.refused(node_id(from), seq) {
                    Some(Released::Resend(m, groups, gate)) => {
                        self.cov.forwards_refused += 1;
                        self.hold(to, m, groups, vec![from], true, gate, false);
                    }
                    Some(Released::Committed(gate)) => self.resolve(gate, GateState::Done),
                    None => {}
                },
                Frame::Raft(m) if self.cfg.raft => self.raft_frame(from, to, &m),
                f @ (Frame::StoreInvoke { .. }
                | Frame::StoreCopy { .. }
                | Frame::StoreAck { .. }
                | Frame::StoreSynced { .. }) => self.store_frame(from, from_inc, to, f),
                other => self.bad.push(format!("unexpected frame {other:?}")),
            }
        }
    }

    /// A batch committed or failed: its held deliveries go, or their
    /// connections close (`effects::finish`).
    fn resolve(&mut self, gate: usize, state: GateState) {
        let g = &mut self.gates[gate];
        if g.state != GateState::Pending {
            return;
        }
        g.state = state;
        let held = std::mem::take(&mut g.held);
        if state == GateState::Done {
            g.flag.store(true, Ordering::Release);
        }
        for conn in held {
            if state == GateState::Failed {
                self.conns[conn].outbox.abort_held(Closing::NotCommitted);
            }
            self.dirty.insert(conn);
        }
        // Replies waiting on it: every connection of the node may have some.
        for conn in 0..self.conns.len() {
            if !self.conns[conn].waiting.is_empty() && self.conns[conn].state != ConnState::Closed {
                self.dirty.insert(conn);
            }
        }
        self.check_joins();
    }

    /// `seen_frame`: what `client`'s session was given lately, for a
    /// node about to get it whole.
    fn seen_frame(&self, node: usize, client: &str) -> Option<Frame> {
        self.nodes[node].seen.frame(client)
    }

    /// A peer's forwarded publish (`links`, `Frame::Forward`): refused
    /// unless this node serves; answered once its copies are committed.
    #[allow(clippy::too_many_arguments)]
    fn forwarded(
        &mut self,
        from: usize,
        from_inc: u64,
        to: usize,
        seq: u64,
        message: Message,
        groups: Vec<Arc<str>>,
        again: bool,
    ) {
        let decided = forwards::forwarded(self.serves(to), message.qos, again, || {
            self.nodes[to].view_number == 0 || self.nodes[to].view.contains(&from)
        });
        let again = match decided {
            Forwarded::Route { again } => again,
            Forwarded::Refuse => {
                self.answer(to, from, Frame::Refused { seq }, false);
                return;
            }
        };
        let (_, gates) = self.call(to, |core| {
            let fx = if again {
                core.route_again_from_peer(message, &groups)
            } else {
                core.route_from_peer(message, &groups)
            };
            ((), fx)
        });
        let then = Then::Ack {
            node: to,
            inc: self.nodes[to].inc,
            to: from,
            to_inc: from_inc,
            seq,
            forward: true,
        };
        self.join(gates, then);
    }

    /// Runs `then` once every one of `gates` is done (at once if none).
    fn join(&mut self, gates: Vec<usize>, then: Then) {
        self.joins.push((gates, then));
        self.check_joins();
    }

    fn check_joins(&mut self) {
        loop {
            let ready = self.joins.iter().position(|(gs, _)| {
                gs.iter()
                    .all(|g| self.gates[*g].state != GateState::Pending)
            });
            let Some(i) = ready else {
                return;
            };
            let (gs, then) = self.joins.swap_remove(i);
            let ok = gs.iter().all(|g| self.gates[*g].state == GateState::Done);
            match then {
                Then::Resolve(g) => {
                    let state = if ok {
                        GateState::Done
                    } else {
                        GateState::Failed
                    };
                    self.resolve(g, state);
                }
                Then::Ack {
                    node,
                    inc,
                    to,
                    to_inc,
                    seq,
                    forward,
                } => {
                    let alive = |w: &World, n: usize, i: u64| w.nodes[n].up && w.nodes[n].inc == i;
                    if !(alive(self, node, inc) && alive(self, to, to_inc)) {
                        continue;
                    }
                    if ok {
                        self.answer(node, to, Frame::Ack { seq }, false);
                    } else if forward {
                        self.cov.forwards_not_committed += 1;
                        self.answer(node, to, Frame::Refused { seq }, false);
                    }
                }
                Then::StoreAck {
                    node,
                    inc,
                    to,
                    to_inc,
                    seq,
                    ok: applied,
                } => {
                    let alive = |w: &World, n: usize, i: u64| w.nodes[n].up && w.nodes[n].inc == i;
                    if ok && alive(self, node, inc) && alive(self, to, to_inc) {
                        self.answer(node, to, Frame::StoreAck { seq, ok: applied }, true);
                    }
                }
                Then::StoreFinish(r) => self.store_finish(r),
            }
        }
    }

    /// `Cluster::on_tick` for `n`: owned copies promoted (and the word
    /// that they are), held publishes routed again once the takeover is
    /// done, lost peers' interest forgotten.
    fn node_tick(&mut self, n: usize) {
        if self.nodes[n].up && self.cfg.wills && self.nodes[n].core.pending_wills() > 0 {
            // `server`'s tick: the wills whose delay is over.
            let now = self.instant();
            self.call(n, |core| ((), core.publish_due_wills(now)));
        }
        if self.nodes[n].up {
            // `on_tick`: sessions that ended or went quiet leave their
            // logs behind (every tick here, every 50 in the broker: a log
            // older than `SEEN_FOR` goes a little sooner, never later).
            let now = self.instant();
            self.nodes[n].seen.prune(now);
            if !self.cfg.raft {
                // With Raft, it comes with the view loop (`raft_tick`).
                self.cluster_tick(n, false);
            }
            self.release_held(n);
            // The counts a metrics scrape reads agree with the sessions.
            if let Err(e) = self.nodes[n].core.check_counts() {
                let name = &self.nodes[n].name;
                self.bad.push(format!("{name}: {e}"));
            }
        }
        let done = self.now > self.cfg.fault_window + self.warmup()
            && self.settled_all()
            && self.clients.iter().all(|c| match &c.role {
                Role::Publisher(p) => p.done(),
                Role::Subscriber(_) => true,
            })
            && self
                .nodes
                .iter()
                .all(|n| !n.up || n.core.pending_wills() == 0);
        if !done {
            let s = node_tick_stream(n);
            self.schedule(s, TICK, Ev::NodeTick { node: n });
        }
    }

    /// `on_tick`'s departures on node `n` (the broker's own rule,
    /// `departures::at_tick`): waits for peers gone end (a member of the
    /// view without a link gets only its forwards back), and the interest
    /// of peers out of the view and not heard is forgotten once their
    /// sessions moved (`forget_moved_peers`). Most of it was done already
    /// when the link broke or the view changed; what a tick adds is the
    /// broker's own reading of the same facts.
    fn departures(&mut self, n: usize) {
        let peers: Vec<departures::Peer> = (0..self.nodes.len())
            .filter(|&p| p != n)
            .map(|p| departures::Peer {
                id: node_id(p),
                in_view: self.nodes[n].view.contains(&p),
                linked: self.linked(n, p),
                // Frames come on the peer's own link; one that said it is
                // leaving is not heard (`Peers::hears`).
                heard: self.linked(p, n) && !self.nodes[p].announced,
            })
            .collect();
        let d = departures::at_tick(self.nodes[n].view_number, peers);
        if !d.moved.is_empty() && self.takeover_done(n) {
            for &peer in &d.moved {
                self.nodes[n].core.forget_peer(peer);
            }
        }
        let released = self.nodes[n].waits.lost(&d.lost);
        self.released(n, released, true);
        for peer in d.unlinked_members {
            let released = self.nodes[n].waits.forwards_lost(peer);
            self.released(n, released, true);
        }
        self.store_waits_end(n, &d.store);
    }

    /// Every node up and taking clients (after a power loss at the end of
    /// a run, the publishers are done before the nodes are back: ticks go
    /// on until they are).
    fn settled_all(&self) -> bool {
        self.nodes.iter().all(|n| n.up && n.settled) && !self.faults_pending()
    }

    /// Whether a fault is still to come or under way (a restart, a heal, a
    /// hung node's resume): its node will need ticks again (found with a
    /// node that resumed from a hang after every tick had stopped, seed
    /// 15676 of the data-directory runs).
    fn faults_pending(&self) -> bool {
        self.hung.is_some_and(|(_, until)| until > self.now)
            || self
                .queue
                .values()
                .any(|e| matches!(e, Ev::Fault(_) | Ev::DiskFault(_)))
    }

    /// `takeover_done`: every view member reachable, and every one (this
    /// node too) has said it promoted its copies for this view.
    fn takeover_done(&self, n: usize) -> bool {
        let view = &self.nodes[n].view;
        let reachable = view.iter().all(|&m| m == n || self.linked(n, m));
        let owns_unpromoted = reachable && self.owns_unpromoted_copies(n);
        self.nodes[n].promotions.takeover_done(
            self.nodes[n].view_number,
            node_id(n),
            view.iter().map(|&m| node_id(m)),
            reachable,
            owns_unpromoted,
        )
    }

    /// `hold_for_takeover`'s wait, then `Core::reforward`.
    fn release_held(&mut self, n: usize) {
        let pending = self.nodes[n].held.take();
        let unsettled = self.nodes[n]
            .view
            .iter()
            .any(|&m| m != n && !self.linked(n, m));
        let pass = Release {
            now: self.instant(),
            settled: !unsettled && self.takeover_done(n),
            patience: mqlb_broker::cluster::TAKEOVER_WITHIN,
        };
        let view: Vec<u32> = self.nodes[n].view.iter().map(|&m| node_id(m)).collect();
        let kept = held::release(
            pending,
            pass,
            |m| view.contains(&m),
            |h| {
                let origin = h.message.origin.clone();
                match h.how {
                    HeldAs::New(how) => {
                        let (_, gates) =
                            self.call(n, |core| ((), core.route_deferred(h.message, how)));
                        self.join(gates, Then::Resolve(h.token));
                    }
                    HeldAs::Again { mut exclude, .. } => {
                        self.cov.reforwards += 1;
                        let alive: Vec<u32> = self.nodes[n]
                            .view
                            .iter()
                            .filter(|&&m| m != n && self.linked(n, m))
                            .map(|&m| node_id(m))
                            .collect();
                        exclude.extend(
                            (0..self.nodes.len())
                                .filter(|m| !self.nodes[n].view.contains(m))
                                .map(node_id),
                        );
                        if self.trace {
                            println!(
                            "{:>10.3}ms {} routes a held publish again: alive {alive:?}, exclude {exclude:?}",
                            self.now as f64 / 1000.0,
                            self.nodes[n].name
                        );
                        }
                        let (_, gates) = self.call(n, |core| {
                            ((), core.reforward(h.message, h.groups, &alive, &exclude))
                        });
                        self.join(gates, Then::Resolve(h.token));
                    }
                }
                // Held again by that routing: its publisher's later ones stay
                // behind it.
                self.nodes[n].held.holds_from(&origin)
            },
        );
        self.nodes[n].held.put_back(kept);
    }

    /// Whether `a` and `b` are linked (both up, the link not broken).
    fn linked(&self, a: usize, b: usize) -> bool {
        self.nodes[a].up && self.nodes[b].up && self.can_send(a, b)
    }

    /// Whether `from` has a link to `to` to send on: not broken, and not
    /// still being dialled (`opening`).
    pub(super) fn can_send(&self, from: usize, to: usize) -> bool {
        !self.links_down.contains(&(from.min(to), from.max(to)))
            && !self.opening.contains(&(from, to))
    }

    /// `Core::set_reachable` on every live node: the peers it links to
    /// that the view counts.
    fn update_reachable(&mut self) {
        for n in 0..self.nodes.len() {
            self.update_reachable_on(n);
        }
    }

    /// `Core::set_reachable` on node `n`: the peers it links to that its
    /// view counts.
    fn update_reachable_on(&mut self, n: usize) {
        if !self.nodes[n].up {
            return;
        }
        let peers: Vec<u32> = self.nodes[n]
            .view
            .iter()
            .filter(|&&m| m != n && self.linked(n, m))
            .filter_map(|&m| u32::try_from(m).ok())
            .collect();
        self.nodes[n].core.set_reachable(peers);
    }

    // ---- the cluster (view, promotion, re-chaining) ----------------------

    /// `promote`: the copy becomes the session here, in a new epoch.
    fn promote(&mut self, node: usize, client: &str) {
        let now = self.instant();
        let Some(session) = self.nodes[node].replicas.take(client) else {
            return;
        };
        self.copy_promoted(node, client, session.epoch);
        self.cov.wills_taken_over += u64::from(session.will.is_some());
        let mut snap = snapshot_of(&session, now);
        snap.epoch += 1;
        snap.changes = 0;
        self.cov.promotions += 1;
        // What the session was given lately, so a message routed again is
        // not given twice (`note_seen`).
        let seen = self.nodes[node].seen.prints(client);
        self.call(node, |core| {
            if core.has_session(client) {
                return ((), Effects::none());
            }
            let fx = core
                .import_session(client, snap)
                .unwrap_or_else(|_| Effects::none());
            core.note_seen(client, seen);
            ((), fx)
        });
    }

    /// A committed view, installed on every node at once (each acts on it
    /// at its own next tick, `cluster_tick`): as the broker installs a
    /// view (`Cluster::deliver`), the core's reachable peers follow it at
    /// once, and so do the publishes held for the copies it orphans.
    fn after_view(&mut self) {
        self.cov.view_changes += 1;
        self.view_number += 1;
        for n in 0..self.nodes.len() {
            self.install(n, self.view.clone(), self.view_number);
        }
    }

    /// `Cluster::deliver` on node `n`: a view committed, `number`, with
    /// `members`, installed if it is newer than the one it has; from that
    /// moment publishes for the copies it orphans here are held, and the
    /// core is told whom it reaches. A node stopping gracefully exits at
    /// its tick after a view without it (`Cluster::leave`).
    fn install(&mut self, n: usize, members: BTreeSet<usize>, number: u64) {
        if !self.nodes[n].up || number <= self.nodes[n].view_number {
            return;
        }
        let dropped_me = !members.contains(&n);
        self.nodes[n].view = members;
        self.nodes[n].view_number = number;
        self.update_reachable_on(n);
        self.hold_for_copies(n);
        // Promotions wait for the leader to confirm it is the newest.
        self.ask_current(n);
        if dropped_me && self.nodes[n].leaving {
            let inc = self.nodes[n].inc;
            self.schedule(
                stop_stream(n),
                raft::micros(mqlb_broker::cluster::consensus::TICK),
                Ev::StopExit { node: n, inc },
            );
        }
    }

    /// `Cluster::on_tick` on node `n`, after its view loop: the broker's
    /// own steps (`tick::Tick`), in its order, each carried out here as
    /// the broker does. `lost_quorum`: the view loop found that `n` no
    /// longer hears a majority.
    fn cluster_tick(&mut self, n: usize, lost_quorum: bool) {
        if !self.nodes[n].up {
            return;
        }
        let serving = self.serving(n);
        let facts = tick::Facts {
            view: self.nodes[n].view_number,
            counted: self.nodes[n].view.contains(&n),
            lost_quorum,
            leaving: self.nodes[n].leaving,
            serving,
        };
        let steps = self.nodes[n].tick.next(facts);
        for step in steps {
            match step {
                tick::Step::StepDown => self.step_down(n),
                tick::Step::ServesNothing => self.serves_nothing(n),
                tick::Step::NoteServing => {
                    if serving && self.nodes[n].stepped_down {
                        self.cov.quorum_regained += 1;
                        self.nodes[n].stepped_down = false;
                    }
                }
                tick::Step::ResendInterest => self.resend_interest(n),
                tick::Step::HandOver => self.hand_over(n),
                tick::Step::Promote => self.promote_owned(n),
                tick::Step::HoldForCopies => self.hold_for_copies(n),
                tick::Step::NoteSynced => {
                    if !self.nodes[n].settled && self.ready(n) {
                        self.nodes[n].settled = true;
                    }
                }
                tick::Step::SayPromoted => self.say_promoted(n),
                tick::Step::Departures => self.departures(n),
                tick::Step::Rechain => {
                    self.rechain(n);
                    if self.cfg.store {
                        self.store_rechain(n);
                    }
                }
            }
        }
        self.nodes[n].last_view = self.nodes[n].view.clone();
    }

    /// `Cluster::serving` on `n`: counted by the view, not leaving, and
    /// hearing a majority (itself included).
    fn serving(&self, n: usize) -> bool {
        let quorum = self.nodes.len() / 2 + 1;
        self.nodes[n].up
            && self.nodes[n].view.contains(&n)
            && !self.nodes[n].leaving
            && self.observed(n).len() >= quorum
    }

    /// `nodes_left` on `n`, after a view change: copies whose holder left
    /// (in the view its last tick acted on, not in this one) wait a
    /// little for fresher ones; the retained messages those holders wrote
    /// last go to every peer again (a peer whose link from them broke may
    /// lack them); the copies go whole to each session's new owner
    /// (`handover::orphans`).
    fn hand_over(&mut self, n: usize) {
        let left: Vec<usize> = self.nodes[n]
            .last_view
            .difference(&self.nodes[n].view)
            .copied()
            .collect();
        if left.is_empty() {
            return;
        }
        let ids: Vec<u32> = left.iter().map(|&g| node_id(g)).collect();
        let now = self.instant();
        self.nodes[n].replicas.holders_left(&ids, now);
        let stamps: Vec<u32> = left
            .iter()
            .map(|&g| u32::try_from(g + 1).unwrap_or(u32::MAX))
            .collect();
        let frames = handover::retained_written_by(&self.nodes[n].core, &stamps);
        for p in 0..self.nodes.len() {
            if p != n && self.linked(n, p) {
                for f in &frames {
                    self.send_frame(n, p, f);
                }
            }
        }
        let node = &self.nodes[n];
        let orphans = handover::orphans(
            &node.replicas,
            &node.seen,
            &ids,
            |client| self.owner_on(n, client).filter(|&o| o != n).map(node_id),
            |h| self.nodes.get(h as usize).map(|h| h.name.clone()),
            now,
        );
        for (owner, frames) in orphans {
            self.cov.orphans_handed += 1;
            for f in &frames {
                self.send_frame(n, owner as usize, f);
            }
        }
    }

    /// `rechain` on `n`, after a view change: each session whole down
    /// its chain, after what it was given (`send_to_chain`).
    fn rechain(&mut self, n: usize) {
        let now = self.instant();
        let node = &self.nodes[n];
        let rechain = handover::rechain(&node.core, &node.seen, now);
        for (client, seen) in &rechain.seen {
            for m in self.chain_on(n, client) {
                if m != n && self.linked(n, m) {
                    self.send_frame(n, m, seen);
                }
            }
        }
        self.cov.sessions_rechained += rechain
            .records
            .iter()
            .filter(|e| matches!(e, LogEntry::Session(r) if r.change == SessionChange::Ended))
            .count() as u64;
        self.sequence(n, rechain.records);
    }

    /// `resend_interest` on `n`, back in service: peers still hold the
    /// interest it had when it stepped down; each linked one is told to
    /// forget it and gets the current one. Interest entries numbered so
    /// far are in what is sent here: the log does not send them again.
    fn resend_interest(&mut self, n: usize) {
        self.cov.interest_resent += 1;
        self.nodes[n].interest_covers = self.nodes[n].log.last();
        let mut frames = vec![Frame::Reset];
        for filter in self.nodes[n].core.local_interest() {
            frames.push(Frame::Interest {
                filter,
                gained: true,
            });
        }
        for p in 0..self.nodes.len() {
            if p != n && self.linked(n, p) {
                for f in &frames {
                    self.send_frame(n, p, f);
                }
            }
        }
    }

    /// `promote_owned`: the copies `n` owns whose holder the view does not
    /// count, once `n` is ready and each copy may be promoted.
    fn promote_owned(&mut self, n: usize) {
        if !self.ready(n) {
            return;
        }
        let now = self.instant();
        let owned = self.nodes[n].replicas.to_promote(
            now,
            |c| self.owner_on(n, c) == Some(n),
            |h| self.holder_live(n, h),
        );
        if owned.is_empty() || !self.view_is_current(n) {
            return;
        }
        for c in owned {
            self.promote(n, &c);
        }
    }

    /// `Cluster::view_is_current` on `n`: with Raft, whether the leader
    /// has confirmed that the view `n` holds is the newest (asked again if
    /// not, for the next tick); the oracle's view always is.
    fn view_is_current(&mut self, n: usize) -> bool {
        let Some(raft) = self.nodes[n].raft.as_ref() else {
            return true;
        };
        if raft.consensus.current() {
            return true;
        }
        if self.trace {
            println!(
                "{:>10.3}ms {} waits for its view #{} to be confirmed current",
                self.now as f64 / 1000.0,
                self.nodes[n].name,
                self.nodes[n].view_number
            );
        }
        self.ask_current(n);
        false
    }

    /// `Cluster::ask_current` on `n`.
    fn ask_current(&mut self, n: usize) {
        if let Some(raft) = self.nodes[n].raft.as_mut() {
            let out = raft.consensus.ask_current();
            self.raft_deliver(n, out);
        }
    }

    /// `on_tick`'s `Promoted` word on `n`: every copy it owns in this view
    /// is a session now (not while a relayed one still waits:
    /// `owns_settling_copies`), once it is ready.
    fn say_promoted(&mut self, n: usize) {
        if !self.ready(n) || !self.nodes[n].settled {
            return;
        }
        let v = self.nodes[n].view_number;
        if v > self.nodes[n].promotions.mine()
            && !self.owns_settling_copies(n)
            && !self.owns_unpromoted_copies(n)
            && self.nodes[n].promotions.promoted(v)
        {
            self.cov.promoted_words += 1;
            // `State::commit` returns once the caller's batch is handed on
            // (with every batch numbered before it): the promotions' interest
            // is on each link ahead of this word.
            self.append(n);
            for p in 0..self.nodes.len() {
                if p != n && self.nodes[p].up {
                    self.send_frame(n, p, &Frame::Promoted { view: v });
                }
            }
        }
    }

    /// `owns_unpromoted_copies`: a copy `n` owns whose holder the view no
    /// longer counts, not yet promoted.
    fn owns_unpromoted_copies(&self, n: usize) -> bool {
        !self.unpromoted_copies(n).is_empty()
    }

    fn unpromoted_copies(&self, n: usize) -> Vec<String> {
        self.nodes[n].replicas.orphans_owned(
            |c| self.owner_on(n, c) == Some(n),
            |h| h as usize != n && self.nodes[n].view.contains(&(h as usize)),
        )
    }

    /// `copies_to_hold` on `n`: the orphans it owns, and those another
    /// member owns that has not said it promoted its copies for the view.
    fn copies_to_hold(&self, n: usize) -> Vec<String> {
        let node = &self.nodes[n];
        self.nodes[n].replicas.orphans_owned(
            |c| match self.owner_on(n, c) {
                Some(o) if o != n => !node.promotions.said(node_id(o), node.view_number),
                _ => true,
            },
            |h| h as usize != n && node.view.contains(&(h as usize)),
        )
    }

    /// `on_tick`: publishes matching copies whose takeover is not done are
    /// held (`unpromoted_filters`, `Core::hold_for_copies`).
    fn hold_for_copies(&mut self, n: usize) {
        let copies = self.copies_to_hold(n);
        let mut filters: Vec<String> = copies
            .iter()
            .flat_map(|c| self.nodes[n].replicas.filters(c))
            .collect();
        filters.sort();
        filters.dedup();
        if filters != self.nodes[n].held_for_copies {
            if self.trace {
                println!(
                    "{:>10.3}ms {} holds publishes for copies {copies:?} ({filters:?})",
                    self.now as f64 / 1000.0,
                    self.nodes[n].name
                );
            }
            self.cov.held_for_copies += u64::from(!filters.is_empty());
            self.nodes[n].core.hold_for_copies(&filters);
            self.nodes[n].held_for_copies = filters;
        }
    }

    /// `owns_settling_copies`.
    fn owns_settling_copies(&self, n: usize) -> bool {
        self.nodes[n].replicas.owns_settling(
            self.instant(),
            |c| self.owner_on(n, c) == Some(n),
            |h| self.holder_live(n, h),
        )
    }

    /// The links to `g` are gone (it died): what waited for its answer
    /// waits no more (`release_waits`): a chain wait counts it lost, a
    /// forward is held for the takeover.
    fn links_lost(&mut self, g: usize) {
        for n in 0..self.nodes.len() {
            if n != g {
                self.link_lost(n, g);
            }
        }
    }

    /// `n`'s link to `g` is gone.
    fn link_lost(&mut self, n: usize, g: usize) {
        self.store_link_lost(n, g);
        self.nodes[n].resync_seq.remove(&g);
        // (`links::read_link`: a stashed `Seen` frame is noted.)
        let now = self.instant();
        let node = &mut self.nodes[n];
        if let Some(mut st) = node.seen_stash.remove(&g) {
            st.flush(&mut node.seen, now);
        }
        // `links::link_down`: a node outside the view, which `g` streamed
        // to without waiting for it, may miss what `g` committed meanwhile.
        if self.nodes[n].view_number == 0 || !self.nodes[n].view.contains(&n) {
            self.cov.copies_cut_off += 1;
            self.nodes[n].replicas.unlinked_from(node_id(g));
        }
        {
            // `replication::unlinked`: a member of the view is owed what it
            // missed; one the view dropped is waited for no more. Either
            // way the publishes forwarded to it come back.
            let released = if self.nodes[n].view.contains(&g) {
                self.nodes[n].waits.unlinked(node_id(g))
            } else {
                self.nodes[n].waits.lost(&[node_id(g)])
            };
            self.released(n, released, true);
        }
    }

    /// Acts on what node `n`'s commits released (`Cluster::act_on`): a
    /// waiter told it is committed (`by_loss`: because a member left), a
    /// forward whose peer was lost held for the takeover and sent again
    /// (that peer not excluded: it may never have had it, and
    /// `first_had` tells it apart).
    fn released(&mut self, n: usize, released: Vec<Released<usize>>, by_loss: bool) {
        for r in released {
            match r {
                Released::Committed(gate) => {
                    self.cov.commits_by_loss += u64::from(by_loss);
                    self.resolve(gate, GateState::Done);
                }
                Released::Resend(m, groups, gate) => {
                    self.hold(n, m, groups, Vec::new(), false, gate, false);
                }
            }
        }
    }

    /// `Cluster::ready`: in the view, with the snapshot of every live
    /// member (the failure detector's dead ones excepted).
    fn ready(&self, n: usize) -> bool {
        // (`serving_in_view`: a committed view, not the one a process
        // starts with.)
        self.serves(n)
            && self.nodes[n].view_number > 0
            && self.nodes[n]
                .view
                .iter()
                .all(|&p| p == n || !self.nodes[p].up || self.nodes[n].synced.contains(&p))
    }

    /// A link opens: `from` sends `to` the sessions it holds and the copies
    /// it keeps whose chain (with `to` in the view) holds `to`, then
    /// `SyncDone` (`links`, the link snapshot).
    fn link_open(&mut self, from: usize, from_inc: u64, to: usize, to_inc: u64) {
        if !self.nodes[from].up
            || self.nodes[from].inc != from_inc
            || !self.nodes[to].up
            || self.nodes[to].inc != to_inc
        {
            return;
        }
        self.opening.remove(&(from, to));
        let mut members: Vec<usize> = self.nodes[from].view.iter().copied().collect();
        if !members.contains(&to) {
            members.push(to);
        }
        let r = self.cfg.replication;
        let now = self.instant();
        // A link opens with a reset of what the peer knew of this node,
        // then its interest (`links`: whether it serves or not; a node
        // that does not serve has no sessions, so none).
        let mut frames = vec![Frame::Reset];
        for filter in self.nodes[from].core.local_interest() {
            frames.push(Frame::Interest {
                filter,
                gained: true,
            });
        }
        // Every retained message, deletions included.
        for (topic, message, version) in self.nodes[from].core.retained_all() {
            frames.push(Frame::Retained {
                topic,
                message,
                version,
            });
        }
        // This node's own sessions go acknowledged: once `to` has them
        // all, what it was owed up to here is confirmed (`commits`); then
        // the copies it keeps, `SyncDone` and its `Promoted` word: the
        // broker's own `opening::sessions`.
        let last = self.nodes[from].log.last();
        let seq = self.nodes[from].next_rep;
        self.nodes[from].next_rep += 1;
        let name_of = |h: u32| self.nodes.get(h as usize).map(|n| n.name.clone());
        let seen = |client: &str| self.seen_frame(from, client);
        let in_chain = |client: &str| {
            self.rank_over(client, &members)
                .into_iter()
                .take(r)
                .any(|m| m == to)
        };
        let opening = Opening {
            me: &self.nodes[from].name,
            seq,
            now,
            in_chain: &in_chain,
            name_of: &name_of,
            seen: &seen,
            promoted: self.nodes[from].promotions.mine(),
        };
        let own = opening::sessions(
            &self.nodes[from].core,
            &self.nodes[from].replicas,
            &opening,
            &mut |f| frames.push(f),
        );
        self.cov.link_snapshots += 1;
        for f in &frames {
            self.send_frame(from, to, f);
        }
        if self.cfg.store {
            self.store_link_open(from, to);
        }
        for (store, f) in self.early.remove(&(from, to)).unwrap_or_default() {
            if store {
                self.send_store(from, to, &f);
            } else {
                self.send_frame(from, to, &f);
            }
        }
        self.nodes[from].covers.insert(to, last);
        self.nodes[from].resync_seq.insert(to, seq);
        let released = self.nodes[from]
            .waits
            .expect_resync(seq, node_id(to), own, last);
        self.cov.owed_released_by_resync += released.len() as u64;
        self.released(from, released, false);
        self.update_reachable();
    }

    // ---- faults ----------------------------------------------------------

    fn fault(&mut self, f: Fault) {
        match f {
            Fault::Crash(n) => {
                let down = self.nodes.iter().any(|n| !n.up || n.leaving)
                    || self.partitioned.is_some()
                    || self.link_cut_elsewhere();
                let recent = self.now < self.last_join + 1_500 * MS && self.last_join > 0;
                if down || recent || !self.nodes[n].up {
                    self.cov.crashes_skipped += 1;
                    return;
                }
                if self.spared_as_sole_holder(n) {
                    return;
                }
                self.crash(n);
            }
            Fault::Stop(n) => {
                let down = self.nodes.iter().any(|n| !n.up || n.leaving)
                    || self.partitioned.is_some()
                    || self.link_cut_elsewhere();
                let recent = self.now < self.last_join + 1_500 * MS && self.last_join > 0;
                if down || recent || !self.nodes[n].up || self.nodes[n].stepped_down {
                    self.cov.crashes_skipped += 1;
                    return;
                }
                self.stop(n);
            }
            Fault::Restart(n) => {
                if self.nodes[n].up {
                    return;
                }
                self.nodes[n].up = true;
                self.cov.restarts += 1;
                if !self.cfg.raft {
                    // The oracle's view is every node's at once.
                    self.nodes[n].view = self.view.clone();
                    self.nodes[n].view_number = self.view_number;
                }
                self.recover(n);
                // Links open both ways; each side sends its snapshot.
                for p in 0..self.nodes.len() {
                    if p == n || !self.nodes[p].up {
                        continue;
                    }
                    for (a, b) in [(p, n), (n, p)] {
                        self.opening.insert((a, b));
                        let s = link_stream(a, b);
                        let d = within(draw(self.seed, s, 1 << 20), MS, 30 * MS);
                        let (from_inc, to_inc) = (self.nodes[a].inc, self.nodes[b].inc);
                        self.schedule(
                            s,
                            d,
                            Ev::LinkOpen {
                                from: a,
                                from_inc,
                                to: b,
                                to_inc,
                            },
                        );
                    }
                }
                if self.cfg.raft {
                    // The leader adds it once a majority observes it.
                    self.start_raft_ticks(n);
                    return;
                }
                let d = within(
                    draw(self.seed, VIEWS, self.cov.restarts),
                    100 * MS,
                    500 * MS,
                );
                let inc = self.nodes[n].inc;
                self.schedule(
                    VIEWS,
                    d,
                    Ev::View {
                        node: n,
                        join: true,
                        inc,
                    },
                );
            }
            Fault::Drop(c) => {
                let Some(conn) = self.clients[c].conn else {
                    return;
                };
                self.cov.client_drops += 1;
                self.send_up(conn, Up::Gone);
                self.client_lost(c);
            }
            Fault::Stall(n, d) => {
                self.cov.stalls += 1;
                self.nodes[n].stalled_until = self.now + d;
            }
            Fault::ClockStep(ms) => {
                // The total stays within 25 s of true time, inside the
                // cluster's 60 s drift allowance (see docs/simulation.md
                // for what a larger step back does to a restarted node).
                self.cov.clock_steps += 1;
                self.wall_offset_ms = (self.wall_offset_ms + ms).clamp(-25_000, 25_000);
            }
            Fault::NodeClockStep(n, ms) => {
                // One node's clock alone (a bad NTP source), kept within
                // 10 s of the others.
                self.cov.node_clock_steps += 1;
                if let Some(s) = self.skew_ms.get_mut(n) {
                    *s = (*s + ms).clamp(-10_000, 10_000);
                }
            }
            Fault::Slow(d) => {
                self.cov.slow_periods += 1;
                self.slow_until = self.now + d;
            }
            Fault::LinkDrop(a, b, d) => {
                let pair = (a.min(b), a.max(b));
                // `Config::links_count_as_failures`: one failure at a time
                // counts a broken link too: not while another node is down
                // or back less than 1.5 s (the two nodes left would each
                // be alone, no majority anywhere).
                let second = self.cfg.links_count_as_failures
                    && (self.nodes.iter().any(|n| !n.up)
                        || self.now < self.last_join + 1_500 * MS && self.last_join > 0);
                if a == b
                    || !self.nodes[a].up
                    || !self.nodes[b].up
                    || self.links_down.contains(&pair)
                    || self.partitioned.is_some()
                    || second
                {
                    return;
                }
                self.cov.link_drops += 1;
                self.cut_link(a, b);
                self.update_reachable();
                self.schedule_unordered(FAULTS | 3, d, Ev::Fault(Fault::LinkBack(a, b)));
            }
            Fault::LinkBack(a, b) => {
                // (A partition around either node heals on its own.)
                if self.partitioned.is_some_and(|p| p == a || p == b) {
                    return;
                }
                self.link_back(a, b);
            }
            Fault::Partition(n, d) => {
                if !self.may_cut_off(n) {
                    return;
                }
                self.cov.partitions += 1;
                self.cov.leader_partitions += u64::from(self.is_raft_leader(n));
                let (holds, mid_qos2) = self.interrupted(n);
                self.cov.partitions_of_holder += u64::from(holds);
                self.cov.partitions_mid_qos2 += u64::from(mid_qos2);
                self.partitioned = Some(n);
                self.cut_off(n);
                let inc = self.nodes[n].inc;
                // It hears no majority within a tick or two (its links
                // closed) and steps down; the majority's view drops it as a
                // crashed node's; the partition heals `d` after that.
                let k = self.cov.partitions;
                let notice = within(draw(self.seed, VIEWS, 3_000 + k), 20 * MS, 2 * TICK);
                let leave = within(draw(self.seed, VIEWS, 4_000 + k), 300 * MS, 1_500 * MS);
                if !self.cfg.raft {
                    // (With Raft, it steps down at its tick and the view
                    // drops it when the leader proposes so.)
                    self.schedule(VIEWS, notice, Ev::StepDown { node: n, inc });
                    self.oracle_leave(n, inc, leave);
                }
                self.schedule_unordered(FAULTS | 5, leave + d, Ev::Fault(Fault::Heal(n)));
            }
            Fault::Hang(n, d) => {
                if !self.may_cut_off(n) {
                    return;
                }
                self.cov.hangs += 1;
                self.cov.leader_hangs += u64::from(self.is_raft_leader(n));
                let (holds, _) = self.interrupted(n);
                self.cov.hangs_of_holder += u64::from(holds);
                // One failure at a time: nothing else fails until it is
                // back in the view.
                self.partitioned = Some(n);
                self.hung = Some((n, self.now + d));
                self.schedule_unordered(
                    FAULTS | 8,
                    FAILURE_TIMEOUT_SIM,
                    Ev::Fault(Fault::HangCut(n)),
                );
                let back = within(
                    draw(self.seed, FAULTS | 8, self.cov.hangs),
                    10 * MS,
                    500 * MS,
                );
                self.schedule_unordered(FAULTS | 5, d + back, Ev::Fault(Fault::Heal(n)));
            }
            Fault::HangCut(n) => {
                if self
                    .hung
                    .is_none_or(|(h, until)| h != n || until <= self.now)
                {
                    return;
                }
                self.cut_off(n);
            }
            Fault::Heal(n) => {
                for p in 0..self.nodes.len() {
                    if p != n {
                        self.link_back(n, p);
                    }
                }
                if self.cfg.raft {
                    return;
                }
                let d = within(
                    draw(self.seed, VIEWS, 5_000 + self.cov.partitions),
                    100 * MS,
                    500 * MS,
                );
                let inc = self.nodes[n].inc;
                self.schedule(
                    VIEWS,
                    d,
                    Ev::View {
                        node: n,
                        join: true,
                        inc,
                    },
                );
            }
        }
    }

    /// Whether `n` may be cut off from the others now (a partition, a
    /// hang): one failure at a time, nothing else down or cut off, none
    /// rejoined in the last 1.5 s, `n` in the view and not the sole holder
    /// of a state store key's last value. Counted as skipped if not.
    fn may_cut_off(&mut self, n: usize) -> bool {
        // A node stopping gracefully counts as down, as for a crash: until
        // it has gone and the others' ticks have re-chained its sessions'
        // copies, some have one copy left (found once each node re-chains
        // at its own tick: a hang 2 ms after the view dropped a leaving
        // node took the only copy with it).
        let down = self.nodes.iter().any(|n| !n.up || n.leaving) || self.link_cut_elsewhere();
        let recent = self.now < self.last_join + 1_500 * MS && self.last_join > 0;
        if down || recent || self.partitioned.is_some() || !self.view.contains(&n) {
            self.cov.crashes_skipped += 1;
            return false;
        }
        !self.spared_as_sole_holder(n)
    }

    /// With `Config::links_count_as_failures`, whether a cluster link
    /// between two live nodes is broken: a crash, hang or
    /// partition now would be a second failure (see `Fault::LinkDrop`).
    fn link_cut_elsewhere(&self) -> bool {
        self.cfg.links_count_as_failures
            && self.partitioned.is_none()
            && !self.links_down.is_empty()
    }

    /// Every link of `n` that is up breaks.
    fn cut_off(&mut self, n: usize) {
        for p in 0..self.nodes.len() {
            if p != n && !self.links_down.contains(&(n.min(p), n.max(p))) {
                self.cut_link(n, p);
            }
        }
        self.update_reachable();
    }

    /// The link between `a` and `b` breaks both ways: what was on it is
    /// lost.
    fn cut_link(&mut self, a: usize, b: usize) {
        self.links_down.insert((a.min(b), a.max(b)));
        self.early.remove(&(a, b));
        self.early.remove(&(b, a));
        self.queue.retain(|_, ev| {
            !matches!(ev, Ev::Frame { from, to, .. } | Ev::LinkOpen { from, to, .. }
                if (*from, *to) == (a, b) || (*from, *to) == (b, a))
        });
        for (x, y) in [(a, b), (b, a)] {
            self.link_lost(x, y);
            self.nodes[x].covers.remove(&y);
        }
    }

    /// The link between `a` and `b` is dialled again: each side sends its
    /// snapshot.
    fn link_back(&mut self, a: usize, b: usize) {
        self.links_down.remove(&(a.min(b), a.max(b)));
        for (x, y) in [(a, b), (b, a)] {
            if self.nodes[x].up && self.nodes[y].up {
                self.opening.insert((x, y));
                let s = link_stream(x, y);
                let d = within(draw(self.seed, s, 1 << 21), MS, 10 * MS);
                let (from_inc, to_inc) = (self.nodes[x].inc, self.nodes[y].inc);
                self.schedule(
                    s,
                    d,
                    Ev::LinkOpen {
                        from: x,
                        from_inc,
                        to: y,
                        to_inc,
                    },
                );
            }
        }
    }

    /// Whether `n` serves sessions, and whether one is in the middle of a
    /// QoS 2 exchange (for the coverage report).
    fn interrupted(&self, n: usize) -> (bool, bool) {
        let mut mid_qos2 = false;
        let mut holds = false;
        for c in &self.clients {
            let Some(snap) = self.nodes[n].core.export_session(&c.id) else {
                continue;
            };
            holds = true;
            mid_qos2 |= snap.inflight.iter().any(|(s, _)| {
                matches!(s, InflightState::AwaitPubrec | InflightState::AwaitPubcomp)
            }) || !snap.qos2_in.is_empty();
        }
        (holds, mid_qos2)
    }

    /// `Cluster::step_down`: `n` lost its majority. Its sessions become
    /// copies (the majority's newer epochs win when it heals), its clients
    /// are closed, and it serves nothing until the view counts it again.
    fn step_down(&mut self, n: usize) {
        if self.nodes[n].stepped_down {
            return;
        }
        self.cov.step_downs += 1;
        self.nodes[n].stepped_down = true;
        self.nodes[n].settled = false;
        // `step_down`: it promotes its copies again before it says so.
        self.nodes[n].promotions.stepped_down();
        // Back in service it must hear again every peer whose link broke
        // (`synced_once`: a snapshot on each live link; links that stayed
        // up keep theirs).
        let down: Vec<usize> = (0..self.nodes.len())
            .filter(|&p| !self.linked(p, n))
            .collect();
        for p in down {
            self.nodes[n].synced.remove(&p);
        }
        let now = self.instant();
        let mut ids = self.nodes[n].core.persistent_sessions();
        ids.sort();
        for id in ids {
            let Some(snap) = self.nodes[n].core.export_session(&id) else {
                continue;
            };
            let epoch = snap.epoch;
            // On disk as well, before the eviction is (numbered first).
            let _ = self.apply_copy(n, &id, epoch, whole(snap, now));
            self.call(n, |core| ((), core.evict_session_shutting_down(&id)));
        }
        let conns: Vec<usize> = self.nodes[n].conns.values().copied().collect();
        for conn in conns {
            self.close(conn, true);
        }
    }

    /// `serves_nothing`: after a step down for a lost majority, peers
    /// still linked hear that `n` serves nothing now (a `SyncDone` after
    /// the link's snapshot). Not on a graceful stop, whose copies are
    /// promoted once the view drops it.
    fn serves_nothing(&mut self, n: usize) {
        for p in 0..self.nodes.len() {
            if p != n && self.linked(n, p) {
                self.send_frame(n, p, &Frame::SyncDone);
            }
        }
    }

    /// Whether `n` serves clients and peers' publishes: up, in the view,
    /// and not stepped down.
    fn serves(&self, n: usize) -> bool {
        self.nodes[n].up
            && self.nodes[n].view.contains(&n)
            && !self.nodes[n].stepped_down
            && !self.nodes[n].leaving
    }

    /// Without Raft, the oracle drops `n` (incarnation `inc`) from the
    /// view `after` from now.
    fn oracle_leave(&mut self, n: usize, inc: u64, after: Time) {
        self.schedule(
            VIEWS,
            after,
            Ev::View {
                node: n,
                join: false,
                inc,
            },
        );
    }

    /// Whether a crash or partition of `n` is spared: it alone holds a
    /// state store key's last acknowledged value (`store_sole_holder`).
    fn spared_as_sole_holder(&mut self, n: usize) -> bool {
        let spared = self.cfg.store && self.store_sole_holder(n);
        if spared {
            self.cov.crashes_skipped += 1;
            self.cov.store_sole_holder_spared += 1;
        }
        spared
    }

    /// `Cluster::leave` on a SIGTERM: the node hands Raft leadership to a
    /// peer it observes, stops serving (forwards are refused, clients
    /// refused), closes its clients; `stop_settle` goes on.
    fn stop(&mut self, n: usize) {
        self.cov.graceful_stops += 1;
        let heir = (0..self.nodes.len())
            .find(|&p| p != n && self.linked(n, p))
            .map(|h| self.nodes[h].name.clone());
        if let (Some(h), Some(raft)) = (heir, self.nodes[n].raft.as_mut()) {
            let out = raft.consensus.hand_over(&h);
            self.raft_deliver(n, out);
        }
        self.nodes[n].leaving = true;
        let conns: Vec<usize> = self.nodes[n].conns.values().copied().collect();
        for conn in conns {
            self.close(conn, true);
        }
        let (inc, since) = (self.nodes[n].inc, self.now);
        self.settle_later(n, inc, since);
    }

    /// `stop_settle` again in 10 ms (`settle` polls).
    fn settle_later(&mut self, n: usize, inc: u64, since: Time) {
        let ev = Ev::StopSettle {
            node: n,
            inc,
            since,
        };
        self.schedule(stop_stream(n), 10 * MS, ev);
    }

    /// `Cluster::settle`, then the rest of `leave`: once every chain
    /// change it sent is acknowledged (at most 2 s), the node steps down
    /// (its sessions become copies; no `SyncDone`) and says it is leaving.
    fn stop_settle(&mut self, n: usize, inc: u64, since: Time) {
        if !self.nodes[n].up || self.nodes[n].inc != inc {
            return;
        }
        if !self.nodes[n].waits.is_empty() && self.now < since + 2 * SECOND {
            self.settle_later(n, inc, since);
            return;
        }
        self.step_down(n);
        self.nodes[n].announced = true;
    }

    fn crash(&mut self, n: usize) {
        self.cov.crashes += 1;
        self.crashed_at.push((n, self.now));
        self.cov.leader_crashes += u64::from(self.is_raft_leader(n));
        // What the crash interrupts, for the coverage report.
        let (holds, mid_qos2) = self.interrupted(n);
        self.cov.crashes_of_holder += u64::from(holds);
        self.cov.crashes_mid_qos2 += u64::from(mid_qos2);
        self.cov.crashes_uncommitted +=
            u64::from(!self.nodes[n].waits.is_empty() || !self.nodes[n].log.is_empty());
        let node = &mut self.nodes[n];
        node.up = false;
        node.inc += 1;
        node.leaving = false;
        node.announced = false;
        node.core = new_core(n);
        node.replicas = Replicas::default();
        node.log = Sequencer::default();
        node.waits = Commits::default();
        node.covers.clear();
        node.synced.clear();
        node.held.clear();
        node.promotions = Promotions::new();
        node.held_for_copies.clear();
        node.seen = Seen::default();
        node.seen_stash.clear();
        node.snapshot_from.clear();
        node.store = StoreNode::new(&node.name);
        node.settled = false;
        // A new process. With a data directory it starts from the view it
        // had (the broker restores its last committed view: `Cluster::bind`);
        // without one it has acted on no view yet.
        if self.cfg.disk {
            node.tick = tick::Tick::new(node.tick.view(), node.last_view.contains(&n));
        } else {
            node.tick = tick::Tick::new(0, false);
            node.last_view.clear();
            node.view = BTreeSet::from([n]);
            node.view_number = 0;
        }
        node.interest_covers = 0;
        node.disk.process_died();
        let conns: Vec<usize> = std::mem::take(&mut node.conns).into_values().collect();
        if self.cfg.raft {
            // Back from its data directory's state (`Config::disk`), else
            // blank: the leader catches it up.
            let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
            let seed = self.raft_seed(n, self.nodes[n].inc);
            let keeper = self.raft_keeper(n);
            self.nodes[n].raft = Some(RaftNode::new(n, &names, seed, keeper));
        }
        for other in &mut self.nodes {
            other.covers.remove(&n);
            other.synced.remove(&n);
        }
        for conn in conns {
            self.conns[conn].state = ConnState::Closed;
            // The client sees the reset quickly.
            self.send_down(conn, Down::Closed);
        }
        // What it sent that is still on its way reaches its peers before
        // they see its links drop: the broker's link reader applies what is
        // buffered on a link before it reads the link's end
        // (`links::read_link`), so a dead holder's last changes are never
        // applied after its link was found lost. (Found by seed 45614: they
        // came after a relayed copy that already had them had replaced the
        // copy cut off from the holder, and were applied twice.)
        self.deliver_in_flight_from(n);
        // Its peers see its links drop (a broken link of it is moot now).
        self.links_down.retain(|&(a, b)| a != n && b != n);
        self.early.retain(|&(a, b), _| a != n && b != n);
        self.links_lost(n);
        self.update_reachable();
        let leave = within(
            draw(self.seed, VIEWS, 1_000 + self.cov.crashes),
            300 * MS,
            1_500 * MS,
        );
        let inc = self.nodes[n].inc;
        if !self.cfg.raft {
            self.oracle_leave(n, inc, leave);
        }
        let back = leave
            + within(
                draw(self.seed, FAULTS, 2_000 + self.cov.crashes),
                100 * MS,
                2_000 * MS,
            );
        self.schedule_unordered(FAULTS | 1, back, Ev::Fault(Fault::Restart(n)));
    }

    /// Delivers now, in the order they were due, the frames dead node `n`
    /// had sent that are still on their way.
    fn deliver_in_flight_from(&mut self, n: usize) {
        let keys: Vec<(Time, u64, u64)> = self
            .queue
            .iter()
            .filter(|(_, ev)| matches!(ev, Ev::Frame { from, .. } if *from == n))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            if let Some(ev) = self.queue.remove(&k) {
                self.cov.frames_drained_at_crash += 1;
                self.handle(ev);
            }
        }
    }

    // ---- invariants ------------------------------------------------------

    /// At most one node serves a client at a time.
    ///
    /// A node the cluster's view has dropped counts only once it has
    /// installed that view and its own tick has acted on it (each node
    /// learns a view from its own Raft member and steps down at its own
    /// tick, as the broker's do): until then a hung node's client, which
    /// reconnected elsewhere, still looks connected to it.
    fn check_holders(&mut self) {
        let acted = |n: usize| {
            let node = &self.nodes[n];
            self.view.contains(&n)
                || (node.view_number >= self.view_number && node.tick.view() == node.view_number)
        };
        for c in &self.clients {
            let serving: Vec<&str> = (0..self.nodes.len())
                .filter(|&n| acted(n))
                .map(|n| &self.nodes[n])
                .filter(|n| n.up && n.core.is_connected(&c.id))
                .map(|n| n.name.as_str())
                .collect();
            if serving.len() > 1 {
                let line = format!("{} is served by {} at once", c.id, serving.join(" and "));
                if !self.bad.contains(&line) {
                    self.bad.push(line);
                }
            }
        }
    }

    /// Every publisher's last will whose scheduling was committed reached
    /// every subscriber (at least once), whichever nodes died meanwhile.
    fn check_last_wills(&mut self) {
        for c in &self.clients {
            if let Role::Subscriber(s) = &c.role {
                self.cov.wills_delivered += s.wills.values().map(|n| u64::from(*n)).sum::<u64>();
            }
        }
        for (&client, w) in &self.last_wills {
            // Promised: the batch that scheduled it committed, or the node
            // that saw the publisher go lived on long enough for anything
            // it made then to reach its chain.
            let committed = !w.gates.is_empty()
                && w.gates
                    .iter()
                    .all(|&g| self.gates[g].state == GateState::Done);
            let lived = !self
                .crashed_at
                .iter()
                .any(|&(n, t)| n == w.node && t >= w.at && t < w.at + WILL_SETTLED);
            if !committed && !lived {
                continue;
            }
            self.cov.last_wills_promised += 1;
            let Role::Publisher(p) = &self.clients[client].role else {
                continue;
            };
            for c in &self.clients {
                let Role::Subscriber(s) = &c.role else {
                    continue;
                };
                if !s.wills.contains_key(&(p.index, w.conn as u64)) {
                    self.bad.push(format!(
                        "{}: {}'s last will (connection {}) was promised and never delivered",
                        c.id, self.clients[client].id, w.conn
                    ));
                }
            }
        }
    }

    /// Every publisher finished, and every subscriber was given every
    /// message acknowledged to a publisher.
    fn final_checks(&mut self) {
        if self.cfg.store {
            self.check_store();
        }
        if self.trace {
            for (i, n) in self.nodes.iter().enumerate() {
                println!(
                    "end: {} up={} view={:?} v#={} installed={:?} #{} promotions={:?} held={} ready={} synced={:?} waits={}",
                    n.name,
                    n.up,
                    self.view,
                    self.view_number,
                    n.view,
                    n.view_number,
                    n.promotions,
                    n.held.len(),
                    self.ready(i),
                    n.synced,
                    n.waits.len()
                );
            }
        }
        self.check_last_wills();
        let mut acked: Vec<(usize, u32)> = Vec::new();
        for c in &self.clients {
            match &c.role {
                Role::Publisher(p) => {
                    self.cov.publisher_resends += p.resent;
                    if !p.done() {
                        self.bad.push(format!(
                            "{}: {} of {} messages finished when the run ended at {:?} (stuck)",
                            c.id,
                            p.finished,
                            self.cfg.messages,
                            Duration::from_micros(self.now)
                        ));
                    }
                    acked.extend(p.acked.iter().map(|no| (p.index, *no)));
                }
                Role::Subscriber(_) => {}
            }
        }
        for c in &self.clients {
            let Role::Subscriber(s) = &c.role else {
                continue;
            };
            self.cov.qos1_again += s.qos1_again;
            self.cov.qos2_resends_absorbed += s.qos2_resends;
            self.cov.sessions_lost += s.sessions_lost;
            let lost: Vec<String> = acked
                .iter()
                .filter(|m| !s.got.contains_key(m))
                .map(|(p, n)| format!("{p}:{n}"))
                .collect();
            if !lost.is_empty() {
                let shown: Vec<&str> = lost.iter().take(8).map(String::as_str).collect();
                self.bad.push(format!(
                    "{}: {} acknowledged messages never delivered ({})",
                    c.id,
                    lost.len(),
                    shown.join(", ")
                ));
            }
        }
        // Retained messages converge: every live node has the same set.
        let mut stores = self.nodes.iter().filter(|n| n.up).map(|n| {
            let mut all: Vec<(String, Option<Bytes>, String)> = n
                .core
                .retained_all()
                .into_iter()
                .map(|(t, m, v)| (t, m.map(|m| m.payload), format!("{v:?}")))
                .collect();
            all.sort();
            (n.name.clone(), all)
        });
        if let Some((first, reference)) = stores.next() {
            self.cov.retained_topics += reference.len() as u64;
            for (name, other) in stores {
                if other != reference {
                    self.bad.push(format!(
                        "retained messages differ: {first} has {reference:?}, {name} has {other:?}"
                    ));
                }
            }
        }
        self.digest = mix(self.digest ^ self.events);
    }
}
