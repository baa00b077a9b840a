//! Staged policy rollout end to end: the real collector, 20 agents of
//! city-a (the agent's own control channel, in-process, each enrolled over
//! real gRPC), four of them in the `canaries` device group. `ztctl policy
//! push --canary canaries` gives the new serial to the canary devices only;
//!
//! * a canary that stays healthy (a few denials are no jump) is promoted
//!   when its time is over and the serial reaches everyone;
//! * a canary whose devices start sending many denied decisions (as real
//!   telemetry, over gRPC with each device's certificate) is rolled back by
//!   the collector on its own: every agent ends on a new serial whose bundle
//!   restores the previous one, `ztctl` fails with the reason, status says
//!   `rolled_back` and why, and the audit log has the collector's act.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use proto::telemetry::{
    event::Kind, telemetry_client::TelemetryClient, AgentIdentity, Decision, Event, EventBatch,
};
use tokio_stream::wrappers::ReceiverStream;
use zt_e2e::{
    eventually,
    fleet_sim::{start_fleet, SimulatedAgent},
    process::Process,
    stack::Stack,
    ztctl::ZtctlUser,
};

const ORG: &str = "city-a";
const CANARIES: usize = 4;
const OTHERS: usize = 16;
const AGENTS: usize = CANARIES + OTHERS;
const WAIT: Duration = Duration::from_secs(90);

struct Setup {
    stack: Stack,
    _collector: Process,
    admin: Arc<ZtctlUser>,
    canaries: Vec<SimulatedAgent>,
    others: Vec<SimulatedAgent>,
    /// `spiffe://<td>/org/city-a/device/canary-*`, in this stack's domain.
    canary_pattern: String,
    /// The serial in force for everyone before the canary.
    serial: u64,
}

impl Setup {
    fn all(&self) -> impl Iterator<Item = &SimulatedAgent> {
        self.canaries.iter().chain(&self.others)
    }

    /// Writes city-a's layer: the `canaries` device group and one deny
    /// rule `rule`; returns its path.
    fn layer(&self, rule: &str) -> Result<String> {
        write_layer(&self.stack, &self.canary_pattern, rule)
    }

    fn status(&self) -> Result<serde_json::Value> {
        self.admin.json(&["policy", "status", "--json"])
    }
}

/// The collector (1-s health buckets: canaries of at most 60 s), city-a's
/// agents connected, and a first layer pushed to all of them at once.
async fn setup(name: &str) -> Result<Setup> {
    let stack = Stack::new(name).await?;
    let collector = stack
        .start_collector_with(&[
            ("ZT_COLLECTOR_POLICY__MAX_CANARY_SECONDS", "60".into()),
            ("ZT_COLLECTOR_POLICY__CANARY_SECONDS", "60".into()),
            ("ZT_COLLECTOR_POLICY__MAX_DENY_RATE_INCREASE", "1.0".into()),
            ("ZT_COLLECTOR_POLICY__MIN_INCREASE_EVENTS", "20".into()),
        ])
        .await?;
    let soc = ZtctlUser::create(&stack, "pref", "soc", "soc")?;
    let admin = Arc::new(ZtctlUser::create(&stack, ORG, "tanaka", "admin")?);
    let canaries = start_fleet(&stack, &soc, ORG, "canary", CANARIES).await?;
    let others = start_fleet(&stack, &soc, ORG, "pc", OTHERS).await?;
    let connected = eventually(Duration::from_secs(30), || async {
        let status = admin.json(&["policy", "status", "--json"]).ok()?;
        let agents = status["agents"].as_array()?;
        (agents.iter().filter(|a| a["connected"] == true).count() == AGENTS).then_some(())
    })
    .await;
    ensure!(
        connected.is_some(),
        "not every agent opened its control channel"
    );

    // `spiffe://<td>/org/city-a/device/canary-*`, in this stack's domain.
    let canary_id = canaries[0].spiffe_id();
    let pattern = format!(
        "{}canary-*",
        canary_id
            .strip_suffix(&canaries[0].device_id)
            .context("device id")?
    );
    let reply = admin.json(&[
        "policy",
        "push",
        &write_layer(&stack, &pattern, "first")?,
        "--wait",
        "60",
        "--json",
    ])?;
    let serial = reply["serial"].as_u64().context("serial")?;
    let progress = &reply["rollout"][0];
    ensure!(
        progress["applied"] == AGENTS && progress["refused"] == 0,
        "{reply}"
    );
    let status = admin.json(&["policy", "status", "--json"])?;
    ensure!(
        status["rollout"]["state"] == "complete" && status["rollout"]["serial"] == serial,
        "a push without a canary goes to everyone at once: {status}"
    );
    Ok(Setup {
        stack,
        _collector: collector,
        admin,
        canaries,
        others,
        canary_pattern: pattern,
        serial,
    })
}

