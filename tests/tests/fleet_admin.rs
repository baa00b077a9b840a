//! Administration and the fleet, with the real binaries: `ztctl` users of
//! different roles and organisations create enrollment tokens, list devices
//! and revoke one; every action, refusals included, is in `zt.audit_log`;
//! agents report heartbeats into `zt.agents`; a revoked device's stream is
//! cut within a second and the revocation reaches the other agents over the
//! control channel.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use zt_e2e::{
    eventually,
    pki::enroll,
    process::workspace_binary,
    stack::{Stack, TEST_ORG},
    ztctl::ZtctlUser,
};

fn device<'a>(list: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    list.as_array()?.iter().find(|d| d["device_id"] == id)
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Audit {
    actor: String,
    actor_role: String,
    action: String,
    target: String,
    source: String,
    result: String,
}

fn revocations_file(state: &Path) -> PathBuf {
    state.join("revocations.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_audit_heartbeats_and_revocation() -> Result<()> {
    let stack = Stack::new("e2e_fleet").await?;
    let mut collector = stack.start_collector().await?;
    let alice = ZtctlUser::create(&stack, TEST_ORG, "alice", "admin")?;
    let bob = ZtctlUser::create(&stack, TEST_ORG, "bob", "analyst")?;
    let dave = ZtctlUser::create(&stack, "other-org", "dave", "admin")?;
    let carol = ZtctlUser::create(&stack, "pref", "carol", "soc")?;

    // An admin makes a token; the device enrolls with it.
    let token = alice.json(&[
        "enroll-token",
        "create",
        "--device",
        "pc-1",
        "--ttl",
        "10m",
        "--json",
    ])?;
    assert_eq!(
        token["spiffe_id"],
        format!("spiffe://zt.local/org/{TEST_ORG}/device/pc-1")
    );
    let join = token["join_token"].as_str().context("join_token")?;
    enroll(
        &workspace_binary("zt-agent")?,
        &stack.agent_state("pc-1"),
        &stack.collector_url(),
        join,
    )?;
    let fast = [("ZT_AGENT_HEARTBEAT_INTERVAL_SECS", "1".to_owned())];
    let mut pc1 = stack.start_agent_named("pc-1", &fast).await?;
    let mut pc2 = stack.start_agent_named("pc-2", &fast).await?;

    // Heartbeats: both online, with their sensors, in zt.agents.
    let listed = eventually(Duration::from_secs(15), || async {
        let list = alice.json(&["device", "list", "--json"]).ok()?;
        let ready = ["pc-1", "pc-2"].iter().all(|id| {
            device(&list, id).is_some_and(|d| {
                d["connected"] == true && d["last_heartbeat_unix"].as_i64() > Some(0)
            })
        });
        ready.then_some(list)
    })
    .await
    .with_context(|| format!("devices not online\n{}", stack.logs()))?;
    let pc1_entry = device(&listed, "pc-1").context("pc-1 listed")?;
    assert_eq!(pc1_entry["revoked"], false);
    assert!(pc1_entry["certificate_not_after_unix"].as_i64() > Some(0));
    #[derive(Debug, clickhouse::Row, serde::Deserialize)]
    struct Beat {
        kernel: String,
        active_sensors: Vec<String>,
        certificate_not_after: u32,
    }
    let beat = stack
        .db()
        .query("SELECT kernel, active_sensors, toUInt32(certificate_not_after) AS certificate_not_after FROM agents WHERE device_id = 'pc-2' ORDER BY time DESC LIMIT 1")
        .fetch_one::<Beat>()
        .await?;
    assert!(!beat.kernel.is_empty());
    assert!(
        beat.active_sensors
            .iter()
            .any(|s| s == "exec=tracepoint sched/sched_process_exec"),
        "{beat:?}"
    );
    assert!(
        beat.active_sensors
            .iter()
            .any(|s| s == "dns=cgroup_skb/egress"),
        "{beat:?}"
    );
    assert!(beat.certificate_not_after > 0);

    // Roles: the analyst reads but may not change; another organisation's
    // admin may do neither here; the SOC sees every organisation.
    assert!(device(&bob.json(&["device", "list", "--json"])?, "pc-1").is_some());
    let refused = bob.ztctl(&["device", "revoke", "pc-1"])?.unwrap_err();
    assert!(refused.contains("may not change"), "{refused}");
    let refused = bob
        .ztctl(&["enroll-token", "create", "--device", "pc-9"])?
        .unwrap_err();
    assert!(refused.contains("may not change"), "{refused}");
    // No token of another organisation, so no device enrolls there that way.
    let refused = dave
        .ztctl(&[
            "enroll-token",
            "create",
            "--org",
            TEST_ORG,
            "--device",
            "intruder",
        ])?
        .unwrap_err();
    assert!(refused.contains("may not change"), "{refused}");
    let refused = dave
        .ztctl(&["device", "list", "--org", TEST_ORG])?
        .unwrap_err();
    assert!(refused.contains("may not read"), "{refused}");
    let refused = dave
        .ztctl(&["device", "revoke", "pc-1", "--org", TEST_ORG])?
        .unwrap_err();
    assert!(refused.contains("may not change"), "{refused}");
    assert!(dave
        .json(&["device", "list", "--json"])?
        .as_array()
        .is_some_and(Vec::is_empty));
    let everything = carol.json(&["device", "list", "--json"])?;
    assert!(device(&everything, "pc-1").is_some() && device(&everything, "pc-2").is_some());

    // Revocation: the stream is cut within a second, the other agent learns
    // of it over the control channel.
    let revoked = alice.json(&[
        "device",
        "revoke",
        "pc-1",
        "--reason",
        "lost laptop",
        "--json",
    ])?;
    let cut_from = Instant::now();
    assert_eq!(revoked["streams_closed"], 1);
    let version = revoked["revocation_version"].as_u64().context("version")?;
    let cut = eventually(Duration::from_secs(5), || async {
        let list = alice.json(&["device", "list", "--json"]).ok()?;
        device(&list, "pc-1")
            .filter(|d| d["connected"] == false && d["revoked"] == true)
            .map(|_| cut_from.elapsed())
    })
    .await
    .with_context(|| format!("pc-1 still connected\n{}", stack.logs()))?;
    assert!(cut < Duration::from_secs(1), "stream cut after {cut:?}");
    pc1.wait_for_log("telemetry stream broke", Duration::from_secs(5))
        .await?;
    pc2.wait_for_log("revocation list updated", Duration::from_secs(10))
        .await?;
    let saved = zt_identity::RevocationList::load(&revocations_file(&stack.agent_state("pc-2")))?;
    assert_eq!(saved.version(), version);
    let pc1_id =
        zt_identity::SpiffeId::parse(&format!("spiffe://zt.local/org/{TEST_ORG}/device/pc-1"))?;
    assert!(saved.is_device_revoked(&pc1_id));
    // And it stays out: the agent's reconnections are refused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let list = alice.json(&["device", "list", "--json"])?;
    assert_eq!(device(&list, "pc-1").context("pc-1")?["connected"], false);
    assert_eq!(device(&list, "pc-2").context("pc-2")?["connected"], true);

    // The audit trail, refusals included, with where each call came from.
    let audit: Vec<Audit> = stack
        .db()
        .query("SELECT actor, actor_role, action, target, source, result FROM audit_log ORDER BY time_ns")
        .fetch_all()
        .await?;
    let has = |actor: &str, action: &str, result: &str| {
        audit.iter().any(|a| {
            a.actor.ends_with(&format!("/user/{actor}")) && a.action == action && a.result == result
        })
    };
    assert!(has("alice", "enroll_token.create", "ok"), "{audit:#?}");
    assert!(has("alice", "device.revoke", "ok"), "{audit:#?}");
    assert!(has("bob", "device.revoke", "denied"), "{audit:#?}");
    assert!(has("bob", "enroll_token.create", "denied"), "{audit:#?}");
    assert!(has("dave", "device.list", "denied"), "{audit:#?}");
    assert!(has("carol", "device.list", "ok"), "{audit:#?}");
    let revoke = audit
        .iter()
        .find(|a| a.action == "device.revoke" && a.result == "ok")
        .context("revoke audited")?;
    assert_eq!(revoke.target, pc1_id.to_string());
    assert_eq!(revoke.actor_role, "admin");
    assert!(revoke.source.starts_with("127.0.0.1:"), "{revoke:?}");

    drop(pc2);
    let _ = collector.terminate(Duration::from_secs(10));
    Ok(())
}
