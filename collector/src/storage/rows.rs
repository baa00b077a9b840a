//! Row types of the event tables, field for field in column order. The
//! column names are public (analysts query them): see `docs/schema.md`.

use serde::{Deserialize, Serialize};

/// A row type stored in one table: what the batch writer and
/// [`Storage::insert`](super::Storage::insert) need to know about it.
pub trait TableRow: clickhouse::Row + Serialize + std::fmt::Debug + Send + Sync + 'static {
    /// Bare table name, for a client bound to the database.
    const TABLE: &'static str;
}

/// `process_events.event_type` of a program execution.
pub const EVENT_TYPE_EXEC: &str = "exec";
/// `process_events.event_type` of a new process (fork/clone).
pub const EVENT_TYPE_FORK: &str = "fork";
/// `process_events.event_type` of the end of a process.
pub const EVENT_TYPE_EXIT: &str = "exit";
/// `process_events.event_type` of a change of a process's user or group ids
/// (`setuid(2)` and kin).
pub const EVENT_TYPE_CRED_CHANGE: &str = "cred_change";
/// `process_events.cred_syscall` values: the system call that changed the
/// ids of a `cred_change` row.
pub const CRED_SYSCALLS: [&str; 6] = [
    "setuid",
    "setgid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
];
/// `process_events.loginuid` of a process outside any login session.
pub const NO_LOGINUID: u32 = u32::MAX;
/// `process_events.exit_status` of a process killed by a signal, and of
/// rows that are not exits.
pub const NO_EXIT_STATUS: i16 = -1;

/// One row of `process_events`: a process executed a program (`exec`), was
/// created (`fork`), ended (`exit`) or changed its user or group ids
/// (`cred_change`); see `event_type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct ProcessEventRow {
    pub org_id: String,
    /// Event wall time, seconds since the Unix epoch (`DateTime`).
    pub time: u32,
    /// Event wall time, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    pub device_id: String,
    pub hostname: String,
    pub boot_id: String,
    pub seq: u64,
    pub pid: u32,
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub filename: String,
    pub argv: Vec<String>,
    pub argv_truncated: u8,
    pub filename_truncated: u8,
    pub ppid_unknown: u8,
    pub agent_version: String,
    /// When the collector received the event, seconds (`DateTime`).
    pub ingested_at: u32,
    // Migration 2.
    /// [`EVENT_TYPE_EXEC`], [`EVENT_TYPE_FORK`], [`EVENT_TYPE_EXIT`] or
    /// [`EVENT_TYPE_CRED_CHANGE`]. On `cred_change` rows `uid`, `euid`, `gid`
    /// and `egid` are the ids after the change.
    pub event_type: String,
    pub euid: u32,
    pub egid: u32,
    /// [`NO_LOGINUID`] outside a login session.
    pub loginuid: u32,
    /// Start of the process, Unix nanoseconds (0: unknown).
    pub process_start_ns: u64,
    /// The program: exec → the executed file; fork/exit → the program run.
    pub exe: String,
    pub clone_flags: u64,
    /// 0..=255, or [`NO_EXIT_STATUS`].
    pub exit_status: i16,
    pub exit_signal: u8,
    pub core_dumped: u8,
    pub lifetime_ns: u64,
    /// Ancestors, parent first: four parallel arrays.
    pub ancestor_pids: Vec<u32>,
    pub ancestor_exes: Vec<String>,
    pub ancestor_argv0: Vec<String>,
    pub ancestor_start_ns: Vec<u64>,
    // Migration 6.
    /// Exec rows: SHA-256 of the executed file, 64 lowercase hex characters;
    /// `''` when unknown and on fork/exit rows.
    pub exe_sha256: String,
    /// Exec rows: name of `uid` on the endpoint; `''` when unknown and on
    /// fork/exit rows.
    pub user_name: String,
    // Migration 7.
    /// `cred_change` rows: the ids before the change; 0 on other rows.
    pub previous_uid: u32,
    pub previous_euid: u32,
    pub previous_gid: u32,
    pub previous_egid: u32,
    /// `cred_change` rows: one of [`CRED_SYSCALLS`]; `''` on other rows.
    pub cred_syscall: String,
    // Migration 8.
    /// Exec rows: the process's cgroup v2 path from the hierarchy's root,
    /// starting with `/`; `''` when unknown and on other rows.
    pub cgroup_path: String,
    /// Exec rows: the container id (64 lowercase hex characters) when the
    /// cgroup is a container's; `''` otherwise and on other rows.
    pub container_id: String,
}

