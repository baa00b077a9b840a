//! The device's identity: enrollment with a one-time token, the key and
//! certificate on disk, renewal before expiry.
//!
//! ```text
//! <state_dir>/identity/device.pem     private key + certificate, mode 0600,
//!                                     replaced atomically (never apart)
//! <state_dir>/identity/ca.pem         the trust bundle
//! <state_dir>/identity/collector_url  where the device enrolled
//! ```
//!
//! The key is made on this host and never leaves it; every renewal makes a
//! new one. A failed renewal never touches the files: the current
//! certificate stays in use until it expires.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use proto::enrollment::{enrollment_client::EnrollmentClient, EnrollRequest, RenewRequest};
use tracing::{info, warn};
use zt_identity::{
    files::{ensure_dir, write_file_atomic},
    pem::certificates_from_pem,
    DeviceKey, RenewalPolicy, RenewalState, SpiffeId, Validity,
};

pub(crate) const IDENTITY_DIR: &str = "identity";
const DEVICE_FILE: &str = "device.pem";
const CA_FILE: &str = "ca.pem";
const COLLECTOR_FILE: &str = "collector_url";
/// An enrollment or renewal call that takes longer than this failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    #[error(
        "this device is not enrolled ({0} is missing): run `zt-agent enroll --collector https://<collector>:<port> --token <token>`"
    )]
    NotEnrolled(PathBuf),
    #[error("the token must be `<token>.<CA pin>` as `zt-collector token create` prints it")]
    MalformedToken,
    #[error("identity files in {dir}: {source}")]
    Files {
        dir: PathBuf,
        source: zt_identity::Error,
    },
    #[error("{0}")]
    Identity(#[from] zt_identity::Error),
    #[error("{0}")]
    Transport(#[from] zt_grpc_tls::TlsTransportError),
    #[error("the collector refused: {0}")]
    Refused(Box<tonic::Status>),
    #[error("the collector did not answer within {} s", CALL_TIMEOUT.as_secs())]
    Timeout,
    #[error("the collector's answer is not acceptable: {0}")]
    BadAnswer(String),
}

/// The enrolled identity: key, certificate, trust bundle.
#[derive(Clone)]
pub struct DeviceIdentity {
    pub id: SpiffeId,
    key_pem: String,
    certificate_pem: String,
    ca_pem: String,
    pub validity: Validity,
    pub collector_url: Option<String>,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("id", &self.id.to_string())
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

impl DeviceIdentity {
    fn from_parts(
        key_pem: String,
        certificate_pem: String,
        ca_pem: String,
        collector_url: Option<String>,
    ) -> Result<DeviceIdentity, zt_identity::Error> {
        let certs = certificates_from_pem(certificate_pem.as_bytes())?;
        let leaf = certs
            .first()
            .ok_or_else(|| zt_identity::Error::Certificate("no certificate".to_owned()))?;
        let key = DeviceKey::from_pem(&key_pem)?;
        if !key.matches_certificate(leaf)? {
            return Err(zt_identity::Error::Certificate(
                "the certificate is not for this device's key".to_owned(),
            ));
        }
        if certificates_from_pem(ca_pem.as_bytes())?.is_empty() {
            return Err(zt_identity::Error::Certificate(
                "the trust bundle is empty".to_owned(),
            ));
        }
        Ok(DeviceIdentity {
            id: zt_identity::peer_identity(leaf)?,
            validity: Validity::of_certificate(leaf)?,
            key_pem,
            certificate_pem,
            ca_pem,
            collector_url,
        })
    }

    /// Reads the identity files of `state_dir`.
    pub fn load(state_dir: &Path) -> Result<DeviceIdentity, EnrollmentError> {
        let dir = state_dir.join(IDENTITY_DIR);
        let device_path = dir.join(DEVICE_FILE);
        if !device_path.exists() {
            return Err(EnrollmentError::NotEnrolled(device_path));
        }
        let files = |source| EnrollmentError::Files {
            dir: dir.clone(),
            source,
        };
        let device = zt_identity::read_private_key(&device_path).map_err(files)?;
        let ca_pem = read(&dir.join(CA_FILE)).map_err(files)?;
        let collector_url = std::fs::read_to_string(dir.join(COLLECTOR_FILE))
            .ok()
            .map(|url| url.trim().to_owned())
            .filter(|url| !url.is_empty());
        let (key_pem, certificate_pem) = split_device_pem(&device);
        DeviceIdentity::from_parts(key_pem, certificate_pem, ca_pem, collector_url).map_err(files)
    }

    /// Writes the identity files: the trust bundle first, then key and
    /// certificate together in one atomic replacement.
    fn save(&self, state_dir: &Path) -> Result<(), EnrollmentError> {
        let dir = state_dir.join(IDENTITY_DIR);
        let files = |source| EnrollmentError::Files {
            dir: dir.clone(),
            source,
        };
        ensure_dir(&dir, 0o700).map_err(files)?;
        write_file_atomic(&dir.join(CA_FILE), self.ca_pem.as_bytes(), 0o644).map_err(files)?;
        if let Some(url) = &self.collector_url {
            write_file_atomic(
                &dir.join(COLLECTOR_FILE),
                format!("{url}\n").as_bytes(),
                0o644,
            )
            .map_err(files)?;
        }
        let device = format!("{}{}", self.key_pem, self.certificate_pem);
        zt_identity::write_private_key(&dir.join(DEVICE_FILE), device.as_bytes()).map_err(files)?;
        Ok(())
    }

    /// A TLS client configuration presenting this identity and trusting
    /// the bundle.
    pub fn client_tls(&self) -> Result<rustls::ClientConfig, zt_identity::Error> {
        zt_identity::tls::client_config_from_pem(
            self.ca_pem.as_bytes(),
            self.certificate_pem.as_bytes(),
            self.key_pem.as_bytes(),
        )
    }

    /// The tunnel's calling side: presents this identity, accepts a gateway
    /// of the same trust domain that the revocation list does not name.
    pub fn tunnel_client_tls(
        &self,
        revocations: zt_identity::SharedRevocationList,
    ) -> Result<rustls::ClientConfig, zt_identity::Error> {
        let identity = zt_identity::tls::TlsIdentity::from_pem(
            self.certificate_pem.as_bytes(),
            self.key_pem.as_bytes(),
        )?;
        zt_identity::tls::spiffe_client_config(
            &certificates_from_pem(self.ca_pem.as_bytes())?,
            identity.chain,
            identity.key,
            zt_identity::PeerMatcher::TrustDomain(self.id.trust_domain().clone()),
            Some(revocations),
        )
    }

    /// The tunnel's gateway side: presents this identity, requires a client
    /// certificate of the trust bundle whose SPIFFE id is not revoked.
    pub fn tunnel_server_tls(
        &self,
        revocations: zt_identity::SharedRevocationList,
    ) -> Result<rustls::ServerConfig, zt_identity::Error> {
        let identity = zt_identity::tls::TlsIdentity::from_pem(
            self.certificate_pem.as_bytes(),
            self.key_pem.as_bytes(),
        )?;
        zt_identity::tls::server_config_with_revocation(
            &certificates_from_pem(self.ca_pem.as_bytes())?,
            identity.chain,
            identity.key,
            true,
            revocations,
        )
    }
}

/// `<private key PEM><certificate PEM>` split in two.
fn split_device_pem(device: &str) -> (String, String) {
    match device.find("-----BEGIN CERTIFICATE-----") {
        Some(at) => (device[..at].to_owned(), device[at..].to_owned()),
        None => (device.to_owned(), String::new()),
    }
}

fn read(path: &Path) -> Result<String, zt_identity::Error> {
    std::fs::read_to_string(path).map_err(|source| zt_identity::Error::Io {
        path: path.to_owned(),
        source,
    })
}

/// A join token split into the one-time token and the CA pin.
pub fn parse_join_token(join_token: &str) -> Result<(String, String), EnrollmentError> {
    let (token, pin) = join_token
        .trim()
        .rsplit_once('.')
        .ok_or(EnrollmentError::MalformedToken)?;
    if !token.starts_with("zt1_") || pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(EnrollmentError::MalformedToken);
    }
    Ok((
        token.to_owned(),
        format!("sha256:{}", pin.to_ascii_lowercase()),
    ))
}

/// Enrolls this device at `collector_url` with `join_token` and stores the
/// identity in `state_dir`. The collector is trusted only if its CA has the
/// token's pin.
pub async fn enroll(
    collector_url: &str,
    join_token: &str,
    state_dir: &Path,
) -> Result<DeviceIdentity, EnrollmentError> {
    let (token, pin) = parse_join_token(join_token)?;
    let key = DeviceKey::generate()?;
    let tls = zt_identity::tls::pinned_ca_client_config(&pin)?;
    let channel = zt_grpc_tls::channel(collector_url, tls).await?;
    let request = EnrollRequest {
        token,
        csr_pem: key.csr_pem()?,
        hostname: crate::identity::hostname(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let answer = tokio::time::timeout(CALL_TIMEOUT, EnrollmentClient::new(channel).enroll(request))
        .await
        .map_err(|_| EnrollmentError::Timeout)?
        .map_err(|status| EnrollmentError::Refused(Box::new(status)))?
        .into_inner();
    // The bundle must be the CA the pin names: the certificate chains to it.
    let bundle = certificates_from_pem(answer.ca_bundle_pem.as_bytes())?;
    let pinned = bundle
        .iter()
        .any(|ca| zt_identity::tls::ca_pin(ca).is_ok_and(|p| p == pin));
    if !pinned {
        return Err(EnrollmentError::BadAnswer(
            "the trust bundle does not contain the pinned CA".to_owned(),
        ));
    }
    let identity = DeviceIdentity::from_parts(
        key.to_pem(),
        answer.certificate_pem,
        answer.ca_bundle_pem,
        Some(collector_url.to_owned()),
    )
    .map_err(|e| EnrollmentError::BadAnswer(e.to_string()))?;
    if identity.id.to_string() != answer.spiffe_id {
        return Err(EnrollmentError::BadAnswer(format!(
            "the certificate names {}, the answer {}",
            identity.id, answer.spiffe_id
        )));
    }
    identity.save(state_dir)?;
    crate::bundles::save_signing_key(state_dir, &answer.policy_signing_key).map_err(|source| {
        EnrollmentError::Files {
            dir: state_dir.join(IDENTITY_DIR),
            source,
        }
    })?;
    info!(id = %identity.id, "enrolled");
    Ok(identity)
}

/// Asks the collector, authenticated by `current`, for a certificate on a
/// new key; stores and returns the new identity.
pub async fn renew(
    collector_url: &str,
    current: &DeviceIdentity,
    state_dir: &Path,
) -> Result<DeviceIdentity, EnrollmentError> {
    let key = DeviceKey::generate()?;
    let channel = zt_grpc_tls::channel(collector_url, current.client_tls()?).await?;
    let request = RenewRequest {
        csr_pem: key.csr_pem()?,
    };
    let answer = tokio::time::timeout(CALL_TIMEOUT, EnrollmentClient::new(channel).renew(request))
        .await
        .map_err(|_| EnrollmentError::Timeout)?
        .map_err(|status| EnrollmentError::Refused(Box::new(status)))?
        .into_inner();
    let renewed = DeviceIdentity::from_parts(
        key.to_pem(),
        answer.certificate_pem,
        answer.ca_bundle_pem,
        current.collector_url.clone(),
    )
    .map_err(|e| EnrollmentError::BadAnswer(e.to_string()))?;
    if renewed.id != current.id {
        return Err(EnrollmentError::BadAnswer(format!(
            "renewal changed the identity from {} to {}",
            current.id, renewed.id
        )));
    }
    renewed.save(state_dir)?;
    crate::bundles::save_signing_key(state_dir, &answer.policy_signing_key).map_err(|source| {
        EnrollmentError::Files {
            dir: state_dir.join(IDENTITY_DIR),
            source,
        }
    })?;
    Ok(renewed)
}

/// The identity in use, shared with whoever opens connections; replaced
/// when a renewal succeeds.
pub type SharedIdentity = Arc<RwLock<DeviceIdentity>>;

/// Renewal health for metrics and the heartbeat.
#[derive(Debug, Default)]
pub struct RenewalMetrics {
    pub not_after_unix: std::sync::atomic::AtomicU64,
    pub renewals: std::sync::atomic::AtomicU64,
    pub failures: std::sync::atomic::AtomicU64,
}

/// Renews the certificate at about half its lifetime, with jitter, retrying
/// with backoff; a failure keeps the current certificate.
pub async fn keep_renewed(
    collector_url: String,
    identity: SharedIdentity,
    state_dir: PathBuf,
    metrics: Arc<RenewalMetrics>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let current = identity.read().unwrap_or_else(|p| p.into_inner()).clone();
    let mut state = RenewalState::new(
        RenewalPolicy::default(),
        issued_validity(current.validity),
        rand::random(),
    );
    metrics
        .not_after_unix
        .store(unix(current.validity.not_after), Relaxed);
    info!(
        renew_at_unix = unix(state.renew_at()),
        not_after_unix = unix(current.validity.not_after),
        "certificate renewal scheduled"
    );
    loop {
        let wait = state
            .next_attempt()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        let current = identity.read().unwrap_or_else(|p| p.into_inner()).clone();
        match renew(&collector_url, &current, &state_dir).await {
            Ok(renewed) => {
                match state.record_success(
                    issued_validity(renewed.validity),
                    SystemTime::now(),
                    rand::random(),
                ) {
                    Ok(()) => {
                        metrics.renewals.fetch_add(1, Relaxed);
                        metrics
                            .not_after_unix
                            .store(unix(renewed.validity.not_after), Relaxed);
                        info!(
                            not_after_unix = unix(renewed.validity.not_after),
                            renew_at_unix = unix(state.renew_at()),
                            "certificate renewed"
                        );
                        *identity.write().unwrap_or_else(|p| p.into_inner()) = renewed;
                    }
                    Err(err) => {
                        metrics.failures.fetch_add(1, Relaxed);
                        warn!(error = %err, "renewed certificate refused; keeping the current one");
                    }
                }
            }
            Err(err) => {
                metrics.failures.fetch_add(1, Relaxed);
                let next = state.record_failure(SystemTime::now(), &err, rand::random());
                let health = state.health(SystemTime::now());
                warn!(error = %err, status = ?health.status, failures = health.consecutive_failures, retry_in_s = next.duration_since(SystemTime::now()).unwrap_or_default().as_secs(), "certificate renewal failed; the current certificate stays in use");
            }
        }
    }
}

/// The period a certificate was issued for: the CA backdates `not_before`
/// by [`zt_identity::ca::CLOCK_SKEW`] to absorb clock differences, which
/// must not count as lifetime, or a short-lived certificate would be due for
/// renewal the moment it arrives.
pub fn issued_validity(validity: Validity) -> Validity {
    Validity {
        not_before: (validity.not_before + zt_identity::ca::CLOCK_SKEW).min(validity.not_after),
        not_after: validity.not_after,
    }
}

/// An identity from a throwaway CA, for unit tests of its users.
#[cfg(test)]
pub(crate) fn test_identity() -> DeviceIdentity {
    let td = zt_identity::TrustDomain::new("test.example").expect("trust domain");
    let ca = zt_identity::CertificateAuthority::generate(
        &td,
        Duration::from_secs(86_400),
        SystemTime::now(),
    )
    .expect("CA");
    let id = SpiffeId::device(&td, "org-test", "device-test").expect("id");
    let key = DeviceKey::generate().expect("key");
    let cert = ca
        .sign_csr(
            &key.csr_pem().expect("csr"),
            &id,
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .expect("certificate");
    DeviceIdentity::from_parts(key.to_pem(), cert.pem, ca.bundle_pem(), None).expect("identity")
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_carry_the_ca_pin() {
        let pin = "ab".repeat(32);
        let (token, parsed) = parse_join_token(&format!("zt1_secret-part.{pin}")).unwrap();
        assert_eq!(token, "zt1_secret-part");
        assert_eq!(parsed, format!("sha256:{pin}"));
        for bad in [
            "zt1_x",
            "zt1_x.abc",
            &format!("x.{pin}"),
            &format!("zt1_x.{}", "g".repeat(64)),
        ] {
            assert!(parse_join_token(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn renewal_counts_lifetime_from_issue_not_from_the_backdated_start() {
        let issued = SystemTime::now();
        let ttl = Duration::from_secs(60);
        let validity = Validity {
            not_before: issued - zt_identity::ca::CLOCK_SKEW,
            not_after: issued + ttl,
        };
        let state = RenewalState::new(RenewalPolicy::default(), issued_validity(validity), 0.5);
        let due = state.renew_at().duration_since(issued).unwrap();
        assert_eq!(due, ttl / 2, "half of the 60 s it was issued for");
    }

    #[test]
    fn an_unenrolled_state_dir_says_how_to_enroll() {
        let dir = tempfile::tempdir().unwrap();
        let err = DeviceIdentity::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("zt-agent enroll"), "{err}");
    }

    #[test]
    fn identity_files_round_trip_and_a_mismatched_key_is_refused() {
        let td = zt_identity::TrustDomain::new("pref.example").unwrap();
        let ca = zt_identity::CertificateAuthority::generate(
            &td,
            Duration::from_secs(86_400),
            SystemTime::now(),
        )
        .unwrap();
        let id = SpiffeId::device(&td, "city-a", "pc-7").unwrap();
        let key = DeviceKey::generate().unwrap();
        let cert = ca
            .sign_csr(
                &key.csr_pem().unwrap(),
                &id,
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap();
        let identity = DeviceIdentity::from_parts(
            key.to_pem(),
            cert.pem.clone(),
            ca.bundle_pem(),
            Some("https://c:1".into()),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        identity.save(dir.path()).unwrap();
        let loaded = DeviceIdentity::load(dir.path()).unwrap();
        assert_eq!(loaded.id, id);
        assert_eq!(loaded.collector_url.as_deref(), Some("https://c:1"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("identity/device.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        loaded.client_tls().unwrap();

        let other = DeviceKey::generate().unwrap();
        let err = DeviceIdentity::from_parts(other.to_pem(), cert.pem, ca.bundle_pem(), None)
            .unwrap_err();
        assert!(
            err.to_string().contains("not for this device's key"),
            "{err}"
        );
    }
}
