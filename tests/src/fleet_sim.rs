//! A fleet of agents in one process: each enrolls with its own token and
//! key over real gRPC and runs the agent's own control channel
//! (`zt_agent::control_channel`), so it receives, checks, keeps and
//! acknowledges policy bundles as a real agent does — without sensors, so
//! hundreds fit on this machine.

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use tokio::task::JoinHandle;
use zt_agent::{control_channel::ControlChannel, metrics::AgentMetrics};

use crate::{stack::Stack, ztctl::ZtctlUser};

pub struct SimulatedAgent {
    pub device_id: String,
    pub state_dir: PathBuf,
    pub metrics: Arc<AgentMetrics>,
    task: JoinHandle<()>,
}

impl SimulatedAgent {
    /// The serial of the bundle it accepted last.
    pub fn bundle_serial(&self) -> u64 {
        self.metrics
            .policy_bundle_serial
            .load(std::sync::atomic::Ordering::Relaxed)
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
        let channel = ControlChannel {
            collector_url: stack.collector_url(),
            device: Arc::new(std::sync::RwLock::new(identity)),
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
            task,
        });
    }
    Ok(agents)
}
