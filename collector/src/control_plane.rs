//! The control plane's identity side: the trust domain's CA, one-time
//! enrollment tokens, the device registry, revocations, and the collector's
//! own TLS certificate, all kept in the state directory:
//!
//! ```text
//! <state_dir>/ca/ca.key        CA key, mode 0600
//! <state_dir>/ca/ca.crt        CA certificate (the trust bundle)
//! <state_dir>/tokens/          enrollment tokens (hashes only)
//! <state_dir>/devices.json     enrolled devices
//! <state_dir>/users.json       people (ztctl, console) and their roles
//! <state_dir>/revocations.json revoked devices and certificates
//! <state_dir>/policy/           the policy signing key and bundles
//! ```
//!
//! Sans-network: the gRPC services ([`crate::enrollment`], ingest) call it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use zt_identity::{
    files::write_file_atomic, CertificateAuthority, CertificateRequest, RevocationList,
    SharedRevocationList, SpiffeId, TokenError, TokenStore, TrustDomain,
};

use crate::config::IdentityConfig;

const CA_DIR: &str = "ca";
const TOKENS_DIR: &str = "tokens";
const DEVICES_FILE: &str = "devices.json";
const USERS_FILE: &str = "users.json";
const REVOCATIONS_FILE: &str = "revocations.json";
const POLICY_DIR: &str = "policy";
/// Lifetime of the collector's own TLS certificate; reissued at half of it.
const SERVER_CERTIFICATE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("policy store: {0}")]
    Policy(#[from] crate::policy_store::PolicyStoreError),
    #[error("trust domain: {0}")]
    TrustDomain(#[from] zt_identity::SpiffeIdError),
    #[error("certificate authority in {dir}: {source}")]
    Ca {
        dir: PathBuf,
        source: zt_identity::Error,
    },
    #[error("enrollment tokens: {0}")]
    Tokens(#[from] TokenError),
    #[error("TLS: {0}")]
    Tls(zt_identity::Error),
    #[error("{what} {path}: {source}")]
    State {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// Why an enrollment or renewal was refused; each maps to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("invalid certificate request: {0}")]
    BadRequest(String),
    #[error("enrollment token refused: {0}")]
    Token(TokenError),
    #[error("device {0} is revoked")]
    Revoked(String),
    #[error("only devices renew this way; {0} is not a device")]
    NotADevice(String),
    #[error("cannot issue the certificate: {0}")]
    Issue(zt_identity::Error),
    #[error("cannot record the device: {0}")]
    Registry(ControlPlaneError),
}

/// A token as handed to whoever installs the agent: the one-time secret and
/// the pin of the CA the agent must find at the collector.
#[derive(Debug, Clone, Serialize)]
pub struct JoinToken {
    /// `<token>.<pin hex>`: what `zt-agent enroll --token` takes.
    pub join_token: String,
    pub org: String,
    pub device: String,
    pub spiffe_id: String,
    pub ca_pin: String,
    pub expires_unix: u64,
}

/// An enrolled device, as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub spiffe_id: String,
    pub org: String,
    pub device: String,
    /// As the agent reported it at enrollment (the collector stores this,
    /// not what telemetry payloads claim).
    pub hostname: String,
    pub agent_version: String,
    pub enrolled_unix: u64,
    /// The last certificate issued: serial (hex) and expiry.
    pub serial: String,
    pub not_after_unix: u64,
}

/// What a person may do. Roles are per organisation, except `soc`, the
/// prefecture-wide SOC, which works on every organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads its organisation's incidents, events and fleet.
    Analyst,
    /// Also changes its organisation: enrolls and revokes devices, policy.
    Admin,
    /// Reads and changes every organisation.
    Soc,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Analyst => "analyst",
            Role::Admin => "admin",
            Role::Soc => "soc",
        }
    }

    /// Whether this role, held in `own_org`, may read `org`.
    pub fn may_read(self, own_org: &str, org: &str) -> bool {
        self == Role::Soc || own_org == org
    }

    /// Whether this role, held in `own_org`, may change `org`.
    pub fn may_change(self, own_org: &str, org: &str) -> bool {
        match self {
            Role::Soc => true,
            Role::Admin => own_org == org,
            Role::Analyst => false,
        }
    }
}

