//! The connection policy the kernel guard enforces, and its compilation
//! into verdict-map entries. Sans-IO: TOML text in, map entries out.
//!
//! This is the guard's own file format until the policy language (signed,
//! versioned bundles) replaces it; the semantics carry over:
//!
//! ```toml
//! version = 3                 # reported with every decision
//! default = "allow"           # allow | deny | audit (dry-run deny)
//! record_allows = false       # also record allowed connections
//!
//! [[rule]]
//! id = "no-cloud-metadata"    # named in every decision it makes
//! action = "deny"             # allow | deny | audit | tunnel
//! destinations = ["169.254.169.254/32", "fd00:ec2::254"]
//! ports = [80]                # omit for every port
//!
//! [[rule]]
//! id = "intranet-via-gateway"
//! action = "tunnel"           # carried to the gateway over QUIC + mTLS
//! destinations = ["10.1.2.3"]
//! ports = [443]
//! gateway = "10.1.2.3:4433"   # the gateway agent's tunnel endpoint (UDP)
//! gateway_id = "spiffe://pref.example/org/city/device/web01"  # optional
//!
//! # On a gateway host: the services it protects, and who may reach them.
//! [[service]]
//! name = "intranet-web"
//! destinations = ["10.1.2.3"] # addresses callers use; omit for any
//! ports = [443]
//! target = "127.0.0.1:443"    # where the gateway connects; omit for the
//!                             # caller's original destination
//! class = "protected"         # protected | standard (see below)
//!
//! [[access]]
//! id = "staff-browse-intranet"
//! service = "intranet-web"
//! action = "allow"            # allow | deny
//! orgs = ["city"]             # every condition is optional; a condition
//! devices = []                # lists what it accepts (SPIFFE ids for
//! users = ["alice", "bob"]    # devices, user names, executable paths
//! exes = ["/usr/bin/curl"]    # and SHA-256 hashes); all given conditions
//! exe_sha256 = []             # must hold
//! ```
//!
//! The most specific rule wins: a rule naming the connection's port before
//! any rule for every port, and among those the longest destination prefix
//! (so `10.1.0.0/16` port 443 beats `10.1.2.3` on every port). Rule
//! order in the file does not matter; two rules claiming the same prefix and
//! port are an error, as are unknown keys, bad addresses and host bits set
//! in a prefix.
//!
//! At a gateway, a tunnelled connection is matched to the service of its
//! original destination; a matching `deny` access rule beats any `allow`,
//! and with neither the connection is refused (default deny, reported with
//! the nearest rules). A `protected` service's ports are not reachable
//! around the gateway (the kernel drops TCP to them unless it comes over
//! loopback) and fail closed when the control plane is unreachable; a
//! `standard` service fails open, with every connection recorded.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use agent_common::{
    GuardCandidate, GuardChain, GuardSettings, InodeKey, Verdict, VerdictAction, VerdictKey,
    CANDIDATE_DRY_RUN, GUARD_CHAINS_CAPACITY, PROTECTED_PORTS_CAPACITY, VERDICTS_CAPACITY,
    VERDICT_KEY_ADDR_OFFSET_BITS,
};
use ipnet::IpNet;
use serde::Deserialize;
use sha2::Digest as _;
use zt_identity::SpiffeId;

