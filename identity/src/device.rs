//! The device side: a key made on the host (it never leaves), and the CSR
//! that asks the CA to certify it.

use std::fmt;
use std::path::Path;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::csr::ACCEPTED_KEY_ALGORITHMS;
use crate::error::{Error, Result};
use crate::files;

/// A device's private key (ECDSA P-256 when generated here).
///
/// `Debug` never prints the key.
pub struct DeviceKey {
    key: KeyPair,
}

impl DeviceKey {
    /// Generates a fresh ECDSA P-256 key from the system RNG.
    pub fn generate() -> Result<Self> {
        Ok(Self {
            key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// Parses a PKCS#8 PEM key (ECDSA P-256/P-384 or Ed25519).
    pub fn from_pem(pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(pem).map_err(|e| Error::Key(e.to_string()))?;
        if !ACCEPTED_KEY_ALGORITHMS.contains(&key.algorithm()) {
            return Err(Error::Key(
                "unsupported algorithm; use ECDSA P-256/P-384 or Ed25519".into(),
            ));
        }
        Ok(Self { key })
    }

    /// Reads a key file written by [`DeviceKey::save`], refusing it if group
    /// or others can access it.
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_pem(&files::read_private_key(path)?)
    }

    /// Writes the key to `path` atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<()> {
        files::write_private_key(path, self.to_pem().as_bytes())
    }

    /// The key as PKCS#8 PEM. Treat the result as a secret.
    pub fn to_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The key as PKCS#8 DER, for rustls.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// The public key as DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.key.subject_public_key_info()
    }

    /// A PEM CSR for this key with an empty subject and no extensions: the CA
    /// decides the identity, so the request asks for none.
    pub fn csr_pem(&self) -> Result<String> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        Ok(params.serialize_request(&self.key)?.pem()?)
    }

    /// Whether `cert_der` certifies this key; check it before storing a
    /// certificate returned by the CA.
    pub fn matches_certificate(&self, cert_der: &[u8]) -> Result<bool> {
        Ok(crate::cert::subject_public_key_info(cert_der)? == self.public_key_der())
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceKey")
            .field("algorithm", &self.key.algorithm())
            .field("private_key", &"[redacted]")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::CertificateRequest;

    #[test]
    fn key_round_trips_through_pem_and_file() {
        let key = DeviceKey::generate().unwrap();
        let again = DeviceKey::from_pem(&key.to_pem()).unwrap();
        assert_eq!(key.public_key_der(), again.public_key_der());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        key.save(&path).unwrap();
        let loaded = DeviceKey::load(&path).unwrap();
        assert_eq!(key.public_key_der(), loaded.public_key_der());
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }

    #[test]
    fn csr_verifies_and_carries_the_key() {
        let key = DeviceKey::generate().unwrap();
        let csr = CertificateRequest::from_pem(&key.csr_pem().unwrap()).unwrap();
        assert_eq!(csr.public_key_der(), key.public_key_der().as_slice());
        assert!(csr.public_key_fingerprint().starts_with("sha256:"));
    }

    #[test]
    fn tampered_csr_is_refused() {
        let key = DeviceKey::generate().unwrap();
        let pem = key.csr_pem().unwrap();
        let mut der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|d: rustls_pki_types::CertificateSigningRequestDer<'_>| d.as_ref().to_vec())
            .unwrap();
        assert!(CertificateRequest::from_der(&der).is_ok());
        // A flipped bit in the signature value: still parses, no longer verifies.
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let err = CertificateRequest::from_der(&der).unwrap_err();
        assert!(err.to_string().contains("self-signature"), "{err}");
    }

    #[test]
    fn non_key_pem_is_refused() {
        assert!(matches!(DeviceKey::from_pem("garbage"), Err(Error::Key(_))));
    }
}
