//! rustls configurations for mutual TLS inside a trust domain.
//!
//! Every config is built on the *ring* provider explicitly (never the process
//! default) and speaks TLS 1.3 only: both ends are ours, so there is no older
//! peer to accommodate. ALPN is left empty; set `alpn_protocols` on the
//! returned config (`h2` for gRPC) as needed.
//!
//! * [`server_config`]: the collector's listener. Client certificates are
//!   verified against the CA bundle (webpki: chain, validity, clientAuth EKU).
//! * [`server_config_with_revocation`]: the same, and the client certificate
//!   must also carry a SPIFFE id that the shared [`RevocationList`] does not
//!   list, checked at every handshake.
//! * [`client_config`]: an agent or `ztctl` calling the collector, verified by
//!   DNS name or IP address as usual.
//! * [`spiffe_client_config`]: agent to agent (the tunnel), where the server is
//!   verified by its SPIFFE id instead of a DNS name.
//! * [`pinned_ca_client_config`]: enrollment, before the agent has the CA
//!   bundle: the server must present a chain to a CA whose key hash is pinned.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::cert::{self, CertificateInfo};
use crate::csr::spki_fingerprint;
use crate::error::{Error, Result};
use crate::pem::{certificates_from_pem, private_key_from_pem};
use crate::revocation::{RevocationList, SharedRevocationList};
use crate::spiffe::{SpiffeId, TrustDomain};

static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The crypto provider every config here uses: rustls' ring provider.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain (leaf first) and its private key.
#[derive(Debug)]
pub struct TlsIdentity {
    /// Leaf first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl TlsIdentity {
    /// Parses a PEM chain (leaf first) and a PEM private key.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self> {
        Ok(Self {
            chain: certificates_from_pem(chain_pem)?,
            key: private_key_from_pem(key_pem)?,
        })
    }
}

