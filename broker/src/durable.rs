//! A node's data directory (`--data-dir`): the ordered change log's
//! entries written to disk before they count as committed, snapshots that
//! cut the log short, and the recovery that puts it all back at start-up.
//!
//! The disk is one more consumer of the ordered change log, after the
//! lock, in order, like the chain replicator: [`DiskLog`] wraps the
//! node's log and adds "on disk" to what a batch's commit waits for. Each
//! entry is written as the cluster frame that carries it between nodes
//! (`cluster::wire`): a session's change as a `Replicate` frame, a
//! retained write as `Retained`, a state store key as `StoreCopy`. The
//! engine (`mqlb-storage`) says why it is a log and not a table store.
//!
//! What needs no disk gets none: a publish that reaches no persistent
//! session and is not retained makes no log entry, so it waits for no
//! fsync.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use mqlb_broker_core::session::{Session, SessionChange};
use mqlb_storage::{Recovered, Store};

use crate::cluster::wire::Frame;
use crate::core::Core;
use crate::effects::{ChangeLog, Committed, LogEntry};
use crate::message::Message;
use crate::node::Node;
use crate::statestore::StateStore;

/// A snapshot is written once this much log has been written since the
/// last (and at start-up and on a graceful stop): replay at start-up
/// stays short, and the log's disk space is given back.
pub const SNAPSHOT_AFTER_BYTES: u64 = 64 << 20;

/// The node's change log with the disk added: each batch that holds
/// something to keep is committed once it is on disk and the inner log
/// (a single node's, which commits at once) has it.
#[derive(Debug)]
pub struct DiskLog {
    inner: Arc<dyn ChangeLog>,
    store: Arc<Store>,
}

impl DiskLog {
    /// `inner`, with `store` added.
    pub fn new(inner: Arc<dyn ChangeLog>, store: Arc<Store>) -> Self {
        Self { inner, store }
    }
}

/// What each stored item is: a tag byte, then the cluster frame that
/// carries it.
const OWNED: u8 = 1;
/// A change to the copy this node keeps of another node's session.
const REPLICA: u8 = 2;
const RETAINED: u8 = 3;
const STORE: u8 = 4;
/// A session that left this node without ending (a `Replicate` frame
/// with no changes).
const EVICTED: u8 = 5;

/// A will waiting out its delay: the client's ID (u16 length, bytes),
/// whether one is pending (u8), then when it is due (u64 Unix ms) and the
/// message as a `Forward` frame. Read only: written by builds before a
/// pending will was kept with its session (`SessionChange::WillSet`), which
/// its session's records now carry.
const WILL: u8 = 6;

/// Reads a [`WILL`] item's body (after its tag): the client, and the will
/// if one is pending.
fn get_will(buf: &mut BytesMut) -> Result<(String, Option<(u64, Message)>), String> {
    let short = || "a stored will ends early".to_string();
    if buf.len() < 2 {
        return Err(short());
    }
    let len = usize::from(buf.get_u16());
    if buf.len() < len + 1 {
        return Err(short());
    }
    let client = String::from_utf8(buf.split_to(len).to_vec()).map_err(|e| e.to_string())?;
    if buf.get_u8() == 0 {
        return Ok((client, None));
    }
    if buf.len() < 8 {
        return Err(short());
    }
    let due = buf.get_u64();
    match Frame::decode(buf).map_err(|e| e.to_string())? {
        Some(Frame::Forward { message, .. }) => Ok((client, Some((due, message)))),
        _ => Err("a stored will holds no message".into()),
    }
}

/// Appends `f`, tagged, to `out`; a frame that cannot be encoded (a
/// field past the wire's limits, which the broker's own limits keep from
/// happening) is logged and left out.
fn put(tag: u8, f: &Frame, out: &mut BytesMut) {
    let before = out.len();
    out.extend_from_slice(&[tag]);
    if let Err(e) = f.encode(out) {
        out.truncate(before);
        tracing::error!(error = %e, "a change could not be encoded for the disk; left out");
    }
}

/// A session change as the frame that carries it.
fn session_frame(client: &str, epoch: u64, changes: Vec<SessionChange>) -> Frame {
    Frame::Replicate {
        seq: 0,
        client: client.to_string(),
        epoch,
        holder: String::new(),
        changes,
    }
}

