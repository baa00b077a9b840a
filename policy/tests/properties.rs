//! Property tests over random policies and flows:
//! - the compiled kernel tables decide every outbound flow exactly as
//!   `evaluate` (and so `explain`) does;
//! - compilation is deterministic and independent of the order of rules
//!   and groups in the text.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use policy::{
    compile::{AgentTables, Target},
    Direction, Flow, PolicySet,
};
use proptest::prelude::*;

const PREFIXES: &[&str] = &[
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.3/32",
    "192.168.0.0/16",
    "::/0",
    "fd00::/8",
    "fd00::5/128",
];
const PORTS: &[u16] = &[22, 80, 443, 445];
const USERS: &[(&str, u32)] = &[
    ("alice", 1000),
    ("bob", 1001),
    ("carol", 1002),
    ("dave", 1003),
];
const BINARIES: &[&str] = &["/usr/bin/curl", "/usr/bin/nc", "/usr/bin/ssh"];
const DEVICE_PATTERNS: &[&str] = &[
    "spiffe://pref.example/org/a/device/*",
    "spiffe://pref.example/org/a/device/pc-1",
    "spiffe://pref.example/org/b/device/*",
];
const DEVICES: &[&str] = &[
    "spiffe://pref.example/org/a/device/pc-1",
    "spiffe://pref.example/org/a/device/pc-2",
    "spiffe://pref.example/org/b/device/x",
];
const DESTINATIONS: &[&str] = &[
    "10.1.2.3",
    "10.1.2.4",
    "10.1.9.9",
    "10.9.9.9",
    "192.168.1.1",
    "8.8.8.8",
    "fd00::5",
    "fd00::6",
    "2001:db8::1",
];
const FLOW_PORTS: &[u16] = &[22, 80, 443, 445, 8080];

#[derive(Debug, Clone)]
struct RuleSpec {
    action: usize,
    dry_run: bool,
    to_service: bool,
    addresses: Vec<usize>,
    ports: Vec<usize>,
    devices: Vec<usize>,
    users: Vec<usize>,
    binaries: Vec<usize>,
    except_users: Vec<usize>,
    except_binaries: Vec<usize>,
    except_addresses: Vec<usize>,
}

#[derive(Debug, Clone)]
struct PolicySpec {
    user_groups: Vec<Vec<usize>>,
    binary_groups: Vec<Vec<usize>>,
    service_addresses: Vec<usize>,
    service_ports: Vec<usize>,
    rules: Vec<RuleSpec>,
    default_deny: bool,
}

fn subset(len: usize, max: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::sample::subsequence((0..len).collect::<Vec<_>>(), 0..=max)
}

fn rule_spec() -> impl Strategy<Value = RuleSpec> {
    (
        (
            0usize..3,
            proptest::bool::weighted(0.2),
            proptest::bool::weighted(0.3),
        ),
        (subset(PREFIXES.len(), 3), subset(PORTS.len(), 2)),
        (subset(3, 1), subset(3, 2), subset(3, 2)),
        (subset(3, 1), subset(3, 1), subset(PREFIXES.len(), 1)),
    )
        .prop_map(
            |(
                (action, dry_run, to_service),
                (addresses, ports),
                (devices, users, binaries),
                (eu, eb, ea),
            )| RuleSpec {
                action,
                dry_run,
                to_service,
                addresses,
                ports,
                devices,
                users,
                binaries,
                except_users: eu,
                except_binaries: eb,
                except_addresses: ea,
            },
        )
}

fn policy_spec() -> impl Strategy<Value = PolicySpec> {
    (
        proptest::collection::vec(subset(USERS.len(), 3), 3),
        proptest::collection::vec(subset(BINARIES.len(), 2), 3),
        subset(PREFIXES.len(), 2),
        subset(PORTS.len(), 2),
        proptest::collection::vec(rule_spec(), 1..10),
        any::<bool>(),
    )
        .prop_map(
            |(user_groups, binary_groups, sa, sp, rules, default_deny)| PolicySpec {
                user_groups,
                binary_groups,
                service_addresses: sa,
                service_ports: sp,
                rules,
                default_deny,
            },
        )
}

