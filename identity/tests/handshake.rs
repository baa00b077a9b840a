//! Real in-memory TLS 1.3 handshakes between rustls clients and servers built
//! by `zt_identity::tls`, with certificates from a real CA.

mod common;

use std::time::SystemTime;

use common::*;
use rustls::CertificateError;
use zt_identity::tls::{
    ca_pin, client_config_from_pem, client_config_without_certificate, pinned_ca_client_config,
    server_config_from_pem, server_config_with_revocation, spiffe_client_config,
};
use zt_identity::{
    client_config, peer_identity_from_chain, server_config, PeerMatcher, RevocationList,
};

fn expired(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. }
        )
    )
}

/// A chain that does not lead to a trusted CA. A rogue CA with the *same*
/// name as the real one (same trust domain) is found by name and then fails
/// the signature check; one with another name is an unknown issuer.
fn untrusted(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature
        )
    )
}

#[test]
fn mutual_tls_authenticates_the_device_to_the_collector() {
    let ca = ca();
    let collector = collector_identity(&ca);
    let device = enroll(&ca, "city-a", "host-1");

    let server = server_config(&ca.bundle_der(), collector.chain, collector.key, true).unwrap();
    let client = client_config(
        &ca.bundle_der(),
        vec![device.cert.clone()],
        device.key.private_key_der(),
    )
    .unwrap();
    let (client_conn, server_conn) = handshake(client, server, "collector.pref.example").unwrap();

    // The collector takes the identity from the verified client certificate.
    let presented = server_conn.peer_certificates().unwrap();
    assert_eq!(peer_identity_from_chain(presented).unwrap(), device.id);
    // The device verified the collector by DNS name.
    assert!(client_conn.peer_certificates().is_some());
    assert_eq!(
        client_conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

#[test]
fn configs_build_from_pem_files_content() {
    let ca = ca();
    let server_cert = ca
        .issue_server_certificate(&["collector.pref.example".to_owned()], &[], DAY)
        .unwrap();
    let device = enroll(&ca, "city-a", "host-1");
    let bundle = ca.bundle_pem();

    let server = server_config_from_pem(
        bundle.as_bytes(),
        server_cert.chain_pem.as_bytes(),
        server_cert.key_pem.as_bytes(),
        true,
    )
    .unwrap();
    let client = client_config_from_pem(
        bundle.as_bytes(),
        device.cert_pem.as_bytes(),
        device.key.to_pem().as_bytes(),
    )
    .unwrap();
    let (_, server_conn) = handshake(client, server, "collector.pref.example").unwrap();
    assert_eq!(
        peer_identity_from_chain(server_conn.peer_certificates().unwrap()).unwrap(),
        device.id
    );
}

#[test]
fn collector_is_reachable_by_ip_address_too() {
    let ca = ca();
    let collector = collector_identity(&ca);
    let device = enroll(&ca, "city-a", "host-1");
    let server = server_config(&ca.bundle_der(), collector.chain, collector.key, true).unwrap();
    let client = client_config(
        &ca.bundle_der(),
        vec![device.cert],
        device.key.private_key_der(),
    )
    .unwrap();
    handshake(client, server, "127.0.0.1").unwrap();
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    let ca = ca();
    let rogue_ca = common::ca();
    let collector = collector_identity(&ca);
    // Same trust domain name, same identity, but signed by a CA the collector does not trust.
    let impostor = enroll(&rogue_ca, "city-a", "host-1");

    let server = server_config(&ca.bundle_der(), collector.chain, collector.key, true).unwrap();
    // The impostor even trusts the real CA for the server side.
    let client = client_config(
        &ca.bundle_der(),
        vec![impostor.cert],
        impostor.key.private_key_der(),
    )
    .unwrap();
    let err = handshake(client, server, "collector.pref.example")
        .unwrap_err()
        .server();
    assert!(untrusted(&err), "{err:?}");
}

#[test]
fn client_certificate_from_another_trust_domain_is_an_unknown_issuer() {
    let ca = ca();
    let other_td = zt_identity::TrustDomain::new("other.example").unwrap();
    let other_ca =
        zt_identity::CertificateAuthority::generate(&other_td, 30 * DAY, SystemTime::now())
            .unwrap();
    let key = zt_identity::DeviceKey::generate().unwrap();
    let id = zt_identity::SpiffeId::device(&other_td, "city-a", "host-1").unwrap();
    let issued = other_ca
        .sign_csr(&key.csr_pem().unwrap(), &id, DAY, SystemTime::now())
        .unwrap();

    let collector = collector_identity(&ca);
    let server = server_config(&ca.bundle_der(), collector.chain, collector.key, true).unwrap();
    let client = client_config(&ca.bundle_der(), vec![issued.der], key.private_key_der()).unwrap();
    let err = handshake(client, server, "collector.pref.example")
        .unwrap_err()
        .server();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{err:?}"
    );
}

#[test]
fn server_certificate_from_another_ca_is_refused_by_the_device() {
    let ca = ca();
    let rogue_ca = common::ca();
    let rogue_collector = collector_identity(&rogue_ca);
    let device = enroll(&ca, "city-a", "host-1");

    let server = server_config(
        &rogue_ca.bundle_der(),
        rogue_collector.chain,
        rogue_collector.key,
        false,
    )
    .unwrap();
    let client = client_config(
        &ca.bundle_der(),
        vec![device.cert],
        device.key.private_key_der(),
    )
    .unwrap();
    let err = handshake(client, server, "collector.pref.example")
        .unwrap_err()
        .client();
    assert!(untrusted(&err), "{err:?}");
}

#[test]
fn expired_client_certificate_is_refused() {
    let ca = ca();
    let collector = collector_identity(&ca);
    // Issued two days ago for one hour.
    let stale = enroll_at(&ca, "city-a", "host-1", HOUR, SystemTime::now() - 2 * DAY);
    assert!(zt_identity::not_after(&stale.cert).unwrap() < SystemTime::now());

    let server = server_config(&ca.bundle_der(), collector.chain, collector.key, true).unwrap();
    let client = client_config(
        &ca.bundle_der(),
        vec![stale.cert],
        stale.key.private_key_der(),
    )
    .unwrap();
    let err = handshake(client, server, "collector.pref.example")
        .unwrap_err()
        .server();
    assert!(expired(&err), "{err:?}");
}

#[test]
fn missing_client_certificate_is_refused_when_required_and_allowed_for_enrollment() {
    let ca = ca();

    let collector = collector_identity(&ca);
    let server = server_config(&ca.bundle_der(), collector.chain, collector.key, true).unwrap();
    let client = client_config_without_certificate(&ca.bundle_der()).unwrap();
    let err = handshake(client, server, "collector.pref.example")
        .unwrap_err()
        .server();
    assert!(
        matches!(err, rustls::Error::NoCertificatesPresented),
        "{err:?}"
    );

    let collector = collector_identity(&ca);
    let server = server_config(&ca.bundle_der(), collector.chain, collector.key, false).unwrap();
    let client = client_config_without_certificate(&ca.bundle_der()).unwrap();
    let (_, server_conn) = handshake(client, server, "collector.pref.example").unwrap();
    assert!(server_conn.peer_certificates().is_none());
}

#[test]
fn optional_client_auth_still_refuses_a_bad_certificate() {
    let ca = ca();
    let rogue_ca = common::ca();
    let collector = collector_identity(&ca);
    let impostor = enroll(&rogue_ca, "city-a", "host-1");
    let server = server_config(&ca.bundle_der(), collector.chain, collector.key, false).unwrap();
    let client = client_config(
        &ca.bundle_der(),
        vec![impostor.cert],
        impostor.key.private_key_der(),
    )
    .unwrap();
    let err = handshake(client, server, "collector.pref.example")
        .unwrap_err()
        .server();
    assert!(untrusted(&err), "{err:?}");
}

#[test]
fn a_server_only_certificate_cannot_authenticate_a_client() {
    let ca = ca();
    let collector = collector_identity(&ca);
    let other_server = collector_identity(&ca);
    let server = server_config(&ca.bundle_der(), collector.chain, collector.key, true).unwrap();
    let client = client_config(&ca.bundle_der(), other_server.chain, other_server.key).unwrap();
    let err = handshake(client, server, "collector.pref.example")
        .unwrap_err()
        .server();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            )
        ),
        "{err:?}"
    );
}