/// A person registered by `zt-collector credential create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub spiffe_id: String,
    pub org: String,
    pub name: String,
    pub role: Role,
}

/// A certificate issued to a device.
#[derive(Debug, Clone)]
pub struct IssuedDeviceCertificate {
    pub id: SpiffeId,
    pub certificate_pem: String,
    pub ca_bundle_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// See the module documentation.
pub struct ControlPlane {
    ca: CertificateAuthority,
    tokens: TokenStore,
    devices: Mutex<BTreeMap<String, DeviceRecord>>,
    devices_path: PathBuf,
    users: Mutex<BTreeMap<String, UserRecord>>,
    users_path: PathBuf,
    revocations: SharedRevocationList,
    revocations_path: PathBuf,
    /// The revocation list's version, for those who act on changes (open
    /// streams of a revoked device, agents watching the control channel).
    revocation_version: tokio::sync::watch::Sender<u64>,
    certificate_ttl: Duration,
    server_names: Vec<String>,
    server_addresses: Vec<std::net::IpAddr>,
    policy: crate::distribution::PolicyDistribution,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("trust_domain", self.ca.trust_domain())
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Opens the state directory, creating the CA on first use.
    pub fn open(config: &IdentityConfig) -> Result<ControlPlane, ControlPlaneError> {
        let trust_domain = TrustDomain::new(&config.trust_domain)?;
        let dir = &config.state_dir;
        std::fs::create_dir_all(dir).map_err(|source| ControlPlaneError::State {
            what: "cannot create state directory",
            path: dir.clone(),
            source,
        })?;
        let ca_dir = dir.join(CA_DIR);
        let ca =
            CertificateAuthority::load_or_create(&ca_dir, &trust_domain).map_err(|source| {
                ControlPlaneError::Ca {
                    dir: ca_dir.clone(),
                    source,
                }
            })?;
        let tokens = TokenStore::open(&dir.join(TOKENS_DIR))?;
        let devices_path = dir.join(DEVICES_FILE);
        let devices = read_json(&devices_path)?.unwrap_or_default();
        let revocations_path = dir.join(REVOCATIONS_FILE);
        let revocations = if revocations_path.exists() {
            RevocationList::load(&revocations_path).map_err(|e| ControlPlaneError::Corrupt {
                path: revocations_path.clone(),
                reason: e.to_string(),
            })?
        } else {
            RevocationList::default()
        };
        let users_path = dir.join(USERS_FILE);
        let users = read_json(&users_path)?.unwrap_or_default();
        let (revocation_version, _) = tokio::sync::watch::channel(revocations.version());
        let policy = crate::distribution::PolicyDistribution::open(&dir.join(POLICY_DIR))?;
        Ok(ControlPlane {
            policy,
            ca,
            tokens,
            devices: Mutex::new(devices),
            devices_path,
            users: Mutex::new(users),
            users_path,
            revocation_version,
            revocations_path,
            revocations: revocations.shared(),
            certificate_ttl: Duration::from_secs(config.certificate_ttl_secs),
            server_names: config.server_names.clone(),
            server_addresses: config.server_addresses.clone(),
        })
    }

    /// Policy bundles and what agents did with them.
    pub fn policy(&self) -> &crate::distribution::PolicyDistribution {
        &self.policy
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        self.ca.trust_domain()
    }

    /// The CA's pin, `sha256:<hex>`, as agents check it at enrollment.
    pub fn ca_pin(&self) -> Result<String, ControlPlaneError> {
        zt_identity::tls::ca_pin(self.ca.certificate_der()).map_err(ControlPlaneError::Tls)
    }

    pub fn revocations(&self) -> &SharedRevocationList {
        &self.revocations
    }

    /// Follows the revocation list's version.
    pub fn watch_revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revocation_version.subscribe()
    }

    /// Whether `id` is revoked now.
    pub fn is_revoked(&self, id: &SpiffeId) -> bool {
        self.is_device_revoked(id)
    }

