//! The agent's disk spool end to end: events survive an agent restart while
//! the collector is down and arrive once, under the boot id of the run that
//! saw them; a spool too small for an outage drops bulk (file) events first,
//! reports exactly what it dropped as gap records, and keeps every exec.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use zt_e2e::{
    cgroup::TestCgroup,
    eventually,
    process::Process,
    stack::{marker_for, run_in_cgroup, Stack},
};

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct ExecRow {
    boot_id: String,
    seq: u64,
    pid: u32,
}

async fn exec_rows(stack: &Stack, marker: &str) -> Vec<ExecRow> {
    stack
        .db()
        .query("SELECT ?fields FROM process_events WHERE event_type = 'exec' AND has(argv, ?)")
        .bind(marker)
        .fetch_all::<ExecRow>()
        .await
        .unwrap_or_default()
}

/// The boot id an agent logged at start (`agent identity ... boot_id=<id>`).
fn boot_id(agent: &Process) -> Result<String> {
    let log = agent.log();
    log.lines()
        .filter(|l| l.contains("agent identity"))
        .find_map(|l| l.split("boot_id=").nth(1)?.split_whitespace().next())
        .map(|id| id.trim_matches('"').to_owned())
        .with_context(|| format!("no boot_id in the agent's log:\n{log}"))
}

/// A number from the agent's log line containing `message`, e.g.
/// `dropped_spool_full=12`.
fn logged_number(agent: &Process, message: &str, name: &str) -> Result<u64> {
    let log = agent.log();
    log.lines()
        .rev()
        .filter(|l| l.contains(message))
        .find_map(|l| {
            l.split(&format!("{name}="))
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no {name} in a {message:?} line:\n{log}"))
}

/// Waits until each marker's exec is stored; returns the rows per marker.
async fn wait_for_execs(
    stack: &Stack,
    markers: &[String],
    limit: Duration,
) -> Result<Vec<Vec<ExecRow>>> {
    eventually(limit, || async {
        let mut all = Vec::new();
        for marker in markers {
            let rows = exec_rows(stack, marker).await;
            if rows.is_empty() {
                return None;
            }
            all.push(rows);
        }
        Some(all)
    })
    .await
    .with_context(|| format!("not every exec arrived within {limit:?}\n{}", stack.logs()))
}

/// Collector down; processes exec; the agent is stopped and started again
/// (same state directory); then the collector comes: every exec from before
/// the restart arrives exactly once, with the first run's boot id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_spooled_before_an_agent_restart_arrive_once_with_their_boot_id() -> Result<()> {
    restart_while_collector_is_down("e2e_spool_restart", false).await
}

/// The same with the agent killed (SIGKILL) instead of stopped: what was
/// spooled more than `fsync_interval_ms` before the kill survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_spooled_before_an_agent_crash_arrive_once_with_their_boot_id() -> Result<()> {
    restart_while_collector_is_down("e2e_spool_crash", true).await
}

