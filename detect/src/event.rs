//! The normalized event the collector feeds to the engine, and typed access
//! to its fields by a [`FieldRef`] resolved once when a rule is loaded.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// What happened. The collector maps each telemetry record to one kind:
/// process exec/fork/exit/creds; TCP `connected` → `Connect` (attempts are not
/// fed: a refused attempt shows as `ConnectFailed` or a `Decision`),
/// `connect_failed`, `accepted`, `closed`, `listen`; file `open_write`,
/// `open_read`, `unlink`, `rename`, `chmod`; DNS queries; zero-trust
/// decisions; agent heartbeats (`zt.agents`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Exec,
    Fork,
    Exit,
    CredChange,
    Connect,
    ConnectFailed,
    Accept,
    Close,
    Listen,
    FileWrite,
    FileRead,
    FileUnlink,
    FileRename,
    FileChmod,
    Dns,
    Decision,
    Heartbeat,
}

impl Kind {
    pub const ALL: [Kind; 17] = [
        Kind::Exec,
        Kind::Fork,
        Kind::Exit,
        Kind::CredChange,
        Kind::Connect,
        Kind::ConnectFailed,
        Kind::Accept,
        Kind::Close,
        Kind::Listen,
        Kind::FileWrite,
        Kind::FileRead,
        Kind::FileUnlink,
        Kind::FileRename,
        Kind::FileChmod,
        Kind::Dns,
        Kind::Decision,
        Kind::Heartbeat,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// The name rules use (`exec`, `file_write`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Exec => "exec",
            Kind::Fork => "fork",
            Kind::Exit => "exit",
            Kind::CredChange => "cred_change",
            Kind::Connect => "connect",
            Kind::ConnectFailed => "connect_failed",
            Kind::Accept => "accept",
            Kind::Close => "close",
            Kind::Listen => "listen",
            Kind::FileWrite => "file_write",
            Kind::FileRead => "file_read",
            Kind::FileUnlink => "file_unlink",
            Kind::FileRename => "file_rename",
            Kind::FileChmod => "file_chmod",
            Kind::Dns => "dns",
            Kind::Decision => "decision",
            Kind::Heartbeat => "heartbeat",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// One ancestor of a process, parent first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ancestor {
    pub pid: u32,
    pub exe: String,
}

/// A normalized event. Strings the source does not carry are empty; numbers
/// it does not carry are `None` where 0 would be a real value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Names the event in alerts: the collector's row id (e.g. a hash of
    /// device, boot id and sequence number).
    pub id: u64,
    pub org: String,
    pub host: String,
    /// Event time, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    pub kind: Kind,
    pub pid: u32,
    pub ppid: u32,
    /// Process start, nanoseconds since the Unix epoch (0: unknown); with
    /// host and pid it names a process across pid reuse.
    pub start_ns: u64,
    /// Parent first, up to pid 1.
    pub ancestry: Vec<Ancestor>,
    pub exe: String,
    pub argv: Vec<String>,
    pub user: String,
    pub uid: Option<u32>,
    pub path: String,
    /// Rename: the new path.
    pub new_path: String,
    /// Chmod: the new mode; open for writing with O_CREAT: the create mode.
    pub mode: Option<u32>,
    /// Open: the open(2) flags.
    pub flags: Option<u32>,
    pub remote_ip: Option<IpAddr>,
    pub remote_port: Option<u16>,
    pub dns_name: String,
    pub verdict: String,
    pub action: String,
    pub rule: String,
    pub reason: String,
    pub peer_id: String,
    pub enforcement_point: String,
}

impl Event {
    /// An event of `kind` with every other field empty.
    pub fn new(kind: Kind, org: &str, host: &str, time_ns: u64) -> Self {
        Self {
            id: 0,
            org: org.to_owned(),
            host: host.to_owned(),
            time_ns,
            kind,
            pid: 0,
            ppid: 0,
            start_ns: 0,
            ancestry: Vec::new(),
            exe: String::new(),
            argv: Vec::new(),
            user: String::new(),
            uid: None,
            path: String::new(),
            new_path: String::new(),
            mode: None,
            flags: None,
            remote_ip: None,
            remote_port: None,
            dns_name: String::new(),
            verdict: String::new(),
            action: String::new(),
            rule: String::new(),
            reason: String::new(),
            peer_id: String::new(),
            enforcement_point: String::new(),
        }
    }

