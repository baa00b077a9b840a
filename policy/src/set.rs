//! Layers: the prefecture baseline and one organisation's layer, linked
//! into the policy an agent enforces.
//!
//! All rules of both layers are evaluated together and the strictest
//! matching verdict wins (deny > tunnel > allow), so an organisation can add
//! rules but never loosen one of the baseline's. The defaults apply where no
//! rule matches; an organisation may set a stricter default than the
//! baseline's, never a looser one. Names (groups, services, gateways, rule
//! ids) are shared: an organisation uses the baseline's and may not redefine
//! them.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use crate::{
    diag::{did_you_mean, Diagnostic, Diagnostics, Position},
    model::*,
};

/// A destination a rule covers: addresses on ports (`None`: every port).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DestinationPair {
    pub net: IpNet,
    pub ports: Option<BTreeSet<u16>>,
    /// The service it came from, if any.
    pub service: Option<String>,
}

impl DestinationPair {
    pub fn covers_port(&self, port: u16) -> bool {
        self.ports.as_ref().is_none_or(|p| p.contains(&port))
    }
}

/// A rule with its names resolved: group references are indexes into
/// [`PolicySet::groups`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedRule {
    pub id: String,
    pub layer: LayerKind,
    pub action: Action,
    pub mode: Mode,
    pub devices: Vec<usize>,
    pub users: Vec<usize>,
    pub binaries: Vec<usize>,
    pub except_devices: Vec<usize>,
    pub except_users: Vec<usize>,
    pub except_binaries: Vec<usize>,
    pub destinations: Vec<DestinationPair>,
    pub except_destinations: Vec<DestinationPair>,
    pub position: Position,
}

impl LinkedRule {
    pub fn has_identity_conditions(&self) -> bool {
        !(self.devices.is_empty()
            && self.users.is_empty()
            && self.binaries.is_empty()
            && self.except_devices.is_empty()
            && self.except_users.is_empty()
            && self.except_binaries.is_empty())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedGroup {
    pub name: String,
    pub layer: LayerKind,
    pub group: Group,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedService {
    pub service: Service,
    pub layer: LayerKind,
    pub gateway: Option<Gateway>,
}

/// The defaults in force after layering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveDefaults {
    pub outbound: Action,
    pub inbound: Action,
    pub record_allows: bool,
    pub fail_protected: FailMode,
    pub fail_standard: FailMode,
}

impl EffectiveDefaults {
    pub fn fail_mode(&self, class: ServiceClass) -> FailMode {
        match class {
            ServiceClass::Protected => self.fail_protected,
            ServiceClass::Standard => self.fail_standard,
        }
    }
}

/// The baseline and (optionally) one organisation's layer, linked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySet {
    pub baseline: Policy,
    pub organisation: Option<Policy>,
    pub groups: Vec<LinkedGroup>,
    pub services: BTreeMap<String, LinkedService>,
    pub gateways: BTreeMap<String, Gateway>,
    /// Every rule of both layers, in evaluation order: strictest action
    /// first, then the baseline's before the organisation's, then by id.
    pub rules: Vec<LinkedRule>,
    pub defaults: EffectiveDefaults,
    /// Detection rules switched on and off (the organisation's choices
    /// override the baseline's).
    pub detections_enabled: BTreeSet<String>,
    pub detections_disabled: BTreeSet<String>,
}

impl PolicySet {
    /// Links a baseline alone.
    pub fn baseline(baseline: Policy) -> Result<Self, Diagnostics> {
        Self::link(baseline, None)
    }

