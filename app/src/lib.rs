//! The `mqlb` application: the command line, the demo, and what joins the
//! libraries into one program. The balancer (`mqlb-balancer`) and the
//! broker (`mqlb-broker`) are libraries that do not depend on each other;
//! this crate runs either, and serves a broker node's admin API with the
//! HTTP server and console the balancer library provides.
//!
//! # Layout
//! * [`cli`]: command-line parsing and the process entry point.
//! * [`run`]: running a balancer until a signal stops it (the CLI's and the demo's).
//! * [`node_admin`]: a broker node's admin API and console.
//! * [`demo`]: `mqlb demo`, the balancer in front of a 3-node cluster.
//! * [`sidecar`]: `mqlb healthcheck`, an HTTP health endpoint backed by MQTT probes.
//! * [`cert`]: `mqlb cert`, a cluster's CA and node certificates (rcgen).
//!
//! Dependencies beyond the libraries: clap (the CLI operators expect, with
//! `--help`), tracing-subscriber (text or JSON logs), rcgen, x509-parser,
//! rustls-pki-types and time (certificates without openssl), getrandom
//! (the demo's admin token), nix (the demo's process group), hyper and
//! serde_json (the node admin API's answers).

#![forbid(unsafe_code)]

pub mod cert;
pub mod cli;
pub mod demo;
pub mod node_admin;
pub mod run;
pub mod sidecar;
