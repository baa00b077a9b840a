//! The reads behind the query API: checked filters → SQL with bound values
//! → wire messages.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use clickhouse::Row;
use proto::query::{
    Agent, AuditEntry, AuditList, Event as WireEvent, EventList, FleetList,
    Incident as WireIncident, IncidentChange, IncidentDetail, IncidentList, Kpi,
    ListIncidentsRequest, ProcessNode, SearchEventsRequest, Trend, TrendDay,
};
use serde::{de::DeserializeOwned, Deserialize};
use zt_identity::SpiffeId;

use super::{
    severity_counts, QueryError, Scope, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MAX_TEXT_FILTER,
};
use crate::{
    control_plane::ControlPlane,
    detection::events::{split_event_id, EventTable},
    fleet::ConnectedDevices,
    incidents::{IncidentRow, INCIDENT_COLUMNS},
    storage::{
        DecisionRow, DnsEventRow, FileEventRow, NetworkEventRow, ProcessEventRow, Storage,
        StorageError,
    },
};

const NS: u64 = 1_000_000_000;
/// Search without `since`: this far back from `until`.
const DEFAULT_SEARCH_SPAN_NS: u64 = 24 * 3600 * NS;
/// Events of an incident shown at most.
const MAX_INCIDENT_EVENTS: u64 = 1000;
/// The process tree and network timeline look this far around the incident.
const TREE_LOOKBACK_NS: u64 = 3600 * NS;
const TIMELINE_MARGIN_NS: u64 = 60 * NS;
const MAX_TREE_ROWS: u64 = 2000;
const MAX_TIMELINE_ROWS: u64 = 500;

pub const STATUSES: [&str; 3] = ["open", "acknowledged", "resolved"];
pub const SEVERITIES: [&str; 4] = ["low", "medium", "high", "critical"];

/// RFC 3339 in UTC with nanoseconds.
pub fn rfc3339(ns: u64) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// `rfc3339` of `ns`, or empty for 0 (unknown, never).
fn rfc3339_or_empty(ns: u64) -> String {
    if ns == 0 {
        String::new()
    } else {
        rfc3339(ns)
    }
}

/// An RFC 3339 time of a request, in nanoseconds since the epoch.
pub fn parse_time(field: &str, text: &str) -> Result<u64, QueryError> {
    use time::format_description::well_known::Rfc3339;
    let t = time::OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
        QueryError::bad(format!(
            "{field}: {text:?} is not an RFC 3339 time (2026-11-24T09:00:00Z): {e}"
        ))
    })?;
    u64::try_from(t.unix_timestamp_nanos())
        .map_err(|_| QueryError::bad(format!("{field}: {text:?} is before 1970")))
}

fn optional_time(field: &str, text: &str) -> Result<Option<u64>, QueryError> {
    if text.is_empty() {
        Ok(None)
    } else {
        parse_time(field, text).map(Some)
    }
}

fn page_size_of(requested: u32) -> Result<u64, QueryError> {
    match requested {
        0 => Ok(u64::from(DEFAULT_PAGE_SIZE)),
        n if n > MAX_PAGE_SIZE => Err(QueryError::bad(format!(
            "page_size {n} is above {MAX_PAGE_SIZE}"
        ))),
        n => Ok(u64::from(n)),
    }
}

fn one_of(field: &str, value: &str, allowed: &[&str]) -> Result<(), QueryError> {
    if value.is_empty() || allowed.contains(&value) {
        Ok(())
    } else {
        Err(QueryError::bad(format!(
            "{field} {value:?} is not one of {}",
            allowed.join(", ")
        )))
    }
}

fn short_text(field: &str, value: &str) -> Result<(), QueryError> {
    if value.len() > MAX_TEXT_FILTER || value.contains('\0') {
        Err(QueryError::bad(format!(
            "{field} is longer than {MAX_TEXT_FILTER} bytes or holds a NUL"
        )))
    } else {
        Ok(())
    }
}

fn storage_error(what: &str, e: clickhouse::error::Error) -> QueryError {
    QueryError::from(StorageError::clickhouse(what, e))
}

fn seconds(ns: u64) -> u32 {
    crate::incidents::seconds(ns)
}

pub fn wire_incident(row: &IncidentRow) -> WireIncident {
    WireIncident {
        id: row.incident_id.clone(),
        title: row.title.clone(),
        rule_id: row.rule_id.clone(),
        severity: row.severity.clone(),
        mitre: row.mitre.clone(),
        host: row.hostname.clone(),
        status: row.status.clone(),
        first_seen: rfc3339(row.first_seen_ns),
        last_seen: rfc3339(row.last_seen_ns),
        count: row.count,
        org_id: row.org_id.clone(),
        device_id: String::new(),
        rule_severity: row.rule_severity.clone(),
        escalation: row.escalation.clone(),
        process_tree_root: row.process_tree_root.clone(),
        spread_hosts: row.spread_hosts.clone(),
        acknowledged_by: row.acknowledged_by.clone(),
        acknowledged_at: rfc3339_or_empty(row.acknowledged_ns),
        resolved_by: row.resolved_by.clone(),
        resolved_at: rfc3339_or_empty(row.resolved_ns),
        note: row.note.clone(),
        description: String::new(),
    }
}

/// (org, host name) → device id, from the registry.
fn devices_by_host(plane: &ControlPlane) -> HashMap<(String, String), String> {
    plane
        .devices(None)
        .into_iter()
        .map(|d| ((d.org, d.hostname), d.device))
        .collect()
}

fn with_device(
    mut incident: WireIncident,
    devices: &HashMap<(String, String), String>,
) -> WireIncident {
    if let Some(device) = devices.get(&(incident.org_id.clone(), incident.host.clone())) {
        incident.device_id.clone_from(device);
    }
    incident
}

/// `<first_seen_ns>.<id>` of the last incident of a page.
fn incident_token(row: &IncidentRow) -> String {
    format!("{}.{}", row.first_seen_ns, row.incident_id)
}

