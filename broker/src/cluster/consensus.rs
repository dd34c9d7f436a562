//! The committed view: who is a member, who is live, and the view number,
//! kept in a replicated log so that every node computes placement over the
//! same view.
//!
//! # Why raft-rs
//! Chain replication is only safe when every node agrees on the chain, which
//! needs a configuration master; writing one is how clusters lose data, so
//! this uses TiKV's `raft` crate (raft-rs), which runs in production under
//! TiKV and etcd's design. It is a sans-IO core: the node ticks it, steps
//! it with peers' messages and takes back a `Ready` of messages to send and
//! entries to apply, which fits the cluster's one-way peer links (a message
//! is a [`Frame::Raft`](super::wire::Frame::Raft) on the sender's outbound
//! link) without an RPC layer. openraft was the other candidate; its
//! request/response network and storage traits would have needed both.
//!
//! # What is replicated
//! Only the view: the member list (with cluster addresses), the live set and
//! its number. Session data flows down the chains, never through this log.
//! The leader proposes the live set it observes (peers whose links are up
//! and heard within the failure timeout); a proposal commits on a majority,
//! so a minority side cannot change the view. Members join and leave by
//! configuration changes (an admin call on any node is forwarded to the
//! leader's log by proposal).
//!
//! # Where the state lives
//! The log is kept in memory and compacted into the view every
//! [`COMPACT_EVERY`] entries. With a state directory (`state_dir`,
//! `--state-dir`) every change to the hard state (term, vote, commit), the
//! log or the applied view is written to a file there (written whole to a
//! temporary file, synced, then renamed) before the messages that depend on
//! it leave, as Raft requires; a restarted node reads it back and remembers
//! its vote and what it acknowledged. Without one, a node that restarts
//! comes back empty and is caught up by the leader (log or snapshot); its
//! vote in the term it died in is forgotten, so a restart within one
//! election (about [`ELECTION_TICKS`] ticks) of a vote could in theory let
//! it vote twice in that term. Pre-vote and check-quorum are on, which
//! narrows this further.

use mqlb_config::broker::PeerAddr;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
};
use raft::storage::MemStorage;
use raft::{Config, GetEntriesContext, RaftState, RawNode, StateRole, Storage};

use super::lock;

/// Ticks between elections (a tick is [`TICK`]): a leader not heard from for
/// 1–2 s is replaced.
pub const ELECTION_TICKS: usize = 10;
/// How often the node is ticked.
pub const TICK: Duration = Duration::from_millis(100);
/// Entries kept before the log is compacted into a snapshot of the view.
pub const COMPACT_EVERY: u64 = 256;
/// A proposal not committed within this is made again.
const PROPOSE_AGAIN: Duration = Duration::from_secs(1);

/// The Raft ID of a node name: a hash, so that every node derives the same
/// IDs from the names alone.
pub fn raft_id(name: &str) -> u64 {
    mqlb_placement::node_hash(name, b"raft").max(1)
}

/// What the log has committed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Committed {
    /// Bumped at every change of `live`; 0 before anything is committed.
    pub number: u64,
    /// Live members, sorted.
    pub live: Vec<String>,
    /// Every member and its cluster address, sorted by name.
    pub members: BTreeMap<String, PeerAddr>,
}

impl Committed {
    fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u64(self.number);
        put_names(&mut b, self.live.iter().map(String::as_str));
        b.put_u32(self.members.len() as u32);
        for (name, addr) in &self.members {
            put_name(&mut b, name);
            put_name(&mut b, &addr.to_string());
        }
        b.freeze()
    }

    fn decode(mut b: Bytes) -> Option<Committed> {
        if b.remaining() < 8 {
            return None;
        }
        let number = b.get_u64();
        let live = get_names(&mut b)?;
        if b.remaining() < 4 {
            return None;
        }
        let n = b.get_u32() as usize;
        let mut members = BTreeMap::new();
        for _ in 0..n {
            let name = get_name(&mut b)?;
            let addr = get_name(&mut b)?.parse().ok()?;
            members.insert(name, addr);
        }
        Some(Committed {
            number,
            live,
            members,
        })
    }

    /// Applies one command; whether the live set changed.
    fn apply(&mut self, command: Command) -> bool {
        let live = match command {
            Command::Live(mut live) => {
                live.retain(|n| self.members.contains_key(n));
                live.sort();
                live.dedup();
                live
            }
            Command::Join(name, addr) => {
                self.members.insert(name, addr);
                return false;
            }
            Command::Leave(name) => {
                self.members.remove(&name);
                self.live.iter().filter(|n| **n != name).cloned().collect()
            }
        };
        if live == self.live && self.number > 0 {
            return false;
        }
        self.live = live;
        self.number += 1;
        true
    }
}

fn put_name(b: &mut BytesMut, s: &str) {
    let s = s.as_bytes();
    let s = s.get(..usize::from(u16::MAX)).unwrap_or(s);
    b.put_u16(s.len() as u16);
    b.put_slice(s);
}

fn get_name(b: &mut Bytes) -> Option<String> {
    if b.remaining() < 2 {
        return None;
    }
    let n = b.get_u16() as usize;
    if b.remaining() < n {
        return None;
    }
    String::from_utf8(b.split_to(n).to_vec()).ok()
}

fn put_names<'a>(b: &mut BytesMut, names: impl ExactSizeIterator<Item = &'a str>) {
    b.put_u32(names.len() as u32);
    for n in names {
        put_name(b, n);
    }
}

fn get_names(b: &mut Bytes) -> Option<Vec<String>> {
    if b.remaining() < 4 {
        return None;
    }
    let n = b.get_u32() as usize;
    // Each name takes at least 2 bytes: a bogus count fails before
    // anything is allocated for it.
    if b.remaining() < n.saturating_mul(2) {
        return None;
    }
    (0..n).map(|_| get_name(b)).collect()
}

/// One change to the view, as a log entry carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// These members are live (the leader's observation).
    Live(Vec<String>),
    /// A member joins (with a configuration change adding its Raft ID).
    Join(String, PeerAddr),
    /// A member leaves (with a configuration change removing it).
    Leave(String),
}

impl Command {
    fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        match self {
            Command::Live(live) => {
                b.put_u8(0);
                put_names(&mut b, live.iter().map(String::as_str));
            }
            Command::Join(name, addr) => {
                b.put_u8(1);
                put_name(&mut b, name);
                put_name(&mut b, &addr.to_string());
            }
            Command::Leave(name) => {
                b.put_u8(2);
                put_name(&mut b, name);
            }
        }
        b.freeze()
    }

    fn decode(mut b: Bytes) -> Option<Command> {
        if !b.has_remaining() {
            return None;
        }
        Some(match b.get_u8() {
            0 => Command::Live(get_names(&mut b)?),
            1 => Command::Join(get_name(&mut b)?, get_name(&mut b)?.parse().ok()?),
            2 => Command::Leave(get_name(&mut b)?),
            _ => return None,
        })
    }
}

/// The view as of the last applied entry, which is what a snapshot sends.
#[derive(Debug, Default)]
struct Applied {
    index: u64,
    term: u64,
    view: Committed,
}

