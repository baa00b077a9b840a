//! The CA on disk, and the profile of the certificates it issues.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};
use zt_identity::ca::{CA_CERT_FILE, CA_KEY_FILE, CLOCK_SKEW, MAX_LEAF_TTL};
use zt_identity::{
    peer_identity, CertificateAuthority, CertificateInfo, CertificateRequest, DeviceKey, Error,
    TrustDomain,
};

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A whole-second instant, as certificates store time.
fn now_secs() -> SystemTime {
    UNIX_EPOCH
        + Duration::from_secs(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
}

#[test]
fn create_writes_a_private_key_and_load_gives_the_same_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = CertificateAuthority::create(&ca_dir, &td()).unwrap();

    assert_eq!(mode(&ca_dir.join(CA_KEY_FILE)), 0o600);
    assert_eq!(mode(&ca_dir.join(CA_CERT_FILE)), 0o644);
    assert_eq!(mode(&ca_dir), 0o700);
    let key_pem = fs::read_to_string(ca_dir.join(CA_KEY_FILE)).unwrap();
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    // Only the two files: no temporary files left behind.
    assert_eq!(fs::read_dir(&ca_dir).unwrap().count(), 2);

    let loaded = CertificateAuthority::load(&ca_dir).unwrap();
    assert_eq!(loaded.trust_domain(), &td());
    assert_eq!(loaded.certificate_der(), ca.certificate_der());
    assert_eq!(loaded.bundle_pem(), ca.bundle_pem());
    assert_eq!(loaded.not_after(), ca.not_after());

    let info = CertificateInfo::parse(ca.certificate_der()).unwrap();
    assert!(info.is_ca);
    assert!(info.spiffe_id.is_none());
    assert!(format!("{ca:?}").contains("redacted"));
}

#[test]
fn create_never_replaces_an_existing_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::create(dir.path(), &td()).unwrap();
    let err = CertificateAuthority::create(dir.path(), &td()).unwrap_err();
    assert!(matches!(err, Error::CaState { .. }), "{err}");
    let loaded = CertificateAuthority::load(dir.path()).unwrap();
    assert_eq!(loaded.certificate_der(), ca.certificate_der());
}

#[test]
fn load_or_create_creates_once_then_loads() {
    let dir = tempfile::tempdir().unwrap();
    let first = CertificateAuthority::load_or_create(dir.path(), &td()).unwrap();
    let second = CertificateAuthority::load_or_create(dir.path(), &td()).unwrap();
    assert_eq!(first.certificate_der(), second.certificate_der());

    let other = TrustDomain::new("other.example").unwrap();
    let err = CertificateAuthority::load_or_create(dir.path(), &other).unwrap_err();
    assert!(matches!(err, Error::TrustDomainMismatch { .. }), "{err}");
}

#[test]
fn load_or_create_repairs_a_crash_between_key_and_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::create(dir.path(), &td()).unwrap();
    fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
    assert!(CertificateAuthority::load(dir.path()).is_err());
    let repaired = CertificateAuthority::load_or_create(dir.path(), &td()).unwrap();
    // Same key, new certificate.
    assert_eq!(
        zt_identity::cert::subject_public_key_info(repaired.certificate_der()).unwrap(),
        zt_identity::cert::subject_public_key_info(ca.certificate_der()).unwrap()
    );
    CertificateAuthority::load(dir.path()).unwrap();
}

#[test]
fn a_lost_ca_key_is_reported_not_silently_replaced() {
    let dir = tempfile::tempdir().unwrap();
    CertificateAuthority::create(dir.path(), &td()).unwrap();
    fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
    let err = CertificateAuthority::load_or_create(dir.path(), &td()).unwrap_err();
    assert!(err.to_string().contains("restore the key"), "{err}");
    assert!(!dir.path().join(CA_KEY_FILE).exists());
}

#[test]
fn load_refuses_a_readable_key_and_a_mismatched_key() {
    let dir = tempfile::tempdir().unwrap();
    CertificateAuthority::create(dir.path(), &td()).unwrap();
    let key_path = dir.path().join(CA_KEY_FILE);

    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o640)).unwrap();
    let err = CertificateAuthority::load(dir.path()).unwrap_err();
    assert!(
        matches!(err, Error::InsecureKeyFile { mode: 0o640, .. }),
        "{err}"
    );

    zt_identity::write_private_key(
        &key_path,
        KeyPair::generate().unwrap().serialize_pem().as_bytes(),
    )
    .unwrap();
    let err = CertificateAuthority::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}

