//! Connecting to a backend and splicing bytes both ways.
//!
//! Each direction is its own copy loop, so a client that stops reading never
//! stalls the other direction (the same decoupling a broker gives a direct
//! client). Both loops feed a [`BoundaryTracker`], so at any moment the
//! balancer knows whether each stream sits between two packets. That is
//! where an eviction injects its packets: a v5 DISCONNECT (0x8B, or 0x9C with
//! a Server Reference) to the client, and a normal DISCONNECT to the backend
//! so the broker does not publish the will of a client that is only moving.
//! Half-close is honoured: EOF on one side shuts down writing on the other
//! while the reverse direction keeps flowing.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hickory_resolver::TokioAsyncResolver;
use mqlb_protocol::{
    framing, BoundaryTracker, ConnackReturnCode, Disconnect, MqttStr, Packet, Properties,
    ProtocolVersion, ReasonCode,
};
use std::future::Future;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::bufpool;
use crate::registry::{EvictHandle, Eviction, Side};
use crate::select::Backend;

/// Longest we wait to write an injected packet to a peer that may be hung.
const INJECT_TIMEOUT: Duration = Duration::from_millis(200);

/// Where backend connections come from: local source addresses taken in
/// turn, or the kernel's choice.
#[derive(Debug, Default)]
pub struct Sources {
    addrs: Vec<IpAddr>,
    next: AtomicUsize,
}

impl Sources {
    /// Sources used in turn; empty lets the kernel choose.
    pub fn new(addrs: Vec<IpAddr>) -> Self {
        Self {
            addrs,
            next: AtomicUsize::new(0),
        }
    }

    /// The source for the next connection.
    fn pick(&self) -> Option<IpAddr> {
        if self.addrs.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.addrs.get(i % self.addrs.len()).copied()
    }

    /// Checks that every source is a local address that can be bound.
    pub fn check(&self) -> io::Result<()> {
        for ip in &self.addrs {
            let s = if ip.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            s.bind(SocketAddr::new(*ip, 0)).map_err(|e| {
                io::Error::new(e.kind(), format!("source address {ip} cannot be used: {e}"))
            })?;
        }
        Ok(())
    }
}

/// The socket addresses for `addr` (`host:port`): an IP literal as is, a
/// host name through the caching resolver.
async fn addresses(addr: &str, resolver: &TokioAsyncResolver) -> io::Result<Vec<SocketAddr>> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| {
            Some((
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>().ok()?,
            ))
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{addr}: not host:port"),
            )
        })?;
    // Boxed: a lookup's state is about a KiB, and every connecting client
    // would carry it even when its backend is an IP literal.
    let ips = Box::pin(resolver.lookup_ip(host))
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::NotFound, format!("{host}: {e}")))?;
    Ok(ips.iter().map(|ip| SocketAddr::new(ip, port)).collect())
}

/// Opens TCP to `addr` from `source`, when given. The source port is left
/// to `connect` (IP_BIND_ADDRESS_NO_PORT, as HAProxy does), so one source
/// IP is not limited to one ephemeral port range across all backends.
async fn connect_from(
    addr: &str,
    source: Option<IpAddr>,
    resolver: &TokioAsyncResolver,
) -> io::Result<TcpStream> {
    let mut last = io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        format!("{addr}: no usable address"),
    );
    for dst in addresses(addr, resolver).await? {
        let socket = if dst.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(src) = source {
            if dst.is_ipv4() != src.is_ipv4() {
                continue;
            }
            #[cfg(target_os = "linux")]
            let _ = nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            );
            socket.bind(SocketAddr::new(src, 0))?;
        }
        match socket.connect(dst).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Connects to the first candidate that accepts within `timeout`, from the
