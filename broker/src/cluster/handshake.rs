//! The handshake that opens every cluster connection.
//!
//! With the cluster's TLS ([`PeerTls`]), the connection is first a mutual
//! TLS 1.3 session: the acceptor learns the dialer's node ID from its
//! certificate, and the dialer accepts only the certificate of the member
//! it dialled. Then, inside it:
//!
//! ```text
//! dialer → acceptor: "MQLBCL02" | version u8 | purpose u8 | name
//!                    [purpose 2: identity kind u8 | identity]
//! acceptor → dialer: "MQLBCL02" | version u8 | name
//! ```
//!
//! The names must agree with the certificates (a node cannot claim to be
//! another). `version` is the wire version of the frames that follow
//! ([`super::wire::VERSION`]): a node refuses a peer that speaks another
//! one, and says so, rather than misreading its frames.
//!
//! Without TLS the same exchange runs in the clear and the names are
//! taken on trust. A node allows that only on a loopback cluster listener
//! (and warns), so no remote host can join; every local process can.
//!
//! Input before the handshake has finished costs a stranger at most
//! [`HANDSHAKE_TIMEOUT`] and a few hundred bytes.

use std::time::Duration;

use mqlb_config::IdentityAs;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::peer_tls::PeerTls;
use crate::front::Io;

/// How long either side may take over the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

const MAGIC: &[u8; 8] = b"MQLBCL02";
const NAME_MAX: usize = 255;

/// A cluster connection after its handshake (TLS or, on loopback without
/// it, plain TCP).
pub type PeerStream = Box<dyn Io>;

/// What a cluster connection is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// The dialer's frames to the acceptor (interest, retained, forwards).
    Link,
    /// An MQTT client connection the dialer hands to the acceptor, which
    /// serves the client's session; with the identity the dialer verified
    /// from the client's TLS certificate, if it had one, so the acceptor
    /// applies the same rules as to a direct connection.
    Client(Option<(IdentityAs, String)>),
}

impl Purpose {
    fn byte(&self) -> u8 {
        match self {
            Purpose::Link => 1,
            Purpose::Client(_) => 2,
        }
    }
}

/// Why a cluster connection was refused; each is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not our protocol at all (or the peer closed early).
    #[error("not a cluster handshake")]
    Garbage,
    /// The TLS handshake failed: no certificate, one that does not chain
    /// to the cluster CA, or (dialling) one that names another member.
    #[error("bad cluster certificate")]
    BadCertificate,
    /// A node name that is not a member, or one its certificate does not
    /// name.
    #[error("unknown node")]
    UnknownNode,
    /// Too slow.
    #[error("handshake timed out")]
    Timeout,
    /// The peer speaks another version of the cluster's frames.
    #[error("another wire version")]
    Version,
}

impl Refusal {
    /// Every reason, in metric order.
    pub const ALL: [Refusal; 5] = [
        Refusal::Garbage,
        Refusal::BadCertificate,
        Refusal::UnknownNode,
        Refusal::Timeout,
        Refusal::Version,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Garbage => "garbage",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::UnknownNode => "unknown_node",
            Refusal::Timeout => "timeout",
            Refusal::Version => "version",
        }
    }
}

async fn read_name(s: &mut (impl AsyncRead + Unpin)) -> Result<String, Refusal> {
    let n = usize::from(s.read_u8().await.map_err(|_| Refusal::Garbage)?);
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).await.map_err(|_| Refusal::Garbage)?;
    String::from_utf8(b).map_err(|_| Refusal::Garbage)
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    // Names are checked at configuration (at most 64 bytes); a longer one
    // is cut at a character boundary, never mid-character.
    let mut end = name.len().min(NAME_MAX);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let b = name.as_bytes().get(..end).unwrap_or_default();
    out.push(u8::try_from(b.len()).unwrap_or(0));
    out.extend_from_slice(b);
}

async fn read_magic(s: &mut (impl AsyncRead + Unpin)) -> Result<(), Refusal> {
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic)
        .await
        .map_err(|_| Refusal::Garbage)?;
    if &magic != MAGIC {
        return Err(Refusal::Garbage);
    }
    let version = s.read_u8().await.map_err(|_| Refusal::Garbage)?;
    if version != super::wire::VERSION {
        return Err(Refusal::Version);
    }
    Ok(())
}

