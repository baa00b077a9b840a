//! End-to-end ingest benchmarks against a private ClickHouse. Not part of
//! `make test`; run with
//!
//! ```text
//! cargo build --release --bins          # the latency part runs target/release/zt-agent
//! cargo bench -p zt-e2e --bench e2e_ingest [-- throughput|latency]
//! ```
//!
//! - **throughput**: K simulated agents (K = 1, 8, 32) open one telemetry
//!   stream each to an in-process collector and send realistic exec events in
//!   512-event batches, at most 16 batches unacknowledged per agent (the
//!   agent's defaults). Events/s is measured from the first send to the last
//!   acknowledgement; the collector acknowledges a batch only once ClickHouse
//!   stored it. Afterwards the rows in ClickHouse are counted and must equal
//!   the events acknowledged. Each run stops sending after its event count
//!   or its time budget, whichever comes first, and is run with the
//!   collector's default flush delay (1 s) and a short one.
//! - **latency**: the real `zt-agent` (root, eBPF) and an in-process
//!   collector; `/bin/true <marker-i>` is executed 200 times, 10 ms apart, in
//!   a cgroup made for the run, while ClickHouse is polled every 10 ms; the
//!   latency of an exec is the time from just before its `fork` to the
//!   first poll that saw its row. Run with the default batch delays and with
//!   short ones.
//!
//! Knobs (environment): `ZT_BENCH_EVENTS` (events per throughput run,
//! default 200000), `ZT_BENCH_SECONDS` (time budget of a throughput run,
//! default 30), `ZT_BENCH_EXECS` (execs per latency run, default 200).
//!
//! Everything is bounded: each step has a timeout and the whole program
//! gives up after 20 minutes. ClickHouse, the agent and the cgroup are
//! removed on exit, also on failure.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::{Command, ExitCode, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, ensure, Context as _, Result};
use proto::telemetry::{event::Kind, AgentIdentity, Event, EventBatch, ProcessExec};
use tokio::sync::Barrier;
use zt_collector::{
    config::{BatchConfig, ClickHouseConfig, IdentityConfig},
    CollectorConfig, RunningCollector,
};
use zt_e2e::bench::WINDOW_BATCHES;
use zt_e2e::{
    bench::{drop_database, percentile, unix_ns},
    cgroup::TestCgroup,
    clickhouse::{fresh_database_name, ClickHouseServer},
    process::workspace_binary,
};

