//! Framing: the fixed header and the remaining-length variable byte integer.
//!
//! `check` is the first of the two decode passes (mini-redis style): it proves
//! a whole frame is buffered without allocating, and enforces the maximum
//! packet size before the body is buffered, so a peer cannot make us hold a
//! 256 MiB frame.

use bytes::BufMut;

use crate::{DecodeError, EncodeError};

/// The largest remaining length a 4-byte variable byte integer can carry.
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// The packet type nibble of a fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    /// Client request to connect.
    Connect = 1,
    /// Connect acknowledgement.
    Connack = 2,
    /// Publish message.
    Publish = 3,
    /// QoS 1 acknowledgement.
    Puback = 4,
    /// QoS 2, part 1.
    Pubrec = 5,
    /// QoS 2, part 2.
    Pubrel = 6,
    /// QoS 2, part 3.
    Pubcomp = 7,
    /// Subscribe request.
    Subscribe = 8,
    /// Subscribe acknowledgement.
    Suback = 9,
    /// Unsubscribe request.
    Unsubscribe = 10,
    /// Unsubscribe acknowledgement.
    Unsuback = 11,
    /// Ping request.
    Pingreq = 12,
    /// Ping response.
    Pingresp = 13,
    /// Disconnect notification.
    Disconnect = 14,
    /// Authentication exchange (MQTT 5 only).
    Auth = 15,
}

impl PacketType {
    /// Parses the high nibble of the first header byte. 0 is reserved.
    pub fn from_nibble(n: u8) -> Option<Self> {
        Some(match n {
            1 => Self::Connect,
            2 => Self::Connack,
            3 => Self::Publish,
            4 => Self::Puback,
            5 => Self::Pubrec,
            6 => Self::Pubrel,
            7 => Self::Pubcomp,
            8 => Self::Subscribe,
            9 => Self::Suback,
            10 => Self::Unsubscribe,
            11 => Self::Unsuback,
            12 => Self::Pingreq,
            13 => Self::Pingresp,
            14 => Self::Disconnect,
            15 => Self::Auth,
            _ => return None,
        })
    }

    /// The flags nibble the spec fixes for this type; `None` for PUBLISH,
    /// whose flags carry DUP, QoS and RETAIN.
    pub fn required_flags(self) -> Option<u8> {
        match self {
            Self::Publish => None,
            Self::Pubrel | Self::Subscribe | Self::Unsubscribe => Some(0b0010),
            _ => Some(0),
        }
    }
}

/// A checked fixed header: a whole frame of `header_len + remaining` bytes is buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Packet type.
    pub packet_type: PacketType,
    /// The low nibble of the first byte.
    pub flags: u8,
    /// Bytes taken by the fixed header (2 to 5).
    pub header_len: usize,
    /// Remaining length: the body size.
    pub remaining: usize,
}

impl FrameHeader {
    /// Total frame size.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining
    }
}

/// Decodes a variable byte integer. `Ok(None)` means more bytes are needed.
/// Rejects a fifth continuation byte and non-minimal encodings (for example
/// `0x80 0x00` for zero), which lenient codecs accept.
pub fn decode_varint(buf: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return Err(DecodeError::Malformed("non-minimal variable byte integer"));
            }
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::Malformed(
        "variable byte integer longer than 4 bytes",
    ))
}

/// Number of bytes `value` takes as a variable byte integer.
pub fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Appends `value` as a variable byte integer.
pub fn put_varint(buf: &mut (impl BufMut + ?Sized), value: usize) -> Result<(), EncodeError> {
    if value > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge);
    }
    let mut v = value;
    loop {
        let mut byte = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if v == 0 {
            return Ok(());
        }
    }
}

