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
//!   one binary frame (an injected DISCONNECT included);
//! * before the CONNECT has arrived whole, at most [`Limits::before_connect`]
//!   bytes (plus frame overhead) are read from the socket, and a frame
//!   header that declares more is refused as it arrives: a stranger cannot
//!   make the process buffer a 16 MiB frame before it has even said who it
//!   is. After it, a frame or message over [`Limits::max_message`] is
//!   refused from its header.

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

/// tungstenite's read buffer per connection: allocated at once and zeroed
/// to its capacity on every read, so its default of 128 KiB was the
/// whole cost of an idle WebSocket client (139 KiB of RSS each through the
/// balancer, `MQLB_BENCH_ONLY=idle cargo bench -p mqlb-tests --bench
/// proxy`). A frame larger than this grows it for that frame.
const READ_BUFFER: usize = 4096;

/// Largest HTTP upgrade request read before giving up.
pub const MAX_UPGRADE: usize = 16 << 10;

/// Largest WebSocket message accepted (a maximum-size MQTT packet and
/// change): bounded, whatever a frame header claims.
pub const MAX_MESSAGE: usize = 16 << 20;

/// Frame overhead allowed beside the CONNECT's bytes before it has
/// arrived: headers, masks, pings.
const FRAME_SLACK: usize = 4 << 10;

/// What one WebSocket connection may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of MQTT before the CONNECT has arrived whole (the listener's
    /// CONNECT size cap).
    pub before_connect: usize,
    /// Largest frame or message afterwards (the MQTT Maximum Packet Size
    /// the reader enforces, or more).
    pub max_message: usize,
}

/// Reads through to `inner`, failing once `left` bytes have been read while
/// capped (during the upgrade, then until the CONNECT has arrived);
/// uncapped afterwards.
///
/// While capped it follows the frames in the bytes it hands up, for two
/// reasons. A frame header declaring more than is left fails at once:
/// tungstenite reserves (and zeroes) a frame's declared length as soon as
/// it has the header, so a 16 MiB claim would cost 16 MiB before a single
/// payload byte arrived. And it sees in the (unmasked) payloads where the
/// first MQTT packet ends, to lift the cap there and not at whatever
/// tungstenite happened to read ahead.
#[derive(Debug)]
pub struct Capped<S> {
    inner: S,
    /// Bytes still allowed; `None` once uncapped.
    left: Option<usize>,
    frames: FrameScan,
    first: FirstPacket,
}

impl<S> Capped<S> {
    fn new(inner: S, cap: usize) -> Self {
        Self {
            inner,
            left: Some(cap),
            frames: FrameScan::Upgrade { tail: 0 },
            first: FirstPacket::default(),
        }
    }
}

/// Where the byte stream of an accepted connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameScan {
    /// In the HTTP upgrade request: its last four bytes, to see its end.
    Upgrade { tail: u32 },
    /// In a frame header: what of it has arrived (at most 14 bytes).
    Header { head: [u8; 14], have: usize },
    /// In a frame's payload.
    Payload {
        /// Bytes still to come.
        left: u64,
        /// Bytes already seen (for the mask's phase).
        pos: u64,
        mask: [u8; 4],
        /// A data frame (binary, text, continuation), not a control one.
        data: bool,
    },
}

/// What [`FrameScan::feed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scanned {
    /// Nothing yet.
    More,
    /// The first MQTT packet has arrived whole.
    FirstPacket,
    /// A frame header declared this many bytes, more than allowed.
    TooLarge(u64),
}

impl FrameScan {
    const NEXT_HEADER: FrameScan = FrameScan::Header {
        head: [0; 14],
        have: 0,
    };

