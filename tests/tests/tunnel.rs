//! The zero-trust tunnel end to end, on a LAN of network namespaces: a
//! staff PC, a server and an outsider, each a namespace; the collector in
//! the root namespace on the LAN's bridge address. Both agents are real
//! `zt-agent` processes guarding a cgroup of the test's own (the PC's
//! callers run in one, the server's services in another).
//!
//! * `curl` as an allowed user reaches the server's web service through the
//!   tunnel; a non-allowed binary and a non-allowed user are refused at the
//!   gateway, the decisions naming the rule (or the nearest rules);
//! * a denied destination fails with EPERM in the kernel;
//! * direct connections to the protected port, from the outsider and from
//!   the PC outside the tunnel, are dropped by the server's kernel;
//! * a peer with a certificate from another CA is refused at the gateway;
//! * 1,000 concurrent tunnelled connections carry their bytes intact;
//! * a policy change closes a live tunnelled stream within a second, and a
//!   revoked device is refused.

use std::{
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{ensure, Context as _, Result};
use zt_e2e::{
    eventually,
    netns::Host,
    pki,
    stack::{Stack, TEST_ORG},
    tunnel_site::{
        run_on, server_policy_text, spawn_in, Site, SiteOptions, CONNECT_ONCE, DENIED_PORT,
        ECHO_PORT, GATEWAY_PORT, WEB_PORT,
    },
};

/// Opens N connections at once, each sending its own random bytes and
/// checking the SHA-256 of what comes back.
const ECHO_FLOOD: &str = r#"
import asyncio, hashlib, os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
async def one():
    data = os.urandom(size)
    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
    async def send():
        w.write(data)
        await w.drain()
        w.write_eof()
    async def receive():
        got = bytearray()
        while True:
            chunk = await asyncio.wait_for(r.read(65536), 30)
            if not chunk:
                return bytes(got)
            got += chunk
    sent, got = await asyncio.gather(send(), receive(), return_exceptions=True)
    w.close()
    for outcome in (sent, got):
        if isinstance(outcome, BaseException):
            raise outcome
    return hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
async def main():
    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    ok = sum(1 for r in results if r is True)
    errors = sorted({repr(r) for r in results if r is not True})[:5]
    print(f"ok={ok} failed={n - ok} {errors}", flush=True)
asyncio.run(main())
"#;

/// Holds one connection open after an echo round trip; prints when the far
/// side closed it (unix time), or that it did not within 20 s.
const LONG_LIVED: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"ping")
assert s.recv(4) == b"ping"
print("ready", flush=True)
s.settimeout(20)
try:
    data = s.recv(1)
    print("closed_at=%f eof=%s" % (time.time(), data == b""), flush=True)
except socket.timeout:
    print("still open", flush=True)
except OSError as e:
    print("closed_at=%f error=%s" % (time.time(), e), flush=True)
"#;

#[derive(Debug, Clone, clickhouse::Row, serde::Deserialize)]
struct DecisionRow {
    device_id: String,
    connection_id: String,
    exe: String,
    user_name: String,
    exe_sha256: String,
    remote_addr: String,
    remote_port: u16,
    action: String,
    verdict: String,
    rule_id: String,
    enforcement_point: String,
    peer_id: String,
    service: String,
    direction: String,
    reason: String,
    nearest_rules: Vec<String>,
}

