//! Compilation of a linked policy into the tables one agent loads: the
//! kernel's verdict map (longest-prefix match on destination, port-specific
//! entries before every-port ones), condition chains for destinations whose
//! verdict depends on the caller's user or binary, the group bits those
//! chains test, and the ports this host protects as a gateway.
//!
//! The tables are built per device: conditions on the device are decided
//! here, once. Destinations are cut into cells — the longest policy prefix
//! containing an address, and whether the port is one some rule names — so
//! every flow in a cell meets the same rules; a cell's entry holds its
//! verdict, or a chain of candidates when users or binaries decide.
//! [`AgentTables::lookup`] is the kernel's lookup written in Rust; the
//! property tests hold it to [`PolicySet::evaluate`].
//!
//! The output is deterministic: the same policy and device give the same
//! tables whatever the order of the text.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
};

use ipnet::IpNet;

use crate::{
    eval::{Decision, DEFAULT_RULE},
    model::*,
    set::{DestinationPair, LinkedRule, PolicySet},
};

/// The rule index the kernel reports for the default verdict.
pub const DEFAULT_RULE_INDEX: u32 = u32::MAX;
/// User and binary groups a kernel chain can test (bits of a `u64`).
pub const MAX_CONDITION_GROUPS: usize = 64;
/// Candidates in one chain: the kernel walks at most this many.
pub const MAX_CHAIN_LENGTH: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("the policy's rules use {count} {kind} groups in conditions; the kernel tests at most {MAX_CONDITION_GROUPS}")]
    TooManyGroups { kind: &'static str, count: usize },
    #[error("{count} rules with user or binary conditions meet at {destination}; the kernel walks at most {MAX_CHAIN_LENGTH} (rules: {rules})")]
    ChainTooLong {
        destination: String,
        count: usize,
        rules: String,
    },
}

/// What the kernel does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelAction {
    Allow,
    Deny,
    /// Passes, recorded as a would-be denial (a dry-run rule).
    Audit,
    Tunnel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct KernelVerdict {
    pub action: KernelAction,
    /// Index into [`AgentTables::rule_ids`]; [`DEFAULT_RULE_INDEX`] for the
    /// default.
    pub rule: u32,
}

/// One candidate of a chain: it matches when the caller is in one of
/// `users` (0: no condition) and one of `binaries`, and in none of the
/// `except_*` groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Candidate {
    pub users: u64,
    pub binaries: u64,
    pub except_users: u64,
    pub except_binaries: u64,
    pub action: Action,
    pub dry_run: bool,
    pub rule: u32,
}

impl Candidate {
    pub fn matches(&self, user_bits: u64, binary_bits: u64) -> bool {
        (self.users == 0 || self.users & user_bits != 0)
            && (self.binaries == 0 || self.binaries & binary_bits != 0)
            && self.except_users & user_bits == 0
            && self.except_binaries & binary_bits == 0
    }
}

/// Candidates in precedence order; the first enforced match decides, the
/// first match of any mode is what dry-run rules would decide.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Chain {
    pub candidates: Vec<Candidate>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum EntryTarget {
    Verdict(KernelVerdict),
    /// Index into [`AgentTables::chains`].
    Chain(u32),
}

/// One verdict-map entry: `net` on `port` (0: every port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct KernelEntry {
    pub port: u16,
    pub net: IpNet,
    pub target: EntryTarget,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BinaryBit {
    pub bit: u8,
    pub group: String,
    pub members: Vec<BinaryMatch>,
}

/// Everything an agent loads for one policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AgentTables {
    /// Rule ids by index, as the kernel reports them.
    pub rule_ids: Vec<String>,
    /// The outbound default.
    pub default: KernelVerdict,
    pub record_allows: bool,
    /// Sorted by (port, prefix).
    pub entries: Vec<KernelEntry>,
    pub chains: Vec<Chain>,
    /// uid → bits of the user groups it belongs to.
    pub uid_bits: BTreeMap<u32, u64>,
    /// User group names by bit.
    pub user_groups: Vec<String>,
    pub binary_bits: Vec<BinaryBit>,
    /// Ports of the protected services this device is the gateway of, with
    /// the service's name.
    pub protected_ports: BTreeMap<u16, String>,
}

/// The device the tables are for, and how its host names users.
pub struct Target<'a> {
    pub device: &'a str,
    /// The uid of a user name on this host (`None`: no such user here).
    pub uid_of: &'a dyn Fn(&str) -> Option<u32>,
}

