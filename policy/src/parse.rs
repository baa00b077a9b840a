//! YAML text → [`Policy`], with every problem reported at its line and
//! column. Unknown keys, wrong types, bad addresses and duplicate names are
//! errors; references between layers are checked by [`crate::PolicySet`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;
use saphyr::{Scalar, YamlData};

use crate::{
    diag::{
        yaml::{self, position, Fields, Node, YamlReader},
        Diagnostics, Position,
    },
    model::*,
};

/// Parses and checks one layer document.
pub fn parse(text: &str) -> Result<Policy, Diagnostics> {
    let documents = yaml::load(text)?;
    let mut reader = Reader::default();
    let policy = match documents.as_slice() {
        [] => {
            reader.error(Position { line: 1, column: 1 }, "the policy is empty");
            None
        }
        [document] => reader.policy(document),
        [_, second, ..] => {
            reader.error(
                position(second),
                "a policy file holds one YAML document; this is a second one",
            );
            None
        }
    };
    match policy {
        Some(policy) if reader.diagnostics.is_empty() => Ok(policy),
        _ => Err(reader.yaml.into_diagnostics()),
    }
}

/// The policy parser: the shared YAML reader and this format's values.
#[derive(Default)]
struct Reader {
    yaml: YamlReader,
}

impl std::ops::Deref for Reader {
    type Target = YamlReader;
    fn deref(&self) -> &YamlReader {
        &self.yaml
    }
}

impl std::ops::DerefMut for Reader {
    fn deref_mut(&mut self) -> &mut YamlReader {
        &mut self.yaml
    }
}

const TOP_KEYS: &[&str] = &[
    "version",
    "kind",
    "org",
    "gateways",
    "groups",
    "services",
    "rules",
    "defaults",
    "fail_mode",
    "detections",
    "tests",
];

impl Reader {
    /// A mapping whose keys are all in `allowed` (`None`: any key); an
    /// empty value reads as an empty mapping.
    fn mapping<'n, 'a>(
        &mut self,
        node: &'n Node<'a>,
        what: &str,
        allowed: Option<&[&str]>,
    ) -> Option<Fields<'n, 'a>> {
        if let Some(fields) = self.fields(node, what, allowed) {
            return Some(fields);
        }
        if matches!(node.data, YamlData::Value(Scalar::Null)) {
            return Some(Fields::empty(position(node)));
        }
        self.error(
            position(node),
            format!("{what} must be a mapping (key: value)"),
        );
        None
    }

    fn string(&mut self, node: &Node<'_>, what: &str) -> Option<String> {
        match &node.data {
            YamlData::Value(Scalar::String(s)) => Some(s.to_string()),
            YamlData::Value(Scalar::Integer(i)) => Some(i.to_string()),
            _ => {
                self.error(position(node), format!("{what} must be text"));
                None
            }
        }
    }

    fn name(&mut self, node: &Node<'_>, what: &str) -> Option<String> {
        let name = self.string(node, what)?;
        let valid = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !valid {
            self.error_hint(
                position(node),
                format!("{what} `{name}` is not a valid name"),
                "use letters, digits and - _ . : (at most 128)",
            );
            return None;
        }
        Some(name)
    }

    fn list<'n, 'a>(&mut self, node: &'n Node<'a>, what: &str) -> Vec<&'n Node<'a>> {
        match &node.data {
            YamlData::Sequence(items) => items.iter().collect(),
            YamlData::Value(Scalar::Null) => Vec::new(),
            _ => {
                self.error_hint(
                    position(node),
                    format!("{what} must be a list"),
                    "write `[a, b]` or one `- item` per line",
                );
                Vec::new()
            }
        }
    }

    fn list_is_empty(&self, node: &Node<'_>) -> bool {
        match &node.data {
            YamlData::Sequence(items) => items.is_empty(),
            YamlData::Value(Scalar::Null) => true,
            _ => false,
        }
    }

    fn names(&mut self, node: &Node<'_>, what: &str) -> Vec<Named> {
        let mut out: Vec<Named> = Vec::new();
        for item in self.list(node, what) {
            if let Some(name) = self.name(item, what) {
                if out.iter().any(|n| n.name == name) {
                    self.error(position(item), format!("{what} `{name}` is listed twice"));
                    continue;
                }
                out.push(Named {
                    name,
                    position: position(item),
                });
            }
        }
        out
    }

