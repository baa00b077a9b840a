//! Certificate signing requests, as the CA receives them.
//!
//! The CA takes exactly one thing from a CSR: the public key, after checking
//! the request's self-signature (proof that the requester holds the private
//! key). Subject, SANs and requested extensions are ignored; the identity in
//! the certificate is decided by the CA from the redeemed enrollment token or
//! the existing certificate being renewed.

use rcgen::{PublicKeyData, SignatureAlgorithm, SubjectPublicKeyInfo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use sha2::{Digest, Sha256};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::error::{Error, Result};

/// Largest CSR accepted, in DER bytes; a P-256 CSR is about 250 bytes.
pub const MAX_CSR_DER_LEN: usize = 16 * 1024;

/// Key algorithms the CA certifies.
pub(crate) const ACCEPTED_KEY_ALGORITHMS: [&SignatureAlgorithm; 3] = [
    &rcgen::PKCS_ECDSA_P256_SHA256,
    &rcgen::PKCS_ECDSA_P384_SHA384,
    &rcgen::PKCS_ED25519,
];

/// A CSR whose self-signature has been verified and whose key is of an
/// accepted algorithm (ECDSA P-256 or P-384, or Ed25519).
#[derive(Clone, Debug)]
pub struct CertificateRequest {
    public_key: SubjectPublicKeyInfo,
    spki_der: Vec<u8>,
}

impl CertificateRequest {
    /// Parses and verifies a PEM `CERTIFICATE REQUEST`.
    pub fn from_pem(pem: &str) -> Result<Self> {
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| Error::Csr(format!("PEM: {e}")))?;
        Self::from_der(der.as_ref())
    }

    /// Parses and verifies a DER CSR.
    pub fn from_der(der: &[u8]) -> Result<Self> {
        if der.len() > MAX_CSR_DER_LEN {
            return Err(Error::Csr(format!(
                "{} bytes is larger than the {MAX_CSR_DER_LEN}-byte limit",
                der.len()
            )));
        }
        let (rest, csr) = X509CertificationRequest::from_der(der)
            .map_err(|e| Error::Csr(format!("cannot parse: {e}")))?;
        if !rest.is_empty() {
            return Err(Error::Csr("trailing bytes after the request".into()));
        }
        csr.verify_signature()
            .map_err(|e| Error::Csr(format!("the self-signature does not verify: {e}")))?;
        let spki_der = csr.certification_request_info.subject_pki.raw.to_vec();
        let public_key = SubjectPublicKeyInfo::from_der(&spki_der)
            .map_err(|e| Error::Csr(format!("unsupported public key: {e}")))?;
        if !ACCEPTED_KEY_ALGORITHMS.contains(&public_key.algorithm()) {
            return Err(Error::Csr(
                "unsupported public key algorithm; use ECDSA P-256/P-384 or Ed25519".into(),
            ));
        }
        Ok(Self {
            public_key,
            spki_der,
        })
    }

    /// The requester's public key as DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// `sha256:<hex>` of the SubjectPublicKeyInfo, for logs and audit records.
    pub fn public_key_fingerprint(&self) -> String {
        spki_fingerprint(&self.spki_der)
    }

    pub(crate) fn public_key(&self) -> &SubjectPublicKeyInfo {
        &self.public_key
    }
}

/// `sha256:<hex>` of a DER SubjectPublicKeyInfo.
pub fn spki_fingerprint(spki_der: &[u8]) -> String {
    let digest = Sha256::digest(spki_der);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}