    /// Follows `bytes`, with `budget` payload bytes allowed in any frame,
    /// and `first` following the MQTT bytes the frames carry.
    fn feed(&mut self, bytes: &[u8], budget: usize, first: &mut FirstPacket) -> Scanned {
        let mut rest = bytes;
        while let Some((&b, after)) = rest.split_first() {
            match self {
                FrameScan::Upgrade { tail } => {
                    *tail = (*tail << 8) | u32::from(b);
                    rest = after;
                    if *tail == u32::from_be_bytes(*b"\r\n\r\n") {
                        *self = Self::NEXT_HEADER;
                    }
                }
                FrameScan::Header { head, have } => {
                    if let Some(slot) = head.get_mut(*have) {
                        *slot = b;
                    }
                    *have += 1;
                    rest = after;
                    let [first_byte, second, ..] = *head;
                    if *have < 2 {
                        continue;
                    }
                    let ext = match second & 0x7F {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    };
                    let masked = second & 0x80 != 0;
                    if *have < 2 + ext {
                        continue;
                    }
                    let len = match ext {
                        0 => u64::from(second & 0x7F),
                        _ => head
                            .get(2..2 + ext)
                            .unwrap_or_default()
                            .iter()
                            .fold(0u64, |n, &x| (n << 8) | u64::from(x)),
                    };
                    if len > budget as u64 {
                        return Scanned::TooLarge(len);
                    }
                    let full = 2 + ext + if masked { 4 } else { 0 };
                    if *have < full {
                        continue;
                    }
                    let mut mask = [0u8; 4];
                    if masked {
                        if let Some(m) = head.get(2 + ext..full) {
                            mask.copy_from_slice(m);
                        }
                    }
                    *self = if len == 0 {
                        Self::NEXT_HEADER
                    } else {
                        FrameScan::Payload {
                            left: len,
                            pos: 0,
                            mask,
                            data: first_byte & 0x08 == 0,
                        }
                    };
                }
                FrameScan::Payload {
                    left,
                    pos,
                    mask,
                    data,
                } => {
                    let take = rest.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    let (payload, after) = rest.split_at(take);
                    rest = after;
                    let done = *data && first.feed_masked(payload, *mask, *pos);
                    *left -= take as u64;
                    *pos += take as u64;
                    if *left == 0 {
                        *self = Self::NEXT_HEADER;
                    }
                    if done {
                        return Scanned::FirstPacket;
                    }
                }
            }
        }
        Scanned::More
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(left) = self.left else {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        };
        if left == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too much before the CONNECT (WebSocket)",
            )));
        }
        // Never more than is left from the socket: what follows the
        // CONNECT in the same burst must not count against the cap.
        let mut chunk = [0u8; 4096];
        let want = left.min(chunk.len()).min(buf.remaining());
        let mut small = ReadBuf::new(chunk.get_mut(..want).unwrap_or_default());
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut small))?;
        let n = small.filled().len();
        let budget = left - n;
        let this = &mut *self;
        match this.frames.feed(small.filled(), budget, &mut this.first) {
            Scanned::TooLarge(declared) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "a WebSocket frame of {declared} bytes before the CONNECT (at most {budget} more are read)"
                    ),
                )));
            }
            Scanned::FirstPacket => this.left = None,
            Scanned::More => this.left = Some(budget),
        }
        buf.put_slice(small.filled());
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
pub async fn accept<S>(stream: S, path: &str, limits: Limits) -> Result<WsStream<Capped<S>>, String>
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
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(limits.max_message))
        .max_frame_size(Some(limits.max_message));
    let mut ws = tokio_tungstenite::accept_hdr_async_with_config(
        Capped::new(stream, MAX_UPGRADE),
        callback,
        Some(config),
    )
    .await
    .map_err(|e| e.to_string())?;
    // The upgrade is done: from here on, the CONNECT's cap (the scan may
    // already have seen it whole in what the handshake read ahead).
    let capped = ws.get_mut();
    if capped.left.is_some() {
        capped.left = Some(limits.before_connect.saturating_add(FRAME_SLACK));
    }
    Ok(WsStream {
        ws,
        pending: Bytes::new(),
        eof: false,
    })
}

/// Follows the first MQTT packet (the CONNECT) through the frames'
/// payloads, to lift the read cap once it has arrived whole.
#[derive(Debug, Default)]
struct FirstPacket {
    /// Its fixed header as seen so far (at most 5 bytes).
    head: [u8; 5],
    have: usize,
    /// Its whole length, once the fixed header is known.
    total: Option<u64>,
    /// Bytes seen so far.
    seen: u64,
}

impl FirstPacket {
    /// Notes payload bytes masked with `mask`, starting at offset `pos` of
    /// their frame's payload; true once the whole packet has been seen.
    fn feed_masked(&mut self, bytes: &[u8], mask: [u8; 4], pos: u64) -> bool {
        for (i, &b) in bytes.iter().enumerate() {
            if self.total.is_some() {
                break;
            }
            let key = mask
                .get(((pos + i as u64) % 4) as usize)
                .copied()
                .unwrap_or(0);
            if let Some(slot) = self.head.get_mut(self.have) {
                *slot = b ^ key;
            }
            self.have += 1;
            // The remaining length: up to 4 bytes after the first.
            let mut len = 0u64;
            for (j, x) in self.head.iter().take(self.have).skip(1).enumerate() {
                len |= u64::from(x & 0x7F) << (7 * j);
                if x & 0x80 == 0 {
                    self.total = Some(1 + (j as u64 + 1) + len);
                    break;
                }
            }
            if self.total.is_none() && self.have >= 5 {
                // A malformed length: the MQTT reader refuses it; stop
                // capping here, as nothing more is owed to the cap.
                self.total = Some(0);
            }
        }
        self.seen += bytes.len() as u64;
        self.total.is_some_and(|t| self.seen >= t)
    }
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
        .read_buffer_size(READ_BUFFER)
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

    const LIMITS: Limits = Limits {
        before_connect: 64 << 10,
        max_message: MAX_MESSAGE,
    };

