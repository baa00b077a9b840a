//! The control plane's policy side: the signing key, the current layers,
//! and every bundle ever issued, kept in the state directory:
//!
//! ```text
//! <state_dir>/policy/signing.key          Ed25519 key (PKCS#8), mode 0600
//! <state_dir>/policy/state.json           serial counter, current layers
//! <state_dir>/policy/bundles/<serial>-<org>.json   signed bundles
//! ```
//!
//! A push is checked before anything is signed: the layer must parse, link
//! with the layers it meets, and pass its own `tests:`. A baseline push
//! re-issues every organisation's bundle under one new serial; an
//! organisation's push issues that organisation's bundle. A rollback issues
//! a new serial whose content is an earlier bundle's, marked `restores`; a
//! baseline's rollback (a failed baseline canary) restores the earlier
//! baseline for every organisation under one new serial.
//!
//! Which devices get which serial while a canary runs is the
//! distribution's business ([`crate::distribution`]); the store only marks
//! a staged push's bundles with the canary group.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use policy::bundle::{Bundle, SignedBundle, SigningKey};
use serde::{Deserialize, Serialize};
use zt_identity::files::write_file_atomic;

const KEY_FILE: &str = "signing.key";
const STATE_FILE: &str = "state.json";
const BUNDLES_DIR: &str = "bundles";
/// The baseline in force before any push: allow by default, no rules.
pub const EMPTY_BASELINE: &str = "version: 1\nkind: baseline\n";

