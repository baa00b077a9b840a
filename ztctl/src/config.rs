//! ztctl's configuration: defaults < file (`--config`, `$ZTCTL_CONFIG`, or
//! `~/.config/zt/ztctl.toml`, which `make up` writes) < `ZTCTL_*` env < flags.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ZtctlConfig {
    /// The collector, `https://host:port`.
    pub collector_url: String,
    /// The user's credential: private key and certificate (PEM, mode 0600),
    /// as `zt-collector credential create` writes it.
    pub credential: PathBuf,
    /// The trust bundle the collector's certificate must chain to.
    pub ca_bundle: PathBuf,
}

impl Default for ZtctlConfig {
    fn default() -> Self {
        let dir = config_dir().unwrap_or_else(|| PathBuf::from("."));
        Self {
            collector_url: "https://127.0.0.1:50051".to_owned(),
            credential: dir.join("credential.pem"),
            ca_bundle: dir.join("ca.pem"),
        }
    }
}

impl ZtctlConfig {
    /// The TLS client configuration: this user's certificate, the bundle.
    pub fn client_tls(&self) -> anyhow::Result<rustls::ClientConfig> {
        let credential = zt_identity::read_private_key(&self.credential).with_context(|| {
            format!(
                "reading the credential {} (make one with `zt-collector credential create`)",
                self.credential.display()
            )
        })?;
        let bundle = std::fs::read(&self.ca_bundle)
            .with_context(|| format!("reading the CA bundle {}", self.ca_bundle.display()))?;
        let at = credential
            .find("-----BEGIN CERTIFICATE-----")
            .with_context(|| format!("{} holds no certificate", self.credential.display()))?;
        Ok(zt_identity::tls::client_config_from_pem(
            &bundle,
            &credential.as_bytes()[at..],
            &credential.as_bytes()[..at],
        )?)
    }
}

fn config_dir() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config/zt"))
}

pub fn default_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ZTCTL_CONFIG") {
        return Some(PathBuf::from(path));
    }
    config_dir().map(|dir| dir.join("ztctl.toml"))
}

pub fn load(explicit: Option<&Path>, collector: Option<String>) -> anyhow::Result<ZtctlConfig> {
    let file = match explicit {
        Some(path) if !path.exists() => bail!("config file {} does not exist", path.display()),
        Some(path) => Some(path.to_owned()),
        None => default_path().filter(|p| p.exists()),
    };
    let mut figment = Figment::from(Serialized::defaults(ZtctlConfig::default()));
    if let Some(file) = &file {
        figment = figment.merge(Toml::file_exact(file));
    }
    figment = figment.merge(Env::prefixed("ZTCTL_").ignore(&["CONFIG"]));
    if let Some(url) = collector {
        figment = figment.merge(Serialized::default("collector_url", url));
    }
    figment.extract().context("invalid ztctl configuration")
}
