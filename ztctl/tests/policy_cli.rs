//! `ztctl policy validate` and `ztctl policy explain` on the example
//! policies, as an admin runs them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use std::process::{Command, Output};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policy/examples");

fn ztctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ztctl"))
        .args(args)
        .env("ZTCTL_CONFIG", "/nonexistent-ztctl-config.toml")
        .output()
        .expect("ztctl runs")
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[test]
fn validate_accepts_the_examples_and_runs_their_tests() {
    let base = format!("{EXAMPLES}/baseline.yaml");
    let org = format!("{EXAMPLES}/city-a.yaml");
    let out = ztctl(&["policy", "validate", &org, "--baseline", &base, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["valid"], true);
    assert_eq!(v["org"], "city-a");
    assert_eq!(v["tests_passed"], 3);
    // An organisation's layer alone cannot be checked.
    let out = ztctl(&["policy", "validate", &org]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--baseline FILE"));
}

#[test]
fn validate_reports_each_problem_at_its_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "version: 1\nkind: baseline\nrules:\n  - id: a\n    action: alow\n    to: {addresses: [10.0.0.1/8]}\n",
    )
    .unwrap();
    let out = ztctl(&["policy", "validate", bad.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["valid"], false);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{v}");
    assert_eq!(
        (errors[0]["line"].as_u64(), errors[0]["column"].as_u64()),
        (Some(5), Some(13))
    );
    assert_eq!(errors[0]["hint"], "did you mean `allow`?");
    assert_eq!(
        (errors[1]["line"].as_u64(), errors[1]["column"].as_u64()),
        (Some(6), Some(22))
    );
    assert_eq!(errors[1]["hint"], "write 10.0.0.0/8");
    // Without --json: the line, a caret under the column, the hint.
    let out = ztctl(&["policy", "validate", bad.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("bad.yaml:5:13: error: action `alow` is not one of allow, tunnel, deny"),
        "{text}"
    );
    assert!(
        text.contains("5 |     action: alow\n  |             ^\n  = hint: did you mean `allow`?"),
        "{text}"
    );
}

#[test]
fn explain_names_the_rule_or_the_nearest_ones() {
    let base = format!("{EXAMPLES}/baseline.yaml");
    let org = format!("{EXAMPLES}/city-a.yaml");
    let explain = |device: &str, user: &str, exe: &str, to: &str| {
        let out = ztctl(&[
            "policy",
            "explain",
            "--policy",
            &org,
            "--baseline",
            &base,
            "--device",
            &format!("spiffe://pref.example/org/city-a/device/{device}"),
            "--user",
            user,
            "--exe",
            exe,
            "--to",
            to,
            "--json",
        ]);
        assert!(out.status.success(), "{out:?}");
        json(&out)
    };
    let v = explain("fin-07", "tanaka", "/usr/bin/curl", "10.30.0.10:443");
    assert_eq!(v["verdict"], "tunnel");
    assert_eq!(v["rule"], "ledger-for-finance");
    assert_eq!(v["layer"], "organisation");
    assert_eq!(v["gateway"], "city-a-gw");
    let v = explain("pc-0002", "tanaka", "/usr/bin/curl", "10.30.0.10:443");
    assert_eq!(v["rule"], "default");
    assert_eq!(v["nearest"][0]["rule"], "ledger-for-finance");
    assert_eq!(
        v["nearest"][0]["failed"][0],
        "device spiffe://pref.example/org/city-a/device/pc-0002 is in none of [finance-pcs]"
    );
    let v = explain("pc-0002", "kato", "/usr/bin/smbclient", "203.0.113.9:445");
    assert_eq!(v["verdict"], "allow");
    assert_eq!(v["dry_run"]["verdict"], "deny");
    assert_eq!(v["dry_run"]["rule"], "trial-block-smb");
}
