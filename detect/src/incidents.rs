//! Incidents (sans-IO): alerts grouped by (org, rule, host, process-tree
//! root) within a window, with counts, first and last seen, severity that
//! escalates on repeats or on spread to more hosts, the lifecycle open →
//! acknowledged → resolved, links to the events, and the zero-incident KPI
//! per fiscal year (April to March). The collector holds an [`Incidents`]
//! in memory and stores every changed incident as a new row version (see
//! docs/detections.md, "Incidents").

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    str::FromStr,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    engine::{tree_root, Alert, EventRef},
    event::Event,
    rules::{By, Logic, Rule, Severity},
};

/// The longest note a transition takes, in bytes.
pub const MAX_NOTE_BYTES: usize = 4096;

const NS_PER_SEC: u64 = 1_000_000_000;
const SECS_PER_DAY: i64 = 86_400;
const NS_PER_DAY: u64 = SECS_PER_DAY as u64 * NS_PER_SEC;
/// Other hosts kept in an incident's `spread_hosts` (at least the spread
/// threshold).
const MAX_SPREAD_LISTED: usize = 100;
/// Hosts named in the escalation text.
const MAX_HOSTS_NAMED: usize = 10;

/// Grouping, escalation and memory bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IncidentConfig {
    /// An alert joins its group's incident when the incident is not resolved
    /// and the alert's events lie within this span of the incident's (first
    /// seen − window ..= last seen + window, by event time).
    pub window_ns: u64,
    /// An incident with this many alerts or more is one severity level up
    /// (0: off).
    pub repeat_escalation: u64,
    /// When the rule has unresolved incidents on this many distinct hosts of
    /// one org within the window, each of them is one level up (0 or 1: off).
    pub spread_hosts: usize,
    /// Incidents held in memory; at the cap the one last seen longest ago is
    /// dropped (it is no longer grouped into).
    pub max_open: usize,
    /// Event references linked per incident; later ones are counted in
    /// [`Incident::events`] but not linked.
    pub max_events_per_incident: usize,
}

impl Default for IncidentConfig {
    fn default() -> Self {
        Self {
            window_ns: 3600 * NS_PER_SEC,
            repeat_escalation: 10,
            spread_hosts: 3,
            max_open: 10_000,
            max_events_per_incident: 256,
        }
    }
}

/// A name that is not one of a closed set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}`; expected one of: {expected}")]
pub struct ParseNameError {
    pub what: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// Where an incident is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Open,
    Acknowledged,
    Resolved,
}

impl Status {
    pub const ALL: [Status; 3] = [Status::Open, Status::Acknowledged, Status::Resolved];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Open => "open",
            Status::Acknowledged => "acknowledged",
            Status::Resolved => "resolved",
        }
    }

    pub fn from_name(name: &str) -> Option<Status> {
        Self::ALL.into_iter().find(|st| st.as_str() == name)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_name(s).ok_or_else(|| ParseNameError {
            what: "status",
            value: s.to_owned(),
            expected: "open, acknowledged, resolved",
        })
    }
}

/// A lifecycle step an analyst takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Acknowledge,
    Resolve,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Acknowledge => "acknowledge",
            Action::Resolve => "resolve",
        }
    }

    /// `acknowledge` (or `ack`), `resolve`.
    pub fn from_name(name: &str) -> Option<Action> {
        match name {
            "acknowledge" | "ack" => Some(Action::Acknowledge),
            "resolve" => Some(Action::Resolve),
            _ => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = ParseNameError;

    /// `acknowledge` (or `ack`), `resolve`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_name(s).ok_or_else(|| ParseNameError {
            what: "action",
            value: s.to_owned(),
            expected: "acknowledge (ack), resolve",
        })
    }
}

