//! A whole stack for one test: a private ClickHouse with a fresh database,
//! `zt-collector` and `zt-agent` as real processes, logs kept for failures.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{
    cgroup::TestCgroup,
    clickhouse::{fresh_database_name, ClickHouseServer},
    free_port,
    process::{workspace_binary, Process},
};

/// The organisation test agents enroll into.
pub const TEST_ORG: &str = "org-e2e";

pub struct Stack {
    pub clickhouse: ClickHouseServer,
    /// The cgroup the stack's agents guard (cgroup hooks attach here, never
    /// to the root cgroup).
    pub guarded: TestCgroup,
    pub database: String,
    pub dir: tempfile::TempDir,
    pub collector_port: u16,
    /// Where the collector listens (loopback, or a test LAN's address in
    /// the root namespace for agents in network namespaces).
    pub collector_ip: std::net::IpAddr,
}

impl Stack {
    pub async fn new(name: &str) -> Result<Self> {
        Self::with_collector_on(name, std::net::Ipv4Addr::LOCALHOST.into()).await
    }

    /// A stack whose collector listens on `collector_ip` (its certificate
    /// names it).
    pub async fn with_collector_on(name: &str, collector_ip: std::net::IpAddr) -> Result<Self> {
        Ok(Self {
            clickhouse: ClickHouseServer::start().await?,
            guarded: TestCgroup::create(&format!("guard-{name}"))?,
            database: fresh_database_name(name),
            dir: tempfile::tempdir()?,
            collector_port: free_port()?,
            collector_ip,
        })
    }

    /// The collector's control-plane state (CA, tokens, devices).
    pub fn collector_state(&self) -> std::path::PathBuf {
        self.dir.path().join("collector-state")
    }

    /// `https://<collector ip>:<port>`, where agents reach the collector.
    pub fn collector_url(&self) -> String {
        format!(
            "https://{}",
            std::net::SocketAddr::new(self.collector_ip, self.collector_port)
        )
    }

    /// The state directory of the agent called `name`.
    pub fn agent_state(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{name}-state"))
    }

    /// Enrolls agent `name` as device `name` of [`TEST_ORG`] with a token
    /// from `zt-collector token create` and `zt-agent enroll`, as an
    /// installer does; the collector must be running.
    pub fn enroll_agent(&self, name: &str) -> Result<()> {
        let token = crate::pki::create_token(
            &workspace_binary("zt-collector")?,
            &self.collector_state(),
            TEST_ORG,
            name,
        )?;
        crate::pki::enroll(
            &workspace_binary("zt-agent")?,
            &self.agent_state(name),
            &self.collector_url(),
            &token,
        )
    }

    /// Enrolls agent `name` with a collector started for the purpose and
    /// stopped again: for tests that start the agent while the collector is
    /// down.
    pub async fn enroll_agent_then_stop_collector(&self, name: &str) -> Result<()> {
        let mut collector = self.start_collector().await?;
        self.enroll_agent(name)?;
        collector
            .terminate(Duration::from_secs(15))
            .context("collector did not stop")?;
        Ok(())
    }

    pub async fn start_collector(&self) -> Result<Process> {
        self.start_collector_with(&[]).await
    }

    /// Starts the collector with extra environment.
    pub async fn start_collector_with(&self, env: &[(&str, String)]) -> Result<Process> {
        let mut envs = vec![
            ("ZT_COLLECTOR_BATCH__MAX_DELAY_MS", "200".to_owned()),
            (
                "ZT_COLLECTOR_IDENTITY__SERVER_ADDRESSES",
                format!("[\"{}\"]", self.collector_ip),
            ),
        ];
        envs.extend(env.iter().cloned());
        let mut collector = Process::spawn(
            "collector",
            &workspace_binary("zt-collector")?,
            [
                "--state-dir",
                &self.collector_state().display().to_string(),
                "--listen",
                &std::net::SocketAddr::new(self.collector_ip, self.collector_port).to_string(),
                "--clickhouse-url",
                &self.clickhouse.http_url(),
                "--database",
                &self.database,
            ],
            &envs,
            self.dir.path(),
        )?;
        collector
            .wait_for_log("collector listening", Duration::from_secs(30))
            .await?;
        Ok(collector)
    }

    /// Starts an agent (log `agent.log`, or `<name>.log` for a second one)
    /// with extra environment, and waits until its sensors are attached. An
    /// agent not enrolled yet is enrolled first (device `name`); the
    /// collector must be running then.
    pub async fn start_agent_named(&self, name: &str, env: &[(&str, String)]) -> Result<Process> {
        self.start_agent_in(name, None, env).await
    }

