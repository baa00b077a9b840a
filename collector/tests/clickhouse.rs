//! The collector against a real ClickHouse (a private server per test, see
//! `zt_e2e::clickhouse`): migrations (fresh, rerun, upgrades of older
//! databases), the gRPC ingest path end to end for every event kind (process
//! events, TCP connections, file activity, DNS queries, connection decisions,
//! gaps), start-up failure, and a
//! ClickHouse outage while agents send.

use std::time::Duration;

use clickhouse::Row;
use proto::{
    control::{control_client::ControlClient, StatusRequest},
    telemetry::{
        event::Kind, telemetry_client::TelemetryClient, AgentIdentity, Ancestor, BatchAck,
        CredentialChange, Decision, DnsQuery, Event, EventBatch, FileActivity, Gap, ProcessExec,
        ProcessExit, ProcessFork, TcpConnection,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use zt_collector::{
    config::{BatchConfig, ClickHouseConfig, IdentityConfig},
    storage::{
        DecisionRow, DnsEventRow, FileEventRow, GapRow, NetworkEventRow, ProcessEventRow, Storage,
        TableRow, MIGRATIONS,
    },
    CollectorConfig,
};
use zt_e2e::clickhouse::{fresh_database_name, ClickHouseServer};

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("zt_collector=debug,info")
        .with_test_writer()
        .try_init();
}

const ANY_LOOPBACK_PORT: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0),
);

