//! Sensor storms: what the real agent keeps, loses and costs when a workload
//! floods one sensor. Not part of `make test`; run as root with
//!
//! ```text
//! cargo build --release --bins
//! cargo bench -p zt-e2e --bench sensor_storms
//! ```
//!
//! It starts a private ClickHouse, the release `zt-collector` and `zt-agent`
//! (the end-to-end [`Stack`]), and runs each storm in a cgroup of its own
//! with a python driver that reports its own wall and CPU time:
//!
//! - **exec**: 20,000 `posix_spawn("/bin/true")` + `waitpid`, back to back
//!   (each is a fork, an exec and an exit for the critical ring);
//! - **connect**: 50,000 loopback TCP connections to a listener of the same
//!   driver (connect, accept, close both ends: five state changes each);
//! - **open, watched**: 1,000,000 `open(O_WRONLY|O_CREAT)` + `close` of one
//!   file under `/tmp/` (watched for writes: one bulk event each);
//! - **open, unwatched**: 1,000,000 `open(O_RDONLY)` + `close` of a file
//!   under `/tmp/` (not watched for reads: filtered in the kernel).
//!
//! For each storm it counts the rows ClickHouse stored for the storm's
//! cgroup (waiting until the count is unchanged for 3 s, at most 60 s), the
//! losses the agent reported in `zt.gaps` during the storm, the agent's
//! user + system CPU time (from `/proc/<pid>/stat`) and memory (`VmHWM`,
//! reset before each storm through `/proc/<pid>/clear_refs`, and `VmRSS`),
//! and compares the workload's wall and CPU time with the agent
//! running against the same workload without any agent (run before the
//! agent starts and again after it stopped).
//!
//! Knobs (environment): `ZT_STORM_EXECS` (default 20000),
//! `ZT_STORM_CONNECTS` (50000), `ZT_STORM_OPENS` (1000000),
//! `ZT_STORM_ONLY` (a comma-separated subset of `exec,connect,open_watched,
//! open_unwatched`) and `ZT_STORM_AGENT_CPU_PERCENT` (the agent's
//! `budget.cpu_percent`, default 5 as shipped).
//!
//! Everything is bounded: each driver is killed after 5 minutes, each wait
//! has a timeout, and the whole program gives up after 30 minutes.
//! ClickHouse, collector, agent, drivers, cgroups and files are removed on
//! exit, also on failure. Only loopback is used.
//!
//! ClickHouse's data (and the stack's logs) go to a directory under the
//! target directory instead of `/tmp`: the agent watches `/tmp/` for writes,
//! and every part ClickHouse writes there would otherwise come back as file
//! events, mixing the storage of one storm's rows into the storm's counts.

use std::{
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context as _, Result};
use zt_e2e::{
    cgroup::TestCgroup,
    process::{workspace_binary, Process},
    stack::{marker_for, spawn_in_cgroup_with, Stack},
};

const PYTHON: &str = "/usr/bin/python3";
const DRIVER_LIMIT: Duration = Duration::from_secs(5 * 60);
const SETTLE_QUIET: Duration = Duration::from_secs(3);
const SETTLE_MAX: Duration = Duration::from_secs(60);
const SETTLE_POLL: Duration = Duration::from_millis(500);
const IDLE_SAMPLE: Duration = Duration::from_secs(5);
/// How long the agent gets to stop sampling before a storm.
const CALM_MAX: Duration = Duration::from_secs(60);
const WHOLE_RUN_LIMIT: Duration = Duration::from_secs(30 * 60);

/// One driver for every storm: `driver.py <kind> <n> [path]`. It prints
/// `done <ops> <wall_s> <user_s> <sys_s>`, CPU time of itself and its
/// reaped children over the loop only.
const DRIVER: &str = r#"
import os, resource, socket, sys, time

def cpu():
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + c.ru_utime, s.ru_stime + c.ru_stime

