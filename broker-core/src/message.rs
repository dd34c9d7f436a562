//! What the broker moves around: a routed [`Message`], a subscription's
//! options ([`Sub`]), and a message owed to one session ([`Pending`]).
//!
//! Plain data shared by the session, routing, retained and snapshot modules,
//! so none of them has to import another to name these.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use mqlb_protocol::{MqttStr, Properties, QoS, SubscriptionOptions};

/// Largest packet accepted from clients (the listeners size their
/// WebSocket frames from it, the connections their reads).
pub const MAX_PACKET: usize = 1 << 20;

/// A message as routed: what was published, plus who published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: MqttStr,
    /// Payload.
    pub payload: Bytes,
    /// QoS as published.
    pub qos: QoS,
    /// Retain flag as published.
    pub retain: bool,
    /// v5 properties to forward (user properties, content type, ...); dropped
    /// when delivering to 3.x subscribers. Shared: a message is cloned for
    /// every subscriber it is queued for, and the properties are the bulk
    /// of it (a stuck subscriber's full queue turns every publish into a
    /// clone and a drop).
    pub properties: Arc<Properties>,
    /// Publisher's client ID, for No Local.
    pub origin: Option<Arc<str>>,
    /// When the broker received it: Message Expiry counts down from here.
    pub received: Instant,
}

impl Message {
    /// Remaining Message Expiry Interval: `Ok(None)` when the message never
    /// expires, `Err(())` when it has expired (never `Some(0)`).
    pub(crate) fn remaining_expiry(&self, now: Instant) -> Result<Option<u32>, ()> {
        match self.properties.message_expiry_interval {
            None => Ok(None),
            Some(secs) => {
                let left =
                    u64::from(secs).saturating_sub(now.duration_since(self.received).as_secs());
                if left == 0 {
                    Err(())
                } else {
                    Ok(Some(u32::try_from(left).unwrap_or(u32::MAX)))
                }
            }
        }
    }
}

/// A subscription with its identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sub {
    /// Options from SUBSCRIBE.
    pub options: SubscriptionOptions,
    /// v5 subscription identifier.
    pub id: Option<u32>,
}

impl Sub {
    /// The entry a peer node's interest makes: its sessions' own options
    /// apply when it delivers, so the entry passes every QoS through.
    pub fn node() -> Sub {
        Sub {
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                ..SubscriptionOptions::default()
            },
            id: None,
        }
    }
}

/// A message owed to one session, not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The message as routed.
    pub msg: Message,
    /// QoS it is delivered at (the minimum of publish and subscription).
    pub qos: QoS,
    /// Subscription identifiers of the matching subscriptions.
    pub sub_ids: Vec<u32>,
    /// RETAIN flag it is delivered with.
    pub retain: bool,
    /// The shared subscription (`$share/{group}/{filter}`) it came through,
    /// so it can go to another member if this one leaves.
    pub shared: Option<Arc<str>>,
}