fn config_for(server: &ClickHouseServer, database: &str) -> CollectorConfig {
    CollectorConfig {
        listen: ANY_LOOPBACK_PORT,
        clickhouse: ClickHouseConfig {
            url: server.http_url(),
            database: database.to_owned(),
            startup_timeout_secs: 10,
            ..Default::default()
        },
        batch: BatchConfig {
            max_delay_ms: 50,
            ..Default::default()
        },
        identity: IdentityConfig {
            // Kept after the test, like the database: small, and useful
            // when a test fails.
            state_dir: tempfile::Builder::new()
                .prefix("zt-collector-state-")
                .tempdir()
                .expect("a state directory")
                .keep(),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A device certificate from the collector's CA for [`identity`]'s device,
/// and a TLS channel to the collector with it.
async fn device_channel(collector: &zt_collector::RunningCollector) -> tonic::transport::Channel {
    let tls = zt_e2e::pki::device_tls(collector.state_dir(), "pref-test", "device-7")
        .expect("a device certificate");
    zt_grpc_tls::channel(&format!("https://{}", collector.local_addr()), tls)
        .await
        .expect("connect to the collector")
}

fn identity() -> AgentIdentity {
    AgentIdentity {
        org_id: "pref-test".into(),
        device_id: "device-7".into(),
        hostname: "pc-007".into(),
        boot_id: "0b5e2f4c-boot".into(),
        agent_version: "0.1.0-test".into(),
    }
}

const T0_NS: u64 = 1_750_000_000_000_000_000;

fn exec(seq: u64, pid: u32) -> Event {
    Event {
        seq,
        time_unix_ns: T0_NS + seq * 1_000_000,
        ancestors: Vec::new(),
        kind: Some(Kind::Exec(ProcessExec {
            pid,
            tid: pid,
            ppid: 1,
            uid: 1000,
            gid: 100,
            cgroup_id: 4242,
            filename: "/usr/bin/ls".into(),
            argv: vec!["ls".into(), "-l".into(), "/tmp".into()],
            argv_truncated: false,
            filename_truncated: seq.is_multiple_of(2),
            ppid_unknown: false,
            ..Default::default()
        })),
    }
}

/// An open telemetry stream: send batches, read acks.
struct AgentStream {
    tx: mpsc::Sender<EventBatch>,
    acks: Streaming<BatchAck>,
}

impl AgentStream {
    async fn open(collector: &zt_collector::RunningCollector) -> AgentStream {
        let mut client = TelemetryClient::new(device_channel(collector).await);
        let (tx, rx) = mpsc::channel(8);
        let acks = client
            .stream(ReceiverStream::new(rx))
            .await
            .expect("open the telemetry stream")
            .into_inner();
        AgentStream { tx, acks }
    }

    async fn send(&mut self, batch: EventBatch) {
        self.tx.send(batch).await.expect("send a batch");
    }

    async fn ack(&mut self, within: Duration) -> BatchAck {
        tokio::time::timeout(within, self.acks.message())
            .await
            .expect("ack in time")
            .expect("stream healthy")
            .expect("an ack")
    }
}

async fn stored_rows(server: &ClickHouseServer, database: &str) -> Vec<ProcessEventRow> {
    server
        .client()
        .with_database(database)
        .query("SELECT ?fields FROM process_events ORDER BY seq")
        .fetch_all::<ProcessEventRow>()
        .await
        .expect("select process_events")
}

#[tokio::test]
async fn migrations_apply_on_a_fresh_database_and_are_idempotent() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("migrations");
    let config = config_for(&server, &database);
    let storage = Storage::new(&config.clickhouse).unwrap();

    let first = storage.migrate().await.unwrap();
    let all: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(first.applied, all);
    assert!(first.already_applied.is_empty());

    let second = storage.migrate().await.unwrap();
    assert!(second.applied.is_empty());
    assert_eq!(second.already_applied, all);

    let client = server.client().with_database(&database);
    let recorded: Vec<u32> = client
        .query("SELECT version FROM schema_migrations ORDER BY version")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(recorded, all, "each version recorded once");

    assert_eq!(
        table_columns(&server, &database, "process_events").await,
        sorted(PROCESS_EVENTS_COLUMNS)
    );
    assert_eq!(
        table_columns(&server, &database, "gaps").await,
        sorted(GAPS_COLUMNS)
    );
    assert_keys(
        &server,
        &database,
        "process_events",
        "org_id, hostname, time, pid, seq, device_id, boot_id",
    )
    .await;
    assert_keys(
        &server,
        &database,
        "gaps",
        "org_id, hostname, time, seq, device_id, boot_id",
    )
    .await;
    assert_eq!(
        table_columns(&server, &database, "network_events").await,
        sorted(NETWORK_EVENTS_COLUMNS)
    );
    assert_keys(
        &server,
        &database,
        "network_events",
        "org_id, hostname, time, pid, seq, device_id, boot_id",
    )
    .await;
    assert_eq!(
        table_columns(&server, &database, "file_events").await,
        sorted(FILE_EVENTS_COLUMNS)
    );
    assert_keys(
        &server,
        &database,
        "file_events",
        "org_id, hostname, time, pid, seq, device_id, boot_id",
    )
    .await;
    assert_eq!(
        table_columns(&server, &database, "dns_events").await,
        sorted(DNS_EVENTS_COLUMNS)
    );
    assert_keys(
        &server,
        &database,
        "dns_events",
        "org_id, hostname, time, pid, seq, device_id, boot_id",
    )
    .await;
    assert_eq!(
        table_columns(&server, &database, "decisions").await,
        sorted(DECISIONS_COLUMNS)
    );
    assert_keys(
        &server,
        &database,
        "decisions",
        "org_id, hostname, time, pid, seq, device_id, boot_id",
    )
    .await;
    let engines: Vec<(String, String)> = client
        .query(
            "SELECT name, engine FROM system.tables WHERE database = ? \
             AND name IN ('process_events', 'network_events', 'file_events', 'dns_events', \
             'decisions', 'gaps') ORDER BY name",
        )
        .bind(&database)
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(engines.len(), 6, "{engines:?}");
    for (table, engine) in &engines {
        assert_eq!(engine, "ReplacingMergeTree", "{table}");
    }

    // The steps themselves are idempotent: with the bookkeeping lost, every
    // migration runs again over the existing schema, and changes nothing.
    client
        .query("DROP TABLE schema_migrations")
        .execute()
        .await
        .unwrap();
    let third = storage.migrate().await.unwrap();
    assert_eq!(third.applied, all);
    assert_eq!(
        table_columns(&server, &database, "process_events").await,
        sorted(PROCESS_EVENTS_COLUMNS)
    );
    assert_eq!(
        table_columns(&server, &database, "network_events").await,
        sorted(NETWORK_EVENTS_COLUMNS)
    );
    assert_eq!(
        table_columns(&server, &database, "file_events").await,
        sorted(FILE_EVENTS_COLUMNS)
    );
    assert_eq!(
        table_columns(&server, &database, "dns_events").await,
        sorted(DNS_EVENTS_COLUMNS)
    );
    assert_eq!(
        table_columns(&server, &database, "decisions").await,
        sorted(DECISIONS_COLUMNS)
    );
}

/// Every migration's version: what a rerun finds recorded.
const ALL_VERSIONS: [u32; 16] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

/// Columns of `zt.process_events` after every migration, with their types.
const PROCESS_EVENTS_COLUMNS: &[(&str, &str)] = &[
    // Migration 1.
    ("org_id", "String"),
    ("time", "DateTime"),
    ("time_ns", "UInt64"),
    ("device_id", "String"),
    ("hostname", "String"),
    ("boot_id", "String"),
    ("seq", "UInt64"),
    ("pid", "UInt32"),
    ("tid", "UInt32"),
    ("ppid", "UInt32"),
    ("uid", "UInt32"),
    ("gid", "UInt32"),
    ("cgroup_id", "UInt64"),
    ("filename", "String"),
    ("argv", "Array(String)"),
    ("argv_truncated", "UInt8"),
    ("filename_truncated", "UInt8"),
    ("ppid_unknown", "UInt8"),
    ("agent_version", "String"),
    ("ingested_at", "DateTime"),
    // Migration 2.
    ("event_type", "String"),
    ("euid", "UInt32"),
    ("egid", "UInt32"),
    ("loginuid", "UInt32"),
    ("process_start_ns", "UInt64"),
    ("exe", "String"),
    ("clone_flags", "UInt64"),
    ("exit_status", "Int16"),
    ("exit_signal", "UInt8"),
    ("core_dumped", "UInt8"),
    ("lifetime_ns", "UInt64"),
    ("ancestor_pids", "Array(UInt32)"),
    ("ancestor_exes", "Array(String)"),
    ("ancestor_argv0", "Array(String)"),
    ("ancestor_start_ns", "Array(UInt64)"),
    // Migration 6.
    ("exe_sha256", "String"),
    ("user_name", "String"),
    // Migration 7.
    ("previous_uid", "UInt32"),
    ("previous_euid", "UInt32"),
    ("previous_gid", "UInt32"),
    ("previous_egid", "UInt32"),
    ("cred_syscall", "String"),
    // Migration 8.
    ("cgroup_path", "String"),
    ("container_id", "String"),
];

const GAPS_COLUMNS: &[(&str, &str)] = &[
    ("org_id", "String"),
    ("time", "DateTime"),
    ("time_ns", "UInt64"),
    ("device_id", "String"),
    ("hostname", "String"),
    ("boot_id", "String"),
    ("seq", "UInt64"),
    ("stream", "String"),
    ("reason", "String"),
    ("lost", "UInt64"),
    ("from_ns", "UInt64"),
    ("to_ns", "UInt64"),
    ("agent_version", "String"),
    ("ingested_at", "DateTime"),
];

/// Columns of `zt.network_events` (migrations 4 and 9), with their types.
const NETWORK_EVENTS_COLUMNS: &[(&str, &str)] = &[
    ("org_id", "String"),
    ("time", "DateTime"),
    ("time_ns", "UInt64"),
    ("device_id", "String"),
    ("hostname", "String"),
    ("boot_id", "String"),
    ("seq", "UInt64"),
    ("action", "String"),
    ("direction", "String"),
    ("pid", "UInt32"),
    ("owner_unknown", "UInt8"),
    ("uid", "UInt32"),
    ("gid", "UInt32"),
    ("cgroup_id", "UInt64"),
    ("exe", "String"),
    ("ip_version", "UInt8"),
    ("local_addr", "String"),
    ("local_port", "UInt16"),
    ("remote_addr", "String"),
    ("remote_port", "UInt16"),
    ("duration_ns", "UInt64"),
    ("bytes_sent", "UInt64"),
    ("bytes_received", "UInt64"),
    ("bytes_unknown", "UInt8"),
    ("ancestor_pids", "Array(UInt32)"),
    ("ancestor_exes", "Array(String)"),
    ("ancestor_argv0", "Array(String)"),
    ("ancestor_start_ns", "Array(UInt64)"),
    ("agent_version", "String"),
    ("ingested_at", "DateTime"),
    // Migration 9.
    ("user_name", "String"),
    ("cgroup_path", "String"),
    ("container_id", "String"),
];

/// Columns of `zt.file_events` (migrations 5 and 9), with their types.
const FILE_EVENTS_COLUMNS: &[(&str, &str)] = &[
    ("org_id", "String"),
    ("time", "DateTime"),
    ("time_ns", "UInt64"),
    ("device_id", "String"),
    ("hostname", "String"),
    ("boot_id", "String"),
    ("seq", "UInt64"),
    ("action", "String"),
    ("pid", "UInt32"),
    ("uid", "UInt32"),
    ("gid", "UInt32"),
    ("cgroup_id", "UInt64"),
    ("exe", "String"),
    ("path", "String"),
    ("target_path", "String"),
    ("open_flags", "UInt32"),
    ("mode", "UInt32"),
    ("path_truncated", "UInt8"),
    ("ancestor_pids", "Array(UInt32)"),
    ("ancestor_exes", "Array(String)"),
    ("ancestor_argv0", "Array(String)"),
    ("ancestor_start_ns", "Array(UInt64)"),
    ("agent_version", "String"),
    ("ingested_at", "DateTime"),
    // Migration 9.
    ("user_name", "String"),
    ("cgroup_path", "String"),
    ("container_id", "String"),
];

/// Columns of `zt.dns_events` (migration 10), with their types.
const DNS_EVENTS_COLUMNS: &[(&str, &str)] = &[
    ("org_id", "String"),
    ("time", "DateTime"),
    ("time_ns", "UInt64"),
    ("device_id", "String"),
    ("hostname", "String"),
    ("boot_id", "String"),
    ("seq", "UInt64"),
    ("pid", "UInt32"),
    ("owner_unknown", "UInt8"),
    ("uid", "UInt32"),
    ("gid", "UInt32"),
    ("cgroup_id", "UInt64"),
    ("exe", "String"),
    ("user_name", "String"),
    ("cgroup_path", "String"),
    ("container_id", "String"),
    ("ip_version", "UInt8"),
    ("source_addr", "String"),
    ("source_port", "UInt16"),
    ("server_addr", "String"),
    ("server_port", "UInt16"),
    ("transaction_id", "UInt16"),
    ("query_name", "String"),
    ("query_type", "String"),
    ("question_count", "UInt16"),
    ("message_len", "UInt32"),
    ("parse_error", "String"),
    ("ancestor_pids", "Array(UInt32)"),
    ("ancestor_exes", "Array(String)"),
    ("ancestor_argv0", "Array(String)"),
    ("ancestor_start_ns", "Array(UInt64)"),
    ("agent_version", "String"),
    ("ingested_at", "DateTime"),
];

/// Columns of `zt.decisions` (migrations 14 and 15), with their types.
const DECISIONS_COLUMNS: &[(&str, &str)] = &[
    ("org_id", "String"),
    ("time", "DateTime"),
    ("time_ns", "UInt64"),
    ("device_id", "String"),
    ("hostname", "String"),
    ("boot_id", "String"),
    ("seq", "UInt64"),
    ("connection_id", "String"),
    ("pid", "UInt32"),
    ("uid", "UInt32"),
    ("gid", "UInt32"),
    ("cgroup_id", "UInt64"),
    ("exe", "String"),
    ("user_name", "String"),
    ("cgroup_path", "String"),
    ("container_id", "String"),
    ("ip_version", "UInt8"),
    ("remote_addr", "String"),
    ("remote_port", "UInt16"),
    ("protocol", "String"),
    ("action", "String"),
    ("verdict", "String"),
    ("rule_id", "String"),
    ("policy_version", "UInt64"),
    ("enforcement_point", "String"),
    ("ancestor_pids", "Array(UInt32)"),
    ("ancestor_exes", "Array(String)"),
    ("ancestor_argv0", "Array(String)"),
    ("ancestor_start_ns", "Array(UInt64)"),
    ("agent_version", "String"),
    ("ingested_at", "DateTime"),
    // Migration 15.
    ("exe_sha256", "String"),
    ("peer_id", "String"),
    ("service", "String"),
    ("direction", "String"),
    ("reason", "String"),
    ("nearest_rules", "Array(String)"),
    ("gateway", "String"),
];

fn sorted(columns: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = columns
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    out.sort();
    out
}

/// `(name, type)` of a table's columns, sorted by name. (ClickHouse 18.16's
/// system.columns has no `position`: compare as sets.)
async fn table_columns(
    server: &ClickHouseServer,
    database: &str,
    table: &str,
) -> Vec<(String, String)> {
    server
        .client()
        .query(
            "SELECT name, type FROM system.columns \
             WHERE database = ? AND table = ? ORDER BY name",
        )
        .bind(database)
        .bind(table)
        .fetch_all()
        .await
        .expect("select system.columns")
}

/// The table is partitioned by day and ordered by `order_by`.
async fn assert_keys(server: &ClickHouseServer, database: &str, table: &str, order_by: &str) {
    let client = server.client();
    let keys: Result<(String, String), _> = client
        .query(
            "SELECT sorting_key, partition_key FROM system.tables \
             WHERE database = ? AND name = ?",
        )
        .bind(database)
        .bind(table)
        .fetch_one()
        .await;
    match keys {
        Ok((sorting_key, partition_key)) if !sorting_key.is_empty() => {
            assert_eq!(sorting_key, order_by);
            assert_eq!(partition_key, "toYYYYMMDD(time)");
        }
        // ClickHouse 18.16 has no sorting_key column; fall back to the DDL.
        _ => {
            let ddl: String = client
                .query(
                    "SELECT create_table_query FROM system.tables \
                     WHERE database = ? AND name = ?",
                )
                .bind(database)
                .bind(table)
                .fetch_one()
                .await
                .expect("select create_table_query");
            assert!(ddl.contains(&format!("ORDER BY ({order_by})")), "{ddl}");
            assert!(ddl.contains("PARTITION BY toYYYYMMDD(time)"), "{ddl}");
        }
    }
}

#[tokio::test]
async fn a_database_at_migration_1_upgrades_with_its_rows_intact() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("upgrade");
    let storage = Storage::new(&config_for(&server, &database).clickhouse).unwrap();
    let client = server.client().with_database(&database);

    // A database as a collector of migration 1 left it, with its rows.
    assert_eq!(storage.migrate_to(1).await.unwrap().applied, vec![1]);
    client
        .query(
            "INSERT INTO process_events (org_id, time, time_ns, device_id, hostname, boot_id, \
             seq, pid, tid, ppid, uid, gid, cgroup_id, filename, argv, argv_truncated, \
             filename_truncated, ppid_unknown, agent_version, ingested_at) VALUES \
             ('pref-test', 1750000000, 1750000000000000001, 'device-7', 'pc-007', 'b-old', \
              1, 100, 101, 1, 1000, 100, 4242, '/usr/bin/ls', ['ls','-l'], 0, 1, 0, '0.0.9', \
              1750000005), \
             ('pref-test', 1750000001, 1750000001000000002, 'device-7', 'pc-007', 'b-old', \
              2, 200, 200, 0, 0, 0, 1, '/bin/sh', [], 1, 0, 1, '0.0.9', 1750000006)",
        )
        .execute()
        .await
        .unwrap();
    assert!(table_columns(&server, &database, "gaps").await.is_empty());
    // As if a collector had died half-way through migration 2.
    client
        .query("ALTER TABLE process_events ADD COLUMN event_type String DEFAULT 'exec'")
        .execute()
        .await
        .unwrap();

    let report = storage.migrate().await.unwrap();
    assert_eq!(
        report.applied,
        vec![2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    );
    assert_eq!(report.already_applied, vec![1]);
    assert_eq!(
        table_columns(&server, &database, "process_events").await,
        sorted(PROCESS_EVENTS_COLUMNS)
    );
    assert_eq!(
        table_columns(&server, &database, "gaps").await,
        sorted(GAPS_COLUMNS)
    );

    // The old rows, unchanged, read the new columns' defaults.
    let rows = stored_rows(&server, &database).await;
    assert_eq!(rows.len(), 2);
    let old = &rows[0];
    assert_eq!(
        (old.org_id.as_str(), old.time, old.time_ns, old.seq),
        ("pref-test", 1_750_000_000, 1_750_000_000_000_000_001, 1)
    );
    assert_eq!(
        (old.pid, old.tid, old.ppid, old.uid, old.gid, old.cgroup_id),
        (100, 101, 1, 1000, 100, 4242)
    );
    assert_eq!(old.filename, "/usr/bin/ls");
    assert_eq!(old.argv, vec!["ls", "-l"]);
    assert_eq!(
        (old.argv_truncated, old.filename_truncated, old.ppid_unknown),
        (0, 1, 0)
    );
    assert_eq!(
        (old.agent_version.as_str(), old.ingested_at),
        ("0.0.9", 1_750_000_005)
    );
    assert_eq!(
        (rows[1].seq, rows[1].argv_truncated, rows[1].ppid_unknown),
        (2, 1, 1)
    );
    for row in &rows {
        assert_eq!(row.event_type, "exec");
        assert_eq!((row.euid, row.egid, row.loginuid), (0, 0, u32::MAX));
        assert_eq!(
            (row.exit_status, row.exit_signal, row.core_dumped),
            (-1, 0, 0)
        );
        assert_eq!(
            (row.process_start_ns, row.clone_flags, row.lifetime_ns),
            (0, 0, 0)
        );
        assert!(row.exe.is_empty() && row.ancestor_pids.is_empty());
        assert!(row.ancestor_exes.is_empty() && row.ancestor_argv0.is_empty());
        assert!(row.ancestor_start_ns.is_empty());
        assert!(row.exe_sha256.is_empty() && row.user_name.is_empty());
        assert_eq!(
            (row.previous_uid, row.previous_euid, row.previous_gid),
            (0, 0, 0)
        );
        assert!(row.previous_egid == 0 && row.cred_syscall.is_empty());
    }

    // New rows go in beside them.
    let mut new = rows[0].clone();
    new.seq = 3;
    new.event_type = "fork".into();
    new.ancestor_pids = vec![1];
    new.ancestor_exes = vec!["/sbin/init".into()];
    new.ancestor_argv0 = vec!["init".into()];
    new.ancestor_start_ns = vec![7];
    storage.insert(std::slice::from_ref(&new)).await.unwrap();
    assert_eq!(stored_rows(&server, &database).await[2], new);

    // And a rerun changes nothing.
    let rerun = storage.migrate().await.unwrap();
    assert!(rerun.applied.is_empty());
    assert_eq!(rerun.already_applied, ALL_VERSIONS);
}

#[tokio::test]
async fn a_database_at_migration_3_gains_network_events_and_keeps_its_rows() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("upgrade3");
    let storage = Storage::new(&config_for(&server, &database).clickhouse).unwrap();

    // A database as a collector of migration 3 left it, with its rows.
    assert_eq!(storage.migrate_to(3).await.unwrap().applied, vec![1, 2, 3]);
    let converted = zt_collector::ingest::convert_batch(
        Some(&identity()),
        &[exec(1, 100), at(2, gap_kind(5, T0_NS))],
        1_750_000_100,
    );
    assert_eq!(converted.rejected, 0);
    insert_process_rows_before_v6(&server, &database, &converted.rows.process_events).await;
    storage.insert(&converted.rows.gaps).await.unwrap();
    assert!(table_columns(&server, &database, "network_events")
        .await
        .is_empty());

    let report = storage.migrate().await.unwrap();
    assert_eq!(
        report.applied,
        vec![4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    );
    assert_eq!(report.already_applied, vec![1, 2, 3]);
    assert_eq!(
        table_columns(&server, &database, "network_events").await,
        sorted(NETWORK_EVENTS_COLUMNS)
    );
    assert_keys(
        &server,
        &database,
        "network_events",
        "org_id, hostname, time, pid, seq, device_id, boot_id",
    )
    .await;
    // The older tables and their rows are untouched.
    assert_eq!(
        table_columns(&server, &database, "process_events").await,
        sorted(PROCESS_EVENTS_COLUMNS)
    );
    assert_eq!(
        table_columns(&server, &database, "gaps").await,
        sorted(GAPS_COLUMNS)
    );
    assert_eq!(
        stored_rows(&server, &database).await,
        converted.rows.process_events
    );
    assert_eq!(stored_gaps(&server, &database).await, converted.rows.gaps);

    // The new table takes rows.
    let tcp = zt_collector::ingest::convert_batch(
        Some(&identity()),
        &[at(3, tcp_kind("connected", 4, 4300))],
        1_750_000_100,
    );
    assert_eq!(tcp.rows.network_events.len(), 1);
    storage.insert(&tcp.rows.network_events).await.unwrap();
    assert_eq!(
        stored_network_events(&server, &database).await,
        tcp.rows.network_events
    );

    let rerun = storage.migrate().await.unwrap();
    assert!(rerun.applied.is_empty());
    assert_eq!(rerun.already_applied, ALL_VERSIONS);
}

#[tokio::test]
async fn a_database_at_migration_4_gains_file_events_and_keeps_its_rows() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("upgrade4");
    let storage = Storage::new(&config_for(&server, &database).clickhouse).unwrap();

    // A database as a collector of migration 4 left it, with rows in every
    // table it had.
    assert_eq!(
        storage.migrate_to(4).await.unwrap().applied,
        vec![1, 2, 3, 4]
    );
    let old = zt_collector::ingest::convert_batch(
        Some(&identity()),
        &[
            exec(1, 100),
            at(2, gap_kind(5, T0_NS)),
            at(3, tcp_kind("connected", 6, 4300)),
        ],
        1_750_000_100,
    );
    assert_eq!((old.rejected, old.rows.len()), (0, 3));
    insert_process_rows_before_v6(&server, &database, &old.rows.process_events).await;
    storage.insert(&old.rows.gaps).await.unwrap();
    insert_before_v9(&server, &database, &old.rows.network_events).await;
    assert!(table_columns(&server, &database, "file_events")
        .await
        .is_empty());

    let report = storage.migrate().await.unwrap();
    assert_eq!(
        report.applied,
        vec![5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    );
    assert_eq!(report.already_applied, vec![1, 2, 3, 4]);
    assert_eq!(
        table_columns(&server, &database, "file_events").await,
        sorted(FILE_EVENTS_COLUMNS)
    );
    assert_keys(
        &server,
        &database,
        "file_events",
        "org_id, hostname, time, pid, seq, device_id, boot_id",
    )
    .await;
    // The older tables and their rows are untouched.
    for (table, columns) in [
        ("process_events", PROCESS_EVENTS_COLUMNS),
        ("gaps", GAPS_COLUMNS),
        ("network_events", NETWORK_EVENTS_COLUMNS),
    ] {
        assert_eq!(
            table_columns(&server, &database, table).await,
            sorted(columns),
            "{table}"
        );
    }
    assert_eq!(
        stored_rows(&server, &database).await,
        old.rows.process_events
    );
    assert_eq!(stored_gaps(&server, &database).await, old.rows.gaps);
    assert_eq!(
        stored_network_events(&server, &database).await,
        old.rows.network_events
    );

    // The new table takes rows, every action.
    let files =
        zt_collector::ingest::convert_batch(Some(&identity()), &file_events_from(4), 1_750_000_100);
    assert_eq!((files.rejected, files.rows.file_events.len()), (0, 5));
    storage.insert(&files.rows.file_events).await.unwrap();
    assert_eq!(
        stored_file_events(&server, &database).await,
        files.rows.file_events
    );

    let rerun = storage.migrate().await.unwrap();
    assert!(rerun.applied.is_empty());
    assert_eq!(rerun.already_applied, ALL_VERSIONS);
}

/// Migration 6's columns of `process_events`.
const PROCESS_EVENTS_V6: [&str; 2] = ["exe_sha256", "user_name"];

/// Migration 7's columns of `process_events`.
const PROCESS_EVENTS_V7: [&str; 5] = [
    "previous_uid",
    "previous_euid",
    "previous_gid",
    "previous_egid",
    "cred_syscall",
];

/// Migration 8's columns of `process_events`.
const PROCESS_EVENTS_V8: [&str; 2] = ["cgroup_path", "container_id"];

/// Inserts `rows` into a `process_events` older than migration 6, which
/// lacks columns a [`ProcessEventRow`] names: every other column, by SQL.
/// The rows must have those columns at their default, `''`.
async fn insert_process_rows_before_v6(
    server: &ClickHouseServer,
    database: &str,
    rows: &[ProcessEventRow],
) {
    insert_old_process_rows(server, database, rows, 5).await;
}

/// Inserts `rows` into a `process_events` at migration `at` (5, 6 or 7),
/// which lacks the columns of later migrations: the columns it has, by SQL.
/// The rows must have the missing columns at their defaults.
async fn insert_old_process_rows(
    server: &ClickHouseServer,
    database: &str,
    rows: &[ProcessEventRow],
    at: u32,
) {
    assert!((5..=7).contains(&at), "{at}");
    let (with_v6, with_v7) = (at >= 6, at >= 7);
    let columns: Vec<&str> = ProcessEventRow::COLUMN_NAMES
        .iter()
        .copied()
        .filter(|c| !PROCESS_EVENTS_V8.contains(c))
        .filter(|c| with_v7 || !PROCESS_EVENTS_V7.contains(c))
        .filter(|c| with_v6 || !PROCESS_EVENTS_V6.contains(c))
        .collect();
    let tuple = format!("({})", vec!["?"; columns.len()].join(", "));
    let sql = format!(
        "INSERT INTO process_events ({}) VALUES {}",
        columns.join(", "),
        vec![tuple.as_str(); rows.len()].join(", ")
    );
    let client = server.client().with_database(database);
    let mut query = client.query(&sql);
    for r in rows {
        assert!(
            with_v6 || (r.exe_sha256.is_empty() && r.user_name.is_empty()),
            "{r:?}"
        );
        assert!(
            r.cgroup_path.is_empty() && r.container_id.is_empty(),
            "{r:?}"
        );
        assert!(
            with_v7
                || r.cred_syscall.is_empty()
                    && (
                        r.previous_uid,
                        r.previous_euid,
                        r.previous_gid,
                        r.previous_egid
                    ) == (0, 0, 0, 0),
            "{r:?}"
        );
        // In the order of ProcessEventRow's fields, as COLUMN_NAMES.
        query = query
            .bind(&r.org_id)
            .bind(r.time)
            .bind(r.time_ns)
            .bind(&r.device_id)
            .bind(&r.hostname)
            .bind(&r.boot_id)
            .bind(r.seq)
            .bind(r.pid)
            .bind(r.tid)
            .bind(r.ppid)
            .bind(r.uid)
            .bind(r.gid)
            .bind(r.cgroup_id)
            .bind(&r.filename)
            .bind(&r.argv)
            .bind(r.argv_truncated)
            .bind(r.filename_truncated)
            .bind(r.ppid_unknown)
            .bind(&r.agent_version)
            .bind(r.ingested_at)
            .bind(&r.event_type)
            .bind(r.euid)
            .bind(r.egid)
            .bind(r.loginuid)
            .bind(r.process_start_ns)
            .bind(&r.exe)
            .bind(r.clone_flags)
            .bind(r.exit_status)
            .bind(r.exit_signal)
            .bind(r.core_dumped)
            .bind(r.lifetime_ns)
            .bind(&r.ancestor_pids)
            .bind(&r.ancestor_exes)
            .bind(&r.ancestor_argv0)
            .bind(&r.ancestor_start_ns);
        if with_v6 {
            query = query.bind(&r.exe_sha256).bind(&r.user_name);
        }
        if with_v7 {
            query = query
                .bind(r.previous_uid)
                .bind(r.previous_euid)
                .bind(r.previous_gid)
                .bind(r.previous_egid)
                .bind(&r.cred_syscall);
        }
    }
    query
        .execute()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"));
}

/// Migration 9's columns of `network_events` and `file_events`.
const OWNER_V9: [&str; 3] = ["user_name", "cgroup_path", "container_id"];

/// Inserts `rows` into their table (`R::TABLE`) in a database older than
/// migration 9, whose `network_events` or `file_events` lacks [`OWNER_V9`]:
/// through a staging database at the current schema, copying the columns
/// the old table has. The rows must have those columns at their default, ''.
async fn insert_before_v9<R: TableRow>(server: &ClickHouseServer, database: &str, rows: &[R]) {
    let staging = format!("{database}_staging");
    let storage = Storage::new(&config_for(server, &staging).clickhouse).expect("staging storage");
    storage
        .migrate()
        .await
        .expect("migrate the staging database");
    storage
        .insert(rows)
        .await
        .expect("insert into the staging database");
    let table = R::TABLE;
    let client = server.client();
    let with_owner: u64 = client
        .query(&format!(
            "SELECT count() FROM {staging}.{table} \
             WHERE user_name != '' OR cgroup_path != '' OR container_id != ''"
        ))
        .fetch_one()
        .await
        .expect("count staged rows with an owner");
    assert_eq!(with_owner, 0, "rows of {table} with owner columns set");
    let columns: Vec<&str> = R::COLUMN_NAMES
        .iter()
        .copied()
        .filter(|c| !OWNER_V9.contains(c))
        .collect();
    let columns = columns.join(", ");
    let sql = format!(
        "INSERT INTO {database}.{table} ({columns}) SELECT {columns} FROM {staging}.{table}"
    );
    client
        .query(&sql)
        .execute()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"));
    client
        .query(&format!("DROP DATABASE {staging}"))
        .execute()
        .await
        .expect("drop the staging database");
}

/// SHA-256 of a `/usr/bin/ls`, as an agent sends it.
const LS_SHA256: &str = "cb30d69b24245bf2ecdc9e7f53bbad19159999970b6d82c0c00c7d32d9e37aa4";

/// [`exec`] with the executed file's hash and the user's name.
fn exec_as(seq: u64, pid: u32, exe_sha256: &str, user_name: &str) -> Event {
    let mut event = exec(seq, pid);
    if let Some(Kind::Exec(e)) = event.kind.as_mut() {
        e.exe_sha256 = exe_sha256.into();
        e.user_name = user_name.into();
    }
    event
}

#[tokio::test]
async fn a_database_at_migration_5_gains_exec_hash_and_user_and_keeps_its_rows() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("upgrade5");
    let storage = Storage::new(&config_for(&server, &database).clickhouse).unwrap();
    let client = server.client().with_database(&database);

    // A database as a collector of migration 5 left it, with rows in every
    // table: process rows of each type (with ancestry), a gap, a connection
    // and file activity.
    assert_eq!(
        storage.migrate_to(5).await.unwrap().applied,
        vec![1, 2, 3, 4, 5]
    );
    let mut events = vec![
        exec(1, 4300),
        at(
            2,
            Kind::Fork(ProcessFork {
                pid: 4301,
                ppid: 4300,
                parent_tid: 4300,
                uid: 1000,
                gid: 100,
                cgroup_id: 4242,
                clone_flags: 0x0120_0011,
                exe: "/usr/bin/ls".into(),
            }),
        ),
        exit_kind_at(3, 4301, None, Some(9), false),
        at(4, gap_kind(5, T0_NS)),
        at(5, tcp_kind("connected", 4, 4300)),
    ];
    events[0].ancestors = ancestors();
    events.extend(file_events_from(6));
    let old = zt_collector::ingest::convert_batch(Some(&identity()), &events, 1_750_000_100);
    assert_eq!((old.rejected, old.rows.process_events.len()), (0, 3));
    insert_process_rows_before_v6(&server, &database, &old.rows.process_events).await;
    storage.insert(&old.rows.gaps).await.unwrap();
    insert_before_v9(&server, &database, &old.rows.network_events).await;
    insert_before_v9(&server, &database, &old.rows.file_events).await;
    let before = table_columns(&server, &database, "process_events").await;
    assert!(before
        .iter()
        .all(|(name, _)| !PROCESS_EVENTS_V6.contains(&name.as_str())));
    // As if a collector had died half-way through migration 6.
    client
        .query("ALTER TABLE process_events ADD COLUMN exe_sha256 String")
        .execute()
        .await
        .unwrap();

    let report = storage.migrate().await.unwrap();
    assert_eq!(report.applied, vec![6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
    assert_eq!(report.already_applied, vec![1, 2, 3, 4, 5]);
    assert_eq!(
        table_columns(&server, &database, "process_events").await,
        sorted(PROCESS_EVENTS_COLUMNS)
    );
    assert_keys(
        &server,
        &database,
        "process_events",
        "org_id, hostname, time, pid, seq, device_id, boot_id",
    )
    .await;
    for (table, columns) in [
        ("gaps", GAPS_COLUMNS),
        ("network_events", NETWORK_EVENTS_COLUMNS),
        ("file_events", FILE_EVENTS_COLUMNS),
    ] {
        assert_eq!(
            table_columns(&server, &database, table).await,
            sorted(columns),
            "{table}"
        );
    }

    // The old rows keep every value and read '' in the new columns (which
    // is what the collector converted them to: no hash, no user name).
    let rows = stored_rows(&server, &database).await;
    assert_eq!(rows, old.rows.process_events);
    assert_eq!(
        rows.iter()
            .map(|r| (
                r.event_type.as_str(),
                r.exe_sha256.as_str(),
                r.user_name.as_str()
            ))
            .collect::<Vec<_>>(),
        vec![("exec", "", ""), ("fork", "", ""), ("exit", "", "")]
    );
    let blank: u64 = client
        .query("SELECT count() FROM process_events WHERE exe_sha256 = '' AND user_name = ''")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(blank, 3);
    assert_eq!(stored_gaps(&server, &database).await, old.rows.gaps);
    assert_eq!(
        stored_network_events(&server, &database).await,
        old.rows.network_events
    );
    assert_eq!(
        stored_file_events(&server, &database).await,
        old.rows.file_events
    );

    // New exec rows carry both, beside the old ones.
    let new = zt_collector::ingest::convert_batch(
        Some(&identity()),
        &[exec_as(20, 4400, LS_SHA256, "alice")],
        1_750_000_200,
    );
    assert_eq!(new.rejected, 0);
    storage.insert(&new.rows.process_events).await.unwrap();
    let rows = stored_rows(&server, &database).await;
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[3], new.rows.process_events[0]);
    assert_eq!(
        (rows[3].exe_sha256.as_str(), rows[3].user_name.as_str()),
        (LS_SHA256, "alice")
    );

    let rerun = storage.migrate().await.unwrap();
    assert!(rerun.applied.is_empty());
    assert_eq!(rerun.already_applied, ALL_VERSIONS);
}

/// Pid `pid` (`/usr/bin/sudo`, uid/gid 1000/100) becoming root with
/// `syscall`: new uid, euid and egid 0, gid unchanged.
fn creds_kind(syscall: &str, pid: u32) -> Kind {
    Kind::Creds(CredentialChange {
        pid,
        syscall: syscall.into(),
        old_uid: 1000,
        old_euid: 1000,
        old_gid: 100,
        old_egid: 100,
        uid: 0,
        euid: 0,
        gid: 100,
        egid: 0,
        cgroup_id: 4242,
        exe: "/usr/bin/sudo".into(),
    })
}

#[tokio::test]
async fn a_database_at_migration_6_gains_credential_columns_and_keeps_its_rows() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("upgrade6");
    let storage = Storage::new(&config_for(&server, &database).clickhouse).unwrap();
    let client = server.client().with_database(&database);

    // A database as a collector of migration 6 left it, with process rows of
    // every type it knew (an exec with its hash and user), and a gap.
    assert_eq!(
        storage.migrate_to(6).await.unwrap().applied,
        vec![1, 2, 3, 4, 5, 6]
    );
    let mut events = vec![
        exec_as(1, 4300, LS_SHA256, "alice"),
        at(
            2,
            Kind::Fork(ProcessFork {
                pid: 4301,
                ppid: 4300,
                parent_tid: 4300,
                uid: 1000,
                gid: 100,
                cgroup_id: 4242,
                clone_flags: 0x0120_0011,
                exe: "/usr/bin/ls".into(),
            }),
        ),
        exit_kind_at(3, 4301, Some(0), None, false),
        at(4, gap_kind(5, T0_NS)),
    ];
    events[0].ancestors = ancestors();
    let old = zt_collector::ingest::convert_batch(Some(&identity()), &events, 1_750_000_100);
    assert_eq!((old.rejected, old.rows.process_events.len()), (0, 3));
    insert_old_process_rows(&server, &database, &old.rows.process_events, 6).await;
    storage.insert(&old.rows.gaps).await.unwrap();
    let before = table_columns(&server, &database, "process_events").await;
    assert!(before
        .iter()
        .all(|(name, _)| !PROCESS_EVENTS_V7.contains(&name.as_str())));
    // As if a collector had died half-way through migration 7.
    client
        .query("ALTER TABLE process_events ADD COLUMN previous_uid UInt32")
        .execute()
        .await
        .unwrap();

    let report = storage.migrate().await.unwrap();
    assert_eq!(report.applied, vec![7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
    assert_eq!(report.already_applied, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(
        table_columns(&server, &database, "process_events").await,
        sorted(PROCESS_EVENTS_COLUMNS)
    );
    assert_keys(
        &server,
        &database,
        "process_events",
        "org_id, hostname, time, pid, seq, device_id, boot_id",
    )
    .await;

    // The old rows keep every value (the exec its hash and user) and read
    // the new columns' defaults, 0 and ''.
    let rows = stored_rows(&server, &database).await;
    assert_eq!(rows, old.rows.process_events);
    assert_eq!(
        (rows[0].exe_sha256.as_str(), rows[0].user_name.as_str()),
        (LS_SHA256, "alice")
    );
    let blank: u64 = client
        .query(
            "SELECT count() FROM process_events WHERE previous_uid = 0 AND previous_euid = 0 \
             AND previous_gid = 0 AND previous_egid = 0 AND cred_syscall = ''",
        )
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(blank, 3);
    assert_eq!(stored_gaps(&server, &database).await, old.rows.gaps);

    // Credential changes go in beside them.
    let new = zt_collector::ingest::convert_batch(
        Some(&identity()),
        &[at(20, creds_kind("setuid", 4400))],
        1_750_000_200,
    );
    assert_eq!(new.rejected, 0);
    storage.insert(&new.rows.process_events).await.unwrap();
    let rows = stored_rows(&server, &database).await;
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[3], new.rows.process_events[0]);
    assert_eq!(
        (
            rows[3].event_type.as_str(),
            rows[3].cred_syscall.as_str(),
            rows[3].previous_euid,
            rows[3].euid
        ),
        ("cred_change", "setuid", 1000, 0)
    );

    let rerun = storage.migrate().await.unwrap();
    assert!(rerun.applied.is_empty());
    assert_eq!(rerun.already_applied, ALL_VERSIONS);
}

/// A docker container's id, and the cgroup of a process in it.
const CONTAINER_ID: &str = "4f1c8b2e9a7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b";
const CONTAINER_CGROUP: &str =
    "/system.slice/docker-4f1c8b2e9a7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b.scope";

/// [`exec`] in the cgroup `cgroup_path` of the container `container_id`.
fn exec_in(seq: u64, pid: u32, cgroup_path: &str, container_id: &str) -> Event {
    let mut event = exec_as(seq, pid, LS_SHA256, "alice");
    if let Some(Kind::Exec(e)) = event.kind.as_mut() {
        e.cgroup_path = cgroup_path.into();
        e.container_id = container_id.into();
    }
    event
}

#[tokio::test]
async fn a_database_at_migration_7_gains_container_columns_and_keeps_its_rows() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("upgrade7");
    let storage = Storage::new(&config_for(&server, &database).clickhouse).unwrap();
    let client = server.client().with_database(&database);

    // A database as a collector of migration 7 left it, with process rows of
    // every type it knew, and a gap.
    assert_eq!(
        storage.migrate_to(7).await.unwrap().applied,
        vec![1, 2, 3, 4, 5, 6, 7]
    );
    let mut events = vec![
        exec_as(1, 4300, LS_SHA256, "alice"),
        at(
            2,
            Kind::Fork(ProcessFork {
                pid: 4301,
                ppid: 4300,
                parent_tid: 4300,
                uid: 1000,
                gid: 100,
                cgroup_id: 4242,
                clone_flags: 0x0120_0011,
                exe: "/usr/bin/ls".into(),
            }),
        ),
        exit_kind_at(3, 4301, Some(0), None, false),
        at(4, creds_kind("setresuid", 4302)),
        at(5, gap_kind(5, T0_NS)),
    ];
    events[0].ancestors = ancestors();
    let old = zt_collector::ingest::convert_batch(Some(&identity()), &events, 1_750_000_100);
    assert_eq!((old.rejected, old.rows.process_events.len()), (0, 4));
    insert_old_process_rows(&server, &database, &old.rows.process_events, 7).await;
    storage.insert(&old.rows.gaps).await.unwrap();
    let before = table_columns(&server, &database, "process_events").await;
    assert!(before
        .iter()
        .all(|(name, _)| !PROCESS_EVENTS_V8.contains(&name.as_str())));
    // As if a collector had died half-way through migration 8.
    client
        .query("ALTER TABLE process_events ADD COLUMN cgroup_path String")
        .execute()
        .await
        .unwrap();

    let report = storage.migrate().await.unwrap();
    assert_eq!(report.applied, vec![8, 9, 10, 11, 12, 13, 14, 15, 16]);
    assert_eq!(report.already_applied, vec![1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(
        table_columns(&server, &database, "process_events").await,
        sorted(PROCESS_EVENTS_COLUMNS)
    );
    assert_keys(
        &server,
        &database,
        "process_events",
        "org_id, hostname, time, pid, seq, device_id, boot_id",
    )
    .await;

    // The old rows keep every value and read the new columns' default, ''.
    let rows = stored_rows(&server, &database).await;
    assert_eq!(rows, old.rows.process_events);
    assert_eq!(
        (rows[0].exe_sha256.as_str(), rows[3].cred_syscall.as_str()),
        (LS_SHA256, "setresuid")
    );
    let blank: u64 = client
        .query("SELECT count() FROM process_events WHERE cgroup_path = '' AND container_id = ''")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(blank, 4);
    assert_eq!(stored_gaps(&server, &database).await, old.rows.gaps);

    // Execs in containers go in beside them.
    let new = zt_collector::ingest::convert_batch(
        Some(&identity()),
        &[exec_in(20, 4400, CONTAINER_CGROUP, CONTAINER_ID)],
        1_750_000_200,
    );
    assert_eq!(new.rejected, 0);
    storage.insert(&new.rows.process_events).await.unwrap();
    let rows = stored_rows(&server, &database).await;
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[4], new.rows.process_events[0]);
    assert_eq!(
        (rows[4].cgroup_path.as_str(), rows[4].container_id.as_str()),
        (CONTAINER_CGROUP, CONTAINER_ID)
    );

    let rerun = storage.migrate().await.unwrap();
    assert!(rerun.applied.is_empty());
    assert_eq!(rerun.already_applied, ALL_VERSIONS);
}

/// `/usr/bin/curl` (pid `pid`, alice, in the container [`CONTAINER_ID`])
/// asking 192.0.2.53 for the A records of `name` over IPv4.
fn dns_kind(name: &str, pid: u32) -> Kind {
    Kind::Dns(DnsQuery {
        pid,
        owner_unknown: false,
        uid: 1000,
        gid: 100,
        cgroup_id: 4242,
        ip_version: 4,
        source_addr: "192.0.2.10".into(),
        source_port: 40_123,
        server_addr: "192.0.2.53".into(),
        server_port: 53,
        transaction_id: 0xbeef,
        query_name: name.into(),
        query_type: "A".into(),
        question_count: 1,
        message_len: 40,
        parse_error: String::new(),
        exe: "/usr/bin/curl".into(),
        user_name: "alice".into(),
        cgroup_path: CONTAINER_CGROUP.into(),
        container_id: CONTAINER_ID.into(),
    })
}

/// A datagram to port 53 too short for a DNS header, from `python3` (pid
/// `pid`), as the agent reports it: no question, the reason why.
fn malformed_dns_kind(pid: u32) -> Kind {
    let Kind::Dns(mut dns) = dns_kind("", pid) else {
        unreachable!()
    };
    dns.query_type.clear();
    dns.transaction_id = 0;
    dns.question_count = 0;
    dns.message_len = 2;
    dns.parse_error = "message is shorter than a DNS header".into();
    dns.exe = "/usr/bin/python3".into();
    Kind::Dns(dns)
}

/// `/usr/bin/curl` (pid `pid`, alice, in the container [`CONTAINER_ID`])
/// connecting over TCP to 203.0.113.7:443, decided in the kernel by rule
/// `block-exfil` of policy version 42 with `action` and `verdict`.
fn decision_kind(action: &str, verdict: &str, pid: u32) -> Kind {
    Kind::Decision(Decision {
        connection_id: format!("conn-{pid}-{action}"),
        pid,
        uid: 1000,
        gid: 100,
        cgroup_id: 4242,
        exe: "/usr/bin/curl".into(),
        user_name: "alice".into(),
        cgroup_path: CONTAINER_CGROUP.into(),
        container_id: CONTAINER_ID.into(),
        ip_version: 4,
        remote_addr: "203.0.113.7".into(),
        remote_port: 443,
        protocol: "tcp".into(),
        action: action.into(),
        verdict: verdict.into(),
        rule_id: "block-exfil".into(),
        policy_version: 42,
        enforcement_point: "kernel".into(),
        direction: "outbound".into(),
        ..Default::default()
    })
}

async fn stored_decisions(server: &ClickHouseServer, database: &str) -> Vec<DecisionRow> {
    server
        .client()
        .with_database(database)
        .query("SELECT ?fields FROM decisions ORDER BY seq")
        .fetch_all::<DecisionRow>()
        .await
        .expect("select decisions")
}

/// A TCP or file event's `kind` with its process named as alice's in the
/// container [`CONTAINER_ID`].
fn owned_in_container(mut kind: Kind) -> Kind {
    let (user_name, cgroup_path, container_id) = match &mut kind {
        Kind::Tcp(t) => (&mut t.user_name, &mut t.cgroup_path, &mut t.container_id),
        Kind::File(f) => (&mut f.user_name, &mut f.cgroup_path, &mut f.container_id),
        other => panic!("no owner columns: {other:?}"),
    };
    *user_name = "alice".into();
    *cgroup_path = CONTAINER_CGROUP.into();
    *container_id = CONTAINER_ID.into();
    kind
}

async fn stored_dns_events(server: &ClickHouseServer, database: &str) -> Vec<DnsEventRow> {
    server
        .client()
        .with_database(database)
        .query("SELECT ?fields FROM dns_events ORDER BY seq")
        .fetch_all::<DnsEventRow>()
        .await
        .expect("select dns_events")
}

#[tokio::test]
async fn a_database_at_migration_8_gains_owner_columns_and_dns_events_and_keeps_its_rows() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("upgrade8");
    let storage = Storage::new(&config_for(&server, &database).clickhouse).unwrap();
    let client = server.client().with_database(&database);

    // A database as a collector of migration 8 left it, with rows in every
    // table: an exec in a container, a gap, a connection and file activity.
    assert_eq!(
        storage.migrate_to(8).await.unwrap().applied,
        vec![1, 2, 3, 4, 5, 6, 7, 8]
    );
    let mut events = vec![
        exec_in(1, 4300, CONTAINER_CGROUP, CONTAINER_ID),
        at(2, gap_kind(5, T0_NS)),
        at(3, tcp_kind("connected", 6, 4300)),
    ];
    events.extend(file_events_from(4)); // seq 4..=8
    let old = zt_collector::ingest::convert_batch(Some(&identity()), &events, 1_750_000_100);
    assert_eq!((old.rejected, old.rows.len()), (0, 8));
    storage.insert(&old.rows.process_events).await.unwrap();
    storage.insert(&old.rows.gaps).await.unwrap();
    insert_before_v9(&server, &database, &old.rows.network_events).await;
    insert_before_v9(&server, &database, &old.rows.file_events).await;
    for table in ["network_events", "file_events"] {
        let before = table_columns(&server, &database, table).await;
        assert!(
            before
                .iter()
                .all(|(name, _)| !OWNER_V9.contains(&name.as_str())),
            "{table}"
        );
    }
    assert!(table_columns(&server, &database, "dns_events")
        .await
        .is_empty());
    // As if a collector had died half-way through migration 9: one column
    // of one table added.
    client
        .query("ALTER TABLE network_events ADD COLUMN user_name String")
        .execute()
        .await
        .unwrap();

    let report = storage.migrate().await.unwrap();
    assert_eq!(report.applied, vec![9, 10, 11, 12, 13, 14, 15, 16]);
    assert_eq!(report.already_applied, vec![1, 2, 3, 4, 5, 6, 7, 8]);
    for (table, columns) in [
        ("process_events", PROCESS_EVENTS_COLUMNS),
        ("gaps", GAPS_COLUMNS),
        ("network_events", NETWORK_EVENTS_COLUMNS),
        ("file_events", FILE_EVENTS_COLUMNS),
        ("dns_events", DNS_EVENTS_COLUMNS),
        ("decisions", DECISIONS_COLUMNS),
    ] {
        assert_eq!(
            table_columns(&server, &database, table).await,
            sorted(columns),
            "{table}"
        );
    }
    for table in ["network_events", "file_events", "dns_events", "decisions"] {
        assert_keys(
            &server,
            &database,
            table,
            "org_id, hostname, time, pid, seq, device_id, boot_id",
        )
        .await;
    }

    // The old rows keep every value and read '' in the new columns.
    assert_eq!(
        stored_rows(&server, &database).await,
        old.rows.process_events
    );
    assert_eq!(stored_gaps(&server, &database).await, old.rows.gaps);
    assert_eq!(
        stored_network_events(&server, &database).await,
        old.rows.network_events
    );
    assert_eq!(
        stored_file_events(&server, &database).await,
        old.rows.file_events
    );
    for (table, rows) in [("network_events", 1), ("file_events", 5)] {
        let blank: u64 = client
            .query(&format!(
                "SELECT count() FROM {table} \
                 WHERE user_name = '' AND cgroup_path = '' AND container_id = ''"
            ))
            .fetch_one()
            .await
            .unwrap();
        assert_eq!(blank, rows, "{table}");
    }

    // Connections and file activity with their owner, and DNS queries, go in
    // beside them.
    let new = zt_collector::ingest::convert_batch(
        Some(&identity()),
        &[
            at(20, owned_in_container(tcp_kind("connected", 4, 4400))),
            at(
                21,
                owned_in_container(file_kind("open_write", 4400, "/etc/cron.d/x")),
            ),
            at(22, dns_kind("files.example.org", 4400)),
            at(23, malformed_dns_kind(4401)),
        ],
        1_750_000_200,
    );
    assert_eq!((new.rejected, new.rows.len()), (0, 4));
    storage.insert(&new.rows.network_events).await.unwrap();
    storage.insert(&new.rows.file_events).await.unwrap();
    storage.insert(&new.rows.dns_events).await.unwrap();
    let network = stored_network_events(&server, &database).await;
    assert_eq!(network.len(), 2);
    assert_eq!(network[1], new.rows.network_events[0]);
    assert_eq!(
        (
            network[1].user_name.as_str(),
            network[1].cgroup_path.as_str(),
            network[1].container_id.as_str()
        ),
        ("alice", CONTAINER_CGROUP, CONTAINER_ID)
    );
    let files = stored_file_events(&server, &database).await;
    assert_eq!(files.len(), 6);
    assert_eq!(files[5], new.rows.file_events[0]);
    assert_eq!(files[5].container_id, CONTAINER_ID);
    assert_eq!(
        stored_dns_events(&server, &database).await,
        new.rows.dns_events
    );

    let rerun = storage.migrate().await.unwrap();
    assert!(rerun.applied.is_empty());
    assert_eq!(rerun.already_applied, ALL_VERSIONS);
}

/// Columns migration 15 adds to `decisions`.
const DECISIONS_V15: [&str; 7] = [
    "exe_sha256",
    "peer_id",
    "service",
    "direction",
    "reason",
    "nearest_rules",
    "gateway",
];

/// Inserts decisions into a database older than migration 15, whose
/// `decisions` lacks [`DECISIONS_V15`]: through a staging database at the
/// current schema, copying the columns the old table has. The rows must have
/// those columns at their neutral value ('', [], 'outbound').
async fn insert_decisions_before_v15(
    server: &ClickHouseServer,
    database: &str,
    rows: &[DecisionRow],
) {
    let staging = format!("{database}_staging");
    let storage = Storage::new(&config_for(server, &staging).clickhouse).expect("staging storage");
    storage
        .migrate()
        .await
        .expect("migrate the staging database");
    storage
        .insert(rows)
        .await
        .expect("insert into the staging database");
    let client = server.client();
    let with_tunnel: u64 = client
        .query(&format!(
            "SELECT count() FROM {staging}.decisions \
             WHERE exe_sha256 != '' OR peer_id != '' OR service != '' \
             OR direction != 'outbound' OR reason != '' OR notEmpty(nearest_rules) \
             OR gateway != ''"
        ))
        .fetch_one()
        .await
        .expect("count staged decisions with tunnel columns");
    assert_eq!(with_tunnel, 0, "decisions with migration-15 columns set");
    let columns: Vec<&str> = DecisionRow::COLUMN_NAMES
        .iter()
        .copied()
        .filter(|c| !DECISIONS_V15.contains(c))
        .collect();
    let columns = columns.join(", ");
    let sql = format!(
        "INSERT INTO {database}.decisions ({columns}) SELECT {columns} FROM {staging}.decisions"
    );
    client
        .query(&sql)
        .execute()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"));
    client
        .query(&format!("DROP DATABASE {staging}"))
        .execute()
        .await
        .expect("drop the staging database");
}

#[tokio::test]
async fn a_database_at_migration_14_gains_tunnel_columns_and_keeps_its_decisions() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("upgrade14");
    let storage = Storage::new(&config_for(&server, &database).clickhouse).unwrap();
    let client = server.client().with_database(&database);

    // A database as a collector of migration 14 left it, with decisions of
    // an agent that knew none of the new fields.
    assert_eq!(
        storage.migrate_to(14).await.unwrap().applied,
        vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    );
    let mut legacy = decision_kind("deny", "denied", 4300);
    if let Kind::Decision(d) = &mut legacy {
        d.direction.clear();
    }
    let old = zt_collector::ingest::convert_batch(
        Some(&identity()),
        &[
            at(1, legacy),
            at(2, decision_kind("audit", "would_deny", 4301)),
        ],
        1_750_000_100,
    );
    assert_eq!((old.rejected, old.rows.decisions.len()), (0, 2));
    insert_decisions_before_v15(&server, &database, &old.rows.decisions).await;
    let before = table_columns(&server, &database, "decisions").await;
    assert!(
        before
            .iter()
            .all(|(name, _)| !DECISIONS_V15.contains(&name.as_str())),
        "{before:?}"
    );
    // As if a collector had died half-way through migration 15.
    client
        .query("ALTER TABLE decisions ADD COLUMN exe_sha256 String")
        .execute()
        .await
        .unwrap();

    let report = storage.migrate().await.unwrap();
    assert_eq!(report.applied, vec![15, 16]);
    assert_eq!(report.already_applied, ALL_VERSIONS[..14]);
    assert_eq!(
        table_columns(&server, &database, "decisions").await,
        sorted(DECISIONS_COLUMNS)
    );
    assert_keys(
        &server,
        &database,
        "decisions",
        "org_id, hostname, time, pid, seq, device_id, boot_id",
    )
    .await;

    // The old rows keep every value, read 'outbound' and neutral values.
    assert_eq!(
        stored_decisions(&server, &database).await,
        old.rows.decisions
    );
    let outbound: u64 = client
        .query(
            "SELECT count() FROM decisions WHERE direction = 'outbound' \
             AND exe_sha256 = '' AND peer_id = '' AND service = '' AND reason = '' \
             AND empty(nearest_rules) AND gateway = ''",
        )
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(outbound, 2);

    // Tunnelled decisions, a gateway's and an inbound drop go in beside them.
    let tunnel = |seq: u64, verdict: &str, reason: &str| {
        let mut kind = decision_kind("tunnel", verdict, 4400);
        if let Kind::Decision(d) = &mut kind {
            d.enforcement_point = "tunnel".into();
            d.exe_sha256 = LS_SHA256.into();
            d.peer_id = "spiffe://pref.example/org/pref-test/device/gw-1".into();
            d.service = "staff-web".into();
            d.reason = reason.into();
            d.gateway = "[2001:db8::0001]:4433".into();
            d.rule_id.clear();
            d.nearest_rules = vec![
                "staff-web: user alice is not one of [bob]".into(),
                "é".repeat(300),
            ];
        }
        at(seq, kind)
    };
    let mut ingress = decision_kind("deny", "denied", 0);
    if let Kind::Decision(d) = &mut ingress {
        d.enforcement_point = "kernel_ingress".into();
        d.direction = "inbound".into();
        d.reason = "protected_port".into();
        d.remote_port = 8080;
    }
    let mut gateway = decision_kind("tunnel", "closed", 4500);
    if let Kind::Decision(d) = &mut gateway {
        d.enforcement_point = "gateway".into();
        d.direction = "inbound".into();
        d.peer_id = "spiffe://pref.example/org/pref-test/device/device-7".into();
        d.reason = "revoked".into();
    }
    let new = zt_collector::ingest::convert_batch(
        Some(&identity()),
        &[
            tunnel(20, "tunnelled", ""),
            tunnel(21, "denied", "no_service"),
            at(22, ingress),
            at(23, gateway),
        ],
        1_750_000_200,
    );
    assert_eq!(
        (new.rejected, new.first_reason.clone(), new.rows.len()),
        (0, None, 4)
    );
    storage.insert(&new.rows.decisions).await.unwrap();
    let stored = stored_decisions(&server, &database).await;
    assert_eq!(stored[..2], old.rows.decisions[..]);
    assert_eq!(stored[2..], new.rows.decisions[..]);
    assert_eq!(stored[2].gateway, "[2001:db8::1]:4433");
    assert_eq!(stored[2].nearest_rules[1], "é".repeat(256));
    assert_eq!(
        (stored[3].verdict.as_str(), stored[3].reason.as_str()),
        ("denied", "no_service")
    );
    assert_eq!(
        (
            stored[4].enforcement_point.as_str(),
            stored[4].direction.as_str()
        ),
        ("kernel_ingress", "inbound")
    );

    let rerun = storage.migrate().await.unwrap();
    assert!(rerun.applied.is_empty());
    assert_eq!(rerun.already_applied, ALL_VERSIONS);
}

/// File activity of pid `pid` (`/usr/bin/vim`, uid 1000) on `path`.
fn file_kind(action: &str, pid: u32, path: &str) -> Kind {
    Kind::File(FileActivity {
        action: action.into(),
        pid,
        uid: 1000,
        gid: 100,
        cgroup_id: 4242,
        path: path.into(),
        exe: "/usr/bin/vim".into(),
        ..Default::default()
    })
}

fn with_file(mut kind: Kind, change: impl FnOnce(&mut FileActivity)) -> Kind {
    if let Kind::File(file) = &mut kind {
        change(file);
    }
    kind
}

/// O_WRONLY | O_CREAT | O_TRUNC.
const CREATE_FLAGS: u32 = 0o1 | 0o100 | 0o1000;
/// O_RDONLY | O_CLOEXEC.
const READ_FLAGS: u32 = 0o2_000_000;

/// One event of each file action, numbered from `first`: a cron job
/// written, `/etc/shadow` read, a file deleted, a unit renamed into place and
/// a program made setuid root.
fn file_events_from(first: u64) -> Vec<Event> {
    vec![
        at(
            first,
            with_file(file_kind("open_write", 4400, "/etc/cron.d/job"), |f| {
                f.open_flags = CREATE_FLAGS;
                f.mode = 0o644;
            }),
        ),
        at(
            first + 1,
            with_file(file_kind("open_read", 4401, "/etc/shadow"), |f| {
                f.open_flags = READ_FLAGS;
                f.exe = "/usr/bin/python3".into();
            }),
        ),
        at(first + 2, file_kind("unlink", 4400, "/tmp/stage1")),
        at(
            first + 3,
            with_file(file_kind("rename", 4400, "/tmp/x.service"), |f| {
                f.target_path = "/etc/systemd/system/x.service".into();
            }),
        ),
        at(
            first + 4,
            with_file(file_kind("chmod", 4400, "/usr/local/bin/helper"), |f| {
                f.mode = 0o4755;
                f.uid = 0;
                f.gid = 0;
            }),
        ),
    ]
}

async fn stored_file_events(server: &ClickHouseServer, database: &str) -> Vec<FileEventRow> {
    server
        .client()
        .with_database(database)
        .query("SELECT ?fields FROM file_events ORDER BY seq")
        .fetch_all::<FileEventRow>()
        .await
        .expect("select file_events")
}

#[tokio::test]
async fn batches_are_stored_then_acked_and_bad_events_rejected() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("ingest");
    let collector = zt_collector::start(config_for(&server, &database))
        .await
        .unwrap();

    let mut agent = AgentStream::open(&collector).await;
    agent
        .send(EventBatch {
            batch_seq: 1,
            agent: Some(identity()),
            events: vec![exec(1, 100), exec(2, 200)],
        })
        .await;
    let ack = agent.ack(Duration::from_secs(10)).await;
    assert_eq!(
        ack,
        BatchAck {
            batch_seq: 1,
            stored: 2,
            rejected: 0,
            reject_reason: String::new()
        }
    );

    // One bad event among good ones: it is refused, the others are stored.
    let no_kind = Event {
        seq: 4,
        time_unix_ns: T0_NS,
        ancestors: Vec::new(),
        kind: None,
    };
    let mut zero_time = exec(5, 500);
    zero_time.time_unix_ns = 0;
    agent
        .send(EventBatch {
            batch_seq: 2,
            agent: Some(identity()),
            events: vec![exec(3, 300), no_kind, zero_time, exec(6, 600)],
        })
        .await;
    let ack = agent.ack(Duration::from_secs(10)).await;
    assert_eq!(ack.batch_seq, 2);
    assert_eq!(ack.stored, 2);
    assert_eq!(ack.rejected, 2);
    assert!(ack.reject_reason.contains("seq 4"), "{}", ack.reject_reason);
    assert!(
        ack.reject_reason.contains("no kind"),
        "{}",
        ack.reject_reason
    );

    // A batch without identity: everything refused, the stream carries on.
    agent
        .send(EventBatch {
            batch_seq: 3,
            agent: None,
            events: vec![exec(7, 700)],
        })
        .await;
    let ack = agent.ack(Duration::from_secs(10)).await;
    assert_eq!((ack.batch_seq, ack.stored, ack.rejected), (3, 0, 1));
    assert!(
        ack.reject_reason.contains("identity"),
        "{}",
        ack.reject_reason
    );

    // Acked means stored: the rows are there, with the right values.
    let rows = stored_rows(&server, &database).await;
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 6]
    );
    let first = &rows[0];
    assert_eq!(first.org_id, "pref-test");
    assert_eq!(first.device_id, "device-7");
    assert_eq!(first.hostname, "pc-007");
    assert_eq!(first.boot_id, "0b5e2f4c-boot");
    assert_eq!(first.agent_version, "0.1.0-test");
    assert_eq!(first.time_ns, T0_NS + 1_000_000);
    assert_eq!(u64::from(first.time), (T0_NS + 1_000_000) / 1_000_000_000);
    assert_eq!(
        (first.pid, first.tid, first.ppid, first.uid, first.gid),
        (100, 100, 1, 1000, 100)
    );
    assert_eq!(first.cgroup_id, 4242);
    assert_eq!(first.filename, "/usr/bin/ls");
    assert_eq!(first.argv, vec!["ls", "-l", "/tmp"]);
    assert_eq!(
        (
            first.argv_truncated,
            first.filename_truncated,
            first.ppid_unknown
        ),
        (0, 0, 0)
    );
    assert_eq!(rows[1].filename_truncated, 1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(u64::from(first.ingested_at).abs_diff(now) < 120);

    // The control service reports what happened, and ClickHouse as reachable.
    let mut control = ControlClient::new(device_channel(&collector).await);
    let status = control.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(status.clickhouse_reachable, "{}", status.clickhouse_error);
    assert_eq!(status.events_stored, 4);
    assert_eq!(status.events_rejected, 3);
    assert_eq!(status.connected_agents, 1);
    assert_eq!(status.insert_failures, 0);
    assert!(!status.version.is_empty());

    // Graceful shutdown ends the open stream and returns.
    tokio::time::timeout(Duration::from_secs(15), collector.shutdown())
        .await
        .expect("shutdown in time")
        .expect("clean shutdown");
    let end = tokio::time::timeout(Duration::from_secs(5), agent.acks.message())
        .await
        .expect("stream ends after shutdown");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
}

