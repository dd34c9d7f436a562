//! A bounded, panic-free reader over a borrowed frame body.
//!
//! Every read is checked; running past the end of a field is reported as
//! malformed (the frame is complete, so a short field is never "need more").
//! `sub` confines a length-prefixed section, and `finish` rejects trailing
//! bytes, following rustls' `Reader`.

use crate::DecodeError;

/// Cursor over one frame body (or a section of it).
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let (head, _) = self
            .left()
            .split_at_checked(n)
            .ok_or(DecodeError::Malformed(what))?;
        self.pos += n;
        Ok(head)
    }

    /// What has not been read yet.
    fn left(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    /// The next `N` bytes, as an array.
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        self.take(N, what)?
            .try_into()
            .map_err(|_| DecodeError::Malformed(what))
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let rest = self.left();
        self.pos = self.buf.len();
        rest
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    /// A variable byte integer, at most 4 bytes and minimally encoded.
    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        match crate::framing::decode_varint(self.left()) {
            Ok(Some((value, used))) => {
                self.pos += used;
                Ok(value)
            }
            Ok(None) => Err(DecodeError::Malformed(what)),
            Err(e) => Err(e),
        }
    }

    /// A u16-length-prefixed binary field.
    pub(crate) fn binary(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }

    /// A u16-length-prefixed UTF-8 string, checked per MQTT 1.5.4: well-formed
    /// UTF-8 without U+0000.
    pub(crate) fn string(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let raw = self.binary(what)?;
        check_utf8(raw, what)
    }

    /// Rejects trailing bytes.
    pub(crate) fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(what))
        }
    }
}

/// MQTT strings are UTF-8 without U+0000 (1.5.4). Surrogates cannot occur in
/// valid Rust UTF-8, so `from_utf8` already rejects them.
pub(crate) fn check_utf8<'a>(raw: &'a [u8], what: &'static str) -> Result<&'a str, DecodeError> {
    let s = std::str::from_utf8(raw).map_err(|_| DecodeError::Malformed(what))?;
    if raw.contains(&0) {
        return Err(DecodeError::Malformed(what));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reads_are_malformed_not_panics() {
        let mut r = Reader::new(&[0x00]);
        assert!(r.u16("x").is_err());
        let mut r = Reader::new(&[0x00, 0x05, b'a']);
        assert_eq!(r.string("s"), Err(DecodeError::Malformed("s")));
    }

    #[test]
    fn nul_and_bad_utf8_rejected() {
        assert!(check_utf8(b"a\0b", "t").is_err());
        assert!(check_utf8(&[0xC3, 0x28], "t").is_err());
        assert!(check_utf8(&[0xED, 0xA0, 0x80], "t").is_err(), "surrogate");
        assert_eq!(check_utf8("é".as_bytes(), "t"), Ok("é"));
    }
}
