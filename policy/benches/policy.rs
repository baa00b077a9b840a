//! The policy pipeline at the scale of a large prefecture: a generated
//! 10,000-rule baseline, parsed and linked, compiled for one device,
//! explained, looked up in the compiled tables, and signed and verified as
//! a bundle.
//!
//! Before the benchmarks run, the sizes of what was generated and compiled
//! are printed to stderr once (rules, kernel verdict-map entries, chains).
//!
//! `kernel_lookup` measures [`AgentTables::lookup`], the Rust model of the
//! kernel's lookup: a linear scan over every entry, not the kernel's LPM
//! trie. It says what `ztctl` and the property tests pay, not what a
//! connection pays in the kernel.

use std::{hint::black_box, net::SocketAddr};

use criterion::{BenchmarkId, Criterion};
use policy::{
    bundle::{self, Bundle, SigningKey},
    compile::{AgentTables, EntryTarget, Target},
    Action, Direction, Flow, PolicySet,
};

/// Rules in the generated baseline.
const RULES: usize = 10_000;
const USERS: usize = 60;
const USER_GROUPS: usize = 20;
/// `bin-0` is the remote shells; `bin-1`..`bin-9` are applications.
const BINARY_GROUPS: usize = 10;
const DEVICE_GROUPS: usize = 10;
const GATEWAYS: usize = 6;
const SERVICES: usize = 100;
/// Services `0..GATEWAY_SERVICES` are behind a gateway and reached by
/// tunnel; the others are allowed directly.
const GATEWAY_SERVICES: usize = 60;
const TUNNEL_RULES_PER_SERVICE: usize = 16;
const ALLOW_RULES_PER_SERVICE: usize = 10;
/// /24s allowed to some user groups, `ALLOW_RULES_PER_NET` rules each.
const ALLOW_NETS: usize = 1000;
const ALLOW_RULES_PER_NET: usize = 3;
const DRY_RUN_RULES: usize = 500;
const BROAD_RULES: usize = 4;
/// What is left of `RULES`: deny rules to /32s on named ports.
const DENY_RULES: usize = RULES
    - BROAD_RULES
    - GATEWAY_SERVICES * TUNNEL_RULES_PER_SERVICE
    - (SERVICES - GATEWAY_SERVICES) * ALLOW_RULES_PER_SERVICE
    - ALLOW_NETS * ALLOW_RULES_PER_NET
    - DRY_RUN_RULES;
const DENY_PORTS: [u16; 7] = [22, 23, 135, 139, 3389, 5900, 8080];

/// The device the tables are compiled for (in device group `city-03`).
const DEVICE: &str = "spiffe://pref.example/org/city-03/device/pc-0001";
/// A destination no rule names, on a port no broad rule names: its flows
/// end at the default.
const UNLISTED: &str = "198.51.100.7:443";
const STRANGER: &str = "user-999";
const UNKNOWN_EXE: &str = "/usr/bin/curl";

/// The kernel's verdict-map entry: an LPM key (4-byte prefix length and the
/// 20-byte `agent_common::VerdictKey`: port, family, 16-byte address) and
/// an 8-byte `agent_common::Verdict` (action, rule index).
const KERNEL_KEY_BYTES: usize = 4 + 20;
const KERNEL_VALUE_BYTES: usize = 8;

fn user(n: usize) -> String {
    format!("user-{n:03}")
}

/// Users of group `g-NN`: six, overlapping with the neighbouring groups.
fn group_members(group: usize) -> impl Iterator<Item = usize> {
    (0..6).map(move |m| (group * 3 + m) % USERS)
}

fn uid_of(name: &str) -> Option<u32> {
    let n: u32 = name.strip_prefix("user-")?.parse().ok()?;
    (n < USERS as u32).then_some(2000 + n)
}

fn binary_paths(group: usize) -> Vec<String> {
    if group == 0 {
        ["/usr/bin/nc", "/usr/bin/ncat", "/usr/bin/socat"]
            .map(str::to_owned)
            .to_vec()
    } else {
        vec![
            format!("/usr/bin/app-{group}"),
            format!("/opt/app-{group}/bin/app-{group}"),
        ]
    }
}