fn write_layer(stack: &Stack, canary_pattern: &str, rule: &str) -> Result<String> {
    let path = stack.dir.path().join(format!("{rule}.yaml"));
    std::fs::write(
        &path,
        format!(
            "version: 1\nkind: organisation\norg: {ORG}\n\
             groups:\n  devices:\n    canaries:\n      - {canary_pattern}\n\
             rules:\n  - id: {rule}\n    action: deny\n    to: {{addresses: [192.0.2.0/24]}}\n"
        ),
    )?;
    Ok(path.display().to_string())
}

/// A telemetry stream opened with a simulated agent's certificate.
struct Telemetry {
    batches: tokio::sync::mpsc::Sender<EventBatch>,
    identity: AgentIdentity,
    seq: u64,
    batch_seq: u64,
    /// Events the collector acknowledged as stored.
    stored: Arc<AtomicU64>,
}

impl Telemetry {
    async fn open(stack: &Stack, agent: &SimulatedAgent) -> Result<Telemetry> {
        let channel = zt_grpc_tls::channel(&stack.collector_url(), agent.client_tls()?).await?;
        let mut client = TelemetryClient::new(channel);
        let (batches, rx) = tokio::sync::mpsc::channel(16);
        let mut acks = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        let stored = Arc::new(AtomicU64::new(0));
        let counted = stored.clone();
        tokio::spawn(async move {
            while let Ok(Some(ack)) = acks.message().await {
                counted.fetch_add(u64::from(ack.stored), Ordering::Relaxed);
            }
        });
        Ok(Telemetry {
            batches,
            identity: AgentIdentity {
                org_id: ORG.into(),
                device_id: agent.device_id.clone(),
                hostname: agent.device_id.clone(),
                boot_id: uuid::Uuid::new_v4().to_string(),
                agent_version: "canary-test".into(),
            },
            seq: 0,
            batch_seq: 0,
            stored,
        })
    }

    /// Sends `denied` denied and `allowed` allowed decisions, as the
    /// agent's guard reports them, now.
    async fn decisions(&mut self, denied: usize, allowed: usize, serial: u64) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64;
        let mut events = Vec::with_capacity(denied + allowed);
        for n in 0..denied + allowed {
            self.seq += 1;
            let deny = n < denied;
            events.push(Event {
                seq: self.seq,
                time_unix_ns: now,
                ancestors: Vec::new(),
                kind: Some(Kind::Decision(Decision {
                    connection_id: format!("{}-{}", self.identity.boot_id, self.seq),
                    pid: 4242,
                    uid: 1000,
                    exe: "/usr/bin/curl".into(),
                    user_name: "tanaka".into(),
                    ip_version: 4,
                    remote_addr: if deny { "192.0.2.10" } else { "198.51.100.10" }.into(),
                    remote_port: 443,
                    protocol: "tcp".into(),
                    action: if deny { "deny" } else { "allow" }.into(),
                    verdict: if deny { "denied" } else { "allowed" }.into(),
                    rule_id: if deny { "second".into() } else { String::new() },
                    policy_version: serial,
                    enforcement_point: "kernel".into(),
                    direction: "outbound".into(),
                    reason: if deny { "policy" } else { "" }.into(),
                    ..Default::default()
                })),
            });
        }
        self.batch_seq += 1;
        self.batches
            .send(EventBatch {
                batch_seq: self.batch_seq,
                agent: Some(self.identity.clone()),
                events,
            })
            .await
            .context("telemetry stream closed")
    }
}

/// Runs a ztctl command off the runtime (it follows a rollout for a while).
fn ztctl_in_background(
    user: &Arc<ZtctlUser>,
    args: Vec<String>,
) -> tokio::task::JoinHandle<Result<std::result::Result<String, String>>> {
    let user = user.clone();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        user.ztctl(&args)
    })
}

