//! The collector's configuration: one typed [`CollectorConfig`], layered as
//! defaults < TOML file < `ZT_COLLECTOR_*` environment < command-line flags.
//!
//! Reading the sources (files, the process environment) is IO and lives in
//! [`ConfigSources::read`]; turning them into a validated config is pure and
//! lives in [`ConfigSources::build`], which the unit tests exercise.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use figment::{
    providers::{Format, Serialized, Toml},
    value::{Dict, Map, Value},
    Figment, Metadata, Profile, Provider,
};
use serde::{Deserialize, Deserializer, Serialize};

/// Default configuration file, read only when it exists and `--config` is absent.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/zt/collector.toml";
/// Prefix of the environment variables that override the file; nested keys
/// are separated by `__` (`ZT_COLLECTOR_CLICKHOUSE__URL`).
pub const ENV_PREFIX: &str = "ZT_COLLECTOR_";

/// Errors reading or building the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(Box<figment::Error>),
    #[error("invalid configuration: {field}: {reason}")]
    Value { field: &'static str, reason: String },
}

/// Output format of the collector's logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// Everything the collector needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectorConfig {
    /// Address of the gRPC server (telemetry and control services).
    pub listen: SocketAddr,
    pub clickhouse: ClickHouseConfig,
    pub batch: BatchConfig,
    pub identity: IdentityConfig,
    pub policy: PolicyConfig,
    pub detection: DetectionConfig,
    pub log_format: LogFormat,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            clickhouse: ClickHouseConfig::default(),
            batch: BatchConfig::default(),
            identity: IdentityConfig::default(),
            policy: PolicyConfig::default(),
            detection: DetectionConfig::default(),
            log_format: LogFormat::Plain,
        }
    }
}

/// Where and how to reach ClickHouse.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP endpoint, `http://host:port`.
    #[serde(deserialize_with = "lenient_string")]
    pub url: String,
    /// Database holding the zt tables; created by the migrations.
    #[serde(deserialize_with = "lenient_string")]
    pub database: String,
    #[serde(deserialize_with = "lenient_string")]
    pub user: String,
    #[serde(deserialize_with = "lenient_string")]
    pub password: String,
    /// How long to keep trying to reach ClickHouse at start before giving up.
    pub startup_timeout_secs: u64,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            url: "http://127.0.0.1:8123".to_owned(),
            database: "zt".to_owned(),
            user: "default".to_owned(),
            password: String::new(),
            startup_timeout_secs: 30,
        }
    }
}

// The password never reaches the logs.
impl fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("user", &self.user)
            .field(
                "password",
                &if self.password.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("startup_timeout_secs", &self.startup_timeout_secs)
            .finish()
    }
}

/// When the batch writer flushes: whichever limit is reached first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Rows per INSERT at most.
    pub max_rows: usize,
    /// How long the oldest pending row waits at most. Every stored batch is
    /// also an acknowledgement an agent waits for, so this bounds delivery
    /// latency; a few INSERTs per second per table suit ClickHouse well.
    pub max_delay_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_rows: 10_000,
            max_delay_ms: 200,
        }
    }
}

/// The control plane's identity: the trust domain's CA, enrollment and the
/// collector's own TLS certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// The trust domain (`spiffe://<trust_domain>/...`); fixed once the CA
    /// exists.
    #[serde(deserialize_with = "lenient_string")]
    pub trust_domain: String,
    /// Holds the CA (`ca/`, key mode 0600), the enrollment tokens and the
    /// device registry.
    pub state_dir: PathBuf,
    /// Lifetime of device certificates; agents renew at about half of it.
    pub certificate_ttl_secs: u64,
    /// DNS names and IP addresses agents use to reach the collector: its
    /// TLS certificate carries them.
    pub server_names: Vec<String>,
    pub server_addresses: Vec<std::net::IpAddr>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            trust_domain: "zt.local".to_owned(),
            state_dir: PathBuf::from("/var/lib/zt-collector"),
            certificate_ttl_secs: 24 * 3600,
            server_names: vec!["localhost".to_owned()],
            server_addresses: vec![std::net::IpAddr::from([127, 0, 0, 1])],
        }
    }
}

