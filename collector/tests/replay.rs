//! Policy replay against a real ClickHouse (a private server, see
//! `zt_e2e::clickhouse`): decisions of two organisations stored with the
//! collector's own insert path, replayed under a candidate policy; exactly
//! the flows that change are listed, with their counts, and one
//! organisation's replay never reads the other's decisions.

use policy::{Action, Direction};
use zt_collector::{
    config::ClickHouseConfig,
    replay::{replay, ReplayChange, ReplayQuery},
    storage::{DecisionRow, Storage},
};
use zt_e2e::clickhouse::{fresh_database_name, ClickHouseServer};

const TRUST_DOMAIN: &str = "pref.example";
/// Seconds since the Unix epoch of the decisions (seq `n` is `T0 + n`).
const T0: u32 = 1_750_000_000;

const CANDIDATE: &str = "
version: 1
kind: baseline
groups:
  devices:
    pc-one: [spiffe://pref.example/org/city-a/device/pc-1]
  binaries:
    ssh: [/usr/bin/ssh]
rules:
  - id: block-web
    action: deny
    to: {addresses: [203.0.113.0/24], ports: [443]}
  - id: ledger-for-pc-one
    action: allow
    from: {devices: [pc-one]}
    to: {addresses: [10.20.0.10/32], ports: [443]}
  - id: no-ssh
    action: deny
    from: {binaries: [ssh]}
    to: {addresses: [0.0.0.0/0], ports: [22]}
  - id: trial-block-smb
    action: deny
    mode: dry-run
    to: {addresses: [0.0.0.0/0], ports: [445]}
  - id: trial-block-ftp
    action: deny
    to: {addresses: [203.0.113.0/24], ports: [21]}
defaults:
  outbound: allow
  inbound: deny
";

/// A kernel decision of `org`'s `device` at `T0 + seq`: `user` running
/// `exe` connecting to `addr:port`.
#[allow(clippy::too_many_arguments)]
fn decision(
    org: &str,
    device: &str,
    seq: u32,
    (user, exe): (&str, &str),
    (addr, port): (&str, u16),
    action: &str,
    verdict: &str,
    rule_id: &str,
) -> DecisionRow {
    DecisionRow {
        org_id: org.into(),
        time: T0 + seq,
        time_ns: u64::from(T0 + seq) * 1_000_000_000,
        device_id: device.into(),
        hostname: format!("host-{device}"),
        boot_id: "boot-1".into(),
        seq: u64::from(seq),
        connection_id: format!("conn-{org}-{device}-{seq}"),
        pid: 4000 + seq,
        uid: 1000,
        gid: 100,
        cgroup_id: 77,
        exe: exe.into(),
        user_name: user.into(),
        cgroup_path: String::new(),
        container_id: String::new(),
        ip_version: if addr.contains(':') { 6 } else { 4 },
        remote_addr: addr.into(),
        remote_port: port,
        protocol: "tcp".into(),
        action: action.into(),
        verdict: verdict.into(),
        rule_id: rule_id.into(),
        policy_version: 41,
        enforcement_point: "kernel".into(),
        ancestor_pids: Vec::new(),
        ancestor_exes: Vec::new(),
        ancestor_argv0: Vec::new(),
        ancestor_start_ns: Vec::new(),
        agent_version: "0.1.0-test".into(),
        ingested_at: T0 + 100,
        exe_sha256: String::new(),
        peer_id: String::new(),
        service: String::new(),
        direction: "outbound".into(),
        reason: String::new(),
        nearest_rules: Vec::new(),
        gateway: String::new(),
    }
}

const ALICE_CURL: (&str, &str) = ("alice", "/usr/bin/curl");
const WEB: (&str, u16) = ("203.0.113.7", 443);
const PC_1: &str = "spiffe://pref.example/org/city-a/device/pc-1";

/// At gateway `gw-1`: pc-1's alice reaching the ledger through a tunnel.
fn at_gateway(seq: u32, action: &str, verdict: &str, reason: &str) -> DecisionRow {
    DecisionRow {
        enforcement_point: "gateway".into(),
        direction: "inbound".into(),
        peer_id: PC_1.into(),
        reason: reason.into(),
        service: "ledger".into(),
        gateway: "10.20.0.2:4433".into(),
        ..decision(
            "city-a",
            "gw-1",
            seq,
            ALICE_CURL,
            ("10.20.0.10", 443),
            action,
            verdict,
            "",
        )
    }
}

fn city_a() -> Vec<DecisionRow> {
    let a = "city-a";
    let mut rows = Vec::new();
    // Allowed by default, now blocked: 3 decisions (and one older than
    // the replay's start, not read).
    for seq in 1..=3 {
        rows.push(decision(
            a, "pc-1", seq, ALICE_CURL, WEB, "allow", "allowed", "",
        ));
    }
    rows.push(DecisionRow {
        time: T0 - 7200,
        time_ns: u64::from(T0 - 7200) * 1_000_000_000,
        ..decision(a, "pc-1", 900, ALICE_CURL, WEB, "allow", "allowed", "")
    });
    // Denied by the same rule still: unchanged.
    for seq in 4..=5 {
        rows.push(decision(
            a,
            "pc-1",
            seq,
            ("alice", "/usr/bin/ssh"),
            ("198.51.100.9", 22),
            "deny",
            "denied",
            "no-ssh",
        ));
    }
    // Audited by a dry-run rule that stays a dry run: unchanged.
    rows.push(decision(
        a,
        "pc-2",
        6,
        ("bob", "/usr/bin/smbclient"),
        ("198.51.100.4", 445),
        "audit",
        "would_deny",
        "trial-block-smb",
    ));
    // Audited by a dry-run rule the candidate enforces: now denied.
    rows.push(decision(
        a,
        "pc-3",
        7,
        ("carol", "/usr/bin/ftp"),
        ("203.0.113.9", 21),
        "audit",
        "would_deny",
        "trial-block-ftp",
    ));
    // At the gateway, refused by the default; the candidate allows pc-1
    // (the caller, not the gateway's own device).
    rows.push(at_gateway(8, "deny", "denied", "policy"));
    rows.push(at_gateway(9, "deny", "denied", "policy"));
    // Not replayed: a revoked caller, a drop at a protected port, a close.
    rows.push(at_gateway(10, "deny", "denied", "revoked"));
    rows.push(DecisionRow {
        enforcement_point: "kernel_ingress".into(),
        direction: "inbound".into(),
        reason: "protected_port".into(),
        ..decision(
            a,
            "pc-1",
            11,
            ("", ""),
            ("192.0.2.50", 8443),
            "deny",
            "denied",
            "",
        )
    });
    rows.push(decision(
        a, "pc-1", 12, ALICE_CURL, WEB, "allow", "closed", "web-out",
    ));
    // Allowed by default still: unchanged.
    for seq in 13..=14 {
        rows.push(decision(
            a,
            "pc-2",
            seq,
            ALICE_CURL,
            ("192.0.2.10", 80),
            "allow",
            "allowed",
            "",
        ));
    }
    // Tunnelled by a rule the candidate lacks, now blocked: the tunnel's
    // record and the kernel's fail-closed one are one flow.
    rows.push(DecisionRow {
        enforcement_point: "tunnel".into(),
        peer_id: "spiffe://pref.example/org/pref/device/dc-gw1".into(),
        gateway: "10.20.0.2:4433".into(),
        ..decision(
            a,
            "pc-2",
            15,
            ALICE_CURL,
            WEB,
            "tunnel",
            "tunnelled",
            "web-via-gw",
        )
    });
    rows.push(DecisionRow {
        reason: "fail_closed".into(),
        ..decision(
            a,
            "pc-2",
            16,
            ALICE_CURL,
            WEB,
            "tunnel",
            "denied",
            "web-via-gw",
        )
    });
    rows
}

/// The other organisation: the same device ids and flows (merged into
/// city-a's counts if they were read), and one only it has.
fn city_b() -> Vec<DecisionRow> {
    let mut rows: Vec<DecisionRow> = (1..=5)
        .map(|seq| {
            decision(
                "city-b", "pc-1", seq, ALICE_CURL, WEB, "allow", "allowed", "",
            )
        })
        .collect();
    rows.push(decision(
        "city-b",
        "pc-7",
        6,
        ALICE_CURL,
        ("203.0.113.50", 443),
        "allow",
        "allowed",
        "",
    ));
    rows
}

type Summary = (
    String,
    String,
    String,
    Direction,
    String,
    Action,
    String,
    Action,
    String,
    u64,
);

fn summary(changes: &[ReplayChange]) -> Vec<Summary> {
    changes
        .iter()
        .map(|c| {
            (
                c.device_id.clone(),
                c.device.clone(),
                c.destination.clone(),
                c.direction,
                c.old_action.clone(),
                c.old_verdict,
                c.old_rule.clone(),
                c.new_verdict,
                c.new_rule.clone(),
                c.count,
            )
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn change(
    device_id: &str,
    device: &str,
    destination: &str,
    direction: Direction,
    old: (&str, Action, &str),
    new: (Action, &str),
    count: u64,
) -> Summary {
    (
        device_id.into(),
        device.into(),
        destination.into(),
        direction,
        old.0.into(),
        old.1,
        old.2.into(),
        new.0,
        new.1.into(),
        count,
    )
}

#[tokio::test]
async fn replay_lists_exactly_the_changed_flows_of_one_organisation() {
    let server = ClickHouseServer::start().await.unwrap();
    let storage = Storage::new(&ClickHouseConfig {
        url: server.http_url(),
        database: fresh_database_name("replay"),
        ..Default::default()
    })
    .unwrap();
    storage.migrate().await.unwrap();
    storage.insert(&city_a()).await.unwrap();
    storage.insert(&city_b()).await.unwrap();
    // A batch resent after its acknowledgement was lost: stored twice,
    // counted once.
    let resent: Vec<DecisionRow> = city_a().into_iter().filter(|r| r.seq == 3).collect();
    storage.insert(&resent).await.unwrap();

    let candidate = policy::load(CANDIDATE, None).unwrap();
    let query = ReplayQuery {
        org: "city-a".into(),
        since_unix: i64::from(T0) - 3600,
        limit: 100_000,
    };
    let report = replay(&storage, TRUST_DOMAIN, &query, &candidate)
        .await
        .unwrap();

    assert_eq!(
        report.decisions_read, 16,
        "city-a's since the start, once each"
    );
    assert_eq!(report.skipped, 3, "revoked, kernel_ingress, closed");
    assert_eq!(report.distinct_flows, 7);
    assert!(!report.truncated);
    let pc = |n: u8| format!("spiffe://pref.example/org/city-a/device/pc-{n}");
    assert_eq!(
        summary(&report.changed),
        vec![
            change(
                "pc-1",
                &pc(1),
                "203.0.113.7:443",
                Direction::Outbound,
                ("allow", Action::Allow, "default"),
                (Action::Deny, "block-web"),
                3,
            ),
            change(
                "gw-1",
                &pc(1),
                "10.20.0.10:443",
                Direction::Inbound,
                ("deny", Action::Deny, "default"),
                (Action::Allow, "ledger-for-pc-one"),
                2,
            ),
            change(
                "pc-2",
                &pc(2),
                "203.0.113.7:443",
                Direction::Outbound,
                ("tunnel", Action::Tunnel, "web-via-gw"),
                (Action::Deny, "block-web"),
                2,
            ),
            change(
                "pc-3",
                &pc(3),
                "203.0.113.9:21",
                Direction::Outbound,
                ("audit", Action::Allow, "trial-block-ftp"),
                (Action::Deny, "trial-block-ftp"),
                1,
            ),
        ]
    );
    let first = &report.changed[0];
    assert_eq!(
        (first.user.as_str(), first.exe.as_str(), first.time_unix),
        ("alice", "/usr/bin/curl", i64::from(T0) + 3)
    );
    assert_eq!(first.new_dry_run, None);
    assert_eq!(report.changed[2].time_unix, i64::from(T0) + 16);

    // The other organisation's replay reads only its own decisions.
    let other = replay(
        &storage,
        TRUST_DOMAIN,
        &ReplayQuery {
            org: "city-b".into(),
            ..query.clone()
        },
        &candidate,
    )
    .await
    .unwrap();
    assert_eq!((other.decisions_read, other.skipped), (6, 0));
    let pc_b = |n: u8| format!("spiffe://pref.example/org/city-b/device/pc-{n}");
    assert_eq!(
        summary(&other.changed),
        vec![
            change(
                "pc-1",
                &pc_b(1),
                "203.0.113.7:443",
                Direction::Outbound,
                ("allow", Action::Allow, "default"),
                (Action::Deny, "block-web"),
                5,
            ),
            change(
                "pc-7",
                &pc_b(7),
                "203.0.113.50:443",
                Direction::Outbound,
                ("allow", Action::Allow, "default"),
                (Action::Deny, "block-web"),
                1,
            ),
        ]
    );

    // A limit reads the most recent decisions only, and says so.
    let recent = replay(
        &storage,
        TRUST_DOMAIN,
        &ReplayQuery {
            limit: 4,
            ..query.clone()
        },
        &candidate,
    )
    .await
    .unwrap();
    assert!(recent.truncated);
    assert_eq!(
        (recent.decisions_read, recent.skipped, recent.distinct_flows),
        (4, 0, 2)
    );
    assert_eq!(
        summary(&recent.changed),
        vec![change(
            "pc-2",
            &pc(2),
            "203.0.113.7:443",
            Direction::Outbound,
            ("tunnel", Action::Tunnel, "web-via-gw"),
            (Action::Deny, "block-web"),
            2,
        )]
    );

    // Nothing since a later time; an organisation with no decisions.
    let later = replay(
        &storage,
        TRUST_DOMAIN,
        &ReplayQuery {
            since_unix: i64::from(T0) + 1000,
            ..query.clone()
        },
        &candidate,
    )
    .await
    .unwrap();
    assert_eq!((later.decisions_read, later.changed.len()), (0, 0));
    assert!(!later.truncated);

    // Bad input is refused before any query.
    let bad = replay(&storage, "Not A Domain", &query, &candidate).await;
    assert!(bad.is_err());
    let bad = replay(
        &storage,
        TRUST_DOMAIN,
        &ReplayQuery {
            org: "city-a' OR '1'='1".into(),
            ..query.clone()
        },
        &candidate,
    )
    .await;
    assert!(bad.is_err());
}