    const UPGRADE: &[u8] = b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    /// A masked binary frame header for `len` bytes (client to server).
    fn frame_head(len: usize) -> Vec<u8> {
        let mut h = vec![0x82];
        match len {
            0..=125 => h.push(0x80 | len as u8),
            126..=65535 => {
                h.push(0x80 | 126);
                h.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                h.push(0x80 | 127);
                h.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        h.extend_from_slice(&[0, 0, 0, 0]); // mask key 0: payload as is
        h
    }

    /// Before the CONNECT, a frame that claims 16 MiB is refused from its
    /// header, not buffered; a frame over the post-CONNECT
    /// limit is refused from its header; and a CONNECT that arrives whole
    /// lifts the cap for what follows.
    #[tokio::test]
    async fn what_comes_before_the_connect_is_capped() {
        // 1. A 16 MiB frame before any CONNECT: refused from its header.
        let (mut c, s) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut ws = accept(s, "/mqtt", LIMITS)
                .await
                .map_err(|e| e.to_string())?;
            let mut b = vec![0u8; 1 << 16];
            loop {
                match ws.read(&mut b).await {
                    Ok(0) => return Ok(0),
                    Ok(_) => continue,
                    Err(e) => return Err(e.to_string()),
                }
            }
        });
        c.write_all(UPGRADE).await.ok();
        let mut head = [0u8; 512];
        let _ = c.read(&mut head).await;
        let len = (16 << 20) - 1;
        c.write_all(&frame_head(len)).await.ok();
        let mut sent = 0usize;
        let chunk = vec![0x10u8; 64 << 10];
        while sent < len {
            if c.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
            if server.is_finished() {
                break;
            }
        }
        let r = server.await.ok();
        assert!(matches!(r, Some(Err(_))), "{r:?}");
        assert!(
            sent <= 2 << 20,
            "{sent} bytes were taken before the refusal"
        );

        // 2. A frame header over the post-CONNECT limit: refused at once.
        let small = Limits {
            before_connect: 64 << 10,
            max_message: 1 << 20,
        };
        let (mut c, s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut ws = accept(s, "/mqtt", small).await.map_err(|e| e.to_string())?;
            let mut b = [0u8; 64];
            ws.read(&mut b).await.map_err(|e| e.to_string())
        });
        c.write_all(UPGRADE).await.ok();
        let _ = c.read(&mut head).await;
        c.write_all(&frame_head(2 << 20)).await.ok();
        let r = server.await.ok();
        assert!(matches!(r, Some(Err(_))), "{r:?}");

        // 3. A whole CONNECT, then more than the cap: all read.
        let (mut c, s) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut ws = accept(s, "/mqtt", LIMITS)
                .await
                .map_err(|e| e.to_string())?;
            let mut total = 0usize;
            let mut b = vec![0u8; 1 << 16];
            loop {
                match ws.read(&mut b).await {
                    Ok(0) => return Ok(total),
                    Ok(n) => total += n,
                    Err(e) => return Err(e.to_string()),
                }
            }
        });
        c.write_all(UPGRADE).await.ok();
        let _ = c.read(&mut head).await;
        let connect = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0];
        c.write_all(&frame_head(connect.len())).await.ok();
        c.write_all(&connect).await.ok();
        let body = vec![0x30u8; 200 << 10];
        c.write_all(&frame_head(body.len())).await.ok();
        c.write_all(&body).await.ok();
        c.write_all(&[0x88, 0x80, 0, 0, 0, 0]).await.ok(); // close
        let r = server.await.ok();
        assert_eq!(r, Some(Ok(connect.len() + body.len())));
    }

    /// The scan finds where a CONNECT split over frames and masked with a
    /// real key ends (pings between its pieces are not MQTT), whatever
    /// the read boundaries; and a header split over reads is still judged.
    #[test]
    fn the_scan_follows_masked_frames_split_anywhere() {
        let connect = [0x10u8, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0];
        let key = [0x5A, 0xC3, 0x01, 0xFF];
        let masked = |fin_op: u8, payload: &[u8]| {
            let mut f = vec![fin_op, 0x80 | payload.len() as u8];
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            f
        };
        let mut stream = UPGRADE.to_vec();
        stream.extend(masked(0x02, &connect[..3]));
        stream.extend(masked(0x89, b"ping"));
        stream.extend(masked(0x80, &connect[3..]));
        let end = stream.len();
        stream.extend(masked(0x82, &[0x30; 100]));
        for step in [1, 2, 3, 7, 64, 4096] {
            let mut scan = FrameScan::Upgrade { tail: 0 };
            let mut first = FirstPacket::default();
            let mut at = None;
            for (i, piece) in stream.chunks(step).enumerate() {
                if scan.feed(piece, 1 << 16, &mut first) == Scanned::FirstPacket {
                    at = Some((i + 1) * step);
                    break;
                }
            }
            let at = at.expect("the CONNECT's end was not seen");
            assert!(
                at >= end && at < end + step,
                "step {step}: at {at}, end {end}"
            );
        }
        // A 16 MiB claim whose length arrives a byte at a time.
        let mut scan = FrameScan::NEXT_HEADER;
        let mut first = FirstPacket::default();
        let head = frame_head(16 << 20);
        let verdicts: Vec<Scanned> = head
            .chunks(1)
            .map(|b| scan.feed(b, 64 << 10, &mut first))
            .collect();
        assert_eq!(verdicts.get(9), Some(&Scanned::TooLarge(16 << 20)));
    }

    #[tokio::test]
    async fn unmasked_client_frames_are_refused() {
        let (mut c, s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut ws = accept(s, "/mqtt", LIMITS)
                .await
                .map_err(|e| e.to_string())?;
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
