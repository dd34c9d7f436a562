//! The bundled MQTT broker.
//!
//! # Layout
//! * [`trie`]: the subscription trie.
//! * [`core`]: sessions, subscriptions, retained messages, and `route`, the
//!   one function every publish goes through.
//! * [`conn`]: one client connection: CONNECT, packets, keep-alive, will.
//! * [`server`]: the listener and session expiry.
//!
//! Status: a single-node core (issue #4 is in progress). Shared
//! subscriptions, authentication and ACLs, topic aliases, message expiry,
//! Maximum Packet Size, `$SYS` and metrics are not built yet.

#![forbid(unsafe_code)]

pub mod conn;
pub mod core;
pub mod server;
pub mod trie;

pub use server::Broker;
pub mod auth;
pub mod snapshot;
pub mod sys;