/// A cell: flows to addresses whose longest policy prefix is `net`, on
/// `port` (0: a port no rule names).
type Cell = (u16, IpNet);

impl PolicySet {
    /// The tables for `target`'s agent.
    pub fn compile(&self, target: &Target<'_>) -> Result<AgentTables, CompileError> {
        let device_flow = crate::eval::Flow {
            direction: Direction::Outbound,
            device: target.device,
            user: "",
            exe: "",
            exe_sha256: "",
            destination: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let in_device_group = |groups: &[usize]| {
            groups.iter().any(|&g| match &self.groups[g].group {
                Group::Devices(patterns) => patterns.iter().any(|p| p.matches(device_flow.device)),
                _ => false,
            })
        };
        let rule_ids: Vec<String> = self.rules.iter().map(|r| r.id.clone()).collect();
        // The rules that can apply to this device.
        let rules: Vec<(u32, &LinkedRule)> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.devices.is_empty() || in_device_group(&r.devices))
            .filter(|(_, r)| !in_device_group(&r.except_devices))
            .map(|(i, r)| (i as u32, r))
            .collect();
        let user_groups = condition_groups(
            rules
                .iter()
                .flat_map(|(_, r)| r.users.iter().chain(&r.except_users)),
        );
        let binary_groups = condition_groups(
            rules
                .iter()
                .flat_map(|(_, r)| r.binaries.iter().chain(&r.except_binaries)),
        );
        for (kind, groups) in [("user", &user_groups), ("binary", &binary_groups)] {
            if groups.len() > MAX_CONDITION_GROUPS {
                return Err(CompileError::TooManyGroups {
                    kind,
                    count: groups.len(),
                });
            }
        }
        let mask = |groups: &[usize], bits: &BTreeMap<usize, u8>| {
            groups.iter().fold(0u64, |m, g| m | 1u64 << bits[g])
        };

        // Cells: every prefix the rules name, for the ports they name.
        let mut by_net: HashMap<IpNet, Vec<(usize, bool)>> = HashMap::new();
        for (slot, (_, rule)) in rules.iter().enumerate() {
            for pair in &rule.destinations {
                by_net.entry(pair.net).or_default().push((slot, false));
            }
            for pair in &rule.except_destinations {
                by_net.entry(pair.net).or_default().push((slot, true));
            }
        }
        let mut nets: Vec<IpNet> = by_net.keys().copied().collect();
        nets.sort();
        let mut chains: BTreeMap<Chain, u32> = BTreeMap::new();
        let mut entries = Vec::new();
        let default = KernelVerdict {
            action: kernel_action(self.defaults.outbound),
            rule: DEFAULT_RULE_INDEX,
        };
        for &net in &nets {
            // The pairs covering this prefix: those on it or on a shorter
            // prefix containing it.
            let mut covering: Vec<(usize, bool, &DestinationPair)> = Vec::new();
            for len in 0..=net.prefix_len() {
                let Ok(ancestor) = IpNet::new(net.addr(), len).map(|n| n.trunc()) else {
                    continue;
                };
                let Some(slots) = by_net.get(&ancestor) else {
                    continue;
                };
                let mut seen = BTreeSet::new();
                for &(slot, except) in slots {
                    if !seen.insert((slot, except)) {
                        continue;
                    }
                    let rule = rules[slot].1;
                    let pairs = if except {
                        &rule.except_destinations
                    } else {
                        &rule.destinations
                    };
                    for pair in pairs.iter().filter(|p| p.net == ancestor) {
                        covering.push((slot, except, pair));
                    }
                }
            }
            let mut ports: BTreeSet<u16> = BTreeSet::new();
            let mut any_port = false;
            for (_, _, pair) in &covering {
                match &pair.ports {
                    Some(p) => ports.extend(p),
                    None => any_port = true,
                }
            }
            let cells = any_port
                .then_some(0u16)
                .into_iter()
                .chain(ports.iter().copied());
            for port in cells {
                let cell: Cell = (port, net);
                let covers = |pair: &DestinationPair| match port {
                    0 => pair.ports.is_none(),
                    p => pair.covers_port(p),
                };
                let excepted: BTreeSet<usize> = covering
                    .iter()
                    .filter(|(_, except, pair)| *except && covers(pair))
                    .map(|(slot, _, _)| *slot)
                    .collect();
                let mut specificity: BTreeMap<usize, (bool, u8)> = BTreeMap::new();
                for (slot, except, pair) in &covering {
                    if *except || excepted.contains(slot) || !covers(pair) {
                        continue;
                    }
                    let s = (pair.ports.is_some(), pair.net.prefix_len());
                    let best = specificity.entry(*slot).or_insert(s);
                    *best = (*best).max(s);
                }
                let mut candidates: Vec<(usize, (bool, u8))> = specificity.into_iter().collect();
                candidates.sort_by(|(a, sa), (b, sb)| {
                    let (ra, rb) = (rules[*a].1, rules[*b].1);
                    rb.action
                        .cmp(&ra.action)
                        .then(sb.cmp(sa))
                        .then(ra.layer.cmp(&rb.layer))
                        .then(ra.id.cmp(&rb.id))
                });
                let mut chain = Vec::new();
                let mut conditional = false;
                for (slot, _) in candidates {
                    let (index, rule) = rules[slot];
                    let candidate = Candidate {
                        users: mask(&rule.users, &user_groups),
                        binaries: mask(&rule.binaries, &binary_groups),
                        except_users: mask(&rule.except_users, &user_groups),
                        except_binaries: mask(&rule.except_binaries, &binary_groups),
                        action: rule.action,
                        dry_run: rule.mode == Mode::DryRun,
                        rule: index,
                    };
                    let unconditional = candidate.users == 0
                        && candidate.binaries == 0
                        && candidate.except_users == 0
                        && candidate.except_binaries == 0;
                    conditional |= !unconditional;
                    chain.push(candidate);
                    if unconditional && !candidate.dry_run {
                        break;
                    }
                }
                let target = if conditional {
                    if chain.len() > MAX_CHAIN_LENGTH {
                        return Err(CompileError::ChainTooLong {
                            destination: describe_cell(cell),
                            count: chain.len(),
                            rules: chain
                                .iter()
                                .map(|c| rule_ids[c.rule as usize].as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                        });
                    }
                    let chain = Chain { candidates: chain };
                    let next = chains.len() as u32;
                    EntryTarget::Chain(*chains.entry(chain).or_insert(next))
                } else {
                    EntryTarget::Verdict(run_chain(&chain, default, 0, 0))
                };
                entries.push(KernelEntry { port, net, target });
            }
        }
        entries.sort();
        // Chains numbered in the order of their first use by a sorted
        // entry: independent of hash and text order.
        let mut renumber: BTreeMap<u32, u32> = BTreeMap::new();
        for entry in &entries {
            if let EntryTarget::Chain(old) = entry.target {
                let next = renumber.len() as u32;
                renumber.entry(old).or_insert(next);
            }
        }
        for entry in &mut entries {
            if let EntryTarget::Chain(old) = &mut entry.target {
                *old = renumber[old];
            }
        }
        let mut ordered: Vec<(u32, Chain)> = chains
            .into_iter()
            .filter_map(|(chain, old)| renumber.get(&old).map(|new| (*new, chain)))
            .collect();
        ordered.sort();
        let chains: Vec<Chain> = ordered.into_iter().map(|(_, c)| c).collect();

        let mut uid_bits: BTreeMap<u32, u64> = BTreeMap::new();
        for (&group, &bit) in &user_groups {
            if let Group::Users(users) = &self.groups[group].group {
                for user in users {
                    if let Some(uid) = (target.uid_of)(user) {
                        *uid_bits.entry(uid).or_default() |= 1u64 << bit;
                    }
                }
            }
        }
        let binary_bits = binary_groups
            .iter()
            .map(|(&group, &bit)| BinaryBit {
                bit,
                group: self.groups[group].name.clone(),
                members: match &self.groups[group].group {
                    Group::Binaries(members) => members.clone(),
                    _ => Vec::new(),
                },
            })
            .collect();
        let protected_ports = self
            .services
            .values()
            .filter(|s| s.service.class == ServiceClass::Protected)
            .filter(|s| s.gateway.as_ref().is_some_and(|g| g.id == target.device))
            .flat_map(|s| s.service.ports.iter().map(|p| (*p, s.service.name.clone())))
            .fold(BTreeMap::new(), |mut m, (port, name)| {
                m.entry(port).or_insert(name);
                m
            });
        Ok(AgentTables {
            rule_ids,
            default,
            record_allows: self.defaults.record_allows,
            entries,
            chains,
            uid_bits,
            user_groups: user_groups
                .keys()
                .map(|&g| self.groups[g].name.clone())
                .collect(),
            binary_bits,
            protected_ports,
        })
    }
}

/// Group indexes used in conditions, numbered by name order.
fn condition_groups<'a>(used: impl Iterator<Item = &'a usize>) -> BTreeMap<usize, u8> {
    let set: BTreeSet<usize> = used.copied().collect();
    set.into_iter()
        .enumerate()
        .map(|(bit, group)| (group, bit as u8))
        .collect()
}