async fn stored_gaps(server: &ClickHouseServer, database: &str) -> Vec<GapRow> {
    server
        .client()
        .with_database(database)
        .query("SELECT ?fields FROM gaps ORDER BY seq")
        .fetch_all::<GapRow>()
        .await
        .expect("select gaps")
}

fn ancestors() -> Vec<Ancestor> {
    vec![
        Ancestor {
            pid: 4200,
            exe: "/usr/bin/bash".into(),
            argv0: "-bash".into(),
            start_unix_ns: T0_NS - 60_000_000_000,
        },
        Ancestor {
            pid: 1,
            exe: "/usr/lib/systemd/systemd".into(),
            argv0: "/sbin/init".into(),
            start_unix_ns: 0,
        },
    ]
}

fn at(seq: u64, kind: Kind) -> Event {
    Event {
        seq,
        time_unix_ns: T0_NS + seq * 1_000_000,
        ancestors: ancestors(),
        kind: Some(kind),
    }
}

fn exit_kind(pid: u32, exit_status: Option<u32>, signal: Option<u32>, core_dumped: bool) -> Kind {
    Kind::Exit(ProcessExit {
        pid,
        ppid: 4200,
        ppid_unknown: false,
        uid: 1000,
        gid: 100,
        cgroup_id: 4242,
        exit_status,
        signal,
        core_dumped,
        process_start_unix_ns: T0_NS - 2_000_000_000,
        lifetime_ns: 2_000_000_000,
        exe: "/usr/bin/python3".into(),
    })
}