kind, n = sys.argv[1], int(sys.argv[2])
if kind == "exec":
    spawn, wait, env = os.posix_spawn, os.waitpid, {}
    argv = ["/bin/true"]
    u0, s0 = cpu(); t0 = time.perf_counter()
    for _ in range(n):
        pid = spawn("/bin/true", argv, env)
        _, status = wait(pid, 0)
        if status != 0:
            sys.exit("true failed")
elif kind == "connect":
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    addr = listener.getsockname()
    accept, new = listener.accept, socket.socket
    u0, s0 = cpu(); t0 = time.perf_counter()
    for _ in range(n):
        client = new()
        client.connect(addr)
        server, _ = accept()
        # The server closes first: TIME_WAIT stays on the listener's side
        # and the client's ephemeral ports are free for reuse.
        server.close()
        client.close()
elif kind in ("open_write", "open_read"):
    path = sys.argv[3]
    flags = os.O_WRONLY | os.O_CREAT if kind == "open_write" else os.O_RDONLY
    op, cl = os.open, os.close
    u0, s0 = cpu(); t0 = time.perf_counter()
    for _ in range(n):
        cl(op(path, flags, 0o644))
else:
    sys.exit("unknown kind " + kind)
t1 = time.perf_counter(); u1, s1 = cpu()
print("done", n, t1 - t0, u1 - u0, s1 - s0, flush=True)
"#;

fn main() -> ExitCode {
    zt_e2e::bench::main("sensor_storms", WHOLE_RUN_LIMIT, run)
}

/// A release binary of the workspace: next to the bench executable when
/// `cargo bench` built it there (it does: `target/release/deps/..`), else
/// `target/release/` found from it.
fn release_binary(name: &str) -> Result<PathBuf> {
    if let Ok(path) = workspace_binary(name) {
        if path.parent().is_some_and(|d| d.ends_with("release")) {
            return Ok(path);
        }
    }
    let exe = std::env::current_exe()?;
    let path = exe
        .ancestors()
        .nth(3)
        .context("bench executable is not under target/<profile>/deps")?
        .join("release")
        .join(name);
    ensure!(
        path.exists(),
        "{} not found: `cargo build --release --bins` first",
        path.display()
    );
    Ok(path)
}

// ------------------------------------------------------------------ storms

#[derive(Clone, Copy, Debug, PartialEq)]
enum StormKind {
    Exec,
    Connect,
    OpenWatched,
    OpenUnwatched,
}

impl StormKind {
    fn name(self) -> &'static str {
        match self {
            StormKind::Exec => "exec",
            StormKind::Connect => "connect",
            StormKind::OpenWatched => "open_watched",
            StormKind::OpenUnwatched => "open_unwatched",
        }
    }
}

/// Rows one storm should leave in ClickHouse, by kind.
struct Expect {
    label: &'static str,
    table: &'static str,
    /// SQL condition besides `cgroup_id = ?`.
    filter: String,
    expected: u64,
    critical: bool,
}

struct Storm {
    kind: StormKind,
    title: String,
    ops: u64,
    driver_args: Vec<String>,
    expects: Vec<Expect>,
}