async fn decisions(stack: &Stack) -> Result<Vec<DecisionRow>> {
    Ok(stack
        .db()
        .query(
            "SELECT device_id, connection_id, exe, user_name, exe_sha256, remote_addr, \
             remote_port, action, verdict, rule_id, enforcement_point, peer_id, service, \
             direction, reason, nearest_rules FROM decisions FINAL ORDER BY time_ns",
        )
        .fetch_all::<DecisionRow>()
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_carries_allowed_callers_and_refuses_everyone_else() -> Result<()> {
    let site = Site::start("e2e_tunnel").await?;
    let srv = site.server.addr();
    let url = format!("http://{srv}:{WEB_PORT}/hello.txt");

    // The allowed caller: root's curl, through the tunnel.
    let body = site.run_on_pc(
        true,
        None,
        &["/usr/bin/curl", "-sS", "--max-time", "10", &url],
    )?;
    assert_eq!(body, "hello through the tunnel\n", "{}", site.logs());

    // A binary the gateway does not allow, and a user it does not allow.
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
    assert!(
        python.contains("closed") || python.contains("ECONNRESET"),
        "python must be refused: {python}\n{}",
        site.logs()
    );
    let nobody = site.run_on_pc(
        true,
        Some(65534),
        &["/usr/bin/curl", "-sS", "--max-time", "10", &url],
    )?;
    assert_eq!(nobody, "", "nobody must get nothing");

    // A denied destination: EPERM in the PC's kernel.
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
    assert_eq!(denied.trim(), "EPERM");

    // Around the tunnel: the protected port is dropped by the server's
    // kernel, from the outsider and from the PC outside its guarded cgroup.
    let outsider = run_on(
        &site.outsider,
        None,
        None,
        &[
            "/usr/bin/python3",
            "-c",
            CONNECT_ONCE,
            &srv.to_string(),
            &WEB_PORT.to_string(),
        ],
    )?;
    assert_eq!(
        outsider.trim(),
        "timeout",
        "outsider must not reach the service"
    );
    let bypass = site.run_on_pc(
        false,
        None,
        &[
            "/usr/bin/python3",
            "-c",
            CONNECT_ONCE,
            &srv.to_string(),
            &WEB_PORT.to_string(),
        ],
    )?;
    assert_eq!(
        bypass.trim(),
        "timeout",
        "the PC must not reach the service around the tunnel"
    );

    // A peer whose certificate comes from another CA is refused at the
    // handshake, where one of ours gets as far as the policy.
    gateway_checks_the_peers_ca(&site).await?;

    // The decisions, from both ends.
    let pc_id = format!("/org/{TEST_ORG}/device/pc");
    let rows = eventually(Duration::from_secs(30), || async {
        let rows = decisions(&site.stack).await.ok()?;
        let gateway_refusals = rows
            .iter()
            .filter(|r| r.enforcement_point == "gateway" && r.verdict == "denied")
            .count();
        let ingress = rows
            .iter()
            .filter(|r| r.enforcement_point == "kernel_ingress")
            .count();
        (gateway_refusals >= 2 && ingress >= 2 && rows.iter().any(|r| r.verdict == "tunnelled"))
            .then_some(rows)
    })
    .await
    .with_context(|| format!("decisions did not arrive\n{}", site.logs()))?;

    let tunnelled = rows
        .iter()
        .find(|r| r.enforcement_point == "tunnel" && r.verdict == "tunnelled")
        .context("no tunnel record")?;
    assert_eq!(tunnelled.device_id, "pc");
    assert_eq!(tunnelled.rule_id, "intranet-via-gateway");
    assert_eq!(tunnelled.exe, "/usr/bin/curl");
    assert_eq!(tunnelled.exe_sha256.len(), 64);
    assert_eq!(
        (tunnelled.remote_addr.as_str(), tunnelled.remote_port),
        (srv.to_string().as_str(), WEB_PORT)
    );
    assert!(tunnelled.peer_id.ends_with("/device/srv"), "{tunnelled:?}");
    let allowed = rows
        .iter()
        .find(|r| r.connection_id == tunnelled.connection_id && r.enforcement_point == "gateway")
        .context("the gateway's record of the same connection")?;
    assert_eq!(
        (
            allowed.device_id.as_str(),
            allowed.verdict.as_str(),
            allowed.rule_id.as_str()
        ),
        ("srv", "allowed", "staff-curl")
    );
    assert!(allowed.peer_id.ends_with(&pc_id), "{allowed:?}");
    assert_eq!(
        (allowed.user_name.as_str(), allowed.service.as_str()),
        ("root", "intranet-web")
    );
    assert_eq!(allowed.direction, "inbound");

    let refused_python = rows
        .iter()
        .find(|r| {
            r.enforcement_point == "gateway"
                && r.verdict == "denied"
                && r.exe.starts_with("/usr/bin/python3")
        })
        .context("the gateway's refusal of python")?;
    assert_eq!(refused_python.rule_id, "", "a default denial");
    assert_eq!(refused_python.reason, "policy");
    assert!(
        refused_python
            .nearest_rules
            .iter()
            .any(|n| n.starts_with("staff-curl: executable /usr/bin/python3")),
        "{refused_python:?}"
    );
    let refused_nobody = rows
        .iter()
        .find(|r| {
            r.enforcement_point == "gateway" && r.verdict == "denied" && r.user_name == "nobody"
        })
        .context("the gateway's refusal of nobody")?;
    assert!(
        refused_nobody
            .nearest_rules
            .iter()
            .any(|n| n.contains("user nobody is not one of [root]")),
        "{refused_nobody:?}"
    );
    // The caller's side records the refusal too, under the same id.
    assert!(rows
        .iter()
        .any(|r| r.connection_id == refused_nobody.connection_id
            && r.enforcement_point == "tunnel"
            && r.verdict == "denied"
            && r.reason == "policy"));

    let kernel_denial = rows
        .iter()
        .find(|r| r.enforcement_point == "kernel" && r.remote_port == DENIED_PORT)
        .context("the kernel's denial")?;
    assert_eq!(
        (
            kernel_denial.action.as_str(),
            kernel_denial.verdict.as_str(),
            kernel_denial.rule_id.as_str()
        ),
        ("deny", "denied", "no-admin-port")
    );
    let dropped: Vec<&DecisionRow> = rows
        .iter()
        .filter(|r| r.enforcement_point == "kernel_ingress")
        .collect();
    assert!(dropped.iter().all(|r| r.device_id == "srv"
        && r.direction == "inbound"
        && r.reason == "protected_port"
        && r.rule_id == "protect:intranet-web"
        && r.remote_port == WEB_PORT));
    let sources: std::collections::BTreeSet<&str> =
        dropped.iter().map(|r| r.remote_addr.as_str()).collect();
    assert!(
        sources.contains(site.outsider.addr().to_string().as_str()),
        "{sources:?}"
    );
    assert!(
        sources.contains(site.pc.addr().to_string().as_str()),
        "{sources:?}"
    );
    Ok(())
}

/// The same over IPv6: the PC's policy sends the server's IPv6 address
/// through the gateway (the kernel's `connect6` redirect; the QUIC tunnel
/// itself runs over IPv4) and denies an admin port of it; the server's
/// policy names the IPv6 destination as a protected service. curl reaches
/// it through the tunnel, the denied port fails with EPERM, the outsider's
/// direct IPv6 connection is dropped by the server's kernel, and the
/// decisions carry the IPv6 address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_carries_ipv6_destinations() -> Result<()> {
    // The web service once more, on both stacks (`--bind ::`), so that a
    // direct IPv6 connection would reach it but for the server's guard.
    const WEB6_PORT: u16 = 8086;
    let options = SiteOptions {
        server_programs: vec![[
            "/usr/bin/python3",
            "-m",
            "http.server",
            &WEB6_PORT.to_string(),
            "--bind",
            "::",
        ]
        .map(str::to_owned)
        .to_vec()],
        wait_for_ports: vec![WEB6_PORT],
        pc_policy_extra: format!(
            r#"
[[rule]]
id = "intranet-v6-via-gateway"
action = "tunnel"
destinations = ["{{srv6}}"]
ports = [{WEB6_PORT}]
gateway = "{{srv}}:{GATEWAY_PORT}"

[[rule]]
id = "no-admin-port-v6"
action = "deny"
destinations = ["{{srv6}}/128"]
ports = [{DENIED_PORT}]
"#
        ),
        server_policy_extra: format!(
            r#"
[[service]]
name = "intranet-web-v6"
destinations = ["{{srv6}}"]
ports = [{WEB6_PORT}]
target = "127.0.0.1:{WEB_PORT}"
class = "protected"

[[access]]
id = "staff-curl-v6"
service = "intranet-web-v6"
action = "allow"
orgs = ["{TEST_ORG}"]
users = ["root"]
exes = ["/usr/bin/curl"]
"#
        ),
        ..SiteOptions::default()
    };
    let site = Site::start_with("e2e_tunnel6", options).await?;
    let srv6 = site.server.addr6();
    let url = format!("http://[{srv6}]:{WEB6_PORT}/hello.txt");

    let body = site.run_on_pc(
        true,
        None,
        &["/usr/bin/curl", "-gsS", "--max-time", "10", &url],
    )?;
    assert_eq!(body, "hello through the tunnel\n", "{}", site.logs());

    let connect_once = |host: &Host, port: u16, in_cgroup: bool| -> Result<String> {
        let argv = [
            "/usr/bin/python3",
            "-c",
            CONNECT_ONCE,
            &srv6.to_string(),
            &port.to_string(),
        ];
        Ok(if in_cgroup {
            site.run_on_pc(true, None, &argv)?
        } else {
            run_on(host, None, None, &argv)?
        })
    };
    assert_eq!(connect_once(&site.pc, DENIED_PORT, true)?.trim(), "EPERM");
    assert_eq!(
        connect_once(&site.outsider, WEB6_PORT, false)?.trim(),
        "timeout",
        "the outsider must not reach the service over IPv6"
    );

    let rows = eventually(Duration::from_secs(30), || async {
        let rows = decisions(&site.stack).await.ok()?;
        let seen = |point: &str, verdict: &str| {
            rows.iter()
                .any(|r| r.enforcement_point == point && r.verdict == verdict)
        };
        (seen("tunnel", "tunnelled")
            && seen("gateway", "allowed")
            && seen("kernel", "denied")
            && rows.iter().any(|r| r.enforcement_point == "kernel_ingress"))
        .then_some(rows)
    })
    .await
    .with_context(|| format!("decisions did not arrive\n{}", site.logs()))?;
    let srv6 = srv6.to_string();
    let tunnelled = rows
        .iter()
        .find(|r| r.enforcement_point == "tunnel" && r.verdict == "tunnelled")
        .context("no tunnel record")?;
    assert_eq!(
        (
            tunnelled.rule_id.as_str(),
            tunnelled.remote_addr.as_str(),
            tunnelled.remote_port
        ),
        ("intranet-v6-via-gateway", srv6.as_str(), WEB6_PORT)
    );
    let allowed = rows
        .iter()
        .find(|r| r.connection_id == tunnelled.connection_id && r.enforcement_point == "gateway")
        .context("the gateway's record of the same connection")?;
    assert_eq!(
        (
            allowed.verdict.as_str(),
            allowed.rule_id.as_str(),
            allowed.service.as_str()
        ),
        ("allowed", "staff-curl-v6", "intranet-web-v6")
    );
    let denied = rows
        .iter()
        .find(|r| r.enforcement_point == "kernel" && r.verdict == "denied")
        .context("the kernel's denial")?;
    assert_eq!(
        (
            denied.rule_id.as_str(),
            denied.remote_addr.as_str(),
            denied.remote_port
        ),
        ("no-admin-port-v6", srv6.as_str(), DENIED_PORT)
    );
    let dropped = rows
        .iter()
        .find(|r| r.enforcement_point == "kernel_ingress")
        .context("the server's drop of the direct connection")?;
    assert_eq!(
        (
            dropped.remote_addr.as_str(),
            dropped.rule_id.as_str(),
            dropped.reason.as_str()
        ),
        (
            site.outsider.addr6().to_string().as_str(),
            "protect:intranet-web-v6",
            "protected_port"
        )
    );
    Ok(())
}

/// QUIC clients from the root namespace (on the LAN through its bridge):
/// a device of our CA reaches the gateway's policy (and is refused there,
/// being no caller the policy names); a device of another CA, trusting
/// ours, is refused at the handshake.
async fn gateway_checks_the_peers_ca(site: &Site) -> Result<()> {
    let gateway = std::net::SocketAddr::new(site.server.addr().into(), GATEWAY_PORT);
    let request = zt_tunnel::OpenRequest::to(std::net::SocketAddr::new(
        site.server.addr().into(),
        WEB_PORT,
    ));
    let state = site.stack.collector_state();
    let ours = zt_tunnel::TunnelClient::new(
        "0.0.0.0:0".parse()?,
        pki::tunnel_peer_tls(&state, None, TEST_ORG, "visitor")?,
    )?;
    match tokio::time::timeout(Duration::from_secs(15), ours.open(gateway, &request)).await? {
        Err(zt_tunnel::TunnelError::Denied { .. }) => {}
        other => anyhow::bail!("a device of our CA: {:?}", other.map(|_| "opened")),
    }
    let dir = tempfile::tempdir()?;
    let foreign = zt_tunnel::TunnelClient::new(
        "0.0.0.0:0".parse()?,
        pki::tunnel_peer_tls(&state, Some(dir.path()), TEST_ORG, "intruder")?,
    )?;
    match tokio::time::timeout(Duration::from_secs(15), foreign.open(gateway, &request)).await? {
        Err(zt_tunnel::TunnelError::Denied { .. }) | Ok(_) => {
            anyhow::bail!("a device of another CA got past the handshake")
        }
        Err(_) => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_flow_and_policy_changes_and_revocation_close_them() -> Result<()> {
    let site = Site::start("e2e_tunnel_live").await?;
    let srv = site.server.addr().to_string();
    let echo = ECHO_PORT.to_string();

    // 1,000 concurrent tunnelled connections, 32 KiB each way.
    let flood = site.run_on_pc(
        true,
        None,
        &[
            "/usr/bin/python3",
            "-c",
            ECHO_FLOOD,
            &srv,
            &echo,
            "1000",
            "32768",
        ],
    )?;
    assert!(
        flood.starts_with("ok=1000 failed=0"),
        "{flood}\n{}",
        site.logs()
    );

    // A live stream, then a policy that no longer allows it.
    let mut long = spawn_in(
        &site.pc,
        &site.stack.guarded,
        &["/usr/bin/python3", "-c", LONG_LIVED, &srv, &echo],
        Stdio::piped(),
    )?;
    let mut out = std::io::BufReader::new(long.stdout.take().context("stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    ensure!(
        line.trim() == "ready",
        "long-lived stream did not start: {line:?}\n{}",
        site.logs()
    );
    let changed_at = unix_now();
    std::fs::write(
        &site.server_policy,
        server_policy_text(site.server.addr(), false),
    )?;
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    let _ = long.wait();
    let closed_at: f64 = line
        .trim()
        .strip_prefix("closed_at=")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .with_context(|| format!("the stream was not closed: {line:?}\n{}", site.logs()))?;
    let took = closed_at - changed_at;
    eprintln!("live stream closed {took:.3} s after the policy file was written");
    assert!(
        took < 1.0,
        "closed {took:.3} s after the policy change (poll 250 ms + teardown; the issue asks for 1 s)"
    );

    // The new policy refuses new echo connections; restore it, then revoke
    // the PC: the gateway refuses it.
    let refused = site.run_on_pc(
        true,
        None,
        &["/usr/bin/python3", "-c", ECHO_FLOOD, &srv, &echo, "1", "16"],
    )?;
    assert!(refused.starts_with("ok=0 failed=1"), "{refused}");
    std::fs::write(
        &site.server_policy,
        server_policy_text(site.server.addr(), true),
    )?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let again = site.run_on_pc(
        true,
        None,
        &["/usr/bin/python3", "-c", ECHO_FLOOD, &srv, &echo, "1", "16"],
    )?;
    assert!(
        again.starts_with("ok=1 failed=0"),
        "{again}\n{}",
        site.logs()
    );

    revoke(&site.stack, "pc")?;
    let refused_after_revocation = eventually(Duration::from_secs(20), || async {
        let out = site
            .run_on_pc(
                true,
                None,
                &["/usr/bin/python3", "-c", ECHO_FLOOD, &srv, &echo, "1", "16"],
            )
            .ok()?;
        out.starts_with("ok=0 failed=1").then_some(())
    })
    .await;
    ensure!(
        refused_after_revocation.is_some(),
        "a revoked device still tunnels\n{}",
        site.logs()
    );

    let rows = eventually(Duration::from_secs(30), || async {
        let rows = decisions(&site.stack).await.ok()?;
        rows.iter()
            .any(|r| r.enforcement_point == "gateway" && r.verdict == "closed")
            .then_some(rows)
    })
    .await
    .with_context(|| format!("no record of the closed stream\n{}", site.logs()))?;
    let opened = rows
        .iter()
        .filter(|r| {
            r.enforcement_point == "gateway" && r.verdict == "allowed" && r.service == "echo"
        })
        .count();
    assert!(
        opened >= 1001,
        "every tunnelled connection is recorded: {opened}"
    );
    Ok(())
}

/// Revoking the gateway's device: the PC's agent closes its live tunnels to
/// that gateway as soon as the revocation reaches it, and new connections
/// are refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_gateway_closes_the_pcs_tunnels_to_it() -> Result<()> {
    let site = Site::start("e2e_tunnel_gw_revoked").await?;
    let srv = site.server.addr().to_string();
    let echo = ECHO_PORT.to_string();
    let mut long = spawn_in(
        &site.pc,
        &site.stack.guarded,
        &["/usr/bin/python3", "-c", LONG_LIVED, &srv, &echo],
        Stdio::piped(),
    )?;
    let mut out = std::io::BufReader::new(long.stdout.take().context("stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    ensure!(
        line.trim() == "ready",
        "long-lived stream did not start: {line:?}\n{}",
        site.logs()
    );

    // The admin's credential first: the clock starts at `ztctl device
    // revoke`, not at issuing a certificate for the admin.
    let admin = zt_e2e::ztctl::ZtctlUser::create(&site.stack, TEST_ORG, "admin", "admin")?;
    let revoked_at = unix_now();
    admin.ok(&["device", "revoke", "srv"])?;
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    let _ = long.wait();
    let closed_at: f64 = line
        .trim()
        .strip_prefix("closed_at=")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .with_context(|| format!("the stream was not closed: {line:?}\n{}", site.logs()))?;
    let took = closed_at - revoked_at;
    eprintln!(
        "live stream to the revoked gateway closed {took:.3} s after `ztctl device revoke` started"
    );
    assert!(
        took < 1.0,
        "closed {took:.3} s after the revocation (the issue asks for 1 s)\n{}",
        site.logs()
    );
    let refused = site.run_on_pc(
        true,
        None,
        &["/usr/bin/python3", "-c", ECHO_FLOOD, &srv, &echo, "1", "16"],
    )?;
    assert!(
        refused.starts_with("ok=0 failed=1"),
        "a revoked gateway still carries new tunnels: {refused}\n{}",
        site.logs()
    );
    Ok(())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Revokes `device` as an admin would: `ztctl device revoke`.
fn revoke(stack: &Stack, device: &str) -> Result<()> {
    zt_e2e::ztctl::ZtctlUser::create(stack, TEST_ORG, "admin", "admin")?
        .ok(&["device", "revoke", device])?;
    Ok(())
}