/// Alerts of one rule on one host and process tree, close in time. Each
/// change is a new version (`updated_ns`) of the row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    /// 16 lower-case hex digits, from org, rule, host, tree root and first
    /// seen (see [`incident_id`]): a replay gives the same id.
    pub id: String,
    pub org: String,
    pub host: String,
    pub rule_id: String,
    pub title: String,
    /// The rule's severity (the highest its alerts carried).
    pub rule_severity: Severity,
    /// The rule's severity raised by escalation, capped at critical; it never
    /// goes down.
    pub severity: Severity,
    /// Why the severity is above the rule's, e.g. `12 alerts (≥ 10)`,
    /// `rule fired on 3 hosts: a, b, c`; empty when it is not.
    pub escalation: String,
    pub mitre: Vec<String>,
    /// `pid:exe` of the process tree's root; empty when the alert is not
    /// about a process.
    pub tree_root: String,
    pub status: Status,
    /// Event time of the first and last event of its alerts.
    pub first_ns: u64,
    pub last_ns: u64,
    /// Alerts grouped into it.
    pub count: u64,
    /// Other hosts of the org where the rule had an unresolved incident
    /// within the window of this one's alerts (sorted, at most 100).
    pub spread_hosts: Vec<String>,
    pub acknowledged_by: String,
    pub acknowledged_ns: u64,
    pub resolved_by: String,
    pub resolved_ns: u64,
    /// The latest note.
    pub note: String,
    /// The row's version: strictly increasing with every change.
    pub updated_ns: u64,
}

/// New event links of an incident, to store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Linked {
    pub incident_id: String,
    pub org: String,
    pub host: String,
    pub events: Vec<EventRef>,
}

/// What an alert changed: every incident whose row changed (opened,
/// counted, escalated, spread), the alert's own first, and the new links.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    pub incidents: Vec<Incident>,
    pub links: Vec<Linked>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.incidents.is_empty() && self.links.is_empty()
    }

    /// Adds later changes: an incident already here is replaced by its
    /// newer version, links are appended.
    pub fn merge(&mut self, later: Changes) {
        for incident in later.incidents {
            match self.incidents.iter_mut().find(|i| i.id == incident.id) {
                Some(held) if held.updated_ns <= incident.updated_ns => *held = incident,
                Some(_) => {}
                None => self.incidents.push(incident),
            }
        }
        self.links.extend(later.links);
    }
}

/// A lifecycle step refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("the incident is already resolved")]
    AlreadyResolved,
    #[error("the incident is already acknowledged")]
    AlreadyAcknowledged,
    #[error("resolving an incident needs a note")]
    NoteRequired,
    #[error("the note is {len} bytes; at most {max}")]
    NoteTooLong { len: usize, max: usize },
    #[error("no actor: say who acknowledges or resolves")]
    NoActor,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    org: String,
    rule_id: String,
    host: String,
    tree_root: String,
}

impl GroupKey {
    fn of(inc: &Incident) -> Self {
        Self {
            org: inc.org.clone(),
            rule_id: inc.rule_id.clone(),
            host: inc.host.clone(),
            tree_root: inc.tree_root.clone(),
        }
    }
}

/// The incidents held in memory, and the grouping of alerts into them.
#[derive(Debug, Clone, Default)]
pub struct Incidents {
    config: IncidentConfig,
    by_id: HashMap<String, Incident>,
    /// Per incident held, the event references linked so far.
    linked: HashMap<String, u64>,
    /// Group → its newest unresolved incident.
    groups: HashMap<GroupKey, String>,
    /// (org, rule) → unresolved incidents.
    by_rule: HashMap<(String, String), BTreeSet<String>>,
    /// (last seen, id), oldest first.
    order: BTreeSet<(u64, String)>,
    evicted: u64,
}

