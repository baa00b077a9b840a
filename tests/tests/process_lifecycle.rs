//! Process sensors end to end: fork, exec and exit of real processes in a
//! test cgroup arrive in `zt.process_events` with their ancestry; the table
//! is re-seeded from /proc when the agent restarts; kernel losses arrive in
//! `zt.gaps` with the counts the kernel counted.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use zt_e2e::{
    cgroup::TestCgroup,
    eventually,
    stack::{marker_for, run_in_cgroup, spawn_in_cgroup, Stack},
};

#[derive(Debug, Clone, clickhouse::Row, serde::Deserialize)]
struct ProcessRow {
    event_type: String,
    pid: u32,
    ppid: u32,
    euid: u32,
    egid: u32,
    loginuid: u32,
    exe: String,
    filename: String,
    argv: Vec<String>,
    exit_status: i16,
    exit_signal: u8,
    lifetime_ns: u64,
    process_start_ns: u64,
    ancestor_pids: Vec<u32>,
    ancestor_exes: Vec<String>,
}

const LIMIT: Duration = Duration::from_secs(10);

/// Rows of `event_type` for `pid` in the test's cgroup.
async fn rows_of(stack: &Stack, cgroup_id: u64, event_type: &str, pid: u32) -> Vec<ProcessRow> {
    stack
        .db()
        .query(
            "SELECT ?fields FROM process_events WHERE cgroup_id = ? AND event_type = ? AND pid = ?",
        )
        .bind(cgroup_id)
        .bind(event_type)
        .bind(pid)
        .fetch_all::<ProcessRow>()
        .await
        .unwrap_or_default()
}

async fn one_row(stack: &Stack, cgroup_id: u64, event_type: &str, pid: u32) -> Result<ProcessRow> {
    let rows = eventually(LIMIT, || async {
        Some(rows_of(stack, cgroup_id, event_type, pid).await).filter(|rows| !rows.is_empty())
    })
    .await
    .with_context(|| format!("no {event_type} row for pid {pid}\n{}", stack.logs()))?;
    ensure!(
        rows.len() == 1,
        "one {event_type} row for pid {pid}: {rows:?}"
    );
    Ok(rows[0].clone())
}

async fn exec_with_marker(stack: &Stack, marker: &str) -> Result<ProcessRow> {
    let rows = eventually(LIMIT, || async {
        stack
            .db()
            .query("SELECT ?fields FROM process_events WHERE event_type = 'exec' AND has(argv, ?)")
            .bind(marker)
            .fetch_all::<ProcessRow>()
            .await
            .ok()
            .filter(|rows| !rows.is_empty())
    })
    .await
    .with_context(|| format!("no exec row with {marker}\n{}", stack.logs()))?;
    ensure!(rows.len() == 1, "one exec row with {marker}: {rows:?}");
    Ok(rows[0].clone())
}