/// The frames that keep `entries`, or `None` if nothing in them needs the
/// disk (interest is rebuilt from the sessions): what a batch of the
/// change log is written as (public for the simulator, whose simulated
/// disk holds exactly what the broker's would).
pub fn encode(entries: &[LogEntry]) -> Option<Vec<u8>> {
    let mut out = BytesMut::new();
    for e in entries {
        match e {
            LogEntry::Session(r) => put(
                OWNED,
                &session_frame(&r.client, r.epoch, vec![r.change.clone()]),
                &mut out,
            ),
            LogEntry::Replica {
                client,
                epoch,
                changes,
            } => put(
                REPLICA,
                &session_frame(client, *epoch, changes.clone()),
                &mut out,
            ),
            LogEntry::Evicted(client) => {
                put(EVICTED, &session_frame(client, 0, Vec::new()), &mut out)
            }
            LogEntry::Retained {
                topic,
                message,
                version,
            } => put(
                RETAINED,
                &Frame::Retained {
                    topic: topic.clone(),
                    message: message.clone(),
                    version: *version,
                },
                &mut out,
            ),
            LogEntry::Store { copy, .. }
            | LogEntry::StoreRead {
                current: Some(copy),
                ..
            }
            | LogEntry::StoreReplica(copy) => put(
                STORE,
                &Frame::StoreCopy {
                    seq: 0,
                    view: 0,
                    copy: Some((**copy).clone()),
                },
                &mut out,
            ),
            LogEntry::Interest { .. } | LogEntry::StoreRead { current: None, .. } => {}
        }
    }
    (!out.is_empty()).then(|| Vec::from(out))
}

impl ChangeLog for DiskLog {
    fn append(&self, seq: u64, entries: Vec<LogEntry>) -> Committed {
        let data = encode(&entries);
        let mut committed = self.inner.append(seq, entries);
        let skip = mqlb_broker_core::mutations::on(
            mqlb_broker_core::mutations::Mutation::CommitBeforeFsync,
        );
        if let Some(data) = data {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.store.append(
                seq,
                data,
                Box::new(move |r| {
                    // Dropping `tx` unsent: not committed, never.
                    if r.is_ok() {
                        let _ = tx.send(());
                    }
                }),
            );
            if !skip {
                committed.merge(Committed::when(rx));
            }
        }
        committed
    }
}

/// What a recovery put back, for the log line that says so.
#[derive(Debug, Default)]
pub struct Restored {
    /// Every session read back, the newest copy of each (by epoch): a
    /// single node serves them; a cluster member keeps them as copies
    /// until the view says whose they are (see [`restore`]).
    pub sessions: Vec<(String, Session)>,
    /// Retained messages (deletions not counted).
    pub retained: usize,
    /// State store keys.
    pub keys: usize,
    /// The last batch number read: the node's log goes on after it.
    pub last_seq: u64,
    /// For each session read back, the fingerprints of the messages the
    /// records show it was given (queued or sent), newest last, at most
    /// [`MAX_RESTORED_PRINTS`]: a QoS 2 publish sent again by a publisher
    /// that never had its PUBREC is routed again to the sessions taken
    /// over (`Core::qos2_resent`), and without these a subscriber that
    /// already had it would get it twice (found by the simulator: a
    /// site-wide power loss, seed 1164 of the data-directory runs).
    pub seen: Vec<(String, Vec<u64>)>,
}

/// The most fingerprints kept per session read back.
pub const MAX_RESTORED_PRINTS: usize = 1 << 16;

/// Sessions as the log rebuilds them: the ones this node held, and the
/// copies it kept for others, apart (as the node kept them).
#[derive(Default)]
struct Rebuilt {
    owned: HashMap<String, Session>,
    replicas: HashMap<String, Session>,
    /// Wills waiting out their delay: when each is due (Unix ms).
    wills: HashMap<String, (u64, Message)>,
    /// What each session was given, by fingerprint, in order.
    given: HashMap<String, Vec<u64>>,
}