use crate::access::{AccessAction, AccessRule, GatewayPolicy, Service, ServiceClass};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("policy is not valid TOML or has unknown keys: {0}")]
    Syntax(String),
    #[error("rule {rule:?}: destination {value:?} is not an address or prefix ({reason})")]
    Destination {
        rule: String,
        value: String,
        reason: String,
    },
    #[error("rule {rule:?}: destination {value:?} has host bits set; write {suggestion}")]
    HostBits {
        rule: String,
        value: String,
        suggestion: String,
    },
    #[error("rule {rule:?} has no destinations")]
    NoDestination { rule: String },
    #[error("rule {rule:?}: port 0 is not a port (omit `ports` for every port)")]
    PortZero { rule: String },
    #[error("rule id {0:?} is used twice")]
    DuplicateId(String),
    #[error("rule id must not be empty")]
    EmptyId,
    #[error("rules {first:?} and {second:?} both claim {destination} port {port}")]
    Conflict {
        first: String,
        second: String,
        destination: String,
        port: String,
    },
    #[error("the policy has {0} entries; the kernel map holds {VERDICTS_CAPACITY}")]
    TooBig(usize),
    #[error("rule {rule:?}: a tunnel rule needs `gateway = \"ip:port\"`")]
    NoGateway { rule: String },
    #[error("rule {rule:?}: only tunnel rules name a gateway")]
    GatewayWithoutTunnel { rule: String },
    #[error("{what} {name:?}: {value:?} is not an address with a port (ip:port)")]
    SocketAddress {
        what: &'static str,
        name: String,
        value: String,
    },
    #[error("{what} {name:?}: {value:?} is not a SPIFFE id ({reason})")]
    Identity {
        what: &'static str,
        name: String,
        value: String,
        reason: String,
    },
    #[error("service name {0:?} is used twice")]
    DuplicateService(String),
    #[error("service {0:?} lists no ports")]
    ServiceWithoutPorts(String),
    #[error("services {first:?} and {second:?} both answer on {destination} port {port}")]
    ServiceConflict {
        first: String,
        second: String,
        destination: String,
        port: u16,
    },
    #[error("access rule {rule:?} names service {service:?}, which the policy does not define")]
    UnknownService { rule: String, service: String },
    #[error("access rule {rule:?}: {value:?} is not a SHA-256 (64 hex digits)")]
    BadHash { rule: String, value: String },
    #[error("{0}")]
    Language(String),
    #[error("the policy protects {0} ports; the kernel map holds {PROTECTED_PORTS_CAPACITY}")]
    TooManyProtectedPorts(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Tunnel,
}

impl Action {
    fn kernel(self) -> VerdictAction {
        match self {
            Action::Allow => VerdictAction::Allow,
            Action::Deny => VerdictAction::Deny,
            Action::Audit => VerdictAction::Audit,
            Action::Tunnel => VerdictAction::Tunnel,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: u64,
    default: Action,
    #[serde(default)]
    record_allows: bool,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleFile>,
    #[serde(default, rename = "service")]
    services: Vec<ServiceFile>,
    #[serde(default)]
    access: Vec<AccessFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    id: String,
    action: Action,
    destinations: Vec<String>,
    #[serde(default)]
    ports: Vec<u16>,
    gateway: Option<String>,
    gateway_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    name: String,
    #[serde(default)]
    destinations: Vec<String>,
    ports: Vec<u16>,
    target: Option<String>,
    #[serde(default)]
    class: ServiceClass,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessFile {
    id: String,
    service: String,
    action: AccessAction,
    #[serde(default)]
    orgs: Vec<String>,
    #[serde(default)]
    devices: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    exes: Vec<String>,
    #[serde(default)]
    exe_sha256: Vec<String>,
}

/// Where a `tunnel` rule carries its connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRoute {
    /// The gateway agent's QUIC endpoint.
    pub gateway: SocketAddr,
    /// The identity the gateway must present; `None`: any device of the
    /// trust domain.
    pub gateway_id: Option<SpiffeId>,
}

/// A policy ready for the kernel and the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub settings: GuardSettings,
    /// Rule ids by index (the index the kernel reports): the `[[rule]]`s,
    /// then one `protect:<service>` per protected service.
    pub rule_ids: Vec<String>,
    /// `(prefix length, key, verdict)` for the verdict map.
    pub entries: Vec<(u32, VerdictKey, Verdict)>,
    /// Tunnel rules' gateways, by rule index.
    pub tunnel_routes: BTreeMap<u32, TunnelRoute>,
    /// What this host serves as a gateway.
    pub gateway: GatewayPolicy,
    /// `(port, rule index)` for the kernel's protected-port map.
    pub protected_ports: Vec<(u16, u32)>,
    /// Chains of caller-dependent verdicts, by index (policy language).
    pub chains: Vec<GuardChain>,
    /// uid → user-group bits.
    pub uid_bits: BTreeMap<u32, u64>,
    /// Executable inode → binary-group bits.
    pub binary_inodes: BTreeMap<InodeKey, u64>,
}

impl CompiledPolicy {
    /// No policy yet: the guard lets everything pass and records nothing
    /// (a default action of 0), until a policy arrives.
    pub fn pass_through() -> Self {
        Self {
            settings: GuardSettings::default(),
            rule_ids: Vec::new(),
            entries: Vec::new(),
            tunnel_routes: BTreeMap::new(),
            gateway: GatewayPolicy::default(),
            protected_ports: Vec::new(),
            chains: Vec::new(),
            uid_bits: BTreeMap::new(),
            binary_inodes: BTreeMap::new(),
        }
    }

