//! Small value types shared by the packets.

use bytes::Bytes;

use crate::DecodeError;

/// The three MQTT protocol versions, named by their CONNECT protocol level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// MQTT 3.1: protocol name `MQIsdp`, level 3.
    V3_1,
    /// MQTT 3.1.1: protocol name `MQTT`, level 4.
    V3_1_1,
    /// MQTT 5.0: protocol name `MQTT`, level 5.
    V5,
}

impl ProtocolVersion {
    /// The CONNECT protocol level byte.
    pub fn level(self) -> u8 {
        match self {
            Self::V3_1 => 3,
            Self::V3_1_1 => 4,
            Self::V5 => 5,
        }
    }

    /// The CONNECT protocol name.
    pub fn protocol_name(self) -> &'static [u8] {
        match self {
            Self::V3_1 => b"MQIsdp",
            Self::V3_1_1 | Self::V5 => b"MQTT",
        }
    }

    /// True for MQTT 5, the only version with properties and reason codes.
    pub fn is_v5(self) -> bool {
        self == Self::V5
    }

    /// A fixed label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::V3_1 => "3.1",
            Self::V3_1_1 => "3.1.1",
            Self::V5 => "5.0",
        }
    }
}

/// Quality of service. QoS 3 does not exist and is malformed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(u8)]
pub enum QoS {
    /// Fire and forget.
    #[default]
    AtMostOnce = 0,
    /// Acknowledged delivery, duplicates possible.
    AtLeastOnce = 1,
    /// Exactly-once delivery.
    ExactlyOnce = 2,
}

impl QoS {
    /// Parses the two QoS bits.
    pub fn from_bits(bits: u8) -> Result<Self, DecodeError> {
        match bits {
            0 => Ok(Self::AtMostOnce),
            1 => Ok(Self::AtLeastOnce),
            2 => Ok(Self::ExactlyOnce),
            _ => Err(DecodeError::Malformed("QoS 3")),
        }
    }
}

/// A validated MQTT UTF-8 string backed by the frame's `Bytes` (no copy).
///
/// Constructed only from checked input, so it always holds UTF-8 without U+0000.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MqttStr(Bytes);

impl MqttStr {
    /// Validates and wraps bytes.
    pub fn from_bytes(b: Bytes) -> Result<Self, DecodeError> {
        crate::reader::check_utf8(&b, "string")?;
        Ok(Self(b))
    }

    /// Wraps bytes the reader already validated, without checking again.
    pub(crate) fn from_validated(b: Bytes) -> Self {
        Self(b)
    }

    /// Wraps a static string; `None` if it contains U+0000.
    pub fn from_static(s: &'static str) -> Option<Self> {
        (!s.contains('\0')).then(|| Self(Bytes::from_static(s.as_bytes())))
    }

    /// The string. Infallible by construction.
    pub fn as_str(&self) -> &str {
        // Validated at construction; the fallback is unreachable.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The raw bytes (zero-copy access for routing).
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for MqttStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for MqttStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for MqttStr {
    type Error = DecodeError;
    fn try_from(s: String) -> Result<Self, DecodeError> {
        Self::from_bytes(Bytes::from(s))
    }
}

impl TryFrom<&str> for MqttStr {
    type Error = DecodeError;
    fn try_from(s: &str) -> Result<Self, DecodeError> {
        Self::from_bytes(Bytes::copy_from_slice(s.as_bytes()))
    }
}

/// A packet identifier. Zero is not a valid identifier (2.2.1), so the type
/// cannot hold it.
pub type PacketId = std::num::NonZeroU16;

/// Topic levels accepted by default: Mosquitto's limit. Anything that walks
/// a topic level by level (a trie, a matcher) then has a depth the operator
/// chose, not one the network chose.
pub const DEFAULT_MAX_TOPIC_LEVELS: usize = 200;

/// Number of `/`-separated levels in a topic name or filter, counted without
/// allocating.
pub fn topic_levels(topic: &str) -> usize {
    topic.bytes().filter(|&b| b == b'/').count() + 1
}

/// What a decoder accepts beyond the spec's own rules: bounds an operator
/// sets so that hostile input cannot make later stages do unbounded work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame (fixed header included), in bytes.
    pub max_frame: usize,
    /// Most levels in a topic name or filter (a shared subscription's
    /// `$share/{group}/` prefix is not counted).
    pub max_topic_levels: usize,
}

impl Limits {
    /// `max_frame` with the default topic-level limit.
    pub const fn new(max_frame: usize) -> Self {
        Self {
            max_frame,
            max_topic_levels: DEFAULT_MAX_TOPIC_LEVELS,
        }
    }
}

/// A bare frame size keeps the default topic-level limit, so callers that
/// only care about size pass a number.
impl From<usize> for Limits {
    fn from(max_frame: usize) -> Self {
        Self::new(max_frame)
    }
}

/// Checks a PUBLISH topic name: no wildcards (4.7.3). Emptiness is checked by
/// the caller, because MQTT 5 allows an empty name with a topic alias.
pub fn check_topic_name(topic: &str) -> Result<(), DecodeError> {
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(DecodeError::Malformed("wildcard in topic name"));
    }
    Ok(())
}