/// One address of service `k` (the one flows go to).
fn service_address(k: usize) -> String {
    if k.is_multiple_of(3) {
        format!("10.21.{k}.10")
    } else {
        format!("10.20.{k}.10")
    }
}

/// Service `k`'s prefix: a /24 for every third service, else a /32.
fn service_net(k: usize) -> String {
    if k.is_multiple_of(3) {
        format!("10.21.{k}.0/24")
    } else {
        format!("10.20.{k}.10/32")
    }
}

fn service_ports(k: usize) -> Vec<u16> {
    let mut ports = vec![443];
    if k % 2 == 1 {
        ports.push(8443);
    }
    if k.is_multiple_of(5) {
        ports.push(5432);
    }
    ports
}

/// The conditions of tunnel rule `j` of service `k`: user groups, binary
/// group, device group.
fn tunnel_conditions(k: usize, j: usize) -> (Vec<usize>, usize, Option<usize>) {
    let mut users = vec![(k + j) % USER_GROUPS];
    if j.is_multiple_of(5) {
        users.push((k + j + 10) % USER_GROUPS);
    }
    let binary = 1 + (k + j) % (BINARY_GROUPS - 1);
    let device = j.is_multiple_of(3).then_some((k + j) % DEVICE_GROUPS);
    (users, binary, device)
}

/// The second and third octets of allowed /24 number `n`.
fn allow_net(n: usize) -> (usize, usize) {
    (150 + n / 250, n % 250)
}

fn list<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("[{}]", items.join(", "))
}

fn groups(prefix: &str, indexes: &[usize]) -> String {
    list(indexes.iter().map(|i| format!("{prefix}-{i:02}")))
}

/// One rule as YAML; `to`, `from` and `except` are flow mappings' contents.
fn rule(
    out: &mut String,
    id: &str,
    action: &str,
    dry_run: bool,
    to: &str,
    from: &[String],
    except: &[String],
) {
    *out += &format!("  - id: {id}\n    action: {action}\n");
    if dry_run {
        *out += "    mode: dry-run\n";
    }
    *out += &format!("    to: {{{to}}}\n");
    if !from.is_empty() {
        *out += &format!("    from: {{{}}}\n", from.join(", "));
    }
    if !except.is_empty() {
        *out += &format!("    except: {{{}}}\n", except.join(", "));
    }
}

