//! The Debian packages, built here with `cargo deb` from this build's
//! binaries, installed with dpkg into a throwaway overlay of this machine's
//! own root (its real kernel, its loopback), and run the way their systemd
//! units say (user, capability bounding set, no_new_privs, limits,
//! environment; `systemd-analyze verify` for the rest: PID 1 here is not
//! systemd).
//!
//! The agent: install, unit and paths, enroll, start, its events stored,
//! `zt-agent status`, a pushed policy enforced, stop and crash leave nothing
//! attached, a newer build upgrades in place with identity, spool, last good
//! policy and configuration kept (the upgraded agent enforces that policy
//! before the collector is back, and the events spooled during the outage
//! arrive after it), purge removes everything. The collector: its user and
//! state, start, administration as root keeps the state readable by the
//! service, the installed `ztctl` works against it, upgrade keeps the CA,
//! purge. The BPF programs an agent loaded are told apart by id (loaded
//! after its start): no other test of this binary loads any, and cargo runs
//! test binaries one at a time.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use zt_e2e::{
    clickhouse::fresh_database_name,
    eventually, free_port,
    process::{workspace_binary, Process},
    stack::{marker_for, run_in_cgroup, Stack, TEST_ORG},
    systemd_unit::{self, ServiceUnit},
    throwaway_root::ThrowawayRoot,
};

/// `cargo deb` of workspace crate `crate_name` at `version`, from the
/// binaries this test build made (a release is `cargo deb -p <crate>`, the
/// same files and scripts from the release profile).
fn build_package(crate_name: &str, version: &str, out: &Path) -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args(["deb", "-p", crate_name, "--no-build", "--profile", "dev"])
        .args(["--fast", "--quiet", "--deb-version", version, "--output"])
        .arg(out)
        .current_dir(workspace)
        .output()
        .context("running cargo deb")?;
    ensure!(
        output.status.success(),
        "cargo deb -p {crate_name} failed (is cargo-deb installed? deploy/setup.sh installs it):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let path = String::from_utf8(output.stdout)?
        .lines()
        .last()
        .map(PathBuf::from)
        .context("cargo deb printed no package path")?;
    ensure!(path.exists(), "cargo deb made no {}", path.display());
    Ok(path)
}

/// Copies `deb` into the root and installs (or upgrades to) it with dpkg.
fn dpkg_install(root: &ThrowawayRoot, deb: &Path) -> Result<()> {
    let inside = format!(
        "/tmp/{}",
        deb.file_name().context("package name")?.to_string_lossy()
    );
    root.copy_in(deb, &inside)?;
    root.run("dpkg", &["--install", &inside])?;
    Ok(())
}

fn installed_version(root: &ThrowawayRoot, package: &str) -> Result<String> {
    let output = root.run("dpkg-query", &["-W", "-f=${Version}", package])?;
    Ok(String::from_utf8(output.stdout)?)
}

/// Whether `path` exists in `root`, a symbolic link as itself (an
/// absolute link's target would be looked up on the host).
fn present(root: &ThrowawayRoot, path: &str) -> bool {
    std::fs::symlink_metadata(root.host_path(path)).is_ok()
}

/// Mode bits (e.g. 0o700), owner name and group name of a path in `root`.
fn ownership(root: &ThrowawayRoot, path: &str) -> Result<(u32, String, String)> {
    let meta = std::fs::metadata(root.host_path(path))
        .with_context(|| format!("{path} in the installed root"))?;
    let output = root.run("stat", &["-c", "%U %G", path])?;
    let text = String::from_utf8(output.stdout)?;
    let (user, group) = text.trim().split_once(' ').context("stat output")?;
    Ok((
        meta.permissions().mode() & 0o7777,
        user.to_owned(),
        group.to_owned(),
    ))
}

/// Every file under `dir` (host path) with its bytes.
fn tree(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let bytes = std::fs::read(&path)?;
                files.insert(path.strip_prefix(dir)?.to_owned(), bytes);
            }
        }
    }
    Ok(files)
}