impl TableRow for ProcessEventRow {
    const TABLE: &'static str = "process_events";
}

/// One row of `agents`: a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct AgentRow {
    pub org_id: String,
    /// When the collector received it (`DateTime`).
    pub time: u32,
    pub device_id: String,
    /// As registered at enrollment.
    pub hostname: String,
    pub boot_id: String,
    pub agent_version: String,
    pub kernel: String,
    /// `<sensor>=<hook>`.
    pub active_sensors: Vec<String>,
    pub policy_version: u64,
    pub certificate_not_after: u32,
    pub certificate_renewals: u64,
    pub certificate_renewal_failures: u64,
    pub spool_events: u64,
    pub spool_bytes: u64,
    pub kernel_drops: u64,
    pub bulk_sampled: u64,
    pub queue_dropped: u64,
    pub events_acked: u64,
    pub uptime_seconds: u64,
    pub remote_addr: String,
}

impl TableRow for AgentRow {
    const TABLE: &'static str = "agents";
}

/// One row of `audit_log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct AuditRow {
    /// The organisation acted on (the actor's for listings of every one).
    pub org_id: String,
    pub time: u32,
    pub time_ns: u64,
    /// SPIFFE id of the user.
    pub actor: String,
    pub actor_role: String,
    /// `enroll_token.create`, `device.list`, `device.revoke`, ...
    pub action: String,
    pub target: String,
    /// Address the call came from.
    pub source: String,
    /// `ok`, `denied` or `error`.
    pub result: String,
    pub detail: String,
}

impl TableRow for AuditRow {
    const TABLE: &'static str = "audit_log";
}

/// One row of `gaps`: events an agent lost, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct GapRow {
    pub org_id: String,
    /// Event wall time (the end of the gap), seconds (`DateTime`).
    pub time: u32,
    pub time_ns: u64,
    pub device_id: String,
    pub hostname: String,
    pub boot_id: String,
    pub seq: u64,
    /// `critical` or `bulk`.
    pub stream: String,
    /// `ring_full`, `queue_full`, `decode_error`, `sampled`, ...
    pub reason: String,
    pub lost: u64,
    /// The lost events happened in `[from_ns, to_ns]`, Unix nanoseconds.
    pub from_ns: u64,
    pub to_ns: u64,
    pub agent_version: String,
    pub ingested_at: u32,
}

impl TableRow for GapRow {
    const TABLE: &'static str = "gaps";
}

/// `network_events.action` values: a TCP connection's life as the agent saw
/// it. Every value names the wire action it comes from.
pub const TCP_CONNECT_ATTEMPT: &str = "connect_attempt";
pub const TCP_CONNECTED: &str = "connected";
pub const TCP_CONNECT_FAILED: &str = "connect_failed";
pub const TCP_ACCEPTED: &str = "accepted";
pub const TCP_CLOSED: &str = "closed";
pub const TCP_LISTEN: &str = "listen";

/// `network_events.direction` of the `connect_*` actions: this host called out.
pub const DIRECTION_OUTBOUND: &str = "outbound";
/// `network_events.direction` of `accepted`: a peer called in.
pub const DIRECTION_INBOUND: &str = "inbound";
/// `network_events.direction` of `listen`: a socket waiting for peers.
pub const DIRECTION_LISTEN: &str = "listen";
/// `network_events.direction` of `closed`: the close alone does not say who
/// opened the connection.
pub const DIRECTION_UNKNOWN: &str = "";