/// Events per batch: the agent's `uplink.batch_max_events` default (the
/// window of unacknowledged batches is [`WINDOW_BATCHES`]).
const BATCH_EVENTS: usize = 512;
const AGENT_COUNTS: [usize; 3] = [1, 8, 32];
/// The collector's default `batch.max_delay_ms`, and the short one.
const COLLECTOR_DELAYS_MS: [u64; 2] = [1_000, 20];
/// (agent `uplink.batch_max_delay_ms`, collector `batch.max_delay_ms`);
/// `None` keeps the component's default (250 ms and 1000 ms).
const LATENCY_DELAYS_MS: [(Option<u64>, Option<u64>); 5] = [
    (None, None),
    (None, Some(10)),
    (Some(50), Some(50)),
    (Some(10), Some(10)),
    (Some(100), Some(10)),
];
const EXEC_SPACING: Duration = Duration::from_millis(10);
const POLL_EVERY: Duration = Duration::from_millis(10);
/// How long after the last exec the latency run waits for missing rows.
const LATENCY_GRACE: Duration = Duration::from_secs(30);
const WHOLE_RUN_LIMIT: Duration = Duration::from_secs(20 * 60);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: there
    // this program only says how to run it.
    if !args.iter().any(|a| a == "--bench") {
        println!("e2e_ingest: skipped (not run by `cargo test`; run `cargo bench -p zt-e2e --bench e2e_ingest`)");
        return ExitCode::SUCCESS;
    }
    let filter = args.iter().find(|a| !a.starts_with('-')).cloned();
    if let Some(f) = filter.as_deref() {
        if f != "throughput" && f != "latency" {
            eprintln!("e2e_ingest: unknown part {f:?}; use `throughput` or `latency`");
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("e2e_ingest: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        tokio::time::timeout(WHOLE_RUN_LIMIT, run(filter.as_deref()))
            .await
            .unwrap_or_else(|_| bail!("gave up after {WHOLE_RUN_LIMIT:?}"))
    });
    // Streams and the writer of a failed run may still hold tasks.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("e2e_ingest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(filter: Option<&str>) -> Result<()> {
    let clickhouse = ClickHouseServer::start().await?;
    println!("# e2e_ingest\n");
    println!("{}\n", zt_e2e::bench::machine_line());
    if filter.is_none_or(|f| f == "throughput") {
        let events = zt_e2e::bench::env_number("ZT_BENCH_EVENTS", 200_000)?;
        let budget = Duration::from_secs(zt_e2e::bench::env_number("ZT_BENCH_SECONDS", 30)? as u64);
        let mut results = Vec::new();
        for delay_ms in COLLECTOR_DELAYS_MS {
            for agents in AGENT_COUNTS {
                let result = throughput(&clickhouse, agents, events, budget, delay_ms)
                    .await
                    .with_context(|| {
                        format!("throughput run with {agents} agents, delay {delay_ms} ms")
                    })?;
                eprintln!("{result:?}");
                results.push(result);
            }
        }
        print_throughput(&results, events, budget);
    }
    if filter.is_none_or(|f| f == "latency") {
        let execs = zt_e2e::bench::env_number("ZT_BENCH_EXECS", 200)?;
        let agent = workspace_binary("zt-agent")
            .context("the latency part runs the release agent: `cargo build --release --bins`")?;
        // SAFETY: no arguments, cannot fail.
        ensure!(
            unsafe { libc::geteuid() } == 0,
            "the latency part loads eBPF programs and needs root"
        );
        let mut results = Vec::new();
        for (agent_delay, collector_delay) in LATENCY_DELAYS_MS {
            let result = latency(&clickhouse, &agent, execs, agent_delay, collector_delay)
                .await
                .with_context(|| {
                    format!("latency run with delays {agent_delay:?}/{collector_delay:?} ms")
                })?;
            eprintln!("{result:?}");
            results.push(result);
        }
        print_latency(&results, execs);
    }
    Ok(())
}

// ---------------------------------------------------------------- throughput

#[derive(Debug)]
struct ThroughputResult {
    agents: usize,
    collector_delay_ms: u64,
    events_acked: u64,
    elapsed: Duration,
    rows_in_clickhouse: u64,
    /// Median time from sending a batch to its acknowledgement.
    ack_p50: Duration,
}

impl ThroughputResult {
    fn events_per_s(&self) -> f64 {
        self.events_acked as f64 / self.elapsed.as_secs_f64()
    }
}

async fn start_collector(
    clickhouse: &ClickHouseServer,
    database: &str,
    max_delay_ms: Option<u64>,
) -> Result<RunningCollector> {
    let config = CollectorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        clickhouse: ClickHouseConfig {
            url: clickhouse.http_url(),
            database: database.to_owned(),
            startup_timeout_secs: 10,
            ..Default::default()
        },
        batch: BatchConfig {
            max_delay_ms: max_delay_ms.unwrap_or(BatchConfig::default().max_delay_ms),
            ..Default::default()
        },
        identity: IdentityConfig {
            state_dir: tempfile::Builder::new()
                .prefix("zt-bench-collector-")
                .tempdir()?
                .keep(),
            ..Default::default()
        },
        ..Default::default()
    };
    Ok(zt_collector::start(config).await?)
}