    /// The value of a field (see [`FieldRef`]).
    #[inline]
    pub fn field(&self, field: &FieldRef) -> Value<'_> {
        use FieldRef as F;
        match field {
            F::Org => Value::Str(&self.org),
            F::Host => Value::Str(&self.host),
            F::Kind => Value::Str(self.kind.name()),
            F::Time => Value::Int(self.time_ns as i64),
            F::Pid => Value::Int(i64::from(self.pid)),
            F::Ppid => Value::Int(i64::from(self.ppid)),
            F::Exe => Value::Str(&self.exe),
            F::ExeName => Value::Str(basename(&self.exe)),
            F::Argv => Value::List(List::Strs(&self.argv)),
            F::Argv0 => self
                .argv
                .first()
                .map_or(Value::None, |a| Value::Str(a.as_str())),
            F::User => Value::Str(&self.user),
            F::Uid => self.uid.map_or(Value::None, |u| Value::Int(i64::from(u))),
            F::Path => Value::Str(&self.path),
            F::PathName => Value::Str(basename(&self.path)),
            F::NewPath => Value::Str(&self.new_path),
            F::Target => Value::Str(self.target()),
            F::Mode => self.mode.map_or(Value::None, |m| Value::Int(i64::from(m))),
            F::Flags => self.flags.map_or(Value::None, |m| Value::Int(i64::from(m))),
            F::RemoteIp => self.remote_ip.map_or(Value::None, Value::Ip),
            F::RemotePort => self
                .remote_port
                .map_or(Value::None, |p| Value::Int(i64::from(p))),
            F::DnsName => Value::Str(&self.dns_name),
            F::Verdict => Value::Str(&self.verdict),
            F::Action => Value::Str(&self.action),
            F::Rule => Value::Str(&self.rule),
            F::Reason => Value::Str(&self.reason),
            F::PeerId => Value::Str(&self.peer_id),
            F::EnforcementPoint => Value::Str(&self.enforcement_point),
            F::ParentExe => self
                .ancestry
                .first()
                .map_or(Value::None, |a| Value::Str(&a.exe)),
            F::ParentName => self
                .ancestry
                .first()
                .map_or(Value::None, |a| Value::Str(basename(&a.exe))),
            F::AncestorsExe => Value::List(List::AncestorExes(&self.ancestry)),
            F::AncestorsName => Value::List(List::AncestorNames(&self.ancestry)),
        }
    }

    /// The file the operation leaves changed: the new path of a rename, else
    /// the path.
    pub fn target(&self) -> &str {
        if self.kind == Kind::FileRename && !self.new_path.is_empty() {
            &self.new_path
        } else {
            &self.path
        }
    }
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The type of a field's values, checked against predicates at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Str,
    Int,
    Ip,
    StrList,
}

