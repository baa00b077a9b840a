//! Policy replay: the connection decisions an organisation's agents stored
//! in `zt.decisions`, decided again under a candidate policy, and which of
//! them would come out differently.
//!
//! One organisation at a time (`org_id = ?` in every query), from a point in
//! time, at most [`ReplayQuery::limit`] decisions (the most recent ones; the
//! report says when there were more). ClickHouse groups identical flows —
//! device, caller, user, program and its hash, destination, direction,
//! stored action and rule — so a day of decisions comes back as one row per
//! distinct flow with a count, not row by row. Decisions stored twice (a
//! resent batch) count once (`FINAL`).
//!
//! Stored decisions are compared by what the policy said, not by what came
//! of the connection: the `action` column (`allow`, `deny`, `tunnel`, or
//! `audit`: an allow that a dry-run rule would deny), not `verdict`
//! (`denied` is also a `tunnel` whose gateway refused, or failed closed). A
//! stored `audit` is an `allow` whose recorded rule is the dry-run rule, as
//! the kernel records it; so is a candidate's outbound allow with a dry-run
//! deny (see [`recorded_rule`]). A flow is listed when the verdict or that
//! rule changes.
//!
//! Not replayed, counted as skipped: `kernel_ingress` drops (a direct
//! connection to a protected port: the kernel's protected-port table, not a
//! rule), rows without a destination (no address, port 0: a gateway's
//! malformed request), `closed` rows (a live connection ended later; at a
//! gateway they carry the re-check's rule with action `allow`), gateway
//! refusals not made by the policy (revoked caller, fail closed, service
//! unreachable, bad request), gateway rows without the caller's id, and rows
//! whose stored values cannot be read back (unknown action or direction, an
//! address that does not parse, a device id that makes no SPIFFE id).

use std::{
    cmp::Reverse,
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use policy::{Action, Decision, Direction, Flow, PolicySet};
use zt_identity::{SpiffeId, SpiffeIdError, TrustDomain};

use crate::storage::{
    Storage, StorageError, DECISION_ALLOW, DECISION_AUDIT, DECISION_DENY, DECISION_TUNNEL,
    DIRECTION_INBOUND, DIRECTION_OUTBOUND, ENFORCEMENT_GATEWAY, ENFORCEMENT_KERNEL_INGRESS,
    VERDICT_CLOSED, VERDICT_DENIED,
};

/// How long each replay query may take (a `FINAL` read of up to
/// [`ReplayQuery::limit`] rows).
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// `rule_id` of a default verdict as stored (`''`) and as the policy names
/// it.
const STORED_DEFAULT_RULE: &str = "";

/// Decisions of the organisation since the time, de-duplicated.
const COUNT_SQL: &str = "SELECT count() FROM decisions FINAL \
     WHERE org_id = ? AND time >= toDateTime(?)";

/// The most recent `limit` decisions of the organisation since the time,
/// grouped by flow. Rows not to replay are marked `k_skip` and their keys
/// blanked, so they collapse into one group whatever their addresses. The
/// caller (`k_caller`) is the calling device's SPIFFE id on gateway rows,
/// `''` elsewhere (the device is the row's own `device_id` there).
///
/// Binds, in order: `kernel_ingress`, `closed`, `gateway`, `denied`,
/// `policy`, `no_service`, `gateway`, org, since, limit.
const FLOWS_SQL: &str = "SELECT k_skip, k_caller, k_device, k_user, k_exe, k_sha256, \
       k_addr, k_port, k_direction, k_action, k_rule, \
       count() AS decisions, toUInt32(max(time)) AS last_seen \
     FROM ( \
       SELECT time, \
         (enforcement_point = ? OR remote_addr = '' OR remote_port = 0 OR verdict = ? \
          OR (enforcement_point = ? AND (peer_id = '' \
              OR (verdict = ? AND reason NOT IN ('', ?, ?))))) AS k_skip, \
         if(k_skip, '', if(enforcement_point = ?, peer_id, '')) AS k_caller, \
         if(k_skip, '', device_id) AS k_device, \
         if(k_skip, '', user_name) AS k_user, \
         if(k_skip, '', exe) AS k_exe, \
         if(k_skip, '', exe_sha256) AS k_sha256, \
         if(k_skip, '', remote_addr) AS k_addr, \
         toUInt16(if(k_skip, 0, remote_port)) AS k_port, \
         if(k_skip, '', direction) AS k_direction, \
         if(k_skip, '', action) AS k_action, \
         if(k_skip, '', rule_id) AS k_rule \
       FROM decisions FINAL \
       WHERE org_id = ? AND time >= toDateTime(?) \
       ORDER BY time DESC \
       LIMIT ? \
     ) \
     GROUP BY k_skip, k_caller, k_device, k_user, k_exe, k_sha256, \
       k_addr, k_port, k_direction, k_action, k_rule";

/// Gateway refusals the policy made (`''`: an agent that gave no reason);
/// other refusals (revoked, fail closed, ...) are not replayed.
const GATEWAY_POLICY_REASONS: [&str; 2] = ["policy", "no_service"];

/// What to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayQuery {
    /// The organisation whose decisions are read; no other's ever are.
    pub org: String,
    /// Decisions at or after this time (seconds since the Unix epoch).
    pub since_unix: i64,
    /// Most decisions read, the most recent first (e.g. `100_000`).
    pub limit: usize,
}

