//! The connection guard in the kernel, end to end: with a policy file, a
//! process in the guarded cgroup (the test's own, never the root cgroup)
//! gets EPERM connecting to a denied destination, reaches an audited one
//! (recorded as a would-be denial) and an allowed one; each decision is a
//! row of `zt.decisions` naming the rule, the process and the policy
//! version, over IPv4 and IPv6. A process outside the guarded cgroup is not
//! affected, and a policy file that does not compile stops the agent with
//! the reason.

use std::time::Duration;

use anyhow::{Context as _, Result};
use zt_e2e::{
    eventually, free_port,
    process::{workspace_binary, Process},
    stack::{connect_in_cgroup, Stack},
};

#[derive(Debug, Clone, clickhouse::Row, serde::Deserialize)]
struct DecisionRow {
    connection_id: String,
    pid: u32,
    exe: String,
    remote_addr: String,
    remote_port: u16,
    protocol: String,
    action: String,
    verdict: String,
    rule_id: String,
    policy_version: u64,
    enforcement_point: String,
    ancestor_pids: Vec<u32>,
}

/// The decisions about `pid`'s connections, in time order, once at least
/// `at_least` are stored.
async fn decisions_of(stack: &Stack, pid: u32, at_least: usize) -> Result<Vec<DecisionRow>> {
    eventually(Duration::from_secs(10), || async {
        let rows = stack
            .db()
            .query("SELECT ?fields FROM decisions FINAL WHERE pid = ? ORDER BY time_ns")
            .bind(pid)
            .fetch_all::<DecisionRow>()
            .await
            .ok()?;
        (rows.len() >= at_least).then_some(rows)
    })
    .await
    .with_context(|| format!("decisions not stored\n{}", stack.logs()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_audited_and_allowed_connections_are_decided_in_the_kernel() -> Result<()> {
    let stack = Stack::new("e2e_guard").await?;
    let _collector = stack.start_collector().await?;
    // Listeners on loopback addresses of the test's own, so that "connected"
    // proves the connection passed.
    let audited = std::net::TcpListener::bind("127.0.0.81:0")?;
    let allowed = std::net::TcpListener::bind("127.0.0.82:0")?;
    let denied_port = free_port()?;
    let (audited_port, allowed_port) = (audited.local_addr()?.port(), allowed.local_addr()?.port());
    let policy = stack.dir.path().join("guard.toml");
    std::fs::write(
        &policy,
        format!(
            r#"
version = 42
default = "allow"
record_allows = false

[[rule]]
id = "deny-test-service"
action = "deny"
destinations = ["127.0.0.80"]
ports = [{denied_port}]

[[rule]]
id = "audit-lab-net"
action = "audit"
destinations = ["127.0.0.81/32"]

[[rule]]
id = "allow-web"
action = "allow"
destinations = ["127.0.0.82"]
"#
        ),
    )?;
    let _agent = stack
        .start_agent_named(
            "agent",
            &[("ZT_AGENT_GUARD__POLICY_FILE", policy.display().to_string())],
        )
        .await?;

    let targets = [
        format!("127.0.0.80:{denied_port}"),
        format!("127.0.0.81:{audited_port}"),
        format!("127.0.0.82:{allowed_port}"),
        // A datagram without connect(): decided per datagram (sendmsg4).
        format!("udp:127.0.0.80:{denied_port}"),
        format!("udp:127.0.0.82:{allowed_port}"),
    ];
    let targets_arg: Vec<&str> = targets.iter().map(String::as_str).collect();
    let (pid, results) = connect_in_cgroup(&stack.guarded, &targets_arg)?;
    assert!(
        results.contains(&format!("{} EPERM", targets[0])),
        "{results}"
    );
    assert!(
        results.contains(&format!("{} connected", targets[1])),
        "{results}"
    );
    assert!(
        results.contains(&format!("{} connected", targets[2])),
        "{results}"
    );
    assert!(
        results.contains(&format!("{} EPERM", targets[3])),
        "{results}"
    );
    assert!(
        results.contains(&format!("{} sent", targets[4])),
        "{results}"
    );

    // Outside the guarded cgroup the same connection is not the guard's.
    let outside = std::net::TcpStream::connect(("127.0.0.80", denied_port));
    assert!(
        !matches!(&outside, Err(e) if e.raw_os_error() == Some(libc::EPERM)),
        "a process outside the guarded cgroup is not denied: {outside:?}"
    );

    let rows = decisions_of(&stack, pid, 3).await?;
    assert_eq!(
        rows.len(),
        3,
        "the allowed connection and datagram are not recorded: {rows:#?}"
    );
    let datagram = &rows[2];
    assert_eq!(
        (
            datagram.protocol.as_str(),
            datagram.verdict.as_str(),
            datagram.rule_id.as_str(),
            datagram.remote_port
        ),
        ("udp", "denied", "deny-test-service", denied_port)
    );
    let denied = &rows[0];
    assert_eq!(
        (
            denied.action.as_str(),
            denied.verdict.as_str(),
            denied.rule_id.as_str()
        ),
        ("deny", "denied", "deny-test-service")
    );
    assert_eq!(
        (denied.remote_addr.as_str(), denied.remote_port),
        ("127.0.0.80", denied_port)
    );
    let audit = &rows[1];
    assert_eq!(
        (
            audit.action.as_str(),
            audit.verdict.as_str(),
            audit.rule_id.as_str()
        ),
        ("audit", "would_deny", "audit-lab-net")
    );
    for row in &rows {
        assert_eq!(row.pid, pid);
        assert_eq!(row.policy_version, 42);
        assert_eq!(row.enforcement_point, "kernel");
        assert!(row.exe.ends_with("python3"), "{row:?}");
        assert_eq!(row.ancestor_pids.first(), Some(&std::process::id()));
        assert_eq!(row.connection_id.len(), 32);
    }
    assert_eq!(
        (rows[0].protocol.as_str(), rows[1].protocol.as_str()),
        ("tcp", "tcp")
    );
    assert_ne!(rows[0].connection_id, rows[1].connection_id);
    drop((audited, allowed));
    Ok(())
}

/// The same over IPv6 (`connect6`, `sendmsg6`), on `::1` with ports of the
/// test's own: a denied port fails with EPERM for TCP and UDP, an audited
/// one passes recorded as a would-be denial, an allowed one passes; the
/// decisions carry the IPv6 address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_connections_are_decided_in_the_kernel_too() -> Result<()> {
    let stack = Stack::new("e2e_guard_v6").await?;
    let _collector = stack.start_collector().await?;
    let audited = std::net::TcpListener::bind("[::1]:0")?;
    let allowed = std::net::TcpListener::bind("[::1]:0")?;
    let denied_port = free_port()?;
    let (audited_port, allowed_port) = (audited.local_addr()?.port(), allowed.local_addr()?.port());
    let policy = stack.dir.path().join("guard.toml");
    std::fs::write(
        &policy,
        format!(
            r#"
version = 43
default = "allow"
record_allows = false

[[rule]]
id = "deny-v6-service"
action = "deny"
destinations = ["::1"]
ports = [{denied_port}]

[[rule]]
id = "audit-v6-service"
action = "audit"
destinations = ["::1/128"]
ports = [{audited_port}]
"#
        ),
    )?;
    let _agent = stack
        .start_agent_named(
            "agent",
            &[("ZT_AGENT_GUARD__POLICY_FILE", policy.display().to_string())],
        )
        .await?;

    let targets = [
        format!("::1:{denied_port}"),
        format!("::1:{audited_port}"),
        format!("::1:{allowed_port}"),
        format!("udp:::1:{denied_port}"),
    ];
    let targets_arg: Vec<&str> = targets.iter().map(String::as_str).collect();
    let (pid, results) = connect_in_cgroup(&stack.guarded, &targets_arg)?;
    for (target, expected) in targets
        .iter()
        .zip(["EPERM", "connected", "connected", "EPERM"])
    {
        assert!(
            results.contains(&format!("{target} {expected}")),
            "{target}: expected {expected}\n{results}"
        );
    }

    let rows = decisions_of(&stack, pid, 3).await?;
    let summary: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.protocol.as_str(),
                r.verdict.as_str(),
                r.rule_id.as_str(),
                r.remote_addr.as_str(),
                r.remote_port,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("tcp", "denied", "deny-v6-service", "::1", denied_port),
            ("tcp", "would_deny", "audit-v6-service", "::1", audited_port),
            ("udp", "denied", "deny-v6-service", "::1", denied_port),
        ]
    );
    for row in &rows {
        assert_eq!(row.policy_version, 43);
        assert_eq!(row.enforcement_point, "kernel");
    }
    drop((audited, allowed));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_does_not_compile_stops_the_agent_with_the_reason() -> Result<()> {
    let stack = Stack::new("e2e_guard_bad").await?;
    let _collector = stack.start_collector().await?;
    stack.enroll_agent("agent")?;
    let policy = stack.dir.path().join("bad.toml");
    std::fs::write(
        &policy,
        "version = 1\ndefault = \"allow\"\n[[rule]]\nid = \"x\"\naction = \"deny\"\ndestinations = [\"10.1.2.3/8\"]\n",
    )?;
    let mut agent = Process::spawn(
        "agent-bad-policy",
        &workspace_binary("zt-agent")?,
        [
            "--state-dir",
            &stack.agent_state("agent").display().to_string(),
        ],
        &[
            ("ZT_AGENT_GUARD__POLICY_FILE", policy.display().to_string()),
            (
                "ZT_AGENT_GUARDED_CGROUP",
                stack.guarded.path().display().to_string(),
            ),
        ],
        stack.dir.path(),
    )?;
    let status = eventually(Duration::from_secs(20), || {
        let status = agent.exited();
        async move { status }
    })
    .await
    .context("the agent kept running with a broken policy")?;
    assert!(!status.success());
    let log = agent.log();
    assert!(log.contains("write 10.0.0.0/8"), "{log}");
    assert!(!log.contains("connection guard active"), "{log}");
    Ok(())
}
