//! Identity end to end, with the real binaries: a device enrolls with a
//! one-time token (once; never with a used, expired or forged one), streams
//! telemetry over mutual TLS under the identity of its certificate whatever
//! its batches claim, and renews its short-lived certificate on a new key
//! without interrupting telemetry. Clients without a certificate from the
//! collector's CA get nothing.

use std::{os::unix::fs::PermissionsExt, time::Duration};

use anyhow::{ensure, Context as _, Result};
use proto::telemetry::{
    event::Kind, telemetry_client::TelemetryClient, AgentIdentity, Event, EventBatch, ProcessExec,
};
use tokio_stream::wrappers::ReceiverStream;
use zt_e2e::{
    cgroup::TestCgroup,
    eventually,
    pki::{create_token, device_tls, enroll},
    process::workspace_binary,
    stack::{marker_for, run_in_cgroup, Stack, TEST_ORG},
};

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Owner {
    org_id: String,
    device_id: String,
    hostname: String,
}

async fn owner_of_exec(stack: &Stack, marker: &str) -> Option<Owner> {
    stack
        .db()
        .query("SELECT org_id, device_id, hostname FROM process_events WHERE event_type = 'exec' AND has(argv, ?)")
        .bind(marker)
        .fetch_optional::<Owner>()
        .await
        .ok()
        .flatten()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_enrolls_one_device_once_and_its_events_carry_that_identity() -> Result<()> {
    let stack = Stack::new("e2e_enroll").await?;
    let _collector = stack.start_collector().await?;
    let collector_bin = workspace_binary("zt-collector")?;
    let agent_bin = workspace_binary("zt-agent")?;
    let url = stack.collector_url();

    let token = create_token(
        &collector_bin,
        &stack.collector_state(),
        TEST_ORG,
        "pc-0042",
    )?;
    let first = stack.agent_state("pc-0042");
    enroll(&agent_bin, &first, &url, &token)?;
    let device_pem = first.join("identity/device.pem");
    let mode = std::fs::metadata(&device_pem)?.permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the key is readable by root only");

    // `zt-agent status` reads the identity back; no agent runs yet (exit 3).
    let output = std::process::Command::new(&agent_bin)
        .arg("--state-dir")
        .arg(&first)
        .args(["status", "--json"])
        .output()?;
    ensure!(output.status.code() == Some(3), "status: {output:?}");
    let status: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(status["running"], false);
    assert_eq!(status["agent_state"], "never_ran");
    assert_eq!(
        status["spiffe_id"],
        format!("spiffe://zt.local/org/{TEST_ORG}/device/pc-0042")
    );
    assert_eq!(status["certificate_valid"], true);
    assert_eq!(status["collector_url"], url.as_str());

    // The same token a second time: refused, nothing written.
    let second = stack.agent_state("pc-0042-again");
    let err = enroll(&agent_bin, &second, &url, &token).unwrap_err();
    assert!(err.to_string().contains("already"), "{err}");
    assert!(!second.join("identity/device.pem").exists());
    let unenrolled = std::process::Command::new(&agent_bin)
        .arg("--state-dir")
        .arg(&second)
        .args(["status", "--json"])
        .output()?;
    assert_eq!(
        unenrolled.status.code(),
        Some(1),
        "status of an unenrolled device"
    );

    // A forged pin: the agent does not trust the collector, and says so.
    let pin_start = token.rfind('.').context("token has a pin")? + 1;
    let mut forged = token[..pin_start].to_owned();
    forged.push_str(&"0".repeat(64));
    let err = enroll(&agent_bin, &stack.agent_state("forged"), &url, &forged).unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("pin") || err.to_string().contains("certificate"),
        "{err}"
    );

    // An expired token.
    let output = std::process::Command::new(&collector_bin)
        .arg("--state-dir")
        .arg(stack.collector_state())
        .args([
            "token", "create", "--org", TEST_ORG, "--device", "late", "--ttl", "1s", "--json",
        ])
        .output()?;
    ensure!(output.status.success(), "{output:?}");
    let created: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(
        created["spiffe_id"],
        format!("spiffe://zt.local/org/{TEST_ORG}/device/late")
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let late = created["join_token"].as_str().context("join_token")?;
    let err = enroll(&agent_bin, &stack.agent_state("late"), &url, late).unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");

    // The enrolled device runs; its events carry the certificate's identity
    // and the host name it enrolled with.
    let _agent = stack.start_agent_named("pc-0042", &[]).await?;
    let cgroup = TestCgroup::create("enroll")?;
    let marker = marker_for("enroll");
    run_in_cgroup(&cgroup, "/bin/echo", &[&marker])?;
    let owner = eventually(Duration::from_secs(10), || owner_of_exec(&stack, &marker))
        .await
        .with_context(|| format!("exec not stored\n{}", stack.logs()))?;
    assert_eq!(owner.org_id, TEST_ORG);
    assert_eq!(owner.device_id, "pc-0042");
    assert_eq!(owner.hostname, hostname());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_stores_the_certificate_identity_and_refuses_strangers() -> Result<()> {
    let stack = Stack::new("e2e_mtls").await?;
    let _collector = stack.start_collector().await?;
    let url = stack.collector_url();

    // A device of org-a claims to be another org's device in its batches.
    let tls = device_tls(&stack.collector_state(), "org-a", "pc-a1")?;
    let mut client = TelemetryClient::new(zt_grpc_tls::channel(&url, tls).await?);
    let marker = marker_for("claim");
    let batch = EventBatch {
        batch_seq: 1,
        agent: Some(AgentIdentity {
            org_id: "org-b".into(),
            device_id: "someone-else".into(),
            hostname: "forged-host".into(),
            boot_id: uuid::Uuid::new_v4().to_string(),
            agent_version: "test".into(),
        }),
        events: vec![Event {
            seq: 1,
            time_unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as u64,
            ancestors: Vec::new(),
            kind: Some(Kind::Exec(ProcessExec {
                pid: 4242,
                tid: 4242,
                ppid: 1,
                filename: "/bin/echo".into(),
                argv: vec!["echo".into(), marker.clone()],
                ..Default::default()
            })),
        }],
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(batch).await?;
    let mut acks = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    let ack = tokio::time::timeout(Duration::from_secs(10), acks.message())
        .await
        .context("no ack")??
        .context("stream ended")?;
    assert_eq!((ack.stored, ack.rejected), (1, 0));
    let owner = owner_of_exec(&stack, &marker).await.context("row stored")?;
    assert_eq!(
        (owner.org_id.as_str(), owner.device_id.as_str()),
        ("org-a", "pc-a1"),
        "stored under the certificate's identity, not the claimed one"
    );
    drop(tx);

    // No client certificate: the TLS handshake succeeds (enrollment needs
    // that), telemetry does not.
    let bundle = zt_identity::pem::certificates_from_pem(&std::fs::read(
        stack.collector_state().join("ca/ca.crt"),
    )?)?;
    let anonymous = zt_identity::tls::client_config_without_certificate(&bundle)?;
    let mut client = TelemetryClient::new(zt_grpc_tls::channel(&url, anonymous).await?);
    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    let status = client.stream(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");

    // A certificate from another CA (even for the same trust domain): the
    // handshake fails.
    let rogue_dir = tempfile::tempdir()?;
    zt_identity::CertificateAuthority::create(
        &rogue_dir.path().join("ca"),
        &zt_identity::TrustDomain::new("zt.local")?,
    )?;
    let rogue = device_tls(rogue_dir.path(), "org-a", "pc-a1")?;
    let refused = async {
        let mut client = TelemetryClient::new(zt_grpc_tls::channel(&url, rogue).await?);
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        client.stream(ReceiverStream::new(rx)).await?;
        anyhow::Ok(())
    }
    .await;
    assert!(
        refused.is_err(),
        "a certificate from a foreign CA got through"
    );

    // The collector's own CA, but a certificate that expired an hour ago.
    let expired = zt_e2e::pki::device_tls_issued(
        &stack.collector_state(),
        "org-a",
        "pc-a1",
        std::time::SystemTime::now() - Duration::from_secs(2 * 3600),
        Duration::from_secs(3600),
    )?;
    let refused = async {
        let mut client = TelemetryClient::new(zt_grpc_tls::channel(&url, expired).await?);
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        client.stream(ReceiverStream::new(rx)).await?;
        anyhow::Ok(())
    }
    .await;
    assert!(refused.is_err(), "an expired certificate got through");
    Ok(())
}

/// Certificates live 60 s here: the agent renews at about half-life on a
/// new key and keeps streaming; the old certificate was never discarded
/// before the new one was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_certificate_is_renewed_on_a_new_key_without_a_gap() -> Result<()> {
    let stack = Stack::new("e2e_renew").await?;
    let _collector = stack
        .start_collector_with(&[("ZT_COLLECTOR_IDENTITY__CERTIFICATE_TTL_SECS", "60".into())])
        .await?;
    let mut agent = stack.start_agent().await?;
    let device_pem = stack.agent_state("agent").join("identity/device.pem");
    let before = std::fs::read_to_string(&device_pem)?;

    agent
        .wait_for_log("certificate renewed", Duration::from_secs(50))
        .await?;
    let after = std::fs::read_to_string(&device_pem)?;
    let split = |pem: &str| {
        let at = pem.find("-----BEGIN CERTIFICATE-----").unwrap_or(pem.len());
        (pem[..at].to_owned(), pem[at..].to_owned())
    };
    let (key_before, cert_before) = split(&before);
    let (key_after, cert_after) = split(&after);
    assert_ne!(key_before, key_after, "renewal rotates the key");
    assert_ne!(cert_before, cert_after);
    let der = zt_identity::pem::certificates_from_pem(cert_after.as_bytes())?;
    let id = zt_identity::peer_identity(&der[0])?;
    assert_eq!(
        id.to_string(),
        format!("spiffe://zt.local/org/{TEST_ORG}/device/agent")
    );

    // Telemetry still flows (a new connection presents the new certificate).
    let cgroup = TestCgroup::create("renew")?;
    let marker = marker_for("renew");
    run_in_cgroup(&cgroup, "/bin/echo", &[&marker])?;
    eventually(Duration::from_secs(10), || owner_of_exec(&stack, &marker))
        .await
        .with_context(|| format!("exec after renewal not stored\n{}", stack.logs()))?;
    assert!(!agent.log().contains("renewal failed"), "{}", agent.log());
    Ok(())
}

/// The collector is away when renewal falls due: the agent keeps the
/// certificate it has (and says so), retries with backoff, and renews once
/// the collector is back, before the certificate expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_renewal_keeps_the_certificate_and_retries() -> Result<()> {
    let stack = Stack::new("e2e_renew_outage").await?;
    let ttl = [("ZT_COLLECTOR_IDENTITY__CERTIFICATE_TTL_SECS", "60".into())];
    let mut collector = stack.start_collector_with(&ttl).await?;
    let mut agent = stack.start_agent().await?;
    let device_pem = stack.agent_state("agent").join("identity/device.pem");
    let issued = std::fs::read_to_string(&device_pem)?;

    // Renewal is due 27–33 s after issue: be away from 15 s on.
    tokio::time::sleep(Duration::from_secs(15)).await;
    collector
        .terminate(Duration::from_secs(10))
        .context("collector did not stop")?;
    agent
        .wait_for_log("certificate renewal failed", Duration::from_secs(30))
        .await?;
    assert_eq!(
        std::fs::read_to_string(&device_pem)?,
        issued,
        "a failed renewal leaves the certificate in use alone"
    );
    assert!(agent.exited().is_none(), "{}", agent.log());

    let _collector = stack.start_collector_with(&ttl).await?;
    agent
        .wait_for_log("certificate renewed", Duration::from_secs(30))
        .await?;
    assert_ne!(std::fs::read_to_string(&device_pem)?, issued);
    let cgroup = TestCgroup::create("renew-outage")?;
    let marker = marker_for("renew-outage");
    run_in_cgroup(&cgroup, "/bin/echo", &[&marker])?;
    eventually(Duration::from_secs(15), || owner_of_exec(&stack, &marker))
        .await
        .with_context(|| format!("exec after the outage not stored\n{}", stack.logs()))?;
    Ok(())
}