/// Ids of every BPF program loaded on the machine (`bpftool prog show`).
fn loaded_programs() -> Result<BTreeSet<u64>> {
    let output = Command::new("bpftool")
        .args(["--json", "prog", "show"])
        .output()
        .context("running bpftool (deploy/setup.sh installs it)")?;
    ensure!(output.status.success(), "bpftool prog show failed");
    let list: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)?;
    Ok(list.iter().filter_map(|p| p["id"].as_u64()).collect())
}

/// Names of the programs attached to `cgroup` (`bpftool cgroup show`).
fn attached_to(cgroup: &Path) -> Result<Vec<String>> {
    let output = Command::new("bpftool")
        .args(["--json", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .context("running bpftool")?;
    ensure!(output.status.success(), "bpftool cgroup show failed");
    // Nothing attached: bpftool prints nothing at all.
    if output.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let list: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)?;
    Ok(list
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect())
}

/// Waits until none of `programs` is loaded and nothing is attached to the
/// guarded cgroup; the error names what stayed.
async fn wait_until_detached(stack: &Stack, programs: &BTreeSet<u64>, after: &str) -> Result<()> {
    let gone = eventually(Duration::from_secs(10), || async {
        let loaded = loaded_programs().ok()?;
        let attached = attached_to(stack.guarded.path()).ok()?;
        (attached.is_empty() && programs.is_disjoint(&loaded)).then_some(())
    })
    .await;
    if gone.is_none() {
        let loaded = loaded_programs()?;
        bail!(
            "after {after}: still attached to the guarded cgroup {:?}; still loaded {:?}",
            attached_to(stack.guarded.path())?,
            programs.intersection(&loaded).collect::<Vec<_>>()
        );
    }
    Ok(())
}

async fn exec_count(stack: &Stack, marker: &str) -> u64 {
    stack
        .db()
        .query("SELECT count() FROM process_events WHERE event_type = 'exec' AND has(argv, ?)")
        .bind(marker)
        .fetch_one::<u64>()
        .await
        .unwrap_or(0)
}

/// Runs `/bin/echo <marker>` in the guarded cgroup and waits until the
/// agent's exec event of it is stored.
async fn exec_arrives(stack: &Stack, marker: &str, what: &str) -> Result<()> {
    run_in_cgroup(&stack.guarded, "/bin/echo", &[marker])?;
    eventually(Duration::from_secs(20), || async {
        (exec_count(stack, marker).await > 0).then_some(())
    })
    .await
    .with_context(|| format!("{what}: the exec never arrived\n{}", stack.logs()))
}

/// Starts the installed agent's unit and waits until its sensors run.
async fn start_agent_service(root: &ThrowawayRoot, stack: &Stack, log: &str) -> Result<Process> {
    let unit = ServiceUnit::load(root, "zt-agent.service")?;
    let mut agent = unit.start(root, stack.dir.path(), log)?;
    agent
        .wait_for_log("process table seeded", Duration::from_secs(30))
        .await?;
    Ok(agent)
}

/// `zt-agent status --json` in `root` (its exit code says whether the agent
/// runs; the JSON says it too).
fn agent_status(root: &ThrowawayRoot) -> Result<serde_json::Value> {
    let output = root
        .command("zt-agent")
        .args(["status", "--json"])
        .output()?;
    let status: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("zt-agent status --json: {output:?}"))?;
    let expected = if status["running"] == true { 0 } else { 3 };
    ensure!(
        output.status.code() == Some(expected),
        "zt-agent status exited {} with {status}",
        output.status
    );
    Ok(status)
}

/// SIGTERM as `systemctl stop` sends it, within the unit's stop timeout;
/// the agent must exit successfully.
fn stop_service(root: &ThrowawayRoot, unit: &str, process: &mut Process) -> Result<()> {
    let timeout = ServiceUnit::load(root, unit)?.stop_timeout()?;
    let status = process
        .terminate(timeout)
        .with_context(|| format!("{unit} did not stop within {timeout:?}:\n{}", process.log()))?;
    ensure!(
        status.success(),
        "{unit} stopped with {status}:\n{}",
        process.log()
    );
    Ok(())
}

