//! Decoding of the raw records the kernel programs write to ring buffers into
//! owned, validated user-space events. Sans-IO: bytes in, events out.

use std::mem::size_of;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use agent_common::{
    CredEvent, CredIds, CredSyscall, DecisionEvent, DnsEvent, EventHeader, EventKind, ExecEvent,
    ExitEvent, FileAction, FileEvent, ForkEvent, TcpAction, TcpEvent, ARGS_CAPACITY,
    DNS_PAYLOAD_CAPACITY, FILENAME_CAPACITY, FLAG_ARGS_TRUNCATED, FLAG_BYTES_UNKNOWN,
    FLAG_CREDS_UNKNOWN, FLAG_EXE_VERSION_UNKNOWN, FLAG_FILENAME_TRUNCATED, FLAG_LOGINUID_UNKNOWN,
    FLAG_OWNER_UNKNOWN, FLAG_PATH_TRUNCATED, FLAG_PPID_UNKNOWN, FLAG_START_UNKNOWN, LOGINUID_UNSET,
    PATH_CAPACITY,
};

/// A process execution as the kernel saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessExec {
    /// Nanoseconds since boot (`CLOCK_BOOTTIME`).
    pub boot_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Effective ids; equal to uid/gid when `creds_unknown`.
    pub euid: u32,
    pub egid: u32,
    /// Audit login uid, `None` outside a login session or when unknown.
    pub loginuid: Option<u32>,
    /// Process start, boot-clock nanoseconds; `None` when unknown.
    pub start_boot_ns: Option<u64>,
    pub cgroup_id: u64,
    pub filename: String,
    pub argv: Vec<String>,
    pub argv_truncated: bool,
    pub filename_truncated: bool,
    pub ppid_unknown: bool,
    pub creds_unknown: bool,
    /// The version of the executed file, when the kernel could read it.
    pub exe_version: Option<crate::exe_hash::FileVersion>,
}

/// A new process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessFork {
    pub boot_ns: u64,
    pub parent_pid: u32,
    pub parent_tid: u32,
    pub child_pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub clone_flags: u64,
    pub cgroup_id: u64,
}

/// The end of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessExit {
    pub boot_ns: u64,
    pub pid: u32,
    pub tid: u32,
    /// `None` when the parent could not be read.
    pub ppid: Option<u32>,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    /// Exit status (0..=255) when the process exited normally.
    pub exit_status: Option<u8>,
    /// The signal that killed it, if one did.
    pub signal: Option<u8>,
    pub core_dumped: bool,
    pub start_boot_ns: Option<u64>,
}

impl ProcessExit {
    /// How long the process lived, when its start is known.
    pub fn lifetime_ns(&self) -> Option<u64> {
        self.start_boot_ns
            .map(|start| self.boot_ns.saturating_sub(start))
    }
}

/// A TCP state change worth an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpConnection {
    pub boot_ns: u64,
    pub action: TcpAction,
    /// The owning process; `None` when the socket predates the agent.
    pub pid: Option<u32>,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    pub duration_ns: u64,
    /// `(sent, received)` for closed connections when the kernel told.
    pub bytes: Option<(u64, u64)>,
}

/// A file operation on a watched path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileActivity {
    pub boot_ns: u64,
    pub action: FileAction,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub path: String,
    /// The new path of a rename.
    pub target: Option<String>,
    pub open_flags: u32,
    pub mode: u32,
    pub path_truncated: bool,
}

/// A successful setuid-family call that changed the caller's ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialChange {
    pub boot_ns: u64,
    pub pid: u32,
    pub syscall: CredSyscall,
    pub old: CredIds,
    pub new: CredIds,
    pub cgroup_id: u64,
}

/// The name of a credential system call on the wire and in the store.
pub fn cred_syscall_name(syscall: CredSyscall) -> &'static str {
    match syscall {
        CredSyscall::Setuid => "setuid",
        CredSyscall::Setgid => "setgid",
        CredSyscall::Setreuid => "setreuid",
        CredSyscall::Setregid => "setregid",
        CredSyscall::Setresuid => "setresuid",
        CredSyscall::Setresgid => "setresgid",
        CredSyscall::CommitCreds => "commit_creds",
    }
}

