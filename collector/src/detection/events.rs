//! Stored rows → the detection engine's normalized [`Event`].
//!
//! Every event table maps to engine kinds (docs/detections.md, "Events"):
//! process rows by `event_type`; TCP rows by `action` (a connect *attempt*
//! is not fed: its outcome follows as `connected` or `connect_failed`);
//! file rows by `action`; DNS queries; zero-trust decisions; agent
//! heartbeats. Gap rows are not events.
//!
//! An event's id names its row for the incident's links: the agent's
//! sequence number and the table, `seq × 8 + table` ([`EventTable`]), which
//! with the organisation, host and nanosecond time finds the row again
//! through the tables' sorting keys.

use std::net::IpAddr;

use detect::{Ancestor, Event, Kind};

use crate::storage::{
    AgentRow, DecisionRow, DnsEventRow, FileEventRow, NetworkEventRow, ProcessEventRow,
    EVENT_TYPE_CRED_CHANGE, EVENT_TYPE_EXEC, EVENT_TYPE_EXIT, EVENT_TYPE_FORK, FILE_CHMOD,
    FILE_OPEN_READ, FILE_OPEN_WRITE, FILE_RENAME, FILE_UNLINK, TCP_ACCEPTED, TCP_CLOSED,
    TCP_CONNECTED, TCP_CONNECT_FAILED, TCP_LISTEN,
};

/// The table an event id points into (the low three bits of the id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventTable {
    Process = 1,
    Network = 2,
    File = 3,
    Dns = 4,
    Decision = 5,
    Agent = 6,
}

impl EventTable {
    pub const ALL: [EventTable; 6] = [
        EventTable::Process,
        EventTable::Network,
        EventTable::File,
        EventTable::Dns,
        EventTable::Decision,
        EventTable::Agent,
    ];

    /// The table's name in ClickHouse.
    pub fn table(self) -> &'static str {
        match self {
            EventTable::Process => "process_events",
            EventTable::Network => "network_events",
            EventTable::File => "file_events",
            EventTable::Dns => "dns_events",
            EventTable::Decision => "decisions",
            EventTable::Agent => "agents",
        }
    }

    /// The event kind the query API names (`process`, `network`, ...).
    pub fn kind_name(self) -> &'static str {
        match self {
            EventTable::Process => "process",
            EventTable::Network => "network",
            EventTable::File => "file",
            EventTable::Dns => "dns",
            EventTable::Decision => "decision",
            EventTable::Agent => "heartbeat",
        }
    }

    pub fn from_kind_name(name: &str) -> Option<EventTable> {
        Self::ALL.into_iter().find(|t| t.kind_name() == name)
    }
}

/// The engine id of the row with sequence number `seq` in `table`.
pub fn event_id(table: EventTable, seq: u64) -> u64 {
    (seq << 3) | table as u64
}

/// Which table and sequence number an engine id names; `None` for ids no
/// row has.
pub fn split_event_id(id: u64) -> Option<(EventTable, u64)> {
    let table = EventTable::ALL.into_iter().find(|t| *t as u64 == id & 7)?;
    Some((table, id >> 3))
}

fn ancestry(pids: &[u32], exes: &[String]) -> Vec<Ancestor> {
    pids.iter()
        .zip(exes)
        .map(|(pid, exe)| Ancestor {
            pid: *pid,
            exe: exe.clone(),
        })
        .collect()
}

fn ip(text: &str) -> Option<IpAddr> {
    text.parse().ok()
}

/// Fields every process-owned row shares.
struct Owner<'a> {
    pid: u32,
    uid: u32,
    exe: &'a str,
    user: &'a str,
    ancestor_pids: &'a [u32],
    ancestor_exes: &'a [String],
}

/// The [`Owner`] of a row whose process is `pid`, `uid`, `exe`,
/// `user_name` and the ancestor arrays.
macro_rules! owner {
    ($row:expr) => {
        Owner {
            pid: $row.pid,
            uid: $row.uid,
            exe: &$row.exe,
            user: &$row.user_name,
            ancestor_pids: &$row.ancestor_pids,
            ancestor_exes: &$row.ancestor_exes,
        }
    };
}

fn base(kind: Kind, table: EventTable, row: (&str, &str, u64, u64), owner: Owner<'_>) -> Event {
    let (org, host, time_ns, seq) = row;
    let mut e = Event::new(kind, org, host, time_ns);
    e.id = event_id(table, seq);
    e.pid = owner.pid;
    e.ppid = owner.ancestor_pids.first().copied().unwrap_or(0);
    e.uid = Some(owner.uid);
    e.exe = owner.exe.to_owned();
    e.user = owner.user.to_owned();
    e.ancestry = ancestry(owner.ancestor_pids, owner.ancestor_exes);
    e
}