#[tokio::test]
async fn a_batch_of_every_kind_is_stored_in_its_tables_then_acked() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("kinds");
    let collector = zt_collector::start(config_for(&server, &database))
        .await
        .unwrap();
    let mut agent = AgentStream::open(&collector).await;

    let mut exec_event = exec(1, 4300);
    exec_event.ancestors = ancestors();
    if let Some(Kind::Exec(e)) = exec_event.kind.as_mut() {
        e.ppid = 4200;
        e.euid = 0;
        e.egid = 0;
        e.loginuid = Some(1000);
        e.process_start_unix_ns = T0_NS - 1_000;
        e.exe_sha256 = LS_SHA256.into();
        e.user_name = "alice".into();
        e.cgroup_path = CONTAINER_CGROUP.into();
        e.container_id = CONTAINER_ID.into();
    }
    let fork = at(
        2,
        Kind::Fork(ProcessFork {
            pid: 4301,
            ppid: 4300,
            parent_tid: 4302,
            uid: 1000,
            gid: 100,
            cgroup_id: 4242,
            clone_flags: 0x0120_0011,
            exe: "/usr/bin/ls".into(),
        }),
    );
    let gap = |seq, lost, from_unix_ns| {
        let mut event = at(
            seq,
            Kind::Gap(Gap {
                stream: "critical".into(),
                reason: "ring_full".into(),
                lost,
                from_unix_ns,
                to_unix_ns: T0_NS + seq * 1_000_000,
            }),
        );
        event.ancestors.clear();
        event
    };
    let mut events = vec![
        exec_event,
        fork,
        exit_kind_at(3, 4301, Some(2), None, false),
        exit_kind_at(4, 4302, None, Some(11), true),
        gap(5, 40, T0_NS),
        gap(6, 0, T0_NS), // lost nothing: refused
        exit_kind_at(7, 4303, None, Some(9), false),
        at(8, owned_in_container(tcp_kind("connected", 4, 4300))),
    ];
    events.extend(file_events_from(9)); // seq 9..=13
                                        // A rename without its new path, and an action that does not exist.
    events.push(at(14, file_kind("rename", 4400, "/etc/passwd")));
    events.push(at(15, file_kind("truncate", 4400, "/etc/passwd")));
    // An exec whose hash is not lowercase hex.
    events.push(exec_as(17, 4500, &LS_SHA256.to_ascii_uppercase(), "bob"));
    // A process becoming root, and a change by a syscall that is not one.
    events.push(at(18, creds_kind("setresuid", 4304)));
    events.push(at(19, creds_kind("setfsuid", 4304)));
    // A DNS query, a datagram to port 53 that is not one, and a query
    // without a name that does not say why.
    events.push(at(20, dns_kind("files.example.org", 4300)));
    events.push(at(21, malformed_dns_kind(4305)));
    events.push(at(22, dns_kind("", 4300)));
    // A denied connection, a would-be denial over IPv6 by a gateway, and a
    // denial by a rule that allows.
    events.push(at(23, decision_kind("deny", "denied", 4300)));
    let Kind::Decision(mut audited) = decision_kind("audit", "would_deny", 4306) else {
        unreachable!()
    };
    audited.ip_version = 6;
    audited.remote_addr = "2001:DB8:2:0:0:0:0:7".into();
    audited.enforcement_point = "gateway".into();
    audited.rule_id.clear();
    events.push(at(24, Kind::Decision(audited)));
    events.push(at(25, decision_kind("allow", "denied", 4300)));
    agent
        .send(EventBatch {
            batch_seq: 1,
            agent: Some(identity()),
            events,
        })
        .await;
    let ack = agent.ack(Duration::from_secs(10)).await;
    assert_eq!((ack.batch_seq, ack.stored, ack.rejected), (1, 17, 7));
    assert!(ack.reject_reason.contains("seq 6"), "{}", ack.reject_reason);

    // Acked means stored, each row in its table.
    let rows = stored_rows(&server, &database).await;
    let kinds: Vec<(u64, &str)> = rows
        .iter()
        .map(|r| (r.seq, r.event_type.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (1, "exec"),
            (2, "fork"),
            (3, "exit"),
            (4, "exit"),
            (7, "exit"),
            (18, "cred_change")
        ]
    );
    for row in &rows {
        assert_eq!(row.ancestor_pids, vec![4200, 1], "seq {}", row.seq);
        assert_eq!(
            row.ancestor_exes,
            vec!["/usr/bin/bash", "/usr/lib/systemd/systemd"]
        );
        assert_eq!(row.ancestor_argv0, vec!["-bash", "/sbin/init"]);
        assert_eq!(row.ancestor_start_ns, vec![T0_NS - 60_000_000_000, 0]);
        assert_eq!(
            (row.org_id.as_str(), row.boot_id.as_str()),
            ("pref-test", "0b5e2f4c-boot")
        );
        assert_eq!(row.time_ns, T0_NS + row.seq * 1_000_000);
    }

    let exec_row = &rows[0];
    assert_eq!(
        (exec_row.pid, exec_row.ppid, exec_row.uid),
        (4300, 4200, 1000)
    );
    assert_eq!(
        (exec_row.euid, exec_row.egid, exec_row.loginuid),
        (0, 0, 1000)
    );
    assert_eq!(exec_row.process_start_ns, T0_NS - 1_000);
    assert_eq!(
        (exec_row.exe.as_str(), exec_row.filename.as_str()),
        ("/usr/bin/ls", "/usr/bin/ls")
    );
    assert_eq!((exec_row.exit_status, exec_row.clone_flags), (-1, 0));
    assert_eq!(
        (exec_row.exe_sha256.as_str(), exec_row.user_name.as_str()),
        (LS_SHA256, "alice")
    );
    assert_eq!(
        (
            exec_row.cgroup_path.as_str(),
            exec_row.container_id.as_str()
        ),
        (CONTAINER_CGROUP, CONTAINER_ID)
    );
    let in_container: u64 = server
        .client()
        .with_database(&database)
        .query(
            "SELECT count() FROM process_events \
             WHERE event_type = 'exec' AND seq = 1 AND cgroup_path = ? AND container_id = ?",
        )
        .bind(CONTAINER_CGROUP)
        .bind(CONTAINER_ID)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(in_container, 1);
    // Forks and exits carry none of them.
    for row in &rows[1..] {
        assert_eq!(
            (row.exe_sha256.as_str(), row.user_name.as_str()),
            ("", ""),
            "seq {}",
            row.seq
        );
        assert_eq!(
            (row.cgroup_path.as_str(), row.container_id.as_str()),
            ("", ""),
            "seq {}",
            row.seq
        );
    }

    let fork_row = &rows[1];
    assert_eq!(
        (fork_row.pid, fork_row.ppid, fork_row.tid),
        (4301, 4300, 4302)
    );
    assert_eq!(fork_row.clone_flags, 0x0120_0011);
    assert_eq!(fork_row.exe, "/usr/bin/ls");
    assert!(fork_row.filename.is_empty() && fork_row.argv.is_empty());
    assert_eq!((fork_row.loginuid, fork_row.exit_status), (u32::MAX, -1));

    let exited = &rows[2];
    assert_eq!((exited.pid, exited.ppid, exited.tid), (4301, 4200, 0));
    assert_eq!(
        (exited.exit_status, exited.exit_signal, exited.core_dumped),
        (2, 0, 0)
    );
    assert_eq!(
        (exited.process_start_ns, exited.lifetime_ns),
        (T0_NS - 2_000_000_000, 2_000_000_000)
    );
    assert_eq!(exited.exe, "/usr/bin/python3");
    let segv = &rows[3];
    assert_eq!(
        (segv.exit_status, segv.exit_signal, segv.core_dumped),
        (-1, 11, 1)
    );
    let killed = &rows[4];
    assert_eq!(
        (killed.exit_status, killed.exit_signal, killed.core_dumped),
        (-1, 9, 0)
    );
    // Only the credential change fills the previous ids and the syscall.
    for row in &rows[..5] {
        assert_eq!(
            (
                row.previous_uid,
                row.previous_euid,
                row.previous_gid,
                row.previous_egid,
                row.cred_syscall.as_str()
            ),
            (0, 0, 0, 0, ""),
            "seq {}",
            row.seq
        );
    }

    // The credential change, every value as sent: new ids in uid/euid/
    // gid/egid, old ones in previous_*.
    let cred = &rows[5];
    assert_eq!(
        (cred.pid, cred.uid, cred.euid, cred.gid, cred.egid),
        (4304, 0, 0, 100, 0)
    );
    assert_eq!(
        (
            cred.previous_uid,
            cred.previous_euid,
            cred.previous_gid,
            cred.previous_egid
        ),
        (1000, 1000, 100, 100)
    );
    assert_eq!(
        (
            cred.cred_syscall.as_str(),
            cred.cgroup_id,
            cred.exe.as_str()
        ),
        ("setresuid", 4242, "/usr/bin/sudo")
    );
    assert!(cred.filename.is_empty() && cred.argv.is_empty());
    assert_eq!((cred.tid, cred.ppid, cred.loginuid), (0, 0, u32::MAX));
    assert_eq!((cred.exit_status, cred.clone_flags), (-1, 0));

    let gaps = stored_gaps(&server, &database).await;
    assert_eq!(gaps.len(), 1);
    let g = &gaps[0];
    assert_eq!(
        (g.seq, g.lost, g.from_ns, g.to_ns),
        (5, 40, T0_NS, T0_NS + 5_000_000)
    );
    assert_eq!(
        (g.stream.as_str(), g.reason.as_str()),
        ("critical", "ring_full")
    );
    assert_eq!(
        (
            g.org_id.as_str(),
            g.device_id.as_str(),
            g.hostname.as_str(),
            g.boot_id.as_str()
        ),
        ("pref-test", "device-7", "pc-007", "0b5e2f4c-boot")
    );
    assert_eq!(g.agent_version, "0.1.0-test");
    assert_eq!(
        (g.time_ns, u64::from(g.time)),
        (T0_NS + 5_000_000, T0_NS / 1_000_000_000)
    );

    let network = stored_network_events(&server, &database).await;
    assert_eq!(
        network
            .iter()
            .map(|r| (r.seq, r.action.as_str(), r.direction.as_str()))
            .collect::<Vec<_>>(),
        vec![(8, "connected", "outbound")]
    );
    assert_eq!(
        (
            network[0].user_name.as_str(),
            network[0].cgroup_path.as_str(),
            network[0].container_id.as_str()
        ),
        ("alice", CONTAINER_CGROUP, CONTAINER_ID)
    );

    // File activity, every value as sent.
    let files = stored_file_events(&server, &database).await;
    let ingested_at = files[0].ingested_at;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(u64::from(ingested_at).abs_diff(now) < 120);
    let file = |seq: u64, action: &str, pid: u32, path: &str| FileEventRow {
        org_id: "pref-test".into(),
        time: u32::try_from((T0_NS + seq * 1_000_000) / 1_000_000_000).unwrap(),
        time_ns: T0_NS + seq * 1_000_000,
        device_id: "device-7".into(),
        hostname: "pc-007".into(),
        boot_id: "0b5e2f4c-boot".into(),
        seq,
        action: action.into(),
        pid,
        uid: 1000,
        gid: 100,
        cgroup_id: 4242,
        exe: "/usr/bin/vim".into(),
        path: path.into(),
        target_path: String::new(),
        open_flags: 0,
        mode: 0,
        path_truncated: 0,
        ancestor_pids: vec![4200, 1],
        ancestor_exes: vec!["/usr/bin/bash".into(), "/usr/lib/systemd/systemd".into()],
        ancestor_argv0: vec!["-bash".into(), "/sbin/init".into()],
        ancestor_start_ns: vec![T0_NS - 60_000_000_000, 0],
        agent_version: "0.1.0-test".into(),
        ingested_at,
        user_name: String::new(),
        cgroup_path: String::new(),
        container_id: String::new(),
    };
    assert_eq!(
        files,
        vec![
            FileEventRow {
                open_flags: 0o1101,
                mode: 0o644,
                ..file(9, "open_write", 4400, "/etc/cron.d/job")
            },
            FileEventRow {
                open_flags: 0o2_000_000,
                exe: "/usr/bin/python3".into(),
                ..file(10, "open_read", 4401, "/etc/shadow")
            },
            file(11, "unlink", 4400, "/tmp/stage1"),
            FileEventRow {
                target_path: "/etc/systemd/system/x.service".into(),
                ..file(12, "rename", 4400, "/tmp/x.service")
            },
            FileEventRow {
                mode: 2541, // 0o4755: setuid
                uid: 0,
                gid: 0,
                ..file(13, "chmod", 4400, "/usr/local/bin/helper")
            },
        ]
    );

    // DNS queries, every value as sent; the malformed one with its reason.
    let dns = |seq: u64, pid: u32| DnsEventRow {
        org_id: "pref-test".into(),
        time: u32::try_from((T0_NS + seq * 1_000_000) / 1_000_000_000).unwrap(),
        time_ns: T0_NS + seq * 1_000_000,
        device_id: "device-7".into(),
        hostname: "pc-007".into(),
        boot_id: "0b5e2f4c-boot".into(),
        seq,
        pid,
        owner_unknown: 0,
        uid: 1000,
        gid: 100,
        cgroup_id: 4242,
        exe: "/usr/bin/curl".into(),
        user_name: "alice".into(),
        cgroup_path: CONTAINER_CGROUP.into(),
        container_id: CONTAINER_ID.into(),
        ip_version: 4,
        source_addr: "192.0.2.10".into(),
        source_port: 40_123,
        server_addr: "192.0.2.53".into(),
        server_port: 53,
        transaction_id: 0xbeef,
        query_name: "files.example.org".into(),
        query_type: "A".into(),
        question_count: 1,
        message_len: 40,
        parse_error: String::new(),
        ancestor_pids: vec![4200, 1],
        ancestor_exes: vec!["/usr/bin/bash".into(), "/usr/lib/systemd/systemd".into()],
        ancestor_argv0: vec!["-bash".into(), "/sbin/init".into()],
        ancestor_start_ns: vec![T0_NS - 60_000_000_000, 0],
        agent_version: "0.1.0-test".into(),
        ingested_at,
    };
    assert_eq!(
        stored_dns_events(&server, &database).await,
        vec![
            dns(20, 4300),
            DnsEventRow {
                exe: "/usr/bin/python3".into(),
                transaction_id: 0,
                query_name: String::new(),
                query_type: String::new(),
                question_count: 0,
                message_len: 2,
                parse_error: "message is shorter than a DNS header".into(),
                ..dns(21, 4305)
            },
        ]
    );

    // Connection decisions, every value as sent (the address in canonical
    // text); the inconsistent one refused.
    let decision = |seq: u64, pid: u32, action: &str, verdict: &str| DecisionRow {
        org_id: "pref-test".into(),
        time: u32::try_from((T0_NS + seq * 1_000_000) / 1_000_000_000).unwrap(),
        time_ns: T0_NS + seq * 1_000_000,
        device_id: "device-7".into(),
        hostname: "pc-007".into(),
        boot_id: "0b5e2f4c-boot".into(),
        seq,
        connection_id: format!("conn-{pid}-{action}"),
        pid,
        uid: 1000,
        gid: 100,
        cgroup_id: 4242,
        exe: "/usr/bin/curl".into(),
        user_name: "alice".into(),
        cgroup_path: CONTAINER_CGROUP.into(),
        container_id: CONTAINER_ID.into(),
        ip_version: 4,
        remote_addr: "203.0.113.7".into(),
        remote_port: 443,
        protocol: "tcp".into(),
        action: action.into(),
        verdict: verdict.into(),
        rule_id: "block-exfil".into(),
        policy_version: 42,
        enforcement_point: "kernel".into(),
        ancestor_pids: vec![4200, 1],
        ancestor_exes: vec!["/usr/bin/bash".into(), "/usr/lib/systemd/systemd".into()],
        ancestor_argv0: vec!["-bash".into(), "/sbin/init".into()],
        ancestor_start_ns: vec![T0_NS - 60_000_000_000, 0],
        agent_version: "0.1.0-test".into(),
        ingested_at,
        exe_sha256: String::new(),
        peer_id: String::new(),
        service: String::new(),
        direction: "outbound".into(),
        reason: String::new(),
        nearest_rules: Vec::new(),
        gateway: String::new(),
    };
    assert_eq!(
        stored_decisions(&server, &database).await,
        vec![
            decision(23, 4300, "deny", "denied"),
            DecisionRow {
                ip_version: 6,
                remote_addr: "2001:db8:2::7".into(),
                enforcement_point: "gateway".into(),
                rule_id: String::new(),
                ..decision(24, 4306, "audit", "would_deny")
            },
        ]
    );

    // A batch of gaps only is stored and acked too.
    agent
        .send(EventBatch {
            batch_seq: 2,
            agent: Some(identity()),
            events: vec![gap(16, 3, T0_NS)],
        })
        .await;
    let ack = agent.ack(Duration::from_secs(10)).await;
    assert_eq!((ack.batch_seq, ack.stored, ack.rejected), (2, 1, 0));
    assert_eq!(stored_gaps(&server, &database).await.len(), 2);

    let mut control = ControlClient::new(device_channel(&collector).await);
    let status = control.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.events_stored, 18, "rows of every table");
    assert_eq!(status.events_rejected, 7);

    drop(agent);
    collector.shutdown().await.unwrap();
}

