//! Signed policy bundles.
//!
//! A push becomes a [`Bundle`]: the baseline and one organisation's layer as
//! their YAML text, under a serial that only grows across the whole fleet.
//! It travels as a [`SignedBundle`]: the exact JSON bytes that were signed
//! (Ed25519) and the signature, so verification never depends on how JSON is
//! re-encoded.
//!
//! An agent applies a bundle only if the signature verifies with a trusted
//! key, the bundle is for its organisation, and its serial is above every
//! serial the agent has seen. Going back is itself a signed act: a
//! rollback is a new bundle, with a new serial, that restores an earlier
//! one's content and names it (`restores`). Replaying an old bundle — or an
//! old rollback — is therefore refused.

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use ring::{
    rand::SystemRandom,
    signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519},
};

pub const BUNDLE_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("the bundle is not readable: {0}")]
    Malformed(String),
    #[error("the bundle format {0} is not supported (this version reads {BUNDLE_FORMAT})")]
    Format(u32),
    #[error("the bundle is signed by key {0}, which this agent does not trust")]
    UnknownKey(String),
    #[error("the bundle's signature does not verify: it was altered or signed by another key")]
    BadSignature,
    #[error("the bundle is for organisation {bundle:?}, this agent belongs to {agent:?}")]
    WrongOrganisation { bundle: String, agent: String },
    #[error("serial {serial} is not newer than {seen}, the newest this agent has seen; an older policy returns only as a signed rollback with a new serial")]
    Stale { serial: u64, seen: u64 },
    #[error("the signing key is not valid: {0}")]
    Key(String),
}

/// What is signed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bundle {
    pub serial: u64,
    /// The organisation whose agents apply it.
    pub org: String,
    pub issued_unix: u64,
    /// Who pushed it (the admin's SPIFFE id).
    pub issued_by: String,
    /// YAML of the prefecture baseline.
    pub baseline: String,
    /// YAML of the organisation's layer, if it has one.
    pub organisation: Option<String>,
    /// For a rollback: the serial whose content this bundle restores.
    pub restores: Option<u64>,
    /// For a staged rollout: the device group that gets it first (informational).
    #[serde(default)]
    pub canary: Option<String>,
}

impl Bundle {
    /// Parses and links the layers it carries.
    pub fn policy(&self) -> Result<crate::PolicySet, crate::LoadError> {
        crate::load(&self.baseline, self.organisation.as_deref())
    }
}

/// A bundle as it travels and is stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignedBundle {
    pub format: u32,
    /// [`key_id`] of the signing key.
    pub key_id: String,
    /// Base64 of the signed JSON bytes of the [`Bundle`].
    pub payload: String,
    /// Base64 Ed25519 signature over those bytes.
    pub signature: String,
}

/// A short, stable name for a public key: the first 16 hex digits of its
/// SHA-256.
pub fn key_id(public_key: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, public_key);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The policy signing key (Ed25519), kept by whoever signs pushes.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl SigningKey {
    pub fn generate() -> Result<Self, BundleError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| BundleError::Key("cannot generate".into()))?;
        Self::from_pkcs8(pkcs8.as_ref())
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, BundleError> {
        let pair =
            Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| BundleError::Key(e.to_string()))?;
        Ok(Self {
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// The PKCS#8 document, to store (mode 0600).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    pub fn sign(&self, bundle: &Bundle) -> SignedBundle {
        let payload = serde_json::to_vec(bundle).expect("a bundle serialises");
        let signature = self.pair.sign(&payload);
        SignedBundle {
            format: BUNDLE_FORMAT,
            key_id: key_id(self.pair.public_key().as_ref()),
            payload: B64.encode(&payload),
            signature: B64.encode(signature.as_ref()),
        }
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", key_id(&self.public_key()))
    }
}

impl SignedBundle {
    /// The bundle, if signed by one of `trusted` (raw Ed25519 public keys).
    pub fn verify(&self, trusted: &[Vec<u8>]) -> Result<Bundle, BundleError> {
        if self.format != BUNDLE_FORMAT {
            return Err(BundleError::Format(self.format));
        }
        let key = trusted
            .iter()
            .find(|k| key_id(k) == self.key_id)
            .ok_or_else(|| BundleError::UnknownKey(self.key_id.clone()))?;
        let payload = B64
            .decode(&self.payload)
            .map_err(|e| BundleError::Malformed(format!("payload: {e}")))?;
        let signature = B64
            .decode(&self.signature)
            .map_err(|e| BundleError::Malformed(format!("signature: {e}")))?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&payload, &signature)
            .map_err(|_| BundleError::BadSignature)?;
        serde_json::from_slice(&payload).map_err(|e| BundleError::Malformed(e.to_string()))
    }

    /// SHA-256 (hex) of the signed bytes: names this exact bundle.
    pub fn digest(&self) -> String {
        let payload = B64.decode(&self.payload).unwrap_or_default();
        ring::digest::digest(&ring::digest::SHA256, &payload)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a signed bundle serialises")
    }

    pub fn from_json(text: &str) -> Result<Self, BundleError> {
        serde_json::from_str(text).map_err(|e| BundleError::Malformed(e.to_string()))
    }
}

