//! The `zt-collector` binary: flags, logging, then the library.

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use zt_collector::{CliArgs, CollectorConfig, LogFormat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = CliArgs::parse();
    let config = CollectorConfig::load(&args).context("loading the collector configuration")?;
    init_tracing(config.log_format);
    tracing::info!(config = ?config, "effective configuration");
    zt_collector::run(config).await?;
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