impl Incidents {
    pub fn new(config: IncidentConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    pub fn config(&self) -> &IncidentConfig {
        &self.config
    }

    /// Groups an alert into its incident, or opens one. `tree_root` is the
    /// group's process tree ([`alert_tree_root`]; empty when the alert is
    /// not about a process). `now_ns` (wall clock) versions the rows.
    pub fn on_alert(&mut self, alert: &Alert, tree_root: &str, now_ns: u64) -> Changes {
        let window = self.config.window_ns;
        let key = GroupKey {
            org: alert.org.clone(),
            rule_id: alert.rule_id.clone(),
            host: alert.host.clone(),
            tree_root: tree_root.to_owned(),
        };
        let joined = self
            .groups
            .get(&key)
            .filter(|id| {
                self.by_id
                    .get(*id)
                    .is_some_and(|inc| near(inc, alert.first_ns, alert.last_ns, window))
            })
            .cloned();
        let id = match joined {
            Some(id) => {
                if let Some(inc) = self.by_id.get_mut(&id) {
                    let old_last = inc.last_ns;
                    inc.first_ns = inc.first_ns.min(alert.first_ns);
                    inc.last_ns = inc.last_ns.max(alert.last_ns);
                    if inc.last_ns != old_last {
                        self.order.remove(&(old_last, id.clone()));
                        self.order.insert((inc.last_ns, id.clone()));
                    }
                }
                id
            }
            None => {
                self.make_room();
                let id = self.fresh_id(&key, alert.first_ns);
                self.insert(
                    Incident {
                        id: id.clone(),
                        org: key.org,
                        host: key.host,
                        rule_id: key.rule_id,
                        title: alert.title.clone(),
                        rule_severity: alert.severity,
                        severity: alert.severity,
                        escalation: String::new(),
                        mitre: alert.mitre.clone(),
                        tree_root: key.tree_root,
                        status: Status::Open,
                        first_ns: alert.first_ns,
                        last_ns: alert.last_ns,
                        count: 0,
                        spread_hosts: Vec::new(),
                        acknowledged_by: String::new(),
                        acknowledged_ns: 0,
                        resolved_by: String::new(),
                        resolved_ns: 0,
                        note: String::new(),
                        updated_ns: 0,
                    },
                    0,
                );
                id
            }
        };

        let mut changes = Changes::default();
        let max_links = self.config.max_events_per_incident as u64;
        if let Some(inc) = self.by_id.get_mut(&id) {
            inc.count += 1;
            inc.rule_severity = inc.rule_severity.max(alert.severity);
            let linked = self.linked.entry(id.clone()).or_insert(0);
            let take = max_links
                .saturating_sub(*linked)
                .min(alert.events.len() as u64);
            *linked += take;
            if take > 0 {
                changes.links.push(Linked {
                    incident_id: id.clone(),
                    org: inc.org.clone(),
                    host: inc.host.clone(),
                    events: alert.events[..take as usize].to_vec(),
                });
            }
        }
        let spread = self.spread(&id, alert.first_ns, alert.last_ns);
        for changed in std::iter::once(id).chain(spread) {
            if let Some(inc) = self.by_id.get_mut(&changed) {
                escalate(inc, &self.config);
                inc.updated_ns = next_version(inc.updated_ns, now_ns);
                changes.incidents.push(inc.clone());
            }
        }
        changes
    }

    /// Puts a stored incident back (collector start-up: the unresolved ones
    /// and the recent ones), so that later alerts group into it. A version
    /// older than the one held is ignored.
    pub fn load(&mut self, incident: Incident) {
        let linked = match self.by_id.get(&incident.id) {
            Some(held) if held.updated_ns >= incident.updated_ns => return,
            Some(_) => self.remove(&incident.id).map_or(0, |(_, linked)| linked),
            None => {
                self.make_room();
                // Every alert links at least one event: a lower bound.
                incident
                    .count
                    .min(self.config.max_events_per_incident as u64)
            }
        };
        self.insert(incident, linked);
    }

    /// The lifecycle: open → acknowledged → resolved, or open → resolved.
    /// `by` is who acts; resolving needs a note; a note is at most
    /// [`MAX_NOTE_BYTES`] (trimmed; an empty one keeps the previous note).
    /// Returns the new version, from `current` or the copy held in memory,
    /// whichever is newer; the held copy is replaced. A resolved incident
    /// is final: the group's next alert opens a new one.
    pub fn transition(
        &mut self,
        current: &Incident,
        action: Action,
        by: &str,
        note: &str,
        now_ns: u64,
    ) -> Result<Incident, TransitionError> {
        let held = self.by_id.get(&current.id).filter(|h| h.org == current.org);
        let is_held = held.is_some();
        let base = match held {
            Some(h) if h.updated_ns >= current.updated_ns => h,
            _ => current,
        };
        let next = apply(base, action, by, note, now_ns)?;
        if is_held {
            let linked = self.remove(&next.id).map_or(0, |(_, linked)| linked);
            self.insert(next.clone(), linked);
        }
        Ok(next)
    }

    pub fn get(&self, id: &str) -> Option<&Incident> {
        self.by_id.get(id)
    }

    /// The incidents held, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Incident> {
        self.by_id.values()
    }

