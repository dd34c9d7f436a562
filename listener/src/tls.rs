//! TLS termination on a listener.
//!
//! rustls (with the ring provider) rather than OpenSSL: memory-safe, no
//! system library to match at build or run time, and the same choice as
//! linkerd2-proxy. TLS 1.2 and 1.3, the provider's safe default suites.
//! With `tls_client_ca`, a client certificate chaining to those CAs is
//! required (mTLS), and with `tls_client_crl` one they revoke is refused
//! (rustls' own CRL check: cheap, so offered).
//!
//! Rotation: a [`Slot`] holds a listener's acceptor and a fingerprint of
//! its files; [`watch`] re-reads them when they change on disk (polling
//! size and modification time, which also sees Kubernetes' symlink swap of
//! a mounted Secret). Open sessions keep the certificate they were made
//! with; a broken new file keeps the old acceptor in service and is
//! reported.

use std::io;
use std::sync::Arc;

use mqlb_config::TlsFiles;
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::pem::{self, bad};

/// The first byte of every TLS ClientHello (a handshake record): what tells
/// a TLS client from a plain MQTT one (whose first byte is 0x10, CONNECT).
pub const HANDSHAKE_RECORD: u8 = 0x16;

/// Waits (up to `timeout`) for the client's first byte without consuming
/// it: `Ok(true)` if it starts a TLS record, `Ok(false)` if anything else
/// (plain MQTT on a TLS port, refused at once instead of by a failed
/// handshake), `Err` on timeout or close.
pub async fn starts_tls(
    stream: &tokio::net::TcpStream,
    already: &[u8],
    timeout: std::time::Duration,
) -> io::Result<bool> {
    if let Some(b) = already.first() {
        return Ok(*b == HANDSHAKE_RECORD);
    }
    let mut b = [0u8; 1];
    match tokio::time::timeout(timeout, stream.peek(&mut b)).await {
        Ok(Ok(1)) => Ok(b[0] == HANDSHAKE_RECORD),
        Ok(Ok(_)) => Err(io::ErrorKind::UnexpectedEof.into()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// A listener's TLS acceptor (cheap to clone).
#[derive(Clone)]
pub struct Terminator(TlsAcceptor);

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Terminator")
    }
}

impl Terminator {
    /// The server side of a TLS handshake on `stream`.
    pub fn accept<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        &self,
        stream: S,
    ) -> tokio_rustls::Accept<S> {
        self.0.accept(stream)
    }
}

/// A certificate chain and its key, ready to sign handshakes, and the DNS
/// names its leaf is for.
fn load(
    cert: &std::path::Path,
    key: &std::path::Path,
    provider: &rustls::crypto::CryptoProvider,
) -> io::Result<(Arc<CertifiedKey>, Vec<String>)> {
    let certs = pem::certs(cert)?;
    let names = certs
        .first()
        .map(|leaf| dns_names(leaf.as_ref()))
        .unwrap_or_default();
    let der = pem::key(key)?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| bad(key, &e))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|e| bad(key, &e))?;
    Ok((Arc::new(ck), names))
}

/// The DNS names a certificate is for (its SANs, lower case).
fn dns_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// Picks the certificate by the name the client asks for (SNI). A client
/// that asks for none gets the default. With SNI certificates configured, a
/// name none of them (nor the default) is for is refused (alert
/// `unrecognized_name`) rather than answered with a certificate that would
/// not verify; without any, every client gets the default.
#[derive(Debug)]
struct BySni {
    default: Arc<CertifiedKey>,
    /// Name (or `*.suffix`) → certificate.
    names: std::collections::HashMap<String, Arc<CertifiedKey>>,
    strict: bool,
}

impl BySni {
    fn find(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.to_ascii_lowercase();
        if let Some(ck) = self.names.get(&name) {
            return Some(ck.clone());
        }
        let (_, parent) = name.split_once('.')?;
        self.names.get(&format!("*.{parent}")).cloned()
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            None => Some(self.default.clone()),
            Some(name) => self
                .find(name)
                .or_else(|| (!self.strict).then(|| self.default.clone())),
        }
    }
}

