//! Linking layers: references, the baseline's rules binding organisations,
//! defaults that cannot be loosened, and `tests:` checked on load.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use policy::{load, Action, Direction, Flow, LoadError};

const BASELINE: &str = include_str!("../examples/baseline.yaml");
const CITY_A: &str = include_str!("../examples/city-a.yaml");

fn flow<'a>(device: &'a str, user: &'a str, exe: &'a str, to: &str) -> Flow<'a> {
    Flow {
        direction: Direction::Outbound,
        device,
        user,
        exe,
        exe_sha256: "",
        destination: to.parse().unwrap(),
    }
}

const FIN_PC: &str = "spiffe://pref.example/org/city-a/device/fin-07";
const OTHER_PC: &str = "spiffe://pref.example/org/city-a/device/pc-0002";

fn org_errors(org: &str) -> Vec<String> {
    match load(BASELINE, Some(org)) {
        Err(LoadError::Organisation(d)) => d.0.iter().map(ToString::to_string).collect(),
        other => panic!("expected organisation errors, got {other:?}"),
    }
}

#[test]
fn the_examples_load_and_their_tests_pass() {
    let set = load(BASELINE, Some(CITY_A)).unwrap();
    assert_eq!(set.org(), Some("city-a"));
    let base = load(BASELINE, None).unwrap();
    assert_eq!(base.org(), None);
}

#[test]
fn an_organisation_cannot_loosen_a_baseline_rule() {
    // city-a allows netcat everywhere; the baseline's ban still decides.
    let org = format!(
        "{CITY_A}\n  - id: let-netcat\n    action: allow\n    from: {{binaries: [remote-shells]}}\n    to: {{addresses: [0.0.0.0/0]}}\n"
    )
    .replace("\ntests:", "\nxtests:");
    let org = org.replace(
        "defaults:\n  outbound: allow\n\nxtests:",
        "defaults:\n  outbound: allow\n\ntests:",
    );
    let set = load(BASELINE, Some(&reorder_rules(&org))).unwrap();
    let d = set.evaluate(&flow(FIN_PC, "tanaka", "/usr/bin/nc", "198.51.100.1:4444"));
    assert_eq!(d.verdict, Action::Deny);
    assert_eq!(d.rule, "no-remote-shell-tools");
    assert_eq!(d.matched, vec!["no-remote-shell-tools", "let-netcat"]);
    // ...while the baseline's exception for loopback still holds.
    let d = set.evaluate(&flow(FIN_PC, "tanaka", "/usr/bin/nc", "127.0.0.1:4444"));
    assert_eq!((d.verdict, d.rule.as_str()), (Action::Allow, "let-netcat"));
}

/// Moves a rule appended after `tests:` into the rules list.
fn reorder_rules(text: &str) -> String {
    let (head, added) = text.split_once("\n  - id: let-netcat").unwrap();
    let added = format!("  - id: let-netcat{added}");
    head.replace("\ndefaults:", &format!("\n{added}\ndefaults:"))
}

#[test]
fn exceptions_and_groups_decide_identities() {
    let set = load(BASELINE, Some(CITY_A)).unwrap();
    let d = set.evaluate(&flow(
        OTHER_PC,
        "yamada",
        "/usr/bin/smbclient",
        "10.30.0.20:445",
    ));
    assert_eq!(
        (d.verdict, d.rule.as_str()),
        (Action::Allow, "file-share-for-finance")
    );
    let d = set.evaluate(&flow(
        OTHER_PC,
        "kato",
        "/usr/bin/smbclient",
        "10.30.0.20:445",
    ));
    assert_eq!(
        (d.verdict, d.rule.as_str()),
        (Action::Deny, "no-file-share-otherwise")
    );
    // Finance on a non-finance PC is not tunnelled to the ledger: the
    // default (allow) lets it try directly, which the gateway host refuses.
    let d = set.evaluate(&flow(OTHER_PC, "tanaka", "/usr/bin/curl", "10.30.0.10:443"));
    assert_eq!(d.rule, "default");
    assert_eq!(d.nearest[0].rule, "ledger-for-finance");
    assert_eq!(
        d.nearest[0].failed,
        vec!["device spiffe://pref.example/org/city-a/device/pc-0002 is in none of [finance-pcs]"]
    );
}