async fn restart_while_collector_is_down(name: &str, kill: bool) -> Result<()> {
    let stack = Stack::new(name).await?;
    stack.enroll_agent_then_stop_collector("agent").await?;
    let mut first = stack.start_agent().await?;
    let first_boot = boot_id(&first)?;
    let cgroup = TestCgroup::create(name)?;

    let before: Vec<String> = (0..5).map(|i| marker_for(&format!("before{i}"))).collect();
    let mut pids = Vec::new();
    for marker in &before {
        pids.push(run_in_cgroup(&cgroup, "/bin/echo", &[marker])?.0);
    }
    first
        .wait_for_log("collector unreachable", Duration::from_secs(10))
        .await?;
    // Past the channel and into the spool.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if kill {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(first.pid() as i32, libc::SIGKILL) };
        // Reaped by the harness; the next agent must not race the old one.
        zt_e2e::eventually(Duration::from_secs(10), || {
            let exited = first.exited().is_some();
            async move { exited.then_some(()) }
        })
        .await
        .context("killed agent did not exit")?;
    } else {
        let status = first
            .terminate(Duration::from_secs(20))
            .context("agent did not stop")?;
        ensure!(status.success(), "agent exit {status}:\n{}", first.log());
        ensure!(
            first.log().contains("spool closed"),
            "the spool is closed at stop:\n{}",
            first.log()
        );
    }

    let mut second = stack.start_agent_named("agent", &[]).await?;
    let second_boot = boot_id(&second)?;
    ensure!(first_boot != second_boot, "every run has its own boot id");
    // The second run finds the spooled events.
    second
        .wait_for_log("replaying them", Duration::from_secs(10))
        .await?;
    let after = marker_for("after");
    run_in_cgroup(&cgroup, "/bin/echo", &[&after])?;

    let _collector = stack.start_collector().await?;
    let rows = wait_for_execs(&stack, &before, Duration::from_secs(20)).await?;
    for ((marker, rows), pid) in before.iter().zip(&rows).zip(&pids) {
        ensure!(
            rows.len() == 1,
            "{marker}: exactly one row expected: {rows:?}"
        );
        ensure!(rows[0].pid == *pid, "{marker}: pid {:?}", rows[0]);
        ensure!(
            rows[0].boot_id == first_boot,
            "{marker}: stored under boot {} instead of the first run's {first_boot}",
            rows[0].boot_id
        );
        ensure!(rows[0].seq > 0);
    }
    let after_rows = wait_for_execs(
        &stack,
        std::slice::from_ref(&after),
        Duration::from_secs(10),
    )
    .await?
    .remove(0);
    ensure!(
        after_rows.len() == 1 && after_rows[0].boot_id == second_boot,
        "the exec after the restart belongs to the second run: {after_rows:?}"
    );
    let status = second
        .terminate(Duration::from_secs(20))
        .context("agent did not stop")?;
    ensure!(status.success(), "agent exit {status}");
    Ok(())
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Lost {
    lost: u64,
}

async fn lost(stack: &Stack, reason: &str, stream: &str) -> Option<u64> {
    stack
        .db()
        .query("SELECT sum(lost) AS lost FROM gaps WHERE reason = ? AND stream = ?")
        .bind(reason)
        .bind(stream)
        .fetch_one::<Lost>()
        .await
        .ok()
        .map(|l| l.lost)
}

/// A spool of 4 MiB overflows with file events while the collector is
/// down: bulk events go, the gap records add up to what the agent dropped,
/// and every exec arrives. (The exec sensor sees the whole machine: the
/// spool must hold its critical events for the test's outage, about ten
/// seconds, even while other tests and builds run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_drops_bulk_first_and_reports_exact_gaps() -> Result<()> {
    let stack = Stack::new("e2e_spool_full").await?;
    stack.enroll_agent_then_stop_collector("agent").await?;
    let mut agent = stack
        .start_agent_named(
            "agent",
            &[
                ("ZT_AGENT_SPOOL__MAX_BYTES", (4 << 20).to_string()),
                ("ZT_AGENT_SPOOL__SEGMENT_BYTES", (256 << 10).to_string()),
            ],
        )
        .await?;
    let cgroup = TestCgroup::create("spool-full")?;
    let dir = tempfile::Builder::new()
        .prefix(&marker_for("spooldir"))
        .tempdir_in("/tmp")?;

    let mut markers = Vec::new();
    let mut exec = |name: &str| -> Result<()> {
        let marker = marker_for(name);
        run_in_cgroup(&cgroup, "/bin/echo", &[&marker])?;
        markers.push(marker);
        Ok(())
    };
    for i in 0..5 {
        exec(&format!("early{i}"))?;
    }
    // 60,000 watched writes: far more file events than the spool holds.
    let script = format!(
        "i=0; while [ $i -lt 60000 ]; do : > {d}/f$((i % 50)); i=$((i + 1)); done",
        d = dir.path().display()
    );
    let (_, status) = run_in_cgroup(&cgroup, "/bin/sh", &["-c", &script])?;
    ensure!(status.success(), "file flood failed");
    for i in 0..5 {
        exec(&format!("late{i}"))?;
    }
    agent
        .wait_for_log("spool full", Duration::from_secs(20))
        .await?;

    let _collector = stack.start_collector().await?;
    let rows = wait_for_execs(&stack, &markers, Duration::from_secs(30)).await?;
    for (marker, rows) in markers.iter().zip(&rows) {
        ensure!(rows.len() == 1, "{marker}: one row expected: {rows:?}");
    }
    eventually(Duration::from_secs(15), || async {
        lost(&stack, "spool_full", "bulk").await.filter(|l| *l > 0)
    })
    .await
    .with_context(|| format!("no spool_full gap records\n{}", stack.logs()))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = agent
        .terminate(Duration::from_secs(20))
        .context("agent did not stop")?;
    ensure!(status.success(), "agent exit {status}");

    let dropped = logged_number(&agent, "spool closed", "dropped_spool_full")?;
    let dropped_critical = logged_number(&agent, "spool closed", "dropped_spool_full_critical")?;
    ensure!(dropped > 0, "the spool overflowed");
    ensure!(
        dropped_critical == 0,
        "no critical event dropped: {dropped_critical}"
    );
    let reported = eventually(Duration::from_secs(10), || async {
        lost(&stack, "spool_full", "bulk")
            .await
            .filter(|l| *l == dropped)
    })
    .await;
    let bulk = lost(&stack, "spool_full", "bulk").await;
    let critical = lost(&stack, "spool_full", "critical").await;
    ensure!(
        reported == Some(dropped),
        "gap records report {bulk:?} bulk events lost, the agent dropped {dropped}\n{}",
        agent.log()
    );
    ensure!(
        critical == Some(0),
        "no critical loss reported: {critical:?}"
    );
    Ok(())
}