/// One row of `network_events`: a TCP connection of a process was attempted,
/// established, refused, accepted or closed, or a socket started listening;
/// see `action`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct NetworkEventRow {
    pub org_id: String,
    /// Event wall time, seconds since the Unix epoch (`DateTime`).
    pub time: u32,
    pub time_ns: u64,
    pub device_id: String,
    pub hostname: String,
    pub boot_id: String,
    pub seq: u64,
    /// One of the `TCP_*` actions.
    pub action: String,
    /// One of the `DIRECTION_*` values, derived from `action`.
    pub direction: String,
    /// The owning process; 0 with `owner_unknown` = 1.
    pub pid: u32,
    pub owner_unknown: u8,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    /// The owner's program.
    pub exe: String,
    /// 4 or 6.
    pub ip_version: u8,
    /// This host's end, as text: dotted IPv4 or RFC 5952 IPv6.
    pub local_addr: String,
    pub local_port: u16,
    pub remote_addr: String,
    pub remote_port: u16,
    /// `closed` only: how long the connection was established.
    pub duration_ns: u64,
    /// `closed` only: bytes the peer acknowledged, bytes received.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// `closed` only: 1 when the kernel could not tell the byte counts.
    pub bytes_unknown: u8,
    /// The owner's ancestors, parent first: four parallel arrays.
    pub ancestor_pids: Vec<u32>,
    pub ancestor_exes: Vec<String>,
    pub ancestor_argv0: Vec<String>,
    pub ancestor_start_ns: Vec<u64>,
    pub agent_version: String,
    pub ingested_at: u32,
    // Migration 9.
    /// The owner's user name on the endpoint; `''` when unknown (and when
    /// `owner_unknown`).
    pub user_name: String,
    /// The owner's cgroup v2 path from the hierarchy's root, starting with
    /// `/`; `''` when unknown.
    pub cgroup_path: String,
    /// The owner's container id (64 lowercase hex characters) when its cgroup
    /// is a container's; `''` otherwise and when unknown.
    pub container_id: String,
}

impl TableRow for NetworkEventRow {
    const TABLE: &'static str = "network_events";
}

/// `file_events.action` values: the file operation a process attempted on a
/// watched path. Every value names the wire action it comes from.
pub const FILE_OPEN_WRITE: &str = "open_write";
pub const FILE_OPEN_READ: &str = "open_read";
pub const FILE_UNLINK: &str = "unlink";
pub const FILE_RENAME: &str = "rename";
pub const FILE_CHMOD: &str = "chmod";

/// One row of `file_events`: a process attempted to open for writing or
/// reading, unlink, rename or chmod a watched path (seen at the system call;
/// whether it succeeded is not known); see `action`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct FileEventRow {
    pub org_id: String,
    /// Event wall time, seconds since the Unix epoch (`DateTime`).
    pub time: u32,
    pub time_ns: u64,
    pub device_id: String,
    pub hostname: String,
    pub boot_id: String,
    pub seq: u64,
    /// One of the `FILE_*` actions.
    pub action: String,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    /// The process's program.
    pub exe: String,
    /// The path operated on, absolute, as the process gave it.
    pub path: String,
    /// `rename` only: the new path; `''` on every other action.
    pub target_path: String,
    /// `open_*` only: the open(2) flags.
    pub open_flags: u32,
    /// `chmod`: the new mode; `open_write` with `O_CREAT`: the create mode.
    pub mode: u32,
    /// 1 when the agent cut `path` (or `target_path`) to its buffer.
    pub path_truncated: u8,
    /// The process's ancestors, parent first: four parallel arrays.
    pub ancestor_pids: Vec<u32>,
    pub ancestor_exes: Vec<String>,
    pub ancestor_argv0: Vec<String>,
    pub ancestor_start_ns: Vec<u64>,
    pub agent_version: String,
    pub ingested_at: u32,
    // Migration 9.
    /// The process's user name on the endpoint; `''` when unknown.
    pub user_name: String,
    /// The process's cgroup v2 path from the hierarchy's root, starting with
    /// `/`; `''` when unknown.
    pub cgroup_path: String,
    /// The process's container id (64 lowercase hex characters) when its
    /// cgroup is a container's; `''` otherwise and when unknown.
    pub container_id: String,
}

impl TableRow for FileEventRow {
    const TABLE: &'static str = "file_events";
}

