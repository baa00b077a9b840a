//! Detection on the live stream: the rule engine ([`detect::Engine`]) and
//! the incident book ([`detect::Incidents`]) in one task, fed by ingest and
//! heartbeats.
//!
//! Ingest converts each batch's rows to engine events ([`events`]) and,
//! once ClickHouse has stored the rows, hands them to the task through a
//! bounded channel (a full channel holds ingest back; nothing is dropped).
//! The task runs every event through the engine and groups the alerts into
//! incidents; a writer task beside it writes the incidents that changed,
//! with the links to their events, as soon as there are any — whatever
//! queued up during a write goes in the next one, newest version per
//! incident, so a burst of alerts costs a few writes, not one per batch.
//! Once a second the engine's clock moves to the wall clock (for absence
//! rules) and incidents past the grouping window are forgotten; writes
//! ClickHouse refused are retried every second (kept in memory meanwhile).
//!
//! The engine's state (open sequences, threshold windows, silent agents)
//! is saved to `<state_dir>/detection/engine.json` every
//! `snapshot_interval_secs` and when the collector stops, and restored at
//! start, so a sequence that spans a restart still completes. The
//! incidents to group into are read back from ClickHouse at start.
//!
//! One collector sees the agents streaming to it: with several collectors,
//! an agent's events go to one at a time, and the rules' entities are
//! hosts, so each sequence is seen whole by one of them.

pub mod events;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use detect::{
    Alert, Changes, Config as EngineConfig, Engine, Event, Incident, IncidentAction,
    IncidentConfig, Incidents, Rule, Snapshot, TransitionError,
};
use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, error, info, warn};

use crate::{
    config::DetectionConfig,
    incidents::{IncidentEventRow, IncidentRow},
    metrics::Metrics,
    storage::{Storage, StorageError},
};

/// Batches of events queued for the task before ingest waits.
const QUEUE_BATCHES: usize = 1024;
const TICK: Duration = Duration::from_secs(1);
/// Event links kept in memory while ClickHouse refuses them; beyond this
/// the oldest are dropped (counted), the incidents themselves never.
const MAX_PENDING_LINKS: usize = 200_000;
const SNAPSHOT_FILE: &str = "engine.json";

/// Why detection could not start.
#[derive(Debug, thiserror::Error)]
pub enum DetectionError {
    #[error("detection rules: {0}")]
    Rules(#[from] detect::PackError),
    #[error("cannot read detection rules in {dir}: {source}")]
    RulesDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("no detection rules: the default pack is off and {0} has no .yaml file")]
    NoRules(String),
}

/// Loads the default pack (unless turned off) and the `.yaml` files of the
/// rules directory, ids unique across all of them.
pub fn load_rules(config: &DetectionConfig) -> Result<Vec<Rule>, DetectionError> {
    let mut files: Vec<(String, String)> = Vec::new();
    if config.default_rules {
        files.extend(
            detect::DEFAULT_PACK
                .iter()
                .map(|(name, text)| (format!("default/{name}"), (*text).to_owned())),
        );
    }
    if let Some(dir) = &config.rules_dir {
        let read_error = |source| DetectionError::RulesDir {
            dir: dir.clone(),
            source,
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read_error)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).map_err(read_error)?;
            files.push((path.display().to_string(), text));
        }
    }
    if files.is_empty() {
        return Err(DetectionError::NoRules(
            config.rules_dir.as_ref().map_or_else(
                || "rules_dir (unset)".to_owned(),
                |d| d.display().to_string(),
            ),
        ));
    }
    Ok(detect::load_pack(
        files.iter().map(|(n, t)| (n.as_str(), t.as_str())),
    )?)
}

/// Where ingest and heartbeats send events; does nothing when detection
/// is off.
#[derive(Debug, Clone, Default)]
pub struct DetectionHandle {
    tx: Option<mpsc::Sender<Vec<Event>>>,
}

