//! The first real path, end to end: a process executed in a cgroup made for
//! the test is seen by the agent's eBPF tracepoint, streamed over gRPC to the
//! collector, and stored in ClickHouse with the right identity and arguments.

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use zt_e2e::{
    cgroup::TestCgroup,
    clickhouse::{fresh_database_name, ClickHouseServer},
    eventually, free_port,
    process::{workspace_binary, Process},
};

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct ExecRow {
    org_id: String,
    pid: u32,
    ppid: u32,
    uid: u32,
    gid: u32,
    cgroup_id: u64,
    filename: String,
    argv: Vec<String>,
    time_ns: u64,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct TruncationRow {
    pid: u32,
    argv: Vec<String>,
    argv_truncated: u8,
}

struct Stack {
    clickhouse: ClickHouseServer,
    database: String,
    dir: tempfile::TempDir,
    collector_port: u16,
}

impl Stack {
    async fn new(name: &str) -> Result<Self> {
        Ok(Self {
            clickhouse: ClickHouseServer::start().await?,
            database: fresh_database_name(name),
            dir: tempfile::tempdir()?,
            collector_port: free_port()?,
        })
    }

    async fn start_collector(&self) -> Result<Process> {
        let mut collector = Process::spawn(
            "collector",
            &workspace_binary("zt-collector")?,
            [
                "--listen",
                &format!("127.0.0.1:{}", self.collector_port),
                "--clickhouse-url",
                &self.clickhouse.http_url(),
                "--database",
                &self.database,
            ],
            &[("ZT_COLLECTOR_BATCH__MAX_DELAY_MS", "200".to_owned())],
            self.dir.path(),
        )?;
        collector
            .wait_for_log("collector listening", Duration::from_secs(30))
            .await?;
        Ok(collector)
    }

    async fn start_agent(&self) -> Result<Process> {
        let mut agent = Process::spawn(
            "agent",
            &workspace_binary("zt-agent")?,
            [
                "--collector",
                &format!("http://127.0.0.1:{}", self.collector_port),
                "--org",
                "org-e2e",
                "--state-dir",
                &self.dir.path().join("agent-state").display().to_string(),
            ],
            &[
                ("ZT_AGENT_UPLINK__BATCH_MAX_DELAY_MS", "100".to_owned()),
                ("ZT_AGENT_UPLINK__BACKOFF_MAX_MS", "500".to_owned()),
            ],
            self.dir.path(),
        )?;
        agent
            .wait_for_log("sensor active", Duration::from_secs(30))
            .await?;
        Ok(agent)
    }

    async fn rows_with_marker(&self, marker: &str) -> Result<Vec<ExecRow>> {
        Ok(self
            .clickhouse
            .client()
            .with_database(&self.database)
            .query("SELECT ?fields FROM process_events WHERE has(argv, ?)")
            .bind(marker)
            .fetch_all::<ExecRow>()
            .await?)
    }

    async fn truncation_of(&self, marker: &str) -> Result<Option<TruncationRow>> {
        Ok(self
            .clickhouse
            .client()
            .with_database(&self.database)
            .query("SELECT ?fields FROM process_events WHERE has(argv, ?)")
            .bind(marker)
            .fetch_optional::<TruncationRow>()
            .await?)
    }

    fn logs(&self) -> String {
        ["collector", "agent"]
            .iter()
            .map(|name| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                    .unwrap_or_default();
                format!("--- {name} ---\n{log}")
            })
            .collect()
    }
}

/// Runs `/bin/echo <marker> "second arg"` inside `cgroup`; returns its pid.
fn exec_in_cgroup(cgroup: &TestCgroup, marker: &str) -> Result<u32> {
    exec_in_cgroup_with(cgroup, &[marker, "second arg"])
}

/// Runs `/bin/echo <args>` inside `cgroup`; returns its pid.
fn exec_in_cgroup_with(cgroup: &TestCgroup, args: &[&str]) -> Result<u32> {
    let procs = CString::new(cgroup.procs_file().as_os_str().as_bytes())?;
    let mut command = Command::new("/bin/echo");
    command.args(args);
    // SAFETY: only async-signal-safe calls (open, write, close) between fork
    // and exec: the child joins the test's cgroup before it executes.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("running /bin/echo in the test cgroup")?;
    let pid = child.id();
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "/bin/echo failed: {status}");
    Ok(pid)
}

fn marker() -> String {
    marker_for("marker")
}

fn marker_for(what: &str) -> String {
    format!("zt-e2e-{what}-{}", uuid::Uuid::new_v4().simple())
}