async fn throughput(
    clickhouse: &ClickHouseServer,
    agents: usize,
    events: usize,
    budget: Duration,
    collector_delay_ms: u64,
) -> Result<ThroughputResult> {
    let database = fresh_database_name("bench_throughput");
    let collector = start_collector(clickhouse, &database, Some(collector_delay_ms)).await?;
    let url = format!("https://{}", collector.local_addr());

    // Every agent's batches are made before the clock starts.
    let per_agent = events.div_ceil(agents);
    let barrier = Arc::new(Barrier::new(agents + 1));
    let mut tasks = Vec::new();
    for a in 0..agents {
        let batches = agent_batches(a, per_agent);
        let barrier = barrier.clone();
        // Each simulated agent is a device of its own, with a certificate
        // from the collector's CA.
        let tls = zt_e2e::pki::device_tls(
            collector.state_dir(),
            &format!("bench-org-{}", a % 4),
            &format!("bench-device-{a:05}"),
        )?;
        let channel = zt_grpc_tls::channel(&url, tls).await?;
        tasks.push(tokio::spawn(zt_e2e::bench::stream_batches(
            channel, batches, barrier, budget,
        )));
    }
    barrier.wait().await;
    let started = Instant::now();
    let mut acked = 0u64;
    let mut last_ack = started;
    let mut ack_times = Vec::new();
    for task in tasks {
        let outcome = task.await.context("agent task panicked")??;
        acked += outcome.events_acked;
        last_ack = last_ack.max(outcome.last_ack);
        ack_times.extend(outcome.acks.into_iter().map(|(_, latency)| latency));
    }
    let elapsed = last_ack.duration_since(started);
    let stored = collector.metrics().snapshot().events_stored;
    collector.shutdown().await?;

    let rows_in_clickhouse: u64 = clickhouse
        .client()
        .with_database(&database)
        .query("SELECT count() FROM process_events")
        .fetch_one()
        .await
        .context("counting the stored rows")?;
    ensure!(
        rows_in_clickhouse == acked && stored == acked,
        "{acked} events acknowledged, collector stored {stored}, ClickHouse holds {rows_in_clickhouse}"
    );
    drop_database(clickhouse, &database).await;
    ack_times.sort_unstable();
    Ok(ThroughputResult {
        agents,
        collector_delay_ms,
        events_acked: acked,
        elapsed,
        rows_in_clickhouse,
        ack_p50: percentile(&ack_times, 50.0),
    })
}

/// `events` realistic exec events of agent number `agent`, in batches.
fn agent_batches(agent: usize, events: usize) -> Vec<EventBatch> {
    let identity = AgentIdentity {
        org_id: format!("bench-org-{}", agent % 4),
        device_id: format!("bench-device-{agent:05}"),
        hostname: format!("pc-{agent:05}.pref.example"),
        boot_id: uuid::Uuid::new_v4().to_string(),
        agent_version: "0.1.0-bench".to_owned(),
    };
    let now_ns = unix_ns(SystemTime::now());
    (0..events)
        .collect::<Vec<_>>()
        .chunks(BATCH_EVENTS)
        .enumerate()
        .map(|(b, seqs)| EventBatch {
            batch_seq: b as u64 + 1,
            agent: Some(identity.clone()),
            events: seqs
                .iter()
                .map(|&i| exec_event(i as u64 + 1, now_ns + i as u64 * 1_000))
                .collect(),
        })
        .collect()
}

/// Command lines of the kind an office PC runs, 40 to 120 bytes of argv.
const COMMANDS: [(&str, &[&str]); 4] = [
    (
        "/usr/bin/python3",
        &[
            "/usr/bin/python3",
            "-m",
            "pip",
            "install",
            "--requirement=/srv/apps/budget/requirements.txt",
        ],
    ),
    (
        "/usr/bin/git",
        &[
            "git",
            "-C",
            "/home/staff/projects/budget-2025",
            "status",
            "--porcelain=v2",
        ],
    ),
    ("/bin/sh", &["/bin/sh", "-c", "ls -la /tmp | wc -l"]),
    (
        "/usr/lib/firefox/firefox",
        &[
            "/usr/lib/firefox/firefox",
            "-contentproc",
            "-childID",
            "12",
            "-isForBrowser",
            "-prefsLen",
            "31457",
            "tab",
        ],
    ),
];

