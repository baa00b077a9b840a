//! What a layer changes against the one in force, by name: rules, groups,
//! services, gateways, defaults, fail modes and detections. Rule order and
//! formatting are not changes.

use std::{collections::BTreeMap, fmt};

use policy::{Conditions, Destinations, Exceptions, Named, Policy, Rule};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    /// `added`, `removed` or `changed`.
    pub change: &'static str,
    /// `rule`, `group`, `service`, `gateway`, `defaults`, `fail_mode`,
    /// `detections`.
    pub what: &'static str,
    pub name: String,
    /// For a change: what differs, `field: old → new`.
    pub details: Vec<String>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = match self.change {
            "added" => '+',
            "removed" => '-',
            _ => '~',
        };
        write!(f, "{sign} {}", self.what)?;
        if !self.name.is_empty() {
            write!(f, " {}", self.name)?;
        }
        if !self.details.is_empty() {
            write!(f, ": {}", self.details.join("; "))?;
        }
        Ok(())
    }
}

fn names(list: &[Named]) -> String {
    let v: Vec<&str> = list.iter().map(|n| n.name.as_str()).collect();
    format!("[{}]", v.join(", "))
}

fn describe_from(c: &Conditions) -> String {
    format!(
        "devices {} users {} binaries {}",
        names(&c.devices),
        names(&c.users),
        names(&c.binaries)
    )
}

fn describe_to(d: &Destinations) -> String {
    let addresses: Vec<String> = d.addresses.iter().map(ToString::to_string).collect();
    let ports: Vec<String> = d.ports.iter().map(ToString::to_string).collect();
    format!(
        "services {} addresses [{}] ports [{}]",
        names(&d.services),
        addresses.join(", "),
        ports.join(", ")
    )
}

fn describe_except(e: &Exceptions) -> String {
    let addresses: Vec<String> = e.addresses.iter().map(ToString::to_string).collect();
    let ports: Vec<String> = e.ports.iter().map(ToString::to_string).collect();
    format!(
        "devices {} users {} binaries {} addresses [{}] ports [{}]",
        names(&e.devices),
        names(&e.users),
        names(&e.binaries),
        addresses.join(", "),
        ports.join(", ")
    )
}

fn rule_fields(r: &Rule) -> Vec<(&'static str, String)> {
    vec![
        ("action", r.action.to_string()),
        ("mode", format!("{:?}", r.mode).to_lowercase()),
        ("from", describe_from(&r.from)),
        ("to", describe_to(&r.to)),
        ("except", describe_except(&r.except)),
        ("description", r.description.clone().unwrap_or_default()),
    ]
}

fn compare<T>(
    out: &mut Vec<Change>,
    what: &'static str,
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
    fields: impl Fn(&T) -> Vec<(&'static str, String)>,
) {
    for (name, new_item) in new {
        match old.get(name) {
            None => out.push(Change {
                change: "added",
                what,
                name: name.clone(),
                details: Vec::new(),
            }),
            Some(old_item) => {
                let details: Vec<String> = fields(old_item)
                    .into_iter()
                    .zip(fields(new_item))
                    .filter(|((_, a), (_, b))| a != b)
                    .map(|((field, a), (_, b))| format!("{field}: {a} → {b}"))
                    .collect();
                if !details.is_empty() {
                    out.push(Change {
                        change: "changed",
                        what,
                        name: name.clone(),
                        details,
                    });
                }
            }
        }
    }
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        out.push(Change {
            change: "removed",
            what,
            name: name.clone(),
            details: Vec::new(),
        });
    }
}

/// The changes from `old` (none: the layer does not exist yet) to `new`.
pub fn diff(old: Option<&Policy>, new: &Policy) -> Vec<Change> {
    let empty = Policy {
        kind: new.kind,
        org: new.org.clone(),
        gateways: BTreeMap::new(),
        groups: BTreeMap::new(),
        services: BTreeMap::new(),
        rules: Vec::new(),
        defaults: Default::default(),
        fail_mode: Default::default(),
        detections: Default::default(),
        tests: Vec::new(),
    };
    let old = old.unwrap_or(&empty);
    let mut out = Vec::new();
    let rules = |p: &Policy| -> BTreeMap<String, Rule> {
        p.rules.iter().map(|r| (r.id.clone(), r.clone())).collect()
    };
    compare(&mut out, "rule", &rules(old), &rules(new), rule_fields);
    compare(&mut out, "group", &old.groups, &new.groups, |(g, _)| {
        vec![("members", format!("{g:?}"))]
    });
    compare(&mut out, "service", &old.services, &new.services, |s| {
        vec![
            ("addresses", format!("{:?}", s.addresses)),
            ("ports", format!("{:?}", s.ports)),
            (
                "gateway",
                s.gateway
                    .as_ref()
                    .map(|g| g.name.clone())
                    .unwrap_or_default(),
            ),
            (
                "target",
                s.target.map(|t| t.to_string()).unwrap_or_default(),
            ),
            ("class", s.class.as_str().to_owned()),
        ]
    });
    compare(&mut out, "gateway", &old.gateways, &new.gateways, |g| {
        vec![("id", g.id.clone()), ("address", g.address.to_string())]
    });
    let single = |what: &'static str, a: String, b: String, out: &mut Vec<Change>| {
        if a != b {
            out.push(Change {
                change: "changed",
                what,
                name: String::new(),
                details: vec![format!("{a} → {b}")],
            });
        }
    };
    fn shown<T: fmt::Debug>(value: Option<T>) -> String {
        value.map_or("unset".to_owned(), |v| format!("{v:?}").to_lowercase())
    }
    let defaults = |p: &Policy| {
        format!(
            "outbound {} inbound {} record_allows {}",
            shown(p.defaults.outbound),
            shown(p.defaults.inbound),
            shown(p.defaults.record_allows)
        )
    };
    single("defaults", defaults(old), defaults(new), &mut out);
    let fail = |p: &Policy| {
        format!(
            "protected {} standard {}",
            shown(p.fail_mode.protected),
            shown(p.fail_mode.standard)
        )
    };
    single("fail_mode", fail(old), fail(new), &mut out);
    let detections = |p: &Policy| {
        format!(
            "enable {:?} disable {:?}",
            p.detections.enable, p.detections.disable
        )
    };
    single("detections", detections(old), detections(new), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CITY_A: &str = include_str!("../../policy/examples/city-a.yaml");

    #[test]
    fn names_what_changed_and_ignores_order() {
        let old = policy::parse(CITY_A).unwrap();
        assert!(diff(Some(&old), &old).is_empty());
        let changed = CITY_A
            .replace("users: [finance], binaries: [browsers]", "users: [finance]")
            .replace(
                "defaults:\n  outbound: allow",
                "defaults:\n  outbound: deny",
            );
        let new = policy::parse(&changed).unwrap();
        let text: Vec<String> = diff(Some(&old), &new)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            vec![
                "~ rule ledger-for-finance: from: devices [finance-pcs] users [finance] binaries [browsers] → devices [finance-pcs] users [finance] binaries []".to_owned(),
                "~ defaults: outbound allow inbound unset record_allows unset → outbound deny inbound unset record_allows unset".to_owned(),
            ]
        );
        let all: Vec<Change> = diff(None, &new);
        assert!(all
            .iter()
            .all(|c| c.change == "added" || c.what == "defaults"));
        assert_eq!(all.iter().filter(|c| c.what == "rule").count(), 3);
    }
}