#[test]
fn a_ca_loaded_from_disk_issues_certificates_that_chain_to_the_original_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let original = zt_identity::CertificateAuthority::create(dir.path(), &td()).unwrap();
    let bundle = original.bundle_der();
    drop(original);
    let reloaded = zt_identity::CertificateAuthority::load(dir.path()).unwrap();

    let collector = collector_identity(&reloaded);
    let device = enroll(&reloaded, "city-a", "host-1");
    let server = server_config(&bundle, collector.chain, collector.key, true).unwrap();
    let client = client_config(&bundle, vec![device.cert], device.key.private_key_der()).unwrap();
    let (_, server_conn) = handshake(client, server, "collector.pref.example").unwrap();
    assert_eq!(
        peer_identity_from_chain(server_conn.peer_certificates().unwrap()).unwrap(),
        device.id
    );
}

#[test]
fn revoked_devices_and_serials_are_refused_at_the_handshake() {
    let ca = ca();
    let good = enroll(&ca, "city-a", "host-1");
    let revoked = enroll(&ca, "city-a", "host-2");
    let revocations = RevocationList::new().shared();

    let connect = |device: &Device| {
        let collector = collector_identity(&ca);
        let server = server_config_with_revocation(
            &ca.bundle_der(),
            collector.chain,
            collector.key,
            true,
            revocations.clone(),
        )
        .unwrap();
        let client = client_config(
            &ca.bundle_der(),
            vec![device.cert.clone()],
            device.key.private_key_der(),
        )
        .unwrap();
        handshake(client, server, "collector.pref.example")
    };

    connect(&revoked).unwrap();
    // Revoke after the server config was built: the next handshake sees it.
    revocations.write().unwrap().revoke_device(&revoked.id);
    let err = connect(&revoked).unwrap_err().server();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        ),
        "{err:?}"
    );
    connect(&good).unwrap();

    revocations.write().unwrap().revoke_serial(&good.serial);
    let err = connect(&good).unwrap_err().server();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        ),
        "{err:?}"
    );

    // A fresh certificate for a device whose *serial* was revoked works again.
    let renewed = enroll(&ca, "city-a", "host-1");
    connect(&renewed).unwrap();
}

