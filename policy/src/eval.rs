//! Evaluation and explanation: one function decides a flow for the kernel
//! tables' compiler, the gateway, `ztctl policy explain` and `tests:`, so
//! what is explained is what is enforced.
//!
//! A rule matches a flow when one of its destinations covers the flow's
//! address and port, none of its `except` destinations does, every `from`
//! condition holds (device, user, binary; an empty condition holds for all)
//! and no `except` identity holds. Of the matching rules in `enforce` mode
//! the strictest action wins (deny > tunnel > allow); among those, the most
//! specific destination (a rule naming the port before one for every port,
//! then the longest prefix), then the baseline's before the organisation's,
//! then the lowest id names the deciding rule. With none, the default for
//! the direction applies. `dry-run` rules are evaluated the same way as if
//! they were enforced; when that would change the verdict, the decision
//! carries what would have happened.

use std::{fmt::Write as _, net::SocketAddr};

use crate::{
    model::*,
    set::{DestinationPair, LinkedRule, PolicySet},
};

/// A connection as policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    pub direction: Direction,
    /// The calling device's SPIFFE id.
    pub device: &'a str,
    pub user: &'a str,
    /// Absolute path of the calling process's executable.
    pub exe: &'a str,
    /// Its SHA-256 (hex), `""` when unknown.
    pub exe_sha256: &'a str,
    /// The original destination.
    pub destination: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DryRun {
    pub verdict: Action,
    pub rule: String,
}

/// A rule that did not match, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NearMiss {
    pub rule: String,
    pub action: Action,
    pub failed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    pub direction: Direction,
    /// For inbound flows, `allow` or `deny` (a tunnel has arrived).
    pub verdict: Action,
    /// The deciding rule's id, or `default`.
    pub rule: String,
    pub layer: Option<LayerKind>,
    /// The service the destination belongs to.
    pub service: Option<String>,
    /// The gateway a tunnel goes to.
    pub gateway: Option<String>,
    /// What dry-run rules would change.
    pub dry_run: Option<DryRun>,
    /// Every matching rule, deciding one first.
    pub matched: Vec<String>,
    /// For a default verdict: the rules that came nearest, and what each
    /// did not match.
    pub nearest: Vec<NearMiss>,
}

pub const DEFAULT_RULE: &str = "default";
const NEAREST_REPORTED: usize = 3;

impl Decision {
    /// One line: verdict, rule, dry-run and the nearest rule's reasons.
    pub fn summary(&self) -> String {
        let mut text = format!("{} by `{}`", self.verdict, self.rule);
        if let Some(d) = &self.dry_run {
            let _ = write!(text, ", would {} by dry-run rule `{}`", d.verdict, d.rule);
        }
        if let Some(near) = self.nearest.first() {
            let _ = write!(
                text,
                "; nearest rule `{}`: {}",
                near.rule,
                near.failed.join("; ")
            );
        }
        text
    }
}

/// `(names the port, prefix length)` of the most specific destination of
/// `rule` covering the flow, or `None` when none does (or an exception
/// does).
pub(crate) fn destination_specificity(rule: &LinkedRule, to: SocketAddr) -> Option<(bool, u8)> {
    if rule
        .except_destinations
        .iter()
        .any(|p| p.net.contains(&to.ip()) && p.covers_port(to.port()))
    {
        return None;
    }
    rule.destinations
        .iter()
        .filter(|p| p.net.contains(&to.ip()) && p.covers_port(to.port()))
        .map(|p| (p.ports.is_some(), p.net.prefix_len()))
        .max()
}

impl PolicySet {
    fn in_group(&self, index: usize, flow: &Flow<'_>) -> bool {
        match &self.groups[index].group {
            Group::Devices(patterns) => patterns.iter().any(|p| p.matches(flow.device)),
            Group::Users(users) => users.contains(flow.user),
            Group::Binaries(binaries) => binaries
                .iter()
                .any(|b| b.matches(flow.exe, flow.exe_sha256)),
        }
    }

