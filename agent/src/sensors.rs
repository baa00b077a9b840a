//! Loads the agent's kernel programs, attaches the sensors this kernel
//! supports, and turns ring-buffer records into events for the uplink.

use std::{path::Path, sync::Arc, time::Duration};

use agent_common::{
    KernelOffsets, CRITICAL_EVENTS_MAP, DROP_COUNTERS_MAP, EXEC_PROGRAM, KERNEL_OFFSETS_GLOBAL,
};
use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use proto::telemetry::{event::Kind, Event, ProcessExec as WireExec};
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    clock::BootClock,
    event::{decode, KernelEvent, ProcessExec},
    kernel_offsets::{self, VMLINUX_BTF},
    metrics::AgentMetrics,
    sysfs,
};

/// The compiled `agent-ebpf` object, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

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
}

/// The loaded programs. Dropping it detaches every program and frees the
/// maps; the reader task ends with it.
pub struct KernelSensors {
    _ebpf: Ebpf,
    reader: JoinHandle<()>,
    drop_watch: JoinHandle<()>,
}

impl Drop for KernelSensors {
    fn drop(&mut self) {
        self.reader.abort();
        self.drop_watch.abort();
    }
}

/// Sequence numbers of events, per agent run and boot.
#[derive(Debug, Default)]
pub struct Sequencer(u64);

impl Sequencer {
    fn next(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}

impl KernelSensors {
    /// Loads and attaches the sensors and starts delivering events to `out`.
    pub fn start(
        out: mpsc::Sender<Event>,
        metrics: Arc<AgentMetrics>,
        sequencer: Sequencer,
    ) -> Result<Self, SensorError> {
        sysfs::ensure_mounted("tracefs", Path::new("/sys/kernel/tracing")).map_err(|source| {
            SensorError::Mount {
                what: "tracefs",
                source,
            }
        })?;
        raise_memlock_limit();

        let offsets = match kernel_offsets::resolve_from_file(Path::new(VMLINUX_BTF)) {
            Ok(offsets) => offsets,
            Err(err) => {
                warn!(error = %err, "kernel structure offsets unknown: exec events will lack ppid and argv");
                KernelOffsets::default()
            }
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(KERNEL_OFFSETS_GLOBAL, &offsets, true)
            .load(EBPF_OBJECT)?;

        let program: &mut TracePoint = ebpf
            .program_mut(EXEC_PROGRAM)
            .ok_or(SensorError::Missing(EXEC_PROGRAM))?
            .try_into()
            .map_err(|source| SensorError::Program {
                program: EXEC_PROGRAM,
                source,
            })?;
        program.load().map_err(|source| SensorError::Program {
            program: EXEC_PROGRAM,
            source,
        })?;
        program
            .attach("sched", "sched_process_exec")
            .map_err(|source| SensorError::Program {
                program: EXEC_PROGRAM,
                source,
            })?;
        info!(
            sensor = "exec",
            hook = "tracepoint sched/sched_process_exec",
            "sensor active"
        );

        let ring = RingBuf::try_from(
            ebpf.take_map(CRITICAL_EVENTS_MAP)
                .ok_or(SensorError::Missing(CRITICAL_EVENTS_MAP))?,
        )
        .map_err(|source| SensorError::Map {
            map: CRITICAL_EVENTS_MAP,
            source,
        })?;
        // SAFETY: the ring buffer owns its fd and the AsyncFd owns the ring
        // buffer, so the fd stays open for as long as it is registered.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| SensorError::Poll(e.into()))?;
        let drops: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
            ebpf.take_map(DROP_COUNTERS_MAP)
                .ok_or(SensorError::Missing(DROP_COUNTERS_MAP))?,
        )
        .map_err(|source| SensorError::Map {
            map: DROP_COUNTERS_MAP,
            source,
        })?;

        let reader = tokio::spawn(read_ring(ring, out, metrics.clone(), sequencer));
        let drop_watch = tokio::spawn(watch_drops(drops, metrics));
        Ok(Self {
            _ebpf: ebpf,
            reader,
            drop_watch,
        })
    }
}

async fn read_ring(
    mut ring: AsyncFd<RingBuf<MapData>>,
    out: mpsc::Sender<Event>,
    metrics: Arc<AgentMetrics>,
    mut sequencer: Sequencer,
) {
    let mut batch = Vec::with_capacity(256);
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(guard) => guard,
            Err(err) => {
                warn!(error = %err, "ring buffer poll failed; exec sensor stopped");
                return;
            }
        };
        let clock = BootClock::sample();
        let ring_buf = guard.get_inner_mut();
        while let Some(record) = ring_buf.next() {
            AgentMetrics::add(&metrics.kernel_records, 1);
            match decode(&record) {
                Ok(event) => batch.push(to_wire(event, clock, sequencer.next())),
                Err(err) => {
                    AgentMetrics::add(&metrics.decode_errors, 1);
                    warn!(error = %err, "discarding undecodable kernel record");
                }
            }
        }
        guard.clear_ready();
        for event in batch.drain(..) {
            if out.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// Sums the kernel's per-CPU drop counters every second and reports growth.
async fn watch_drops(drops: PerCpuArray<MapData, u64>, metrics: Arc<AgentMetrics>) {
    let mut reported = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Ok(values) = drops.get(&0, 0) else {
            continue;
        };
        let total: u64 = values.iter().sum();
        if total > reported {
            warn!(
                lost = total - reported,
                lost_total = total,
                "kernel ring buffer full: events lost"
            );
            AgentMetrics::add(&metrics.kernel_drops, total - reported);
            reported = total;
        }
    }
}

fn to_wire(event: KernelEvent, clock: BootClock, seq: u64) -> Event {
    match event {
        KernelEvent::Exec(exec) => {
            let ProcessExec {
                boot_ns,
                pid,
                tid,
                ppid,
                uid,
                gid,
                cgroup_id,
                filename,
                argv,
                argv_truncated,
                filename_truncated,
                ppid_unknown,
            } = exec;
            Event {
                seq,
                time_unix_ns: clock.to_unix_ns(boot_ns),
                kind: Some(Kind::Exec(WireExec {
                    pid,
                    tid,
                    ppid,
                    uid,
                    gid,
                    cgroup_id,
                    filename,
                    argv,
                    argv_truncated,
                    filename_truncated,
                    ppid_unknown,
                })),
            }
        }
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
