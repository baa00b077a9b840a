//! Versioned schema migrations.
//!
//! [`MIGRATIONS`] is an ordered list of `(version, name, steps)`. At start
//! the collector creates the database if needed, reads the versions recorded
//! in `<db>.schema_migrations`, and applies the missing ones in order,
//! recording each after all its steps succeeded. Every step is idempotent, so
//! a migration interrupted half-way, or two collectors starting at once,
//! converge on the same schema. Versions are never reused or edited once
//! released: change the schema with a new entry.
//!
//! Steps use bare table names (the client is bound to the database) and must
//! run unchanged on ClickHouse 18.16 and current releases: no TTL, Map,
//! DateTime64 or LowCardinality. ClickHouse 18.16 has no
//! `ADD COLUMN IF NOT EXISTS`, so new columns are a [`Step::AddColumns`]:
//! the collector reads `system.columns` and adds only the missing ones.
//! Tenant tables put `org_id` first in the ordering key and partition by day,
//! so retention is `DROP PARTITION`.

use serde::{Deserialize, Serialize};
use tracing::info;

use super::{Storage, StorageError};

/// Event tables become `ReplacingMergeTree`s whose sorting key ends with the
/// event's identity `(seq, device_id, boot_id)`: a batch stored twice (its
/// acknowledgement was lost and the agent sent it again) is one event after
/// the parts merge, and `FINAL` reads it once before. The key's prefix is
/// unchanged, and so is the analysts' ordering; partitioning stays by day.
macro_rules! dedup {
    ($table:literal, $order_by:literal) => {
        Step::Rebuild {
            table: $table,
            engine_name: "ReplacingMergeTree",
            engine: concat!(
                "ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMMDD(time) ORDER BY ",
                $order_by
            ),
        }
    };
}

/// One schema change.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub steps: &'static [Step],
}

/// One idempotent step of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A statement idempotent by itself (`CREATE TABLE IF NOT EXISTS`).
    Execute(&'static str),
    /// Adds, in this order and in one `ALTER TABLE`, the columns `table`
    /// does not have yet; does nothing when it has them all.
    AddColumns {
        table: &'static str,
        columns: &'static [Column],
    },
    /// Moves `table` to a new engine clause (ClickHouse cannot change a
    /// table's engine or sorting key in place): copies it into
    /// `<table>_rebuild` created `AS table` with `engine`, swaps the names,
    /// copies again what arrived at the old table during the copy, and
    /// drops the old one. Resumable at every point; does nothing once the
    /// table's engine is `engine_name`.
    Rebuild {
        table: &'static str,
        engine_name: &'static str,
        engine: &'static str,
    },
}

/// A column a [`Step::AddColumns`] adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    /// Type and optional default, as in `CREATE TABLE`: `Int16 DEFAULT -1`.
    pub definition: &'static str,
}

const fn column(name: &'static str, definition: &'static str) -> Column {
    Column { name, definition }
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MigrationReport {
    /// Versions applied by this run, in order.
    pub applied: Vec<u32>,
    /// Versions found already recorded.
    pub already_applied: Vec<u32>,
}

/// Name of the bookkeeping table.
pub const MIGRATIONS_TABLE: &str = "schema_migrations";

const CREATE_MIGRATIONS_TABLE: &str = "
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version    UInt32,
    name       String,
    applied_at DateTime
)
ENGINE = ReplacingMergeTree()
ORDER BY version";

const CREATE_PROCESS_EVENTS: &str = "
CREATE TABLE IF NOT EXISTS process_events
(
    org_id             String,
    time               DateTime,
    time_ns            UInt64,
    device_id          String,
    hostname           String,
    boot_id            String,
    seq                UInt64,
    pid                UInt32,
    tid                UInt32,
    ppid               UInt32,
    uid                UInt32,
    gid                UInt32,
    cgroup_id          UInt64,
    filename           String,
    argv               Array(String),
    argv_truncated     UInt8,
    filename_truncated UInt8,
    ppid_unknown       UInt8,
    agent_version      String,
    ingested_at        DateTime
)
ENGINE = MergeTree()
PARTITION BY toYYYYMMDD(time)
ORDER BY (org_id, hostname, time, pid, seq)";

/// Columns of migration 2: fork and exit rows, credentials, ancestry.
pub const PROCESS_EVENTS_V2_COLUMNS: &[Column] = &[
    column("event_type", "String DEFAULT 'exec'"),
    column("euid", "UInt32"),
    column("egid", "UInt32"),
    column("loginuid", "UInt32 DEFAULT 4294967295"),
    column("process_start_ns", "UInt64"),
    column("exe", "String"),
    column("clone_flags", "UInt64"),
    column("exit_status", "Int16 DEFAULT -1"),
    column("exit_signal", "UInt8"),
    column("core_dumped", "UInt8"),
    column("lifetime_ns", "UInt64"),
    column("ancestor_pids", "Array(UInt32)"),
    column("ancestor_exes", "Array(String)"),
    column("ancestor_argv0", "Array(String)"),
    column("ancestor_start_ns", "Array(UInt64)"),
];