/// The text of a realistic 10,000-rule baseline.
fn baseline_text() -> String {
    let mut out = String::from(
        "# Generated by policy/benches/policy.rs: a large prefecture's baseline.\nversion: 1\nkind: baseline\n\ngateways:\n",
    );
    for g in 0..GATEWAYS {
        out += &format!("  gw-{g}: {{id: spiffe://pref.example/org/pref/device/gw-{g}, address: 10.0.{g}.2:4433}}\n");
    }
    out += "\ngroups:\n  devices:\n";
    for d in 0..DEVICE_GROUPS {
        out += &format!("    city-{d:02}: [\"spiffe://pref.example/org/city-{d:02}/device/*\"]\n");
    }
    out += "  users:\n";
    for g in 0..USER_GROUPS {
        out += &format!("    g-{g:02}: {}\n", list(group_members(g).map(user)));
    }
    out += "  binaries:\n";
    for b in 0..BINARY_GROUPS {
        out += &format!(
            "    bin-{b:02}: {}\n",
            list(binary_paths(b).iter().map(|p| format!("{{path: {p}}}")))
        );
    }

    out += "\nservices:\n";
    for k in 0..SERVICES {
        out += &format!(
            "  svc-{k:03}:\n    addresses: [{}]\n    ports: {}\n",
            service_net(k),
            list(service_ports(k))
        );
        if k < GATEWAY_SERVICES {
            out += &format!("    gateway: gw-{}\n", k % GATEWAYS);
            if k.is_multiple_of(4) {
                out += "    target: 127.0.0.1:8443\n    class: protected\n";
            } else {
                out += "    class: standard\n";
            }
        } else {
            out += "    class: standard\n";
        }
    }

    out += "\nrules:\n";
    let start = out.len();
    // Broad rules, as every baseline has.
    rule(
        &mut out,
        "no-cloud-metadata",
        "deny",
        false,
        "addresses: [169.254.169.254/32, \"fd00:ec2::254/128\"]",
        &[],
        &[],
    );
    rule(
        &mut out,
        "no-remote-shell-tools",
        "deny",
        false,
        "addresses: [0.0.0.0/0, \"::/0\"]",
        &["binaries: [bin-00]".into()],
        &["addresses: [127.0.0.0/8, \"::1/128\"]".into()],
    );
    rule(
        &mut out,
        "trial-block-smb",
        "deny",
        true,
        "addresses: [0.0.0.0/0], ports: [445]",
        &[],
        &[],
    );
    rule(
        &mut out,
        "no-telnet-but-admins",
        "deny",
        false,
        "addresses: [0.0.0.0/0, \"::/0\"], ports: [23]",
        &[],
        &["users: [g-00]".into()],
    );
    // Tunnels to the services behind gateways: users and binaries decide.
    for k in 0..GATEWAY_SERVICES {
        for j in 0..TUNNEL_RULES_PER_SERVICE {
            let (users, binary, device) = tunnel_conditions(k, j);
            let mut from = vec![
                format!("users: {}", groups("g", &users)),
                format!("binaries: {}", groups("bin", &[binary])),
            ];
            if let Some(d) = device {
                from.push(format!("devices: {}", groups("city", &[d])));
            }
            rule(
                &mut out,
                &format!("svc-{k:03}-tunnel-{j:02}"),
                "tunnel",
                j == TUNNEL_RULES_PER_SERVICE - 1,
                &format!("services: [svc-{k:03}]"),
                &from,
                &[],
            );
        }
    }
    // Direct services, allowed to user groups.
    for k in GATEWAY_SERVICES..SERVICES {
        for j in 0..ALLOW_RULES_PER_SERVICE {
            let mut from = vec![format!(
                "users: {}",
                groups("g", &[(k * 3 + j) % USER_GROUPS])
            )];
            if j.is_multiple_of(4) {
                from.push(format!("binaries: {}", groups("bin", &[1 + (k + j) % 9])));
            }
            let except = if j == ALLOW_RULES_PER_SERVICE - 1 {
                vec![format!("users: {}", groups("g", &[(k + 1) % USER_GROUPS]))]
            } else {
                Vec::new()
            };
            rule(
                &mut out,
                &format!("svc-{k:03}-allow-{j:02}"),
                "allow",
                false,
                &format!("services: [svc-{k:03}]"),
                &from,
                &except,
            );
        }
    }
    // Subnets allowed to user groups, some on web ports only.
    for n in 0..ALLOW_NETS {
        let (b, c) = allow_net(n);
        for j in 0..ALLOW_RULES_PER_NET {
            let mut to = format!("addresses: [10.{b}.{c}.0/24]");
            if (n + j).is_multiple_of(4) {
                to += ", ports: [80, 443]";
            }
            let mut from = vec![format!(
                "users: {}",
                groups("g", &[(n + 7 * j) % USER_GROUPS])
            )];
            if j == 2 && n.is_multiple_of(10) {
                from.push(format!("binaries: {}", groups("bin", &[1 + n % 9])));
            }
            if j == 1 && n.is_multiple_of(5) {
                from.push(format!("devices: {}", groups("city", &[n % DEVICE_GROUPS])));
            }
            let mut except = Vec::new();
            if j == 0 && n.is_multiple_of(25) {
                except.push(format!("addresses: [10.{b}.{c}.128/25]"));
            }
            if j == 1 && n % 10 == 3 {
                except.push(format!("binaries: {}", groups("bin", &[1 + (n + 4) % 9])));
            }
            rule(
                &mut out,
                &format!("net-{n:04}-allow-{j}"),
                "allow",
                false,
                &to,
                &from,
                &except,
            );
        }
    }
    // Denials on trial: RDP to one host of an allowed subnet.
    for d in 0..DRY_RUN_RULES {
        let (b, c) = allow_net(d * 2);
        let from = if d.is_multiple_of(3) {
            vec![format!("users: {}", groups("g", &[d % USER_GROUPS]))]
        } else {
            Vec::new()
        };
        rule(
            &mut out,
            &format!("trial-{d:04}"),
            "deny",
            true,
            &format!("addresses: [10.{b}.{c}.200/32], ports: [3389]"),
            &from,
            &[],
        );
    }
    // Blocked hosts on named ports; every eighth inside an allowed subnet.
    for i in 0..DENY_RULES {
        let address = if i.is_multiple_of(8) {
            let (b, c) = allow_net((i / 8) % ALLOW_NETS);
            format!("10.{b}.{c}.50/32")
        } else {
            format!("10.{}.{}.{}/32", 100 + i / 250, i % 250, 10 + i % 97)
        };
        let mut ports = vec![DENY_PORTS[i % DENY_PORTS.len()]];
        if i.is_multiple_of(3) {
            ports.push(DENY_PORTS[(i + 3) % DENY_PORTS.len()]);
        }
        let mut from = Vec::new();
        if i.is_multiple_of(6) {
            from.push(format!("devices: {}", groups("city", &[i % DEVICE_GROUPS])));
        }
        let mut except = Vec::new();
        if i.is_multiple_of(10) {
            except.push("users: [g-00]".to_owned());
        }
        if i % 50 == 5 {
            except.push(format!("devices: {}", groups("city", &[i % DEVICE_GROUPS])));
        }
        if i % 40 == 7 {
            except.push(format!("binaries: {}", groups("bin", &[1 + i % 9])));
        }
        rule(
            &mut out,
            &format!("block-{i:05}"),
            "deny",
            false,
            &format!("addresses: [{address}], ports: {}", list(ports)),
            &from,
            &except,
        );
    }
    assert_eq!(out[start..].matches("\n  - id: ").count() + 1, RULES);

    let (member, exe, to) = tunnelled();
    out += &format!(
        "\ndefaults:\n  outbound: allow\n  inbound: deny\n\ntests:\n  \
         - name: a member reaches its service through the gateway\n    \
         flow: {{device: {DEVICE}, user: {member}, exe: {exe}, to: {to}}}\n    expect: tunnel\n  \
         - name: an unlisted destination falls to the default\n    \
         flow: {{device: {DEVICE}, user: {STRANGER}, exe: {UNKNOWN_EXE}, to: {UNLISTED}}}\n    \
         expect: allow\n    rule: default\n"
    );
    out
}

