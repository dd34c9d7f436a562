//! The bundled broker's core: one node's MQTT state machine, as plain data
//! in and plain data out (the quinn-proto / rustls shape).
//!
//! Inputs are calls: a packet's meaning from a connection (connect,
//! subscribe, publish, acknowledge), a peer's forwarded publish or
//! interest, a timer (`expire_sessions`, `publish_due_wills`), the time
//! ([`core::Core::advance`]) and which peers are reachable
//! ([`core::Core::set_reachable`]). Outputs are [`effects::Effects`]: items
//! for connections by id, entries for the node's ordered change log,
//! wake-ups and publishes for peers. The core holds no handle to a
//! connection, a peer or a runtime, reads no clock and spawns nothing: this
//! crate does not depend on tokio. The broker crate is its shell.
//!
//! # Layout
//! * [`core`]: the state machine.
//! * [`chain`]: which nodes keep a session's copies.
//! * [`commits`]: what a change waits for before it counts as committed.
//! * [`session`]: one session as data, changed only by typed
//!   [`session::SessionChange`] records, which the cluster replicates.
//! * [`router`]: the subscription trie plus shared groups.
//! * [`retained`]: retained messages in their own trie, versioned by a
//!   hybrid logical clock ([`hlc`]) for last-writer-wins replication.
//! * [`trie`]: the filter trie; every walk iterative.
//! * [`message`]: a message as routed.
//! * [`snapshot`]: session export and import.
//! * [`effects`]: what the core returns.
//! * [`first_had`]: when this node first had a message given it again.
//! * [`hashing`]: the maps' hasher (fixed-seeded for the simulator).
//! * [`log`]: the ordered change log's numbering.
//! * [`mutations`]: test-only switches that put fixed bugs back.
//! * [`replicas`]: the copies a node keeps of other nodes' sessions.
//! * [`outbox`]: the per-connection mailbox and encoder (data and a
//!   waker, no runtime).

#![forbid(unsafe_code)]

pub mod chain;
pub mod commits;
pub mod core;
pub mod effects;
pub mod first_had;
pub mod hashing;
pub mod held;
pub mod hlc;
pub mod log;
pub mod message;
pub mod mutations;
pub mod outbox;
pub mod promotions;
pub mod replicas;
pub mod retained;
pub mod router;
pub mod session;
pub mod snapshot;
pub mod trie;