/// Checks whether `buf` starts with a complete frame no larger than `max_frame`.
///
/// * `Ok(None)`: need more bytes; nothing is consumed.
/// * `Ok(Some(header))`: `buf[..header.frame_len()]` is one whole frame.
/// * `Err`: the stream is unusable (bad type or flags, bad length, too large).
///
/// The size limit is applied to the announced length, before the body arrives.
pub fn check(buf: &[u8], max_frame: usize) -> Result<Option<FrameHeader>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let packet_type = PacketType::from_nibble(first >> 4)
        .ok_or(DecodeError::Malformed("reserved packet type 0"))?;
    let flags = first & 0x0F;
    if let Some(required) = packet_type.required_flags() {
        if flags != required {
            return Err(DecodeError::Malformed("reserved fixed header flags"));
        }
    }
    let Some((remaining, used)) = decode_varint(buf.get(1..).unwrap_or_default())? else {
        return Ok(None);
    };
    let remaining = remaining as usize;
    let header_len = 1 + used;
    let size = header_len + remaining;
    if size > max_frame {
        return Err(DecodeError::TooLarge {
            size,
            max: max_frame,
        });
    }
    if buf.len() < size {
        return Ok(None);
    }
    Ok(Some(FrameHeader {
        packet_type,
        flags,
        header_len,
        remaining,
    }))
}

/// Tracks packet boundaries in a byte stream without decoding packets.
///
/// The balancer's backend→client direction feeds every chunk through this, so
/// it knows when the stream sits between two packets and a DISCONNECT can be
/// injected without corrupting the client's view. Cost: one pass over the
/// fixed headers; bodies are skipped by length.
#[derive(Debug, Clone, Default)]
pub struct BoundaryTracker {
    state: TrackState,
    packets: u64,
}

#[derive(Debug, Clone, Copy, Default)]
enum TrackState {
    /// Expecting the first byte of a packet.
    #[default]
    Boundary,
    /// Reading the remaining length; `shift` is the next 7-bit group.
    Length { value: usize, shift: u32 },
    /// Skipping this many body bytes.
    Body(usize),
}

