//! `ztctl policy`: check a policy file before it goes anywhere, and ask why
//! a connection gets its verdict.
//!
//! `validate` works on files (an organisation's layer is checked against
//! the baseline it will be layered on, `--baseline`); `explain` on files or
//! on the policy in force; `push`, `rollback`, `status` and `diff` talk to
//! the collector. `push --canary GROUP` stages the push: the group's
//! devices first, then everyone, unless the collector rolls it back.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use policy::{Diagnostics, Direction, Flow, LayerKind, LoadError, PolicySet};
use proto::control::{
    admin_client::AdminClient, AgentPolicy, GetPolicyRequest, PolicyRollout, PolicyStatusReply,
    PolicyStatusRequest, PushPolicyReply, PushPolicyRequest, ReplayPolicyReply,
    ReplayPolicyRequest, RollbackPolicyRequest,
};
use tonic::transport::Channel;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Checks a layer against what is in force, signs it into a bundle for
    /// every organisation it concerns, and follows the rollout until every
    /// connected agent applied it (or refused it) or `--wait` ends.
    ///
    /// With `--canary GROUP`, only the devices of that device group get it
    /// first; the others keep their serial until the canary time is over.
    /// If the canary's rate of denied decisions or connection errors jumps
    /// past the collector's bounds meanwhile, the collector rolls the push
    /// back on its own, and this command fails with the reason.
    Push {
        file: PathBuf,
        /// How long to follow the rollout, in seconds, after the canary
        /// (0: do not wait).
        #[arg(long, default_value_t = 30)]
        wait: u64,
        /// A device group (in the layer or the baseline) to get it first.
        #[arg(long, value_name = "GROUP")]
        canary: Option<String>,
        /// How long the canary runs [default: the collector's]
        #[arg(long, value_name = "N", requires = "canary")]
        canary_seconds: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// The serial each agent of an organisation applied, and the latest
    /// rollout (canary, promoted, rolled back, complete).
    Status {
        /// [default: yours]
        #[arg(long, default_value = "")]
        org: String,
        #[arg(long)]
        json: bool,
    },
    /// Restores the content of an earlier serial, as a new serial.
    Rollback {
        serial: u64,
        #[arg(long, default_value = "")]
        org: String,
        #[arg(long, default_value_t = 30)]
        wait: u64,
        #[arg(long)]
        json: bool,
    },
    /// What a layer would change against the one in force: rules, groups,
    /// services and defaults added, removed or changed.
    /// Re-evaluates the decisions stored in the last `--since` under a
    /// candidate layer and lists the flows whose verdict or rule would
    /// change, most frequent first.
    Replay {
        file: PathBuf,
        /// How far back: 90s, 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = zt_identity::parse_lifetime)]
        since: std::time::Duration,
        /// Whose decisions [default: the layer's organisation, else yours].
        #[arg(long, default_value = "")]
        org: String,
        /// Most decisions read (0: the collector's default, 100,000).
        #[arg(long, default_value_t = 0)]
        limit: u64,
        #[arg(long)]
        json: bool,
    },
    Diff {
        file: PathBuf,
        /// Whose layer in force to compare with [default: the file's org].
        #[arg(long, default_value = "")]
        org: String,
        #[arg(long)]
        json: bool,
    },
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
        /// A policy file to explain against (a baseline, or an
        /// organisation's layer with `--baseline`); without it, the policy
        /// in force for the device's organisation, from the collector.
        #[arg(long)]
        policy: Option<PathBuf>,
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

/// Runs a policy command; `collector` connects when it needs the
/// collector.
pub async fn run<F, Fut>(command: PolicyCommand, collector: F) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<AdminClient<Channel>>>,
{
    match command {
        PolicyCommand::Push {
            file,
            wait,
            canary,
            canary_seconds,
            json,
        } => {
            let text = read(&file)?;
            let layer = match policy::parse(&text) {
                Ok(layer) => layer,
                Err(d) => {
                    eprint!("{}", d.render(&text, &file.display().to_string()));
                    bail!(
                        "{}: {} problem(s); nothing was pushed",
                        file.display(),
                        d.0.len()
                    );
                }
            };
            let mut admin = collector().await?;
            // Check locally against the layers in force first, so problems
            // print with their source line.
            if let Some(org) = &layer.org {
                let in_force = admin
                    .get_policy(GetPolicyRequest {
                        org_id: org.clone(),
                    })
                    .await
                    .map_err(refused("cannot read the policy in force"))?
                    .into_inner();
                if let Err(e) = policy::load(&in_force.baseline, Some(&text)) {
                    report_load_error(e, &file, &text)?;
                }
            } else if let Err(e) = policy::load(&text, None) {
                report_load_error(e, &file, &text)?;
            }
            let reply = admin
                .push_policy(PushPolicyRequest {
                    text,
                    canary_group: canary.unwrap_or_default(),
                    canary_seconds: canary_seconds.unwrap_or(0),
                })
                .await
                .map_err(refused("push refused"))?
                .into_inner();
            if reply.canary_seconds > 0 {
                follow_canary(&mut admin, &reply, wait, json).await
            } else {
                follow(&mut admin, &reply, wait, json).await
            }
        }
        PolicyCommand::Rollback {
            serial,
            org,
            wait,
            json,
        } => {
            let mut admin = collector().await?;
            let reply = admin
                .rollback_policy(RollbackPolicyRequest {
                    org_id: org,
                    serial,
                })
                .await
                .map_err(refused("rollback refused"))?
                .into_inner();
            follow(&mut admin, &reply, wait, json).await
        }
        PolicyCommand::Status { org, json } => {
            let mut admin = collector().await?;
            let status = admin
                .policy_status(PolicyStatusRequest { org_id: org })
                .await
                .map_err(refused("cannot read the policy status"))?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&status_json(&status))?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        PolicyCommand::Replay {
            file,
            since,
            org,
            limit,
            json,
        } => {
            let text = read(&file)?;
            if let Err(d) = policy::parse(&text) {
                eprint!("{}", d.render(&text, &file.display().to_string()));
                bail!("{}: does not parse", file.display());
            }
            let mut admin = collector().await?;
            let reply = admin
                .replay_policy(ReplayPolicyRequest {
                    text,
                    org_id: org,
                    since_seconds: since.as_secs(),
                    limit,
                })
                .await
                .map_err(refused("replay refused"))?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&replay_json(&reply))?);
            } else {
                print_replay(&reply);
            }
            Ok(())
        }
        PolicyCommand::Diff { file, org, json } => {
            let text = read(&file)?;
            let layer = policy::parse(&text).map_err(|d| {
                eprint!("{}", d.render(&text, &file.display().to_string()));
                anyhow::anyhow!("{}: does not parse", file.display())
            })?;
            let org = if org.is_empty() {
                layer.org.clone().unwrap_or_default()
            } else {
                org
            };
            let mut admin = collector().await?;
            let in_force = admin
                .get_policy(GetPolicyRequest { org_id: org })
                .await
                .map_err(refused("cannot read the policy in force"))?
                .into_inner();
            let current_text = match layer.kind {
                LayerKind::Baseline => in_force.baseline.clone(),
                LayerKind::Organisation => in_force.organisation.clone(),
            };
            let current =
                if current_text.is_empty() {
                    None
                } else {
                    Some(policy::parse(&current_text).map_err(|d| {
                        anyhow::anyhow!("the layer in force does not parse here: {d}")
                    })?)
                };
            let changes = crate::policy_diff::diff(current.as_ref(), &layer);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "serial_in_force": in_force.serial,
                        "changes": changes,
                    }))?
                );
            } else if changes.is_empty() {
                println!("no change against serial {}", in_force.serial);
            } else {
                println!("against serial {}:", in_force.serial);
                for change in &changes {
                    println!("  {change}");
                }
            }
            Ok(())
        }

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
            if !device.starts_with("spiffe://") {
                bail!("--device takes the device's SPIFFE id, e.g. spiffe://pref.example/org/city-a/device/pc-0001");
            }
            let set = match policy {
                Some(policy) => match load(&policy, baseline.as_deref())? {
                    Ok(set) => set,
                    Err(failure) => {
                        eprint!(
                            "{}",
                            failure.diagnostics.render(&failure.text, &failure.file)
                        );
                        bail!("the policy does not load; `ztctl policy validate` shows the same problems")
                    }
                },
                None => {
                    let org = device_org(&device)?;
                    let mut admin = collector().await?;
                    let in_force = admin
                        .get_policy(GetPolicyRequest { org_id: org })
                        .await
                        .map_err(refused("cannot read the policy in force"))?
                        .into_inner();
                    let organisation = (!in_force.organisation.is_empty())
                        .then_some(in_force.organisation.as_str());
                    policy::load(&in_force.baseline, organisation).map_err(|e| {
                        anyhow::anyhow!("the policy in force does not load here: {e}")
                    })?
                }
            };
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

