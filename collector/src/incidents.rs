//! Incidents in ClickHouse: `zt.incidents` holds every version of an
//! incident (a `ReplacingMergeTree` versioned by `updated_ns`: the newest
//! version is the incident, `FINAL` reads it), `zt.incident_events` links
//! incidents to the events of their alerts.
//!
//! The detection task ([`crate::detection`]) writes both as alerts arrive;
//! the query API ([`crate::query`]) reads them and writes the lifecycle's
//! versions (acknowledged, resolved).

use detect::{Incident, IncidentStatus, Severity};
use serde::{Deserialize, Serialize};

use crate::storage::{Storage, StorageError, TableRow};

/// One version of an incident.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct IncidentRow {
    pub org_id: String,
    pub incident_id: String,
    /// First seen, seconds (`DateTime`, the partition).
    pub opened: u32,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// The version: newer rows of an incident replace older ones.
    pub updated_ns: u64,
    pub rule_id: String,
    pub title: String,
    pub rule_severity: String,
    pub severity: String,
    pub escalation: String,
    pub mitre: Vec<String>,
    pub hostname: String,
    pub process_tree_root: String,
    pub spread_hosts: Vec<String>,
    /// `open`, `acknowledged` or `resolved`.
    pub status: String,
    pub count: u64,
    pub acknowledged_by: String,
    pub acknowledged_ns: u64,
    pub resolved_by: String,
    pub resolved_ns: u64,
    pub note: String,
}

impl TableRow for IncidentRow {
    const TABLE: &'static str = "incidents";
}

/// An event of an incident's alerts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct IncidentEventRow {
    pub org_id: String,
    pub incident_id: String,
    /// The event's time, seconds (`DateTime`, the partition).
    pub time: u32,
    pub event_time_ns: u64,
    /// The engine's id of the event: `seq × 8 + table`
    /// ([`crate::detection::events::event_id`]).
    pub event_id: u64,
    pub hostname: String,
}

impl TableRow for IncidentEventRow {
    const TABLE: &'static str = "incident_events";
}

/// The columns of [`IncidentRow`], in order, for SELECTs.
pub const INCIDENT_COLUMNS: &str = "org_id, incident_id, opened, first_seen_ns, last_seen_ns, \
     updated_ns, rule_id, title, rule_severity, severity, escalation, mitre, hostname, \
     process_tree_root, spread_hosts, status, count, acknowledged_by, acknowledged_ns, \
     resolved_by, resolved_ns, note";

/// A stored incident that does not read back.
#[derive(Debug, thiserror::Error)]
pub enum IncidentError {
    #[error("incident {id}: unknown {what} {value:?}")]
    Corrupt {
        id: String,
        what: &'static str,
        value: String,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub fn severity_from_name(name: &str) -> Option<Severity> {
    [
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ]
    .into_iter()
    .find(|s| s.name() == name)
}

impl IncidentRow {
    pub fn of(incident: &Incident) -> IncidentRow {
        IncidentRow {
            org_id: incident.org.clone(),
            incident_id: incident.id.clone(),
            opened: seconds(incident.first_ns),
            first_seen_ns: incident.first_ns,
            last_seen_ns: incident.last_ns,
            updated_ns: incident.updated_ns,
            rule_id: incident.rule_id.clone(),
            title: incident.title.clone(),
            rule_severity: incident.rule_severity.name().to_owned(),
            severity: incident.severity.name().to_owned(),
            escalation: incident.escalation.clone(),
            mitre: incident.mitre.clone(),
            hostname: incident.host.clone(),
            process_tree_root: incident.tree_root.clone(),
            spread_hosts: incident.spread_hosts.clone(),
            status: incident.status.as_str().to_owned(),
            count: incident.count,
            acknowledged_by: incident.acknowledged_by.clone(),
            acknowledged_ns: incident.acknowledged_ns,
            resolved_by: incident.resolved_by.clone(),
            resolved_ns: incident.resolved_ns,
            note: incident.note.clone(),
        }
    }

    /// Back to the engine's incident (for the lifecycle of an incident the
    /// detection task no longer holds).
    pub fn to_incident(&self) -> Result<Incident, IncidentError> {
        let corrupt = |what, value: &str| IncidentError::Corrupt {
            id: self.incident_id.clone(),
            what,
            value: value.to_owned(),
        };
        Ok(Incident {
            id: self.incident_id.clone(),
            org: self.org_id.clone(),
            host: self.hostname.clone(),
            rule_id: self.rule_id.clone(),
            title: self.title.clone(),
            rule_severity: severity_from_name(&self.rule_severity)
                .ok_or_else(|| corrupt("severity", &self.rule_severity))?,
            severity: severity_from_name(&self.severity)
                .ok_or_else(|| corrupt("severity", &self.severity))?,
            escalation: self.escalation.clone(),
            mitre: self.mitre.clone(),
            tree_root: self.process_tree_root.clone(),
            status: IncidentStatus::from_name(&self.status)
                .ok_or_else(|| corrupt("status", &self.status))?,
            first_ns: self.first_seen_ns,
            last_ns: self.last_seen_ns,
            count: self.count,
            spread_hosts: self.spread_hosts.clone(),
            acknowledged_by: self.acknowledged_by.clone(),
            acknowledged_ns: self.acknowledged_ns,
            resolved_by: self.resolved_by.clone(),
            resolved_ns: self.resolved_ns,
            note: self.note.clone(),
            updated_ns: self.updated_ns,
        })
    }
}

/// Seconds of a nanosecond time, as a `DateTime` column takes them.
pub fn seconds(ns: u64) -> u32 {
    u32::try_from(ns / 1_000_000_000).unwrap_or(u32::MAX)
}

/// The current version of incident `id`, if it is in `scope`.
pub async fn find(
    storage: &Storage,
    scope: &crate::query::Scope,
    id: &str,
) -> Result<Option<IncidentRow>, StorageError> {
    let sql = format!(
        "SELECT {INCIDENT_COLUMNS} FROM incidents FINAL \
         WHERE (? = 1 OR has(?, org_id)) AND incident_id = ? LIMIT 1"
    );
    let (all, orgs) = scope.binds();
    storage
        .client()
        .query(&sql)
        .bind(all)
        .bind(orgs)
        .bind(id)
        .fetch_optional::<IncidentRow>()
        .await
        .map_err(|e| StorageError::clickhouse("reading an incident", e))
}

/// The incidents not yet resolved and those seen since `since_ns`: what
/// the detection task holds to group new alerts into.
pub async fn recent(storage: &Storage, since_ns: u64) -> Result<Vec<IncidentRow>, StorageError> {
    let sql = format!(
        "SELECT {INCIDENT_COLUMNS} FROM incidents FINAL \
         WHERE status != 'resolved' OR last_seen_ns >= ?"
    );
    storage
        .client()
        .query(&sql)
        .bind(since_ns)
        .fetch_all::<IncidentRow>()
        .await
        .map_err(|e| StorageError::clickhouse("reading recent incidents", e))
}
