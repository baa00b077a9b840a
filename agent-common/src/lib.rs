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
/// Ring buffer for bulk events (file activity): separate, so that a flood of
/// them never costs a critical event.
pub const BULK_EVENTS_MAP: &str = "BULK_EVENTS";
/// The path prefixes the file sensor watches ([`WatchPrefix`] entries).
pub const FILE_WATCH_MAP: &str = "FILE_WATCH";
/// Entries of [`FILE_WATCH_MAP`]; the list ends at the first empty one.
pub const FILE_WATCH_CAPACITY: u32 = 32;
/// Longest watch prefix, in bytes.
pub const PREFIX_CAPACITY: usize = 64;
/// Longest path carried in a file event, NUL included.
pub const PATH_CAPACITY: usize = 256;
/// Bytes of the bulk ring buffer by default.
pub const BULK_RING_BYTES: u32 = 4 * 1024 * 1024;
/// Per-CPU counters of events the kernel could not deliver, indexed by
/// [`DropReason`].
pub const DROP_COUNTERS_MAP: &str = "DROP_COUNTERS";
/// Read-only global holding the [`KernelOffsets`] user space resolved from BTF.
pub const KERNEL_OFFSETS_GLOBAL: &str = "KERNEL_OFFSETS";
/// Names of the programs in the object file.
pub const EXEC_PROGRAM: &str = "sched_process_exec";
pub const FORK_PROGRAM: &str = "task_newtask";
pub const EXIT_PROGRAM: &str = "sched_process_exit";
pub const TCP_STATE_PROGRAM: &str = "inet_sock_set_state";
/// Owners of live TCP sockets, by `struct sock` address.
pub const TCP_SOCKETS_MAP: &str = "TCP_SOCKETS";
/// Owners of listening TCP sockets, by local port.
pub const TCP_LISTENERS_MAP: &str = "TCP_LISTENERS";

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
    Fork = 2,
    Exit = 3,
    Tcp = 4,
    File = 5,
    Creds = 6,
    Dns = 7,
    Decision = 8,
}

impl EventKind {
    pub const fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Exec),
            2 => Some(Self::Fork),
            3 => Some(Self::Exit),
            4 => Some(Self::Tcp),
            5 => Some(Self::File),
            6 => Some(Self::Creds),
            7 => Some(Self::Dns),
            8 => Some(Self::Decision),
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
    /// The bulk ring buffer was full.
    BulkRingFull = 1,
    /// The agent's self-budget asked the kernel to sample bulk events, and
    /// this one was not kept.
    BulkSampled = 2,
}

/// Number of entries of the drop-counter map.
pub const DROP_REASONS: u32 = 3;

/// One-entry array: the kernel keeps 1 in N bulk events (0 or 1: all). Set by
/// the agent's self-budget under CPU or memory pressure; critical events are
/// never sampled.
pub const BULK_SAMPLING_MAP: &str = "BULK_SAMPLING";

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
/// Credentials (euid, egid) could not be read.
pub const FLAG_CREDS_UNKNOWN: u32 = 1 << 4;
/// The login uid could not be read (kernel without audit).
pub const FLAG_LOGINUID_UNKNOWN: u32 = 1 << 5;
/// The process start time could not be read.
pub const FLAG_START_UNKNOWN: u32 = 1 << 6;
/// The exec event's `exe_*` fields are not filled.
pub const FLAG_EXE_VERSION_UNKNOWN: u32 = 1 << 10;

