//! Process lifecycle: creation (`task/task_newtask`, in the parent) and end
//! (`sched/sched_process_exit`, once the last thread of a process exits).

use agent_common::{
    DropReason, EventKind, ExitEvent, ForkEvent, CLONE_THREAD, FLAG_PPID_UNKNOWN,
    FLAG_START_UNKNOWN, OPT_EXIT_GROUP_DEAD,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns},
    },
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    maps::{count_drop, inherit_binary, kernel_offsets, CRITICAL_EVENTS},
    task::Task,
};

/// `pid` of the new task in the `task_newtask` record (stable ABI).
const TP_NEWTASK_PID: usize = 8;

#[tracepoint(category = "task", name = "task_newtask")]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    try_task_newtask(&ctx).unwrap_or(1)
}

fn try_task_newtask(ctx: &TracePointContext) -> Result<u32, i64> {
    let offsets = kernel_offsets();
    // SAFETY: in-bounds field of the tracepoint record (offset from its format).
    let clone_flags: u64 = unsafe { ctx.read_at(offsets.tp_newtask_clone_flags as usize) }?;
    if clone_flags & CLONE_THREAD != 0 {
        return Ok(0);
    }
    // SAFETY: as above.
    let child_pid: i32 = unsafe { ctx.read_at(TP_NEWTASK_PID) }?;
    let pid_tgid = bpf_get_current_pid_tgid();
    inherit_binary((pid_tgid >> 32) as u32, child_pid as u32);
    let uid_gid = bpf_get_current_uid_gid();
    let event = ForkEvent {
        header: agent_common::EventHeader {
            kind: EventKind::Fork as u32,
            flags: 0,
            // SAFETY: helper without arguments.
            boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        },
        parent_pid: (pid_tgid >> 32) as u32,
        parent_tid: pid_tgid as u32,
        child_pid: child_pid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        _reserved: 0,
        clone_flags,
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    };
    if CRITICAL_EVENTS.output::<ForkEvent>(&event, 0).is_err() {
        count_drop(DropReason::CriticalRingFull);
    }
    Ok(0)
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    try_sched_process_exit(&ctx).unwrap_or(1)
}

fn try_sched_process_exit(ctx: &TracePointContext) -> Result<u32, i64> {
    let offsets = kernel_offsets();
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    let task = Task::current();

    // Only the end of the whole process is an event, not each thread's.
    let group_dead = if offsets.optional & OPT_EXIT_GROUP_DEAD != 0 {
        // SAFETY: in-bounds field of the tracepoint record.
        unsafe { ctx.read_at::<u8>(offsets.tp_exit_group_dead as usize) }? != 0
    } else if offsets.valid != 0 {
        task.group_dead(&offsets).unwrap_or(pid == tid)
    } else {
        pid == tid
    };
    if !group_dead {
        return Ok(0);
    }

    let uid_gid = bpf_get_current_uid_gid();
    let mut flags = 0;
    let (ppid, exit_code, start_boot_ns) = if offsets.valid != 0 {
        let ppid = task.ppid(&offsets);
        let start = task
            .group_leader(&offsets)
            .and_then(|leader| leader.start_boot_ns(&offsets));
        if ppid.is_none() {
            flags |= FLAG_PPID_UNKNOWN;
        }
        if start.is_none() {
            flags |= FLAG_START_UNKNOWN;
        }
        (
            ppid.unwrap_or(0),
            task.exit_code(&offsets).unwrap_or(0),
            start.unwrap_or(0),
        )
    } else {
        flags |= FLAG_PPID_UNKNOWN | FLAG_START_UNKNOWN;
        (0, 0, 0)
    };
    let event = ExitEvent {
        header: agent_common::EventHeader {
            kind: EventKind::Exit as u32,
            flags,
            // SAFETY: helper without arguments.
            boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        },
        pid,
        tid,
        ppid,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        exit_code,
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        start_boot_ns,
    };
    if CRITICAL_EVENTS.output::<ExitEvent>(&event, 0).is_err() {
        count_drop(DropReason::CriticalRingFull);
    }
    Ok(0)
}
