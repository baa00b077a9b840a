//! The batch writers: one task per table that gathers the rows of many
//! ingest requests and writes them to ClickHouse in large INSERTs.
//!
//! [`spawn`] starts the writer of one row type (one table); [`spawn_tables`]
//! starts one for every table ingest writes to, behind [`TableWriters`].
//! Ingest sends a [`WriteRequest`] (rows + a oneshot) through a bounded
//! channel and waits for the oneshot, which completes only once ClickHouse
//! accepted the INSERT holding those rows; only then is the agent's batch
//! acknowledged. The [`Batcher`] decides when to flush (size or age, whichever
//! first). When an INSERT fails with a retriable error, the writer keeps the
//! rows and retries with exponential backoff (100 ms doubling to 5 s) and does
//! not read the channel meanwhile: the channel fills and ingest waits — the
//! full-buffer policy is *block*, never drop. A permanent refusal fails the
//! waiting requests, so agents keep the batches and send them again later.
//! On shutdown the writer drains the channel and flushes what it holds.

pub mod batcher;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{debug, error, warn};

use crate::{
    metrics::Metrics,
    storage::{
        DecisionRow, DnsEventRow, FileEventRow, GapRow, NetworkEventRow, ProcessEventRow, Storage,
        StorageError, TableRow,
    },
};

pub use self::batcher::{BatchLimits, Batcher, Flush};

/// Requests the channel holds before senders wait (per table).
pub const QUEUE_REQUESTS: usize = 256;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why rows were not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("the batch writer has shut down")]
    Closed,
    #[error("clickhouse refused the rows: {0}")]
    Refused(String),
}

/// Rows to store and where to report that they are stored.
#[derive(Debug)]
pub struct WriteRequest<R> {
    pub rows: Vec<R>,
    pub done: oneshot::Sender<Result<(), WriteError>>,
}

/// Where the writer puts rows of type `R`; [`Storage`] in production, fakes
/// in tests.
pub trait RowSink<R>: Send + Sync + 'static {
    fn insert(&self, rows: &[R]) -> impl Future<Output = Result<(), StorageError>> + Send;
}

impl<R: TableRow> RowSink<R> for Storage {
    fn insert(&self, rows: &[R]) -> impl Future<Output = Result<(), StorageError>> + Send {
        Storage::insert(self, rows)
    }
}

/// The sending side of one table's writer, cloned into every ingest stream.
#[derive(Debug)]
pub struct WriterHandle<R> {
    tx: mpsc::Sender<WriteRequest<R>>,
}

impl<R> Clone for WriterHandle<R> {
    fn clone(&self) -> Self {
        WriterHandle {
            tx: self.tx.clone(),
        }
    }
}

impl<R> WriterHandle<R> {
    /// Queues `rows` and waits until ClickHouse has accepted them. Waits
    /// (back-pressure) while the queue is full. No rows: done at once.
    pub async fn write(&self, rows: Vec<R>) -> Result<(), WriteError> {
        if rows.is_empty() {
            return Ok(());
        }
        let (done, stored) = oneshot::channel();
        self.tx
            .send(WriteRequest { rows, done })
            .await
            .map_err(|_| WriteError::Closed)?;
        stored.await.unwrap_or(Err(WriteError::Closed))
    }
}

/// One running writer task.
#[derive(Debug)]
pub struct WriterTask {
    join: JoinHandle<()>,
    close: oneshot::Sender<()>,
}

impl WriterTask {
    /// Stops taking requests, writes everything queued, and waits at most
    /// `grace`. Returns false when rows were left unwritten (ClickHouse still
    /// failing): their requests fail, and agents resend those batches.
    pub async fn shutdown(self, grace: Duration) -> bool {
        let _ = self.close.send(());
        let mut join = self.join;
        match tokio::time::timeout(grace, &mut join).await {
            Ok(_) => true,
            Err(_) => {
                join.abort();
                false
            }
        }
    }
}

/// Starts the writer task of row type `R` (table `R::TABLE`) over `sink`.
pub fn spawn<R, S>(
    sink: S,
    limits: BatchLimits,
    metrics: Arc<Metrics>,
) -> (WriterHandle<R>, WriterTask)
where
    R: TableRow,
    S: RowSink<R>,
{
    let (tx, rx) = mpsc::channel(QUEUE_REQUESTS);
    let (close, close_rx) = oneshot::channel();
    let join = tokio::spawn(run(sink, limits, rx, close_rx, metrics));
    (WriterHandle { tx }, WriterTask { join, close })
}