/// The name of a file action on the wire and in the store.
pub fn file_action_name(action: FileAction) -> &'static str {
    match action {
        FileAction::OpenWrite => "open_write",
        FileAction::OpenRead => "open_read",
        FileAction::Unlink => "unlink",
        FileAction::Rename => "rename",
        FileAction::Chmod => "chmod",
    }
}

/// Every event kind the kernel can send.
/// A UDP datagram to port 53 that left the guarded cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsDatagram {
    pub boot_ns: u64,
    /// `None` when it left outside any process's context.
    pub pid: Option<u32>,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub source: std::net::SocketAddr,
    pub server: std::net::SocketAddr,
    /// Length of the whole DNS message.
    pub message_len: u32,
    /// Its first bytes, as copied by the kernel.
    pub message: Vec<u8>,
}

/// A connection the kernel guard decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardDecision {
    pub boot_ns: u64,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub policy_version: u64,
    pub action: agent_common::VerdictAction,
    /// Index of the rule in the policy, or [`agent_common::DEFAULT_RULE`].
    pub rule: u32,
    pub remote: std::net::SocketAddr,
    /// "tcp" or "udp".
    pub protocol: &'static str,
    /// A direct connection to a protected port, dropped on arrival:
    /// `remote` is its source, with the local port; no process.
    pub inbound: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    Exec(ProcessExec),
    Fork(ProcessFork),
    Exit(ProcessExit),
    Tcp(TcpConnection),
    File(FileActivity),
    Creds(CredentialChange),
    Dns(DnsDatagram),
    Decision(GuardDecision),
}