impl BoundaryTracker {
    /// Feeds the next chunk of the stream. Returns an error if the remaining
    /// length is not a valid variable byte integer: the stream is not MQTT.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), DecodeError> {
        while let Some((&byte, after)) = chunk.split_first() {
            match self.state {
                TrackState::Boundary => {
                    chunk = after;
                    self.state = TrackState::Length { value: 0, shift: 0 };
                }
                TrackState::Length { value, shift } => {
                    chunk = after;
                    let value = value | (usize::from(byte & 0x7F) << shift);
                    if byte & 0x80 == 0 {
                        self.state = if value == 0 {
                            self.packets += 1;
                            TrackState::Boundary
                        } else {
                            TrackState::Body(value)
                        };
                    } else if shift >= 21 {
                        return Err(DecodeError::Malformed(
                            "variable byte integer longer than 4 bytes",
                        ));
                    } else {
                        self.state = TrackState::Length {
                            value,
                            shift: shift + 7,
                        };
                    }
                }
                TrackState::Body(left) => {
                    let n = left.min(chunk.len());
                    chunk = chunk.get(n..).unwrap_or_default();
                    if n == left {
                        self.packets += 1;
                        self.state = TrackState::Boundary;
                    } else {
                        self.state = TrackState::Body(left - n);
                    }
                }
            }
        }
        Ok(())
    }

    /// True when everything fed so far ends exactly at a packet boundary.
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, TrackState::Boundary)
    }

    /// Bytes still to come before the packet in progress ends: 0 at a
    /// boundary, `None` while the remaining length itself is incomplete
    /// (at least one more byte is needed to know).
    pub fn to_boundary(&self) -> Option<usize> {
        match self.state {
            TrackState::Boundary => Some(0),
            TrackState::Length { .. } => None,
            TrackState::Body(left) => Some(left),
        }
    }

    /// Number of whole packets seen.
    pub fn packets(&self) -> u64 {
        self.packets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_golden_values() {
        for (bytes, value) in [
            (&[0x00][..], 0u32),
            (&[0x7F], 127),
            (&[0x80, 0x01], 128),
            (&[0xFF, 0x7F], 16_383),
            (&[0x80, 0x80, 0x01], 16_384),
            (&[0xFF, 0xFF, 0xFF, 0x7F], 268_435_455),
        ] {
            assert_eq!(decode_varint(bytes), Ok(Some((value, bytes.len()))));
            let mut out = Vec::new();
            put_varint(&mut out, value as usize).unwrap();
            assert_eq!(out, bytes);
            assert_eq!(varint_len(value as usize), bytes.len());
        }
    }

    #[test]
    fn varint_rejects_five_bytes_and_non_minimal() {
        assert!(decode_varint(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]).is_err());
        assert!(decode_varint(&[0x80, 0x00]).is_err());
        assert!(decode_varint(&[0x80, 0x80, 0x00]).is_err());
        assert_eq!(decode_varint(&[0x80]), Ok(None));
    }

    #[test]
    fn check_needs_more_then_frames() {
        let frame = [0x30, 0x03, 0x00, 0x01, b'a'];
        for cut in 0..frame.len() {
            assert_eq!(check(&frame[..cut], 1024), Ok(None), "cut {cut}");
        }
        let h = check(&frame, 1024).unwrap().unwrap();
        assert_eq!(h.frame_len(), 5);
        assert_eq!(h.packet_type, PacketType::Publish);
    }

    #[test]
    fn check_enforces_size_before_body() {
        // Announces 1000 bytes; only the header is buffered.
        let err = check(&[0x30, 0xE8, 0x07], 100).unwrap_err();
        assert_eq!(
            err,
            DecodeError::TooLarge {
                size: 1003,
                max: 100
            }
        );
        assert_eq!(err.reason_code(), crate::ReasonCode::PACKET_TOO_LARGE);
    }

    #[test]
    fn check_rejects_reserved_flags_and_type() {
        assert!(check(&[0x00, 0x00], 10).is_err());
        assert!(check(&[0xC1, 0x00], 10).is_err(), "PINGREQ flags");
        assert!(check(&[0x60, 0x02, 0, 1], 10).is_err(), "PUBREL needs 0010");
        assert!(
            check(&[0x80, 0x02, 0, 1], 10).is_err(),
            "SUBSCRIBE needs 0010"
        );
        assert!(check(&[0x62, 0x02, 0, 1], 10).unwrap().is_some());
    }

    #[test]
    fn tracker_finds_boundaries_at_every_split() {
        let stream = [
            0x20, 0x02, 0x00, 0x00, // CONNACK
            0xD0, 0x00, // PINGRESP
            0x30, 0x82, 0x01, // PUBLISH, remaining 130
        ];
        let mut full = stream.to_vec();
        full.extend(std::iter::repeat_n(0u8, 130));
        for split in 0..full.len() {
            let mut t = BoundaryTracker::default();
            t.feed(&full[..split]).unwrap();
            t.feed(&full[split..]).unwrap();
            assert!(t.at_boundary());
            assert_eq!(t.packets(), 3);
        }
        let mut t = BoundaryTracker::default();
        t.feed(&full[..5]).unwrap();
        assert!(!t.at_boundary());
        t.feed(&full[5..6]).unwrap();
        assert!(t.at_boundary());
        assert_eq!(t.to_boundary(), Some(0));
        // Reading exactly `to_boundary` bytes at a time ends on the boundary.
        let mut t = BoundaryTracker::default();
        t.feed(&full[..8]).unwrap(); // inside the PUBLISH's remaining length
        assert_eq!(t.to_boundary(), None);
        let mut at = 8;
        while !t.at_boundary() {
            let n = t.to_boundary().unwrap_or(1);
            t.feed(&full[at..at + n]).unwrap();
            at += n;
        }
        assert_eq!(at, full.len());
    }
}