    fn identity_failures(&self, rule: &LinkedRule, flow: &Flow<'_>, out: &mut Vec<String>) {
        let any = |groups: &[usize]| groups.iter().any(|&g| self.in_group(g, flow));
        let names = |groups: &[usize]| {
            groups
                .iter()
                .map(|&g| self.groups[g].name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let shown = |v: &str| {
            if v.is_empty() {
                "(unknown)".to_owned()
            } else {
                v.to_owned()
            }
        };
        if !rule.devices.is_empty() && !any(&rule.devices) {
            out.push(format!(
                "device {} is in none of [{}]",
                flow.device,
                names(&rule.devices)
            ));
        }
        if !rule.users.is_empty() && !any(&rule.users) {
            out.push(format!(
                "user {} is in none of [{}]",
                shown(flow.user),
                names(&rule.users)
            ));
        }
        if !rule.binaries.is_empty() && !any(&rule.binaries) {
            out.push(format!(
                "binary {} is in none of [{}]",
                shown(flow.exe),
                names(&rule.binaries)
            ));
        }
        for (groups, what, value) in [
            (&rule.except_devices, "device", flow.device),
            (&rule.except_users, "user", flow.user),
            (&rule.except_binaries, "binary", flow.exe),
        ] {
            if let Some(&g) = groups.iter().find(|&&g| self.in_group(g, flow)) {
                out.push(format!(
                    "{what} {} is excepted (group {})",
                    shown(value),
                    self.groups[g].name
                ));
            }
        }
    }

    /// Whether `rule` matches `flow`, and how specifically.
    pub(crate) fn rule_matches(&self, rule: &LinkedRule, flow: &Flow<'_>) -> Option<(bool, u8)> {
        let specificity = destination_specificity(rule, flow.destination)?;
        let any = |groups: &[usize]| groups.iter().any(|&g| self.in_group(g, flow));
        let holds = (rule.devices.is_empty() || any(&rule.devices))
            && (rule.users.is_empty() || any(&rule.users))
            && (rule.binaries.is_empty() || any(&rule.binaries))
            && !any(&rule.except_devices)
            && !any(&rule.except_users)
            && !any(&rule.except_binaries);
        holds.then_some(specificity)
    }

    /// The service `destination` belongs to: the most specific one that
    /// lists its address and port.
    pub fn service_for(&self, destination: SocketAddr) -> Option<&crate::set::LinkedService> {
        self.services
            .values()
            .filter(|s| s.service.ports.contains(&destination.port()))
            .filter_map(|s| {
                s.service
                    .addresses
                    .iter()
                    .filter(|n| n.contains(&destination.ip()))
                    .map(|n| n.prefix_len())
                    .max()
                    .map(|len| (len, s))
            })
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.service.name.cmp(&a.1.service.name)))
            .map(|(_, s)| s)
    }

