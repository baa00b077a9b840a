//! Row types of the event tables, field for field in column order. The
//! column names are public (analysts query them): see `docs/schema.md`.

use serde::{Deserialize, Serialize};

/// One row of `process_events`: a process executed a program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct ProcessEventRow {
    pub org_id: String,
    /// Event wall time, seconds since the Unix epoch (`DateTime`).
    pub time: u32,
    /// Event wall time, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    pub device_id: String,
    pub hostname: String,
    pub boot_id: String,
    pub seq: u64,
    pub pid: u32,
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub filename: String,
    pub argv: Vec<String>,
    pub argv_truncated: u8,
    pub filename_truncated: u8,
    pub ppid_unknown: u8,
    pub agent_version: String,
    /// When the collector received the event, seconds (`DateTime`).
    pub ingested_at: u32,
}

impl ProcessEventRow {
    /// Bare table name, for a client bound to the database.
    pub const TABLE: &'static str = "process_events";
}
