//! A site for the zero-trust tunnel end to end, shared by the tunnel test
//! (`tests/tests/tunnel.rs`) and the tunnel benchmark
//! (`tests/benches/tunnel_e2e.rs`): a LAN of network namespaces (a staff PC,
//! a server and an outsider), the stack with its collector on the LAN's
//! bridge address, and two real `zt-agent` processes: the PC's guards the
//! stack's cgroup with a policy whose `tunnel` rule sends the server's
//! service ports through the server's gateway; the server's runs in gateway
//! mode and guards a cgroup of its own, where the services run.
//!
//! The agents are the binaries of the running test's profile
//! ([`workspace_binary`]): the debug build under `cargo test`, the release
//! build under `cargo bench`.

use std::{net::Ipv4Addr, path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context as _, Result};

use crate::{
    cgroup::TestCgroup,
    eventually,
    netns::{Host, Lan},
    process::Process,
    stack::{spawn_in_cgroup_with, Stack, TEST_ORG},
};

/// The server's web service (python `http.server`), tunnelled and protected.
pub const WEB_PORT: u16 = 8080;
/// The server's echo service (python), tunnelled and protected.
pub const ECHO_PORT: u16 = 7000;
/// A port of the server the PC's policy denies.
pub const DENIED_PORT: u16 = 9999;
/// The server agent's gateway (QUIC).
pub const GATEWAY_PORT: u16 = 4433;

/// Echoes every connection's bytes back, then half-closes.
pub const ECHO_SERVER: &str = r#"
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
async def handle(r, w):
    try:
        while True:
            data = await r.read(65536)
            if not data:
                break
            w.write(data)
            await w.drain()
        w.write_eof()
    except Exception:
        pass
    finally:
        w.close()
async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", int(sys.argv[1]), backlog=4096)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"#;

/// Connects once and sends a request; prints `answered`, `closed`,
/// `timeout` or the errno name.
pub const CONNECT_ONCE: &str = r#"
import errno, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = s.recv(100)
    print("answered" if data else "closed", flush=True)
except socket.timeout:
    print("timeout", flush=True)
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)), flush=True)
"#;

/// What a site has besides the test's own services and rules.
#[derive(Debug, Default, Clone)]
pub struct SiteOptions {
    /// More server ports the PC's `tunnel` rule sends through the gateway
    /// (besides [`WEB_PORT`] and [`ECHO_PORT`]).
    pub tunnelled_ports: Vec<u16>,
    /// TOML appended to the server's policy (`[[service]]` and `[[access]]`
    /// entries for those ports); `{srv}` and `{srv6}` in it stand for the
    /// server's IPv4 and IPv6 addresses (the LAN picks them).
    pub server_policy_extra: String,
    /// TOML appended to the PC's policy (more `[[rule]]`s), with the same
    /// placeholders.
    pub pc_policy_extra: String,
    /// More programs (argv) started on the server, in its guarded cgroup,
    /// before the agents.
    pub server_programs: Vec<Vec<String>>,
    /// Ports on the server's loopback to wait for before the site is ready.
    pub wait_for_ports: Vec<u16>,
}

/// The LAN, the stack on it, and both agents running.
///
/// Fields drop in order: processes first, then the cgroups they ran in,
/// the stack, and the LAN last.
pub struct Site {
    pub pc_agent: Process,
    pub server_agent: Process,
    pub collector: Process,
    pub services: Vec<std::process::Child>,
    /// The server's services run here (the server agent guards it).
    pub server_cgroup: TestCgroup,
    pub server_policy: PathBuf,
    pub pc_policy: PathBuf,
    pub stack: Stack,
    pub pc: Host,
    pub server: Host,
    pub outsider: Host,
    _lan: Lan,
}

impl Drop for Site {
    fn drop(&mut self) {
        for service in &mut self.services {
            let _ = service.kill();
            let _ = service.wait();
        }
    }
}

impl Site {
    /// The test's site: the web and echo services, nothing else.
    pub async fn start(name: &str) -> Result<Self> {
        Self::start_with(name, SiteOptions::default()).await
    }