fn kernel_action(action: Action) -> KernelAction {
    match action {
        Action::Allow => KernelAction::Allow,
        Action::Tunnel => KernelAction::Tunnel,
        Action::Deny => KernelAction::Deny,
    }
}

/// The kernel's walk of a chain: the first enforced match decides; when it
/// allows but a dry-run rule before it would deny, the connection passes as
/// `Audit`, naming the dry-run rule.
fn run_chain(
    chain: &[Candidate],
    default: KernelVerdict,
    user_bits: u64,
    binary_bits: u64,
) -> KernelVerdict {
    let mut would: Option<&Candidate> = None;
    for candidate in chain {
        if !candidate.matches(user_bits, binary_bits) {
            continue;
        }
        if candidate.dry_run {
            would.get_or_insert(candidate);
            continue;
        }
        let decided = KernelVerdict {
            action: kernel_action(candidate.action),
            rule: candidate.rule,
        };
        let would = would.copied().unwrap_or(*candidate);
        return audited(decided, would.action, would.rule);
    }
    match would {
        Some(w) => audited(default, w.action, w.rule),
        None => default,
    }
}

fn audited(decided: KernelVerdict, would: Action, would_rule: u32) -> KernelVerdict {
    if decided.action == KernelAction::Allow && would == Action::Deny {
        KernelVerdict {
            action: KernelAction::Audit,
            rule: would_rule,
        }
    } else {
        decided
    }
}