/// A flow one tunnel rule (service 1, rule 1: no device condition) covers:
/// user, executable, destination.
fn tunnelled() -> (String, String, String) {
    let (users, binary, device) = tunnel_conditions(1, 1);
    assert_eq!(device, None);
    let member = group_members(users[0]).next().map(user).unwrap_or_default();
    let exe = binary_paths(binary).swap_remove(0);
    (member, exe, format!("{}:443", service_address(1)))
}

struct Fixture {
    text: String,
    set: PolicySet,
    tables: AgentTables,
    member: String,
    exe: String,
    tunnel_to: SocketAddr,
    unlisted: SocketAddr,
}

fn parse_addr(text: &str) -> SocketAddr {
    match text.parse() {
        Ok(a) => a,
        Err(e) => panic!("{text}: {e}"),
    }
}

fn target() -> Target<'static> {
    Target {
        device: DEVICE,
        uid_of: &uid_of,
    }
}

fn flow<'a>(user: &'a str, exe: &'a str, destination: SocketAddr) -> Flow<'a> {
    Flow {
        direction: Direction::Outbound,
        device: DEVICE,
        user,
        exe,
        exe_sha256: "",
        destination,
    }
}

impl Fixture {
    fn new() -> Self {
        let text = baseline_text();
        let set = match policy::load(&text, None) {
            Ok(set) => set,
            Err(e) => panic!("the generated policy does not load: {e}"),
        };
        assert_eq!(set.rules.len(), RULES);
        let tables = match set.compile(&target()) {
            Ok(t) => t,
            Err(e) => panic!("the generated policy does not compile: {e}"),
        };
        let (member, exe, to) = tunnelled();
        let fixture = Fixture {
            text,
            set,
            tables,
            member,
            exe,
            tunnel_to: parse_addr(&to),
            unlisted: parse_addr(UNLISTED),
        };
        // The flows measured decide as intended, and the tables agree.
        let matched = fixture.set.evaluate(&fixture.matched_flow());
        assert_eq!(matched.verdict, Action::Tunnel, "{}", matched.summary());
        let default = fixture.set.evaluate(&fixture.default_flow());
        assert_eq!(default.rule, "default", "{}", default.summary());
        assert!(!default.nearest.is_empty());
        for (decision, user, exe, to) in [
            (
                &matched,
                fixture.member.as_str(),
                fixture.exe.as_str(),
                fixture.tunnel_to,
            ),
            (&default, STRANGER, UNKNOWN_EXE, fixture.unlisted),
        ] {
            let kernel = fixture.lookup(user, exe, to);
            assert_eq!(
                kernel,
                fixture.tables.expected(decision),
                "{}",
                decision.summary()
            );
        }
        fixture
    }