/// `clone_flags` bit of a new thread (not a new process).
pub const CLONE_THREAD: u64 = 0x0001_0000;
/// Login uid of a process no login session set.
pub const LOGINUID_UNSET: u32 = u32::MAX;

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
    pub euid: u32,
    pub egid: u32,
    /// Audit login uid; [`LOGINUID_UNSET`] outside a login session.
    pub loginuid: u32,
    /// Valid bytes of `filename`, NUL excluded.
    pub filename_len: u32,
    /// Valid bytes of `args`.
    pub args_len: u32,
    /// cgroup v2 id (the inode number of the cgroup directory).
    pub cgroup_id: u64,
    /// When the process (not the program) started, boot-clock nanoseconds.
    pub start_boot_ns: u64,
    /// The version of the file the new program runs from
    /// (`mm->exe_file->f_inode`): inode, size, modification time and the
    /// kernel's `dev_t` of its file system; zero and
    /// [`FLAG_EXE_VERSION_UNKNOWN`] when unknown. User space keys its hash
    /// cache with it and need not look the file up for a binary it knows.
    pub exe_ino: u64,
    pub exe_size: u64,
    pub exe_mtime_sec: i64,
    pub exe_dev: u32,
    pub exe_mtime_nsec: u32,
    /// The path given to execve, NUL-terminated.
    pub filename: [u8; FILENAME_CAPACITY],
    /// The new program's argument area: `argv` strings, each NUL-terminated.
    pub args: [u8; ARGS_CAPACITY],
}

/// A new process (`clone`/`fork` without `CLONE_THREAD`), emitted from
/// `task/task_newtask` in the parent's context.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkEvent {
    pub header: EventHeader,
    /// Thread-group id of the parent.
    pub parent_pid: u32,
    /// Thread of the parent that called clone.
    pub parent_tid: u32,
    /// Pid of the new process.
    pub child_pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub _reserved: u32,
    pub clone_flags: u64,
    pub cgroup_id: u64,
}

/// A process ended (its last thread exited), emitted from
/// `sched/sched_process_exit`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitEvent {
    pub header: EventHeader,
    pub pid: u32,
    /// The thread whose exit ended the process.
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    /// `task->exit_code`: `(status << 8) | signal`, bit 7 core dumped.
    pub exit_code: u32,
    pub cgroup_id: u64,
    pub start_boot_ns: u64,
}

/// What happened to a TCP socket.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpAction {
    /// `connect()` sent a SYN.
    ConnectAttempt = 1,
    /// The handshake of an outgoing connection completed.
    Connected = 2,
    /// An outgoing connection failed (refused, unreachable, timed out).
    ConnectFailed = 3,
    /// An incoming connection completed its handshake on a listener.
    Accepted = 4,
    /// An established connection closed.
    Closed = 5,
    /// A socket started listening.
    Listen = 6,
}

impl TcpAction {
    pub const fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::ConnectAttempt),
            2 => Some(Self::Connected),
            3 => Some(Self::ConnectFailed),
            4 => Some(Self::Accepted),
            5 => Some(Self::Closed),
            6 => Some(Self::Listen),
            _ => None,
        }
    }
}

/// Who owns a socket: the process that connected, or the listener's owner
/// for an accepted one. Kept in [`TCP_SOCKETS_MAP`] and [`TCP_LISTENERS_MAP`]
/// because state changes after `connect()` happen in softirq context.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketOwner {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub _reserved: u32,
    pub cgroup_id: u64,
    /// Boot-clock nanoseconds of the connect or of the accepted handshake.
    pub since_boot_ns: u64,
}

/// A TCP socket changed state in a way worth an event (see [`TcpAction`]).
/// Addresses are network order; IPv4 uses the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpEvent {
    pub header: EventHeader,
    /// A [`TcpAction`] id.
    pub action: u32,
    /// 0 when no owner is known (socket opened before the agent started).
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub _reserved: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// For [`TcpAction::Closed`]: how long it was established.
    pub duration_ns: u64,
    /// For [`TcpAction::Closed`]: payload bytes sent (retransmissions
    /// included).
    pub bytes_sent: u64,
    /// For [`TcpAction::Closed`]: payload bytes received.
    pub bytes_received: u64,
}

