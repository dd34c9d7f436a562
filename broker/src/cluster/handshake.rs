//! The handshake that opens every cluster connection: mutual proof of a
//! shared secret, by HMAC-SHA256 over fresh nonces from both sides.
//!
//! ```text
//! acceptor → dialer: "MQLBCL01" | nonce_a[16]
//! dialer → acceptor: "MQLBCL01" | purpose u8 | name | nonce_d[16]
//!                    | HMAC(secret, "dial" | nonce_a | nonce_d | purpose | name)
//! acceptor → dialer: HMAC(secret, "answer" | nonce_d | nonce_a | name') | name'
//! ```
//! The secret never crosses the wire, a recorded handshake cannot be
//! replayed (the other side's nonce differs every time), and the dialer
//! learns that the acceptor holds the secret too. Without a secret the MAC
//! key is empty: a node only allows that on a loopback cluster listener.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long either side may take over the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

const MAGIC: &[u8; 8] = b"MQLBCL01";
const NAME_MAX: usize = 255;

/// What a cluster connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The dialer's frames to the acceptor (interest, retained, forwards).
    Link,
    /// An MQTT client connection the dialer hands to the acceptor, which
    /// owns the client's session.
    Client,
}

impl Purpose {
    fn byte(self) -> u8 {
        match self {
            Purpose::Link => 1,
            Purpose::Client => 2,
        }
    }
}

/// Why a cluster connection was refused; each is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not our protocol at all (or the peer closed early).
    #[error("not a cluster handshake")]
    Garbage,
    /// The MAC did not verify: wrong or missing secret.
    #[error("bad cluster secret")]
    BadSecret,
    /// A node name that is not a member.
    #[error("unknown node")]
    UnknownNode,
    /// Too slow.
    #[error("handshake timed out")]
    Timeout,
}

impl Refusal {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Garbage => "garbage",
            Refusal::BadSecret => "bad_secret",
            Refusal::UnknownNode => "unknown_node",
            Refusal::Timeout => "timeout",
        }
    }
}

fn mac(secret: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length, the empty one included.
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(secret) else {
        return [0; 32];
    };
    for p in parts {
        m.update(&(p.len() as u32).to_be_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn verify(secret: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    for p in parts {
        m.update(&(p.len() as u32).to_be_bytes());
        m.update(p);
    }
    m.verify_slice(tag).is_ok()
}

fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    if getrandom::getrandom(&mut n).is_err() {
        n = fastrand::u128(..).to_be_bytes();
    }
    n
}

async fn read_name(s: &mut (impl AsyncRead + Unpin)) -> Result<String, Refusal> {
    let n = usize::from(s.read_u8().await.map_err(|_| Refusal::Garbage)?);
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).await.map_err(|_| Refusal::Garbage)?;
    String::from_utf8(b).map_err(|_| Refusal::Garbage)
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    let b = &name.as_bytes()[..name.len().min(NAME_MAX)];
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

/// Accepts a cluster connection as node `me`: returns the dialer's name and
/// purpose once it has proved the secret and `known` accepts its name.
pub async fn accept(
    s: &mut (impl AsyncRead + AsyncWrite + Unpin),
    me: &str,
    secret: &[u8],
    known: impl Fn(&str) -> bool,
) -> Result<(String, Purpose), Refusal> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let na = nonce();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&na);
        s.write_all(&hello).await.map_err(|_| Refusal::Garbage)?;
        let mut magic = [0u8; 8];
        s.read_exact(&mut magic)
            .await
            .map_err(|_| Refusal::Garbage)?;
        if &magic != MAGIC {
            return Err(Refusal::Garbage);
        }
        let purpose = match s.read_u8().await.map_err(|_| Refusal::Garbage)? {
            1 => Purpose::Link,
            2 => Purpose::Client,
            _ => return Err(Refusal::Garbage),
        };
        let name = read_name(s).await?;
        let mut nd = [0u8; 16];
        s.read_exact(&mut nd).await.map_err(|_| Refusal::Garbage)?;
        let mut tag = [0u8; 32];
        s.read_exact(&mut tag).await.map_err(|_| Refusal::Garbage)?;
        let p = [purpose.byte()];
        if !verify(secret, &[b"dial", &na, &nd, &p, name.as_bytes()], &tag) {
            return Err(Refusal::BadSecret);
        }
        if !known(&name) {
            return Err(Refusal::UnknownNode);
        }
        let mut answer = mac(secret, &[b"answer", &nd, &na, me.as_bytes()]).to_vec();
        put_name(&mut answer, me);
        s.write_all(&answer).await.map_err(|_| Refusal::Garbage)?;
        Ok((name, purpose))
    })
    .await
    .map_err(|_| Refusal::Timeout)?
}

/// Opens a cluster connection as node `me` for `purpose`: returns the
/// acceptor's name once it has proved the secret.
pub async fn dial(
    s: &mut (impl AsyncRead + AsyncWrite + Unpin),
    me: &str,
    purpose: Purpose,
    secret: &[u8],
) -> Result<String, Refusal> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut hello = [0u8; 24];
        s.read_exact(&mut hello)
            .await
            .map_err(|_| Refusal::Garbage)?;
        if &hello[..8] != MAGIC {
            return Err(Refusal::Garbage);
        }
        let na = &hello[8..];
        let nd = nonce();
        let mut out = MAGIC.to_vec();
        out.push(purpose.byte());
        put_name(&mut out, me);
        out.extend_from_slice(&nd);
        let p = [purpose.byte()];
        out.extend_from_slice(&mac(secret, &[b"dial", na, &nd, &p, me.as_bytes()]));
        s.write_all(&out).await.map_err(|_| Refusal::Garbage)?;
        let mut tag = [0u8; 32];
        s.read_exact(&mut tag).await.map_err(|_| Refusal::Garbage)?;
        let name = read_name(s).await?;
        if !verify(secret, &[b"answer", &nd, na, name.as_bytes()], &tag) {
            return Err(Refusal::BadSecret);
        }
        Ok(name)
    })
    .await
    .map_err(|_| Refusal::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(
        dial_secret: &'static [u8],
        accept_secret: &'static [u8],
    ) -> (Result<String, Refusal>, Result<(String, Purpose), Refusal>) {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let acc =
            tokio::spawn(async move { accept(&mut b, "n1", accept_secret, |n| n == "n2").await });
        let d = dial(&mut a, "n2", Purpose::Client, dial_secret).await;
        drop(a);
        let acc = acc.await.unwrap_or(Err(Refusal::Garbage));
        (d, acc)
    }

    #[tokio::test]
    async fn same_secret_passes_and_a_wrong_one_is_refused() {
        let (d, a) = run(b"s3cret", b"s3cret").await;
        assert_eq!(d, Ok("n1".to_string()));
        assert_eq!(a, Ok(("n2".to_string(), Purpose::Client)));
        let (d, a) = run(b"wrong", b"s3cret").await;
        assert!(d.is_err());
        assert_eq!(a, Err(Refusal::BadSecret));
        let (_, a) = run(b"", b"s3cret").await;
        assert_eq!(a, Err(Refusal::BadSecret));
    }
}
