//! The trust domain's certificate authority, held by the collector's control plane.
//!
//! On disk it is two files in one directory: `ca.key` (PKCS#8 PEM, mode 0600,
//! created with that mode) and `ca.crt` (PEM). The CA key is ECDSA P-256.
//! The CA certificate carries the trust domain's own SPIFFE id
//! (`spiffe://<td>`) as a URI SAN, so [`CertificateAuthority::load`] needs no
//! other configuration.
//!
//! Leaf certificates follow the X.509-SVID profile: an empty subject, exactly
//! one URI SAN (critical, since the subject is empty), `CA:FALSE`, key usage
//! digitalSignature, extended key usage clientAuth + serverAuth, a random
//! serial, and a validity backdated by [`CLOCK_SKEW`] and capped at the CA's
//! own expiry.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::cert::{self, CertificateInfo};
use crate::csr::CertificateRequest;
use crate::error::{Error, Result};
use crate::files;
use crate::spiffe::{SpiffeId, TrustDomain};

/// File name of the CA private key inside the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the CA certificate inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// Validity of a newly created CA certificate (10 years).
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far not-before is backdated, to tolerate clocks that run behind.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Default lifetime of a device certificate (24 hours).
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// Shortest lifetime the CA issues.
pub const MIN_LEAF_TTL: Duration = Duration::from_secs(60);
/// Longest lifetime the CA issues (30 days): these certificates are meant to be short-lived.
pub const MAX_LEAF_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// A certificate the CA has issued.
#[derive(Clone, Debug)]
pub struct IssuedCertificate {
    /// The certificate, PEM.
    pub pem: String,
    /// The certificate, DER.
    pub der: CertificateDer<'static>,
    /// Serial number, big-endian, no leading zeros.
    pub serial: Vec<u8>,
    /// Start of validity (backdated by [`CLOCK_SKEW`]).
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl IssuedCertificate {
    fn from_rcgen(cert: rcgen::Certificate) -> Result<Self> {
        let info = CertificateInfo::parse(cert.der())?;
        Ok(Self {
            pem: cert.pem(),
            der: cert.der().clone(),
            serial: info.serial,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// The serial as lowercase hex (the form used in revocation lists).
    pub fn serial_hex(&self) -> String {
        cert::serial_hex(&self.serial)
    }
}

/// A TLS server certificate and its freshly generated key.
#[derive(Clone)]
pub struct ServerCertificate {
    /// The leaf certificate alone, PEM.
    pub cert_pem: String,
    /// The chain a server should present: leaf then CA certificate, PEM.
    /// (Sending the CA lets a client that pins the CA key verify the chain.)
    pub chain_pem: String,
    /// The private key, PKCS#8 PEM. Write it with [`files::write_private_key`].
    pub key_pem: String,
    /// End of validity.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCertificate")
            .field("not_after", &self.not_after)
            .field("key_pem", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// The CA of one trust domain.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    not_after: SystemTime,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .field("key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Makes a new CA in memory only (tests, benchmarks). Use
    /// [`CertificateAuthority::create`] for one that persists.
    pub fn generate(
        trust_domain: &TrustDomain,
        validity: Duration,
        now: SystemTime,
    ) -> Result<Self> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        Self::self_sign(trust_domain, key, validity, now)
    }

    /// Creates a new CA in `dir` (made with mode 0700 if missing), valid for
    /// [`DEFAULT_CA_VALIDITY`]. Fails if either CA file already exists: an
    /// existing CA is never replaced.
    pub fn create(dir: &Path, trust_domain: &TrustDomain) -> Result<Self> {
        Self::create_with(dir, trust_domain, DEFAULT_CA_VALIDITY, SystemTime::now())
    }

    /// [`CertificateAuthority::create`] with an explicit validity and clock.
    pub fn create_with(
        dir: &Path,
        trust_domain: &TrustDomain,
        validity: Duration,
        now: SystemTime,
    ) -> Result<Self> {
        let (key_path, cert_path) = paths(dir);
        for path in [&key_path, &cert_path] {
            if path.exists() {
                return Err(Error::CaState {
                    dir: dir.to_owned(),
                    reason: format!(
                        "{} already exists; refusing to replace a CA",
                        path.display()
                    ),
                });
            }
        }
        files::ensure_dir(dir, files::PRIVATE_DIR_MODE)?;
        let ca = Self::generate(trust_domain, validity, now)?;
        // Key first: a crash before the certificate is written leaves a state
        // that load_or_create repairs (nobody can trust a certificate that was
        // never written). Both writes refuse to overwrite.
        files::write_new_file_atomic(
            &key_path,
            ca.issuer.key().serialize_pem().as_bytes(),
            files::PRIVATE_FILE_MODE,
        )?;
        files::write_new_file_atomic(&cert_path, ca.cert_pem.as_bytes(), files::PUBLIC_FILE_MODE)?;
        Ok(ca)
    }

    /// Loads the CA in `dir`, checking that the key is private (mode 0600),
    /// that it matches the certificate, and that the certificate is a CA
    /// certificate carrying a trust domain id.
    pub fn load(dir: &Path) -> Result<Self> {
        let (key_path, cert_path) = paths(dir);
        let key_pem = files::read_private_key(&key_path)?;
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(|e| Error::io(&cert_path, e))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| Error::Key(format!("{}: {e}", key_path.display())))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| Error::Pem(format!("{}: {e}", cert_path.display())))?;
        Self::from_parts(key, cert_der).map_err(|e| Error::CaState {
            dir: dir.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Loads the CA in `dir`, or creates it if the directory holds neither
    /// file. If only the key exists (a crash during creation), a certificate
    /// is made for it. If only the certificate exists, the key is lost and
    /// this fails rather than silently replacing a CA that devices trust.
    /// Fails if the CA found is for another trust domain.
    pub fn load_or_create(dir: &Path, trust_domain: &TrustDomain) -> Result<Self> {
        let (key_path, cert_path) = paths(dir);
        let ca = match (key_path.exists(), cert_path.exists()) {
            (false, false) => return Self::create(dir, trust_domain),
            (true, true) => Self::load(dir)?,
            (true, false) => {
                let key = KeyPair::from_pem(&files::read_private_key(&key_path)?)
                    .map_err(|e| Error::Key(format!("{}: {e}", key_path.display())))?;
                let ca =
                    Self::self_sign(trust_domain, key, DEFAULT_CA_VALIDITY, SystemTime::now())?;
                files::write_new_file_atomic(
                    &cert_path,
                    ca.cert_pem.as_bytes(),
                    files::PUBLIC_FILE_MODE,
                )?;
                ca
            }
            (false, true) => {
                return Err(Error::CaState {
                    dir: dir.to_owned(),
                    reason: format!(
                        "{} exists but {} is missing; restore the key from backup",
                        cert_path.display(),
                        key_path.display()
                    ),
                })
            }
        };
        if ca.trust_domain != *trust_domain {
            return Err(Error::TrustDomainMismatch {
                ca: ca.trust_domain.to_string(),
                requested: trust_domain.to_string(),
            });
        }
        Ok(ca)
    }

    /// The trust domain this CA certifies.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificate, DER.
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The trust bundle: the CA certificate(s) clients and servers should
    /// trust, PEM. Today one certificate; during a CA rotation it would hold
    /// the old and the new.
    pub fn bundle_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The trust bundle as DER, for [`crate::tls`].
    pub fn bundle_der(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert_der.clone()]
    }

    /// End of the CA certificate's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Verifies `csr_pem` and issues a certificate for `id` valid from
    /// `now - CLOCK_SKEW` to `now + ttl` (capped at the CA's expiry).
    ///
    /// Only the CSR's public key is used; any subject or SAN it asks for is
    /// ignored. See [`CertificateAuthority::sign`].
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate> {
        self.sign(&CertificateRequest::from_pem(csr_pem)?, id, ttl, now)
    }

    /// Issues a certificate for `id` to the key of an already verified CSR.
    ///
    /// Parse the CSR with [`CertificateRequest::from_pem`] *before* redeeming
    /// an enrollment token, so a malformed request does not burn the token.
    pub fn sign(
        &self,
        csr: &CertificateRequest,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate> {
        if id.trust_domain() != &self.trust_domain {
            return Err(Error::TrustDomainMismatch {
                ca: self.trust_domain.to_string(),
                requested: id.trust_domain().to_string(),
            });
        }
        check_ttl(ttl)?;
        let mut params = self.leaf_params(ttl, now)?;
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        IssuedCertificate::from_rcgen(params.signed_by(csr.public_key(), &self.issuer)?)
    }

    /// Issues a TLS server certificate (serverAuth) for the collector's own
    /// endpoint, with a fresh ECDSA P-256 key, valid from now for `ttl`.
    pub fn issue_server_certificate(
        &self,
        dns_names: &[String],
        ip_addrs: &[IpAddr],
        ttl: Duration,
    ) -> Result<ServerCertificate> {
        self.issue_server_certificate_at(dns_names, ip_addrs, ttl, SystemTime::now())
    }

    /// [`CertificateAuthority::issue_server_certificate`] with an explicit clock.
    pub fn issue_server_certificate_at(
        &self,
        dns_names: &[String],
        ip_addrs: &[IpAddr],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<ServerCertificate> {
        if dns_names.is_empty() && ip_addrs.is_empty() {
            return Err(Error::Certificate(
                "a server certificate needs a DNS name or an IP address".into(),
            ));
        }
        if ttl < MIN_LEAF_TTL {
            return Err(Error::Validity(format!(
                "lifetime {ttl:?} is shorter than {MIN_LEAF_TTL:?}"
            )));
        }
        let mut params = self.leaf_params(ttl, now)?;
        let mut sans = Vec::with_capacity(dns_names.len() + ip_addrs.len());
        for name in dns_names {
            if name.is_empty() {
                return Err(Error::Certificate("empty DNS name".into()));
            }
            sans.push(SanType::DnsName(name.as_str().try_into()?));
        }
        sans.extend(ip_addrs.iter().copied().map(SanType::IpAddress));
        params.subject_alt_names = sans;
        let common_name = dns_names
            .first()
            .cloned()
            .or_else(|| ip_addrs.first().map(|ip| ip.to_string()))
            .unwrap_or_default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let issued = IssuedCertificate::from_rcgen(params.signed_by(&key, &self.issuer)?)?;
        Ok(ServerCertificate {
            chain_pem: format!("{}{}", issued.pem, self.cert_pem),
            cert_pem: issued.pem,
            key_pem: key.serialize_pem(),
            not_after: issued.not_after,
        })
    }

    /// Common leaf parameters: validity, serial, CA:FALSE, digitalSignature, AKI.
    fn leaf_params(&self, ttl: Duration, now: SystemTime) -> Result<CertificateParams> {
        let not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now);
        let not_after = now
            .checked_add(ttl)
            .ok_or_else(|| Error::Validity("lifetime overflows the clock".into()))?
            .min(self.not_after);
        if not_after <= now {
            return Err(Error::Validity("the CA certificate has expired".into()));
        }
        let mut params = CertificateParams::default();
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    fn self_sign(
        trust_domain: &TrustDomain,
        key: KeyPair,
        validity: Duration,
        now: SystemTime,
    ) -> Result<Self> {
        let not_after = now
            .checked_add(validity)
            .ok_or_else(|| Error::Validity("CA validity overflows the clock".into()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain.as_str());
        params
            .distinguished_name
            .push(DnType::CommonName, format!("zt CA {trust_domain}"));
        params.subject_alt_names = vec![SanType::URI(trust_domain.id_uri().try_into()?)];
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = OffsetDateTime::from(now.checked_sub(CLOCK_SKEW).unwrap_or(now));
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            trust_domain: trust_domain.clone(),
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            not_after: cert::not_after(cert.der())?,
            issuer: Issuer::new(params, key),
        })
    }

    fn from_parts(key: KeyPair, cert_der: CertificateDer<'static>) -> Result<Self> {
        let parsed = cert::parse(&cert_der)?;
        if !parsed.is_ca() {
            return Err(Error::Certificate("ca.crt is not a CA certificate".into()));
        }
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(Error::Key("ca.key does not match ca.crt".into()));
        }
        let trust_domain = match cert::uri_sans(&parsed)?.as_slice() {
            [uri] => TrustDomain::from_id_uri(uri)?,
            _ => {
                return Err(Error::Certificate(
                    "ca.crt must carry exactly one URI SAN, spiffe://<trust-domain>".into(),
                ))
            }
        };
        let not_after = cert::to_system_time(parsed.validity().not_after);
        drop(parsed);
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        let cert_pem = crate::pem::certificates_to_pem([&cert_der]);
        Ok(Self {
            trust_domain,
            issuer,
            cert_der,
            cert_pem,
            not_after,
        })
    }
}

fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(CA_KEY_FILE), dir.join(CA_CERT_FILE))
}

fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl < MIN_LEAF_TTL {
        return Err(Error::Validity(format!(
            "lifetime {ttl:?} is shorter than {MIN_LEAF_TTL:?}"
        )));
    }
    if ttl > MAX_LEAF_TTL {
        return Err(Error::Validity(format!(
            "lifetime {ttl:?} is longer than {MAX_LEAF_TTL:?}"
        )));
    }
    Ok(())
}

/// 126 bits of randomness, positive, with a fixed-length DER encoding.
fn random_serial() -> Result<SerialNumber> {
    let mut bytes: [u8; 16] = crate::random_bytes()?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}