impl Rebuilt {
    /// Notes the messages `changes` give `client`'s session.
    fn note_given(&mut self, client: &str, changes: &[SessionChange]) {
        for c in changes {
            if let SessionChange::Enqueued(p) | SessionChange::Sent { pending: p, .. } = c {
                let prints = self.given.entry(client.to_string()).or_default();
                prints.push(crate::core::fingerprint(&p.msg));
                if prints.len() >= 2 * MAX_RESTORED_PRINTS {
                    prints.drain(..MAX_RESTORED_PRINTS);
                }
            }
        }
    }
}

/// Applies one stored payload (a run of tagged frames) to what is being
/// rebuilt.
fn replay(
    data: &[u8],
    (now, wall_ms): (Instant, u64),
    rebuilt: &mut Rebuilt,
    core: &mut Core,
    statestore: &StateStore,
) -> Result<(), String> {
    let mut buf = BytesMut::from(data);
    while let Some(&tag) = buf.first() {
        buf.advance(1);
        if tag == WILL {
            match get_will(&mut buf)? {
                (client, Some((due, m))) => {
                    rebuilt.wills.insert(client, (due, m));
                }
                (client, None) => {
                    rebuilt.wills.remove(&client);
                }
            }
            continue;
        }
        let frame = Frame::decode(&mut buf)
            .map_err(|e| e.to_string())?
            .ok_or("a stored record ends mid-frame")?;
        match (tag, frame) {
            (
                OWNED,
                Frame::Replicate {
                    client, changes, ..
                },
            ) => {
                rebuilt.note_given(&client, &changes);
                for c in changes {
                    if c == SessionChange::Ended {
                        rebuilt.owned.remove(&client);
                    } else {
                        rebuilt
                            .owned
                            .entry(client.clone())
                            .or_default()
                            .apply(c, now);
                    }
                }
            }
            (
                REPLICA,
                Frame::Replicate {
                    client,
                    epoch,
                    changes,
                    ..
                },
            ) => {
                // As the cluster's replication applied them: an older
                // epoch's changes are refused.
                if rebuilt
                    .replicas
                    .get(&client)
                    .is_none_or(|s| s.epoch <= epoch)
                {
                    rebuilt.note_given(&client, &changes);
                }
                let s = rebuilt.replicas.entry(client.clone()).or_default();
                if s.epoch <= epoch {
                    for c in changes {
                        if c == SessionChange::Ended {
                            *s = Session::default();
                        } else {
                            s.apply(c, now);
                        }
                    }
                }
                if *s == Session::default() {
                    rebuilt.replicas.remove(&client);
                }
            }
            (EVICTED, Frame::Replicate { client, .. }) => {
                rebuilt.owned.remove(&client);
            }
            (
                RETAINED,
                Frame::Retained {
                    topic,
                    message,
                    version,
                },
            ) => core.restore_retained(&topic, message, version),
            (STORE, Frame::StoreCopy { copy: Some(c), .. }) => {
                statestore.install_at(c, wall_ms);
            }
            (tag, other) => {
                return Err(format!(
                    "unexpected item in the data directory (tag {tag}): {other:?}"
                ))
            }
        }
    }
    Ok(())
}

/// Reads back what `found` holds: retained messages and state store keys
/// are put back into `core` and `statestore`; the sessions are returned
/// (the newest copy of each, by epoch), for the caller to serve (a single
/// node: [`serve_restored`]) or keep as copies (a cluster member, whose
/// view decides whose each is).
pub fn restore(
    core: &mut Core,
    statestore: &StateStore,
    found: &Recovered,
) -> Result<Restored, String> {
    let wall_ms = crate::statestore::now_ms();
    restore_at(core, statestore, found, Instant::now(), wall_ms)
}

