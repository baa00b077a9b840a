//! The `main` of the end-to-end bench programs (`tests/benches/*`, harness
//! off): run only under `cargo bench`, keep the stack's files out of the
//! agents' watched `/tmp/`, bound the whole run, and turn the outcome into an
//! exit status with the error named.

use std::{future::Future, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{anyhow, Context as _, Result};

/// Runs `run` for bench `name`, giving up after `limit`.
pub fn main<F, Fut>(name: &str, limit: Duration, run: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    if !std::env::args().skip(1).any(|a| a == "--bench") {
        println!("{name}: skipped (not run by `cargo test`; run `cargo build --release --bins && cargo bench -p zt-e2e --bench {name}`)");
        return ExitCode::SUCCESS;
    }
    // Before any thread exists: the stack's files (ClickHouse's parts, the
    // logs, copies of programs) stay out of /tmp/, which every agent
    // watches for writes.
    let scratch = match scratch_dir(name) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    std::env::set_var("TMPDIR", &scratch);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        tokio::time::timeout(limit, run())
            .await
            .unwrap_or_else(|_| Err(anyhow!("gave up after {limit:?}")))
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    let _ = std::fs::remove_dir(&scratch);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `target/<name>-tmp`, next to the profile directories.
fn scratch_dir(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<bench>
    let target = exe
        .ancestors()
        .nth(3)
        .context("bench executable is not under target/<profile>/deps")?;
    let dir = target.join(format!("{}-tmp", name.replace('_', "-")));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A number from the environment, or `default` when unset.
pub fn env_number<T>(name: &str, default: T) -> Result<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .map_err(|e| anyhow!("{name}={value:?} is not a number: {e}")),
        Err(_) => Ok(default),
    }
}

/// `machine: <cores> cores, Linux <release>`, for reports.
pub fn machine_line() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("machine: {cores} cores, Linux {}", kernel.trim())
}

/// The open-file limits before and after [`raise_nofile`].
pub struct NoFile {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

impl NoFile {
    pub fn describe(&self) -> String {
        if self.soft_before == self.soft {
            format!("soft {} = hard {} (not raised)", self.soft, self.hard)
        } else {
            format!(
                "soft raised {} → {} (hard {})",
                self.soft_before, self.soft, self.hard
            )
        }
    }
}

/// Raises the soft open-file limit to the hard one (benches that hold
/// thousands of connections).
pub fn raise_nofile() -> NoFile {
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return NoFile {
                soft_before: 0,
                soft: 0,
                hard: 0,
            };
        }
        let soft_before = limit.rlim_cur;
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
        NoFile {
            soft_before,
            soft: limit.rlim_cur,
            hard: limit.rlim_max,
        }
    }
}

/// The `p`th percentile (nearest rank) of durations sorted ascending; zero
/// for none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Nanoseconds since the Unix epoch of `t`.
pub fn unix_ns(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Drops a bench's database (best effort, on the way out).
pub async fn drop_database(clickhouse: &crate::clickhouse::ClickHouseServer, database: &str) {
    let _ = clickhouse
        .client()
        .query(&format!("DROP DATABASE IF EXISTS {database}"))
        .execute()
        .await;
}

/// Enrolls `agent_binary` with the collector at `collector_addr` whose
/// control-plane state is `collector_state` (device `latency-agent` of
/// `org`, agent state in `dir`) and starts it, its uplink batch delay set
/// when given; returns once its sensors are active.
pub async fn start_enrolled_agent(
    collector_state: &std::path::Path,
    collector_addr: std::net::SocketAddr,
    org: &str,
    agent_binary: &std::path::Path,
    agent_delay_ms: Option<u64>,
    dir: &std::path::Path,
) -> Result<crate::process::Process> {
    let agent_state = dir.join("agent-state");
    let token = crate::pki::create_token(
        &crate::process::workspace_binary("zt-collector")?,
        collector_state,
        org,
        "latency-agent",
    )?;
    crate::pki::enroll(
        agent_binary,
        &agent_state,
        &format!("https://{collector_addr}"),
        &token,
    )?;
    let mut envs = Vec::new();
    if let Some(ms) = agent_delay_ms {
        envs.push(("ZT_AGENT_UPLINK__BATCH_MAX_DELAY_MS", ms.to_string()));
    }
    let mut agent = crate::process::Process::spawn(
        "agent",
        agent_binary,
        ["--state-dir", &agent_state.display().to_string()],
        &envs,
        dir,
    )?;
    agent
        .wait_for_log("sensor active", Duration::from_secs(30))
        .await?;
    Ok(agent)
}

/// Batches a simulated agent keeps unacknowledged: the agent's
/// `uplink.max_in_flight_batches` default.
pub const WINDOW_BATCHES: usize = 16;

/// How long a simulated agent waits for one acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// What one simulated agent's stream achieved.
pub struct StreamOutcome {
    /// Events the collector acknowledged as stored.
    pub events_acked: u64,
    pub last_ack: std::time::Instant,
    /// Every acknowledged batch, in the order of the acknowledgements: its
    /// `batch_seq` and the time from sending it to its acknowledgement.
    pub acks: Vec<(u64, Duration)>,
}

/// One simulated agent's telemetry stream over `channel`: waits at
/// `start`, keeps up to [`WINDOW_BATCHES`] batches unacknowledged (the
/// first window goes out while the stream opens, as the agent does), stops
/// sending once `budget` has passed, and returns once every batch it sent
/// is acknowledged. A rejected event or an acknowledgement of a batch it
/// did not send is an error.
pub async fn stream_batches(
    channel: tonic::transport::Channel,
    batches: Vec<proto::telemetry::EventBatch>,
    start: std::sync::Arc<tokio::sync::Barrier>,
    budget: Duration,
) -> Result<StreamOutcome> {
    use std::{collections::HashMap, time::Instant};
    let mut client = proto::telemetry::telemetry_client::TelemetryClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(WINDOW_BATCHES);
    let mut batches = batches.into_iter();
    let mut sent_at: HashMap<u64, Instant> = HashMap::new();
    start.wait().await;
    let started = Instant::now();
    for batch in batches.by_ref().take(WINDOW_BATCHES) {
        sent_at.insert(batch.batch_seq, Instant::now());
        tx.send(batch).await.context("stream closed")?;
    }
    let mut acks = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("opening the telemetry stream")?
        .into_inner();
    let mut outcome = StreamOutcome {
        events_acked: 0,
        last_ack: started,
        acks: Vec::new(),
    };
    while !sent_at.is_empty() {
        let ack = tokio::time::timeout(ACK_TIMEOUT, acks.message())
            .await
            .context("no acknowledgement within a minute")?
            .context("telemetry stream failed")?
            .context("telemetry stream ended early")?;
        let now = Instant::now();
        let sent = sent_at
            .remove(&ack.batch_seq)
            .with_context(|| format!("acknowledgement of unknown batch {}", ack.batch_seq))?;
        anyhow::ensure!(
            ack.rejected == 0,
            "collector rejected events: {}",
            ack.reject_reason
        );
        outcome.events_acked += u64::from(ack.stored);
        outcome.last_ack = now;
        outcome.acks.push((ack.batch_seq, now - sent));
        if started.elapsed() < budget {
            if let Some(batch) = batches.next() {
                sent_at.insert(batch.batch_seq, Instant::now());
                tx.send(batch).await.context("stream closed")?;
            }
        }
    }
    Ok(outcome)
}