fn storms(files: &Path) -> Result<Vec<Storm>> {
    let execs = zt_e2e::bench::env_number("ZT_STORM_EXECS", 20_000)?;
    let connects = zt_e2e::bench::env_number("ZT_STORM_CONNECTS", 50_000)?;
    let opens = zt_e2e::bench::env_number("ZT_STORM_OPENS", 1_000_000)?;
    let watched = files.join("watched").display().to_string();
    let unwatched = files.join("unwatched").display().to_string();
    let only = std::env::var("ZT_STORM_ONLY").ok();
    let all = vec![
        Storm {
            kind: StormKind::Exec,
            title: format!("exec: {execs} × posix_spawn(/bin/true) + waitpid"),
            ops: execs,
            driver_args: vec!["exec".into(), execs.to_string()],
            expects: vec![
                Expect {
                    label: "exec",
                    table: "process_events",
                    filter: "event_type = 'exec' AND filename = '/bin/true'".into(),
                    expected: execs,
                    critical: true,
                },
                Expect {
                    label: "fork",
                    table: "process_events",
                    filter: "event_type = 'fork'".into(),
                    expected: execs,
                    critical: true,
                },
                Expect {
                    label: "exit",
                    table: "process_events",
                    filter: "event_type = 'exit' AND exe = '/bin/true'".into(),
                    expected: execs,
                    critical: true,
                },
            ],
        },
        Storm {
            kind: StormKind::Connect,
            title: format!("connect: {connects} loopback TCP connections (connect, accept, close ×2)"),
            ops: connects,
            driver_args: vec!["connect".into(), connects.to_string()],
            expects: ["connect_attempt", "connected", "accepted", "closed"]
                .into_iter()
                .map(|action| Expect {
                    label: action,
                    table: "network_events",
                    filter: format!("action = '{action}'"),
                    expected: if action == "closed" {
                        2 * connects
                    } else {
                        connects
                    },
                    critical: true,
                })
                .collect(),
        },
        Storm {
            kind: StormKind::OpenWatched,
            title: format!("open, watched: {opens} × open(O_WRONLY|O_CREAT) + close under /tmp/"),
            ops: opens,
            driver_args: vec!["open_write".into(), opens.to_string(), watched.clone()],
            expects: vec![Expect {
                label: "open_write",
                table: "file_events",
                filter: format!("action = 'open_write' AND path = '{watched}'"),
                expected: opens,
                critical: false,
            }],
        },
        Storm {
            kind: StormKind::OpenUnwatched,
            title: format!(
                "open, unwatched: {opens} × open(O_RDONLY) + close under /tmp/ (reads not watched there)"
            ),
            ops: opens,
            driver_args: vec!["open_read".into(), opens.to_string(), unwatched.clone()],
            expects: vec![Expect {
                label: "any file row",
                table: "file_events",
                filter: "1".into(),
                expected: 0,
                critical: false,
            }],
        },
    ];
    Ok(all
        .into_iter()
        .filter(|s| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n.trim() == s.kind.name()))
        })
        .collect())
}

/// What the driver reported about its loop.
#[derive(Clone, Copy, Debug, Default)]
struct DriverRun {
    wall_s: f64,
    user_s: f64,
    sys_s: f64,
}

/// A driver process, killed and reaped if it is still running when dropped.
struct Driver(std::process::Child);

