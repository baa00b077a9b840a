//! Versioned schema migrations.
//!
//! [`MIGRATIONS`] is an ordered list of `(version, name, statements)`. At
//! start the collector creates the database if needed, reads the versions
//! recorded in `<db>.schema_migrations`, and applies the missing ones in
//! order, recording each after all its statements succeeded. Every statement
//! is idempotent (`IF NOT EXISTS`), so a migration interrupted half-way, or
//! two collectors starting at once, converge on the same schema. Versions are
//! never reused or edited once released: change the schema with a new entry.
//!
//! Statements use bare table names (the client is bound to the database) and
//! must run unchanged on ClickHouse 18.16 and current releases: no TTL, Map,
//! DateTime64 or LowCardinality. Tenant tables put `org_id` first in the
//! ordering key and partition by day, so retention is `DROP PARTITION`.

use serde::{Deserialize, Serialize};
use tracing::info;

use super::{Storage, StorageError};

/// One schema change.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub statements: &'static [&'static str],
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

/// Every migration, in version order.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "process_events",
    statements: &[CREATE_PROCESS_EVENTS],
}];

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
        for statement in migration.statements {
            storage.execute(statement, false).await?;
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
    use super::*;

    #[test]
    fn versions_are_strictly_increasing_and_named() {
        assert!(!MIGRATIONS.is_empty());
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version);
        }
        for m in MIGRATIONS {
            assert!(m.version > 0 && !m.name.is_empty() && !m.statements.is_empty());
        }
    }

    #[test]
    fn statements_avoid_what_clickhouse_18_lacks() {
        for m in MIGRATIONS {
            for s in m.statements {
                let upper = s.to_ascii_uppercase();
                for banned in ["TTL", "MAP(", "DATETIME64", "LOWCARDINALITY", "ZT."] {
                    assert!(!upper.contains(banned), "{} uses {banned}", m.name);
                }
                assert!(
                    upper.contains("IF NOT EXISTS"),
                    "{} is not idempotent",
                    m.name
                );
            }
        }
    }

    #[test]
    fn tenant_tables_order_by_org_first() {
        for m in MIGRATIONS {
            for s in m.statements {
                if let Some(at) = s.find("ORDER BY (") {
                    assert!(s[at..].starts_with("ORDER BY (org_id"), "{}", m.name);
                }
            }
        }
    }
}
