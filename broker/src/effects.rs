//! What the core asks the world to do, returned instead of done under its
//! lock: items for connection mailboxes, and the change records of
//! persistent sessions for the change log.
//!
//! A caller takes the core's lock, calls it, drops the lock, then applies
//! the [`Effects`]. The change log decides when a change is committed
//! (safe against the loss of a node); a publisher's acknowledgement waits
//! for that. A single node keeps no copy elsewhere, so its log commits at
//! once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::fabric::Fabric;
use crate::message::Message;
use crate::outbox::{Outbox, Outgoing};
use crate::router::NodeId;
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

/// Longest a publisher is held back for one congested subscriber: a
/// consumer that stops reading must slow publishers down, not stop them
/// (after this its queue limit drops the oldest messages instead).
pub const MAX_STALL: std::time::Duration = std::time::Duration::from_millis(100);

/// Work the core has decided on, to be done outside its lock.
#[derive(Debug, Default)]
#[must_use = "effects do nothing until applied (outside the core's lock)"]
pub struct Effects {
    pub(crate) sends: Vec<(Arc<Outbox>, Outgoing)>,
    pub(crate) records: Vec<ChangeRecord>,
    /// Connected subscribers whose queue drained: wake the publishers
    /// held back for them.
    pub(crate) drained: Vec<Arc<tokio::sync::Notify>>,
    /// Set when a delivery found a connected subscriber far behind: the
    /// publisher waits (at most [`MAX_STALL`]) for it to drain. Registered
    /// under the core's lock, so the drain cannot be missed.
    pub(crate) stall: Option<std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>>,
    /// Publishes for peer nodes.
    pub(crate) forwards: Vec<Forward>,
}

/// A publish for one peer node, with the shared groups it is to serve.
#[derive(Debug)]
pub(crate) struct Forward {
    pub(crate) fabric: Arc<dyn Fabric>,
    pub(crate) node: NodeId,
    pub(crate) message: Message,
    pub(crate) groups: Vec<Arc<str>>,
    pub(crate) route: Route,
}

/// How a [`Forward`] reaches its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// The first time: the peer delivers it to every matching session.
    First,
    /// Again, after a peer that was to have it died or refused it: the
    /// peer delivers it only to sessions it has taken over since it first
    /// had the message (it may have had it: forwarded to several peers, a
    /// message is confirmed by each on its own).
    Again,
    /// `node` is gone: the message is held for whoever takes over its
    /// sessions, then forwarded [`Route::Again`] to every interested peer.
    Held,
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
        self.drained.extend(other.drained);
        self.forwards.extend(other.forwards);
        if self.stall.is_none() {
            self.stall = other.stall;
        }
    }

    /// Hands the records to `log` and the items to their mailboxes, and
    /// wakes publishers held back for drained subscribers. The returned
    /// [`Committed`] resolves once the records are committed (and, when a
    /// subscriber was congested, it has drained or [`MAX_STALL`] passed).
    pub fn apply(mut self, log: &dyn ChangeLog) -> Committed {
        let committed = self.append_to(log);
        self.finish(committed)
    }

    /// The first half of [`Effects::apply`]: hands the records to `log`.
    /// Called under the core's lock, so records reach each chain member in
    /// the order they were made: two calls about one session, made one
    /// after the other, must not be appended the other way round (a whole
    /// copy of a session sent after a newer change would undo it).
    pub fn append_to(&mut self, log: &dyn ChangeLog) -> Committed {
        if self.records.is_empty() {
            Committed::now()
        } else {
            log.append(std::mem::take(&mut self.records))
        }
    }

    /// The second half of [`Effects::apply`], after the lock: the items
    /// for the mailboxes (encoding happens here), wake-ups and forwards.
    pub fn finish(self, mut committed: Committed) -> Committed {
        committed.stall = self.stall;
        // Not yet committed (a cluster: the records are on their way down
        // the chains): a QoS 2 PUBLISH waits for them (see
        // `Outbox::push_held`), and what follows it to the same client
        // waits behind it.
        let runtime = if committed.rx.is_empty() {
            None
        } else {
            tokio::runtime::Handle::try_current().ok()
        };
        let hold = runtime.is_some();
        // One gate for the whole batch (its records commit together),
        // made only when something is held.
        let mut gate: Option<Arc<AtomicBool>> = None;
        let mut held: Vec<Arc<Outbox>> = Vec::new();
        for (to, o) in self.sends {
            match o {
                Outgoing::Publish(ref p) if hold && p.qos == mqlb_protocol::QoS::ExactlyOnce => {
                    let g = gate.get_or_insert_with(|| Arc::new(AtomicBool::new(false)));
                    to.push_held(o, g.clone());
                    held.push(to);
                }
                o => to.push(o),
            }
        }
        if let (Some(gate), Some(runtime)) = (gate, runtime) {
            let records = std::mem::take(&mut committed.rx);
            let (tx, rx) = tokio::sync::oneshot::channel();
            runtime.spawn(async move {
                for r in records {
                    let _ = r.await;
                }
                gate.store(true, Ordering::Release);
                for to in held {
                    to.wake();
                }
                let _ = tx.send(());
            });
            committed.rx.push(rx);
        }
        for n in self.drained {
            n.notify_waiters();
        }
        for f in self.forwards {
            let rx = match f.route {
                Route::First => f.fabric.forward(f.node, &f.message, &f.groups, false),
                Route::Again => f.fabric.forward(f.node, &f.message, &f.groups, true),
                Route::Held => f.fabric.hold(f.message, f.groups),
            };
            if let Some(rx) = rx {
                committed.rx.push(rx);
            }
        }
        committed
    }
}

/// Resolves once some change records are committed; a publisher's
/// acknowledgement and its next read wait for it.
#[derive(Debug)]
pub struct Committed {
    rx: Vec<tokio::sync::oneshot::Receiver<()>>,
    stall: Option<std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>>,
}

impl Committed {
    /// Already committed.
    pub fn now() -> Self {
        Self {
            rx: Vec::new(),
            stall: None,
        }
    }

    /// Committed when `rx` fires (or its sender is dropped).
    pub fn when(rx: tokio::sync::oneshot::Receiver<()>) -> Self {
        Self {
            rx: vec![rx],
            stall: None,
        }
    }

    /// True if nothing is left to wait for.
    pub fn is_done(&self) -> bool {
        self.rx.is_empty() && self.stall.is_none()
    }

    /// Waits for the commit, then for a congested subscriber to drain (at
    /// most [`MAX_STALL`]).
    pub async fn wait(self) {
        for rx in self.rx {
            let _ = rx.await;
        }
        if let Some(stall) = self.stall {
            let _ = tokio::time::timeout(MAX_STALL, stall).await;
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