impl Drop for Driver {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs the storm's driver in a fresh cgroup; returns its report and the
/// cgroup (kept for counting rows).
async fn run_driver(storm: &Storm, tag: &str) -> Result<(DriverRun, TestCgroup)> {
    let cgroup = TestCgroup::create(&format!("storm-{}-{tag}", storm.kind.name()))?;
    let mut args: Vec<&str> = vec!["-c", DRIVER];
    args.extend(storm.driver_args.iter().map(String::as_str));
    let mut driver = Driver(spawn_in_cgroup_with(
        &cgroup,
        PYTHON,
        &args,
        Stdio::piped(),
    )?);
    let deadline = Instant::now() + DRIVER_LIMIT;
    let status = loop {
        if let Some(status) = driver.0.try_wait()? {
            break status;
        }
        ensure!(
            Instant::now() < deadline,
            "{} driver still running after {DRIVER_LIMIT:?}",
            storm.kind.name()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut out = String::new();
    if let Some(mut stdout) = driver.0.stdout.take() {
        std::io::Read::read_to_string(&mut stdout, &mut out)?;
    }
    ensure!(
        status.success(),
        "{} driver failed ({status}): {out}",
        storm.kind.name()
    );
    let fields: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("done "))
        .with_context(|| format!("driver printed no result: {out:?}"))?
        .split_whitespace()
        .collect();
    ensure!(fields.len() == 5, "unexpected driver output {out:?}");
    let ops: u64 = fields[1].parse()?;
    ensure!(ops == storm.ops, "driver did {ops} ops, not {}", storm.ops);
    Ok((
        DriverRun {
            wall_s: fields[2].parse()?,
            user_s: fields[3].parse()?,
            sys_s: fields[4].parse()?,
        },
        cgroup,
    ))
}

// --------------------------------------------------------------- measuring

#[derive(Debug, Default, Clone)]
struct Delivery {
    label: &'static str,
    expected: u64,
    stored: u64,
    critical: bool,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct GapSum {
    stream: String,
    reason: String,
    lost: u64,
}

#[derive(Debug, Default)]
struct StormResult {
    title: String,
    kind: Option<StormKind>,
    ops: u64,
    with_agent: DriverRun,
    without_agent: Vec<DriverRun>,
    delivery: Vec<Delivery>,
    gaps: Vec<GapSum>,
    settle_s: f64,
    settled: bool,
    agent_cpu_s: f64,
    collector_cpu_s: f64,
    /// Seconds from the storm's start until the rows settled.
    window_s: f64,
    agent_memory: Memory,
    /// The agent's bulk sampling (keep 1 in N) when the storm started and
    /// when its rows had settled.
    sampling_at_start: u32,
    sampling_at_end: u32,
}

impl StormResult {
    fn stored(&self) -> u64 {
        self.delivery.iter().map(|d| d.stored).sum()
    }
    fn expected(&self) -> u64 {
        self.delivery.iter().map(|d| d.expected).sum()
    }
    fn best_without(&self) -> Option<DriverRun> {
        self.without_agent
            .iter()
            .copied()
            .min_by(|a, b| a.wall_s.total_cmp(&b.wall_s))
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces: state is field 3.
    let rest = stat
        .rsplit_once(')')
        .context("malformed /proc/<pid>/stat")?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((utime + stime) as f64 / ticks)
}

/// A process's memory from `/proc/<pid>/status`, KiB.
#[derive(Clone, Copy, Debug, Default)]
struct Memory {
    /// Peak resident set (`VmHWM`).
    hwm: u64,
    rss: u64,
    /// Of `rss`: anonymous (heap, stacks), file-backed (the mapped
    /// executable), shared (ring buffers and maps mapped from the kernel).
    anon: u64,
    file: u64,
    shmem: u64,
}

impl Memory {
    fn mib(kib: u64) -> f64 {
        kib as f64 / 1024.0
    }
}

fn memory_kib(pid: u32) -> Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok(Memory {
        hwm: field("VmHWM:")?,
        rss: field("VmRSS:")?,
        anon: field("RssAnon:")?,
        file: field("RssFile:")?,
        shmem: field("RssShmem:")?,
    })
}

async fn count_rows(stack: &Stack, expect: &Expect, cgroup_id: u64) -> Result<u64> {
    // Resent batches can store a row twice: count distinct events.
    let sql = format!(
        "SELECT uniqExact(boot_id, seq) FROM {} WHERE cgroup_id = ? AND {}",
        expect.table, expect.filter
    );
    stack
        .db()
        .query(&sql)
        .bind(cgroup_id)
        .fetch_one::<u64>()
        .await
        .with_context(|| format!("counting {} rows", expect.label))
}

async fn count_all(stack: &Stack, storm: &Storm, cgroup_id: u64) -> Result<Vec<u64>> {
    let mut counts = Vec::new();
    for expect in &storm.expects {
        counts.push(count_rows(stack, expect, cgroup_id).await?);
    }
    Ok(counts)
}

async fn storm_with_agent(
    stack: &Stack,
    storm: &Storm,
    agent: &Process,
    collector: &Process,
) -> Result<StormResult> {
    let started = Instant::now();
    let start_ns = unix_ns();
    let agent_cpu0 = cpu_seconds(agent.pid())?;
    let collector_cpu0 = cpu_seconds(collector.pid())?;
    let (run, cgroup) = run_driver(storm, "agent").await?;
    let cgroup_id = cgroup.id()?;

    // Wait until the stored rows stop changing.
    let settle_started = Instant::now();
    let mut last = count_all(stack, storm, cgroup_id).await?;
    let mut unchanged_since = Instant::now();
    let settled = loop {
        if unchanged_since.elapsed() >= SETTLE_QUIET {
            break true;
        }
        if settle_started.elapsed() >= SETTLE_MAX {
            break false;
        }
        tokio::time::sleep(SETTLE_POLL).await;
        let now = count_all(stack, storm, cgroup_id).await?;
        if now != last {
            last = now;
            unchanged_since = Instant::now();
        }
    };
    // The quiet period is not part of the work.
    let settle_s = (unchanged_since - settle_started).as_secs_f64();
    let agent_cpu_s = cpu_seconds(agent.pid())? - agent_cpu0;
    let collector_cpu_s = cpu_seconds(collector.pid())? - collector_cpu0;
    let agent_memory = memory_kib(agent.pid())?;
    let end_ns = unix_ns();

    let gaps = stack
        .db()
        .query(
            "SELECT stream, reason, sum(lost) AS lost FROM gaps \
             WHERE to_ns >= ? AND from_ns <= ? GROUP BY stream, reason ORDER BY stream, reason",
        )
        .bind(start_ns)
        .bind(end_ns)
        .fetch_all::<GapSum>()
        .await
        .context("reading zt.gaps")?;
    drop(cgroup);
    Ok(StormResult {
        title: storm.title.clone(),
        kind: Some(storm.kind),
        ops: storm.ops,
        with_agent: run,
        without_agent: Vec::new(),
        delivery: storm
            .expects
            .iter()
            .zip(last)
            .map(|(e, stored)| Delivery {
                label: e.label,
                expected: e.expected,
                stored,
                critical: e.critical,
            })
            .collect(),
        gaps,
        settle_s,
        settled,
        agent_cpu_s,
        collector_cpu_s,
        window_s: started.elapsed().as_secs_f64(),
        agent_memory,
        sampling_at_start: 1,
        sampling_at_end: 1,
    })
}

/// The agent's bulk sampling N ("keep 1 in N") as its log last stated it.
fn bulk_sampling(log: &str) -> u32 {
    log.lines()
        .rev()
        .find_map(|line| {
            if line.contains("back within self-budget") {
                Some(1)
            } else if line.contains("over self-budget") {
                line.split("keep_one_in=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            } else {
                None
            }
        })
        .unwrap_or(1)
}

/// Pids of `zt-agent` processes that are not ours.
fn foreign_agents(ours: Option<u32>) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| Some(pid) != ours)
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "zt-agent")
        })
        .collect()
}

