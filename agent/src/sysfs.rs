//! Kernel pseudo-filesystems the sensors need, mounted when absent.

use std::{ffi::CString, fs, io, os::unix::ffi::OsStrExt, path::Path};

/// Whether something is mounted exactly at `target` (per /proc/self/mounts).
pub fn is_mounted(target: &Path) -> io::Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    Ok(mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .any(|mount_point| Path::new(mount_point) == target))
}

/// Mounts `fstype` at `target` unless something is mounted there already.
pub fn ensure_mounted(fstype: &str, target: &Path) -> io::Result<()> {
    if is_mounted(target)? {
        return Ok(());
    }
    fs::create_dir_all(target)?;
    let source = CString::new(fstype)?;
    let target_c = CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    tracing::info!(fstype, target = %target.display(), "mounted");
    Ok(())
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> io::Result<std::path::PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    parse_cgroup2_mount(&info)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup v2 hierarchy is mounted"))
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<std::path::PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| left.split_whitespace().nth(4).map(Into::into))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mount_in_mountinfo() {
        let info = "25 30 0:22 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu\n\
                    35 30 0:31 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(info),
            Some("/sys/fs/cgroup/unified".into())
        );
        assert_eq!(
            parse_cgroup2_mount("25 30 0:22 / /x rw - ext4 /dev/sda rw\n"),
            None
        );
    }

    #[test]
    fn root_is_mounted() {
        assert!(is_mounted(Path::new("/")).unwrap());
        assert!(!is_mounted(Path::new("/definitely/not/a/mount")).unwrap());
    }
}