    /// Links a baseline and an organisation's layer. Problems of the
    /// organisation's layer are reported at its positions; the baseline
    /// must link on its own.
    pub fn link(baseline: Policy, organisation: Option<Policy>) -> Result<Self, Diagnostics> {
        if baseline.kind != LayerKind::Baseline {
            return Err(Diagnostics(vec![Diagnostic::new(
                Position { line: 1, column: 1 },
                "the first layer must be `kind: baseline`",
            )]));
        }
        if let Some(org) = &organisation {
            if org.kind != LayerKind::Organisation {
                return Err(Diagnostics(vec![Diagnostic::new(
                    Position { line: 1, column: 1 },
                    "the second layer must be `kind: organisation`",
                )]));
            }
        }
        let mut linker = Linker::default();
        linker.layer(&baseline);
        if !linker.diagnostics.is_empty() {
            // An organisation's admins cannot fix the baseline: report only
            // its own problems.
            return Err(linker.finish());
        }
        if let Some(org) = &organisation {
            linker.layer(org);
        }
        let defaults = linker.defaults(&baseline, organisation.as_ref());
        let mut detections_enabled = baseline.detections.enable.clone();
        let mut detections_disabled = baseline.detections.disable.clone();
        if let Some(org) = &organisation {
            for id in &org.detections.enable {
                detections_disabled.remove(id);
                detections_enabled.insert(id.clone());
            }
            for id in &org.detections.disable {
                detections_enabled.remove(id);
                detections_disabled.insert(id.clone());
            }
        }
        if !linker.diagnostics.is_empty() {
            return Err(linker.finish());
        }
        let mut rules = linker.rules;
        rules.sort_by(|a, b| {
            b.action
                .cmp(&a.action)
                .then(a.layer.cmp(&b.layer))
                .then(a.id.cmp(&b.id))
        });
        let set = PolicySet {
            baseline,
            organisation,
            groups: linker.groups,
            services: linker.services,
            gateways: linker.gateways,
            rules,
            defaults,
            detections_enabled,
            detections_disabled,
        };
        let failures = set.check_tests();
        if failures.is_empty() {
            Ok(set)
        } else {
            Err(Diagnostics(failures))
        }
    }

    /// The organisation this set is for (`None`: the baseline alone).
    pub fn org(&self) -> Option<&str> {
        self.organisation.as_ref().and_then(|o| o.org.as_deref())
    }

    pub fn group(&self, name: &str) -> Option<(usize, &LinkedGroup)> {
        self.groups.iter().enumerate().find(|(_, g)| g.name == name)
    }

    pub fn rule(&self, id: &str) -> Option<&LinkedRule> {
        self.rules.iter().find(|r| r.id == id)
    }

    /// Runs the `tests:` of the layers; a failing test is a diagnostic at
    /// its position (in the organisation's layer when there is one, since
    /// that is the document being checked).
    fn check_tests(&self) -> Vec<Diagnostic> {
        let layers = std::iter::once(&self.baseline).chain(self.organisation.as_ref());
        let mut failures = Vec::new();
        let checked = self
            .organisation
            .as_ref()
            .map_or(LayerKind::Baseline, |o| o.kind);
        for layer in layers {
            if layer.kind != checked && layer.kind == LayerKind::Baseline {
                // The baseline's tests were checked when it was pushed; with
                // an organisation layer they could fail only because the
                // organisation tightened something, which is its right.
                continue;
            }
            for test in &layer.tests {
                let flow = crate::eval::Flow {
                    direction: test.flow.direction,
                    device: &test.flow.device,
                    user: &test.flow.user,
                    exe: &test.flow.exe,
                    exe_sha256: &test.flow.sha256,
                    destination: test.flow.destination,
                };
                let decision = self.evaluate(&flow);
                let rule_ok = test.rule.as_deref().is_none_or(|r| r == decision.rule);
                if decision.verdict != test.expect || !rule_ok {
                    let expected = match &test.rule {
                        Some(rule) => format!("{} by `{rule}`", test.expect),
                        None => test.expect.to_string(),
                    };
                    failures.push(
                        Diagnostic::new(
                            test.position,
                            format!(
                                "test `{}` fails: expected {expected}, got {} by `{}`",
                                test.name, decision.verdict, decision.rule
                            ),
                        )
                        .with_hint(format!(
                            "`ztctl policy explain` shows why: {}",
                            decision.summary()
                        )),
                    );
                }
            }
        }
        failures
    }
}

#[derive(Default)]
struct Linker {
    diagnostics: Vec<Diagnostic>,
    groups: Vec<LinkedGroup>,
    services: BTreeMap<String, LinkedService>,
    gateways: BTreeMap<String, Gateway>,
    rules: Vec<LinkedRule>,
    rule_ids: BTreeMap<String, LayerKind>,
}

impl Linker {
    fn finish(mut self) -> Diagnostics {
        self.diagnostics.sort_by_key(|d| d.position);
        Diagnostics(self.diagnostics)
    }

    fn error(&mut self, at: Position, message: impl Into<String>, hint: impl Into<String>) {
        self.diagnostics
            .push(Diagnostic::new(at, message).with_hint(hint));
    }

