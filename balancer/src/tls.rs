//! TLS termination on a listener.
//!
//! rustls (with the ring provider) rather than OpenSSL: memory-safe, no
//! system library to match at build or run time, and the same choice as
//! linkerd2-proxy. TLS 1.2 and 1.3, the provider's safe default suites.

use std::io;
use std::sync::Arc;

use mqlb_config::TlsFiles;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
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
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&files.cert, &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(&files.key, &e))?;
    Ok(Terminator(TlsAcceptor::from(Arc::new(config))))
}
