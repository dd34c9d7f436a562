//! CONNECT: the borrowed view (the balancer's sniffer), the owned packet, and encoding.
//!
//! There is one CONNECT parser, `ConnectView::parse`. The sniffer runs it on
//! the first bytes of a connection without allocating; `Connect::decode` runs
//! it on a frozen frame and slices the frame for zero-copy owned fields.

use bytes::{BufMut, Bytes};

use crate::encode::{field_len, put_binary, put_header};
use crate::framing::{self, PacketType};
use crate::properties::{PropertiesView, PropertyContext};
use crate::reader::Reader;
use crate::{DecodeError, EncodeError, MqttStr, Properties, ProtocolVersion, QoS};

/// CONNECT flag bits (3.1.2.3).
mod flags {
    pub const RESERVED: u8 = 0x01;
    pub const CLEAN_START: u8 = 0x02;
    pub const WILL: u8 = 0x04;
    pub const WILL_QOS_SHIFT: u8 = 3;
    pub const WILL_RETAIN: u8 = 0x20;
    pub const PASSWORD: u8 = 0x40;
    pub const USERNAME: u8 = 0x80;
}

/// The bridge bit some brokers (Mosquitto) set in the protocol level.
const BRIDGE_BIT: u8 = 0x80;

/// A CONNECT borrowed from the bytes it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectView<'a> {
    /// Protocol version, from name and level.
    pub version: ProtocolVersion,
    /// The 0x80 bridge bit was set in the level (Mosquitto bridges send 0x83/0x84).
    pub bridge: bool,
    /// Clean session (3.x) / clean start (5.0).
    pub clean_start: bool,
    /// Keep-alive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// CONNECT properties (empty before 5.0).
    pub properties: PropertiesView<'a>,
    /// Client identifier; may be empty.
    pub client_id: &'a str,
    /// The will, if the will flag is set.
    pub will: Option<WillView<'a>>,
    /// User name, if present.
    pub username: Option<&'a str>,
    /// Password, if present.
    pub password: Option<&'a [u8]>,
}

/// The will section of a CONNECT view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WillView<'a> {
    /// Will QoS.
    pub qos: QoS,
    /// Will retain flag.
    pub retain: bool,
    /// Will properties (empty before 5.0).
    pub properties: PropertiesView<'a>,
    /// Will topic.
    pub topic: &'a str,
    /// Will payload.
    pub payload: &'a [u8],
}

/// Reads the protocol name and level and maps them to a version.
fn read_version(r: &mut Reader<'_>) -> Result<(ProtocolVersion, bool), DecodeError> {
    let name = r.binary("protocol name")?;
    let raw_level = r.u8("protocol level")?;
    let (level, bridge) = match raw_level & !BRIDGE_BIT {
        l @ (3 | 4) if raw_level & BRIDGE_BIT != 0 => (l, true),
        _ => (raw_level, false),
    };
    let version = match (name, level) {
        (b"MQIsdp", 3) => ProtocolVersion::V3_1,
        (b"MQTT", 4) => ProtocolVersion::V3_1_1,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQTT" | b"MQIsdp", _) => return Err(DecodeError::UnsupportedProtocolLevel(raw_level)),
        _ => return Err(DecodeError::InvalidProtocolName),
    };
    Ok((version, bridge))
}

impl<'a> ConnectView<'a> {
    /// Parses a CONNECT body (the bytes after the fixed header).
    pub fn parse(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let (version, bridge) = read_version(&mut r)?;
        let f = r.u8("connect flags")?;
        if f & flags::RESERVED != 0 {
            return Err(DecodeError::Malformed("reserved connect flag set"));
        }
        let will_flag = f & flags::WILL != 0;
        let will_qos = QoS::from_bits((f >> flags::WILL_QOS_SHIFT) & 0x03)?;
        let will_retain = f & flags::WILL_RETAIN != 0;
        if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
            return Err(DecodeError::Malformed(
                "will QoS or retain set without will flag",
            ));
        }
        let has_username = f & flags::USERNAME != 0;
        let has_password = f & flags::PASSWORD != 0;
        if has_password && !has_username && !version.is_v5() {
            return Err(DecodeError::Malformed("password without user name"));
        }
        let keep_alive = r.u16("keep alive")?;
        let properties = if version.is_v5() {
            PropertiesView::parse(&mut r, PropertyContext::Connect)?
        } else {
            PropertiesView::default()
        };
        let client_id = r.string("client identifier")?;
        let will = if will_flag {
            let properties = if version.is_v5() {
                PropertiesView::parse(&mut r, PropertyContext::Will)?
            } else {
                PropertiesView::default()
            };
            let topic = r.string("will topic")?;
            if topic.is_empty() {
                return Err(DecodeError::Malformed("empty will topic"));
            }
            crate::check_topic_name(topic)?;
            let payload = r.binary("will payload")?;
            Some(WillView {
                qos: will_qos,
                retain: will_retain,
                properties,
                topic,
                payload,
            })
        } else {
            None
        };
        let username = if has_username {
            Some(r.string("user name")?)
        } else {
            None
        };
        let password = if has_password {
            Some(r.binary("password")?)
        } else {
            None
        };
        r.finish("trailing bytes after CONNECT")?;
        Ok(ConnectView {
            version,
            bridge,
            clean_start: f & flags::CLEAN_START != 0,
            keep_alive,
            properties,
            client_id,
            will,
            username,
            password,
        })
    }

    /// The v5 Session Expiry Interval, if set.
    pub fn session_expiry_interval(&self) -> Option<u32> {
        self.properties.iter().find_map(|p| match p {
            crate::Property::SessionExpiryInterval(v) => Some(v),
            _ => None,
        })
    }
}

