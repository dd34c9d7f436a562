//! Decode and encode errors.
//!
//! "Need more bytes" is not an error: decoders return `Ok(None)` for it, so an
//! error always means the stream is unusable and the connection must be closed.
//! Every error knows the MQTT 5 reason code a server must send for it.

use crate::ReasonCode;

/// Why a frame could not be decoded. Variants name what was being parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes do not form a packet the spec allows (reason 0x81).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The packet is well formed but breaks a protocol rule (reason 0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The remaining length exceeds the configured maximum (reason 0x95).
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Size of the whole frame, as announced by its fixed header.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The CONNECT names a protocol level this codec does not speak (reason 0x84).
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    /// The CONNECT protocol name is neither `MQTT` nor `MQIsdp`.
    #[error("invalid protocol name")]
    InvalidProtocolName,
    /// A well-formed topic filter this receiver refuses, for example one
    /// deeper than its topic-level limit (reason 0x8F).
    #[error("topic filter invalid: {0}")]
    TopicFilterInvalid(&'static str),
    /// A well-formed topic name this receiver refuses, for example one
    /// deeper than its topic-level limit (reason 0x90).
    #[error("topic name invalid: {0}")]
    TopicNameInvalid(&'static str),
}

impl DecodeError {
    /// The MQTT 5 reason code a server sends (in CONNACK or DISCONNECT) for this error.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::Malformed(_) | DecodeError::InvalidProtocolName => {
                ReasonCode::MALFORMED_PACKET
            }
            DecodeError::Protocol(_) => ReasonCode::PROTOCOL_ERROR,
            DecodeError::TooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocolLevel(_) => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::TopicFilterInvalid(_) => ReasonCode::TOPIC_FILTER_INVALID,
            DecodeError::TopicNameInvalid(_) => ReasonCode::TOPIC_NAME_INVALID,
        }
    }

    /// A short, fixed label for metrics: bounded cardinality, unlike `Display`.
    pub fn label(&self) -> &'static str {
        match self {
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Protocol(_) => "protocol_error",
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::UnsupportedProtocolLevel(_) => "unsupported_protocol",
            DecodeError::InvalidProtocolName => "invalid_protocol_name",
            DecodeError::TopicFilterInvalid(_) => "topic_filter_invalid",
            DecodeError::TopicNameInvalid(_) => "topic_name_invalid",
        }
    }
}

/// Why a packet could not be encoded: a value does not fit its wire field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A string or binary field is longer than 65,535 bytes.
    #[error("{0} is longer than 65535 bytes")]
    FieldTooLong(&'static str),
    /// The packet is longer than the largest remaining length (268,435,455).
    #[error("packet exceeds the maximum remaining length")]
    PacketTooLarge,
    /// The packet type does not exist in the target protocol version.
    #[error("{0} cannot be sent with this protocol version")]
    NotInVersion(&'static str),
    /// A value is outside what the field allows (for example packet id 0).
    #[error("invalid value for {0}")]
    InvalidValue(&'static str),
}
