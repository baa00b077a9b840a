//! The agent's table of live processes: seeded from /proc at start, kept by
//! fork, exec and exit events, and asked for each event's ancestry (parent,
//! grandparent, ... up to pid 1). Sans-IO apart from [`scan_proc`].
//!
//! Exited processes stay for [`EXITED_RETENTION_NS`] so that events that
//! arrive after their process ended (or its children's) still resolve.

use std::{
    collections::{HashMap, VecDeque},
    fs,
    path::Path,
};

use crate::event::{ProcessExec, ProcessExit, ProcessFork};

/// How long an exited process stays resolvable.
pub const EXITED_RETENTION_NS: u64 = 30_000_000_000;
/// Longest ancestry chain attached to an event.
pub const MAX_ANCESTRY: usize = 32;
/// Entries kept at most; beyond it, the oldest exited entries go first.
pub const DEFAULT_CAPACITY: usize = 65_536;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub ppid: u32,
    /// Executable path (the exec filename, or /proc/<pid>/exe when seeded).
    pub exe: String,
    pub argv0: String,
    pub uid: u32,
    /// Start of the process, boot-clock nanoseconds.
    pub start_boot_ns: u64,
    /// When it exited, boot-clock nanoseconds.
    pub exited_boot_ns: Option<u64>,
}

/// One link of an ancestry chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ancestor {
    pub pid: u32,
    pub exe: String,
    pub argv0: String,
    pub start_boot_ns: u64,
}

impl From<&ProcessInfo> for Ancestor {
    fn from(p: &ProcessInfo) -> Self {
        Self {
            pid: p.pid,
            exe: p.exe.clone(),
            argv0: p.argv0.clone(),
            start_boot_ns: p.start_boot_ns,
        }
    }
}

#[derive(Debug)]
pub struct ProcessTable {
    processes: HashMap<u32, ProcessInfo>,
    capacity: usize,
    /// `(exited_boot_ns, pid)` in the order exits arrived, so pruning and
    /// eviction take the oldest exits without scanning the table. An entry
    /// whose pid was reused since (it no longer has that exit time) is
    /// skipped.
    exits: VecDeque<(u64, u32)>,
}

impl Default for ProcessTable {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl ProcessTable {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            processes: HashMap::new(),
            capacity,
            exits: VecDeque::new(),
        }
    }

    pub fn seed(&mut self, processes: impl IntoIterator<Item = ProcessInfo>) {
        for process in processes {
            self.processes.insert(process.pid, process);
        }
    }

    pub fn get(&self, pid: u32) -> Option<&ProcessInfo> {
        self.processes.get(&pid)
    }

    /// The program `pid` runs, or "" when the table does not know it.
    pub fn exe_of(&self, pid: u32) -> String {
        self.processes
            .get(&pid)
            .map(|p| p.exe.clone())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.processes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }

    pub fn on_fork(&mut self, fork: &ProcessFork) {
        let (exe, argv0) = self
            .processes
            .get(&fork.parent_pid)
            .map(|p| (p.exe.clone(), p.argv0.clone()))
            .unwrap_or_default();
        self.insert(ProcessInfo {
            pid: fork.child_pid,
            ppid: fork.parent_pid,
            exe,
            argv0,
            uid: fork.uid,
            start_boot_ns: fork.boot_ns,
            exited_boot_ns: None,
        });
    }

    pub fn on_exec(&mut self, exec: &ProcessExec) {
        let known_start = self
            .processes
            .get(&exec.pid)
            .filter(|p| p.exited_boot_ns.is_none())
            .map(|p| p.start_boot_ns);
        self.insert(ProcessInfo {
            pid: exec.pid,
            ppid: exec.ppid,
            exe: exec.filename.clone(),
            argv0: exec.argv.first().cloned().unwrap_or_default(),
            uid: exec.uid,
            start_boot_ns: exec.start_boot_ns.or(known_start).unwrap_or(exec.boot_ns),
            exited_boot_ns: None,
        });
    }

    pub fn on_exit(&mut self, exit: &ProcessExit) {
        if let Some(process) = self.processes.get_mut(&exit.pid) {
            process.exited_boot_ns = Some(exit.boot_ns);
            self.exits.push_back((exit.boot_ns, exit.pid));
        }
        self.prune(exit.boot_ns);
    }

    /// The chain of `pid`'s ancestors, parent first, up to pid 1 (or the
    /// first unknown parent), at most [`MAX_ANCESTRY`] long.
    pub fn ancestry(&self, pid: u32) -> Vec<Ancestor> {
        let mut chain = Vec::with_capacity(8);
        let mut current = self.processes.get(&pid).map(|p| p.ppid);
        while let Some(ppid) = current {
            if ppid == 0 || chain.len() >= MAX_ANCESTRY {
                break;
            }
            let Some(parent) = self.processes.get(&ppid) else {
                break;
            };
            chain.push(Ancestor::from(parent));
            current = (parent.pid != 1 && parent.ppid != parent.pid).then_some(parent.ppid);
        }
        chain
    }

    /// Drops processes that exited more than [`EXITED_RETENTION_NS`] before
    /// `now_boot_ns`.
    pub fn prune(&mut self, now_boot_ns: u64) {
        while let Some(&(exited, _)) = self.exits.front() {
            if now_boot_ns.saturating_sub(exited) < EXITED_RETENTION_NS {
                break;
            }
            self.remove_oldest_exit();
        }
    }

    /// Removes the process of the oldest recorded exit, if it is still that
    /// exited process; true when one was removed.
    fn remove_oldest_exit(&mut self) -> bool {
        let Some((exited, pid)) = self.exits.pop_front() else {
            return false;
        };
        let current = self.processes.get(&pid).and_then(|p| p.exited_boot_ns);
        if current == Some(exited) {
            self.processes.remove(&pid);
            true
        } else {
            false
        }
    }

    fn insert(&mut self, process: ProcessInfo) {
        if self.processes.len() >= self.capacity && !self.processes.contains_key(&process.pid) {
            self.evict_one();
        }
        self.processes.insert(process.pid, process);
    }

    /// Makes room: the longest-exited entry, else (a table full of live
    /// processes, rare) the oldest-started one.
    fn evict_one(&mut self) {
        while !self.exits.is_empty() {
            if self.remove_oldest_exit() {
                return;
            }
        }
        let victim = self
            .processes
            .values()
            .map(|p| (p.start_boot_ns, p.pid))
            .min()
            .map(|(_, pid)| pid);
        if let Some(pid) = victim {
            self.processes.remove(&pid);
        }
    }
}