/// One row of `dns_events`: a process sent a DNS query (a UDP datagram to
/// port 53), with the first question read from it, or why it could not be
/// read (`parse_error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct DnsEventRow {
    pub org_id: String,
    /// Event wall time, seconds since the Unix epoch (`DateTime`).
    pub time: u32,
    pub time_ns: u64,
    pub device_id: String,
    pub hostname: String,
    pub boot_id: String,
    pub seq: u64,
    /// The sending process; 0 with `owner_unknown` = 1.
    pub pid: u32,
    /// 1 when the kernel sent the datagram outside any process's context.
    pub owner_unknown: u8,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    /// The sender's program.
    pub exe: String,
    /// The sender's user name on the endpoint; `''` when unknown.
    pub user_name: String,
    /// The sender's cgroup v2 path, starting with `/`; `''` when unknown.
    pub cgroup_path: String,
    /// The sender's container id (64 lowercase hex); `''` outside one.
    pub container_id: String,
    /// 4 or 6.
    pub ip_version: u8,
    /// This host's end, as text: dotted IPv4 or RFC 5952 IPv6.
    pub source_addr: String,
    pub source_port: u16,
    /// The DNS server the query went to, as text.
    pub server_addr: String,
    pub server_port: u16,
    /// The DNS message's id (0 when the message could not be read).
    pub transaction_id: u16,
    /// The first question's name: lower case, presentation form without the
    /// final dot (`.` for the root); `''` only when `parse_error` is set.
    pub query_name: String,
    /// The first question's type mnemonic (`A`, `AAAA`, `TYPE65`); `''`
    /// only when `parse_error` is set.
    pub query_type: String,
    /// Questions the message announces (0 when it could not be read).
    pub question_count: u16,
    /// Length of the whole DNS message, bytes.
    pub message_len: u32,
    /// Why the question could not be read; `''` when it was.
    pub parse_error: String,
    /// The sender's ancestors, parent first: four parallel arrays.
    pub ancestor_pids: Vec<u32>,
    pub ancestor_exes: Vec<String>,
    pub ancestor_argv0: Vec<String>,
    pub ancestor_start_ns: Vec<u64>,
    pub agent_version: String,
    pub ingested_at: u32,
}

impl TableRow for DnsEventRow {
    const TABLE: &'static str = "dns_events";
}

/// `decisions.action` values: what the matched rule (or the policy's
/// default) says to do with a connection.
pub const DECISION_ALLOW: &str = "allow";
pub const DECISION_DENY: &str = "deny";
/// A dry-run rule: the connection goes through, recorded as `would_deny`.
pub const DECISION_AUDIT: &str = "audit";
/// The connection is to go through a tunnel gateway.
pub const DECISION_TUNNEL: &str = "tunnel";
/// Every `decisions.action`.
pub const DECISION_ACTIONS: [&str; 4] = [
    DECISION_ALLOW,
    DECISION_DENY,
    DECISION_AUDIT,
    DECISION_TUNNEL,
];

/// `decisions.verdict` values: what happened to the connection.
pub const VERDICT_ALLOWED: &str = "allowed";
/// Refused; only from an `action = 'deny'` rule, or from a `tunnel` one
/// whose gateway refused the connection.
pub const VERDICT_DENIED: &str = "denied";
/// Let through, but a deny had the rule been enforced; only from an
/// `action = 'audit'` rule.
pub const VERDICT_WOULD_DENY: &str = "would_deny";
/// Carried through a tunnel: the gateway let it through; only from an
/// `action = 'tunnel'` rule.
pub const VERDICT_TUNNELLED: &str = "tunnelled";
/// A live connection ended by a policy change or a revocation; only from an
/// `action = 'allow'` or `'tunnel'` rule.
pub const VERDICT_CLOSED: &str = "closed";
/// Every `decisions.verdict`.
pub const DECISION_VERDICTS: [&str; 5] = [
    VERDICT_ALLOWED,
    VERDICT_DENIED,
    VERDICT_WOULD_DENY,
    VERDICT_TUNNELLED,
    VERDICT_CLOSED,
];

/// Every `decisions.protocol`.
pub const DECISION_PROTOCOLS: [&str; 2] = ["tcp", "udp"];

/// `decisions.enforcement_point` of a decision made in the endpoint's kernel
/// (the cgroup connect hook).
pub const ENFORCEMENT_KERNEL: &str = "kernel";
/// `decisions.enforcement_point` of a direct connection from the network to
/// a protected port, dropped in the kernel (inbound).
pub const ENFORCEMENT_KERNEL_INGRESS: &str = "kernel_ingress";
/// `decisions.enforcement_point` of a tunnelled connection as the calling
/// device's agent reports it, with the gateway's answer.
pub const ENFORCEMENT_TUNNEL: &str = "tunnel";
/// `decisions.enforcement_point` of a decision made by a tunnel gateway (the
/// far side's agent, before it connects to the service).
pub const ENFORCEMENT_GATEWAY: &str = "gateway";
/// Every `decisions.enforcement_point`.
pub const ENFORCEMENT_POINTS: [&str; 4] = [
    ENFORCEMENT_KERNEL,
    ENFORCEMENT_KERNEL_INGRESS,
    ENFORCEMENT_TUNNEL,
    ENFORCEMENT_GATEWAY,
];