/// The owner of the connection is unknown to the kernel maps.
pub const FLAG_OWNER_UNKNOWN: u32 = 1 << 7;
/// Byte counters could not be read.
pub const FLAG_BYTES_UNKNOWN: u32 = 1 << 8;

/// What a process did to a watched file.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileAction {
    OpenWrite = 1,
    OpenRead = 2,
    Unlink = 3,
    Rename = 4,
    Chmod = 5,
}

impl FileAction {
    pub const fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::OpenWrite),
            2 => Some(Self::OpenRead),
            3 => Some(Self::Unlink),
            4 => Some(Self::Rename),
            5 => Some(Self::Chmod),
            _ => None,
        }
    }
}

/// [`WatchPrefix::kinds`]: report writes (open for write, unlink, rename,
/// chmod) under the prefix.
pub const WATCH_WRITE: u32 = 1;
/// [`WatchPrefix::kinds`]: report opens for reading under the prefix.
pub const WATCH_READ: u32 = 2;

/// One watched path prefix; `len == 0` ends the list.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchPrefix {
    pub len: u32,
    /// Bit set of `WATCH_*`.
    pub kinds: u32,
    pub bytes: [u8; PREFIX_CAPACITY],
}

/// A file operation on a watched path, at the system call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FileEvent {
    pub header: EventHeader,
    /// A [`FileAction`] id.
    pub action: u32,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub open_flags: u32,
    pub mode: u32,
    /// Valid bytes of `path` / `target`, NUL excluded.
    pub path_len: u32,
    pub target_len: u32,
    pub path: [u8; PATH_CAPACITY],
    /// The new path of a rename.
    pub target: [u8; PATH_CAPACITY],
}

/// A path did not fit in [`PATH_CAPACITY`] bytes and was cut.
pub const FLAG_PATH_TRUNCATED: u32 = 1 << 9;

/// Name of the fentry program on `commit_creds`, the credential sensor's
/// preferred hook.
pub const COMMIT_CREDS_PROGRAM: &str = "fentry_commit_creds";

/// Name of the cgroup socket-buffer egress program that copies DNS queries.
pub const DNS_EGRESS_PROGRAM: &str = "dns_egress";

/// DNS message bytes copied per query: a whole classic DNS message over UDP
/// (RFC 1035 limits those to 512 bytes), so the question is always there.
/// A power of two: the kernel program bounds the copy with a mask.
pub const DNS_PAYLOAD_CAPACITY: usize = 512;

/// A UDP datagram to port 53 leaving the guarded cgroup, as the kernel saw
/// it: addresses and the start of the DNS message. User space parses the
/// question.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsEvent {
    pub header: EventHeader,
    /// Process that sent it, when the datagram left in its context (0 when
    /// unknown, e.g. queued and sent later by the kernel).
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    /// 4 or 6.
    pub ip_version: u32,
    pub source_port: u16,
    pub destination_port: u16,
    /// Addresses in network byte order; IPv4 uses the first 4 bytes.
    pub source: [u8; 16],
    pub destination: [u8; 16],
    /// Length of the whole DNS message (UDP payload).
    pub message_len: u32,
    /// Valid bytes of `payload`.
    pub payload_len: u32,
    pub payload: [u8; DNS_PAYLOAD_CAPACITY],
}

/// Names of the cgroup `connect4`/`connect6` programs that decide outbound
/// connections of the guarded cgroup.
pub const GUARD_CONNECT4_PROGRAM: &str = "guard_connect4";
pub const GUARD_CONNECT6_PROGRAM: &str = "guard_connect6";
/// Names of the cgroup `sendmsg4`/`sendmsg6` programs that decide UDP
/// datagrams sent without `connect()` (with an explicit address).
pub const GUARD_SENDMSG4_PROGRAM: &str = "guard_sendmsg4";
pub const GUARD_SENDMSG6_PROGRAM: &str = "guard_sendmsg6";
/// Longest-prefix-match map of verdicts: [`VerdictKey`] → [`Verdict`].
pub const VERDICTS_MAP: &str = "VERDICTS";
/// One-entry array: the [`GuardSettings`] of the loaded policy.
pub const GUARD_SETTINGS_MAP: &str = "GUARD_SETTINGS";
/// Rules the verdict map holds at most.
pub const VERDICTS_CAPACITY: u32 = 16_384;

