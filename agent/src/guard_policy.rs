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
//! action = "deny"             # allow | deny | audit
//! destinations = ["169.254.169.254/32", "fd00:ec2::254"]
//! ports = [80]                # omit for every port
//! ```
//!
//! The most specific rule wins: the longest destination prefix, and for
//! equal prefixes a rule naming the port before one for every port. Rule
//! order in the file does not matter; two rules claiming the same prefix and
//! port are an error, as are unknown keys, bad addresses and host bits set
//! in a prefix.

use std::{collections::BTreeMap, net::IpAddr};

use agent_common::{
    GuardSettings, Verdict, VerdictAction, VerdictKey, VERDICTS_CAPACITY,
    VERDICT_KEY_ADDR_OFFSET_BITS,
};
use ipnet::IpNet;
use serde::Deserialize;

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

impl Action {
    fn kernel(self) -> VerdictAction {
        match self {
            Action::Allow => VerdictAction::Allow,
            Action::Deny => VerdictAction::Deny,
            Action::Audit => VerdictAction::Audit,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    id: String,
    action: Action,
    destinations: Vec<String>,
    #[serde(default)]
    ports: Vec<u16>,
}

/// A policy ready for the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub settings: GuardSettings,
    /// Rule ids by index (the index the kernel reports).
    pub rule_ids: Vec<String>,
    /// `(prefix length, key, verdict)` for the verdict map.
    pub entries: Vec<(u32, VerdictKey, Verdict)>,
}

impl CompiledPolicy {
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
}

/// Parses and compiles a policy file's text.
pub fn compile(text: &str) -> Result<CompiledPolicy, PolicyError> {
    let file: PolicyFile = toml::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?;
    let mut claimed: BTreeMap<(u32, VerdictKey), String> = BTreeMap::new();
    let mut entries = Vec::new();
    let mut rule_ids: Vec<String> = Vec::new();
    for (index, rule) in file.rules.iter().enumerate() {
        if rule.id.is_empty() {
            return Err(PolicyError::EmptyId);
        }
        if rule_ids.contains(&rule.id) {
            return Err(PolicyError::DuplicateId(rule.id.clone()));
        }
        rule_ids.push(rule.id.clone());
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
    Ok(CompiledPolicy {
        settings: GuardSettings {
            default_action: file.default.kernel() as u32,
            record_allows: u32::from(file.record_allows),
            policy_version: file.version,
        },
        rule_ids,
        entries,
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