/// The writers of every table ingest stores into; cheap to clone.
#[derive(Debug, Clone)]
pub struct TableWriters {
    pub process_events: WriterHandle<ProcessEventRow>,
    pub network_events: WriterHandle<NetworkEventRow>,
    pub file_events: WriterHandle<FileEventRow>,
    pub dns_events: WriterHandle<DnsEventRow>,
    pub decisions: WriterHandle<DecisionRow>,
    pub gaps: WriterHandle<GapRow>,
}

/// The tasks behind [`TableWriters`].
#[derive(Debug)]
pub struct TableWriterTasks {
    process_events: WriterTask,
    network_events: WriterTask,
    file_events: WriterTask,
    dns_events: WriterTask,
    decisions: WriterTask,
    gaps: WriterTask,
}

impl TableWriterTasks {
    /// Shuts every writer down at once (see [`WriterTask::shutdown`]); true
    /// when all of them flushed within `grace`.
    pub async fn shutdown(self, grace: Duration) -> bool {
        let (process_events, network_events, file_events, dns_events, decisions, gaps) = tokio::join!(
            self.process_events.shutdown(grace),
            self.network_events.shutdown(grace),
            self.file_events.shutdown(grace),
            self.dns_events.shutdown(grace),
            self.decisions.shutdown(grace),
            self.gaps.shutdown(grace)
        );
        process_events && network_events && file_events && dns_events && decisions && gaps
    }
}

/// Starts one writer per table over `storage`, with the same limits.
pub fn spawn_tables(
    storage: &Storage,
    limits: BatchLimits,
    metrics: Arc<Metrics>,
) -> (TableWriters, TableWriterTasks) {
    let (process_events, process_events_task) = spawn(storage.clone(), limits, metrics.clone());
    let (network_events, network_events_task) = spawn(storage.clone(), limits, metrics.clone());
    let (file_events, file_events_task) = spawn(storage.clone(), limits, metrics.clone());
    let (dns_events, dns_events_task) = spawn(storage.clone(), limits, metrics.clone());
    let (decisions, decisions_task) = spawn(storage.clone(), limits, metrics.clone());
    let (gaps, gaps_task) = spawn(storage.clone(), limits, metrics);
    (
        TableWriters {
            process_events,
            network_events,
            file_events,
            dns_events,
            decisions,
            gaps,
        },
        TableWriterTasks {
            process_events: process_events_task,
            network_events: network_events_task,
            file_events: file_events_task,
            dns_events: dns_events_task,
            decisions: decisions_task,
            gaps: gaps_task,
        },
    )
}

type Done = oneshot::Sender<Result<(), WriteError>>;

async fn run<R: TableRow, S: RowSink<R>>(
    sink: S,
    limits: BatchLimits,
    mut rx: mpsc::Receiver<WriteRequest<R>>,
    mut close: oneshot::Receiver<()>,
    metrics: Arc<Metrics>,
) {
    let mut batcher: Batcher<R, Done> = Batcher::new(limits);
    let mut closing = false;
    loop {
        let deadline = batcher.deadline().map(tokio::time::Instant::from_std);
        tokio::select! {
            request = rx.recv() => match request {
                Some(WriteRequest { rows, done }) => {
                    batcher.push(rows, done, std::time::Instant::now());
                }
                None => {
                    // Closed and drained: write the rest and stop.
                    if !batcher.is_empty() {
                        flush(&sink, batcher.take(), &metrics).await;
                    }
                    debug!(table = R::TABLE, "batch writer stopped");
                    return;
                }
            },
            _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await },
                if deadline.is_some() => {}
            _ = &mut close, if !closing => {
                // Refuse new requests; those already queued are still received.
                closing = true;
                rx.close();
            }
        }
        if batcher.should_flush(std::time::Instant::now()) {
            flush(&sink, batcher.take(), &metrics).await;
        }
    }
}

