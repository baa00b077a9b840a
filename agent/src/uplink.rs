//! Streams events to the collector over gRPC (`Telemetry.Stream`) in
//! batches, keeps every batch until the collector acknowledges it, and
//! reconnects with exponential backoff and jitter when the collector is
//! unreachable — the agent itself keeps running and keeps collecting.

use std::{sync::Arc, time::Duration};

use proto::telemetry::{AgentIdentity, BatchAck, Event};
use rand::Rng;
use tokio::{
    sync::mpsc,
    time::{sleep_until, Instant},
};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::{
    config::UplinkConfig,
    encoded::EncodedBatch,
    enrollment::SharedIdentity,
    metrics::AgentMetrics,
    outbox::{Outbox, Queue},
    sensors::{gap_event, Sequencer},
    spool::{RunId, Spool, SpoolLimits},
};

/// How long a stopping agent waits for the collector to acknowledge what it
/// still holds.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds of the spool's cache of record bytes, per class: four batches.
/// Beyond it a burst is read back from disk (the page cache), at 0.12 µs
/// per event.
const SPOOL_CACHE_EVENTS: usize = 2_048;
const SPOOL_CACHE_BYTES: usize = 1 << 20;
/// Events taken from the sensors' channel per turn of the session loop.
const PUSH_AT_ONCE: usize = 1_024;
/// Spool writes and fsyncs slower than this are logged.
const SLOW_SPOOL_IO: Duration = Duration::from_millis(500);

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
    outbox: Queue,
    sequencer: Sequencer,
    /// When the oldest drop not yet reported happened (Unix ns).
    first_unreported_drop_ns: Option<u64>,
    /// How often the spool is flushed and fsynced (`None`: no spool).
    fsync_interval: Option<Duration>,
    /// The next spool flush.
    sync_at: Instant,
    /// The fsync running off the runtime, if any.
    syncing: Option<tokio::task::JoinHandle<()>>,
}