async fn assert_row_arrives(
    stack: &Stack,
    cgroup: &TestCgroup,
    marker: &str,
    pid: u32,
    started: Instant,
    limit: Duration,
) -> Result<()> {
    let rows = eventually(limit, || async {
        stack
            .rows_with_marker(marker)
            .await
            .ok()
            .filter(|rows| !rows.is_empty())
    })
    .await
    .with_context(|| {
        format!(
            "no row with {marker} in ClickHouse within {limit:?}\n{}",
            stack.logs()
        )
    })?;

    assert_eq!(
        rows.len(),
        1,
        "exactly one exec row for the marker: {rows:?}"
    );
    let row = &rows[0];
    assert_eq!(row.org_id, "org-e2e");
    assert_eq!(row.pid, pid, "pid");
    assert_eq!(
        row.ppid,
        std::process::id(),
        "ppid is the test process that forked it"
    );
    // SAFETY: plain syscalls without arguments.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    assert_eq!(row.uid, uid, "uid");
    assert_eq!(row.gid, gid, "gid");
    assert_eq!(
        row.cgroup_id,
        cgroup.id()?,
        "cgroup id of the test's cgroup"
    );
    assert_eq!(row.filename, "/bin/echo");
    assert_eq!(
        row.argv,
        vec![
            "/bin/echo".to_owned(),
            marker.to_owned(),
            "second arg".to_owned()
        ]
    );
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let since_start = started.elapsed().as_nanos() as u64;
    assert!(
        row.time_ns <= now_ns && row.time_ns >= now_ns - since_start - 1_000_000_000,
        "event time {} not within the test's run (now {now_ns})",
        row.time_ns
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_in_test_cgroup_reaches_clickhouse_within_5s() -> Result<()> {
    let started = Instant::now();
    let stack = Stack::new("e2e_exec").await?;
    let _collector = stack.start_collector().await?;
    let _agent = stack.start_agent().await?;
    let cgroup = TestCgroup::create("exec")?;

    let marker = marker();
    let pid = exec_in_cgroup(&cgroup, &marker)?;
    assert_row_arrives(
        &stack,
        &cgroup,
        &marker,
        pid,
        started,
        Duration::from_secs(5),
    )
    .await?;

    // An argument list longer than the event carries (4 KiB) arrives cut,
    // flagged as cut, with its leading arguments intact.
    let long_marker = marker_for("long");
    let filler = "x".repeat(3000);
    let pid = exec_in_cgroup_with(&cgroup, &[&long_marker, &filler, &filler])?;
    let row = eventually(Duration::from_secs(5), || async {
        stack.truncation_of(&long_marker).await.ok().flatten()
    })
    .await
    .with_context(|| format!("no row for the long argv\n{}", stack.logs()))?;
    assert_eq!(row.pid, pid);
    assert_eq!(
        row.argv_truncated, 1,
        "argv longer than 4 KiB must be flagged"
    );
    assert_eq!(row.argv[..2], ["/bin/echo".to_owned(), long_marker.clone()]);
    assert_eq!(row.argv[2], filler, "the first filler fits whole");
    let carried: usize = row.argv.iter().map(|a| a.len() + 1).sum();
    assert!(
        carried <= 4096 + 1 && carried > 4000,
        "argv area carried: {carried} bytes"
    );
    Ok(())
}

/// The collector is down when the process runs: the agent keeps running,
/// keeps the event, retries with backoff, and delivers once it is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_keeps_events_while_collector_is_down() -> Result<()> {
    let started = Instant::now();
    let stack = Stack::new("e2e_outage").await?;
    let mut agent = stack.start_agent().await?;
    let cgroup = TestCgroup::create("outage")?;

    let marker = marker();
    let pid = exec_in_cgroup(&cgroup, &marker)?;
    agent
        .wait_for_log("collector unreachable", Duration::from_secs(10))
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        agent.exited().is_none(),
        "agent must keep running without a collector:\n{}",
        agent.log()
    );

    let _collector = stack.start_collector().await?;
    assert_row_arrives(
        &stack,
        &cgroup,
        &marker,
        pid,
        started,
        Duration::from_secs(15),
    )
    .await?;

    // And it stops cleanly on SIGTERM, detaching its programs.
    let status = agent
        .terminate(Duration::from_secs(15))
        .context("agent did not stop on SIGTERM")?;
    assert!(
        status.success(),
        "agent exit status {status}:\n{}",
        agent.log()
    );
    assert!(agent.log().contains("stopped"), "{}", agent.log());
    Ok(())
}