/// What happens to a connection.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerdictAction {
    /// Passes.
    Allow = 1,
    /// Fails with EPERM in the kernel.
    Deny = 2,
    /// Passes, and is recorded as a would-be denial (dry run).
    Audit = 3,
    /// TCP: rewritten to the agent's tunnel listener, the original
    /// destination kept in [`TUNNEL_PENDING_MAP`]; other protocols cannot be
    /// tunnelled and fail with EPERM.
    Tunnel = 4,
    /// The verdict depends on the caller: [`Verdict::rule`] is the index of
    /// a [`GuardChain`] in [`GUARD_CHAINS_MAP`], walked with the caller's
    /// user-group and binary-group bits.
    Chain = 5,
}

impl VerdictAction {
    pub const fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Allow),
            2 => Some(Self::Deny),
            3 => Some(Self::Audit),
            4 => Some(Self::Tunnel),
            5 => Some(Self::Chain),
            _ => None,
        }
    }
}

/// The data of a verdict map key, matched bit by bit from the start:
/// `port` (network order; 0 in rules for any port), `family`, then the
/// address (IPv4 in the first 4 bytes). A rule for `ip/len` on one port has
/// prefix length `32 + len`; the kernel looks up the exact port, then port 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VerdictKey {
    pub port: u16,
    pub family: u16,
    pub addr: [u8; 16],
}

/// Bits of [`VerdictKey`] before the address.
pub const VERDICT_KEY_ADDR_OFFSET_BITS: u32 = 32;

/// A rule's verdict: its action and its index in the loaded policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// A [`VerdictAction`] id.
    pub action: u32,
    /// Index of the rule in the policy (`u32::MAX`: the default).
    pub rule: u32,
}

/// The default verdict, and whether allowed connections are recorded too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardSettings {
    /// A [`VerdictAction`] id; 0 (no policy loaded) allows without record.
    pub default_action: u32,
    /// 1: emit a decision event for allowed connections as well.
    pub record_allows: u32,
    pub policy_version: u64,
    /// The agent's tunnel listener port (network order) on 127.0.0.1 and
    /// ::1; 0 when the agent runs no listener, and then `tunnel` verdicts
    /// fail closed (EPERM).
    pub tunnel_port: u16,
    pub _reserved: u16,
    /// The agent's own process: its connections are never redirected or
    /// denied (the tunnel's own connections to gateways and services).
    pub agent_tgid: u32,
}

/// The rule index of a default verdict.
pub const DEFAULT_RULE: u32 = u32::MAX;

/// Array: chain index → [`GuardChain`], for destinations whose verdict
/// depends on the caller's user or binary.
pub const GUARD_CHAINS_MAP: &str = "GUARD_CHAINS";
pub const GUARD_CHAINS_CAPACITY: u32 = 1_024;
/// Candidates one chain holds (the kernel walks at most this many).
pub const GUARD_CHAIN_LENGTH: usize = 32;
/// Hash: uid → bits of the policy's user groups it belongs to.
pub const USER_GROUPS_MAP: &str = "USER_GROUPS";
pub const USER_GROUPS_CAPACITY: u32 = 8_192;
/// Hash: [`InodeKey`] of an executable → bits of the policy's binary
/// groups it belongs to; read at exec.
pub const BINARY_INODES_MAP: &str = "BINARY_INODES";
pub const BINARY_INODES_CAPACITY: u32 = 4_096;
/// LRU hash: tgid → binary-group bits of the program it runs, set at exec
/// from [`BINARY_INODES_MAP`] and inherited at fork.
pub const PROCESS_BINARIES_MAP: &str = "PROCESS_BINARIES";
pub const PROCESS_BINARIES_CAPACITY: u32 = 65_536;

