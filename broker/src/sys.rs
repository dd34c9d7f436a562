//! `$SYS/broker/...`: broker statistics as retained topics (the names
//! Mosquitto uses, so existing dashboards keep working), and the same
//! numbers in Prometheus text for the admin API.

use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqlb_protocol::{MqttStr, QoS};

use crate::core::{Core, DropReason};
use crate::effects::Effects;
use crate::message::Message;

/// The broker's version string.
pub const VERSION: &str = concat!("mqlb ", env!("CARGO_PKG_VERSION"));

/// Refreshes the `$SYS` topics through the normal routing path.
pub fn publish(core: &mut Core, uptime: Duration) -> Effects {
    let mut fx = Effects::none();
    let stats = core.stats();
    let mut values = vec![
        ("$SYS/broker/version", VERSION.to_string()),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", uptime.as_secs()),
        ),
        (
            "$SYS/broker/clients/connected",
            core.connected().to_string(),
        ),
        ("$SYS/broker/clients/total", core.sessions().to_string()),
        (
            "$SYS/broker/messages/received",
            stats.messages_in.to_string(),
        ),
        ("$SYS/broker/messages/sent", stats.messages_out.to_string()),
        (
            "$SYS/broker/messages/dropped",
            stats.dropped_total().to_string(),
        ),
        (
            "$SYS/broker/subscriptions/count",
            core.subscriptions().to_string(),
        ),
        (
            "$SYS/broker/retained messages/count",
            core.retained_count().to_string(),
        ),
    ];
    for reason in DropReason::ALL {
        values.push((
            match reason {
                DropReason::QueueFull => "$SYS/broker/messages/dropped/queue_full",
                DropReason::Expired => "$SYS/broker/messages/dropped/expired",
                DropReason::TooLarge => "$SYS/broker/messages/dropped/too_large",
                DropReason::SlowConsumer => "$SYS/broker/messages/dropped/slow_consumer",
            },
            stats.dropped(reason).to_string(),
        ));
    }
    for (topic, value) in values {
        let Ok(topic) = MqttStr::try_from(topic) else {
            continue;
        };
        fx.extend(core.route(Message {
            topic,
            payload: Bytes::from(value.into_bytes()),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Arc::default(),
            origin: None::<Arc<str>>,
            received: Instant::now(),
        }));
    }
    fx
}

/// Prometheus text for the broker's counters.
pub(crate) fn render_metrics(core: &Core) -> String {
    let s = core.stats();
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            o,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "mqlb_broker_clients_connected",
        "gauge",
        "Connected clients.",
        core.connected().to_string(),
    );
    metric(
        "mqlb_broker_sessions",
        "gauge",
        "Sessions, connected or not.",
        core.sessions().to_string(),
    );
    metric(
        "mqlb_broker_subscriptions",
        "gauge",
        "Subscriptions.",
        core.subscriptions().to_string(),
    );
    metric(
        "mqlb_broker_retained_messages",
        "gauge",
        "Retained messages stored.",
        core.retained_count().to_string(),
    );
    metric(
        "mqlb_broker_messages_received_total",
        "counter",
        "PUBLISH packets routed.",
        s.messages_in.to_string(),
    );
    metric(
        "mqlb_broker_retained_clock_refused_total",
        "counter",
        "Peers' retained writes refused: stamped further ahead of this node's clock than max_clock_drift.",
        s.clock_drift_refused.to_string(),
    );
    metric(
        "mqlb_broker_messages_sent_total",
        "counter",
        "PUBLISH packets sent to clients.",
        s.messages_out.to_string(),
    );
    let _ = writeln!(
        o,
        "# HELP mqlb_broker_messages_dropped_total Messages dropped instead of delivered, by reason.\n\
         # TYPE mqlb_broker_messages_dropped_total counter"
    );
    for reason in DropReason::ALL {
        let _ = writeln!(
            o,
            "mqlb_broker_messages_dropped_total{{reason=\"{}\"}} {}",
            reason.label(),
            s.dropped(reason)
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `$SYS` writes go to no connection here.
    struct NoMailboxes;

    impl crate::effects::Mailboxes for NoMailboxes {
        fn resolve(
            &self,
            _: Vec<(u64, crate::outbox::Outgoing)>,
        ) -> Vec<(Arc<crate::outbox::Outbox>, crate::outbox::Outgoing)> {
            Vec::new()
        }
    }

    /// Every drop reason is exported, in metrics and in `$SYS`.
    #[test]
    fn every_drop_reason_is_exported() {
        let mut core = Core::new();
        let text = render_metrics(&core);
        for reason in DropReason::ALL {
            let line = format!(
                "mqlb_broker_messages_dropped_total{{reason=\"{}\"}} 0",
                reason.label()
            );
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        let _ = crate::effects::apply(
            publish(&mut core, Duration::from_secs(1)),
            &crate::effects::LocalLog::default(),
            &NoMailboxes,
        );
        for reason in DropReason::ALL {
            let topic = format!("$SYS/broker/messages/dropped/{}", reason.label());
            assert!(core.retained(&topic).is_some(), "missing {topic}");
        }
    }
}
