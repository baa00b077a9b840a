//! Credential changes, by one of two hooks; the agent attaches the first
//! that loads:
//! - fentry on `commit_creds(new)`, where every change of a task's
//!   credentials passes (setuid family, exec of a set-user-id program,
//!   capset): the ids before are the current task's, the ids after are
//!   `new`'s. Needs BTF-typed programs (fentry), refused by some kernels.
//! - the setuid family's `sys_enter_*`/`sys_exit_*` tracepoints: on entry the
//!   caller's real and effective ids are kept by pid_tgid; on a successful
//!   exit they are compared with the new ones and a change is an event.

use agent_common::{CredEvent, CredIds, CredSyscall, DropReason, EventHeader, EventKind};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns},
    },
    macros::{fentry, tracepoint},
    programs::{FEntryContext, TracePointContext},
};

use crate::{
    maps::{count_drop, kernel_offsets, CRED_PENDING, CRITICAL_EVENTS},
    task::Task,
};

/// `ret` in a `sys_exit_*` record.
const TP_EXIT_RET: usize = 16;

#[inline(always)]
fn current_ids() -> CredIds {
    let uid_gid = bpf_get_current_uid_gid();
    let (uid, gid) = (uid_gid as u32, (uid_gid >> 32) as u32);
    let offsets = kernel_offsets();
    let (euid, egid) = if offsets.valid != 0 {
        Task::current()
            .effective_ids(&offsets)
            .unwrap_or((uid, gid))
    } else {
        (uid, gid)
    };
    CredIds {
        uid,
        euid,
        gid,
        egid,
    }
}

/// Real and effective ids of a `struct cred`.
#[inline(always)]
fn ids_of(cred: *const u8) -> Option<CredIds> {
    let o = kernel_offsets();
    if o.valid == 0 || cred.is_null() {
        return None;
    }
    // SAFETY (all four): probe reads tolerate any address.
    let read = |offset: u32| {
        unsafe { bpf_probe_read_kernel(cred.add(offset as usize) as *const u32) }.ok()
    };
    Some(CredIds {
        uid: read(o.cred_uid)?,
        euid: read(o.cred_euid)?,
        gid: read(o.cred_gid)?,
        egid: read(o.cred_egid)?,
    })
}

#[fentry(function = "commit_creds")]
pub fn fentry_commit_creds(ctx: FEntryContext) -> u32 {
    let new: *const u8 = ctx.arg(0);
    if let Some(new) = ids_of(new) {
        let old = current_ids();
        if new != old {
            emit(CredSyscall::CommitCreds, old, new);
        }
    }
    0
}

#[inline(always)]
fn on_enter() -> u32 {
    let ids = current_ids();
    CRED_PENDING.insert(bpf_get_current_pid_tgid(), ids, 0).ok();
    0
}

#[inline(always)]
fn on_exit(ctx: &TracePointContext, syscall: CredSyscall) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: copied out before removal.
    let old = unsafe { CRED_PENDING.get(pid_tgid) }.copied();
    CRED_PENDING.remove(pid_tgid).ok();
    let Some(old) = old else {
        return 0;
    };
    // SAFETY: in-bounds field of the record.
    let ret: i64 = unsafe { ctx.read_at(TP_EXIT_RET) }.unwrap_or(-1);
    if ret != 0 {
        return 0;
    }
    let new = current_ids();
    if new != old {
        emit(syscall, old, new);
    }
    0
}

#[inline(always)]
fn emit(syscall: CredSyscall, old: CredIds, new: CredIds) {
    let event = CredEvent {
        header: EventHeader {
            kind: EventKind::Creds as u32,
            flags: 0,
            // SAFETY: helper without arguments.
            boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        },
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        syscall: syscall as u32,
        old,
        new,
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    };
    if CRITICAL_EVENTS.output::<CredEvent>(&event, 0).is_err() {
        count_drop(DropReason::CriticalRingFull);
    }
}

macro_rules! cred_hooks {
    ($($enter:ident, $exit:ident, $syscall:expr;)*) => {$(
        #[tracepoint]
        pub fn $enter(_ctx: TracePointContext) -> u32 {
            on_enter()
        }

        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            on_exit(&ctx, $syscall)
        }
    )*};
}

cred_hooks! {
    sys_enter_setuid, sys_exit_setuid, CredSyscall::Setuid;
    sys_enter_setgid, sys_exit_setgid, CredSyscall::Setgid;
    sys_enter_setreuid, sys_exit_setreuid, CredSyscall::Setreuid;
    sys_enter_setregid, sys_exit_setregid, CredSyscall::Setregid;
    sys_enter_setresuid, sys_exit_setresuid, CredSyscall::Setresuid;
    sys_enter_setresgid, sys_exit_setresgid, CredSyscall::Setresgid;
}
