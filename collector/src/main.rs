//! The `zt-collector` binary: flags, logging, then the library.

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use zt_collector::{
    config::{AccountCommand, Command, CredentialCommand, TokenCommand},
    control_plane::ControlPlane,
    CliArgs, CollectorConfig, LogFormat,
};

/// mimalloc, not glibc's malloc: ingest allocates and frees many small
/// strings per event, and glibc spent about a third of the collector's CPU
/// there (docs/benchmarks.md, "Detection").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// While it lives, a root process acts as the owner of an installed
/// collector's state directory (its service user, `zt-collector`): the
/// tokens, accounts, devices and users an administration command writes
/// there must stay readable by the service. Only the effective ids change,
/// so what the command writes elsewhere (a credential for the admin) is
/// written as root again once it is dropped. Does nothing when not root or
/// when root owns the directory (the local stack, the tests).
struct ActingAsStateOwner {
    acting: bool,
}

impl ActingAsStateOwner {
    fn enter(state_dir: &std::path::Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let idle = Self { acting: false };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(idle);
        }
        let Ok(meta) = std::fs::metadata(state_dir) else {
            return Ok(idle);
        };
        let (uid, gid) = (meta.uid(), meta.gid());
        if uid == 0 {
            return Ok(idle);
        }
        // SAFETY: plain syscalls; glibc applies them to every thread.
        let failed = unsafe { libc::setegid(gid) != 0 || libc::seteuid(uid) != 0 };
        if failed {
            let err = std::io::Error::last_os_error();
            drop(Self { acting: true });
            return Err(err).with_context(|| {
                format!(
                    "acting as uid {uid} (the owner of {}) to administer it",
                    state_dir.display()
                )
            });
        }
        Ok(Self { acting: true })
    }
}

impl Drop for ActingAsStateOwner {
    fn drop(&mut self) {
        if self.acting {
            // SAFETY: as above; the real uid is still root's.
            unsafe {
                libc::seteuid(0);
                libc::setegid(0);
            }
        }
    }
}

/// Commands run on the collector host against its state directory.
fn administer(config: &CollectorConfig, command: &Command) -> anyhow::Result<()> {
    let state_dir = &config.identity.state_dir;
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
            let (credential, bundle) = {
                let _owner = ActingAsStateOwner::enter(state_dir)?;
                open()?
                    .issue_user_credential(org, user, *role, *ttl)
                    .context("issuing the credential")?
            };
            // The admin's own files, as the admin.
            zt_identity::files::ensure_dir(out, 0o700)?;
            let credential_path = out.join("credential.pem");
            zt_identity::write_private_key(&credential_path, credential.as_bytes())?;
            zt_identity::files::write_file_atomic(&out.join("ca.pem"), bundle.as_bytes(), 0o644)?;
            println!("{}", credential_path.display());
            Ok(())
        }
        Command::Account(AccountCommand::Create { org, user, role }) => {
            let password = read_password()?;
            let _owner = ActingAsStateOwner::enter(state_dir)?;
            zt_collector::console::accounts::Accounts::new(state_dir)
                .create(&open()?, org, user, *role, &password)
                .context("creating the console account")?;
            eprintln!(
                "console account {user} ({} of {org}) ready: sign in at https://<collector>:<port>/console/",
                role.as_str()
            );
            Ok(())
        }
        Command::Token(TokenCommand::Create {
            org,
            device,
            ttl,
            json,
        }) => {
            let token = {
                let _owner = ActingAsStateOwner::enter(state_dir)?;
                open()?
                    .create_token(org, device, *ttl)
                    .context("creating the enrollment token")?
            };
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

/// The password from stdin: one line; asked twice when stdin is a
/// terminal (and not echoed).
fn read_password() -> anyhow::Result<String> {
    use std::io::{BufRead as _, IsTerminal as _};
    let stdin = std::io::stdin();
    let read_line = || -> anyhow::Result<String> {
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    };
    if !stdin.is_terminal() {
        return read_line();
    }
    let echo = Echo::off();
    eprint!("password: ");
    let first = read_line()?;
    eprint!("\nagain: ");
    let second = read_line()?;
    eprintln!();
    drop(echo);
    anyhow::ensure!(first == second, "the two passwords differ");
    Ok(first)
}

/// Terminal echo off while it lives.
struct Echo(Option<libc::termios>);

impl Echo {
    fn off() -> Echo {
        // SAFETY: termios calls on stdin with a zeroed, then filled, struct.
        unsafe {
            let mut term: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut term) != 0 {
                return Echo(None);
            }
            let saved = term;
            term.c_lflag &= !libc::ECHO;
            libc::tcsetattr(0, libc::TCSANOW, &term);
            Echo(Some(saved))
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restoring the attributes read in `off`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
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
