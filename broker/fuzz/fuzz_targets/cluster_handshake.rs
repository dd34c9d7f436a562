//! Arbitrary bytes into the acceptor's side of the cluster handshake, with
//! the cluster's TLS (a throw-away CA and node certificates made once) or
//! without it (the loopback-only plain mode). It must never panic, never
//! accept anything (no certificate, no known name can come from the
//! fuzzer), and never wait past its deadline (time is paused).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mqlb_broker::cluster::handshake::accept;
use mqlb_broker::cluster::peer_tls::{Paths, PeerTls};
use tokio::io::AsyncWriteExt;

/// n1's TLS, from certificates rcgen makes at the first run.
fn tls() -> &'static PeerTls {
    static TLS: OnceLock<PeerTls> = OnceLock::new();
    TLS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mqlb-fuzz-handshake-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut node = rcgen::CertificateParams::default();
        node.subject_alt_names = vec![rcgen::SanType::URI(
            "mqlb://node/n1".try_into().expect("URI"),
        )];
        node.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = node.signed_by(&key, &ca_cert, &ca_key).expect("node");
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write");
        std::fs::write(dir.join("n1.pem"), cert.pem()).expect("write");
        std::fs::write(dir.join("n1.key"), key.serialize_pem()).expect("write");
        PeerTls::load(
            "n1",
            Paths {
                cert: dir.join("n1.pem"),
                key: dir.join("n1.key"),
                ca: dir.join("ca.pem"),
            },
        )
        .expect("TLS")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let (mut stranger, ours) = tokio::io::duplex(1 << 16);
        let tls = (mode & 1 == 1).then(tls);
        let task = tokio::spawn(async move {
            accept(ours, "n1", tls, |n| n == "n2").await.map(|_| ())
        });
        stranger.write_all(body).await.ok();
        let r = task.await.expect("no panic");
        // Without TLS the plain hello can name n2; with it, nothing the
        // fuzzer sends can carry a certificate the CA signed.
        if tls.is_some() {
            assert!(r.is_err(), "the fuzzer got through the TLS handshake");
        }
    });
});
