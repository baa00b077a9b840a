//! The gateway's access decision: which service a tunnelled connection's
//! original destination is, and whether its caller — device, user, process
//! — may reach it. Sans-IO: the same evaluation answers live connections,
//! re-checks them after a policy change or a revocation, and explains a
//! default denial with the rules that came nearest.

use std::{collections::BTreeSet, fmt::Write as _, net::SocketAddr};

use ipnet::IpNet;
use serde::Deserialize;
use zt_identity::SpiffeId;

/// How a service behaves when the control plane cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceClass {
    /// Not reachable around the gateway; new connections are refused while
    /// the gateway cannot confirm revocations (fail closed).
    #[default]
    Protected,
    /// Reachable while the control plane is away, every connection recorded
    /// (fail open, audited).
    Standard,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessAction {
    Allow,
    Deny,
}

/// A service this host serves through the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    /// The destinations callers use for it; empty: any.
    pub destinations: Vec<IpNet>,
    pub ports: BTreeSet<u16>,
    /// Where the gateway connects; `None`: the original destination.
    pub target: Option<SocketAddr>,
    pub class: ServiceClass,
}

impl Service {
    fn answers(&self, destination: SocketAddr) -> bool {
        self.ports.contains(&destination.port())
            && (self.destinations.is_empty()
                || self
                    .destinations
                    .iter()
                    .any(|net| net.contains(&destination.ip())))
    }

    /// Where a connection to `destination` is carried on to.
    pub fn target_for(&self, destination: SocketAddr) -> SocketAddr {
        self.target.unwrap_or(destination)
    }
}

/// Who may reach a service. Every non-empty condition must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRule {
    pub id: String,
    pub service: String,
    pub action: AccessAction,
    pub orgs: Vec<String>,
    pub devices: Vec<SpiffeId>,
    pub users: Vec<String>,
    pub exes: Vec<String>,
    /// Lowercase hex.
    pub exe_sha256: Vec<String>,
}

/// A tunnelled connection as the gateway sees it: the verified peer, and
/// what the peer's agent says about the calling process.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    pub device: &'a SpiffeId,
    pub user: &'a str,
    pub exe: &'a str,
    pub exe_sha256: &'a str,
    pub destination: SocketAddr,
}

/// What the gateway decided, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessDecision {
    pub allowed: bool,
    /// The deciding rule; `""` for the default (deny).
    pub rule_id: String,
    /// The matched service; `None`: the destination is no service here.
    pub service: Option<String>,
    pub class: ServiceClass,
    /// Where to connect when allowed.
    pub target: SocketAddr,
    /// For a default denial: each rule of the service and what did not
    /// match, nearest (fewest failed conditions) first.
    pub nearest: Vec<String>,
}

/// The gateway half of a policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayPolicy {
    version: u64,
    services: Vec<Service>,
    access: Vec<AccessRule>,
    /// A policy in the policy language: evaluated by the policy crate, the
    /// same evaluation `ztctl policy explain` uses.
    language: Option<std::sync::Arc<policy::PolicySet>>,
}

/// Nearest rules reported with a default denial at most.
const NEAREST_REPORTED: usize = 3;

impl GatewayPolicy {
    pub fn new(version: u64, services: Vec<Service>, access: Vec<AccessRule>) -> Self {
        Self {
            version,
            services,
            access,
            language: None,
        }
    }