    pub fn version(&self) -> u64 {
        self.settings.policy_version
    }

    /// The id of the rule the kernel reported (`""` for the default).
    pub fn rule_id(&self, index: u32) -> &str {
        self.rule_ids
            .get(index as usize)
            .map(String::as_str)
            .unwrap_or("")
    }

    /// The verdict the kernel gives a connection to `destination`, found
    /// the way the kernel finds it: the longest prefix among rules for the
    /// exact port, else among rules for every port, else the default.
    pub fn verdict_for(&self, destination: SocketAddr) -> Verdict {
        let (prefix_bits, key) = key_of(IpNet::from(destination.ip()), 0);
        let covers = |prefix: u32, rule: &VerdictKey| {
            rule.family == key.family
                && prefix <= prefix_bits
                && leading_bits_equal(&rule.addr, &key.addr, prefix - VERDICT_KEY_ADDR_OFFSET_BITS)
        };
        let best = |port: u16| {
            self.entries
                .iter()
                .filter(|(prefix, rule, _)| rule.port == port && covers(*prefix, rule))
                .max_by_key(|(prefix, _, _)| *prefix)
                .map(|(_, _, verdict)| *verdict)
        };
        best(destination.port().to_be())
            .or_else(|| best(0))
            .unwrap_or(Verdict {
                action: self.settings.default_action,
                rule: agent_common::DEFAULT_RULE,
            })
    }
}

fn leading_bits_equal(a: &[u8; 16], b: &[u8; 16], bits: u32) -> bool {
    let whole = (bits / 8) as usize;
    let rest = bits % 8;
    a[..whole] == b[..whole]
        && (rest == 0 || {
            let mask = 0xffu8 << (8 - rest);
            a[whole] & mask == b[whole] & mask
        })
}

/// Parses and compiles a policy file's text.
pub fn compile(text: &str) -> Result<CompiledPolicy, PolicyError> {
    let file: PolicyFile = toml::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?;
    let mut claimed: BTreeMap<(u32, VerdictKey), String> = BTreeMap::new();
    let mut entries = Vec::new();
    let mut rule_ids: Vec<String> = Vec::new();
    let mut tunnel_routes = BTreeMap::new();
    for (index, rule) in file.rules.iter().enumerate() {
        if rule.id.is_empty() {
            return Err(PolicyError::EmptyId);
        }
        if rule_ids.contains(&rule.id) {
            return Err(PolicyError::DuplicateId(rule.id.clone()));
        }
        rule_ids.push(rule.id.clone());
        match (rule.action, &rule.gateway) {
            (Action::Tunnel, None) => {
                return Err(PolicyError::NoGateway {
                    rule: rule.id.clone(),
                })
            }
            (Action::Tunnel, Some(gateway)) => {
                let gateway = socket_address("rule", &rule.id, gateway)?;
                let gateway_id = rule
                    .gateway_id
                    .as_deref()
                    .map(|id| spiffe_id("rule", &rule.id, id))
                    .transpose()?;
                tunnel_routes.insert(
                    index as u32,
                    TunnelRoute {
                        gateway,
                        gateway_id,
                    },
                );
            }
            (_, Some(_)) => {
                return Err(PolicyError::GatewayWithoutTunnel {
                    rule: rule.id.clone(),
                })
            }
            (_, None) if rule.gateway_id.is_some() => {
                return Err(PolicyError::GatewayWithoutTunnel {
                    rule: rule.id.clone(),
                })
            }
            (_, None) => {}
        }
        if rule.destinations.is_empty() {
            return Err(PolicyError::NoDestination {
                rule: rule.id.clone(),
            });
        }
        if rule.ports.contains(&0) {
            return Err(PolicyError::PortZero {
                rule: rule.id.clone(),
            });
        }
        let ports: Vec<u16> = if rule.ports.is_empty() {
            vec![0]
        } else {
            rule.ports.clone()
        };
        for destination in &rule.destinations {
            let net = parse_destination(&rule.id, destination)?;
            for &port in &ports {
                let (prefix, key) = key_of(net, port);
                if let Some(first) = claimed.insert((prefix, key), rule.id.clone()) {
                    return Err(PolicyError::Conflict {
                        first,
                        second: rule.id.clone(),
                        destination: net.to_string(),
                        port: if port == 0 {
                            "any".to_owned()
                        } else {
                            port.to_string()
                        },
                    });
                }
                entries.push((
                    prefix,
                    key,
                    Verdict {
                        action: rule.action.kernel() as u32,
                        rule: index as u32,
                    },
                ));
            }
        }
    }
    if entries.len() > VERDICTS_CAPACITY as usize {
        return Err(PolicyError::TooBig(entries.len()));
    }
    let gateway = compile_gateway(&file, &rule_ids)?;
    let mut protected_ports = BTreeMap::new();
    for service in gateway.services() {
        if service.class != ServiceClass::Protected {
            continue;
        }
        let index = rule_ids.len() as u32;
        rule_ids.push(format!("protect:{}", service.name));
        for &port in &service.ports {
            protected_ports.entry(port).or_insert(index);
        }
    }
    if protected_ports.len() > PROTECTED_PORTS_CAPACITY as usize {
        return Err(PolicyError::TooManyProtectedPorts(protected_ports.len()));
    }
    Ok(CompiledPolicy {
        settings: GuardSettings {
            default_action: file.default.kernel() as u32,
            record_allows: u32::from(file.record_allows),
            policy_version: file.version,
            ..GuardSettings::default()
        },
        rule_ids,
        entries,
        tunnel_routes,
        gateway,
        protected_ports: protected_ports.into_iter().collect(),
        chains: Vec::new(),
        uid_bits: BTreeMap::new(),
        binary_inodes: BTreeMap::new(),
    })
}

/// Compiles a guard policy file: the policy language (YAML, a baseline;
/// docs/policy.md) or this module's TOML, for the device `device` (its
/// SPIFFE id; device conditions are decided here).
pub fn compile_file(text: &str, device: &str) -> Result<CompiledPolicy, PolicyError> {
    let is_language = text
        .lines()
        .any(|line| line.trim_start().starts_with("kind:"));
    if !is_language {
        return compile(text);
    }
    let set = policy::load(text, None).map_err(|e| PolicyError::Language(e.to_string()))?;
    // A local file has no serial: its version names its content.
    let digest = sha2::Sha256::digest(text.as_bytes());
    let mut version = [0u8; 8];
    version[2..].copy_from_slice(&digest[..6]);
    from_policy(&set, device, u64::from_be_bytes(version))
}

/// The kernel tables of a linked policy for `device`, as the guard loads
/// them; `version` is reported with every decision.
pub fn from_policy(
    set: &policy::PolicySet,
    device: &str,
    version: u64,
) -> Result<CompiledPolicy, PolicyError> {
    use policy::compile::{EntryTarget, KernelAction};
    let users = crate::users::UserNames::from_file("/etc/passwd");
    let uid_of = |name: &str| users.uid(name);
    let tables = set
        .compile(&policy::compile::Target {
            device,
            uid_of: &uid_of,
        })
        .map_err(|e| PolicyError::Language(e.to_string()))?;
    let kernel = |action: KernelAction| match action {
        KernelAction::Allow => VerdictAction::Allow,
        KernelAction::Deny => VerdictAction::Deny,
        KernelAction::Audit => VerdictAction::Audit,
        KernelAction::Tunnel => VerdictAction::Tunnel,
    } as u32;
    let rule_action = |action: policy::Action| match action {
        policy::Action::Allow => VerdictAction::Allow,
        policy::Action::Deny => VerdictAction::Deny,
        policy::Action::Tunnel => VerdictAction::Tunnel,
    } as u32;
    if tables.entries.len() > VERDICTS_CAPACITY as usize {
        return Err(PolicyError::TooBig(tables.entries.len()));
    }
    if tables.chains.len() > GUARD_CHAINS_CAPACITY as usize {
        return Err(PolicyError::Language(format!(
            "{} condition chains; the kernel holds {GUARD_CHAINS_CAPACITY}",
            tables.chains.len()
        )));
    }
    let entries = tables
        .entries
        .iter()
        .map(|e| {
            let (prefix, key) = key_of(e.net, e.port);
            let verdict = match e.target {
                EntryTarget::Verdict(v) => Verdict {
                    action: kernel(v.action),
                    rule: v.rule,
                },
                EntryTarget::Chain(index) => Verdict {
                    action: VerdictAction::Chain as u32,
                    rule: index,
                },
            };
            (prefix, key, verdict)
        })
        .collect();
    let chains = tables
        .chains
        .iter()
        .map(|chain| {
            let mut out = GuardChain {
                len: chain.candidates.len() as u32,
                ..GuardChain::default()
            };
            for (slot, c) in out.candidates.iter_mut().zip(&chain.candidates) {
                *slot = GuardCandidate {
                    users: c.users,
                    binaries: c.binaries,
                    except_users: c.except_users,
                    except_binaries: c.except_binaries,
                    action: rule_action(c.action),
                    flags: if c.dry_run { CANDIDATE_DRY_RUN } else { 0 },
                    rule: c.rule,
                    _reserved: 0,
                };
            }
            out
        })
        .collect();
    let mut binary_inodes: BTreeMap<InodeKey, u64> = BTreeMap::new();
    for group in &tables.binary_bits {
        for member in &group.members {
            // Paths are matched by the file they name now (symlinks
            // followed); a member by hash alone is checked where the hash
            // is known (the gateway), not in the kernel.
            let Some(path) = &member.path else { continue };
            let Some(key) = inode_of(std::path::Path::new(path)) else {
                continue;
            };
            if let Some(hash) = &member.sha256 {
                let matches = crate::exe_hash::sha256_file(std::path::Path::new(path))
                    .is_ok_and(|h| h.eq_ignore_ascii_case(hash));
                if !matches {
                    continue;
                }
            }
            *binary_inodes.entry(key).or_default() |= 1u64 << group.bit;
        }
    }
    let mut rule_ids = tables.rule_ids.clone();
    let mut protected_ports = Vec::new();
    let mut protect_index: BTreeMap<&str, u32> = BTreeMap::new();
    for (port, service) in &tables.protected_ports {
        let index = *protect_index.entry(service.as_str()).or_insert_with(|| {
            rule_ids.push(format!("protect:{service}"));
            (rule_ids.len() - 1) as u32
        });
        protected_ports.push((*port, index));
    }
    let mut tunnel_routes = BTreeMap::new();
    for (index, rule) in set.rules.iter().enumerate() {
        if rule.action != policy::Action::Tunnel {
            continue;
        }
        let gateway = rule
            .destinations
            .iter()
            .filter_map(|d| d.service.as_ref())
            .filter_map(|s| set.services.get(s))
            .find_map(|s| s.gateway.as_ref());
        if let Some(gateway) = gateway {
            tunnel_routes.insert(
                index as u32,
                TunnelRoute {
                    gateway: gateway.address,
                    gateway_id: SpiffeId::parse(&gateway.id).ok(),
                },
            );
        }
    }
    Ok(CompiledPolicy {
        settings: GuardSettings {
            default_action: kernel(tables.default.action),
            record_allows: u32::from(tables.record_allows),
            policy_version: version,
            ..GuardSettings::default()
        },
        rule_ids,
        entries,
        tunnel_routes,
        gateway: GatewayPolicy::from_language(std::sync::Arc::new(set.clone()), device, version),
        protected_ports,
        chains,
        uid_bits: tables.uid_bits.clone(),
        binary_inodes,
    })
}

/// The kernel's identity of the file `path` names (symlinks followed):
/// its device as the kernel encodes it (`major << 20 | minor`) and inode.
pub fn inode_of(path: &std::path::Path) -> Option<InodeKey> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev) as u64, libc::minor(dev) as u64);
    Some(InodeKey {
        dev: (major << 20) | minor,
        ino: meta.ino(),
    })
}

