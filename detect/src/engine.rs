//! The engine: events in, alerts out. Single-event rules answer at once;
//! sequences and thresholds keep bounded per-entity state evaluated by event
//! time, so events that arrive out of order, or late within
//! [`Config::lateness_ns`], count as if they had arrived in order; absence
//! rules fire from [`Engine::advance_to`].

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
};

use serde::{Deserialize, Serialize};

use crate::{
    diag::Position,
    event::{Event, FieldRef, Kind, Value},
    rules::{By, FixtureStep, Logic, Rule, Sequence, Severity, Threshold},
};

/// Limits and tolerances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// How late (behind the newest event time seen) an event may arrive and
    /// still count in sequences and thresholds. Later ones are counted in
    /// [`Stats::too_late`] and only single-event rules see them.
    pub lateness_ns: u64,
    /// Default cap, per rule, on open state: entities with a partial
    /// sequence, a threshold window or an absence watch. At the cap the
    /// oldest entity is evicted ([`Stats::evicted_open`]).
    pub max_open: usize,
    /// Cap on events kept per sequence step, or per threshold window (at
    /// least 4 × the rule's count), per entity; the oldest go first
    /// ([`Stats::evicted_events`]).
    pub max_events: usize,
    /// Events this far ahead of the newest time seen do not move the clock
    /// (a device with a wrong clock must not make everyone else late).
    pub max_future_ns: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            lateness_ns: 60_000_000_000,
            max_open: 10_000,
            max_events: 64,
            max_future_ns: 300_000_000_000,
        }
    }
}

/// An event that contributed to an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EventRef {
    pub time_ns: u64,
    pub id: u64,
}

impl EventRef {
    fn of(e: &Event) -> Self {
        Self {
            time_ns: e.time_ns,
            id: e.id,
        }
    }
}

/// A rule fired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub rule_id: String,
    pub title: String,
    pub severity: Severity,
    pub mitre: Vec<String>,
    pub org: String,
    pub host: String,
    /// What the rule keeps state per (e.g. `org/host`, `org/host/pid:42@…`);
    /// for single-event rules the process.
    pub entity: String,
    pub first_ns: u64,
    pub last_ns: u64,
    /// The events that made it, in event-time order.
    pub events: Vec<EventRef>,
}

/// Counters, kept across snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub events: u64,
    pub alerts: u64,
    pub too_late: u64,
    pub future_skew: u64,
    pub evicted_open: u64,
    pub evicted_events: u64,
    pub expired: u64,
    pub duplicates: u64,
}

#[derive(Debug, Clone, Copy)]
struct Target {
    rule: u32,
    step: u32,
}

/// Per-entity state with oldest-first eviction.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Keyed<T> {
    slots: HashMap<String, Slot<T>>,
    /// Creation number → key, oldest first.
    order: BTreeMap<u64, String>,
    next: u64,
}