/// A flow whose decision would change under the candidate policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReplayChange {
    /// The device that reported the decisions (at a gateway: the gateway).
    pub device_id: String,
    /// The calling device's SPIFFE id, as the flow was evaluated: built from
    /// the organisation and `device_id`, or at a gateway the caller's
    /// (`peer_id`).
    pub device: String,
    pub user: String,
    pub exe: String,
    pub exe_sha256: String,
    /// `ip:port` (`[ip]:port` for IPv6).
    pub destination: String,
    pub direction: Direction,
    /// The latest of the flow's decisions, seconds since the Unix epoch.
    pub time_unix: i64,
    /// The stored `action` (`allow`, `deny`, `tunnel`, `audit`).
    pub old_action: String,
    /// The stored action as a policy verdict (`audit` is `allow`).
    pub old_verdict: Action,
    /// The stored rule (`default` for none; for `audit`, the dry-run rule).
    pub old_rule: String,
    pub new_verdict: Action,
    /// The candidate's deciding rule, or `default`.
    pub new_rule: String,
    /// What the candidate's dry-run rules would change: verdict and rule.
    pub new_dry_run: Option<(Action, String)>,
    /// Decisions of this flow read.
    pub count: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReplayReport {
    /// Decisions read (at most the query's limit), skipped ones included.
    pub decisions_read: u64,
    /// Decisions not replayed (see the module documentation).
    pub skipped: u64,
    /// Distinct flows replayed.
    pub distinct_flows: u64,
    /// Flows whose verdict or rule changes, most decisions first, then by
    /// device.
    pub changed: Vec<ReplayChange>,
    /// More decisions matched than the limit: only the most recent were read.
    pub truncated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("invalid trust domain {trust_domain:?}: {error}")]
    TrustDomain {
        trust_domain: String,
        error: SpiffeIdError,
    },
    #[error("invalid organisation {org:?}: {error}")]
    Organisation { org: String, error: SpiffeIdError },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl ReplayError {
    /// Whether the same replay may succeed later (ClickHouse unreachable,
    /// overloaded, timed out).
    pub fn is_retriable(&self) -> bool {
        match self {
            ReplayError::Storage(e) => e.is_retriable(),
            ReplayError::TrustDomain { .. } | ReplayError::Organisation { .. } => false,
        }
    }
}

/// One group of stored decisions, as [`FLOWS_SQL`] returns it.
#[derive(Debug, Clone, Default, PartialEq, Eq, clickhouse::Row, serde::Deserialize)]
struct StoredFlow {
    skip: u8,
    /// The calling device's SPIFFE id on gateway rows, else `''`.
    caller: String,
    device_id: String,
    user: String,
    exe: String,
    exe_sha256: String,
    remote_addr: String,
    remote_port: u16,
    direction: String,
    action: String,
    rule_id: String,
    decisions: u64,
    last_seen: u32,
}

