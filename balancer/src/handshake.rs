//! Reading the client's CONNECT: deadline, size cap, strict parse.
//!
//! Nothing is forwarded and no backend is contacted until this returns a
//! valid CONNECT. The deadline covers the whole CONNECT, not each read, so a
//! client sending one byte a second (slowloris) is cut off on time.

use std::time::Duration;

use bytes::BytesMut;
use mqlb_protocol::{sniff_connect, ProtocolVersion, RefusalStyle, Rejection, Sniff};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

use crate::metrics::RejectReason;

/// A valid CONNECT and everything read with it.
#[derive(Debug)]
pub struct Handshake {
    /// All bytes read from the client so far: the CONNECT first, then
    /// whatever the client pipelined after it. Forwarded verbatim.
    pub buf: BytesMut,
    /// Length of the CONNECT frame at the start of `buf`.
    pub connect_len: usize,
    /// The client's protocol version.
    pub version: ProtocolVersion,
    /// The client ID (may be empty).
    pub client_id: String,
    /// Whether a Mosquitto-style bridge connected.
    pub bridge: bool,
    /// The CONNECT's user name, for routing rules.
    pub username: Option<String>,
}

/// Why no valid CONNECT arrived, with the bytes to answer (if any).
#[derive(Debug)]
pub struct Refused {
    /// Metric label.
    pub reason: RejectReason,
    /// Detail for logs.
    pub detail: String,
    /// CONNACK to send before closing; `None` means close silently.
    pub reply: Option<&'static [u8]>,
}

/// Reads the PROXY protocol header (v1 or v2) that a trusted load balancer
/// sends first, under the CONNECT deadline: the client's real address
/// (`None` for a LOCAL or UNKNOWN header) and the bytes read after it.
pub async fn read_proxy_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(Option<std::net::SocketAddr>, BytesMut), Refused> {
    use mqlb_listener::proxy::{read_header, ProxyError};
    read_header(stream, timeout).await.map_err(|e| {
        let reason = match e {
            ProxyError::Bad(_) => RejectReason::ProxyHeader,
            ProxyError::Timeout => RejectReason::Timeout,
            ProxyError::Closed => RejectReason::ClosedEarly,
        };
        let detail = match e {
            ProxyError::Timeout => format!("no PROXY header within {timeout:?}"),
            e => e.to_string(),
        };
        Refused {
            reason,
            detail,
            reply: None,
        }
    })
}

/// Reads until a whole, valid CONNECT of at most `max_size` bytes is buffered,
/// or `timeout` passes. A refusal is answered in `style`. `initial` holds
/// bytes already read (after a PROXY header), possibly nothing.
pub async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
    max_size: usize,
    style: RefusalStyle,
    initial: BytesMut,
) -> Result<Handshake, Refused> {
    let deadline = Instant::now() + timeout;
    // Most CONNECTs are under 256 bytes; grow only as the header demands.
    let mut buf = initial;
    buf.reserve(512);
    loop {
        match sniff_connect(&buf, max_size) {
            Sniff::Connect { connect, frame_len } => {
                let client_id = connect.client_id.to_string();
                let version = connect.version;
                let bridge = connect.bridge;
                let username = connect.username.map(str::to_string);
                return Ok(Handshake {
                    username,
                    buf,
                    connect_len: frame_len,
                    version,
                    client_id,
                    bridge,
                });
            }
            Sniff::Reject(r) => return Err(refusal(&buf, r, style)),
            Sniff::NeedMore => {}
        }
        // Never read past the size cap, whatever the client sends.
        let room = max_size.saturating_sub(buf.len()).max(1);
        // Grow only when full: every connecting client holds this buffer,
        // and a fresh process keeps the peak (50 connecting at once with
        // 4 KiB each were 0.2 KiB of RSS per connection of a 1,000 fleet).
        if buf.len() == buf.capacity() {
            buf.reserve(room.min(4096));
        }
        let read = {
            let mut limited = (&mut *stream).take(room as u64);
            timeout_at(deadline, limited.read_buf(&mut buf)).await
        };
        match read {
            Err(_) => {
                return Err(Refused {
                    reason: RejectReason::Timeout,
                    detail: format!(
                        "no complete CONNECT within {timeout:?} ({} bytes read)",
                        buf.len()
                    ),
                    reply: None,
                })
            }
            Ok(Ok(0)) => {
                return Err(Refused {
                    reason: RejectReason::ClosedEarly,
                    detail: format!(
                        "closed after {} bytes, before a complete CONNECT",
                        buf.len()
                    ),
                    reply: None,
                })
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(Refused {
                    reason: RejectReason::ClosedEarly,
                    detail: format!("read error before a complete CONNECT: {e}"),
                    reply: None,
                })
            }
        }
    }
}

fn refusal(buf: &[u8], r: Rejection, style: RefusalStyle) -> Refused {
    let reason = if mqlb_listener::proxy::looks_like_proxy(buf) {
        // A PROXY header where none is expected: an untrusted source.
        RejectReason::ProxyUntrusted
    } else if buf.first() == Some(&mqlb_listener::tls::HANDSHAKE_RECORD) {
        RejectReason::TlsOnPlain
    } else if buf.first() != Some(&0x10) {
        RejectReason::NotConnect
    } else {
        RejectReason::from_decode(&r.error)
    };
    Refused {
        reason,
        detail: r.error.to_string(),
        reply: r.connack(style),
    }
}

/// Sends a refusal CONNACK, bounded in time so a client that does not read
/// cannot hold the task. Errors are irrelevant: the connection closes anyway.
pub async fn send_reply<S: AsyncWrite + Unpin>(stream: &mut S, reply: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(reply).await?;
        stream.flush().await?;
        stream.shutdown().await
    })
    .await;
}