fn parse_incident_token(token: &str) -> Result<Option<(u64, String)>, QueryError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || QueryError::bad(format!("page_token {token:?} is not one this API gave"));
    let (ns, id) = token.split_once('.').ok_or_else(bad)?;
    let ns: u64 = ns.parse().map_err(|_| bad())?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok(Some((ns, id.to_owned())))
}

pub async fn list_incidents(
    storage: &Storage,
    plane: &ControlPlane,
    scope: &Scope,
    req: &ListIncidentsRequest,
) -> Result<IncidentList, QueryError> {
    one_of("status", &req.status, &STATUSES)?;
    one_of("severity", &req.severity, &SEVERITIES)?;
    short_text("rule_id", &req.rule_id)?;
    short_text("host", &req.host)?;
    let since = optional_time("since", &req.since)?.unwrap_or(0);
    let until = optional_time("until", &req.until)?.unwrap_or(u64::MAX);
    let limit = page_size_of(req.page_size)?;
    // Newest first; the next page starts below the last one's (first seen, id).
    let (before_ns, before_id) =
        parse_incident_token(&req.page_token)?.unwrap_or((u64::MAX, String::new()));
    let sql = format!(
        "SELECT {INCIDENT_COLUMNS} FROM incidents FINAL \
         WHERE (? = 1 OR has(?, org_id)) \
           AND (? = '' OR status = ?) AND (? = '' OR severity = ?) \
           AND (? = '' OR rule_id = ?) AND (? = '' OR hostname = ?) \
           AND last_seen_ns >= ? AND first_seen_ns < ? \
           AND (first_seen_ns < ? OR (first_seen_ns = ? AND incident_id < ?)) \
         ORDER BY first_seen_ns DESC, incident_id DESC \
         LIMIT ?"
    );
    let (all, orgs) = scope.binds();
    // With no token, `incident_id < ''` never holds: the `first_seen_ns <
    // u64::MAX` half admits everything.
    let mut rows: Vec<IncidentRow> = storage
        .client()
        .query(&sql)
        .bind(all)
        .bind(orgs)
        .bind(&req.status)
        .bind(&req.status)
        .bind(&req.severity)
        .bind(&req.severity)
        .bind(&req.rule_id)
        .bind(&req.rule_id)
        .bind(&req.host)
        .bind(&req.host)
        .bind(since)
        .bind(until)
        .bind(before_ns)
        .bind(before_ns)
        .bind(&before_id)
        .bind(limit + 1)
        .fetch_all()
        .await
        .map_err(|e| storage_error("listing incidents", e))?;
    let next_page_token = if rows.len() as u64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(incident_token).unwrap_or_default()
    } else {
        String::new()
    };
    let devices = devices_by_host(plane);
    Ok(IncidentList {
        incidents: rows
            .iter()
            .map(|r| with_device(wire_incident(r), &devices))
            .collect(),
        next_page_token,
    })
}

#[derive(Debug, Deserialize, Row)]
struct LinkRow {
    event_time_ns: u64,
    event_id: u64,
    hostname: String,
}

#[derive(Debug, Deserialize, Row)]
struct ChangeRow {
    time_ns: u64,
    actor: String,
    action: String,
    detail: String,
}

pub async fn incident_detail(
    storage: &Storage,
    plane: &ControlPlane,
    scope: &Scope,
    id: &str,
) -> Result<IncidentDetail, QueryError> {
    let row = crate::incidents::find(storage, scope, id)
        .await?
        .ok_or_else(|| QueryError::NotFound(format!("no incident {id}")))?;
    let org = row.org_id.clone();
    let links: Vec<LinkRow> = storage
        .client()
        .query(
            "SELECT event_time_ns, event_id, hostname FROM incident_events \
             WHERE org_id = ? AND incident_id = ? \
             ORDER BY event_time_ns LIMIT ?",
        )
        .bind(&org)
        .bind(id)
        .bind(MAX_INCIDENT_EVENTS)
        .fetch_all()
        .await
        .map_err(|e| storage_error("reading an incident's events", e))?;

    // The linked rows, table by table, found by host, time and sequence.
    let mut wanted: BTreeMap<(EventTable, String), Vec<(u64, u64)>> = BTreeMap::new();
    for link in &links {
        if let Some((table, seq)) = split_event_id(link.event_id) {
            wanted
                .entry((table, link.hostname.clone()))
                .or_default()
                .push((link.event_time_ns, seq));
        }
    }
    let mut events: Vec<(u64, WireEvent)> = Vec::new();
    let mut chains: Vec<Chain> = Vec::new();
    for ((table, host), refs) in &wanted {
        let found = linked_rows(storage, &org, host, *table, refs).await?;
        for (time_ns, event, chain) in found {
            events.push((time_ns, event));
            chains.extend(chain);
        }
    }
    events.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
    events.dedup_by(|a, b| a.1.id == b.1.id);

    let (process_tree, tree_pids) =
        process_tree(storage, &org, &row.hostname, &row, &chains).await?;
    let network_timeline = network_timeline(storage, &org, &row, &tree_pids).await?;

    let changes: Vec<ChangeRow> = storage
        .client()
        .query(
            "SELECT time_ns, actor, action, detail FROM audit_log \
             WHERE org_id = ? AND target = ? AND result = 'ok' \
               AND (action = 'incident.acknowledge' OR action = 'incident.resolve') \
             ORDER BY time_ns",
        )
        .bind(&org)
        .bind(id)
        .fetch_all()
        .await
        .map_err(|e| storage_error("reading an incident's history", e))?;
    let mut history = vec![IncidentChange {
        status: "open".to_owned(),
        by: "detection".to_owned(),
        at: rfc3339(row.first_seen_ns),
        note: format!("rule {} fired", row.rule_id),
    }];
    history.extend(changes.into_iter().map(|c| {
        IncidentChange {
            status: if c.action == "incident.resolve" {
                "resolved"
            } else {
                "acknowledged"
            }
            .to_owned(),
            by: c.actor,
            at: rfc3339(c.time_ns),
            note: c.detail,
        }
    }));

    let devices = devices_by_host(plane);
    Ok(IncidentDetail {
        incident: Some(with_device(wire_incident(&row), &devices)),
        events: events.into_iter().map(|(_, e)| e).collect(),
        process_tree,
        network_timeline,
        history,
    })
}