impl KernelEvent {
    /// Boot-clock nanoseconds of the event.
    pub fn boot_ns(&self) -> u64 {
        match self {
            Self::Exec(e) => e.boot_ns,
            Self::Fork(e) => e.boot_ns,
            Self::Exit(e) => e.boot_ns,
            Self::Tcp(e) => e.boot_ns,
            Self::File(e) => e.boot_ns,
            Self::Creds(e) => e.boot_ns,
            Self::Dns(e) => e.boot_ns,
            Self::Decision(e) => e.boot_ns,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event header")]
    TooShort(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("{kind:?} record has {actual} bytes, expected {expected}")]
    WrongSize {
        kind: EventKind,
        actual: usize,
        expected: usize,
    },
    #[error("unknown credential system call {0}")]
    UnknownCredSyscall(u32),
    #[error("unknown file action {0}")]
    UnknownFileAction(u32),
    #[error("unknown tcp action {0}")]
    UnknownTcpAction(u32),
    #[error("unknown verdict action {0}")]
    UnknownAction(u32),
    #[error("unknown IP version {0}")]
    UnknownIpVersion(u32),
    #[error("unknown address family {0}")]
    UnknownFamily(u16),
    #[error("{field} length {len} exceeds its capacity {capacity}")]
    LengthOutOfRange {
        field: &'static str,
        len: u32,
        capacity: usize,
    },
}

/// Decodes one ring-buffer record.
pub fn decode(record: &[u8]) -> Result<KernelEvent, DecodeError> {
    if record.len() < size_of::<EventHeader>() {
        return Err(DecodeError::TooShort(record.len()));
    }
    // SAFETY: length checked; EventHeader is plain old data; unaligned read.
    let header: EventHeader = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    let kind = EventKind::from_u32(header.kind).ok_or(DecodeError::UnknownKind(header.kind))?;
    match kind {
        EventKind::Exec => decode_exec(record).map(KernelEvent::Exec),
        EventKind::Fork => decode_fork(record).map(KernelEvent::Fork),
        EventKind::Exit => decode_exit(record).map(KernelEvent::Exit),
        EventKind::Tcp => decode_tcp(record).map(KernelEvent::Tcp),
        EventKind::File => decode_file(record).map(KernelEvent::File),
        EventKind::Creds => decode_creds(record).map(KernelEvent::Creds),
        EventKind::Dns => decode_dns(record).map(KernelEvent::Dns),
        EventKind::Decision => decode_decision(record).map(KernelEvent::Decision),
    }
}

fn decode_creds(record: &[u8]) -> Result<CredentialChange, DecodeError> {
    let raw: CredEvent = read_record(record, EventKind::Creds)?;
    Ok(CredentialChange {
        boot_ns: raw.header.boot_ns,
        pid: raw.pid,
        syscall: CredSyscall::from_u32(raw.syscall)
            .ok_or(DecodeError::UnknownCredSyscall(raw.syscall))?,
        old: raw.old,
        new: raw.new,
        cgroup_id: raw.cgroup_id,
    })
}

fn decode_file(record: &[u8]) -> Result<FileActivity, DecodeError> {
    let raw: FileEvent = read_record(record, EventKind::File)?;
    let action =
        FileAction::from_u32(raw.action).ok_or(DecodeError::UnknownFileAction(raw.action))?;
    let path_len = checked_len("path", raw.path_len, PATH_CAPACITY)?;
    let target_len = checked_len("target", raw.target_len, PATH_CAPACITY)?;
    let text = |bytes: &[u8]| String::from_utf8_lossy(until_nul(bytes)).into_owned();
    Ok(FileActivity {
        boot_ns: raw.header.boot_ns,
        action,
        pid: raw.pid,
        uid: raw.uid,
        gid: raw.gid,
        cgroup_id: raw.cgroup_id,
        path: text(&raw.path[..path_len]),
        target: (action == FileAction::Rename).then(|| text(&raw.target[..target_len])),
        open_flags: raw.open_flags,
        mode: raw.mode,
        path_truncated: raw.header.flags & FLAG_PATH_TRUNCATED != 0,
    })
}

fn decode_decision(record: &[u8]) -> Result<GuardDecision, DecodeError> {
    let raw: DecisionEvent = read_record(record, EventKind::Decision)?;
    let a = raw.addr;
    let ip = match raw.ip_version {
        4 => IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
        6 => IpAddr::V6(Ipv6Addr::from(a)).to_canonical(),
        other => return Err(DecodeError::UnknownIpVersion(other)),
    };
    Ok(GuardDecision {
        boot_ns: raw.header.boot_ns,
        pid: raw.pid,
        uid: raw.uid,
        gid: raw.gid,
        cgroup_id: raw.cgroup_id,
        policy_version: raw.policy_version,
        // A chain is resolved in the kernel before anything is recorded.
        action: agent_common::VerdictAction::from_u32(raw.action)
            .filter(|a| *a != agent_common::VerdictAction::Chain)
            .ok_or(DecodeError::UnknownAction(raw.action))?,
        rule: raw.rule,
        remote: (ip, raw.port).into(),
        protocol: if raw.protocol == 17 { "udp" } else { "tcp" },
        inbound: raw.header.flags & agent_common::DECISION_FLAG_INBOUND != 0,
    })
}

fn decode_dns(record: &[u8]) -> Result<DnsDatagram, DecodeError> {
    let raw: DnsEvent = read_record(record, EventKind::Dns)?;
    let address = |bytes: [u8; 16]| -> Result<IpAddr, DecodeError> {
        match raw.ip_version {
            4 => Ok(IpAddr::V4(Ipv4Addr::new(
                bytes[0], bytes[1], bytes[2], bytes[3],
            ))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(bytes)).to_canonical()),
            other => Err(DecodeError::UnknownIpVersion(other)),
        }
    };
    let payload_len = checked_len("payload", raw.payload_len, DNS_PAYLOAD_CAPACITY)?;
    Ok(DnsDatagram {
        boot_ns: raw.header.boot_ns,
        pid: (raw.pid != 0).then_some(raw.pid),
        uid: raw.uid,
        gid: raw.gid,
        cgroup_id: raw.cgroup_id,
        source: (address(raw.source)?, raw.source_port).into(),
        server: (address(raw.destination)?, raw.destination_port).into(),
        message_len: raw.message_len,
        message: raw.payload[..payload_len].to_vec(),
    })
}

/// The name of a TCP action on the wire and in the store.
pub fn tcp_action_name(action: TcpAction) -> &'static str {
    match action {
        TcpAction::ConnectAttempt => "connect_attempt",
        TcpAction::Connected => "connected",
        TcpAction::ConnectFailed => "connect_failed",
        TcpAction::Accepted => "accepted",
        TcpAction::Closed => "closed",
        TcpAction::Listen => "listen",
    }
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

fn decode_tcp(record: &[u8]) -> Result<TcpConnection, DecodeError> {
    let raw: TcpEvent = read_record(record, EventKind::Tcp)?;
    let action =
        TcpAction::from_u32(raw.action).ok_or(DecodeError::UnknownTcpAction(raw.action))?;
    let address = |bytes: [u8; 16]| -> Result<IpAddr, DecodeError> {
        match raw.family {
            AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(
                bytes[0], bytes[1], bytes[2], bytes[3],
            ))),
            AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(bytes)).to_canonical()),
            other => Err(DecodeError::UnknownFamily(other)),
        }
    };
    let flags = raw.header.flags;
    Ok(TcpConnection {
        boot_ns: raw.header.boot_ns,
        action,
        pid: (flags & FLAG_OWNER_UNKNOWN == 0).then_some(raw.pid),
        uid: raw.uid,
        gid: raw.gid,
        cgroup_id: raw.cgroup_id,
        local: (address(raw.local_addr)?, raw.local_port).into(),
        remote: (address(raw.remote_addr)?, raw.remote_port).into(),
        duration_ns: raw.duration_ns,
        bytes: (action == TcpAction::Closed && flags & FLAG_BYTES_UNKNOWN == 0)
            .then_some((raw.bytes_sent, raw.bytes_received)),
    })
}

