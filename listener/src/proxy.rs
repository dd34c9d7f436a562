//! The PROXY protocol header (v1 or v2) that a trusted network load
//! balancer sends before anything else: the client's real address.
//!
//! Parsing is the `ppp` crate's; this module bounds it: the whole header
//! must arrive within the caller's deadline and within
//! [`MAX_PROXY_HEADER`] bytes, and a v2 header announcing more is refused
//! as soon as its length field arrives.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{timeout_at, Instant};

/// The PROXY protocol v2 signature.
pub const PROXY_V2: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Largest PROXY header accepted (v1 is at most 107 bytes; v2 carries TLVs).
pub const MAX_PROXY_HEADER: usize = 1024;

/// Why no valid header arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// Malformed, oversized, or not a PROXY header at all.
    Bad(String),
    /// The deadline passed first.
    Timeout,
    /// The peer closed (or the read failed) mid-header.
    Closed,
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyError::Bad(d) => f.write_str(d),
            ProxyError::Timeout => f.write_str("no PROXY header in time"),
            ProxyError::Closed => f.write_str("closed during the PROXY header"),
        }
    }
}

/// Whether `buf` starts like a PROXY protocol header (v1 or v2): on a
/// listener that expects none, this is an untrusted source trying.
pub fn looks_like_proxy(buf: &[u8]) -> bool {
    // A prefix of either signature (or the whole of it).
    let prefix_of = |sig: &[u8]| buf.iter().zip(sig).all(|(a, b)| a == b);
    prefix_of(b"PROXY ") || prefix_of(&PROXY_V2[..])
}

/// Reads the header within `timeout`; returns the client's real address
/// (`None` for a LOCAL or UNKNOWN header: the load balancer's own
/// connection, such as a health check) and the bytes read after the header.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(Option<SocketAddr>, BytesMut), ProxyError> {
    use ppp::{v1, v2, HeaderResult, PartialResult};
    let deadline = Instant::now() + timeout;
    let mut buf = BytesMut::with_capacity(256);
    loop {
        if !buf.is_empty() && !looks_like_proxy(&buf) {
            return Err(ProxyError::Bad(
                "no PROXY protocol header from a trusted source".into(),
            ));
        }
        let parsed = HeaderResult::parse(&buf);
        if !parsed.is_incomplete() {
            let (addr, used) = match parsed {
                HeaderResult::V1(Ok(h)) => {
                    let addr = match h.addresses {
                        v1::Addresses::Tcp4(a) => Some((a.source_address.into(), a.source_port)),
                        v1::Addresses::Tcp6(a) => Some((a.source_address.into(), a.source_port)),
                        v1::Addresses::Unknown => None,
                    };
                    (addr, h.header.len())
                }
                HeaderResult::V2(Ok(h)) => {
                    let addr = match (h.command, h.addresses) {
                        (v2::Command::Local, _) => None,
                        (_, v2::Addresses::IPv4(a)) => {
                            Some((a.source_address.into(), a.source_port))
                        }
                        (_, v2::Addresses::IPv6(a)) => {
                            Some((a.source_address.into(), a.source_port))
                        }
                        _ => None,
                    };
                    (addr, h.len())
                }
                HeaderResult::V1(Err(e)) => {
                    return Err(ProxyError::Bad(format!("bad PROXY v1 header: {e}")))
                }
                HeaderResult::V2(Err(e)) => {
                    return Err(ProxyError::Bad(format!("bad PROXY v2 header: {e}")))
                }
            };
            let rest = buf.split_off(used.min(buf.len()));
            let addr = addr.map(|(ip, port): (std::net::IpAddr, u16)| SocketAddr::new(ip, port));
            return Ok((addr, rest));
        }
        // A v2 header announces its length: refuse a bogus one at once.
        if let (Some(sig), Some(&[hi, lo])) = (buf.get(..12), buf.get(14..16)) {
            let len = 16 + usize::from(u16::from_be_bytes([hi, lo]));
            if *sig == PROXY_V2[..] && len > MAX_PROXY_HEADER {
                return Err(ProxyError::Bad(format!("PROXY v2 header of {len} bytes")));
            }
        }
        if buf.len() >= MAX_PROXY_HEADER {
            return Err(ProxyError::Bad("PROXY header too long".into()));
        }
        buf.reserve(256);
        let read = {
            let room = (MAX_PROXY_HEADER - buf.len()) as u64;
            let mut limited = (&mut *stream).take(room);
            timeout_at(deadline, limited.read_buf(&mut buf)).await
        };
        match read {
            Ok(Ok(n)) if n > 0 => {}
            Err(_) => return Err(ProxyError::Timeout),
            _ => return Err(ProxyError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn v1_gives_the_address_and_keeps_what_follows() {
        let (mut c, mut s) = tokio::io::duplex(1024);
        c.write_all(b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 1883\r\n\x10\x00")
            .await
            .ok();
        let r = read_header(&mut s, Duration::from_secs(1)).await;
        let Ok((addr, rest)) = r else { panic!("{r:?}") };
        assert_eq!(addr, "10.1.2.3:5555".parse().ok());
        assert_eq!(&rest[..], b"\x10\x00");
    }

    #[tokio::test]
    async fn a_bogus_v2_length_is_refused_at_once() {
        let (mut c, mut s) = tokio::io::duplex(1024);
        let mut h = PROXY_V2.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        c.write_all(&h).await.ok();
        let r = read_header(&mut s, Duration::from_secs(5)).await;
        assert!(matches!(r, Err(ProxyError::Bad(_))), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_header_times_out() {
        let (mut c, mut s) = tokio::io::duplex(1024);
        c.write_all(b"PROXY TCP4").await.ok();
        let r = read_header(&mut s, Duration::from_secs(1)).await;
        assert_eq!(r, Err(ProxyError::Timeout));
    }

    #[tokio::test]
    async fn mqtt_instead_of_a_header_is_refused() {
        let (mut c, mut s) = tokio::io::duplex(1024);
        c.write_all(b"\x10\x10\x00\x04MQTT").await.ok();
        let r = read_header(&mut s, Duration::from_secs(1)).await;
        assert!(matches!(r, Err(ProxyError::Bad(_))), "{r:?}");
    }
}