    fn boolean(&mut self, node: &Node<'_>, what: &str) -> Option<bool> {
        match &node.data {
            YamlData::Value(Scalar::Boolean(b)) => Some(*b),
            _ => {
                self.error(position(node), format!("{what} must be true or false"));
                None
            }
        }
    }

    fn port(&mut self, node: &Node<'_>) -> Option<u16> {
        match &node.data {
            YamlData::Value(Scalar::Integer(p)) if (1..=65535).contains(p) => Some(*p as u16),
            _ => {
                self.error_hint(
                    position(node),
                    "a port must be a number from 1 to 65535",
                    "omit `ports` for every port",
                );
                None
            }
        }
    }

    fn ports(&mut self, node: &Node<'_>) -> BTreeSet<u16> {
        let mut ports = BTreeSet::new();
        for item in self.list(node, "ports") {
            if let Some(port) = self.port(item) {
                if !ports.insert(port) {
                    self.error(position(item), format!("port {port} is listed twice"));
                }
            }
        }
        ports
    }

    fn prefix(&mut self, node: &Node<'_>) -> Option<IpNet> {
        let text = self.string(node, "an address")?;
        let net = match text.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => match text.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    let hint = if text.parse::<SocketAddr>().is_ok() {
                        "write the port under `ports`"
                    } else {
                        "write an IPv4 or IPv6 address or prefix, e.g. 10.1.0.0/16 or fd00::/8"
                    };
                    self.error_hint(
                        position(node),
                        format!("`{text}` is not an address or prefix"),
                        hint,
                    );
                    return None;
                }
            },
        };
        if net.trunc() != net {
            self.error_hint(
                position(node),
                format!("`{text}` has host bits set"),
                format!("write {}", net.trunc()),
            );
            return None;
        }
        Some(net)
    }

    fn prefixes(&mut self, node: &Node<'_>) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = Vec::new();
        for item in self.list(node, "addresses") {
            if let Some(net) = self.prefix(item) {
                if out.contains(&net) {
                    self.error(position(item), format!("{net} is listed twice"));
                    continue;
                }
                out.push(net);
            }
        }
        out
    }

    fn socket_address(&mut self, node: &Node<'_>, what: &str) -> Option<SocketAddr> {
        let text = self.string(node, what)?;
        match text.parse::<SocketAddr>() {
            Ok(address) if address.port() != 0 => Some(address),
            _ => {
                self.error_hint(
                    position(node),
                    format!("{what} `{text}` is not an address with a port"),
                    "write ip:port, e.g. 10.1.2.3:4433 or [fd00::3]:4433",
                );
                None
            }
        }
    }

    fn spiffe_id(&mut self, node: &Node<'_>, what: &str, glob: bool) -> Option<String> {
        let text = self.string(node, what)?;
        let segments: Vec<&str> = text
            .strip_prefix("spiffe://")
            .map(|rest| rest.split('/').collect())
            .unwrap_or_default();
        let shape = matches!(segments.as_slice(), [td, "org", org, "device", id]
            if !td.is_empty() && !td.contains('*') && !org.is_empty() && !id.is_empty());
        if !shape || (!glob && text.contains('*')) {
            let hint = if glob {
                "write spiffe://<trust domain>/org/<org>/device/<id>; `*` matches within a segment"
            } else {
                "write spiffe://<trust domain>/org/<org>/device/<id>"
            };
            self.error_hint(
                position(node),
                format!("{what} `{text}` is not a device SPIFFE id"),
                hint,
            );
            return None;
        }
        Some(text)
    }

    fn sha256(&mut self, node: &Node<'_>) -> Option<String> {
        let text = self.string(node, "sha256")?;
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            self.error_hint(
                position(node),
                "sha256 must be 64 hexadecimal digits",
                "`sha256sum <binary>` prints it",
            );
            return None;
        }
        Some(text.to_ascii_lowercase())
    }

    fn choice<T>(
        &mut self,
        node: &Node<'_>,
        what: &str,
        options: &[&str],
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let text = self.string(node, what)?;
        self.choose(node, &text, what, options, parse)
    }

    fn policy(&mut self, root: &Node<'_>) -> Option<Policy> {
        let top = self.mapping(root, "the policy", Some(TOP_KEYS))?;
        match top.get("version") {
            None => self.error_hint(
                top.at,
                "the policy needs `version`",
                format!("write `version: {FORMAT_VERSION}` first"),
            ),
            Some(node) => match &node.data {
                YamlData::Value(Scalar::Integer(v)) if *v as u64 == FORMAT_VERSION => {}
                _ => self.error_hint(
                    position(node),
                    "unsupported policy format version",
                    format!("this version reads format {FORMAT_VERSION}"),
                ),
            },
        }
        let kind = self.required(&top, "kind", "the policy").and_then(|n| {
            self.choice(n, "kind", &["baseline", "organisation"], |k| match k {
                "baseline" => Some(LayerKind::Baseline),
                "organisation" => Some(LayerKind::Organisation),
                _ => None,
            })
        });
        let org = top.get("org").and_then(|n| self.name(n, "org"));
        match (kind, &org, top.entries.get("org")) {
            (Some(LayerKind::Organisation), None, None) => self.error_hint(
                top.at,
                "an organisation layer needs `org`",
                "write `org: <organisation id>`",
            ),
            (Some(LayerKind::Baseline), _, Some((at, _))) => self.error_hint(
                *at,
                "a baseline belongs to no organisation",
                "remove `org`, or write `kind: organisation`",
            ),
            _ => {}
        }
        let gateways = top
            .get("gateways")
            .map(|n| self.gateways(n))
            .unwrap_or_default();
        let groups = top
            .get("groups")
            .map(|n| self.groups(n))
            .unwrap_or_default();
        let services = top
            .get("services")
            .map(|n| self.services(n))
            .unwrap_or_default();
        let mut rules = top.get("rules").map(|n| self.rules(n)).unwrap_or_default();
        rules.sort_by(|a, b| a.id.cmp(&b.id));
        let defaults = top
            .get("defaults")
            .map(|n| self.defaults(n))
            .unwrap_or_default();
        let fail_mode = top
            .get("fail_mode")
            .map(|n| self.fail_modes(n))
            .unwrap_or_default();
        let detections = top
            .get("detections")
            .map(|n| self.detections(n))
            .unwrap_or_default();
        let tests = top.get("tests").map(|n| self.tests(n)).unwrap_or_default();
        Some(Policy {
            kind: kind?,
            org,
            gateways,
            groups,
            services,
            rules,
            defaults,
            fail_mode,
            detections,
            tests,
        })
    }

    fn gateways(&mut self, node: &Node<'_>) -> BTreeMap<String, Gateway> {
        let mut out = BTreeMap::new();
        let Some(fields) = self.mapping(node, "gateways", None) else {
            return out;
        };
        for (name, (at, value)) in &fields.entries {
            if self.check_name(name, *at, "gateway").is_none() {
                continue;
            }
            let Some(g) = self.mapping(value, "a gateway", Some(&["id", "address"])) else {
                continue;
            };
            let id = self
                .required(&g, "id", "a gateway")
                .and_then(|n| self.spiffe_id(n, "gateway id", false));
            let address = self
                .required(&g, "address", "a gateway")
                .and_then(|n| self.socket_address(n, "gateway address"));
            if let (Some(id), Some(address)) = (id, address) {
                out.insert(
                    name.clone(),
                    Gateway {
                        name: name.clone(),
                        id,
                        address,
                        position: *at,
                    },
                );
            }
        }
        out
    }

    fn check_name(&mut self, name: &str, at: Position, what: &str) -> Option<()> {
        let valid = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !valid {
            self.error_hint(
                at,
                format!("{what} name `{name}` is not a valid name"),
                "use letters, digits and - _ . : (at most 128)",
            );
            return None;
        }
        Some(())
    }

    fn groups(&mut self, node: &Node<'_>) -> BTreeMap<String, (Group, Position)> {
        let mut out: BTreeMap<String, (Group, Position)> = BTreeMap::new();
        let Some(kinds) = self.mapping(node, "groups", Some(&["devices", "users", "binaries"]))
        else {
            return out;
        };
        for (kind, (_, groups)) in &kinds.entries {
            let Some(groups) = self.mapping(groups, &format!("groups.{kind}"), None) else {
                continue;
            };
            for (name, (at, members)) in &groups.entries {
                if self.check_name(name, *at, "group").is_none() {
                    continue;
                }
                let group = match kind.as_str() {
                    "devices" => Group::Devices(
                        self.list(members, "a device group")
                            .into_iter()
                            .filter_map(|m| self.spiffe_id(m, "device", true))
                            .map(DevicePattern)
                            .collect(),
                    ),
                    "users" => {
                        let mut users = BTreeSet::new();
                        for member in self.list(members, "a user group") {
                            if let Some(user) = self.string(member, "a user name") {
                                if user.is_empty() {
                                    self.error(position(member), "a user name must not be empty");
                                } else if !users.insert(user.clone()) {
                                    self.error(
                                        position(member),
                                        format!("user `{user}` is listed twice"),
                                    );
                                }
                            }
                        }
                        Group::Users(users)
                    }
                    _ => Group::Binaries(self.binaries(members)),
                };
                if let Some((_, first)) = out.get(name) {
                    let first = *first;
                    self.error_hint(
                        *at,
                        format!("group name `{name}` is used twice"),
                        format!("the first is at {first}; device, user and binary groups share one namespace"),
                    );
                    continue;
                }
                out.insert(name.clone(), (group, *at));
            }
        }
        out
    }

    fn binaries(&mut self, node: &Node<'_>) -> Vec<BinaryMatch> {
        let mut out = Vec::new();
        for member in self.list(node, "a binary group") {
            if let YamlData::Value(Scalar::String(_)) = member.data {
                if let Some(path) = self.path(member) {
                    out.push(BinaryMatch {
                        path: Some(path),
                        sha256: None,
                    });
                }
                continue;
            }
            let Some(fields) = self.mapping(member, "a binary", Some(&["path", "sha256"])) else {
                continue;
            };
            let path = fields.get("path").and_then(|n| self.path(n));
            let sha256 = fields.get("sha256").and_then(|n| self.sha256(n));
            if fields.get("path").is_none() && fields.get("sha256").is_none() {
                self.error_hint(
                    fields.at,
                    "a binary needs `path`, `sha256` or both",
                    "e.g. `- path: /usr/bin/curl`",
                );
                continue;
            }
            if path.is_some() || sha256.is_some() {
                out.push(BinaryMatch { path, sha256 });
            }
        }
        out
    }

    fn path(&mut self, node: &Node<'_>) -> Option<String> {
        let path = self.string(node, "a path")?;
        if !path.starts_with('/') || path.contains("/../") || path.ends_with("/..") {
            self.error_hint(
                position(node),
                format!("`{path}` is not an absolute path"),
                "binaries are matched by the absolute path of the executable, e.g. /usr/bin/curl",
            );
            return None;
        }
        Some(path)
    }

    fn services(&mut self, node: &Node<'_>) -> BTreeMap<String, Service> {
        let mut out = BTreeMap::new();
        let Some(fields) = self.mapping(node, "services", None) else {
            return out;
        };
        for (name, (at, value)) in &fields.entries {
            if self.check_name(name, *at, "service").is_none() {
                continue;
            }
            let Some(s) = self.mapping(
                value,
                "a service",
                Some(&["addresses", "ports", "gateway", "target", "class"]),
            ) else {
                continue;
            };
            let addresses = self
                .required(&s, "addresses", "a service")
                .map(|n| self.prefixes(n))
                .unwrap_or_default();
            let ports = self
                .required(&s, "ports", "a service")
                .map(|n| self.ports(n))
                .unwrap_or_default();
            if s.get("addresses").is_some() && addresses.is_empty() {
                self.error(s.at, format!("service `{name}` lists no addresses"));
            }
            if s.get("ports").is_some() && ports.is_empty() {
                self.error(s.at, format!("service `{name}` lists no ports"));
            }
            let gateway = s.get("gateway").and_then(|n| {
                self.name(n, "gateway").map(|name| Named {
                    name,
                    position: position(n),
                })
            });
            let target = s
                .get("target")
                .and_then(|n| self.socket_address(n, "target"));
            if target.is_some() && gateway.is_none() {
                self.error_hint(
                    s.entries["target"].0,
                    "only a service behind a gateway has a `target`",
                    "add `gateway: <name>`, or remove `target`",
                );
            }
            let class = s
                .get("class")
                .and_then(|n| {
                    self.choice(n, "class", &["protected", "standard"], |c| match c {
                        "protected" => Some(ServiceClass::Protected),
                        "standard" => Some(ServiceClass::Standard),
                        _ => None,
                    })
                })
                .unwrap_or_default();
            out.insert(
                name.clone(),
                Service {
                    name: name.clone(),
                    addresses,
                    ports,
                    gateway,
                    target,
                    class,
                    position: *at,
                },
            );
        }
        out
    }

    fn rules(&mut self, node: &Node<'_>) -> Vec<Rule> {
        let mut out: Vec<Rule> = Vec::new();
        for item in self.list(node, "rules") {
            let Some(r) = self.mapping(
                item,
                "a rule",
                Some(&[
                    "id",
                    "action",
                    "mode",
                    "from",
                    "to",
                    "except",
                    "description",
                ]),
            ) else {
                continue;
            };
            let id = self
                .required(&r, "id", "a rule")
                .and_then(|n| self.name(n, "rule id"));
            if let Some(id) = &id {
                if id == "default" {
                    self.error_hint(
                        r.entries["id"].0,
                        "`default` names the default verdict, not a rule",
                        "choose another id",
                    );
                } else if let Some(first) = out.iter().find(|x| &x.id == id) {
                    let first = first.position;
                    self.error_hint(
                        r.entries["id"].0,
                        format!("rule id `{id}` is used twice"),
                        format!("the first is at {first}"),
                    );
                }
            }
            let action = self
                .required(&r, "action", "a rule")
                .and_then(|n| self.choice(n, "action", &Action::ALL, Action::parse));
            let mode = r
                .get("mode")
                .and_then(|n| {
                    self.choice(n, "mode", &["enforce", "dry-run"], |m| match m {
                        "enforce" => Some(Mode::Enforce),
                        "dry-run" => Some(Mode::DryRun),
                        _ => None,
                    })
                })
                .unwrap_or_default();
            let from = r
                .get("from")
                .map(|n| self.conditions(n))
                .unwrap_or_default();
            let to = match r.get("to") {
                Some(n) => self.destinations(n),
                None => {
                    self.error_hint(
                        r.at,
                        "a rule needs `to`",
                        "name services (`to: {services: [web]}`) or addresses (`to: {addresses: [10.0.0.0/8]}`)",
                    );
                    None
                }
            };
            let except = r
                .get("except")
                .map(|n| self.exceptions(n))
                .unwrap_or_default();
            let description = r
                .get("description")
                .and_then(|n| self.string(n, "description"));
            if let (Some(id), Some(action), Some(to)) = (id, action, to) {
                out.push(Rule {
                    id,
                    action,
                    mode,
                    from,
                    to,
                    except,
                    description,
                    position: position(item),
                });
            }
        }
        out
    }

    fn conditions(&mut self, node: &Node<'_>) -> Conditions {
        let Some(f) = self.mapping(node, "`from`", Some(&["devices", "users", "binaries"])) else {
            return Conditions::default();
        };
        let mut list = |key: &str| {
            f.get(key)
                .map(|n| self.names(n, &format!("a {} group", key.trim_end_matches('s'))))
                .unwrap_or_default()
        };
        Conditions {
            devices: list("devices"),
            users: list("users"),
            binaries: list("binaries"),
        }
    }

    fn exceptions(&mut self, node: &Node<'_>) -> Exceptions {
        let Some(f) = self.mapping(
            node,
            "`except`",
            Some(&["devices", "users", "binaries", "addresses", "ports"]),
        ) else {
            return Exceptions::default();
        };
        let mut list = |key: &str| {
            f.get(key)
                .map(|n| self.names(n, &format!("a {} group", key.trim_end_matches('s'))))
                .unwrap_or_default()
        };
        let devices = list("devices");
        let users = list("users");
        let binaries = list("binaries");
        Exceptions {
            devices,
            users,
            binaries,
            addresses: f
                .get("addresses")
                .map(|n| self.prefixes(n))
                .unwrap_or_default(),
            ports: f.get("ports").map(|n| self.ports(n)).unwrap_or_default(),
        }
    }

    fn destinations(&mut self, node: &Node<'_>) -> Option<Destinations> {
        let f = self.mapping(node, "`to`", Some(&["services", "addresses", "ports"]))?;
        let services = f
            .get("services")
            .map(|n| self.names(n, "a service"))
            .unwrap_or_default();
        let addresses = f
            .get("addresses")
            .map(|n| self.prefixes(n))
            .unwrap_or_default();
        let ports = f.get("ports").map(|n| self.ports(n)).unwrap_or_default();
        if services.is_empty() && addresses.is_empty() {
            // Entries that were there but invalid are reported already; an
            // empty `to` would silently drop the rule.
            let listed_but_invalid = f.get("services").is_some_and(|n| !self.list_is_empty(n))
                || f.get("addresses").is_some_and(|n| !self.list_is_empty(n));
            if !listed_but_invalid {
                self.error_hint(
                    f.at,
                    "`to` names no destination",
                    "add `services: [...]` or `addresses: [...]` (0.0.0.0/0 and ::/0 for everywhere)",
                );
            }
            return None;
        }
        if !services.is_empty() && !ports.is_empty() && addresses.is_empty() {
            self.error_hint(
                f.entries["ports"].0,
                "`ports` applies to `addresses`; a service has its own ports",
                "remove `ports`, or define another service",
            );
        }
        Some(Destinations {
            services,
            addresses,
            ports,
        })
    }

    fn verdict_choice(&mut self, node: &Node<'_>, what: &str) -> Option<Action> {
        self.choice(node, what, &Action::ALL, Action::parse)
    }

    fn defaults(&mut self, node: &Node<'_>) -> Defaults {
        let Some(f) = self.mapping(
            node,
            "defaults",
            Some(&["outbound", "inbound", "record_allows"]),
        ) else {
            return Defaults::default();
        };
        let outbound = f
            .get("outbound")
            .and_then(|n| self.verdict_choice(n, "defaults.outbound"));
        let inbound = f.get("inbound").and_then(|n| {
            self.choice(n, "defaults.inbound", &["allow", "deny"], |v| match v {
                "allow" => Some(Action::Allow),
                "deny" => Some(Action::Deny),
                _ => None,
            })
        });
        if outbound == Some(Action::Tunnel) {
            self.error_hint(
                f.entries["outbound"].0,
                "the outbound default cannot be `tunnel`",
                "a tunnel needs a service with a gateway; write a rule for it",
            );
        }
        let record_allows = f
            .get("record_allows")
            .and_then(|n| self.boolean(n, "record_allows"));
        let at = |key: &str| f.entries.get(key).map_or(f.at, |(at, _)| *at);
        Defaults {
            outbound,
            inbound,
            record_allows,
            outbound_at: at("outbound"),
            inbound_at: at("inbound"),
        }
    }

    fn fail_modes(&mut self, node: &Node<'_>) -> FailModes {
        let Some(f) = self.mapping(node, "fail_mode", Some(&["protected", "standard"])) else {
            return FailModes::default();
        };
        let mut mode = |key: &str| {
            f.get(key).and_then(|n| {
                self.choice(
                    n,
                    &format!("fail_mode.{key}"),
                    &["closed", "open"],
                    |m| match m {
                        "closed" => Some(FailMode::Closed),
                        "open" => Some(FailMode::Open),
                        _ => None,
                    },
                )
            })
        };
        let protected = mode("protected");
        let standard = mode("standard");
        let at = |key: &str| f.entries.get(key).map_or(f.at, |(at, _)| *at);
        FailModes {
            protected,
            standard,
            protected_at: at("protected"),
            standard_at: at("standard"),
        }
    }

    fn detections(&mut self, node: &Node<'_>) -> Detections {
        let Some(f) = self.mapping(node, "detections", Some(&["enable", "disable"])) else {
            return Detections::default();
        };
        let mut set = |key: &str| -> BTreeSet<String> {
            f.get(key)
                .map(|n| self.names(n, "a detection rule id"))
                .unwrap_or_default()
                .into_iter()
                .map(|n| n.name)
                .collect()
        };
        let enable = set("enable");
        let disable = set("disable");
        if let Some(both) = enable.intersection(&disable).next() {
            self.error(
                f.at,
                format!("detection `{both}` is both enabled and disabled"),
            );
        }
        Detections { enable, disable }
    }

    fn tests(&mut self, node: &Node<'_>) -> Vec<PolicyTest> {
        let mut out = Vec::new();
        for item in self.list(node, "tests") {
            let Some(t) = self.mapping(item, "a test", Some(&["name", "flow", "expect", "rule"]))
            else {
                continue;
            };
            let name = self
                .required(&t, "name", "a test")
                .and_then(|n| self.string(n, "a test name"));
            let flow = self
                .required(&t, "flow", "a test")
                .and_then(|n| self.flow(n));
            let expect = self
                .required(&t, "expect", "a test")
                .and_then(|n| self.verdict_choice(n, "expect"));
            let rule = t.get("rule").and_then(|n| self.string(n, "rule"));
            if let (Some(name), Some(flow), Some(expect)) = (name, flow, expect) {
                out.push(PolicyTest {
                    name,
                    flow,
                    expect,
                    rule,
                    position: position(item),
                });
            }
        }
        out
    }

    fn flow(&mut self, node: &Node<'_>) -> Option<TestFlow> {
        let f = self.mapping(
            node,
            "a flow",
            Some(&["direction", "device", "user", "exe", "sha256", "to"]),
        )?;
        let direction = f
            .get("direction")
            .and_then(|n| {
                self.choice(n, "direction", &["outbound", "inbound"], |d| match d {
                    "outbound" => Some(Direction::Outbound),
                    "inbound" => Some(Direction::Inbound),
                    _ => None,
                })
            })
            .unwrap_or(Direction::Outbound);
        let device = self
            .required(&f, "device", "a flow")
            .and_then(|n| self.spiffe_id(n, "device", false));
        let user = f
            .get("user")
            .and_then(|n| self.string(n, "user"))
            .unwrap_or_default();
        let exe = f.get("exe").and_then(|n| self.path(n)).unwrap_or_default();
        let sha256 = f
            .get("sha256")
            .and_then(|n| self.sha256(n))
            .unwrap_or_default();
        let destination = self
            .required(&f, "to", "a flow")
            .and_then(|n| self.socket_address(n, "to"));
        Some(TestFlow {
            direction,
            device: device?,
            user,
            exe,
            sha256,
            destination: destination?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        parse(text)
            .expect_err("the policy should be refused")
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_yaml_syntax_error_has_its_position() {
        let e = errors("version: 1\nkind: baseline\nrules: [\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("4:1: not valid YAML"), "{e:?}");
    }

    #[test]
    fn unknown_keys_are_named_with_a_suggestion() {
        let e = errors(
            "version: 1\nkind: baseline\nrules:\n  - id: a\n    acton: deny\n    to: {addresses: [10.0.0.0/8]}\n",
        );
        assert!(
            e.contains(&"5:5: unknown key `acton` in a rule (hint: did you mean `action`?)".into()),
            "{e:?}"
        );
        assert!(e.contains(&"4:5: a rule needs `action`".into()), "{e:?}");
    }

    #[test]
    fn bad_values_point_at_the_value() {
        let e = errors(
            "version: 1\nkind: baseline\nrules:\n  - id: a\n    action: deny\n    to: {addresses: [10.0.0.1/8], ports: [0]}\n",
        );
        assert_eq!(
            e,
            vec![
                "6:22: `10.0.0.1/8` has host bits set (hint: write 10.0.0.0/8)".to_owned(),
                "6:43: a port must be a number from 1 to 65535 (hint: omit `ports` for every port)"
                    .to_owned(),
            ]
        );
    }

    #[test]
    fn duplicate_ids_name_the_first() {
        let e = errors(
            "version: 1\nkind: baseline\nrules:\n  - {id: a, action: deny, to: {addresses: [10.0.0.0/8]}}\n  - {id: a, action: allow, to: {addresses: [10.0.0.0/8]}}\n",
        );
        assert_eq!(
            e,
            vec!["5:6: rule id `a` is used twice (hint: the first is at 4:5)".to_owned()]
        );
    }

    #[test]
    fn an_empty_destination_list_is_an_error_not_a_dropped_rule() {
        let e = errors(
            "version: 1\nkind: baseline\nrules:\n  - {id: a, action: deny, to: {addresses: []}}\n",
        );
        assert_eq!(
            e,
            vec!["4:31: `to` names no destination (hint: add `services: [...]` or `addresses: [...]` (0.0.0.0/0 and ::/0 for everywhere))".to_owned()]
        );
    }

    #[test]
    fn an_organisation_layer_needs_its_org() {
        let e = errors("version: 1\nkind: organisation\n");
        assert_eq!(
            e,
            vec![
                "1:1: an organisation layer needs `org` (hint: write `org: <organisation id>`)"
                    .to_owned()
            ]
        );
    }

    #[test]
    fn a_full_document_parses() {
        let policy = parse(include_str!("../examples/baseline.yaml")).unwrap();
        assert_eq!(policy.kind, LayerKind::Baseline);
        assert!(!policy.rules.is_empty());
        assert!(policy.rules.windows(2).all(|w| w[0].id < w[1].id));
    }
}
