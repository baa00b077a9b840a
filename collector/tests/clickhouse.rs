//! The collector against a real ClickHouse (a private server per test, see
//! `zt_e2e::clickhouse`): migrations, the gRPC ingest path end to end,
//! start-up failure, and a ClickHouse outage while agents send.

use std::time::Duration;

use proto::{
    control::{control_client::ControlClient, StatusRequest},
    telemetry::{
        event::Kind, telemetry_client::TelemetryClient, AgentIdentity, BatchAck, Event, EventBatch,
        ProcessExec,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use zt_collector::{
    config::{BatchConfig, ClickHouseConfig},
    storage::{ProcessEventRow, Storage, MIGRATIONS},
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
        ..Default::default()
    }
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
        })),
    }
}

/// An open telemetry stream: send batches, read acks.
struct AgentStream {
    tx: mpsc::Sender<EventBatch>,
    acks: Streaming<BatchAck>,
}

impl AgentStream {
    async fn open(addr: std::net::SocketAddr) -> AgentStream {
        let mut client = TelemetryClient::connect(format!("http://{addr}"))
            .await
            .expect("connect to the collector");
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

    // (ClickHouse 18.16's system.columns has no `position`: compare as sets.)
    let mut columns: Vec<(String, String)> = client
        .query(
            "SELECT name, type FROM system.columns \
             WHERE database = ? AND table = 'process_events' ORDER BY name",
        )
        .bind(database.as_str())
        .fetch_all()
        .await
        .unwrap();
    let expected = [
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
    ];
    let mut expected: Vec<(String, String)> = expected
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    expected.sort();
    columns.sort();
    assert_eq!(columns, expected);

    let (sorting_key, partition_key): (String, String) = client
        .query(
            "SELECT sorting_key, partition_key FROM system.tables \
             WHERE database = ? AND name = 'process_events'",
        )
        .bind(database.as_str())
        .fetch_one()
        .await
        .unwrap_or_else(|_| {
            // ClickHouse 18.16 has no sorting_key column; fall back to the DDL.
            (String::new(), String::new())
        });
    if sorting_key.is_empty() {
        let ddl: String = client
            .query("SELECT create_table_query FROM system.tables WHERE database = ? AND name = 'process_events'")
            .bind(database.as_str())
            .fetch_one()
            .await
            .unwrap();
        assert!(
            ddl.contains("ORDER BY (org_id, hostname, time, pid, seq)"),
            "{ddl}"
        );
        assert!(ddl.contains("PARTITION BY toYYYYMMDD(time)"), "{ddl}");
    } else {
        assert_eq!(sorting_key, "org_id, hostname, time, pid, seq");
        assert_eq!(partition_key, "toYYYYMMDD(time)");
    }
}

#[tokio::test]
async fn batches_are_stored_then_acked_and_bad_events_rejected() {
    init_logs();
    let server = ClickHouseServer::start().await.unwrap();
    let database = fresh_database_name("ingest");
    let collector = zt_collector::start(config_for(&server, &database))
        .await
        .unwrap();
    let addr = collector.local_addr();

    let mut agent = AgentStream::open(addr).await;
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
    let mut control = ControlClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
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
    let mut agent = AgentStream::open(collector.local_addr()).await;

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