/// Columns of migration 6: what an exec ran and as whom, by name.
pub const PROCESS_EVENTS_V6_COLUMNS: &[Column] = &[
    column("exe_sha256", "String"),
    column("user_name", "String"),
];

/// Columns of migration 7: credential changes (`cred_change` rows).
pub const PROCESS_EVENTS_V7_COLUMNS: &[Column] = &[
    column("previous_uid", "UInt32"),
    column("previous_euid", "UInt32"),
    column("previous_gid", "UInt32"),
    column("previous_egid", "UInt32"),
    column("cred_syscall", "String"),
];

/// Columns of migration 8: the container an exec ran in (exec rows; ''
/// otherwise and when unknown).
pub const PROCESS_EVENTS_V8_COLUMNS: &[Column] = &[
    column("cgroup_path", "String"),
    column("container_id", "String"),
];

const CREATE_GAPS: &str = "
CREATE TABLE IF NOT EXISTS gaps
(
    org_id        String,
    time          DateTime,
    time_ns       UInt64,
    device_id     String,
    hostname      String,
    boot_id       String,
    seq           UInt64,
    stream        String,
    reason        String,
    lost          UInt64,
    from_ns       UInt64,
    to_ns         UInt64,
    agent_version String,
    ingested_at   DateTime
)
ENGINE = MergeTree()
PARTITION BY toYYYYMMDD(time)
ORDER BY (org_id, hostname, time, seq)";

const CREATE_NETWORK_EVENTS: &str = "
CREATE TABLE IF NOT EXISTS network_events
(
    org_id            String,
    time              DateTime,
    time_ns           UInt64,
    device_id         String,
    hostname          String,
    boot_id           String,
    seq               UInt64,
    action            String,
    direction         String,
    pid               UInt32,
    owner_unknown     UInt8,
    uid               UInt32,
    gid               UInt32,
    cgroup_id         UInt64,
    exe               String,
    ip_version        UInt8,
    local_addr        String,
    local_port        UInt16,
    remote_addr       String,
    remote_port       UInt16,
    duration_ns       UInt64,
    bytes_sent        UInt64,
    bytes_received    UInt64,
    bytes_unknown     UInt8,
    ancestor_pids     Array(UInt32),
    ancestor_exes     Array(String),
    ancestor_argv0    Array(String),
    ancestor_start_ns Array(UInt64),
    agent_version     String,
    ingested_at       DateTime
)
ENGINE = MergeTree()
PARTITION BY toYYYYMMDD(time)
ORDER BY (org_id, hostname, time, pid, seq)";

const CREATE_FILE_EVENTS: &str = "
CREATE TABLE IF NOT EXISTS file_events
(
    org_id            String,
    time              DateTime,
    time_ns           UInt64,
    device_id         String,
    hostname          String,
    boot_id           String,
    seq               UInt64,
    action            String,
    pid               UInt32,
    uid               UInt32,
    gid               UInt32,
    cgroup_id         UInt64,
    exe               String,
    path              String,
    target_path       String,
    open_flags        UInt32,
    mode              UInt32,
    path_truncated    UInt8,
    ancestor_pids     Array(UInt32),
    ancestor_exes     Array(String),
    ancestor_argv0    Array(String),
    ancestor_start_ns Array(UInt64),
    agent_version     String,
    ingested_at       DateTime
)
ENGINE = MergeTree()
PARTITION BY toYYYYMMDD(time)
ORDER BY (org_id, hostname, time, pid, seq)";

/// Columns of migration 9 on `network_events` and `file_events`: who the
/// process is beyond its ids, as on exec rows (migrations 6 and 8): its user
/// name, cgroup v2 path and container id (`''` when unknown).
pub const OWNER_V9_COLUMNS: &[Column] = &[
    column("user_name", "String"),
    column("cgroup_path", "String"),
    column("container_id", "String"),
];

const CREATE_DNS_EVENTS: &str = "
CREATE TABLE IF NOT EXISTS dns_events
(
    org_id            String,
    time              DateTime,
    time_ns           UInt64,
    device_id         String,
    hostname          String,
    boot_id           String,
    seq               UInt64,
    pid               UInt32,
    owner_unknown     UInt8,
    uid               UInt32,
    gid               UInt32,
    cgroup_id         UInt64,
    exe               String,
    user_name         String,
    cgroup_path       String,
    container_id      String,
    ip_version        UInt8,
    source_addr       String,
    source_port       UInt16,
    server_addr       String,
    server_port       UInt16,
    transaction_id    UInt16,
    query_name        String,
    query_type        String,
    question_count    UInt16,
    message_len       UInt32,
    parse_error       String,
    ancestor_pids     Array(UInt32),
    ancestor_exes     Array(String),
    ancestor_argv0    Array(String),
    ancestor_start_ns Array(UInt64),
    agent_version     String,
    ingested_at       DateTime
)
ENGINE = MergeTree()
PARTITION BY toYYYYMMDD(time)
ORDER BY (org_id, hostname, time, pid, seq)";

