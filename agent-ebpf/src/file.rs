//! File activity on watched paths, at the system call (`syscalls/sys_enter_*`
//! tracepoints): opens, unlink, rename, chmod. The path is read into per-CPU
//! scratch space and compared with the watch prefixes in the kernel, so
//! unwatched activity costs a string copy and a few compares and never
//! reaches the ring buffer. Matching events go to the bulk ring buffer.

use agent_common::{
    DropReason, EventKind, FileAction, FileEvent, FILE_WATCH_CAPACITY, FLAG_PATH_TRUNCATED,
    PATH_CAPACITY, PREFIX_CAPACITY, WATCH_READ, WATCH_WRITE,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns, bpf_probe_read_user_str},
    },
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::maps::{bulk_sampled_out, count_drop, BULK_EVENTS, FILE_SCRATCH, FILE_WATCH};

/// Syscall arguments start at offset 16 of the record, 8 bytes each.
const fn arg(n: usize) -> usize {
    16 + 8 * n
}

const O_ACCMODE: u64 = 0o3;
const O_CREAT: u64 = 0o100;
const O_TRUNC: u64 = 0o1000;

/// Where a syscall keeps the arguments the sensor needs.
#[derive(Clone, Copy)]
struct Args {
    path: usize,
    target: Option<usize>,
    flags: Option<usize>,
    mode: Option<usize>,
}

#[tracepoint(category = "syscalls", name = "sys_enter_openat")]
pub fn sys_enter_openat(ctx: TracePointContext) -> u32 {
    handle_open(
        &ctx,
        Args {
            path: arg(1),
            target: None,
            flags: Some(arg(2)),
            mode: Some(arg(3)),
        },
    )
}

#[tracepoint(category = "syscalls", name = "sys_enter_open")]
pub fn sys_enter_open(ctx: TracePointContext) -> u32 {
    handle_open(
        &ctx,
        Args {
            path: arg(0),
            target: None,
            flags: Some(arg(1)),
            mode: Some(arg(2)),
        },
    )
}

#[tracepoint(category = "syscalls", name = "sys_enter_creat")]
pub fn sys_enter_creat(ctx: TracePointContext) -> u32 {
    // creat(path, mode) is open(path, O_CREAT|O_WRONLY|O_TRUNC, mode).
    handle(
        &ctx,
        FileAction::OpenWrite,
        Args {
            path: arg(0),
            target: None,
            flags: None,
            mode: Some(arg(1)),
        },
    )
}

#[tracepoint(category = "syscalls", name = "sys_enter_unlinkat")]
pub fn sys_enter_unlinkat(ctx: TracePointContext) -> u32 {
    handle(
        &ctx,
        FileAction::Unlink,
        Args {
            path: arg(1),
            target: None,
            flags: None,
            mode: None,
        },
    )
}

#[tracepoint(category = "syscalls", name = "sys_enter_unlink")]
pub fn sys_enter_unlink(ctx: TracePointContext) -> u32 {
    handle(
        &ctx,
        FileAction::Unlink,
        Args {
            path: arg(0),
            target: None,
            flags: None,
            mode: None,
        },
    )
}

#[tracepoint(category = "syscalls", name = "sys_enter_renameat2")]
pub fn sys_enter_renameat2(ctx: TracePointContext) -> u32 {
    handle(
        &ctx,
        FileAction::Rename,
        Args {
            path: arg(1),
            target: Some(arg(3)),
            flags: None,
            mode: None,
        },
    )
}

#[tracepoint(category = "syscalls", name = "sys_enter_renameat")]
pub fn sys_enter_renameat(ctx: TracePointContext) -> u32 {
    handle(
        &ctx,
        FileAction::Rename,
        Args {
            path: arg(1),
            target: Some(arg(3)),
            flags: None,
            mode: None,
        },
    )
}

#[tracepoint(category = "syscalls", name = "sys_enter_rename")]
pub fn sys_enter_rename(ctx: TracePointContext) -> u32 {
    handle(
        &ctx,
        FileAction::Rename,
        Args {
            path: arg(0),
            target: Some(arg(1)),
            flags: None,
            mode: None,
        },
    )
}

#[tracepoint(category = "syscalls", name = "sys_enter_fchmodat")]
pub fn sys_enter_fchmodat(ctx: TracePointContext) -> u32 {
    handle(
        &ctx,
        FileAction::Chmod,
        Args {
            path: arg(1),
            target: None,
            flags: None,
            mode: Some(arg(2)),
        },
    )
}

#[tracepoint(category = "syscalls", name = "sys_enter_chmod")]
pub fn sys_enter_chmod(ctx: TracePointContext) -> u32 {
    handle(
        &ctx,
        FileAction::Chmod,
        Args {
            path: arg(0),
            target: None,
            flags: None,
            mode: Some(arg(1)),
        },
    )
}