/// The `[[service]]` and `[[access]]` tables: what this host serves as a
/// gateway.
fn compile_gateway(file: &PolicyFile, rule_ids: &[String]) -> Result<GatewayPolicy, PolicyError> {
    let mut services: Vec<Service> = Vec::new();
    let mut claimed: BTreeMap<(IpNet, u16), String> = BTreeMap::new();
    for service in &file.services {
        if services.iter().any(|s| s.name == service.name) {
            return Err(PolicyError::DuplicateService(service.name.clone()));
        }
        if service.ports.is_empty() {
            return Err(PolicyError::ServiceWithoutPorts(service.name.clone()));
        }
        if service.ports.contains(&0) {
            return Err(PolicyError::PortZero {
                rule: service.name.clone(),
            });
        }
        let destinations = service
            .destinations
            .iter()
            .map(|d| parse_destination(&service.name, d))
            .collect::<Result<Vec<_>, _>>()?;
        let any: [IpNet; 2] = [
            "0.0.0.0/0".parse().expect("literal prefix"),
            "::/0".parse().expect("literal prefix"),
        ];
        let claims = if destinations.is_empty() {
            &any[..]
        } else {
            &destinations[..]
        };
        for net in claims {
            for &port in &service.ports {
                if let Some(first) = claimed.insert((*net, port), service.name.clone()) {
                    return Err(PolicyError::ServiceConflict {
                        first,
                        second: service.name.clone(),
                        destination: net.to_string(),
                        port,
                    });
                }
            }
        }
        let target = service
            .target
            .as_deref()
            .map(|t| socket_address("service", &service.name, t))
            .transpose()?;
        services.push(Service {
            name: service.name.clone(),
            destinations,
            ports: service.ports.iter().copied().collect::<BTreeSet<_>>(),
            target,
            class: service.class,
        });
    }
    let mut access = Vec::new();
    let mut ids: BTreeSet<&str> = rule_ids.iter().map(String::as_str).collect();
    for rule in &file.access {
        if rule.id.is_empty() {
            return Err(PolicyError::EmptyId);
        }
        if !ids.insert(&rule.id) {
            return Err(PolicyError::DuplicateId(rule.id.clone()));
        }
        if !services.iter().any(|s| s.name == rule.service) {
            return Err(PolicyError::UnknownService {
                rule: rule.id.clone(),
                service: rule.service.clone(),
            });
        }
        let devices = rule
            .devices
            .iter()
            .map(|d| spiffe_id("access rule", &rule.id, d))
            .collect::<Result<Vec<_>, _>>()?;
        for hash in &rule.exe_sha256 {
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(PolicyError::BadHash {
                    rule: rule.id.clone(),
                    value: hash.clone(),
                });
            }
        }
        access.push(AccessRule {
            id: rule.id.clone(),
            service: rule.service.clone(),
            action: rule.action,
            orgs: rule.orgs.clone(),
            devices,
            users: rule.users.clone(),
            exes: rule.exes.clone(),
            exe_sha256: rule
                .exe_sha256
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        });
    }
    Ok(GatewayPolicy::new(file.version, services, access))
}

