//! Resolves the byte offsets the kernel programs need — inside `task_struct`,
//! `mm_struct`, `cred` and `signal_struct` from the running kernel's BTF, and
//! inside tracepoint records from their tracefs `format` files — so one object
//! file works across kernel builds without compiled-in layouts.

use std::path::Path;

use agent_common::{
    KernelOffsets, OPT_EXE_INODE, OPT_EXE_VERSION, OPT_EXIT_GROUP_DEAD, OPT_LOGINUID, OPT_TCP_BYTES,
};

use crate::kernel_btf::{BtfError, KernelBtf, TypeId};

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    #[error("kernel BTF: {0}")]
    Btf(#[from] BtfError),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(&'static str),
    #[error("kernel BTF: struct {strukt} has no member {member}")]
    NoMember {
        strukt: &'static str,
        member: &'static str,
    },
    #[error("cannot read tracepoint format of {tracepoint}: {source}")]
    Format {
        tracepoint: &'static str,
        source: std::io::Error,
    },
    #[error("tracepoint {tracepoint} has no field {field}")]
    NoField {
        tracepoint: &'static str,
        field: &'static str,
    },
    #[error("kernel BTF: {strukt}.{member} is a bit field")]
    BitField {
        strukt: &'static str,
        member: &'static str,
    },
}

/// Reads BTF from `path` and resolves every offset in [`KernelOffsets`].
pub fn resolve_from_file(path: &Path) -> Result<KernelOffsets, OffsetError> {
    resolve(&KernelBtf::from_file(path)?)
}

/// Resolves the structure offsets of [`KernelOffsets`] from parsed BTF
/// (tracepoint fields are left for [`resolve_tracepoint_fields`]).
pub fn resolve(btf: &KernelBtf) -> Result<KernelOffsets, OffsetError> {
    let task = find_struct(btf, "task_struct")?;
    let mm = find_struct(btf, "mm_struct")?;
    let cred = find_struct(btf, "cred")?;
    let signal = find_struct(btf, "signal_struct")?;
    let task_off = |member| byte_offset(btf, task, "task_struct", member);
    let mut offsets = KernelOffsets {
        valid: 1,
        task_real_parent: task_off("real_parent")?,
        task_tgid: task_off("tgid")?,
        task_mm: task_off("mm")?,
        task_cred: task_off("cred")?,
        task_exit_code: task_off("exit_code")?,
        task_start_boottime: task_off("start_boottime")?,
        task_signal: task_off("signal")?,
        task_group_leader: task_off("group_leader")?,
        mm_arg_start: byte_offset(btf, mm, "mm_struct", "arg_start")?,
        mm_arg_end: byte_offset(btf, mm, "mm_struct", "arg_end")?,
        cred_uid: byte_offset(btf, cred, "cred", "uid")?,
        cred_gid: byte_offset(btf, cred, "cred", "gid")?,
        cred_euid: byte_offset(btf, cred, "cred", "euid")?,
        cred_egid: byte_offset(btf, cred, "cred", "egid")?,
        signal_live: byte_offset(btf, signal, "signal_struct", "live")?,
        ..KernelOffsets::default()
    };
    // Byte counters of closed TCP connections; the programs go without them.
    if let (Ok(tcp), Ok(sock)) = (find_struct(btf, "tcp_sock"), find_struct(btf, "sock")) {
        let sent = byte_offset(btf, tcp, "tcp_sock", "bytes_sent");
        let received = byte_offset(btf, tcp, "tcp_sock", "bytes_received");
        // A byte on current kernels; a bit field before 6.2 (then no counters).
        let shutdown = byte_offset(btf, sock, "sock", "sk_shutdown");
        if let (Ok(sent), Ok(received), Ok(shutdown)) = (sent, received, shutdown) {
            offsets.tcp_bytes_sent = sent;
            offsets.tcp_bytes_received = received;
            offsets.sock_shutdown = shutdown;
            offsets.optional |= OPT_TCP_BYTES;
        }
    }
    // The executable's inode, for binary-group conditions; without them
    // the guard treats every process as in no binary group.
    let exe = (|| -> Result<[u32; 5], OffsetError> {
        let file = find_struct(btf, "file")?;
        let inode = find_struct(btf, "inode")?;
        let sb = find_struct(btf, "super_block")?;
        Ok([
            byte_offset(btf, mm, "mm_struct", "exe_file")?,
            byte_offset(btf, file, "file", "f_inode")?,
            byte_offset(btf, inode, "inode", "i_ino")?,
            byte_offset(btf, inode, "inode", "i_sb")?,
            byte_offset(btf, sb, "super_block", "s_dev")?,
        ])
    })();
    if let Ok([exe_file, f_inode, i_ino, i_sb, s_dev]) = exe {
        offsets.mm_exe_file = exe_file;
        offsets.file_inode = f_inode;
        offsets.inode_ino = i_ino;
        offsets.inode_sb = i_sb;
        offsets.sb_dev = s_dev;
        offsets.optional |= OPT_EXE_INODE;
        // The executable's size and modification time: the exec event
        // carries its file version, the key of the agent's hash cache.
        if let Ok([size, sec, nsec]) = inode_version_offsets(btf) {
            offsets.inode_size = size;
            offsets.inode_mtime_sec = sec;
            offsets.inode_mtime_nsec = nsec;
            offsets.optional |= OPT_EXE_VERSION;
        }
    }
    // Only with CONFIG_AUDIT.
    if let Ok(loginuid) = task_off("loginuid") {
        offsets.task_loginuid = loginuid;
        offsets.optional |= OPT_LOGINUID;
    }
    Ok(offsets)
}

