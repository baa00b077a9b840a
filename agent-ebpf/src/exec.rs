//! Process execution: `sched/sched_process_exec`, in the context of the new
//! program, after the point of no return of exec.

use agent_common::{
    DropReason, EventKind, ExecEvent, KernelOffsets, ARGS_CAPACITY, FILENAME_CAPACITY,
    FLAG_ARGS_TRUNCATED, FLAG_ARGS_UNREADABLE, FLAG_CREDS_UNKNOWN, FLAG_EXE_VERSION_UNKNOWN,
    FLAG_FILENAME_TRUNCATED, FLAG_LOGINUID_UNKNOWN, FLAG_PPID_UNKNOWN, FLAG_START_UNKNOWN,
    LOGINUID_UNSET,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_kernel,
        generated::{
            bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns, bpf_probe_read_kernel_str,
            bpf_probe_read_user,
        },
    },
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext,
};

use crate::{
    maps::{count_drop, kernel_offsets, note_binary, CRITICAL_EVENTS},
    task::Task,
};

/// Offsets in the tracepoint record (see its `format` file; stable ABI).
const TP_FILENAME_LOC: usize = 8;
const TP_OLD_PID: usize = 16;

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    try_sched_process_exec(&ctx).unwrap_or(1)
}

fn try_sched_process_exec(ctx: &TracePointContext) -> Result<u32, i64> {
    // The connection guard's binary groups follow the program, whether or
    // not the event finds room in the ring.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    note_binary(tgid, Task::current().exe_inode(&kernel_offsets()));
    let Some(mut entry) = CRITICAL_EVENTS.reserve::<ExecEvent>(0) else {
        count_drop(DropReason::CriticalRingFull);
        return Ok(0);
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to reserved ring-buffer memory of the right size;
    // every field is written before submit.
    unsafe {
        fill(ctx, &mut *event);
    }
    entry.submit(0);
    Ok(0)
}

#[inline(always)]
unsafe fn fill(ctx: &TracePointContext, event: &mut ExecEvent) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let mut flags = 0u32;

    event.header.kind = EventKind::Exec as u32;
    event.header.boot_ns = unsafe { bpf_ktime_get_boot_ns() };
    event.pid = (pid_tgid >> 32) as u32;
    event.tid = unsafe { ctx.read_at::<i32>(TP_OLD_PID) }.unwrap_or(0) as u32;
    event.uid = uid_gid as u32;
    event.gid = (uid_gid >> 32) as u32;
    event.cgroup_id = unsafe { bpf_get_current_cgroup_id() };

    // Filename: a __data_loc field, (length << 16 | offset) into the record.
    event.filename[0] = 0;
    event.filename_len = 0;
    if let Ok(loc) = unsafe { ctx.read_at::<u32>(TP_FILENAME_LOC) } {
        let src = unsafe { (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize) };
        let n = unsafe {
            bpf_probe_read_kernel_str(
                event.filename.as_mut_ptr().cast(),
                FILENAME_CAPACITY as u32,
                src.cast(),
            )
        };
        if n > 0 {
            event.filename_len = (n - 1) as u32;
            if (loc >> 16) as usize > FILENAME_CAPACITY {
                flags |= FLAG_FILENAME_TRUNCATED;
            }
        }
    }

    let offsets = kernel_offsets();
    event.ppid = 0;
    event.args_len = 0;
    event.euid = event.uid;
    event.egid = event.gid;
    event.loginuid = LOGINUID_UNSET;
    event.start_boot_ns = 0;
    event.exe_ino = 0;
    event.exe_size = 0;
    event.exe_mtime_sec = 0;
    event.exe_dev = 0;
    event.exe_mtime_nsec = 0;
    if offsets.valid == 0 {
        flags |= FLAG_EXE_VERSION_UNKNOWN
            | FLAG_PPID_UNKNOWN
            | FLAG_ARGS_UNREADABLE
            | FLAG_CREDS_UNKNOWN
            | FLAG_LOGINUID_UNKNOWN
            | FLAG_START_UNKNOWN;
    } else {
        let task = Task::current();
        match task.ppid(&offsets) {
            Some(ppid) => event.ppid = ppid,
            None => flags |= FLAG_PPID_UNKNOWN,
        }
        match task.effective_ids(&offsets) {
            Some((euid, egid)) => (event.euid, event.egid) = (euid, egid),
            None => flags |= FLAG_CREDS_UNKNOWN,
        }
        match task.loginuid(&offsets) {
            Some(loginuid) => event.loginuid = loginuid,
            None => flags |= FLAG_LOGINUID_UNKNOWN,
        }
        // After exec the thread carries its group's start time (de_thread).
        match task.start_boot_ns(&offsets) {
            Some(start) => event.start_boot_ns = start,
            None => flags |= FLAG_START_UNKNOWN,
        }
        match task.exe_version(&offsets) {
            Some((dev, ino, size, mtime_sec, mtime_nsec)) => {
                event.exe_dev = dev;
                event.exe_ino = ino;
                event.exe_size = size;
                event.exe_mtime_sec = mtime_sec;
                event.exe_mtime_nsec = mtime_nsec;
            }
            None => flags |= FLAG_EXE_VERSION_UNKNOWN,
        }
        flags |= unsafe { read_args(task, &offsets, event) };
    }
    event.header.flags = flags;
}

/// Copies the new program's argument area; returns flags to set.
#[inline(always)]
unsafe fn read_args(task: Task, offsets: &KernelOffsets, event: &mut ExecEvent) -> u32 {
    let Some(mm) = task.mm(offsets) else {
        return FLAG_ARGS_UNREADABLE;
    };
    let start: Result<u64, _> =
        unsafe { bpf_probe_read_kernel(mm.add(offsets.mm_arg_start as usize) as *const u64) };
    let end: Result<u64, _> =
        unsafe { bpf_probe_read_kernel(mm.add(offsets.mm_arg_end as usize) as *const u64) };
    let (Ok(start), Ok(end)) = (start, end) else {
        return FLAG_ARGS_UNREADABLE;
    };
    if end <= start {
        return 0;
    }
    let mut flags = 0;
    let mut len = end - start;
    if len > ARGS_CAPACITY as u64 {
        len = ARGS_CAPACITY as u64;
        flags |= FLAG_ARGS_TRUNCATED;
    }
    // Keep the bound visible to the verifier: 1..=ARGS_CAPACITY.
    let len = ((len - 1) & (ARGS_CAPACITY as u64 - 1)) + 1;
    let rc = unsafe {
        bpf_probe_read_user(
            event.args.as_mut_ptr().cast(),
            len as u32,
            start as *const core::ffi::c_void,
        )
    };
    if rc != 0 {
        return flags | FLAG_ARGS_UNREADABLE;
    }
    event.args_len = len as u32;
    flags
}
