//! Staged (canary) policy rollouts, sans-IO apart from the rollouts file.
//!
//! A push with a canary group issues its serial as any push does, but the
//! distribution serves it only to the canary devices (the organisation's
//! enrolled devices the group matches when the push is made); every other
//! device of a staged organisation keeps the serial it had. The collector
//! then watches the canary's health:
//!
//! * [`health_samples`] picks, from every stored batch, the canary-relevant
//!   outcomes: **denied decisions** (`decisions.verdict = 'denied'`) and
//!   **connection errors** (`network_events.action = 'connect_failed'`, and
//!   decisions denied because a gateway or service was unreachable);
//! * [`HealthCounters`] counts them per device in time buckets (bounded:
//!   128 buckets of at most 16-bit counts per device that had any, devices
//!   idle beyond the history dropped, at most [`MAX_TRACKED_DEVICES`]);
//! * [`Rollout::tick`] compares, every second, the canary devices' rates
//!   during the canary with an equally long window before the push
//!   ([`judge`]); a breach rolls the push back, a canary that lasted its
//!   time without one is promoted (served to everyone).
//!
//! [`Rollouts`] keeps each organisation's latest rollout and every running
//! one, in `<state_dir>/policy/rollouts.json`, so a restarted collector
//! keeps holding the other devices back and finishes the canary.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::Path,
};

use serde::{Deserialize, Serialize};

use crate::storage::{DecisionRow, NetworkEventRow, TCP_CONNECT_FAILED, VERDICT_DENIED};

/// Buckets kept per device: the history covers twice the longest canary.
pub const BUCKETS: usize = 128;
/// Devices with health history at most; beyond, new devices go uncounted
/// until idle ones age out (about 64 MiB at 1 KiB per device plus keys).
pub const MAX_TRACKED_DEVICES: usize = 65_536;
/// Decision reasons that say the network, not the policy, failed.
const UNREACHABLE_REASONS: [&str; 2] = ["gateway_unreachable", "service_unreachable"];

/// What the collector's `[policy]` section says about rollouts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RolloutSettings {
    /// The canary's length when a push does not give one.
    pub canary_seconds: u64,
    /// The longest canary a push may ask for.
    pub max_canary_seconds: u64,
    pub bounds: Bounds,
}

impl Default for RolloutSettings {
    fn default() -> Self {
        crate::config::PolicyConfig::default().rollout_settings()
    }
}

impl RolloutSettings {
    /// Width of a health bucket: 128 buckets cover twice the longest canary.
    pub fn bucket_secs(&self) -> u64 {
        (2 * self.max_canary_seconds)
            .div_ceil(BUCKETS as u64 - 2)
            .max(1)
    }
}

/// How much worse a canary's health may get.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// The deny rate may exceed the rate before by this ratio of it.
    pub max_deny_rate_increase: f64,
    pub max_error_rate_increase: f64,
    /// A breach needs at least this many events above what the rate
    /// before predicts.
    pub min_increase_events: u64,
}

/// One second's canary-relevant outcomes of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthSample {
    /// Event time, seconds since the Unix epoch.
    pub time_unix: u64,
    pub denies: u32,
    pub errors: u32,
}

/// The denied decisions and connection errors among a batch's rows, per
/// second (one device's batch), oldest first.
pub fn health_samples(
    decisions: &[DecisionRow],
    network_events: &[NetworkEventRow],
) -> Vec<HealthSample> {
    let mut by_second: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
    for row in decisions.iter().filter(|d| d.verdict == VERDICT_DENIED) {
        let counts = by_second.entry(u64::from(row.time)).or_default();
        if UNREACHABLE_REASONS.contains(&row.reason.as_str()) {
            counts.1 = counts.1.saturating_add(1);
        } else {
            counts.0 = counts.0.saturating_add(1);
        }
    }
    for row in network_events
        .iter()
        .filter(|n| n.action == TCP_CONNECT_FAILED)
    {
        let counts = by_second.entry(u64::from(row.time)).or_default();
        counts.1 = counts.1.saturating_add(1);
    }
    by_second
        .into_iter()
        .map(|(time_unix, (denies, errors))| HealthSample {
            time_unix,
            denies,
            errors,
        })
        .collect()
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// `time / bucket_secs` of what it counts.
    index: u64,
    denies: u16,
    errors: u16,
}

