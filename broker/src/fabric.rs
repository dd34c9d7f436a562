//! The seam between one node's shell and its peers for what is not a log
//! entry: forwarded publishes, which the core returns as effects and the
//! node's state hands over here after the core's lock is released. Interest
//! and retained writes are entries of the node's ordered change log
//! ([`crate::effects::LogEntry`]); which peers are reachable is told to the
//! core as data (`Core::set_reachable`). A single node has no fabric;
//! `cluster` implements it.

use std::sync::Arc;

use crate::message::Message;
use crate::router::NodeId;

/// What the core tells its peers.
pub trait Fabric: Send + Sync + std::fmt::Debug {
    /// Hands `m` to peer `node`, which delivers it to its matching local
    /// sessions and, for each of `groups`, to one local member. For QoS 1
    /// and 2 the result resolves once the peer has committed it (the
    /// publisher's acknowledgement waits for that). `again`: a re-forward,
    /// which the peer gives only to the sessions it has taken over since it
    /// first had `m` (a peer's confirmation is its own: when another peer
    /// dies or refuses, this one may have had the message already).
    fn forward(
        &self,
        node: NodeId,
        m: &Message,
        groups: &[Arc<str>],
        again: bool,
    ) -> Option<tokio::sync::oneshot::Receiver<()>>;
    /// `m` matched sessions of a peer that is gone: hold it until their new
    /// holder has announced them, then forward it again to the interested
    /// peers (those given it already deliver it only to sessions taken over
    /// since). Resolves once they have committed it.
    fn hold(&self, m: Message, groups: Vec<Arc<str>>)
        -> Option<tokio::sync::oneshot::Receiver<()>>;
    /// `m` waits behind its publisher's held publishes: routed as new
    /// (`Core::route_deferred`) once none of them is held any more, so
    /// a session promoted meanwhile gets them in order. Resolves once that
    /// routing has committed.
    fn defer(
        &self,
        m: Message,
        how: mqlb_broker_core::effects::Deferred,
    ) -> Option<tokio::sync::oneshot::Receiver<()>>;
}
