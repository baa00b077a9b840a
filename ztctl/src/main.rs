//! `ztctl`: the command line of admins and SOC analysts.
//!
//! Every command that prints data takes `--json` and then prints only JSON
//! on stdout; errors go to stderr with a non-zero exit code.

mod config;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use proto::control::{control_client::ControlClient, StatusReply, StatusRequest};

#[derive(Debug, Parser)]
#[command(
    name = "ztctl",
    version,
    about = "Admin and analyst CLI of the zero-trust agent and EDR collector"
)]
struct Cli {
    /// Configuration file (default: $ZTCTL_CONFIG, else ~/.config/zt/ztctl.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Collector endpoint, overriding the configuration.
    #[arg(long, global = true)]
    collector: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Health of the collector: storage reachability, connected agents, counters.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(err) = run(cli).await {
        eprintln!("ztctl: {err:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = config::load(cli.config.as_deref(), cli.collector)?;
    match cli.command {
        Command::Status { json } => {
            let channel = zt_grpc_tls::channel(&config.collector_url, config.client_tls()?)
                .await
                .with_context(|| {
                    format!("cannot reach the collector at {}", config.collector_url)
                })?;
            let mut client = ControlClient::new(channel);
            let reply = client
                .status(StatusRequest {})
                .await
                .context("status request failed")?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status_json(&config.collector_url, &reply))?
                );
            } else {
                print_status(&config.collector_url, &reply);
            }
        }
    }
    Ok(())
}

fn status_json(url: &str, reply: &StatusReply) -> serde_json::Value {
    serde_json::json!({
        "collector": url,
        "version": reply.version,
        "clickhouse_reachable": reply.clickhouse_reachable,
        "clickhouse_error": reply.clickhouse_error,
        "connected_agents": reply.connected_agents,
        "events_stored": reply.events_stored,
        "events_rejected": reply.events_rejected,
        "insert_failures": reply.insert_failures,
        "uptime_seconds": reply.uptime_seconds,
    })
}

fn print_status(url: &str, reply: &StatusReply) {
    let storage = if reply.clickhouse_reachable {
        "reachable".to_owned()
    } else {
        format!("UNREACHABLE ({})", reply.clickhouse_error)
    };
    println!(
        "collector         {url} (version {}, up {} s)",
        reply.version, reply.uptime_seconds
    );
    println!("clickhouse        {storage}");
    println!("connected agents  {}", reply.connected_agents);
    println!("events stored     {}", reply.events_stored);
    println!("events rejected   {}", reply.events_rejected);
    println!("insert failures   {}", reply.insert_failures);
}
