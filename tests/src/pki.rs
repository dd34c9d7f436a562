//! Certificates made in the test with rcgen (none are checked in): a
//! self-signed server certificate, and a client CA with a good and a
//! revoked client certificate and the CRL that revokes it.

use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;

use crate::scratch_dir;

/// A self-signed certificate for 127.0.0.1 / localhost in a new scratch
/// directory (`cert.pem`, `key.pem`): (dir, cert DER).
pub fn server_certificate() -> (PathBuf, CertificateDer<'static>) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = scratch_dir("tls");
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
    (dir, ck.cert.der().clone())
}

/// A CA and client certificates it signed, written as PEM under `dir`:
/// `{name}-ca.pem`; `{name}-client.pem`/`.key` (subject CN `cn` if given);
/// `{name}-revoked.pem`/`.key` (CN `{cn}-revoked`); and `{name}-crl.pem`,
/// a CRL from the CA that revokes the second.
pub fn client_pki(dir: &Path, name: &str, cn: Option<&str>) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams,
        ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, RevokedCertParams, SerialNumber,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A CA named apart from its leaf (OpenSSL, as in Mosquitto, takes a
    // certificate whose issuer is its own subject for self-signed).
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem()).unwrap();
    for (file, serial, cn) in [
        ("client", 1u64, cn.map(str::to_string)),
        ("revoked", 2, cn.map(|c| format!("{c}-revoked"))),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![format!("{name}-device")]).unwrap();
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if let Some(cn) = cn {
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}-{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-{file}.key")), key.serialize_pem()).unwrap();
    }
    let crl = CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2024, 1, 1),
        next_update: rcgen::date_time_ymd(2099, 1, 1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from(2u64),
            revocation_time: rcgen::date_time_ymd(2024, 1, 1),
            reason_code: Some(rcgen::RevocationReason::KeyCompromise),
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca, &ca_key)
    .unwrap();
    std::fs::write(dir.join(format!("{name}-crl.pem")), crl.pem().unwrap()).unwrap();
}