/// The in-memory log plus snapshots that carry the applied view (raft-rs's
/// `MemStorage` makes snapshots without data).
struct ViewStorage {
    mem: MemStorage,
    applied: Arc<Mutex<Applied>>,
}

impl Storage for ViewStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }
    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }
    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }
    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }
    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let a = lock(&self.applied);
        let mut s = Snapshot::default();
        s.set_data(a.view.encode());
        let m = s.mut_metadata();
        m.index = a.index;
        m.term = a.term;
        m.set_conf_state(self.mem.initial_state()?.conf_state);
        Ok(s)
    }
}

/// What the node must do after driving the log.
#[derive(Debug, Default)]
pub struct Output {
    /// Messages for peers, by name.
    pub messages: Vec<(String, Bytes)>,
    /// The committed view, when it changed.
    pub view: Option<Committed>,
}

/// Where a member keeps its Raft state between incarnations: its data
/// directory's state file in the broker ([`StateFile`]); the simulator
/// keeps it in memory that a crash leaves alone, so whole-cluster
/// restarts run there on the same code.
pub trait StateKeeper: Send {
    /// What was last saved (`None`: nothing ever was).
    fn load(&self) -> Result<Option<Vec<u8>>, String>;
    /// Saves `bytes` durably: returns once they would survive a power
    /// loss. Nothing that depends on them is sent before.
    fn save(&self, bytes: &[u8]) -> Result<(), String>;
    /// Where it is kept, for messages.
    fn name(&self) -> String {
        "the raft state".into()
    }
}

/// The state file in a data directory, written whole to a temporary file
/// that is synced, renamed over it, and the directory synced.
#[derive(Debug, Clone)]
pub struct StateFile(pub std::path::PathBuf);

impl StateKeeper for StateFile {
    fn load(&self) -> Result<Option<Vec<u8>>, String> {
        match std::fs::read(&self.0) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", self.0.display())),
        }
    }

    fn save(&self, bytes: &[u8]) -> Result<(), String> {
        let path = &self.0;
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            // The rename itself survives a power loss only once the
            // directory is synced.
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| format!("{}: {e}", path.display()))
    }

    fn name(&self) -> String {
        self.0.display().to_string()
    }
}

/// Reads a saved state: `None` if there is none, an error if it is there
/// and cannot be trusted (a checksum that fails, contents that do not
/// decode). A file from before checksums (no magic) is read as it is and
/// rewritten with one at the next change.
fn read_state(keeper: &dyn StateKeeper) -> Result<Option<Persisted>, String> {
    let Some(bytes) = keeper.load()? else {
        return Ok(None);
    };
    let at = |why: &str| format!("{}: {why}", keeper.name());
    let payload = if bytes.starts_with(mqlb_storage::record::SNAPSHOT_MAGIC) {
        mqlb_storage::record::decode_snapshot(&bytes)
            .map_err(at)?
            .1
            .to_vec()
    } else {
        bytes
    };
    Persisted::decode(Bytes::from(payload))
        .map(Some)
        .ok_or_else(|| at("not a raft state"))
}

/// This node's member of the Raft group.
pub struct Consensus {
    node: RawNode<ViewStorage>,
    applied: Arc<Mutex<Applied>>,
    /// Last live set proposed, and when.
    proposed: Option<(Vec<String>, Instant)>,
    /// Names by Raft ID, for addressing messages (members past and
    /// present, so that a leaving member still gets the entry removing it).
    names: BTreeMap<u64, String>,
    /// A member joined: compact at once, so the newcomer (which starts
    /// blank, without the founding configuration) is caught up by a
    /// snapshot rather than a log it could not interpret.
    compact_now: bool,
    /// Where the state is persisted, if anywhere.
    keeper: Option<Box<dyn StateKeeper>>,
    /// Why persisting the state failed, once it has: from then on this
    /// node sends nothing (a vote or acknowledgement it could not keep
    /// would break Raft's rules), and the node stops.
    failed: Option<String>,
    /// Every random choice: the election timeouts (see
    /// [`Consensus::own_timeout`]). Seeded by whoever makes the node, so a
    /// run can be replayed.
    rng: fastrand::Rng,
    /// The (term, role) and election timeout this node last drew one for.
    timeout: ((u64, StateRole), usize),
    /// Ticks so far: how old an ask is ([`Consensus::current`]).
    ticks: u64,
    /// The newest answer: the tick its ask was made at, and the index the
    /// leader had committed when a majority confirmed its leadership.
    confirmed: Option<(u64, u64)>,
}

/// What a state file holds.
struct Persisted {
    hard: raft::prelude::HardState,
    conf: ConfState,
    index: u64,
    term: u64,
    view: Committed,
    entries: Vec<Entry>,
}

const STATE_MAGIC: &[u8] = b"mqlb-raft-1\n";

impl Persisted {
    fn encode(&self) -> Result<Vec<u8>, String> {
        let mut b = BytesMut::new();
        b.put_slice(STATE_MAGIC);
        b.put_u64(self.hard.term);
        b.put_u64(self.hard.vote);
        b.put_u64(self.hard.commit);
        for ids in [&self.conf.voters, &self.conf.learners] {
            b.put_u32(u32::try_from(ids.len()).map_err(|e| e.to_string())?);
            for id in ids {
                b.put_u64(*id);
            }
        }
        b.put_u64(self.index);
        b.put_u64(self.term);
        let view = self.view.encode();
        b.put_u32(u32::try_from(view.len()).map_err(|e| e.to_string())?);
        b.put_slice(&view);
        b.put_u32(u32::try_from(self.entries.len()).map_err(|e| e.to_string())?);
        for e in &self.entries {
            let bytes = e.write_to_bytes().map_err(|e| e.to_string())?;
            b.put_u32(u32::try_from(bytes.len()).map_err(|e| e.to_string())?);
            b.put_slice(&bytes);
        }
        Ok(b.to_vec())
    }

    fn decode(mut b: Bytes) -> Option<Persisted> {
        if !b.starts_with(STATE_MAGIC) {
            return None;
        }
        b.advance(STATE_MAGIC.len());
        let u64_of = |b: &mut Bytes| (b.remaining() >= 8).then(|| b.get_u64());
        let u32_of = |b: &mut Bytes| (b.remaining() >= 4).then(|| b.get_u32() as usize);
        let hard = raft::prelude::HardState {
            term: u64_of(&mut b)?,
            vote: u64_of(&mut b)?,
            commit: u64_of(&mut b)?,
            ..Default::default()
        };
        let mut lists = Vec::new();
        for _ in 0..2 {
            let n = u32_of(&mut b)?;
            if b.remaining() < n.saturating_mul(8) {
                return None;
            }
            lists.push((0..n).map(|_| b.get_u64()).collect::<Vec<u64>>());
        }
        let learners = lists.pop()?;
        let voters = lists.pop()?;
        let index = u64_of(&mut b)?;
        let term = u64_of(&mut b)?;
        let n = u32_of(&mut b)?;
        if b.remaining() < n {
            return None;
        }
        let view = Committed::decode(b.split_to(n))?;
        let count = u32_of(&mut b)?;
        let mut entries = Vec::new();
        for _ in 0..count {
            let n = u32_of(&mut b)?;
            if b.remaining() < n {
                return None;
            }
            entries.push(Entry::parse_from_bytes(&b.split_to(n)).ok()?);
        }
        Some(Persisted {
            hard,
            conf: ConfState::from((voters, learners)),
            index,
            term,
            view,
            entries,
        })
    }
}