/// The organisation of a device SPIFFE id.
fn device_org(device: &str) -> anyhow::Result<String> {
    let parts: Vec<&str> = device.trim_start_matches("spiffe://").split('/').collect();
    match parts.as_slice() {
        [_, "org", org, "device", _] => Ok((*org).to_owned()),
        _ => bail!("--device {device}: not spiffe://<trust domain>/org/<org>/device/<id>"),
    }
}

fn report_load_error(e: LoadError, file: &Path, text: &str) -> anyhow::Result<()> {
    match e {
        LoadError::Organisation(d) => {
            eprint!("{}", d.render(text, &file.display().to_string()));
            bail!(
                "{}: {} problem(s); nothing was pushed",
                file.display(),
                d.0.len()
            )
        }
        LoadError::Baseline(d) => bail!("the baseline in force does not load with this layer: {d}"),
    }
}

/// A refused call, with the collector's reason.
fn refused(what: &str) -> impl FnOnce(tonic::Status) -> anyhow::Error + '_ {
    move |status| anyhow::anyhow!("{what}: {}", status.message())
}

/// One organisation's progress on a serial.
#[derive(Debug, serde::Serialize)]
struct Progress {
    org: String,
    serial: u64,
    connected: usize,
    applied: usize,
    refused: usize,
    errors: Vec<(String, String)>,
}