    pub async fn start_with(name: &str, options: SiteOptions) -> Result<Self> {
        let mut lan = Lan::create(name)?;
        let pc = lan.add_host("pc")?;
        let server = lan.add_host("srv")?;
        let outsider = lan.add_host("out")?;
        let stack = Stack::with_collector_on(name, lan.bridge_addr().into()).await?;
        let server_cgroup = TestCgroup::create(&format!("{name}-srv"))?;
        let collector = stack.start_collector().await?;
        let web_root = stack.dir.path().join("www");
        std::fs::create_dir_all(&web_root)?;
        std::fs::write(web_root.join("hello.txt"), b"hello through the tunnel\n")?;

        let srv = server.addr();
        let fill = |extra: &str| {
            extra
                .replace("{srv6}", &server.addr6().to_string())
                .replace("{srv}", &srv.to_string())
        };
        let tunnelled = [WEB_PORT, ECHO_PORT]
            .iter()
            .chain(&options.tunnelled_ports)
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let pc_policy = stack.dir.path().join("pc-policy.toml");
        std::fs::write(
            &pc_policy,
            format!(
                r#"
version = 1
default = "allow"

[[rule]]
id = "intranet-via-gateway"
action = "tunnel"
destinations = ["{srv}"]
ports = [{tunnelled}]
gateway = "{srv}:{GATEWAY_PORT}"

[[rule]]
id = "no-admin-port"
action = "deny"
destinations = ["{srv}"]
ports = [{DENIED_PORT}]
{pc_extra}"#,
                pc_extra = fill(&options.pc_policy_extra),
            ),
        )?;
        let server_policy = stack.dir.path().join("server-policy.toml");
        std::fs::write(
            &server_policy,
            server_policy_text(srv, true) + &fill(&options.server_policy_extra),
        )?;

        let mut services = vec![
            spawn_in(
                &server,
                &server_cgroup,
                &[
                    "/usr/bin/python3",
                    "-m",
                    "http.server",
                    &WEB_PORT.to_string(),
                    "--bind",
                    "0.0.0.0",
                    "--directory",
                    &web_root.display().to_string(),
                ],
                Stdio::null(),
            )?,
            spawn_in(
                &server,
                &server_cgroup,
                &[
                    "/usr/bin/python3",
                    "-c",
                    ECHO_SERVER,
                    &ECHO_PORT.to_string(),
                ],
                Stdio::null(),
            )?,
        ];
        for argv in &options.server_programs {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            services.push(spawn_in(&server, &server_cgroup, &argv, Stdio::null())?);
        }

        let server_agent = stack
            .start_agent_in(
                "srv",
                Some(&server),
                &[
                    (
                        "ZT_AGENT_GUARDED_CGROUP",
                        server_cgroup.path().display().to_string(),
                    ),
                    (
                        "ZT_AGENT_GUARD__POLICY_FILE",
                        server_policy.display().to_string(),
                    ),
                    (
                        "ZT_AGENT_TUNNEL__GATEWAY_LISTEN",
                        format!("{srv}:{GATEWAY_PORT}"),
                    ),
                ],
            )
            .await?;
        let pc_agent = start_pc_agent(&stack, &pc, &pc_policy).await?;
        let mut site = Self {
            pc_agent,
            server_agent,
            collector,
            services,
            server_cgroup,
            server_policy,
            pc_policy,
            stack,
            pc,
            server,
            outsider,
            _lan: lan,
        };
        site.server_agent
            .wait_for_log("tunnel gateway listening", Duration::from_secs(20))
            .await?;
        site.pc_agent
            .wait_for_log("tunnel listener ready", Duration::from_secs(20))
            .await?;
        for port in [WEB_PORT, ECHO_PORT]
            .into_iter()
            .chain(options.wait_for_ports.iter().copied())
        {
            site.wait_for_service(port).await?;
        }
        Ok(site)
    }

    /// Stops the PC's agent and starts it again (same state, same policy):
    /// its tunnel has no pooled peer connection and no cached hashes then.
    /// Returns once its listener is ready.
    pub async fn restart_pc_agent(&mut self) -> Result<()> {
        self.pc_agent
            .terminate(Duration::from_secs(20))
            .context("the PC agent did not stop")?;
        self.pc_agent = start_pc_agent(&self.stack, &self.pc, &self.pc_policy).await?;
        self.pc_agent
            .wait_for_log("tunnel listener ready", Duration::from_secs(20))
            .await
    }

