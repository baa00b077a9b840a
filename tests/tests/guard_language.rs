//! The policy language enforced in the kernel: a YAML policy whose rules
//! depend on who connects — a user group (by uid) and a binary group (by
//! the executable's inode, set at exec) — and with an exception and a
//! dry-run rule. Real processes in the guarded cgroup connect as root and
//! as `nobody`, with python3 and with a copy of it (same bytes, another
//! file); every outcome must be what `PolicySet::evaluate` (and so
//! `ztctl policy explain`) says, and the decisions name the rules.

use std::{process::Stdio, time::Duration};

use anyhow::{ensure, Context as _, Result};
use zt_e2e::{
    eventually,
    stack::{spawn_in_cgroup_with, Stack, CONNECTOR},
};

#[derive(Debug, Clone, clickhouse::Row, serde::Deserialize)]
struct DecisionRow {
    pid: u32,
    remote_addr: String,
    action: String,
    verdict: String,
    rule_id: String,
    uid: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_binary_conditions_are_enforced_as_explained() -> Result<()> {
    let stack = Stack::new("e2e_guard_language").await?;
    let _collector = stack.start_collector().await?;
    let listeners: Vec<std::net::TcpListener> = (91..=94)
        .map(|host| std::net::TcpListener::bind(format!("127.0.0.{host}:0")))
        .collect::<std::io::Result<_>>()?;
    let targets: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<std::io::Result<_>>()?;
    let python = std::fs::canonicalize("/usr/bin/python3")?;
    // The same bytes in another file: not the binary the group names.
    let copy = stack.dir.path().join("python-copy");
    std::fs::copy(&python, &copy)?;
    let policy_text = format!(
        r#"version: 1
kind: baseline
groups:
  users:
    testers: [nobody]
  binaries:
    pythons: [{{path: {python}}}]
rules:
  - id: testers-not-to-91
    action: deny
    from: {{users: [testers]}}
    to: {{addresses: [127.0.0.91]}}
  - id: python-not-to-92
    action: deny
    from: {{binaries: [pythons]}}
    to: {{addresses: [127.0.0.92], ports: [{port92}]}}
  - id: trial-block-93-for-testers
    action: deny
    mode: dry-run
    from: {{users: [testers]}}
    to: {{addresses: [127.0.0.93]}}
  - id: block-94-except-testers
    action: deny
    to: {{addresses: [127.0.0.94]}}
    except: {{users: [testers]}}
defaults: {{outbound: allow}}
"#,
        python = python.display(),
        port92 = listeners[1].local_addr()?.port(),
    );
    let set = policy::load(&policy_text, None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let policy_file = stack.dir.path().join("guard.yaml");
    std::fs::write(&policy_file, &policy_text)?;
    let _agent = stack
        .start_agent_named(
            "agent",
            &[(
                "ZT_AGENT_GUARD__POLICY_FILE",
                policy_file.display().to_string(),
            )],
        )
        .await?;

    let copy_path = copy.display().to_string();
    let callers: [(&str, &str, Vec<&str>); 3] = [
        ("root", python.to_str().context("path")?, vec![]),
        (
            "nobody",
            python.to_str().context("path")?,
            vec!["--reuid=65534", "--regid=65534", "--clear-groups"],
        ),
        ("root", &copy_path, vec![]),
    ];
    let mut pids = Vec::new();
    for (user, exe, setpriv) in &callers {
        let mut args: Vec<&str> = setpriv.clone();
        args.push(exe);
        args.extend(["-c", CONNECTOR]);
        args.extend(targets.iter().map(String::as_str));
        let child =
            spawn_in_cgroup_with(&stack.guarded, "/usr/bin/setpriv", &args, Stdio::piped())?;
        pids.push(child.id());
        let output = child.wait_with_output()?;
        ensure!(output.status.success(), "{user} {exe}: {output:?}");
        let results = String::from_utf8(output.stdout)?;
        for target in &targets {
            let flow = policy::Flow {
                direction: policy::Direction::Outbound,
                device: "spiffe://zt.local/org/org-e2e/device/agent",
                user,
                exe,
                exe_sha256: "",
                destination: target.parse()?,
            };
            let decision = set.evaluate(&flow);
            let expected = if decision.verdict == policy::Action::Deny {
                "EPERM"
            } else {
                "connected"
            };
            ensure!(
                results.contains(&format!("{target} {expected}")),
                "{user} running {exe} to {target}: explain says {} ({}), the kernel did otherwise:\n{results}",
                decision.summary(),
                expected
            );
        }
    }

    // The decisions name the rules, the dry-run one as a would-be denial.
    let rows: Vec<DecisionRow> = eventually(Duration::from_secs(10), || async {
        let rows = stack
            .db()
            .query("SELECT ?fields FROM decisions FINAL WHERE has(?, pid) ORDER BY time_ns")
            .bind(&pids)
            .fetch_all::<DecisionRow>()
            .await
            .ok()?;
        (rows.len() >= 6).then_some(rows)
    })
    .await
    .with_context(|| format!("decisions not stored\n{}", stack.logs()))?;
    let seen: Vec<(u32, &str, &str, &str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r.uid,
                r.remote_addr.as_str(),
                r.action.as_str(),
                r.verdict.as_str(),
                r.rule_id.as_str(),
            )
        })
        .collect();
    for expected in [
        (0, "127.0.0.92", "deny", "denied", "python-not-to-92"),
        (0, "127.0.0.94", "deny", "denied", "block-94-except-testers"),
        (65534, "127.0.0.91", "deny", "denied", "testers-not-to-91"),
        (65534, "127.0.0.92", "deny", "denied", "python-not-to-92"),
        (
            65534,
            "127.0.0.93",
            "audit",
            "would_deny",
            "trial-block-93-for-testers",
        ),
    ] {
        ensure!(
            seen.contains(&expected),
            "missing {expected:?} in {seen:#?}"
        );
    }
    // The copy is not python by inode: only the exception-less rule denied it.
    let copy_pid = pids[2];
    let copy_rows: Vec<&DecisionRow> = rows.iter().filter(|r| r.pid == copy_pid).collect();
    ensure!(
        copy_rows.len() == 1 && copy_rows[0].rule_id == "block-94-except-testers",
        "{copy_rows:#?}"
    );
    Ok(())
}

