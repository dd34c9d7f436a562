//! What the core decides, as plain data: items for connections (by id),
//! entries for the node's ordered change log, wake-ups, and publishes for
//! peers. The shell (the broker's `state` and `effects`) carries them out
//! after the core's lock is released.

use std::sync::Arc;

use crate::message::Message;
use crate::outbox::Outgoing;
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

/// One entry of a node's ordered change log: everything peers (and, later,
/// the disk) must see in the order the core made it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "session records are nearly every entry and were this size before; boxing them would cost an allocation per record"
)]
pub enum LogEntry {
    /// A change to a persistent session, for its chain.
    Session(ChangeRecord),
    /// Local sessions gained (`true`) or lost their last subscription to
    /// `filter` (shared ones by their whole `$share/{group}/{filter}`), for
    /// every peer.
    Interest {
        /// The filter.
        filter: String,
        /// Gained or lost.
        gained: bool,
    },
    /// A retained write (`None` deletes) at `version`, for every peer:
    /// every node keeps every retained message, last writer wins.
    Retained {
        /// The topic.
        topic: String,
        /// The message, or a deletion.
        message: Option<Message>,
        /// Its hybrid-logical-clock version.
        version: crate::hlc::Hlc,
    },
    /// A state store key's new state, decided by its owner in `view` (0 on
    /// a single node): for the key's chain (as a `StoreCopy`) and the disk.
    Store {
        /// The cluster's view when the owner made the change: a chain
        /// member in a newer one refuses it.
        view: u64,
        /// The key's new state.
        copy: Box<mqlb_statestore::store::KeyCopy>,
    },
    /// A read of `key` by its owner in `view`, which changed nothing: the
    /// chain gets a barrier (answered once it has every earlier change),
    /// so a read answers nothing an owner's loss could take back.
    StoreRead {
        /// The key read.
        key: Vec<u8>,
        /// The owner's view, as for [`LogEntry::Store`].
        view: u64,
        /// The key's state, written again to a data directory: the read
        /// answers once it is on disk, and with it everything logged
        /// before (`None` without a data directory, or no such key).
        current: Option<Box<mqlb_statestore::store::KeyCopy>>,
    },
    /// The copy this node keeps of a key another node owns changed (a
    /// peer's `StoreCopy` was installed): for the disk only.
    StoreReplica(Box<mqlb_statestore::store::KeyCopy>),
    /// The copy this node keeps of another node's session changed (the
    /// shell's replication applied these changes): for the disk only.
    Replica {
        /// Client ID.
        client: String,
        /// The holder's epoch.
        epoch: u64,
        /// The changes, in order.
        changes: Vec<SessionChange>,
    },
    /// A session left this node without ending (another node holds it
    /// now): for the disk only, which forgets its copy.
    Evicted(Arc<str>),
}

/// Work the core has decided on, to be done outside its lock.
#[derive(Debug, Default)]
#[must_use = "effects do nothing until applied (outside the core's lock)"]
pub struct Effects {
    /// Items for connections, by the core's connection id.
    pub(crate) sends: Vec<(u64, Outgoing)>,
    pub(crate) records: Vec<LogEntry>,
    /// A subscriber's queue drained, or it went: wake the publishers held
    /// back.
    pub(crate) drained: bool,
    /// Most of the subscribers a publish went to are behind: its publisher
    /// is to be held back (the shell makes the wait).
    pub(crate) wants_stall: bool,
    /// Publishes for peer nodes.
    pub(crate) forwards: Vec<Forward>,
}

/// A publish for one peer node, with the shared groups it is to serve.
#[derive(Debug)]
pub struct Forward {
    /// The peer.
    pub node: NodeId,
    /// The message.
    pub message: Message,
    /// Shared groups the peer serves it to one member of.
    pub groups: Vec<Arc<str>>,
    /// How it goes.
    pub route: Route,
}

/// How a [`Forward`] reaches its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
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
    /// Not routed at all yet: it waits behind its publisher's held
    /// publishes, in the order they came, and is then routed
    /// ([`crate::core::Core::route_deferred`]), so no subscriber gets a
    /// publisher's messages out of order across a takeover.
    Deferred(Deferred),
}

/// How a [`Route::Deferred`] publish is routed when its turn comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferred {
    /// As a publish (`Core::route`); `resent`: a QoS 2 resend whose id its
    /// publisher's session lacked (`Core::route_resent`).
    New {
        /// See above.
        resent: bool,
    },
    /// As a QoS 2 resend whose id a session taken over held
    /// (`Core::qos2_resent`).
    Resent,
}

impl Effects {
    /// Nothing to do.
    pub fn none() -> Self {
        Self::default()
    }

    /// Queues `o` for connection `to`.
    pub(crate) fn send(&mut self, to: u64, o: Outgoing) {
        self.sends.push((to, o));
    }

    /// The session change records, in order.
    pub fn records(&self) -> impl Iterator<Item = &ChangeRecord> {
        self.records.iter().filter_map(|e| match e {
            LogEntry::Session(r) => Some(r),
            _ => None,
        })
    }

    /// Everything for the ordered log, in order.
    pub fn log_entries(&self) -> &[LogEntry] {
        &self.records
    }

    /// Whether the call asks for its publisher to be held back: most of
    /// the subscribers it fed are behind (the shell registers the wait
    /// before it releases the core's lock).
    pub fn wants_stall(&self) -> bool {
        self.wants_stall
    }

    /// Adds another call's effects after these.
    pub fn extend(&mut self, other: Effects) {
        self.sends.extend(other.sends);
        self.records.extend(other.records);
        self.drained |= other.drained;
        self.wants_stall |= other.wants_stall;
        self.forwards.extend(other.forwards);
    }

    /// Adds an entry made outside the core (a state store change) to the
    /// log, after the core's own.
    pub fn log(&mut self, entry: LogEntry) {
        self.records.push(entry);
    }

    /// Takes the log entries out, for the node's ordered log.
    pub fn take_records(&mut self) -> Vec<LogEntry> {
        std::mem::take(&mut self.records)
    }

    /// Takes the items for connections out (the shell looks their
    /// mailboxes up while it still holds the core's lock).
    pub fn take_sends(&mut self) -> Vec<(u64, Outgoing)> {
        std::mem::take(&mut self.sends)
    }

    /// Everything else, for the shell to carry out.
    pub fn into_parts(self) -> Parts {
        Parts {
            sends: self.sends,
            records: self.records,
            drained: self.drained,
            forwards: self.forwards,
        }
    }
}

/// [`Effects`] taken apart by the shell that carries them out.
#[derive(Debug)]
pub struct Parts {
    /// Items for connections, by the core's connection id, in order.
    pub sends: Vec<(u64, Outgoing)>,
    /// Log entries not taken yet.
    pub records: Vec<LogEntry>,
    /// A subscriber drained or went: wake held-back publishers.
    pub drained: bool,
    /// Publishes for peer nodes.
    pub forwards: Vec<Forward>,
}
