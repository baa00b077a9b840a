//! Loads the agent's kernel programs, attaches the sensors this kernel
//! supports, and turns ring-buffer records into enriched events for the
//! uplink: each process event carries its ancestry from the process table,
//! and every loss the kernel counts becomes a gap record.

use std::{
    collections::VecDeque,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use agent_common::{
    DropReason, KernelOffsets, SocketOwner, WatchPrefix, BULK_EVENTS_MAP, BULK_SAMPLING_MAP,
    CRITICAL_EVENTS_MAP, DROP_COUNTERS_MAP, DROP_REASONS, EXEC_PROGRAM, EXIT_PROGRAM,
    FILE_WATCH_MAP, FORK_PROGRAM, KERNEL_OFFSETS_GLOBAL, TCP_LISTENERS_MAP, TCP_STATE_PROGRAM,
};
use aya::{
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use proto::telemetry::{
    event::Kind, Ancestor as WireAncestor, CredentialChange as WireCreds, Event,
    FileActivity as WireFile, Gap, ProcessExec as WireExec, ProcessExit as WireExit,
    ProcessFork as WireFork, TcpConnection as WireTcp,
};
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    clock::BootClock,
    config::SensorConfig,
    event::{cred_syscall_name, decode, file_action_name, tcp_action_name, KernelEvent},
    exe_hash::ExeHasher,
    file_watch,
    kernel_offsets::{self, VMLINUX_BTF},
    metrics::AgentMetrics,
    process_table::{scan_proc, Ancestor, ProcessTable},
    sysfs,
    users::UserNames,
};

/// The compiled `agent-ebpf` object, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

const TRACEFS: &str = "/sys/kernel/tracing";

/// A sensor and the hook it uses on this kernel. Which hook serves which
/// sensor is data, so that better hooks (LSM, fentry) can be preferred where
/// the kernel allows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SensorHook {
    pub sensor: &'static str,
    pub program: &'static str,
    pub category: &'static str,
    pub tracepoint: &'static str,
}

/// The sensors feeding the critical ring buffer, in attach order.
pub const CRITICAL_SENSORS: &[SensorHook] = &[
    SensorHook {
        sensor: "exec",
        program: EXEC_PROGRAM,
        category: "sched",
        tracepoint: "sched_process_exec",
    },
    SensorHook {
        sensor: "fork",
        program: FORK_PROGRAM,
        category: "task",
        tracepoint: "task_newtask",
    },
    SensorHook {
        sensor: "exit",
        program: EXIT_PROGRAM,
        category: "sched",
        tracepoint: "sched_process_exit",
    },
    SensorHook {
        sensor: "tcp",
        program: TCP_STATE_PROGRAM,
        category: "sock",
        tracepoint: "inet_sock_set_state",
    },
];

/// The file sensor: one program per system call it watches.
pub const FILE_SENSORS: &[SensorHook] = &[
    file_hook("sys_enter_openat"),
    file_hook("sys_enter_open"),
    file_hook("sys_enter_creat"),
    file_hook("sys_enter_unlinkat"),
    file_hook("sys_enter_unlink"),
    file_hook("sys_enter_renameat2"),
    file_hook("sys_enter_renameat"),
    file_hook("sys_enter_rename"),
    file_hook("sys_enter_fchmodat"),
    file_hook("sys_enter_chmod"),
];

/// The credential sensor: entry and exit of each setuid-family call.
pub const CRED_SENSORS: &[SensorHook] = &[
    cred_hook("sys_enter_setuid"),
    cred_hook("sys_exit_setuid"),
    cred_hook("sys_enter_setgid"),
    cred_hook("sys_exit_setgid"),
    cred_hook("sys_enter_setreuid"),
    cred_hook("sys_exit_setreuid"),
    cred_hook("sys_enter_setregid"),
    cred_hook("sys_exit_setregid"),
    cred_hook("sys_enter_setresuid"),
    cred_hook("sys_exit_setresuid"),
    cred_hook("sys_enter_setresgid"),
    cred_hook("sys_exit_setresgid"),
];