/// Checks a topic name's depth: a well-formed name with more than
/// `max_levels` levels is refused with 0x90 Topic Name Invalid.
pub fn check_topic_name_levels(topic: &str, max_levels: usize) -> Result<(), DecodeError> {
    if topic_levels(topic) > max_levels {
        return Err(DecodeError::TopicNameInvalid("too many topic levels"));
    }
    Ok(())
}

/// Checks a topic filter's depth: a well-formed filter with more than
/// `max_levels` levels is refused with 0x8F Topic Filter Invalid.
pub fn check_topic_filter_levels(filter: &str, max_levels: usize) -> Result<(), DecodeError> {
    let inner = filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, f)| f);
    if topic_levels(inner) > max_levels {
        return Err(DecodeError::TopicFilterInvalid("too many topic levels"));
    }
    Ok(())
}

/// Checks a topic filter: non-empty, `#` only as the whole last level, `+`
/// only as a whole level (4.7.1), and a well-formed `$share/group/filter`.
pub fn check_topic_filter(filter: &str) -> Result<(), DecodeError> {
    if filter.is_empty() {
        return Err(DecodeError::Malformed("empty topic filter"));
    }
    let inner = match filter.strip_prefix("$share/") {
        Some(rest) => {
            let (group, f) = rest
                .split_once('/')
                .ok_or(DecodeError::Protocol("shared subscription without filter"))?;
            if group.is_empty() || group.contains(['+', '#']) || f.is_empty() {
                return Err(DecodeError::Protocol("invalid shared subscription"));
            }
            f
        }
        None => filter,
    };
    let mut levels = inner.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(DecodeError::Malformed("'#' not alone at the last level"));
        }
        if level.contains('+') && level != "+" {
            return Err(DecodeError::Malformed("'+' not alone in its level"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        for ok in [
            "a",
            "#",
            "+",
            "a/+/b",
            "a/#",
            "+/+",
            "/",
            "$share/g/a/#",
            "$SYS/#",
        ] {
            assert!(check_topic_filter(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a#",
            "#/a",
            "a/b#",
            "a+",
            "+a/b",
            "$share/g",
            "$share//a",
            "$share/g+/a",
        ] {
            assert!(check_topic_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(check_topic_name("a/b").is_ok());
        assert!(check_topic_name("a/+").is_err());
        assert!(check_topic_name("#").is_err());
    }

    #[test]
    fn topic_levels_are_bounded() {
        assert_eq!(topic_levels("a"), 1);
        assert_eq!(topic_levels("a/b/"), 3);
        assert_eq!(topic_levels("/"), 2);
        let deep = "/".repeat(DEFAULT_MAX_TOPIC_LEVELS - 1);
        assert!(check_topic_name_levels(&deep, DEFAULT_MAX_TOPIC_LEVELS).is_ok());
        assert!(check_topic_filter_levels(&deep, DEFAULT_MAX_TOPIC_LEVELS).is_ok());
        let deeper = "/".repeat(DEFAULT_MAX_TOPIC_LEVELS);
        assert_eq!(
            check_topic_name_levels(&deeper, DEFAULT_MAX_TOPIC_LEVELS)
                .unwrap_err()
                .reason_code(),
            crate::ReasonCode::TOPIC_NAME_INVALID
        );
        assert_eq!(
            check_topic_filter_levels(&deeper, DEFAULT_MAX_TOPIC_LEVELS)
                .unwrap_err()
                .reason_code(),
            crate::ReasonCode::TOPIC_FILTER_INVALID
        );
        // The shared prefix does not count.
        let shared = format!("$share/g/{deep}");
        assert!(check_topic_filter_levels(&shared, DEFAULT_MAX_TOPIC_LEVELS).is_ok());
    }
}