#[derive(Debug)]
struct DeviceHistory {
    buckets: Box<[Bucket]>,
    newest: u64,
}

/// Denied decisions and connection errors per device, in time buckets.
#[derive(Debug)]
pub struct HealthCounters {
    bucket_secs: u64,
    /// Counting began (collector start): nothing is known before.
    since_unix: f64,
    devices: HashMap<(String, String), DeviceHistory>,
    /// Samples dropped because too many devices were tracked.
    pub untracked: u64,
}

/// Denied decisions and connection errors over a window, and its length.
/// Buckets cut by the window's edges count in proportion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    pub denies: f64,
    pub errors: f64,
    pub secs: f64,
}

impl Observed {
    fn per_minute(count: f64, secs: f64) -> f64 {
        if secs > 0.0 {
            count * 60.0 / secs
        } else {
            0.0
        }
    }

    pub fn deny_rate(&self) -> f64 {
        Self::per_minute(self.denies, self.secs)
    }

    pub fn error_rate(&self) -> f64 {
        Self::per_minute(self.errors, self.secs)
    }
}

impl HealthCounters {
    /// Counts from the start of the second `since_unix` falls in.
    pub fn new(bucket_secs: u64, since_unix: f64) -> Self {
        Self {
            bucket_secs: bucket_secs.max(1),
            since_unix: since_unix.floor(),
            devices: HashMap::new(),
            untracked: 0,
        }
    }

    /// How far back counts are kept.
    pub fn history_secs(&self) -> u64 {
        self.bucket_secs * (BUCKETS as u64 - 1)
    }

    /// The start of the bucket `t` falls in.
    pub fn bucket_start(&self, t: f64) -> f64 {
        let width = self.bucket_secs as f64;
        (t / width).floor() * width
    }

    pub fn tracked_devices(&self) -> usize {
        self.devices.len()
    }

    /// Counts one device's samples. Times after `now` (a fast clock) count
    /// as now; times older than the history are dropped.
    pub fn record(&mut self, org: &str, device: &str, samples: &[HealthSample], now_unix: u64) {
        let oldest = now_unix.saturating_sub(self.history_secs());
        let samples: Vec<&HealthSample> = samples
            .iter()
            .filter(|s| s.time_unix >= oldest && (s.denies > 0 || s.errors > 0))
            .collect();
        if samples.is_empty() {
            return;
        }
        let key = (org.to_owned(), device.to_owned());
        if !self.devices.contains_key(&key) && self.devices.len() >= MAX_TRACKED_DEVICES {
            self.prune(now_unix);
            if self.devices.len() >= MAX_TRACKED_DEVICES {
                self.untracked += samples.len() as u64;
                return;
            }
        }
        let width = self.bucket_secs;
        let history = self.devices.entry(key).or_insert_with(|| DeviceHistory {
            buckets: vec![Bucket::default(); BUCKETS].into_boxed_slice(),
            newest: 0,
        });
        for sample in samples {
            let index = sample.time_unix.min(now_unix) / width;
            let bucket = &mut history.buckets[(index % BUCKETS as u64) as usize];
            if bucket.index > index {
                continue; // older than the history this slot holds now
            }
            if bucket.index < index {
                *bucket = Bucket {
                    index,
                    ..Bucket::default()
                };
            }
            bucket.denies = bucket
                .denies
                .saturating_add(u16::try_from(sample.denies).unwrap_or(u16::MAX));
            bucket.errors = bucket
                .errors
                .saturating_add(u16::try_from(sample.errors).unwrap_or(u16::MAX));
            history.newest = history.newest.max(index);
        }
    }

    /// Drops the devices with nothing in the history any more.
    pub fn prune(&mut self, now_unix: u64) {
        let oldest = now_unix.saturating_sub(self.history_secs()) / self.bucket_secs;
        self.devices.retain(|_, h| h.newest >= oldest);
    }

