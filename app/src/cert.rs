//! `mqlb cert`: the certificates a cluster's links need, made without
//! openssl, as CockroachDB's `cockroach cert` does for its nodes.
//!
//! * `mqlb cert create-ca --out DIR` writes `DIR/ca.pem` and `DIR/ca.key`:
//!   an ECDSA P-256 CA for one cluster.
//! * `mqlb cert create-node ID --host ADDR... --ca DIR --out DIR` writes
//!   `DIR/ID.pem` and `DIR/ID.key`: a certificate that names the node in a
//!   URI SAN `mqlb://node/ID` (node IDs need not be DNS names), with the
//!   hosts as DNS or IP SANs, for both ends of a TLS connection (server and
//!   client extended key usage).
//!
//! rcgen makes and signs them (the key generation and signatures are
//! ring's). Keys are written readable by their owner only.

use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject as _;

/// The common name of a CA `create-ca` makes unless told otherwise.
pub const DEFAULT_CA_NAME: &str = "mqlb cluster CA";

/// How long a CA is valid.
const CA_YEARS: i64 = 10;
/// How long a node certificate is valid (renew by making a new one and
/// replacing the files: nodes re-read them).
const NODE_DAYS: i64 = 825;

fn err(what: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{}: {e}", what.display()))
}

/// Writes `text` to `path`, readable by its owner only when `secret`.
fn write(path: &Path, text: &str, secret: bool) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    if secret {
        o.mode(0o600);
    }
    let mut f = o.open(path).map_err(|e| err(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| err(path, e))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // A little in the past: clocks between nodes differ.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// Makes a CA; returns the paths of its certificate and key.
pub fn create_ca(out: &Path, name: &str) -> io::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(out).map_err(|e| err(out, e))?;
    let (cert, key) = (out.join("ca.pem"), out.join("ca.key"));
    if cert.exists() || key.exists() {
        return Err(err(
            &cert,
            "a CA is already there; remove it first to make a new one (every node certificate would have to be made again)",
        ));
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_YEARS * 365);
    let pair = KeyPair::generate().map_err(|e| err(&key, e))?;
    let ca = params.self_signed(&pair).map_err(|e| err(&cert, e))?;
    write(&key, &pair.serialize_pem(), true)?;
    write(&cert, &ca.pem(), false)?;
    Ok((cert, key))
}

/// The CA in `dir` (`ca.pem`, `ca.key`), as an issuer for rcgen: its
/// certificate is rebuilt from its name and key, and checked to carry the
/// same subject, so what it signs chains to the file's certificate.
fn load_ca(dir: &Path) -> io::Result<(rcgen::Certificate, KeyPair)> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    let pem = std::fs::read_to_string(&cert_path).map_err(|e| err(&cert_path, e))?;
    let key_pem = std::fs::read_to_string(&key_path).map_err(|e| err(&key_path, e))?;
    let pair = KeyPair::from_pem(&key_pem).map_err(|e| err(&key_path, e))?;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| err(&cert_path, e))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| err(&cert_path, e))?;
    let name = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| err(&cert_path, "the CA has no common name"))?
        .to_string();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = params.self_signed(&pair).map_err(|e| err(&cert_path, e))?;
    let rebuilt = x509_parser::parse_x509_certificate(issuer.der().as_ref())
        .map_err(|e| err(&cert_path, e))?
        .1;
    if rebuilt.subject().as_raw() != parsed.subject().as_raw()
        || rebuilt.public_key().raw != parsed.public_key().raw
    {
        return Err(err(
            &cert_path,
            "not a CA made by `mqlb cert create-ca` with this key; issue node certificates with your own tooling instead (URI SAN mqlb://node/ID, server and client auth)",
        ));
    }
    Ok((issuer, pair))
}

/// Makes node `id`'s certificate, signed by the CA in `ca_dir`, for the
/// given hosts (DNS names or IP addresses); returns its paths.
pub fn create_node(
    id: &str,
    hosts: &[String],
    ca_dir: &Path,
    out: &Path,
) -> io::Result<(PathBuf, PathBuf)> {
    let id = mqlb_config::broker::ClusterConfig::check_name(id).map_err(io::Error::other)?;
    let (issuer, issuer_key) = load_ca(ca_dir)?;
    std::fs::create_dir_all(out).map_err(|e| err(out, e))?;
    let (cert, key) = (out.join(format!("{id}.pem")), out.join(format!("{id}.key")));
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, id.as_str());
    let uri = format!("{}{id}", mqlb_broker::cluster::peer_tls::NODE_URI);
    params.subject_alt_names.push(SanType::URI(
        uri.as_str()
            .try_into()
            .map_err(|e| io::Error::other(format!("{uri}: {e}")))?,
    ));
    for h in hosts {
        let san = match h.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                h.as_str()
                    .try_into()
                    .map_err(|e| io::Error::other(format!("--host {h}: {e}")))?,
            ),
        };
        params.subject_alt_names.push(san);
    }
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, NODE_DAYS);
    let pair = KeyPair::generate().map_err(|e| err(&key, e))?;
    let signed = params
        .signed_by(&pair, &issuer, &issuer_key)
        .map_err(|e| err(&cert, e))?;
    write(&key, &pair.serialize_pem(), true)?;
    write(&cert, &signed.pem(), false)?;
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and two node certificates made by these commands load as the
    /// cluster's TLS for their nodes, and name them; a second CA in the
    /// same place is refused.
    #[test]
    fn a_ca_and_node_certificates_load_for_their_nodes() {
        let dir = std::env::temp_dir().join(format!("mqlb-cert-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (ca, _) = create_ca(&dir, DEFAULT_CA_NAME).expect("a CA");
        assert!(create_ca(&dir, DEFAULT_CA_NAME).is_err(), "a CA over a CA");
        for id in ["n1", "node_2"] {
            let (cert, key) =
                create_node(id, &["127.0.0.1".into(), "n1.example".into()], &dir, &dir)
                    .expect("a node certificate");
            let leaf = mqlb_listener::pem::certs(&cert).expect("PEM");
            assert_eq!(
                mqlb_broker::cluster::peer_tls::node_ids(leaf[0].as_ref()),
                [id]
            );
            let paths = mqlb_broker::cluster::peer_tls::Paths {
                cert: cert.clone(),
                key,
                ca: ca.clone(),
            };
            assert!(mqlb_broker::cluster::peer_tls::PeerTls::load(id, paths.clone()).is_ok());
            // Not another node's.
            assert!(mqlb_broker::cluster::peer_tls::PeerTls::load("n9", paths).is_err());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