/// Re-decides `query.org`'s stored decisions under `candidate` and lists the
/// flows that would change. Device SPIFFE ids are rebuilt in `trust_domain`.
pub async fn replay(
    storage: &Storage,
    trust_domain: &str,
    query: &ReplayQuery,
    candidate: &PolicySet,
) -> Result<ReplayReport, ReplayError> {
    let domain = TrustDomain::new(trust_domain).map_err(|error| ReplayError::TrustDomain {
        trust_domain: trust_domain.to_owned(),
        error,
    })?;
    zt_identity::spiffe::validate_name("organisation", &query.org).map_err(|error| {
        ReplayError::Organisation {
            org: query.org.clone(),
            error,
        }
    })?;
    // DateTime is unsigned 32-bit: clamp rather than wrap.
    let since = u32::try_from(query.since_unix.max(0)).unwrap_or(u32::MAX);
    let limit = u64::try_from(query.limit).unwrap_or(u64::MAX);

    let client = storage.client();
    let total: u64 = bounded(
        "count decisions to replay",
        client
            .query(COUNT_SQL)
            .bind(query.org.as_str())
            .bind(since)
            .fetch_one(),
    )
    .await?;
    let flows: Vec<StoredFlow> = bounded(
        "read decisions to replay",
        client
            .query(FLOWS_SQL)
            .bind(ENFORCEMENT_KERNEL_INGRESS)
            .bind(VERDICT_CLOSED)
            .bind(ENFORCEMENT_GATEWAY)
            .bind(VERDICT_DENIED)
            .bind(GATEWAY_POLICY_REASONS[0])
            .bind(GATEWAY_POLICY_REASONS[1])
            .bind(ENFORCEMENT_GATEWAY)
            .bind(query.org.as_str())
            .bind(since)
            .bind(limit)
            .fetch_all(),
    )
    .await?;
    let mut report = replay_flows(&domain, &query.org, flows, candidate);
    report.truncated = total > limit;
    Ok(report)
}

async fn bounded<T>(
    what: &str,
    query: impl std::future::Future<Output = Result<T, clickhouse::error::Error>>,
) -> Result<T, StorageError> {
    match tokio::time::timeout(QUERY_TIMEOUT, query).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(StorageError::ClickHouse {
            what: what.to_owned(),
            error,
        }),
        Err(_) => Err(StorageError::Timeout {
            what: what.to_owned(),
            after: QUERY_TIMEOUT,
        }),
    }
}

/// A distinct flow and its stored decision, after reading back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FlowKey {
    device: String,
    device_id: String,
    user: String,
    exe: String,
    exe_sha256: String,
    destination: SocketAddr,
    direction: &'static str,
    action: String,
    rule: String,
}

/// Replays grouped decisions (sans-IO): merges groups that read back as the
/// same flow, evaluates each flow once, keeps the changes, sorted.
fn replay_flows(
    domain: &TrustDomain,
    org: &str,
    flows: Vec<StoredFlow>,
    candidate: &PolicySet,
) -> ReplayReport {
    let mut report = ReplayReport::default();
    let mut merged: BTreeMap<FlowKey, (u64, u32)> = BTreeMap::new();
    for flow in flows {
        report.decisions_read += flow.decisions;
        let Some(key) = flow_key(domain, org, &flow) else {
            report.skipped += flow.decisions;
            continue;
        };
        let entry = merged.entry(key).or_default();
        entry.0 += flow.decisions;
        entry.1 = entry.1.max(flow.last_seen);
    }
    report.distinct_flows = merged.len() as u64;
    for (key, (count, last_seen)) in merged {
        let direction = parse_direction(key.direction).unwrap_or(Direction::Outbound);
        let Some(old_verdict) = stored_verdict(&key.action, direction) else {
            continue; // flow_key checked it
        };
        let decision = candidate.evaluate(&Flow {
            direction,
            device: &key.device,
            user: &key.user,
            exe: &key.exe,
            exe_sha256: &key.exe_sha256,
            destination: key.destination,
        });
        if !changes(old_verdict, &key.rule, &decision) {
            continue;
        }
        report.changed.push(ReplayChange {
            device_id: key.device_id,
            device: key.device,
            user: key.user,
            exe: key.exe,
            exe_sha256: key.exe_sha256,
            destination: key.destination.to_string(),
            direction,
            time_unix: i64::from(last_seen),
            old_action: key.action,
            old_verdict,
            old_rule: key.rule,
            new_verdict: decision.verdict,
            new_rule: decision.rule,
            new_dry_run: decision.dry_run.map(|d| (d.verdict, d.rule)),
            count,
        });
    }
    report.changed.sort_by(|a, b| {
        (Reverse(a.count), &a.device_id, &a.device, &a.destination)
            .cmp(&(Reverse(b.count), &b.device_id, &b.device, &b.destination))
            .then_with(|| (&a.user, &a.exe, &a.old_rule).cmp(&(&b.user, &b.exe, &b.old_rule)))
    });
    report
}

