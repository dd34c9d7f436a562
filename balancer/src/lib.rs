//! mqlb, the MQTT-aware layer-4 load balancer, as a library: the `mqlb`
//! application crate runs it (and the bundled broker, which this crate
//! does not depend on).
//!
//! # Layout
//! * [`shared`]: the state connections, the admin API and health share.
//! * [`server`]: binds listeners and runs the accept loop (a permit per
//!   connection, a tracing span per connection, errors never stop the loop).
//! * [`handshake`]: reads the client's CONNECT under a deadline and a size
//!   cap, and answers refusals the way a strict broker would.
//! * [`select`]: the backend set and placement by client ID.
//! * [`admission`]: caps that shape reconnect storms (per backend, per IP).
//! * [`bufpool`]: read buffers lent only while bytes move.
//! * [`forward`]: connects to the chosen backend and splices bytes both ways,
//!   tracking packet boundaries on the backend→client side.
//! * [`journal`]: recent events and per-backend history for the console.
//! * [`console`]: the status page on the admin port.
//! * [`metrics`]: counters and histograms the admin API exposes.
//! * [`refusal`]: why admission refused a client, counted per backend.
//! * [`registry`]: live connections, by backend and client ID.
//! * [`limit`]: the concurrent-connection cap, resizable on reload.
//! * [`fdlimit`]: raises the open-file limit and checks it against the config.
//! * [`discovery`]: pools whose backends come from DNS (A/AAAA, SRV).
//! * [`clusterview`]: follows an mqlb cluster's view for backends that are its nodes.
//! * [`nodeview`]: what such a node says of itself, kept per backend.
//! * [`evict`]: paced closing of a failed or drained backend's clients.
//! * [`admin`]: the admin HTTP API (health, backends, clients, metrics, drain).
//! * [`http`]: the small HTTP/1 server and access checks every admin API uses.
//!
//! A connection's life: accept → read CONNECT → place → connect backend →
//! write the buffered CONNECT → forward both ways → close. No backend
//! connection is opened before a valid CONNECT has arrived.
//!
//! Dependencies: tokio (runtime), tokio-util (`CancellationToken` for
//! shutdown), tracing, arc-swap (lock-free backend snapshots the data path
//! reads while health or reload writes), clap (the CLI operators expect,
//! with `--help`), hyper (admin API: HTTP/1 only, no TLS, small), serde_json
//! (admin JSON), fastrand (jitter), rlimit (safe setrlimit), nix (the
//! IP_BIND_ADDRESS_NO_PORT socket option for source addresses, without
//! `unsafe` here), hickory-resolver (async, caching DNS for discovery and
//! backend host names), subtle (constant-time token comparison), and our
//! own protocol, placement, config, listener, healthcheck and metrics
//! crates (see `mqlb-metrics` for why not a metrics framework).

#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod bufpool;
pub mod clusterview;
pub mod console;
pub mod discovery;
pub mod evict;
pub mod fdlimit;
pub mod forward;
pub mod handshake;
pub mod http;
pub mod journal;
pub mod limit;
pub mod metrics;
pub mod nodeview;
pub mod refusal;
pub mod registry;
pub mod select;
pub mod server;
pub mod shared;
pub mod ws;

pub use server::Balancer;
