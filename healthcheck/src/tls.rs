//! TLS towards a backend broker, shared by the probes and the balancer's
//! data path so both trust and present the same things.
//!
//! rustls with the ring provider (as the balancer's listeners): TLS 1.2 and
//! 1.3, the server verified against the configured CA bundle and name, and
//! an optional client certificate for brokers that want one.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mqlb_listener::pem::{self, bad};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{rustls, TlsConnector};

/// What a TLS connection to one backend needs: built once from its files.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    name: ServerName<'static>,
    /// What it was built from, for equality and logs.
    describe: String,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        self.describe == other.describe
    }
}

impl Eq for TlsClient {}

impl TlsClient {
    /// Reads the CA bundle (and the client certificate and key, if any);
    /// `server_name` is what the broker's certificate must name.
    pub fn new(
        ca: &Path,
        client: Option<(&Path, &Path)>,
        server_name: &str,
    ) -> io::Result<TlsClient> {
        let roots = pem::roots(ca)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(ca, &e))?
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = pem::certs(cert)?;
                let key_der = pem::key(key)?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| bad(key, &e))?
            }
        };
        let name = ServerName::try_from(server_name.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("server name {server_name:?}: {e}"),
            )
        })?;
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            name,
            describe: format!(
                "TLS to {server_name} (CA {}{})",
                ca.display(),
                client.map_or(String::new(), |(c, _)| format!(", client {}", c.display()))
            ),
        })
    }

    /// The client side of the handshake on `tcp`, within `timeout`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> io::Result<TlsStream<TcpStream>> {
        tokio::time::timeout(timeout, self.connector.connect(self.name.clone(), tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
    }
}
