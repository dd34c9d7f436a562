//! Mutual TLS 1.3 on cluster connections: what lets a node trust a peer.
//!
//! Every node has a certificate from the cluster's CA that names its node
//! ID in a URI SAN, `mqlb://node/ID` (node IDs need not be DNS names), with
//! both the server and the client extended key usage. A node accepts a
//! connection only from a certificate that chains to the cluster CA and
//! names a member it knows; when it dials, it accepts only the certificate
//! of the member it meant to reach, so a process that relays a handshake
//! between two nodes gets nowhere (TLS is end to end, and the names are in
//! the certificates, not in anything the relay can rewrite). After the
//! handshake every frame is encrypted and authenticated by TLS.
//!
//! Why rustls, and why TLS instead of the shared secret this replaced: the
//! secret's handshake did not bind the name the dialer meant to reach, and
//! frames after it were neither encrypted nor authenticated; making that
//! sound would have been home-made cryptography, and rustls has no
//! external-PSK mode. rustls (with ring) is what the listeners already use.
//!
//! Rotation: [`PeerTls::refresh`] re-reads the three files when their size
//! or modification time changes (the cluster calls it before each
//! handshake); open links keep the certificate they were made with.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mqlb_listener::pem;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The URI SAN prefix under which a certificate names its node ID.
pub const NODE_URI: &str = "mqlb://node/";

/// The TLS server name a dialer sends (SNI). Certificates are checked by
/// the node ID in their URI SAN, not by this name.
const SNI: &str = "mqlb-cluster.invalid";

/// The three files of a node's cluster TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// This node's certificate chain (leaf first).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The cluster CA bundle peers' certificates must chain to.
    pub ca: PathBuf,
}

/// What a node presents and trusts, built from [`Paths`].
struct Material {
    server: Arc<rustls::ServerConfig>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<dyn rustls::sign::SigningKey>,
    roots: Arc<RootCertStore>,
}

/// A node's cluster TLS: its certificate and key, the CA it trusts, and
/// what was last read from the files.
pub struct PeerTls {
    me: String,
    paths: Paths,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: arc_swap::ArcSwap<Material>,
    /// Size and modification time of each file when last read.
    stamp: Mutex<Vec<Option<(u64, std::time::SystemTime)>>>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("me", &self.me)
            .field("paths", &self.paths)
            .finish()
    }
}

/// The node IDs a certificate names (its `mqlb://node/ID` URI SANs).
pub fn node_ids(der: &[u8]) -> Vec<String> {
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
            x509_parser::extensions::GeneralName::URI(u) => {
                u.strip_prefix(NODE_URI).map(str::to_string)
            }
            _ => None,
        })
        .collect()
}

fn stamp(paths: &Paths) -> Vec<Option<(u64, std::time::SystemTime)>> {
    [&paths.cert, &paths.key, &paths.ca]
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.len(), m.modified().ok()?))
        })
        .collect()
}

fn load(
    me: &str,
    paths: &Paths,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> io::Result<Material> {
    let chain = pem::certs(&paths.cert)?;
    let leaf = chain.first().map(|c| c.as_ref()).unwrap_or_default();
    if !node_ids(leaf).iter().any(|n| n == me) {
        return Err(pem::bad(
            &paths.cert,
            &format!(
                "the certificate does not name this node ({NODE_URI}{me}); make one with `mqlb cert create-node {me}`"
            ),
        ));
    }
    let key = provider
        .key_provider
        .load_private_key(pem::key(&paths.key)?)
        .map_err(|e| pem::bad(&paths.key, &e))?;
    let roots = Arc::new(pem::roots(&paths.ca)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| pem::bad(&paths.ca, &e))?;
    let certified = rustls::sign::CertifiedKey::new(chain.clone(), key.clone());
    certified
        .keys_match()
        .map_err(|e| pem::bad(&paths.key, &e))?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| pem::bad(&paths.cert, &e))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
    Ok(Material {
        server: Arc::new(server),
        chain,
        key,
        roots,
    })
}

/// Always this certificate (a node has one).
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl PeerTls {
    /// Reads the files for node `me`; errors name the file (a certificate
    /// that does not name `me` is one).
    pub fn load(me: &str, paths: Paths) -> io::Result<PeerTls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let material = load(me, &paths, &provider)?;
        Ok(PeerTls {
            me: me.to_string(),
            stamp: Mutex::new(stamp(&paths)),
            paths,
            provider,
            current: arc_swap::ArcSwap::from_pointee(material),
        })
    }

    /// Re-reads the files if any changed since they were last read. A set
    /// that does not load (half-written, wrong node) keeps the old one in
    /// service and is logged.
    pub fn refresh(&self) {
        let now = stamp(&self.paths);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *last == now {
            return;
        }
        match load(&self.me, &self.paths, &self.provider) {
            Ok(m) => {
                self.current.store(Arc::new(m));
                *last = now;
                tracing::info!(cert = %self.paths.cert.display(), "cluster TLS files re-read");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cluster TLS files changed but do not load; keeping the old ones");
            }
        }
    }

    /// The acceptor's side: the peer's node IDs once its certificate has
    /// verified against the cluster CA.
    pub async fn accept<S>(
        &self,
        stream: S,
    ) -> io::Result<(tokio_rustls::server::TlsStream<S>, Vec<String>)>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let server = self.current.load().server.clone();
        let tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(stream)
            .await?;
        let names = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| node_ids(c.as_ref()))
            .unwrap_or_default();
        Ok((tls, names))
    }

    /// The dialer's side: succeeds only if the peer's certificate chains to
    /// the cluster CA and names `expected`.
    pub async fn connect<S>(
        &self,
        stream: S,
        expected: &str,
    ) -> io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let m = self.current.load();
        let verifier = Arc::new(ExpectNode {
            roots: m.roots.clone(),
            expected: expected.to_string(),
            provider: self.provider.clone(),
        });
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(ClientCert(Arc::new(
                rustls::sign::CertifiedKey::new(m.chain.clone(), m.key.clone()),
            ))));
        config.enable_sni = false;
        let name = ServerName::try_from(SNI).map_err(io::Error::other)?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
    }

    /// The CA file, for messages.
    pub fn ca(&self) -> &Path {
        &self.paths.ca
    }
}

/// This node's certificate, offered to every peer that asks.
#[derive(Debug)]
struct ClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies a peer's certificate as a node of this cluster named
/// `expected`: the chain to the cluster CA with webpki (as rustls' own
/// verifier does), then the node ID instead of a DNS name.
#[derive(Debug)]
struct ExpectNode {
    roots: Arc<RootCertStore>,
    expected: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for ExpectNode {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if node_ids(end_entity.as_ref()).contains(&self.expected) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
