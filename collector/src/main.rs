//! The `zt-collector` binary: flags, logging, then the library.

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use zt_collector::{
    config::{Command, CredentialCommand, TokenCommand},
    control_plane::ControlPlane,
    CliArgs, CollectorConfig, LogFormat,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = CliArgs::parse();
    let config = CollectorConfig::load(&args).context("loading the collector configuration")?;
    if let Some(command) = &args.command {
        return administer(&config, command);
    }
    init_tracing(config.log_format);
    tracing::info!(config = ?config, "effective configuration");
    zt_collector::run(config).await?;
    Ok(())
}

/// Commands run on the collector host against its state directory.
fn administer(config: &CollectorConfig, command: &Command) -> anyhow::Result<()> {
    let open = || {
        ControlPlane::open(&config.identity).with_context(|| {
            format!(
                "opening the control plane in {}",
                config.identity.state_dir.display()
            )
        })
    };
    match command {
        Command::Credential(CredentialCommand::Create {
            org,
            user,
            out,
            ttl,
            role,
        }) => {
            let (credential, bundle) = open()?
                .issue_user_credential(org, user, *role, *ttl)
                .context("issuing the credential")?;
            zt_identity::files::ensure_dir(out, 0o700)?;
            let credential_path = out.join("credential.pem");
            zt_identity::write_private_key(&credential_path, credential.as_bytes())?;
            zt_identity::files::write_file_atomic(&out.join("ca.pem"), bundle.as_bytes(), 0o644)?;
            println!("{}", credential_path.display());
            Ok(())
        }
        Command::Token(TokenCommand::Create {
            org,
            device,
            ttl,
            json,
        }) => {
            let token = open()?
                .create_token(org, device, *ttl)
                .context("creating the enrollment token")?;
            if *json {
                println!("{}", serde_json::to_string(&token)?);
            } else {
                println!("{}", token.join_token);
                eprintln!(
                    "enrolls {} once, until {} (unix); on the device: zt-agent enroll --collector https://<collector>:<port> --token <the token above>",
                    token.spiffe_id, token.expires_unix
                );
            }
            Ok(())
        }
    }
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
