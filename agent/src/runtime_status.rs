//! What the running agent tells `zt-agent status`: a small JSON file in the
//! state directory, rewritten every few seconds while the agent runs and a
//! last time, marked stopped, when it stops cleanly. A file that says
//! running but whose process is gone means the agent crashed or was killed.

use std::{
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::metrics::AgentMetrics;

/// The file, in the state directory.
pub const FILE_NAME: &str = "agent-status.json";

/// How often the running agent rewrites it.
pub const WRITE_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Stopped,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuntimeStatus {
    pub state: RunState,
    pub pid: u32,
    pub version: String,
    pub boot_id: String,
    pub started_unix: u64,
    pub updated_unix: u64,
    pub guarded_cgroup: PathBuf,
    /// `sensor=hook` of every active sensor.
    pub sensors: Vec<String>,
    /// Whether the control channel to the collector is open now.
    pub collector_connected: bool,
    /// Unix seconds the collector was last reachable (0: never in this run).
    pub collector_seen_unix: u64,
    pub events_acked: u64,
    pub spool_events: u64,
    pub spool_bytes: u64,
    pub kernel_drops: u64,
    pub policy_bundle_serial: u64,
    pub policy_version: u64,
}

/// What `zt-agent status` concludes from the file and the process table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// No agent has run with this state directory.
    NeverRan,
    Running,
    StoppedCleanly,
    /// The file says running but its process is gone: a crash or a kill.
    Died,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl RuntimeStatus {
    /// The counters and gauges of `metrics` now.
    pub fn refresh(&mut self, metrics: &AgentMetrics) {
        self.updated_unix = unix_now();
        self.collector_connected = metrics.control_channel_up.load(Ordering::Relaxed);
        self.collector_seen_unix = AgentMetrics::get(&metrics.control_channel_seen_unix);
        self.events_acked = AgentMetrics::get(&metrics.events_acked);
        self.spool_events = AgentMetrics::get(&metrics.spool_events);
        self.spool_bytes = AgentMetrics::get(&metrics.spool_bytes);
        self.kernel_drops = AgentMetrics::get(&metrics.kernel_drops);
        self.policy_bundle_serial = AgentMetrics::get(&metrics.policy_bundle_serial);
        self.policy_version = AgentMetrics::get(&metrics.policy_version);
    }

    pub fn write(&self, state_dir: &Path) -> Result<(), zt_identity::Error> {
        let json = serde_json::to_vec_pretty(self).expect("status serializes");
        zt_identity::files::write_file_atomic(&path(state_dir), &json, 0o644)
    }

    /// The file's status, `None` when there is none (or it is unreadable:
    /// the agent rewrites it within [`WRITE_INTERVAL`]).
    pub fn read(state_dir: &Path) -> Option<Self> {
        let bytes = std::fs::read(path(state_dir)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Whether the agent the file describes runs now.
    pub fn liveness(status: Option<&Self>) -> Liveness {
        match status {
            None => Liveness::NeverRan,
            Some(s) if s.state == RunState::Stopped => Liveness::StoppedCleanly,
            Some(s) if process_is_agent(s.pid) => Liveness::Running,
            Some(_) => Liveness::Died,
        }
    }
}

/// Whether `pid` is alive and an agent (not a recycled pid of another
/// program).
fn process_is_agent(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.trim_end() == "zt-agent")
}

/// Rewrites the file every [`WRITE_INTERVAL`] until aborted.
pub async fn keep_written(
    mut status: RuntimeStatus,
    metrics: Arc<AgentMetrics>,
    state_dir: PathBuf,
) {
    let mut tick = tokio::time::interval(WRITE_INTERVAL);
    let mut warned = false;
    loop {
        tick.tick().await;
        status.refresh(&metrics);
        match status.write(&state_dir) {
            Ok(()) => warned = false,
            Err(err) if !warned => {
                tracing::warn!(error = %err, "cannot write the agent's status file");
                warned = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pid: u32, state: RunState) -> RuntimeStatus {
        RuntimeStatus {
            state,
            pid,
            version: "0.1.0".into(),
            boot_id: "b".into(),
            started_unix: 1,
            updated_unix: 2,
            guarded_cgroup: "/sys/fs/cgroup".into(),
            sensors: vec!["exec=tracepoint sched/sched_process_exec".into()],
            collector_connected: true,
            collector_seen_unix: 2,
            events_acked: 3,
            spool_events: 4,
            spool_bytes: 5,
            kernel_drops: 0,
            policy_bundle_serial: 6,
            policy_version: 7,
        }
    }

    #[test]
    fn round_trips_and_tells_running_stopped_and_died_apart() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(RuntimeStatus::read(dir.path()), None);
        assert_eq!(RuntimeStatus::liveness(None), Liveness::NeverRan);

        // This test process is not called zt-agent: its pid does not count.
        let mine = sample(std::process::id(), RunState::Running);
        mine.write(dir.path()).unwrap();
        let read = RuntimeStatus::read(dir.path()).unwrap();
        assert_eq!(read, mine);
        assert_eq!(RuntimeStatus::liveness(Some(&read)), Liveness::Died);

        let stopped = sample(std::process::id(), RunState::Stopped);
        assert_eq!(
            RuntimeStatus::liveness(Some(&stopped)),
            Liveness::StoppedCleanly
        );
        // A pid that cannot exist.
        let gone = sample(u32::MAX, RunState::Running);
        assert_eq!(RuntimeStatus::liveness(Some(&gone)), Liveness::Died);
    }

    #[test]
    fn a_torn_file_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), b"{\"state\": \"runn").unwrap();
        assert_eq!(RuntimeStatus::read(dir.path()), None);
    }
}