async fn baselines(storms: &[Storm], results: &mut [StormResult], when: &str) -> Result<()> {
    let others = foreign_agents(None);
    if !others.is_empty() {
        eprintln!("warning: other zt-agent processes run ({others:?}): the {when} baseline is not agent-free");
    }
    for (storm, result) in storms.iter().zip(results.iter_mut()) {
        let (run, _cgroup) = run_driver(storm, when)
            .await
            .with_context(|| format!("{} without agent ({when})", storm.kind.name()))?;
        eprintln!("{} without agent ({when}): {run:?}", storm.kind.name());
        result.without_agent.push(run);
    }
    Ok(())
}

async fn run() -> Result<()> {
    // SAFETY: no arguments, cannot fail.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the agent loads eBPF programs: run as root"
    );
    let agent_binary = release_binary("zt-agent")?;
    let collector_binary = release_binary("zt-collector")?;
    eprintln!(
        "binaries: {} and {}",
        agent_binary.display(),
        collector_binary.display()
    );
    ensure!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is needed for the drivers"
    );

    // The storms' files live under the real /tmp/, which the agent watches.
    let files = tempfile::Builder::new()
        .prefix(&marker_for("storm"))
        .tempdir_in("/tmp")?;
    std::fs::write(files.path().join("unwatched"), b"read me\n")?;
    let storms = storms(files.path())?;
    ensure!(!storms.is_empty(), "ZT_STORM_ONLY selects no storm");
    let mut results: Vec<StormResult> = storms
        .iter()
        .map(|s| StormResult {
            title: s.title.clone(),
            ops: s.ops,
            ..Default::default()
        })
        .collect();

    let stack = Stack::new("bench_storms").await?;
    let collector = stack.start_collector().await?;
    ensure!(
        workspace_binary("zt-collector")? == collector_binary,
        "the stack would not run the release collector"
    );

    // 1. Without an agent (ClickHouse and collector idle).
    baselines(&storms, &mut results, "before").await?;

    // 2. With the agent.
    // The test stack gives its agents a whole core of CPU budget; storms
    // measure the agent as shipped (5 % of a core) unless told otherwise.
    let cpu_budget = std::env::var("ZT_STORM_AGENT_CPU_PERCENT").unwrap_or_else(|_| "5".to_owned());
    let mut agent = stack
        .start_agent_named(
            "agent",
            &[("ZT_AGENT_BUDGET__CPU_PERCENT", cpu_budget.clone())],
        )
        .await?;
    let agent_pid = agent.pid();
    let idle0 = cpu_seconds(agent_pid)?;
    tokio::time::sleep(IDLE_SAMPLE).await;
    let idle_cpu_per_s = (cpu_seconds(agent_pid)? - idle0) / IDLE_SAMPLE.as_secs_f64();
    let memory_start = memory_kib(agent_pid)?;
    let others = foreign_agents(Some(agent_pid));
    for (storm, result) in storms.iter().zip(results.iter_mut()) {
        // A previous storm may have left the agent sampling bulk events:
        // give it a bounded time to calm down, and report what it was.
        let calm_started = Instant::now();
        while bulk_sampling(&agent.log()) > 1 && calm_started.elapsed() < CALM_MAX {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let sampling_at_start = bulk_sampling(&agent.log());
        // Each storm's own peak: VmHWM starts again from the current RSS
        // (else a later storm would report an earlier one's peak).
        std::fs::write(format!("/proc/{agent_pid}/clear_refs"), "5")
            .context("resetting the agent's peak RSS")?;
        let mut measured = storm_with_agent(&stack, storm, &agent, &collector)
            .await
            .with_context(|| format!("{} with the agent\n{}", storm.kind.name(), stack.logs()))?;
        eprintln!(
            "{} with agent: {:?} stored {}/{} agent cpu {:.2}s",
            storm.kind.name(),
            measured.with_agent,
            measured.stored(),
            measured.expected(),
            measured.agent_cpu_s
        );
        measured.sampling_at_start = sampling_at_start;
        measured.sampling_at_end = bulk_sampling(&agent.log());
        let without = std::mem::take(&mut result.without_agent);
        *result = measured;
        result.without_agent = without;
        if let Some(status) = agent.exited() {
            bail!(
                "the agent exited ({status}) during the storms:\n{}",
                agent.log()
            );
        }
    }
    let status = agent.terminate(Duration::from_secs(30));
    let last_words = agent
        .log()
        .lines()
        .rev()
        .find(|l| l.contains(" stopped"))
        .map(str::to_owned)
        .unwrap_or_default();
    ensure!(
        status.is_some_and(|s| s.success()),
        "agent did not stop cleanly ({status:?}):\n{}",
        agent.log()
    );
    drop(agent);
    // What the whole agent run left, for comparison with its counters.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let totals = whole_run_totals(&stack).await?;

    // 3. Without an agent again, to bracket drift.
    baselines(&storms, &mut results, "after").await?;
    drop(collector);

    print_report(
        &results,
        idle_cpu_per_s,
        memory_start,
        &cpu_budget,
        &others,
        &last_words,
    );
    print_totals(&totals);
    Ok(())
}

