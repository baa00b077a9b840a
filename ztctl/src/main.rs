//! `ztctl`: the command line of admins and SOC analysts.
//!
//! Every command that prints data takes `--json` and then prints only JSON
//! on stdout; errors go to stderr with a non-zero exit code.

mod config;
mod policy_cmd;
mod policy_diff;
mod soc_cmd;
mod soc_render;
mod when;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::time::Duration;

use proto::control::{
    admin_client::AdminClient, control_client::ControlClient, CreateEnrollmentTokenRequest, Device,
    ListDevicesRequest, RevokeDeviceRequest, StatusReply, StatusRequest,
};
use proto::query::query_client::QueryClient;
use tonic::transport::Channel;

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
    /// One-time tokens that enroll a device (admin).
    #[command(name = "enroll-token", subcommand)]
    EnrollToken(EnrollTokenCommand),
    /// Enrolled devices: list, revoke.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Connection policy: validate, explain, push, status, diff, rollback
    /// (see docs/policy.md).
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    /// Incidents, events, fleet and KPI: the SOC's commands (see docs/cli.md).
    #[command(flatten)]
    Soc(soc_cmd::SocCommand),
}

#[derive(Debug, Subcommand)]
enum EnrollTokenCommand {
    /// Prints a token for `zt-agent enroll --token`; it works once.
    Create {
        /// Organisation the device joins [default: yours].
        #[arg(long, default_value = "")]
        org: String,
        /// The device's name (its id in the organisation).
        #[arg(long)]
        device: String,
        /// How long the token works: 90s, 30m, 1h, 7d [default: 1h].
        #[arg(long, default_value = "1h", value_parser = zt_identity::parse_lifetime)]
        ttl: Duration,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Devices of your organisation (every organisation for the SOC).
    List {
        #[arg(long, default_value = "")]
        org: String,
        #[arg(long)]
        json: bool,
    },
    /// Revokes a device: its connections are cut at once and it cannot
    /// connect again.
    Revoke {
        /// The device's id in its organisation.
        device: String,
        #[arg(long, default_value = "")]
        org: String,
        /// Why, for the audit log.
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() {
    // Output piped into `head` and the like: end quietly when the reader
    // goes away, as command-line tools do.
    // SAFETY: restoring the default disposition of a signal at start-up.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    if let Err(err) = run(cli).await {
        eprintln!("ztctl: {err:#}");
        std::process::exit(1);
    }
}

async fn connect(config: &config::ZtctlConfig) -> anyhow::Result<Channel> {
    zt_grpc_tls::channel(&config.collector_url, config.client_tls()?)
        .await
        .with_context(|| format!("cannot reach the collector at {}", config.collector_url))
}

/// A refused call, with the collector's reason.
fn refused(what: &str) -> impl FnOnce(tonic::Status) -> anyhow::Error + '_ {
    move |status| anyhow::anyhow!("{what}: {} ({:?})", status.message(), status.code())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = config::load(cli.config.as_deref(), cli.collector)?;
    match cli.command {
        Command::Policy(command) => {
            policy_cmd::run(command, || async {
                Ok(AdminClient::new(connect(&config).await?))
            })
            .await?
        }
        Command::Soc(command) => {
            soc_cmd::run(command, || async {
                Ok(QueryClient::new(connect(&config).await?))
            })
            .await?
        }
        Command::Status { json } => {
            let mut client = ControlClient::new(connect(&config).await?);
            let reply = client
                .status(StatusRequest {})
                .await
                .map_err(refused("status request failed"))?
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
        Command::EnrollToken(EnrollTokenCommand::Create {
            org,
            device,
            ttl,
            json,
        }) => {
            let mut client = AdminClient::new(connect(&config).await?);
            let reply = client
                .create_enrollment_token(CreateEnrollmentTokenRequest {
                    org_id: org,
                    device_id: device,
                    ttl_seconds: ttl.as_secs(),
                })
                .await
                .map_err(refused("token not created"))?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "join_token": reply.join_token,
                        "spiffe_id": reply.spiffe_id,
                        "expires_unix": reply.expires_unix,
                    })
                );
            } else {
                println!("{}", reply.join_token);
                eprintln!(
                    "enrolls {} once, until {} (unix): zt-agent enroll --collector {} --token <the token>",
                    reply.spiffe_id, reply.expires_unix, config.collector_url
                );
            }
        }
        Command::Device(DeviceCommand::List { org, json }) => {
            let mut client = AdminClient::new(connect(&config).await?);
            let devices = client
                .list_devices(ListDevicesRequest { org_id: org })
                .await
                .map_err(refused("cannot list devices"))?
                .into_inner()
                .devices;
            if json {
                let list: Vec<serde_json::Value> = devices.iter().map(device_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_devices(&devices);
            }
        }
        Command::Device(DeviceCommand::Revoke {
            device,
            org,
            reason,
            json,
        }) => {
            let mut client = AdminClient::new(connect(&config).await?);
            let reply = client
                .revoke_device(RevokeDeviceRequest {
                    org_id: org,
                    device_id: device.clone(),
                    reason,
                })
                .await
                .map_err(refused("device not revoked"))?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "device": device,
                        "revocation_version": reply.revocation_version,
                        "streams_closed": reply.streams_closed,
                    })
                );
            } else {
                println!(
                    "revoked {device} (revocation list v{}, {} open streams cut)",
                    reply.revocation_version, reply.streams_closed
                );
            }
        }
    }
    Ok(())
}

fn device_json(d: &Device) -> serde_json::Value {
    serde_json::json!({
        "org_id": d.org_id,
        "device_id": d.device_id,
        "spiffe_id": d.spiffe_id,
        "hostname": d.hostname,
        "agent_version": d.agent_version,
        "enrolled_unix": d.enrolled_unix,
        "certificate_serial": d.certificate_serial,
        "certificate_not_after_unix": d.certificate_not_after_unix,
        "revoked": d.revoked,
        "connected": d.connected,
        "last_heartbeat_unix": d.last_heartbeat_unix,
    })
}

fn print_devices(devices: &[Device]) {
    println!(
        "{:<16} {:<24} {:<24} {:<10} {:<9} {:>12} {:>12}",
        "ORG", "DEVICE", "HOST", "STATE", "CONNECTED", "CERT EXPIRY", "HEARTBEAT"
    );
    for d in devices {
        println!(
            "{:<16} {:<24} {:<24} {:<10} {:<9} {:>12} {:>12}",
            d.org_id,
            d.device_id,
            d.hostname,
            if d.revoked { "revoked" } else { "enrolled" },
            if d.connected { "yes" } else { "no" },
            d.certificate_not_after_unix,
            d.last_heartbeat_unix
        );
    }
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