/// Opens the disk spool for an agent run with `identity`; `None` (memory
/// only, logged loudly) when it is disabled or cannot be opened: a broken
/// disk must not stop the agent from collecting.
pub fn open_spool(
    config: &crate::config::SpoolConfig,
    state_dir: &std::path::Path,
    uplink: &UplinkConfig,
    identity: &AgentIdentity,
) -> Option<Spool> {
    if !config.enabled {
        info!("spool disabled; events wait in memory only");
        return None;
    }
    let limits = SpoolLimits {
        dir: config.dir(state_dir),
        max_bytes: config.max_bytes,
        segment_bytes: config.segment_bytes,
        // The cache of record bytes only spares a connected agent reading back
        // what it wrote: a few batches per class. During an outage the rest
        // waits on disk only, so memory no longer grows with the outage.
        cache_events: (uplink.buffer_max_events / 2)
            .min(SPOOL_CACHE_EVENTS)
            .max(uplink.batch_max_events),
        cache_bytes: (uplink.buffer_max_bytes / 2).min(SPOOL_CACHE_BYTES),
        fsync_interval: config.fsync_interval(),
    };
    let run = RunId {
        boot_id: identity.boot_id.clone(),
        agent_version: identity.agent_version.clone(),
    };
    let dir = limits.dir.clone();
    match Spool::open(limits, run) {
        Ok(spool) => {
            info!(dir = %dir.display(), max_bytes = config.max_bytes, fsync_interval_ms = config.fsync_interval_ms, "spool open");
            Some(spool)
        }
        Err(err) => {
            tracing::error!(dir = %dir.display(), error = %err, "CANNOT OPEN THE SPOOL: events wait in memory only");
            None
        }
    }
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
        spool: Option<Spool>,
    ) -> Self {
        let memory = Outbox::with_limits(config.buffer_max_events, config.buffer_max_bytes);
        let fsync_interval = spool.as_ref().map(|s| s.limits().fsync_interval);
        let outbox = Queue::new(memory, spool);
        let uplink = Self {
            url,
            identity,
            device,
            config,
            metrics,
            outbox,
            sequencer,
            first_unreported_drop_ns: None,
            fsync_interval,
            sync_at: Instant::now(),
            syncing: None,
        };
        uplink.update_gauges();
        uplink
    }

    /// Turns the queue's losses since the last report into gap records
    /// (`reason` `queue_full`, `spool_full` or `spool_corrupt`, per
    /// stream). They go into the spool like other critical events (exempt
    /// from its bound), or ahead of the memory queue. Losses of a previous
    /// run's spooled events are reported by this run (its boot id and seq).
    fn report_drops(&mut self) {
        let Some(losses) = self.outbox.take_losses() else {
            return;
        };
        let now = crate::clock::unix_now_ns();
        let from = self.first_unreported_drop_ns.take().unwrap_or(now);
        AgentMetrics::add(
            &self.metrics.spool_corrupt,
            losses.spool_corrupt.iter().sum(),
        );
        for (reason, lost) in [
            ("queue_full", losses.queue_full),
            ("spool_full", losses.spool_full),
            ("spool_corrupt", losses.spool_corrupt),
        ] {
            for (stream, lost) in [("critical", lost[0]), ("bulk", lost[1])] {
                if lost > 0 {
                    let seq = self.sequencer.next();
                    let gap = gap_event(seq, stream, reason, lost, from, now);
                    self.outbox.push_report(gap);
                }
            }
        }
    }

    fn update_gauges(&self) {
        let (events, bytes) = self.outbox.spool_depth();
        self.metrics
            .spool_events
            .store(events, std::sync::atomic::Ordering::Relaxed);
        self.metrics
            .spool_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// When the spool is flushed next (far away without a spool).
    fn next_sync(&self) -> Instant {
        match self.fsync_interval {
            Some(_) => self.sync_at,
            None => Instant::now() + Duration::from_secs(3600),
        }
    }

    /// Writes what the spool buffered and fsyncs it off the runtime; at
    /// most one fsync runs at a time.
    fn sync_spool(&mut self) {
        let Some(interval) = self.fsync_interval else {
            return;
        };
        self.sync_at = Instant::now() + interval;
        self.update_gauges();
        if self.syncing.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let started = std::time::Instant::now();
        let flushed = self.outbox.flush();
        if started.elapsed() > SLOW_SPOOL_IO {
            warn!(
                took_ms = started.elapsed().as_millis() as u64,
                "spool write slow"
            );
        }
        match flushed {
            Ok(job) if !job.is_empty() => {
                let metrics = self.metrics.clone();
                self.syncing = Some(tokio::task::spawn_blocking(move || {
                    let started = std::time::Instant::now();
                    if let Err(err) = job.run() {
                        AgentMetrics::add(&metrics.spool_write_errors, 1);
                        tracing::error!(error = %err, "spool fsync failed");
                    }
                    if started.elapsed() > SLOW_SPOOL_IO {
                        warn!(
                            took_ms = started.elapsed().as_millis() as u64,
                            "spool fsync slow"
                        );
                    }
                }));
            }
            Ok(_) => {}
            Err(err) => {
                AgentMetrics::add(&self.metrics.spool_write_errors, 1);
                tracing::error!(error = %err, unwritten_kept_in_memory = true, "SPOOL WRITE FAILED; will retry");
            }
        }
    }

    /// A clean stop: the spool written, synced and its positions saved, so
    /// the next run replays exactly what was not acknowledged.
    async fn close_spool(&mut self) {
        if let Some(syncing) = self.syncing.take() {
            let _ = syncing.await;
        }
        if !self.outbox.has_spool() {
            return;
        }
        // What this run still owes becomes a gap record in the spool too.
        self.report_drops();
        match self.outbox.close() {
            Ok(()) => {
                let (events, bytes) = self.outbox.spool_depth();
                let [critical, bulk] = self.outbox.spool_dropped();
                info!(
                    events,
                    bytes,
                    dropped_spool_full = bulk,
                    dropped_spool_full_critical = critical,
                    "spool closed"
                );
            }
            Err(err) => {
                AgentMetrics::add(&self.metrics.spool_write_errors, 1);
                tracing::error!(error = %err, "SPOOL COULD NOT BE WRITTEN AT STOP");
            }
        }
        self.update_gauges();
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
                Ok(SessionEnd::SourceClosed) => {
                    self.outbox.requeue_in_flight();
                    self.close_spool().await;
                    return;
                }
                Err(err) => {
                    AgentMetrics::add(&self.metrics.uplink_failures, 1);
                    self.outbox.requeue_in_flight();
                    if !source_open {
                        if self.outbox.pending_len() > 0 {
                            warn!(error = %err, unsent = self.outbox.pending_len(), spooled = self.outbox.has_spool(), "stopping with events the collector has not acknowledged");
                        }
                        self.close_spool().await;
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
                                Some(event) => self.push_available(event, &mut events),
                                None => source_open = false,
                            },
                            _ = sleep_until(self.next_sync()) => self.sync_spool(),
                        }
                    }
                }
            }
        }
    }

    /// Queues `first` and what else the sensors have already handed over
    /// (up to [`PUSH_AT_ONCE`]): a burst costs one turn of the session
    /// loop (its timers and the acknowledgement poll), not one per event.
    fn push_available(&mut self, first: Event, events: &mut mpsc::Receiver<Event>) {
        self.push(first);
        for _ in 1..PUSH_AT_ONCE {
            match events.try_recv() {
                Ok(event) => self.push(event),
                Err(_) => break,
            }
        }
    }

    fn push(&mut self, event: Event) {
        let errors = self.outbox.spool_errors();
        let (dropped, by_spool) = self.outbox.push(event);
        if self.outbox.spool_errors() > errors {
            AgentMetrics::add(&self.metrics.spool_write_errors, 1);
        }
        if dropped > 0 && by_spool {
            self.first_unreported_drop_ns
                .get_or_insert_with(crate::clock::unix_now_ns);
            AgentMetrics::add(&self.metrics.events_dropped_spool_full, dropped);
            let total = AgentMetrics::get(&self.metrics.events_dropped_spool_full);
            if total.is_power_of_two() || dropped > 1 {
                warn!(
                    dropped,
                    dropped_total = total,
                    "spool full; oldest bulk events dropped"
                );
            }
        } else if dropped > 0 {
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
                    Some(event) => self.push_available(event, events),
                    None => *source_open = false,
                },
                _ = sleep_until(self.next_sync()) => self.sync_spool(),
            }
        };

        let (batches_tx, batches_rx) =
            mpsc::channel::<EncodedBatch>(self.config.max_in_flight_batches);
        let open = open_stream(channel, ReceiverStream::new(batches_rx));
        tokio::pin!(open);
        // The response headers come only once the server has the stream, so
        // send the queue's first batch while opening.
        self.send_ready(&batches_tx, true).await?;
        let mut acks = loop {
            tokio::select! {
                response = &mut open => break response.map_err(UplinkError::Open)?.into_inner(),
                event = events.recv(), if *source_open => match event {
                    Some(event) => self.push_available(event, events),
                    None => *source_open = false,
                },
                _ = sleep_until(self.next_sync()) => self.sync_spool(),
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
                        self.push_available(event, events);
                        flush_at.get_or_insert_with(|| Instant::now() + delay);
                    }
                    None => *source_open = false,
                },
                ack = acks.message() => match ack {
                    Ok(Some(ack)) => {
                        if self.outbox.ack(ack.batch_seq) {
                            debug!(batch = ack.batch_seq, events = ack.stored, "batch acknowledged");
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
                _ = sleep_until(self.next_sync()) => self.sync_spool(),
            }
        }
    }

    /// Sends full batches, and when `flush` also a last partial one, as far
    /// as the in-flight window allows.
    async fn send_ready(
        &mut self,
        tx: &mpsc::Sender<EncodedBatch>,
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
            let Some(batch) = self.outbox.next_batch(max) else {
                break;
            };
            // Events of a previous run (replayed from the spool) go under
            // that run's boot id and version.
            let mut agent = self.identity.clone();
            if let Some(run) = &batch.run {
                if run.boot_id != agent.boot_id {
                    agent.boot_id.clone_from(&run.boot_id);
                    agent.agent_version.clone_from(&run.agent_version);
                }
            }
            let batch = EncodedBatch {
                batch_seq: batch.seq,
                agent: Some(agent),
                events: batch.events,
            };
            debug!(
                batch = batch.batch_seq,
                events = batch.events.len(),
                "batch sent"
            );
            tx.send(batch).await.map_err(|_| UplinkError::Closed)?;
            AgentMetrics::add(&self.metrics.batches_sent, 1);
        }
        Ok(())
    }
}

/// `Telemetry.Stream` with batches whose events are already encoded (the
/// generated client takes `EventBatch`, which would mean decoding them):
/// the same call, path and protobuf codec, the same bytes on the wire.
async fn open_stream(
    channel: tonic::transport::Channel,
    batches: ReceiverStream<EncodedBatch>,
) -> Result<tonic::Response<tonic::Streaming<BatchAck>>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(format!("telemetry channel not ready: {e}")))?;
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/zt.telemetry.v1.Telemetry/Stream");
    let codec = tonic::codec::ProstCodec::<EncodedBatch, BatchAck>::default();
    grpc.streaming(tonic::Request::new(batches), path, codec)
        .await
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
            None,
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