/// A root store holding exactly the CA bundle. Fails on an empty bundle or a
/// certificate webpki cannot use as a trust anchor.
pub fn root_store(ca_bundle: &[CertificateDer<'static>]) -> Result<RootCertStore> {
    if ca_bundle.is_empty() {
        return Err(Error::Certificate("the CA bundle is empty".into()));
    }
    let mut roots = RootCertStore::empty();
    for ca in ca_bundle {
        roots.add(ca.clone())?;
    }
    Ok(roots)
}

/// A server config presenting `cert_chain`/`key` and verifying client
/// certificates against `ca_bundle`. With `require_client_cert == false`,
/// clients without a certificate are let through (for an enrollment
/// endpoint); one that presents a certificate must still present a valid one.
pub fn server_config(
    ca_bundle: &[CertificateDer<'static>],
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    require_client_cert: bool,
) -> Result<ServerConfig> {
    let verifier = webpki_client_verifier(ca_bundle, require_client_cert)?;
    build_server_config(verifier, cert_chain, key)
}

/// [`server_config`], plus: a client certificate must carry a valid SPIFFE id,
/// and neither that id nor the certificate serial may be in `revocations`
/// (read at every handshake, so an update applies to the next connection;
/// cutting connections already open is up to the caller).
pub fn server_config_with_revocation(
    ca_bundle: &[CertificateDer<'static>],
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    require_client_cert: bool,
    revocations: SharedRevocationList,
) -> Result<ServerConfig> {
    let verifier = Arc::new(SpiffeClientVerifier {
        inner: webpki_client_verifier(ca_bundle, require_client_cert)?,
        revocations,
    });
    build_server_config(verifier, cert_chain, key)
}

/// [`server_config`] from PEM: CA bundle, server chain (leaf first), key.
pub fn server_config_from_pem(
    ca_bundle_pem: &[u8],
    chain_pem: &[u8],
    key_pem: &[u8],
    require_client_cert: bool,
) -> Result<ServerConfig> {
    let identity = TlsIdentity::from_pem(chain_pem, key_pem)?;
    server_config(
        &certificates_from_pem(ca_bundle_pem)?,
        identity.chain,
        identity.key,
        require_client_cert,
    )
}

/// A client config presenting `cert_chain`/`key` and verifying the server
/// against `ca_bundle` and the server name it is connected with.
pub fn client_config(
    ca_bundle: &[CertificateDer<'static>],
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ClientConfig> {
    Ok(ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_root_certificates(root_store(ca_bundle)?)
        .with_client_auth_cert(cert_chain, key)?)
}

/// [`client_config`] from PEM: CA bundle, client chain (leaf first), key.
pub fn client_config_from_pem(
    ca_bundle_pem: &[u8],
    chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<ClientConfig> {
    let identity = TlsIdentity::from_pem(chain_pem, key_pem)?;
    client_config(
        &certificates_from_pem(ca_bundle_pem)?,
        identity.chain,
        identity.key,
    )
}

/// A client config without a client certificate that verifies the server
/// against `ca_bundle` (renewal is *not* this: renew over mTLS with the
/// current certificate).
pub fn client_config_without_certificate(
    ca_bundle: &[CertificateDer<'static>],
) -> Result<ClientConfig> {
    Ok(ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_root_certificates(root_store(ca_bundle)?)
        .with_no_client_auth())
}

/// Which SPIFFE ids a client accepts from a server it verifies by identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMatcher {
    /// Exactly this identity.
    Exact(SpiffeId),
    /// Any identity of this organisation in this trust domain.
    Org {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// The organisation.
        org: String,
    },
    /// Any identity in this trust domain.
    TrustDomain(TrustDomain),
}

impl PeerMatcher {
    /// Whether `id` is acceptable.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            PeerMatcher::Exact(expected) => expected == id,
            PeerMatcher::Org { trust_domain, org } => {
                id.trust_domain() == trust_domain && id.org() == org
            }
            PeerMatcher::TrustDomain(td) => id.trust_domain() == td,
        }
    }
}

/// A client config for connecting to a peer that is identified by SPIFFE id
/// rather than DNS name (agent to agent). The server's chain is verified
/// against `ca_bundle` (validity, serverAuth EKU), its SPIFFE id must satisfy
/// `expected`, and, if given, must not be revoked. The `ServerName` passed to
/// `ClientConnection::new` is not checked against the certificate (use the
/// peer's address).
pub fn spiffe_client_config(
    ca_bundle: &[CertificateDer<'static>],
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    expected: PeerMatcher,
    revocations: Option<SharedRevocationList>,
) -> Result<ClientConfig> {
    let provider = crypto_provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: Arc::new(root_store(ca_bundle)?),
        provider: provider.clone(),
        expected,
        revocations,
    });
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert_chain, key)?)
}

/// The pin of a CA: `sha256:<hex>` of its SubjectPublicKeyInfo (as kubeadm's
/// discovery hash). Print it next to an enrollment token.
pub fn ca_pin(ca_cert_der: &[u8]) -> Result<String> {
    Ok(spki_fingerprint(&cert::subject_public_key_info(
        ca_cert_der,
    )?))
}

/// A client config for enrollment when the agent has no CA bundle yet, only a
/// CA pin (see [`ca_pin`]). The server must present its chain *including* the
/// CA certificate ([`crate::ca::ServerCertificate::chain_pem`]); a presented
/// certificate whose key matches the pin becomes the trust anchor, and the
/// leaf must chain to it and match the server name. No client certificate.
///
/// After enrolling, check the returned CA bundle with [`ca_pin`] too.
pub fn pinned_ca_client_config(pin: &str) -> Result<ClientConfig> {
    let digits = pin.strip_prefix("sha256:").unwrap_or_default();
    if digits.len() != 64 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Certificate(format!(
            "CA pin {pin:?} is not sha256:<64 hex digits>"
        )));
    }
    let provider = crypto_provider();
    let verifier = Arc::new(PinnedCaVerifier {
        pin: pin.to_ascii_lowercase(),
        provider: provider.clone(),
    });
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn webpki_client_verifier(
    ca_bundle: &[CertificateDer<'static>],
    require_client_cert: bool,
) -> Result<Arc<dyn ClientCertVerifier>> {
    let builder = WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(ca_bundle)?),
        crypto_provider(),
    );
    let builder = if require_client_cert {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    Ok(builder.build()?)
}

/// Servers never resume sessions: a resumed handshake skips the client
/// certificate verifier, so a device revoked or a certificate expired since
/// the first handshake would get back in on its ticket.
fn build_server_config(
    verifier: Arc<dyn ClientCertVerifier>,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)?;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

fn identity_failure() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// Checks a verified end-entity certificate's SPIFFE id and revocation status.
fn check_identity(
    end_entity: &CertificateDer<'_>,
    revocations: Option<&SharedRevocationList>,
) -> std::result::Result<SpiffeId, rustls::Error> {
    let info = CertificateInfo::parse(end_entity)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let id = cert::peer_identity(end_entity).map_err(|_| identity_failure())?;
    if let Some(list) = revocations {
        // A poisoned lock still holds a consistent set (updates are single
        // inserts or whole replacements), so keep enforcing it.
        let list = list.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        if RevocationList::is_revoked(&list, &id, &info.serial) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
    }
    Ok(id)
}

/// Webpki client verification, then SPIFFE id and revocation.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: SharedRevocationList,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, Some(&self.revocations))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server verification by chain + SPIFFE id instead of DNS name.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    expected: PeerMatcher,
    revocations: Option<SharedRevocationList>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id = check_identity(end_entity, self.revocations.as_ref())?;
        if !self.expected.matches(&id) {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server verification against a CA found in the presented chain by key pin.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let anchor = intermediates
            .iter()
            .find(|c| ca_pin(c).is_ok_and(|pin| pin == self.pin))
            .ok_or(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))?;
        let mut roots = RootCertStore::empty();
        roots.add(anchor.clone().into_owned())?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        verify_server_name(&parsed, server_name)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