/// Every `decisions.direction`: the device connects out, or a connection
/// comes in to this host (as `network_events.direction` spells them). Agents
/// older than the column send none: stored as `outbound`.
pub const DECISION_DIRECTIONS: [&str; 2] = [DIRECTION_OUTBOUND, DIRECTION_INBOUND];

/// Every non-empty `decisions.reason`: why a connection was refused or
/// closed, or why one was let through unverified. `''` otherwise.
pub const DECISION_REASONS: [&str; 9] = [
    // A rule (or the policy's default) said no.
    "policy",
    // The destination matched no service of the gateway.
    "no_service",
    // The calling device is revoked.
    "revoked",
    // No usable policy, or a tunnel that could not be set up: refused.
    "fail_closed",
    // The gateway could not reach the service.
    "service_unreachable",
    // The calling side could not reach the gateway.
    "gateway_unreachable",
    // A direct connection to a port only the gateway may serve.
    "protected_port",
    // The tunnel request was malformed (e.g. a bad destination).
    "bad_request",
    // Allowed at a gateway that cannot confirm revocations (the control
    // plane is unreachable) for a service that fails open, audited.
    "fail_open",
];

/// One row of `decisions`: a zero-trust connection decision, a rule (or the
/// policy's default) applied to a connection of a process (outbound, or
/// inbound to a protected port), and what came of it (`verdict`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct DecisionRow {
    pub org_id: String,
    /// Event wall time, seconds since the Unix epoch (`DateTime`).
    pub time: u32,
    pub time_ns: u64,
    pub device_id: String,
    pub hostname: String,
    pub boot_id: String,
    pub seq: u64,
    /// Names the decision in the agent's logs and across both ends of a
    /// tunnel; stored as sent.
    pub connection_id: String,
    /// The connecting process.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    /// The process's program.
    pub exe: String,
    /// The process's user name on the endpoint; `''` when unknown.
    pub user_name: String,
    /// The process's cgroup v2 path, starting with `/`; `''` when unknown.
    pub cgroup_path: String,
    /// The process's container id (64 lowercase hex); `''` outside one.
    pub container_id: String,
    /// 4 or 6.
    pub ip_version: u8,
    /// The destination, as text: dotted IPv4 or RFC 5952 IPv6.
    pub remote_addr: String,
    pub remote_port: u16,
    /// One of [`DECISION_PROTOCOLS`].
    pub protocol: String,
    /// One of [`DECISION_ACTIONS`].
    pub action: String,
    /// One of [`DECISION_VERDICTS`].
    pub verdict: String,
    /// The matched rule's id; `''` for the policy's default.
    pub rule_id: String,
    /// Version of the policy that decided.
    pub policy_version: u64,
    /// One of [`ENFORCEMENT_POINTS`].
    pub enforcement_point: String,
    /// The process's ancestors, parent first: four parallel arrays.
    pub ancestor_pids: Vec<u32>,
    pub ancestor_exes: Vec<String>,
    pub ancestor_argv0: Vec<String>,
    pub ancestor_start_ns: Vec<u64>,
    pub agent_version: String,
    pub ingested_at: u32,
    // Migration 15: tunnels, gateways and why.
    /// SHA-256 of the process's executable, 64 lowercase hex; `''` when
    /// unknown.
    pub exe_sha256: String,
    /// The other end's SPIFFE id (the gateway's on the calling side, the
    /// calling device's at the gateway); `''` for kernel decisions.
    pub peer_id: String,
    /// The gateway service the destination matched; `''` when none.
    pub service: String,
    /// One of [`DECISION_DIRECTIONS`].
    pub direction: String,
    /// One of [`DECISION_REASONS`], or `''`.
    pub reason: String,
    /// For a default verdict: the nearest rules and why each did not match.
    pub nearest_rules: Vec<String>,
    /// The tunnel's gateway, `ip:port` (`[ip]:port` for IPv6); `''` when not
    /// tunnelled.
    pub gateway: String,
}

impl TableRow for DecisionRow {
    const TABLE: &'static str = "decisions";
}