fn exit_kind_at(
    seq: u64,
    pid: u32,
    exit_status: Option<u32>,
    signal: Option<u32>,
    core_dumped: bool,
) -> Event {
    at(seq, exit_kind(pid, exit_status, signal, core_dumped))
}

fn gap_kind(lost: u64, from_unix_ns: u64) -> Kind {
    Kind::Gap(Gap {
        stream: "critical".into(),
        reason: "ring_full".into(),
        lost,
        from_unix_ns,
        to_unix_ns: from_unix_ns + 1_000,
    })
}

/// A connection of pid `pid` (`/usr/bin/curl`) over IP version `ip`
/// (4 or 6), from a local ephemeral port to port 443.
fn tcp_kind(action: &str, ip: u32, pid: u32) -> Kind {
    let (local_addr, remote_addr) = if ip == 4 {
        ("192.0.2.10", "198.51.100.7")
    } else {
        ("2001:db8::10", "2001:db8:1::7")
    };
    Kind::Tcp(TcpConnection {
        action: action.into(),
        pid,
        owner_unknown: false,
        uid: 1000,
        gid: 100,
        cgroup_id: 4242,
        ip_version: ip,
        local_addr: local_addr.into(),
        local_port: 51_234,
        remote_addr: remote_addr.into(),
        remote_port: 443,
        exe: "/usr/bin/curl".into(),
        ..Default::default()
    })
}

