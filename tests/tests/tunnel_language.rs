//! The zero-trust path driven by one policy in the language, pushed through
//! the collector: the same signed baseline reaches the staff PC's agent and
//! the server's (the gateway). On the PC the kernel tunnels only root's
//! curl (a chain on user and binary groups); at the gateway the same rules
//! decide the tunnelled caller's device, user and binary; the server's
//! kernel drops direct connections to the protected service's port; a
//! denied destination fails with EPERM at the source.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use zt_e2e::{
    stack::TEST_ORG,
    tunnel_site::{Site, CONNECT_ONCE, DENIED_PORT, GATEWAY_PORT, WEB_PORT},
    ztctl::ZtctlUser,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pushed_policy_decides_at_the_source_and_at_the_gateway() -> Result<()> {
    let site = Site::start("e2e_tunnel_lang").await?;
    let srv = site.server.addr();
    let soc = ZtctlUser::create(&site.stack, "pref", "soc", "soc")?;
    let device = |name: &str| format!("spiffe://zt.local/org/{TEST_ORG}/device/{name}");
    let baseline = site.stack.dir.path().join("baseline.yaml");
    std::fs::write(
        &baseline,
        format!(
            r#"version: 1
kind: baseline
gateways:
  srv-gw: {{id: "{gateway_id}", address: "{srv}:{GATEWAY_PORT}"}}
groups:
  devices:
    pcs: ["{pc_id}"]
  users:
    staff: [root]
  binaries:
    browsers: [{{path: /usr/bin/curl}}]
services:
  web:
    addresses: ["{srv}"]
    ports: [{WEB_PORT}]
    gateway: srv-gw
    target: "127.0.0.1:{WEB_PORT}"
    class: protected
rules:
  - id: web-for-staff-curl
    action: tunnel
    from: {{devices: [pcs], users: [staff], binaries: [browsers]}}
    to: {{services: [web]}}
  - id: no-admin-port
    action: deny
    to: {{addresses: ["{srv}"], ports: [{DENIED_PORT}]}}
defaults: {{outbound: allow, inbound: deny}}
"#,
            gateway_id = device("srv"),
            pc_id = device("pc"),
        ),
    )?;
    let reply = soc.push_and_wait(&baseline)?;
    let rollout = &reply["rollout"][0];
    ensure!(
        rollout["applied"] == 2 && rollout["connected"] == 2,
        "both agents apply the bundle: {reply}\n{}",
        site.logs()
    );

    // Root's curl: tunnelled by the PC's kernel, allowed at the gateway.
    let url = format!("http://{srv}:{WEB_PORT}/hello.txt");
    let body = site.run_on_pc(
        true,
        None,
        &["/usr/bin/curl", "-sS", "--max-time", "10", &url],
    )?;
    ensure!(
        body == "hello through the tunnel\n",
        "{body}\n{}",
        site.logs()
    );
    // Another binary is not tunnelled; going direct, it meets the server's
    // kernel, which drops the protected port.
    let python = site.run_on_pc(
        true,
        None,
        &[
            "/usr/bin/python3",
            "-c",
            CONNECT_ONCE,
            &srv.to_string(),
            &WEB_PORT.to_string(),
        ],
    )?;
    ensure!(
        python.trim() == "timeout",
        "python: {python}\n{}",
        site.logs()
    );
    // Another user: the same.
    let nobody = site.run_on_pc(
        true,
        Some(65534),
        &["/usr/bin/curl", "-sS", "--max-time", "5", &url],
    )?;
    ensure!(nobody.is_empty(), "nobody got {nobody}");
    // A denied destination: EPERM at the source.
    let denied = site.run_on_pc(
        true,
        None,
        &[
            "/usr/bin/python3",
            "-c",
            CONNECT_ONCE,
            &srv.to_string(),
            &DENIED_PORT.to_string(),
        ],
    )?;
    ensure!(denied.trim() == "EPERM", "{denied}");

    // The gateway decided the tunnelled connection by the pushed rule.
    let serial = reply["serial"].as_u64().context("serial")?;
    #[derive(Debug, clickhouse::Row, serde::Deserialize)]
    struct Row {
        device_id: String,
        rule_id: String,
        verdict: String,
        policy_version: u64,
        enforcement_point: String,
    }
    let rows = zt_e2e::eventually(Duration::from_secs(15), || async {
        let rows = site
            .stack
            .db()
            .query("SELECT ?fields FROM decisions FINAL WHERE enforcement_point = 'gateway' AND rule_id = 'web-for-staff-curl'")
            .fetch_all::<Row>()
            .await
            .ok()?;
        (!rows.is_empty()).then_some(rows)
    })
    .await
    .with_context(|| format!("no gateway decision\n{}", site.logs()))?;
    ensure!(
        rows.iter().all(|r| r.device_id == "srv"
            && r.policy_version == serial
            && r.enforcement_point == "gateway"
            && r.rule_id == "web-for-staff-curl"
            && r.verdict != "denied"),
        "{rows:#?}"
    );
    Ok(())
}