#[allow(clippy::needless_update)]
fn exec_event(seq: u64, time_unix_ns: u64) -> Event {
    let (filename, argv) = COMMANDS[seq as usize % COMMANDS.len()];
    Event {
        seq,
        time_unix_ns,
        ancestors: Vec::new(),
        kind: Some(Kind::Exec(ProcessExec {
            pid: 10_000 + (seq % 50_000) as u32,
            tid: 10_000 + (seq % 50_000) as u32,
            ppid: 1_204,
            uid: 1_000,
            gid: 1_000,
            cgroup_id: 8_812,
            filename: filename.to_owned(),
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            argv_truncated: false,
            filename_truncated: false,
            ppid_unknown: false,
            ..Default::default()
        })),
    }
}

fn print_throughput(results: &[ThroughputResult], events: usize, budget: Duration) {
    println!("## Ingest throughput (gRPC → collector → ClickHouse, acked after storage)\n");
    println!(
        "{events} events per run or {} s of sending, whichever first; {BATCH_EVENTS}-event batches, \
         ≤ {WINDOW_BATCHES} unacknowledged per agent; collector batch.max_rows 10000.\n",
        budget.as_secs()
    );
    println!("| agents | collector max_delay_ms | events acked | rows in ClickHouse | seconds | events/s | batch ack p50 |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.0} | {} ms |",
            r.agents,
            r.collector_delay_ms,
            r.events_acked,
            r.rows_in_clickhouse,
            r.elapsed.as_secs_f64(),
            r.events_per_s(),
            r.ack_p50.as_millis()
        );
    }
    println!();
}

// ------------------------------------------------------------------- latency

#[derive(Debug)]
struct LatencyResult {
    agent_delay_ms: Option<u64>,
    collector_delay_ms: Option<u64>,
    execs: usize,
    seen: usize,
    min: Duration,
    p50: Duration,
    p95: Duration,
    max: Duration,
    /// The same from the event's own (kernel) time to visibility.
    kernel_p50: Duration,
    kernel_max: Duration,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct MarkerRow {
    marker: String,
    time_ns: u64,
}

async fn latency(
    clickhouse: &ClickHouseServer,
    agent_binary: &std::path::Path,
    execs: usize,
    agent_delay_ms: Option<u64>,
    collector_delay_ms: Option<u64>,
) -> Result<LatencyResult> {
    let database = fresh_database_name("bench_latency");
    let collector = start_collector(clickhouse, &database, collector_delay_ms).await?;
    let dir = tempfile::tempdir()?;
    let mut agent = zt_e2e::bench::start_enrolled_agent(
        collector.state_dir(),
        collector.local_addr(),
        "bench-latency",
        agent_binary,
        agent_delay_ms,
        dir.path(),
    )
    .await?;
    let cgroup = TestCgroup::create("bench-latency")?;
    let client = clickhouse.client().with_database(&database);
    let prefix = format!("zt-bench-{}-", uuid::Uuid::new_v4().simple());

    // Warm-up: one exec, seen end to end, so the stream is open and hot.
    let warm_up = format!("{prefix}warmup");
    exec_in_cgroup(&cgroup, &warm_up)?;
    let deadline = Instant::now() + LATENCY_GRACE;
    while poll_markers(&client, &warm_up).await?.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "warm-up exec not in ClickHouse within {LATENCY_GRACE:?}; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(POLL_EVERY).await;
    }

