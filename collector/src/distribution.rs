//! Policy distribution: which signed bundle each agent should run, the
//! change signal the agents' control channels wait on, and what every agent
//! reported doing with its bundle (applied, or refused and why).
//!
//! A push may be staged ([`crate::rollout`]): while its canary runs, the
//! canary devices get the new serial and every other device of a staged
//! organisation keeps the one it had; [`PolicyDistribution::check_rollouts`]
//! (every second) promotes the canary or rolls it back.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use policy::bundle::SignedBundle;
use tracing::{error, info, warn};
use zt_identity::SpiffeId;

use crate::{
    policy_store::{Issued, PolicyStore, PolicyStoreError},
    rollout::{
        HealthCounters, HealthSample, Outcome, Rollout, RolloutLayer, RolloutSettings,
        RolloutState, Rollouts,
    },
};

const ROLLOUTS_FILE: &str = "rollouts.json";
/// How often idle devices' health history is dropped.
const PRUNE_EVERY_MS: u64 = 60_000;
/// Who the collector's own policy acts are by.
pub const COLLECTOR_ACTOR: &str = "collector";

/// What one agent last reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentPolicyState {
    pub applied_serial: u64,
    pub refused_serial: u64,
    pub error: String,
    pub reported_unix: u64,
}

/// A bundle ready to send: its serial and its JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveBundle {
    pub serial: u64,
    pub signed_json: String,
}

/// An enrolled, unrevoked device a canary may include.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolledDevice {
    pub org: String,
    pub device_id: String,
    pub spiffe_id: String,
}

/// A push's canary: a device group, for how long (0: the default).
#[derive(Debug, Clone, Copy)]
pub struct CanaryRequest<'a> {
    pub group: &'a str,
    pub seconds: u64,
    /// Every enrolled, unrevoked device (the group picks among them).
    pub devices: &'a [EnrolledDevice],
}

/// What a push issued and how it goes out.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub issued: Issued,
    pub rollout: Rollout,
}

/// A canary that ended (or failed to), for the audit trail.
#[derive(Debug, Clone)]
pub struct RolloutEvent {
    pub rollout: Rollout,
    /// Why the rollback the canary called for failed (it is retried).
    pub error: Option<String>,
}

#[derive(Debug)]
pub struct PolicyDistribution {
    store: PolicyStore,
    /// Bundles by (organisation, serial), so a push read by a thousand
    /// control channels is read from disk and verified once.
    active: Mutex<BTreeMap<(String, u64), Arc<ActiveBundle>>>,
    /// By device SPIFFE id.
    agents: Mutex<BTreeMap<String, AgentPolicyState>>,
    /// Open control channels per device (SPIFFE id).
    watching: Arc<Mutex<BTreeMap<String, usize>>>,
    /// Bumped by every push and rollback.
    changes: tokio::sync::watch::Sender<u64>,
    /// Bumped by every report, for whoever follows a rollout.
    reports: tokio::sync::watch::Sender<u64>,
    /// Running canaries and each organisation's latest rollout. Every push
    /// and rollback holds this lock throughout, so they are serialised.
    rollouts: Mutex<Rollouts>,
    rollouts_path: PathBuf,
    settings: RwLock<RolloutSettings>,
    health: Mutex<HealthCounters>,
    last_prune_ms: Mutex<u64>,
}

impl PolicyDistribution {
    pub fn open(dir: &Path) -> Result<Self, PolicyStoreError> {
        let (changes, _) = tokio::sync::watch::channel(0);
        let (reports, _) = tokio::sync::watch::channel(0);
        let store = PolicyStore::open(dir)?;
        let rollouts_path = dir.join(ROLLOUTS_FILE);
        let rollouts = Rollouts::load(&rollouts_path)?;
        let settings = RolloutSettings::default();
        Ok(Self {
            store,
            active: Mutex::new(BTreeMap::new()),
            watching: Arc::new(Mutex::new(BTreeMap::new())),
            agents: Mutex::new(BTreeMap::new()),
            changes,
            reports,
            rollouts: Mutex::new(rollouts),
            rollouts_path,
            health: Mutex::new(HealthCounters::new(
                settings.bucket_secs(),
                unix_now_ms() as f64 / 1000.0,
            )),
            settings: RwLock::new(settings),
            last_prune_ms: Mutex::new(0),
        })
    }