// --------------------------------------------------------------- reporting

fn print_report(
    results: &[StormResult],
    idle_cpu_per_s: f64,
    start: Memory,
    cpu_budget: &str,
    others: &[u32],
    last_words: &str,
) {
    println!("# sensor_storms\n");
    println!("{}\n", zt_e2e::bench::machine_line());
    println!(
        "Release zt-agent and zt-collector; agent budget.cpu_percent = {cpu_budget} \
         (over it the agent samples file events, never critical ones), other settings as the \
         end-to-end stack sets them (uplink batch delay 100 ms, collector writer delay 200 ms).\n"
    );
    if !others.is_empty() {
        println!("**warning:** other zt-agent processes were running ({others:?}); they shared the CPUs and their hooks slowed every workload.\n");
    }
    for r in results {
        println!("- {}", r.title);
    }
    println!();

    println!("## Delivery: events generated vs stored in ClickHouse (storm's cgroup)\n");
    println!("| storm | event | generated | stored | stored % | settled | agent sampling bulk at start → end |");
    println!("|---|---|---:|---:|---:|---|---|");
    for r in results {
        let name = r.kind.map_or("?", StormKind::name);
        for d in &r.delivery {
            let pct = if d.expected == 0 {
                "–".to_owned()
            } else {
                format!("{:.2} %", 100.0 * d.stored as f64 / d.expected as f64)
            };
            println!(
                "| {name} | {}{} | {} | {} | {pct} | {} | 1 in {} → 1 in {} |",
                d.label,
                if d.critical { " (critical)" } else { "" },
                d.expected,
                d.stored,
                if r.settled {
                    format!("after {:.1} s", r.settle_s)
                } else {
                    format!("no (still changing after {} s)", SETTLE_MAX.as_secs())
                },
                r.sampling_at_start,
                r.sampling_at_end,
            );
        }
    }
    println!();

    println!("## Loss reported by the agent in `zt.gaps` during each storm\n");
    println!("| storm | critical lost | bulk lost | by reason |");
    println!("|---|---:|---:|---|");
    for r in results {
        let sum = |stream: &str| -> u64 {
            r.gaps
                .iter()
                .filter(|g| g.stream == stream)
                .map(|g| g.lost)
                .sum()
        };
        let reasons = if r.gaps.is_empty() {
            "–".to_owned()
        } else {
            r.gaps
                .iter()
                .map(|g| format!("{}/{}: {}", g.stream, g.reason, g.lost))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "| {} | {} | {} | {reasons} |",
            r.kind.map_or("?", StormKind::name),
            sum("critical"),
            sum("bulk"),
        );
    }
    println!();

    println!("## Agent cost\n");
    println!(
        "Agent idle: {:.1} ms CPU per second (measured over {} s before the storms); at start RSS \
         {:.1} MiB = {:.1} anonymous + {:.1} file-backed + {:.1} shared. CPU is utime + stime of \
         the agent process from the storm's start until its rows settled (window); \
         \"net\" subtracts the idle rate over the window; per event = net CPU / rows stored \
         (per operation when nothing is stored).\n",
        idle_cpu_per_s * 1000.0,
        IDLE_SAMPLE.as_secs(),
        Memory::mib(start.rss),
        Memory::mib(start.anon),
        Memory::mib(start.file),
        Memory::mib(start.shmem),
    );
    println!("| storm | window | agent CPU (user+sys) | net of idle | per event | collector CPU | agent peak RSS (VmHWM) | RSS after (anon / file / shared) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let stored = r.stored();
        let net = (r.agent_cpu_s - idle_cpu_per_s * r.window_s).max(0.0);
        let per_event = if stored > 0 {
            format!("{:.2} µs", net * 1e6 / stored as f64)
        } else {
            format!("{:.3} µs per op", net * 1e6 / r.ops.max(1) as f64)
        };
        let m = r.agent_memory;
        println!(
            "| {} | {:.1} s | {:.2} s | {net:.2} s | {per_event} | {:.2} s | {:.1} MiB | {:.1} MiB ({:.1} / {:.1} / {:.1}) |",
            r.kind.map_or("?", StormKind::name),
            r.window_s,
            r.agent_cpu_s,
            r.collector_cpu_s,
            Memory::mib(m.hwm),
            Memory::mib(m.rss),
            Memory::mib(m.anon),
            Memory::mib(m.file),
            Memory::mib(m.shmem),
        );
    }
    println!();

    println!("## Workload overhead: same driver with and without the agent\n");
    println!(
        "Wall and CPU (user + sys of the driver and its children) of the driver's loop only. \
         Without agent = the faster of the runs before the agent started and after it stopped. \
         The eBPF programs run in the calling task, in kernel mode: the added system time per \
         operation is what the hooks cost the workload; the wall difference adds competition \
         with agent, collector and ClickHouse for the 2 cores (user time shows that too: same \
         code, slower when the other core is busy).\n"
    );
    println!("| storm | ops | wall without (before / after) | wall with agent | slowdown | sys CPU per op without → with | added sys per op | user CPU per op without → with |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let Some(base) = r.best_without() else {
            continue;
        };
        let walls: Vec<String> = r
            .without_agent
            .iter()
            .map(|w| format!("{:.2}", w.wall_s))
            .collect();
        let ops = r.ops.max(1) as f64;
        let sys = |run: &DriverRun| run.sys_s * 1e6 / ops;
        let user = |run: &DriverRun| run.user_s * 1e6 / ops;
        println!(
            "| {} | {} | {} s | {:.2} s | {:+.1} % | {:.2} → {:.2} µs | {:+.2} µs | {:.2} → {:.2} µs |",
            r.kind.map_or("?", StormKind::name),
            r.ops,
            walls.join(" / "),
            r.with_agent.wall_s,
            100.0 * (r.with_agent.wall_s / base.wall_s - 1.0),
            sys(&base),
            sys(&r.with_agent),
            sys(&r.with_agent) - sys(&base),
            user(&base),
            user(&r.with_agent),
        );
    }
    println!();
    if !last_words.is_empty() {
        println!("Agent's counters at stop: `{}`\n", last_words.trim());
    }
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct TableTotal {
    rows: u64,
    events: u64,
}

