//! The state store's core, without I/O: what a request payload means, and
//! what executing it does to the keys.
//!
//! The protocol is the Azure IoT Operations state store protocol (the
//! official Rust SDK, `azure_iot_operations_services`, is its executable
//! definition): RESP3 arrays of bulk strings (`SET`, `GET`, `DEL`, `VDEL`,
//! `KEYNOTIFY`) carried in MQTT 5 requests, RESP3 replies, hybrid logical
//! clock versions and fencing tokens. The broker feeds requests in and
//! publishes what comes out (the reply, and change notifications for the
//! clients watching a key).
//!
//! Modules:
//! * [`resp3`]: parsing requests strictly (bounded counts and lengths, no
//!   trailing bytes) and encoding replies;
//! * [`hlc`]: the hybrid logical clock timestamps versions and fencing
//!   tokens are made of;
//! * [`store`]: the keys, their versions, fencing, expiry, limits and
//!   watchers.
//!
//! The MQTT side (topics, user properties, correlation data, ACLs) is the
//! broker's (`mqlb_broker::statestore`), and so is replication across a
//! cluster, which this crate supports with per-key revisions and whole-key
//! copies ([`store::KeyCopy`]).

pub mod hlc;
pub mod resp3;
pub mod store;
