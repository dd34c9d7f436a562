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

use bytes::BytesMut;
use mqlb_broker_core::session::Session;
use mqlb_storage::{Recovered, Store};

use crate::cluster::wire::Frame;
use crate::core::Core;
use crate::effects::{ChangeLog, Committed, LogEntry};
use crate::state::State;
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

/// Appends `f` to `out`; a frame that cannot be encoded (a field past the
/// wire's limits, which the broker's own limits keep from happening) is
/// logged and left out.
fn put(f: &Frame, out: &mut BytesMut) {
    let before = out.len();
    if let Err(e) = f.encode(out) {
        out.truncate(before);
        tracing::error!(error = %e, "a change could not be encoded for the disk; left out");
    }
}

/// The frames that keep `entries`, or `None` if nothing in them needs the
/// disk (interest is rebuilt from the sessions).
fn encode(entries: &[LogEntry]) -> Option<Vec<u8>> {
    let mut out = BytesMut::new();
    for e in entries {
        match e {
            LogEntry::Session(r) => put(
                &Frame::Replicate {
                    seq: 0,
                    client: r.client.to_string(),
                    epoch: r.epoch,
                    holder: String::new(),
                    changes: vec![r.change.clone()],
                },
                &mut out,
            ),
            LogEntry::Retained {
                topic,
                message,
                version,
            } => put(
                &Frame::Retained {
                    topic: topic.clone(),
                    message: message.clone(),
                    version: *version,
                },
                &mut out,
            ),
            LogEntry::Store(copy) => put(
                &Frame::StoreCopy {
                    seq: 0,
                    view: 0,
                    copy: Some((**copy).clone()),
                },
                &mut out,
            ),
            LogEntry::Interest { .. } => {}
        }
    }
    (!out.is_empty()).then(|| out.to_vec())
}

impl ChangeLog for DiskLog {
    fn append(&self, seq: u64, entries: Vec<LogEntry>) -> Committed {
        let data = encode(&entries);
        let mut committed = self.inner.append(seq, entries);
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
            committed.merge(Committed::when(rx));
        }
        committed
    }
}

/// What a recovery put back, for the log line that says so.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Sessions.
    pub sessions: usize,
    /// Retained messages (deletions not counted).
    pub retained: usize,
    /// State store keys.
    pub keys: usize,
    /// The last batch number read: the node's log goes on after it.
    pub last_seq: u64,
}

/// Applies one stored payload (a run of frames) to what is being rebuilt.
fn replay(
    data: &[u8],
    now: Instant,
    sessions: &mut HashMap<String, Session>,
    core: &mut Core,
    statestore: &StateStore,
) -> Result<(), String> {
    let mut buf = BytesMut::from(data);
    while !buf.is_empty() {
        let frame = Frame::decode(&mut buf)
            .map_err(|e| e.to_string())?
            .ok_or("a stored record ends mid-frame")?;
        match frame {
            Frame::Replicate {
                client, changes, ..
            } => {
                for c in changes {
                    if c == mqlb_broker_core::session::SessionChange::Ended {
                        sessions.remove(&client);
                    } else {
                        sessions.entry(client.clone()).or_default().apply(c, now);
                    }
                }
            }
            Frame::Retained {
                topic,
                message,
                version,
            } => core.restore_retained(&topic, message, version),
            Frame::StoreCopy { copy: Some(c), .. } => {
                statestore.install(c);
            }
            other => return Err(format!("unexpected frame in the data directory: {other:?}")),
        }
    }
    Ok(())
}

/// Puts back what `found` holds: sessions (offline, their queues and
/// inflight messages, QoS 2 ids and subscriptions), retained messages
/// and state store keys.
pub fn restore(
    core: &mut Core,
    statestore: &StateStore,
    found: &Recovered,
) -> Result<Restored, String> {
    let now = Instant::now();
    let mut sessions = HashMap::new();
    if let Some(s) = &found.snapshot {
        replay(&s.data, now, &mut sessions, core, statestore)
            .map_err(|e| format!("snapshot covering batch {}: {e}", s.covers))?;
    }
    for r in &found.records {
        replay(&r.data, now, &mut sessions, core, statestore)
            .map_err(|e| format!("record {}: {e}", r.seq))?;
    }
    let mut restored = Restored {
        last_seq: found.last_seq(),
        retained: core.retained_count(),
        keys: statestore.copies(|_| true).len(),
        ..Restored::default()
    };
    for (id, s) in sessions {
        let snap = mqlb_broker_core::core::snapshot_of(&s, now);
        match core.import_session(&id, snap) {
            // Its records describe what was just read back.
            Ok(_already_on_disk) => restored.sessions += 1,
            Err(e) => return Err(format!("session {id:?}: {e}")),
        }
    }
    Ok(restored)
}

/// Writes a snapshot of the node: under the core's lock, the number of
/// the last batch sequenced and a copy of every persistent session,
/// retained message and state store key (so the snapshot holds exactly
/// the batches up to that number); encoded after it. Returns once the
/// snapshot is on disk.
pub async fn snapshot(state: &State, store: &Store) -> std::io::Result<()> {
    let (covers, sessions, retained, keys) = state.for_snapshot();
    let now = Instant::now();
    let mut out = BytesMut::new();
    for (client, snap) in sessions {
        let epoch = snap.epoch;
        for change in mqlb_broker_core::core::snapshot_changes(snap, now, Arc::<str>::from) {
            // One frame per change: a session's queue can be far larger
            // than a frame may be.
            put(
                &Frame::Replicate {
                    seq: 0,
                    client: client.to_string(),
                    epoch,
                    holder: String::new(),
                    changes: vec![change],
                },
                &mut out,
            );
        }
    }
    for (topic, message, version) in retained {
        put(
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
            &Frame::StoreCopy {
                seq: 0,
                view: 0,
                copy: Some(copy),
            },
            &mut out,
        );
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    store.snapshot(covers, out.to_vec(), move |r| {
        let _ = tx.send(r);
    });
    rx.await
        .unwrap_or_else(|_| Err(std::io::Error::other("the storage writer stopped")))
}