fn loginuid_of_this_process() -> u32 {
    std::fs::read_to_string("/proc/self/loginuid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u32::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_exec_exit_arrive_with_ancestry() -> Result<()> {
    let stack = Stack::new("e2e_lifecycle").await?;
    let _collector = stack.start_collector().await?;
    let _agent = stack.start_agent().await?;
    let cgroup = TestCgroup::create("lifecycle")?;
    let cgroup_id = cgroup.id()?;
    let test_pid = std::process::id();

    // The shell forks and execs echo, then exits with 7.
    let marker = marker_for("lifecycle");
    let script = format!("/bin/echo {marker}; exit 7");
    let (sh_pid, status) = run_in_cgroup(&cgroup, "/bin/sh", &["-c", &script])?;
    assert_eq!(status.code(), Some(7));

    let echo = exec_with_marker(&stack, &marker).await?;
    assert_eq!(echo.event_type, "exec");
    assert_eq!(echo.filename, "/bin/echo");
    assert_eq!(echo.exe, "/bin/echo");
    assert_eq!(echo.argv, ["/bin/echo", marker.as_str()]);
    assert_eq!(echo.ppid, sh_pid);
    assert_eq!(
        echo.ancestor_pids.first(),
        Some(&sh_pid),
        "parent first: {echo:?}"
    );
    assert_eq!(
        echo.ancestor_exes.first().map(String::as_str),
        Some("/bin/sh")
    );
    assert_eq!(
        echo.ancestor_pids.get(1),
        Some(&test_pid),
        "grandparent is the test: {echo:?}"
    );
    assert_eq!(
        echo.ancestor_pids.last(),
        Some(&1),
        "the chain ends at pid 1: {echo:?}"
    );
    assert_eq!(echo.ancestor_pids.len(), echo.ancestor_exes.len());
    // SAFETY: plain syscalls without arguments.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    assert_eq!((echo.euid, echo.egid), (euid, egid));
    assert_eq!(echo.loginuid, loginuid_of_this_process());
    assert!(echo.process_start_ns > 0);

    // The fork that made echo's process: a child of the shell, running the
    // shell's program until it execs.
    let fork = one_row(&stack, cgroup_id, "fork", echo.pid).await?;
    assert_eq!(fork.event_type, "fork");
    assert!(fork.argv.is_empty() && fork.filename.is_empty());
    assert_eq!(fork.ppid, sh_pid);
    assert_eq!(fork.exe, "/bin/sh");
    assert_eq!(fork.ancestor_pids.first(), Some(&sh_pid));

    // Exits: echo with 0, the shell with 7, each with its lifetime.
    let echo_exit = one_row(&stack, cgroup_id, "exit", echo.pid).await?;
    assert_eq!((echo_exit.exit_status, echo_exit.exit_signal), (0, 0));
    assert_eq!(echo_exit.exe, "/bin/echo");
    let sh_exit = one_row(&stack, cgroup_id, "exit", sh_pid).await?;
    assert_eq!((sh_exit.exit_status, sh_exit.exit_signal), (7, 0));
    assert_eq!(sh_exit.exe, "/bin/sh");
    assert_eq!(sh_exit.ppid, test_pid);
    assert!(sh_exit.lifetime_ns > 0 && sh_exit.lifetime_ns < 10_000_000_000);
    assert!(
        sh_exit.lifetime_ns >= echo_exit.lifetime_ns,
        "the shell outlived its child"
    );

    // A process killed by a signal.
    let mut sleeper = spawn_in_cgroup(&cgroup, "/bin/sleep", &["30"])?;
    let sleeper_pid = sleeper.id();
    sleeper.kill()?;
    sleeper.wait()?;
    let killed = one_row(&stack, cgroup_id, "exit", sleeper_pid).await?;
    assert_eq!((killed.exit_status, killed.exit_signal), (-1, 9));
    Ok(())
}

/// A process that started before the agent gets its ancestry from the
/// /proc snapshot the restarted agent takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_reseeds_ancestry_from_proc() -> Result<()> {
    let stack = Stack::new("e2e_reseed").await?;
    let _collector = stack.start_collector().await?;
    let mut first = stack.start_agent().await?;
    first
        .terminate(Duration::from_secs(15))
        .context("first agent did not stop")?;

    // Started while no agent runs; it execs echo once `go` exists.
    let cgroup = TestCgroup::create("reseed")?;
    let go = stack.dir.path().join("go");
    let marker = marker_for("reseed");
    let script = format!(
        "while [ ! -e {go} ]; do sleep 0.05; done; /bin/echo {marker}",
        go = go.display()
    );
    let mut waiting = spawn_in_cgroup(&cgroup, "/bin/sh", &["-c", &script])?;
    let sh_pid = waiting.id();
    let sh_exe = std::fs::read_link(format!("/proc/{sh_pid}/exe"))?;

    let _second = stack.start_agent_named("agent-restarted", &[]).await?;
    std::fs::write(&go, b"")?;
    waiting.wait()?;

    let echo = exec_with_marker(&stack, &marker).await?;
    assert_eq!(echo.ancestor_pids.first(), Some(&sh_pid), "{echo:?}");
    assert_eq!(
        echo.ancestor_exes.first().map(String::as_str),
        Some(sh_exe.to_string_lossy().as_ref()),
        "the seeded parent's executable"
    );
    assert_eq!(echo.ancestor_pids.get(1), Some(&std::process::id()));
    Ok(())
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct GapSum {
    lost: u64,
    records: u64,
}

/// With a ring buffer too small for an exec record, every exec is lost in
/// the kernel: the losses arrive as gap records whose sum is what the agent
/// read from the kernel's counters, while the small fork/exit records pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_losses_arrive_as_gap_records() -> Result<()> {
    let stack = Stack::new("e2e_gaps").await?;
    let _collector = stack.start_collector().await?;
    let mut agent = stack
        .start_agent_named(
            "agent",
            &[("ZT_AGENT_SENSORS__CRITICAL_RING_BYTES", "4096".to_owned())],
        )
        .await?;
    let cgroup = TestCgroup::create("gaps")?;
    let cgroup_id = cgroup.id()?;

    let mut pids = Vec::new();
    for _ in 0..20 {
        let (pid, status) = run_in_cgroup(&cgroup, "/bin/true", &[])?;
        assert!(status.success());
        pids.push(pid);
    }
    // The last exit passed the ring; the drop counters are read every second.
    one_row(&stack, cgroup_id, "exit", *pids.last().unwrap_or(&0)).await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let status = agent
        .terminate(Duration::from_secs(15))
        .context("agent did not stop")?;
    assert!(status.success());

    let reported: u64 = agent.final_counter("kernel_drops")?;
    assert!(
        reported >= 20,
        "at least our 20 execs were lost, got {reported}"
    );

    // Other tests' file activity may overflow this agent's bulk ring too:
    // every kernel drop, of either stream, must be in a gap record, and the
    // critical ones at least our 20 execs.
    let all = stack
        .db()
        .query("SELECT sum(lost) AS lost, count() AS records FROM gaps WHERE reason = 'ring_full'")
        .fetch_one::<GapSum>()
        .await?;
    assert_eq!(
        all.lost, reported,
        "gap records account for every lost event"
    );
    let sum = stack
        .db()
        .query("SELECT sum(lost) AS lost, count() AS records FROM gaps WHERE stream = 'critical' AND reason = 'ring_full'")
        .fetch_one::<GapSum>()
        .await?;
    assert!(
        sum.lost >= 20,
        "our 20 execs are among the critical losses: {}",
        sum.lost
    );
    assert!(sum.records >= 1);

    let execs = stack
        .db()
        .query("SELECT count() FROM process_events WHERE cgroup_id = ? AND event_type = 'exec'")
        .bind(cgroup_id)
        .fetch_one::<u64>()
        .await?;
    assert_eq!(execs, 0, "no exec record fits a 4 KiB ring");
    Ok(())
}

