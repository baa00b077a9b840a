//! A fleet of agents in one process: each enrolls with its own token and
//! key over real gRPC and runs the agent's own control channel
//! (`zt_agent::control_channel`), so it receives, checks, keeps and
//! acknowledges policy bundles as a real agent does — without sensors, so
//! hundreds fit on this machine. A simulated agent also lends its device
//! certificate ([`SimulatedAgent::client_tls`]) to a test that sends
//! telemetry as that device, and shows the bundle it keeps
//! ([`SimulatedAgent::kept_bundle`]).

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use tokio::task::JoinHandle;
use zt_agent::{
    bundles::BundleKeeper, control_channel::ControlChannel, enrollment::SharedIdentity,
    metrics::AgentMetrics,
};

use crate::{stack::Stack, ztctl::ZtctlUser};

pub struct SimulatedAgent {
    pub device_id: String,
    pub state_dir: PathBuf,
    pub metrics: Arc<AgentMetrics>,
    device: SharedIdentity,
    task: JoinHandle<()>,
}

/// What a simulated agent's last accepted bundle says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptBundle {
    pub serial: u64,
    /// For a rollback: the serial whose content it restores.
    pub restores: Option<u64>,
    /// For a staged push: its canary group.
    pub canary: Option<String>,
}

impl SimulatedAgent {
    /// The serial of the bundle it accepted last.
    pub fn bundle_serial(&self) -> u64 {
        self.metrics
            .policy_bundle_serial
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Its SPIFFE id.
    pub fn spiffe_id(&self) -> String {
        self.device
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .id
            .to_string()
    }

    /// Client TLS with its device certificate: to open, say, a telemetry
    /// stream as this device.
    pub fn client_tls(&self) -> Result<rustls::ClientConfig> {
        Ok(self
            .device
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .client_tls()?)
    }

    /// The bundle it keeps as the last good one, checked again as the
    /// agent does at start (`None`: none accepted yet).
    pub fn kept_bundle(&self) -> Result<Option<KeptBundle>> {
        let id = self
            .device
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .id
            .clone();
        let kept = BundleKeeper::new(&self.state_dir, &id)
            .last_good()
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.device_id))?;
        Ok(kept.map(|accepted| KeptBundle {
            serial: accepted.bundle.serial,
            restores: accepted.bundle.restores,
            canary: accepted.bundle.canary,
        }))
    }
}

impl Drop for SimulatedAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Enrolls `count` devices `<prefix>-<n>` of `org` (tokens made by
/// `admin`) and starts their control channels.
pub async fn start_fleet(
    stack: &Stack,
    admin: &ZtctlUser,
    org: &str,
    prefix: &str,
    count: usize,
) -> Result<Vec<SimulatedAgent>> {
    let mut agents = Vec::with_capacity(count);
    for n in 0..count {
        let device_id = format!("{prefix}-{n:04}");
        let token = admin.json(&[
            "enroll-token",
            "create",
            "--org",
            org,
            "--device",
            &device_id,
            "--json",
        ])?["join_token"]
            .as_str()
            .context("no join token")?
            .to_owned();
        let state_dir = stack.dir.path().join("fleet").join(org).join(&device_id);
        std::fs::create_dir_all(&state_dir)?;
        let identity = zt_agent::enrollment::enroll(&stack.collector_url(), &token, &state_dir)
            .await
            .with_context(|| format!("enrolling {device_id}"))?;
        let metrics = Arc::new(AgentMetrics::default());
        let device: SharedIdentity = Arc::new(std::sync::RwLock::new(identity));
        let channel = ControlChannel {
            collector_url: stack.collector_url(),
            device: device.clone(),
            metrics: metrics.clone(),
            state_dir: state_dir.clone(),
            policies: None,
        };
        let revocations = channel.saved_revocations().shared();
        let task = tokio::spawn(channel.watch(revocations));
        agents.push(SimulatedAgent {
            device_id,
            state_dir,
            metrics,
            device,
            task,
        });
    }
    Ok(agents)
}
