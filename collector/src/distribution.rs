//! Policy distribution: which signed bundle each agent should run, the
//! change signal the agents' control channels wait on, and what every agent
//! reported doing with its bundle (applied, or refused and why).

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
};

use policy::bundle::SignedBundle;
use zt_identity::SpiffeId;

use crate::policy_store::{Issued, PolicyStore, PolicyStoreError};

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

#[derive(Debug)]
pub struct PolicyDistribution {
    store: PolicyStore,
    /// Each organisation's current bundle, so a push read by a thousand
    /// control channels is read from disk and verified once.
    active: Mutex<BTreeMap<String, Arc<ActiveBundle>>>,
    /// By device SPIFFE id.
    agents: Mutex<BTreeMap<String, AgentPolicyState>>,
    /// Open control channels per device (SPIFFE id).
    watching: Arc<Mutex<BTreeMap<String, usize>>>,
    /// Bumped by every push and rollback.
    changes: tokio::sync::watch::Sender<u64>,
    /// Bumped by every report, for whoever follows a rollout.
    reports: tokio::sync::watch::Sender<u64>,
}

impl PolicyDistribution {
    pub fn open(dir: &Path) -> Result<Self, PolicyStoreError> {
        let (changes, _) = tokio::sync::watch::channel(0);
        let (reports, _) = tokio::sync::watch::channel(0);
        Ok(Self {
            store: PolicyStore::open(dir)?,
            active: Mutex::new(BTreeMap::new()),
            watching: Arc::new(Mutex::new(BTreeMap::new())),
            agents: Mutex::new(BTreeMap::new()),
            changes,
            reports,
        })
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

    /// The bundle `device` should run.
    pub fn bundle_for(&self, device: &SpiffeId) -> Result<Arc<ActiveBundle>, PolicyStoreError> {
        let org = device.org();
        let serial = self.store.active_serial(org);
        let mut cache = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bundle) = cache.get(org).filter(|b| b.serial == serial && serial > 0) {
            return Ok(bundle.clone());
        }
        let signed: SignedBundle = self.store.active(org, unix_now())?;
        let serial = signed
            .verify(&[self.store.public_key()])
            .map_err(PolicyStoreError::Key)?
            .serial;
        let bundle = Arc::new(ActiveBundle {
            serial,
            signed_json: signed.to_json(),
        });
        cache.insert(org.to_owned(), bundle.clone());
        Ok(bundle)
    }

    /// Pushes a layer: a baseline to every organisation in `orgs` (and
    /// those with bundles already), or an organisation's layer to it.
    pub fn push(&self, text: &str, orgs: &[String], by: &str) -> Result<Issued, PolicyStoreError> {
        let layer = policy::parse(text).map_err(policy::LoadError::Organisation)?;
        let issued = match (layer.kind, layer.org) {
            (policy::LayerKind::Baseline, _) => {
                self.store.push_baseline(text, orgs, by, unix_now())?
            }
            (policy::LayerKind::Organisation, Some(org)) => {
                self.store.push_organisation(&org, text, by, unix_now())?
            }
            (policy::LayerKind::Organisation, None) => {
                unreachable!("parse refuses an organisation layer without org")
            }
        };
        self.changed();
        Ok(issued)
    }

    pub fn rollback(&self, org: &str, serial: u64, by: &str) -> Result<Issued, PolicyStoreError> {
        let issued = self.store.rollback(org, serial, by, unix_now())?;
        self.changed();
        Ok(issued)
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
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
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
