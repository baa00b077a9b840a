//! The first real path, end to end: a process executed in a cgroup made for
//! the test is seen by the agent's eBPF tracepoint, streamed over gRPC to the
//! collector, and stored in ClickHouse with the right identity and arguments.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use zt_e2e::{
    cgroup::TestCgroup,
    eventually,
    stack::{marker_for, run_in_cgroup, Stack, TEST_ORG},
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
    argv_truncated: u8,
    time_ns: u64,
    exe_sha256: String,
    user_name: String,
    cgroup_path: String,
    container_id: String,
}

async fn exec_rows(stack: &Stack, marker: &str) -> Result<Vec<ExecRow>> {
    Ok(stack
        .db()
        .query("SELECT ?fields FROM process_events WHERE event_type = 'exec' AND has(argv, ?)")
        .bind(marker)
        .fetch_all::<ExecRow>()
        .await?)
}

async fn wait_for_exec(stack: &Stack, marker: &str, limit: Duration) -> Result<ExecRow> {
    let mut rows = eventually(limit, || async {
        exec_rows(stack, marker)
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
    Ok(rows.remove(0))
}

/// `sha256sum`'s answer for `path`.
fn sha256_of(path: &str) -> Result<String> {
    let out = std::process::Command::new("sha256sum").arg(path).output()?;
    anyhow::ensure!(out.status.success(), "sha256sum {path} failed");
    Ok(String::from_utf8(out.stdout)?
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?
        .to_owned())
}

/// `getent passwd`'s name for `uid`.
fn user_name_of(uid: u32) -> Result<String> {
    let out = std::process::Command::new("getent")
        .args(["passwd", &uid.to_string()])
        .output()?;
    Ok(String::from_utf8(out.stdout)?
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Runs `/bin/echo <marker> "second arg"` in `cgroup` and checks its row.
async fn assert_echo_arrives(
    stack: &Stack,
    cgroup: &TestCgroup,
    started: Instant,
    limit: Duration,
) -> Result<()> {
    let marker = marker_for("marker");
    let (pid, status) = run_in_cgroup(cgroup, "/bin/echo", &[&marker, "second arg"])?;
    assert!(status.success());
    let row = wait_for_exec(stack, &marker, limit).await?;

    assert_eq!(row.org_id, TEST_ORG);
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
    assert_eq!(row.argv, ["/bin/echo", marker.as_str(), "second arg"]);
    assert_eq!(row.argv_truncated, 0);
    assert_eq!(
        row.exe_sha256,
        sha256_of("/bin/echo")?,
        "hash of the executed file"
    );
    assert_eq!(row.user_name, user_name_of(uid)?);
    let relative = cgroup
        .path()
        .strip_prefix(zt_e2e::cgroup::cgroup2_mount()?)?
        .display()
        .to_string();
    assert_eq!(
        row.cgroup_path,
        format!("/{relative}"),
        "the test cgroup's path"
    );
    assert_eq!(row.container_id, "", "not a container");
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

    assert_echo_arrives(&stack, &cgroup, started, Duration::from_secs(5)).await?;

    // An argument list longer than the event carries (4 KiB) arrives cut,
    // flagged as cut, with its leading arguments intact.
    let long_marker = marker_for("long");
    let filler = "x".repeat(3000);
    let (pid, _) = run_in_cgroup(&cgroup, "/bin/echo", &[&long_marker, &filler, &filler])?;
    let row = wait_for_exec(&stack, &long_marker, Duration::from_secs(5)).await?;
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

    // A binary changed in place (same inode, new size and modification
    // time) is hashed again: the exec event carries the file's version read
    // from the kernel's inode, the key of the agent's hash cache, and an
    // unchanged binary's second run is answered from that cache.
    let dir = tempfile::tempdir()?;
    let program = dir.path().join("echo-copy");
    std::fs::copy("/bin/echo", &program)?;
    let program = program.to_str().context("utf-8 path")?.to_owned();
    let mut hashes = Vec::new();
    for round in 0..3 {
        if round == 2 {
            use std::io::Write as _;
            std::fs::OpenOptions::new()
                .append(true)
                .open(&program)?
                .write_all(b"changed in place")?;
        }
        let marker = marker_for(&format!("inplace{round}"));
        run_in_cgroup(&cgroup, &program, &[&marker])?;
        let row = wait_for_exec(&stack, &marker, Duration::from_secs(5)).await?;
        assert_eq!(row.exe_sha256, sha256_of(&program)?, "round {round}");
        hashes.push(row.exe_sha256);
    }
    assert_eq!(hashes[0], hashes[1], "the same file, the same hash");
    assert_ne!(hashes[1], hashes[2], "the changed binary's own hash");
    Ok(())
}

/// The collector is down when the process runs: the agent keeps running,
/// keeps the event, retries with backoff, and delivers once it is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_keeps_events_while_collector_is_down() -> Result<()> {
    let started = Instant::now();
    let stack = Stack::new("e2e_outage").await?;
    // Enrolled while the collector runs, started while it is down.
    stack.enroll_agent_then_stop_collector("agent").await?;
    let mut agent = stack.start_agent().await?;
    let cgroup = TestCgroup::create("outage")?;

    let marker = marker_for("outage");
    let (pid, _) = run_in_cgroup(&cgroup, "/bin/echo", &[&marker])?;
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
    let row = wait_for_exec(&stack, &marker, Duration::from_secs(15)).await?;
    assert_eq!(row.pid, pid);
    assert_echo_arrives(&stack, &cgroup, started, Duration::from_secs(5)).await?;

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

/// The collector is down long enough for the agent's queue to overflow: the
/// events it had to drop are reported as gap records once the collector is
/// back, and they add up to what the agent counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_overflow_while_collector_is_down_is_reported_as_gaps() -> Result<()> {
    let stack = Stack::new("e2e_overflow").await?;
    stack.enroll_agent_then_stop_collector("agent").await?;
    let mut agent = stack
        .start_agent_named(
            "agent",
            &[
                ("ZT_AGENT_UPLINK__BUFFER_MAX_EVENTS", "20".to_owned()),
                ("ZT_AGENT_UPLINK__BATCH_MAX_EVENTS", "10".to_owned()),
                // The memory queue alone (the disk spool's fallback); the
                // spool's own overflow is tested in tests/spool.rs.
                ("ZT_AGENT_SPOOL__ENABLED", "false".to_owned()),
            ],
        )
        .await?;
    let cgroup = TestCgroup::create("overflow")?;
    // Each run is a fork, an exec and an exit: 90 critical events for 20 places.
    for _ in 0..30 {
        run_in_cgroup(&cgroup, "/bin/true", &[])?;
    }
    agent
        .wait_for_log("event queue full", Duration::from_secs(10))
        .await?;

    let _collector = stack.start_collector().await?;
    #[derive(Debug, clickhouse::Row, serde::Deserialize)]
    struct Lost {
        lost: u64,
    }
    let reported = eventually(Duration::from_secs(15), || async {
        let rows = stack
            .db()
            .query("SELECT sum(lost) AS lost FROM gaps WHERE reason = 'queue_full' AND stream = 'critical'")
            .fetch_one::<Lost>()
            .await
            .ok()?;
        (rows.lost >= 70).then_some(rows.lost)
    })
    .await
    .with_context(|| format!("no queue_full gap records\n{}", stack.logs()))?;

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let status = agent
        .terminate(Duration::from_secs(15))
        .context("agent did not stop")?;
    assert!(status.success());
    let log = agent.log();
    let dropped: u64 = agent.final_counter("dropped_queue_full")?;
    let total = stack
        .db()
        .query("SELECT sum(lost) FROM gaps WHERE reason = 'queue_full'")
        .fetch_one::<u64>()
        .await?;
    assert!(reported >= 70);
    if log.contains("stopping before the collector acknowledged everything") {
        // Under heavy load the stop's bounded drain may leave the last
        // records unsent; what arrived never exceeds what was counted.
        assert!(total <= dropped, "{total} reported > {dropped} dropped");
    } else {
        assert_eq!(
            total,
            dropped,
            "every drop of the queue is in a gap record\n{}",
            stack.logs()
        );
    }
    Ok(())
}