/// Reads every process of `/proc` (the mount of `proc_root`).
pub fn scan_proc(proc_root: &Path) -> Vec<ProcessInfo> {
    let ticks_per_second = clock_ticks_per_second();
    let Ok(entries) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            read_proc_process(&proc_root.join(pid.to_string()), pid, ticks_per_second)
        })
        .collect()
}

fn read_proc_process(dir: &Path, pid: u32, ticks_per_second: u64) -> Option<ProcessInfo> {
    let stat = fs::read_to_string(dir.join("stat")).ok()?;
    let (comm, ppid, start_ticks) = parse_stat(&stat)?;
    let cmdline = fs::read(dir.join("cmdline")).unwrap_or_default();
    let argv0 = cmdline
        .split(|&b| b == 0)
        .next()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| format!("[{comm}]"));
    let exe = fs::read_link(dir.join("exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let uid = fs::read_to_string(dir.join("status"))
        .ok()
        .and_then(|status| parse_status_uid(&status))
        .unwrap_or(0);
    Some(ProcessInfo {
        pid,
        ppid,
        exe,
        argv0,
        uid,
        start_boot_ns: start_ticks.saturating_mul(1_000_000_000) / ticks_per_second.max(1),
        exited_boot_ns: None,
    })
}

/// `(comm, ppid, starttime in clock ticks)` of a /proc/<pid>/stat line.
fn parse_stat(stat: &str) -> Option<(String, u32, u64)> {
    // comm may hold spaces and parentheses: it ends at the last ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); ppid is field 4, starttime field 22.
    let ppid = rest.get(1)?.parse().ok()?;
    let start = rest.get(19)?.parse().ok()?;
    Some((comm, ppid, start))
}

fn parse_status_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(pid: u32, ppid: u32, exe: &str) -> ProcessInfo {
        ProcessInfo {
            pid,
            ppid,
            exe: exe.to_owned(),
            argv0: exe.rsplit('/').next().unwrap_or(exe).to_owned(),
            uid: 0,
            start_boot_ns: u64::from(pid) * 1000,
            exited_boot_ns: None,
        }
    }

    fn fork(parent: u32, child: u32, at: u64) -> ProcessFork {
        ProcessFork {
            boot_ns: at,
            parent_pid: parent,
            parent_tid: parent,
            child_pid: child,
            uid: 1000,
            gid: 1000,
            clone_flags: 0,
            cgroup_id: 1,
        }
    }

    fn exec(pid: u32, ppid: u32, filename: &str, argv: &[&str], at: u64) -> ProcessExec {
        ProcessExec {
            boot_ns: at,
            pid,
            tid: pid,
            ppid,
            uid: 1000,
            gid: 1000,
            euid: 1000,
            egid: 1000,
            loginuid: None,
            start_boot_ns: None,
            cgroup_id: 1,
            filename: filename.to_owned(),
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            argv_truncated: false,
            filename_truncated: false,
            ppid_unknown: false,
            creds_unknown: false,
            exe_version: None,
        }
    }

    fn exit(pid: u32, at: u64) -> ProcessExit {
        ProcessExit {
            boot_ns: at,
            pid,
            tid: pid,
            ppid: None,
            uid: 0,
            gid: 0,
            cgroup_id: 1,
            exit_status: Some(0),
            signal: None,
            core_dumped: false,
            start_boot_ns: None,
        }
    }

    fn seeded() -> ProcessTable {
        let mut table = ProcessTable::default();
        table.seed([
            process(1, 0, "/sbin/init"),
            process(500, 1, "/usr/sbin/sshd"),
            process(600, 500, "/bin/bash"),
        ]);
        table
    }

    fn pids(chain: &[Ancestor]) -> Vec<u32> {
        chain.iter().map(|a| a.pid).collect()
    }

    #[test]
    fn fork_then_exec_builds_the_chain() {
        let mut table = seeded();
        table.on_fork(&fork(600, 700, 10_000));
        assert_eq!(
            table.get(700).unwrap().exe,
            "/bin/bash",
            "a fork runs its parent's program"
        );
        table.on_exec(&exec(700, 600, "/usr/bin/curl", &["curl", "-s"], 11_000));
        let child = table.get(700).unwrap();
        assert_eq!(
            (child.exe.as_str(), child.argv0.as_str()),
            ("/usr/bin/curl", "curl")
        );
        assert_eq!(child.start_boot_ns, 10_000, "exec keeps the process start");

        let chain = table.ancestry(700);
        assert_eq!(pids(&chain), vec![600, 500, 1]);
        assert_eq!(chain[0].exe, "/bin/bash");
        assert_eq!(chain[2].exe, "/sbin/init");
    }

    #[test]
    fn exited_processes_resolve_for_a_while_then_go() {
        let mut table = seeded();
        table.on_fork(&fork(600, 700, 1_000));
        table.on_fork(&fork(700, 701, 2_000));
        table.on_exit(&exit(700, 3_000));
        assert_eq!(
            pids(&table.ancestry(701)),
            vec![700, 600, 500, 1],
            "orphan still resolves"
        );
        table.prune(3_000 + EXITED_RETENTION_NS);
        assert!(table.get(700).is_none());
        assert!(table.get(701).is_some(), "live processes are never pruned");
        assert!(
            table.ancestry(701).is_empty(),
            "unknown parent ends the chain"
        );
    }

    #[test]
    fn pid_reuse_replaces_the_old_entry() {
        let mut table = seeded();
        table.on_fork(&fork(600, 700, 1_000));
        table.on_exit(&exit(700, 2_000));
        table.on_fork(&fork(500, 700, 5_000));
        let reused = table.get(700).unwrap();
        assert_eq!(
            (reused.ppid, reused.start_boot_ns, reused.exited_boot_ns),
            (500, 5_000, None)
        );
        // The old exit's retention ends; the live process that reused the
        // pid stays.
        table.prune(2_000 + EXITED_RETENTION_NS);
        assert_eq!(table.get(700).map(|p| p.start_boot_ns), Some(5_000));
    }

    /// Pruning takes only expired exits, in exit order, without looking at
    /// live processes: a storm of short processes costs O(1) per exit.
    #[test]
    fn pruning_follows_exit_order() {
        let mut table = seeded();
        for pid in 1_000..1_100 {
            table.on_fork(&fork(600, pid, u64::from(pid)));
            table.on_exit(&exit(pid, u64::from(pid) * 1_000));
        }
        assert_eq!(table.len(), 3 + 100);
        table.prune(1_049_000 + EXITED_RETENTION_NS);
        assert!(table.get(1_049).is_none() && table.get(1_050).is_some());
        assert_eq!(table.len(), 3 + 50);
        assert_eq!(table.exits.len(), 50);
    }

    #[test]
    fn cycles_and_depth_are_bounded() {
        let mut table = ProcessTable::default();
        table.seed([process(10, 11, "/a"), process(11, 10, "/b")]);
        assert!(table.ancestry(10).len() <= MAX_ANCESTRY);
        let mut deep = ProcessTable::default();
        deep.seed((2..200).map(|pid| process(pid, pid - 1, "/x")));
        assert_eq!(deep.ancestry(199).len(), MAX_ANCESTRY);
    }

    #[test]
    fn capacity_evicts_exited_first() {
        let mut table = ProcessTable::with_capacity(3);
        table.seed([process(1, 0, "/init"), process(2, 1, "/a")]);
        table.on_fork(&fork(1, 3, 100));
        table.on_exit(&exit(2, 200));
        table.on_fork(&fork(1, 4, 300));
        assert!(table.get(2).is_none(), "the exited entry made room");
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn parses_proc_stat_with_odd_comm() {
        let stat = "1234 (my (odd) prog) S 99 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(
            parse_stat(stat),
            Some(("my (odd) prog".to_owned(), 99, 98765))
        );
        assert_eq!(
            parse_status_uid("Name:\tx\nUid:\t1000\t1000\t1000\t1000\n"),
            Some(1000)
        );
    }

    #[test]
    fn scans_this_machines_proc() {
        let processes = scan_proc(Path::new("/proc"));
        let me = processes
            .iter()
            .find(|p| p.pid == std::process::id())
            .expect("the test process is in /proc");
        // SAFETY: getppid has no preconditions.
        assert_eq!(me.ppid, unsafe { libc::getppid() } as u32);
        assert_eq!(me.exe, std::env::current_exe().unwrap().to_string_lossy());
        assert!(processes.iter().any(|p| p.pid == 1));
    }
}