/// Fills the tracepoint-record offsets from the tracefs `format` files.
/// `clone_flags` of `task_newtask` is required (the fork sensor cannot tell
/// threads from processes without it); `group_dead` of `sched_process_exit`
/// exists since 6.16 and otherwise the program reads `signal->live`.
pub fn resolve_tracepoint_fields(
    tracefs: &Path,
    offsets: &mut KernelOffsets,
) -> Result<(), OffsetError> {
    use crate::tracefs_format::{field, read_format};
    let newtask =
        read_format(tracefs, "task", "task_newtask").map_err(|source| OffsetError::Format {
            tracepoint: "task/task_newtask",
            source,
        })?;
    offsets.tp_newtask_clone_flags = field(&newtask, "clone_flags")
        .filter(|f| f.size == 8)
        .ok_or(OffsetError::NoField {
            tracepoint: "task/task_newtask",
            field: "clone_flags",
        })?
        .offset;
    let exit = read_format(tracefs, "sched", "sched_process_exit").map_err(|source| {
        OffsetError::Format {
            tracepoint: "sched/sched_process_exit",
            source,
        }
    })?;
    if let Some(group_dead) = field(&exit, "group_dead").filter(|f| f.size == 1) {
        offsets.tp_exit_group_dead = group_dead.offset;
        offsets.optional |= OPT_EXIT_GROUP_DEAD;
    }
    Ok(())
}

/// `inode.i_size` and where the inode's modification time keeps its
/// seconds and nanoseconds: `i_mtime_sec` and `i_mtime_nsec` since 6.11,
/// a `struct timespec64` (`__i_mtime` in 6.7–6.10, `i_mtime` before).
fn inode_version_offsets(btf: &KernelBtf) -> Result<[u32; 3], OffsetError> {
    let inode = find_struct(btf, "inode")?;
    let size = byte_offset(btf, inode, "inode", "i_size")?;
    if let (Ok(sec), Ok(nsec)) = (
        byte_offset(btf, inode, "inode", "i_mtime_sec"),
        byte_offset(btf, inode, "inode", "i_mtime_nsec"),
    ) {
        return Ok([size, sec, nsec]);
    }
    let mtime = byte_offset(btf, inode, "inode", "__i_mtime")
        .or_else(|_| byte_offset(btf, inode, "inode", "i_mtime"))?;
    let timespec = find_struct(btf, "timespec64")?;
    let sec = byte_offset(btf, timespec, "timespec64", "tv_sec")?;
    let nsec = byte_offset(btf, timespec, "timespec64", "tv_nsec")?;
    Ok([size, mtime + sec, mtime + nsec])
}

fn find_struct(btf: &KernelBtf, name: &'static str) -> Result<TypeId, OffsetError> {
    btf.find_struct(name).ok_or(OffsetError::NoStruct(name))
}

fn byte_offset(
    btf: &KernelBtf,
    strukt: TypeId,
    strukt_name: &'static str,
    member: &'static str,
) -> Result<u32, OffsetError> {
    let offset = btf
        .member_offset(strukt, member)
        .ok_or(OffsetError::NoMember {
            strukt: strukt_name,
            member,
        })?;
    if offset.bitfield_bits.is_some() || offset.bits % 8 != 0 {
        return Err(OffsetError::BitField {
            strukt: strukt_name,
            member,
        });
    }
    Ok(offset.bits / 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the running kernel: the offsets must exist, be distinct and
    /// ordered as in every kernel's definition (arg_start before arg_end).
    #[test]
    fn resolves_offsets_of_running_kernel() {
        let offsets = resolve_from_file(Path::new(VMLINUX_BTF))
            .expect("this machine publishes BTF at /sys/kernel/btf/vmlinux");
        assert_eq!(offsets.valid, 1);
        assert!(offsets.task_real_parent > 0);
        assert!(offsets.task_tgid > 0);
        assert_ne!(offsets.task_real_parent, offsets.task_tgid);
        assert_eq!(offsets.mm_arg_end, offsets.mm_arg_start + 8);
        assert_eq!(
            offsets.cred_egid,
            offsets.cred_euid + 4,
            "egid follows euid in struct cred"
        );
        assert_eq!(offsets.cred_gid, offsets.cred_uid + 4, "gid follows uid");
        assert!(offsets.cred_euid > offsets.cred_gid);
        assert!(offsets.task_cred > 0 && offsets.task_signal > 0 && offsets.task_group_leader > 0);
        assert_ne!(offsets.optional & OPT_LOGINUID, 0, "this kernel has audit");
        assert_ne!(offsets.optional & OPT_TCP_BYTES, 0);
        assert_ne!(offsets.tcp_bytes_sent, offsets.tcp_bytes_received);
        assert!(offsets.sock_shutdown > 0);
        assert_ne!(offsets.optional & OPT_EXE_INODE, 0, "exe inode offsets");
        assert!(offsets.mm_exe_file > 0 && offsets.inode_sb > 0 && offsets.sb_dev > 0);
        // 6.18 keeps the modification time as i_mtime_sec + i_mtime_nsec.
        assert_ne!(offsets.optional & OPT_EXE_VERSION, 0, "exe version offsets");
        assert!(offsets.inode_size > 0);
        assert!(offsets.inode_mtime_sec > 0 && offsets.inode_mtime_nsec > offsets.inode_mtime_sec);
    }

    #[test]
    fn resolves_tracepoint_fields_of_running_kernel() {
        let mut offsets = KernelOffsets::default();
        resolve_tracepoint_fields(Path::new("/sys/kernel/tracing"), &mut offsets).unwrap();
        assert_eq!(offsets.tp_newtask_clone_flags, 32);
        // 6.18 has group_dead in sched_process_exit.
        assert_ne!(offsets.optional & OPT_EXIT_GROUP_DEAD, 0);
        assert_eq!(offsets.tp_exit_group_dead, 32);
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = resolve_from_file(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }
}