    /// Decides `flow`.
    pub fn evaluate(&self, flow: &Flow<'_>) -> Decision {
        // (action, specificity, layer, id) ordering: the best is the least.
        let mut matched: Vec<(&LinkedRule, (bool, u8))> = self
            .rules
            .iter()
            .filter_map(|r| self.rule_matches(r, flow).map(|s| (r, s)))
            .collect();
        matched.sort_by(|(a, sa), (b, sb)| {
            b.action
                .cmp(&a.action)
                .then(sb.cmp(sa))
                .then(a.layer.cmp(&b.layer))
                .then(a.id.cmp(&b.id))
        });
        let enforced = matched
            .iter()
            .find(|(r, _)| r.mode == Mode::Enforce)
            .map(|(r, _)| *r);
        let would = matched.first().map(|(r, _)| *r);
        let default = match flow.direction {
            Direction::Outbound => self.defaults.outbound,
            Direction::Inbound => self.defaults.inbound,
        };
        let arrive = |action: Action| match (flow.direction, action) {
            (Direction::Inbound, Action::Tunnel) => Action::Allow,
            (_, action) => action,
        };
        let verdict = arrive(enforced.map_or(default, |r| r.action));
        let would_verdict = arrive(would.map_or(default, |r| r.action));
        let dry_run = (would_verdict != verdict).then(|| DryRun {
            verdict: would_verdict,
            rule: would.map_or(DEFAULT_RULE.to_owned(), |r| r.id.clone()),
        });
        let service = self.service_for(flow.destination);
        let gateway = match (enforced, service) {
            (Some(r), Some(s)) if r.action == Action::Tunnel => {
                s.gateway.as_ref().map(|g| g.name.clone())
            }
            _ => None,
        };
        let nearest = if enforced.is_none() {
            self.nearest(flow)
        } else {
            Vec::new()
        };
        Decision {
            direction: flow.direction,
            verdict,
            rule: enforced.map_or(DEFAULT_RULE.to_owned(), |r| r.id.clone()),
            layer: enforced.map(|r| r.layer),
            service: service.map(|s| s.service.name.clone()),
            gateway,
            dry_run,
            matched: matched.iter().map(|(r, _)| r.id.clone()).collect(),
            nearest,
        }
    }

    /// How many of `rule`'s conditions `flow` fails, and whether the
    /// destination is one of them — counted without formatting, so a
    /// default verdict among thousands of rules stays cheap.
    fn failure_count(&self, rule: &LinkedRule, flow: &Flow<'_>) -> (bool, usize) {
        let any = |groups: &[usize]| groups.iter().any(|&g| self.in_group(g, flow));
        let destination_missed = destination_specificity(rule, flow.destination).is_none();
        let failed = [
            destination_missed,
            !rule.devices.is_empty() && !any(&rule.devices),
            !rule.users.is_empty() && !any(&rule.users),
            !rule.binaries.is_empty() && !any(&rule.binaries),
            any(&rule.except_devices),
            any(&rule.except_users),
            any(&rule.except_binaries),
        ];
        (destination_missed, failed.iter().filter(|f| **f).count())
    }

    fn nearest(&self, flow: &Flow<'_>) -> Vec<NearMiss> {
        let mut candidates: Vec<((bool, usize), &LinkedRule)> = self
            .rules
            .iter()
            .filter(|r| r.mode == Mode::Enforce)
            .map(|rule| (self.failure_count(rule, flow), rule))
            .filter(|((_, count), _)| *count > 0)
            .collect();
        let order = |a: &((bool, usize), &LinkedRule), b: &((bool, usize), &LinkedRule)| {
            a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id))
        };
        if candidates.len() > NEAREST_REPORTED {
            candidates.select_nth_unstable_by(NEAREST_REPORTED - 1, order);
            candidates.truncate(NEAREST_REPORTED);
        }
        candidates.sort_by(order);
        candidates
            .into_iter()
            .map(|((destination_missed, _), rule)| {
                let mut failed = Vec::new();
                if destination_missed {
                    failed.push(format!(
                        "destination {} is not in {}",
                        flow.destination,
                        describe_destinations(&rule.destinations)
                    ));
                }
                self.identity_failures(rule, flow, &mut failed);
                NearMiss {
                    rule: rule.id.clone(),
                    action: rule.action,
                    failed,
                }
            })
            .collect()
    }
}

fn describe_destinations(pairs: &[DestinationPair]) -> String {
    let mut text = String::new();
    for (i, p) in pairs.iter().take(4).enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        if let Some(service) = &p.service {
            let _ = write!(text, "{service} ");
        }
        let _ = write!(text, "{}", p.net);
        match &p.ports {
            Some(ports) => {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                let _ = write!(text, " port {}", list.join("/"));
            }
            None => text.push_str(" any port"),
        }
    }
    if pairs.len() > 4 {
        let _ = write!(text, " and {} more", pairs.len() - 4);
    }
    text
}