fn describe_cell((port, net): Cell) -> String {
    match port {
        0 => format!("{net} (other ports)"),
        p => format!("{net} port {p}"),
    }
}

impl AgentTables {
    /// The user-group bits of `uid`, as the kernel finds them.
    pub fn user_bits(&self, uid: u32) -> u64 {
        self.uid_bits.get(&uid).copied().unwrap_or(0)
    }

    /// The binary-group bits of an executable.
    pub fn binary_bits(&self, exe: &str, sha256: &str) -> u64 {
        self.binary_bits
            .iter()
            .filter(|b| b.members.iter().any(|m| m.matches(exe, sha256)))
            .fold(0, |m, b| m | 1u64 << b.bit)
    }

    /// The kernel's lookup: the longest prefix among entries for the port,
    /// else among entries for every port, else the default; a chain is
    /// walked with the caller's group bits.
    pub fn lookup(
        &self,
        destination: SocketAddr,
        user_bits: u64,
        binary_bits: u64,
    ) -> KernelVerdict {
        let best = |port: u16| {
            self.entries
                .iter()
                .filter(|e| e.port == port && e.net.contains(&destination.ip()))
                .max_by_key(|e| e.net.prefix_len())
        };
        let entry = best(destination.port()).or_else(|| best(0));
        match entry.map(|e| e.target) {
            None => self.default,
            Some(EntryTarget::Verdict(v)) => v,
            Some(EntryTarget::Chain(i)) => run_chain(
                &self.chains[i as usize].candidates,
                self.default,
                user_bits,
                binary_bits,
            ),
        }
    }

    /// The rule id of a kernel rule index.
    pub fn rule_id(&self, index: u32) -> &str {
        self.rule_ids
            .get(index as usize)
            .map_or(DEFAULT_RULE, String::as_str)
    }

    /// What the kernel should do for a decision of [`PolicySet::evaluate`]:
    /// the link the property tests check.
    pub fn expected(&self, decision: &Decision) -> KernelVerdict {
        let index = |id: &str| {
            self.rule_ids
                .iter()
                .position(|r| r == id)
                .map_or(DEFAULT_RULE_INDEX, |i| i as u32)
        };
        match &decision.dry_run {
            Some(d) if decision.verdict == Action::Allow && d.verdict == Action::Deny => {
                KernelVerdict {
                    action: KernelAction::Audit,
                    rule: index(&d.rule),
                }
            }
            _ => KernelVerdict {
                action: kernel_action(decision.verdict),
                rule: index(&decision.rule),
            },
        }
    }
}
