//! Counters for connections and refusals.
//!
//! Plain atomics, resolved once and incremented on the hot path without a
//! lock or a map lookup. Labels are closed enums, so cardinality is bounded
//! no matter what clients send.

use std::sync::atomic::{AtomicU64, Ordering};

use mqlb_protocol::DecodeError;

/// Why a client connection was closed before reaching a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The first byte was not a CONNECT header (HTTP, garbage).
    NotConnect,
    /// A TLS ClientHello on a plain-MQTT listener (a client configured for
    /// the wrong port).
    TlsOnPlain,
    /// Plain MQTT (anything but a TLS record) on a TLS listener.
    PlainOnTls,
    /// The CONNECT broke the packet grammar.
    Malformed,
    /// The CONNECT broke a protocol rule.
    ProtocolError,
    /// The CONNECT was larger than the configured limit.
    TooLarge,
    /// An unsupported protocol level.
    UnsupportedProtocol,
    /// A protocol name other than `MQTT` / `MQIsdp`.
    InvalidProtocolName,
    /// The CONNECT did not complete within the timeout.
    Timeout,
    /// The client closed or reset before completing its CONNECT.
    ClosedEarly,
    /// No backend accepted a TCP connection.
    NoBackend,
    /// Admission control refused it (a cap was full): see
    /// `mqlb_admission_rejected_total` for which.
    Admission,
    /// No routing rule matched and there is no default pool.
    NoRoute,
    /// A trusted source sent no PROXY header, or a bad one.
    ProxyHeader,
    /// A PROXY header from a source not trusted to send one.
    ProxyUntrusted,
    /// The TLS handshake failed (bad or revoked certificate, unknown SNI
    /// name, no shared cipher suite).
    Tls,
    /// The WebSocket upgrade failed (not HTTP, wrong path or subprotocol,
    /// too large), or a WebSocket client broke the framing rules.
    WebSocket,
}

impl RejectReason {
    /// Every reason, for rendering all counters.
    pub const ALL: [RejectReason; 17] = [
        RejectReason::NotConnect,
        RejectReason::TlsOnPlain,
        RejectReason::PlainOnTls,
        RejectReason::Malformed,
        RejectReason::ProtocolError,
        RejectReason::TooLarge,
        RejectReason::UnsupportedProtocol,
        RejectReason::InvalidProtocolName,
        RejectReason::Timeout,
        RejectReason::ClosedEarly,
        RejectReason::NoBackend,
        RejectReason::Admission,
        RejectReason::NoRoute,
        RejectReason::ProxyHeader,
        RejectReason::ProxyUntrusted,
        RejectReason::Tls,
        RejectReason::WebSocket,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::NotConnect => "not_connect",
            RejectReason::TlsOnPlain => "tls_on_plain",
            RejectReason::PlainOnTls => "plain_on_tls",
            RejectReason::Malformed => "malformed",
            RejectReason::ProtocolError => "protocol_error",
            RejectReason::TooLarge => "too_large",
            RejectReason::UnsupportedProtocol => "unsupported_protocol",
            RejectReason::InvalidProtocolName => "invalid_protocol_name",
            RejectReason::Timeout => "timeout",
            RejectReason::ClosedEarly => "closed_early",
            RejectReason::NoBackend => "no_backend",
            RejectReason::Admission => "admission",
            RejectReason::NoRoute => "no_route",
            RejectReason::ProxyHeader => "proxy_header",
            RejectReason::ProxyUntrusted => "proxy_untrusted",
            RejectReason::Tls => "tls",
            RejectReason::WebSocket => "websocket",
        }
    }

    /// Classifies a codec error on a CONNECT.
    pub fn from_decode(e: &DecodeError) -> Self {
        match e {
            DecodeError::Malformed(_) => RejectReason::Malformed,
            DecodeError::Protocol(_) => RejectReason::ProtocolError,
            DecodeError::TooLarge { .. } => RejectReason::TooLarge,
            DecodeError::UnsupportedProtocolLevel(_) => RejectReason::UnsupportedProtocol,
            DecodeError::InvalidProtocolName => RejectReason::InvalidProtocolName,
            _ => RejectReason::Malformed,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Balancer-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Client connections accepted.
    pub accepted: AtomicU64,
    /// Client connections open now (handshaking or forwarding).
    pub active: AtomicU64,
    /// Client connections handed to a backend.
    pub forwarded: AtomicU64,
    /// TLS listeners whose changed files were re-read and put in service.
    pub tls_reloads: AtomicU64,
    /// TLS listeners whose changed files could not be used (the old
    /// certificate stayed in service).
    pub tls_reload_failures: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
}

impl Metrics {
    /// Counts one refused connection.
    pub fn reject(&self, reason: RejectReason) {
        bump(&self.rejected, reason.index());
    }

    /// Refusals so far for one reason.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        value(&self.rejected, reason.index())
    }

    /// Refusals so far, all reasons.
    pub fn rejected_total(&self) -> u64 {
        RejectReason::ALL.iter().map(|r| self.rejected(*r)).sum()
    }
}

/// Decrements a gauge when dropped, so every exit path of a task counts.
#[derive(Debug)]
pub struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    /// Increments `gauge` now and decrements it on drop.
    pub fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Bytes relayed for one backend's clients, each way: counted as each
/// chunk is written, so a long-lived connection shows its traffic while it
/// lasts (as HAProxy's `bin`/`bout`), not only when it closes.
#[derive(Debug, Default)]
pub struct ByteCounts {
    /// Client to backend.
    pub to_backend: AtomicU64,
    /// Backend to client.
    pub to_client: AtomicU64,
}

pub use mqlb_metrics::{bump, render_process, value, Histogram, BUCKETS};
