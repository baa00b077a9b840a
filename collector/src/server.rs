//! Wiring: reach ClickHouse, migrate, start the batch writers, serve the gRPC
//! services, and shut down gracefully.
//!
//! [`run`] is what the binary calls: it serves until SIGINT or SIGTERM, then
//! stops accepting, lets open streams finish their current batch, flushes the
//! writers and returns. [`start`] does the same start-up but returns a
//! [`RunningCollector`] handle, for tests and embedding.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use proto::{
    control::{
        admin_server::AdminServer, control_server::ControlServer, fleet_server::FleetServer,
    },
    enrollment::enrollment_server::EnrollmentServer,
    query::query_server::QueryServer,
    telemetry::telemetry_server::TelemetryServer,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::{service::Routes, transport::Server};
use tracing::{error, info, warn};

use crate::{
    admin::AdminService,
    config::CollectorConfig,
    control::ControlService,
    control_plane::{ControlPlane, ControlPlaneError},
    detection::{Detection, DetectionError},
    enrollment::EnrollmentService,
    fleet::{ConnectedDevices, FleetService},
    ingest::TelemetryService,
    metrics::Metrics,
    query::QueryService,
    storage::{AuditRow, Storage, StorageError},
    writer::{self, BatchLimits, TableWriterTasks},
};