/// Writes one batch, retrying retriable failures until it succeeds, then
/// completes every waiting request.
async fn flush<R: TableRow, S: RowSink<R>>(sink: &S, batch: Flush<R, Done>, metrics: &Metrics) {
    let Flush { rows, handles } = batch;
    let table = R::TABLE;
    let mut delay = BACKOFF_START;
    let mut attempt: u32 = 1;
    let outcome = loop {
        if rows.is_empty() {
            break Ok(());
        }
        match sink.insert(&rows).await {
            Ok(()) => {
                Metrics::add(&metrics.events_stored, rows.len() as u64);
                debug!(table, rows = rows.len(), attempt, "batch stored");
                break Ok(());
            }
            Err(e) if e.is_retriable() => {
                Metrics::add(&metrics.insert_failures, 1);
                warn!(
                    table,
                    rows = rows.len(),
                    attempt,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %e,
                    "insert failed; keeping the rows and retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF_MAX);
                attempt += 1;
            }
            Err(e) => {
                Metrics::add(&metrics.insert_failures, 1);
                error!(
                    table,
                    rows = rows.len(),
                    requests = handles.len(),
                    error = %e,
                    "insert refused permanently; failing the requests (agents will resend)"
                );
                break Err(WriteError::Refused(e.to_string()));
            }
        }
    };
    for done in handles {
        // The requester may have gone (agent disconnected); nothing to do.
        let _ = done.send(outcome.clone());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Fails the first `failures` inserts with the given error, then stores.
    struct FakeSink<R> {
        failures: Mutex<u32>,
        retriable: bool,
        stored: Arc<Mutex<Vec<Vec<R>>>>,
    }

    impl<R: TableRow + Clone> RowSink<R> for FakeSink<R> {
        fn insert(&self, rows: &[R]) -> impl Future<Output = Result<(), StorageError>> + Send {
            let result = {
                let mut left = self.failures.lock().unwrap();
                if *left > 0 {
                    *left -= 1;
                    let text = if self.retriable {
                        "503 Service Unavailable"
                    } else {
                        "Code: 60. DB::Exception: Table doesn't exist"
                    };
                    Err(StorageError::ClickHouse {
                        what: "insert".to_owned(),
                        error: clickhouse::error::Error::BadResponse(text.to_owned()),
                    })
                } else {
                    self.stored.lock().unwrap().push(rows.to_vec());
                    Ok(())
                }
            };
            std::future::ready(result)
        }
    }

    fn row(seq: u64) -> ProcessEventRow {
        ProcessEventRow {
            org_id: "org".into(),
            time: 1,
            time_ns: 1_000_000_000,
            device_id: "dev".into(),
            hostname: "host".into(),
            boot_id: "boot".into(),
            seq,
            pid: 1,
            tid: 1,
            ppid: 0,
            uid: 0,
            gid: 0,
            cgroup_id: 0,
            filename: "/bin/true".into(),
            argv: vec!["true".into()],
            argv_truncated: 0,
            filename_truncated: 0,
            ppid_unknown: 0,
            agent_version: "t".into(),
            ingested_at: 2,
            event_type: "exec".into(),
            euid: 0,
            egid: 0,
            loginuid: u32::MAX,
            process_start_ns: 0,
            exe: "/bin/true".into(),
            clone_flags: 0,
            exit_status: -1,
            exit_signal: 0,
            core_dumped: 0,
            lifetime_ns: 0,
            ancestor_pids: vec![],
            ancestor_exes: vec![],
            ancestor_argv0: vec![],
            ancestor_start_ns: vec![],
            exe_sha256: String::new(),
            user_name: String::new(),
            previous_uid: 0,
            previous_euid: 0,
            previous_gid: 0,
            previous_egid: 0,
            cred_syscall: String::new(),
            cgroup_path: String::new(),
            container_id: String::new(),
        }
    }

    type Stored<R> = Arc<Mutex<Vec<Vec<R>>>>;

    fn sink<R>(failures: u32, retriable: bool) -> (FakeSink<R>, Stored<R>) {
        let stored = Arc::new(Mutex::new(Vec::new()));
        let sink = FakeSink {
            failures: Mutex::new(failures),
            retriable,
            stored: stored.clone(),
        };
        (sink, stored)
    }

    #[tokio::test(start_paused = true)]
    async fn batches_by_size_and_completes_after_the_insert() {
        let (sink, stored) = sink(0, true);
        let metrics = Metrics::new();
        let limits = BatchLimits {
            max_rows: 3,
            max_delay: Duration::from_secs(3600),
        };
        let (handle, task) = spawn(sink, limits, metrics.clone());
        let a = tokio::spawn({
            let h = handle.clone();
            async move { h.write(vec![row(1), row(2)]).await }
        });
        let b = tokio::spawn({
            let h = handle.clone();
            async move { h.write(vec![row(3)]).await }
        });
        assert_eq!(a.await.unwrap(), Ok(()));
        assert_eq!(b.await.unwrap(), Ok(()));
        assert_eq!(stored.lock().unwrap().len(), 1, "one INSERT for both");
        assert_eq!(metrics.snapshot().events_stored, 3);
        assert!(task.shutdown(Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_by_time() {
        let (sink, stored) = sink(0, true);
        let limits = BatchLimits {
            max_rows: 1000,
            max_delay: Duration::from_millis(200),
        };
        let (handle, task) = spawn(sink, limits, Metrics::new());
        let started = tokio::time::Instant::now();
        handle.write(vec![row(1)]).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(stored.lock().unwrap().len(), 1);
        assert!(task.shutdown(Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_retriable_failures_with_backoff_and_keeps_rows() {
        let (sink, stored) = sink(4, true);
        let metrics = Metrics::new();
        let limits = BatchLimits {
            max_rows: 1,
            max_delay: Duration::from_secs(1),
        };
        let (handle, task) = spawn(sink, limits, metrics.clone());
        let started = tokio::time::Instant::now();
        handle.write(vec![row(1), row(2)]).await.unwrap();
        // 100 + 200 + 400 + 800 ms of backoff before the fifth attempt.
        assert!(started.elapsed() >= Duration::from_millis(1500));
        assert_eq!(metrics.snapshot().insert_failures, 4);
        assert_eq!(metrics.snapshot().events_stored, 2);
        assert_eq!(stored.lock().unwrap()[0].len(), 2);
        assert!(task.shutdown(Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_fail_the_requests() {
        let (sink, stored) = sink(1, false);
        let metrics = Metrics::new();
        let limits = BatchLimits {
            max_rows: 1,
            max_delay: Duration::from_secs(1),
        };
        let (handle, task) = spawn(sink, limits, metrics.clone());
        let err = handle.write(vec![row(1)]).await.unwrap_err();
        assert!(matches!(err, WriteError::Refused(_)), "{err}");
        assert_eq!(metrics.snapshot().insert_failures, 1);
        // The writer carries on with the next request.
        handle.write(vec![row(2)]).await.unwrap();
        assert_eq!(stored.lock().unwrap().len(), 1);
        assert!(task.shutdown(Duration::from_secs(1)).await);
    }

    fn gap(seq: u64) -> GapRow {
        GapRow {
            org_id: "org".into(),
            time: 1,
            time_ns: 1_000_000_000,
            device_id: "dev".into(),
            hostname: "host".into(),
            boot_id: "boot".into(),
            seq,
            stream: "critical".into(),
            reason: "ring_full".into(),
            lost: 3,
            from_ns: 1,
            to_ns: 1_000_000_000,
            agent_version: "t".into(),
            ingested_at: 2,
        }
    }

    /// One table's outage holds only that table's writer: the other stores.
    #[tokio::test(start_paused = true)]
    async fn each_table_has_its_own_writer() {
        let (events_sink, events_stored) = sink::<ProcessEventRow>(u32::MAX, true);
        let (gaps_sink, gaps_stored) = sink::<GapRow>(0, true);
        let metrics = Metrics::new();
        let limits = BatchLimits {
            max_rows: 1,
            max_delay: Duration::from_secs(1),
        };
        let (events, events_task) = spawn(events_sink, limits, metrics.clone());
        let (gaps, gaps_task) = spawn(gaps_sink, limits, metrics.clone());
        let blocked = tokio::spawn(async move { events.write(vec![row(1)]).await });
        gaps.write(vec![gap(2), gap(3)]).await.unwrap();
        assert_eq!(gaps_stored.lock().unwrap()[0].len(), 2);
        assert_eq!(metrics.snapshot().events_stored, 2);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!blocked.is_finished(), "acked without being stored");
        assert!(events_stored.lock().unwrap().is_empty());
        assert!(metrics.snapshot().insert_failures >= 3);
        assert!(gaps_task.shutdown(Duration::from_secs(1)).await);
        assert!(!events_task.shutdown(Duration::from_secs(1)).await);
        assert_eq!(blocked.await.unwrap(), Err(WriteError::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_flushes_pending_rows() {
        let (sink, stored) = sink(0, true);
        let limits = BatchLimits {
            max_rows: 1000,
            max_delay: Duration::from_secs(3600),
        };
        let (handle, task) = spawn(sink, limits, Metrics::new());
        let pending = tokio::spawn(async move { handle.write(vec![row(1)]).await });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(task.shutdown(Duration::from_secs(5)).await);
        assert_eq!(pending.await.unwrap(), Ok(()));
        assert_eq!(stored.lock().unwrap().len(), 1);
    }
}
