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
    /// gRPC endpoint of the collector.
    pub collector_url: String,
}

impl Default for ZtctlConfig {
    fn default() -> Self {
        Self {
            collector_url: "http://127.0.0.1:50051".to_owned(),
        }
    }
}

pub fn default_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ZTCTL_CONFIG") {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config/zt/ztctl.toml"))
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
