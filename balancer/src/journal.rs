//! What the console shows over time, kept in memory and bounded: the recent
//! health transitions, drains and session moves (a ring of [`EVENTS`]), and
//! samples one a second for the last [`SAMPLES`] seconds: per backend its
//! connections, probe RTT and counters of connections and bytes, and for
//! the whole balancer its accepted and refused connections. The console
//! turns successive counters into rates.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::select::Backend;

/// Events kept.
pub const EVENTS: usize = 200;
/// Samples kept per backend (five minutes at one a second).
pub const SAMPLES: usize = 300;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Debug, Clone)]
struct Event {
    at_ms: u64,
    kind: &'static str,
    backend: String,
    detail: String,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ms: u64,
    connections: u64,
    rtt_ms: Option<f64>,
    forwarded: u64,
    bytes_to_backend: u64,
    bytes_to_client: u64,
}

/// The balancer's totals at one instant.
#[derive(Debug, Clone, Copy)]
struct Totals {
    at_ms: u64,
    accepted: u64,
    refused: u64,
    active: u64,
}

/// The console's memory.
#[derive(Debug, Default)]
pub struct Journal {
    events: Mutex<VecDeque<Event>>,
    history: Mutex<HashMap<String, VecDeque<Sample>>>,
    totals: Mutex<Totaled>,
}

#[derive(Debug, Default)]
struct Totaled {
    ring: VecDeque<Totals>,
    /// The most connections accepted in one sampled second since start.
    max_accept_rate: f64,
}

impl Journal {
    /// Records an event; the oldest goes when the ring is full.
    pub fn record(&self, kind: &'static str, backend: &str, detail: impl Into<String>) {
        let mut e = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if e.len() == EVENTS {
            e.pop_front();
        }
        e.push_back(Event {
            at_ms: now_ms(),
            kind,
            backend: backend.to_string(),
            detail: detail.into(),
        });
    }

    /// Events, newest first, as JSON.
    pub fn events_json(&self) -> serde_json::Value {
        let e = self.events.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::Value::Array(
            e.iter()
                .rev()
                .map(|e| {
                    json!({"at_ms": e.at_ms, "kind": e.kind, "backend": e.backend, "detail": e.detail})
                })
                .collect(),
        )
    }

    /// Takes one sample of every backend and of the totals; backends no
    /// longer configured are forgotten.
    pub fn sample(&self, backends: &[std::sync::Arc<Backend>], metrics: &crate::metrics::Metrics) {
        let at_ms = now_ms();
        {
            let load =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            let now = Totals {
                at_ms,
                accepted: load(&metrics.accepted),
                refused: metrics.rejected_total(),
                active: load(&metrics.active),
            };
            let mut t = self.totals.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(last) = t.ring.back().copied() {
                let secs = at_ms.saturating_sub(last.at_ms) as f64 / 1e3;
                if secs > 0.0 {
                    let rate = now.accepted.saturating_sub(last.accepted) as f64 / secs;
                    t.max_accept_rate = t.max_accept_rate.max(rate);
                }
            }
            if t.ring.len() == SAMPLES {
                t.ring.pop_front();
            }
            t.ring.push_back(now);
        }
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.retain(|name, _| backends.iter().any(|b| &b.name == name));
        for b in backends {
            let rtt_ms = b.health().and_then(|c| match c.report().last_outcome {
                Some(mqlb_healthcheck::Outcome::Up(r)) => Some(r.ping.as_secs_f64() * 1e3),
                _ => None,
            });
            let ring = h.entry(b.name.clone()).or_default();
            if ring.len() == SAMPLES {
                ring.pop_front();
            }
            let load =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            ring.push_back(Sample {
                at_ms,
                connections: load(&b.active),
                rtt_ms,
                forwarded: load(&b.forwarded),
                bytes_to_backend: load(&b.bytes.to_backend),
                bytes_to_client: load(&b.bytes.to_client),
            });
        }
    }

    /// Samples per backend, oldest first, as JSON.
    pub fn history_json(&self) -> serde_json::Value {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<_> = h.iter().collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        serde_json::Value::Object(
            names
                .into_iter()
                .map(|(n, history)| {
                    let samples: Vec<serde_json::Value> = history
                        .iter()
                        .map(|s| {
                            json!([
                                s.at_ms,
                                s.connections,
                                s.rtt_ms,
                                s.forwarded,
                                s.bytes_to_backend,
                                s.bytes_to_client
                            ])
                        })
                        .collect();
                    (n.clone(), serde_json::Value::Array(samples))
                })
                .collect(),
        )
    }
}

impl Journal {
    /// The balancer's totals over time (`[at_ms, accepted, refused,
    /// active]`, oldest first) and the connection rates: now (over the
    /// last sampled second) and the most since start.
    pub fn totals_json(&self) -> serde_json::Value {
        let t = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.ring.len();
        let now_rate = match (t.ring.get(n.wrapping_sub(2)), t.ring.back()) {
            (Some(a), Some(b)) if b.at_ms > a.at_ms => {
                b.accepted.saturating_sub(a.accepted) as f64 / ((b.at_ms - a.at_ms) as f64 / 1e3)
            }
            _ => 0.0,
        };
        json!({
            "accept_rate": now_rate,
            "max_accept_rate": t.max_accept_rate,
            "samples": t.ring.iter().map(|s| json!([s.at_ms, s.accepted, s.refused, s.active])).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_are_bounded_and_newest_first() {
        let j = Journal::default();
        for i in 0..EVENTS + 10 {
            j.record("health", "b1", format!("event {i}"));
        }
        let e = j.events_json();
        let e = e.as_array().cloned().unwrap_or_default();
        assert_eq!(e.len(), EVENTS);
        assert_eq!(e[0]["detail"], format!("event {}", EVENTS + 9));
        let b = std::sync::Arc::new(Backend::new(&mqlb_config::Backend {
            name: "b1".into(),
            address: "127.0.0.1:1".into(),
            weight: 1,
            pool: mqlb_config::DEFAULT_POOL.into(),
            send_proxy: false,
            tls: None,
            websocket: None,
            cluster_admin: None,
        }));
        for _ in 0..SAMPLES + 5 {
            j.sample(
                std::slice::from_ref(&b),
                &crate::metrics::Metrics::default(),
            );
        }
        assert_eq!(
            j.history_json()["b1"].as_array().map(Vec::len),
            Some(SAMPLES)
        );
        j.sample(&[], &crate::metrics::Metrics::default());
        assert!(j.history_json().as_object().is_some_and(|o| o.is_empty()));
    }
}
