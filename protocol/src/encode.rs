//! Encoding helpers: length-prefixed fields with checked lengths.
//!
//! Unlike codecs that cast `len() as u16`, an over-long field is an error,
//! never a silently truncated length.

use bytes::BufMut;

use crate::{framing, EncodeError};

/// Writes a u16-length-prefixed binary or string field.
pub(crate) fn put_binary(
    buf: &mut (impl BufMut + ?Sized),
    data: &[u8],
    what: &'static str,
) -> Result<(), EncodeError> {
    let len = u16::try_from(data.len()).map_err(|_| EncodeError::FieldTooLong(what))?;
    buf.put_u16(len);
    buf.put_slice(data);
    Ok(())
}

/// Size of a length-prefixed field.
pub(crate) fn field_len(data: &[u8]) -> usize {
    2 + data.len()
}

/// Writes the fixed header for a body of `remaining` bytes.
pub(crate) fn put_header(
    buf: &mut impl BufMut,
    first_byte: u8,
    remaining: usize,
) -> Result<(), EncodeError> {
    buf.put_u8(first_byte);
    framing::put_varint(buf, remaining)
}
