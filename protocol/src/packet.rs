//! The 15 MQTT packets, decoding of whole frames, and encoding.
//!
//! Decoding is two passes (mini-redis style): `framing::check` proves a whole
//! frame is buffered and within the size limit, then the frame is split off,
//! frozen, and parsed with a bounded `Reader`, so topics and payloads are
//! slices of the frame rather than copies.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::connect::Connect;
use crate::encode::{field_len, put_binary, put_header};
use crate::framing::{self, FrameHeader, PacketType};
use crate::properties::PropertyContext;
use crate::reader::Reader;
use crate::{
    DecodeError, EncodeError, Limits, MqttStr, PacketId, Properties, ProtocolVersion, QoS,
    ReasonCode,
};

/// One MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Packet {
    Connect(Box<Connect>),
    Connack(Connack),
    Publish(Publish),
    Puback(Ack),
    Pubrec(Ack),
    Pubrel(Ack),
    Pubcomp(Ack),
    Subscribe(Subscribe),
    Suback(Suback),
    Unsubscribe(Unsubscribe),
    Unsuback(Unsuback),
    Pingreq,
    Pingresp,
    Disconnect(Disconnect),
    Auth(Auth),
}

/// CONNACK. The reason is held as a v5 reason code for every version (3.x
/// return codes map one-to-one), so callers and metrics use one vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Connack {
    pub session_present: bool,
    pub reason: ReasonCode,
    pub properties: Properties,
}

/// The user property an mqlb broker node puts on a v5 CONNACK 0x88 when
/// the client's session is moving between nodes (its holder just died and
/// its replica is not promoted yet): the node itself is healthy, so a
/// balancer must not count the refusal against it.
pub const SESSION_MOVING: (&str, &str) = ("mqlb-refusal", "session-moving");

impl Connack {
    /// A v5 refusal saying the session is moving (see [`SESSION_MOVING`]):
    /// Server unavailable, with a reason string for the client and the
    /// marker for a balancer.
    pub fn session_moving() -> Self {
        let mut properties = Properties::default();
        let (k, v) = SESSION_MOVING;
        if let (Ok(k), Ok(v)) = (MqttStr::try_from(k), MqttStr::try_from(v)) {
            properties.user_properties.push((k, v));
        }
        properties.reason_string =
            MqttStr::try_from("the session is moving to another node; connect again").ok();
        Self {
            session_present: false,
            reason: ReasonCode::SERVER_UNAVAILABLE,
            properties,
        }
    }

    /// Whether this is a refusal made by [`Connack::session_moving`].
    pub fn is_session_moving(&self) -> bool {
        let (k, v) = SESSION_MOVING;
        self.reason == ReasonCode::SERVER_UNAVAILABLE
            && self
                .properties
                .user_properties
                .iter()
                .any(|(a, b)| a.as_str() == k && b.as_str() == v)
    }
}

/// PUBLISH. `packet_id` is `Some` exactly when QoS > 0; encoding checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: MqttStr,
    pub packet_id: Option<PacketId>,
    pub properties: Properties,
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Ack {
    pub packet_id: PacketId,
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl Ack {
    /// A successful acknowledgement with no properties.
    pub fn new(packet_id: PacketId) -> Self {
        Self {
            packet_id,
            reason: ReasonCode::SUCCESS,
            properties: Properties::default(),
        }
    }
}

/// Retain handling subscription option (MQTT 5, 3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetainHandling {
    /// Send retained messages at subscribe time.
    #[default]
    SendAtSubscribe = 0,
    /// Send them only if the subscription did not exist.
    SendIfNew = 1,
    /// Never send retained messages for this subscription.
    DoNotSend = 2,
}

/// Subscription options. In 3.x only `qos` exists on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Subscribe {
    pub packet_id: PacketId,
    pub properties: Properties,
    pub filters: Vec<(MqttStr, SubscriptionOptions)>,
}

/// SUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Suback {
    pub packet_id: PacketId,
    pub properties: Properties,
    pub reasons: Vec<ReasonCode>,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Unsubscribe {
    pub packet_id: PacketId,
    pub properties: Properties,
    pub filters: Vec<MqttStr>,
}

/// UNSUBACK. `reasons` is empty before 5.0, where UNSUBACK carries none.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Unsuback {
    pub packet_id: PacketId,
    pub properties: Properties,
    pub reasons: Vec<ReasonCode>,
}

/// DISCONNECT. Before 5.0 it carries nothing: the reason must be success.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct Disconnect {
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl Default for ReasonCode {
    fn default() -> Self {
        ReasonCode::SUCCESS
    }
}

impl Disconnect {
    /// A DISCONNECT with a reason and no properties.
    pub fn new(reason: ReasonCode) -> Self {
        Self {
            reason,
            properties: Properties::default(),
        }
    }
}

/// AUTH (MQTT 5 only).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct Auth {
    pub reason: ReasonCode,
    pub properties: Properties,
}

/// Decodes one packet from the front of `buf`, consuming it only when whole.
///
/// `Ok(None)` means more bytes are needed and nothing was consumed. On error
/// the stream is unusable; the error's `reason_code` is what to send.
/// `limits` is a [`Limits`] or just the largest frame size in bytes.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    limits: impl Into<Limits>,
) -> Result<Option<Packet>, DecodeError> {
    let limits = limits.into();
    let Some(header) = framing::check(buf, limits.max_frame)? else {
        return Ok(None);
    };
    let mut frame = buf.split_to(header.frame_len()).freeze();
    frame.advance(header.header_len);
    Packet::decode_body_limited(header, &frame, version, limits.max_topic_levels).map(Some)
}

/// Reads a v5 reason code and checks it is defined for `t`.
fn reason(r: &mut Reader<'_>, t: PacketType) -> Result<ReasonCode, DecodeError> {
    let code = ReasonCode(r.u8("reason code")?);
    if !code.is_valid_for(t) {
        return Err(DecodeError::Malformed(
            "reason code not defined for this packet",
        ));
    }
    Ok(code)
}

fn packet_id(r: &mut Reader<'_>) -> Result<PacketId, DecodeError> {
    PacketId::new(r.u16("packet identifier")?).ok_or(DecodeError::Malformed("packet identifier 0"))
}

fn string(frame: &Bytes, s: &str) -> MqttStr {
    MqttStr::from_validated(frame.slice_ref(s.as_bytes()))
}

impl Packet {
    /// Parses a frame body (the bytes after the fixed header) already proven
    /// complete by `framing::check`, with the default topic-level limit.
    pub fn decode_body(
        header: FrameHeader,
        body: &Bytes,
        version: ProtocolVersion,
    ) -> Result<Packet, DecodeError> {
        Self::decode_body_limited(header, body, version, crate::DEFAULT_MAX_TOPIC_LEVELS)
    }

