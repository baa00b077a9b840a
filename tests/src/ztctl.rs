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

    /// The directory with the user's `credential.pem` (certificate and
    /// key) and `ca.pem`.
    pub fn credential_dir(&self) -> PathBuf {
        self.config.parent().map(PathBuf::from).unwrap_or_default()
    }

    /// Calls the collector's HTTP/JSON API with `curl` and this user's
    /// certificate (`None`: no client certificate); returns the HTTP status
    /// and the body as JSON.
    pub fn https(
        &self,
        stack: &Stack,
        method: &str,
        path: &str,
        body: Option<&str>,
        with_certificate: bool,
    ) -> Result<(u16, serde_json::Value)> {
        let dir = self.credential_dir();
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--http2", "--max-time", "10", "-X", method])
            .arg("--cacert")
            .arg(dir.join("ca.pem"))
            .args(["-w", "\n%{http_code}"]);
        if with_certificate {
            curl.arg("--cert").arg(dir.join("credential.pem"));
        }
        if let Some(body) = body {
            curl.args(["-H", "content-type: application/json", "--data", body]);
        }
        let output = curl
            .arg(format!("{}{path}", stack.collector_url()))
            .output()?;
        ensure!(output.status.success(), "curl {path}: {output:?}");
        let text = String::from_utf8(output.stdout)?;
        let (json, status) = text
            .rsplit_once('\n')
            .ok_or_else(|| anyhow::anyhow!("curl {path}: no status in {text:?}"))?;
        let value = if json.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(json).map_err(|e| anyhow::anyhow!("curl {path}: {e}: {json:?}"))?
        };
        Ok((status.trim().parse()?, value))
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

    /// `ztctl policy push FILE --wait 30 --json`: the reply, with the
    /// rollout to the connected agents.
    pub fn push_and_wait(&self, file: &std::path::Path) -> Result<serde_json::Value> {
        let file = file
            .to_str()
            .ok_or_else(|| anyhow::anyhow!("not UTF-8: {}", file.display()))?;
        self.json(&["policy", "push", file, "--wait", "30", "--json"])
    }
}
