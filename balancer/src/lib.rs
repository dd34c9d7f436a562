//! mqlb, the MQTT-aware layer-4 load balancer.
//!
//! # Layout
//! * [`cli`]: command-line parsing and the process entry point.
//! * [`server`]: binds listeners and runs the accept loop (a permit per
//!   connection, a tracing span per connection, errors never stop the loop).
//! * [`handshake`]: reads the client's CONNECT under a deadline and a size
//!   cap, and answers refusals the way a strict broker would.
//! * [`select`]: the backend set and placement by client ID.
//! * [`forward`]: connects to the chosen backend and splices bytes both ways,
//!   tracking packet boundaries on the backend→client side.
//! * [`metrics`]: counters the admin API exposes.
//!
//! A connection's life: accept → read CONNECT → place → connect backend →
//! write the buffered CONNECT → forward both ways → close. No backend
//! connection is opened before a valid CONNECT has arrived.
//!
//! Dependencies: tokio (runtime), tokio-util (`CancellationToken` for
//! shutdown), tracing, arc-swap (lock-free backend snapshots the data path
//! reads while health or reload writes), clap (the CLI operators expect,
//! with `--help`), and our own protocol, placement and config crates.

#![forbid(unsafe_code)]

pub mod cli;
pub mod forward;
pub mod handshake;
pub mod metrics;
pub mod select;
pub mod server;

pub use server::Balancer;