    // The execs run on their own thread, on a fixed schedule; this task polls.
    let marker_prefix = format!("{prefix}m");
    let spawner = {
        let cgroup_procs = cgroup.procs_file();
        let prefix = marker_prefix.clone();
        std::thread::spawn(move || -> Result<Vec<(Instant, SystemTime)>> {
            let start = Instant::now();
            let mut times = Vec::with_capacity(execs);
            for i in 0..execs {
                let at = start + EXEC_SPACING * i as u32;
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                times.push((Instant::now(), SystemTime::now()));
                exec_with_procs(&cgroup_procs, &format!("{prefix}{i}"))?;
            }
            Ok(times)
        })
    };
    let poll_until = Instant::now() + EXEC_SPACING * execs as u32 + LATENCY_GRACE;
    let mut seen: HashMap<String, (Instant, SystemTime, u64)> = HashMap::new();
    while seen.len() < execs && Instant::now() < poll_until {
        let rows = poll_markers(&client, &format!("{marker_prefix}%")).await?;
        let (now, wall) = (Instant::now(), SystemTime::now());
        for row in rows {
            seen.entry(row.marker).or_insert((now, wall, row.time_ns));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    let exec_times = spawner
        .join()
        .map_err(|_| anyhow::anyhow!("exec thread panicked"))??;

    let mut latencies = Vec::new();
    let mut kernel_latencies = Vec::new();
    for (i, (at, _)) in exec_times.iter().enumerate() {
        if let Some((seen_at, seen_wall, time_ns)) = seen.get(&format!("{marker_prefix}{i}")) {
            latencies.push(seen_at.duration_since(*at));
            kernel_latencies.push(Duration::from_nanos(
                unix_ns(*seen_wall).saturating_sub(*time_ns),
            ));
        }
    }
    latencies.sort_unstable();
    kernel_latencies.sort_unstable();

    drop(cgroup);
    let status = agent.terminate(Duration::from_secs(15));
    ensure!(
        status.is_some_and(|s| s.success()),
        "agent did not stop cleanly ({status:?}):\n{}",
        agent.log()
    );
    collector.shutdown().await?;
    drop_database(clickhouse, &database).await;
    Ok(LatencyResult {
        agent_delay_ms,
        collector_delay_ms,
        execs,
        seen: latencies.len(),
        min: latencies.first().copied().unwrap_or_default(),
        p50: percentile(&latencies, 50.0),
        p95: percentile(&latencies, 95.0),
        max: latencies.last().copied().unwrap_or_default(),
        kernel_p50: percentile(&kernel_latencies, 50.0),
        kernel_max: kernel_latencies.last().copied().unwrap_or_default(),
    })
}

async fn poll_markers(client: &clickhouse::Client, pattern: &str) -> Result<Vec<MarkerRow>> {
    client
        .query("SELECT argv[2] AS marker, time_ns FROM process_events WHERE argv[2] LIKE ?")
        .bind(pattern)
        .fetch_all::<MarkerRow>()
        .await
        .context("polling ClickHouse for the markers")
}

fn exec_in_cgroup(cgroup: &TestCgroup, marker: &str) -> Result<()> {
    exec_with_procs(&cgroup.procs_file(), marker)
}

/// Runs `/bin/true <marker>` inside the cgroup whose `cgroup.procs` is
/// `procs`, and waits for it.
fn exec_with_procs(procs: &std::path::Path, marker: &str) -> Result<()> {
    let mut command = Command::new("/bin/true");
    command.arg(marker);
    zt_e2e::cgroup::join_on_exec(procs, &mut command)?;
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .context("running /bin/true in the bench cgroup")?;
    ensure!(status.success(), "/bin/true failed: {status}");
    Ok(())
}

fn print_latency(results: &[LatencyResult], execs: usize) {
    println!("## Exec-to-row latency (real zt-agent, eBPF → gRPC → collector → ClickHouse)\n");
    println!(
        "{execs} `/bin/true <marker>` execs, {} ms apart, in a test cgroup; ClickHouse polled every {} ms \
         (latency = first poll that saw the row − time just before fork).\n",
        EXEC_SPACING.as_millis(),
        POLL_EVERY.as_millis()
    );
    println!("| agent batch_max_delay_ms | collector max_delay_ms | rows seen | min | p50 | p95 | max | p50 / max from kernel event time |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let show = |ms: Option<u64>, default: u64| match ms {
        Some(ms) => ms.to_string(),
        None => format!("{default} (default)"),
    };
    for r in results {
        println!(
            "| {} | {} | {}/{} | {} ms | {} ms | {} ms | {} ms | {} / {} ms |",
            show(r.agent_delay_ms, 250),
            show(
                r.collector_delay_ms,
                zt_collector::config::BatchConfig::default().max_delay_ms
            ),
            r.seen,
            r.execs,
            r.min.as_millis(),
            r.p50.as_millis(),
            r.p95.as_millis(),
            r.max.as_millis(),
            r.kernel_p50.as_millis(),
            r.kernel_max.as_millis()
        );
    }
    println!();
}
