//! The agent's configuration: one typed struct, layered as defaults < TOML
//! file < environment (`ZT_AGENT_*`, nested with `__`) < command-line flags.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{Deserialize, Serialize};

/// Read when no `--config` is given and the file exists.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/zt/agent.toml";
pub const ENV_PREFIX: &str = "ZT_AGENT_";

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The collector, `https://host:port`. Unset: where the device enrolled.
    /// The organisation and device id come from the certificate enrollment
    /// gave, not from configuration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collector_url: Option<String>,
    /// Where the agent keeps its identity (key, certificate, trust bundle;
    /// later spool and policy).
    pub state_dir: PathBuf,
    /// The cgroup v2 directory the agent guards: its DNS queries are read
    /// and (with policy) its connections decided. Unset: the root of the
    /// cgroup v2 hierarchy, i.e. the whole machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guarded_cgroup: Option<PathBuf>,
    /// How often the agent reports its state to the collector (`zt.agents`).
    pub heartbeat_interval_secs: u64,
    pub guard: GuardConfig,
    pub tunnel: TunnelConfig,
    pub uplink: UplinkConfig,
    pub sensors: SensorConfig,
    pub budget: crate::budget::BudgetConfig,
    pub log_format: LogFormat,
    pub spool: SpoolConfig,
}

/// The uplink's disk spool (see `spool.rs`): events are written ahead to
/// disk and survive collector outages and agent restarts.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Off: events wait in memory only (bounded by `uplink.buffer_*`).
    pub enabled: bool,
    /// Unset: `<state_dir>/spool`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Bound of the whole spool (both classes) on disk; when full the oldest
    /// bulk events go first, and are reported as gap records.
    pub max_bytes: u64,
    /// Size at which a segment file is closed and the next begun.
    pub segment_bytes: u64,
    /// Written events are fsynced at least this often: what a power loss
    /// can cost at most.
    pub fsync_interval_ms: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: None,
            max_bytes: 1 << 30,
            segment_bytes: 16 << 20,
            fsync_interval_ms: 200,
        }
    }
}

impl SpoolConfig {
    /// The spool's directory for an agent whose state is in `state_dir`.
    pub fn dir(&self, state_dir: &Path) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| state_dir.join("spool"))
    }

    pub fn fsync_interval(&self) -> Duration {
        Duration::from_millis(self.fsync_interval_ms.max(1))
    }
}

/// The connection guard: cgroup `connect4`/`connect6` programs on the
/// guarded cgroup that allow, deny (EPERM) or audit each outbound
/// connection by the policy file (`guard_policy.rs`). Without a policy file
/// nothing is attached and every connection passes.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Re-read when it changes: the kernel maps are rewritten and live
    /// tunnelled streams the new policy no longer allows are closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_file: Option<PathBuf>,
}

/// The zero-trust tunnel (`tunnel.rs`): connections the policy sends through
/// a gateway, and, on a gateway host, the endpoint peers tunnel to.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    /// Port of the loopback listener (127.0.0.1 and ::1) the kernel
    /// redirects tunnelled connections to; 0: a free port picked at start.
    pub listen_port: u16,
    /// Gateway mode: where peers' QUIC tunnels arrive (UDP), e.g.
    /// `0.0.0.0:4433`. Unset: this host serves nothing through the tunnel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_listen: Option<std::net::SocketAddr>,
    /// Local UDP address of the client side's QUIC endpoint.
    pub client_bind: std::net::SocketAddr,
    /// How long a gateway trusts its revocation list once the control
    /// channel is down. Beyond it, `protected` services refuse new
    /// connections (fail closed) and `standard` ones admit them recorded as
    /// unverified (fail open, audited).
    pub revocations_max_age_secs: u64,
    /// How often the policy file is checked for changes.
    pub policy_poll_ms: u64,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            listen_port: 0,
            gateway_listen: None,
            client_bind: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            revocations_max_age_secs: 300,
            policy_poll_ms: 250,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SensorConfig {
    /// Bytes of the kernel ring buffer for critical events (exec, fork,
    /// exit): a power of two, at least one page. Full means lost events,
    /// counted and reported as gaps.
    pub critical_ring_bytes: u32,
    /// Bytes of the kernel ring buffer for bulk events (file activity).
    pub bulk_ring_bytes: u32,
    pub files: FileWatchConfig,
}

impl Default for SensorConfig {
    fn default() -> Self {
        Self {
            critical_ring_bytes: agent_common::CRITICAL_RING_BYTES,
            bulk_ring_bytes: agent_common::BULK_RING_BYTES,
            files: FileWatchConfig::default(),
        }
    }
}

/// Which file activity the file sensor reports, by absolute path prefix. A
/// prefix starting with `~/` stands for that path in root's home and in every
/// home directory under /home at agent start.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FileWatchConfig {
    /// Opens for writing, creates, unlinks, renames and chmods under these.
    pub write_prefixes: Vec<String>,
    /// Opens for reading under these.
    pub read_prefixes: Vec<String>,
}