/// next of `sources`.
///
/// Returns the stream and the backend, or `None` when every candidate failed.
/// Each failure is counted on its backend and reported as a passive signal.
pub async fn connect_first(
    candidates: &[Arc<Backend>],
    timeout: Duration,
    sources: &Sources,
    resolver: &TokioAsyncResolver,
) -> Option<(TcpStream, Arc<Backend>)> {
    for backend in candidates {
        if matches!(backend.tls, Some(Err(_))) {
            continue; // its TLS files were unusable (logged when loaded)
        }
        let source = sources.pick();
        let connect = connect_from(backend.address.as_str(), source, resolver);
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Some((stream, backend.clone()));
            }
            Ok(Err(e)) => {
                tracing::debug!(backend = %backend.name, error = %e, "backend connect failed");
            }
            Err(_) => {
                tracing::debug!(backend = %backend.name, ?timeout, "backend connect timed out");
            }
        }
        backend
            .connect_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        backend.passive_failure();
    }
    None
}

/// What the client's TLS session was, for the PROXY v2 TLVs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// "TLSv1.2" or "TLSv1.3".
    pub version: &'static str,
    /// The server name the client asked for (SNI).
    pub sni: Option<String>,
    /// The verified client certificate's common name (mTLS).
    pub client_cn: Option<String>,
}

/// [`proxy_v2_header`] plus, for a client that came in over TLS, the TLVs
/// brokers read it from: `PP2_TYPE_AUTHORITY` (the SNI) and `PP2_TYPE_SSL`
/// with the version and the client certificate's CN.
pub fn proxy_v2_header_tls(src: SocketAddr, dst: SocketAddr, tls: Option<&TlsInfo>) -> Vec<u8> {
    let mut h = proxy_v2_header(src, dst);
    let Some(tls) = tls else {
        return h;
    };
    let mut tlvs = Vec::new();
    let tlv = |out: &mut Vec<u8>, kind: u8, value: &[u8]| {
        if let Ok(n) = u16::try_from(value.len()) {
            out.push(kind);
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(value);
        }
    };
    if let Some(sni) = &tls.sni {
        tlv(&mut tlvs, 0x02, sni.as_bytes()); // PP2_TYPE_AUTHORITY
    }
    // PP2_TYPE_SSL: client flags, verify result (0 = verified), sub-TLVs.
    // PP2_CLIENT_SSL, and PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS.
    let client = if tls.client_cn.is_some() {
        0x01 | 0x02 | 0x04
    } else {
        0x01
    };
    let mut ssl = vec![client];
    ssl.extend_from_slice(&0u32.to_be_bytes());
    tlv(&mut ssl, 0x21, tls.version.as_bytes()); // PP2_SUBTYPE_SSL_VERSION
    if let Some(cn) = &tls.client_cn {
        tlv(&mut ssl, 0x22, cn.as_bytes()); // PP2_SUBTYPE_SSL_CN
    }
    tlv(&mut tlvs, 0x20, &ssl);
    if let Some([hi, lo]) = h.get_mut(14..16) {
        let len =
            u16::from_be_bytes([*hi, *lo]).saturating_add(u16::try_from(tlvs.len()).unwrap_or(0));
        [*hi, *lo] = len.to_be_bytes();
    }
    h.extend_from_slice(&tlvs);
    h
}

/// A PROXY protocol v2 header for a connection from `src` to `dst`, so a
/// broker behind the balancer sees the client's address. Mixed families
/// (an IPv4 client on an IPv6 listener) are sent as IPv6, IPv4-mapped.
pub fn proxy_v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11); // TCP over IPv4
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v) => v.to_ipv6_mapped(),
                IpAddr::V6(v) => v,
            };
            h.push(0x21); // TCP over IPv6
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&v6(src).octets());
            h.extend_from_slice(&v6(dst).octets());
            h.extend_from_slice(&src.port().to_be_bytes());
            h.extend_from_slice(&dst.port().to_be_bytes());
        }
    }
    h
}

/// How a splice ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes client→backend, the initial CONNECT included.
    pub to_backend: u64,
    /// Bytes backend→client.
    pub to_client: u64,
    /// Closed by an eviction rather than by a peer.
    pub evicted: bool,
    /// A DISCONNECT was injected to the client.
    pub disconnect_sent: bool,
}

/// The backend's first packet, if it was a CONNACK, with its latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnackSeen {
    /// As a v5 reason code (3.x return codes mapped).
    pub reason: ReasonCode,
    /// An mqlb node refused because the client's session is moving
    /// between nodes ([`mqlb_protocol::SESSION_MOVING`]): the node is
    /// healthy, so this is no signal against it.
    pub session_moving: bool,
    /// From the CONNECT's write to the CONNACK's arrival.
    pub latency: Duration,
}

