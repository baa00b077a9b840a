//! Wire → storage conversion of telemetry events, in one place: every check
//! an event must pass before it is stored, the table it goes to, and the
//! mapping of its fields to that table's columns.
//!
//! `exec`, `fork` and `exit` events become `process_events` rows (their
//! `event_type` tells them apart, and each carries the process's ancestry);
//! `creds` events (a process changed its user or group ids) become
//! `process_events` rows too, `event_type = 'cred_change'`;
//! `tcp` events become `network_events` rows (with the owner's ancestry);
//! `file` events become `file_events` rows (with the process's ancestry);
//! `dns` events become `dns_events` rows (with the sender's ancestry);
//! `decision` events become `decisions` rows (with the process's ancestry);
//! `gap` events become `gaps` rows.
//!
//! Exec, TCP, file, DNS and decision events name who the process is beyond
//! its ids
//! (`user_name`, `cgroup_path`, `container_id`); those three are checked the
//! same way on every kind ([`check_owner`]).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use proto::telemetry::{
    event::Kind, AgentIdentity, Ancestor, CredentialChange, Decision, DnsQuery, Event,
    FileActivity, Gap, ProcessExec, ProcessExit, ProcessFork, TcpConnection,
};

use zt_identity::{SpiffeId, SpiffeIdError};

use crate::storage::{
    DecisionRow, DnsEventRow, FileEventRow, GapRow, NetworkEventRow, ProcessEventRow,
    CRED_SYSCALLS, DECISION_ACTIONS, DECISION_ALLOW, DECISION_AUDIT, DECISION_DENY,
    DECISION_DIRECTIONS, DECISION_PROTOCOLS, DECISION_REASONS, DECISION_TUNNEL, DECISION_VERDICTS,
    DIRECTION_INBOUND, DIRECTION_LISTEN, DIRECTION_OUTBOUND, DIRECTION_UNKNOWN, ENFORCEMENT_POINTS,
    EVENT_TYPE_CRED_CHANGE, EVENT_TYPE_EXEC, EVENT_TYPE_EXIT, EVENT_TYPE_FORK, FILE_CHMOD,
    FILE_OPEN_READ, FILE_OPEN_WRITE, FILE_RENAME, FILE_UNLINK, NO_EXIT_STATUS, NO_LOGINUID,
    TCP_ACCEPTED, TCP_CLOSED, TCP_CONNECTED, TCP_CONNECT_ATTEMPT, TCP_CONNECT_FAILED, TCP_LISTEN,
    VERDICT_CLOSED, VERDICT_DENIED, VERDICT_TUNNELLED, VERDICT_WOULD_DENY,
};

/// Longest excerpt of a refused text value quoted in a [`RejectReason`].
const REASON_EXCERPT_CHARS: usize = 64;

/// Length of `process_events.exe_sha256` when known: a SHA-256 in hex.
const EXE_SHA256_HEX_LEN: usize = 64;
/// Longest `user_name` stored (every table that has one), in bytes.
const MAX_USER_NAME_BYTES: usize = 256;
/// Longest `cgroup_path` stored (every table that has one), in bytes
/// (`PATH_MAX`).
const MAX_CGROUP_PATH_BYTES: usize = 4096;
/// Most `decisions.nearest_rules` stored per decision; the rest are dropped.
pub const MAX_NEAREST_RULES: usize = 16;
/// Longest `decisions.nearest_rules` entry stored, in characters; longer
/// ones are cut.
pub const MAX_NEAREST_RULE_CHARS: usize = 256;

/// Why an event was refused. Refused events are counted and reported in the
/// acknowledgement, never stored and never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("batch has no agent identity")]
    MissingIdentity,
    #[error("agent identity has an empty {0}")]
    EmptyIdentityField(&'static str),
    #[error("event seq {seq} has no kind")]
    MissingKind { seq: u64 },
    #[error("event seq {seq} has time 0")]
    ZeroTime { seq: u64 },
    #[error("event seq {seq} has a time beyond 2106 ({time_unix_ns} ns)")]
    TimeOutOfRange { seq: u64, time_unix_ns: u64 },
    #[error(
        "exec event seq {seq} has exe_sha256 {exe_sha256:?}, \
         not empty or 64 lowercase hex characters"
    )]
    ExecBadSha256 {
        seq: u64,
        /// The refused text, cut to 64 characters.
        exe_sha256: String,
    },
    /// An exec, tcp, file, dns or decision event (`kind`) whose `user_name`
    /// is too long.
    #[error("{kind} event seq {seq} has a user_name of {bytes} bytes, beyond 256")]
    UserNameTooLong {
        seq: u64,
        kind: &'static str,
        bytes: usize,
    },
    #[error(
        "{kind} event seq {seq} has container_id {container_id:?}, \
         not empty or 64 lowercase hex characters"
    )]
    BadContainerId {
        seq: u64,
        kind: &'static str,
        /// The refused text, cut to 64 characters.
        container_id: String,
    },
    #[error("{kind} event seq {seq} has a cgroup_path of {bytes} bytes, beyond 4096")]
    CgroupPathTooLong {
        seq: u64,
        kind: &'static str,
        bytes: usize,
    },
    #[error("{kind} event seq {seq} has cgroup_path {cgroup_path:?}, not starting with '/'")]
    CgroupPathNotAbsolute {
        seq: u64,
        kind: &'static str,
        /// The refused text, cut to 64 characters.
        cgroup_path: String,
    },
    #[error("exit event seq {seq} has exit status {status}, beyond 255")]
    ExitStatusOutOfRange { seq: u64, status: u32 },
    #[error("exit event seq {seq} has signal {signal}, not in 1..=255")]
    ExitSignalOutOfRange { seq: u64, signal: u32 },
    #[error("exit event seq {seq} has both an exit status and a signal")]
    ExitStatusAndSignal { seq: u64 },
    #[error(
        "credential change event seq {seq} has unknown syscall {syscall:?}, \
         not setuid, setgid, setreuid, setregid, setresuid or setresgid"
    )]
    CredUnknownSyscall {
        seq: u64,
        /// The refused text, cut to 64 characters.
        syscall: String,
    },
    #[error("gap event seq {seq} has an empty {field}")]
    GapEmptyField { seq: u64, field: &'static str },
    #[error("gap event seq {seq} reports no lost events")]
    GapNothingLost { seq: u64 },
    #[error("gap event seq {seq} ends before it starts ({from_unix_ns} > {to_unix_ns} ns)")]
    GapReversed {
        seq: u64,
        from_unix_ns: u64,
        to_unix_ns: u64,
    },
    #[error("tcp event seq {seq} has unknown action {action:?}")]
    TcpUnknownAction { seq: u64, action: String },
    #[error("tcp event seq {seq} has ip version {ip_version}, not 4 or 6")]
    TcpIpVersion { seq: u64, ip_version: u32 },
    #[error("tcp event seq {seq} has {field} {port}, beyond 65535")]
    TcpPortOutOfRange {
        seq: u64,
        field: &'static str,
        port: u32,
    },
    #[error("tcp event seq {seq} has {field} {addr:?}, not an IPv{ip_version} address")]
    TcpBadAddress {
        seq: u64,
        field: &'static str,
        ip_version: u8,
        /// The refused text, cut to 64 characters.
        addr: String,
    },
    #[error("file event seq {seq} has unknown action {action:?}")]
    FileUnknownAction { seq: u64, action: String },
    #[error("file event seq {seq} has an empty path")]
    FileEmptyPath { seq: u64 },
    #[error("file event seq {seq} is a rename without a target path")]
    FileRenameWithoutTarget { seq: u64 },
    #[error("file event seq {seq} is a {action} with a target path")]
    FileTargetOnNonRename { seq: u64, action: &'static str },
    #[error("dns event seq {seq} has ip version {ip_version}, not 4 or 6")]
    DnsIpVersion { seq: u64, ip_version: u32 },
    #[error("dns event seq {seq} has {field} {addr:?}, not an IPv{ip_version} address")]
    DnsBadAddress {
        seq: u64,
        field: &'static str,
        ip_version: u8,
        /// The refused text, cut to 64 characters.
        addr: String,
    },
    /// A port, the transaction id or the question count beyond 16 bits.
    #[error("dns event seq {seq} has {field} {value}, beyond 65535")]
    DnsFieldOutOfRange {
        seq: u64,
        field: &'static str,
        value: u32,
    },
    /// A query whose question was read (no `parse_error`) without its name
    /// or type.
    #[error("dns event seq {seq} has an empty {field} and no parse_error")]
    DnsEmptyQuestion { seq: u64, field: &'static str },
    #[error(
        "decision event seq {seq} has unknown action {action:?}, \
         not allow, deny, audit or tunnel"
    )]
    DecisionUnknownAction {
        seq: u64,
        /// The refused text, cut to 64 characters.
        action: String,
    },
    #[error(
        "decision event seq {seq} has unknown verdict {verdict:?}, \
         not allowed, denied, would_deny, tunnelled or closed"
    )]
    DecisionUnknownVerdict {
        seq: u64,
        /// The refused text, cut to 64 characters.
        verdict: String,
    },
    /// A verdict its action cannot give: `denied` from a rule that is not
    /// `deny` or `tunnel`, `would_deny` from one that is not `audit`,
    /// `tunnelled` from one that is not `tunnel`, `closed` from one that is
    /// not `allow` or `tunnel`.
    #[error(
        "decision event seq {seq} has verdict {verdict} with action {action}; \
         {verdict} comes only of action {}",
        or_list(.required)
    )]
    DecisionVerdictMismatch {
        seq: u64,
        action: &'static str,
        verdict: &'static str,
        /// The actions that can give `verdict`.
        required: &'static [&'static str],
    },
    #[error("decision event seq {seq} has unknown protocol {protocol:?}, not tcp or udp")]
    DecisionUnknownProtocol {
        seq: u64,
        /// The refused text, cut to 64 characters.
        protocol: String,
    },
    #[error(
        "decision event seq {seq} has unknown enforcement_point {enforcement_point:?}, \
         not kernel, kernel_ingress, tunnel or gateway"
    )]
    DecisionUnknownEnforcementPoint {
        seq: u64,
        /// The refused text, cut to 64 characters.
        enforcement_point: String,
    },
    #[error("decision event seq {seq} has ip version {ip_version}, not 4 or 6")]
    DecisionIpVersion { seq: u64, ip_version: u32 },
    #[error("decision event seq {seq} has remote_addr {addr:?}, not an IPv{ip_version} address")]
    DecisionBadAddress {
        seq: u64,
        ip_version: u8,
        /// The refused text, cut to 64 characters.
        addr: String,
    },
    #[error("decision event seq {seq} has remote_port {port}, beyond 65535")]
    DecisionPortOutOfRange { seq: u64, port: u32 },
    #[error(
        "decision event seq {seq} has exe_sha256 {exe_sha256:?}, \
         not empty or 64 lowercase hex characters"
    )]
    DecisionBadSha256 {
        seq: u64,
        /// The refused text, cut to 64 characters.
        exe_sha256: String,
    },
    #[error("decision event seq {seq} has peer_id {peer_id:?}, not empty or a SPIFFE id: {error}")]
    DecisionBadPeerId {
        seq: u64,
        /// The refused text, cut to 64 characters.
        peer_id: String,
        error: SpiffeIdError,
    },
    #[error(
        "decision event seq {seq} has unknown direction {direction:?}, \
         not outbound, inbound or empty"
    )]
    DecisionUnknownDirection {
        seq: u64,
        /// The refused text, cut to 64 characters.
        direction: String,
    },
    #[error(
        "decision event seq {seq} has unknown reason {reason:?}, \
         not policy, no_service, revoked, fail_closed, service_unreachable, \
         gateway_unreachable, protected_port, bad_request or empty"
    )]
    DecisionUnknownReason {
        seq: u64,
        /// The refused text, cut to 64 characters.
        reason: String,
    },
    #[error(
        "decision event seq {seq} has gateway {gateway:?}, \
         not empty or an address and port (ip:port, [ipv6]:port)"
    )]
    DecisionBadGateway {
        seq: u64,
        /// The refused text, cut to 64 characters.
        gateway: String,
    },
}

/// `a`, `a or b`, `a, b or c`: the values of `values` for a reason.
fn or_list(values: &[&str]) -> String {
    match values {
        [] => String::new(),
        [only] => (*only).to_owned(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// The sender of a batch, checked once per batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender<'a> {
    pub org_id: &'a str,
    pub device_id: &'a str,
    pub hostname: &'a str,
    pub boot_id: &'a str,
    pub agent_version: &'a str,
}

impl<'a> TryFrom<Option<&'a AgentIdentity>> for Sender<'a> {
    type Error = RejectReason;

    fn try_from(identity: Option<&'a AgentIdentity>) -> Result<Self, Self::Error> {
        let id = identity.ok_or(RejectReason::MissingIdentity)?;
        for (name, value) in [
            ("org_id", &id.org_id),
            ("device_id", &id.device_id),
            ("boot_id", &id.boot_id),
        ] {
            if value.trim().is_empty() {
                return Err(RejectReason::EmptyIdentityField(name));
            }
        }
        Ok(Sender {
            org_id: &id.org_id,
            device_id: &id.device_id,
            hostname: &id.hostname,
            boot_id: &id.boot_id,
            agent_version: &id.agent_version,
        })
    }
}

/// An event of a batch, with its sender and the time the collector got it.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    pub sender: &'a Sender<'a>,
    pub event: &'a Event,
    /// Seconds since the Unix epoch.
    pub ingested_at: u32,
}

/// A converted event: a row of the table its kind is stored in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventRow {
    /// `exec`, `fork`, `exit` or `creds`: a row of `process_events`.
    ProcessEvent(ProcessEventRow),
    /// `tcp`: a row of `network_events`.
    NetworkEvent(NetworkEventRow),
    /// `file`: a row of `file_events`.
    FileEvent(FileEventRow),
    /// `dns`: a row of `dns_events`.
    DnsEvent(DnsEventRow),
    /// `decision`: a row of `decisions`.
    Decision(DecisionRow),
    /// `gap`: a row of `gaps`.
    Gap(GapRow),
}

impl TryFrom<Received<'_>> for EventRow {
    type Error = RejectReason;

    fn try_from(received: Received<'_>) -> Result<Self, Self::Error> {
        let event = received.event;
        let seq = event.seq;
        let kind = event
            .kind
            .as_ref()
            .ok_or(RejectReason::MissingKind { seq })?;
        let time = event_time(event)?;
        let header = Header { received, time };
        Ok(match kind {
            Kind::Exec(exec) => EventRow::ProcessEvent(exec_row(&header, exec)?),
            Kind::Fork(fork) => EventRow::ProcessEvent(fork_row(&header, fork)),
            Kind::Exit(exit) => EventRow::ProcessEvent(exit_row(&header, exit)?),
            Kind::Creds(creds) => EventRow::ProcessEvent(cred_change_row(&header, creds)?),
            Kind::Tcp(tcp) => EventRow::NetworkEvent(tcp_row(&header, tcp)?),
            Kind::File(file) => EventRow::FileEvent(file_row(&header, file)?),
            Kind::Dns(dns) => EventRow::DnsEvent(dns_row(&header, dns)?),
            Kind::Decision(decision) => EventRow::Decision(decision_row(&header, decision)?),
            Kind::Gap(gap) => EventRow::Gap(gap_row(&header, gap)?),
        })
    }
}

/// Seconds since the Unix epoch of a valid event time.
fn event_time(event: &Event) -> Result<u32, RejectReason> {
    let seq = event.seq;
    if event.time_unix_ns == 0 {
        return Err(RejectReason::ZeroTime { seq });
    }
    u32::try_from(event.time_unix_ns / 1_000_000_000).map_err(|_| RejectReason::TimeOutOfRange {
        seq,
        time_unix_ns: event.time_unix_ns,
    })
}

/// What every row of an event shares: who sent it, when, and its seq.
struct Header<'a> {
    received: Received<'a>,
    /// Event time, seconds since the Unix epoch (checked).
    time: u32,
}

impl Header<'_> {
    /// A `process_events` row with the columns every event type fills
    /// (identity, time, ancestry) and the others at their neutral value.
    fn process_row(&self, event_type: &str) -> ProcessEventRow {
        let Received {
            sender,
            event,
            ingested_at,
        } = self.received;
        let ancestry = Ancestry::of(&event.ancestors);
        ProcessEventRow {
            org_id: sender.org_id.to_owned(),
            time: self.time,
            time_ns: event.time_unix_ns,
            device_id: sender.device_id.to_owned(),
            hostname: sender.hostname.to_owned(),
            boot_id: sender.boot_id.to_owned(),
            seq: event.seq,
            pid: 0,
            tid: 0,
            ppid: 0,
            uid: 0,
            gid: 0,
            cgroup_id: 0,
            filename: String::new(),
            argv: Vec::new(),
            argv_truncated: 0,
            filename_truncated: 0,
            ppid_unknown: 0,
            agent_version: sender.agent_version.to_owned(),
            ingested_at,
            event_type: event_type.to_owned(),
            euid: 0,
            egid: 0,
            loginuid: NO_LOGINUID,
            process_start_ns: 0,
            exe: String::new(),
            clone_flags: 0,
            exit_status: NO_EXIT_STATUS,
            exit_signal: 0,
            core_dumped: 0,
            lifetime_ns: 0,
            ancestor_pids: ancestry.pids,
            ancestor_exes: ancestry.exes,
            ancestor_argv0: ancestry.argv0,
            ancestor_start_ns: ancestry.start_ns,
            exe_sha256: String::new(),
            user_name: String::new(),
            previous_uid: 0,
            previous_euid: 0,
            previous_gid: 0,
            previous_egid: 0,
            cred_syscall: String::new(),
            cgroup_path: String::new(),
            container_id: String::new(),
        }
    }
}

/// Who a process is beyond its ids, as exec, TCP, file, DNS and decision
/// events name it: `''` in any of them means unknown.
struct Owner<'a> {
    user_name: &'a str,
    cgroup_path: &'a str,
    container_id: &'a str,
}