impl Default for FileWatchConfig {
    fn default() -> Self {
        let list = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
        Self {
            // Credentials, persistence (cron, systemd, shell start-up files,
            // SSH keys), system binaries, and the world-writable places
            // droppers use.
            write_prefixes: list(&[
                "/etc/",
                "/var/spool/cron/",
                "/usr/lib/systemd/",
                "/usr/bin/",
                "/usr/sbin/",
                "/usr/local/bin/",
                "/tmp/",
                "/var/tmp/",
                "/dev/shm/",
                "~/.ssh/",
                "~/.bashrc",
                "~/.profile",
                "~/.bash_profile",
                "~/.config/autostart/",
            ]),
            read_prefixes: list(&["/etc/shadow", "/etc/gshadow", "/etc/sudoers", "~/.ssh/"]),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// A batch is sent when it holds this many events ...
    pub batch_max_events: usize,
    /// ... or when its oldest event is this old, whichever comes first.
    pub batch_max_delay_ms: u64,
    /// Events held in memory while the collector is unreachable; beyond it
    /// the oldest are dropped and counted.
    pub buffer_max_events: usize,
    /// The same queue's bound in encoded bytes (events carry their ancestry,
    /// so their size varies): what keeps the agent's memory bounded.
    pub buffer_max_bytes: usize,
    /// Batches sent and not yet acknowledged.
    pub max_in_flight_batches: usize,
    /// Reconnect backoff: first delay and ceiling (with jitter).
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            collector_url: None,
            state_dir: PathBuf::from("/var/lib/zt-agent"),
            guarded_cgroup: None,
            heartbeat_interval_secs: 30,
            guard: GuardConfig::default(),
            tunnel: TunnelConfig::default(),
            uplink: UplinkConfig::default(),
            sensors: SensorConfig::default(),
            budget: crate::budget::BudgetConfig::default(),
            log_format: LogFormat::Plain,
            spool: SpoolConfig::default(),
        }
    }
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self {
            batch_max_events: 512,
            batch_max_delay_ms: 250,
            buffer_max_events: 200_000,
            buffer_max_bytes: 32 * 1024 * 1024,
            max_in_flight_batches: 16,
            backoff_initial_ms: 200,
            backoff_max_ms: 10_000,
        }
    }
}

impl UplinkConfig {
    pub fn batch_max_delay(&self) -> Duration {
        Duration::from_millis(self.batch_max_delay_ms)
    }
}

/// Values given on the command line; `None` leaves the lower layers' value.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FlagOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collector_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(String),
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Value(String),
}

/// Which file to read: the explicit one (must exist), else the default one
/// when present.
pub fn config_file(explicit: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    match explicit {
        Some(path) if path.exists() => Ok(Some(path.to_owned())),
        Some(path) => Err(ConfigError::Missing(path.display().to_string())),
        None => Ok(Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists())),
    }
}

/// Builds the configuration from its layers.
pub fn build(figment: Figment, flags: &FlagOverrides) -> Result<AgentConfig, ConfigError> {
    let config: AgentConfig = figment
        .merge(Serialized::defaults(flags))
        .extract()
        .map_err(|e| ConfigError::Invalid(Box::new(e)))?;
    config.validate()?;
    Ok(config)
}

/// The standard layers: defaults, file, environment.
pub fn layers(file: Option<&Path>) -> Figment {
    let mut figment = Figment::from(Serialized::defaults(AgentConfig::default()));
    if let Some(file) = file {
        figment = figment.merge(Toml::file_exact(file));
    }
    figment.merge(Env::prefixed(ENV_PREFIX).split("__"))
}

/// Reads file and environment, applies flags.
pub fn load(
    explicit_file: Option<&Path>,
    flags: &FlagOverrides,
) -> Result<AgentConfig, ConfigError> {
    let file = config_file(explicit_file)?;
    build(layers(file.as_deref()), flags)
}

