//! MQTT-level health checks: a broker is healthy when it serves MQTT, not
//! when it accepts TCP. A SIGSTOPped broker still completes TCP handshakes
//! (the kernel does it), and a wedged router thread leaves the port open;
//! only a probe that waits for CONNACK and PINGRESP catches those.
//!
//! # Layout
//! * [`mod@probe`]: one probe: TCP connect, CONNECT, CONNACK (classified by
//!   reason code), PINGREQ/PINGRESP round trip, optional subscribe/publish
//!   round trip, DISCONNECT; every step under a timeout.
//! * [`state`]: the rise/fall state machine, with misconfiguration (bad
//!   credentials, not authorized) reported apart from "down".
//! * [`checker`]: one task per target that probes on an interval with
//!   start-up jitter, folds in passive signals from the data path, and
//!   publishes the state lock-free ([`checker::HealthCell`]).
//!
//! Dependencies: tokio, tokio-util (cancellation), arc-swap (the report the
//! admin API reads), fastrand (jitter; tiny, no dependencies), tracing, and
//! our protocol crate for the wire format.

#![forbid(unsafe_code)]

pub mod checker;
pub mod probe;
pub mod state;
pub mod tls;

pub use checker::{CheckSettings, Checker, HealthCell, Observer, Report, Target};
pub use probe::{probe, Failure, Outcome, ProbeSpec, Rtts};
pub use state::{HealthState, Thresholds, Tracker, Transition};