/// What an agent checks before applying a bundle: a trusted signature, its
/// organisation, and a serial newer than any it has seen.
pub fn accept(
    signed: &SignedBundle,
    trusted: &[Vec<u8>],
    org: &str,
    newest_seen: u64,
) -> Result<Bundle, BundleError> {
    let bundle = signed.verify(trusted)?;
    if bundle.org != org {
        return Err(BundleError::WrongOrganisation {
            bundle: bundle.org,
            agent: org.to_owned(),
        });
    }
    if bundle.serial <= newest_seen {
        return Err(BundleError::Stale {
            serial: bundle.serial,
            seen: newest_seen,
        });
    }
    Ok(bundle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(serial: u64, restores: Option<u64>) -> Bundle {
        Bundle {
            serial,
            org: "city-a".into(),
            issued_unix: 1_800_000_000,
            issued_by: "spiffe://pref.example/org/pref/user/sato".into(),
            baseline: include_str!("../examples/baseline.yaml").into(),
            organisation: Some(include_str!("../examples/city-a.yaml").into()),
            restores,
            canary: None,
        }
    }

    #[test]
    fn a_signed_bundle_verifies_and_links() {
        let key = SigningKey::generate().unwrap();
        let signed = key.sign(&bundle(7, None));
        let back = SignedBundle::from_json(&signed.to_json()).unwrap();
        let got = accept(&back, &[key.public_key()], "city-a", 6).unwrap();
        assert_eq!(got, bundle(7, None));
        assert_eq!(got.policy().unwrap().org(), Some("city-a"));
    }

    #[test]
    fn a_tampered_bundle_is_refused() {
        let key = SigningKey::generate().unwrap();
        let mut signed = key.sign(&bundle(7, None));
        let mut payload = B64.decode(&signed.payload).unwrap();
        let text = String::from_utf8(payload.clone()).unwrap();
        // Loosen one rule: deny becomes allow.
        let at = text.find("action: deny").unwrap();
        payload[at + 8..at + 12].copy_from_slice(b"allo");
        signed.payload = B64.encode(&payload);
        assert_eq!(
            accept(&signed, &[key.public_key()], "city-a", 0),
            Err(BundleError::BadSignature)
        );
    }

    #[test]
    fn another_key_is_not_trusted() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let signed = other.sign(&bundle(7, None));
        assert!(matches!(
            accept(&signed, &[key.public_key()], "city-a", 0),
            Err(BundleError::UnknownKey(_))
        ));
        // A forged key id with the wrong key's signature still fails.
        let mut forged = signed.clone();
        forged.key_id = key_id(&key.public_key());
        assert_eq!(
            accept(&forged, &[key.public_key()], "city-a", 0),
            Err(BundleError::BadSignature)
        );
    }

    #[test]
    fn old_serials_are_refused_and_rollbacks_come_as_new_serials() {
        let key = SigningKey::generate().unwrap();
        let trusted = [key.public_key()];
        let old = key.sign(&bundle(5, None));
        assert_eq!(
            accept(&old, &trusted, "city-a", 9),
            Err(BundleError::Stale { serial: 5, seen: 9 })
        );
        let rollback = key.sign(&bundle(10, Some(5)));
        assert_eq!(
            accept(&rollback, &trusted, "city-a", 9).unwrap().restores,
            Some(5)
        );
        // Replaying the rollback later is refused like any old bundle.
        assert!(matches!(
            accept(&rollback, &trusted, "city-a", 12),
            Err(BundleError::Stale { .. })
        ));
    }

    #[test]
    fn another_organisations_bundle_is_refused() {
        let key = SigningKey::generate().unwrap();
        let signed = key.sign(&bundle(7, None));
        assert!(matches!(
            accept(&signed, &[key.public_key()], "city-b", 0),
            Err(BundleError::WrongOrganisation { .. })
        ));
    }

    #[test]
    fn a_key_survives_its_pkcs8_document() {
        let key = SigningKey::generate().unwrap();
        let again = SigningKey::from_pkcs8(key.pkcs8()).unwrap();
        assert_eq!(key.public_key(), again.public_key());
        assert!(SigningKey::from_pkcs8(b"not a key").is_err());
    }
}