    fn layer(&mut self, policy: &Policy) {
        let layer = policy.kind;
        for (name, gateway) in &policy.gateways {
            if self.gateways.contains_key(name) {
                self.error(
                    gateway.position,
                    format!("gateway `{name}` is already defined by the baseline"),
                    "use it as it is, or choose another name",
                );
                continue;
            }
            self.gateways.insert(name.clone(), gateway.clone());
        }
        for (name, (group, at)) in &policy.groups {
            if self.groups.iter().any(|g| &g.name == name) {
                self.error(
                    *at,
                    format!("group `{name}` is already defined by the baseline"),
                    "use it as it is, or choose another name",
                );
                continue;
            }
            self.groups.push(LinkedGroup {
                name: name.clone(),
                layer,
                group: group.clone(),
            });
        }
        for (name, service) in &policy.services {
            if self.services.contains_key(name) {
                self.error(
                    service.position,
                    format!("service `{name}` is already defined by the baseline"),
                    "use it as it is, or choose another name",
                );
                continue;
            }
            let gateway = service.gateway.as_ref().and_then(|g| {
                let found = self.gateways.get(&g.name).cloned();
                if found.is_none() {
                    let hint = self.suggest(
                        &g.name,
                        self.gateways.keys().map(String::as_str),
                        "gateways",
                    );
                    self.error(g.position, format!("unknown gateway `{}`", g.name), hint);
                }
                found
            });
            self.services.insert(
                name.clone(),
                LinkedService {
                    service: service.clone(),
                    layer,
                    gateway,
                },
            );
        }
        for rule in &policy.rules {
            if let Some(first) = self.rule_ids.get(&rule.id) {
                if *first != layer {
                    self.error(
                        rule.position,
                        format!("rule id `{}` is already used by the baseline", rule.id),
                        "rule ids are unique across layers; choose another",
                    );
                    continue;
                }
            }
            self.rule_ids.insert(rule.id.clone(), layer);
            if let Some(linked) = self.rule(rule, layer) {
                self.rules.push(linked);
            }
        }
    }

    fn suggest<'a>(
        &self,
        name: &str,
        known: impl Iterator<Item = &'a str> + Clone,
        what: &str,
    ) -> String {
        match did_you_mean(name, known.clone()) {
            Some(near) => format!("did you mean `{near}`?"),
            None => {
                let all: Vec<&str> = known.collect();
                if all.is_empty() {
                    format!("no {what} are defined")
                } else {
                    format!("defined {what}: {}", all.join(", "))
                }
            }
        }
    }

    fn group_refs(&mut self, names: &[Named], kind: GroupKind) -> Vec<usize> {
        let mut out = Vec::new();
        for named in names {
            match self.groups.iter().position(|g| g.name == named.name) {
                Some(index) => {
                    let found = group_kind(&self.groups[index].group);
                    if found != kind {
                        self.error(
                            named.position,
                            format!(
                                "`{}` is a group of {}, not of {}",
                                named.name,
                                found.as_str(),
                                kind.as_str()
                            ),
                            format!("list it under `{}`", found.as_str()),
                        );
                    } else {
                        out.push(index);
                    }
                }
                None => {
                    let known: Vec<String> = self
                        .groups
                        .iter()
                        .filter(|g| group_kind(&g.group) == kind)
                        .map(|g| g.name.clone())
                        .collect();
                    let hint = self.suggest(
                        &named.name,
                        known.iter().map(String::as_str),
                        &format!("{} groups", kind.as_str().trim_end_matches('s')),
                    );
                    self.error(
                        named.position,
                        format!("unknown group `{}`", named.name),
                        hint,
                    );
                }
            }
        }
        out
    }