/// The DISCONNECT a v5 client gets for an eviction.
fn client_disconnect(e: &Eviction) -> Option<Vec<u8>> {
    let d = match e {
        Eviction::ShuttingDown => Disconnect::new(ReasonCode::SERVER_SHUTTING_DOWN),
        Eviction::UseAnotherServer(r) => Disconnect {
            reason: ReasonCode::USE_ANOTHER_SERVER,
            properties: Properties {
                server_reference: MqttStr::try_from(r.as_str()).ok(),
                ..Default::default()
            },
        },
    };
    Packet::Disconnect(d)
        .to_bytes(ProtocolVersion::V5)
        .ok()
        .map(|b| b.to_vec())
}

/// Normal DISCONNECT, the same two bytes in every version.
const NORMAL_DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// A client connection the splice can take apart: plain TCP, or TLS
/// terminated here.
pub trait ClientStream: Send + 'static {
    /// The half the client's bytes are read from.
    type Read<'a>: LentRead + Send
    where
        Self: 'a;
    /// The half the backend's bytes are written to.
    type Write<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;
    /// Splits into independently usable halves, borrowed: plain TCP's
    /// split allocates nothing.
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
    /// Closing it says all a shutdown would (plain TCP: the FIN). TLS and
    /// WebSocket need their shutdown, which sends close_notify or a Close
    /// frame and flushes what is buffered.
    const CLOSE_IS_SHUTDOWN: bool = false;
}