/// [`GuardCandidate::flags`]: a dry-run rule (records, never decides).
pub const CANDIDATE_DRY_RUN: u32 = 1;

/// One rule of a chain: it matches a caller in one of `users` (0: any) and
/// one of `binaries` (0: any) and in none of the `except_*` groups.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardCandidate {
    pub users: u64,
    pub binaries: u64,
    pub except_users: u64,
    pub except_binaries: u64,
    /// A [`VerdictAction`] id: allow, deny or tunnel.
    pub action: u32,
    /// [`CANDIDATE_DRY_RUN`].
    pub flags: u32,
    pub rule: u32,
    pub _reserved: u32,
}

/// Candidates in precedence order: the first enforced match decides; an
/// allow that a dry-run candidate before it would deny passes as audit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardChain {
    pub len: u32,
    pub _reserved: u32,
    pub candidates: [GuardCandidate; GUARD_CHAIN_LENGTH],
}

impl Default for GuardChain {
    fn default() -> Self {
        Self {
            len: 0,
            _reserved: 0,
            candidates: [GuardCandidate::default(); GUARD_CHAIN_LENGTH],
        }
    }
}

/// An executable's identity in the kernel: its filesystem's device number
/// as the kernel encodes it (`major << 20 | minor`) and its inode number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InodeKey {
    pub dev: u64,
    pub ino: u64,
}

/// Name of the `sock_ops` program that files a redirected socket's original
/// destination under its local address once the kernel picked its port.
pub const TUNNEL_SOCK_OPS_PROGRAM: &str = "tunnel_sock_ops";
/// LRU hash: socket cookie → [`TunnelOrigin`], written at `connect()`.
pub const TUNNEL_PENDING_MAP: &str = "TUNNEL_PENDING";
/// LRU hash: [`TunnelPeerKey`] (the redirected socket's local address, i.e.
/// the peer the tunnel listener accepts) → [`TunnelOrigin`].
pub const TUNNEL_ORIGINS_MAP: &str = "TUNNEL_ORIGINS";
/// Redirected connections in flight at most (both maps).
pub const TUNNEL_ORIGINS_CAPACITY: u32 = 65_536;

/// Name of the `cgroup_skb/ingress` program that keeps the network away from
/// protected services: TCP to a port in [`PROTECTED_PORTS_MAP`] is dropped
/// unless it arrives over loopback (i.e. from this host: the gateway).
pub const GUARD_INGRESS_PROGRAM: &str = "guard_ingress";
/// Hash: TCP port (host order) → index of the service's rule.
pub const PROTECTED_PORTS_MAP: &str = "PROTECTED_PORTS";
pub const PROTECTED_PORTS_CAPACITY: u32 = 1_024;
/// [`EventHeader::flags`] bit of a [`DecisionEvent`] about an inbound
/// connection (`addr` is then the remote source, `port` the local port).
pub const DECISION_FLAG_INBOUND: u32 = 1;

/// Where a redirected connection was going, and who made it: what the tunnel
/// listener needs to carry it on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelOrigin {
    /// Original destination (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    /// Original destination port, host order.
    pub port: u16,
    /// 4 or 6.
    pub ip_version: u16,
    /// Index of the rule that chose the tunnel.
    pub rule: u32,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub policy_version: u64,
    /// When the process called `connect()`, boot-clock nanoseconds.
    pub boot_ns: u64,
}

/// A redirected socket's local end, as the tunnel listener sees its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TunnelPeerKey {
    /// Local address (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    /// Local port, host order.
    pub port: u16,
    /// 4 or 6.
    pub ip_version: u16,
}