const fn cred_hook(tracepoint: &'static str) -> SensorHook {
    SensorHook {
        sensor: "creds",
        program: tracepoint,
        category: "syscalls",
        tracepoint,
    }
}

const fn file_hook(tracepoint: &'static str) -> SensorHook {
    SensorHook {
        sensor: "file",
        program: tracepoint,
        category: "syscalls",
        tracepoint,
    }
}

/// Records taken from the bulk ring per wake-up before the critical ring is
/// looked at again.
const BULK_DRAIN_LIMIT: usize = 4096;

/// How old a bulk record must be before it is enriched: far longer than any
/// of the agent's programs runs between reserving and committing a record.
const BULK_HOLD_NS: u64 = 2_000_000;

#[derive(Debug, thiserror::Error)]
pub enum SensorError {
    #[error("cannot mount {what}: {source}")]
    Mount {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("cannot load or attach program {program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot poll ring buffer: {0}")]
    Poll(std::io::Error),
    #[error("no sensor could be attached")]
    NoneActive,
}

/// Event sequence numbers of this agent run: 1, 2, 3, ... shared by every
/// producer of events (sensors, gap records).
#[derive(Clone, Debug, Default)]
pub struct Sequencer(Arc<AtomicU64>);

impl Sequencer {
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// The loaded programs. Dropping it detaches every program and frees the
/// maps; the reader tasks end with it.
pub struct KernelSensors {
    _ebpf: Ebpf,
    active: Vec<SensorHook>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KernelSensors {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl KernelSensors {
    /// Loads and attaches the sensors and starts delivering events to `out`.
    pub fn start(
        config: &SensorConfig,
        budget: &crate::budget::BudgetConfig,
        out: mpsc::Sender<Event>,
        metrics: Arc<AgentMetrics>,
        sequencer: Sequencer,
    ) -> Result<Self, SensorError> {
        sysfs::ensure_mounted("tracefs", Path::new(TRACEFS)).map_err(|source| {
            SensorError::Mount {
                what: "tracefs",
                source,
            }
        })?;
        raise_memlock_limit();

        let offsets = resolve_offsets();
        let mut ebpf = EbpfLoader::new()
            .override_global(KERNEL_OFFSETS_GLOBAL, &offsets, true)
            .map_max_entries(CRITICAL_EVENTS_MAP, config.critical_ring_bytes)
            .map_max_entries(BULK_EVENTS_MAP, config.bulk_ring_bytes)
            .load(EBPF_OBJECT)?;
        fill_watch_list(&mut ebpf, config)?;
        seed_listeners(&mut ebpf);

        let mut active = Vec::new();
        for hook in CRITICAL_SENSORS {
            if hook.sensor == "fork" && offsets.tp_newtask_clone_flags == 0 {
                warn!(
                    sensor = hook.sensor,
                    "not attached: task_newtask record layout unknown"
                );
                continue;
            }
            match attach(&mut ebpf, hook) {
                Ok(()) => {
                    info!(sensor = hook.sensor, hook = %format!("tracepoint {}/{}", hook.category, hook.tracepoint), "sensor active");
                    active.push(*hook);
                }
                Err(err) => warn!(sensor = hook.sensor, error = %err, "sensor not attached"),
            }
        }
        // The file sensor is one sensor over several system calls: it is
        // active when every one of them attached.
        let mut file_hooks = 0;
        for hook in FILE_SENSORS {
            match attach(&mut ebpf, hook) {
                Ok(()) => file_hooks += 1,
                Err(err) => {
                    warn!(sensor = hook.sensor, tracepoint = hook.tracepoint, error = %err, "file hook not attached")
                }
            }
        }
        // Credentials: active only when every entry/exit pair attached.
        let cred_hooks = CRED_SENSORS
            .iter()
            .filter(|hook| match attach(&mut ebpf, hook) {
                Ok(()) => true,
                Err(err) => {
                    warn!(tracepoint = hook.tracepoint, error = %err, "credential hook not attached");
                    false
                }
            })
            .count();
        if cred_hooks == CRED_SENSORS.len() {
            info!(
                sensor = "creds",
                hook =
                    "tracepoints syscalls/sys_{enter,exit}_set{uid,gid,reuid,regid,resuid,resgid}",
                "sensor active"
            );
            active.push(CRED_SENSORS[0]);
        }
        if file_hooks > 0 {
            info!(sensor = "file", hooks = file_hooks, of = FILE_SENSORS.len(), hook = "tracepoints syscalls/sys_enter_{open,openat,creat,unlink,unlinkat,rename,renameat,renameat2,chmod,fchmodat}", "sensor active");
            active.push(FILE_SENSORS[0]);
        }
        if active.is_empty() {
            return Err(SensorError::NoneActive);
        }

        let critical = take_ring(&mut ebpf, CRITICAL_EVENTS_MAP)?;
        let bulk = take_ring(&mut ebpf, BULK_EVENTS_MAP)?;
        let drops: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
            ebpf.take_map(DROP_COUNTERS_MAP)
                .ok_or(SensorError::Missing(DROP_COUNTERS_MAP))?,
        )
        .map_err(|source| SensorError::Map {
            map: DROP_COUNTERS_MAP,
            source,
        })?;

        // Seed after attaching: whatever starts meanwhile is in the ring
        // buffer and applied on top of the snapshot.
        let mut table = ProcessTable::default();
        table.seed(scan_proc(Path::new("/proc")));
        info!(processes = table.len(), "process table seeded from /proc");

        let reader = Reader {
            table,
            hasher: ExeHasher::default(),
            cgroups: sysfs::cgroup2_mount()
                .ok()
                .map(crate::cgroups::CgroupResolver::new),
            users: UserNames::default(),
            out: out.clone(),
            metrics: metrics.clone(),
            sequencer: sequencer.clone(),
            gaps: Vec::new(),
        };
        let sampling: Array<MapData, u32> = Array::try_from(
            ebpf.take_map(BULK_SAMPLING_MAP)
                .ok_or(SensorError::Missing(BULK_SAMPLING_MAP))?,
        )
        .map_err(|source| SensorError::Map {
            map: BULK_SAMPLING_MAP,
            source,
        })?;
        let tasks = vec![
            tokio::spawn(crate::budget::enforce(budget.clone(), sampling)),
            tokio::spawn(reader.run(critical, bulk)),
            tokio::spawn(watch_drops(drops, out, metrics, sequencer)),
        ];
        Ok(Self {
            _ebpf: ebpf,
            active,
            tasks,
        })
    }

    /// The sensors attached on this kernel, and through which hook.
    pub fn active(&self) -> &[SensorHook] {
        &self.active
    }
}

fn resolve_offsets() -> KernelOffsets {
    let mut offsets = match kernel_offsets::resolve_from_file(Path::new(VMLINUX_BTF)) {
        Ok(offsets) => offsets,
        Err(err) => {
            warn!(error = %err, "kernel structure offsets unknown: events will lack ppid, argv, credentials and start times");
            KernelOffsets::default()
        }
    };
    if let Err(err) = kernel_offsets::resolve_tracepoint_fields(Path::new(TRACEFS), &mut offsets) {
        warn!(error = %err, "tracepoint record layout unknown");
    }
    offsets
}

fn take_ring(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<AsyncFd<RingBuf<MapData>>, SensorError> {
    let ring = RingBuf::try_from(ebpf.take_map(name).ok_or(SensorError::Missing(name))?)
        .map_err(|source| SensorError::Map { map: name, source })?;
    // SAFETY: the ring buffer owns its fd and the AsyncFd owns the ring
    // buffer, so the fd stays open for as long as it is registered.
    unsafe { AsyncFd::register(ring) }.map_err(|e| SensorError::Poll(e.into()))
}

/// Tells the kernel who owns the sockets that were listening before the
/// agent started (it only sees new listens).
fn seed_listeners(ebpf: &mut Ebpf) {
    let cgroup_root = match sysfs::cgroup2_mount() {
        Ok(root) => root,
        Err(err) => {
            warn!(error = %err, "cannot find the cgroup v2 mount; existing listeners get no cgroup id");
            std::path::PathBuf::from("/nonexistent")
        }
    };
    let owners = crate::listeners::current_listeners(Path::new("/proc"), &cgroup_root);
    let Some(map) = ebpf.map_mut(TCP_LISTENERS_MAP) else {
        warn!("eBPF object has no {TCP_LISTENERS_MAP}");
        return;
    };
    let mut listeners: aya::maps::HashMap<&mut MapData, u32, SocketOwner> =
        match aya::maps::HashMap::try_from(map) {
            Ok(map) => map,
            Err(err) => {
                warn!(error = %err, "cannot open {TCP_LISTENERS_MAP}");
                return;
            }
        };
    let mut seeded = 0;
    for (port, owner) in &owners {
        match listeners.insert(u32::from(*port), *owner, 0) {
            Ok(()) => seeded += 1,
            Err(err) => warn!(port, error = %err, "cannot record an existing listener"),
        }
    }
    info!(listeners = seeded, "existing TCP listeners recorded");
}

/// Writes the watch prefixes into the kernel's `FILE_WATCH` map.
fn fill_watch_list(ebpf: &mut Ebpf, config: &SensorConfig) -> Result<(), SensorError> {
    let list = file_watch::build(&config.files, &file_watch::home_directories());
    for skipped in &list.skipped {
        warn!(prefix = %skipped, "file watch prefix left out");
    }
    let map_err = |source| SensorError::Map {
        map: FILE_WATCH_MAP,
        source,
    };
    let mut watch: Array<&mut MapData, WatchPrefix> = Array::try_from(
        ebpf.map_mut(FILE_WATCH_MAP)
            .ok_or(SensorError::Missing(FILE_WATCH_MAP))?,
    )
    .map_err(map_err)?;
    for (index, prefix) in list.prefixes.iter().enumerate() {
        watch.set(index as u32, *prefix, 0).map_err(map_err)?;
    }
    info!(prefixes = list.prefixes.len(), "file watch list loaded");
    Ok(())
}

fn attach(ebpf: &mut Ebpf, hook: &SensorHook) -> Result<(), SensorError> {
    let program: &mut TracePoint = ebpf
        .program_mut(hook.program)
        .ok_or(SensorError::Missing(hook.program))?
        .try_into()
        .map_err(|source| SensorError::Program {
            program: hook.program,
            source,
        })?;
    program.load().map_err(|source| SensorError::Program {
        program: hook.program,
        source,
    })?;
    program
        .attach(hook.category, hook.tracepoint)
        .map_err(|source| SensorError::Program {
            program: hook.program,
            source,
        })?;
    Ok(())
}

/// Drains the critical ring buffer: decode, keep the process table, enrich.
struct Reader {
    table: ProcessTable,
    hasher: ExeHasher,
    users: UserNames,
    /// cgroup ids to paths; `None` without a cgroup v2 hierarchy.
    cgroups: Option<crate::cgroups::CgroupResolver>,
    out: mpsc::Sender<Event>,
    metrics: Arc<AgentMetrics>,
    sequencer: Sequencer,
    /// Gap records for undecodable records, sent with the round's events.
    gaps: Vec<Event>,
}

impl Reader {
    /// Drains both ring buffers. Every wake-up drains the critical ring
    /// first, whichever ring woke it. A bulk record is enriched only once it
    /// is [`BULK_HOLD_NS`] old at the start of a critical drain: the fork and
    /// exec records of its process were reserved before it, and a record
    /// reserved on another CPU that is still being written blocks the
    /// critical ring's consumer, so holding the bulk record for longer than
    /// any program runs means its process is always in the table first.
    /// Bulk records are taken at most [`BULK_DRAIN_LIMIT`] at a time.
    async fn run(
        mut self,
        mut critical: AsyncFd<RingBuf<MapData>>,
        mut bulk: AsyncFd<RingBuf<MapData>>,
    ) {
        let mut batch = Vec::with_capacity(256);
        let mut held: VecDeque<KernelEvent> = VecDeque::new();
        let mut bulk_pending = false;
        loop {
            if !bulk_pending {
                let matures_in = held.front().map(|event| {
                    let ripe_at = event.boot_ns().saturating_add(BULK_HOLD_NS);
                    Duration::from_nanos(ripe_at.saturating_sub(crate::clock::boot_now_ns()))
                });
                // Readiness is cleared before draining: a record committed
                // after the drain wakes the ring again.
                let woken = tokio::select! {
                    biased;
                    guard = critical.readable_mut() => guard.map(|mut g| g.clear_ready()),
                    guard = bulk.readable_mut() => guard.map(|mut g| g.clear_ready()),
                    () = sleep_or_never(matures_in) => Ok(()),
                };
                if let Err(err) = woken {
                    warn!(error = %err, "ring buffer poll failed; sensors stopped");
                    return;
                }
            }
            let clock = BootClock::sample();
            let drained_at = crate::clock::boot_now_ns();
            self.drain(
                critical.get_mut(),
                "critical",
                usize::MAX,
                &mut |reader, event| {
                    batch.push(reader.enrich(event, clock));
                },
            );
            bulk_pending = self.drain(bulk.get_mut(), "bulk", BULK_DRAIN_LIMIT, &mut |_, event| {
                held.push_back(event);
            });
            let ripe_before = drained_at.saturating_sub(BULK_HOLD_NS);
            while held
                .front()
                .is_some_and(|event| event.boot_ns() <= ripe_before)
            {
                if let Some(event) = held.pop_front() {
                    batch.push(self.enrich(event, clock));
                }
            }
            batch.append(&mut self.gaps);
            for event in batch.drain(..) {
                if self.out.send(event).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Decodes up to `limit` records of `ring` and hands each to `take`;
    /// true when the limit stopped it (more records wait). Undecodable
    /// records become one gap record.
    fn drain(
        &mut self,
        ring: &mut RingBuf<MapData>,
        stream: &'static str,
        limit: usize,
        take: &mut dyn FnMut(&mut Self, KernelEvent),
    ) -> bool {
        let mut taken = 0;
        let mut decode_errors = 0u64;
        while taken < limit {
            let Some(record) = ring.next() else {
                break;
            };
            taken += 1;
            AgentMetrics::add(&self.metrics.kernel_records, 1);
            let decoded = decode(&record);
            drop(record);
            match decoded {
                Ok(event) => take(self, event),
                Err(err) => {
                    decode_errors += 1;
                    warn!(error = %err, stream, "discarding undecodable kernel record");
                }
            }
        }
        if decode_errors > 0 {
            AgentMetrics::add(&self.metrics.decode_errors, decode_errors);
            let now = crate::clock::unix_now_ns();
            let gap = gap_event(
                self.sequencer.next(),
                stream,
                "decode_error",
                decode_errors,
                now,
                now,
            );
            self.gaps.push(gap);
        }
        taken == limit
    }

    /// Applies `event` to the process table and builds the wire event with
    /// the process's ancestry.
    fn enrich(&mut self, event: KernelEvent, clock: BootClock) -> Event {
        let to_unix = |boot_ns: u64| clock.to_unix_ns(boot_ns);
        let time_unix_ns = to_unix(event.boot_ns());
        let (ancestry, kind) = match event {
            KernelEvent::Exec(e) => {
                self.table.on_exec(&e);
                let ancestry = self.table.ancestry(e.pid);
                let exe_sha256 =
                    blocking(|| self.hasher.hash(e.pid, &e.filename)).unwrap_or_default();
                let user_name = self.users.name(e.uid).unwrap_or_default().to_owned();
                let cgroup_path = self
                    .cgroups
                    .as_mut()
                    .and_then(|cgroups| cgroups.path_of(e.cgroup_id, e.pid))
                    .unwrap_or_default()
                    .to_owned();
                let container_id = crate::cgroups::container_id(&cgroup_path).unwrap_or_default();
                let kind = Kind::Exec(WireExec {
                    pid: e.pid,
                    tid: e.tid,
                    ppid: e.ppid,
                    uid: e.uid,
                    gid: e.gid,
                    cgroup_id: e.cgroup_id,
                    filename: e.filename,
                    argv: e.argv,
                    argv_truncated: e.argv_truncated,
                    filename_truncated: e.filename_truncated,
                    ppid_unknown: e.ppid_unknown,
                    euid: e.euid,
                    egid: e.egid,
                    loginuid: e.loginuid,
                    process_start_unix_ns: e.start_boot_ns.map_or(0, to_unix),
                    exe_sha256,
                    user_name,
                    cgroup_path,
                    container_id,
                });
                (ancestry, kind)
            }
            KernelEvent::Fork(f) => {
                self.table.on_fork(&f);
                let ancestry = self.table.ancestry(f.child_pid);
                let exe = self.table.exe_of(f.child_pid);
                let kind = Kind::Fork(WireFork {
                    pid: f.child_pid,
                    ppid: f.parent_pid,
                    parent_tid: f.parent_tid,
                    uid: f.uid,
                    gid: f.gid,
                    cgroup_id: f.cgroup_id,
                    clone_flags: f.clone_flags,
                    exe,
                });
                (ancestry, kind)
            }
            KernelEvent::Exit(x) => {
                let ancestry = self.table.ancestry(x.pid);
                let exe = self.table.exe_of(x.pid);
                self.table.on_exit(&x);
                let kind = Kind::Exit(WireExit {
                    pid: x.pid,
                    ppid: x.ppid.unwrap_or(0),
                    ppid_unknown: x.ppid.is_none(),
                    uid: x.uid,
                    gid: x.gid,
                    cgroup_id: x.cgroup_id,
                    exit_status: x.exit_status.map(u32::from),
                    signal: x.signal.map(u32::from),
                    core_dumped: x.core_dumped,
                    process_start_unix_ns: x.start_boot_ns.map_or(0, to_unix),
                    lifetime_ns: x.lifetime_ns().unwrap_or(0),
                    exe,
                });
                (ancestry, kind)
            }
            KernelEvent::Tcp(t) => {
                let pid = t.pid.unwrap_or(0);
                let (ancestry, exe) = match t.pid {
                    Some(pid) => (self.table.ancestry(pid), self.table.exe_of(pid)),
                    None => (Vec::new(), String::new()),
                };
                let (bytes_sent, bytes_received) = t.bytes.unwrap_or((0, 0));
                let kind = Kind::Tcp(WireTcp {
                    action: tcp_action_name(t.action).to_owned(),
                    pid,
                    owner_unknown: t.pid.is_none(),
                    uid: t.uid,
                    gid: t.gid,
                    cgroup_id: t.cgroup_id,
                    ip_version: if t.local.is_ipv4() { 4 } else { 6 },
                    local_addr: t.local.ip().to_string(),
                    local_port: u32::from(t.local.port()),
                    remote_addr: t.remote.ip().to_string(),
                    remote_port: u32::from(t.remote.port()),
                    duration_ns: t.duration_ns,
                    bytes_sent,
                    bytes_received,
                    bytes_unknown: t.action == agent_common::TcpAction::Closed && t.bytes.is_none(),
                    exe,
                });
                (ancestry, kind)
            }
            KernelEvent::Creds(c) => {
                let ancestry = self.table.ancestry(c.pid);
                let exe = self.table.exe_of(c.pid);
                let kind = Kind::Creds(WireCreds {
                    pid: c.pid,
                    syscall: cred_syscall_name(c.syscall).to_owned(),
                    old_uid: c.old.uid,
                    old_euid: c.old.euid,
                    old_gid: c.old.gid,
                    old_egid: c.old.egid,
                    uid: c.new.uid,
                    euid: c.new.euid,
                    gid: c.new.gid,
                    egid: c.new.egid,
                    cgroup_id: c.cgroup_id,
                    exe,
                });
                (ancestry, kind)
            }
            KernelEvent::File(f) => {
                let ancestry = self.table.ancestry(f.pid);
                let exe = self.table.exe_of(f.pid);
                let kind = Kind::File(WireFile {
                    action: file_action_name(f.action).to_owned(),
                    pid: f.pid,
                    uid: f.uid,
                    gid: f.gid,
                    cgroup_id: f.cgroup_id,
                    path: f.path,
                    target_path: f.target.unwrap_or_default(),
                    open_flags: f.open_flags,
                    mode: f.mode,
                    path_truncated: f.path_truncated,
                    exe,
                });
                (ancestry, kind)
            }
        };
        Event {
            seq: self.sequencer.next(),
            time_unix_ns,
            ancestors: ancestry
                .into_iter()
                .map(|a| wire_ancestor(a, &to_unix))
                .collect(),
            kind: Some(kind),
        }
    }
}

/// Sleeps for `duration`, or forever without one.
async fn sleep_or_never(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
    }
}

/// Runs file IO that may take a while (hashing a new binary) without
/// stalling the runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn wire_ancestor(a: Ancestor, to_unix: &impl Fn(u64) -> u64) -> WireAncestor {
    WireAncestor {
        pid: a.pid,
        exe: a.exe,
        argv0: a.argv0,
        start_unix_ns: to_unix(a.start_boot_ns),
    }
}

/// A gap record: `lost` events of `stream` for `reason` in [from, to].
pub fn gap_event(seq: u64, stream: &str, reason: &str, lost: u64, from: u64, to: u64) -> Event {
    Event {
        seq,
        time_unix_ns: to,
        ancestors: Vec::new(),
        kind: Some(Kind::Gap(Gap {
            stream: stream.to_owned(),
            reason: reason.to_owned(),
            lost,
            from_unix_ns: from,
            to_unix_ns: to,
        })),
    }
}

/// Sums the kernel's per-CPU drop counters every second and turns growth
/// into gap records, per stream.
async fn watch_drops(
    drops: PerCpuArray<MapData, u64>,
    out: mpsc::Sender<Event>,
    metrics: Arc<AgentMetrics>,
    sequencer: Sequencer,
) {
    let mut reported = [0u64; DROP_REASONS as usize];
    let mut since = crate::clock::unix_now_ns();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = crate::clock::unix_now_ns();
        for (reason, stream, why) in [
            (DropReason::CriticalRingFull, "critical", "ring_full"),
            (DropReason::BulkRingFull, "bulk", "ring_full"),
            (DropReason::BulkSampled, "bulk", "sampled"),
        ] {
            let index = reason as usize;
            let Ok(values) = drops.get(&(reason as u32), 0) else {
                continue;
            };
            let total: u64 = values.iter().sum();
            if total > reported[index] {
                let lost = total - reported[index];
                if reason == DropReason::BulkSampled {
                    AgentMetrics::add(&metrics.bulk_sampled, lost);
                } else {
                    warn!(
                        lost,
                        lost_total = total,
                        stream,
                        "kernel ring buffer full: events lost"
                    );
                    AgentMetrics::add(&metrics.kernel_drops, lost);
                }
                let gap = gap_event(sequencer.next(), stream, why, lost, since, now);
                if out.send(gap).await.is_err() {
                    return;
                }
                reported[index] = total;
            }
        }
        since = now;
    }
}

fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        // Kernels since 5.11 account BPF memory to the cgroup; harmless there.
        tracing::debug!("could not raise RLIMIT_MEMLOCK");
    }
}
