//! Loads the agent's kernel programs, attaches the sensors this kernel
//! supports, and turns ring-buffer records into enriched events for the
//! uplink: each process event carries its ancestry from the process table,
//! and every loss the kernel counts becomes a gap record.

use std::{
    collections::{HashMap, VecDeque},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use agent_common::{
    DropReason, KernelOffsets, SocketOwner, WatchPrefix, BULK_EVENTS_MAP, BULK_SAMPLING_MAP,
    COMMIT_CREDS_PROGRAM, CRITICAL_EVENTS_MAP, DNS_EGRESS_PROGRAM, DROP_COUNTERS_MAP, DROP_REASONS,
    EXEC_PROGRAM, EXIT_PROGRAM, FILE_WATCH_MAP, FORK_PROGRAM, GUARD_CONNECT4_PROGRAM,
    GUARD_CONNECT6_PROGRAM, GUARD_INGRESS_PROGRAM, GUARD_SENDMSG4_PROGRAM, GUARD_SENDMSG6_PROGRAM,
    KERNEL_OFFSETS_GLOBAL, TCP_LISTENERS_MAP, TCP_STATE_PROGRAM, TUNNEL_SOCK_OPS_PROGRAM,
};
use aya::{
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, FEntry, Program, TracePoint},
    Ebpf, EbpfLoader,
};
use proto::telemetry::{
    event::Kind, Ancestor as WireAncestor, CredentialChange as WireCreds, Decision as WireDecision,
    DnsQuery as WireDns, Event, FileActivity as WireFile, Gap, ProcessExec as WireExec,
    ProcessExit as WireExit, ProcessFork as WireFork, TcpConnection as WireTcp,
};
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    clock::BootClock,
    config::SensorConfig,
    event::{cred_syscall_name, decode, file_action_name, tcp_action_name, KernelEvent},
    exe_hash::{ExeHasher, FileVersion, Lookup, SharedExeHasher},
    file_watch,
    guard::{GuardError, KernelGuard, SharedPolicy, TunnelOrigins},
    guard_policy::CompiledPolicy,
    kernel_offsets::{self, VMLINUX_BTF},
    metrics::AgentMetrics,
    process_table::{scan_proc, Ancestor, ProcessTable},
    sysfs,
    users::UserNames,
};

/// The compiled `agent-ebpf` object, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

const TRACEFS: &str = "/sys/kernel/tracing";

/// How a kernel program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// A static tracepoint: `category/name` in tracefs.
    Tracepoint {
        category: &'static str,
        name: &'static str,
    },
    /// fentry on a kernel function (BTF-typed; needs a kernel that allows
    /// tracing programs).
    Fentry { function: &'static str },
    /// `cgroup_skb/egress` on the guarded cgroup.
    CgroupSkbEgress,
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tracepoint { category, name } => write!(f, "tracepoint {category}/{name}"),
            Self::Fentry { function } => write!(f, "fentry {function}"),
            Self::CgroupSkbEgress => f.write_str("cgroup_skb/egress"),
        }
    }
}

/// One kernel program of a sensor and where it attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramHook {
    pub program: &'static str,
    pub hook: Hook,
    /// The sensor works without it (e.g. a system call that this
    /// architecture does not have).
    pub optional: bool,
}

/// One way to implement a sensor: programs that attach together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookChoice {
    /// How the choice is reported ("fentry commit_creds").
    pub name: &'static str,
    pub programs: &'static [ProgramHook],
}

/// A sensor and the ways to implement it, best first. At start the agent
/// takes the first choice whose required programs all load and attach on
/// this kernel; which hooks serve which sensor is data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SensorPlan {
    pub sensor: &'static str,
    pub choices: &'static [HookChoice],
}

/// A sensor as it runs: the choice that attached, and why better ones did
/// not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveSensor {
    pub sensor: &'static str,
    pub hook: &'static str,
    /// Programs of the choice that attached (optional ones may be missing).
    pub programs: usize,
    /// Better choices that failed on this kernel, with the reason.
    pub passed_over: Vec<(&'static str, String)>,
}

const fn tracepoint(
    program: &'static str,
    category: &'static str,
    name: &'static str,
) -> ProgramHook {
    ProgramHook {
        program,
        hook: Hook::Tracepoint { category, name },
        optional: false,
    }
}

const fn syscall(name: &'static str, optional: bool) -> ProgramHook {
    ProgramHook {
        program: name,
        hook: Hook::Tracepoint {
            category: "syscalls",
            name,
        },
        optional,
    }
}

