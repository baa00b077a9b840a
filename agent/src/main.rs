//! `zt-agent`: the endpoint daemon.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use zt_agent::{
    config::{self, FlagOverrides, LogFormat},
    runtime_status::{Liveness, RuntimeStatus},
};

#[derive(Debug, Parser)]
#[command(
    name = "zt-agent",
    version,
    about = "Zero-trust endpoint agent and EDR sensor"
)]
struct Cli {
    /// TOML configuration file (default: /etc/zt/agent.toml when present).
    #[arg(long, env = "ZT_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Collector, https://host:port (default: where the device enrolled).
    #[arg(long)]
    collector: Option<String>,
    /// State directory: identity (key, certificate), later spool and policy.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Without a command: run the agent.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Enrolls this device once: makes its key (it never leaves the host),
    /// gets a certificate with a one-time token, stores both in the state
    /// directory.
    Enroll {
        /// The collector, https://host:port.
        #[arg(long)]
        collector: String,
        /// The token `zt-collector token create` printed (`<token>.<CA pin>`).
        #[arg(long, env = "ZT_AGENT_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// This device's identity and certificate, and whether the agent runs
    /// (sensors, collector, spool, policy); exits 1 when the device is not
    /// enrolled or its certificate expired, 3 when the agent does not run.
    Status {
        #[arg(long)]
        json: bool,
    },
}

/// The unit the Debian package installs (docs/install.md).
const INSTALLED_UNIT: &str = "/usr/lib/systemd/system/zt-agent.service";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let flags = FlagOverrides {
        collector_url: cli.collector,
        state_dir: cli.state_dir,
        log_format: cli.log_format,
    };
    let config = config::load(cli.config.as_deref(), &flags).context("loading configuration")?;
    if let Some(Command::Status { json }) = cli.command {
        return status(&config, json);
    }
    init_tracing(config.log_format);
    if let Some(Command::Enroll { collector, token }) = cli.command {
        let identity = zt_agent::enrollment::enroll(&collector, &token, &config.state_dir)
            .await
            .with_context(|| format!("enrolling at {collector}"))?;
        println!(
            "enrolled as {}; certificate valid until {} (unix)",
            identity.id,
            identity
                .validity
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        );
        // Installed from the package: the service waited for this.
        if std::path::Path::new(INSTALLED_UNIT).exists()
            && config.state_dir == config::AgentConfig::default().state_dir
        {
            println!("start the agent now: systemctl start zt-agent (from now on it starts on every boot)");
        }
        return Ok(());
    }
    tracing::info!(config = ?config, "effective configuration");
    zt_agent::run(config, shutdown_signal()).await
}

/// `zt-agent status`: what the state directory says.
fn status(config: &zt_agent::config::AgentConfig, json: bool) -> anyhow::Result<()> {
    use std::time::{SystemTime, UNIX_EPOCH};
    let unix = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    let identity = match zt_agent::enrollment::DeviceIdentity::load(&config.state_dir) {
        Ok(identity) => identity,
        Err(err) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "enrolled": false, "error": err.to_string() })
                );
            } else {
                eprintln!("zt-agent: {err}");
            }
            std::process::exit(1);
        }
    };
    let now = SystemTime::now();
    let valid = identity.validity.contains(now);
    let collector = config
        .collector_url
        .clone()
        .or_else(|| identity.collector_url.clone())
        .unwrap_or_default();
    let revocations = zt_identity::RevocationList::load(&config.state_dir.join("revocations.json"))
        .map(|list| list.version())
        .unwrap_or(0);
    let runtime = RuntimeStatus::read(&config.state_dir);
    let liveness = RuntimeStatus::liveness(runtime.as_ref());
    let running = liveness == Liveness::Running;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "running": running,
                "agent_state": match liveness {
                    Liveness::NeverRan => "never_ran",
                    Liveness::Running => "running",
                    Liveness::StoppedCleanly => "stopped",
                    Liveness::Died => "died",
                },
                "agent": runtime,
                "enrolled": true,
                "spiffe_id": identity.id.to_string(),
                "org_id": identity.id.org(),
                "device_id": identity.id.device_id().unwrap_or_default(),
                "collector_url": collector,
                "certificate_valid": valid,
                "certificate_not_before_unix": unix(identity.validity.not_before),
                "certificate_not_after_unix": unix(identity.validity.not_after),
                "revocation_list_version": revocations,
                "state_dir": config.state_dir.display().to_string(),
            })
        );
    } else {
        let left = identity
            .validity
            .not_after
            .duration_since(now)
            .map(|d| format!("{} s left", d.as_secs()))
            .unwrap_or_else(|_| "EXPIRED".to_owned());
        println!("identity      {}", identity.id);
        println!("collector     {collector}");
        println!(
            "certificate   valid until {} (unix; {left})",
            unix(identity.validity.not_after)
        );
        println!("revocations   list v{revocations}");
        println!("state         {}", config.state_dir.display());
        print_runtime(runtime.as_ref(), &liveness, unix(now));
    }
    if !valid {
        std::process::exit(1)
    }
    if !running {
        std::process::exit(3)
    }
    Ok(())
}

/// The running agent's part of `zt-agent status`, for people.
fn print_runtime(runtime: Option<&RuntimeStatus>, liveness: &Liveness, now_unix: u64) {
    let ago = |t: u64| match now_unix.saturating_sub(t) {
        _ if t == 0 => "never".to_owned(),
        s if s < 120 => format!("{s} s ago"),
        s => format!("{} min ago", s / 60),
    };
    let Some(runtime) = runtime else {
        println!("agent         NOT RUNNING (it never ran here; systemctl start zt-agent)");
        return;
    };
    match liveness {
        Liveness::Running => println!(
            "agent         running, pid {}, version {}, since {}",
            runtime.pid,
            runtime.version,
            ago(runtime.started_unix)
        ),
        Liveness::StoppedCleanly => println!(
            "agent         NOT RUNNING (stopped cleanly {})",
            ago(runtime.updated_unix)
        ),
        Liveness::Died | Liveness::NeverRan => println!(
            "agent         NOT RUNNING (its process {} ended without stopping: crashed or killed; last seen {})",
            runtime.pid,
            ago(runtime.updated_unix)
        ),
    }
    if *liveness != Liveness::Running {
        println!("              as it was at its last update:");
    }
    println!("guarding      {}", runtime.guarded_cgroup.display());
    println!("sensors       {}", runtime.sensors.join(", "));
    println!(
        "collector     {} (last reached {})",
        if runtime.collector_connected {
            "connected"
        } else {
            "UNREACHABLE"
        },
        ago(runtime.collector_seen_unix)
    );
    println!(
        "events        {} stored by the collector, {} spooled ({} bytes), {} lost in the kernel",
        runtime.events_acked, runtime.spool_events, runtime.spool_bytes, runtime.kernel_drops
    );
    println!(
        "policy        bundle serial {}, guard version {}",
        runtime.policy_bundle_serial, runtime.policy_version
    );
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