    fn matched_flow(&self) -> Flow<'_> {
        flow(&self.member, &self.exe, self.tunnel_to)
    }

    fn default_flow(&self) -> Flow<'_> {
        flow(STRANGER, UNKNOWN_EXE, self.unlisted)
    }

    fn lookup(&self, user: &str, exe: &str, to: SocketAddr) -> policy::compile::KernelVerdict {
        let user_bits = uid_of(user).map_or(0, |uid| self.tables.user_bits(uid));
        self.tables
            .lookup(to, user_bits, self.tables.binary_bits(exe, ""))
    }

    fn report(&self) {
        let t = &self.tables;
        let port_entries = t.entries.iter().filter(|e| e.port != 0).count();
        let chain_entries = t
            .entries
            .iter()
            .filter(|e| matches!(e.target, EntryTarget::Chain(_)))
            .count();
        let candidates: usize = t.chains.iter().map(|c| c.candidates.len()).sum();
        let longest = t
            .chains
            .iter()
            .map(|c| c.candidates.len())
            .max()
            .unwrap_or(0);
        let entry_bytes = KERNEL_KEY_BYTES + KERNEL_VALUE_BYTES;
        eprintln!("policy bench: generated baseline for {DEVICE}");
        eprintln!("  text:                {} bytes", self.text.len());
        eprintln!(
            "  rules:               {} ({} without a device condition or for city-03)",
            self.set.rules.len(),
            self.set
                .rules
                .iter()
                .filter(|r| r.devices.is_empty()
                    || r.devices
                        .iter()
                        .any(|&g| self.set.groups[g].name == "city-03"))
                .count()
        );
        eprintln!(
            "  groups:              {} user, {} binary used in conditions (limit 64 each)",
            t.user_groups.len(),
            t.binary_bits.len()
        );
        eprintln!(
            "  verdict-map entries: {} ({} on a named port, {} every-port; {} lead to a chain)",
            t.entries.len(),
            port_entries,
            t.entries.len() - port_entries,
            chain_entries
        );
        eprintln!(
            "  kernel map estimate: {} entries x ({KERNEL_KEY_BYTES}-byte key + {KERNEL_VALUE_BYTES}-byte value) = {} bytes ({:.1} KiB), before the trie's own per-node overhead",
            t.entries.len(),
            t.entries.len() * entry_bytes,
            (t.entries.len() * entry_bytes) as f64 / 1024.0
        );
        eprintln!(
            "  chains:              {} distinct, {} candidates in all, longest {} (limit 32)",
            t.chains.len(),
            candidates,
            longest
        );
        eprintln!("  uids with group bits: {}", t.uid_bits.len());
        let signed = signing_key().sign(&the_bundle(&self.text));
        eprintln!("  signed bundle JSON:  {} bytes", signed.to_json().len());
    }
}