/// Zero-trust connection decisions (migration 14). Created directly as the
/// event tables are since migration 13: a `ReplacingMergeTree` whose sorting
/// key ends with the event's identity, so a decision stored twice (a batch
/// resent after its acknowledgement was lost) is one decision.
const CREATE_DECISIONS: &str = "
CREATE TABLE IF NOT EXISTS decisions
(
    org_id            String,
    time              DateTime,
    time_ns           UInt64,
    device_id         String,
    hostname          String,
    boot_id           String,
    seq               UInt64,
    connection_id     String,
    pid               UInt32,
    uid               UInt32,
    gid               UInt32,
    cgroup_id         UInt64,
    exe               String,
    user_name         String,
    cgroup_path       String,
    container_id      String,
    ip_version        UInt8,
    remote_addr       String,
    remote_port       UInt16,
    protocol          String,
    action            String,
    verdict           String,
    rule_id           String,
    policy_version    UInt64,
    enforcement_point String,
    ancestor_pids     Array(UInt32),
    ancestor_exes     Array(String),
    ancestor_argv0    Array(String),
    ancestor_start_ns Array(UInt64),
    agent_version     String,
    ingested_at       DateTime
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMMDD(time)
ORDER BY (org_id, hostname, time, pid, seq, device_id, boot_id)";

/// Columns of migration 15 on `decisions`: tunnels, gateways and why. The
/// executable's hash (as `process_events.exe_sha256`), the other end's
/// SPIFFE id, the gateway service, the direction (`'outbound'` for the rows
/// stored before: only outbound connections were decided then), why a
/// connection was refused or closed, the nearest rules of a default verdict,
/// and the tunnel's gateway.
pub const DECISIONS_V15_COLUMNS: &[Column] = &[
    column("exe_sha256", "String"),
    column("peer_id", "String"),
    column("service", "String"),
    column("direction", "String DEFAULT 'outbound'"),
    column("reason", "String"),
    column("nearest_rules", "Array(String)"),
    column("gateway", "String"),
];

/// Every migration, in version order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "process_events",
        steps: &[Step::Execute(CREATE_PROCESS_EVENTS)],
    },
    Migration {
        version: 2,
        name: "process_lifecycle",
        steps: &[Step::AddColumns {
            table: "process_events",
            columns: PROCESS_EVENTS_V2_COLUMNS,
        }],
    },
    Migration {
        version: 3,
        name: "gaps",
        steps: &[Step::Execute(CREATE_GAPS)],
    },
    Migration {
        version: 4,
        name: "network_events",
        steps: &[Step::Execute(CREATE_NETWORK_EVENTS)],
    },
    Migration {
        version: 5,
        name: "file_events",
        steps: &[Step::Execute(CREATE_FILE_EVENTS)],
    },
    Migration {
        version: 6,
        name: "exec_hash_and_user",
        steps: &[Step::AddColumns {
            table: "process_events",
            columns: PROCESS_EVENTS_V6_COLUMNS,
        }],
    },
    Migration {
        version: 7,
        name: "credential_changes",
        steps: &[Step::AddColumns {
            table: "process_events",
            columns: PROCESS_EVENTS_V7_COLUMNS,
        }],
    },
    Migration {
        version: 8,
        name: "exec_containers",
        steps: &[Step::AddColumns {
            table: "process_events",
            columns: PROCESS_EVENTS_V8_COLUMNS,
        }],
    },
    Migration {
        version: 9,
        name: "network_and_file_owners",
        steps: &[
            Step::AddColumns {
                table: "network_events",
                columns: OWNER_V9_COLUMNS,
            },
            Step::AddColumns {
                table: "file_events",
                columns: OWNER_V9_COLUMNS,
            },
        ],
    },
    Migration {
        version: 10,
        name: "dns_events",
        steps: &[Step::Execute(CREATE_DNS_EVENTS)],
    },
    Migration {
        version: 11,
        name: "agents",
        steps: &[Step::Execute(CREATE_AGENTS)],
    },
    Migration {
        version: 12,
        name: "audit_log",
        steps: &[Step::Execute(CREATE_AUDIT_LOG)],
    },
    Migration {
        version: 13,
        name: "event_dedup",
        steps: &[
            dedup!(
                "process_events",
                "(org_id, hostname, time, pid, seq, device_id, boot_id)"
            ),
            dedup!(
                "network_events",
                "(org_id, hostname, time, pid, seq, device_id, boot_id)"
            ),
            dedup!(
                "file_events",
                "(org_id, hostname, time, pid, seq, device_id, boot_id)"
            ),
            dedup!(
                "dns_events",
                "(org_id, hostname, time, pid, seq, device_id, boot_id)"
            ),
            dedup!("gaps", "(org_id, hostname, time, seq, device_id, boot_id)"),
        ],
    },
    Migration {
        version: 14,
        name: "decisions",
        steps: &[Step::Execute(CREATE_DECISIONS)],
    },
    Migration {
        version: 15,
        name: "decision_tunnels",
        steps: &[Step::AddColumns {
            table: "decisions",
            columns: DECISIONS_V15_COLUMNS,
        }],
    },
    Migration {
        version: 16,
        name: "incidents",
        steps: &[
            Step::Execute(CREATE_INCIDENTS),
            Step::Execute(CREATE_INCIDENT_EVENTS),
        ],
    },
];