pub fn from_process(row: &ProcessEventRow) -> Option<Event> {
    let kind = match row.event_type.as_str() {
        EVENT_TYPE_EXEC => Kind::Exec,
        EVENT_TYPE_FORK => Kind::Fork,
        EVENT_TYPE_EXIT => Kind::Exit,
        EVENT_TYPE_CRED_CHANGE => Kind::CredChange,
        _ => return None,
    };
    let exe = if row.exe.is_empty() {
        &row.filename
    } else {
        &row.exe
    };
    let mut e = base(
        kind,
        EventTable::Process,
        (&row.org_id, &row.hostname, row.time_ns, row.seq),
        Owner {
            pid: row.pid,
            uid: row.uid,
            exe,
            user: &row.user_name,
            ancestor_pids: &row.ancestor_pids,
            ancestor_exes: &row.ancestor_exes,
        },
    );
    if row.ppid != 0 {
        e.ppid = row.ppid;
    }
    e.start_ns = row.process_start_ns;
    e.argv = row.argv.clone();
    Some(e)
}

pub fn from_network(row: &NetworkEventRow) -> Option<Event> {
    let kind = match row.action.as_str() {
        TCP_CONNECTED => Kind::Connect,
        TCP_CONNECT_FAILED => Kind::ConnectFailed,
        TCP_ACCEPTED => Kind::Accept,
        TCP_CLOSED => Kind::Close,
        TCP_LISTEN => Kind::Listen,
        _ => return None,
    };
    let mut e = base(
        kind,
        EventTable::Network,
        (&row.org_id, &row.hostname, row.time_ns, row.seq),
        owner!(row),
    );
    if kind == Kind::Listen {
        e.remote_ip = ip(&row.local_addr);
        e.remote_port = Some(row.local_port);
    } else {
        e.remote_ip = ip(&row.remote_addr);
        e.remote_port = Some(row.remote_port);
    }
    Some(e)
}

pub fn from_file(row: &FileEventRow) -> Option<Event> {
    let kind = match row.action.as_str() {
        FILE_OPEN_WRITE => Kind::FileWrite,
        FILE_OPEN_READ => Kind::FileRead,
        FILE_UNLINK => Kind::FileUnlink,
        FILE_RENAME => Kind::FileRename,
        FILE_CHMOD => Kind::FileChmod,
        _ => return None,
    };
    let mut e = base(
        kind,
        EventTable::File,
        (&row.org_id, &row.hostname, row.time_ns, row.seq),
        owner!(row),
    );
    e.path = row.path.clone();
    e.new_path = row.target_path.clone();
    match kind {
        Kind::FileChmod => e.mode = Some(row.mode),
        Kind::FileWrite | Kind::FileRead => {
            e.flags = Some(row.open_flags);
            if row.mode != 0 {
                e.mode = Some(row.mode);
            }
        }
        _ => {}
    }
    Some(e)
}

pub fn from_dns(row: &DnsEventRow) -> Event {
    let mut e = base(
        Kind::Dns,
        EventTable::Dns,
        (&row.org_id, &row.hostname, row.time_ns, row.seq),
        owner!(row),
    );
    e.dns_name = row.query_name.clone();
    e.remote_ip = ip(&row.server_addr);
    e.remote_port = Some(row.server_port);
    e
}

pub fn from_decision(row: &DecisionRow) -> Event {
    let mut e = base(
        Kind::Decision,
        EventTable::Decision,
        (&row.org_id, &row.hostname, row.time_ns, row.seq),
        owner!(row),
    );
    e.remote_ip = ip(&row.remote_addr);
    e.remote_port = Some(row.remote_port);
    e.verdict = row.verdict.clone();
    e.action = row.action.clone();
    e.rule = row.rule_id.clone();
    e.reason = row.reason.clone();
    e.peer_id = row.peer_id.clone();
    e.enforcement_point = row.enforcement_point.clone();
    e
}

/// A heartbeat (stored in `agents`, which has no sequence numbers: the id
/// is the heartbeat's time).
pub fn from_heartbeat(row: &AgentRow, time_ns: u64) -> Event {
    let mut e = Event::new(Kind::Heartbeat, &row.org_id, &row.hostname, time_ns);
    e.id = event_id(EventTable::Agent, time_ns / 1_000_000_000);
    e
}

/// The events of one stored batch, in the tables' order.
pub fn from_rows(rows: &crate::ingest::TableRows) -> Vec<Event> {
    let mut events = Vec::with_capacity(
        rows.process_events.len()
            + rows.network_events.len()
            + rows.file_events.len()
            + rows.dns_events.len()
            + rows.decisions.len(),
    );
    events.extend(rows.process_events.iter().filter_map(from_process));
    events.extend(rows.network_events.iter().filter_map(from_network));
    events.extend(rows.file_events.iter().filter_map(from_file));
    events.extend(rows.dns_events.iter().map(from_dns));
    events.extend(rows.decisions.iter().map(from_decision));
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_their_table_and_sequence_number() {
        for table in EventTable::ALL {
            for seq in [0, 1, 41, u64::MAX >> 3] {
                assert_eq!(split_event_id(event_id(table, seq)), Some((table, seq)));
            }
        }
        assert_eq!(split_event_id(0), None);
        assert_eq!(split_event_id(7), None);
        assert_ne!(
            event_id(EventTable::Process, 5),
            event_id(EventTable::File, 5)
        );
    }

    #[test]
    fn kind_names_round_trip() {
        for table in EventTable::ALL {
            assert_eq!(EventTable::from_kind_name(table.kind_name()), Some(table));
        }
        assert_eq!(EventTable::from_kind_name("processes"), None);
    }
}
