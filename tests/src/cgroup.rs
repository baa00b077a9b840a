//! A cgroup v2 made for one test, removed when dropped (also on failure).

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 mount>/zt-test-<name>-<random>`.
    pub fn create(name: &str) -> Result<Self> {
        let root = cgroup2_mount()?;
        let path = root.join(format!(
            "zt-test-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id the kernel reports (`bpf_get_current_cgroup_id`): the
    /// inode number of its directory.
    pub fn id(&self) -> Result<u64> {
        Ok(fs::metadata(&self.path)?.ino())
    }

    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Makes the child of `command` join this cgroup between fork and exec,
    /// so the program runs in it from its first instruction. Hooks added
    /// to `command` before this one run first.
    pub fn join_on_exec(&self, command: &mut Command) -> Result<()> {
        join_on_exec(&self.procs_file(), command)
    }
}

/// Makes the child of `command` join the cgroup whose `cgroup.procs` is
/// `procs_file` between fork and exec (see [`TestCgroup::join_on_exec`]);
/// for code that holds only the path, as a thread outliving a borrow.
pub fn join_on_exec(procs_file: &std::path::Path, command: &mut Command) -> Result<()> {
    let procs = CString::new(procs_file.as_os_str().as_bytes())?;
    // SAFETY: only async-signal-safe calls (open, write, close) between
    // fork and exec.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Move stragglers out to the parent so the directory can go.
        if let (Ok(procs), Some(parent)) =
            (fs::read_to_string(self.procs_file()), self.path.parent())
        {
            for pid in procs.lines() {
                let _ = fs::write(parent.join("cgroup.procs"), pid);
            }
        }
        if let Err(err) = fs::remove_dir(&self.path) {
            eprintln!(
                "warning: cannot remove test cgroup {}: {err}",
                self.path.display()
            );
        }
    }
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup v2 hierarchy is mounted (needed by the end-to-end tests)")
}
