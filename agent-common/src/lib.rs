//! Types shared by the agent's kernel programs (`agent-ebpf`) and its user
//! space (`agent`): the wire layout of every event the kernel emits, the
//! values of its maps and globals, and their names.
//!
//! Everything here is `#[repr(C)]`, has no implicit padding (checked at compile
//! time below), and is read by user space straight out of ring-buffer memory.
//! Event kind ids are never reused: a retired kind keeps its number.
#![no_std]

use core::mem::{align_of, size_of};

/// Ring buffer for critical events (exec, exit, connect, verdicts): never
/// sampled, sized so that bursts fit.
pub const CRITICAL_EVENTS_MAP: &str = "CRITICAL_EVENTS";
/// Per-CPU counters of events the kernel could not deliver, indexed by
/// [`DropReason`].
pub const DROP_COUNTERS_MAP: &str = "DROP_COUNTERS";
/// Read-only global holding the [`KernelOffsets`] user space resolved from BTF.
pub const KERNEL_OFFSETS_GLOBAL: &str = "KERNEL_OFFSETS";
/// Name of the exec tracepoint program in the object file.
pub const EXEC_PROGRAM: &str = "sched_process_exec";

/// Bytes of the size of the critical ring buffer (power of two, page multiple).
pub const CRITICAL_RING_BYTES: u32 = 8 * 1024 * 1024;

/// Longest filename (as passed to execve) carried in an event, NUL included.
pub const FILENAME_CAPACITY: usize = 512;
/// Bytes of the argument area (`argv` joined by NULs) carried in an event.
/// A power of two, so the kernel side can bound a length with a mask.
pub const ARGS_CAPACITY: usize = 4096;

/// What an event is. Ids are stable on the wire and never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Exec = 1,
}

impl EventKind {
    pub const fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Exec),
            _ => None,
        }
    }
}

/// Why the kernel lost an event; the index into [`DROP_COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// `bpf_ringbuf_reserve` failed: the critical ring buffer was full.
    CriticalRingFull = 0,
}

/// Number of entries of the drop-counter map.
pub const DROP_REASONS: u32 = 1;

/// Common prefix of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] id.
    pub kind: u32,
    /// Bit set of `FLAG_*` values describing partial data.
    pub flags: u32,
    /// `bpf_ktime_get_boot_ns()` at the event: nanoseconds since boot,
    /// suspend included.
    pub boot_ns: u64,
}

/// `argv` did not fit in [`ARGS_CAPACITY`] bytes and was cut.
pub const FLAG_ARGS_TRUNCATED: u32 = 1 << 0;
/// The filename did not fit in [`FILENAME_CAPACITY`] bytes and was cut.
pub const FLAG_FILENAME_TRUNCATED: u32 = 1 << 1;
/// The parent could not be read (offsets unknown on this kernel).
pub const FLAG_PPID_UNKNOWN: u32 = 1 << 2;
/// The argument area could not be read.
pub const FLAG_ARGS_UNREADABLE: u32 = 1 << 3;

/// A successful `execve`/`execveat`, emitted from `sched/sched_process_exec`
/// in the context of the new program.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// Thread-group id (the process id users see).
    pub pid: u32,
    /// Thread id of the exec'ing thread before exec (`old_pid`).
    pub tid: u32,
    /// Thread-group id of `real_parent`.
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Valid bytes of `filename`, NUL excluded.
    pub filename_len: u32,
    /// cgroup v2 id (the inode number of the cgroup directory).
    pub cgroup_id: u64,
    /// Valid bytes of `args`.
    pub args_len: u32,
    pub _reserved: u32,
    /// The path given to execve, NUL-terminated.
    pub filename: [u8; FILENAME_CAPACITY],
    /// The new program's argument area: `argv` strings, each NUL-terminated.
    pub args: [u8; ARGS_CAPACITY],
}

/// Byte offsets inside kernel structures, resolved by user space from the
/// running kernel's BTF and handed to the programs as a read-only global. A
/// zero `valid` means the programs must not follow kernel pointers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub valid: u32,
    pub task_real_parent: u32,
    pub task_tgid: u32,
    pub task_mm: u32,
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
}

// Wire layout is part of the contract between kernel and user space: fixed
// sizes, no implicit padding.
const _: () = assert!(size_of::<EventHeader>() == 16);
const _: () = assert!(align_of::<EventHeader>() == 8);
const _: () =
    assert!(size_of::<ExecEvent>() == 16 + 6 * 4 + 8 + 8 + FILENAME_CAPACITY + ARGS_CAPACITY);
const _: () = assert!(size_of::<KernelOffsets>() == 24);
const _: () = assert!(ARGS_CAPACITY.is_power_of_two());
const _: () = assert!(FILENAME_CAPACITY.is_power_of_two());

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `#[repr(C)]`, no padding (asserted above).
    unsafe impl aya::Pod for super::KernelOffsets {}
}