    /// [`Self::start_agent_named`] inside `host`'s network namespace (the
    /// agent's process itself: `nsenter` executes it in place).
    pub async fn start_agent_in(
        &self,
        name: &str,
        host: Option<&crate::netns::Host>,
        env: &[(&str, String)],
    ) -> Result<Process> {
        if !self.agent_state(name).join("identity").exists() {
            self.enroll_agent(name)?;
        }
        let mut envs = vec![
            ("ZT_AGENT_UPLINK__BATCH_MAX_DELAY_MS", "100".to_owned()),
            ("ZT_AGENT_UPLINK__BACKOFF_MAX_MS", "500".to_owned()),
            // Tests run side by side and every agent sees every test's file
            // activity: a whole core of budget keeps sampling out of tests
            // that do not test it (they set their own).
            ("ZT_AGENT_BUDGET__CPU_PERCENT", "100".to_owned()),
            (
                "ZT_AGENT_GUARDED_CGROUP",
                self.guarded.path().display().to_string(),
            ),
        ];
        envs.extend(env.iter().cloned());
        let agent_binary = workspace_binary("zt-agent")?.display().to_string();
        let state_dir = self.agent_state(name).display().to_string();
        let (program, mut args) = match host {
            Some(host) => {
                let [nsenter, net] = host.exec_prefix();
                (std::path::PathBuf::from(nsenter), vec![net, agent_binary])
            }
            None => (workspace_binary("zt-agent")?, Vec::new()),
        };
        args.extend(["--state-dir".to_owned(), state_dir]);
        let mut agent = Process::spawn(name, &program, &args, &envs, self.dir.path())?;
        agent
            .wait_for_log("process table seeded", Duration::from_secs(30))
            .await?;
        Ok(agent)
    }

    pub async fn start_agent(&self) -> Result<Process> {
        self.start_agent_named("agent", &[]).await
    }

    /// Connects once to `target` (`host:port`) from the guarded cgroup:
    /// `<target> connected` or `<target> <errno name>`.
    pub fn connect_from_guarded(&self, target: &str) -> Result<String> {
        Ok(connect_in_cgroup(&self.guarded, &[target])?
            .1
            .trim()
            .to_owned())
    }

    /// `zt-collector account create` of a console account, the password on
    /// stdin: whether it succeeded, and what it said on stderr.
    pub fn create_account(
        &self,
        org: &str,
        user: &str,
        role: &str,
        password: &str,
    ) -> Result<(bool, String)> {
        use std::io::Write as _;
        let mut child = Command::new(workspace_binary("zt-collector")?)
            .arg("--state-dir")
            .arg(self.collector_state())
            .args([
                "account", "create", "--org", org, "--user", user, "--role", role,
            ])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        child
            .stdin
            .take()
            .context("no stdin")?
            .write_all(format!("{password}\n").as_bytes())?;
        let output = child.wait_with_output()?;
        Ok((
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// A client bound to the test's database.
    pub fn db(&self) -> clickhouse::Client {
        self.clickhouse.client().with_database(&self.database)
    }

    /// Every process log of the test, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for entry in entries.filter_map(Result::ok) {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let log = std::fs::read_to_string(&path).unwrap_or_default();
                    out.push_str(&format!("--- {} ---\n{log}\n", path.display()));
                }
            }
        }
        out
    }
}

/// A unique marker to find a test's own events among the machine's.
pub fn marker_for(what: &str) -> String {
    format!("zt-e2e-{what}-{}", uuid::Uuid::new_v4().simple())
}

/// Connects to each `host:port` argument (TCP; IPv4, or IPv6 when the host
/// has a colon), or sends one datagram to each `udp:host:port` (without
/// connecting); prints `<target> connected|sent|<errno name>` per target.
pub const CONNECTOR: &str = r#"
import errno, socket, sys
for target in sys.argv[1:]:
    udp = target.startswith("udp:")
    host, port = target.removeprefix("udp:").rsplit(":", 1)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        if udp:
            s.sendto(b"x", (host, int(port)))
            print(target, "sent", flush=True)
        else:
            s.connect((host, int(port)))
            print(target, "connected", flush=True)
    except OSError as e:
        print(target, errno.errorcode.get(e.errno, str(e.errno)), flush=True)
    finally:
        s.close()
"#;

/// Runs [`CONNECTOR`] for `targets` inside `cgroup`; its pid and what it
/// printed.
pub fn connect_in_cgroup(cgroup: &TestCgroup, targets: &[&str]) -> Result<(u32, String)> {
    let mut args = vec!["-c", CONNECTOR];
    args.extend(targets);
    let child = spawn_in_cgroup_with(cgroup, "/usr/bin/python3", &args, Stdio::piped())?;
    let pid = child.id();
    let output = child.wait_with_output()?;
    anyhow::ensure!(output.status.success(), "connector: {output:?}");
    Ok((pid, String::from_utf8(output.stdout)?))
}

/// Starts `program args` inside `cgroup` (it joins before it executes).
pub fn spawn_in_cgroup(cgroup: &TestCgroup, program: &str, args: &[&str]) -> Result<Child> {
    spawn_in_cgroup_with(cgroup, program, args, Stdio::null())
}

/// [`spawn_in_cgroup`] with the child's stdout as given.
pub fn spawn_in_cgroup_with(
    cgroup: &TestCgroup,
    program: &str,
    args: &[&str],
    stdout: Stdio,
) -> Result<Child> {
    let mut command = Command::new(program);
    command.args(args).stdout(stdout).stdin(Stdio::null());
    cgroup.join_on_exec(&mut command)?;
    command
        .spawn()
        .with_context(|| format!("running {program} in the test cgroup"))
}

/// Runs `program args` to completion inside `cgroup`; returns its pid and
/// exit status.
pub fn run_in_cgroup(
    cgroup: &TestCgroup,
    program: &str,
    args: &[&str],
) -> Result<(u32, std::process::ExitStatus)> {
    let mut child = spawn_in_cgroup(cgroup, program, args)?;
    let pid = child.id();
    Ok((pid, child.wait()?))
}
