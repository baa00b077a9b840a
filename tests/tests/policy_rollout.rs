//! Policy rollout end to end: ztctl users of different roles push, check
//! and roll back policy through the real collector, and 200 agents (the
//! agent's own control channel, in-process, each enrolled with its own key
//! over real gRPC and mutual TLS) receive the signed bundles, check them and
//! acknowledge; `ztctl policy push` follows the rollout until every agent
//! has.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use zt_e2e::{eventually, fleet_sim::start_fleet, stack::Stack, ztctl::ZtctlUser};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policy/examples");
const CITY_A_AGENTS: usize = 150;
const CITY_B_AGENTS: usize = 50;

fn rollout<'a>(reply: &'a serde_json::Value, org: &str) -> &'a serde_json::Value {
    reply["rollout"]
        .as_array()
        .and_then(|r| r.iter().find(|o| o["org"] == org))
        .unwrap_or(&serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_reaches_200_agents_and_every_one_acknowledges() -> Result<()> {
    let stack = Stack::new("e2e_policy").await?;
    let _collector = stack.start_collector().await?;
    let soc = ZtctlUser::create(&stack, "pref", "soc", "soc")?;
    let admin_a = ZtctlUser::create(&stack, "city-a", "tanaka", "admin")?;
    let analyst_a = ZtctlUser::create(&stack, "city-a", "kato", "analyst")?;
    let admin_b = ZtctlUser::create(&stack, "city-b", "mori", "admin")?;

    let mut fleet = start_fleet(&stack, &soc, "city-a", "pc", CITY_A_AGENTS).await?;
    fleet.extend(start_fleet(&stack, &soc, "city-b", "pc", CITY_B_AGENTS).await?);
    // Every control channel is open before the push.
    let open = eventually(Duration::from_secs(30), || async {
        let a = soc
            .json(&["policy", "status", "--org", "city-a", "--json"])
            .ok()?;
        let b = soc
            .json(&["policy", "status", "--org", "city-b", "--json"])
            .ok()?;
        let connected = |s: &serde_json::Value| {
            s["agents"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|x| x["connected"] == true).count())
        };
        (connected(&a) == CITY_A_AGENTS && connected(&b) == CITY_B_AGENTS).then_some(())
    })
    .await;
    ensure!(open.is_some(), "not every agent opened its control channel");

    // Only the SOC pushes the baseline.
    let baseline = format!("{EXAMPLES}/baseline.yaml");
    let refused = admin_a.ztctl(&["policy", "push", &baseline, "--json"])?;
    let Err(stderr) = refused else {
        anyhow::bail!("a municipality's admin pushed the baseline")
    };
    ensure!(stderr.contains("may not push the baseline"), "{stderr}");

    // The SOC's baseline push reaches all 200 and each acknowledges.
    let reply = soc.json(&["policy", "push", &baseline, "--wait", "60", "--json"])?;
    let base_serial = reply["serial"].as_u64().context("serial")?;
    for (org, count) in [("city-a", CITY_A_AGENTS), ("city-b", CITY_B_AGENTS)] {
        let r = rollout(&reply, org);
        ensure!(
            r["applied"] == count && r["connected"] == count && r["refused"] == 0,
            "baseline rollout to {org}: {r}"
        );
    }
    ensure!(fleet.iter().all(|a| a.bundle_serial() == base_serial));

    // city-a's own layer: its admin pushes it; it reaches city-a only.
    let city_a = format!("{EXAMPLES}/city-a.yaml");
    let Err(stderr) = admin_b.ztctl(&["policy", "push", &city_a, "--json"])? else {
        anyhow::bail!("city-b's admin pushed city-a's policy")
    };
    // Refused already when ztctl reads city-a's policy in force to check
    // the layer against it.
    ensure!(
        stderr.contains("may not read organisation city-a"),
        "{stderr}"
    );
    let Err(stderr) = analyst_a.ztctl(&["policy", "push", &city_a, "--json"])? else {
        anyhow::bail!("an analyst pushed policy")
    };
    ensure!(
        stderr.contains("may not change organisation city-a"),
        "{stderr}"
    );
    let diff = admin_a.ok(&["policy", "diff", &city_a])?;
    ensure!(diff.contains("+ rule ledger-for-finance"), "{diff}");
    let reply = admin_a.json(&["policy", "push", &city_a, "--wait", "60", "--json"])?;
    let org_serial = reply["serial"].as_u64().context("serial")?;
    ensure!(org_serial > base_serial);
    let r = rollout(&reply, "city-a");
    ensure!(r["applied"] == CITY_A_AGENTS && r["refused"] == 0, "{r}");
    let (a, b) = fleet.split_at(CITY_A_AGENTS);
    ensure!(a.iter().all(|x| x.bundle_serial() == org_serial));
    ensure!(
        b.iter().all(|x| x.bundle_serial() == base_serial),
        "city-b got city-a's bundle"
    );

    // The policy in force explains a flow of one of city-a's devices.
    // (The example's device groups name the trust domain pref.example.)
    let explained = admin_a.json(&[
        "policy",
        "explain",
        "--device",
        "spiffe://pref.example/org/city-a/device/fin-01",
        "--user",
        "tanaka",
        "--exe",
        "/usr/bin/curl",
        "--to",
        "10.30.0.10:443",
        "--json",
    ])?;
    ensure!(explained["rule"] == "ledger-for-finance", "{explained}");

    // A broken layer is refused with its position and signs nothing.
    let broken = stack.dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&city_a)?.replace("action: allow", "action: alow"),
    )?;
    let Err(stderr) = admin_a.ztctl(&["policy", "push", broken.to_str().context("path")?])? else {
        anyhow::bail!("a broken policy was pushed")
    };
    ensure!(
        stderr.contains("broken.yaml:39:13: error: action `alow`"),
        "{stderr}"
    );
    let status = admin_a.json(&["policy", "status", "--json"])?;
    ensure!(status["serial"] == org_serial, "{status}");

    // Rollback: the baseline-only content of city-a comes back as a new
    // serial, and every city-a agent applies it.
    let reply = admin_a.json(&[
        "policy",
        "rollback",
        &base_serial.to_string(),
        "--wait",
        "60",
        "--json",
    ])?;
    let rolled = reply["serial"].as_u64().context("serial")?;
    ensure!(
        rolled > org_serial && reply["restores"] == base_serial,
        "{reply}"
    );
    ensure!(
        rollout(&reply, "city-a")["applied"] == CITY_A_AGENTS,
        "{reply}"
    );
    ensure!(a.iter().all(|x| x.bundle_serial() == rolled));
    let status = admin_a.json(&["policy", "status", "--json"])?;
    let agents = status["agents"].as_array().context("agents")?;
    ensure!(agents.len() == CITY_A_AGENTS);
    ensure!(agents
        .iter()
        .all(|x| x["applied_serial"] == rolled && x["error"] == ""));
    Ok(())
}
