//! The bundled MQTT broker (one node; the cluster layer builds on it).
//!
//! # Layout
//! The core is its own crate, `mqlb-broker-core` (plain data in and out, no
//! tokio); its modules are re-exported here under their names: [`core`],
//! [`session`], [`router`], [`retained`], [`hlc`], [`trie`], [`message`],
//! [`snapshot`], [`outbox`]. This crate is its shell:
//! * [`state`]: the lock around the core, the time it is given, the ordered
//!   change log, the connections' mailboxes; applies effects after the lock.
//! * [`effects`]: carrying out what the core returns (commits, QoS 2 gates,
//!   wake-ups, forwards) and the change-log seam.
//! * [`node`]: one node: its state and, in a cluster, its membership.
//! * [`fabric`]: forwarded publishes for peers; [`cluster`] implements it.
//! * [`conn`]: one client connection, the network side only.
//! * [`front`]: a listener's front (PROXY, TLS, WebSocket).
//! * [`auth`]: Mosquitto-compatible password files and topic ACLs.
//! * [`statestore`]: the state store served over MQTT.
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

pub use mqlb_broker_core::{
    chain, commits, core, held, hlc, message, outbox, promotions, replicas, retained, router,
    session, snapshot, trie,
};

pub mod auth;
pub mod cluster;
pub mod conn;
pub mod durable;
pub mod effects;
pub mod fabric;
pub mod front;
pub mod node;
pub mod server;
pub mod state;
pub mod statestore;
pub mod sys;

pub use server::Broker;
