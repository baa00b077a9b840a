//! ClickHouse storage: the client, schema migrations and the row types of the
//! event tables (`process_events`, `gaps`, `network_events`, `file_events`,
//! `dns_events`, `decisions`).
//!
//! Talks to ClickHouse over HTTP (RowBinary) with the `clickhouse` crate.
//! The schema runs unchanged on ClickHouse 18.16 and current releases.
//! Inserts go through a client bound to the database, with bare table names
//! (`insert("process_events")`): the crate quotes `zt.process_events` as one
//! identifier. Errors are classified retriable (network, overload, timeouts)
//! or permanent (schema, syntax, authentication), so the writer knows whether
//! to keep retrying.

pub mod migrations;
pub mod rows;

use std::time::Duration;

use crate::config::{is_identifier, ClickHouseConfig};

pub use self::{
    migrations::{Column, Migration, MigrationReport, Step, MIGRATIONS},
    rows::{
        AgentRow, AuditRow, DecisionRow, DnsEventRow, FileEventRow, GapRow, NetworkEventRow,
        ProcessEventRow, TableRow, CRED_SYSCALLS, DECISION_ACTIONS, DECISION_ALLOW, DECISION_AUDIT,
        DECISION_DENY, DECISION_DIRECTIONS, DECISION_PROTOCOLS, DECISION_REASONS, DECISION_TUNNEL,
        DECISION_VERDICTS, DIRECTION_INBOUND, DIRECTION_LISTEN, DIRECTION_OUTBOUND,
        DIRECTION_UNKNOWN, ENFORCEMENT_GATEWAY, ENFORCEMENT_KERNEL, ENFORCEMENT_KERNEL_INGRESS,
        ENFORCEMENT_POINTS, ENFORCEMENT_TUNNEL, EVENT_TYPE_CRED_CHANGE, EVENT_TYPE_EXEC,
        EVENT_TYPE_EXIT, EVENT_TYPE_FORK, FILE_CHMOD, FILE_OPEN_READ, FILE_OPEN_WRITE, FILE_RENAME,
        FILE_UNLINK, NO_EXIT_STATUS, NO_LOGINUID, TCP_ACCEPTED, TCP_CLOSED, TCP_CONNECTED,
        TCP_CONNECT_ATTEMPT, TCP_CONNECT_FAILED, TCP_LISTEN, VERDICT_ALLOWED, VERDICT_CLOSED,
        VERDICT_DENIED, VERDICT_TUNNELLED, VERDICT_WOULD_DENY,
    },
};

/// How long one query (DDL, ping, select) may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeouts of an INSERT: sending the rows, then waiting for ClickHouse.
const INSERT_SEND_TIMEOUT: Duration = Duration::from_secs(10);
const INSERT_END_TIMEOUT: Duration = Duration::from_secs(30);

/// ClickHouse error codes that retrying cannot fix.
const PERMANENT_CODES: &[u32] = &[
    16,  // NO_SUCH_COLUMN_IN_TABLE
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    36,  // BAD_ARGUMENTS
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    46,  // UNKNOWN_FUNCTION
    47,  // UNKNOWN_IDENTIFIER
    53,  // TYPE_MISMATCH
    60,  // UNKNOWN_TABLE
    62,  // SYNTAX_ERROR
    81,  // UNKNOWN_DATABASE
    115, // UNKNOWN_SETTING
    164, // READONLY
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    194, // REQUIRED_PASSWORD
    195, // IP_ADDRESS_NOT_ALLOWED
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
];

/// A failed ClickHouse operation.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{what}: {error}")]
    ClickHouse {
        what: String,
        error: clickhouse::error::Error,
    },
    #[error("{what}: timed out after {} s", after.as_secs())]
    Timeout { what: String, after: Duration },
    #[error("invalid database name {0:?}")]
    InvalidDatabase(String),
    #[error("schema migration: {0}")]
    Migration(String),
}

impl StorageError {
    pub(crate) fn clickhouse(
        what: impl Into<String>,
        error: clickhouse::error::Error,
    ) -> StorageError {
        StorageError::ClickHouse {
            what: what.into(),
            error,
        }
    }

    /// Whether the same request may succeed later (network trouble, server
    /// restarting or overloaded), as opposed to a permanent refusal.
    pub fn is_retriable(&self) -> bool {
        match self {
            StorageError::Timeout { .. } => true,
            StorageError::InvalidDatabase(_) | StorageError::Migration(_) => false,
            StorageError::ClickHouse { error, .. } => is_retriable(error),
        }
    }
}

/// Classifies a `clickhouse` crate error; see [`StorageError::is_retriable`].
pub fn is_retriable(error: &clickhouse::error::Error) -> bool {
    match error {
        clickhouse::error::Error::Network(_) | clickhouse::error::Error::TimedOut => true,
        clickhouse::error::Error::BadResponse(text) => match exception_code(text) {
            Some(code) => !PERMANENT_CODES.contains(&code),
            // No ClickHouse exception: a bare HTTP status from the server or
            // a proxy ("503 Service Unavailable"). 5xx may pass, 4xx will not.
            None => !text.starts_with('4'),
        },
        // Serialization, decompression, protocol mismatches: retrying the
        // same rows gives the same result.
        _ => false,
    }
}

