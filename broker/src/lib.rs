//! The bundled MQTT broker (one node; the cluster layer builds on it).
//!
//! # Layout
//! * [`trie`]: the subscription trie: a publish costs O(depth + matches).
//! * [`core`]: sessions, subscriptions, shared groups, retained messages,
//!   and `route`, the one function every publish goes through.
//! * [`conn`]: one client connection: CONNECT, the packet loop,
//!   keep-alive, topic aliases, the will.
//! * [`auth`]: Mosquitto-compatible password files and topic ACLs.
//! * [`snapshot`]: session export/import for replication.
//! * [`sys`]: `$SYS` topics and Prometheus metrics.
//! * [`server`]: the listener and housekeeping (session expiry, `$SYS`).
//!
//! State sits behind one mutex that is never held across an await; it is
//! the simplest correct design for a single node, and the benchmark against
//! Mosquitto shows it is not the bottleneck yet.
//!
//! Dependencies: tokio, tokio-util, tracing, our protocol and config crates;
//! sha2 + pbkdf2 + base64 (pure-Rust RustCrypto, to verify Mosquitto's
//! `$6$`/`$7$` password hashes without a C toolchain), getrandom (salts for
//! `mqlb passwd`), fastrand (shutdown pacing jitter), thiserror.

#![forbid(unsafe_code)]

pub mod auth;
pub mod conn;
pub mod core;
pub mod server;
pub mod snapshot;
pub mod sys;
pub mod trie;

pub use server::Broker;
