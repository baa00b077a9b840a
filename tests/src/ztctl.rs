//! `ztctl` as its users run it: a credential from `zt-collector credential
//! create` and a config file pointing at it.

use std::{path::PathBuf, process::Command};

use anyhow::{ensure, Result};

use crate::{process::workspace_binary, stack::Stack};

/// A `ztctl` user: a credential from `zt-collector credential create` and
/// a config file pointing at it.
pub struct ZtctlUser {
    config: PathBuf,
}

impl ZtctlUser {
    pub fn create(stack: &Stack, org: &str, name: &str, role: &str) -> Result<ZtctlUser> {
        let dir = stack.dir.path().join(format!("user-{name}"));
        let output = Command::new(workspace_binary("zt-collector")?)
            .arg("--state-dir")
            .arg(stack.collector_state())
            .args([
                "credential",
                "create",
                "--org",
                org,
                "--user",
                name,
                "--role",
                role,
                "--out",
            ])
            .arg(&dir)
            .output()?;
        ensure!(output.status.success(), "credential create: {output:?}");
        let config = dir.join("ztctl.toml");
        std::fs::write(
            &config,
            format!(
                "collector_url = \"{}\"\ncredential = \"{}\"\nca_bundle = \"{}\"\n",
                stack.collector_url(),
                dir.join("credential.pem").display(),
                dir.join("ca.pem").display()
            ),
        )?;
        Ok(ZtctlUser { config })
    }

    /// Runs ztctl; `Ok(stdout)` on success, `Err(stderr)` otherwise.
    pub fn ztctl(&self, args: &[&str]) -> Result<std::result::Result<String, String>> {
        let output = Command::new(workspace_binary("ztctl")?)
            .env("ZTCTL_CONFIG", &self.config)
            .args(args)
            .output()?;
        Ok(if output.status.success() {
            Ok(String::from_utf8(output.stdout)?)
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        })
    }

    pub fn ok(&self, args: &[&str]) -> Result<String> {
        self.ztctl(args)?
            .map_err(|stderr| anyhow::anyhow!("ztctl {args:?} failed: {stderr}"))
    }

    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.ok(args)?)?)
    }
}