/// Prints a push or rollback and follows its rollout: until every
/// connected agent of each organisation reported the serial (applied or
/// refused), or `wait` seconds.
async fn follow(
    admin: &mut AdminClient<Channel>,
    reply: &PushPolicyReply,
    wait: u64,
    json: bool,
) -> anyhow::Result<()> {
    if !json {
        match reply.restores {
            0 => eprintln!(
                "serial {} signed for {}",
                reply.serial,
                reply.orgs.join(", ")
            ),
            r => eprintln!(
                "serial {} restores {r} for {}",
                reply.serial,
                reply.orgs.join(", ")
            ),
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
    let progress = follow_serial(admin, &reply.orgs, reply.serial, deadline, json).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "serial": reply.serial,
                "restores": (reply.restores > 0).then_some(reply.restores),
                "rollout": progress,
            }))?
        );
    }
    refusals_fail(&progress)
}

fn refusals_fail(progress: &[Progress]) -> anyhow::Result<()> {
    for p in progress {
        for (device, error) in &p.errors {
            eprintln!("  {device} refused serial {}: {error}", p.serial);
        }
    }
    let refusals: usize = progress.iter().map(|p| p.refused).sum();
    if let (true, Some(p)) = (refusals > 0, progress.first()) {
        bail!("{refusals} agent(s) refused serial {}", p.serial);
    }
    Ok(())
}