impl AgentConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval_secs == 0 {
            return Err(ConfigError::Value(
                "heartbeat_interval_secs must be at least 1".into(),
            ));
        }
        let u = &self.uplink;
        if u.batch_max_events == 0 || u.max_in_flight_batches == 0 {
            return Err(ConfigError::Value(
                "uplink.batch_max_events and uplink.max_in_flight_batches must be at least 1"
                    .into(),
            ));
        }
        if u.buffer_max_bytes < 64 * 1024 {
            return Err(ConfigError::Value(
                "uplink.buffer_max_bytes must be at least 65536".into(),
            ));
        }
        if u.buffer_max_events < u.batch_max_events {
            return Err(ConfigError::Value(
                "uplink.buffer_max_events must be at least uplink.batch_max_events".into(),
            ));
        }
        for (name, ring) in [
            ("critical_ring_bytes", self.sensors.critical_ring_bytes),
            ("bulk_ring_bytes", self.sensors.bulk_ring_bytes),
        ] {
            if !ring.is_power_of_two() || ring < 4096 {
                return Err(ConfigError::Value(format!(
                    "sensors.{name} {ring} must be a power of two of at least 4096"
                )));
            }
        }
        let s = &self.spool;
        if s.segment_bytes < 4096 || s.max_bytes < 2 * s.segment_bytes {
            return Err(ConfigError::Value(
                "spool.segment_bytes must be at least 4096 and spool.max_bytes at least twice it"
                    .into(),
            ));
        }
        if s.fsync_interval_ms == 0 || s.fsync_interval_ms > 60_000 {
            return Err(ConfigError::Value(
                "spool.fsync_interval_ms must be between 1 and 60000".into(),
            ));
        }
        let cpu_ok = self.budget.cpu_percent.is_finite() && self.budget.cpu_percent > 0.0;
        if !cpu_ok || self.budget.memory_mib == 0 {
            return Err(ConfigError::Value(
                "budget.cpu_percent and budget.memory_mib must be positive".into(),
            ));
        }
        let files = &self.sensors.files;
        for prefix in files.write_prefixes.iter().chain(&files.read_prefixes) {
            if !(prefix.starts_with('/') || prefix.starts_with("~/")) {
                return Err(ConfigError::Value(format!(
                    "sensors.files: prefix {prefix:?} must be absolute or start with ~/"
                )));
            }
        }
        if let Some(url) = &self.collector_url {
            zt_grpc_tls::parse_url(url)
                .map_err(|e| ConfigError::Value(format!("collector_url: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
// figment::Jail's closures return figment::Error, which is large by design.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_suit_the_local_stack() {
        // In a jail: other tests set ZT_AGENT_* variables.
        figment::Jail::expect_with(|_| {
            let config = build(layers(None), &FlagOverrides::default()).unwrap();
            assert_eq!(config, AgentConfig::default());
            assert_eq!(config.collector_url, None, "the enrolled one");
            Ok(())
        });
    }

    #[test]
    fn file_then_env_then_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "agent.toml",
                r#"
                collector_url = "https://10.0.0.1:50051"
                state_dir = "/tmp/file-state"
                [uplink]
                batch_max_events = 64
                "#,
            )?;
            jail.set_env("ZT_AGENT_COLLECTOR_URL", "https://collector.example:50051");
            jail.set_env("ZT_AGENT_UPLINK__BATCH_MAX_DELAY_MS", "50");
            let flags = FlagOverrides {
                state_dir: Some("/tmp/flag-state".into()),
                ..Default::default()
            };
            let config = build(layers(Some(Path::new("agent.toml"))), &flags).unwrap();
            assert_eq!(
                config.collector_url.as_deref(),
                Some("https://collector.example:50051")
            );
            assert_eq!(config.uplink.batch_max_events, 64);
            assert_eq!(config.uplink.batch_max_delay_ms, 50);
            assert_eq!(config.state_dir, PathBuf::from("/tmp/flag-state"));
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("agent.toml", "colector_url = \"http://x\"\n")?;
            let err = build(
                layers(Some(Path::new("agent.toml"))),
                &FlagOverrides::default(),
            )
            .unwrap_err();
            assert!(err.to_string().contains("colector_url"), "{err}");

            jail.create_file("bad.toml", "[uplink]\nbatch_max_events = 0\n")?;
            let err = build(
                layers(Some(Path::new("bad.toml"))),
                &FlagOverrides::default(),
            )
            .unwrap_err();
            assert!(err.to_string().contains("batch_max_events"), "{err}");

            // Telemetry goes over mutual TLS only.
            jail.create_file("plain.toml", "collector_url = \"http://c:1\"\n")?;
            let err = build(
                layers(Some(Path::new("plain.toml"))),
                &FlagOverrides::default(),
            )
            .unwrap_err();
            assert!(err.to_string().contains("https"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_spool_section_has_defaults_and_bounds() {
        figment::Jail::expect_with(|jail| {
            let config = build(layers(None), &FlagOverrides::default()).unwrap();
            assert!(config.spool.enabled);
            assert_eq!(
                config.spool.dir(&config.state_dir),
                PathBuf::from("/var/lib/zt-agent/spool")
            );
            assert_eq!(config.spool.max_bytes, 1 << 30);
            assert_eq!(config.spool.segment_bytes, 16 << 20);
            assert_eq!(config.spool.fsync_interval_ms, 200);

            jail.set_env("ZT_AGENT_SPOOL__MAX_BYTES", "65536");
            jail.set_env("ZT_AGENT_SPOOL__SEGMENT_BYTES", "8192");
            jail.set_env("ZT_AGENT_SPOOL__DIR", "/srv/spool");
            let config = build(layers(None), &FlagOverrides::default()).unwrap();
            assert_eq!(config.spool.max_bytes, 65536);
            assert_eq!(
                config.spool.dir(&config.state_dir),
                PathBuf::from("/srv/spool")
            );

            jail.set_env("ZT_AGENT_SPOOL__SEGMENT_BYTES", "65536");
            let err = build(layers(None), &FlagOverrides::default()).unwrap_err();
            assert!(err.to_string().contains("spool.max_bytes"), "{err}");

            jail.create_file("typo.toml", "[spool]\nmax_byte = 1\n")?;
            let err = build(
                layers(Some(Path::new("typo.toml"))),
                &FlagOverrides::default(),
            )
            .unwrap_err();
            assert!(err.to_string().contains("max_byte"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let err = config_file(Some(Path::new("/nonexistent/agent.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::Missing(_)));
    }
}