/// Every sensor of the agent. Critical events (process lifecycle, TCP,
/// credentials) go to the critical ring; file and DNS to the bulk ring.
pub const SENSOR_PLANS: &[SensorPlan] = &[
    SensorPlan {
        sensor: "exec",
        choices: &[HookChoice {
            name: "tracepoint sched/sched_process_exec",
            programs: &[tracepoint(EXEC_PROGRAM, "sched", "sched_process_exec")],
        }],
    },
    SensorPlan {
        sensor: "fork",
        choices: &[HookChoice {
            name: "tracepoint task/task_newtask",
            programs: &[tracepoint(FORK_PROGRAM, "task", "task_newtask")],
        }],
    },
    SensorPlan {
        sensor: "exit",
        choices: &[HookChoice {
            name: "tracepoint sched/sched_process_exit",
            programs: &[tracepoint(EXIT_PROGRAM, "sched", "sched_process_exit")],
        }],
    },
    SensorPlan {
        sensor: "tcp",
        choices: &[HookChoice {
            name: "tracepoint sock/inet_sock_set_state",
            programs: &[tracepoint(TCP_STATE_PROGRAM, "sock", "inet_sock_set_state")],
        }],
    },
    SensorPlan {
        sensor: "creds",
        choices: &[
            HookChoice {
                name: "fentry commit_creds",
                programs: &[ProgramHook {
                    program: COMMIT_CREDS_PROGRAM,
                    hook: Hook::Fentry {
                        function: "commit_creds",
                    },
                    optional: false,
                }],
            },
            HookChoice {
                name: "tracepoints syscalls/sys_{enter,exit}_set{uid,gid,reuid,regid,resuid,resgid}",
                programs: &[
                    syscall("sys_enter_setuid", false),
                    syscall("sys_exit_setuid", false),
                    syscall("sys_enter_setgid", false),
                    syscall("sys_exit_setgid", false),
                    syscall("sys_enter_setreuid", false),
                    syscall("sys_exit_setreuid", false),
                    syscall("sys_enter_setregid", false),
                    syscall("sys_exit_setregid", false),
                    syscall("sys_enter_setresuid", false),
                    syscall("sys_exit_setresuid", false),
                    syscall("sys_enter_setresgid", false),
                    syscall("sys_exit_setresgid", false),
                ],
            },
        ],
    },
    SensorPlan {
        sensor: "file",
        // open, creat, unlink, rename and chmod are not system calls on
        // every architecture (arm64 has only the *at forms).
        choices: &[HookChoice {
            name: "tracepoints syscalls/sys_enter_{openat,open,creat,unlinkat,unlink,renameat2,renameat,rename,fchmodat,chmod}",
            programs: &[
                syscall("sys_enter_openat", false),
                syscall("sys_enter_open", true),
                syscall("sys_enter_creat", true),
                syscall("sys_enter_unlinkat", false),
                syscall("sys_enter_unlink", true),
                syscall("sys_enter_renameat2", false),
                syscall("sys_enter_renameat", true),
                syscall("sys_enter_rename", true),
                syscall("sys_enter_fchmodat", false),
                syscall("sys_enter_chmod", true),
            ],
        }],
    },
    SensorPlan {
        sensor: "dns",
        choices: &[HookChoice {
            name: "cgroup_skb/egress",
            programs: &[ProgramHook {
                program: DNS_EGRESS_PROGRAM,
                hook: Hook::CgroupSkbEgress,
                optional: false,
            }],
        }],
    },
];

/// Records taken from the bulk ring per wake-up before the critical ring is
/// looked at again (and, like [`CRITICAL_DRAIN_LIMIT`], what the reader
/// holds decoded at a time: 4,096 made a watched-open flood peak 10 MiB
/// higher for no less CPU).
const BULK_DRAIN_LIMIT: usize = 1024;

/// Records taken from the critical ring before they are handed on. A burst
/// waits in the ring (memory the kernel holds anyway) until the uplink's
/// channel has room, not decoded in the reader: a drain without a limit
/// kept up with a 220k events/s connect storm and held most of it as
/// decoded events, 100–300 MiB.
const CRITICAL_DRAIN_LIMIT: usize = 1024;

/// How old a bulk record must be before it is enriched: far longer than any
/// of the agent's programs runs between reserving and committing a record.
const BULK_HOLD_NS: u64 = 2_000_000;