    /// The gateway side of a policy in the policy language: the services
    /// whose gateway is `device`, decided by [`policy::PolicySet::evaluate`]
    /// on inbound flows.
    pub fn from_language(
        set: std::sync::Arc<policy::PolicySet>,
        device: &str,
        version: u64,
    ) -> Self {
        let services = set
            .services
            .values()
            .filter(|s| s.gateway.as_ref().is_some_and(|g| g.id == device))
            .map(|s| Service {
                name: s.service.name.clone(),
                destinations: s.service.addresses.clone(),
                ports: s.service.ports.clone(),
                target: s.service.target,
                class: match s.service.class {
                    policy::ServiceClass::Protected => ServiceClass::Protected,
                    policy::ServiceClass::Standard => ServiceClass::Standard,
                },
            })
            .collect();
        Self {
            version,
            services,
            access: Vec::new(),
            language: Some(set),
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// Whether this host serves anything through the tunnel.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The service a destination names: the one with the narrowest
    /// destination prefix that holds it (the compiler refuses two services
    /// claiming the same prefix and port).
    pub fn service_for(&self, destination: SocketAddr) -> Option<&Service> {
        self.services
            .iter()
            .filter(|s| s.answers(destination))
            .max_by_key(|s| {
                s.destinations
                    .iter()
                    .filter(|net| net.contains(&destination.ip()))
                    .map(|net| net.prefix_len())
                    .max()
            })
    }

    /// Decides a flow: a matching `deny` rule beats any `allow`; with
    /// neither, the default is to refuse.
    pub fn evaluate(&self, flow: &Flow<'_>) -> AccessDecision {
        if let Some(set) = &self.language {
            return self.evaluate_language(set, flow);
        }
        let Some(service) = self.service_for(flow.destination) else {
            return AccessDecision {
                allowed: false,
                rule_id: String::new(),
                service: None,
                class: ServiceClass::Protected,
                target: flow.destination,
                nearest: Vec::new(),
            };
        };
        let rules = || self.access.iter().filter(|r| r.service == service.name);
        let decided = |action| {
            rules()
                .filter(|r| r.action == action)
                .find(|r| mismatches(r, flow).is_empty())
        };
        let (allowed, rule) = match decided(AccessAction::Deny) {
            Some(rule) => (false, Some(rule)),
            None => match decided(AccessAction::Allow) {
                Some(rule) => (true, Some(rule)),
                None => (false, None),
            },
        };
        let nearest = if rule.is_none() {
            let mut candidates: Vec<(usize, String)> = rules()
                .filter(|r| r.action == AccessAction::Allow)
                .map(|r| {
                    let failed = mismatches(r, flow);
                    (failed.len(), format!("{}: {}", r.id, failed.join("; ")))
                })
                .collect();
            candidates.sort();
            candidates
                .into_iter()
                .take(NEAREST_REPORTED)
                .map(|(_, why)| why)
                .collect()
        } else {
            Vec::new()
        };
        AccessDecision {
            allowed,
            rule_id: rule.map(|r| r.id.clone()).unwrap_or_default(),
            service: Some(service.name.clone()),
            class: service.class,
            target: service.target_for(flow.destination),
            nearest,
        }
    }
}

/// The conditions of `rule` that `flow` does not meet, in words.
impl GatewayPolicy {
    /// A tunnelled connection for a service this gateway serves, decided
    /// by the policy language's evaluation (inbound).
    fn evaluate_language(&self, set: &policy::PolicySet, flow: &Flow<'_>) -> AccessDecision {
        let Some(service) = self.service_for(flow.destination) else {
            return AccessDecision {
                allowed: false,
                rule_id: String::new(),
                service: None,
                class: ServiceClass::Protected,
                target: flow.destination,
                nearest: Vec::new(),
            };
        };
        let device = flow.device.to_string();
        let decision = set.evaluate(&policy::Flow {
            direction: policy::Direction::Inbound,
            device: &device,
            user: flow.user,
            exe: flow.exe,
            exe_sha256: flow.exe_sha256,
            destination: flow.destination,
        });
        AccessDecision {
            allowed: decision.verdict == policy::Action::Allow,
            rule_id: if decision.rule == policy::eval::DEFAULT_RULE {
                String::new()
            } else {
                decision.rule.clone()
            },
            service: Some(service.name.clone()),
            // What the gateway does while the control plane is away follows
            // the policy's fail mode for the service's class.
            class: match set
                .services
                .get(&service.name)
                .map(|s| set.defaults.fail_mode(s.service.class))
            {
                Some(policy::FailMode::Open) => ServiceClass::Standard,
                _ => ServiceClass::Protected,
            },
            target: service.target_for(flow.destination),
            nearest: decision
                .nearest
                .iter()
                .map(|n| format!("{}: {}", n.rule, n.failed.join("; ")))
                .collect(),
        }
    }
}

fn mismatches(rule: &AccessRule, flow: &Flow<'_>) -> Vec<String> {
    let mut failed = Vec::new();
    if !rule.orgs.is_empty() && !rule.orgs.iter().any(|o| o == flow.device.org()) {
        failed.push(not_one_of("organisation", flow.device.org(), &rule.orgs));
    }
    if !rule.devices.is_empty() && !rule.devices.contains(flow.device) {
        failed.push(not_one_of(
            "device",
            &flow.device.to_string(),
            &rule.devices,
        ));
    }
    if !rule.users.is_empty() && !rule.users.iter().any(|u| u == flow.user) {
        failed.push(not_one_of("user", flow.user, &rule.users));
    }
    if !rule.exes.is_empty() && !rule.exes.iter().any(|e| e == flow.exe) {
        failed.push(not_one_of("executable", flow.exe, &rule.exes));
    }
    if !rule.exe_sha256.is_empty()
        && !rule
            .exe_sha256
            .iter()
            .any(|h| h.eq_ignore_ascii_case(flow.exe_sha256))
    {
        failed.push(not_one_of(
            "executable hash",
            flow.exe_sha256,
            &rule.exe_sha256,
        ));
    }
    failed
}

fn not_one_of<T: std::fmt::Display>(what: &str, value: &str, accepted: &[T]) -> String {
    let mut text = format!(
        "{what} {} is not one of [",
        if value.is_empty() { "(unknown)" } else { value }
    );
    for (i, item) in accepted.iter().enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        let _ = write!(text, "{item}");
    }
    text.push(']');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard_policy::compile;

    const POLICY: &str = r#"
        version = 9
        default = "allow"

        [[service]]
        name = "web"
        destinations = ["10.9.0.3"]
        ports = [8080]
        target = "127.0.0.1:18080"

        [[service]]
        name = "db"
        ports = [5432]
        class = "standard"

        [[access]]
        id = "staff-curl"
        service = "web"
        action = "allow"
        orgs = ["city"]
        users = ["alice"]
        exes = ["/usr/bin/curl"]

        [[access]]
        id = "no-kiosk"
        service = "web"
        action = "deny"
        devices = ["spiffe://pref.example/org/city/device/kiosk"]

        [[access]]
        id = "any-psql"
        service = "db"
        action = "allow"
        exes = ["/usr/bin/psql"]
    "#;

    fn device(name: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://pref.example/org/city/device/{name}")).unwrap()
    }

    fn flow<'a>(device: &'a SpiffeId, user: &'a str, exe: &'a str, to: &str) -> Flow<'a> {
        Flow {
            device,
            user,
            exe,
            exe_sha256: "",
            destination: to.parse().unwrap(),
        }
    }

    #[test]
    fn allows_the_named_caller_and_carries_it_to_the_target() {
        let policy = compile(POLICY).unwrap().gateway;
        let pc = device("pc1");
        let d = policy.evaluate(&flow(&pc, "alice", "/usr/bin/curl", "10.9.0.3:8080"));
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.rule_id, "staff-curl");
        assert_eq!(d.service.as_deref(), Some("web"));
        assert_eq!(d.target, "127.0.0.1:18080".parse().unwrap());
        assert_eq!(d.class, ServiceClass::Protected);
    }

    #[test]
    fn a_language_policy_decides_inbound_flows_with_its_fail_modes() {
        let set = policy::load(
            include_str!("../../policy/examples/baseline.yaml"),
            Some(include_str!("../../policy/examples/city-a.yaml")),
        )
        .unwrap();
        let set = std::sync::Arc::new(set);
        let ledger_gw = GatewayPolicy::from_language(
            set.clone(),
            "spiffe://pref.example/org/city-a/device/srv-gw",
            7,
        );
        assert_eq!(
            ledger_gw.services().len(),
            1,
            "only what this gateway fronts"
        );
        let fin = SpiffeId::parse("spiffe://pref.example/org/city-a/device/fin-07").unwrap();
        let d = ledger_gw.evaluate(&flow(&fin, "tanaka", "/usr/bin/curl", "10.30.0.10:443"));
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.rule_id, "ledger-for-finance");
        assert_eq!(d.target, "127.0.0.1:443".parse().unwrap());
        assert_eq!(d.class, ServiceClass::Protected, "protected fails closed");
        let d = ledger_gw.evaluate(&flow(&fin, "tanaka", "/usr/bin/wget", "10.30.0.10:443"));
        assert!(!d.allowed);
        assert_eq!(d.rule_id, "");
        assert!(
            d.nearest[0].starts_with("ledger-for-finance: binary /usr/bin/wget"),
            "{:?}",
            d.nearest
        );
        // Not a service of this gateway: refused as no service.
        let d = ledger_gw.evaluate(&flow(&fin, "tanaka", "/usr/bin/curl", "10.20.0.20:80"));
        assert!(!d.allowed && d.service.is_none());
        // The prefecture's gateway fronts the portal, a standard service
        // that fails open by the baseline's fail_mode.
        let dc_gw =
            GatewayPolicy::from_language(set, "spiffe://pref.example/org/pref/device/dc-gw1", 7);
        let d = dc_gw.evaluate(&flow(&fin, "kato", "/usr/bin/curl", "10.20.0.20:80"));
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.class, ServiceClass::Standard);
    }

    #[test]
    fn a_default_denial_names_the_nearest_rule_and_what_failed() {
        let policy = compile(POLICY).unwrap().gateway;
        let pc = device("pc1");
        let d = policy.evaluate(&flow(&pc, "alice", "/usr/bin/wget", "10.9.0.3:8080"));
        assert!(!d.allowed);
        assert_eq!(d.rule_id, "");
        assert_eq!(
            d.nearest,
            ["staff-curl: executable /usr/bin/wget is not one of [/usr/bin/curl]"]
        );
        let d = policy.evaluate(&flow(&pc, "bob", "", "10.9.0.3:8080"));
        assert_eq!(
            d.nearest,
            ["staff-curl: user bob is not one of [alice]; executable (unknown) is not one of [/usr/bin/curl]"]
        );
    }

    #[test]
    fn deny_beats_allow_and_unknown_destinations_are_no_service() {
        let policy = compile(POLICY).unwrap().gateway;
        let kiosk = device("kiosk");
        let d = policy.evaluate(&flow(&kiosk, "alice", "/usr/bin/curl", "10.9.0.3:8080"));
        assert!(!d.allowed);
        assert_eq!(d.rule_id, "no-kiosk");
        let pc = device("pc1");
        let d = policy.evaluate(&flow(&pc, "alice", "/usr/bin/curl", "10.9.0.4:8080"));
        assert_eq!((d.allowed, d.service), (false, None));
        // A service without destinations answers on any address.
        let d = policy.evaluate(&flow(&pc, "carol", "/usr/bin/psql", "[fd00::5]:5432"));
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.class, ServiceClass::Standard);
        assert_eq!(d.target, "[fd00::5]:5432".parse().unwrap());
    }

    #[test]
    fn other_organisations_do_not_match() {
        let policy = compile(POLICY).unwrap().gateway;
        let outsider = SpiffeId::parse("spiffe://pref.example/org/town/device/pc9").unwrap();
        let d = policy.evaluate(&flow(&outsider, "alice", "/usr/bin/curl", "10.9.0.3:8080"));
        assert!(!d.allowed);
        assert!(
            d.nearest[0].contains("organisation town is not one of [city]"),
            "{d:?}"
        );
    }
}
