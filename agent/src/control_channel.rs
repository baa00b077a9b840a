//! The agent's side of the control plane (`zt.control.v1.Fleet`):
//! - a heartbeat every interval with what the fleet view needs (version,
//!   kernel, active sensors, certificate expiry and renewal health, spool
//!   depth, losses);
//! - the control channel: a stream on which the collector pushes the
//!   revocation list (later policy bundles) as it changes; the agent keeps
//!   the newest list in memory and in `<state_dir>/revocations.json`, so the
//!   tunnel can refuse revoked peers even while the collector is away.
//!
//! Both reconnect with backoff and never stop the agent.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use proto::control::{
    control_update::Update, fleet_client::FleetClient, AgentHeartbeat, WatchRequest,
};
use tonic::transport::Channel;
use tracing::{debug, info, warn};
use zt_identity::{RevocationList, SharedRevocationList};

use crate::{enrollment::SharedIdentity, metrics::AgentMetrics};

const REVOCATIONS_FILE: &str = "revocations.json";
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What the control channel tasks need.
#[derive(Clone)]
pub struct ControlChannel {
    pub collector_url: String,
    pub device: SharedIdentity,
    pub metrics: Arc<AgentMetrics>,
    pub state_dir: PathBuf,
}

impl ControlChannel {
    async fn connect(&self) -> anyhow::Result<FleetClient<Channel>> {
        let tls = self
            .device
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .client_tls()?;
        Ok(FleetClient::new(
            zt_grpc_tls::channel(&self.collector_url, tls).await?,
        ))
    }

    /// The revocation list saved by an earlier run, if any.
    pub fn saved_revocations(&self) -> RevocationList {
        let path = self.state_dir.join(REVOCATIONS_FILE);
        RevocationList::load(&path).unwrap_or_else(|err| {
            warn!(path = %path.display(), error = %err, "saved revocation list unreadable; starting empty");
            RevocationList::new()
        })
    }

    /// Sends a heartbeat every `interval`, the first at once.
    pub async fn heartbeats(
        self,
        interval: Duration,
        boot_id: String,
        active_sensors: Vec<String>,
    ) {
        let started = Instant::now();
        let mut client = None;
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            if client.is_none() {
                match self.connect().await {
                    Ok(c) => client = Some(c),
                    Err(err) => {
                        debug!(error = %err, "heartbeat: collector unreachable");
                        continue;
                    }
                }
            }
            let Some(fleet) = client.as_mut() else {
                continue;
            };
            let beat = self.heartbeat(&boot_id, &active_sensors, started.elapsed());
            match fleet.heartbeat(beat).await {
                Ok(reply) => {
                    let skew = reply.into_inner().server_time_unix - unix(SystemTime::now());
                    if skew.abs() > 60 {
                        warn!(
                            skew_seconds = skew,
                            "the collector's clock differs from this host's"
                        );
                    }
                }
                Err(status) => {
                    debug!(%status, "heartbeat failed");
                    // Reconnect next time with the current certificate.
                    client = None;
                }
            }
        }
    }

    fn heartbeat(&self, boot_id: &str, sensors: &[String], uptime: Duration) -> AgentHeartbeat {
        use std::sync::atomic::Ordering::Relaxed;
        let m = &self.metrics;
        AgentHeartbeat {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel: kernel(),
            active_sensors: sensors.to_vec(),
            policy_version: AgentMetrics::get(&m.policy_version),
            certificate_not_after_unix: i64::try_from(m.renewal.not_after_unix.load(Relaxed))
                .unwrap_or(i64::MAX),
            certificate_renewals: m.renewal.renewals.load(Relaxed),
            certificate_renewal_failures: m.renewal.failures.load(Relaxed),
            spool_events: AgentMetrics::get(&m.spool_events),
            spool_bytes: AgentMetrics::get(&m.spool_bytes),
            kernel_drops: AgentMetrics::get(&m.kernel_drops),
            bulk_sampled: AgentMetrics::get(&m.bulk_sampled),
            // Everything the agent itself dropped: a full memory queue, a
            // full spool, spooled records found corrupt.
            queue_dropped: AgentMetrics::get(&m.events_dropped_queue_full)
                + AgentMetrics::get(&m.events_dropped_spool_full)
                + AgentMetrics::get(&m.spool_corrupt),
            events_acked: AgentMetrics::get(&m.events_acked),
            boot_id: boot_id.to_owned(),
            uptime_seconds: uptime.as_secs(),
        }
    }

    /// Follows the control channel and applies revocation lists newer than
    /// `revocations`.
    pub async fn watch(self, revocations: SharedRevocationList) {
        let mut retry = RETRY_MIN;
        loop {
            match self.watch_once(&revocations).await {
                Ok(()) => retry = RETRY_MIN,
                Err(err) => {
                    debug!(error = %err, retry_in_s = retry.as_secs(), "control channel down");
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
            tokio::time::sleep(retry).await;
        }
    }

    async fn watch_once(&self, revocations: &SharedRevocationList) -> anyhow::Result<()> {
        let mut client = self.connect().await?;
        let have = revocations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .version();
        let mut updates = client
            .watch(WatchRequest {
                revocation_version: have,
            })
            .await?
            .into_inner();
        info!("control channel open");
        let _open = ChannelOpen::new(&self.metrics);
        while let Some(update) = updates.message().await? {
            self.metrics
                .control_channel_seen_unix
                .store(unix_now(), std::sync::atomic::Ordering::Relaxed);
            let Some(Update::Revocations(wire)) = update.update else {
                continue;
            };
            let list =
                RevocationList::from_parts(wire.version, wire.revoked_ids, wire.revoked_serials)?;
            let version = list.version();
            let applied = revocations
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .replace_if_newer(list.clone());
            if applied {
                let path = self.state_dir.join(REVOCATIONS_FILE);
                if let Err(err) = list.save(&path) {
                    warn!(path = %path.display(), error = %err, "cannot save the revocation list");
                }
                info!(
                    version,
                    revoked_devices = list.devices().count(),
                    "revocation list updated"
                );
            }
        }
        Ok(())
    }
}

/// Marks the control channel open while it lives, and when it was last
/// seen open.
struct ChannelOpen<'a>(&'a AgentMetrics);

impl<'a> ChannelOpen<'a> {
    fn new(metrics: &'a AgentMetrics) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        metrics.control_channel_seen_unix.store(unix_now(), Relaxed);
        metrics.control_channel_up.store(true, Relaxed);
        Self(metrics)
    }
}

impl Drop for ChannelOpen<'_> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.0.control_channel_seen_unix.store(unix_now(), Relaxed);
        self.0.control_channel_up.store(false, Relaxed);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn kernel() -> String {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    format!("{} {}", read("osrelease"), std::env::consts::ARCH)
}

fn unix(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
