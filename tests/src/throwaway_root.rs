//! A throwaway copy of this machine's own root filesystem to install
//! packages into and run them from: an overlay of `/` (the read-only lower
//! layer) with a tmpfs upper layer, in a mount namespace of its own. dpkg,
//! maintainer scripts and services write into the tmpfs; the host's files,
//! package database and users are never touched, and everything goes when
//! the root is dropped.
//!
//! The kernel is the host's: `/proc`, `/sys` (cgroups, tracefs, bpffs) and
//! `/dev` are the real ones, so an agent started inside loads and attaches
//! real eBPF programs, and the network is the host's (loopback included).

use std::{
    io::{BufRead as _, BufReader, Read as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use anyhow::{bail, ensure, Context as _, Result};

/// Builds the layers and mounts, says `ready`, then holds the namespace.
const HOLDER: &str = r#"set -eu
d=$1
mount -t tmpfs -o size=4g,mode=0755 zt-throwaway-root "$d"
mkdir "$d/upper" "$d/work" "$d/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$d/upper,workdir=$d/work" "$d/root"
mount -t proc proc "$d/root/proc"
mount --rbind /sys "$d/root/sys"
mount --rbind /dev "$d/root/dev"
mount -t tmpfs -o mode=1777 tmpfs "$d/root/tmp"
mount -t tmpfs -o mode=0755 tmpfs "$d/root/run"
echo ready
exec sleep infinity
"#;

pub struct ThrowawayRoot {
    holder: Child,
    /// Where the tmpfs is mounted inside the namespace (an empty directory
    /// on the host).
    mount_point: tempfile::TempDir,
}

impl ThrowawayRoot {
    pub fn create() -> Result<Self> {
        let mount_point = tempfile::Builder::new().prefix("zt-root-").tempdir()?;
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(HOLDER)
            .arg("sh")
            .arg(mount_point.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut holder = command
            .spawn()
            .context("starting unshare (util-linux) for the throwaway root")?;
        let mut first = String::new();
        BufReader::new(holder.stdout.take().context("holder stdout")?).read_line(&mut first)?;
        if first.trim() != "ready" {
            let mut err = String::new();
            if let Some(mut stderr) = holder.stderr.take() {
                let _ = stderr.read_to_string(&mut err);
            }
            let _ = holder.kill();
            let _ = holder.wait();
            bail!("cannot build the throwaway root (overlay of / on tmpfs): {err}");
        }
        Ok(Self {
            holder,
            mount_point,
        })
    }

    /// The root's directory as this (host) process reaches it: through the
    /// holder's view of the mounts.
    pub fn host_path(&self, path_inside: &str) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root{}/root",
            self.holder.id(),
            self.mount_point.path().display()
        ))
        .join(path_inside.trim_start_matches('/'))
    }

    /// `program` run inside the root (its mount namespace, chrooted).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--mount=/proc/{}/ns/mnt", self.holder.id()))
            .arg("--")
            .arg("chroot")
            .arg(self.mount_point.path().join("root"))
            .arg(program);
        command
    }

    /// Runs `program args` inside the root; its output, or an error with
    /// both streams when it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        let output = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} in the throwaway root"))?;
        ensure!(
            output.status.success(),
            "{program} {args:?} failed in the throwaway root ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(output)
    }

    /// Copies a host file into the root at `path_inside`.
    pub fn copy_in(&self, host_file: &Path, path_inside: &str) -> Result<()> {
        std::fs::copy(host_file, self.host_path(path_inside))
            .with_context(|| format!("copying {} into the throwaway root", host_file.display()))?;
        Ok(())
    }
}

impl Drop for ThrowawayRoot {
    fn drop(&mut self) {
        // The mounts go with the namespace once its last process is gone.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