/// Reads a fixed-size record of kind `kind` as `T`.
fn read_record<T: Copy>(record: &[u8], kind: EventKind) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if record.len() != expected {
        return Err(DecodeError::WrongSize {
            kind,
            actual: record.len(),
            expected,
        });
    }
    // SAFETY: length checked; callers use only `#[repr(C)]` plain-old-data
    // event types of agent-common, valid for any bit pattern; unaligned read.
    Ok(unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) })
}

fn decode_fork(record: &[u8]) -> Result<ProcessFork, DecodeError> {
    let raw: ForkEvent = read_record(record, EventKind::Fork)?;
    Ok(ProcessFork {
        boot_ns: raw.header.boot_ns,
        parent_pid: raw.parent_pid,
        parent_tid: raw.parent_tid,
        child_pid: raw.child_pid,
        uid: raw.uid,
        gid: raw.gid,
        clone_flags: raw.clone_flags,
        cgroup_id: raw.cgroup_id,
    })
}

fn decode_exit(record: &[u8]) -> Result<ProcessExit, DecodeError> {
    let raw: ExitEvent = read_record(record, EventKind::Exit)?;
    let flags = raw.header.flags;
    let code = raw.exit_code;
    let signal = (code & 0x7f) as u8;
    Ok(ProcessExit {
        boot_ns: raw.header.boot_ns,
        pid: raw.pid,
        tid: raw.tid,
        ppid: (flags & FLAG_PPID_UNKNOWN == 0).then_some(raw.ppid),
        uid: raw.uid,
        gid: raw.gid,
        cgroup_id: raw.cgroup_id,
        exit_status: (signal == 0).then_some(((code >> 8) & 0xff) as u8),
        signal: (signal != 0).then_some(signal),
        core_dumped: code & 0x80 != 0,
        start_boot_ns: (flags & FLAG_START_UNKNOWN == 0).then_some(raw.start_boot_ns),
    })
}

fn decode_exec(record: &[u8]) -> Result<ProcessExec, DecodeError> {
    let raw: ExecEvent = read_record(record, EventKind::Exec)?;
    let filename_len = checked_len("filename", raw.filename_len, FILENAME_CAPACITY)?;
    let args_len = checked_len("args", raw.args_len, ARGS_CAPACITY)?;
    let flags = raw.header.flags;
    Ok(ProcessExec {
        boot_ns: raw.header.boot_ns,
        pid: raw.pid,
        tid: raw.tid,
        ppid: raw.ppid,
        uid: raw.uid,
        gid: raw.gid,
        euid: raw.euid,
        egid: raw.egid,
        loginuid: (flags & FLAG_LOGINUID_UNKNOWN == 0 && raw.loginuid != LOGINUID_UNSET)
            .then_some(raw.loginuid),
        start_boot_ns: (flags & FLAG_START_UNKNOWN == 0).then_some(raw.start_boot_ns),
        cgroup_id: raw.cgroup_id,
        filename: String::from_utf8_lossy(until_nul(&raw.filename[..filename_len])).into_owned(),
        argv: split_args(&raw.args[..args_len]),
        argv_truncated: flags & FLAG_ARGS_TRUNCATED != 0,
        filename_truncated: flags & FLAG_FILENAME_TRUNCATED != 0,
        ppid_unknown: flags & FLAG_PPID_UNKNOWN != 0,
        creds_unknown: flags & FLAG_CREDS_UNKNOWN != 0,
        exe_version: (flags & FLAG_EXE_VERSION_UNKNOWN == 0).then(|| {
            crate::exe_hash::FileVersion::from_kernel(
                raw.exe_dev,
                raw.exe_ino,
                raw.exe_size,
                raw.exe_mtime_sec,
                raw.exe_mtime_nsec,
            )
        }),
    })
}