/// A bundle pushed through the collector is what the agent's kernel
/// enforces, acknowledged only once it is in force; `policy replay` shows
/// what a candidate would change about the stored decision; and the bundle
/// stays in force across an agent restart while the collector is away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_bundle_is_enforced_and_kept_across_a_restart_without_the_collector() -> Result<()>
{
    let stack = Stack::new("e2e_guard_bundle").await?;
    let mut collector = stack.start_collector().await?;
    let soc = zt_e2e::ztctl::ZtctlUser::create(&stack, "pref", "soc", "soc")?;
    let listener = std::net::TcpListener::bind("127.0.0.95:0")?;
    let target = listener.local_addr()?.to_string();
    let mut agent = stack.start_agent_named("agent", &[]).await?;
    // No policy yet: the guard lets everything pass.
    ensure!(stack.connect_from_guarded(&target)? == format!("{target} connected"));

    let baseline = stack.dir.path().join("baseline.yaml");
    std::fs::write(
        &baseline,
        format!(
            "version: 1\nkind: baseline\nrules:\n  - id: no-95\n    action: deny\n    to: {{addresses: [127.0.0.95], ports: [{}]}}\n",
            listener.local_addr()?.port()
        ),
    )?;
    // Wait until the agent's control channel is open, then push.
    let connected = eventually(Duration::from_secs(20), || async {
        let status = soc
            .json(&[
                "policy",
                "status",
                "--org",
                zt_e2e::stack::TEST_ORG,
                "--json",
            ])
            .ok()?;
        (status["agents"][0]["connected"] == true).then_some(())
    })
    .await;
    ensure!(
        connected.is_some(),
        "the agent's control channel did not open\n{}",
        stack.logs()
    );
    let reply = soc.push_and_wait(&baseline)?;
    let serial = reply["serial"].as_u64().context("serial")?;
    let rollout = &reply["rollout"][0];
    ensure!(
        rollout["applied"] == 1 && rollout["refused"] == 0,
        "{reply}\n{}",
        stack.logs()
    );
    // Acknowledged means in force: the very next connection is refused.
    ensure!(
        stack.connect_from_guarded(&target)? == format!("{target} EPERM"),
        "the pushed policy is not enforced\n{}",
        stack.logs()
    );

    // Replay: the stored denial would be allowed under a candidate without
    // the rule.
    let candidate = stack.dir.path().join("candidate.yaml");
    std::fs::write(&candidate, "version: 1\nkind: baseline\n")?;
    let replay = eventually(Duration::from_secs(15), || async {
        let reply = soc
            .json(&[
                "policy",
                "replay",
                candidate.to_str()?,
                "--org",
                zt_e2e::stack::TEST_ORG,
                "--since",
                "1h",
                "--json",
            ])
            .ok()?;
        (!reply["changed"].as_array()?.is_empty()).then_some(reply)
    })
    .await
    .with_context(|| format!("no replayed change\n{}", stack.logs()))?;
    let changed = &replay["changed"][0];
    ensure!(
        changed["destination"] == target.as_str()
            && changed["old"]["verdict"] == "deny"
            && changed["old"]["rule"] == "no-95"
            && changed["new"]["verdict"] == "allow"
            && changed["new"]["rule"] == "default"
            && changed["count"].as_u64() >= Some(1),
        "{replay}"
    );

    // Without the collector, a restarted agent enforces the kept bundle
    // before it could reach anyone.
    collector.terminate(Duration::from_secs(10));
    agent.terminate(Duration::from_secs(10));
    let _agent = stack.start_agent_named("agent", &[]).await?;
    ensure!(
        stack.connect_from_guarded(&target)? == format!("{target} EPERM"),
        "the kept bundle is not enforced after a restart\n{}",
        stack.logs()
    );
    let log = stack.logs();
    ensure!(
        log.contains(&format!("serial={serial}")) && log.contains("enforced again"),
        "{log}"
    );
    Ok(())
}
