//! A service unit started the way systemd starts it, on a machine whose PID
//! 1 is not systemd (this one and CI): the unit file and its drop-ins are
//! read from a [`ThrowawayRoot`], and `ExecStart=` runs there with the
//! unit's `User=`/`Group=`, `CapabilityBoundingSet=`, `NoNewPrivileges=`,
//! `UMask=`, `LimitNOFILE=`/`LimitMEMLOCK=`, `Environment=` (and nothing
//! else of the caller's environment) and `StateDirectory=`: the directives
//! that decide whether the service can do its work at all. The namespace
//! sandboxing directives (`ProtectSystem=` and the like) are not applied
//! here; `systemd-analyze verify` checks that systemd accepts them.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{process::Process, throwaway_root::ThrowawayRoot};

pub struct ServiceUnit {
    name: String,
    /// `(section, key, value)` in the order systemd reads them: the unit,
    /// then its drop-ins by name.
    entries: Vec<(String, String, String)>,
}

impl ServiceUnit {
    /// Reads `/usr/lib/systemd/system/<name>` and
    /// `/etc/systemd/system/<name>.d/*.conf` of `root`.
    pub fn load(root: &ThrowawayRoot, name: &str) -> Result<Self> {
        let mut files = vec![root.host_path(&format!("/usr/lib/systemd/system/{name}"))];
        if let Ok(dir) = std::fs::read_dir(root.host_path(&format!("/etc/systemd/system/{name}.d")))
        {
            let mut dropins: Vec<_> = dir
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "conf"))
                .collect();
            dropins.sort();
            files.extend(dropins);
        }
        let mut entries = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut section = String::new();
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                    continue;
                }
                if line.ends_with('\\') {
                    bail!(
                        "{}:{}: continuation lines are not read here",
                        file.display(),
                        n + 1
                    );
                }
                if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                    section = name.to_owned();
                    continue;
                }
                let (key, value) = line
                    .split_once('=')
                    .with_context(|| format!("{}:{}: not key=value", file.display(), n + 1))?;
                entries.push((
                    section.clone(),
                    key.trim().to_owned(),
                    value.trim().to_owned(),
                ));
            }
        }
        Ok(Self {
            name: name.to_owned(),
            entries,
        })
    }

    /// The values of `key` in `section`; an empty assignment resets the
    /// list, as in systemd.
    pub fn values(&self, section: &str, key: &str) -> Vec<String> {
        let mut values = Vec::new();
        for (s, k, v) in &self.entries {
            if s == section && k == key {
                if v.is_empty() {
                    values.clear();
                } else {
                    values.push(v.clone());
                }
            }
        }
        values
    }

    /// The last value of `key` in `section`.
    pub fn value(&self, section: &str, key: &str) -> Option<String> {
        self.values(section, key).pop()
    }

    /// Whether every `ConditionPathExists=` of the unit holds in `root`.
    pub fn conditions_met(&self, root: &ThrowawayRoot) -> bool {
        self.values("Unit", "ConditionPathExists")
            .iter()
            .all(|path| match path.strip_prefix('!') {
                Some(path) => !root.host_path(path).exists(),
                None => root.host_path(path).exists(),
            })
    }

    /// How long systemd waits after SIGTERM (`TimeoutStopSec=`, in seconds
    /// with an optional `s`).
    pub fn stop_timeout(&self) -> Result<Duration> {
        let value = self
            .value("Service", "TimeoutStopSec")
            .unwrap_or_else(|| "90s".to_owned());
        let secs: u64 = value
            .trim_end_matches('s')
            .parse()
            .with_context(|| format!("TimeoutStopSec={value} is not read here"))?;
        Ok(Duration::from_secs(secs))
    }

    /// Starts the service in `root` (log `<log_dir>/<log_name>.log`).
    pub fn start(&self, root: &ThrowawayRoot, log_dir: &Path, log_name: &str) -> Result<Process> {
        if !self.conditions_met(root) {
            bail!("{}: a ConditionPathExists= does not hold", self.name);
        }
        let exec = self
            .value("Service", "ExecStart")
            .with_context(|| format!("{} has no ExecStart=", self.name))?;
        if exec.contains(['"', '\'', '$', '%']) {
            bail!(
                "{}: ExecStart={exec} needs more than splitting on spaces",
                self.name
            );
        }
        let user = self.value("Service", "User");
        let group = self.value("Service", "Group").or_else(|| user.clone());

        // StateDirectory=: /var/lib/<name>, owned by the service's user.
        for dir in self
            .values("Service", "StateDirectory")
            .iter()
            .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        {
            let mode = self
                .value("Service", "StateDirectoryMode")
                .unwrap_or_else(|| "0755".to_owned());
            let path = format!("/var/lib/{dir}");
            root.run(
                "install",
                &[
                    "-d",
                    "-m",
                    &mode,
                    "-o",
                    user.as_deref().unwrap_or("root"),
                    "-g",
                    group.as_deref().unwrap_or("root"),
                    &path,
                ],
            )?;
        }

        // setpriv: user, bounding set, no_new_privs.
        let mut setpriv = vec!["setpriv".to_owned()];
        if let Some(user) = &user {
            setpriv.extend([
                format!("--reuid={user}"),
                format!("--regid={}", group.as_deref().unwrap_or(user)),
                "--init-groups".to_owned(),
            ]);
        }
        let bounding = self.values("Service", "CapabilityBoundingSet");
        if !self
            .entries
            .iter()
            .any(|(s, k, _)| s == "Service" && k == "CapabilityBoundingSet")
        {
            bail!(
                "{}: no CapabilityBoundingSet=; every unit of ours sets one",
                self.name
            );
        }
        let mut caps = "-all".to_owned();
        for cap in bounding.iter().flat_map(|v| v.split_whitespace()) {
            let name = cap
                .strip_prefix("CAP_")
                .with_context(|| format!("capability {cap} is not read here"))?;
            caps.push_str(&format!(",+{}", name.to_ascii_lowercase()));
        }
        setpriv.push(format!("--bounding-set={caps}"));
        setpriv.push("--inh-caps=-all".to_owned());
        if self.value("Service", "NoNewPrivileges").as_deref() == Some("yes") {
            setpriv.push("--no-new-privs".to_owned());
        }

        // prlimit: the resource limits, as far as this machine lets root
        // raise them (this sandbox has no CAP_SYS_RESOURCE: its own hard
        // limits are the ceiling here, where systemd would raise them).
        let mut prlimit = vec!["prlimit".to_owned()];
        for (key, option, resource) in [
            ("LimitNOFILE", "--nofile", libc::RLIMIT_NOFILE),
            ("LimitMEMLOCK", "--memlock", libc::RLIMIT_MEMLOCK),
        ] {
            if let Some(value) = self.value("Service", key) {
                let wanted = if value == "infinity" {
                    libc::RLIM_INFINITY
                } else {
                    value
                        .parse()
                        .with_context(|| format!("{key}={value} is not read here"))?
                };
                let mut current = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: getrlimit writes the struct it is given.
                if unsafe { libc::getrlimit(resource, &mut current) } != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                let limit = wanted.min(current.rlim_max);
                let shown = if limit == libc::RLIM_INFINITY {
                    "unlimited".to_owned()
                } else {
                    limit.to_string()
                };
                prlimit.push(format!("{option}={shown}:{shown}"));
            }
        }

        let umask = self
            .value("Service", "UMask")
            .unwrap_or_else(|| "0022".to_owned());
        let mut command: Command = root.command("/bin/sh");
        command
            .arg("-c")
            .arg(format!("umask {umask} && exec \"$@\""))
            .arg("sh")
            .args(&prlimit)
            .arg("--")
            .args(&setpriv)
            .arg("--")
            .args(exec.split_whitespace())
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::null());
        if let Some(quoted) = self
            .values("Service", "Environment")
            .into_iter()
            .find(|v| v.contains(['"', '\'', '%', '$']))
        {
            bail!(
                "{}: Environment={quoted} needs more than splitting on spaces",
                self.name
            );
        }
        for assignment in self
            .values("Service", "Environment")
            .iter()
            .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        {
            let (key, value) = assignment
                .split_once('=')
                .with_context(|| format!("Environment={assignment} is not KEY=VALUE"))?;
            command.env(key, value);
        }
        Process::spawn_command(log_name, command, log_dir)
    }
}

/// `systemd-analyze verify` of the unit at `path_inside` in `root`: systemd
/// accepts every directive and finds the executables. Its complaints, if
/// any, as the error.
pub fn verify(root: &ThrowawayRoot, path_inside: &str) -> Result<()> {
    let output = root
        .command("systemd-analyze")
        .args(["verify", path_inside])
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .context("running systemd-analyze verify")?;
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() || !complaints.trim().is_empty() {
        bail!(
            "systemd-analyze verify {path_inside} ({}):\n{complaints}",
            output.status
        );
    }
    Ok(())
}
