//! MQTT 5 properties (2.2.2): one walker validates them, two consumers use it.
//!
//! `walk` checks the property length, that each property is allowed in its
//! packet (2.2.2.2 table), that none but User Property and (in PUBLISH)
//! Subscription Identifier repeats, and each value's range. The borrowed
//! `Property` it yields lets the CONNECT sniffer read fields without
//! allocating; `Properties::decode` builds the owned, zero-copy form.

use bytes::{BufMut, Bytes};

use crate::reader::Reader;
use crate::{framing, DecodeError, EncodeError, MqttStr};

/// Which packet (or CONNECT section) a property block belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertyContext {
    /// CONNECT variable header.
    Connect,
    /// CONNECT will properties.
    Will,
    /// CONNACK.
    Connack,
    /// PUBLISH.
    Publish,
    /// PUBACK, PUBREC, PUBREL and PUBCOMP.
    Ack,
    /// SUBSCRIBE.
    Subscribe,
    /// SUBACK.
    Suback,
    /// UNSUBSCRIBE.
    Unsubscribe,
    /// UNSUBACK.
    Unsuback,
    /// DISCONNECT.
    Disconnect,
    /// AUTH.
    Auth,
}

/// One property, borrowed from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Property<'a> {
    PayloadFormatIndicator(u8),
    MessageExpiryInterval(u32),
    ContentType(&'a str),
    ResponseTopic(&'a str),
    CorrelationData(&'a [u8]),
    SubscriptionIdentifier(u32),
    SessionExpiryInterval(u32),
    AssignedClientIdentifier(&'a str),
    ServerKeepAlive(u16),
    AuthenticationMethod(&'a str),
    AuthenticationData(&'a [u8]),
    RequestProblemInformation(u8),
    WillDelayInterval(u32),
    RequestResponseInformation(u8),
    ResponseInformation(&'a str),
    ServerReference(&'a str),
    ReasonString(&'a str),
    ReceiveMaximum(u16),
    TopicAliasMaximum(u16),
    TopicAlias(u16),
    MaximumQos(u8),
    RetainAvailable(u8),
    UserProperty(&'a str, &'a str),
    MaximumPacketSize(u32),
    WildcardSubscriptionAvailable(u8),
    SubscriptionIdentifierAvailable(u8),
    SharedSubscriptionAvailable(u8),
}

fn allowed(id: u8, ctx: PropertyContext) -> bool {
    use PropertyContext::*;
    match id {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 => matches!(ctx, Publish | Will),
        0x0B => matches!(ctx, Publish | Subscribe),
        0x11 => matches!(ctx, Connect | Connack | Disconnect),
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => ctx == Connack,
        0x15 | 0x16 => matches!(ctx, Connect | Connack | Auth),
        0x17 | 0x19 => ctx == Connect,
        0x18 => ctx == Will,
        0x1C => matches!(ctx, Connack | Disconnect),
        0x1F => matches!(ctx, Connack | Ack | Suback | Unsuback | Disconnect | Auth),
        0x21 | 0x22 | 0x27 => matches!(ctx, Connect | Connack),
        0x23 => ctx == Publish,
        0x26 => true,
        _ => false,
    }
}

fn bool_byte(r: &mut Reader<'_>, what: &'static str) -> Result<u8, DecodeError> {
    let b = r.u8(what)?;
    if b > 1 {
        return Err(DecodeError::Protocol(what));
    }
    Ok(b)
}

/// Reads a property block (length prefix included) and calls `f` for each
/// property after validating it.
pub(crate) fn walk<'a>(
    r: &mut Reader<'a>,
    ctx: PropertyContext,
    mut f: impl FnMut(Property<'a>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let body = block(r)?;
    let mut p = Reader::new(body);
    // Bit i set = property id i seen. Ids are at most 0x2A.
    let mut seen: u64 = 0;
    while !p.is_empty() {
        let (id, prop) = parse_one(&mut p)?;
        if !allowed(id, ctx) {
            return Err(DecodeError::Malformed(
                "property not allowed in this packet",
            ));
        }
        let repeatable = id == 0x26 || (id == 0x0B && ctx == PropertyContext::Publish);
        if !repeatable && seen & (1u64 << id) != 0 {
            return Err(DecodeError::Protocol("duplicated property"));
        }
        seen |= 1u64 << id;
        f(prop)?;
    }
    Ok(())
}

/// Reads the length prefix and returns the block's body.
fn block<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], DecodeError> {
    let len = r.varint("property length")? as usize;
    r.take(len, "property length")
}

/// Parses one property and checks its value range.
fn parse_one<'a>(p: &mut Reader<'a>) -> Result<(u8, Property<'a>), DecodeError> {
    let id = p.varint("property identifier")?;
    let id = u8::try_from(id).map_err(|_| DecodeError::Malformed("unknown property"))?;
    let prop = match id {
        0x01 => Property::PayloadFormatIndicator(bool_byte(p, "payload format indicator")?),
        0x02 => Property::MessageExpiryInterval(p.u32("message expiry interval")?),
        0x03 => Property::ContentType(p.string("content type")?),
        0x08 => {
            let t = p.string("response topic")?;
            if t.is_empty() || crate::check_topic_name(t).is_err() {
                return Err(DecodeError::Protocol("invalid response topic"));
            }
            Property::ResponseTopic(t)
        }
        0x09 => Property::CorrelationData(p.binary("correlation data")?),
        0x0B => {
            let v = p.varint("subscription identifier")?;
            if v == 0 {
                return Err(DecodeError::Protocol("subscription identifier 0"));
            }
            Property::SubscriptionIdentifier(v)
        }
        0x11 => Property::SessionExpiryInterval(p.u32("session expiry interval")?),
        0x12 => Property::AssignedClientIdentifier(p.string("assigned client identifier")?),
        0x13 => Property::ServerKeepAlive(p.u16("server keep alive")?),
        0x15 => Property::AuthenticationMethod(p.string("authentication method")?),
        0x16 => Property::AuthenticationData(p.binary("authentication data")?),
        0x17 => Property::RequestProblemInformation(bool_byte(p, "request problem information")?),
        0x18 => Property::WillDelayInterval(p.u32("will delay interval")?),
        0x19 => Property::RequestResponseInformation(bool_byte(p, "request response information")?),
        0x1A => Property::ResponseInformation(p.string("response information")?),
        0x1C => Property::ServerReference(p.string("server reference")?),
        0x1F => Property::ReasonString(p.string("reason string")?),
        0x21 => {
            let v = p.u16("receive maximum")?;
            if v == 0 {
                return Err(DecodeError::Protocol("receive maximum 0"));
            }
            Property::ReceiveMaximum(v)
        }
        0x22 => Property::TopicAliasMaximum(p.u16("topic alias maximum")?),
        0x23 => {
            let v = p.u16("topic alias")?;
            if v == 0 {
                return Err(DecodeError::Protocol("topic alias 0"));
            }
            Property::TopicAlias(v)
        }
        0x24 => Property::MaximumQos(bool_byte(p, "maximum qos")?),
        0x25 => Property::RetainAvailable(bool_byte(p, "retain available")?),
        0x26 => {
            let k = p.string("user property")?;
            let v = p.string("user property")?;
            Property::UserProperty(k, v)
        }
        0x27 => {
            let v = p.u32("maximum packet size")?;
            if v == 0 {
                return Err(DecodeError::Protocol("maximum packet size 0"));
            }
            Property::MaximumPacketSize(v)
        }
        0x28 => Property::WildcardSubscriptionAvailable(bool_byte(
            p,
            "wildcard subscription available",
        )?),
        0x29 => Property::SubscriptionIdentifierAvailable(bool_byte(
            p,
            "subscription identifier available",
        )?),
        0x2A => {
            Property::SharedSubscriptionAvailable(bool_byte(p, "shared subscription available")?)
        }
        _ => return Err(DecodeError::Malformed("unknown property")),
    };
    Ok((id, prop))
}

/// A validated property block borrowed from a frame, read without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PropertiesView<'a> {
    body: &'a [u8],
}

impl<'a> PropertiesView<'a> {
    /// Validates a block for `ctx` and keeps a view of it.
    pub(crate) fn parse(r: &mut Reader<'a>, ctx: PropertyContext) -> Result<Self, DecodeError> {
        let mut probe = r.clone();
        walk(&mut probe, ctx, |_| Ok(()))?;
        let body = block(r)?;
        Ok(Self { body })
    }

    /// The properties in wire order.
    pub fn iter(&self) -> impl Iterator<Item = Property<'a>> + 'a {
        let mut r = Reader::new(self.body);
        std::iter::from_fn(move || {
            if r.is_empty() {
                return None;
            }
            // Validated in `parse`, so this cannot fail.
            parse_one(&mut r).ok().map(|(_, p)| p)
        })
    }

    /// The raw block body (without its length prefix).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.body
    }
}

/// Owned MQTT 5 properties. Strings and binaries share the frame's buffer.
///
/// One struct for every packet keeps the codec small; which fields a packet
/// may carry is enforced when decoding (`walk`) and is the encoder caller's
/// contract when sending.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<MqttStr>,
    pub response_topic: Option<MqttStr>,
    pub correlation_data: Option<Bytes>,
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<MqttStr>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<MqttStr>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<MqttStr>,
    pub server_reference: Option<MqttStr>,
    pub reason_string: Option<MqttStr>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(MqttStr, MqttStr)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

impl Properties {
    /// Decodes a property block into the owned form, slicing `frame` for strings.
    pub(crate) fn decode(
        r: &mut Reader<'_>,
        frame: &Bytes,
        ctx: PropertyContext,
    ) -> Result<Self, DecodeError> {
        Ok(Self::from_view(PropertiesView::parse(r, ctx)?, frame))
    }

    /// Builds the owned form of a validated view whose bytes lie inside `frame`.
    pub(crate) fn from_view(view: PropertiesView<'_>, frame: &Bytes) -> Self {
        let mut out = Properties::default();
        let s = |v: &str| MqttStr::from_validated(frame.slice_ref(v.as_bytes()));
        let b = |v: &[u8]| frame.slice_ref(v);
        for p in view.iter() {
            match p {
                Property::PayloadFormatIndicator(v) => out.payload_format_indicator = Some(v),
                Property::MessageExpiryInterval(v) => out.message_expiry_interval = Some(v),
                Property::ContentType(v) => out.content_type = Some(s(v)),
                Property::ResponseTopic(v) => out.response_topic = Some(s(v)),
                Property::CorrelationData(v) => out.correlation_data = Some(b(v)),
                Property::SubscriptionIdentifier(v) => out.subscription_identifiers.push(v),
                Property::SessionExpiryInterval(v) => out.session_expiry_interval = Some(v),
                Property::AssignedClientIdentifier(v) => {
                    out.assigned_client_identifier = Some(s(v))
                }
                Property::ServerKeepAlive(v) => out.server_keep_alive = Some(v),
                Property::AuthenticationMethod(v) => out.authentication_method = Some(s(v)),
                Property::AuthenticationData(v) => out.authentication_data = Some(b(v)),
                Property::RequestProblemInformation(v) => out.request_problem_information = Some(v),
                Property::WillDelayInterval(v) => out.will_delay_interval = Some(v),
                Property::RequestResponseInformation(v) => {
                    out.request_response_information = Some(v)
                }
                Property::ResponseInformation(v) => out.response_information = Some(s(v)),
                Property::ServerReference(v) => out.server_reference = Some(s(v)),
                Property::ReasonString(v) => out.reason_string = Some(s(v)),
                Property::ReceiveMaximum(v) => out.receive_maximum = Some(v),
                Property::TopicAliasMaximum(v) => out.topic_alias_maximum = Some(v),
                Property::TopicAlias(v) => out.topic_alias = Some(v),
                Property::MaximumQos(v) => out.maximum_qos = Some(v),
                Property::RetainAvailable(v) => out.retain_available = Some(v),
                Property::UserProperty(k, v) => out.user_properties.push((s(k), s(v))),
                Property::MaximumPacketSize(v) => out.maximum_packet_size = Some(v),
                Property::WildcardSubscriptionAvailable(v) => {
                    out.wildcard_subscription_available = Some(v)
                }
                Property::SubscriptionIdentifierAvailable(v) => {
                    out.subscription_identifier_available = Some(v)
                }
                Property::SharedSubscriptionAvailable(v) => {
                    out.shared_subscription_available = Some(v)
                }
            }
        }
        out
    }

    /// True when no property is set (encodes as a single 0x00 length byte).
    pub fn is_empty(&self) -> bool {
        self == &Properties::default()
    }

    /// Size of the properties without the length prefix.
    fn body_len(&self) -> usize {
        let str_len = |s: &Option<MqttStr>| s.as_ref().map_or(0, |s| 3 + s.len());
        let bin_len = |b: &Option<Bytes>| b.as_ref().map_or(0, |b| 3 + b.len());
        let byte = |v: &Option<u8>| v.map_or(0, |_| 2);
        let two = |v: &Option<u16>| v.map_or(0, |_| 3);
        let four = |v: &Option<u32>| v.map_or(0, |_| 5);
        byte(&self.payload_format_indicator)
            + four(&self.message_expiry_interval)
            + str_len(&self.content_type)
            + str_len(&self.response_topic)
            + bin_len(&self.correlation_data)
            + self
                .subscription_identifiers
                .iter()
                .map(|&v| 1 + framing::varint_len(v as usize))
                .sum::<usize>()
            + four(&self.session_expiry_interval)
            + str_len(&self.assigned_client_identifier)
            + two(&self.server_keep_alive)
            + str_len(&self.authentication_method)
            + bin_len(&self.authentication_data)
            + byte(&self.request_problem_information)
            + four(&self.will_delay_interval)
            + byte(&self.request_response_information)
            + str_len(&self.response_information)
            + str_len(&self.server_reference)
            + str_len(&self.reason_string)
            + two(&self.receive_maximum)
            + two(&self.topic_alias_maximum)
            + two(&self.topic_alias)
            + byte(&self.maximum_qos)
            + byte(&self.retain_available)
            + self
                .user_properties
                .iter()
                .map(|(k, v)| 5 + k.len() + v.len())
                .sum::<usize>()
            + four(&self.maximum_packet_size)
            + byte(&self.wildcard_subscription_available)
            + byte(&self.subscription_identifier_available)
            + byte(&self.shared_subscription_available)
    }

    /// Size on the wire, length prefix included.
    pub fn encoded_len(&self) -> usize {
        let body = self.body_len();
        framing::varint_len(body) + body
    }

    /// Writes the block, length prefix included, in identifier order.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), EncodeError> {
        framing::put_varint(buf, self.body_len())?;
        let byte = |buf: &mut dyn BufMut, id: u8, v: Option<u8>| {
            if let Some(v) = v {
                buf.put_u8(id);
                buf.put_u8(v);
            }
        };
        let two = |buf: &mut dyn BufMut, id: u8, v: Option<u16>| {
            if let Some(v) = v {
                buf.put_u8(id);
                buf.put_u16(v);
            }
        };
        let four = |buf: &mut dyn BufMut, id: u8, v: Option<u32>| {
            if let Some(v) = v {
                buf.put_u8(id);
                buf.put_u32(v);
            }
        };
        let string =
            |buf: &mut dyn BufMut, id: u8, v: &Option<MqttStr>| -> Result<(), EncodeError> {
                if let Some(v) = v {
                    buf.put_u8(id);
                    crate::encode::put_binary(buf, v.as_bytes(), "property")?;
                }
                Ok(())
            };
        let binary = |buf: &mut dyn BufMut, id: u8, v: &Option<Bytes>| -> Result<(), EncodeError> {
            if let Some(v) = v {
                buf.put_u8(id);
                crate::encode::put_binary(buf, v, "property")?;
            }
            Ok(())
        };
        let buf: &mut dyn BufMut = buf;
        byte(buf, 0x01, self.payload_format_indicator);
        four(buf, 0x02, self.message_expiry_interval);
        string(buf, 0x03, &self.content_type)?;
        string(buf, 0x08, &self.response_topic)?;
        binary(buf, 0x09, &self.correlation_data)?;
        for &id in &self.subscription_identifiers {
            buf.put_u8(0x0B);
            framing::put_varint(buf, id as usize)?;
        }
        four(buf, 0x11, self.session_expiry_interval);
        string(buf, 0x12, &self.assigned_client_identifier)?;
        two(buf, 0x13, self.server_keep_alive);
        string(buf, 0x15, &self.authentication_method)?;
        binary(buf, 0x16, &self.authentication_data)?;
        byte(buf, 0x17, self.request_problem_information);
        four(buf, 0x18, self.will_delay_interval);
        byte(buf, 0x19, self.request_response_information);
        string(buf, 0x1A, &self.response_information)?;
        string(buf, 0x1C, &self.server_reference)?;
        string(buf, 0x1F, &self.reason_string)?;
        two(buf, 0x21, self.receive_maximum);
        two(buf, 0x22, self.topic_alias_maximum);
        two(buf, 0x23, self.topic_alias);
        byte(buf, 0x24, self.maximum_qos);
        byte(buf, 0x25, self.retain_available);
        for (k, v) in &self.user_properties {
            buf.put_u8(0x26);
            crate::encode::put_binary(buf, k.as_bytes(), "user property")?;
            crate::encode::put_binary(buf, v.as_bytes(), "user property")?;
        }
        four(buf, 0x27, self.maximum_packet_size);
        byte(buf, 0x28, self.wildcard_subscription_available);
        byte(buf, 0x29, self.subscription_identifier_available);
        byte(buf, 0x2A, self.shared_subscription_available);
        Ok(())
    }
}
