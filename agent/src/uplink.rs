//! Streams events to the collector over gRPC (`Telemetry.Stream`) in
//! batches, keeps every batch until the collector acknowledges it, and
//! reconnects with exponential backoff and jitter when the collector is
//! unreachable — the agent itself keeps running and keeps collecting.

use std::{sync::Arc, time::Duration};

use proto::telemetry::{telemetry_client::TelemetryClient, AgentIdentity, Event, EventBatch};
use rand::Rng;
use tokio::{
    sync::mpsc,
    time::{sleep_until, Instant},
};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::{
    config::UplinkConfig,
    enrollment::SharedIdentity,
    metrics::AgentMetrics,
    outbox::Outbox,
    sensors::{gap_event, Sequencer},
};

/// How long a stopping agent waits for the collector to acknowledge what it
/// still holds.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("{0}")]
    Url(#[from] zt_grpc_tls::TlsTransportError),
    #[error("device identity: {0}")]
    Identity(#[from] zt_identity::Error),
    #[error("cannot connect to collector: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error("collector refused the telemetry stream: {0}")]
    Open(#[source] tonic::Status),
    #[error("telemetry stream broke: {0}")]
    Stream(#[source] tonic::Status),
    #[error("collector closed the telemetry stream")]
    Closed,
}

pub struct Uplink {
    url: String,
    identity: AgentIdentity,
    /// The device certificate each connection presents (renewed meanwhile).
    device: SharedIdentity,
    config: UplinkConfig,
    metrics: Arc<AgentMetrics>,
    outbox: Outbox,
    sequencer: Sequencer,
    /// When the oldest drop not yet reported happened (Unix ns).
    first_unreported_drop_ns: Option<u64>,
}

/// How a session with the collector ended without error.
enum SessionEnd {
    /// The event source closed (agent stopping) and the queue is drained or
    /// the drain timed out.
    SourceClosed,
}

impl Uplink {
    pub fn new(
        url: String,
        identity: AgentIdentity,
        device: SharedIdentity,
        config: UplinkConfig,
        metrics: Arc<AgentMetrics>,
        sequencer: Sequencer,
    ) -> Self {
        let outbox = Outbox::with_limits(config.buffer_max_events, config.buffer_max_bytes);
        Self {
            url,
            identity,
            device,
            config,
            metrics,
            outbox,
            sequencer,
            first_unreported_drop_ns: None,
        }
    }

    /// Turns the queue's drops since the last report into gap records
    /// (`reason = "queue_full"`), sent ahead of other events.
    fn report_drops(&mut self) {
        let Some((critical, bulk)) = self.outbox.take_unreported() else {
            return;
        };
        let now = crate::clock::unix_now_ns();
        let from = self.first_unreported_drop_ns.take().unwrap_or(now);
        for (stream, lost) in [("critical", critical), ("bulk", bulk)] {
            if lost > 0 {
                let seq = self.sequencer.next();
                let gap = gap_event(seq, stream, "queue_full", lost, from, now);
                self.outbox.push_unbounded(gap);
            }
        }
    }

    /// Runs until `events` closes and what is queued is delivered (bounded
    /// by [`DRAIN_TIMEOUT`]).
    pub async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        let mut backoff = Backoff::new(&self.config);
        let mut source_open = true;
        loop {
            match self
                .session(&mut events, &mut backoff, &mut source_open)
                .await
            {
                Ok(SessionEnd::SourceClosed) => return,
                Err(err) => {
                    AgentMetrics::add(&self.metrics.uplink_failures, 1);
                    self.outbox.requeue_in_flight();
                    if !source_open {
                        if self.outbox.pending_len() > 0 {
                            warn!(error = %err, unsent = self.outbox.pending_len(), "stopping with events the collector has not acknowledged");
                        }
                        return;
                    }
                    let delay = backoff.next_delay();
                    warn!(error = %err, retry_in_ms = delay.as_millis() as u64, queued = self.outbox.pending_len(), "collector unreachable; still collecting, will retry");
                    // Keep accepting events while waiting.
                    let until = Instant::now() + delay;
                    while source_open {
                        tokio::select! {
                            _ = sleep_until(until) => break,
                            event = events.recv() => match event {
                                Some(event) => self.push(event),
                                None => source_open = false,
                            },
                        }
                    }
                }
            }
        }
    }

    fn push(&mut self, event: Event) {
        let dropped = self.outbox.push(event);
        if dropped > 0 {
            self.first_unreported_drop_ns
                .get_or_insert_with(crate::clock::unix_now_ns);
            AgentMetrics::add(&self.metrics.events_dropped_queue_full, dropped);
            let total = self.outbox.dropped_total();
            if total.is_power_of_two() {
                warn!(
                    dropped_total = total,
                    "event queue full; oldest events dropped"
                );
            }
        }
    }

    async fn session(
        &mut self,
        events: &mut mpsc::Receiver<Event>,
        backoff: &mut Backoff,
        source_open: &mut bool,
    ) -> Result<SessionEnd, UplinkError> {
        // Each connection presents the certificate current at that moment.
        let tls = self
            .device
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .client_tls()?;
        let (endpoint, connector) = zt_grpc_tls::endpoint(&self.url, tls)?;
        let endpoint = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));

        // Connect while still accepting events.
        let connect = zt_grpc_tls::connect(endpoint, connector);
        tokio::pin!(connect);
        let channel = loop {
            tokio::select! {
                channel = &mut connect => break channel.map_err(UplinkError::Connect)?,
                event = events.recv(), if *source_open => match event {
                    Some(event) => self.push(event),
                    None => *source_open = false,
                },
            }
        };

        let (batches_tx, batches_rx) =
            mpsc::channel::<EventBatch>(self.config.max_in_flight_batches);
        let mut client = TelemetryClient::new(channel);
        let open = client.stream(ReceiverStream::new(batches_rx));
        tokio::pin!(open);
        // The response headers come only once the server has the stream, so
        // send the queue's first batch while opening.
        self.send_ready(&batches_tx, true).await?;
        let mut acks = loop {
            tokio::select! {
                response = &mut open => break response.map_err(UplinkError::Open)?.into_inner(),
                event = events.recv(), if *source_open => match event {
                    Some(event) => self.push(event),
                    None => *source_open = false,
                },
            }
        };
        info!(collector = %self.url, resent = self.outbox.in_flight_batches(), "telemetry stream open");
        backoff.reset();

        let delay = self.config.batch_max_delay();
        let mut flush_at: Option<Instant> =
            (self.outbox.pending_len() > 0).then(|| Instant::now() + delay);
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let due = flush_at.is_some_and(|at| at <= Instant::now()) || !*source_open;
            self.send_ready(&batches_tx, due).await?;
            if due {
                flush_at = (self.outbox.pending_len() > 0).then(|| Instant::now() + delay);
            }
            if !*source_open {
                if self.outbox.pending_len() == 0 && self.outbox.in_flight_batches() == 0 {
                    return Ok(SessionEnd::SourceClosed);
                }
                let deadline =
                    *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN_TIMEOUT);
                if Instant::now() >= deadline {
                    warn!(
                        unsent = self.outbox.pending_len(),
                        unacknowledged = self.outbox.in_flight_batches(),
                        "stopping before the collector acknowledged everything"
                    );
                    return Ok(SessionEnd::SourceClosed);
                }
            }
            let wake_at = match (flush_at, drain_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                event = events.recv(), if *source_open => match event {
                    Some(event) => {
                        self.push(event);
                        flush_at.get_or_insert_with(|| Instant::now() + delay);
                    }
                    None => *source_open = false,
                },
                ack = acks.message() => match ack {
                    Ok(Some(ack)) => {
                        if let Some(n) = self.outbox.ack(ack.batch_seq) {
                            debug!(batch = ack.batch_seq, events = n, "batch acknowledged");
                        }
                        AgentMetrics::add(&self.metrics.events_acked, ack.stored as u64);
                        if ack.rejected > 0 {
                            AgentMetrics::add(&self.metrics.events_rejected, ack.rejected as u64);
                            warn!(batch = ack.batch_seq, rejected = ack.rejected, reason = %ack.reject_reason, "collector rejected events");
                        }
                    }
                    Ok(None) => return Err(UplinkError::Closed),
                    Err(status) => return Err(UplinkError::Stream(status)),
                },
                _ = sleep_until_opt(wake_at) => {}
            }
        }
    }

    /// Sends full batches, and when `flush` also a last partial one, as far
    /// as the in-flight window allows.
    async fn send_ready(
        &mut self,
        tx: &mpsc::Sender<EventBatch>,
        flush: bool,
    ) -> Result<(), UplinkError> {
        // Losses are reported with each flush: at most one gap record per
        // stream per batch delay, however fast events are dropped.
        if flush {
            self.report_drops();
        }
        let max = self.config.batch_max_events;
        while self.outbox.in_flight_batches() < self.config.max_in_flight_batches
            && (self.outbox.pending_len() >= max || (flush && self.outbox.pending_len() > 0))
        {
            let Some((batch_seq, events)) = self.outbox.next_batch(max) else {
                break;
            };
            let batch = EventBatch {
                batch_seq,
                agent: Some(self.identity.clone()),
                events,
            };
            tx.send(batch).await.map_err(|_| UplinkError::Closed)?;
            AgentMetrics::add(&self.metrics.batches_sent, 1);
        }
        Ok(())
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff with full jitter in [delay/2, delay].
struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new(config: &UplinkConfig) -> Self {
        let initial = Duration::from_millis(config.backoff_initial_ms.max(1));
        Self {
            initial,
            max: Duration::from_millis(config.backoff_max_ms.max(config.backoff_initial_ms)),
            current: initial,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rand::thread_rng().gen_range(0.5..=1.0);
        base.mul_f64(jitter)
    }

    fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits for `limit` unless `fut` finishes first.
    async fn bounded<F: std::future::Future>(limit: Duration, fut: F) -> Option<F::Output> {
        tokio::time::timeout(limit, fut).await.ok()
    }

    #[test]
    fn backoff_grows_to_ceiling_and_resets() {
        let config = UplinkConfig {
            backoff_initial_ms: 100,
            backoff_max_ms: 1000,
            ..UplinkConfig::default()
        };
        let mut backoff = Backoff::new(&config);
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(1000)));
        assert!(delays[7] >= Duration::from_millis(500));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    /// The collector is down: the uplink keeps taking events, does not block
    /// its producer, and ends when the source closes.
    #[tokio::test]
    async fn unreachable_collector_never_blocks_the_producer() {
        // A port nothing listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", closed.local_addr().unwrap());
        drop(closed);
        let metrics = Arc::new(AgentMetrics::default());
        let config = UplinkConfig {
            backoff_initial_ms: 10,
            backoff_max_ms: 20,
            buffer_max_events: 100,
            batch_max_events: 10,
            ..UplinkConfig::default()
        };
        let identity = AgentIdentity::default();
        let device = Arc::new(std::sync::RwLock::new(crate::enrollment::test_identity()));
        let uplink = Uplink::new(
            url,
            identity,
            device,
            config,
            metrics.clone(),
            Sequencer::default(),
        );
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(uplink.run(rx));
        for seq in 0..300 {
            let sent = bounded(
                Duration::from_secs(5),
                tx.send(Event {
                    seq,
                    time_unix_ns: 1,
                    ..Default::default()
                }),
            )
            .await;
            assert!(
                matches!(sent, Some(Ok(()))),
                "producer blocked at event {seq}"
            );
        }
        drop(tx);
        bounded(Duration::from_secs(10), task)
            .await
            .expect("uplink stops when its source closes")
            .unwrap();
        assert!(AgentMetrics::get(&metrics.uplink_failures) >= 1);
        assert_eq!(AgentMetrics::get(&metrics.events_dropped_queue_full), 200);
    }
}