#[derive(Debug, Clone, clickhouse::Row, serde::Deserialize)]
struct CredRow {
    cred_syscall: String,
    uid: u32,
    euid: u32,
    gid: u32,
    egid: u32,
    previous_uid: u32,
    previous_euid: u32,
    previous_gid: u32,
    previous_egid: u32,
    exe: String,
}

/// A root process drops to nobody: each successful setuid-family call that
/// changed its ids is a row with the ids before and after; a refused call
/// (back to root) is none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_changes_are_recorded_with_before_and_after() -> Result<()> {
    const DROP: &str = r#"
import os
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
try:
    os.setuid(0)
except PermissionError:
    pass
"#;
    let stack = Stack::new("e2e_creds").await?;
    let _collector = stack.start_collector().await?;
    let _agent = stack.start_agent().await?;
    let cgroup = TestCgroup::create("creds")?;
    let (pid, status) = run_in_cgroup(&cgroup, "/usr/bin/python3", &["-c", DROP])?;
    ensure!(status.success(), "python failed");

    let rows = eventually(LIMIT, || async {
        let rows = stack
            .db()
            .query("SELECT ?fields FROM process_events WHERE event_type = 'cred_change' AND pid = ? ORDER BY time_ns, seq")
            .bind(pid)
            .fetch_all::<CredRow>()
            .await
            .ok()?;
        (rows.len() >= 2).then_some(rows)
    })
    .await
    .with_context(|| format!("no credential changes for pid {pid}\n{}", stack.logs()))?;
    // Let a wrongly recorded refused setuid(0) arrive too before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = rows_of_creds(&stack, pid).await;
    assert_eq!(
        all.len(),
        2,
        "two changes, the refused call is none: {all:#?}"
    );

    let gid = &rows[0];
    assert_eq!(gid.cred_syscall, "setresgid");
    assert_eq!((gid.previous_gid, gid.previous_egid), (0, 0));
    assert_eq!((gid.gid, gid.egid), (65534, 65534));
    assert_eq!((gid.uid, gid.euid), (0, 0), "uids unchanged by setresgid");
    assert!(gid.exe.contains("python3"), "{gid:?}");

    let uid = &rows[1];
    assert_eq!(uid.cred_syscall, "setresuid");
    assert_eq!((uid.previous_uid, uid.previous_euid), (0, 0));
    assert_eq!((uid.uid, uid.euid), (65534, 65534));
    Ok(())
}

async fn rows_of_creds(stack: &Stack, pid: u32) -> Vec<CredRow> {
    stack
        .db()
        .query("SELECT ?fields FROM process_events WHERE event_type = 'cred_change' AND pid = ?")
        .bind(pid)
        .fetch_all::<CredRow>()
        .await
        .unwrap_or_default()
}