/// What the sniffer made of the first bytes of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff<'a> {
    /// The CONNECT is not complete yet; read more and call again.
    NeedMore,
    /// A valid CONNECT occupying `buf[..frame_len]`.
    Connect {
        /// The parsed CONNECT.
        connect: ConnectView<'a>,
        /// Bytes the CONNECT frame takes at the start of the buffer.
        frame_len: usize,
    },
    /// Not a valid CONNECT; the connection must be refused.
    Reject(Rejection),
}

/// Why a connection's first bytes were refused, and how to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// What was wrong.
    pub error: DecodeError,
    /// The client's protocol version, when it could be read; it decides the
    /// CONNACK format.
    pub version: Option<ProtocolVersion>,
}

/// How a server answers a CONNECT it refuses before understanding it.
///
/// MQTT 5 allows both closing silently and sending CONNACK with a reason
/// code for a malformed or invalid CONNECT (4.13). A balancer must answer
/// exactly as the broker behind it would, or clients can tell it is there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RefusalStyle {
    /// Mosquitto's answers, byte for byte: close without a CONNACK, except
    /// for an unsupported protocol level, which gets 3.1.1 return code 1
    /// (MQTT-3.1.2-2; a client of unknown version cannot be assumed to read
    /// the v5 form).
    #[default]
    Close,
    /// As `Close`, but a malformed, invalid or oversized v5 CONNECT gets
    /// CONNACK 0x81 / 0x82 / 0x95 first, so the client learns why.
    ReasonCode,
}

impl Rejection {
    /// The CONNACK to send before closing, if any, in the given style:
    /// * an unsupported level: return code 1 in the 3.1.1 form;
    /// * a bad protocol name, a 3.x CONNECT, or non-MQTT bytes: nothing;
    /// * a malformed, invalid or oversized v5 CONNECT: nothing with
    ///   [`RefusalStyle::Close`], reason 0x81/0x82/0x95 with
    ///   [`RefusalStyle::ReasonCode`].
    pub fn connack(&self, style: RefusalStyle) -> Option<&'static [u8]> {
        match (self.error, self.version, style) {
            (DecodeError::UnsupportedProtocolLevel(_), _, _) => Some(&[0x20, 0x02, 0x00, 0x01]),
            (DecodeError::InvalidProtocolName, _, _) => None,
            (e, Some(ProtocolVersion::V5), RefusalStyle::ReasonCode) => match e.reason_code().0 {
                0x82 => Some(&[0x20, 0x03, 0x00, 0x82, 0x00]),
                0x95 => Some(&[0x20, 0x03, 0x00, 0x95, 0x00]),
                _ => Some(&[0x20, 0x03, 0x00, 0x81, 0x00]),
            },
            _ => None,
        }
    }
}

/// Inspects the first bytes of a connection for a CONNECT of at most
/// `max_frame` bytes. Allocates nothing.
///
/// The first byte is checked at once, so HTTP or TLS bytes are refused without
/// waiting for more; the size limit is checked on the announced length, so an
/// oversized CONNECT is refused before its body arrives.
pub fn sniff_connect(buf: &[u8], max_frame: usize) -> Sniff<'_> {
    let reject = |error, version| Sniff::Reject(Rejection { error, version });
    match buf.first() {
        None => return Sniff::NeedMore,
        Some(&0x10) => {}
        Some(_) => return reject(DecodeError::Protocol("first packet is not CONNECT"), None),
    }
    let header = match framing::check(buf, max_frame) {
        Ok(Some(h)) => h,
        Ok(None) => return Sniff::NeedMore,
        Err(error) => return reject(error, peek_version(buf)),
    };
    let Some(body) = buf.get(header.header_len..header.frame_len()) else {
        return Sniff::NeedMore;
    };
    match ConnectView::parse(body) {
        Ok(connect) => Sniff::Connect {
            connect,
            frame_len: header.frame_len(),
        },
        Err(error) => reject(
            error,
            read_version(&mut Reader::new(body)).ok().map(|v| v.0),
        ),
    }
}