/// Reading into a buffer borrowed from [`bufpool`] only once data is there,
/// so an idle plain-TCP connection holds no buffer.
///
/// Polled rather than async so that a waiting splice stores no future for
/// the read: an idle connection's task holds only what it must.
pub trait LentRead: AsyncRead + Unpin {
    /// Reads what is there into a lent buffer; `Ready(Ok(None))` is a
    /// spurious wakeup, poll again.
    fn poll_read_lent(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<(bufpool::Lent, usize)>>>;
}

impl LentRead for tokio::net::tcp::ReadHalf<'_> {
    fn poll_read_lent(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<(bufpool::Lent, usize)>>> {
        let socket: &TcpStream = (*self).as_ref();
        if let Err(e) = ready!(socket.poll_read_ready(cx)) {
            return Poll::Ready(Err(e));
        }
        // `poll_read`, not `try_read`: a read shorter than the buffer
        // drained the socket, and tokio then clears its readiness, so the
        // next wait goes to epoll instead of a `recv` that fails with
        // EAGAIN (one system call per packet burst, two per connection).
        let mut buf = bufpool::lend();
        let mut filled = tokio::io::ReadBuf::new(&mut buf);
        match std::pin::Pin::new(&mut *self).poll_read(cx, &mut filled) {
            Poll::Ready(Ok(())) => {
                let n = filled.filled().len();
                Poll::Ready(Ok(Some((buf, n))))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // Readiness was stale: cleared, and this task will be woken.
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A stream that can only be read through a buffer (TLS decrypts whole
/// records; WebSocket unframes whole frames): a buffer is borrowed for
/// each read and given back to the pool when nothing was there (a read
/// that is pending has put nothing in it: the stream keeps what it has
/// of a record or frame itself), so an idle TLS or WebSocket connection
/// holds none (it held 16 KiB).
pub struct Buffered<R> {
    inner: R,
}

impl<R> Buffered<R> {
    /// Wraps the read half of a TLS or WebSocket stream.
    pub fn new(inner: R) -> Self {
        Self { inner }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Buffered<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<R: AsyncRead + Unpin> LentRead for Buffered<R> {
    fn poll_read_lent(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<(bufpool::Lent, usize)>>> {
        let mut buf = bufpool::lend();
        let mut rb = tokio::io::ReadBuf::new(&mut buf);
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                Poll::Ready(Ok(Some((buf, n))))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // Nothing was read: the buffer goes back to the pool.
            Poll::Pending => Poll::Pending,
        }
    }
}

impl ClientStream for TcpStream {
    type Read<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Write<'a> = tokio::net::tcp::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.split()
    }
    const CLOSE_IS_SHUTDOWN: bool = true;
}

/// TLS and WebSocket streams are split by tokio (the halves share the
/// stream through a lock) and read through a lent buffer.
macro_rules! split_buffered {
    ($($t:ty),* $(,)?) => {$(
        impl ClientStream for $t {
            type Read<'a> = Buffered<ReadHalf<&'a mut $t>>;
            type Write<'a> = WriteHalf<&'a mut $t>;
            fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
                let (r, w) = tokio::io::split(self);
                (Buffered::new(r), w)
            }
        }
    )*};
}

split_buffered!(
    tokio_rustls::client::TlsStream<TcpStream>,
    TlsStream<mqlb_listener::rewind::Rewind>,
);

/// Writes `prefix` (the buffered CONNECT) to the backend and frees it, then
/// forwards both ways until both directions are closed, one fails, or
/// `evict` fires. `on_connack` is called once if the backend's first packet
/// is a CONNACK.
// A function returning an `async move` block, not an `async fn`: an async
// fn keeps its arguments twice in its state (rust-lang/rust#62958), and
// this state is what every idle connection holds.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
pub fn splice<'a, C: ClientStream, B: ClientStream>(
    mut client: C,
    mut backend: B,
    prefix: BytesMut,
    version: ProtocolVersion,
    evict: &'a EvictHandle,
    on_connack: impl FnOnce(ConnackSeen) + 'a,
) -> impl Future<Output = io::Result<Spliced>> + 'a {
    async move {
        let (mut cr, mut cw) = client.halves();
        let (mut br, mut bw) = backend.halves();
        let started = Instant::now();
        bw.write_all(&prefix).await?;
        evict.relayed(Side::Up, prefix.len());
        let prefix_len = prefix.len() as u64;
        drop(prefix);

        let mut connack = ConnackSniffer::new(version, started, on_connack);
        let up = pump(
            &mut cr,
            &mut bw,
            B::CLOSE_IS_SHUTDOWN,
            evict,
            Side::Up,
            |_| {},
            |_| Some(NORMAL_DISCONNECT.to_vec()),
        );
        let down = pump(
            &mut br,
            &mut cw,
            C::CLOSE_IS_SHUTDOWN,
            evict,
            Side::Down,
            |chunk| connack.feed(chunk),
            |e| {
                if version.is_v5() {
                    client_disconnect(e)
                } else {
                    None
                }
            },
        );
        // An error in either direction ends both (returning drops the other).
        tokio::pin!(up, down);
        let mut up_done = None;
        let mut down_done = None;
        while up_done.is_none() || down_done.is_none() {
            tokio::select! {
                r = &mut up, if up_done.is_none() => up_done = Some(r?),
                r = &mut down, if down_done.is_none() => down_done = Some(r?),
            }
        }
        let (to_backend, up_evicted, _) = up_done.unwrap_or_default();
        let (to_client, down_evicted, disconnect_sent) = down_done.unwrap_or_default();
        Ok(Spliced {
            to_backend: to_backend + prefix_len,
            to_client,
            evicted: up_evicted || down_evicted,
            disconnect_sent,
        })
    }
}

/// Copies `from` → `to` until EOF, error, or eviction. On eviction, the
/// packet in progress is finished first (bounded by [`INJECT_TIMEOUT`]), so
/// `to` only ever sees whole packets, then `inject(reason)` is written at
/// that boundary and `to` is shut down. Returns (bytes copied, evicted,
/// injected).
async fn pump<R: LentRead, W: AsyncWrite + Unpin>(
    from: &mut R,
    to: &mut W,
    close_is_shutdown: bool,
    evict: &EvictHandle,
    side: Side,
    mut inspect: impl FnMut(&[u8]),
    inject: impl FnOnce(&Eviction) -> Option<Vec<u8>>,
) -> io::Result<(u64, bool, bool)> {
    let mut tracker = BoundaryTracker::default();
    let mut framed = true;
    let mut total = 0u64;
    let mut whole = true;
    loop {
        // Wait for data before borrowing a buffer: an idle connection holds
        // none. Eviction first: once it is requested, a peer's EOF racing it
        // (the backend closing after the other direction's DISCONNECT) must
        // not skip the injection.
        let read = std::future::poll_fn(|cx| {
            if evict.poll_requested(side, cx).is_ready() {
                return Poll::Ready(None);
            }
            from.poll_read_lent(cx).map(Some)
        })
        .await;
        let Some(read) = read else {
            break;
        };
        let (buf, n) = match read {
            Ok(Some(got)) => got,
            Ok(None) => continue,
            // A reset from one peer ends this direction; the other
            // direction sees its own EOF or error.
            Err(e) => {
                let _ = to.shutdown().await;
                return Err(e);
            }
        };
        if n == 0 {
            // The second direction to end skips its shutdown when closing
            // the connection, right after, sends the same.
            if evict.first_to_end() || !close_is_shutdown {
                let _ = to.shutdown().await;
            }
            return Ok((total, false, false));
        }
        let chunk = buf.get(..n).unwrap_or_default();
        inspect(chunk);
        evict.relayed(side, n);
        if framed && tracker.feed(chunk).is_err() {
            // Not MQTT framing: keep forwarding, never inject.
            tracing::debug!("stream is not MQTT-framed; boundary tracking off");
            framed = false;
        }
        let write = to.write_all(chunk);
        tokio::pin!(write);
        let written = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = write.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            evict.poll_requested(side, cx).map(|()| None)
        })
        .await;
        match written {
            Some(r) => r?,
            None => {
                // Finish this chunk if the peer reads at all.
                // (Boxed, as the rest of an eviction below: rare paths do
                // not size the state every idle connection holds.)
                let finish = Box::pin(tokio::time::timeout(INJECT_TIMEOUT, write));
                whole = matches!(finish.await, Ok(Ok(())));
                if whole {
                    total += n as u64;
                }
                break;
            }
        }
        total += n as u64;
    }
    Box::pin(evicted(
        from, to, evict, side, tracker, framed, whole, total, inspect, inject,
    ))
    .await
}

/// The end of a [`pump`] whose connection is evicted: completes the packet
/// in progress, reading no further than its end, injects at the boundary
/// and shuts `to` down.
#[allow(clippy::too_many_arguments)]
async fn evicted<R: LentRead, W: AsyncWrite + Unpin>(
    from: &mut R,
    to: &mut W,
    evict: &EvictHandle,
    side: Side,
    mut tracker: BoundaryTracker,
    framed: bool,
    whole: bool,
    mut total: u64,
    mut inspect: impl FnMut(&[u8]),
    inject: impl FnOnce(&Eviction) -> Option<Vec<u8>>,
) -> io::Result<(u64, bool, bool)> {
    let finish = async {
        let mut buf = bufpool::lend();
        while whole && framed && !tracker.at_boundary() {
            let want = tracker.to_boundary().unwrap_or(1).clamp(1, buf.len());
            let n = from.read(buf.get_mut(..want).unwrap_or_default()).await?;
            let chunk = buf.get(..n).unwrap_or_default();
            if chunk.is_empty() {
                return Ok(false);
            }
            inspect(chunk);
            evict.relayed(side, n);
            if tracker.feed(chunk).is_err() {
                return Ok(false);
            }
            to.write_all(chunk).await?;
            total += n as u64;
        }
        io::Result::Ok(whole && framed)
    };
    let at_boundary = matches!(
        tokio::time::timeout(INJECT_TIMEOUT, finish).await,
        Ok(Ok(true))
    );
    let mut injected = false;
    if at_boundary {
        if let Some(bytes) = evict.reason().and_then(inject) {
            injected = tokio::time::timeout(INJECT_TIMEOUT, to.write_all(&bytes))
                .await
                .is_ok_and(|r| r.is_ok());
        }
    }
    let _ = tokio::time::timeout(INJECT_TIMEOUT, to.shutdown()).await;
    Ok((total, true, injected))
}

/// The longest CONNACK the sniffer reads whole to see its properties.
const MAX_SNIFFED_CONNACK: usize = 512;

/// Watches the first bytes from the backend for its CONNACK.
struct ConnackSniffer<F: FnOnce(ConnackSeen)> {
    version: ProtocolVersion,
    started: Instant,
    head: Vec<u8>,
    callback: Option<F>,
}

impl<F: FnOnce(ConnackSeen)> ConnackSniffer<F> {
    fn new(version: ProtocolVersion, started: Instant, callback: F) -> Self {
        Self {
            version,
            started,
            head: Vec::new(),
            callback: Some(callback),
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        if self.callback.is_none() {
            return;
        }
        let room = MAX_SNIFFED_CONNACK.saturating_sub(self.head.len());
        self.head
            .extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
        match self.head.first() {
            None => return,
            Some(0x20) => {}
            Some(_) => {
                self.callback = None; // not a CONNACK: nothing to report
                return;
            }
        }
        let Some(Ok(Some((len, used)))) = self.head.get(1..).map(framing::decode_varint) else {
            return; // need more, or garbage (the client will judge)
        };
        let Some(&code) = self.head.get(1 + used + 1) else {
            return;
        };
        // The whole packet, for its properties (a v5 refusal may say the
        // session is moving); one longer than the cap is judged by its
        // code alone.
        let total = 1 + used + len as usize;
        let whole = self.head.get(..total);
        if whole.is_none() && self.head.len() < MAX_SNIFFED_CONNACK {
            return;
        }
        let session_moving = self.version.is_v5()
            && whole.is_some_and(|w| {
                let mut b = bytes::BytesMut::from(w);
                matches!(
                    mqlb_protocol::decode(&mut b, self.version, MAX_SNIFFED_CONNACK),
                    Ok(Some(mqlb_protocol::Packet::Connack(c))) if c.is_session_moving()
                )
            });
        let reason = if self.version.is_v5() {
            ReasonCode(code)
        } else {
            ConnackReturnCode::from_u8(code).map_or(ReasonCode(code), |c| c.to_reason_code())
        };
        if let Some(cb) = self.callback.take() {
            cb(ConnackSeen {
                reason,
                session_moving,
                latency: self.started.elapsed(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqlb_protocol::{Connack, Packet, Properties};

    fn sniff(version: ProtocolVersion, bytes: &[u8], split: usize) -> Option<ConnackSeen> {
        let seen = std::cell::Cell::new(None);
        let mut s = ConnackSniffer::new(version, Instant::now(), |c| seen.set(Some(c)));
        let (a, b) = bytes.split_at(split.min(bytes.len()));
        s.feed(a);
        s.feed(b);
        drop(s);
        seen.into_inner()
    }

    /// A node's "session moving" refusal is told from a plain 0x88 at
    /// every split point, so only the latter counts against the node.
    #[test]
    fn a_session_moving_refusal_is_told_from_server_unavailable() {
        let v5 = ProtocolVersion::V5;
        let moving = Packet::Connack(Connack::session_moving())
            .to_bytes(v5)
            .expect("encodes");
        let plain = Packet::Connack(Connack {
            session_present: false,
            reason: ReasonCode::SERVER_UNAVAILABLE,
            properties: Properties::default(),
        })
        .to_bytes(v5)
        .expect("encodes");
        for split in 0..=moving.len() {
            let seen = sniff(v5, &moving, split).expect("reported");
            assert!(seen.session_moving, "split {split}");
            assert_eq!(seen.reason, ReasonCode::SERVER_UNAVAILABLE);
        }
        for split in 0..=plain.len() {
            let seen = sniff(v5, &plain, split).expect("reported");
            assert!(!seen.session_moving, "split {split}");
            assert_eq!(seen.reason, ReasonCode::SERVER_UNAVAILABLE);
        }
        // 3.1.1 has no properties: a return code 3 is just unavailable.
        let seen = sniff(ProtocolVersion::V3_1_1, &[0x20, 2, 0, 3], 1).expect("reported");
        assert!(!seen.session_moving);
        assert_eq!(seen.reason, ReasonCode::SERVER_UNAVAILABLE);
    }
}
