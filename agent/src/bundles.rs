//! Policy bundles on the agent: the key they must be signed with (it came
//! with enrollment, over the channel pinned to the CA), the newest serial
//! ever seen, and the last bundle that was accepted, kept so the agent
//! enforces it at start before it reaches the collector:
//!
//! ```text
//! <state_dir>/identity/policy-signing.pub   Ed25519 public key (hex)
//! <state_dir>/policy/bundle.json            the last accepted bundle (signed)
//! <state_dir>/policy/newest-serial          the highest serial accepted
//! ```
//!
//! A bundle is accepted when its signature verifies with that key, it is for
//! this device's organisation, its serial is above every serial accepted
//! before, its layers link and pass their tests, and they compile for this
//! device. Anything else is refused with the reason, which the control
//! channel reports to the collector.

use std::path::{Path, PathBuf};

use policy::{
    bundle::{Bundle, BundleError, SignedBundle},
    compile::{AgentTables, Target},
    PolicySet,
};
use zt_identity::files::write_file_atomic;

const KEY_FILE: &str = "policy-signing.pub";
const BUNDLE_FILE: &str = "bundle.json";
const SERIAL_FILE: &str = "newest-serial";

#[derive(Debug, thiserror::Error)]
pub enum BundleRefused {
    #[error(
        "no policy signing key: the agent was enrolled by a collector that did not send one ({0})"
    )]
    NoKey(PathBuf),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("the bundle's policy does not load: {0}")]
    Policy(#[from] policy::LoadError),
    #[error("the bundle's policy does not compile for this device: {0}")]
    Compile(#[from] policy::compile::CompileError),
    #[error("cannot keep the bundle: {0}")]
    Store(String),
}

/// An accepted bundle, ready to enforce.
#[derive(Debug, Clone)]
pub struct AcceptedBundle {
    pub bundle: Bundle,
    pub policy: PolicySet,
    pub tables: AgentTables,
}

/// A checked bundle handed to the enforcement, which answers whether it is
/// in force.
#[derive(Debug)]
pub struct BundleApply {
    pub bundle: std::sync::Arc<AcceptedBundle>,
    pub done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

#[derive(Debug, Clone)]
pub struct BundleKeeper {
    state_dir: PathBuf,
    /// This device's SPIFFE id.
    device: String,
    org: String,
}

/// Saves the signing key that came with enrollment or renewal.
pub fn save_signing_key(state_dir: &Path, key: &[u8]) -> Result<(), zt_identity::Error> {
    if key.is_empty() {
        return Ok(());
    }
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    write_file_atomic(
        &state_dir
            .join(crate::enrollment::IDENTITY_DIR)
            .join(KEY_FILE),
        format!("{hex}\n").as_bytes(),
        0o644,
    )
}

impl BundleKeeper {
    pub fn new(state_dir: &Path, device: &zt_identity::SpiffeId) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
            device: device.to_string(),
            org: device.org().to_owned(),
        }
    }

    fn policy_dir(&self) -> PathBuf {
        self.state_dir.join("policy")
    }

    fn key_path(&self) -> PathBuf {
        self.state_dir
            .join(crate::enrollment::IDENTITY_DIR)
            .join(KEY_FILE)
    }

    pub fn trusted_key(&self) -> Result<Vec<u8>, BundleRefused> {
        let path = self.key_path();
        let text =
            std::fs::read_to_string(&path).map_err(|_| BundleRefused::NoKey(path.clone()))?;
        let text = text.trim();
        let key: Option<Vec<u8>> = (text.len() == 64)
            .then(|| {
                (0..32)
                    .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
                    .collect()
            })
            .flatten();
        key.ok_or(BundleRefused::NoKey(path))
    }

    /// The highest serial accepted so far (0: none).
    pub fn newest_seen(&self) -> u64 {
        std::fs::read_to_string(self.policy_dir().join(SERIAL_FILE))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    fn check(
        &self,
        signed: &SignedBundle,
        newest_seen: u64,
    ) -> Result<AcceptedBundle, BundleRefused> {
        let key = self.trusted_key()?;
        let bundle = policy::bundle::accept(signed, &[key], &self.org, newest_seen)?;
        let policy = bundle.policy()?;
        let users = crate::users::UserNames::from_file("/etc/passwd");
        let uid_of = |name: &str| users.uid(name);
        let tables = policy.compile(&Target {
            device: &self.device,
            uid_of: &uid_of,
        })?;
        Ok(AcceptedBundle {
            bundle,
            policy,
            tables,
        })
    }

    /// Checks a bundle from the collector: signature, organisation, a
    /// newer serial, and that its policy links and compiles here.
    pub fn check_new(&self, signed_json: &str) -> Result<AcceptedBundle, BundleRefused> {
        let signed = SignedBundle::from_json(signed_json)?;
        self.check(&signed, self.newest_seen())
    }

    /// Checks a bundle and keeps it as the last good one.
    pub fn accept(&self, signed_json: &str) -> Result<AcceptedBundle, BundleRefused> {
        let accepted = self.check_new(signed_json)?;
        self.keep(signed_json, accepted.bundle.serial)?;
        Ok(accepted)
    }

    /// Keeps a checked (and enforced) bundle as the last good one; its
    /// serial becomes the newest seen.
    pub fn keep(&self, signed_json: &str, serial: u64) -> Result<(), BundleRefused> {
        let dir = self.policy_dir();
        let store = |e: std::io::Error| BundleRefused::Store(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(&dir).map_err(store)?;
        let write = |name: &str, bytes: &[u8]| {
            write_file_atomic(&dir.join(name), bytes, 0o600)
                .map_err(|e| BundleRefused::Store(e.to_string()))
        };
        write(BUNDLE_FILE, signed_json.as_bytes())?;
        write(SERIAL_FILE, format!("{serial}\n").as_bytes())?;
        Ok(())
    }

    /// The last accepted bundle, checked again (the key, the organisation,
    /// the policy), to enforce at start.
    pub fn last_good(&self) -> Result<Option<AcceptedBundle>, BundleRefused> {
        let path = self.policy_dir().join(BUNDLE_FILE);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        let signed = SignedBundle::from_json(&text)?;
        // Its own serial is the newest seen: check it against the one before.
        let seen = self.newest_seen();
        let accepted = self.check(&signed, 0)?;
        if accepted.bundle.serial != seen {
            return Err(BundleRefused::Store(format!(
                "{} holds serial {}, but serial {seen} was accepted last",
                path.display(),
                accepted.bundle.serial
            )));
        }
        Ok(Some(accepted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::bundle::SigningKey;

    const BASELINE: &str = include_str!("../../policy/examples/baseline.yaml");
    const CITY_A: &str = include_str!("../../policy/examples/city-a.yaml");

    fn device() -> zt_identity::SpiffeId {
        zt_identity::SpiffeId::parse("spiffe://pref.example/org/city-a/device/fin-07").unwrap()
    }

    fn signed(key: &SigningKey, serial: u64, org: &str, organisation: &str) -> String {
        key.sign(&Bundle {
            serial,
            org: org.into(),
            issued_unix: 1,
            issued_by: "test".into(),
            baseline: BASELINE.into(),
            organisation: Some(organisation.into()),
            restores: None,
            canary: None,
        })
        .to_json()
    }

    fn keeper(key: &SigningKey) -> (tempfile::TempDir, BundleKeeper) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(crate::enrollment::IDENTITY_DIR)).unwrap();
        save_signing_key(dir.path(), &key.public_key()).unwrap();
        let keeper = BundleKeeper::new(dir.path(), &device());
        (dir, keeper)
    }

    #[test]
    fn accepts_newer_bundles_keeps_the_last_good_and_refuses_replays() {
        let key = SigningKey::generate().unwrap();
        let (_dir, keeper) = keeper(&key);
        assert!(keeper.last_good().unwrap().is_none());
        let first = keeper.accept(&signed(&key, 3, "city-a", CITY_A)).unwrap();
        assert_eq!(first.bundle.serial, 3);
        assert!(!first.tables.entries.is_empty());
        assert_eq!(keeper.newest_seen(), 3);
        assert!(matches!(
            keeper.accept(&signed(&key, 3, "city-a", CITY_A)),
            Err(BundleRefused::Bundle(BundleError::Stale {
                serial: 3,
                seen: 3
            }))
        ));
        let last = keeper.last_good().unwrap().unwrap();
        assert_eq!(last.bundle.serial, 3);
    }

    #[test]
    fn refuses_other_keys_organisations_and_broken_policies_keeping_the_last_good() {
        let key = SigningKey::generate().unwrap();
        let (_dir, keeper) = keeper(&key);
        keeper.accept(&signed(&key, 3, "city-a", CITY_A)).unwrap();
        let other = SigningKey::generate().unwrap();
        assert!(matches!(
            keeper.accept(&signed(&other, 4, "city-a", CITY_A)),
            Err(BundleRefused::Bundle(BundleError::UnknownKey(_)))
        ));
        assert!(matches!(
            keeper.accept(&signed(&key, 4, "city-b", CITY_A)),
            Err(BundleRefused::Bundle(BundleError::WrongOrganisation { .. }))
        ));
        let broken = CITY_A.replace("action: allow", "action: alow");
        assert!(matches!(
            keeper.accept(&signed(&key, 4, "city-a", &broken)),
            Err(BundleRefused::Policy(_))
        ));
        assert_eq!(keeper.newest_seen(), 3);
        assert_eq!(keeper.last_good().unwrap().unwrap().bundle.serial, 3);
    }

    #[test]
    fn a_tampered_stored_bundle_is_not_enforced() {
        let key = SigningKey::generate().unwrap();
        let (dir, keeper) = keeper(&key);
        keeper.accept(&signed(&key, 3, "city-a", CITY_A)).unwrap();
        let path = dir.path().join("policy").join(BUNDLE_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut signed: SignedBundle = SignedBundle::from_json(&text).unwrap();
        // Change one character of the signature, whatever it is.
        let first = signed.signature.chars().next().unwrap();
        let other = if first == 'A' { "B" } else { "A" };
        signed.signature.replace_range(..1, other);
        std::fs::write(&path, signed.to_json()).unwrap();
        assert!(keeper.last_good().is_err());
    }
}
