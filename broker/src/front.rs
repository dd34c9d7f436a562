//! The broker's extra listeners (`[[broker.listener]]`): the PROXY protocol
//! header from a trusted load balancer (mqlb in front of mqlb keeps the
//! real client address), TLS with SNI and mTLS, and MQTT over WebSocket,
//! all from [`mqlb_listener`], so the broker accepts and refuses exactly
//! what the balancer does.
//!
//! What comes out is a byte stream and who is on the other end; the
//! session code reads MQTT from it as from any TCP socket.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mqlb_config::{IdentityAs, Listener};
use mqlb_listener::proxy::{self, ProxyError};
use mqlb_listener::rewind::Rewind;
use mqlb_listener::tls::Slot;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A stream the session code can read MQTT from.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One configured listener, ready to accept.
#[derive(Debug)]
pub struct Front {
    /// Its settings.
    pub spec: Listener,
    /// Its TLS acceptor, when it terminates TLS.
    pub tls: Option<Arc<Slot>>,
}

impl Front {
    /// Reads the TLS files (errors name the listener and the file).
    pub fn new(spec: &Listener) -> std::io::Result<Front> {
        let tls = match &spec.tls {
            Some(files) => Some(Arc::new(Slot::new(&spec.name, files).map_err(|e| {
                std::io::Error::new(e.kind(), format!("listener {} TLS: {e}", spec.name))
            })?)),
            None => None,
        };
        Ok(Front {
            spec: spec.clone(),
            tls,
        })
    }
}

/// Why a connection was refused before its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A bad PROXY header from a trusted source.
    ProxyHeader,
    /// Plain MQTT (anything but a TLS record) on a TLS listener.
    PlainOnTls,
    /// The TLS handshake failed (unknown SNI, a client certificate that
    /// does not verify or is revoked).
    Tls,
    /// The WebSocket upgrade failed (wrong path, subprotocol, size).
    Websocket,
    /// The front (PROXY header, TLS handshake, upgrade) did not finish in
    /// time.
    Timeout,
    /// The client went away first.
    Closed,
}

impl Refusal {
    /// Every reason, in metric order.
    pub const ALL: [Refusal; 6] = [
        Refusal::ProxyHeader,
        Refusal::PlainOnTls,
        Refusal::Tls,
        Refusal::Websocket,
        Refusal::Timeout,
        Refusal::Closed,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::ProxyHeader => "proxy_header",
            Refusal::PlainOnTls => "plain_on_tls",
            Refusal::Tls => "tls",
            Refusal::Websocket => "websocket",
            Refusal::Timeout => "timeout",
            Refusal::Closed => "closed",
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct FrontStats {
    refused: [AtomicU64; Refusal::ALL.len()],
    /// Certificate files re-read after they changed.
    pub tls_reloads: AtomicU64,
    /// Changed certificate files that could not be used.
    pub tls_reload_failures: AtomicU64,
}

impl FrontStats {
    /// Counts a refusal.
    pub fn refuse(&self, r: Refusal) {
        if let Some(n) = self.refused.get(r as usize) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Refusals so far for `r`.
    pub fn refused(&self, r: Refusal) -> u64 {
        self.refused
            .get(r as usize)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP mqlb_broker_listener_refused_total Connections refused before their CONNECT, by reason.\n\
             # TYPE mqlb_broker_listener_refused_total counter"
        );
        for r in Refusal::ALL {
            let _ = writeln!(
                out,
                "mqlb_broker_listener_refused_total{{reason=\"{}\"}} {}",
                r.label(),
                self.refused(r)
            );
        }
        let _ = writeln!(
            out,
            "# HELP mqlb_tls_reloads_total TLS listener certificate re-reads after their files changed, by result.\n\
             # TYPE mqlb_tls_reloads_total counter\n\
             mqlb_tls_reloads_total{{result=\"ok\"}} {}\n\
             mqlb_tls_reloads_total{{result=\"failed\"}} {}",
            self.tls_reloads.load(Ordering::Relaxed),
            self.tls_reload_failures.load(Ordering::Relaxed)
        );
    }
}

/// A connection past its front: the stream MQTT is read from, the client's
/// real address, and the verified certificate's identity when the listener
/// maps it into the CONNECT.
pub struct Arrived {
    /// MQTT bytes.
    pub stream: Box<dyn Io>,
    /// The client (from the PROXY header when a trusted balancer sent one).
    pub peer: SocketAddr,
    /// Where the certificate's identity goes, and the identity.
    pub identity: Option<(IdentityAs, String)>,
}

/// Takes `tcp` through the listener's front within `timeout`.
pub async fn accept(
    mut tcp: TcpStream,
    mut peer: SocketAddr,
    front: &Front,
    timeout: Duration,
) -> Result<Arrived, (Refusal, String)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut initial = bytes::BytesMut::new();
    if front
        .spec
        .proxy_trusted
        .iter()
        .any(|c| c.contains(peer.ip()))
    {
        match proxy::read_header(&mut tcp, timeout).await {
            Ok((addr, rest)) => {
                peer = addr.unwrap_or(peer);
                initial = rest;
            }
            Err(e) => {
                let r = match e {
                    ProxyError::Bad(_) => Refusal::ProxyHeader,
                    ProxyError::Timeout => Refusal::Timeout,
                    ProxyError::Closed => Refusal::Closed,
                };
                return Err((r, e.to_string()));
            }
        }
    }
    if front.tls.is_some() {
        match mqlb_listener::tls::starts_tls(&tcp, &initial, timeout).await {
            Ok(true) => {}
            Ok(false) => return Err((Refusal::PlainOnTls, "not a TLS ClientHello".into())),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err((Refusal::Timeout, "TLS handshake".into()))
            }
            Err(e) => return Err((Refusal::Closed, e.to_string())),
        }
    }
    let stream = Rewind::new(initial, tcp);
    let (stream, identity): (Box<dyn Io>, _) = match &front.tls {
        None => (Box::new(stream), None),
        Some(slot) => {
            let acceptor = slot.current.load_full();
            let tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err((Refusal::Tls, e.to_string())),
                Err(_) => return Err((Refusal::Timeout, "TLS handshake".into())),
            };
            let identity = match slot.files.identity_as {
                None => None,
                Some(field) => match mqlb_listener::tls::peer_identity(tls.get_ref().1) {
                    Some(name) => Some((field, name)),
                    None => {
                        return Err((
                            Refusal::Tls,
                            "client certificate names no CN or DNS name".into(),
                        ))
                    }
                },
            };
            (Box::new(tls), identity)
        }
    };
    let stream: Box<dyn Io> = match &front.spec.websocket {
        None => stream,
        Some(path) => {
            let limits = mqlb_listener::ws::Limits {
                before_connect: mqlb_config::DEFAULT_MAX_CONNECT_SIZE,
                // This broker's Maximum Packet Size, and the frame around it.
                max_message: crate::message::MAX_PACKET + 64,
            };
            match tokio::time::timeout_at(deadline, mqlb_listener::ws::accept(stream, path, limits))
                .await
            {
                Ok(Ok(ws)) => Box::new(ws),
                Ok(Err(e)) => return Err((Refusal::Websocket, e)),
                Err(_) => return Err((Refusal::Timeout, "WebSocket upgrade".into())),
            }
        }
    };
    Ok(Arrived {
        stream,
        peer,
        identity,
    })
}
