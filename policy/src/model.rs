//! The policy model: one layer document after parsing and local
//! validation. Names (groups, services, gateways) are resolved across layers
//! by [`crate::PolicySet`].

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
};

use ipnet::IpNet;

use crate::diag::Position;

/// The version of the policy format this crate reads.
pub const FORMAT_VERSION: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// Prefecture-wide: every organisation inherits it.
    Baseline,
    /// One organisation's own rules.
    Organisation,
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayerKind::Baseline => "baseline",
            LayerKind::Organisation => "organisation",
        })
    }
}

/// What a rule does to a connection it matches. Ordered by strictness:
/// where two verdicts meet (layers, equally specific rules) the stricter
/// one wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    /// Carried through the gateway of the destination's service, which
    /// checks the caller's device, user and process again.
    Tunnel,
    Deny,
}

impl Action {
    pub const ALL: [&'static str; 3] = ["allow", "tunnel", "deny"];

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "allow" => Some(Action::Allow),
            "tunnel" => Some(Action::Tunnel),
            "deny" => Some(Action::Deny),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Tunnel => "tunnel",
            Action::Deny => "deny",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Enforce,
    /// Evaluated and recorded (`would-deny`, ...) but never decides.
    DryRun,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceClass {
    /// Reachable only through its gateway; fails closed by default.
    #[default]
    Protected,
    /// Fails open (audited) by default.
    Standard,
}

impl ServiceClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceClass::Protected => "protected",
            ServiceClass::Standard => "standard",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Refuse while the control plane's revocation list is stale.
    Closed,
    /// Accept, and record every such connection as `fail_open`.
    Open,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Connections this device makes (decided at the source, in the kernel).
    Outbound,
    /// Tunnelled connections arriving at a gateway for a service it protects.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// A name used in the text, with where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub name: String,
    pub position: Position,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    pub name: String,
    /// The identity the gateway's agent presents.
    pub id: String,
    /// Its QUIC endpoint.
    pub address: SocketAddr,
    pub position: Position,
}

/// A device pattern: a SPIFFE id where `*` stands for any run of
/// characters inside one path segment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DevicePattern(pub String);

impl DevicePattern {
    pub fn matches(&self, device: &str) -> bool {
        glob_match(self.0.as_bytes(), device.as_bytes())
    }
}

fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => {
            let mut i = 0;
            loop {
                if glob_match(rest, &text[i..]) {
                    return true;
                }
                if i == text.len() || text[i] == b'/' {
                    return false;
                }
                i += 1;
            }
        }
        Some((c, rest)) => text.first() == Some(c) && glob_match(rest, &text[1..]),
    }
}

/// A binary: by path, by SHA-256 of its content, or both (then both must
/// hold).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct BinaryMatch {
    pub path: Option<String>,
    pub sha256: Option<String>,
}

impl BinaryMatch {
    pub fn matches(&self, exe: &str, sha256: &str) -> bool {
        self.path.as_deref().is_none_or(|p| p == exe)
            && self
                .sha256
                .as_deref()
                .is_none_or(|h| h.eq_ignore_ascii_case(sha256))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Group {
    Devices(Vec<DevicePattern>),
    Users(BTreeSet<String>),
    Binaries(Vec<BinaryMatch>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GroupKind {
    Devices,
    Users,
    Binaries,
}

impl GroupKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupKind::Devices => "devices",
            GroupKind::Users => "users",
            GroupKind::Binaries => "binaries",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub addresses: Vec<IpNet>,
    pub ports: BTreeSet<u16>,
    pub gateway: Option<Named>,
    /// Where the gateway connects; `None`: the caller's original
    /// destination.
    pub target: Option<SocketAddr>,
    pub class: ServiceClass,
    pub position: Position,
}

/// Who a rule applies to; an empty list places no condition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conditions {
    pub devices: Vec<Named>,
    pub users: Vec<Named>,
    pub binaries: Vec<Named>,
}

/// Where a rule applies: named services, and/or addresses with ports
/// (no ports: every port).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destinations {
    pub services: Vec<Named>,
    pub addresses: Vec<IpNet>,
    pub ports: BTreeSet<u16>,
}

/// Carve-outs: a rule does not match a flow that meets any of these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exceptions {
    pub devices: Vec<Named>,
    pub users: Vec<Named>,
    pub binaries: Vec<Named>,
    /// Destinations: `addresses` (none: every address) on `ports` (none:
    /// every port); neither: no destination is excepted.
    pub addresses: Vec<IpNet>,
    pub ports: BTreeSet<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub id: String,
    pub action: Action,
    pub mode: Mode,
    pub from: Conditions,
    pub to: Destinations,
    pub except: Exceptions,
    pub description: Option<String>,
    pub position: Position,
}

/// Defaults where no rule of any layer matches; `None`: not set by this
/// layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Defaults {
    pub outbound: Option<Action>,
    pub inbound: Option<Action>,
    /// Also record allowed connections (decisions are otherwise recorded
    /// for denials, tunnels and dry-run differences).
    pub record_allows: Option<bool>,
    /// Where each default was written (for diagnostics).
    pub outbound_at: Position,
    pub inbound_at: Position,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailModes {
    pub protected: Option<FailMode>,
    pub standard: Option<FailMode>,
    pub protected_at: Position,
    pub standard_at: Position,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detections {
    pub enable: BTreeSet<String>,
    pub disable: BTreeSet<String>,
}

/// A flow in a `tests:` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestFlow {
    pub direction: Direction,
    pub device: String,
    pub user: String,
    pub exe: String,
    pub sha256: String,
    pub destination: SocketAddr,
}

/// An expected verdict, checked on validate and on push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyTest {
    pub name: String,
    pub flow: TestFlow,
    pub expect: Action,
    /// The rule expected to decide; `Some("default")` for the default.
    pub rule: Option<String>,
    pub position: Position,
}

/// One layer document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub kind: LayerKind,
    /// The organisation of an `organisation` layer.
    pub org: Option<String>,
    pub gateways: BTreeMap<String, Gateway>,
    pub groups: BTreeMap<String, (Group, Position)>,
    pub services: BTreeMap<String, Service>,
    /// Sorted by id: rule order in the text never matters.
    pub rules: Vec<Rule>,
    pub defaults: Defaults,
    pub fail_mode: FailModes,
    pub detections: Detections,
    pub tests: Vec<PolicyTest>,
}