    /// Sets the rollout settings (the collector's `[policy]` section);
    /// called at start, before any telemetry arrives.
    pub fn configure(&self, settings: RolloutSettings) {
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) =
            HealthCounters::new(settings.bucket_secs(), unix_now_ms() as f64 / 1000.0);
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = settings;
    }

    pub fn settings(&self) -> RolloutSettings {
        *self.settings.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn store(&self) -> &PolicyStore {
        &self.store
    }

    pub fn public_key(&self) -> Vec<u8> {
        self.store.public_key()
    }

    /// Changes to watch: a new value after each push or rollback.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Reports to watch: a new value after each agent report.
    pub fn watch_reports(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reports.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    fn lock_rollouts(&self) -> std::sync::MutexGuard<'_, Rollouts> {
        self.rollouts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save_rollouts(&self, rollouts: &Rollouts) {
        if let Err(err) = rollouts.save(&self.rollouts_path) {
            error!(error = %err, "ROLLOUTS NOT SAVED: a restart would forget the running canaries");
        }
    }

    /// The bundle `device` should run: its organisation's newest, or the
    /// one before while a canary it is not in runs.
    pub fn bundle_for(&self, device: &SpiffeId) -> Result<Arc<ActiveBundle>, PolicyStoreError> {
        let org = device.org();
        // While a canary runs, both its serial and the one before are in use.
        let (held_at, in_use_from) = {
            let rollouts = self.lock_rollouts();
            (
                rollouts.holds_back(org, device.device_id().unwrap_or_default()),
                rollouts
                    .running(org)
                    .and_then(|r| r.orgs.get(org))
                    .map(|stage| stage.previous_serial),
            )
        };
        let newest = self.store.active_serial(org);
        let serial = held_at.unwrap_or(newest);
        let key = (org.to_owned(), serial);
        if serial > 0 {
            let cache = self.active.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(bundle) = cache.get(&key) {
                return Ok(bundle.clone());
            }
        }
        let signed: SignedBundle =
            match held_at {
                Some(serial) => self.store.bundle(org, serial)?.ok_or_else(|| {
                    PolicyStoreError::NoSuchSerial {
                        serial,
                        org: org.to_owned(),
                    }
                })?,
                None => self.store.active(org, unix_now())?,
            };
        let serial = signed
            .verify(&[self.store.public_key()])
            .map_err(PolicyStoreError::Key)?
            .serial;
        let bundle = Arc::new(ActiveBundle {
            serial,
            signed_json: signed.to_json(),
        });
        let keep_from = in_use_from.unwrap_or(serial).min(serial);
        let mut cache = self.active.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|(o, s), _| o != org || *s >= keep_from);
        cache.insert((org.to_owned(), serial), bundle.clone());
        Ok(bundle)
    }

    /// Pushes a layer: a baseline to every organisation in `orgs` (and
    /// those with bundles already), or an organisation's layer to it;
    /// staged when `canary` names a device group.
    pub fn push(
        &self,
        text: &str,
        orgs: &[String],
        by: &str,
        canary: Option<CanaryRequest<'_>>,
    ) -> Result<Pushed, PolicyStoreError> {
        let layer = policy::parse(text).map_err(policy::LoadError::Organisation)?;
        let mut rollouts = self.lock_rollouts();
        let (kind, concerned) = match (layer.kind, &layer.org) {
            (policy::LayerKind::Baseline, _) => {
                if let Some(running) = rollouts.any_running() {
                    let org = running.orgs.keys().next().cloned().unwrap_or_default();
                    return Err(PolicyStoreError::RolloutInProgress {
                        org,
                        serial: running.serial,
                    });
                }
                (RolloutLayer::Baseline, self.store.baseline_orgs(orgs))
            }
            (policy::LayerKind::Organisation, Some(org)) => {
                if let Some(running) = rollouts.running(org) {
                    return Err(PolicyStoreError::RolloutInProgress {
                        org: org.clone(),
                        serial: running.serial,
                    });
                }
                (RolloutLayer::Organisation, vec![org.clone()])
            }
            (policy::LayerKind::Organisation, None) => {
                unreachable!("parse refuses an organisation layer without org")
            }
        };
        let previous: BTreeMap<String, u64> = concerned
            .iter()
            .map(|org| (org.clone(), self.store.active_serial(org)))
            .collect();
        let staged = match canary {
            Some(canary) => Some(self.plan_canary(text, &layer, &previous, canary)?),
            None => None,
        };
        let group = staged.as_ref().map(|(group, ..)| group.as_str());
        let issued = match (layer.kind, &layer.org) {
            (policy::LayerKind::Baseline, _) => {
                self.store
                    .push_baseline(text, orgs, by, group, unix_now())?
            }
            (_, Some(org)) => self
                .store
                .push_organisation(org, text, by, group, unix_now())?,
            (_, None) => unreachable!("parse refuses an organisation layer without org"),
        };
        let now_ms = unix_now_ms();
        // Organisations the store issued to that were not foreseen (a first
        // bundle issued meanwhile) had nothing before this push to keep.
        let mut previous = previous;
        for signed in &issued.bundles {
            if let Ok(bundle) = signed.verify(&[self.store.public_key()]) {
                previous.entry(bundle.org).or_insert(0);
            }
        }
        let mut rollout = Rollout::complete(issued.serial, kind, by, now_ms, &previous);
        if let Some((group, seconds, canaries)) = staged {
            rollout.state = RolloutState::Canary;
            rollout.canary_group = group;
            rollout.canary_seconds = seconds;
            rollout.finished_unix_ms = 0;
            for (org, stage) in &mut rollout.orgs {
                stage.staged = stage.previous_serial > 0;
                if stage.staged {
                    stage.canary_devices = canaries.get(org).cloned().unwrap_or_default();
                }
            }
            info!(
                serial = rollout.serial,
                group = %rollout.canary_group,
                devices = rollout.canary_device_count(),
                seconds,
                "canary started"
            );
        }
        rollouts.add(rollout.clone());
        self.save_rollouts(&rollouts);
        drop(rollouts);
        self.changed();
        Ok(Pushed { issued, rollout })
    }

    /// Checks a canary request against the layers the push would put in
    /// force: the group, its devices, the length. Returns the group, the
    /// length and the canary devices by organisation.
    #[allow(clippy::type_complexity)]
    fn plan_canary(
        &self,
        text: &str,
        layer: &policy::Policy,
        previous: &BTreeMap<String, u64>,
        canary: CanaryRequest<'_>,
    ) -> Result<(String, u64, BTreeMap<String, BTreeSet<String>>), PolicyStoreError> {
        let settings = self.settings();
        let seconds = match canary.seconds {
            0 => settings.canary_seconds,
            s => s,
        };
        if seconds > settings.max_canary_seconds {
            return Err(PolicyStoreError::Canary(format!(
                "a canary runs at most {} s (the collector's [policy] max_canary_seconds); {seconds} s asked",
                settings.max_canary_seconds
            )));
        }
        // The layers as the push would link them; a layer that does not
        // load is refused by the store with its diagnostics.
        let linked = match &layer.org {
            None => policy::load(text, None),
            Some(org) => policy::load(&self.store.layers(org).0, Some(text)),
        };
        let set = match linked {
            Ok(set) => set,
            Err(e) => return Err(PolicyStoreError::Invalid(e)),
        };
        let where_defined = match layer.kind {
            policy::LayerKind::Baseline => "the baseline",
            policy::LayerKind::Organisation => "the pushed layer or the baseline",
        };
        let patterns = match set.group(canary.group).map(|(_, g)| &g.group) {
            Some(policy::Group::Devices(patterns)) => patterns.clone(),
            Some(other) => {
                return Err(PolicyStoreError::Canary(format!(
                    "group {:?} is a {} group; a canary is a device group",
                    canary.group,
                    match other {
                        policy::Group::Users(_) => "users",
                        policy::Group::Binaries(_) => "binaries",
                        policy::Group::Devices(_) => "devices",
                    }
                )))
            }
            None => {
                return Err(PolicyStoreError::Canary(format!(
                    "no device group {:?} in {where_defined}",
                    canary.group
                )))
            }
        };
        let mut devices: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for device in canary.devices {
            let staged = previous.get(&device.org).is_some_and(|&s| s > 0);
            if staged && patterns.iter().any(|p| p.matches(&device.spiffe_id)) {
                devices
                    .entry(device.org.clone())
                    .or_default()
                    .insert(device.device_id.clone());
            }
        }
        if devices.is_empty() {
            let orgs: Vec<&str> = previous
                .iter()
                .filter(|(_, &s)| s > 0)
                .map(|(o, _)| o.as_str())
                .collect();
            return Err(PolicyStoreError::Canary(if orgs.is_empty() {
                "no organisation concerned has a policy in force yet to keep the other devices on; push without a canary first".to_owned()
            } else {
                format!(
                    "group {:?} matches no enrolled device of {}",
                    canary.group,
                    orgs.join(", ")
                )
            }));
        }
        Ok((canary.group.to_owned(), seconds, devices))
    }

    /// Restores `serial`'s content for `org` as a new serial, to everyone.
    /// Ends a running canary of `org`'s own layer (marked rolled back by
    /// `by`); a running baseline canary ends only on its own.
    pub fn rollback(&self, org: &str, serial: u64, by: &str) -> Result<Issued, PolicyStoreError> {
        let mut rollouts = self.lock_rollouts();
        if let Some(running) = rollouts.running(org) {
            if running.layer == RolloutLayer::Baseline {
                return Err(PolicyStoreError::RolloutInProgress {
                    org: org.to_owned(),
                    serial: running.serial,
                });
            }
        }
        // What the organisation ran before, for the rollback's record.
        let before = rollouts
            .latest(org)
            .map(|r| match r.state {
                RolloutState::RolledBack => r.rollback_serial,
                _ => r.serial,
            })
            .unwrap_or(0);
        let issued = self.store.rollback(org, serial, by, unix_now())?;
        let now_ms = unix_now_ms();
        let reason = format!(
            "rolled back by {by}: serial {} restores {serial}",
            issued.serial
        );
        if let Some(running) = rollouts.running_mut(org) {
            running.rolled_back(issued.serial, reason, now_ms);
        } else {
            let previous: BTreeMap<String, u64> = [(org.to_owned(), before)].into();
            let mut record = Rollout::complete(
                issued.serial,
                RolloutLayer::Organisation,
                by,
                now_ms,
                &previous,
            );
            record.restores = serial;
            rollouts.add(record);
        }
        self.save_rollouts(&rollouts);
        drop(rollouts);
        self.changed();
        Ok(issued)
    }

    /// `org`'s latest rollout.
    pub fn rollout(&self, org: &str) -> Option<Rollout> {
        self.lock_rollouts().latest(org).cloned()
    }

    /// Counts a device's denied decisions and connection errors (from a
    /// stored batch) for the canaries' health.
    pub fn record_health(&self, org: &str, device: &str, samples: &[HealthSample]) {
        self.record_health_at(org, device, samples, unix_now());
    }

    fn record_health_at(&self, org: &str, device: &str, samples: &[HealthSample], now: u64) {
        if samples.is_empty() {
            return;
        }
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(org, device, samples, now);
    }

    /// Judges every running canary at `now_unix_ms`: rolls back those
    /// past a bound (a new serial restoring the previous content, to
    /// everyone), promotes those whose time is over. Blocking (signs and
    /// writes bundles).
    pub fn check_rollouts(&self, now_unix_ms: u64) -> Vec<RolloutEvent> {
        let bounds = self.settings().bounds;
        let mut events = Vec::new();
        let mut rollouts = self.lock_rollouts();
        {
            let mut last = self.last_prune_ms.lock().unwrap_or_else(|p| p.into_inner());
            if now_unix_ms.saturating_sub(*last) >= PRUNE_EVERY_MS {
                *last = now_unix_ms;
                self.health
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .prune(now_unix_ms / 1000);
            }
        }
        let mut dirty = false;
        let mut changed = false;
        for rollout in rollouts.iter_mut().filter(|r| r.is_running()) {
            let outcome = {
                let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
                rollout.tick(now_unix_ms, &health, &bounds)
            };
            match outcome {
                None => {}
                Some(Outcome::Promote) => {
                    rollout.promote(now_unix_ms);
                    info!(serial = rollout.serial, group = %rollout.canary_group, "canary promoted: the serial goes to everyone");
                    events.push(RolloutEvent {
                        rollout: rollout.clone(),
                        error: None,
                    });
                    dirty = true;
                    changed = true;
                }
                Some(Outcome::RollBack { reason }) => match self.roll_back(rollout) {
                    Ok(issued) => {
                        warn!(serial = rollout.serial, rollback = issued.serial, %reason, "canary failed: rolled back");
                        rollout.rolled_back(issued.serial, reason, now_unix_ms);
                        events.push(RolloutEvent {
                            rollout: rollout.clone(),
                            error: None,
                        });
                        dirty = true;
                        changed = true;
                    }
                    Err(err) => {
                        let err = format!("{reason}; the rollback failed: {err}");
                        error!(serial = rollout.serial, error = %err, "CANARY NOT ROLLED BACK (retrying; the other devices stay on their serial)");
                        if rollout.rollback_error != err {
                            rollout.rollback_error.clone_from(&err);
                            events.push(RolloutEvent {
                                rollout: rollout.clone(),
                                error: Some(err),
                            });
                            dirty = true;
                        }
                    }
                },
            }
        }
        if dirty {
            self.save_rollouts(&rollouts);
        }
        drop(rollouts);
        if changed {
            self.changed();
        }
        events
    }

    /// Issues the rollback of a failed canary: the previous content of
    /// every staged organisation.
    fn roll_back(&self, rollout: &Rollout) -> Result<Issued, PolicyStoreError> {
        let now = unix_now();
        match rollout.layer {
            RolloutLayer::Baseline => {
                let previous: BTreeMap<String, u64> = rollout
                    .orgs
                    .iter()
                    .map(|(org, stage)| (org.clone(), stage.previous_serial))
                    .collect();
                self.store
                    .rollback_baseline(&previous, COLLECTOR_ACTOR, now)
            }
            RolloutLayer::Organisation => {
                let (org, stage) = rollout.orgs.iter().next().ok_or_else(|| {
                    PolicyStoreError::Canary("a rollout without an organisation".to_owned())
                })?;
                self.store
                    .rollback(org, stage.previous_serial, COLLECTOR_ACTOR, now)
            }
        }
    }

    /// Registers an open control channel of `device` until the guard is
    /// dropped.
    pub fn watching(&self, device: &SpiffeId) -> WatchingGuard {
        let key = device.to_string();
        *self
            .watching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default() += 1;
        WatchingGuard {
            watching: self.watching.clone(),
            key,
        }
    }

    /// Whether `device` (SPIFFE id) has a control channel open.
    pub fn is_watching(&self, device: &str) -> bool {
        self.watching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(device)
    }

    /// Records what `device` did with a bundle.
    pub fn report(&self, device: &SpiffeId, serial: u64, applied: bool, error: &str) {
        {
            let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
            let state = agents.entry(device.to_string()).or_default();
            if applied {
                state.applied_serial = serial;
                state.error.clear();
            } else {
                state.refused_serial = serial;
                error.clone_into(&mut state.error);
            }
            state.reported_unix = unix_now();
        }
        self.reports.send_modify(|v| *v += 1);
    }

    /// What each agent of `org` reported, by device id.
    pub fn reports(&self, org: &str) -> BTreeMap<String, AgentPolicyState> {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(id, state)| {
                let id = SpiffeId::parse(id).ok()?;
                (id.org() == org)
                    .then(|| (id.device_id().unwrap_or_default().to_owned(), state.clone()))
            })
            .collect()
    }
}