#[test]
fn leaf_follows_the_svid_profile() {
    let ca = ca();
    let now = now_secs();
    let id = device_id("city-a", "host-1");
    let key = DeviceKey::generate().unwrap();
    let issued = ca
        .sign_csr(&key.csr_pem().unwrap(), &id, 24 * HOUR, now)
        .unwrap();

    assert_eq!(issued.not_before, now - CLOCK_SKEW);
    assert_eq!(issued.not_after, now + 24 * HOUR);
    assert_eq!(peer_identity(&issued.der).unwrap(), id);
    assert!(key.matches_certificate(&issued.der).unwrap());
    assert!(!DeviceKey::generate()
        .unwrap()
        .matches_certificate(&issued.der)
        .unwrap());
    assert_eq!(
        zt_identity::pem::certificates_from_pem(issued.pem.as_bytes()).unwrap(),
        vec![issued.der.clone()]
    );

    let (_, cert) = X509Certificate::from_der(&issued.der).unwrap();
    assert!(
        cert.subject().iter().next().is_none(),
        "subject must be empty"
    );
    assert_eq!(
        cert.issuer(),
        X509Certificate::from_der(ca.certificate_der())
            .unwrap()
            .1
            .subject()
    );
    assert!(!cert.is_ca());
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "SAN must be critical with an empty subject");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI(
            "spiffe://pref.example/org/city-a/device/host-1"
        )]
    );
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && eku.server_auth && !eku.any);
    // Authority key id = the CA's subject key id.
    let (_, ca_cert) = X509Certificate::from_der(ca.certificate_der()).unwrap();
    let ski = ca_cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .unwrap();
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(aki, ski);
}

