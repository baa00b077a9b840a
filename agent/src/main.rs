//! `zt-agent`: the endpoint daemon.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use zt_agent::config::{self, FlagOverrides, LogFormat};

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
    /// Collector gRPC endpoint, e.g. http://127.0.0.1:50051.
    #[arg(long)]
    collector: Option<String>,
    /// Organisation (tenant) of this device.
    #[arg(long)]
    org: Option<String>,
    /// State directory (device id; later keys, spool and policy).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let flags = FlagOverrides {
        collector_url: cli.collector,
        org_id: cli.org,
        state_dir: cli.state_dir,
        log_format: cli.log_format,
    };
    let config = config::load(cli.config.as_deref(), &flags).context("loading configuration")?;
    init_tracing(config.log_format);
    tracing::info!(config = ?config, "effective configuration");
    zt_agent::run(config, shutdown_signal()).await
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