#[derive(Debug, thiserror::Error)]
pub enum PolicyStoreError {
    #[error("{what} {path}: {source}")]
    State {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("policy signing key: {0}")]
    Key(#[from] policy::bundle::BundleError),
    #[error("cannot write {0}")]
    Write(#[from] zt_identity::Error),
    /// The pushed text does not validate; the diagnostics say where.
    #[error("{0}")]
    Invalid(#[from] policy::LoadError),
    #[error("the layer is for organisation {layer:?}, pushed to {target:?}")]
    WrongOrganisation { layer: String, target: String },
    #[error("a {0} layer cannot be pushed here")]
    WrongKind(policy::LayerKind),
    #[error("no bundle with serial {serial} exists for {org:?}")]
    NoSuchSerial { serial: u64, org: String },
    /// The canary asked for cannot be: no such device group, too long,
    /// no device in it.
    #[error("{0}")]
    Canary(String),
    #[error("the canary of serial {serial} is running for {org}; wait until it is promoted or rolled back")]
    RolloutInProgress { org: String, serial: u64 },
    #[error("rollouts: {0}")]
    Rollouts(#[from] crate::rollout::RolloutsFileError),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    /// The last serial issued.
    serial: u64,
    baseline: String,
    /// Each organisation's layer text (absent: baseline only).
    organisations: BTreeMap<String, String>,
    /// The serial of each organisation's current bundle.
    active: BTreeMap<String, u64>,
}

pub struct PolicyStore {
    dir: PathBuf,
    key: SigningKey,
    state: Mutex<State>,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStore")
            .field("dir", &self.dir)
            .field("key", &self.key)
            .finish()
    }
}

/// What a push or rollback issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub serial: u64,
    pub bundles: Vec<SignedBundle>,
}

impl PolicyStore {
    /// Opens the store in `dir`, making the signing key on first use.
    pub fn open(dir: &Path) -> Result<Self, PolicyStoreError> {
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| PolicyStoreError::State { what, path, source }
        };
        std::fs::create_dir_all(dir.join(BUNDLES_DIR)).map_err(io("cannot create", dir))?;
        let key_path = dir.join(KEY_FILE);
        let key = match std::fs::read(&key_path) {
            Ok(pkcs8) => SigningKey::from_pkcs8(&pkcs8)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SigningKey::generate()?;
                write_file_atomic(&key_path, key.pkcs8(), 0o600)?;
                key
            }
            Err(e) => return Err(io("cannot read", &key_path)(e)),
        };
        let state_path = dir.join(STATE_FILE);
        let state = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| PolicyStoreError::Corrupt {
                path: state_path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                baseline: EMPTY_BASELINE.to_owned(),
                ..State::default()
            },
            Err(e) => return Err(io("cannot read", &state_path)(e)),
        };
        Ok(Self {
            dir: dir.to_owned(),
            key,
            state: Mutex::new(state),
        })
    }

    /// The key agents trust for bundles.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bundle_path(&self, serial: u64, org: &str) -> PathBuf {
        self.dir
            .join(BUNDLES_DIR)
            .join(format!("{serial:012}-{org}.json"))
    }

    fn save(
        &self,
        state: &State,
        bundles: &[SignedBundle],
        orgs: &[String],
    ) -> Result<(), PolicyStoreError> {
        for (signed, org) in bundles.iter().zip(orgs) {
            let serial = state.active[org];
            write_file_atomic(
                &self.bundle_path(serial, org),
                signed.to_json().as_bytes(),
                0o644,
            )?;
        }
        let json = serde_json::to_vec_pretty(state).expect("state serialises");
        write_file_atomic(&self.dir.join(STATE_FILE), &json, 0o600)?;
        Ok(())
    }

    /// Signs the current layers for `orgs` under a new serial; `restores`
    /// says, per organisation, which serial a rollback restores.
    fn issue(
        &self,
        state: &mut State,
        orgs: Vec<String>,
        by: &str,
        restores: &dyn Fn(&str) -> Option<u64>,
        canary: Option<&str>,
        now_unix: u64,
    ) -> Result<Issued, PolicyStoreError> {
        state.serial += 1;
        let serial = state.serial;
        let bundles: Vec<SignedBundle> = orgs
            .iter()
            .map(|org| {
                state.active.insert(org.clone(), serial);
                self.key.sign(&Bundle {
                    serial,
                    org: org.clone(),
                    issued_unix: now_unix,
                    issued_by: by.to_owned(),
                    baseline: state.baseline.clone(),
                    organisation: state.organisations.get(org).cloned(),
                    restores: restores(org),
                    canary: canary.map(str::to_owned),
                })
            })
            .collect();
        self.save(state, &bundles, &orgs)?;
        Ok(Issued { serial, bundles })
    }

    /// The organisations a baseline push issues bundles to: `orgs` (those
    /// with devices), those with a layer and those with a bundle.
    pub fn baseline_orgs(&self, orgs: &[String]) -> Vec<String> {
        let state = self.lock();
        Self::all_orgs(&state, orgs)
    }

    fn all_orgs(state: &State, orgs: &[String]) -> Vec<String> {
        let mut all: Vec<String> = orgs.to_vec();
        all.extend(state.organisations.keys().cloned());
        all.extend(state.active.keys().cloned());
        all.sort();
        all.dedup();
        all
    }

    /// Pushes a new baseline; `orgs` are the organisations with devices,
    /// each of which gets a bundle. Every organisation's layer must still
    /// link with it. `canary` marks a staged push's bundles.
    pub fn push_baseline(
        &self,
        text: &str,
        orgs: &[String],
        by: &str,
        canary: Option<&str>,
        now_unix: u64,
    ) -> Result<Issued, PolicyStoreError> {
        let layer = policy::parse(text).map_err(policy::LoadError::Baseline)?;
        if layer.kind != policy::LayerKind::Baseline {
            return Err(PolicyStoreError::WrongKind(layer.kind));
        }
        let mut state = self.lock();
        policy::load(text, None)?;
        for org_text in state.organisations.values() {
            policy::load(text, Some(org_text))?;
        }
        let all = Self::all_orgs(&state, orgs);
        state.baseline = text.to_owned();
        self.issue(&mut state, all, by, &|_| None, canary, now_unix)
    }

    /// Pushes an organisation's layer.
    pub fn push_organisation(
        &self,
        org: &str,
        text: &str,
        by: &str,
        canary: Option<&str>,
        now_unix: u64,
    ) -> Result<Issued, PolicyStoreError> {
        let layer = policy::parse(text).map_err(policy::LoadError::Organisation)?;
        if layer.kind != policy::LayerKind::Organisation {
            return Err(PolicyStoreError::WrongKind(layer.kind));
        }
        if layer.org.as_deref() != Some(org) {
            return Err(PolicyStoreError::WrongOrganisation {
                layer: layer.org.unwrap_or_default(),
                target: org.to_owned(),
            });
        }
        let mut state = self.lock();
        policy::load(&state.baseline, Some(text))?;
        state.organisations.insert(org.to_owned(), text.to_owned());
        self.issue(
            &mut state,
            vec![org.to_owned()],
            by,
            &|_| None,
            canary,
            now_unix,
        )
    }

    /// Issues, under a new serial, the content `org`'s bundle had at
    /// `serial`.
    pub fn rollback(
        &self,
        org: &str,
        serial: u64,
        by: &str,
        now_unix: u64,
    ) -> Result<Issued, PolicyStoreError> {
        let old = self
            .bundle(org, serial)?
            .ok_or_else(|| PolicyStoreError::NoSuchSerial {
                serial,
                org: org.to_owned(),
            })?;
        let bundle = old
            .verify(&[self.public_key()])
            .map_err(PolicyStoreError::Key)?;
        let mut state = self.lock();
        // The organisation's own layer goes back; the baseline in force
        // stays, since it binds every organisation. The restored layer must
        // still link with it.
        policy::load(&state.baseline, bundle.organisation.as_deref())?;
        match bundle.organisation {
            Some(text) => state.organisations.insert(org.to_owned(), text),
            None => state.organisations.remove(org),
        };
        self.issue(
            &mut state,
            vec![org.to_owned()],
            by,
            &|_| Some(serial),
            None,
            now_unix,
        )
    }

    /// Restores the baseline of the bundles in `previous` (organisation →
    /// serial; each carries the baseline then in force) for every
    /// organisation, under one new serial; each organisation's bundle
    /// `restores` its serial in `previous`. Organisations' own layers stay.
    pub fn rollback_baseline(
        &self,
        previous: &BTreeMap<String, u64>,
        by: &str,
        now_unix: u64,
    ) -> Result<Issued, PolicyStoreError> {
        let mut baseline = None;
        for (org, &serial) in previous.iter().filter(|(_, &s)| s > 0) {
            let old = self
                .bundle(org, serial)?
                .ok_or_else(|| PolicyStoreError::NoSuchSerial {
                    serial,
                    org: org.clone(),
                })?
                .verify(&[self.public_key()])
                .map_err(PolicyStoreError::Key)?;
            match &baseline {
                None => baseline = Some(old.baseline),
                Some(text) if *text == old.baseline => {}
                Some(_) => return Err(PolicyStoreError::Corrupt {
                    path: self.bundle_path(serial, org),
                    reason:
                        "its baseline differs from the other organisations' at the serials restored"
                            .to_owned(),
                }),
            }
        }
        let baseline = baseline
            .ok_or_else(|| PolicyStoreError::Canary("no earlier baseline to restore".to_owned()))?;
        let mut state = self.lock();
        policy::load(&baseline, None)?;
        for org_text in state.organisations.values() {
            policy::load(&baseline, Some(org_text))?;
        }
        let all = Self::all_orgs(&state, &previous.keys().cloned().collect::<Vec<_>>());
        state.baseline = baseline;
        self.issue(
            &mut state,
            all,
            by,
            &|org| previous.get(org).copied().filter(|&s| s > 0),
            None,
            now_unix,
        )
    }

    /// A stored bundle.
    pub fn bundle(&self, org: &str, serial: u64) -> Result<Option<SignedBundle>, PolicyStoreError> {
        let path = self.bundle_path(serial, org);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                SignedBundle::from_json(&text)
                    .map(Some)
                    .map_err(|e| PolicyStoreError::Corrupt {
                        path,
                        reason: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(PolicyStoreError::State {
                what: "cannot read",
                path,
                source,
            }),
        }
    }

    /// What the store issued to `org` as `serial` (checked against the
    /// store's own key), if it did.
    pub fn issued(&self, org: &str, serial: u64) -> Result<Option<Bundle>, PolicyStoreError> {
        let Some(signed) = self.bundle(org, serial)? else {
            return Ok(None);
        };
        signed
            .verify(&[self.public_key()])
            .map(Some)
            .map_err(|e| PolicyStoreError::Corrupt {
                path: self.bundle_path(serial, org),
                reason: e.to_string(),
            })
    }

    /// The serials issued to `org`, newest first, at most `limit`.
    pub fn history(&self, org: &str, limit: usize) -> Result<Vec<Bundle>, PolicyStoreError> {
        let dir = self.dir.join(BUNDLES_DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(PolicyStoreError::State {
                    what: "cannot read",
                    path: dir,
                    source,
                })
            }
        };
        let suffix = format!("-{org}.json");
        let mut serials: Vec<u64> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|name| name.strip_suffix(&suffix)?.parse().ok())
            .collect();
        serials.sort_unstable_by(|a, b| b.cmp(a));
        serials.truncate(limit);
        let mut bundles = Vec::with_capacity(serials.len());
        for serial in serials {
            if let Some(bundle) = self.issued(org, serial)? {
                bundles.push(bundle);
            }
        }
        Ok(bundles)
    }

    /// The bundle `org`'s agents should run, issuing the first one (the
    /// baseline alone) when the organisation has none yet.
    pub fn active(&self, org: &str, now_unix: u64) -> Result<SignedBundle, PolicyStoreError> {
        // One lock throughout: two agents of a new organisation asking at
        // once get the same first bundle.
        let mut state = self.lock();
        if let Some(&serial) = state.active.get(org) {
            if let Some(bundle) = self.bundle(org, serial)? {
                return Ok(bundle);
            }
        }
        let issued = self.issue(
            &mut state,
            vec![org.to_owned()],
            "collector",
            &|_| None,
            None,
            now_unix,
        )?;
        Ok(issued.bundles.into_iter().next().expect("one bundle"))
    }

    /// Whether any policy was ever pushed. Until then agents get no bundle
    /// and keep whatever policy they were given locally.
    pub fn anything_pushed(&self) -> bool {
        self.lock().serial > 0
    }

    /// The serial of `org`'s current bundle (0: none issued).
    pub fn active_serial(&self, org: &str) -> u64 {
        self.lock().active.get(org).copied().unwrap_or(0)
    }

    /// The current texts: the baseline and `org`'s layer.
    pub fn layers(&self, org: &str) -> (String, Option<String>) {
        let state = self.lock();
        (
            state.baseline.clone(),
            state.organisations.get(org).cloned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASELINE: &str = include_str!("../../policy/examples/baseline.yaml");
    const CITY_A: &str = include_str!("../../policy/examples/city-a.yaml");
    const ADMIN: &str = "spiffe://pref.example/org/pref/user/sato";

    #[test]
    fn pushes_sign_bundles_with_growing_serials_that_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::open(dir.path()).unwrap();
        let key = store.public_key();
        let issued = store
            .push_baseline(
                BASELINE,
                &["city-a".into(), "city-b".into()],
                ADMIN,
                None,
                100,
            )
            .unwrap();
        assert_eq!(issued.serial, 1);
        assert_eq!(issued.bundles.len(), 2);
        let issued = store
            .push_organisation("city-a", CITY_A, ADMIN, None, 101)
            .unwrap();
        assert_eq!(issued.serial, 2);
        let bundle =
            policy::bundle::accept(&issued.bundles[0], std::slice::from_ref(&key), "city-a", 1)
                .unwrap();
        assert_eq!(bundle.policy().unwrap().org(), Some("city-a"));
        assert_eq!(store.active_serial("city-b"), 1);
        drop(store);
        let store = PolicyStore::open(dir.path()).unwrap();
        assert_eq!(store.public_key(), key, "the signing key is kept");
        assert_eq!(store.active_serial("city-a"), 2);
        assert_eq!(store.active("city-a", 102).unwrap(), issued.bundles[0]);
        // An organisation without a bundle gets its first, the baseline
        // alone, once.
        let first = store.active("city-c", 103).unwrap();
        let bundle =
            policy::bundle::accept(&first, std::slice::from_ref(&key), "city-c", 0).unwrap();
        assert_eq!((bundle.serial, bundle.organisation), (3, None));
        assert_eq!(store.active("city-c", 104).unwrap(), first);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn history_lists_an_organisations_serials_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::open(dir.path()).unwrap();
        store
            .push_baseline(
                BASELINE,
                &["city-a".into(), "city-b".into()],
                ADMIN,
                None,
                100,
            )
            .unwrap();
        store
            .push_organisation("city-a", CITY_A, ADMIN, None, 101)
            .unwrap();
        let history = store.history("city-a", 10).unwrap();
        let serials: Vec<u64> = history.iter().map(|b| b.serial).collect();
        assert_eq!(serials, [2, 1]);
        assert_eq!(history[0].organisation.as_deref(), Some(CITY_A));
        assert_eq!(history[1].organisation, None);
        assert_eq!(store.history("city-b", 10).unwrap().len(), 1);
        assert_eq!(store.history("city-a", 1).unwrap().len(), 1);
        assert!(store.history("city-z", 10).unwrap().is_empty());
        assert_eq!(store.issued("city-a", 1).unwrap().unwrap().serial, 1);
        assert!(store.issued("city-b", 2).unwrap().is_none());
        // A tampered bundle file is refused, not shown.
        let path = dir
            .path()
            .join(BUNDLES_DIR)
            .join("000000000001-city-b.json");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let signature = json["signature"].as_str().unwrap().to_owned();
        let flipped = if signature.starts_with('A') { "B" } else { "A" };
        json["signature"] = format!("{flipped}{}", &signature[1..]).into();
        std::fs::write(&path, json.to_string()).unwrap();
        assert!(store.history("city-b", 10).is_err());
    }

    #[test]
    fn an_invalid_push_signs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::open(dir.path()).unwrap();
        store
            .push_baseline(BASELINE, &["city-a".into()], ADMIN, None, 100)
            .unwrap();
        let broken = CITY_A.replace("action: allow", "action: alow");
        assert!(matches!(
            store.push_organisation("city-a", &broken, ADMIN, None, 101),
            Err(PolicyStoreError::Invalid(policy::LoadError::Organisation(
                _
            )))
        ));
        assert!(matches!(
            store.push_organisation("city-b", CITY_A, ADMIN, None, 101),
            Err(PolicyStoreError::WrongOrganisation { .. })
        ));
        // A baseline that would break city-a's layer is refused too.
        store
            .push_organisation("city-a", CITY_A, ADMIN, None, 102)
            .unwrap();
        let without_shells = BASELINE.replace("    remote-shells:", "    remote-shell-tools:");
        assert!(store
            .push_baseline(&without_shells, &["city-a".into()], ADMIN, None, 103)
            .is_err());
        assert_eq!(store.active_serial("city-a"), 2);
    }

    #[test]
    fn a_rollback_restores_old_content_under_a_new_serial() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::open(dir.path()).unwrap();
        store
            .push_baseline(BASELINE, &["city-a".into()], ADMIN, None, 100)
            .unwrap();
        store
            .push_organisation("city-a", CITY_A, ADMIN, None, 101)
            .unwrap();
        let looser = CITY_A.replace(
            "defaults:\n  outbound: allow\n",
            "defaults:\n  outbound: deny\n",
        );
        store
            .push_organisation("city-a", &looser, ADMIN, None, 102)
            .unwrap();
        let issued = store.rollback("city-a", 2, ADMIN, 103).unwrap();
        assert_eq!(issued.serial, 4);
        let bundle =
            policy::bundle::accept(&issued.bundles[0], &[store.public_key()], "city-a", 3).unwrap();
        assert_eq!(bundle.restores, Some(2));
        assert_eq!(bundle.organisation.as_deref(), Some(CITY_A));
        assert!(matches!(
            store.rollback("city-a", 99, ADMIN, 104),
            Err(PolicyStoreError::NoSuchSerial { .. })
        ));
    }

    #[test]
    fn a_baseline_rollback_restores_the_earlier_baseline_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::open(dir.path()).unwrap();
        let orgs = ["city-a".to_owned(), "city-b".to_owned()];
        store
            .push_baseline(BASELINE, &orgs, ADMIN, None, 100)
            .unwrap();
        store
            .push_organisation("city-a", CITY_A, ADMIN, None, 101)
            .unwrap();
        let stricter = BASELINE.replace(
            "    action: deny\n    to: {addresses: [169.254.169.254/32",
            "    action: deny\n    to: {addresses: [169.254.0.0/16",
        );
        assert_ne!(stricter, BASELINE);
        let staged = store
            .push_baseline(&stricter, &orgs, ADMIN, Some("canaries"), 102)
            .unwrap();
        assert_eq!(staged.serial, 3);
        let key = store.public_key();
        let first = staged.bundles[0]
            .verify(std::slice::from_ref(&key))
            .unwrap();
        assert_eq!(first.canary.as_deref(), Some("canaries"));
        let previous: BTreeMap<String, u64> =
            [("city-a".to_owned(), 2), ("city-b".to_owned(), 1)].into();
        let issued = store
            .rollback_baseline(&previous, "collector", 103)
            .unwrap();
        assert_eq!(issued.serial, 4);
        for signed in &issued.bundles {
            let bundle = signed.verify(std::slice::from_ref(&key)).unwrap();
            assert_eq!(bundle.baseline, BASELINE);
            assert_eq!(bundle.restores, previous.get(&bundle.org).copied());
            assert_eq!(bundle.canary, None);
            let expected_org = (bundle.org == "city-a").then_some(CITY_A);
            assert_eq!(bundle.organisation.as_deref(), expected_org);
        }
        assert_eq!(store.layers("city-b").0, BASELINE);
        assert!(matches!(
            store.rollback_baseline(&BTreeMap::new(), "collector", 104),
            Err(PolicyStoreError::Canary(_))
        ));
    }
}