#[test]
fn the_gateway_decides_inbound_with_the_same_rules() {
    let set = load(BASELINE, Some(CITY_A)).unwrap();
    let mut f = flow(FIN_PC, "tanaka", "/usr/bin/curl", "10.30.0.10:443");
    f.direction = Direction::Inbound;
    let d = set.evaluate(&f);
    assert_eq!(
        (d.verdict, d.rule.as_str()),
        (Action::Allow, "ledger-for-finance")
    );
    assert_eq!(d.service.as_deref(), Some("ledger"));
    f.exe = "/usr/bin/wget";
    let d = set.evaluate(&f);
    assert_eq!((d.verdict, d.rule.as_str()), (Action::Deny, "default"));
    assert!(d.nearest[0].failed[0].contains("binary /usr/bin/wget is in none of [browsers]"));
}

#[test]
fn a_dry_run_rule_allows_and_reports_the_would_be_denial() {
    let set = load(BASELINE, None).unwrap();
    let d = set.evaluate(&flow(
        FIN_PC,
        "kato",
        "/usr/bin/smbclient",
        "203.0.113.7:445",
    ));
    assert_eq!((d.verdict, d.rule.as_str()), (Action::Allow, "default"));
    let dry = d.dry_run.expect("a would-deny");
    assert_eq!(
        (dry.verdict, dry.rule.as_str()),
        (Action::Deny, "trial-block-smb")
    );
}

#[test]
fn references_are_checked_with_suggestions() {
    let org = CITY_A
        .replace("users: [finance], binaries", "users: [finanse], binaries")
        .replace(
            "services: [file-share]}\n    except",
            "services: [ledger]}\n    except",
        );
    let e = org_errors(&org);
    assert!(
        e.iter().any(
            |e| e.starts_with("36:44: unknown group `finanse` (hint: did you mean `finance`?)")
        ),
        "{e:?}"
    );
    let org = CITY_A.replace("binaries: [browsers]}", "binaries: [finance]}");
    let e = org_errors(&org);
    assert!(
        e.iter()
            .any(|e| e.contains("`finance` is a group of users, not of binaries")),
        "{e:?}"
    );
}

#[test]
fn an_organisation_cannot_redefine_or_loosen() {
    let e = org_errors(&CITY_A.replace("  ledger:\n", "  tax-records:\n"));
    assert!(
        e.iter()
            .any(|e| e.contains("service `tax-records` is already defined by the baseline")),
        "{e:?}"
    );
    let e = org_errors(&CITY_A.replace(
        "defaults:\n  outbound: allow",
        "defaults:\n  inbound: allow",
    ));
    assert!(
        e.iter().any(|e| e
            .starts_with("48:3: defaults.inbound `allow` is looser than the baseline's `deny`")),
        "{e:?}"
    );
    let e = org_errors(&format!("{CITY_A}\nfail_mode: {{protected: open}}\n"));
    assert!(
        e.iter()
            .any(|e| e.starts_with("64:13: fail_mode.protected `open` is looser")),
        "{e:?}"
    );
}

#[test]
fn a_failing_test_is_reported_at_its_position() {
    let org = CITY_A.replace(
        "    expect: deny\n    rule: no-file-share-otherwise",
        "    expect: allow\n    rule: no-file-share-otherwise",
    );
    let e = org_errors(&org);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("59:5: test `others cannot use the file share` fails: expected allow by `no-file-share-otherwise`, got deny by `no-file-share-otherwise`"),
        "{e:?}"
    );
}

#[test]
fn tunnels_need_gateways_and_protected_services_need_tunnels() {
    let org = CITY_A.replace(
        "action: allow\n    from: {users: [finance]}\n    to: {services: [file-share]}",
        "action: tunnel\n    from: {users: [finance]}\n    to: {services: [file-share]}",
    );
    let e = org_errors(&org);
    assert!(
        e.iter()
            .any(|e| e.contains("tunnels to `file-share`, which has no gateway")),
        "{e:?}"
    );
    let org = CITY_A.replace(
        "action: tunnel\n    from: {devices",
        "action: allow\n    from: {devices",
    );
    let e = org_errors(&org);
    assert!(
        e.iter().any(|e| e.contains("`ledger` is protected")),
        "{e:?}"
    );
}
