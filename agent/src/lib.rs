//! The endpoint agent (`zt-agent`): kernel sensors, event decoding and
//! enrichment, and the uplink that streams telemetry to the collector.

pub mod access;
pub mod budget;
pub mod bundles;
pub mod cgroups;
pub mod clock;
pub mod config;
pub mod control_channel;
pub mod dns;
pub mod encoded;
pub mod enrollment;
pub mod event;
pub mod exe_hash;
pub mod file_watch;
pub mod guard;
pub mod guard_policy;
pub mod heap;
pub mod identity;
pub mod kernel_btf;
pub mod kernel_offsets;
pub mod listeners;
pub mod metrics;
pub mod outbox;
pub mod process_table;
pub mod runtime_status;
pub mod sensors;
pub mod spool;
pub mod sysfs;
pub mod tracefs_format;
pub mod tunnel;
pub mod uplink;
pub mod users;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    config::AgentConfig,
    metrics::AgentMetrics,
    sensors::{KernelSensors, Sequencer},
    uplink::Uplink,
};

/// Events between the sensors and the uplink; the uplink never blocks on the
/// network, so this only absorbs scheduling jitter.
const SENSOR_CHANNEL_CAPACITY: usize = 2_048;
/// How long a stopping agent lets the uplink deliver what it holds.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let device = enrollment::DeviceIdentity::load(&config.state_dir)?;
    let collector_url = config
        .collector_url
        .clone()
        .or_else(|| device.collector_url.clone())
        .context("no collector URL: set collector_url or enroll with --collector")?;
    let identity = identity::for_device(&device.id);
    info!(id = %device.id, host = %identity.hostname, boot_id = %identity.boot_id, collector = %collector_url, "agent identity");
    let metrics = Arc::new(AgentMetrics::default());
    let device = Arc::new(std::sync::RwLock::new(device));
    let renewal = tokio::spawn(enrollment::keep_renewed(
        collector_url.clone(),
        device.clone(),
        config.state_dir.clone(),
        metrics.renewal.clone(),
    ));

    let (tx, rx) = mpsc::channel(SENSOR_CHANNEL_CAPACITY);
    // Events are numbered 1, 2, ... within this run (identity.boot_id).
    let sequencer = Sequencer::default();
    let guarded_cgroup = match &config.guarded_cgroup {
        Some(path) => path.clone(),
        None => sysfs::cgroup2_mount().context("finding the cgroup v2 hierarchy to guard")?,
    };
    info!(cgroup = %guarded_cgroup.display(), "guarding cgroup");
    // The guard's policy at start: the last policy bundle in force (it
    // wins over a policy file: the agent is managed), else the policy file,
    // else none yet — the guard is attached anyway and lets everything pass
    // until a bundle arrives. A policy file that cannot be read or compiled
    // stops the agent here, named: never a guard that silently allows what
    // it was told to deny.
    let device_id = device.read().unwrap_or_else(|p| p.into_inner()).id.clone();
    let keeper = bundles::BundleKeeper::new(&config.state_dir, &device_id);
    let last_good = match keeper.last_good() {
        Ok(bundle) => bundle,
        Err(err) => {
            warn!(error = %err, "the kept policy bundle cannot be used; waiting for the collector's");
            None
        }
    };
    let from_bundle = last_good.as_ref().and_then(|bundle| {
        let serial = bundle.bundle.serial;
        match guard_policy::from_policy(&bundle.policy, &device_id.to_string(), serial) {
            Ok(policy) => {
                info!(
                    serial,
                    rules = bundle.policy.rules.len(),
                    "the last policy bundle in force is enforced again"
                );
                metrics
                    .policy_bundle_serial
                    .store(serial, std::sync::atomic::Ordering::Relaxed);
                Some(policy)
            }
            Err(err) => {
                warn!(serial, error = %err, "the kept policy bundle does not compile here");
                None
            }
        }
    });
    let managed = from_bundle.is_some();
    let policy = match (from_bundle, &config.guard.policy_file) {
        (Some(policy), file) => {
            if let Some(path) = file {
                info!(path = %path.display(), "a policy bundle is in force; the policy file is not read");
            }
            policy
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the guard policy {}", path.display()))?;
            let policy = guard_policy::compile_file(&text, &device_id.to_string())
                .with_context(|| format!("guard policy {}", path.display()))?;
            info!(path = %path.display(), version = policy.version(), rules = policy.rule_ids.len(), "guard policy loaded");
            policy
        }
        (None, None) => guard_policy::CompiledPolicy::pass_through(),
    };
    metrics
        .policy_version
        .store(policy.version(), std::sync::atomic::Ordering::Relaxed);
    let policy = Arc::new(policy);
    // The tunnel's loopback listener comes first: the guard redirects to
    // its port.
    let tunnel_listener = Some(
        tunnel::TunnelListener::bind(config.tunnel.listen_port)
            .await
            .context("binding the tunnel listener")?,
    );
    let mut sensors = KernelSensors::start(
        &config.sensors,
        &guarded_cgroup,
        &config.budget,
        Some(sensors::GuardSetup {
            policy,
            tunnel_port: tunnel_listener.as_ref().map_or(0, |l| l.port()),
        }),
        tx.clone(),
        metrics.clone(),
        sequencer.clone(),
    )
    .context("starting kernel sensors")?;
    let active: Vec<&str> = sensors.active().iter().map(|s| s.sensor).collect();
    info!(sensors = ?active, "sensors active");
    // Loading parsed the kernel's BTF; what that freed goes back now.
    if let Some(before) = heap::anon_rss() {
        if heap::trim_if_worthwhile(before) {
            let after = heap::anon_rss().unwrap_or(before);
            info!(
                released_mib = before.saturating_sub(after) / (1 << 20),
                "heap trimmed after start-up"
            );
        }
    }
    let sensor_hooks: Vec<String> = sensors
        .active()
        .iter()
        .map(|s| format!("{}={}", s.sensor, s.hook))
        .collect();

    // Bundles the control channel checked go to the guard, which answers
    // once they are in force.
    let (bundle_tx, bundle_rx) = tokio::sync::mpsc::channel(4);
    let control = control_channel::ControlChannel {
        collector_url: collector_url.clone(),
        device: device.clone(),
        metrics: metrics.clone(),
        state_dir: config.state_dir.clone(),
        policies: Some(bundle_tx),
    };
    let revocations = control.saved_revocations().shared();
    control.restore_channel_seen();
    let zero_trust = match (sensors.take_guard(), &config.guard.policy_file) {
        (Some(guard), policy_file) => Some(tunnel::start(tunnel::ZeroTrustSetup {
            config: config.tunnel.clone(),
            policy_file: policy_file.clone(),
            bundles: Some(bundle_rx),
            managed,
            guard,
            origins: sensors.tunnel_origins(),
            listener: tunnel_listener,
            device: device.clone(),
            revocations: revocations.clone(),
            state_dir: config.state_dir.clone(),
            exe_hashes: sensors.exe_hashes(),
            decisions: tunnel::DecisionSink {
                events: tx.clone(),
                sequencer: sequencer.clone(),
                metrics: metrics.clone(),
            },
        })?),
        _ => None,
    };
    // Whoever records events holds a sender; once they all stop, the
    // channel closes and the uplink finishes (and closes its spool).
    drop(tx);
    let watch = tokio::spawn(control.clone().watch(revocations));
    let heartbeats = tokio::spawn(control.heartbeats(
        Duration::from_secs(config.heartbeat_interval_secs),
        identity.boot_id.clone(),
        sensor_hooks.clone(),
    ));

    // What `zt-agent status` shows while this run lasts.
    let mut runtime = runtime_status::RuntimeStatus {
        state: runtime_status::RunState::Running,
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        boot_id: identity.boot_id.clone(),
        started_unix: runtime_status::unix_now(),
        updated_unix: 0,
        guarded_cgroup: guarded_cgroup.clone(),
        sensors: sensor_hooks,
        collector_connected: false,
        collector_seen_unix: 0,
        events_acked: 0,
        spool_events: 0,
        spool_bytes: 0,
        kernel_drops: 0,
        policy_bundle_serial: 0,
        policy_version: 0,
    };
    let status_writer = tokio::spawn(runtime_status::keep_written(
        runtime.clone(),
        metrics.clone(),
        config.state_dir.clone(),
    ));

    let spool = uplink::open_spool(&config.spool, &config.state_dir, &config.uplink, &identity);
    let uplink = Uplink::new(
        collector_url,
        identity,
        device,
        config.uplink.clone(),
        metrics.clone(),
        sequencer,
        spool,
    );
    let mut uplink_task = tokio::spawn(uplink.run(rx));

    let stats = tokio::spawn(log_stats(metrics.clone()));
    tokio::select! {
        () = shutdown => info!("stopping"),
        result = &mut uplink_task => {
            result.context("uplink task failed")?;
            anyhow::bail!("uplink stopped unexpectedly");
        }
    }
    stats.abort();
    renewal.abort();
    watch.abort();
    heartbeats.abort();
    drop(zero_trust);
    // Detaches every program; the reader ends and closes the channel.
    drop(sensors);
    if tokio::time::timeout(STOP_TIMEOUT, uplink_task)
        .await
        .is_err()
    {
        warn!("uplink did not finish within {STOP_TIMEOUT:?}");
    }
    status_writer.abort();
    runtime.state = runtime_status::RunState::Stopped;
    runtime.refresh(&metrics);
    if let Err(err) = runtime.write(&config.state_dir) {
        warn!(error = %err, "cannot write the agent's status file");
    }
    log_counters(&metrics, "stopped");
    Ok(())
}

/// How often the agent logs its counters.
const STATS_INTERVAL: Duration = Duration::from_secs(60);

async fn log_stats(metrics: Arc<AgentMetrics>) {
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        log_counters(&metrics, "agent counters");
    }
}

fn log_counters(metrics: &AgentMetrics, message: &str) {
    info!(
        kernel_records = AgentMetrics::get(&metrics.kernel_records),
        decode_errors = AgentMetrics::get(&metrics.decode_errors),
        kernel_drops = AgentMetrics::get(&metrics.kernel_drops),
        bulk_sampled = AgentMetrics::get(&metrics.bulk_sampled),
        batches_sent = AgentMetrics::get(&metrics.batches_sent),
        acked = AgentMetrics::get(&metrics.events_acked),
        rejected = AgentMetrics::get(&metrics.events_rejected),
        dropped_queue_full = AgentMetrics::get(&metrics.events_dropped_queue_full),
        uplink_failures = AgentMetrics::get(&metrics.uplink_failures),
        "{message}"
    );
}