/// A connection the guard decided, as the kernel saw it at `connect()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecisionEvent {
    pub header: EventHeader,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub policy_version: u64,
    /// A [`VerdictAction`] id: what the matched rule (or the default) says.
    pub action: u32,
    pub rule: u32,
    /// 4 or 6.
    pub ip_version: u32,
    /// Host order.
    pub port: u16,
    /// 6 (TCP) or 17 (UDP).
    pub protocol: u16,
    pub addr: [u8; 16],
}

/// Which member of the setuid family changed credentials.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredSyscall {
    Setuid = 1,
    Setgid = 2,
    Setreuid = 3,
    Setregid = 4,
    Setresuid = 5,
    Setresgid = 6,
    /// The kernel committed new credentials (`commit_creds`): any cause,
    /// the setuid family, a set-user-id program's exec, capset.
    CommitCreds = 7,
}

impl CredSyscall {
    pub const fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Setuid),
            2 => Some(Self::Setgid),
            3 => Some(Self::Setreuid),
            4 => Some(Self::Setregid),
            5 => Some(Self::Setresuid),
            6 => Some(Self::Setresgid),
            7 => Some(Self::CommitCreds),
            _ => None,
        }
    }
}

/// Real and effective ids of a task at one moment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CredIds {
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
}

/// A successful setuid-family call that changed the caller's ids.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CredEvent {
    pub header: EventHeader,
    pub pid: u32,
    /// A [`CredSyscall`] id.
    pub syscall: u32,
    pub old: CredIds,
    pub new: CredIds,
    pub cgroup_id: u64,
}

/// Ids of a task between entry and exit of a setuid-family call, by
/// pid_tgid.
pub const CRED_PENDING_MAP: &str = "CRED_PENDING";

/// Byte offsets inside kernel structures, resolved by user space from the
/// running kernel's BTF and handed to the programs as a read-only global. A
/// zero `valid` means the programs must not follow kernel pointers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub valid: u32,
    /// Bit set of `OPT_*`: optional offsets that are present.
    pub optional: u32,
    pub task_real_parent: u32,
    pub task_tgid: u32,
    pub task_mm: u32,
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    pub task_cred: u32,
    pub cred_uid: u32,
    pub cred_gid: u32,
    pub cred_euid: u32,
    pub cred_egid: u32,
    pub task_exit_code: u32,
    pub task_start_boottime: u32,
    pub task_signal: u32,
    pub signal_live: u32,
    /// `task_struct.loginuid` ([`OPT_LOGINUID`]).
    pub task_loginuid: u32,
    /// Offset of `group_dead` in the `sched_process_exit` record
    /// ([`OPT_EXIT_GROUP_DEAD`]; kernels since 6.16).
    pub tp_exit_group_dead: u32,
    /// Offset of `clone_flags` in the `task_newtask` record.
    pub tp_newtask_clone_flags: u32,
    pub task_group_leader: u32,
    /// `tcp_sock.bytes_sent` (payload sent, retransmissions included),
    /// `tcp_sock.bytes_received` (received sequence space: payload plus the
    /// peer's FIN) and `sock.sk_shutdown` (to take that FIN out)
    /// ([`OPT_TCP_BYTES`]).
    pub tcp_bytes_sent: u32,
    pub tcp_bytes_received: u32,
    pub sock_shutdown: u32,
    /// `mm_struct.exe_file`, `file.f_inode`, `inode.i_ino`, `inode.i_sb`
    /// and `super_block.s_dev` ([`OPT_EXE_INODE`]).
    pub mm_exe_file: u32,
    pub file_inode: u32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub sb_dev: u32,
    /// `inode.i_size` and the inode's modification time: seconds (an `s64`)
    /// and nanoseconds (read as a `u32`), wherever this kernel keeps them
    /// (`i_mtime_sec`/`i_mtime_nsec` since 6.11, a `timespec64` before)
    /// ([`OPT_EXE_VERSION`]).
    pub inode_size: u32,
    pub inode_mtime_sec: u32,
    pub inode_mtime_nsec: u32,
}

