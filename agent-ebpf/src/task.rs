//! Reading fields of the current `task_struct` at the offsets user space
//! resolved from BTF ([`KernelOffsets`]). Every read is a checked
//! `bpf_probe_read_kernel`; a failed read yields `None`, never a fault.

use agent_common::{KernelOffsets, OPT_LOGINUID};
use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_get_current_task};

#[derive(Clone, Copy)]
pub struct Task(*const u8);

impl Task {
    #[inline(always)]
    pub fn current() -> Self {
        // SAFETY: the helper returns the running task; only ever dereferenced
        // through bpf_probe_read_kernel.
        Self(unsafe { bpf_get_current_task() } as *const u8)
    }

    #[inline(always)]
    fn read<T>(self, offset: u32) -> Option<T> {
        // SAFETY: probe reads tolerate any address.
        unsafe { bpf_probe_read_kernel(self.0.add(offset as usize) as *const T) }.ok()
    }

    #[inline(always)]
    fn pointer_at(self, offset: u32) -> Option<Task> {
        let ptr: *const u8 = self.read(offset)?;
        (!ptr.is_null()).then_some(Task(ptr))
    }

    #[inline(always)]
    pub fn tgid(self, o: &KernelOffsets) -> Option<u32> {
        self.read::<i32>(o.task_tgid).map(|tgid| tgid as u32)
    }

    /// Thread-group id of `real_parent`.
    #[inline(always)]
    pub fn ppid(self, o: &KernelOffsets) -> Option<u32> {
        self.pointer_at(o.task_real_parent)?.tgid(o)
    }

    #[inline(always)]
    pub fn mm(self, o: &KernelOffsets) -> Option<*const u8> {
        self.read(o.task_mm)
    }

    /// `(s_dev, i_ino)` of the program the task runs
    /// (`mm->exe_file->f_inode`), when the offsets are known.
    #[inline(always)]
    pub fn exe_inode(self, o: &KernelOffsets) -> Option<(u32, u64)> {
        if o.optional & agent_common::OPT_EXE_INODE == 0 {
            return None;
        }
        let mm = Task(self.mm(o)?);
        let file = mm.pointer_at(o.mm_exe_file)?;
        let inode = file.pointer_at(o.file_inode)?;
        let ino: u64 = inode.read(o.inode_ino)?;
        let sb = inode.pointer_at(o.inode_sb)?;
        let dev: u32 = sb.read(o.sb_dev)?;
        Some((dev, ino))
    }

    /// The version of the program the task runs: `(s_dev, i_ino, i_size,
    /// mtime seconds, mtime nanoseconds)` of `mm->exe_file->f_inode`.
    #[inline(always)]
    pub fn exe_version(self, o: &KernelOffsets) -> Option<(u32, u64, u64, i64, u32)> {
        let wanted = agent_common::OPT_EXE_INODE | agent_common::OPT_EXE_VERSION;
        if o.optional & wanted != wanted {
            return None;
        }
        let mm = Task(self.mm(o)?);
        let file = mm.pointer_at(o.mm_exe_file)?;
        let inode = file.pointer_at(o.file_inode)?;
        let ino: u64 = inode.read(o.inode_ino)?;
        let size: i64 = inode.read(o.inode_size)?;
        let mtime_sec: i64 = inode.read(o.inode_mtime_sec)?;
        let mtime_nsec: u32 = inode.read(o.inode_mtime_nsec)?;
        let sb = inode.pointer_at(o.inode_sb)?;
        let dev: u32 = sb.read(o.sb_dev)?;
        Some((dev, ino, size as u64, mtime_sec, mtime_nsec))
    }

    /// `(euid, egid)` of the task's subjective credentials.
    #[inline(always)]
    pub fn effective_ids(self, o: &KernelOffsets) -> Option<(u32, u32)> {
        let cred = self.pointer_at(o.task_cred)?;
        Some((cred.read(o.cred_euid)?, cred.read(o.cred_egid)?))
    }

    #[inline(always)]
    pub fn loginuid(self, o: &KernelOffsets) -> Option<u32> {
        if o.optional & OPT_LOGINUID == 0 {
            return None;
        }
        self.read(o.task_loginuid)
    }

    #[inline(always)]
    pub fn start_boot_ns(self, o: &KernelOffsets) -> Option<u64> {
        self.read(o.task_start_boottime)
    }

    #[inline(always)]
    pub fn group_leader(self, o: &KernelOffsets) -> Option<Task> {
        self.pointer_at(o.task_group_leader)
    }

    #[inline(always)]
    pub fn exit_code(self, o: &KernelOffsets) -> Option<u32> {
        self.read::<i32>(o.task_exit_code).map(|code| code as u32)
    }

    /// Whether no thread of the group is alive any more (`signal->live`).
    #[inline(always)]
    pub fn group_dead(self, o: &KernelOffsets) -> Option<bool> {
        let signal = self.pointer_at(o.task_signal)?;
        signal.read::<i32>(o.signal_live).map(|live| live == 0)
    }
}