/// The exchange inside the (TLS or plain) stream, acceptor's side.
async fn accept_hello(
    s: &mut (impl AsyncRead + AsyncWrite + Unpin),
    me: &str,
    certified: Option<&[String]>,
    known: impl Fn(&str) -> bool,
) -> Result<(String, Purpose), Refusal> {
    read_magic(s).await?;
    let kind = s.read_u8().await.map_err(|_| Refusal::Garbage)?;
    let name = read_name(s).await?;
    if certified.is_some_and(|names| !names.contains(&name)) || !known(&name) {
        return Err(Refusal::UnknownNode);
    }
    let purpose = match kind {
        1 => Purpose::Link,
        2 => {
            let identity = match s.read_u8().await.map_err(|_| Refusal::Garbage)? {
                0 => None,
                1 => Some((IdentityAs::Username, read_name(s).await?)),
                2 => Some((IdentityAs::ClientId, read_name(s).await?)),
                _ => return Err(Refusal::Garbage),
            };
            Purpose::Client(identity)
        }
        _ => return Err(Refusal::Garbage),
    };
    let mut answer = MAGIC.to_vec();
    answer.push(super::wire::VERSION);
    put_name(&mut answer, me);
    s.write_all(&answer).await.map_err(|_| Refusal::Garbage)?;
    Ok((name, purpose))
}

/// The exchange inside the stream, dialer's side: the acceptor's name.
async fn dial_hello(
    s: &mut (impl AsyncRead + AsyncWrite + Unpin),
    me: &str,
    purpose: &Purpose,
) -> Result<String, Refusal> {
    let mut hello = MAGIC.to_vec();
    hello.push(super::wire::VERSION);
    hello.push(purpose.byte());
    put_name(&mut hello, me);
    if let Purpose::Client(identity) = purpose {
        match identity {
            None => hello.push(0),
            Some((IdentityAs::Username, n)) => {
                hello.push(1);
                put_name(&mut hello, n);
            }
            Some((IdentityAs::ClientId, n)) => {
                hello.push(2);
                put_name(&mut hello, n);
            }
        }
    }
    s.write_all(&hello).await.map_err(|_| Refusal::Garbage)?;
    read_magic(s).await?;
    read_name(s).await
}

/// Accepts a cluster connection as node `me`: the dialer's name and
/// purpose once its certificate has verified (with TLS) and `known`
/// accepts its name.
pub async fn accept<S: Io + 'static>(
    s: S,
    me: &str,
    tls: Option<&PeerTls>,
    known: impl Fn(&str) -> bool,
) -> Result<(PeerStream, String, Purpose), Refusal> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        match tls {
            Some(tls) => {
                tls.refresh();
                let (mut s, names) = tls.accept(s).await.map_err(|_| Refusal::BadCertificate)?;
                let (name, purpose) = accept_hello(&mut s, me, Some(&names), known).await?;
                Ok((Box::new(s) as PeerStream, name, purpose))
            }
            None => {
                let mut s = s;
                let (name, purpose) = accept_hello(&mut s, me, None, known).await?;
                Ok((Box::new(s) as PeerStream, name, purpose))
            }
        }
    })
    .await
    .map_err(|_| Refusal::Timeout)?
}

/// Opens a cluster connection as node `me` to member `expected` for
/// `purpose`. With TLS, only `expected`'s certificate is accepted.
pub async fn dial<S: Io + 'static>(
    s: S,
    me: &str,
    purpose: &Purpose,
    tls: Option<&PeerTls>,
    expected: &str,
) -> Result<PeerStream, Refusal> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let (name, stream) = match tls {
            Some(tls) => {
                tls.refresh();
                let mut s = tls
                    .connect(s, expected)
                    .await
                    .map_err(|_| Refusal::BadCertificate)?;
                (
                    dial_hello(&mut s, me, purpose).await?,
                    Box::new(s) as PeerStream,
                )
            }
            None => {
                let mut s = s;
                (
                    dial_hello(&mut s, me, purpose).await?,
                    Box::new(s) as PeerStream,
                )
            }
        };
        if name != expected {
            return Err(Refusal::UnknownNode);
        }
        Ok(stream)
    })
    .await
    .map_err(|_| Refusal::Timeout)?
}
