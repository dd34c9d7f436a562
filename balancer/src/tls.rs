//! TLS termination on a listener.
//!
//! rustls (with the ring provider) rather than OpenSSL: memory-safe, no
//! system library to match at build or run time, and the same choice as
//! linkerd2-proxy. TLS 1.2 and 1.3, the provider's safe default suites.
//! With `tls_client_ca`, a client certificate chaining to those CAs is
//! required (mTLS); the broker still authenticates the CONNECT.

use std::io;
use std::sync::Arc;

use mqlb_config::TlsFiles;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

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

fn bad(what: &std::path::Path, e: &dyn std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {e}", what.display()),
    )
}

/// A certificate chain and its key, ready to sign handshakes, and the DNS
/// names its leaf is for.
fn load(
    cert: &std::path::Path,
    key: &std::path::Path,
    provider: &rustls::crypto::CryptoProvider,
) -> io::Result<(Arc<CertifiedKey>, Vec<String>)> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(cert, &e))?;
    let Some(leaf) = certs.first() else {
        return Err(bad(cert, &"no CERTIFICATE in the file"));
    };
    let names = dns_names(leaf.as_ref());
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
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
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| bad(ca, &e))? {
                roots
                    .add(c.map_err(|e| bad(ca, &e))?)
                    .map_err(|e| bad(ca, &e))?;
            }
            if roots.is_empty() {
                return Err(bad(ca, &"no CERTIFICATE in the file"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| bad(ca, &e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(resolver);
    // ALPN `mqtt` when the client offers it (clients that offer none are
    // served too).
    config.alpn_protocols = vec![b"mqtt".to_vec()];
    Ok(Terminator(TlsAcceptor::from(Arc::new(config))))
}

/// A TLS listener's acceptor, swapped when a reload re-reads its files
/// (certificate rotation without dropping a connection: open TLS sessions
/// keep the certificate they were made with).
#[derive(Debug)]
pub struct Slot {
    /// The listener's name.
    pub listener: String,
    /// The files the acceptor was built from.
    pub files: TlsFiles,
    /// The acceptor new connections use.
    pub current: arc_swap::ArcSwap<Terminator>,
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
