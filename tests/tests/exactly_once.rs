//! Nothing lost, nothing twice, with the real processes: while a workload
//! execs steadily, the collector is killed (SIGKILL, mid-stream, batches in
//! flight) and restarted, then ClickHouse is stopped for 30 s and started
//! again. Every exec the workload made is stored, and each exactly once.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use zt_e2e::{
    cgroup::TestCgroup,
    eventually,
    stack::{marker_for, spawn_in_cgroup, Stack},
};

/// Execs `/bin/echo <marker>-<i>` for i in 1..=N, 20 per second.
const WORKLOAD: &str = r#"
i=1
while [ $i -le "$2" ]; do
  /bin/echo "$1-$i" > /dev/null
  i=$((i + 1))
  sleep 0.05
done
"#;

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Counts {
    rows: u64,
    events: u64,
    markers: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_killed_and_clickhouse_stopped_lose_nothing_and_duplicate_nothing() -> Result<()>
{
    const EXECS: u32 = 1000;
    let mut stack = Stack::new("e2e_exactly_once").await?;
    let mut collector = stack.start_collector().await?;
    let mut agent = stack.start_agent().await?;
    let cgroup = TestCgroup::create("exactly-once")?;
    let marker = marker_for("once");
    let mut workload = spawn_in_cgroup(
        &cgroup,
        "/bin/sh",
        &["-c", WORKLOAD, "sh", &marker, &EXECS.to_string()],
    )?;

    // Mid-stream: the agent has batches in flight when the collector dies.
    tokio::time::sleep(Duration::from_secs(8)).await;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(collector.pid() as i32, libc::SIGKILL) };
    collector
        .terminate(Duration::from_secs(5))
        .context("killed collector did not exit")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _collector = stack.start_collector().await?;

    // Then the store goes away for 30 s: the collector holds and retries,
    // the agent spools.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stack.clickhouse.stop();
    tokio::time::sleep(Duration::from_secs(30)).await;
    stack.clickhouse.restart().await?;

    let status = tokio::task::spawn_blocking(move || workload.wait()).await??;
    ensure!(status.success(), "workload failed: {status}");
    ensure!(
        agent.exited().is_none(),
        "the agent must ride out both outages:\n{}",
        agent.log()
    );

    let cgroup_id = cgroup.id()?;
    let like = format!("{marker}-%");
    let counts = eventually(Duration::from_secs(60), || async {
        let counts = stack
            .db()
            .query(
                "SELECT count() AS rows, uniqExact(boot_id, seq) AS events, \
                 uniqExact(arrayElement(argv, 2)) AS markers \
                 FROM process_events FINAL \
                 WHERE event_type = 'exec' AND cgroup_id = ? AND arrayElement(argv, 2) LIKE ?",
            )
            .bind(cgroup_id)
            .bind(&like)
            .fetch_one::<Counts>()
            .await
            .ok()?;
        (counts.markers >= u64::from(EXECS)).then_some(counts)
    })
    .await
    .with_context(|| format!("not every exec arrived\n{}", stack.logs()))?;
    assert_eq!(counts.markers, u64::from(EXECS), "every exec is stored");
    assert_eq!(counts.events, u64::from(EXECS), "once each");
    assert_eq!(
        counts.rows, counts.events,
        "read with FINAL, no event is there twice"
    );
    // Physically too, once ClickHouse has merged the copies of resent batches.
    stack
        .db()
        .query("OPTIMIZE TABLE process_events FINAL")
        .execute()
        .await?;
    let physical: u64 = stack
        .db()
        .query(
            "SELECT count() FROM process_events \
             WHERE event_type = 'exec' AND cgroup_id = ? AND arrayElement(argv, 2) LIKE ?",
        )
        .bind(cgroup_id)
        .bind(&like)
        .fetch_one()
        .await?;
    assert_eq!(physical, u64::from(EXECS));
    // No loss was reported either: both outages cost nothing.
    let lost: u64 = stack
        .db()
        .query("SELECT sum(lost) FROM gaps FINAL WHERE stream = 'critical'")
        .fetch_one()
        .await?;
    assert_eq!(lost, 0, "critical events reported lost");
    Ok(())
}
