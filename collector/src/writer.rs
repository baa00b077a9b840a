//! The batch writer: one task that gathers the rows of many ingest requests
//! and writes them to ClickHouse in large INSERTs.
//!
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
    storage::{ProcessEventRow, Storage, StorageError},
};

pub use self::batcher::{BatchLimits, Batcher, Flush};

/// Requests the channel holds before senders wait.
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
pub struct WriteRequest {
    pub rows: Vec<ProcessEventRow>,
    pub done: oneshot::Sender<Result<(), WriteError>>,
}

/// Where the writer puts rows; [`Storage`] in production, fakes in tests.
pub trait RowSink: Send + Sync + 'static {
    fn insert(
        &self,
        rows: &[ProcessEventRow],
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
}

impl RowSink for Storage {
    fn insert(
        &self,
        rows: &[ProcessEventRow],
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.insert_process_events(rows)
    }
}

/// The sending side, cloned into every ingest stream.
#[derive(Debug, Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<WriteRequest>,
}

impl WriterHandle {
    /// Queues `rows` and waits until ClickHouse has accepted them. Waits
    /// (back-pressure) while the queue is full.
    pub async fn write(&self, rows: Vec<ProcessEventRow>) -> Result<(), WriteError> {
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

/// The running writer task.
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

/// Starts the writer task over `sink`.
pub fn spawn<S: RowSink>(
    sink: S,
    limits: BatchLimits,
    metrics: Arc<Metrics>,
) -> (WriterHandle, WriterTask) {
    let (tx, rx) = mpsc::channel(QUEUE_REQUESTS);
    let (close, close_rx) = oneshot::channel();
    let join = tokio::spawn(run(sink, limits, rx, close_rx, metrics));
    (WriterHandle { tx }, WriterTask { join, close })
}

type Done = oneshot::Sender<Result<(), WriteError>>;

async fn run<S: RowSink>(
    sink: S,
    limits: BatchLimits,
    mut rx: mpsc::Receiver<WriteRequest>,
    mut close: oneshot::Receiver<()>,
    metrics: Arc<Metrics>,
) {
    let mut batcher: Batcher<ProcessEventRow, Done> = Batcher::new(limits);
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
                    debug!("batch writer stopped");
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
async fn flush<S: RowSink>(sink: &S, batch: Flush<ProcessEventRow, Done>, metrics: &Metrics) {
    let Flush { rows, handles } = batch;
    let mut delay = BACKOFF_START;
    let mut attempt: u32 = 1;
    let outcome = loop {
        if rows.is_empty() {
            break Ok(());
        }
        match sink.insert(&rows).await {
            Ok(()) => {
                Metrics::add(&metrics.events_stored, rows.len() as u64);
                debug!(rows = rows.len(), attempt, "batch stored");
                break Ok(());
            }
            Err(e) if e.is_retriable() => {
                Metrics::add(&metrics.insert_failures, 1);
                warn!(
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
    struct FakeSink {
        failures: Mutex<u32>,
        retriable: bool,
        stored: Arc<Mutex<Vec<Vec<ProcessEventRow>>>>,
    }

    impl RowSink for FakeSink {
        fn insert(
            &self,
            rows: &[ProcessEventRow],
        ) -> impl Future<Output = Result<(), StorageError>> + Send {
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
        }
    }

    fn sink(failures: u32, retriable: bool) -> (FakeSink, Arc<Mutex<Vec<Vec<ProcessEventRow>>>>) {
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
