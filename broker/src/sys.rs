//! `$SYS/broker/...`: broker statistics as retained topics (the names
//! Mosquitto uses, so existing dashboards keep working), and the same
//! numbers in Prometheus text for the admin API.

use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqlb_protocol::{MqttStr, Properties, QoS};

use crate::core::{Core, Message};

/// The broker's version string.
pub const VERSION: &str = concat!("mqlb ", env!("CARGO_PKG_VERSION"));

/// Refreshes the `$SYS` topics through the normal routing path.
pub fn publish(core: &mut Core, uptime: Duration) {
    let stats = core.stats();
    let values = [
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
            (stats.dropped_queue_full + stats.dropped_expired).to_string(),
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
    for (topic, value) in values {
        let Ok(topic) = MqttStr::try_from(topic) else {
            continue;
        };
        core.route(Message {
            topic,
            payload: Bytes::from(value.into_bytes()),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Properties::default(),
            origin: None::<Arc<str>>,
            received: Instant::now(),
        });
    }
}

/// Prometheus text for the broker's counters.
pub fn render_metrics(core: &Core) -> String {
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
        "mqlb_broker_messages_sent_total",
        "counter",
        "PUBLISH packets sent to clients.",
        s.messages_out.to_string(),
    );
    metric(
        "mqlb_broker_dropped_queue_full_total",
        "counter",
        "Queued messages dropped at a session's limit.",
        s.dropped_queue_full.to_string(),
    );
    metric(
        "mqlb_broker_dropped_expired_total",
        "counter",
        "Messages whose Message Expiry passed while queued.",
        s.dropped_expired.to_string(),
    );
    metric(
        "mqlb_broker_dropped_too_large_total",
        "counter",
        "Messages larger than the client's Maximum Packet Size.",
        s.dropped_too_large.to_string(),
    );
    o
}