    /// Revokes device `id`: its certificates are refused from the next
    /// handshake, open streams are told through [`Self::watch_revocations`],
    /// and the list (saved first) reaches agents over the control channel.
    /// Returns the list's new version.
    pub fn revoke_device(&self, id: &SpiffeId) -> Result<u64, ControlPlaneError> {
        let mut list = self.revocations.write().unwrap_or_else(|p| p.into_inner());
        let mut updated = list.clone();
        updated.revoke_device(id);
        updated
            .save(&self.revocations_path)
            .map_err(|e| ControlPlaneError::State {
                what: "cannot write",
                path: self.revocations_path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        *list = updated;
        let version = list.version();
        drop(list);
        self.revocation_version.send_replace(version);
        info!(device = %id, version, "device revoked");
        Ok(version)
    }

    /// A copy of the revocation list.
    pub fn revocation_list(&self) -> RevocationList {
        self.revocations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every enrolled device of `org` (every one with `None`).
    pub fn devices(&self, org: Option<&str>) -> Vec<DeviceRecord> {
        let devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        devices
            .values()
            .filter(|d| org.is_none_or(|org| d.org == org))
            .cloned()
            .collect()
    }

    /// The registration (and role) of user `id`. Users are registered by
    /// `zt-collector credential create`, possibly while this collector
    /// runs: the registry is read again on every lookup (admin calls are
    /// rare); an unreadable file keeps the last good copy.
    pub fn user(&self, id: &SpiffeId) -> Option<UserRecord> {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        match read_json::<BTreeMap<String, UserRecord>>(&self.users_path) {
            Ok(Some(fresh)) => *users = fresh,
            Ok(None) => users.clear(),
            Err(err) => warn!(error = %err, "user registry unreadable; using the last copy"),
        }
        users.get(&id.to_string()).cloned()
    }

    /// A one-time token enrolling `device` into `org`, valid for `ttl`.
    pub fn create_token(
        &self,
        org: &str,
        device: &str,
        ttl: Duration,
    ) -> Result<JoinToken, ControlPlaneError> {
        let now = SystemTime::now();
        let id = SpiffeId::device(self.trust_domain(), org, device)?;
        let token = self.tokens.create(org, device, ttl, now)?;
        let pin = self.ca_pin()?;
        let pin_hex = pin.trim_start_matches("sha256:");
        Ok(JoinToken {
            join_token: format!("{token}.{pin_hex}"),
            org: org.to_owned(),
            device: device.to_owned(),
            spiffe_id: id.to_string(),
            ca_pin: pin,
            expires_unix: unix(now + ttl),
        })
    }

    /// Registers (or re-registers with a new role) user `user` of `org`,
    /// who may then call the admin and query APIs with a certificate or a
    /// console account.
    pub fn register_user(
        &self,
        org: &str,
        user: &str,
        role: Role,
    ) -> Result<SpiffeId, ControlPlaneError> {
        let id = SpiffeId::user(self.trust_domain(), org, user)?;
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fresh) = read_json(&self.users_path)? {
            *users = fresh;
        }
        users.insert(
            id.to_string(),
            UserRecord {
                spiffe_id: id.to_string(),
                org: org.to_owned(),
                name: user.to_owned(),
                role,
            },
        );
        write_json(&self.users_path, &*users)?;
        Ok(id)
    }

    /// The organisations the collector knows: of enrolled devices and of
    /// registered users.
    pub fn organisations(&self) -> Vec<String> {
        let mut orgs: Vec<String> = self.devices(None).into_iter().map(|d| d.org).collect();
        orgs.extend(
            self.users
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .map(|u| u.org.clone()),
        );
        orgs.sort();
        orgs.dedup();
        orgs
    }

    /// A key and certificate for user `user` of `org` (for `ztctl`), with
    /// the trust bundle: `(credential PEM: key then certificate, bundle PEM)`.
    pub fn issue_user_credential(
        &self,
        org: &str,
        user: &str,
        role: Role,
        ttl: Duration,
    ) -> Result<(String, String), ControlPlaneError> {
        let id = self.register_user(org, user, role)?;
        let key = zt_identity::DeviceKey::generate().map_err(ControlPlaneError::Tls)?;
        let csr = key.csr_pem().map_err(ControlPlaneError::Tls)?;
        let issued = self
            .ca
            .sign_csr(&csr, &id, ttl, SystemTime::now())
            .map_err(ControlPlaneError::Tls)?;
        info!(user = %id, role = role.as_str(), serial = %issued.serial_hex(), "user credential issued");
        Ok((
            format!("{}{}", key.to_pem(), issued.pem),
            self.ca.bundle_pem(),
        ))
    }

    /// Redeems `token` for a certificate on the key of `csr_pem`. The CSR is
    /// checked first, so a malformed request does not use the token up.
    pub fn enroll(
        &self,
        token: &str,
        csr_pem: &str,
        hostname: &str,
        agent_version: &str,
    ) -> Result<IssuedDeviceCertificate, EnrollError> {
        let now = SystemTime::now();
        let csr = CertificateRequest::from_pem(csr_pem)
            .map_err(|e| EnrollError::BadRequest(e.to_string()))?;
        let redeemed = self.tokens.redeem(token, now).map_err(EnrollError::Token)?;
        let id = SpiffeId::device(self.trust_domain(), &redeemed.org, &redeemed.device)
            .map_err(|e| EnrollError::BadRequest(e.to_string()))?;
        if self.is_device_revoked(&id) {
            return Err(EnrollError::Revoked(id.to_string()));
        }
        let issued = self.issue(&csr, &id, now)?;
        self.record_device(&id, hostname, agent_version, &issued, now, true)
            .map_err(EnrollError::Registry)?;
        info!(device = %id, hostname, serial = %issued.serial_hex, "device enrolled");
        Ok(issued.certificate)
    }

    /// A new certificate for the device `caller` (authenticated by its
    /// current certificate) on the key of `csr_pem`.
    pub fn renew(
        &self,
        caller: &SpiffeId,
        csr_pem: &str,
    ) -> Result<IssuedDeviceCertificate, EnrollError> {
        let now = SystemTime::now();
        if caller.device_id().is_none() {
            return Err(EnrollError::NotADevice(caller.to_string()));
        }
        if self.is_device_revoked(caller) {
            return Err(EnrollError::Revoked(caller.to_string()));
        }
        let csr = CertificateRequest::from_pem(csr_pem)
            .map_err(|e| EnrollError::BadRequest(e.to_string()))?;
        let issued = self.issue(&csr, caller, now)?;
        self.record_device(caller, "", "", &issued, now, false)
            .map_err(EnrollError::Registry)?;
        info!(device = %caller, serial = %issued.serial_hex, "certificate renewed");
        Ok(issued.certificate)
    }

    fn issue(
        &self,
        csr: &CertificateRequest,
        id: &SpiffeId,
        now: SystemTime,
    ) -> Result<Issued, EnrollError> {
        let issued = self
            .ca
            .sign(csr, id, self.certificate_ttl, now)
            .map_err(EnrollError::Issue)?;
        Ok(Issued {
            serial_hex: issued.serial_hex(),
            certificate: IssuedDeviceCertificate {
                id: id.clone(),
                certificate_pem: issued.pem,
                ca_bundle_pem: self.ca.bundle_pem(),
                not_before: issued.not_before,
                not_after: issued.not_after,
            },
        })
    }

    fn is_device_revoked(&self, id: &SpiffeId) -> bool {
        self.revocations
            .read()
            .map(|list| list.is_device_revoked(id))
            .unwrap_or(true)
    }

    fn record_device(
        &self,
        id: &SpiffeId,
        hostname: &str,
        agent_version: &str,
        issued: &Issued,
        now: SystemTime,
        enrolling: bool,
    ) -> Result<(), ControlPlaneError> {
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let key = id.to_string();
        let previous = devices.get(&key).cloned();
        let record = DeviceRecord {
            spiffe_id: key.clone(),
            org: id.org().to_owned(),
            device: id.device_id().unwrap_or_default().to_owned(),
            hostname: if enrolling || previous.is_none() {
                hostname.to_owned()
            } else {
                previous
                    .as_ref()
                    .map(|p| p.hostname.clone())
                    .unwrap_or_default()
            },
            agent_version: if agent_version.is_empty() {
                previous
                    .as_ref()
                    .map(|p| p.agent_version.clone())
                    .unwrap_or_default()
            } else {
                agent_version.to_owned()
            },
            enrolled_unix: match (&previous, enrolling) {
                (Some(p), false) => p.enrolled_unix,
                _ => unix(now),
            },
            serial: issued.serial_hex.clone(),
            not_after_unix: unix(issued.certificate.not_after),
        };
        devices.insert(key, record);
        write_json(&self.devices_path, &*devices)
    }

    /// The registry's record of a device.
    pub fn device(&self, id: &SpiffeId) -> Option<DeviceRecord> {
        let devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        devices.get(&id.to_string()).cloned()
    }

    /// The collector's TLS configuration: its certificate (reissued by the
    /// CA at half its lifetime, without a restart), client certificates
    /// optional at the handshake (enrollment has none) but checked against
    /// the CA and the revocation list when present.
    pub fn server_tls(self: &Arc<Self>) -> Result<rustls::ServerConfig, ControlPlaneError> {
        let first = self.server_certificate()?;
        let mut config = zt_identity::tls::server_config_with_revocation(
            &self.ca.bundle_der(),
            first.chain.clone(),
            first.key.clone_key(),
            false,
            self.revocations.clone(),
        )
        .map_err(ControlPlaneError::Tls)?;
        let resolver = Arc::new(RotatingServerCertificate {
            current: RwLock::new(Arc::new(first.certified_key()?)),
        });
        config.cert_resolver = resolver.clone();
        let plane = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SERVER_CERTIFICATE_TTL / 2).await;
                let Some(plane) = plane.upgrade() else {
                    return;
                };
                match plane.server_certificate().and_then(|c| c.certified_key()) {
                    Ok(key) => {
                        *resolver.current.write().unwrap_or_else(|p| p.into_inner()) =
                            Arc::new(key);
                        info!("collector TLS certificate reissued");
                    }
                    Err(err) => {
                        warn!(error = %err, "cannot reissue the collector's TLS certificate; the current one stays")
                    }
                }
            }
        });
        Ok(config)
    }

    fn server_certificate(&self) -> Result<ServerIdentity, ControlPlaneError> {
        let issued = self
            .ca
            .issue_server_certificate(
                &self.server_names,
                &self.server_addresses,
                SERVER_CERTIFICATE_TTL,
            )
            .map_err(ControlPlaneError::Tls)?;
        let identity = zt_identity::TlsIdentity::from_pem(
            issued.chain_pem.as_bytes(),
            issued.key_pem.as_bytes(),
        )
        .map_err(ControlPlaneError::Tls)?;
        Ok(ServerIdentity {
            chain: identity.chain,
            key: identity.key,
        })
    }
}

struct Issued {
    serial_hex: String,
    certificate: IssuedDeviceCertificate,
}

struct ServerIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl ServerIdentity {
    fn certified_key(&self) -> Result<CertifiedKey, ControlPlaneError> {
        CertifiedKey::from_der(
            self.chain.clone(),
            self.key.clone_key(),
            &zt_identity::tls::crypto_provider(),
        )
        .map_err(|e| ControlPlaneError::Tls(zt_identity::Error::Tls(e)))
    }
}

/// Serves the collector's current certificate; swapped when reissued.
#[derive(Debug)]
struct RotatingServerCertificate {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for RotatingServerCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, ControlPlaneError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ControlPlaneError::Corrupt {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ControlPlaneError::State {
            what: "cannot read",
            path: path.to_owned(),
            source,
        }),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ControlPlaneError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| ControlPlaneError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    write_file_atomic(path, &bytes, 0o600).map_err(|e| ControlPlaneError::State {
        what: "cannot write",
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })
}
