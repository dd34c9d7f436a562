//! The on-disk framing of log records and snapshots, and the scan that
//! reads them back.
//!
//! A log record is a 20-byte header and its payload:
//! `len u32 | seq u64 | payload crc u32 | header crc u32` (little endian),
//! the header's own checksum covering the 16 bytes before it. A header
//! that checks out but whose payload runs past the end of the file is a
//! torn last write (power failed while appending it); any checksum that
//! does not check out is corruption. Telling the two apart needs the
//! header checksum: a flipped bit in a length would otherwise read as a
//! torn tail and silently drop every record after it.

/// Bytes before each record's payload.
pub const HEADER: usize = 20;

/// Largest payload a record may have: larger lengths are corruption (the
/// broker's batches are far smaller; a snapshot is not a record).
pub const MAX_RECORD: usize = 256 << 20;

/// Appends one record to `out`.
pub fn encode(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let hcrc = crc32fast::hash(out.get(start..).unwrap_or_default());
    out.extend_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(payload);
}

/// One record found by [`scan`]: its number and where its payload is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The record's sequence number.
    pub seq: u64,
    /// Where its payload starts in the scanned bytes.
    pub start: usize,
    /// Where it ends.
    pub end: usize,
}

/// How a scan ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// At the end of the bytes, after a whole record.
    Clean,
    /// A record starting at this offset was cut short: a torn write.
    Torn(usize),
    /// A record at this offset does not check out.
    Corrupt(usize, &'static str),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        x.copy_from_slice(s);
    }
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        x.copy_from_slice(s);
    }
    u64::from_le_bytes(x)
}

/// Reads every whole record of `bytes`, in order, and says how the bytes
/// ended. Sequence numbers must rise.
pub fn scan(bytes: &[u8]) -> (Vec<Found>, Tail) {
    let mut found = Vec::new();
    let mut at = 0usize;
    let mut last = 0u64;
    loop {
        let Some(header) = bytes.get(at..at + HEADER) else {
            let tail = if at == bytes.len() {
                Tail::Clean
            } else {
                Tail::Torn(at)
            };
            return (found, tail);
        };
        let hcrc = crc32fast::hash(header.get(..16).unwrap_or_default());
        if hcrc != u32_at(header, 16) {
            return (found, Tail::Corrupt(at, "record header checksum mismatch"));
        }
        let len = u32_at(header, 0) as usize;
        let seq = u64_at(header, 4);
        if len > MAX_RECORD {
            return (found, Tail::Corrupt(at, "record length out of range"));
        }
        if seq <= last && last != 0 {
            return (found, Tail::Corrupt(at, "record sequence number went back"));
        }
        let start = at + HEADER;
        let Some(payload) = bytes.get(start..start + len) else {
            return (found, Tail::Torn(at));
        };
        if crc32fast::hash(payload) != u32_at(header, 12) {
            return (found, Tail::Corrupt(at, "record payload checksum mismatch"));
        }
        found.push(Found {
            seq,
            start,
            end: start + len,
        });
        last = seq;
        at = start + len;
    }
}

/// A snapshot file's first bytes.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"MQLBSNAP";

/// A snapshot file: magic, `covers u64`, `len u64`, `crc u32`, payload.
pub fn encode_snapshot(covers: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(28 + payload.len());
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&covers.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads a snapshot file: what it covers and its payload.
pub fn decode_snapshot(bytes: &[u8]) -> Result<(u64, &[u8]), &'static str> {
    if bytes.get(..8) != Some(&SNAPSHOT_MAGIC[..]) {
        return Err("not a snapshot file (bad magic)");
    }
    let covers = u64_at(bytes, 8);
    let len = usize::try_from(u64_at(bytes, 16)).map_err(|_| "snapshot length out of range")?;
    let payload = bytes
        .get(28..)
        .filter(|p| p.len() == len)
        .ok_or("snapshot length does not match the file (torn or truncated)")?;
    if crc32fast::hash(payload) != u32_at(bytes, 24) {
        return Err("snapshot checksum mismatch");
    }
    Ok((covers, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for s in 1..=n {
            encode(s, format!("record {s}").as_bytes(), &mut out);
        }
        out
    }

    #[test]
    fn whole_records_read_back() {
        let b = log(3);
        let (found, tail) = scan(&b);
        assert_eq!(tail, Tail::Clean);
        assert_eq!(found.len(), 3);
        assert_eq!(b.get(found[2].start..found[2].end), Some(&b"record 3"[..]));
    }

    /// Cut anywhere inside the last record: the records before it read
    /// back and the tail is torn at that record's start.
    #[test]
    fn a_cut_anywhere_is_a_torn_tail() {
        let b = log(3);
        let last_start = scan(&b).0[2].start - HEADER;
        for cut in last_start + 1..b.len() {
            let (found, tail) = scan(&b[..cut]);
            assert_eq!(found.len(), 2, "cut at {cut}");
            assert_eq!(tail, Tail::Torn(last_start), "cut at {cut}");
        }
    }

    /// Any single flipped bit is corruption at its record (never a torn
    /// tail, never a clean read).
    #[test]
    fn every_flipped_bit_is_found() {
        let b = log(3);
        let second = scan(&b).0[1].start - HEADER;
        let third = scan(&b).0[2].start - HEADER;
        for byte in second..third {
            for bit in 0..8 {
                let mut c = b.clone();
                c[byte] ^= 1 << bit;
                let (found, tail) = scan(&c);
                assert_eq!(found.len(), 1, "byte {byte} bit {bit}");
                assert!(
                    matches!(tail, Tail::Corrupt(at, _) if at == second),
                    "byte {byte} bit {bit}: {tail:?}"
                );
            }
        }
    }

    #[test]
    fn snapshots_check_out_or_are_refused() {
        let s = encode_snapshot(42, b"state");
        assert_eq!(decode_snapshot(&s), Ok((42, &b"state"[..])));
        let mut bad = s.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode_snapshot(&bad).is_err());
        assert!(decode_snapshot(&s[..s.len() - 1]).is_err());
    }
}