/// How often running policy canaries are judged.
const ROLLOUT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long shutdown waits for streams to finish, then for the writers to flush.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_BACKOFF_START: Duration = Duration::from_millis(100);
const CONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why the collector could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("ClickHouse at {url} unreachable after {secs} s: {last}")]
    ClickHouseUnreachable {
        url: String,
        secs: u64,
        last: StorageError,
    },
    #[error("ClickHouse at {url} refused the collector: {error}")]
    ClickHouseRefused { url: String, error: StorageError },
    #[error("schema migration failed on ClickHouse at {url}: {error}")]
    Migration { url: String, error: StorageError },
    #[error("invalid storage configuration: {0}")]
    Storage(#[from] StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("grpc server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("grpc server stopped unexpectedly")]
    ServerStopped,
    #[error("control plane: {0}")]
    ControlPlane(#[from] ControlPlaneError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Detection(#[from] DetectionError),
    #[error("configuration: {0}")]
    Config(#[from] crate::ConfigError),
}

/// A collector started by [`start`]; stop it with [`RunningCollector::shutdown`].
#[derive(Debug)]
pub struct RunningCollector {
    local_addr: SocketAddr,
    state_dir: std::path::PathBuf,
    metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    /// `None` once the server task has been awaited.
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    writers: TableWriterTasks,
    detection: Detection,
}

impl RunningCollector {
    /// The address the gRPC server is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The control plane's state directory (CA, tokens, devices).
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Resolves only if the gRPC server stops on its own (an accept or
    /// transport failure): the caller then shuts the rest down.
    pub async fn server_stopped(&mut self) -> Result<(), RunError> {
        let Some(server) = self.server.as_mut() else {
            return std::future::pending().await;
        };
        let result = server.await;
        self.server = None;
        match result {
            Ok(served) => served.map_err(RunError::from),
            Err(join) => {
                error!(error = %join, "grpc server task failed");
                Ok(())
            }
        }
    }

    /// Stops accepting, ends the streams after their current batch, flushes
    /// the writers; each step bounded by a grace period.
    pub async fn shutdown(self) -> Result<(), RunError> {
        info!("collector shutting down");
        let _ = self.shutdown.send(true);
        let Some(mut server) = self.server else {
            self.writers.shutdown(SHUTDOWN_GRACE).await;
            self.detection.shutdown(SHUTDOWN_GRACE).await;
            return Ok(());
        };
        let served = match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
            Ok(Ok(result)) => result.map_err(RunError::from),
            Ok(Err(join)) => {
                error!(error = %join, "grpc server task failed");
                Ok(())
            }
            Err(_) => {
                warn!(
                    "streams still open after {} s; closing them",
                    SHUTDOWN_GRACE.as_secs()
                );
                server.abort();
                Ok(())
            }
        };
        if self.writers.shutdown(SHUTDOWN_GRACE).await {
            info!("batch writers flushed");
        } else {
            warn!(
                "batch writers could not flush within {} s; unacknowledged batches will be resent by agents",
                SHUTDOWN_GRACE.as_secs()
            );
        }
        // Ingest has stopped: detection analyses what is queued, stores its
        // incidents and saves its state.
        if !self.detection.shutdown(SHUTDOWN_GRACE).await {
            warn!(
                "detection could not finish within {} s; its state was saved at the last interval",
                SHUTDOWN_GRACE.as_secs()
            );
        }
        served
    }
}

/// Starts the collector and serves until SIGINT or SIGTERM.
pub async fn run(config: CollectorConfig) -> Result<(), RunError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    let mut collector = start(config).await?;
    let stopped = tokio::select! {
        _ = terminate.recv() => { info!("SIGTERM received"); Ok(()) }
        _ = interrupt.recv() => { info!("SIGINT received"); Ok(()) }
        result = collector.server_stopped() => {
            error!("grpc server stopped unexpectedly");
            Err(result.err().unwrap_or(RunError::ServerStopped))
        }
    };
    let shutdown = collector.shutdown().await;
    stopped.and(shutdown)
}

/// Reaches ClickHouse (retrying until the startup timeout), applies the
/// migrations, starts the writers and binds the gRPC server.
pub async fn start(config: CollectorConfig) -> Result<RunningCollector, RunError> {
    let storage = Storage::new(&config.clickhouse)?;
    wait_for_clickhouse(
        &storage,
        Duration::from_secs(config.clickhouse.startup_timeout_secs),
    )
    .await?;
    let report = storage
        .migrate()
        .await
        .map_err(|error| RunError::Migration {
            url: storage.url().to_owned(),
            error,
        })?;
    info!(
        url = storage.url(),
        database = storage.database(),
        applied = ?report.applied,
        already_applied = ?report.already_applied,
        "ClickHouse schema up to date"
    );

    let metrics = Metrics::new();
    let limits = BatchLimits {
        max_rows: config.batch.max_rows,
        max_delay: Duration::from_millis(config.batch.max_delay_ms),
    };
    let (table_writers, writers) = writer::spawn_tables(&storage, limits, metrics.clone());

    let plane = Arc::new(ControlPlane::open(&config.identity)?);
    plane.policy().configure(config.policy.rollout_settings());
    let tls = plane.server_tls()?;
    info!(
        trust_domain = %plane.trust_domain(),
        ca_pin = %plane.ca_pin().unwrap_or_default(),
        state_dir = %config.identity.state_dir.display(),
        "control plane ready"
    );

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| RunError::Bind {
        addr: config.listen,
        source,
    })?;
    let incoming = zt_grpc_tls::serve_tls(listener, tls);

    let utc_offset_secs = config.detection.utc_offset_secs()?;
    let detection = Detection::start(
        &config.detection,
        &config.identity.state_dir,
        storage.clone(),
        metrics.clone(),
    )
    .await?;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let connected = ConnectedDevices::default();
    let telemetry = TelemetryService::new(
        table_writers,
        metrics.clone(),
        shutdown_rx.clone(),
        plane.clone(),
        connected.clone(),
        detection.handle(),
    );
    let enrollment = EnrollmentService::new(plane.clone());
    let query = QueryService::new(
        plane.clone(),
        storage.clone(),
        connected.clone(),
        detection.book(),
        utc_offset_secs,
    );
    let admin = AdminService::new(plane.clone(), storage.clone(), connected);
    let sessions = Arc::new(crate::console::sessions::Sessions::default());
    let console = crate::console::Console::new(
        plane.clone(),
        storage.clone(),
        admin.clone(),
        query.clone(),
        &config.identity.state_dir,
        sessions.clone(),
    );
    let fleet = FleetService::new(plane.clone(), storage.clone(), shutdown_rx.clone())
        .with_detection(detection.handle());
    tokio::spawn(check_rollouts(
        plane.clone(),
        storage.clone(),
        shutdown_rx.clone(),
    ));
    let control = ControlService::new(storage, metrics.clone());
    let mut stop = shutdown_rx;
    // The gRPC services and, on the same port, the query API as HTTP/JSON
    // and the SOC console.
    let routes = Routes::new(TelemetryServer::new(telemetry))
        .add_service(ControlServer::new(control))
        .add_service(EnrollmentServer::new(enrollment))
        .add_service(AdminServer::new(admin))
        .add_service(FleetServer::new(fleet))
        .add_service(QueryServer::new(query.clone()))
        .into_axum_router()
        .merge(crate::query::http::router(query, sessions))
        .merge(console.router());
    let server = tokio::spawn(
        Server::builder()
            .add_routes(Routes::from(routes))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|stop| *stop).await;
            }),
    );
    info!(%local_addr, "collector listening on {local_addr}");
    Ok(RunningCollector {
        local_addr,
        state_dir: config.identity.state_dir.clone(),
        metrics,
        shutdown,
        server: Some(server),
        writers,
        detection,
    })
}