impl std::fmt::Debug for Consensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consensus")
            .field("view", &lock(&self.applied).view)
            .finish_non_exhaustive()
    }
}

impl Consensus {
    /// A member of a group whose initial members are `members` (every node
    /// configured alike starts from the same state). A node joining a
    /// running cluster (not among `members`) starts empty and is caught up
    /// by the leader.
    #[cfg(test)]
    pub fn new(me: &str, members: &[(String, PeerAddr)]) -> raft::Result<Consensus> {
        Self::with_state(me, members, None, raft_id(me))
    }

    /// As `Consensus::new` (tests only), persisting to `state_file` (and starting from
    /// it, when it holds a state), drawing its election timeouts from a
    /// generator seeded with `seed`.
    pub fn with_state(
        me: &str,
        members: &[(String, PeerAddr)],
        state_file: Option<&std::path::Path>,
        seed: u64,
    ) -> raft::Result<Consensus> {
        let keeper =
            state_file.map(|p| Box::new(StateFile(p.to_path_buf())) as Box<dyn StateKeeper>);
        Self::with_keeper(me, members, keeper, seed)
    }

    /// [`Consensus::with_state`], its state kept by `keeper`.
    pub fn with_keeper(
        me: &str,
        members: &[(String, PeerAddr)],
        keeper: Option<Box<dyn StateKeeper>>,
        seed: u64,
    ) -> raft::Result<Consensus> {
        let founding = members.iter().any(|(n, _)| n == me);
        let saved = match &keeper {
            Some(k) => read_state(k.as_ref()).map_err(|e| {
                raft::Error::Store(raft::StorageError::Other(
                    format!("{e}; start with --repair to set it aside (the node is then caught up by the leader, but may vote again in the term it last voted in)").into(),
                ))
            })?,
            None => None,
        };
        let (mem, applied_index) = match &saved {
            Some(s) => {
                let mem = if s.index == 0 {
                    MemStorage::new_with_conf_state(s.conf.clone())
                } else {
                    let mem = MemStorage::new();
                    let mut snap = Snapshot::default();
                    snap.set_data(s.view.encode());
                    snap.mut_metadata().index = s.index;
                    snap.mut_metadata().term = s.term;
                    snap.mut_metadata().set_conf_state(s.conf.clone());
                    mem.wl().apply_snapshot(snap)?;
                    mem
                };
                mem.wl().append(&s.entries)?;
                mem.wl().set_hardstate(s.hard.clone());
                tracing::info!(
                    term = s.hard.term,
                    index = s.index,
                    entries = s.entries.len(),
                    view = s.view.number,
                    "raft state restored"
                );
                (mem, s.index)
            }
            None if founding => {
                let voters: Vec<u64> = members.iter().map(|(n, _)| raft_id(n)).collect();
                (
                    MemStorage::new_with_conf_state(ConfState::from((voters, Vec::new()))),
                    0,
                )
            }
            None => (MemStorage::new(), 0),
        };
        let view = match saved {
            Some(s) => Applied {
                index: s.index,
                term: s.term,
                view: s.view,
            },
            None if founding => Applied {
                index: 0,
                term: 0,
                view: Committed {
                    number: 0,
                    live: Vec::new(),
                    members: members.iter().cloned().collect(),
                },
            },
            None => Applied::default(),
        };
        let known: Vec<String> = view.view.members.keys().cloned().collect();
        let applied = Arc::new(Mutex::new(view));
        let config = Config {
            applied: applied_index,
            id: raft_id(me),
            election_tick: ELECTION_TICKS,
            // The range own_timeout draws from (raft-rs's default, spelt
            // out because set_randomized_election_timeout asserts it).
            min_election_tick: ELECTION_TICKS,
            max_election_tick: 2 * ELECTION_TICKS,
            heartbeat_tick: 2,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Config::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node = RawNode::new(
            &config,
            ViewStorage {
                mem,
                applied: applied.clone(),
            },
            &logger,
        )?;
        let names = members
            .iter()
            .map(|(n, _)| n.clone())
            .chain(known)
            .chain(std::iter::once(me.to_string()))
            .map(|n| (raft_id(&n), n))
            .collect();
        let mut c = Consensus {
            node,
            applied,
            proposed: None,
            names,
            compact_now: false,
            keeper,
            failed: None,
            rng: fastrand::Rng::with_seed(seed),
            timeout: ((u64::MAX, StateRole::Follower), 0),
            ticks: 0,
            confirmed: None,
        };
        c.own_timeout();
        Ok(c)
    }

    /// raft-rs draws a new election timeout from `rand::thread_rng()`
    /// whenever it resets (a new term or role), which no seed reaches.
    /// After every call into it, a reset is noticed (the term or role
    /// changed, or the timeout is not the one drawn here) and replaced by
    /// one drawn from this node's own seeded generator, before any tick
    /// counts against it: the timeouts that decide elections are then a
    /// function of the seed.
    fn own_timeout(&mut self) {
        let raft = &mut self.node.raft;
        let key = (raft.term, raft.state);
        if key == self.timeout.0 && raft.randomized_election_timeout() == self.timeout.1 {
            return;
        }
        let t = self.rng.usize(ELECTION_TICKS..2 * ELECTION_TICKS);
        raft.set_randomized_election_timeout(t);
        self.timeout = (key, raft.randomized_election_timeout());
    }

    /// Sets a state file that cannot be read aside (`--repair`), so the
    /// node starts blank; returns where it went, if it did.
    pub fn repair_state_file(path: &std::path::Path) -> Option<std::path::PathBuf> {
        let why = read_state(&StateFile(path.to_path_buf())).err()?;
        let mut aside = path.as_os_str().to_owned();
        aside.push(".corrupt");
        let aside = std::path::PathBuf::from(aside);
        match std::fs::rename(path, &aside) {
            Ok(()) => {
                tracing::warn!(why, moved_to = %aside.display(), "repair: the raft state was unreadable; set aside, starting blank");
                Some(aside)
            }
            Err(e) => {
                tracing::warn!(why, error = %e, "repair: could not set the raft state aside");
                None
            }
        }
    }

    /// Why the state could not be persisted, once it could not: the node
    /// must stop taking part.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// [`Consensus::persist`]; a failure poisons the node (see `failed`).
    fn persist_or_fail(&mut self) -> bool {
        if self.failed.is_some() {
            return false;
        }
        match self.persist() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "raft state not persisted: this node stops taking part (it could not keep what it would promise)");
                self.failed = Some(e);
                false
            }
        }
    }

    /// Writes the hard state, the applied view and the entries after it
    /// to the state file (whole, to a temporary file that is synced and
    /// renamed over it, the directory synced after the rename).
    fn persist(&self) -> Result<(), String> {
        let Some(keeper) = &self.keeper else {
            return Ok(());
        };
        let store = &self.node.store().mem;
        let (index, term, view) = {
            let a = lock(&self.applied);
            (a.index, a.term, a.view.clone())
        };
        let state = store
            .initial_state()
            .map_err(|e| format!("raft state not read for persisting: {e}"))?;
        let last = store.last_index().unwrap_or(index);
        let entries = if last > index {
            store
                .entries(index + 1, last + 1, None, GetEntriesContext::empty(false))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let saved = Persisted {
            hard: state.hard_state,
            conf: state.conf_state,
            index,
            term,
            view,
            entries,
        };
        let bytes = saved.encode()?;
        // Checksummed, as the data directory's snapshots are: a flipped
        // bit is found, never trusted (a wrong term or vote would break
        // Raft's rules).
        keeper.save(&mqlb_storage::record::encode_snapshot(0, &bytes))
    }

    /// Whether its state is kept durably (a data directory): a step or a
    /// tick may then wait for an fsync.
    pub fn persists(&self) -> bool {
        self.keeper.is_some()
    }

    /// The committed view.
    pub fn view(&self) -> Committed {
        lock(&self.applied).view.clone()
    }

    /// Members in the committed configuration.
    pub fn member_count(&self) -> usize {
        lock(&self.applied).view.members.len()
    }

    /// The leader's name, if this node knows one.
    pub fn leader(&self) -> Option<String> {
        self.names.get(&self.node.raft.leader_id).cloned()
    }

    /// Whether this node leads.
    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// On the leader: hands leadership to `name` (a graceful stop), so the
    /// rest of the cluster need not wait out an election before the view
    /// can drop this node.
    pub fn hand_over(&mut self, name: &str) -> Output {
        if !self.is_leader() {
            return Output::default();
        }
        self.node.transfer_leader(raft_id(name));
        self.ready()
    }

    /// The leader is dead (a majority no longer hears it): starts an
    /// election now instead of waiting out the election timeout, so the
    /// view that drops the dead leader, and with it the moves of its
    /// sessions, come about 1–2 s sooner. Raft's safety does not depend on
    /// when a node campaigns; this skips pre-vote and the leader lease the
    /// way a leadership transfer does, which is why the cluster calls it
    /// only on one survivor and only once a majority has stopped hearing
    /// the leader.
    pub fn campaign_now(&mut self) -> Output {
        let raft = &self.node.raft;
        if self.is_leader() || raft.leader_id == raft::INVALID_ID {
            return Output::default();
        }
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgTimeoutNow);
        m.from = raft.leader_id;
        m.to = raft.id;
        m.term = raft.term;
        tracing::info!(term = raft.term, "the leader is lost: campaigning now");
        if let Err(e) = self.node.step(m) {
            tracing::debug!(error = %e, "campaign refused");
        }
        self.ready()
    }

    /// The current Raft term.
    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    /// Advances time by one [`TICK`].
    pub fn tick(&mut self) -> Output {
        self.ticks += 1;
        self.node.tick();
        self.ready()
    }

    /// Asks the leader how far the log is committed, confirmed by a
    /// heartbeat round to a majority (Raft's ReadIndex): once this node has
    /// applied that far, the view it holds was the newest one when the
    /// majority answered ([`Consensus::current`]). A node that cannot reach
    /// the leader, or has none yet, gets no answer.
    ///
    /// The ask carries this node's Raft ID and the tick it is made at: the
    /// leader keys pending asks by that context, so two nodes' asks never
    /// collide, and an answer that comes after a later ask still counts
    /// for the tick its own ask was made at.
    pub fn ask_current(&mut self) -> Output {
        let mut ctx = Vec::with_capacity(16);
        ctx.extend_from_slice(&self.node.raft.id.to_be_bytes());
        ctx.extend_from_slice(&self.ticks.to_be_bytes());
        self.node.read_index(ctx);
        self.ready()
    }

    /// Whether the view this node holds is known to be the newest: an ask
    /// made at this tick or the one before was answered, and this node has
    /// applied the log as far as the answer said it was committed. A node
    /// acting on a view that is not (restarted from its data directory
    /// before the leader caught it up, or cut off from the leader while it
    /// still hears a majority) would take over sessions that a node of a
    /// newer view serves (found by the simulator, once each node learned
    /// views from its own Raft member).
    pub fn current(&self) -> bool {
        self.confirmed
            .is_some_and(|(at, index)| at + 1 >= self.ticks && lock(&self.applied).index >= index)
    }

    /// Takes a message from the peer named `from` (the link says who it is).
    pub fn step(&mut self, from: &str, message: &[u8]) -> Output {
        let mut amnesia = None;
        match Message::parse_from_bytes(message) {
            Ok(mut m) => {
                if m.from != raft_id(from) {
                    tracing::warn!(from, "raft message under another node's ID: ignored");
                    return Output::default();
                }
                // A node that joined blank learns its peers' names here.
                self.names.entry(m.from).or_insert_with(|| from.to_string());
                // A node that restarted blank is still "matched" at its old
                // index in the leader's progress, so heartbeats carry a
                // commit index beyond its (empty) log, which raft-rs treats
                // as a broken invariant, and the leader sends it nothing
                // more while the view is quiet. Committing less than the
                // leader says is always safe, and a snapshot request makes
                // the leader send the view.
                let last = self.node.raft.raft_log.last_index();
                if m.get_msg_type() == MessageType::MsgHeartbeat && m.commit > last {
                    m.commit = last;
                    amnesia = Some((m.from, m.term));
                }
                // A message from a node that is not a member is ignored by
                // raft-rs itself; only its name is needed for replies.
                if let Err(e) = self.node.step(m) {
                    tracing::debug!(error = %e, "raft message refused");
                }
            }
            Err(e) => tracing::warn!(error = %e, "undecodable raft message from a peer"),
        }
        let mut out = self.ready();
        if let Some((leader, term)) = amnesia {
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgAppendResponse);
            m.from = self.node.raft.id;
            m.to = leader;
            m.term = term;
            m.reject = true;
            // Past anything the leader holds as matched, so that raft-rs
            // does not take the rejection for a stale one.
            m.index = u64::MAX;
            m.request_snapshot = 1;
            self.send(vec![m], &mut out);
        }
        out
    }

    /// On the leader: proposes `observed` as the live set when it differs
    /// from the committed one (and was not proposed within
    /// `PROPOSE_AGAIN` before `now`).
    pub fn propose_live(&mut self, observed: &[String], now: Instant) -> Output {
        if !self.is_leader() {
            return Output::default();
        }
        let mut observed = observed.to_vec();
        observed.sort();
        let view = self.view();
        observed.retain(|n| view.members.contains_key(n));
        if observed == view.live && view.number > 0 {
            self.proposed = None;
            return Output::default();
        }
        if let Some((p, at)) = &self.proposed {
            if *p == observed && now.duration_since(*at) < PROPOSE_AGAIN {
                return Output::default();
            }
        }
        let progress: Vec<String> = self
            .node
            .raft
            .prs()
            .iter()
            .map(|(id, pr)| {
                let name = self.names.get(id).map_or("?", String::as_str);
                format!("{name}:{:?}@{}", pr.state, pr.matched)
            })
            .collect();
        tracing::debug!(live = ?observed, ?progress, "proposing a view");
        if let Err(e) = self.node.propose(
            Vec::new(),
            Command::Live(observed.clone()).encode().to_vec(),
        ) {
            tracing::warn!(error = %e, "view proposal refused");
        }
        self.proposed = Some((observed, now));
        self.ready()
    }

    /// Proposes adding or removing a member; a follower forwards it to the
    /// leader. Errors say why not.
    pub fn propose_membership(&mut self, command: Command) -> Result<Output, String> {
        if self.leader().is_none() {
            return Err("no leader yet (is a majority up?)".to_string());
        }
        let view = self.view();
        let (change, name) = match &command {
            Command::Join(name, _) => {
                if view.members.contains_key(name) {
                    return Err(format!("{name} is already a member"));
                }
                (ConfChangeType::AddNode, name)
            }
            Command::Leave(name) => {
                if !view.members.contains_key(name) {
                    return Err(format!("{name} is not a member"));
                }
                if view.members.len() <= 1 {
                    return Err("the last member cannot leave".to_string());
                }
                (ConfChangeType::RemoveNode, name)
            }
            Command::Live(_) => return Err("not a membership change".to_string()),
        };
        if let Command::Join(n, _) = &command {
            self.names.insert(raft_id(n), n.clone());
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(change);
        cc.node_id = raft_id(name);
        cc.context = command.encode();
        self.node
            .propose_conf_change(Vec::new(), cc)
            .map_err(|e| e.to_string())?;
        Ok(self.ready())
    }

    /// Persists (in memory), sends and applies what raft-rs has ready.
    fn ready(&mut self) -> Output {
        self.own_timeout();
        let mut out = Output::default();
        if self.failed.is_some() || !self.node.has_ready() {
            return out;
        }
        let before = self.view().number;
        let mut rd = self.node.ready();
        for rs in rd.take_read_states() {
            self.answered(&rs.request_ctx, rs.index);
        }
        if let Some(ss) = rd.ss() {
            let leader = self.names.get(&ss.leader_id).map_or("none", String::as_str);
            // An election's steps (pre-candidate, candidate, no leader
            // yet) at debug; its outcome at info.
            if ss.leader_id == raft::INVALID_ID {
                tracing::debug!(leader, term = self.node.raft.term, role = ?ss.raft_state, "raft leadership changed");
            } else {
                tracing::info!(leader, term = self.node.raft.term, role = ?ss.raft_state, "raft leadership changed");
            }
        }
        self.send(rd.take_messages(), &mut out);
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            if let Some(view) = Committed::decode(snap.data.clone()) {
                self.learn_names(&view);
                let mut a = lock(&self.applied);
                a.index = snap.get_metadata().index;
                a.term = snap.get_metadata().term;
                a.view = view;
            }
            if let Err(e) = self.node.store().mem.wl().apply_snapshot(snap) {
                tracing::warn!(error = %e, "raft snapshot not applied");
            }
        }
        let committed = rd.take_committed_entries();
        let mut changed =
            !rd.snapshot().is_empty() || !committed.is_empty() || !rd.entries().is_empty();
        self.apply(committed);
        if !rd.entries().is_empty() {
            if let Err(e) = self.node.store().mem.wl().append(rd.entries()) {
                tracing::warn!(error = %e, "raft entries not appended");
            }
        }
        if let Some(hs) = rd.hs() {
            self.node.store().mem.wl().set_hardstate(hs.clone());
            changed = true;
        }
        // What the next messages promise (a vote, an acknowledged entry)
        // is on disk before they leave.
        if changed && !self.persist_or_fail() {
            // Nothing that depends on it leaves.
            return Output::default();
        }
        self.send(rd.take_persisted_messages(), &mut out);
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.node
                .store()
                .mem
                .wl()
                .mut_hard_state()
                .set_commit(commit);
        }
        self.send(light.take_messages(), &mut out);
        let committed = light.take_committed_entries();
        let applied_more = !committed.is_empty();
        self.apply(committed);
        self.node.advance_apply();
        self.compact();
        if applied_more && !self.persist_or_fail() {
            return Output::default();
        }
        let view = self.view();
        if view.number != before {
            out.view = Some(view);
        }
        out
    }

    /// Notes the leader's answer to an ask (`ctx`: this node's ID and the
    /// tick it was made at): committed up to `index`. The answer to a
    /// later ask replaces an earlier one's, never the other way round.
    fn answered(&mut self, ctx: &[u8], index: u64) {
        let (Some(id), Some(at)) = (
            ctx.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()),
            ctx.get(8..16).and_then(|b| <[u8; 8]>::try_from(b).ok()),
        ) else {
            return;
        };
        let at = u64::from_be_bytes(at);
        if u64::from_be_bytes(id) != self.node.raft.id
            || at > self.ticks
            || self.confirmed.is_some_and(|(c, _)| c > at)
        {
            return;
        }
        self.confirmed = Some((at, index));
    }

    fn learn_names(&mut self, view: &Committed) {
        for n in view.members.keys() {
            self.names.insert(raft_id(n), n.clone());
        }
    }

    fn send(&mut self, messages: Vec<Message>, out: &mut Output) {
        for m in messages {
            // Links drop what they cannot deliver, and raft-rs waits for a
            // snapshot's outcome before it sends that peer anything else:
            // say it is done, so a lost snapshot is found by the next probe
            // (the follower still lacks the entries) and sent again.
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.node
                    .report_snapshot(m.to, raft::SnapshotStatus::Finish);
            }
            let Some(to) = self.names.get(&m.to) else {
                continue;
            };
            match m.write_to_bytes() {
                Ok(b) => out.messages.push((to.clone(), Bytes::from(b))),
                Err(e) => tracing::warn!(error = %e, "raft message not encoded"),
            }
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for e in entries {
            let index = e.index;
            let term = e.term;
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if let Some(c) = Command::decode(e.data.clone()) {
                        let mut a = lock(&self.applied);
                        if a.view.apply(c) {
                            tracing::info!(view = a.view.number, live = ?a.view.live, "view committed");
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    let Ok(cc) = ConfChange::parse_from_bytes(&e.data) else {
                        continue;
                    };
                    match self.node.apply_conf_change(&cc) {
                        Ok(cs) => self.node.store().mem.wl().set_conf_state(cs),
                        Err(err) => {
                            tracing::warn!(error = %err, "membership change not applied");
                            continue;
                        }
                    }
                    if let Some(c) = Command::decode(cc.context.clone()) {
                        if let Command::Join(n, _) = &c {
                            self.names.insert(raft_id(n), n.clone());
                            self.compact_now = true;
                        }
                        tracing::info!(change = ?c, "membership committed");
                        lock(&self.applied).view.apply(c);
                    }
                }
                EntryType::EntryConfChangeV2 => {}
            }
            let mut a = lock(&self.applied);
            a.index = index;
            a.term = term;
        }
    }

    /// Folds applied entries into the view once enough have gathered.
    fn compact(&mut self) {
        let applied = lock(&self.applied).index;
        let first = self.node.store().mem.first_index().unwrap_or(1);
        if applied >= first + COMPACT_EVERY || (self.compact_now && applied >= first) {
            self.compact_now = false;
            if let Err(e) = self.node.store().mem.wl().compact(applied) {
                tracing::debug!(error = %e, "raft log not compacted");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<(String, PeerAddr)> {
        (0..n)
            .map(|i| {
                (
                    format!("n{i}"),
                    PeerAddr::from(std::net::SocketAddr::from((
                        [127, 0, 0, 1],
                        7000 + i as u16,
                    ))),
                )
            })
            .collect()
    }

    /// Delivers messages between in-memory nodes until quiet; `cut` nodes
    /// neither send nor receive.
    fn pump(
        nodes: &mut BTreeMap<String, Consensus>,
        queue: Vec<(String, String, Bytes)>,
        cut: &[&str],
    ) {
        let mut queue = queue;
        let mut rounds = 0;
        while let Some((from, to, m)) = queue.pop() {
            rounds += 1;
            assert!(rounds < 100_000, "messages never settle");
            if cut.contains(&to.as_str()) || cut.contains(&from.as_str()) {
                continue;
            }
            if let Some(n) = nodes.get_mut(&to) {
                queue.extend(sent(&to, n.step(&from, &m)));
            }
        }
    }

    fn sent(from: &str, out: Output) -> Vec<(String, String, Bytes)> {
        out.messages
            .into_iter()
            .map(|(to, m)| (from.to_string(), to, m))
            .collect()
    }

    fn tick_all(nodes: &mut BTreeMap<String, Consensus>, cut: &[&str], live: &[String]) {
        let mut queue = Vec::new();
        for (name, n) in nodes.iter_mut() {
            if cut.contains(&name.as_str()) {
                continue;
            }
            queue.extend(sent(name, n.tick()));
            queue.extend(sent(name, n.propose_live(live, Instant::now())));
        }
        pump(nodes, queue, cut);
    }

    fn cluster(n: usize) -> BTreeMap<String, Consensus> {
        let ms = members(n);
        ms.iter()
            .map(|(name, _)| {
                let c = Consensus::new(name, &ms).expect("raft node");
                (name.clone(), c)
            })
            .collect()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A cluster of n0..n2 that has committed its first view.
    fn settled() -> (BTreeMap<String, Consensus>, Vec<String>) {
        let mut nodes = cluster(3);
        let all = names(&["n0", "n1", "n2"]);
        for _ in 0..40 {
            tick_all(&mut nodes, &[], &all);
        }
        (nodes, all)
    }

    /// The leader's name, or a follower's.
    fn pick(nodes: &BTreeMap<String, Consensus>, leader: bool) -> String {
        nodes
            .iter()
            .find(|(_, n)| n.is_leader() == leader)
            .map(|(k, _)| k.clone())
            .expect("a node in that role")
    }

    /// `name` comes back blank (a restart: Raft state is in memory).
    fn restart_blank(nodes: &mut BTreeMap<String, Consensus>, name: &str) {
        let fresh = Consensus::new(name, &members(3)).expect("raft node");
        nodes.insert(name.to_string(), fresh);
    }

    /// Every node has committed the same view, with `live` live.
    fn assert_agree(nodes: &BTreeMap<String, Consensus>, live: &[String]) {
        let views: Vec<Committed> = nodes.values().map(Consensus::view).collect();
        assert!(views.iter().all(|v| *v == views[0]), "{views:?}");
        assert_eq!(views[0].live, live);
    }

    /// A view is current only once the leader has confirmed, through a
    /// majority, how far the log is committed, and the node has applied
    /// that far, for an ask of this tick or the one before: a node cut off
    /// from the leader, or back blank before the leader caught it up, is
    /// not, so it takes over no session a newer view gave another node.
    #[test]
    fn a_view_is_current_once_the_leader_confirmed_it() {
        let (mut nodes, all) = settled();
        let leader = pick(&nodes, true);
        let follower = pick(&nodes, false);
        assert!(!nodes[&follower].current(), "never asked");
        // Asked: the answer comes through the leader.
        let out = nodes.get_mut(&follower).expect("node").ask_current();
        pump(&mut nodes, sent(&follower, out), &[]);
        assert!(nodes[&follower].current());
        // The leader asks itself (a heartbeat round to a majority).
        let out = nodes.get_mut(&leader).expect("node").ask_current();
        pump(&mut nodes, sent(&leader, out), &[]);
        assert!(nodes[&leader].current());
        // Two ticks later the answer is too old.
        tick_all(&mut nodes, &[], &all);
        tick_all(&mut nodes, &[], &all);
        assert!(!nodes[&follower].current(), "a stale answer");
        // Cut off from the leader and its peer: asked, never answered.
        let out = nodes.get_mut(&follower).expect("node").ask_current();
        let others: Vec<String> = nodes.keys().filter(|n| **n != follower).cloned().collect();
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        pump(&mut nodes, sent(&follower, out), &others);
        assert!(!nodes[&follower].current(), "no leader heard");
        // Back blank: not current until the leader has caught it up (its
        // ask is answered with an index it has not applied yet, or not at
        // all before it knows the leader).
        restart_blank(&mut nodes, &follower);
        let out = nodes.get_mut(&follower).expect("node").ask_current();
        pump(&mut nodes, sent(&follower, out), &[]);
        assert!(!nodes[&follower].current(), "blank, not caught up");
        for _ in 0..10 {
            tick_all(&mut nodes, &[], &all);
        }
        assert_eq!(nodes[&follower].view(), nodes[&leader].view());
        let out = nodes.get_mut(&follower).expect("node").ask_current();
        pump(&mut nodes, sent(&follower, out), &[]);
        assert!(nodes[&follower].current(), "caught up and confirmed");
        // Every node asks at once: each is answered (the leader keys asks
        // by their context, which names the asker).
        let names: Vec<String> = nodes.keys().cloned().collect();
        let mut queue = Vec::new();
        for n in &names {
            queue.extend(sent(n, nodes.get_mut(n).expect("node").ask_current()));
        }
        pump(&mut nodes, queue, &[]);
        assert!(nodes.values().all(Consensus::current), "one answered each");
        // An answer that comes after a later ask still counts for its own.
        let out = nodes.get_mut(&follower).expect("node").ask_current();
        let first = sent(&follower, out);
        let _later = nodes.get_mut(&follower).expect("node").ask_current();
        pump(&mut nodes, first, &[]);
        assert!(nodes[&follower].current(), "the earlier ask's answer");
    }

    /// Elections are a function of the seeds: the same seeds elect the
    /// same leader in the same term after the same number of ticks, through
    /// repeated leader failures, although raft-rs draws its own timeouts
    /// from the thread's generator (replaced here before they count).
    #[test]
    fn elections_replay_from_their_seeds() {
        fn run(seeds: [u64; 5]) -> Vec<(String, u64, usize)> {
            let ms = members(5);
            let mut nodes: BTreeMap<String, Consensus> = ms
                .iter()
                .zip(seeds)
                .map(|((name, _), seed)| {
                    let c = Consensus::with_state(name, &ms, None, seed).expect("raft node");
                    (name.clone(), c)
                })
                .collect();
            let mut dead: Vec<String> = Vec::new();
            let mut history = Vec::new();
            for tick in 0..400 {
                let cut: Vec<&str> = dead.iter().map(String::as_str).collect();
                let live: Vec<String> = nodes
                    .keys()
                    .filter(|n| !dead.contains(n))
                    .cloned()
                    .collect();
                tick_all(&mut nodes, &cut, &live);
                let leader = nodes
                    .iter()
                    .find(|(n, c)| !dead.contains(n) && c.is_leader())
                    .map(|(n, c)| (n.clone(), c.term()));
                if let Some((name, term)) = leader {
                    if history
                        .last()
                        .is_none_or(|(n, t, _)| *n != name || *t != term)
                    {
                        history.push((name.clone(), term, tick));
                        // Kill each of the first two leaders.
                        if dead.len() < 2 {
                            dead.push(name);
                        }
                    }
                }
            }
            history
        }
        let a = run([1, 2, 3, 4, 5]);
        assert_eq!(a.len(), 3, "three leaders in turn: {a:?}");
        assert_eq!(a, run([1, 2, 3, 4, 5]), "same seeds, another history");
        // Other seeds may pick other leaders or take other times, but
        // whatever they do, they do it again.
        let b = run([50, 40, 30, 20, 10]);
        assert_eq!(b, run([50, 40, 30, 20, 10]));
        let timeouts = |seed: u64| {
            let ms = members(3);
            let c = Consensus::with_state("n0", &ms, None, seed).expect("raft node");
            c.node.raft.randomized_election_timeout()
        };
        assert_eq!(
            timeouts(7),
            fastrand::Rng::with_seed(7).usize(ELECTION_TICKS..2 * ELECTION_TICKS)
        );
    }

    #[test]
    fn every_node_commits_the_same_view_and_a_minority_cannot_change_it() {
        let (mut nodes, all) = settled();
        let views: Vec<Committed> = nodes.values().map(Consensus::view).collect();
        assert!(views[0].number > 0);
        assert_eq!(views[0].live, all);
        assert!(views.iter().all(|v| *v == views[0]), "{views:?}");
        assert_eq!(nodes.values().filter(|n| n.is_leader()).count(), 1);

        // The leader is cut off: the other two elect a new one and commit a
        // view without it; the cut node keeps the old view.
        let leader = pick(&nodes, true);
        let rest: Vec<String> = all.iter().filter(|n| **n != leader).cloned().collect();
        let old = views[0].clone();
        for _ in 0..60 {
            tick_all(&mut nodes, &[leader.as_str()], &rest);
        }
        for r in &rest {
            let v = nodes[r].view();
            assert_eq!(v.live, rest, "{r}");
            assert!(v.number > old.number);
        }
        assert_eq!(nodes[&leader].view(), old, "a minority changes nothing");
        // Healed: the old leader catches up.
        for _ in 0..60 {
            tick_all(&mut nodes, &[], &all);
        }
        let views: Vec<Committed> = nodes.values().map(Consensus::view).collect();
        assert_eq!(views[0].live, all);
        assert!(views.iter().all(|v| *v == views[0]), "{views:?}");
    }

    #[test]
    fn members_join_and_leave_by_configuration_change() {
        let (mut nodes, all) = settled();
        let leader = pick(&nodes, true);
        let follower = all
            .iter()
            .find(|n| **n != leader)
            .cloned()
            .unwrap_or_default();
        assert!(nodes
            .get_mut(&follower)
            .map(|n| n.propose_membership(Command::Leave("n9".into())))
            .is_some_and(|r| r.is_err_and(|e| e.contains("not a member"))));
        let addr = PeerAddr::from(std::net::SocketAddr::from(([127, 0, 0, 1], 7003)));
        let out = nodes
            .get_mut(&leader)
            .map(|n| n.propose_membership(Command::Join("n3".into(), addr)));
        let Some(Ok(out)) = out else {
            panic!("join refused: {out:?}");
        };
        // The joining node starts empty and is caught up by the leader.
        let newcomer = Consensus::new("n3", &[]).expect("raft node");
        nodes.insert("n3".into(), newcomer);
        pump(&mut nodes, sent(&leader, out), &[]);
        let four = names(&["n0", "n1", "n2", "n3"]);
        for _ in 0..60 {
            tick_all(&mut nodes, &[], &four);
        }
        for (name, n) in &nodes {
            let v = n.view();
            assert_eq!(v.members.len(), 4, "{name}: {v:?}");
            assert_eq!(v.live, four, "{name}");
        }
        // Leaving: n0..n2 commit a view without n3.
        let leader = pick(&nodes, true);
        let out = nodes
            .get_mut(&leader)
            .map(|n| n.propose_membership(Command::Leave("n3".into())));
        let Some(Ok(out)) = out else {
            panic!("leave refused: {out:?}");
        };
        pump(&mut nodes, sent(&leader, out), &[]);
        for _ in 0..20 {
            tick_all(&mut nodes, &["n3"], &all);
        }
        for name in &all {
            let v = nodes[name].view();
            assert_eq!(v.live, all, "{name}");
            assert!(!v.members.contains_key("n3"));
        }
    }

    #[test]
    fn a_compacted_log_reaches_a_blank_node_by_snapshot() {
        let mut nodes = cluster(3);
        let all = names(&["n0", "n1", "n2"]);
        // Flap n2 in and out of the live set, past the compaction point,
        // while n2 hears nothing.
        let two = names(&["n0", "n1"]);
        for i in 0..(COMPACT_EVERY as usize * 3) {
            let live = if i % 2 == 0 { &two } else { &all };
            tick_all(&mut nodes, &["n2"], live);
            let leader = nodes.values_mut().find(|n| n.is_leader());
            if let Some(l) = leader {
                l.proposed = None;
            }
        }
        let first = nodes["n0"].node.store().mem.first_index().unwrap_or(0);
        assert!(first > 1, "the log was compacted");
        // n2 restarts blank and is caught up.
        restart_blank(&mut nodes, "n2");
        for _ in 0..60 {
            tick_all(&mut nodes, &[], &all);
        }
        assert_agree(&nodes, &all);
    }

    #[test]
    fn a_node_restarted_blank_is_caught_up_without_a_panic() {
        let (mut nodes, all) = settled();
        // A follower comes back with nothing, while the leader still
        // thinks it holds the entries it acknowledged.
        let follower = pick(&nodes, false);
        restart_blank(&mut nodes, &follower);
        assert_eq!(nodes[&follower].node.raft.raft_log.last_index(), 0);
        for _ in 0..60 {
            tick_all(&mut nodes, &[], &all);
        }
        assert_agree(&nodes, &all);
    }

    #[test]
    fn a_lost_snapshot_is_sent_again() {
        let (mut nodes, all) = settled();
        let follower = pick(&nodes, false);
        restart_blank(&mut nodes, &follower);
        // The first snapshot for the blank node is lost on the way.
        let mut lost = 0;
        for _ in 0..60 {
            let mut queue = Vec::new();
            for (name, n) in nodes.iter_mut() {
                queue.extend(sent(name, n.tick()));
                queue.extend(sent(name, n.propose_live(&all, Instant::now())));
            }
            let mut rounds = 0;
            while let Some((from, to, m)) = queue.pop() {
                rounds += 1;
                assert!(rounds < 100_000);
                let snapshot = Message::parse_from_bytes(&m)
                    .is_ok_and(|m| m.get_msg_type() == MessageType::MsgSnapshot);
                if snapshot && lost == 0 {
                    lost += 1;
                    continue;
                }
                if let Some(n) = nodes.get_mut(&to) {
                    queue.extend(sent(&to, n.step(&from, &m)));
                }
            }
        }
        assert_eq!(lost, 1, "a snapshot was sent");
        assert_agree(&nodes, &all);
    }

    #[test]
    fn a_dead_leader_is_retired_through_a_follower() {
        let (mut nodes, all) = settled();
        let dead = pick(&nodes, true);
        let rest: Vec<String> = all.iter().filter(|n| **n != dead).cloned().collect();
        let cut = [dead.as_str()];
        for _ in 0..60 {
            tick_all(&mut nodes, &cut, &rest);
        }
        let follower = rest
            .iter()
            .find(|n| !nodes[*n].is_leader())
            .cloned()
            .expect("a follower");
        let out = nodes
            .get_mut(&follower)
            .map(|n| n.propose_membership(Command::Leave(dead.clone())));
        let Some(Ok(out)) = out else {
            panic!("refused: {out:?}");
        };
        pump(&mut nodes, sent(&follower, out), &cut);
        for _ in 0..20 {
            tick_all(&mut nodes, &cut, &rest);
        }
        for name in &rest {
            let v = nodes[name].view();
            assert!(!v.members.contains_key(&dead), "{name}: {v:?}");
        }
    }

    #[test]
    fn garbage_commands_and_views_are_refused() {
        for b in [
            &b""[..],
            b"\x00",
            b"\x00\xff\xff\xff\xff",
            b"\x01\x00\x05ab",
            b"\x09",
        ] {
            assert_eq!(Command::decode(Bytes::copy_from_slice(b)), None);
        }
        assert_eq!(Committed::decode(Bytes::from_static(b"\x00\x00")), None);
        let v = Committed {
            number: 7,
            live: names(&["a", "b"]),
            members: members(2).into_iter().collect(),
        };
        assert_eq!(Committed::decode(v.encode()), Some(v));
        let mut c = cluster(1);
        let n = c.get_mut("n0").expect("node");
        let out = n.step("n1", b"\xff\xff\xff");
        assert!(out.messages.is_empty());
    }

    /// A node whose state can no longer be written stops taking part:
    /// it says why and sends nothing more (a vote or an acknowledgement it
    /// could not keep would break Raft's rules); the others go on.
    #[test]
    fn a_node_that_cannot_persist_stops_taking_part() {
        let dir = std::env::temp_dir().join(format!("mqlb-raft-fail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("raft-n0.state");
        let ms = members(3);
        let mut nodes: BTreeMap<String, Consensus> = ms
            .iter()
            .map(|(name, _)| {
                let f = (name == "n0").then_some(file.as_path());
                let c = Consensus::with_state(name, &ms, f, 7).expect("raft node");
                (name.clone(), c)
            })
            .collect();
        let all = names(&["n0", "n1", "n2"]);
        for _ in 0..40 {
            tick_all(&mut nodes, &[], &all);
        }
        assert!(nodes["n0"].failed().is_none());
        // The directory goes away: the next write fails.
        std::fs::remove_dir_all(&dir).expect("remove");
        for _ in 0..40 {
            tick_all(&mut nodes, &[], &names(&["n1", "n2"]));
        }
        let why = nodes["n0"].failed().expect("n0 should have failed");
        assert!(why.contains("raft-n0.state"), "{why}");
        let n0 = nodes.get_mut("n0").expect("n0");
        for _ in 0..20 {
            let out = n0.tick();
            assert!(
                out.messages.is_empty(),
                "a failed node sent {:?}",
                out.messages
            );
        }
        // The others still commit views.
        let before = nodes["n1"].view().number;
        for _ in 0..40 {
            tick_all(&mut nodes, &["n0"], &all);
            tick_all(&mut nodes, &["n0"], &names(&["n1", "n2"]));
        }
        assert!(nodes["n1"].view().number > before);
    }

    /// With a state file, a node restarted mid-term comes back with its
    /// term, its vote and the committed view, not blank; the file survives
    /// compaction, membership changes and bogus contents.
    #[test]
    fn a_node_with_a_state_file_remembers_its_vote_and_view() {
        let dir = std::env::temp_dir().join(format!("mqlb-raft-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("raft-n0.state");
        let _ = std::fs::remove_file(&file);
        let ms = members(3);
        let mut nodes: BTreeMap<String, Consensus> = ms
            .iter()
            .map(|(name, _)| {
                let f = (name == "n0").then_some(file.as_path());
                let c = Consensus::with_state(name, &ms, f, 1).expect("raft node");
                (name.clone(), c)
            })
            .collect();
        let all = names(&["n0", "n1", "n2"]);
        // Past a compaction, with the live set flapping.
        for round in 0..(COMPACT_EVERY as usize + 20) {
            let live = if round % 2 == 0 {
                all.clone()
            } else {
                names(&["n0", "n1"])
            };
            tick_all(&mut nodes, &[], &live);
        }
        for _ in 0..20 {
            tick_all(&mut nodes, &[], &all);
        }
        let before = nodes["n0"].view();
        let hard = nodes["n0"].node.raft.hard_state();
        assert!(before.number > COMPACT_EVERY / 2, "{before:?}");
        // Restarted from its file.
        let back = Consensus::with_state("n0", &ms, Some(&file), 1).expect("raft node");
        assert_eq!(back.view(), before);
        let restored = back.node.raft.hard_state();
        assert_eq!((restored.term, restored.vote), (hard.term, hard.vote));
        nodes.insert("n0".into(), back);
        for _ in 0..40 {
            tick_all(&mut nodes, &[], &all);
        }
        let views: Vec<Committed> = nodes.values().map(Consensus::view).collect();
        assert!(views.iter().all(|v| *v == views[0]), "{views:?}");
        assert_eq!(views[0].live, all);
        // A flipped bit is found: the node refuses to start on it (it
        // could vote twice), until the file is set aside.
        let mut bytes = std::fs::read(&file).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&file, &bytes).expect("write");
        let err = match Consensus::with_state("n0", &ms, Some(&file), 1) {
            Ok(_) => panic!("a corrupt state must be refused"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("checksum") && err.contains("--repair"),
            "{err}"
        );
        // So is a file that is not a state.
        std::fs::write(&file, b"garbage").expect("write");
        assert!(Consensus::with_state("n0", &ms, Some(&file), 1).is_err());
        assert!(Consensus::repair_state_file(&file).is_some());
        let blank = Consensus::with_state("n0", &ms, Some(&file), 1).expect("raft node");
        assert_eq!(blank.view().number, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