fn list(items: impl IntoIterator<Item = String>) -> String {
    format!("[{}]", items.into_iter().collect::<Vec<_>>().join(", "))
}

/// The YAML text of a spec, rules (and groups) in the order given.
fn text(spec: &PolicySpec, rule_order: &[usize], reverse_groups: bool) -> String {
    let mut out = String::from("version: 1\nkind: baseline\n");
    out +=
        "gateways:\n  gw: {id: spiffe://pref.example/org/a/device/gw, address: 10.200.0.1:4433}\n";
    let mut groups: Vec<String> = Vec::new();
    for (i, members) in spec.user_groups.iter().enumerate() {
        groups.push(format!(
            "    u{i}: {}\n",
            list(members.iter().map(|&m| USERS[m].0.to_owned()))
        ));
    }
    let mut binaries: Vec<String> = Vec::new();
    for (i, members) in spec.binary_groups.iter().enumerate() {
        binaries.push(format!(
            "    b{i}: {}\n",
            list(
                members
                    .iter()
                    .map(|&m| format!("{{path: {}}}", BINARIES[m]))
            )
        ));
    }
    let mut devices: Vec<String> = DEVICE_PATTERNS
        .iter()
        .enumerate()
        .map(|(i, p)| format!("    d{i}: [\"{p}\"]\n"))
        .collect();
    if reverse_groups {
        groups.reverse();
        binaries.reverse();
        devices.reverse();
    }
    out += "groups:\n  users:\n";
    out += &groups.concat();
    out += "  binaries:\n";
    out += &binaries.concat();
    out += "  devices:\n";
    out += &devices.concat();
    let service = !spec.service_addresses.is_empty() && !spec.service_ports.is_empty();
    if service {
        out += &format!(
            "services:\n  svc:\n    addresses: {}\n    ports: {}\n    gateway: gw\n    class: standard\n",
            list(spec.service_addresses.iter().map(|&a| format!("\"{}\"", PREFIXES[a]))),
            list(spec.service_ports.iter().map(|&p| PORTS[p].to_string())),
        );
    }
    out += &format!(
        "defaults: {{outbound: {}}}\nrules:\n",
        if spec.default_deny { "deny" } else { "allow" }
    );
    for &i in rule_order {
        let r = &spec.rules[i];
        let mut action = ["allow", "tunnel", "deny"][r.action];
        let mut to = Vec::new();
        if service && (r.to_service || action == "tunnel") {
            to.push("services: [svc]".to_owned());
        } else if action == "tunnel" {
            action = "deny";
        }
        if !(service && action == "tunnel") && (!r.addresses.is_empty() || to.is_empty()) {
            let addresses = if r.addresses.is_empty() {
                vec![0]
            } else {
                r.addresses.clone()
            };
            to.push(format!(
                "addresses: {}",
                list(addresses.iter().map(|&a| format!("\"{}\"", PREFIXES[a])))
            ));
            if !r.ports.is_empty() {
                to.push(format!(
                    "ports: {}",
                    list(r.ports.iter().map(|&p| PORTS[p].to_string()))
                ));
            }
        }
        let mut from = Vec::new();
        if !r.devices.is_empty() {
            from.push(format!(
                "devices: {}",
                list(r.devices.iter().map(|d| format!("d{d}")))
            ));
        }
        if !r.users.is_empty() {
            from.push(format!(
                "users: {}",
                list(r.users.iter().map(|u| format!("u{u}")))
            ));
        }
        if !r.binaries.is_empty() {
            from.push(format!(
                "binaries: {}",
                list(r.binaries.iter().map(|b| format!("b{b}")))
            ));
        }
        let mut except = Vec::new();
        if !r.except_users.is_empty() {
            except.push(format!(
                "users: {}",
                list(r.except_users.iter().map(|u| format!("u{u}")))
            ));
        }
        if !r.except_binaries.is_empty() {
            except.push(format!(
                "binaries: {}",
                list(r.except_binaries.iter().map(|b| format!("b{b}")))
            ));
        }
        if !r.except_addresses.is_empty() {
            except.push(format!(
                "addresses: {}",
                list(
                    r.except_addresses
                        .iter()
                        .map(|&a| format!("\"{}\"", PREFIXES[a]))
                )
            ));
        }
        out += &format!(
            "  - id: r{i}\n    action: {action}\n    mode: {}\n    to: {{{}}}\n",
            if r.dry_run { "dry-run" } else { "enforce" },
            to.join(", ")
        );
        if !from.is_empty() {
            out += &format!("    from: {{{}}}\n", from.join(", "));
        }
        if !except.is_empty() {
            out += &format!("    except: {{{}}}\n", except.join(", "));
        }
    }
    out
}