/// The flow a group reads back as, or `None` when it is not to be replayed.
fn flow_key(domain: &TrustDomain, org: &str, flow: &StoredFlow) -> Option<FlowKey> {
    if flow.skip != 0 {
        return None;
    }
    let direction = parse_direction(&flow.direction)?;
    stored_verdict(&flow.action, direction)?;
    let destination = destination(&flow.remote_addr, flow.remote_port)?;
    let device = if flow.caller.is_empty() {
        SpiffeId::device(domain, org, &flow.device_id).ok()?
    } else {
        SpiffeId::parse(&flow.caller).ok()?
    }
    .to_string();
    Some(FlowKey {
        device,
        device_id: flow.device_id.clone(),
        user: flow.user.clone(),
        exe: flow.exe.clone(),
        exe_sha256: flow.exe_sha256.clone(),
        destination,
        direction: direction.as_str(),
        action: flow.action.clone(),
        rule: stored_rule(&flow.rule_id).to_owned(),
    })
}

fn parse_direction(text: &str) -> Option<Direction> {
    match text {
        DIRECTION_OUTBOUND => Some(Direction::Outbound),
        DIRECTION_INBOUND => Some(Direction::Inbound),
        _ => None,
    }
}

/// A stored `action` as the verdict of [`PolicySet::evaluate`]: `audit` (a
/// dry-run rule would deny, the connection went ahead) is `allow`, and
/// inbound a `tunnel` is `allow` (a tunnel that has arrived). `None` for an
/// action the collector does not store.
fn stored_verdict(action: &str, direction: Direction) -> Option<Action> {
    let verdict = match action {
        DECISION_ALLOW | DECISION_AUDIT => Action::Allow,
        DECISION_DENY => Action::Deny,
        DECISION_TUNNEL => Action::Tunnel,
        _ => return None,
    };
    Some(match (direction, verdict) {
        (Direction::Inbound, Action::Tunnel) => Action::Allow,
        (_, verdict) => verdict,
    })
}

/// A stored `rule_id` as the policy names it: `''` is `default`.
fn stored_rule(rule_id: &str) -> &str {
    if rule_id == STORED_DEFAULT_RULE {
        policy::eval::DEFAULT_RULE
    } else {
        rule_id
    }
}

/// The rule a decision is recorded with: for an outbound allow that a
/// dry-run rule would deny (the kernel's `audit`), the dry-run rule;
/// otherwise the deciding rule.
fn recorded_rule(decision: &Decision) -> &str {
    match &decision.dry_run {
        Some(d)
            if decision.direction == Direction::Outbound
                && decision.verdict == Action::Allow
                && d.verdict == Action::Deny =>
        {
            &d.rule
        }
        _ => &decision.rule,
    }
}

/// Whether the candidate's decision differs from the stored one (verdict,
/// or the rule it would be recorded with).
fn changes(old_verdict: Action, old_rule: &str, decision: &Decision) -> bool {
    old_verdict != decision.verdict || old_rule != recorded_rule(decision)
}