#[test]
fn agents_verify_each_other_by_spiffe_id() {
    let ca = ca();
    let caller = enroll(&ca, "city-a", "laptop-1");
    let service = enroll(&ca, "city-a", "fileserver");
    let revocations = RevocationList::new().shared();

    let connect = |expected: PeerMatcher| {
        let server = server_config_with_revocation(
            &ca.bundle_der(),
            vec![service.cert.clone()],
            service.key.private_key_der(),
            true,
            revocations.clone(),
        )
        .unwrap();
        let client = spiffe_client_config(
            &ca.bundle_der(),
            vec![caller.cert.clone()],
            caller.key.private_key_der(),
            expected,
            Some(revocations.clone()),
        )
        .unwrap();
        // The name is only the address dialled; identity comes from the SAN.
        handshake(client, server, "10.1.2.3")
    };

    let (client_conn, server_conn) = connect(PeerMatcher::Exact(service.id.clone())).unwrap();
    assert_eq!(
        peer_identity_from_chain(server_conn.peer_certificates().unwrap()).unwrap(),
        caller.id
    );
    assert_eq!(
        peer_identity_from_chain(client_conn.peer_certificates().unwrap()).unwrap(),
        service.id
    );

    connect(PeerMatcher::Org {
        trust_domain: td(),
        org: "city-a".into(),
    })
    .unwrap();
    connect(PeerMatcher::TrustDomain(td())).unwrap();

    let err = connect(PeerMatcher::Exact(device_id("city-a", "someone-else")))
        .unwrap_err()
        .client();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
        ),
        "{err:?}"
    );
    let err = connect(PeerMatcher::Org {
        trust_domain: td(),
        org: "city-b".into(),
    })
    .unwrap_err()
    .client();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
        ),
        "{err:?}"
    );

    // Revoking the service makes callers refuse it.
    revocations.write().unwrap().revoke_device(&service.id);
    let err = connect(PeerMatcher::Exact(service.id.clone()))
        .unwrap_err()
        .client();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        ),
        "{err:?}"
    );
}