    /// The devices' counts in `[from, to)` (seconds since the Unix epoch),
    /// clipped to what was observed: after counting began, up to `now`. A
    /// window that reaches `now` counts every event so far (event times are
    /// whole seconds: one at the current second is not in the future).
    pub fn observe<'a>(
        &self,
        devices: impl IntoIterator<Item = (&'a str, &'a str)>,
        from: f64,
        to: f64,
        now: f64,
    ) -> Observed {
        let from = from.max(self.since_unix);
        let open_end = to >= now;
        let to = to.min(now);
        if to <= from {
            return Observed::default();
        }
        let mut observed = Observed {
            secs: to - from,
            ..Observed::default()
        };
        let width = self.bucket_secs as f64;
        for (org, device) in devices {
            let Some(history) = self.devices.get(&(org.to_owned(), device.to_owned())) else {
                continue;
            };
            for bucket in history.buckets.iter() {
                if bucket.denies == 0 && bucket.errors == 0 {
                    continue;
                }
                // An event at second t happened in [t, t + 1); the bucket's
                // events lie in its span up to now.
                let start = bucket.index as f64 * width;
                let end = (start + width).min(now.floor() + 1.0).max(start + 1.0);
                let high = if open_end { end } else { to.min(end) };
                let overlap = (high - from.max(start)).max(0.0);
                if overlap <= 0.0 {
                    continue;
                }
                let share = overlap / (end - start);
                observed.denies += f64::from(bucket.denies) * share;
                observed.errors += f64::from(bucket.errors) * share;
            }
        }
        observed
    }
}

/// Why the canary's health breaches `bounds`, comparing the window during
/// the canary with the one before the push; `None`: within bounds.
pub fn judge(before: &Observed, during: &Observed, bounds: &Bounds) -> Option<String> {
    if during.secs <= 0.0 {
        return None;
    }
    let check = |what: &str, before_count: f64, during_count: f64, ratio: f64| {
        let before_rate = if before.secs > 0.0 {
            before_count / before.secs
        } else {
            0.0
        };
        let during_rate = during_count / during.secs;
        let excess = during_count - before_rate * during.secs;
        let breach = excess >= bounds.min_increase_events as f64
            && during_rate > before_rate * (1.0 + ratio);
        breach.then(|| {
            format!(
                "the canary's {what} rate rose from {:.1}/min before the push to {:.1}/min \
                 ({:.0} more than that rate gives; bounds: +{:.0}% and {} more)",
                before_rate * 60.0,
                during_rate * 60.0,
                excess,
                ratio * 100.0,
                bounds.min_increase_events
            )
        })
    };
    check(
        "deny",
        before.denies,
        during.denies,
        bounds.max_deny_rate_increase,
    )
    .or_else(|| {
        check(
            "connection-error",
            before.errors,
            during.errors,
            bounds.max_error_rate_increase,
        )
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// The canary devices have the serial; the others wait.
    Canary,
    /// The canary stayed within bounds; everyone has the serial.
    Promoted,
    /// The canary breached a bound, or an admin rolled back.
    RolledBack,
    /// Not staged: everyone at once.
    Complete,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Canary => "canary",
            RolloutState::Promoted => "promoted",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Complete => "complete",
        }
    }
}

/// The layer a rollout pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutLayer {
    Baseline,
    Organisation,
}

impl RolloutLayer {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutLayer::Baseline => "baseline",
            RolloutLayer::Organisation => "organisation",
        }
    }
}

/// One organisation's part of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// The serial the organisation ran before (0: none).
    pub previous_serial: u64,
    /// Whether its other devices keep `previous_serial` during the canary.
    pub staged: bool,
    /// Its canary devices (device ids).
    pub canary_devices: BTreeSet<String>,
}

/// A push (or rollback) on its way to the devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub serial: u64,
    pub layer: RolloutLayer,
    pub pushed_by: String,
    pub started_unix_ms: u64,
    /// Empty when not staged.
    pub canary_group: String,
    pub canary_seconds: u64,
    /// Every organisation that got the serial.
    pub orgs: BTreeMap<String, Stage>,
    pub state: RolloutState,
    pub reason: String,
    pub finished_unix_ms: u64,
    pub rollback_serial: u64,
    /// For a rollback: the serial whose content it restores.
    pub restores: u64,
    /// The canary devices' outcomes in the window before the push, as last
    /// seen whole (kept across restarts, which lose the history).
    pub before: Option<Observed>,
    pub during: Option<Observed>,
    /// The last failure to roll back (retried every check).
    #[serde(default)]
    pub rollback_error: String,
}

/// What a check decided about a running canary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Promote,
    RollBack { reason: String },
}

