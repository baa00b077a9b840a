//! Telemetry ingest: the `zt.telemetry.v1.Telemetry` gRPC service.
//!
//! Each agent holds one `Stream`, over mutual TLS: the device is the one its
//! client certificate names (`spiffe://<td>/org/<org>/device/<device>`), and
//! the organisation, device id and host name stored with its events come
//! from the certificate and the device registry, whatever the batches claim.
//! For every `EventBatch` the service converts
//! the events ([`convert`]), splits the valid rows by table, hands each table's
//! rows to its batch writer (all tables at once), waits until ClickHouse has
//! stored every one of them, and only then answers with a `BatchAck` (stored
//! in all tables, rejected, first reject reason). Malformed events are refused and
//! counted; they never fail the rest of their batch. When the rows cannot be
//! stored the stream ends with `UNAVAILABLE`, and the agent sends the
//! unacknowledged batches again after reconnecting.
//!
//! A stream's batches are stored concurrently (up to
//! [`MAX_BATCHES_IN_FLIGHT_PER_STREAM`]), so that one agent's window of
//! unacknowledged batches fills a writer's batch instead of waiting out its
//! delay once per batch; acks may therefore come out of order, and each names
//! its batch.
//!
//! Once a batch is stored, its events go to detection
//! ([`crate::detection`]), and its denied decisions and connection errors are
//! counted for the device ([`crate::rollout::health_samples`]), which is
//! how a policy canary's health is judged.

pub mod convert;

use std::sync::Arc;

use proto::telemetry::{telemetry_server::Telemetry, BatchAck, EventBatch};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use zt_identity::SpiffeId;

use crate::{
    control_plane::ControlPlane,
    detection::DetectionHandle,
    fleet::ConnectedDevices,
    metrics::{ConnectedAgent, Metrics},
    writer::{TableWriters, WriteError},
};

pub use self::convert::{convert_batch, Converted, EventRow, RejectReason, TableRows};

/// Acks buffered per stream before the handler waits for the agent to read.
const ACK_BUFFER: usize = 16;
/// Batches of one stream being stored at once; a stream sending more waits
/// (back-pressure through HTTP/2 flow control).
pub const MAX_BATCHES_IN_FLIGHT_PER_STREAM: usize = 16;

/// Errors of the ingest path, as seen by the agent.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("events of batch {batch_seq} not stored: {source}")]
    NotStored { batch_seq: u64, source: WriteError },
}

impl From<IngestError> for Status {
    fn from(e: IngestError) -> Status {
        // UNAVAILABLE: retry later; the batch was not acknowledged.
        Status::unavailable(e.to_string())
    }
}

/// The telemetry service; one per server, shared by all streams.
#[derive(Debug, Clone)]
pub struct TelemetryService {
    writers: TableWriters,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    plane: Arc<ControlPlane>,
    connected: ConnectedDevices,
    detection: DetectionHandle,
}

/// Who sends a stream, by its certificate and the device registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedAgent {
    pub id: SpiffeId,
    pub org_id: String,
    pub device_id: String,
    /// As registered at enrollment; empty when the registry has no record.
    pub hostname: String,
}

impl AuthenticatedAgent {
    /// Replaces the batch's claimed organisation, device and host with the
    /// authenticated ones (boot id and agent version stay as sent).
    pub fn stamp(&self, batch: &mut EventBatch, peer: &str) {
        let agent = batch.agent.get_or_insert_with(Default::default);
        if (!agent.org_id.is_empty() && agent.org_id != self.org_id)
            || (!agent.device_id.is_empty() && agent.device_id != self.device_id)
        {
            warn!(
                %peer,
                claimed_org = %agent.org_id,
                claimed_device = %agent.device_id,
                org = %self.org_id,
                device = %self.device_id,
                "batch claims another identity than its certificate; stored under the certificate's"
            );
        }
        agent.org_id.clone_from(&self.org_id);
        agent.device_id.clone_from(&self.device_id);
        if !self.hostname.is_empty() {
            agent.hostname.clone_from(&self.hostname);
        }
    }
}

impl TelemetryService {
    /// `shutdown` turning true ends every stream after its current batch.
    pub fn new(
        writers: TableWriters,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
        plane: Arc<ControlPlane>,
        connected: ConnectedDevices,
        detection: DetectionHandle,
    ) -> TelemetryService {
        TelemetryService {
            writers,
            metrics,
            shutdown,
            plane,
            connected,
            detection,
        }
    }