    /// Drops from memory the incidents last seen longer than the window
    /// before `now_ns` (no alert groups into them any more); returns how
    /// many.
    pub fn expire(&mut self, now_ns: u64) -> usize {
        let window = self.config.window_ns;
        let mut dropped = 0;
        while let Some((last, id)) = self.order.first().cloned() {
            if last.saturating_add(window) >= now_ns {
                break;
            }
            self.remove(&id);
            dropped += 1;
        }
        dropped
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Incidents dropped to stay under `max_open`, since start.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn fresh_id(&self, key: &GroupKey, first_ns: u64) -> String {
        // A resolved incident of the same group may have the same first seen
        // (a late alert): another id, so its row is not overwritten.
        let mut salt = 0;
        loop {
            let id = salted_id(
                &key.org,
                &key.rule_id,
                &key.host,
                &key.tree_root,
                first_ns,
                salt,
            );
            if !self.by_id.contains_key(&id) {
                return id;
            }
            salt += 1;
        }
    }

    fn make_room(&mut self) {
        while self.by_id.len() >= self.config.max_open.max(1) {
            let Some((_, oldest)) = self.order.first().cloned() else {
                break;
            };
            self.remove(&oldest);
            self.evicted += 1;
        }
    }

    fn insert(&mut self, inc: Incident, linked: u64) {
        self.order.insert((inc.last_ns, inc.id.clone()));
        self.linked.insert(inc.id.clone(), linked);
        if inc.status != Status::Resolved {
            self.by_rule
                .entry((inc.org.clone(), inc.rule_id.clone()))
                .or_default()
                .insert(inc.id.clone());
            let key = GroupKey::of(&inc);
            let newest = match self.groups.get(&key).and_then(|id| self.by_id.get(id)) {
                Some(current) => inc.last_ns >= current.last_ns,
                None => true,
            };
            if newest {
                self.groups.insert(key, inc.id.clone());
            }
        }
        self.by_id.insert(inc.id.clone(), inc);
    }

    /// Takes an incident out, with its count of linked events.
    fn remove(&mut self, id: &str) -> Option<(Incident, u64)> {
        let inc = self.by_id.remove(id)?;
        let linked = self.linked.remove(id).unwrap_or(0);
        self.order.remove(&(inc.last_ns, inc.id.clone()));
        let rule = (inc.org.clone(), inc.rule_id.clone());
        if let Some(set) = self.by_rule.get_mut(&rule) {
            set.remove(id);
            if set.is_empty() {
                self.by_rule.remove(&rule);
            }
        }
        let key = GroupKey::of(&inc);
        if self.groups.get(&key).is_some_and(|g| g == id) {
            self.groups.remove(&key);
            // Another unresolved incident of the group, if one is held.
            let next = self
                .by_rule
                .get(&rule)
                .into_iter()
                .flatten()
                .filter_map(|other| self.by_id.get(other))
                .filter(|other| other.host == inc.host && other.tree_root == inc.tree_root)
                .max_by_key(|other| (other.last_ns, &other.id))
                .map(|other| other.id.clone());
            if let Some(next) = next {
                self.groups.insert(key, next);
            }
        }
        Some((inc, linked))
    }

    /// Shares the hosts of the rule's unresolved incidents (same org) near
    /// the alert among them; returns the incidents other than `id` whose
    /// list changed.
    fn spread(&mut self, id: &str, first_ns: u64, last_ns: u64) -> Vec<String> {
        let window = self.config.window_ns;
        let Some(inc) = self.by_id.get(id) else {
            return Vec::new();
        };
        let Some(ids) = self.by_rule.get(&(inc.org.clone(), inc.rule_id.clone())) else {
            return Vec::new();
        };
        let peers: Vec<&Incident> = ids
            .iter()
            .filter_map(|p| self.by_id.get(p))
            .filter(|p| near(p, first_ns, last_ns, window))
            .collect();
        let hosts: BTreeSet<&str> = peers.iter().map(|p| p.host.as_str()).collect();
        if hosts.len() < 2 {
            return Vec::new();
        }
        let hosts: Vec<String> = hosts.into_iter().map(str::to_owned).collect();
        let peers: Vec<String> = peers.iter().map(|p| p.id.clone()).collect();
        let cap = MAX_SPREAD_LISTED.max(self.config.spread_hosts);
        let mut changed = Vec::new();
        for peer in peers {
            let Some(p) = self.by_id.get_mut(&peer) else {
                continue;
            };
            let mut grew = false;
            for host in &hosts {
                if *host == p.host || p.spread_hosts.len() >= cap {
                    continue;
                }
                if let Err(i) = p.spread_hosts.binary_search(host) {
                    p.spread_hosts.insert(i, host.clone());
                    grew = true;
                }
            }
            if grew && peer != id {
                changed.push(peer);
            }
        }
        changed
    }
}

/// Whether events from `first_ns` to `last_ns` lie within the window of the
/// incident's span.
fn near(inc: &Incident, first_ns: u64, last_ns: u64, window_ns: u64) -> bool {
    first_ns <= inc.last_ns.saturating_add(window_ns)
        && last_ns.saturating_add(window_ns) >= inc.first_ns
}

fn next_version(previous: u64, now_ns: u64) -> u64 {
    now_ns.max(previous.saturating_add(1))
}

/// Recomputes severity and its reason; the severity never goes down.
fn escalate(inc: &mut Incident, config: &IncidentConfig) {
    let mut levels = 0;
    let mut reasons = Vec::new();
    if config.repeat_escalation > 0 && inc.count >= config.repeat_escalation {
        levels += 1;
        reasons.push(format!(
            "{} alerts (≥ {})",
            inc.count, config.repeat_escalation
        ));
    }
    let hosts = inc.spread_hosts.len() + 1;
    if config.spread_hosts >= 2 && hosts >= config.spread_hosts {
        levels += 1;
        let mut all: Vec<&str> = inc.spread_hosts.iter().map(String::as_str).collect();
        all.push(&inc.host);
        all.sort_unstable();
        let mut named = all[..all.len().min(MAX_HOSTS_NAMED)].join(", ");
        if all.len() > MAX_HOSTS_NAMED {
            named.push_str(&format!(" and {} more", all.len() - MAX_HOSTS_NAMED));
        }
        reasons.push(format!("rule fired on {hosts} hosts: {named}"));
    }
    let computed = inc.rule_severity.raised(levels);
    if computed >= inc.severity {
        inc.severity = computed;
        inc.escalation = reasons.join("; ");
    }
}

fn apply(
    current: &Incident,
    action: Action,
    by: &str,
    note: &str,
    now_ns: u64,
) -> Result<Incident, TransitionError> {
    let by = by.trim();
    if by.is_empty() {
        return Err(TransitionError::NoActor);
    }
    match (current.status, action) {
        (Status::Resolved, _) => return Err(TransitionError::AlreadyResolved),
        (Status::Acknowledged, Action::Acknowledge) => {
            return Err(TransitionError::AlreadyAcknowledged)
        }
        _ => {}
    }
    let note = note.trim();
    if note.len() > MAX_NOTE_BYTES {
        return Err(TransitionError::NoteTooLong {
            len: note.len(),
            max: MAX_NOTE_BYTES,
        });
    }
    if action == Action::Resolve && note.is_empty() {
        return Err(TransitionError::NoteRequired);
    }
    let mut next = current.clone();
    match action {
        Action::Acknowledge => {
            next.status = Status::Acknowledged;
            next.acknowledged_by = by.to_owned();
            next.acknowledged_ns = now_ns;
        }
        Action::Resolve => {
            next.status = Status::Resolved;
            next.resolved_by = by.to_owned();
            next.resolved_ns = now_ns;
        }
    }
    if !note.is_empty() {
        next.note = note.to_owned();
    }
    next.updated_ns = next_version(current.updated_ns, now_ns);
    Ok(next)
}

/// An incident's id: the first 8 bytes, in lower-case hex, of SHA-256 over
/// `zt-incident/1`, then org, rule id, host and tree root (each as its
/// length, u64 little-endian, and its bytes), then `first_ns` (u64
/// big-endian). ([`Incidents`] adds a counter when the id is held already.)
pub fn incident_id(org: &str, rule_id: &str, host: &str, tree_root: &str, first_ns: u64) -> String {
    salted_id(org, rule_id, host, tree_root, first_ns, 0)
}

fn salted_id(
    org: &str,
    rule_id: &str,
    host: &str,
    tree_root: &str,
    first_ns: u64,
    salt: u32,
) -> String {
    let mut h = Sha256::new();
    h.update(b"zt-incident/1");
    for part in [org, rule_id, host, tree_root] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(first_ns.to_be_bytes());
    if salt > 0 {
        h.update(salt.to_be_bytes());
    }
    let digest = h.finalize();
    let mut id = String::with_capacity(16);
    for b in &digest[..8] {
        id.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        id.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
    }
    id
}

/// `pid:exe` of the process tree's root: the topmost ancestor below pid 1,
/// or the event's own process when it has none; empty for an event without
/// a process (pid 0, e.g. a heartbeat). The same root as the engine's
/// `process_tree` entity.
pub fn process_tree_root(e: &Event) -> String {
    if e.pid == 0 {
        return String::new();
    }
    let (pid, exe) = tree_root(e);
    format!("{pid}:{exe}")
}

/// The tree root to group an alert of `rule` by, given the event that
/// raised it: [`process_tree_root`] when the rule is about a process
/// (single-event rules; `by: process` or `process_tree`), empty when it is
/// about a host or a user (the events come from many processes).
pub fn alert_tree_root(rule: &Rule, trigger: &Event) -> String {
    let by = match &rule.logic {
        Logic::Match(_) => By::Process,
        Logic::Sequence(s) => s.by,
        Logic::Threshold(t) => t.by,
        Logic::Absence(a) => a.by,
    };
    match by {
        By::Process | By::ProcessTree => process_tree_root(trigger),
        By::Host | By::User => String::new(),
    }
}

/// A fiscal year: April 1 00:00 local time to the next April 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FiscalYear {
    /// `FY2026` for April 2026 to March 2027.
    pub label: String,
    /// Start, inclusive, ns since the Unix epoch.
    pub start_ns: u64,
    /// End, exclusive.
    pub end_ns: u64,
}