/// Judges the running policy canaries every second until shutdown:
/// promotes or rolls back (see [`crate::rollout`]), and audits each as the
/// collector's own act.
async fn check_rollouts(
    plane: Arc<ControlPlane>,
    storage: Storage,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(ROLLOUT_CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let checking = plane.clone();
        let events = match tokio::task::spawn_blocking(move || {
            checking
                .policy()
                .check_rollouts(crate::distribution::unix_now_ms())
        })
        .await
        {
            Ok(events) => events,
            Err(join) => {
                error!(error = %join, "policy rollout check failed");
                continue;
            }
        };
        for event in events {
            for row in rollout_audit(&event) {
                crate::admin::write_audit_row(&storage, row).await;
            }
        }
    }
}

/// The audit records of a canary's end: one per organisation concerned.
fn rollout_audit(event: &crate::distribution::RolloutEvent) -> Vec<AuditRow> {
    use crate::rollout::RolloutState;
    let rollout = &event.rollout;
    let rates = |r: Option<crate::rollout::Observed>| {
        let r = r.unwrap_or_default();
        format!(
            "{:.1} denied/min, {:.1} errors/min",
            r.deny_rate(),
            r.error_rate()
        )
    };
    let health = format!(
        "canary {} ({} devices): before the push {}; during {}",
        rollout.canary_group,
        rollout.canary_device_count(),
        rates(rollout.before),
        rates(rollout.during)
    );
    let (action, result, detail) = match (&event.error, rollout.state) {
        (Some(error), _) => ("policy.rollback", "error", format!("{error}; {health}")),
        (None, RolloutState::RolledBack) => (
            "policy.rollback",
            "ok",
            format!(
                "serial {} restores the previous serial, automatically: {}; {health}",
                rollout.rollback_serial, rollout.reason
            ),
        ),
        (None, _) => (
            "policy.promote",
            "ok",
            format!(
                "serial {} goes to every device after {} s of canary; {health}",
                rollout.serial, rollout.canary_seconds
            ),
        ),
    };
    rollout
        .orgs
        .keys()
        .map(|org| AuditRow {
            org_id: org.clone(),
            time: 0,
            time_ns: 0,
            actor: crate::distribution::COLLECTOR_ACTOR.to_owned(),
            actor_role: String::new(),
            action: action.to_owned(),
            target: format!("serial {}", rollout.serial),
            source: String::new(),
            result: result.to_owned(),
            detail: detail.clone(),
        })
        .collect()
}

/// Pings ClickHouse with backoff until it answers or `timeout` has passed.
/// A permanent refusal (e.g. authentication) fails at once.
async fn wait_for_clickhouse(storage: &Storage, timeout: Duration) -> Result<(), RunError> {
    let started = tokio::time::Instant::now();
    let deadline = started + timeout;
    let mut delay = CONNECT_BACKOFF_START;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let attempt = storage.ping(PING_TIMEOUT.min(remaining.max(Duration::from_millis(100))));
        match attempt.await {
            Ok(()) => {
                info!(url = storage.url(), "ClickHouse reachable");
                return Ok(());
            }
            Err(error) if !error.is_retriable() => {
                return Err(RunError::ClickHouseRefused {
                    url: storage.url().to_owned(),
                    error,
                });
            }
            Err(error) => {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Err(RunError::ClickHouseUnreachable {
                        url: storage.url().to_owned(),
                        secs: timeout.as_secs(),
                        last: error,
                    });
                }
                warn!(
                    url = storage.url(),
                    error = %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "ClickHouse not reachable yet"
                );
                tokio::time::sleep(delay.min(deadline - now)).await;
                delay = (delay * 2).min(CONNECT_BACKOFF_MAX);
            }
        }
    }
}