async fn stored_network_events(server: &ClickHouseServer, database: &str) -> Vec<NetworkEventRow> {
    server
        .client()
        .with_database(database)
        .query("SELECT ?fields FROM network_events ORDER BY seq")
        .fetch_all::<NetworkEventRow>()
        .await
        .expect("select network_events")
}

#[tokio::test]
async fn tcp_events_of_a_mixed_batch_land_in_network_events_exactly() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("network");
    let collector = zt_collector::start(config_for(&server, &database))
        .await
        .unwrap();
    let mut agent = AgentStream::open(&collector).await;

    let closed = |seq, ip| {
        let mut kind = tcp_kind("closed", ip, 4300);
        if let Kind::Tcp(t) = &mut kind {
            t.duration_ns = 2_500_000_000;
            t.bytes_sent = 5000;
            t.bytes_received = 3_000_000_000_000;
        }
        at(seq, kind)
    };
    let listen = {
        let mut kind = tcp_kind("listen", 6, 812);
        if let Kind::Tcp(t) = &mut kind {
            t.local_addr = "::".into();
            t.local_port = 22;
            t.remote_addr = "::".into();
            t.remote_port = 0;
            t.uid = 0;
            t.gid = 0;
            t.exe = "/usr/sbin/sshd".into();
        }
        at(11, kind)
    };
    let accepted = {
        let mut kind = tcp_kind("accepted", 4, 812);
        if let Kind::Tcp(t) = &mut kind {
            t.local_port = 22;
            t.remote_port = 60_000;
            t.uid = 0;
            t.gid = 0;
            t.exe = "/usr/sbin/sshd".into();
        }
        at(12, kind)
    };
    let orphan_close = {
        let mut kind = tcp_kind("closed", 4, 0);
        if let Kind::Tcp(t) = &mut kind {
            t.owner_unknown = true;
            t.bytes_unknown = true;
            t.duration_ns = 7;
            t.exe.clear();
        }
        let mut event = at(13, kind);
        event.ancestors.clear();
        event
    };
    let bad_port = {
        let mut kind = tcp_kind("connected", 4, 4300);
        if let Kind::Tcp(t) = &mut kind {
            t.remote_port = 70_000;
        }
        at(14, kind)
    };
    let events = vec![
        exec(1, 4300),
        at(2, tcp_kind("connect_attempt", 4, 4300)),
        at(3, tcp_kind("connected", 4, 4300)),
        closed(4, 4),
        at(5, tcp_kind("connect_attempt", 6, 4300)),
        at(6, tcp_kind("connect_failed", 6, 4300)),
        at(7, gap_kind(3, T0_NS)),
        at(8, tcp_kind("connect_attempt", 6, 4300)),
        at(9, tcp_kind("connected", 6, 4300)),
        closed(10, 6),
        listen,
        accepted,
        orphan_close,
        bad_port,
    ];
    agent
        .send(EventBatch {
            batch_seq: 1,
            agent: Some(identity()),
            events: events.clone(),
        })
        .await;
    let ack = agent.ack(Duration::from_secs(10)).await;
    assert_eq!((ack.batch_seq, ack.stored, ack.rejected), (1, 13, 1));
    assert_eq!(
        ack.reject_reason,
        "tcp event seq 14 has remote_port 70000, beyond 65535"
    );

    // Acked means stored: each row in its table, every value as sent.
    let rows = stored_network_events(&server, &database).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ingested_at = rows[0].ingested_at;
    assert!(u64::from(ingested_at).abs_diff(now) < 120);
    let expected = |seq: u64, action: &str, direction: &str, ip: u8| NetworkEventRow {
        org_id: "pref-test".into(),
        time: u32::try_from((T0_NS + seq * 1_000_000) / 1_000_000_000).unwrap(),
        time_ns: T0_NS + seq * 1_000_000,
        device_id: "device-7".into(),
        hostname: "pc-007".into(),
        boot_id: "0b5e2f4c-boot".into(),
        seq,
        action: action.into(),
        direction: direction.into(),
        pid: 4300,
        owner_unknown: 0,
        uid: 1000,
        gid: 100,
        cgroup_id: 4242,
        exe: "/usr/bin/curl".into(),
        ip_version: ip,
        local_addr: if ip == 4 {
            "192.0.2.10"
        } else {
            "2001:db8::10"
        }
        .into(),
        local_port: 51_234,
        remote_addr: if ip == 4 {
            "198.51.100.7"
        } else {
            "2001:db8:1::7"
        }
        .into(),
        remote_port: 443,
        duration_ns: 0,
        bytes_sent: 0,
        bytes_received: 0,
        bytes_unknown: 0,
        ancestor_pids: vec![4200, 1],
        ancestor_exes: vec!["/usr/bin/bash".into(), "/usr/lib/systemd/systemd".into()],
        ancestor_argv0: vec!["-bash".into(), "/sbin/init".into()],
        ancestor_start_ns: vec![T0_NS - 60_000_000_000, 0],
        agent_version: "0.1.0-test".into(),
        ingested_at,
        user_name: String::new(),
        cgroup_path: String::new(),
        container_id: String::new(),
    };
    let closed_row = |seq, ip| NetworkEventRow {
        duration_ns: 2_500_000_000,
        bytes_sent: 5000,
        bytes_received: 3_000_000_000_000,
        ..expected(seq, "closed", "", ip)
    };
    let sshd = |seq, action: &str, direction: &str, ip| NetworkEventRow {
        pid: 812,
        uid: 0,
        gid: 0,
        exe: "/usr/sbin/sshd".into(),
        local_port: 22,
        ..expected(seq, action, direction, ip)
    };
    assert_eq!(
        rows,
        vec![
            expected(2, "connect_attempt", "outbound", 4),
            expected(3, "connected", "outbound", 4),
            closed_row(4, 4),
            expected(5, "connect_attempt", "outbound", 6),
            expected(6, "connect_failed", "outbound", 6),
            expected(8, "connect_attempt", "outbound", 6),
            expected(9, "connected", "outbound", 6),
            closed_row(10, 6),
            NetworkEventRow {
                local_addr: "::".into(),
                remote_addr: "::".into(),
                remote_port: 0,
                ..sshd(11, "listen", "listen", 6)
            },
            NetworkEventRow {
                remote_port: 60_000,
                ..sshd(12, "accepted", "inbound", 4)
            },
            NetworkEventRow {
                pid: 0,
                owner_unknown: 1,
                exe: String::new(),
                duration_ns: 7,
                bytes_unknown: 1,
                ancestor_pids: vec![],
                ancestor_exes: vec![],
                ancestor_argv0: vec![],
                ancestor_start_ns: vec![],
                ..expected(13, "closed", "", 4)
            },
        ]
    );

    // The other kinds of the batch went to their own tables.
    let processes = stored_rows(&server, &database).await;
    assert_eq!(
        processes
            .iter()
            .map(|r| (r.seq, r.event_type.as_str()))
            .collect::<Vec<_>>(),
        vec![(1, "exec")]
    );
    let gaps = stored_gaps(&server, &database).await;
    assert_eq!(
        gaps.iter().map(|g| (g.seq, g.lost)).collect::<Vec<_>>(),
        vec![(7, 3)]
    );

    // The whole batch again (as after a lost ack): stored again, acked again.
    agent
        .send(EventBatch {
            batch_seq: 2,
            agent: Some(identity()),
            events,
        })
        .await;
    let ack = agent.ack(Duration::from_secs(10)).await;
    assert_eq!((ack.batch_seq, ack.stored, ack.rejected), (2, 13, 1));
    let distinct: u64 = server
        .client()
        .with_database(&database)
        .query(
            "SELECT count() FROM (SELECT seq FROM network_events \
             LIMIT 1 BY device_id, boot_id, seq)",
        )
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(
        distinct, 11,
        "duplicates collapse on (device_id, boot_id, seq)"
    );

    let mut control = ControlClient::new(device_channel(&collector).await);
    let status = control.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.events_stored, 26, "rows of every table");
    assert_eq!(status.events_rejected, 2);

    drop(agent);
    collector.shutdown().await.unwrap();
}