/// Every version of every incident; the newest (`updated_ns`) is the
/// incident: `FINAL` reads it, merges keep it.
const CREATE_INCIDENTS: &str = "
CREATE TABLE IF NOT EXISTS incidents
(
    org_id             String,
    incident_id        String,
    opened             DateTime,
    first_seen_ns      UInt64,
    last_seen_ns       UInt64,
    updated_ns         UInt64,
    rule_id            String,
    title              String,
    rule_severity      String,
    severity           String,
    escalation         String,
    mitre              Array(String),
    hostname           String,
    process_tree_root  String,
    spread_hosts       Array(String),
    status             String,
    count              UInt64,
    acknowledged_by    String,
    acknowledged_ns    UInt64,
    resolved_by        String,
    resolved_ns        UInt64,
    note               String
)
ENGINE = ReplacingMergeTree(updated_ns)
PARTITION BY toYYYYMM(opened)
ORDER BY (org_id, incident_id)";

/// The events behind each incident's alerts (`event_id` = `seq * 8 + table`,
/// found again with the organisation, host and time).
const CREATE_INCIDENT_EVENTS: &str = "
CREATE TABLE IF NOT EXISTS incident_events
(
    org_id         String,
    incident_id    String,
    time           DateTime,
    event_time_ns  UInt64,
    event_id       UInt64,
    hostname       String
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(time)
ORDER BY (org_id, incident_id, event_time_ns, event_id)";

/// One row per agent heartbeat: the fleet's state over time. The latest row
/// of a device is its current state (`argMax(..., time)`).
const CREATE_AGENTS: &str = "
CREATE TABLE IF NOT EXISTS agents
(
    org_id                       String,
    time                         DateTime,
    device_id                    String,
    hostname                     String,
    boot_id                      String,
    agent_version                String,
    kernel                       String,
    active_sensors               Array(String),
    policy_version               UInt64,
    certificate_not_after        DateTime,
    certificate_renewals         UInt64,
    certificate_renewal_failures UInt64,
    spool_events                 UInt64,
    spool_bytes                  UInt64,
    kernel_drops                 UInt64,
    bulk_sampled                 UInt64,
    queue_dropped                UInt64,
    events_acked                 UInt64,
    uptime_seconds               UInt64,
    remote_addr                  String
)
ENGINE = MergeTree()
PARTITION BY toYYYYMMDD(time)
ORDER BY (org_id, device_id, time)";

/// Every administrative action: who, what, on what, from where, and how it
/// ended (also refusals).
const CREATE_AUDIT_LOG: &str = "
CREATE TABLE IF NOT EXISTS audit_log
(
    org_id      String,
    time        DateTime,
    time_ns     UInt64,
    actor       String,
    actor_role  String,
    action      String,
    target      String,
    source      String,
    result      String,
    detail      String
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(time)
ORDER BY (org_id, time, time_ns)";

#[derive(Debug, Serialize, Deserialize, clickhouse::Row)]
struct MigrationRow {
    version: u32,
    name: String,
    applied_at: u32,
}

/// Creates the database and bookkeeping table, then applies the migrations
/// of `list` not recorded yet.
pub async fn apply(storage: &Storage, list: &[Migration]) -> Result<MigrationReport, StorageError> {
    let db = storage.database();
    storage
        .execute(&format!("CREATE DATABASE IF NOT EXISTS {db}"), true)
        .await?;
    storage.execute(CREATE_MIGRATIONS_TABLE, false).await?;

    let recorded: Vec<u32> = storage
        .client()
        .query("SELECT DISTINCT version FROM schema_migrations ORDER BY version")
        .fetch_all()
        .await
        .map_err(|error| StorageError::ClickHouse {
            what: "read schema_migrations".to_owned(),
            error,
        })?;

    let mut report = MigrationReport::default();
    for migration in list {
        if recorded.contains(&migration.version) {
            report.already_applied.push(migration.version);
            continue;
        }
        for step in migration.steps {
            run_step(storage, step).await?;
        }
        record(storage, migration).await?;
        info!(
            database = db,
            version = migration.version,
            name = migration.name,
            "applied schema migration"
        );
        report.applied.push(migration.version);
    }
    Ok(report)
}

async fn run_step(storage: &Storage, step: &Step) -> Result<(), StorageError> {
    match *step {
        Step::Execute(sql) => storage.execute(sql, false).await,
        Step::Rebuild {
            table,
            engine_name,
            engine,
        } => rebuild(storage, table, engine_name, engine).await,
        Step::AddColumns { table, columns } => {
            let existing = column_names(storage, table).await?;
            let Some(alter) = add_columns_statement(table, columns, &existing) else {
                return Ok(());
            };
            match storage.execute(&alter, false).await {
                Ok(()) => Ok(()),
                // Another collector may have added them meanwhile (ClickHouse
                // then refuses the duplicate column): fine if all are there.
                Err(error) => {
                    let existing = column_names(storage, table).await?;
                    if add_columns_statement(table, columns, &existing).is_none() {
                        Ok(())
                    } else {
                        Err(error)
                    }
                }
            }
        }
    }
}

/// See [`Step::Rebuild`]. Every state an interrupted run can leave is
/// recognised by which of `table`, `<table>_rebuild` and `<table>_retired`
/// exist and by `table`'s engine.
async fn rebuild(
    storage: &Storage,
    table: &str,
    engine_name: &str,
    engine: &str,
) -> Result<(), StorageError> {
    let staging = format!("{table}_rebuild");
    let retired = format!("{table}_retired");
    match engine_of(storage, table).await? {
        // Interrupted between the two renames: finish the swap.
        None if engine_of(storage, &staging).await?.is_some() => {
            storage
                .execute(&format!("RENAME TABLE {staging} TO {table}"), false)
                .await?;
        }
        None => {
            return Err(StorageError::Migration(format!(
                "cannot rebuild {table}: it does not exist"
            )))
        }
        Some(current) if current == engine_name => {}
        Some(_) => {
            // A half-filled copy of an interrupted run is started over.
            storage
                .execute(&format!("DROP TABLE IF EXISTS {staging}"), false)
                .await?;
            storage
                .execute(
                    &format!("CREATE TABLE {staging} AS {table} {engine}"),
                    false,
                )
                .await?;
            let copy_started = unix_seconds_now().saturating_sub(5);
            storage
                .execute(
                    &format!("INSERT INTO {staging} SELECT * FROM {table}"),
                    false,
                )
                .await?;
            storage
                .execute(
                    &format!("RENAME TABLE {table} TO {retired}, {staging} TO {table}"),
                    false,
                )
                .await?;
            // Rows another collector stored during the copy: copied again,
            // the new engine folds what was copied twice.
            storage
                .execute(
                    &format!(
                        "INSERT INTO {table} SELECT * FROM {retired} WHERE ingested_at >= {copy_started}"
                    ),
                    false,
                )
                .await?;
        }
    }
    storage
        .execute(&format!("DROP TABLE IF EXISTS {retired}"), false)
        .await?;
    storage
        .execute(&format!("DROP TABLE IF EXISTS {staging}"), false)
        .await
}

/// The engine of `table` (`MergeTree`, `ReplacingMergeTree`, …), or `None`
/// when it does not exist.
async fn engine_of(storage: &Storage, table: &str) -> Result<Option<String>, StorageError> {
    storage
        .client()
        .query("SELECT engine FROM system.tables WHERE database = ? AND name = ?")
        .bind(storage.database())
        .bind(table)
        .fetch_optional()
        .await
        .map_err(|error| StorageError::ClickHouse {
            what: format!("read the engine of {table}"),
            error,
        })
}

/// The names of `table`'s columns in the storage's database.
async fn column_names(storage: &Storage, table: &str) -> Result<Vec<String>, StorageError> {
    storage
        .client()
        .query("SELECT name FROM system.columns WHERE database = ? AND table = ?")
        .bind(storage.database())
        .bind(table)
        .fetch_all()
        .await
        .map_err(|error| StorageError::ClickHouse {
            what: format!("read the columns of {table}"),
            error,
        })
}

/// `ALTER TABLE table ADD COLUMN …` for the `columns` not in `existing`, in
/// their order; `None` when none is missing.
fn add_columns_statement(table: &str, columns: &[Column], existing: &[String]) -> Option<String> {
    let missing: Vec<String> = columns
        .iter()
        .filter(|c| !existing.iter().any(|e| e == c.name))
        .map(|c| format!("ADD COLUMN {} {}", c.name, c.definition))
        .collect();
    (!missing.is_empty()).then(|| format!("ALTER TABLE {table} {}", missing.join(", ")))
}

async fn record(storage: &Storage, migration: &Migration) -> Result<(), StorageError> {
    let what = || format!("record migration {}", migration.version);
    let row = MigrationRow {
        version: migration.version,
        name: migration.name.to_owned(),
        applied_at: unix_seconds_now(),
    };
    let mut insert = storage
        .client()
        .insert::<MigrationRow>(MIGRATIONS_TABLE)
        .map_err(|error| StorageError::ClickHouse {
            what: what(),
            error,
        })?;
    insert
        .write(&row)
        .await
        .map_err(|error| StorageError::ClickHouse {
            what: what(),
            error,
        })?;
    insert
        .end()
        .await
        .map_err(|error| StorageError::ClickHouse {
            what: what(),
            error,
        })
}

fn unix_seconds_now() -> u32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use clickhouse::Row;

    use super::*;
    use crate::storage::{
        DecisionRow, DnsEventRow, FileEventRow, GapRow, NetworkEventRow, ProcessEventRow,
        DIRECTION_OUTBOUND,
    };

    #[test]
    fn versions_are_strictly_increasing_and_named() {
        assert!(!MIGRATIONS.is_empty());
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version);
        }
        for m in MIGRATIONS {
            assert!(m.version > 0 && !m.name.is_empty() && !m.steps.is_empty());
        }
    }

    fn sql_of(step: &Step) -> String {
        match *step {
            Step::Execute(sql) => sql.to_owned(),
            Step::AddColumns { table, columns } => {
                add_columns_statement(table, columns, &[]).expect("columns to add")
            }
            Step::Rebuild { table, engine, .. } => {
                format!("CREATE TABLE {table}_rebuild AS {table} {engine}")
            }
        }
    }

    #[test]
    fn event_tables_are_keyed_by_the_event_identity() {
        let v13 = MIGRATIONS.iter().find(|m| m.version == 13).unwrap();
        let mut tables = Vec::new();
        for step in v13.steps {
            let Step::Rebuild {
                table,
                engine_name,
                engine,
            } = *step
            else {
                panic!("migration 13 only rebuilds")
            };
            assert_eq!(engine_name, "ReplacingMergeTree");
            assert!(
                engine.starts_with("ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMMDD(time)")
            );
            assert!(
                engine.contains("ORDER BY (org_id, hostname, time,"),
                "{engine}"
            );
            assert!(engine.ends_with("seq, device_id, boot_id)"), "{engine}");
            tables.push(table);
        }
        assert_eq!(
            tables,
            [
                "process_events",
                "network_events",
                "file_events",
                "dns_events",
                "gaps"
            ]
        );
    }

    #[test]
    fn statements_avoid_what_clickhouse_18_lacks() {
        for m in MIGRATIONS {
            for step in m.steps {
                let upper = sql_of(step).to_ascii_uppercase();
                for banned in ["TTL", "MAP(", "DATETIME64", "LOWCARDINALITY", "ZT."] {
                    assert!(!upper.contains(banned), "{} uses {banned}", m.name);
                }
                // 18.16 refuses `ADD COLUMN IF NOT EXISTS`; AddColumns checks.
                assert!(!upper.contains("ADD COLUMN IF"), "{}", m.name);
                if let Step::Execute(_) = step {
                    assert!(
                        upper.contains("IF NOT EXISTS"),
                        "{} is not idempotent",
                        m.name
                    );
                }
            }
        }
    }

    #[test]
    fn tenant_tables_order_by_org_first() {
        for m in MIGRATIONS {
            for step in m.steps {
                let s = sql_of(step);
                if let Some(at) = s.find("ORDER BY (") {
                    assert!(s[at..].starts_with("ORDER BY (org_id"), "{}", m.name);
                }
            }
        }
    }

    #[test]
    fn add_columns_adds_only_the_missing_ones_in_order() {
        const COLUMNS: &[Column] = &[column("a", "UInt8"), column("b", "Int16 DEFAULT -1")];
        assert_eq!(
            add_columns_statement("t", COLUMNS, &[]).as_deref(),
            Some("ALTER TABLE t ADD COLUMN a UInt8, ADD COLUMN b Int16 DEFAULT -1")
        );
        assert_eq!(
            add_columns_statement("t", COLUMNS, &["x".into(), "a".into()]).as_deref(),
            Some("ALTER TABLE t ADD COLUMN b Int16 DEFAULT -1")
        );
        assert_eq!(
            add_columns_statement("t", COLUMNS, &["b".into(), "a".into()]),
            None
        );
    }

    /// The row types name the columns the migrations create, in order.
    #[test]
    fn row_types_match_the_migrated_columns() {
        let v1: Vec<&str> = column_list(CREATE_PROCESS_EVENTS);
        let v2 = PROCESS_EVENTS_V2_COLUMNS.iter().map(|c| c.name);
        let v6 = PROCESS_EVENTS_V6_COLUMNS.iter().map(|c| c.name);
        let v7 = PROCESS_EVENTS_V7_COLUMNS.iter().map(|c| c.name);
        let v8 = PROCESS_EVENTS_V8_COLUMNS.iter().map(|c| c.name);
        let process_events: Vec<&str> = v1
            .into_iter()
            .chain(v2)
            .chain(v6)
            .chain(v7)
            .chain(v8)
            .collect();
        assert_eq!(ProcessEventRow::COLUMN_NAMES, process_events.as_slice());
        assert_eq!(GapRow::COLUMN_NAMES, column_list(CREATE_GAPS).as_slice());
        let v9 = || OWNER_V9_COLUMNS.iter().map(|c| c.name);
        let network_events: Vec<&str> = column_list(CREATE_NETWORK_EVENTS)
            .into_iter()
            .chain(v9())
            .collect();
        assert_eq!(NetworkEventRow::COLUMN_NAMES, network_events.as_slice());
        let file_events: Vec<&str> = column_list(CREATE_FILE_EVENTS)
            .into_iter()
            .chain(v9())
            .collect();
        assert_eq!(FileEventRow::COLUMN_NAMES, file_events.as_slice());
        assert_eq!(
            DnsEventRow::COLUMN_NAMES,
            column_list(CREATE_DNS_EVENTS).as_slice()
        );
        let decisions: Vec<&str> = column_list(CREATE_DECISIONS)
            .into_iter()
            .chain(DECISIONS_V15_COLUMNS.iter().map(|c| c.name))
            .collect();
        assert_eq!(DecisionRow::COLUMN_NAMES, decisions.as_slice());
    }

    /// `decisions` is created keyed by the event's identity, with the same
    /// engine clause migration 13 gives `dns_events` (and the other tables
    /// whose rows name a process).
    #[test]
    fn decisions_are_created_keyed_by_the_event_identity() {
        let v14 = MIGRATIONS.iter().find(|m| m.version == 14).unwrap();
        assert_eq!(v14.name, "decisions");
        assert_eq!(v14.steps, [Step::Execute(CREATE_DECISIONS)]);
        let v13 = MIGRATIONS.iter().find(|m| m.version == 13).unwrap();
        let dns_engine = v13
            .steps
            .iter()
            .find_map(|step| match *step {
                Step::Rebuild {
                    table: "dns_events",
                    engine,
                    ..
                } => Some(engine),
                _ => None,
            })
            .unwrap();
        let clause = CREATE_DECISIONS[CREATE_DECISIONS.find("\n)\n").unwrap() + 3..]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(clause, dns_engine);
        assert!(CREATE_DECISIONS.starts_with("\nCREATE TABLE IF NOT EXISTS decisions\n"));
    }

    /// `decisions`, after every migration, spells every column it shares
    /// with `dns_events`, `network_events` and `process_events` the same
    /// way, with the same type (the owner columns, `ip_version`,
    /// `remote_addr`, `remote_port`, the ancestry; since migration 15
    /// `direction` as on `network_events` and `exe_sha256` as on
    /// `process_events`), so analysts can join them; identity first and
    /// ingest last in the created table, as in every event table (migration
    /// 15 appends after them, as migration 9 does on `network_events`).
    #[test]
    fn decisions_share_column_types_with_the_other_event_tables() {
        let created = column_types(CREATE_DECISIONS);
        let decisions: Vec<(&str, &str)> = created
            .iter()
            .copied()
            .chain(typed(DECISIONS_V15_COLUMNS))
            .collect();
        let process_events: Vec<(&str, &str)> = column_types(CREATE_PROCESS_EVENTS)
            .into_iter()
            .chain(typed(PROCESS_EVENTS_V2_COLUMNS))
            .chain(typed(PROCESS_EVENTS_V6_COLUMNS))
            .chain(typed(PROCESS_EVENTS_V7_COLUMNS))
            .chain(typed(PROCESS_EVENTS_V8_COLUMNS))
            .collect();
        let network_events: Vec<(&str, &str)> = column_types(CREATE_NETWORK_EVENTS)
            .into_iter()
            .chain(typed(OWNER_V9_COLUMNS))
            .collect();
        let mut shared = Vec::new();
        for (table, sibling) in [
            ("dns_events", column_types(CREATE_DNS_EVENTS)),
            ("network_events", network_events),
            ("process_events", process_events),
        ] {
            for (name, ty) in sibling {
                if let Some((_, own)) = decisions.iter().find(|(n, _)| *n == name) {
                    assert_eq!(*own, ty, "{table}.{name}");
                    shared.push((table, name));
                }
            }
        }
        assert!(shared.len() >= 3 * 20, "{} shared columns", shared.len());
        for column in [
            ("network_events", "direction"),
            ("process_events", "exe_sha256"),
        ] {
            assert!(shared.contains(&column), "{column:?} not shared");
        }
        for c in OWNER_V9_COLUMNS {
            assert!(
                created.contains(&(c.name, c.definition)),
                "decisions lacks {} {}",
                c.name,
                c.definition
            );
        }
        let names: Vec<&str> = created.iter().map(|(n, _)| *n).collect();
        let dns = column_list(CREATE_DNS_EVENTS);
        assert_eq!(names[..7], dns[..7]);
        assert_eq!(names[names.len() - 6..], dns[dns.len() - 6..]);
    }

    /// Migration 15 only adds columns to `decisions`, each new to it (a
    /// column step skips a name the table has, whatever its type), once;
    /// rows stored before read `direction = 'outbound'` (only outbound
    /// connections were decided then) and neutral values elsewhere.
    #[test]
    fn decision_tunnel_columns_are_added_once_with_neutral_defaults() {
        let v15 = MIGRATIONS.iter().find(|m| m.version == 15).unwrap();
        assert_eq!(v15.name, "decision_tunnels");
        assert_eq!(
            v15.steps,
            [Step::AddColumns {
                table: "decisions",
                columns: DECISIONS_V15_COLUMNS,
            }]
        );
        let created = column_list(CREATE_DECISIONS);
        for (i, c) in DECISIONS_V15_COLUMNS.iter().enumerate() {
            assert!(!created.contains(&c.name), "decisions has {}", c.name);
            assert!(
                !DECISIONS_V15_COLUMNS[..i].iter().any(|o| o.name == c.name),
                "{} twice",
                c.name
            );
        }
        let names: Vec<&str> = DECISIONS_V15_COLUMNS.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "exe_sha256",
                "peer_id",
                "service",
                "direction",
                "reason",
                "nearest_rules",
                "gateway"
            ]
        );
        for c in DECISIONS_V15_COLUMNS {
            let expected = match c.name {
                "direction" => format!("String DEFAULT '{DIRECTION_OUTBOUND}'"),
                "nearest_rules" => "Array(String)".to_owned(),
                _ => "String".to_owned(),
            };
            assert_eq!(c.definition, expected, "{}", c.name);
        }
        assert_eq!(
            add_columns_statement("decisions", DECISIONS_V15_COLUMNS, &[]).as_deref(),
            Some(
                "ALTER TABLE decisions ADD COLUMN exe_sha256 String, \
                 ADD COLUMN peer_id String, ADD COLUMN service String, \
                 ADD COLUMN direction String DEFAULT 'outbound', \
                 ADD COLUMN reason String, ADD COLUMN nearest_rules Array(String), \
                 ADD COLUMN gateway String"
            )
        );
    }

    /// `(name, type)` of added columns: their definition without a default.
    fn typed(columns: &[Column]) -> impl Iterator<Item = (&str, &str)> {
        columns.iter().map(|c| {
            let ty = c.definition.split(" DEFAULT ").next().unwrap_or_default();
            (c.name, ty)
        })
    }

    /// The owner columns migration 9 adds to `network_events` and
    /// `file_events` are named and typed as on `process_events` (migrations
    /// 6 and 8) and in `dns_events`, so one query shape fits every table.
    #[test]
    fn owner_columns_match_across_tables() {
        let on_process_events: Vec<Column> = PROCESS_EVENTS_V6_COLUMNS
            .iter()
            .chain(PROCESS_EVENTS_V8_COLUMNS)
            .filter(|c| c.name != "exe_sha256")
            .copied()
            .collect();
        assert_eq!(on_process_events, OWNER_V9_COLUMNS);
        let dns = column_types(CREATE_DNS_EVENTS);
        for c in OWNER_V9_COLUMNS {
            assert!(
                dns.contains(&(c.name, c.definition)),
                "dns_events lacks {} {}",
                c.name,
                c.definition
            );
        }
        let v9 = MIGRATIONS.iter().find(|m| m.version == 9).unwrap();
        let tables: Vec<&str> = v9
            .steps
            .iter()
            .map(|step| match *step {
                Step::AddColumns { table, columns } => {
                    assert_eq!(columns, OWNER_V9_COLUMNS);
                    table
                }
                Step::Execute(sql) => panic!("migration 9 only adds columns: {sql}"),
                Step::Rebuild { table, .. } => panic!("migration 9 only adds columns: {table}"),
            })
            .collect();
        assert_eq!(tables, ["network_events", "file_events"]);
    }

    /// `dns_events` spells every column it shares with `file_events` or
    /// `network_events` the same way, with the same type, so analysts can
    /// join and union them.
    #[test]
    fn dns_events_shares_column_types_with_its_siblings() {
        let dns = column_types(CREATE_DNS_EVENTS);
        let mut shared = 0;
        for sibling in [CREATE_FILE_EVENTS, CREATE_NETWORK_EVENTS] {
            for (name, ty) in column_types(sibling) {
                if let Some((_, dns_ty)) = dns.iter().find(|(n, _)| *n == name) {
                    assert_eq!(*dns_ty, ty, "{name}");
                    shared += 1;
                }
            }
        }
        assert!(shared >= 2 * 17, "{shared} shared columns");
        // Identity first and ingest last, as in every event table.
        let names: Vec<&str> = dns.iter().map(|(n, _)| *n).collect();
        assert_eq!(names[..7], column_list(CREATE_FILE_EVENTS)[..7]);
        assert_eq!(names[names.len() - 6..], {
            let file = column_list(CREATE_FILE_EVENTS);
            file[file.len() - 6..].to_vec()
        });
    }

    /// `(name, type)` of a `CREATE TABLE` laid out one column per line.
    fn column_types(create: &str) -> Vec<(&str, &str)> {
        let body = &create[create.find('(').unwrap() + 1..create.find("\n)").unwrap()];
        body.lines()
            .filter_map(|line| {
                let line = line.trim().trim_end_matches(',');
                line.split_once(char::is_whitespace)
                    .map(|(n, t)| (n, t.trim()))
            })
            .collect()
    }

    /// Column names of a `CREATE TABLE` laid out one column per line.
    fn column_list(create: &str) -> Vec<&str> {
        let body = &create[create.find('(').unwrap() + 1..create.find("\n)").unwrap()];
        body.lines()
            .filter_map(|line| line.split_whitespace().next())
            .collect()
    }
}