fn link(text: &str) -> PolicySet {
    match policy::load(text, None) {
        Ok(set) => set,
        Err(e) => panic!("generated policy refused: {e}\n{text}"),
    }
}

fn uid_of(name: &str) -> Option<u32> {
    USERS.iter().find(|(n, _)| *n == name).map(|(_, uid)| *uid)
}

fn compile(set: &PolicySet, device: &str) -> AgentTables {
    set.compile(&Target {
        device,
        uid_of: &uid_of,
    })
    .expect("compiles")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn the_kernel_tables_decide_as_explain_does(
        spec in policy_spec(),
        flows in proptest::collection::vec(
            (0..DEVICES.len(), 0..USERS.len() + 1, 0..BINARIES.len() + 1, 0..DESTINATIONS.len(), 0..FLOW_PORTS.len()),
            1..40,
        ),
    ) {
        let order: Vec<usize> = (0..spec.rules.len()).collect();
        let policy_text = text(&spec, &order, false);
        let set = link(&policy_text);
        for (device, user, exe, to, port) in flows {
            let tables = compile(&set, DEVICES[device]);
            let user = USERS.get(user).map_or("nobody", |u| u.0);
            let exe = BINARIES.get(exe).copied().unwrap_or("/usr/bin/other");
            let destination = std::net::SocketAddr::new(DESTINATIONS[to].parse().unwrap(), FLOW_PORTS[port]);
            let flow = Flow {
                direction: Direction::Outbound,
                device: DEVICES[device],
                user,
                exe,
                exe_sha256: "",
                destination,
            };
            let decision = set.evaluate(&flow);
            let user_bits = uid_of(user).map_or(0, |uid| tables.user_bits(uid));
            let kernel = tables.lookup(destination, user_bits, tables.binary_bits(exe, ""));
            prop_assert_eq!(
                kernel,
                tables.expected(&decision),
                "flow {:?}\ndecision {:?}\npolicy:\n{}\ntables: {:#?}",
                flow, decision, policy_text, tables
            );
        }
    }

    #[test]
    fn compilation_is_deterministic_and_order_independent(
        (spec, order) in policy_spec().prop_flat_map(|spec| {
            let order: Vec<usize> = (0..spec.rules.len()).collect();
            (Just(spec), Just(order).prop_shuffle())
        }),
        device in 0..DEVICES.len(),
    ) {
        let natural: Vec<usize> = (0..spec.rules.len()).collect();
        let first = compile(&link(&text(&spec, &natural, false)), DEVICES[device]);
        let again = compile(&link(&text(&spec, &natural, false)), DEVICES[device]);
        let shuffled = compile(&link(&text(&spec, &order, true)), DEVICES[device]);
        prop_assert_eq!(&first, &again);
        prop_assert_eq!(&first, &shuffled);
        prop_assert_eq!(
            serde_json::to_string(&first).unwrap(),
            serde_json::to_string(&shuffled).unwrap()
        );
    }
}