#[test]
fn csr_asking_for_other_names_gets_only_the_ca_chosen_identity() {
    let ca = ca();
    let key = KeyPair::generate().unwrap();
    let mut wish = CertificateParams::new(vec!["collector.pref.example".to_owned()]).unwrap();
    wish.subject_alt_names.push(SanType::URI(
        "spiffe://pref.example/org/pref/user/admin"
            .try_into()
            .unwrap(),
    ));
    wish.distinguished_name.push(DnType::CommonName, "root");
    wish.distinguished_name
        .push(DnType::OrganizationName, "pref");
    wish.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    wish.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    wish.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    let csr_pem = wish.serialize_request(&key).unwrap().pem().unwrap();

    let granted = device_id("city-a", "host-1");
    let issued = ca
        .sign_csr(&csr_pem, &granted, DAY, SystemTime::now())
        .unwrap();
    let (_, cert) = X509Certificate::from_der(&issued.der).unwrap();
    let names = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(
        names,
        &vec![GeneralName::URI(
            "spiffe://pref.example/org/city-a/device/host-1"
        )]
    );
    assert!(cert.subject().iter().next().is_none());
    assert!(!cert.is_ca());
    assert!(!cert.key_usage().unwrap().unwrap().value.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(!eku.code_signing && eku.client_auth && eku.server_auth);
    assert_eq!(peer_identity(&issued.der).unwrap(), granted);
}

#[test]
fn csrs_that_do_not_verify_or_use_odd_keys_are_refused() {
    let ca = ca();
    let id = device_id("city-a", "host-1");

    // Valid P-384 and Ed25519 requests are accepted.
    for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
        let key = KeyPair::generate_for(alg).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        ca.sign_csr(&csr, &id, DAY, SystemTime::now()).unwrap();
    }

    // Signature that does not match the key.
    let key = DeviceKey::generate().unwrap();
    let csr_pem = key.csr_pem().unwrap();
    let mut der = rustls_pki_types::pem::PemObject::from_pem_slice(csr_pem.as_bytes())
        .map(|d: rustls_pki_types::CertificateSigningRequestDer<'_>| d.as_ref().to_vec())
        .unwrap();
    let last = der.len() - 1;
    der[last] ^= 0x40;
    assert!(matches!(
        CertificateRequest::from_der(&der),
        Err(Error::Csr(_))
    ));

    // Not a CSR at all, and a certificate passed off as one.
    assert!(matches!(
        ca.sign_csr("hello", &id, DAY, SystemTime::now()),
        Err(Error::Csr(_))
    ));
    assert!(ca
        .sign_csr(&ca.bundle_pem(), &id, DAY, SystemTime::now())
        .is_err());
    // Oversized input.
    assert!(CertificateRequest::from_der(&vec![0u8; 20_000]).is_err());
}

#[test]
fn the_ca_only_issues_within_its_trust_domain_and_lifetime_limits() {
    let ca = ca();
    let csr = DeviceKey::generate().unwrap().csr_pem().unwrap();
    let now = SystemTime::now();

    let foreign =
        zt_identity::SpiffeId::device(&TrustDomain::new("other.example").unwrap(), "o", "d")
            .unwrap();
    assert!(matches!(
        ca.sign_csr(&csr, &foreign, DAY, now),
        Err(Error::TrustDomainMismatch { .. })
    ));
    let id = device_id("city-a", "host-1");
    assert!(matches!(
        ca.sign_csr(&csr, &id, Duration::ZERO, now),
        Err(Error::Validity(_))
    ));
    assert!(matches!(
        ca.sign_csr(&csr, &id, MAX_LEAF_TTL + HOUR, now),
        Err(Error::Validity(_))
    ));

    // A leaf never outlives its CA.
    let short_ca = CertificateAuthority::generate(&td(), 2 * HOUR, now).unwrap();
    let issued = short_ca.sign_csr(&csr, &id, DAY, now).unwrap();
    assert_eq!(issued.not_after, short_ca.not_after());
    // An expired CA issues nothing.
    let old_ca = CertificateAuthority::generate(&td(), HOUR, now - DAY).unwrap();
    assert!(matches!(
        old_ca.sign_csr(&csr, &id, HOUR, now),
        Err(Error::Validity(_))
    ));
}

#[test]
fn every_certificate_gets_a_fresh_serial() {
    let ca = ca();
    let key = DeviceKey::generate().unwrap();
    let csr = CertificateRequest::from_pem(&key.csr_pem().unwrap()).unwrap();
    let id = device_id("city-a", "host-1");
    let a = ca.sign(&csr, &id, DAY, SystemTime::now()).unwrap();
    let b = ca.sign(&csr, &id, DAY, SystemTime::now()).unwrap();
    assert_ne!(a.serial, b.serial);
    assert_eq!(a.serial.len(), 16);
    assert_eq!(a.serial_hex().len(), 32);
    assert_eq!(
        CertificateInfo::parse(&a.der).unwrap().serial_hex(),
        a.serial_hex()
    );
}

#[test]
fn server_certificate_names_the_collector_and_is_not_an_identity() {
    let ca = ca();
    let server = ca
        .issue_server_certificate(
            &["collector.pref.example".to_owned()],
            &["10.0.0.5".parse().unwrap()],
            30 * DAY,
        )
        .unwrap();
    let chain = zt_identity::pem::certificates_from_pem(server.chain_pem.as_bytes()).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(&chain[1], ca.certificate_der());
    let (_, cert) = X509Certificate::from_der(&chain[0]).unwrap();
    let names = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(names[0], GeneralName::DNSName("collector.pref.example"));
    assert_eq!(names[1], GeneralName::IPAddress(&[10, 0, 0, 5]));
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    assert!(peer_identity(&chain[0]).is_err());
    assert!(!format!("{server:?}").contains("PRIVATE KEY"));
    assert!(ca.issue_server_certificate(&[], &[], DAY).is_err());
}

#[test]
fn peer_identity_rejects_certificates_without_exactly_one_spiffe_uri() {
    let ca = ca();
    assert!(
        peer_identity(ca.certificate_der()).is_err(),
        "a CA is not an identity"
    );

    let key = KeyPair::generate().unwrap();
    let self_signed = |sans: Vec<SanType>| {
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.self_signed(&key).unwrap().der().clone()
    };
    let uri = |s: &str| SanType::URI(s.try_into().unwrap());
    let err = peer_identity(&self_signed(vec![])).unwrap_err();
    assert!(err.to_string().contains("no URI SAN"), "{err}");
    let err = peer_identity(&self_signed(vec![
        uri("spiffe://pref.example/org/a/device/x"),
        uri("spiffe://pref.example/org/a/device/y"),
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("2 URI SANs"), "{err}");
    let err = peer_identity(&self_signed(vec![uri("https://pref.example/x")])).unwrap_err();
    assert!(err.to_string().contains("not a SPIFFE id"), "{err}");
    let err = peer_identity(&self_signed(vec![uri(
        "spiffe://pref.example/org/A/device/x",
    )]))
    .unwrap_err();
    assert!(matches!(err, Error::PeerIdentity(_)), "{err}");
    assert_eq!(
        peer_identity(&self_signed(vec![
            SanType::DnsName("host".try_into().unwrap()),
            uri("spiffe://pref.example/org/a/user/alice"),
        ]))
        .unwrap(),
        zt_identity::SpiffeId::user(&td(), "a", "alice").unwrap()
    );
}