/// After a drain that found a few records, how long the reader lets more
/// arrive before it looks again. The kernel wakes the reader only for a
/// record committed when the reader had caught up, so a reader that drains
/// at once is woken for nearly every record of a steady stream (an exec
/// storm: a context switch or two per event); waiting this long turns that
/// into one wake-up and one batch per millisecond. Idle, it costs nothing
/// (no records, no wait); a drain of [`COALESCE_BELOW`] records or more
/// (a burst, where the reader is behind anyway) does not wait; it adds at
/// most this much to an event's delivery.
const COALESCE: Duration = Duration::from_millis(1);
const COALESCE_BELOW: usize = 64;

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
    #[error("no kernel BTF for BTF-typed programs")]
    NoBtf,
    #[error("cannot open the guarded cgroup {path}: {source}")]
    Cgroup {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("no sensor could be attached")]
    NoneActive,
    #[error(transparent)]
    Guard(#[from] GuardError),
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

/// The connection guard's start: its policy, and the tunnel listener's port
/// (0: none; `tunnel` verdicts then fail closed).
pub struct GuardSetup {
    pub policy: Arc<CompiledPolicy>,
    pub tunnel_port: u16,
}

/// The loaded programs. Dropping it detaches every program and frees the
/// maps; the reader tasks end with it.
pub struct KernelSensors {
    _ebpf: Ebpf,
    active: Vec<ActiveSensor>,
    tasks: Vec<JoinHandle<()>>,
    guard: Option<KernelGuard>,
    tunnel_origins: Option<TunnelOrigins>,
    exe_hashes: SharedExeHasher,
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
        guarded_cgroup: &Path,
        budget: &crate::budget::BudgetConfig,
        guard: Option<GuardSetup>,
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

        // BTF for fentry/LSM programs; without it those choices fail and
        // the next one is taken.
        let btf = aya::Btf::from_sys_fs()
            .map_err(|err| warn!(error = %err, "no kernel BTF: fentry hooks unavailable"))
            .ok();
        let targets = AttachTargets {
            btf: btf.as_ref(),
            guarded_cgroup,
        };
        let mut active = Vec::new();
        for plan in SENSOR_PLANS {
            if plan.sensor == "fork" && offsets.tp_newtask_clone_flags == 0 {
                warn!(
                    sensor = plan.sensor,
                    "not attached: task_newtask record layout unknown"
                );
                continue;
            }
            match attach_sensor(&mut ebpf, plan, &targets) {
                Ok(sensor) => {
                    if sensor.passed_over.is_empty() {
                        info!(
                            sensor = sensor.sensor,
                            hook = sensor.hook,
                            programs = sensor.programs,
                            "sensor active"
                        );
                    } else {
                        info!(sensor = sensor.sensor, hook = sensor.hook, programs = sensor.programs, passed_over = ?sensor.passed_over, "sensor active on a fallback hook");
                    }
                    active.push(sensor);
                }
                Err(failures) => {
                    warn!(sensor = plan.sensor, failures = ?failures, "sensor not attached")
                }
            }
        }
        // The parsed BTF (about 20 MB, and the loader's own copy before it)
        // is needed only to load and attach: freed, and the freed pages
        // given back, before the ring buffers are mapped, so the two never
        // add up (they made the agent's start-up peak: 55 MiB).
        drop(btf);
        crate::heap::trim();
        // The guard decides connections only where a policy says how; a
        // policy that cannot be enforced is an error, not a silent allow.
        let mut kernel_guard = None;
        let mut tunnel_origins = None;
        if let Some(GuardSetup {
            policy,
            tunnel_port,
        }) = guard
        {
            kernel_guard = Some(KernelGuard::take(&mut ebpf, policy.clone(), tunnel_port)?);
            for program in [
                GUARD_CONNECT4_PROGRAM,
                GUARD_CONNECT6_PROGRAM,
                GUARD_SENDMSG4_PROGRAM,
                GUARD_SENDMSG6_PROGRAM,
            ] {
                attach_cgroup_program(&mut ebpf, program, guarded_cgroup)?;
            }
            attach_cgroup_program(&mut ebpf, GUARD_INGRESS_PROGRAM, guarded_cgroup)?;
            let mut hook = "cgroup connect4/6, sendmsg4/6, cgroup_skb ingress";
            if tunnel_port != 0 {
                attach_cgroup_program(&mut ebpf, TUNNEL_SOCK_OPS_PROGRAM, guarded_cgroup)?;
                tunnel_origins = Some(TunnelOrigins::take(&mut ebpf)?);
                hook = "cgroup connect4/6, sendmsg4/6, cgroup_skb ingress, sock_ops";
            }
            info!(
                sensor = "guard",
                hook,
                cgroup = %guarded_cgroup.display(),
                policy_version = policy.version(),
                rules = policy.rule_ids.len(),
                entries = policy.entries.len(),
                protected_ports = policy.protected_ports.len(),
                tunnel_port,
                "connection guard active"
            );
            active.push(ActiveSensor {
                sensor: "guard",
                hook,
                programs: if tunnel_port != 0 { 6 } else { 5 },
                passed_over: Vec::new(),
            });
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

        let exe_hashes = SharedExeHasher::default();
        let reader = Reader {
            table,
            hasher: exe_hashes.clone(),
            cgroups: sysfs::cgroup2_mount()
                .ok()
                .map(crate::cgroups::CgroupResolver::new),
            users: UserNames::default(),
            out: out.clone(),
            metrics: metrics.clone(),
            sequencer: sequencer.clone(),
            gaps: Vec::new(),
            policy: kernel_guard.as_ref().map(KernelGuard::policy),
            hashing: tokio::task::JoinSet::new(),
            hash_tasks: HashMap::new(),
            awaiting_hash: HashMap::new(),
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
            guard: kernel_guard,
            tunnel_origins,
            exe_hashes,
        })
    }

    /// The connection guard's maps (with a policy), for whoever applies
    /// new policies.
    pub fn take_guard(&mut self) -> Option<KernelGuard> {
        self.guard.take()
    }

    /// The policy in force, when the guard runs.
    pub fn policy(&self) -> Option<SharedPolicy> {
        self.guard.as_ref().map(KernelGuard::policy)
    }

    /// The executables' hashes the exec sensor has computed.
    pub fn exe_hashes(&self) -> SharedExeHasher {
        self.exe_hashes.clone()
    }

    /// Where redirected connections were going (with a tunnel listener).
    pub fn tunnel_origins(&self) -> Option<TunnelOrigins> {
        self.tunnel_origins.clone()
    }

    /// The sensors attached on this kernel, and through which hook.
    pub fn active(&self) -> &[ActiveSensor] {
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

/// What hooks attach to besides the kernel itself.
struct AttachTargets<'a> {
    btf: Option<&'a aya::Btf>,
    guarded_cgroup: &'a Path,
}

/// Attaches the first choice of `plan` whose required programs all attach;
/// the failures of every choice when none does.
fn attach_sensor(
    ebpf: &mut Ebpf,
    plan: &SensorPlan,
    targets: &AttachTargets<'_>,
) -> Result<ActiveSensor, Vec<(&'static str, String)>> {
    let mut passed_over = Vec::new();
    for choice in plan.choices {
        let mut attached = Vec::new();
        let mut failure = None;
        for program in choice.programs {
            match attach_program(ebpf, program, targets) {
                Ok(()) => attached.push(program),
                Err(err) if program.optional => {
                    tracing::debug!(sensor = plan.sensor, program = program.program, error = %err, "optional program not attached");
                }
                Err(err) => {
                    failure = Some(format!("{}: {err}", program.program));
                    break;
                }
            }
        }
        match failure {
            None => {
                return Ok(ActiveSensor {
                    sensor: plan.sensor,
                    hook: choice.name,
                    programs: attached.len(),
                    passed_over,
                })
            }
            Some(reason) => {
                for program in attached {
                    unload(ebpf, program);
                }
                passed_over.push((choice.name, reason));
            }
        }
    }
    Err(passed_over)
}

fn attach_program(
    ebpf: &mut Ebpf,
    hook: &ProgramHook,
    targets: &AttachTargets<'_>,
) -> Result<(), SensorError> {
    let name = hook.program;
    let program_error = |source| SensorError::Program {
        program: name,
        source,
    };
    let program = ebpf.program_mut(name).ok_or(SensorError::Missing(name))?;
    match hook.hook {
        Hook::Tracepoint { category, name } => {
            let program: &mut TracePoint = program.try_into().map_err(program_error)?;
            program.load().map_err(program_error)?;
            program.attach(category, name).map_err(program_error)?;
        }
        Hook::Fentry { function } => {
            let btf = targets.btf.ok_or(SensorError::NoBtf)?;
            let program: &mut FEntry = program.try_into().map_err(program_error)?;
            program.load(function, btf).map_err(program_error)?;
            program.attach().map_err(program_error)?;
        }
        Hook::CgroupSkbEgress => {
            let cgroup = std::fs::File::open(targets.guarded_cgroup).map_err(|source| {
                SensorError::Cgroup {
                    path: targets.guarded_cgroup.to_owned(),
                    source,
                }
            })?;
            let program: &mut CgroupSkb = program.try_into().map_err(program_error)?;
            program.load().map_err(program_error)?;
            program
                // A BPF link: always beside other programs on the cgroup,
                // and the kernel takes no attach flags for links (mode
                // `Single` is 0).
                .attach(
                    cgroup,
                    CgroupSkbAttachType::Egress,
                    CgroupAttachMode::Single,
                )
                .map_err(program_error)?;
        }
    }
    Ok(())
}

/// Attaches one of the guard's programs (`cgroup_sock_addr`, `sock_ops`,
/// `cgroup_skb/ingress`) to the guarded cgroup.
fn attach_cgroup_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &Path,
) -> Result<(), SensorError> {
    let program_error = |source| SensorError::Program {
        program: name,
        source,
    };
    let cgroup_file = std::fs::File::open(cgroup).map_err(|source| SensorError::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    match ebpf.program_mut(name).ok_or(SensorError::Missing(name))? {
        Program::CgroupSockAddr(program) => {
            program.load().map_err(program_error)?;
            program
                .attach(cgroup_file, CgroupAttachMode::Single)
                .map_err(program_error)?;
        }
        Program::SockOps(program) => {
            program.load().map_err(program_error)?;
            program
                .attach(cgroup_file, CgroupAttachMode::Single)
                .map_err(program_error)?;
        }
        Program::CgroupSkb(program) => {
            program.load().map_err(program_error)?;
            program
                .attach(
                    cgroup_file,
                    CgroupSkbAttachType::Ingress,
                    CgroupAttachMode::Single,
                )
                .map_err(program_error)?;
        }
        _ => return Err(SensorError::Missing(name)),
    }
    Ok(())
}

/// Detaches and unloads a program of a choice that did not attach whole.
fn unload(ebpf: &mut Ebpf, hook: &ProgramHook) {
    let Some(program) = ebpf.program_mut(hook.program) else {
        return;
    };
    let result = match program {
        Program::TracePoint(p) => p.unload(),
        Program::FEntry(p) => p.unload(),
        Program::CgroupSkb(p) => p.unload(),
        _ => Ok(()),
    };
    if let Err(err) = result {
        warn!(program = hook.program, error = %err, "cannot unload program");
    }
}

/// Drains the critical ring buffer: decode, keep the process table, enrich.
struct Reader {
    table: ProcessTable,
    hasher: SharedExeHasher,
    users: UserNames,
    /// cgroup ids to paths; `None` without a cgroup v2 hierarchy.
    cgroups: Option<crate::cgroups::CgroupResolver>,
    out: mpsc::Sender<Event>,
    metrics: Arc<AgentMetrics>,
    sequencer: Sequencer,
    /// Gap records for undecodable records, sent with the round's events.
    gaps: Vec<Event>,
    /// The guard's policy, for the rule ids of decisions.
    policy: Option<SharedPolicy>,
    /// Executables being hashed on blocking threads (a new binary can take
    /// a moment to read), so that the rings keep being drained meanwhile.
    hashing: tokio::task::JoinSet<(FileVersion, Option<String>)>,
    hash_tasks: HashMap<tokio::task::Id, FileVersion>,
    /// Exec events waiting for the hash of their file's version.
    awaiting_hash: HashMap<FileVersion, Vec<Event>>,
}

impl Reader {
    /// Drains both ring buffers. Every wake-up drains the critical ring
    /// first, whichever ring woke it, [`CRITICAL_DRAIN_LIMIT`] records at a
    /// time; the bulk ring is looked at only once the critical one is empty.
    /// A bulk record is enriched only once it is [`BULK_HOLD_NS`] old at the
    /// start of a critical drain that emptied the ring: the fork and exec
    /// records of its process were reserved before it, and a record
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
        let mut critical_pending = false;
        loop {
            if !bulk_pending && !critical_pending {
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
                    Some(hashed) = self.hashing.join_next_with_id(), if !self.hashing.is_empty() => {
                        self.hashed(hashed, &mut batch);
                        Ok(())
                    }
                    () = sleep_or_never(matures_in) => Ok(()),
                };
                if let Err(err) = woken {
                    warn!(error = %err, "ring buffer poll failed; sensors stopped");
                    return;
                }
            }
            let clock = BootClock::sample();
            let drained_at = crate::clock::boot_now_ns();
            critical_pending = self.drain(
                critical.get_mut(),
                "critical",
                CRITICAL_DRAIN_LIMIT,
                &mut |reader, event| {
                    batch.extend(reader.enrich(event, clock));
                },
            );
            if !critical_pending {
                bulk_pending =
                    self.drain(bulk.get_mut(), "bulk", BULK_DRAIN_LIMIT, &mut |_, event| {
                        held.push_back(event);
                    });
                let ripe_before = drained_at.saturating_sub(BULK_HOLD_NS);
                while held
                    .front()
                    .is_some_and(|event| event.boot_ns() <= ripe_before)
                {
                    if let Some(event) = held.pop_front() {
                        batch.extend(self.enrich(event, clock));
                    }
                }
            }
            batch.append(&mut self.gaps);
            tracing::trace!(events = batch.len(), held = held.len(), "sensor events out");
            let trickle = (1..COALESCE_BELOW).contains(&batch.len());
            for event in batch.drain(..) {
                if self.out.send(event).await.is_err() {
                    return;
                }
            }
            if trickle && !bulk_pending && !critical_pending {
                tokio::time::sleep(COALESCE).await;
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
    /// `None` for an exec whose binary is being hashed: it follows when the
    /// hash is there ([`Reader::hashed`]).
    fn enrich(&mut self, event: KernelEvent, clock: BootClock) -> Option<Event> {
        let mut awaits = None;
        let event = self.enrich_now(event, clock, &mut awaits);
        match awaits {
            Some(version) => {
                self.awaiting_hash.entry(version).or_default().push(event);
                None
            }
            None => Some(event),
        }
    }

    /// A hash computed on a blocking thread: cached, and the exec events
    /// that waited for it go out.
    fn hashed(
        &mut self,
        done: Result<(tokio::task::Id, (FileVersion, Option<String>)), tokio::task::JoinError>,
        batch: &mut Vec<Event>,
    ) {
        let (version, hash) = match done {
            Ok((id, result)) => {
                self.hash_tasks.remove(&id);
                result
            }
            // A hashing thread that panicked: its events go without a hash.
            Err(err) => match self.hash_tasks.remove(&err.id()) {
                Some(version) => {
                    warn!(error = %err, "hashing an executable failed");
                    (version, None)
                }
                None => return,
            },
        };
        if let Some(hash) = &hash {
            lock(&self.hasher).remember(version, hash);
        }
        for mut event in self.awaiting_hash.remove(&version).unwrap_or_default() {
            if let Some(Kind::Exec(exec)) = event.kind.as_mut() {
                exec.exe_sha256 = hash.clone().unwrap_or_default();
            }
            batch.push(event);
        }
    }

    fn enrich_now(
        &mut self,
        event: KernelEvent,
        clock: BootClock,
        awaits: &mut Option<FileVersion>,
    ) -> Event {
        let to_unix = |boot_ns: u64| clock.to_unix_ns(boot_ns);
        let time_unix_ns = to_unix(event.boot_ns());
        let (ancestry, kind) = match event {
            KernelEvent::Exec(e) => {
                self.table.on_exec(&e);
                let ancestry = self.table.ancestry(e.pid);
                // Only a binary not seen before is read, off the runtime's
                // worker; the usual case is the kernel's file version found
                // in the cache, no system call.
                let lookup = lock(&self.hasher).lookup_exec(e.pid, &e.filename, e.exe_version);
                let exe_sha256 = match lookup {
                    Lookup::Cached(hash) => hash,
                    Lookup::New(file) => {
                        // Read on a blocking thread; the event waits for
                        // its hash, the rings do not.
                        let version = file.version();
                        if !self.awaiting_hash.contains_key(&version) {
                            let task = self.hashing.spawn_blocking(move || file.compute());
                            self.hash_tasks.insert(task.id(), version);
                        }
                        *awaits = Some(version);
                        String::new()
                    }
                    Lookup::Unreadable => String::new(),
                };
                let Owner {
                    user_name,
                    cgroup_path,
                    container_id,
                } = self.owner(e.uid, e.cgroup_id, e.pid);
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
                let owner = self.owner(t.uid, t.cgroup_id, pid);
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
                    user_name: owner.user_name,
                    cgroup_path: owner.cgroup_path,
                    container_id: owner.container_id,
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
                let owner = self.owner(f.uid, f.cgroup_id, f.pid);
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
                    user_name: owner.user_name,
                    cgroup_path: owner.cgroup_path,
                    container_id: owner.container_id,
                });
                (ancestry, kind)
            }
            KernelEvent::Decision(d) => {
                let ancestry = self.table.ancestry(d.pid);
                let exe = self.table.exe_of(d.pid);
                let owner = self.owner(d.uid, d.cgroup_id, d.pid);
                let rule_id = self
                    .policy
                    .as_ref()
                    .map(|p| {
                        p.read()
                            .unwrap_or_else(|e| e.into_inner())
                            .rule_id(d.rule)
                            .to_owned()
                    })
                    .unwrap_or_default();
                let (action, verdict, reason) = match (d.action, d.inbound) {
                    (agent_common::VerdictAction::Allow, _) => ("allow", "allowed", ""),
                    (agent_common::VerdictAction::Deny, false) => ("deny", "denied", "policy"),
                    (agent_common::VerdictAction::Deny, true) => {
                        ("deny", "denied", "protected_port")
                    }
                    (agent_common::VerdictAction::Audit, _) => ("audit", "would_deny", ""),
                    // The kernel records a tunnel verdict only when it could
                    // not redirect (not TCP, no tunnel listener, map full).
                    (agent_common::VerdictAction::Tunnel, _) => ("tunnel", "denied", "fail_closed"),
                    // Never decoded (event.rs refuses it): the kernel
                    // resolves chains before it records.
                    (agent_common::VerdictAction::Chain, _) => ("allow", "allowed", ""),
                };
                if verdict == "denied" {
                    info!(pid = d.pid, exe = %exe, remote = %d.remote, rule = %rule_id, inbound = d.inbound, "connection denied");
                }
                let kind = Kind::Decision(WireDecision {
                    connection_id: uuid::Uuid::new_v4().simple().to_string(),
                    pid: d.pid,
                    uid: d.uid,
                    gid: d.gid,
                    cgroup_id: d.cgroup_id,
                    exe,
                    user_name: owner.user_name,
                    cgroup_path: owner.cgroup_path,
                    container_id: owner.container_id,
                    ip_version: if d.remote.is_ipv4() { 4 } else { 6 },
                    remote_addr: d.remote.ip().to_string(),
                    remote_port: u32::from(d.remote.port()),
                    protocol: d.protocol.to_owned(),
                    action: action.to_owned(),
                    verdict: verdict.to_owned(),
                    rule_id,
                    policy_version: d.policy_version,
                    enforcement_point: if d.inbound {
                        "kernel_ingress"
                    } else {
                        "kernel"
                    }
                    .to_owned(),
                    direction: if d.inbound { "inbound" } else { "outbound" }.to_owned(),
                    reason: reason.to_owned(),
                    ..WireDecision::default()
                });
                (ancestry, kind)
            }
            KernelEvent::Dns(d) => {
                let pid = d.pid.unwrap_or(0);
                let (ancestry, exe) = match d.pid {
                    Some(pid) => (self.table.ancestry(pid), self.table.exe_of(pid)),
                    None => (Vec::new(), String::new()),
                };
                let owner = self.owner(d.uid, d.cgroup_id, pid);
                let (question, parse_error) = match crate::dns::parse_query(&d.message) {
                    Ok(question) => (Some(question), String::new()),
                    Err(err) => (None, err.to_string()),
                };
                let kind = Kind::Dns(WireDns {
                    pid,
                    owner_unknown: d.pid.is_none(),
                    uid: d.uid,
                    gid: d.gid,
                    cgroup_id: d.cgroup_id,
                    ip_version: if d.server.is_ipv4() { 4 } else { 6 },
                    source_addr: d.source.ip().to_string(),
                    source_port: u32::from(d.source.port()),
                    server_addr: d.server.ip().to_string(),
                    server_port: u32::from(d.server.port()),
                    transaction_id: question.as_ref().map_or(0, |q| u32::from(q.transaction_id)),
                    question_count: question.as_ref().map_or(0, |q| u32::from(q.question_count)),
                    query_type: question
                        .as_ref()
                        .map(|q| q.query_type.clone())
                        .unwrap_or_default(),
                    query_name: question.map(|q| q.name).unwrap_or_default(),
                    message_len: d.message_len,
                    parse_error,
                    exe,
                    user_name: owner.user_name,
                    cgroup_path: owner.cgroup_path,
                    container_id: owner.container_id,
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

/// Who owns an event's process beyond its ids.
struct Owner {
    user_name: String,
    cgroup_path: String,
    container_id: String,
}

impl Reader {
    /// User name of `uid`, path and container id of cgroup `cgroup_id`
    /// (`pid` is a member, used when the id is new to the resolver).
    fn owner(&mut self, uid: u32, cgroup_id: u64, pid: u32) -> Owner {
        let user_name = self.users.name(uid).unwrap_or_default().to_owned();
        let cgroup_path = self
            .cgroups
            .as_mut()
            .and_then(|cgroups| cgroups.path_of(cgroup_id, pid))
            .unwrap_or_default()
            .to_owned();
        let container_id = crate::cgroups::container_id(&cgroup_path).unwrap_or_default();
        Owner {
            user_name,
            cgroup_path,
            container_id,
        }
    }
}

fn lock(hasher: &SharedExeHasher) -> std::sync::MutexGuard<'_, ExeHasher> {
    hasher.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sleeps for `duration`, or forever without one.
async fn sleep_or_never(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load_object() -> Ebpf {
        raise_memlock_limit();
        EbpfLoader::new()
            .load(EBPF_OBJECT)
            .expect("the agent's eBPF object loads (root)")
    }

    #[test]
    fn every_planned_program_is_in_the_object() {
        let ebpf = load_object();
        for plan in SENSOR_PLANS {
            assert!(!plan.choices.is_empty(), "{} has no hook", plan.sensor);
            for choice in plan.choices {
                assert!(
                    choice.programs.iter().any(|p| !p.optional),
                    "{}: {} needs a required program",
                    plan.sensor,
                    choice.name
                );
                for program in choice.programs {
                    assert!(
                        ebpf.program(program.program).is_some(),
                        "{}: program {} is not in the object",
                        plan.sensor,
                        program.program
                    );
                }
            }
        }
    }

    /// The exec record carries the version of the file the new program
    /// runs from, read from its inode: the same as `stat` gives, so the
    /// hash cache needs no lookup for a binary it has seen.
    #[test]
    fn the_exec_record_carries_the_programs_file_version() {
        raise_memlock_limit();
        let offsets = resolve_offsets();
        assert_ne!(offsets.optional & agent_common::OPT_EXE_VERSION, 0);
        let mut ebpf = EbpfLoader::new()
            .override_global(KERNEL_OFFSETS_GLOBAL, &offsets, true)
            .load(EBPF_OBJECT)
            .expect("the agent's eBPF object loads (root)");
        let plan = SENSOR_PLANS
            .iter()
            .find(|plan| plan.sensor == "exec")
            .expect("an exec sensor");
        let targets = AttachTargets {
            btf: None,
            guarded_cgroup: Path::new("/nonexistent"),
        };
        let _active = attach_sensor(&mut ebpf, plan, &targets).expect("exec attaches");
        let mut ring = RingBuf::try_from(ebpf.take_map(CRITICAL_EVENTS_MAP).unwrap()).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("true-copy");
        std::fs::copy("/bin/true", &program).unwrap();
        let status = std::process::Command::new(&program).status().unwrap();
        assert!(status.success());
        let expected = FileVersion::of(&std::fs::metadata(&program).unwrap()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let seen = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no exec record of {program:?}"
            );
            let Some(record) = ring.next() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            if let Ok(KernelEvent::Exec(exec)) = decode(&record) {
                if Path::new(&exec.filename) == program {
                    break exec;
                }
            }
        };
        assert_eq!(seen.exe_version, Some(expected), "the version stat gives");
    }

    /// A choice that cannot attach is passed over, with its reason, for the
    /// next one; its programs that did attach are detached again.
    #[test]
    fn falls_back_to_the_next_choice_and_says_why() {
        let mut ebpf = load_object();
        const PLAN: SensorPlan = SensorPlan {
            sensor: "exec",
            choices: &[
                HookChoice {
                    name: "a tracepoint this kernel does not have",
                    programs: &[
                        ProgramHook {
                            program: EXEC_PROGRAM,
                            hook: Hook::Tracepoint {
                                category: "sched",
                                name: "sched_process_exec",
                            },
                            optional: false,
                        },
                        ProgramHook {
                            program: EXIT_PROGRAM,
                            hook: Hook::Tracepoint {
                                category: "sched",
                                name: "zt_no_such_tracepoint",
                            },
                            optional: false,
                        },
                    ],
                },
                HookChoice {
                    name: "the real one",
                    programs: &[ProgramHook {
                        program: EXEC_PROGRAM,
                        hook: Hook::Tracepoint {
                            category: "sched",
                            name: "sched_process_exec",
                        },
                        optional: false,
                    }],
                },
            ],
        };
        let targets = AttachTargets {
            btf: None,
            guarded_cgroup: Path::new("/nonexistent"),
        };
        let active = attach_sensor(&mut ebpf, &PLAN, &targets).expect("second choice attaches");
        assert_eq!(active.hook, "the real one");
        assert_eq!(active.programs, 1);
        assert_eq!(active.passed_over.len(), 1);
        let (passed, reason) = &active.passed_over[0];
        assert_eq!(*passed, "a tracepoint this kernel does not have");
        assert!(reason.contains(EXIT_PROGRAM), "{reason}");
    }

    #[test]
    fn a_sensor_with_no_working_choice_reports_every_failure() {
        let mut ebpf = load_object();
        let targets = AttachTargets {
            btf: None,
            guarded_cgroup: Path::new("/nonexistent/cgroup"),
        };
        let dns = SENSOR_PLANS
            .iter()
            .find(|plan| plan.sensor == "dns")
            .expect("dns sensor");
        let failures = attach_sensor(&mut ebpf, dns, &targets).expect_err("no such cgroup");
        assert_eq!(failures.len(), dns.choices.len());
        assert!(
            failures[0].1.contains("/nonexistent/cgroup"),
            "{failures:?}"
        );

        let creds = SENSOR_PLANS
            .iter()
            .find(|plan| plan.sensor == "creds")
            .expect("creds sensor");
        // Without BTF the fentry choice cannot load; the tracepoints can.
        let active = attach_sensor(&mut ebpf, creds, &targets).expect("tracepoints attach");
        assert_eq!(active.passed_over.len(), 1);
        assert!(active.passed_over[0].1.contains("BTF"), "{active:?}");
        assert_eq!(active.programs, 12);
    }
}
