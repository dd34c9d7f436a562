//! The bundled MQTT broker (one node; the cluster layer builds on it).
//!
//! # Layout
//! * [`core`]: the state machine. Takes an input (a packet's meaning, a
//!   timer, an import) and returns [`effects::Effects`] instead of doing I/O
//!   under its lock (the quinn-proto shape).
//! * [`session`]: one session as data, changed only by typed
//!   [`session::SessionChange`] records, which the cluster replicates.
//! * [`router`]: the subscription trie plus shared groups, keyed by
//!   [`router::Subscriber`].
//! * [`retained`]: retained messages in their own trie, versioned by a
//!   hybrid logical clock ([`hlc`]) for last-writer-wins replication.
//! * [`trie`]: the filter trie; every walk iterative.
//! * [`effects`]: what the core returns, and the change-log seam.
//! * [`fabric`]: what the core tells peer nodes (interest, retained
//!   writes, forwarded publishes); [`cluster`] implements it.
//! * [`outbox`]: the per-connection mailbox and encoder.
//! * [`state`]: the lock around the core; applies effects after it.
//! * [`node`]: one node: its state and, in a cluster, its membership.
//! * [`conn`]: one client connection, the network side only.
//! * [`auth`]: Mosquitto-compatible password files and topic ACLs.
//! * [`snapshot`]: session export/import for replication.
//! * [`sys`]: `$SYS` topics and Prometheus metrics.
//! * [`server`]: the listener, housekeeping, graceful shutdown.
//!
//! The core sits behind one mutex; what may happen under it, and in which
//! order locks are taken, is written in [`state`] (the locking contract).
//!
//! Dependencies: tokio, tokio-util, tracing, our protocol and config crates;
//! sha2 + pbkdf2 + base64 (pure-Rust RustCrypto, to verify Mosquitto's
//! `$6$`/`$7$` password hashes without a C toolchain), getrandom (salts for
//! `mqlb passwd`), fastrand (shutdown pacing jitter), thiserror.

#![forbid(unsafe_code)]

pub mod auth;
pub mod cluster;
pub mod conn;
pub mod core;
pub mod effects;
pub mod fabric;
pub mod front;
pub mod hlc;
pub mod message;
pub mod node;
pub mod outbox;
pub mod retained;
pub mod router;
pub mod server;
pub mod session;
pub mod snapshot;
pub mod state;
pub mod statestore;
pub mod sys;
pub mod trie;

pub use server::Broker;