fn socket_address(what: &'static str, name: &str, value: &str) -> Result<SocketAddr, PolicyError> {
    value.parse().map_err(|_| PolicyError::SocketAddress {
        what,
        name: name.to_owned(),
        value: value.to_owned(),
    })
}

fn spiffe_id(what: &'static str, name: &str, value: &str) -> Result<SpiffeId, PolicyError> {
    SpiffeId::parse(value).map_err(|e| PolicyError::Identity {
        what,
        name: name.to_owned(),
        value: value.to_owned(),
        reason: e.to_string(),
    })
}

fn parse_destination(rule: &str, value: &str) -> Result<IpNet, PolicyError> {
    let net = match value.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match value.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(e) => {
                return Err(PolicyError::Destination {
                    rule: rule.to_owned(),
                    value: value.to_owned(),
                    reason: e.to_string(),
                })
            }
        },
    };
    if net.trunc() != net {
        return Err(PolicyError::HostBits {
            rule: rule.to_owned(),
            value: value.to_owned(),
            suggestion: net.trunc().to_string(),
        });
    }
    Ok(net)
}

/// The verdict-map key of `net` on `port` (0: every port), as the kernel
/// builds it: port in network order, family, address bytes.
fn key_of(net: IpNet, port: u16) -> (u32, VerdictKey) {
    let mut addr = [0u8; 16];
    let family = match net.addr() {
        IpAddr::V4(ip) => {
            addr[..4].copy_from_slice(&ip.octets());
            2
        }
        IpAddr::V6(ip) => {
            addr.copy_from_slice(&ip.octets());
            10
        }
    };
    (
        VERDICT_KEY_ADDR_OFFSET_BITS + u32::from(net.prefix_len()),
        VerdictKey {
            port: port.to_be(),
            family,
            addr,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        version = 7
        default = "allow"
        record_allows = true

        [[rule]]
        id = "no-metadata"
        action = "deny"
        destinations = ["169.254.169.254", "fd00:ec2::254/128"]

        [[rule]]
        id = "lab-web-dry-run"
        action = "audit"
        destinations = ["10.20.0.0/16"]
        ports = [80, 443]
    "#;

    #[test]
    fn compiles_rules_into_map_entries() {
        let policy = compile(POLICY).unwrap();
        assert_eq!(policy.version(), 7);
        assert_eq!(policy.settings.default_action, VerdictAction::Allow as u32);
        assert_eq!(policy.settings.record_allows, 1);
        assert_eq!(policy.rule_ids, ["no-metadata", "lab-web-dry-run"]);
        assert_eq!(policy.entries.len(), 2 + 2);
        let (prefix, key, verdict) = policy.entries[0];
        assert_eq!(prefix, 32 + 32);
        assert_eq!((key.port, key.family), (0, 2));
        assert_eq!(&key.addr[..4], &[169, 254, 169, 254]);
        assert_eq!(
            verdict,
            Verdict {
                action: VerdictAction::Deny as u32,
                rule: 0
            }
        );
        let (prefix, key, _) = policy.entries[1];
        assert_eq!((prefix, key.family), (32 + 128, 10));
        let (prefix, key, verdict) = policy.entries[2];
        assert_eq!(prefix, 32 + 16);
        assert_eq!(
            key.port,
            80u16.to_be(),
            "ports in network order, as the kernel has them"
        );
        assert_eq!(verdict.rule, 1);
        assert_eq!(policy.rule_id(1), "lab-web-dry-run");
        assert_eq!(policy.rule_id(agent_common::DEFAULT_RULE), "");
    }

    #[test]
    fn tunnel_rules_name_their_gateway_and_protected_services_their_ports() {
        let policy = compile(
            r#"
            version = 3
            default = "allow"
            [[rule]]
            id = "via-gw"
            action = "tunnel"
            destinations = ["10.9.0.3"]
            ports = [8080]
            gateway = "10.9.0.3:4433"
            gateway_id = "spiffe://pref.example/org/city/device/gw"
            [[service]]
            name = "web"
            ports = [8080, 8443]
            [[service]]
            name = "open"
            ports = [9000]
            class = "standard"
            "#,
        )
        .unwrap();
        let (_, _, verdict) = policy.entries[0];
        assert_eq!(verdict.action, VerdictAction::Tunnel as u32);
        let route = &policy.tunnel_routes[&0];
        assert_eq!(route.gateway, "10.9.0.3:4433".parse().unwrap());
        assert_eq!(
            route
                .gateway_id
                .as_ref()
                .map(|id| id.to_string())
                .as_deref(),
            Some("spiffe://pref.example/org/city/device/gw")
        );
        // Only the protected service's ports, under a rule of their own.
        assert_eq!(policy.protected_ports, [(8080, 1), (8443, 1)]);
        assert_eq!(policy.rule_id(1), "protect:web");
    }

    #[test]
    fn user_space_lookup_agrees_with_the_kernels_order() {
        let policy = compile(
            r#"
            version = 1
            default = "audit"
            [[rule]]
            id = "net-any-port"
            action = "deny"
            destinations = ["10.0.0.0/8"]
            [[rule]]
            id = "host-any-port"
            action = "allow"
            destinations = ["10.1.2.3"]
            [[rule]]
            id = "net-port"
            action = "tunnel"
            destinations = ["10.1.0.0/16"]
            ports = [443]
            gateway = "10.1.0.1:4433"
            "#,
        )
        .unwrap();
        let rule_of = |to: &str| {
            let verdict = policy.verdict_for(to.parse().unwrap());
            (
                policy.rule_id(verdict.rule).to_owned(),
                VerdictAction::from_u32(verdict.action).unwrap(),
            )
        };
        // A rule for the exact port beats a longer prefix for every port.
        assert_eq!(
            rule_of("10.1.2.3:443"),
            ("net-port".into(), VerdictAction::Tunnel)
        );
        assert_eq!(
            rule_of("10.1.2.3:80"),
            ("host-any-port".into(), VerdictAction::Allow)
        );
        assert_eq!(
            rule_of("10.1.200.1:80"),
            ("net-any-port".into(), VerdictAction::Deny)
        );
        assert_eq!(
            rule_of("10.200.0.1:443"),
            ("net-any-port".into(), VerdictAction::Deny)
        );
        assert_eq!(rule_of("192.0.2.1:443"), ("".into(), VerdictAction::Audit));
        assert_eq!(rule_of("[::1]:443"), ("".into(), VerdictAction::Audit));
    }

    #[test]
    fn gateway_mistakes_are_named() {
        let err = |text: &str| compile(text).unwrap_err().to_string();
        let head = "version = 1\ndefault = \"allow\"\n";
        assert!(err(&format!(
            "{head}[[rule]]\nid = \"t\"\naction = \"tunnel\"\ndestinations = [\"10.0.0.1\"]"
        ))
        .contains("needs `gateway"));
        assert!(err(&format!(
            "{head}[[rule]]\nid = \"d\"\naction = \"deny\"\ndestinations = [\"10.0.0.1\"]\ngateway = \"10.0.0.1:1\""
        ))
        .contains("only tunnel rules"));
        assert!(err(&format!(
            "{head}[[rule]]\nid = \"t\"\naction = \"tunnel\"\ndestinations = [\"10.0.0.1\"]\ngateway = \"10.0.0.1\""
        ))
        .contains("ip:port"));
        assert!(err(&format!(
            "{head}[[service]]\nname = \"a\"\nports = [80]\n[[access]]\nid = \"x\"\nservice = \"b\"\naction = \"allow\""
        ))
        .contains("service \"b\""));
        assert!(err(&format!(
            "{head}[[service]]\nname = \"a\"\nports = [80]\n[[service]]\nname = \"b\"\nports = [80]"
        ))
        .contains("both answer on"));
        assert!(err(&format!(
            "{head}[[service]]\nname = \"a\"\nports = [80]\n[[access]]\nid = \"x\"\nservice = \"a\"\naction = \"allow\"\ndevices = [\"pc1\"]"
        ))
        .contains("not a SPIFFE id"));
        assert!(err(&format!(
            "{head}[[service]]\nname = \"a\"\nports = [80]\n[[access]]\nid = \"x\"\nservice = \"a\"\naction = \"allow\"\nexe_sha256 = [\"abc\"]"
        ))
        .contains("SHA-256"));
    }

    #[test]
    fn mistakes_are_named() {
        let err = |text: &str| compile(text).unwrap_err().to_string();
        let rule = |body: &str| format!("version = 1\ndefault = \"allow\"\n[[rule]]\n{body}");
        assert!(err("version = 1\ndefault = \"maybe\"").contains("maybe"));
        assert!(err("version = 1\ndefault = \"allow\"\ncolour = 1").contains("colour"));
        assert!(err(&rule(
            "id = \"a\"\naction = \"deny\"\ndestinations = [\"10.0.0.1/8\"]"
        ))
        .contains("write 10.0.0.0/8"));
        assert!(err(&rule(
            "id = \"a\"\naction = \"deny\"\ndestinations = [\"example.org\"]"
        ))
        .contains("example.org"));
        assert!(
            err(&rule("id = \"a\"\naction = \"deny\"\ndestinations = []"))
                .contains("no destinations")
        );
        assert!(err(&rule(
            "id = \"a\"\naction = \"deny\"\ndestinations = [\"10.0.0.1\"]\nports = [0]"
        ))
        .contains("port 0"));
        let twice = "version = 1\ndefault = \"allow\"\n\
            [[rule]]\nid = \"a\"\naction = \"deny\"\ndestinations = [\"10.0.0.0/8\"]\nports = [22]\n\
            [[rule]]\nid = \"b\"\naction = \"allow\"\ndestinations = [\"10.0.0.0/8\"]\nports = [22, 80]\n";
        assert_eq!(
            compile(twice).unwrap_err(),
            PolicyError::Conflict {
                first: "a".into(),
                second: "b".into(),
                destination: "10.0.0.0/8".into(),
                port: "22".into()
            }
        );
        let dup = "version = 1\ndefault = \"allow\"\n\
            [[rule]]\nid = \"a\"\naction = \"deny\"\ndestinations = [\"10.0.0.1\"]\n\
            [[rule]]\nid = \"a\"\naction = \"deny\"\ndestinations = [\"10.0.0.2\"]\n";
        assert_eq!(
            compile(dup).unwrap_err(),
            PolicyError::DuplicateId("a".into())
        );
    }
}