impl FiscalYear {
    /// The fiscal year holding `time_ns`, with local time `utc_offset_secs`
    /// east of UTC (Japan: 9 × 3600).
    pub fn containing(time_ns: u64, utc_offset_secs: i32) -> FiscalYear {
        let offset = i64::from(utc_offset_secs);
        let local_secs = (time_ns / NS_PER_SEC) as i64 + offset;
        let (y, m, _) = civil_from_days(local_secs.div_euclid(SECS_PER_DAY));
        let year = if m >= 4 { y } else { y - 1 };
        let start = |year: i64| -> u64 {
            let secs = i128::from(days_from_civil(year, 4, 1) * SECS_PER_DAY - offset);
            (secs * i128::from(NS_PER_SEC)).clamp(0, i128::from(u64::MAX)) as u64
        };
        FiscalYear {
            label: format!("FY{year}"),
            start_ns: start(year),
            end_ns: start(year + 1),
        }
    }

    pub fn contains(&self, time_ns: u64) -> bool {
        self.start_ns <= time_ns && time_ns < self.end_ns
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The zero-incident KPI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KpiFigures {
    pub fiscal_year: FiscalYear,
    /// Incidents allowed per fiscal year: 0.
    pub target: u64,
    /// Incidents opened (first seen) in the fiscal year.
    pub incidents: u64,
    /// Those by severity; every severity present, 0 included.
    pub by_severity: BTreeMap<String, u64>,
    /// Incidents not resolved, of any year.
    pub open: u64,
    pub open_by_severity: BTreeMap<String, u64>,
    /// Whole days (24 h) since the newest incident was opened.
    pub days_since_last: Option<u64>,
    pub last_opened_ns: Option<u64>,
    /// `incidents <= target`.
    pub on_target: bool,
}

/// The KPI at `now_ns` over the incidents given (several versions of one
/// incident count once: the newest). "Opened" is first seen; the fiscal
/// year is the one holding `now_ns` at `utc_offset_secs`.
pub fn kpi<'a>(
    incidents: impl IntoIterator<Item = &'a Incident>,
    now_ns: u64,
    utc_offset_secs: i32,
) -> KpiFigures {
    let fiscal_year = FiscalYear::containing(now_ns, utc_offset_secs);
    let mut newest: HashMap<&str, &Incident> = HashMap::new();
    for inc in incidents {
        let slot = newest.entry(inc.id.as_str()).or_insert(inc);
        if inc.updated_ns > slot.updated_ns {
            *slot = inc;
        }
    }
    let zero = || -> BTreeMap<String, u64> {
        Severity::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), 0))
            .collect()
    };
    let mut figures = KpiFigures {
        fiscal_year,
        target: 0,
        incidents: 0,
        by_severity: zero(),
        open: 0,
        open_by_severity: zero(),
        days_since_last: None,
        last_opened_ns: None,
        on_target: true,
    };
    for inc in newest.values() {
        let severity = inc.severity.as_str();
        if figures.fiscal_year.contains(inc.first_ns) {
            figures.incidents += 1;
            *figures.by_severity.entry(severity.to_owned()).or_insert(0) += 1;
        }
        if inc.status != Status::Resolved {
            figures.open += 1;
            *figures
                .open_by_severity
                .entry(severity.to_owned())
                .or_insert(0) += 1;
        }
        figures.last_opened_ns = figures.last_opened_ns.max(Some(inc.first_ns));
    }
    figures.days_since_last = figures
        .last_opened_ns
        .map(|last| now_ns.saturating_sub(last) / NS_PER_DAY);
    figures.on_target = figures.incidents <= figures.target;
    figures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        // Round trip over a span with leap years and century rules.
        for day in -800_000..800_000 {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }

    #[test]
    fn ids_have_sixteen_hex_digits() {
        let id = incident_id("o", "r", "h", "", 1);
        assert_eq!(id.len(), 16);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        // Fields are length-prefixed: moving a byte across a boundary
        // changes the id.
        assert_ne!(
            incident_id("ab", "c", "h", "", 1),
            incident_id("a", "bc", "h", "", 1)
        );
        assert_ne!(salted_id("o", "r", "h", "", 1, 1), id);
    }
}