    /// Waits until a service answers on the server's loopback.
    pub async fn wait_for_service(&self, port: u16) -> Result<()> {
        let server = self.server.clone();
        let up = eventually(Duration::from_secs(15), || {
            let server = server.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    server
                        .run_in(move || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
                        .unwrap_or(false)
                })
                .await
                .unwrap_or(false)
                .then_some(())
            }
        })
        .await;
        up.with_context(|| format!("service on port {port} did not come up"))
    }

    /// Runs `program args` on the PC inside its guarded cgroup (or outside
    /// it, `in_cgroup = false`), as `uid` when given; returns stdout.
    pub fn run_on_pc(&self, in_cgroup: bool, uid: Option<u32>, argv: &[&str]) -> Result<String> {
        run_on(
            &self.pc,
            in_cgroup.then_some(&self.stack.guarded),
            uid,
            argv,
        )
    }

    /// Starts `argv` on the PC inside its guarded cgroup (its connections
    /// are the guard's, and the tunnel's), stdout as given.
    pub fn spawn_on_pc(&self, argv: &[&str], stdout: Stdio) -> Result<std::process::Child> {
        spawn_in(&self.pc, &self.stack.guarded, argv, stdout)
    }

    pub fn logs(&self) -> String {
        self.stack.logs()
    }
}

/// Starts the PC's agent: guarding the stack's cgroup with `policy`.
async fn start_pc_agent(stack: &Stack, pc: &Host, policy: &std::path::Path) -> Result<Process> {
    stack
        .start_agent_in(
            "pc",
            Some(pc),
            &[("ZT_AGENT_GUARD__POLICY_FILE", policy.display().to_string())],
        )
        .await
}

/// Runs `argv` in `host`'s namespace (inside `cgroup` when given, as `uid`
/// when given); its stdout.
pub fn run_on(
    host: &Host,
    cgroup: Option<&TestCgroup>,
    uid: Option<u32>,
    argv: &[&str],
) -> Result<String> {
    let [nsenter, net] = host.exec_prefix();
    let uid_arg = uid.map(|uid| format!("--reuid={uid}"));
    let gid_arg = uid.map(|uid| format!("--regid={uid}"));
    let mut full: Vec<&str> = vec![&net];
    if let (Some(u), Some(g)) = (&uid_arg, &gid_arg) {
        full.extend(["/usr/bin/setpriv", u, g, "--clear-groups"]);
    }
    full.extend(argv);
    let output = match cgroup {
        Some(cgroup) => {
            spawn_in_cgroup_with(cgroup, &nsenter, &full, Stdio::piped())?.wait_with_output()?
        }
        None => std::process::Command::new(&nsenter)
            .args(&full)
            .stdin(Stdio::null())
            .output()?,
    };
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Starts `argv` in `host`'s namespace inside `cgroup`.
pub fn spawn_in(
    host: &Host,
    cgroup: &TestCgroup,
    argv: &[&str],
    stdout: Stdio,
) -> Result<std::process::Child> {
    let [nsenter, net] = host.exec_prefix();
    let mut full: Vec<&str> = vec![&net];
    full.extend(argv);
    spawn_in_cgroup_with(cgroup, &nsenter, &full, stdout)
}

/// The server's policy: the web service for root's curl, the echo service
/// for python when `echo_allowed` (version 1; version 2 without it).
pub fn server_policy_text(srv: Ipv4Addr, echo_allowed: bool) -> String {
    let echo_rule = if echo_allowed {
        format!(
            r#"
[[access]]
id = "echo-for-python"
service = "echo"
action = "allow"
orgs = ["{TEST_ORG}"]
exes = ["/usr/bin/python3.11"]
"#
        )
    } else {
        String::new()
    };
    format!(
        r#"
version = {version}
default = "allow"

[[service]]
name = "intranet-web"
destinations = ["{srv}"]
ports = [{WEB_PORT}]
target = "127.0.0.1:{WEB_PORT}"
class = "protected"

[[service]]
name = "echo"
destinations = ["{srv}"]
ports = [{ECHO_PORT}]
target = "127.0.0.1:{ECHO_PORT}"
class = "protected"

[[access]]
id = "staff-curl"
service = "intranet-web"
action = "allow"
orgs = ["{TEST_ORG}"]
users = ["root"]
exes = ["/usr/bin/curl"]
{echo_rule}"#,
        version = if echo_allowed { 1 } else { 2 },
    )
}
