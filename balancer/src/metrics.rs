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

/// Adds one to counter `i` of a family kept as an array indexed by an
/// enum's discriminant (an index out of range counts nothing: it cannot
/// happen for a total enum, and a panic would cost a connection).
pub(crate) fn bump(counters: &[AtomicU64], i: usize) {
    if let Some(c) = counters.get(i) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counter `i` of such a family.
pub(crate) fn value(counters: &[AtomicU64], i: usize) -> u64 {
    counters.get(i).map_or(0, |c| c.load(Ordering::Relaxed))
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

/// Bucket upper bounds, in seconds: 50 µs to 5 s, for RTTs and latencies.
pub const BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// A fixed-bucket latency histogram with lock-free recording.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            bump(&self.buckets, i);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends Prometheus text for this histogram with the given labels.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        use std::fmt::Write;
        let mut cumulative = 0;
        for (b, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// The standard `process_*` metrics (CPU, resident memory, open and maximum
/// file descriptors, start time), as Prometheus's client libraries name
/// them, read from `/proc/self`: what an operator graphs next to the
/// connection counts. Nothing is written where `/proc` cannot be read.
pub fn render_process(o: &mut String) {
    use std::fmt::Write as _;
    // Linux reports times in clock ticks and memory in pages: 100 Hz and
    // 4 KiB on every platform mqlb is built for.
    const TICKS: f64 = 100.0;
    const PAGE: u64 = 4096;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold
    // spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n).and_then(|f| f.parse::<u64>().ok());
    // utime, stime, starttime, rss: fields 14, 15, 22, 24 of stat(5), so
    // 11, 12, 19, 21 after the name.
    if let (Some(user), Some(system)) = (field(11), field(12)) {
        let _ = write!(
            o,
            "# HELP process_cpu_seconds_total User and system CPU time spent.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}\n",
            (user + system) as f64 / TICKS
        );
    }
    if let Some(rss) = field(21) {
        let _ = write!(
            o,
            "# HELP process_resident_memory_bytes Resident memory.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}\n",
            rss * PAGE
        );
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines().find_map(|l| {
            l.strip_prefix("btime ")
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
    });
    if let (Some(boot), Some(start)) = (boot, field(19)) {
        let _ = write!(
            o,
            "# HELP process_start_time_seconds Start time since the Unix epoch.\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {}\n",
            boot as f64 + start as f64 / TICKS
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = write!(
            o,
            "# HELP process_open_fds Open file descriptors.\n# TYPE process_open_fds gauge\nprocess_open_fds {}\n",
            fds.count()
        );
    }
    if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        let _ = write!(
            o,
            "# HELP process_max_fds The open-file limit.\n# TYPE process_max_fds gauge\nprocess_max_fds {soft}\n"
        );
    }
}