    /// Converts, stores and acknowledges one batch.
    pub async fn handle_batch(&self, batch: EventBatch) -> Result<BatchAck, IngestError> {
        let Converted {
            rows,
            rejected,
            first_reason,
        } = convert_batch(batch.agent.as_ref(), &batch.events, unix_seconds_now());
        let stored = u32::try_from(rows.len()).unwrap_or(u32::MAX);
        if rejected > 0 {
            Metrics::add(&self.metrics.events_rejected, u64::from(rejected));
            let agent = batch.agent.as_ref();
            warn!(
                batch_seq = batch.batch_seq,
                org_id = agent.map(|a| a.org_id.as_str()).unwrap_or(""),
                device_id = agent.map(|a| a.device_id.as_str()).unwrap_or(""),
                rejected,
                reason = %first_reason.as_ref().map(ToString::to_string).unwrap_or_default(),
                "rejected malformed events"
            );
        }
        // What a canary's health is judged by; counted once stored.
        let health = crate::rollout::health_samples(&rows.decisions, &rows.network_events);
        // What detection sees, once stored (so incidents link stored rows).
        let detect_events = if self.detection.is_enabled() {
            crate::detection::events::from_rows(&rows)
        } else {
            Vec::new()
        };
        // Every table at once; the ack waits for all of them. When one fails
        // the agent resends the whole batch, so the rows another table did
        // store arrive twice; the event tables fold such copies into one
        // (ReplacingMergeTree keyed by the event's identity, migration 13;
        // `decisions` is created so, migration 14).
        let TableRows {
            process_events,
            network_events,
            file_events,
            dns_events,
            decisions,
            gaps,
        } = rows;
        let (process_events, network_events, file_events, dns_events, decisions, gaps) = tokio::join!(
            self.writers.process_events.write(process_events),
            self.writers.network_events.write(network_events),
            self.writers.file_events.write(file_events),
            self.writers.dns_events.write(dns_events),
            self.writers.decisions.write(decisions),
            self.writers.gaps.write(gaps)
        );
        process_events
            .and(network_events)
            .and(file_events)
            .and(dns_events)
            .and(decisions)
            .and(gaps)
            .map_err(|source| IngestError::NotStored {
                batch_seq: batch.batch_seq,
                source,
            })?;
        if let (false, Some(agent)) = (health.is_empty(), batch.agent.as_ref()) {
            self.plane
                .policy()
                .record_health(&agent.org_id, &agent.device_id, &health);
        }
        self.detection.feed(detect_events).await;
        Metrics::add(&self.metrics.batches_acked, 1);
        Ok(BatchAck {
            batch_seq: batch.batch_seq,
            stored,
            rejected,
            reject_reason: first_reason.map(|r| r.to_string()).unwrap_or_default(),
        })
    }

    async fn serve_stream(
        self,
        mut inbound: Streaming<EventBatch>,
        acks: mpsc::Sender<Result<BatchAck, Status>>,
        peer: String,
        sender: AuthenticatedAgent,
    ) {
        let _connected = ConnectedAgent::new(self.metrics.clone());
        let _device = self.connected.connect(&sender.id);
        let mut revocations = self.plane.watch_revocations();
        let mut shutdown = self.shutdown.clone();
        info!(%peer, "agent stream opened");
        let mut in_flight: tokio::task::JoinSet<Result<BatchAck, IngestError>> =
            tokio::task::JoinSet::new();
        // Reading stops at the end of the stream, on an error or on shutdown;
        // batches already taken are still stored and acknowledged.
        let mut reading = true;
        loop {
            tokio::select! {
                biased;
                // The watch guard must not live across an await: drop it here.
                () = async { let _ = shutdown.wait_for(|stop| *stop).await; }, if reading => {
                    debug!(%peer, "closing agent stream for shutdown");
                    reading = false;
                }
                // A revoked device's stream ends at once, batches in flight
                // unacknowledged. (Guarded, so that a stream with nothing
                // left to read or store still reaches `else` and ends.)
                Ok(()) = revocations.changed(), if reading || !in_flight.is_empty() => {
                    if self.plane.is_revoked(&sender.id) {
                        warn!(%peer, device = %sender.id, "device revoked; cutting its telemetry stream");
                        let _ = acks.send(Err(Status::permission_denied("device revoked"))).await;
                        break;
                    }
                }
                Some(done) = in_flight.join_next() => match done {
                    Ok(Ok(ack)) => {
                        if acks.send(Ok(ack)).await.is_err() {
                            break; // the agent went away
                        }
                    }
                    Ok(Err(e)) => {
                        warn!(%peer, error = %e, "ending agent stream");
                        let _ = acks.send(Err(e.into())).await;
                        break;
                    }
                    Err(join) => {
                        warn!(%peer, error = %join, "batch task failed; ending agent stream");
                        let _ = acks.send(Err(Status::internal("batch task failed"))).await;
                        break;
                    }
                },
                next = inbound.message(), if reading && in_flight.len() < MAX_BATCHES_IN_FLIGHT_PER_STREAM => match next {
                    Ok(Some(mut batch)) => {
                        sender.stamp(&mut batch, &peer);
                        let service = self.clone();
                        in_flight.spawn(async move { service.handle_batch(batch).await });
                    }
                    Ok(None) => reading = false,
                    Err(status) => {
                        debug!(%peer, %status, "agent stream failed");
                        reading = false;
                    }
                },
                else => break,
            }
        }
        info!(%peer, "agent stream closed");
    }
}

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    type StreamStream = ReceiverStream<Result<BatchAck, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<EventBatch>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".to_owned());
        let id = crate::enrollment::caller_device(&request, &self.plane)?;
        let device = id.device_id().unwrap_or_default();
        let hostname = self
            .plane
            .device(&id)
            .map(|record| record.hostname)
            .unwrap_or_default();
        let sender = AuthenticatedAgent {
            id: id.clone(),
            org_id: id.org().to_owned(),
            device_id: device.to_owned(),
            hostname,
        };
        let (tx, rx) = mpsc::channel(ACK_BUFFER);
        tokio::spawn(
            self.clone()
                .serve_stream(request.into_inner(), tx, peer, sender),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn unix_seconds_now() -> u32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}