/// A process and its ancestors as one event saw them, parent first.
#[derive(Debug, Clone)]
struct Chain {
    pid: u32,
    exe: String,
    argv: Vec<String>,
    user: String,
    start_ns: u64,
    ancestors: Vec<(u32, String, u64)>,
}

/// Rows whose (time_ns, seq) are in `refs`, as wire events with the
/// process chain each names.
async fn linked_rows(
    storage: &Storage,
    org: &str,
    host: &str,
    table: EventTable,
    refs: &[(u64, u64)],
) -> Result<Vec<(u64, WireEvent, Option<Chain>)>, QueryError> {
    let wanted: HashSet<(u64, u64)> = refs.iter().copied().collect();
    let times: Vec<u64> = refs.iter().map(|r| r.0).collect();
    let seqs: Vec<u64> = refs.iter().map(|r| r.1).collect();
    let (Some(first), Some(last)) = (times.iter().min(), times.iter().max()) else {
        return Ok(Vec::new());
    };
    let filter = "org_id = ? AND hostname = ? AND time >= toDateTime(?) AND time <= toDateTime(?) \
                  AND has(?, seq) AND has(?, time_ns)";
    let bind = |q: clickhouse::query::Query| {
        q.bind(org)
            .bind(host)
            .bind(seconds(*first))
            .bind(seconds(*last))
            .bind(&seqs)
            .bind(&times)
    };
    let keep = |time_ns: u64, seq: u64| wanted.contains(&(time_ns, seq));
    let out = match table {
        EventTable::Process => {
            linked::<ProcessEventRow>(storage, table, filter, bind, keep).await?
        }
        EventTable::Network => {
            linked::<NetworkEventRow>(storage, table, filter, bind, keep).await?
        }
        EventTable::File => linked::<FileEventRow>(storage, table, filter, bind, keep).await?,
        EventTable::Dns => linked::<DnsEventRow>(storage, table, filter, bind, keep).await?,
        EventTable::Decision => linked::<DecisionRow>(storage, table, filter, bind, keep).await?,
        // Heartbeats are not rows one can show; an absence has none anyway.
        EventTable::Agent => refs
            .iter()
            .map(|(time_ns, _)| {
                (
                    *time_ns,
                    WireEvent {
                        id: format!("heartbeat/{time_ns}"),
                        org_id: org.to_owned(),
                        host: host.to_owned(),
                        time: rfc3339(*time_ns),
                        kind: "heartbeat".to_owned(),
                        action: "heartbeat".to_owned(),
                        ..WireEvent::default()
                    },
                    None,
                )
            })
            .collect(),
    };
    Ok(out)
}

/// A stored event row as the API shows it: the wire event and the process
/// chain it names.
trait ShownRow: Row + DeserializeOwned {
    fn time_ns(&self) -> u64;
    fn seq(&self) -> u64;
    fn wire(&self) -> WireEvent;
    fn chain(&self) -> Chain;
}

/// The rows of `table` the filter finds whose (time, seq) `keep` accepts.
async fn linked<R: ShownRow>(
    storage: &Storage,
    table: EventTable,
    filter: &str,
    bind: impl FnOnce(clickhouse::query::Query) -> clickhouse::query::Query,
    keep: impl Fn(u64, u64) -> bool,
) -> Result<Vec<(u64, WireEvent, Option<Chain>)>, QueryError> {
    Ok(fetch::<R>(storage, table, filter, bind)
        .await?
        .into_iter()
        .filter(|r| keep(r.time_ns(), r.seq()))
        .map(|r| (r.time_ns(), r.wire(), Some(r.chain())))
        .collect())
}

/// The rows a search query returns, as (time, wire event).
async fn found<R: ShownRow>(
    query: clickhouse::query::Query,
    what: &str,
) -> Result<Vec<(u64, WireEvent)>, QueryError> {
    Ok(query
        .fetch_all::<R>()
        .await
        .map_err(|e| storage_error(what, e))?
        .iter()
        .map(|r| (r.time_ns(), r.wire()))
        .collect())
}

/// `SELECT ?fields FROM table WHERE filter` (binds by `bind`), newest
/// first, at most `MAX_INCIDENT_EVENTS * 4` rows.
async fn fetch<R>(
    storage: &Storage,
    table: EventTable,
    filter: &str,
    bind: impl FnOnce(clickhouse::query::Query) -> clickhouse::query::Query,
) -> Result<Vec<R>, QueryError>
where
    R: Row + DeserializeOwned,
{
    let sql = format!(
        "SELECT ?fields FROM {} WHERE {filter} ORDER BY time_ns DESC LIMIT {}",
        table.table(),
        MAX_INCIDENT_EVENTS * 4
    );
    bind(storage.client().query(&sql))
        .fetch_all::<R>()
        .await
        .map_err(|e| storage_error(&format!("reading {}", table.table()), e))
}

