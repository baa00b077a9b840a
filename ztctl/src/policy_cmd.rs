//! `ztctl policy`: check a policy file before it goes anywhere, and ask why
//! a connection gets its verdict.
//!
//! `validate` and `explain` work on files: an organisation's layer is
//! checked against the baseline it will be layered on (`--baseline`).

use std::{
    net::{SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use policy::{Diagnostics, Direction, Flow, LayerKind, LoadError, PolicySet};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Parses and checks a policy file and runs its `tests:`; every problem
    /// is printed with its line, column and a hint.
    Validate {
        /// The layer to check (baseline or organisation).
        file: PathBuf,
        /// The baseline an organisation's layer is checked against.
        #[arg(long)]
        baseline: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The verdict a connection gets, the rule that decides it, and for a
    /// default verdict the rules that came nearest and why they did not
    /// match.
    Explain {
        /// The policy: a baseline, or an organisation's layer with
        /// `--baseline`.
        #[arg(long)]
        policy: PathBuf,
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// The calling device's SPIFFE id.
        #[arg(long)]
        device: String,
        #[arg(long, default_value = "")]
        user: String,
        /// The calling process's executable (absolute path).
        #[arg(long, default_value = "")]
        exe: String,
        /// Its SHA-256, when a rule names binaries by hash.
        #[arg(long, default_value = "")]
        sha256: String,
        /// The destination, HOST:PORT (a name is resolved here).
        #[arg(long)]
        to: String,
        /// Explain as the gateway decides a tunnelled connection.
        #[arg(long)]
        inbound: bool,
        #[arg(long)]
        json: bool,
    },
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Loads a layer, with the baseline when it is an organisation's.
fn load(file: &Path, baseline: Option<&Path>) -> anyhow::Result<Result<PolicySet, Failure>> {
    let text = read(file)?;
    let layer = match policy::parse(&text) {
        Ok(layer) => layer,
        Err(d) => return Ok(Err(Failure::new(file, &text, d))),
    };
    let result = match (layer.kind, baseline) {
        (LayerKind::Baseline, Some(_)) => {
            bail!("{} is a baseline; --baseline is for an organisation's layer", file.display())
        }
        (LayerKind::Baseline, None) => policy::load(&text, None),
        (LayerKind::Organisation, None) => bail!(
            "{} is an organisation's layer: give the baseline it is layered on with --baseline FILE",
            file.display()
        ),
        (LayerKind::Organisation, Some(base)) => {
            let base_text = read(base)?;
            match policy::load(&base_text, Some(&text)) {
                Err(LoadError::Baseline(d)) => return Ok(Err(Failure::new(base, &base_text, d))),
                other => other,
            }
        }
    };
    Ok(result.map_err(|e| match e {
        LoadError::Baseline(d) | LoadError::Organisation(d) => Failure::new(file, &text, d),
    }))
}

/// Diagnostics with the file they are about.
pub struct Failure {
    file: String,
    text: String,
    diagnostics: Diagnostics,
}

impl Failure {
    fn new(file: &Path, text: &str, diagnostics: Diagnostics) -> Self {
        Self {
            file: file.display().to_string(),
            text: text.to_owned(),
            diagnostics,
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "valid": false,
            "file": self.file,
            "errors": self.diagnostics.0.iter().map(|d| serde_json::json!({
                "line": d.position.line,
                "column": d.position.column,
                "message": d.message,
                "hint": d.hint,
            })).collect::<Vec<_>>(),
        })
    }
}

pub fn run(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Validate {
            file,
            baseline,
            json,
        } => match load(&file, baseline.as_deref())? {
            Ok(set) => {
                let layer = set.organisation.as_ref().unwrap_or(&set.baseline);
                let summary = serde_json::json!({
                    "valid": true,
                    "file": file.display().to_string(),
                    "kind": layer.kind,
                    "org": layer.org,
                    "rules": layer.rules.len(),
                    "tests_passed": layer.tests.len(),
                    "rules_in_force": set.rules.len(),
                });
                if json {
                    println!("{}", serde_json::to_string_pretty(&summary)?);
                } else {
                    println!(
                            "{}: valid {} layer{}: {} rules, {} tests passed ({} rules in force with the layers below)",
                            file.display(),
                            layer.kind,
                            layer.org.as_deref().map(|o| format!(" of {o}")).unwrap_or_default(),
                            layer.rules.len(),
                            layer.tests.len(),
                            set.rules.len(),
                        );
                }
                Ok(())
            }
            Err(failure) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&failure.json())?);
                } else {
                    eprint!(
                        "{}",
                        failure.diagnostics.render(&failure.text, &failure.file)
                    );
                }
                bail!(
                    "{}: {} problem(s)",
                    failure.file,
                    failure.diagnostics.0.len()
                )
            }
        },
        PolicyCommand::Explain {
            policy,
            baseline,
            device,
            user,
            exe,
            sha256,
            to,
            inbound,
            json,
        } => {
            let set = match load(&policy, baseline.as_deref())? {
                Ok(set) => set,
                Err(failure) => {
                    eprint!(
                        "{}",
                        failure.diagnostics.render(&failure.text, &failure.file)
                    );
                    bail!(
                        "the policy does not load; `ztctl policy validate` shows the same problems"
                    )
                }
            };
            if !device.starts_with("spiffe://") {
                bail!("--device takes the device's SPIFFE id, e.g. spiffe://pref.example/org/city-a/device/pc-0001");
            }
            let destination = resolve(&to)?;
            let flow = Flow {
                direction: if inbound {
                    Direction::Inbound
                } else {
                    Direction::Outbound
                },
                device: &device,
                user: &user,
                exe: &exe,
                exe_sha256: &sha256,
                destination,
            };
            let decision = set.evaluate(&flow);
            if json {
                println!("{}", serde_json::to_string_pretty(&decision)?);
            } else {
                print_decision(&decision, destination);
            }
            Ok(())
        }
    }
}

fn resolve(to: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(address) = to.parse() {
        return Ok(address);
    }
    to.to_socket_addrs()
        .with_context(|| format!("--to {to}: not HOST:PORT, or the name does not resolve"))?
        .next()
        .with_context(|| format!("--to {to}: the name has no address"))
}

fn print_decision(d: &policy::Decision, destination: SocketAddr) {
    println!("destination  {destination} ({})", d.direction.as_str());
    println!("verdict      {}", d.verdict);
    match d.layer {
        Some(layer) => println!("rule         {} ({layer} layer)", d.rule),
        None => println!("rule         default (no rule matched)"),
    }
    if let Some(service) = &d.service {
        match &d.gateway {
            Some(gateway) => println!("service      {service} via gateway {gateway}"),
            None => println!("service      {service}"),
        }
    }
    if let Some(dry) = &d.dry_run {
        println!("dry-run      would {} by `{}`", dry.verdict, dry.rule);
    }
    if d.matched.len() > 1 {
        println!("also matched {}", d.matched[1..].join(", "));
    }
    for near in &d.nearest {
        println!("nearest      `{}` ({}):", near.rule, near.action);
        for reason in &near.failed {
            println!("               - {reason}");
        }
    }
}
