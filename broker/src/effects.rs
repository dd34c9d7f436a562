//! What the core asks the world to do, returned instead of done under its
//! lock: items for connection mailboxes, and the change records of
//! persistent sessions for the change log.
//!
//! A caller takes the core's lock, calls it, hands the change records to
//! the log while still holding it (see the locking contract in
//! [`crate::state`]), drops the lock, then applies the rest of the
//! [`Effects`]. The change log decides when a change is committed
//! (safe against the loss of a node); a publisher's acknowledgement waits
//! for that. A single node keeps no copy elsewhere, so its log commits at
//! once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::fabric::Fabric;
use crate::outbox::{Outbox, Outgoing};
pub use mqlb_broker_core::effects::{
    ChangeRecord, Deferred, Effects, Forward, LogEntry, Parts, Route,
};

/// Longest a publisher's reads are held back at once when most of the
/// subscribers it feeds are behind (see `Core::route`): flow control slows
/// publishers down, never stops them.
pub const MAX_STALL: std::time::Duration = std::time::Duration::from_millis(100);

/// Longest any wait for a commit lasts: past it the change counts as not
/// committed, and whoever waited is told (a publisher's connection is
/// closed unacknowledged). Longer than the worst legitimate wait: a hung
/// peer is detected in 3 s, and a publish held for a dead node's sessions
/// is routed again within 6 s.
pub const COMMIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15);

/// Why a change was not committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotCommitted {
    /// Not within [`COMMIT_DEADLINE`].
    Timeout,
    /// The log gave up on it: whatever was to confirm it went away first
    /// (a shutdown, a failed re-route).
    Lost,
}

impl NotCommitted {
    /// Every reason, for exporters.
    pub const ALL: [NotCommitted; 2] = [NotCommitted::Timeout, NotCommitted::Lost];

    /// A fixed label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            NotCommitted::Timeout => "timeout",
            NotCommitted::Lost => "lost",
        }
    }
}

/// A publisher's next read waits for this (at most [`MAX_STALL`]): most of
/// the subscribers it feeds are behind, so the node as a whole cannot keep
/// up with it. Registered under the core's lock, so a drain cannot be
/// missed.
#[derive(Debug)]
pub struct Stall(std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>);

impl Stall {
    /// A stall until `drained` is notified, registered now.
    pub(crate) fn on(drained: &Arc<tokio::sync::Notify>) -> Self {
        let mut wait = Box::pin(drained.clone().notified_owned());
        wait.as_mut().enable();
        Self(wait)
    }

    /// Waits for a subscriber to drain, or [`MAX_STALL`].
    pub async fn wait(self) {
        let _ = tokio::time::timeout(MAX_STALL, self.0).await;
    }
}

/// Hands the records to `log` and the items to their mailboxes, and wakes
/// publishers held back for drained subscribers (a single node's calls, and
/// tests). The returned [`Committed`] resolves once the records are
/// committed.
pub fn apply(mut fx: Effects, log: &dyn ChangeLog, mailboxes: &dyn Mailboxes) -> Committed {
    let committed = append_to(&mut fx, log);
    let sends = mailboxes.resolve(fx.take_sends());
    finish(fx, sends, None, committed, &Arc::default(), None)
}

/// The first half of [`apply`]: hands the records to `log` (as batch 0:
/// for a log no one else writes to).
pub fn append_to(fx: &mut Effects, log: &dyn ChangeLog) -> Committed {
    let records = fx.take_records();
    if records.is_empty() {
        Committed::now()
    } else {
        log.append(0, records)
    }
}