#[inline(always)]
fn handle_open(ctx: &TracePointContext, args: Args) -> u32 {
    let flags: u64 = args
        .flags
        // SAFETY: in-bounds argument slot of the record.
        .and_then(|at| unsafe { ctx.read_at(at) }.ok())
        .unwrap_or(0);
    let writes = flags & O_ACCMODE != 0 || flags & (O_CREAT | O_TRUNC) != 0;
    let action = if writes {
        FileAction::OpenWrite
    } else {
        FileAction::OpenRead
    };
    handle(ctx, action, args)
}

#[inline(always)]
fn handle(ctx: &TracePointContext, action: FileAction, args: Args) -> u32 {
    try_handle(ctx, action, args).unwrap_or(1)
}

#[inline(always)]
fn try_handle(ctx: &TracePointContext, action: FileAction, args: Args) -> Result<u32, i64> {
    let Some(event) = FILE_SCRATCH.get_ptr_mut(0) else {
        return Ok(0);
    };
    // SAFETY: this CPU's scratch slot; programs do not nest on one CPU for
    // syscall entry tracepoints.
    let event = unsafe { &mut *event };
    let want = match action {
        FileAction::OpenRead => WATCH_READ,
        _ => WATCH_WRITE,
    };

    event.header.flags = 0;
    event.path_len = read_path(ctx, args.path, &mut event.path, &mut event.header.flags)?;
    let mut watched = event.path_len > 0 && event.path[0] == b'/' && matches(&event.path, want);
    event.target_len = 0;
    if let Some(target) = args.target {
        event.target_len = read_path(ctx, target, &mut event.target, &mut event.header.flags)?;
        watched = watched
            || (event.target_len > 0 && event.target[0] == b'/' && matches(&event.target, want));
    }
    if !watched {
        return Ok(0);
    }
    // Under the agent's self-budget, keep 1 in N (counted, reported as gaps).
    if bulk_sampled_out() {
        return Ok(0);
    }

    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    event.header.kind = EventKind::File as u32;
    // SAFETY: helpers without arguments.
    event.header.boot_ns = unsafe { bpf_ktime_get_boot_ns() };
    event.action = action as u32;
    event.pid = (pid_tgid >> 32) as u32;
    event.uid = uid_gid as u32;
    event.gid = (uid_gid >> 32) as u32;
    // SAFETY: as above.
    event.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY (both): in-bounds argument slots of the record.
    event.open_flags = args
        .flags
        .and_then(|at| unsafe { ctx.read_at::<u64>(at) }.ok())
        .unwrap_or(0) as u32;
    event.mode = args
        .mode
        .and_then(|at| unsafe { ctx.read_at::<u64>(at) }.ok())
        .unwrap_or(0) as u32;
    if matches!(action, FileAction::OpenWrite) && args.flags.is_none() {
        // creat(2)
        event.open_flags = (O_CREAT | O_TRUNC | 1) as u32;
    } else if args.flags.is_some() && u64::from(event.open_flags) & O_CREAT == 0 {
        // open(2) reads its mode argument only when it creates.
        event.mode = 0;
    }
    if BULK_EVENTS.output::<FileEvent>(event, 0).is_err() {
        count_drop(DropReason::BulkRingFull);
    }
    Ok(0)
}

/// Copies the user string at argument `at` into `buf`; returns its length
/// without NUL (0 when unreadable). Only absolute paths are matched against
/// the watch list; a relative one is still carried (e.g. the source of a
/// rename into a watched place).
#[inline(always)]
fn read_path(
    ctx: &TracePointContext,
    at: usize,
    buf: &mut [u8; PATH_CAPACITY],
    flags: &mut u32,
) -> Result<u32, i64> {
    // SAFETY: in-bounds argument slot of the record.
    let ptr: u64 = unsafe { ctx.read_at(at) }?;
    buf[0] = 0;
    // SAFETY: the helper bounds the copy to the buffer's size.
    let n = unsafe {
        bpf_probe_read_user_str(
            buf.as_mut_ptr().cast(),
            PATH_CAPACITY as u32,
            ptr as *const _,
        )
    };
    if n <= 1 {
        return Ok(0);
    }
    if n as usize >= PATH_CAPACITY {
        *flags |= FLAG_PATH_TRUNCATED;
    }
    Ok((n - 1) as u32)
}

/// Whether `path` starts with a watch prefix of kind `want`.
#[inline(always)]
fn matches(path: &[u8; PATH_CAPACITY], want: u32) -> bool {
    for i in 0..FILE_WATCH_CAPACITY {
        let Some(prefix) = FILE_WATCH.get(i) else {
            return false;
        };
        if prefix.len == 0 {
            return false;
        }
        if prefix.kinds & want == 0 {
            continue;
        }
        let mut equal = true;
        for j in 0..PREFIX_CAPACITY {
            if j as u32 >= prefix.len {
                break;
            }
            if path[j] != prefix.bytes[j] {
                equal = false;
                break;
            }
        }
        if equal {
            return true;
        }
    }
    false
}