fn remote(addr: &str, port: u16) -> String {
    if addr.is_empty() {
        String::new()
    } else if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

fn ancestry_text(pids: &[u32], exes: &[String]) -> Vec<String> {
    pids.iter()
        .zip(exes)
        .map(|(pid, exe)| format!("{pid}:{exe}"))
        .collect()
}

fn event_base(
    table: EventTable,
    (org, host, device, boot, seq, time_ns): (&str, &str, &str, &str, u64, u64),
) -> WireEvent {
    WireEvent {
        id: format!("{device}/{boot}/{seq}"),
        org_id: org.to_owned(),
        host: host.to_owned(),
        device_id: device.to_owned(),
        time: rfc3339(time_ns),
        kind: table.kind_name().to_owned(),
        ..WireEvent::default()
    }
}

macro_rules! key {
    ($r:expr) => {
        (
            $r.org_id.as_str(),
            $r.hostname.as_str(),
            $r.device_id.as_str(),
            $r.boot_id.as_str(),
            $r.seq,
            $r.time_ns,
        )
    };
}

fn process_event(r: &ProcessEventRow) -> WireEvent {
    WireEvent {
        action: r.event_type.clone(),
        pid: r.pid,
        ppid: r.ppid,
        exe: if r.exe.is_empty() {
            r.filename.clone()
        } else {
            r.exe.clone()
        },
        argv: r.argv.clone(),
        user: r.user_name.clone(),
        uid: r.uid,
        ancestry: ancestry_text(&r.ancestor_pids, &r.ancestor_exes),
        ..event_base(EventTable::Process, key!(r))
    }
}

fn network_event(r: &NetworkEventRow) -> WireEvent {
    let (addr, port) = if r.action == crate::storage::TCP_LISTEN {
        (&r.local_addr, r.local_port)
    } else {
        (&r.remote_addr, r.remote_port)
    };
    WireEvent {
        action: r.action.clone(),
        pid: r.pid,
        ppid: r.ancestor_pids.first().copied().unwrap_or(0),
        exe: r.exe.clone(),
        user: r.user_name.clone(),
        uid: r.uid,
        remote: remote(addr, port),
        ancestry: ancestry_text(&r.ancestor_pids, &r.ancestor_exes),
        ..event_base(EventTable::Network, key!(r))
    }
}

fn file_event(r: &FileEventRow) -> WireEvent {
    WireEvent {
        action: r.action.clone(),
        pid: r.pid,
        ppid: r.ancestor_pids.first().copied().unwrap_or(0),
        exe: r.exe.clone(),
        user: r.user_name.clone(),
        uid: r.uid,
        path: r.path.clone(),
        target_path: r.target_path.clone(),
        ancestry: ancestry_text(&r.ancestor_pids, &r.ancestor_exes),
        ..event_base(EventTable::File, key!(r))
    }
}

fn dns_event(r: &DnsEventRow) -> WireEvent {
    WireEvent {
        action: "query".to_owned(),
        pid: r.pid,
        ppid: r.ancestor_pids.first().copied().unwrap_or(0),
        exe: r.exe.clone(),
        user: r.user_name.clone(),
        uid: r.uid,
        remote: remote(&r.server_addr, r.server_port),
        query_name: r.query_name.clone(),
        ancestry: ancestry_text(&r.ancestor_pids, &r.ancestor_exes),
        ..event_base(EventTable::Dns, key!(r))
    }
}

fn decision_event(r: &DecisionRow) -> WireEvent {
    WireEvent {
        action: r.verdict.clone(),
        pid: r.pid,
        ppid: r.ancestor_pids.first().copied().unwrap_or(0),
        exe: r.exe.clone(),
        user: r.user_name.clone(),
        uid: r.uid,
        remote: remote(&r.remote_addr, r.remote_port),
        rule_id: r.rule_id.clone(),
        reason: r.reason.clone(),
        ancestry: ancestry_text(&r.ancestor_pids, &r.ancestor_exes),
        ..event_base(EventTable::Decision, key!(r))
    }
}

fn chain_of(
    pid: u32,
    exe: &str,
    user: &str,
    pids: &[u32],
    exes: &[String],
    starts: &[u64],
) -> Chain {
    Chain {
        pid,
        exe: exe.to_owned(),
        argv: Vec::new(),
        user: user.to_owned(),
        start_ns: 0,
        ancestors: pids
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    *p,
                    exes.get(i).cloned().unwrap_or_default(),
                    starts.get(i).copied().unwrap_or(0),
                )
            })
            .collect(),
    }
}

fn process_chain(r: &ProcessEventRow) -> Chain {
    let exe = if r.exe.is_empty() {
        &r.filename
    } else {
        &r.exe
    };
    let mut chain = chain_of(
        r.pid,
        exe,
        &r.user_name,
        &r.ancestor_pids,
        &r.ancestor_exes,
        &r.ancestor_start_ns,
    );
    chain.argv = r.argv.clone();
    chain.start_ns = r.process_start_ns;
    chain
}