/// [`KernelOffsets::task_loginuid`] is valid.
pub const OPT_LOGINUID: u32 = 1 << 0;
/// [`KernelOffsets::tp_exit_group_dead`] is valid.
pub const OPT_EXIT_GROUP_DEAD: u32 = 1 << 1;
/// [`KernelOffsets::tcp_bytes_sent`], `tcp_bytes_received` and
/// `sock_shutdown` are valid.
pub const OPT_TCP_BYTES: u32 = 1 << 2;
/// [`KernelOffsets::mm_exe_file`] and the inode offsets are valid.
pub const OPT_EXE_INODE: u32 = 1 << 3;
/// [`KernelOffsets::inode_size`] and the modification-time offsets are
/// valid (with [`OPT_EXE_INODE`]).
pub const OPT_EXE_VERSION: u32 = 1 << 4;

// Wire layout is part of the contract between kernel and user space: fixed
// sizes, no implicit padding.
const _: () = assert!(size_of::<EventHeader>() == 16);
const _: () = assert!(align_of::<EventHeader>() == 8);
const _: () =
    assert!(size_of::<ExecEvent>() == 16 + 12 * 4 + 5 * 8 + FILENAME_CAPACITY + ARGS_CAPACITY);
const _: () = assert!(size_of::<ForkEvent>() == 16 + 6 * 4 + 2 * 8);
const _: () = assert!(size_of::<ExitEvent>() == 16 + 6 * 4 + 2 * 8);
const _: () = assert!(size_of::<KernelOffsets>() == 31 * 4);
const _: () = assert!(size_of::<SocketOwner>() == 32);
const _: () = assert!(size_of::<CredIds>() == 16);
const _: () = assert!(size_of::<CredEvent>() == 16 + 8 + 2 * 16 + 8);
const _: () = assert!(size_of::<WatchPrefix>() == 8 + PREFIX_CAPACITY);
const _: () = assert!(size_of::<FileEvent>() == 16 + 4 * 4 + 8 + 4 * 4 + 2 * PATH_CAPACITY);
const _: () = assert!(
    size_of::<DnsEvent>() == 16 + 4 * 4 + 8 + 4 + 2 * 2 + 2 * 16 + 2 * 4 + DNS_PAYLOAD_CAPACITY
);
const _: () = assert!(size_of::<VerdictKey>() == 20);
const _: () = assert!(size_of::<Verdict>() == 8);
const _: () = assert!(size_of::<GuardSettings>() == 24);
const _: () = assert!(size_of::<GuardCandidate>() == 48);
const _: () = assert!(size_of::<GuardChain>() == 8 + 48 * GUARD_CHAIN_LENGTH);
const _: () = assert!(size_of::<InodeKey>() == 16);
const _: () = assert!(size_of::<TunnelOrigin>() == 16 + 2 * 2 + 5 * 4 + 3 * 8);
const _: () = assert!(size_of::<TunnelPeerKey>() == 20);
const _: () = assert!(size_of::<DecisionEvent>() == 16 + 4 * 4 + 2 * 8 + 3 * 4 + 2 * 2 + 16);
const _: () = assert!(size_of::<TcpEvent>() == 16 + 4 * 4 + 8 + 4 * 2 + 2 * 16 + 3 * 8);
const _: () = assert!(ARGS_CAPACITY.is_power_of_two());
const _: () = assert!(FILENAME_CAPACITY.is_power_of_two());

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `#[repr(C)]`, no padding (asserted above).
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SocketOwner {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WatchPrefix {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VerdictKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Verdict {}
    // SAFETY: plain `#[repr(C)]` data without padding (sizes asserted above).
    unsafe impl aya::Pod for super::GuardChain {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InodeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GuardSettings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TunnelOrigin {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TunnelPeerKey {}
}