#[tokio::test]
async fn unreachable_clickhouse_fails_start_with_a_clear_error() {
    init_logs();
    // A port nobody listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = CollectorConfig {
        listen: ANY_LOOPBACK_PORT,
        clickhouse: ClickHouseConfig {
            url: format!("http://127.0.0.1:{port}"),
            startup_timeout_secs: 2,
            ..Default::default()
        },
        ..Default::default()
    };

    let started = std::time::Instant::now();
    let err = zt_collector::start(config)
        .await
        .expect_err("start must fail without ClickHouse");
    let elapsed = started.elapsed();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "ClickHouse at http://127.0.0.1:{port} unreachable after 2 s: "
        )),
        "{text}"
    );
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(6),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn ack_waits_while_clickhouse_is_down_and_arrives_after_it_returns() {
    init_logs();
    let mut server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("outage");
    let collector = zt_collector::start(config_for(&server, &database))
        .await
        .unwrap();
    let mut agent = AgentStream::open(&collector).await;

    server.stop();
    agent
        .send(EventBatch {
            batch_seq: 9,
            agent: Some(identity()),
            events: vec![exec(1, 10), exec(2, 20), exec(3, 30)],
        })
        .await;
    // No ack while the rows are not stored.
    let early = tokio::time::timeout(Duration::from_millis(800), agent.acks.message()).await;
    assert!(early.is_err(), "acked while ClickHouse was down: {early:?}");
    assert!(collector.metrics().snapshot().insert_failures >= 1);

    server.restart().await.unwrap();
    let ack = agent.ack(Duration::from_secs(20)).await;
    assert_eq!((ack.batch_seq, ack.stored, ack.rejected), (9, 3, 0));
    let rows = stored_rows(&server, &database).await;
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );

    drop(agent);
    collector.shutdown().await.unwrap();
}