/// The `NNN` of `Code: NNN` in a ClickHouse exception text.
fn exception_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + "Code: ".len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Handle to one ClickHouse database; cheap to clone.
///
/// Inserts are LZ4-compressed. Queries are not: ClickHouse 18.16 answers a
/// `compress=1` SELECT in RowBinary with an empty body.
#[derive(Clone)]
pub struct Storage {
    /// Bound to `database`, uncompressed: queries and DDL, bare table names.
    client: clickhouse::Client,
    /// Bound to `database`, LZ4: inserts, bare table names.
    inserter: clickhouse::Client,
    /// Bound to no database: ping and `CREATE DATABASE` work before it exists.
    server: clickhouse::Client,
    url: String,
    database: String,
}

impl Storage {
    pub fn new(config: &ClickHouseConfig) -> Result<Storage, StorageError> {
        if !is_identifier(&config.database) {
            return Err(StorageError::InvalidDatabase(config.database.clone()));
        }
        let mut base = clickhouse::Client::default()
            .with_url(&config.url)
            .with_user(&config.user);
        if !config.password.is_empty() {
            base = base.with_password(&config.password);
        }
        let inserter = base
            .clone()
            .with_database(&config.database)
            .with_compression(clickhouse::Compression::Lz4);
        let server = base.with_compression(clickhouse::Compression::None);
        let client = server.clone().with_database(&config.database);
        Ok(Storage {
            client,
            inserter,
            server,
            url: config.url.clone(),
            database: config.database.clone(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// The client bound to the database, for queries outside this module.
    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// `SELECT 1` on the server, bounded by `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<(), StorageError> {
        let what = format!("ping {}", self.url);
        let query = self.server.query("SELECT 1").fetch_one::<u8>();
        match tokio::time::timeout(timeout, query).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(StorageError::clickhouse(what, error)),
            Err(_) => Err(StorageError::Timeout {
                what,
                after: timeout,
            }),
        }
    }

    /// Applies the migrations not yet recorded; see [`migrations`].
    pub async fn migrate(&self) -> Result<MigrationReport, StorageError> {
        migrations::apply(self, MIGRATIONS).await
    }

    /// Applies the migrations up to and including `version` that are not
    /// recorded yet: a database at an older schema, for upgrade tests.
    pub async fn migrate_to(&self, version: u32) -> Result<MigrationReport, StorageError> {
        let upto = MIGRATIONS.partition_point(|m| m.version <= version);
        migrations::apply(self, &MIGRATIONS[..upto]).await
    }

    /// Inserts rows into their table (`R::TABLE`) in one INSERT.
    pub async fn insert<R: TableRow>(&self, rows: &[R]) -> Result<(), StorageError> {
        let what = format!("insert into {}", R::TABLE);
        let what = what.as_str();
        let mut insert = self
            .inserter
            .insert::<R>(R::TABLE)
            .map_err(|e| StorageError::clickhouse(what, e))?
            .with_timeouts(Some(INSERT_SEND_TIMEOUT), Some(INSERT_END_TIMEOUT));
        for row in rows {
            insert
                .write(row)
                .await
                .map_err(|e| StorageError::clickhouse(what, e))?;
        }
        insert
            .end()
            .await
            .map_err(|e| StorageError::clickhouse(what, e))
    }

    /// Runs one statement on the database-bound client (or the server client
    /// when `on_server`), bounded by the query timeout.
    async fn execute(&self, sql: &str, on_server: bool) -> Result<(), StorageError> {
        let client = if on_server {
            &self.server
        } else {
            &self.client
        };
        let what = format!("execute `{}`", first_line(sql));
        match tokio::time::timeout(QUERY_TIMEOUT, client.query(sql).execute()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(StorageError::clickhouse(what, error)),
            Err(_) => Err(StorageError::Timeout {
                what,
                after: QUERY_TIMEOUT,
            }),
        }
    }
}

fn first_line(sql: &str) -> &str {
    sql.trim().lines().next().unwrap_or_default().trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_clickhouse_errors() {
        let bad = |s: &str| clickhouse::error::Error::BadResponse(s.to_owned());
        assert!(is_retriable(&clickhouse::error::Error::TimedOut));
        assert!(is_retriable(&clickhouse::error::Error::Network(
            "refused".into()
        )));
        assert!(is_retriable(&bad("503 Service Unavailable")));
        assert!(is_retriable(&bad(
            "Code: 252, e.displayText() = DB::Exception: Too many parts"
        )));
        assert!(is_retriable(&bad(
            "Code: 241. DB::Exception: Memory limit exceeded"
        )));
        assert!(!is_retriable(&bad(
            "Code: 60, e.displayText() = DB::Exception: Table zt.x doesn't exist"
        )));
        assert!(!is_retriable(&bad(
            "Code: 516. DB::Exception: default: Authentication failed"
        )));
        assert!(!is_retriable(&bad("404 Not Found")));
        assert!(!is_retriable(&clickhouse::error::Error::Custom(
            "serde".into()
        )));
    }

    #[test]
    fn reads_exception_codes() {
        assert_eq!(exception_code("Code: 81, e.displayText() = x"), Some(81));
        assert_eq!(exception_code("Code: 62. DB::Exception"), Some(62));
        assert_eq!(exception_code("no code"), None);
    }

    #[test]
    fn refuses_unsafe_database_names() {
        let config = ClickHouseConfig {
            database: "zt`; DROP".to_owned(),
            ..Default::default()
        };
        assert!(matches!(
            Storage::new(&config),
            Err(StorageError::InvalidDatabase(_))
        ));
    }
}