/// One organisation's progress on `serial`.
fn progress_of(status: &PolicyStatusReply, serial: u64) -> Progress {
    let connected: Vec<&AgentPolicy> = status.agents.iter().filter(|a| a.connected).collect();
    let refusals: Vec<&&AgentPolicy> = connected
        .iter()
        .filter(|a| a.refused_serial >= serial && a.applied_serial < serial)
        .collect();
    Progress {
        org: status.org_id.clone(),
        serial,
        connected: connected.len(),
        applied: connected
            .iter()
            .filter(|a| a.applied_serial >= serial)
            .count(),
        refused: refusals.len(),
        errors: refusals
            .iter()
            .map(|a| (a.device_id.clone(), a.error.clone()))
            .collect(),
    }
}

async fn statuses(
    admin: &mut AdminClient<Channel>,
    orgs: &[String],
) -> anyhow::Result<Vec<PolicyStatusReply>> {
    let mut out = Vec::with_capacity(orgs.len());
    for org in orgs {
        out.push(
            admin
                .policy_status(PolicyStatusRequest {
                    org_id: org.clone(),
                })
                .await
                .map_err(refused("cannot read the policy status"))?
                .into_inner(),
        );
    }
    Ok(out)
}

/// Follows `serial` until every connected agent of `orgs` reported it
/// (applied or refused) or `deadline`, printing progress as it changes.
async fn follow_serial(
    admin: &mut AdminClient<Channel>,
    orgs: &[String],
    serial: u64,
    deadline: std::time::Instant,
    json: bool,
) -> anyhow::Result<Vec<Progress>> {
    let mut last = String::new();
    loop {
        let progress: Vec<Progress> = statuses(admin, orgs)
            .await?
            .iter()
            .map(|s| progress_of(s, serial))
            .collect();
        let line = progress
            .iter()
            .map(|p| {
                format!(
                    "{}: {}/{} applied, {} refused",
                    p.org, p.applied, p.connected, p.refused
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        if !json && line != last {
            eprintln!("  {line}");
            last = line;
        }
        let done = progress
            .iter()
            .all(|p| p.applied + p.refused == p.connected);
        if done || std::time::Instant::now() >= deadline {
            return Ok(progress);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Follows a staged push: the canary devices applying it, then its
/// promotion (and everyone applying it) or its rollback (and everyone
/// applying the rollback, then failing with the reason).
async fn follow_canary(
    admin: &mut AdminClient<Channel>,
    reply: &PushPolicyReply,
    wait: u64,
    json: bool,
) -> anyhow::Result<()> {
    let serial = reply.serial;
    if !json {
        eprintln!(
            "serial {serial} signed for {}; canary: {} device(s) for {} s, everyone else keeps their serial meanwhile",
            reply.orgs.join(", "),
            reply.canary_devices,
            reply.canary_seconds
        );
    }
    if wait == 0 {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"serial": serial}))?
            );
        }
        return Ok(());
    }
    // The collector judges the canary every second: a little beyond its
    // end, it is decided.
    let decided_by =
        std::time::Instant::now() + std::time::Duration::from_secs(reply.canary_seconds + 30);
    let mut last = String::new();
    let rollout = loop {
        let statuses = statuses(admin, &reply.orgs).await?;
        let rollouts: Vec<(&PolicyStatusReply, &PolicyRollout)> = statuses
            .iter()
            .filter_map(|s| Some((s, s.rollout.as_ref().filter(|r| r.serial == serial)?)))
            .collect();
        let Some(&(_, rollout)) = rollouts.first() else {
            bail!("the collector no longer reports the rollout of serial {serial}");
        };
        if rollout.state != "canary" {
            break rollout.clone();
        }
        let line = rollouts
            .iter()
            .map(|(status, r)| {
                let applied = status
                    .agents
                    .iter()
                    .filter(|a| r.canary_devices.contains(&a.device_id))
                    .filter(|a| a.applied_serial >= serial)
                    .count();
                format!(
                    "{}: canary {applied}/{} applied",
                    status.org_id,
                    r.canary_devices.len()
                )
            })
            .chain(std::iter::once(health_line(rollout)))
            .collect::<Vec<_>>()
            .join("; ");
        if !json && line != last {
            eprintln!("  {line}");
            last = line;
        }
        if std::time::Instant::now() >= decided_by {
            bail!("the canary of serial {serial} is still running; follow it with `ztctl policy status`");
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
    match rollout.state.as_str() {
        "rolled_back" => {
            if !json {
                eprintln!(
                    "canary failed, rolled back: {}\nserial {} restores serial {} for everyone",
                    rollout.reason, rollout.rollback_serial, rollout.previous_serial
                );
            }
            let progress =
                follow_serial(admin, &reply.orgs, rollout.rollback_serial, deadline, json).await?;
            if json {
                print_canary_json(serial, &rollout, &progress)?;
            }
            bail!(
                "serial {serial} was rolled back (serial {} restores {}): {}",
                rollout.rollback_serial,
                rollout.previous_serial,
                rollout.reason
            );
        }
        state => {
            if !json {
                eprintln!(
                    "canary passed ({}); serial {serial} goes to everyone",
                    health_line(&rollout)
                );
            }
            let progress = follow_serial(admin, &reply.orgs, serial, deadline, json).await?;
            if json {
                print_canary_json(serial, &rollout, &progress)?;
            }
            if state != "promoted" {
                bail!("the rollout of serial {serial} ended {state}");
            }
            refusals_fail(&progress)
        }
    }
}

fn print_canary_json(
    serial: u64,
    rollout: &PolicyRollout,
    progress: &[Progress],
) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "serial": serial,
            "canary": rollout_json(rollout),
            "rollout": progress,
        }))?
    );
    Ok(())
}