/// Reads the PEM files and builds the acceptor; errors name the file.
pub fn acceptor(files: &TlsFiles) -> io::Result<Terminator> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (default, default_names) = load(&files.cert, &files.key, &provider)?;
    let mut names = std::collections::HashMap::new();
    for n in default_names {
        names.insert(n, default.clone());
    }
    for s in &files.sni {
        let (ck, _) = load(&s.cert, &s.key, &provider)?;
        for n in &s.server_names {
            names.insert(n.clone(), ck.clone());
        }
    }
    let resolver = Arc::new(BySni {
        default,
        names,
        strict: !files.sni.is_empty(),
    });
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&files.cert, &e))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = pem::roots(ca)?;
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if let Some(crl) = &files.client_crl {
                verifier = verifier.with_crls(pem::crls(crl)?);
            }
            let verifier = verifier.build().map_err(|e| bad(ca, &e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(resolver);
    // ALPN `mqtt` when the client offers it (clients that offer none are
    // served too).
    config.alpn_protocols = vec![b"mqtt".to_vec()];
    Ok(Terminator(TlsAcceptor::from(Arc::new(config))))
}

/// A TLS listener's acceptor, swapped when its files change or a reload
/// re-reads them (certificate rotation without dropping a connection: open
/// TLS sessions keep the certificate they were made with).
#[derive(Debug)]
pub struct Slot {
    /// The listener's name.
    pub listener: String,
    /// The files the acceptor is built from.
    pub files: TlsFiles,
    /// The acceptor new connections use.
    pub current: arc_swap::ArcSwap<Terminator>,
    /// Size and modification time of each file when last read.
    seen: std::sync::Mutex<Fingerprint>,
}

/// Size and modification time of each of a listener's files (`None`: not
/// readable).
type Fingerprint = Vec<Option<(u64, std::time::SystemTime)>>;

/// What [`Slot::refresh`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refresh {
    /// No file changed.
    Unchanged,
    /// The files changed and new connections get the new acceptor.
    Reloaded,
    /// The files changed but do not make an acceptor: the old one stays in
    /// service. The error names the file.
    Failed(String),
}

fn paths(files: &TlsFiles) -> Vec<&std::path::Path> {
    let mut p = vec![files.cert.as_path(), files.key.as_path()];
    p.extend(files.client_ca.as_deref());
    p.extend(files.client_crl.as_deref());
    for s in &files.sni {
        p.push(&s.cert);
        p.push(&s.key);
    }
    p
}

fn fingerprint(files: &TlsFiles) -> Fingerprint {
    paths(files)
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.len(), m.modified().ok()?))
        })
        .collect()
}

impl Slot {
    /// Reads the files and builds the first acceptor; errors name the file.
    pub fn new(listener: &str, files: &TlsFiles) -> io::Result<Slot> {
        let seen = fingerprint(files);
        Ok(Slot {
            listener: listener.to_string(),
            current: arc_swap::ArcSwap::from_pointee(acceptor(files)?),
            files: files.clone(),
            seen: std::sync::Mutex::new(seen),
        })
    }

    /// Re-reads the files if any changed on disk since they were last read.
    pub fn refresh(&self) -> Refresh {
        let now = fingerprint(&self.files);
        {
            let Ok(mut seen) = self.seen.lock() else {
                return Refresh::Unchanged;
            };
            if *seen == now {
                return Refresh::Unchanged;
            }
            // Remembered even when the new files are broken, so a bad file
            // is reported once, not on every poll.
            *seen = now;
        }
        match acceptor(&self.files) {
            Ok(t) => {
                self.current.store(Arc::new(t));
                Refresh::Reloaded
            }
            Err(e) => Refresh::Failed(e.to_string()),
        }
    }

    /// Re-reads the files now, changed or not (a configuration reload);
    /// the old acceptor stays on error.
    pub fn reload(&self) -> io::Result<()> {
        let seen = fingerprint(&self.files);
        let t = acceptor(&self.files)?;
        self.current.store(Arc::new(t));
        if let Ok(mut s) = self.seen.lock() {
            *s = seen;
        }
        Ok(())
    }
}

/// How often [`watch`] looks at the files.
pub const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Polls `slots`' files every `every` until `stop`, swapping acceptors as
/// files change; `report` hears every reload and failure (for logs and
/// metrics).
pub async fn watch(
    slots: impl Fn() -> Vec<Arc<Slot>>,
    every: std::time::Duration,
    stop: impl std::future::Future<Output = ()>,
    mut report: impl FnMut(&Slot, &Refresh),
) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => return,
        }
        for slot in slots() {
            let r = slot.refresh();
            match &r {
                Refresh::Unchanged => continue,
                Refresh::Reloaded => {
                    tracing::info!(listener = %slot.listener, "TLS files changed: certificates re-read")
                }
                Refresh::Failed(e) => tracing::warn!(
                    listener = %slot.listener,
                    error = %e,
                    "TLS files changed but cannot be used; the old certificate stays in service"
                ),
            }
            report(&slot, &r);
        }
    }
}

/// The verified client certificate's identity: its subject's common name,
/// else its first DNS subject alternative name. Parsed with x509-parser
/// (a maintained DER/X.509 parser; rustls verifies the chain but does not
/// expose names).
pub fn peer_identity(conn: &rustls::ServerConnection) -> Option<String> {
    let der = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        if !cn.is_empty() {
            return Some(cn.to_string());
        }
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
        _ => None,
    })
}
