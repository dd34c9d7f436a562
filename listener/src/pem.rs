//! PEM files: certificate chains, private keys, CA bundles and CRLs. Every
//! error names the file, so `mqlb config check` and a failed reload say
//! which one is wrong.

use std::io;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio_rustls::rustls::RootCertStore;

/// An error about `what`.
pub fn bad(what: &Path, e: &dyn std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {e}", what.display()),
    )
}

/// Every certificate in the file, in order (a chain: leaf first); at least
/// one.
pub fn certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(path, &e))?;
    if certs.is_empty() {
        return Err(bad(path, &"no CERTIFICATE in the file"));
    }
    Ok(certs)
}

/// The first private key in the file (PKCS#8, PKCS#1 or SEC1).
pub fn key(path: &Path) -> io::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| bad(path, &e))
}

/// A CA bundle as a trust store; at least one certificate.
pub fn roots(path: &Path) -> io::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c).map_err(|e| bad(path, &e))?;
    }
    Ok(roots)
}

/// Every CRL in the file; at least one.
pub fn crls(path: &Path) -> io::Result<Vec<CertificateRevocationListDer<'static>>> {
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(path, &e))?;
    if crls.is_empty() {
        return Err(bad(path, &"no X509 CRL in the file"));
    }
    Ok(crls)
}
