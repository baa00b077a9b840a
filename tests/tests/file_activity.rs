//! File sensor end to end: writes, chmod, rename and unlink under watched
//! prefixes and reads of watched secrets arrive in `zt.file_events`, while
//! unwatched activity does not; a flood of file events overflows the bulk
//! ring buffer without costing a single critical (exec) event, and the loss
//! arrives in `zt.gaps`.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use zt_e2e::{
    cgroup::TestCgroup,
    eventually,
    stack::{marker_for, run_in_cgroup, spawn_in_cgroup, Stack},
};

#[derive(Debug, Clone, clickhouse::Row, serde::Deserialize)]
struct FileRow {
    action: String,
    pid: u32,
    exe: String,
    path: String,
    target_path: String,
    mode: u32,
    open_flags: u32,
    ancestor_pids: Vec<u32>,
}

async fn file_rows(stack: &Stack, cgroup_id: u64) -> Vec<FileRow> {
    stack
        .db()
        .query("SELECT ?fields FROM file_events WHERE cgroup_id = ? ORDER BY time_ns, seq")
        .bind(cgroup_id)
        .fetch_all::<FileRow>()
        .await
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_file_activity_is_recorded_and_unwatched_is_not() -> Result<()> {
    let stack = Stack::new("e2e_files").await?;
    let _collector = stack.start_collector().await?;
    let _agent = stack.start_agent().await?;
    let cgroup = TestCgroup::create("files")?;
    let cgroup_id = cgroup.id()?;

    // /tmp/ is watched for writes (droppers), /etc/shadow for reads.
    let dir = tempfile::Builder::new()
        .prefix(&marker_for("dir"))
        .tempdir_in("/tmp")?;
    let d = dir.path().display().to_string();
    let script = format!(
        "echo payload > {d}/a.sh && chmod 4755 {d}/a.sh && mv {d}/a.sh {d}/b.sh \
         && cat {d}/b.sh > /dev/null && cat /etc/shadow > /dev/null && rm {d}/b.sh"
    );
    let (sh_pid, status) = run_in_cgroup(&cgroup, "/bin/sh", &["-c", &script])?;
    ensure!(status.success(), "script failed");

    let rows = eventually(Duration::from_secs(10), || async {
        let rows = file_rows(&stack, cgroup_id).await;
        rows.iter().any(|r| r.action == "unlink").then_some(rows)
    })
    .await
    .with_context(|| format!("file rows did not arrive\n{}", stack.logs()))?;
    let mine: Vec<&FileRow> = rows
        .iter()
        .filter(|r| r.path.starts_with(&d) || r.path == "/etc/shadow")
        .collect();
    let find = |action: &str, path: &str| -> Result<FileRow> {
        let found: Vec<&&FileRow> = mine
            .iter()
            .filter(|r| r.action == action && r.path == path)
            .collect();
        ensure!(
            found.len() == 1,
            "one {action} of {path} expected: {mine:#?}"
        );
        Ok((*found[0]).clone())
    };

    let write = find("open_write", &format!("{d}/a.sh"))?;
    assert_eq!(write.pid, sh_pid, "the shell's redirection opened it");
    assert_eq!(write.exe, "/bin/sh");
    assert_ne!(write.open_flags & 0o100, 0, "O_CREAT");
    assert_eq!(write.ancestor_pids.first(), Some(&std::process::id()));

    let chmod = find("chmod", &format!("{d}/a.sh"))?;
    assert_eq!(chmod.mode, 0o4755, "the setuid bit is visible");
    assert!(chmod.exe.ends_with("/chmod"), "{chmod:?}");
    assert_eq!(chmod.ancestor_pids.first(), Some(&sh_pid));

    let rename = find("rename", &format!("{d}/a.sh"))?;
    assert_eq!(rename.target_path, format!("{d}/b.sh"));
    assert!(rename.exe.ends_with("/mv"), "{rename:?}");

    let shadow = find("open_read", "/etc/shadow")?;
    assert!(shadow.exe.ends_with("/cat"), "{shadow:?}");

    find("unlink", &format!("{d}/b.sh"))?;
    assert!(
        !mine
            .iter()
            .any(|r| r.action == "open_read" && r.path.starts_with(&d)),
        "reads under /tmp are not watched: {mine:#?}"
    );
    Ok(())
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct LostByStream {
    stream: String,
    lost: u64,
}

/// 20,000 watched opens at full speed into an 8 KiB bulk ring buffer, while
/// 50 processes exec: every exec arrives, the file flood loses events, and
/// the loss is accounted for in `zt.gaps` as the kernel counted it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_flood_never_costs_an_exec_and_its_loss_is_recorded() -> Result<()> {
    const OPENS: u64 = 20_000;
    const EXECS: usize = 50;
    let stack = Stack::new("e2e_flood").await?;
    let _collector = stack.start_collector().await?;
    let mut agent = stack
        .start_agent_named(
            "agent",
            &[("ZT_AGENT_SENSORS__BULK_RING_BYTES", "8192".to_owned())],
        )
        .await?;
    let cgroup = TestCgroup::create("flood")?;
    let cgroup_id = cgroup.id()?;

    let dir = tempfile::Builder::new()
        .prefix(&marker_for("flood"))
        .tempdir_in("/tmp")?;
    let target = dir.path().join("f");
    let flood = format!(
        "p = {:?}\nfor _ in range({OPENS}):\n    open(p, 'w').close()\n",
        target.display().to_string()
    );
    let mut flooder = spawn_in_cgroup(&cgroup, "/usr/bin/python3", &["-c", &flood])?;
    let marker = marker_for("exec");
    for _ in 0..EXECS {
        let (_, status) = run_in_cgroup(&cgroup, "/bin/echo", &[&marker])?;
        ensure!(status.success());
    }
    ensure!(flooder.wait()?.success(), "flooder failed");

    let execs = eventually(Duration::from_secs(15), || async {
        let n = stack
            .db()
            .query("SELECT count() FROM process_events WHERE event_type = 'exec' AND has(argv, ?)")
            .bind(&marker)
            .fetch_one::<u64>()
            .await
            .ok()?;
        (n == EXECS as u64).then_some(n)
    })
    .await;
    ensure!(
        execs.is_some(),
        "not every exec arrived during the flood\n{}",
        stack.logs()
    );

    // Let the drop counters be read (every second), then stop the agent and
    // take the total it read from the kernel.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let status = agent
        .terminate(Duration::from_secs(20))
        .context("agent did not stop")?;
    ensure!(status.success());
    let kernel_drops: u64 = agent.final_counter("kernel_drops")?;

    let lost = stack
        .db()
        .query("SELECT stream, sum(lost) AS lost FROM gaps WHERE reason = 'ring_full' GROUP BY stream ORDER BY stream")
        .fetch_all::<LostByStream>()
        .await?;
    let bulk_lost: u64 = lost
        .iter()
        .filter(|l| l.stream == "bulk")
        .map(|l| l.lost)
        .sum();
    let critical_lost: u64 = lost
        .iter()
        .filter(|l| l.stream == "critical")
        .map(|l| l.lost)
        .sum();
    assert_eq!(critical_lost, 0, "no critical event lost: {lost:?}");
    assert!(
        bulk_lost > 0,
        "an 8 KiB ring cannot take the flood: {lost:?}"
    );
    assert_eq!(
        bulk_lost, kernel_drops,
        "gap records account for every kernel drop"
    );

    let stored = stack
        .db()
        .query("SELECT count() FROM file_events WHERE cgroup_id = ? AND path = ?")
        .bind(cgroup_id)
        .bind(target.display().to_string())
        .fetch_one::<u64>()
        .await?;
    assert!(stored < OPENS, "some opens were lost ({stored} stored)");
    assert!(
        stored + bulk_lost >= OPENS,
        "every open is either stored or counted lost: {stored} stored + {bulk_lost} lost < {OPENS}"
    );
    Ok(())
}

/// Over its CPU budget the agent samples file events — never execs — and
/// says so: the kernel's sampling counts arrive as gap records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_its_cpu_budget_the_agent_samples_file_events_and_records_it() -> Result<()> {
    const EXECS: usize = 20;
    let stack = Stack::new("e2e_budget").await?;
    let _collector = stack.start_collector().await?;
    let mut agent = stack
        .start_agent_named(
            "agent",
            &[
                ("ZT_AGENT_BUDGET__CPU_PERCENT", "0.5".to_owned()),
                ("ZT_AGENT_BUDGET__INTERVAL_MS", "200".to_owned()),
            ],
        )
        .await?;
    let cgroup = TestCgroup::create("budget")?;
    let cgroup_id = cgroup.id()?;

    // Watched opens for 4 seconds; prints how many.
    let dir = tempfile::Builder::new()
        .prefix(&marker_for("budget"))
        .tempdir_in("/tmp")?;
    let target = dir.path().join("f");
    let flood = format!(
        "import time\np = {:?}\nn = 0\nend = time.time() + 4\nwhile time.time() < end:\n    for _ in range(100):\n        open(p, 'w').close()\n    n += 100\nprint(n, flush=True)\n",
        target.display().to_string()
    );
    let flooder = zt_e2e::stack::spawn_in_cgroup_with(
        &cgroup,
        "/usr/bin/python3",
        &["-c", &flood],
        std::process::Stdio::piped(),
    )?;
    let marker = marker_for("exec");
    for _ in 0..EXECS {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (_, status) = run_in_cgroup(&cgroup, "/bin/echo", &[&marker])?;
        ensure!(status.success());
    }
    let output = flooder.wait_with_output()?;
    ensure!(output.status.success(), "flooder failed");
    let opens: u64 = String::from_utf8(output.stdout)?.trim().parse()?;

    let execs = eventually(Duration::from_secs(15), || async {
        let n = stack
            .db()
            .query("SELECT count() FROM process_events WHERE event_type = 'exec' AND has(argv, ?)")
            .bind(&marker)
            .fetch_one::<u64>()
            .await
            .ok()?;
        (n == EXECS as u64).then_some(n)
    })
    .await;
    ensure!(execs.is_some(), "execs are never sampled\n{}", stack.logs());
    ensure!(
        agent.log().contains("over self-budget"),
        "the agent did not notice it was over budget:\n{}",
        agent.log()
    );

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let status = agent
        .terminate(Duration::from_secs(20))
        .context("agent did not stop")?;
    ensure!(status.success());
    let sampled = agent.final_counter("bulk_sampled")?;
    assert!(sampled > 0, "sampling left nothing out");

    let lost = stack
        .db()
        .query("SELECT stream, sum(lost) AS lost FROM gaps WHERE reason = 'sampled' GROUP BY stream ORDER BY stream")
        .fetch_all::<LostByStream>()
        .await?;
    assert_eq!(lost.len(), 1, "only the bulk stream is sampled: {lost:?}");
    assert_eq!(lost[0].stream, "bulk");
    assert_eq!(
        lost[0].lost, sampled,
        "gap records account for every sampled event"
    );

    let ring_lost = stack
        .db()
        .query("SELECT sum(lost) FROM gaps WHERE stream = 'bulk' AND reason = 'ring_full'")
        .fetch_one::<u64>()
        .await?;
    let stored = stack
        .db()
        .query("SELECT count() FROM file_events WHERE cgroup_id = ? AND path = ?")
        .bind(cgroup_id)
        .bind(target.display().to_string())
        .fetch_one::<u64>()
        .await?;
    assert!(
        stored < opens,
        "sampling kept fewer than all {opens} opens ({stored})"
    );
    assert!(
        stored + sampled + ring_lost >= opens,
        "every open is stored, sampled or lost: {stored} + {sampled} + {ring_lost} < {opens}"
    );
    Ok(())
}