fn bench_parse_and_link(c: &mut Criterion, f: &Fixture) {
    let mut group = c.benchmark_group("parse_and_link");
    group.sample_size(10);
    group.bench_function("10k_rules", |b| {
        b.iter(|| policy::load(black_box(&f.text), None))
    });
    group.finish();
}

fn bench_compile(c: &mut Criterion, f: &Fixture) {
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    let target = target();
    group.bench_function("10k_rules", |b| {
        b.iter(|| black_box(&f.set).compile(&target))
    });
    group.finish();
}

fn bench_explain(c: &mut Criterion, f: &Fixture) {
    let mut group = c.benchmark_group("explain");
    group.sample_size(20);
    let default = f.default_flow();
    group.bench_with_input(
        BenchmarkId::new("10k_rules", "default"),
        &default,
        |b, flow| b.iter(|| f.set.evaluate(black_box(flow))),
    );
    let matched = f.matched_flow();
    group.bench_with_input(
        BenchmarkId::new("10k_rules", "matched"),
        &matched,
        |b, flow| b.iter(|| f.set.evaluate(black_box(flow))),
    );
    group.finish();
}

fn bench_kernel_lookup(c: &mut Criterion, f: &Fixture) {
    let mut group = c.benchmark_group("kernel_lookup");
    let user_bits = uid_of(&f.member).map_or(0, |uid| f.tables.user_bits(uid));
    let binary_bits = f.tables.binary_bits(&f.exe, "");
    group.bench_function(BenchmarkId::new("10k_rules", "chain"), |b| {
        b.iter(|| {
            f.tables
                .lookup(black_box(f.tunnel_to), user_bits, binary_bits)
        })
    });
    group.bench_function(BenchmarkId::new("10k_rules", "default"), |b| {
        b.iter(|| f.tables.lookup(black_box(f.unlisted), 0, 0))
    });
    group.finish();
}

fn the_bundle(text: &str) -> Bundle {
    Bundle {
        serial: 42,
        org: "city-03".into(),
        issued_unix: 1_800_000_000,
        issued_by: "spiffe://pref.example/org/pref/user/sato".into(),
        baseline: text.to_owned(),
        organisation: None,
        restores: None,
        canary: None,
    }
}

fn signing_key() -> SigningKey {
    match SigningKey::generate() {
        Ok(k) => k,
        Err(e) => panic!("{e}"),
    }
}

fn bench_bundle(c: &mut Criterion, f: &Fixture) {
    let key = signing_key();
    let trusted = [key.public_key()];
    let bundle = the_bundle(&f.text);
    let signed = key.sign(&bundle);
    if let Err(e) = bundle::accept(&signed, &trusted, "city-03", 41) {
        panic!("the signed bundle is refused: {e}");
    }
    let mut group = c.benchmark_group("bundle");
    group.sample_size(20);
    group.bench_function("sign", |b| b.iter(|| key.sign(black_box(&bundle))));
    group.bench_function("verify_and_accept", |b| {
        b.iter(|| bundle::accept(black_box(&signed), &trusted, "city-03", 41))
    });
    group.finish();
}

fn main() {
    let fixture = Fixture::new();
    fixture.report();
    let mut c = Criterion::default().configure_from_args();
    bench_parse_and_link(&mut c, &fixture);
    bench_compile(&mut c, &fixture);
    bench_explain(&mut c, &fixture);
    bench_kernel_lookup(&mut c, &fixture);
    bench_bundle(&mut c, &fixture);
    c.final_summary();
}