macro_rules! fields {
    ($($variant:ident = $name:literal : $ty:ident, $doc:literal;)*) => {
        /// A field of [`Event`], resolved from its name once at rule load.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum FieldRef {
            $(#[doc = $doc] $variant,)*
        }

        impl FieldRef {
            pub const ALL: &'static [FieldRef] = &[$(FieldRef::$variant,)*];

            pub fn name(self) -> &'static str {
                match self {
                    $(FieldRef::$variant => $name,)*
                }
            }

            pub fn ty(self) -> FieldType {
                match self {
                    $(FieldRef::$variant => FieldType::$ty,)*
                }
            }

            pub fn doc(self) -> &'static str {
                match self {
                    $(FieldRef::$variant => $doc,)*
                }
            }

            pub fn from_name(name: &str) -> Option<FieldRef> {
                match name {
                    $($name => Some(FieldRef::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

fields! {
    Org = "org": Str, "the organisation";
    Host = "host": Str, "the device";
    Kind = "kind": Str, "the event kind's name, e.g. `file_write`";
    Time = "time": Int, "event time, ns since the Unix epoch";
    Pid = "pid": Int, "process id";
    Ppid = "ppid": Int, "parent process id";
    Exe = "exe": Str, "the program's path";
    ExeName = "exe_name": Str, "the program's file name (`/usr/bin/curl` → `curl`)";
    Argv = "argv": StrList, "the arguments, argv[0] first";
    Argv0 = "argv0": Str, "argv[0]";
    User = "user": Str, "the user name";
    Uid = "uid": Int, "the user id";
    Path = "path": Str, "the file's path";
    PathName = "path_name": Str, "the file's name";
    NewPath = "new_path": Str, "rename: the new path";
    Target = "target": Str, "the file left changed: `new_path` for a rename, else `path`";
    Mode = "mode": Int, "chmod: the new mode; create: the create mode";
    Flags = "flags": Int, "open: the open(2) flags";
    RemoteIp = "remote_ip": Ip, "the other end's address";
    RemotePort = "remote_port": Int, "the other end's port";
    DnsName = "dns_name": Str, "the queried name, lower case, no final dot";
    Verdict = "verdict": Str, "decision: allowed, denied, would_deny, tunnelled, closed";
    Action = "action": Str, "decision: allow, deny, audit, tunnel";
    Rule = "rule": Str, "decision: the matched policy rule's id (empty: the default)";
    Reason = "reason": Str, "decision: why it was refused or closed";
    PeerId = "peer_id": Str, "decision: the other end's SPIFFE id";
    EnforcementPoint = "enforcement_point": Str, "decision: kernel, kernel_ingress, tunnel, gateway";
    ParentExe = "parent.exe": Str, "the parent's program";
    ParentName = "parent.name": Str, "the parent's program's file name";
    AncestorsExe = "ancestors.exe": StrList, "every ancestor's program";
    AncestorsName = "ancestors.name": StrList, "every ancestor's program's file name";
}

/// A field's value. Lists match a predicate when any element does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Str(&'a str),
    Int(i64),
    List(List<'a>),
    Ip(IpAddr),
    None,
}

/// A list of text values, borrowed from the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List<'a> {
    Strs(&'a [String]),
    AncestorExes(&'a [Ancestor]),
    AncestorNames(&'a [Ancestor]),
}

impl<'a> List<'a> {
    pub fn iter(self) -> impl Iterator<Item = &'a str> {
        let (strs, ancestors, names): (&'a [String], &'a [Ancestor], bool) = match self {
            List::Strs(s) => (s, &[], false),
            List::AncestorExes(a) => (&[], a, false),
            List::AncestorNames(a) => (&[], a, true),
        };
        strs.iter()
            .map(String::as_str)
            .chain(ancestors.iter().map(move |a| {
                if names {
                    basename(&a.exe)
                } else {
                    a.exe.as_str()
                }
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_name(kind.name()), Some(kind));
        }
        for field in FieldRef::ALL {
            assert_eq!(FieldRef::from_name(field.name()), Some(*field));
        }
    }

    #[test]
    fn derived_fields() {
        let mut e = Event::new(Kind::FileRename, "o", "h", 1);
        e.exe = "/usr/bin/curl".into();
        e.path = "/tmp/a".into();
        e.new_path = "/etc/cron.d/x".into();
        e.ancestry = vec![
            Ancestor {
                pid: 10,
                exe: "/usr/bin/bash".into(),
            },
            Ancestor {
                pid: 1,
                exe: "/usr/lib/systemd/systemd".into(),
            },
        ];
        assert_eq!(e.field(&FieldRef::ExeName), Value::Str("curl"));
        assert_eq!(e.field(&FieldRef::Target), Value::Str("/etc/cron.d/x"));
        assert_eq!(e.field(&FieldRef::ParentName), Value::Str("bash"));
        assert_eq!(e.field(&FieldRef::Mode), Value::None);
        let Value::List(names) = e.field(&FieldRef::AncestorsName) else {
            panic!("a list");
        };
        assert_eq!(names.iter().collect::<Vec<_>>(), ["bash", "systemd"]);
    }
}
