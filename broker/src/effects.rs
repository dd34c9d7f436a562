//! What the core asks the world to do, returned instead of done under its
//! lock: items for connection mailboxes, and the change records of
//! persistent sessions for the change log.
//!
//! A caller takes the core's lock, calls it, drops the lock, then applies
//! the [`Effects`]. The change log decides when a change is committed
//! (safe against the loss of a node); a publisher's acknowledgement waits
//! for that. A single node keeps no copy elsewhere, so its log commits at
//! once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::outbox::{Outbox, Outgoing};
use crate::session::SessionChange;

/// One change to one persistent session, in the order it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    /// Client ID.
    pub client: Arc<str>,
    /// The session's epoch when the change was made: a replica refuses
    /// changes from an older epoch than it has seen.
    pub epoch: u64,
    /// The change.
    pub change: SessionChange,
}

/// Work the core has decided on, to be done outside its lock.
#[derive(Debug, Default)]
#[must_use = "effects do nothing until applied (outside the core's lock)"]
pub struct Effects {
    pub(crate) sends: Vec<(Arc<Outbox>, Outgoing)>,
    pub(crate) records: Vec<ChangeRecord>,
}

impl Effects {
    /// Nothing to do.
    pub fn none() -> Self {
        Self::default()
    }

    /// Queues `o` for the connection behind `to`.
    pub(crate) fn send(&mut self, to: &Arc<Outbox>, o: Outgoing) {
        self.sends.push((to.clone(), o));
    }

    /// The change records, in order.
    pub fn records(&self) -> &[ChangeRecord] {
        &self.records
    }

    /// Adds another call's effects after these.
    pub fn extend(&mut self, other: Effects) {
        self.sends.extend(other.sends);
        self.records.extend(other.records);
    }

    /// Hands the records to `log` and the items to their mailboxes. The
    /// returned [`Committed`] resolves once the records are committed.
    pub fn apply(self, log: &dyn ChangeLog) -> Committed {
        let committed = if self.records.is_empty() {
            Committed::now()
        } else {
            log.append(self.records)
        };
        for (to, o) in self.sends {
            to.push(o);
        }
        committed
    }
}

/// Resolves once some change records are committed.
#[derive(Debug)]
pub struct Committed(Option<tokio::sync::oneshot::Receiver<()>>);

impl Committed {
    /// Already committed.
    pub fn now() -> Self {
        Self(None)
    }

    /// Committed when `rx` fires (or its sender is dropped).
    pub fn when(rx: tokio::sync::oneshot::Receiver<()>) -> Self {
        Self(Some(rx))
    }

    /// True if nothing is left to wait for.
    pub fn is_done(&self) -> bool {
        self.0.is_none()
    }

    /// Waits for the commit.
    pub async fn wait(self) {
        if let Some(rx) = self.0 {
            let _ = rx.await;
        }
    }
}

/// Where session change records go: the seam the cluster's replication
/// plugs into.
pub trait ChangeLog: Send + Sync + std::fmt::Debug {
    /// Takes records in order; the result resolves once they are committed.
    fn append(&self, records: Vec<ChangeRecord>) -> Committed;
}

/// A single node's log: memory is the only copy, so every record is
/// committed as soon as it is made. It counts them for metrics.
#[derive(Debug, Default)]
pub struct LocalLog {
    appended: AtomicU64,
}

impl LocalLog {
    /// Records appended so far.
    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }
}

impl ChangeLog for LocalLog {
    fn append(&self, records: Vec<ChangeRecord>) -> Committed {
        self.appended
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Committed::now()
    }
}