fn unix_now() -> u64 {
    unix_now_ms() / 1000
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// An open control channel; see [`PolicyDistribution::watching`].
pub struct WatchingGuard {
    watching: Arc<Mutex<BTreeMap<String, usize>>>,
    key: String,
}

impl Drop for WatchingGuard {
    fn drop(&mut self) {
        let mut map = self.watching.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Bounds;

    const TD: &str = "spiffe://pref.example/org";
    const ADMIN: &str = "spiffe://pref.example/org/city-a/user/tanaka";

    fn layer(rule: &str) -> String {
        format!(
            "version: 1\nkind: organisation\norg: city-a\ngroups:\n  devices:\n    canaries:\n      - {TD}/city-a/device/canary-*\n  users:\n    staff: [tanaka]\nrules:\n  - id: {rule}\n    action: deny\n    to: {{addresses: [192.0.2.0/24]}}\n"
        )
    }

    fn devices() -> Vec<EnrolledDevice> {
        ["canary-1", "canary-2", "pc-1", "pc-2"]
            .iter()
            .map(|d| EnrolledDevice {
                org: "city-a".into(),
                device_id: (*d).into(),
                spiffe_id: format!("{TD}/city-a/device/{d}"),
            })
            .collect()
    }

    fn id(device: &str) -> SpiffeId {
        SpiffeId::parse(&format!("{TD}/city-a/device/{device}")).unwrap()
    }

    fn open() -> (tempfile::TempDir, PolicyDistribution) {
        let dir = tempfile::tempdir().unwrap();
        let distribution = PolicyDistribution::open(dir.path()).unwrap();
        distribution.configure(RolloutSettings {
            canary_seconds: 60,
            max_canary_seconds: 120,
            bounds: Bounds {
                max_deny_rate_increase: 1.0,
                max_error_rate_increase: 1.0,
                min_increase_events: 10,
            },
        });
        (dir, distribution)
    }

    #[test]
    fn a_canary_gets_the_new_serial_first_and_a_breach_rolls_it_back_for_everyone() {
        let (dir, distribution) = open();
        let orgs = ["city-a".to_owned()];
        let first = distribution
            .push(&layer("one"), &orgs, ADMIN, None)
            .unwrap();
        assert_eq!(first.rollout.state, RolloutState::Complete);
        let devices = devices();
        let canary = |group| CanaryRequest {
            group,
            seconds: 0,
            devices: &devices,
        };
        // Only device groups that exist and hold a device.
        for (group, expected) in [
            ("nope", "no device group \"nope\""),
            ("staff", "is a users group"),
        ] {
            let err = distribution
                .push(&layer("two"), &orgs, ADMIN, Some(canary(group)))
                .unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }
        let too_long = CanaryRequest {
            seconds: 121,
            ..canary("canaries")
        };
        assert!(distribution
            .push(&layer("two"), &orgs, ADMIN, Some(too_long))
            .is_err());
        let staged = distribution
            .push(&layer("two"), &orgs, ADMIN, Some(canary("canaries")))
            .unwrap();
        let serial = staged.issued.serial;
        assert_eq!(staged.rollout.canary_seconds, 60);
        assert_eq!(staged.rollout.canary_device_count(), 2);
        assert_eq!(
            distribution.bundle_for(&id("canary-1")).unwrap().serial,
            serial
        );
        assert_eq!(
            distribution.bundle_for(&id("pc-1")).unwrap().serial,
            first.issued.serial
        );
        // Nothing else for city-a while its canary runs.
        assert!(matches!(
            distribution.push(&layer("three"), &orgs, ADMIN, None),
            Err(PolicyStoreError::RolloutInProgress { .. })
        ));
        // A restart keeps holding the others back.
        drop(distribution);
        let distribution = PolicyDistribution::open(dir.path()).unwrap();
        distribution.configure(open().1.settings());
        assert_eq!(
            distribution.bundle_for(&id("pc-2")).unwrap().serial,
            first.issued.serial
        );
        assert!(distribution.check_rollouts(unix_now_ms()).is_empty());
        // Two seconds on, a canary device's denials jump.
        let later = unix_now() + 2;
        distribution.record_health_at(
            "city-a",
            "canary-2",
            &[HealthSample {
                time_unix: later,
                denies: 50,
                errors: 0,
            }],
            later,
        );
        let events = distribution.check_rollouts(later * 1000 + 500);
        let [event] = events.as_slice() else {
            panic!("{events:?}")
        };
        assert_eq!(event.rollout.state, RolloutState::RolledBack);
        assert!(event.rollout.reason.contains("deny rate"), "{event:?}");
        let rollback = event.rollout.rollback_serial;
        assert!(rollback > serial);
        for device in ["canary-1", "pc-1"] {
            let bundle = distribution.bundle_for(&id(device)).unwrap();
            assert_eq!(bundle.serial, rollback);
            let bundle = SignedBundle::from_json(&bundle.signed_json)
                .unwrap()
                .verify(&[distribution.public_key()])
                .unwrap();
            assert_eq!(bundle.restores, Some(first.issued.serial));
            assert!(bundle.organisation.unwrap().contains("id: one"));
        }
        let status = distribution.rollout("city-a").unwrap();
        assert_eq!(status.state, RolloutState::RolledBack);
        // Over: pushes go again.
        distribution
            .push(&layer("three"), &orgs, ADMIN, None)
            .unwrap();
    }

    #[test]
    fn a_manual_rollback_ends_a_running_canary() {
        let (_dir, distribution) = open();
        let orgs = ["city-a".to_owned()];
        let first = distribution
            .push(&layer("one"), &orgs, ADMIN, None)
            .unwrap();
        let devices = devices();
        let canary = CanaryRequest {
            group: "canaries",
            seconds: 5,
            devices: &devices,
        };
        distribution
            .push(&layer("two"), &orgs, ADMIN, Some(canary))
            .unwrap();
        let issued = distribution
            .rollback("city-a", first.issued.serial, ADMIN)
            .unwrap();
        let rollout = distribution.rollout("city-a").unwrap();
        assert_eq!(rollout.state, RolloutState::RolledBack);
        assert_eq!(rollout.rollback_serial, issued.serial);
        assert!(rollout.reason.starts_with("rolled back by"), "{rollout:?}");
        assert_eq!(
            distribution.bundle_for(&id("pc-1")).unwrap().serial,
            issued.serial
        );
        // Later, the canary's end changes nothing.
        assert!(distribution
            .check_rollouts(unix_now_ms() + 10_000)
            .is_empty());
    }

    #[test]
    fn a_quiet_canary_is_promoted_when_its_time_is_over() {
        let (_dir, distribution) = open();
        let orgs = ["city-a".to_owned()];
        distribution
            .push(&layer("one"), &orgs, ADMIN, None)
            .unwrap();
        let devices = devices();
        let canary = CanaryRequest {
            group: "canaries",
            seconds: 5,
            devices: &devices,
        };
        let staged = distribution
            .push(&layer("two"), &orgs, ADMIN, Some(canary))
            .unwrap();
        let mut changes = distribution.watch();
        changes.mark_unchanged();
        // A few denials are no jump.
        distribution.record_health(
            "city-a",
            "canary-1",
            &[HealthSample {
                time_unix: unix_now(),
                denies: 3,
                errors: 2,
            }],
        );
        assert!(distribution.check_rollouts(unix_now_ms()).is_empty());
        let events = distribution.check_rollouts(unix_now_ms() + 6_000);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].rollout.state, RolloutState::Promoted);
        assert!(changes.has_changed().unwrap());
        assert_eq!(
            distribution.bundle_for(&id("pc-1")).unwrap().serial,
            staged.issued.serial
        );
    }
}