impl<T> Default for Keyed<T> {
    fn default() -> Self {
        Self {
            slots: HashMap::new(),
            order: BTreeMap::new(),
            next: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Slot<T> {
    created: u64,
    org: String,
    host: String,
    state: T,
}

impl<T: Default> Keyed<T> {
    fn slot(&mut self, key: String, e: &Event, cap: usize, evicted: &mut u64) -> &mut Slot<T> {
        if !self.slots.contains_key(&key) {
            while self.slots.len() >= cap.max(1) {
                let Some((_, oldest)) = self.order.pop_first() else {
                    break;
                };
                self.slots.remove(&oldest);
                *evicted += 1;
            }
            let created = self.next;
            self.next += 1;
            self.order.insert(created, key.clone());
            self.slots.insert(
                key.clone(),
                Slot {
                    created,
                    org: String::new(),
                    host: String::new(),
                    state: T::default(),
                },
            );
        }
        let slot = self
            .slots
            .get_mut(&key)
            .unwrap_or_else(|| unreachable!("inserted above"));
        if slot.host != e.host {
            slot.host.clone_from(&e.host);
        }
        if slot.org != e.org {
            slot.org.clone_from(&e.org);
        }
        slot
    }

    fn remove(&mut self, key: &str) {
        if let Some(slot) = self.slots.remove(key) {
            self.order.remove(&slot.created);
        }
    }

    /// Drops the slots `keep` says no to; returns how many.
    fn retain(&mut self, mut keep: impl FnMut(&mut Slot<T>) -> bool) -> u64 {
        let before = self.slots.len();
        let order = &mut self.order;
        self.slots.retain(|_, slot| {
            let kept = keep(slot);
            if !kept {
                order.remove(&slot.created);
            }
            kept
        });
        (before - self.slots.len()) as u64
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SeqState {
    /// Per step, the matching events, in (time, id) order.
    steps: Vec<Vec<EventRef>>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Counted {
    at: EventRef,
    /// Hash of the `distinct` fields; `None` when the rule counts events.
    distinct: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ThrState {
    /// In (time, id) order.
    events: Vec<Counted>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AbsState {
    last: Option<EventRef>,
    alerted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum State {
    Stateless,
    Sequence(Keyed<SeqState>),
    Threshold(Keyed<ThrState>),
    Absence(Keyed<AbsState>),
}

impl State {
    fn for_rule(rule: &Rule) -> Self {
        match rule.logic {
            Logic::Match(_) => State::Stateless,
            Logic::Sequence(_) => State::Sequence(Keyed::default()),
            Logic::Threshold(_) => State::Threshold(Keyed::default()),
            Logic::Absence(_) => State::Absence(Keyed::default()),
        }
    }

    fn open(&self) -> usize {
        match self {
            State::Stateless => 0,
            State::Sequence(k) => k.slots.len(),
            State::Threshold(k) => k.slots.len(),
            State::Absence(k) => k.slots.len(),
        }
    }
}

/// The engine's state, to store across a collector restart (any serde
/// format). Restored into an engine whose rules have the same ids and shapes;
/// the state of a rule that is gone or changed shape is dropped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    pub watermark_ns: u64,
    pub stats: Stats,
    rules: Vec<RuleSnapshot>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RuleSnapshot {
    id: String,
    shape: String,
    state: State,
}

const SNAPSHOT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("snapshot format {found}; this engine reads format {SNAPSHOT_VERSION}")]
    Version { found: u32 },
}

/// What a restore kept and dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    pub rules: usize,
    /// Ids of rules whose state was dropped (gone, or changed shape).
    pub dropped: Vec<String>,
}

pub struct Engine {
    rules: Vec<Rule>,
    caps: Vec<usize>,
    by_kind: Vec<Vec<Target>>,
    states: Vec<State>,
    config: Config,
    watermark_ns: u64,
    /// After a restore: the first clock time seen, so absence waits a full
    /// span for entities that could not report while the collector was down.
    resumed_ns: Option<u64>,
    restored: bool,
    stats: Stats,
}

impl Engine {
    pub fn new(rules: Vec<Rule>) -> Self {
        Self::with_config(rules, Config::default())
    }

    pub fn with_config(rules: Vec<Rule>, config: Config) -> Self {
        let mut by_kind = vec![Vec::new(); Kind::COUNT];
        for (r, rule) in rules.iter().enumerate() {
            let mut add = |kinds: &[Kind], step: usize| {
                for kind in kinds {
                    by_kind[kind.index()].push(Target {
                        rule: r as u32,
                        step: step as u32,
                    });
                }
            };
            match &rule.logic {
                Logic::Match(m) => add(&m.kinds, 0),
                Logic::Sequence(s) => {
                    for (i, step) in s.steps.iter().enumerate() {
                        add(&step.matcher.kinds, i);
                    }
                }
                Logic::Threshold(t) => add(&t.matcher.kinds, 0),
                Logic::Absence(a) => add(&a.matcher.kinds, 0),
            }
        }
        // Single-event rules first: they are the hot path and need no state.
        for targets in &mut by_kind {
            targets.sort_by_key(|t| !matches!(rules[t.rule as usize].logic, Logic::Match(_)));
        }
        let caps = rules
            .iter()
            .map(|r| r.max_open.unwrap_or(config.max_open))
            .collect();
        let states = rules.iter().map(State::for_rule).collect();
        Self {
            rules,
            caps,
            by_kind,
            states,
            config,
            watermark_ns: 0,
            resumed_ns: None,
            restored: false,
            stats: Stats::default(),
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The newest event (or clock) time seen.
    pub fn watermark_ns(&self) -> u64 {
        self.watermark_ns
    }

    /// Open entities over all rules.
    pub fn open_state(&self) -> usize {
        self.states.iter().map(State::open).sum()
    }

    /// Feeds one event; returns the alerts it completes.
    pub fn process(&mut self, e: &Event) -> Vec<Alert> {
        let mut alerts = Vec::new();
        self.stats.events += 1;
        if self.watermark_ns == 0
            || e.time_ns <= self.watermark_ns.saturating_add(self.config.max_future_ns)
        {
            self.watermark_ns = self.watermark_ns.max(e.time_ns);
        } else {
            self.stats.future_skew += 1;
        }
        let late = e.time_ns.saturating_add(self.config.lateness_ns) < self.watermark_ns;
        let Engine {
            rules,
            caps,
            by_kind,
            states,
            config,
            stats,
            ..
        } = self;
        for target in &by_kind[e.kind.index()] {
            let r = target.rule as usize;
            let rule = &rules[r];
            match (&rule.logic, &mut states[r]) {
                (Logic::Match(m), _) if m.matches(e) => {
                    alerts.push(alert(
                        rule,
                        e,
                        entity_key(By::Process, e),
                        vec![EventRef::of(e)],
                    ));
                }
                (Logic::Sequence(s), State::Sequence(keyed)) => {
                    let step = target.step as usize;
                    if !s.steps[step].matcher.matches(e) {
                        continue;
                    }
                    if late {
                        stats.too_late += 1;
                        continue;
                    }
                    if let Some(a) = sequence_step(rule, s, step, e, keyed, caps[r], config, stats)
                    {
                        alerts.push(a);
                    }
                }
                (Logic::Threshold(t), State::Threshold(keyed)) => {
                    if !t.matcher.matches(e) {
                        continue;
                    }
                    if late {
                        stats.too_late += 1;
                        continue;
                    }
                    if let Some(a) = threshold_event(rule, t, e, keyed, caps[r], config, stats) {
                        alerts.push(a);
                    }
                }
                (Logic::Absence(a), State::Absence(keyed)) => {
                    if !a.matcher.matches(e) {
                        continue;
                    }
                    let slot = keyed.slot(entity_key(a.by, e), e, caps[r], &mut stats.evicted_open);
                    let newer = slot.state.last.is_none_or(|last| EventRef::of(e) > last);
                    if newer {
                        slot.state.last = Some(EventRef::of(e));
                        slot.state.alerted = false;
                    }
                }
                _ => {}
            }
        }
        self.stats.alerts += alerts.len() as u64;
        alerts
    }

    /// Moves the clock to `now_ns` (wall time, ns since the Unix epoch):
    /// fires absence rules and drops state that can no longer complete. Call
    /// it on a timer, e.g. every second.
    pub fn advance_to(&mut self, now_ns: u64) -> Vec<Alert> {
        let mut alerts = Vec::new();
        self.watermark_ns = self.watermark_ns.max(now_ns);
        if self.restored && self.resumed_ns.is_none() {
            self.resumed_ns = Some(now_ns);
        }
        let now = self.watermark_ns;
        let resumed = self.resumed_ns.unwrap_or(0);
        let lateness = self.config.lateness_ns;
        for (r, rule) in self.rules.iter().enumerate() {
            match (&rule.logic, &mut self.states[r]) {
                (Logic::Sequence(s), State::Sequence(keyed)) => {
                    let horizon = now.saturating_sub(lateness).saturating_sub(s.within_ns);
                    self.stats.expired += keyed.retain(|slot| {
                        for step in &mut slot.state.steps {
                            step.retain(|at| at.time_ns >= horizon);
                        }
                        slot.state.steps.iter().any(|s| !s.is_empty())
                    });
                }
                (Logic::Threshold(t), State::Threshold(keyed)) => {
                    let horizon = now.saturating_sub(lateness).saturating_sub(t.within_ns);
                    self.stats.expired += keyed.retain(|slot| {
                        slot.state.events.retain(|c| c.at.time_ns >= horizon);
                        !slot.state.events.is_empty()
                    });
                }
                (Logic::Absence(a), State::Absence(keyed)) => {
                    for (key, slot) in keyed.slots.iter_mut() {
                        let Some(last) = slot.state.last else {
                            continue;
                        };
                        if slot.state.alerted {
                            continue;
                        }
                        let since = last.time_ns.max(resumed);
                        if now > since.saturating_add(a.for_ns) {
                            slot.state.alerted = true;
                            alerts.push(Alert {
                                rule_id: rule.id.clone(),
                                title: rule.title.clone(),
                                severity: rule.severity,
                                mitre: rule.mitre.clone(),
                                org: slot.org.clone(),
                                host: slot.host.clone(),
                                entity: key.clone(),
                                first_ns: last.time_ns,
                                last_ns: last.time_ns,
                                events: vec![last],
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        alerts.sort_by(|a, b| (&a.rule_id, &a.entity).cmp(&(&b.rule_id, &b.entity)));
        self.stats.alerts += alerts.len() as u64;
        alerts
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: SNAPSHOT_VERSION,
            watermark_ns: self.watermark_ns,
            stats: self.stats.clone(),
            rules: self
                .rules
                .iter()
                .zip(&self.states)
                .filter(|(_, s)| !matches!(s, State::Stateless))
                .map(|(rule, state)| RuleSnapshot {
                    id: rule.id.clone(),
                    shape: rule.shape(),
                    state: state.clone(),
                })
                .collect(),
        }
    }

    /// Takes over a snapshot's state for the rules that still exist with the
    /// same shape. Absence rules wait a full span from the next
    /// [`advance_to`](Self::advance_to) before calling anyone silent.
    pub fn restore(&mut self, snapshot: Snapshot) -> Result<Restored, RestoreError> {
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(RestoreError::Version {
                found: snapshot.version,
            });
        }
        let mut report = Restored::default();
        for saved in snapshot.rules {
            let found = self
                .rules
                .iter()
                .position(|r| r.id == saved.id && r.shape() == saved.shape);
            match found {
                Some(r) => {
                    let mut state = saved.state;
                    if let (Logic::Sequence(s), State::Sequence(keyed)) =
                        (&self.rules[r].logic, &mut state)
                    {
                        // A snapshot from another build may carry step lists
                        // of another length only if the shape lied; be safe.
                        let n = s.steps.len();
                        keyed.retain(|slot| slot.state.steps.len() == n);
                    }
                    self.states[r] = state;
                    report.rules += 1;
                }
                None => report.dropped.push(saved.id),
            }
        }
        self.watermark_ns = self.watermark_ns.max(snapshot.watermark_ns);
        self.stats = snapshot.stats;
        self.restored = true;
        self.resumed_ns = None;
        Ok(report)
    }
}

fn alert(rule: &Rule, e: &Event, entity: String, mut events: Vec<EventRef>) -> Alert {
    events.sort();
    let first_ns = events.first().map_or(e.time_ns, |r| r.time_ns);
    let last_ns = events.last().map_or(e.time_ns, |r| r.time_ns);
    Alert {
        rule_id: rule.id.clone(),
        title: rule.title.clone(),
        severity: rule.severity,
        mitre: rule.mitre.clone(),
        org: e.org.clone(),
        host: e.host.clone(),
        entity,
        first_ns,
        last_ns,
        events,
    }
}

/// The key of the entity `by` names for this event.
pub fn entity_key(by: By, e: &Event) -> String {
    let (org, host) = (&e.org, &e.host);
    match by {
        By::Host => format!("{org}/{host}"),
        By::Process => format!("{org}/{host}/pid:{}@{}", e.pid, e.start_ns),
        By::ProcessTree => {
            let (pid, exe) = tree_root(e);
            format!("{org}/{host}/tree:{pid}:{exe}")
        }
        By::User => {
            if !e.user.is_empty() {
                format!("{org}/user:{}", e.user)
            } else if let Some(uid) = e.uid {
                format!("{org}/{host}/uid:{uid}")
            } else {
                format!("{org}/{host}/user:?")
            }
        }
    }
}

/// The pid and program of the process tree's root: the topmost ancestor
/// below pid 1 (the ancestry runs parent first, up to pid 1), or the process
/// itself when it has no ancestor below pid 1.
pub(crate) fn tree_root(e: &Event) -> (u32, &str) {
    match e.ancestry.iter().rev().find(|a| a.pid > 1) {
        Some(root) => (root.pid, &root.exe),
        None => (e.pid, &e.exe),
    }
}

fn join_value(v: Value<'_>) -> Option<String> {
    match v {
        Value::Str(s) if !s.is_empty() => Some(s.to_owned()),
        Value::Int(i) => Some(i.to_string()),
        Value::Ip(ip) => Some(ip.to_string()),
        _ => None,
    }
}

/// Inserts in (time, id) order; false if the event is already there (a
/// batch sent again).
fn insert_sorted(list: &mut Vec<EventRef>, at: EventRef) -> bool {
    match list.binary_search(&at) {
        Ok(_) => false,
        Err(i) => {
            list.insert(i, at);
            true
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn sequence_step(
    rule: &Rule,
    s: &Sequence,
    step: usize,
    e: &Event,
    keyed: &mut Keyed<SeqState>,
    cap: usize,
    config: &Config,
    stats: &mut Stats,
) -> Option<Alert> {
    let mut key = entity_key(s.by, e);
    if let Some(join) = s.steps[step].join {
        key.push('|');
        key.push_str(&join_value(e.field(&join))?);
    }
    let slot = keyed.slot(key.clone(), e, cap, &mut stats.evicted_open);
    let steps = &mut slot.state.steps;
    if steps.len() != s.steps.len() {
        *steps = vec![Vec::new(); s.steps.len()];
    }
    if !insert_sorted(&mut steps[step], EventRef::of(e)) {
        stats.duplicates += 1;
        return None;
    }
    if steps[step].len() > config.max_events.max(1) {
        steps[step].remove(0);
        stats.evicted_events += 1;
    }
    let chain = find_chain(steps, s.within_ns)?;
    let events: Vec<EventRef> = chain
        .iter()
        .enumerate()
        .map(|(i, &j)| steps[i][j])
        .collect();
    for (i, &j) in chain.iter().enumerate() {
        steps[i].remove(j);
    }
    if steps.iter().all(Vec::is_empty) {
        keyed.remove(&key);
    }
    Some(alert(rule, e, key, events))
}

/// Indexes, one per step, of events in strictly increasing (time, id) order
/// spanning at most `within_ns`: for each first event, the earliest
/// continuation (which ends soonest).
fn find_chain(steps: &[Vec<EventRef>], within_ns: u64) -> Option<Vec<usize>> {
    if steps.iter().any(Vec::is_empty) {
        return None;
    }
    let mut chain = Vec::with_capacity(steps.len());
    'start: for (i0, first) in steps[0].iter().enumerate() {
        chain.clear();
        chain.push(i0);
        let mut previous = *first;
        for list in &steps[1..] {
            let j = list.partition_point(|at| *at <= previous);
            let Some(next) = list.get(j) else {
                // Later starts are later still: nothing completes.
                return None;
            };
            if next.time_ns - first.time_ns > within_ns {
                continue 'start;
            }
            chain.push(j);
            previous = *next;
        }
        return Some(chain);
    }
    None
}

fn threshold_event(
    rule: &Rule,
    t: &Threshold,
    e: &Event,
    keyed: &mut Keyed<ThrState>,
    cap: usize,
    config: &Config,
    stats: &mut Stats,
) -> Option<Alert> {
    let key = entity_key(t.by, e);
    let counted = Counted {
        at: EventRef::of(e),
        distinct: (!t.distinct.is_empty()).then(|| distinct_hash(e, &t.distinct)),
    };
    let slot = keyed.slot(key.clone(), e, cap, &mut stats.evicted_open);
    let events = &mut slot.state.events;
    let pos = match events.binary_search_by(|c| c.at.cmp(&counted.at)) {
        Ok(_) => {
            stats.duplicates += 1;
            return None;
        }
        Err(i) => i,
    };
    events.insert(pos, counted);
    let mut pos = pos;
    let limit = config.max_events.max(t.count as usize * 4);
    if events.len() > limit {
        events.remove(0);
        stats.evicted_events += 1;
        pos = pos.checked_sub(1)?;
    }
    let (start, end) = window_with(events, pos, t.within_ns, t.count)?;
    let refs: Vec<EventRef> = events[start..end].iter().map(|c| c.at).collect();
    events.drain(start..end);
    if events.is_empty() {
        keyed.remove(&key);
    }
    Some(alert(rule, e, key, refs))
}

/// A window `[start, end)` of at most `within_ns` that holds `pos` and at
/// least `count` events (or distinct values).
fn window_with(
    events: &[Counted],
    pos: usize,
    within_ns: u64,
    count: u32,
) -> Option<(usize, usize)> {
    let t = events[pos].at.time_ns;
    let lo = events.partition_point(|c| c.at.time_ns < t.saturating_sub(within_ns));
    let hi = events.partition_point(|c| c.at.time_ns <= t.saturating_add(within_ns));
    let count = count as usize;
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let mut end = lo;
    for start in lo..=pos {
        let limit = events[start].at.time_ns.saturating_add(within_ns);
        while end < hi && events[end].at.time_ns <= limit {
            if let Some(d) = events[end].distinct {
                *seen.entry(d).or_insert(0) += 1;
            }
            end += 1;
        }
        if end > pos {
            let n = if events[start].distinct.is_some() {
                seen.len()
            } else {
                end - start
            };
            if n >= count {
                return Some((start, end));
            }
        }
        if let Some(d) = events[start].distinct {
            if let Some(c) = seen.get_mut(&d) {
                *c -= 1;
                if *c == 0 {
                    seen.remove(&d);
                }
            }
        }
    }
    None
}

/// FNV-1a over the fields' values: stable across builds, so snapshots
/// stay valid.
fn distinct_hash(e: &Event, fields: &[FieldRef]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for f in fields {
        match e.field(f) {
            Value::Str(s) => {
                eat(b"s");
                eat(s.as_bytes());
            }
            Value::Int(i) => {
                eat(b"i");
                eat(&i.to_le_bytes());
            }
            Value::Ip(ip) => {
                eat(b"a");
                eat(ip.to_string().as_bytes());
            }
            Value::List(list) => {
                eat(b"l");
                for s in list.iter() {
                    eat(s.as_bytes());
                    eat(&[0]);
                }
            }
            Value::None => eat(b"n"),
        }
        eat(&[0xff]);
    }
    h
}

/// A fixture case that did not do what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixtureFailure {
    pub rule_id: String,
    pub position: Position,
    pub expected_match: bool,
    pub alerts: usize,
}

impl fmt::Display for FixtureFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.expected_match {
            write!(
                f,
                "{}: rule `{}`: this `match` fixture raised no alert",
                self.position, self.rule_id
            )
        } else {
            write!(
                f,
                "{}: rule `{}`: this `no_match` fixture raised {} alert(s)",
                self.position, self.rule_id, self.alerts
            )
        }
    }
}

/// Runs each of the rule's fixtures through a fresh engine holding only
/// that rule.
pub fn check_fixtures(rule: &Rule) -> Vec<FixtureFailure> {
    let mut failures = Vec::new();
    for fixture in &rule.fixtures {
        let mut engine = Engine::new(vec![rule.clone()]);
        let mut alerts = 0;
        for step in &fixture.steps {
            alerts += match step {
                FixtureStep::Event(e) => engine.process(e).len(),
                FixtureStep::Advance(t) => engine.advance_to(*t).len(),
            };
        }
        if (alerts > 0) != fixture.expect_match {
            failures.push(FixtureFailure {
                rule_id: rule.id.clone(),
                position: fixture.position,
                expected_match: fixture.expect_match,
                alerts,
            });
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: u64, id: u64) -> EventRef {
        EventRef { time_ns: t, id }
    }

    #[test]
    fn chain_takes_the_tightest_fit() {
        let steps = vec![
            vec![at(0, 1), at(50, 4)],
            vec![at(10, 2), at(55, 5)],
            vec![at(60, 6)],
        ];
        // From 0 the chain ends at 60 (span 60); from 50 it spans 10.
        assert_eq!(find_chain(&steps, 20), Some(vec![1, 1, 0]));
        assert_eq!(find_chain(&steps, 60), Some(vec![0, 0, 0]));
        assert_eq!(find_chain(&steps, 5), None);
    }

    #[test]
    fn chain_needs_order() {
        let steps = vec![vec![at(10, 2)], vec![at(5, 1)]];
        assert_eq!(find_chain(&steps, 100), None);
        let same_time = vec![vec![at(10, 1)], vec![at(10, 2)]];
        assert_eq!(find_chain(&same_time, 100), Some(vec![0, 0]));
    }
}