/// The packaged configuration file with its commented examples made live:
/// a `# key = value` or `# [section]` line loses its `# `.
fn with_examples_live(text: &str) -> String {
    text.lines()
        .map(|line| {
            let Some(rest) = line.strip_prefix("# ") else {
                return line.to_owned();
            };
            let is_section = rest.starts_with('[')
                && rest
                    .split_whitespace()
                    .next()
                    .is_some_and(|t| t.ends_with(']'));
            let is_assignment = rest.split_once(" = ").is_some_and(|(key, _)| {
                !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            });
            if is_section || is_assignment {
                rest.to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The shipped `/etc/zt/agent.toml` is valid as shipped, and every value it
/// shows as a comment is the default, but for the documented example of
/// `guarded_cgroup` (unset: the whole machine).
#[test]
fn the_packaged_agent_configuration_shows_the_defaults() -> Result<()> {
    use zt_agent::config::{build, layers, AgentConfig, FlagOverrides};
    let shipped = include_str!("../../deploy/packaging/agent/agent.toml");
    let dir = tempfile::tempdir()?;
    let load = |text: &str| -> Result<AgentConfig> {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text)?;
        Ok(build(layers(Some(&path)), &FlagOverrides::default())?)
    };
    assert_eq!(load(shipped)?, AgentConfig::default());
    let live = with_examples_live(shipped);
    ensure!(
        live.contains("\nstate_dir = "),
        "no example was made live:\n{live}"
    );
    let mut config = load(&live)?;
    assert_eq!(
        config.guarded_cgroup.as_deref(),
        Some(Path::new("/sys/fs/cgroup"))
    );
    config.guarded_cgroup = None;
    assert_eq!(config, AgentConfig::default());
    Ok(())
}

/// The same for `/etc/zt/collector.toml`: valid as shipped; its examples
/// are the defaults but for `listen` (all interfaces, as a real collector
/// serves) and `rules_dir`.
#[test]
fn the_packaged_collector_configuration_shows_the_defaults() -> Result<()> {
    use zt_collector::{config::ConfigSources, CollectorConfig};
    let shipped = include_str!("../../deploy/packaging/collector/collector.toml");
    let load = |text: &str| -> Result<CollectorConfig> {
        Ok(ConfigSources {
            file: Some((PathBuf::from("/etc/zt/collector.toml"), text.to_owned())),
            ..ConfigSources::default()
        }
        .build()?)
    };
    assert_eq!(load(shipped)?, CollectorConfig::default());
    let live = with_examples_live(shipped);
    ensure!(
        live.contains("\n[clickhouse]\nurl = "),
        "no example was made live:\n{live}"
    );
    let mut config = load(&live)?;
    assert_eq!(config.listen.to_string(), "0.0.0.0:50051");
    assert_eq!(
        config.detection.rules_dir.as_deref(),
        Some(Path::new("/etc/zt/rules"))
    );
    config.listen = CollectorConfig::default().listen;
    config.detection.rules_dir = None;
    assert_eq!(config, CollectorConfig::default());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_package_installs_enrolls_runs_upgrades_and_purges_cleanly() -> Result<()> {
    let packages = tempfile::tempdir()?;
    let first = build_package("agent", "0.1.0+e2e.1", packages.path())?;
    let newer = build_package("agent", "0.1.0+e2e.2", packages.path())?;

    let stack = Stack::new("pkg_agent").await?;
    let mut collector = stack.start_collector().await?;
    let root = ThrowawayRoot::create()?;

    // Install: binary, configuration (a conffile), unit, state directory,
    // the unit enabled for boot.
    dpkg_install(&root, &first)?;
    assert_eq!(installed_version(&root, "zt-agent")?, "0.1.0+e2e.1");
    assert_eq!(ownership(&root, "/usr/bin/zt-agent")?.0, 0o755);
    assert_eq!(
        ownership(&root, "/var/lib/zt-agent")?,
        (0o700, "root".to_owned(), "root".to_owned())
    );
    let conffiles = root.run("dpkg-query", &["-W", "-f=${Conffiles}", "zt-agent"])?;
    ensure!(
        String::from_utf8_lossy(&conffiles.stdout).contains("/etc/zt/agent.toml"),
        "agent.toml is not a conffile"
    );
    ensure!(
        present(
            &root,
            "/etc/systemd/system/multi-user.target.wants/zt-agent.service"
        ),
        "zt-agent.service is not enabled for boot"
    );
    systemd_unit::verify(&root, "/usr/lib/systemd/system/zt-agent.service")?;
    let unit = ServiceUnit::load(&root, "zt-agent.service")?;
    assert_eq!(unit.value("Service", "Restart").as_deref(), Some("always"));
    ensure!(
        !unit.conditions_met(&root),
        "the unit would start before the device is enrolled"
    );
    let status = root
        .command("zt-agent")
        .args(["status", "--json"])
        .output()?;
    ensure!(
        !status.status.success(),
        "status of an unenrolled device succeeded"
    );

    // Enroll once, as the installer does; status now tells who it is.
    let token = zt_e2e::pki::create_token(
        &workspace_binary("zt-collector")?,
        &stack.collector_state(),
        TEST_ORG,
        "pc-0001",
    )?;
    let enrolled = root.run(
        "zt-agent",
        &[
            "enroll",
            "--collector",
            &stack.collector_url(),
            "--token",
            &token,
        ],
    )?;
    let said = String::from_utf8_lossy(&enrolled.stdout);
    ensure!(
        said.contains("systemctl start zt-agent"),
        "enroll does not say how to start the installed service: {said}"
    );
    let status = agent_status(&root)?;
    assert_eq!(status["enrolled"], true);
    assert_eq!(status["agent_state"], "never_ran");
    assert_eq!(status["device_id"], "pc-0001");
    assert_eq!(status["state_dir"], "/var/lib/zt-agent");
    ensure!(ServiceUnit::load(&root, "zt-agent.service")?.conditions_met(&root));

    // The test's own guarded cgroup (never the machine's root cgroup), as
    // an admin's drop-in; the rest is the package's unit and config.
    let dropin = root.host_path("/etc/systemd/system/zt-agent.service.d");
    std::fs::create_dir_all(&dropin)?;
    std::fs::write(
        dropin.join("10-e2e.conf"),
        format!(
            "[Service]\nEnvironment=ZT_AGENT_GUARDED_CGROUP={} ZT_AGENT_UPLINK__BATCH_MAX_DELAY_MS=100 ZT_AGENT_UPLINK__BACKOFF_MAX_MS=500 ZT_AGENT_BUDGET__CPU_PERCENT=100\n",
            stack.guarded.path().display()
        ),
    )?;

    // Start: the sensors and the guard attach under the unit's limited
    // capabilities, and events flow.
    let before = loaded_programs()?;
    let mut agent = start_agent_service(&root, &stack, "service-1").await?;
    let ours: BTreeSet<u64> = loaded_programs()?.difference(&before).copied().collect();
    ensure!(!ours.is_empty(), "the service loaded no BPF program");
    let attached = attached_to(stack.guarded.path())?;
    for program in ["guard_connect4", "guard_connect6", "dns_egress"] {
        ensure!(
            attached.iter().any(|a| a == program),
            "{program} is not attached to the guarded cgroup: {attached:?}\n{}",
            agent.log()
        );
    }
    let log = agent.log();
    ensure!(
        !log.contains("sensor not attached"),
        "a sensor failed under the unit's capabilities:\n{log}"
    );
    exec_arrives(&stack, &marker_for("pkg-running"), "installed service").await?;
    // `zt-agent status` sees it run, with its sensors and the collector.
    let running = eventually(Duration::from_secs(15), || async {
        let status = agent_status(&root).ok()?;
        (status["agent"]["collector_connected"] == true
            && status["agent"]["events_acked"].as_u64() > Some(0))
        .then_some(status)
    })
    .await
    .with_context(|| {
        format!(
            "status never showed the running agent connected: {:?}",
            agent_status(&root)
        )
    })?;
    assert_eq!(running["running"], true);
    assert_eq!(running["agent"]["pid"], agent.pid());
    ensure!(
        running["agent"]["sensors"].as_array().is_some_and(|s| s
            .iter()
            .any(|s| s.as_str().is_some_and(|s| s.starts_with("guard=")))),
        "status lists no guard sensor: {running}"
    );

    // A policy pushed through the collector is enforced by the installed
    // service (and becomes its last good policy).
    let listener = std::net::TcpListener::bind("127.0.0.97:0")?;
    let target = listener.local_addr()?.to_string();
    ensure!(stack.connect_from_guarded(&target)? == format!("{target} connected"));
    let soc = zt_e2e::ztctl::ZtctlUser::create(&stack, "pref", "soc", "soc")?;
    let baseline = stack.dir.path().join("baseline.yaml");
    std::fs::write(
        &baseline,
        format!(
            "version: 1\nkind: baseline\nrules:\n  - id: no-97\n    action: deny\n    to: {{addresses: [127.0.0.97], ports: [{}]}}\n",
            listener.local_addr()?.port()
        ),
    )?;
    let reply = soc.push_and_wait(&baseline)?;
    ensure!(
        reply["rollout"][0]["applied"] == 1,
        "the installed agent did not apply the push: {reply}\n{}",
        stack.logs()
    );
    ensure!(stack.connect_from_guarded(&target)? == format!("{target} EPERM"));

    // Stop: every program detached and unloaded.
    stop_service(&root, "zt-agent.service", &mut agent)?;
    wait_until_detached(&stack, &ours, "systemctl stop").await?;
    assert_eq!(agent_status(&root)?["agent_state"], "stopped");
    ensure!(
        stack.connect_from_guarded(&target)? == format!("{target} connected"),
        "a stopped agent still denies"
    );

    // Crash: the kernel detaches what the dead process held; nothing is
    // left without an owner. The restart attaches again.
    let before = loaded_programs()?;
    let mut agent = start_agent_service(&root, &stack, "service-2").await?;
    let ours: BTreeSet<u64> = loaded_programs()?.difference(&before).copied().collect();
    ensure!(!attached_to(stack.guarded.path())?.is_empty());
    agent.kill_hard()?;
    wait_until_detached(&stack, &ours, "kill -9").await?;
    assert_eq!(agent_status(&root)?["agent_state"], "died");

    // A collector outage: the restarted agent spools what it sees.
    let mut agent = start_agent_service(&root, &stack, "service-3").await?;
    collector
        .terminate(Duration::from_secs(15))
        .context("collector did not stop")?;
    let spooled = marker_for("pkg-spooled");
    run_in_cgroup(&stack.guarded, "/bin/echo", &[&spooled])?;
    // The exec is spooled once it is read (write-ahead); the stop flushes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_service(&root, "zt-agent.service", &mut agent)?;

    // The admin's own setting, which the upgrade must keep.
    let config = root.host_path("/etc/zt/agent.toml");
    let mut edited = std::fs::read_to_string(&config)?;
    edited.push_str("\nheartbeat_interval_secs = 20\n");
    std::fs::write(&config, &edited)?;

    // Upgrade to the newer build: identity, spool and last good policy,
    // and the edited configuration, all as they were.
    let state = root.host_path("/var/lib/zt-agent");
    let state_before = tree(&state)?;
    ensure!(
        state_before.keys().any(|p| p.starts_with("spool")),
        "nothing spooled during the outage: {:?}",
        state_before.keys().collect::<Vec<_>>()
    );
    ensure!(state_before.contains_key(Path::new("identity/device.pem")));
    ensure!(
        state_before.keys().any(|p| p.starts_with("policy")),
        "no policy bundle kept: {:?}",
        state_before.keys().collect::<Vec<_>>()
    );
    dpkg_install(&root, &newer)?;
    assert_eq!(installed_version(&root, "zt-agent")?, "0.1.0+e2e.2");
    ensure!(
        tree(&state)? == state_before,
        "the upgrade changed the agent's state directory"
    );
    assert_eq!(std::fs::read_to_string(&config)?, edited);

    // The upgraded agent starts with the collector still away: it enforces
    // the last good policy at once. Then the collector is back, and what
    // was spooled arrives.
    let before = loaded_programs()?;
    let mut agent = start_agent_service(&root, &stack, "service-4").await?;
    let ours: BTreeSet<u64> = loaded_programs()?.difference(&before).copied().collect();
    ensure!(
        stack.connect_from_guarded(&target)? == format!("{target} EPERM"),
        "the upgraded agent does not enforce the last good policy\n{}",
        stack.logs()
    );
    let after = agent_status(&root)?;
    assert_eq!(after["spiffe_id"], status["spiffe_id"]);
    assert_eq!(after["running"], true);
    let _collector = stack.start_collector().await?;
    eventually(Duration::from_secs(20), || async {
        (exec_count(&stack, &spooled).await > 0).then_some(())
    })
    .await
    .with_context(|| format!("the spooled exec never arrived\n{}", stack.logs()))?;
    stop_service(&root, "zt-agent.service", &mut agent)?;

    // Purge (the package's prerm stops the service first on a systemd
    // machine; stopped above): nothing of the agent stays.
    root.run("dpkg", &["--purge", "zt-agent"])?;
    for path in [
        "/usr/bin/zt-agent",
        "/usr/lib/systemd/system/zt-agent.service",
        "/etc/systemd/system/multi-user.target.wants/zt-agent.service",
        "/etc/zt/agent.toml",
        "/var/lib/zt-agent",
    ] {
        ensure!(!present(&root, path), "{path} stayed after purge");
    }
    wait_until_detached(&stack, &ours, "purge").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_package_runs_as_its_own_user_and_keeps_its_ca_across_upgrades() -> Result<()>
{
    let packages = tempfile::tempdir()?;
    let first = build_package("collector", "0.1.0+e2e.1", packages.path())?;
    let newer = build_package("collector", "0.1.0+e2e.2", packages.path())?;
    let ztctl = build_package("ztctl", "0.1.0+e2e.1", packages.path())?;

    let clickhouse = zt_e2e::clickhouse::ClickHouseServer::start().await?;
    let database = fresh_database_name("pkg_collector");
    let port = free_port()?;
    let logs = tempfile::tempdir()?;
    let root = ThrowawayRoot::create()?;

    dpkg_install(&root, &first)?;
    dpkg_install(&root, &ztctl)?;
    ensure!(
        root.run("getent", &["passwd", "zt-collector"]).is_ok(),
        "no zt-collector user"
    );
    assert_eq!(
        ownership(&root, "/var/lib/zt-collector")?,
        (0o700, "zt-collector".to_owned(), "zt-collector".to_owned())
    );
    assert_eq!(
        ownership(&root, "/etc/zt/collector.toml")?,
        (0o640, "root".to_owned(), "zt-collector".to_owned())
    );
    for path in [
        "/usr/bin/ztctl",
        "/usr/share/zt-collector/clickhouse/zt-single-node.xml",
        "/usr/share/zt-collector/clickhouse/zt-cluster-example.xml",
        "/etc/systemd/system/multi-user.target.wants/zt-collector.service",
    ] {
        ensure!(present(&root, path), "{path} is not installed");
    }
    systemd_unit::verify(&root, "/usr/lib/systemd/system/zt-collector.service")?;

    let dropin = root.host_path("/etc/systemd/system/zt-collector.service.d");
    std::fs::create_dir_all(&dropin)?;
    std::fs::write(
        dropin.join("10-e2e.conf"),
        format!(
            "[Service]\nEnvironment=ZT_COLLECTOR_LISTEN=127.0.0.1:{port} ZT_COLLECTOR_CLICKHOUSE__URL={} ZT_COLLECTOR_CLICKHOUSE__DATABASE={database}\n",
            clickhouse.http_url()
        ),
    )?;
    let start = |name: &str| -> Result<Process> {
        ServiceUnit::load(&root, "zt-collector.service")?.start(&root, logs.path(), name)
    };
    let mut service = start("collector-1")?;
    service
        .wait_for_log("collector listening", Duration::from_secs(60))
        .await?;
    // It runs as its own user, and made its CA in its state directory.
    let status = std::fs::read_to_string(format!("/proc/{}/status", service.pid()))?;
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .context("Uid")?;
    ensure!(
        !uid_line.split_whitespace().skip(1).any(|id| id == "0"),
        "the collector runs as root: {uid_line}"
    );
    let ca = std::fs::read(root.host_path("/var/lib/zt-collector/ca/ca.crt"))
        .context("the collector made no CA")?;

    // Administration as root against the installed state: the token it
    // writes stays readable by the service, which enrolls a device with it.
    let enroll = |device: &str| -> Result<()> {
        let token = root.run(
            "zt-collector",
            &[
                "token", "create", "--org", TEST_ORG, "--device", device, "--ttl", "10m",
            ],
        )?;
        let token = String::from_utf8(token.stdout)?.trim().to_owned();
        let state = logs.path().join(format!("{device}-state"));
        zt_e2e::pki::enroll(
            &workspace_binary("zt-agent")?,
            &state,
            &format!("https://127.0.0.1:{port}"),
            &token,
        )
    };
    enroll("pc-0002")?;
    // An admin's credential, created by root into root's own directory (the
    // state changes as the service's user, the files as root), and the
    // installed ztctl talking to the installed collector with it.
    root.run(
        "zt-collector",
        &[
            "credential",
            "create",
            "--org",
            TEST_ORG,
            "--user",
            "admin",
            "--role",
            "admin",
            "--out",
            "/root/zt-admin",
        ],
    )?;
    assert_eq!(ownership(&root, "/root/zt-admin/credential.pem")?.1, "root");
    std::fs::write(
        root.host_path("/root/zt-admin/ztctl.toml"),
        format!(
            "collector_url = \"https://127.0.0.1:{port}\"\ncredential = \"/root/zt-admin/credential.pem\"\nca_bundle = \"/root/zt-admin/ca.pem\"\n"
        ),
    )?;
    let fleet: serde_json::Value = serde_json::from_slice(
        &root
            .run(
                "ztctl",
                &[
                    "--config",
                    "/root/zt-admin/ztctl.toml",
                    "device",
                    "list",
                    "--json",
                ],
            )?
            .stdout,
    )?;
    ensure!(
        fleet.to_string().contains("pc-0002"),
        "ztctl device list does not show the enrolled device: {fleet}"
    );
    let state = root.host_path("/var/lib/zt-collector");
    for (path, _) in tree(&state)? {
        let meta = std::fs::metadata(state.join(&path))?;
        ensure!(
            meta.uid() != 0,
            "{} in the collector's state is owned by root",
            path.display()
        );
    }

    stop_service(&root, "zt-collector.service", &mut service)?;
    dpkg_install(&root, &newer)?;
    assert_eq!(installed_version(&root, "zt-collector")?, "0.1.0+e2e.2");
    let mut service = start("collector-2")?;
    service
        .wait_for_log("collector listening", Duration::from_secs(60))
        .await?;
    assert_eq!(
        std::fs::read(root.host_path("/var/lib/zt-collector/ca/ca.crt"))?,
        ca,
        "the upgrade replaced the CA"
    );
    enroll("pc-0003")?;
    stop_service(&root, "zt-collector.service", &mut service)?;

    root.run("dpkg", &["--purge", "zt-collector", "ztctl"])?;
    for path in [
        "/usr/bin/zt-collector",
        "/usr/bin/ztctl",
        "/var/lib/zt-collector",
        "/etc/zt/collector.toml",
        "/usr/lib/systemd/system/zt-collector.service",
    ] {
        ensure!(!present(&root, path), "{path} stayed after purge");
    }
    ensure!(
        root.run("getent", &["passwd", "zt-collector"]).is_err(),
        "the zt-collector user stayed after purge"
    );
    // The telemetry is never the package's to delete.
    let tables: u64 = clickhouse
        .client()
        .query("SELECT count() FROM system.tables WHERE database = ?")
        .bind(&database)
        .fetch_one()
        .await?;
    ensure!(tables > 0, "the purge dropped the ClickHouse database");
    Ok(())
}