fn checked_len(field: &'static str, len: u32, capacity: usize) -> Result<usize, DecodeError> {
    let as_usize = len as usize;
    if as_usize > capacity {
        return Err(DecodeError::LengthOutOfRange {
            field,
            len,
            capacity,
        });
    }
    Ok(as_usize)
}

fn until_nul(bytes: &[u8]) -> &[u8] {
    bytes
        .iter()
        .position(|&b| b == 0)
        .map_or(bytes, |end| &bytes[..end])
}

/// Splits the argument area (NUL-terminated strings back to back) into argv.
/// A last string cut by truncation is kept as it is.
fn split_args(area: &[u8]) -> Vec<String> {
    let area = area.strip_suffix(&[0]).unwrap_or(area);
    if area.is_empty() {
        return Vec::new();
    }
    area.split(|&b| b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds the bytes the kernel would write for an exec.
    pub(crate) fn exec_record(filename: &str, args: &[&str], flags: u32) -> Vec<u8> {
        // SAFETY: all-zero is a valid ExecEvent.
        let mut raw: ExecEvent = unsafe { std::mem::zeroed() };
        raw.header.kind = EventKind::Exec as u32;
        raw.header.flags = flags;
        raw.header.boot_ns = 123_456_789;
        raw.pid = 4242;
        raw.tid = 4243;
        raw.ppid = 1;
        raw.uid = 1000;
        raw.gid = 100;
        raw.euid = 0;
        raw.egid = 0;
        raw.loginuid = 1000;
        raw.start_boot_ns = 100_000_000;
        raw.cgroup_id = 77;
        raw.filename[..filename.len()].copy_from_slice(filename.as_bytes());
        raw.filename_len = filename.len() as u32;
        let mut at = 0;
        for arg in args {
            let end = (at + arg.len()).min(ARGS_CAPACITY);
            raw.args[at..end].copy_from_slice(&arg.as_bytes()[..end - at]);
            at = (end + 1).min(ARGS_CAPACITY);
        }
        raw.args_len = at as u32;
        // SAFETY: ExecEvent is plain old data without padding.
        unsafe {
            std::slice::from_raw_parts(
                (&raw as *const ExecEvent).cast::<u8>(),
                size_of::<ExecEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_exec() {
        let record = exec_record("/usr/bin/env", &["env", "-i", "FOO=bar baz"], 0);
        let KernelEvent::Exec(exec) = decode(&record).unwrap() else {
            panic!("not an exec");
        };
        assert_eq!(exec.pid, 4242);
        assert_eq!(exec.tid, 4243);
        assert_eq!(exec.ppid, 1);
        assert_eq!(exec.uid, 1000);
        assert_eq!(exec.gid, 100);
        assert_eq!(exec.cgroup_id, 77);
        assert_eq!(exec.boot_ns, 123_456_789);
        assert_eq!(
            (exec.euid, exec.egid),
            (0, 0),
            "setuid program: effective ids differ"
        );
        assert_eq!(exec.loginuid, Some(1000));
        assert_eq!(exec.start_boot_ns, Some(100_000_000));
        assert_eq!(exec.filename, "/usr/bin/env");
        assert_eq!(exec.argv, vec!["env", "-i", "FOO=bar baz"]);
        assert!(!exec.argv_truncated && !exec.filename_truncated && !exec.ppid_unknown);
    }

    #[test]
    fn keeps_empty_arguments_and_flags() {
        let record = exec_record(
            "/bin/true",
            &["true", "", "x"],
            FLAG_ARGS_TRUNCATED | FLAG_PPID_UNKNOWN,
        );
        let KernelEvent::Exec(exec) = decode(&record).unwrap() else {
            panic!("not an exec");
        };
        assert_eq!(exec.argv, vec!["true", "", "x"]);
        assert!(exec.argv_truncated);
        assert!(exec.ppid_unknown);
    }

    #[test]
    fn no_arguments() {
        let record = exec_record("/bin/true", &[], 0);
        let KernelEvent::Exec(exec) = decode(&record).unwrap() else {
            panic!("not an exec");
        };
        assert!(exec.argv.is_empty());
    }

    #[test]
    fn truncated_last_argument_is_kept() {
        let long = "a".repeat(ARGS_CAPACITY + 10);
        let record = exec_record("/bin/echo", &["echo", &long], FLAG_ARGS_TRUNCATED);
        let KernelEvent::Exec(exec) = decode(&record).unwrap() else {
            panic!("not an exec");
        };
        assert_eq!(exec.argv.len(), 2);
        assert_eq!(exec.argv[1].len(), ARGS_CAPACITY - "echo".len() - 1);
    }

    #[test]
    fn invalid_utf8_is_replaced_not_rejected() {
        let mut record = exec_record("/bin/x", &["x", "ab"], 0);
        let args_at = size_of::<ExecEvent>() - ARGS_CAPACITY;
        record[args_at + 2] = 0xff;
        let KernelEvent::Exec(exec) = decode(&record).unwrap() else {
            panic!("not an exec");
        };
        assert_eq!(exec.argv[1], "\u{fffd}b");
    }

    fn bytes_of<T>(value: &T) -> Vec<u8> {
        // SAFETY: event types are plain old data without padding.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    #[test]
    fn decodes_fork() {
        let raw = ForkEvent {
            header: EventHeader {
                kind: EventKind::Fork as u32,
                flags: 0,
                boot_ns: 5,
            },
            parent_pid: 10,
            parent_tid: 11,
            child_pid: 12,
            uid: 1000,
            gid: 1000,
            _reserved: 0,
            clone_flags: 0x11,
            cgroup_id: 3,
        };
        let KernelEvent::Fork(fork) = decode(&bytes_of(&raw)).unwrap() else {
            panic!("not a fork");
        };
        assert_eq!(
            (fork.parent_pid, fork.parent_tid, fork.child_pid),
            (10, 11, 12)
        );
        assert_eq!(fork.clone_flags, 0x11);
    }

    fn exit_with(code: u32, flags: u32) -> ProcessExit {
        let raw = ExitEvent {
            header: EventHeader {
                kind: EventKind::Exit as u32,
                flags,
                boot_ns: 3_000,
            },
            pid: 20,
            tid: 21,
            ppid: 1,
            uid: 0,
            gid: 0,
            exit_code: code,
            cgroup_id: 9,
            start_boot_ns: 1_000,
        };
        match decode(&bytes_of(&raw)).unwrap() {
            KernelEvent::Exit(exit) => exit,
            other => panic!("not an exit: {other:?}"),
        }
    }

    #[test]
    fn decodes_exit_status_and_signals() {
        let normal = exit_with(3 << 8, 0);
        assert_eq!(
            (normal.exit_status, normal.signal, normal.core_dumped),
            (Some(3), None, false)
        );
        assert_eq!(normal.lifetime_ns(), Some(2_000));
        assert_eq!(normal.ppid, Some(1));

        let killed = exit_with(9, 0);
        assert_eq!((killed.exit_status, killed.signal), (None, Some(9)));

        let segv_core = exit_with(11 | 0x80, 0);
        assert_eq!((segv_core.signal, segv_core.core_dumped), (Some(11), true));

        let unknown = exit_with(0, FLAG_PPID_UNKNOWN | FLAG_START_UNKNOWN);
        assert_eq!((unknown.ppid, unknown.lifetime_ns()), (None, None));
    }

    fn tcp_record(action: TcpAction, family: u16, flags: u32) -> TcpEvent {
        let mut raw = TcpEvent {
            header: EventHeader {
                kind: EventKind::Tcp as u32,
                flags,
                boot_ns: 9,
            },
            action: action as u32,
            pid: 77,
            family,
            local_port: 40000,
            remote_port: 443,
            duration_ns: 5,
            bytes_sent: 100,
            bytes_received: 200,
            ..TcpEvent::default()
        };
        if family == AF_INET {
            raw.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
            raw.remote_addr[..4].copy_from_slice(&[192, 0, 2, 7]);
        } else {
            raw.local_addr = "::1".parse::<Ipv6Addr>().unwrap().octets();
            raw.remote_addr = "::ffff:192.0.2.7".parse::<Ipv6Addr>().unwrap().octets();
        }
        raw
    }

    fn decode_tcp_event(raw: &TcpEvent) -> TcpConnection {
        match decode(&bytes_of(raw)).unwrap() {
            KernelEvent::Tcp(tcp) => tcp,
            other => panic!("not tcp: {other:?}"),
        }
    }

    fn dns_event(ip_version: u32, payload_len: u32) -> DnsEvent {
        // SAFETY: all-zero is a valid DnsEvent.
        let mut raw: DnsEvent = unsafe { std::mem::zeroed() };
        raw.header = EventHeader {
            kind: EventKind::Dns as u32,
            flags: 0,
            boot_ns: 9,
        };
        raw.pid = 31;
        raw.uid = 1000;
        raw.cgroup_id = 8;
        raw.ip_version = ip_version;
        raw.source_port = 40001;
        raw.destination_port = 53;
        raw.message_len = 40;
        raw.payload_len = payload_len;
        raw.payload[..3].copy_from_slice(b"abc");
        raw
    }

    #[test]
    fn decodes_dns_datagrams_of_both_ip_versions() {
        let mut raw = dns_event(4, 3);
        raw.source[..4].copy_from_slice(&[127, 0, 0, 1]);
        raw.destination[..4].copy_from_slice(&[127, 0, 0, 53]);
        let KernelEvent::Dns(v4) = decode(&bytes_of(&raw)).unwrap() else {
            panic!("not dns")
        };
        assert_eq!(v4.pid, Some(31));
        assert_eq!(v4.source, "127.0.0.1:40001".parse().unwrap());
        assert_eq!(v4.server, "127.0.0.53:53".parse().unwrap());
        assert_eq!((v4.message_len, v4.message.as_slice()), (40, &b"abc"[..]));

        let mut raw = dns_event(6, 3);
        raw.pid = 0;
        raw.destination = "2001:db8::35".parse::<Ipv6Addr>().unwrap().octets();
        let KernelEvent::Dns(v6) = decode(&bytes_of(&raw)).unwrap() else {
            panic!("not dns")
        };
        assert_eq!(v6.pid, None, "pid 0 means no owning process");
        assert_eq!(v6.server, "[2001:db8::35]:53".parse().unwrap());
    }

    #[test]
    fn rejects_dns_records_with_impossible_fields() {
        assert_eq!(
            decode(&bytes_of(&dns_event(5, 3))),
            Err(DecodeError::UnknownIpVersion(5))
        );
        assert!(matches!(
            decode(&bytes_of(&dns_event(4, 4096))),
            Err(DecodeError::LengthOutOfRange {
                field: "payload",
                ..
            })
        ));
    }

    #[test]
    fn decodes_file_activity() {
        // SAFETY: all-zero is a valid FileEvent.
        let mut raw: FileEvent = unsafe { std::mem::zeroed() };
        raw.header = EventHeader {
            kind: EventKind::File as u32,
            flags: 0,
            boot_ns: 4,
        };
        raw.action = FileAction::Rename as u32;
        raw.pid = 5;
        raw.path[..8].copy_from_slice(b"/tmp/a.x");
        raw.path_len = 8;
        raw.target[..12].copy_from_slice(b"/usr/bin/a.x");
        raw.target_len = 12;
        let KernelEvent::File(file) = decode(&bytes_of(&raw)).unwrap() else {
            panic!("not a file event");
        };
        assert_eq!(
            (file.path.as_str(), file.target.as_deref()),
            ("/tmp/a.x", Some("/usr/bin/a.x"))
        );
        assert_eq!(file_action_name(file.action), "rename");

        raw.action = FileAction::Chmod as u32;
        raw.mode = 0o4755;
        let KernelEvent::File(chmod) = decode(&bytes_of(&raw)).unwrap() else {
            panic!("not a file event");
        };
        assert_eq!(
            (chmod.target, chmod.mode),
            (None, 0o4755),
            "a target only for renames"
        );

        raw.path_len = PATH_CAPACITY as u32 + 1;
        assert!(matches!(
            decode(&bytes_of(&raw)),
            Err(DecodeError::LengthOutOfRange { field: "path", .. })
        ));
        raw.path_len = 8;
        raw.action = 77;
        assert_eq!(
            decode(&bytes_of(&raw)),
            Err(DecodeError::UnknownFileAction(77))
        );
    }

    #[test]
    fn decodes_credential_changes() {
        let mut raw = CredEvent {
            header: EventHeader {
                kind: EventKind::Creds as u32,
                flags: 0,
                boot_ns: 8,
            },
            pid: 9,
            syscall: CredSyscall::Setresuid as u32,
            old: CredIds {
                uid: 1000,
                euid: 1000,
                gid: 1000,
                egid: 1000,
            },
            new: CredIds {
                uid: 0,
                euid: 0,
                gid: 1000,
                egid: 1000,
            },
            cgroup_id: 3,
        };
        let KernelEvent::Creds(change) = decode(&bytes_of(&raw)).unwrap() else {
            panic!("not a credential change");
        };
        assert_eq!(cred_syscall_name(change.syscall), "setresuid");
        assert_eq!((change.old.euid, change.new.euid), (1000, 0));
        raw.syscall = 42;
        assert_eq!(
            decode(&bytes_of(&raw)),
            Err(DecodeError::UnknownCredSyscall(42))
        );
    }

    #[test]
    fn decodes_tcp_v4_and_v6() {
        let v4 = decode_tcp_event(&tcp_record(TcpAction::Closed, AF_INET, 0));
        assert_eq!(v4.local.to_string(), "127.0.0.1:40000");
        assert_eq!(v4.remote.to_string(), "192.0.2.7:443");
        assert_eq!((v4.pid, v4.bytes), (Some(77), Some((100, 200))));

        let v6 = decode_tcp_event(&tcp_record(
            TcpAction::ConnectAttempt,
            AF_INET6,
            FLAG_OWNER_UNKNOWN,
        ));
        assert_eq!(v6.local.to_string(), "[::1]:40000");
        assert_eq!(
            v6.remote.ip().to_string(),
            "192.0.2.7",
            "v4-mapped shown as IPv4"
        );
        assert_eq!((v6.pid, v6.bytes), (None, None), "bytes only on close");

        let no_bytes =
            decode_tcp_event(&tcp_record(TcpAction::Closed, AF_INET, FLAG_BYTES_UNKNOWN));
        assert_eq!(no_bytes.bytes, None);

        let mut bad = tcp_record(TcpAction::Closed, 99, 0);
        assert_eq!(decode(&bytes_of(&bad)), Err(DecodeError::UnknownFamily(99)));
        bad.family = AF_INET;
        bad.action = 42;
        assert_eq!(
            decode(&bytes_of(&bad)),
            Err(DecodeError::UnknownTcpAction(42))
        );
    }

    #[test]
    fn rejects_malformed_records() {
        assert_eq!(decode(&[0; 4]), Err(DecodeError::TooShort(4)));

        let mut unknown = exec_record("/bin/x", &[], 0);
        unknown[0] = 99;
        assert_eq!(decode(&unknown), Err(DecodeError::UnknownKind(99)));

        let short = exec_record("/bin/x", &[], 0);
        assert!(matches!(
            decode(&short[..100]),
            Err(DecodeError::WrongSize { actual: 100, .. })
        ));

        let mut bad_len = exec_record("/bin/x", &[], 0);
        let args_len_at = 16 + 9 * 4;
        bad_len[args_len_at..args_len_at + 4]
            .copy_from_slice(&(ARGS_CAPACITY as u32 + 1).to_ne_bytes());
        assert!(matches!(
            decode(&bad_len),
            Err(DecodeError::LengthOutOfRange { field: "args", .. })
        ));
    }
}