async fn collector_audit(stack: &Stack, action: &str) -> Result<Vec<(String, String)>> {
    Ok(stack
        .db()
        .query(
            "SELECT result, detail FROM audit_log \
             WHERE actor = 'collector' AND action = ? ORDER BY time_ns",
        )
        .bind(action)
        .fetch_all::<(String, String)>()
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_is_promoted_and_reaches_everyone() -> Result<()> {
    let setup = setup("e2e_canary_ok").await?;
    let previous = setup.serial;
    let push = ztctl_in_background(
        &setup.admin,
        [
            "policy",
            "push",
            &setup.layer("second")?,
            "--canary",
            "canaries",
            "--canary-seconds",
            "3",
            "--wait",
            "60",
            "--json",
        ]
        .map(str::to_owned)
        .to_vec(),
    );
    // A few denials and some allowed connections from the canary: no jump
    // (fewer than the 20 more a breach needs), whenever they arrive.
    for agent in &setup.canaries {
        let mut telemetry = Telemetry::open(&setup.stack, agent).await?;
        telemetry.decisions(2, 5, previous + 1).await?;
        let stored = eventually(Duration::from_secs(30), || async {
            (telemetry.stored.load(Ordering::Relaxed) == 7).then_some(())
        })
        .await;
        ensure!(
            stored.is_some(),
            "decisions of {} not stored",
            agent.device_id
        );
    }

    let reply = push
        .await??
        .map_err(|stderr| anyhow::anyhow!("the canary push failed: {stderr}"))?;
    let reply: serde_json::Value = serde_json::from_str(&reply)?;
    let serial = reply["serial"].as_u64().context("serial")?;
    ensure!(serial > previous, "{reply}");
    let canary = &reply["canary"];
    ensure!(
        canary["state"] == "promoted"
            && canary["serial"] == serial
            && canary["previous_serial"] == previous
            && canary["canary_group"] == "canaries"
            && canary["staged"] == true,
        "{reply}"
    );
    let mut canary_devices: Vec<&str> = canary["canary_devices"]
        .as_array()
        .context("canary devices")?
        .iter()
        .filter_map(|d| d.as_str())
        .collect();
    canary_devices.sort_unstable();
    let expected: Vec<&str> = setup
        .canaries
        .iter()
        .map(|a| a.device_id.as_str())
        .collect();
    ensure!(canary_devices == expected, "{reply}");
    let progress = &reply["rollout"][0];
    ensure!(
        progress["serial"] == serial
            && progress["applied"] == AGENTS
            && progress["connected"] == AGENTS
            && progress["refused"] == 0,
        "promoted, the serial reaches every agent: {reply}"
    );
    for agent in setup.all() {
        ensure!(
            agent.bundle_serial() == serial,
            "{} runs serial {}",
            agent.device_id,
            agent.bundle_serial()
        );
        let kept = agent.kept_bundle()?.context("no bundle kept")?;
        ensure!(
            kept.serial == serial
                && kept.restores.is_none()
                && kept.canary.as_deref() == Some("canaries"),
            "{}: {kept:?}",
            agent.device_id
        );
    }
    let status = setup.status()?;
    ensure!(
        status["serial"] == serial && status["rollout"]["state"] == "promoted",
        "{status}"
    );
    let text = setup.admin.ok(&["policy", "status"])?;
    ensure!(
        text.contains("promoted after a 3 s canary of group canaries"),
        "{text}"
    );
    let audited = eventually(Duration::from_secs(30), || async {
        let rows = collector_audit(&setup.stack, "policy.promote").await.ok()?;
        rows.into_iter().find(|(result, _)| result == "ok")
    })
    .await;
    ensure!(audited.is_some(), "the promotion is not in the audit log");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_rolls_back_on_its_own() -> Result<()> {
    let setup = setup("e2e_canary_fail").await?;
    let previous = setup.serial;
    let push = ztctl_in_background(
        &setup.admin,
        [
            "policy",
            "push",
            &setup.layer("second")?,
            "--canary",
            "canaries",
            "--canary-seconds",
            "60",
            "--wait",
            "60",
        ]
        .map(str::to_owned)
        .to_vec(),
    );

    // The canary devices get the new serial; every other device keeps the
    // one before while the canary runs.
    let serial = eventually(WAIT, || async {
        let status = setup.status().ok()?;
        let rollout = &status["rollout"];
        let serial = rollout["serial"].as_u64()?;
        (rollout["state"] == "canary"
            && serial > previous
            && setup.canaries.iter().all(|a| a.bundle_serial() == serial))
        .then_some(serial)
    })
    .await
    .with_context(|| {
        format!(
            "the canary did not get the new serial\n{}",
            setup.stack.logs()
        )
    })?;
    let others: Vec<u64> = setup.others.iter().map(|a| a.bundle_serial()).collect();
    let still = setup.status()?;
    ensure!(
        still["rollout"]["state"] == "canary" && still["rollout"]["serial"] == serial,
        "{still}"
    );
    // (The canary ran from before the first read to after the last, so the
    // others were read while held back.)
    ensure!(
        others.iter().all(|&s| s == previous),
        "devices outside the canary got serial {serial}: {others:?}"
    );
    ensure!(
        still["rollout"]["previous_serial"] == previous && still["rollout"]["staged"] == true,
        "{still}"
    );
    let text = setup.admin.ok(&["policy", "status"])?;
    ensure!(text.contains("waits for the canary"), "{text}");

    // The canary devices start sending many denied decisions, until the
    // collector rolls the push back on its own.
    let mut streams = Vec::new();
    for agent in &setup.canaries {
        streams.push(Telemetry::open(&setup.stack, agent).await?);
    }
    let streams = tokio::sync::Mutex::new(streams);
    let rolled_back = eventually(WAIT, || async {
        for telemetry in streams.lock().await.iter_mut() {
            telemetry.decisions(10, 2, serial).await.ok()?;
        }
        let status = setup.status().ok()?;
        (status["rollout"]["state"] == "rolled_back").then_some(status)
    })
    .await
    .with_context(|| format!("the canary was not rolled back\n{}", setup.stack.logs()))?;
    let stored: u64 = streams
        .lock()
        .await
        .iter()
        .map(|t| t.stored.load(Ordering::Relaxed))
        .sum();
    ensure!(stored > 0, "no decision was stored");

    let rollout = &rolled_back["rollout"];
    let rollback = rollout["rollback_serial"]
        .as_u64()
        .context("rollback serial")?;
    let reason = rollout["reason"].as_str().context("reason")?;
    ensure!(
        rollout["serial"] == serial && rollout["previous_serial"] == previous && rollback > serial,
        "{rolled_back}"
    );
    ensure!(
        reason.contains("the canary's deny rate rose from"),
        "{rolled_back}"
    );
    ensure!(
        rollout["deny_rate_during"].as_f64().unwrap_or(0.0)
            > rollout["deny_rate_before"].as_f64().unwrap_or(f64::MAX),
        "{rolled_back}"
    );

    // Every agent, canary or not, ends on the rollback serial, whose bundle
    // restores the serial before the canary.
    let everyone = eventually(WAIT, || async {
        setup
            .all()
            .all(|a| a.bundle_serial() == rollback)
            .then_some(())
    })
    .await;
    ensure!(
        everyone.is_some(),
        "not every agent got the rollback: {:?}",
        setup
            .all()
            .map(|a| (a.device_id.as_str(), a.bundle_serial()))
            .collect::<Vec<_>>()
    );
    for agent in setup.all() {
        let kept = agent.kept_bundle()?.context("no bundle kept")?;
        ensure!(
            kept.serial == rollback && kept.restores == Some(previous) && kept.canary.is_none(),
            "{}: {kept:?}",
            agent.device_id
        );
    }
    let status = setup.status()?;
    ensure!(status["serial"] == rollback, "{status}");
    ensure!(
        status["agents"]
            .as_array()
            .context("agents")?
            .iter()
            .all(|a| a["applied_serial"] == rollback && a["error"] == ""),
        "{status}"
    );

    // ztctl followed it all and fails with the reason.
    let outcome = push.await??;
    let Err(stderr) = outcome else {
        anyhow::bail!("ztctl policy push succeeded although the canary was rolled back")
    };
    ensure!(stderr.contains("canary failed, rolled back"), "{stderr}");
    ensure!(
        stderr.contains(&format!(
            "serial {serial} was rolled back (serial {rollback} restores {previous})"
        )),
        "{stderr}"
    );
    ensure!(stderr.contains("deny rate rose"), "{stderr}");

    // The collector's own act is audited, with the reason.
    let audited = eventually(Duration::from_secs(30), || async {
        let rows = collector_audit(&setup.stack, "policy.rollback")
            .await
            .ok()?;
        rows.into_iter()
            .find(|(result, detail)| result == "ok" && detail.contains("deny rate rose"))
    })
    .await;
    ensure!(
        audited.is_some(),
        "the automatic rollback is not in the audit log"
    );

    // It is over: the next push goes out again.
    let reply = setup.admin.json(&[
        "policy",
        "push",
        &setup.layer("third")?,
        "--wait",
        "60",
        "--json",
    ])?;
    ensure!(reply["rollout"][0]["applied"] == AGENTS, "{reply}");
    Ok(())
}