/// Refuses a `user_name` longer than [`MAX_USER_NAME_BYTES`], a
/// `container_id` that is neither empty (unknown, or not in a container) nor
/// 64 lowercase hex characters, and a non-empty `cgroup_path` longer than
/// [`MAX_CGROUP_PATH_BYTES`] or not starting with `/`. `kind` names the
/// event kind in the reason.
fn check_owner(seq: u64, kind: &'static str, owner: &Owner<'_>) -> Result<(), RejectReason> {
    if owner.user_name.len() > MAX_USER_NAME_BYTES {
        return Err(RejectReason::UserNameTooLong {
            seq,
            kind,
            bytes: owner.user_name.len(),
        });
    }
    if !is_sha256_hex_or_empty(owner.container_id) {
        return Err(RejectReason::BadContainerId {
            seq,
            kind,
            container_id: excerpt(owner.container_id),
        });
    }
    if owner.cgroup_path.len() > MAX_CGROUP_PATH_BYTES {
        return Err(RejectReason::CgroupPathTooLong {
            seq,
            kind,
            bytes: owner.cgroup_path.len(),
        });
    }
    if !owner.cgroup_path.is_empty() && !owner.cgroup_path.starts_with('/') {
        return Err(RejectReason::CgroupPathNotAbsolute {
            seq,
            kind,
            cgroup_path: excerpt(owner.cgroup_path),
        });
    }
    Ok(())
}

/// Refuses an `exe_sha256` that is neither empty (unknown) nor 64 lowercase
/// hex characters, and an owner that [`check_owner`] refuses.
fn exec_row(header: &Header<'_>, exec: &ProcessExec) -> Result<ProcessEventRow, RejectReason> {
    let seq = header.received.event.seq;
    if !is_sha256_hex_or_empty(&exec.exe_sha256) {
        return Err(RejectReason::ExecBadSha256 {
            seq,
            exe_sha256: excerpt(&exec.exe_sha256),
        });
    }
    check_owner(
        seq,
        "exec",
        &Owner {
            user_name: &exec.user_name,
            cgroup_path: &exec.cgroup_path,
            container_id: &exec.container_id,
        },
    )?;
    Ok(ProcessEventRow {
        pid: exec.pid,
        tid: exec.tid,
        ppid: exec.ppid,
        uid: exec.uid,
        gid: exec.gid,
        cgroup_id: exec.cgroup_id,
        filename: exec.filename.clone(),
        argv: exec.argv.clone(),
        argv_truncated: u8::from(exec.argv_truncated),
        filename_truncated: u8::from(exec.filename_truncated),
        ppid_unknown: u8::from(exec.ppid_unknown),
        euid: exec.euid,
        egid: exec.egid,
        loginuid: exec.loginuid.unwrap_or(NO_LOGINUID),
        process_start_ns: exec.process_start_unix_ns,
        exe: exec.filename.clone(),
        exe_sha256: exec.exe_sha256.clone(),
        user_name: exec.user_name.clone(),
        cgroup_path: exec.cgroup_path.clone(),
        container_id: exec.container_id.clone(),
        ..header.process_row(EVENT_TYPE_EXEC)
    })
}

/// `''`, or exactly [`EXE_SHA256_HEX_LEN`] characters of `0-9a-f`: one
/// spelling per hash (or container id, also 64 hex), so analysts can match
/// it with `=`.
fn is_sha256_hex_or_empty(text: &str) -> bool {
    text.is_empty()
        || (text.len() == EXE_SHA256_HEX_LEN
            && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// `pid` is the child; `tid` the parent's thread that forked.
fn fork_row(header: &Header<'_>, fork: &ProcessFork) -> ProcessEventRow {
    ProcessEventRow {
        pid: fork.pid,
        tid: fork.parent_tid,
        ppid: fork.ppid,
        uid: fork.uid,
        gid: fork.gid,
        cgroup_id: fork.cgroup_id,
        exe: fork.exe.clone(),
        clone_flags: fork.clone_flags,
        ..header.process_row(EVENT_TYPE_FORK)
    }
}

/// Refuses an exit status beyond 255, a signal that is not one, and both at
/// once. Neither (the agent could not tell) is stored as unknown: status -1,
/// signal 0.
fn exit_row(header: &Header<'_>, exit: &ProcessExit) -> Result<ProcessEventRow, RejectReason> {
    let seq = header.received.event.seq;
    let exit_status = match exit.exit_status {
        None => NO_EXIT_STATUS,
        Some(status) => u8::try_from(status)
            .map(i16::from)
            .map_err(|_| RejectReason::ExitStatusOutOfRange { seq, status })?,
    };
    let exit_signal = match exit.signal {
        None => 0,
        Some(signal) => u8::try_from(signal)
            .ok()
            .filter(|s| *s != 0)
            .ok_or(RejectReason::ExitSignalOutOfRange { seq, signal })?,
    };
    if exit.exit_status.is_some() && exit.signal.is_some() {
        return Err(RejectReason::ExitStatusAndSignal { seq });
    }
    Ok(ProcessEventRow {
        pid: exit.pid,
        tid: 0,
        ppid: exit.ppid,
        ppid_unknown: u8::from(exit.ppid_unknown),
        uid: exit.uid,
        gid: exit.gid,
        cgroup_id: exit.cgroup_id,
        process_start_ns: exit.process_start_unix_ns,
        exe: exit.exe.clone(),
        exit_status,
        exit_signal,
        core_dumped: u8::from(exit.core_dumped),
        lifetime_ns: exit.lifetime_ns,
        ..header.process_row(EVENT_TYPE_EXIT)
    })
}

/// Refuses a system call outside [`CRED_SYSCALLS`]. `uid`, `euid`, `gid` and
/// `egid` are the ids after the change, `previous_*` those before it; the
/// other ids are stored as sent (an agent reports all four either way).
fn cred_change_row(
    header: &Header<'_>,
    creds: &CredentialChange,
) -> Result<ProcessEventRow, RejectReason> {
    let seq = header.received.event.seq;
    let syscall = CRED_SYSCALLS
        .into_iter()
        .find(|name| *name == creds.syscall)
        .ok_or_else(|| RejectReason::CredUnknownSyscall {
            seq,
            syscall: excerpt(&creds.syscall),
        })?;
    Ok(ProcessEventRow {
        pid: creds.pid,
        uid: creds.uid,
        euid: creds.euid,
        gid: creds.gid,
        egid: creds.egid,
        cgroup_id: creds.cgroup_id,
        exe: creds.exe.clone(),
        previous_uid: creds.old_uid,
        previous_euid: creds.old_euid,
        previous_gid: creds.old_gid,
        previous_egid: creds.old_egid,
        cred_syscall: syscall.to_owned(),
        ..header.process_row(EVENT_TYPE_CRED_CHANGE)
    })
}

/// Refuses a gap that loses nothing, runs backwards, or does not say which
/// stream or why.
fn gap_row(header: &Header<'_>, gap: &Gap) -> Result<GapRow, RejectReason> {
    let Received {
        sender,
        event,
        ingested_at,
    } = header.received;
    let seq = event.seq;
    for (field, value) in [("stream", &gap.stream), ("reason", &gap.reason)] {
        if value.trim().is_empty() {
            return Err(RejectReason::GapEmptyField { seq, field });
        }
    }
    if gap.lost == 0 {
        return Err(RejectReason::GapNothingLost { seq });
    }
    if gap.from_unix_ns > gap.to_unix_ns {
        return Err(RejectReason::GapReversed {
            seq,
            from_unix_ns: gap.from_unix_ns,
            to_unix_ns: gap.to_unix_ns,
        });
    }
    Ok(GapRow {
        org_id: sender.org_id.to_owned(),
        time: header.time,
        time_ns: event.time_unix_ns,
        device_id: sender.device_id.to_owned(),
        hostname: sender.hostname.to_owned(),
        boot_id: sender.boot_id.to_owned(),
        seq,
        stream: gap.stream.clone(),
        reason: gap.reason.clone(),
        lost: gap.lost,
        from_ns: gap.from_unix_ns,
        to_ns: gap.to_unix_ns,
        agent_version: sender.agent_version.to_owned(),
        ingested_at,
    })
}

/// An event's ancestry as the four parallel `ancestor_*` columns, parent
/// first.
struct Ancestry {
    pids: Vec<u32>,
    exes: Vec<String>,
    argv0: Vec<String>,
    start_ns: Vec<u64>,
}

impl Ancestry {
    fn of(ancestors: &[Ancestor]) -> Ancestry {
        Ancestry {
            pids: ancestors.iter().map(|a| a.pid).collect(),
            exes: ancestors.iter().map(|a| a.exe.clone()).collect(),
            argv0: ancestors.iter().map(|a| a.argv0.clone()).collect(),
            start_ns: ancestors.iter().map(|a| a.start_unix_ns).collect(),
        }
    }
}

/// Every TCP action and the direction it implies. A `closed` connection's
/// direction is unknown: the close does not say who opened it.
const TCP_ACTIONS: [(&str, &str); 6] = [
    (TCP_CONNECT_ATTEMPT, DIRECTION_OUTBOUND),
    (TCP_CONNECTED, DIRECTION_OUTBOUND),
    (TCP_CONNECT_FAILED, DIRECTION_OUTBOUND),
    (TCP_ACCEPTED, DIRECTION_INBOUND),
    (TCP_CLOSED, DIRECTION_UNKNOWN),
    (TCP_LISTEN, DIRECTION_LISTEN),
];

/// Refuses an action outside the six, an IP version other than 4 or 6, a
/// port beyond 65535, an address that is not one of the stated version, and
/// an owner that [`check_owner`] refuses. Addresses are stored as the
/// canonical text of the parsed address (dotted IPv4, RFC 5952 IPv6), which
/// is what agents send.
fn tcp_row(header: &Header<'_>, tcp: &TcpConnection) -> Result<NetworkEventRow, RejectReason> {
    let Received {
        sender,
        event,
        ingested_at,
    } = header.received;
    let seq = event.seq;
    let (action, direction) = TCP_ACTIONS
        .into_iter()
        .find(|(action, _)| *action == tcp.action)
        .ok_or_else(|| RejectReason::TcpUnknownAction {
            seq,
            action: excerpt(&tcp.action),
        })?;
    let ip_version = match tcp.ip_version {
        4 => 4,
        6 => 6,
        other => {
            return Err(RejectReason::TcpIpVersion {
                seq,
                ip_version: other,
            })
        }
    };
    let address = |field: &'static str, text: &str| -> Result<String, RejectReason> {
        canonical_address(ip_version, text).ok_or_else(|| RejectReason::TcpBadAddress {
            seq,
            field,
            ip_version,
            addr: excerpt(text),
        })
    };
    let port = |field: &'static str, port: u32| -> Result<u16, RejectReason> {
        u16::try_from(port).map_err(|_| RejectReason::TcpPortOutOfRange { seq, field, port })
    };
    let local_addr = address("local_addr", &tcp.local_addr)?;
    let local_port = port("local_port", tcp.local_port)?;
    let remote_addr = address("remote_addr", &tcp.remote_addr)?;
    let remote_port = port("remote_port", tcp.remote_port)?;
    check_owner(
        seq,
        "tcp",
        &Owner {
            user_name: &tcp.user_name,
            cgroup_path: &tcp.cgroup_path,
            container_id: &tcp.container_id,
        },
    )?;
    let ancestry = Ancestry::of(&event.ancestors);
    Ok(NetworkEventRow {
        org_id: sender.org_id.to_owned(),
        time: header.time,
        time_ns: event.time_unix_ns,
        device_id: sender.device_id.to_owned(),
        hostname: sender.hostname.to_owned(),
        boot_id: sender.boot_id.to_owned(),
        seq,
        action: action.to_owned(),
        direction: direction.to_owned(),
        pid: tcp.pid,
        owner_unknown: u8::from(tcp.owner_unknown),
        uid: tcp.uid,
        gid: tcp.gid,
        cgroup_id: tcp.cgroup_id,
        exe: tcp.exe.clone(),
        ip_version,
        local_addr,
        local_port,
        remote_addr,
        remote_port,
        duration_ns: tcp.duration_ns,
        bytes_sent: tcp.bytes_sent,
        bytes_received: tcp.bytes_received,
        bytes_unknown: u8::from(tcp.bytes_unknown),
        ancestor_pids: ancestry.pids,
        ancestor_exes: ancestry.exes,
        ancestor_argv0: ancestry.argv0,
        ancestor_start_ns: ancestry.start_ns,
        agent_version: sender.agent_version.to_owned(),
        ingested_at,
        user_name: tcp.user_name.clone(),
        cgroup_path: tcp.cgroup_path.clone(),
        container_id: tcp.container_id.clone(),
    })
}

/// Every file action.
const FILE_ACTIONS: [&str; 5] = [
    FILE_OPEN_WRITE,
    FILE_OPEN_READ,
    FILE_UNLINK,
    FILE_RENAME,
    FILE_CHMOD,
];

/// Refuses an action outside the five, an empty path, a rename without a
/// target path, a target path on anything but a rename, and an owner that
/// [`check_owner`] refuses. The other fields are stored as sent.
fn file_row(header: &Header<'_>, file: &FileActivity) -> Result<FileEventRow, RejectReason> {
    let Received {
        sender,
        event,
        ingested_at,
    } = header.received;
    let seq = event.seq;
    let action = FILE_ACTIONS
        .into_iter()
        .find(|action| *action == file.action)
        .ok_or_else(|| RejectReason::FileUnknownAction {
            seq,
            action: excerpt(&file.action),
        })?;
    if file.path.is_empty() {
        return Err(RejectReason::FileEmptyPath { seq });
    }
    match (action == FILE_RENAME, file.target_path.is_empty()) {
        (true, true) => return Err(RejectReason::FileRenameWithoutTarget { seq }),
        (false, false) => return Err(RejectReason::FileTargetOnNonRename { seq, action }),
        _ => {}
    }
    check_owner(
        seq,
        "file",
        &Owner {
            user_name: &file.user_name,
            cgroup_path: &file.cgroup_path,
            container_id: &file.container_id,
        },
    )?;
    let ancestry = Ancestry::of(&event.ancestors);
    Ok(FileEventRow {
        org_id: sender.org_id.to_owned(),
        time: header.time,
        time_ns: event.time_unix_ns,
        device_id: sender.device_id.to_owned(),
        hostname: sender.hostname.to_owned(),
        boot_id: sender.boot_id.to_owned(),
        seq,
        action: action.to_owned(),
        pid: file.pid,
        uid: file.uid,
        gid: file.gid,
        cgroup_id: file.cgroup_id,
        exe: file.exe.clone(),
        path: file.path.clone(),
        target_path: file.target_path.clone(),
        open_flags: file.open_flags,
        mode: file.mode,
        path_truncated: u8::from(file.path_truncated),
        ancestor_pids: ancestry.pids,
        ancestor_exes: ancestry.exes,
        ancestor_argv0: ancestry.argv0,
        ancestor_start_ns: ancestry.start_ns,
        agent_version: sender.agent_version.to_owned(),
        ingested_at,
        user_name: file.user_name.clone(),
        cgroup_path: file.cgroup_path.clone(),
        container_id: file.container_id.clone(),
    })
}

/// Refuses an IP version other than 4 or 6, an address that is not one of
/// the stated version, a port, transaction id or question count beyond
/// 65535, an owner that [`check_owner`] refuses, and a query whose question
/// was read (`parse_error` empty) but has no name or no type.
///
/// A query whose question could not be read (`parse_error` set: too short
/// for a header, a response, no question, a malformed name) is stored, with
/// `query_name` and `query_type` as sent (`''` from current agents): the
/// attempt to send something to a DNS port is itself worth keeping
/// (tunnelling, malformed-packet tools). The root's name is `.`, never
/// `''`. Addresses are stored as the canonical text of the parsed address,
/// as on `network_events`; names and types as sent (agents lower-case
/// names).
fn dns_row(header: &Header<'_>, dns: &DnsQuery) -> Result<DnsEventRow, RejectReason> {
    let Received {
        sender,
        event,
        ingested_at,
    } = header.received;
    let seq = event.seq;
    let ip_version = match dns.ip_version {
        4 => 4,
        6 => 6,
        other => {
            return Err(RejectReason::DnsIpVersion {
                seq,
                ip_version: other,
            })
        }
    };
    let address = |field: &'static str, text: &str| -> Result<String, RejectReason> {
        canonical_address(ip_version, text).ok_or_else(|| RejectReason::DnsBadAddress {
            seq,
            field,
            ip_version,
            addr: excerpt(text),
        })
    };
    let u16_field = |field: &'static str, value: u32| -> Result<u16, RejectReason> {
        u16::try_from(value).map_err(|_| RejectReason::DnsFieldOutOfRange { seq, field, value })
    };
    let source_addr = address("source_addr", &dns.source_addr)?;
    let source_port = u16_field("source_port", dns.source_port)?;
    let server_addr = address("server_addr", &dns.server_addr)?;
    let server_port = u16_field("server_port", dns.server_port)?;
    let transaction_id = u16_field("transaction_id", dns.transaction_id)?;
    let question_count = u16_field("question_count", dns.question_count)?;
    if dns.parse_error.is_empty() {
        for (field, value) in [
            ("query_name", &dns.query_name),
            ("query_type", &dns.query_type),
        ] {
            if value.is_empty() {
                return Err(RejectReason::DnsEmptyQuestion { seq, field });
            }
        }
    }
    check_owner(
        seq,
        "dns",
        &Owner {
            user_name: &dns.user_name,
            cgroup_path: &dns.cgroup_path,
            container_id: &dns.container_id,
        },
    )?;
    let ancestry = Ancestry::of(&event.ancestors);
    Ok(DnsEventRow {
        org_id: sender.org_id.to_owned(),
        time: header.time,
        time_ns: event.time_unix_ns,
        device_id: sender.device_id.to_owned(),
        hostname: sender.hostname.to_owned(),
        boot_id: sender.boot_id.to_owned(),
        seq,
        pid: dns.pid,
        owner_unknown: u8::from(dns.owner_unknown),
        uid: dns.uid,
        gid: dns.gid,
        cgroup_id: dns.cgroup_id,
        exe: dns.exe.clone(),
        user_name: dns.user_name.clone(),
        cgroup_path: dns.cgroup_path.clone(),
        container_id: dns.container_id.clone(),
        ip_version,
        source_addr,
        source_port,
        server_addr,
        server_port,
        transaction_id,
        query_name: dns.query_name.clone(),
        query_type: dns.query_type.clone(),
        question_count,
        message_len: dns.message_len,
        parse_error: dns.parse_error.clone(),
        ancestor_pids: ancestry.pids,
        ancestor_exes: ancestry.exes,
        ancestor_argv0: ancestry.argv0,
        ancestor_start_ns: ancestry.start_ns,
        agent_version: sender.agent_version.to_owned(),
        ingested_at,
    })
}