impl Rollout {
    /// A push that goes to everyone at once.
    pub fn complete(
        serial: u64,
        layer: RolloutLayer,
        pushed_by: &str,
        now_unix_ms: u64,
        previous: &BTreeMap<String, u64>,
    ) -> Self {
        Self {
            serial,
            layer,
            pushed_by: pushed_by.to_owned(),
            started_unix_ms: now_unix_ms,
            canary_group: String::new(),
            canary_seconds: 0,
            orgs: previous
                .iter()
                .map(|(org, &previous_serial)| {
                    let stage = Stage {
                        previous_serial,
                        staged: false,
                        canary_devices: BTreeSet::new(),
                    };
                    (org.clone(), stage)
                })
                .collect(),
            state: RolloutState::Complete,
            reason: String::new(),
            finished_unix_ms: now_unix_ms,
            rollback_serial: 0,
            restores: 0,
            before: None,
            during: None,
            rollback_error: String::new(),
        }
    }

    pub fn is_running(&self) -> bool {
        self.state == RolloutState::Canary
    }

    /// The canary devices of every organisation, as (org, device).
    pub fn canary_devices(&self) -> impl Iterator<Item = (&str, &str)> {
        self.orgs.iter().flat_map(|(org, stage)| {
            stage
                .canary_devices
                .iter()
                .map(move |d| (org.as_str(), d.as_str()))
        })
    }

    pub fn canary_device_count(&self) -> usize {
        self.orgs.values().map(|s| s.canary_devices.len()).sum()
    }

    /// The serial `device` of `org` is held at while the canary runs
    /// (`None`: it gets the newest).
    pub fn holds_back(&self, org: &str, device: &str) -> Option<u64> {
        let stage = self.orgs.get(org)?;
        (self.is_running() && stage.staged && !stage.canary_devices.contains(device))
            .then_some(stage.previous_serial)
    }

    fn start_secs(&self) -> f64 {
        self.started_unix_ms as f64 / 1000.0
    }

    /// When the canary ends.
    pub fn ends_unix_ms(&self) -> u64 {
        self.started_unix_ms + self.canary_seconds * 1000
    }

    /// Measures the canary's health and decides: roll back on a breach,
    /// promote once the canary time is over, else nothing yet.
    pub fn tick(
        &mut self,
        now_unix_ms: u64,
        health: &HealthCounters,
        bounds: &Bounds,
    ) -> Option<Outcome> {
        if !self.is_running() {
            return None;
        }
        let now = now_unix_ms as f64 / 1000.0;
        // Both windows meet at the start of the bucket the push fell in, so
        // nothing after the push counts as before it (whatever the push
        // bucket held before the push counts as during: it errs towards
        // seeing a jump).
        let start = health.bucket_start(self.start_secs());
        let window = self.canary_seconds as f64;
        let counted_before = health.observe(self.canary_devices(), start - window, start, now);
        // The whole window before was observed: that is the truth (and late
        // events only add to it); else what was seen whole before a restart.
        let before = match self.before {
            Some(kept) if kept.secs > counted_before.secs => kept,
            _ => counted_before,
        };
        self.before = Some(before);
        let during = health.observe(self.canary_devices(), start, start + window, now);
        self.during = Some(during);
        if let Some(reason) = judge(&before, &during, bounds) {
            return Some(Outcome::RollBack { reason });
        }
        (now_unix_ms >= self.ends_unix_ms()).then_some(Outcome::Promote)
    }

    pub fn promote(&mut self, now_unix_ms: u64) {
        self.state = RolloutState::Promoted;
        self.finished_unix_ms = now_unix_ms;
        self.rollback_error.clear();
    }

    pub fn rolled_back(&mut self, rollback_serial: u64, reason: String, now_unix_ms: u64) {
        self.state = RolloutState::RolledBack;
        self.rollback_serial = rollback_serial;
        self.reason = reason;
        self.finished_unix_ms = now_unix_ms;
        self.rollback_error.clear();
    }
}