fn health_line(r: &PolicyRollout) -> String {
    format!(
        "denied {:.1}/min (before {:.1}), connection errors {:.1}/min (before {:.1})",
        r.deny_rate_during, r.deny_rate_before, r.error_rate_during, r.error_rate_before
    )
}

fn rollout_json(r: &PolicyRollout) -> serde_json::Value {
    serde_json::json!({
        "state": r.state,
        "serial": r.serial,
        "previous_serial": r.previous_serial,
        "layer": r.layer,
        "pushed_by": r.pushed_by,
        "canary_group": r.canary_group,
        "canary_devices": r.canary_devices,
        "staged": r.staged,
        "canary_seconds": r.canary_seconds,
        "started_unix": r.started_unix,
        "finished_unix": r.finished_unix,
        "reason": r.reason,
        "rollback_serial": r.rollback_serial,
        "restores": r.restores,
        "deny_rate_before": r.deny_rate_before,
        "deny_rate_during": r.deny_rate_during,
        "error_rate_before": r.error_rate_before,
        "error_rate_during": r.error_rate_during,
    })
}

/// What `status` says about the latest rollout.
fn rollout_lines(r: &PolicyRollout) -> Vec<String> {
    let mut lines = Vec::new();
    let what = format!(
        "serial {} ({} layer, by {})",
        r.serial, r.layer, r.pushed_by
    );
    match r.state.as_str() {
        "canary" => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let ends = r.started_unix + r.canary_seconds as i64;
            lines.push(format!(
                "rollout: {what}: canary of group {} ({} device(s) here), ends in {} s; {}",
                r.canary_group,
                r.canary_devices.len(),
                (ends - now).max(0),
                if r.staged {
                    format!("the other devices keep serial {}", r.previous_serial)
                } else {
                    "not staged here (no serial before)".to_owned()
                }
            ));
            lines.push(format!("  canary health: {}", health_line(r)));
        }
        "promoted" => {
            lines.push(format!(
                "rollout: {what}: promoted after a {} s canary of group {}",
                r.canary_seconds, r.canary_group
            ));
            lines.push(format!("  canary health: {}", health_line(r)));
        }
        "rolled_back" => {
            lines.push(format!(
                "rollout: {what}: rolled back; serial {} restores serial {}",
                r.rollback_serial, r.previous_serial
            ));
            lines.push(format!("  reason: {}", r.reason));
            if !r.canary_group.is_empty() {
                lines.push(format!("  canary health: {}", health_line(r)));
            }
        }
        state => {
            let restores = if r.restores > 0 {
                format!(" (restores serial {})", r.restores)
            } else {
                String::new()
            };
            lines.push(format!("rollout: {what}{restores}: {state}"));
        }
    }
    lines
}