/// `value` if it is one of `allowed`, else the reason `refuse` makes of it
/// (cut to [`REASON_EXCERPT_CHARS`]).
fn one_of(
    allowed: &[&'static str],
    value: &str,
    refuse: impl FnOnce(String) -> RejectReason,
) -> Result<&'static str, RejectReason> {
    allowed
        .iter()
        .copied()
        .find(|known| *known == value)
        .ok_or_else(|| refuse(excerpt(value)))
}

/// `text` as an address of IP version `ip_version` (4 or 6), in canonical
/// form; `None` when it is not one.
fn canonical_address(ip_version: u8, text: &str) -> Option<String> {
    if ip_version == 4 {
        text.parse::<Ipv4Addr>().ok().map(|a| a.to_string())
    } else {
        text.parse::<Ipv6Addr>().ok().map(|a| a.to_string())
    }
}

/// The actions that can give `verdict`; `None`: any action.
fn actions_giving(verdict: &str) -> Option<&'static [&'static str]> {
    match verdict {
        // A deny rule, or a tunnel whose gateway (or the agent, failing
        // closed) refused the connection.
        VERDICT_DENIED => Some(&[DECISION_DENY, DECISION_TUNNEL]),
        VERDICT_WOULD_DENY => Some(&[DECISION_AUDIT]),
        VERDICT_TUNNELLED => Some(&[DECISION_TUNNEL]),
        VERDICT_CLOSED => Some(&[DECISION_ALLOW, DECISION_TUNNEL]),
        _ => None,
    }
}

/// Refuses an action other than `allow`, `deny`, `audit` or `tunnel`, a
/// verdict other than `allowed`, `denied`, `would_deny`, `tunnelled` or
/// `closed`, a verdict its action cannot give ([`actions_giving`]: `denied`
/// only of `deny` or `tunnel`, `would_deny` only of `audit`, `tunnelled`
/// only of `tunnel`, `closed` only of `allow` or `tunnel`), a protocol other
/// than `tcp` or `udp`, an enforcement point other than `kernel`,
/// `kernel_ingress`, `tunnel` or `gateway`, an IP version other than 4 or 6,
/// a `remote_addr` that is not an address of that version, a port beyond
/// 65535, an owner that [`check_owner`] refuses, an `exe_sha256` neither
/// empty nor 64 lowercase hex, a `peer_id` neither empty nor a SPIFFE id, a
/// direction other than `outbound`, `inbound` or empty (older agents: stored
/// as `outbound`), a reason outside [`DECISION_REASONS`] and not empty, and a
/// `gateway` neither empty nor an address and port. Every value is matched
/// exactly (lower case), so each has one spelling and `=` finds it. The
/// addresses are stored as the canonical text of the parsed address, as on
/// `network_events` (`gateway` as `ip:port`, `[ipv6]:port`);
/// `nearest_rules` cut to [`MAX_NEAREST_RULES`] entries of
/// [`MAX_NEAREST_RULE_CHARS`] characters; `connection_id`, `rule_id` (`''`:
/// the policy's default) and `service` as sent.
fn decision_row(header: &Header<'_>, decision: &Decision) -> Result<DecisionRow, RejectReason> {
    let Received {
        sender,
        event,
        ingested_at,
    } = header.received;
    let seq = event.seq;
    let action = one_of(&DECISION_ACTIONS, &decision.action, |action| {
        RejectReason::DecisionUnknownAction { seq, action }
    })?;
    let verdict = one_of(&DECISION_VERDICTS, &decision.verdict, |verdict| {
        RejectReason::DecisionUnknownVerdict { seq, verdict }
    })?;
    if let Some(required) = actions_giving(verdict).filter(|required| !required.contains(&action)) {
        return Err(RejectReason::DecisionVerdictMismatch {
            seq,
            action,
            verdict,
            required,
        });
    }
    let protocol = one_of(&DECISION_PROTOCOLS, &decision.protocol, |protocol| {
        RejectReason::DecisionUnknownProtocol { seq, protocol }
    })?;
    let enforcement_point = one_of(
        &ENFORCEMENT_POINTS,
        &decision.enforcement_point,
        |enforcement_point| RejectReason::DecisionUnknownEnforcementPoint {
            seq,
            enforcement_point,
        },
    )?;
    let ip_version = match decision.ip_version {
        4 => 4,
        6 => 6,
        other => {
            return Err(RejectReason::DecisionIpVersion {
                seq,
                ip_version: other,
            })
        }
    };
    let text = &decision.remote_addr;
    let remote_addr =
        canonical_address(ip_version, text).ok_or_else(|| RejectReason::DecisionBadAddress {
            seq,
            ip_version,
            addr: excerpt(text),
        })?;
    let remote_port =
        u16::try_from(decision.remote_port).map_err(|_| RejectReason::DecisionPortOutOfRange {
            seq,
            port: decision.remote_port,
        })?;
    check_owner(
        seq,
        "decision",
        &Owner {
            user_name: &decision.user_name,
            cgroup_path: &decision.cgroup_path,
            container_id: &decision.container_id,
        },
    )?;
    if !is_sha256_hex_or_empty(&decision.exe_sha256) {
        return Err(RejectReason::DecisionBadSha256 {
            seq,
            exe_sha256: excerpt(&decision.exe_sha256),
        });
    }
    let peer_id = match decision.peer_id.as_str() {
        "" => String::new(),
        text => SpiffeId::parse(text)
            .map_err(|error| RejectReason::DecisionBadPeerId {
                seq,
                peer_id: excerpt(text),
                error,
            })?
            .to_string(),
    };
    let direction = match decision.direction.as_str() {
        // Agents older than the field decided outbound connections only.
        "" => DIRECTION_OUTBOUND,
        text => one_of(&DECISION_DIRECTIONS, text, |direction| {
            RejectReason::DecisionUnknownDirection { seq, direction }
        })?,
    };
    let reason = match decision.reason.as_str() {
        "" => "",
        text => one_of(&DECISION_REASONS, text, |reason| {
            RejectReason::DecisionUnknownReason { seq, reason }
        })?,
    };
    let gateway = match decision.gateway.as_str() {
        "" => String::new(),
        text => text
            .parse::<SocketAddr>()
            .map_err(|_| RejectReason::DecisionBadGateway {
                seq,
                gateway: excerpt(text),
            })?
            .to_string(),
    };
    let nearest_rules = decision
        .nearest_rules
        .iter()
        .take(MAX_NEAREST_RULES)
        .map(
            |rule| match rule.char_indices().nth(MAX_NEAREST_RULE_CHARS) {
                Some((end, _)) => rule[..end].to_owned(),
                None => rule.clone(),
            },
        )
        .collect();
    let ancestry = Ancestry::of(&event.ancestors);
    Ok(DecisionRow {
        org_id: sender.org_id.to_owned(),
        time: header.time,
        time_ns: event.time_unix_ns,
        device_id: sender.device_id.to_owned(),
        hostname: sender.hostname.to_owned(),
        boot_id: sender.boot_id.to_owned(),
        seq,
        connection_id: decision.connection_id.clone(),
        pid: decision.pid,
        uid: decision.uid,
        gid: decision.gid,
        cgroup_id: decision.cgroup_id,
        exe: decision.exe.clone(),
        user_name: decision.user_name.clone(),
        cgroup_path: decision.cgroup_path.clone(),
        container_id: decision.container_id.clone(),
        ip_version,
        remote_addr,
        remote_port,
        protocol: protocol.to_owned(),
        action: action.to_owned(),
        verdict: verdict.to_owned(),
        rule_id: decision.rule_id.clone(),
        policy_version: decision.policy_version,
        enforcement_point: enforcement_point.to_owned(),
        ancestor_pids: ancestry.pids,
        ancestor_exes: ancestry.exes,
        ancestor_argv0: ancestry.argv0,
        ancestor_start_ns: ancestry.start_ns,
        agent_version: sender.agent_version.to_owned(),
        ingested_at,
        exe_sha256: decision.exe_sha256.clone(),
        peer_id,
        service: decision.service.clone(),
        direction: direction.to_owned(),
        reason: reason.to_owned(),
        nearest_rules,
        gateway,
    })
}