/// Best effort: the protocol version of a CONNECT whose body is only partly
/// buffered, so an oversized v5 CONNECT can still be answered with 0x95.
fn peek_version(buf: &[u8]) -> Option<ProtocolVersion> {
    let (_, used) = framing::decode_varint(buf.get(1..)?).ok()??;
    read_version(&mut Reader::new(buf.get(1 + used..)?))
        .ok()
        .map(|v| v.0)
}

/// An owned CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Connect {
    pub version: ProtocolVersion,
    pub bridge: bool,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub properties: Properties,
    pub client_id: MqttStr,
    pub will: Option<Will>,
    pub username: Option<MqttStr>,
    pub password: Option<Bytes>,
}

/// A will message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Will {
    pub qos: QoS,
    pub retain: bool,
    pub properties: Properties,
    pub topic: MqttStr,
    pub payload: Bytes,
}

impl Connect {
    /// Decodes a CONNECT from a whole frame body held in `frame`.
    pub(crate) fn decode(frame: &Bytes, body: &[u8]) -> Result<Self, DecodeError> {
        let v = ConnectView::parse(body)?;
        let s = |x: &str| MqttStr::from_validated(frame.slice_ref(x.as_bytes()));
        let props = |pv| Properties::from_view(pv, frame);
        Ok(Connect {
            version: v.version,
            bridge: v.bridge,
            clean_start: v.clean_start,
            keep_alive: v.keep_alive,
            properties: props(v.properties),
            client_id: s(v.client_id),
            will: v.will.map(|w| Will {
                qos: w.qos,
                retain: w.retain,
                properties: props(w.properties),
                topic: s(w.topic),
                payload: frame.slice_ref(w.payload),
            }),
            username: v.username.map(s),
            password: v.password.map(|p| frame.slice_ref(p)),
        })
    }

    fn remaining_len(&self) -> usize {
        let v5 = self.version.is_v5();
        let mut n = field_len(self.version.protocol_name()) + 1 + 1 + 2;
        if v5 {
            n += self.properties.encoded_len();
        }
        n += field_len(self.client_id.as_bytes());
        if let Some(w) = &self.will {
            if v5 {
                n += w.properties.encoded_len();
            }
            n += field_len(w.topic.as_bytes()) + field_len(&w.payload);
        }
        if let Some(u) = &self.username {
            n += field_len(u.as_bytes());
        }
        if let Some(p) = &self.password {
            n += field_len(p);
        }
        n
    }

    pub(crate) fn encode(&self, buf: &mut impl BufMut) -> Result<(), EncodeError> {
        if self.password.is_some() && self.username.is_none() && !self.version.is_v5() {
            return Err(EncodeError::InvalidValue("password without user name"));
        }
        put_header(buf, (PacketType::Connect as u8) << 4, self.remaining_len())?;
        put_binary(buf, self.version.protocol_name(), "protocol name")?;
        let level = self.version.level() | if self.bridge { BRIDGE_BIT } else { 0 };
        buf.put_u8(level);
        let mut f = 0u8;
        if self.clean_start {
            f |= flags::CLEAN_START;
        }
        if let Some(w) = &self.will {
            f |= flags::WILL | ((w.qos as u8) << flags::WILL_QOS_SHIFT);
            if w.retain {
                f |= flags::WILL_RETAIN;
            }
        }
        if self.username.is_some() {
            f |= flags::USERNAME;
        }
        if self.password.is_some() {
            f |= flags::PASSWORD;
        }
        buf.put_u8(f);
        buf.put_u16(self.keep_alive);
        if self.version.is_v5() {
            self.properties.encode(buf)?;
        }
        put_binary(buf, self.client_id.as_bytes(), "client identifier")?;
        if let Some(w) = &self.will {
            if self.version.is_v5() {
                w.properties.encode(buf)?;
            }
            put_binary(buf, w.topic.as_bytes(), "will topic")?;
            put_binary(buf, &w.payload, "will payload")?;
        }
        if let Some(u) = &self.username {
            put_binary(buf, u.as_bytes(), "user name")?;
        }
        if let Some(p) = &self.password {
            put_binary(buf, p, "password")?;
        }
        Ok(())
    }
}
