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
use tokio_rustls::rustls::server::WebPkiClientVerifier;
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

/// Reads the PEM files and builds the acceptor; errors name the file.
pub fn acceptor(files: &TlsFiles) -> io::Result<Terminator> {
    let bad = |what: &std::path::Path, e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", what.display()),
        )
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(&files.cert, &e))?;
    if certs.is_empty() {
        return Err(bad(&files.cert, &"no CERTIFICATE in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| bad(&files.key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
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
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| bad(&files.key, &e))?;
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