    fn rule(&mut self, rule: &Rule, layer: LayerKind) -> Option<LinkedRule> {
        let devices = self.group_refs(&rule.from.devices, GroupKind::Devices);
        let users = self.group_refs(&rule.from.users, GroupKind::Users);
        let binaries = self.group_refs(&rule.from.binaries, GroupKind::Binaries);
        let except_devices = self.group_refs(&rule.except.devices, GroupKind::Devices);
        let except_users = self.group_refs(&rule.except.users, GroupKind::Users);
        let except_binaries = self.group_refs(&rule.except.binaries, GroupKind::Binaries);
        let mut destinations = Vec::new();
        for named in &rule.to.services {
            let Some(service) = self.services.get(&named.name).cloned() else {
                let hint = self.suggest(
                    &named.name,
                    self.services.keys().map(String::as_str),
                    "services",
                );
                self.error(
                    named.position,
                    format!("unknown service `{}`", named.name),
                    hint,
                );
                continue;
            };
            match (rule.action, &service.gateway) {
                (Action::Tunnel, None) => self.error(
                    named.position,
                    format!("rule `{}` tunnels to `{}`, which has no gateway", rule.id, named.name),
                    "give the service `gateway: <name>`, or use allow",
                ),
                (Action::Allow, Some(_)) if service.service.class == ServiceClass::Protected => self
                    .error(
                        named.position,
                        format!(
                            "`{}` is protected: its gateway refuses direct connections, so `allow` cannot reach it",
                            named.name
                        ),
                        "use `action: tunnel`",
                    ),
                _ => {}
            }
            for net in &service.service.addresses {
                destinations.push(DestinationPair {
                    net: *net,
                    ports: Some(service.service.ports.clone()),
                    service: Some(named.name.clone()),
                });
            }
        }
        if rule.action == Action::Tunnel && !rule.to.addresses.is_empty() {
            self.error(
                rule.position,
                format!("rule `{}` tunnels to addresses; a tunnel goes to a service's gateway", rule.id),
                "define a service with a gateway for these addresses and name it under `to.services`",
            );
        }
        let ports = (!rule.to.ports.is_empty()).then(|| rule.to.ports.clone());
        for net in &rule.to.addresses {
            destinations.push(DestinationPair {
                net: *net,
                ports: ports.clone(),
                service: None,
            });
        }
        let except_ports = (!rule.except.ports.is_empty()).then(|| rule.except.ports.clone());
        let mut except_destinations = Vec::new();
        if rule.except.addresses.is_empty() {
            if except_ports.is_some() {
                for net in ["0.0.0.0/0", "::/0"] {
                    except_destinations.push(DestinationPair {
                        net: net.parse().expect("literal prefix"),
                        ports: except_ports.clone(),
                        service: None,
                    });
                }
            }
        } else {
            for net in &rule.except.addresses {
                except_destinations.push(DestinationPair {
                    net: *net,
                    ports: except_ports.clone(),
                    service: None,
                });
            }
        }
        destinations.sort();
        destinations.dedup();
        except_destinations.sort();
        Some(LinkedRule {
            id: rule.id.clone(),
            layer,
            action: rule.action,
            mode: rule.mode,
            devices,
            users,
            binaries,
            except_devices,
            except_users,
            except_binaries,
            destinations,
            except_destinations,
            position: rule.position,
        })
    }

    fn defaults(&mut self, baseline: &Policy, org: Option<&Policy>) -> EffectiveDefaults {
        let base = EffectiveDefaults {
            outbound: baseline.defaults.outbound.unwrap_or(Action::Allow),
            inbound: baseline.defaults.inbound.unwrap_or(Action::Deny),
            record_allows: baseline.defaults.record_allows.unwrap_or(false),
            fail_protected: baseline.fail_mode.protected.unwrap_or(FailMode::Closed),
            fail_standard: baseline.fail_mode.standard.unwrap_or(FailMode::Open),
        };
        let Some(org) = org else {
            return base;
        };
        let mut out = base;
        if let Some(outbound) = org.defaults.outbound {
            if outbound < base.outbound {
                self.error(
                    org.defaults.outbound_at,
                    format!(
                        "defaults.outbound `{outbound}` is looser than the baseline's `{}`",
                        base.outbound
                    ),
                    "an organisation can only make a default stricter (deny > tunnel > allow)",
                );
            }
            out.outbound = outbound.max(base.outbound);
        }
        if let Some(inbound) = org.defaults.inbound {
            if inbound < base.inbound {
                self.error(
                    org.defaults.inbound_at,
                    format!(
                        "defaults.inbound `{inbound}` is looser than the baseline's `{}`",
                        base.inbound
                    ),
                    "an organisation can only make a default stricter",
                );
            }
            out.inbound = inbound.max(base.inbound);
        }
        out.record_allows = base.record_allows || org.defaults.record_allows.unwrap_or(false);
        for (mine, theirs, slot, what, at) in [
            (
                org.fail_mode.protected,
                base.fail_protected,
                &mut out.fail_protected,
                "protected",
                org.fail_mode.protected_at,
            ),
            (
                org.fail_mode.standard,
                base.fail_standard,
                &mut out.fail_standard,
                "standard",
                org.fail_mode.standard_at,
            ),
        ] {
            if let Some(mode) = mine {
                if mode == FailMode::Open && theirs == FailMode::Closed {
                    self.diagnostics.push(
                        Diagnostic::new(
                            at,
                            format!(
                                "fail_mode.{what} `open` is looser than the baseline's `closed`"
                            ),
                        )
                        .with_hint("an organisation can only make a fail mode stricter"),
                    );
                } else {
                    *slot = mode;
                }
            }
        }
        out
    }
}

pub(crate) fn group_kind(group: &Group) -> GroupKind {
    match group {
        Group::Devices(_) => GroupKind::Devices,
        Group::Users(_) => GroupKind::Users,
        Group::Binaries(_) => GroupKind::Binaries,
    }
}