impl DetectionHandle {
    /// A handle that drops everything (detection off).
    pub fn disabled() -> DetectionHandle {
        DetectionHandle { tx: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues stored events for detection; waits while the queue is full.
    pub async fn feed(&self, events: Vec<Event>) {
        let Some(tx) = &self.tx else { return };
        if events.is_empty() {
            return;
        }
        if tx.send(events).await.is_err() {
            debug!("detection task gone; events not analysed");
        }
    }
}

/// What a lifecycle change can come to.
#[derive(Debug, thiserror::Error)]
pub enum TransitionFailure {
    #[error(transparent)]
    Refused(#[from] TransitionError),
    /// Applied, but not stored yet: written when ClickHouse is back.
    #[error("the change is kept and will be stored when ClickHouse is back: {0}")]
    NotStored(StorageError),
}

/// Incident rows and links ClickHouse has not taken yet.
#[derive(Debug, Default)]
struct Pending {
    /// Newest version per (org, id).
    incidents: BTreeMap<(String, String), IncidentRow>,
    links: Vec<IncidentEventRow>,
}

impl Pending {
    fn add(&mut self, rows: Vec<IncidentRow>, links: Vec<IncidentEventRow>, metrics: &Metrics) {
        for row in rows {
            let key = (row.org_id.clone(), row.incident_id.clone());
            match self.incidents.get(&key) {
                Some(held) if held.updated_ns >= row.updated_ns => {}
                _ => {
                    self.incidents.insert(key, row);
                }
            }
        }
        self.links.extend(links);
        if self.links.len() > MAX_PENDING_LINKS {
            let excess = self.links.len() - MAX_PENDING_LINKS;
            self.links.drain(..excess);
            Metrics::add(&metrics.incident_links_dropped, excess as u64);
            warn!(
                dropped = excess,
                "ClickHouse keeps refusing incident links; dropped the oldest"
            );
        }
    }

    fn is_empty(&self) -> bool {
        self.incidents.is_empty() && self.links.is_empty()
    }
}

/// The incidents the detection task groups alerts into, shared with the
/// query API for the lifecycle, and their way to ClickHouse.
pub struct IncidentBook {
    incidents: Mutex<Incidents>,
    pending: Mutex<Pending>,
    /// One writer at a time, so versions reach ClickHouse in order.
    writing: tokio::sync::Mutex<()>,
    /// Tells the writer task there is something to write.
    wake: tokio::sync::Notify,
    storage: Storage,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for IncidentBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncidentBook").finish_non_exhaustive()
    }
}

impl IncidentBook {
    fn new(config: IncidentConfig, storage: Storage, metrics: Arc<Metrics>) -> IncidentBook {
        IncidentBook {
            incidents: Mutex::new(Incidents::new(config)),
            pending: Mutex::new(Pending::default()),
            writing: tokio::sync::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            storage,
            metrics,
        }
    }

    fn incidents(&self) -> MutexGuard<'_, Incidents> {
        self.incidents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the rows of `changes` for the writer task.
    fn queue(&self, changes: Changes) {
        if changes.is_empty() {
            return;
        }
        self.add_pending(changes);
        self.wake.notify_one();
    }

    /// Queues the rows of `changes` and writes everything queued.
    async fn store(&self, changes: Changes) -> Result<(), StorageError> {
        self.add_pending(changes);
        self.flush().await
    }

    fn add_pending(&self, changes: Changes) {
        let rows: Vec<IncidentRow> = changes.incidents.iter().map(IncidentRow::of).collect();
        let links: Vec<IncidentEventRow> = changes
            .links
            .iter()
            .flat_map(|linked| {
                linked.events.iter().map(|event| IncidentEventRow {
                    org_id: linked.org.clone(),
                    incident_id: linked.incident_id.clone(),
                    time: crate::incidents::seconds(event.time_ns),
                    event_time_ns: event.time_ns,
                    event_id: event.id,
                    hostname: linked.host.clone(),
                })
            })
            .collect();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(rows, links, &self.metrics);
    }

    /// Writes the queued rows; on failure they stay queued.
    async fn flush(&self) -> Result<(), StorageError> {
        let _writer = self.writing.lock().await;
        let Pending { incidents, links } =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if incidents.is_empty() && links.is_empty() {
            return Ok(());
        }
        let rows: Vec<IncidentRow> = incidents.into_values().collect();
        // The links first: an incident must not show up before its events
        // (links alone are invisible; stored twice, they fold into one).
        let mut result = Ok(());
        if !links.is_empty() {
            result = self.storage.insert(&links).await;
        }
        let stored_links = result.is_ok();
        if stored_links && !rows.is_empty() {
            result = self.storage.insert(&rows).await;
        }
        match result {
            Ok(()) => {
                Metrics::add(&self.metrics.incident_versions_stored, rows.len() as u64);
                Ok(())
            }
            Err(e) => {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                let links = if stored_links { Vec::new() } else { links };
                pending.add(rows, links, &self.metrics);
                Err(e)
            }
        }
    }

    fn has_pending(&self) -> bool {
        !self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Acknowledges or resolves `stored` (as read from ClickHouse; the
    /// task's own copy when it holds a newer one), writes the new version
    /// and returns it.
    pub async fn transition(
        &self,
        stored: Incident,
        action: IncidentAction,
        by: &str,
        note: &str,
    ) -> Result<Incident, TransitionFailure> {
        let changed = {
            let mut incidents = self.incidents();
            let current = match incidents.get(&stored.id) {
                Some(held) if held.updated_ns >= stored.updated_ns && held.org == stored.org => {
                    held.clone()
                }
                _ => stored,
            };
            incidents.transition(&current, action, by, note, now_ns())?
        };
        let changes = Changes {
            incidents: vec![changed.clone()],
            links: Vec::new(),
        };
        self.store(changes)
            .await
            .map_err(TransitionFailure::NotStored)?;
        Ok(changed)
    }
}

/// Detection, started: feed it through [`Detection::handle`].
#[derive(Debug)]
pub struct Detection {
    handle: DetectionHandle,
    book: Option<Arc<IncidentBook>>,
    task: Option<JoinHandle<()>>,
}

impl Detection {
    /// Detection turned off: events are not analysed, no incident is raised.
    pub fn disabled() -> Detection {
        Detection {
            handle: DetectionHandle::disabled(),
            book: None,
            task: None,
        }
    }

    /// Loads the rules, restores the engine's state from `state_dir`, reads
    /// back the incidents to group into, and starts the task.
    pub async fn start(
        config: &DetectionConfig,
        state_dir: &Path,
        storage: Storage,
        metrics: Arc<Metrics>,
    ) -> Result<Detection, DetectionError> {
        if !config.enabled {
            info!("detection is off ([detection] enabled = false)");
            return Ok(Detection::disabled());
        }
        let rules = load_rules(config)?;
        let rule_count = rules.len();
        let mut engine = Engine::with_config(
            rules,
            EngineConfig {
                lateness_ns: config.lateness_secs * 1_000_000_000,
                ..EngineConfig::default()
            },
        );
        let dir = state_dir.join("detection");
        let snapshot_path = dir.join(SNAPSHOT_FILE);
        restore(&mut engine, &snapshot_path);

        let incident_config = IncidentConfig {
            window_ns: config.group_window_secs * 1_000_000_000,
            repeat_escalation: config.repeat_escalation,
            spread_hosts: config.spread_hosts,
            ..IncidentConfig::default()
        };
        let window_ns = incident_config.window_ns;
        let book = Arc::new(IncidentBook::new(
            incident_config,
            storage.clone(),
            metrics.clone(),
        ));
        match crate::incidents::recent(&storage, now_ns().saturating_sub(window_ns)).await {
            Ok(rows) => {
                let mut incidents = book.incidents();
                let mut loaded = 0;
                for row in rows {
                    match row.to_incident() {
                        Ok(incident) => {
                            incidents.load(incident);
                            loaded += 1;
                        }
                        Err(e) => warn!(error = %e, "stored incident skipped"),
                    }
                }
                info!(loaded, "incidents to group new alerts into");
            }
            Err(e) => warn!(
                error = %e,
                "could not read back recent incidents; new alerts open new incidents"
            ),
        }

        let (tx, rx) = mpsc::channel(QUEUE_BATCHES);
        let task = tokio::spawn(run(
            engine,
            book.clone(),
            rx,
            dir,
            Duration::from_secs(config.snapshot_interval_secs.max(1)),
            metrics,
        ));
        info!(rules = rule_count, "detection running");
        Ok(Detection {
            handle: DetectionHandle { tx: Some(tx) },
            book: Some(book),
            task: Some(task),
        })
    }

    pub fn handle(&self) -> DetectionHandle {
        self.handle.clone()
    }

    /// The incident book, for the lifecycle; `None` when detection is off.
    pub fn book(&self) -> Option<Arc<IncidentBook>> {
        self.book.clone()
    }

    /// Waits (at most `grace`) for the task to analyse what is queued, write
    /// its incidents and save the engine's state. Ingest must have stopped:
    /// the task ends when every handle is gone.
    pub async fn shutdown(mut self, grace: Duration) -> bool {
        self.handle = DetectionHandle::disabled();
        let Some(mut task) = self.task.take() else {
            return true;
        };
        match tokio::time::timeout(grace, &mut task).await {
            Ok(_) => true,
            Err(_) => {
                task.abort();
                false
            }
        }
    }
}

/// The saved state: the engine's, with the rules it was taken under.
#[derive(Serialize, Deserialize)]
struct SavedState {
    saved_ns: u64,
    engine: Snapshot,
}

fn restore(engine: &mut Engine, path: &Path) {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the detection state; starting empty");
            return;
        }
    };
    let saved: SavedState = match serde_json::from_slice(&text) {
        Ok(saved) => saved,
        Err(e) => {
            let aside = path.with_extension("json.corrupt");
            let _ = std::fs::rename(path, &aside);
            warn!(path = %path.display(), moved_to = %aside.display(), error = %e,
                "detection state unreadable; starting empty");
            return;
        }
    };
    match engine.restore(saved.engine) {
        Ok(restored) => info!(
            rules = restored.rules,
            dropped = ?restored.dropped,
            "detection state restored"
        ),
        Err(e) => warn!(error = %e, "detection state not restored; starting empty"),
    }
}

fn save(engine: &Engine, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let saved = SavedState {
        saved_ns: now_ns(),
        engine: engine.snapshot(),
    };
    let bytes = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))
}

