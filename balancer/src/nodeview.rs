//! What a bundled cluster's node says of itself on its `/cluster` (its
//! readiness, view, term, links and traffic), as the balancer keeps it per
//! backend for the console. A leaf: the backend set holds it, and
//! `clusterview` fetches it.

use std::time::Duration;

/// What a node counts of its own traffic (its `/cluster` answer's
/// `traffic`), for the console's cluster panel.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodeTraffic {
    /// Connected clients.
    pub clients: u64,
    /// Sessions, connected or not.
    pub sessions: u64,
    /// Subscriptions.
    pub subscriptions: u64,
    /// Retained messages.
    pub retained: u64,
    /// PUBLISH packets routed, in total.
    pub messages_in: u64,
    /// PUBLISH packets sent to clients, in total.
    pub messages_out: u64,
    /// Messages dropped instead of delivered, in total.
    pub dropped: u64,
    /// Per second since the answer before (`None` on the first).
    pub rates: Option<Rates>,
}

/// Messages a second, from two successive answers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// PUBLISH packets routed a second.
    pub messages_in: f64,
    /// PUBLISH packets sent a second.
    pub messages_out: f64,
    /// Messages dropped a second.
    pub dropped: f64,
}

impl NodeTraffic {
    /// This answer's rates, given the one before it and the time between.
    pub fn with_rates_since(mut self, before: &NodeTraffic, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64();
        if secs > 0.0 {
            let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
            self.rates = Some(Rates {
                messages_in: rate(self.messages_in, before.messages_in),
                messages_out: rate(self.messages_out, before.messages_out),
                dropped: rate(self.dropped, before.dropped),
            });
        }
        self
    }
}

/// One node's answer: its name, whether it is ready, its view's members,
/// its Raft term, its links to its peers and its traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// The node's own name (its `--node-id`).
    pub node: String,
    /// The node can take clients (majority, synced).
    pub ready: bool,
    /// The members of its view.
    pub members: Vec<String>,
    /// Its committed view's number.
    pub view: u64,
    /// The Raft leader it knows of.
    pub leader: Option<String>,
    /// The Raft term it is in.
    pub term: u64,
    /// Each peer and the state of the node's links to it ("up", "down",
    /// ...).
    pub links: Vec<(String, String)>,
    /// Its counts (zero from a node too old to send them).
    pub traffic: NodeTraffic,
    /// When the answer came.
    pub at: std::time::Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_two_answers() {
        let before = NodeTraffic {
            messages_in: 100,
            messages_out: 50,
            ..Default::default()
        };
        let now = NodeTraffic {
            messages_in: 300,
            messages_out: 50,
            dropped: 4,
            ..Default::default()
        }
        .with_rates_since(&before, Duration::from_secs(2));
        assert_eq!(
            now.rates,
            Some(Rates {
                messages_in: 100.0,
                messages_out: 0.0,
                dropped: 2.0
            })
        );
        // A restarted node's counters start again: no negative rate.
        let restarted = NodeTraffic::default().with_rates_since(&now, Duration::from_secs(1));
        assert_eq!(restarted.rates.map(|r| r.messages_in), Some(0.0));
        assert_eq!(
            NodeTraffic::default()
                .with_rates_since(&now, Duration::ZERO)
                .rates,
            None
        );
    }
}
