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
    control_update::Update, fleet_client::FleetClient, AgentHeartbeat, PolicyAck, WatchRequest,
};
use tonic::transport::Channel;
use tracing::{debug, info, warn};
use zt_identity::{RevocationList, SharedRevocationList};

use crate::{
    bundles::{BundleApply, BundleKeeper},
    enrollment::SharedIdentity,
    metrics::AgentMetrics,
};

const REVOCATIONS_FILE: &str = "revocations.json";
/// When the control channel was last known open (unix seconds, text): kept
/// across restarts, so a gateway restarted during a short collector outage
/// still knows how current its revocation list is.
const CHANNEL_SEEN_FILE: &str = "control-channel-seen";
/// How often an open channel refreshes that file.
const CHANNEL_SEEN_SAVE_INTERVAL: Duration = Duration::from_secs(60);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long the guard may take to put a bundle in force.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the control channel tasks need.
#[derive(Clone)]
pub struct ControlChannel {
    pub collector_url: String,
    pub device: SharedIdentity,
    pub metrics: Arc<AgentMetrics>,
    pub state_dir: PathBuf,
    /// Where checked policy bundles go to be enforced; `None`: a bundle
    /// that checks is kept and acknowledged as it is.
    pub policies: Option<tokio::sync::mpsc::Sender<BundleApply>>,
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

    /// When an earlier run last knew the control channel open (unix
    /// seconds; 0: never), into the metrics the gateway reads.
    pub fn restore_channel_seen(&self) {
        self.metrics.control_channel_seen_unix.store(
            read_channel_seen(&self.state_dir),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn save_channel_seen(&self) {
        let path = self.state_dir.join(CHANNEL_SEEN_FILE);
        if let Err(err) = std::fs::write(&path, format!("{}\n", crate::clock::unix_now_secs())) {
            debug!(path = %path.display(), error = %err, "cannot record when the control channel was open");
        }
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
        let keeper = BundleKeeper::new(&self.state_dir, &self.device_id());
        let mut updates = client
            .watch(WatchRequest {
                revocation_version: have,
                policy_serial: keeper.newest_seen(),
            })
            .await?
            .into_inner();
        info!("control channel open");
        let _open = ChannelOpen::new(self);
        let mut save = tokio::time::interval(CHANNEL_SEEN_SAVE_INTERVAL);
        loop {
            let update = tokio::select! {
                update = updates.message() => update?,
                _ = save.tick() => {
                    self.metrics
                        .control_channel_seen_unix
                        .store(crate::clock::unix_now_secs(), std::sync::atomic::Ordering::Relaxed);
                    self.save_channel_seen();
                    continue;
                }
            };
            let Some(update) = update else { break };
            self.metrics.control_channel_seen_unix.store(
                crate::clock::unix_now_secs(),
                std::sync::atomic::Ordering::Relaxed,
            );
            let wire = match update.update {
                Some(Update::Revocations(wire)) => wire,
                Some(Update::Policy(bundle)) => {
                    let ack = self
                        .apply_bundle(&keeper, bundle.serial, &bundle.signed_json)
                        .await;
                    if let Err(status) = client.ack_policy(ack).await {
                        warn!(%status, serial = bundle.serial, "cannot report the policy bundle's outcome");
                    }
                    continue;
                }
                None => continue,
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

impl ControlChannel {
    fn device_id(&self) -> zt_identity::SpiffeId {
        self.device
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .id
            .clone()
    }

    /// Checks a bundle, has it enforced, and keeps it as the last good one
    /// once it is in force; the answer is what the collector is told.
    async fn apply_bundle(
        &self,
        keeper: &BundleKeeper,
        serial: u64,
        signed_json: &str,
    ) -> PolicyAck {
        let refused = |error: String| {
            warn!(serial, error = %error, "policy bundle refused; the policy in force stays");
            PolicyAck {
                serial,
                applied: false,
                error,
            }
        };
        // Verifying, linking and compiling is CPU work and keeping the
        // bundle is synchronous disk work: off the async workers.
        let checked = {
            let (keeper, json) = (keeper.clone(), signed_json.to_owned());
            tokio::task::spawn_blocking(move || keeper.check_new(&json)).await
        };
        let accepted = match checked {
            Ok(Ok(accepted)) => Arc::new(accepted),
            Ok(Err(err)) => return refused(err.to_string()),
            Err(err) => return refused(format!("checking the bundle failed: {err}")),
        };
        let serial = accepted.bundle.serial;
        if let Some(policies) = &self.policies {
            let (done, result) = tokio::sync::oneshot::channel();
            let apply = BundleApply {
                bundle: accepted.clone(),
                done,
            };
            if policies.send(apply).await.is_err() {
                return refused("the guard is not running".to_owned());
            }
            match tokio::time::timeout(APPLY_TIMEOUT, result).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => return refused(error),
                Ok(Err(_)) | Err(_) => return refused("the guard did not answer".to_owned()),
            }
        }
        let kept = {
            let (keeper, json) = (keeper.clone(), signed_json.to_owned());
            tokio::task::spawn_blocking(move || keeper.keep(&json, serial)).await
        };
        if let Err(err) = kept
            .map_err(|e| e.to_string())
            .and_then(|k| k.map_err(|e| e.to_string()))
        {
            // In force, but not kept: a restart falls back to the bundle
            // kept before. Said, not hidden.
            return refused(err);
        }
        info!(
            serial,
            restores = ?accepted.bundle.restores,
            rules = accepted.policy.rules.len(),
            "policy bundle in force"
        );
        self.metrics
            .policy_bundle_serial
            .store(serial, std::sync::atomic::Ordering::Relaxed);
        PolicyAck {
            serial,
            applied: true,
            error: String::new(),
        }
    }
}

/// Marks the control channel open while it lives, and when it was last
/// seen open (in the metrics and on disk).
struct ChannelOpen<'a>(&'a ControlChannel);

impl<'a> ChannelOpen<'a> {
    fn new(channel: &'a ControlChannel) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let metrics = &channel.metrics;
        metrics
            .control_channel_seen_unix
            .store(crate::clock::unix_now_secs(), Relaxed);
        metrics.control_channel_up.store(true, Relaxed);
        channel.save_channel_seen();
        Self(channel)
    }
}

impl Drop for ChannelOpen<'_> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let metrics = &self.0.metrics;
        metrics
            .control_channel_seen_unix
            .store(crate::clock::unix_now_secs(), Relaxed);
        metrics.control_channel_up.store(false, Relaxed);
        self.0.save_channel_seen();
    }
}

/// The saved time the channel was last open; 0 when missing, unreadable, or
/// in the future (a clock that went back must not extend the trust).
fn read_channel_seen(state_dir: &std::path::Path) -> u64 {
    std::fs::read_to_string(state_dir.join(CHANNEL_SEEN_FILE))
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .filter(|seen| *seen <= crate::clock::unix_now_secs())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_open_time_survives_a_restart_but_not_a_future_clock() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_channel_seen(dir.path()), 0, "never open");
        let path = dir.path().join(CHANNEL_SEEN_FILE);
        std::fs::write(&path, "1700000000\n").unwrap();
        assert_eq!(read_channel_seen(dir.path()), 1_700_000_000);
        std::fs::write(&path, format!("{}\n", crate::clock::unix_now_secs() + 3600)).unwrap();
        assert_eq!(read_channel_seen(dir.path()), 0);
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(read_channel_seen(dir.path()), 0);
    }
}