/// At most [`REASON_EXCERPT_CHARS`] characters of `text`, for a reject reason
/// (which goes back to the agent and into the logs).
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(REASON_EXCERPT_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// The rows of one batch, by table.
#[derive(Debug, Default, PartialEq)]
pub struct TableRows {
    pub process_events: Vec<ProcessEventRow>,
    pub network_events: Vec<NetworkEventRow>,
    pub file_events: Vec<FileEventRow>,
    pub dns_events: Vec<DnsEventRow>,
    pub decisions: Vec<DecisionRow>,
    pub gaps: Vec<GapRow>,
}

impl TableRows {
    /// Rows in every table.
    pub fn len(&self) -> usize {
        self.process_events.len()
            + self.network_events.len()
            + self.file_events.len()
            + self.dns_events.len()
            + self.decisions.len()
            + self.gaps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, row: EventRow) {
        match row {
            EventRow::ProcessEvent(row) => self.process_events.push(row),
            EventRow::NetworkEvent(row) => self.network_events.push(row),
            EventRow::FileEvent(row) => self.file_events.push(row),
            EventRow::DnsEvent(row) => self.dns_events.push(row),
            EventRow::Decision(row) => self.decisions.push(row),
            EventRow::Gap(row) => self.gaps.push(row),
        }
    }
}

/// The outcome of converting one batch.
#[derive(Debug, Default, PartialEq)]
pub struct Converted {
    pub rows: TableRows,
    pub rejected: u32,
    /// The first reason, if any event was refused.
    pub first_reason: Option<RejectReason>,
}

/// Converts every event of a batch; a bad event never stops the others, and
/// a bad identity refuses them all.
pub fn convert_batch(
    identity: Option<&AgentIdentity>,
    events: &[Event],
    ingested_at: u32,
) -> Converted {
    let sender = match Sender::try_from(identity) {
        Ok(sender) => sender,
        Err(reason) => {
            return Converted {
                rows: TableRows::default(),
                rejected: u32::try_from(events.len()).unwrap_or(u32::MAX),
                first_reason: (!events.is_empty()).then_some(reason),
            }
        }
    };
    // Nearly every event is a process, TCP, file, DNS or decision event;
    // gaps are rare.
    let (mut tcp, mut file, mut dns, mut decision) = (0, 0, 0, 0);
    for event in events {
        match event.kind {
            Some(Kind::Tcp(_)) => tcp += 1,
            Some(Kind::File(_)) => file += 1,
            Some(Kind::Dns(_)) => dns += 1,
            Some(Kind::Decision(_)) => decision += 1,
            _ => {}
        }
    }
    let mut out = Converted {
        rows: TableRows {
            process_events: Vec::with_capacity(events.len() - tcp - file - dns - decision),
            network_events: Vec::with_capacity(tcp),
            file_events: Vec::with_capacity(file),
            dns_events: Vec::with_capacity(dns),
            decisions: Vec::with_capacity(decision),
            gaps: Vec::new(),
        },
        ..Default::default()
    };
    for event in events {
        let received = Received {
            sender: &sender,
            event,
            ingested_at,
        };
        match EventRow::try_from(received) {
            Ok(row) => out.rows.push(row),
            Err(reason) => {
                out.rejected = out.rejected.saturating_add(1);
                out.first_reason.get_or_insert(reason);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proto::telemetry::Ancestor;

    use super::*;

    const T: u64 = 1_700_000_000_123_456_789;
    const NOW: u32 = 1_700_000_100;

    fn identity() -> AgentIdentity {
        AgentIdentity {
            org_id: "pref".into(),
            device_id: "dev-1".into(),
            hostname: "pc-001".into(),
            boot_id: "b-1".into(),
            agent_version: "0.1.0".into(),
        }
    }

    fn event(seq: u64, time_unix_ns: u64, kind: Kind) -> Event {
        Event {
            seq,
            time_unix_ns,
            ancestors: Vec::new(),
            kind: Some(kind),
        }
    }

    fn exec_event(seq: u64, time_unix_ns: u64) -> Event {
        event(
            seq,
            time_unix_ns,
            Kind::Exec(ProcessExec {
                pid: 42,
                tid: 43,
                ppid: 1,
                uid: 1000,
                gid: 1001,
                cgroup_id: 7,
                filename: "/usr/bin/curl".into(),
                argv: vec!["curl".into(), "-s".into(), "http://x".into()],
                argv_truncated: true,
                filename_truncated: false,
                ppid_unknown: true,
                ..Default::default()
            }),
        )
    }

    fn exit(exit_status: Option<u32>, signal: Option<u32>, core_dumped: bool) -> Kind {
        Kind::Exit(ProcessExit {
            pid: 4242,
            ppid: 4200,
            ppid_unknown: false,
            uid: 1000,
            gid: 1000,
            cgroup_id: 9,
            exit_status,
            signal,
            core_dumped,
            process_start_unix_ns: T - 5_000_000_000,
            lifetime_ns: 5_000_000_000,
            exe: "/usr/bin/python3".into(),
        })
    }

    fn gap(stream: &str, reason: &str, lost: u64, from: u64, to: u64) -> Kind {
        Kind::Gap(Gap {
            stream: stream.into(),
            reason: reason.into(),
            lost,
            from_unix_ns: from,
            to_unix_ns: to,
        })
    }

    /// Converts one event from [`identity`] at [`NOW`].
    fn convert(event: &Event) -> Result<EventRow, RejectReason> {
        let id = identity();
        let sender = Sender::try_from(Some(&id)).unwrap();
        EventRow::try_from(Received {
            sender: &sender,
            event,
            ingested_at: NOW,
        })
    }

    fn process_row(event: &Event) -> ProcessEventRow {
        match convert(event) {
            Ok(EventRow::ProcessEvent(row)) => row,
            other => panic!("not a process event row: {other:?}"),
        }
    }

    /// The columns of a row from [`identity`] that no event type changes.
    fn base(seq: u64, event_type: &str) -> ProcessEventRow {
        ProcessEventRow {
            org_id: "pref".into(),
            time: 1_700_000_000,
            time_ns: T,
            device_id: "dev-1".into(),
            hostname: "pc-001".into(),
            boot_id: "b-1".into(),
            seq,
            pid: 0,
            tid: 0,
            ppid: 0,
            uid: 0,
            gid: 0,
            cgroup_id: 0,
            filename: String::new(),
            argv: Vec::new(),
            argv_truncated: 0,
            filename_truncated: 0,
            ppid_unknown: 0,
            agent_version: "0.1.0".into(),
            ingested_at: NOW,
            event_type: event_type.into(),
            euid: 0,
            egid: 0,
            loginuid: u32::MAX,
            process_start_ns: 0,
            exe: String::new(),
            clone_flags: 0,
            exit_status: -1,
            exit_signal: 0,
            core_dumped: 0,
            lifetime_ns: 0,
            ancestor_pids: Vec::new(),
            ancestor_exes: Vec::new(),
            ancestor_argv0: Vec::new(),
            ancestor_start_ns: Vec::new(),
            exe_sha256: String::new(),
            user_name: String::new(),
            previous_uid: 0,
            previous_euid: 0,
            previous_gid: 0,
            previous_egid: 0,
            cred_syscall: String::new(),
            cgroup_path: String::new(),
            container_id: String::new(),
        }
    }

    #[test]
    fn converts_every_exec_field() {
        let converted = convert_batch(Some(&identity()), &[exec_event(5, T)], NOW);
        assert_eq!(converted.rejected, 0);
        assert_eq!(converted.first_reason, None);
        assert!(converted.rows.gaps.is_empty());
        assert_eq!(
            converted.rows.process_events,
            vec![ProcessEventRow {
                pid: 42,
                tid: 43,
                ppid: 1,
                uid: 1000,
                gid: 1001,
                cgroup_id: 7,
                filename: "/usr/bin/curl".into(),
                argv: vec!["curl".into(), "-s".into(), "http://x".into()],
                argv_truncated: 1,
                filename_truncated: 0,
                ppid_unknown: 1,
                // An exec without the new fields: no login session, start unknown.
                exe: "/usr/bin/curl".into(),
                ..base(5, "exec")
            }]
        );
    }

    #[test]
    fn exec_fills_credentials_login_and_start() {
        let mut e = exec_event(6, T);
        let Some(Kind::Exec(exec)) = e.kind.as_mut() else {
            unreachable!()
        };
        exec.euid = 0;
        exec.egid = 27;
        exec.uid = 1000;
        exec.loginuid = Some(1000);
        exec.process_start_unix_ns = T - 1_000;
        let row = process_row(&e);
        assert_eq!(
            (row.uid, row.euid, row.egid, row.loginuid),
            (1000, 0, 27, 1000)
        );
        assert_eq!(row.process_start_ns, T - 1_000);
        assert_eq!(row.event_type, "exec");
        // Login uid 0 (root's session) is a value, not "absent".
        exec_loginuid(&mut e, Some(0));
        assert_eq!(process_row(&e).loginuid, 0);
        exec_loginuid(&mut e, None);
        assert_eq!(process_row(&e).loginuid, 4_294_967_295);
    }

    fn exec_loginuid(e: &mut Event, loginuid: Option<u32>) {
        if let Some(Kind::Exec(exec)) = e.kind.as_mut() {
            exec.loginuid = loginuid;
        }
    }

    /// SHA-256 of `/usr/bin/ls` on some host.
    const LS_SHA256: &str = "cb30d69b24245bf2ecdc9e7f53bbad19159999970b6d82c0c00c7d32d9e37aa4";

    /// [`exec_event`] with the hash and user name the agent sent.
    fn exec_as(seq: u64, exe_sha256: &str, user_name: &str) -> Event {
        let mut e = exec_event(seq, T);
        if let Some(Kind::Exec(exec)) = e.kind.as_mut() {
            exec.exe_sha256 = exe_sha256.into();
            exec.user_name = user_name.into();
        }
        e
    }

    #[test]
    fn exec_carries_the_files_hash_and_the_user_name() {
        let row = process_row(&exec_as(1, LS_SHA256, "alice"));
        assert_eq!(
            (row.exe_sha256.as_str(), row.user_name.as_str()),
            (LS_SHA256, "alice")
        );
        assert_eq!((row.event_type.as_str(), row.uid), ("exec", 1000));
        // A name of exactly 256 bytes (multi-byte characters count as bytes).
        let longest = format!("{}é", "u".repeat(254));
        assert_eq!(longest.len(), 256);
        assert_eq!(process_row(&exec_as(2, "", &longest)).user_name, longest);
    }

    #[test]
    fn an_unknown_hash_or_user_is_stored_empty() {
        let row = process_row(&exec_as(1, "", ""));
        assert_eq!((row.exe_sha256.as_str(), row.user_name.as_str()), ("", ""));
        // An agent that does not send them (older than the fields) alike.
        let row = process_row(&exec_event(2, T));
        assert_eq!((row.exe_sha256.as_str(), row.user_name.as_str()), ("", ""));
    }

    #[test]
    fn fork_and_exit_rows_have_no_hash_or_user() {
        for kind in [
            Kind::Fork(ProcessFork::default()),
            exit(Some(0), None, false),
        ] {
            let row = process_row(&event(3, T, kind));
            assert_eq!((row.exe_sha256.as_str(), row.user_name.as_str()), ("", ""));
        }
    }

    #[test]
    fn a_malformed_hash_is_refused() {
        let bad = |text: &str| RejectReason::ExecBadSha256 {
            seq: 4,
            exe_sha256: text.into(),
        };
        let upper = LS_SHA256.to_ascii_uppercase();
        let one_upper = format!("C{}", &LS_SHA256[1..]);
        let non_hex = format!("{}g", &LS_SHA256[..63]);
        let prefixed = format!("0x{}", &LS_SHA256[2..]);
        let spaced = format!(" {}", &LS_SHA256[1..]);
        // 64 bytes but not 64 characters.
        let multibyte = format!("{}é", &LS_SHA256[..62]);
        assert_eq!(multibyte.len(), 64);
        for text in [
            &LS_SHA256[..63],
            &LS_SHA256[..40], // a SHA-1's length
            "0",
            upper.as_str(),
            one_upper.as_str(),
            non_hex.as_str(),
            prefixed.as_str(),
            spaced.as_str(),
            multibyte.as_str(),
        ] {
            assert_eq!(
                convert(&exec_as(4, text, "alice")),
                Err(bad(text)),
                "{text}"
            );
        }
        // 65 characters: refused, and quoted cut to 64.
        let longer = format!("{LS_SHA256}0");
        assert_eq!(
            convert(&exec_as(4, &longer, "alice")),
            Err(bad(&format!("{LS_SHA256}…")))
        );
        // A long refused value is quoted cut.
        let huge = "f".repeat(1000);
        assert_eq!(
            convert(&exec_as(4, &huge, "")),
            Err(bad(&format!("{}…", "f".repeat(64))))
        );
        assert_eq!(
            bad("ABC").to_string(),
            "exec event seq 4 has exe_sha256 \"ABC\", \
             not empty or 64 lowercase hex characters"
        );
    }

    #[test]
    fn a_user_name_beyond_256_bytes_is_refused() {
        let name = "u".repeat(257);
        assert_eq!(
            convert(&exec_as(5, LS_SHA256, &name)),
            Err(RejectReason::UserNameTooLong {
                seq: 5,
                kind: "exec",
                bytes: 257
            })
        );
        let name = "é".repeat(129); // 129 characters, 258 bytes
        let reason = convert(&exec_as(5, "", &name)).unwrap_err();
        assert_eq!(
            reason.to_string(),
            "exec event seq 5 has a user_name of 258 bytes, beyond 256"
        );
    }

    /// A docker container's id.
    const CONTAINER_ID: &str = "4f1c8b2e9a7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b";

    /// [`exec_event`] with the cgroup path and container id the agent sent.
    fn exec_in(seq: u64, cgroup_path: &str, container_id: &str) -> Event {
        let mut e = exec_event(seq, T);
        if let Some(Kind::Exec(exec)) = e.kind.as_mut() {
            exec.cgroup_path = cgroup_path.into();
            exec.container_id = container_id.into();
        }
        e
    }

    #[test]
    fn exec_carries_the_cgroup_path_and_container_id() {
        let path = format!("/system.slice/docker-{CONTAINER_ID}.scope");
        let row = process_row(&exec_in(1, &path, CONTAINER_ID));
        assert_eq!(
            (row.cgroup_path.as_str(), row.container_id.as_str()),
            (path.as_str(), CONTAINER_ID)
        );
        // Outside a container: a path, no id.
        let row = process_row(&exec_in(2, "/user.slice/user-1000.slice", ""));
        assert_eq!(row.cgroup_path, "/user.slice/user-1000.slice");
        assert_eq!(row.container_id, "");
        // The root cgroup, and a path of exactly 4096 bytes.
        assert_eq!(process_row(&exec_in(3, "/", "")).cgroup_path, "/");
        let longest = format!("/{}", "c".repeat(4095));
        assert_eq!(process_row(&exec_in(4, &longest, "")).cgroup_path, longest);
    }

    #[test]
    fn an_unknown_cgroup_or_container_is_stored_empty() {
        let row = process_row(&exec_in(1, "", ""));
        assert_eq!(
            (row.cgroup_path.as_str(), row.container_id.as_str()),
            ("", "")
        );
        // An agent older than the fields alike.
        let row = process_row(&exec_event(2, T));
        assert_eq!(
            (row.cgroup_path.as_str(), row.container_id.as_str()),
            ("", "")
        );
        for kind in [
            Kind::Fork(ProcessFork::default()),
            exit(Some(0), None, false),
        ] {
            let row = process_row(&event(3, T, kind));
            assert_eq!(
                (row.cgroup_path.as_str(), row.container_id.as_str()),
                ("", "")
            );
        }
    }

    #[test]
    fn a_malformed_container_id_is_refused() {
        let bad = |text: &str| RejectReason::BadContainerId {
            seq: 6,
            kind: "exec",
            container_id: text.into(),
        };
        let upper = CONTAINER_ID.to_ascii_uppercase();
        let non_hex = format!("{}g", &CONTAINER_ID[..63]);
        let multibyte = format!("{}é", &CONTAINER_ID[..62]);
        assert_eq!(multibyte.len(), 64);
        for text in [
            &CONTAINER_ID[..12], // docker's short form
            &CONTAINER_ID[..63],
            upper.as_str(),
            non_hex.as_str(),
            multibyte.as_str(),
        ] {
            assert_eq!(convert(&exec_in(6, "/x", text)), Err(bad(text)), "{text}");
        }
        let longer = format!("{CONTAINER_ID}0");
        assert_eq!(
            convert(&exec_in(6, "/x", &longer)),
            Err(bad(&format!("{CONTAINER_ID}…")))
        );
        assert_eq!(
            bad("ABC").to_string(),
            "exec event seq 6 has container_id \"ABC\", \
             not empty or 64 lowercase hex characters"
        );
    }

    #[test]
    fn a_cgroup_path_beyond_4096_bytes_is_refused() {
        let path = format!("/{}", "c".repeat(4096));
        assert_eq!(
            convert(&exec_in(7, &path, "")),
            Err(RejectReason::CgroupPathTooLong {
                seq: 7,
                kind: "exec",
                bytes: 4097
            })
        );
        let path = format!("/{}", "é".repeat(2048)); // 4097 bytes
        assert_eq!(
            convert(&exec_in(7, &path, CONTAINER_ID))
                .unwrap_err()
                .to_string(),
            "exec event seq 7 has a cgroup_path of 4097 bytes, beyond 4096"
        );
    }

    #[test]
    fn a_relative_cgroup_path_is_refused() {
        for path in ["system.slice", " /system.slice", "./x", "\\x"] {
            assert_eq!(
                convert(&exec_in(8, path, "")),
                Err(RejectReason::CgroupPathNotAbsolute {
                    seq: 8,
                    kind: "exec",
                    cgroup_path: path.into(),
                }),
                "{path}"
            );
        }
        let huge = "c".repeat(100);
        assert_eq!(
            convert(&exec_in(8, &huge, "")).unwrap_err().to_string(),
            format!(
                "exec event seq 8 has cgroup_path \"{}…\", not starting with '/'",
                "c".repeat(64)
            )
        );
    }

    #[test]
    fn a_refused_exec_does_not_stop_the_batch() {
        let events = [
            exec_as(1, LS_SHA256, "alice"),
            exec_as(2, "nothex", "bob"),
            exec_as(3, "", "carol"),
        ];
        let converted = convert_batch(Some(&identity()), &events, NOW);
        let stored: Vec<(u64, &str)> = converted
            .rows
            .process_events
            .iter()
            .map(|r| (r.seq, r.user_name.as_str()))
            .collect();
        assert_eq!(stored, vec![(1, "alice"), (3, "carol")]);
        assert_eq!(converted.rejected, 1);
        assert!(matches!(
            converted.first_reason,
            Some(RejectReason::ExecBadSha256 { seq: 2, .. })
        ));
    }

    #[test]
    fn ancestry_becomes_parallel_arrays_parent_first() {
        let ancestors = vec![
            Ancestor {
                pid: 4200,
                exe: "/usr/bin/bash".into(),
                argv0: "-bash".into(),
                start_unix_ns: T - 60_000_000_000,
            },
            Ancestor {
                pid: 812,
                exe: "/usr/sbin/sshd".into(),
                argv0: "sshd: alice [priv]".into(),
                start_unix_ns: 0,
            },
            Ancestor {
                pid: 1,
                exe: "/usr/lib/systemd/systemd".into(),
                argv0: "/sbin/init".into(),
                start_unix_ns: T - 86_400_000_000_000,
            },
        ];
        for kind in [
            exec_event(1, T).kind.unwrap(),
            Kind::Fork(ProcessFork::default()),
            exit(Some(0), None, false),
        ] {
            let e = Event {
                ancestors: ancestors.clone(),
                ..event(1, T, kind)
            };
            let row = process_row(&e);
            assert_eq!(row.ancestor_pids, vec![4200, 812, 1], "{}", row.event_type);
            assert_eq!(
                row.ancestor_exes,
                vec![
                    "/usr/bin/bash",
                    "/usr/sbin/sshd",
                    "/usr/lib/systemd/systemd"
                ]
            );
            assert_eq!(
                row.ancestor_argv0,
                vec!["-bash", "sshd: alice [priv]", "/sbin/init"]
            );
            assert_eq!(
                row.ancestor_start_ns,
                vec![T - 60_000_000_000, 0, T - 86_400_000_000_000]
            );
        }
    }

    #[test]
    fn fork_row_is_the_child_with_the_parents_thread() {
        let e = event(
            7,
            T,
            Kind::Fork(ProcessFork {
                pid: 5001,
                ppid: 5000,
                parent_tid: 5003,
                uid: 1000,
                gid: 100,
                cgroup_id: 11,
                clone_flags: 0x0120_0011,
                exe: "/usr/bin/bash".into(),
            }),
        );
        assert_eq!(
            process_row(&e),
            ProcessEventRow {
                pid: 5001,
                tid: 5003,
                ppid: 5000,
                uid: 1000,
                gid: 100,
                cgroup_id: 11,
                clone_flags: 0x0120_0011,
                exe: "/usr/bin/bash".into(),
                ..base(7, "fork")
            }
        );
    }

    #[test]
    fn exit_with_a_status() {
        let row = process_row(&event(8, T, exit(Some(3), None, false)));
        assert_eq!(
            row,
            ProcessEventRow {
                pid: 4242,
                ppid: 4200,
                uid: 1000,
                gid: 1000,
                cgroup_id: 9,
                process_start_ns: T - 5_000_000_000,
                lifetime_ns: 5_000_000_000,
                exe: "/usr/bin/python3".into(),
                exit_status: 3,
                ..base(8, "exit")
            }
        );
        assert_eq!(
            process_row(&event(8, T, exit(Some(255), None, false))).exit_status,
            255
        );
        assert_eq!(
            process_row(&event(8, T, exit(Some(0), None, false))).exit_status,
            0
        );
    }

    #[test]
    fn exit_by_a_signal_with_and_without_core() {
        let killed = process_row(&event(9, T, exit(None, Some(9), false)));
        assert_eq!(
            (killed.exit_status, killed.exit_signal, killed.core_dumped),
            (-1, 9, 0)
        );
        let segv = process_row(&event(9, T, exit(None, Some(11), true)));
        assert_eq!(
            (segv.exit_status, segv.exit_signal, segv.core_dumped),
            (-1, 11, 1)
        );
        assert_eq!((segv.tid, segv.event_type.as_str()), (0, "exit"));
    }

    #[test]
    fn exit_with_unknown_parent_or_unknown_end() {
        let mut kind = exit(None, None, false);
        if let Kind::Exit(x) = &mut kind {
            x.ppid = 0;
            x.ppid_unknown = true;
        }
        let row = process_row(&event(10, T, kind));
        assert_eq!((row.ppid, row.ppid_unknown), (0, 1));
        assert_eq!((row.exit_status, row.exit_signal), (-1, 0));
    }

    #[test]
    fn malformed_exits_are_refused() {
        assert_eq!(
            convert(&event(3, T, exit(Some(256), None, false))),
            Err(RejectReason::ExitStatusOutOfRange {
                seq: 3,
                status: 256
            })
        );
        assert_eq!(
            convert(&event(3, T, exit(None, Some(0), false))),
            Err(RejectReason::ExitSignalOutOfRange { seq: 3, signal: 0 })
        );
        assert_eq!(
            convert(&event(3, T, exit(None, Some(300), false))),
            Err(RejectReason::ExitSignalOutOfRange {
                seq: 3,
                signal: 300
            })
        );
        assert_eq!(
            convert(&event(3, T, exit(Some(0), Some(9), false))),
            Err(RejectReason::ExitStatusAndSignal { seq: 3 })
        );
    }

    #[test]
    fn gap_becomes_a_gaps_row() {
        let from = T - 2_000_000_000;
        let converted = convert_batch(
            Some(&identity()),
            &[event(12, T, gap("critical", "ring_full", 17, from, T))],
            NOW,
        );
        assert_eq!(converted.rejected, 0);
        assert!(converted.rows.process_events.is_empty());
        assert_eq!(
            converted.rows.gaps,
            vec![GapRow {
                org_id: "pref".into(),
                time: 1_700_000_000,
                time_ns: T,
                device_id: "dev-1".into(),
                hostname: "pc-001".into(),
                boot_id: "b-1".into(),
                seq: 12,
                stream: "critical".into(),
                reason: "ring_full".into(),
                lost: 17,
                from_ns: from,
                to_ns: T,
                agent_version: "0.1.0".into(),
                ingested_at: NOW,
            }]
        );
        // A gap of one instant is fine.
        assert!(convert(&event(13, T, gap("bulk", "sampled", 1, T, T))).is_ok());
    }

    #[test]
    fn malformed_gaps_are_refused() {
        let cases = [
            (
                gap("critical", "ring_full", 0, 1, 2),
                RejectReason::GapNothingLost { seq: 4 },
            ),
            (
                gap("critical", "ring_full", 5, 3, 2),
                RejectReason::GapReversed {
                    seq: 4,
                    from_unix_ns: 3,
                    to_unix_ns: 2,
                },
            ),
            (
                gap("", "ring_full", 5, 1, 2),
                RejectReason::GapEmptyField {
                    seq: 4,
                    field: "stream",
                },
            ),
            (
                gap("bulk", " ", 5, 1, 2),
                RejectReason::GapEmptyField {
                    seq: 4,
                    field: "reason",
                },
            ),
        ];
        for (kind, reason) in cases {
            assert_eq!(convert(&event(4, T, kind)), Err(reason));
        }
    }

    #[test]
    fn a_batch_is_split_by_table_in_order() {
        let events = [
            exec_event(1, T),
            event(2, T, gap("critical", "queue_full", 3, T - 1, T)),
            event(3, T, Kind::Fork(ProcessFork::default())),
            event(4, T, exit(Some(0), None, false)),
            event(5, T, gap("bulk", "sampled", 0, T, T)),
            event(6, T, tcp_v4("connected")),
            event(7, T, tcp_v6("accepted")),
            event(8, T, tcp_v4("closing")),
            event(9, T, file_kind("open_write")),
            event(10, T, file_kind("truncate")),
            event(11, T, rename("/etc/cron.d/.tmp", "/etc/cron.d/job")),
            event(12, T, dns_v4("example.org", "A")),
            event(13, T, with_dns(dns_v4("", "A"), |d| d.source_port = 70_000)),
            event(14, T, dns_v6("example.org", "AAAA")),
            event(15, T, decision_v4("deny", "denied")),
            event(16, T, decision_v4("allow", "denied")),
            event(17, T, decision_v6("tunnel", "allowed")),
        ];
        let converted = convert_batch(Some(&identity()), &events, NOW);
        let kinds: Vec<(u64, &str)> = converted
            .rows
            .process_events
            .iter()
            .map(|r| (r.seq, r.event_type.as_str()))
            .collect();
        assert_eq!(kinds, vec![(1, "exec"), (3, "fork"), (4, "exit")]);
        assert_eq!(converted.rows.gaps.len(), 1);
        assert_eq!(converted.rows.gaps[0].seq, 2);
        let network: Vec<(u64, &str)> = converted
            .rows
            .network_events
            .iter()
            .map(|r| (r.seq, r.action.as_str()))
            .collect();
        assert_eq!(network, vec![(6, "connected"), (7, "accepted")]);
        let files: Vec<(u64, &str)> = converted
            .rows
            .file_events
            .iter()
            .map(|r| (r.seq, r.action.as_str()))
            .collect();
        assert_eq!(files, vec![(9, "open_write"), (11, "rename")]);
        let dns: Vec<(u64, &str)> = converted
            .rows
            .dns_events
            .iter()
            .map(|r| (r.seq, r.query_type.as_str()))
            .collect();
        assert_eq!(dns, vec![(12, "A"), (14, "AAAA")]);
        let decisions: Vec<(u64, &str)> = converted
            .rows
            .decisions
            .iter()
            .map(|r| (r.seq, r.verdict.as_str()))
            .collect();
        assert_eq!(decisions, vec![(15, "denied"), (17, "allowed")]);
        assert_eq!(converted.rows.len(), 12);
        assert_eq!(converted.rejected, 5);
        assert_eq!(
            converted.first_reason,
            Some(RejectReason::GapNothingLost { seq: 5 })
        );
    }

    #[test]
    fn bad_events_are_refused_without_stopping_the_batch() {
        let no_kind = Event {
            seq: 2,
            time_unix_ns: 1,
            ancestors: Vec::new(),
            kind: None,
        };
        let events = [
            exec_event(1, 1_000_000_000),
            no_kind,
            exec_event(3, 0),
            exec_event(4, 2_000_000_000),
            exec_event(5, u64::MAX),
        ];
        let converted = convert_batch(Some(&identity()), &events, 0);
        let rows = &converted.rows.process_events;
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].seq, 1);
        assert_eq!(rows[1].seq, 4);
        assert_eq!(converted.rejected, 3);
        assert_eq!(
            converted.first_reason,
            Some(RejectReason::MissingKind { seq: 2 })
        );
    }

    #[test]
    fn every_kind_needs_a_valid_time() {
        for kind in [
            exec_event(9, T).kind.unwrap(),
            Kind::Fork(ProcessFork::default()),
            exit(Some(0), None, false),
            gap("critical", "ring_full", 1, 0, 0),
            tcp_v4("listen"),
            file_kind("unlink"),
            dns_v4("example.org", "A"),
            decision_v4("audit", "would_deny"),
        ] {
            assert_eq!(
                convert(&event(9, 0, kind.clone())),
                Err(RejectReason::ZeroTime { seq: 9 })
            );
            assert!(matches!(
                convert(&event(9, u64::MAX, kind.clone())),
                Err(RejectReason::TimeOutOfRange { seq: 9, .. })
            ));
            assert!(convert(&event(9, 1, kind)).is_ok());
        }
    }

    #[test]
    fn missing_or_incomplete_identity_refuses_every_event() {
        let events = [exec_event(1, 1), exec_event(2, 1)];
        let converted = convert_batch(None, &events, 0);
        assert!(converted.rows.is_empty());
        assert_eq!(converted.rejected, 2);
        assert_eq!(converted.first_reason, Some(RejectReason::MissingIdentity));

        for field in ["org_id", "device_id", "boot_id"] {
            let mut id = identity();
            match field {
                "org_id" => id.org_id.clear(),
                "device_id" => id.device_id = "  ".into(),
                _ => id.boot_id.clear(),
            }
            let converted = convert_batch(Some(&id), &events, 0);
            assert_eq!(converted.rejected, 2);
            assert_eq!(
                converted.first_reason,
                Some(RejectReason::EmptyIdentityField(field))
            );
        }
        // An empty hostname is allowed: identity is org + device + boot.
        let mut id = identity();
        id.hostname.clear();
        assert_eq!(convert_batch(Some(&id), &events, 0).rejected, 0);
    }

    #[test]
    fn empty_batch_converts_to_nothing() {
        assert_eq!(convert_batch(None, &[], 0), Converted::default());
    }

    /// The login session's cgroup of the TCP, file and DNS fixtures' process.
    const SESSION_CGROUP: &str = "/user.slice/user-1000.slice/session-3.scope";

    /// An outbound IPv4 connection of `curl` by alice (the fields every
    /// action has).
    fn tcp_v4(action: &str) -> Kind {
        Kind::Tcp(TcpConnection {
            action: action.into(),
            pid: 4300,
            owner_unknown: false,
            uid: 1000,
            gid: 100,
            cgroup_id: 77,
            ip_version: 4,
            local_addr: "192.0.2.10".into(),
            local_port: 51_234,
            remote_addr: "198.51.100.7".into(),
            remote_port: 443,
            exe: "/usr/bin/curl".into(),
            user_name: "alice".into(),
            cgroup_path: SESSION_CGROUP.into(),
            ..Default::default()
        })
    }

    /// The same over IPv6.
    fn tcp_v6(action: &str) -> Kind {
        let Kind::Tcp(mut tcp) = tcp_v4(action) else {
            unreachable!()
        };
        tcp.ip_version = 6;
        tcp.local_addr = "2001:db8::10".into();
        tcp.remote_addr = "2001:db8:1::7".into();
        Kind::Tcp(tcp)
    }

    fn with_tcp(mut kind: Kind, change: impl FnOnce(&mut TcpConnection)) -> Kind {
        if let Kind::Tcp(tcp) = &mut kind {
            change(tcp);
        }
        kind
    }

    fn network_row(event: &Event) -> NetworkEventRow {
        match convert(event) {
            Ok(EventRow::NetworkEvent(row)) => row,
            other => panic!("not a network event row: {other:?}"),
        }
    }

    /// The row of [`tcp_v4`] from [`identity`], for `action` in `direction`.
    fn network_base(seq: u64, action: &str, direction: &str) -> NetworkEventRow {
        NetworkEventRow {
            org_id: "pref".into(),
            time: 1_700_000_000,
            time_ns: T,
            device_id: "dev-1".into(),
            hostname: "pc-001".into(),
            boot_id: "b-1".into(),
            seq,
            action: action.into(),
            direction: direction.into(),
            pid: 4300,
            owner_unknown: 0,
            uid: 1000,
            gid: 100,
            cgroup_id: 77,
            exe: "/usr/bin/curl".into(),
            ip_version: 4,
            local_addr: "192.0.2.10".into(),
            local_port: 51_234,
            remote_addr: "198.51.100.7".into(),
            remote_port: 443,
            duration_ns: 0,
            bytes_sent: 0,
            bytes_received: 0,
            bytes_unknown: 0,
            ancestor_pids: Vec::new(),
            ancestor_exes: Vec::new(),
            ancestor_argv0: Vec::new(),
            ancestor_start_ns: Vec::new(),
            agent_version: "0.1.0".into(),
            ingested_at: NOW,
            user_name: "alice".into(),
            cgroup_path: SESSION_CGROUP.into(),
            container_id: String::new(),
        }
    }

    #[test]
    fn every_tcp_action_becomes_a_network_row_with_its_direction() {
        let cases = [
            ("connect_attempt", "outbound"),
            ("connected", "outbound"),
            ("connect_failed", "outbound"),
            ("accepted", "inbound"),
            ("closed", ""),
            ("listen", "listen"),
        ];
        for (seq, (action, direction)) in (1..).zip(cases) {
            let converted = convert_batch(Some(&identity()), &[event(seq, T, tcp_v4(action))], NOW);
            assert_eq!(converted.rejected, 0, "{action}");
            assert!(converted.rows.process_events.is_empty() && converted.rows.gaps.is_empty());
            assert_eq!(
                converted.rows.network_events,
                vec![network_base(seq, action, direction)]
            );

            let v6 = network_row(&event(seq, T, tcp_v6(action)));
            assert_eq!(
                v6,
                NetworkEventRow {
                    ip_version: 6,
                    local_addr: "2001:db8::10".into(),
                    remote_addr: "2001:db8:1::7".into(),
                    ..network_base(seq, action, direction)
                }
            );
        }
    }

    #[test]
    fn closed_carries_duration_and_bytes_or_says_they_are_unknown() {
        let closed = with_tcp(tcp_v6("closed"), |t| {
            t.duration_ns = 2_500_000_000;
            t.bytes_sent = 5000;
            t.bytes_received = 3000;
        });
        let row = network_row(&event(3, T, closed));
        assert_eq!(
            (row.duration_ns, row.bytes_sent, row.bytes_received),
            (2_500_000_000, 5000, 3000)
        );
        assert_eq!((row.bytes_unknown, row.direction.as_str()), (0, ""));

        let unknown = with_tcp(tcp_v4("closed"), |t| {
            t.duration_ns = 10;
            t.bytes_unknown = true;
        });
        let row = network_row(&event(4, T, unknown));
        assert_eq!(
            (row.duration_ns, row.bytes_sent, row.bytes_received),
            (10, 0, 0)
        );
        assert_eq!(row.bytes_unknown, 1);
    }

    #[test]
    fn a_socket_without_a_known_owner_is_stored_as_such() {
        let orphan = with_tcp(tcp_v4("closed"), |t| {
            t.pid = 0;
            t.owner_unknown = true;
            t.exe.clear();
        });
        let row = network_row(&event(5, T, orphan));
        assert_eq!((row.pid, row.owner_unknown, row.exe.as_str()), (0, 1, ""));
    }

    #[test]
    fn addresses_are_stored_in_canonical_text() {
        // Wildcards, loopback, ports 0 and 65535: all valid.
        let listen = with_tcp(tcp_v6("listen"), |t| {
            t.local_addr = "::".into();
            t.local_port = 65_535;
            t.remote_addr = "::".into();
            t.remote_port = 0;
        });
        let row = network_row(&event(1, T, listen));
        assert_eq!((row.local_addr.as_str(), row.local_port), ("::", u16::MAX));
        assert_eq!((row.remote_addr.as_str(), row.remote_port), ("::", 0));
        // Upper case and unshortened zeros become RFC 5952 text, so one peer
        // is always spelled the same way.
        let long = with_tcp(tcp_v6("connected"), |t| {
            t.local_addr = "0:0:0:0:0:0:0:1".into();
            t.remote_addr = "2001:0DB8:0000:0000:0000:0000:0000:0007".into();
        });
        let row = network_row(&event(2, T, long));
        assert_eq!(
            (row.local_addr.as_str(), row.remote_addr.as_str()),
            ("::1", "2001:db8::7")
        );
        let mapped = with_tcp(tcp_v6("accepted"), |t| {
            t.remote_addr = "::FFFF:192.0.2.1".into();
        });
        assert_eq!(
            network_row(&event(3, T, mapped)).remote_addr,
            "::ffff:192.0.2.1"
        );
    }

    #[test]
    fn tcp_rows_carry_the_owners_ancestry() {
        let e = Event {
            ancestors: vec![
                Ancestor {
                    pid: 4200,
                    exe: "/usr/bin/bash".into(),
                    argv0: "-bash".into(),
                    start_unix_ns: T - 1,
                },
                Ancestor {
                    pid: 1,
                    exe: "/usr/lib/systemd/systemd".into(),
                    argv0: "/sbin/init".into(),
                    start_unix_ns: 0,
                },
            ],
            ..event(1, T, tcp_v4("connect_attempt"))
        };
        let row = network_row(&e);
        assert_eq!(row.ancestor_pids, vec![4200, 1]);
        assert_eq!(
            row.ancestor_exes,
            vec!["/usr/bin/bash", "/usr/lib/systemd/systemd"]
        );
        assert_eq!(row.ancestor_argv0, vec!["-bash", "/sbin/init"]);
        assert_eq!(row.ancestor_start_ns, vec![T - 1, 0]);
    }

    #[test]
    fn malformed_tcp_events_are_refused() {
        let bad_address = |field, ip_version, addr: &str| RejectReason::TcpBadAddress {
            seq: 6,
            field,
            ip_version,
            addr: addr.into(),
        };
        let cases = [
            (
                tcp_v4("Connected"),
                RejectReason::TcpUnknownAction {
                    seq: 6,
                    action: "Connected".into(),
                },
            ),
            (
                tcp_v4(""),
                RejectReason::TcpUnknownAction {
                    seq: 6,
                    action: String::new(),
                },
            ),
            (
                with_tcp(tcp_v4("listen"), |t| t.ip_version = 0),
                RejectReason::TcpIpVersion {
                    seq: 6,
                    ip_version: 0,
                },
            ),
            (
                with_tcp(tcp_v6("listen"), |t| t.ip_version = 5),
                RejectReason::TcpIpVersion {
                    seq: 6,
                    ip_version: 5,
                },
            ),
            (
                with_tcp(tcp_v4("connected"), |t| t.local_port = 65_536),
                RejectReason::TcpPortOutOfRange {
                    seq: 6,
                    field: "local_port",
                    port: 65_536,
                },
            ),
            (
                with_tcp(tcp_v6("accepted"), |t| t.remote_port = u32::MAX),
                RejectReason::TcpPortOutOfRange {
                    seq: 6,
                    field: "remote_port",
                    port: u32::MAX,
                },
            ),
            // An IPv6 address in an IPv4 event, and the other way round.
            (
                with_tcp(tcp_v4("connected"), |t| t.local_addr = "::1".into()),
                bad_address("local_addr", 4, "::1"),
            ),
            (
                with_tcp(tcp_v6("connected"), |t| {
                    t.remote_addr = "198.51.100.7".into()
                }),
                bad_address("remote_addr", 6, "198.51.100.7"),
            ),
            (
                with_tcp(tcp_v4("closed"), |t| t.remote_addr.clear()),
                bad_address("remote_addr", 4, ""),
            ),
            (
                with_tcp(tcp_v4("closed"), |t| {
                    t.local_addr = "192.0.2.10:51234".into()
                }),
                bad_address("local_addr", 4, "192.0.2.10:51234"),
            ),
            (
                with_tcp(tcp_v4("closed"), |t| t.local_addr = "256.0.0.1".into()),
                bad_address("local_addr", 4, "256.0.0.1"),
            ),
            (
                with_tcp(tcp_v6("listen"), |t| t.local_addr = "fe80::1%eth0".into()),
                bad_address("local_addr", 6, "fe80::1%eth0"),
            ),
        ];
        for (kind, reason) in cases {
            assert_eq!(convert(&event(6, T, kind)), Err(reason));
        }
    }

    #[test]
    fn reject_reasons_quote_at_most_64_characters() {
        let garbage = "x".repeat(10_000);
        let kind = with_tcp(tcp_v4("connected"), |t| t.remote_addr = garbage.clone());
        let Err(RejectReason::TcpBadAddress { addr, .. }) = convert(&event(1, T, kind)) else {
            panic!("not refused")
        };
        assert_eq!(addr, format!("{}…", "x".repeat(64)));
        // Cut on a character boundary.
        assert_eq!(excerpt(&"é".repeat(65)), format!("{}…", "é".repeat(64)));
        assert_eq!(excerpt(&"é".repeat(64)), "é".repeat(64));
        let reason = convert(&event(2, T, tcp_v4(&"a".repeat(100)))).unwrap_err();
        assert!(reason.to_string().len() < 140, "{reason}");
        assert!(reason
            .to_string()
            .starts_with("tcp event seq 2 has unknown action"));
    }

    /// `/usr/bin/vim` (pid 5100) acting on `/etc/crontab`: the fields every
    /// action has.
    fn file_kind(action: &str) -> Kind {
        Kind::File(FileActivity {
            action: action.into(),
            pid: 5100,
            uid: 1000,
            gid: 100,
            cgroup_id: 88,
            path: "/etc/crontab".into(),
            exe: "/usr/bin/vim".into(),
            user_name: "alice".into(),
            cgroup_path: SESSION_CGROUP.into(),
            ..Default::default()
        })
    }

    fn with_file(mut kind: Kind, change: impl FnOnce(&mut FileActivity)) -> Kind {
        if let Kind::File(file) = &mut kind {
            change(file);
        }
        kind
    }

    fn rename(from: &str, to: &str) -> Kind {
        with_file(file_kind("rename"), |f| {
            f.path = from.into();
            f.target_path = to.into();
        })
    }

    fn file_row_of(event: &Event) -> FileEventRow {
        match convert(event) {
            Ok(EventRow::FileEvent(row)) => row,
            other => panic!("not a file event row: {other:?}"),
        }
    }

    /// The row of [`file_kind`] from [`identity`], for `action`.
    fn file_base(seq: u64, action: &str) -> FileEventRow {
        FileEventRow {
            org_id: "pref".into(),
            time: 1_700_000_000,
            time_ns: T,
            device_id: "dev-1".into(),
            hostname: "pc-001".into(),
            boot_id: "b-1".into(),
            seq,
            action: action.into(),
            pid: 5100,
            uid: 1000,
            gid: 100,
            cgroup_id: 88,
            exe: "/usr/bin/vim".into(),
            path: "/etc/crontab".into(),
            target_path: String::new(),
            open_flags: 0,
            mode: 0,
            path_truncated: 0,
            ancestor_pids: Vec::new(),
            ancestor_exes: Vec::new(),
            ancestor_argv0: Vec::new(),
            ancestor_start_ns: Vec::new(),
            agent_version: "0.1.0".into(),
            ingested_at: NOW,
            user_name: "alice".into(),
            cgroup_path: SESSION_CGROUP.into(),
            container_id: String::new(),
        }
    }

    /// O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC.
    const WRITE_CREATE_FLAGS: u32 = 0o1 | 0o100 | 0o1000 | 0o2_000_000;
    /// O_RDONLY | O_CLOEXEC.
    const READ_FLAGS: u32 = 0o2_000_000;

    #[test]
    fn open_write_carries_flags_and_create_mode() {
        let kind = with_file(file_kind("open_write"), |f| {
            f.open_flags = WRITE_CREATE_FLAGS;
            f.mode = 0o644;
        });
        let converted = convert_batch(Some(&identity()), &[event(1, T, kind)], NOW);
        assert_eq!(converted.rejected, 0);
        assert!(converted.rows.process_events.is_empty());
        assert!(converted.rows.network_events.is_empty() && converted.rows.gaps.is_empty());
        assert_eq!(
            converted.rows.file_events,
            vec![FileEventRow {
                open_flags: WRITE_CREATE_FLAGS,
                mode: 0o644,
                ..file_base(1, "open_write")
            }]
        );
    }

    #[test]
    fn open_read_carries_flags() {
        let kind = with_file(file_kind("open_read"), |f| {
            f.path = "/etc/shadow".into();
            f.open_flags = READ_FLAGS;
            f.exe = "/usr/bin/python3".into();
        });
        assert_eq!(
            file_row_of(&event(2, T, kind)),
            FileEventRow {
                path: "/etc/shadow".into(),
                open_flags: READ_FLAGS,
                exe: "/usr/bin/python3".into(),
                ..file_base(2, "open_read")
            }
        );
    }

    #[test]
    fn unlink_is_the_path_alone() {
        assert_eq!(
            file_row_of(&event(3, T, file_kind("unlink"))),
            file_base(3, "unlink")
        );
    }

    #[test]
    fn rename_carries_the_target_path() {
        let kind = rename("/tmp/x", "/etc/systemd/system/evil.service");
        assert_eq!(
            file_row_of(&event(4, T, kind)),
            FileEventRow {
                path: "/tmp/x".into(),
                target_path: "/etc/systemd/system/evil.service".into(),
                ..file_base(4, "rename")
            }
        );
    }

    #[test]
    fn chmod_carries_the_new_mode() {
        let kind = with_file(file_kind("chmod"), |f| {
            f.path = "/usr/local/bin/helper".into();
            f.mode = 0o4755;
        });
        let row = file_row_of(&event(5, T, kind));
        assert_eq!(
            row,
            FileEventRow {
                path: "/usr/local/bin/helper".into(),
                mode: 0o4755,
                ..file_base(5, "chmod")
            }
        );
        assert_ne!(row.mode & 2048, 0, "the setuid bit the docs query for");
    }

    #[test]
    fn file_rows_carry_truncation_and_the_processs_ancestry() {
        let kind = with_file(file_kind("open_write"), |f| {
            f.path = format!("/tmp/{}", "d".repeat(250));
            f.path_truncated = true;
        });
        let e = Event {
            ancestors: vec![
                Ancestor {
                    pid: 5000,
                    exe: "/usr/bin/bash".into(),
                    argv0: "-bash".into(),
                    start_unix_ns: T - 1,
                },
                Ancestor {
                    pid: 1,
                    exe: "/usr/lib/systemd/systemd".into(),
                    argv0: "/sbin/init".into(),
                    start_unix_ns: 0,
                },
            ],
            ..event(6, T, kind)
        };
        let row = file_row_of(&e);
        assert_eq!(row.path_truncated, 1);
        assert_eq!(row.path.len(), 255);
        assert_eq!(row.ancestor_pids, vec![5000, 1]);
        assert_eq!(
            row.ancestor_exes,
            vec!["/usr/bin/bash", "/usr/lib/systemd/systemd"]
        );
        assert_eq!(row.ancestor_argv0, vec!["-bash", "/sbin/init"]);
        assert_eq!(row.ancestor_start_ns, vec![T - 1, 0]);
    }

    #[test]
    fn malformed_file_events_are_refused() {
        let mut cases = vec![
            (
                file_kind("write"),
                RejectReason::FileUnknownAction {
                    seq: 7,
                    action: "write".into(),
                },
            ),
            (
                file_kind("OPEN_READ"),
                RejectReason::FileUnknownAction {
                    seq: 7,
                    action: "OPEN_READ".into(),
                },
            ),
            (
                file_kind(""),
                RejectReason::FileUnknownAction {
                    seq: 7,
                    action: String::new(),
                },
            ),
            (
                rename("/etc/passwd", ""),
                RejectReason::FileRenameWithoutTarget { seq: 7 },
            ),
        ];
        for action in ["open_write", "open_read", "unlink", "rename", "chmod"] {
            cases.push((
                with_file(file_kind(action), |f| {
                    f.path.clear();
                    f.target_path = "/etc/x".into();
                }),
                RejectReason::FileEmptyPath { seq: 7 },
            ));
        }
        for action in ["open_write", "open_read", "unlink", "chmod"] {
            cases.push((
                with_file(file_kind(action), |f| f.target_path = "/etc/x".into()),
                RejectReason::FileTargetOnNonRename {
                    seq: 7,
                    action: FILE_ACTIONS.into_iter().find(|a| *a == action).unwrap(),
                },
            ));
        }
        for (kind, reason) in cases {
            assert_eq!(convert(&event(7, T, kind)), Err(reason));
        }
        assert_eq!(
            RejectReason::FileTargetOnNonRename {
                seq: 7,
                action: "chmod"
            }
            .to_string(),
            "file event seq 7 is a chmod with a target path"
        );
        let long = convert(&event(8, T, file_kind(&"z".repeat(500)))).unwrap_err();
        assert_eq!(
            long,
            RejectReason::FileUnknownAction {
                seq: 8,
                action: format!("{}…", "z".repeat(64)),
            }
        );
    }

    /// `/usr/bin/sudo` (pid 6100) becoming root with `syscall`.
    fn creds_kind(syscall: &str) -> Kind {
        Kind::Creds(CredentialChange {
            pid: 6100,
            syscall: syscall.into(),
            old_uid: 1000,
            old_euid: 1000,
            old_gid: 100,
            old_egid: 100,
            uid: 0,
            euid: 0,
            gid: 100,
            egid: 0,
            cgroup_id: 91,
            exe: "/usr/bin/sudo".into(),
        })
    }

    #[test]
    fn a_credential_change_is_a_process_row_with_old_and_new_ids() {
        let e = Event {
            ancestors: vec![Ancestor {
                pid: 6000,
                exe: "/usr/bin/bash".into(),
                argv0: "-bash".into(),
                start_unix_ns: T - 9,
            }],
            ..event(8, T, creds_kind("setresuid"))
        };
        let converted = convert_batch(Some(&identity()), &[e], NOW);
        assert_eq!((converted.rejected, converted.first_reason), (0, None));
        assert_eq!(
            converted.rows.process_events,
            vec![ProcessEventRow {
                pid: 6100,
                uid: 0,
                euid: 0,
                gid: 100,
                egid: 0,
                cgroup_id: 91,
                exe: "/usr/bin/sudo".into(),
                previous_uid: 1000,
                previous_euid: 1000,
                previous_gid: 100,
                previous_egid: 100,
                cred_syscall: "setresuid".into(),
                ancestor_pids: vec![6000],
                ancestor_exes: vec!["/usr/bin/bash".into()],
                ancestor_argv0: vec!["-bash".into()],
                ancestor_start_ns: vec![T - 9],
                ..base(8, "cred_change")
            }]
        );
        // Every listed system call is taken, as sent.
        for syscall in CRED_SYSCALLS {
            assert_eq!(
                process_row(&event(9, T, creds_kind(syscall))).cred_syscall,
                syscall
            );
        }
    }

    #[test]
    fn other_process_rows_have_no_credential_change() {
        for kind in [
            exec_event(1, T).kind.unwrap(),
            Kind::Fork(ProcessFork::default()),
            exit(Some(0), None, false),
        ] {
            let row = process_row(&event(3, T, kind));
            assert_eq!(
                (
                    row.previous_uid,
                    row.previous_euid,
                    row.previous_gid,
                    row.previous_egid,
                    row.cred_syscall.as_str()
                ),
                (0, 0, 0, 0, "")
            );
        }
    }

    #[test]
    fn a_credential_change_with_an_unknown_syscall_is_refused() {
        for syscall in ["setfsuid", "SETUID", "setuid ", "capset", ""] {
            assert_eq!(
                convert(&event(10, T, creds_kind(syscall))),
                Err(RejectReason::CredUnknownSyscall {
                    seq: 10,
                    syscall: syscall.into(),
                }),
                "{syscall:?}"
            );
        }
        let reason = convert(&event(11, T, creds_kind(&"s".repeat(300)))).unwrap_err();
        assert_eq!(
            reason,
            RejectReason::CredUnknownSyscall {
                seq: 11,
                syscall: format!("{}…", "s".repeat(64)),
            }
        );
        assert_eq!(
            RejectReason::CredUnknownSyscall {
                seq: 12,
                syscall: "setfsuid".into(),
            }
            .to_string(),
            "credential change event seq 12 has unknown syscall \"setfsuid\", \
             not setuid, setgid, setreuid, setregid, setresuid or setresgid"
        );
        // A refused change does not stop the batch.
        let events = [
            event(1, T, creds_kind("setuid")),
            event(2, T, creds_kind("setfsuid")),
            exec_event(3, T),
        ];
        let converted = convert_batch(Some(&identity()), &events, NOW);
        let stored: Vec<(u64, &str)> = converted
            .rows
            .process_events
            .iter()
            .map(|r| (r.seq, r.event_type.as_str()))
            .collect();
        assert_eq!(stored, vec![(1, "cred_change"), (3, "exec")]);
        assert_eq!(converted.rejected, 1);
        assert!(matches!(
            converted.first_reason,
            Some(RejectReason::CredUnknownSyscall { seq: 2, .. })
        ));
    }
    #[test]
    fn tcp_and_file_rows_carry_the_owners_user_cgroup_and_container() {
        let path = format!("/system.slice/docker-{CONTAINER_ID}.scope");
        let tcp = with_tcp(tcp_v4("connected"), |t| {
            t.user_name = "www-data".into();
            t.cgroup_path = path.clone();
            t.container_id = CONTAINER_ID.into();
        });
        assert_eq!(
            network_row(&event(1, T, tcp)),
            NetworkEventRow {
                user_name: "www-data".into(),
                cgroup_path: path.clone(),
                container_id: CONTAINER_ID.into(),
                ..network_base(1, "connected", "outbound")
            }
        );
        let file = with_file(file_kind("unlink"), |f| {
            f.user_name = "root".into();
            f.cgroup_path = path.clone();
            f.container_id = CONTAINER_ID.into();
        });
        assert_eq!(
            file_row_of(&event(2, T, file)),
            FileEventRow {
                user_name: "root".into(),
                cgroup_path: path.clone(),
                container_id: CONTAINER_ID.into(),
                ..file_base(2, "unlink")
            }
        );
    }

    #[test]
    fn an_unknown_owner_is_stored_empty_on_tcp_and_file_rows() {
        // As an agent older than the fields sends them, or one that could
        // not tell (a socket that predates the agent).
        let tcp = with_tcp(tcp_v4("closed"), |t| {
            t.owner_unknown = true;
            t.user_name.clear();
            t.cgroup_path.clear();
        });
        let row = network_row(&event(1, T, tcp));
        assert_eq!(
            (
                row.user_name.as_str(),
                row.cgroup_path.as_str(),
                row.container_id.as_str()
            ),
            ("", "", "")
        );
        let file = with_file(file_kind("chmod"), |f| {
            f.user_name.clear();
            f.cgroup_path.clear();
        });
        let row = file_row_of(&event(2, T, file));
        assert_eq!(
            (
                row.user_name.as_str(),
                row.cgroup_path.as_str(),
                row.container_id.as_str()
            ),
            ("", "", "")
        );
    }

    /// Every kind that names its process's owner refuses a malformed one the
    /// same way, naming the kind.
    #[test]
    fn a_malformed_owner_is_refused_on_every_kind() {
        type Change = fn(&mut String, &mut String, &mut String);
        let owner_of = |kind: &str, change: Change| -> Kind {
            match kind {
                "exec" => {
                    let mut exec = exec_event(1, T).kind.unwrap();
                    if let Kind::Exec(e) = &mut exec {
                        change(&mut e.user_name, &mut e.cgroup_path, &mut e.container_id);
                    }
                    exec
                }
                "tcp" => with_tcp(tcp_v4("connected"), |t| {
                    change(&mut t.user_name, &mut t.cgroup_path, &mut t.container_id)
                }),
                "file" => with_file(file_kind("open_write"), |f| {
                    change(&mut f.user_name, &mut f.cgroup_path, &mut f.container_id)
                }),
                "dns" => with_dns(dns_v4("example.org", "A"), |d| {
                    change(&mut d.user_name, &mut d.cgroup_path, &mut d.container_id)
                }),
                _ => with_decision(decision_v4("deny", "denied"), |d| {
                    change(&mut d.user_name, &mut d.cgroup_path, &mut d.container_id)
                }),
            }
        };
        for kind in ["exec", "tcp", "file", "dns", "decision"] {
            let k = kind;
            let cases: [(Change, RejectReason); 5] = [
                (
                    |u, _, _| *u = "u".repeat(257),
                    RejectReason::UserNameTooLong {
                        seq: 9,
                        kind: k,
                        bytes: 257,
                    },
                ),
                (
                    |_, _, c| *c = CONTAINER_ID[..12].into(),
                    RejectReason::BadContainerId {
                        seq: 9,
                        kind: k,
                        container_id: CONTAINER_ID[..12].into(),
                    },
                ),
                (
                    |_, _, c| *c = CONTAINER_ID.to_ascii_uppercase(),
                    RejectReason::BadContainerId {
                        seq: 9,
                        kind: k,
                        container_id: CONTAINER_ID.to_ascii_uppercase(),
                    },
                ),
                (
                    |_, p, _| *p = format!("/{}", "c".repeat(4096)),
                    RejectReason::CgroupPathTooLong {
                        seq: 9,
                        kind: k,
                        bytes: 4097,
                    },
                ),
                (
                    |_, p, _| *p = "system.slice".into(),
                    RejectReason::CgroupPathNotAbsolute {
                        seq: 9,
                        kind: k,
                        cgroup_path: "system.slice".into(),
                    },
                ),
            ];
            for (change, reason) in cases {
                assert_eq!(
                    convert(&event(9, T, owner_of(kind, change))),
                    Err(reason),
                    "{kind}"
                );
            }
            // The limits themselves are fine.
            let longest: Change = |u, p, c| {
                *u = "u".repeat(256);
                *p = format!("/{}", "c".repeat(4095));
                *c = CONTAINER_ID.into();
            };
            assert!(
                convert(&event(9, T, owner_of(kind, longest))).is_ok(),
                "{kind}"
            );
        }
        assert_eq!(
            RejectReason::BadContainerId {
                seq: 3,
                kind: "dns",
                container_id: "abc".into(),
            }
            .to_string(),
            "dns event seq 3 has container_id \"abc\", \
             not empty or 64 lowercase hex characters"
        );
        assert_eq!(
            RejectReason::CgroupPathNotAbsolute {
                seq: 4,
                kind: "tcp",
                cgroup_path: "x".into(),
            }
            .to_string(),
            "tcp event seq 4 has cgroup_path \"x\", not starting with '/'"
        );
    }

    /// `/usr/bin/curl` (pid 4300, alice) asking 192.0.2.53 for `name` of
    /// `query_type` over IPv4: a query whose question was read.
    fn dns_v4(name: &str, query_type: &str) -> Kind {
        Kind::Dns(DnsQuery {
            pid: 4300,
            owner_unknown: false,
            uid: 1000,
            gid: 100,
            cgroup_id: 77,
            ip_version: 4,
            source_addr: "192.0.2.10".into(),
            source_port: 40_123,
            server_addr: "192.0.2.53".into(),
            server_port: 53,
            transaction_id: 0xbeef,
            query_name: name.into(),
            query_type: query_type.into(),
            question_count: 1,
            message_len: 40,
            parse_error: String::new(),
            exe: "/usr/bin/curl".into(),
            user_name: "alice".into(),
            cgroup_path: SESSION_CGROUP.into(),
            container_id: String::new(),
        })
    }

    /// The same over IPv6, to 2001:db8::53.
    fn dns_v6(name: &str, query_type: &str) -> Kind {
        with_dns(dns_v4(name, query_type), |d| {
            d.ip_version = 6;
            d.source_addr = "2001:db8::10".into();
            d.server_addr = "2001:db8::53".into();
        })
    }

    fn with_dns(mut kind: Kind, change: impl FnOnce(&mut DnsQuery)) -> Kind {
        if let Kind::Dns(dns) = &mut kind {
            change(dns);
        }
        kind
    }

    fn dns_row_of(event: &Event) -> DnsEventRow {
        match convert(event) {
            Ok(EventRow::DnsEvent(row)) => row,
            other => panic!("not a dns event row: {other:?}"),
        }
    }

    /// The row of [`dns_v4`] from [`identity`].
    fn dns_base(seq: u64, name: &str, query_type: &str) -> DnsEventRow {
        DnsEventRow {
            org_id: "pref".into(),
            time: 1_700_000_000,
            time_ns: T,
            device_id: "dev-1".into(),
            hostname: "pc-001".into(),
            boot_id: "b-1".into(),
            seq,
            pid: 4300,
            owner_unknown: 0,
            uid: 1000,
            gid: 100,
            cgroup_id: 77,
            exe: "/usr/bin/curl".into(),
            user_name: "alice".into(),
            cgroup_path: SESSION_CGROUP.into(),
            container_id: String::new(),
            ip_version: 4,
            source_addr: "192.0.2.10".into(),
            source_port: 40_123,
            server_addr: "192.0.2.53".into(),
            server_port: 53,
            transaction_id: 0xbeef,
            query_name: name.into(),
            query_type: query_type.into(),
            question_count: 1,
            message_len: 40,
            parse_error: String::new(),
            ancestor_pids: Vec::new(),
            ancestor_exes: Vec::new(),
            ancestor_argv0: Vec::new(),
            ancestor_start_ns: Vec::new(),
            agent_version: "0.1.0".into(),
            ingested_at: NOW,
        }
    }

    #[test]
    fn a_dns_query_becomes_a_dns_row_with_every_field() {
        let converted = convert_batch(
            Some(&identity()),
            &[event(1, T, dns_v4("files.example.org", "A"))],
            NOW,
        );
        assert_eq!((converted.rejected, converted.first_reason), (0, None));
        assert!(converted.rows.process_events.is_empty() && converted.rows.gaps.is_empty());
        assert!(converted.rows.network_events.is_empty());
        assert!(converted.rows.file_events.is_empty());
        assert_eq!(
            converted.rows.dns_events,
            vec![dns_base(1, "files.example.org", "A")]
        );

        let v6 = dns_row_of(&event(2, T, dns_v6("files.example.org", "AAAA")));
        assert_eq!(
            v6,
            DnsEventRow {
                ip_version: 6,
                source_addr: "2001:db8::10".into(),
                server_addr: "2001:db8::53".into(),
                ..dns_base(2, "files.example.org", "AAAA")
            }
        );
    }

    #[test]
    fn dns_rows_carry_the_senders_container_and_ancestry() {
        let path = format!("/system.slice/docker-{CONTAINER_ID}.scope");
        let kind = with_dns(dns_v4("c2.example.net", "TXT"), |d| {
            d.cgroup_path = path.clone();
            d.container_id = CONTAINER_ID.into();
            d.user_name = "root".into();
        });
        let e = Event {
            ancestors: vec![
                Ancestor {
                    pid: 4200,
                    exe: "/usr/bin/bash".into(),
                    argv0: "-bash".into(),
                    start_unix_ns: T - 1,
                },
                Ancestor {
                    pid: 1,
                    exe: "/usr/lib/systemd/systemd".into(),
                    argv0: "/sbin/init".into(),
                    start_unix_ns: 0,
                },
            ],
            ..event(3, T, kind)
        };
        assert_eq!(
            dns_row_of(&e),
            DnsEventRow {
                user_name: "root".into(),
                cgroup_path: path,
                container_id: CONTAINER_ID.into(),
                ancestor_pids: vec![4200, 1],
                ancestor_exes: vec!["/usr/bin/bash".into(), "/usr/lib/systemd/systemd".into()],
                ancestor_argv0: vec!["-bash".into(), "/sbin/init".into()],
                ancestor_start_ns: vec![T - 1, 0],
                ..dns_base(3, "c2.example.net", "TXT")
            }
        );
    }

    #[test]
    fn a_query_whose_question_could_not_be_read_is_stored_with_the_reason() {
        // As the agent sends a datagram too short for a DNS header: no name,
        // no type, id and count 0.
        let kind = with_dns(dns_v4("", ""), |d| {
            d.transaction_id = 0;
            d.question_count = 0;
            d.message_len = 2;
            d.parse_error = "message is shorter than a DNS header".into();
        });
        assert_eq!(
            dns_row_of(&event(4, T, kind)),
            DnsEventRow {
                transaction_id: 0,
                question_count: 0,
                message_len: 2,
                parse_error: "message is shorter than a DNS header".into(),
                ..dns_base(4, "", "")
            }
        );
        // A name kept beside a parse error is stored as sent.
        let kind = with_dns(dns_v4("x.example", ""), |d| {
            d.parse_error = "malformed question: type".into();
        });
        assert_eq!(dns_row_of(&event(5, T, kind)).query_name, "x.example");
    }

    #[test]
    fn unusual_but_valid_dns_queries_are_stored() {
        // The root (".", never ""), an unnamed type, the 16-bit limits,
        // port 0, and a sender the kernel could not attribute.
        let kind = with_dns(dns_v6(".", "TYPE65280"), |d| {
            d.pid = 0;
            d.owner_unknown = true;
            d.exe.clear();
            d.user_name.clear();
            d.cgroup_path.clear();
            d.source_addr = "0:0:0:0:0:0:0:1".into();
            d.source_port = 0;
            d.server_addr = "2001:0DB8:0000:0000:0000:0000:0000:0053".into();
            d.server_port = 65_535;
            d.transaction_id = 65_535;
            d.question_count = 65_535;
            d.message_len = u32::MAX;
        });
        let row = dns_row_of(&event(6, T, kind));
        assert_eq!(
            (row.query_name.as_str(), row.query_type.as_str()),
            (".", "TYPE65280")
        );
        assert_eq!((row.pid, row.owner_unknown, row.exe.as_str()), (0, 1, ""));
        // Addresses in canonical text, as on network_events.
        assert_eq!(
            (row.source_addr.as_str(), row.server_addr.as_str()),
            ("::1", "2001:db8::53")
        );
        assert_eq!(
            (
                row.source_port,
                row.server_port,
                row.transaction_id,
                row.question_count
            ),
            (0, u16::MAX, u16::MAX, u16::MAX)
        );
        assert_eq!(row.message_len, u32::MAX);
    }

    #[test]
    fn malformed_dns_events_are_refused() {
        let bad_address = |field, ip_version, addr: &str| RejectReason::DnsBadAddress {
            seq: 7,
            field,
            ip_version,
            addr: addr.into(),
        };
        let out_of_range = |field, value| RejectReason::DnsFieldOutOfRange {
            seq: 7,
            field,
            value,
        };
        let a = || dns_v4("example.org", "A");
        let cases = [
            (
                with_dns(a(), |d| d.ip_version = 0),
                RejectReason::DnsIpVersion {
                    seq: 7,
                    ip_version: 0,
                },
            ),
            (
                with_dns(a(), |d| d.ip_version = 5),
                RejectReason::DnsIpVersion {
                    seq: 7,
                    ip_version: 5,
                },
            ),
            // An IPv6 address in an IPv4 event, and the other way round.
            (
                with_dns(a(), |d| d.source_addr = "::1".into()),
                bad_address("source_addr", 4, "::1"),
            ),
            (
                with_dns(dns_v6("example.org", "A"), |d| {
                    d.server_addr = "192.0.2.53".into()
                }),
                bad_address("server_addr", 6, "192.0.2.53"),
            ),
            (
                with_dns(a(), |d| d.server_addr.clear()),
                bad_address("server_addr", 4, ""),
            ),
            (
                with_dns(a(), |d| d.server_addr = "192.0.2.53:53".into()),
                bad_address("server_addr", 4, "192.0.2.53:53"),
            ),
            (
                with_dns(a(), |d| d.source_addr = "dns.example".into()),
                bad_address("source_addr", 4, "dns.example"),
            ),
            (
                with_dns(a(), |d| d.source_port = 65_536),
                out_of_range("source_port", 65_536),
            ),
            (
                with_dns(a(), |d| d.server_port = u32::MAX),
                out_of_range("server_port", u32::MAX),
            ),
            (
                with_dns(a(), |d| d.transaction_id = 65_536),
                out_of_range("transaction_id", 65_536),
            ),
            (
                with_dns(a(), |d| d.question_count = 70_000),
                out_of_range("question_count", 70_000),
            ),
            // A question that was read has a name and a type.
            (
                dns_v4("", "A"),
                RejectReason::DnsEmptyQuestion {
                    seq: 7,
                    field: "query_name",
                },
            ),
            (
                dns_v4("example.org", ""),
                RejectReason::DnsEmptyQuestion {
                    seq: 7,
                    field: "query_type",
                },
            ),
        ];
        for (kind, reason) in cases {
            assert_eq!(convert(&event(7, T, kind)), Err(reason));
        }
        assert_eq!(
            out_of_range("transaction_id", 65_536).to_string(),
            "dns event seq 7 has transaction_id 65536, beyond 65535"
        );
        assert_eq!(
            bad_address("server_addr", 6, "192.0.2.53").to_string(),
            "dns event seq 7 has server_addr \"192.0.2.53\", not an IPv6 address"
        );
        assert_eq!(
            RejectReason::DnsEmptyQuestion {
                seq: 7,
                field: "query_name"
            }
            .to_string(),
            "dns event seq 7 has an empty query_name and no parse_error"
        );
        assert_eq!(
            RejectReason::DnsIpVersion {
                seq: 7,
                ip_version: 5
            }
            .to_string(),
            "dns event seq 7 has ip version 5, not 4 or 6"
        );
        // A long refused address is quoted cut.
        let kind = with_dns(a(), |d| d.server_addr = "x".repeat(500));
        assert_eq!(
            convert(&event(8, T, kind)),
            Err(RejectReason::DnsBadAddress {
                seq: 8,
                field: "server_addr",
                ip_version: 4,
                addr: format!("{}…", "x".repeat(64)),
            })
        );
    }

    /// `/usr/bin/curl` (pid 4300, alice) connecting over TCP to
    /// 203.0.113.7:443, decided in the kernel by rule `block-exfil` of
    /// policy version 42 with `action` and `verdict`: no peer, service,
    /// gateway or reason, an executable of unknown hash.
    fn decision_v4(action: &str, verdict: &str) -> Kind {
        Kind::Decision(Decision {
            connection_id: "6f1d2c3b4a5948e7a6b5c4d3e2f10987".into(),
            pid: 4300,
            uid: 1000,
            gid: 100,
            cgroup_id: 77,
            exe: "/usr/bin/curl".into(),
            user_name: "alice".into(),
            cgroup_path: SESSION_CGROUP.into(),
            container_id: String::new(),
            ip_version: 4,
            remote_addr: "203.0.113.7".into(),
            remote_port: 443,
            protocol: "tcp".into(),
            action: action.into(),
            verdict: verdict.into(),
            rule_id: "block-exfil".into(),
            policy_version: 42,
            enforcement_point: "kernel".into(),
            exe_sha256: String::new(),
            peer_id: String::new(),
            service: String::new(),
            direction: "outbound".into(),
            reason: String::new(),
            nearest_rules: Vec::new(),
            gateway: String::new(),
        })
    }

    /// The same to [2001:db8:2::7]:443.
    fn decision_v6(action: &str, verdict: &str) -> Kind {
        with_decision(decision_v4(action, verdict), |d| {
            d.ip_version = 6;
            d.remote_addr = "2001:db8:2::7".into();
        })
    }

    fn with_decision(mut kind: Kind, change: impl FnOnce(&mut Decision)) -> Kind {
        if let Kind::Decision(decision) = &mut kind {
            change(decision);
        }
        kind
    }

    fn decision_row_of(event: &Event) -> DecisionRow {
        match convert(event) {
            Ok(EventRow::Decision(row)) => row,
            other => panic!("not a decision row: {other:?}"),
        }
    }

    /// The row of [`decision_v4`] from [`identity`].
    fn decision_base(seq: u64, action: &str, verdict: &str) -> DecisionRow {
        DecisionRow {
            org_id: "pref".into(),
            time: 1_700_000_000,
            time_ns: T,
            device_id: "dev-1".into(),
            hostname: "pc-001".into(),
            boot_id: "b-1".into(),
            seq,
            connection_id: "6f1d2c3b4a5948e7a6b5c4d3e2f10987".into(),
            pid: 4300,
            uid: 1000,
            gid: 100,
            cgroup_id: 77,
            exe: "/usr/bin/curl".into(),
            user_name: "alice".into(),
            cgroup_path: SESSION_CGROUP.into(),
            container_id: String::new(),
            ip_version: 4,
            remote_addr: "203.0.113.7".into(),
            remote_port: 443,
            protocol: "tcp".into(),
            action: action.into(),
            verdict: verdict.into(),
            rule_id: "block-exfil".into(),
            policy_version: 42,
            enforcement_point: "kernel".into(),
            ancestor_pids: Vec::new(),
            ancestor_exes: Vec::new(),
            ancestor_argv0: Vec::new(),
            ancestor_start_ns: Vec::new(),
            agent_version: "0.1.0".into(),
            ingested_at: NOW,
            exe_sha256: String::new(),
            peer_id: String::new(),
            service: String::new(),
            direction: "outbound".into(),
            reason: String::new(),
            nearest_rules: Vec::new(),
            gateway: String::new(),
        }
    }

    #[test]
    fn a_decision_becomes_a_decisions_row_with_every_field() {
        let converted = convert_batch(
            Some(&identity()),
            &[event(1, T, decision_v4("deny", "denied"))],
            NOW,
        );
        assert_eq!((converted.rejected, converted.first_reason), (0, None));
        assert!(converted.rows.process_events.is_empty() && converted.rows.gaps.is_empty());
        assert!(converted.rows.network_events.is_empty());
        assert!(converted.rows.file_events.is_empty() && converted.rows.dns_events.is_empty());
        assert_eq!(
            converted.rows.decisions,
            vec![decision_base(1, "deny", "denied")]
        );

        let v6 = decision_row_of(&event(2, T, decision_v6("audit", "would_deny")));
        assert_eq!(
            v6,
            DecisionRow {
                ip_version: 6,
                remote_addr: "2001:db8:2::7".into(),
                ..decision_base(2, "audit", "would_deny")
            }
        );
    }

    #[test]
    fn decision_rows_carry_the_processs_container_and_ancestry() {
        let path = format!("/system.slice/docker-{CONTAINER_ID}.scope");
        let kind = with_decision(decision_v4("allow", "allowed"), |d| {
            d.cgroup_path = path.clone();
            d.container_id = CONTAINER_ID.into();
            d.user_name = "root".into();
            d.protocol = "udp".into();
            d.rule_id.clear(); // the policy's default
        });
        let e = Event {
            ancestors: vec![Ancestor {
                pid: 4200,
                exe: "/usr/bin/bash".into(),
                argv0: "-bash".into(),
                start_unix_ns: T - 1,
            }],
            ..event(3, T, kind)
        };
        assert_eq!(
            decision_row_of(&e),
            DecisionRow {
                user_name: "root".into(),
                cgroup_path: path,
                container_id: CONTAINER_ID.into(),
                protocol: "udp".into(),
                rule_id: String::new(),
                ancestor_pids: vec![4200],
                ancestor_exes: vec!["/usr/bin/bash".into()],
                ancestor_argv0: vec!["-bash".into()],
                ancestor_start_ns: vec![T - 1],
                ..decision_base(3, "allow", "allowed")
            }
        );
    }

    #[test]
    fn every_consistent_action_and_verdict_is_stored() {
        for (action, verdict) in [
            ("allow", "allowed"),
            ("deny", "denied"),
            ("deny", "allowed"),
            ("audit", "would_deny"),
            ("audit", "allowed"),
            ("tunnel", "allowed"),
            // The gateway refused a tunnelled connection, or the agent could
            // not tunnel it and failed closed.
            ("tunnel", "denied"),
            ("tunnel", "tunnelled"),
            // A live connection ended by a policy change or a revocation.
            ("tunnel", "closed"),
            ("allow", "closed"),
        ] {
            let row = decision_row_of(&event(4, T, decision_v4(action, verdict)));
            assert_eq!(
                (row.action.as_str(), row.verdict.as_str()),
                (action, verdict)
            );
        }
        // A gateway's decision; the limits of the port and the versions;
        // addresses in canonical text, as on network_events.
        let kind = with_decision(decision_v6("tunnel", "allowed"), |d| {
            d.enforcement_point = "gateway".into();
            d.remote_addr = "2001:0DB8:0000:0000:0000:0000:0000:0007".into();
            d.remote_port = 65_535;
            d.policy_version = u64::MAX;
            d.connection_id.clear();
        });
        let row = decision_row_of(&event(5, T, kind));
        assert_eq!(
            (
                row.enforcement_point.as_str(),
                row.remote_addr.as_str(),
                row.remote_port,
                row.policy_version
            ),
            ("gateway", "2001:db8::7", u16::MAX, u64::MAX)
        );
        assert_eq!(row.connection_id, "");
        let kind = with_decision(decision_v4("allow", "allowed"), |d| d.remote_port = 0);
        assert_eq!(decision_row_of(&event(6, T, kind)).remote_port, 0);
    }

    #[test]
    fn malformed_decisions_are_refused() {
        let a = || decision_v4("deny", "denied");
        let mismatch = |action, verdict, required: &'static [&'static str]| {
            RejectReason::DecisionVerdictMismatch {
                seq: 7,
                action,
                verdict,
                required,
            }
        };
        let bad_address = |ip_version, addr: &str| RejectReason::DecisionBadAddress {
            seq: 7,
            ip_version,
            addr: addr.into(),
        };
        let cases = [
            // Values outside their sets, also in another case.
            (
                decision_v4("block", "denied"),
                RejectReason::DecisionUnknownAction {
                    seq: 7,
                    action: "block".into(),
                },
            ),
            (
                decision_v4("Deny", "denied"),
                RejectReason::DecisionUnknownAction {
                    seq: 7,
                    action: "Deny".into(),
                },
            ),
            (
                decision_v4("", "denied"),
                RejectReason::DecisionUnknownAction {
                    seq: 7,
                    action: String::new(),
                },
            ),
            (
                decision_v4("deny", "dropped"),
                RejectReason::DecisionUnknownVerdict {
                    seq: 7,
                    verdict: "dropped".into(),
                },
            ),
            (
                decision_v4("audit", "would-deny"),
                RejectReason::DecisionUnknownVerdict {
                    seq: 7,
                    verdict: "would-deny".into(),
                },
            ),
            (
                with_decision(a(), |d| d.protocol = "icmp".into()),
                RejectReason::DecisionUnknownProtocol {
                    seq: 7,
                    protocol: "icmp".into(),
                },
            ),
            (
                with_decision(a(), |d| d.protocol = "TCP".into()),
                RejectReason::DecisionUnknownProtocol {
                    seq: 7,
                    protocol: "TCP".into(),
                },
            ),
            (
                with_decision(a(), |d| d.enforcement_point = "proxy".into()),
                RejectReason::DecisionUnknownEnforcementPoint {
                    seq: 7,
                    enforcement_point: "proxy".into(),
                },
            ),
            (
                with_decision(a(), |d| d.enforcement_point.clear()),
                RejectReason::DecisionUnknownEnforcementPoint {
                    seq: 7,
                    enforcement_point: String::new(),
                },
            ),
            (
                decision_v4("tunnel", "Tunnelled"),
                RejectReason::DecisionUnknownVerdict {
                    seq: 7,
                    verdict: "Tunnelled".into(),
                },
            ),
            (
                decision_v4("tunnel", "tunneled"),
                RejectReason::DecisionUnknownVerdict {
                    seq: 7,
                    verdict: "tunneled".into(),
                },
            ),
            // A verdict its action cannot give.
            (
                decision_v4("allow", "denied"),
                mismatch("allow", "denied", &["deny", "tunnel"]),
            ),
            (
                decision_v4("audit", "denied"),
                mismatch("audit", "denied", &["deny", "tunnel"]),
            ),
            (
                decision_v4("deny", "would_deny"),
                mismatch("deny", "would_deny", &["audit"]),
            ),
            (
                decision_v4("allow", "would_deny"),
                mismatch("allow", "would_deny", &["audit"]),
            ),
            (
                decision_v4("tunnel", "would_deny"),
                mismatch("tunnel", "would_deny", &["audit"]),
            ),
            (
                decision_v4("allow", "tunnelled"),
                mismatch("allow", "tunnelled", &["tunnel"]),
            ),
            (
                decision_v4("deny", "tunnelled"),
                mismatch("deny", "tunnelled", &["tunnel"]),
            ),
            (
                decision_v4("audit", "tunnelled"),
                mismatch("audit", "tunnelled", &["tunnel"]),
            ),
            (
                decision_v4("deny", "closed"),
                mismatch("deny", "closed", &["allow", "tunnel"]),
            ),
            (
                decision_v4("audit", "closed"),
                mismatch("audit", "closed", &["allow", "tunnel"]),
            ),
            (
                with_decision(a(), |d| d.ip_version = 0),
                RejectReason::DecisionIpVersion {
                    seq: 7,
                    ip_version: 0,
                },
            ),
            (
                with_decision(a(), |d| d.ip_version = 5),
                RejectReason::DecisionIpVersion {
                    seq: 7,
                    ip_version: 5,
                },
            ),
            // An IPv6 address in an IPv4 decision, and the other way round.
            (
                with_decision(a(), |d| d.remote_addr = "2001:db8::7".into()),
                bad_address(4, "2001:db8::7"),
            ),
            (
                with_decision(decision_v6("deny", "denied"), |d| {
                    d.remote_addr = "203.0.113.7".into()
                }),
                bad_address(6, "203.0.113.7"),
            ),
            (
                with_decision(a(), |d| d.remote_addr.clear()),
                bad_address(4, ""),
            ),
            (
                with_decision(a(), |d| d.remote_addr = "203.0.113.7:443".into()),
                bad_address(4, "203.0.113.7:443"),
            ),
            (
                with_decision(a(), |d| d.remote_addr = "db.example".into()),
                bad_address(4, "db.example"),
            ),
            (
                with_decision(a(), |d| d.remote_port = 65_536),
                RejectReason::DecisionPortOutOfRange {
                    seq: 7,
                    port: 65_536,
                },
            ),
            (
                with_decision(a(), |d| d.remote_port = u32::MAX),
                RejectReason::DecisionPortOutOfRange {
                    seq: 7,
                    port: u32::MAX,
                },
            ),
        ];
        for (kind, reason) in cases {
            assert_eq!(convert(&event(7, T, kind)), Err(reason));
        }
        assert_eq!(
            RejectReason::DecisionUnknownAction {
                seq: 7,
                action: "block".into()
            }
            .to_string(),
            "decision event seq 7 has unknown action \"block\", \
             not allow, deny, audit or tunnel"
        );
        assert_eq!(
            RejectReason::DecisionUnknownVerdict {
                seq: 7,
                verdict: "dropped".into()
            }
            .to_string(),
            "decision event seq 7 has unknown verdict \"dropped\", \
             not allowed, denied, would_deny, tunnelled or closed"
        );
        assert_eq!(
            mismatch("allow", "denied", &["deny", "tunnel"]).to_string(),
            "decision event seq 7 has verdict denied with action allow; \
             denied comes only of action deny or tunnel"
        );
        assert_eq!(
            mismatch("deny", "would_deny", &["audit"]).to_string(),
            "decision event seq 7 has verdict would_deny with action deny; \
             would_deny comes only of action audit"
        );
        assert_eq!(
            RejectReason::DecisionUnknownProtocol {
                seq: 7,
                protocol: "icmp".into()
            }
            .to_string(),
            "decision event seq 7 has unknown protocol \"icmp\", not tcp or udp"
        );
        assert_eq!(
            RejectReason::DecisionUnknownEnforcementPoint {
                seq: 7,
                enforcement_point: "proxy".into()
            }
            .to_string(),
            "decision event seq 7 has unknown enforcement_point \"proxy\", \
             not kernel, kernel_ingress, tunnel or gateway"
        );
        assert_eq!(
            RejectReason::DecisionIpVersion {
                seq: 7,
                ip_version: 5
            }
            .to_string(),
            "decision event seq 7 has ip version 5, not 4 or 6"
        );
        assert_eq!(
            bad_address(6, "203.0.113.7").to_string(),
            "decision event seq 7 has remote_addr \"203.0.113.7\", not an IPv6 address"
        );
        assert_eq!(
            RejectReason::DecisionPortOutOfRange {
                seq: 7,
                port: 65_536
            }
            .to_string(),
            "decision event seq 7 has remote_port 65536, beyond 65535"
        );
        // Long refused values are quoted cut.
        let kind = with_decision(a(), |d| d.action = "x".repeat(500));
        assert_eq!(
            convert(&event(8, T, kind)),
            Err(RejectReason::DecisionUnknownAction {
                seq: 8,
                action: format!("{}…", "x".repeat(64)),
            })
        );
        let kind = with_decision(a(), |d| d.remote_addr = "y".repeat(500));
        assert_eq!(
            convert(&event(8, T, kind)),
            Err(RejectReason::DecisionBadAddress {
                seq: 8,
                ip_version: 4,
                addr: format!("{}…", "y".repeat(64)),
            })
        );
    }

    /// Which action can give which verdict, every pair: `denied` of `deny`
    /// or `tunnel`, `would_deny` of `audit`, `tunnelled` of `tunnel`,
    /// `closed` of `allow` or `tunnel`, `allowed` of any.
    #[test]
    fn verdicts_come_only_of_the_actions_that_can_give_them() {
        for action in DECISION_ACTIONS {
            for verdict in DECISION_VERDICTS {
                let consistent = match verdict {
                    "allowed" => true,
                    "denied" => ["deny", "tunnel"].contains(&action),
                    "would_deny" => action == "audit",
                    "tunnelled" => action == "tunnel",
                    "closed" => ["allow", "tunnel"].contains(&action),
                    other => panic!("untested verdict {other}"),
                };
                let converted = convert(&event(9, T, decision_v4(action, verdict)));
                match converted {
                    Ok(EventRow::Decision(row)) if consistent => {
                        assert_eq!((row.action, row.verdict), (action.into(), verdict.into()));
                    }
                    Err(RejectReason::DecisionVerdictMismatch {
                        action: a,
                        verdict: v,
                        required,
                        ..
                    }) if !consistent => {
                        assert_eq!((a, v), (action, verdict));
                        assert!(!required.contains(&action), "{required:?}");
                    }
                    other => panic!("{action}/{verdict}: {other:?}"),
                }
            }
        }
    }

    const EXE_SHA256: &str = "cb30d69b24245bf2ecdc9e7f53bbad19159999970b6d82c0c00c7d32d9e37aa4";
    const GATEWAY_ID: &str = "spiffe://pref.example/org/pref/device/gw-1";
    const CALLER_ID: &str = "spiffe://pref.example/org/pref/device/dev-1";

    /// The calling device's record of a tunnelled connection: the gateway's
    /// answer, its id and address, the service and the executable's hash.
    #[test]
    fn a_tunnelled_decision_stores_its_peer_service_gateway_and_hash() {
        let kind = with_decision(decision_v4("tunnel", "tunnelled"), |d| {
            d.enforcement_point = "tunnel".into();
            d.exe_sha256 = EXE_SHA256.into();
            d.peer_id = GATEWAY_ID.into();
            d.service = "staff-web".into();
            d.gateway = "192.0.2.1:4433".into();
            d.rule_id = "staff-web".into();
        });
        assert_eq!(
            decision_row_of(&event(10, T, kind)),
            DecisionRow {
                rule_id: "staff-web".into(),
                enforcement_point: "tunnel".into(),
                exe_sha256: EXE_SHA256.into(),
                peer_id: GATEWAY_ID.into(),
                service: "staff-web".into(),
                gateway: "192.0.2.1:4433".into(),
                ..decision_base(10, "tunnel", "tunnelled")
            }
        );

        // The gateway refused it: why, and which rules came nearest.
        let kind = with_decision(decision_v6("tunnel", "denied"), |d| {
            d.enforcement_point = "tunnel".into();
            d.peer_id = GATEWAY_ID.into();
            d.service = "staff-web".into();
            d.gateway = "[2001:db8::1]:4433".into();
            d.reason = "policy".into();
            d.rule_id.clear();
            d.nearest_rules = vec!["staff-web: user alice is not one of [bob]".into()];
        });
        let row = decision_row_of(&event(11, T, kind));
        assert_eq!(
            (
                row.verdict.as_str(),
                row.reason.as_str(),
                row.gateway.as_str(),
                row.rule_id.as_str()
            ),
            ("denied", "policy", "[2001:db8::1]:4433", "")
        );
        assert_eq!(
            row.nearest_rules,
            ["staff-web: user alice is not one of [bob]"]
        );

        // At the gateway: the calling device's id; a stream closed later.
        let kind = with_decision(decision_v4("tunnel", "closed"), |d| {
            d.enforcement_point = "gateway".into();
            d.direction = "inbound".into();
            d.peer_id = CALLER_ID.into();
            d.service = "staff-web".into();
            d.reason = "revoked".into();
        });
        let row = decision_row_of(&event(12, T, kind));
        assert_eq!(
            (
                row.enforcement_point.as_str(),
                row.direction.as_str(),
                row.peer_id.as_str(),
                row.reason.as_str(),
                row.gateway.as_str()
            ),
            ("gateway", "inbound", CALLER_ID, "revoked", "")
        );
    }

    /// A direct connection from the network to a protected port, dropped in
    /// the kernel, as the agent reports it.
    #[test]
    fn a_protected_port_drop_is_an_inbound_kernel_ingress_denial() {
        let kind = with_decision(decision_v4("deny", "denied"), |d| {
            d.enforcement_point = "kernel_ingress".into();
            d.direction = "inbound".into();
            d.reason = "protected_port".into();
            d.remote_port = 8080;
        });
        assert_eq!(
            decision_row_of(&event(13, T, kind)),
            DecisionRow {
                enforcement_point: "kernel_ingress".into(),
                direction: "inbound".into(),
                reason: "protected_port".into(),
                remote_port: 8080,
                ..decision_base(13, "deny", "denied")
            }
        );
    }

    /// Agents older than the new fields send none of them: stored as an
    /// outbound decision with no peer, service, reason, rules or gateway.
    #[test]
    fn a_decision_without_the_new_fields_is_outbound() {
        let kind = with_decision(decision_v4("deny", "denied"), |d| d.direction.clear());
        assert_eq!(
            decision_row_of(&event(14, T, kind)),
            decision_base(14, "deny", "denied")
        );
    }

    #[test]
    fn every_enforcement_point_direction_and_reason_is_stored() {
        for point in ["kernel", "kernel_ingress", "tunnel", "gateway"] {
            let kind = with_decision(decision_v4("deny", "denied"), |d| {
                d.enforcement_point = point.into();
            });
            assert_eq!(
                decision_row_of(&event(15, T, kind)).enforcement_point,
                point
            );
        }
        for direction in ["outbound", "inbound"] {
            let kind = with_decision(decision_v4("deny", "denied"), |d| {
                d.direction = direction.into();
            });
            assert_eq!(decision_row_of(&event(15, T, kind)).direction, direction);
        }
        for reason in [
            "policy",
            "no_service",
            "revoked",
            "fail_closed",
            "service_unreachable",
            "gateway_unreachable",
            "protected_port",
            "bad_request",
            "",
        ] {
            let kind = with_decision(decision_v4("tunnel", "denied"), |d| {
                d.reason = reason.into();
            });
            assert_eq!(decision_row_of(&event(15, T, kind)).reason, reason);
        }
    }

    /// The gateway's address is stored as the canonical text of the parsed
    /// socket address, one spelling per gateway.
    #[test]
    fn gateways_are_stored_in_canonical_form() {
        for (sent, stored) in [
            ("192.0.2.1:4433", "192.0.2.1:4433"),
            ("[2001:0DB8:0000::0001]:4433", "[2001:db8::1]:4433"),
            ("[::ffff:192.0.2.1]:443", "[::ffff:192.0.2.1]:443"),
            ("", ""),
        ] {
            let kind = with_decision(decision_v4("tunnel", "tunnelled"), |d| {
                d.gateway = sent.into();
            });
            assert_eq!(
                decision_row_of(&event(16, T, kind)).gateway,
                stored,
                "{sent}"
            );
        }
    }

    /// `nearest_rules` is cut, never refused: the first 16 entries, each of
    /// at most 256 characters (cut on a character boundary).
    #[test]
    fn nearest_rules_are_cut_to_16_entries_of_256_characters() {
        let long_ascii = "r".repeat(300);
        let long_wide = "é".repeat(300);
        let exact = "x".repeat(256);
        let mut rules = vec![long_ascii, long_wide, exact.clone(), String::new()];
        rules.extend((0..20).map(|i| format!("rule-{i}: no match")));
        let kind = with_decision(decision_v4("deny", "denied"), |d| {
            d.rule_id.clear();
            d.nearest_rules = rules.clone();
        });
        let row = decision_row_of(&event(17, T, kind));
        assert_eq!(row.nearest_rules.len(), MAX_NEAREST_RULES);
        assert_eq!(row.nearest_rules[0], "r".repeat(MAX_NEAREST_RULE_CHARS));
        assert_eq!(row.nearest_rules[1], "é".repeat(MAX_NEAREST_RULE_CHARS));
        assert_eq!(row.nearest_rules[2], exact);
        assert_eq!(row.nearest_rules[3], "");
        assert_eq!(row.nearest_rules[4..], rules[4..MAX_NEAREST_RULES]);
        assert_eq!(row.nearest_rules[15], "rule-11: no match");
    }

    #[test]
    fn malformed_tunnel_fields_are_refused() {
        let a = || decision_v4("tunnel", "tunnelled");
        let bad_sha = |text: &str| RejectReason::DecisionBadSha256 {
            seq: 18,
            exe_sha256: text.into(),
        };
        let bad_peer = |text: &str, error| RejectReason::DecisionBadPeerId {
            seq: 18,
            peer_id: text.into(),
            error,
        };
        let bad_gateway = |text: &str| RejectReason::DecisionBadGateway {
            seq: 18,
            gateway: text.into(),
        };
        let upper = EXE_SHA256.to_ascii_uppercase();
        let short = &EXE_SHA256[..63];
        let cases = [
            // Not 64 lowercase hex.
            (
                with_decision(a(), |d| d.exe_sha256 = upper.clone()),
                bad_sha(&upper),
            ),
            (
                with_decision(a(), |d| d.exe_sha256 = short.into()),
                bad_sha(short),
            ),
            (
                with_decision(a(), |d| d.exe_sha256 = format!("{EXE_SHA256}0")),
                // Quoted cut, as every refused value.
                bad_sha(&format!("{EXE_SHA256}…")),
            ),
            (
                with_decision(a(), |d| {
                    d.exe_sha256 = format!("sha256:{}", &EXE_SHA256[7..])
                }),
                bad_sha(&format!("sha256:{}", &EXE_SHA256[7..])),
            ),
            // Not a SPIFFE id (of the one spelling the identity crate knows).
            (
                with_decision(a(), |d| d.peer_id = "https://gw-1.example".into()),
                bad_peer("https://gw-1.example", SpiffeIdError::WrongScheme),
            ),
            (
                with_decision(a(), |d| {
                    d.peer_id = "SPIFFE://pref.example/org/pref/device/gw-1".into()
                }),
                bad_peer(
                    "SPIFFE://pref.example/org/pref/device/gw-1",
                    SpiffeIdError::WrongScheme,
                ),
            ),
            (
                with_decision(a(), |d| d.peer_id = "spiffe://pref.example/gw-1".into()),
                bad_peer(
                    "spiffe://pref.example/gw-1",
                    SpiffeIdError::UnknownPath {
                        path: "/gw-1".into(),
                    },
                ),
            ),
            (
                with_decision(a(), |d| d.peer_id = "gw-1".into()),
                bad_peer("gw-1", SpiffeIdError::WrongScheme),
            ),
            // Values outside their sets, also in another case.
            (
                with_decision(a(), |d| d.direction = "Inbound".into()),
                RejectReason::DecisionUnknownDirection {
                    seq: 18,
                    direction: "Inbound".into(),
                },
            ),
            (
                with_decision(a(), |d| d.direction = "listen".into()),
                RejectReason::DecisionUnknownDirection {
                    seq: 18,
                    direction: "listen".into(),
                },
            ),
            (
                with_decision(a(), |d| d.reason = "unspecified".into()),
                RejectReason::DecisionUnknownReason {
                    seq: 18,
                    reason: "unspecified".into(),
                },
            ),
            (
                with_decision(a(), |d| d.reason = "Policy".into()),
                RejectReason::DecisionUnknownReason {
                    seq: 18,
                    reason: "Policy".into(),
                },
            ),
            (
                with_decision(a(), |d| d.enforcement_point = "kernel-ingress".into()),
                RejectReason::DecisionUnknownEnforcementPoint {
                    seq: 18,
                    enforcement_point: "kernel-ingress".into(),
                },
            ),
            // Not an address and port.
            (
                with_decision(a(), |d| d.gateway = "192.0.2.1".into()),
                bad_gateway("192.0.2.1"),
            ),
            (
                with_decision(a(), |d| d.gateway = "gw-1.example:4433".into()),
                bad_gateway("gw-1.example:4433"),
            ),
            (
                with_decision(a(), |d| d.gateway = "192.0.2.1:65536".into()),
                bad_gateway("192.0.2.1:65536"),
            ),
            (
                with_decision(a(), |d| d.gateway = "2001:db8::1:4433".into()),
                bad_gateway("2001:db8::1:4433"),
            ),
            (
                with_decision(a(), |d| d.gateway = " 192.0.2.1:4433".into()),
                bad_gateway(" 192.0.2.1:4433"),
            ),
        ];
        for (kind, reason) in cases {
            assert_eq!(convert(&event(18, T, kind)), Err(reason));
        }
        assert_eq!(
            bad_sha("ABC").to_string(),
            "decision event seq 18 has exe_sha256 \"ABC\", \
             not empty or 64 lowercase hex characters"
        );
        assert_eq!(
            bad_peer("gw-1", SpiffeIdError::WrongScheme).to_string(),
            "decision event seq 18 has peer_id \"gw-1\", not empty or a SPIFFE id: \
             SPIFFE id must start with \"spiffe://\" (lowercase)"
        );
        assert_eq!(
            RejectReason::DecisionUnknownDirection {
                seq: 18,
                direction: "in".into()
            }
            .to_string(),
            "decision event seq 18 has unknown direction \"in\", \
             not outbound, inbound or empty"
        );
        assert_eq!(
            RejectReason::DecisionUnknownReason {
                seq: 18,
                reason: "oops".into()
            }
            .to_string(),
            "decision event seq 18 has unknown reason \"oops\", \
             not policy, no_service, revoked, fail_closed, service_unreachable, \
             gateway_unreachable, protected_port, bad_request or empty"
        );
        assert_eq!(
            bad_gateway("gw").to_string(),
            "decision event seq 18 has gateway \"gw\", \
             not empty or an address and port (ip:port, [ipv6]:port)"
        );
        // Long refused values are quoted cut.
        let kind = with_decision(a(), |d| {
            d.peer_id = format!("spiffe://{}", "z".repeat(500));
        });
        match convert(&event(19, T, kind)) {
            Err(RejectReason::DecisionBadPeerId {
                seq: 19, peer_id, ..
            }) => {
                assert_eq!(peer_id, format!("spiffe://{}…", "z".repeat(55)));
            }
            other => panic!("{other:?}"),
        }
        let kind = with_decision(a(), |d| d.gateway = "g".repeat(500));
        assert_eq!(
            convert(&event(19, T, kind)),
            Err(RejectReason::DecisionBadGateway {
                seq: 19,
                gateway: format!("{}…", "g".repeat(64)),
            })
        );
    }

    #[test]
    fn or_lists_read_as_english() {
        assert_eq!(or_list(&[]), "");
        assert_eq!(or_list(&["audit"]), "audit");
        assert_eq!(or_list(&["deny", "tunnel"]), "deny or tunnel");
        assert_eq!(or_list(&["a", "b", "c"]), "a, b or c");
    }
}