/// Staged policy rollouts (`ztctl policy push --canary GROUP`): how long a
/// canary runs, and how much worse its health may get before the collector
/// rolls the push back on its own (docs/policy.md, "Rollout").
///
/// The canary's health is the rate of denied decisions and of connection
/// errors of its devices, per minute, summed over the canary devices: during
/// the canary, against an equally long window before the push. A rate
/// breaches its bound when it is above the rate before by more than the
/// ratio *and* the canary has had at least `min_increase_events` more such
/// events than the rate before predicts, so that a jump from 0 to 1 does
/// not count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// How long a canary runs when the push does not say.
    pub canary_seconds: u64,
    /// The longest canary a push may ask for. The collector keeps twice
    /// this much health history per device (in 128 buckets), so a smaller
    /// value also makes the windows' edges sharper.
    pub max_canary_seconds: u64,
    /// How much higher (as a ratio of the rate before the push) the
    /// canary's deny rate may get: 1.0 lets it double, 0.5 rise by half.
    pub max_deny_rate_increase: f64,
    /// The same for connection errors (failed connects, unreachable
    /// gateways and services).
    pub max_error_rate_increase: f64,
    /// The fewest events above what the rate before the push predicts for
    /// the canary so far that can count as a breach.
    pub min_increase_events: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            canary_seconds: 300,
            max_canary_seconds: 1800,
            max_deny_rate_increase: 1.0,
            max_error_rate_increase: 1.0,
            min_increase_events: 20,
        }
    }
}

/// Detection on the live stream and incidents (docs/detections.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectionConfig {
    /// Run the rules over ingested events and raise incidents.
    pub enabled: bool,
    /// Load the embedded default rule pack.
    pub default_rules: bool,
    /// More rule files (`*.yaml`), loaded after the default pack; ids must
    /// be unique across all of them.
    pub rules_dir: Option<PathBuf>,
    /// How late an event may arrive and still count in sequences and
    /// thresholds.
    pub lateness_secs: u64,
    /// Alerts of one rule, host and process tree within this long of the
    /// incident's last alert join it.
    pub group_window_secs: u64,
    /// An incident with this many alerts is one severity level up.
    pub repeat_escalation: u64,
    /// A rule firing on this many hosts of an organisation within the
    /// window raises each of their incidents one level.
    pub spread_hosts: usize,
    /// How often the engine's state is saved (also at shutdown).
    pub snapshot_interval_secs: u64,
    /// The offset from UTC of the clock the fiscal year (April to March) is
    /// counted in, `+HH:MM` or `-HH:MM`: Japan's by default.
    pub fiscal_year_utc_offset: String,
}

impl Default for DetectionConfig {
    fn default() -> Self {
        DetectionConfig {
            enabled: true,
            default_rules: true,
            rules_dir: None,
            lateness_secs: 60,
            group_window_secs: 3600,
            repeat_escalation: 10,
            spread_hosts: 3,
            snapshot_interval_secs: 10,
            fiscal_year_utc_offset: "+09:00".to_owned(),
        }
    }
}