impl ShownRow for ProcessEventRow {
    fn time_ns(&self) -> u64 {
        self.time_ns
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn wire(&self) -> WireEvent {
        process_event(self)
    }
    fn chain(&self) -> Chain {
        process_chain(self)
    }
}

/// The rows whose process is `pid`, `exe`, `user_name` and the ancestor
/// arrays.
macro_rules! shown_owned_row {
    ($row:ty, $wire:ident) => {
        impl ShownRow for $row {
            fn time_ns(&self) -> u64 {
                self.time_ns
            }
            fn seq(&self) -> u64 {
                self.seq
            }
            fn wire(&self) -> WireEvent {
                $wire(self)
            }
            fn chain(&self) -> Chain {
                chain_of(
                    self.pid,
                    &self.exe,
                    &self.user_name,
                    &self.ancestor_pids,
                    &self.ancestor_exes,
                    &self.ancestor_start_ns,
                )
            }
        }
    };
}

shown_owned_row!(NetworkEventRow, network_event);
shown_owned_row!(FileEventRow, file_event);
shown_owned_row!(DnsEventRow, dns_event);
shown_owned_row!(DecisionRow, decision_event);

#[derive(Debug, Clone, Default)]
struct Node {
    ppid: u32,
    exe: String,
    argv: Vec<String>,
    user: String,
    start_ns: u64,
    in_incident: bool,
}

/// The tree under the incident's process-tree root: the processes of its
/// events, their ancestors below pid 1, and what else ran under the root
/// around the incident (from `process_events`). Depth first, root first.
async fn process_tree(
    storage: &Storage,
    org: &str,
    host: &str,
    incident: &IncidentRow,
    chains: &[Chain],
) -> Result<(Vec<ProcessNode>, Vec<u32>), QueryError> {
    let mut nodes: BTreeMap<u32, Node> = BTreeMap::new();
    let mut root: Option<u32> = None;
    for chain in chains {
        // Parent first, up to pid 1: the root is the last one above 1.
        let top = chain
            .ancestors
            .iter()
            .rev()
            .find(|a| a.0 > 1)
            .map_or(chain.pid, |a| a.0);
        root.get_or_insert(top);
        let mut child = chain.pid;
        for (pid, exe, start) in &chain.ancestors {
            if *pid <= 1 {
                break;
            }
            let node = nodes.entry(*pid).or_default();
            if node.exe.is_empty() {
                node.exe.clone_from(exe);
                node.start_ns = *start;
            }
            nodes.entry(child).or_default().ppid = *pid;
            child = *pid;
        }
        let node = nodes.entry(chain.pid).or_default();
        node.in_incident = true;
        if node.exe.is_empty() || !chain.argv.is_empty() {
            node.exe.clone_from(&chain.exe);
        }
        if !chain.argv.is_empty() {
            node.argv.clone_from(&chain.argv);
        }
        if !chain.user.is_empty() {
            node.user.clone_from(&chain.user);
        }
        if chain.start_ns != 0 {
            node.start_ns = chain.start_ns;
        }
    }
    let Some(root) = root else {
        return Ok((Vec::new(), Vec::new()));
    };
    // Everything that ran under the root around the incident.
    let from = incident.first_seen_ns.saturating_sub(TREE_LOOKBACK_NS);
    let to = incident.last_seen_ns.saturating_add(TIMELINE_MARGIN_NS);
    let rows: Vec<ProcessEventRow> = storage
        .client()
        .query(&format!(
            "SELECT ?fields FROM process_events \
             WHERE org_id = ? AND hostname = ? AND time >= toDateTime(?) AND time <= toDateTime(?) \
               AND (event_type = 'exec' OR event_type = 'fork') \
               AND (pid = ? OR has(ancestor_pids, ?)) \
             ORDER BY time_ns LIMIT {MAX_TREE_ROWS}"
        ))
        .bind(org)
        .bind(host)
        .bind(seconds(from))
        .bind(seconds(to))
        .bind(root)
        .bind(root)
        .fetch_all()
        .await
        .map_err(|e| storage_error("reading the process tree", e))?;
    for r in &rows {
        let mut parent = r.ppid;
        if parent == 0 {
            parent = r.ancestor_pids.first().copied().unwrap_or(0);
        }
        let node = nodes.entry(r.pid).or_default();
        if r.pid != root && parent > 1 {
            node.ppid = parent;
        }
        if r.event_type == crate::storage::EVENT_TYPE_EXEC || node.exe.is_empty() {
            node.exe = if r.exe.is_empty() {
                r.filename.clone()
            } else {
                r.exe.clone()
            };
            if !r.argv.is_empty() {
                node.argv.clone_from(&r.argv);
            }
        }
        if !r.user_name.is_empty() {
            node.user.clone_from(&r.user_name);
        }
        if node.start_ns == 0 {
            node.start_ns = r.process_start_ns;
        }
        // Ancestors between the root and this process.
        let mut child = r.pid;
        for (i, pid) in r.ancestor_pids.iter().enumerate() {
            if *pid <= 1 || child == root {
                break;
            }
            let ancestor = nodes.entry(*pid).or_default();
            if ancestor.exe.is_empty() {
                ancestor.exe = r.ancestor_exes.get(i).cloned().unwrap_or_default();
            }
            if child != root {
                nodes.entry(child).or_default().ppid = *pid;
            }
            child = *pid;
        }
    }
    if let Some(node) = nodes.get_mut(&root) {
        node.ppid = 0;
    }
    // Depth first from the root; processes not under it are left out.
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (pid, node) in &nodes {
        if *pid != root {
            children.entry(node.ppid).or_default().push(*pid);
        }
    }
    for list in children.values_mut() {
        list.sort_by_key(|pid| (nodes[pid].start_ns, *pid));
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    let mut seen = BTreeSet::new();
    while let Some(pid) = stack.pop() {
        if !seen.insert(pid) {
            continue;
        }
        let node = nodes.get(&pid).cloned().unwrap_or_default();
        out.push(ProcessNode {
            pid,
            ppid: node.ppid,
            exe: node.exe,
            argv: node.argv,
            user: node.user,
            started: rfc3339_or_empty(node.start_ns),
            in_incident: node.in_incident,
        });
        if let Some(kids) = children.get(&pid) {
            stack.extend(kids.iter().rev());
        }
    }
    let pids = out.iter().map(|n| n.pid).collect();
    Ok((out, pids))
}

/// Connections, DNS queries and decisions of the tree's processes around
/// the incident, oldest first.
async fn network_timeline(
    storage: &Storage,
    org: &str,
    incident: &IncidentRow,
    pids: &[u32],
) -> Result<Vec<WireEvent>, QueryError> {
    if pids.is_empty() {
        return Ok(Vec::new());
    }
    let from = incident.first_seen_ns.saturating_sub(TIMELINE_MARGIN_NS);
    let to = incident.last_seen_ns.saturating_add(TIMELINE_MARGIN_NS);
    let filter = "org_id = ? AND hostname = ? AND time >= toDateTime(?) AND time <= toDateTime(?) \
                  AND time_ns >= ? AND time_ns <= ? AND has(?, pid)";
    let pids = pids.to_vec();
    let host = incident.hostname.as_str();
    let bind = |q: clickhouse::query::Query| {
        q.bind(org)
            .bind(host)
            .bind(seconds(from))
            .bind(seconds(to))
            .bind(from)
            .bind(to)
            .bind(&pids)
    };
    let mut out: Vec<(u64, WireEvent)> = Vec::new();
    let sql = |table: &str| {
        format!(
            "SELECT ?fields FROM {table} WHERE {filter} ORDER BY time_ns LIMIT {MAX_TIMELINE_ROWS}"
        )
    };
    let network: Vec<NetworkEventRow> = bind(storage.client().query(&sql("network_events")))
        .fetch_all()
        .await
        .map_err(|e| storage_error("reading the network timeline", e))?;
    out.extend(network.iter().map(|r| (r.time_ns, network_event(r))));
    let dns: Vec<DnsEventRow> = bind(storage.client().query(&sql("dns_events")))
        .fetch_all()
        .await
        .map_err(|e| storage_error("reading the network timeline", e))?;
    out.extend(dns.iter().map(|r| (r.time_ns, dns_event(r))));
    let decisions: Vec<DecisionRow> = bind(storage.client().query(&sql("decisions")))
        .fetch_all()
        .await
        .map_err(|e| storage_error("reading the network timeline", e))?;
    out.extend(decisions.iter().map(|r| (r.time_ns, decision_event(r))));
    out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
    out.dedup_by(|a, b| a.1.id == b.1.id);
    Ok(out.into_iter().map(|(_, e)| e).collect())
}

/// The text columns `text` is looked for in, per table.
fn text_columns(table: EventTable) -> [&'static str; 3] {
    match table {
        EventTable::Process => ["arrayStringConcat(argv, ' ')", "exe", "filename"],
        EventTable::Network => ["exe", "remote_addr", "local_addr"],
        EventTable::File => ["path", "target_path", "exe"],
        EventTable::Dns => ["query_name", "exe", "server_addr"],
        EventTable::Decision => ["exe", "remote_addr", "rule_id"],
        EventTable::Agent => ["hostname", "hostname", "hostname"],
    }
}

pub async fn search_events(
    storage: &Storage,
    scope: &Scope,
    req: &SearchEventsRequest,
) -> Result<EventList, QueryError> {
    short_text("host", &req.host)?;
    short_text("text", &req.text)?;
    short_text("user", &req.user)?;
    let mut tables = Vec::new();
    for kind in &req.kinds {
        match EventTable::from_kind_name(kind) {
            Some(EventTable::Agent) | None => {
                return Err(QueryError::bad(format!(
                    "kind {kind:?} is not one of process, network, file, dns, decision"
                )))
            }
            Some(table) => tables.push(table),
        }
    }
    if tables.is_empty() {
        tables = EventTable::ALL
            .into_iter()
            .filter(|t| *t != EventTable::Agent)
            .collect();
    }
    tables.sort();
    tables.dedup();
    let now = crate::detection::now_ns();
    let until = optional_time("until", &req.until)?.unwrap_or(now);
    let since =
        optional_time("since", &req.since)?.unwrap_or(until.saturating_sub(DEFAULT_SEARCH_SPAN_NS));
    if since > until {
        return Err(QueryError::bad("since is after until"));
    }
    let limit = page_size_of(req.page_size)?;
    let before = if req.page_token.is_empty() {
        until.saturating_add(1)
    } else {
        req.page_token.parse::<u64>().map_err(|_| {
            QueryError::bad(format!(
                "page_token {:?} is not one this API gave",
                req.page_token
            ))
        })?
    };
    let (all, orgs) = scope.binds();
    let mut found: Vec<(u64, WireEvent)> = Vec::new();
    for table in tables {
        let [a, b, c] = text_columns(table);
        let filter = format!(
            "(? = 1 OR has(?, org_id)) AND (? = '' OR hostname = ?) \
             AND time >= toDateTime(?) AND time <= toDateTime(?) \
             AND time_ns >= ? AND time_ns < ? \
             AND (? = 0 OR pid = ?) AND (? = '' OR user_name = ?) \
             AND (? = '' OR positionCaseInsensitive({a}, ?) > 0 \
                  OR positionCaseInsensitive({b}, ?) > 0 \
                  OR positionCaseInsensitive({c}, ?) > 0)"
        );
        let sql = format!(
            "SELECT ?fields FROM {} WHERE {filter} ORDER BY time_ns DESC LIMIT ?",
            table.table()
        );
        let query = storage
            .client()
            .query(&sql)
            .bind(all)
            .bind(&orgs)
            .bind(&req.host)
            .bind(&req.host)
            .bind(seconds(since))
            .bind(seconds(until))
            .bind(since)
            .bind(before)
            .bind(req.pid)
            .bind(req.pid)
            .bind(&req.user)
            .bind(&req.user)
            .bind(&req.text)
            .bind(&req.text)
            .bind(&req.text)
            .bind(&req.text)
            .bind(limit + 1);
        let what = format!("searching {}", table.table());
        found.extend(match table {
            EventTable::Process => self::found::<ProcessEventRow>(query, &what).await?,
            EventTable::Network => self::found::<NetworkEventRow>(query, &what).await?,
            EventTable::File => self::found::<FileEventRow>(query, &what).await?,
            EventTable::Dns => self::found::<DnsEventRow>(query, &what).await?,
            EventTable::Decision => self::found::<DecisionRow>(query, &what).await?,
            EventTable::Agent => Vec::new(),
        });
    }
    // Newest first across tables; a row stored twice (a resent batch not
    // merged yet) shows once.
    found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
    found.dedup_by(|a, b| a.1.id == b.1.id && a.1.kind == b.1.kind);
    let next_page_token = if found.len() as u64 > limit {
        found.truncate(limit as usize);
        // The next page starts below the last time shown; events sharing
        // that nanosecond with it are kept whole on the next page.
        let last = found.last().map_or(0, |e| e.0);
        if found.iter().any(|e| e.0 != last) {
            found.retain(|e| e.0 != last);
        }
        last.to_string()
    } else {
        String::new()
    };
    Ok(EventList {
        events: found.into_iter().map(|(_, e)| e).collect(),
        next_page_token,
    })
}

#[derive(Debug, Deserialize, Row)]
struct FleetRow {
    org_id: String,
    device_id: String,
    last: u32,
    hostname: String,
    agent_version: String,
    kernel: String,
    active_sensors: Vec<String>,
    policy_version: u64,
    certificate_not_after: u32,
    spool_events: u64,
    kernel_drops: u64,
    bulk_sampled: u64,
    queue_dropped: u64,
}

pub async fn fleet(
    storage: &Storage,
    plane: &ControlPlane,
    connected: &ConnectedDevices,
    scope: &Scope,
) -> Result<FleetList, QueryError> {
    let (all, orgs) = scope.binds();
    let rows: Vec<FleetRow> = storage
        .client()
        .query(
            "SELECT org_id, device_id, max(time) AS last, argMax(hostname, time), \
               argMax(agent_version, time), argMax(kernel, time), argMax(active_sensors, time), \
               argMax(policy_version, time), argMax(certificate_not_after, time), \
               argMax(spool_events, time), argMax(kernel_drops, time), \
               argMax(bulk_sampled, time), argMax(queue_dropped, time) \
             FROM agents WHERE (? = 1 OR has(?, org_id)) \
             GROUP BY org_id, device_id",
        )
        .bind(all)
        .bind(orgs)
        .fetch_all()
        .await
        .map_err(|e| storage_error("reading heartbeats", e))?;
    let beats: HashMap<(String, String), FleetRow> = rows
        .into_iter()
        .map(|r| ((r.org_id.clone(), r.device_id.clone()), r))
        .collect();
    let revocations = plane.revocation_list();
    let mut agents: Vec<Agent> = plane
        .devices(None)
        .into_iter()
        .filter(|d| scope.contains(&d.org))
        .map(|d| {
            let revoked = SpiffeId::parse(&d.spiffe_id)
                .ok()
                .is_some_and(|id| revocations.is_device_revoked(&id));
            let online = connected.count(&d.spiffe_id) > 0;
            let beat = beats.get(&(d.org.clone(), d.device.clone()));
            let state = if revoked {
                "revoked"
            } else if online {
                "online"
            } else {
                "offline"
            };
            Agent {
                org_id: d.org.clone(),
                device_id: d.device.clone(),
                hostname: beat
                    .map(|b| b.hostname.clone())
                    .filter(|h| !h.is_empty())
                    .unwrap_or(d.hostname),
                agent_version: beat
                    .map(|b| b.agent_version.clone())
                    .unwrap_or(d.agent_version),
                state: state.to_owned(),
                last_heartbeat: beat
                    .map(|b| rfc3339(u64::from(b.last) * NS))
                    .unwrap_or_default(),
                kernel: beat.map(|b| b.kernel.clone()).unwrap_or_default(),
                active_sensors: beat.map(|b| b.active_sensors.clone()).unwrap_or_default(),
                policy_serial: beat.map_or(0, |b| b.policy_version),
                certificate_not_after: rfc3339_or_empty(
                    beat.map_or(d.not_after_unix, |b| u64::from(b.certificate_not_after)) * NS,
                ),
                spool_events: beat.map_or(0, |b| b.spool_events),
                kernel_drops: beat.map_or(0, |b| b.kernel_drops),
                bulk_sampled: beat.map_or(0, |b| b.bulk_sampled),
                queue_dropped: beat.map_or(0, |b| b.queue_dropped),
            }
        })
        .collect();
    agents.sort_by(|a, b| (&a.org_id, &a.device_id).cmp(&(&b.org_id, &b.device_id)));
    Ok(FleetList { agents })
}

pub async fn kpi(
    storage: &Storage,
    scope: &Scope,
    utc_offset_secs: i32,
) -> Result<Kpi, QueryError> {
    let now = crate::detection::now_ns();
    let year = detect::FiscalYear::containing(now, utc_offset_secs);
    let (all, orgs) = scope.binds();
    let sql = format!(
        "SELECT {INCIDENT_COLUMNS} FROM incidents FINAL \
         WHERE (? = 1 OR has(?, org_id)) AND (first_seen_ns >= ? OR status != 'resolved')"
    );
    let rows: Vec<IncidentRow> = storage
        .client()
        .query(&sql)
        .bind(all)
        .bind(&orgs)
        .bind(year.start_ns)
        .fetch_all()
        .await
        .map_err(|e| storage_error("counting incidents", e))?;
    let incidents = rows
        .iter()
        .map(IncidentRow::to_incident)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| QueryError::Unavailable(e.to_string()))?;
    let figures = detect::kpi(incidents.iter(), now, utc_offset_secs);
    // The newest incident may be older than this year and resolved.
    let newest: u64 = storage
        .client()
        .query("SELECT max(first_seen_ns) FROM incidents WHERE (? = 1 OR has(?, org_id))")
        .bind(all)
        .bind(&orgs)
        .fetch_one()
        .await
        .map_err(|e| storage_error("finding the last incident", e))?;
    let last = figures.last_opened_ns.unwrap_or(0).max(newest);
    let mut by_severity = severity_counts();
    by_severity.extend(figures.by_severity.clone());
    let mut open_by_severity = severity_counts();
    open_by_severity.extend(figures.open_by_severity.clone());
    let org_ids = match scope {
        Scope::All => Vec::new(),
        Scope::Orgs(orgs) => orgs.clone(),
    };
    Ok(Kpi {
        fiscal_year: year.label.clone(),
        fiscal_year_start: rfc3339(year.start_ns),
        fiscal_year_end: rfc3339(year.end_ns),
        target: figures.target,
        incidents: figures.incidents,
        by_severity: by_severity.into_iter().collect(),
        open: figures.open,
        open_by_severity: open_by_severity.into_iter().collect(),
        days_since_last: if last == 0 {
            -1
        } else {
            i64::try_from(now.saturating_sub(last) / (86_400 * NS)).unwrap_or(i64::MAX)
        },
        last_incident: rfc3339_or_empty(last),
        on_target: figures.incidents <= figures.target,
        org_ids,
    })
}

/// `+HH:MM` of an offset in seconds.
pub fn offset_text(secs: i32) -> String {
    let sign = if secs < 0 { '-' } else { '+' };
    let abs = secs.unsigned_abs();
    format!("{sign}{:02}:{:02}", abs / 3600, abs % 3600 / 60)
}

/// The civil date (in the clock `utc_offset_secs` from UTC) of `ns`.
fn local_date(ns: u64, utc_offset_secs: i32) -> Option<time::Date> {
    let offset = time::UtcOffset::from_whole_seconds(utc_offset_secs).ok()?;
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()
        .map(|t| t.to_offset(offset).date())
}

pub async fn trend(
    storage: &Storage,
    scope: &Scope,
    days: u32,
    utc_offset_secs: i32,
) -> Result<Trend, QueryError> {
    if !(1..=366).contains(&days) {
        return Err(QueryError::bad(format!("days {days} is outside 1..=366")));
    }
    let now = crate::detection::now_ns();
    let today = local_date(now, utc_offset_secs)
        .ok_or_else(|| QueryError::bad("the fiscal-year clock's offset is out of range"))?;
    let first = today - time::Duration::days(i64::from(days) - 1);
    let since = now.saturating_sub(u64::from(days + 1) * 86_400 * NS);
    let (all, orgs) = scope.binds();
    let rows: Vec<(u64, String)> = storage
        .client()
        .query(
            "SELECT first_seen_ns, severity FROM incidents FINAL \
             WHERE (? = 1 OR has(?, org_id)) AND first_seen_ns >= ?",
        )
        .bind(all)
        .bind(orgs)
        .bind(since)
        .fetch_all()
        .await
        .map_err(|e| storage_error("counting incidents per day", e))?;
    let mut by_day: Vec<TrendDay> = (0..days)
        .map(|i| TrendDay {
            date: (first + time::Duration::days(i64::from(i))).to_string(),
            ..TrendDay::default()
        })
        .collect();
    for (ns, severity) in rows {
        let Some(date) = local_date(ns, utc_offset_secs) else {
            continue;
        };
        let index = (date - first).whole_days();
        let Some(day) = usize::try_from(index).ok().and_then(|i| by_day.get_mut(i)) else {
            continue;
        };
        match severity.as_str() {
            "low" => day.low += 1,
            "medium" => day.medium += 1,
            "high" => day.high += 1,
            _ => day.critical += 1,
        }
    }
    Ok(Trend {
        days: by_day,
        utc_offset: offset_text(utc_offset_secs),
    })
}

#[derive(Debug, Deserialize, Row)]
struct AuditRowRead {
    time_ns: u64,
    org_id: String,
    actor: String,
    actor_role: String,
    action: String,
    target: String,
    source: String,
    result: String,
    detail: String,
}

pub async fn audit(
    storage: &Storage,
    scope: &Scope,
    since: &str,
    page_size: u32,
) -> Result<AuditList, QueryError> {
    let limit = page_size_of(page_size)?;
    let since = match optional_time("since", since)? {
        Some(ns) => ns,
        None => crate::detection::now_ns().saturating_sub(7 * 86_400 * NS),
    };
    let (all, orgs) = scope.binds();
    let rows: Vec<AuditRowRead> = storage
        .client()
        .query(
            "SELECT time_ns, org_id, actor, actor_role, action, target, source, result, detail \
             FROM audit_log WHERE (? = 1 OR has(?, org_id)) \
               AND time >= toDateTime(?) AND time_ns >= ? \
             ORDER BY time_ns DESC LIMIT ?",
        )
        .bind(all)
        .bind(orgs)
        .bind(seconds(since))
        .bind(since)
        .bind(limit)
        .fetch_all()
        .await
        .map_err(|e| storage_error("reading the audit log", e))?;
    Ok(AuditList {
        entries: rows
            .into_iter()
            .map(|r| AuditEntry {
                time: rfc3339(r.time_ns),
                org_id: r.org_id,
                actor: r.actor,
                actor_role: r.actor_role,
                action: r.action,
                target: r.target,
                source: r.source,
                result: r.result,
                detail: r.detail,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_and_bad_ones_are_named() {
        let ns = 1_764_000_000_123_456_789;
        assert_eq!(parse_time("since", &rfc3339(ns)).unwrap(), ns);
        assert_eq!(
            parse_time("since", "2026-11-24T09:00:00+09:00").unwrap(),
            parse_time("since", "2026-11-24T00:00:00Z").unwrap()
        );
        let err = parse_time("until", "yesterday").unwrap_err().to_string();
        assert!(err.contains("until") && err.contains("RFC 3339"), "{err}");
        assert!(parse_time("since", "1969-12-31T23:59:59Z").is_err());
    }

    #[test]
    fn filters_are_checked_before_any_sql() {
        assert!(one_of("status", "open", &STATUSES).is_ok());
        assert!(one_of("status", "", &STATUSES).is_ok());
        let err = one_of("status", "open' OR 1=1 --", &STATUSES).unwrap_err();
        assert!(matches!(err, QueryError::InvalidArgument(_)));
        assert!(short_text("host", &"x".repeat(MAX_TEXT_FILTER + 1)).is_err());
        assert!(short_text("host", "a\0b").is_err());
        assert_eq!(page_size_of(0).unwrap(), 100);
        assert!(page_size_of(MAX_PAGE_SIZE + 1).is_err());
    }

    #[test]
    fn incident_page_tokens_are_checked() {
        assert_eq!(parse_incident_token("").unwrap(), None);
        assert_eq!(
            parse_incident_token("17.00ff").unwrap(),
            Some((17, "00ff".to_owned()))
        );
        for bad in ["17", "x.00ff", "17.", "17.00ff' OR '1'='1"] {
            assert!(parse_incident_token(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn remote_addresses_bracket_ipv6() {
        assert_eq!(remote("10.0.0.1", 80), "10.0.0.1:80");
        assert_eq!(remote("fd00::1", 443), "[fd00::1]:443");
        assert_eq!(remote("", 0), "");
    }

    #[test]
    fn offsets_and_local_dates() {
        assert_eq!(offset_text(9 * 3600), "+09:00");
        assert_eq!(offset_text(-(5 * 3600 + 1800)), "-05:30");
        // 2026-11-24T20:00:00Z is already the 25th in Tokyo.
        let ns = parse_time("t", "2026-11-24T20:00:00Z").unwrap();
        assert_eq!(local_date(ns, 9 * 3600).unwrap().to_string(), "2026-11-25");
        assert_eq!(local_date(ns, 0).unwrap().to_string(), "2026-11-24");
    }
}