#[test]
fn agents_refuse_a_peer_from_another_ca_even_with_the_right_spiffe_id() {
    let ca = ca();
    let rogue_ca = common::ca();
    let caller = enroll(&ca, "city-a", "laptop-1");
    let fake_service = enroll(&rogue_ca, "city-a", "fileserver");
    let server = server_config(
        &rogue_ca.bundle_der(),
        vec![fake_service.cert.clone()],
        fake_service.key.private_key_der(),
        false,
    )
    .unwrap();
    let client = spiffe_client_config(
        &ca.bundle_der(),
        vec![caller.cert],
        caller.key.private_key_der(),
        PeerMatcher::Exact(fake_service.id.clone()),
        None,
    )
    .unwrap();
    let err = handshake(client, server, "10.1.2.3").unwrap_err().client();
    assert!(untrusted(&err), "{err:?}");
}

#[test]
fn enrollment_can_bootstrap_trust_from_a_ca_pin() {
    let ca = ca();
    let pin = ca_pin(ca.certificate_der()).unwrap();
    assert!(pin.starts_with("sha256:") && pin.len() == 7 + 64);

    let collector = collector_identity(&ca);
    assert_eq!(collector.chain.len(), 2, "the server presents leaf + CA");
    let server = server_config(&ca.bundle_der(), collector.chain, collector.key, false).unwrap();
    let client = pinned_ca_client_config(&pin).unwrap();
    handshake(client, server, "collector.pref.example").unwrap();

    // Wrong pin: refused.
    let other_pin = ca_pin(common::ca().certificate_der()).unwrap();
    let collector = collector_identity(&ca);
    let server = server_config(&ca.bundle_der(), collector.chain, collector.key, false).unwrap();
    let err = handshake(
        pinned_ca_client_config(&other_pin).unwrap(),
        server,
        "collector.pref.example",
    )
    .unwrap_err()
    .client();
    assert!(untrusted(&err), "{err:?}");

    // Right pin, wrong name: refused.
    let collector = collector_identity(&ca);
    let server = server_config(&ca.bundle_der(), collector.chain, collector.key, false).unwrap();
    let err = handshake(
        pinned_ca_client_config(&pin).unwrap(),
        server,
        "evil.example",
    )
    .unwrap_err()
    .client();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{err:?}"
    );

    // A rogue server that merely includes the real CA certificate in its chain: refused.
    let rogue_ca = common::ca();
    let mut rogue = collector_identity(&rogue_ca);
    rogue.chain[1] = ca.certificate_der().clone();
    let server = server_config(&rogue_ca.bundle_der(), rogue.chain, rogue.key, false).unwrap();
    let err = handshake(
        pinned_ca_client_config(&pin).unwrap(),
        server,
        "collector.pref.example",
    )
    .unwrap_err()
    .client();
    assert!(untrusted(&err), "{err:?}");

    assert!(pinned_ca_client_config("sha256:xyz").is_err());
    assert!(pinned_ca_client_config("md5:00").is_err());
}

#[test]
fn an_empty_ca_bundle_is_an_error_not_an_open_door() {
    let ca = ca();
    let collector = collector_identity(&ca);
    assert!(server_config(&[], collector.chain, collector.key, true).is_err());
    assert!(client_config_without_certificate(&[]).is_err());
}

/// A returning client offers its session, but the server never resumes: a
/// resumed handshake would skip the certificate checks, so a device revoked
/// since its last connection must be refused on the next one.
#[test]
fn sessions_are_never_resumed_so_revocation_applies_to_returning_clients() {
    let ca = ca();
    let device = enroll(&ca, "city-a", "host-9");
    let revocations = RevocationList::new().shared();
    let collector = collector_identity(&ca);
    // One server and one client configuration for every connection, so
    // that session caches and tickets would carry over.
    let server = server_config_with_revocation(
        &ca.bundle_der(),
        collector.chain,
        collector.key,
        true,
        revocations.clone(),
    )
    .unwrap();
    let client = client_config(
        &ca.bundle_der(),
        vec![device.cert.clone()],
        device.key.private_key_der(),
    )
    .unwrap();
    for _ in 0..2 {
        let (c, _) = handshake(client.clone(), server.clone(), "collector.pref.example").unwrap();
        assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Full));
    }
    revocations.write().unwrap().revoke_device(&device.id);
    let err = handshake(client, server, "collector.pref.example")
        .unwrap_err()
        .server();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        ),
        "{err:?}"
    );
}