impl DetectionConfig {
    /// `fiscal_year_utc_offset` in seconds.
    pub fn utc_offset_secs(&self) -> Result<i32, ConfigError> {
        parse_utc_offset(&self.fiscal_year_utc_offset).ok_or_else(|| ConfigError::Value {
            field: "detection.fiscal_year_utc_offset",
            reason: format!(
                "{:?} is not an offset like +09:00 or -05:30",
                self.fiscal_year_utc_offset
            ),
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.utc_offset_secs()?;
        for (field, value) in [
            ("detection.group_window_secs", self.group_window_secs),
            ("detection.repeat_escalation", self.repeat_escalation),
            ("detection.spread_hosts", self.spread_hosts as u64),
            (
                "detection.snapshot_interval_secs",
                self.snapshot_interval_secs,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Value {
                    field,
                    reason: "must be at least 1".to_owned(),
                });
            }
        }
        Ok(())
    }
}

/// `+HH:MM` / `-HH:MM` (hours up to 14) in seconds.
fn parse_utc_offset(text: &str) -> Option<i32> {
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    let (hours, minutes) = rest.split_once(':')?;
    if hours.len() != 2 || minutes.len() != 2 {
        return None;
    }
    let hours: i32 = hours.parse().ok()?;
    let minutes: i32 = minutes.parse().ok()?;
    (hours <= 14 && minutes < 60).then_some(sign * (hours * 3600 + minutes * 60))
}

/// The longest `[policy] max_canary_seconds`.
pub const MAX_CANARY_SECONDS_LIMIT: u64 = 7 * 86_400;

impl PolicyConfig {
    /// What the rollout machinery takes.
    pub fn rollout_settings(&self) -> crate::rollout::RolloutSettings {
        crate::rollout::RolloutSettings {
            canary_seconds: self.canary_seconds,
            max_canary_seconds: self.max_canary_seconds,
            bounds: crate::rollout::Bounds {
                max_deny_rate_increase: self.max_deny_rate_increase,
                max_error_rate_increase: self.max_error_rate_increase,
                min_increase_events: self.min_increase_events,
            },
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_canary_seconds == 0 || self.max_canary_seconds > MAX_CANARY_SECONDS_LIMIT {
            return Err(ConfigError::Value {
                field: "policy.max_canary_seconds",
                reason: format!(
                    "{} s is outside 1..={MAX_CANARY_SECONDS_LIMIT} s",
                    self.max_canary_seconds
                ),
            });
        }
        if self.canary_seconds == 0 || self.canary_seconds > self.max_canary_seconds {
            return Err(ConfigError::Value {
                field: "policy.canary_seconds",
                reason: format!(
                    "{} s is outside 1..={} s (policy.max_canary_seconds)",
                    self.canary_seconds, self.max_canary_seconds
                ),
            });
        }
        for (field, ratio) in [
            ("policy.max_deny_rate_increase", self.max_deny_rate_increase),
            (
                "policy.max_error_rate_increase",
                self.max_error_rate_increase,
            ),
        ] {
            if !ratio.is_finite() || ratio < 0.0 {
                return Err(ConfigError::Value {
                    field,
                    reason: format!("{ratio} must be a ratio of 0 or more (1.0: may double)"),
                });
            }
        }
        Ok(())
    }
}

/// Command-line flags; each one set overrides every other source.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(
    name = "zt-collector",
    version,
    about = "Telemetry ingest, ClickHouse storage and control plane of the zt EDR",
    after_help = "Environment: ZT_COLLECTOR_<KEY>, nested keys joined by `__`, e.g. \
                  ZT_COLLECTOR_CLICKHOUSE__URL, ZT_COLLECTOR_BATCH__MAX_ROWS. \
                  RUST_LOG sets the log filter (default info)."
)]
pub struct CliArgs {
    /// TOML configuration file [default: /etc/zt/collector.toml when it exists]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// ClickHouse HTTP URL [default: http://127.0.0.1:8123]
    #[arg(long, value_name = "URL")]
    pub clickhouse_url: Option<String>,
    /// ClickHouse database [default: zt]
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,
    /// Log format [default: plain]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Control-plane state: CA, tokens, devices [default: /var/lib/zt-collector]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Without a command: serve.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Administration on the collector host, against its state directory.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// One-time enrollment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Credentials of the people who use `ztctl`.
    #[command(subcommand)]
    Credential(CredentialCommand),
    /// Accounts of the people who sign in to the web console.
    #[command(subcommand)]
    Account(AccountCommand),
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum AccountCommand {
    /// Creates a console account (or sets a new password and role on it):
    /// a user of the organisation with the role, signing in with a
    /// password read from stdin (one line; asked twice on a terminal).
    Create {
        /// Organisation of the user.
        #[arg(long)]
        org: String,
        /// The sign-in name (unique across organisations).
        #[arg(long)]
        user: String,
        /// analyst, admin, or soc (the prefecture-wide SOC).
        #[arg(long, value_enum)]
        role: crate::control_plane::Role,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum CredentialCommand {
    /// Issues a key and certificate for a user of an organisation and writes
    /// `credential.pem` (mode 0600) and `ca.pem` into a directory, where
    /// `ztctl` reads them (`~/.config/zt` by default).
    Create {
        /// Organisation of the user.
        #[arg(long)]
        org: String,
        /// The user's name.
        #[arg(long)]
        user: String,
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime of the certificate (at most 30d) [default: 30d]
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        ttl: std::time::Duration,
        /// What the user may do: analyst (read own organisation), admin
        /// (also change it), soc (every organisation).
        #[arg(long, value_enum, default_value = "admin")]
        role: crate::control_plane::Role,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum TokenCommand {
    /// Creates a token that enrolls one device into an organisation; prints
    /// it with the CA pin (`<token>.<pin>`), as `zt-agent enroll` takes it.
    Create {
        /// Organisation the device joins.
        #[arg(long)]
        org: String,
        /// The device's name, its id in the organisation.
        #[arg(long)]
        device: String,
        /// How long the token is valid: 90s, 30m, 1h, 7d [default: 1h]
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: std::time::Duration,
        /// Print JSON instead of the token alone.
        #[arg(long)]
        json: bool,
    },
}

/// `90s`, `30m`, `1h`, `7d`, or plain seconds (shared with `ztctl`).
pub use zt_identity::parse_lifetime as parse_duration;

/// The raw configuration sources, as read from the outside world.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// The TOML file's path and contents, if one is used.
    pub file: Option<(PathBuf, String)>,
    /// Environment variables (all of them; only `ZT_COLLECTOR_*` are used).
    pub env: Vec<(String, String)>,
    pub flags: CliArgs,
}

impl ConfigSources {
    /// Reads the config file (`--config`, else [`DEFAULT_CONFIG_PATH`] if it
    /// exists) and the process environment.
    pub fn read(flags: &CliArgs) -> Result<ConfigSources, ConfigError> {
        let path = match &flags.config {
            Some(path) => Some(path.clone()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
        };
        let file = match path {
            Some(path) => {
                let text = read_file(&path)?;
                Some((path, text))
            }
            None => None,
        };
        Ok(ConfigSources {
            file,
            env: std::env::vars().collect(),
            flags: flags.clone(),
        })
    }

    /// Layers the sources over the defaults and validates the result. Pure.
    pub fn build(&self) -> Result<CollectorConfig, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(CollectorConfig::default()));
        if let Some((path, text)) = &self.file {
            let name = format!("config file {}", path.display());
            figment = figment.merge(Named {
                inner: Toml::string(text),
                name,
            });
        }
        let mut env: Vec<&(String, String)> = self.env.iter().collect();
        env.sort();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if rest.is_empty() {
                continue;
            }
            figment = figment.merge(Layer {
                source: format!("environment variable {name}"),
                key: rest.to_ascii_lowercase().replace("__", "."),
                value: value.parse().unwrap_or_else(|never| match never {}),
            });
        }
        let flags = &self.flags;
        let flag_values = [
            ("--listen", "listen", flags.listen.map(|a| a.to_string())),
            (
                "--clickhouse-url",
                "clickhouse.url",
                flags.clickhouse_url.clone(),
            ),
            ("--database", "clickhouse.database", flags.database.clone()),
            (
                "--state-dir",
                "identity.state_dir",
                flags.state_dir.as_ref().map(|p| p.display().to_string()),
            ),
            (
                "--log-format",
                "log_format",
                flags.log_format.map(|f| match f {
                    LogFormat::Plain => "plain".to_owned(),
                    LogFormat::Json => "json".to_owned(),
                }),
            ),
        ];
        for (flag, key, value) in flag_values {
            if let Some(value) = value {
                figment = figment.merge(Layer {
                    source: format!("flag {flag}"),
                    key: key.to_owned(),
                    value: Value::from(value),
                });
            }
        }
        let config: CollectorConfig = figment
            .extract()
            .map_err(|e| ConfigError::Invalid(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }
}

impl CollectorConfig {
    /// Reads the sources for `flags` and builds the effective configuration.
    pub fn load(flags: &CliArgs) -> Result<CollectorConfig, ConfigError> {
        ConfigSources::read(flags)?.build()
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ch = &self.clickhouse;
        if !ch.url.starts_with("http://") {
            return Err(ConfigError::Value {
                field: "clickhouse.url",
                reason: format!("{:?} must start with http://", ch.url),
            });
        }
        if !is_identifier(&ch.database) {
            return Err(ConfigError::Value {
                field: "clickhouse.database",
                reason: format!(
                    "{:?} must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*)",
                    ch.database
                ),
            });
        }
        if let Err(err) = zt_identity::TrustDomain::new(&self.identity.trust_domain) {
            return Err(ConfigError::Value {
                field: "identity.trust_domain",
                reason: err.to_string(),
            });
        }
        let ttl = std::time::Duration::from_secs(self.identity.certificate_ttl_secs);
        if ttl < zt_identity::ca::MIN_LEAF_TTL || ttl > zt_identity::ca::MAX_LEAF_TTL {
            return Err(ConfigError::Value {
                field: "identity.certificate_ttl_secs",
                reason: format!(
                    "{} s is outside {}..={} s",
                    ttl.as_secs(),
                    zt_identity::ca::MIN_LEAF_TTL.as_secs(),
                    zt_identity::ca::MAX_LEAF_TTL.as_secs()
                ),
            });
        }
        if self.identity.server_names.is_empty() && self.identity.server_addresses.is_empty() {
            return Err(ConfigError::Value {
                field: "identity.server_names",
                reason: "the collector's certificate needs at least one name or address".to_owned(),
            });
        }
        if self.batch.max_rows == 0 {
            return Err(ConfigError::Value {
                field: "batch.max_rows",
                reason: "must be at least 1".to_owned(),
            });
        }
        self.policy.validate()?;
        self.detection.validate()
    }
}

/// One value from one named source (an environment variable or a flag), so
/// errors name where a bad value came from.
struct Layer {
    source: String,
    key: String,
    value: Value,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.source.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        match figment::util::nest(&self.key, self.value.clone()) {
            Value::Dict(_, dict) => Ok(Profile::Default.collect(dict)),
            _ => Err(figment::Error::from(format!("{}: empty key", self.source))),
        }
    }
}

/// A provider under another name (the TOML text read from a file).
struct Named<P> {
    inner: P,
    name: String,
}

impl<P: Provider> Provider for Named<P> {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.inner.data()
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`: safe to splice into DDL unquoted.
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_owned(),
        error,
    })
}

/// Accepts a string, or a number or boolean written where a string is meant
/// (`ZT_COLLECTOR_CLICKHOUSE__PASSWORD=1234` parses as a number).
fn lenient_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    deserializer.deserialize_any(Visitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> Option<(PathBuf, String)> {
        Some((PathBuf::from("/test/collector.toml"), text.to_owned()))
    }

    #[test]
    fn detection_settings_are_checked() {
        let config = (ConfigSources {
            file: file("[detection]\nfiscal_year_utc_offset = \"-05:30\"\nspread_hosts = 5\n"),
            ..ConfigSources::default()
        })
        .build()
        .unwrap();
        assert_eq!(
            config.detection.utc_offset_secs().unwrap(),
            -(5 * 3600 + 1800)
        );
        assert_eq!(config.detection.spread_hosts, 5);
        assert_eq!(
            CollectorConfig::default()
                .detection
                .utc_offset_secs()
                .unwrap(),
            9 * 3600
        );
        for bad in ["9", "+9:00", "+15:00", "+09:60", "JST"] {
            let err = (ConfigSources {
                file: file(&format!(
                    "[detection]\nfiscal_year_utc_offset = \"{bad}\"\n"
                )),
                ..ConfigSources::default()
            })
            .build()
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("detection.fiscal_year_utc_offset"),
                "{bad}: {err}"
            );
        }
        let err = (ConfigSources {
            file: file("[detection]\ngroup_window_secs = 0\n"),
            ..ConfigSources::default()
        })
        .build()
        .unwrap_err()
        .to_string();
        assert!(err.contains("detection.group_window_secs"), "{err}");
    }

    #[test]
    fn defaults_are_the_local_stack() {
        let config = ConfigSources::default().build().unwrap();
        assert_eq!(config, CollectorConfig::default());
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(config.clickhouse.url, "http://127.0.0.1:8123");
        assert_eq!(config.clickhouse.database, "zt");
        assert_eq!(config.clickhouse.user, "default");
        assert_eq!(config.clickhouse.password, "");
        assert_eq!(config.clickhouse.startup_timeout_secs, 30);
        assert_eq!(config.batch.max_rows, 10_000);
        assert_eq!(config.batch.max_delay_ms, 200);
        assert_eq!(config.log_format, LogFormat::Plain);
        assert_eq!(config.policy.canary_seconds, 300);
        assert_eq!(config.policy.max_canary_seconds, 1800);
        assert_eq!(config.policy.max_deny_rate_increase, 1.0);
        assert_eq!(config.policy.max_error_rate_increase, 1.0);
        assert_eq!(config.policy.min_increase_events, 20);
    }

    #[test]
    fn rollout_bounds_come_from_the_policy_section_and_are_checked() {
        let sources = ConfigSources {
            file: file("[policy]\ncanary_seconds = 60\nmax_deny_rate_increase = 0.5\n"),
            env: env(&[
                ("ZT_COLLECTOR_POLICY__MAX_ERROR_RATE_INCREASE", "2"),
                ("ZT_COLLECTOR_POLICY__MIN_INCREASE_EVENTS", "5"),
            ]),
            ..Default::default()
        };
        let config = sources.build().unwrap();
        assert_eq!(config.policy.canary_seconds, 60);
        assert_eq!(config.policy.max_deny_rate_increase, 0.5);
        assert_eq!(config.policy.max_error_rate_increase, 2.0);
        assert_eq!(config.policy.min_increase_events, 5);
        let settings = config.policy.rollout_settings();
        assert_eq!(settings.canary_seconds, 60);
        assert_eq!(settings.bounds.min_increase_events, 5);
        for (key, value) in [
            ("ZT_COLLECTOR_POLICY__CANARY_SECONDS", "0"),
            ("ZT_COLLECTOR_POLICY__CANARY_SECONDS", "1801"),
            ("ZT_COLLECTOR_POLICY__MAX_CANARY_SECONDS", "0"),
            ("ZT_COLLECTOR_POLICY__MAX_DENY_RATE_INCREASE", "-1"),
            ("ZT_COLLECTOR_POLICY__MAX_ERROR_RATE_INCREASE", "nan"),
            ("ZT_COLLECTOR_POLICY__CANARY_SECOND", "60"),
        ] {
            let sources = ConfigSources {
                env: env(&[(key, value)]),
                ..Default::default()
            };
            assert!(sources.build().is_err(), "{key}={value} accepted");
        }
    }

    #[test]
    fn file_overrides_defaults_and_keeps_the_rest() {
        let sources = ConfigSources {
            file: file(
                "listen = \"0.0.0.0:6000\"\nlog_format = \"json\"\n\
                 [clickhouse]\nurl = \"http://ch:8123\"\n[batch]\nmax_rows = 5\n",
            ),
            ..Default::default()
        };
        let config = sources.build().unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:6000");
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.clickhouse.url, "http://ch:8123");
        assert_eq!(config.clickhouse.database, "zt");
        assert_eq!(config.batch.max_rows, 5);
        assert_eq!(config.batch.max_delay_ms, 200);
    }

    #[test]
    fn env_overrides_file_and_nests_with_double_underscore() {
        let sources = ConfigSources {
            file: file("[clickhouse]\nurl = \"http://file:8123\"\ndatabase = \"fromfile\"\n"),
            env: env(&[
                ("ZT_COLLECTOR_CLICKHOUSE__URL", "http://env:8123"),
                ("ZT_COLLECTOR_CLICKHOUSE__PASSWORD", "1234"),
                ("ZT_COLLECTOR_BATCH__MAX_DELAY_MS", "250"),
                ("ZT_COLLECTOR_LOG_FORMAT", "json"),
                ("OTHER_VARIABLE", "ignored"),
                ("ZT_COLLECTORX", "ignored"),
            ]),
            ..Default::default()
        };
        let config = sources.build().unwrap();
        assert_eq!(config.clickhouse.url, "http://env:8123");
        assert_eq!(config.clickhouse.database, "fromfile");
        assert_eq!(config.clickhouse.password, "1234");
        assert_eq!(config.batch.max_delay_ms, 250);
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn flags_override_everything() {
        let sources = ConfigSources {
            file: file("listen = \"127.0.0.1:1\"\n[clickhouse]\ndatabase = \"f\"\n"),
            env: env(&[
                ("ZT_COLLECTOR_LISTEN", "127.0.0.1:2"),
                ("ZT_COLLECTOR_CLICKHOUSE__URL", "http://env:1"),
                ("ZT_COLLECTOR_CLICKHOUSE__DATABASE", "e"),
                ("ZT_COLLECTOR_LOG_FORMAT", "plain"),
            ]),
            flags: CliArgs {
                config: None,
                listen: Some("127.0.0.1:3".parse().unwrap()),
                clickhouse_url: Some("http://flag:1".to_owned()),
                database: Some("flagdb".to_owned()),
                log_format: Some(LogFormat::Json),
                state_dir: Some("/srv/zt".into()),
                command: None,
            },
        };
        let config = sources.build().unwrap();
        assert_eq!(config.identity.state_dir, PathBuf::from("/srv/zt"));
        assert_eq!(config.listen.to_string(), "127.0.0.1:3");
        assert_eq!(config.clickhouse.url, "http://flag:1");
        assert_eq!(config.clickhouse.database, "flagdb");
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let in_file = ConfigSources {
            file: file("[clickhouse]\nurll = \"http://x:1\"\n"),
            ..Default::default()
        };
        let err = in_file.build().unwrap_err().to_string();
        assert!(err.contains("urll"), "{err}");

        let in_env = ConfigSources {
            env: env(&[("ZT_COLLECTOR_BATCH__MAX_ROW", "1")]),
            ..Default::default()
        };
        assert!(in_env.build().is_err());
    }

    #[test]
    fn invalid_values_are_refused() {
        for (key, value) in [
            ("ZT_COLLECTOR_CLICKHOUSE__DATABASE", "zt; DROP TABLE x"),
            ("ZT_COLLECTOR_CLICKHOUSE__URL", "https://tls.example:8443"),
            ("ZT_COLLECTOR_BATCH__MAX_ROWS", "0"),
            ("ZT_COLLECTOR_LISTEN", "not an address"),
            ("ZT_COLLECTOR_LOG_FORMAT", "xml"),
        ] {
            let sources = ConfigSources {
                env: env(&[(key, value)]),
                ..Default::default()
            };
            assert!(sources.build().is_err(), "{key}={value} accepted");
        }
    }

    #[test]
    fn flags_parse() {
        use clap::Parser;
        let args = CliArgs::try_parse_from([
            "zt-collector",
            "--config",
            "/x.toml",
            "--listen",
            "127.0.0.1:9",
            "--clickhouse-url",
            "http://h:1",
            "--database",
            "d",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(args.config.as_deref(), Some(Path::new("/x.toml")));
        assert_eq!(args.log_format, Some(LogFormat::Json));
        assert_eq!(args.database.as_deref(), Some("d"));
    }

    #[test]
    fn password_is_not_logged() {
        let mut config = CollectorConfig::default();
        config.clickhouse.password = "s3cret".to_owned();
        let text = format!("{config:?}");
        assert!(!text.contains("s3cret"));
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn durations_read_like_people_write_them() {
        let secs = |text| parse_duration(text).map(|d| d.as_secs());
        assert_eq!(secs("90"), Ok(90));
        assert_eq!(secs("90s"), Ok(90));
        assert_eq!(secs("30m"), Ok(1800));
        assert_eq!(secs("1h"), Ok(3600));
        assert_eq!(secs("7d"), Ok(604_800));
        for bad in ["", "h", "1w", "-1h", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn identity_settings_are_checked() {
        let build = |toml: &str| {
            ConfigSources {
                file: file(toml),
                ..Default::default()
            }
            .build()
        };
        let err = build("[identity]\ntrust_domain = \"Not A Domain\"\n").unwrap_err();
        assert!(err.to_string().contains("identity.trust_domain"), "{err}");
        let err = build("[identity]\ncertificate_ttl_secs = 10\n").unwrap_err();
        assert!(err.to_string().contains("certificate_ttl_secs"), "{err}");
        let err = build("[identity]\nserver_names = []\nserver_addresses = []\n").unwrap_err();
        assert!(err.to_string().contains("server_names"), "{err}");
        let ok = build("[identity]\ntrust_domain = \"pref.example\"\nserver_names = [\"collector.pref.example\"]\n").unwrap();
        assert_eq!(ok.identity.trust_domain, "pref.example");
    }
}