/// Every example query of `docs/schema.md` runs on the migrated schema (of
/// this server's ClickHouse version), over rows of every table.
#[tokio::test]
async fn the_documented_queries_run() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("docs");
    let storage = Storage::new(&config_for(&server, &database).clickhouse).unwrap();
    storage.migrate().await.unwrap();
    let converted = zt_collector::ingest::convert_batch(
        Some(&identity()),
        &[
            exec(1, 4300),
            at(2, tcp_kind("connected", 4, 4300)),
            at(3, tcp_kind("closed", 6, 4300)),
            at(4, gap_kind(2, T0_NS)),
        ],
        1_750_000_100,
    );
    assert_eq!(converted.rejected, 0);
    storage
        .insert(&converted.rows.process_events)
        .await
        .unwrap();
    storage
        .insert(&converted.rows.network_events)
        .await
        .unwrap();
    storage.insert(&converted.rows.gaps).await.unwrap();

    // File activity of every action, from an agent of the organisation the
    // examples name, just now: the file queries must find it.
    let now_ns = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap();
    let files: Vec<Event> = file_events_from(5)
        .into_iter()
        .map(|event| Event {
            time_unix_ns: now_ns - 60_000_000_000 + event.seq,
            ..event
        })
        .collect();
    let examples_agent = AgentIdentity {
        org_id: "pref".into(),
        hostname: "pc-soumu-0042".into(),
        ..identity()
    };
    let converted =
        zt_collector::ingest::convert_batch(Some(&examples_agent), &files, 1_750_000_100);
    assert_eq!(
        (converted.rejected, converted.rows.file_events.len()),
        (0, 5)
    );
    storage.insert(&converted.rows.file_events).await.unwrap();

    // Executions of one path whose content changed in between (the first is
    // the hash the examples hunt for), by the same agent, just now: the hash
    // queries must find them.
    let helper = |seq: u64, exe_sha256: &str| {
        let mut event = exec_as(seq, 4600, exe_sha256, "alice");
        event.time_unix_ns = now_ns - 30_000_000_000 + seq;
        if let Some(Kind::Exec(e)) = event.kind.as_mut() {
            e.filename = "/usr/local/bin/helper".into();
        }
        event
    };
    // And a process that became root just now: the credential queries must
    // find it.
    let mut became_root = at(13, creds_kind("setuid", 4700));
    became_root.time_unix_ns = now_ns - 20_000_000_000;
    // And an exec in a container just now: the container queries must find it.
    let mut in_container = exec_in(14, 4800, CONTAINER_CGROUP, CONTAINER_ID);
    in_container.time_unix_ns = now_ns - 10_000_000_000;
    let execs = [
        helper(10, DOCS_HASH_V1),
        helper(11, DOCS_HASH_V2),
        helper(12, ""),
        became_root,
        in_container,
    ];
    let converted =
        zt_collector::ingest::convert_batch(Some(&examples_agent), &execs, 1_750_000_100);
    assert_eq!(
        (converted.rejected, converted.rows.process_events.len()),
        (0, 5)
    );
    storage
        .insert(&converted.rows.process_events)
        .await
        .unwrap();

    // And DNS queries just now, one for the name the examples look for
    // (sent to a server that is not one of the examples' resolvers), one a
    // datagram to port 53 that is not DNS: the DNS queries must find them.
    let mut lookup = at(15, dns_kind("files.example.org", 4900));
    lookup.time_unix_ns = now_ns - 5_000_000_000;
    let mut malformed = at(16, malformed_dns_kind(4901));
    malformed.time_unix_ns = now_ns - 4_000_000_000;
    let converted = zt_collector::ingest::convert_batch(
        Some(&examples_agent),
        &[lookup, malformed],
        1_750_000_100,
    );
    assert_eq!(
        (converted.rejected, converted.rows.dns_events.len()),
        (0, 2)
    );
    storage.insert(&converted.rows.dns_events).await.unwrap();

    // And connection decisions just now: a denial of the address the
    // examples look for, and an audit rule's would-be denial: the decision
    // queries must find them.
    let mut denied = at(17, decision_kind("deny", "denied", 5000));
    denied.time_unix_ns = now_ns - 3_000_000_000;
    let mut audited = at(18, decision_kind("audit", "would_deny", 5001));
    audited.time_unix_ns = now_ns - 2_000_000_000;
    let converted = zt_collector::ingest::convert_batch(
        Some(&examples_agent),
        &[denied, audited],
        1_750_000_100,
    );
    assert_eq!((converted.rejected, converted.rows.decisions.len()), (0, 2));
    storage.insert(&converted.rows.decisions).await.unwrap();

    let doc = include_str!("../../docs/schema.md");
    let queries: Vec<&str> = doc
        .split("```sql\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .flat_map(|block| block.split(";\n"))
        .map(str::trim)
        .filter(|q| q.starts_with("SELECT") && !q.contains('…') && !q.contains('<'))
        .collect();
    assert!(queries.len() >= 15, "{} queries found", queries.len());
    let client = server.client();
    let mut file_queries = 0;
    let mut hash_queries = 0;
    let mut cred_queries = 0;
    let mut container_queries = 0;
    let mut dns_queries = 0;
    let mut decision_queries = 0;
    for query in queries {
        let sql = query
            .trim_end_matches(';')
            .replace("zt.", &format!("{database}."));
        client
            .query(&sql)
            .execute()
            .await
            .unwrap_or_else(|e| panic!("{e}\n{sql}"));
        // Each file or hash query finds the activity it is about.
        let is_file_query = query.contains("FROM zt.file_events");
        let is_hash_query = query.contains("exe_sha256");
        let is_cred_query = query.contains("'cred_change'");
        let is_container_query = query.contains("container_id != ''");
        let is_dns_query = query.contains("FROM zt.dns_events");
        let is_decision_query = query.contains("FROM zt.decisions");
        file_queries += u32::from(is_file_query);
        dns_queries += u32::from(is_dns_query);
        decision_queries += u32::from(is_decision_query);
        hash_queries += u32::from(is_hash_query);
        cred_queries += u32::from(is_cred_query);
        container_queries += u32::from(is_container_query);
        if is_file_query
            || is_hash_query
            || is_cred_query
            || is_container_query
            || is_dns_query
            || is_decision_query
        {
            let found: u64 = client
                .query(&format!("SELECT count() FROM ({sql})"))
                .fetch_one()
                .await
                .unwrap_or_else(|e| panic!("{e}\n{sql}"));
            assert!(found > 0, "no rows from\n{sql}");
        }
    }
    assert!(file_queries >= 3, "{file_queries} file queries found");
    assert!(hash_queries >= 2, "{hash_queries} hash queries found");
    assert!(cred_queries >= 1, "{cred_queries} credential queries found");
    assert!(
        container_queries >= 1,
        "{container_queries} container queries found"
    );
    assert!(dns_queries >= 2, "{dns_queries} DNS queries found");
    assert!(
        decision_queries >= 2,
        "{decision_queries} decision queries found"
    );
    let doc_hash = format!("exe_sha256 = '{DOCS_HASH_V1}'");
    assert!(
        doc.contains(&doc_hash),
        "the examples hunt for {DOCS_HASH_V1}"
    );
}

/// SHA-256 of two versions of a script (`#!/bin/sh\necho v1\n`, then
/// `v2`); the first is the hash `docs/schema.md` hunts for.
const DOCS_HASH_V1: &str = "667f61a069b75f1f57fc561623da00e013e144221e8ea54de2803da9dd8aa952";
const DOCS_HASH_V2: &str = "268005d39f7e216d686f4e63ed1e4b4a1b6a06552b5ca4d1a17e1a176e3ce249";

/// One agent's window of unacknowledged batches is stored together: with a
/// writer that flushes only when full (the delay is an hour), two batches of
/// one stream that together fill it are both acknowledged. Handled one at a
/// time, neither would ever be.
#[tokio::test]
async fn batches_of_one_stream_are_stored_concurrently() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("pipelined");
    let mut config = config_for(&server, &database);
    config.batch = BatchConfig {
        max_rows: 4,
        max_delay_ms: 3_600_000,
    };
    let collector = zt_collector::start(config).await.unwrap();
    let mut agent = AgentStream::open(&collector).await;
    for (batch_seq, first) in [(1, 1), (2, 3)] {
        agent
            .send(EventBatch {
                batch_seq,
                agent: Some(identity()),
                events: vec![exec(first, 100), exec(first + 1, 100)],
            })
            .await;
    }
    let mut acked: Vec<u64> = Vec::new();
    for _ in 0..2 {
        let ack = agent.ack(Duration::from_secs(20)).await;
        assert_eq!(ack.stored, 2);
        acked.push(ack.batch_seq);
    }
    acked.sort_unstable();
    assert_eq!(acked, vec![1, 2]);
    assert_eq!(stored_rows(&server, &database).await.len(), 4);
    collector.shutdown().await.unwrap();
}

/// Migration 13: an event stored twice (a batch resent after its ack was
/// lost) is one event, for `FINAL` at once and physically after merges;
/// different events that share everything but the run are both kept; rows
/// stored before the migration survive; an interrupted rebuild resumes.
#[tokio::test]
async fn events_stored_twice_are_one_event_and_the_rebuild_resumes() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("dedup");
    let storage = Storage::new(&config_for(&server, &database).clickhouse).unwrap();
    assert_eq!(storage.migrate_to(12).await.unwrap().applied.len(), 12);
    let rows = |boot: &str, events: &[Event]| {
        let mut agent = identity();
        agent.boot_id = boot.into();
        zt_collector::ingest::convert_batch(Some(&agent), events, 1_750_000_100).rows
    };
    // Before the migration: an exec stored twice, and the same seq of
    // another run.
    let first = rows(
        "run-1",
        &[exec(1, 100), at(2, tcp_kind("connected", 4, 100))],
    );
    storage.insert(&first.process_events).await.unwrap();
    storage.insert(&first.process_events).await.unwrap();
    storage.insert(&first.network_events).await.unwrap();
    storage
        .insert(&rows("run-2", &[exec(1, 100)]).process_events)
        .await
        .unwrap();

    let client = server.client().with_database(&database);
    // Leftovers of an interrupted run: a half-filled copy of network_events,
    // and file_events caught between its two renames.
    client
        .query("CREATE TABLE network_events_rebuild AS network_events ENGINE = Memory")
        .execute()
        .await
        .unwrap();
    let files = rows("run-1", &[at(3, file_kind("open_write", 100, "/tmp/x"))]);
    storage.insert(&files.file_events).await.unwrap();
    for sql in [
        "CREATE TABLE file_events_rebuild AS file_events ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMMDD(time) ORDER BY (org_id, hostname, time, pid, seq, device_id, boot_id)",
        "INSERT INTO file_events_rebuild SELECT * FROM file_events",
        "RENAME TABLE file_events TO file_events_retired",
    ] {
        client.query(sql).execute().await.unwrap();
    }

    let report = storage.migrate().await.unwrap();
    assert_eq!(report.applied, vec![13, 14, 15, 16]);
    let count = |sql: &'static str| {
        let client = client.clone();
        async move { client.query(sql).fetch_one::<u64>().await.unwrap() }
    };
    assert_eq!(
        count("SELECT count() FROM process_events FINAL").await,
        2,
        "one per (device, run, seq)"
    );
    assert_eq!(count("SELECT count() FROM network_events FINAL").await, 1);
    assert_eq!(count("SELECT count() FROM file_events FINAL").await, 1);
    let engines: Vec<(String, String)> = client
        .query("SELECT name, engine FROM system.tables WHERE database = ? ORDER BY name")
        .bind(&database)
        .fetch_all()
        .await
        .unwrap();
    for (table, engine) in &engines {
        if [
            "process_events",
            "network_events",
            "file_events",
            "dns_events",
            "decisions",
            "gaps",
        ]
        .contains(&table.as_str())
        {
            assert_eq!(engine, "ReplacingMergeTree", "{table}");
        }
        assert!(
            !table.ends_with("_rebuild") && !table.ends_with("_retired"),
            "leftover {table}: {engines:?}"
        );
    }

    // Through the service: the same batch twice (as after a lost ack).
    let collector = zt_collector::start(config_for(&server, &database))
        .await
        .unwrap();
    let mut agent = AgentStream::open(&collector).await;
    for batch_seq in [7, 7] {
        agent
            .send(EventBatch {
                batch_seq,
                agent: Some(identity()),
                events: vec![exec(40, 4000), exec(41, 4100)],
            })
            .await;
        let ack = agent.ack(Duration::from_secs(10)).await;
        assert_eq!((ack.stored, ack.rejected), (2, 0));
    }
    assert_eq!(
        count("SELECT count() FROM process_events FINAL WHERE seq >= 40").await,
        2
    );
    client
        .query("OPTIMIZE TABLE process_events FINAL")
        .execute()
        .await
        .unwrap();
    assert_eq!(
        count("SELECT count() FROM process_events WHERE seq >= 40").await,
        2,
        "merged away physically too"
    );
    collector.shutdown().await.unwrap();
}
