//! Workload identity for the zt agent and collector (issue 5).
//!
//! * [`spiffe`]: `spiffe://<td>/org/<org>/device/<id>` and `.../user/<name>` ids.
//! * [`ca`]: the trust domain's CA (key on disk, mode 0600) that signs CSRs
//!   into short-lived X.509-SVIDs and issues the collector's server certificate.
//! * [`csr`]: verified certificate signing requests.
//! * [`device`]: the device key (made on the host, never leaves) and its CSR.
//! * [`cert`]: reading identity, serial and validity from certificates.
//! * [`tls`]: rustls server/client configs for mTLS (ring, TLS 1.3).
//! * [`renewal`]: when to renew, and what to keep when renewal fails.
//! * [`tokens`]: one-time enrollment tokens and their file-backed store.
//! * [`revocation`]: the versioned revocation list shipped to agents.
//! * [`files`]: atomic, permission-safe writes of keys and state.
//!
//! A typical enrollment, end to end:
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::{Duration, SystemTime};
//! use zt_identity::{ca::CertificateAuthority, csr::CertificateRequest, device::DeviceKey,
//!                   spiffe::{SpiffeId, TrustDomain}, tokens::TokenBook, cert::peer_identity};
//!
//! let now = SystemTime::now();
//! let td = TrustDomain::new("pref.example")?;
//! let ca = CertificateAuthority::generate(&td, Duration::from_secs(86400 * 365), now)?;
//! let mut tokens = TokenBook::new();
//!
//! // Admin: `ztctl enroll-token create --org city-a --device host-1`.
//! let token = tokens.create("city-a", "host-1", Duration::from_secs(3600), now)?;
//!
//! // Agent: make the key locally, send only the CSR and the token.
//! let key = DeviceKey::generate()?;
//! let csr_pem = key.csr_pem()?;
//!
//! // Collector: verify the CSR first, then spend the token, then sign.
//! let csr = CertificateRequest::from_pem(&csr_pem)?;
//! let grant = tokens.redeem(&token.to_string(), now)?;
//! let id = SpiffeId::device(&td, &grant.org, &grant.device)?;
//! let issued = ca.sign(&csr, &id, Duration::from_secs(86400), now)?;
//!
//! assert!(key.matches_certificate(&issued.der)?);
//! assert_eq!(peer_identity(&issued.der)?, id);
//! # Ok(()) }
//! ```

pub mod ca;
pub mod cert;
pub mod csr;
pub mod device;
pub mod error;
pub mod files;
pub mod lifetime;
pub mod pem;
pub mod renewal;
pub mod revocation;
pub mod spiffe;
pub mod tls;
pub mod tokens;

pub use ca::{CertificateAuthority, IssuedCertificate, ServerCertificate};
pub use cert::{not_after, not_before, peer_identity, peer_identity_from_chain, CertificateInfo};
pub use csr::CertificateRequest;
pub use device::DeviceKey;
pub use error::{Error, Result};
pub use files::{read_private_key, write_private_key};
pub use lifetime::parse_lifetime;
pub use renewal::{renewal_due, CertificateStatus, RenewalPolicy, RenewalState, Validity};
pub use revocation::{RevocationList, SharedRevocationList};
pub use spiffe::{SpiffeId, SpiffeIdError, Subject, TrustDomain};
pub use tls::{client_config, server_config, PeerMatcher, TlsIdentity};
pub use tokens::{EnrollmentToken, Redeemed, TokenError, TokenStore};

/// `N` bytes from the operating system's CSPRNG.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| Error::Random)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// The collector shares these across tasks behind an `Arc`.
    #[test]
    fn shared_types_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<crate::CertificateAuthority>();
        assert_send_sync::<crate::TokenStore>();
        assert_send_sync::<crate::SharedRevocationList>();
        assert_send_sync::<crate::DeviceKey>();
    }

    #[test]
    fn random_bytes_are_not_constant() {
        let a: [u8; 32] = crate::random_bytes().unwrap();
        let b: [u8; 32] = crate::random_bytes().unwrap();
        assert_ne!(a, b);
    }
}