/// The second half of [`apply`], after the lock: `sends`, the items with
/// their mailboxes (looked up under the lock; encoding happens here),
/// wake-ups of the publishers waiting on `drained`, and forwards to
/// `fabric` (the node's peers, in a cluster). `stall` is the publisher's,
/// if the call asked for one.
pub fn finish(
    fx: Effects,
    sends: Vec<(Arc<Outbox>, Outgoing)>,
    stall: Option<Stall>,
    mut committed: Committed,
    drained: &tokio::sync::Notify,
    fabric: Option<&dyn Fabric>,
) -> Committed {
    let fx = fx.into_parts();
    committed.stall = stall;
    // Not yet committed (a cluster: the records are on their way down
    // the chains): a QoS 2 PUBLISH waits for them (see
    // `Outbox::push_held`), and what follows it to the same client
    // waits behind it.
    let hold = !committed.rx.is_empty();
    // One gate for the whole batch (its records commit together),
    // made only when something is held.
    let mut gate: Option<Arc<AtomicBool>> = None;
    let mut held: Vec<Arc<Outbox>> = Vec::new();
    for (to, o) in sends {
        match o {
            Outgoing::Publish(ref p) if hold && p.qos == mqlb_protocol::QoS::ExactlyOnce => {
                let g = gate.get_or_insert_with(|| Arc::new(AtomicBool::new(false)));
                to.push_held(o, g.clone());
                held.push(to);
            }
            o => to.push(o),
        }
    }
    // The wait for the commit runs on the runtime this is called from.
    // There is none only when a caller outside one hands the core a log
    // that does not commit at once: the held deliveries then cannot be
    // released, and their connections are closed, never sent unheld.
    let runtime = gate
        .as_ref()
        .and_then(|_| tokio::runtime::Handle::try_current().ok());
    if let (Some(_), None) = (&gate, &runtime) {
        tracing::error!(
            "QoS 2 deliveries wait for a commit outside a runtime; closing their connections"
        );
        for to in std::mem::take(&mut held) {
            to.abort_held(crate::outbox::Closing::NotCommitted);
        }
    }
    if let (Some(gate), Some(runtime)) = (gate, runtime) {
        let records = Committed {
            rx: std::mem::take(&mut committed.rx),
            stall: None,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        runtime.spawn(async move {
            match records.wait().await {
                Ok(()) => {
                    gate.store(true, Ordering::Release);
                    for to in held {
                        to.wake();
                    }
                    let _ = tx.send(());
                }
                Err(e) => {
                    // Not on the replica: sending it could let a node
                    // taking over send it again under another packet
                    // identifier. The connections close instead, and
                    // their clients get it from the session (which
                    // holds it) when they come back.
                    tracing::warn!(
                        reason = e.label(),
                        "a QoS 2 delivery's record was not committed; closing its connections"
                    );
                    for to in held {
                        to.abort_held(crate::outbox::Closing::NotCommitted);
                    }
                }
            }
        });
        committed.rx.push(rx);
    }
    if fx.drained {
        drained.notify_waiters();
    }
    for f in fx.forwards {
        let Some(fabric) = fabric else {
            break;
        };
        let rx = match f.route {
            Route::First => fabric.forward(f.node, &f.message, &f.groups, false),
            Route::Again => fabric.forward(f.node, &f.message, &f.groups, true),
            Route::Held => fabric.hold(f.message, f.groups),
            Route::Deferred(how) => fabric.defer(f.message, how),
        };
        if let Some(rx) = rx {
            committed.rx.push(rx);
        }
    }
    committed
}

/// Where the shell keeps each connection's mailbox, by the core's
/// connection id.
pub trait Mailboxes {
    /// The mailboxes of `sends`' connections, in order; items for
    /// connections that are gone are dropped.
    fn resolve(&self, sends: Vec<(u64, Outgoing)>) -> Vec<(Arc<Outbox>, Outgoing)>;
}

/// Resolves once some change records are committed; a publisher's
/// acknowledgement waits for it. A confirmation is a `()` sent on one of
/// its channels; a channel dropped unsent means the change was not
/// committed, never that it was.
#[derive(Debug)]
pub struct Committed {
    rx: Vec<tokio::sync::oneshot::Receiver<()>>,
    stall: Option<Stall>,
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

    /// True if nothing is left to wait for (a [`Stall`] aside).
    pub fn is_done(&self) -> bool {
        self.rx.is_empty()
    }

    /// The publisher's [`Stall`], if the publish went mostly to
    /// subscribers that are behind.
    pub fn take_stall(&mut self) -> Option<Stall> {
        self.stall.take()
    }

    /// Never committed: whatever was to confirm it went away.
    pub fn lost() -> Self {
        let (_, rx) = tokio::sync::oneshot::channel();
        Self::when(rx)
    }

    /// Adds `other`'s waits to these.
    pub fn merge(&mut self, other: Committed) {
        self.rx.extend(other.rx);
        if self.stall.is_none() {
            self.stall = other.stall;
        }
    }

    /// Waits for the commit, at most [`COMMIT_DEADLINE`].
    pub async fn wait(self) -> Result<(), NotCommitted> {
        let all = async {
            for rx in self.rx {
                rx.await.map_err(|_| NotCommitted::Lost)?;
            }
            Ok(())
        };
        tokio::time::timeout(COMMIT_DEADLINE, all)
            .await
            .unwrap_or(Err(NotCommitted::Timeout))
    }
}

/// Where session change records go: the seam the cluster's replication
/// plugs into.
///
/// A node's records are numbered in batches under the core's lock, in the
/// order the core made them, and handed to the log in that order, one batch
/// at a time, after the lock is released (see `State`'s ordered log).
pub trait ChangeLog: Send + Sync + std::fmt::Debug {
    /// Takes batch `seq` (each greater than the last); the result resolves
    /// once its entries are committed.
    fn append(&self, seq: u64, entries: Vec<LogEntry>) -> Committed;
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
    fn append(&self, _seq: u64, entries: Vec<LogEntry>) -> Committed {
        let sessions = entries
            .iter()
            .filter(|e| matches!(e, LogEntry::Session(_)))
            .count();
        self.appended.fetch_add(sessions as u64, Ordering::Relaxed);
        Committed::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Core;
    use crate::message::{Message, Sub};
    use mqlb_protocol::{MqttStr, Packet, ProtocolVersion, QoS, SubscriptionOptions};
    use std::time::{Duration, Instant};

    /// One connection's mailbox.
    struct One(u64, Arc<Outbox>);

    impl Mailboxes for One {
        fn resolve(&self, sends: Vec<(u64, Outgoing)>) -> Vec<(Arc<Outbox>, Outgoing)> {
            sends
                .into_iter()
                .filter(|(c, _)| *c == self.0)
                .map(|(_, o)| (self.1.clone(), o))
                .collect()
        }
    }

    /// A QoS 2 delivery whose record is not committed yet is held; handed
    /// over outside any runtime (nothing could wait for the commit), it is
    /// never sent unheld: its connection is closed instead.
    #[test]
    fn an_uncommitted_qos2_delivery_outside_a_runtime_closes_its_connection() {
        let mut core = Core::new();
        let mailbox = Arc::new(Outbox::default());
        let (connected, _) = core.connect(
            "sub",
            false,
            Some(Duration::from_secs(600)),
            10,
            mailbox.gauge(),
        );
        let sub = Sub {
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                ..Default::default()
            },
            id: None,
        };
        let _ = core.subscribe("sub", "q/#", sub);
        let _ = mailbox.take();
        let fx = core.route(Message {
            topic: MqttStr::try_from("q/1").unwrap_or_default(),
            payload: bytes::Bytes::from_static(b"once"),
            qos: QoS::ExactlyOnce,
            retain: false,
            properties: Arc::default(),
            origin: None,
            received: Instant::now(),
        });
        let (_never, pending) = tokio::sync::oneshot::channel::<()>();
        let mut fx = fx;
        let sends = One(connected.conn, mailbox.clone()).resolve(fx.take_sends());
        let _ = finish(
            fx,
            sends,
            None,
            Committed::when(pending),
            &tokio::sync::Notify::new(),
            None,
        );
        assert!(mailbox.is_closing(), "the connection should close");
        let taken = mailbox.take();
        let mut buf = bytes::BytesMut::from(&taken.bytes[..]);
        while let Ok(Some(p)) = mqlb_protocol::decode(&mut buf, ProtocolVersion::V5, 1 << 20) {
            assert!(
                !matches!(p, Packet::Publish(_)),
                "a QoS 2 PUBLISH went out before its record was committed"
            );
        }
    }
}
