//! A strict, sans-IO MQTT 3.1 / 3.1.1 / 5.0 codec.
//!
//! mqlb has its own codec because every Rust codec we measured either lacks a
//! protocol version, panics on hostile input, or lets malformed packets through
//! (see the team's codec study). A load balancer that forwards bytes after
//! parsing the CONNECT must be at least as strict as the brokers behind it.
//!
//! # Layout
//! * [`framing`]: the fixed header, the remaining-length integer, the
//!   size-limited `check` pass, and the `BoundaryTracker` the balancer uses to
//!   know where packets end without decoding them.
//! * [`connect`]: the allocation-free CONNECT sniffer and the owned CONNECT.
//! * [`packet`]: all 15 packets, `decode` and `encode`.
//! * [`properties`]: MQTT 5 properties, validated per packet type.
//! * `reader`: the bounded reader every parser uses; no read can panic.
//!
//! Errors separate "need more bytes" (`Ok(None)`) from a broken stream
//! (`DecodeError`), and every error carries the reason code to send.
//!
//! Dependencies: `bytes` (zero-copy frames) and `thiserror` (error derive).
//! No tokio: the codec is pure functions over buffers.

#![forbid(unsafe_code)]

pub mod connect;
mod encode;
mod error;
pub mod framing;
pub mod packet;
pub mod properties;
mod reader;
mod reason;
mod types;

pub use connect::{
    sniff_connect, Connect, ConnectView, RefusalStyle, Rejection, Sniff, Will, WillView,
};
pub use error::{DecodeError, EncodeError};
pub use framing::{check, BoundaryTracker, FrameHeader, PacketType};
pub use packet::{
    decode, Ack, Auth, Connack, Disconnect, Packet, Publish, RetainHandling, Suback, Subscribe,
    SubscriptionOptions, Unsuback, Unsubscribe, SESSION_MOVING,
};
pub use properties::{Properties, PropertiesView, Property, PropertyContext};
pub use reason::{allowed_codes, ConnackReturnCode, ReasonCode};
pub use types::{
    check_topic_filter, check_topic_filter_levels, check_topic_name, check_topic_name_levels,
    topic_levels, Limits, MqttStr, PacketId, ProtocolVersion, QoS, DEFAULT_MAX_TOPIC_LEVELS,
};