struct Totals {
    tables: Vec<(&'static str, TableTotal)>,
    gaps: Vec<GapTotal>,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct GapTotal {
    stream: String,
    reason: String,
    records: u64,
    lost: u64,
}

async fn whole_run_totals(stack: &Stack) -> Result<Totals> {
    let mut tables = Vec::new();
    for table in ["process_events", "network_events", "file_events", "gaps"] {
        let total = stack
            .db()
            .query(&format!(
                "SELECT count() AS rows, uniqExact(boot_id, seq) AS events FROM {table}"
            ))
            .fetch_one::<TableTotal>()
            .await
            .with_context(|| format!("counting {table}"))?;
        tables.push((table, total));
    }
    let gaps = stack
        .db()
        .query(
            "SELECT stream, reason, count() AS records, sum(lost) AS lost FROM gaps \
             GROUP BY stream, reason ORDER BY stream, reason",
        )
        .fetch_all::<GapTotal>()
        .await
        .context("summing zt.gaps")?;
    Ok(Totals { tables, gaps })
}

fn print_totals(totals: &Totals) {
    println!(
        "## Whole agent run (all storms, the whole machine)
"
    );
    println!("| table | rows | distinct events (boot_id, seq) |");
    println!("|---|---:|---:|");
    for (table, t) in &totals.tables {
        println!("| {table} | {} | {} |", t.rows, t.events);
    }
    println!();
    println!("| gaps: stream | reason | records | lost |");
    println!("|---|---|---:|---:|");
    for g in &totals.gaps {
        println!(
            "| {} | {} | {} | {} |",
            g.stream, g.reason, g.records, g.lost
        );
    }
    println!();
}

// ------------------------------------------------------------------ helpers

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
