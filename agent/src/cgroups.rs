//! cgroup v2 paths of cgroup ids, and container ids from those paths. The
//! kernel reports a cgroup id (the inode of the cgroup's directory); the
//! agent maps it to the path through a process of that cgroup, or by walking
//! the hierarchy again; paths are cached, and an id that stays unknown is not
//! looked for again for a second.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    time::{Duration, Instant},
};

/// How long an id that could not be found is not looked for again.
const MISS_INTERVAL: Duration = Duration::from_secs(1);
/// Remembered misses at most.
const MAX_MISSES: usize = 4096;
/// Directories walked at most (a bound on a pathological hierarchy).
const MAX_CGROUPS: usize = 65_536;

#[derive(Debug)]
pub struct CgroupResolver {
    root: PathBuf,
    paths: HashMap<u64, String>,
    misses: HashMap<u64, Instant>,
}

impl CgroupResolver {
    pub fn new(root: PathBuf) -> Self {
        let mut resolver = Self {
            root,
            paths: HashMap::new(),
            misses: HashMap::new(),
        };
        resolver.walk();
        resolver
    }

    /// The path of cgroup `id` relative to the hierarchy's root ("/" for
    /// the root itself), or `None` when it is not (or no longer) there.
    /// `pid`, a process in that cgroup, is asked first for an unknown id
    /// (`/proc/<pid>/cgroup`, checked against the id); the hierarchy is
    /// walked again only when that fails.
    pub fn path_of(&mut self, id: u64, pid: u32) -> Option<&str> {
        if !self.paths.contains_key(&id) {
            let recently_missed = self
                .misses
                .get(&id)
                .is_some_and(|at| at.elapsed() < MISS_INTERVAL);
            if let Some(path) = self.path_from_proc(id, pid) {
                self.paths.insert(id, path);
            } else if !recently_missed {
                self.walk();
                if !self.paths.contains_key(&id) {
                    if self.misses.len() >= MAX_MISSES {
                        self.misses.clear();
                    }
                    self.misses.insert(id, Instant::now());
                }
            }
        }
        self.paths.get(&id).map(String::as_str)
    }

    fn path_from_proc(&self, id: u64, pid: u32) -> Option<String> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path = text.lines().find_map(|l| l.strip_prefix("0::"))?.to_owned();
        let ino = fs::metadata(self.root.join(path.trim_start_matches('/')))
            .ok()?
            .ino();
        (ino == id).then_some(path)
    }

    fn walk(&mut self) {
        let mut paths = HashMap::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            if paths.len() >= MAX_CGROUPS {
                break;
            }
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            let relative = dir
                .strip_prefix(&self.root)
                .map(|p| format!("/{}", p.display()))
                .unwrap_or_else(|_| "/".to_owned());
            paths.insert(meta.ino(), relative);
            if let Ok(entries) = fs::read_dir(&dir) {
                for entry in entries.filter_map(Result::ok) {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(entry.path());
                    }
                }
            }
        }
        self.paths = paths;
    }
}

/// The container id in a cgroup path, for the layouts of docker, containerd
/// (CRI), CRI-O and podman: the last 64-hex-digit run in a path element such
/// as `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `libpod-<id>.scope` or `/docker/<id>`.
pub fn container_id(path: &str) -> Option<String> {
    path.rsplit('/').find_map(|element| {
        let element = element.strip_suffix(".scope").unwrap_or(element);
        let candidate = element.rsplit('-').next()?;
        (candidate.len() == 64 && candidate.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| candidate.to_ascii_lowercase())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c8e0b9d2a7c6e5f3b1a0d9c8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e";

    #[test]
    fn finds_container_ids_of_common_runtimes() {
        for path in [
            format!("/system.slice/docker-{ID}.scope"),
            format!("/docker/{ID}"),
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-pod1.slice/cri-containerd-{ID}.scope"),
            format!("/machine.slice/libpod-{ID}.scope"),
            format!("/kubepods/burstable/pod1/crio-{ID}.scope"),
        ] {
            assert_eq!(container_id(&path).as_deref(), Some(ID), "{path}");
        }
        assert_eq!(
            container_id("/user.slice/user-1000.slice/session-2.scope"),
            None
        );
        assert_eq!(container_id("/"), None);
    }

    #[test]
    fn resolves_a_cgroup_made_after_start() {
        let root = crate::sysfs::cgroup2_mount().unwrap();
        let mut resolver = CgroupResolver::new(root.clone());
        assert_eq!(resolver.root, root);
        let name = format!("zt-unit-{}", std::process::id());
        let dir = root.join(&name);
        fs::create_dir(&dir).unwrap();
        let id = fs::metadata(&dir).unwrap().ino();
        // Found by walking again (no process of ours is in it).
        let path = resolver.path_of(id, u32::MAX).map(str::to_owned);
        fs::remove_dir(&dir).unwrap();
        assert_eq!(path.as_deref(), Some(format!("/{name}").as_str()));
        let root_id = fs::metadata(&root).unwrap().ino();
        assert_eq!(resolver.path_of(root_id, u32::MAX), Some("/"));

        // Through /proc, without a walk: our own cgroup.
        let mut fresh = CgroupResolver::new(root.clone());
        fresh.paths.clear();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let own_path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .to_owned();
        let own_id = fs::metadata(root.join(own_path.trim_start_matches('/')))
            .unwrap()
            .ino();
        assert_eq!(
            fresh.path_of(own_id, std::process::id()),
            Some(own_path.as_str())
        );
    }
}