/// `remote_addr` and `remote_port` as a socket address; `None` for no
/// destination (no address, port 0) or text that is not an address.
fn destination(addr: &str, port: u16) -> Option<SocketAddr> {
    if port == 0 {
        return None;
    }
    let ip: IpAddr = addr.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "pref.example";

    const CANDIDATE: &str = "
version: 1
kind: baseline
groups:
  devices:
    pc-one: [spiffe://pref.example/org/city-a/device/pc-1]
rules:
  - id: block-web
    action: deny
    to: {addresses: [203.0.113.0/24, '2001:db8:bad::/48'], ports: [443]}
  - id: ledger-for-pc-one
    action: allow
    from: {devices: [pc-one]}
    to: {addresses: [10.20.0.10/32], ports: [443]}
  - id: trial-block-smb
    action: deny
    mode: dry-run
    to: {addresses: [0.0.0.0/0], ports: [445]}
defaults:
  outbound: allow
  inbound: deny
";

    fn candidate() -> PolicySet {
        policy::load(CANDIDATE, None).unwrap()
    }

    fn domain() -> TrustDomain {
        TrustDomain::new(TD).unwrap()
    }

    fn stored(device: &str, addr: &str, port: u16, action: &str, rule: &str) -> StoredFlow {
        StoredFlow {
            skip: 0,
            caller: String::new(),
            device_id: device.into(),
            user: "alice".into(),
            exe: "/usr/bin/curl".into(),
            exe_sha256: String::new(),
            remote_addr: addr.into(),
            remote_port: port,
            direction: "outbound".into(),
            action: action.into(),
            rule_id: rule.into(),
            decisions: 1,
            last_seen: 1_750_000_000,
        }
    }

    #[test]
    fn stored_actions_map_to_policy_verdicts() {
        use Direction::*;
        assert_eq!(stored_verdict("allow", Outbound), Some(Action::Allow));
        assert_eq!(stored_verdict("audit", Outbound), Some(Action::Allow));
        assert_eq!(stored_verdict("deny", Outbound), Some(Action::Deny));
        assert_eq!(stored_verdict("tunnel", Outbound), Some(Action::Tunnel));
        assert_eq!(stored_verdict("tunnel", Inbound), Some(Action::Allow));
        assert_eq!(stored_verdict("deny", Inbound), Some(Action::Deny));
        // Verdicts are not actions.
        assert_eq!(stored_verdict("allowed", Outbound), None);
        assert_eq!(stored_verdict("denied", Outbound), None);
        assert_eq!(stored_verdict("Allow", Outbound), None);
        assert_eq!(stored_rule(""), "default");
        assert_eq!(stored_rule("block-web"), "block-web");
        assert_eq!(parse_direction("outbound"), Some(Outbound));
        assert_eq!(parse_direction("inbound"), Some(Inbound));
        assert_eq!(parse_direction("listen"), None);
        assert_eq!(parse_direction(""), None);
    }

    #[test]
    fn destinations_read_back_or_are_none() {
        assert_eq!(
            destination("203.0.113.7", 443),
            Some("203.0.113.7:443".parse().unwrap())
        );
        assert_eq!(
            destination("2001:db8::7", 443),
            Some("[2001:db8::7]:443".parse().unwrap())
        );
        assert_eq!(destination("", 443), None);
        assert_eq!(destination("0.0.0.0", 0), None);
        assert_eq!(destination("pc.example", 443), None);
    }

    #[test]
    fn an_audited_allow_is_compared_by_its_dry_run_rule() {
        let set = candidate();
        let flow = |exe: &'static str, to: &str| Flow {
            direction: Direction::Outbound,
            device: "spiffe://pref.example/org/city-a/device/pc-2",
            user: "bob",
            exe,
            exe_sha256: "",
            destination: to.parse().unwrap(),
        };
        let smb = set.evaluate(&flow("/usr/bin/smbclient", "198.51.100.4:445"));
        assert_eq!((smb.verdict, smb.rule.as_str()), (Action::Allow, "default"));
        assert_eq!(recorded_rule(&smb), "trial-block-smb");
        // Stored as `audit` by the dry-run rule: unchanged.
        assert!(!changes(Action::Allow, "trial-block-smb", &smb));
        // Stored as a plain allow by the default: the dry-run rule is new.
        assert!(changes(Action::Allow, "default", &smb));

        let web = set.evaluate(&flow("/usr/bin/curl", "203.0.113.7:443"));
        assert!(!changes(Action::Deny, "block-web", &web));
        assert!(changes(Action::Allow, "default", &web));
        assert!(
            changes(Action::Deny, "other-rule", &web),
            "the rule changed"
        );

        // Inbound, the deciding rule is recorded whatever the dry run.
        let inbound = set.evaluate(&Flow {
            direction: Direction::Inbound,
            ..flow("/usr/bin/smbclient", "198.51.100.4:445")
        });
        assert_eq!(inbound.verdict, Action::Deny);
        assert_eq!(recorded_rule(&inbound), "default");
    }

    #[test]
    fn groups_merge_into_flows_and_only_changes_are_listed() {
        let gateway = StoredFlow {
            caller: "spiffe://pref.example/org/city-a/device/pc-1".into(),
            direction: "inbound".into(),
            decisions: 2,
            ..stored("gw-1", "10.20.0.10", 443, "deny", "")
        };
        let flows = vec![
            // Allowed by default, now blocked: 3 + 4 decisions of one flow
            // (the same address in two spellings merges).
            StoredFlow {
                decisions: 3,
                last_seen: 10,
                ..stored("pc-1", "2001:db8:bad::7", 443, "allow", "")
            },
            StoredFlow {
                decisions: 4,
                last_seen: 20,
                ..stored("pc-1", "2001:0db8:0bad:0:0:0:0:0007", 443, "allow", "")
            },
            // Unchanged: already denied by the rule.
            StoredFlow {
                decisions: 9,
                ..stored("pc-2", "203.0.113.7", 443, "deny", "block-web")
            },
            // Unchanged: audited by the dry-run rule.
            stored("pc-2", "198.51.100.4", 445, "audit", "trial-block-smb"),
            // At the gateway, evaluated as the caller (pc-1): now allowed.
            gateway.clone(),
            // The same at a gateway for pc-2: still denied by default.
            StoredFlow {
                caller: "spiffe://pref.example/org/city-a/device/pc-2".into(),
                ..gateway
            },
            // Skipped: marked by the query, or unreadable.
            StoredFlow {
                skip: 1,
                decisions: 5,
                ..StoredFlow::default()
            },
            stored("pc-1", "", 443, "allow", ""),
            stored("pc-1", "203.0.113.8", 443, "block", ""),
            stored("PC 1!", "203.0.113.8", 443, "allow", ""),
            StoredFlow {
                direction: "listen".into(),
                ..stored("pc-1", "203.0.113.8", 443, "allow", "")
            },
        ];
        let report = replay_flows(&domain(), "city-a", flows, &candidate());
        assert_eq!(report.decisions_read, 3 + 4 + 9 + 1 + 2 + 2 + 5 + 4);
        assert_eq!(report.skipped, 5 + 4);
        assert_eq!(report.distinct_flows, 5);
        assert!(!report.truncated);
        let summary: Vec<_> = report
            .changed
            .iter()
            .map(|c| {
                (
                    c.device_id.as_str(),
                    c.device.as_str(),
                    c.destination.as_str(),
                    c.direction,
                    (c.old_verdict, c.old_rule.as_str()),
                    (c.new_verdict, c.new_rule.as_str()),
                    c.count,
                    c.time_unix,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "pc-1",
                    "spiffe://pref.example/org/city-a/device/pc-1",
                    "[2001:db8:bad::7]:443",
                    Direction::Outbound,
                    (Action::Allow, "default"),
                    (Action::Deny, "block-web"),
                    7,
                    20,
                ),
                (
                    "gw-1",
                    "spiffe://pref.example/org/city-a/device/pc-1",
                    "10.20.0.10:443",
                    Direction::Inbound,
                    (Action::Deny, "default"),
                    (Action::Allow, "ledger-for-pc-one"),
                    2,
                    1_750_000_000,
                ),
            ]
        );
    }

    #[test]
    fn changes_sort_by_count_then_device() {
        let flows = vec![
            stored("pc-3", "203.0.113.7", 443, "allow", ""),
            stored("pc-1", "203.0.113.7", 443, "allow", ""),
            StoredFlow {
                decisions: 2,
                ..stored("pc-9", "203.0.113.7", 443, "allow", "")
            },
            stored("pc-2", "203.0.113.7", 443, "allow", ""),
        ];
        let report = replay_flows(&domain(), "city-a", flows, &candidate());
        let order: Vec<(&str, u64)> = report
            .changed
            .iter()
            .map(|c| (c.device_id.as_str(), c.count))
            .collect();
        assert_eq!(
            order,
            vec![("pc-9", 2), ("pc-1", 1), ("pc-2", 1), ("pc-3", 1)]
        );
    }

    #[test]
    fn a_change_serialises_with_lowercase_verdicts() {
        let flows = vec![stored("pc-1", "203.0.113.7", 443, "allow", "")];
        let report = replay_flows(&domain(), "city-a", flows, &candidate());
        let json = serde_json::to_value(&report.changed[0]).unwrap();
        assert_eq!(json["old_verdict"], "allow");
        assert_eq!(json["new_verdict"], "deny");
        assert_eq!(json["direction"], "outbound");
        assert_eq!(json["new_dry_run"], serde_json::Value::Null);
    }
}
