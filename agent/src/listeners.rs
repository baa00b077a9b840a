//! TCP listeners that existed before the agent started. The kernel learns a
//! listener's owner when the socket enters LISTEN; for sockets already
//! listening (sshd, a local service) the agent finds the owners in /proc at
//! start, so connections accepted on them are attributed from the first one.

use std::{collections::HashMap, fs, os::unix::fs::MetadataExt, path::Path};

use agent_common::SocketOwner;

/// `(local port, socket inode)` of every listening TCP socket in a
/// `/proc/net/tcp` or `/proc/net/tcp6` table.
pub fn parse_listening(table: &str) -> Vec<(u16, u64)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st ... inode (field 9)
            if fields.get(3)? != &"0A" {
                return None;
            }
            let port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
            let inode = fields.get(9)?.parse().ok()?;
            Some((port, inode))
        })
        .collect()
}

/// The owners of the sockets listening now, by local port: the process
/// holding each socket, its ids and its cgroup id.
pub fn current_listeners(proc_root: &Path, cgroup_root: &Path) -> HashMap<u16, SocketOwner> {
    let mut by_inode: HashMap<u64, u16> = HashMap::new();
    for table in ["net/tcp", "net/tcp6"] {
        if let Ok(text) = fs::read_to_string(proc_root.join(table)) {
            for (port, inode) in parse_listening(&text) {
                by_inode.insert(inode, port);
            }
        }
    }
    let mut owners = HashMap::new();
    if by_inode.is_empty() {
        return owners;
    }
    let Ok(processes) = fs::read_dir(proc_root) else {
        return owners;
    };
    for entry in processes.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if let Some(&port) = by_inode.get(&inode) {
                owners
                    .entry(port)
                    .or_insert_with(|| owner_of(&entry.path(), pid, cgroup_root));
            }
        }
    }
    owners
}

fn owner_of(dir: &Path, pid: u32, cgroup_root: &Path) -> SocketOwner {
    let status = fs::read_to_string(dir.join("status")).unwrap_or_default();
    let id = |key: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // cgroup v2 line "0::/path"; the id is the inode of that directory.
    let cgroup_id = fs::read_to_string(dir.join("cgroup"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|p| cgroup_root.join(p.trim_start_matches('/')))
        })
        .and_then(|path| fs::metadata(path).ok())
        .map_or(0, |m| m.ino());
    SocketOwner {
        pid,
        uid: id("Uid:"),
        gid: id("Gid:"),
        _reserved: 0,
        cgroup_id,
        since_boot_ns: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_sockets_only() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1077 1 0000000093791cb8 100 0 0 10 0\n\
   1: 0100007F:E380 0100007F:81F1 06 00000000:00000000 03:000010AA 00000000     0        0 0 3 00000000f2b34cd1\n";
        assert_eq!(parse_listening(table), vec![(2024, 1077)]);
    }

    #[test]
    fn finds_the_owner_of_a_listener_of_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cgroup_root = crate::sysfs::cgroup2_mount().unwrap();
        let owners = current_listeners(Path::new("/proc"), &cgroup_root);
        let owner = owners.get(&port).expect("our listener is found");
        assert_eq!(owner.pid, std::process::id());
        // SAFETY: getuid has no preconditions.
        assert_eq!(owner.uid, unsafe { libc::getuid() });
        assert_ne!(owner.cgroup_id, 0);
    }
}
