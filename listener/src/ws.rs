//! MQTT over WebSocket on a listener: the HTTP upgrade, then binary frames
//! unwrapped into a byte stream, so that whatever reads MQTT from TCP (the
//! balancer's CONNECT parsing, placement, splicing and eviction; the
//! broker's sessions) reads it from WebSocket unchanged.
//!
//! The WebSocket protocol itself is tokio-tungstenite's (a well-kept,
//! widely used implementation: framing, masking rules, ping/pong, close
//! handshake, UTF-8 checks); this module adds what MQTT needs (RFC 6455 +
//! MQTT 5 §6):
//! * the upgrade must be for the configured path (404 otherwise) and, when
//!   the client offers subprotocols, one of `mqtt` or `mqttv3.1`, which is
//!   echoed back;
//! * the upgrade request is capped at [`MAX_UPGRADE`] bytes (tungstenite
//!   buffers headers without a limit) and must finish within the
//!   listener's CONNECT timeout;
//! * only binary frames carry MQTT: a text frame closes the connection
//!   (MQTT-6.0.0-1), and frames may split or join packets freely;
//! * pings are answered by tungstenite as it reads; every write leaves as
//!   one binary frame (an injected DISCONNECT included).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Largest HTTP upgrade request read before giving up.
pub const MAX_UPGRADE: usize = 16 << 10;

/// Largest WebSocket message accepted (a maximum-size MQTT packet and
/// change): bounded, whatever a frame header claims.
pub const MAX_MESSAGE: usize = 16 << 20;

/// Reads through to `inner`, failing once `left` bytes have been read while
/// capped (during the upgrade); uncapped afterwards.
#[derive(Debug)]
pub struct Capped<S> {
    inner: S,
    left: Option<usize>,
}

impl<S> Capped<S> {
    fn new(inner: S, cap: usize) -> Self {
        Self {
            inner,
            left: Some(cap),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        if let Some(left) = &mut self.left {
            if n > *left {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "WebSocket upgrade request too large",
                )));
            }
            *left -= n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Capped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Completes the upgrade on `path`. Errors are the refusal's detail.
pub async fn accept<S>(stream: S, path: &str) -> Result<WsStream<Capped<S>>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let want = path.to_string();
    // The signature is tungstenite's `Callback`; its error is an HTTP
    // response by design.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != want {
            let mut e =
                ErrorResponse::new(Some(format!("no MQTT endpoint at {}\n", req.uri().path())));
            *e.status_mut() = StatusCode::NOT_FOUND;
            return Err(e);
        }
        let offered: Vec<String> = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|p| p.trim().to_ascii_lowercase()))
            .collect();
        if !offered.is_empty() {
            let Some(p) = ["mqtt", "mqttv3.1"]
                .into_iter()
                .find(|p| offered.iter().any(|o| o == p))
            else {
                let mut e =
                    ErrorResponse::new(Some("subprotocol must be mqtt or mqttv3.1\n".into()));
                *e.status_mut() = StatusCode::BAD_REQUEST;
                return Err(e);
            };
            resp.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static(p));
        }
        Ok(resp)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let mut ws = tokio_tungstenite::accept_hdr_async_with_config(
        Capped::new(stream, MAX_UPGRADE),
        callback,
        Some(config),
    )
    .await
    .map_err(|e| e.to_string())?;
    ws.get_mut().left = None;
    Ok(WsStream {
        ws,
        pending: Bytes::new(),
        eof: false,
    })
}

/// Opens MQTT over WebSocket towards a broker on `stream` (plain TCP, or
/// TLS already established): upgrades on `path` with `authority` as the
/// Host, asking for the `mqtt` subprotocol, which the broker must agree.
/// Errors are the refusal's detail.
pub async fn connect<S>(stream: S, authority: &str, path: &str) -> Result<WsStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{authority}{path}")
        .into_client_request()
        .map_err(|e| format!("WebSocket request for {authority}{path}: {e}"))?;
    req.headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let (ws, resp) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
        .await
        .map_err(|e| format!("WebSocket upgrade: {e}"))?;
    let agreed = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    if agreed.as_deref() != Some("mqtt") {
        return Err(format!(
            "WebSocket upgrade: the broker agreed subprotocol {agreed:?}, not \"mqtt\""
        ));
    }
    Ok(WsStream {
        ws,
        pending: Bytes::new(),
        eof: false,
    })
}

/// A WebSocket connection as a byte stream of its binary frames.
#[derive(Debug)]
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// What is left of the last binary message.
    pending: Bytes,
    eof: bool,
}

fn to_io(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    match e {
        tokio_tungstenite::tungstenite::Error::Io(e) => e,
        e => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => self.pending = b,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text frame (MQTT needs binary frames)",
                    )))
                }
                Some(Ok(Message::Close(_))) | None => self.eof = true,
                Some(Ok(_)) => {} // ping/pong: tungstenite answers pings itself
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(to_io)?;
        // Out now: callers write whole packets and do not flush, and MQTT
        // is latency-bound. A full socket leaves the rest for the next
        // write's `poll_ready`, which flushes first.
        if let Poll::Ready(Err(e)) = Pin::new(&mut self.ws).poll_flush(cx) {
            return Poll::Ready(Err(to_io(e)));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed) => {
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn unmasked_client_frames_are_refused() {
        let (mut c, s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut ws = accept(s, "/mqtt").await.map_err(|e| e.to_string())?;
            let mut b = [0u8; 64];
            ws.read(&mut b).await.map_err(|e| e.to_string())
        });
        c.write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.ok();
        let mut head = [0u8; 512];
        let _ = c.read(&mut head).await;
        c.write_all(&[0x82, 3, 1, 2, 3]).await.ok();
        let r = server.await.ok();
        assert!(matches!(r, Some(Err(_))), "{r:?}");
    }
}