/// Every running rollout and each organisation's latest one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollouts {
    /// Oldest first.
    rollouts: Vec<Rollout>,
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutsFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Corrupt {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write rollouts: {0}")]
    Write(#[from] zt_identity::Error),
}

impl Rollouts {
    pub fn load(path: &Path) -> Result<Self, RolloutsFileError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| RolloutsFileError::Corrupt {
                    path: path.to_owned(),
                    source,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(RolloutsFileError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), RolloutsFileError> {
        let json = serde_json::to_vec_pretty(self).expect("rollouts serialise");
        zt_identity::files::write_file_atomic(path, &json, 0o600)?;
        Ok(())
    }

    /// The running rollout that concerns `org`.
    pub fn running(&self, org: &str) -> Option<&Rollout> {
        self.rollouts
            .iter()
            .find(|r| r.is_running() && r.orgs.contains_key(org))
    }

    pub fn running_mut(&mut self, org: &str) -> Option<&mut Rollout> {
        self.rollouts
            .iter_mut()
            .find(|r| r.is_running() && r.orgs.contains_key(org))
    }

    pub fn any_running(&self) -> Option<&Rollout> {
        self.rollouts.iter().find(|r| r.is_running())
    }

    /// `org`'s latest rollout.
    pub fn latest(&self, org: &str) -> Option<&Rollout> {
        self.rollouts
            .iter()
            .rev()
            .find(|r| r.orgs.contains_key(org))
    }

    /// The serial `device` of `org` is held at (`None`: the newest).
    pub fn holds_back(&self, org: &str, device: &str) -> Option<u64> {
        self.running(org)?.holds_back(org, device)
    }

    /// Adds a rollout, forgetting those no longer running nor any
    /// organisation's latest.
    pub fn add(&mut self, rollout: Rollout) {
        self.rollouts.push(rollout);
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut keep = vec![false; self.rollouts.len()];
        for (i, r) in self.rollouts.iter().enumerate().rev() {
            // Every organisation is marked seen (no short cut).
            let mut latest_somewhere = false;
            for org in r.orgs.keys() {
                latest_somewhere |= seen.insert(org.as_str());
            }
            keep[i] = latest_somewhere || r.is_running();
        }
        let mut keep = keep.into_iter();
        self.rollouts.retain(|_| keep.next().unwrap_or(true));
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Rollout> {
        self.rollouts.iter_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        max_deny_rate_increase: 1.0,
        max_error_rate_increase: 0.5,
        min_increase_events: 10,
    };
    const T0: u64 = 1_700_000_000;

    fn observed(denies: f64, errors: f64, secs: f64) -> Observed {
        Observed {
            denies,
            errors,
            secs,
        }
    }

    #[test]
    fn a_rate_breaches_only_past_both_the_ratio_and_the_minimum_increase() {
        // 60/min before; doubled, not more, is within the ratio.
        let before = observed(60.0, 0.0, 60.0);
        assert_eq!(judge(&before, &observed(120.0, 0.0, 60.0), &BOUNDS), None);
        // More than double and 61 more than predicted: a breach.
        let reason = judge(&before, &observed(121.0, 0.0, 60.0), &BOUNDS).unwrap();
        assert!(reason.contains("deny rate rose from 60.0/min"), "{reason}");
        assert!(reason.contains("to 121.0/min"), "{reason}");
        // From nothing to a few: past any ratio, but not the minimum.
        let quiet = observed(0.0, 0.0, 60.0);
        assert_eq!(judge(&quiet, &observed(9.0, 0.0, 60.0), &BOUNDS), None);
        assert!(judge(&quiet, &observed(10.0, 0.0, 60.0), &BOUNDS).is_some());
        // Early in the canary: the same rate as before is no breach, a
        // burst is.
        assert_eq!(judge(&before, &observed(2.0, 0.0, 2.0), &BOUNDS), None);
        assert!(judge(&before, &observed(14.0, 0.0, 2.0), &BOUNDS).is_some());
        // Nothing measured yet: nothing to judge.
        assert_eq!(judge(&quiet, &observed(100.0, 0.0, 0.0), &BOUNDS), None);
        // Errors have their own ratio.
        let errors_before = observed(0.0, 40.0, 60.0);
        assert_eq!(
            judge(&errors_before, &observed(0.0, 60.0, 60.0), &BOUNDS),
            None
        );
        let reason = judge(&errors_before, &observed(0.0, 61.0, 60.0), &BOUNDS).unwrap();
        assert!(reason.contains("connection-error rate"), "{reason}");
        // No window before (a fresh collector): compared with nothing.
        assert!(judge(&observed(0.0, 0.0, 0.0), &observed(10.0, 0.0, 5.0), &BOUNDS).is_some());
    }

    #[test]
    fn denials_and_connection_errors_are_what_ingest_stores_as_such() {
        use proto::telemetry::{event::Kind, AgentIdentity, Decision, Event, TcpConnection};
        let at = |second: u64| (T0 + second) * 1_000_000_000 + 123;
        let decision = |seq, second, action: &str, verdict: &str, reason: &str| Event {
            seq,
            time_unix_ns: at(second),
            ancestors: Vec::new(),
            kind: Some(Kind::Decision(Decision {
                ip_version: 4,
                remote_addr: "192.0.2.1".into(),
                remote_port: 443,
                protocol: "tcp".into(),
                action: action.into(),
                verdict: verdict.into(),
                enforcement_point: "tunnel".into(),
                reason: reason.into(),
                ..Default::default()
            })),
        };
        let tcp = |seq, second, action: &str| Event {
            seq,
            time_unix_ns: at(second),
            ancestors: Vec::new(),
            kind: Some(Kind::Tcp(TcpConnection {
                action: action.into(),
                pid: 7,
                ip_version: 4,
                local_addr: "10.0.0.2".into(),
                local_port: 40_000,
                remote_addr: "192.0.2.1".into(),
                remote_port: 443,
                ..Default::default()
            })),
        };
        let events = [
            decision(1, 0, "deny", "denied", "policy"),
            decision(2, 0, "tunnel", "denied", "gateway_unreachable"),
            decision(3, 0, "allow", "allowed", ""),
            decision(4, 0, "audit", "would_deny", ""),
            decision(5, 1, "tunnel", "denied", "no_service"),
            tcp(6, 1, "connect_failed"),
            tcp(7, 1, "connected"),
            decision(8, 2, "tunnel", "denied", "service_unreachable"),
        ];
        let identity = AgentIdentity {
            org_id: "city-a".into(),
            device_id: "pc-1".into(),
            boot_id: "boot".into(),
            ..Default::default()
        };
        let converted = crate::ingest::convert_batch(Some(&identity), &events, T0 as u32);
        assert_eq!(converted.rejected, 0, "{:?}", converted.first_reason);
        let samples = health_samples(&converted.rows.decisions, &converted.rows.network_events);
        assert_eq!(
            samples,
            [sample(T0, 1, 1), sample(T0 + 1, 1, 1), sample(T0 + 2, 0, 1)]
        );
    }

    fn sample(time_unix: u64, denies: u32, errors: u32) -> HealthSample {
        HealthSample {
            time_unix,
            denies,
            errors,
        }
    }

    #[test]
    fn counters_count_per_device_and_window_and_forget_what_is_too_old() {
        let mut health = HealthCounters::new(1, T0 as f64);
        let now = T0 + 100;
        health.record(
            "city-a",
            "pc-1",
            &[sample(T0 + 10, 3, 0), sample(T0 + 11, 0, 2)],
            now,
        );
        health.record("city-a", "pc-2", &[sample(T0 + 10, 5, 0)], now);
        health.record("city-b", "pc-1", &[sample(T0 + 10, 7, 0)], now);
        let all = health.observe(
            [("city-a", "pc-1"), ("city-a", "pc-2")],
            T0 as f64,
            (T0 + 20) as f64,
            now as f64,
        );
        assert_eq!(all, observed(8.0, 2.0, 20.0));
        // Half of second 10 falls inside: half its count.
        let half = health.observe(
            [("city-a", "pc-1")],
            (T0 + 10) as f64 + 0.5,
            (T0 + 11) as f64,
            now as f64,
        );
        assert_eq!(half, observed(1.5, 0.0, 0.5));
        // Before counting began, nothing is known: the window is clipped.
        let clipped = health.observe(
            [("city-a", "pc-1")],
            T0 as f64 - 50.0,
            T0 as f64 + 50.0,
            now as f64,
        );
        assert_eq!(clipped.secs, 50.0);
        // A clock ahead counts as now; older than the history is dropped.
        health.record("city-a", "pc-3", &[sample(now + 30, 1, 0)], now);
        health.record("city-a", "pc-4", &[sample(now - 500, 1, 0)], now);
        let ahead = health.observe(
            [("city-a", "pc-3"), ("city-a", "pc-4")],
            T0 as f64,
            (now + 1) as f64,
            (now + 1) as f64,
        );
        assert_eq!((ahead.denies, ahead.errors), (1.0, 0.0));
        assert_eq!(health.tracked_devices(), 4);
        // A slot reused by a newer bucket no longer counts the old one.
        let later = now + BUCKETS as u64;
        health.record(
            "city-a",
            "pc-2",
            &[sample(T0 + 10 + BUCKETS as u64, 1, 0)],
            later,
        );
        let old = health.observe(
            [("city-a", "pc-2")],
            T0 as f64,
            (T0 + 20) as f64,
            later as f64,
        );
        assert_eq!(old.denies, 0.0);
        // Idle devices are dropped once their history is gone.
        health.prune(later + 200);
        assert_eq!(health.tracked_devices(), 0);
    }

    #[test]
    fn wider_buckets_spread_their_count_over_the_span_up_to_now() {
        let mut health = HealthCounters::new(10, T0 as f64);
        health.record("o", "d", &[sample(T0 + 21, 4, 0)], T0 + 23);
        // The bucket [20, 30) holds events of seconds 20 to 23 so far, one a
        // second; the window from 22 to now (23) has those of 22 and 23.
        let seen = health.observe(
            [("o", "d")],
            (T0 + 22) as f64,
            (T0 + 30) as f64,
            (T0 + 23) as f64,
        );
        assert_eq!((seen.denies, seen.secs), (2.0, 1.0));
        // A window that ends before now is cut where it ends.
        let seen = health.observe(
            [("o", "d")],
            (T0 + 20) as f64,
            (T0 + 22) as f64,
            (T0 + 23) as f64,
        );
        assert_eq!((seen.denies, seen.secs), (2.0, 2.0));
        let settings = RolloutSettings::default();
        assert_eq!(settings.bucket_secs(), 3600_u64.div_ceil(126));
        assert!(settings.bucket_secs() * (BUCKETS as u64 - 1) >= 2 * settings.max_canary_seconds);
    }

    fn canary(now_ms: u64) -> Rollout {
        let mut previous = BTreeMap::new();
        previous.insert("city-a".to_owned(), 4);
        let mut rollout =
            Rollout::complete(5, RolloutLayer::Organisation, "admin", now_ms, &previous);
        rollout.state = RolloutState::Canary;
        rollout.canary_group = "canaries".into();
        rollout.canary_seconds = 60;
        rollout.finished_unix_ms = 0;
        let stage = rollout.orgs.get_mut("city-a").unwrap();
        stage.staged = true;
        stage.canary_devices = ["c-1".to_owned(), "c-2".to_owned()].into();
        rollout
    }

    #[test]
    fn a_healthy_canary_holds_the_others_back_until_it_is_promoted() {
        let started = (T0 + 100) * 1000;
        let mut rollout = canary(started);
        let mut health = HealthCounters::new(1, T0 as f64);
        // The same steady trickle of denials before and during, and a storm
        // on a device outside the canary.
        for t in (T0 + 40)..(T0 + 150) {
            health.record("city-a", "c-1", &[sample(t, 1, 0)], t);
            health.record("city-a", "pc-9", &[sample(t, 50, 50)], t);
        }
        assert_eq!(rollout.holds_back("city-a", "pc-9"), Some(4));
        assert_eq!(rollout.holds_back("city-a", "c-1"), None);
        assert_eq!(rollout.holds_back("city-b", "pc-9"), None);
        assert_eq!(rollout.tick((T0 + 150) * 1000, &health, &BOUNDS), None);
        assert!(rollout.is_running());
        let before = rollout.before.unwrap();
        assert_eq!((before.denies, before.secs), (60.0, 60.0));
        assert!((rollout.during.unwrap().deny_rate() - 60.0).abs() < 1.5);
        assert_eq!(
            rollout.tick((T0 + 160) * 1000, &health, &BOUNDS),
            Some(Outcome::Promote)
        );
        rollout.promote((T0 + 160) * 1000);
        assert_eq!(rollout.state, RolloutState::Promoted);
        assert_eq!(rollout.holds_back("city-a", "pc-9"), None);
        assert_eq!(rollout.tick((T0 + 170) * 1000, &health, &BOUNDS), None);
    }

    #[test]
    fn a_canary_whose_denials_jump_is_rolled_back_before_its_time_is_over() {
        let started = (T0 + 100) * 1000;
        let mut rollout = canary(started);
        let mut health = HealthCounters::new(1, T0 as f64);
        health.record("city-a", "c-1", &[sample(T0 + 50, 2, 0)], T0 + 50);
        assert_eq!(rollout.tick((T0 + 101) * 1000, &health, &BOUNDS), None);
        for t in (T0 + 101)..(T0 + 104) {
            health.record("city-a", "c-2", &[sample(t, 20, 0)], t);
        }
        let Some(Outcome::RollBack { reason }) = rollout.tick((T0 + 104) * 1000, &health, &BOUNDS)
        else {
            panic!("no rollback: {rollout:?}");
        };
        assert!(reason.contains("deny rate rose from 2.0/min"), "{reason}");
        rollout.rolled_back(6, reason.clone(), (T0 + 104) * 1000);
        assert_eq!(rollout.state, RolloutState::RolledBack);
        assert_eq!(
            (rollout.rollback_serial, rollout.reason.as_str()),
            (6, reason.as_str())
        );
        assert_eq!(rollout.holds_back("city-a", "pc-9"), None);
    }

    #[test]
    fn the_windows_meet_at_the_bucket_of_the_push() {
        // 10-s buckets; the push at 105.5 s: before is [40, 100), during
        // from 100 on.
        let mut rollout = canary((T0 + 105) * 1000 + 500);
        let mut health = HealthCounters::new(10, T0 as f64);
        health.record("city-a", "c-1", &[sample(T0 + 95, 6, 0)], T0 + 95);
        health.record("city-a", "c-1", &[sample(T0 + 107, 30, 0)], T0 + 107);
        let outcome = rollout.tick((T0 + 108) * 1000, &health, &BOUNDS);
        let before = rollout.before.unwrap();
        assert_eq!((before.denies, before.secs), (6.0, 60.0));
        let during = rollout.during.unwrap();
        assert_eq!((during.denies, during.secs), (30.0, 8.0));
        assert!(
            matches!(outcome, Some(Outcome::RollBack { .. })),
            "{outcome:?}"
        );
    }

    #[test]
    fn after_a_restart_the_window_before_is_the_one_kept() {
        let started = (T0 + 100) * 1000;
        let mut rollout = canary(started);
        rollout.before = Some(observed(30.0, 0.0, 60.0));
        // Counting began after the push: the kept window stands.
        let mut health = HealthCounters::new(1, (T0 + 120) as f64);
        for t in (T0 + 120)..(T0 + 130) {
            health.record("city-a", "c-1", &[sample(t, 1, 0)], t);
        }
        assert_eq!(rollout.tick((T0 + 130) * 1000, &health, &BOUNDS), None);
        assert_eq!(rollout.before, Some(observed(30.0, 0.0, 60.0)));
        assert_eq!(rollout.during.unwrap().secs, 10.0);
    }

    #[test]
    fn rollouts_keep_the_running_and_each_organisations_latest() {
        let mut rollouts = Rollouts::default();
        let orgs = |names: &[&str]| -> BTreeMap<String, u64> {
            names.iter().map(|n| ((*n).to_owned(), 1)).collect()
        };
        rollouts.add(Rollout::complete(
            1,
            RolloutLayer::Baseline,
            "soc",
            1,
            &orgs(&["a", "b"]),
        ));
        rollouts.add(canary(2)); // city-a, running
        rollouts.add(Rollout::complete(
            6,
            RolloutLayer::Organisation,
            "x",
            3,
            &orgs(&["a"]),
        ));
        assert_eq!(rollouts.latest("b").map(|r| r.serial), Some(1));
        assert_eq!(rollouts.latest("a").map(|r| r.serial), Some(6));
        assert_eq!(rollouts.running("city-a").map(|r| r.serial), Some(5));
        assert_eq!(rollouts.holds_back("city-a", "pc-1"), Some(4));
        rollouts.add(Rollout::complete(
            7,
            RolloutLayer::Baseline,
            "soc",
            4,
            &orgs(&["a", "b"]),
        ));
        // Serials 1 and 6 are nobody's latest any more; 5 still runs.
        let serials: Vec<u64> = rollouts.rollouts.iter().map(|r| r.serial).collect();
        assert_eq!(serials, [5, 7]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollouts.json");
        rollouts.save(&path).unwrap();
        assert_eq!(Rollouts::load(&path).unwrap(), rollouts);
        assert_eq!(
            Rollouts::load(&dir.path().join("none.json")).unwrap(),
            Rollouts::default()
        );
    }
}
