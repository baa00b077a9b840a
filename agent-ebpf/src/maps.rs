//! Maps and globals shared by every program of the object.

use agent_common::{
    CredIds, DropReason, FileEvent, InodeKey, KernelOffsets, SocketOwner, WatchPrefix,
    BINARY_INODES_CAPACITY, BULK_RING_BYTES, CRITICAL_RING_BYTES, DROP_REASONS,
    FILE_WATCH_CAPACITY, PROCESS_BINARIES_CAPACITY,
};
use aya_ebpf::{
    helpers::generated::bpf_get_prandom_u32,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};

#[map(name = "CRITICAL_EVENTS")]
pub static CRITICAL_EVENTS: RingBuf = RingBuf::with_byte_size(CRITICAL_RING_BYTES, 0);

#[map(name = "DROP_COUNTERS")]
pub static DROP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASONS, 0);

/// Set by user space at load time from the running kernel's BTF.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    valid: 0,
    optional: 0,
    task_real_parent: 0,
    task_tgid: 0,
    task_mm: 0,
    mm_arg_start: 0,
    mm_arg_end: 0,
    task_cred: 0,
    cred_uid: 0,
    cred_gid: 0,
    cred_euid: 0,
    cred_egid: 0,
    task_exit_code: 0,
    task_start_boottime: 0,
    task_signal: 0,
    signal_live: 0,
    task_loginuid: 0,
    tp_exit_group_dead: 0,
    tp_newtask_clone_flags: 0,
    task_group_leader: 0,
    tcp_bytes_sent: 0,
    tcp_bytes_received: 0,
    sock_shutdown: 0,
    mm_exe_file: 0,
    file_inode: 0,
    inode_ino: 0,
    inode_sb: 0,
    sb_dev: 0,
    inode_size: 0,
    inode_mtime_sec: 0,
    inode_mtime_nsec: 0,
};

#[inline(always)]
pub fn kernel_offsets() -> KernelOffsets {
    // SAFETY: a global in .rodata; volatile so that the compiler does not fold
    // the zero initialiser into the code.
    unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) }
}

/// True when the agent's self-budget samples bulk events and this one is
/// not kept; the loss is counted (and reported as a gap record).
#[inline(always)]
pub fn bulk_sampled_out() -> bool {
    let keep_one_in = BULK_SAMPLING.get(0).copied().unwrap_or(0);
    // SAFETY: helper without arguments.
    if keep_one_in > 1 && unsafe { bpf_get_prandom_u32() } % keep_one_in != 0 {
        count_drop(DropReason::BulkSampled);
        return true;
    }
    false
}

#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(counter) = DROP_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

/// Owners of live TCP sockets by `struct sock` address (see `net.rs`).
#[map(name = "TCP_SOCKETS")]
pub static TCP_SOCKETS: LruHashMap<u64, SocketOwner> = LruHashMap::with_max_entries(65_536, 0);

/// Owners of listening TCP sockets by local port.
#[map(name = "TCP_LISTENERS")]
pub static TCP_LISTENERS: LruHashMap<u32, SocketOwner> = LruHashMap::with_max_entries(4_096, 0);

/// Ring buffer for bulk events (file activity), apart from critical ones.
#[map(name = "BULK_EVENTS")]
pub static BULK_EVENTS: RingBuf = RingBuf::with_byte_size(BULK_RING_BYTES, 0);

/// Keep 1 in N bulk events (0 or 1: all); written by the agent's self-budget.
#[map(name = "BULK_SAMPLING")]
pub static BULK_SAMPLING: Array<u32> = Array::with_max_entries(1, 0);

/// Watched path prefixes, filled by user space; the list ends at `len == 0`.
#[map(name = "FILE_WATCH")]
pub static FILE_WATCH: Array<WatchPrefix> = Array::with_max_entries(FILE_WATCH_CAPACITY, 0);

/// Per-CPU scratch space where a file event is built before it is known to
/// be watched (too big for the 512-byte stack).
#[map(name = "FILE_SCRATCH")]
pub static FILE_SCRATCH: PerCpuArray<FileEvent> = PerCpuArray::with_max_entries(1, 0);

/// Ids of a task between entry and exit of a setuid-family call.
#[map(name = "CRED_PENDING")]
pub static CRED_PENDING: LruHashMap<u64, CredIds> = LruHashMap::with_max_entries(16_384, 0);

/// Executables of the policy's binary groups, by inode (filled by the
/// agent from policy).
#[map(name = "BINARY_INODES")]
pub static BINARY_INODES: HashMap<InodeKey, u64> =
    HashMap::with_max_entries(BINARY_INODES_CAPACITY, 0);

/// Binary-group bits of each process (tgid), for the connection guard.
#[map(name = "PROCESS_BINARIES")]
pub static PROCESS_BINARIES: LruHashMap<u32, u64> =
    LruHashMap::with_max_entries(PROCESS_BINARIES_CAPACITY, 0);

/// At exec: the new program's binary-group bits, or none.
#[inline(always)]
pub fn note_binary(tgid: u32, exe: Option<(u32, u64)>) {
    let bits = exe.and_then(|(dev, ino)| {
        let key = InodeKey {
            dev: u64::from(dev),
            ino,
        };
        // SAFETY: the value is copied out at once.
        unsafe { BINARY_INODES.get(&key) }.copied()
    });
    match bits {
        Some(bits) if bits != 0 => {
            let _ = PROCESS_BINARIES.insert(&tgid, &bits, 0);
        }
        _ => {
            let _ = PROCESS_BINARIES.remove(&tgid);
        }
    }
}

/// At fork: the child runs its parent's program.
#[inline(always)]
pub fn inherit_binary(parent: u32, child: u32) {
    // SAFETY: the value is copied out at once.
    match unsafe { PROCESS_BINARIES.get(&parent) }.copied() {
        Some(bits) => {
            let _ = PROCESS_BINARIES.insert(&child, &bits, 0);
        }
        None => {
            let _ = PROCESS_BINARIES.remove(&child);
        }
    }
}