fn replay_json(reply: &ReplayPolicyReply) -> serde_json::Value {
    serde_json::json!({
        "org": reply.org_id,
        "decisions_read": reply.decisions_read,
        "skipped": reply.skipped,
        "distinct_flows": reply.distinct_flows,
        "truncated": reply.truncated,
        "changed": reply.changed.iter().map(|c| serde_json::json!({
            "device": c.device,
            "user": c.user,
            "exe": c.exe,
            "destination": c.destination,
            "direction": c.direction,
            "time_unix": c.time_unix,
            "count": c.count,
            "old": {"verdict": c.old_verdict, "rule": c.old_rule},
            "new": {"verdict": c.new_verdict, "rule": c.new_rule},
            "new_dry_run": (!c.new_dry_run_verdict.is_empty()).then(|| serde_json::json!({
                "verdict": c.new_dry_run_verdict, "rule": c.new_dry_run_rule,
            })),
        })).collect::<Vec<_>>(),
    })
}

fn print_replay(reply: &ReplayPolicyReply) {
    println!(
        "{}: {} decisions read ({} not replayable), {} distinct flows, {} would change{}",
        reply.org_id,
        reply.decisions_read,
        reply.skipped,
        reply.distinct_flows,
        reply.changed.len(),
        if reply.truncated {
            " (only the most recent decisions were read)"
        } else {
            ""
        }
    );
    for c in &reply.changed {
        println!(
            "{:>6}× {} {} {} → {}: {} by `{}` → {} by `{}`",
            c.count,
            c.device,
            c.user,
            c.exe,
            c.destination,
            c.old_verdict,
            c.old_rule,
            c.new_verdict,
            c.new_rule
        );
    }
}

fn status_json(status: &PolicyStatusReply) -> serde_json::Value {
    serde_json::json!({
        "org": status.org_id,
        "serial": status.serial,
        "rollout": status.rollout.as_ref().map(rollout_json),
        "agents": status.agents.iter().map(|a| serde_json::json!({
            "device": a.device_id,
            "applied_serial": a.applied_serial,
            "refused_serial": a.refused_serial,
            "error": a.error,
            "reported_unix": a.reported_unix,
            "connected": a.connected,
        })).collect::<Vec<_>>(),
    })
}

fn print_status(status: &PolicyStatusReply) {
    println!(
        "organisation {} — serial in force {}",
        status.org_id, status.serial
    );
    if let Some(rollout) = &status.rollout {
        for line in rollout_lines(rollout) {
            println!("{line}");
        }
    }
    // While a canary runs, the devices outside it should run the serial
    // before.
    let held_back = status
        .rollout
        .as_ref()
        .filter(|r| r.state == "canary" && r.staged && r.serial == status.serial);
    println!(
        "{:<24} {:>8} {:<9} PROBLEM",
        "DEVICE", "APPLIED", "CONNECTED"
    );
    for a in &status.agents {
        let expected = match held_back {
            Some(r) if !r.canary_devices.contains(&a.device_id) => r.previous_serial,
            _ => status.serial,
        };
        let problem = if a.refused_serial > a.applied_serial {
            format!("refused {}: {}", a.refused_serial, a.error)
        } else if a.applied_serial < expected {
            "behind".to_owned()
        } else if expected < status.serial {
            "waits for the canary".to_owned()
        } else {
            String::new()
        };
        println!(
            "{:<24} {:>8} {:<9} {}",
            a.device_id,
            a.applied_serial,
            if a.connected { "yes" } else { "no" },
            problem
        );
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