/// Bytes of a spool segment are damaged while the agent is stopped: at the
/// next start the damaged records are skipped and reported as a
/// `spool_corrupt` gap, and every record after them is still delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_spool_segment_loses_only_the_damaged_records() -> Result<()> {
    let stack = Stack::new("e2e_spool_corrupt").await?;
    stack.enroll_agent_then_stop_collector("agent").await?;
    let mut first = stack.start_agent().await?;
    let cgroup = TestCgroup::create("spool-corrupt")?;
    let markers: Vec<String> = (0..40).map(|i| marker_for(&format!("c{i}"))).collect();
    for marker in &markers {
        run_in_cgroup(&cgroup, "/bin/echo", &[marker])?;
    }
    first
        .wait_for_log("collector unreachable", Duration::from_secs(10))
        .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = first
        .terminate(Duration::from_secs(20))
        .context("agent did not stop")?;
    ensure!(status.success(), "agent exit {status}:\n{}", first.log());

    // Damage 16 bytes in the middle of the biggest critical segment.
    let dir = stack.agent_state("agent").join("spool/critical");
    let segment = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .with_context(|| format!("no segment in {}", dir.display()))?;
    let mut bytes = std::fs::read(&segment)?;
    ensure!(bytes.len() > 4096, "segment too small: {}", bytes.len());
    let middle = bytes.len() / 2;
    bytes[middle..middle + 16].fill(0xa5);
    std::fs::write(&segment, &bytes)?;

    let _collector = stack.start_collector().await?;
    let second = stack.start_agent().await?;
    // The last exec was spooled after the damage: it arrives.
    let last = markers.last().context("markers")?.clone();
    wait_for_execs(&stack, &[last], Duration::from_secs(20)).await?;

    #[derive(Debug, clickhouse::Row, serde::Deserialize)]
    struct Lost {
        records: u64,
        lost: u64,
    }
    let corrupt = eventually(Duration::from_secs(15), || async {
        let lost = stack
            .db()
            .query("SELECT count() AS records, sum(lost) AS lost FROM gaps WHERE reason = 'spool_corrupt' AND stream = 'critical'")
            .fetch_one::<Lost>()
            .await
            .ok()?;
        (lost.records > 0).then_some(lost)
    })
    .await
    .with_context(|| format!("no spool_corrupt gap\n{}", stack.logs()))?;
    assert!(corrupt.lost >= 1, "{corrupt:?}");
    let mut arrived = 0u64;
    for marker in &markers {
        arrived += u64::from(!exec_rows(&stack, marker).await.is_empty());
    }
    assert!(
        arrived + corrupt.lost >= markers.len() as u64,
        "{arrived} of {} execs arrived, {} reported lost",
        markers.len(),
        corrupt.lost
    );
    assert!(
        second.log().contains("corrupt"),
        "the agent says so:\n{}",
        second.log()
    );
    Ok(())
}