/// [`restore`] at `now`, the wall clock reading `wall_ms` (the
/// simulator's clocks).
pub fn restore_at(
    core: &mut Core,
    statestore: &StateStore,
    found: &Recovered,
    now: Instant,
    wall_ms: u64,
) -> Result<Restored, String> {
    let mut rebuilt = Rebuilt::default();
    if let Some(s) = &found.snapshot {
        replay(&s.data, (now, wall_ms), &mut rebuilt, core, statestore)
            .map_err(|e| format!("snapshot covering batch {}: {e}", s.covers))?;
    }
    for r in &found.records {
        replay(&r.data, (now, wall_ms), &mut rebuilt, core, statestore)
            .map_err(|e| format!("record {}: {e}", r.seq))?;
    }
    for (client, (due, will)) in rebuilt.wills.drain() {
        core.restore_will(&client, due, will);
    }
    let mut given = std::mem::take(&mut rebuilt.given);
    let mut sessions = rebuilt.owned;
    for (id, copy) in rebuilt.replicas {
        match sessions.get(&id) {
            Some(mine) if mine.epoch >= copy.epoch => {}
            _ => {
                sessions.insert(id, copy);
            }
        }
    }
    let seen = sessions
        .keys()
        .filter_map(|id| {
            let mut prints = given.remove(id)?;
            let cut = prints.len().saturating_sub(MAX_RESTORED_PRINTS);
            prints.drain(..cut);
            Some((id.clone(), prints))
        })
        .collect();
    Ok(Restored {
        seen,
        sessions: sessions.into_iter().collect(),
        last_seq: found.last_seq(),
        retained: core.retained_count(),
        keys: statestore.copies(|_| true).len(),
    })
}

/// A single node serves what it read back: each session imported
/// (offline, as it was), knowing what it was given (`seen`, see
/// [`Restored::seen`]).
pub fn serve_restored(
    core: &mut Core,
    sessions: Vec<(String, Session)>,
    seen: Vec<(String, Vec<u64>)>,
) -> Result<(), String> {
    let now = Instant::now();
    for (id, s) in sessions {
        let snap = mqlb_broker_core::core::snapshot_of(&s, now);
        // Its records describe what was just read back: not logged again.
        let _already_on_disk = core
            .import_session(&id, snap)
            .map_err(|e| format!("session {id:?}: {e}"))?;
    }
    for (id, prints) in seen {
        core.note_seen(&id, prints.into_iter().collect());
    }
    Ok(())
}

/// Writes a snapshot of the node: under the core's lock (and the
/// cluster's copies' lock), the number of the last batch sequenced and a
/// copy of every persistent session, every copy kept for another node,
/// every retained message and state store key, so the snapshot holds
/// exactly the batches up to that number; encoded after it. Returns once
/// the snapshot is on disk.
pub async fn snapshot(node: &Node, store: &Store) -> std::io::Result<()> {
    let state = node.state();
    let cluster = node.cluster();
    let (covers, owned, replicas, retained, keys) = {
        let core = state.core();
        let replicas = cluster.map(|c| c.replica_copies()).unwrap_or_default();
        // Read last: every change numbered up to it is in what was copied
        // (owned ones are numbered under the core's lock, copies' under
        // theirs, both held here).
        let covers = state.last_sequenced();
        let owned: Vec<_> = core
            .persistent_sessions()
            .into_iter()
            .filter_map(|id| core.export_session(&id).map(|s| (id, s)))
            .collect();
        let retained: Vec<_> = core
            .retained_all()
            .into_iter()
            .filter(|(t, _, _)| !(t == "$SYS" || t.starts_with("$SYS/")))
            .collect();
        let keys = state.statestore.copies(|_| true);
        (covers, owned, replicas, retained, keys)
    };
    let now = Instant::now();
    let mut out = BytesMut::new();
    let copies = owned
        .into_iter()
        .map(|(c, s)| (OWNED, c.to_string(), s))
        .chain(replicas.into_iter().map(|(c, s)| (REPLICA, c, s)));
    for (tag, client, snap) in copies {
        let epoch = snap.epoch;
        if tag == REPLICA {
            put(
                REPLICA,
                &session_frame(&client, epoch, vec![SessionChange::Ended]),
                &mut out,
            );
        }
        for change in mqlb_broker_core::core::snapshot_changes(snap, now, Arc::<str>::from) {
            // One frame per change: a session's queue can be far larger
            // than a frame may be.
            put(tag, &session_frame(&client, epoch, vec![change]), &mut out);
        }
    }
    for (topic, message, version) in retained {
        put(
            RETAINED,
            &Frame::Retained {
                topic,
                message,
                version,
            },
            &mut out,
        );
    }
    for copy in keys {
        put(
            STORE,
            &Frame::StoreCopy {
                seq: 0,
                view: 0,
                copy: Some(copy),
            },
            &mut out,
        );
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    store.snapshot(covers, Vec::from(out), move |r| {
        let _ = tx.send(r);
    });
    rx.await
        .unwrap_or_else(|_| Err(std::io::Error::other("the storage writer stopped")))
}