/// The CONNACK for "no backend could take you": v5 reason 0x88 Server
/// unavailable, 3.x return code 3.
pub fn server_unavailable(version: ProtocolVersion) -> &'static [u8] {
    if version.is_v5() {
        &[0x20, 0x03, 0x00, 0x88, 0x00]
    } else {
        &[0x20, 0x02, 0x00, 0x03]
    }
}

/// Puts a verified client certificate's identity into the buffered
/// CONNECT: as the user name (a client-supplied one is replaced, never
/// trusted) or as the client ID (which then places the client). The
/// CONNECT is decoded, changed and re-encoded by our codec, then decoded
/// again, so what the broker gets is as strictly valid as what came in.
pub fn rewrite_identity(
    hs: &mut Handshake,
    field: mqlb_config::IdentityAs,
    identity: &str,
) -> Result<(), String> {
    use mqlb_protocol::{decode, MqttStr, Packet};
    let (connect, rest) = hs
        .buf
        .split_at_checked(hs.connect_len)
        .ok_or("the buffered CONNECT is shorter than its length")?;
    let mut frame = BytesMut::from(connect);
    let Ok(Some(Packet::Connect(mut c))) = decode(&mut frame, ProtocolVersion::V5, 1 << 20) else {
        return Err("the buffered CONNECT no longer decodes".into());
    };
    let name = MqttStr::try_from(identity)
        .map_err(|_| format!("certificate identity {identity:?} is not an MQTT string"))?;
    match field {
        mqlb_config::IdentityAs::Username => c.username = Some(name),
        mqlb_config::IdentityAs::ClientId => c.client_id = name,
    }
    let version = c.version;
    let bytes = Packet::Connect(c.clone())
        .to_bytes(version)
        .map_err(|e| format!("CONNECT with the certificate identity does not encode: {e:?}"))?;
    let mut check = BytesMut::from(&bytes[..]);
    match decode(&mut check, ProtocolVersion::V5, 1 << 20) {
        Ok(Some(Packet::Connect(_))) if check.is_empty() => {}
        other => {
            return Err(format!(
                "CONNECT with the certificate identity is not valid: {other:?}"
            ))
        }
    }
    let mut buf = BytesMut::with_capacity(bytes.len() + rest.len());
    buf.extend_from_slice(&bytes);
    buf.extend_from_slice(rest);
    hs.buf = buf;
    hs.connect_len = bytes.len();
    hs.client_id = c.client_id.to_string();
    hs.username = c.username.as_ref().map(|u| u.to_string());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECT: &[u8] = &[
        0x10, 0x0F, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 3, b'a', b'b', b'c',
    ];

    /// `read_connect` with close-style refusals and nothing read before.
    async fn read_plain<S: AsyncRead + Unpin>(
        s: &mut S,
        timeout: Duration,
        max: usize,
    ) -> Result<Handshake, Refused> {
        read_connect(s, timeout, max, RefusalStyle::Close, BytesMut::new()).await
    }

    #[tokio::test]
    async fn one_byte_writes_are_assembled() {
        let mut b = tokio_test_io(CONNECT.iter().map(|b| vec![*b]).collect());
        let hs = read_plain(&mut b, Duration::from_secs(5), 1024)
            .await
            .unwrap();
        assert_eq!(hs.client_id, "abc");
        assert_eq!(hs.connect_len, CONNECT.len());
    }

    #[tokio::test(start_paused = true)]
    async fn slowloris_times_out() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(&CONNECT[..5]).await.unwrap();
        let r = read_plain(&mut server, Duration::from_secs(10), 1024)
            .await
            .unwrap_err();
        assert_eq!(r.reason, RejectReason::Timeout);
    }

    #[tokio::test]
    async fn oversize_is_refused_without_reading_the_body() {
        // Announces a 2 KB CONNECT against a 100-byte cap.
        let (mut client, mut server) = tokio::io::duplex(64);
        client
            .write_all(&[0x10, 0xD0, 0x0F, 0, 4, b'M', b'Q', b'T', b'T', 5])
            .await
            .unwrap();
        let r = read_connect(
            &mut server,
            Duration::from_secs(5),
            100,
            RefusalStyle::ReasonCode,
            BytesMut::new(),
        )
        .await
        .unwrap_err();
        assert_eq!(r.reason, RejectReason::TooLarge);
        assert_eq!(r.reply, Some(&[0x20, 0x03, 0x00, 0x95, 0x00][..]));
    }

    #[tokio::test]
    async fn http_is_not_connect() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let r = read_plain(&mut server, Duration::from_secs(5), 100)
            .await
            .unwrap_err();
        assert_eq!(r.reason, RejectReason::NotConnect);
        assert_eq!(r.reply, None);
    }

    #[tokio::test]
    async fn eof_mid_connect_is_closed_early() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(&CONNECT[..7]).await.unwrap();
        drop(client);
        let r = read_plain(&mut server, Duration::from_secs(5), 100)
            .await
            .unwrap_err();
        assert_eq!(r.reason, RejectReason::ClosedEarly);
    }

    /// A reader that yields the given chunks one read at a time.
    fn tokio_test_io(chunks: Vec<Vec<u8>>) -> impl AsyncRead + Unpin {
        struct Chunks(std::collections::VecDeque<Vec<u8>>);
        impl AsyncRead for Chunks {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                if let Some(c) = self.0.pop_front() {
                    buf.put_slice(&c);
                }
                std::task::Poll::Ready(Ok(()))
            }
        }
        Chunks(chunks.into())
    }
}
