//! Why admission refused a client, and the per-backend counts of it: a
//! leaf module, so that a backend (`select`) can hold its counts without
//! `select` and `admission` importing each other.

use std::sync::atomic::AtomicU64;

/// Why a client was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The backend's CONNECT rate.
    BackendRate,
    /// The backend's CONNECTs awaiting CONNACK.
    BackendPending,
    /// The source IP's concurrent connections.
    IpConnections,
    /// The source IP's CONNECT rate.
    IpRate,
}

impl Refusal {
    /// Every reason, for metrics.
    pub const ALL: [Refusal; 4] = [
        Refusal::BackendRate,
        Refusal::BackendPending,
        Refusal::IpConnections,
        Refusal::IpRate,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::BackendRate => "backend_rate",
            Refusal::BackendPending => "backend_pending",
            Refusal::IpConnections => "ip_connections",
            Refusal::IpRate => "ip_rate",
        }
    }

    /// The CONNACK for a client of this version: v5 0x9F for its IP's rate,
    /// 0x89 otherwise; 3.x return code 3.
    pub fn connack(self, v5: bool) -> &'static [u8] {
        match (v5, self) {
            (true, Refusal::IpRate) => &[0x20, 0x03, 0x00, 0x9F, 0x00],
            (true, _) => &[0x20, 0x03, 0x00, 0x89, 0x00],
            (false, _) => &[0x20, 0x02, 0x00, 0x03],
        }
    }
}

/// Refusals counted per reason, on each backend.
#[derive(Debug, Default)]
pub struct Refused([AtomicU64; 4]);

impl Refused {
    /// Counts one.
    pub fn count(&self, r: Refusal) {
        crate::metrics::bump(&self.0, r as usize);
    }

    /// How many for `r`.
    pub fn get(&self, r: Refusal) -> u64 {
        crate::metrics::value(&self.0, r as usize)
    }
}