    /// [`Packet::decode_body`] with a topic-level limit: deeper topic names
    /// fail with 0x90, deeper filters with 0x8F.
    pub fn decode_body_limited(
        header: FrameHeader,
        body: &Bytes,
        version: ProtocolVersion,
        max_topic_levels: usize,
    ) -> Result<Packet, DecodeError> {
        let v5 = version.is_v5();
        let mut r = Reader::new(body);
        let props = |r: &mut Reader<'_>, ctx| -> Result<Properties, DecodeError> {
            if v5 {
                Properties::decode(r, body, ctx)
            } else {
                Ok(Properties::default())
            }
        };
        let packet = match header.packet_type {
            PacketType::Connect => {
                let c = Connect::decode(body, body)?;
                if let Some(w) = &c.will {
                    crate::check_topic_name_levels(w.topic.as_str(), max_topic_levels)?;
                }
                return Ok(Packet::Connect(Box::new(c)));
            }
            PacketType::Connack => {
                let ack_flags = r.u8("connack flags")?;
                if ack_flags & 0xFE != 0 {
                    return Err(DecodeError::Malformed("reserved connack flags"));
                }
                let code = r.u8("connack code")?;
                let reason = if v5 {
                    let code = ReasonCode(code);
                    if !code.is_valid_for(PacketType::Connack) {
                        return Err(DecodeError::Malformed(
                            "reason code not defined for CONNACK",
                        ));
                    }
                    code
                } else {
                    crate::ConnackReturnCode::from_u8(code)
                        .ok_or(DecodeError::Malformed("reserved connack return code"))?
                        .to_reason_code()
                };
                let session_present = ack_flags & 1 == 1;
                if session_present && !reason.is_success() {
                    return Err(DecodeError::Protocol("session present with a refusal"));
                }
                Packet::Connack(Connack {
                    session_present,
                    reason,
                    properties: props(&mut r, PropertyContext::Connack)?,
                })
            }
            PacketType::Publish => {
                let dup = header.flags & 0b1000 != 0;
                let qos = QoS::from_bits((header.flags >> 1) & 0b11)?;
                let retain = header.flags & 1 != 0;
                if dup && qos == QoS::AtMostOnce {
                    return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
                }
                let topic = r.string("topic name")?;
                crate::check_topic_name(topic)?;
                crate::check_topic_name_levels(topic, max_topic_levels)?;
                let packet_id = if qos == QoS::AtMostOnce {
                    None
                } else {
                    Some(packet_id(&mut r)?)
                };
                let properties = props(&mut r, PropertyContext::Publish)?;
                if topic.is_empty() && properties.topic_alias.is_none() {
                    return Err(DecodeError::Protocol(
                        "empty topic name without topic alias",
                    ));
                }
                let payload = body.slice_ref(r.rest());
                if properties.payload_format_indicator == Some(1)
                    && std::str::from_utf8(&payload).is_err()
                {
                    return Err(DecodeError::Protocol(
                        "payload is not UTF-8 as its format says",
                    ));
                }
                Packet::Publish(Publish {
                    dup,
                    qos,
                    retain,
                    topic: string(body, topic),
                    packet_id,
                    properties,
                    payload,
                })
            }
            t @ (PacketType::Puback
            | PacketType::Pubrec
            | PacketType::Pubrel
            | PacketType::Pubcomp) => {
                let packet_id = packet_id(&mut r)?;
                let mut ack = Ack::new(packet_id);
                if v5 {
                    if !r.is_empty() {
                        ack.reason = reason(&mut r, t)?;
                    }
                    if !r.is_empty() {
                        ack.properties = props(&mut r, PropertyContext::Ack)?;
                    }
                }
                r.finish("trailing bytes after acknowledgement")?;
                match t {
                    PacketType::Puback => Packet::Puback(ack),
                    PacketType::Pubrec => Packet::Pubrec(ack),
                    PacketType::Pubrel => Packet::Pubrel(ack),
                    _ => Packet::Pubcomp(ack),
                }
            }
            PacketType::Subscribe => {
                let packet_id = packet_id(&mut r)?;
                let properties = props(&mut r, PropertyContext::Subscribe)?;
                let mut filters = Vec::new();
                while !r.is_empty() {
                    let filter = r.string("topic filter")?;
                    crate::check_topic_filter(filter)?;
                    crate::check_topic_filter_levels(filter, max_topic_levels)?;
                    let o = r.u8("subscription options")?;
                    let options = if v5 {
                        if o & 0xC0 != 0 {
                            return Err(DecodeError::Malformed(
                                "reserved subscription option bits",
                            ));
                        }
                        let retain_handling = match (o >> 4) & 0b11 {
                            0 => RetainHandling::SendAtSubscribe,
                            1 => RetainHandling::SendIfNew,
                            2 => RetainHandling::DoNotSend,
                            _ => return Err(DecodeError::Protocol("retain handling 3")),
                        };
                        let no_local = o & 0b100 != 0;
                        if no_local && filter.starts_with("$share/") {
                            return Err(DecodeError::Protocol("no local on a shared subscription"));
                        }
                        SubscriptionOptions {
                            qos: QoS::from_bits(o & 0b11)?,
                            no_local,
                            retain_as_published: o & 0b1000 != 0,
                            retain_handling,
                        }
                    } else {
                        if o & 0xFC != 0 {
                            return Err(DecodeError::Malformed(
                                "reserved subscription option bits",
                            ));
                        }
                        SubscriptionOptions {
                            qos: QoS::from_bits(o)?,
                            ..Default::default()
                        }
                    };
                    filters.push((string(body, filter), options));
                }
                if filters.is_empty() {
                    return Err(DecodeError::Protocol("SUBSCRIBE without topic filters"));
                }
                Packet::Subscribe(Subscribe {
                    packet_id,
                    properties,
                    filters,
                })
            }
            PacketType::Suback => {
                let packet_id = packet_id(&mut r)?;
                let properties = props(&mut r, PropertyContext::Suback)?;
                let reasons: Vec<ReasonCode> = r.rest().iter().map(|&b| ReasonCode(b)).collect();
                let valid = |c: &ReasonCode| {
                    if v5 {
                        c.is_valid_for(PacketType::Suback)
                    } else {
                        matches!(c.0, 0 | 1 | 2 | 0x80)
                    }
                };
                if reasons.is_empty() || !reasons.iter().all(valid) {
                    return Err(DecodeError::Malformed("invalid SUBACK return codes"));
                }
                Packet::Suback(Suback {
                    packet_id,
                    properties,
                    reasons,
                })
            }
            PacketType::Unsubscribe => {
                let packet_id = packet_id(&mut r)?;
                let properties = props(&mut r, PropertyContext::Unsubscribe)?;
                let mut filters = Vec::new();
                while !r.is_empty() {
                    let filter = r.string("topic filter")?;
                    crate::check_topic_filter(filter)?;
                    crate::check_topic_filter_levels(filter, max_topic_levels)?;
                    filters.push(string(body, filter));
                }
                if filters.is_empty() {
                    return Err(DecodeError::Protocol("UNSUBSCRIBE without topic filters"));
                }
                Packet::Unsubscribe(Unsubscribe {
                    packet_id,
                    properties,
                    filters,
                })
            }
            PacketType::Unsuback => {
                let packet_id = packet_id(&mut r)?;
                let properties = props(&mut r, PropertyContext::Unsuback)?;
                let reasons: Vec<ReasonCode> = if v5 {
                    r.rest().iter().map(|&b| ReasonCode(b)).collect()
                } else {
                    Vec::new()
                };
                if v5
                    && (reasons.is_empty()
                        || !reasons.iter().all(|c| c.is_valid_for(PacketType::Unsuback)))
                {
                    return Err(DecodeError::Malformed("invalid UNSUBACK reason codes"));
                }
                r.finish("trailing bytes after UNSUBACK")?;
                Packet::Unsuback(Unsuback {
                    packet_id,
                    properties,
                    reasons,
                })
            }
            PacketType::Pingreq => {
                r.finish("PINGREQ with a body")?;
                Packet::Pingreq
            }
            PacketType::Pingresp => {
                r.finish("PINGRESP with a body")?;
                Packet::Pingresp
            }
            PacketType::Disconnect => {
                let mut d = Disconnect::default();
                if v5 {
                    if !r.is_empty() {
                        d.reason = reason(&mut r, PacketType::Disconnect)?;
                    }
                    if !r.is_empty() {
                        d.properties = props(&mut r, PropertyContext::Disconnect)?;
                    }
                }
                r.finish("trailing bytes after DISCONNECT")?;
                Packet::Disconnect(d)
            }
            PacketType::Auth => {
                if !v5 {
                    return Err(DecodeError::Malformed("AUTH before MQTT 5"));
                }
                let mut a = Auth::default();
                if !r.is_empty() {
                    a.reason = reason(&mut r, PacketType::Auth)?;
                    a.properties = props(&mut r, PropertyContext::Auth)?;
                    // 3.15.2.2.2: omitting the Authentication Method is a Protocol Error.
                    if a.properties.authentication_method.is_none() {
                        return Err(DecodeError::Protocol("AUTH without authentication method"));
                    }
                }
                r.finish("trailing bytes after AUTH")?;
                Packet::Auth(a)
            }
        };
        Ok(packet)
    }

    /// The packet's type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::Connack(_) => PacketType::Connack,
            Packet::Publish(_) => PacketType::Publish,
            Packet::Puback(_) => PacketType::Puback,
            Packet::Pubrec(_) => PacketType::Pubrec,
            Packet::Pubrel(_) => PacketType::Pubrel,
            Packet::Pubcomp(_) => PacketType::Pubcomp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::Suback(_) => PacketType::Suback,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::Unsuback(_) => PacketType::Unsuback,
            Packet::Pingreq => PacketType::Pingreq,
            Packet::Pingresp => PacketType::Pingresp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }

    /// Appends the packet's wire form for `version`. CONNECT carries its own
    /// version and ignores the argument.
    pub fn encode(&self, version: ProtocolVersion, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let v5 = version.is_v5();
        let first = |t: PacketType| (t as u8) << 4 | t.required_flags().unwrap_or(0);
        let props_len = |p: &Properties| if v5 { p.encoded_len() } else { 0 };
        let put_props =
            |buf: &mut BytesMut, p: &Properties| if v5 { p.encode(buf) } else { Ok(()) };
        match self {
            Packet::Connect(c) => c.encode(buf),
            Packet::Connack(c) => {
                let code = if v5 {
                    c.reason.0
                } else {
                    c.reason.to_v3_connack().ok_or(EncodeError::InvalidValue(
                        "CONNACK code has no 3.x equivalent",
                    ))? as u8
                };
                put_header(
                    buf,
                    first(PacketType::Connack),
                    2 + props_len(&c.properties),
                )?;
                buf.put_u8(u8::from(c.session_present));
                buf.put_u8(code);
                put_props(buf, &c.properties)
            }
            Packet::Publish(p) => {
                if (p.qos == QoS::AtMostOnce) != p.packet_id.is_none() {
                    return Err(EncodeError::InvalidValue(
                        "PUBLISH packet id must match QoS",
                    ));
                }
                let mut f = (PacketType::Publish as u8) << 4 | (p.qos as u8) << 1;
                if p.dup {
                    f |= 0b1000;
                }
                if p.retain {
                    f |= 1;
                }
                let len = field_len(p.topic.as_bytes())
                    + if p.packet_id.is_some() { 2 } else { 0 }
                    + props_len(&p.properties)
                    + p.payload.len();
                put_header(buf, f, len)?;
                put_binary(buf, p.topic.as_bytes(), "topic name")?;
                if let Some(id) = p.packet_id {
                    buf.put_u16(id.get());
                }
                put_props(buf, &p.properties)?;
                buf.put_slice(&p.payload);
                Ok(())
            }
            Packet::Puback(a) | Packet::Pubrec(a) | Packet::Pubrel(a) | Packet::Pubcomp(a) => {
                let t = self.packet_type();
                if !v5 {
                    put_header(buf, first(t), 2)?;
                    buf.put_u16(a.packet_id.get());
                    return Ok(());
                }
                let has_props = !a.properties.is_empty();
                let len = if has_props {
                    3 + a.properties.encoded_len()
                } else if a.reason != ReasonCode::SUCCESS {
                    3
                } else {
                    2
                };
                put_header(buf, first(t), len)?;
                buf.put_u16(a.packet_id.get());
                if len > 2 {
                    buf.put_u8(a.reason.0);
                }
                if has_props {
                    a.properties.encode(buf)?;
                }
                Ok(())
            }
            Packet::Subscribe(s) => {
                let len = 2
                    + props_len(&s.properties)
                    + s.filters
                        .iter()
                        .map(|(f, _)| field_len(f.as_bytes()) + 1)
                        .sum::<usize>();
                put_header(buf, first(PacketType::Subscribe), len)?;
                buf.put_u16(s.packet_id.get());
                put_props(buf, &s.properties)?;
                for (f, o) in &s.filters {
                    put_binary(buf, f.as_bytes(), "topic filter")?;
                    let mut b = o.qos as u8;
                    if v5 {
                        b |= u8::from(o.no_local) << 2
                            | u8::from(o.retain_as_published) << 3
                            | (o.retain_handling as u8) << 4;
                    }
                    buf.put_u8(b);
                }
                Ok(())
            }
            Packet::Suback(s) => {
                put_header(
                    buf,
                    first(PacketType::Suback),
                    2 + props_len(&s.properties) + s.reasons.len(),
                )?;
                buf.put_u16(s.packet_id.get());
                put_props(buf, &s.properties)?;
                buf.extend(s.reasons.iter().map(|r| r.0));
                Ok(())
            }
            Packet::Unsubscribe(u) => {
                let len = 2
                    + props_len(&u.properties)
                    + u.filters
                        .iter()
                        .map(|f| field_len(f.as_bytes()))
                        .sum::<usize>();
                put_header(buf, first(PacketType::Unsubscribe), len)?;
                buf.put_u16(u.packet_id.get());
                put_props(buf, &u.properties)?;
                for f in &u.filters {
                    put_binary(buf, f.as_bytes(), "topic filter")?;
                }
                Ok(())
            }
            Packet::Unsuback(u) => {
                let reasons = if v5 { u.reasons.len() } else { 0 };
                put_header(
                    buf,
                    first(PacketType::Unsuback),
                    2 + props_len(&u.properties) + reasons,
                )?;
                buf.put_u16(u.packet_id.get());
                put_props(buf, &u.properties)?;
                if v5 {
                    buf.extend(u.reasons.iter().map(|r| r.0));
                }
                Ok(())
            }
            Packet::Pingreq => put_header(buf, first(PacketType::Pingreq), 0),
            Packet::Pingresp => put_header(buf, first(PacketType::Pingresp), 0),
            Packet::Disconnect(d) => {
                if !v5 {
                    return put_header(buf, first(PacketType::Disconnect), 0);
                }
                reason_and_props(
                    buf,
                    first(PacketType::Disconnect),
                    d.reason,
                    &d.properties,
                    true,
                )
            }
            Packet::Auth(a) => {
                if !v5 {
                    return Err(EncodeError::NotInVersion("AUTH"));
                }
                // AUTH has no reason-only form (3.15.2.2.1): a reason needs a property length.
                reason_and_props(buf, first(PacketType::Auth), a.reason, &a.properties, false)
            }
        }
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self, version: ProtocolVersion) -> Result<Bytes, EncodeError> {
        let mut buf = BytesMut::new();
        self.encode(version, &mut buf)?;
        Ok(buf.freeze())
    }
}

/// DISCONNECT and AUTH: omit what is default (a success with no properties
/// is a zero-length body; DISCONNECT may also stop after the reason code).
fn reason_and_props(
    buf: &mut BytesMut,
    first: u8,
    reason: ReasonCode,
    props: &Properties,
    reason_only: bool,
) -> Result<(), EncodeError> {
    if props.is_empty() {
        if reason == ReasonCode::SUCCESS {
            return put_header(buf, first, 0);
        }
        if !reason_only {
            put_header(buf, first, 2)?;
            buf.put_u8(reason.0);
            buf.put_u8(0);
            return Ok(());
        }
        put_header(buf, first, 1)?;
        buf.put_u8(reason.0);
        return Ok(());
    }
    put_header(buf, first, 1 + props.encoded_len())?;
    buf.put_u8(reason.0);
    props.encode(buf)
}