/// Runs `alerts` through the book.
fn group(book: &IncidentBook, alerts: Vec<(Alert, String)>, now: u64) -> Changes {
    let mut all = Changes::default();
    if alerts.is_empty() {
        return all;
    }
    let mut incidents = book.incidents();
    for (alert, root) in alerts {
        let changes = incidents.on_alert(&alert, &root, now);
        all.merge(changes);
    }
    all
}

async fn run(
    mut engine: Engine,
    book: Arc<IncidentBook>,
    mut rx: mpsc::Receiver<Vec<Event>>,
    dir: PathBuf,
    snapshot_every: Duration,
    metrics: Arc<Metrics>,
) {
    // Incidents are written beside the engine, not in its loop: a write
    // takes one or two INSERT round trips, and meanwhile the engine goes
    // on; whatever queued up meanwhile goes in the next write, newest
    // version per incident.
    let (stop_writer, stopped) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(write_incidents(book.clone(), stopped));
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut saved_at = Instant::now();
    let mut dirty = false;
    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(events) = batch else { break };
                let mut alerts = Vec::new();
                for event in &events {
                    for alert in engine.process(event) {
                        let root = engine
                            .rules()
                            .iter()
                            .find(|r| r.id == alert.rule_id)
                            .map(|rule| detect::alert_tree_root(rule, event))
                            .unwrap_or_default();
                        alerts.push((alert, root));
                    }
                }
                Metrics::add(&metrics.detection_events, events.len() as u64);
                dirty = true;
                if !alerts.is_empty() {
                    Metrics::add(&metrics.alerts_raised, alerts.len() as u64);
                    book.queue(group(&book, alerts, now_ns()));
                }
            }
            _ = ticks.tick() => {
                let now = now_ns();
                let alerts: Vec<(Alert, String)> = engine
                    .advance_to(now)
                    .into_iter()
                    .map(|alert| (alert, String::new()))
                    .collect();
                if !alerts.is_empty() {
                    Metrics::add(&metrics.alerts_raised, alerts.len() as u64);
                    dirty = true;
                }
                book.queue(group(&book, alerts, now));
                book.incidents().expire(now);
                if dirty && saved_at.elapsed() >= snapshot_every {
                    if let Err(e) = save(&engine, &dir) {
                        error!(dir = %dir.display(), error = %e, "cannot save the detection state");
                    }
                    saved_at = Instant::now();
                    dirty = false;
                }
            }
        }
    }
    // Every sender is gone: ingest has stopped. Keep what we know.
    let _ = stop_writer.send(true);
    let _ = writer.await;
    if let Err(e) = book.flush().await {
        warn!(error = %e, "incidents left unstored at shutdown");
    }
    match save(&engine, &dir) {
        Ok(()) => info!(dir = %dir.display(), "detection state saved"),
        Err(e) => error!(dir = %dir.display(), error = %e, "cannot save the detection state"),
    }
}

/// The writer task: writes what is queued when told, and retries every
/// [`TICK`] while ClickHouse refuses; ends (after its current write) when
/// `stop` turns true.
async fn write_incidents(book: Arc<IncidentBook>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = book.wake.notified(), if !failing => {}
            () = tokio::time::sleep(TICK) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        if !book.has_pending() {
            failing = false;
            continue;
        }
        match book.flush().await {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    warn!(error = %e, "incidents not stored yet; retrying every second");
                }
                failing = true;
            }
        }
    }
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
